//! Before a live update: [`Iommu::prepare_handover`] writes the preserved domains' records into the handover
//! region and freezes what it recorded until [`Iommu::cancel_handover`] or the hand-off.

use super::finish::rearm_without;
use super::format::{self, FormatError, HandoverError, RegionWriter};
use super::live::{Held, RecordError};
use super::pool::{HandoverPool, PoolError};
use super::verify::{Outputs, Refusal};
use super::{Extent, SmmuIdentity, clean_to_memory};
use crate::domain::{Book, DomainId, DomainState, Iommu, Prepared, StateMut, Storage, Translation};
use crate::mem::FrameAllocator;
use crate::mem::MemoryHooks;

/// Why the handover could not be prepared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
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
    /// would be neither handed out nor recorded. Call [`Iommu::finish_handover`] first.
    RestoreNotFinished {
        /// The restored records' generation.
        generation: u64,
    },
    /// [`Iommu::cancel_handover`] without a prepared hand-off: cancelling would remove records this image did
    /// not write (a previous image's, not yet restored).
    NotPrepared,
    /// A preserved domain has an unmap whose invalidation has not completed: a deferred unmap not synced (sync it,
    /// or `invalidate_domain`), or an invalidation that failed (retried by the domain's next operation). Nothing
    /// was written.
    PendingInvalidation {
        /// The domain's token.
        token: u64,
    },
    /// For a hand-off with the SMMU left running (its own structures in a handover memory): stream `sid`
    /// (substream `ssid`; 0 for the whole stream) bypasses, or translates through a domain that is not preserved
    /// (or through an STE a previous image left). It would go on doing so across the hand-off, through nothing a
    /// record describes or `prepare_handover` checked, its device able to write the handover region and the
    /// preserved memory before the next image takes them over. Detach it, or make it abort
    /// ([`LowLevel::attach_abort`](crate::LowLevel::attach_abort)), first. Nothing was written.
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

/// Where one SMMU's driver is in a live update (the states of the table in [`crate::handover`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandoverPhase {
    /// Nothing prepared, nothing restored and waiting: domains are preserved and unpreserved freely.
    Idle,
    /// [`Iommu::prepare_handover`] wrote records of `generation`: the preserved domains are frozen and no
    /// domain is preserved or unpreserved until [`Iommu::cancel_handover`] or the hand-off; with the SMMU left
    /// running, no stream starts translating or bypassing either (`StreamsFrozen`).
    Prepared {
        /// The records' generation.
        generation: u64,
    },
    /// [`Iommu::restore_handover`] rebuilt (and consumed) records of `generation`: their domains wait for
    /// [`Iommu::retrieve`] until [`Iommu::finish_handover`].
    Restored {
        /// The records' generation.
        generation: u64,
    },
}

