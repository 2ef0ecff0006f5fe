//! The domain table: fixed slots with generations, the live domains' state, the streams attached to them, the
//! token index of preserved domains, and the state of a hand-off prepared or restored. What each lock guards and
//! the order they are taken in are in the [module docs](super#concurrency).

use super::attachments::{AttachmentNodes, Attachments, FreeNodes};
use super::storage::{Index, Storage, TokenIndex};
use crate::ctx::CdTable;
use crate::hw::cd::Cd;
use crate::hw::ste::Stage2Config;
use crate::ids::DomainId;
use crate::mem::{AllocError, FrameAllocator};
use crate::pgtable::{Gather, IoPageTable};
use crate::protected::SharedProtected;
use crate::sync::{AtomicBool, AtomicU64, Ordering};

use super::{Capacity, DomainError, DomainKind, DomainMemory, FaultReport, GuestStage1, MAX_SUBSTREAMS_PER_STREAM};

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
        /// The parent's VMID and stage-2 configuration, recorded at creation (a parent does not change while it
        /// has nested domains): what the nested domain's STE and invalidations need of it, read without the
        /// parent's lock (a second slot lock outside the lock order).
        vmid: u16,
        stage2: Stage2Config,
    },
    /// No table: every stream attached aborts, or bypasses.
    Fixed(Fixed),
}

/// The domains without a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fixed {
    /// Every transaction aborts (STE.Config = abort).
    Blocked,
    /// Every transaction bypasses translation (STE.Config = bypass): the devices reach all memory.
    Bypass,
}

/// One live domain.
pub(crate) struct DomainState {
    pub(crate) translation: Translation,
    pub(crate) memory: DomainMemory,
    /// (StreamID, SubstreamID) pairs attached, SubstreamID 0 for the whole stream: a list through
    /// [`Domains::nodes`], changed under the bookkeeping and this domain's write lock.
    pub(crate) attachments: Attachments,
    /// A gather whose invalidation failed: flushed again before the next operation.
    pub(crate) unflushed: Option<Gather>,
    /// A gather of the concurrent paths (leaves only) whose invalidation failed, published under the read lock
    /// before it is dropped (so no map that comes after can pass over its pages while their old translations may
    /// still be cached); moved into `unflushed` by the next exclusive operation. A leaf lock.
    pub(crate) failed: spin::Mutex<Option<Gather>>,
    /// Whether `failed` holds a gather: what map and unmap check under the read lock (no lock taken).
    pub(crate) failed_hint: AtomicBool,
    /// The deferred unmaps whose gathers are not synced yet: `map` refuses their span.
    pub(crate) pending: PendingUnmaps,
    /// The token the domain is preserved under.
    pub(crate) token: Option<u64>,
    /// An identity domain: its table maps the RAM it was created with 1:1, and nothing changes it.
    pub(crate) identity: bool,
}

impl DomainState {
    pub(crate) fn new(translation: Translation, memory: DomainMemory) -> Self {
        DomainState {
            translation,
            memory,
            attachments: Attachments::EMPTY,
            unflushed: None,
            failed: spin::Mutex::new(None),
            failed_hint: AtomicBool::new(false),
            pending: PendingUnmaps::NONE,
            token: None,
            identity: false,
        }
    }

    /// Whether an invalidation of the domain failed and waits to be retried (`unflushed`, or `failed` from the
    /// concurrent paths).
    pub(crate) fn has_unflushed(&self) -> bool {
        // Acquire: pairs with the Release that published `failed`.
        self.unflushed.is_some() || self.failed_hint.load(Ordering::Acquire)
    }

