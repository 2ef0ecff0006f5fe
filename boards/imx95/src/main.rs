//! Bring-up firmware for NXP i.MX95 boards (the 19x19 EVK and its kin): an Arm CoreLink MMU-700 SMMUv3, an LPUART
//! console, a GICv3, DRAM from 0x8000_0000. U-Boot loads it and enters it at EL2 with `booti`, the device tree's
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

/// DRAM's first bank starts here; the boot map covers its first 1 GiB (every i.MX95 board has at least that),
/// which holds the image (0x9400_0000) and the tree U-Boot passes (0x9300_0000 by its i.MX9 environment).
const DRAM: u64 = 0x8000_0000;
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

// The boot map (1 GiB blocks): the low 2 GiB of devices (UART, SMMU, GIC and the rest of the SoC's peripherals),
// the first 1 GiB of DRAM (image, tree, stack). `run` replaces it with a map built from the tree.
static BOOT_LOW: Table = Table::EMPTY
    .with_block(0, 0, mmu::DEVICE)
    .with_block(1, GIB, mmu::DEVICE)
    .with_block(2, DRAM, boot::MEMORY);
el2_boot_map_48!(0 => BOOT_LOW);

// The arm64 Image header `booti` checks (magic "ARM\x64" at byte 56), with the load offset and size the linker
// script gives; its first word branches to aarch64-rt's entry, the second is a no-op.
core::arch::global_asm!(
    ".section .head.image, \"ax\"",
    ".global image_header",
    "image_header:",
    "b entry",
    "nop",
    ".quad image_text_offset",
    ".quad image_effective_bytes",
    // Flags: little-endian, page size unspecified, placed at the start of DRAM plus text_offset (bit 3 clear).
    ".quad 0",
    ".quad 0",
    ".quad 0",
    ".quad 0",
    ".word 0x644d5241",
    ".word 0",
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
        let _ = memory.push(Region { base: DRAM, size: GIB });
        StaticDescription {
            memory,
            handover_bytes: HANDOVER_BYTES,
            handover_share: HANDOVER_SHARE,
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

fn main(x0: u64, _x1: u64, _x2: u64, _x3: u64) -> ! {
    let tree = (DRAM..DRAM + GIB).contains(&x0).then_some(x0 as usize);
    smmuv3_firmware::run(&Imx95 { tree })
}
