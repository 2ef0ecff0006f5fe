//! The command queue: batched submission (many commands, one PROD write), completion by CMD_SYNC and a bounded
//! poll of CONS, and recovery from command errors as IHI 0070 (7.1) describes them:
//! - CERROR_ILL: the command is illegal. It is reported, overwritten with a CMD_SYNC and the queue restarted, so
//!   the commands after it still complete; the submission then fails with [`CommandQueueError::Refused`].
//! - CERROR_ABT: the SMMU could not fetch the command (an external abort on the queue's memory). Nothing is
//!   wrong with the command: the error is acknowledged and the SMMU fetches it again (counted in
//!   [`BatchReport::fetch_retries`]) until the batch's deadline.
//! - CERROR_ATC_INV_SYNC: a CMD_SYNC found an ATC invalidation that timed out. The CMD_SYNC is retried the same way.

use core::fmt;
use core::sync::atomic::Ordering;

use tock_registers::interfaces::{Readable, Writeable};

use crate::deadline::Deadline;
use crate::hw::command::{self, Command, CommandError, SyncCompletion};
use crate::hw::regs::{GERROR, QUEUE_INDEX, SmmuPage0};
use crate::mem::{Coherency, DmaBlock, write_barrier};
use crate::queue::index::QueueGeometry;

/// Bytes per command.
pub const COMMAND_BYTES: usize = 16;
/// How long a batch may take to complete before the driver gives up (the SMMU is considered stuck).
pub const COMPLETION_TIMEOUT_US: u64 = 1_000_000;
/// Command errors reported per batch (further ones are still skipped and counted).
pub const MAX_REPORTED_FAULTS: usize = 4;

/// CMDQ_CONS.ERR values (IHI 0070 7.1).
const CERROR_ABT: u8 = 2;
const CERROR_ATC_INV_SYNC: u8 = 3;

/// A command the SMMU refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandFault {
    /// CMDQ_CONS.ERR: 1 CERROR_ILL, 2 CERROR_ABT, 3 CERROR_ATC_INV_SYNC.
    pub code: u8,
    /// The command's two words as they were in the queue.
    pub words: [u64; 2],
    /// Its slot.
    pub index: u32,
}

impl CommandFault {
    /// The error's architectural name.
    pub fn code_name(&self) -> &'static str {
        match self.code {
            0 => "CERROR_NONE",
            1 => "CERROR_ILL",
            2 => "CERROR_ABT",
            3 => "CERROR_ATC_INV_SYNC",
            _ => "CERROR_reserved",
        }
    }
}

impl fmt::Display for CommandFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opcode = (self.words[0] & 0xff) as u8;
        write!(f, "{} on ", self.code_name())?;
        match command::opcode_name(opcode) {
            Some(name) => write!(f, "{name} (opcode {opcode:#04x})")?,
            None => write!(f, "reserved opcode {opcode:#04x}")?,
        }
        write!(
            f,
            " at slot {}: {:#018x} {:#018x}; skipped",
            self.index, self.words[0], self.words[1]
        )
    }
}

/// What one submission did: the measure of batching.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Commands written, CMD_SYNCs included.
    pub commands: u32,
    /// CMD_SYNCs among them.
    pub syncs: u32,
    /// Writes to CMDQ_PROD.
    pub prod_writes: u32,
    /// Every MMIO write (PROD, and GERRORN for error recovery).
    pub mmio_writes: u32,
    /// Commands the SMMU could not fetch (CERROR_ABT) or CMD_SYNCs it could not complete (CERROR_ATC_INV_SYNC)
    /// that were retried and then completed.
    pub fetch_retries: u32,
    /// Commands the SMMU refused (first [`MAX_REPORTED_FAULTS`]); on a successful submission always empty.
    pub faults: heapless::Vec<CommandFault, MAX_REPORTED_FAULTS>,
    /// Commands refused in all; on a successful submission always 0.
    pub fault_count: u32,
}

