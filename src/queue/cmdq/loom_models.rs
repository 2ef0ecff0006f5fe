//! Loom models of the multi-producer protocol: two or three submitters and a thread playing the SMMU (it reads
//! CMDQ_PROD, consumes entries, advances CMDQ_CONS and stops at an illegal command with CERROR_ILL until GERRORN
//! acknowledges it), over a tiny queue so that reservations wait for room. Loom runs every interleaving (within a
//! preemption bound) and every weak-memory outcome of the queue's atomics. Each model checks:
//! - every submitter's commands were consumed, in its order, before its `submit` returned;
//! - the SMMU never read a slot that was not written for the position it consumed (CMDQ_PROD never passed an unwritten
//!   slot, and no slot was overwritten before it was consumed);
//! - with a limit on commands per CMD_SYNC, no run of commands in the queue exceeded it;
//! - a refused command was reported to its owner, and to nobody else.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test --release -p smmuv3 --lib loom` (`cargo xtask test` does). Each model
//! is checked exhaustively without preemption, then with `LOOM_MAX_PREEMPTIONS` (1 when unset) for
//! `LOOM_MODEL_SECONDS` (4 when unset) of depth-first search.

extern crate std;

use super::*;
use crate::host_frames::HeapFrames;
use crate::mem::FrameAllocator;
use crate::queue::index::QueueGeometry;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicU32, Ordering};
use std::vec::Vec;

/// The opcode the model's SMMU refuses.
const ILLEGAL: u64 = 0x7f;
const CFGI_STE: u64 = command::opcode::CFGI_STE as u64;
const SYNC: u64 = command::opcode::SYNC as u64;

/// The registers as atomics, with the orderings `CommandQueueRegisters` promises.
#[derive(Default)]
struct Registers {
    prod: AtomicU32,
    cons: AtomicU32,
    gerror: AtomicU32,
    gerrorn: AtomicU32,
}

