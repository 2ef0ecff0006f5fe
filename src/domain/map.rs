//! Mapping and unmapping in a domain, with every invalidation the architecture requires issued by the domain
//! itself: unmap, deferred unmaps and their sync, trim, protect, a guest's own invalidations; and the memory no
//! mapping may reach.

use crate::hw::command::Command;
use crate::ids::DomainId;
use crate::mem::MemoryHooks;
use crate::mem::{Extent, FrameAllocator, Iova, PhysAddr};
use crate::pgtable::{Gather, Prot};
use crate::protected::ProtectError;
use crate::queue::cmdq::Batch;
use crate::smmu::{InvalidationError, TlbContext};
use crate::sync::Ordering;

use super::table::{StateMut, StateRef};
use super::{DomainError, DomainKind, DomainState, GuestInvalidation, Iommu, Translation, Wanted};

impl<A: FrameAllocator, const D: usize> Iommu<A, D> {
    /// The command that drops every TLB entry of the domain the caller holds (a nested domain's parent's VMID is
    /// the one it recorded: no second slot lock). `None` for a domain without a table (blocked, bypass): nothing
    /// of it is cached.
    pub(super) fn whole_invalidation_of(&self, state: &DomainState) -> Result<Option<Command>, DomainError> {
        Ok(Some(match &state.translation {
            Translation::Stage1 { el2: true, .. } => Command::TlbiEl2All,
            Translation::Stage1 { asid, .. } => Command::TlbiNhAsid { vmid: 0, asid: *asid },
            Translation::Stage2 { vmid, .. } => Command::TlbiS12Vmall { vmid: *vmid },
            Translation::Nested { vmid, .. } => Command::TlbiNhAll { vmid: *vmid },
            Translation::Fixed(_) => return Ok(None),
        }))
    }

    /// The TLB context of a stage-1 or stage-2 domain's table.
    pub(super) fn tlb_context(state: &DomainState) -> Option<TlbContext> {
        match &state.translation {
            Translation::Stage1 { el2: true, .. } => Some(TlbContext::Stage1El2),
            Translation::Stage1 { asid, .. } => Some(TlbContext::Stage1 { asid: *asid, vmid: 0 }),
            Translation::Stage2 { vmid, children, .. } => Some(TlbContext::Stage2 {
                vmid: *vmid,
                nested: *children > 0,
            }),
            Translation::Nested { .. } | Translation::Fixed(_) => None,
        }
    }

