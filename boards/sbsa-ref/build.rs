//! Links the firmware with aarch64-rt's image layout and this board's memory layout from `linker/`; the ELF
//! entry is the EL3 stub, which drops to aarch64-rt's `entry` at EL2.
fn main() {
    let linker = concat!(env!("CARGO_MANIFEST_DIR"), "/../../linker");
    println!("cargo::rustc-link-search={linker}");
    println!("cargo::rustc-link-arg=-Tsbsa-ref.ld");
    println!("cargo::rustc-link-arg=-Timage.ld");
    println!("cargo::rustc-link-arg=--entry=el3_entry");
    println!("cargo::rerun-if-changed={linker}/sbsa-ref.ld");
}
