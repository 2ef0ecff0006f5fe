//! The ASID/VMID allocator every CPU shares: the bitmap of [`IdAllocator`](super::IdAllocator) kept in atomic
//! words, so that allocating, claiming and freeing take `&self` and no lock (an SMMU core's `allocate_asid` runs on
//! any CPU while others create and free domains).
//!
//! **Protocol.** A count of identifiers taken (`used`, the reserved 0 included) is raised by a CAS that refuses to
//! pass the capacity *before* a bit is looked for: a CPU that raised it is owed one free bit, since the bits set
//! never exceed `used`, so its scan always ends. The bit is taken with `fetch_or`: only the CPU that saw it clear
//! owns it (two CPUs can never get one identifier). Freeing clears the bit with `fetch_and` (only the CPU that saw
//! it set frees it: a double free is refused) and then lowers `used`.
//!
//! **Ownership.** An identifier handed out by the raw calls (`allocate_raw`) also gets its bit in `raw`, set by the
//! CPU that owns it (after the `fetch_or` that took it) before it is returned; `free_raw` frees only an identifier
//! whose `raw` bit it cleared itself. So an identifier a domain allocated (or a restore claimed) is never freed by a
//! raw call, whatever the domain is doing (being built, being freed): ownership is decided by the allocator in the
//! step that hands the identifier out, not by a scan of the domains.
//!
//! **Orderings.** The bit operations are `AcqRel`: the owner that frees an identifier did so after the TLBI and
//! CMD_SYNC that dropped its entries (the caller's rule); its `Release` clear and the next owner's `Acquire` set
//! order that invalidation before anything the next owner does with the identifier. `used` is only a bound (it
//! orders nothing: the bitmap does), so its updates are `Relaxed`; the next-fit hint is a hint, `Relaxed`.

use crate::sync::{AtomicU32, AtomicU64, Ordering};

use super::IdError;

/// Words of the bitmap: 16-bit identifiers in the driver; a loom model uses at most 6-bit ones (one word), which
/// keeps the number of modelled atomics small.
#[cfg(not(all(loom, test)))]
const WORDS: usize = 1024;
#[cfg(all(loom, test))]
const WORDS: usize = 1;

/// A bitmap allocator of identifiers `1..2^bits` shared by every CPU (0 reserved), next-fit as
/// [`IdAllocator`](super::IdAllocator): a freed identifier is reused late.
pub(crate) struct AtomicIdAllocator {
    bits: u8,
    /// Identifiers taken or reserved by an allocation in flight (the reserved 0 included).
    used: AtomicU32,
    /// Where the next scan starts.
    next: AtomicU32,
    map: [AtomicU64; WORDS],
    /// The identifiers the raw calls handed out (a subset of `map`): the only ones `free_raw` frees.
    raw: [AtomicU64; WORDS],
}

impl core::fmt::Debug for AtomicIdAllocator {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AtomicIdAllocator")
            .field("bits", &self.bits)
            .field("used", &self.in_use())
            .finish()
    }
}

impl AtomicIdAllocator {
    /// An allocator of `bits`-bit identifiers (clamped to 1..=16; to 1..=6 in a loom model), 0 reserved.
    pub(crate) fn new(bits: u8) -> Self {
        let max = (WORDS * 64).trailing_zeros() as u8;
        let bits = bits.clamp(1, max);
        let map: [AtomicU64; WORDS] = core::array::from_fn(|i| AtomicU64::new(u64::from(i == 0)));
        AtomicIdAllocator {
            bits,
            used: AtomicU32::new(1),
            next: AtomicU32::new(1),
            map,
            raw: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// The identifier width.
    pub(crate) fn bits(&self) -> u8 {
        self.bits
    }

    fn capacity(&self) -> u32 {
        1 << self.bits
    }

    /// Identifiers allocated now, the reserved 0 included (an allocation in flight may be counted already).
    pub(crate) fn in_use(&self) -> u32 {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether `id` is allocated (0 always is); `false` beyond the width.
    pub(crate) fn is_allocated(&self, id: u16) -> bool {
        let id = u32::from(id);
        id < self.capacity() && self.map[(id / 64) as usize].load(Ordering::Acquire) & (1 << (id % 64)) != 0
    }

    /// Raises `used` unless the capacity is reached.
    fn reserve(&self) -> Result<(), IdError> {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used < self.capacity()).then_some(used + 1)
            })
            .map(drop)
            .map_err(|_| IdError::Exhausted { bits: self.bits })
    }

