//! Memory no device may ever be given: the handover region (its records and the preserved domains' tables) and
//! the memory the driver takes its stream table, CD tables, page tables and queues from. A device that could
//! write them could rewrite its own translations (or, through a handover region, the next image's). The board
//! declares these extents (`protect_memory`); `map` refuses any output range that touches
//! one, and a restore refuses preserved tables whose leaves do.

use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};

use crate::mem::Extent;

/// Protected extents one SMMU keeps: a check against each runs on every `map`, so the list stays short.
pub const MAX_PROTECTED: usize = 8;

/// Why `protect_memory` refused an extent. Nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
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
}

/// The protected extents as every CPU reads them: a seqlock over a copy of the list, so that the check every `map`
/// makes writes nothing shared (a reader-writer lock's reader count would bounce between the CPUs that map), and a
/// spin lock that serialises the rare writers (`protect_memory`, a restore adding its region) and holds the list
/// they change.
pub(crate) struct SharedProtected {
    /// The list, as writers change it.
    writer: spin::Mutex<ProtectedMemory>,
    /// Odd while a writer publishes the copy below.
    seq: AtomicU32,
    count: AtomicUsize,
    bases: [AtomicU64; MAX_PROTECTED],
    lens: [AtomicU64; MAX_PROTECTED],
}

impl SharedProtected {
    pub(crate) const fn new() -> Self {
        SharedProtected {
            writer: spin::Mutex::new(ProtectedMemory::new()),
            seq: AtomicU32::new(0),
            count: AtomicUsize::new(0),
            bases: [const { AtomicU64::new(0) }; MAX_PROTECTED],
            lens: [const { AtomicU64::new(0) }; MAX_PROTECTED],
        }
    }

    /// Runs `read` over a consistent copy of the published list (retried while a writer publishes: a writer
    /// holds it for a few stores).
    #[inline]
    fn read<R>(&self, read: impl Fn(&[Extent]) -> R) -> R {
        let mut copy = [Extent { base: 0, len: 0 }; MAX_PROTECTED];
        loop {
            // Acquire: what the writer stored before its closing `seq` store is seen below.
            let start = self.seq.load(Ordering::Acquire);
            if start & 1 == 1 {
                core::hint::spin_loop();
                continue;
            }
            let n = self.count.load(Ordering::Relaxed).min(MAX_PROTECTED);
            for (i, e) in copy.iter_mut().enumerate().take(n) {
                *e = Extent {
                    base: self.bases[i].load(Ordering::Relaxed),
                    len: self.lens[i].load(Ordering::Relaxed),
                };
            }
            // Acquire fence: the loads above happen before the second look at `seq`; if a writer started
            // meanwhile, `seq` moved and the copy is read again.
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == start {
                return read(&copy[..n]);
            }
        }
    }

    /// The first protected extent that `[base, base + len)` shares a byte with. A range that wraps is left to the
    /// caller's own range checks (no protected extent is reported for it).
    #[inline]
    pub(crate) fn overlapping(&self, base: u64, len: u64) -> Option<Extent> {
        let end = base.checked_add(len)?;
        self.read(|extents| extents.iter().copied().find(|e| base < e.base + e.len && e.base < end))
    }

    /// A copy of the list.
    pub(crate) fn snapshot(&self) -> ProtectedMemory {
        self.read(|extents| ProtectedMemory {
            extents: extents.iter().copied().collect(),
        })
    }

    /// Changes the list with `change`, holding off every other writer meanwhile, then publishes it (also when
    /// `change` fails: the list is what `change` left).
    pub(crate) fn update<R>(&self, change: impl FnOnce(&mut ProtectedMemory) -> R) -> R {
        let mut list = self.writer.lock();
        let result = change(&mut list);
        // Relaxed, then a Release fence: a reader that sees an entry below sees the odd `seq` first and retries.
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        for (i, e) in list.extents().iter().enumerate() {
            self.bases[i].store(e.base, Ordering::Relaxed);
            self.lens[i].store(e.len, Ordering::Relaxed);
        }
        self.count.store(list.extents().len(), Ordering::Relaxed);
        // Release: the entries above are stored before a reader can see the even `seq`.
        self.seq.store(seq.wrapping_add(2), Ordering::Release);
        result
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::domain::{DomainError, Stage1Options, Stage2Options};
    use crate::pgtable::Prot;
    use crate::smmu::tests::{Model, frames};
    use crate::{InitOptions, Iommu, Iova, PhysAddr};

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
                    smmu.map(d, Iova(0x20_0000), PhysAddr(pa), size, RW),
                    Err(DomainError::ProtectedOutput { pa, size, protected })
                );
                assert_eq!(smmu.iova_to_phys(d, Iova(0x20_0000)), Ok(None), "nothing mapped");
                assert_eq!(
                    smmu.domain_table(d).unwrap().tables(),
                    table_count,
                    "no table allocated"
                );
            }
            // Next to them, and between them: mapped.
            smmu.map(d, Iova(0x20_0000), PhysAddr(0x3fff_f000), 0x1000, RW).unwrap();
            smmu.map(d, Iova(0x40_0000), PhysAddr(0x4010_0000), 0x1000, RW).unwrap();
            smmu.map(d, Iova(0x60_0000), PhysAddr(0x7c00_0000), 0x200_0000, RW)
                .unwrap();
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
        let shared = SharedProtected::new();
        shared.update(|list| *list = p.clone());
        assert_eq!(shared.snapshot().extents(), p.extents());
        assert_eq!(shared.overlapping((3 << 30) + 0xfff, 1).map(|e| e.base), Some(3 << 30));
        assert_eq!(shared.overlapping((3 << 30) + 0x1000, 0x1000), None);
        assert_eq!(
            shared.overlapping(u64::MAX - 0xfff, 0x2000),
            None,
            "a wrapping range is the map's to refuse"
        );
    }

    /// Readers never see a torn list while writers publish: an extent declared before they start is found by
    /// every read, and every extent a read returns is one that was declared whole.
    #[test]
    fn readers_see_whole_lists_while_writers_publish() {
        let shared = SharedProtected::new();
        let first = Extent {
            base: 0x4000_0000,
            len: 0x1000,
        };
        shared.update(|list| list.add(first)).unwrap();
        let declared = |i: u64| Extent {
            base: (i + 1) << 32,
            len: 0x1000 * (i + 1),
        };
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    for _ in 0..20_000 {
                        assert_eq!(shared.overlapping(0x4000_0800, 8), Some(first));
                        for e in shared.snapshot().extents().iter().skip(1) {
                            let i = (e.base >> 32) - 1;
                            assert_eq!(*e, declared(i), "a torn extent");
                        }
                    }
                });
            }
            scope.spawn(|| {
                for round in 0..2_000u64 {
                    shared.update(|list| {
                        *list = ProtectedMemory::new();
                        list.add(first).unwrap();
                        for i in 0..round % MAX_PROTECTED as u64 {
                            if list.add(declared(i)).is_err() {
                                break;
                            }
                        }
                    });
                }
            });
        });
    }
}
