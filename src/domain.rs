//! Domains: the product surface. A hypervisor creates stage-1, stage-2 and nested domains, attaches streams (and,
//! for stage 1, substreams) to them, maps and unmaps, reads their faults and frees them, without encoding an STE, a
//! CD or a TLBI. A domain owns its page tables, its ASID or VMID and (for stage 1) the CD its streams use, and
//! issues every invalidation the architecture requires itself:
//!
//! | operation | what the domain issues |
//! |---|---|
//! | `map` | nothing: only invalid entries are filled, which no SMMU caches |
//! | `unmap`, `protect` | TLBI by range (RIL) or per granule, or the whole ASID/VMID, then one CMD_SYNC; a stage-2 parent of nested domains adds CMD_SYNC, TLBI_NH_ALL, CMD_SYNC; unlinked tables are freed only after |
//! | `unmap_deferred` | nothing (`sync_domain` issues what `unmap` would); a lazy trim past the limit gets its own TLBI + CMD_SYNC |
//! | `invalidate_domain` | TLBI_NH_ASID / TLBI_EL2_ALL / TLBI_S12_VMALL + CMD_SYNC |
//! | `attach` | the STE through the hitless writer (CFGI_STE + CMD_SYNC per step) |
//! | `attach_substream`, `detach_substream` | the CD, then CFGI_CD + CMD_SYNC |
//! | `detach` | the STE to abort (CFGI_STE + CMD_SYNC), CFGI_CD_ALL + CMD_SYNC before the stream's CD table is freed; the last detach from a domain drops its TLB entries |
//! | `free` | TLBI_NH_ASID / TLBI_EL2_ALL / TLBI_S12_VMALL / TLBI_NH_ALL + CMD_SYNC, then tables and IDs |
//!
//! **Storage.** The driver has no allocator, so domains live in a fixed-capacity table inside
//! [`ActiveSmmu`] (`D` slots, [`DEFAULT_DOMAINS`] unless [`Smmu::init_with_capacity`] says otherwise). A caller
//! holds a [`DomainId`]: a slot index and the slot's generation. Freeing a domain bumps its slot's generation, so
//! a stale handle is refused with [`DomainError::StaleDomain`], never a use-after-free. A handle never becomes
//! valid again: the generation is 64 bits wide (a slot freed once a nanosecond would take 584 years to exhaust
//! it), and a slot whose generation would wrap is retired, never handed out again. The table (rather than
//! caller-owned domain objects) is what lets the driver route a fault record to the domain its stream is attached
//! to, find every nested domain under a stage-2 parent when the parent changes, and (live update) enumerate what
//! to preserve.
//!
//! **Memory.** Each domain takes its page tables (and its streams' CD tables) from the [`DomainMemory`] given at
//! creation, so that a domain meant to survive a live update can take them from the handover pool and others from
//! ordinary memory.
//!
//! **Nested domains** follow iommufd's nested HWPT: the stage-2 part is a stage-2 domain the hypervisor owns (the
//! parent; several nested domains may share one and its VMID), the stage-1 part belongs to a guest, whose CD table
//! and stage-1 tables live in guest memory and are given as IPAs ([`GuestStage1`]).
//!
//! **EL2 stage-1 domains** ([`Stage1Options::el2`]: STE.STRW = EL2, without E2H) translate in a regime without
//! ASIDs, where every context's TLB entries match every other's (IHI 0070 §3.17). So at most one EL2 domain is *in
//! use*, i.e. has a stream or substream attached, at a time: any number may exist, but attaching another while one
//! is in use is refused with [`DomainError::El2DomainInUse`]. Its last detach drops every EL2 entry (TLBI_EL2_ALL +
//! CMD_SYNC) before the next one can be attached; when that invalidation failed, the next EL2 attach issues it
//! first. A stream's substreams use the stream's regime ([`DomainError::RegimeMismatch`]). An EL2 domain is
//! invalidated with the EL2 commands only: TLBI_EL2_VA (by range where IDR3.RIL) for unmap, protect and trim,
//! TLBI_EL2_ALL for the last detach and free, never TLBI_NH_*. It still holds an ASID, which its CD carries and
//! the EL2 regime does not tag entries with.

use core::fmt;

use crate::active::{ActiveSmmu, AttachError, GlobalError, InvalidationError, TlbContext, invalidate_gather};
use crate::ctx::{CdTable, CdTableError, CdTableFormat};
use crate::features::StallModel;
use crate::hw::cd::{self, Cd, CdConfig};
use crate::hw::command::Command;
use crate::hw::event::Event;
use crate::hw::ste::{self, CdTableLayout, DefaultSubstream, EntryError, Stage1Config, Stage2Config, StallRule, Ste};
use crate::ids::IdError;
use crate::mem::{FrameAllocator, PhysAddr};
use crate::pgtable::{Format, Gather, Granule, IoPageTable, MapError, Prot, Stage};
use crate::queue::cmdq::{Batch, CommandQueueError};
use crate::stream::StreamError;

#[allow(unused_imports)] // Named in the docs.
use crate::smmu::Smmu;

/// Domains an [`ActiveSmmu`] holds unless [`Smmu::init_with_capacity`] chooses another number.
pub const DEFAULT_DOMAINS: usize = 16;
/// Streams (and substreams) one domain may have attached at once.
pub const MAX_ATTACHMENTS: usize = 8;
/// Streams the SMMU may have attached to domains at once.
pub const MAX_ATTACHED_STREAMS: usize = 64;
/// Substreams (besides substream 0) one stream may have attached.
pub const MAX_SUBSTREAMS_PER_STREAM: usize = 7;
/// SubstreamID bits of the CD table a stream gets when attached to a stage-1 domain (capped by IDR1.SSIDSIZE).
pub const STREAM_SSID_BITS: u8 = 3;
/// Domains that can be preserved at once (the token index's capacity; a power of two).
pub const MAX_PRESERVED: usize = 32;
/// Faults a domain's report keeps (later ones are counted in [`FaultReport::lost`]).
pub const FAULT_REPORT_CAPACITY: usize = 8;

/// Where a domain's tables come from: a frame allocator that lives as long as the firmware.
pub type DomainMemory = &'static dyn FrameAllocator;

/// A handle to a domain: its slot and the slot's generation. Copyable; stale once the domain is freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DomainId {
    index: u16,
    generation: u64,
}

impl DomainId {
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

/// What a domain translates with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainKind {
    /// Stage 1 only: a CD, an ASID, stage-1 tables.
    Stage1,
    /// Stage 2 only: a VMID and stage-2 tables.
    Stage2,
    /// A guest's stage 1 inside a stage-2 parent.
    Nested,
}

impl fmt::Display for DomainKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DomainKind::Stage1 => "stage 1",
            DomainKind::Stage2 => "stage 2",
            DomainKind::Nested => "nested",
        })
    }
}

/// How to build a stage-1 domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stage1Options {
    /// Input (IOVA) bits: 25..=48.
    pub input_bits: u8,
    /// The EL2 translation regime (STE.STRW = EL2) instead of NS-EL1; needs IDR0.HYP. One EL2 domain is in use
    /// at a time (see the [module docs](self)).
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

/// One fault a domain's streams took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The event's architectural name (`F_TRANSLATION`, `F_PERMISSION`, ...).
    pub kind: &'static str,
    /// StreamID.
    pub stream: u32,
    /// SubstreamID, when the transaction had one.
    pub substream: Option<u32>,
    /// The input address (IOVA, or IPA for a stage-2-only stream), where the record has one.
    pub address: Option<u64>,
    /// The stage that faulted, for translation faults.
    pub stage: Option<FaultStage>,
    /// The IPA of a stage-2 fault (translation faults and TLB conflicts with S2 set): what the stage-2 table lacks
    /// or refused. For a nested domain's stage-1 walk that faulted at stage 2 this is the CD's or the stage-1
    /// descriptor's IPA (or the transaction's), where [`Fault::address`] is the guest's VA. `None` for stage 1,
    /// where the record leaves it UNKNOWN.
    pub ipa: Option<u64>,
    /// A write (false: a read), for translation faults.
    pub write: Option<bool>,
}

impl Fault {
    fn of(event: &Event) -> Option<Fault> {
        let t = event.translation_fault();
        Some(Fault {
            kind: event.name(),
            stream: event.stream_id()?,
            substream: event.substream_id(),
            address: event.address(),
            stage: t.map(|t| t.stage),
            ipa: event.ipa(),
            write: t.map(|t| !t.access.read),
        })
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} stream {:#x}", self.kind, self.stream)?;
        if let Some(ssid) = self.substream {
            write!(f, " substream {ssid:#x}")?;
        }
        if let Some(a) = self.address {
            write!(f, " at {a:#x}")?;
        }
        if let Some(ipa) = self.ipa {
            write!(f, " ipa {ipa:#x}")?;
        }
        if let Some(w) = self.write {
            f.write_str(if w { " write" } else { " read" })?;
        }
        Ok(())
    }
}

/// A bounded record of faults: the first [`FAULT_REPORT_CAPACITY`], and how many more were lost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultReport {
    /// The faults kept, oldest first.
    pub faults: heapless::Vec<Fault, FAULT_REPORT_CAPACITY>,
    /// Faults that did not fit.
    pub lost: u32,
}

impl FaultReport {
    fn push(&mut self, fault: Fault) {
        if self.faults.push(fault).is_err() {
            self.lost = self.lost.saturating_add(1);
        }
    }

    /// Faults seen in all (kept and lost), saturating at `u32::MAX` as [`FaultReport::lost`] does.
    pub fn total(&self) -> u32 {
        (self.faults.len() as u32).saturating_add(self.lost)
    }

    /// Faults of `kind` among those kept.
    pub fn count(&self, kind: &str) -> usize {
        self.faults.iter().filter(|f| f.kind == kind).count()
    }
}

/// Why a domain operation failed. Every operation that returns an error changed nothing, except where the
/// variant says otherwise (a failed invalidation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainError {
    /// The handle names a domain that was freed (or never existed).
    StaleDomain(DomainId),
    /// Every domain slot is in use.
    NoDomainSlot {
        /// The capacity.
        capacity: usize,
    },
    /// A fixed-capacity list is full.
    TooMany(&'static str),
    /// The operation needs another kind of domain.
    WrongKind {
        /// The domain.
        domain: DomainId,
        /// Its kind.
        kind: DomainKind,
        /// What the operation needs.
        wanted: &'static str,
    },
    /// The SMMU cannot do this (a stage it lacks, no substreams, a stall model the driver does not serve).
    Unsupported(&'static str),
    /// The stream cannot be reached (beyond the stream table).
    Stream(StreamError),
    /// The stream is attached to a domain already: detach it first.
    StreamInUse {
        /// StreamID.
        sid: u32,
        /// Where it is attached.
        domain: DomainId,
    },
    /// Another EL2 stage-1 domain is in use (has a stream or substream attached). The EL2 regime has no ASIDs,
    /// so every EL2 context's TLB entries match every other's (IHI 0070 §3.17): one EL2 domain is in use at a
    /// time. Detach the holder's streams first.
    El2DomainInUse {
        /// The EL2 domain being attached.
        domain: DomainId,
        /// The EL2 domain in use.
        holder: DomainId,
    },
    /// A substream must use its stream's translation regime (the STE's STRW): an EL2 domain on an NS-EL1 stream,
    /// or the reverse, would be walked and invalidated in the wrong regime.
    RegimeMismatch {
        /// StreamID.
        sid: u32,
        /// SubstreamID.
        ssid: u32,
        /// Whether the stream translates in the EL2 regime (else NS-EL1).
        stream_el2: bool,
    },
    /// The stream (or substream) is not attached.
    NotAttached {
        /// StreamID.
        sid: u32,
        /// SubstreamID, for a substream.
        ssid: Option<u32>,
    },
    /// The SubstreamID is 0 (the stream's own attachment) or beyond the stream's CD table.
    BadSubstream {
        /// SubstreamID.
        ssid: u32,
        /// SubstreamID bits of the stream's CD table.
        ssid_bits: u8,
    },
    /// The domain still has streams attached (`free`).
    StillAttached {
        /// The domain.
        domain: DomainId,
        /// How many attachments.
        attachments: usize,
    },
    /// The stage-2 domain is the parent of nested domains (`free`).
    HasNestedDomains {
        /// The domain.
        domain: DomainId,
        /// How many.
        children: u16,
    },
    /// A page-table operation refused (unaligned, out of the input range, overlapping, no memory, ...).
    Map(MapError),
    /// No ASID or VMID left.
    Id(IdError),
    /// An STE or CD could not be built.
    Entry(EntryError),
    /// A CD table could not be had or written.
    CdTable(CdTableError<CommandQueueError>),
    /// The STE could not be installed.
    Attach(AttachError),
    /// Another domain is preserved under this token.
    TokenInUse {
        /// The token.
        token: u64,
        /// The domain preserved under it.
        domain: DomainId,
    },
    /// The domain is preserved already, under another token.
    AlreadyPreserved {
        /// The domain.
        domain: DomainId,
        /// Its token.
        token: u64,
    },
    /// No domain is preserved under this token.
    UnknownToken(u64),
    /// The memory given is a handover arena another domain owns already (one domain per arena).
    MemoryOwned,
    /// The domain's memory would not survive a live update: create it with a handover arena.
    NotHandoverMemory(DomainId),
    /// A nested domain's stage-2 parent must be preserved first.
    ParentNotPreserved {
        /// The nested domain.
        domain: DomainId,
        /// Its parent.
        parent: DomainId,
    },
    /// A preserved parent cannot be unpreserved while nested domains under it are preserved.
    NestedStillPreserved {
        /// The parent's token.
        token: u64,
    },
    /// A hand-off is prepared with the domain recorded (its memory sealed): the record must stay what the next
    /// image restores, so the domain is frozen (no map, unmap, protect, trim, attach or detach, no unpreserve)
    /// until `cancel_handover`, or the hand-off.
    HandoverPrepared {
        /// The token.
        token: u64,
    },
    /// The memory given is sealed by a prepared hand-off (the SMMU's own arena, or a preserved domain's): it hands
    /// out nothing until `cancel_handover`, or the hand-off.
    MemorySealed,
    /// A hand-off with the SMMU left running is prepared (records of `generation`): the stream configuration is
    /// frozen, so no stream may start translating (through any domain) until `cancel_handover`, or the hand-off.
    /// The next image takes over exactly the streams `prepare_handover` checked. Detaching (the stream then
    /// aborts) stays allowed. Nothing changed.
    StreamsFrozen {
        /// The prepared records' generation.
        generation: u64,
    },
    /// The gather was filled by another domain's unmap (or directly from another page table): refused, nothing
    /// issued, nothing freed, the gather left as it was.
    ForeignGather {
        /// The domain it was handed to.
        domain: DomainId,
    },
    /// The range overlaps what a deferred unmap of this domain removed and no `sync_domain` has invalidated yet:
    /// the SMMU may still use the old translations there (its TLB, or a walk cache naming an unlinked table
    /// whose leaves still hold the old output addresses). Sync the pending gathers, or call
    /// `invalidate_domain`, first. Nothing changed.
    PendingInvalidation {
        /// The first address of the range inside the pending span.
        iova: u64,
        /// The pending span: the union of the spans of the domain's unsynced deferred unmaps.
        start: u64,
        /// One past its end.
        end: u64,
    },
    /// The domain is preserved: unpreserve it before freeing it.
    Preserved {
        /// The domain.
        domain: DomainId,
        /// Its token.
        token: u64,
    },
    /// An invalidation failed. The change it covered is made (the tables or entries are written) but may not be
    /// in force; for unmap and protect the unlinked tables are kept and flushed again by the domain's next
    /// operation.
    Invalidation(InvalidationError),
    /// The output range of a map shares a byte with memory declared protected (`ActiveSmmu::protect_memory`:
    /// the handover region, the driver's tables and queues): no device may be given it.
    ProtectedOutput {
        /// The output address asked for.
        pa: u64,
        /// The size asked for.
        size: u64,
        /// The protected extent it reaches.
        protected: crate::mem::Extent,
    },
}

impl fmt::Display for DomainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainError::StaleDomain(d) => write!(f, "{d} was freed (stale handle)"),
            DomainError::NoDomainSlot { capacity } => write!(f, "all {capacity} domain slots are in use"),
            DomainError::TooMany(what) => write!(f, "too many {what}"),
            DomainError::WrongKind { domain, kind, wanted } => {
                write!(f, "{domain} is a {kind} domain; this needs {wanted}")
            }
            DomainError::Unsupported(what) => write!(f, "the SMMU cannot do this: {what}"),
            DomainError::Stream(e) => write!(f, "{e}"),
            DomainError::StreamInUse { sid, domain } => {
                write!(f, "stream {sid:#x} is attached to {domain}: detach it first")
            }
            DomainError::El2DomainInUse { domain, holder } => write!(
                f,
                "{holder} is the EL2 stage-1 domain in use (EL2 has no ASIDs: one EL2 domain at a time); detach it \
                 before attaching {domain}"
            ),
            DomainError::RegimeMismatch { sid, ssid, stream_el2 } => {
                let (stream, other) = if *stream_el2 {
                    ("EL2", "NS-EL1")
                } else {
                    ("NS-EL1", "EL2")
                };
                write!(
                    f,
                    "stream {sid:#x} translates in the {stream} regime: its substream {ssid:#x} cannot take an \
                     {other} domain"
                )
            }
            DomainError::NotAttached { sid, ssid: None } => write!(f, "stream {sid:#x} is not attached"),
            DomainError::NotAttached { sid, ssid: Some(ssid) } => {
                write!(f, "substream {ssid:#x} of stream {sid:#x} is not attached")
            }
            DomainError::BadSubstream { ssid, ssid_bits } => write!(
                f,
                "SubstreamID {ssid:#x} is 0 or beyond the stream's {ssid_bits}-bit CD table"
            ),
            DomainError::StillAttached { domain, attachments } => {
                write!(f, "{domain} still has {attachments} attachment(s): detach them first")
            }
            DomainError::HasNestedDomains { domain, children } => {
                write!(
                    f,
                    "{domain} is the stage-2 parent of {children} nested domain(s): free them first"
                )
            }
            DomainError::Map(e) => write!(f, "{e}"),
            DomainError::Id(e) => write!(f, "{e}"),
            DomainError::Entry(e) => write!(f, "{e}"),
            DomainError::CdTable(e) => write!(f, "{e}"),
            DomainError::Attach(e) => write!(f, "{e}"),
            DomainError::Invalidation(e) => write!(f, "invalidation failed: {e}"),
            DomainError::ForeignGather { domain } => write!(f, "the gather handed to {domain} is another's"),
            DomainError::PendingInvalidation { iova, start, end } => write!(
                f,
                "{iova:#x} lies in {start:#x}..{end:#x}, which a deferred unmap removed and no sync has invalidated yet"
            ),
            DomainError::TokenInUse { token, domain } => write!(f, "token {token:#x} is in use by {domain}"),
            DomainError::AlreadyPreserved { domain, token } => {
                write!(f, "{domain} is preserved already, under token {token:#x}")
            }
            DomainError::UnknownToken(token) => write!(f, "no domain is preserved under token {token:#x}"),
            DomainError::MemoryOwned => {
                f.write_str("that handover arena belongs to another domain: take one per domain")
            }
            DomainError::NotHandoverMemory(d) => write!(
                f,
                "{d} takes its tables from memory that does not survive a live update: create it with a handover arena"
            ),
            DomainError::ParentNotPreserved { domain, parent } => {
                write!(f, "{domain}'s stage-2 parent {parent} must be preserved first")
            }
            DomainError::NestedStillPreserved { token } => write!(
                f,
                "nested domains under the parent preserved as {token:#x} are preserved: unpreserve them first"
            ),
            DomainError::HandoverPrepared { token } => write!(
                f,
                "the hand-off is prepared with the domain of token {token:#x} recorded: cancel it before changing \
                 or unpreserving that domain"
            ),
            DomainError::MemorySealed => f.write_str(
                "that memory is sealed by a prepared hand-off: it hands out nothing until the hand-off is cancelled",
            ),
            DomainError::StreamsFrozen { generation } => write!(
                f,
                "a hand-off with the SMMU running is prepared (generation {generation}): no stream may start \
                 translating until it is cancelled"
            ),
            DomainError::Preserved { domain, token } => {
                write!(
                    f,
                    "{domain} is preserved under token {token:#x}: unpreserve it before freeing it"
                )
            }
            DomainError::ProtectedOutput { pa, size, protected } => write!(
                f,
                "output {pa:#x}+{size:#x} reaches protected memory {:#x}+{:#x} (the handover region or the \
                 driver's own tables and queues): no device may be given it",
                protected.base, protected.len
            ),
        }
    }
}

impl From<MapError> for DomainError {
    fn from(e: MapError) -> Self {
        DomainError::Map(e)
    }
}

impl From<CommandQueueError> for DomainError {
    fn from(e: CommandQueueError) -> Self {
        DomainError::Invalidation(InvalidationError::Queue(e))
    }
}

/// The translation a domain owns.
pub(crate) enum Translation {
    Stage1 {
        table: IoPageTable<DomainMemory>,
        asid: u16,
        cd: Cd,
        el2: bool,
    },
    Stage2 {
        table: IoPageTable<DomainMemory>,
        vmid: u16,
        config: Stage2Config,
        children: u16,
    },
    Nested {
        parent: DomainId,
        guest: GuestStage1,
    },
}

/// One live domain.
pub(crate) struct DomainState {
    pub(crate) translation: Translation,
    pub(crate) memory: DomainMemory,
    /// (StreamID, SubstreamID) pairs attached; SubstreamID 0 for the whole stream.
    pub(crate) attachments: heapless::Vec<(u32, u32), MAX_ATTACHMENTS>,
    pub(crate) faults: FaultReport,
    /// A gather whose invalidation failed: flushed again before the next operation.
    pub(crate) unflushed: Option<Gather>,
    /// The deferred unmaps whose gathers are not synced yet: `map` refuses their span.
    pub(crate) pending: PendingUnmaps,
    /// The token the domain is preserved under.
    pub(crate) token: Option<u64>,
}

impl DomainState {
    pub(crate) fn new(translation: Translation, memory: DomainMemory) -> Self {
        DomainState {
            translation,
            memory,
            attachments: heapless::Vec::new(),
            faults: FaultReport::default(),
            unflushed: None,
            pending: PendingUnmaps::NONE,
            token: None,
        }
    }

    /// Whether this is a stage-1 domain of the EL2 regime.
    pub(crate) fn is_el2(&self) -> bool {
        matches!(self.translation, Translation::Stage1 { el2: true, .. })
    }

