//! The multi-producer command queue itself: reservation, writing, in-order publication, completion and error
//! recovery (the protocol is described in the [module documentation](super)).

use core::ops::Range;

use super::faults::FaultLog;
use super::regs::CommandQueueRegisters;
use super::stream::{Cursor, Entries, is_sync};
use super::{BatchReport, COMMAND_BYTES, COMPLETION_TIMEOUT_US, CommandFault, CommandQueueError};
use crate::deadline::Deadline;
use crate::hw::command::{Command, SyncCompletion};
use crate::hw::regs::GERROR;
use crate::mem::{Coherency, DmaBlock};
use crate::queue::index::QueueGeometry;
use crate::sync::{AtomicU64, Ordering};

/// CMDQ_CONS.ERR values (IHI 0070 7.1).
const CERROR_ABT: u8 = 2;
const CERROR_ATC_INV_SYNC: u8 = 3;

/// Reservations of one submission whose refused commands are looked up at once; a submission with more segments
/// waits for the first ones to complete and looks them up before it reserves more.
const OWNED_RANGES: usize = 8;

/// The command queue in memory and the counters its producers share.
///
/// Positions in the queue's entry stream are counted with 64-bit counters that never wrap; CMDQ_PROD and CMDQ_CONS
/// hold them modulo twice the queue's size.
pub struct CommandQueue {
    memory: DmaBlock,
    /// A loom model's stand-in for the queue's memory: each slot's two words and the position last written to it.
    #[cfg(all(loom, test))]
    model_slots: std::vec::Vec<[AtomicU64; 3]>,
    geometry: QueueGeometry,
    #[cfg_attr(all(loom, test), allow(dead_code))]
    coherency: Coherency,
    /// At most this many commands between two CMD_SYNCs (`usize::MAX`: no limit).
    commands_per_sync: usize,
    /// End of the last reservation: entries below it belong to a submitter.
    reserved: AtomicU64,
    /// End of the last publication: entries below it are written and covered by a CMDQ_PROD write (or by one that
    /// is about to be made by the CPU that stored this value).
    published: AtomicU64,
    /// A lower bound of what the SMMU has consumed (CMDQ_CONS made monotonic), advanced by every CPU that reads CONS.
    consumed: AtomicU64,
    faults: FaultLog,
}

#[cfg(all(loom, test))]
extern crate std;

impl CommandQueue {
    /// Takes `memory` (zeroed by the CPU) as a queue of `geometry`'s size. For an SMMU that does not snoop the CPU's
    /// caches (`coherent` false) the zeros are cleaned to memory now, and every command as it is written.
    ///
    /// # Safety
    /// `memory` must be live, 8-byte aligned at `virt`, at least [`COMMAND_BYTES`] × `geometry.entries()` long, and
    /// accessed by nothing but this queue and the SMMU it is given to until [`CommandQueue::into_memory`].
    pub unsafe fn new(memory: DmaBlock, geometry: QueueGeometry, coherent: bool) -> Self {
        debug_assert!(memory.size >= COMMAND_BYTES * geometry.entries() as usize);
        let coherency = Coherency { coherent };
        coherency.clean(memory.virt.as_ptr(), memory.size);
        CommandQueue {
            memory,
            #[cfg(all(loom, test))]
            model_slots: (0..geometry.entries())
                .map(|_| [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(u64::MAX)])
                .collect(),
            geometry,
            coherency,
            commands_per_sync: usize::MAX,
            reserved: AtomicU64::new(0),
            published: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            faults: FaultLog::new(),
        }
    }

    /// Limits the commands between two CMD_SYNCs (an erratum's workaround): a longer submission gets a CMD_SYNC
    /// inserted after every `limit` commands, and every segment it is published in ends with one.
    pub fn limit_commands_per_sync(&mut self, limit: usize) {
        self.commands_per_sync = limit.max(1);
    }

    /// Gives the queue's memory back (the SMMU must no longer read it).
    pub fn into_memory(self) -> DmaBlock {
        self.memory
    }

    /// The queue's memory.
    pub fn memory(&self) -> &DmaBlock {
        &self.memory
    }