    /// Allocates a free identifier.
    ///
    /// # Errors
    /// [`IdError::Exhausted`] when none is left.
    pub(crate) fn allocate(&self) -> Result<u16, IdError> {
        self.reserve()?;
        // A free bit exists (see the module docs): the scan ends, though it may go round more than once while
        // other CPUs take the bits it sees clear.
        let mut id = self.next.load(Ordering::Relaxed);
        loop {
            if id >= self.capacity() {
                id = 1;
                // Round again: the free bit owed to this CPU is elsewhere now (let a loom model run the others).
                crate::sync::delay_point();
            }
            let word = &self.map[(id / 64) as usize];
            let bits = word.load(Ordering::Relaxed);
            // Bits of this word from `id` on, within the capacity.
            let from = id % 64;
            let width = (self.capacity() - (id - from)).min(64);
            let mask_width = if width == 64 { u64::MAX } else { (1u64 << width) - 1 };
            let free = !bits & mask_width & (u64::MAX << from);
            if free == 0 {
                id = (id / 64 + 1) * 64;
                continue;
            }
            let bit = free.trailing_zeros();
            let candidate = id - from + bit;
            if word.fetch_or(1 << bit, Ordering::AcqRel) & (1 << bit) == 0 {
                self.next.store(candidate + 1, Ordering::Relaxed);
                return Ok(candidate as u16);
            }
            // Another CPU took it between the load and the fetch_or: look again from the same place.
            id = candidate;
        }
    }

    /// Allocates a free identifier for a raw caller (not a domain): the only kind [`AtomicIdAllocator::free_raw`]
    /// frees.
    ///
    /// # Errors
    /// As [`AtomicIdAllocator::allocate`].
    pub(crate) fn allocate_raw(&self) -> Result<u16, IdError> {
        let id = self.allocate()?;
        let i = u32::from(id);
        // Relaxed: only this CPU knows `id` yet; the caller's hand-over of it to another CPU orders the mark.
        self.raw[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Relaxed);
        Ok(id)
    }

    /// Frees `id` if a raw caller ([`AtomicIdAllocator::allocate_raw`]) took it; the caller has invalidated its TLB
    /// entries.
    ///
    /// # Errors
    /// [`IdError::Owned`] for an identifier allocated otherwise (a domain's, a restore's claim),
    /// [`IdError::OutOfRange`], [`IdError::WrongState`] for 0 or an identifier that is not allocated; nothing
    /// changes then.
    pub(crate) fn free_raw(&self, id: u16) -> Result<(), IdError> {
        let i = u32::from(id);
        if i >= self.capacity() {
            return Err(IdError::OutOfRange { id, bits: self.bits });
        }
        // Only the CPU that clears the mark frees the identifier (two raw frees: one wins).
        if self.raw[(i / 64) as usize].fetch_and(!(1 << (i % 64)), Ordering::Relaxed) & (1 << (i % 64)) == 0 {
            return Err(match self.is_allocated(id) {
                true => IdError::Owned { id },
                false => IdError::WrongState { id, allocated: false },
            });
        }
        self.free(id)
    }