    fn kind(&self) -> DomainKind {
        match self.translation {
            Translation::Stage1 { .. } => DomainKind::Stage1,
            Translation::Stage2 { .. } => DomainKind::Stage2,
            Translation::Nested { .. } => DomainKind::Nested,
        }
    }
}

/// What a domain's deferred unmaps left for `sync_domain`: how many gathers are outstanding and the union of their
/// spans. A union cannot lose one gather's part, so the span is cleared only when the last outstanding gather is
/// synced, or by `invalidate_domain`, which covers them all and starts a new epoch (a gather counted in an older
/// epoch is no longer counted when it is synced).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PendingUnmaps {
    /// Gathers counted in this epoch and not synced yet.
    gathers: u32,
    /// The union of their spans; `start == end` when there is none.
    start: u64,
    end: u64,
    /// The epoch, from 1 (a gather's ticket 0 means "not counted").
    epoch: u64,
}

impl PendingUnmaps {
    const NONE: PendingUnmaps = PendingUnmaps {
        gathers: 0,
        start: 0,
        end: 0,
        epoch: 1,
    };

    /// `gather` was just filled by a deferred unmap: counted once per epoch, its span added.
    fn add(&mut self, gather: &mut Gather) {
        if gather.is_empty() {
            return;
        }
        if gather.ticket != self.epoch {
            (gather.ticket, gather.counted) = (self.epoch, 1);
            self.gathers += 1;
        }
        let (start, end) = (gather.start(), gather.end());
        if self.start == self.end {
            (self.start, self.end) = (start, end);
        } else if start != end {
            (self.start, self.end) = (self.start.min(start), self.end.max(end));
        }
    }

    /// `gather` is being synced: the span is cleared with the last gather counted in this epoch (a gather others
    /// were merged into stands for them all).
    fn remove(&mut self, gather: &Gather) {
        if gather.is_empty() || gather.ticket != self.epoch {
            return;
        }
        self.gathers = self.gathers.saturating_sub(gather.counted);
        if self.gathers == 0 {
            (self.start, self.end) = (0, 0);
        }
    }

    /// Whether a deferred unmap of the domain waits for its sync (or a whole-domain invalidation).
    pub(crate) fn outstanding(&self) -> bool {
        self.gathers > 0
    }

    /// A whole-domain invalidation covered every outstanding gather.
    fn clear(&mut self) {
        *self = PendingUnmaps {
            epoch: self.epoch.wrapping_add(1).max(1),
            ..PendingUnmaps::NONE
        };
    }

    /// Refuses `[iova, iova + size)` where it overlaps the pending span.
    #[inline]
    fn check(&self, iova: u64, size: u64) -> Result<(), DomainError> {
        if iova < self.end && self.start < iova.saturating_add(size) {
            return Err(DomainError::PendingInvalidation {
                iova: iova.max(self.start),
                start: self.start,
                end: self.end,
            });
        }
        Ok(())
    }
}

/// A slot of the domain table.
pub(crate) struct Slot {
    generation: u64,
    pub(crate) state: Option<DomainState>,
}

/// A stream attached to a domain.
pub(crate) struct StreamRecord {
    pub(crate) sid: u32,
    pub(crate) domain: DomainId,
    /// The stream's CD table (stage-1 domains): CD 0 is the domain's, others are substreams'.
    pub(crate) cd_table: Option<CdTable>,
    pub(crate) substreams: heapless::Vec<(u32, DomainId), MAX_SUBSTREAMS_PER_STREAM>,
}

/// A prepared hand-off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Prepared {
    /// The records' generation.
    pub(crate) generation: u64,
    /// The SMMU is left running across it (its own structures are in a handover arena): the stream configuration
    /// is frozen until it is cancelled.
    pub(crate) running: bool,
}

/// The driver's domain bookkeeping: the slots, the attached streams, and the faults of unattached streams.
pub(crate) struct Domains<const D: usize> {
    pub(crate) slots: [Slot; D],
    /// The free slots, as a stack: creating and freeing a domain costs the same however full the table is.
    free: heapless::Vec<u16, D>,
    pub(crate) streams: heapless::Vec<StreamRecord, MAX_ATTACHED_STREAMS>,
    pub(crate) unattached_faults: FaultReport,
    /// Preserved domains by token: collisions are found in O(1), never by a scan.
    pub(crate) tokens: heapless::index_map::FnvIndexMap<u64, DomainId, MAX_PRESERVED>,
    /// Domains a restore rebuilt, by token, until retrieved or freed by `finish_handover` (with their arena).
    pub(crate) restored: heapless::index_map::FnvIndexMap<
        u64,
        (DomainId, Option<&'static crate::handover::pool::HandoverArena>),
        MAX_PRESERVED,
    >,
    /// An EL2 stage-1 domain's last detach could not drop its TLB entries (TLBI_EL2_ALL failed): they may still be
    /// cached, and would match any EL2 context, so the next EL2 domain to be attached drops them first.
    pub(crate) el2_stale: bool,
    /// The hand-off `prepare_handover` (which takes `&self`) prepared, until `cancel_handover`: no domain can be
    /// preserved or unpreserved meanwhile (see `crate::handover`), and with the SMMU left running no stream may
    /// start translating or bypassing.
    pub(crate) prepared: spin::Mutex<Option<Prepared>>,
    /// The generation of the records a restore rebuilt, until `finish_handover` ends that hand-off.
    pub(crate) restored_generation: Option<u64>,
    /// Memory no mapping may reach (`ActiveSmmu::protect_memory`).
    pub(crate) protected: crate::protected::ProtectedMemory,
}

impl<const D: usize> Domains<D> {
    pub(crate) fn new() -> Self {
        Domains {
            slots: core::array::from_fn(|_| Slot {
                generation: 0,
                state: None,
            }),
            // Lowest index on top, so the first domain gets slot 0.
            free: (0..D as u16).rev().collect(),
            streams: heapless::Vec::new(),
            unattached_faults: FaultReport::default(),
            tokens: heapless::index_map::FnvIndexMap::new(),
            restored: heapless::index_map::FnvIndexMap::new(),
            el2_stale: false,
            prepared: spin::Mutex::new(None),
            restored_generation: None,
            protected: crate::protected::ProtectedMemory::new(),
        }
    }

    /// Whether a prepared hand-off records this SMMU's preserved domains now.
    pub(crate) fn handover_prepared(&self) -> bool {
        self.prepared.lock().is_some()
    }

    /// The generation of the prepared hand-off's records, if one is prepared.
    pub(crate) fn prepared_generation(&self) -> Option<u64> {
        self.prepared.lock().map(|p| p.generation)
    }

    /// The generation of a prepared hand-off with the SMMU left running: while there is one, no stream may start
    /// translating or bypassing (`DomainError::StreamsFrozen`, `AttachError::StreamsFrozen`).
    pub(crate) fn streams_frozen(&self) -> Option<u64> {
        self.prepared.lock().filter(|p| p.running).map(|p| p.generation)
    }

    pub(crate) fn get(&self, id: DomainId) -> Result<&DomainState, DomainError> {
        self.slots
            .get(usize::from(id.index))
            .filter(|s| s.generation == id.generation)
            .and_then(|s| s.state.as_ref())
            .ok_or(DomainError::StaleDomain(id))
    }

    pub(crate) fn get_mut(&mut self, id: DomainId) -> Result<&mut DomainState, DomainError> {
        self.slots
            .get_mut(usize::from(id.index))
            .filter(|s| s.generation == id.generation)
            .and_then(|s| s.state.as_mut())
            .ok_or(DomainError::StaleDomain(id))
    }

    /// Fails with [`DomainError::NoDomainSlot`] when no slot is free (checked before anything is allocated).
    pub(crate) fn check_free_slot(&self) -> Result<(), DomainError> {
        match self.free.is_empty() {
            false => Ok(()),
            true => Err(DomainError::NoDomainSlot { capacity: D }),
        }
    }

    /// Puts `state` in a free slot, which [`Domains::check_free_slot`] said there is (O(1)).
    pub(crate) fn insert(&mut self, state: DomainState) -> DomainId {
        let index = self
            .free
            .pop()
            .unwrap_or_else(|| unreachable!("checked by check_free_slot"));
        let slot = &mut self.slots[usize::from(index)];
        debug_assert!(slot.state.is_none());
        slot.state = Some(state);
        DomainId {
            index,
            generation: slot.generation,
        }
    }

    /// Forgets every domain, its page tables and the gathers it holds left where they are (never freed): for an
    /// SMMU that may still walk them (see `ActiveSmmu`'s drop).
    pub(crate) fn abandon_tables(&mut self) {
        for slot in &mut self.slots {
            if let Some(state) = slot.state.take() {
                core::mem::forget(state);
            }
        }
    }

    /// Slots free now.
    pub(crate) fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Empties `id`'s slot, makes every handle to it stale and puts the slot back on the free stack (O(1)), unless
    /// its generation is the last one: the slot is retired then.
    pub(crate) fn remove(&mut self, id: DomainId) -> Option<DomainState> {
        let slot = self
            .slots
            .get_mut(usize::from(id.index))
            .filter(|s| s.generation == id.generation)?;
        let state = slot.state.take()?;
        // A generation is never handed out twice: a slot whose generation would wrap is retired (left off the
        // free stack for good), as unreachable as that is with 64 bits.
        if let Some(next) = slot.generation.checked_add(1) {
            slot.generation = next;
            // The slot was taken from the stack, so there is room for it.
            let _ = self.free.push(id.index);
        }
        Some(state)
    }

    pub(crate) fn stream(&self, sid: u32) -> Option<usize> {
        self.streams.iter().position(|r| r.sid == sid)
    }

    /// The EL2 stage-1 domain (other than `except`) that has a stream or substream attached, if any (one pass over
    /// the slots: for attach and restore, not a hot path).
    pub(crate) fn el2_in_use(&self, except: Option<DomainId>) -> Option<DomainId> {
        self.slots.iter().enumerate().find_map(|(index, slot)| {
            let state = slot.state.as_ref()?;
            let id = DomainId {
                index: index as u16,
                generation: slot.generation,
            };
            (Some(id) != except && state.is_el2() && !state.attachments.is_empty()).then_some(id)
        })
    }

    /// Whether a live stage-1 domain uses `asid` (one pass over the slots: for the raw ID calls, not a hot path).
    pub(crate) fn owns_asid(&self, asid: u16) -> bool {
        self.slots
            .iter()
            .filter_map(|s| s.state.as_ref())
            .any(|s| matches!(s.translation, Translation::Stage1 { asid: a, .. } if a == asid))
    }

    /// Whether a live stage-2 domain uses `vmid` (its nested domains share it).
    pub(crate) fn owns_vmid(&self, vmid: u16) -> bool {
        self.slots
            .iter()
            .filter_map(|s| s.state.as_ref())
            .any(|s| matches!(s.translation, Translation::Stage2 { vmid: v, .. } if v == vmid))
    }

    /// Files `event` in the report of the domain its (stream, substream) is attached to now, or the SMMU-wide one.
    fn file(&mut self, event: &Event) {
        match Fault::of(event) {
            Some(fault) => match self.route(fault.stream, fault.substream) {
                Some(id) => match self.get_mut(id) {
                    Ok(state) => state.faults.push(fault),
                    Err(_) => self.unattached_faults.push(fault),
                },
                None => self.unattached_faults.push(fault),
            },
            // Records without a StreamID (IMPLEMENTATION DEFINED ones) are only counted.
            None => self.unattached_faults.lost = self.unattached_faults.lost.saturating_add(1),
        }
    }

    /// The domain a fault of (sid, ssid) belongs to.
    fn route(&self, sid: u32, ssid: Option<u32>) -> Option<DomainId> {
        let record = &self.streams[self.stream(sid)?];
        match ssid {
            Some(ssid) if ssid != 0 => record
                .substreams
                .iter()
                .find(|(s, _)| *s == ssid)
                .map(|(_, d)| *d)
                .or(Some(record.domain)),
            _ => Some(record.domain),
        }
    }
}

/// A guest's stage-1 context as a guest's own driver builds it: a CD table with one CD for the guest's stage-1
/// table, in guest memory. For hypervisor firmware that plays the guest in tests (a real guest builds these itself,
/// and the hypervisor only learns [`GuestContext::stage1`]).
pub struct GuestContext {
    /// The CD table, at an IPA of guest memory.
    pub cd_table: CdTable,
    /// What the hypervisor passes to [`ActiveSmmu::create_nested`].
    pub stage1: GuestStage1,
}

impl GuestContext {
    /// Builds the context for `table` (a stage-1 table whose memory reports IPAs as its physical addresses) with
    /// the guest's `asid`, its CD table from `memory` (the same guest memory), walk attributes and output size
    /// as `features` require.
    ///
    /// # Errors
    /// [`DomainError::CdTable`] without memory, [`DomainError::Entry`] for a CD the SMMU would refuse (an ASID
    /// beyond its width, forced stalling).
    pub fn build<M: FrameAllocator>(
        features: &crate::features::Features,
        memory: &M,
        table: &IoPageTable<M>,
        asid: u16,
    ) -> Result<GuestContext, DomainError> {
        let cd = stage1_cd(features, asid, table).map_err(DomainError::Entry)?;
        let mut cd_table = CdTable::new(CdTableFormat::Linear { ssid_bits: 0 }, memory, features.coherent)
            .map_err(|e| DomainError::CdTable(e.widen()))?;
        // No STE points to it yet: nothing to invalidate.
        if let Err(e) = cd_table.write(0, &cd, memory, |_| Ok(())) {
            // SAFETY: never referenced by an STE.
            unsafe { cd_table.free(memory) };
            return Err(DomainError::CdTable(e));
        }
        let stage1 = GuestStage1 {
            cd_table: cd_table.base().0,
            cd_max_log2: 0,
            layout: CdTableLayout::Linear,
            default_substream: DefaultSubstream::Terminate,
        };
        Ok(GuestContext { cd_table, stage1 })
    }
}
/// The CD of a stage-1 context with `asid` and `table` (a domain's, or a guest context the driver builds): walks
/// with the SMMU's attributes, the driver's MAIR, faults recorded and aborted, never stalled.
fn stage1_cd<M: FrameAllocator>(
    features: &crate::features::Features,
    asid: u16,
    table: &IoPageTable<M>,
) -> Result<Cd, EntryError> {
    stage1_cd_of(features, asid, table.format(), table.root())
}

/// The CD of a stage-1 domain with `asid` whose table of `format` has its root at `root` (what a restore compares
/// an adopted CD with, before any table is adopted).
pub(crate) fn stage1_cd_of(
    features: &crate::features::Features,
    asid: u16,
    format: &Format,
    root: PhysAddr,
) -> Result<Cd, EntryError> {
    let (cacheability, shareability) = ste::walk_attributes(features.coherent);
    Cd::new(
        &CdConfig {
            asid,
            table: root,
            t0sz: 64 - format.input_bits,
            granule: cd_granule(format.granule),
            ips: size_encoding(format.output_bits),
            cacheability,
            shareability,
            mair: crate::pgtable::desc::MAIR,
            record_faults: true,
            abort_on_fault: true,
            stall: false,
            private_asid: true,
        },
        &features.entry_rules(),
    )
}

/// CD.TG0 for a table's granule.
fn cd_granule(granule: Granule) -> cd::Granule {
    match granule {
        Granule::Size4K => cd::Granule::Size4K,
        Granule::Size16K => cd::Granule::Size16K,
        Granule::Size64K => cd::Granule::Size64K,
    }
}

/// STE.S2PS / CD.IPS for an output size.
fn size_encoding(bits: u8) -> u8 {
    match bits {
        0..=32 => 0,
        33..=36 => 1,
        37..=40 => 2,
        41..=42 => 3,
        43..=44 => 4,
        45..=48 => 5,
        _ => 6,
    }
}

impl<A: FrameAllocator, const D: usize> ActiveSmmu<A, D> {
    fn walk_attributes(&self) -> (ste::Cacheability, ste::Shareability) {
        ste::walk_attributes(self.features().coherent)
    }

    fn output_bits(&self) -> u8 {
        self.features().oas_bits.min(48)
    }

    fn stalls_forced(&self) -> Result<(), DomainError> {
        match self.features().entry_rules().stall {
            StallRule::Forced => Err(DomainError::Unsupported(
                "stalling is forced (IDR0.STALL_MODEL = 0b10) and this driver does not resume stalled transactions",
            )),
            _ => Ok(()),
        }
    }

    fn new_table(
        &self,
        memory: DomainMemory,
        stage: Stage,
        input_bits: u8,
    ) -> Result<IoPageTable<DomainMemory>, DomainError> {
        let format = Format {
            stage,
            granule: Granule::Size4K,
            input_bits,
            output_bits: self.output_bits(),
        };
        let mut table = IoPageTable::new(format, memory, self.features().coherent)?;
        table.set_bbm_level(self.features().bbm_level);
        Ok(table)
    }

    /// The CD of a stage-1 domain with `asid` and `table`.
    pub(crate) fn stage1_cd(&self, asid: u16, table: &IoPageTable<DomainMemory>) -> Result<Cd, EntryError> {
        stage1_cd(self.features(), asid, table)
    }

    /// The STE's stage-2 fields of a stage-2 domain with `vmid` and `table`.
    pub(crate) fn stage2_config(&self, vmid: u16, table: &IoPageTable<DomainMemory>) -> Stage2Config {
        let (cacheability, shareability) = self.walk_attributes();
        let format = *table.format();
        Stage2Config {
            vmid,
            t0sz: 64 - format.input_bits,
            sl0: table.geometry().s2_sl0(),
            granule: match format.granule {
                Granule::Size4K => ste::Granule::Size4K,
                Granule::Size16K => ste::Granule::Size16K,
                Granule::Size64K => ste::Granule::Size64K,
            },
            ps: size_encoding(format.output_bits),
            cacheability,
            shareability,
            table: table.root(),
            access_flag_fault_disable: false,
            // A stage-1 walk or CD fetch that reaches Device memory at stage 2 faults (as Linux sets it): a guest
            // cannot aim its CD table or tables at a passthrough BAR and make the SMMU read MMIO.
            protected_table_walk: true,
            stall: false,
            record_faults: true,
        }
    }

    /// Creates a stage-1 domain: an ASID, an empty stage-1 table of `options.input_bits` from `memory`, and the
    /// CD its streams will use (NS-EL1, or EL2 with `options.el2`).
    ///
    /// # Errors
    /// [`DomainError::Unsupported`] without stage 1 (or EL2 without IDR0.HYP, or forced stalling),
    /// [`DomainError::Map`] for a bad input size or no memory, [`DomainError::Id`] without a free ASID (or
    /// [`IdError::HandOffUnsettled`] on an SMMU adopted running whose hand-off is not restored yet),
    /// [`DomainError::NoDomainSlot`], [`DomainError::MemoryOwned`] for a handover arena another domain owns.
    /// Nothing is allocated then.
    pub fn create_stage1(&mut self, memory: DomainMemory, options: Stage1Options) -> Result<DomainId, DomainError> {
        let features = *self.features();
        if !features.stage1 {
            return Err(DomainError::Unsupported("no stage 1 (IDR0.S1P = 0)"));
        }
        if options.el2 && !features.hyp {
            return Err(DomainError::Unsupported("EL2 stage 1 needs EL2 contexts (IDR0.HYP)"));
        }
        self.stalls_forced()?;
        self.domains.check_free_slot()?;
        self.create_claimed(memory, |smmu| {
            let stage = if options.el2 { Stage::OneEl2 } else { Stage::One };
            let table = smmu.new_table(memory, stage, options.input_bits)?;
            let asid = smmu.allocate_asid().map_err(DomainError::Id)?;
            let cd = smmu.stage1_cd(asid, &table).map_err(|e| {
                let _ = smmu.release_asid(asid);
                DomainError::Entry(e)
            })?;
            Ok(Translation::Stage1 {
                table,
                asid,
                cd,
                el2: options.el2,
            })
        })
    }

    /// Creates a stage-2 domain: a VMID and an empty stage-2 table of `options.input_bits` from `memory`.
    ///
    /// # Errors
    /// As [`ActiveSmmu::create_stage1`] (stage 2, a VMID).
    pub fn create_stage2(&mut self, memory: DomainMemory, options: Stage2Options) -> Result<DomainId, DomainError> {
        let features = *self.features();
        if !features.stage2 {
            return Err(DomainError::Unsupported("no stage 2 (IDR0.S2P = 0)"));
        }
        self.stalls_forced()?;
        self.domains.check_free_slot()?;
        self.create_claimed(memory, |smmu| {
            let table = smmu.new_table(memory, Stage::Two, options.input_bits)?;
            let vmid = smmu.allocate_vmid().map_err(DomainError::Id)?;
            let config = smmu.stage2_config(vmid, &table);
            Ok(Translation::Stage2 {
                table,
                vmid,
                config,
                children: 0,
            })
        })
    }

    /// Claims `memory` for a new domain, builds its translation with `build` and records it. When the memory is a
    /// handover arena another domain owns, nothing is allocated; when `build` fails (having given back what it
    /// took), so does the claim.
    fn create_claimed(
        &mut self,
        memory: DomainMemory,
        build: impl FnOnce(&mut Self) -> Result<Translation, DomainError>,
    ) -> Result<DomainId, DomainError> {
        // A sealed arena (a preserved domain's or the SMMU's own, while a hand-off is prepared) hands out nothing:
        // refused as such, not as the allocation failure it would become.
        if memory.sealed() {
            return Err(DomainError::MemorySealed);
        }
        if !memory.take_ownership() {
            return Err(DomainError::MemoryOwned);
        }
        match build(self) {
            Ok(translation) => Ok(self.domains.insert(DomainState::new(translation, memory))),
            Err(e) => {
                memory.give_up_ownership();
                Err(e)
            }
        }
    }

