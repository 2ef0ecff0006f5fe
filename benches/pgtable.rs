//! Page-table benchmarks: this crate's `IoPageTable` against Google's aarch64-paging (the Rust peer) doing the same
//! work on the same kind of memory, and a memset of the same number of descriptor bytes (the physical limit).
//! Both page tables take their tables from a pre-touched pool, so the numbers measure page-table code, not the
//! host's page faults; the peer is also measured on the global allocator (its `IdMap`), labelled as such.
//! `cargo xtask bench [--quick]` runs this and prints the ratio table.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use smmuv3::Iova;
use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aarch64_paging::Mapping;
use aarch64_paging::descriptor::{El23Attributes, PhysicalAddress};
use aarch64_paging::idmap::IdMap;
use aarch64_paging::paging::{Constraints, El2, MemoryRegion, PageTable, Translation};
use criterion::{Criterion, criterion_group, criterion_main};
use smmuv3::mem::{AllocError, DmaBlock, FrameAllocator, PhysAddr};
use smmuv3::pgtable::{Format, Gather, Granule, IoPageTable, Prot, Stage};

const PAGE: usize = 4096;
/// Fake physical base of the pool (physical addresses are not CPU addresses).
const PHYS_BASE: u64 = 1 << 40;
const GIB: u64 = 1 << 30;

/// A pre-touched arena of page-aligned frames: bump allocation, a free list of single frames.
///
/// `Sync` as every `FrameAllocator` is (its parts are: the arena is named by its address, the counters are atomic,
/// the free list behind a spin lock nobody contends in these single-threaded rows: one uncontended CAS, where a
/// `std` mutex cost the bulk rows a few microseconds per GiB).
struct Pool {
    base: usize,
    size: usize,
    next: AtomicUsize,
    free: spin::Mutex<Vec<usize>>,
}

impl Pool {
    fn new(size: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(size, PAGE).unwrap();
        // SAFETY: non-zero size.
        let base = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!base.is_null());
        // Touch every page once so no benchmark pays a page fault.
        for offset in (0..size).step_by(PAGE) {
            // SAFETY: inside the arena.
            unsafe { base.add(offset).write_volatile(0) };
        }
        Pool {
            base: base as usize,
            size,
            next: AtomicUsize::new(0),
            free: spin::Mutex::new(Vec::new()),
        }
    }

    fn base(&self) -> *mut u8 {
        self.base as *mut u8
    }

    /// A frame, zeroed unless `for_overwrite` (its user writes every byte before reading any).
    fn frame(&self, for_overwrite: bool) -> usize {
        self.frame_from(&mut self.free.lock(), for_overwrite)
    }

    /// As `frame`, with the free list already locked.
    fn frame_from(&self, free: &mut Vec<usize>, for_overwrite: bool) -> usize {
        if let Some(offset) = free.pop() {
            if !for_overwrite {
                // SAFETY: a frame of the arena; tables must come back zeroed.
                unsafe { self.base().add(offset).write_bytes(0, PAGE) };
            }
            return offset;
        }
        let offset = self.next.fetch_add(PAGE, Ordering::Relaxed);
        assert!(offset + PAGE <= self.size, "pool exhausted");
        offset
    }
}