    /// Takes the table of a stage-1 or stage-2 domain out of its slot for an operation that also needs the
    /// command queue (put back by [`Iommu::put_table`]).
    pub(super) fn paging_domain(&self, domain: DomainId) -> Result<StateMut<'_>, DomainError> {
        let state = self.domains.get_mut(domain)?;
        if matches!(state.translation, Translation::Nested { .. } | Translation::Fixed(_)) {
            return Err(DomainError::WrongKind {
                domain,
                kind: state.kind(),
                wanted: Wanted::Stage1OrStage2,
            });
        }
        Ok(state)
    }

    /// Flushes `gather` for `domain` (see [`Iommu::flush`]), keeping it in the domain when the invalidation
    /// fails. A gather another table filled is refused before anything is issued.
    pub(super) fn flush_domain(
        &self,
        state: &mut DomainState,
        domain: DomainId,
        gather: Gather,
    ) -> Result<(), DomainError> {
        let core = &self.core;
        let context = Self::tlb_context(state).ok_or(DomainError::StaleDomain(domain))?;
        let table = match &mut state.translation {
            Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => table,
            Translation::Nested { .. } | Translation::Fixed(_) => return Err(DomainError::StaleDomain(domain)),
        };
        if !table.owns(&gather) {
            return Err(DomainError::ForeignGather { domain });
        }
        if !gather.is_empty()
            && let Err(error) = core.invalidate_gather(table.format().granule, &gather, context)
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
    pub(super) fn settle(&self, state: &mut DomainState, domain: DomainId) -> Result<(), DomainError> {
        state.take_failed();
        match state.unflushed.take() {
            Some(gather) => self.flush_domain(state, domain, gather),
            None => Ok(()),
        }
    }

    /// Refuses a change to `domain` while a prepared hand-off records it: from `prepare_handover` to
    /// `cancel_handover` (or the hand-off) a preserved domain is frozen, so that the next image restores exactly
    /// the recorded streams, tables and counts.
    pub(super) fn unfrozen(&self, domain: DomainId) -> Result<(), DomainError> {
        Self::unfrozen_state(&*self.domains.get(domain)?)
    }

    /// As [`Iommu::unfrozen`], for a domain the caller holds. Checked under the domain's lock: a hand-off is
    /// prepared (and the domain sealed) under its write lock, so an operation that saw it unfrozen completes before
    /// the records are written.
    /// Refuses to change the mappings of an identity domain: they are what it was created with.
    pub(super) fn mappable(s: &DomainState, domain: DomainId) -> Result<(), DomainError> {
        match s.identity {
            true => Err(DomainError::WrongKind {
                domain,
                kind: DomainKind::Identity,
                wanted: Wanted::ChangingMappings,
            }),
            false => Ok(()),
        }
    }

    pub(super) fn unfrozen_state(s: &DomainState) -> Result<(), DomainError> {
        // The token first: most domains are not preserved, and asking a memory whether it is sealed takes its lock
        // (this runs on every map and unmap).
        match s.token {
            Some(token) if s.memory.sealed() => Err(DomainError::HandoverPrepared { token }),
            _ => Ok(()),
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
    /// declared with [`Iommu::protect_memory`]: nothing changes then. [`DomainError::Invalidation`] when the
    /// domain's earlier failed invalidation, retried first, fails again: nothing is mapped and the gather stays
    /// for the next retry.
    ///
    /// **Concurrency.** Takes the domain's read lock only: maps (and single-page unmaps) of one domain run on
    /// every CPU at once through the page table's compare-and-swap paths. Of two overlapping maps one wins, the
    /// other fails with [`MapError::Overlap`](crate::pgtable::MapError::Overlap) and leaves nothing of its own
    /// behind (leaves it installed before it lost are removed and invalidated again), never a torn table.
    pub fn map(&self, domain: DomainId, iova: Iova, pa: PhysAddr, size: u64, prot: Prot) -> Result<(), DomainError> {
        let state = self.settled_for_reading(domain)?;
        Self::mappable(&state, domain)?;
        Self::unfrozen_state(&state)?;
        // No device may be given the handover region or the driver's own tables and queues.
        if let Some(protected) = self.domains.protected.overlapping(pa.0, size) {
            return Err(DomainError::ProtectedOutput {
                pa: pa.0,
                size,
                protected,
            });
        }
        state.pending.check(iova.0, size)?;
        let table = match &state.translation {
            Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => table,
            Translation::Nested { .. } | Translation::Fixed(_) => return Err(DomainError::StaleDomain(domain)),
        };
        let mut undone = Gather::default();
        let mapped = table.map_shared(iova, pa, size, prot, &mut undone);
        if !undone.is_empty() {
            // Lost a race part-way: the leaves it had installed are gone again, and the SMMU may have cached them.
            self.flush_shared(state, domain, undone)?;
        }
        mapped.map_err(DomainError::Map)
    }

    /// `domain`'s state read-locked, after retrying (under the write lock) an invalidation that failed before.
    fn settled_for_reading(&self, domain: DomainId) -> Result<StateRef<'_>, DomainError> {
        loop {
            let state = self.domains.get(domain)?;
            if matches!(state.translation, Translation::Nested { .. } | Translation::Fixed(_)) {
                return Err(DomainError::WrongKind {
                    domain,
                    kind: state.kind(),
                    wanted: Wanted::Stage1OrStage2,
                });
            }
            if !state.has_unflushed() {
                return Ok(state);
            }
            drop(state);
            let mut state = self.paging_domain(domain)?;
            // Re-acquired (the same domain: `paging_domain` checks the generation): a hand-off may have frozen it
            // meanwhile, and a settle frees the tables of the gather it flushes.
            Self::unfrozen_state(&state)?;
            self.settle(&mut state, domain)?;
        }
    }

    /// Invalidates a gather the concurrent paths filled (leaves only: they unlink no table) under the domain's
    /// read lock; when that fails, the gather is published in the domain (`failed`) before the read lock is
    /// dropped, so every later map and unmap settles it first (a map over its pages fails while it fails).
    fn flush_shared(&self, state: StateRef<'_>, domain: DomainId, gather: Gather) -> Result<(), DomainError> {
        let context = Self::tlb_context(&state).ok_or(DomainError::StaleDomain(domain))?;
        let granule = match &state.translation {
            Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => table.format().granule,
            Translation::Nested { .. } | Translation::Fixed(_) => return Err(DomainError::StaleDomain(domain)),
        };
        debug_assert_eq!(gather.freed_tables(), 0, "the concurrent paths unlink no table");
        let Err(error) = self.core.invalidate_gather(granule, &gather, context) else {
            // Nothing to release: the gather holds no table.
            return Ok(());
        };
        // Published under the read lock (no re-acquire, in which a map could pass, and which a hand-off could
        // freeze): a hand-off waits for this lock, so it finds the failure and refuses to record the domain.
        if let Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } = &state.translation {
            let mut failed = state.failed.lock();
            let gather = match failed.take() {
                Some(mut pending) => {
                    table.merge_owned(&mut pending, gather);
                    pending
                }
                None => gather,
            };
            *failed = Some(gather);
            // Release: a map that sees it sees the gather (and takes the write lock to settle it).
            state.failed_hint.store(true, Ordering::Release);
        }
        drop(state);
        Err(DomainError::Invalidation(InvalidationError::Queue(error)))
    }

    /// A single-page unmap through the concurrent path under the domain's read lock: `None` when the request
    /// needs the exclusive path (a range, a block to split, a failed invalidation to retry, a nested domain).
    fn unmap_page_concurrently(&self, domain: DomainId, iova: u64, size: u64) -> Result<Option<u64>, DomainError> {
        let state = self.domains.get(domain)?;
        let table = match &state.translation {
            Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => table,
            Translation::Nested { .. } | Translation::Fixed(_) => return Ok(None),
        };
        if state.has_unflushed() || size != table.format().granule.size() {
            return Ok(None);
        }
        Self::mappable(&state, domain)?;
        Self::unfrozen_state(&state)?;
        let mut gather = Gather::default();
        let bytes = match table.unmap_page_shared(Iova(iova), &mut gather) {
            Ok(bytes) => bytes,
            Err(crate::pgtable::MapError::NeedsExclusive { .. }) => return Ok(None),
            Err(e) => return Err(DomainError::Map(e)),
        };
        let trim_due = table.trim_due();
        if !gather.is_empty() {
            self.flush_shared(state, domain, gather)?;
        } else {
            drop(state);
        }
        if trim_due {
            // Emptied tables past the lazy-free limit: trimmed exclusively (a trim widens the invalidation).
            let mut state = self.paging_domain(domain)?;
            // Re-acquired: a hand-off that froze the domain meanwhile recorded its tables, the emptied ones too, so
            // they stay (the page itself was unmapped before the freeze, under the read lock, and is recorded so).
            if Self::unfrozen_state(&state).is_err() {
                return Ok(Some(bytes));
            }
            let mut trimmed = Gather::default();
            if let Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } = &mut state.translation
                && table.trim_due()
            {
                table.trim(&mut trimmed)?;
            }
            if !trimmed.is_empty() {
                self.flush_domain(&mut state, domain, trimmed)?;
            }
        }
        Ok(Some(bytes))
    }

    /// Unmaps `[iova, iova + size)` and invalidates what changed (one CMD_SYNC; for a stage-2 parent of nested
    /// domains, their combined entries too). Returns the bytes that were mapped.
    ///
    /// # Errors
    /// As [`Iommu::map`] (nothing changes), and [`DomainError::Invalidation`] when the invalidation failed:
    /// the entries are cleared and the unlinked tables kept until the domain's next operation flushes them again.
    ///
    /// **Concurrency.** A single page (one granule) is unmapped under the domain's read lock, concurrently with
    /// maps and other single-page unmaps (of two unmaps of one page exactly one removes it; the other returns 0);
    /// a range, a page inside a block (split first) and a trim take the write lock.
    pub fn unmap(&self, domain: DomainId, iova: Iova, size: u64) -> Result<u64, DomainError> {
        if let Some(bytes) = self.unmap_page_concurrently(domain, iova.0, size)? {
            return Ok(bytes);
        }
        let mut state = self.paging_domain(domain)?;
        Self::mappable(&state, domain)?;
        Self::unfrozen_state(&state)?;
        self.settle(&mut state, domain)?;
        let mut gather = Gather::default();
        let bytes = match &mut state.translation {
            Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => {
                table.unmap(iova, size, &mut gather)?
            }
            Translation::Nested { .. } | Translation::Fixed(_) => return Err(DomainError::StaleDomain(domain)),
        };
        self.flush_domain(&mut state, domain, gather)?;
        Ok(bytes)
    }

    /// The first half of [`Iommu::unmap`], for callers that batch invalidations (Linux's unmap_fast +
    /// iotlb_sync): clears the entries of `[iova, iova + size)` and collects what changed into `gather`, issuing
    /// nothing for them. Returns the bytes that were mapped. Several calls may collect into one gather; the first
    /// ties it to this domain.
    ///
    /// **What a pending gather allows.** Until [`Iommu::sync_domain`] has completed for it, the SMMU may
    /// still translate through what the unmap removed: the TLB may hold the old translations, and a walk cache
    /// may name a table the unmap unlinked, whose leaves still hold the old output addresses. So, until then:
    /// - the caller must not reuse the memory that was mapped there (a DMA may still reach it);
    /// - [`Iommu::map`] refuses any range that overlaps the gather's span (the unmapped range, widened to
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
    /// reach them) and leaves its span refused for maps until [`Iommu::invalidate_domain`], which
    /// invalidates the whole domain and clears the span of every gather outstanding then, or until the domain
    /// is freed (a gather outstanding then can no longer be synced: its tables leak). A live update records the
    /// domain's tables as they are and not its pending gathers: sync them before preparing a hand-off.
    ///
    /// # Errors
    /// As [`Iommu::map`]; [`DomainError::ForeignGather`] for a gather another domain (or table) filled.
    /// Nothing changes then. [`DomainError::Invalidation`] when the flush of a lazy trim failed: the unmap is done
    /// and in `gather` (sync it as usual), and the trim's gather is kept in the domain and flushed again by its
    /// next operation.
    pub fn unmap_deferred(
        &self,
        domain: DomainId,
        iova: Iova,
        size: u64,
        gather: &mut Gather,
    ) -> Result<u64, DomainError> {
        let mut state = self.paging_domain(domain)?;
        Self::mappable(&state, domain)?;
        Self::unfrozen_state(&state)?;
        self.settle(&mut state, domain)?;
        let state = &mut *state;
        let table = match &mut state.translation {
            Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => table,
            Translation::Nested { .. } | Translation::Fixed(_) => return Err(DomainError::StaleDomain(domain)),
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
            self.flush_domain(state, domain, trimmed)?;
        }
        Ok(bytes)
    }

    /// The second half: invalidates what `gather` collected for `domain` (one CMD_SYNC) and only then frees the
    /// tables it unlinked. `gather` is left empty, ready for reuse with any domain. Once the last of the domain's
    /// pending gathers is synced, maps over their span are allowed again (see [`Iommu::unmap_deferred`]).
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`], [`DomainError::WrongKind`]; [`DomainError::ForeignGather`] for a gather
    /// another domain (or table) filled: nothing is issued or freed, and `gather` is left as it was.
    /// [`DomainError::Invalidation`] when the invalidation failed: the gather is taken into the domain and flushed
    /// again by its next operation (which fails while that flush fails, so no map can race it).
    pub fn sync_domain(&self, domain: DomainId, gather: &mut Gather) -> Result<(), DomainError> {
        let mut state = self.paging_domain(domain)?;
        let owned = match &state.translation {
            Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => table.owns(gather),
            Translation::Nested { .. } | Translation::Fixed(_) => false,
        };
        if !owned {
            return Err(DomainError::ForeignGather { domain });
        }
        let gather = core::mem::take(gather);
        state.pending.remove(&gather);
        self.flush_domain(&mut state, domain, gather)
    }

    /// Drops every TLB and walk-cache entry of a stage-1 or stage-2 domain (TLBI_NH_ASID, TLBI_EL2_ALL or
    /// TLBI_S12_VMALL, then CMD_SYNC) and so ends what its deferred unmaps left pending: maps over their span are
    /// allowed again. The way out for a gather dropped without [`Iommu::sync_domain`]. Gathers still held
    /// keep their tables; syncing them later invalidates their span once more and frees the tables.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`], [`DomainError::WrongKind`] for a nested domain; [`DomainError::Invalidation`]
    /// when the invalidation (or the retry of an earlier failed one) failed: the span stays refused.
    pub fn invalidate_domain(&self, domain: DomainId) -> Result<(), DomainError> {
        let mut state = self.paging_domain(domain)?;
        self.settle(&mut state, domain)?;
        let command = self.whole_invalidation_of(&state)?;
        let mut batch = Batch::new();
        if let Some(command) = command {
            batch.push(&command)?;
        }
        self.core.submit(&batch)?;
        state.pending.clear();
        Ok(())
    }

    /// Unlinks the tables that single-page unmaps left empty (they stay linked until a trim, so the next DMA
    /// nearby reuses them), invalidates, and frees them. Returns how many were freed.
    ///
    /// # Errors
    /// As [`Iommu::sync_domain`].
    pub fn trim_domain(&self, domain: DomainId) -> Result<u32, DomainError> {
        let mut state = self.paging_domain(domain)?;
        Self::mappable(&state, domain)?;
        Self::unfrozen_state(&state)?;
        self.settle(&mut state, domain)?;
        let mut gather = Gather::default();
        let trimmed = match &mut state.translation {
            Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => table.trim(&mut gather)?,
            Translation::Nested { .. } | Translation::Fixed(_) => return Err(DomainError::StaleDomain(domain)),
        };
        self.flush_domain(&mut state, domain, gather)?;
        Ok(trimmed)
    }

    /// Changes the permissions of what is mapped in `[iova, iova + size)` to `prot` (never the memory type) and
    /// invalidates what changed. Returns the bytes changed.
    ///
    /// # Errors
    /// As [`Iommu::unmap`].
    pub fn protect(&self, domain: DomainId, iova: Iova, size: u64, prot: Prot) -> Result<u64, DomainError> {
        let mut state = self.paging_domain(domain)?;
        Self::mappable(&state, domain)?;
        Self::unfrozen_state(&state)?;
        self.settle(&mut state, domain)?;
        let mut gather = Gather::default();
        let bytes = match &mut state.translation {
            Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => {
                table.protect(iova, size, prot, &mut gather)?
            }
            Translation::Nested { .. } | Translation::Fixed(_) => return Err(DomainError::StaleDomain(domain)),
        };
        self.flush_domain(&mut state, domain, gather)?;
        Ok(bytes)
    }

    /// The output address `iova` translates to in a stage-1 or stage-2 domain, or `None` where nothing is mapped.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`], [`DomainError::WrongKind`] for a nested domain.
    pub fn iova_to_phys(&self, domain: DomainId, iova: Iova) -> Result<Option<PhysAddr>, DomainError> {
        Ok(self.domain_table(domain)?.iova_to_phys(iova))
    }

    /// Issues a guest's stage-1 invalidation for a nested domain (under its parent's VMID), with a CMD_SYNC. The CD
    /// forms ([`GuestInvalidation::Cd`], [`GuestInvalidation::CdAll`]) go to every stream attached to the domain.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`], [`DomainError::WrongKind`] for a domain that is not nested,
    /// [`DomainError::BadSubstream`] for a CD beyond the guest's CD table (2^S1CDMax entries): nothing is issued
    /// then. [`DomainError::Invalidation`].
    pub fn invalidate_guest(&self, domain: DomainId, what: GuestInvalidation) -> Result<(), DomainError> {
        let state = self.domains.get(domain)?;
        // The parent's VMID as the nested domain recorded it: its parent's lock is never taken under its own.
        let Translation::Nested { guest, vmid, .. } = state.translation else {
            return Err(DomainError::WrongKind {
                domain,
                kind: state.kind(),
                wanted: Wanted::Nested,
            });
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
            GuestInvalidation::Cd { .. } | GuestInvalidation::CdAll => {
                // One command a stream (a nested domain's are whole streams), a batch at a time: a domain may
                // hold more streams than a batch does. Each batch completes (CMD_SYNC) before the next is built.
                for (sid, _) in self.domains.attachments(&state) {
                    if batch.is_full() {
                        self.core.submit(&batch)?;
                        batch = Batch::new();
                    }
                    batch.push(&match what {
                        GuestInvalidation::Cd { ssid, leaf } => Command::CfgiCd { sid, ssid, leaf },
                        _ => Command::CfgiCdAll { sid },
                    })?;
                }
            }
        }
        self.core.submit(&batch)?;
        Ok(())
    }

    /// Declares `extent` (physical) as memory no device may be given: the handover region, the memory the
    /// driver's allocator hands out for the stream table, CD tables, page tables and queues, the image itself.
    /// From then on [`Iommu::map`] refuses any output range that shares a byte with it
    /// (`DomainError::ProtectedOutput`), and a restore refuses preserved tables whose leaves reach it. Declare
    /// them before mapping anything: mappings made earlier are not re-examined (a restore and
    /// [`Iommu::prepare_handover`] examine every preserved leaf). [`Iommu::restore_handover`] declares
    /// its pool's region by itself. Declaring an extent that one already declared holds changes nothing.
    ///
    /// # Errors
    /// [`ProtectError::BadExtent`] for an empty or wrapping extent, [`ProtectError::Full`] when
    /// [`MAX_PROTECTED`](crate::protected::MAX_PROTECTED) are declared already; nothing changes then.
    pub fn protect_memory(&self, extent: Extent) -> Result<(), ProtectError> {
        self.domains.protected.update(|list| list.add(extent))
    }

    /// The extents declared with [`Iommu::protect_memory`] (and by a restore, its pool's region): a copy.
    pub fn protected_memory(&self) -> heapless::Vec<Extent, { crate::protected::MAX_PROTECTED }> {
        self.domains.protected.snapshot().extents().iter().copied().collect()
    }
}
