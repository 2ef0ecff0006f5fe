//! Why a domain operation failed.

use core::fmt;

use crate::ctx::CdTableError;
use crate::hw::ste::EntryError;
use crate::ids::{DomainId, IdError};
use crate::pgtable::MapError;
use crate::queue::cmdq::CommandQueueError;
use crate::smmu::{AttachError, InvalidationError};
use crate::stream::StreamError;

use super::DomainKind;

/// Which fixed-capacity list is full ([`DomainError::TooMany`]). Its `Display` names what there are too many of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Capacity {
    /// Streams attached at once ([`InitOptions::attached_streams`](crate::InitOptions::attached_streams)): detach one, or initialise with more.
    AttachedStreams,
    /// Attachments (streams and substreams) the domains hold together: no node is left.
    Attachments,
    /// Substreams attached to one stream (at most [`MAX_SUBSTREAMS_PER_STREAM`](super::MAX_SUBSTREAMS_PER_STREAM)).
    SubstreamsOfStream,
    /// Preserved domains (the token index holds as many as the domain table).
    PreservedDomains,
    /// Restored domains waiting to be retrieved.
    RestoredDomains,
}

impl fmt::Display for Capacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Capacity::AttachedStreams => "attached streams",
            Capacity::Attachments => "attachments",
            Capacity::SubstreamsOfStream => "substreams of the stream",
            Capacity::PreservedDomains => "preserved domains",
            Capacity::RestoredDomains => "restored domains",
        })
    }
}

/// What the SMMU (or the driver on it) cannot do ([`DomainError::Unsupported`]). Its `Display` says why, naming
/// the ID register field where there is one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Unsupported {
    /// No stage 1 (IDR0.S1P = 0).
    NoStage1,
    /// An EL2 stage-1 domain needs EL2 contexts (IDR0.HYP = 0).
    NoEl2Contexts,
    /// No stage 2 (IDR0.S2P = 0).
    NoStage2,
    /// No nested translation (both stages, and no erratum against nesting).
    NoNesting,
    /// The guest's CD table has more substreams than the SMMU can index (IDR1.SSIDSIZE).
    GuestCdTableTooLarge {
        /// The guest CD table's size, log2 of its entries.
        cd_max_log2: u8,
        /// SubstreamID bits the SMMU has (IDR1.SSIDSIZE).
        ssid_bits: u8,
    },
    /// Stalling is forced (IDR0.STALL_MODEL = 0b10) and this driver does not resume stalled transactions.
    StallsForced,
    /// A stage-1 stream's STE was asked for without its CD table.
    Stage1WithoutCdTable,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unsupported::NoStage1 => f.write_str("no stage 1 (IDR0.S1P = 0)"),
            Unsupported::NoEl2Contexts => f.write_str("EL2 stage 1 needs EL2 contexts (IDR0.HYP)"),
            Unsupported::NoStage2 => f.write_str("no stage 2 (IDR0.S2P = 0)"),
            Unsupported::NoNesting => f.write_str("no nested translation on this SMMU"),
            Unsupported::GuestCdTableTooLarge { cd_max_log2, ssid_bits } => write!(
                f,
                "the guest's CD table has more substreams (2^{cd_max_log2}) than IDR1.SSIDSIZE ({ssid_bits} bits)"
            ),
            Unsupported::StallsForced => f.write_str(
                "stalling is forced (IDR0.STALL_MODEL = 0b10) and this driver does not resume stalled transactions",
            ),
            Unsupported::Stage1WithoutCdTable => f.write_str("a stage-1 stream needs its CD table"),
        }
    }
}

/// What kind of domain an operation needs ([`DomainError::WrongKind`]). Its `Display` says it, and why where the
/// reason is not plain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Wanted {
    /// A stage-2 domain, as the parent of a nested domain.
    Stage2Parent,
    /// A stage-1 or stage-2 domain: one whose page table the driver owns (a nested domain's stage 1 belongs to its
    /// guest).
    Stage1OrStage2,
    /// A stage-1 or stage-2 domain, whose mappings change (an identity domain's are fixed).
    ChangingMappings,
    /// A nested domain.
    Nested,
    /// A stage-1 domain.
    Stage1,
}

impl fmt::Display for Wanted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Wanted::Stage2Parent => "a stage-2 parent",
            Wanted::Stage1OrStage2 => "a stage-1 or stage-2 domain (a nested domain's stage 1 belongs to its guest)",
            Wanted::ChangingMappings => {
                "a stage-1 or stage-2 domain whose mappings change (an identity domain's are fixed)"
            }
            Wanted::Nested => "a nested domain",
            Wanted::Stage1 => "a stage-1 domain",
        })
    }
}

/// Why a domain operation failed. Every operation that returns an error changed nothing, except where the
/// variant says otherwise (a failed invalidation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DomainError {
    /// The handle names a domain that was freed (or never existed).
    StaleDomain(DomainId),
    /// Every domain slot is in use.
    NoDomainSlot {
        /// The capacity.
        capacity: usize,
    },
    /// A fixed-capacity list is full: which one.
    TooMany(Capacity),
    /// The operation needs another kind of domain.
    WrongKind {
        /// The domain.
        domain: DomainId,
        /// Its kind.
        kind: DomainKind,
        /// What the operation needs.
        wanted: Wanted,
    },
    /// The SMMU cannot do this (a stage it lacks, no substreams, a stall model the driver does not serve): why.
    Unsupported(Unsupported),
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
    /// The memory given is a handover memory another domain owns already (one domain per memory).
    MemoryOwned,
    /// The domain's memory would not survive a live update: create it with a handover memory.
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
    /// The memory given is sealed by a prepared hand-off (the SMMU's own memory, or a preserved domain's): it hands
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
    /// The output range of a map shares a byte with memory declared protected (`Iommu::protect_memory`:
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
            DomainError::TooMany(capacity) => write!(f, "too many {capacity}"),
            DomainError::WrongKind { domain, kind, wanted } => {
                write!(f, "{domain} is a {kind} domain; this needs {wanted}")
            }
            DomainError::Unsupported(why) => write!(f, "the SMMU cannot do this: {why}"),
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
                f.write_str("that handover memory belongs to another domain: take one per domain")
            }
            DomainError::NotHandoverMemory(d) => write!(
                f,
                "{d} takes its tables from memory that does not survive a live update: create it with a handover memory"
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
