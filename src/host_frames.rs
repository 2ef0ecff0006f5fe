//! [`HeapFrames`], the host-test frame allocator (re-exported by `testing`): a leaf that the crate's inline tests
//! import, below everything the fake SMMU of `testing` builds on.

extern crate std;

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::sync::Mutex;
use std::vec::Vec;

use core::ptr::NonNull;

use crate::mem::{AllocError, DmaBlock, FrameAllocator, PhysAddr};

/// Added to a CPU address to make its fake physical address (aligned far beyond any request).
pub(crate) const PHYS_OFFSET: u64 = 1 << 44;

/// A [`FrameAllocator`] over the host heap, for tests: its physical addresses are its CPU addresses plus
/// 2^44, it checks alignment, poisons what is freed (0xa5) and panics on a double or foreign free. Optionally
/// limited ([`HeapFrames::with_limit`]), to test what a driver does when memory runs out.
#[derive(Default)]
pub struct HeapFrames {
    live: Mutex<Vec<(usize, Layout)>>,
    /// Bytes a test allows before allocations fail (None: unlimited).
    limit: Option<usize>,
    used: Mutex<usize>,
}

impl HeapFrames {
    /// An allocator that refuses (`AllocError::OutOfMemory`) any allocation past `limit` bytes in use.
    pub fn with_limit(limit: usize) -> Self {
        HeapFrames {
            limit: Some(limit),
            ..Default::default()
        }
    }

    /// An allocator that lives for the rest of the program (what a driver's `&'static` memory needs).
    pub fn leaked() -> &'static HeapFrames {
        std::boxed::Box::leak(std::boxed::Box::default())
    }

    /// Blocks currently allocated (0 once everything given out came back: a leak check).
    pub fn live_blocks(&self) -> usize {
        self.live.lock().unwrap().len()
    }

    /// The CPU pointer of a physical address inside a live block.
    ///
    /// # Panics
    /// When no live block holds `phys`.
    pub fn virt(&self, phys: u64) -> *mut u8 {
        let address = (phys - PHYS_OFFSET) as usize;
        assert!(
            self.live
                .lock()
                .unwrap()
                .iter()
                .any(|(start, layout)| (*start..start + layout.size()).contains(&address)),
            "physical address {phys:#x} is not in a live block"
        );
        address as *mut u8
    }
}

// SAFETY: blocks come from the global allocator with the requested alignment (and a physical address that keeps
// it), zeroed, owned by the caller until freed.
unsafe impl FrameAllocator for HeapFrames {
    fn allocate_zeroed(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError> {
        if size == 0 || !align.is_power_of_two() {
            return Err(AllocError::BadRequest { size, align });
        }
        if let Some(limit) = self.limit
            && *self.used.lock().unwrap() + size > limit
        {
            return Err(AllocError::OutOfMemory { size });
        }
        let layout = Layout::from_size_align(size, align).map_err(|_| AllocError::BadRequest { size, align })?;
        // SAFETY: the layout has a non-zero size.
        let pointer = unsafe { alloc_zeroed(layout) };
        let virt = NonNull::new(pointer).ok_or(AllocError::OutOfMemory { size })?;
        self.live.lock().unwrap().push((pointer as usize, layout));
        *self.used.lock().unwrap() += size;
        Ok(DmaBlock {
            phys: PhysAddr(pointer as u64 + PHYS_OFFSET),
            virt,
            size,
        })
    }

    /// Fills the block with 0xa5 bytes: a valid-looking garbage descriptor (bit 0 set) wherever the caller fails
    /// to overwrite it, which the page-table tests' decoder then trips over.
    fn allocate_for_overwrite(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError> {
        let block = self.allocate_zeroed(size, align)?;
        // SAFETY: a live block of `size` bytes just allocated for the caller alone.
        unsafe { block.virt.as_ptr().write_bytes(0xa5, size) };
        Ok(block)
    }

    fn phys_to_virt(&self, phys: PhysAddr) -> Option<NonNull<u8>> {
        let address = usize::try_from(phys.0.checked_sub(PHYS_OFFSET)?).ok()?;
        let live = self.live.lock().unwrap();
        live.iter()
            .any(|(start, layout)| (*start..start + layout.size()).contains(&address))
            .then_some(())?;
        NonNull::new(address as *mut u8)
    }

    unsafe fn free(&self, block: DmaBlock) {
        let address = block.virt.as_ptr() as usize;
        assert_eq!(
            block.phys.0,
            address as u64 + PHYS_OFFSET,
            "block's physical address was altered"
        );
        let mut live = self.live.lock().unwrap();
        let index = live
            .iter()
            .position(|(a, _)| *a == address)
            .expect("free of a block that is not live");
        let (_, layout) = live.swap_remove(index);
        assert_eq!(layout.size(), block.size, "free with the wrong size");
        *self.used.lock().unwrap() -= block.size;
        // SAFETY: the block is live and ours; poison it so a use after free shows.
        unsafe {
            core::ptr::write_bytes(block.virt.as_ptr(), 0xa5, block.size);
            dealloc(block.virt.as_ptr(), layout);
        }
    }
}
