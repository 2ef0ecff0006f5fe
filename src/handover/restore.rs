//! Live update, both ends: [`ActiveSmmu::prepare_handover`] writes the preserved domains' records into the
//! handover region; after a warm reset the next image's [`ActiveSmmu::restore_handover`] validates the region
//! completely, then rebuilds the domains (their IDs reserved, their page tables and CD tables adopted in place, their
//! streams' STEs installed), [`ActiveSmmu::retrieve`] hands them out by token, and [`ActiveSmmu::finish_handover`]
//! frees whatever nobody claimed and re-arms the region empty.

use super::format::{self, FormatError, HandoverError};
use super::pool::{HandoverArena, HandoverPool, METADATA_BYTES, PoolError};
use super::verify::{Outputs, Refusal, RestoreOptions, VerifyFailure, verify_instance};
use super::{Extent, InstanceRecords, MAX_INSTANCES, MAX_RECORDS, MAX_STREAMS, RecordKind, SmmuIdentity};
use crate::ctx::{CdTable, CdTableError, CdTableFormat};
use crate::domain::ActiveSmmu;
use crate::domain::{
    DomainError, DomainId, DomainMemory, DomainState, GuestStage1, Prepared, StreamRecord, Translation,
};
use crate::hw::ste::{CdTableLayout, DefaultSubstream};
use crate::ids::IdError;
use crate::mem::{Coherency, FrameAllocator, PhysAddr};
use crate::pgtable::{AdoptedCounts, Format, Granule, IoPageTable, MapError, Stage};
use crate::queue::cmdq::CommandQueueError;
use crate::smmu::Smmu;
use crate::smmu::{AttachError, RunningSmmu};
use crate::stream::StreamTableFormat;

/// Why the handover could not be prepared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrepareError {
    /// The pool is not set up.
    Pool(PoolError),
    /// The preserved domains do not fit a record.
    Records(super::live::RecordError),
    /// The region is too small for the records.
    Format(FormatError),
    /// The region written does not read back as valid (it was then invalidated).
    SelfCheck(HandoverError),
    /// The region holds records that do not validate (other SMMUs' among them, perhaps): they are not silently
    /// dropped. Restore (or finish) first, which re-arms the region.
    ExistingRegion(HandoverError),
    /// A restore of the records of `generation` is not finished: the domains it rebuilt that nobody retrieved
    /// would be neither handed out nor recorded. Call [`ActiveSmmu::finish_handover`] first.
    RestoreNotFinished {
        /// The restored records' generation.
        generation: u64,
    },
    /// [`ActiveSmmu::cancel_handover`] without a prepared hand-off: cancelling would remove records this image did
    /// not write (a previous image's, not yet restored).
    NotPrepared,
    /// A preserved domain has an unmap whose invalidation has not completed: a deferred unmap not synced (sync it,
    /// or `invalidate_domain`), or an invalidation that failed (retried by the domain's next operation). Nothing
    /// was written.
    PendingInvalidation {
        /// The domain's token.
        token: u64,
    },
    /// For a hand-off with the SMMU left running (its own structures in a handover arena): stream `sid`
    /// (substream `ssid`; 0 for the whole stream) bypasses, or translates through a domain that is not preserved
    /// (or through an STE a previous image left). It would go on doing so across the hand-off, through nothing a
    /// record describes or `prepare_handover` checked, its device able to write the handover region and the
    /// preserved memory before the next image takes them over. Detach it, or make it abort
    /// ([`ActiveSmmu::attach_abort`]), first. Nothing was written.
    UnpreservedStream {
        /// StreamID.
        sid: u32,
        /// SubstreamID (0: the whole stream).
        ssid: u32,
    },
    /// A preserved domain maps memory outside every range the caller says survives the hand-off: the next image
    /// would give a device memory it may use for anything.
    NotSurviving {
        /// The domain's token.
        token: u64,
        /// The input address of the mapping.
        iova: u64,
        /// Its output address.
        output: u64,
        /// Its size.
        size: u64,
    },
    /// A preserved domain maps the handover region or memory declared protected (which the next image refuses).
    ProtectedOutput {
        /// The domain's token.
        token: u64,
        /// The input address of the mapping.
        iova: u64,
        /// Its output address.
        output: u64,
        /// Its size.
        size: u64,
        /// The protected extent it reaches.
        protected: Extent,
    },
}

impl core::fmt::Display for PrepareError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PrepareError::Pool(e) => write!(f, "handover: {e}"),
            PrepareError::Records(e) => write!(f, "handover: {e}"),
            PrepareError::Format(e) => write!(f, "handover: {e}"),
            PrepareError::SelfCheck(e) => write!(f, "handover: the region written does not validate: {e}"),
            PrepareError::ExistingRegion(e) => {
                write!(
                    f,
                    "handover: the region already holds records that do not validate ({e}); not overwritten"
                )
            }
            PrepareError::RestoreNotFinished { generation } => write!(
                f,
                "handover: the restore of generation {generation} is not finished: finish it before preparing another"
            ),
            PrepareError::NotPrepared => f.write_str("handover: no hand-off is prepared: nothing to cancel"),
            PrepareError::PendingInvalidation { token } => write!(
                f,
                "handover: domain {token:#x} has an unmap whose invalidation has not completed: sync it first"
            ),
            PrepareError::UnpreservedStream { sid, ssid } => write!(
                f,
                "handover: stream {sid:#x} (substream {ssid:#x}) bypasses or translates through a domain that is not \
                 preserved, across a hand-off with the SMMU running: detach it or make it abort first"
            ),
            PrepareError::NotSurviving {
                token,
                iova,
                output,
                size,
            } => write!(
                f,
                "handover: domain {token:#x} maps IOVA {iova:#x} to {output:#x}+{size:#x}, memory that does not survive \
                 the hand-off"
            ),
            PrepareError::ProtectedOutput {
                token,
                iova,
                output,
                size,
                protected,
            } => write!(
                f,
                "handover: domain {token:#x} maps IOVA {iova:#x} to {output:#x}+{size:#x}, inside protected memory \
                 {:#x}+{:#x}",
                protected.base, protected.len
            ),
        }
    }
}

/// Why a restore refused the region (or was asked at the wrong time). A refusal leaves nothing translating: see
/// [`ActiveSmmu::restore_handover`]; the region's bytes stay untouched for diagnosis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreError {
    /// This driver restored the records of `generation` already (and consumed them): a record restores once, so a
    /// domain retrieved and freed since can never come back. Nothing changed.
    AlreadyRestored {
        /// The generation restored.
        generation: u64,
    },
    /// This driver prepared a hand-off (records of `generation`): restoring them here would take back arenas its
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
        /// What.
        what: &'static str,
        /// The value.
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

/// What failed while rebuilding a validated record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RebuildFailure {
    /// Its arena.
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
                write!(f, "restore: record {token:#x} could not be rebuilt: {what:?}")
            }
        }
    }
}

/// What a restore found and rebuilt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// The region's generation.
    pub generation: u64,
    /// Domains rebuilt (waiting for [`ActiveSmmu::retrieve`]).
    pub domains: u32,
    /// Streams (and substreams) whose STE or CD was reinstalled.
    pub streams: u32,
    /// Page tables adopted without a walk (their counts were recorded).
    pub adopted_without_walk: u32,
    /// After a hand-off with the SMMU running: streams the previous image left translating that no record names,
    /// made to abort before the restore returned (0 after a warm reset).
    pub aborted: u32,
}

/// What [`ActiveSmmu::finish_handover`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FinishReport {
    /// Restored domains nobody retrieved, freed (their streams aborting, their memory back in the pool).
    pub unclaimed: u32,
}

/// Why [`ActiveSmmu::finish_handover`] did not finish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishError {
    /// A hand-off is prepared (records of `generation`): finishing would remove the records the next image needs.
    /// Nothing changed.
    HandoverPrepared {
        /// The prepared records' generation.
        generation: u64,
    },
    /// Detaching or freeing an unclaimed domain failed (an invalidation): the domains not yet freed stay waiting,
    /// and the hand-off stays restored; finish again.
    Domain(DomainError),
}

impl core::fmt::Display for FinishError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FinishError::HandoverPrepared { generation } => write!(
                f,
                "finish: a hand-off is prepared (generation {generation}): finishing would remove its records"
            ),
            FinishError::Domain(e) => write!(f, "finish: {e}"),
        }
    }
}

impl From<DomainError> for FinishError {
    fn from(e: DomainError) -> Self {
        FinishError::Domain(e)
    }
}

/// Where one SMMU's driver is in a live update (the states of the table in [`crate::handover`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoverPhase {
    /// Nothing prepared, nothing restored and waiting: domains are preserved and unpreserved freely.
    Idle,
    /// [`ActiveSmmu::prepare_handover`] wrote records of `generation`: the preserved domains are frozen and no
    /// domain is preserved or unpreserved until [`ActiveSmmu::cancel_handover`] or the hand-off; with the SMMU left
    /// running, no stream starts translating or bypassing either (`StreamsFrozen`).
    Prepared {
        /// The records' generation.
        generation: u64,
    },
    /// [`ActiveSmmu::restore_handover`] rebuilt (and consumed) records of `generation`: their domains wait for
    /// [`ActiveSmmu::retrieve`] until [`ActiveSmmu::finish_handover`].
    Restored {
        /// The records' generation.
        generation: u64,
    },
}