    /// Moves a gather the concurrent paths published into `unflushed` (the caller holds the write lock).
    pub(crate) fn take_failed(&mut self) {
        let Some(failed) = self.failed.get_mut().take() else {
            return;
        };
        // Relaxed: the write lock is held (no reader looks).
        self.failed_hint.store(false, Ordering::Relaxed);
        let gather = match (self.unflushed.take(), &self.translation) {
            (Some(mut pending), Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. }) => {
                table.merge_owned(&mut pending, failed);
                pending
            }
            _ => failed,
        };
        self.unflushed = Some(gather);
    }

    /// Whether this is a stage-1 domain of the EL2 regime.
    pub(crate) fn is_el2(&self) -> bool {
        matches!(self.translation, Translation::Stage1 { el2: true, .. })
    }

    pub(crate) fn kind(&self) -> DomainKind {
        match self.translation {
            _ if self.identity => DomainKind::Identity,
            Translation::Stage1 { .. } => DomainKind::Stage1,
            Translation::Stage2 { .. } => DomainKind::Stage2,
            Translation::Nested { .. } => DomainKind::Nested,
            Translation::Fixed(Fixed::Blocked) => DomainKind::Blocked,
            Translation::Fixed(Fixed::Bypass) => DomainKind::Bypass,
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
    pub(crate) const NONE: PendingUnmaps = PendingUnmaps {
        gathers: 0,
        start: 0,
        end: 0,
        epoch: 1,
    };

    /// `gather` was just filled by a deferred unmap: counted once per epoch, its span added.
    pub(crate) fn add(&mut self, gather: &mut Gather) {
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
    pub(crate) fn remove(&mut self, gather: &Gather) {
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
    pub(crate) fn clear(&mut self) {
        *self = PendingUnmaps {
            epoch: self.epoch.wrapping_add(1).max(1),
            ..PendingUnmaps::NONE
        };
    }

    /// Refuses `[iova, iova + size)` where it overlaps the pending span.
    #[inline]
    pub(crate) fn check(&self, iova: u64, size: u64) -> Result<(), DomainError> {
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

/// A slot of the domain table, on cache lines of its own (128 bytes: a line and its adjacent-line prefetch), so
/// that the lock words CPUs write to map in different domains never share a line.
#[repr(align(128))]
pub(crate) struct Slot {
    /// The generation a handle must name. Changed only under `state`'s write lock (when the domain goes), read
    /// under it by every operation and without it (`Acquire`) by a fault being filed, which then files under
    /// `faults`: the domain that goes clears `faults` after the change (`Release`), so a fault filed for it either
    /// lands before the clear or sees the new generation.
    pub(crate) generation: AtomicU64,
    /// The domain: map and unmap take it for reading (step by step, the page table's concurrent paths), the
    /// structural operations for writing, always through [`Slot::write_state`] (a waiting writer turns new readers
    /// away).
    pub(crate) state: spin::RwLock<Option<DomainState>>,
    /// The faults filed for the domain: a leaf lock (nothing is taken while holding it), only tried from interrupt
    /// context.
    pub(crate) faults: crate::sync::Mutex<FaultReport>,
}

impl Slot {
    /// The slot's write lock, with waiting writers first: the lock's `upgradeable_read` sets a bit that turns new
    /// readers away (spin's `write` does not, so a domain mapped in a loop on other CPUs could keep a structural
    /// operation, and `prepare_handover` holding the bookkeeping behind it, waiting for good), then `upgrade` waits
    /// for the readers inside to leave.
    pub(crate) fn write_state(&self) -> spin::RwLockWriteGuard<'_, Option<DomainState>> {
        self.state.upgradeable_read().upgrade()
    }
}

/// A live domain, read-locked.
pub(crate) struct StateRef<'a>(spin::RwLockReadGuard<'a, Option<DomainState>>);

impl core::ops::Deref for StateRef<'_> {
    type Target = DomainState;
    fn deref(&self) -> &DomainState {
        // Made only over a slot holding a domain, which cannot change while the guard lives.
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("a StateRef is made over a live domain"))
    }
}

/// A live domain, write-locked.
pub(crate) struct StateMut<'a>(spin::RwLockWriteGuard<'a, Option<DomainState>>);

impl core::ops::Deref for StateMut<'_> {
    type Target = DomainState;
    fn deref(&self) -> &DomainState {
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("a StateMut is made over a live domain"))
    }
}

impl core::ops::DerefMut for StateMut<'_> {
    fn deref_mut(&mut self) -> &mut DomainState {
        self.0
            .as_mut()
            .unwrap_or_else(|| unreachable!("a StateMut is made over a live domain"))
    }
}

