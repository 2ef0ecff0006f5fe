//! Faults filed per domain: every event record routed to the report of the domain its stream (and substream) is
//! attached to, or to the SMMU-wide report, drained until the queue is empty.

use crate::smmu::Drainer;
use core::fmt;

use crate::hw::event::Event;
use crate::ids::DomainId;
use crate::mem::FrameAllocator;
use crate::smmu::GlobalError;

use crate::sync::{AtomicBool, Ordering};

use super::table::{Book, StreamRecord};
use super::{DomainError, Domains, FAULT_REPORT_CAPACITY, Iommu};

/// Which stage a [`Fault`] was taken at (so a caller of the domain API needs nothing from [`crate::hw`]).
pub use crate::hw::event::Stage as FaultStage;

/// What kind of event a [`Fault`] is: one per event type of the architecture (IHI 0070, "Event records"), which
/// prints as its architectural name (`F_TRANSLATION`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultKind {
    /// F_UUT: unsupported upstream transaction.
    UnsupportedTransaction,
    /// C_BAD_STREAMID: the StreamID is beyond the stream table.
    BadStreamId,
    /// F_STE_FETCH: the STE could not be fetched.
    SteFetch,
    /// C_BAD_STE: the STE is invalid.
    BadSte,
    /// F_BAD_ATS_TREQ: a bad ATS translation request.
    BadAtsRequest,
    /// F_STREAM_DISABLED: the stream's translation is disabled (a non-substream transaction on an STE that
    /// has substreams only, say).
    StreamDisabled,
    /// F_TRANSL_FORBIDDEN: translation forbidden (an ATS-translated transaction the STE refuses).
    TranslationForbidden,
    /// C_BAD_SUBSTREAMID: the SubstreamID is beyond the CD table, or given where none is allowed.
    BadSubstreamId,
    /// F_CD_FETCH: the CD could not be fetched.
    CdFetch,
    /// C_BAD_CD: the CD is invalid.
    BadCd,
    /// F_WALK_EABT: an external abort during a table walk.
    WalkAbort,
    /// F_TRANSLATION: no translation for the address.
    Translation,
    /// F_ADDR_SIZE: an address beyond the configured size.
    AddressSize,
    /// F_ACCESS: the Access flag is clear.
    Access,
    /// F_PERMISSION: the access is not permitted.
    Permission,
    /// F_TLB_CONFLICT: conflicting TLB entries.
    TlbConflict,
    /// F_CFG_CONFLICT: conflicting configuration cache entries.
    ConfigurationConflict,
    /// E_PAGE_REQUEST: a page request (PRI).
    PageRequest,
    /// F_VMS_FETCH: the VMS could not be fetched.
    VmsFetch,
    /// An IMPLEMENTATION DEFINED event.
    ImplementationDefined,
    /// An event type this driver does not know.
    Unknown,
}

impl FaultKind {
    /// The kind of `event`.
    pub fn of(event: &Event) -> FaultKind {
        match event {
            Event::FUut(_) => FaultKind::UnsupportedTransaction,
            Event::CBadStreamId(_) => FaultKind::BadStreamId,
            Event::FSteFetch(_) => FaultKind::SteFetch,
            Event::CBadSte(_) => FaultKind::BadSte,
            Event::FBadAtsTreq(_) => FaultKind::BadAtsRequest,
            Event::FStreamDisabled { .. } => FaultKind::StreamDisabled,
            Event::FTranslForbidden { .. } => FaultKind::TranslationForbidden,
            Event::CBadSubstreamId { .. } => FaultKind::BadSubstreamId,
            Event::FCdFetch(_) => FaultKind::CdFetch,
            Event::CBadCd(_) => FaultKind::BadCd,
            Event::FWalkEabt(_) => FaultKind::WalkAbort,
            Event::FTranslation(_) => FaultKind::Translation,
            Event::FAddrSize(_) => FaultKind::AddressSize,
            Event::FAccess(_) => FaultKind::Access,
            Event::FPermission(_) => FaultKind::Permission,
            Event::FTlbConflict(_) => FaultKind::TlbConflict,
            Event::FCfgConflict(_) => FaultKind::ConfigurationConflict,
            Event::EPageRequest(_) => FaultKind::PageRequest,
            Event::FVmsFetch(_) => FaultKind::VmsFetch,
            Event::ImpDef { .. } => FaultKind::ImplementationDefined,
            Event::Unknown { .. } => FaultKind::Unknown,
        }
    }

