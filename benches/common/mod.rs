//! What the host benchmarks that drive a whole `Iommu` share (and the fuzzer's restore target, which includes
//! this file): heap frames with physical = virtual, and a fake SMMU (a thread that acknowledges CR0, GBPA and
//! IRQ_CTRL writes and consumes commands) over a leaked register block carrying the ID registers of QEMU's nested
//! SMMU.

// Each benchmark (and the fuzzer) uses a part of it.
#![allow(dead_code)]

use std::alloc::{Layout, alloc_zeroed};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use smmuv3::mem::{AllocError, DmaBlock, FrameAllocator, PhysAddr};

/// Heap frames, physical = virtual (the fake SMMU reads the queue at the address the driver wrote).
pub struct HeapFrames {
    live: Mutex<Vec<(usize, Layout)>>,
}

impl HeapFrames {
    /// An allocator that lives as long as the benchmark.
    pub fn leaked() -> &'static HeapFrames {
        Box::leak(Box::new(HeapFrames {
            live: Mutex::new(Vec::new()),
        }))
    }
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

/// How the fake SMMU visits its registers.
#[derive(Clone, Copy)]
enum Visits {
    /// Continuously (a core of its own), sleeping instead while `pause` is set.
    Spinning { pause: &'static AtomicBool },
    /// Once per period, sleeping in between: a real SMMU takes no core, and one visit consumes everything
    /// published since the last (so a CMD_SYNC waits up to a period plus the host's timer slack).
    Every(Duration),
}

/// Starts the fake SMMU over a leaked register block and returns its base. It stops when `stop` is set; while
/// `pause` is set it sleeps instead of spinning, so that it does not compete for a core with a timed section that
/// does not talk to the SMMU.
pub fn fake_smmu(stop: &'static AtomicBool, pause: &'static AtomicBool) -> usize {
    start_fake_smmu(stop, Visits::Spinning { pause })
}

/// Starts a fake SMMU that visits its registers once every `period` (a sleep: it leaves the cores to the
/// threads under test) and returns its base; it stops when `stop` is set.
pub fn fake_smmu_visiting(stop: &'static AtomicBool, period: Duration) -> usize {
    start_fake_smmu(stop, Visits::Every(period))
}

fn start_fake_smmu(stop: &'static AtomicBool, visits: Visits) -> usize {
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
            match visits {
                Visits::Spinning { pause } if pause.load(Ordering::Relaxed) => {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Visits::Spinning { .. } => std::hint::spin_loop(),
                Visits::Every(period) => std::thread::sleep(period),
            }
            w(0x24, r(0x20));
            w(0x54, r(0x50));
            let gbpa = r(0x44);
            if gbpa & (1 << 31) != 0 {
                w(0x44, gbpa & !(1 << 31));
            }
            // Consume every command: CONS := PROD.
            w(0x9c, r(0x98));
        }
    });
    base
}
