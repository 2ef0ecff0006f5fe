//! Memory the SMMU reads and writes (stream table, CD tables, queues, page tables): physically contiguous,
//! aligned, zeroed frames supplied by the caller through [`FrameAllocator`]. The driver never assumes that a
//! physical address is also a usable pointer.

use core::fmt;
use core::ptr::NonNull;

/// A physical (output) address as the SMMU sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct PhysAddr(pub u64);

impl fmt::Display for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PA {:#x}", self.0)
    }
}

/// A block of memory shared with the SMMU: its physical address and where the CPU reaches it.
#[derive(Debug, PartialEq, Eq)]
pub struct DmaBlock {
    /// Physical address of the first byte (aligned as requested).
    pub phys: PhysAddr,
    /// CPU pointer to the first byte.
    pub virt: NonNull<u8>,
    /// Length in bytes.
    pub size: usize,
}

/// Why memory could not be had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocError {
    /// The allocator has no block of this size and alignment left.
    OutOfMemory {
        /// Bytes asked for.
        size: usize,
    },
    /// The size is zero or the alignment not a power of two.
    BadRequest {
        /// Bytes asked for.
        size: usize,
        /// Alignment asked for.
        align: usize,
    },
}

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllocError::OutOfMemory { size } => write!(f, "out of DMA memory for {size:#x} bytes"),
            AllocError::BadRequest { size, align } => {
                write!(f, "bad DMA allocation request: size {size:#x}, alignment {align:#x}")
            }
        }
    }
}

/// The caller's supply of memory the SMMU may access.
///
/// # Safety
/// Implementations must return blocks that are physically contiguous, zero-filled, aligned to at least `align` in
/// physical address, exclusively owned by the caller until freed, readable and writable by the CPU at `virt`
/// (normal memory, mapped cacheable when the SMMU is coherent) and reachable by the SMMU at `phys`.
pub unsafe trait FrameAllocator {
    /// Allocates `size` zeroed bytes aligned to `align` (a power of two).
    ///
    /// # Errors
    /// [`AllocError::OutOfMemory`] when exhausted, [`AllocError::BadRequest`] for a zero size or an alignment that
    /// is not a power of two.
    fn allocate_zeroed(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError>;

    /// Returns a block obtained from [`FrameAllocator::allocate_zeroed`] of this allocator.
    ///
    /// # Safety
    /// The block must come from this allocator, and nothing (CPU or SMMU) may access it afterwards.
    unsafe fn free(&self, block: DmaBlock);
}
