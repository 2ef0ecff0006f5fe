//! What an initialised SMMU owns: its registers, the memory its own structures come from, the stream table, the
//! command and event queues and the ASID/VMID allocators. The layers above (domains, live update) keep their own
//! bookkeeping and call in here; nothing here knows a domain.
//!
//! **Concurrency.** Every operation takes `&self`, from any CPU. The parts and what guards them:
//! - the stream table: one `spin::Mutex`, held to find an STE and while a level-2 span is allocated (until its
//!   level-1 descriptor is invalidated). An STE is then written through the hitless writer, each CFGI_STE +
//!   CMD_SYNC step awaited, without the lock: STEs of different streams are written in parallel. Two writers of
//!   one entry would interleave their hitless steps, so the callers keep one writer per STE (the domain layer's
//!   stream records; see `SmmuCore::install_ste`);
//! - the command queue: no lock (its own multi-producer protocol, `crate::queue::cmdq`);
//! - the ASID and VMID allocators: no lock (atomic bitmaps, `crate::ids::AtomicIdAllocator`);
//! - the event queue and the overflow it last reported: one `spin::Mutex` that interrupt context only
//!   `try_lock`s. A failed try sets `drain_again` and tries once more; the holder clears it before each pass and, on finding it set
//!   after a pass, drains once more before unlocking (and once more after, if it was set between its last look
//!   and the unlock), so no record announced by an interrupt waits for the next one;
//! - `inherited_stes`: an atomic flag.
//!
//! Lock order inside the core: the stream table's lock is never held while the event queue's is taken, nor the
//! reverse; neither is held while calling out of the core.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::ids::{AtomicIdAllocator, IdError};
use crate::mem::FrameAllocator;
use crate::queue::cmdq::CommandQueue;
use crate::queue::evtq::{EventQueue, Overflow};
use crate::stream::{StreamTable, StreamTableFormat};

use super::Smmu;
use super::features::Features;

/// An initialised SMMU (SMMUEN = 1): the parts every layer above builds on. Created by `init` or
/// `adopt_running` (see `crate::domain`, whose public type wraps it).
///
/// **Dropping it** turns translation off with every incoming transaction aborting ([`Smmu::disable_aborting`]);
/// the stream table and the queues are leaked ([`SmmuCore::shutdown`] gives them back).
pub(crate) struct SmmuCore<A: FrameAllocator> {
    pub(crate) smmu: Smmu,
    pub(super) allocator: A,
    /// The stream table: held to find an entry and to add a level-2 span (see the module docs).
    pub(super) streams: spin::Mutex<StreamTable>,
    pub(super) cmdq: CommandQueue,
    /// The event queue: interrupt context only `try_lock`s it (see the module docs).
    pub(crate) evtq: spin::Mutex<EventState>,
    /// A drain found the event queue's lock taken: its holder drains once more before it lets go.
    pub(crate) drain_again: AtomicBool,
    /// GERROR.EVENTQ_ABT_ERR acknowledged and not reported yet: the next drain reports it as an overflow.
    pub(super) abort_seen: AtomicBool,
    pub(super) asids: AtomicIdAllocator,
    pub(super) vmids: AtomicIdAllocator,
    /// Adopted from a previous image ([`Smmu::adopt_running`]): STEs that image left may still be live, so a
    /// refused restore must make every stream but this image's own abort, and no ID is handed out. Cleared once
    /// they are aborted (`Release`, read with `Acquire`: a CPU that sees it cleared sees the aborting STEs).
    pub(crate) inherited_stes: AtomicBool,
}

/// The event queue and what its drains remember, behind one lock.
pub(crate) struct EventState {
    pub(super) queue: EventQueue,
    /// An event-queue abort (GERROR.EVENTQ_ABT_ERR) seen but not reported yet: the next drain reports it.
    pub(super) pending_overflow: Option<Overflow>,
}

impl<A: FrameAllocator> SmmuCore<A> {
    /// The driver's state over an SMMU whose queues are programmed: no IDs taken, no domains.
    pub(super) fn assemble(
        smmu: Smmu,
        allocator: A,
        streams: StreamTable,
        cmdq: CommandQueue,
        evtq: EventQueue,
    ) -> Self {
        let features = *smmu.features();
        SmmuCore {
            smmu,
            allocator,
            streams: spin::Mutex::new(streams),
            cmdq,
            evtq: spin::Mutex::new(EventState {
                queue: evtq,
                pending_overflow: None,
            }),
            drain_again: AtomicBool::new(false),
            abort_seen: AtomicBool::new(false),
            asids: AtomicIdAllocator::new(features.asid_bits),
            vmids: AtomicIdAllocator::new(features.vmid_bits),
            inherited_stes: AtomicBool::new(false),
        }
    }

    /// What the SMMU implements.
    pub fn features(&self) -> &Features {
        self.smmu.features()
    }

    /// The stream table format chosen at init.
    pub fn stream_table_format(&self) -> StreamTableFormat {
        self.streams.lock().format()
    }

    /// Whether some thread holds the stream table's lock now (tests check what an operation holds while it waits
    /// for the SMMU).
    #[cfg(test)]
    pub(crate) fn stream_table_held(&self) -> bool {
        self.streams.is_locked()
    }