    /// The architectural name (`F_TRANSLATION`, `C_BAD_STE`, ...), as [`Event::name`] gives it.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::UnsupportedTransaction => "F_UUT",
            FaultKind::BadStreamId => "C_BAD_STREAMID",
            FaultKind::SteFetch => "F_STE_FETCH",
            FaultKind::BadSte => "C_BAD_STE",
            FaultKind::BadAtsRequest => "F_BAD_ATS_TREQ",
            FaultKind::StreamDisabled => "F_STREAM_DISABLED",
            FaultKind::TranslationForbidden => "F_TRANSL_FORBIDDEN",
            FaultKind::BadSubstreamId => "C_BAD_SUBSTREAMID",
            FaultKind::CdFetch => "F_CD_FETCH",
            FaultKind::BadCd => "C_BAD_CD",
            FaultKind::WalkAbort => "F_WALK_EABT",
            FaultKind::Translation => "F_TRANSLATION",
            FaultKind::AddressSize => "F_ADDR_SIZE",
            FaultKind::Access => "F_ACCESS",
            FaultKind::Permission => "F_PERMISSION",
            FaultKind::TlbConflict => "F_TLB_CONFLICT",
            FaultKind::ConfigurationConflict => "F_CFG_CONFLICT",
            FaultKind::PageRequest => "E_PAGE_REQUEST",
            FaultKind::VmsFetch => "F_VMS_FETCH",
            FaultKind::ImplementationDefined => "IMPDEF_EVENT",
            FaultKind::Unknown => "UNKNOWN",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One fault a domain's streams took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// What kind of event it was.
    pub kind: FaultKind,
    /// StreamID.
    pub stream: u32,
    /// SubstreamID, when the transaction had one.
    pub substream: Option<u32>,
    /// The input address (IOVA, or IPA for a stage-2-only stream), where the record has one.
    pub address: Option<u64>,
    /// The stage that faulted, for translation faults.
    pub stage: Option<FaultStage>,
    /// The IPA of a stage-2 fault (translation faults and TLB conflicts with S2 set): what the stage-2 table lacks
    /// or refused. For a nested domain's stage-1 walk that faulted at stage 2 this is the CD's or the stage-1
    /// descriptor's IPA (or the transaction's), where [`Fault::address`] is the guest's VA. `None` for stage 1,
    /// where the record leaves it UNKNOWN.
    pub ipa: Option<u64>,
    /// A write (false: a read), for translation faults.
    pub write: Option<bool>,
}

impl Fault {
    pub(super) fn of(event: &Event) -> Option<Fault> {
        let t = event.translation_fault();
        Some(Fault {
            kind: FaultKind::of(event),
            stream: event.stream_id()?,
            substream: event.substream_id(),
            address: event.address(),
            stage: t.map(|t| t.stage),
            ipa: event.ipa(),
            write: t.map(|t| !t.access.read),
        })
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} stream {:#x}", self.kind, self.stream)?;
        if let Some(ssid) = self.substream {
            write!(f, " substream {ssid:#x}")?;
        }
        if let Some(a) = self.address {
            write!(f, " at {a:#x}")?;
        }
        if let Some(ipa) = self.ipa {
            write!(f, " ipa {ipa:#x}")?;
        }
        if let Some(w) = self.write {
            f.write_str(if w { " write" } else { " read" })?;
        }
        Ok(())
    }
}

/// A bounded record of faults: the first [`FAULT_REPORT_CAPACITY`], and how many more were lost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultReport {
    /// The faults kept, oldest first.
    pub faults: heapless::Vec<Fault, FAULT_REPORT_CAPACITY>,
    /// Faults that did not fit.
    pub lost: u32,
}

impl FaultReport {
    pub(super) fn push(&mut self, fault: Fault) {
        if self.faults.push(fault).is_err() {
            self.lost = self.lost.saturating_add(1);
        }
    }

    /// Faults seen in all (kept and lost), saturating at `u32::MAX` as [`FaultReport::lost`] does.
    pub fn total(&self) -> u32 {
        (self.faults.len() as u32).saturating_add(self.lost)
    }

