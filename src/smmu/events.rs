//! The event queue drained and global errors handled: each record handed to the caller's sink, losses reported
//! however the SMMU signalled them.

use core::fmt;

use tock_registers::interfaces::{Readable, Writeable};

use crate::hw::event::{Event, GlobalErrors};
use crate::hw::regs::CR0;
use crate::mem::FrameAllocator;
use crate::queue::evtq::{DrainReport, Overflow};
use crate::sync::Ordering;

use super::state::EventState;

use super::SmmuCore;
use super::init::set_cr0;

/// A fatal global error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
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

/// Who drains: a thread waits for the event queue's lock, interrupt context only tries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Drainer {
    /// Thread context: waits for the lock (a holder on another CPU drains briefly).
    Thread,
    /// Interrupt context: never waits (the holder may be the code this interrupt stopped, on this CPU); a taken
    /// lock sets the drain-again flag, which the holder honours before it lets go.
    #[allow(dead_code)] // the domain layer's interrupt-context drain (`Iommu::handle_interrupt`) comes next
    Interrupt,
}

impl<A: FrameAllocator> SmmuCore<A> {
    /// Reads the global errors, acknowledges the recoverable ones and reports them. An event queue abort is
    /// remembered as an overflow for the next [`SmmuCore::drain_events`]. Command errors are recovered by the
    /// command queue itself while it waits. GERRORN is written under the command queue's recovery lock, only
    /// tried: when a CPU is recovering a command error meanwhile, the errors are reported and acknowledged by the
    /// next call. Safe in interrupt context (no wait).
    ///
    /// # Errors
    /// [`GlobalError::ServiceFailure`] when GERROR.SFM_ERR is active (not acknowledged: the SMMU needs a reset).
    pub(crate) fn handle_global_errors(&self) -> Result<GlobalErrors, GlobalError> {
        let regs = self.smmu.regs();
        let Some(_gerrorn) = self.cmdq.try_lock_gerrorn() else {
            let active = crate::hw::event::active(regs.gerror.get(), regs.gerrorn.get());
            if active.contains(GlobalErrors::SFM_ERR) {
                return Err(GlobalError::ServiceFailure(active));
            }
            return Ok(active);
        };
        let gerror = regs.gerror.get();
        let gerrorn = regs.gerrorn.get();
        let active = crate::hw::event::active(gerror, gerrorn);
        if active.contains(GlobalErrors::SFM_ERR) {
            return Err(GlobalError::ServiceFailure(active));
        }
        let recoverable = active - GlobalErrors::CMDQ_ERR;
        if recoverable.contains(GlobalErrors::EVENTQ_ABT_ERR) {
            // Release: pairs with the drain's Acquire swap (a report only; nothing else hangs on it).
            self.abort_seen.store(true, Ordering::Release);
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
    /// signalled them (EVENTQ_PROD.OVFLG or GERROR.EVENTQ_ABT_ERR). A `sink` that answers `false` leaves the record
    /// for a later drain ([`DrainReport::pending`]).
    ///
    /// From interrupt context ([`Drainer::Interrupt`]) a drain that finds the event queue's lock taken drains
    /// nothing and returns an empty report with `pending` set: the holder drains again before it unlocks.
    ///
    /// # Errors
    /// [`GlobalError::ServiceFailure`] as [`SmmuCore::handle_global_errors`].
    pub(crate) fn drain_events(
        &self,
        who: Drainer,
        mut sink: impl FnMut(Event) -> bool,
    ) -> Result<DrainReport, GlobalError> {
        self.handle_global_errors()?;
        let mut report = DrainReport::default();
        loop {
            let Some(mut state) = self.lock_events(who) else {
                report.pending = true;
                return Ok(report);
            };
            loop {
                // Acquire/Release on the flag: a CPU that failed its try after this clear has its records (written
                // by the SMMU before the interrupt it took) found by the pass below or the next one.
                self.drain_again.store(false, Ordering::Release);
                let pass = state.queue.drain(self.smmu.page1_regs(), &mut sink);
                report.events += pass.events;
                report.overflow = report.overflow.or(pass.overflow);
                report.pending = pass.pending;
                if pass.pending || !self.drain_again.load(Ordering::Acquire) {
                    break;
                }
            }
            if report.overflow.is_none() {
                report.overflow = state.pending_overflow.take();
            }
            state.pending_overflow = None;
            if self.abort_seen.swap(false, Ordering::Acquire) && report.overflow.is_none() {
                report.overflow = Some(Overflow::EventQueueAbort);
            }
            drop(state);
            // A try that failed between the last look and the unlock: drain once more (as its holder now).
            if report.pending || !self.drain_again.load(Ordering::Acquire) {
                return Ok(report);
            }
        }
    }

    fn lock_events(&self, who: Drainer) -> Option<spin::MutexGuard<'_, EventState>> {
        match who {
            Drainer::Thread => Some(self.evtq.lock()),
            Drainer::Interrupt => self.evtq.try_lock().or_else(|| {
                // Set, then tried once more: a holder that unlocked before the store (and so missed it) is not
                // holding it any more, and one that unlocks after it sees it.
                self.drain_again.store(true, Ordering::Release);
                self.evtq.try_lock()
            }),
        }
    }

    /// Files the records in the event queue with `sink`, without looking at global errors (a detach filing what
    /// its stream left): one bounded drain, which holds every record the queue can. An overflow it sees is kept for
    /// the next [`SmmuCore::drain_events`]. Thread context only (it waits for the event queue's lock).
    /// An interrupt that found the lock taken meanwhile (the drain-again flag) is honoured before the lock goes.
    pub(crate) fn drain_queued(&self, mut sink: impl FnMut(Event) -> bool) {
        let mut state = self.evtq.lock();
        loop {
            self.drain_again.store(false, Ordering::Release);
            let report = state.queue.drain(self.smmu.page1_regs(), &mut sink);
            if report.overflow.is_some() && state.pending_overflow.is_none() {
                state.pending_overflow = report.overflow;
            }
            if report.pending || !self.drain_again.load(Ordering::Acquire) {
                return;
            }
        }
    }
}
