//! Links the firmware with aarch64-rt's image layout and this board's memory layout from `linker/`: `sbsa-ref` in
//! the first image slot, `sbsa-ref-next` (the same program) in the second, for hand-off tests. The ELF entry is
//! the EL3 stub, which drops to aarch64-rt's `entry` at EL2 (a hand-off enters the second image at EL2 directly).
fn main() {
    let linker = concat!(env!("CARGO_MANIFEST_DIR"), "/../../linker");
    println!("cargo::rustc-link-search={linker}");
    for (bin, layout) in [("sbsa-ref", "sbsa-ref.ld"), ("sbsa-ref-next", "sbsa-ref-next.ld")] {
        println!("cargo::rustc-link-arg-bin={bin}=-T{layout}");
        println!("cargo::rustc-link-arg-bin={bin}=-Timage.ld");
        println!("cargo::rustc-link-arg-bin={bin}=--entry=el3_entry");
        println!("cargo::rerun-if-changed={linker}/{layout}");
    }
}
