//! Live update cost (issue #17): `preserve` against the number of domains already preserved (the token index is
//! O(1), so it should be flat), `prepare_handover` against the number of preserved domains (linear by nature: one
//! record per domain is encoded and then decoded back as a self-check), and a whole restore (`restore_handover` +
//! `retrieve` + `finish_handover`) against the size one preserved stage-1 domain maps as 4 KiB pages, verified
//! (every table walked before anything is installed: linear in the table bytes) and trusted (the recorded tables
//! adopted unread: flat), with a plain read of the same table bytes measured in the same run as the yardstick of
//! the verified one. `cargo xtask bench` prints the table.
//!
//! The SMMU is a small fake (a thread that acknowledges CR0, GBPA and IRQ_CTRL writes and consumes commands), as in
//! `benches/domains.rs`, so the numbers are the driver's work plus its CMD_SYNC round trips through shared memory.
//! On the host the cache maintenance to the point of coherency is a no-op; on aarch64 `prepare_handover` also
//! cleans every preserved byte (linear in the preserved memory).

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

mod common;

use smmuv3::{Iova, PhysAddr};
use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{HeapFrames, fake_smmu};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use smmuv3::handover::Extent;
use smmuv3::handover::format;
use smmuv3::handover::pool::{HandoverPool, METADATA_BYTES};
use smmuv3::handover::verify::{RestoreOptions, Verification};
use smmuv3::{DomainId, InitOptions, Iommu, Prot, Smmu, Stage1Options};

/// Domains the driver of the size benchmarks has room for.
const CAPACITY: usize = 32;
/// Domains the driver of the scale benchmarks has room for: 4,096 preserved, and one more measured.
const SCALE: usize = 4104;
/// The preserved-domain counts the scale benchmarks run at.
const SCALES: [usize; 5] = [1, 4, 8, 16, 4096];
/// The region of the scale benchmarks: 1 MiB of records (4,097 records of a domain with one run: 72 + 16 bytes
/// each) and a pool of 96 MiB (each domain: a root, a level-2 and a level-3 table).
const SCALE_METADATA: u64 = 1 << 20;
const SCALE_REGION_BYTES: usize = (1 << 20) + (96 << 20);
/// The SMMU's register base as the records name it (any fixed value: the fake has no physical address).
const REGISTER_BASE: u64 = 0x905_0000;
/// The handover region: 64 KiB of records and 16 arenas of 4 MiB (1 GiB of 4 KiB pages needs about 2 MiB + 8 KiB
/// of page tables).
const REGION_BYTES: usize = (64 << 10) + 16 * (4 << 20);
/// The region of the 64 GiB restore: 16 arenas of 130 MiB (64 GiB of 4 KiB pages needs 128 MiB + 260 KiB of page
/// tables), committed by the host only as it is written.
const BIG_REGION_BYTES: usize = (64 << 10) + 16 * (130 << 20);
/// The region's physical base (the fake SMMU reads no page table, so any 4 KiB-aligned value does).
const REGION_PHYS: u64 = 0x80_0000_0000;
const RW: Prot = Prot::READ.union(Prot::WRITE).union(Prot::CACHEABLE);
const STAGE1: Stage1Options = Stage1Options {
    input_bits: 39,
    el2: false,
};
const SID: u32 = 0x10;
const TOKEN: u64 = 0x51;
/// Where the domains' pages are (their output addresses), which survives the hand-off and which the next image
/// declares DMA-able: 128 GiB from 32 GiB (the fake SMMU reads no page, so any range outside the region does).
const DMA_MEMORY: [Extent; 1] = [Extent {
    base: 0x8_0000_0000,
    len: 128 << 30,
}];

type Active = Iommu<&'static HeapFrames, CAPACITY>;
type Scaled = Iommu<&'static HeapFrames, SCALE>;

/// Set while nothing timed talks to the SMMU (preserve, prepare_handover): the fake then sleeps instead of
/// spinning, so that it does not compete with the measured thread for a core.
static PAUSE: AtomicBool = AtomicBool::new(false);

/// The handover region: leaked, pre-touched memory that outlives every "image", with one pool over it. Each
/// "image" of the restore benchmark starts with every arena free again (the previous one freed its domain), which
/// is the state a fresh pool over the same memory starts in.
struct Region {
    /// The region's first byte (the pool and the driver reach the memory through this pointer too).
    memory: NonNull<u8>,
    /// Its length.
    len: usize,
    pool: &'static HandoverPool,
}

