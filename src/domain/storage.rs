//! Bookkeeping the driver keeps out of line, in memory from the SMMU's allocator (there is no heap): the domain
//! table's slots, sized when the SMMU is initialised, so that an [`super::Iommu`] holding thousands of domains
//! stays small enough to be returned by value.

use core::ptr::NonNull;

use crate::ids::DomainId;
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

/// One entry of an [`Index`].
#[derive(Clone, Copy)]
struct TokenEntry<V: Copy> {
    token: u64,
    id: V,
    used: bool,
}

/// Values by a 64-bit key, out of line: an open-addressing table (linear probing, deletion by backward shift, so
/// no tombstones build up) twice as large as the entries it may hold, so a lookup, an insert and a removal are
/// O(1) on average however many there are.
pub(crate) struct Index<V: Copy> {
    entries: Storage<TokenEntry<V>>,
    len: usize,
    capacity: usize,
}

/// Domains by token (the preserved ones, the restored ones).
pub(crate) type TokenIndex = Index<DomainId>;

impl TokenIndex {
    /// Room for `capacity` tokens, in a block of `allocator`.
    ///
    /// # Errors
    /// The allocator's.
    pub(crate) fn new(allocator: &dyn FrameAllocator, capacity: usize) -> Result<Self, AllocError> {
        Self::with_placeholder(allocator, capacity, DomainId::new(0, 0))
    }
}

impl<V: Copy> Index<V> {
    /// Room for `capacity` entries, in a block of `allocator` (`placeholder` fills the free ones).
    ///
    /// # Errors
    /// The allocator's.
    pub(crate) fn with_placeholder(
        allocator: &dyn FrameAllocator,
        capacity: usize,
        placeholder: V,
    ) -> Result<Self, AllocError> {
        let slots = capacity.saturating_mul(2).next_power_of_two().max(8);
        let empty = TokenEntry {
            token: 0,
            id: placeholder,
            used: false,
        };
        Ok(Index {
            entries: Storage::new(allocator, slots, |_| empty)?,
            len: 0,
            capacity,
        })
    }

    /// No room, no block (what a dropped driver leaves behind).
    pub(crate) const fn empty() -> Self {
        Index {
            entries: Storage::empty(),
            len: 0,
            capacity: 0,
        }
    }

    fn mask(&self) -> usize {
        self.entries.len() - 1
    }

    /// Where `token`'s probe starts (a multiplicative hash's top bits).
    fn home(&self, token: u64) -> usize {
        let h = token.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (h ^ (h >> 32)) as usize & self.mask()
    }

    /// `token`'s entry, or the free entry where it would go.
    fn find(&self, token: u64) -> Result<usize, usize> {
        if self.entries.is_empty() {
            return Err(usize::MAX);
        }
        let mut i = self.home(token);
        loop {
            let e = &self.entries[i];
            if !e.used {
                return Err(i);
            }
            if e.token == token {
                return Ok(i);
            }
            i = (i + 1) & self.mask();
        }
    }

    pub(crate) fn get(&self, token: &u64) -> Option<&V> {
        self.find(*token).ok().map(|i| &self.entries[i].id)
    }

    pub(crate) fn contains_key(&self, token: &u64) -> bool {
        self.find(*token).is_ok()
    }

    /// Inserts or replaces; `Err` when full (nothing changed).
    pub(crate) fn insert(&mut self, token: u64, id: V) -> Result<Option<V>, (u64, V)> {
        match self.find(token) {
            Ok(i) => Ok(Some(core::mem::replace(&mut self.entries[i].id, id))),
            Err(_) if self.len >= self.capacity => Err((token, id)),
            Err(i) => {
                self.entries[i] = TokenEntry { token, id, used: true };
                self.len += 1;
                Ok(None)
            }
        }
    }

