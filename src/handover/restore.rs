//! Live update, the next image: [`Iommu::restore_handover`] validates the region completely, verifies the
//! preserved memory, then rebuilds the domains (their IDs reserved, their page tables and CD tables adopted in
//! place, their streams' STEs installed); [`running_smmu`] finds an SMMU the previous image left translating.
//! The two other steps of a hand-off live beside it (`prepare.rs`, `finish.rs`); their types are re-exported here,
//! where callers have always named them.

use super::finish::rearm_without;
use super::format::{self, HandoverError};
use super::pool::{HandoverMemory, HandoverPool, PoolError};
use super::verify::{Outputs, RestoreOptions, VerifyFailure, verify_instance};
use super::{Extent, InstanceRecords, RecordKind, SmmuIdentity};
use crate::ctx::{CdTable, CdTableError, CdTableFormat};
use crate::domain::{
    Book, Capacity, DomainError, DomainMemory, DomainState, GuestStage1, Iommu, MAX_SUBSTREAMS_PER_STREAM, StorageVec,
    StreamRecord, Translation,
};
use crate::hw::ste::{CdTableLayout, DefaultSubstream};
use crate::ids::IdError;
use crate::mem::MemoryHooks;
use crate::mem::{FrameAllocator, PhysAddr};
use crate::pgtable::{AdoptedCounts, Format, Granule, IoPageTable, MapError, Stage};
use crate::queue::cmdq::CommandQueueError;
use crate::smmu::Smmu;
use crate::smmu::{AttachError, RunningSmmu};
use crate::stream::StreamTableFormat;

pub use super::finish::{FinishError, FinishReport, REGION_METADATA_BYTES};
pub use super::prepare::{HandoverPhase, PrepareError};

/// Why a restore refused the region (or was asked at the wrong time). A refusal leaves nothing translating: see
/// [`Iommu::restore_handover`]; the region's bytes stay untouched for diagnosis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RestoreError {
    /// This driver restored the records of `generation` already (and consumed them): a record restores once, so a
    /// domain retrieved and freed since can never come back. Nothing changed.
    AlreadyRestored {
        /// The generation restored.
        generation: u64,
    },
    /// This driver prepared a hand-off (records of `generation`): restoring them here would take back memories its
    /// own domains use. Cancel it first. Nothing changed.
    HandoverPrepared {
        /// The prepared records' generation.
        generation: u64,
    },
    /// The pool is not set up.
    Pool(PoolError),
    /// The region does not validate (corrupt, torn, another version, outside the pool, ...).
    Region(HandoverError),
    /// The region was written for another SMMU (or this one with other ID registers).
    Identity(HandoverError),
    /// A record needs more than this SMMU offers (an ASID, VMID, StreamID or substream width).
    BeyondLimits {
        /// The record.
        token: u64,
        /// What is beyond this image: its `Display` names the value's meaning.
        what: RestoreLimit,
        /// The value (which [`RestoreLimit`] variant says what it counts or names).
        value: u64,
    },
    /// After a hand-off with the SMMU running: a stream the previous image left translating, which no record
    /// names, could not be made to abort (or the invalidation that follows failed). Its STE may be live, with an
    /// ASID or VMID this image would hand out again.
    UnrestoredStreams(AttachError),
    /// A record's preserved memory does not say what the record says (its page table, its CDs): found by
    /// verification, before anything was installed ([`super::verify`]).
    Verify {
        /// The record.
        token: u64,
        /// What is wrong, and where.
        what: VerifyFailure,
    },
    /// Rebuilding failed after validation (cannot happen for a region that validated; reported, not assumed).
    /// Every stream it touched aborts again.
    Rebuild {
        /// The record.
        token: u64,
        /// What failed.
        what: RebuildFailure,
    },
}

/// What a record needs beyond what this SMMU or this image offers ([`RestoreError::BeyondLimits`]); each variant says
/// what the error's `value` is. Its `Display` reads before the value (`needs {limit} {value}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RestoreLimit {
    /// No memory for the restore's bookkeeping of the records: `value` is the number of records.
    BookkeepingRecords,
    /// No memory for the restore's bookkeeping of the streams: `value` is the number of streams (and substreams)
    /// the records hold.
    BookkeepingStreams,
    /// No protected-memory slot is left for the handover region: `value` is the number of slots
    /// ([`MAX_PROTECTED`](crate::protected::MAX_PROTECTED)).
    ProtectedSlot,
    /// More records than free domain slots: `value` is the number of records.
    DomainSlots,
    /// More streams than this image can attach, with those attached already: `value` is the number of streams.
    AttachableStreams,
    /// More restored domains than can wait to be retrieved, with those an earlier hand-off left: `value` is their
    /// number.
    WaitingDomains,
    /// An ASID another stage-1 record uses too (one ASID allocator serves both regimes): `value` is the ASID.
    SharedAsid,
    /// An ASID beyond the SMMU's ASID width: `value` is the ASID.
    AsidWidth,
    /// A VMID beyond the SMMU's VMID width: `value` is the VMID.
    VmidWidth,
    /// A stage this SMMU lacks (stage 1, stage 2, or nesting): `value` is the record's kind
    /// ([`RecordKind`] as `u32`).
    MissingStage,
    /// An EL2 stage-1 record on an SMMU without EL2 contexts (IDR0.HYP = 0): `value` is the record's kind.
    NoEl2Contexts,
    /// An EL2 stage-1 record with streams while this image has an EL2 stage-1 domain in use (EL2 has no ASIDs):
    /// `value` is the record's number of streams.
    El2InUse,
    /// An EL2 stage-1 record with streams beside another such record: `value` is the record's number of streams.
    El2InUseByAnotherRecord,
    /// An ASID reserved or taken in this image: `value` is the ASID.
    AsidTaken,
    /// A VMID reserved or taken in this image: `value` is the VMID.
    VmidTaken,
    /// A StreamID attached in this image already: `value` is the StreamID.
    StreamAttached,
    /// A token a domain of this image holds (preserved, or restored and waiting): `value` is the token.
    TokenHeld,
    /// A record with a table but no extent (a table needs at least its root's): `value` is 0, the extents.
    NoExtent,
    /// Extents that are not free frames of the pool: `value` is the base of the record's first extent.
    ExtentsNotFree,
    /// A substream of a stream its own record does not hold: `value` is the StreamID.
    SubstreamWithoutStream,
    /// More substreams of one stream than this image attaches
    /// ([`MAX_SUBSTREAMS_PER_STREAM`]): `value` is the StreamID.
    SubstreamsOfStream,
    /// A StreamID beyond the stream table: `value` is the StreamID.
    StreamIdWidth,
    /// A CD table with more SubstreamID bits than the SMMU has (IDR1.SSIDSIZE): `value` is its SubstreamID bits.
    CdTableSubstreamBits,
    /// A two-level CD table (this driver writes and adopts linear ones): `value` is its SubstreamID bits.
    TwoLevelCdTable,
}