// SAFETY: frames are disjoint, page-aligned, zeroed, and live until freed; physical = arena offset + PHYS_BASE.
unsafe impl FrameAllocator for Pool {
    fn allocate_zeroed(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError> {
        self.block(size, align, false)
    }

    fn allocate_for_overwrite(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError> {
        self.block(size, align, true)
    }

    unsafe fn free(&self, block: DmaBlock) {
        self.free.lock().push((block.phys.0 - PHYS_BASE) as usize);
    }

    fn allocate_many(
        &self,
        size: usize,
        align: usize,
        count: usize,
        for_overwrite: bool,
        each: &mut dyn FnMut(DmaBlock),
    ) -> Result<(), AllocError> {
        if size != PAGE || align > PAGE {
            return Err(AllocError::BadRequest { size, align });
        }
        let mut free = self.free.lock();
        for _ in 0..count {
            let offset = self.frame_from(&mut free, for_overwrite);
            each(self.block_at(offset));
        }
        Ok(())
    }

    unsafe fn free_many(&self, blocks: &mut dyn Iterator<Item = DmaBlock>) {
        let mut free = self.free.lock();
        free.extend(blocks.map(|block| (block.phys.0 - PHYS_BASE) as usize));
    }

    #[inline]
    fn phys_to_virt(&self, phys: PhysAddr) -> Option<NonNull<u8>> {
        let offset = phys.0.checked_sub(PHYS_BASE)? as usize;
        // SAFETY: inside the arena when below its size.
        (offset < self.size).then(|| NonNull::new(unsafe { self.base().add(offset) }).unwrap())
    }
}

impl Pool {
    fn block(&self, size: usize, align: usize, for_overwrite: bool) -> Result<DmaBlock, AllocError> {
        if size != PAGE || align > PAGE {
            return Err(AllocError::BadRequest { size, align });
        }
        Ok(self.block_at(self.frame(for_overwrite)))
    }

    fn block_at(&self, offset: usize) -> DmaBlock {
        // SAFETY: inside the arena.
        let virt = NonNull::new(unsafe { self.base().add(offset) }).unwrap();
        DmaBlock {
            phys: PhysAddr(PHYS_BASE + offset as u64),
            virt,
            size: PAGE,
        }
    }
}

/// The same pool behind aarch64-paging's `Translation` trait.
struct PeerPool<'a>(&'a Pool);

impl Translation<El23Attributes> for PeerPool<'_> {
    fn allocate_table(&mut self) -> (NonNull<PageTable<El23Attributes>>, PhysicalAddress) {
        let offset = self.0.frame(false);
        // SAFETY: inside the arena.
        let virt = NonNull::new(unsafe { self.0.base().add(offset) }).unwrap().cast();
        (virt, PhysicalAddress(PHYS_BASE as usize + offset))
    }

    unsafe fn deallocate_table(&mut self, table: NonNull<PageTable<El23Attributes>>) {
        let offset = table.as_ptr() as usize - self.0.base;
        self.0.free.lock().push(offset);
    }

    fn physical_to_virtual(&self, pa: PhysicalAddress) -> NonNull<PageTable<El23Attributes>> {
        // SAFETY: inside the arena.
        NonNull::new(unsafe { self.0.base().add(pa.0 - PHYS_BASE as usize) })
            .unwrap()
            .cast()
    }
}

const RW: Prot = Prot::READ.union(Prot::WRITE).union(Prot::CACHEABLE);
const PEER_RW: El23Attributes = El23Attributes::VALID
    .union(El23Attributes::ATTRIBUTE_INDEX_1)
    .union(El23Attributes::INNER_SHAREABLE)
    .union(El23Attributes::ACCESSED)
    .union(El23Attributes::XN);
const FORMAT: Format = Format {
    stage: Stage::One,
    granule: Granule::Size4K,
    input_bits: 39,
    output_bits: 48,
};

fn ours(pool: &Pool) -> IoPageTable<&Pool> {
    IoPageTable::new(FORMAT, pool, true).unwrap()
}

/// [`IoPageTable::release`] for tables no SMMU walks (so no invalidation is owed before they are freed).
#[inline]
fn release(t: &mut IoPageTable<&Pool>, gather: Gather) {
    // SAFETY: no SMMU walks a benchmark's tables.
    unsafe { t.release(gather) }.unwrap();
}

fn ours_map_unmap(t: &mut IoPageTable<&Pool>, iova: u64, pa: u64, size: u64) {
    t.map(Iova(iova), PhysAddr(pa), size, RW).unwrap();
    let mut gather = Gather::default();
    black_box(t.unmap(Iova(iova), size, &mut gather).unwrap());
    release(t, gather);
}

fn peer_map_unmap<T: Translation<El23Attributes>>(
    m: &mut Mapping<T, El2>,
    iova: u64,
    pa: u64,
    size: u64,
    c: Constraints,
) {
    let range = MemoryRegion::new(iova as usize, (iova + size) as usize);
    m.map_range(&range, PhysicalAddress(pa as usize), PEER_RW, c).unwrap();
    // aarch64-paging unmaps by writing invalid entries over the range (it keeps its tables).
    m.map_range(&range, PhysicalAddress(pa as usize), El23Attributes::empty(), c)
        .unwrap();
}

fn memset(bytes: &mut [u8]) {
    // SAFETY: writes within the slice.
    unsafe { std::ptr::write_bytes(black_box(bytes.as_mut_ptr()), 0x5a, bytes.len()) };
    black_box(&bytes);
}

