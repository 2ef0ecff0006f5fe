//! Tables of 64-byte entries that the SMMU walks: one linear array, or a level-1 array of 8-byte descriptors
//! whose leaves are allocated on first use. The stream table (STEs) and CD tables (CDs) are both built on it.
//!
//! A 2-level table keeps, beside the level-1 array the SMMU reads, an array of the leaves' CPU addresses in memory
//! from the same allocator: no global allocator, and no assumption that a physical address is a usable pointer.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::hitless::EntryWriter;
use crate::mem::{AllocError, Coherency, DmaBlock, FrameAllocator, PhysAddr, write_barrier};

/// Bytes per entry (STE or CD).
pub(crate) const ENTRY_BYTES: usize = 64;

/// How a table's level-1 descriptors are encoded.
#[derive(Clone, Copy)]
pub(crate) struct Level1 {
    /// log2 of entries per leaf.
    pub(crate) leaf_bits: u8,
    /// The descriptor of a leaf at a physical address, given `leaf_bits`.
    pub(crate) descriptor: fn(PhysAddr, u8) -> u64,
    /// The leaf address field of a descriptor.
    pub(crate) address_mask: u64,
}

pub(crate) struct EntryTable {
    entry_bits: u8,
    level1: Option<Level1>,
    /// The linear array or the level-1 array.
    base: DmaBlock,
    /// 2-level only: each leaf's CPU address, 0 while it is not allocated.
    leaves: Option<DmaBlock>,
    /// The value every entry starts with (all zero: invalid).
    initial: [u64; 8],
    coherency: Coherency,
    allocated_leaves: u32,
}

/// Bytes of the level-1 array of a table of `2^entry_bits` entries in leaves of `2^leaf_bits`: one 8-byte
/// descriptor per leaf, and at least one (IHI 0070, STRTAB_BASE_CFG: MAX(1, 2^(LOG2SIZE - SPLIT)) descriptors, a
/// table narrower than its split being one partly usable leaf).
pub(crate) const fn level1_bytes(entry_bits: u8, leaf_bits: u8) -> usize {
    8usize << entry_bits.saturating_sub(leaf_bits)
}

fn fill(block: &DmaBlock, initial: &[u64; 8]) {
    if *initial == [0; 8] {
        return; // allocations are zeroed
    }
    // SAFETY: the block is live and not yet visible to the SMMU.
    for entry in unsafe { block.words() }.chunks_exact(8) {
        for (word, value) in entry.iter().zip(initial) {
            word.store(*value, Ordering::Relaxed);
        }
    }
}

impl EntryTable {
    /// Adopts the linear table of `2^entry_bits` entries at `base` that a previous image left (a live update):
    /// nothing is written. `None` when `allocator` cannot reach the whole table.
    pub(crate) fn adopt_linear(
        entry_bits: u8,
        base: PhysAddr,
        initial: [u64; 8],
        allocator: &impl FrameAllocator,
        coherency: Coherency,
    ) -> Option<Self> {
        let size = ENTRY_BYTES << entry_bits;
        let virt = allocator.phys_to_virt(base)?;
        // The last byte must be the allocator's too (one block, so the range between is).
        allocator.phys_to_virt(PhysAddr(base.0 + size as u64 - 1))?;
        Some(EntryTable {
            entry_bits,
            level1: None,
            base: DmaBlock { phys: base, virt, size },
            leaves: None,
            initial,
            coherency,
            allocated_leaves: 0,
        })
    }