impl<A: FrameAllocator, const D: usize> Iommu<A, D> {
    /// Writes the records of every preserved domain (as they stand now) into the handover region of `pool`, the
    /// header last, and cleans the region, every preserved domain's memory and (for a hand-off with the SMMU
    /// running) this SMMU's own memory to the point of coherency, so that a warm reset finds them in memory. Translation keeps running meanwhile; the preserved domains are frozen until
    /// [`Iommu::cancel_handover`] or the hand-off (map, unmap, protect, trim, attach, detach and unpreserve
    /// return `DomainError::HandoverPrepared`), so the records stay what the next image restores: to change one,
    /// cancel, change, and prepare again. Other domains stay usable. Records of other SMMUs already in the region are kept. `register_base` is this
    /// SMMU's physical register base, which names it in the region.
    ///
    /// For a hand-off with the SMMU left running (this SMMU's own structures are in a handover memory: the record
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
    /// region and the memory declared with [`Iommu::protect_memory`] (which the next image's restore
    /// refuses). Each preserved table is walked once for this.
    ///
    /// # Errors
    /// [`PrepareError::NotSurviving`], [`PrepareError::ProtectedOutput`] naming the domain and the mapping, and
    /// (for a hand-off with the SMMU left running) [`PrepareError::UnpreservedStream`] naming the stream, before
    /// anything is written; [`PrepareError::RestoreNotFinished`] while a restore waits for
    /// [`Iommu::finish_handover`] (nothing changed then); [`PrepareError`]; on [`PrepareError::SelfCheck`] the
    /// region is invalidated (its magic cleared).
    pub fn prepare_handover(
        &self,
        pool: &HandoverPool,
        register_base: u64,
        generation: u64,
        surviving: &[Extent],
    ) -> Result<usize, PrepareError> {
        // The freeze is atomic: with the bookkeeping held (no attach, detach, preserve or free meanwhile), every
        // preserved domain is write-locked in slot order (the lock order), so an operation in flight on one of
        // them has finished (and is recorded) or starts after the seal below and fails with `HandoverPrepared`.
        // Everything is checked, recorded and sealed under those locks, held in a block of the SMMU's allocator
        // (however many domains are preserved); they go at the end of this function. An attach or detach writing
        // its STE outside the bookkeeping is waited for: it is recorded as it ends.
        let book = self.book_quiet();
        if let Some(generation) = book.restored_generation {
            return Err(PrepareError::RestoreNotFinished { generation });
        }
        let region = pool.metadata_extent().map_err(PrepareError::Pool)?;
        let pool_extent = pool.pool().map_err(PrepareError::Pool)?;
        let identity = self.handover_identity(register_base);
        // With the SMMU left running, whatever translates now goes on translating until the next image restores:
        // only the preserved domains' streams may.
        let running = identity.core_len != 0;
        if running {
            self.check_streams_preserved(&book)?;
        }
        let protected = self.domains.protected.snapshot();
        let outputs = Outputs {
            dma: surviving,
            region: pool.region().map_err(PrepareError::Pool)?,
            protected: protected.extents(),
        };
        let mut held = Storage::new(
            self.domains.bookkeeping_allocator(self.allocator()),
            book.tokens.len(),
            |_| None,
        )
        .map_err(|_| {
            PrepareError::Records(RecordError::NoMemoryForLocks {
                domains: book.tokens.len(),
            })
        })?;
        for (slot, (_, id)) in held.iter_mut().zip(self.domains.preserved()) {
            *slot = self.domains.get_mut(id).ok().map(|state| (id, state));
        }
        let result = (|| {
            for (_, state) in held.iter_mut().flatten() {
                check_preserved_outputs(state, &outputs)?;
            }
            let states = Held(&held);
            self.write_records(&book, &states, pool, region, pool_extent, identity, generation)
        })();
        if result.is_ok() {
            // What is recorded must not change until the hand-off: the preserved domains' memories (and this
            // SMMU's own, when it is one) hand out nothing more, the domains refuse changes while their memory is
            // sealed, and no domain is preserved or unpreserved.
            for (_, state) in held.iter().flatten() {
                if !matches!(state.translation, Translation::Nested { .. }) {
                    state.memory.seal();
                }
            }
            self.allocator().seal();
            *self.domains.prepared.lock() = Some(Prepared { generation, running });
        }
        // SAFETY: `held` came from this allocator, just above; its guards are dropped (unlocking) first.
        unsafe { held.release(self.domains.bookkeeping_allocator(self.allocator())) };
        result
    }

