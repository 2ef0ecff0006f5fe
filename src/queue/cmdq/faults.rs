//! The queue's shared log of refused commands: whichever CPU recovers from a CERROR_ILL records the command's
//! position in the entry stream, and each submitter, once its own CMD_SYNC completed, takes the records inside its
//! own reservations, so a refused command is reported to its owner and to no one else.
//!
//! The log is a ring of [`FAULT_LOG_ENTRIES`] records behind a small lock (an atomic flag: the recovering CPU only
//! `try_lock`s it, so a CPU never waits for another's recovery). Records are written in the order the SMMU stopped
//! at them, which is the order of their positions (CONS only advances), so a reader that finds records overwritten
//! knows whether any of them could have been its own.

use core::ops::Range;

use super::{BatchReport, CommandFault};
use crate::sync::{AtomicBool, AtomicU64, Ordering, spin_loop};

/// Records the log holds; older ones are overwritten (a submitter that may have lost one of its own then fails with
/// [`super::CommandQueueError::FaultLogOverflow`], never `Ok`). Loom models use a tiny log to reach that path.
#[cfg(not(all(loom, test)))]
pub(crate) const FAULT_LOG_ENTRIES: usize = 64;
#[cfg(all(loom, test))]
pub(crate) const FAULT_LOG_ENTRIES: usize = 2;

/// One record; every field is written and read only under the log's lock.
struct Record {
    /// The refused command's position in the queue's entry stream (monotonic).
    at: AtomicU64,
    /// CMDQ_CONS.ERR in bits [39:32], the slot in [31:0].
    code_and_slot: AtomicU64,
    words: [AtomicU64; 2],
}

pub(crate) struct FaultLog {
    lock: AtomicBool,
    /// Records written in all; the next one goes to `recorded % FAULT_LOG_ENTRIES`. Written under the lock, read
    /// without it by a submitter's fast path.
    recorded: AtomicU64,
    records: [Record; FAULT_LOG_ENTRIES],
}

/// The log, locked (unlocked on drop).
pub(crate) struct Locked<'a> {
    log: &'a FaultLog,
}

impl FaultLog {
    pub(crate) fn new() -> Self {
        FaultLog {
            lock: AtomicBool::new(false),
            recorded: AtomicU64::new(0),
            records: core::array::from_fn(|_| Record {
                at: AtomicU64::new(0),
                code_and_slot: AtomicU64::new(0),
                words: [AtomicU64::new(0), AtomicU64::new(0)],
            }),
        }
    }

    /// Records written so far: a submitter takes this before it publishes anything, and later looks only at
    /// records written since.
    pub(crate) fn recorded(&self) -> u64 {
        // Relaxed: a record of one of the caller's commands is written after the caller published it (the SMMU saw
        // it first), so this load, made before, cannot see it; and the load in `collect` is ordered after the record
        // by the caller's acquire of CONS, which the SMMU advanced only after the recovering CPU's release.
        self.recorded.load(Ordering::Relaxed)
    }

    /// The lock, if no other CPU holds it.
    pub(crate) fn try_lock(&self) -> Option<Locked<'_>> {
        // Acquire: the previous holder's records and its GERRORN acknowledgement happen before what this holder
        // reads.
        self.lock
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| Locked { log: self })
    }

    /// The lock, spinning while another CPU holds it (its critical section is a few register accesses and stores).
    fn lock(&self) -> Locked<'_> {
        loop {
            if let Some(locked) = self.try_lock() {
                return locked;
            }
            spin_loop();
        }
    }

    /// Adds the records written since `since` whose position lies in one of `owned` to `report` (its `faults` and
    /// `fault_count`). Returns how many records written since `since` were overwritten before they could be read
    /// and may have been inside `owned` (0 when every record that could be the caller's was read).
    pub(crate) fn collect(&self, since: u64, owned: &[Range<u64>], report: &mut BatchReport) -> u64 {
        if self.recorded() == since {
            // The common case: nothing was refused while the caller's commands were in the queue.
            return 0;
        }
        let _locked = self.lock();
        // Relaxed under the lock: its acquire ordered the last holder's writes before these loads.
        let recorded = self.recorded.load(Ordering::Relaxed);
        let kept_from = recorded.saturating_sub(FAULT_LOG_ENTRIES as u64).max(since);
        for position in kept_from..recorded {
            let record = &self.records[(position % FAULT_LOG_ENTRIES as u64) as usize];
            let at = record.at.load(Ordering::Relaxed);
            if owned.iter().any(|range| range.contains(&at)) {
                let code_and_slot = record.code_and_slot.load(Ordering::Relaxed);
                let fault = CommandFault {
                    code: (code_and_slot >> 32) as u8,
                    words: [
                        record.words[0].load(Ordering::Relaxed),
                        record.words[1].load(Ordering::Relaxed),
                    ],
                    index: code_and_slot as u32,
                };
                let _ = report.faults.push(fault);
                report.fault_count += 1;
            }
        }
        let lost = kept_from - since;
        if lost == 0 {
            return 0;
        }
        // Records are in position order: every lost one lies before the oldest kept. None of them can be the
        // caller's when all of its reservations start at or after that.
        let oldest_kept = if kept_from < recorded {
            self.records[(kept_from % FAULT_LOG_ENTRIES as u64) as usize]
                .at
                .load(Ordering::Relaxed)
        } else {
            u64::MAX
        };
        if owned.iter().any(|range| range.start < oldest_kept) {
            lost
        } else {
            0
        }
    }
}

impl Locked<'_> {
    /// Records `fault`, the command at position `at` of the entry stream.
    pub(crate) fn record(&self, at: u64, fault: CommandFault) {
        let log = self.log;
        // Relaxed throughout: only lock holders read the records, and the unlock releases them.
        let position = log.recorded.load(Ordering::Relaxed);
        let record = &log.records[(position % FAULT_LOG_ENTRIES as u64) as usize];
        record.at.store(at, Ordering::Relaxed);
        record
            .code_and_slot
            .store(u64::from(fault.code) << 32 | u64::from(fault.index), Ordering::Relaxed);
        record.words[0].store(fault.words[0], Ordering::Relaxed);
        record.words[1].store(fault.words[1], Ordering::Relaxed);
        // Relaxed: readers without the lock only compare it with an earlier value (see `FaultLog::recorded`); the
        // ordering that makes it visible to the owner is the GERRORN release that follows.
        log.recorded.store(position + 1, Ordering::Relaxed);
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // Release: the records (and the GERRORN acknowledgement before it) happen before the next holder's reads.
        self.log.lock.store(false, Ordering::Release);
    }
}
