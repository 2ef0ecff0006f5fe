//! The value types a domain user names: what a domain translates with, how to build one, a guest's stage-1
//! part, a guest's invalidations, and where a domain's memory comes from.

use core::fmt;

use crate::hw::ste::{CdTableLayout, DefaultSubstream};
use crate::mem::FrameAllocator;

/// Where a domain's tables come from: a frame allocator that lives as long as the firmware.
pub type DomainMemory = &'static (dyn FrameAllocator + Sync);

/// What a domain translates with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DomainKind {
    /// Stage 1 only: a CD, an ASID, stage-1 tables.
    Stage1,
    /// Stage 2 only: a VMID and stage-2 tables.
    Stage2,
    /// A guest's stage 1 inside a stage-2 parent.
    Nested,
    /// No translation: every stream attached aborts.
    Blocked,
    /// No translation: every stream attached bypasses (reaches all memory); an explicit opt-in
    /// (`Iommu::create_bypass`, `unsafe`).
    Bypass,
    /// Given RAM ranges mapped 1:1 through a stage-1 or stage-2 table (everything else faults), fixed at creation.
    Identity,
}

impl fmt::Display for DomainKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DomainKind::Stage1 => "stage 1",
            DomainKind::Stage2 => "stage 2",
            DomainKind::Nested => "nested",
            DomainKind::Blocked => "blocked",
            DomainKind::Bypass => "bypass",
            DomainKind::Identity => "identity",
        })
    }
}

/// How to build a stage-1 domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stage1Options {
    /// Input (IOVA) bits: 25..=48.
    pub input_bits: u8,
    /// The EL2 translation regime (STE.STRW = EL2) instead of NS-EL1; needs IDR0.HYP. One EL2 domain is in use
    /// at a time (see the [module docs](crate::domain)).
    pub el2: bool,
}

impl Default for Stage1Options {
    fn default() -> Self {
        Stage1Options {
            input_bits: 48,
            el2: false,
        }
    }
}

/// How to build a stage-2 domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stage2Options {
    /// Input (IPA) bits: 32..=the SMMU's output size (at most 48). A level-1 root of up to 16 concatenated tables
    /// is used where it saves a level.
    pub input_bits: u8,
}

/// The stage-1 part of a nested domain: the guest's CD table, at an IPA the parent's stage 2 translates, and the
/// STE's stage-1 fields the guest chose (as iommufd's nested HWPT carries them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestStage1 {
    /// IPA of the guest's CD table (S1ContextPtr), 64-byte aligned.
    pub cd_table: u64,
    /// S1CDMax: log2 of the CDs in it (0: one CD).
    pub cd_max_log2: u8,
    /// S1Fmt.
    pub layout: CdTableLayout,
    /// S1DSS.
    pub default_substream: DefaultSubstream,
}

/// A guest's stage-1 invalidation, issued for a nested domain under its parent's VMID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestInvalidation {
    /// One address of one guest ASID (TLBI_NH_VA).
    Address {
        /// Guest ASID.
        asid: u16,
        /// VA, granule-aligned.
        address: u64,
        /// Last-level entries only.
        leaf: bool,
    },
    /// One guest ASID (TLBI_NH_ASID).
    Asid(u16),
    /// Every stage-1 entry under the parent's VMID (TLBI_NH_ALL).
    All,
    /// A CD of the guest's CD table, for every stream attached to the domain (CFGI_CD).
    Cd {
        /// SubstreamID: an index of the guest's CD table (below 2^S1CDMax).
        ssid: u32,
        /// Leaf = 1: only the CD. With a two-level guest CD table, Leaf = 0 also drops the cached level-1
        /// descriptor that leads to it (after the guest changed that descriptor).
        leaf: bool,
    },
    /// Every CD cached from the guest's CD table (both levels), for every stream attached to the domain
    /// (CFGI_CD_ALL): after the guest rewrote its table wholesale.
    CdAll,
}
