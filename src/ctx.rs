//! Context-descriptor tables for substreams: linear, or 2-level with 1024-CD leaf tables (the STE's S1Fmt
//! "64KB leaf" format) allocated when a SubstreamID first gets a CD. CDs are installed through the hitless writer;
//! the caller's `sync` issues CFGI_CD for every stream using the table, then CMD_SYNC (the table issues no command
//! itself: a failed `sync` comes back as the caller's own error, inside [`CdTableError::Invalidation`]).
//!
//! QEMU's SMMU implements no substreams (IDR1.SSIDSIZE = 0): there a table holds exactly one CD, and the
//! multi-entry formats are proven by the host tests below.

use core::convert::Infallible;
use core::fmt;
use core::sync::atomic::Ordering;

use crate::hitless::{self, UpdateFailed, UpdateKind};
use crate::hw::cd::{self, Cd};
use crate::mem::{AllocError, Coherency, FrameAllocator, PhysAddr};
use crate::table::{EntryTable, Level1, SlotWriter};

/// Bytes per CD.
pub const CD_BYTES: usize = crate::table::ENTRY_BYTES;
/// SubstreamID bits resolved by a leaf table of a 2-level CD table (1024 CDs, 64 KiB).
pub const CD_SPLIT: u8 = 10;

/// The STE's S1Fmt for a CD table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CdTableFormat {
    /// `2^ssid_bits` CDs in one array (S1Fmt = 0b00).
    Linear {
        /// SubstreamID bits (the STE's S1CDMax).
        ssid_bits: u8,
    },
    /// Level-1 descriptors, each pointing to a leaf of `2^CD_SPLIT` CDs (S1Fmt = 0b10, 64 KiB leaves).
    TwoLevel {
        /// SubstreamID bits (the STE's S1CDMax).
        ssid_bits: u8,
    },
}

impl CdTableFormat {
    /// Chooses the format for `ssid_bits` (at most 20): linear when one leaf would hold the whole table or when
    /// the SMMU has no 2-level CD tables (IDR0.CD2L = 0), else 2-level.
    pub fn choose(ssid_bits: u8, two_level_supported: bool) -> Self {
        let ssid_bits = ssid_bits.min(20);
        if ssid_bits <= CD_SPLIT || !two_level_supported {
            CdTableFormat::Linear { ssid_bits }
        } else {
            CdTableFormat::TwoLevel { ssid_bits }
        }
    }

    /// The STE's S1CDMax.
    pub fn ssid_bits(&self) -> u8 {
        match *self {
            CdTableFormat::Linear { ssid_bits } | CdTableFormat::TwoLevel { ssid_bits } => ssid_bits,
        }
    }
}

impl fmt::Display for CdTableFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CdTableFormat::Linear { ssid_bits } => write!(f, "linear CD table of {} CDs", 1u32 << ssid_bits),
            CdTableFormat::TwoLevel { ssid_bits } => write!(
                f,
                "2-level CD table: {} level-1 descriptors, leaves of {} CDs",
                // A table narrower than a leaf still has one level-1 descriptor.
                1u32 << ssid_bits.saturating_sub(CD_SPLIT),
                1u32 << CD_SPLIT
            ),
        }
    }
}

/// Why a CD could not be installed. `E` is the error of the caller's invalidation (`sync`), for
/// [`CdTableError::Invalidation`]; the calls that invalidate nothing return `CdTableError` (`E` = [`Infallible`]),
/// which [`CdTableError::widen`] turns into any other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CdTableError<E = Infallible> {
    /// The SubstreamID is beyond the table.
    UnknownSubstream {
        /// The SubstreamID.
        ssid: u32,
        /// SubstreamID bits the table covers.
        ssid_bits: u8,
    },
    /// No memory for the table or a leaf.
    NoMemory(AllocError),
    /// An invalidation of the hitless writer failed; it stopped there, leaving the CD as this says.
    Invalidation(UpdateFailed<E>),
    /// A CD table to adopt is 2-level, or not inside memory the allocator reaches.
    NotAdoptable(PhysAddr),
}

