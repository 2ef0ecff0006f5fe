//! Physical frames for the firmware: a pool over the RAM the image does not use, handing out zeroed, aligned,
//! physically contiguous blocks, and beside it a smaller pool of DMA buffers. RAM is identity-mapped, so a frame's
//! virtual address is its physical address.
//!
//! **What a device may be given.** The frame pool holds what the driver reads (stream tables, queues, the tables of
//! domains that are not preserved) and the EL2 page tables; the DMA pool holds only buffers devices read and write
//! (and a guest's memory, its own tables included), and is what the live-update scenarios declare DMA-able, while
//! they declare the image, the frame pool and the handover region protected ([`layout`]). The scenarios written
//! before the DMA pool existed still take their buffers from the frame pool and declare nothing (`block-mappings`
//! and `pgtable-dma`'s nested pass map whole RAM banks on purpose).

use spin::mutex::SpinMutex;

/// Size of a frame.
pub const FRAME_SIZE: usize = 4096;

/// A pool of physical memory handed out front to back; freed single frames are reused.
pub struct FramePool {
    next: usize,
    end: usize,
    free: heapless::Vec<usize, 64>,
}

/// Why an allocation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfFrames {
    /// Bytes asked for.
    pub requested: usize,
}

impl core::fmt::Display for OutOfFrames {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "frame pool exhausted ({} bytes requested)", self.requested)
    }
}

static POOL: SpinMutex<FramePool> = SpinMutex::new(FramePool {
    next: 0,
    end: 0,
    free: heapless::Vec::new(),
});

/// The DMA buffers' pool.
static DMA: SpinMutex<FramePool> = SpinMutex::new(FramePool {
    next: 0,
    end: 0,
    free: heapless::Vec::new(),
});

/// How [`crate::run`] laid RAM out at boot (the same at every boot, so a warm reset finds it unchanged).
#[derive(Clone, Copy, Debug, Default)]
pub struct Layout {
    /// From the RAM bank's base to the frame pool: the device tree, both image slots, their data and stacks (and
    /// any reserved memory below the pools when the largest free part of the bank lies above it).
    pub image: smmuv3::handover::Extent,
    /// The frame pool ([`alloc`], [`Frames`]).
    pub frames: smmuv3::handover::Extent,
    /// The DMA buffers' pool ([`alloc_dma`]).
    pub dma: smmuv3::handover::Extent,
    /// From the DMA pool to the end of the bank: the handover region (on the board's rule), the memory the tree
    /// reserves above the pools, and (usually) the notes a boot leaves the next.
    pub reserved: smmuv3::handover::Extent,
    /// The handover region, wherever it is (empty without one).
    pub handover: smmuv3::handover::Extent,
}

static LAYOUT: SpinMutex<Layout> = SpinMutex::new(Layout {
    image: smmuv3::handover::Extent { base: 0, len: 0 },
    frames: smmuv3::handover::Extent { base: 0, len: 0 },
    dma: smmuv3::handover::Extent { base: 0, len: 0 },
    reserved: smmuv3::handover::Extent { base: 0, len: 0 },
    handover: smmuv3::handover::Extent { base: 0, len: 0 },
});

/// Records the layout (once, at boot).
pub fn set_layout(layout: Layout) {
    *LAYOUT.lock() = layout;
}

/// The RAM layout of this boot.
pub fn layout() -> Layout {
    *LAYOUT.lock()
}

/// Hands the RAM range `start..end` to the DMA buffers' pool. Called once at boot.
///
/// # Safety
/// As [`init`].
pub unsafe fn init_dma(start: usize, end: usize) {
    let mut pool = DMA.lock();
    pool.next = start.next_multiple_of(FRAME_SIZE);
    pool.end = end;
    pool.free.clear();
}

/// As [`alloc`], from the DMA buffers' pool.
///
/// # Errors
/// [`OutOfFrames`] when the pool cannot satisfy the request; nothing is allocated then.
pub fn alloc_dma(size: usize, align: usize) -> Result<usize, OutOfFrames> {
    alloc_from(&DMA, size, align)
}

/// Hands the RAM range `start..end` to the pool. Called once at boot.
///
/// # Safety
/// The range must be RAM, identity-mapped, and used by nothing else for the rest of the run.
pub unsafe fn init(start: usize, end: usize) {
    let mut pool = POOL.lock();
    pool.next = start.next_multiple_of(FRAME_SIZE);
    pool.end = end;
    pool.free.clear();
}

/// Allocates `size` bytes (rounded up to frames) aligned to `align` (a power of two, at least a frame), zeroed.
/// Returns the physical (= virtual) address.
///
/// # Errors
/// [`OutOfFrames`] when the pool cannot satisfy the request; nothing is allocated then.
pub fn alloc(size: usize, align: usize) -> Result<usize, OutOfFrames> {
    alloc_from(&POOL, size, align)
}