/// A stream attached to a domain.
pub(crate) struct StreamRecord {
    pub(crate) sid: u32,
    pub(crate) domain: DomainId,
    /// The stream's CD table (stage-1 domains): CD 0 is the domain's, others are substreams'.
    pub(crate) cd_table: Option<CdTable>,
    pub(crate) substreams: heapless::Vec<(u32, DomainId), MAX_SUBSTREAMS_PER_STREAM>,
    /// An attach or detach of the stream (or of one of its substreams) writes its STE or CD table outside the
    /// bookkeeping: the record (routing and ownership) stays, `cd_table` may be out with the writer, and every
    /// other operation on the stream waits until the writer settles it (`Iommu::book_settled`).
    pub(crate) busy: bool,
}

/// A prepared hand-off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Prepared {
    /// The records' generation.
    pub(crate) generation: u64,
    /// The SMMU is left running across it (its own structures are in a handover memory): the stream configuration
    /// is frozen until it is cancelled.
    pub(crate) running: bool,
}

/// The bookkeeping shared by every domain, behind one lock (the first in the lock order): the free slots, the
/// attached streams (routing and ownership, their CD tables), the token index, the restored domains, the EL2 rule's
/// debt and the restored hand-off's generation. Held by structural operations (create's slot reservation, attach,
/// detach, free, preserve, the hand-off), never by map and unmap.
pub(crate) struct Book<const D: usize> {
    /// The free slots, as a stack: creating and freeing a domain costs the same however full the table is.
    free: heapless::Vec<u16, D>,
    /// The streams attached to domains (out of line: room for `max(InitOptions::attached_streams, D)`).
    pub(crate) streams: AttachedStreams,
    /// The free nodes of the domains' attachment lists ([`Domains::nodes`]).
    pub(crate) free_nodes: FreeNodes,
    /// Preserved domains by token: collisions are found in O(1), never by a scan (out of line, room for every
    /// domain).
    pub(crate) tokens: TokenIndex,
    /// Domains a restore rebuilt, by token, until retrieved or freed by `finish_handover` (with their memory).
    pub(crate) restored: TokenIndex,
    /// An EL2 stage-1 domain's last detach could not drop its TLB entries (TLBI_EL2_ALL failed): they may still be
    /// cached, and would match any EL2 context, so the next EL2 domain to be attached drops them first.
    pub(crate) el2_stale: bool,
    /// The generation of the records a restore rebuilt, until `finish_handover` ends that hand-off.
    pub(crate) restored_generation: Option<u64>,
}

impl<const D: usize> Book<D> {
    pub(crate) fn stream(&self, sid: u32) -> Option<usize> {
        self.streams.position_of(sid)
    }

    /// Fails with [`DomainError::NoDomainSlot`] when no slot is free.
    pub(crate) fn check_free_slot(&self) -> Result<(), DomainError> {
        match self.free.is_empty() {
            false => Ok(()),
            true => Err(DomainError::NoDomainSlot { capacity: D }),
        }
    }

    /// Slots free now.
    pub(crate) fn free_slots(&self) -> usize {
        self.free.len()
    }
}

/// A prepared hand-off, or none: `Domains::prepared`.
pub(crate) type PreparedState = Option<Prepared>;