impl CommandQueueRegisters for Registers {
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

/// One submitter's commands: CFGI_STE tagged (submitter, sequence) in the second word, or the illegal opcode.
fn commands(submitter: u64, illegal: &[bool]) -> Vec<[u64; 2]> {
    illegal
        .iter()
        .enumerate()
        .map(|(seq, &bad)| [if bad { ILLEGAL } else { CFGI_STE }, submitter << 32 | seq as u64])
        .collect()
}

/// What the SMMU saw of each submitter: commands handled (consumed or refused), in order.
struct Seen {
    handled: Vec<AtomicU32>,
}

/// The SMMU: consumes `total` entries of `queue`, one at a time.
fn smmu(queue: &CommandQueue, regs: &Registers, seen: &Seen, total: u64, limit: Option<usize>) {
    let geometry = queue.geometry();
    let span = 2 * u64::from(geometry.entries());
    let mut cons = 0u64;
    let mut since_sync = 0usize;
    // GERRORN as last acknowledged: an error is pending while GERROR differs.
    let mut acknowledged = 0;
    while cons < total {
        if regs.gerror.load(Ordering::Relaxed) != acknowledged {
            // Stopped at a command error until it is acknowledged (acquire: the slot's replacement).
            if regs.gerrorn.load(Ordering::Acquire) == acknowledged {
                loom::thread::yield_now();
                continue;
            }
            acknowledged ^= 1;
        }
        let prod = regs.prod.load(Ordering::Acquire);
        if geometry.is_empty(prod, (cons % span) as u32) {
            loom::thread::yield_now();
            continue;
        }
        let (words, written_for) = queue.model_read(geometry.index((cons % span) as u32));
        assert_eq!(
            written_for, cons,
            "the SMMU read a slot not written for the position it consumed (PROD passed an unwritten slot, or the \
             slot was overwritten before it was consumed)"
        );
        let opcode = words[0] & 0xff;
        if opcode == SYNC {
            since_sync = 0;
        } else {
            since_sync += 1;
            if let Some(limit) = limit {
                assert!(since_sync <= limit, "{since_sync} commands without a CMD_SYNC");
            }
            let (submitter, seq) = ((words[1] >> 32) as usize, words[1] as u32);
            let handled = &seen.handled[submitter];
            assert_eq!(
                handled.load(Ordering::Relaxed),
                seq,
                "submitter {submitter}'s commands out of order"
            );
            // Release with the CONS store below: the submitter acquires both.
            handled.store(seq + 1, Ordering::Release);
            if opcode == ILLEGAL {
                regs.cons.store((cons % span) as u32 | 1 << 24, Ordering::Release);
                regs.gerror.store(acknowledged ^ 1, Ordering::Release);
                continue;
            }
        }
        cons += 1;
        regs.cons.store((cons % span) as u32, Ordering::Release);
        // The SMMU is slow: the submitters may run between two commands.
        loom::thread::yield_now();
    }
}

/// A model: submitters each submitting their commands (`true`: illegal) once with a CMD_SYNC, on a queue of
/// 2^`log2` entries, commands per CMD_SYNC limited to `limit`.
fn model(log2: u8, limit: Option<usize>, submitters: &'static [&'static [bool]]) {
    // Every schedule without preemption (threads switch where they wait or may be delayed), exhaustively; then
    // schedules with `LOOM_MAX_PREEMPTIONS` preemptions (1 when unset) for `LOOM_MODEL_SECONDS` (4 when unset).
    // Waiting threads yield, and loom lets two of them hand the processor to each other indefinitely, so a
    // preemption-bounded search of these models does not end: it is bounded in time, in depth-first order.
    let seconds = std::env::var("LOOM_MODEL_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let mut exhaustive = loom::model::Builder::new();
    exhaustive.preemption_bound = Some(0);
    check(exhaustive, log2, limit, submitters);
    let mut bounded = loom::model::Builder::new();
    bounded.preemption_bound = bounded.preemption_bound.or(Some(1));
    bounded.max_branches = bounded.max_branches.max(20_000);
    bounded.max_duration = Some(std::time::Duration::from_secs(seconds));
    bounded.checkpoint_interval = 1_000;
    check(bounded, log2, limit, submitters);
}

fn check(builder: loom::model::Builder, log2: u8, limit: Option<usize>, submitters: &'static [&'static [bool]]) {
    builder.check(move || {
        let frames = HeapFrames::default();
        let geometry = QueueGeometry::new(log2).unwrap();
        let bytes = COMMAND_BYTES << log2;
        let memory = frames.allocate_zeroed(bytes, bytes).unwrap();
        // SAFETY: a live, zeroed block of the queue's size, owned by the queue.
        let mut queue = unsafe { CommandQueue::new(memory, geometry, true) };
        if let Some(limit) = limit {
            queue.limit_commands_per_sync(limit);
        }
        let queue = Arc::new(queue);
        let regs = Arc::new(Registers::default());
        let seen = Arc::new(Seen {
            handled: submitters.iter().map(|_| AtomicU32::new(0)).collect(),
        });
        // Entries the SMMU consumes: the same stream cutting the queue does.
        let total: u64 = submitters
            .iter()
            .map(|illegal| {
                let words = commands(0, illegal);
                let entries = stream::Entries::new(&words, true, queue.sync_limit_for_models(), [SYNC, 0]);
                let (mut cursor, mut n) = (stream::Cursor::default(), 0);
                while entries.next(&mut cursor).is_some() {
                    n += 1;
                }
                n
            })
            .sum();
        let consumer = {
            let (queue, regs, seen) = (Arc::clone(&queue), Arc::clone(&regs), Arc::clone(&seen));
            loom::thread::spawn(move || smmu(&queue, &regs, &seen, total, limit))
        };
        let submit = move |id: usize, queue: &CommandQueue, regs: &Registers, seen: &Seen| {
            let illegal = submitters[id];
            let words = commands(id as u64, illegal);
            let result = queue.submit(regs, &words, true);
            // Acquire: what the SMMU recorded before advancing past this submitter's entries.
            let handled = seen.handled[id].load(Ordering::Acquire);
            assert_eq!(
                handled as usize,
                words.len(),
                "submit returned before its commands were consumed"
            );
            let refused: Vec<[u64; 2]> = words.iter().copied().filter(|w| w[0] == ILLEGAL).collect();
            match result {
                Ok(report) => assert!(refused.is_empty(), "a refused command reported Ok: {report:?}"),
                Err(CommandQueueError::Refused { first, count }) => {
                    assert_eq!(count as usize, refused.len(), "submitter {id}");
                    assert_eq!(first.words, refused[0], "another submitter's fault reported to {id}");
                }
                Err(CommandQueueError::FaultLogOverflow { .. }) => {
                    assert!(
                        !refused.is_empty(),
                        "an overflow reported to a submitter nothing was refused of"
                    )
                }
                Err(e) => panic!("submitter {id}: {e}"),
            }
        };
        // The model's main thread is submitter 0.
        let threads: Vec<_> = (1..submitters.len())
            .map(|id| {
                let (queue, regs, seen) = (Arc::clone(&queue), Arc::clone(&regs), Arc::clone(&seen));
                loom::thread::spawn(move || submit(id, &queue, &regs, &seen))
            })
            .collect();
        submit(0, &queue, &regs, &seen);
        for t in threads {
            t.join().unwrap();
        }
        consumer.join().unwrap();
        let queue = Arc::try_unwrap(queue).ok().unwrap();
        // SAFETY: the model's SMMU is gone; nothing reads the block any more.
        unsafe { frames.free(queue.into_memory()) };
    });
}

#[test]
fn loom_one_submitter() {
    model(1, None, &[&[false]]);
}

#[test]
fn loom_two_submitters_through_a_four_entry_queue() {
    model(2, None, &[&[false], &[false]]);
}

#[test]
fn loom_two_submitters_through_a_two_entry_queue() {
    // One command and its CMD_SYNC fill the queue: the second reservation waits for room.
    model(1, None, &[&[false], &[false]]);
}

#[test]
fn loom_three_submitters_through_a_four_entry_queue() {
    model(2, None, &[&[false], &[false], &[false]]);
}

#[test]
fn loom_a_refused_command_is_reported_to_its_owner_only() {
    model(1, None, &[&[true], &[false]]);
}

#[test]
fn loom_three_refusals_with_a_two_record_fault_log() {
    model(1, None, &[&[true], &[true], &[true]]);
}

#[test]
fn loom_the_sync_limit_holds_between_submitters() {
    // At most one command per CMD_SYNC: each submission of two commands is two segments.
    model(2, Some(1), &[&[false, false], &[false]]);
}
