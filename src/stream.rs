//! The stream table: linear, or 2-level with level-2 spans allocated when a stream first gets an STE. Entries
//! are installed through the hitless writer; this module owns only the memory and the StreamID → slot lookup.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::hw::ste::{self, Ste};
use crate::mem::{AllocError, Coherency, FrameAllocator, PhysAddr};
use crate::table::{EntryTable, Level1};

/// Bytes per STE.
pub const STE_BYTES: usize = crate::table::ENTRY_BYTES;
/// StreamID bits resolved by a level-2 table (256 STEs, 16 KiB per span), as STRTAB_BASE_CFG.SPLIT.
pub const SPLIT: u8 = 8;
/// The most level-1 descriptors the driver allocates (512 KiB of level-1 table): StreamIDs beyond
/// `SPLIT + 16` bits are not served.
pub const MAX_L1_LOG2: u8 = 16;

/// The format the driver chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamTableFormat {
    /// One array of `2^sid_bits` STEs.
    Linear {
        /// StreamID bits covered.
        sid_bits: u8,
    },
    /// A level-1 array of descriptors, each pointing to `2^split` STEs.
    TwoLevel {
        /// StreamID bits covered.
        sid_bits: u8,
        /// StreamID bits resolved at level 2.
        split: u8,
    },
}

impl StreamTableFormat {
    /// Chooses the format for an SMMU with `sid_bits` of StreamID and (when `two_level_supported`) 2-level
    /// tables, covering at most `max_sid_bits`: linear when the table is small (no more than one level-2 span)
    /// or 2-level tables are unsupported, else 2-level with [`SPLIT`].
    pub fn choose(sid_bits: u8, two_level_supported: bool, max_sid_bits: u8) -> Self {
        let sid_bits = sid_bits.min(max_sid_bits);
        if !two_level_supported || sid_bits <= SPLIT {
            StreamTableFormat::Linear { sid_bits }
        } else {
            StreamTableFormat::TwoLevel {
                sid_bits: sid_bits.min(SPLIT + MAX_L1_LOG2),
                split: SPLIT,
            }
        }
    }

    /// StreamID bits covered.
    pub fn sid_bits(&self) -> u8 {
        match *self {
            StreamTableFormat::Linear { sid_bits } | StreamTableFormat::TwoLevel { sid_bits, .. } => sid_bits,
        }
    }
}

impl fmt::Display for StreamTableFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            StreamTableFormat::Linear { sid_bits } => {
                write!(
                    f,
                    "linear, {} STEs ({} KiB)",
                    1u64 << sid_bits,
                    (STE_BYTES << sid_bits) / 1024
                )
            }
            StreamTableFormat::TwoLevel { sid_bits, split } => write!(
                f,
                "2-level, {sid_bits} SID bits, split {split}: {} level-1 descriptors ({} KiB), level-2 spans of {} \
                 STEs ({} KiB) allocated on first use",
                1u64 << sid_bits.saturating_sub(split),
                crate::table::level1_bytes(sid_bits, split) / 1024,
                1u32 << split,
                (STE_BYTES << split) / 1024
            ),
        }
    }
}

/// Why a stream's entry cannot be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamError {
    /// The StreamID is beyond the table.
    UnknownStream {
        /// The StreamID.
        sid: u32,
        /// StreamID bits the table covers.
        sid_bits: u8,
    },
    /// No memory for a level-2 span.
    NoMemory(AllocError),
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::UnknownStream { sid, sid_bits } => {
                write!(f, "StreamID {sid:#x} is beyond the {sid_bits}-bit stream table")
            }
            StreamError::NoMemory(e) => write!(f, "level-2 stream table: {e}"),
        }
    }
}

/// The stream table in memory.
pub(crate) struct StreamTable {
    format: StreamTableFormat,
    table: EntryTable,
}