    /// Adopts the linear or (with `level1`) 2-level table at `base` that a previous image left live (a hand-off with
    /// the SMMU running): nothing the SMMU reads is written. For a 2-level table the level-1 descriptors are read
    /// to find the leaves, whose CPU addresses go into a new array from `allocator`. `None` when `allocator`
    /// cannot reach the table or one of its leaves, when a non-zero level-1 descriptor is not exactly the one this
    /// driver writes for its leaf (`level1.descriptor`), when two descriptors name one leaf or a leaf overlaps the
    /// level-1 table (or the new array), or when there is no memory for that array.
    pub(crate) fn adopt(
        entry_bits: u8,
        level1: Option<Level1>,
        base: PhysAddr,
        initial: [u64; 8],
        allocator: &impl FrameAllocator,
        coherency: Coherency,
    ) -> Option<Self> {
        let Some(l1) = level1 else {
            return Self::adopt_linear(entry_bits, base, initial, allocator, coherency);
        };
        let size = level1_bytes(entry_bits, l1.leaf_bits);
        let virt = allocator.phys_to_virt(base)?;
        allocator.phys_to_virt(PhysAddr(base.0 + size as u64 - 1))?;
        let base = DmaBlock { phys: base, virt, size };
        let leaves = allocator.allocate_zeroed(size, 8).ok()?;
        let adopted = Self::adopt_leaves(&base, &leaves, l1, allocator);
        match adopted {
            Some(allocated_leaves) => Some(EntryTable {
                entry_bits,
                level1: Some(l1),
                base,
                leaves: Some(leaves),
                initial,
                coherency,
                allocated_leaves,
            }),
            None => {
                // SAFETY: allocated above, never shared.
                unsafe { allocator.free(leaves) };
                None
            }
        }
    }

    /// Fills `leaves` (zeroed, one word per level-1 descriptor) with the CPU address of each leaf the level-1 array
    /// `base` names, and returns how many there are: `None` when a descriptor is not one this driver writes for a
    /// leaf `allocator` reaches whole, or when the leaves are not disjoint from each other, from the level-1 array
    /// and from `leaves`. Leaves are aligned to their (common) size, so two of them either coincide or are
    /// disjoint: two descriptors naming one leaf would make two StreamIDs share every STE of it (whatever this
    /// image installs for one, the other translates with), and a leaf over the level-1 array would have the SMMU
    /// read descriptors as STEs.
    fn adopt_leaves(base: &DmaBlock, leaves: &DmaBlock, l1: Level1, allocator: &impl FrameAllocator) -> Option<u32> {
        let leaf_size = (ENTRY_BYTES << l1.leaf_bits) as u64;
        let overlaps =
            |leaf: u64, block: &DmaBlock| leaf < block.phys.0 + block.size as u64 && block.phys.0 < leaf + leaf_size;
        // SAFETY: live block; the level-1 array is read with single-copy-atomic loads.
        let descriptors = unsafe { base.words() };
        {
            // SAFETY: `leaves` was just allocated (live, 8-byte aligned, `size` bytes) for this table alone and is
            // shared with nothing yet: this plain view is its only reference until the block ends.
            let noted = unsafe { core::slice::from_raw_parts_mut(leaves.virt.as_ptr().cast::<u64>(), leaves.size / 8) };
            // First pass: each descriptor checked, and the physical address of its leaf noted.
            for (descriptor, note) in descriptors.iter().zip(noted.iter_mut()) {
                let word = descriptor.load(Ordering::Relaxed);
                if word == 0 {
                    continue;
                }
                // Anything else must be exactly the descriptor this driver writes for a leaf it reaches: a
                // descriptor the SMMU may follow to a leaf the driver does not know (L2Ptr = 0 with Span != 0, a
                // misaligned or wider span) would leave streams translating that no abort can reach.
                let leaf = word & l1.address_mask;
                let reachable = word == (l1.descriptor)(PhysAddr(leaf), l1.leaf_bits)
                    && allocator.phys_to_virt(PhysAddr(leaf)).is_some()
                    && allocator.phys_to_virt(PhysAddr(leaf + leaf_size - 1)).is_some();
                if !reachable || overlaps(leaf, base) || overlaps(leaf, leaves) {
                    return None;
                }
                // Bit 0 marks a leaf (leaves are aligned), so that a leaf at physical address 0 is noted too.
                *note = leaf | 1;
            }
            // No leaf named twice: the noted addresses sorted, neighbours compared. Sorting loses which descriptor
            // named which leaf; the second pass reads the descriptors again.
            noted.sort_unstable();
            if noted.windows(2).any(|w| w[0] != 0 && w[0] == w[1]) {
                return None;
            }
            noted.fill(0);
        }
        // Second pass: the CPU address of each leaf, at its descriptor's index.
        // SAFETY: live block, accessed atomically from here on (the plain view above has ended).
        let pointers = unsafe { leaves.words() };
        let mut allocated = 0;
        for (descriptor, pointer) in descriptors.iter().zip(pointers) {
            let word = descriptor.load(Ordering::Relaxed);
            if word == 0 {
                continue;
            }
            let cpu = allocator.phys_to_virt(PhysAddr(word & l1.address_mask))?;
            pointer.store(cpu.as_ptr() as u64, Ordering::Relaxed);
            allocated += 1;
        }
        Some(allocated)
    }