/// Why a submission failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandQueueError {
    /// A command has a field the architecture cannot encode; nothing was written.
    Encoding(CommandError),
    /// A command was pushed onto a [`Batch`] that already holds `capacity` commands; the batch is unchanged (submit
    /// it, then push again).
    BatchFull {
        /// [`BATCH_CAPACITY`].
        capacity: usize,
    },
    /// The SMMU did not consume the queue in time (CONS stuck at `cons`).
    Timeout {
        /// CMDQ_CONS when the driver gave up.
        cons: u32,
        /// The driver's PROD.
        prod: u32,
    },
    /// The SMMU entered service failure mode (GERROR.SFM_ERR): it stopped serving and needs a reset.
    ServiceFailure,
    /// The SMMU refused `count` commands of the batch as illegal (CERROR_ILL), the first being `first`. Each was
    /// replaced by a CMD_SYNC and the rest of the batch completed, but what the refused commands were meant to do
    /// (an invalidation, a prefetch) did not happen.
    Refused {
        /// The first command refused.
        first: CommandFault,
        /// Commands refused in all.
        count: u32,
    },
    /// [`crate::ActiveSmmu::submit`] refused the command at `index` of the batch: it may do more than invalidate,
    /// prefetch or synchronise (see [`crate::hw::command::vet`]). Nothing of the batch was written.
    NotAllowed {
        /// Its index in the batch.
        index: usize,
        /// What it would do.
        reason: crate::hw::command::Unvetted,
    },
}

impl fmt::Display for CommandQueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandQueueError::Encoding(e) => write!(f, "command not encodable: {e}"),
            CommandQueueError::BatchFull { capacity } => {
                write!(f, "command batch full ({capacity} commands): submit it first")
            }
            CommandQueueError::Timeout { cons, prod } => {
                write!(f, "command queue stuck: CONS {cons:#x}, PROD {prod:#x}")
            }
            CommandQueueError::ServiceFailure => {
                f.write_str("SMMU in service failure mode (GERROR.SFM_ERR): it stopped serving and needs a reset")
            }
            CommandQueueError::Refused { first, count } => {
                write!(f, "{count} command(s) refused, the first: {first}")
            }
            CommandQueueError::NotAllowed { index, reason } => {
                write!(f, "command {index} of the batch not submitted, nor the rest: {reason}")
            }
        }
    }
}

/// Commands encoded on the stack before submission (a batch is submitted with one more, its CMD_SYNC).
pub const BATCH_CAPACITY: usize = 64;

/// Most commands an SMMU with [`crate::features::Quirks::CMDQ_SYNC_EVERY_63`] (Arm MMU-700, erratum 2812531)
/// may be given between two CMD_SYNCs.
pub const MMU700_COMMANDS_PER_SYNC: usize = 63;

/// A batch of encoded commands, submitted with one PROD write per queue-full.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    words: heapless::Vec<[u64; 2], BATCH_CAPACITY>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Batch::default()
    }

    /// Encodes and appends `command`.
    ///
    /// # Errors
    /// [`CommandQueueError::Encoding`] for a command with an unencodable field, [`CommandQueueError::BatchFull`]
    /// when the batch already holds [`BATCH_CAPACITY`] commands ([`Batch::is_full`]: submit first); the batch is
    /// unchanged then.
    pub fn push(&mut self, command: &Command) -> Result<(), CommandQueueError> {
        let words = command.encode().map_err(CommandQueueError::Encoding)?;
        self.push_words(words)
    }

    /// Appends a raw command (for commands this driver does not model, and for tests that inject bad ones).
    ///
    /// # Errors
    /// [`CommandQueueError::BatchFull`] when the batch already holds [`BATCH_CAPACITY`] commands; it is unchanged
    /// then.
    pub fn push_words(&mut self, words: [u64; 2]) -> Result<(), CommandQueueError> {
        self.words.push(words).map_err(|_| CommandQueueError::BatchFull {
            capacity: BATCH_CAPACITY,
        })
    }

    /// Whether the batch holds [`BATCH_CAPACITY`] commands.
    pub fn is_full(&self) -> bool {
        self.words.is_full()
    }

    /// Number of commands.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// The encoded commands.
    pub fn words(&self) -> &[[u64; 2]] {
        &self.words
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }
}

