//! The event queue drained and global errors handled: each record handed to the caller's sink, losses reported
//! however the SMMU signalled them.

use core::fmt;

use tock_registers::interfaces::{Readable, Writeable};

use crate::hw::event::{Event, GlobalErrors};
use crate::hw::regs::CR0;
use crate::mem::FrameAllocator;
use crate::queue::evtq::{DrainReport, Overflow};

use super::SmmuCore;
use super::init::set_cr0;

/// A fatal global error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalError {
    /// GERROR.SFM_ERR: the SMMU entered service failure mode and stopped translating; it needs a reset.
    ServiceFailure(GlobalErrors),
}

impl fmt::Display for GlobalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GlobalError::ServiceFailure(all) => write!(
                f,
                "SMMU service failure (GERROR.SFM_ERR; active: {all}): translation stopped, the SMMU needs a reset"
            ),
        }
    }
}

impl<A: FrameAllocator> SmmuCore<A> {
    /// Reads the global errors, acknowledges the recoverable ones and reports them. An event queue abort is
    /// remembered as an overflow for the next [`SmmuCore::drain_events`]. Command errors are recovered by the
    /// command queue itself while it waits.
    ///
    /// # Errors
    /// [`GlobalError::ServiceFailure`] when GERROR.SFM_ERR is active (not acknowledged: the SMMU needs a reset).
    pub(crate) fn handle_global_errors(&mut self) -> Result<GlobalErrors, GlobalError> {
        let regs = self.smmu.regs();
        let gerror = regs.gerror.get();
        let gerrorn = regs.gerrorn.get();
        let active = crate::hw::event::active(gerror, gerrorn);
        if active.contains(GlobalErrors::SFM_ERR) {
            return Err(GlobalError::ServiceFailure(active));
        }
        let recoverable = active - GlobalErrors::CMDQ_ERR;
        if recoverable.contains(GlobalErrors::EVENTQ_ABT_ERR) {
            self.pending_overflow = Some(Overflow::EventQueueAbort);
        }
        if !recoverable.is_empty() {
            regs.gerrorn
                .set(crate::hw::event::acknowledge(gerror, gerrorn, recoverable));
            // An event queue abort may disable the queue on some implementations: turn it back on, and wait for
            // CR0ACK (bounded; on a timeout the next call tries again, as CR0ACK.EVENTQEN still reads 0).
            if !regs.cr0ack.is_set(CR0::EVENTQEN) {
                let _ = set_cr0(regs, regs.cr0.get() | CR0::EVENTQEN::SET.value);
            }
        }
        Ok(active)
    }

    /// Consumes every event the SMMU recorded, handing each to `sink`, and reports lost events however the SMMU
    /// signalled them (EVENTQ_PROD.OVFLG or GERROR.EVENTQ_ABT_ERR).
    ///
    /// # Errors
    /// [`GlobalError::ServiceFailure`] as [`SmmuCore::handle_global_errors`].
    pub(crate) fn drain_events(&mut self, sink: impl FnMut(Event)) -> Result<DrainReport, GlobalError> {
        self.handle_global_errors()?;
        let mut report = self.evtq.drain(self.smmu.page1_regs(), sink);
        if report.overflow.is_none() {
            report.overflow = self.pending_overflow;
        }
        self.pending_overflow = None;
        Ok(report)
    }

    /// Files the records in the event queue with `sink`, without looking at global errors (a detach filing what
    /// its stream left): one bounded drain, which holds every record the queue can. An overflow it sees is kept for
    /// the next [`SmmuCore::drain_events`].
    pub(crate) fn drain_queued(&mut self, sink: impl FnMut(Event)) {
        let report = self.evtq.drain(self.smmu.page1_regs(), sink);
        if report.overflow.is_some() && self.pending_overflow.is_none() {
            self.pending_overflow = report.overflow;
        }
    }
}