/// The driver's domain bookkeeping: the slots (each behind its own lock), the shared bookkeeping ([`Book`]), the
/// hand-off state, protected memory and the faults of unattached streams.
pub(crate) struct Domains<const D: usize> {
    /// The `D` slots, out of line (see [`super::storage`]).
    pub(crate) slots: Storage<Slot>,
    /// The nodes of every domain's attachment list (see [`super::attachments`]): room for every stream that can be
    /// attached and each of its substreams.
    pub(crate) nodes: AttachmentNodes,
    /// The allocator the out-of-line bookkeeping came from, when not the SMMU's ([`crate::InitOptions::bookkeeping`]).
    pub(crate) bookkeeping: Option<&'static (dyn FrameAllocator + Sync)>,
    pub(crate) book: spin::Mutex<Book<D>>,
    /// The hand-off `prepare_handover` prepared, until `cancel_handover`: no domain can be preserved or
    /// unpreserved meanwhile (see `crate::handover`), and with the SMMU left running no stream may start
    /// translating or bypassing.
    pub(crate) prepared: spin::Mutex<PreparedState>,
    /// Memory no mapping may reach (`Iommu::protect_memory`): read by every map.
    pub(crate) protected: SharedProtected,
    /// The faults of streams no domain holds: a leaf lock, as a slot's.
    pub(crate) unattached_faults: crate::sync::Mutex<FaultReport>,
    /// Interrupt context failed to take `book` (set, then tried once more): the holder drains the event queue
    /// before it unlocks (`BookGuard`'s drop), so no record announced by an interrupt waits for the next one.
    pub(crate) book_wanted: AtomicBool,
    /// Interrupt context (holding `book`) failed to take a fault report's lock: the thread that holds it drains
    /// once it has unlocked (the report readers, which hold nothing else).
    pub(crate) report_wanted: AtomicBool,
}

impl<const D: usize> Domains<D> {
    /// The bookkeeping for `D` domains and `max(streams, D)` attached streams, out of line in blocks of
    /// `allocator` (or of `bookkeeping`, when given), given back by [`Domains::release`].
    ///
    /// # Errors
    /// The allocator's (what was allocated before goes back).
    pub(crate) fn new(
        smmu_allocator: &dyn FrameAllocator,
        bookkeeping: Option<&'static (dyn FrameAllocator + Sync)>,
        streams: usize,
    ) -> Result<Self, AllocError> {
        const { assert!(D <= u16::MAX as usize, "a domain's slot index is 16 bits") };
        let allocator = match bookkeeping {
            Some(own) => own as &dyn FrameAllocator,
            None => smmu_allocator,
        };
        let streams = streams.max(D);
        let mut domains = Domains {
            slots: Storage::empty(),
            nodes: AttachmentNodes::empty(),
            bookkeeping,
            book: spin::Mutex::new(Book {
                // Lowest index on top, so the first domain gets slot 0.
                free: (0..D as u16).rev().collect(),
                streams: AttachedStreams::empty(),
                free_nodes: FreeNodes::NONE,
                tokens: TokenIndex::empty(),
                restored: TokenIndex::empty(),
                el2_stale: false,
                restored_generation: None,
            }),
            prepared: spin::Mutex::new(None),
            protected: SharedProtected::new(),
            unattached_faults: crate::sync::Mutex::new(FaultReport::default()),
            book_wanted: AtomicBool::new(false),
            report_wanted: AtomicBool::new(false),
        };
        let filled = (|| {
            domains.slots = Storage::new(allocator, D, |_| Slot {
                generation: AtomicU64::new(0),
                state: spin::RwLock::new(None),
                faults: crate::sync::Mutex::new(FaultReport::default()),
            })?;
            // Each stream attached whole and each of its substreams: a node each.
            let attachments = streams
                .checked_mul(1 + MAX_SUBSTREAMS_PER_STREAM)
                .ok_or(AllocError::BadRequest {
                    size: usize::MAX,
                    align: 4,
                })?;
            let (nodes, free_nodes) = AttachmentNodes::new(allocator, attachments)?;
            domains.nodes = nodes;
            let book = domains.book.get_mut();
            book.free_nodes = free_nodes;
            book.streams = AttachedStreams::new(allocator, streams)?;
            book.tokens = TokenIndex::new(allocator, D)?;
            book.restored = TokenIndex::new(allocator, D)?;
            Ok(())
        })();
        match filled {
            Ok(()) => Ok(domains),
            Err(e) => {
                // SAFETY: every block came from the allocator `release` picks for `smmu_allocator` (empty parts
                // have none).
                unsafe { domains.release(smmu_allocator) };
                Err(e)
            }
        }
    }