/// The command queue in memory and the driver's copy of PROD.
pub(crate) struct CommandQueue {
    memory: DmaBlock,
    geometry: QueueGeometry,
    prod: u32,
    coherency: Coherency,
    /// At most this many commands between two CMD_SYNCs (`usize::MAX`: no limit).
    commands_per_sync: usize,
}

impl CommandQueue {
    /// Takes `memory` (zeroed by the CPU) as the queue; for a non-coherent SMMU the zeros are cleaned to memory
    /// before the SMMU is given the queue's base.
    pub(crate) fn new(memory: DmaBlock, geometry: QueueGeometry, coherency: Coherency) -> Self {
        coherency.clean(memory.virt.as_ptr(), memory.size);
        CommandQueue {
            memory,
            geometry,
            prod: 0,
            coherency,
            commands_per_sync: usize::MAX,
        }
    }

    /// Limits the commands between two CMD_SYNCs (an erratum's workaround): a longer submission gets a CMD_SYNC
    /// inserted after every `limit` commands.
    pub(crate) fn limit_commands_per_sync(&mut self, limit: usize) {
        self.commands_per_sync = limit.max(1);
    }

    pub(crate) fn into_memory(self) -> DmaBlock {
        self.memory
    }

    pub(crate) fn memory(&self) -> &DmaBlock {
        &self.memory
    }

    pub(crate) fn geometry(&self) -> QueueGeometry {
        self.geometry
    }

    fn write_slot(&self, index: u32, words: [u64; 2]) {
        // SAFETY: the queue memory is live for the life of `self` and accessed atomically.
        let slots = unsafe { self.memory.words() };
        let slot = &slots[index as usize * 2..][..2];
        slot[0].store(words[0], Ordering::Relaxed);
        slot[1].store(words[1], Ordering::Relaxed);
        self.coherency
            .clean(core::ptr::from_ref(&slot[0]).cast(), COMMAND_BYTES);
    }

    fn read_slot(&self, index: u32) -> [u64; 2] {
        // SAFETY: as in `write_slot`.
        let slots = unsafe { self.memory.words() };
        [
            slots[index as usize * 2].load(Ordering::Relaxed),
            slots[index as usize * 2 + 1].load(Ordering::Relaxed),
        ]
    }

    /// Handles GERROR while waiting. CERROR_ILL: the command is reported, replaced with a CMD_SYNC and the error
    /// acknowledged, so the SMMU resumes at the CMD_SYNC. CERROR_ABT and CERROR_ATC_INV_SYNC: the error is
    /// acknowledged without touching the command, so the SMMU fetches (or syncs) it again. Service failure is
    /// fatal.
    fn recover(&mut self, regs: &SmmuPage0, report: &mut BatchReport) -> Result<(), CommandQueueError> {
        let gerror = regs.gerror.get();
        let gerrorn = regs.gerrorn.get();
        let active = gerror ^ gerrorn;
        if active & GERROR::SFM_ERR::SET.value != 0 {
            return Err(CommandQueueError::ServiceFailure);
        }
        if active & GERROR::CMDQ_ERR::SET.value == 0 {
            return Ok(());
        }
        let cons = regs.cmdq_cons.get();
        let code = regs.cmdq_cons.read(QUEUE_INDEX::ERR) as u8;
        let index = self.geometry.index(cons);
        match code {
            CERROR_ABT | CERROR_ATC_INV_SYNC => report.fetch_retries += 1,
            _ => {
                // CERROR_ILL, and any code this driver does not know: the command cannot be run as it is.
                let fault = CommandFault {
                    code,
                    words: self.read_slot(index),
                    index,
                };
                let _ = report.faults.push(fault);
                report.fault_count += 1;
                // The SMMU restarts at CONS once the error is acknowledged: overwrite the faulting command with a
                // harmless CMD_SYNC first (IHI 0070: "software can ... replace the command with a CMD_SYNC").
                let sync = Command::Sync {
                    completion: SyncCompletion::None,
                }
                .encode()
                .map_err(CommandQueueError::Encoding)?;
                self.write_slot(index, sync);
                write_barrier();
            }
        }
        regs.gerrorn.set(gerrorn ^ GERROR::CMDQ_ERR::SET.value);
        report.mmio_writes += 1;
        Ok(())
    }