impl Region {
    /// A region of `len` bytes, every page touched once when `pretouch` (no page fault inside a timed section; the
    /// restores copy the tables in untimed before each iteration, which touches them anyway).
    fn new(len: usize, pretouch: bool) -> Region {
        Self::with_metadata(len, pretouch, METADATA_BYTES)
    }

    /// As [`Region::new`], with a metadata area of `metadata` bytes (and a workspace for it).
    fn with_metadata(len: usize, pretouch: bool, metadata: u64) -> Region {
        let memory: &'static mut [u8] = Box::leak(vec![0u8; len].into_boxed_slice());
        if pretouch {
            for page in memory.chunks_mut(4096) {
                page[0] = 1;
                page[0] = black_box(0);
            }
        }
        let pool: &'static HandoverPool = Box::leak(Box::new(HandoverPool::new()));
        let extent = Extent {
            base: REGION_PHYS,
            len: len as u64,
        };
        let memory = NonNull::new(memory.as_mut_ptr()).unwrap();
        // SAFETY: leaked memory used by nothing else, reached at this address for the program's life.
        unsafe {
            if metadata == METADATA_BYTES {
                pool.set_up(extent, memory)
            } else {
                let words = smmuv3::handover::pool::workspace_words(metadata);
                pool.set_up_with(
                    extent,
                    memory,
                    metadata,
                    Box::leak(vec![0u64; words].into_boxed_slice()),
                )
            }
        }
        .unwrap();
        Region { memory, len, pool }
    }

    /// The 64-bit words of `extent` (physical, 8-byte aligned, inside the region), between "images".
    fn words(&mut self, extent: Extent) -> &[u64] {
        let bytes = self.bytes(extent);
        assert!((bytes.as_ptr() as usize).is_multiple_of(8) && bytes.len().is_multiple_of(8));
        // SAFETY: 8-byte aligned (checked), inside the leaked region, borrowed from `&mut self` like `bytes`.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<u64>(), bytes.len() / 8) }
    }

    /// The bytes of `extent` (physical, inside the region), while no driver is running (between "images").
    fn bytes(&mut self, extent: Extent) -> &mut [u8] {
        let start = (extent.base - REGION_PHYS) as usize;
        assert!(start + extent.len as usize <= self.len);
        // SAFETY: inside the leaked region (checked above); `&mut self` and the callers' use between images keep
        // every other access away while the slice lives.
        unsafe { std::slice::from_raw_parts_mut(self.memory.as_ptr().add(start), extent.len as usize) }
    }
}

/// `times.len()` times the median of `times`: what criterion is given for a sample of restores, so that an
/// iteration stalled by the fake SMMU thread being descheduled (this host's cores are shared) does not weigh on
/// the sample as a mean would. The same statistic serves the plain read it is compared with.
fn median_of(mut times: Vec<Duration>) -> Duration {
    times.sort_unstable();
    times[times.len() / 2] * times.len() as u32
}

/// What the restore benchmark copies back before every iteration: the records and the domain's memory as the first
/// image left them.
struct Snapshot {
    metadata: Vec<u8>,
    extent: Extent,
    tables: Vec<u8>,
}

/// A stage-1 domain in a fresh arena with `pages` 4 KiB pages mapped (the output address is 4 KiB off a 2 MiB
/// boundary, so no block fits).
fn stage1_with_pages(smmu: &mut Active, pool: &'static HandoverPool, pages: u64) -> DomainId {
    let d = smmu.create_stage1(pool.take_memory().unwrap(), STAGE1).unwrap();
    smmu.map(d, Iova(0x4000_0000), PhysAddr(0x8_0000_1000), pages << 12, RW)
        .unwrap();
    d
}

/// A stage-1 domain with one 4 KiB page mapped (a root, a level-2 and a level-3 table).
fn small_domain(smmu: &Scaled, pool: &'static HandoverPool, i: usize) -> DomainId {
    let d = smmu.create_stage1(pool.take_memory().unwrap(), STAGE1).unwrap();
    smmu.map(
        d,
        Iova(0x4000_0000),
        PhysAddr(0x8_0000_1000 + ((i as u64) << 12)),
        0x1000,
        RW,
    )
    .unwrap();
    d
}