    /// Drops every domain (their tables back to their memory), then gives the out-of-line bookkeeping back to
    /// its allocator (its own, or `allocator`).
    ///
    /// # Safety
    /// `allocator` must be the one [`Domains::new`] was given.
    pub(crate) unsafe fn release(self, allocator: &dyn FrameAllocator) {
        let Domains {
            slots,
            nodes,
            book,
            bookkeeping,
            ..
        } = self;
        let allocator = match bookkeeping {
            Some(own) => own as &dyn FrameAllocator,
            None => allocator,
        };
        let Book {
            tokens,
            restored,
            streams,
            ..
        } = book.into_inner();
        // SAFETY: all of them came from `allocator` (the caller's guarantee).
        unsafe {
            nodes.release(allocator);
            streams.release(allocator);
            slots.release(allocator);
            tokens.release(allocator);
            restored.release(allocator);
        }
    }

    /// The allocator of the bookkeeping: its own, or `smmu` (the SMMU's).
    pub(crate) fn bookkeeping_allocator<'a>(&self, smmu: &'a dyn FrameAllocator) -> &'a dyn FrameAllocator {
        match self.bookkeeping {
            Some(own) => own,
            None => smmu,
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

    fn slot(&self, id: DomainId) -> Result<&Slot, DomainError> {
        self.slots
            .get(usize::from(id.index()))
            .ok_or(DomainError::StaleDomain(id))
    }

    /// `id`'s domain, read-locked. The caller must not hold `id`'s lock already (for writing: a deadlock).
    pub(crate) fn get(&self, id: DomainId) -> Result<StateRef<'_>, DomainError> {
        let slot = self.slot(id)?;
        let guard = slot.state.read();
        // Relaxed: the generation changes only under the write lock, which this read lock excludes.
        if guard.is_none() || slot.generation.load(Ordering::Relaxed) != id.generation() {
            return Err(DomainError::StaleDomain(id));
        }
        Ok(StateRef(guard))
    }

    /// `id`'s domain, write-locked. The caller must not hold `id`'s lock already.
    pub(crate) fn get_mut(&self, id: DomainId) -> Result<StateMut<'_>, DomainError> {
        let slot = self.slot(id)?;
        let guard = slot.write_state();
        if guard.is_none() || slot.generation.load(Ordering::Relaxed) != id.generation() {
            return Err(DomainError::StaleDomain(id));
        }
        Ok(StateMut(guard))
    }

    /// Puts `state` in a free slot, which the caller (holding `book`) checked there is (O(1)); gives it back when
    /// there is none.
    // Given back by value: there is no heap to box it in, and the caller must undo what it built.
    #[allow(clippy::result_large_err)]
    pub(crate) fn insert(&self, book: &mut Book<D>, state: DomainState) -> Result<DomainId, DomainState> {
        let Some(index) = book.free.pop() else {
            return Err(state);
        };
        let slot = &self.slots[usize::from(index)];
        let mut guard = slot.write_state();
        debug_assert!(guard.is_none());
        *guard = Some(state);
        Ok(DomainId::new(index, slot.generation.load(Ordering::Relaxed)))
    }

    /// Forgets every domain, its page tables and the gathers it holds left where they are (never freed): for an
    /// SMMU that may still walk them (see `Iommu`'s drop).
    pub(crate) fn abandon_tables(&mut self) {
        for slot in self.slots.iter_mut() {
            if let Some(state) = slot.state.get_mut().take() {
                core::mem::forget(state);
            }
        }
    }

    /// Empties `id`'s slot, makes every handle to it stale and puts the slot back on the free stack (O(1)), unless
    /// its generation is the last one: the slot is retired then. Its fault report is cleared.
    /// Its attachments are forgotten (their nodes back to the bookkeeping).
    pub(crate) fn remove(&self, book: &mut Book<D>, id: DomainId) -> Option<DomainState> {
        let mut state = self.take_for_free(id, |_| Ok(())).ok()?;
        self.nodes.clear(&mut book.free_nodes, &mut state.attachments);
        self.release_slot(book, id);
        Some(state)
    }

    /// Records `(sid, ssid)` as attached to `state`'s domain (the caller holds the bookkeeping, `book`, and the
    /// domain's write lock).
    ///
    /// # Errors
    /// [`DomainError::TooMany`] when no node is left (nothing changed): room for every stream the SMMU can attach
    /// and each of its substreams, so a caller that checked those has room.
    pub(crate) fn add_attachment(
        &self,
        book: &mut Book<D>,
        state: &mut DomainState,
        pair: (u32, u32),
    ) -> Result<(), DomainError> {
        self.nodes
            .push(&mut book.free_nodes, &mut state.attachments, pair)
            .map_err(|()| DomainError::TooMany(Capacity::Attachments))
    }

    /// Forgets `(sid, ssid)` as attached to `state`'s domain (as [`Domains::add_attachment`]); whether it was.
    pub(crate) fn remove_attachment(&self, book: &mut Book<D>, state: &mut DomainState, pair: (u32, u32)) -> bool {
        self.nodes.remove(&mut book.free_nodes, &mut state.attachments, pair)
    }

    /// The (StreamID, SubstreamID) pairs attached to `state`'s domain, in the order they were attached (the caller
    /// holds the domain's lock, for reading at least, while it borrows `state`).
    pub(crate) fn attachments<'a>(&'a self, state: &'a DomainState) -> impl Iterator<Item = (u32, u32)> + 'a {
        self.nodes.iter(&state.attachments)
    }

    /// Takes `id`'s domain out of its slot for a free when `check` passes (run under the slot's write lock):
    /// the slot is left empty, so every handle fails with `StaleDomain` and nothing can add a reference to the
    /// domain, but it is not free ([`Domains::release_slot`] frees it, [`Domains::put_back`] undoes this).
    #[allow(clippy::result_large_err)]
    pub(crate) fn take_for_free(
        &self,
        id: DomainId,
        check: impl FnOnce(&DomainState) -> Result<(), DomainError>,
    ) -> Result<DomainState, DomainError> {
        let slot = self.slot(id)?;
        let mut guard = slot.write_state();
        match guard.as_ref() {
            Some(state) if slot.generation.load(Ordering::Relaxed) == id.generation() => check(state)?,
            _ => return Err(DomainError::StaleDomain(id)),
        }
        guard.take().ok_or(DomainError::StaleDomain(id))
    }

    /// Puts back a domain [`Domains::take_for_free`] took (its free failed): its handles are valid again.
    pub(crate) fn put_back(&self, id: DomainId, state: DomainState) {
        if let Ok(slot) = self.slot(id) {
            let mut guard = slot.write_state();
            debug_assert!(guard.is_none());
            *guard = Some(state);
        }
    }

    /// Frees the slot of a domain [`Domains::take_for_free`] took: as [`Domains::remove`] once the state is out.
    pub(crate) fn release_slot(&self, book: &mut Book<D>, id: DomainId) {
        let Ok(slot) = self.slot(id) else {
            return;
        };
        let guard = slot.write_state();
        debug_assert!(guard.is_none());
        // A generation is never handed out twice: a slot whose generation would wrap is retired (left off the
        // free stack for good, its handles stale because it stays empty), as unreachable as that is with 64 bits.
        let next = id.generation().checked_add(1);
        // Release: a fault filed after seeing the new generation goes elsewhere (see `Slot::generation`).
        slot.generation
            .store(next.unwrap_or(id.generation()), Ordering::Release);
        *slot.faults.lock() = FaultReport::default();
        drop(guard);
        if next.is_some() {
            // The slot was taken from the stack when the domain was created, so there is room for it.
            let _ = book.free.push(id.index());
        }
    }

    /// The preserved domains with their tokens, in slot order (each slot read-locked in turn, one at a time): the
    /// order records are written in. The caller holds the bookkeeping, so none is preserved or unpreserved
    /// meanwhile.
    pub(crate) fn preserved(&self) -> impl Iterator<Item = (u64, DomainId)> + '_ {
        self.slots.iter().enumerate().filter_map(|(index, slot)| {
            let guard = slot.state.read();
            let token = guard.as_ref()?.token?;
            Some((
                token,
                DomainId::new(index as u16, slot.generation.load(Ordering::Relaxed)),
            ))
        })
    }

    /// The EL2 stage-1 domain (other than `except`) that has a stream or substream attached, if any (one pass over
    /// the slots, each read-locked in turn: for attach and restore, not a hot path). The caller must not hold a
    /// slot's write lock.
    pub(crate) fn el2_in_use(&self, except: Option<DomainId>) -> Option<DomainId> {
        self.slots.iter().enumerate().find_map(|(index, slot)| {
            let guard = slot.state.read();
            let state = guard.as_ref()?;
            let id = DomainId::new(index as u16, slot.generation.load(Ordering::Relaxed));
            (Some(id) != except && state.is_el2() && !state.attachments.is_empty()).then_some(id)
        })
    }
}