    /// Writes `commands` (then a CMD_SYNC when `sync`) and waits until the SMMU has consumed all of them.
    /// Commands are written in as few PROD updates as the queue's free space allows (one when it fits); with a
    /// limit on commands per CMD_SYNC, a CMD_SYNC follows every `limit` of them.
    ///
    /// # Errors
    /// [`CommandQueueError::Refused`] once the whole batch was consumed when the SMMU refused any command;
    /// [`CommandQueueError::Timeout`], [`CommandQueueError::ServiceFailure`].
    pub(crate) fn submit(
        &mut self,
        regs: &SmmuPage0,
        commands: &[[u64; 2]],
        sync: bool,
    ) -> Result<BatchReport, CommandQueueError> {
        let mut report = BatchReport::default();
        let sync_words = Command::Sync {
            completion: SyncCompletion::None,
        }
        .encode()
        .map_err(CommandQueueError::Encoding)?;
        let is_sync = |words: &[u64; 2]| words[0] & 0xff == u64::from(command::opcode::SYNC);
        // The stream of entries: the commands, with a CMD_SYNC inserted wherever `commands_per_sync` commands
        // would otherwise pass without one, then the final CMD_SYNC.
        let limit = self.commands_per_sync;
        let mut since_sync = 0usize;
        let mut entries = commands
            .iter()
            .copied()
            .flat_map(|words| {
                let inserted = if !is_sync(&words) && since_sync == limit {
                    since_sync = 0;
                    Some(sync_words)
                } else {
                    None
                };
                since_sync = if is_sync(&words) { 0 } else { since_sync + 1 };
                inserted.into_iter().chain(core::iter::once(words))
            })
            .chain(sync.then_some(sync_words))
            .peekable();
        let deadline = Deadline::after_micros(COMPLETION_TIMEOUT_US);
        while entries.peek().is_some() {
            // Wait for room. A CONS the driver's PROD cannot have (more than a queue ahead of it) is neither
            // full nor has a free slot: keep waiting for it to make sense, until the deadline.
            let cons = self.wait(regs, &mut report, deadline, |g, prod, cons| {
                g.free_slots(prod, cons).is_some_and(|free| free > 0)
            })?;
            let free = self.geometry.free_slots(self.prod, cons).unwrap_or(0) as usize;
            for words in entries.by_ref().take(free) {
                self.write_slot(self.geometry.index(self.prod), words);
                self.prod = self.geometry.advance(self.prod, 1);
                report.commands += 1;
                report.syncs += u32::from(is_sync(&words));
            }
            // Commands must be visible before the SMMU is told about them.
            write_barrier();
            regs.cmdq_prod.set(self.prod);
            report.prod_writes += 1;
            report.mmio_writes += 1;
        }
        // Wait for the whole batch (and its CMD_SYNC) to be consumed: the last entry written is one before PROD.
        let target = self.geometry.advance(self.prod, 2 * self.geometry.entries() - 1);
        self.wait(regs, &mut report, deadline, |g, _, cons| g.has_consumed(cons, target))?;
        if let Some(&first) = report.faults.first() {
            return Err(CommandQueueError::Refused {
                first,
                count: report.fault_count,
            });
        }
        Ok(report)
    }

    fn wait(
        &mut self,
        regs: &SmmuPage0,
        report: &mut BatchReport,
        deadline: Deadline,
        done: impl Fn(QueueGeometry, u32, u32) -> bool,
    ) -> Result<u32, CommandQueueError> {
        let mut error = None;
        let result = deadline.poll(|| {
            let cons = regs.cmdq_cons.get();
            if done(self.geometry, self.prod, cons) {
                return Some(cons);
            }
            if let Err(e) = self.recover(regs, report) {
                error = Some(e);
                return Some(cons);
            }
            None
        });
        if let Some(e) = error {
            return Err(e);
        }
        result.map_err(|_| CommandQueueError::Timeout {
            cons: regs.cmdq_cons.get(),
            prod: self.prod,
        })
    }
}

#[cfg(test)]
mod tests {
    //! The queue against a fake SMMU: a thread that consumes commands like the hardware (advancing CONS, stopping
    //! at an illegal opcode with CERROR_ILL and GERROR.CMDQ_ERR until the driver acknowledges).
    extern crate std;