fn alloc_from(pool: &SpinMutex<FramePool>, size: usize, align: usize) -> Result<usize, OutOfFrames> {
    let size = size.max(1).next_multiple_of(FRAME_SIZE);
    let align = align.max(FRAME_SIZE);
    let mut pool = pool.lock();
    let addr = if size == FRAME_SIZE && align == FRAME_SIZE && !pool.free.is_empty() {
        pool.free.pop().unwrap_or_default()
    } else {
        let start = pool.next.next_multiple_of(align);
        match start.checked_add(size) {
            Some(end) if end <= pool.end => {
                pool.next = end;
                start
            }
            _ => return Err(OutOfFrames { requested: size }),
        }
    };
    drop(pool);
    // SAFETY: the range was just taken from a pool, which owns identity-mapped RAM no one else uses.
    unsafe { core::ptr::write_bytes(addr as *mut u8, 0, size) };
    Ok(addr)
}

/// Returns one frame obtained from [`alloc`] with `size <= FRAME_SIZE`. A frame that does not fit in the reuse
/// list is leaked (the pool is for a test firmware's lifetime).
///
/// # Safety
/// `addr` must come from [`alloc`] of at most one frame and must not be used afterwards.
pub unsafe fn free_frame(addr: usize) {
    let _ = POOL.lock().free.push(addr);
}

/// Why the pool cannot start where asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotThatHigh {
    /// The lowest address asked for.
    pub start: usize,
    /// The end of the pool's RAM.
    pub end: usize,
}

impl core::fmt::Display for NotThatHigh {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "frames asked for at or above {:#x}, but the pool's RAM ends at {:#x} (give the machine more memory)",
            self.start, self.end
        )
    }
}

/// From now on hands out only frames at or above `start` (the frames already handed out stay valid; freed ones
/// below `start` are no longer reused).
///
/// # Errors
/// [`NotThatHigh`] when less than a MiB of the pool lies above `start`; the pool is unchanged then.
pub fn start_at_or_above(start: usize) -> Result<(), NotThatHigh> {
    let mut pool = POOL.lock();
    if pool.end.saturating_sub(start.max(pool.next)) < 1 << 20 {
        return Err(NotThatHigh { start, end: pool.end });
    }
    pool.next = pool.next.max(start);
    pool.free.retain(|&frame| frame >= start);
    Ok(())
}

/// Where the next fresh (never freed) frame comes from.
pub fn next_address() -> usize {
    POOL.lock().next
}

/// Bytes left in the pool (not counting freed frames).
pub fn remaining() -> usize {
    let pool = POOL.lock();
    pool.end - pool.next
}

/// The frame pool as the driver's [`smmuv3::FrameAllocator`]: identity-mapped, so a block's CPU address is its
/// physical address.
#[derive(Clone, Copy, Debug, Default)]
pub struct Frames;

// SAFETY: `alloc` hands out zeroed, physically contiguous ranges of identity-mapped normal RAM that nothing else
// uses, aligned as asked (at least a frame); RAM is mapped write-back cacheable and QEMU's SMMU is coherent.
unsafe impl smmuv3::FrameAllocator for Frames {
    fn allocate_zeroed(&self, size: usize, align: usize) -> Result<smmuv3::DmaBlock, smmuv3::mem::AllocError> {
        if size == 0 || !align.is_power_of_two() {
            return Err(smmuv3::mem::AllocError::BadRequest { size, align });
        }
        let address = alloc(size, align).map_err(|_| smmuv3::mem::AllocError::OutOfMemory { size })?;
        let virt = core::ptr::NonNull::new(address as *mut u8).ok_or(smmuv3::mem::AllocError::OutOfMemory { size })?;
        Ok(smmuv3::DmaBlock {
            phys: smmuv3::PhysAddr(address as u64),
            virt,
            size,
        })
    }

    fn phys_to_virt(&self, phys: smmuv3::PhysAddr) -> Option<core::ptr::NonNull<u8>> {
        // Identity-mapped RAM: the pool's blocks are where their physical addresses say.
        let pool = POOL.lock();
        let address = usize::try_from(phys.0).ok()?;
        (address < pool.next).then_some(())?;
        core::ptr::NonNull::new(address as *mut u8)
    }

    unsafe fn free(&self, block: smmuv3::DmaBlock) {
        if block.size <= FRAME_SIZE {
            // SAFETY: the caller guarantees the block came from this pool and is no longer used.
            unsafe { free_frame(block.virt.as_ptr() as usize) };
        }
        // Larger blocks are not reused: the pool serves one test run.
    }
}