    /// The queue's size.
    pub fn geometry(&self) -> QueueGeometry {
        self.geometry
    }

    fn entries(&self) -> u64 {
        u64::from(self.geometry.entries())
    }

    /// CMDQ_PROD or CMDQ_CONS for a position of the entry stream (index and wrap bits).
    fn register_value(&self, position: u64) -> u32 {
        (position % (2 * self.entries())) as u32
    }

    /// The limit between CMD_SYNCs that segments are cut for: below the queue's size, so that every queue-full of
    /// entries holds a CMD_SYNC.
    fn sync_limit(&self) -> Option<usize> {
        (self.commands_per_sync != usize::MAX).then(|| self.commands_per_sync.min(self.geometry.entries() as usize - 1))
    }

    /// The limit segments are cut for, for a loom model's count of entries.
    #[cfg(all(loom, test))]
    pub(crate) fn sync_limit_for_models(&self) -> Option<usize> {
        self.sync_limit()
    }

    /// Writes the entry at `position` (a slot this CPU reserved, or the faulting slot the recovering CPU owns).
    fn write_slot(&self, position: u64, words: [u64; 2]) {
        let index = (position % self.entries()) as usize;
        #[cfg(all(loom, test))]
        {
            let slot = &self.model_slots[index];
            // Relaxed, like the driver's stores to the DMA block: the PROD write's release publishes them.
            slot[0].store(words[0], Ordering::Relaxed);
            slot[1].store(words[1], Ordering::Relaxed);
            slot[2].store(position, Ordering::Relaxed);
        }
        #[cfg(not(all(loom, test)))]
        {
            // SAFETY: the queue memory is live, aligned and ours for the life of `self` (`new`'s contract), and only
            // accessed atomically.
            let slots = unsafe { self.memory.words() };
            let slot = &slots[index * 2..][..2];
            // Relaxed: the CMDQ_PROD write that covers the slot is a release (`CommandQueueRegisters::write_prod`).
            slot[0].store(words[0], core::sync::atomic::Ordering::Relaxed);
            slot[1].store(words[1], core::sync::atomic::Ordering::Relaxed);
            self.coherency
                .clean(core::ptr::from_ref(&slot[0]).cast(), COMMAND_BYTES);
        }
    }

    /// The command in slot `index` (for the report of a refused one).
    fn read_slot(&self, index: u32) -> [u64; 2] {
        #[cfg(all(loom, test))]
        {
            let slot = &self.model_slots[index as usize];
            [slot[0].load(Ordering::Relaxed), slot[1].load(Ordering::Relaxed)]
        }
        #[cfg(not(all(loom, test)))]
        {
            // SAFETY: as in `write_slot`.
            let slots = unsafe { self.memory.words() };
            // Relaxed: the slot was written before the SMMU stopped at it, which the GERROR read acquired.
            [
                slots[index as usize * 2].load(core::sync::atomic::Ordering::Relaxed),
                slots[index as usize * 2 + 1].load(core::sync::atomic::Ordering::Relaxed),
            ]
        }
    }

    /// A loom model's SMMU reading slot `index`: its words and the position they were written for.
    #[cfg(all(loom, test))]
    pub(crate) fn model_read(&self, index: u32) -> ([u64; 2], u64) {
        let slot = &self.model_slots[index as usize];
        // Relaxed: the model's PROD read is the acquire.
        (
            [slot[0].load(Ordering::Relaxed), slot[1].load(Ordering::Relaxed)],
            slot[2].load(Ordering::Relaxed),
        )
    }