    /// Creates a nested domain: the guest's stage 1 (`guest`, its CD table at an IPA) inside the stage-2 domain
    /// `parent`, whose VMID it shares. The parent cannot be freed while nested domains use it.
    ///
    /// # Errors
    /// [`DomainError::Unsupported`] on an SMMU that cannot nest (both stages and no erratum against it),
    /// [`DomainError::StaleDomain`] / [`DomainError::WrongKind`] for a parent that is not a live stage-2 domain,
    /// [`DomainError::Unsupported`] for a guest CD table the SMMU cannot index (more substreams than SSIDSIZE),
    /// [`DomainError::NoDomainSlot`].
    pub fn create_nested(&mut self, parent: DomainId, guest: GuestStage1) -> Result<DomainId, DomainError> {
        let features = *self.features();
        if !features.nesting {
            return Err(DomainError::Unsupported("no nested translation on this SMMU"));
        }
        if guest.cd_max_log2 > features.ssid_bits {
            return Err(DomainError::Unsupported(
                "the guest's CD table has more substreams than IDR1.SSIDSIZE",
            ));
        }
        if !guest.cd_table.is_multiple_of(64) {
            return Err(DomainError::Entry(EntryError::Misaligned {
                field: "S1ContextPtr",
                address: guest.cd_table,
                alignment: 64,
            }));
        }
        let state = self.domains.get(parent)?;
        let memory = state.memory;
        if !matches!(state.translation, Translation::Stage2 { .. }) {
            return Err(DomainError::WrongKind {
                domain: parent,
                kind: state.kind(),
                wanted: "a stage-2 parent",
            });
        }
        self.domains.check_free_slot()?;
        let id = self
            .domains
            .insert(DomainState::new(Translation::Nested { parent, guest }, memory));
        if let Ok(DomainState {
            translation: Translation::Stage2 { children, .. },
            ..
        }) = self.domains.get_mut(parent)
        {
            *children += 1;
        }
        Ok(id)
    }

    fn release_ids(&mut self, state: &DomainState) {
        match state.translation {
            Translation::Stage1 { asid, .. } => {
                let _ = self.release_asid(asid);
            }
            Translation::Stage2 { vmid, .. } => {
                let _ = self.release_vmid(vmid);
            }
            Translation::Nested { .. } => {}
        }
    }

    /// The kind of `domain`.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`].
    pub fn domain_kind(&self, domain: DomainId) -> Result<DomainKind, DomainError> {
        Ok(self.domains.get(domain)?.kind())
    }

    /// The (StreamID, SubstreamID) pairs attached to `domain` (SubstreamID 0: the whole stream).
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`].
    pub fn attachments(&self, domain: DomainId) -> Result<&[(u32, u32)], DomainError> {
        Ok(&self.domains.get(domain)?.attachments)
    }

    /// The page table of a stage-1 or stage-2 domain (for inspection: its format, geometry, tables).
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`], [`DomainError::WrongKind`] for a nested domain (the guest owns its tables).
    pub fn domain_table(&self, domain: DomainId) -> Result<&IoPageTable<DomainMemory>, DomainError> {
        let state = self.domains.get(domain)?;
        match &state.translation {
            Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => Ok(table),
            Translation::Nested { .. } => Err(DomainError::WrongKind {
                domain,
                kind: DomainKind::Nested,
                wanted: "a stage-1 or stage-2 domain (a nested domain's stage 1 belongs to its guest)",
            }),
        }
    }

    /// The STE `domain` gives a stream, with `cd_table` for a stage-1 domain.
    pub(crate) fn domain_ste(&self, domain: DomainId, cd_table: Option<&CdTable>) -> Result<Ste, DomainError> {
        let features = *self.features();
        let rules = features.entry_rules();
        let (cacheability, shareability) = self.walk_attributes();
        let stall_disable = features.stall_model == StallModel::StallAndTerminate;
        let state = self.domains.get(domain)?;
        let ste = match &state.translation {
            Translation::Stage1 { el2, .. } => {
                let Some(cds) = cd_table else {
                    return Err(DomainError::Unsupported("a stage-1 stream needs its CD table"));
                };
                let bits = cds.format().ssid_bits();
                Ste::stage1(
                    &Stage1Config {
                        cd_table: cds.base(),
                        cd_max_log2: bits,
                        layout: CdTableLayout::Linear,
                        default_substream: if bits > 0 {
                            DefaultSubstream::Substream0
                        } else {
                            DefaultSubstream::Terminate
                        },
                        cacheability,
                        shareability,
                        stall_disable,
                        el2: *el2,
                    },
                    &rules,
                )
            }
            Translation::Stage2 { config, .. } => Ste::stage2(config, &rules),
            Translation::Nested { parent, guest } => {
                let Translation::Stage2 { config, .. } = &self.domains.get(*parent)?.translation else {
                    return Err(DomainError::StaleDomain(*parent));
                };
                Ste::nested(
                    &Stage1Config {
                        cd_table: PhysAddr(guest.cd_table),
                        cd_max_log2: guest.cd_max_log2,
                        layout: guest.layout,
                        default_substream: guest.default_substream,
                        cacheability,
                        shareability,
                        stall_disable,
                        el2: false,
                    },
                    config,
                    &rules,
                )
            }
        };
        ste.map_err(DomainError::Entry)
    }

    /// Attaches the whole stream `sid` to `domain`: its STE is written (hitlessly where the architecture allows)
    /// and invalidated. A stage-1 domain's stream gets a CD table of its own (from the domain's memory) with the
    /// domain's CD at substream 0 and room for [`STREAM_SSID_BITS`] bits of substreams where the SMMU has them.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`], [`DomainError::StreamInUse`] when the stream is attached anywhere,
    /// [`DomainError::Stream`] for a StreamID beyond the table, [`DomainError::TooMany`], [`DomainError::CdTable`],
    /// [`DomainError::Entry`], [`DomainError::HandoverPrepared`] (a preserved domain while a prepared hand-off
    /// records it), [`DomainError::StreamsFrozen`] (any domain while a hand-off with the SMMU left running is
    /// prepared), [`DomainError::El2DomainInUse`] for an EL2 stage-1 domain while another is in use: nothing
    /// changed then. [`DomainError::Invalidation`] when the TLBI_EL2_ALL owed by an earlier failed EL2 detach
    /// fails again (nothing written). [`DomainError::Attach`] when an STE invalidation failed: the
    /// STE is left as the error says and the stream is recorded as attached (so the domain cannot be freed under
    /// it); `detach` cleans up.
    pub fn attach(&mut self, domain: DomainId, sid: u32) -> Result<(), DomainError> {
        self.unfrozen(domain)?;
        self.streams_unfrozen()?;
        let state = self.domains.get(domain)?;
        if let Some(i) = self.domains.stream(sid) {
            return Err(DomainError::StreamInUse {
                sid,
                domain: self.domains.streams[i].domain,
            });
        }
        if self.domains.streams.is_full() {
            return Err(DomainError::TooMany("attached streams"));
        }
        if state.attachments.is_full() {
            return Err(DomainError::TooMany("attachments of the domain"));
        }
        let sid_bits = self.stream_sid_bits();
        if sid_bits < 32 && sid >> sid_bits != 0 {
            return Err(DomainError::Stream(StreamError::UnknownStream { sid, sid_bits }));
        }
        self.enter_el2(domain)?;
        let state = self.domains.get(domain)?;
        let memory = state.memory;
        let cd_table = match &state.translation {
            Translation::Stage1 { cd, .. } => {
                let cd = *cd;
                let bits = STREAM_SSID_BITS.min(self.features().ssid_bits);
                let mut table = CdTable::new(
                    CdTableFormat::Linear { ssid_bits: bits },
                    &memory,
                    self.features().coherent,
                )
                .map_err(|e| DomainError::CdTable(e.widen()))?;
                // No STE points to the table yet: nothing to invalidate while it is written.
                if let Err(e) = table.write(0, &cd, &memory, |_| Ok(())) {
                    // SAFETY: never referenced by an STE.
                    unsafe { table.free(&memory) };
                    return Err(DomainError::CdTable(e));
                }
                Some(table)
            }
            _ => None,
        };
        let ste = match self.domain_ste(domain, cd_table.as_ref()) {
            Ok(ste) => ste,
            Err(e) => {
                if let Some(t) = cd_table {
                    // SAFETY: never referenced by an STE.
                    unsafe { t.free(&memory) };
                }
                return Err(e);
            }
        };
        if let Err(e) = self.install_ste(sid, &ste) {
            if let AttachError::Invalidation(_) = e {
                // The STE may reference the domain (and its CD table) now: record the stream as attached, so that
                // the domain cannot be freed under it and `detach` can clean up.
                let _ = self.domains.streams.push(StreamRecord {
                    sid,
                    domain,
                    cd_table,
                    substreams: heapless::Vec::new(),
                });
                if let Ok(state) = self.domains.get_mut(domain) {
                    let _ = state.attachments.push((sid, 0));
                }
            } else if let Some(t) = cd_table {
                // SAFETY: the STE was not written, so nothing references the table.
                unsafe { t.free(&memory) };
            }
            return Err(DomainError::Attach(e));
        }
        let record = StreamRecord {
            sid,
            domain,
            cd_table,
            substreams: heapless::Vec::new(),
        };
        // Room was checked above.
        let _ = self.domains.streams.push(record);
        if let Ok(state) = self.domains.get_mut(domain) {
            let _ = state.attachments.push((sid, 0));
        }
        Ok(())
    }

    fn stream_sid_bits(&self) -> u8 {
        match self.stream_table_format() {
            crate::stream::StreamTableFormat::Linear { sid_bits }
            | crate::stream::StreamTableFormat::TwoLevel { sid_bits, .. } => sid_bits,
        }
    }

    /// Attaches substream `ssid` of stream `sid` to the stage-1 domain `domain`: the domain's CD goes into the
    /// stream's CD table at `ssid`, then CFGI_CD + CMD_SYNC. The stream must be attached (at substream 0) to a
    /// stage-1 domain already.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`], [`DomainError::WrongKind`] for a domain that is not stage 1,
    /// [`DomainError::NotAttached`] for a stream without a stage-1 attachment, [`DomainError::BadSubstream`] for
    /// SubstreamID 0 or one beyond the stream's CD table (on an SMMU without substreams, every one),
    /// [`DomainError::StreamInUse`] for a substream attached already, [`DomainError::TooMany`],
    /// [`DomainError::HandoverPrepared`], [`DomainError::StreamsFrozen`], [`DomainError::RegimeMismatch`] for a
    /// domain of another regime than the stream's (EL2 and NS-EL1 do not mix), [`DomainError::El2DomainInUse`]:
    /// nothing changed.
    /// [`DomainError::Invalidation`] as for [`ActiveSmmu::attach`].
    /// [`DomainError::CdTable`] when the CD's invalidation failed: the writer stopped at that step (the error says
    /// what the CD holds) and the substream is recorded as attached, so that its domain cannot be freed while the
    /// SMMU may use the CD; [`ActiveSmmu::detach_substream`] cleans up.
    pub fn attach_substream(&mut self, domain: DomainId, sid: u32, ssid: u32) -> Result<(), DomainError> {
        self.unfrozen(domain)?;
        self.streams_unfrozen()?;
        let state = self.domains.get(domain)?;
        let Translation::Stage1 { cd, .. } = state.translation else {
            return Err(DomainError::WrongKind {
                domain,
                kind: state.kind(),
                wanted: "a stage-1 domain",
            });
        };
        if state.attachments.is_full() {
            return Err(DomainError::TooMany("attachments of the domain"));
        }
        let Some(index) = self.domains.stream(sid) else {
            return Err(DomainError::NotAttached { sid, ssid: None });
        };
        let record = &self.domains.streams[index];
        let Some(table) = record.cd_table.as_ref() else {
            return Err(DomainError::NotAttached { sid, ssid: None });
        };
        let ssid_bits = table.format().ssid_bits();
        if ssid == 0 || (ssid_bits < 32 && ssid >> ssid_bits != 0) {
            return Err(DomainError::BadSubstream { ssid, ssid_bits });
        }
        if let Some((_, d)) = record.substreams.iter().find(|(s, _)| *s == ssid) {
            return Err(DomainError::StreamInUse { sid, domain: *d });
        }
        if record.substreams.is_full() {
            return Err(DomainError::TooMany("substreams of the stream"));
        }
        let stream_el2 = self.domains.get(record.domain)?.is_el2();
        if stream_el2 != state.is_el2() {
            return Err(DomainError::RegimeMismatch { sid, ssid, stream_el2 });
        }
        self.enter_el2(domain)?;
        let written = self.write_stream_cd(index, ssid, &cd);
        if let Err(e) = written
            && !matches!(e, DomainError::CdTable(CdTableError::Invalidation(_)))
        {
            return Err(e);
        }
        // Recorded even when an invalidation failed: the CD may be valid in memory (and fetched) and name the
        // domain's table and ASID, so the domain must not be freed under it; `detach_substream` cleans up. Room was
        // checked above.
        let _ = self.domains.streams[index].substreams.push((ssid, domain));
        if let Ok(state) = self.domains.get_mut(domain) {
            let _ = state.attachments.push((sid, ssid));
        }
        written
    }

    /// Writes `cd` at `ssid` of stream record `index`'s CD table, invalidating with CFGI_CD + CMD_SYNC.
    fn write_stream_cd(&mut self, index: usize, ssid: u32, cd: &Cd) -> Result<(), DomainError> {
        let sid = self.domains.streams[index].sid;
        let memory = self.domains.get(self.domains.streams[index].domain)?.memory;
        // The CD table and the command queue are different fields: borrow them apart.
        let ActiveSmmu {
            smmu, cmdq, domains, ..
        } = self;
        let regs = smmu.regs();
        let Some(table) = domains.streams[index].cd_table.as_mut() else {
            return Err(DomainError::NotAttached { sid, ssid: Some(ssid) });
        };
        table
            .write(ssid, cd, &memory, |leaf| {
                let words = [Command::CfgiCd { sid, ssid, leaf }
                    .encode()
                    .map_err(CommandQueueError::Encoding)?];
                cmdq.submit(regs, &words, true).map(drop)
            })
            .map(drop)
            .map_err(DomainError::CdTable)
    }

    /// Detaches substream `ssid` of stream `sid`: its CD is made invalid (CFGI_CD + CMD_SYNC).
    ///
    /// # Errors
    /// [`DomainError::NotAttached`]; [`DomainError::HandoverPrepared`] (nothing changes); [`DomainError::CdTable`]
    /// when the invalidation failed: the substream stays
    /// recorded (its domain cannot be freed) and the detach can be tried again.
    pub fn detach_substream(&mut self, sid: u32, ssid: u32) -> Result<(), DomainError> {
        let not_attached = DomainError::NotAttached { sid, ssid: Some(ssid) };
        let index = self.domains.stream(sid).ok_or(not_attached)?;
        let position = self.domains.streams[index]
            .substreams
            .iter()
            .position(|(s, _)| *s == ssid)
            .ok_or(not_attached)?;
        self.unfrozen(self.domains.streams[index].substreams[position].1)?;
        // The CD invalid and invalidated first: until then the substream stays recorded.
        self.write_stream_cd(index, ssid, &Cd::invalid())?;
        self.file_queued_faults();
        let (_, domain) = self.domains.streams[index].substreams.swap_remove(position);
        if let Ok(state) = self.domains.get_mut(domain) {
            state.attachments.retain(|a| *a != (sid, ssid));
        }
        self.after_last_detach(domain)
    }

    /// Detaches stream `sid` from its domain: its substreams' CDs are cleared, its STE made to abort (CFGI_STE +
    /// CMD_SYNC), its CD table's cached CDs invalidated (CFGI_CD_ALL + CMD_SYNC) before the table is freed. When the
    /// domain has no attachment left, its TLB entries are dropped too. Records already in the event queue are filed
    /// (in the domain the stream was attached to) before the stream is forgotten.
    ///
    /// # Errors
    /// [`DomainError::NotAttached`], [`DomainError::HandoverPrepared`] when the stream's domain (or a substream's)
    /// is preserved and a prepared hand-off records it (nothing changes). [`DomainError::Attach`] /
    /// [`DomainError::Invalidation`] when
    /// an invalidation failed: the stream stays recorded as attached (so its domain cannot be freed while the SMMU
    /// may still use it) and the detach can be tried again.
    pub fn detach(&mut self, sid: u32) -> Result<(), DomainError> {
        let index = self
            .domains
            .stream(sid)
            .ok_or(DomainError::NotAttached { sid, ssid: None })?;
        self.unfrozen(self.domains.streams[index].domain)?;
        for &(_, domain) in &self.domains.streams[index].substreams {
            self.unfrozen(domain)?;
        }
        while let Some(&(ssid, _)) = self.domains.streams[index].substreams.last() {
            self.detach_substream(sid, ssid)?;
        }
        // The STE to abort and the stream's cached CDs invalidated first: until both completed the stream stays
        // recorded (so its domain cannot be freed), and a failed detach can simply be tried again.
        self.abort_stream(sid).map_err(DomainError::Attach)?;
        if self.domains.streams[index].cd_table.is_some() {
            let mut batch = Batch::new();
            batch.push(&Command::CfgiCdAll { sid })?;
            self.submit(&batch)?;
        }
        self.file_queued_faults();
        let record = self.domains.streams.swap_remove(index);
        let domain = record.domain;
        let memory = self.domains.get(domain).map(|s| s.memory).ok();
        if let Ok(state) = self.domains.get_mut(domain) {
            state.attachments.retain(|a| *a != (sid, 0));
        }
        if let (Some(table), Some(memory)) = (record.cd_table, memory) {
            // SAFETY: the STE no longer points to the table and that was invalidated, as were the CDs cached from
            // it; the table came from the domain's memory.
            unsafe { table.free(&memory) };
        }
        self.after_last_detach(domain)
    }

    /// Files the records already in the event queue while their stream's routing still says whose they are: called
    /// by a detach once the STE (or CD) no longer translates for the old domain and that was synced, before the
    /// routing record goes, so that a fault taken before the detach is not filed under nobody, or under the domain
    /// the stream is attached to next. One bounded drain holds every record the queue can (a queue's worth); an
    /// overflow it sees is kept for the next [`ActiveSmmu::drain_faults`] / [`ActiveSmmu::drain_events`]. The
    /// records are not handed to a `drain_faults` callback.
    fn file_queued_faults(&mut self) {
        let ActiveSmmu {
            smmu,
            evtq,
            domains,
            pending_overflow,
            ..
        } = self;
        let report = evtq.drain(smmu.page1_regs(), |event| domains.file(&event));
        if report.overflow.is_some() && pending_overflow.is_none() {
            *pending_overflow = report.overflow;
        }
    }

    /// When `domain` has no attachment left, drops its TLB entries (its IDs stay allocated until `free`).
    fn after_last_detach(&mut self, domain: DomainId) -> Result<(), DomainError> {
        let Ok(state) = self.domains.get(domain) else {
            return Ok(());
        };
        if !state.attachments.is_empty() {
            return Ok(());
        }
        let el2 = state.is_el2();
        let command = self.whole_domain_invalidation(domain)?;
        let mut batch = Batch::new();
        batch.push(&command)?;
        let done = self.submit(&batch);
        if el2 {
            // EL2 entries match every EL2 context: until dropped, they stand in the way of the next EL2 domain.
            self.domains.el2_stale = done.is_err();
        }
        done?;
        Ok(())
    }

    /// Before an EL2 stage-1 domain's stream or substream is attached: refuses it while another EL2 domain is in
    /// use (EL2 has no ASIDs, so the two would share TLB entries), and drops the EL2 entries a previous domain may
    /// have left when its last detach's invalidation failed (TLBI_EL2_ALL + CMD_SYNC). Nothing for other domains.
    pub(crate) fn enter_el2(&mut self, domain: DomainId) -> Result<(), DomainError> {
        if !self.domains.get(domain)?.is_el2() {
            return Ok(());
        }
        if let Some(holder) = self.domains.el2_in_use(Some(domain)) {
            return Err(DomainError::El2DomainInUse { domain, holder });
        }
        if self.domains.el2_stale {
            let mut batch = Batch::new();
            batch.push(&Command::TlbiEl2All)?;
            self.submit(&batch)?;
            self.domains.el2_stale = false;
        }
        Ok(())
    }

    /// The command that drops every TLB entry `domain` may have.
    fn whole_domain_invalidation(&self, domain: DomainId) -> Result<Command, DomainError> {
        let state = self.domains.get(domain)?;
        Ok(match &state.translation {
            Translation::Stage1 { el2: true, .. } => Command::TlbiEl2All,
            Translation::Stage1 { asid, .. } => Command::TlbiNhAsid { vmid: 0, asid: *asid },
            Translation::Stage2 { vmid, .. } => Command::TlbiS12Vmall { vmid: *vmid },
            Translation::Nested { parent, .. } => match &self.domains.get(*parent)?.translation {
                Translation::Stage2 { vmid, .. } => Command::TlbiNhAll { vmid: *vmid },
                _ => return Err(DomainError::StaleDomain(*parent)),
            },
        })
    }

    /// The TLB context of a stage-1 or stage-2 domain's table.
    fn tlb_context(state: &DomainState) -> Option<TlbContext> {
        match &state.translation {
            Translation::Stage1 { el2: true, .. } => Some(TlbContext::Stage1El2),
            Translation::Stage1 { asid, .. } => Some(TlbContext::Stage1 { asid: *asid, vmid: 0 }),
            Translation::Stage2 { vmid, children, .. } => Some(TlbContext::Stage2 {
                vmid: *vmid,
                nested: *children > 0,
            }),
            Translation::Nested { .. } => None,
        }
    }

    /// Takes the table of a stage-1 or stage-2 domain out of its slot for an operation that also needs the
    /// command queue (put back by [`ActiveSmmu::put_table`]).
    fn paging_domain(&mut self, domain: DomainId) -> Result<&mut DomainState, DomainError> {
        let state = self.domains.get_mut(domain)?;
        if matches!(state.translation, Translation::Nested { .. }) {
            return Err(DomainError::WrongKind {
                domain,
                kind: DomainKind::Nested,
                wanted: "a stage-1 or stage-2 domain (a nested domain's stage 1 belongs to its guest)",
            });
        }
        Ok(state)
    }

    /// Flushes `gather` for `domain` (see [`ActiveSmmu::flush`]), keeping it in the domain when the invalidation
    /// fails. A gather another table filled is refused before anything is issued.
    fn flush_domain(&mut self, domain: DomainId, gather: Gather) -> Result<(), DomainError> {
        let ActiveSmmu {
            smmu, cmdq, domains, ..
        } = self;
        let state = domains.get_mut(domain)?;
        let context = Self::tlb_context(state).ok_or(DomainError::StaleDomain(domain))?;
        let table = match &mut state.translation {
            Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => table,
            Translation::Nested { .. } => return Err(DomainError::StaleDomain(domain)),
        };
        if !table.owns(&gather) {
            return Err(DomainError::ForeignGather { domain });
        }
        if !gather.is_empty()
            && let Err(error) = invalidate_gather(cmdq, smmu, table.format().granule, &gather, context)
        {
            // Another failed invalidation may be waiting (a deferred unmap's gather synced after it): keep
            // both, or the older one's IOVAs would never be invalidated nor its tables freed. Both are this
            // table's (checked above, and `unflushed` only ever holds its gathers), so the merge takes them.
            let gather = match state.unflushed.take() {
                Some(mut pending) => {
                    table.merge_owned(&mut pending, gather);
                    pending
                }
                None => gather,
            };
            state.unflushed = Some(gather);
            return Err(DomainError::Invalidation(InvalidationError::Queue(error)));
        }
        // SAFETY: the invalidation covering `gather` has completed with its CMD_SYNC (or the gather is empty: it
        // unlinked nothing), so no walk can reach its tables any more.
        match unsafe { table.release(gather) } {
            Ok(()) => Ok(()),
            Err(_) => Err(DomainError::ForeignGather { domain }),
        }
    }

