// The sbsa-ref firmware's items, shared by the two binaries (`main.rs` in the first image slot, `next.rs` in the
// second; see `build.rs`).

use aarch64_rt::{entry, exception_handlers};
use smmuv3::board::IommuMapEntry;
use smmuv3::{IommuMap, SmmuDescription, SmmuInterrupts};
use smmuv3_firmware::boot::{self, GIB, Table};
use smmuv3_firmware::config::{self, Config, ConfigError};
use smmuv3_firmware::dt::{Gic, PciWindow, PcieHost, Platform, Region, StaticDescription, Uart, UartKind, WindowKind};
use smmuv3_firmware::exceptions::Exceptions;
use smmuv3_firmware::{Board, el2_boot_map_48, el3_boot_stub, mmu};

/// RAM base; QEMU places the DTB here.
const RAM: u64 = 0x100_0000_0000;
/// The PL011 console.
const UART: u64 = 0x6000_0000;
/// The SMMUv3 (page 0 and page 1).
const SMMU: u64 = 0x6005_0000;
/// GICv3 distributor and redistributors.
const GICD: u64 = 0x4006_0000;
const GICR: u64 = 0x4008_0000;
/// The generic counter's frequency: 1 GHz on QEMU's sbsa-ref (its CNTFRQ_EL0 at reset, measured).
const COUNTER_FREQUENCY: u64 = 1_000_000_000;
/// The secure embedded controller: a 32-bit write of 1 powers off, of 2 resets. Secure only.
const EMBEDDED_CONTROLLER: u64 = 0x5000_0000;
/// The SMMU's SPIs: `SBSA_SMMU` = 12 in QEMU's interrupt table, four consecutive lines (eventq, priq,
/// cmd-sync, gerror), edge-triggered.
const SMMU_FIRST_SPI: u32 = 12;
/// PCIe: ECAM (256 buses), 32-bit and 64-bit memory windows (CPU address = bus address), I/O window.
const ECAM: Region = Region {
    base: 0xf000_0000,
    size: 0x1000_0000,
};
const MMIO32: (u64, u64) = (0x8000_0000, 0x7000_0000);
const MMIO64: (u64, u64) = (0x1_0000_0000, 0xff_0000_0000);
const PIO: (u64, u64) = (0x7fff_0000, 0x1_0000);
/// The live-update handover region: the board's tree has no `/reserved-memory`, so its description states it:
/// 32 MiB at the top of the RAM bank (1 GiB at 1 TiB with the harness's `-m 1G`), below the reset notes.
const HANDOVER_BYTES: u64 = 32 << 20;
/// The region grows to a 32nd of the RAM bank (so 32 MiB up to 1 GiB of RAM; 128 MiB with 4 GiB, whose arenas
/// then hold nearly 4 GiB of 4 KiB pages each).
const HANDOVER_SHARE: u64 = 32;

// The boot map (1 GiB blocks): the low devices (GIC, embedded controller, UART, SMMU; the PCI 32-bit window; the
// ECAM) and the first 1 GiB of RAM (image, DTB, stack; the smallest RAM the harness gives the board, so no block
// names memory that may not exist). `run` replaces it with a map built from the description.
static BOOT_LOW: Table = Table::EMPTY
    .with_block(1, GIB, mmu::DEVICE)
    .with_block(2, 2 * GIB, mmu::DEVICE)
    .with_block(3, 3 * GIB, mmu::DEVICE);
static BOOT_RAM: Table = Table::EMPTY.with_block(0, RAM, boot::MEMORY);
el2_boot_map_48!(0 => BOOT_LOW, 2 => BOOT_RAM);

el3_boot_stub! {
    counter_frequency: COUNTER_FREQUENCY,
    gic_distributor: GICD,
    uart: UART,
    system_off: (EMBEDDED_CONTROLLER, 1),
    system_reset: (EMBEDDED_CONTROLLER, 2),
}

exception_handlers!(Exceptions);
// 1 MiB of stack, as on virt (see there why).
entry!(main, 256);

struct SbsaRef;

impl Board for SbsaRef {
    const NAME: &'static str = "QEMU sbsa-ref";

    fn device_tree(&self) -> Option<usize> {
        Some(RAM as usize)
    }

    fn description(&self) -> StaticDescription {
        let spi = |n: u32| Some(32 + SMMU_FIRST_SPI + n);
        let mut iommu_map = IommuMap::new();
        // Every requester on the root bus is behind the SMMU with StreamID = requester ID.
        let _ = iommu_map.push(IommuMapEntry {
            rid_base: 0,
            sid_base: 0,
            length: 0x1_0000,
        });
        let window = |kind, (base, size): (u64, u64), pci_base| PciWindow {
            kind,
            prefetchable: false,
            pci_base,
            cpu_base: base,
            size,
        };
        let mut windows = heapless::Vec::new();
        let _ = windows.push(window(WindowKind::Mem32, MMIO32, MMIO32.0));
        let _ = windows.push(window(WindowKind::Mem64, MMIO64, MMIO64.0));
        let _ = windows.push(window(WindowKind::Io, PIO, 0));
        StaticDescription {
            handover_bytes: HANDOVER_BYTES,
            handover_share: HANDOVER_SHARE,
            uart: Some(Uart {
                kind: UartKind::Pl011,
                region: Region {
                    base: UART,
                    size: 0x1000,
                },
            }),
            smmu: Some(SmmuDescription {
                base: SMMU,
                size: 0x2_0000,
                interrupts: SmmuInterrupts {
                    eventq: spi(0),
                    priq: spi(1),
                    cmdq_sync: spi(2),
                    gerror: spi(3),
                    edge_triggered: true,
                },
                // QEMU's SMMU says IDR0.COHACC = 1 and QEMU models no caches the SMMU could miss.
                dma_coherent: true,
            }),
            pcie: Some(PcieHost {
                ecam: ECAM,
                bus_range: (0, 255),
                windows,
                iommu_map,
                iommu_map_mask: None,
            }),
            gic: Some(Gic {
                distributor: Region {
                    base: GICD,
                    size: 0x1_0000,
                },
                redistributors: Region {
                    base: GICR,
                    size: 0x400_0000,
                },
            }),
            ..StaticDescription::default()
        }
    }

    fn config(&self, _platform: &Platform) -> Result<Config, ConfigError> {
        config::from_semihosting()
    }
}

fn main(_x0: u64, _x1: u64, _x2: u64, _x3: u64) -> ! {
    smmuv3_firmware::run(&SbsaRef)
}