    /// Writes `commands` (then a CMD_SYNC when `sync`) and waits until the SMMU has consumed all of them. Safe to call
    /// from many CPUs at once; never from interrupt context (see the [module documentation](super)).
    ///
    /// The entries are published in segments that each fit the queue (one segment, one CMDQ_PROD write at most, when
    /// the submission fits); with a limit on commands per CMD_SYNC, a CMD_SYNC follows every `limit` of them and
    /// ends every segment. The caller waits for its own last entry only; a CMD_SYNC of another CPU's that follows
    /// completes its commands too.
    ///
    /// # Errors
    /// [`CommandQueueError::Refused`] once the whole submission was consumed when the SMMU refused any of its
    /// commands (the commands of other CPUs refused meanwhile are theirs to report);
    /// [`CommandQueueError::FaultLogOverflow`] when more commands were refused meanwhile than the log holds and one
    /// of this submission's may be among those lost; [`CommandQueueError::Timeout`],
    /// [`CommandQueueError::ServiceFailure`].
    pub fn submit<R: CommandQueueRegisters + ?Sized>(
        &self,
        regs: &R,
        commands: &[[u64; 2]],
        sync: bool,
    ) -> Result<BatchReport, CommandQueueError> {
        let mut report = BatchReport::default();
        let sync_words = sync_words()?;
        let entries = Entries::new(commands, sync, self.sync_limit(), sync_words);
        let deadline = Deadline::after_micros(COMPLETION_TIMEOUT_US);
        // Records of refused commands written from now on may be this submission's.
        let faults_since = self.faults.recorded();
        let mut owned: heapless::Vec<Range<u64>, OWNED_RANGES> = heapless::Vec::new();
        let mut lost = 0;
        let mut cursor = Cursor::default();
        while let Some((length, next)) = entries.segment(cursor, self.entries()) {
            if let Some(last) = owned.last()
                && owned.is_full()
            {
                self.wait_consumed(regs, last.end, &mut report, deadline, sync_words)?;
                lost += self.faults.collect(faults_since, &owned, &mut report);
                owned.clear();
            }
            let start = self.reserve(regs, length, &mut report, deadline, sync_words)?;
            crate::sync::delay_point();
            self.write(start, &entries, cursor, length, &mut report);
            crate::sync::delay_point();
            self.publish(regs, start, length, &mut report, deadline)?;
            // Cannot fail: emptied above when full.
            let _ = owned.push(start..start + length);
            cursor = next;
        }
        if let Some(last) = owned.last() {
            self.wait_consumed(regs, last.end, &mut report, deadline, sync_words)?;
            lost += self.faults.collect(faults_since, &owned, &mut report);
        }
        if let Some(&first) = report.faults.first() {
            return Err(CommandQueueError::Refused {
                first,
                count: report.fault_count,
            });
        }
        if lost > 0 {
            return Err(CommandQueueError::FaultLogOverflow { lost });
        }
        Ok(report)
    }

    /// Reserves `length` entries once the queue has room for them: returns the first one's position.
    fn reserve<R: CommandQueueRegisters + ?Sized>(
        &self,
        regs: &R,
        length: u64,
        report: &mut BatchReport,
        deadline: Deadline,
        sync_words: [u64; 2],
    ) -> Result<u64, CommandQueueError> {
        let mut error = None;
        // Relaxed: the reservation only needs the counter's atomicity; the slots' previous contents were consumed
        // before `consumed` (an acquire) passed them.
        let mut start = self.reserved.load(Ordering::Relaxed);
        let mut consumed = self.consumed.load(Ordering::Acquire);
        let reserved = deadline.poll(|| {
            while start + length <= consumed + self.entries() {
                match self
                    .reserved
                    .compare_exchange_weak(start, start + length, Ordering::Relaxed, Ordering::Relaxed)
                {
                    Ok(_) => return Some(start),
                    Err(now) => start = now,
                }
            }
            // No room yet: read CONS (a CONS that is no position the queue can have gives no room), and recover when
            // the SMMU has not moved since the last look (it may be stopped at an error).
            match self.refresh(regs) {
                Some(now) if now > consumed => consumed = now,
                _ => {
                    if let Err(e) = self.recover(regs, report, sync_words) {
                        error = Some(e);
                        return Some(0);
                    }
                }
            }
            None
        });
        if let Some(e) = error {
            return Err(e);
        }
        reserved.map_err(|_| self.timeout(regs))
    }

    /// Writes the `length` entries from `from` into the slots reserved at `start`.
    fn write(&self, start: u64, entries: &Entries<'_>, from: Cursor, length: u64, report: &mut BatchReport) {
        let mut cursor = from;
        for position in start..start + length {
            let Some(words) = entries.next(&mut cursor) else {
                break;
            };
            self.write_slot(position, words);
            report.commands += 1;
            report.syncs += u32::from(is_sync(&words));
        }
    }