    /// Faults of `kind` among those kept.
    pub fn count(&self, kind: FaultKind) -> usize {
        self.faults.iter().filter(|f| f.kind == kind).count()
    }
}

/// How often interrupt context tries a fault report's lock before it leaves the record in the queue (a loom model
/// keeps the exploration small).
#[cfg(not(all(loom, test)))]
const INTERRUPT_TRIES: usize = 64;
#[cfg(all(loom, test))]
const INTERRUPT_TRIES: usize = 2;

/// Whether a fault filer may wait for the locks it takes: a thread may, interrupt context only tries them. A try
/// that fails sets `wanted` and then tries once more: a holder that unlocks after that last try sees the flag (it
/// looks after unlocking) and drains what was left.
fn take<'a, T>(
    lock: &'a crate::sync::Mutex<T>,
    who: Drainer,
    wanted: &AtomicBool,
) -> Option<crate::sync::MutexGuard<'a, T>> {
    match who {
        Drainer::Thread => Some(lock.lock()),
        // A few tries: the holders' critical sections are a copy or a push (on another CPU they end quickly; on
        // this one, never while this interrupt runs, hence the bound).
        Drainer::Interrupt => (0..INTERRUPT_TRIES)
            .find_map(|_| {
                let guard = lock.try_lock();
                if guard.is_none() {
                    crate::sync::spin_loop();
                }
                guard
            })
            .or_else(|| {
                // Release: pairs with the holder's Acquire after its unlock.
                wanted.store(true, Ordering::Release);
                lock.try_lock()
            }),
    }
}

/// `book`, locked from thread context ([`Iommu::book`]): when interrupt context failed to take it meanwhile
/// (`Domains::book_wanted`), the drop drains the event queue, filing each record under its domain, before it
/// unlocks, and again after the unlock if the flag was set between the last look and the unlock. So a record an
/// interrupt announced while a structural operation held the bookkeeping is filed when that operation ends, never
/// left for a later interrupt (the SMMU raises one only when the queue goes from empty to non-empty).
pub(crate) struct BookGuard<'a, A: FrameAllocator, const D: usize> {
    iommu: &'a Iommu<A, D>,
    guard: Option<spin::MutexGuard<'a, Book<D>>>,
}

impl<A: FrameAllocator, const D: usize> core::ops::Deref for BookGuard<'_, A, D> {
    type Target = Book<D>;
    fn deref(&self) -> &Book<D> {
        self.guard
            .as_ref()
            .unwrap_or_else(|| unreachable!("held until dropped"))
    }
}

impl<A: FrameAllocator, const D: usize> core::ops::DerefMut for BookGuard<'_, A, D> {
    fn deref_mut(&mut self) -> &mut Book<D> {
        self.guard
            .as_mut()
            .unwrap_or_else(|| unreachable!("held until dropped"))
    }
}

impl<A: FrameAllocator, const D: usize> Drop for BookGuard<'_, A, D> {
    fn drop(&mut self) {
        let domains = &self.iommu.domains;
        while let Some(book) = self.guard.take() {
            // Acquire: pairs with the interrupt's Release store before its last try.
            if domains.book_wanted.swap(false, Ordering::Acquire) {
                // Thread context (a thread locked `book`): waiting for the event queue's lock is allowed. A
                // service failure is the global-error interrupt's to report.
                let _ = self
                    .iommu
                    .core
                    .drain_events(Drainer::Thread, |event| domains.file(&book, &event, Drainer::Thread));
            }
            drop(book);
            // A failed try between the look above and the unlock: drain once more, as the holder again.
            if domains.book_wanted.load(Ordering::Acquire) {
                self.guard = Some(domains.book.lock());
            }
        }
    }
}