fn bench_preserve(c: &mut Criterion, smmu: &Scaled, region: &Region) {
    let pool = region.pool;
    let mut group = c.benchmark_group("preserve");
    // Up to 4,096 preserved plus the one being preserved.
    let domains: Vec<DomainId> = (0..=*SCALES.last().unwrap())
        .map(|i| small_domain(smmu, pool, i))
        .collect();
    let (measured, others) = domains.split_last().unwrap();
    let measured = *measured;
    let mut preserved = 0;
    // Nothing below waits for the SMMU until the domains are freed.
    PAUSE.store(true, Ordering::Relaxed);
    // What the two clock reads around each timed preserve cost by themselves.
    group.bench_function("clock_overhead", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                total += black_box(start).elapsed();
            }
            total
        })
    });
    for n in SCALES {
        while preserved < n {
            smmu.preserve(others[preserved], 0x1000 + preserved as u64).unwrap();
            preserved += 1;
        }
        // Only preserve is timed; unpreserve puts the state back.
        group.bench_function(BenchmarkId::new("preserve", n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    smmu.preserve(black_box(measured), black_box(TOKEN)).unwrap();
                    total += start.elapsed();
                    smmu.unpreserve(TOKEN).unwrap();
                }
                total
            })
        });
        group.bench_function(BenchmarkId::new("preserve_unpreserve", n), |b| {
            b.iter(|| {
                smmu.preserve(black_box(measured), black_box(TOKEN)).unwrap();
                smmu.unpreserve(black_box(TOKEN)).unwrap()
            })
        });
        if n == 1 || n == 16 || n == 4096 {
            let mut generation = 0;
            group.bench_function(BenchmarkId::new("prepare_handover", n), |b| {
                b.iter_custom(|iters| {
                    // Prepare timed; the cancel that lets the next one prepare again is not.
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        generation += 1;
                        let start = Instant::now();
                        smmu.prepare_handover(pool, REGISTER_BASE, black_box(generation), &DMA_MEMORY)
                            .unwrap();
                        total += start.elapsed();
                        smmu.cancel_handover(pool, REGISTER_BASE).unwrap();
                    }
                    total
                })
            });
        }
    }
    group.finish();
    PAUSE.store(false, Ordering::Relaxed);
    for i in 0..preserved {
        smmu.unpreserve(0x1000 + i as u64).unwrap();
    }
    for d in domains {
        smmu.free_domain(d).unwrap();
    }
    assert_eq!(pool.memories_in_use(), 0);
}

/// Domain `i`'s stream: spread over 16 bits of StreamID (a 2-level stream table's spans allocated as they come).
fn spread_sid(i: usize) -> u32 {
    (i * 16 + i % 16) as u32
}

/// A whole restore of `n` preserved domains (one page and one stream each, the StreamIDs spread over 16 bits),
/// every domain retrieved, then finish: per domain, against 16.
fn bench_restore_many(c: &mut Criterion, mut smmu: Smmu, frames: &'static HeapFrames, region: &mut Region) -> Smmu {
    let pool = region.pool;
    let mut group = c.benchmark_group("restore_many");
    for n in [16usize, 4096] {
        // The first image (untimed).
        let (s, metadata, pool_bytes) = {
            let active: Scaled = smmu.init_with_capacity(frames, &InitOptions::default()).unwrap();
            let domains: Vec<DomainId> = (0..n).map(|i| small_domain(&active, pool, i)).collect();
            for (i, &d) in domains.iter().enumerate() {
                active.attach(d, spread_sid(i)).unwrap();
                active.preserve(d, 0x10_0000 + i as u64).unwrap();
            }
            active.prepare_handover(pool, REGISTER_BASE, 1, &DMA_MEMORY).unwrap();
            let metadata = region.bytes(pool.metadata_extent().unwrap()).to_vec();
            let pool_bytes = region.bytes(pool.pool().unwrap()).to_vec();
            active.cancel_handover(pool, REGISTER_BASE).unwrap();
            for (i, &d) in domains.iter().enumerate() {
                active.unpreserve(0x10_0000 + i as u64).unwrap();
                active.detach(spread_sid(i)).unwrap();
                active.free_domain(d).unwrap();
            }
            (active.shutdown(false).unwrap(), metadata, pool_bytes)
        };
        let mut spare = Some(s);
        let options = RestoreOptions {
            dma_memory: &DMA_MEMORY,
            verify: Verification::Full,
        };
        group.bench_function(BenchmarkId::new("restore_retrieve_finish", n), |b| {
            b.iter_custom(|iters| {
                let mut times = Vec::with_capacity(iters as usize);
                for _ in 0..iters {
                    // The reset (untimed): the region as the first image left it, a fresh driver and pool state.
                    // Every frame but the owner map's (this pool object's own, which says every frame is free).
                    region.bytes(pool.metadata_extent().unwrap()).copy_from_slice(&metadata);
                    let (whole, map) = (pool.pool().unwrap(), pool.owner_map().unwrap());
                    let (before, after) = (
                        (map.base - whole.base) as usize,
                        (map.base + map.len - whole.base) as usize,
                    );
                    region
                        .bytes(Extent {
                            base: whole.base,
                            len: before as u64,
                        })
                        .copy_from_slice(&pool_bytes[..before]);
                    region
                        .bytes(Extent {
                            base: map.base + map.len,
                            len: (whole.len as usize - after) as u64,
                        })
                        .copy_from_slice(&pool_bytes[after..]);
                    let active: Scaled = spare
                        .take()
                        .unwrap()
                        .init_with_capacity(frames, &InitOptions::default())
                        .unwrap();
                    let start = Instant::now();
                    let report = active.restore_handover(pool, REGISTER_BASE, &options).unwrap();
                    let ids: Vec<DomainId> = (0..n).map(|i| active.retrieve(0x10_0000 + i as u64).unwrap()).collect();
                    let finish = active.finish_handover(pool, REGISTER_BASE).unwrap();
                    times.push(start.elapsed());
                    assert_eq!((report.domains as usize, finish.unclaimed), (n, 0));
                    // Teardown (untimed).
                    for (i, d) in ids.into_iter().enumerate() {
                        active.detach(spread_sid(i)).unwrap();
                        active.free_domain(d).unwrap();
                    }
                    spare = Some(active.shutdown(false).unwrap());
                }
                median_of(times)
            })
        });
        smmu = spare.take().unwrap();
    }
    group.finish();
    smmu
}

