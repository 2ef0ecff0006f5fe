//! Live update, both ends: [`ActiveSmmu::prepare_handover`] writes the preserved domains' records into the
//! handover region; after a warm reset the next image's [`ActiveSmmu::restore_handover`] validates the region
//! completely, then rebuilds the domains (their IDs reserved, their page tables and CD tables adopted in place, their
//! streams' STEs installed), [`ActiveSmmu::retrieve`] hands them out by token, and [`ActiveSmmu::finish_handover`]
//! frees whatever nobody claimed and re-arms the region empty.

use super::format::{self, FormatError, HandoverError};
use super::pool::{HandoverArena, HandoverPool, METADATA_BYTES, PoolError};
use super::verify::{Outputs, Refusal, RestoreOptions, VerifyFailure, verify_instance};
use super::{Extent, InstanceRecords, MAX_INSTANCES, RecordKind};
use crate::active::{ActiveSmmu, AttachError};
use crate::ctx::{CdTable, CdTableError, CdTableFormat};
use crate::domain::{DomainError, DomainId, DomainMemory, DomainState, GuestStage1, StreamRecord, Translation};
use crate::hw::ste::{CdTableLayout, DefaultSubstream};
use crate::ids::IdError;
use crate::mem::{Coherency, FrameAllocator, PhysAddr};
use crate::pgtable::{AdoptedCounts, Format, Granule, IoPageTable, MapError, Stage};
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

/// Why a restore refused the region. Everything is checked before anything changes: the SMMU is then up with
/// every stream aborting, nothing mapped, and the region's bytes untouched for diagnosis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreError {
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
    CdTable(CdTableError),
    /// An STE.
    Attach(AttachError),
    /// The domain table.
    Domain(DomainError),
}

impl core::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RestoreError::Pool(e) => write!(f, "restore: {e}"),
            RestoreError::Region(e) => write!(f, "restore: the handover region is refused: {e}"),
            RestoreError::Identity(e) => write!(f, "restore: the handover region is for another SMMU: {e}"),
            RestoreError::BeyondLimits { token, what, value } => {
                write!(
                    f,
                    "restore: record {token:#x} needs {what} {value:#x}, beyond this SMMU"
                )
            }
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
}

/// What [`ActiveSmmu::finish_handover`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FinishReport {
    /// Restored domains nobody retrieved, freed (their streams aborting, their memory back in the pool).
    pub unclaimed: u32,
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