    /// Marks `id` allocated (a restore reserving what a record names).
    ///
    /// # Errors
    /// [`IdError::OutOfRange`] beyond the width, [`IdError::WrongState`] when it is allocated already; nothing
    /// changes then.
    pub(crate) fn claim(&self, id: u16) -> Result<(), IdError> {
        let i = u32::from(id);
        if i >= self.capacity() {
            return Err(IdError::OutOfRange { id, bits: self.bits });
        }
        if self.is_allocated(id) {
            return Err(IdError::WrongState { id, allocated: true });
        }
        self.reserve()
            .map_err(|_| IdError::WrongState { id, allocated: true })?;
        if self.map[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::AcqRel) & (1 << (i % 64)) != 0 {
            // Taken meanwhile by another CPU: give the reservation back.
            self.used.fetch_sub(1, Ordering::Relaxed);
            return Err(IdError::WrongState { id, allocated: true });
        }
        Ok(())
    }

    /// Frees `id`, whose TLB entries the caller has invalidated (TLBI + CMD_SYNC) already.
    ///
    /// # Errors
    /// [`IdError::OutOfRange`], or [`IdError::WrongState`] for 0 or an identifier that is not allocated.
    pub(crate) fn free(&self, id: u16) -> Result<(), IdError> {
        let i = u32::from(id);
        if i >= self.capacity() {
            return Err(IdError::OutOfRange { id, bits: self.bits });
        }
        if i == 0 {
            return Err(IdError::WrongState { id, allocated: false });
        }
        if self.map[(i / 64) as usize].fetch_and(!(1 << (i % 64)), Ordering::AcqRel) & (1 << (i % 64)) == 0 {
            return Err(IdError::WrongState { id, allocated: false });
        }
        self.used.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    extern crate std;

    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::vec::Vec;

    use super::*;

    #[test]
    fn behaves_as_the_plain_allocator() {
        let a = AtomicIdAllocator::new(8);
        let mut seen = BTreeSet::new();
        for _ in 0..255 {
            assert!(seen.insert(a.allocate().unwrap()));
        }
        assert_eq!(a.allocate(), Err(IdError::Exhausted { bits: 8 }));
        a.free(77).unwrap();
        assert_eq!(a.allocate(), Ok(77));
        assert_eq!(
            a.free(0),
            Err(IdError::WrongState {
                id: 0,
                allocated: false
            })
        );
        a.free(5).unwrap();
        assert_eq!(
            a.free(5),
            Err(IdError::WrongState {
                id: 5,
                allocated: false
            })
        );
        a.claim(5).unwrap();
        assert_eq!(a.claim(5), Err(IdError::WrongState { id: 5, allocated: true }));
        assert_eq!(a.claim(300), Err(IdError::OutOfRange { id: 300, bits: 8 }));
        assert_eq!(a.in_use(), 256);
    }

    /// Next-fit as the plain allocator: a claimed identifier is skipped, a freed one reused late.
    #[test]
    fn next_fit() {
        let a = AtomicIdAllocator::new(8);
        a.claim(5).unwrap();
        let got: Vec<u16> = (0..5).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(got, [1, 2, 3, 4, 6]);
        a.free(2).unwrap();
        assert_eq!(a.allocate(), Ok(7));
    }

    /// Threads allocating and freeing at once never get one identifier twice, and everything goes back.
    #[test]
    fn threads_never_share_an_identifier() {
        for threads in [2, 4, 8] {
            let a = Arc::new(AtomicIdAllocator::new(6));
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let a = Arc::clone(&a);
                    std::thread::spawn(move || {
                        let mut mine = Vec::new();
                        for round in 0..2000 {
                            match a.allocate() {
                                Ok(id) => mine.push(id),
                                Err(IdError::Exhausted { .. }) => {}
                                Err(e) => panic!("{e}"),
                            }
                            if round % 3 == 0
                                && let Some(id) = mine.pop()
                            {
                                a.free(id).unwrap();
                            }
                        }
                        mine
                    })
                })
                .collect();
            let mut all = BTreeSet::new();
            for h in handles {
                for id in h.join().unwrap() {
                    assert!(all.insert(id), "{id} handed out twice");
                    assert!(a.is_allocated(id));
                }
            }
            assert_eq!(a.in_use() as usize, all.len() + 1);
        }
    }
}