    /// Publishes the entries `[start, start + length)` once every earlier reservation is published: writes CMDQ_PROD
    /// unless a later reservation exists (its owner's write will cover these entries), then advances `published`.
    fn publish<R: CommandQueueRegisters + ?Sized>(
        &self,
        regs: &R,
        start: u64,
        length: u64,
        report: &mut BatchReport,
        deadline: Deadline,
    ) -> Result<(), CommandQueueError> {
        let end = start + length;
        // Acquire: the earlier owners' slot writes and CMDQ_PROD writes happen before this CPU's PROD write, so PROD
        // never moves backwards and (barriers being cumulative) the PROD write below publishes their slots too.
        // The wait is on other CPUs' short write phases, never on the SMMU.
        let turn = || (self.published.load(Ordering::Acquire) == start).then_some(());
        if turn().is_none() {
            deadline.poll(turn).map_err(|_| self.timeout(regs))?;
        }
        // Relaxed: seeing a later reservation means it exists, and its owner publishes after this CPU's release
        // below; seeing none when one was just made only costs one more PROD write.
        if self.reserved.load(Ordering::Relaxed) == end {
            regs.write_prod(self.register_value(end));
            report.prod_writes += 1;
            report.mmio_writes += 1;
        }
        // Release: this CPU's slots and PROD write happen before the next owner's PROD write.
        self.published.store(end, Ordering::Release);
        Ok(())
    }

    /// Waits until the SMMU has consumed every entry before `end` (and so completed every CMD_SYNC among them),
    /// recovering from command errors meanwhile.
    fn wait_consumed<R: CommandQueueRegisters + ?Sized>(
        &self,
        regs: &R,
        end: u64,
        report: &mut BatchReport,
        deadline: Deadline,
        sync_words: [u64; 2],
    ) -> Result<(), CommandQueueError> {
        let mut error = None;
        let mut seen = None;
        let done = deadline.poll(|| {
            // Acquire: what the SMMU did for the entries (their invalidations, the records of refused ones) happens
            // before what the caller does next.
            if self.consumed.load(Ordering::Acquire) >= end {
                return Some(());
            }
            let now = self.refresh(regs);
            if now.is_some_and(|c| c >= end) {
                return Some(());
            }
            // GERROR is read only when the SMMU has not moved since the last look: it may be stopped at an error.
            if (now.is_none() || now == seen)
                && let Err(e) = self.recover(regs, report, sync_words)
            {
                error = Some(e);
                return Some(());
            }
            seen = now;
            None
        });
        if let Some(e) = error {
            return Err(e);
        }
        done.map_err(|_| self.timeout(regs))
    }

    /// The position CMDQ_CONS reads as (with the register, and the `consumed` it was told apart with): `None` when `cons` is no position the queue can have now (or, rarely, when
    /// the counters moved too far while it was read to tell which one it is).
    fn position_of<R: CommandQueueRegisters + ?Sized>(&self, regs: &R) -> Option<(u64, u32, u64)> {
        let span = 2 * self.entries();
        // Acquire: the CONS read below is not satisfied before this load; a `before` newer than the CONS read could
        // lie past the true position.
        let before = self.consumed.load(Ordering::Acquire);
        let cons = regs.read_cons();
        // Relaxed: `read_cons` is an acquire, so this load follows it; and every reservation the SMMU consumed from
        // happened before it (the owner published, the SMMU read PROD, then advanced CONS), so it sees them.
        let reserved = self.reserved.load(Ordering::Relaxed);
        // The true position C lies in [before, reserved]: `consumed` never passes C, and C never passes what was
        // reserved. Within less than twice the queue's size a position register names one position only.
        if reserved < before || reserved - before >= span {
            return None;
        }
        let offset = (u64::from(self.geometry.position(cons)) + span - before % span) % span;
        let position = before + offset;
        (position <= reserved).then_some((position, cons, before))
    }