    /// Removes `token`'s entry (the name of `IndexMap`'s, which this replaces).
    pub(crate) fn swap_remove(&mut self, token: &u64) -> Option<V> {
        let mut hole = self.find(*token).ok()?;
        let id = self.entries[hole].id;
        self.entries[hole].used = false;
        self.len -= 1;
        // Backward shift: each entry after the hole that may live there (its probe passes it) moves into it.
        let mut i = (hole + 1) & self.mask();
        while self.entries[i].used {
            let home = self.home(self.entries[i].token);
            // Whether `home` lies cyclically in (hole, i]: then the entry stays.
            let stays = if hole <= i {
                hole < home && home <= i
            } else {
                hole < home || home <= i
            };
            if !stays {
                self.entries[hole] = self.entries[i];
                self.entries[i].used = false;
                hole = i;
            }
            i = (i + 1) & self.mask();
        }
        Some(id)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&u64, &V)> + '_ {
        self.entries.iter().filter(|e| e.used).map(|e| (&e.token, &e.id))
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.iter().map(|(_, id)| id)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Gives the block back (see [`Storage::release`]).
    ///
    /// # Safety
    /// As [`Storage::release`].
    pub(crate) unsafe fn release(self, allocator: &dyn FrameAllocator) {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { self.entries.release(allocator) };
    }
}

/// A vector of at most a capacity chosen at run time, out of line (for a restore's bookkeeping, sized by the
/// records it rebuilds).
pub(crate) struct StorageVec<T: Copy> {
    items: Storage<T>,
    len: usize,
}

impl<T: Copy> StorageVec<T> {
    /// Room for `capacity` values (filled with `fill` until pushed), in a block of `allocator`.
    ///
    /// # Errors
    /// The allocator's.
    pub(crate) fn with_capacity(allocator: &dyn FrameAllocator, capacity: usize, fill: T) -> Result<Self, AllocError> {
        Ok(StorageVec {
            items: Storage::new(allocator, capacity, |_| fill)?,
            len: 0,
        })
    }

    /// Appends `value`; `Err(value)` when full.
    pub(crate) fn push(&mut self, value: T) -> Result<(), T> {
        match self.items.get_mut(self.len) {
            Some(slot) => {
                *slot = value;
                self.len += 1;
                Ok(())
            }
            None => Err(value),
        }
    }

    pub(crate) fn as_slice(&self) -> &[T] {
        &self.items[..self.len]
    }

    /// Gives the block back (see [`Storage::release`]).
    ///
    /// # Safety
    /// As [`Storage::release`].
    pub(crate) unsafe fn release(self, allocator: &dyn FrameAllocator) {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { self.items.release(allocator) };
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::host_frames::HeapFrames;
    use std::collections::HashMap;

    /// The index against a `HashMap` model, with tokens chosen to collide (a small table, clustered keys):
    /// inserts, replacements, removals (every backward shift), lookups of present and absent tokens.
    #[test]
    fn the_token_index_agrees_with_a_map() {
        let frames = HeapFrames::default();
        for capacity in [1usize, 3, 8, 64] {
            let mut index = TokenIndex::new(&frames, capacity).unwrap();
            let mut model: HashMap<u64, DomainId> = HashMap::new();
            let mut state = 0x1234_5678_9abc_def0u64 ^ capacity as u64;
            for step in 0..20_000u32 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // Few distinct tokens, some multiples of the table size (same home).
                let token = match state % 3 {
                    0 => state % 16,
                    1 => (state % 8) << 20,
                    _ => state % (4 * capacity as u64 + 1),
                };
                let id = DomainId::new((step % 100) as u16, u64::from(step));
                if state & 0x100 == 0 {
                    let full = model.len() == capacity && !model.contains_key(&token);
                    match index.insert(token, id) {
                        Ok(old) => {
                            assert!(!full);
                            assert_eq!(old, model.insert(token, id));
                        }
                        Err(_) => assert!(full, "refused with room"),
                    }
                } else {
                    assert_eq!(index.swap_remove(&token), model.remove(&token));
                }
                assert_eq!(index.len(), model.len());
                for probe in [token, token ^ 1, token + 8] {
                    assert_eq!(index.get(&probe), model.get(&probe), "step {step}");
                }
            }
            let mut listed: std::vec::Vec<(u64, DomainId)> = index.iter().map(|(t, d)| (*t, *d)).collect();
            listed.sort_by_key(|(t, _)| *t);
            let mut expected: std::vec::Vec<(u64, DomainId)> = model.into_iter().collect();
            expected.sort_by_key(|(t, _)| *t);
            assert_eq!(listed, expected);
            // SAFETY: from `frames`.
            unsafe { index.release(&frames) };
        }
        assert_eq!(frames.live_blocks(), 0);
    }
}