impl<A: FrameAllocator, const D: usize> Iommu<A, D> {
    /// Locks the shared bookkeeping from thread context; see [`BookGuard`].
    pub(crate) fn book(&self) -> BookGuard<'_, A, D> {
        BookGuard {
            iommu: self,
            guard: Some(self.domains.book.lock()),
        }
    }

    /// Locks the shared bookkeeping once `sid`'s stream record is not busy (its owner writes its STE or CD table
    /// outside the bookkeeping, for a bounded time, and needs the bookkeeping only to settle it). The caller holds
    /// no other lock of the driver's.
    pub(crate) fn book_settled(&self, sid: u32) -> BookGuard<'_, A, D> {
        loop {
            let book = self.book();
            // The stream's record found through the StreamID index: O(1) however many streams are attached.
            if !book.stream(sid).is_some_and(|i| book.streams[i].busy) {
                return book;
            }
            drop(book);
            core::hint::spin_loop();
        }
    }

    /// Locks the shared bookkeeping once no stream record is busy: what the operations that read every stream
    /// (a hand-off's records, a restore) need. The caller holds no other lock of the driver's.
    pub(crate) fn book_quiet(&self) -> BookGuard<'_, A, D> {
        self.book_when(|_| true)
    }

    fn book_when(&self, waits_for: impl Fn(&StreamRecord) -> bool) -> BookGuard<'_, A, D> {
        loop {
            let book = self.book();
            if !book.streams.iter().any(|r| r.busy && waits_for(r)) {
                return book;
            }
            drop(book);
            core::hint::spin_loop();
        }
    }

    /// After a thread unlocked a fault report: drains when interrupt context failed to take one meanwhile.
    fn honour_report_requests(&self) {
        if self.domains.report_wanted.swap(false, Ordering::Acquire) {
            let _ = self.drain_faults(|_| {});
        }
    }
}

impl<const D: usize> Domains<D> {
    /// Files `event` under the domain of its stream (and substream) as `book` routes it, or in the SMMU-wide
    /// report. Returns `false` (nothing filed) when a report's lock could not be taken (interrupt context only):
    /// the record then stays in the event queue for a later drain.
    pub(super) fn file(&self, book: &Book<D>, event: &Event, who: Drainer) -> bool {
        let Some(fault) = Fault::of(event) else {
            // Records without a StreamID (IMPLEMENTATION DEFINED ones) are only counted.
            let Some(mut report) = take(&self.unattached_faults, who, &self.report_wanted) else {
                return false;
            };
            report.lost = report.lost.saturating_add(1);
            return true;
        };
        if let Some(id) = book.route(fault.stream, fault.substream)
            && let Some(slot) = self.slots.get(usize::from(id.index()))
        {
            let Some(mut report) = take(&slot.faults, who, &self.report_wanted) else {
                return false;
            };
            // Acquire: pairs with the Release of a domain going (see `Slot::generation`).
            if slot.generation.load(Ordering::Acquire) == id.generation() {
                report.push(fault);
                return true;
            }
        }
        let Some(mut report) = take(&self.unattached_faults, who, &self.report_wanted) else {
            return false;
        };
        report.push(fault);
        true
    }
}

impl<const D: usize> Book<D> {
    /// The domain `sid` (and `ssid`) is attached to.
    pub(super) fn route(&self, sid: u32, ssid: Option<u32>) -> Option<DomainId> {
        let record = &self.streams[self.stream(sid)?];
        match ssid {
            Some(ssid) if ssid != 0 => record
                .substreams
                .iter()
                .find(|(s, _)| *s == ssid)
                .map(|(_, d)| *d)
                .or(Some(record.domain)),
            _ => Some(record.domain),
        }
    }
}