/// Where an STE lives.
pub(crate) struct Slot<'a> {
    pub(crate) words: &'a [AtomicU64],
    /// The level-1 descriptor was written to make the slot reachable: invalidation must include it.
    pub(crate) new_span: bool,
}

fn span_descriptor(span: PhysAddr, split: u8) -> u64 {
    // A span of 2^split STEs has Span = split + 1 (the table's split, which an adopted table need not share with
    // SPLIT). Spans are allocated aligned to their size, so the encoding cannot fail.
    ste::l1_descriptor(span, split + 1).unwrap_or(0)
}

/// The level-1 layout of `format`: none for a linear table, spans of `split` bits for a 2-level one.
fn level1_of(format: StreamTableFormat) -> Option<Level1> {
    match format {
        StreamTableFormat::Linear { .. } => None,
        StreamTableFormat::TwoLevel { split, .. } => Some(Level1 {
            leaf_bits: split,
            descriptor: span_descriptor,
            address_mask: ste::L1_DESCRIPTOR_L2PTR_MASK,
        }),
    }
}

impl StreamTable {
    /// Allocates the table; every STE of a linear table (and of each level-2 span, later) aborts.
    pub(crate) fn new(
        format: StreamTableFormat,
        allocator: &impl FrameAllocator,
        coherency: Coherency,
    ) -> Result<Self, AllocError> {
        let level1 = level1_of(format);
        let table = EntryTable::new(format.sid_bits(), level1, Ste::abort().0, allocator, coherency)?;
        Ok(StreamTable { format, table })
    }

    /// Adopts the stream table of `format` at `base` that a running SMMU uses (a hand-off with SMMUEN kept 1):
    /// nothing the SMMU reads is written. `None` when `allocator` does not reach it whole.
    pub(crate) fn adopt(
        format: StreamTableFormat,
        base: PhysAddr,
        allocator: &impl FrameAllocator,
        coherency: Coherency,
    ) -> Option<Self> {
        let level1 = level1_of(format);
        let table = EntryTable::adopt(format.sid_bits(), level1, base, Ste::abort().0, allocator, coherency)?;
        Some(StreamTable { format, table })
    }

    /// StreamIDs per level-2 span (the whole table when linear).
    pub(crate) fn span_len(&self) -> u64 {
        match self.format {
            StreamTableFormat::Linear { sid_bits } => 1 << sid_bits,
            StreamTableFormat::TwoLevel { split, .. } => 1 << split,
        }
    }

    /// Whether `sid`'s STE exists (in the linear table, or in an allocated level-2 span).
    pub(crate) fn exists(&self, sid: u32) -> bool {
        self.table.contains(sid) && self.table.entry(sid).is_some()
    }

    pub(crate) fn format(&self) -> StreamTableFormat {
        self.format
    }

    /// Physical base for STRTAB_BASE.
    pub(crate) fn base(&self) -> PhysAddr {
        self.table.base()
    }

    /// Level-2 spans allocated so far.
    pub(crate) fn allocated_spans(&self) -> u32 {
        self.table.allocated_leaves()
    }

    fn check(&self, sid: u32) -> Result<(), StreamError> {
        if !self.table.contains(sid) {
            return Err(StreamError::UnknownStream {
                sid,
                sid_bits: self.format.sid_bits(),
            });
        }
        Ok(())
    }

