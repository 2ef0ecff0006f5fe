//! The `qemu-virt` firmware linked into the second image slot (`linker/qemu-virt-next.ld`): the image a hand-off test
//! (`lu-noreset` with `next-image=on`) jumps to, with the SMMU left running. The same program as `main.rs`.
#![no_std]
#![no_main]

include!("board.rs");