/// For a hand-off with the SMMU left running: what the previous image recorded about this SMMU (found by
/// `register_base` in the validated region): the running stream table's place and format, and the arena its
/// structures live in, taken back whole so nothing in it is handed out again. Give the arena and the stream table
/// to [`crate::Smmu::adopt_running`].
///
/// # Errors
/// [`RestoreError::Pool`], [`RestoreError::Region`] for a region that does not validate (then the SMMU cannot be
/// taken over as it runs: stop it and initialise it), `Ok(None)` when the region names no running SMMU at
/// `register_base`.
pub fn running_smmu(
    pool: &'static HandoverPool,
    register_base: u64,
) -> Result<Option<(StreamTableFormat, u64, &'static HandoverArena)>, RestoreError> {
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
    let format = match id.strtab_format {
        1 => StreamTableFormat::TwoLevel {
            sid_bits: id.strtab_sid_bits,
            split: id.strtab_split,
        },
        _ => StreamTableFormat::Linear {
            sid_bits: id.strtab_sid_bits,
        },
    };
    let arena = pool
        .adopt(Extent {
            base: id.strtab_base,
            len: id.core_len,
        })
        .map_err(RestoreError::Pool)?;
    Ok(Some((format, id.strtab_base, arena)))
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
    /// `surviving` is the memory that survives the hand-off as it is (RAM the next image does not reuse for
    /// anything but what the preserved devices reach; what it declares DMA-able to its restore): every page and
    /// block of every preserved domain must map memory inside one of these ranges, and outside the handover
    /// region and the memory declared with [`ActiveSmmu::protect_memory`] (which the next image's restore
    /// refuses). Each preserved table is walked once for this.
    ///
    /// # Errors
    /// [`PrepareError::NotSurviving`], [`PrepareError::ProtectedOutput`] naming the domain and the mapping, before
    /// anything is written; [`PrepareError`]; on [`PrepareError::SelfCheck`] the region is invalidated (its magic
    /// cleared).
    pub fn prepare_handover(
        &self,
        pool: &HandoverPool,
        register_base: u64,
        generation: u64,
        surviving: &[Extent],
    ) -> Result<usize, PrepareError> {
        let region = pool.metadata_extent().map_err(PrepareError::Pool)?;
        let pool_extent = pool.pool().map_err(PrepareError::Pool)?;
        self.check_preserved_outputs(pool, surviving)?;
        let ours = self.handover_records(register_base).map_err(PrepareError::Records)?;
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
        // when it is one) hand out nothing more, and the domains refuse changes while their memory is sealed.
        self.seal_preserved(true);
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

    /// Cancels a prepared hand-off: the preserved domains' memory (and this SMMU's) hands out memory again, and
    /// this SMMU's records are removed from the region, so the next boot restores nothing of them. The domains stay
    /// preserved (prepare again for the next hand-off).
    ///
    /// # Errors
    /// [`PrepareError::Pool`] when the pool is not set up.
    pub fn cancel_handover(&self, pool: &HandoverPool, register_base: u64) -> Result<(), PrepareError> {
        self.seal_preserved(false);
        rearm_without(pool, register_base).map_err(PrepareError::Pool)
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

    /// After a warm reset (or in a new image), with this SMMU just initialised (every stream aborting): validates
    /// the handover region of `pool` completely (see `docs/handover.md`), checks that it was written for this SMMU
    /// (`register_base` and the ID registers) and that every ID and StreamID fits it, verifies the preserved
    /// memory the records name (with [`Verification::Full`](super::verify::Verification), the default: every
    /// page table walked from its root, every leaf inside `options.dma_memory` and outside the region and the
    /// memory declared with [`ActiveSmmu::protect_memory`], every live-entry count as walked; in every mode each
    /// adopted CD equal to the one the driver builds), and only then rebuilds this SMMU's preserved domains: each
    /// arena taken back, each ASID/VMID reserved as recorded (no STE or CD is scanned), each page table and CD
    /// table adopted in place (no copy), each stream's STE installed. The domains wait for
    /// [`ActiveSmmu::retrieve`]; [`ActiveSmmu::finish_handover`] frees the rest. A region that was never written
    /// (or re-armed empty) restores nothing. On success the region (`pool`'s) is declared protected memory, so no
    /// later `map` can give it to a device.
    ///
    /// # Errors
    /// [`RestoreError`] ([`RestoreError::Verify`] names the record, the address and what its memory gets wrong):
    /// nothing was rebuilt (every stream aborts), and the region is untouched. [`RestoreError::BeyondLimits`] also
    /// when no protected-memory slot is left for the region.
    pub fn restore_handover(
        &mut self,
        pool: &'static HandoverPool,
        register_base: u64,
        options: &RestoreOptions<'_>,
    ) -> Result<RestoreReport, RestoreError> {
        let pool_extent = pool.pool().map_err(RestoreError::Pool)?;
        let decoded = {
            let bytes = pool.lock_metadata().map_err(RestoreError::Pool)?;
            if bytes[..8].iter().all(|&b| b == 0) {
                return Ok(RestoreReport::default());
            }
            format::decode(&bytes, pool_extent).map_err(RestoreError::Region)?
        };
        let mut report = RestoreReport {
            generation: decoded.generation,
            ..RestoreReport::default()
        };
        let Some(instance) = decoded.instances.iter().find(|i| i.identity.base == register_base) else {
            return Ok(report);
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
        let mut touched: heapless::Vec<u32, 64> = heapless::Vec::new();
        let result = self.rebuild(pool, instance, &mut report, &mut touched);
        if let Err(e) = result {
            // Not expected once `check_limits` passed; undo everything: every touched stream aborting, the
            // domains gone (their memory abandoned, not freed: the SMMU may have walked it), IDs and arenas back.
            for &sid in &touched {
                let _ = self.attach_abort(sid);
            }
            self.domains.streams.retain(|r| !touched.contains(&r.sid));
            let restored: heapless::Vec<(DomainId, Option<&'static HandoverArena>), { crate::domain::MAX_PRESERVED }> =
                self.domains.restored.values().copied().collect();
            self.domains.restored.clear();
            for (id, arena) in restored {
                if let Some(state) = self.domains.remove(id) {
                    self.release_restored_ids(&state);
                    core::mem::forget(state);
                }
                if let Some(arena) = arena {
                    // SAFETY: the domain's state was forgotten (no reference into the arena is left) and every
                    // stream it served aborts; the invalidation below completes before anything is taken anew.
                    unsafe { arena.release() };
                }
            }
            let _ = self.invalidate_all();
            return Err(e);
        }
        self.domains.protected = protected;
        Ok(report)
    }

    /// Frees the ASID or VMID a rebuilt (or half-rebuilt) domain claimed.
    fn release_restored_ids(&mut self, state: &DomainState) {
        match &state.translation {
            Translation::Stage1 { asid, .. } => {
                let _ = self.free_asid(*asid);
            }
            Translation::Stage2 { vmid, .. } => {
                let _ = self.free_vmid(*vmid);
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
            // The IDs a record's domain owns must be free here (0 is reserved, never a domain's), and its streams
            // unattached: checked now, so that a restore into an image that already uses them changes nothing.
            if matches!(r.kind, RecordKind::Stage1 | RecordKind::Stage1El2) && self.asid_taken(r.asid) {
                return Err(beyond("an ASID reserved or taken in this image", r.asid.into()));
            }
            if r.kind == RecordKind::Stage2 && self.vmid_taken(r.vmid) {
                return Err(beyond("a VMID reserved or taken in this image", r.vmid.into()));
            }
            if let Some(s) = r.streams.iter().find(|s| self.domains.stream(s.sid).is_some()) {
                return Err(beyond("a StreamID attached in this image", s.sid.into()));
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
                let whole_stream = instance
                    .records
                    .iter()
                    .any(|x| x.streams.iter().any(|y| y.sid == s.sid && y.ssid == 0));
                if s.ssid != 0 && !whole_stream {
                    return Err(beyond(
                        "a substream of a stream no record holds, StreamID",
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
        touched: &mut heapless::Vec<u32, 64>,
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
                let (translation, memory, arena): (Translation, DomainMemory, Option<&'static HandoverArena>) =
                    match (r.kind, r.table) {
                        (RecordKind::Nested, _) => {
                            let (parent, _) = *self.domains.restored.get(&r.parent_token.unwrap_or(0)).ok_or(fail(
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
                            (Translation::Nested { parent, guest }, memory, None)
                        }
                        (_, Some(shape)) => {
                            let extent = r.extents.first().copied().unwrap_or_default();
                            let arena = pool.adopt(extent).map_err(|e| fail(RebuildFailure::Pool(e)))?;
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
                                .map_err(|e| {
                                    // SAFETY: nothing was built on the arena, and no stream reaches its memory:
                                    // streams are installed only once every domain is rebuilt.
                                    unsafe { arena.release() };
                                    fail(RebuildFailure::Table(e))
                                })?;
                            table.set_bbm_level(bbml);
                            // A failure from here on is this record's alone to undo (it is not in `restored` yet):
                            // the table abandoned in place (the SMMU may walk it), the ID and the arena given back.
                            let abandon = |table: IoPageTable<DomainMemory>| {
                                core::mem::forget(table);
                                // SAFETY: the table is forgotten, so no reference into the arena is left, and no
                                // stream reaches it: streams are installed only once every domain is rebuilt.
                                unsafe { arena.release() };
                            };
                            let translation = if stage == Stage::Two {
                                if let Err(e) = self.claim_vmid(r.vmid) {
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
                                if let Err(e) = self.claim_asid(r.asid) {
                                    abandon(table);
                                    return Err(fail(RebuildFailure::Id(e)));
                                }
                                let cd = match self.stage1_cd(r.asid, &table) {
                                    Ok(cd) => cd,
                                    Err(e) => {
                                        let _ = self.free_asid(r.asid);
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
                            (translation, memory, Some(arena))
                        }
                        (_, None) => return Err(fail(RebuildFailure::Domain(DomainError::UnknownToken(r.token)))),
                    };
                let parent = match translation {
                    Translation::Nested { parent, .. } => Some(parent),
                    _ => None,
                };
                if let Err(e) = self.domains.check_free_slot() {
                    // As above: this record's ID and arena back, its table abandoned in place.
                    let state = DomainState::new(translation, memory);
                    self.release_restored_ids(&state);
                    core::mem::forget(state);
                    if let Some(arena) = arena {
                        // SAFETY: as in `abandon` above.
                        unsafe { arena.release() };
                    }
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
                self.domains
                    .restored
                    .insert(r.token, (id, arena))
                    .map_err(|_| fail(RebuildFailure::Domain(DomainError::TooMany("restored domains"))))?;
                report.domains += 1;
            }
        }
        // Streams: the whole-stream attachments (with their adopted CD tables), then substreams.
        for substreams in [false, true] {
            for r in &instance.records {
                let fail = |what| RestoreError::Rebuild { token: r.token, what };
                let (id, _) = self
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
                            .map_err(|e| fail(RebuildFailure::CdTable(e)))?;
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
                        let _ = touched.push(s.sid);
                        self.install_ste(s.sid, &ste)
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

    /// After a hand-off with the SMMU running ([`crate::Smmu::adopt_running`] then
    /// [`ActiveSmmu::restore_handover`]): makes every stream that no restored domain holds abort, then invalidates
    /// every cached configuration and TLB entry (those streams may have cached translations under IDs this image
    /// will reuse). Call it before allocating any ASID or VMID. Returns how many STEs changed.
    ///
    /// # Errors
    /// As [`ActiveSmmu::install_ste`].
    pub fn abort_unrestored_streams(&mut self) -> Result<u32, AttachError> {
        let keep: heapless::Vec<u32, { crate::domain::MAX_ATTACHED_STREAMS }> =
            self.domains.streams.iter().map(|r| r.sid).collect();
        let aborted = self.abort_streams_except(|sid| keep.contains(&sid))?;
        // Until now those streams translated with the old image's contexts and may have filled the TLB under
        // ASIDs and VMIDs this image considers free: drop every such entry before any is allocated again.
        self.invalidate_all().map_err(AttachError::Queue)?;
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
            .map(|(id, _)| id)
            .ok_or(DomainError::UnknownToken(token))
    }

    /// Ends the hand-off: every restored domain nobody retrieved is detached (its streams abort), its TLB entries
    /// invalidated, its memory given back to the pool; then this SMMU's records are removed from the region (the
    /// region re-armed without them; other SMMUs' records stay). A stage-2 parent whose nested domain was
    /// retrieved is the exception: the live nested domain translates through it, so it stays as it is, and
    /// retrievable under its token (retrieve it to own it, and free it after its nested domains).
    ///
    /// # Errors
    /// [`DomainError`] from detaching or freeing (an invalidation that failed); the domains not yet freed stay
    /// waiting, and the region is not re-armed.
    pub fn finish_handover(&mut self, pool: &HandoverPool, register_base: u64) -> Result<FinishReport, DomainError> {
        let mut report = FinishReport::default();
        // Nested domains before their parents.
        for nested_pass in [true, false] {
            let waiting: heapless::Vec<(u64, DomainId), { crate::domain::MAX_PRESERVED }> = self
                .domains
                .restored
                .iter()
                .filter(|(_, (id, _))| {
                    self.domains
                        .get(*id)
                        .is_ok_and(|s| matches!(s.translation, Translation::Nested { .. }) == nested_pass)
                })
                .map(|(t, (id, _))| (*t, *id))
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
    if let Ok(written) = format::encode(&keep, generation + 1, region, pool_extent, bytes) {
        clean_to_memory(bytes.as_ptr(), written);
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
    use crate::active::tests::{Issued, Model, assert_ste_steps, frames, issued_since};
    use crate::domain::{Stage1Options, Stage2Options};
    use crate::handover::pool::ARENAS;
    use crate::hw::ste::Config;
    use crate::pgtable::Prot;
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
        first.attach_bypass(0x30).unwrap();
        first.preserve(d, 0x77).unwrap();
        first.prepare_handover(pool, BASE, 3, SURVIVING).unwrap();
        let strtab = first.configuration().stream_table_base;
        let format = first.stream_table_format();
        assert!(matches!(format, StreamTableFormat::TwoLevel { .. }));
        let ste = first.ste(0x10).unwrap();
        core::mem::forget(first);

        // The next image: the same SMMU, still translating; where its structures are comes from the region.
        let pool = region.pool();
        let (recorded_format, recorded_strtab, core) = running_smmu(pool, BASE).unwrap().unwrap();
        assert_eq!((recorded_format, recorded_strtab), (format, strtab));
        let before = model.seen.lock().unwrap().consumed.len();
        let mut next = model
            .smmu()
            .adopt_running(core, &InitOptions::default(), format, strtab)
            .unwrap();
        // Whatever the old image left cached goes: every configuration and TLB entry (no EL2 contexts here).
        assert_eq!(
            issued_since(&model, before),
            [Issued::CfgiAll, Issued::NsnhAll, Issued::Sync]
        );
        assert_eq!(next.ste(0x10), Ok(ste), "the running stream table adopted as found");
        let before = model.seen.lock().unwrap().consumed.len();
        let report = next.restore_handover(pool, BASE, &ANYWHERE).unwrap();
        assert_eq!((report.domains, report.streams), (1, 1));
        assert_eq!(
            next.ste(0x10),
            Ok(ste),
            "the restored STE is the one the SMMU was using: nothing rewritten"
        );
        assert_eq!(
            issued_since(&model, before),
            [],
            "nothing rewritten, nothing invalidated"
        );
        assert_eq!(next.ste(0x30).unwrap().config(), Config::Bypass, "until aborted");
        let before = model.seen.lock().unwrap().consumed.len();
        assert_eq!(next.abort_unrestored_streams(), Ok(1));
        assert_eq!(next.ste(0x30).unwrap().config(), Config::Abort);
        // The unrestored stream's STE (and only it), then everything it may have cached under IDs this image reuses.
        let issued = issued_since(&model, before);
        let (ste_steps, rest) = issued.split_at(issued.len() - 3);
        assert_ste_steps(ste_steps, 0x30);
        assert_eq!(rest, [Issued::CfgiAll, Issued::NsnhAll, Issued::Sync]);
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
            .adopt_running(core, &InitOptions::default(), format, strtab + 0x1000)
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

    fn vmid_of(smmu: &ActiveSmmu<&'static HeapFrames>, token: u64) -> u16 {
        let (id, _) = smmu.domains.restored.get(&token).copied().unwrap();
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
        let idr1 = crate::active::tests::IDRS[1].1 | 5 << 6;
        let idr0 = crate::active::tests::IDRS[0].1;
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
        let (strtab, format) = (first.configuration().stream_table_base, first.stream_table_format());
        core::mem::forget(first);

        // The next image does not know (IDR0.COHACC = 1, no board override): the running CR1 decides.
        let pool = region.pool();
        let (_, _, core) = running_smmu(pool, BASE).unwrap().unwrap();
        let mut next = model
            .smmu()
            .adopt_running(core, &InitOptions::default(), format, strtab)
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
}