impl core::fmt::Display for RestoreLimit {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            RestoreLimit::BookkeepingRecords => "memory for the restore's bookkeeping, records",
            RestoreLimit::BookkeepingStreams => "memory for the restore's bookkeeping, streams",
            RestoreLimit::ProtectedSlot => "a free protected-memory slot for the handover region, of",
            RestoreLimit::DomainSlots => "more domains than free slots",
            RestoreLimit::AttachableStreams => "more streams than this image can attach, with those attached already",
            RestoreLimit::WaitingDomains => "more restored domains than can wait, with those an earlier hand-off left",
            RestoreLimit::SharedAsid => "an ASID another stage-1 record uses too",
            RestoreLimit::AsidWidth => "ASID",
            RestoreLimit::VmidWidth => "VMID",
            RestoreLimit::MissingStage => "a stage this SMMU lacks, kind",
            RestoreLimit::NoEl2Contexts => "EL2 contexts, kind",
            RestoreLimit::El2InUse => "its EL2 stage-1 domain in use while this image has one in use, streams",
            RestoreLimit::El2InUseByAnotherRecord => "its EL2 stage-1 domain in use beside another record's, streams",
            RestoreLimit::AsidTaken => "an ASID reserved or taken in this image",
            RestoreLimit::VmidTaken => "a VMID reserved or taken in this image",
            RestoreLimit::StreamAttached => "a StreamID attached in this image",
            RestoreLimit::TokenHeld => "a token a domain of this image holds, token",
            RestoreLimit::NoExtent => "no extent: a table needs at least its root's, extents",
            RestoreLimit::ExtentsNotFree => "extents that are not free frames of the pool, from",
            RestoreLimit::SubstreamWithoutStream => "a substream of a stream its own record does not hold, StreamID",
            RestoreLimit::SubstreamsOfStream => "more substreams of one stream than this image attaches, StreamID",
            RestoreLimit::StreamIdWidth => "StreamID",
            RestoreLimit::CdTableSubstreamBits => "a CD table of SubstreamID bits",
            RestoreLimit::TwoLevelCdTable => {
                "a two-level CD table (this driver adopts linear ones), of SubstreamID bits"
            }
        })
    }
}

/// What failed while rebuilding a validated record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RebuildFailure {
    /// Its memory.
    Pool(PoolError),
    /// Its ASID or VMID.
    Id(IdError),
    /// Its page table.
    Table(MapError),
    /// A stream's CD table.
    CdTable(CdTableError<CommandQueueError>),
    /// An STE.
    Attach(AttachError),
    /// The domain table.
    Domain(DomainError),
}

impl core::fmt::Display for RebuildFailure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RebuildFailure::Pool(e) => write!(f, "its memory: {e}"),
            RebuildFailure::Id(e) => write!(f, "its ASID or VMID: {e}"),
            RebuildFailure::Table(e) => write!(f, "its page table: {e}"),
            RebuildFailure::CdTable(e) => write!(f, "a stream's CD table: {e}"),
            RebuildFailure::Attach(e) => write!(f, "an STE: {e}"),
            RebuildFailure::Domain(e) => write!(f, "the domain table: {e}"),
        }
    }
}

impl core::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RestoreError::AlreadyRestored { generation } => write!(
                f,
                "restore: the records of generation {generation} were restored already (a record restores once)"
            ),
            RestoreError::HandoverPrepared { generation } => write!(
                f,
                "restore: this driver prepared a hand-off (generation {generation}): cancel it before restoring"
            ),
            RestoreError::Pool(e) => write!(f, "restore: {e}"),
            RestoreError::Region(e) => write!(f, "restore: the handover region is refused: {e}"),
            RestoreError::Identity(e) => write!(f, "restore: the handover region is for another SMMU: {e}"),
            RestoreError::BeyondLimits { token, what, value } => {
                write!(
                    f,
                    "restore: record {token:#x} needs {what} {value:#x}, beyond this SMMU"
                )
            }
            RestoreError::UnrestoredStreams(e) => write!(
                f,
                "restore: a stream the previous image left translating could not be made to abort: {e}"
            ),
            RestoreError::Verify { token, what } => write!(f, "restore: record {token:#x} refused: {what}"),
            RestoreError::Rebuild { token, what } => {
                write!(f, "restore: record {token:#x} could not be rebuilt: {what}")
            }
        }
    }
}

/// What a restore found and rebuilt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// The region's generation.
    pub generation: u64,
    /// Domains rebuilt (waiting for [`Iommu::retrieve`]).
    pub domains: u32,
    /// Streams (and substreams) whose STE or CD was reinstalled.
    pub streams: u32,
    /// Page tables adopted without a walk (their counts were recorded).
    pub adopted_without_walk: u32,
    /// After a hand-off with the SMMU running: streams the previous image left translating that no record names,
    /// made to abort before the restore returned (0 after a warm reset).
    pub aborted: u32,
}

/// What a restore took before it succeeded or was refused: the streams whose STEs it installed and the memories it
/// took back. A refusal aborts the former before it gives the latter back.
#[derive(Default)]
struct Taken {
    /// Streams whose STE the rebuild installed (at most every stream of every record, which `check_limits` keeps
    /// within what this image attaches).
    streams: Option<StorageVec<u32>>,
    /// Memories taken back from the pool (at most one per record; out of line, sized by the records).
    memories: Option<StorageVec<Option<&'static HandoverMemory>>>,
    /// The tokens of the domains the rebuild put in `restored` (a refusal forgets these, and only these: an
    /// earlier hand-off may have left a parent there for a live nested domain).
    domains: Option<StorageVec<u64>>,
}