    use super::*;
    use crate::mem::FrameAllocator;
    use crate::testing::HeapFrames;
    use std::boxed::Box;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::vec::Vec;

    const ILLEGAL: u64 = 0x7f;
    /// A command whose second word is this makes the fake SMMU's first fetch of it abort (CERROR_ABT).
    const ABORT_FIRST_FETCH: u64 = 0xab0b_ab0b;

    struct FakeSmmu {
        regs: Box<SmmuPage0>,
        stop: Arc<AtomicBool>,
        consumer: Option<std::thread::JoinHandle<Vec<u8>>>,
    }

    impl FakeSmmu {
        /// Stops the consumer and returns the opcodes it consumed, in order.
        fn finish(mut self) -> Vec<u8> {
            self.stop.store(true, Ordering::SeqCst);
            self.consumer.take().map(|c| c.join().unwrap()).unwrap_or_default()
        }
    }

    impl Drop for FakeSmmu {
        fn drop(&mut self) {
            // The consumer must not outlive the registers and queue it reads, even when a test fails.
            self.stop.store(true, Ordering::SeqCst);
            if let Some(c) = self.consumer.take() {
                let _ = c.join();
            }
        }
    }

    /// GERROR is read-only to the driver; the fake hardware writes it behind the register type.
    fn set_gerror(regs_address: usize, value: u32) {
        // SAFETY: GERROR is the u32 cell at offset 0x60 of a live register block.
        unsafe { core::ptr::write_volatile((regs_address + 0x60) as *mut u32, value) }
    }

    fn zeroed_page0() -> Box<SmmuPage0> {
        // SAFETY: the register block is plain u32/u64 cells; all-zero is a valid value.
        unsafe { Box::new(core::mem::zeroed()) }
    }

