//! Identifiers: ASID and VMID allocators (bitmaps over the width the SMMU implements, 8 or 16 bits, with capacity
//! errors), and the handle naming a domain.

use core::fmt;

mod atomic;
#[cfg(all(loom, test))]
mod loom_models;

pub(crate) use atomic::AtomicIdAllocator;

/// A handle to a domain: its slot and the slot's generation. Copyable; stale once the domain is freed (the domain
/// table in [`crate::domain`] hands them out and checks them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DomainId {
    index: u16,
    generation: u64,
}

impl DomainId {
    /// The handle of slot `index` at `generation` (the domain table's to hand out).
    pub(crate) const fn new(index: u16, generation: u64) -> Self {
        DomainId { index, generation }
    }

    /// The slot's generation this handle names.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// The slot index (for display and tests).
    pub fn index(&self) -> u16 {
        self.index
    }
}

impl fmt::Display for DomainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "domain {}.{}", self.index, self.generation)
    }
}

/// Why an identifier could not be allocated or freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdError {
    /// Every identifier of the width is in use.
    Exhausted {
        /// The width in bits.
        bits: u8,
    },
    /// The identifier does not fit the width.
    OutOfRange {
        /// The identifier.
        id: u16,
        /// The width in bits.
        bits: u8,
    },
    /// The identifier is already allocated (on [`IdAllocator::claim`]) or not allocated (on [`IdAllocator::free`]).
    WrongState {
        /// The identifier.
        id: u16,
        /// Whether it is currently allocated.
        allocated: bool,
    },
    /// The identifier belongs to a live domain (on `Iommu::free_asid` / `free_vmid`): it goes back when the
    /// domain is freed, after its TLB entries.
    Owned {
        /// The identifier.
        id: u16,
    },
    /// Nothing is allocated on an SMMU adopted running (`Smmu::adopt_running`) until the hand-off is settled
    /// (`Iommu::restore_handover`, or `Iommu::abort_unrestored_streams`): the previous image's STEs may
    /// still translate with IDs this image does not know to be taken.
    HandOffUnsettled,
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdError::Exhausted { bits } => write!(f, "all {} identifiers of {bits} bits are in use", 1u32 << bits),
            IdError::OutOfRange { id, bits } => write!(f, "identifier {id:#x} does not fit {bits} bits"),
            IdError::WrongState { id, allocated: true } => write!(f, "identifier {id:#x} is already allocated"),
            IdError::WrongState { id, allocated: false } => write!(f, "identifier {id:#x} is not allocated"),
            IdError::HandOffUnsettled => f.write_str(
                "the SMMU was adopted running and the previous image's streams may use any identifier: restore the \
                 hand-off (or abort the unrestored streams) first",
            ),
            IdError::Owned { id } => {
                write!(
                    f,
                    "identifier {id:#x} belongs to a live domain: free the domain, not the identifier"
                )
            }
        }
    }
}

/// A bitmap allocator of identifiers `1..2^bits` (0 is reserved: ASID 0 and VMID 0 are the driver's own, for
/// bypass-like and stage-1-only configurations). Allocation is next-fit, so a freed identifier is reused late,
/// which keeps stale TLB entries of a just-freed identifier from meeting a new owner early.
#[derive(Clone)]
pub struct IdAllocator {
    bits: u8,
    next: u32,
    used: u32,
    map: [u64; 1024],
}

impl fmt::Debug for IdAllocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdAllocator")
            .field("bits", &self.bits)
            .field("used", &self.used)
            .finish()
    }
}

impl IdAllocator {
    /// An allocator of `bits`-bit identifiers (clamped to 1..=16), identifier 0 reserved.
    pub const fn new(bits: u8) -> Self {
        let bits = if bits == 0 {
            1
        } else if bits > 16 {
            16
        } else {
            bits
        };
        let mut map = [0u64; 1024];
        map[0] = 1;
        IdAllocator {
            bits,
            next: 1,
            used: 1,
            map,
        }
    }