impl Taken {
    fn memories(&self) -> impl Iterator<Item = &'static HandoverMemory> + '_ {
        self.memories
            .iter()
            .flat_map(|m| m.as_slice().iter().flatten().copied())
    }

    fn domains(&self) -> &[u64] {
        self.domains.as_ref().map_or(&[], |d| d.as_slice())
    }

    fn streams(&self) -> &[u32] {
        self.streams.as_ref().map_or(&[], |d| d.as_slice())
    }

    /// Gives the out-of-line parts back to `allocator`.
    ///
    /// # Safety
    /// They must have come from `allocator`.
    unsafe fn release(self, allocator: &dyn FrameAllocator) {
        // SAFETY: the caller's guarantee, passed on.
        unsafe {
            if let Some(m) = self.memories {
                m.release(allocator);
            }
            if let Some(d) = self.domains {
                d.release(allocator);
            }
            if let Some(t) = self.streams {
                t.release(allocator);
            }
        }
    }
}

fn layout_of(layout: u8) -> CdTableLayout {
    match layout {
        1 => CdTableLayout::TwoLevel4K,
        2 => CdTableLayout::TwoLevel64K,
        _ => CdTableLayout::Linear,
    }
}

fn dss_of(dss: u8) -> DefaultSubstream {
    match dss {
        1 => DefaultSubstream::Bypass,
        2 => DefaultSubstream::Substream0,
        _ => DefaultSubstream::Terminate,
    }
}

/// For a hand-off with the SMMU left running: what the previous image recorded about `smmu` (found by
/// `register_base` in the validated region), checked against `smmu` itself before anything is adopted: its ID
/// registers (IDR0..5, IIDR, as [`format::validate_identity`] compares them) and the stream table it really runs
/// with (STRTAB_BASE and STRTAB_BASE_CFG read back). Then the memory of its structures is taken back whole, so
/// nothing in it is handed out again. Give the memory and the recorded SMMU to [`crate::Smmu::adopt_running`].
///
/// # Errors
/// [`RestoreError::Pool`]; [`RestoreError::Region`] for a region that does not validate;
/// [`RestoreError::Identity`] for another SMMU, or one whose stream table is not the recorded one
/// ([`HandoverError::IdentityMismatch`] naming `STRTAB_BASE` or `STRTAB_BASE_CFG`). `Ok(None)` when the region names
/// no running SMMU at `register_base`. In every case but `Ok(Some(..))` the running SMMU cannot be taken over, and
/// its STEs walk memory this image has not taken back: it is left as [`Smmu::disable_aborting`] leaves it
/// (translation off, every incoming transaction aborting); initialise it afresh.
pub fn running_smmu(
    pool: &'static HandoverPool,
    smmu: &Smmu,
    register_base: u64,
) -> Result<Option<(RunningSmmu, &'static HandoverMemory)>, RestoreError> {
    let found = running_record(pool, smmu, register_base);
    if !matches!(found, Ok(Some(_))) {
        let _ = smmu.disable_aborting();
    }
    found
}

fn running_record(
    pool: &'static HandoverPool,
    smmu: &Smmu,
    register_base: u64,
) -> Result<Option<(RunningSmmu, &'static HandoverMemory)>, RestoreError> {
    let pool_extent = pool.pool().map_err(RestoreError::Pool)?;
    let found = {
        let mut guard = pool.lock_metadata().map_err(RestoreError::Pool)?;
        let (bytes, _, scratch) = guard.with_staging();
        let decoded = format::decode(bytes, pool_extent, scratch).map_err(RestoreError::Region)?;
        decoded
            .instances
            .iter()
            .map(|i| i.identity)
            .find(|id| id.base == register_base && id.core_len != 0)
    };
    let Some(id) = found else {
        return Ok(None);
    };
    let raw = smmu.features().raw;
    let probed = SmmuIdentity {
        base: register_base,
        idr: raw.idr,
        iidr: raw.iidr,
        ..SmmuIdentity::default()
    };
    format::validate_identity(&id, &probed).map_err(RestoreError::Identity)?;
    let format = match id.strtab_format {
        1 => StreamTableFormat::TwoLevel {
            sid_bits: id.strtab_sid_bits,
            split: id.strtab_split,
        },
        _ => StreamTableFormat::Linear {
            sid_bits: id.strtab_sid_bits,
        },
    };
    let mismatch = |what, recorded: u64, probed: u64| {
        RestoreError::Identity(HandoverError::IdentityMismatch { what, recorded, probed })
    };
    let (strtab_base, programmed) = smmu.programmed_stream_table();
    if strtab_base != id.strtab_base {
        return Err(mismatch("STRTAB_BASE", id.strtab_base, strtab_base));
    }
    if programmed != Some(format) {
        // STRTAB_BASE_CFG's layout: LOG2SIZE [5:0], SPLIT [10:6], FMT [17:16].
        let recorded =
            u64::from(id.strtab_sid_bits) | u64::from(id.strtab_split) << 6 | u64::from(id.strtab_format) << 16;
        let probed = u64::from(tock_registers::interfaces::Readable::get(&smmu.regs().strtab_base_cfg));
        return Err(mismatch("STRTAB_BASE_CFG", recorded, probed));
    }
    let core = Extent {
        base: id.strtab_base,
        len: id.core_len,
    };
    let window = pool.window_bytes().map_err(RestoreError::Pool)?;
    let memory = pool.adopt_window(core, window).map_err(RestoreError::Pool)?;
    let running = RunningSmmu {
        idr: id.idr,
        iidr: id.iidr,
        format,
        strtab_base: id.strtab_base,
    };
    Ok(Some((running, memory)))
}