    /// The slot of `sid`, allocating its level-2 span (all aborting) and publishing the level-1 descriptor first
    /// when needed.
    pub(crate) fn slot(&mut self, sid: u32, allocator: &impl FrameAllocator) -> Result<Slot<'_>, StreamError> {
        self.check(sid)?;
        let new_span = self.table.ensure_leaf(sid, allocator).map_err(StreamError::NoMemory)?;
        let words = self.table.entry(sid).unwrap_or(&[]);
        Ok(Slot { words, new_span })
    }

    /// Reads the live STE of `sid` (an invalid entry when its span is not allocated, as the SMMU sees it).
    pub(crate) fn read(&self, sid: u32) -> Result<Ste, StreamError> {
        self.check(sid)?;
        Ok(match self.table.entry(sid) {
            Some(words) => Ste(core::array::from_fn(|i| words[i].load(Ordering::Relaxed))),
            None => Ste::invalid(),
        })
    }

    /// Returns every block of the table to `allocator`.
    ///
    /// # Safety
    /// The SMMU must no longer read the table (SMMUEN = 0 acknowledged) and `allocator` must be the one it came
    /// from.
    pub(crate) unsafe fn free(self, allocator: &impl FrameAllocator) {
        // SAFETY: the caller's guarantee.
        unsafe { self.table.free(allocator) }
    }

    pub(crate) fn coherency(&self) -> Coherency {
        self.table.coherency()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_frames::HeapFrames;

    const COHERENT: Coherency = Coherency { coherent: true };

    #[test]
    fn format_choice() {
        assert_eq!(
            StreamTableFormat::choose(16, true, 32),
            StreamTableFormat::TwoLevel { sid_bits: 16, split: 8 }
        );
        assert_eq!(
            StreamTableFormat::choose(16, false, 32),
            StreamTableFormat::Linear { sid_bits: 16 }
        );
        assert_eq!(
            StreamTableFormat::choose(8, true, 32),
            StreamTableFormat::Linear { sid_bits: 8 }
        );
        assert_eq!(
            StreamTableFormat::choose(16, true, 6),
            StreamTableFormat::Linear { sid_bits: 6 }
        );
        assert_eq!(
            StreamTableFormat::choose(32, true, 32),
            StreamTableFormat::TwoLevel { sid_bits: 24, split: 8 }
        );
    }

    #[test]
    fn linear_table_aborts_everything_and_refuses_unknown_streams() {
        let frames = HeapFrames::default();
        let table = StreamTable::new(StreamTableFormat::Linear { sid_bits: 4 }, &frames, COHERENT).unwrap();
        for sid in 0..16 {
            assert_eq!(table.read(sid), Ok(Ste::abort()));
        }
        assert_eq!(table.read(16), Err(StreamError::UnknownStream { sid: 16, sid_bits: 4 }));
        // The table is aligned to its size (1 KiB) in physical address.
        assert_eq!(table.base().0 % 1024, 0);
        // SAFETY: no SMMU reads it.
        unsafe { table.free(&frames) };
        assert_eq!(frames.live_blocks(), 0);
    }

    #[test]
    fn two_level_spans_appear_on_first_use_and_the_descriptor_points_to_them() {
        let frames = HeapFrames::default();
        let format = StreamTableFormat::TwoLevel { sid_bits: 16, split: 8 };
        let mut table = StreamTable::new(format, &frames, COHERENT).unwrap();
        assert_eq!(
            table.read(0x1234),
            Ok(Ste::invalid()),
            "no span: the SMMU sees nothing valid"
        );
        let slot = table.slot(0x1234, &frames).unwrap();
        assert!(slot.new_span);
        slot.words[3].store(0x5a, Ordering::Relaxed);
        assert!(!table.slot(0x12ff, &frames).unwrap().new_span, "same span");
        assert_eq!(table.allocated_spans(), 1);
        // Walk it as the SMMU would: level-1 descriptor 0x12 -> span (physical) -> STE 0x34.
        let l1 = table.table.descriptor(0x1234);
        assert_eq!(l1 & ste::L1_DESCRIPTOR_SPAN, 9, "Span = SPLIT + 1");
        let span = frames.virt(l1 & ste::L1_DESCRIPTOR_L2PTR_MASK) as *const u64;
        // SAFETY: the span is live; STE 0x34, qword 3.
        assert_eq!(unsafe { span.add(0x34 * 8 + 3).read() }, 0x5a);
        // SAFETY: STE 0x35, qword 0: a fresh span aborts.
        assert_eq!(unsafe { span.add(0x35 * 8).read() }, Ste::abort().0[0]);
        // SAFETY: no SMMU reads it.
        unsafe { table.free(&frames) };
        assert_eq!(
            frames.live_blocks(),
            0,
            "spans, the span index and the level-1 table are all returned"
        );
    }

    #[test]
    fn no_memory_for_a_span_changes_nothing() {
        let format = StreamTableFormat::TwoLevel { sid_bits: 16, split: 8 };
        let frames = HeapFrames::with_limit(2 * 2048 + 16 * 1024);
        let mut table = StreamTable::new(format, &frames, COHERENT).unwrap();
        table.slot(0x100, &frames).unwrap();
        let error = table.slot(0x200, &frames).err();
        assert!(matches!(error, Some(StreamError::NoMemory(_))), "{error:?}");
        assert_eq!(table.read(0x200), Ok(Ste::invalid()));
        assert_eq!(table.allocated_spans(), 1);
        // SAFETY: no SMMU reads it.
        unsafe { table.free(&frames) };
    }

    #[test]
    fn a_span_descriptor_follows_the_tables_split_not_the_default() {
        // A 2-level table of another split (one adopted from a running SMMU whose STRTAB_BASE_CFG.SPLIT is 6 or
        // 10): a span allocated here holds 2^split STEs, and its level-1 descriptor must say so (Span = split + 1),
        // or the SMMU reads past the span (split < 8) or reports C_BAD_STREAMID for its upper STEs (split > 8).
        let frames = HeapFrames::default();
        for split in [6u8, 10] {
            let format = StreamTableFormat::TwoLevel { sid_bits: 16, split };
            let mut table = StreamTable::new(format, &frames, COHERENT).unwrap();
            let top = 0xffff;
            table.slot(top, &frames).unwrap();
            let l1 = table.table.descriptor(top);
            assert_eq!(l1 & ste::L1_DESCRIPTOR_SPAN, u64::from(split) + 1, "split {split}");
            // The STE of the last StreamID is the last one of its span.
            let span = frames.virt(l1 & ste::L1_DESCRIPTOR_L2PTR_MASK) as *const u64;
            // SAFETY: the span is live and holds 2^split STEs.
            assert_eq!(unsafe { span.add(((1 << split) - 1) * 8).read() }, Ste::abort().0[0]);
            // SAFETY: no SMMU reads it.
            unsafe { table.free(&frames) };
        }
    }

    #[test]
    fn a_two_level_table_narrower_than_its_split_has_one_level1_descriptor() {
        // IHI 0070 (STRTAB_BASE_CFG): with SPLIT >= LOG2SIZE the level-1 table has MAX(1, 2^(LOG2SIZE - SPLIT)) = 1
        // descriptor, whose span holds the 2^LOG2SIZE usable STEs. A running SMMU adopted as found may be set up
        // so (SIDSIZE 5, SPLIT 8).
        let frames = HeapFrames::default();
        let format = StreamTableFormat::TwoLevel { sid_bits: 5, split: 8 };
        extern crate std;
        let text = std::format!("{format}");
        assert!(text.contains(" 1 level-1 descriptors"), "{text}");
        let mut table = StreamTable::new(format, &frames, COHERENT).unwrap();
        assert_eq!(table.read(31), Ok(Ste::invalid()));
        assert!(table.slot(31, &frames).unwrap().new_span);
        assert_eq!(table.table.descriptor(31) & ste::L1_DESCRIPTOR_SPAN, 9);
        assert_eq!(table.read(31), Ok(Ste::abort()));
        assert_eq!(table.read(32), Err(StreamError::UnknownStream { sid: 32, sid_bits: 5 }));
        // SAFETY: no SMMU reads it.
        unsafe { table.free(&frames) };
        assert_eq!(frames.live_blocks(), 0);
    }
}
