//! Domain bookkeeping cost: creating and freeing a stage-1 domain when the domain table is empty against when it
//! holds all but one domain (capacity 64). The driver keeps its free slots on a stack, so the two should cost the
//! same; `cargo xtask bench` prints their ratio. The SMMU is a small fake (a thread that acknowledges CR0, GBPA and
//! IRQ_CTRL writes and consumes commands), so the numbers are the driver's work plus one TLBI + CMD_SYNC round
//! trip through shared memory.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::alloc::{Layout, alloc_zeroed};
use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use smmuv3::mem::{AllocError, DmaBlock, FrameAllocator, PhysAddr};
use smmuv3::{ActiveSmmu, DomainMemory, InitOptions, Smmu, Stage1Options};

const CAPACITY: usize = 64;

/// Heap frames, physical = virtual (the fake SMMU reads the queue at the address the driver wrote).
struct HeapFrames {
    live: Mutex<Vec<(usize, Layout)>>,
}

// SAFETY: blocks come zeroed from the global allocator with the requested alignment and stay until freed.
unsafe impl FrameAllocator for HeapFrames {
    fn allocate_zeroed(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError> {
        let layout = Layout::from_size_align(size, align.max(8)).map_err(|_| AllocError::BadRequest { size, align })?;
        // SAFETY: non-zero size (the driver never asks for zero bytes).
        let p = unsafe { alloc_zeroed(layout) };
        let virt = NonNull::new(p).ok_or(AllocError::OutOfMemory { size })?;
        self.live.lock().unwrap().push((p as usize, layout));
        Ok(DmaBlock {
            phys: PhysAddr(p as u64),
            virt,
            size,
        })
    }

    unsafe fn free(&self, block: DmaBlock) {
        let mut live = self.live.lock().unwrap();
        let i = live
            .iter()
            .position(|(a, _)| *a == block.virt.as_ptr() as usize)
            .unwrap();
        let (address, layout) = live.swap_remove(i);
        // SAFETY: allocated above with this layout, and the caller no longer uses it.
        unsafe { std::alloc::dealloc(address as *mut u8, layout) };
    }

    fn phys_to_virt(&self, phys: PhysAddr) -> Option<NonNull<u8>> {
        NonNull::new(phys.0 as *mut u8)
    }
}

fn reg(base: usize, offset: usize) -> *mut u32 {
    (base + offset) as *mut u32
}

/// Starts the fake SMMU over a leaked register block (QEMU's nested SMMU's ID registers) and returns its base.
fn fake_smmu(stop: &'static AtomicBool) -> usize {
    let layout = Layout::from_size_align(0x2_0000, 0x1_0000).unwrap();
    // SAFETY: non-zero size; leaked for the benchmark's life.
    let base = unsafe { alloc_zeroed(layout) } as usize;
    for (offset, value) in [
        (0x00, 0x0d44_101b_u32),
        (0x04, 0x0273_0010),
        (0x0c, 0x1414),
        (0x14, 0x74),
        (0x1c, 1),
    ] {
        // SAFETY: inside the block.
        unsafe { reg(base, offset).write_volatile(value) };
    }
    std::thread::spawn(move || {
        let r = |o| {
            // SAFETY: inside the leaked register block.
            unsafe { reg(base, o).read_volatile() }
        };
        let w = |o, v| {
            // SAFETY: as above.
            unsafe { reg(base, o).write_volatile(v) }
        };
        while !stop.load(Ordering::Relaxed) {
            w(0x24, r(0x20));
            w(0x54, r(0x50));
            let gbpa = r(0x44);
            if gbpa & (1 << 31) != 0 {
                w(0x44, gbpa & !(1 << 31));
            }
            // Consume every command: CONS := PROD.
            w(0x9c, r(0x98));
            std::hint::spin_loop();
        }
    });
    base
}

fn bench_domains(c: &mut Criterion) {
    static STOP: AtomicBool = AtomicBool::new(false);
    let frames: &'static HeapFrames = Box::leak(Box::new(HeapFrames {
        live: Mutex::new(Vec::new()),
    }));
    let memory: DomainMemory = frames;
    let base = fake_smmu(&STOP);
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