/// The streams attached to domains, out of line: a dense array (what `iter` walks) with a StreamID index beside
/// it, so finding a stream is O(1) however many are attached. The API of the `heapless::Vec` it replaces.
pub(crate) struct AttachedStreams {
    records: Storage<Option<StreamRecord>>,
    len: usize,
    by_sid: Index<u32>,
}

impl AttachedStreams {
    /// Room for `capacity` streams, in blocks of `allocator`.
    ///
    /// # Errors
    /// The allocator's (nothing kept).
    pub(crate) fn new(allocator: &dyn FrameAllocator, capacity: usize) -> Result<Self, AllocError> {
        let records = Storage::new(allocator, capacity, |_| None)?;
        match Index::with_placeholder(allocator, capacity, 0) {
            Ok(by_sid) => Ok(AttachedStreams {
                records,
                len: 0,
                by_sid,
            }),
            Err(e) => {
                // SAFETY: from `allocator`, just above; nothing in it.
                unsafe { records.release(allocator) };
                Err(e)
            }
        }
    }

    /// Nothing, no room, no block.
    pub(crate) const fn empty() -> Self {
        AttachedStreams {
            records: Storage::empty(),
            len: 0,
            by_sid: Index::empty(),
        }
    }

    /// Where stream `sid`'s record is.
    pub(crate) fn position_of(&self, sid: u32) -> Option<usize> {
        self.by_sid.get(&u64::from(sid)).map(|&i| i as usize)
    }

