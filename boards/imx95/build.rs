//! Links the firmware with aarch64-rt's image layout and this board's memory layout (`linker/imx95.ld`, which puts
//! the arm64 Image header U-Boot's `booti` looks for in front of aarch64-rt's entry). The ELF entry is that header,
//! whose first instruction branches to the entry.
fn main() {
    let linker = concat!(env!("CARGO_MANIFEST_DIR"), "/../../linker");
    println!("cargo::rustc-link-search={linker}");
    println!("cargo::rustc-link-arg-bin=imx95=-Timx95.ld");
    println!("cargo::rustc-link-arg-bin=imx95=-Timage.ld");
    println!("cargo::rustc-link-arg-bin=imx95=--entry=image_header");
    println!("cargo::rerun-if-changed={linker}/imx95.ld");
}