    /// Writes this SMMU's records (its preserved domains, write-locked in `states`) into the
    /// region beside the other SMMUs' (kept as they are), through the staging buffer, self-checks them, and
    /// cleans the region and every memory it names to the point of coherency. On
    /// [`PrepareError::SelfCheck`] the region is invalidated (its magic cleared); on any other error the region
    /// is as it was.
    #[allow(clippy::too_many_arguments)]
    fn write_records(
        &self,
        book: &Book<D>,
        states: &Held<'_, StateMut<'_>>,
        pool: &HandoverPool,
        region: Extent,
        pool_extent: Extent,
        identity: SmmuIdentity,
        generation: u64,
    ) -> Result<usize, PrepareError> {
        let mut guard = pool.lock_metadata().map_err(PrepareError::Pool)?;
        let (bytes, staging, scratch) = guard.with_staging();
        // The new region is encoded into the staging buffer, from a view of the old one (other SMMUs' records are
        // kept as they are) and this SMMU's domains, then copied over it.
        let written = {
            let previous = match bytes[..8].iter().any(|&b| b != 0) {
                true => Some(format::decode(bytes, pool_extent, scratch).map_err(PrepareError::ExistingRegion)?),
                false => None,
            };
            let others = || {
                previous
                    .iter()
                    .flat_map(|p| p.instances.iter())
                    .filter(|i| i.identity.base != identity.base)
            };
            let mut writer = RegionWriter::new(staging, others().count() + 1).map_err(PrepareError::Format)?;
            for other in others() {
                writer.instance(&other.identity).map_err(PrepareError::Format)?;
                for r in other.records.iter() {
                    writer.record(&r).map_err(PrepareError::Format)?;
                }
            }
            writer.instance(&identity).map_err(PrepareError::Format)?;
            self.write_preserved(&mut writer, book, Some(states))
                .map_err(|e| match e {
                    RecordError::Format(e) => PrepareError::Format(e),
                    e => PrepareError::Records(e),
                })?;
            writer
                .finish(generation, region, pool_extent)
                .map_err(PrepareError::Format)?
        };
        bytes[..written].copy_from_slice(&staging[..written]);
        // The self-check reads the staging copy (the same bytes as the region now), so that its view outlives a
        // failure that has to unmark the region.
        let written_region = match format::decode(&staging[..written], pool_extent, scratch) {
            Ok(region) => region,
            Err(e) => {
                bytes[0] = 0;
                clean_to_memory(bytes.as_ptr(), 64);
                return Err(PrepareError::SelfCheck(e));
            }
        };
        clean_to_memory(bytes.as_ptr(), written);
        // Every memory the next image adopts: the preserved domains', and (for a hand-off with the SMMU running)
        // the SMMU's own, whose stream table and level-2 spans the next image reads in place. A coherent SMMU's
        // structures were never cleaned as they were written.
        let cores = written_region.instances.iter().map(|i| Extent {
            base: i.identity.strtab_base,
            len: i.identity.core_len,
        });
        for extent in written_region
            .instances
            .iter()
            .flat_map(|i| i.records.iter().flat_map(|r| r.extents.iter()))
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
    fn check_streams_preserved(&self, book: &Book<D>) -> Result<(), PrepareError> {
        // A domain is preserved exactly when it has a token (read under its lock: the caller holds none).
        let preserved = |d: DomainId| self.domains.get(d).is_ok_and(|s| s.token.is_some());
        for r in book.streams.iter() {
            if !preserved(r.domain) {
                return Err(PrepareError::UnpreservedStream { sid: r.sid, ssid: 0 });
            }
            if let Some(&(ssid, _)) = r.substreams.iter().find(|(_, d)| !preserved(*d)) {
                return Err(PrepareError::UnpreservedStream { sid: r.sid, ssid });
            }
        }
        match self.core.first_live_stream_except(|sid| book.stream(sid).is_some()) {
            Some(sid) => Err(PrepareError::UnpreservedStream { sid, ssid: 0 }),
            None => Ok(()),
        }
    }

    /// Unseals the memory of every preserved domain, each under its own read lock in turn. The caller holds the
    /// bookkeeping.
    fn unseal_preserved(&self) {
        for (_, id) in self.domains.preserved() {
            let Ok(state) = self.domains.get(id) else { continue };
            if !matches!(state.translation, Translation::Nested { .. }) {
                state.memory.unseal();
            }
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
        let _book = self.book();
        self.unseal_preserved();
        self.allocator().unseal();
        *self.domains.prepared.lock() = None;
        rearm_without(pool, register_base).map_err(PrepareError::Pool)
    }

    /// Where this driver is in a live update (see the table in [`crate::handover`]).
    pub fn handover_phase(&self) -> HandoverPhase {
        if let Some(generation) = self.domains.prepared_generation() {
            HandoverPhase::Prepared { generation }
        } else if let Some(generation) = self.book().restored_generation {
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
}

/// Checks that every leaf of preserved domain `state` maps memory inside `outputs`' DMA-able memory and outside
/// the region and protected memory: the first that does not is the error. Each table is walked once.
fn check_preserved_outputs(state: &mut DomainState, outputs: &Outputs<'_>) -> Result<(), PrepareError> {
    let Some(token) = state.token else { return Ok(()) };
    // The tables are recorded as they are, not what the SMMU may still cache: an unmap whose invalidation has not
    // completed would leave the next image (a running hand-off keeps the TLB) translating what the records say is
    // unmapped, and mapping over it again.
    if state.pending.outstanding() || state.has_unflushed() {
        return Err(PrepareError::PendingInvalidation { token });
    }
    let (Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. }) = &mut state.translation else {
        return Ok(());
    };
    let mut first = None;
    // Write-locked (the freeze): no map runs, so the tables' live-entry counts bound the walk.
    table.walk_exclusive(|m| {
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
    Ok(())
}
