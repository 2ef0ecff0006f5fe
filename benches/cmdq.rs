//! Command-queue throughput with several submitters against a fake SMMU thread: each submitter submits batches of
//! [`COMMANDS`] commands and a CMD_SYNC, and waits for its own CMD_SYNC, as a hypervisor's CPUs invalidating at once.
//!
//! The fake SMMU is a small batch-consumption model that leaves the cores to the submitters, as a real SMMU does:
//! it wakes every [`PERIOD`] (a sleep: the kernel's timer makes it some tens of microseconds), reads every command
//! published since its last visit and advances CONS past them. One visit completes every submitter's CMD_SYNC that
//! was published before it, so the measure is how many submitters' batches the queue gets into one visit: with a
//! global lock around the queue a submitter holds it through its round trip and the others wait (the
//! `2_behind_one_lock` row shows that baseline). Submitters wait by spinning on CONS. An iteration is one batch from
//! every submitter; `cargo xtask bench` prints the total throughput against one submitter's.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

// Only the heap frames are used here (this benchmark has its own fake SMMU).
mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use common::HeapFrames;
use criterion::{Criterion, criterion_group, criterion_main};
use smmuv3::hw::command::Command;
use smmuv3::mem::FrameAllocator;
use smmuv3::queue::cmdq::{COMMAND_BYTES, CommandQueue, CommandQueueRegisters};
use smmuv3::queue::index::QueueGeometry;

/// Commands per batch (each batch also gets its CMD_SYNC).
const COMMANDS: usize = 16;
/// The fake SMMU's sleep between two visits of the queue.
const PERIOD: Duration = Duration::from_micros(10);
/// log2 of the queue's entries (the driver's default).
const LOG2_ENTRIES: u8 = 8;

/// A register on its own cache line, as MMIO registers share none with the CPUs' data.
#[derive(Default)]
#[repr(align(64))]
struct Register(AtomicU32);

/// The queue's registers as the fake SMMU and the submitters share them.
#[derive(Default)]
struct Registers {
    prod: Register,
    cons: Register,
    gerror: Register,
    gerrorn: Register,
}

impl CommandQueueRegisters for Registers {
    fn write_prod(&self, value: u32) {
        self.prod.0.store(value, Ordering::Release);
    }
    fn read_cons(&self) -> u32 {
        self.cons.0.load(Ordering::Acquire)
    }
    fn read_gerror(&self) -> u32 {
        self.gerror.0.load(Ordering::Acquire)
    }
    fn read_gerrorn(&self) -> u32 {
        self.gerrorn.0.load(Ordering::Acquire)
    }
    fn write_gerrorn(&self, value: u32) {
        self.gerrorn.0.store(value, Ordering::Release);
    }
}

/// Starts the fake SMMU over `queue` (CPU address) and `regs`; it stops when `stop` is set.
fn fake_smmu(queue: usize, regs: Arc<Registers>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let geometry = QueueGeometry::new(LOG2_ENTRIES).unwrap();
    std::thread::spawn(move || {
        let mut cons = 0u32;
        let mut sink = 0u64;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(PERIOD);
            let prod = regs.prod.0.load(Ordering::Acquire);
            while !geometry.is_empty(prod, cons) {
                let index = geometry.index(cons) as usize;
                // SAFETY: the queue's memory lives until the benchmark ends (the thread is joined first).
                sink ^= unsafe { std::ptr::read_volatile((queue as *const u64).add(index * 2)) };
                cons = geometry.advance(cons, 1);
            }
            regs.cons.0.store(cons, Ordering::Release);
        }
        black_box(sink);
    })
}

/// Time for `iters` rounds of one batch from each of `submitters` threads (behind one lock when `locked`).
fn rounds(queue: &CommandQueue, regs: &Registers, submitters: usize, locked: bool, iters: u64) -> Duration {
    let batch: Vec<[u64; 2]> = (0..COMMANDS as u32)
        .map(|sid| Command::CfgiSte { sid, leaf: true }.encode().unwrap())
        .collect();
    let lock = Mutex::new(());
    let start = Barrier::new(submitters + 1);
    std::thread::scope(|scope| {
        for _ in 0..submitters {
            let (batch, lock, start) = (&batch, &lock, &start);
            scope.spawn(move || {
                start.wait();
                for _ in 0..iters {
                    let _held = locked.then(|| lock.lock().unwrap());
                    black_box(queue.submit(regs, batch, true).unwrap());
                }
            });
        }
        start.wait();
        let began = Instant::now();
        // The scope joins every submitter before it returns.
        began
    })
    .elapsed()
}

fn bench_cmdq(c: &mut Criterion) {
    let frames = HeapFrames::leaked();
    let geometry = QueueGeometry::new(LOG2_ENTRIES).unwrap();
    let bytes = COMMAND_BYTES << LOG2_ENTRIES;
    let memory = frames.allocate_zeroed(bytes, bytes).unwrap();
    let address = memory.virt.as_ptr() as usize;
    // SAFETY: a live, zeroed block of the queue's size from the allocator, owned by the queue.
    let queue = unsafe { CommandQueue::new(memory, geometry, true) };
    let regs = Arc::new(Registers::default());
    let stop = Arc::new(AtomicBool::new(false));
    let smmu = fake_smmu(address, Arc::clone(&regs), Arc::clone(&stop));
    let mut group = c.benchmark_group("cmdq_throughput");
    for (name, submitters, locked) in [
        ("1", 1, false),
        ("2", 2, false),
        ("4", 4, false),
        ("8", 8, false),
        ("2_behind_one_lock", 2, true),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| rounds(&queue, &regs, submitters, locked, iters))
        });
    }
    group.finish();
    stop.store(true, Ordering::Relaxed);
    smmu.join().unwrap();
    // SAFETY: the fake SMMU is gone; nothing reads the block any more.
    unsafe { frames.free(queue.into_memory()) };
}

criterion_group!(benches, bench_cmdq);
criterion_main!(benches);