impl<A: FrameAllocator, const D: usize> Iommu<A, D> {
    /// After a warm reset (or in a new image), with this SMMU just initialised (every stream aborting) or adopted
    /// running ([`crate::Smmu::adopt_running`]): validates the handover region of `pool` completely (see
    /// `docs/handover.md`), checks that it was written for this SMMU (`register_base` and the ID registers) and that
    /// every ID and StreamID fits it, verifies the preserved memory the records name (with
    /// [`Verification::Full`](super::verify::Verification), the default: every page table walked from its root,
    /// every leaf inside `options.dma_memory` and outside the region and the memory declared with
    /// [`Iommu::protect_memory`], every live-entry count as walked; in every mode each adopted CD equal to the
    /// one the driver builds), and only then rebuilds this SMMU's preserved domains: each memory taken back,
    /// each ASID/VMID reserved as recorded (no STE or CD is scanned), each page table and CD table adopted in place
    /// (no copy), each stream's STE installed. The domains wait for
    /// [`Iommu::retrieve`]; [`Iommu::finish_handover`] frees the rest. The records are consumed: the
    /// region is re-armed without this SMMU's (a record restores once, so a domain retrieved and freed since can
    /// never come back, not even after another reset). A region that was never written (or re-armed without this
    /// SMMU's records) restores nothing. On success the region (`pool`'s) is declared protected memory, so no later
    /// `map` can give it to a device.
    ///
    /// On an SMMU adopted running, a restore that succeeds (records found or not) settles the hand-off before it
    /// returns: every stream no restored domain holds aborts (the previous image's that no record names, and any
    /// this image set to bypass or abort meanwhile), then CFGI_ALL, the TLBIs of every regime and CMD_SYNC drop what
    /// they may have cached ([`RestoreReport::aborted`] counts them). Until then no ASID or VMID is allocated
    /// ([`crate::ids::IdError::HandOffUnsettled`]), so no domain of this image can share an ID with a stream the
    /// previous image left translating.
    ///
    /// # Errors
    /// [`RestoreError::AlreadyRestored`] and [`RestoreError::HandoverPrepared`] (see the table in
    /// [`crate::handover`]): nothing changed. [`RestoreError::UnrestoredStreams`] when settling an adopted SMMU's
    /// streams failed. [`RestoreError::Verify`] names the record, the address and what its memory gets wrong;
    /// [`RestoreError::BeyondLimits`] also when no protected-memory slot is left for the region. Any other error is
    /// a refusal too, and every refusal leaves through one
    /// exit, whatever check refused: every stream the rebuild installed aborts again (its STE rewritten, CFGI_STE,
    /// CMD_SYNC); on an SMMU adopted running, every stream that is not this image's own aborts (the previous image's
    /// STEs may be live); then CFGI_ALL, TLBI of every regime and CMD_SYNC; only then do the memories taken back
    /// return to the pool (their memory handed out again) and the IDs claimed return to their allocators. The
    /// region is untouched. Should an abort or the invalidation fail (the command queue dead), translation is turned
    /// off with every incoming transaction aborting ([`crate::Smmu::disable_aborting`]): [`Iommu::is_enabled`]
    /// then reads `false`, and the caller shuts the SMMU down (`shutdown(false)`, GBPA.ABORT = 1) and initialises it
    /// afresh; should even that fail (`is_enabled` still `true`), nothing is given back (the memories stay taken, the
    /// IDs claimed) and the caller must stop the SMMU by other means (GBPA.ABORT = 1, SMMUEN = 0) before it trusts
    /// that memory.
    pub fn restore_handover(
        &self,
        pool: &'static HandoverPool,
        register_base: u64,
        options: &RestoreOptions<'_>,
    ) -> Result<RestoreReport, RestoreError> {
        // The whole restore holds the bookkeeping (a boot-time operation: nothing else attaches meanwhile; an
        // attach or detach half-way is waited for).
        let mut book = self.book_quiet();
        let book = &mut *book;
        // Asked at the wrong point of the lifecycle: refused before anything is looked at.
        if let Some(generation) = book.restored_generation {
            return Err(RestoreError::AlreadyRestored { generation });
        }
        if let Some(generation) = self.domains.prepared_generation() {
            return Err(RestoreError::HandoverPrepared { generation });
        }
        let mut taken = Taken::default();
        let restored = self
            .restore_records(book, pool, register_base, options, &mut taken)
            .and_then(|(mut report, found)| {
                report.aborted = self.abort_inherited_streams(book)?;
                Ok((report, found))
            });
        let restored = restored.inspect_err(|_| self.contain_refused_restore(book, &taken));
        // SAFETY: `Taken`'s out-of-line parts came from this allocator (`restore_records`).
        unsafe { core::mem::take(&mut taken).release(self.domains.bookkeeping_allocator(self.allocator())) };
        match restored {
            Ok((report, found)) => {
                if found {
                    book.restored_generation = Some(report.generation);
                    // Consumed: what was rebuilt is this image's now (its tables change in place), so the records
                    // must never rebuild it again.
                    let _ = rearm_without(pool, register_base);
                }
                Ok(report)
            }
            Err(e) => {
                // The frames given back (named) that the region no longer names are free again; those it names
                // stay named: no memory takes them before a restore, or a finish, settles the records.
                if let Ok(mut guard) = pool.lock_metadata() {
                    let (bytes, _, scratch) = guard.with_staging();
                    pool.rename_recorded(bytes, scratch);
                }
                Err(e)
            }
        }
    }

    /// On an SMMU adopted running whose inherited STEs are not settled yet: makes every stream no domain holds
    /// abort and invalidates everything (see [`Iommu::abort_unrestored_streams`]). Returns how many aborted.
    fn abort_inherited_streams(&self, book: &Book<D>) -> Result<u32, RestoreError> {
        if !self.core.inherited_stes() {
            return Ok(0);
        }
        self.abort_unrestored_locked(book)
            .map_err(RestoreError::UnrestoredStreams)
    }

