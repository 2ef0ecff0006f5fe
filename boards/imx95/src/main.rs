//! Bring-up firmware for NXP i.MX95 boards (the 19x19 EVK and its kin): an Arm CoreLink MMU-700 SMMUv3, an LPUART
//! console, a GICv3, non-secure DRAM from 0x9000_0000. U-Boot loads it and enters it at EL2 with `booti`, the device tree's
//! address in x0 (see `boards/README.md`, "i.MX95: first power-on"). Everything else is the board-independent
//! `smmuv3-firmware` crate; this file holds the board's entry, boot page table, static description and scenario
//! list.
//!
//! Built (never run) by `cargo xtask test`: QEMU models no i.MX95. What this binary assumes of the board, and what
//! its first run must print, is the checklist in `boards/README.md`.
#![no_std]
#![no_main]

use aarch64_rt::{entry, exception_handlers};
use smmuv3::{SmmuDescription, SmmuInterrupts};
use smmuv3_firmware::boot::{self, GIB, Table};
use smmuv3_firmware::config::{self, Config, ConfigError};
use smmuv3_firmware::dt::{self, Gic, Platform, Region, StaticDescription, Uart, UartKind};
use smmuv3_firmware::exceptions::Exceptions;
use smmuv3_firmware::{Board, el2_boot_map_48, mmu};

/// Non-secure DRAM starts here (U-Boot's first bank: the 256 MiB below belong to the System Manager, TF-A and
/// OP-TEE, and are never mapped); the boot map covers it up to [`BOOT_DRAM_END`], which holds the image
/// (0x9400_0000) and the tree U-Boot passes (0x9300_0000 by its i.MX9 environment).
const DRAM: u64 = 0x9000_0000;
/// The end of the DRAM the boot map covers (every i.MX95 board has at least this much).
const BOOT_DRAM_END: u64 = 0xc000_0000;
/// The top of the bank holding the image that U-Boot rewrites at every boot (it relocates its code, heap, stack and
/// page tables to the top of its first bank below 4 GiB): kept from the pools, the reset notes and the handover
/// region, so a warm reset's second boot still finds them.
const BOOT_LOADER_TOP: u64 = 128 << 20;
/// The console U-Boot set up (115200 8N1): lpuart1, the EVK's debug UART (`stdout-path`).
const LPUART1: u64 = 0x4438_0000;
/// The SMMUv3 (MMU-700): 1 MiB of registers in the aips4 bus.
const SMMU: u64 = 0x490d_0000;
/// The GIC-700's distributor and redistributors.
const GICD: u64 = 0x4800_0000;
const GICR: u64 = 0x4806_0000;
/// The SMMU's SPIs (rising edge), in `SmmuInterrupts`' order: eventq 325, priq 334, cmdq-sync 326, gerror 328.
const SMMU_SPIS: [u32; 4] = [325, 334, 326, 328];
/// The live-update handover region when the tree names none (a `/reserved-memory` child with `compatible =
/// "smmuv3,handover-region"`, which U-Boot's `fdt` command or an overlay adds): 32 MiB at the top of the bank
/// that holds the image, growing to a 32nd of it.
const HANDOVER_BYTES: u64 = 32 << 20;
const HANDOVER_SHARE: u64 = 32;
/// The first-power-on scenarios when nothing chooses others (the board has no fw_cfg, semihosting only under a
/// debugger, and U-Boot may set `/chosen/smmuv3,settings`): the ID-register dump and errata quirks, the SMMU
/// brought up with its queues, and a command-queue error taken through GERROR and recovered. The DMA scenarios
/// need a DMA master the firmware drives (QEMU's edu, or a virtio disk); `lu-tables` is the live update without
/// one (it resets the board); see the checklist.
const SCENARIOS: &str = "probe,init,cmdq-error";

// The boot map: the low 2 GiB of devices (UART, SMMU, GIC and the rest of the SoC's peripherals) in 1 GiB blocks;
// DRAM from 0x9000_0000 to 0xc000_0000 in 2 MiB blocks (image, tree, stack), none of the secure DRAM below it
// (a speculative fill from there would hit the TrustZone filter). `run` replaces it with a map built from the tree.
static mut BOOT_LOW: Table = Table::EMPTY
    .with_block(0, 0, mmu::DEVICE)
    .with_block(1, GIB, mmu::DEVICE);
static BOOT_DRAM: Table = Table::EMPTY.with_2m_blocks(DRAM, ((BOOT_DRAM_END - DRAM) >> 21) as usize, boot::MEMORY);
el2_boot_map_48!(0 => BOOT_LOW; BOOT_LOW[2] => BOOT_DRAM);