    /// Retries an invalidation that failed before.
    fn settle(&mut self, domain: DomainId) -> Result<(), DomainError> {
        let pending = self.paging_domain(domain)?.unflushed.take();
        match pending {
            Some(gather) => self.flush_domain(domain, gather),
            None => Ok(()),
        }
    }

    /// Refuses a change to `domain` while a prepared hand-off records it: from `prepare_handover` to
    /// `cancel_handover` (or the hand-off) a preserved domain is frozen, so that the next image restores exactly
    /// the recorded streams, tables and counts.
    fn unfrozen(&self, domain: DomainId) -> Result<(), DomainError> {
        // The token first: most domains are not preserved, and asking an arena whether it is sealed takes its lock
        // (this runs on every map and unmap).
        let s = self.domains.get(domain)?;
        match s.token {
            Some(token) if s.memory.sealed() => Err(DomainError::HandoverPrepared { token }),
            _ => Ok(()),
        }
    }

    /// Refuses to make a stream (or substream) translate while a hand-off with the SMMU left running is prepared:
    /// the next image takes over the streams as `prepare_handover` checked them.
    fn streams_unfrozen(&self) -> Result<(), DomainError> {
        match self.domains.streams_frozen() {
            Some(generation) => Err(DomainError::StreamsFrozen { generation }),
            None => Ok(()),
        }
    }

    /// Maps `[iova, iova + size)` to `[pa, pa + size)` with `prot` in a stage-1 or stage-2 domain, with the largest
    /// blocks that fit. No invalidation is needed (only invalid entries are filled).
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`], [`DomainError::WrongKind`] for a nested domain, [`DomainError::Map`] for an
    /// unaligned or out-of-range range (the domain's input size, the SMMU's output size), an overlap with what is
    /// mapped, a bad `prot`, or no memory, [`DomainError::PendingInvalidation`] for a range that overlaps the span
    /// of a deferred unmap not synced yet, [`DomainError::HandoverPrepared`] for a preserved domain while a
    /// prepared hand-off records it, [`DomainError::ProtectedOutput`] for an output range that reaches memory
    /// declared with [`ActiveSmmu::protect_memory`]: nothing changes then. [`DomainError::Invalidation`] when the
    /// domain's earlier failed invalidation, retried first, fails again: nothing is mapped and the gather stays
    /// for the next retry.
    pub fn map(&mut self, domain: DomainId, iova: u64, pa: u64, size: u64, prot: Prot) -> Result<(), DomainError> {
        self.unfrozen(domain)?;
        // No device may be given the handover region or the driver's own tables and queues.
        if let Some(protected) = self.domains.protected.overlapping(pa, size) {
            return Err(DomainError::ProtectedOutput { pa, size, protected });
        }
        self.settle(domain)?;
        let state = self.paging_domain(domain)?;
        state.pending.check(iova, size)?;
        match &mut state.translation {
            Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => {
                table.map(iova, pa, size, prot).map_err(DomainError::Map)
            }
            Translation::Nested { .. } => Err(DomainError::StaleDomain(domain)),
        }
    }

    /// Unmaps `[iova, iova + size)` and invalidates what changed (one CMD_SYNC; for a stage-2 parent of nested
    /// domains, their combined entries too). Returns the bytes that were mapped.
    ///
    /// # Errors
    /// As [`ActiveSmmu::map`] (nothing changes), and [`DomainError::Invalidation`] when the invalidation failed:
    /// the entries are cleared and the unlinked tables kept until the domain's next operation flushes them again.
    pub fn unmap(&mut self, domain: DomainId, iova: u64, size: u64) -> Result<u64, DomainError> {
        self.unfrozen(domain)?;
        self.settle(domain)?;
        let mut gather = Gather::default();
        let bytes = match &mut self.paging_domain(domain)?.translation {
            Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => {
                table.unmap(iova, size, &mut gather)?
            }
            Translation::Nested { .. } => return Err(DomainError::StaleDomain(domain)),
        };
        self.flush_domain(domain, gather)?;
        Ok(bytes)
    }

    /// The first half of [`ActiveSmmu::unmap`], for callers that batch invalidations (Linux's unmap_fast +
    /// iotlb_sync): clears the entries of `[iova, iova + size)` and collects what changed into `gather`, issuing
    /// nothing for them. Returns the bytes that were mapped. Several calls may collect into one gather; the first
    /// ties it to this domain.
    ///
    /// **What a pending gather allows.** Until [`ActiveSmmu::sync_domain`] has completed for it, the SMMU may
    /// still translate through what the unmap removed: the TLB may hold the old translations, and a walk cache
    /// may name a table the unmap unlinked, whose leaves still hold the old output addresses. So, until then:
    /// - the caller must not reuse the memory that was mapped there (a DMA may still reach it);
    /// - [`ActiveSmmu::map`] refuses any range that overlaps the gather's span (the unmapped range, widened to
    ///   the whole span of every table it unlinked) with [`DomainError::PendingInvalidation`]: a new mapping
    ///   there could be bypassed by the stale entries and a DMA meant for it reach the old memory. The domain
    ///   keeps one span for all its unsynced gathers (their union), cleared when the last of them is synced.
    ///   Everything else (maps elsewhere, unmaps, protects, more deferred unmaps) works as usual;
    /// - the tables the unmap unlinked stay allocated, owned by the gather.
    ///
    /// A lazy trim never goes into `gather`: when this unmap leaves more emptied tables than the lazy-free limit
    /// allows, the trim is flushed inside the call (its own TLBI, CMD_SYNC, then its tables are freed).
    ///
    /// **Dropping a gather** without syncing it leaks its tables (safe: nothing frees them while a walk may
    /// reach them) and leaves its span refused for maps until [`ActiveSmmu::invalidate_domain`], which
    /// invalidates the whole domain and clears the span of every gather outstanding then, or until the domain
    /// is freed (a gather outstanding then can no longer be synced: its tables leak). A live update records the
    /// domain's tables as they are and not its pending gathers: sync them before preparing a hand-off.
    ///
    /// # Errors
    /// As [`ActiveSmmu::map`]; [`DomainError::ForeignGather`] for a gather another domain (or table) filled.
    /// Nothing changes then. [`DomainError::Invalidation`] when the flush of a lazy trim failed: the unmap is done
    /// and in `gather` (sync it as usual), and the trim's gather is kept in the domain and flushed again by its
    /// next operation.
    pub fn unmap_deferred(
        &mut self,
        domain: DomainId,
        iova: u64,
        size: u64,
        gather: &mut Gather,
    ) -> Result<u64, DomainError> {
        self.unfrozen(domain)?;
        self.settle(domain)?;
        let state = self.paging_domain(domain)?;
        let table = match &mut state.translation {
            Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => table,
            Translation::Nested { .. } => return Err(DomainError::StaleDomain(domain)),
        };
        if !table.owns(gather) {
            return Err(DomainError::ForeignGather { domain });
        }
        let bytes = table.unmap_without_trim(iova, size, gather)?;
        let mut trimmed = Gather::default();
        if table.trim_due() {
            table.trim(&mut trimmed)?;
        }
        state.pending.add(gather);
        if !trimmed.is_empty() {
            self.flush_domain(domain, trimmed)?;
        }
        Ok(bytes)
    }

    /// The second half: invalidates what `gather` collected for `domain` (one CMD_SYNC) and only then frees the
    /// tables it unlinked. `gather` is left empty, ready for reuse with any domain. Once the last of the domain's
    /// pending gathers is synced, maps over their span are allowed again (see [`ActiveSmmu::unmap_deferred`]).
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`], [`DomainError::WrongKind`]; [`DomainError::ForeignGather`] for a gather
    /// another domain (or table) filled: nothing is issued or freed, and `gather` is left as it was.
    /// [`DomainError::Invalidation`] when the invalidation failed: the gather is taken into the domain and flushed
    /// again by its next operation (which fails while that flush fails, so no map can race it).
    pub fn sync_domain(&mut self, domain: DomainId, gather: &mut Gather) -> Result<(), DomainError> {
        let state = self.paging_domain(domain)?;
        let owned = match &state.translation {
            Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => table.owns(gather),
            Translation::Nested { .. } => false,
        };
        if !owned {
            return Err(DomainError::ForeignGather { domain });
        }
        let gather = core::mem::take(gather);
        state.pending.remove(&gather);
        self.flush_domain(domain, gather)
    }

    /// Drops every TLB and walk-cache entry of a stage-1 or stage-2 domain (TLBI_NH_ASID, TLBI_EL2_ALL or
    /// TLBI_S12_VMALL, then CMD_SYNC) and so ends what its deferred unmaps left pending: maps over their span are
    /// allowed again. The way out for a gather dropped without [`ActiveSmmu::sync_domain`]. Gathers still held
    /// keep their tables; syncing them later invalidates their span once more and frees the tables.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`], [`DomainError::WrongKind`] for a nested domain; [`DomainError::Invalidation`]
    /// when the invalidation (or the retry of an earlier failed one) failed: the span stays refused.
    pub fn invalidate_domain(&mut self, domain: DomainId) -> Result<(), DomainError> {
        self.settle(domain)?;
        let command = self.whole_domain_invalidation(domain)?;
        let mut batch = Batch::new();
        batch.push(&command)?;
        self.submit(&batch)?;
        self.paging_domain(domain)?.pending.clear();
        Ok(())
    }

    /// Unlinks the tables that single-page unmaps left empty (they stay linked until a trim, so the next DMA
    /// nearby reuses them), invalidates, and frees them. Returns how many were freed.
    ///
    /// # Errors
    /// As [`ActiveSmmu::sync_domain`].
    pub fn trim_domain(&mut self, domain: DomainId) -> Result<u32, DomainError> {
        self.unfrozen(domain)?;
        self.settle(domain)?;
        let mut gather = Gather::default();
        let trimmed = match &mut self.paging_domain(domain)?.translation {
            Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => table.trim(&mut gather)?,
            Translation::Nested { .. } => return Err(DomainError::StaleDomain(domain)),
        };
        self.flush_domain(domain, gather)?;
        Ok(trimmed)
    }

    /// Changes the permissions of what is mapped in `[iova, iova + size)` to `prot` (never the memory type) and
    /// invalidates what changed. Returns the bytes changed.
    ///
    /// # Errors
    /// As [`ActiveSmmu::unmap`].
    pub fn protect(&mut self, domain: DomainId, iova: u64, size: u64, prot: Prot) -> Result<u64, DomainError> {
        self.unfrozen(domain)?;
        self.settle(domain)?;
        let mut gather = Gather::default();
        let bytes = match &mut self.paging_domain(domain)?.translation {
            Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => {
                table.protect(iova, size, prot, &mut gather)?
            }
            Translation::Nested { .. } => return Err(DomainError::StaleDomain(domain)),
        };
        self.flush_domain(domain, gather)?;
        Ok(bytes)
    }

    /// The output address `iova` translates to in a stage-1 or stage-2 domain, or `None` where nothing is mapped.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`], [`DomainError::WrongKind`] for a nested domain.
    pub fn iova_to_phys(&self, domain: DomainId, iova: u64) -> Result<Option<u64>, DomainError> {
        Ok(self.domain_table(domain)?.iova_to_phys(iova))
    }

    /// Issues a guest's stage-1 invalidation for a nested domain (under its parent's VMID), with a CMD_SYNC. The CD
    /// forms ([`GuestInvalidation::Cd`], [`GuestInvalidation::CdAll`]) go to every stream attached to the domain.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`], [`DomainError::WrongKind`] for a domain that is not nested,
    /// [`DomainError::BadSubstream`] for a CD beyond the guest's CD table (2^S1CDMax entries): nothing is issued
    /// then. [`DomainError::Invalidation`].
    pub fn invalidate_guest(&mut self, domain: DomainId, what: GuestInvalidation) -> Result<(), DomainError> {
        let state = self.domains.get(domain)?;
        let Translation::Nested { parent, guest } = state.translation else {
            return Err(DomainError::WrongKind {
                domain,
                kind: state.kind(),
                wanted: "a nested domain",
            });
        };
        let Translation::Stage2 { vmid, .. } = self.domains.get(parent)?.translation else {
            return Err(DomainError::StaleDomain(parent));
        };
        if let GuestInvalidation::Cd { ssid, .. } = what
            && ssid >> guest.cd_max_log2 != 0
        {
            return Err(DomainError::BadSubstream {
                ssid,
                ssid_bits: guest.cd_max_log2,
            });
        }
        let mut batch = Batch::new();
        match what {
            GuestInvalidation::Address { asid, address, leaf } => batch.push(&Command::TlbiNhVa {
                vmid,
                asid,
                address,
                leaf,
                range: None,
            })?,
            GuestInvalidation::Asid(asid) => batch.push(&Command::TlbiNhAsid { vmid, asid })?,
            GuestInvalidation::All => batch.push(&Command::TlbiNhAll { vmid })?,
            GuestInvalidation::Cd { ssid, leaf } => {
                // At most MAX_ATTACHMENTS streams: one batch holds them.
                for &(sid, _) in state.attachments.iter() {
                    batch.push(&Command::CfgiCd { sid, ssid, leaf })?;
                }
            }
            GuestInvalidation::CdAll => {
                for &(sid, _) in state.attachments.iter() {
                    batch.push(&Command::CfgiCdAll { sid })?;
                }
            }
        }
        self.submit(&batch)?;
        Ok(())
    }

    /// Frees `domain`: its TLB entries are dropped (and the CMD_SYNC waited for) before its tables go back to its
    /// memory and its ASID or VMID is freed. The handle (and every copy of it) is stale afterwards.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`], [`DomainError::StillAttached`] while streams are attached,
    /// [`DomainError::HasNestedDomains`] for a stage-2 parent in use, [`DomainError::Preserved`] for a preserved
    /// domain (unpreserve it first): nothing changes. [`DomainError::Invalidation`] when the invalidation failed:
    /// the domain is kept as it was.
    pub fn free_domain(&mut self, domain: DomainId) -> Result<(), DomainError> {
        let state = self.domains.get(domain)?;
        if !state.attachments.is_empty() {
            return Err(DomainError::StillAttached {
                domain,
                attachments: state.attachments.len(),
            });
        }
        if let Translation::Stage2 { children, .. } = state.translation
            && children > 0
        {
            return Err(DomainError::HasNestedDomains { domain, children });
        }
        if let Some(token) = state.token {
            return Err(DomainError::Preserved { domain, token });
        }
        let command = self.whole_domain_invalidation(domain)?;
        let mut batch = Batch::new();
        batch.push(&command)?;
        self.submit(&batch)?;
        if command == Command::TlbiEl2All {
            // Every EL2 entry is gone, a previous domain's stale ones too.
            self.domains.el2_stale = false;
        }
        let Some(state) = self.domains.remove(domain) else {
            return Err(DomainError::StaleDomain(domain));
        };
        self.release_ids(&state);
        match state.translation {
            Translation::Nested { parent, .. } => {
                if let Ok(DomainState {
                    translation: Translation::Stage2 { children, .. },
                    ..
                }) = self.domains.get_mut(parent)
                {
                    *children -= 1;
                }
            }
            Translation::Stage1 { mut table, .. } | Translation::Stage2 { mut table, .. } => {
                if let Some(gather) = state.unflushed {
                    // SAFETY: the whole-domain invalidation above covered it, and its CMD_SYNC completed. A
                    // refusal cannot happen (`unflushed` holds only this table's gathers); its tables would leak.
                    let _ = unsafe { table.release(gather) };
                }
                // Dropping the table returns its frames: nothing can walk it after the invalidation.
                drop(table);
                // Memory this domain owned alone (a handover arena) is free for another domain.
                // SAFETY: the domain has no attachments (checked above), so its streams' CD tables went back at
                // detach; its TLB entries are gone and its page table went back just above.
                unsafe { state.memory.retire() };
            }
        }
        Ok(())
    }

    /// Preserves `domain` under `token` for a live update: [`ActiveSmmu::handover_records`] will record it, and
    /// the next image rebuilds it by this token. The domain stays fully usable (map, unmap, attach, detach); what
    /// is recorded is its state when the handover is prepared. A stage-1 or stage-2 domain must have been created
    /// with a handover arena as its memory; a nested domain's stage-2 parent must be preserved first (its record
    /// names the parent by token).
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`], [`DomainError::TokenInUse`] (found in O(1) through the token index),
    /// [`DomainError::AlreadyPreserved`], [`DomainError::NotHandoverMemory`], [`DomainError::ParentNotPreserved`],
    /// [`DomainError::TooMany`] beyond [`MAX_PRESERVED`]; [`DomainError::HandoverPrepared`] between
    /// `prepare_handover` and `cancel_handover` (the region is written: a domain preserved now would silently not
    /// come back); [`DomainError::TokenInUse`] also for a token a restored domain still waits under (until
    /// `retrieve` or `finish_handover`). Nothing changes then.
    pub fn preserve(&mut self, domain: DomainId, token: u64) -> Result<(), DomainError> {
        let state = self.domains.get(domain)?;
        if self.domains.handover_prepared() {
            return Err(DomainError::HandoverPrepared { token });
        }
        if let Some(&holder) = self.domains.tokens.get(&token) {
            return Err(DomainError::TokenInUse { token, domain: holder });
        }
        if let Some(&(holder, _)) = self.domains.restored.get(&token) {
            return Err(DomainError::TokenInUse { token, domain: holder });
        }
        if let Some(token) = state.token {
            return Err(DomainError::AlreadyPreserved { domain, token });
        }
        match state.translation {
            Translation::Nested { parent, .. } => {
                if self.domains.get(parent)?.token.is_none() {
                    return Err(DomainError::ParentNotPreserved { domain, parent });
                }
            }
            _ => {
                if state.memory.handover_extent().is_none() {
                    return Err(DomainError::NotHandoverMemory(domain));
                }
            }
        }
        if self.domains.tokens.insert(token, domain).is_err() {
            return Err(DomainError::TooMany("preserved domains"));
        }
        self.domains.get_mut(domain)?.token = Some(token);
        Ok(())
    }

    /// Drops the preservation of the domain preserved under `token`: it is no longer recorded for a live update
    /// (the domain itself is untouched). Returns the domain.
    ///
    /// # Errors
    /// [`DomainError::UnknownToken`]; [`DomainError::NestedStillPreserved`] for a stage-2 parent whose nested
    /// domains are preserved; [`DomainError::HandoverPrepared`] between `prepare_handover` and `cancel_handover`
    /// (the region records the domain, and unpreserving cannot take the record back). Nothing changes then.
    pub fn unpreserve(&mut self, token: u64) -> Result<DomainId, DomainError> {
        let domain = *self
            .domains
            .tokens
            .get(&token)
            .ok_or(DomainError::UnknownToken(token))?;
        // The region records every preserved domain while a hand-off is prepared.
        if self.domains.handover_prepared() {
            return Err(DomainError::HandoverPrepared { token });
        }
        let nested_preserved = self.domains.slots.iter().filter_map(|s| s.state.as_ref()).any(|s| {
            s.token.is_some() && matches!(s.translation, Translation::Nested { parent, .. } if parent == domain)
        });
        if nested_preserved {
            return Err(DomainError::NestedStillPreserved { token });
        }
        self.domains.tokens.swap_remove(&token);
        if let Ok(state) = self.domains.get_mut(domain) {
            state.token = None;
        }
        Ok(domain)
    }

    /// The domain preserved under `token`, if any (O(1)).
    pub fn preserved(&self, token: u64) -> Option<DomainId> {
        self.domains.tokens.get(&token).copied()
    }

    /// The token `domain` is preserved under, if any.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`].
    pub fn token_of(&self, domain: DomainId) -> Result<Option<u64>, DomainError> {
        Ok(self.domains.get(domain)?.token)
    }

    /// The faults routed to `domain` since it was created or last cleared.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`].
    pub fn domain_faults(&self, domain: DomainId) -> Result<&FaultReport, DomainError> {
        Ok(&self.domains.get(domain)?.faults)
    }

    /// Clears `domain`'s fault report and returns what it held.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`].
    pub fn clear_domain_faults(&mut self, domain: DomainId) -> Result<FaultReport, DomainError> {
        Ok(core::mem::take(&mut self.domains.get_mut(domain)?.faults))
    }

    /// Faults of streams attached to no domain (and records without a StreamID), SMMU-wide.
    pub fn unattached_faults(&self) -> &FaultReport {
        &self.domains.unattached_faults
    }

    /// Clears the SMMU-wide report of unattached streams' faults and returns what it held.
    pub fn clear_unattached_faults(&mut self) -> FaultReport {
        core::mem::take(&mut self.domains.unattached_faults)
    }

    /// Drains the event queue (as [`ActiveSmmu::drain_events`], until it is empty) and routes every record to the
    /// report of the domain its stream (and substream) is attached to, or to the SMMU-wide report. `also` sees
    /// each typed event too.
    ///
    /// # Errors
    /// [`crate::active::GlobalError::ServiceFailure`].
    pub fn drain_faults(
        &mut self,
        mut also: impl FnMut(&Event),
    ) -> Result<crate::queue::evtq::DrainReport, GlobalError> {
        let mut total = crate::queue::evtq::DrainReport::default();
        loop {
            self.handle_global_errors()?;
            let ActiveSmmu {
                smmu,
                evtq,
                domains,
                pending_overflow,
                ..
            } = self;
            let mut report = evtq.drain(smmu.page1_regs(), |event| {
                also(&event);
                domains.file(&event);
            });
            // Taken whether or not OVFLG said so too: left behind, it would report a loss again on a later drain.
            let pending = pending_overflow.take();
            report.overflow = report.overflow.or(pending);
            total.events += report.events;
            total.overflow = total.overflow.or(report.overflow);
            if !report.pending {
                return Ok(total);
            }
        }
    }
}

/// Which stage a [`Fault`] was taken at (so a caller of the domain API needs nothing from [`crate::hw`]).
pub use crate::hw::event::Stage as FaultStage;

#[cfg(test)]
mod tests {
    //! Domains against the SMMU model of `active`'s tests: every operation's commands (the model records the
    //! whole commands it consumes, so the tests check the stream, ASID, VMID and address of each invalidation), the
    //! entries it writes, every misuse error, stale handles and fault routing.
    extern crate std;