    /// The restore proper; any error it returns goes through [`Iommu::contain_refused_restore`]. Returns the
    /// report and whether the region held records of this SMMU.
    fn restore_records(
        &self,
        book: &mut Book<D>,
        pool: &'static HandoverPool,
        register_base: u64,
        options: &RestoreOptions<'_>,
        taken: &mut Taken,
    ) -> Result<(RestoreReport, bool), RestoreError> {
        let pool_extent = pool.pool().map_err(RestoreError::Pool)?;
        // The region is copied into the pool's staging buffer and decoded there: the records are read from that
        // copy as they are used, which nothing else writes (a device that could write the region itself changes
        // nothing the checks saw), under the metadata lock held until the records are rebuilt.
        let mut guard = pool.lock_metadata().map_err(RestoreError::Pool)?;
        let (bytes, snapshot, scratch) = guard.with_staging();
        if bytes[..8].iter().all(|&b| b == 0) {
            return Ok((RestoreReport::default(), false));
        }
        // What the header says the region takes (decode refuses a length the area cannot hold).
        let len = format::peek_header(bytes)
            .ok()
            .and_then(|h| usize::try_from(h.total_len).ok())
            .map_or(bytes.len(), |n| n.clamp(format::HEADER_SIZE, bytes.len()));
        snapshot[..len].copy_from_slice(&bytes[..len]);
        let decoded = format::decode(&snapshot[..len], pool_extent, scratch).map_err(RestoreError::Region)?;
        let mut report = RestoreReport {
            generation: decoded.generation,
            ..RestoreReport::default()
        };
        let Some(instance) = decoded.instances.iter().find(|i| i.identity.base == register_base) else {
            return Ok((report, false));
        };
        let probed = self.handover_identity(register_base);
        format::validate_identity(&instance.identity, &probed).map_err(RestoreError::Identity)?;
        self.check_limits(book, pool, instance, scratch)?;
        // What the rebuild takes, kept for a refusal to give back: room for every record, out of line.
        let records = instance.records.len();
        let room = |what, value: usize| RestoreError::BeyondLimits {
            token: instance.records.first().map_or(0, |r| r.token),
            what,
            value: value as u64,
        };
        taken.memories = Some(
            StorageVec::with_capacity(self.domains.bookkeeping_allocator(self.allocator()), records, None)
                .map_err(|_| room(RestoreLimit::BookkeepingRecords, records))?,
        );
        taken.domains = Some(
            StorageVec::with_capacity(self.domains.bookkeeping_allocator(self.allocator()), records, 0)
                .map_err(|_| room(RestoreLimit::BookkeepingRecords, records))?,
        );
        let streams = instance.records.iter().map(|r| r.streams.len()).sum::<usize>();
        taken.streams = Some(
            StorageVec::with_capacity(self.domains.bookkeeping_allocator(self.allocator()), streams, 0)
                .map_err(|_| room(RestoreLimit::BookkeepingStreams, streams))?,
        );
        let region = pool.region().map_err(RestoreError::Pool)?;
        // Under the protected list's writer lock (maps go on reading the published copy), so that no
        // `protect_memory` meanwhile is lost when the list with the region is published.
        self.domains.protected.update(|protected| -> Result<(), RestoreError> {
            let mut with_region = protected.clone();
            with_region.add(region).map_err(|_| RestoreError::BeyondLimits {
                token: instance.records.first().map_or(0, |r| r.token),
                what: RestoreLimit::ProtectedSlot,
                value: crate::protected::MAX_PROTECTED as u64,
            })?;
            let outputs = Outputs {
                dma: options.dma_memory,
                region,
                protected: with_region.extents(),
            };
            verify_instance(self.features(), pool, instance, &outputs, options.verify)
                .map_err(|(token, what)| RestoreError::Verify { token, what })?;

            // Rebuild: stage-1 and stage-2 domains, then nested ones, then every stream, then substreams.
            self.rebuild(book, pool, instance, &mut report, taken)?;
            *protected = with_region;
            Ok(())
        })?;
        Ok((report, true))
    }

    /// The single exit of a refused restore (see [`Iommu::restore_handover`]'s errors): contains every stream
    /// that may translate through what the restore took or the previous image left, then gives back what the
    /// restore took, and only when the containment is known to hold.
    fn contain_refused_restore(&self, book: &mut Book<D>, taken: &Taken) {
        // Refused before the rebuild took anything, on an SMMU this image initialised: nothing translates through
        // the restore, so there is nothing to contain (and nothing is issued).
        if taken.streams().is_empty()
            && taken.memories().next().is_none()
            && taken.domains().is_empty()
            && !self.core.inherited_stes()
        {
            return;
        }
        let mut contained = true;
        for &sid in taken.streams() {
            contained &= self.core.abort_stream(sid).is_ok();
        }
        book.streams.retain(|r| !taken.streams().contains(&r.sid));
        if self.core.inherited_stes() {
            // Every stream a domain holds is kept (an O(1) look-up each): the raw abort cannot undercut one.
            let own = &*book;
            match self.core.abort_streams_except(|sid| own.stream(sid).is_some()) {
                Ok(_) => self.core.set_inherited_stes(false),
                Err(_) => contained = false,
            }
        }
        contained &= self.core.invalidate_all().is_ok();
        if !contained {
            contained = self.core.smmu.disable_aborting().is_ok();
        }
        // The domains this restore rebuilt are forgotten, their tables abandoned in place (the SMMU may have walked
        // them). Only those: a parent an earlier hand-off left for a live nested domain stays.
        for token in taken.domains() {
            let Some(id) = book.restored.swap_remove(token) else {
                continue;
            };
            if let Some(state) = self.domains.remove(book, id) {
                if contained {
                    self.release_restored_ids(&state);
                }
                core::mem::forget(state);
            }
        }
        if contained {
            for memory in taken.memories() {
                // SAFETY: every stream that could reach the memory aborts (or translation is off) and the
                // invalidation of every cached configuration and TLB entry completed; the domains built on it were
                // forgotten, so no reference into it is left. Its frames go back named (the region still names
                // them), never free for a moment; the restore's exit then names exactly what the region names.
                unsafe { memory.release_named() };
            }
        }
    }

    /// Frees the ASID or VMID a rebuilt (or half-rebuilt) domain claimed.
    fn release_restored_ids(&self, state: &DomainState) {
        match &state.translation {
            Translation::Stage1 { asid, .. } => {
                let _ = self.core.release_asid(*asid);
            }
            Translation::Stage2 { vmid, .. } => {
                let _ = self.core.release_vmid(*vmid);
            }
            Translation::Nested { .. } | Translation::Fixed(_) => {}
        }
    }

