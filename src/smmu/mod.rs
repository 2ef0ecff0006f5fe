//! One SMMU: probed ([`Smmu`]: its registers and what it implements), then initialised into the core every layer
//! above builds on (`SmmuCore`: the stream table, the command and event queues, the ASID/VMID allocators), with
//! STE and CD installation, invalidation, event draining and global-error handling. Nothing here knows a domain.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | probe: [`Smmu`], [`ProbeError`] |
//! | `features.rs` | the ID registers decoded: [`Features`] |
//! | `init.rs` | init in the architecture's order, adopting a running SMMU, turning translation off, shutdown |
//! | `state.rs` | what an initialised SMMU owns, and its ASIDs and VMIDs |
//! | `install.rs` | STEs and CDs through the hitless writer |
//! | `invalidate.rs` | TLB invalidation of a gather, whole-SMMU invalidation, command batches |
//! | `events.rs` | event draining and global errors |

use core::fmt;
use core::ptr::NonNull;

use tock_registers::interfaces::Readable;

mod events;
pub mod features;
pub(crate) mod init;
mod install;
mod invalidate;
mod state;
#[cfg(test)]
pub(crate) mod tests;

pub(crate) use events::Drainer;
pub use events::GlobalError;
pub use features::{Features, IdRegisters, Quirks, Stages};
pub use init::{
    Bookkeeping, Configuration, DEFAULT_ATTACHED_STREAMS, HANDSHAKE_TIMEOUT_US, InitError, InitOptions,
    InterruptSources, RunningSmmu, StreamTableChoice,
};
pub use install::{AttachError, InstallReport};
pub use invalidate::{FlushError, InvalidationError, PER_GRANULE_LIMIT, TlbContext};
pub(crate) use state::SmmuCore;

use crate::hw::regs::{CR0, GBPA, PAGE1_QUEUES_OFFSET, REGISTER_SPACE_SIZE, SmmuPage0, SmmuPage1Queues};
use features::TableEndianness;

/// Why the driver refuses an SMMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProbeError {
    /// The register space the board describes is smaller than pages 0 and 1 (128 KiB).
    RegisterSpaceTooSmall {
        /// The size the board gave.
        size: u64,
    },
    /// The SMMU reports an architecture other than SMMUv3 (AIDR.ArchMajorRev != 0).
    NotSmmuV3 {
        /// The AIDR value read.
        aidr: u32,
    },
    /// The SMMU cannot walk AArch64 (VMSAv8-64) translation tables, the only format this driver writes.
    NoAArch64Tables,
    /// The SMMU lacks a stage the caller needs.
    MissingStage {
        /// What the caller needs.
        wanted: Stages,
        /// What the SMMU has.
        found: Stages,
    },
    /// The SMMU supports no 4 KiB granule, which every table this driver builds uses.
    No4kGranule,
    /// The SMMU takes preset table and queue base addresses relative to its own base (IDR1.REL = 1); this driver
    /// programs absolute physical addresses only.
    RelativeBasePointers,
    /// The SMMU walks translation tables of an endianness this driver does not write (IDR0.TTENDIAN): it writes
    /// little-endian tables only.
    TableEndianness {
        /// What the SMMU reports.
        found: TableEndianness,
    },
    /// An ID register field is outside the range the architecture allows.
    OutOfRange {
        /// The field, as the specification names it.
        field: &'static str,
        /// Its value.
        value: u8,
        /// The largest legal value.
        max: u8,
    },
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::RegisterSpaceTooSmall { size } => {
                write!(
                    f,
                    "SMMU register space of {size:#x} bytes is smaller than the 128 KiB of pages 0 and 1"
                )
            }
            ProbeError::NotSmmuV3 { aidr } => {
                write!(f, "AIDR {aidr:#x} does not describe an SMMUv3")
            }
            ProbeError::NoAArch64Tables => f.write_str("SMMU cannot walk AArch64 translation tables"),
            ProbeError::MissingStage { wanted, found } => {
                write!(f, "need {wanted}, SMMU offers {found}")
            }
            ProbeError::No4kGranule => f.write_str("SMMU does not support the 4 KiB translation granule"),
            ProbeError::RelativeBasePointers => f.write_str(
                "SMMU uses base addresses relative to its own base (IDR1.REL = 1); this driver programs absolute ones",
            ),
            ProbeError::TableEndianness { found } => write!(
                f,
                "SMMU walks {} translation tables (IDR0.TTENDIAN); this driver writes little-endian ones only",
                match found {
                    TableEndianness::Big => "big-endian only",
                    TableEndianness::Reserved => "reserved-endianness (TTENDIAN = 0b01)",
                    TableEndianness::Little | TableEndianness::Mixed => "little-endian",
                }
            ),
            ProbeError::OutOfRange { field, value, max } => {
                write!(
                    f,
                    "SMMU reports {field} = {value}, beyond the architectural maximum {max}"
                )
            }
        }
    }
}