/// The first image for one size: the domain mapped, its stream attached, preserved and prepared; the region's
/// bytes are saved; then the domain is freed (untimed teardown, its arena free again) and the SMMU shut down.
fn first_image(smmu: Smmu, frames: &'static HeapFrames, region: &mut Region, pages: u64) -> (Smmu, Snapshot) {
    let pool = region.pool;
    let mut active: Active = smmu.init_with_capacity(frames, &InitOptions::default()).unwrap();
    let d = stage1_with_pages(&mut active, pool, pages);
    active.attach(d, SID).unwrap();
    active.preserve(d, TOKEN).unwrap();
    active.prepare_handover(pool, REGISTER_BASE, 1, &DMA_MEMORY).unwrap();
    let extent = memory_extent(&active, d);
    // 4 KiB pages: one last-level table per 2 MiB at least (blocks would need none).
    assert!(extent.len >= pages.div_ceil(512) * 4096, "{extent:?}");
    let last = 0x4000_0000 + ((pages - 1) << 12);
    assert_eq!(
        active.iova_to_phys(d, Iova(last)),
        Ok(Some(PhysAddr(last - 0x4000_0000 + 0x8_0000_1000)))
    );
    let metadata = region.bytes(pool.metadata_extent().unwrap()).to_vec();
    let tables = region.bytes(extent).to_vec();
    active.cancel_handover(pool, REGISTER_BASE).unwrap();
    active.unpreserve(TOKEN).unwrap();
    active.detach(SID).unwrap();
    active.free_domain(d).unwrap();
    assert_eq!(pool.memories_in_use(), 0);
    (
        active.shutdown(false).unwrap(),
        Snapshot {
            metadata,
            extent,
            tables,
        },
    )
}

/// The extent of a preserved domain's memory, as its record names it.
fn memory_extent(smmu: &Active, d: DomainId) -> Extent {
    let token = smmu.token_of(d).unwrap().unwrap();
    let mut buffer = vec![0u8; 1 << 16];
    let records = smmu.handover_records(REGISTER_BASE, &mut buffer).unwrap();
    let record = records.records.iter().find(|r| r.token == token).unwrap();
    assert_eq!(record.extents.len(), 1);
    record.extents.first().unwrap()
}

