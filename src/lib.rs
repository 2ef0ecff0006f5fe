//! A `no_std` driver for the Arm System MMU v3 (Arm IHI 0070), for hypervisor firmware running at EL2.
//!
//! The driver never hard-codes an address: a board hands it an [`SmmuDescription`] (from its device tree or its
//! own constants) and it finds everything else in the SMMU's ID registers.
#![no_std]

pub mod active;
pub mod board;
pub mod ctx;
pub mod deadline;
pub mod domain;
pub mod features;
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

pub use active::{ActiveSmmu, InitError, InitOptions, InterruptSources};
pub use board::{IommuMap, SmmuDescription, SmmuInterrupts};
pub use domain::{
    DomainError, DomainId, DomainKind, DomainMemory, Fault, FaultReport, GuestContext, GuestInvalidation, GuestStage1,
    Stage1Options, Stage2Options,
};
pub use features::{Features, IdRegisters, Quirks, Stages};
pub use mem::{DmaBlock, FrameAllocator, PhysAddr};
pub use pgtable::Prot;
pub use smmu::{ProbeError, Smmu};