    fn check_limits(
        &self,
        book: &Book<D>,
        pool: &HandoverPool,
        instance: &InstanceRecords,
        scratch: &mut [u64],
    ) -> Result<(), RestoreError> {
        let f = *self.features();
        let first = instance.records.first().map_or(0, |r| r.token);
        // The format has no cap on records or on a record's streams; this image's bookkeeping has (the domain
        // slots, the streams it can attach): beyond it, refused before anything is taken.
        if instance.records.len() > book.free_slots() {
            return Err(RestoreError::BeyondLimits {
                token: first,
                what: RestoreLimit::DomainSlots,
                value: instance.records.len() as u64,
            });
        }
        // The rebuild records each whole stream beside the ones attached here, and each domain beside those an
        // earlier hand-off left waiting: both must fit now, before any STE is installed.
        let streams = instance
            .records
            .iter()
            .flat_map(|r| r.streams.iter())
            .filter(|s| s.ssid == 0)
            .count()
            + book.streams.len();
        if streams > book.streams.capacity() {
            return Err(RestoreError::BeyondLimits {
                token: first,
                what: RestoreLimit::AttachableStreams,
                value: streams as u64,
            });
        }
        let waiting = instance.records.len() + book.restored.len();
        if waiting > D {
            return Err(RestoreError::BeyondLimits {
                token: first,
                what: RestoreLimit::WaitingDomains,
                value: waiting as u64,
            });
        }
        let sid_bits = match self.stream_table_format() {
            crate::stream::StreamTableFormat::Linear { sid_bits }
            | crate::stream::StreamTableFormat::TwoLevel { sid_bits, .. } => sid_bits,
        };
        // Checks across records, in one pass and one sort (n log n, not a scan per record): at most one EL2
        // stage-1 record with streams (EL2 has no ASIDs), and no ASID shared by two stage-1 records of either
        // regime (one ASID allocator serves both).
        let el2_with_streams = instance
            .records
            .iter()
            .filter(|r| r.kind == RecordKind::Stage1El2 && !r.streams.is_empty())
            .count();
        let stage1_only = |k| matches!(k, RecordKind::Stage1 | RecordKind::Stage1El2);
        let mut n = 0;
        for (i, r) in instance.records.iter().enumerate() {
            if stage1_only(r.kind) {
                // Room: a record takes more bytes than a word of scratch (`format::scratch_words`).
                if let Some(slot) = scratch.get_mut(n) {
                    *slot = u64::from(r.asid) << 32 | i as u64;
                    n += 1;
                }
            }
        }
        let keys = &mut scratch[..n];
        keys.sort_unstable();
        if let Some(pair) = keys.windows(2).find(|w| w[0] >> 32 == w[1] >> 32) {
            let token = instance
                .records
                .get((pair[1] & 0xffff_ffff) as usize)
                .map_or(0, |r| r.token);
            return Err(RestoreError::BeyondLimits {
                token,
                what: RestoreLimit::SharedAsid,
                value: pair[1] >> 32,
            });
        }
        for r in &instance.records {
            let beyond = |what: RestoreLimit, value: u64| RestoreError::BeyondLimits {
                token: r.token,
                what,
                value,
            };
            if u32::from(r.asid) >> f.asid_bits != 0 {
                return Err(beyond(RestoreLimit::AsidWidth, r.asid.into()));
            }
            if u32::from(r.vmid) >> f.vmid_bits != 0 {
                return Err(beyond(RestoreLimit::VmidWidth, r.vmid.into()));
            }
            let stage1 = matches!(r.kind, RecordKind::Stage1 | RecordKind::Stage1El2 | RecordKind::Nested);
            let stage2 = matches!(r.kind, RecordKind::Stage2 | RecordKind::Nested);
            if (stage1 && !f.stage1) || (stage2 && !f.stage2) || (r.kind == RecordKind::Nested && !f.nesting) {
                return Err(beyond(RestoreLimit::MissingStage, r.kind as u64));
            }
            if r.kind == RecordKind::Stage1El2 && !f.hyp {
                return Err(beyond(RestoreLimit::NoEl2Contexts, r.kind as u64));
            }
            // One EL2 stage-1 domain in use at a time (EL2 has no ASIDs): a record's with streams neither beside
            // one this image has in use nor beside another record's.
            if r.kind == RecordKind::Stage1El2 && !r.streams.is_empty() {
                if self.domains.el2_in_use(None).is_some() {
                    return Err(beyond(RestoreLimit::El2InUse, r.streams.len() as u64));
                }
                if el2_with_streams > 1 {
                    return Err(beyond(RestoreLimit::El2InUseByAnotherRecord, r.streams.len() as u64));
                }
            }
            // The IDs a record's domain owns must be free here (0 is reserved, never a domain's), and its streams
            // unattached: checked now, so that a restore into an image that already uses them changes nothing.
            if matches!(r.kind, RecordKind::Stage1 | RecordKind::Stage1El2) && self.core.asid_taken(r.asid) {
                return Err(beyond(RestoreLimit::AsidTaken, r.asid.into()));
            }
            if r.kind == RecordKind::Stage2 && self.core.vmid_taken(r.vmid) {
                return Err(beyond(RestoreLimit::VmidTaken, r.vmid.into()));
            }
            if let Some(s) = r.streams.iter().find(|s| book.stream(s.sid).is_some()) {
                return Err(beyond(RestoreLimit::StreamAttached, s.sid.into()));
            }
            // A token names one domain: not one this image preserved, nor one an earlier restore left waiting (a
            // parent kept for a live nested domain), whose entry the rebuild would otherwise overwrite.
            if book.restored.contains_key(&r.token) || book.tokens.contains_key(&r.token) {
                return Err(beyond(RestoreLimit::TokenHeld, r.token));
            }
            // Each domain's memory is taken back frame by frame, exactly what its extents name: frames of the pool
            // that no memory of this image holds (nested domains own none).
            if r.kind != RecordKind::Nested {
                if r.extents.is_empty() {
                    return Err(beyond(RestoreLimit::NoExtent, 0));
                }
                if !pool.adoptable(r.extents.iter()) {
                    let at = r.extents.first().map_or(0, |e| e.base);
                    return Err(beyond(RestoreLimit::ExtentsNotFree, at));
                }
            }
            for s in &r.streams {
                // A substream comes back only with its whole stream, in the same record (as `prepare_handover`
                // records them): the stream's CD table and regime (EL2 or NS-EL1) are that domain's. (A scan of
                // the record for each substream: substreams are few, as the next check says.)
                if s.ssid != 0 && !r.streams.iter().any(|y| y.sid == s.sid && y.ssid == 0) {
                    return Err(beyond(RestoreLimit::SubstreamWithoutStream, s.sid.into()));
                }
                if s.ssid != 0
                    && r.streams.iter().filter(|y| y.sid == s.sid && y.ssid != 0).count() > MAX_SUBSTREAMS_PER_STREAM
                {
                    return Err(beyond(RestoreLimit::SubstreamsOfStream, s.sid.into()));
                }
                if sid_bits < 32 && s.sid >> sid_bits != 0 {
                    return Err(beyond(RestoreLimit::StreamIdWidth, s.sid.into()));
                }
                if s.cd_ssid_bits > f.ssid_bits {
                    return Err(beyond(RestoreLimit::CdTableSubstreamBits, s.cd_ssid_bits.into()));
                }
                if s.cd_two_level {
                    return Err(beyond(RestoreLimit::TwoLevelCdTable, s.cd_ssid_bits.into()));
                }
            }
        }
        Ok(())
    }