impl CdTableError {
    /// The same error as one of a call that invalidates with `E` (a refusal of a call that issues nothing is never
    /// [`CdTableError::Invalidation`]).
    pub fn widen<E>(self) -> CdTableError<E> {
        match self {
            CdTableError::UnknownSubstream { ssid, ssid_bits } => CdTableError::UnknownSubstream { ssid, ssid_bits },
            CdTableError::NoMemory(e) => CdTableError::NoMemory(e),
            CdTableError::NotAdoptable(base) => CdTableError::NotAdoptable(base),
            CdTableError::Invalidation(failed) => match failed.error {},
        }
    }
}

impl<E: fmt::Display> fmt::Display for CdTableError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CdTableError::UnknownSubstream { ssid, ssid_bits } => {
                write!(f, "SubstreamID {ssid:#x} is beyond the {ssid_bits}-bit CD table")
            }
            CdTableError::NoMemory(e) => write!(f, "CD table: {e}"),
            CdTableError::NotAdoptable(base) => {
                write!(
                    f,
                    "the CD table at {base} cannot be adopted (2-level, or outside the allocator's memory)"
                )
            }
            CdTableError::Invalidation(e) => write!(
                f,
                "CD invalidation failed after {} sync(s), the CD is left {}: {}",
                e.syncs, e.left, e.error
            ),
        }
    }
}

/// A CD table in memory.
pub struct CdTable {
    format: CdTableFormat,
    table: EntryTable,
}

/// What a CD installation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CdWriteReport {
    /// The hitless writer's path.
    pub kind: UpdateKind,
    /// Invalidation rounds (the caller's `sync` calls).
    pub syncs: u32,
    /// A leaf table was allocated and published.
    pub new_leaf: bool,
}

fn leaf_descriptor(leaf: PhysAddr, _leaf_bits: u8) -> u64 {
    // Leaves are allocated aligned to their size (64 KiB), so the encoding cannot fail.
    cd::l1_cd_descriptor(leaf).unwrap_or(0)
}

impl CdTable {
    /// Allocates an empty table (every CD invalid) of `format`.
    ///
    /// # Errors
    /// [`CdTableError::NoMemory`]; nothing stays allocated then.
    pub fn new(format: CdTableFormat, allocator: &impl FrameAllocator, coherent: bool) -> Result<Self, CdTableError> {
        let level1 = match format {
            CdTableFormat::Linear { .. } => None,
            CdTableFormat::TwoLevel { .. } => Some(Level1 {
                leaf_bits: CD_SPLIT,
                descriptor: leaf_descriptor,
                address_mask: cd::L1_CD_L2PTR_MASK,
            }),
        };
        let table = EntryTable::new(
            format.ssid_bits(),
            level1,
            Cd::invalid().0,
            allocator,
            Coherency { coherent },
        )
        .map_err(CdTableError::NoMemory)?;
        Ok(CdTable { format, table })
    }

    /// Adopts the linear CD table at `base` that a previous image left (a live update), in place: nothing is
    /// written or copied.
    ///
    /// # Errors
    /// [`CdTableError::NotAdoptable`] for a 2-level format, or a table `allocator` cannot reach whole.
    pub fn adopt(
        format: CdTableFormat,
        base: PhysAddr,
        allocator: &impl FrameAllocator,
        coherent: bool,
    ) -> Result<Self, CdTableError> {
        let CdTableFormat::Linear { ssid_bits } = format else {
            return Err(CdTableError::NotAdoptable(base));
        };
        let table = EntryTable::adopt_linear(ssid_bits, base, Cd::invalid().0, allocator, Coherency { coherent })
            .ok_or(CdTableError::NotAdoptable(base))?;
        Ok(CdTable { format, table })
    }

    /// The format (the STE's S1Fmt and S1CDMax).
    pub fn format(&self) -> CdTableFormat {
        self.format
    }

    /// The table's physical address (the STE's S1ContextPtr).
    pub fn base(&self) -> PhysAddr {
        self.table.base()
    }

    fn check(&self, ssid: u32) -> Result<(), CdTableError> {
        if !self.table.contains(ssid) {
            return Err(CdTableError::UnknownSubstream {
                ssid,
                ssid_bits: self.format.ssid_bits(),
            });
        }
        Ok(())
    }

