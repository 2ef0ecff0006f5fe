//! Bookkeeping the driver keeps out of line, in memory from the SMMU's allocator (there is no heap): the domain
//! table's slots, sized when the SMMU is initialised, so that an [`super::Iommu`] holding thousands of domains
//! stays small enough to be returned by value.

use core::ptr::NonNull;

use crate::mem::{AllocError, DmaBlock, FrameAllocator};

/// `len` values of `T` in one block of an allocator, owned like a boxed slice: dropped in place with it. The block
/// goes back to its allocator only through [`Storage::release`] (a `Storage` dropped without it leaks the block,
/// never the values' own resources).
pub(crate) struct Storage<T> {
    ptr: NonNull<T>,
    len: usize,
    block: Option<DmaBlock>,
}

// SAFETY: a `Storage<T>` owns its values as a `Box<[T]>` would: sending or sharing it sends or shares them.
unsafe impl<T: Send> Send for Storage<T> {}
// SAFETY: as above; `&Storage<T>` gives only `&T`.
unsafe impl<T: Sync> Sync for Storage<T> {}

impl<T> Storage<T> {
    /// `len` values, value `i` being `init(i)`, in a block of `allocator`.
    ///
    /// # Errors
    /// The allocator's error (nothing allocated then), [`AllocError::BadRequest`] for a size that overflows.
    pub(crate) fn new(
        allocator: &dyn FrameAllocator,
        len: usize,
        mut init: impl FnMut(usize) -> T,
    ) -> Result<Self, AllocError> {
        let align = core::mem::align_of::<T>().max(8);
        // An allocator aligns blocks physically as asked but their CPU addresses only to 8 bytes (its contract):
        // room to align the values at the CPU address too.
        let size = core::mem::size_of::<T>()
            .checked_mul(len)
            .and_then(|bytes| bytes.checked_add(align - 8))
            .ok_or(AllocError::BadRequest {
                size: usize::MAX,
                align,
            })?
            .max(8);
        let block = allocator.allocate_for_overwrite(size, align)?;
        let skip = block.virt.as_ptr().align_offset(align);
        // SAFETY: `skip` < `align`, and the block holds `align - 8` bytes more than the values need (its CPU
        // address is 8-byte aligned, so at most `align - 8` are skipped).
        let ptr = unsafe { block.virt.add(skip) }.cast::<T>();
        for i in 0..len {
            // SAFETY: the block holds `len` values of `T`, aligned for `T` (the allocator's contract), and is this
            // storage's alone; each slot is written once, before anything reads it.
            unsafe { ptr.as_ptr().add(i).write(init(i)) };
        }
        Ok(Storage {
            ptr,
            len,
            block: Some(block),
        })
    }

    /// No values, no block.
    pub(crate) const fn empty() -> Self {
        Storage {
            ptr: NonNull::dangling(),
            len: 0,
            block: None,
        }
    }

    /// Drops every value, then gives the block back to `allocator` (the one it came from).
    ///
    /// # Safety
    /// `allocator` must be the allocator the storage came from.
    pub(crate) unsafe fn release(mut self, allocator: &dyn FrameAllocator) {
        self.drop_values();
        if let Some(block) = self.block.take() {
            // SAFETY: the block came from `allocator` (the caller's guarantee), and its values are gone.
            unsafe { allocator.free(block) };
        }
    }

    fn drop_values(&mut self) {
        let len = core::mem::replace(&mut self.len, 0);
        // SAFETY: the first `len` slots hold live values (written in `new`), dropped once: `len` is 0 from here.
        unsafe { core::ptr::drop_in_place(core::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), len)) };
    }
}

impl<T> core::ops::Deref for Storage<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` initialised values at `ptr`, owned by this storage.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> core::ops::DerefMut for Storage<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`; `&mut self` makes this the only view.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Drop for Storage<T> {
    fn drop(&mut self) {
        self.drop_values();
    }
}