// The arm64 Image header `booti` checks (magic "ARM\x64" at byte 56). Flags bit 3 set with text_offset 0: U-Boot
// runs the image where it was loaded when that is 2 MiB-aligned (0x9400_0000, the link address, in the
// instructions), else at the next 2 MiB boundary. The image is not position-independent, so its first
// instruction branches to a check that it runs at its link address; elsewhere it waits for ever (no console is
// set up yet to say so). x0, the tree, is kept for the entry.
core::arch::global_asm!(
    ".section .head.image, \"ax\"",
    ".global image_header",
    "image_header:",
    "b 1f",
    "nop",
    ".quad 0",
    ".quad image_effective_bytes",
    // Flags: little-endian, page size unspecified, placed anywhere 2 MiB-aligned (bit 3).
    ".quad 8",
    ".quad 0",
    ".quad 0",
    ".quad 0",
    ".word 0x644d5241",
    ".word 0",
    "1:",
    "adr x9, image_header",
    "ldr x10, 2f",
    "cmp x9, x10",
    "b.eq entry",
    "3:",
    "wfe",
    "b 3b",
    ".balign 8",
    "2:",
    ".quad image_header",
);

exception_handlers!(Exceptions);
// 1 MiB of stack, as on QEMU virt (see there why).
entry!(main, 256);

struct Imx95 {
    /// Where U-Boot's booti put the tree (x0), when it lies in the boot-mapped DRAM.
    tree: Option<usize>,
}

impl Board for Imx95 {
    const NAME: &'static str = "NXP i.MX95";
    /// The tree's ECAM host is the NETC's integrated endpoints (ENETC, timer: fixed BARs by Enhanced Allocation,
    /// powered through the System Manager), which the firmware's enumeration does not drive; the PCIe
    /// controllers are DesignWare hosts whose links the firmware does not train.
    const PCI: bool = false;

    fn device_tree(&self) -> Option<usize> {
        self.tree
    }

    /// The facts of the upstream trees (`imx95.dtsi`, `imx95-19x19-evk.dts`), used where U-Boot passes no tree.
    fn description(&self) -> StaticDescription {
        let spi = |n: usize| Some(32 + SMMU_SPIS[n]);
        let mut memory = heapless::Vec::new();
        let _ = memory.push(Region {
            base: DRAM,
            size: BOOT_DRAM_END - DRAM,
        });
        StaticDescription {
            memory,
            handover_bytes: HANDOVER_BYTES,
            handover_share: HANDOVER_SHARE,
            boot_loader_top: BOOT_LOADER_TOP,
            uart: Some(Uart {
                kind: UartKind::Lpuart,
                region: Region {
                    base: LPUART1,
                    size: 0x1000,
                },
            }),
            smmu: Some(SmmuDescription {
                base: SMMU,
                size: 0x10_0000,
                interrupts: SmmuInterrupts {
                    eventq: spi(0),
                    priq: spi(1),
                    cmdq_sync: spi(2),
                    gerror: spi(3),
                    edge_triggered: true,
                },
                // The tree does not say dma-coherent: the driver cleans what it writes for the SMMU to read.
                dma_coherent: false,
            }),
            gic: Some(Gic {
                distributor: Region {
                    base: GICD,
                    size: 0x1_0000,
                },
                redistributors: Region {
                    base: GICR,
                    size: 0xc_0000,
                },
            }),
            ..StaticDescription::default()
        }
    }

    /// Semihosting's command line under a debugger; else `/chosen/smmuv3,settings` in the tree U-Boot passed
    /// (`config::from_chosen`); else this board's first-power-on scenarios.
    fn config(&self, _platform: &Platform) -> Result<Config, ConfigError> {
        let mut config = config::from_semihosting()?;
        if !smmuv3_firmware::finish::semihosting_absent() {
            return Ok(config);
        }
        config.set("scenarios", SCENARIOS)?;
        // SAFETY: `tree` lies in the DRAM the boot map covers (checked in `main`); `run` already parsed it.
        if let Some(Ok(fdt)) = self.tree.map(|at| unsafe { dt::parse(at) }) {
            config::from_chosen(&fdt, &mut config)?;
        }
        Ok(config)
    }
}

/// The tree U-Boot passed in x0, when it is one the firmware can use: 8-byte aligned, its header and its whole
/// `totalsize` inside the boot-mapped DRAM and below the image (the firmware's pools start after the image).
fn tree_at(x0: u64) -> Option<usize> {
    let image = core::ptr::addr_of!(image_header) as u64;
    if !x0.is_multiple_of(8) || !(DRAM..image.saturating_sub(8)).contains(&x0) {
        return None;
    }
    // SAFETY: 8 bytes at x0 lie in DRAM the boot map covers as normal memory, below the image, and nothing writes
    // them: the FDT header's magic and totalsize, read as bytes.
    let header = unsafe { (x0 as *const [u8; 8]).read() };
    let magic = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let total = u64::from(u32::from_be_bytes([header[4], header[5], header[6], header[7]]));
    // An FDT header alone is 40 bytes: a smaller totalsize is not a tree.
    (magic == 0xd00d_feed && total >= 40 && x0 + total <= image).then_some(x0 as usize)
}

unsafe extern "C" {
    /// The image's first byte (the Image header, `linker/imx95.ld`).
    static image_header: u8;
}

fn main(x0: u64, _x1: u64, _x2: u64, _x3: u64) -> ! {
    smmuv3_firmware::run(&Imx95 { tree: tree_at(x0) })
}