    /// The CD installed for `ssid` (invalid when none is).
    ///
    /// # Errors
    /// [`CdTableError::UnknownSubstream`].
    pub fn read(&self, ssid: u32) -> Result<Cd, CdTableError> {
        self.check(ssid)?;
        Ok(match self.table.entry(ssid) {
            Some(words) => Cd(core::array::from_fn(|i| words[i].load(Ordering::Relaxed))),
            None => Cd::invalid(),
        })
    }

    /// Installs `target` for `ssid` through the hitless writer. `sync(leaf)` must issue CFGI_CD (with `leaf`;
    /// `false` when a level-1 descriptor changed too) for every stream using this table, then CMD_SYNC.
    ///
    /// # Errors
    /// [`CdTableError::UnknownSubstream`], [`CdTableError::NoMemory`] for a leaf; nothing changes then.
    /// [`CdTableError::Invalidation`] when `sync` fails: nothing is written after it.
    pub fn write<E>(
        &mut self,
        ssid: u32,
        target: &Cd,
        allocator: &impl FrameAllocator,
        mut sync: impl FnMut(bool) -> Result<(), E>,
    ) -> Result<CdWriteReport, CdTableError<E>> {
        self.check(ssid).map_err(CdTableError::widen)?;
        if self.table.entry(ssid).is_none() && *target == Cd::invalid() {
            // Nothing to clear where no leaf exists.
            return Ok(CdWriteReport {
                kind: UpdateKind::NoChange,
                syncs: 0,
                new_leaf: false,
            });
        }
        let new_leaf = self
            .table
            .ensure_leaf(ssid, allocator)
            .map_err(CdTableError::NoMemory)?;
        let words = self.table.entry(ssid).unwrap_or(&[]);
        let live: [u64; 8] = core::array::from_fn(|i| words[i].load(Ordering::Relaxed));
        let mut writer = SlotWriter {
            words,
            coherency: self.table.coherency(),
            invalidate: || sync(!new_leaf),
            syncs: 0,
        };
        let kind = hitless::update_entry::<Cd, _>(&live, &target.0, &mut writer).map_err(CdTableError::Invalidation)?;
        Ok(CdWriteReport {
            kind,
            syncs: writer.syncs,
            new_leaf,
        })
    }

