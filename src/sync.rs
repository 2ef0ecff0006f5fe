//! The atomics the lock-free protocols use: `core::sync::atomic` in the driver, loom's under `cfg(loom)` so that a
//! loom model explores every interleaving and every weak-memory outcome of the code the driver runs.
//!
//! Only the protocols that loom checks import from here (the page tables' concurrent map, unmap and trim, whose
//! table entries a loom model allocates as loom atomics; the command queue's reservation and completion).
//! Anything else stays on `core` atomics.

// Each protocol uses some of these; the set is shared so that every branch adds the same file.
#![allow(unused_imports)]

#[cfg(all(loom, test))]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};

#[cfg(not(all(loom, test)))]
pub(crate) use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