    use super::*;
    use crate::active::tests::{IDRS, Issued, Model, assert_ste_steps, frames, issued_since, reg32};
    use crate::hw::command::opcode;
    use crate::hw::ste::Config;
    use crate::testing::HeapFrames;
    use crate::{ActiveSmmu, InitOptions};
    use core::sync::atomic::Ordering;
    use std::vec::Vec;

    const RW: Prot = Prot::READ.union(Prot::WRITE).union(Prot::CACHEABLE);
    const SID: u32 = 0x10;

    fn memory(frames: &'static HeapFrames) -> DomainMemory {
        frames
    }

    fn consumed(model: &Model) -> usize {
        model.seen.lock().unwrap().consumed.len()
    }

    fn since(model: &Model, from: usize) -> Vec<u8> {
        model.seen.lock().unwrap().consumed[from..].to_vec()
    }

    fn smmu(model: &Model, frames: &'static HeapFrames) -> ActiveSmmu<&'static HeapFrames> {
        model.smmu().init(frames, &InitOptions::default()).unwrap()
    }

    fn s1(smmu: &mut ActiveSmmu<&'static HeapFrames>, frames: &'static HeapFrames) -> DomainId {
        smmu.create_stage1(
            memory(frames),
            Stage1Options {
                input_bits: 39,
                el2: false,
            },
        )
        .unwrap()
    }

    fn s2(smmu: &mut ActiveSmmu<&'static HeapFrames>, frames: &'static HeapFrames) -> DomainId {
        smmu.create_stage2(memory(frames), Stage2Options { input_bits: 40 })
            .unwrap()
    }

    #[test]
    fn a_stage1_domain_issues_every_invalidation_itself() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        // The stream's level-2 span of the stream table stays once allocated: allocate it before counting.
        smmu.attach_abort(SID).unwrap();
        let baseline = frames.live_blocks();
        let d = s1(&mut smmu, frames);
        assert_eq!(smmu.domain_kind(d), Ok(DomainKind::Stage1));
        smmu.map(d, 0x40_0000, 0x8000_0000, 0x4000, RW).unwrap();
        assert_eq!(smmu.iova_to_phys(d, 0x40_1234), Ok(Some(0x8000_1234)));

        let before = consumed(&model);
        smmu.attach(d, SID).unwrap();
        let ste = smmu.ste(SID).unwrap();
        assert_eq!(ste.config(), Config::Stage1);
        assert!(
            since(&model, before)
                .iter()
                .all(|&op| op == opcode::CFGI_STE || op == opcode::SYNC)
        );
        assert_eq!(smmu.attachments(d), Ok(&[(SID, 0)][..]));

        // Unmap: one range TLBI by ASID (RIL) and one CMD_SYNC, nothing else.
        let before = consumed(&model);
        assert_eq!(smmu.unmap(d, 0x40_1000, 0x1000), Ok(0x1000));
        assert_eq!(since(&model, before), [opcode::TLBI_NH_VA, opcode::SYNC]);
        assert_eq!(smmu.iova_to_phys(d, 0x40_1000), Ok(None));
        // Protect likewise.
        let before = consumed(&model);
        assert_eq!(
            smmu.protect(d, 0x40_0000, 0x1000, Prot::READ | Prot::CACHEABLE),
            Ok(0x1000)
        );
        assert_eq!(since(&model, before), [opcode::TLBI_NH_VA, opcode::SYNC]);
        // Map needs none.
        let before = consumed(&model);
        smmu.map(d, 0x40_1000, 0x9000_0000, 0x1000, RW).unwrap();
        assert_eq!(since(&model, before), []);

        // Detach: STE to abort, the stream's cached CDs, then (last attachment) the domain's TLB entries.
        let before = consumed(&model);
        smmu.detach(SID).unwrap();
        assert_eq!(smmu.ste(SID).unwrap().config(), Config::Abort);
        let ops = since(&model, before);
        assert_eq!(
            &ops[ops.len() - 4..],
            [opcode::CFGI_CD_ALL, opcode::SYNC, opcode::TLBI_NH_ASID, opcode::SYNC]
        );
        assert!(
            ops[..ops.len() - 4]
                .iter()
                .all(|&op| op == opcode::CFGI_STE || op == opcode::SYNC)
        );

        // Free: the ASID's entries go (with their CMD_SYNC) before the tables and the ASID.
        let before = consumed(&model);
        smmu.free_domain(d).unwrap();
        assert_eq!(since(&model, before), [opcode::TLBI_NH_ASID, opcode::SYNC]);
        assert_eq!(frames.live_blocks(), baseline, "tables and CD table returned");
        // The ASID is free again: the next domain gets it.
        let again = s1(&mut smmu, frames);
        assert_ne!(again, d, "a new generation");
    }

