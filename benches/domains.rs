//! Domain bookkeeping cost: creating and freeing a stage-1 domain when the domain table is empty against when it
//! holds all but one domain (capacity 64). The driver keeps its free slots on a stack, so the two should cost the
//! same; `cargo xtask bench` prints their ratio. The SMMU is a small fake (a thread that acknowledges CR0, GBPA and
//! IRQ_CTRL writes and consumes commands), so the numbers are the driver's work plus one TLBI + CMD_SYNC round
//! trip through shared memory. Also the single-page map through a domain (`Iommu::map`, which adds the
//! domain's own checks to the page table's), timed in batches of pages with the unmap untimed.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

mod common;

use smmuv3::{Iova, PhysAddr};
use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{HeapFrames, fake_smmu};
use criterion::{Criterion, criterion_group, criterion_main};
use smmuv3::{DomainMemory, InitOptions, Iommu, Prot, Smmu, Stage1Options};

const CAPACITY: usize = 64;

fn bench_domains(c: &mut Criterion) {
    static STOP: AtomicBool = AtomicBool::new(false);
    static NEVER: AtomicBool = AtomicBool::new(false);
    let frames = HeapFrames::leaked();
    let memory: DomainMemory = frames;
    let base = fake_smmu(&STOP, &NEVER);
    // SAFETY: the block models the SMMU's two register pages for the benchmark's life.
    let smmu = unsafe { Smmu::probe(NonNull::new(base as *mut u8).unwrap(), 0x2_0000) }.unwrap();
    let mut smmu: Iommu<&'static HeapFrames, CAPACITY> =
        smmu.init_with_capacity(frames, &InitOptions::default()).unwrap();
    let options = Stage1Options {
        input_bits: 39,
        el2: false,
    };
    let mut group = c.benchmark_group("domain_create_free");
    group.bench_function("empty_table", |b| {
        b.iter(|| {
            let d = smmu.create_stage1(memory, options).unwrap();
            smmu.free_domain(black_box(d)).unwrap();
        })
    });
    let held: Vec<_> = (0..CAPACITY - 1)
        .map(|_| smmu.create_stage1(memory, options).unwrap())
        .collect();
    group.bench_function("full_table", |b| {
        b.iter(|| {
            let d = smmu.create_stage1(memory, options).unwrap();
            smmu.free_domain(black_box(d)).unwrap();
        })
    });
    group.finish();
    for d in held {
        smmu.free_domain(d).unwrap();
    }
    bench_map_one(c, &mut smmu, memory, options);
    STOP.store(true, Ordering::Relaxed);
}

/// Pages mapped one by one per timed batch (then unmapped as one range, untimed).
const BATCH: u64 = 256;

/// `Iommu::map` of one 4 KiB page, at successive IOVAs of a 1 GiB range whose last-level tables exist.
fn bench_map_one<const D: usize>(
    c: &mut Criterion,
    smmu: &mut Iommu<&'static HeapFrames, D>,
    memory: DomainMemory,
    options: Stage1Options,
) {
    const RW: Prot = Prot::READ.union(Prot::WRITE).union(Prot::CACHEABLE);
    const IOVA: u64 = 0x4000_0000;
    const PA: u64 = 0x8_0000_0000;
    // What a board declares (the handover region, the frame pool, the image): each map checks its output against
    // every one of them.
    for (base, len) in [
        (0x4000_0000, 0x1000_0000),
        (0x7e00_0000, 0x200_0000),
        (0x1_0000_0000, 0x4000_0000),
    ] {
        smmu.protect_memory(smmuv3::handover::Extent { base, len }).unwrap();
    }
    let d = smmu.create_stage1(memory, options).unwrap();
    // Every last-level table of the range exists (one page mapped in each), so a map allocates nothing.
    for t in 0..512u64 {
        smmu.map(
            d,
            Iova(IOVA + (t << 21) + 0x1f_f000),
            PhysAddr(PA + (t << 21) + 0x1f_f000),
            0x1000,
            RW,
        )
        .unwrap();
    }
    let mut group = c.benchmark_group("domain_map_one_4k");
    let mut next = 0u64;
    group.bench_function("ours", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(BATCH);
                // Pages 0..511 of each 2 MiB (the last one stays mapped), in order.
                if (next % 511) + n > 511 {
                    next += 511 - next % 511;
                }
                if next + n > 511 * 512 {
                    next = 0;
                }
                let first = IOVA + ((next / 511) << 21) + ((next % 511) << 12);
                let pa = PA + (first - IOVA);
                let start = Instant::now();
                for k in 0..n {
                    smmu.map(
                        d,
                        black_box(Iova(first + (k << 12))),
                        PhysAddr(pa + (k << 12)),
                        0x1000,
                        RW,
                    )
                    .unwrap();
                }
                total += start.elapsed();
                smmu.unmap(d, Iova(first), n << 12).unwrap();
                next += n;
                left -= n;
            }
            total
        })
    });
    group.finish();
    smmu.free_domain(d).unwrap();
}

criterion_group! {
    name = benches;
    config = Criterion::default();
    targets = bench_domains
}
criterion_main!(benches);