/// One SMMUv3: its registers and what it implements.
pub struct Smmu {
    page0: NonNull<SmmuPage0>,
    page1: NonNull<SmmuPage1Queues>,
    features: Features,
}

// SAFETY: `Smmu` holds MMIO pointers to a device, not to Rust data; moving it to another CPU is sound, and every
// access goes through `&self`/`&mut self` so the usual borrow rules serialise them.
unsafe impl Send for Smmu {}

// SAFETY: `&Smmu` gives MMIO reads and writes of single registers (volatile, each single-copy atomic on the
// device); no Rust data is shared through the pointers. Which CPU may write which register when is decided by the
// owners above (the command queue's protocol, the stream table's and event queue's locks, init and shutdown
// through `self`), never by this type.
unsafe impl Sync for Smmu {}

impl Smmu {
    /// Reads the ID registers of the SMMU whose register space (pages 0 and 1) is mapped at `registers` as
    /// device memory, and decodes them. Nothing is written to the SMMU.
    ///
    /// # Errors
    /// [`ProbeError::RegisterSpaceTooSmall`] if `size` is under 128 KiB; any error of [`Smmu::check_features`].
    ///
    /// # Safety
    /// `registers` must point to the SMMU's register space, mapped as device memory for `size` bytes, and no other
    /// code may program this SMMU while the returned value lives.
    pub unsafe fn probe(registers: NonNull<u8>, size: u64) -> Result<Self, ProbeError> {
        if size < REGISTER_SPACE_SIZE as u64 {
            return Err(ProbeError::RegisterSpaceTooSmall { size });
        }
        let smmu = Smmu {
            page0: registers.cast(),
            // SAFETY: `size` covers page 1 (checked above), so the offset stays inside the mapping.
            page1: unsafe { registers.add(PAGE1_QUEUES_OFFSET) }.cast(),
            features: Features::decode(IdRegisters::default()),
        };
        let raw = smmu.read_id_registers();
        let smmu = Smmu {
            features: Features::decode(raw),
            ..smmu
        };
        Self::check_features(&smmu.features)?;
        Ok(smmu)
    }

    /// Checks that decoded ID registers describe an SMMU this driver can drive. [`Smmu::probe`] calls it; it is
    /// public so that a caller can vet recorded ID register values without the hardware.
    ///
    /// # Errors
    /// [`ProbeError::NotSmmuV3`] if AIDR names another architecture; [`ProbeError::NoAArch64Tables`],
    /// [`ProbeError::No4kGranule`], [`ProbeError::RelativeBasePointers`] (IDR1.REL = 1) or
    /// [`ProbeError::TableEndianness`] (big-endian-only or reserved IDR0.TTENDIAN) for an SMMU this driver cannot
    /// program; [`ProbeError::OutOfRange`] for a size field beyond the architecture's maximum.
    pub fn check_features(f: &Features) -> Result<(), ProbeError> {
        let aidr = f.raw.aidr;
        if (aidr >> 4) & 0xf != 0 {
            return Err(ProbeError::NotSmmuV3 { aidr });
        }
        if !f.aarch64_tables {
            return Err(ProbeError::NoAArch64Tables);
        }
        if !f.granules.size_4k {
            return Err(ProbeError::No4kGranule);
        }
        if f.relative_base_pointers {
            return Err(ProbeError::RelativeBasePointers);
        }
        if matches!(f.endianness, TableEndianness::Big | TableEndianness::Reserved) {
            return Err(ProbeError::TableEndianness { found: f.endianness });
        }
        for (field, value, max) in [
            ("IDR1.SIDSIZE", f.sid_bits, 32),
            ("IDR1.SSIDSIZE", f.ssid_bits, 20),
            ("IDR1.CMDQS", f.cmdq_log2_max, 19),
            ("IDR1.EVENTQS", f.eventq_log2_max, 19),
        ] {
            if value > max {
                return Err(ProbeError::OutOfRange { field, value, max });
            }
        }
        Ok(())
    }

    pub(crate) fn regs(&self) -> &SmmuPage0 {
        // SAFETY: `probe`'s contract: the pointer maps page 0 for the life of `self`.
        unsafe { self.page0.as_ref() }
    }

    pub(crate) fn page1_regs(&self) -> &SmmuPage1Queues {
        // SAFETY: `probe`'s contract: the pointer maps page 1 for the life of `self`.
        unsafe { self.page1.as_ref() }
    }

    fn read_id_registers(&self) -> IdRegisters {
        let r = self.regs();
        IdRegisters {
            idr: [
                r.idr0.get(),
                r.idr1.get(),
                r.idr2.get(),
                r.idr3.get(),
                r.idr4.get(),
                r.idr5.get(),
            ],
            iidr: r.iidr.get(),
            aidr: r.aidr.get(),
        }
    }

