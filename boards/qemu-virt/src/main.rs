//! Firmware for QEMU's `virt` machine at EL2: the board's entry, boot page table and configuration source.
//! Everything else is in the board-independent `smmuv3-firmware` crate.
//!
//! Known to work: QEMU 10.0 (`-M virt,virtualization=on,iommu=smmuv3 -cpu max`, or `-M virt-9.1` with
//! `-global arm-smmuv3.stage=1|2`), firmware loaded with `-device loader,file=…,cpu-num=0`; see `cargo xtask qemu`.
#![no_std]
#![no_main]

include!("board.rs");
