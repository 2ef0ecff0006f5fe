//! Firmware for QEMU's `virt` machine at EL2: the board's entry, boot page table and configuration source.
//! Everything else is in the board-independent `smmuv3-firmware` crate.
//!
//! Known to work: QEMU 10.0 (`-M virt,virtualization=on,iommu=smmuv3 -cpu max`, or `-M virt-9.1` with
//! `-global arm-smmuv3.stage=1|2`), firmware loaded with `-device loader,file=…,cpu-num=0`; see `cargo xtask qemu`.
#![no_std]
#![no_main]

use aarch64_paging::descriptor::El23Attributes;
use aarch64_rt::{InitialPagetable, entry, exception_handlers, initial_pagetable};
use smmuv3_firmware::config::{self, Config, ConfigError};
use smmuv3_firmware::dt::Platform;
use smmuv3_firmware::exceptions::Exceptions;
use smmuv3_firmware::{Board, mmu};

/// QEMU places the DTB at the start of RAM when the firmware is loaded with `-device loader`.
const DTB_ADDRESS: usize = 0x4000_0000;

const BOOT_DEVICE: El23Attributes = mmu::DEVICE;
const BOOT_MEMORY: El23Attributes = El23Attributes::VALID
    .union(El23Attributes::ATTRIBUTE_INDEX_1)
    .union(El23Attributes::INNER_SHAREABLE)
    .union(El23Attributes::ACCESSED);

// The boot map (1 GiB blocks, level 1): low 1 GiB of devices (UART, SMMU, fw_cfg, PCI windows), the first 1 GiB
// of RAM (image, DTB, stack), and the high ECAM. `run` replaces it with a map built from the device tree.
initial_pagetable!(
    {
        let mut table = [0; 512];
        table[0] = BOOT_DEVICE.bits();
        table[1] = BOOT_MEMORY.bits() | 0x4000_0000;
        table[256] = BOOT_DEVICE.bits() | 0x40_0000_0000;
        InitialPagetable(table)
    },
    mmu::MAIR.0
);

exception_handlers!(Exceptions);
// 512 KiB of stack: an initialised SMMU handle (with its ASID and VMID bitmaps) is some 17 KiB and scenarios move
// a few of them; there is no guard page, so an overflow would corrupt memory silently rather than fault.
entry!(main, 128);

struct QemuVirt;

impl Board for QemuVirt {
    const NAME: &'static str = "QEMU virt";

    fn device_tree(&self) -> Option<usize> {
        Some(DTB_ADDRESS)
    }

    fn config(&self, platform: &Platform) -> Result<Config, ConfigError> {
        match platform.fw_cfg {
            // SAFETY: the fw_cfg device the tree names is identity-mapped as device memory and used only here.
            Some(region) => unsafe { config::from_fw_cfg(region.base as usize) },
            None => Ok(Config::default()),
        }
    }
}

fn main(_x0: u64, _x1: u64, _x2: u64, _x3: u64) -> ! {
    smmuv3_firmware::run(&QemuVirt)
}