    /// A table of `2^entry_bits` entries, linear or (with `level1`) 2-level, every entry `initial`.
    pub(crate) fn new(
        entry_bits: u8,
        level1: Option<Level1>,
        initial: [u64; 8],
        allocator: &impl FrameAllocator,
        coherency: Coherency,
    ) -> Result<Self, AllocError> {
        let (base, leaves) = match level1 {
            None => {
                let size = ENTRY_BYTES << entry_bits;
                let base = allocator.allocate_zeroed(size, size.max(64))?;
                fill(&base, &initial);
                (base, None)
            }
            Some(l1) => {
                let size = level1_bytes(entry_bits, l1.leaf_bits);
                let base = allocator.allocate_zeroed(size, size.max(64))?;
                match allocator.allocate_zeroed(size, 8) {
                    Ok(leaves) => (base, Some(leaves)),
                    Err(e) => {
                        // SAFETY: allocated just above and never shared.
                        unsafe { allocator.free(base) };
                        return Err(e);
                    }
                }
            }
        };
        coherency.clean(base.virt.as_ptr(), base.size);
        Ok(EntryTable {
            entry_bits,
            level1,
            base,
            leaves,
            initial,
            coherency,
            allocated_leaves: 0,
        })
    }

    /// Physical address of the linear or level-1 array.
    pub(crate) fn base(&self) -> PhysAddr {
        self.base.phys
    }

    /// Leaves allocated so far.
    pub(crate) fn allocated_leaves(&self) -> u32 {
        self.allocated_leaves
    }

    pub(crate) fn coherency(&self) -> Coherency {
        self.coherency
    }

    /// Whether `index` is inside the table.
    pub(crate) fn contains(&self, index: u32) -> bool {
        u64::from(index) >> self.entry_bits == 0
    }

    /// The entry at `index` (inside the table), if its leaf exists.
    pub(crate) fn entry(&self, index: u32) -> Option<&[AtomicU64]> {
        let (leaf, leaf_bits) = match (self.level1, &self.leaves) {
            (Some(l1), Some(leaves)) => {
                // SAFETY: the block is live for the life of `self` and accessed atomically.
                let pointer = unsafe { leaves.words() }[(index >> l1.leaf_bits) as usize].load(Ordering::Relaxed);
                if pointer == 0 {
                    return None;
                }
                // SAFETY: a live leaf of 2^leaf_bits entries allocated by `ensure_leaf`, kept for the table's life.
                let leaf = unsafe { core::slice::from_raw_parts(pointer as *const AtomicU64, 8 << l1.leaf_bits) };
                (leaf, l1.leaf_bits)
            }
            // SAFETY: as above.
            _ => (unsafe { self.base.words() }, self.entry_bits),
        };
        let slot = (index & ((1u32 << leaf_bits) - 1)) as usize;
        Some(&leaf[slot * 8..][..8])
    }

