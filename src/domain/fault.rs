//! Faults filed per domain: every event record routed to the report of the domain its stream (and substream) is
//! attached to, or to the SMMU-wide report, drained until the queue is empty.

use crate::smmu::Drainer;
use core::fmt;

use crate::hw::event::Event;
use crate::ids::DomainId;
use crate::mem::FrameAllocator;
use crate::smmu::GlobalError;

use super::{ActiveSmmu, DomainError, Domains, FAULT_REPORT_CAPACITY};

/// Which stage a [`Fault`] was taken at (so a caller of the domain API needs nothing from [`crate::hw`]).
pub use crate::hw::event::Stage as FaultStage;

/// One fault a domain's streams took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The event's architectural name (`F_TRANSLATION`, `F_PERMISSION`, ...).
    pub kind: &'static str,
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
            kind: event.name(),
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
    pub fn count(&self, kind: &str) -> usize {
        self.faults.iter().filter(|f| f.kind == kind).count()
    }
}

impl<const D: usize> Domains<D> {
    /// Files `event` in the report of the domain its (stream, substream) is attached to now, or the SMMU-wide one.
    pub(super) fn file(&mut self, event: &Event) {
        match Fault::of(event) {
            Some(fault) => match self.route(fault.stream, fault.substream) {
                Some(id) => match self.get_mut(id) {
                    Ok(state) => state.faults.push(fault),
                    Err(_) => self.unattached_faults.push(fault),
                },
                None => self.unattached_faults.push(fault),
            },
            // Records without a StreamID (IMPLEMENTATION DEFINED ones) are only counted.
            None => self.unattached_faults.lost = self.unattached_faults.lost.saturating_add(1),
        }
    }

    /// The domain a fault of (sid, ssid) belongs to.
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

impl<A: FrameAllocator, const D: usize> ActiveSmmu<A, D> {
    /// The faults routed to `domain` since it was created or last cleared.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`].
    pub fn domain_faults(&self, domain: DomainId) -> Result<&FaultReport, DomainError> {
        Ok(&self.domains.get(domain)?.faults)
    }

    /// Clears `domain`'s fault report and returns what it held.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`].
    pub fn clear_domain_faults(&mut self, domain: DomainId) -> Result<FaultReport, DomainError> {
        Ok(core::mem::take(&mut self.domains.get_mut(domain)?.faults))
    }

    /// Faults of streams attached to no domain (and records without a StreamID), SMMU-wide.
    pub fn unattached_faults(&self) -> &FaultReport {
        &self.domains.unattached_faults
    }

    /// Clears the SMMU-wide report of unattached streams' faults and returns what it held.
    pub fn clear_unattached_faults(&mut self) -> FaultReport {
        core::mem::take(&mut self.domains.unattached_faults)
    }

    /// Drains the event queue (as [`ActiveSmmu::drain_events`], until it is empty) and routes every record to the
    /// report of the domain its stream (and substream) is attached to, or to the SMMU-wide report. `also` sees
    /// each typed event too.
    ///
    /// # Errors
    /// [`GlobalError::ServiceFailure`].
    pub fn drain_faults(
        &mut self,
        mut also: impl FnMut(&Event),
    ) -> Result<crate::queue::evtq::DrainReport, GlobalError> {
        let mut total = crate::queue::evtq::DrainReport::default();
        loop {
            let ActiveSmmu { core, domains } = self;
            // Takes a pending overflow whether or not OVFLG said so too: left behind, it would report a loss again
            // on a later drain.
            let report = core.drain_events(Drainer::Thread, |event| {
                also(&event);
                domains.file(&event);
                true
            })?;
            total.events += report.events;
            total.overflow = total.overflow.or(report.overflow);
            if !report.pending {
                return Ok(total);
            }
        }
    }
}