/// What a restore took before it succeeded or was refused: the streams whose STEs it installed and the arenas it
/// took back. A refusal aborts the former before it gives the latter back.
#[derive(Default)]
struct Taken {
    /// Streams whose STE the rebuild installed (at most every stream of every record).
    streams: heapless::Vec<u32, { MAX_RECORDS * MAX_STREAMS }>,
    /// Arenas taken back from the pool (at most one per record).
    arenas: heapless::Vec<&'static HandoverArena, MAX_RECORDS>,
    /// The tokens of the domains the rebuild put in `restored` (a refusal forgets these, and only these: an
    /// earlier hand-off may have left a parent there for a live nested domain).
    domains: heapless::Vec<u64, MAX_RECORDS>,
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

/// Cleans `[ptr, ptr + len)` to the point of coherency whatever the SMMU's coherency: what a warm reset must find
/// in memory, not in a cache that the reset may discard.
fn clean_to_memory(ptr: *const u8, len: usize) {
    Coherency { coherent: false }.clean(ptr, len);
}

/// For a hand-off with the SMMU left running: what the previous image recorded about `smmu` (found by
/// `register_base` in the validated region), checked against `smmu` itself before anything is adopted: its ID
/// registers (IDR0..5, IIDR, as [`format::validate_identity`] compares them) and the stream table it really runs
/// with (STRTAB_BASE and STRTAB_BASE_CFG read back). Then the arena of its structures is taken back whole, so
/// nothing in it is handed out again. Give the arena and the recorded SMMU to [`crate::Smmu::adopt_running`].
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
) -> Result<Option<(RunningSmmu, &'static HandoverArena)>, RestoreError> {
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
) -> Result<Option<(RunningSmmu, &'static HandoverArena)>, RestoreError> {
    let pool_extent = pool.pool().map_err(RestoreError::Pool)?;
    let decoded = {
        let bytes = pool.lock_metadata().map_err(RestoreError::Pool)?;
        format::decode(&bytes, pool_extent).map_err(RestoreError::Region)?
    };
    let Some(id) = decoded
        .instances
        .iter()
        .map(|i| i.identity)
        .find(|id| id.base == register_base && id.core_len != 0)
    else {
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
    let arena = pool
        .adopt(Extent {
            base: id.strtab_base,
            len: id.core_len,
        })
        .map_err(RestoreError::Pool)?;
    let running = RunningSmmu {
        idr: id.idr,
        iidr: id.iidr,
        format,
        strtab_base: id.strtab_base,
    };
    Ok(Some((running, arena)))
}

impl<A: FrameAllocator, const D: usize> ActiveSmmu<A, D> {
    /// Writes the records of every preserved domain (as they stand now) into the handover region of `pool`, the
    /// header last, and cleans the region, every preserved domain's memory and (for a hand-off with the SMMU
    /// running) this SMMU's own arena to the point of coherency, so that a warm reset finds them in memory. Translation keeps running meanwhile; the preserved domains are frozen until
    /// [`ActiveSmmu::cancel_handover`] or the hand-off (map, unmap, protect, trim, attach, detach and unpreserve
    /// return `DomainError::HandoverPrepared`), so the records stay what the next image restores: to change one,
    /// cancel, change, and prepare again. Other domains stay usable. Records of other SMMUs already in the region are kept. `register_base` is this
    /// SMMU's physical register base, which names it in the region.
    ///
    /// For a hand-off with the SMMU left running (this SMMU's own structures are in a handover arena: the record
    /// names them, and the next image adopts the SMMU translating), every stream that translates across it must
    /// be one the records describe: every stream that does not abort must be attached to a preserved domain, and
    /// so must its substreams. While such a hand-off is prepared the stream configuration is frozen too: `attach`,
    /// `attach_substream` (to any domain) and `attach_bypass` return `StreamsFrozen`; detaching a stream of a
    /// domain that is not preserved and making a stream abort stay allowed. After a warm reset nothing the
    /// previous image installed translates (the next image starts with every stream aborting), so a hand-off
    /// through a reset checks no stream: the devices of streams live between the prepare and the reset can write
    /// memory meanwhile, which the restore's verification covers.
    ///
    /// `surviving` is the memory that survives the hand-off as it is (RAM the next image does not reuse for
    /// anything but what the preserved devices reach; what it declares DMA-able to its restore): every page and
    /// block of every preserved domain must map memory inside one of these ranges, and outside the handover
    /// region and the memory declared with [`ActiveSmmu::protect_memory`] (which the next image's restore
    /// refuses). Each preserved table is walked once for this.
    ///
    /// # Errors
    /// [`PrepareError::NotSurviving`], [`PrepareError::ProtectedOutput`] naming the domain and the mapping, and
    /// (for a hand-off with the SMMU left running) [`PrepareError::UnpreservedStream`] naming the stream, before
    /// anything is written; [`PrepareError::RestoreNotFinished`] while a restore waits for
    /// [`ActiveSmmu::finish_handover`] (nothing changed then); [`PrepareError`]; on [`PrepareError::SelfCheck`] the
    /// region is invalidated (its magic cleared).
    pub fn prepare_handover(
        &self,
        pool: &HandoverPool,
        register_base: u64,
        generation: u64,
        surviving: &[Extent],
    ) -> Result<usize, PrepareError> {
        if let Some(generation) = self.domains.restored_generation {
            return Err(PrepareError::RestoreNotFinished { generation });
        }
        let region = pool.metadata_extent().map_err(PrepareError::Pool)?;
        let pool_extent = pool.pool().map_err(PrepareError::Pool)?;
        self.check_preserved_outputs(pool, surviving)?;
        let ours = self.handover_records(register_base).map_err(PrepareError::Records)?;
        // With the SMMU left running, whatever translates now goes on translating until the next image restores:
        // only the preserved domains' streams may.
        let running = ours.identity.core_len != 0;
        if running {
            self.check_streams_preserved()?;
        }
        let mut guard = pool.lock_metadata().map_err(PrepareError::Pool)?;
        let bytes: &mut [u8] = &mut guard;
        let mut instances: heapless::Vec<InstanceRecords, MAX_INSTANCES> = heapless::Vec::new();
        if bytes[..8].iter().any(|&b| b != 0) {
            let previous = format::decode(bytes, pool_extent).map_err(PrepareError::ExistingRegion)?;
            for other in previous
                .instances
                .into_iter()
                .filter(|i| i.identity.base != register_base)
            {
                let _ = instances.push(other);
            }
        }
        instances.push(ours).map_err(|_| {
            PrepareError::Format(FormatError::TooManyInstances {
                count: MAX_INSTANCES + 1,
                max: MAX_INSTANCES,
            })
        })?;
        let written =
            format::encode(&instances, generation, region, pool_extent, bytes).map_err(PrepareError::Format)?;
        if let Err(e) = format::decode(&bytes[..written], pool_extent) {
            bytes[0] = 0;
            clean_to_memory(bytes.as_ptr(), 64);
            return Err(PrepareError::SelfCheck(e));
        }
        clean_to_memory(bytes.as_ptr(), written);
        // What is recorded must not change until the hand-off: the preserved domains' arenas (and this SMMU's own,
        // when it is one) hand out nothing more, the domains refuse changes while their memory is sealed, and no
        // domain is preserved or unpreserved.
        self.seal_preserved(true);
        *self.domains.prepared.lock() = Some(Prepared { generation, running });
        // Every arena the next image adopts: the preserved domains', and (for a hand-off with the SMMU running)
        // the SMMU's own, whose stream table and level-2 spans the next image reads in place. A coherent SMMU's
        // structures were never cleaned as they were written.
        let cores = instances.iter().map(|i| Extent {
            base: i.identity.strtab_base,
            len: i.identity.core_len,
        });
        for extent in instances
            .iter()
            .flat_map(|i| i.records.iter().flat_map(|r| r.extents.iter().copied()))
            .chain(cores.filter(|e| e.len != 0))
        {
            if let Some(virt) = self.extent_virt(pool, &extent) {
                clean_to_memory(virt, extent.len as usize);
            }
        }
        Ok(written)
    }

    /// For a hand-off with the SMMU left running: checks that every stream that does not abort translates through
    /// a preserved domain, and so does each of its substreams; the first that does not is the error (a stream
    /// that bypasses, one attached to a domain that is not preserved, an STE a previous image left).
    fn check_streams_preserved(&self) -> Result<(), PrepareError> {
        let preserved = |d: DomainId| self.domains.get(d).is_ok_and(|s| s.token.is_some());
        for r in self.domains.streams.iter() {
            if !preserved(r.domain) {
                return Err(PrepareError::UnpreservedStream { sid: r.sid, ssid: 0 });
            }
            if let Some(&(ssid, _)) = r.substreams.iter().find(|(_, d)| !preserved(*d)) {
                return Err(PrepareError::UnpreservedStream { sid: r.sid, ssid });
            }
        }
        match self
            .core
            .first_live_stream_except(|sid| self.domains.stream(sid).is_some())
        {
            Some(sid) => Err(PrepareError::UnpreservedStream { sid, ssid: 0 }),
            None => Ok(()),
        }
    }

    /// Checks that every leaf of every preserved domain maps memory inside `surviving` and outside the region and
    /// protected memory: the first that does not is the error.
    fn check_preserved_outputs(&self, pool: &HandoverPool, surviving: &[Extent]) -> Result<(), PrepareError> {
        let outputs = Outputs {
            dma: surviving,
            region: pool.region().map_err(PrepareError::Pool)?,
            protected: self.domains.protected.extents(),
        };
        for (&token, &id) in self.domains.tokens.iter() {
            let Ok(state) = self.domains.get(id) else { continue };
            let (Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. }) = &state.translation else {
                continue;
            };
            // The tables are recorded as they are, not what the SMMU may still cache: an unmap whose invalidation
            // has not completed would leave the next image (a running hand-off keeps the TLB) translating what the
            // records say is unmapped, and mapping over it again.
            if state.pending.outstanding() || state.unflushed.is_some() {
                return Err(PrepareError::PendingInvalidation { token });
            }
            let mut first = None;
            table.walk(|m| {
                if first.is_none()
                    && let Err(refusal) = outputs.judge(m.pa, m.size)
                {
                    first = Some((m, refusal));
                }
            });
            if let Some((m, refusal)) = first {
                let (iova, output, size) = (m.iova, m.pa, m.size);
                return Err(match refusal {
                    Refusal::Protected(protected) => PrepareError::ProtectedOutput {
                        token,
                        iova,
                        output,
                        size,
                        protected,
                    },
                    Refusal::Outside => PrepareError::NotSurviving {
                        token,
                        iova,
                        output,
                        size,
                    },
                });
            }
        }
        Ok(())
    }

    /// Seals (or unseals) the memory of every preserved domain and this SMMU's own.
    fn seal_preserved(&self, seal: bool) {
        for (_, &id) in self.domains.tokens.iter() {
            if let Ok(state) = self.domains.get(id)
                && !matches!(state.translation, Translation::Nested { .. })
            {
                if seal {
                    state.memory.seal();
                } else {
                    state.memory.unseal();
                }
            }
        }
        if seal {
            self.allocator().seal();
        } else {
            self.allocator().unseal();
        }
    }

    /// Cancels a prepared hand-off: the preserved domains' memory (and this SMMU's) hands out memory again, the
    /// stream configuration is no longer frozen, and this SMMU's records are removed from the region, so the next
    /// boot restores nothing of them. The domains stay preserved (prepare again for the next hand-off).
    ///
    /// # Errors
    /// [`PrepareError::NotPrepared`] without a prepared hand-off (the region's records may be a previous image's,
    /// still to restore), [`PrepareError::Pool`] when the pool is not set up. Nothing changed then.
    pub fn cancel_handover(&self, pool: &HandoverPool, register_base: u64) -> Result<(), PrepareError> {
        if !self.domains.handover_prepared() {
            return Err(PrepareError::NotPrepared);
        }
        pool.metadata_extent().map_err(PrepareError::Pool)?;
        self.seal_preserved(false);
        *self.domains.prepared.lock() = None;
        rearm_without(pool, register_base).map_err(PrepareError::Pool)
    }

    /// Where this driver is in a live update (see the table in [`crate::handover`]).
    pub fn handover_phase(&self) -> HandoverPhase {
        if let Some(generation) = self.domains.prepared_generation() {
            HandoverPhase::Prepared { generation }
        } else if let Some(generation) = self.domains.restored_generation {
            HandoverPhase::Restored { generation }
        } else {
            HandoverPhase::Idle
        }
    }

    fn extent_virt(&self, pool: &HandoverPool, extent: &Extent) -> Option<*const u8> {
        let region = pool.region().ok()?;
        let base = pool.metadata_address().ok()?;
        extent
            .base
            .checked_sub(region.base)
            .filter(|o| o + extent.len <= region.len)
            .map(|o| base.wrapping_add(o as usize))
    }

    /// After a warm reset (or in a new image), with this SMMU just initialised (every stream aborting) or adopted
    /// running ([`crate::Smmu::adopt_running`]): validates the handover region of `pool` completely (see
    /// `docs/handover.md`), checks that it was written for this SMMU (`register_base` and the ID registers) and that
    /// every ID and StreamID fits it, verifies the preserved memory the records name (with
    /// [`Verification::Full`](super::verify::Verification), the default: every page table walked from its root,
    /// every leaf inside `options.dma_memory` and outside the region and the memory declared with
    /// [`ActiveSmmu::protect_memory`], every live-entry count as walked; in every mode each adopted CD equal to the
    /// one the driver builds), and only then rebuilds this SMMU's preserved domains: each arena taken back,
    /// each ASID/VMID reserved as recorded (no STE or CD is scanned), each page table and CD table adopted in place
    /// (no copy), each stream's STE installed. The domains wait for
    /// [`ActiveSmmu::retrieve`]; [`ActiveSmmu::finish_handover`] frees the rest. The records are consumed: the
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
    /// STEs may be live); then CFGI_ALL, TLBI of every regime and CMD_SYNC; only then do the arenas taken back
    /// return to the pool (their memory handed out again) and the IDs claimed return to their allocators. The
    /// region is untouched. Should an abort or the invalidation fail (the command queue dead), translation is turned
    /// off with every incoming transaction aborting ([`crate::Smmu::disable_aborting`]): [`ActiveSmmu::is_enabled`]
    /// then reads `false`, and the caller shuts the SMMU down (`shutdown(false)`, GBPA.ABORT = 1) and initialises it
    /// afresh; should even that fail (`is_enabled` still `true`), nothing is given back (the arenas stay taken, the
    /// IDs claimed) and the caller must stop the SMMU by other means (GBPA.ABORT = 1, SMMUEN = 0) before it trusts
    /// that memory.
    pub fn restore_handover(
        &mut self,
        pool: &'static HandoverPool,
        register_base: u64,
        options: &RestoreOptions<'_>,
    ) -> Result<RestoreReport, RestoreError> {
        // Asked at the wrong point of the lifecycle: refused before anything is looked at.
        if let Some(generation) = self.domains.restored_generation {
            return Err(RestoreError::AlreadyRestored { generation });
        }
        if let Some(generation) = self.domains.prepared_generation() {
            return Err(RestoreError::HandoverPrepared { generation });
        }
        let mut taken = Taken::default();
        let restored =
            self.restore_records(pool, register_base, options, &mut taken)
                .and_then(|(mut report, found)| {
                    report.aborted = self.abort_inherited_streams()?;
                    Ok((report, found))
                });
        match restored {
            Ok((report, found)) => {
                if found {
                    self.domains.restored_generation = Some(report.generation);
                    // Consumed: what was rebuilt is this image's now (its tables change in place), so the records
                    // must never rebuild it again.
                    let _ = rearm_without(pool, register_base);
                }
                Ok(report)
            }
            Err(e) => {
                self.contain_refused_restore(&taken);
                Err(e)
            }
        }
    }

    /// On an SMMU adopted running whose inherited STEs are not settled yet: makes every stream no domain holds
    /// abort and invalidates everything (see [`ActiveSmmu::abort_unrestored_streams`]). Returns how many aborted.
    fn abort_inherited_streams(&mut self) -> Result<u32, RestoreError> {
        if !self.core.inherited_stes {
            return Ok(0);
        }
        self.abort_unrestored_streams().map_err(RestoreError::UnrestoredStreams)
    }

    /// The restore proper; any error it returns goes through [`ActiveSmmu::contain_refused_restore`]. Returns the
    /// report and whether the region held records of this SMMU.
    fn restore_records(
        &mut self,
        pool: &'static HandoverPool,
        register_base: u64,
        options: &RestoreOptions<'_>,
        taken: &mut Taken,
    ) -> Result<(RestoreReport, bool), RestoreError> {
        let pool_extent = pool.pool().map_err(RestoreError::Pool)?;
        let decoded = {
            let bytes = pool.lock_metadata().map_err(RestoreError::Pool)?;
            if bytes[..8].iter().all(|&b| b == 0) {
                return Ok((RestoreReport::default(), false));
            }
            format::decode(&bytes, pool_extent).map_err(RestoreError::Region)?
        };
        let mut report = RestoreReport {
            generation: decoded.generation,
            ..RestoreReport::default()
        };
        let Some(instance) = decoded.instances.iter().find(|i| i.identity.base == register_base) else {
            return Ok((report, false));
        };
        let probed = self.handover_identity(register_base);
        format::validate_identity(&instance.identity, &probed).map_err(RestoreError::Identity)?;
        self.check_limits(pool, instance)?;
        let region = pool.region().map_err(RestoreError::Pool)?;
        let mut protected = self.domains.protected.clone();
        protected.add(region).map_err(|_| RestoreError::BeyondLimits {
            token: instance.records.first().map_or(0, |r| r.token),
            what: "a free protected-memory slot for the handover region, of",
            value: crate::protected::MAX_PROTECTED as u64,
        })?;
        let outputs = Outputs {
            dma: options.dma_memory,
            region,
            protected: protected.extents(),
        };
        verify_instance(self.features(), pool, instance, &outputs, options.verify)
            .map_err(|(token, what)| RestoreError::Verify { token, what })?;

        // Rebuild: stage-1 and stage-2 domains, then nested ones, then every stream, then substreams.
        self.rebuild(pool, instance, &mut report, taken)?;
        self.domains.protected = protected;
        Ok((report, true))
    }

    /// The single exit of a refused restore (see [`ActiveSmmu::restore_handover`]'s errors): contains every stream
    /// that may translate through what the restore took or the previous image left, then gives back what the
    /// restore took, and only when the containment is known to hold.
    fn contain_refused_restore(&mut self, taken: &Taken) {
        // Refused before the rebuild took anything, on an SMMU this image initialised: nothing translates through
        // the restore, so there is nothing to contain (and nothing is issued).
        if taken.streams.is_empty() && taken.arenas.is_empty() && taken.domains.is_empty() && !self.core.inherited_stes
        {
            return;
        }
        let mut contained = true;
        for &sid in &taken.streams {
            contained &= self.core.abort_stream(sid).is_ok();
        }
        self.domains.streams.retain(|r| !taken.streams.contains(&r.sid));
        if self.core.inherited_stes {
            let own: heapless::Vec<u32, { crate::domain::MAX_ATTACHED_STREAMS }> =
                self.domains.streams.iter().map(|r| r.sid).collect();
            match self.abort_streams_except(|sid| own.contains(&sid)) {
                Ok(_) => self.core.inherited_stes = false,
                Err(_) => contained = false,
            }
        }
        contained &= self.core.invalidate_all().is_ok();
        if !contained {
            contained = self.core.smmu.disable_aborting().is_ok();
        }
        // The domains this restore rebuilt are forgotten, their tables abandoned in place (the SMMU may have walked
        // them). Only those: a parent an earlier hand-off left for a live nested domain stays.
        for token in &taken.domains {
            let Some(id) = self.domains.restored.swap_remove(token) else {
                continue;
            };
            if let Some(state) = self.domains.remove(id) {
                if contained {
                    self.release_restored_ids(&state);
                }
                core::mem::forget(state);
            }
        }
        if contained {
            for arena in &taken.arenas {
                // SAFETY: every stream that could reach the arena aborts (or translation is off) and the
                // invalidation of every cached configuration and TLB entry completed; the domains built on it were
                // forgotten, so no reference into it is left.
                unsafe { arena.release() };
            }
        }
    }

    /// Frees the ASID or VMID a rebuilt (or half-rebuilt) domain claimed.
    fn release_restored_ids(&mut self, state: &DomainState) {
        match &state.translation {
            Translation::Stage1 { asid, .. } => {
                let _ = self.core.release_asid(*asid);
            }
            Translation::Stage2 { vmid, .. } => {
                let _ = self.core.release_vmid(*vmid);
            }
            Translation::Nested { .. } => {}
        }
    }

    fn check_limits(&self, pool: &HandoverPool, instance: &InstanceRecords) -> Result<(), RestoreError> {
        let f = *self.features();
        let first = instance.records.first().map_or(0, |r| r.token);
        if instance.records.len() > self.domains.free_slots() {
            return Err(RestoreError::BeyondLimits {
                token: first,
                what: "more domains than free slots",
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
            + self.domains.streams.len();
        if streams > crate::domain::MAX_ATTACHED_STREAMS {
            return Err(RestoreError::BeyondLimits {
                token: first,
                what: "more streams than this image can attach, with those attached already",
                value: streams as u64,
            });
        }
        let waiting = instance.records.len() + self.domains.restored.len();
        if waiting > crate::domain::MAX_PRESERVED {
            return Err(RestoreError::BeyondLimits {
                token: first,
                what: "more restored domains than can wait, with those an earlier hand-off left",
                value: waiting as u64,
            });
        }
        let sid_bits = match self.stream_table_format() {
            crate::stream::StreamTableFormat::Linear { sid_bits }
            | crate::stream::StreamTableFormat::TwoLevel { sid_bits, .. } => sid_bits,
        };
        for r in &instance.records {
            let beyond = |what, value: u64| RestoreError::BeyondLimits {
                token: r.token,
                what,
                value,
            };
            if u32::from(r.asid) >> f.asid_bits != 0 {
                return Err(beyond("ASID", r.asid.into()));
            }
            if u32::from(r.vmid) >> f.vmid_bits != 0 {
                return Err(beyond("VMID", r.vmid.into()));
            }
            let stage1 = matches!(r.kind, RecordKind::Stage1 | RecordKind::Stage1El2 | RecordKind::Nested);
            let stage2 = matches!(r.kind, RecordKind::Stage2 | RecordKind::Nested);
            if (stage1 && !f.stage1) || (stage2 && !f.stage2) || (r.kind == RecordKind::Nested && !f.nesting) {
                return Err(beyond("a stage this SMMU lacks, kind", r.kind as u64));
            }
            if r.kind == RecordKind::Stage1El2 && !f.hyp {
                return Err(beyond("EL2 contexts, kind", r.kind as u64));
            }
            // One EL2 stage-1 domain in use at a time (EL2 has no ASIDs): a record's with streams neither beside
            // one this image has in use nor beside another record's.
            if r.kind == RecordKind::Stage1El2 && !r.streams.is_empty() {
                if self.domains.el2_in_use(None).is_some() {
                    return Err(beyond(
                        "its EL2 stage-1 domain in use while this image has one in use, streams",
                        r.streams.len() as u64,
                    ));
                }
                if instance
                    .records
                    .iter()
                    .any(|x| x.token != r.token && x.kind == RecordKind::Stage1El2 && !x.streams.is_empty())
                {
                    return Err(beyond(
                        "its EL2 stage-1 domain in use beside another record's, streams",
                        r.streams.len() as u64,
                    ));
                }
            }
            // The IDs a record's domain owns must be free here (0 is reserved, never a domain's), and its streams
            // unattached: checked now, so that a restore into an image that already uses them changes nothing.
            if matches!(r.kind, RecordKind::Stage1 | RecordKind::Stage1El2) && self.core.asid_taken(r.asid) {
                return Err(beyond("an ASID reserved or taken in this image", r.asid.into()));
            }
            if r.kind == RecordKind::Stage2 && self.core.vmid_taken(r.vmid) {
                return Err(beyond("a VMID reserved or taken in this image", r.vmid.into()));
            }
            if let Some(s) = r.streams.iter().find(|s| self.domains.stream(s.sid).is_some()) {
                return Err(beyond("a StreamID attached in this image", s.sid.into()));
            }
            // A token names one domain: not one this image preserved, nor one an earlier restore left waiting (a
            // parent kept for a live nested domain), whose entry the rebuild would otherwise overwrite.
            if self.domains.restored.contains_key(&r.token) || self.domains.tokens.contains_key(&r.token) {
                return Err(beyond("a token a domain of this image holds, token", r.token));
            }
            // One ASID allocator serves both stage-1 regimes.
            let stage1_only = |k| matches!(k, RecordKind::Stage1 | RecordKind::Stage1El2);
            if stage1_only(r.kind)
                && instance
                    .records
                    .iter()
                    .any(|x| x.token != r.token && stage1_only(x.kind) && x.asid == r.asid)
            {
                return Err(beyond("an ASID another stage-1 record uses too", r.asid.into()));
            }
            // Each domain's memory is one arena, taken back whole (nested domains own none).
            if r.kind != RecordKind::Nested {
                match r.extents.as_slice() {
                    [extent] if pool.adoptable(*extent) => {}
                    [extent] => return Err(beyond("an extent that is not a free arena's, at", extent.base)),
                    other => return Err(beyond("one extent, not", other.len() as u64)),
                }
            }
            for s in &r.streams {
                // A substream comes back only with its whole stream, in the same record (as `prepare_handover`
                // records them): the stream's CD table and regime (EL2 or NS-EL1) are that domain's.
                let whole_stream = r.streams.iter().any(|y| y.sid == s.sid && y.ssid == 0);
                if s.ssid != 0 && !whole_stream {
                    return Err(beyond(
                        "a substream of a stream its own record does not hold, StreamID",
                        s.sid.into(),
                    ));
                }
                if sid_bits < 32 && s.sid >> sid_bits != 0 {
                    return Err(beyond("StreamID", s.sid.into()));
                }
                if s.cd_ssid_bits > f.ssid_bits || s.cd_two_level {
                    return Err(beyond("a CD table of SubstreamID bits", s.cd_ssid_bits.into()));
                }
            }
        }
        Ok(())
    }

    fn rebuild(
        &mut self,
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
                let (translation, memory): (Translation, DomainMemory) = match (r.kind, r.table) {
                    (RecordKind::Nested, _) => {
                        let parent = *self.domains.restored.get(&r.parent_token.unwrap_or(0)).ok_or(fail(
                            RebuildFailure::Domain(DomainError::UnknownToken(r.parent_token.unwrap_or(0))),
                        ))?;
                        let memory = self
                            .domains
                            .get(parent)
                            .map_err(|e| fail(RebuildFailure::Domain(e)))?
                            .memory;
                        let g = r.guest.unwrap_or_default();
                        let guest = GuestStage1 {
                            cd_table: g.cd_table_ipa,
                            cd_max_log2: g.cd_max_log2,
                            layout: layout_of(g.layout),
                            default_substream: dss_of(g.default_substream),
                        };
                        (Translation::Nested { parent, guest }, memory)
                    }
                    (_, Some(shape)) => {
                        let extent = r.extents.first().copied().unwrap_or_default();
                        let arena = pool.adopt(extent).map_err(|e| fail(RebuildFailure::Pool(e)))?;
                        // Given back only by the refusal's exit, once no stream can reach it.
                        let _ = taken.arenas.push(arena);
                        arena.take_ownership();
                        let memory: DomainMemory = arena;
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
                        // name it), the ID given back; the arena goes back with the refusal's exit.
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
                if let Err(e) = self.domains.check_free_slot() {
                    // As above: this record's ID back, its table abandoned in place.
                    let state = DomainState::new(translation, memory);
                    self.release_restored_ids(&state);
                    core::mem::forget(state);
                    return Err(fail(RebuildFailure::Domain(e)));
                }
                let id = self.domains.insert(DomainState::new(translation, memory));
                if let Some(parent) = parent
                    && let Ok(DomainState {
                        translation: Translation::Stage2 { children, .. },
                        ..
                    }) = self.domains.get_mut(parent)
                {
                    *children += 1;
                }
                // Never over another domain's entry (`check_limits` refused such a token already).
                let refused = match self.domains.restored.get(&r.token) {
                    Some(&holder) => Some(DomainError::TokenInUse {
                        token: r.token,
                        domain: holder,
                    }),
                    None => self
                        .domains
                        .restored
                        .insert(r.token, id)
                        .err()
                        .map(|_| DomainError::TooMany("restored domains")),
                };
                if let Some(e) = refused {
                    // Not in `restored`, so the refusal's exit would not find it: forgotten here.
                    if let Some(state) = self.domains.remove(id) {
                        self.release_restored_ids(&state);
                        core::mem::forget(state);
                    }
                    return Err(fail(RebuildFailure::Domain(e)));
                }
                // Room: at most one per record.
                let _ = taken.domains.push(r.token);
                report.domains += 1;
            }
        }
        // Streams: the whole-stream attachments (with their adopted CD tables), then substreams.
        for substreams in [false, true] {
            for r in &instance.records {
                let fail = |what| RestoreError::Rebuild { token: r.token, what };
                let id = self
                    .domains
                    .restored
                    .get(&r.token)
                    .copied()
                    .ok_or(fail(RebuildFailure::Domain(DomainError::UnknownToken(r.token))))?;
                for s in r.streams.iter().filter(|s| (s.ssid != 0) == substreams) {
                    if substreams {
                        // The CD is in the stream's adopted CD table already; only the bookkeeping is rebuilt.
                        let index = self.domains.streams.iter().position(|x| x.sid == s.sid).ok_or(fail(
                            RebuildFailure::Domain(DomainError::NotAttached { sid: s.sid, ssid: None }),
                        ))?;
                        let _ = self.domains.streams[index].substreams.push((s.ssid, id));
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
                            // must not come back: invalid, and invalidated where the SMMU may have them cached.
                            let sid = s.sid;
                            for ssid in 1..(1u32 << s.cd_ssid_bits) {
                                let named = instance
                                    .records
                                    .iter()
                                    .any(|x| x.streams.iter().any(|y| y.sid == sid && y.ssid == ssid));
                                if named || !table.read(ssid).is_ok_and(|cd| cd.is_valid()) {
                                    continue;
                                }
                                table
                                    .write(ssid, &crate::hw::cd::Cd::invalid(), &memory, |leaf| {
                                        let mut batch = crate::queue::cmdq::Batch::new();
                                        batch.push(&crate::hw::command::Command::CfgiCd { sid, ssid, leaf })?;
                                        self.submit(&batch).map(drop)
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
                        self.enter_el2(id).map_err(|e| fail(RebuildFailure::Domain(e)))?;
                        let _ = taken.streams.push(s.sid);
                        self.core
                            .install_ste(s.sid, &ste)
                            .map_err(|e| fail(RebuildFailure::Attach(e)))?;
                        self.domains
                            .streams
                            .push(StreamRecord {
                                sid: s.sid,
                                domain: id,
                                cd_table,
                                substreams: heapless::Vec::new(),
                            })
                            .map_err(|_| fail(RebuildFailure::Domain(DomainError::TooMany("attached streams"))))?;
                    }
                    if let Ok(state) = self.domains.get_mut(id) {
                        let _ = state.attachments.push((s.sid, s.ssid));
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
    /// [`ActiveSmmu::restore_handover`] does this itself; call it to settle an adopted SMMU without restoring.
    /// Returns how many STEs changed.
    ///
    /// # Errors
    /// As [`ActiveSmmu::attach_abort`].
    pub fn abort_unrestored_streams(&mut self) -> Result<u32, AttachError> {
        let keep: heapless::Vec<u32, { crate::domain::MAX_ATTACHED_STREAMS }> =
            self.domains.streams.iter().map(|r| r.sid).collect();
        let aborted = self.abort_streams_except(|sid| keep.contains(&sid))?;
        // Until now those streams translated with the old image's contexts and may have filled the TLB under
        // ASIDs and VMIDs this image considers free: drop every such entry before any is allocated again.
        self.core.invalidate_all().map_err(AttachError::Queue)?;
        self.core.inherited_stes = false;
        Ok(aborted)
    }

    /// The domain restored under `token`, handed to the caller (once): it is then an ordinary live domain (preserve
    /// it again for the next hand-off).
    ///
    /// # Errors
    /// [`DomainError::UnknownToken`] when no restored domain waits under `token` (never preserved, unpreserved
    /// before the hand-off, already retrieved, or freed by [`ActiveSmmu::finish_handover`]).
    pub fn retrieve(&mut self, token: u64) -> Result<DomainId, DomainError> {
        self.domains
            .restored
            .swap_remove(&token)
            .ok_or(DomainError::UnknownToken(token))
    }

    /// Ends the hand-off: every restored domain nobody retrieved is detached (its streams abort), its TLB entries
    /// invalidated, its memory given back to the pool; then this SMMU's records are removed from the region (the
    /// region re-armed without them; other SMMUs' records stay). A stage-2 parent whose nested domain was
    /// retrieved is the exception: the live nested domain translates through it, so it stays as it is, and
    /// retrievable under its token (retrieve it to own it, and free it after its nested domains).
    ///
    /// Without a restore (a region refused, or a hand-off this image declines) it only re-arms the region without
    /// this SMMU's records; on an SMMU adopted running it first makes every stream the previous image left abort
    /// and invalidates everything, as a restore would have (the re-armed region no longer keeps the memory those
    /// streams walk from being handed out again). A restore consumed them already, so finishing it twice, or after a failed finish,
    /// re-arms nothing of value and frees what still waits.
    ///
    /// # Errors
    /// [`FinishError::HandoverPrepared`] while this driver has a hand-off prepared (nothing changed);
    /// [`FinishError::Domain`] from detaching or freeing (an invalidation that failed): the domains not yet freed
    /// stay waiting and the hand-off stays restored (finish again).
    pub fn finish_handover(&mut self, pool: &HandoverPool, register_base: u64) -> Result<FinishReport, FinishError> {
        if let Some(generation) = self.domains.prepared_generation() {
            return Err(FinishError::HandoverPrepared { generation });
        }
        // An SMMU adopted running and never restored: the previous image's STEs still walk memory the re-armed
        // region stops naming (the pool hands it out again): they abort, and every cached entry goes, first.
        if self.core.inherited_stes {
            self.abort_unrestored_streams()
                .map_err(|e| FinishError::Domain(DomainError::Attach(e)))?;
        }
        let mut report = FinishReport::default();
        // Nested domains before their parents.
        for nested_pass in [true, false] {
            let waiting: heapless::Vec<(u64, DomainId), { crate::domain::MAX_PRESERVED }> = self
                .domains
                .restored
                .iter()
                .filter(|(_, id)| {
                    self.domains
                        .get(**id)
                        .is_ok_and(|s| matches!(s.translation, Translation::Nested { .. }) == nested_pass)
                })
                .map(|(t, id)| (*t, *id))
                .collect();
            for (token, id) in waiting {
                // A parent whose nested domain was retrieved stays: the live nested domain needs its stage 2.
                if let Ok(DomainState {
                    translation: Translation::Stage2 { children, .. },
                    ..
                }) = self.domains.get(id)
                    && *children > 0
                {
                    continue;
                }
                let attachments: heapless::Vec<(u32, u32), { crate::domain::MAX_ATTACHMENTS }> =
                    self.domains.get(id).map(|s| s.attachments.clone()).unwrap_or_default();
                for &(sid, ssid) in attachments.iter().filter(|(_, ssid)| *ssid != 0) {
                    self.detach_substream(sid, ssid)?;
                }
                for &(sid, _) in attachments.iter().filter(|(_, ssid)| *ssid == 0) {
                    self.detach(sid)?;
                }
                self.free_domain(id)?;
                self.domains.restored.swap_remove(&token);
                report.unclaimed += 1;
            }
        }
        // Re-arm: the region without this SMMU's records.
        let _ = rearm_without(pool, register_base);
        self.domains.restored_generation = None;
        Ok(report)
    }
}

/// Rewrites the region without the records of the SMMU at `register_base` (others' stay; a region that does not
/// validate is re-armed empty), under the next generation, cleaned to memory.
fn rearm_without(pool: &HandoverPool, register_base: u64) -> Result<(), PoolError> {
    let region = pool.metadata_extent()?;
    let pool_extent = pool.pool()?;
    let mut guard = pool.lock_metadata()?;
    let bytes: &mut [u8] = &mut guard;
    let mut keep: heapless::Vec<InstanceRecords, MAX_INSTANCES> = heapless::Vec::new();
    let mut generation = 0;
    if let Ok(previous) = format::decode(bytes, pool_extent) {
        generation = previous.generation;
        for other in previous
            .instances
            .into_iter()
            .filter(|i| i.identity.base != register_base)
        {
            let _ = keep.push(other);
        }
    }
    match format::encode(&keep, generation.wrapping_add(1), region, pool_extent, bytes) {
        Ok(written) => clean_to_memory(bytes.as_ptr(), written),
        Err(_) => {
            // Cannot happen (fewer records than were decoded); were it to, no record of this SMMU may survive.
            bytes[..8].fill(0);
            clean_to_memory(bytes.as_ptr(), 64);
        }
    }
    Ok(())
}

/// The metadata area's size, for callers that dump it.
pub const REGION_METADATA_BYTES: u64 = METADATA_BYTES;

#[cfg(test)]
pub(crate) mod tests {
    //! A live update on the host: one SMMU model's domains preserved and prepared, the "reset" (the old driver
    //! forgotten, a new pool object over the same region memory, a new SMMU model), then restore, retrieve and
    //! finish, against the same page tables in place.
    extern crate std;

    use super::*;
    use crate::domain::{Stage1Options, Stage2Options};
    use crate::handover::pool::ARENAS;
    use crate::hw::ste::Config;
    use crate::pgtable::Prot;
    use crate::smmu::tests::{Issued, Model, assert_ste_steps, frames, issued_since};
    use crate::testing::HeapFrames;
    use crate::{ActiveSmmu, InitOptions};
    use core::ptr::NonNull;
    use std::boxed::Box;

    pub(crate) const BASE: u64 = 0x905_0000;
    /// The whole 48-bit output space declared DMA-able (less the region and protected memory, as always): the
    /// tests of the restore itself, not of what the leaves reach.
    pub(crate) const ANYWHERE: RestoreOptions<'static> = RestoreOptions::new(SURVIVING);
    /// What survives a hand-off in these tests: as above.
    pub(crate) const SURVIVING: &[Extent] = &[Extent { base: 0, len: 1 << 48 }];
    pub(crate) const RW: Prot = Prot::READ.union(Prot::WRITE).union(Prot::CACHEABLE);

    /// Region memory that outlives both "images", and a fresh pool object over it per image.
    pub(crate) struct Region {
        pub(crate) memory: &'static mut [u64],
        pub(crate) extent: Extent,
    }

    impl Region {
        pub(crate) fn new() -> Region {
            let bytes = METADATA_BYTES as usize + ARENAS * 256 * 1024;
            Region {
                memory: Box::leak(std::vec![0u64; bytes / 8].into_boxed_slice()),
                extent: Extent {
                    base: 0x80_0000_0000,
                    len: bytes as u64,
                },
            }
        }

        pub(crate) fn pool(&mut self) -> &'static HandoverPool {
            let pool: &'static HandoverPool = Box::leak(Box::new(HandoverPool::new()));
            // SAFETY: leaked memory used by nothing else (the previous "image" is forgotten).
            unsafe { pool.set_up(self.extent, NonNull::new(self.memory.as_mut_ptr().cast()).unwrap()) }.unwrap();
            pool
        }

        fn byte(&mut self, offset: usize) -> &mut u8 {
            // SAFETY: inside the leaked block.
            unsafe { &mut *self.memory.as_mut_ptr().cast::<u8>().add(offset) }
        }
    }

    pub(crate) fn boot(model: &Model, frames: &'static HeapFrames) -> ActiveSmmu<&'static HeapFrames> {
        model.smmu().init(frames, &InitOptions::default()).unwrap()
    }

    /// A stage-1 domain (39-bit input, EL1&0 regime) in a fresh handover arena.
    pub(crate) fn arena_stage1(smmu: &mut ActiveSmmu<&'static HeapFrames>, pool: &'static HandoverPool) -> DomainId {
        let options = Stage1Options {
            input_bits: 39,
            el2: false,
        };
        smmu.create_stage1(pool.take_arena().unwrap(), options).unwrap()
    }

    /// Makes `sid` bypass on a driver whose running hand-off is prepared, writing its STE through the crate's
    /// own path (`install_ste`, blind to the freeze): the state a previous image leaves when it is not this driver
    /// (or an older one), whose `prepare_handover` refuses a bypassing stream (`PrepareError::UnpreservedStream`)
    /// and whose `attach_bypass` is frozen meanwhile. The next image must contain it all the same.
    pub(crate) fn leave_bypassing<A: FrameAllocator>(smmu: &mut ActiveSmmu<A>, sid: u32) {
        let bypass = crate::hw::ste::Ste::bypass_for(&smmu.features().entry_rules());
        smmu.core.install_ste(sid, &bypass).unwrap();
    }

    /// Runs `f` with the stream configuration of a prepared running hand-off unfrozen, then freezes it again: as
    /// [`leave_bypassing`], the state a previous image that is not this driver may leave (streams translating
    /// through domains no record describes), built after this driver's `prepare_handover`, which refuses it.
    fn as_another_driver<A: FrameAllocator, R>(smmu: &mut ActiveSmmu<A>, f: impl FnOnce(&mut ActiveSmmu<A>) -> R) -> R {
        let prepared = smmu.domains.prepared.lock().take();
        let result = f(smmu);
        *smmu.domains.prepared.lock() = prepared;
        result
    }

    /// The first image: a stage-1 domain (stream 0x10), a stage-2 parent with a nested domain (stream 0x18), a
    /// stage-1 domain preserved and then unpreserved, and one preserved but never retrieved (stream 0x20).
    fn first_image(region: &mut Region, frames: &'static HeapFrames) {
        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let s1 = arena_stage1(&mut smmu, pool);
        smmu.map(s1, 0x1000, 0x8000_0000, 0x2000, RW).unwrap();
        smmu.map(s1, 0x4000_0000, 0x9000_0000, 0x20_0000, RW).unwrap();
        smmu.attach(s1, 0x10).unwrap();
        let parent = smmu
            .create_stage2(pool.take_arena().unwrap(), Stage2Options { input_bits: 40 })
            .unwrap();
        smmu.map(parent, 0x4000_0000, 0x4000_0000, 0x4000_0000, RW).unwrap();
        let guest = crate::domain::GuestStage1 {
            cd_table: 0x4800_0000,
            cd_max_log2: 0,
            layout: CdTableLayout::Linear,
            default_substream: DefaultSubstream::Terminate,
        };
        let nested = smmu.create_nested(parent, guest).unwrap();
        smmu.attach(nested, 0x18).unwrap();
        let dropped = smmu
            .create_stage1(pool.take_arena().unwrap(), Stage1Options::default())
            .unwrap();
        let unclaimed = smmu
            .create_stage2(pool.take_arena().unwrap(), Stage2Options { input_bits: 40 })
            .unwrap();
        smmu.map(unclaimed, 0, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.attach(unclaimed, 0x20).unwrap();
        smmu.preserve(s1, 0x51).unwrap();
        smmu.preserve(parent, 0x52).unwrap();
        smmu.preserve(nested, 0x53).unwrap();
        smmu.preserve(dropped, 0x54).unwrap();
        smmu.preserve(unclaimed, 0x55).unwrap();
        smmu.unpreserve(0x54).unwrap();
        // Mutations after preserve are what is restored: the state at prepare.
        smmu.unmap(s1, 0x2000, 0x1000).unwrap();
        smmu.map(s1, 0x3000, 0x8000_3000, 0x1000, RW).unwrap();
        let written = smmu.prepare_handover(pool, BASE, 7, SURVIVING).unwrap();
        assert!(written > 0);
        // The reset: nothing is freed, the SMMU model goes away.
        core::mem::forget(smmu);
        drop(model);
    }

    #[test]
    fn preserved_domains_come_back_by_token_with_their_tables_in_place() {
        let frames = frames();
        let mut region = Region::new();
        first_image(&mut region, frames);

        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let before = model.seen.lock().unwrap().consumed.len();
        let report = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
        assert_eq!((report.generation, report.domains, report.streams), (7, 4, 3));
        assert_eq!(report.adopted_without_walk, 3, "counts recorded: no walk");
        // No STE or CD was scanned: the IDs come from the records.
        assert_eq!((smmu.asids_in_use(), smmu.vmids_in_use()), (1, 2));
        let ops = model.seen.lock().unwrap().consumed[before..].to_vec();
        assert!(
            ops.iter()
                .all(|&op| op == crate::hw::command::opcode::CFGI_STE || op == crate::hw::command::opcode::SYNC)
        );

        let s1 = smmu.retrieve(0x51).unwrap();
        assert_eq!(smmu.iova_to_phys(s1, 0x1000), Ok(Some(0x8000_0000)));
        assert_eq!(smmu.iova_to_phys(s1, 0x2000), Ok(None), "unmapped after preserve: gone");
        assert_eq!(
            smmu.iova_to_phys(s1, 0x3000),
            Ok(Some(0x8000_3000)),
            "mapped after preserve: there"
        );
        assert_eq!(smmu.iova_to_phys(s1, 0x401f_f000), Ok(Some(0x901f_f000)));
        assert_eq!(smmu.ste(0x10).unwrap().config(), Config::Stage1);
        assert_eq!(smmu.retrieve(0x51), Err(DomainError::UnknownToken(0x51)), "once");
        assert_eq!(
            smmu.retrieve(0x54),
            Err(DomainError::UnknownToken(0x54)),
            "unpreserved: not restored"
        );
        let parent = smmu.retrieve(0x52).unwrap();
        let nested = smmu.retrieve(0x53).unwrap();
        assert_eq!(smmu.ste(0x18).unwrap().config(), Config::Nested);
        assert_eq!(smmu.ste(0x18).unwrap().cd_table(), PhysAddr(0x4800_0000));
        // Rebuilt through the same stage-2 configuration as a new attach: protected table walks (S2PTW).
        for sid in [0x18, 0x20] {
            assert_ne!(smmu.ste(sid).unwrap().0[2] & crate::hw::ste::Q2_S2PTW, 0, "{sid:#x}");
        }
        assert_eq!(smmu.attachments(nested), Ok(&[(0x18, 0)][..]));
        // The restored domains work: map, unmap (with invalidation), and the parent cannot go before its child.
        smmu.map(s1, 0x5000, 0x8000_5000, 0x1000, RW).unwrap();
        assert_eq!(smmu.unmap(s1, 0x1000, 0x1000), Ok(0x1000));
        assert!(matches!(
            smmu.free_domain(parent),
            Err(DomainError::HasNestedDomains { .. })
        ));

        // finish: the unclaimed domain's stream aborts, its arena is free again, the region is re-armed empty.
        assert_eq!(smmu.ste(0x20).unwrap().config(), Config::Stage2);
        let in_use = pool.arenas_in_use();
        assert_eq!(smmu.finish_handover(pool, BASE), Ok(FinishReport { unclaimed: 1 }));
        assert_eq!(smmu.ste(0x20).unwrap().config(), Config::Abort);
        assert_eq!(pool.arenas_in_use(), in_use - 1);
        assert_eq!(
            smmu.restore_handover(pool, BASE, &ANYWHERE).map(|r| r.domains),
            Ok(0),
            "nothing left to restore"
        );
    }

    #[test]
    fn a_corrupt_region_is_refused_whole_and_left_untouched() {
        let frames = frames();
        let mut region = Region::new();
        first_image(&mut region, frames);
        // One flipped bit in a record.
        *region.byte(200) ^= 0x10;
        let snapshot: std::vec::Vec<u8> = (0..4096).map(|i| *region.byte(i)).collect();

        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
        assert!(
            matches!(error, RestoreError::Region(HandoverError::BadCrc { .. })),
            "{error}"
        );
        assert_eq!(smmu.retrieve(0x51), Err(DomainError::UnknownToken(0x51)));
        for sid in [0x10, 0x18, 0x20] {
            assert_ne!(smmu.ste(sid).map(|s| s.config()), Ok(Config::Stage1));
        }
        assert_eq!(pool.arenas_in_use(), 0, "no arena taken back");
        let after: std::vec::Vec<u8> = (0..4096).map(|i| *region.byte(i)).collect();
        assert_eq!(after, snapshot, "the region's bytes are left for diagnosis");
    }

    #[test]
    fn a_region_for_another_smmu_is_refused() {
        let frames = frames();
        let mut region = Region::new();
        first_image(&mut region, frames);
        // The same base, another SMMU: a stage-1-only model (IDR0 differs).
        let model = Model::start_with(frames, 0x0d44_101a);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
        assert!(matches!(error, RestoreError::Identity(_)), "{error}");
        // Records for another base are simply not ours.
        let model2 = Model::start(frames);
        let mut other = boot(&model2, frames);
        assert_eq!(
            other
                .restore_handover(region.pool(), BASE + 0x1_0000, &ANYWHERE)
                .map(|r| r.domains),
            Ok(0)
        );
    }

    #[test]
    fn a_hand_off_with_the_smmu_running_never_turns_translation_off() {
        use crate::handover::pool::HandoverArena;
        let frames = frames();
        let mut region = Region::new();
        let model = Model::start(frames);
        let pool = region.pool();
        *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
        let core = pool.take_arena().unwrap();
        let mut first: ActiveSmmu<&'static HandoverArena> = model.smmu().init(core, &InitOptions::default()).unwrap();
        let d = first
            .create_stage1(
                pool.take_arena().unwrap(),
                Stage1Options {
                    input_bits: 39,
                    el2: false,
                },
            )
            .unwrap();
        first.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
        first.attach(d, 0x10).unwrap();
        first.preserve(d, 0x77).unwrap();
        first.prepare_handover(pool, BASE, 3, SURVIVING).unwrap();
        // Stream 0x30 bypassing across the hand-off: what a previous image that is not this driver may leave (this
        // one refuses to prepare with it), written after the prepare; the next image must abort it.
        leave_bypassing(&mut first, 0x30);
        let strtab = first.configuration().stream_table_base;
        let format = first.stream_table_format();
        assert!(matches!(format, StreamTableFormat::TwoLevel { .. }));
        let ste = first.ste(0x10).unwrap();
        core::mem::forget(first);

        // The next image: the same SMMU, still translating; where its structures are comes from the region.
        let pool = region.pool();
        let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
        assert_eq!((running.format, running.strtab_base), (format, strtab));
        let before = model.seen.lock().unwrap().consumed.len();
        let mut next = model
            .smmu()
            .adopt_running(core, &InitOptions::default(), &running)
            .unwrap();
        // Whatever the old image left cached goes: every configuration and TLB entry (no EL2 contexts here).
        assert_eq!(
            issued_since(&model, before),
            [Issued::CfgiAll, Issued::NsnhAll, Issued::Sync]
        );
        assert_eq!(next.ste(0x10), Ok(ste), "the running stream table adopted as found");
        assert_eq!(next.ste(0x30).unwrap().config(), Config::Bypass, "until the restore");
        assert_eq!(
            next.allocate_asid(),
            Err(crate::ids::IdError::HandOffUnsettled),
            "nothing allocated while the previous image's streams may use any ID"
        );
        let before = model.seen.lock().unwrap().consumed.len();
        let report = next.restore_handover(pool, BASE, &ANYWHERE).unwrap();
        assert_eq!((report.domains, report.streams, report.aborted), (1, 1, 1));
        assert_eq!(
            next.ste(0x10),
            Ok(ste),
            "the restored STE is the one the SMMU was using: nothing rewritten"
        );
        assert_eq!(next.ste(0x30).unwrap().config(), Config::Abort);
        // Before the restore returns: the unrestored stream's STE (and only it), then everything it may have cached
        // under IDs this image reuses.
        let issued = issued_since(&model, before);
        let (ste_steps, rest) = issued.split_at(issued.len() - 3);
        assert_ste_steps(ste_steps, 0x30);
        assert_eq!(rest, [Issued::CfgiAll, Issued::NsnhAll, Issued::Sync]);
        assert_eq!(next.abort_unrestored_streams(), Ok(0), "nothing left to abort");
        let d = next.retrieve(0x77).unwrap();
        assert_eq!(next.iova_to_phys(d, 0x1000), Ok(Some(0x8000_0000)));
        assert!(
            !model.seen.lock().unwrap().smmuen_dropped,
            "translation never turned off"
        );
        // A stream table elsewhere than the SMMU's is refused.
        core::mem::forget(next);
        let error = model
            .smmu()
            .adopt_running(
                core,
                &InitOptions::default(),
                &RunningSmmu {
                    strtab_base: strtab + 0x1000,
                    ..running
                },
            )
            .err();
        assert!(
            matches!(error, Some(crate::InitError::StreamTableNotAdoptable { .. })),
            "{error:?}"
        );
    }

    #[test]
    fn after_prepare_nothing_recorded_grows_until_the_hand_off_is_cancelled() {
        let frames = frames();
        let mut region = Region::new();
        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let arena = pool.take_arena().unwrap();
        let d = smmu
            .create_stage1(
                arena,
                Stage1Options {
                    input_bits: 39,
                    el2: false,
                },
            )
            .unwrap();
        smmu.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.preserve(d, 9).unwrap();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        // The domain is frozen (see `a_prepared_domain_is_frozen_until_the_hand_off_is_cancelled`), and its
        // memory hands out nothing, whoever asks.
        assert!(crate::mem::FrameAllocator::allocate_zeroed(&arena, 4096, 4096).is_err());
        assert!(matches!(
            smmu.map(d, 0x4000_0000, 0x8000_2000, 0x1000, RW),
            Err(DomainError::HandoverPrepared { token: 9 })
        ));
        // Cancelled: memory again, and the region no longer names this SMMU's domains.
        smmu.cancel_handover(pool, BASE).unwrap();
        smmu.map(d, 0x4000_0000, 0x8000_2000, 0x1000, RW).unwrap();
        assert_eq!(smmu.restore_handover(pool, BASE, &ANYWHERE).map(|r| r.domains), Ok(0));
    }

    #[test]
    fn a_region_beyond_this_image_is_refused_before_anything_changes() {
        let frames = frames();
        let mut region = Region::new();
        first_image(&mut region, frames);
        // The next image keeps only 2 domain slots: 4 records cannot be rebuilt.
        let model = Model::start(frames);
        let mut smmu: ActiveSmmu<&'static HeapFrames, 2> = model
            .smmu()
            .init_with_capacity(frames, &InitOptions::default())
            .unwrap();
        let pool = region.pool();
        let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
        assert!(
            matches!(
                error,
                RestoreError::BeyondLimits {
                    what: "more domains than free slots",
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(
            (pool.arenas_in_use(), smmu.asids_in_use(), smmu.vmids_in_use()),
            (0, 0, 0)
        );
        assert_ne!(
            smmu.ste(0x10).map(|s| s.config()),
            Ok(Config::Stage1),
            "no STE installed"
        );
        assert!(smmu.retrieve(0x51).is_err());
    }

    /// Suspicion 6: a region whose streams do not fit this image's stream records ([`MAX_ATTACHED_STREAMS`] with
    /// the ones it has attached) is refused by `check_limits`, before anything is installed, not half-way through
    /// the rebuild after STEs were written.
    ///
    /// [`MAX_ATTACHED_STREAMS`]: crate::domain::MAX_ATTACHED_STREAMS
    #[test]
    fn a_region_with_more_streams_than_this_image_can_hold_is_refused_before_any_ste_is_written() {
        use crate::domain::{MAX_ATTACHED_STREAMS, MAX_ATTACHMENTS};
        let frames = frames();
        let mut region = Region::new();
        {
            let model = Model::start(frames);
            let mut smmu = boot(&model, frames);
            let pool = region.pool();
            let d = smmu
                .create_stage2(pool.take_arena().unwrap(), Stage2Options { input_bits: 40 })
                .unwrap();
            smmu.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
            smmu.attach(d, 0x10).unwrap();
            smmu.preserve(d, 0x61).unwrap();
            smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
            core::mem::forget(smmu);
        }
        // The next image has every stream record in use already (stage-1 domains: no VMID shared with the record).
        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        for k in 0..MAX_ATTACHED_STREAMS / MAX_ATTACHMENTS {
            let d = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
            for j in 0..MAX_ATTACHMENTS {
                smmu.attach(d, (0x100 + k * MAX_ATTACHMENTS + j) as u32).unwrap();
            }
        }
        let pool = region.pool();
        let before = model.seen.lock().unwrap().consumed.len();
        let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
        assert_eq!(
            error,
            RestoreError::BeyondLimits {
                token: 0x61,
                what: "more streams than this image can attach, with those attached already",
                value: MAX_ATTACHED_STREAMS as u64 + 1
            }
        );
        assert_eq!(issued_since(&model, before), [], "nothing installed, nothing to undo");
        assert_eq!(pool.arenas_in_use(), 0);
        assert_ne!(smmu.ste(0x10).map(|s| s.config()), Ok(Config::Stage2));
        core::mem::forget(smmu);
    }

    fn vmid_of(smmu: &ActiveSmmu<&'static HeapFrames>, token: u64) -> u16 {
        let id = smmu.domains.restored.get(&token).copied().unwrap();
        match smmu.domains.get(id).unwrap().translation {
            Translation::Stage2 { vmid, .. } => vmid,
            _ => unreachable!(),
        }
    }

    #[test]
    fn restore_and_finish_invalidate_exactly_the_restored_streams_and_the_freed_ids() {
        let frames = frames();
        let mut region = Region::new();
        first_image(&mut region, frames);

        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let before = model.seen.lock().unwrap().consumed.len();
        smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
        // After a reset (init invalidated everything): each restored stream's STE, nothing else.
        let issued = issued_since(&model, before);
        let mut sids: std::vec::Vec<u32> = std::vec::Vec::new();
        for pair in issued.chunks(2) {
            match pair {
                [Issued::Ste { sid }, Issued::Sync] => sids.push(*sid),
                _ => panic!("{issued:?}"),
            }
        }
        sids.sort_unstable();
        sids.dedup();
        assert_eq!(sids, [0x10, 0x18, 0x20]);

        // Only the stage-1 domain is claimed: finish frees the nested domain, then its parent and the other stage 2.
        let parent_vmid = vmid_of(&smmu, 0x52);
        let unclaimed_vmid = vmid_of(&smmu, 0x55);
        assert_ne!(parent_vmid, unclaimed_vmid);
        smmu.retrieve(0x51).unwrap();
        let vmids = smmu.vmids_in_use();
        let before = model.seen.lock().unwrap().consumed.len();
        assert_eq!(smmu.finish_handover(pool, BASE), Ok(FinishReport { unclaimed: 3 }));
        assert_eq!(
            smmu.vmids_in_use(),
            vmids - 2,
            "both VMIDs freed, after their invalidation"
        );
        let issued = issued_since(&model, before);
        // Nested (stream 0x18): its STE, its combined entries (last detach), again when freed.
        let steps = issued
            .iter()
            .take_while(|i| **i == Issued::Ste { sid: 0x18 } || **i == Issued::Sync);
        let n = steps.count();
        assert_ste_steps(&issued[..n], 0x18);
        let nested = [
            Issued::NhAll { vmid: parent_vmid },
            Issued::Sync,
            Issued::NhAll { vmid: parent_vmid },
            Issued::Sync,
        ];
        assert_eq!(issued[n..n + 4], nested, "{issued:?}");
        let rest = &issued[n + 4..];
        // The parent (no stream left): its VMID. The unclaimed stage 2 (stream 0x20): its STE, its VMID on the last
        // detach, again when freed. In either order.
        let parent = [Issued::S12Vmall { vmid: parent_vmid }, Issued::Sync];
        let first = if rest.starts_with(&parent) {
            &rest[2..]
        } else {
            assert!(rest.ends_with(&parent), "{issued:?}");
            &rest[..rest.len() - 2]
        };
        let (ste_steps, ids) = first.split_at(first.len() - 4);
        assert_ste_steps(ste_steps, 0x20);
        assert_eq!(
            ids,
            [
                Issued::S12Vmall { vmid: unclaimed_vmid },
                Issued::Sync,
                Issued::S12Vmall { vmid: unclaimed_vmid },
                Issued::Sync
            ],
            "{issued:?}"
        );
    }

    #[test]
    fn a_restored_cd_table_loses_the_substreams_no_record_names_with_their_cfgi_cd() {
        // SSIDSIZE 5 (IDR1[10:6]) in both images.
        let idr1 = crate::smmu::tests::IDRS[1].1 | 5 << 6;
        let idr0 = crate::smmu::tests::IDRS[0].1;
        let frames = frames();
        let mut region = Region::new();
        {
            let model = Model::start_with_idrs(frames, idr0, idr1);
            let mut smmu = boot(&model, frames);
            let pool = region.pool();
            let whole = smmu
                .create_stage1(pool.take_arena().unwrap(), Stage1Options::default())
                .unwrap();
            let dropped = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
            smmu.attach(whole, 0x10).unwrap();
            smmu.attach_substream(dropped, 0x10, 3).unwrap();
            smmu.preserve(whole, 0x61).unwrap();
            smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
            core::mem::forget(smmu);
            drop(model);
        }
        let model = Model::start_with_idrs(frames, idr0, idr1);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let before = model.seen.lock().unwrap().consumed.len();
        let report = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
        assert_eq!((report.domains, report.streams), (1, 1));
        // Substream 3 (its domain not preserved): its CD made invalid, V first then the rest, each CFGI_CD of
        // (0x10, 3) + CMD_SYNC; then the stream's STE.
        let issued = issued_since(&model, before);
        let cd = [
            Issued::Cd { sid: 0x10, ssid: 3 },
            Issued::Sync,
            Issued::Cd { sid: 0x10, ssid: 3 },
            Issued::Sync,
        ];
        assert_eq!(issued[..4], cd, "{issued:?}");
        assert_ste_steps(&issued[4..], 0x10);
    }
    #[test]
    fn a_restore_into_an_image_that_took_a_recorded_id_or_stream_changes_nothing() {
        let frames = frames();
        let mut region = Region::new();
        {
            let model = Model::start(frames);
            let mut smmu = boot(&model, frames);
            let pool = region.pool();
            let parent = smmu
                .create_stage2(pool.take_arena().unwrap(), Stage2Options { input_bits: 40 })
                .unwrap();
            let d = arena_stage1(&mut smmu, pool);
            smmu.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
            smmu.attach(d, 0x10).unwrap();
            // The stage-2 record first: it is rebuilt before the stage-1 one fails.
            smmu.preserve(parent, 0x62).unwrap();
            smmu.preserve(d, 0x61).unwrap();
            smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
            core::mem::forget(smmu);
            drop(model);
        }
        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        // This image took the recorded ASID before restoring: the stage-1 record cannot claim it.
        let mine = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
        assert_eq!((smmu.asids_in_use(), smmu.vmids_in_use()), (1, 0));
        let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
        // Found while validating, before anything changed (the rebuild's own undo stays as a second line).
        assert!(
            matches!(error, RestoreError::BeyondLimits { token: 0x61, .. }),
            "{error}"
        );
        assert_eq!(pool.arenas_in_use(), 0, "every arena taken back is given back");
        assert_eq!((smmu.asids_in_use(), smmu.vmids_in_use()), (1, 0), "no ID kept");
        assert_eq!(
            smmu.domains.free_slots(),
            crate::domain::DEFAULT_DOMAINS - 1,
            "no slot kept"
        );
        assert!(smmu.retrieve(0x61).is_err() && smmu.retrieve(0x62).is_err());
        assert_ne!(
            smmu.ste(0x10).map(|s| s.config()),
            Ok(Config::Stage1),
            "no STE installed"
        );
        // This image's own domain is untouched.
        smmu.map(mine, 0, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.free_domain(mine).unwrap();
        // The same with the recorded ID free but the recorded stream attached here: refused, this image's STE kept.
        let recorded_asid = smmu.allocate_asid().unwrap();
        let mine = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
        smmu.free_asid(recorded_asid).unwrap();
        smmu.attach(mine, 0x10).unwrap();
        let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
        assert!(
            matches!(error, RestoreError::BeyondLimits { token: 0x61, what, value: 0x10 } if what.contains("StreamID")),
            "{error}"
        );
        assert_eq!(pool.arenas_in_use(), 0);
        assert_eq!(
            smmu.ste(0x10).map(|s| s.config()),
            Ok(Config::Stage1),
            "this image's attachment kept"
        );
        smmu.detach(0x10).unwrap();
        smmu.free_domain(mine).unwrap();
    }

    /// An SMMU with EL2 contexts (IDR0.HYP), for EL2 stage-1 domains.
    fn el2_model(frames: &'static HeapFrames) -> Model {
        Model::start_with(frames, crate::smmu::tests::IDRS[0].1 | 1 << 9)
    }

    const EL2: Stage1Options = Stage1Options {
        input_bits: 39,
        el2: true,
    };

    /// A first image with EL2 domain 0x71 attached to stream 0x10 and, when `second` (an image that broke the
    /// one-in-use rule: simulated by hiding 0x71's regime while 0x72 attaches), EL2 domain 0x72 on stream 0x11.
    fn el2_first_image(region: &mut Region, frames: &'static HeapFrames, second: bool) {
        let model = el2_model(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let a = smmu.create_stage1(pool.take_arena().unwrap(), EL2).unwrap();
        smmu.map(a, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.attach(a, 0x10).unwrap();
        smmu.preserve(a, 0x71).unwrap();
        if second {
            let b = smmu.create_stage1(pool.take_arena().unwrap(), EL2).unwrap();
            let set_el2 = |smmu: &mut ActiveSmmu<&'static HeapFrames>, value: bool| {
                if let Translation::Stage1 { el2, .. } = &mut smmu.domains.get_mut(a).unwrap().translation {
                    *el2 = value;
                }
            };
            set_el2(&mut smmu, false);
            smmu.attach(b, 0x11).unwrap();
            set_el2(&mut smmu, true);
            smmu.preserve(b, 0x72).unwrap();
        }
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        core::mem::forget(smmu);
        drop(model);
    }

    /// One EL2 stage-1 domain in use at a time holds across a live update: a record's EL2 domain with streams is
    /// not restored beside one this image has in use, nor beside another record's; refused before anything
    /// changes.
    #[test]
    fn a_restore_never_puts_two_el2_domains_in_use() {
        let frames = frames();
        let mut region = Region::new();
        el2_first_image(&mut region, frames, false);
        let model = el2_model(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        // This image's domain on another ASID than the record's (1), so that only the EL2 rule stands in the way.
        let spare = smmu.allocate_asid().unwrap();
        let mine = smmu.create_stage1(frames, EL2).unwrap();
        smmu.free_asid(spare).unwrap();
        smmu.attach(mine, 0x11).unwrap();
        let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
        assert!(
            matches!(error, RestoreError::BeyondLimits { token: 0x71, what, .. } if what.contains("EL2")),
            "{error}"
        );
        assert_eq!(pool.arenas_in_use(), 0);
        assert_ne!(
            smmu.ste(0x10).map(|s| s.config()),
            Ok(Config::Stage1),
            "no STE installed"
        );
        assert_eq!(
            smmu.attachments(mine),
            Ok(&[(0x11, 0)][..]),
            "this image's domain untouched"
        );
        core::mem::forget(smmu);
        drop(model);

        // Restored into an image without one in use, the restored domain is the EL2 domain in use.
        let model = el2_model(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
        let restored = smmu.retrieve(0x71).unwrap();
        let mine = smmu.create_stage1(frames, EL2).unwrap();
        assert_eq!(
            smmu.attach(mine, 0x11),
            Err(DomainError::El2DomainInUse {
                domain: mine,
                holder: restored
            })
        );
        core::mem::forget(smmu);
        drop(model);

        // Two records' EL2 domains in use: neither is restored.
        let mut region = Region::new();
        el2_first_image(&mut region, frames, true);
        let model = el2_model(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
        assert!(
            matches!(error, RestoreError::BeyondLimits { what, .. } if what.contains("another record")),
            "{error}"
        );
        assert_eq!(pool.arenas_in_use(), 0);
        assert!(smmu.retrieve(0x71).is_err() && smmu.retrieve(0x72).is_err());
    }

    /// From prepare to cancel, a preserved domain is frozen: what the next image restores is what the region
    /// records (a detach would come back attached, a trim would leave the recorded table count wrong). A domain
    /// that is not preserved stays usable, and cancel thaws them all.
    #[test]
    fn a_prepared_domain_is_frozen_until_the_hand_off_is_cancelled() {
        let frames = frames();
        let mut region = Region::new();
        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let options = Stage1Options {
            input_bits: 39,
            el2: false,
        };
        let d = smmu.create_stage1(pool.take_arena().unwrap(), options).unwrap();
        let other = smmu.create_stage1(pool.take_arena().unwrap(), options).unwrap();
        smmu.map(d, 0x1000, 0x8000_0000, 0x2000, RW).unwrap();
        smmu.attach(d, 0x10).unwrap();
        smmu.preserve(d, 9).unwrap();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        let frozen = Err(DomainError::HandoverPrepared { token: 9 });
        assert_eq!(smmu.map(d, 0x4000, 0x8000_4000, 0x1000, RW), frozen);
        assert_eq!(smmu.unmap(d, 0x1000, 0x1000).map(|_| ()), frozen);
        let mut gather = crate::pgtable::Gather::default();
        assert_eq!(smmu.unmap_deferred(d, 0x1000, 0x1000, &mut gather).map(|_| ()), frozen);
        assert!(gather.is_empty());
        assert_eq!(smmu.protect(d, 0x1000, 0x1000, Prot::READ).map(|_| ()), frozen);
        assert_eq!(smmu.trim_domain(d).map(|_| ()), frozen);
        assert_eq!(smmu.detach(0x10), frozen);
        assert_eq!(smmu.attach(d, 0x11), frozen);
        assert_eq!(smmu.iova_to_phys(d, 0x2000), Ok(Some(0x8000_1000)), "nothing changed");
        assert_eq!(smmu.ste(0x10).map(|s| s.config()), Ok(Config::Stage1), "still attached");
        // Not preserved: usable.
        smmu.map(other, 0x1000, 0x8000_8000, 0x1000, RW).unwrap();
        smmu.attach(other, 0x11).unwrap();
        smmu.detach(0x11).unwrap();
        // Cancelled: usable again.
        smmu.cancel_handover(pool, BASE).unwrap();
        smmu.unmap(d, 0x1000, 0x1000).unwrap();
        smmu.detach(0x10).unwrap();
    }

    /// The records say what the tables hold, not what the SMMU may still cache: a preserved domain with a deferred
    /// unmap not synced (its old translations may still be in the TLB) is not recorded, and nothing is written;
    /// once synced it is.
    #[test]
    fn a_preserved_domain_with_an_unsynced_deferred_unmap_is_not_prepared() {
        let frames = frames();
        let mut region = Region::new();
        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let options = Stage1Options {
            input_bits: 39,
            el2: false,
        };
        let d = smmu.create_stage1(pool.take_arena().unwrap(), options).unwrap();
        smmu.map(d, 0x1000, 0x8000_0000, 0x2000, RW).unwrap();
        smmu.attach(d, 0x10).unwrap();
        smmu.preserve(d, 9).unwrap();
        let mut gather = crate::pgtable::Gather::default();
        smmu.unmap_deferred(d, 0x1000, 0x1000, &mut gather).unwrap();
        assert_eq!(
            smmu.prepare_handover(pool, BASE, 1, SURVIVING),
            Err(PrepareError::PendingInvalidation { token: 9 })
        );
        assert!(
            pool.lock_metadata().unwrap()[..8].iter().all(|&b| b == 0),
            "nothing written"
        );
        assert_eq!(smmu.handover_phase(), HandoverPhase::Idle);
        smmu.sync_domain(d, &mut gather).unwrap();
        assert!(smmu.prepare_handover(pool, BASE, 1, SURVIVING).is_ok());
    }

    #[test]
    fn a_prepared_domain_is_unpreserved_only_after_the_hand_off_is_cancelled() {
        let frames = frames();
        let mut region = Region::new();
        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let d = arena_stage1(&mut smmu, pool);
        smmu.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
        let parent = smmu
            .create_stage2(pool.take_arena().unwrap(), Stage2Options { input_bits: 40 })
            .unwrap();
        let guest = crate::domain::GuestStage1 {
            cd_table: 0x4800_0000,
            cd_max_log2: 0,
            layout: CdTableLayout::Linear,
            default_substream: DefaultSubstream::Terminate,
        };
        let nested = smmu.create_nested(parent, guest).unwrap();
        smmu.preserve(d, 9).unwrap();
        smmu.preserve(parent, 10).unwrap();
        smmu.preserve(nested, 11).unwrap();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        // The region records them: unpreserving now would leave a record of a domain that may be freed (and its
        // arena sealed for good). Refused, nothing changed.
        for token in [9, 11] {
            assert_eq!(smmu.unpreserve(token), Err(DomainError::HandoverPrepared { token }));
        }
        assert_eq!((smmu.preserved(9), smmu.preserved(11)), (Some(d), Some(nested)));
        assert!(matches!(smmu.free_domain(d), Err(DomainError::Preserved { .. })));
        // Cancelled: unpreserve works, and the domain's memory hands out tables again.
        smmu.cancel_handover(pool, BASE).unwrap();
        assert_eq!(smmu.unpreserve(9), Ok(d));
        assert_eq!(smmu.unpreserve(11), Ok(nested));
        smmu.map(d, 0x4000_0000, 0x8000_2000, 0x1000, RW).unwrap();
        smmu.free_domain(d).unwrap();
        // Prepared again, the other way round: preserve, prepare, cancel, unpreserve, prepare records nothing of it.
        smmu.preserve(nested, 11).unwrap();
        smmu.prepare_handover(pool, BASE, 2, SURVIVING).unwrap();
        smmu.cancel_handover(pool, BASE).unwrap();
        smmu.unpreserve(11).unwrap();
        smmu.unpreserve(10).unwrap();
        smmu.map(parent, 0x4000_0000, 0x8000_2000, 0x1000, RW).unwrap();
    }

    #[test]
    fn prepare_cleans_the_smmus_own_arena_for_a_hand_off_with_the_smmu_running() {
        use crate::handover::pool::HandoverArena;
        use crate::mem::{Maintenance, maintenance_log};
        let frames = frames();
        let mut region = Region::new();
        let model = Model::start(frames);
        let pool = region.pool();
        *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
        let core = pool.take_arena().unwrap();
        // A coherent SMMU: nothing was cleaned as it was written, so only prepare can put it in memory.
        let mut smmu: ActiveSmmu<&'static HandoverArena> = model.smmu().init(core, &InitOptions::default()).unwrap();
        assert!(smmu.features().coherent);
        let d = smmu
            .create_stage1(pool.take_arena().unwrap(), Stage1Options::default())
            .unwrap();
        smmu.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.attach(d, 0x10).unwrap();
        smmu.preserve(d, 0x77).unwrap();
        let identity = smmu.handover_identity(BASE);
        assert!(
            identity.core_len > 0,
            "the stream table is in the pool: the next image adopts it"
        );
        maintenance_log::take();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        let log = maintenance_log::take();
        let virt = region.memory.as_ptr() as usize + (identity.strtab_base - region.extent.base) as usize;
        assert!(
            maintenance_log::covers(&log, Maintenance::Clean, virt, identity.core_len as usize),
            "the stream table and its spans, which the next image reads, are cleaned to memory"
        );
        core::mem::forget(smmu);
    }

    #[test]
    fn an_smmu_left_running_with_non_cacheable_walks_is_maintained_by_the_next_image() {
        use crate::handover::pool::HandoverArena;
        use crate::mem::{Maintenance, maintenance_log};
        let frames = frames();
        let mut region = Region::new();
        let model = Model::start(frames);
        let pool = region.pool();
        *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
        // The first image treats the SMMU as non-coherent: CR1 non-cacheable, which cannot change while SMMUEN = 1.
        let mut smmu = model.smmu();
        smmu.apply_board_coherency(false);
        let first: ActiveSmmu<&'static HandoverArena> =
            smmu.init(pool.take_arena().unwrap(), &InitOptions::default()).unwrap();
        first.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        core::mem::forget(first);

        // The next image does not know (IDR0.COHACC = 1, no board override): the running CR1 decides.
        let pool = region.pool();
        let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
        let mut next = model
            .smmu()
            .adopt_running(core, &InitOptions::default(), &running)
            .unwrap();
        assert!(
            !next.features().coherent,
            "the SMMU reads its tables and queues non-cacheable: the CPU must clean what it writes"
        );
        maintenance_log::take();
        next.attach_bypass(0x30).unwrap();
        let log = maintenance_log::take();
        assert!(
            log.iter()
                .any(|&(kind, _, len)| kind == Maintenance::Clean && len == 64),
            "the STE is cleaned before its CFGI_STE: {log:?}"
        );
        core::mem::forget(next);
    }

    /// Rewrites the region's records with `change` applied and the CRC recomputed: a corruption only checks
    /// deeper than the CRC can find.
    fn tamper(pool: &HandoverPool, change: impl FnOnce(&mut InstanceRecords)) {
        let region = pool.metadata_extent().unwrap();
        let pool_extent = pool.pool().unwrap();
        let mut bytes = pool.lock_metadata().unwrap();
        let mut decoded = format::decode(&bytes, pool_extent).unwrap();
        change(&mut decoded.instances[0]);
        format::encode(&decoded.instances, decoded.generation, region, pool_extent, &mut bytes).unwrap();
    }

    /// SMMU_CR0 and SMMU_GBPA as the model holds them.
    fn cr0_and_gbpa(model: &Model) -> (u32, u32) {
        let read = |offset| {
            // SAFETY: the model's live register block.
            unsafe { crate::smmu::tests::reg32(model.base, offset).read_volatile() }
        };
        (read(0x20), read(0x44))
    }

    /// Translation off and every incoming transaction aborting: CR0.SMMUEN = 0 and GBPA.ABORT = 1.
    fn disabled_aborting(model: &Model) -> bool {
        let (cr0, gbpa) = cr0_and_gbpa(model);
        cr0 & 1 == 0 && gbpa & (1 << 20) != 0
    }

    /// Every STE of the span that holds StreamIDs 0..256 aborts (an invalid STE aborts too, with C_BAD_STE).
    fn every_ste_aborts<A: FrameAllocator>(smmu: &ActiveSmmu<A>) -> bool {
        (0..256).all(|sid| matches!(smmu.ste(sid).map(|s| s.config()), Ok(Config::Abort | Config::Invalid)))
    }

    /// A first image that hands off with its SMMU running: its structures in a handover arena, a stage-1 domain
    /// (ASID recorded) in another attached to stream 0x10, stream 0x30 bypassing; preserved as 0x77, prepared,
    /// forgotten. The model keeps running for the next image. Stream 0x30's bypass is written after the prepare
    /// ([`leave_bypassing`]): this driver refuses to prepare a running hand-off with it, but a previous image
    /// need not be this driver, and the next image's containment is what these tests prove.
    fn running_first_image(region: &mut Region, frames: &'static HeapFrames) -> Model {
        use crate::handover::pool::HandoverArena;
        let model = Model::start(frames);
        let pool = region.pool();
        *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
        let core = pool.take_arena().unwrap();
        let mut first: ActiveSmmu<&'static HandoverArena> = model.smmu().init(core, &InitOptions::default()).unwrap();
        let options = Stage1Options {
            input_bits: 39,
            el2: false,
        };
        let d = first.create_stage1(pool.take_arena().unwrap(), options).unwrap();
        first.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
        first.attach(d, 0x10).unwrap();
        first.preserve(d, 0x77).unwrap();
        first.prepare_handover(pool, BASE, 3, SURVIVING).unwrap();
        leave_bypassing(&mut first, 0x30);
        core::mem::forget(first);
        model
    }

    /// A running hand-off the new image declines (finish without a restore): the previous image's streams abort and
    /// everything cached is invalidated before the region is re-armed (which frees the memory they walk), and IDs
    /// can be allocated afterwards.
    #[test]
    fn finishing_an_adopted_smmu_without_a_restore_aborts_what_the_previous_image_left() {
        let frames = frames();
        let mut region = Region::new();
        let model = running_first_image(&mut region, frames);
        let pool = region.pool();
        let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
        let mut next = model
            .smmu()
            .adopt_running(core, &InitOptions::default(), &running)
            .unwrap();
        assert_eq!(next.ste(0x10).unwrap().config(), Config::Stage1);
        let before = model.seen.lock().unwrap().consumed.len();
        next.finish_handover(pool, BASE).unwrap();
        for sid in [0x10, 0x30] {
            assert_eq!(next.ste(sid).unwrap().config(), Config::Abort, "stream {sid:#x}");
        }
        // Each STE to abort (two hitless steps for the translating one), then every cached entry dropped.
        assert_eq!(
            issued_since(&model, before),
            [
                Issued::Ste { sid: 0x10 },
                Issued::Sync,
                Issued::Ste { sid: 0x10 },
                Issued::Sync,
                Issued::Ste { sid: 0x30 },
                Issued::Sync,
                Issued::CfgiAll,
                Issued::NsnhAll,
                Issued::Sync
            ]
        );
        assert!(next.allocate_asid().is_ok(), "the hand-off is settled");
    }

    /// A level-1 stream table descriptor the SMMU would follow but the driver cannot (Span != 0 with L2Ptr = 0:
    /// 256 streams walking STEs at PA 0, which no abort would reach) makes the stream table not adoptable: the SMMU
    /// is left disabled with every transaction aborting.
    #[test]
    fn adopt_running_refuses_a_level1_descriptor_it_would_not_have_written() {
        let frames = frames();
        let mut region = Region::new();
        let model = running_first_image(&mut region, frames);
        let pool = region.pool();
        let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
        // The descriptor of StreamIDs 0x100..0x200, never allocated: Span = SPLIT + 1, L2Ptr = 0.
        let index = ((running.strtab_base - region.extent.base) / 8) as usize + 1;
        assert_eq!(region.memory[index], 0);
        region.memory[index] = u64::from(crate::stream::SPLIT) + 1;
        let error = model
            .smmu()
            .adopt_running(core, &InitOptions::default(), &running)
            .err();
        assert!(
            matches!(error, Some(crate::InitError::StreamTableNotAdoptable { .. })),
            "{error:?}"
        );
        assert!(disabled_aborting(&model), "{:x?}", cr0_and_gbpa(&model));
    }

    #[test]
    fn adopt_running_refuses_another_smmu_and_leaves_it_disabled_with_every_transaction_aborting() {
        let frames = frames();
        let mut region = Region::new();
        let model = running_first_image(&mut region, frames);
        let pool = region.pool();
        let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
        // Another SMMU than the recorded one (its IIDR differs): nothing adopted, translation off, DMA aborting.
        let other = RunningSmmu {
            iidr: running.iidr ^ 0x43b,
            ..running
        };
        let error = model.smmu().adopt_running(core, &InitOptions::default(), &other).err();
        assert_eq!(
            error,
            Some(crate::InitError::IdentityMismatch {
                register: "IIDR",
                recorded: running.iidr ^ 0x43b,
                probed: running.iidr
            })
        );
        assert!(disabled_aborting(&model), "{:x?}", cr0_and_gbpa(&model));
    }

    #[test]
    fn running_smmu_checks_the_id_registers_and_the_stream_table_the_smmu_runs_with() {
        let frames = frames();
        let mut region = Region::new();
        let model = running_first_image(&mut region, frames);
        let write = |offset, value| {
            // SAFETY: the model's live register block.
            unsafe { crate::smmu::tests::reg32(model.base, offset).write_volatile(value) }
        };
        let read = |offset| {
            // SAFETY: as above.
            unsafe { crate::smmu::tests::reg32(model.base, offset).read_volatile() }
        };
        let pool = region.pool();
        // Another implementation behind the same base (IIDR at 0x18): refused before any arena is taken back.
        write(0x18, 0x43b);
        let error = running_smmu(pool, &model.smmu(), BASE).err();
        assert!(
            matches!(
                error,
                Some(RestoreError::Identity(HandoverError::IdentityMismatch {
                    what: "IIDR",
                    recorded: 0,
                    probed: 0x43b
                }))
            ),
            "{error:?}"
        );
        assert!(disabled_aborting(&model), "{:x?}", cr0_and_gbpa(&model));
        assert_eq!(pool.arenas_in_use(), 0, "nothing taken back");
        // The same SMMU, translating again, but walking another stream table than the recorded one.
        write(0x18, 0);
        write(0x20, 0xd);
        let strtab = read(0x80);
        write(0x80, strtab + 0x1000);
        let error = running_smmu(pool, &model.smmu(), BASE).err();
        assert!(
            matches!(
                error,
                Some(RestoreError::Identity(HandoverError::IdentityMismatch {
                    what: "STRTAB_BASE",
                    ..
                }))
            ),
            "{error:?}"
        );
        assert!(disabled_aborting(&model));
        // Another format: STRTAB_BASE_CFG.LOG2SIZE one bit short.
        write(0x80, strtab);
        write(0x20, 0xd);
        let cfg = read(0x88);
        write(0x88, cfg - 1);
        let error = running_smmu(pool, &model.smmu(), BASE).err();
        assert!(
            matches!(
                error,
                Some(RestoreError::Identity(HandoverError::IdentityMismatch {
                    what: "STRTAB_BASE_CFG",
                    ..
                }))
            ),
            "{error:?}"
        );
        assert!(disabled_aborting(&model));
        assert_eq!(pool.arenas_in_use(), 0);
        // As recorded: found, its arena taken back.
        write(0x88, cfg);
        write(0x20, 0xd);
        assert!(running_smmu(pool, &model.smmu(), BASE).unwrap().is_some());
        assert_eq!(pool.arenas_in_use(), 1);
    }

    /// A running hand-off whose restore is refused by a check of the records (the recorded ASID is taken in the new
    /// image): the STEs the previous image left (stream 0x10 translating through the refused domain, 0x30
    /// bypassing) all abort, then everything cached is invalidated, before the restore returns.
    #[test]
    fn a_refused_restore_of_an_adopted_smmu_aborts_every_stream_the_previous_image_left() {
        let frames = frames();
        let mut region = Region::new();
        let model = running_first_image(&mut region, frames);
        let pool = region.pool();
        let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
        let mut next = model
            .smmu()
            .adopt_running(core, &InitOptions::default(), &running)
            .unwrap();
        assert_eq!(next.ste(0x10).map(|s| s.config()), Ok(Config::Stage1));
        let recorded = {
            let bytes = pool.lock_metadata().unwrap();
            format::decode(&bytes, pool.pool().unwrap()).unwrap().instances[0].records[0].asid
        };
        // Nothing is allocated until the hand-off is settled; a claim (as another restore's) takes the recorded
        // ASID.
        assert_eq!(next.allocate_asid(), Err(IdError::HandOffUnsettled));
        next.core.claim_asid(recorded).unwrap();
        let before = model.seen.lock().unwrap().commands.len();
        let error = next.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
        assert!(
            matches!(error, RestoreError::BeyondLimits { token: 0x77, what, .. } if what.contains("ASID")),
            "{error}"
        );
        assert!(every_ste_aborts(&next), "every stream aborts");
        let issued = issued_since(&model, before);
        let (steps, invalidation) = issued.split_at(issued.len() - 3);
        assert_eq!(
            invalidation,
            [Issued::CfgiAll, Issued::NsnhAll, Issued::Sync],
            "{issued:?}"
        );
        let (first, second) = steps.split_at(steps.iter().position(|i| *i == Issued::Ste { sid: 0x30 }).unwrap());
        assert_ste_steps(first, 0x10);
        assert_ste_steps(second, 0x30);
        assert!(
            next.is_enabled(),
            "the aborts completed: translation stays on for this image's own streams"
        );
        assert_eq!(pool.arenas_in_use(), 1, "only the SMMU's own arena is taken");
        core::mem::forget(next);
    }

    /// A running hand-off whose restore rebuilt its record but cannot make the previous image's other stream abort
    /// (CFGI_STE refused): the restore is refused as a whole, through the refusal's one exit: the rebuilt domain is
    /// forgotten, its arena back only once translation is off with every transaction aborting.
    #[test]
    fn a_restore_that_cannot_abort_the_previous_images_other_streams_is_refused_whole() {
        use crate::hw::command::opcode;
        use std::sync::atomic::Ordering;
        let frames = frames();
        let mut region = Region::new();
        let model = running_first_image(&mut region, frames);
        let pool = region.pool();
        let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
        let mut next = model
            .smmu()
            .adopt_running(core, &InitOptions::default(), &running)
            .unwrap();
        model.refuse.store(opcode::CFGI_STE, Ordering::SeqCst);
        let error = next.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
        model.refuse.store(0, Ordering::SeqCst);
        assert!(
            matches!(error, RestoreError::UnrestoredStreams(AttachError::Invalidation(_))),
            "{error}"
        );
        assert_eq!(next.retrieve(0x77), Err(DomainError::UnknownToken(0x77)));
        assert_eq!(next.handover_phase(), HandoverPhase::Idle);
        assert!(disabled_aborting(&model), "{:x?}", cr0_and_gbpa(&model));
        assert_eq!(pool.arenas_in_use(), 1, "only the SMMU's own arena");
        core::mem::forget(next);
    }

    /// A token names one domain: a restore whose record reuses the token of a parent an earlier hand-off left
    /// waiting (for its live nested domain) is refused before anything changes, and the parent stays.
    #[test]
    fn a_restore_never_reuses_the_token_of_a_domain_an_earlier_hand_off_left_waiting() {
        let frames = frames();
        let mut region = Region::new();
        first_image(&mut region, frames);
        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
        smmu.retrieve(0x53).unwrap();
        smmu.finish_handover(pool, BASE).unwrap();
        assert!(smmu.domains.restored.contains_key(&0x52), "kept for its nested domain");
        // Another region whose one record (a stage-1 domain on a free stream, with a free ASID) reuses 0x52.
        let mut other = Region::new();
        {
            let model = Model::start(frames);
            let mut first = boot(&model, frames);
            let pool = other.pool();
            let d = arena_stage1(&mut first, pool);
            first.attach(d, 0x40).unwrap();
            first.preserve(d, 0x52).unwrap();
            first.prepare_handover(pool, BASE, 9, SURVIVING).unwrap();
            core::mem::forget(first);
        }
        let error = smmu.restore_handover(other.pool(), BASE, &ANYWHERE).unwrap_err();
        assert!(
            matches!(error, RestoreError::BeyondLimits { token: 0x52, what, .. } if what.contains("token")),
            "{error}"
        );
        assert_eq!(smmu.ste(0x40).map(|s| s.config()), Ok(Config::Abort));
        assert_eq!(smmu.ste(0x18).map(|s| s.config()), Ok(Config::Nested));
        let parent = smmu.retrieve(0x52).unwrap();
        assert_eq!(smmu.domain_kind(parent), Ok(crate::DomainKind::Stage2));
        core::mem::forget(smmu);
    }

    /// The record's page table, rewritten so that only a walk finds it broken (its table count cleared, so the
    /// rebuild walks it; a table descriptor pointing outside the domain's arena): the rebuild fails after it took
    /// the domain's arena back.
    fn break_the_recorded_table(region: &mut Region, pool: &HandoverPool) {
        let mut root = 0;
        tamper(pool, |instance| {
            let table = instance.records[0].table.as_mut().unwrap();
            root = table.root;
            (table.tables, table.empty) = (0, 0);
        });
        // IOVA 0x1000: entry 0 of the level-1 root, a table descriptor.
        let index = ((root - region.extent.base) / 8) as usize;
        assert_eq!(region.memory[index] & 0b11, 0b11);
        region.memory[index] = 0x1_0000_0000 | 0b11;
    }

    /// A running hand-off whose rebuild fails after it took an arena back: the previous image's STEs (one of which
    /// walks that arena) abort and CFGI_ALL + CMD_SYNC complete while the arena is still taken; it goes back to the
    /// pool only then.
    #[test]
    fn a_refused_rebuild_gives_its_arenas_back_only_after_every_stream_aborts_and_cfgi_all() {
        let frames = frames();
        let mut region = Region::new();
        let model = running_first_image(&mut region, frames);
        let pool = region.pool();
        break_the_recorded_table(&mut region, pool);
        let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
        let mut next = model
            .smmu()
            .adopt_running(core, &InitOptions::default(), &running)
            .unwrap();
        *model.probe.lock().unwrap() = Some(Box::new(move || pool.arenas_in_use()));
        let before = model.seen.lock().unwrap().commands.len();
        // Trusting the recorded tables, so that the broken one is found by the rebuild (after its arena was taken),
        // not by verification before it.
        let trusted = RestoreOptions {
            verify: super::super::verify::Verification::TrustRecordedTables,
            ..ANYWHERE
        };
        let error = next.restore_handover(pool, BASE, &trusted).unwrap_err();
        assert!(
            matches!(
                error,
                RestoreError::Rebuild {
                    token: 0x77,
                    what: RebuildFailure::Table(MapError::NotAdoptable(_))
                }
            ),
            "{error}"
        );
        assert!(every_ste_aborts(&next));
        let issued = issued_since(&model, before);
        let probed = model.seen.lock().unwrap().probed[before..].to_vec();
        assert_eq!(
            issued[issued.len() - 3..],
            [Issued::CfgiAll, Issued::NsnhAll, Issued::Sync],
            "{issued:?}"
        );
        assert!(issued.contains(&Issued::Ste { sid: 0x10 }), "{issued:?}");
        assert!(
            probed.iter().all(|&p| p == Some(2)),
            "the SMMU's arena and the domain's stay taken until the last CMD_SYNC: {probed:?}"
        );
        assert_eq!(pool.arenas_in_use(), 1, "the domain's arena is back afterwards");
        core::mem::forget(next);
    }

    /// The same with the command queue refusing every CFGI_STE: the streams cannot be aborted one by one, so the
    /// refusal turns translation off with every incoming transaction aborting (GBPA.ABORT = 1), and says so through
    /// `is_enabled`.
    #[test]
    fn a_refused_restore_whose_aborts_fail_turns_the_smmu_off_with_gbpa_abort() {
        let frames = frames();
        let mut region = Region::new();
        let model = running_first_image(&mut region, frames);
        let pool = region.pool();
        break_the_recorded_table(&mut region, pool);
        let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
        let mut next = model
            .smmu()
            .adopt_running(core, &InitOptions::default(), &running)
            .unwrap();
        model.refuse.store(
            crate::hw::command::opcode::CFGI_STE,
            std::sync::atomic::Ordering::SeqCst,
        );
        assert!(next.restore_handover(pool, BASE, &ANYWHERE).is_err());
        assert!(!next.is_enabled());
        assert!(disabled_aborting(&model), "{:x?}", cr0_and_gbpa(&model));
        assert_eq!(
            pool.arenas_in_use(),
            1,
            "the domain's arena is back only because translation is off"
        );
        core::mem::forget(next);
    }

    /// After a warm reset, a rebuild that fails after it took an arena back (a substream's CD invalidation
    /// refused): CFGI_ALL + CMD_SYNC complete while the arena is taken, and it goes back only then.
    #[test]
    fn after_a_warm_reset_a_refused_rebuild_invalidates_everything_before_its_arena_goes_back() {
        let idr1 = crate::smmu::tests::IDRS[1].1 | 5 << 6;
        let idr0 = crate::smmu::tests::IDRS[0].1;
        let frames = frames();
        let mut region = Region::new();
        {
            let model = Model::start_with_idrs(frames, idr0, idr1);
            let mut smmu = boot(&model, frames);
            let pool = region.pool();
            let whole = smmu
                .create_stage1(pool.take_arena().unwrap(), Stage1Options::default())
                .unwrap();
            let dropped = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
            smmu.attach(whole, 0x10).unwrap();
            smmu.attach_substream(dropped, 0x10, 3).unwrap();
            smmu.preserve(whole, 0x61).unwrap();
            smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
            core::mem::forget(smmu);
        }
        let model = Model::start_with_idrs(frames, idr0, idr1);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        *model.probe.lock().unwrap() = Some(Box::new(move || pool.arenas_in_use()));
        model
            .refuse
            .store(crate::hw::command::opcode::CFGI_CD, std::sync::atomic::Ordering::SeqCst);
        let before = model.seen.lock().unwrap().commands.len();
        let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
        assert!(
            matches!(
                error,
                RestoreError::Rebuild {
                    token: 0x61,
                    what: RebuildFailure::CdTable(_)
                }
            ),
            "{error}"
        );
        let issued = issued_since(&model, before);
        let probed = model.seen.lock().unwrap().probed[before..].to_vec();
        let n = issued.len();
        assert_eq!(
            issued[n - 3..],
            [Issued::CfgiAll, Issued::NsnhAll, Issued::Sync],
            "{issued:?}"
        );
        assert_eq!(
            probed[n - 3..],
            [Some(1); 3],
            "the arena is taken until the last CMD_SYNC"
        );
        assert_eq!(pool.arenas_in_use(), 0);
        assert!(every_ste_aborts(&smmu));
        assert!(smmu.retrieve(0x61).is_err());
    }

    /// The live-update lifecycle (the table in `crate::handover`): every transition it forbids is a typed error
    /// that changes nothing.
    #[test]
    fn every_forbidden_handover_transition_is_a_typed_error_that_changes_nothing() {
        let frames = frames();
        let mut region = Region::new();
        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let d = arena_stage1(&mut smmu, pool);
        smmu.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.attach(d, 0x10).unwrap();
        let late = arena_stage1(&mut smmu, pool);
        assert_eq!(smmu.handover_phase(), HandoverPhase::Idle);
        // Idle: nothing to cancel (the region may hold a previous image's records, still to restore).
        assert_eq!(smmu.cancel_handover(pool, BASE), Err(PrepareError::NotPrepared));
        smmu.preserve(d, 0x51).unwrap();
        smmu.prepare_handover(pool, BASE, 5, SURVIVING).unwrap();
        assert_eq!(smmu.handover_phase(), HandoverPhase::Prepared { generation: 5 });
        // Prepared: a domain preserved now would not be in the records, and vanish in the next image.
        assert_eq!(
            smmu.preserve(late, 0x52),
            Err(DomainError::HandoverPrepared { token: 0x52 })
        );
        assert_eq!((smmu.preserved(0x52), smmu.token_of(late)), (None, Ok(None)));
        assert_eq!(
            smmu.unpreserve(0x51),
            Err(DomainError::HandoverPrepared { token: 0x51 })
        );
        assert_eq!(
            smmu.restore_handover(pool, BASE, &ANYWHERE).err(),
            Some(RestoreError::HandoverPrepared { generation: 5 })
        );
        assert_eq!(
            smmu.finish_handover(pool, BASE),
            Err(FinishError::HandoverPrepared { generation: 5 })
        );
        assert_eq!(smmu.handover_phase(), HandoverPhase::Prepared { generation: 5 });
        let snapshot: std::vec::Vec<u8> = (0..4096).map(|i| *region.byte(i)).collect();
        // Cancelled and prepared again: the region records what is preserved now.
        smmu.cancel_handover(pool, BASE).unwrap();
        smmu.preserve(late, 0x52).unwrap();
        smmu.unpreserve(0x52).unwrap();
        smmu.prepare_handover(pool, BASE, 5, SURVIVING).unwrap();
        let again: std::vec::Vec<u8> = (0..4096).map(|i| *region.byte(i)).collect();
        assert_eq!(again, snapshot, "the refused calls changed nothing the records say");
        core::mem::forget(smmu);
        drop(model);

        // The next image.
        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        assert_eq!(smmu.restore_handover(pool, BASE, &ANYWHERE).map(|r| r.domains), Ok(1));
        assert_eq!(smmu.handover_phase(), HandoverPhase::Restored { generation: 5 });
        let mine = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
        // Restored: no second restore, no prepare before finish, no cancel, no token a waiting domain holds.
        assert_eq!(
            smmu.restore_handover(pool, BASE, &ANYWHERE).err(),
            Some(RestoreError::AlreadyRestored { generation: 5 })
        );
        assert_eq!(
            smmu.prepare_handover(pool, BASE, 6, SURVIVING),
            Err(PrepareError::RestoreNotFinished { generation: 5 })
        );
        assert_eq!(smmu.cancel_handover(pool, BASE), Err(PrepareError::NotPrepared));
        let waiting = *smmu.domains.restored.get(&0x51).unwrap();
        assert_eq!(
            smmu.preserve(mine, 0x51),
            Err(DomainError::TokenInUse {
                token: 0x51,
                domain: waiting
            })
        );
        assert_eq!(smmu.token_of(mine), Ok(None));
        // Retrieved and freed: the record can never bring it back.
        let d = smmu.retrieve(0x51).unwrap();
        smmu.detach(0x10).unwrap();
        smmu.free_domain(d).unwrap();
        assert_eq!(
            smmu.restore_handover(pool, BASE, &ANYWHERE).err(),
            Some(RestoreError::AlreadyRestored { generation: 5 })
        );
        assert_eq!(pool.arenas_in_use(), 0, "nothing taken back again");
        assert_ne!(smmu.ste(0x10).map(|s| s.config()), Ok(Config::Stage1));
        // Not even another driver over the same region (a second image, or this one reset before finishing): the
        // restore consumed the records.
        let model2 = Model::start(frames);
        let mut other = boot(&model2, frames);
        assert_eq!(other.restore_handover(pool, BASE, &ANYWHERE).map(|r| r.domains), Ok(0));
        assert_eq!(other.handover_phase(), HandoverPhase::Idle);
        assert_eq!(smmu.finish_handover(pool, BASE), Ok(FinishReport { unclaimed: 0 }));
        assert_eq!(smmu.handover_phase(), HandoverPhase::Idle);
        assert_eq!(smmu.restore_handover(pool, BASE, &ANYWHERE).map(|r| r.domains), Ok(0));
        smmu.free_domain(mine).unwrap();
    }

    /// A finish that fails half way (the invalidation of the second unclaimed domain refused) keeps that domain
    /// waiting and the hand-off restored (no second restore); finishing again frees it; a reset at any point
    /// restores nothing again.
    #[test]
    fn a_finish_that_fails_half_way_stays_restored_until_finished_again() {
        let frames = frames();
        let mut region = Region::new();
        {
            let model = Model::start(frames);
            let mut smmu = boot(&model, frames);
            let pool = region.pool();
            let s1 = arena_stage1(&mut smmu, pool);
            smmu.attach(s1, 0x10).unwrap();
            let s2 = smmu
                .create_stage2(pool.take_arena().unwrap(), Stage2Options { input_bits: 40 })
                .unwrap();
            smmu.attach(s2, 0x20).unwrap();
            smmu.preserve(s1, 0x51).unwrap();
            smmu.preserve(s2, 0x52).unwrap();
            smmu.prepare_handover(pool, BASE, 8, SURVIVING).unwrap();
            core::mem::forget(smmu);
        }
        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        assert_eq!(smmu.restore_handover(pool, BASE, &ANYWHERE).map(|r| r.domains), Ok(2));
        // The stage-2 domain's VMID invalidation is refused: the stage-1 one is freed, the stage-2 one waits.
        model.refuse.store(
            crate::hw::command::opcode::TLBI_S12_VMALL,
            std::sync::atomic::Ordering::SeqCst,
        );
        assert!(matches!(smmu.finish_handover(pool, BASE), Err(FinishError::Domain(_))));
        assert_eq!(smmu.handover_phase(), HandoverPhase::Restored { generation: 8 });
        assert!(smmu.domains.restored.contains_key(&0x52) && !smmu.domains.restored.contains_key(&0x51));
        assert_eq!(
            smmu.restore_handover(pool, BASE, &ANYWHERE).err(),
            Some(RestoreError::AlreadyRestored { generation: 8 })
        );
        assert_eq!(pool.arenas_in_use(), 1, "the freed domain's arena is not taken back");
        // A reset now: the next image finds nothing to restore.
        let model2 = Model::start(frames);
        let mut other = boot(&model2, frames);
        assert_eq!(
            other
                .restore_handover(region.pool(), BASE, &ANYWHERE)
                .map(|r| r.domains),
            Ok(0)
        );
        // The queue works again: finishing frees what waits.
        model.refuse.store(0, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(smmu.finish_handover(pool, BASE), Ok(FinishReport { unclaimed: 1 }));
        assert_eq!(smmu.handover_phase(), HandoverPhase::Idle);
        assert_eq!(pool.arenas_in_use(), 0);
    }

    /// While a hand-off is prepared, the SMMU's own arena (it holds the stream table the next image adopts) is
    /// sealed: a domain created with it is refused as such, not as the allocation failure it would become.
    #[test]
    fn a_domain_cannot_be_created_with_memory_a_prepared_hand_off_sealed() {
        use crate::handover::pool::HandoverArena;
        let frames = frames();
        let mut region = Region::new();
        let model = Model::start(frames);
        let pool = region.pool();
        *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
        let core = pool.take_arena().unwrap();
        let mut smmu: ActiveSmmu<&'static HandoverArena> = model.smmu().init(core, &InitOptions::default()).unwrap();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        assert_eq!(
            smmu.create_stage1(core, Stage1Options::default()),
            Err(DomainError::MemorySealed)
        );
        assert_eq!(smmu.domains.free_slots(), crate::domain::DEFAULT_DOMAINS);
        smmu.cancel_handover(pool, BASE).unwrap();
        core::mem::forget(smmu);
    }

    /// The ASID of a stage-1 domain.
    fn stage1_asid<A: FrameAllocator>(smmu: &ActiveSmmu<A>, d: DomainId) -> u16 {
        match smmu.domains.get(d).unwrap().translation {
            Translation::Stage1 { asid, .. } => asid,
            _ => unreachable!(),
        }
    }

    /// Review finding 4. A hand-off with the SMMU running, through the whole documented lifecycle
    /// (`running_smmu`, `adopt_running`, `restore_handover`, `retrieve`, `finish_handover`): the previous image's
    /// stream that no record names (0x20, a domain that was not preserved) keeps its live stage-1 STE, whose CD
    /// uses an ASID this image's allocator considers free. The next domain this image creates gets that ASID
    /// and is attached elsewhere: both streams then translate under the same (VMID 0, ASID) tag, so each may hit
    /// the other's TLB entries (the old device reaching the new domain's memory, the new device the old
    /// domain's). Nothing but a call the docs ask for (`abort_unrestored_streams`) prevents it.
    #[test]
    fn finding4_after_a_running_hand_off_no_new_domain_shares_an_asid_with_a_stream_the_previous_image_left() {
        use crate::handover::pool::HandoverArena;
        let frames = frames();
        let mut region = Region::new();
        let model = Model::start(frames);
        let pool = region.pool();
        *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
        let core = pool.take_arena().unwrap();
        let mut first: ActiveSmmu<&'static HandoverArena> = model.smmu().init(core, &InitOptions::default()).unwrap();
        let options = Stage1Options {
            input_bits: 39,
            el2: false,
        };
        let kept = first.create_stage1(pool.take_arena().unwrap(), options).unwrap();
        first.map(kept, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
        first.attach(kept, 0x10).unwrap();
        // Not preserved: its tables in ordinary memory, its stream live at the hand-off. This driver refuses to
        // prepare a running hand-off with such a stream (`PrepareError::UnpreservedStream`), so it is attached
        // after the prepare, as a previous image that is not this driver may leave it.
        let left = first.create_stage1(frames, options).unwrap();
        first.map(left, 0x1000, 0x9000_0000, 0x1000, RW).unwrap();
        let left_asid = stage1_asid(&first, left);
        first.preserve(kept, 0x77).unwrap();
        first.prepare_handover(pool, BASE, 3, SURVIVING).unwrap();
        assert_eq!(
            first.attach(left, 0x20),
            Err(DomainError::StreamsFrozen { generation: 3 })
        );
        as_another_driver(&mut first, |first| first.attach(left, 0x20)).unwrap();
        core::mem::forget(first);

        let pool = region.pool();
        let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
        let mut next = model
            .smmu()
            .adopt_running(core, &InitOptions::default(), &running)
            .unwrap();
        next.restore_handover(pool, BASE, &ANYWHERE).unwrap();
        let d = next.retrieve(0x77).unwrap();
        next.finish_handover(pool, BASE).unwrap();
        assert_eq!(next.handover_phase(), HandoverPhase::Idle);
        assert_eq!(next.iova_to_phys(d, 0x1000), Ok(Some(0x8000_0000)));
        // The hand-off is over. A new domain on another stream.
        let fresh = next.create_stage1(frames, options).unwrap();
        next.map(fresh, 0x1000, 0xa000_0000, 0x1000, RW).unwrap();
        next.attach(fresh, 0x40).unwrap();
        let fresh_asid = stage1_asid(&next, fresh);
        let inherited_live = next.ste(0x20).map(|s| s.config()) == Ok(Config::Stage1);
        assert!(
            !(inherited_live && fresh_asid == left_asid),
            "stream 0x20 (the previous image's, unrestored) still translates with ASID {left_asid}, which the new \
             domain on stream 0x40 was given"
        );
        core::mem::forget(next);
    }

    /// Review finding 5 (issue #21 item 2, "a stream's substreams all use its regime", against a region whose CRC
    /// is valid). `prepare_handover` records a substream only in the record of the domain that holds the whole
    /// stream (`RecordError::SubstreamOfAnotherDomain`), but the restore only checks that *some* record holds
    /// it. So records in which an EL2 stage-1 domain holds substream 3 of a stream whose whole-stream record is
    /// an NS-EL1 domain are accepted: the STE keeps STRW = NS-EL1, the EL2 domain is booked on that substream, and
    /// whatever it translates there is cached as NS-EL1 entries while every invalidation of the EL2 domain (its
    /// unmaps, its free) is TLBI_EL2_*, which misses them. The restore must refuse such records.
    #[test]
    fn finding5_a_restore_refuses_a_substream_of_a_stream_another_record_holds() {
        // IDR0.HYP (EL2 contexts) and SSIDSIZE 5.
        let (idr0, idr1) = (
            crate::smmu::tests::IDRS[0].1 | 1 << 9,
            crate::smmu::tests::IDRS[1].1 | 5 << 6,
        );
        let frames = frames();
        let mut region = Region::new();
        {
            let model = Model::start_with_idrs(frames, idr0, idr1);
            let mut smmu = boot(&model, frames);
            let pool = region.pool();
            let whole = arena_stage1(&mut smmu, pool);
            let el2 = smmu
                .create_stage1(
                    pool.take_arena().unwrap(),
                    Stage1Options {
                        input_bits: 39,
                        el2: true,
                    },
                )
                .unwrap();
            smmu.map(el2, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
            smmu.attach(whole, 0x10).unwrap();
            smmu.attach(el2, 0x11).unwrap();
            smmu.preserve(whole, 0x61).unwrap();
            smmu.preserve(el2, 0x62).unwrap();
            smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
            core::mem::forget(smmu);
        }
        // A region with a valid CRC in which the EL2 domain holds substream 3 of the NS-EL1 domain's stream.
        tamper(region.pool(), |instance| {
            let record = instance.records.iter_mut().find(|r| r.token == 0x62).unwrap();
            assert_eq!(record.kind, RecordKind::Stage1El2);
            let stream = &mut record.streams[0];
            (stream.sid, stream.ssid) = (0x10, 3);
        });
        let model = Model::start_with_idrs(frames, idr0, idr1);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let restored = smmu.restore_handover(pool, BASE, &ANYWHERE);
        if restored.is_ok() {
            let strw = smmu.ste(0x10).unwrap().0[1] >> 30 & 0b11;
            let d = smmu.retrieve(0x62).unwrap();
            let attachments = smmu.attachments(d).unwrap().to_vec();
            let before = model.seen.lock().unwrap().commands.len();
            smmu.unmap(d, 0x1000, 0x1000).unwrap();
            let issued = issued_since(&model, before);
            core::mem::forget(smmu);
            panic!(
                "restored the EL2 domain on {attachments:x?}, a substream of stream 0x10 whose STE has STRW \
                 {strw:#b} (NS-EL1); its unmap invalidates only {issued:x?}"
            );
        }
        core::mem::forget(smmu);
    }

    /// Review finding 6 (issue #21 item 2: "an EL2 entry left cached when another EL2 domain attaches"). When an
    /// EL2 domain's last detach cannot drop its entries (TLBI_EL2_ALL fails), `el2_stale` makes the next EL2
    /// attach issue TLBI_EL2_ALL first. A restore that installs a record's EL2 stream does not: the restored EL2
    /// domain's stream starts translating while the previous EL2 domain's entries, which match every EL2 context,
    /// may still be cached, so its DMA can use them and reach the other domain's memory.
    #[test]
    fn finding6_a_restored_el2_stream_is_installed_only_after_stale_el2_entries_are_dropped() {
        let frames = frames();
        let mut region = Region::new();
        el2_first_image(&mut region, frames, false);
        let model = el2_model(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        // This image's EL2 domain, on another ASID than the record's, attached, then detached while TLBI_EL2_ALL
        // is refused: its EL2 entries may stay cached.
        let spare = smmu.allocate_asid().unwrap();
        let mine = smmu.create_stage1(frames, EL2).unwrap();
        smmu.free_asid(spare).unwrap();
        smmu.map(mine, 0x1000, 0x9000_0000, 0x1000, RW).unwrap();
        smmu.attach(mine, 0x11).unwrap();
        model.refuse.store(
            crate::hw::command::opcode::TLBI_EL2_ALL,
            std::sync::atomic::Ordering::SeqCst,
        );
        assert!(smmu.detach(0x11).is_err());
        model.refuse.store(0, std::sync::atomic::Ordering::SeqCst);
        assert!(smmu.domains.el2_stale, "the EL2 entries of {mine} may still be cached");
        let before = model.seen.lock().unwrap().commands.len();
        smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
        let issued = issued_since(&model, before);
        let installed = issued.iter().position(|i| *i == Issued::Ste { sid: 0x10 }).unwrap();
        assert!(
            issued[..installed].contains(&Issued::El2All),
            "the restored EL2 stream 0x10 was installed with the stale EL2 entries still cached: {issued:?}"
        );
        core::mem::forget(smmu);
    }

    /// Review finding 7. `finish_handover` keeps a restored stage-2 parent whose nested domain was retrieved (the
    /// live nested domain translates through it), waiting in `restored` after the phase is back to `Idle`. A
    /// later restore that is refused (here a pool that is not set up; a corrupt region does the same) goes through
    /// `contain_refused_restore`, which forgets *every* domain in `restored`, this earlier hand-off's parent
    /// included, and gives back its VMID, while the retrieved nested domain's STE still translates with that VMID
    /// and that parent's stage-2 table. The next stage-2 domain may get the VMID (shared TLB entries), and the
    /// nested domain can no longer be freed (its parent is stale).
    #[test]
    fn finding7_a_refused_restore_never_takes_away_a_parent_an_earlier_hand_off_left_to_a_live_nested_domain() {
        let frames = frames();
        let mut region = Region::new();
        first_image(&mut region, frames);
        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
        let nested = smmu.retrieve(0x53).unwrap();
        smmu.finish_handover(pool, BASE).unwrap();
        assert_eq!(smmu.handover_phase(), HandoverPhase::Idle);
        assert!(
            smmu.domains.restored.contains_key(&0x52),
            "the parent stays for its nested domain"
        );
        let ste = smmu.ste(0x18).unwrap();
        assert_eq!(ste.config(), Config::Nested);
        let vmid = ste.vmid();
        assert!(smmu.core.vmid_taken(vmid));
        // A restore refused for a reason that has nothing to do with that parent.
        let unset: &'static HandoverPool = Box::leak(Box::new(HandoverPool::new()));
        assert!(matches!(
            smmu.restore_handover(unset, BASE, &ANYWHERE),
            Err(RestoreError::Pool(_))
        ));
        let still_nested = smmu.ste(0x18).map(|s| s.config()) == Ok(Config::Nested);
        assert!(
            !still_nested || (smmu.core.vmid_taken(vmid) && smmu.retrieve(0x52).is_ok()),
            "stream 0x18 still translates nested with VMID {vmid}, whose parent was forgotten (VMID free again: {})",
            !smmu.core.vmid_taken(vmid)
        );
        let _ = nested;
        core::mem::forget(smmu);
    }

    /// Review finding 9. An SMMU whose own structures (stream table, its level-2 spans, the queues, and the
    /// driver's own array of span pointers) come from a handover arena (as for a hand-off with the SMMU running)
    /// does not claim that arena, so a domain can be created with it (only a prepared hand-off refuses that, as
    /// `MemorySealed`). Freeing that domain retires the arena: the pool takes it back and hands it out again,
    /// zeroed, while the SMMU is still translating through the stream table in it. (Letting the next domain map
    /// in the reused arena aborts this test binary: the driver's span-pointer array is overwritten by page-table
    /// descriptors and `EntryTable::entry` builds a slice from one, table.rs:209; a descriptor written over a live
    /// STE is read by the SMMU as that STE.)
    #[test]
    fn finding9_a_domain_never_frees_the_arena_that_holds_the_smmus_own_stream_table() {
        use crate::handover::pool::HandoverArena;
        let frames = frames();
        let mut region = Region::new();
        let model = Model::start(frames);
        let pool = region.pool();
        *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
        let core = pool.take_arena().unwrap();
        let mut smmu: ActiveSmmu<&'static HandoverArena> = model.smmu().init(core, &InitOptions::default()).unwrap();
        let strtab = smmu.configuration().stream_table_base;
        let other = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
        smmu.attach(other, 0x10).unwrap();
        assert_eq!(smmu.ste(0x10).map(|s| s.config()), Ok(Config::Stage1));
        assert_eq!(pool.arenas_in_use(), 1, "the SMMU's own arena");
        if let Ok(d) = smmu.create_stage1(core, Stage1Options::default()) {
            smmu.map(d, 0, 0x8000_0000, 0x1000, RW).unwrap();
            smmu.free_domain(d).unwrap();
        }
        assert_eq!(
            pool.arenas_in_use(),
            1,
            "the arena holding the live stream table at {strtab:#x} went back to the pool, to be handed out again zeroed"
        );
        core::mem::forget(smmu);
    }

    /// Review 2: a running stream table whose level-1 descriptor for StreamIDs 0x100..0x200 is a copy of the one
    /// for 0x0..0x100 (both name the span of the restored stream 0x10: each exactly the descriptor the driver
    /// writes for that span, so `StreamTable::adopt` takes it). Adopted and restored, StreamIDs 0x10 and 0x110
    /// share one STE: whatever this image installs for one is what the other translates with, so attaching a
    /// domain to 0x110 (another device, another owner) redirects the restored domain's device 0x10 to it.
    #[test]
    fn review_a_running_stream_table_whose_level1_descriptors_share_a_span_is_not_adopted() {
        let frames = frames();
        let mut region = Region::new();
        let model = running_first_image(&mut region, frames);
        let pool = region.pool();
        let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
        let index = ((running.strtab_base - region.extent.base) / 8) as usize;
        assert_ne!(region.memory[index], 0, "the span of 0x0..0x100 exists");
        assert_eq!(region.memory[index + 1], 0);
        region.memory[index + 1] = region.memory[index];
        let adopted = model.smmu().adopt_running(core, &InitOptions::default(), &running);
        let refused = adopted.as_ref().err().copied();
        if let Ok(mut next) = adopted {
            if next.restore_handover(pool, BASE, &ANYWHERE).is_err() {
                core::mem::forget(next);
                return;
            }
            let restored = next.ste(0x10).unwrap().config();
            let d = next.retrieve(0x77).unwrap();
            assert_eq!(next.iova_to_phys(d, 0x1000), Ok(Some(0x8000_0000)));
            // Another domain, for another device.
            let other = next.create_stage2(frames, Stage2Options { input_bits: 40 }).unwrap();
            next.attach(other, 0x110).unwrap();
            let (ste_10, ste_110) = (next.ste(0x10).unwrap(), next.ste(0x110).unwrap());
            core::mem::forget(next);
            assert_ne!(
                ste_10,
                ste_110,
                "accepted: stream 0x10, attached to the restored stage-1 domain 0x77 (its STE {restored:?} once \
                 the restore returned), now translates with the STE installed for stream 0x110 ({:?})",
                ste_10.config()
            );
        }
        // Refused as the other refusals of `adopt_running` are: the SMMU disabled, every transaction aborting.
        assert!(
            matches!(refused, Some(crate::InitError::StreamTableNotAdoptable { .. })),
            "refused as a stream table not adoptable: {refused:?}"
        );
        assert!(disabled_aborting(&model), "{:x?}", cr0_and_gbpa(&model));
    }

    /// Finding 3's other half: a level-1 descriptor naming, as a span, memory over the level-1 table itself (the
    /// table is 16 KiB-aligned as a span is: the descriptor is exactly the one the driver writes for a span
    /// there), so the SMMU would read level-1 descriptors as STEs and STE writes would rewrite descriptors.
    #[test]
    fn a_running_stream_table_whose_span_overlaps_its_level1_table_is_not_adopted() {
        let frames = frames();
        let mut region = Region::new();
        let model = running_first_image(&mut region, frames);
        let pool = region.pool();
        let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
        let crate::stream::StreamTableFormat::TwoLevel { split, .. } = running.format else {
            panic!("a 2-level stream table: {:?}", running.format);
        };
        let over = crate::hw::ste::l1_descriptor(PhysAddr(running.strtab_base), split + 1).unwrap();
        let index = ((running.strtab_base - region.extent.base) / 8) as usize;
        region.memory[index + 1] = over;
        let adopted = model.smmu().adopt_running(core, &InitOptions::default(), &running);
        assert!(
            matches!(
                adopted.as_ref().err(),
                Some(crate::InitError::StreamTableNotAdoptable { .. })
            ),
            "{:?}",
            adopted.as_ref().err()
        );
        core::mem::forget(adopted);
        assert!(disabled_aborting(&model), "{:x?}", cr0_and_gbpa(&model));
    }

    /// Review 2: the threat model says a device whose stream the previous image left translating across a running
    /// hand-off "reaches only what those STEs map, which that image's `prepare_handover` checked". But
    /// `prepare_handover` checks only the preserved domains: the first image's stream 0x30 bypasses (every byte,
    /// the handover region and its arenas included) from the prepare until the next image's restore aborts it, and
    /// the restore then adopts whatever that device wrote into the records and the preserved memory.
    #[test]
    fn review_a_running_hand_off_leaves_no_unchecked_stream_translating_after_prepare() {
        use crate::handover::pool::HandoverArena;
        let frames = frames();
        let mut region = Region::new();
        let model = Model::start(frames);
        let pool = region.pool();
        *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
        let core = pool.take_arena().unwrap();
        let mut first: ActiveSmmu<&'static HandoverArena> = model.smmu().init(core, &InitOptions::default()).unwrap();
        let d = arena_stage1_on(&mut first, pool);
        first.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
        first.attach(d, 0x10).unwrap();
        first.attach_bypass(0x30).unwrap();
        first.preserve(d, 0x77).unwrap();
        let prepared = first.prepare_handover(pool, BASE, 3, SURVIVING);
        let left = first.ste(0x30).unwrap().config();
        core::mem::forget(first);
        assert!(
            prepared.is_err() || !matches!(left, Config::Bypass | Config::Stage1 | Config::Stage2 | Config::Nested),
            "prepared ({prepared:?}) with stream 0x30 left {left:?} across the hand-off, unchecked: its device can \
             write the region and the preserved arenas before the next image restores them"
        );
        // Refused naming the stream, with nothing written.
        assert_eq!(prepared, Err(PrepareError::UnpreservedStream { sid: 0x30, ssid: 0 }));
        assert!(pool.lock_metadata().unwrap().iter().all(|&b| b == 0), "nothing written");
    }

    /// Finding 5, the rest of the rule: for a running hand-off, a stream attached to a domain that is not preserved,
    /// and a substream of a preserved stream attached to one, are refused too (each named); once they are detached
    /// (or made to abort) the hand-off is prepared, and from then on the stream configuration is frozen: no attach
    /// to any domain, no substream, no bypass (each a typed error that changes nothing, no command issued), while
    /// making a stream abort stays allowed; cancelling unfreezes it. A hand-off through a warm reset freezes no
    /// stream.
    #[test]
    fn a_running_hand_off_translates_only_preserved_streams_and_freezes_the_stream_configuration() {
        use crate::handover::pool::HandoverArena;
        // SSIDSIZE 5 (IDR1[10:6]): substreams exist.
        let idr1 = crate::smmu::tests::IDRS[1].1 | 5 << 6;
        let idr0 = crate::smmu::tests::IDRS[0].1;
        let frames = frames();
        let mut region = Region::new();
        let model = Model::start_with_idrs(frames, idr0, idr1);
        let pool = region.pool();
        *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
        let core = pool.take_arena().unwrap();
        let mut first: ActiveSmmu<&'static HandoverArena> = model.smmu().init(core, &InitOptions::default()).unwrap();
        let d = arena_stage1_on(&mut first, pool);
        first.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
        first.attach(d, 0x10).unwrap();
        first.preserve(d, 0x77).unwrap();
        let other = first.create_stage1(frames, Stage1Options::default()).unwrap();
        first.attach(other, 0x20).unwrap();
        first.attach_substream(other, 0x10, 3).unwrap();
        let nothing_written = |pool: &HandoverPool| pool.lock_metadata().unwrap().iter().all(|&b| b == 0);
        assert_eq!(
            first.prepare_handover(pool, BASE, 3, SURVIVING),
            Err(PrepareError::UnpreservedStream { sid: 0x10, ssid: 3 })
        );
        first.detach_substream(0x10, 3).unwrap();
        assert_eq!(
            first.prepare_handover(pool, BASE, 3, SURVIVING),
            Err(PrepareError::UnpreservedStream { sid: 0x20, ssid: 0 })
        );
        assert!(nothing_written(pool));
        first.detach(0x20).unwrap();
        first.prepare_handover(pool, BASE, 3, SURVIVING).unwrap();
        assert_eq!(first.handover_phase(), HandoverPhase::Prepared { generation: 3 });

        // Frozen: nothing issued, nothing changed.
        let before = model.seen.lock().unwrap().consumed.len();
        let frozen = DomainError::StreamsFrozen { generation: 3 };
        assert_eq!(first.attach(other, 0x20), Err(frozen));
        assert_eq!(first.attach_substream(other, 0x10, 3), Err(frozen));
        assert_eq!(
            first.attach_bypass(0x30).err(),
            Some(AttachError::StreamsFrozen { generation: 3 })
        );
        assert_eq!(
            first.attach(d, 0x11),
            Err(DomainError::HandoverPrepared { token: 0x77 })
        );
        assert_eq!(issued_since(&model, before), [], "nothing issued");
        for sid in [0x11, 0x20, 0x30] {
            assert_eq!(first.ste(sid).unwrap().config(), Config::Abort, "stream {sid:#x}");
        }
        assert_eq!(first.attachments(other), Ok(&[][..]));
        for e in [
            std::format!("{frozen}"),
            std::format!("{}", AttachError::StreamsFrozen { generation: 3 }),
        ] {
            assert!(e.contains("generation 3"), "{e}");
        }
        // Aborting stays allowed.
        first.attach_abort(0x40).unwrap();
        // Cancelled: the configuration is free again (and a warm-reset hand-off below freezes nothing).
        first.cancel_handover(pool, BASE).unwrap();
        first.attach_bypass(0x30).unwrap();
        first.attach_abort(0x30).unwrap();
        core::mem::forget(first);

        // Through a warm reset (the SMMU's structures not in an arena): nothing translates across it, so streams
        // are neither checked nor frozen.
        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        let pool = Region::new().pool();
        let kept = arena_stage1(&mut smmu, pool);
        smmu.attach(kept, 0x10).unwrap();
        smmu.preserve(kept, 0x78).unwrap();
        smmu.attach_bypass(0x30).unwrap();
        smmu.prepare_handover(pool, BASE, 4, SURVIVING).unwrap();
        let not_preserved = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
        smmu.attach(not_preserved, 0x20).unwrap();
        smmu.attach_bypass(0x31).unwrap();
        core::mem::forget(smmu);
    }

    fn arena_stage1_on(
        smmu: &mut ActiveSmmu<&'static crate::handover::pool::HandoverArena>,
        pool: &'static HandoverPool,
    ) -> DomainId {
        let options = Stage1Options {
            input_bits: 39,
            el2: false,
        };
        smmu.create_stage1(pool.take_arena().unwrap(), options).unwrap()
    }
}
