// The qemu-virt firmware's items, shared by the two binaries (`main.rs` in the first image slot, `next.rs` in the
// second; see `build.rs`).

use aarch64_rt::{entry, exception_handlers};
use smmuv3_firmware::boot::{self, GIB, Table};
use smmuv3_firmware::config::{self, Config, ConfigError};
use smmuv3_firmware::dt::{Platform, StaticDescription};
use smmuv3_firmware::exceptions::Exceptions;
use smmuv3_firmware::{Board, el2_boot_map_48, mmu};

/// QEMU places the DTB at the start of RAM when the firmware is loaded with `-device loader`.
const DTB_ADDRESS: usize = 0x4000_0000;
/// The live-update handover region when the tree names none (QEMU's never does; an image a hand-off jumps to finds
/// the node the previous image added): 32 MiB at the top of RAM, below the reset notes. 64 KiB of records and 16
/// arenas of about 2 MiB; the harness gives the machine 1 GiB or more.
const HANDOVER_BYTES: u64 = 32 << 20;
/// The region grows to a 32nd of the RAM bank (so 32 MiB up to 1 GiB of RAM; 128 MiB with 4 GiB, whose arenas
/// then hold nearly 4 GiB of 4 KiB pages each).
const HANDOVER_SHARE: u64 = 32;

// The boot map (1 GiB blocks): the low 1 GiB of devices (UART, SMMU, fw_cfg, GIC, PCI windows), the first 1 GiB
// of RAM (image, DTB, stack), and the high ECAM at 256 GiB. `run` replaces it with a map built from the device
// tree. The shared 48-bit boot map rather than aarch64-rt's `initial_pagetable!`, whose EL2 routine writes
// PARange into the wrong TCR_EL2 field.
static BOOT_LOW: Table = Table::EMPTY
    .with_block(0, 0, mmu::DEVICE)
    .with_block(1, GIB, boot::MEMORY)
    .with_block(256, 256 * GIB, mmu::DEVICE);
el2_boot_map_48!(0 => BOOT_LOW);

exception_handlers!(Exceptions);
// 1 MiB of stack: an initialised SMMU handle (`Iommu`, with its domain table and ASID/VMID bitmaps) is some 58 KiB,
// and the hand-off scenarios hold two of them besides the region's decoder: `lu-noreset`'s own frame is 232 KiB
// (the two images' handles no longer share a stack slot since the handle became `Sync`), `finish_handover`'s re-arm
// 156 KiB, the decoder 52 KiB, which overran 512 KiB into the BSS (the pool's arenas) below. There is no guard
// page, so an overflow would corrupt memory silently rather than fault.
entry!(main, 256);

struct QemuVirt;

impl Board for QemuVirt {
    const NAME: &'static str = "QEMU virt";

    fn device_tree(&self) -> Option<usize> {
        Some(DTB_ADDRESS)
    }

    /// Everything comes from the tree, except the handover region's size (QEMU's tree has no `/reserved-memory`).
    fn description(&self) -> StaticDescription {
        StaticDescription {
            handover_bytes: HANDOVER_BYTES,
            handover_share: HANDOVER_SHARE,
            ..StaticDescription::default()
        }
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