    /// What this SMMU implements.
    pub fn features(&self) -> &Features {
        &self.features
    }

    /// Takes the board's word on whether the SMMU's table walks and queue accesses are coherent with the CPU
    /// caches (DT `dma-coherent`, the IORT's COHACC override): the system's interconnect decides, and it may differ
    /// from what IDR0.COHACC says of the SMMU alone. From here on [`Features::coherent`] is the board's value:
    /// coherent accesses use write-back shareable attributes, non-coherent ones non-cacheable attributes with
    /// cache maintenance by the CPU. Returns `true` when the board overrode IDR0.COHACC (worth a warning).
    pub fn apply_board_coherency(&mut self, dma_coherent: bool) -> bool {
        let overridden = self.features.coherent != dma_coherent;
        self.features.coherent = dma_coherent;
        overridden
    }

    /// Checks that the SMMU offers every stage in `wanted`, and nesting if `wanted` asks for it.
    ///
    /// # Errors
    /// [`ProbeError::MissingStage`] naming what was wanted and what the SMMU has.
    pub fn require_stages(&self, wanted: Stages) -> Result<(), ProbeError> {
        let found = self.features.stages();
        if !found.covers(wanted) {
            return Err(ProbeError::MissingStage { wanted, found });
        }
        Ok(())
    }

    /// Whether translation is enabled (CR0ACK.SMMUEN).
    pub fn is_enabled(&self) -> bool {
        self.regs().cr0ack.is_set(CR0::SMMUEN)
    }

    /// Whether incoming transactions abort while translation is disabled (GBPA.ABORT). At reset this is
    /// IMPLEMENTATION DEFINED; QEMU resets it to 0, i.e. DMA bypasses an un-initialised SMMU.
    pub fn global_bypass_aborts(&self) -> bool {
        self.regs().gbpa.is_set(GBPA::ABORT)
    }
}

#[cfg(test)]
mod probe_tests {
    extern crate std;
    use std::string::ToString;

    use super::*;

    /// ID registers of QEMU 10.0's SMMUv3 on `-M virt,iommu=smmuv3` (both stages).
    const QEMU_NESTED: IdRegisters = IdRegisters {
        idr: [0x0D44_101B, 0x0273_0010, 0, 0x1414, 0, 0x74],
        iidr: 0,
        aidr: 0,
    };

    fn check(raw: IdRegisters) -> Result<(), ProbeError> {
        Smmu::check_features(&Features::decode(raw))
    }

    #[test]
    fn qemus_smmu_is_drivable() {
        assert_eq!(check(QEMU_NESTED), Ok(()));
    }

    #[test]
    fn relative_base_pointers_are_refused() {
        // IDR1.REL is bit 28.
        let mut raw = QEMU_NESTED;
        raw.idr[1] |= 1 << 28;
        assert_eq!(check(raw), Err(ProbeError::RelativeBasePointers));
        assert!(check(raw).unwrap_err().to_string().contains("IDR1.REL = 1"));
    }

    #[test]
    fn big_endian_only_and_reserved_table_endianness_are_refused() {
        // IDR0.TTENDIAN is bits [22:21]: 0b00 mixed, 0b01 reserved, 0b10 little, 0b11 big.
        let with = |ttendian: u32| {
            let mut raw = QEMU_NESTED;
            raw.idr[0] = (raw.idr[0] & !(0b11 << 21)) | ttendian << 21;
            raw
        };
        assert_eq!(check(with(0b00)), Ok(()));
        assert_eq!(check(with(0b10)), Ok(()));
        assert_eq!(
            check(with(0b11)),
            Err(ProbeError::TableEndianness {
                found: TableEndianness::Big
            })
        );
        assert_eq!(
            check(with(0b01)),
            Err(ProbeError::TableEndianness {
                found: TableEndianness::Reserved
            })
        );
        assert!(check(with(0b11)).unwrap_err().to_string().contains("big-endian only"));
    }

    #[test]
    fn earlier_refusals_still_hold() {
        let mut raw = QEMU_NESTED;
        raw.aidr = 0x10;
        assert_eq!(check(raw), Err(ProbeError::NotSmmuV3 { aidr: 0x10 }));
        let mut raw = QEMU_NESTED;
        raw.idr[5] &= !(1 << 4);
        assert_eq!(check(raw), Err(ProbeError::No4kGranule));
        let mut raw = QEMU_NESTED;
        raw.idr[1] = (raw.idr[1] & !0x3f) | 33;
        assert_eq!(
            check(raw),
            Err(ProbeError::OutOfRange {
                field: "IDR1.SIDSIZE",
                value: 33,
                max: 32
            })
        );
    }
}