    /// Starts the consumer thread over `queue` (CPU address, `entries` slots). Returns the fake and a log of
    /// consumed opcodes.
    fn start(queue: usize, geometry: QueueGeometry) -> FakeSmmu {
        let regs = zeroed_page0();
        let stop = Arc::new(AtomicBool::new(false));
        let regs_address = &*regs as *const SmmuPage0 as usize;
        let stop2 = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            // SAFETY: the box outlives the thread (joined before it is dropped); registers are cells.
            let regs = unsafe { &*(regs_address as *const SmmuPage0) };
            let mut consumed = Vec::new();
            let mut cons = 0u32;
            let mut aborted_once = Vec::new();
            while !stop2.load(Ordering::SeqCst) {
                let prod = regs.cmdq_prod.get();
                if geometry.is_empty(prod, cons) {
                    std::thread::yield_now();
                    continue;
                }
                let index = geometry.index(cons) as usize;
                // SAFETY: the queue memory is live while the driver runs.
                let word0 = unsafe { core::ptr::read_volatile((queue as *const u64).add(index * 2)) };
                // SAFETY: as above.
                let word1 = unsafe { core::ptr::read_volatile((queue as *const u64).add(index * 2 + 1)) };
                let opcode = (word0 & 0xff) as u8;
                let abort = word1 == ABORT_FIRST_FETCH && !aborted_once.contains(&cons);
                if u64::from(opcode) == ILLEGAL || abort {
                    // Stop at the command with CERROR_ILL (or CERROR_ABT for a fetch that "aborted"), raise
                    // CMDQ_ERR, wait for the acknowledgement.
                    let code = if abort {
                        aborted_once.push(cons);
                        2
                    } else {
                        1
                    };
                    regs.cmdq_cons.set(cons | (code << 24));
                    let gerrorn = regs.gerrorn.get();
                    set_gerror(regs_address, gerrorn ^ 1);
                    while regs.gerrorn.get() == gerrorn && !stop2.load(Ordering::SeqCst) {
                        std::thread::yield_now();
                    }
                    regs.cmdq_cons.set(cons);
                    continue; // re-read the (rewritten) slot
                }
                consumed.push(opcode);
                cons = geometry.advance(cons, 1);
                regs.cmdq_cons.set(cons);
            }
            consumed
        });
        FakeSmmu {
            regs,
            stop,
            consumer: Some(handle),
        }
    }

    fn queue(frames: &HeapFrames, log2: u8) -> CommandQueue {
        let geometry = QueueGeometry::new(log2).unwrap();
        let memory = frames
            .allocate_zeroed(COMMAND_BYTES << log2, COMMAND_BYTES << log2)
            .unwrap();
        CommandQueue::new(memory, geometry, Coherency { coherent: true })
    }

    fn cfgi(sid: u32) -> [u64; 2] {
        Command::CfgiSte { sid, leaf: true }.encode().unwrap()
    }

    #[test]
    fn a_batch_that_fits_takes_one_prod_write() {
        let frames = HeapFrames::default();
        let mut q = queue(&frames, 6);
        let fake = start(q.memory().virt.as_ptr() as usize, q.geometry());
        let commands: Vec<[u64; 2]> = (0..40).map(cfgi).collect();
        let report = q.submit(&fake.regs, &commands, true).unwrap();
        assert_eq!(
            (report.commands, report.syncs, report.prod_writes, report.mmio_writes),
            (41, 1, 1, 1)
        );
        let consumed = fake.finish();
        assert_eq!(consumed.len(), 41);
        assert_eq!(consumed[40], command::opcode::SYNC);
    }

    #[test]
    fn a_batch_larger_than_the_queue_wraps_and_waits_for_room() {
        let frames = HeapFrames::default();
        let mut q = queue(&frames, 3);
        let fake = start(q.memory().virt.as_ptr() as usize, q.geometry());
        for round in 0..5 {
            let commands: Vec<[u64; 2]> = (0..20).map(|i| cfgi(round * 100 + i)).collect();
            let report = q.submit(&fake.regs, &commands, true).unwrap();
            assert_eq!(report.commands, 21);
            assert!(
                report.prod_writes >= 3,
                "21 commands through 8 slots need at least 3 PROD writes"
            );
        }
        assert_eq!(fake.finish().len(), 5 * 21);
    }

    #[test]
    fn an_illegal_command_is_reported_skipped_and_the_rest_completes() {
        let frames = HeapFrames::default();
        let mut q = queue(&frames, 4);
        let fake = start(q.memory().virt.as_ptr() as usize, q.geometry());
        let commands = [cfgi(1), [ILLEGAL, 0x1234], cfgi(2)];
        // The batch completes (the SMMU went past the refused command) but is an error to its caller: what the
        // command was for did not happen.
        let Err(CommandQueueError::Refused { first: fault, count }) = q.submit(&fake.regs, &commands, true) else {
            panic!("a refused command must fail the submission")
        };
        assert_eq!(count, 1);
        assert_eq!((fault.code, fault.words, fault.index), (1, [ILLEGAL, 0x1234], 1));
        assert_eq!(fault.code_name(), "CERROR_ILL");
        // The queue goes on.
        let again = q.submit(&fake.regs, &[cfgi(3)], true).unwrap();
        assert_eq!(again.fault_count, 0);
        let consumed = fake.finish();
        // CFGI, (the bad one rewritten into) CMD_SYNC, CFGI, CMD_SYNC, then CFGI, CMD_SYNC.
        let sync = command::opcode::SYNC;
        let cfgi_op = command::opcode::CFGI_STE;
        assert_eq!(consumed, [cfgi_op, sync, cfgi_op, sync, cfgi_op, sync]);
    }

    #[test]
    fn a_command_whose_fetch_aborted_is_fetched_again_not_replaced() {
        let frames = HeapFrames::default();
        let mut q = queue(&frames, 4);
        let fake = start(q.memory().virt.as_ptr() as usize, q.geometry());
        let mut tlbi = Command::TlbiNsnhAll.encode().unwrap();
        tlbi[1] = ABORT_FIRST_FETCH;
        let report = q.submit(&fake.regs, &[cfgi(1), tlbi, cfgi(2)], true).unwrap();
        assert_eq!((report.fetch_retries, report.fault_count), (1, 0));
        assert_eq!(report.mmio_writes, 2, "PROD, and GERRORN to acknowledge the abort");
        let consumed = fake.finish();
        let (sync, cfgi_op) = (command::opcode::SYNC, command::opcode::CFGI_STE);
        assert_eq!(
            consumed,
            [cfgi_op, command::opcode::TLBI_NSNH_ALL, cfgi_op, sync],
            "the TLBI ran; it was not replaced by a CMD_SYNC"
        );
    }

    #[test]
    fn an_mmu700_never_gets_more_than_63_commands_without_a_sync() {
        let frames = HeapFrames::default();
        let mut q = queue(&frames, 8);
        q.limit_commands_per_sync(MMU700_COMMANDS_PER_SYNC);
        let fake = start(q.memory().virt.as_ptr() as usize, q.geometry());
        let commands: Vec<[u64; 2]> = (0..130).map(cfgi).collect();
        let report = q.submit(&fake.regs, &commands, true).unwrap();
        // 130 commands: a CMD_SYNC after the 63rd and the 126th, and the final one.
        assert_eq!((report.commands, report.syncs), (133, 3));
        let consumed = fake.finish();
        let sync = command::opcode::SYNC;
        let runs: Vec<usize> = consumed.split(|&op| op == sync).map(<[u8]>::len).collect();
        assert_eq!(runs, [63, 63, 4, 0]);
        // Without the quirk one CMD_SYNC ends the batch.
        let mut plain = queue(&frames, 8);
        let fake = start(plain.memory().virt.as_ptr() as usize, plain.geometry());
        assert_eq!(plain.submit(&fake.regs, &commands, true).unwrap().syncs, 1);
    }

    #[test]
    fn a_stuck_smmu_times_out() {
        let frames = HeapFrames::default();
        let mut q = queue(&frames, 4);
        let regs = zeroed_page0();
        let error = q.submit(&regs, &[cfgi(1)], true).unwrap_err();
        assert_eq!(error, CommandQueueError::Timeout { cons: 0, prod: 2 });
        assert_eq!(regs.cmdq_prod.get(), 2, "the command and its CMD_SYNC were published");
    }

    #[test]
    fn service_failure_is_fatal() {
        let frames = HeapFrames::default();
        let mut q = queue(&frames, 4);
        let regs = zeroed_page0();
        set_gerror(&*regs as *const SmmuPage0 as usize, GERROR::SFM_ERR::SET.value);
        assert_eq!(
            q.submit(&regs, &[cfgi(1)], true).unwrap_err(),
            CommandQueueError::ServiceFailure
        );
    }

    #[test]
    fn a_cons_ahead_of_prod_times_out_instead_of_spinning() {
        // CMDQ_CONS reads as a position the driver's PROD cannot have (more than one queue ahead of it): the
        // queue is not full, yet it has no free slot either. The submission must end at its deadline.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let frames = HeapFrames::default();
            let mut q = queue(&frames, 2);
            let regs = zeroed_page0();
            // Four entries (positions modulo 8): PROD 0, CONS 3 is five entries "ahead".
            regs.cmdq_cons.set(3);
            let _ = done.send(q.submit(&regs, &[cfgi(1)], true));
        });
        let result = finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("submit spun past its deadline");
        assert_eq!(result, Err(CommandQueueError::Timeout { cons: 3, prod: 0 }));
    }

    #[test]
    fn a_command_pushed_onto_a_full_batch_is_refused_not_dropped() {
        let mut batch = Batch::new();
        for sid in 0..BATCH_CAPACITY as u32 {
            batch.push(&Command::CfgiSte { sid, leaf: true }).unwrap();
        }
        assert!(batch.is_full());
        // The 65th command does not fit: the caller must hear so (and submit first), or the invalidation it
        // stands for silently never happens.
        assert_eq!(
            batch.push(&Command::TlbiNsnhAll),
            Err(CommandQueueError::BatchFull {
                capacity: BATCH_CAPACITY
            })
        );
        assert_eq!(
            batch.push_words(cfgi(99)),
            Err(CommandQueueError::BatchFull {
                capacity: BATCH_CAPACITY
            })
        );
        assert_eq!(batch.len(), BATCH_CAPACITY);
        assert_eq!(batch.words()[BATCH_CAPACITY - 1], cfgi(BATCH_CAPACITY as u32 - 1));
    }
}
