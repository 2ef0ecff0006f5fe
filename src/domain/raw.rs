//! The SMMU's raw calls, for experts and tests: STEs that abort or bypass, command batches, ASIDs and VMIDs,
//! event draining. Each is refused where it would undercut a domain: a stream a domain holds keeps its STE, an ID
//! a live domain owns stays allocated, and no STE or CD is installed from outside.

use crate::hw::event::{Event, GlobalErrors};
use crate::hw::ste::Ste;
use crate::ids::IdError;
use crate::mem::FrameAllocator;
use crate::pgtable::{Gather, IoPageTable};
use crate::queue::cmdq::{Batch, BatchReport, CommandQueueError};
use crate::queue::evtq::DrainReport;
use crate::smmu::features::Features;
use crate::smmu::{AttachError, Configuration, FlushError, GlobalError, InstallReport, TlbContext};
use crate::stream::{StreamError, StreamTableFormat};

use super::Iommu;

impl<A: FrameAllocator, const D: usize> Iommu<A, D> {
    /// What the SMMU implements.
    pub fn features(&self) -> &Features {
        self.core.features()
    }

    /// The stream table format chosen at init.
    pub fn stream_table_format(&self) -> StreamTableFormat {
        self.core.stream_table_format()
    }

    /// Level-2 stream table spans allocated so far (2-level tables only).
    pub fn allocated_spans(&self) -> u32 {
        self.core.allocated_spans()
    }

    /// Command queue entries.
    pub fn cmdq_entries(&self) -> u32 {
        self.core.cmdq_entries()
    }

    /// Event queue entries.
    pub fn eventq_entries(&self) -> u32 {
        self.core.eventq_entries()
    }

    /// The allocator the SMMU's memory comes from.
    pub fn allocator(&self) -> &A {
        self.core.allocator()
    }

    /// Whether translation is on (CR0ACK.SMMUEN).
    pub fn is_enabled(&self) -> bool {
        self.core.is_enabled()
    }

    /// A printable summary of the configuration chosen at init.
    pub fn configuration(&self) -> Configuration {
        self.core.configuration()
    }

    /// Fails with [`AttachError::StreamInUse`] when `sid` is attached to a domain (which owns its STE).
    pub(super) fn unowned_in(book: &super::table::Book<D>, sid: u32) -> Result<(), AttachError> {
        match book.stream(sid) {
            Some(i) => Err(AttachError::StreamInUse {
                sid,
                domain: book.streams[i].domain,
            }),
            None => Ok(()),
        }
    }

    /// Reads the global errors, acknowledges the recoverable ones and reports them. An event queue abort is
    /// remembered as an overflow for the next [`LowLevel::drain_events`](crate::LowLevel::drain_events). Command errors are recovered by the
    /// command queue itself while it waits.
    ///
    /// # Errors
    /// [`GlobalError::ServiceFailure`] when GERROR.SFM_ERR is active (not acknowledged: the SMMU needs a reset).
    pub fn handle_global_errors(&self) -> Result<GlobalErrors, GlobalError> {
        self.core.handle_global_errors()
    }

    /// ASIDs allocated now (the reserved ASID 0 not counted).
    pub fn asids_in_use(&self) -> u32 {
        self.core.asids_in_use()
    }

    /// VMIDs allocated now (the reserved VMID 0 not counted).
    pub fn vmids_in_use(&self) -> u32 {
        self.core.vmids_in_use()
    }

    /// The low-level handle: raw STEs, command batches, ASIDs and VMIDs, raw event draining, for experts and
    /// tests. **It can break isolation**: what it does is blind to the domains' bookkeeping except where each call
    /// says it refuses (a stream a domain holds keeps its STE, an ID a live domain owns stays allocated), and the
    /// calls that can hand a device memory it must not reach are `unsafe`. A hypervisor that uses domains never
    /// needs it.
    pub fn low_level(&self) -> LowLevel<'_, A, D> {
        LowLevel { iommu: self }
    }
}

/// The low-level calls of an [`Iommu`] ([`Iommu::low_level`]): raw STEs, command batches, IDs and event draining.
/// Each is refused where it would undercut a domain; [`LowLevel::attach_bypass`] and
/// [`LowLevel::submit_unvetted`] are `unsafe`, as they can break isolation. Not for interrupt context.
///
/// ```compile_fail,E0133
/// fn raw<A: smmuv3::FrameAllocator>(iommu: &smmuv3::Iommu<A>) {
///     let _ = iommu.low_level().attach_bypass(0x10); // bypass needs `unsafe`: the device reaches all memory
/// }
/// ```
pub struct LowLevel<'a, A: FrameAllocator, const D: usize> {
    iommu: &'a Iommu<A, D>,
}

