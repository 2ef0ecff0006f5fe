//! The fake SMMU the crate's tests drive ([`crate::testing::FakeSmmu`], public under the `testing` feature),
//! under the names the tests use, and helpers over it.
extern crate std;

use std::vec::Vec;

pub(crate) use crate::testing::QEMU_IDRS as IDRS;
pub(crate) use crate::testing::fake_internals::reg32;
pub(crate) use crate::testing::{FakeSmmu as Model, HeapFrames, Issued};

/// An STE install: CFGI_STE of `sid` alone, each followed by its CMD_SYNC.
pub(crate) fn assert_ste_steps(issued: &[Issued], sid: u32) {
    assert!(!issued.is_empty() && issued.len().is_multiple_of(2), "{issued:?}");
    for pair in issued.chunks(2) {
        assert_eq!(pair, [Issued::Ste { sid }, Issued::Sync], "{issued:?}");
    }
}

/// The commands the model consumed from index `from` on, decoded.
pub(crate) fn issued_since(model: &Model, from: usize) -> Vec<Issued> {
    model.issued_since(from)
}

/// A host allocator that lives for the rest of the test run.
pub(crate) fn frames() -> &'static HeapFrames {
    HeapFrames::leaked()
}
