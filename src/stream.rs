//! The stream table: linear, or 2-level with level-2 spans allocated when a stream first gets an STE. Entries
//! are installed through the hitless writer; this module owns only the memory and the StreamID → slot lookup.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::hw::ste::{self, Ste};
use crate::mem::{AllocError, Coherency, DmaBlock, FrameAllocator, PhysAddr};

/// Bytes per STE.
pub const STE_BYTES: usize = 64;
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
                1u64 << (sid_bits - split),
                (8usize << (sid_bits - split)) / 1024,
                1u32 << split,
                (STE_BYTES << split) / 1024
            ),
        }
    }
}

/// Why a stream's entry cannot be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// The linear table or the level-1 table.
    base: DmaBlock,
    /// 2-level only: one CPU pointer per level-1 descriptor to its span (0 when not allocated). Kept in memory
    /// from the allocator so that no global allocator is needed.
    spans: Option<DmaBlock>,
    coherency: Coherency,
    allocated_spans: u32,
}

/// Where an STE lives.
pub(crate) struct Slot<'a> {
    pub(crate) words: &'a [AtomicU64],
    /// The level-1 descriptor was written to make the slot reachable: invalidation must include it.
    pub(crate) new_span: bool,
}

fn fill_abort(block: &DmaBlock) {
    let abort = Ste::abort();
    // SAFETY: the block is live and exclusively ours; nothing else accesses it yet.
    let words = unsafe { block.words() };
    for ste in words.chunks_exact(8) {
        for (w, v) in ste.iter().zip(abort.0) {
            w.store(v, Ordering::Relaxed);
        }
    }
}

impl StreamTable {
    /// Allocates the table; every STE of a linear table (and of each level-2 span, later) aborts.
    pub(crate) fn new(
        format: StreamTableFormat,
        allocator: &impl FrameAllocator,
        coherency: Coherency,
    ) -> Result<Self, AllocError> {
        let (base, spans) = match format {
            StreamTableFormat::Linear { sid_bits } => {
                let size = STE_BYTES << sid_bits;
                let block = allocator.allocate_zeroed(size, size.max(64))?;
                fill_abort(&block);
                (block, None)
            }
            StreamTableFormat::TwoLevel { sid_bits, split } => {
                let size = 8usize << (sid_bits - split);
                let block = allocator.allocate_zeroed(size, size.max(64))?;
                let spans = match allocator.allocate_zeroed(size, 8) {
                    Ok(s) => s,
                    Err(e) => {
                        // SAFETY: just allocated, never shared.
                        unsafe { allocator.free(block) };
                        return Err(e);
                    }
                };
                (block, Some(spans))
            }
        };
        coherency.clean(base.virt.as_ptr(), base.size);
        Ok(StreamTable {
            format,
            base,
            spans,
            coherency,
            allocated_spans: 0,
        })
    }

    pub(crate) fn format(&self) -> StreamTableFormat {
        self.format
    }

    /// Physical base for STRTAB_BASE.
    pub(crate) fn base(&self) -> PhysAddr {
        self.base.phys
    }

    /// Level-2 spans allocated so far.
    pub(crate) fn allocated_spans(&self) -> u32 {
        self.allocated_spans
    }

    fn check(&self, sid: u32) -> Result<(), StreamError> {
        let sid_bits = self.format.sid_bits();
        if u64::from(sid) >> sid_bits != 0 {
            return Err(StreamError::UnknownStream { sid, sid_bits });
        }
        Ok(())
    }

    /// The slot of `sid` if it exists (a 2-level span may not be allocated yet).
    pub(crate) fn existing_slot(&self, sid: u32) -> Result<Option<&[AtomicU64]>, StreamError> {
        self.check(sid)?;
        match self.format {
            StreamTableFormat::Linear { .. } => {
                // SAFETY: the block is live for the life of `self`; the SMMU and the CPU access it atomically.
                let words = unsafe { self.base.words() };
                Ok(Some(&words[sid as usize * 8..][..8]))
            }
            StreamTableFormat::TwoLevel { split, .. } => {
                let l1 = (sid >> split) as usize;
                let Some(spans) = &self.spans else { return Ok(None) };
                // SAFETY: as above.
                let pointer = unsafe { spans.words() }[l1].load(Ordering::Relaxed) as usize;
                if pointer == 0 {
                    return Ok(None);
                }
                let index = (sid & ((1 << split) - 1)) as usize;
                // SAFETY: `pointer` is the CPU address of a live span of 2^split STEs that this table allocated
                // and never frees while it lives.
                let span = unsafe { core::slice::from_raw_parts(pointer as *const AtomicU64, 8 << split) };
                Ok(Some(&span[index * 8..][..8]))
            }
        }
    }