impl<A: FrameAllocator, const D: usize> Iommu<A, D> {
    /// The faults filed for `domain` so far (a copy: the report keeps them until cleared).
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`].
    pub fn domain_faults(&self, domain: DomainId) -> Result<FaultReport, DomainError> {
        // The domain's read lock held across the copy: the slot cannot go to another domain meanwhile (its
        // generation changes, and its report is cleared, only under the write lock), so a stale handle never
        // reads the next domain's faults.
        let state = self.domains.get(domain)?;
        let report = self.domain_fault_slot(domain)?.faults.lock().clone();
        drop(state);
        self.honour_report_requests();
        Ok(report)
    }

    fn domain_fault_slot(&self, domain: DomainId) -> Result<&super::table::Slot, DomainError> {
        self.domains
            .slots
            .get(usize::from(domain.index()))
            .ok_or(DomainError::StaleDomain(domain))
    }

    /// Clears `domain`'s fault report and returns what it held.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`].
    pub fn clear_domain_faults(&self, domain: DomainId) -> Result<FaultReport, DomainError> {
        let state = self.domains.get(domain)?;
        let taken = core::mem::take(&mut *self.domain_fault_slot(domain)?.faults.lock());
        drop(state);
        self.honour_report_requests();
        Ok(taken)
    }

    /// The faults of streams no domain holds (and records without a StreamID, counted as lost): a copy.
    pub fn unattached_faults(&self) -> FaultReport {
        let report = self.domains.unattached_faults.lock().clone();
        self.honour_report_requests();
        report
    }

    /// Clears the SMMU-wide report of unattached streams' faults and returns what it held.
    pub fn clear_unattached_faults(&self) -> FaultReport {
        let taken = core::mem::take(&mut *self.domains.unattached_faults.lock());
        self.honour_report_requests();
        taken
    }

    /// Drains the event queue (until it is empty) and routes every record to the report of the domain its stream
    /// (and substream) is attached to, or to the SMMU-wide report. `also` sees each typed event too. Thread
    /// context: it waits for the bookkeeping lock and the event queue's (interrupt context uses
    /// [`Iommu::handle_interrupt`]).
    ///
    /// # Errors
    /// [`GlobalError::ServiceFailure`].
    pub fn drain_faults(&self, mut also: impl FnMut(&Event)) -> Result<crate::queue::evtq::DrainReport, GlobalError> {
        let mut total = crate::queue::evtq::DrainReport::default();
        loop {
            // The lock order: the bookkeeping (routing) before the event queue.
            let book = self.book();
            // Takes a pending overflow whether or not OVFLG said so too: left behind, it would report a loss again
            // on a later drain.
            let report = self.core.drain_events(Drainer::Thread, |event| {
                also(&event);
                self.domains.file(&book, &event, Drainer::Thread)
            })?;
            drop(book);
            total.events += report.events;
            total.overflow = total.overflow.or(report.overflow);
            if !report.pending {
                return Ok(total);
            }
        }
    }

    /// The SMMU's event-queue (or global-error) interrupt, on whichever CPU took it: files the faults the event
    /// queue holds under their domains, without ever waiting for a lock (see "Interrupt context" in
    /// [`Iommu`]'s docs). Each record is filed exactly once; a record it cannot file now (a lock held, by
    /// this CPU's interrupted code or briefly by another CPU) stays in the queue and the report says
    /// [`DrainReport::pending`](crate::queue::evtq::DrainReport::pending), and the lock's holder files it: a
    /// failed try leaves a flag (set, then the lock tried once more) that a thread holding the bookkeeping
    /// honours before it unlocks, a thread that read a fault report after it unlocks, and the event queue's holder
    /// before it unlocks. No later interrupt is needed (the SMMU raises one only when the queue goes from empty to
    /// non-empty).
    ///
    /// # Errors
    /// [`GlobalError::ServiceFailure`].
    pub fn handle_interrupt(&self) -> Result<crate::queue::evtq::DrainReport, GlobalError> {
        let domains = &self.domains;
        let mut total = crate::queue::evtq::DrainReport::default();
        loop {
            let book = domains.book.try_lock().or_else(|| {
                // Release: pairs with the holder's Acquire (`BookGuard`), which drains before it unlocks; tried
                // once more after the store, so a holder that unlocked before it is not missed.
                domains.book_wanted.store(true, Ordering::Release);
                domains.book.try_lock()
            });
            let Some(book) = book else {
                // A structural operation holds the routing and drains for this interrupt when it unlocks: leave
                // the records, say so. Global errors are still acknowledged (that path never waits).
                self.core.handle_global_errors()?;
                total.pending = true;
                return Ok(total);
            };
            // This drain covers what a failed try asked for so far (Acquire: pairs with its Release).
            domains.book_wanted.swap(false, Ordering::Acquire);
            let report = self.core.drain_events(Drainer::Interrupt, |event| {
                domains.file(&book, &event, Drainer::Interrupt)
            })?;
            drop(book);
            total.events += report.events;
            total.overflow = total.overflow.or(report.overflow);
            total.pending = report.pending;
            // Another interrupt failed its try between this drain and the unlock: drain for it (as the holder).
            if report.pending || !domains.book_wanted.load(Ordering::Acquire) {
                return Ok(total);
            }
        }
    }
}