    fn rebuild(
        &self,
        book: &mut Book<D>,
        pool: &'static HandoverPool,
        instance: &InstanceRecords,
        report: &mut RestoreReport,
        taken: &mut Taken,
    ) -> Result<(), RestoreError> {
        let coherent = self.features().coherent;
        let bbml = self.features().bbm_level;
        for nested_pass in [false, true] {
            for r in instance
                .records
                .iter()
                .filter(|r| (r.kind == RecordKind::Nested) == nested_pass)
            {
                let fail = |what| RestoreError::Rebuild { token: r.token, what };
                let (translation, memory): (Translation, DomainMemory) =
                    match (r.kind, r.table) {
                        (RecordKind::Nested, _) => {
                            let parent = *book.restored.get(&r.parent_token.unwrap_or(0)).ok_or(fail(
                                RebuildFailure::Domain(DomainError::UnknownToken(r.parent_token.unwrap_or(0))),
                            ))?;
                            let (memory, vmid, stage2) = {
                                let state = self.domains.get(parent).map_err(|e| fail(RebuildFailure::Domain(e)))?;
                                let Translation::Stage2 { vmid, config, .. } = state.translation else {
                                    return Err(fail(RebuildFailure::Domain(DomainError::StaleDomain(parent))));
                                };
                                (state.memory, vmid, config)
                            };
                            let g = r.guest.unwrap_or_default();
                            let guest = GuestStage1 {
                                cd_table: g.cd_table_ipa,
                                cd_max_log2: g.cd_max_log2,
                                layout: layout_of(g.layout),
                                default_substream: dss_of(g.default_substream),
                            };
                            (
                                Translation::Nested {
                                    parent,
                                    guest,
                                    vmid,
                                    stage2,
                                },
                                memory,
                            )
                        }
                        (_, Some(shape)) => {
                            let memory = pool
                                .adopt(r.extents.iter())
                                .map_err(|e| fail(RebuildFailure::Pool(e)))?;
                            // Given back only by the refusal's exit, once no stream can reach it.
                            if let Some(m) = taken.memories.as_mut() {
                                let _ = m.push(Some(memory));
                            }
                            memory.take_ownership();
                            let memory: DomainMemory = memory;
                            let stage = match r.kind {
                                RecordKind::Stage2 => Stage::Two,
                                RecordKind::Stage1El2 => Stage::OneEl2,
                                _ => Stage::One,
                            };
                            let granule = match shape.granule_log2 {
                                14 => Granule::Size16K,
                                16 => Granule::Size64K,
                                _ => Granule::Size4K,
                            };
                            let counts = (shape.tables > 0).then_some(AdoptedCounts {
                                tables: shape.tables.into(),
                                empty: shape.empty.into(),
                            });
                            report.adopted_without_walk += u32::from(counts.is_some());
                            let format = Format {
                                stage,
                                granule,
                                input_bits: shape.input_bits,
                                output_bits: shape.output_bits,
                            };
                            let mut table = IoPageTable::adopt(format, PhysAddr(shape.root), memory, coherent, counts)
                                .map_err(|e| fail(RebuildFailure::Table(e)))?;
                            table.set_bbm_level(bbml);
                            // A failure from here on is this record's alone to undo (it is not in `restored` yet):
                            // the table abandoned in place (the SMMU may walk it: a previous image's STE may still
                            // name it), the ID given back; the memory goes back with the refusal's exit.
                            let abandon = |table: IoPageTable<DomainMemory>| core::mem::forget(table);
                            let translation = if stage == Stage::Two {
                                if let Err(e) = self.core.claim_vmid(r.vmid) {
                                    abandon(table);
                                    return Err(fail(RebuildFailure::Id(e)));
                                }
                                let config = self.stage2_config(r.vmid, &table);
                                Translation::Stage2 {
                                    table,
                                    vmid: r.vmid,
                                    config,
                                    children: 0,
                                }
                            } else {
                                if let Err(e) = self.core.claim_asid(r.asid) {
                                    abandon(table);
                                    return Err(fail(RebuildFailure::Id(e)));
                                }
                                let cd = match self.stage1_cd(r.asid, &table) {
                                    Ok(cd) => cd,
                                    Err(e) => {
                                        let _ = self.core.release_asid(r.asid);
                                        abandon(table);
                                        return Err(fail(RebuildFailure::Domain(DomainError::Entry(e))));
                                    }
                                };
                                Translation::Stage1 {
                                    table,
                                    asid: r.asid,
                                    cd,
                                    el2: stage == Stage::OneEl2,
                                }
                            };
                            (translation, memory)
                        }
                        (_, None) => return Err(fail(RebuildFailure::Domain(DomainError::UnknownToken(r.token)))),
                    };
                let parent = match translation {
                    Translation::Nested { parent, .. } => Some(parent),
                    _ => None,
                };
                if let Err(e) = book.check_free_slot() {
                    // As above: this record's ID back, its table abandoned in place.
                    let state = DomainState::new(translation, memory);
                    self.release_restored_ids(&state);
                    core::mem::forget(state);
                    return Err(fail(RebuildFailure::Domain(e)));
                }
                let mut state = DomainState::new(translation, memory);
                // An identity domain stays one: nothing may change its mappings (a flag that can only take
                // operations away, so a forged one cannot widen what the SMMU translates).
                state.identity = r.identity;
                let id = match self.domains.insert(book, state) {
                    Ok(id) => id,
                    Err(state) => {
                        // Checked above; kept as an error rather than a panic.
                        self.release_restored_ids(&state);
                        core::mem::forget(state);
                        return Err(fail(RebuildFailure::Domain(DomainError::NoDomainSlot { capacity: D })));
                    }
                };
                if let Some(parent) = parent
                    && let Ok(mut parent) = self.domains.get_mut(parent)
                    && let Translation::Stage2 { children, .. } = &mut parent.translation
                {
                    *children += 1;
                }
                // Never over another domain's entry (`check_limits` refused such a token already).
                let refused = match book.restored.get(&r.token) {
                    Some(&holder) => Some(DomainError::TokenInUse {
                        token: r.token,
                        domain: holder,
                    }),
                    None => book
                        .restored
                        .insert(r.token, id)
                        .err()
                        .map(|_| DomainError::TooMany(Capacity::RestoredDomains)),
                };
                if let Some(e) = refused {
                    // Not in `restored`, so the refusal's exit would not find it: forgotten here.
                    if let Some(state) = self.domains.remove(book, id) {
                        self.release_restored_ids(&state);
                        core::mem::forget(state);
                    }
                    return Err(fail(RebuildFailure::Domain(e)));
                }
                // Room: at most one per record.
                if let Some(d) = taken.domains.as_mut() {
                    let _ = d.push(r.token);
                }
                report.domains += 1;
            }
        }
        // Streams: the whole-stream attachments (with their adopted CD tables), then substreams.
        for substreams in [false, true] {
            for r in &instance.records {
                let fail = |what| RestoreError::Rebuild { token: r.token, what };
                let id = book
                    .restored
                    .get(&r.token)
                    .copied()
                    .ok_or(fail(RebuildFailure::Domain(DomainError::UnknownToken(r.token))))?;
                for s in r.streams.iter().filter(|s| (s.ssid != 0) == substreams) {
                    if substreams {
                        // The CD is in the stream's adopted CD table already; only the bookkeeping is rebuilt.
                        let index =
                            book.stream(s.sid)
                                .ok_or(fail(RebuildFailure::Domain(DomainError::NotAttached {
                                    sid: s.sid,
                                    ssid: None,
                                })))?;
                        let _ = book.streams[index].substreams.push((s.ssid, id));
                    } else {
                        let memory = self
                            .domains
                            .get(id)
                            .map_err(|e| fail(RebuildFailure::Domain(e)))?
                            .memory;
                        let cd_table = if s.cd_table != 0 {
                            let mut table = CdTable::adopt(
                                CdTableFormat::Linear {
                                    ssid_bits: s.cd_ssid_bits,
                                },
                                PhysAddr(s.cd_table),
                                &memory,
                                coherent,
                            )
                            .map_err(|e| fail(RebuildFailure::CdTable(e.widen())))?;
                            // CDs of substreams no record names (attached to a domain that was not preserved)
                            // must not come back: invalid, and invalidated where the SMMU may have them cached. A
                            // stream's substreams are all in its own record (`check_limits`).
                            let sid = s.sid;
                            for ssid in 1..(1u32 << s.cd_ssid_bits) {
                                // (The record scanned only for a valid CD: few, as substreams are.)
                                if !table.read(ssid).is_ok_and(|cd| cd.is_valid())
                                    || r.streams.iter().any(|y| y.sid == sid && y.ssid == ssid)
                                {
                                    continue;
                                }
                                table
                                    .write(ssid, &crate::hw::cd::Cd::invalid(), &memory, |leaf| {
                                        let mut batch = crate::queue::cmdq::Batch::new();
                                        batch.push(&crate::hw::command::Command::CfgiCd { sid, ssid, leaf })?;
                                        self.core.submit(&batch).map(drop)
                                    })
                                    .map_err(|e| fail(RebuildFailure::CdTable(e)))?;
                            }
                            Some(table)
                        } else {
                            None
                        };
                        let ste = self
                            .domain_ste(id, cd_table.as_ref())
                            .map_err(|e| fail(RebuildFailure::Domain(e)))?;
                        // An EL2 stream, as an EL2 attach: stale EL2 entries dropped first (they match any EL2
                        // context).
                        self.enter_el2(book, id).map_err(|e| fail(RebuildFailure::Domain(e)))?;
                        if let Some(t) = taken.streams.as_mut() {
                            let _ = t.push(s.sid);
                        }
                        self.core
                            .install_ste(s.sid, &ste)
                            .map_err(|e| fail(RebuildFailure::Attach(e)))?;
                        book.streams
                            .push(StreamRecord {
                                sid: s.sid,
                                domain: id,
                                cd_table,
                                substreams: heapless::Vec::new(),
                                busy: false,
                            })
                            .map_err(|_| {
                                fail(RebuildFailure::Domain(DomainError::TooMany(Capacity::AttachedStreams)))
                            })?;
                    }
                    // Room: a node for every stream this image attaches and each of its substreams
                    // (`check_limits`).
                    if let Ok(mut state) = self.domains.get_mut(id) {
                        let _ = self.domains.add_attachment(book, &mut state, (s.sid, s.ssid));
                    }
                    report.streams += 1;
                }
            }
        }
        Ok(())
    }

