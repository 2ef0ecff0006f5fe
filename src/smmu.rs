//! The driver's handle on one SMMU instance.

use core::fmt;
use core::ptr::NonNull;

use tock_registers::interfaces::Readable;

use crate::features::{Features, IdRegisters, Stages};
use crate::hw::regs::{CR0, GBPA, PAGE1_QUEUES_OFFSET, REGISTER_SPACE_SIZE, SmmuPage0, SmmuPage1Queues};

/// Why the driver refuses an SMMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

impl Smmu {
    /// Reads the ID registers of the SMMU whose register space (pages 0 and 1) is mapped at `registers` as
    /// device memory, and decodes them. Nothing is written to the SMMU.
    ///
    /// # Errors
    /// [`ProbeError::RegisterSpaceTooSmall`] if `size` is under 128 KiB, [`ProbeError::NotSmmuV3`] if AIDR names
    /// another architecture, [`ProbeError::NoAArch64Tables`] or [`ProbeError::No4kGranule`] for an SMMU this
    /// driver cannot program.
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
        if (raw.aidr >> 4) & 0xf != 0 {
            return Err(ProbeError::NotSmmuV3 { aidr: raw.aidr });
        }
        if !smmu.features.aarch64_tables {
            return Err(ProbeError::NoAArch64Tables);
        }
        if !smmu.features.granules.size_4k {
            return Err(ProbeError::No4kGranule);
        }
        let f = &smmu.features;
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
        Ok(smmu)
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