/// The same descriptors as a map writes, written with plain stores (the physical limit for data that is not one
/// repeated value: a memset of a constant may use the CPU's fast-string microcode, `rep stosb` on x86, which writes
/// whole cache lines without first reading them, and nothing else can).
#[inline(never)]
fn fill(words: &mut [u64], first: u64, step: u64) {
    let mut d = first;
    for w in black_box(&mut *words) {
        *w = d;
        d += step;
    }
    black_box(words);
}

/// [`fill`] compiled for AVX2 (32-byte stores), for a CPU that has it: the widest plain stores this host offers a
/// program built for it (AVX-512 measured no faster on the development machine's Zen 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn fill_avx2(words: &mut [u64], first: u64, step: u64) {
    let mut d = first;
    for w in black_box(&mut *words) {
        *w = d;
        d += step;
    }
    black_box(words);
}

/// 1 GiB in 4 KiB pages (the output is offset by a page so no block fits), and 1 GiB in 2 MiB blocks (the input
/// is 2 MiB- but not 1 GiB-aligned so no 1 GiB block fits).
fn bulk(c: &mut Criterion) {
    let pool = Pool::new(64 << 20);
    for (name, iova, pa, descriptors) in [
        (
            "map_unmap_1g_4k",
            GIB,
            2 * GIB + PAGE as u64,
            (GIB / PAGE as u64) as usize,
        ),
        ("map_unmap_1g_2m", GIB + (2 << 20), 4 * GIB, (GIB >> 21) as usize),
    ] {
        let mut group = c.benchmark_group(name);
        let no_blocks = if name.ends_with("4k") {
            Constraints::NO_BLOCK_MAPPINGS
        } else {
            Constraints::empty()
        };
        let mut t = ours(&pool);
        group.bench_function("ours", |b| b.iter(|| ours_map_unmap(&mut t, iova, pa, GIB)));
        drop(t);
        let mut peer = Mapping::new(PeerPool(&pool), 1, El2);
        group.bench_function("peer_pool", |b| {
            b.iter(|| peer_map_unmap(&mut peer, iova, pa, GIB, no_blocks))
        });
        drop(peer);
        let mut idmap = IdMap::new(1, El2);
        group.bench_function("peer_global", |b| {
            b.iter(|| {
                let range = MemoryRegion::new(iova as usize, (iova + GIB) as usize);
                idmap.map_range_with_constraints(&range, PEER_RW, no_blocks).unwrap();
                idmap
                    .map_range_with_constraints(&range, El23Attributes::empty(), no_blocks)
                    .unwrap();
            })
        });
        drop(idmap);
        let mut bytes = vec![0u8; descriptors * 8];
        group.bench_function("memset", |b| b.iter(|| memset(&mut bytes)));
        drop(bytes);
        let step = if name.ends_with("4k") { PAGE as u64 } else { 2 << 20 };
        // In page-aligned frames, as the tables are (a heap vector's alignment, 16 bytes, moves the fill's
        // figure by a third between builds).
        let frames = Pool::new(descriptors * 8);
        // SAFETY: the pool's arena, `descriptors` zeroed words (page-aligned, touched), used for nothing else.
        let words = unsafe { std::slice::from_raw_parts_mut(frames.base().cast::<u64>(), descriptors) };
        group.bench_function("fill", |b| b.iter(|| fill(words, pa | 0x703, step)));
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            group.bench_function("fill_avx2", |b| {
                // SAFETY: the CPU has AVX2 (checked just above).
                b.iter(|| unsafe { fill_avx2(words, pa | 0x703, step) })
            });
        }
        group.finish();
    }
}

/// Maps page `p` of `order` at IOVA 1 GiB + p pages (to PA 2 GiB + p pages) for each, then unmaps each.
fn map_unmap_each(t: &mut IoPageTable<&Pool>, order: &[u64]) {
    for &p in order {
        t.map(
            Iova(GIB + p * PAGE as u64),
            PhysAddr(2 * GIB + p * PAGE as u64),
            PAGE as u64,
            RW,
        )
        .unwrap();
    }
    for &p in order {
        let mut gather = Gather::default();
        t.unmap(Iova(GIB + p * PAGE as u64), PAGE as u64, &mut gather).unwrap();
        release(t, gather);
    }
}

