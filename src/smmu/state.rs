//! What an initialised SMMU owns: its registers, the memory its own structures come from, the stream table, the
//! command and event queues and the ASID/VMID allocators. The layers above (domains, live update) keep their own
//! bookkeeping and call in here; nothing here knows a domain.

use crate::ids::{IdAllocator, IdError};
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
    pub(super) streams: StreamTable,
    pub(super) cmdq: CommandQueue,
    pub(super) evtq: EventQueue,
    pub(super) asids: IdAllocator,
    pub(super) vmids: IdAllocator,
    /// An event-queue abort (GERROR.EVENTQ_ABT_ERR) seen but not reported yet: the next drain reports it.
    pub(super) pending_overflow: Option<Overflow>,
    /// Adopted from a previous image ([`Smmu::adopt_running`]): STEs that image left may still be live, so a
    /// refused restore must make every stream but this image's own abort, and no ID is handed out. Cleared once
    /// they are aborted.
    pub(crate) inherited_stes: bool,
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
            streams,
            cmdq,
            evtq,
            asids: IdAllocator::new(features.asid_bits),
            vmids: IdAllocator::new(features.vmid_bits),
            pending_overflow: None,
            inherited_stes: false,
        }
    }

    /// What the SMMU implements.
    pub fn features(&self) -> &Features {
        self.smmu.features()
    }

    /// The stream table format chosen at init.
    pub fn stream_table_format(&self) -> StreamTableFormat {
        self.streams.format()
    }

    /// Level-2 stream table spans allocated so far (2-level tables only).
    pub fn allocated_spans(&self) -> u32 {
        self.streams.allocated_spans()
    }

    /// Command queue entries.
    pub fn cmdq_entries(&self) -> u32 {
        self.cmdq.geometry().entries()
    }

    /// Event queue entries.
    pub fn eventq_entries(&self) -> u32 {
        self.evtq.geometry().entries()
    }

    /// The allocator the SMMU's memory comes from.
    pub fn allocator(&self) -> &A {
        &self.allocator
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
    pub fn allocate_asid(&mut self) -> Result<u16, IdError> {
        if self.inherited_stes {
            return Err(IdError::HandOffUnsettled);
        }
        self.asids.allocate()
    }

    /// Frees an ASID whatever owns it: for a domain that is going (or was never recorded).
    pub(crate) fn release_asid(&mut self, asid: u16) -> Result<(), IdError> {
        self.asids.free(asid)
    }

    /// Marks `asid` allocated (a restore reserving what a record names).
    pub(crate) fn claim_asid(&mut self, asid: u16) -> Result<(), IdError> {
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
    pub(crate) fn claim_vmid(&mut self, vmid: u16) -> Result<(), IdError> {
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
    pub fn allocate_vmid(&mut self) -> Result<u16, IdError> {
        if self.inherited_stes {
            return Err(IdError::HandOffUnsettled);
        }
        self.vmids.allocate()
    }

    /// Frees a VMID whatever owns it: for a domain that is going (or was never recorded).
    pub(crate) fn release_vmid(&mut self, vmid: u16) -> Result<(), IdError> {
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
