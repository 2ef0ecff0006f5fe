//! Firmware for QEMU's `sbsa-ref` machine: the CPU starts at EL3 with no firmware underneath, so the image's
//! entry is the shared EL3 stub, which drops to non-secure EL2 where the same firmware as on `virt` runs. The
//! board's device tree describes only memory, CPUs and (without a `compatible`) the GIC: everything else comes
//! from the static description below, taken from QEMU's `hw/arm/sbsa-ref.c` memory map and interrupt table.
//!
//! Known to work: QEMU 10.0 (`-M sbsa-ref -cpu max -smp 1 -m 1G`, firmware loaded with
//! `-device loader,file=…,cpu-num=0`, `-global bochs-display.romfile=` when the VGA BIOS is not installed; with
//! `-smp N`, `-device loader,addr=<el3_entry>,cpu-num=K` for each secondary K, which then waits in the EL3 stub for
//! PSCI CPU_ON); see `cargo xtask qemu --board sbsa-ref [--smp N]`.
#![no_std]
#![no_main]

include!("board.rs");