    /// Level-2 stream table spans allocated so far (2-level tables only).
    pub fn allocated_spans(&self) -> u32 {
        self.streams.lock().allocated_spans()
    }

    /// Command queue entries.
    pub fn cmdq_entries(&self) -> u32 {
        self.cmdq.geometry().entries()
    }

    /// Event queue entries.
    pub fn eventq_entries(&self) -> u32 {
        self.evtq.lock().queue.geometry().entries()
    }

    /// The allocator the SMMU's memory comes from.
    pub fn allocator(&self) -> &A {
        &self.allocator
    }

    /// Whether STEs a previous image left may still be live (see `inherited_stes`).
    pub(crate) fn inherited_stes(&self) -> bool {
        self.inherited_stes.load(Ordering::Acquire)
    }

    /// The previous image's STEs are all aborted or restored (or, `true`: adopted again).
    pub(crate) fn set_inherited_stes(&self, inherited: bool) {
        self.inherited_stes.store(inherited, Ordering::Release);
    }

    /// Whether translation is on (CR0ACK.SMMUEN).
    pub fn is_enabled(&self) -> bool {
        self.smmu.is_enabled()
    }

    /// Allocates an ASID (8 or 16 bits as IDR0.ASID16 says; 0 is reserved).
    ///
    /// # Errors
    /// [`IdError::Exhausted`]; [`IdError::HandOffUnsettled`] on an SMMU adopted running until the hand-off is
    /// restored (or its unrestored streams aborted): a stream the previous image left may use any ASID.
    pub fn allocate_asid(&self) -> Result<u16, IdError> {
        if self.inherited_stes() {
            return Err(IdError::HandOffUnsettled);
        }
        self.asids.allocate()
    }

    /// Allocates an ASID for a raw caller (`LowLevel::allocate_asid`): the only kind
    /// [`SmmuCore::free_raw_asid`] frees.
    pub(crate) fn allocate_raw_asid(&self) -> Result<u16, IdError> {
        if self.inherited_stes() {
            return Err(IdError::HandOffUnsettled);
        }
        self.asids.allocate_raw()
    }

    /// Frees an ASID [`SmmuCore::allocate_raw_asid`] handed out ([`IdError::Owned`] for a domain's).
    pub(crate) fn free_raw_asid(&self, asid: u16) -> Result<(), IdError> {
        self.asids.free_raw(asid)
    }

    /// As [`SmmuCore::allocate_raw_asid`], a VMID.
    pub(crate) fn allocate_raw_vmid(&self) -> Result<u16, IdError> {
        if self.inherited_stes() {
            return Err(IdError::HandOffUnsettled);
        }
        self.vmids.allocate_raw()
    }

    /// As [`SmmuCore::free_raw_asid`], a VMID.
    pub(crate) fn free_raw_vmid(&self, vmid: u16) -> Result<(), IdError> {
        self.vmids.free_raw(vmid)
    }

    /// Frees an ASID whatever owns it: for a domain that is going (or was never recorded).
    pub(crate) fn release_asid(&self, asid: u16) -> Result<(), IdError> {
        self.asids.free(asid)
    }

    /// Marks `asid` allocated (a restore reserving what a record names).
    pub(crate) fn claim_asid(&self, asid: u16) -> Result<(), IdError> {
        self.asids.claim(asid)
    }

    /// Whether `asid` is allocated here (0, reserved, always is).
    pub(crate) fn asid_taken(&self, asid: u16) -> bool {
        self.asids.is_allocated(asid)
    }

    /// Whether `vmid` is allocated here (0, reserved, always is).
    pub(crate) fn vmid_taken(&self, vmid: u16) -> bool {
        self.vmids.is_allocated(vmid)
    }

    /// Marks `vmid` allocated (a restore reserving what a record names).
    pub(crate) fn claim_vmid(&self, vmid: u16) -> Result<(), IdError> {
        self.vmids.claim(vmid)
    }

    /// ASIDs allocated now (the reserved ASID 0 not counted).
    pub fn asids_in_use(&self) -> u32 {
        self.asids.in_use() - 1
    }

    /// VMIDs allocated now (the reserved VMID 0 not counted).
    pub fn vmids_in_use(&self) -> u32 {
        self.vmids.in_use() - 1
    }

    /// Allocates a VMID (8 or 16 bits as IDR0.VMID16 says; 0 is reserved).
    ///
    /// # Errors
    /// As [`SmmuCore::allocate_asid`].
    pub fn allocate_vmid(&self) -> Result<u16, IdError> {
        if self.inherited_stes() {
            return Err(IdError::HandOffUnsettled);
        }
        self.vmids.allocate()
    }

    /// Frees a VMID whatever owns it: for a domain that is going (or was never recorded).
    pub(crate) fn release_vmid(&self, vmid: u16) -> Result<(), IdError> {
        self.vmids.free(vmid)
    }
}

impl<A: FrameAllocator> Drop for SmmuCore<A> {
    /// Translation off, every incoming transaction aborting (the layers above decide, before this, what their own
    /// memory may become once it is).
    fn drop(&mut self) {
        let _ = self.smmu.disable_aborting();
    }
}