/// A fixed-seed sequence of 4096 single pages in a 1 GiB window: map each, then unmap each.
fn random(c: &mut Criterion) {
    let pool = Pool::new(64 << 20);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut pages: Vec<u64> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % (GIB / PAGE as u64)
        })
        .collect();
    pages.sort_unstable();
    pages.dedup();
    let order: Vec<u64> = {
        let mut o = pages.clone();
        // A deterministic shuffle.
        for i in (1..o.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            o.swap(i, (state % (i as u64 + 1)) as usize);
        }
        o
    };
    let mut group = c.benchmark_group("random_4k");
    let mut t = ours(&pool);
    group.bench_function("ours", |b| {
        b.iter(|| {
            map_unmap_each(&mut t, &order);
        })
    });
    drop(t);
    // The same, ending each iteration with a trim (and its release): every emptied table is freed, and allocated
    // (zeroed) again by the next iteration's maps. Not in the printed table; it shows what lazy freeing saves.
    let mut t = ours(&pool);
    group.bench_function("ours_trimmed", |b| {
        b.iter(|| {
            map_unmap_each(&mut t, &order);
            let mut gather = Gather::default();
            t.trim(&mut gather).unwrap();
            release(&mut t, gather);
        })
    });
    drop(t);
    let mut peer = Mapping::new(PeerPool(&pool), 1, El2);
    group.bench_function("peer_pool", |b| {
        b.iter(|| {
            for &p in &order {
                let iova = GIB + p * PAGE as u64;
                let range = MemoryRegion::new(iova as usize, iova as usize + PAGE);
                peer.map_range(
                    &range,
                    PhysicalAddress((2 * GIB) as usize + p as usize * PAGE),
                    PEER_RW,
                    Constraints::empty(),
                )
                .unwrap();
            }
            for &p in &order {
                let iova = GIB + p * PAGE as u64;
                let range = MemoryRegion::new(iova as usize, iova as usize + PAGE);
                peer.map_range(
                    &range,
                    PhysicalAddress(0),
                    El23Attributes::empty(),
                    Constraints::empty(),
                )
                .unwrap();
            }
        })
    });
    drop(peer);
    let mut bytes = vec![0u8; order.len() * 8 * 2];
    group.bench_function("memset", |b| b.iter(|| memset(&mut bytes)));
    group.finish();

    // Lookups of random addresses in 1 GiB of 4 KiB pages.
    let mut group = c.benchmark_group("iova_to_phys");
    let mut t = ours(&pool);
    t.map(Iova(GIB), PhysAddr(2 * GIB + PAGE as u64), GIB, RW).unwrap();
    group.bench_function("ours", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for &p in &order {
                sum = sum.wrapping_add(t.iova_to_phys(Iova(GIB + p * PAGE as u64 + 8)).unwrap().0);
            }
            black_box(sum)
        })
    });
    let mut peer = Mapping::new(PeerPool(&pool), 1, El2);
    peer.map_range(
        &MemoryRegion::new(GIB as usize, (2 * GIB) as usize),
        PhysicalAddress((2 * GIB) as usize + PAGE),
        PEER_RW,
        Constraints::NO_BLOCK_MAPPINGS,
    )
    .unwrap();
    group.bench_function("peer_pool", |b| {
        b.iter(|| {
            let mut sum = 0usize;
            for &p in &order {
                let va = (GIB + p * PAGE as u64) as usize + 8;
                peer.walk_range(&MemoryRegion::new(va, va + 1), &mut |_, d, _| {
                    sum = sum.wrapping_add(d.output_address().0);
                    Ok(())
                })
                .unwrap();
            }
            black_box(sum)
        })
    });
    group.finish();
}

/// A fixed-seed shuffle of `0..n`.
fn shuffled(n: u64, mut state: u64) -> Vec<u64> {
    let mut o: Vec<u64> = (0..n).collect();
    for i in (1..o.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        o.swap(i, (state % (i as u64 + 1)) as usize);
    }
    o
}

/// Operations timed together in `iter_custom` (the clock read costs about as much as one operation, so each
/// batch of single-page operations is timed as a whole, and the other phase runs untimed between batches).
const BATCH: usize = 256;