    /// The identifier width.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    fn capacity(&self) -> u32 {
        1 << self.bits
    }

    /// How many identifiers are allocated (including the reserved 0).
    pub fn in_use(&self) -> u32 {
        self.used
    }

    /// Whether `id` is allocated (0, reserved, always is); `false` beyond the allocator's width.
    pub fn is_allocated(&self, id: u16) -> bool {
        u32::from(id) < self.capacity() && self.is_set(u32::from(id))
    }

    fn is_set(&self, id: u32) -> bool {
        self.map[(id / 64) as usize] & (1 << (id % 64)) != 0
    }

    fn flip(&mut self, id: u32) {
        self.map[(id / 64) as usize] ^= 1 << (id % 64);
    }

    /// Allocates a free identifier.
    ///
    /// # Errors
    /// [`IdError::Exhausted`] when none is left.
    pub fn allocate(&mut self) -> Result<u16, IdError> {
        if self.used >= self.capacity() {
            return Err(IdError::Exhausted { bits: self.bits });
        }
        let mut id = self.next;
        loop {
            if id >= self.capacity() {
                id = 1;
            }
            let word = self.map[(id / 64) as usize];
            if word == u64::MAX {
                id = (id / 64 + 1) * 64;
                continue;
            }
            if !self.is_set(id) {
                break;
            }
            id += 1;
        }
        self.flip(id);
        self.used += 1;
        self.next = id + 1;
        Ok(id as u16)
    }

    /// Marks a specific identifier allocated (used when adopting live configurations).
    ///
    /// # Errors
    /// [`IdError::OutOfRange`] for an identifier wider than the allocator, [`IdError::WrongState`] when it is
    /// already allocated; nothing changes then.
    pub fn claim(&mut self, id: u16) -> Result<(), IdError> {
        let i = u32::from(id);
        if i >= self.capacity() {
            return Err(IdError::OutOfRange { id, bits: self.bits });
        }
        if self.is_set(i) {
            return Err(IdError::WrongState { id, allocated: true });
        }
        self.flip(i);
        self.used += 1;
        Ok(())
    }

    /// Frees an identifier.
    ///
    /// # Errors
    /// [`IdError::OutOfRange`], or [`IdError::WrongState`] for 0 or an identifier that is not allocated; nothing
    /// changes then.
    pub fn free(&mut self, id: u16) -> Result<(), IdError> {
        let i = u32::from(id);
        if i >= self.capacity() {
            return Err(IdError::OutOfRange { id, bits: self.bits });
        }
        if i == 0 || !self.is_set(i) {
            return Err(IdError::WrongState { id, allocated: false });
        }
        self.flip(i);
        self.used -= 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn eight_bit_allocator_hands_out_255_then_refuses() {
        let mut a = IdAllocator::new(8);
        let mut seen = BTreeSet::new();
        for _ in 0..255 {
            let id = a.allocate().unwrap();
            assert!(id != 0 && id < 256);
            assert!(seen.insert(id), "{id} twice");
        }
        assert_eq!(a.allocate(), Err(IdError::Exhausted { bits: 8 }));
        a.free(77).unwrap();
        assert_eq!(a.allocate(), Ok(77));
    }

    /// A restore checks recorded IDs with this: 0 (reserved) always counts as taken, so a record naming it is
    /// refused before anything changes.
    #[test]
    fn zero_is_always_allocated_and_ids_beyond_the_width_never() {
        let mut a = IdAllocator::new(8);
        assert!(a.is_allocated(0));
        assert!(!a.is_allocated(1) && !a.is_allocated(256));
        a.claim(1).unwrap();
        assert!(a.is_allocated(1));
        a.free(1).unwrap();
        assert!(!a.is_allocated(1));
    }

    #[test]
    fn sixteen_bit_allocator_is_full_at_65535() {
        let mut a = IdAllocator::new(16);
        for _ in 0..65535 {
            a.allocate().unwrap();
        }
        assert_eq!(a.allocate(), Err(IdError::Exhausted { bits: 16 }));
        assert_eq!(a.in_use(), 65536);
    }

    #[test]
    fn errors_change_nothing() {
        let mut a = IdAllocator::new(8);
        assert_eq!(
            a.free(0),
            Err(IdError::WrongState {
                id: 0,
                allocated: false
            })
        );
        assert_eq!(
            a.free(5),
            Err(IdError::WrongState {
                id: 5,
                allocated: false
            })
        );
        assert_eq!(a.claim(300), Err(IdError::OutOfRange { id: 300, bits: 8 }));
        a.claim(5).unwrap();
        assert_eq!(a.claim(5), Err(IdError::WrongState { id: 5, allocated: true }));
        assert_eq!(a.in_use(), 2);
        // Next-fit: 5 is skipped.
        let got: std::vec::Vec<u16> = (0..5).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(got, [1, 2, 3, 4, 6]);
    }

    proptest::proptest! {
        #[test]
        fn matches_a_set_model(ops in proptest::collection::vec((proptest::bool::ANY, 0u16..32), 1..300)) {
            let mut a = IdAllocator::new(5);
            let mut model = BTreeSet::new();
            for (alloc, id) in ops {
                if alloc {
                    match a.allocate() {
                        Ok(got) => { proptest::prop_assert!(got != 0 && got < 32); proptest::prop_assert!(model.insert(got)); }
                        Err(e) => { proptest::prop_assert_eq!(model.len(), 31); proptest::prop_assert_eq!(e, IdError::Exhausted { bits: 5 }); }
                    }
                } else {
                    let r = a.free(id);
                    proptest::prop_assert_eq!(r.is_ok(), model.remove(&id));
                }
                proptest::prop_assert_eq!(a.in_use() as usize, model.len() + 1);
            }
        }
    }
}