fn bench_restore(
    c: &mut Criterion,
    mut smmu: Smmu,
    frames: &'static HeapFrames,
    region: &mut Region,
    sizes: &[(&str, u64)],
) -> Smmu {
    let pool = region.pool;
    let pool_extent = pool.pool().unwrap();
    let metadata_extent = pool.metadata_extent().unwrap();
    let mut group = c.benchmark_group("restore");
    for &(label, pages) in sizes {
        let (s, snapshot) = first_image(smmu, frames, region, pages);
        smmu = s;
        let mut spare = Some(smmu);
        for (mode, verify) in [
            ("verified", Verification::Full),
            ("trusted", Verification::TrustRecordedTables),
        ] {
            let options = RestoreOptions {
                dma_memory: &DMA_MEMORY,
                verify,
            };
            group.bench_function(
                BenchmarkId::new(format!("restore_retrieve_finish_{mode}"), label),
                |b| {
                    b.iter_custom(|iters| {
                        let mut times = Vec::with_capacity(iters as usize);
                        for _ in 0..iters {
                            // The reset (untimed): the region's bytes as the first image left them, a fresh driver.
                            region.bytes(metadata_extent).copy_from_slice(&snapshot.metadata);
                            region.bytes(snapshot.extent).copy_from_slice(&snapshot.tables);
                            let active: Active = spare
                                .take()
                                .unwrap()
                                .init_with_capacity(frames, &InitOptions::default())
                                .unwrap();
                            let start = Instant::now();
                            let report = active.restore_handover(pool, REGISTER_BASE, &options).unwrap();
                            let d = active.retrieve(TOKEN).unwrap();
                            let finish = active.finish_handover(pool, REGISTER_BASE).unwrap();
                            times.push(start.elapsed());
                            assert_eq!(
                                (report.domains, report.adopted_without_walk, finish.unclaimed),
                                (1, 1, 0)
                            );
                            // Teardown (untimed): the domain freed, its arena free again, the SMMU off.
                            active.detach(SID).unwrap();
                            active.free_domain(d).unwrap();
                            spare = Some(active.shutdown(false).unwrap());
                        }
                        median_of(times)
                    })
                },
            );
        }
        // The yardstick: every byte of the same tables read once (64-bit loads folded together), after the same
        // untimed copy that puts them where the restore finds them.
        group.bench_function(BenchmarkId::new("plain_read", label), |b| {
            b.iter_custom(|iters| {
                let mut times = Vec::with_capacity(iters as usize);
                for _ in 0..iters {
                    region.bytes(snapshot.extent).copy_from_slice(&snapshot.tables);
                    let words = region.words(snapshot.extent);
                    let start = Instant::now();
                    black_box(black_box(words).iter().fold(0u64, |a, &w| a ^ w));
                    times.push(start.elapsed());
                }
                median_of(times)
            })
        });
        smmu = spare.take().unwrap();
        group.bench_function(BenchmarkId::new("decode", label), |b| {
            let mut scratch = vec![0u64; format::scratch_words(snapshot.metadata.len())];
            b.iter(|| format::decode(black_box(&snapshot.metadata), pool_extent, &mut scratch).unwrap())
        });
    }
    group.finish();
    smmu
}

fn bench_live_update(c: &mut Criterion) {
    static STOP: AtomicBool = AtomicBool::new(false);
    let frames = HeapFrames::leaked();
    let base = fake_smmu(&STOP, &PAUSE);
    // SAFETY: the block models the SMMU's two register pages for the benchmark's life.
    let smmu = unsafe { Smmu::probe(NonNull::new(base as *mut u8).unwrap(), 0x2_0000) }.unwrap();
    let mut scale = Region::with_metadata(SCALE_REGION_BYTES, true, SCALE_METADATA);
    assert_eq!(scale.pool.metadata_extent().unwrap().len, SCALE_METADATA);
    let active: Scaled = smmu.init_with_capacity(frames, &InitOptions::default()).unwrap();
    bench_preserve(c, &active, &scale);
    let smmu = active.shutdown(false).unwrap();
    let smmu = bench_restore_many(c, smmu, frames, &mut scale);
    let mut region = Region::new(REGION_BYTES, true);
    assert_eq!(region.pool.metadata_extent().unwrap().len, METADATA_BYTES);
    let sizes = [("4KiB", 1u64), ("2MiB", 512), ("64MiB", 64 << 8), ("1GiB", 1 << 18)];
    let smmu = bench_restore(c, smmu, frames, &mut region, &sizes);
    // 64 GiB of 4 KiB pages: 128 MiB of page tables, in an arena of a region of its own.
    let mut big = Region::new(BIG_REGION_BYTES, false);
    let _smmu = bench_restore(c, smmu, frames, &mut big, &[("64GiB", 1 << 24)]);
    STOP.store(true, Ordering::Relaxed);
}

criterion_group! {
    name = benches;
    config = Criterion::default();
    targets = bench_live_update
}
criterion_main!(benches);