/// The dma_map path: one page mapped or unmapped at a random IOVA of a populated 1 GiB range (every even page
/// mapped, so every last-level table exists and none ever empties), each phase timed alone; and the same page
/// mapped and unmapped again and again (hot). Ours includes the `Gather` and `release` a caller runs around an
/// unmap; the peer unmaps by writing an invalid entry.
fn single(c: &mut Criterion) {
    let pool = Pool::new(64 << 20);
    let pages = GIB / PAGE as u64;
    // Odd pages, in random order: unmapped, so the map phase can map each.
    let targets: Vec<u64> = shuffled(pages / 2, 0x9e37_79b9_7f4a_7c15)
        .into_iter()
        .map(|k| 2 * k + 1)
        .collect();
    let iova = |p: u64| GIB + p * PAGE as u64;
    let pa = |p: u64| 2 * GIB + p * PAGE as u64;

    let mut t = ours(&pool);
    for p in (0..pages).step_by(2) {
        t.map(Iova(iova(p)), PhysAddr(pa(p)), PAGE as u64, RW).unwrap();
    }
    let mut peer = Mapping::new(PeerPool(&pool), 1, El2);
    for p in (0..pages).step_by(2) {
        let range = MemoryRegion::new(iova(p) as usize, iova(p) as usize + PAGE);
        peer.map_range(&range, PhysicalAddress(pa(p) as usize), PEER_RW, Constraints::empty())
            .unwrap();
    }
    let peer_map = |peer: &mut Mapping<PeerPool, El2>, p: u64, attributes: El23Attributes| {
        let range = MemoryRegion::new(iova(p) as usize, iova(p) as usize + PAGE);
        peer.map_range(
            &range,
            PhysicalAddress(pa(p) as usize),
            attributes,
            Constraints::empty(),
        )
        .unwrap();
    };
    let ours_unmap = |t: &mut IoPageTable<&Pool>, p: u64| {
        let mut gather = Gather::default();
        black_box(t.unmap(Iova(iova(p)), PAGE as u64, &mut gather).unwrap());
        release(t, gather);
    };
    // Runs `iters` operations in batches at successive targets: `before` on each (untimed), `timed` on each,
    // timed per batch, then `after` on each (untimed).
    #[allow(clippy::too_many_arguments)]
    fn batches<T>(
        iters: u64,
        next: &mut usize,
        targets: &[u64],
        state: &mut T,
        mut before: impl FnMut(&mut T, u64),
        mut timed: impl FnMut(&mut T, u64),
        mut after: impl FnMut(&mut T, u64),
    ) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = iters as usize;
        while left > 0 {
            let n = left.min(BATCH);
            if *next + n > targets.len() {
                *next = 0;
            }
            let batch = &targets[*next..*next + n];
            *next += n;
            for &p in batch {
                before(state, p);
            }
            let start = Instant::now();
            for &p in batch {
                timed(state, p);
            }
            total += start.elapsed();
            for &p in batch {
                after(state, p);
            }
            left -= n;
        }
        total
    }
    let ours_map = |t: &mut IoPageTable<&Pool>, p: u64| t.map(Iova(iova(p)), PhysAddr(pa(p)), PAGE as u64, RW).unwrap();
    let peer_unmap = |m: &mut Mapping<PeerPool, El2>, p: u64| peer_map(m, p, El23Attributes::empty());
    let peer_remap = |m: &mut Mapping<PeerPool, El2>, p: u64| peer_map(m, p, PEER_RW);
    fn nothing<T>(_: &mut T, _: u64) {}

    let mut group = c.benchmark_group("map_one_4k");
    let mut next = 0;
    group.bench_function("ours", |b| {
        b.iter_custom(|iters| batches(iters, &mut next, &targets, &mut t, nothing, ours_map, ours_unmap))
    });
    group.bench_function("peer_pool", |b| {
        b.iter_custom(|iters| batches(iters, &mut next, &targets, &mut peer, nothing, peer_remap, peer_unmap))
    });
    group.finish();

    let mut group = c.benchmark_group("unmap_one_4k");
    group.bench_function("ours", |b| {
        b.iter_custom(|iters| batches(iters, &mut next, &targets, &mut t, ours_map, ours_unmap, nothing))
    });
    group.bench_function("peer_pool", |b| {
        b.iter_custom(|iters| batches(iters, &mut next, &targets, &mut peer, peer_remap, peer_unmap, nothing))
    });
    group.finish();

    let mut group = c.benchmark_group("map_unmap_same_4k");
    let hot = targets[0];
    group.bench_function("ours", |b| {
        b.iter(|| {
            t.map(Iova(iova(hot)), PhysAddr(pa(hot)), PAGE as u64, RW).unwrap();
            ours_unmap(&mut t, hot);
        })
    });
    group.bench_function("peer_pool", |b| {
        b.iter(|| {
            peer_map(&mut peer, hot, PEER_RW);
            peer_map(&mut peer, hot, El23Attributes::empty());
        })
    });
    group.finish();
}

criterion_group!(benches, bulk, single, random);
criterion_main!(benches);