impl<A: FrameAllocator, const D: usize> LowLevel<'_, A, D> {
    /// Makes every stream whose STE exists abort, except those `keep` names (after a hand-off with the SMMU
    /// running: the streams no record names). Returns how many were changed.
    ///
    /// # Errors
    /// [`AttachError::StreamInUse`] when a stream attached to a domain is not kept (detach it first): nothing
    /// changes then. Otherwise as [`LowLevel::attach_abort`](crate::LowLevel::attach_abort): the streams before the failing one abort.
    pub fn abort_streams_except(&self, keep: impl Fn(u32) -> bool) -> Result<u32, AttachError> {
        // The bookkeeping held throughout: no stream can be attached meanwhile.
        let book = self.iommu.book();
        if let Some(r) = book.streams.iter().find(|r| !keep(r.sid)) {
            return Err(AttachError::StreamInUse {
                sid: r.sid,
                domain: r.domain,
            });
        }
        self.iommu.core.abort_streams_except(keep)
    }

    /// The STE currently installed for `sid` (all zero, i.e. invalid, for an unallocated level-2 span).
    ///
    /// # Errors
    /// [`StreamError::UnknownStream`] for a StreamID beyond the table.
    pub fn ste(&self, sid: u32) -> Result<Ste, StreamError> {
        self.iommu.core.ste(sid)
    }

    /// Makes `sid` abort every transaction, silently (no event). For a stream no domain holds (a domain's stream
    /// aborts when it is detached).
    ///
    /// # Errors
    /// [`AttachError::StreamInUse`] for a stream attached to a domain, and [`AttachError::Stream`] for a
    /// StreamID beyond the table or no memory for its level-2 span: nothing changes then.
    /// [`AttachError::Invalidation`] when an invalidation fails: the STE is left as the error says.
    pub fn attach_abort(&self, sid: u32) -> Result<InstallReport, AttachError> {
        let book = self.iommu.book();
        Iommu::<A, D>::unowned_in(&book, sid)?;
        self.iommu.core.abort_stream(sid)
    }

    /// Lets `sid`'s transactions through untranslated. Only on explicit request: a bypassed device reaches all of
    /// memory.
    ///
    /// # Errors
    /// As [`LowLevel::attach_abort`](crate::LowLevel::attach_abort): a stream attached to a domain is refused with
    /// [`AttachError::StreamInUse`]. [`AttachError::StreamsFrozen`] while a hand-off with the SMMU left running is
    /// prepared (a bypassing device could write the handover region and the preserved memory before the next
    /// image takes them over). Nothing changes then.
    ///
    /// # Safety
    /// The device behind `sid` can then read and write any memory, the hypervisor's, the driver's tables and
    /// every domain's included: the caller must trust it (and whatever controls it) with all of it. A bypass
    /// domain ([`Iommu::create_bypass`]) is the same opt-in with the domain bookkeeping kept.
    pub unsafe fn attach_bypass(&self, sid: u32) -> Result<InstallReport, AttachError> {
        let book = self.iommu.book();
        // Under the bookkeeping, which `prepare_handover` holds while it checks the streams and freezes them: a
        // hand-off prepared before this is seen here, one prepared after it sees the bypass.
        if let Some(generation) = self.iommu.domains.streams_frozen() {
            return Err(AttachError::StreamsFrozen { generation });
        }
        Iommu::<A, D>::unowned_in(&book, sid)?;
        self.iommu.core.bypass_stream(sid)
    }

    /// Submits a batch and a CMD_SYNC, and waits for completion. A command the SMMU could not fetch
    /// (CERROR_ABT) is fetched again; one it refuses as illegal (CERROR_ILL) is replaced with a CMD_SYNC so the
    /// rest of the batch completes, and the submission then fails. On an SMMU with
    /// [`crate::features::Quirks::CMDQ_SYNC_EVERY_63`] a CMD_SYNC is inserted after every 63 commands. Public for
    /// experts: every command is vetted first ([`crate::hw::command::vet`]) so that it can only invalidate,
    /// prefetch or synchronise: an extra batch costs time but cannot change what a domain translates, nor make the
    /// SMMU write memory (a CMD_SYNC with an MSI is refused).
    ///
    /// # Errors
    /// [`CommandQueueError::NotAllowed`] for a command the vetting refuses (nothing is written),
    /// [`CommandQueueError::Refused`] (after the rest of the batch completed) when a command was illegal,
    /// [`CommandQueueError::Timeout`] when the SMMU stops consuming, [`CommandQueueError::ServiceFailure`].
    pub fn submit(&self, batch: &Batch) -> Result<BatchReport, CommandQueueError> {
        self.iommu.core.submit(batch)
    }

    /// [`LowLevel::submit`](crate::LowLevel::submit) without the vetting: any command, for tests that inject one the SMMU must refuse
    /// (a reserved opcode) and for commands this driver does not model.
    ///
    /// # Safety
    /// No command of `batch` may make the SMMU write memory the caller does not own for that purpose (a CMD_SYNC's
    /// MSI), nor change what a stream translates or what a device caches (ATS, PRI and stall commands): the driver
    /// cannot tell what they do.
    ///
    /// # Errors
    /// As [`LowLevel::submit`](crate::LowLevel::submit), without [`CommandQueueError::NotAllowed`].
    pub unsafe fn submit_unvetted(&self, batch: &Batch) -> Result<BatchReport, CommandQueueError> {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { self.iommu.core.submit_unvetted(batch) }
    }

    /// Invalidates every cached configuration and TLB entry: CFGI_ALL, TLBI_EL2_ALL (when the SMMU has EL2
    /// contexts), TLBI_NSNH_ALL, CMD_SYNC.
    ///
    /// # Errors
    /// As [`LowLevel::submit`](crate::LowLevel::submit).
    pub fn invalidate_all(&self) -> Result<BatchReport, CommandQueueError> {
        self.iommu.core.invalidate_all()
    }

    /// Invalidates what `gather` collected from `table` for `context`, waits for it to complete (CMD_SYNC), then
    /// gives the tables the gather unlinked back to their allocator (only now can no walk reach them). The least
    /// invalidation: range TLBIs when the SMMU has them (IDR3.RIL), one TLBI per granule up to
    /// [`PER_GRANULE_LIMIT`](crate::smmu::PER_GRANULE_LIMIT), else the whole ASID, VMID or EL2 regime. Leaf-only when no table was unlinked.
    ///
    /// A stage-2 change under nested translation also drops the VMID's combined stage-1 entries, which cannot be
    /// found by IPA, in the order the architecture's stage-2 maintenance needs (as the CPU's TLBI IPAS2E1; DSB;
    /// TLBI VMALLE1): TLBI_S2_IPA, **CMD_SYNC**, TLBI_NH_ALL, CMD_SYNC. Without the first sync a walk could
    /// rebuild a combined entry from a stage-2 entry that is still being invalidated.
    ///
    /// The page-table code changes descriptors but invalidates nothing itself: after `map` over what was unmapped,
    /// `unmap` or `protect`, the caller flushes the gather here before it relies on the change (or before it reuses
    /// what was unmapped).
    ///
    /// # Errors
    /// [`FlushError`] when the invalidation failed (a refused command, a timeout, service failure), for
    /// [`TlbContext::Stage1El2`] when the SMMU has no EL2 contexts, or with
    /// [`InvalidationError::ForeignGather`](crate::smmu::InvalidationError::ForeignGather) when another table than `table` filled `gather` (nothing issued). The
    /// tables are then **not** released: the error hands the gather back.
    pub fn flush<T: FrameAllocator>(
        &mut self,
        table: &mut IoPageTable<T>,
        gather: Gather,
        context: TlbContext,
    ) -> Result<BatchReport, FlushError> {
        self.iommu.core.flush(table, gather, context)
    }

    /// Consumes every event the SMMU recorded, handing each to `sink`, and reports lost events however the SMMU
    /// signalled them (EVENTQ_PROD.OVFLG or GERROR.EVENTQ_ABT_ERR).
    ///
    /// # Errors
    /// [`GlobalError::ServiceFailure`] as [`Iommu::handle_global_errors`].
    pub fn drain_events(&self, mut sink: impl FnMut(Event)) -> Result<DrainReport, GlobalError> {
        self.iommu.core.drain_events(crate::smmu::Drainer::Thread, |event| {
            sink(event);
            true
        })
    }

    /// Allocates an ASID (8 or 16 bits as IDR0.ASID16 says; 0 is reserved).
    ///
    /// # Errors
    /// [`IdError::Exhausted`]; [`IdError::HandOffUnsettled`] on an SMMU adopted running until the hand-off is
    /// restored (or its unrestored streams aborted): a stream the previous image left may use any ASID.
    pub fn allocate_asid(&self) -> Result<u16, IdError> {
        self.iommu.core.allocate_raw_asid()
    }

    /// Frees an ASID taken with [`LowLevel::allocate_asid`](crate::LowLevel::allocate_asid). A domain's ASID goes back when the domain is freed,
    /// after its TLB entries: freeing it here would let a later allocation hand it out while the domain still uses
    /// it.
    ///
    /// Only an ASID this handle handed out is freed: the allocator marks it so in the step that allocates it, so
    /// a domain's ASID is refused at every moment of its life (while the domain is being built or freed too).
    ///
    /// # Errors
    /// [`IdError::Owned`] for an ASID a domain owns (or a restore claimed), [`IdError::WrongState`] /
    /// [`IdError::OutOfRange`] for an ASID that is not allocated; nothing changes.
    pub fn free_asid(&self, asid: u16) -> Result<(), IdError> {
        self.iommu.core.free_raw_asid(asid)
    }

    /// Allocates a VMID (8 or 16 bits as IDR0.VMID16 says; 0 is reserved).
    ///
    /// # Errors
    /// As [`LowLevel::allocate_asid`](crate::LowLevel::allocate_asid).
    pub fn allocate_vmid(&self) -> Result<u16, IdError> {
        self.iommu.core.allocate_raw_vmid()
    }

    /// Frees a VMID taken with [`LowLevel::allocate_vmid`](crate::LowLevel::allocate_vmid) (a domain's goes back when the domain is freed).
    ///
    /// # Errors
    /// As [`LowLevel::free_asid`](crate::LowLevel::free_asid): [`IdError::Owned`] for a VMID a stage-2 domain owns.
    pub fn free_vmid(&self, vmid: u16) -> Result<(), IdError> {
        self.iommu.core.free_raw_vmid(vmid)
    }
}
