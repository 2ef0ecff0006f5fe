//! Links the firmware with aarch64-rt's image layout and this board's memory layout from `linker/`: `qemu-virt`
//! in the first image slot, `qemu-virt-next` (the same program) in the second, for hand-off tests.
fn main() {
    let linker = concat!(env!("CARGO_MANIFEST_DIR"), "/../../linker");
    println!("cargo::rustc-link-search={linker}");
    for (bin, layout) in [("qemu-virt", "qemu-virt.ld"), ("qemu-virt-next", "qemu-virt-next.ld")] {
        println!("cargo::rustc-link-arg-bin={bin}=-T{layout}");
        println!("cargo::rustc-link-arg-bin={bin}=-Timage.ld");
        println!("cargo::rerun-if-changed={linker}/{layout}");
    }
}
