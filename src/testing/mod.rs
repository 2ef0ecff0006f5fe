//! Test doubles for a hypervisor's own tests on the host (feature `testing`, which needs `std`): a fake SMMU
//! ([`FakeSmmu`]) that the driver initialises and drives as it does real hardware, recording every command it
//! consumes, and a [`FrameAllocator`](crate::FrameAllocator) over the host heap ([`HeapFrames`]) that punishes the mistakes it stands for.
//!
//! What [`FakeSmmu`] models: the register file a driver programs (ID registers as QEMU's nested SMMUv3 reports
//! them, or others a test gives; CR0/CR0ACK, GBPA, IRQ_CTRL/IRQ_CTRLACK and GERROR/GERRORN acknowledgements), and
//! the command queue, consumed on a thread of its own as a real SMMU would (CONS advanced, each command recorded
//! whole, [`Issued`] decoding what it invalidates; an opcode can be made illegal to provoke CERROR_ILL). What it
//! does not model: translation (no DMA goes through it, so it never walks a stream table, CD or page table), the
//! event queue's producer (no event is ever written), MSIs, ATS and PRI, and timing. So it answers "which
//! commands did my code make the driver issue" and "does my code handle the driver's errors"; whether a device's
//! DMA lands is for the emulated or real hardware (this crate's QEMU tests).
//!
//! [`HeapFrames`]: physical addresses differ from CPU addresses by a large offset (so code that treats one as the
//! other breaks), alignment is checked, freed blocks are poisoned, and double or foreign frees panic.

pub use crate::host_frames::HeapFrames;

mod fake;
#[cfg(test)]
pub(crate) use fake::Seen;
pub use fake::{FakeSmmu, Issued, QEMU_IDRS};
/// What the crate's own tests reach inside the fake.
#[cfg(test)]
pub(crate) mod fake_internals {
    pub(crate) use super::fake::reg32;
}
