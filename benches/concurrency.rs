//! Every CPU: map + unmap of 4096 random 4 KiB pages through the domain API, as a hypervisor's DMA path in strict
//! mode does it ([`Iommu::map`] of each page, then [`Iommu::unmap`] of each, which invalidates the page and waits
//! for its CMD_SYNC before it returns), by 1 thread, by 2 threads on 2 domains and by 2 threads on 1 domain
//! (disjoint pages interleaved in the same last-level tables, so that the threads fill and empty the same tables
//! at once). One [`Iommu`] is shared by reference between the threads, with no lock around it; the row "behind one
//! lock" puts one around each thread's iteration, as sharing a driver of `&mut self` operations did. 4 and 8
//! threads are figures (this machine has 2 cores).
//!
//! The window's last-level tables exist before the timing starts (one anchor page stays mapped in each 2 MiB), so
//! the numbers are the map and unmap paths, not the allocator's. The SMMU is a fake that visits its command queue
//! every [`PERIOD`] (a sleep, as a real SMMU takes no core) and consumes everything published since its last
//! visit, so an unmap waits for the next visit, and one visit completes every CPU's CMD_SYNC published before it.
//! `cargo xtask bench` prints each row's total throughput against one thread's.
//!
//! The `map_only` rows time the maps alone (each thread maps its 4096 pages between two barriers; the unmaps that
//! follow are not timed): the CPUs' own work on shared tables, with no SMMU round trip to overlap.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

mod common;

use smmuv3::{Iova, PhysAddr};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use common::{HeapFrames, fake_smmu_visiting};
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use smmuv3::{DomainId, DomainMemory, InitOptions, Iommu, Prot, Smmu, Stage1Options};

const RW: Prot = Prot::READ.union(Prot::WRITE).union(Prot::CACHEABLE);
/// Pages each thread maps and unmaps per iteration.
const PAGES: u64 = 4096;
/// The IOVA window (1 GiB) the pages are drawn from, and the physical addresses behind them.
const WINDOW: u64 = 0x4000_0000;
const WINDOW_BYTES: u64 = 1 << 30;
const PA: u64 = 0x8_0000_0000;
/// The fake SMMU's sleep between two visits of its command queue.
const PERIOD: Duration = Duration::from_micros(10);

/// xorshift64*: each thread's own page sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// `PAGES` distinct page numbers of the window for thread `k` of `sharing` threads of one domain: page numbers
/// congruent to `k` modulo `sharing` (so threads of one domain never pick the same page but share every table),
/// never an anchor (page 0 of each 2 MiB).
fn pages(seed: u64, k: u64, sharing: u64) -> Vec<u64> {
    let mut rng = Rng(seed | 1);
    let mut seen = std::collections::HashSet::new();
    let slots = WINDOW_BYTES / 4096 / sharing;
    let mut out = Vec::with_capacity(PAGES as usize);
    while out.len() < PAGES as usize {
        let page = (rng.next() % slots) * sharing + k;
        if !page.is_multiple_of(512) && seen.insert(page) {
            out.push(page);
        }
    }
    out
}

/// One iteration of one thread: map every page, then unmap each (its TLBI and CMD_SYNC awaited).
fn map_unmap(iommu: &Iommu<&'static HeapFrames, 16>, domain: DomainId, pages: &[u64]) {
    for &p in pages {
        iommu
            .map(domain, Iova(WINDOW + p * 4096), PhysAddr(PA + p * 4096), 4096, RW)
            .unwrap();
    }
    for &p in pages {
        iommu.unmap(domain, Iova(WINDOW + p * 4096), 4096).unwrap();
    }
}

/// Wall time of `iters` iterations run by each of `threads` threads at once; thread `k` works in domain
/// `domains[k % domains.len()]`.
fn run(
    iommu: &Iommu<&'static HeapFrames, 16>,
    domains: &[DomainId],
    threads: u64,
    one_lock: bool,
    iters: u64,
) -> Duration {
    let sharing = threads.div_ceil(domains.len() as u64);
    let work: Vec<(DomainId, Vec<u64>)> = (0..threads)
        .map(|k| {
            let d = domains[(k % domains.len() as u64) as usize];
            (d, pages(0x9e37_79b9 * (k + 1), k / domains.len() as u64, sharing))
        })
        .collect();
    let start = Barrier::new(threads as usize + 1);
    let lock = Mutex::new(());
    std::thread::scope(|s| {
        for (d, pages) in &work {
            let (start, lock) = (&start, &lock);
            s.spawn(move || {
                start.wait();
                for _ in 0..iters {
                    let _held = one_lock.then(|| lock.lock().unwrap());
                    map_unmap(iommu, *d, pages);
                }
            });
        }
        start.wait();
        Instant::now()
    })
    .elapsed()
}