    /// After a hand-off with the SMMU running ([`crate::Smmu::adopt_running`]): makes every stream that no restored
    /// domain holds abort, then invalidates every cached configuration and TLB entry (those streams may have cached
    /// translations under IDs this image will reuse), and lets IDs be allocated again. A successful
    /// [`Iommu::restore_handover`] does this itself; call it to settle an adopted SMMU without restoring.
    /// Returns how many STEs changed.
    ///
    /// # Errors
    /// As [`LowLevel::attach_abort`](crate::LowLevel::attach_abort).
    pub fn abort_unrestored_streams(&self) -> Result<u32, AttachError> {
        let book = self.book();
        self.abort_unrestored_locked(&book)
    }

    /// [`Iommu::abort_unrestored_streams`] under the bookkeeping the caller holds.
    fn abort_unrestored_locked(&self, book: &Book<D>) -> Result<u32, AttachError> {
        // Every stream a domain holds is kept (an O(1) look-up each): the raw abort cannot undercut one.
        let aborted = self.core.abort_streams_except(|sid| book.stream(sid).is_some())?;
        // Until now those streams translated with the old image's contexts and may have filled the TLB under
        // ASIDs and VMIDs this image considers free: drop every such entry before any is allocated again.
        self.core.invalidate_all().map_err(AttachError::Queue)?;
        self.core.set_inherited_stes(false);
        Ok(aborted)
    }
}

#[cfg(test)]
mod golden;
#[cfg(test)]
pub(crate) mod tests;
