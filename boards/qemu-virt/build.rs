//! Links the firmware with aarch64-rt's image layout and this board's memory layout from `linker/`.
fn main() {
    let linker = concat!(env!("CARGO_MANIFEST_DIR"), "/../../linker");
    println!("cargo::rustc-link-search={linker}");
    println!("cargo::rustc-link-arg=-Tqemu-virt.ld");
    println!("cargo::rustc-link-arg=-Timage.ld");
    println!("cargo::rerun-if-changed={linker}/qemu-virt.ld");
}