    /// The slot of `sid`, allocating its level-2 span (all aborting) and publishing the level-1 descriptor first
    /// when needed.
    pub(crate) fn slot(&mut self, sid: u32, allocator: &impl FrameAllocator) -> Result<Slot<'_>, StreamError> {
        if self.existing_slot(sid)?.is_some() {
            let words = self.existing_slot(sid)?.unwrap_or(&[]);
            return Ok(Slot { words, new_span: false });
        }
        let StreamTableFormat::TwoLevel { split, .. } = self.format else {
            unreachable!("a linear table always has the slot")
        };
        let size = STE_BYTES << split;
        let span = allocator.allocate_zeroed(size, size).map_err(StreamError::NoMemory)?;
        fill_abort(&span);
        self.coherency.clean(span.virt.as_ptr(), span.size);
        let descriptor = ste::l1_descriptor(span.phys, split + 1).unwrap_or(0);
        let l1 = (sid >> split) as usize;
        if let Some(spans) = &self.spans {
            // SAFETY: live block, atomic access.
            let words = unsafe { spans.words() };
            words[l1].store(span.virt.as_ptr() as u64, Ordering::Relaxed);
        }
        // The span's contents must be visible before the descriptor that points to it.
        crate::mem::write_barrier();
        // SAFETY: live block, atomic access; the SMMU reads the descriptor as one 64-bit word.
        let l1_words = unsafe { self.base.words() };
        l1_words[l1].store(descriptor, Ordering::Release);
        self.coherency.clean(core::ptr::from_ref(&l1_words[l1]).cast(), 8);
        self.allocated_spans += 1;
        // The span stays allocated for the table's life: `spans` records its CPU address, the descriptor its
        // physical address, and `free` rebuilds the block from both.
        let words = self.existing_slot(sid)?.unwrap_or(&[]);
        Ok(Slot { words, new_span: true })
    }

    /// Reads the live STE of `sid` (an aborting entry when its span is not allocated).
    pub(crate) fn read(&self, sid: u32) -> Result<Ste, StreamError> {
        Ok(match self.existing_slot(sid)? {
            Some(words) => Ste(core::array::from_fn(|i| words[i].load(Ordering::Relaxed))),
            None => Ste([0; 8]),
        })
    }

    /// Returns every block of the table to `allocator`.
    ///
    /// # Safety
    /// The SMMU must no longer read the table (SMMUEN = 0 acknowledged) and `allocator` must be the one it came
    /// from.
    pub(crate) unsafe fn free(self, allocator: &impl FrameAllocator) {
        if let (StreamTableFormat::TwoLevel { split, .. }, Some(spans)) = (self.format, &self.spans) {
            // SAFETY: both blocks are live until freed below.
            let (pointers, l1) = unsafe { (spans.words(), self.base.words()) };
            for (pointer, descriptor) in pointers.iter().zip(l1) {
                let virt = pointer.load(Ordering::Relaxed) as *mut u8;
                if let Some(virt) = core::ptr::NonNull::new(virt) {
                    let phys = PhysAddr(descriptor.load(Ordering::Relaxed) & ste::L1_DESCRIPTOR_L2PTR_MASK);
                    // SAFETY: the span was allocated by `slot` with this size; the caller guarantees the SMMU
                    // no longer reads it.
                    unsafe {
                        allocator.free(DmaBlock {
                            phys,
                            virt,
                            size: STE_BYTES << split,
                        })
                    };
                }
            }
        }
        // SAFETY: as above.
        unsafe {
            if let Some(spans) = self.spans {
                allocator.free(spans);
            }
            allocator.free(self.base);
        }
    }

    pub(crate) fn coherency(&self) -> Coherency {
        self.coherency
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::HeapFrames;

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
        // SAFETY: the level-1 table is live.
        let l1 = unsafe { table.base.words() }[0x12].load(Ordering::Relaxed);
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
}