    /// Reads CMDQ_CONS and advances `consumed` to it: returns what is known consumed, or `None` as
    /// [`CommandQueue::position_of`] does.
    fn refresh<R: CommandQueueRegisters + ?Sized>(&self, regs: &R) -> Option<u64> {
        let (position, _, before) = self.position_of(regs)?;
        if position <= before {
            // Nothing new: no write to the shared line.
            return Some(before);
        }
        // AcqRel: acquires what earlier advancers acquired from CONS, and releases this CPU's CONS acquire to
        // whoever reads `consumed` next (a reserver about to rewrite the slots, a waiter about to return).
        let previous = self.consumed.fetch_max(position, Ordering::AcqRel);
        Some(previous.max(position))
    }

    /// Handles GERROR while waiting. Service failure is fatal. On GERROR.CMDQ_ERR the first CPU to take the fault
    /// log's lock recovers, the others go on waiting: CERROR_ILL: the command is recorded for its owner, replaced with
    /// a CMD_SYNC and the error acknowledged, so the SMMU resumes at the CMD_SYNC; CERROR_ABT and CERROR_ATC_INV_SYNC:
    /// the error is acknowledged without touching the command, so the SMMU fetches (or syncs) it again.
    fn recover<R: CommandQueueRegisters + ?Sized>(
        &self,
        regs: &R,
        report: &mut BatchReport,
        sync_words: [u64; 2],
    ) -> Result<(), CommandQueueError> {
        let active = regs.read_gerror() ^ regs.read_gerrorn();
        if active & GERROR::SFM_ERR::SET.value != 0 {
            return Err(CommandQueueError::ServiceFailure);
        }
        if active & GERROR::CMDQ_ERR::SET.value == 0 {
            return Ok(());
        }
        let Some(locked) = self.faults.try_lock() else {
            // Another CPU is recovering.
            return Ok(());
        };
        // Again under the lock: the error seen above may be the one the previous holder just acknowledged.
        let gerror = regs.read_gerror();
        let gerrorn = regs.read_gerrorn();
        if (gerror ^ gerrorn) & GERROR::CMDQ_ERR::SET.value == 0 {
            return Ok(());
        }
        // The SMMU is stopped at the faulting command: CONS points at it.
        let Some((position, cons, _)) = self.position_of(regs) else {
            // Not told apart yet (the counters moved meanwhile): the next poll tries again.
            return Ok(());
        };
        let code = ((cons >> 24) & 0x7f) as u8;
        match code {
            CERROR_ABT | CERROR_ATC_INV_SYNC => report.fetch_retries += 1,
            _ => {
                // CERROR_ILL, and any code this driver does not know: the command cannot be run as it is.
                let index = self.geometry.index(cons);
                let fault = CommandFault {
                    code,
                    words: self.read_slot(index),
                    index,
                };
                locked.record(position, fault);
                // The SMMU restarts at CONS once the error is acknowledged: overwrite the faulting command with a
                // harmless CMD_SYNC first (IHI 0070: "software can ... replace the command with a CMD_SYNC"); the
                // GERRORN write is a release.
                self.write_slot(position, sync_words);
            }
        }
        regs.write_gerrorn(gerrorn ^ GERROR::CMDQ_ERR::SET.value);
        report.mmio_writes += 1;
        Ok(())
    }

    /// The lock every GERRORN write is made under (the recovery lock): the SMMU core acknowledges the other global
    /// errors under it, so that its write of GERRORN never undoes a recovering CPU's acknowledgement of CMDQ_ERR
    /// (or the reverse). `None` while another CPU holds it: the caller tries again later.
    pub(crate) fn try_lock_gerrorn(&self) -> Option<impl Sized + '_> {
        self.faults.try_lock()
    }

    fn timeout<R: CommandQueueRegisters + ?Sized>(&self, regs: &R) -> CommandQueueError {
        CommandQueueError::Timeout {
            cons: regs.read_cons(),
            // Relaxed: a report only.
            prod: self.register_value(self.published.load(Ordering::Relaxed)),
        }
    }
}

/// The CMD_SYNC the queue inserts and puts in place of a refused command.
fn sync_words() -> Result<[u64; 2], CommandQueueError> {
    Command::Sync {
        completion: SyncCompletion::None,
    }
    .encode()
    .map_err(CommandQueueError::Encoding)
}