    /// Returns the table and its leaves to `allocator`.
    ///
    /// # Safety
    /// No STE may point to the table any more (and that change must have been invalidated), and `allocator` must
    /// be the one the table came from.
    pub unsafe fn free(self, allocator: &impl FrameAllocator) {
        // SAFETY: the caller's guarantee.
        unsafe { self.table.free(allocator) }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::host_frames::HeapFrames;
    use crate::hw::cd::CdConfig;
    use std::vec::Vec;

    fn cd(asid: u16) -> Cd {
        Cd::new(&CdConfig { asid, ..cd::EXAMPLE }, &crate::hw::ste::EXAMPLE_RULES).unwrap()
    }

    #[test]
    fn a_two_level_format_narrower_than_a_leaf_displays_one_descriptor() {
        let text = std::format!("{}", CdTableFormat::TwoLevel { ssid_bits: 6 });
        assert!(text.contains("1 level-1 descriptors"), "{text}");
    }

    #[test]
    fn format_choice() {
        assert_eq!(CdTableFormat::choose(0, true), CdTableFormat::Linear { ssid_bits: 0 });
        assert_eq!(CdTableFormat::choose(10, true), CdTableFormat::Linear { ssid_bits: 10 });
        assert_eq!(
            CdTableFormat::choose(16, true),
            CdTableFormat::TwoLevel { ssid_bits: 16 }
        );
        assert_eq!(
            CdTableFormat::choose(16, false),
            CdTableFormat::Linear { ssid_bits: 16 }
        );
        assert_eq!(
            CdTableFormat::choose(25, true),
            CdTableFormat::TwoLevel { ssid_bits: 20 }
        );
    }

    #[test]
    fn single_cd_table_as_on_qemu() {
        let frames = HeapFrames::default();
        let mut table = CdTable::new(CdTableFormat::Linear { ssid_bits: 0 }, &frames, true).unwrap();
        let mut syncs = Vec::new();
        let report = table
            .write(0, &cd(5), &frames, |leaf| {
                syncs.push(leaf);
                Ok::<(), Infallible>(())
            })
            .unwrap();
        assert_eq!(
            (report.kind, report.syncs, report.new_leaf),
            (UpdateKind::Hitless, 2, false)
        );
        assert_eq!(syncs, [true, true], "CFGI_CD with Leaf: only the CD changed");
        assert_eq!(table.read(0), Ok(cd(5)));
        assert_eq!(
            table.write(1, &cd(5), &frames, |_| Ok::<(), Infallible>(())),
            Err(CdTableError::UnknownSubstream { ssid: 1, ssid_bits: 0 })
        );
        // SAFETY: nothing points to it.
        unsafe { table.free(&frames) };
        assert_eq!(frames.live_blocks(), 0);
    }

    #[test]
    fn two_level_table_allocates_leaves_on_first_use() {
        let frames = HeapFrames::default();
        let mut table = CdTable::new(CdTableFormat::TwoLevel { ssid_bits: 16 }, &frames, true).unwrap();
        // Clearing a CD whose leaf does not exist allocates nothing.
        let r = table
            .write(0x4321, &Cd::invalid(), &frames, |_| -> Result<(), Infallible> {
                panic!("no sync needed")
            })
            .unwrap();
        assert_eq!((r.kind, r.new_leaf), (UpdateKind::NoChange, false));
        assert_eq!(frames.live_blocks(), 2);
        let mut syncs = Vec::new();
        let r = table
            .write(0x4321, &cd(9), &frames, |leaf| {
                syncs.push(leaf);
                Ok::<(), Infallible>(())
            })
            .unwrap();
        assert!(r.new_leaf);
        assert_eq!(syncs, [false, false], "a new level-1 descriptor: CFGI_CD without Leaf");
        assert_eq!(table.read(0x4321), Ok(cd(9)));
        assert_eq!(table.read(0x4322), Ok(Cd::invalid()));
        // Walk as the SMMU: level-1 descriptor 0x10 -> leaf -> CD 0x321.
        let l1 = table.table.descriptor(0x4321);
        assert_eq!(l1 & cd::L1_CD_V, 1);
        let leaf = frames.virt(l1 & cd::L1_CD_L2PTR_MASK) as *const u64;
        // SAFETY: the leaf is live.
        assert_eq!(unsafe { leaf.add(0x321 * 8).read() }, cd(9).0[0]);
        // Same leaf, another CD: Leaf invalidation.
        let mut syncs = Vec::new();
        let r = table
            .write(0x4322, &cd(10), &frames, |leaf| {
                syncs.push(leaf);
                Ok::<(), Infallible>(())
            })
            .unwrap();
        assert!(!r.new_leaf);
        assert!(syncs.iter().all(|leaf| *leaf));
        // ASID change of a live CD: one qword, one sync.
        assert_eq!(
            table
                .write(0x4322, &cd(11), &frames, |_| Ok::<(), Infallible>(()))
                .unwrap()
                .syncs,
            1
        );
        assert_eq!(
            table.write(0x1_0000, &cd(1), &frames, |_| Ok::<(), Infallible>(())),
            Err(CdTableError::UnknownSubstream {
                ssid: 0x1_0000,
                ssid_bits: 16
            })
        );
        // SAFETY: nothing points to it.
        unsafe { table.free(&frames) };
        assert_eq!(frames.live_blocks(), 0);
    }

    #[test]
    fn no_memory_for_a_leaf_changes_nothing() {
        let frames = HeapFrames::with_limit(2 * 512);
        let mut table = CdTable::new(CdTableFormat::TwoLevel { ssid_bits: 16 }, &frames, true).unwrap();
        let error = table.write(7, &cd(1), &frames, |_| -> Result<(), Infallible> {
            panic!("nothing written")
        });
        assert!(matches!(error, Err(CdTableError::NoMemory(_))), "{error:?}");
        assert_eq!(table.read(7), Ok(Cd::invalid()));
        // SAFETY: nothing points to it.
        unsafe { table.free(&frames) };
    }
}
