//! loom models of the shared ASID/VMID allocator ([`AtomicIdAllocator`]): `RUSTFLAGS="--cfg loom" cargo test
//! --release -p smmuv3 --lib ids::loom`. Tiny allocators (2-bit: identifiers 1..=3) so that every interleaving of
//! the reservation, the bit scan and the frees is explored.

extern crate std;

use std::sync::Arc;

use loom::thread;

use super::{AtomicIdAllocator, IdError};

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

/// Two CPUs allocate at once: two different identifiers, both marked, the count right.
#[test]
fn loom_two_allocations_get_different_ids() {
    model(|| {
        let ids = Arc::new(AtomicIdAllocator::new(2));
        let other = Arc::clone(&ids);
        let t = thread::spawn(move || other.allocate().unwrap());
        let mine = ids.allocate().unwrap();
        let theirs = t.join().unwrap();
        assert_ne!(mine, theirs);
        assert!(ids.is_allocated(mine) && ids.is_allocated(theirs));
        assert_eq!(ids.in_use(), 3);
    });
}

/// One identifier left and two CPUs want it: exactly one gets it, the other is told the allocator is exhausted,
/// never given a taken identifier.
#[test]
fn loom_the_last_id_goes_to_one_cpu() {
    model(|| {
        let ids = Arc::new(AtomicIdAllocator::new(2));
        ids.claim(1).unwrap();
        ids.claim(2).unwrap();
        let other = Arc::clone(&ids);
        let t = thread::spawn(move || other.allocate());
        let mine = ids.allocate();
        let theirs = t.join().unwrap();
        match (mine, theirs) {
            (Ok(3), Err(IdError::Exhausted { bits: 2 })) | (Err(IdError::Exhausted { bits: 2 }), Ok(3)) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(ids.in_use(), 4);
    });
}

/// A free races an allocation on a full allocator: the allocation either sees the freed identifier (and gets it)
/// or finds the allocator full, never a taken one.
#[test]
fn loom_free_races_allocate() {
    model(|| {
        let ids = Arc::new(AtomicIdAllocator::new(2));
        for id in 1..=3 {
            ids.claim(id).unwrap();
        }
        let a = Arc::clone(&ids);
        let freer = thread::spawn(move || a.free(2).unwrap());
        let got = ids.allocate();
        freer.join().unwrap();
        match got {
            Ok(id) => {
                assert_eq!(id, 2);
                assert!(ids.is_allocated(2));
                assert_eq!(ids.in_use(), 4);
            }
            Err(IdError::Exhausted { .. }) => {
                assert!(!ids.is_allocated(2));
                assert_eq!(ids.in_use(), 3);
            }
            Err(e) => panic!("{e}"),
        }
    });
}

/// Two CPUs free one identifier: one free succeeds, the other is refused, the count goes down once.
#[test]
fn loom_a_double_free_is_refused_once() {
    model(|| {
        let ids = Arc::new(AtomicIdAllocator::new(2));
        ids.claim(2).unwrap();
        let a = Arc::clone(&ids);
        let t = thread::spawn(move || a.free(2).is_ok());
        let mine = ids.free(2).is_ok();
        let theirs = t.join().unwrap();
        assert!(mine != theirs);
        assert_eq!(ids.in_use(), 1);
    });
}