    #[test]
    fn a_stale_handle_is_an_error_for_every_operation() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let d = s1(&mut smmu, frames);
        smmu.free_domain(d).unwrap();
        // The slot is reused by the next domain: the old handle must still be refused.
        let reused = s1(&mut smmu, frames);
        assert_eq!(reused.index(), d.index());
        let stale = Err(DomainError::StaleDomain(d));
        assert_eq!(smmu.domain_kind(d), stale.map(|()| DomainKind::Stage1));
        assert_eq!(smmu.map(d, 0, 0, 0x1000, RW), stale);
        assert_eq!(smmu.unmap(d, 0, 0x1000), stale.map(|()| 0));
        assert_eq!(smmu.protect(d, 0, 0x1000, RW), stale.map(|()| 0));
        assert_eq!(smmu.iova_to_phys(d, 0), stale.map(|()| None));
        assert_eq!(smmu.attach(d, SID), stale);
        assert_eq!(smmu.attach_substream(d, SID, 1), stale);
        assert_eq!(smmu.free_domain(d), stale);
        assert!(smmu.domain_faults(d).is_err());
        assert_eq!(smmu.create_nested(d, GUEST).err(), Some(DomainError::StaleDomain(d)));
        // The live domain in that slot is untouched.
        smmu.map(reused, 0, 0x8000_0000, 0x1000, RW).unwrap();
        assert_eq!(smmu.iova_to_phys(reused, 0), Ok(Some(0x8000_0000)));
    }

    const GUEST: GuestStage1 = GuestStage1 {
        cd_table: 0x4000_0000,
        cd_max_log2: 0,
        layout: CdTableLayout::Linear,
        default_substream: DefaultSubstream::Terminate,
    };

    #[test]
    fn a_stage2_domain_and_its_nested_domains() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let parent = s2(&mut smmu, frames);
        smmu.map(parent, 0x4000_0000, 0x8000_0000, 0x20_0000, RW).unwrap();
        let nested = smmu.create_nested(parent, GUEST).unwrap();
        assert_eq!(smmu.domain_kind(nested), Ok(DomainKind::Nested));
        smmu.attach(nested, SID).unwrap();
        let ste = smmu.ste(SID).unwrap();
        assert_eq!(ste.config(), Config::Nested);
        assert_eq!(
            ste.cd_table(),
            PhysAddr(GUEST.cd_table),
            "S1ContextPtr is the guest's IPA"
        );
        let Translation::Stage2 { vmid, .. } = smmu.domains.get(parent).unwrap().translation else {
            unreachable!()
        };
        assert_eq!(ste.vmid(), vmid, "the parent's VMID");
        assert_eq!(ste.s2_table(), smmu.domain_table(parent).unwrap().root());

        // A stage-2 change under a live nested domain: S2 by IPA, CMD_SYNC, then the combined entries, CMD_SYNC.
        let before = consumed(&model);
        smmu.unmap(parent, 0x4000_0000, 0x1000).unwrap();
        let ops = since(&model, before);
        assert_eq!(
            ops,
            [opcode::TLBI_S2_IPA, opcode::SYNC, opcode::TLBI_NH_ALL, opcode::SYNC],
            "split 2 MiB block? {ops:?}"
        );

        // The guest owns the stage 1: no map on the nested domain; guest invalidations go under the VMID.
        assert!(matches!(
            smmu.map(nested, 0, 0, 0x1000, RW),
            Err(DomainError::WrongKind {
                kind: DomainKind::Nested,
                ..
            })
        ));
        let before = consumed(&model);
        smmu.invalidate_guest(nested, GuestInvalidation::Asid(7)).unwrap();
        smmu.invalidate_guest(nested, GuestInvalidation::Cd { ssid: 0, leaf: true })
            .unwrap();
        assert_eq!(
            since(&model, before),
            [opcode::TLBI_NH_ASID, opcode::SYNC, opcode::CFGI_CD, opcode::SYNC]
        );

        // The parent cannot go while a nested domain uses it; a nested domain cannot be a parent.
        assert_eq!(
            smmu.free_domain(parent),
            Err(DomainError::HasNestedDomains {
                domain: parent,
                children: 1
            })
        );
        assert!(matches!(
            smmu.create_nested(nested, GUEST),
            Err(DomainError::WrongKind {
                wanted: "a stage-2 parent",
                ..
            })
        ));
        smmu.detach(SID).unwrap();
        let before = consumed(&model);
        smmu.free_domain(nested).unwrap();
        assert_eq!(since(&model, before), [opcode::TLBI_NH_ALL, opcode::SYNC]);
        let before = consumed(&model);
        smmu.free_domain(parent).unwrap();
        assert_eq!(since(&model, before), [opcode::TLBI_S12_VMALL, opcode::SYNC]);
    }

    #[test]
    fn without_nested_domains_a_stage2_change_is_one_sync() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let d = s2(&mut smmu, frames);
        smmu.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.attach(d, SID).unwrap();
        assert_eq!(smmu.ste(SID).unwrap().config(), Config::Stage2);
        let before = consumed(&model);
        smmu.unmap(d, 0x1000, 0x1000).unwrap();
        assert_eq!(since(&model, before), [opcode::TLBI_S2_IPA, opcode::SYNC]);
    }

    /// STE.S2PTW (qword 2, bit 54), as Linux sets it: a stage-1 walk or CD fetch that lands on Device memory at
    /// stage 2 faults, so a guest cannot aim its CD table or stage-1 tables at a passthrough BAR and make the SMMU
    /// read MMIO with side effects.
    #[test]
    fn stage2_and_nested_stes_protect_table_walks_from_device_memory() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let parent = s2(&mut smmu, frames);
        smmu.attach(parent, SID).unwrap();
        let ste = smmu.ste(SID).unwrap();
        assert_eq!(ste.config(), Config::Stage2);
        assert_ne!(ste.0[2] & ste::Q2_S2PTW, 0, "stage 2: {:#x}", ste.0[2]);
        smmu.detach(SID).unwrap();
        let nested = smmu.create_nested(parent, GUEST).unwrap();
        smmu.attach(nested, SID).unwrap();
        let ste = smmu.ste(SID).unwrap();
        assert_eq!(ste.config(), Config::Nested);
        assert_ne!(ste.0[2] & ste::Q2_S2PTW, 0, "nested: {:#x}", ste.0[2]);
    }

    #[test]
    fn misuse_is_refused_and_changes_nothing() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let a = s1(&mut smmu, frames);
        let b = s2(&mut smmu, frames);
        smmu.attach(a, SID).unwrap();
        let ste = smmu.ste(SID).unwrap();
        let before = consumed(&model);

        // A stream attached elsewhere.
        assert_eq!(
            smmu.attach(b, SID),
            Err(DomainError::StreamInUse { sid: SID, domain: a })
        );
        assert_eq!(
            smmu.attach(a, SID),
            Err(DomainError::StreamInUse { sid: SID, domain: a })
        );
        // A stream beyond the table (16 SID bits on the model).
        assert!(matches!(smmu.attach(b, 1 << 16), Err(DomainError::Stream(_))));
        // Free while attached.
        assert_eq!(
            smmu.free_domain(a),
            Err(DomainError::StillAttached {
                domain: a,
                attachments: 1
            })
        );
        // Wrong kinds.
        assert!(matches!(
            smmu.attach_substream(b, SID, 1),
            Err(DomainError::WrongKind {
                kind: DomainKind::Stage2,
                ..
            })
        ));
        assert!(matches!(
            smmu.create_nested(a, GUEST),
            Err(DomainError::WrongKind {
                kind: DomainKind::Stage1,
                ..
            })
        ));
        // No substreams on this SMMU (SSIDSIZE 0): every SubstreamID is beyond the stream's CD table.
        assert_eq!(
            smmu.attach_substream(a, SID, 1),
            Err(DomainError::BadSubstream { ssid: 1, ssid_bits: 0 })
        );
        // IOVAs outside the domain's 39-bit input range, and unaligned ones.
        assert!(matches!(
            smmu.map(a, 1 << 39, 0x8000_0000, 0x1000, RW),
            Err(DomainError::Map(MapError::InputOutOfRange { .. }))
        ));
        assert!(matches!(
            smmu.map(a, 0x800, 0x8000_0000, 0x1000, RW),
            Err(DomainError::Map(_))
        ));
        // Overlap.
        smmu.map(a, 0, 0x8000_0000, 0x1000, RW).unwrap();
        assert!(matches!(
            smmu.map(a, 0, 0x9000_0000, 0x1000, RW),
            Err(DomainError::Map(MapError::Overlap { .. }))
        ));
        assert_eq!(
            smmu.iova_to_phys(a, 0),
            Ok(Some(0x8000_0000)),
            "the first mapping stays"
        );
        // Unknown streams.
        assert_eq!(
            smmu.detach(0x11),
            Err(DomainError::NotAttached { sid: 0x11, ssid: None })
        );
        assert_eq!(
            smmu.detach_substream(SID, 3),
            Err(DomainError::NotAttached {
                sid: SID,
                ssid: Some(3)
            })
        );
        assert_eq!(smmu.ste(SID), Ok(ste), "the STE is as it was");
        assert_eq!(since(&model, before), [], "no command was issued");
        // A nested domain on an SMMU that cannot nest.
        let guest = GuestStage1 {
            cd_table: 0x4000_0020,
            ..GUEST
        };
        assert!(
            matches!(smmu.create_nested(b, guest), Err(DomainError::Entry(_))),
            "misaligned CD table IPA"
        );
    }

    #[test]
    fn capacity_is_a_clear_error_and_a_failed_creation_leaks_no_id() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu: ActiveSmmu<&'static HeapFrames, 3> = model
            .smmu()
            .init_with_capacity(frames, &InitOptions::default())
            .unwrap();
        let baseline = frames.live_blocks();
        for round in 0..5 {
            let ids: Vec<DomainId> = (0..3)
                .map(|_| smmu.create_stage1(memory(frames), Stage1Options::default()).unwrap())
                .collect();
            assert_eq!(
                smmu.create_stage1(memory(frames), Stage1Options::default()),
                Err(DomainError::NoDomainSlot { capacity: 3 })
            );
            // The refused creation gave its ASID back: three in use, never more.
            assert_eq!(smmu.asids_in_use(), 3, "round {round}");
            for id in ids {
                smmu.free_domain(id).unwrap();
            }
            assert_eq!(frames.live_blocks(), baseline, "round {round}: every table returned");
        }
    }

    /// The raw ID calls cannot take an ID from a live domain: freeing one is refused and changes nothing, so no
    /// later allocation (raw or a new domain's) hands it out while the domain still tags TLB entries with it.
    #[test]
    fn freeing_a_live_domains_asid_or_vmid_is_refused_and_no_later_create_reuses_it() {
        let frames = frames();
        // IDR0.ASID16 (bit 12) and VMID16 (bit 18) clear: 8-bit IDs, quick to exhaust.
        let model = Model::start_with(frames, IDRS[0].1 & !(1 << 12 | 1 << 18));
        let mut smmu = smmu(&model, frames);
        let d = s1(&mut smmu, frames);
        let e = s2(&mut smmu, frames);
        let (asid, vmid) = (asid_of(&smmu, d), vmid_of(&smmu, e));
        let in_use = (smmu.asids_in_use(), smmu.vmids_in_use());
        assert_eq!(smmu.free_asid(asid), Err(IdError::Owned { id: asid }));
        assert_eq!(smmu.free_vmid(vmid), Err(IdError::Owned { id: vmid }));
        assert_eq!((smmu.asids_in_use(), smmu.vmids_in_use()), in_use, "nothing freed");

        // Every other ID taken raw: the domains' IDs are not among them.
        let raw_asids: Vec<u16> = core::iter::from_fn(|| smmu.allocate_asid().ok()).collect();
        let raw_vmids: Vec<u16> = core::iter::from_fn(|| smmu.allocate_vmid().ok()).collect();
        assert_eq!((raw_asids.len(), raw_vmids.len()), (254, 254));
        assert!(!raw_asids.contains(&asid) && !raw_vmids.contains(&vmid));
        // Refused again with every other ID taken: a new domain finds none rather than the live domain's.
        assert_eq!(smmu.free_asid(asid), Err(IdError::Owned { id: asid }));
        assert_eq!(smmu.free_vmid(vmid), Err(IdError::Owned { id: vmid }));
        let exhausted = Err(DomainError::Id(IdError::Exhausted { bits: 8 }));
        assert_eq!(smmu.create_stage1(memory(frames), Stage1Options::default()), exhausted);
        assert_eq!(
            smmu.create_stage2(memory(frames), Stage2Options { input_bits: 40 }),
            exhausted
        );

        // A raw ID is the caller's own: freed, and the next domain gets it.
        smmu.free_asid(raw_asids[7]).unwrap();
        smmu.free_vmid(raw_vmids[7]).unwrap();
        let d2 = s1(&mut smmu, frames);
        let e2 = s2(&mut smmu, frames);
        assert_eq!((asid_of(&smmu, d2), vmid_of(&smmu, e2)), (raw_asids[7], raw_vmids[7]));
        // A freed domain's ID goes back with it (and is then the caller's to allocate, not to free).
        smmu.free_domain(d).unwrap();
        smmu.free_domain(e).unwrap();
        assert_eq!(
            smmu.free_asid(asid),
            Err(IdError::WrongState {
                id: asid,
                allocated: false
            })
        );
        assert_eq!((smmu.allocate_asid(), smmu.allocate_vmid()), (Ok(asid), Ok(vmid)));
    }

    /// A stream attached to a domain has its STE written by the domain alone: the raw STE calls refuse it (and
    /// change nothing), so a bypass cannot replace a domain's translation behind its back.
    #[test]
    fn raw_ste_calls_refuse_a_stream_a_domain_owns() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let d = s1(&mut smmu, frames);
        smmu.attach(d, SID).unwrap();
        let ste = smmu.ste(SID).unwrap();
        let before = consumed(&model);
        let in_use = Some(AttachError::StreamInUse { sid: SID, domain: d });
        assert_eq!(smmu.attach_bypass(SID).err(), in_use);
        assert_eq!(smmu.attach_abort(SID).err(), in_use);
        assert_eq!(smmu.abort_streams_except(|sid| sid == SID), Ok(0), "kept by the caller");
        assert_eq!(smmu.abort_streams_except(|_| false).err(), in_use);
        assert_eq!(smmu.ste(SID), Ok(ste), "the domain's STE is as it was");
        assert_eq!(since(&model, before), [], "no command was issued");
        assert_eq!(smmu.attachments(d), Ok(&[(SID, 0)][..]));

        // Detached, the stream is the caller's again.
        smmu.detach(SID).unwrap();
        smmu.attach_bypass(SID).unwrap();
        assert_eq!(smmu.ste(SID).unwrap().config(), Config::Bypass);
        smmu.attach_bypass(SID + 1).unwrap();
        assert_eq!(smmu.abort_streams_except(|_| false), Ok(2));
        assert_eq!(smmu.ste(SID).unwrap().config(), Config::Abort);
    }

    #[test]
    fn substreams_get_their_own_cds_and_their_faults() {
        let frames = frames();
        // SSIDSIZE 5 (IDR1[10:6]).
        let model = Model::start_with_idrs(frames, IDRS[0].1, IDRS[1].1 | 5 << 6);
        let mut smmu = smmu(&model, frames);
        let whole = s1(&mut smmu, frames);
        let sub = s1(&mut smmu, frames);
        smmu.attach(whole, SID).unwrap();
        let before = consumed(&model);
        smmu.attach_substream(sub, SID, 3).unwrap();
        // Invalid -> valid: qwords 1..7, CFGI_CD + CMD_SYNC, then qword 0 (V), CFGI_CD + CMD_SYNC.
        assert_eq!(
            since(&model, before),
            [opcode::CFGI_CD, opcode::SYNC, opcode::CFGI_CD, opcode::SYNC]
        );
        assert_eq!(smmu.attachments(sub), Ok(&[(SID, 3)][..]));
        let record = &smmu.domains.streams[0];
        let table = record.cd_table.as_ref().unwrap();
        assert_eq!(table.format().ssid_bits(), STREAM_SSID_BITS);
        let asid_of = |d| match smmu.domains.get(d).unwrap().translation {
            Translation::Stage1 { asid, .. } => asid,
            _ => unreachable!(),
        };
        assert_eq!(table.read(3).unwrap().asid(), asid_of(sub));
        assert_eq!(table.read(0).unwrap().asid(), asid_of(whole));
        assert_eq!(
            smmu.ste(SID).unwrap().0[0] >> 59 & 0x1f,
            u64::from(STREAM_SSID_BITS),
            "S1CDMax"
        );
        // Substream 0 is the stream's own; beyond the table is refused; a used one too.
        assert!(matches!(
            smmu.attach_substream(sub, SID, 0),
            Err(DomainError::BadSubstream { .. })
        ));
        assert!(matches!(
            smmu.attach_substream(sub, SID, 8),
            Err(DomainError::BadSubstream { .. })
        ));
        assert_eq!(
            smmu.attach_substream(whole, SID, 3),
            Err(DomainError::StreamInUse { sid: SID, domain: sub })
        );

        // Faults route by (stream, substream).
        inject(
            &model,
            &smmu,
            frames,
            &[fault(SID, Some(3), 0x1000, true), fault(SID, None, 0x2000, false)],
        );
        smmu.drain_faults(|_| {}).unwrap();
        let f = smmu.domain_faults(sub).unwrap();
        assert_eq!(f.faults.len(), 1);
        assert_eq!(
            (f.faults[0].substream, f.faults[0].address, f.faults[0].write),
            (Some(3), Some(0x1000), Some(true))
        );
        assert_eq!(smmu.domain_faults(whole).unwrap().faults[0].address, Some(0x2000));

        // Detaching the substream clears its CD; the domain's last detach drops its TLB entries.
        let before = consumed(&model);
        smmu.detach_substream(SID, 3).unwrap();
        // Valid -> invalid: V first, then the rest (two CFGI_CD rounds), then the TLBI.
        assert_eq!(
            since(&model, before),
            [
                opcode::CFGI_CD,
                opcode::SYNC,
                opcode::CFGI_CD,
                opcode::SYNC,
                opcode::TLBI_NH_ASID,
                opcode::SYNC
            ]
        );
        assert!(
            !smmu.domains.streams[0]
                .cd_table
                .as_ref()
                .unwrap()
                .read(3)
                .unwrap()
                .is_valid()
        );
        // Detaching the stream clears what substreams are left first.
        smmu.attach_substream(sub, SID, 5).unwrap();
        smmu.detach(SID).unwrap();
        assert_eq!(smmu.attachments(sub), Ok(&[][..]));
        assert!(smmu.domains.streams.is_empty());
    }

    /// A hand-assembled F_TRANSLATION record (IHI 0070 7.3.11): number 0x10, SSV [11], SubstreamID [31:12],
    /// StreamID [63:32]; RnW [99]; InputAddr [191:128].
    fn fault(sid: u32, ssid: Option<u32>, address: u64, write: bool) -> [u64; 4] {
        let ssv = ssid.map_or(0, |s| 1 << 11 | u64::from(s) << 12);
        let rnw = if write { 0 } else { 1 << 35 };
        [0x10 | ssv | u64::from(sid) << 32, rnw, address, 0]
    }

    /// Plays the SMMU writing `records` into the event queue and advancing EVENTQ_PROD.
    fn inject(model: &Model, smmu: &ActiveSmmu<&'static HeapFrames>, frames: &HeapFrames, records: &[[u64; 4]]) {
        let base = frames.virt(smmu.configuration().eventq_base) as *mut u64;
        let prod_register = reg32(model.base, 0x1_00a8);
        // SAFETY: the model's register block and the driver's event queue are live.
        unsafe {
            let mut prod = prod_register.read_volatile();
            for r in records {
                let index = (prod & 0xff) as usize;
                for (i, w) in r.iter().enumerate() {
                    base.add(index * 4 + i).write_volatile(*w);
                }
                prod = (prod + 1) & 0x1ff;
            }
            prod_register.write_volatile(prod);
        }
    }

    #[test]
    fn faults_go_to_the_domain_of_their_stream_or_the_smmu_wide_report() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let a = s1(&mut smmu, frames);
        let b = s2(&mut smmu, frames);
        smmu.attach(a, 0x10).unwrap();
        smmu.attach(b, 0x18).unwrap();
        let records: Vec<[u64; 4]> = (0..12)
            .map(|i| fault(if i % 2 == 0 { 0x10 } else { 0x18 }, None, 0x1000 * i, true))
            .chain([fault(0x99, None, 0x5000, false)])
            .collect();
        inject(&model, &smmu, frames, &records);
        let mut typed = 0;
        let report = smmu.drain_faults(|_| typed += 1).unwrap();
        assert_eq!((report.events, typed), (13, 13), "typed events stay available");
        let fa = smmu.domain_faults(a).unwrap().clone();
        assert_eq!((fa.faults.len(), fa.lost), (6, 0));
        assert!(fa.faults.iter().all(|f| f.stream == 0x10 && f.kind == "F_TRANSLATION"));
        assert_eq!(fa.faults[1].address, Some(0x2000));
        assert_eq!(smmu.domain_faults(b).unwrap().total(), 6);
        assert_eq!(smmu.unattached_faults().faults[0].stream, 0x99);
        // Bounded: more faults than the report holds are counted as lost.
        let more: Vec<[u64; 4]> = (0..FAULT_REPORT_CAPACITY as u64)
            .map(|i| fault(0x10, None, i << 12, true))
            .collect();
        inject(&model, &smmu, frames, &more);
        smmu.drain_faults(|_| {}).unwrap();
        let fa = smmu.clear_domain_faults(a).unwrap();
        assert_eq!((fa.faults.len(), fa.lost), (FAULT_REPORT_CAPACITY, 6));
        assert_eq!(smmu.domain_faults(a).unwrap().total(), 0, "cleared");
        // After detach, the stream's faults are nobody's.
        smmu.detach(0x10).unwrap();
        inject(&model, &smmu, frames, &[fault(0x10, None, 0, true)]);
        smmu.drain_faults(|_| {}).unwrap();
        assert_eq!(smmu.domain_faults(a).unwrap().total(), 0);
        assert_eq!(smmu.clear_unattached_faults().total(), 2);
    }

    #[test]
    fn a_full_report_with_a_saturated_lost_count_totals_without_overflowing() {
        let mut report = FaultReport::default();
        let f = Fault::of(&Event::decode(&fault(SID, None, 0, true))).unwrap();
        for _ in 0..FAULT_REPORT_CAPACITY {
            report.push(f);
        }
        report.lost = u32::MAX - 1;
        report.push(f);
        report.push(f);
        assert_eq!(report.lost, u32::MAX, "saturated");
        assert_eq!(report.total(), u32::MAX);
    }

    #[test]
    fn an_overflow_signalled_both_ways_is_reported_by_one_drain_only() {
        use crate::hw::event::GlobalErrors;
        use crate::queue::evtq::Overflow;
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        // The SMMU toggles EVENTQ_PROD.OVFLG and also raises GERROR.EVENTQ_ABT_ERR for the same loss.
        let prod = reg32(model.base, 0x1_00a8);
        // SAFETY: the model's live register block.
        unsafe {
            prod.write_volatile(prod.read_volatile() ^ 1 << 31);
            reg32(model.base, 0x60).write_volatile(GlobalErrors::EVENTQ_ABT_ERR.bits());
        }
        assert!(smmu.drain_faults(|_| {}).unwrap().overflow.is_some());
        assert_eq!(
            smmu.drain_faults(|_| {}).unwrap().overflow,
            None::<Overflow>,
            "nothing was lost since the last drain"
        );
    }

    #[test]
    fn a_stage2_fault_in_a_nested_walk_reports_its_ipa() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let parent = s2(&mut smmu, frames);
        let nested = smmu.create_nested(parent, GUEST).unwrap();
        smmu.attach(nested, SID).unwrap();
        // The guest's stage-1 descriptor fetch missed at stage 2: S2 [103], CLASS TT [105:104] = 1, InputAddr the
        // guest VA, IPA[55:12] at [247:204] the descriptor's IPA.
        let mut s2_fault = fault(SID, None, 0xdead_0000, false);
        s2_fault[1] |= 1 << 39 | 1 << 40;
        s2_fault[3] = 0x4123_4000;
        // A stage-1 fault: its IPA field is UNKNOWN.
        let mut s1_fault = fault(SID, None, 0xbeef_0000, true);
        s1_fault[3] = 0x7777_7000;
        inject(&model, &smmu, frames, &[s2_fault, s1_fault]);
        smmu.drain_faults(|_| {}).unwrap();
        let f = smmu.domain_faults(nested).unwrap();
        assert_eq!(f.faults.len(), 2);
        assert_eq!(
            (f.faults[0].stage, f.faults[0].address, f.faults[0].ipa),
            (Some(FaultStage::Two), Some(0xdead_0000), Some(0x4123_4000)),
            "the IPA the stage-2 table lacks, not only the guest VA"
        );
        assert_eq!((f.faults[1].stage, f.faults[1].ipa), (Some(FaultStage::One), None));
    }

    #[test]
    fn faults_taken_before_a_detach_stay_with_the_domain_they_were_taken_in() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let a = s1(&mut smmu, frames);
        let b = s1(&mut smmu, frames);
        smmu.attach(a, SID).unwrap();
        // Taken while the stream was a's, not drained before it moved to b.
        inject(&model, &smmu, frames, &[fault(SID, None, 0xa000, true)]);
        smmu.detach(SID).unwrap();
        smmu.attach(b, SID).unwrap();
        smmu.drain_faults(|_| {}).unwrap();
        assert_eq!(
            smmu.domain_faults(b).unwrap().total(),
            0,
            "b never owned the stream when the fault was taken"
        );
        assert_eq!(smmu.domain_faults(a).unwrap().faults[0].address, Some(0xa000));
        // The same for a substream.
        let model2 = Model::start_with_idrs(frames, IDRS[0].1, IDRS[1].1 | 5 << 6);
        let mut smmu2 = model2.smmu().init(frames, &InitOptions::default()).unwrap();
        let (w, x, y) = (s1(&mut smmu2, frames), s1(&mut smmu2, frames), s1(&mut smmu2, frames));
        smmu2.attach(w, SID).unwrap();
        smmu2.attach_substream(x, SID, 3).unwrap();
        inject(&model2, &smmu2, frames, &[fault(SID, Some(3), 0x3000, false)]);
        smmu2.detach_substream(SID, 3).unwrap();
        smmu2.attach_substream(y, SID, 3).unwrap();
        smmu2.drain_faults(|_| {}).unwrap();
        assert_eq!(smmu2.domain_faults(y).unwrap().total(), 0);
        assert_eq!(smmu2.domain_faults(x).unwrap().total(), 1);
    }

    #[test]
    fn a_failed_unmap_invalidation_keeps_the_tables_until_the_next_operation() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let d = s1(&mut smmu, frames);
        smmu.map(d, 0x40_0000, 0x8000_0000, 0x4000, RW).unwrap();
        let live = frames.live_blocks();
        model.refuse.store(opcode::TLBI_NH_VA, Ordering::SeqCst);
        assert!(matches!(
            smmu.unmap(d, 0x40_0000, 0x4000),
            Err(DomainError::Invalidation(_))
        ));
        assert_eq!(frames.live_blocks(), live, "the emptied tables are not freed");
        model.refuse.store(0, Ordering::SeqCst);
        // The next operation flushes them first.
        let before = consumed(&model);
        smmu.map(d, 0x80_0000, 0x8000_0000, 0x1000, RW).unwrap();
        assert_eq!(since(&model, before)[..2], [opcode::TLBI_NH_VA, opcode::SYNC]);
    }

    #[test]
    fn a_failed_sync_keeps_the_unmap_invalidation_that_failed_before_it() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let d = s1(&mut smmu, frames);
        let asid = asid_of(&smmu, d);
        // One last-level table in each of two 2 MiB ranges; each unmap below unlinks one (a page at 0 keeps
        // their level-2 table).
        smmu.map(d, 0, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.map(d, 0x40_0000, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.map(d, 0x80_0000, 0x9000_0000, 0x1000, RW).unwrap();
        let live = frames.live_blocks();
        let mut deferred = Gather::default();
        smmu.unmap_deferred(d, 0x80_0000, 0x20_0000, &mut deferred).unwrap();
        model.refuse.store(opcode::TLBI_NH_VA, Ordering::SeqCst);
        // This unmap's invalidation fails and is kept; so does the deferred one's.
        assert!(matches!(
            smmu.unmap(d, 0x40_0000, 0x20_0000),
            Err(DomainError::Invalidation(_))
        ));
        assert!(matches!(
            smmu.sync_domain(d, &mut deferred),
            Err(DomainError::Invalidation(_))
        ));
        assert_eq!(frames.live_blocks(), live, "no unlinked table freed yet");
        model.refuse.store(0, Ordering::SeqCst);
        // The next operation flushes both: neither IOVA may stay in the TLB, and both tables are freed after.
        let before = consumed(&model);
        smmu.map(d, 0xc0_0000, 0x8000_0000, 0x1000, RW).unwrap();
        // One range invalidation over both (RIL): its pieces, then the CMD_SYNC.
        let mut expected: Vec<Issued> =
            crate::hw::command::plan_range_invalidation(0x40_0000, 0x60_0000, Granule::Size4K, 0)
                .unwrap()
                .map(|piece| Issued::NhVa {
                    vmid: 0,
                    asid,
                    address: piece.address,
                })
                .collect();
        expected.push(Issued::Sync);
        assert_eq!(issued_since(&model, before), expected);
        assert_eq!(
            frames.live_blocks(),
            live - 2 + 1,
            "both unlinked tables freed; one new"
        );
    }

    #[test]
    fn what_the_smmu_lacks_is_unsupported_and_allocates_nothing() {
        let frames = frames();
        // QEMU's stage-1-only SMMU (IDR0 0x0D44101A: S2P = 0).
        let model = Model::start_with(frames, 0x0d44_101a);
        let mut smmu = smmu(&model, frames);
        let live = frames.live_blocks();
        assert!(matches!(
            smmu.create_stage2(memory(frames), Stage2Options { input_bits: 40 }),
            Err(DomainError::Unsupported(_))
        ));
        let el2 = Stage1Options {
            input_bits: 39,
            el2: true,
        };
        assert!(
            matches!(
                smmu.create_stage1(memory(frames), el2),
                Err(DomainError::Unsupported(_))
            ),
            "no IDR0.HYP"
        );
        let d = s1(&mut smmu, frames);
        let error = smmu.create_nested(d, GUEST).unwrap_err();
        assert!(matches!(error, DomainError::Unsupported(_)), "{error}");
        assert_eq!((smmu.asids_in_use(), smmu.vmids_in_use()), (1, 0));
        smmu.free_domain(d).unwrap();
        assert_eq!(frames.live_blocks(), live);
    }

    /// A handover pool over leaked host memory, for domains to preserve.
    fn handover_pool() -> &'static crate::handover::pool::HandoverPool {
        use crate::handover::pool::{ARENAS, HandoverPool, METADATA_BYTES};
        let bytes = METADATA_BYTES as usize + ARENAS * 256 * 1024;
        let memory: &'static mut [u64] = std::boxed::Box::leak(std::vec![0u64; bytes / 8].into_boxed_slice());
        let pool: &'static HandoverPool = std::boxed::Box::leak(std::boxed::Box::new(HandoverPool::new()));
        let region = crate::mem::Extent {
            base: 0x80_0000_0000,
            len: bytes as u64,
        };
        // SAFETY: leaked, zeroed, used by nothing else.
        unsafe { pool.set_up(region, core::ptr::NonNull::new(memory.as_mut_ptr().cast()).unwrap()) }.unwrap();
        pool
    }

    #[test]
    fn tokens_collide_in_the_index_and_preservation_never_outlives_its_domain() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let pool = handover_pool();
        let arena: DomainMemory = pool.take_arena().unwrap();
        let a = smmu
            .create_stage1(
                arena,
                Stage1Options {
                    input_bits: 39,
                    el2: false,
                },
            )
            .unwrap();
        let parent = smmu
            .create_stage2(pool.take_arena().unwrap(), Stage2Options { input_bits: 40 })
            .unwrap();
        let ordinary = s1(&mut smmu, frames);
        // Ordinary memory would not survive.
        assert_eq!(
            smmu.preserve(ordinary, 9),
            Err(DomainError::NotHandoverMemory(ordinary))
        );
        smmu.preserve(a, 0xa).unwrap();
        assert_eq!(smmu.preserved(0xa), Some(a));
        assert_eq!(smmu.token_of(a), Ok(Some(0xa)));
        // Collision: nothing changes.
        assert_eq!(
            smmu.preserve(parent, 0xa),
            Err(DomainError::TokenInUse { token: 0xa, domain: a })
        );
        assert_eq!(smmu.token_of(parent), Ok(None));
        assert_eq!(
            smmu.preserve(a, 0xb),
            Err(DomainError::AlreadyPreserved { domain: a, token: 0xa })
        );
        // A nested domain needs its parent preserved first.
        let nested = smmu.create_nested(parent, GUEST).unwrap();
        assert_eq!(
            smmu.preserve(nested, 0xc),
            Err(DomainError::ParentNotPreserved { domain: nested, parent })
        );
        smmu.preserve(parent, 0x5).unwrap();
        smmu.preserve(nested, 0xc).unwrap();
        assert_eq!(
            smmu.unpreserve(0x5),
            Err(DomainError::NestedStillPreserved { token: 0x5 })
        );
        // A preserved domain stays usable.
        smmu.map(a, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.attach(a, SID).unwrap();
        smmu.unmap(a, 0x1000, 0x1000).unwrap();
        smmu.detach(SID).unwrap();
        // Freeing a preserved domain is refused; after unpreserve the token is gone and free works.
        assert_eq!(
            smmu.free_domain(a),
            Err(DomainError::Preserved { domain: a, token: 0xa })
        );
        assert_eq!(smmu.unpreserve(0xa), Ok(a));
        assert_eq!(smmu.preserved(0xa), None);
        assert_eq!(smmu.unpreserve(0xa), Err(DomainError::UnknownToken(0xa)));
        smmu.free_domain(a).unwrap();
        // The token is free for another domain.
        let b = smmu
            .create_stage1(pool.take_arena().unwrap(), Stage1Options::default())
            .unwrap();
        smmu.preserve(b, 0xa).unwrap();
        assert_eq!(smmu.preserved(0xa), Some(b));
        assert_eq!(smmu.unpreserve(0xc), Ok(nested));
        assert_eq!(smmu.unpreserve(0x5), Ok(parent));
    }

    #[test]
    fn deferred_unmaps_invalidate_only_at_sync_and_trim_frees_emptied_tables() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let d = s1(&mut smmu, frames);
        smmu.map(d, 0x20_0000, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.map(d, 0x40_0000, 0x8000_1000, 0x1000, RW).unwrap();
        let tables = smmu.domain_table(d).unwrap().tables();
        let before = consumed(&model);
        let mut gather = Gather::default();
        assert_eq!(smmu.unmap_deferred(d, 0x20_0000, 0x1000, &mut gather), Ok(0x1000));
        assert_eq!(since(&model, before), [], "nothing issued before the sync");
        smmu.sync_domain(d, &mut gather).unwrap();
        assert_eq!(since(&model, before), [opcode::TLBI_NH_VA, opcode::SYNC]);
        // The single-page unmap left its last-level table linked (empty) until a trim.
        assert_eq!(smmu.domain_table(d).unwrap().tables(), tables);
        let before = consumed(&model);
        assert_eq!(smmu.trim_domain(d), Ok(1));
        assert_eq!(smmu.domain_table(d).unwrap().tables(), tables - 1);
        let ops = since(&model, before);
        assert_eq!(ops.last(), Some(&opcode::SYNC));
        assert!(
            ops.contains(&opcode::TLBI_NH_VA) || ops.contains(&opcode::TLBI_NH_ASID),
            "{ops:?}"
        );
        assert_eq!(
            smmu.iova_to_phys(d, 0x40_0000),
            Ok(Some(0x8000_1000)),
            "the other mapping stays"
        );
        assert_eq!(smmu.trim_domain(d), Ok(0), "nothing left to trim");
    }

    #[test]
    fn a_failed_detach_keeps_the_stream_so_its_domain_cannot_be_freed_under_it() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let d = s1(&mut smmu, frames);
        smmu.attach(d, SID).unwrap();
        model.refuse.store(opcode::CFGI_STE, Ordering::SeqCst);
        assert!(matches!(smmu.detach(SID), Err(DomainError::Attach(_))));
        assert_eq!(smmu.attachments(d), Ok(&[(SID, 0)][..]), "still recorded");
        assert!(matches!(smmu.free_domain(d), Err(DomainError::StillAttached { .. })));
        model.refuse.store(0, Ordering::SeqCst);
        smmu.detach(SID).unwrap();
        smmu.free_domain(d).unwrap();
        // A failed attach records the stream, so detach can clean up and free waits for it.
        let d = s1(&mut smmu, frames);
        model.refuse.store(opcode::CFGI_STE, Ordering::SeqCst);
        assert!(matches!(smmu.attach(d, SID), Err(DomainError::Attach(_))));
        assert!(matches!(smmu.free_domain(d), Err(DomainError::StillAttached { .. })));
        model.refuse.store(0, Ordering::SeqCst);
        smmu.detach(SID).unwrap();
        smmu.free_domain(d).unwrap();
    }

    #[test]
    fn a_handover_arena_serves_one_domain() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let pool = handover_pool();
        let arena = pool.take_arena().unwrap();
        let d = smmu.create_stage1(arena, Stage1Options::default()).unwrap();
        let used = arena.extent().unwrap().len;
        assert_eq!(
            smmu.create_stage2(arena, Stage2Options { input_bits: 40 }),
            Err(DomainError::MemoryOwned)
        );
        assert_eq!(smmu.vmids_in_use(), 0, "the refused creation gave its VMID back");
        assert_eq!(
            arena.extent().unwrap().len,
            used,
            "the refused creation allocated nothing from the arena"
        );
        // A creation that fails after the claim gives the claim back: the arena still serves a domain.
        let other = pool.take_arena().unwrap();
        assert!(matches!(
            smmu.create_stage1(
                other,
                Stage1Options {
                    input_bits: 70,
                    el2: false
                }
            ),
            Err(DomainError::Map(_))
        ));
        let e = smmu.create_stage1(other, Stage1Options::default()).unwrap();
        smmu.free_domain(e).unwrap();
        smmu.free_domain(d).unwrap();
        assert_eq!(pool.arenas_in_use(), 0, "freeing the owner retires the arena");
    }

    /// The SMMU's own memory is its alone: an arena holding its stream table and queues serves no domain (whose
    /// free would retire the arena, handing it out again under the SMMU), an arena a domain owns cannot hold an
    /// SMMU's structures, and a shutdown gives the arena up.
    #[test]
    fn an_arena_holding_the_smmus_own_structures_serves_no_domain() {
        let frames = frames();
        let pool = handover_pool();
        let region = pool.region().unwrap();
        let model = Model::start(frames);
        *model.window.lock().unwrap() = Some((region.base, pool.metadata_address().unwrap() as usize, region.len));
        let owned = pool.take_arena().unwrap();
        let mut first = smmu(&model, frames);
        let d = first.create_stage1(owned, Stage1Options::default()).unwrap();
        drop(first);
        assert_eq!(
            model.smmu().init(owned, &crate::InitOptions::default()).err(),
            Some(crate::InitError::MemoryOwned),
            "{d}'s arena"
        );
        let core = pool.take_arena().unwrap();
        let mut on_arena = model.smmu().init(core, &crate::InitOptions::default()).unwrap();
        assert_eq!(
            on_arena.create_stage1(core, Stage1Options::default()),
            Err(DomainError::MemoryOwned)
        );
        assert_eq!(on_arena.domains.free_slots(), DEFAULT_DOMAINS, "nothing created");
        on_arena.shutdown(false).unwrap();
        let mut smmu = smmu(&model, frames);
        let d = smmu.create_stage1(core, Stage1Options::default()).unwrap();
        smmu.free_domain(d).unwrap();
        assert_eq!(
            pool.arenas_in_use(),
            1,
            "only the first domain's arena, which it never freed"
        );
    }

    // Field-level checks: the SMMU model of QEMU 10.0 never hits in its IOTLB, so only these tests catch an
    // invalidation of the wrong stream, ASID, VMID or address (or none at all).

    fn asid_of(smmu: &ActiveSmmu<&'static HeapFrames>, d: DomainId) -> u16 {
        match smmu.domains.get(d).unwrap().translation {
            Translation::Stage1 { asid, .. } => asid,
            _ => unreachable!(),
        }
    }

    fn vmid_of(smmu: &ActiveSmmu<&'static HeapFrames>, d: DomainId) -> u16 {
        match smmu.domains.get(d).unwrap().translation {
            Translation::Stage2 { vmid, .. } => vmid,
            _ => unreachable!(),
        }
    }

    #[test]
    fn every_stage1_invalidation_names_the_stream_the_asid_and_the_address() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        smmu.attach_abort(SID).unwrap();
        // Another domain first, so that a wrong ASID would show.
        let other = s1(&mut smmu, frames);
        let d = s1(&mut smmu, frames);
        let asid = asid_of(&smmu, d);
        assert_ne!(asid, asid_of(&smmu, other));
        smmu.map(d, 0x40_0000, 0x8000_0000, 0x4000, RW).unwrap();
        smmu.map(d, 0x20_0000, 0x9000_0000, 0x1000, RW).unwrap();

        let before = consumed(&model);
        smmu.attach(d, SID).unwrap();
        assert_ste_steps(&issued_since(&model, before), SID);

        let before = consumed(&model);
        smmu.unmap(d, 0x40_1000, 0x1000).unwrap();
        assert_eq!(
            issued_since(&model, before),
            [
                Issued::NhVa {
                    vmid: 0,
                    asid,
                    address: 0x40_1000
                },
                Issued::Sync
            ]
        );
        let before = consumed(&model);
        smmu.protect(d, 0x40_2000, 0x1000, Prot::READ | Prot::CACHEABLE)
            .unwrap();
        assert_eq!(
            issued_since(&model, before),
            [
                Issued::NhVa {
                    vmid: 0,
                    asid,
                    address: 0x40_2000
                },
                Issued::Sync
            ]
        );
        // Map fills invalid entries only: nothing to invalidate.
        let before = consumed(&model);
        smmu.map(d, 0x40_1000, 0xa000_0000, 0x1000, RW).unwrap();
        assert_eq!(issued_since(&model, before), []);

        // Deferred: nothing until the sync, then the address under the ASID.
        let before = consumed(&model);
        let mut gather = Gather::default();
        smmu.unmap_deferred(d, 0x40_3000, 0x1000, &mut gather).unwrap();
        assert_eq!(issued_since(&model, before), []);
        smmu.sync_domain(d, &mut gather).unwrap();
        assert_eq!(
            issued_since(&model, before),
            [
                Issued::NhVa {
                    vmid: 0,
                    asid,
                    address: 0x40_3000
                },
                Issued::Sync
            ]
        );

        // Trim: the emptied last-level table at 0x20_0000 unlinked, its 2 MiB invalidated (non-leaf) under the ASID.
        smmu.unmap(d, 0x20_0000, 0x1000).unwrap();
        let before = consumed(&model);
        assert_eq!(smmu.trim_domain(d), Ok(1));
        let issued = issued_since(&model, before);
        assert_eq!(issued.last(), Some(&Issued::Sync), "{issued:?}");
        assert!(
            issued[..issued.len() - 1].iter().all(|i| match *i {
                Issued::NhVa {
                    vmid: 0,
                    asid: a,
                    address,
                } => a == asid && (0x20_0000..0x40_0000).contains(&address),
                Issued::NhAsid { vmid: 0, asid: a } => a == asid,
                _ => false,
            }),
            "{issued:?}"
        );
        assert!(issued.len() > 1, "{issued:?}");

        // Detach: the STE, the stream's cached CDs, then (last attachment) the ASID.
        let before = consumed(&model);
        smmu.detach(SID).unwrap();
        let issued = issued_since(&model, before);
        let (ste, rest) = issued.split_at(issued.len() - 4);
        assert_ste_steps(ste, SID);
        assert_eq!(
            rest,
            [
                Issued::CdAll { sid: SID },
                Issued::Sync,
                Issued::NhAsid { vmid: 0, asid },
                Issued::Sync
            ]
        );

        // Free: the ASID's entries dropped (and waited for) before the ASID is free again.
        let (before, in_use) = (consumed(&model), smmu.asids_in_use());
        smmu.free_domain(d).unwrap();
        assert_eq!(
            issued_since(&model, before),
            [Issued::NhAsid { vmid: 0, asid }, Issued::Sync]
        );
        assert_eq!(smmu.asids_in_use(), in_use - 1, "the invalidated ASID is the one freed");
    }

    #[test]
    fn every_stage2_and_nested_invalidation_names_the_vmid_and_the_address() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let other = s2(&mut smmu, frames);
        let parent = s2(&mut smmu, frames);
        let vmid = vmid_of(&smmu, parent);
        assert_ne!(vmid, vmid_of(&smmu, other));
        smmu.map(parent, 0x4000_0000, 0x8000_0000, 0x20_0000, RW).unwrap();
        smmu.map(parent, 0x1000, 0x9000_0000, 0x1000, RW).unwrap();

        // Without nested domains: S2 by IPA, one CMD_SYNC.
        let before = consumed(&model);
        smmu.protect(parent, 0x1000, 0x1000, Prot::READ | Prot::CACHEABLE)
            .unwrap();
        assert_eq!(
            issued_since(&model, before),
            [Issued::S2Ipa { vmid, address: 0x1000 }, Issued::Sync]
        );

        let nested = smmu.create_nested(parent, GUEST).unwrap();
        let before = consumed(&model);
        smmu.attach(nested, SID).unwrap();
        assert_ste_steps(&issued_since(&model, before), SID);

        // Under a nested domain: S2 by IPA, CMD_SYNC, the VMID's combined entries, CMD_SYNC.
        let before = consumed(&model);
        smmu.unmap(parent, 0x1000, 0x1000).unwrap();
        assert_eq!(
            issued_since(&model, before),
            [
                Issued::S2Ipa { vmid, address: 0x1000 },
                Issued::Sync,
                Issued::NhAll { vmid },
                Issued::Sync
            ]
        );
        let before = consumed(&model);
        smmu.protect(parent, 0x4000_0000, 0x20_0000, Prot::READ | Prot::CACHEABLE)
            .unwrap();
        let issued = issued_since(&model, before);
        assert_eq!(
            issued,
            [
                Issued::S2Ipa {
                    vmid,
                    address: 0x4000_0000
                },
                Issued::Sync,
                Issued::NhAll { vmid },
                Issued::Sync
            ]
        );
        let before = consumed(&model);
        smmu.map(parent, 0x1000, 0x9000_0000, 0x1000, RW).unwrap();
        assert_eq!(issued_since(&model, before), []);

        // The guest's invalidations go under the parent's VMID; its CD invalidation names the attached stream.
        let before = consumed(&model);
        smmu.invalidate_guest(
            nested,
            GuestInvalidation::Address {
                asid: 7,
                address: 0x7000,
                leaf: true,
            },
        )
        .unwrap();
        smmu.invalidate_guest(nested, GuestInvalidation::Asid(7)).unwrap();
        smmu.invalidate_guest(nested, GuestInvalidation::All).unwrap();
        smmu.invalidate_guest(nested, GuestInvalidation::Cd { ssid: 0, leaf: true })
            .unwrap();
        assert_eq!(
            issued_since(&model, before),
            [
                Issued::NhVa {
                    vmid,
                    asid: 7,
                    address: 0x7000
                },
                Issued::Sync,
                Issued::NhAsid { vmid, asid: 7 },
                Issued::Sync,
                Issued::NhAll { vmid },
                Issued::Sync,
                Issued::Cd { sid: SID, ssid: 0 },
                Issued::Sync
            ]
        );

        // Detach: the STE, then (last attachment) the nested domain's combined entries.
        let before = consumed(&model);
        smmu.detach(SID).unwrap();
        let issued = issued_since(&model, before);
        let (ste, rest) = issued.split_at(issued.len() - 2);
        assert_ste_steps(ste, SID);
        assert_eq!(rest, [Issued::NhAll { vmid }, Issued::Sync]);

        let before = consumed(&model);
        smmu.free_domain(nested).unwrap();
        assert_eq!(issued_since(&model, before), [Issued::NhAll { vmid }, Issued::Sync]);
        let (before, in_use) = (consumed(&model), smmu.vmids_in_use());
        smmu.free_domain(parent).unwrap();
        assert_eq!(issued_since(&model, before), [Issued::S12Vmall { vmid }, Issued::Sync]);
        assert_eq!(smmu.vmids_in_use(), in_use - 1, "the invalidated VMID is the one freed");
    }

    /// A guest may use a two-level CD table: invalidating one of its CDs after changing a level-1 descriptor needs
    /// CFGI_CD with Leaf = 0, and a guest that rewrote its table wholesale asks for CFGI_CD_ALL. Both go to every
    /// stream attached to the nested domain; a SubstreamID beyond the guest's table is refused, nothing issued.
    #[test]
    fn guest_cd_invalidations_carry_the_leaf_flag_and_cover_the_whole_table() {
        let frames = frames();
        // IDR1.SSIDSIZE (bits [10:6]) = 8: substreams, so a 256-entry two-level guest CD table is accepted.
        let model = Model::start_with_idrs(frames, IDRS[0].1, IDRS[1].1 | 8 << 6);
        let mut smmu = smmu(&model, frames);
        let parent = s2(&mut smmu, frames);
        let guest = GuestStage1 {
            cd_max_log2: 8,
            layout: CdTableLayout::TwoLevel4K,
            ..GUEST
        };
        let nested = smmu.create_nested(parent, guest).unwrap();
        smmu.attach(nested, SID).unwrap();
        smmu.attach(nested, SID + 1).unwrap();
        let raw_since = |from: usize| model.seen.lock().unwrap().commands[from..].to_vec();

        for leaf in [false, true] {
            let before = consumed(&model);
            smmu.invalidate_guest(nested, GuestInvalidation::Cd { ssid: 0x45, leaf })
                .unwrap();
            assert_eq!(
                issued_since(&model, before),
                [
                    Issued::Cd { sid: SID, ssid: 0x45 },
                    Issued::Cd {
                        sid: SID + 1,
                        ssid: 0x45
                    },
                    Issued::Sync
                ]
            );
            // CMD_CFGI_CD.Leaf is bit 0 of the second word.
            let words = raw_since(before);
            assert!(words[..2].iter().all(|w| w[1] & 1 == u64::from(leaf)), "{words:x?}");
        }

        let before = consumed(&model);
        smmu.invalidate_guest(nested, GuestInvalidation::CdAll).unwrap();
        assert_eq!(
            issued_since(&model, before),
            [Issued::CdAll { sid: SID }, Issued::CdAll { sid: SID + 1 }, Issued::Sync]
        );

        let before = consumed(&model);
        assert_eq!(
            smmu.invalidate_guest(
                nested,
                GuestInvalidation::Cd {
                    ssid: 0x100,
                    leaf: true
                }
            ),
            Err(DomainError::BadSubstream {
                ssid: 0x100,
                ssid_bits: 8
            })
        );
        assert_eq!(issued_since(&model, before), []);
    }

    #[test]
    fn substream_invalidations_name_the_stream_and_the_substream() {
        let frames = frames();
        let model = Model::start_with_idrs(frames, IDRS[0].1, IDRS[1].1 | 5 << 6);
        let mut smmu = smmu(&model, frames);
        let whole = s1(&mut smmu, frames);
        let sub = s1(&mut smmu, frames);
        let (whole_asid, sub_asid) = (asid_of(&smmu, whole), asid_of(&smmu, sub));
        smmu.attach(whole, SID).unwrap();
        let cd = [
            Issued::Cd { sid: SID, ssid: 3 },
            Issued::Sync,
            Issued::Cd { sid: SID, ssid: 3 },
            Issued::Sync,
        ];

        let before = consumed(&model);
        smmu.attach_substream(sub, SID, 3).unwrap();
        assert_eq!(issued_since(&model, before), cd);
        let before = consumed(&model);
        smmu.detach_substream(SID, 3).unwrap();
        let issued = issued_since(&model, before);
        assert_eq!(issued[..4], cd);
        assert_eq!(
            issued[4..],
            [
                Issued::NhAsid {
                    vmid: 0,
                    asid: sub_asid
                },
                Issued::Sync
            ]
        );

        // Detaching the whole stream detaches its substreams first, then the STE, its CDs and the stream's ASID.
        smmu.attach_substream(sub, SID, 3).unwrap();
        let before = consumed(&model);
        smmu.detach(SID).unwrap();
        let issued = issued_since(&model, before);
        assert_eq!(issued[..4], cd);
        assert_eq!(
            issued[4..6],
            [
                Issued::NhAsid {
                    vmid: 0,
                    asid: sub_asid
                },
                Issued::Sync
            ]
        );
        let (ste, rest) = issued[6..].split_at(issued.len() - 10);
        assert_ste_steps(ste, SID);
        assert_eq!(
            rest,
            [
                Issued::CdAll { sid: SID },
                Issued::Sync,
                Issued::NhAsid {
                    vmid: 0,
                    asid: whole_asid
                },
                Issued::Sync
            ]
        );
    }

    /// IDR0.HYP (bit 9): EL2 contexts; IDR1.SSIDSIZE 5: substreams.
    fn el2_model(frames: &'static HeapFrames) -> Model {
        Model::start_with_idrs(frames, IDRS[0].1 | 1 << 9, IDRS[1].1 | 5 << 6)
    }

    fn el2(smmu: &mut ActiveSmmu<&'static HeapFrames>, frames: &'static HeapFrames) -> DomainId {
        smmu.create_stage1(
            memory(frames),
            Stage1Options {
                input_bits: 39,
                el2: true,
            },
        )
        .unwrap()
    }

    /// The EL2 regime (STE.STRW = EL2, no E2H) has no ASIDs (IHI 0070 §3.17): its entries are invalidated only by
    /// the EL2 commands, on every path, and never by TLBI_NH_*, which misses them.
    #[test]
    fn an_el2_stage1_domain_is_invalidated_with_el2_commands() {
        let frames = frames();
        let model = el2_model(frames);
        let mut smmu = smmu(&model, frames);
        let d = el2(&mut smmu, frames);
        smmu.map(d, 0x40_0000, 0x8000_0000, 0x8000, RW).unwrap();
        smmu.map(d, 0x20_0000, 0x9000_0000, 0x1000, RW).unwrap();
        let before = consumed(&model);
        smmu.attach(d, SID).unwrap();
        assert_ste_steps(&issued_since(&model, before), SID);
        assert_eq!(smmu.ste(SID).unwrap().0[1] >> 30 & 0b11, 0b10, "STRW = EL2");
        let el2_va = |address| [Issued::El2Va { address }, Issued::Sync];

        let before = consumed(&model);
        smmu.unmap(d, 0x40_1000, 0x1000).unwrap();
        assert_eq!(issued_since(&model, before), el2_va(0x40_1000));
        // A range: one TLBI_EL2_VA with a range (IDR3.RIL).
        let before = consumed(&model);
        smmu.unmap(d, 0x40_4000, 0x4000).unwrap();
        assert_eq!(issued_since(&model, before), el2_va(0x40_4000));
        let before = consumed(&model);
        smmu.protect(d, 0x40_2000, 0x1000, Prot::READ | Prot::CACHEABLE)
            .unwrap();
        assert_eq!(issued_since(&model, before), el2_va(0x40_2000));
        let before = consumed(&model);
        let mut gather = Gather::default();
        smmu.unmap_deferred(d, 0x40_3000, 0x1000, &mut gather).unwrap();
        assert_eq!(issued_since(&model, before), []);
        smmu.sync_domain(d, &mut gather).unwrap();
        assert_eq!(issued_since(&model, before), el2_va(0x40_3000));
        // Trim: the emptied table at 0x20_0000 unlinked, invalidated (non-leaf) in the EL2 regime.
        smmu.unmap(d, 0x20_0000, 0x1000).unwrap();
        let before = consumed(&model);
        assert_eq!(smmu.trim_domain(d), Ok(1));
        let issued = issued_since(&model, before);
        assert_eq!(issued.last(), Some(&Issued::Sync), "{issued:?}");
        assert!(issued.len() > 1, "{issued:?}");
        assert!(
            issued[..issued.len() - 1].iter().all(|i| match *i {
                Issued::El2Va { address } => (0x20_0000..0x40_0000).contains(&address),
                Issued::El2All => true,
                _ => false,
            }),
            "{issued:?}"
        );

        // A substream of the same domain: its CD, and its detach leaves the stream attached (no TLBI).
        let before = consumed(&model);
        smmu.attach_substream(d, SID, 2).unwrap();
        smmu.detach_substream(SID, 2).unwrap();
        assert!(
            issued_since(&model, before)
                .iter()
                .all(|i| matches!(i, Issued::Cd { sid: SID, ssid: 2 } | Issued::Sync)),
            "{:?}",
            issued_since(&model, before)
        );

        let before = consumed(&model);
        smmu.detach(SID).unwrap();
        let issued = issued_since(&model, before);
        let (ste, rest) = issued.split_at(issued.len() - 4);
        assert_ste_steps(ste, SID);
        assert_eq!(
            rest,
            [Issued::CdAll { sid: SID }, Issued::Sync, Issued::El2All, Issued::Sync]
        );
        let before = consumed(&model);
        smmu.free_domain(d).unwrap();
        assert_eq!(issued_since(&model, before), [Issued::El2All, Issued::Sync]);
    }

    /// EL2 entries carry no ASID, so two EL2 domains in use at once would hit each other's entries: while one has
    /// an attachment (stream or substream), attaching another is refused and changes nothing; once it is
    /// detached, the next one may be attached (its entries were dropped by that last detach).
    #[test]
    fn one_el2_stage1_domain_is_in_use_at_a_time() {
        let frames = frames();
        let model = el2_model(frames);
        let mut smmu = smmu(&model, frames);
        let a = el2(&mut smmu, frames);
        let b = el2(&mut smmu, frames);
        let el1 = s1(&mut smmu, frames);
        smmu.attach(a, SID).unwrap();
        smmu.attach(a, SID + 1).unwrap();
        let (before, ste) = (consumed(&model), smmu.ste(SID + 2));
        let in_use = Err(DomainError::El2DomainInUse { domain: b, holder: a });
        assert_eq!(smmu.attach(b, SID + 2), in_use);
        assert_eq!(smmu.ste(SID + 2), ste, "nothing written");
        assert_eq!(smmu.attachments(b), Ok(&[][..]));
        assert_eq!(issued_since(&model, before), []);
        // NS-EL1 domains are tagged by ASID: they are not concerned.
        smmu.attach(el1, SID + 2).unwrap();

        // Still in use through one stream.
        smmu.detach(SID).unwrap();
        assert_eq!(smmu.attach(b, SID), in_use);
        // No longer in use: b may take over, its first attach needs nothing more than a's last detach issued.
        let before = consumed(&model);
        smmu.detach(SID + 1).unwrap();
        let issued = issued_since(&model, before);
        assert_eq!(issued[issued.len() - 2..], [Issued::El2All, Issued::Sync]);
        let before = consumed(&model);
        smmu.attach(b, SID).unwrap();
        assert_ste_steps(&issued_since(&model, before), SID);
        assert_eq!(
            smmu.attach(a, SID + 1),
            Err(DomainError::El2DomainInUse { domain: a, holder: b })
        );
        // a may exist (and be freed) meanwhile.
        smmu.free_domain(a).unwrap();
    }

    /// When the last detach's TLBI_EL2_ALL failed, the previous EL2 domain's entries may still be cached: the
    /// next EL2 domain's attach drops them (TLBI_EL2_ALL + CMD_SYNC) before its STE is written.
    #[test]
    fn switching_el2_domains_after_a_failed_invalidation_drops_the_old_entries_first() {
        let frames = frames();
        let model = el2_model(frames);
        let mut smmu = smmu(&model, frames);
        let a = el2(&mut smmu, frames);
        let b = el2(&mut smmu, frames);
        smmu.attach(a, SID).unwrap();
        model.refuse.store(opcode::TLBI_EL2_ALL, Ordering::SeqCst);
        assert!(matches!(smmu.detach(SID), Err(DomainError::Invalidation(_))));
        model.refuse.store(0, Ordering::SeqCst);
        assert_eq!(smmu.attachments(a), Ok(&[][..]), "the stream itself is detached");

        let before = consumed(&model);
        smmu.attach(b, SID + 1).unwrap();
        let issued = issued_since(&model, before);
        assert_eq!(issued[..2], [Issued::El2All, Issued::Sync], "{issued:?}");
        assert_ste_steps(&issued[2..], SID + 1);
        // Done once: b's next attach needs none.
        let before = consumed(&model);
        smmu.attach(b, SID + 2).unwrap();
        assert_ste_steps(&issued_since(&model, before), SID + 2);
    }

    /// A stream's STE fixes its regime (STRW) for all its substreams: an EL2 domain's CD under an NS-EL1 stream
    /// would be walked as NS-EL1 and invalidated by the wrong commands, and the reverse. Both are refused, nothing
    /// written.
    #[test]
    fn a_streams_substreams_all_use_its_regime() {
        let frames = frames();
        let model = el2_model(frames);
        let mut smmu = smmu(&model, frames);
        let el1 = s1(&mut smmu, frames);
        let other_el1 = s1(&mut smmu, frames);
        let el2 = el2(&mut smmu, frames);
        smmu.attach(el1, SID).unwrap();
        let before = consumed(&model);
        assert_eq!(
            smmu.attach_substream(el2, SID, 1),
            Err(DomainError::RegimeMismatch {
                sid: SID,
                ssid: 1,
                stream_el2: false
            })
        );
        assert_eq!(issued_since(&model, before), []);
        assert_eq!(smmu.attachments(el2), Ok(&[][..]));
        smmu.attach_substream(other_el1, SID, 1).unwrap();

        smmu.attach(el2, SID + 1).unwrap();
        let before = consumed(&model);
        assert_eq!(
            smmu.attach_substream(el1, SID + 1, 1),
            Err(DomainError::RegimeMismatch {
                sid: SID + 1,
                ssid: 1,
                stream_el2: true
            })
        );
        assert_eq!(issued_since(&model, before), []);
        assert_eq!(smmu.attachments(el1), Ok(&[(SID, 0)][..]));
        smmu.attach_substream(el2, SID + 1, 1).unwrap();
    }

    #[test]
    fn a_guest_context_cd_names_its_tables_granule() {
        // CD TG0, bits [7:6]: 0b00 4 KiB, 0b01 64 KiB, 0b10 16 KiB (IHI 0070 CD.TG0, as TCR_EL1.TG0). T0SZ
        // [5:0] is 64 - the VA bits; IPS [34:32] 0b101 for a 48-bit output.
        let frames = frames();
        let model = Model::start(frames);
        let smmu = smmu(&model, frames);
        for (granule, tg0) in [
            (Granule::Size4K, 0b00),
            (Granule::Size16K, 0b10),
            (Granule::Size64K, 0b01),
        ] {
            let format = Format {
                stage: Stage::One,
                granule,
                input_bits: 42,
                output_bits: 48,
            };
            let table = IoPageTable::new(format, frames, true).unwrap();
            let guest = GuestContext::build(smmu.features(), &frames, &table, 3).unwrap();
            let q0 = guest.cd_table.read(0).unwrap().0[0];
            assert_eq!((q0 >> 6) & 0b11, tg0, "{granule:?}");
            assert_eq!(q0 & 0x3f, 22, "{granule:?}");
            assert_eq!((q0 >> 32) & 0b111, 0b101, "{granule:?}");
        }
    }

    /// The page table of a stage-1 or stage-2 domain, for tests that change its settings.
    fn table_of<'a>(smmu: &'a mut ActiveSmmu<&'static HeapFrames>, d: DomainId) -> &'a mut IoPageTable<DomainMemory> {
        match &mut smmu.domains.get_mut(d).unwrap().translation {
            Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => table,
            Translation::Nested { .. } => unreachable!(),
        }
    }

    /// The Leaf bit (word 1, bit 0) of every TLBI consumed since `from`.
    fn leaf_bits_since(model: &Model, from: usize) -> Vec<bool> {
        let seen = model.seen.lock().unwrap();
        seen.commands[from..]
            .iter()
            .filter(|w| !matches!(Issued::decode(**w), Issued::Sync))
            .map(|w| w[1] & 1 != 0)
            .collect()
    }

    #[test]
    fn sync_domain_refuses_a_gather_another_domain_filled() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let a = s1(&mut smmu, frames);
        let b = s1(&mut smmu, frames);
        // A page at 0 keeps a's level-2 table: the unmap below unlinks one last-level table.
        smmu.map(a, 0, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.map(a, 0x20_0000, 0x8000_1000, 0x2000, RW).unwrap();
        smmu.map(b, 0x20_0000, 0x9000_0000, 0x2000, RW).unwrap();
        let mut g = Gather::default();
        assert_eq!(smmu.unmap_deferred(a, 0x20_0000, 0x2000, &mut g), Ok(0x2000));
        assert_eq!(g.freed_tables(), 1);
        let live = frames.live_blocks();
        let before = consumed(&model);
        assert_eq!(
            smmu.sync_domain(b, &mut g),
            Err(DomainError::ForeignGather { domain: b })
        );
        assert_eq!(issued_since(&model, before), [], "b gets no command");
        assert_eq!(frames.live_blocks(), live, "a's unlinked table is not freed");
        // b's own unmaps refuse it too, and the gather is left as it was: a still syncs it.
        assert_eq!(
            smmu.unmap_deferred(b, 0x20_0000, 0x1000, &mut g),
            Err(DomainError::ForeignGather { domain: b })
        );
        assert_eq!(smmu.iova_to_phys(b, 0x20_0000), Ok(Some(0x9000_0000)));
        assert_eq!(g.freed_tables(), 1);
        let asid = asid_of(&smmu, a);
        smmu.sync_domain(a, &mut g).unwrap();
        let mut expected: Vec<Issued> =
            crate::hw::command::plan_range_invalidation(0x20_0000, 0x20_0000, Granule::Size4K, 0)
                .unwrap()
                .map(|piece| Issued::NhVa {
                    vmid: 0,
                    asid,
                    address: piece.address,
                })
                .collect();
        expected.push(Issued::Sync);
        assert_eq!(issued_since(&model, before), expected);
        assert_eq!(frames.live_blocks(), live - 1, "freed after a's invalidation");
        assert!(g.is_empty() && g.owner().is_none(), "synced: empty, reusable");
    }

    #[test]
    fn an_over_limit_trim_in_a_deferred_unmap_is_flushed_inside_the_call() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let d = s1(&mut smmu, frames);
        let asid = asid_of(&smmu, d);
        table_of(&mut smmu, d).set_lazy_free_limit(1);
        // A page at 0 keeps the level-2 table; one page in each of two last-level tables.
        smmu.map(d, 0, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.map(d, 0x20_0000, 0x8000_1000, 0x1000, RW).unwrap();
        smmu.map(d, 0x40_0000, 0x8000_2000, 0x1000, RW).unwrap();
        let live = frames.live_blocks();
        let before = consumed(&model);
        let mut g = Gather::default();
        // The first emptied table stays linked (at the limit); the second goes over it: a trim of both.
        assert_eq!(smmu.unmap_deferred(d, 0x20_0000, 0x1000, &mut g), Ok(0x1000));
        assert_eq!(issued_since(&model, before), []);
        assert_eq!(smmu.unmap_deferred(d, 0x40_0000, 0x1000, &mut g), Ok(0x1000));
        assert_eq!(g.freed_tables(), 0, "the gather returned holds no unlinked table");
        // The trim was flushed inside the call: a walk-cache invalidation (not leaf-only) of both tables' spans
        // under the domain's ASID, its CMD_SYNC, and only then were the two tables freed.
        let mut expected: Vec<Issued> =
            crate::hw::command::plan_range_invalidation(0x20_0000, 0x40_0000, Granule::Size4K, 0)
                .unwrap()
                .map(|piece| Issued::NhVa {
                    vmid: 0,
                    asid,
                    address: piece.address,
                })
                .collect();
        expected.push(Issued::Sync);
        assert_eq!(issued_since(&model, before), expected);
        assert!(leaf_bits_since(&model, before).iter().all(|leaf| !leaf));
        assert_eq!(frames.live_blocks(), live - 2);
        assert_eq!(smmu.domain_table(d).unwrap().empty_tables(), 0);
        // What is left for the sync: the two pages, leaf-only.
        let before = consumed(&model);
        smmu.sync_domain(d, &mut g).unwrap();
        let mut expected: Vec<Issued> =
            crate::hw::command::plan_range_invalidation(0x20_0000, 0x20_1000, Granule::Size4K, 0)
                .unwrap()
                .map(|piece| Issued::NhVa {
                    vmid: 0,
                    asid,
                    address: piece.address,
                })
                .collect();
        expected.push(Issued::Sync);
        assert_eq!(issued_since(&model, before), expected);
        assert!(leaf_bits_since(&model, before).iter().all(|leaf| *leaf));
    }

    #[test]
    fn a_map_over_a_pending_deferred_unmap_is_refused_until_the_sync() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let d = s1(&mut smmu, frames);
        smmu.map(d, 0, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.map(d, 0x20_0000, 0x8000_1000, 0x2000, RW).unwrap();
        let mut g = Gather::default();
        // A range unmap: the last-level table is unlinked with its leaves in place, and the walk cache may still
        // name it (and the TLB the old translations) until the sync.
        assert_eq!(smmu.unmap_deferred(d, 0x20_0000, 0x2000, &mut g), Ok(0x2000));
        let live = frames.live_blocks();
        // Anywhere in the unlinked table's span (a walk cache may name it for any address there), and a range
        // that reaches into it from below.
        let pending = |iova| {
            Err(DomainError::PendingInvalidation {
                iova,
                start: 0x20_0000,
                end: 0x40_0000,
            })
        };
        for iova in [0x20_0000, 0x20_1000, 0x3f_f000] {
            assert_eq!(smmu.map(d, iova, 0x9000_0000, 0x1000, RW), pending(iova));
        }
        assert_eq!(smmu.map(d, 0x1f_e000, 0x9000_0000, 0x4000, RW), pending(0x20_0000));
        assert_eq!(frames.live_blocks(), live, "nothing allocated");
        assert_eq!(smmu.iova_to_phys(d, 0x20_0000), Ok(None));
        assert_eq!(smmu.iova_to_phys(d, 0x1f_e000), Ok(None));
        // Elsewhere: allowed.
        smmu.map(d, 0x40_0000, 0x9000_0000, 0x1000, RW).unwrap();
        smmu.sync_domain(d, &mut g).unwrap();
        smmu.map(d, 0x20_0000, 0x9000_1000, 0x1000, RW).unwrap();
        assert_eq!(smmu.iova_to_phys(d, 0x20_0000), Ok(Some(0x9000_1000)));
    }

    #[test]
    fn the_pending_span_clears_with_the_last_gather_or_a_whole_domain_invalidation() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let d = s1(&mut smmu, frames);
        let asid = asid_of(&smmu, d);
        for k in 0..4u64 {
            smmu.map(d, k << 21, 0x8000_0000 + (k << 12), 0x1000, RW).unwrap();
        }
        let refused = |smmu: &mut ActiveSmmu<&'static HeapFrames>, iova| {
            matches!(
                smmu.map(d, iova, 0x9000_0000, 0x1000, RW),
                Err(DomainError::PendingInvalidation { .. })
            )
        };
        // Two gathers outstanding: syncing one keeps the other's part of the span refused.
        let (mut g1, mut g2) = (Gather::default(), Gather::default());
        smmu.unmap_deferred(d, 0x20_0000, 0x1000, &mut g1).unwrap();
        smmu.unmap_deferred(d, 0x40_0000, 0x1000, &mut g2).unwrap();
        smmu.sync_domain(d, &mut g1).unwrap();
        assert!(refused(&mut smmu, 0x40_0000));
        smmu.sync_domain(d, &mut g2).unwrap();
        assert!(!refused(&mut smmu, 0x40_0000), "the last one synced: cleared");
        // A dropped gather keeps its span refused until the whole domain is invalidated.
        {
            let mut dropped = Gather::default();
            smmu.unmap_deferred(d, 0x60_0000, 0x1000, &mut dropped).unwrap();
        }
        assert!(refused(&mut smmu, 0x60_0000));
        let before = consumed(&model);
        smmu.invalidate_domain(d).unwrap();
        assert_eq!(
            issued_since(&model, before),
            [Issued::NhAsid { vmid: 0, asid }, Issued::Sync]
        );
        assert!(!refused(&mut smmu, 0x60_0000));
        // A gather counted before that invalidation no longer counts: syncing it does not clear the span of one
        // taken after.
        let (mut old, mut new) = (Gather::default(), Gather::default());
        smmu.unmap_deferred(d, 0x20_0000, 0x1000, &mut old).unwrap();
        smmu.invalidate_domain(d).unwrap();
        smmu.unmap_deferred(d, 0x40_0000, 0x1000, &mut new).unwrap();
        smmu.sync_domain(d, &mut old).unwrap();
        assert!(refused(&mut smmu, 0x40_0000));
        smmu.sync_domain(d, &mut new).unwrap();
        assert!(!refused(&mut smmu, 0x40_0000));
    }

    /// Gathers merged through the table (which `domain_table` hands out) stand for every deferred unmap they
    /// hold: syncing the merged one clears the pending span, as syncing each would have (it was left refused for
    /// good, one count per merged gather never taken back).
    #[test]
    fn a_merged_gather_uncounts_every_deferred_unmap_it_holds_when_synced() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let d = s1(&mut smmu, frames);
        let asid = asid_of(&smmu, d);
        let refused = |smmu: &mut ActiveSmmu<&'static HeapFrames>, iova| {
            matches!(
                smmu.map(d, iova, 0x9000_0000, 0x1000, RW),
                Err(DomainError::PendingInvalidation { .. })
            )
        };
        let (a, b) = (0x100_0000, 0x120_0000);
        let fresh = |smmu: &mut ActiveSmmu<&'static HeapFrames>| {
            for iova in [a, b] {
                smmu.map(d, iova, 0x8800_0000, 0x1000, RW).unwrap();
            }
        };
        fresh(&mut smmu);
        let (mut g1, mut g2) = (Gather::default(), Gather::default());
        smmu.unmap_deferred(d, a, 0x1000, &mut g1).unwrap();
        smmu.unmap_deferred(d, b, 0x1000, &mut g2).unwrap();
        smmu.domain_table(d).unwrap().merge(&mut g1, g2).unwrap();
        let before = consumed(&model);
        smmu.sync_domain(d, &mut g1).unwrap();
        // Both pages in one invalidation (range TLBIs over the gather's span), one CMD_SYNC.
        let issued = issued_since(&model, before);
        assert_eq!(
            issued.first(),
            Some(&Issued::NhVa {
                vmid: 0,
                asid,
                address: a
            }),
            "{issued:?}"
        );
        assert_eq!(issued.iter().filter(|i| **i == Issued::Sync).count(), 1, "{issued:?}");
        assert_eq!(issued.last(), Some(&Issued::Sync));
        assert!(!refused(&mut smmu, b), "both synced: cleared");
        smmu.unmap(d, b, 0x1000).unwrap();
        // An older epoch's gather merged into a newer one's counts as the newer alone, and the other way round.
        for older_into_newer in [true, false] {
            fresh(&mut smmu);
            let (mut old, mut new) = (Gather::default(), Gather::default());
            smmu.unmap_deferred(d, a, 0x1000, &mut old).unwrap();
            smmu.invalidate_domain(d).unwrap();
            smmu.unmap_deferred(d, b, 0x1000, &mut new).unwrap();
            assert!(refused(&mut smmu, b));
            let table = smmu.domain_table(d).unwrap();
            let mut merged = if older_into_newer {
                table.merge(&mut new, old).unwrap();
                new
            } else {
                table.merge(&mut old, new).unwrap();
                old
            };
            smmu.sync_domain(d, &mut merged).unwrap();
            assert!(!refused(&mut smmu, b), "{older_into_newer}");
            smmu.unmap(d, b, 0x1000).unwrap();
        }
    }

    #[test]
    fn a_domain_handle_never_becomes_valid_again() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let first = s1(&mut smmu, frames);
        smmu.free_domain(first).unwrap();
        // Slot 0 has been reused until its generation is the last one.
        smmu.domains.slots[0].generation = u64::MAX;
        let last = s1(&mut smmu, frames);
        assert_eq!(last.index(), 0);
        smmu.free_domain(last).unwrap();
        let next = s1(&mut smmu, frames);
        assert_ne!(next, first, "{next} was handed out before");
        assert_eq!(smmu.domain_kind(first), Err(DomainError::StaleDomain(first)));
        assert_eq!(smmu.domain_kind(last), Err(DomainError::StaleDomain(last)));
        assert_eq!(next.index(), 1, "slot 0 is retired");
        assert_eq!(smmu.domains.free_slots(), DEFAULT_DOMAINS - 2);
    }

    /// A substream whose attach failed at an invalidation is recorded: its domain cannot be freed, and
    /// `detach_substream` makes the CD invalid (CFGI_CD + CMD_SYNC) and drops the domain's TLB entries, after which
    /// the domain can go.
    #[test]
    fn a_substream_left_by_a_failed_attach_is_cleaned_up_by_its_detach() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;
        let frames = frames();
        // SSIDSIZE 5 (IDR1[10:6]).
        let model = Model::start_with_idrs(frames, IDRS[0].1, IDRS[1].1 | 5 << 6);
        let mut smmu = smmu(&model, frames);
        let whole = s1(&mut smmu, frames);
        let sub = s1(&mut smmu, frames);
        smmu.attach(whole, SID).unwrap();
        // The second CFGI_CD (the one after V is set) is refused.
        let consumed_so_far = Arc::new(AtomicUsize::new(0));
        let (count, refuse) = (Arc::clone(&consumed_so_far), Arc::clone(&model.refuse));
        *model.probe.lock().unwrap() = Some(std::boxed::Box::new(move || {
            if count.fetch_add(1, Ordering::SeqCst) == 1 {
                refuse.store(opcode::CFGI_CD, Ordering::SeqCst);
            }
            0
        }));
        assert!(matches!(
            smmu.attach_substream(sub, SID, 3),
            Err(DomainError::CdTable(CdTableError::Invalidation(_)))
        ));
        *model.probe.lock().unwrap() = None;
        model.refuse.store(0, Ordering::SeqCst);
        assert_eq!(smmu.attachments(sub), Ok(&[(SID, 3)][..]));
        assert!(matches!(
            smmu.free_domain(sub),
            Err(DomainError::StillAttached { attachments: 1, .. })
        ));
        let asid = asid_of(&smmu, sub);
        let before = model.seen.lock().unwrap().commands.len();
        smmu.detach_substream(SID, 3).unwrap();
        assert_eq!(
            issued_since(&model, before),
            [
                // V = 0 first, then the rest of the CD cleared, each step invalidated.
                Issued::Cd { sid: SID, ssid: 3 },
                Issued::Sync,
                Issued::Cd { sid: SID, ssid: 3 },
                Issued::Sync,
                Issued::NhAsid { vmid: 0, asid },
                Issued::Sync
            ]
        );
        let index = smmu.domains.stream(SID).unwrap();
        let cd = smmu.domains.streams[index].cd_table.as_ref().unwrap().read(3).unwrap();
        assert!(!cd.is_valid());
        smmu.free_domain(sub).unwrap();
    }

    /// Review finding 1 (issue #21, item 1: "never release a table except after the invalidation that covers it").
    /// Dropping an `ActiveSmmu` is a safe call. It must not give a domain's page tables back to the allocator
    /// while the SMMU still translates through them (SMMUEN = 1, the STE naming the CD that names the table):
    /// the allocator would hand those frames out again, and a walk would read whatever is written there next.
    #[test]
    fn finding1_dropping_the_smmu_never_frees_tables_it_still_walks() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let d = s1(&mut smmu, frames);
        smmu.map(d, 0x40_0000, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.attach(d, SID).unwrap();
        assert_eq!(smmu.ste(SID).unwrap().config(), Config::Stage1);
        let root = smmu.domain_table(d).unwrap().root();
        assert!(frames.phys_to_virt(root).is_some());
        drop(smmu);
        // SAFETY: the model's live register block.
        let translating = unsafe { reg32(model.base, 0x20).read_volatile() } & 1 != 0;
        let root_freed = frames.phys_to_virt(root).is_none();
        assert!(
            !(translating && root_freed),
            "SMMUEN = 1 and stream {SID:#x} still walks the table at {root}, which went back to the allocator"
        );
    }

    /// Review finding 2. `ActiveSmmu::submit` is public and safe, and says an extra batch "cannot change what a
    /// domain translates". A CMD_SYNC with an MSI completion (SIG_IRQ, MSIAddress != 0) is a 32-bit write the SMMU
    /// itself performs to any physical address on an SMMU with IDR0.MSI: here into a live page table's first
    /// descriptor (the low word of a descriptor: valid, table/page bit, attributes and output address bits
    /// [31:12]), i.e. a new translation to memory no domain maps. Such a command must never reach the queue from
    /// safe code (through `Batch::push` or `Batch::push_words`).
    #[test]
    fn finding2_a_public_batch_cannot_make_the_smmu_write_memory() {
        use crate::hw::command::{Shareability, SyncCompletion};
        let frames = frames();
        // IDR0.MSI (bit 13): the SMMU performs CMD_SYNC's MSI write.
        let model = Model::start_with(frames, IDRS[0].1 | 1 << 13);
        let mut smmu = smmu(&model, frames);
        assert!(smmu.features().msi);
        let d = s1(&mut smmu, frames);
        smmu.map(d, 0x40_0000, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.attach(d, SID).unwrap();
        let root = smmu.domain_table(d).unwrap().root().0;
        let mut batch = Batch::new();
        batch
            .push(&Command::Sync {
                completion: SyncCompletion::Msi {
                    address: root,
                    // A table descriptor naming PA 0x4000_0000.
                    data: 0x4000_0003,
                    shareability: Shareability::InnerShareable,
                    attributes: 0xf,
                },
            })
            .unwrap();
        let before = model.seen.lock().unwrap().commands.len();
        let submitted = smmu.submit(&batch);
        let msi_writes = model.seen.lock().unwrap().commands[before..]
            .iter()
            .filter(|w| w[0] as u8 == opcode::SYNC && (w[0] >> 12) & 0b11 == 0b01 && w[1] & !0b11 != 0)
            .count();
        assert!(
            submitted.is_err() && msi_writes == 0,
            "safe code made the SMMU write {:#x} to the page table at {root:#x} ({msi_writes} MSI write(s), {submitted:?})",
            0x4000_0003
        );
    }

    /// Review finding 3. `attach_substream` whose second CFGI_CD fails returns `DomainError::CdTable` with the
    /// domain's CD written and valid in the stream's CD table (the hitless writer stops after setting V), but the
    /// substream is not recorded. Nothing then stops `free_domain`: the domain's page tables go back to the
    /// allocator and its ASID is free again, while the valid CD at that substream still names both. (`attach`
    /// records the stream on the same kind of failure "so that the domain cannot be freed under it".)
    #[test]
    fn finding3_a_substream_cd_left_valid_by_a_failed_attach_keeps_its_domain_from_being_freed() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;
        let frames = frames();
        // SSIDSIZE 5 (IDR1[10:6]).
        let model = Model::start_with_idrs(frames, IDRS[0].1, IDRS[1].1 | 5 << 6);
        let mut smmu = smmu(&model, frames);
        let whole = s1(&mut smmu, frames);
        let sub = s1(&mut smmu, frames);
        smmu.map(sub, 0x40_0000, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.attach(whole, SID).unwrap();
        let root = smmu.domain_table(sub).unwrap().root();
        // The first CFGI_CD + CMD_SYNC (qwords 1..7 written) complete; from then on CFGI_CD is refused, so the
        // step that sets V cannot be invalidated.
        let consumed_so_far = Arc::new(AtomicUsize::new(0));
        let (count, refuse) = (Arc::clone(&consumed_so_far), Arc::clone(&model.refuse));
        *model.probe.lock().unwrap() = Some(std::boxed::Box::new(move || {
            if count.fetch_add(1, Ordering::SeqCst) == 1 {
                refuse.store(opcode::CFGI_CD, Ordering::SeqCst);
            }
            0
        }));
        let attached = smmu.attach_substream(sub, SID, 3);
        *model.probe.lock().unwrap() = None;
        model.refuse.store(0, Ordering::SeqCst);
        assert!(matches!(attached, Err(DomainError::CdTable(_))), "{attached:?}");
        let index = smmu.domains.stream(SID).unwrap();
        let cd = smmu.domains.streams[index].cd_table.as_ref().unwrap().read(3).unwrap();
        let freed = smmu.free_domain(sub);
        assert!(
            !(cd.is_valid() && freed.is_ok()),
            "substream 3 of stream {SID:#x} keeps a valid CD (ASID {}) naming the table at {root}, and its domain was \
             freed: the table is back in the allocator ({}), the ASID free for the next domain",
            cd.asid(),
            frames.phys_to_virt(root).is_none()
        );
    }
}