    /// Makes the entry at `index` (inside the table) reachable: allocates its leaf (every entry `initial`) and
    /// publishes the level-1 descriptor, leaf contents first. Returns whether a leaf was added.
    pub(crate) fn ensure_leaf(&mut self, index: u32, allocator: &impl FrameAllocator) -> Result<bool, AllocError> {
        let (Some(l1), Some(leaves)) = (self.level1, &self.leaves) else {
            return Ok(false);
        };
        if self.entry(index).is_some() {
            return Ok(false);
        }
        let size = ENTRY_BYTES << l1.leaf_bits;
        let leaf = allocator.allocate_zeroed(size, size)?;
        fill(&leaf, &self.initial);
        self.coherency.clean(leaf.virt.as_ptr(), leaf.size);
        let slot = (index >> l1.leaf_bits) as usize;
        // SAFETY: live block, atomic access.
        let pointers = unsafe { leaves.words() };
        pointers[slot].store(leaf.virt.as_ptr() as u64, Ordering::Relaxed);
        // The leaf's contents must be visible before the descriptor that points to it.
        write_barrier();
        // SAFETY: live block, atomic access; the SMMU reads the descriptor as one 64-bit word.
        let descriptors = unsafe { self.base.words() };
        descriptors[slot].store((l1.descriptor)(leaf.phys, l1.leaf_bits), Ordering::Release);
        self.coherency.clean(core::ptr::from_ref(&descriptors[slot]).cast(), 8);
        self.allocated_leaves += 1;
        // The leaf stays allocated for the table's life: `leaves` holds its CPU address, the descriptor its
        // physical address, and `free` rebuilds the block from both.
        Ok(true)
    }

    /// Returns the table and every leaf to `allocator`.
    ///
    /// # Safety
    /// The SMMU must no longer read the table, and `allocator` must be the one it came from.
    pub(crate) unsafe fn free(self, allocator: &impl FrameAllocator) {
        if let (Some(l1), Some(leaves)) = (self.level1, &self.leaves) {
            // SAFETY: both blocks are live until freed below.
            let (pointers, descriptors) = unsafe { (leaves.words(), self.base.words()) };
            for (pointer, descriptor) in pointers.iter().zip(descriptors) {
                if let Some(virt) = core::ptr::NonNull::new(pointer.load(Ordering::Relaxed) as *mut u8) {
                    let phys = PhysAddr(descriptor.load(Ordering::Relaxed) & l1.address_mask);
                    // SAFETY: allocated by `ensure_leaf` with this size; the caller guarantees nothing reads it.
                    unsafe {
                        allocator.free(DmaBlock {
                            phys,
                            virt,
                            size: ENTRY_BYTES << l1.leaf_bits,
                        })
                    };
                }
            }
        }
        // SAFETY: as above.
        unsafe {
            if let Some(leaves) = self.leaves {
                allocator.free(leaves);
            }
            allocator.free(self.base);
        }
    }

    /// The raw level-1 descriptor for `index` (tests walk the table as the SMMU would).
    #[cfg(test)]
    pub(crate) fn descriptor(&self, index: u32) -> u64 {
        let l1 = self.level1.map_or(0, |l| l.leaf_bits);
        // SAFETY: live block.
        let descriptors = unsafe { self.base.words() };
        descriptors[(index >> l1) as usize].load(Ordering::Relaxed)
    }
}

/// The hitless writer's view of one live entry: single-copy-atomic qword stores, and at each sync the cache
/// maintenance a non-coherent SMMU needs followed by the caller's invalidation.
pub(crate) struct SlotWriter<'a, F> {
    pub(crate) words: &'a [AtomicU64],
    pub(crate) coherency: Coherency,
    pub(crate) invalidate: F,
    pub(crate) syncs: u32,
}

impl<E, F: FnMut() -> Result<(), E>> EntryWriter for SlotWriter<'_, F> {
    type Error = E;

    fn write_qword(&mut self, index: usize, value: u64) {
        self.words[index].store(value, Ordering::Release);
    }

    fn sync(&mut self) -> Result<(), E> {
        self.coherency.clean(self.words.as_ptr().cast(), ENTRY_BYTES);
        (self.invalidate)()?;
        self.syncs += 1;
        Ok(())
    }
}