    /// Appends `record` (a stream not attached yet); `Err(record)` when full.
    // Given back by value: there is no heap to box it in (the `heapless::Vec` this replaces did the same).
    #[allow(clippy::result_large_err)]
    pub(crate) fn push(&mut self, record: StreamRecord) -> Result<(), StreamRecord> {
        if self.len == self.records.len() || self.position_of(record.sid).is_some() {
            return Err(record);
        }
        if self.by_sid.insert(u64::from(record.sid), self.len as u32).is_err() {
            return Err(record);
        }
        self.records[self.len] = Some(record);
        self.len += 1;
        Ok(())
    }

    /// Removes record `index`, the last one taking its place.
    pub(crate) fn swap_remove(&mut self, index: usize) -> StreamRecord {
        let last = self.len - 1;
        self.records.swap(index, last);
        let removed = self.records[last].take().unwrap_or_else(|| unreachable!("below len"));
        self.len = last;
        self.by_sid.swap_remove(&u64::from(removed.sid));
        if let Some(moved) = self.records.get(index).and_then(Option::as_ref)
            && index < self.len
        {
            let _ = self.by_sid.insert(u64::from(moved.sid), index as u32);
        }
        removed
    }

    /// Keeps only the records `keep` says.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&StreamRecord) -> bool) {
        let mut i = 0;
        while i < self.len {
            if keep(&self[i]) {
                i += 1;
            } else {
                self.swap_remove(i);
            }
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &StreamRecord> + '_ {
        self.records[..self.len].iter().flatten()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_full(&self) -> bool {
        self.len == self.records.len()
    }

    /// How many streams it has room for.
    pub(crate) fn capacity(&self) -> usize {
        self.records.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Gives the blocks back (the records dropped first).
    ///
    /// # Safety
    /// As [`Storage::release`].
    pub(crate) unsafe fn release(self, allocator: &dyn FrameAllocator) {
        // SAFETY: the caller's guarantee, passed on.
        unsafe {
            self.records.release(allocator);
            self.by_sid.release(allocator);
        }
    }
}

impl core::ops::Index<usize> for AttachedStreams {
    type Output = StreamRecord;
    fn index(&self, index: usize) -> &StreamRecord {
        self.records[..self.len][index]
            .as_ref()
            .unwrap_or_else(|| unreachable!("records below len are present"))
    }
}

impl core::ops::IndexMut<usize> for AttachedStreams {
    fn index_mut(&mut self, index: usize) -> &mut StreamRecord {
        self.records[..self.len][index]
            .as_mut()
            .unwrap_or_else(|| unreachable!("records below len are present"))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::host_frames::HeapFrames;

    /// The bookkeeping comes in five blocks; an allocator that runs out at any of them gets every earlier one
    /// back (nothing leaks), and one with room for all holds exactly them until `release`.
    #[test]
    fn bookkeeping_that_does_not_fit_gives_back_what_it_took() {
        let whole = HeapFrames::default();
        let domains = Domains::<64>::new(&whole, None, 300).unwrap();
        let blocks = whole.live_blocks();
        assert_eq!(blocks, 6, "slots, nodes, streams and their index, two token indexes");
        assert_eq!(domains.book.lock().free_nodes.len(), 300 * 8);
        assert_eq!(domains.book.lock().streams.capacity(), 300);
        // SAFETY: from `whole`.
        unsafe { domains.release(&whole) };
        assert_eq!(whole.live_blocks(), 0);
        let mut failures = 0;
        for limit in (0..400_000).step_by(4096) {
            let frames = HeapFrames::with_limit(limit);
            match Domains::<64>::new(&frames, None, 300) {
                Ok(domains) => {
                    // SAFETY: from `frames`.
                    unsafe { domains.release(&frames) };
                }
                Err(_) => failures += 1,
            }
            assert_eq!(frames.live_blocks(), 0, "with {limit} bytes");
        }
        assert!(failures > 3, "the limits reached past the first block");
    }

    /// The attached streams against a `Vec` model: pushes, removals from anywhere (the last one moving into the
    /// hole), retains; every stream found where the model has it, every absent one not found.
    #[test]
    fn attached_streams_find_every_stream_after_every_removal() {
        let frames = HeapFrames::default();
        let mut streams = AttachedStreams::new(&frames, 40).unwrap();
        let mut model: std::vec::Vec<u32> = std::vec::Vec::new();
        let record = |sid| StreamRecord {
            sid,
            domain: DomainId::new(0, 0),
            cd_table: None,
            substreams: heapless::Vec::new(),
            busy: false,
        };
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for step in 0..5_000u32 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let sid = (state % 64) as u32;
            match state % 5 {
                0 | 1 => {
                    let fits = model.len() < 40 && !model.contains(&sid);
                    assert_eq!(streams.push(record(sid)).is_ok(), fits, "step {step}");
                    if fits {
                        model.push(sid);
                    }
                }
                2 | 3 => {
                    if let Some(i) = streams.position_of(sid) {
                        assert_eq!(streams.swap_remove(i).sid, sid);
                        let at = model.iter().position(|&x| x == sid).unwrap();
                        model.swap_remove(at);
                    } else {
                        assert!(!model.contains(&sid));
                    }
                }
                _ => {
                    let odd = |x: u32| x % 2 == 1;
                    streams.retain(|r| !odd(r.sid ^ step));
                    model.retain(|&x| !odd(x ^ step));
                }
            }
            assert_eq!(streams.len(), model.len());
            for probe in 0..64 {
                match streams.position_of(probe) {
                    Some(i) => assert_eq!(streams[i].sid, probe, "step {step}"),
                    None => assert!(!model.contains(&probe), "step {step}: {probe} lost"),
                }
            }
        }
        // SAFETY: from `frames`.
        unsafe { streams.release(&frames) };
        assert_eq!(frames.live_blocks(), 0);
    }
}
