//! A `no_std` driver for the Arm System MMU v3 (Arm IHI 0070), for hypervisor firmware running at EL2.
//!
//! The driver never hard-codes an address: a board hands it an [`SmmuDescription`] (from its device tree or its
//! own constants) and it finds everything else in the SMMU's ID registers.
#![no_std]

pub mod board;
pub mod ctx;
pub mod deadline;
pub mod domain;
mod errors;
pub mod handover;
pub mod hitless;
pub mod hw;
pub mod ids;
pub mod mem;
pub mod pgtable;
pub mod protected;
pub mod queue;
pub mod smmu;
pub mod stream;
mod sync;
mod table;
#[cfg(test)]
pub(crate) mod testing;

pub use board::{IommuMap, SmmuDescription, SmmuInterrupts};
pub use domain::{
    DomainError, DomainId, DomainKind, DomainMemory, Fault, FaultReport, GuestContext, GuestInvalidation, GuestStage1,
    Iommu, LowLevel, Stage1Options, Stage2Options,
};
pub use mem::{DmaBlock, FrameAllocator, PhysAddr};
pub use pgtable::Prot;
/// The ID registers decoded (kept at the crate root, where it was before the SMMU core had a folder).
pub use smmu::features;
pub use smmu::{
    Bookkeeping, Features, IdRegisters, InitError, InitOptions, InterruptSources, ProbeError, Quirks, Smmu, Stages,
};
