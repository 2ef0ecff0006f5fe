//! The atomics the lock-free protocols use: `core::sync::atomic` in the driver, loom's under `cfg(loom)` so that a
//! loom model explores every interleaving and every weak-memory outcome of the code the driver runs.
//!
//! Only the protocols that loom checks import from here (the page tables' concurrent map, unmap and trim, whose
//! table entries a loom model allocates as loom atomics; the command queue's reservation, publication, completion,
//! recovery lock and fault log, whose DMA block a loom model replaces with its own storage). Anything else stays on
//! `core` atomics.
//!
//! [`Mutex`] is the same for the short locks a loom model must see: `spin::Mutex` in the driver, loom's mutex in a
//! model (a model's threads would spin forever on a lock loom cannot see being let go). The domain table's fault
//! reports use it.

// Each protocol uses some of these.
#![allow(unused_imports)]

#[cfg(all(loom, test))]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};

#[cfg(not(all(loom, test)))]
pub(crate) use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};

/// The body of a busy-wait loop: a spin hint to the CPU on the target (one CPU per waiter, nothing else to run);
/// on a host build (tests, benchmarks) a yield, as a host runs more threads than it has cores and a waiter must not
/// keep the thread it waits for off the processor; under loom a yield that lets the model run the thread being
/// waited for (a loom spin without one never ends).
#[inline]
pub(crate) fn spin_loop() {
    #[cfg(all(loom, test))]
    loom::thread::yield_now();
    #[cfg(all(not(all(loom, test)), not(target_arch = "aarch64"), any(test, feature = "std")))]
    std::thread::yield_now();
    #[cfg(all(not(all(loom, test)), any(target_arch = "aarch64", not(any(test, feature = "std")))))]
    core::hint::spin_loop();
}

#[cfg(all(not(all(loom, test)), not(target_arch = "aarch64"), any(test, feature = "std")))]
extern crate std;

/// A point where a CPU may be delayed (an interrupt, a slow store) between two steps of a protocol: nothing in the
/// driver; under loom a yield, so that a model with a preemption bound of 0 still runs other threads here.
#[inline]
pub(crate) fn delay_point() {
    #[cfg(all(loom, test))]
    loom::thread::yield_now();
}

#[cfg(not(all(loom, test)))]
pub(crate) use spin::{Mutex, MutexGuard};

#[cfg(all(loom, test))]
pub(crate) use loom_mutex::{Mutex, MutexGuard};

/// `spin::Mutex`'s interface over loom's mutex.
#[cfg(all(loom, test))]
mod loom_mutex {
    pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Mutex(loom::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap()
        }

        pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            self.0.try_lock().ok()
        }
    }
}
