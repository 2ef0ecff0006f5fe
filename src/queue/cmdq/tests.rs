//! The queue against a fake SMMU: a thread that consumes commands like the hardware (advancing CONS, stopping
//! at an illegal opcode with CERROR_ILL and GERROR.CMDQ_ERR until the driver acknowledges).
extern crate std;

use super::*;
use crate::hw::regs::{GERROR, SmmuPage0};
use crate::mem::FrameAllocator;
use crate::queue::index::QueueGeometry;
use crate::testing::HeapFrames;
use core::sync::atomic::Ordering;
use std::boxed::Box;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::vec::Vec;
use tock_registers::interfaces::{Readable, Writeable};

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
    // SAFETY: a live, zeroed block of the queue's size, owned by the queue.
    unsafe { CommandQueue::new(memory, geometry, true) }
}

fn cfgi(sid: u32) -> [u64; 2] {
    Command::CfgiSte { sid, leaf: true }.encode().unwrap()
}

#[test]
fn a_batch_that_fits_takes_one_prod_write() {
    let frames = HeapFrames::default();
    let q = queue(&frames, 6);
    let fake = start(q.memory().virt.as_ptr() as usize, q.geometry());
    let commands: Vec<[u64; 2]> = (0..40).map(cfgi).collect();
    let report = q.submit(&*fake.regs, &commands, true).unwrap();
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
    let q = queue(&frames, 3);
    let fake = start(q.memory().virt.as_ptr() as usize, q.geometry());
    for round in 0..5 {
        let commands: Vec<[u64; 2]> = (0..20).map(|i| cfgi(round * 100 + i)).collect();
        let report = q.submit(&*fake.regs, &commands, true).unwrap();
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
    let q = queue(&frames, 4);
    let fake = start(q.memory().virt.as_ptr() as usize, q.geometry());
    let commands = [cfgi(1), [ILLEGAL, 0x1234], cfgi(2)];
    // The batch completes (the SMMU went past the refused command) but is an error to its caller: what the
    // command was for did not happen.
    let Err(CommandQueueError::Refused { first: fault, count }) = q.submit(&*fake.regs, &commands, true) else {
        panic!("a refused command must fail the submission")
    };
    assert_eq!(count, 1);
    assert_eq!((fault.code, fault.words, fault.index), (1, [ILLEGAL, 0x1234], 1));
    assert_eq!(fault.code_name(), "CERROR_ILL");
    // The queue goes on.
    let again = q.submit(&*fake.regs, &[cfgi(3)], true).unwrap();
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
    let q = queue(&frames, 4);
    let fake = start(q.memory().virt.as_ptr() as usize, q.geometry());
    let mut tlbi = Command::TlbiNsnhAll.encode().unwrap();
    tlbi[1] = ABORT_FIRST_FETCH;
    let report = q.submit(&*fake.regs, &[cfgi(1), tlbi, cfgi(2)], true).unwrap();
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
    let report = q.submit(&*fake.regs, &commands, true).unwrap();
    // 130 commands: a CMD_SYNC after the 63rd and the 126th, and the final one.
    assert_eq!((report.commands, report.syncs), (133, 3));
    let consumed = fake.finish();
    let sync = command::opcode::SYNC;
    let runs: Vec<usize> = consumed.split(|&op| op == sync).map(<[u8]>::len).collect();
    assert_eq!(runs, [63, 63, 4, 0]);
    // Without the quirk one CMD_SYNC ends the batch.
    let plain = queue(&frames, 8);
    let fake = start(plain.memory().virt.as_ptr() as usize, plain.geometry());
    assert_eq!(plain.submit(&*fake.regs, &commands, true).unwrap().syncs, 1);
}

#[test]
fn a_stuck_smmu_times_out() {
    let frames = HeapFrames::default();
    let q = queue(&frames, 4);
    let regs = zeroed_page0();
    let error = q.submit(&*regs, &[cfgi(1)], true).unwrap_err();
    assert_eq!(error, CommandQueueError::Timeout { cons: 0, prod: 2 });
    assert_eq!(regs.cmdq_prod.get(), 2, "the command and its CMD_SYNC were published");
}

#[test]
fn service_failure_is_fatal() {
    let frames = HeapFrames::default();
    let q = queue(&frames, 4);
    let regs = zeroed_page0();
    set_gerror(&*regs as *const SmmuPage0 as usize, GERROR::SFM_ERR::SET.value);
    assert_eq!(
        q.submit(&*regs, &[cfgi(1)], true).unwrap_err(),
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
        let q = queue(&frames, 2);
        let regs = zeroed_page0();
        // Four entries (positions modulo 8): PROD 0, CONS 3 is five entries "ahead".
        regs.cmdq_cons.set(3);
        let _ = done.send(q.submit(&*regs, &[cfgi(1)], true));
    });
    let result = finished
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("submit spun past its deadline");
    // The queue had room by what the driver knew (nothing outstanding), so the command and its CMD_SYNC were
    // published (PROD 2) without a look at CONS; the CONS that makes no sense is never taken as progress.
    assert_eq!(result, Err(CommandQueueError::Timeout { cons: 3, prod: 2 }));
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

/// Registers as atomics: `SmmuPage0`'s cells are not `Sync`, and the stress tests share the registers between
/// threads as CPUs share the SMMU's.
#[derive(Default)]
struct AtomicRegisters {
    prod: core::sync::atomic::AtomicU32,
    cons: core::sync::atomic::AtomicU32,
    gerror: core::sync::atomic::AtomicU32,
    gerrorn: core::sync::atomic::AtomicU32,
}

impl CommandQueueRegisters for AtomicRegisters {
    fn write_prod(&self, value: u32) {
        self.prod.store(value, Ordering::Release);
    }
    fn read_cons(&self) -> u32 {
        self.cons.load(Ordering::Acquire)
    }
    fn read_gerror(&self) -> u32 {
        self.gerror.load(Ordering::Acquire)
    }
    fn read_gerrorn(&self) -> u32 {
        self.gerrorn.load(Ordering::Acquire)
    }
    fn write_gerrorn(&self, value: u32) {
        self.gerrorn.store(value, Ordering::Release);
    }
}

/// The stress tests' SMMU: consumes like `start`'s (stopping at the illegal opcode with CERROR_ILL until
/// acknowledged), and records every command it consumed, whole, and per submitter how many of its commands it has
/// handled (consumed, or stopped at as refused).
struct Recorder {
    regs: Arc<AtomicRegisters>,
    stop: Arc<AtomicBool>,
    handled: Arc<Vec<core::sync::atomic::AtomicU64>>,
    consumer: Option<std::thread::JoinHandle<Vec<[u64; 2]>>>,
}

impl Recorder {
    fn start(queue: usize, geometry: QueueGeometry, submitters: usize) -> Recorder {
        let regs = Arc::new(AtomicRegisters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let handled: Arc<Vec<_>> = Arc::new((0..submitters).map(|_| core::sync::atomic::AtomicU64::new(0)).collect());
        let (regs2, stop2, handled2) = (Arc::clone(&regs), Arc::clone(&stop), Arc::clone(&handled));
        let consumer = std::thread::spawn(move || {
            let regs = &*regs2;
            let mut consumed = Vec::new();
            let mut seen_tags = std::collections::HashSet::new();
            let mut cons = 0u32;
            while !stop2.load(Ordering::Acquire) {
                // Acquire: the commands PROD covers.
                let prod = regs.prod.load(Ordering::Acquire);
                if geometry.is_empty(prod, cons) {
                    std::thread::yield_now();
                    continue;
                }
                while !geometry.is_empty(prod, cons) {
                    let index = geometry.index(cons) as usize;
                    // SAFETY: the queue memory is live while the driver runs; the driver writes it atomically.
                    let words = unsafe {
                        let slot = (queue as *const core::sync::atomic::AtomicU64).add(index * 2);
                        [(*slot).load(Ordering::Relaxed), (*slot.add(1)).load(Ordering::Relaxed)]
                    };
                    let opcode = words[0] & 0xff;
                    if opcode != u64::from(command::opcode::SYNC) {
                        assert!(
                            seen_tags.insert(words[1]),
                            "the SMMU read command {words:#x?} a second time at position {cons:#x}: PROD passed a \
                             slot not yet rewritten"
                        );
                        handled2[(words[1] >> 48) as usize].fetch_add(1, Ordering::Release);
                    }
                    if opcode == ILLEGAL {
                        // Seen again once replaced by a CMD_SYNC: not a second read of the command.
                        seen_tags.remove(&words[1]);
                        regs.cons.store(cons | 1 << 24, Ordering::Release);
                        let gerrorn = regs.gerrorn.load(Ordering::Acquire);
                        regs.gerror.store(gerrorn ^ 1, Ordering::Release);
                        // Acquire: the CMD_SYNC written in its place.
                        while regs.gerrorn.load(Ordering::Acquire) == gerrorn && !stop2.load(Ordering::Acquire) {
                            std::thread::yield_now();
                        }
                        // Re-read the slot: the driver replaced it with a CMD_SYNC.
                        continue;
                    }
                    consumed.push(words);
                    cons = geometry.advance(cons, 1);
                    regs.cons.store(cons, Ordering::Release);
                }
            }
            consumed
        });
        Recorder {
            regs,
            stop,
            handled,
            consumer: Some(consumer),
        }
    }

    fn finish(mut self) -> Vec<[u64; 2]> {
        self.stop.store(true, Ordering::Release);
        self.consumer.take().map(|c| c.join().unwrap()).unwrap_or_default()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(c) = self.consumer.take() {
            let _ = c.join();
        }
    }
}

/// A small deterministic generator (xorshift), so that a failure replays.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// What one stress submitter did: CMD_SYNCs its submissions put in the queue, commands refused, its batches.
type Totals = (u64, u64, Vec<Vec<[u64; 2]>>);

/// `submitters` threads hammer one queue (2^`log2` entries, at most 63 commands per CMD_SYNC) with `rounds`
/// batches each of 1 to 100 commands, one batch in eight holding an illegal command. Checks that every batch's
/// commands were consumed before its submission returned, in order, that the refused ones were reported to their
/// owner alone, that no run of commands in the queue exceeded 63 and that the CMD_SYNCs consumed are exactly those
/// the reports and refusals account for.
fn stress(submitters: usize, log2: u8, rounds: u64) {
    let frames = HeapFrames::default();
    let mut q = queue(&frames, log2);
    q.limit_commands_per_sync(MMU700_COMMANDS_PER_SYNC);
    // A queue smaller than the limit gets a CMD_SYNC in every queue-full.
    let limit = MMU700_COMMANDS_PER_SYNC.min((1 << log2) - 1) as u64;
    let fake = Recorder::start(q.memory().virt.as_ptr() as usize, q.geometry(), submitters);
    let started = std::time::Instant::now();
    // Per submitter: (CMD_SYNCs its successful submissions wrote, commands refused, batches).
    let totals: Vec<Totals> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..submitters)
            .map(|id| {
                let (q, regs, handled) = (&q, &*fake.regs, &fake.handled);
                scope.spawn(move || {
                    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((id as u64 + 1) * 0x1234_5678));
                    let (mut syncs, mut refused, mut batches) = (0, 0, Vec::new());
                    let mut overflows = 0u64;
                    let mut sent = 0u64;
                    for round in 0..rounds {
                        let length = 1 + rng.below(100);
                        let bad = if rng.below(8) == 0 { Some(rng.below(length)) } else { None };
                        // Tag: submitter in [63:48], round in [47:16], index in [15:0].
                        let batch: Vec<[u64; 2]> = (0..length)
                            .map(|i| {
                                let tag = (id as u64) << 48 | round << 16 | i;
                                let opcode = if bad == Some(i) { ILLEGAL } else { u64::from(command::opcode::CFGI_STE) };
                                [opcode | (i << 32), tag]
                            })
                            .collect();
                        let result = q.submit(regs, &batch, true);
                        sent += length;
                        assert_eq!(
                            handled[id].load(Ordering::Acquire),
                            sent,
                            "submitter {id} round {round}: submit returned ({result:?}) before its commands were consumed \
                             (PROD {:#x}, CONS {:#x}, GERROR {:#x}, GERRORN {:#x})",
                            regs.prod.load(Ordering::Relaxed),
                            regs.cons.load(Ordering::Relaxed),
                            regs.gerror.load(Ordering::Relaxed),
                            regs.gerrorn.load(Ordering::Relaxed),
                        );
                        match (result, bad) {
                            (Ok(report), None) => {
                                assert_eq!(report.commands as u64, length + report.syncs as u64);
                                syncs += u64::from(report.syncs);
                            }
                            (Err(CommandQueueError::Refused { first, count }), Some(i)) => {
                                assert_eq!((first.words, count), (batch[i as usize], 1), "submitter {id} round {round}");
                                refused += 1;
                                // Its CMD_SYNCs: one after every `limit` commands and the final one.
                                syncs += length.div_ceil(limit);
                            }
                            (Err(CommandQueueError::FaultLogOverflow { .. }), bad) => {
                                // More refusals (of other submitters) than the log holds while this one waited: a
                                // failure that says its commands completed but may have been refused, never `Ok`.
                                overflows += 1;
                                refused += u64::from(bad.is_some());
                                syncs += length.div_ceil(limit);
                            }
                            (result, bad) => panic!("submitter {id} round {round}: {result:?} (illegal at {bad:?})"),
                        }
                        batches.push(batch);
                    }
                    if overflows > 0 {
                        std::eprintln!("submitter {id}: {overflows} submission(s) failed with FaultLogOverflow");
                    }
                    (syncs, refused, batches)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let elapsed = started.elapsed();
    let consumed = fake.finish();
    let sync = u64::from(command::opcode::SYNC);
    let run_ok = consumed
        .split(|w| w[0] & 0xff == sync)
        .all(|run| run.len() as u64 <= limit);
    assert!(run_ok, "more than {limit} commands between two CMD_SYNCs");
    let consumed_syncs = consumed.iter().filter(|w| w[0] & 0xff == sync).count() as u64;
    let expected_syncs: u64 = totals.iter().map(|t| t.0 + t.1).sum();
    assert_eq!(
        consumed_syncs, expected_syncs,
        "CMD_SYNCs: the submissions' own, and one per refused command"
    );
    // Each batch's commands, in order, without the refused one.
    let mut by_batch = std::collections::HashMap::<u64, Vec<[u64; 2]>>::new();
    for w in consumed.iter().filter(|w| w[0] & 0xff != sync) {
        by_batch.entry(w[1] >> 16).or_default().push(*w);
    }
    for (id, (_, _, batches)) in totals.iter().enumerate() {
        for (round, batch) in batches.iter().enumerate() {
            let expected: Vec<[u64; 2]> = batch.iter().copied().filter(|w| w[0] & 0xff != ILLEGAL).collect();
            let key = (id as u64) << 32 | round as u64;
            assert_eq!(
                by_batch.remove(&key).unwrap_or_default(),
                expected,
                "submitter {id} round {round}"
            );
        }
    }
    assert!(by_batch.is_empty(), "commands nobody submitted were consumed");
    std::eprintln!("{submitters} submitters x {rounds} batches through 2^{log2} slots: {elapsed:?}");
}

#[test]
fn stress_two_submitters() {
    stress(2, 6, 300);
}

#[test]
fn stress_four_submitters() {
    stress(4, 6, 200);
}

#[test]
fn stress_eight_submitters_on_a_small_queue() {
    stress(8, 5, 100);
}

#[test]
fn the_queue_is_send_and_sync() {
    fn shared<T: Send + Sync>() {}
    shared::<CommandQueue>();
}
