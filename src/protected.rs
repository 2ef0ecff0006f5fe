//! Memory no device may ever be given: the handover region (its records and the preserved domains' tables) and
//! the memory the driver takes its stream table, CD tables, page tables and queues from. A device that could
//! write them could rewrite its own translations (or, through a handover region, the next image's). The board
//! declares these extents (`protect_memory`); `map` refuses any output range that touches
//! one, and a restore refuses preserved tables whose leaves do.

use core::fmt;

use crate::mem::Extent;

/// Protected extents one SMMU keeps: a check against each runs on every `map`, so the list stays short.
pub const MAX_PROTECTED: usize = 8;

/// Why `protect_memory` refused an extent. Nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtectError {
    /// The extent is empty or wraps past the end of the address space.
    BadExtent(Extent),
    /// [`MAX_PROTECTED`] extents are declared already.
    Full {
        /// The extent refused.
        extent: Extent,
        /// The capacity.
        capacity: usize,
    },
}

impl fmt::Display for ProtectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtectError::BadExtent(e) => write!(f, "protected memory {:#x}+{:#x} is empty or wraps", e.base, e.len),
            ProtectError::Full { extent, capacity } => write!(
                f,
                "protected memory {:#x}+{:#x} refused: all {capacity} protected extents are declared",
                extent.base, extent.len
            ),
        }
    }
}

impl core::error::Error for ProtectError {}

/// The protected extents of one SMMU.
#[derive(Clone, Debug, Default)]
pub(crate) struct ProtectedMemory {
    extents: heapless::Vec<Extent, MAX_PROTECTED>,
}

impl ProtectedMemory {
    pub(crate) const fn new() -> Self {
        ProtectedMemory {
            extents: heapless::Vec::new(),
        }
    }

    /// Adds `extent` (nothing when an extent already declared holds it).
    pub(crate) fn add(&mut self, extent: Extent) -> Result<(), ProtectError> {
        if extent.len == 0 || extent.end().is_none() {
            return Err(ProtectError::BadExtent(extent));
        }
        if self.extents.iter().any(|e| e.contains(extent.base, extent.len)) {
            return Ok(());
        }
        self.extents.push(extent).map_err(|extent| ProtectError::Full {
            extent,
            capacity: MAX_PROTECTED,
        })
    }

    /// The declared extents.
    pub(crate) fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// The first protected extent that `[base, base + len)` shares a byte with. A range that wraps is left to the
    /// caller's own range checks (no protected extent is reported for it).
    #[inline]
    pub(crate) fn overlapping(&self, base: u64, len: u64) -> Option<Extent> {
        let end = base.checked_add(len)?;
        self.extents
            .iter()
            .copied()
            .find(|e| base < e.base + e.len && e.base < end)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::domain::{DomainError, Stage1Options, Stage2Options};
    use crate::pgtable::Prot;
    use crate::smmu::tests::{Model, frames};
    use crate::{InitOptions, Iommu};

    const RW: Prot = Prot::READ.union(Prot::WRITE).union(Prot::CACHEABLE);

    #[test]
    fn map_refuses_an_output_range_reaching_protected_memory_and_changes_nothing() {
        let frames = frames();
        let model = Model::start(frames);
        let smmu: Iommu<_> = model.smmu().init(frames, &InitOptions::default()).unwrap();
        let tables = Extent {
            base: 0x4000_0000,
            len: 0x10_0000,
        };
        let region = Extent {
            base: 0x7e00_0000,
            len: 0x200_0000,
        };
        smmu.protect_memory(tables).unwrap();
        smmu.protect_memory(region).unwrap();
        for stage2 in [false, true] {
            let d = if stage2 {
                smmu.create_stage2(frames, Stage2Options { input_bits: 40 }).unwrap()
            } else {
                smmu.create_stage1(frames, Stage1Options::default()).unwrap()
            };
            let table_count = smmu.domain_table(d).unwrap().tables();
            // One page inside, a range ending one page into it, a 2 MiB block over the region's start, a range
            // that covers a whole protected extent.
            for (pa, size, protected) in [
                (0x4000_0000, 0x1000, tables),
                (0x3fff_f000, 0x2000, tables),
                (0x7e00_0000, 0x20_0000, region),
                (0x3000_0000, 0x4000_0000, tables),
            ] {
                assert_eq!(
                    smmu.map(d, 0x20_0000, pa, size, RW),
                    Err(DomainError::ProtectedOutput { pa, size, protected })
                );
                assert_eq!(smmu.iova_to_phys(d, 0x20_0000), Ok(None), "nothing mapped");
                assert_eq!(
                    smmu.domain_table(d).unwrap().tables(),
                    table_count,
                    "no table allocated"
                );
            }
            // Next to them, and between them: mapped.
            smmu.map(d, 0x20_0000, 0x3fff_f000, 0x1000, RW).unwrap();
            smmu.map(d, 0x40_0000, 0x4010_0000, 0x1000, RW).unwrap();
            smmu.map(d, 0x60_0000, 0x7c00_0000, 0x200_0000, RW).unwrap();
            smmu.free_domain(d).unwrap();
        }
    }

    #[test]
    fn protected_extents_are_bounded_and_checked() {
        let mut p = ProtectedMemory::new();
        let bad = Extent { base: 0x1000, len: 0 };
        assert_eq!(p.add(bad), Err(ProtectError::BadExtent(bad)));
        let wraps = Extent {
            base: u64::MAX - 0xfff,
            len: 0x2000,
        };
        assert_eq!(p.add(wraps), Err(ProtectError::BadExtent(wraps)));
        for i in 0..MAX_PROTECTED as u64 {
            p.add(Extent {
                base: i << 30,
                len: 0x1000,
            })
            .unwrap();
        }
        // Held by one declared already: nothing to add.
        p.add(Extent { base: 0, len: 0x800 }).unwrap();
        let extra = Extent {
            base: 1 << 40,
            len: 0x1000,
        };
        assert_eq!(
            p.add(extra),
            Err(ProtectError::Full {
                extent: extra,
                capacity: MAX_PROTECTED
            })
        );
        assert_eq!(p.extents().len(), MAX_PROTECTED);
        assert_eq!(p.overlapping((3 << 30) + 0xfff, 1).map(|e| e.base), Some(3 << 30));
        assert_eq!(p.overlapping((3 << 30) + 0x1000, 0x1000), None);
        assert_eq!(
            p.overlapping(u64::MAX - 0xfff, 0x2000),
            None,
            "a wrapping range is the map's to refuse"
        );
    }
}
