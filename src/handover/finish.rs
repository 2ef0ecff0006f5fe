//! After a live update's restore: [`Iommu::retrieve`] hands out the rebuilt domains by token, and
//! [`Iommu::finish_handover`] frees whatever nobody claimed and re-arms the region.

use super::format;
use super::pool::{HandoverPool, METADATA_BYTES, PoolError};
use super::{InstanceRecords, MAX_INSTANCES, clean_to_memory};
use crate::domain::{DomainError, DomainId, Iommu, Translation};
use crate::mem::FrameAllocator;

/// What [`Iommu::finish_handover`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FinishReport {
    /// Restored domains nobody retrieved, freed (their streams aborting, their memory back in the pool).
    pub unclaimed: u32,
}

/// Why [`Iommu::finish_handover`] did not finish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
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

impl<A: FrameAllocator, const D: usize> Iommu<A, D> {
    /// The domain restored under `token`, handed to the caller (once): it is then an ordinary live domain (preserve
    /// it again for the next hand-off).
    ///
    /// # Errors
    /// [`DomainError::UnknownToken`] when no restored domain waits under `token` (never preserved, unpreserved
    /// before the hand-off, already retrieved, or freed by [`Iommu::finish_handover`]).
    pub fn retrieve(&self, token: u64) -> Result<DomainId, DomainError> {
        self.domains
            .book
            .lock()
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
    pub fn finish_handover(&self, pool: &HandoverPool, register_base: u64) -> Result<FinishReport, FinishError> {
        if let Some(generation) = self.domains.prepared_generation() {
            return Err(FinishError::HandoverPrepared { generation });
        }
        // An SMMU adopted running and never restored: the previous image's STEs still walk memory the re-armed
        // region stops naming (the pool hands it out again): they abort, and every cached entry goes, first.
        if self.core.inherited_stes() {
            self.abort_unrestored_streams()
                .map_err(|e| FinishError::Domain(DomainError::Attach(e)))?;
        }
        let mut report = FinishReport::default();
        // Nested domains before their parents.
        for nested_pass in [true, false] {
            // Each step below takes the bookkeeping itself: the next waiting domain (in slot order, after the last
            // one looked at) is found under it, then it is let go.
            let mut after: Option<u16> = None;
            loop {
                let next = {
                    let book = self.domains.book.lock();
                    book.restored
                        .iter()
                        .filter(|(_, id)| after.is_none_or(|a| id.index() > a))
                        .filter(|(_, id)| {
                            self.domains
                                .get(**id)
                                .is_ok_and(|s| matches!(s.translation, Translation::Nested { .. }) == nested_pass)
                        })
                        .map(|(t, id)| (*t, *id))
                        .min_by_key(|(_, id)| id.index())
                };
                let Some((token, id)) = next else { break };
                after = Some(id.index());
                // A parent whose nested domain was retrieved stays: the live nested domain needs its stage 2.
                if self
                    .domains
                    .get(id)
                    .is_ok_and(|s| matches!(s.translation, Translation::Stage2 { children, .. } if children > 0))
                {
                    continue;
                }
                // Substreams first, then whole streams, one at a time (each detach changes the list; one that
                // fails ends the finish, so none is looked at twice).
                for substreams in [true, false] {
                    let next = || {
                        let state = self.domains.get(id).ok()?;
                        self.domains
                            .attachments(&state)
                            .find(|(_, ssid)| (*ssid != 0) == substreams)
                    };
                    while let Some((sid, ssid)) = next() {
                        match substreams {
                            true => self.detach_substream(sid, ssid)?,
                            false => self.detach(sid)?,
                        }
                    }
                }
                self.free_domain(id)?;
                self.book().restored.swap_remove(&token);
                report.unclaimed += 1;
            }
        }
        // Re-arm: the region without this SMMU's records.
        let _ = rearm_without(pool, register_base);
        self.book().restored_generation = None;
        Ok(report)
    }
}

/// Rewrites the region without the records of the SMMU at `register_base` (others' stay; a region that does not
/// validate is re-armed empty), under the next generation, cleaned to memory.
pub(super) fn rearm_without(pool: &HandoverPool, register_base: u64) -> Result<(), PoolError> {
    let region = pool.metadata_extent()?;
    let pool_extent = pool.pool()?;
    let mut guard = pool.lock_metadata()?;
    let (bytes, staging, scratch) = guard.with_staging();
    // Encoded into the staging buffer from views of the old region, then copied over it.
    let encoded = {
        let mut keep: heapless::Vec<InstanceRecords<'_>, MAX_INSTANCES> = heapless::Vec::new();
        let mut generation = 0;
        if let Ok(previous) = format::decode(bytes, pool_extent, scratch) {
            generation = previous.generation;
            for other in previous
                .instances
                .into_iter()
                .filter(|i| i.identity.base != register_base)
            {
                let _ = keep.push(other);
            }
        }
        format::encode(&keep, generation.wrapping_add(1), region, pool_extent, staging)
    };
    match encoded {
        Ok(written) => {
            bytes[..written].copy_from_slice(&staging[..written]);
            clean_to_memory(bytes.as_ptr(), written);
        }
        Err(_) => {
            // Cannot happen (fewer records than were decoded); were it to, no record of this SMMU may survive.
            bytes[..8].fill(0);
            clean_to_memory(bytes.as_ptr(), 64);
        }
    }
    // The frames only this SMMU's records named (and nobody adopted) are free again; the others' stay named.
    pool.rename_recorded(bytes, scratch);
    Ok(())
}

/// The metadata area's size, for callers that dump it.
pub const REGION_METADATA_BYTES: u64 = METADATA_BYTES;
