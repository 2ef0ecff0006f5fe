//! Domain bookkeeping cost: creating and freeing a stage-1 domain when the domain table is empty against when it
//! holds all but one domain (capacity 64). The driver keeps its free slots on a stack, so the two should cost the
//! same; `cargo xtask bench` prints their ratio. The SMMU is a small fake (a thread that acknowledges CR0, GBPA and
//! IRQ_CTRL writes and consumes commands), so the numbers are the driver's work plus one TLBI + CMD_SYNC round
//! trip through shared memory.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

mod common;

use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{HeapFrames, fake_smmu};
use criterion::{Criterion, criterion_group, criterion_main};
use smmuv3::{ActiveSmmu, DomainMemory, InitOptions, Smmu, Stage1Options};

const CAPACITY: usize = 64;

fn bench_domains(c: &mut Criterion) {
    static STOP: AtomicBool = AtomicBool::new(false);
    static NEVER: AtomicBool = AtomicBool::new(false);
    let frames = HeapFrames::leaked();
    let memory: DomainMemory = frames;
    let base = fake_smmu(&STOP, &NEVER);
    // SAFETY: the block models the SMMU's two register pages for the benchmark's life.
    let smmu = unsafe { Smmu::probe(NonNull::new(base as *mut u8).unwrap(), 0x2_0000) }.unwrap();
    let mut smmu: ActiveSmmu<&'static HeapFrames, CAPACITY> =
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
    STOP.store(true, Ordering::Relaxed);
}

criterion_group! {
    name = benches;
    config = Criterion::default();
    targets = bench_domains
}
criterion_main!(benches);