/// Time of the map phases alone of `iters` iterations: in each, every thread maps its pages (timed by the threads
/// themselves: from the first thread's start to the last thread's end), then unmaps them (not timed).
fn map_phases(iommu: &Iommu<&'static HeapFrames, 16>, domains: &[DomainId], threads: u64, iters: u64) -> Duration {
    let sharing = threads.div_ceil(domains.len() as u64);
    let work: Vec<(DomainId, Vec<u64>)> = (0..threads)
        .map(|k| {
            let d = domains[(k % domains.len() as u64) as usize];
            (d, pages(0x7f4a_7c15 * (k + 1), k / domains.len() as u64, sharing))
        })
        .collect();
    let barrier = Barrier::new(threads as usize);
    let spans: Vec<Vec<(Instant, Instant)>> = std::thread::scope(|s| {
        let workers: Vec<_> = work
            .iter()
            .map(|(d, pages)| {
                let barrier = &barrier;
                s.spawn(move || {
                    let mut spans = Vec::with_capacity(iters as usize);
                    for _ in 0..iters {
                        barrier.wait();
                        let began = Instant::now();
                        for &p in pages {
                            iommu
                                .map(*d, Iova(WINDOW + p * 4096), PhysAddr(PA + p * 4096), 4096, RW)
                                .unwrap();
                        }
                        spans.push((began, Instant::now()));
                        barrier.wait();
                        for &p in pages {
                            iommu.unmap(*d, Iova(WINDOW + p * 4096), 4096).unwrap();
                        }
                    }
                    spans
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    (0..iters as usize)
        .map(|i| {
            let first = spans.iter().map(|s| s[i].0).min().unwrap();
            let last = spans.iter().map(|s| s[i].1).max().unwrap();
            last - first
        })
        .sum()
}

/// Attach + detach rounds each thread runs per iteration.
const ROUNDS: u32 = 64;

/// Wall time of `iters` iterations run by each of `threads` threads at once: thread `k` attaches stream
/// `0x100 + k` to `domains[k]` and detaches it, `ROUNDS` times (each STE write's CFGI_STE + CMD_SYNC awaited).
fn attach_detach(
    iommu: &Iommu<&'static HeapFrames, 16>,
    domains: &[DomainId],
    threads: u64,
    one_lock: bool,
    iters: u64,
) -> Duration {
    let start = Barrier::new(threads as usize + 1);
    let lock = Mutex::new(());
    std::thread::scope(|s| {
        for k in 0..threads {
            let (start, lock, d, sid) = (&start, &lock, domains[k as usize], 0x100 + k as u32);
            s.spawn(move || {
                start.wait();
                for _ in 0..iters {
                    for _ in 0..ROUNDS {
                        let _held = one_lock.then(|| lock.lock().unwrap());
                        iommu.attach(d, sid).unwrap();
                        iommu.detach(sid).unwrap();
                    }
                }
            });
        }
        start.wait();
        Instant::now()
    })
    .elapsed()
}

fn bench_concurrency(c: &mut Criterion) {
    static STOP: AtomicBool = AtomicBool::new(false);
    let frames = HeapFrames::leaked();
    let memory: DomainMemory = frames;
    let base = fake_smmu_visiting(&STOP, PERIOD);
    // SAFETY: the block models the SMMU's two register pages for the benchmark's life.
    let smmu = unsafe { Smmu::probe(NonNull::new(base as *mut u8).unwrap(), 0x2_0000) }.unwrap();
    let iommu: Iommu<&'static HeapFrames, 16> = smmu.init_with_capacity(frames, &InitOptions::default()).unwrap();
    let options = Stage1Options {
        input_bits: 39,
        el2: false,
    };
    let domains: Vec<DomainId> = (0..8).map(|_| iommu.create_stage1(memory, options).unwrap()).collect();
    for &d in &domains {
        for anchor in (0..WINDOW_BYTES).step_by(2 << 20) {
            iommu
                .map(d, Iova(WINDOW + anchor), PhysAddr(PA + anchor), 4096, RW)
                .unwrap();
        }
    }
    let mut group = c.benchmark_group("every_cpu");
    // An iteration takes some hundreds of milliseconds: the same number of iterations in every sample.
    group.sampling_mode(SamplingMode::Flat);
    for (name, threads, on, one_lock) in [
        ("1_thread", 1, 1, false),
        ("2_threads_2_domains", 2, 2, false),
        ("2_threads_1_domain", 2, 1, false),
        ("2_threads_2_domains_behind_one_lock", 2, 2, true),
        ("4_threads_4_domains", 4, 4, false),
        ("4_threads_1_domain", 4, 1, false),
        ("8_threads_8_domains", 8, 8, false),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| run(&iommu, &domains[..on], threads, one_lock, iters))
        });
    }
    for (name, threads, on) in [
        ("map_only_1_thread", 1, 1),
        ("map_only_2_threads_2_domains", 2, 2),
        ("map_only_2_threads_1_domain", 2, 1),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| map_phases(&iommu, &domains[..on], threads, iters))
        });
    }
    for (name, threads, one_lock) in [
        ("attach_detach_1_thread", 1, false),
        ("attach_detach_2_threads", 2, false),
        ("attach_detach_2_threads_behind_one_lock", 2, true),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| attach_detach(&iommu, &domains, threads, one_lock, iters))
        });
    }
    group.finish();
    STOP.store(true, Ordering::Relaxed);
}

criterion_group!(benches, bench_concurrency);
criterion_main!(benches);
