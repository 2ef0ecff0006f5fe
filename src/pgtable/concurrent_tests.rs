//! Tests of the concurrent paths (`map_shared`, `unmap_page_shared`, `trim_shared`): each path alone against the
//! exclusive one, and host stress runs of 2, 4 and 8 threads mapping and unmapping pages of one table (their own
//! and pages they share), ranges that race each other, and trims, against a model. At the end the table must equal
//! the model leaf for leaf, every count, full bit and trim mark must be what the entries say, and every frame must
//! be linked or released exactly once (the heap allocator panics on a double or foreign free).

extern crate std;

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::vec::Vec;

use super::checks::check;
use super::*;
use crate::testing::HeapFrames;

const RW: Prot = Prot::READ.union(Prot::WRITE).union(Prot::CACHEABLE);

fn format(granule: Granule, input_bits: u8) -> Format {
    Format {
        stage: Stage::One,
        granule,
        input_bits,
        output_bits: 44,
    }
}

/// [`IoPageTable::release`] in host tests, where no SMMU walks the tables.
fn release<A: FrameAllocator>(t: &mut IoPageTable<A>, g: Gather) {
    // SAFETY: no SMMU walks the tables of a host test.
    unsafe { t.release(g) }.unwrap();
}

#[test]
fn page_tables_are_send_and_sync_when_their_allocator_is() {
    fn shared<T: Send + Sync>() {}
    shared::<HeapFrames>();
    shared::<IoPageTable<&HeapFrames>>();
    shared::<IoPageTable<HeapFrames>>();
}

#[test]
fn a_shared_page_maps_unmaps_and_its_emptied_table_is_trimmed() {
    let frames = HeapFrames::default();
    let mut t = IoPageTable::new(format(Granule::Size4K, 39), &frames, true).unwrap();
    let mut gather = Gather::default();
    t.map_shared(Iova(0x4000_0000), PhysAddr(0x8000_0000), 0x1000, RW, &mut gather)
        .unwrap();
    assert!(
        gather.is_empty() && gather.owner().is_none(),
        "a map that succeeds gathers nothing"
    );
    assert_eq!(t.translate(Iova(0x4000_0008)), Some((PhysAddr(0x8000_0008), RW)));
    assert_eq!(
        t.map_shared(Iova(0x4000_0000), PhysAddr(0x9000_0000), 0x1000, RW, &mut gather),
        Err(MapError::Overlap { iova: 0x4000_0000 })
    );
    assert_eq!(
        t.translate(Iova(0x4000_0000)),
        Some((PhysAddr(0x8000_0000), RW)),
        "the loser changed nothing"
    );
    assert_eq!(check(&t).tables, 3, "the root, a level-2 and a last-level table");
    assert_eq!(t.unmap_page_shared(Iova(0x4000_0000), &mut gather), Ok(0x1000));
    assert_eq!(
        t.unmap_page_shared(Iova(0x4000_0000), &mut gather),
        Ok(0),
        "the second unmap finds nothing"
    );
    assert_eq!(
        (gather.start(), gather.end(), gather.leaves()),
        (0x4000_0000, 0x4000_1000, 1)
    );
    assert_eq!(gather.freed_tables(), 0, "the emptied table stays linked");
    let found = check(&t);
    assert_eq!((found.tables, found.empty), (3, 1));
    assert!(t.trim_due() == (1 > DEFAULT_LAZY_FREE_LIMIT));
    let mut trimmed = Gather::default();
    assert_eq!(
        t.trim_shared(&mut trimmed),
        Ok(2),
        "the last-level table, then the one above it"
    );
    assert!(trimmed.tables_unlinked());
    let found = check(&t);
    assert_eq!((found.tables, found.empty), (1, 0));
    release(&mut t, gather);
    release(&mut t, trimmed);
    assert_eq!(frames.live_blocks(), 1, "the root alone");
    assert_eq!(t.trim_shared(&mut Gather::default()), Ok(0));
}

#[test]
fn shared_maps_build_the_same_table_as_exclusive_ones() {
    // Ranges with blocks, runs that cross table boundaries, a whole last-level table, single pages.
    let ranges: [(u64, u64, u64); 8] = [
        (0x4000_0000, 0x8000_0000, 0x4000_0000),
        (0x1_0020_0000, 0x2_0020_0000, 0x60_0000),
        (0x1_4000_3000, 0x2_4000_3000, 0x20_5000),
        (0x1_8000_0000, 0x2_8000_1000, 0x20_0000),
        (0x1_c01f_f000, 0x2_c01f_f000, 0x2000),
        (0x2_0000_0000, 0x3_0000_0000, 0x1000),
        (0x2_4000_0000, 0x3_4000_0000, 0x8000_0000),
        (0x3_f000_0000, 0x1_0000_0000, 0x1000_0000),
    ];
    for granule in [Granule::Size4K, Granule::Size16K, Granule::Size64K] {
        let g = 1u64 << granule.log2();
        let (a, b) = (HeapFrames::default(), HeapFrames::default());
        let mut exclusive = IoPageTable::new(format(granule, 40), &a, true).unwrap();
        let shared = IoPageTable::new(format(granule, 40), &b, true).unwrap();
        for &(iova, pa, size) in &ranges {
            let round = |x: u64| x & !(g - 1);
            let (iova, pa, size) = (round(iova), round(pa), round(size).max(g));
            let mut gather = Gather::default();
            assert_eq!(
                shared.map_shared(Iova(iova), PhysAddr(pa), size, RW, &mut gather),
                exclusive.map(Iova(iova), PhysAddr(pa), size, RW),
                "{granule:?} {iova:#x}+{size:#x}"
            );
            assert!(gather.is_empty());
        }
        let (x, y) = (check(&exclusive), check(&shared));
        assert_eq!(
            x.leaves, y.leaves,
            "{granule:?}: the same leaves, blocks where the exclusive map uses them"
        );
        assert_eq!((x.tables, x.empty), (y.tables, y.empty), "{granule:?}");
        assert_eq!(a.live_blocks(), b.live_blocks(), "{granule:?}: no frame left over");
    }
}

#[test]
fn a_shared_map_over_an_emptied_table_fills_it_instead_of_covering_it_with_a_block() {
    let frames = HeapFrames::default();
    let mut t = IoPageTable::new(format(Granule::Size4K, 39), &frames, true).unwrap();
    let mut gather = Gather::default();
    t.map_shared(Iova(0x20_3000), PhysAddr(0x4000_3000), 0x1000, RW, &mut gather)
        .unwrap();
    assert_eq!(t.unmap_page_shared(Iova(0x20_3000), &mut gather), Ok(0x1000));
    assert_eq!(check(&t).empty, 1);
    // A 2 MiB-aligned 4 MiB range: a block for the second half, the emptied table's pages for the first.
    t.map_shared(Iova(0x20_0000), PhysAddr(0x4000_0000), 0x40_0000, RW, &mut gather)
        .unwrap();
    let found = check(&t);
    assert_eq!(found.empty, 0, "the emptied table was filled");
    assert_eq!(
        found.leaves.get(&0x40_0000),
        Some(&(0x4020_0000, 0x20_0000)),
        "a block after it"
    );
    assert_eq!(
        found.leaves.get(&0x20_0000),
        Some(&(0x4000_0000, 0x1000)),
        "pages in it"
    );
    assert_eq!(found.leaves.len(), 512 + 1);
    assert_eq!(t.iova_to_phys(Iova(0x3f_f008)), Some(PhysAddr(0x401f_f008)));
    release(&mut t, gather);
}

#[test]
fn a_shared_unmap_of_a_page_in_a_block_needs_the_exclusive_path() {
    let frames = HeapFrames::default();
    let mut t = IoPageTable::new(format(Granule::Size4K, 39), &frames, true).unwrap();
    let mut gather = Gather::default();
    t.map_shared(Iova(0x20_0000), PhysAddr(0x4000_0000), 0x20_0000, RW, &mut gather)
        .unwrap();
    assert_eq!(
        t.unmap_page_shared(Iova(0x20_1000), &mut gather),
        Err(MapError::NeedsExclusive { iova: 0x20_1000 })
    );
    assert!(gather.is_empty() && gather.owner().is_none(), "nothing changed");
    assert_eq!(
        t.unmap_page_shared(Iova(0x20_0800), &mut gather),
        Err(MapError::Unaligned {
            iova: 0x20_0800,
            size: 0x1000
        })
    );
    assert_eq!(
        t.unmap_page_shared(Iova(1 << 39), &mut gather),
        Err(MapError::InputOutOfRange {
            iova: 1 << 39,
            size: 0x1000
        })
    );
    let other = IoPageTable::new(format(Granule::Size4K, 39), &frames, true).unwrap();
    let mut foreign = Gather::default();
    other.unmap_page_shared(Iova(0), &mut foreign).unwrap();
    other
        .map_shared(Iova(0), PhysAddr(0), 0x1000, RW, &mut Gather::default())
        .unwrap();
    assert_eq!(other.unmap_page_shared(Iova(0), &mut foreign), Ok(0x1000));
    assert!(matches!(
        t.unmap_page_shared(Iova(0x20_0000), &mut foreign),
        Err(MapError::ForeignGather { .. })
    ));
    assert!(matches!(
        t.map_shared(Iova(0), PhysAddr(0), 0x1000, RW, &mut foreign),
        Err(MapError::ForeignGather { .. })
    ));
    assert!(matches!(
        t.trim_shared(&mut foreign),
        Err(MapError::ForeignGather { .. })
    ));
    assert_eq!(
        t.unmap(Iova(0x20_1000), 0x1000, &mut gather),
        Err(MapError::WouldSplitBlock { iova: 0x20_1000 })
    );
    assert_eq!(t.unmap(Iova(0x20_0000), 0x20_0000, &mut gather), Ok(0x20_0000));
    release(&mut t, gather);
}

#[test]
fn bad_shared_maps_and_no_memory_change_nothing() {
    // The root and one more frame.
    let frames = HeapFrames::with_limit(2 * 4096);
    let t = IoPageTable::new(format(Granule::Size4K, 39), &frames, true).unwrap();
    let mut gather = Gather::default();
    let before = frames.live_blocks();
    for (iova, pa, size, prot, error) in [
        (
            0x800,
            0,
            0x1000,
            RW,
            MapError::Unaligned {
                iova: 0x800,
                size: 0x1000,
            },
        ),
        (
            0,
            0x800,
            0x1000,
            RW,
            MapError::UnalignedOutput {
                pa: 0x800,
                size: 0x1000,
            },
        ),
        (
            1 << 39,
            0,
            0x1000,
            RW,
            MapError::InputOutOfRange {
                iova: 1 << 39,
                size: 0x1000,
            },
        ),
        (
            0,
            1 << 44,
            0x1000,
            RW,
            MapError::OutputOutOfRange {
                pa: 1 << 44,
                size: 0x1000,
            },
        ),
        (0, 0, 0x1000, Prot::WRITE, MapError::BadProt(Prot::WRITE)),
        (0, 0, 0x2000, Prot::WRITE, MapError::BadProt(Prot::WRITE)),
    ] {
        assert_eq!(
            t.map_shared(Iova(iova), PhysAddr(pa), size, prot, &mut gather),
            Err(error)
        );
    }
    // Two tables are needed below the root, and only one frame is left.
    assert!(matches!(
        t.map_shared(Iova(0), PhysAddr(0), 0x1000, RW, &mut gather),
        Err(MapError::NoMemory(_))
    ));
    assert!(matches!(
        t.map_shared(Iova(0), PhysAddr(0), 0x3000, RW, &mut gather),
        Err(MapError::NoMemory(_))
    ));
    assert_eq!(frames.live_blocks(), before, "every frame went back");
    assert!(gather.is_empty() && gather.owner().is_none());
    let found = check(&t);
    assert!(found.leaves.is_empty() && found.tables == 1);
}

#[test]
fn the_undo_of_a_failed_shared_map_removes_exactly_its_own_leaves() {
    let frames = HeapFrames::default();
    let mut t = IoPageTable::new(format(Granule::Size4K, 39), &frames, true).unwrap();
    let mut gather = Gather::default();
    // Someone else's page, inside the range, with another output.
    t.map_shared(Iova(0x40_4000), PhysAddr(0x9000_0000), 0x1000, RW, &mut gather)
        .unwrap();
    // What a failed map of [0x40_0000, +32 KiB) to 0x8000_0000 leaves before its undo: [0x40_0000, 0x40_4000) and
    // the page after the other one (as if another request had taken 0x40_4000 and it went on), all its own.
    t.map_shared(Iova(0x40_0000), PhysAddr(0x8000_0000), 0x4000, RW, &mut gather)
        .unwrap();
    t.map_shared(Iova(0x40_5000), PhysAddr(0x8000_5000), 0x1000, RW, &mut gather)
        .unwrap();
    t.undo_shared(0x40_0000, 0x40_6000, 0x8000_0000, RW, &mut gather);
    assert_eq!(
        (gather.start(), gather.end(), gather.leaves()),
        (0x40_0000, 0x40_6000, 5)
    );
    let found = check(&t);
    assert_eq!(
        found.leaves.into_iter().collect::<Vec<_>>(),
        [(0x40_4000, (0x9000_0000, 0x1000))],
        "the other request's page stays"
    );
    release(&mut t, gather);
}

/// xorshift64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One stress run: `threads` threads share one table of `granule`. Thread `k` owns the pages `p` of the window
/// with `(p / 8) % threads == k` (runs of 8 pages, so every thread works in every last-level table, and installs
/// and counts race), and the first `shared` pages of the window belong to everyone. Each thread first maps `warm` of its own pages,
/// then runs `ops` random operations: single pages and short ranges of its own (whose every result its own model
/// predicts), single pages of the shared ones (whose results it tallies), and now and then a trim. At the end the
/// table must equal the models, every count and mark must be right, and the frames must add up.
fn stress(threads: u64, granule: Granule, window: u64, shared: u64, warm: u64, ops: u64, seed: u64) {
    let g = 1u64 << granule.log2();
    let base = 1u64 << 32;
    let frames = HeapFrames::default();
    let mut t = IoPageTable::new(format(granule, 42), &frames, true).unwrap();
    let iova = |p: u64| base + p * g;
    // Outputs: own pages carry their mapping's generation (so a stale leaf shows); shared ones a fixed output.
    let own_pa = |p: u64, generation: u64| ((generation % 64) << 36) | (p * g);
    let shared_pa = |p: u64| (1 << 42) | (p * g);
    let results = std::thread::scope(|s| {
        let t = &t;
        let workers: Vec<_> = (0..threads)
            .map(|k| {
                s.spawn(move || {
                    let mut rng = Rng(seed ^ (k + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    let own: Vec<u64> = (shared..window).filter(|p| (p / 8) % threads == k).collect();
                    let mut model: BTreeMap<u64, u64> = BTreeMap::new();
                    let mut tally = std::vec![(0u32, 0u32); shared as usize];
                    let mut gathers = Vec::new();
                    let mut gather = Gather::default();
                    let mut generation = 0;
                    for i in 0..warm + ops {
                        generation += 1;
                        let roll = if i < warm { 0 } else { rng.below(100) };
                        match roll {
                            0..=34 => {
                                let p = own[rng.below(own.len() as u64) as usize];
                                let pa = own_pa(p, generation);
                                let result = t.map_shared(Iova(iova(p)), PhysAddr(pa), g, RW, &mut gather);
                                match model.entry(p) {
                                    Entry::Occupied(_) => {
                                        assert_eq!(result, Err(MapError::Overlap { iova: iova(p) }))
                                    }
                                    Entry::Vacant(v) => {
                                        assert_eq!(result, Ok(()));
                                        v.insert(pa);
                                    }
                                }
                            }
                            35..=69 => {
                                let p = own[rng.below(own.len() as u64) as usize];
                                let bytes = t.unmap_page_shared(Iova(iova(p)), &mut gather).unwrap();
                                assert_eq!(bytes, if model.remove(&p).is_some() { g } else { 0 });
                            }
                            70..=77 => {
                                // A range of up to 8 of its own pages, inside one run of 8: mapped whole, or
                                // refused at its first mapped page.
                                let first = own[rng.below(own.len() as u64) as usize];
                                let n = 1 + rng.below(8 - first % 8);
                                let pages = first..first + n;
                                let pa = own_pa(first, generation);
                                let result = t.map_shared(Iova(iova(first)), PhysAddr(pa), n * g, RW, &mut gather);
                                match pages.clone().find(|p| model.contains_key(p)) {
                                    Some(p) => assert_eq!(result, Err(MapError::Overlap { iova: iova(p) })),
                                    None => {
                                        assert_eq!(result, Ok(()));
                                        for p in pages {
                                            model.insert(p, pa + (p - first) * g);
                                        }
                                    }
                                }
                            }
                            78..=86 => {
                                let p = rng.below(shared);
                                if t.map_shared(Iova(iova(p)), PhysAddr(shared_pa(p)), g, RW, &mut gather)
                                    .is_ok()
                                {
                                    tally[p as usize].0 += 1;
                                }
                            }
                            87..=96 => {
                                let p = rng.below(shared);
                                if t.unmap_page_shared(Iova(iova(p)), &mut gather).unwrap() == g {
                                    tally[p as usize].1 += 1;
                                }
                            }
                            _ => {
                                let mut trimmed = Gather::default();
                                t.trim_shared(&mut trimmed).unwrap();
                                gathers.push(trimmed);
                            }
                        }
                    }
                    gathers.push(gather);
                    (model, tally, gathers)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect::<Vec<_>>()
    });
    let mut expected = BTreeMap::new();
    let mut tally = std::vec![(0u32, 0u32); shared as usize];
    let mut gathers = Vec::new();
    for (model, counts, g) in results {
        for (p, pa) in model {
            expected.insert(iova(p), (pa, 1u64 << granule.log2()));
        }
        for (p, (maps, unmaps)) in counts.into_iter().enumerate() {
            tally[p].0 += maps;
            tally[p].1 += unmaps;
        }
        gathers.extend(g);
    }
    for (p, &(maps, unmaps)) in tally.iter().enumerate() {
        // Every successful map of a shared page is followed by exactly one successful unmap, or is the last.
        let live = maps
            .checked_sub(unmaps)
            .expect("more unmaps than maps of a shared page");
        assert!(live <= 1, "shared page {p}: {maps} maps, {unmaps} unmaps");
        if live == 1 {
            expected.insert(iova(p as u64), (shared_pa(p as u64), g));
        }
    }
    let found = check(&t);
    assert_eq!(found.leaves, expected, "the table equals the model");
    // Every frame is linked, or waits in a gather to be released once.
    let waiting: u32 = gathers.iter().map(|g| g.freed_tables()).sum();
    assert_eq!(
        frames.live_blocks(),
        (found.tables + waiting) as usize,
        "no frame leaked"
    );
    for gather in gathers {
        release(&mut t, gather);
    }
    assert_eq!(frames.live_blocks(), found.tables as usize);
    // The exclusive paths take over where the concurrent ones left off.
    let mut gather = Gather::default();
    t.trim(&mut gather).unwrap();
    release(&mut t, gather);
    let after = check(&t);
    assert_eq!(after.leaves, expected);
    assert_eq!((after.empty, frames.live_blocks()), (0, after.tables as usize));
    let mut gather = Gather::default();
    t.unmap(Iova(0), 1 << 42, &mut gather).unwrap();
    release(&mut t, gather);
    assert_eq!(frames.live_blocks(), 1, "the root alone");
    drop(t);
    assert_eq!(frames.live_blocks(), 0);
}

#[test]
fn stress_2_4_and_8_threads_on_one_table_4k() {
    for (threads, seed) in [(2, 1), (4, 2), (8, 3)] {
        // 8 last-level tables of 512 pages, 64 of them shared.
        stress(threads, Granule::Size4K, 8 * 512, 64, 256, 2000, seed);
    }
}

#[test]
fn stress_counts_past_the_low_count_field_in_a_64k_granule() {
    // One last-level table of 8192 entries: the threads first map 1400 pages between them, more than 1024 live
    // entries in one count, so reservations and give-backs cross the carry from bits [11:2] into [55:52].
    for (threads, seed) in [(2, 4), (4, 5), (8, 6)] {
        stress(threads, Granule::Size64K, 4096, 32, 1400 / threads, 1500, seed);
    }
}

/// Threads race to map overlapping ranges (each with its own output), then to unmap them page by page: a map
/// either maps its whole range or, having lost an entry to another, removes every leaf it installed. No trim
/// runs, so after the maps each page is mapped exactly by the one map that succeeded over it.
#[test]
fn racing_overlapping_range_maps_leave_only_whole_winners() {
    let mut partial = 0;
    // Whether a map fails part-way depends on timing (a loaded host may serialise the racers): other seeds again
    // until one did, a bounded number of times.
    for attempt in 0..20u64 {
        for (threads, seed) in [(2u64, 7u64), (4, 8), (8, 9)] {
            let seed = seed + 16 * attempt;
            let frames = HeapFrames::default();
            let mut t = IoPageTable::new(format(Granule::Size4K, 39), &frames, true).unwrap();
            for round in 0..30u64 {
                let barrier = std::sync::Barrier::new(threads as usize);
                let outcomes = std::thread::scope(|s| {
                    let (t, barrier) = (&t, &barrier);
                    let workers: Vec<_> = (0..threads)
                        .map(|k| {
                            s.spawn(move || {
                                let mut rng = Rng(seed ^ (round << 8 | k).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
                                // Up to 1100 pages from page 0..600 of a window straddling two last-level tables:
                                // runs of pages, and sometimes a 2 MiB block.
                                let start = 0x3f_0000 + rng.below(600) * 0x1000;
                                let size = (1 + rng.below(1100)) * 0x1000;
                                let pa = (k + 1) << 36 | start;
                                let mut gather = Gather::default();
                                barrier.wait();
                                let result = t.map_shared(Iova(start), PhysAddr(pa), size, RW, &mut gather);
                                (start, size, pa, result, gather)
                            })
                        })
                        .collect();
                    workers.into_iter().map(|w| w.join().unwrap()).collect::<Vec<_>>()
                });
                let mut expected = BTreeMap::new();
                let mut undone = Vec::new();
                for (start, size, pa, result, gather) in outcomes {
                    partial += u64::from(!gather.is_empty());
                    match result {
                        Ok(()) => {
                            assert!(gather.is_empty());
                            for p in (start..start + size).step_by(0x1000) {
                                assert!(
                                    expected.insert(p, pa + (p - start)).is_none(),
                                    "two winners over {p:#x}"
                                );
                            }
                        }
                        Err(MapError::Overlap { .. }) => undone.push(gather),
                        Err(e) => panic!("{e}"),
                    }
                }
                let found = check(&t);
                let pages: BTreeMap<u64, u64> = found
                    .leaves
                    .iter()
                    .flat_map(|(&va, &(pa, size))| (0..size).step_by(0x1000).map(move |o| (va + o, pa + o)))
                    .collect();
                assert_eq!(pages, expected, "round {round}: only whole winners");
                for gather in undone {
                    release(&mut t, gather);
                }
                // Unmap it all, exclusively (blocks included), and start again from an empty table.
                let mut gather = Gather::default();
                t.unmap(Iova(0), 1 << 39, &mut gather).unwrap();
                release(&mut t, gather);
                assert_eq!((check(&t).tables, frames.live_blocks()), (1, 1));
            }
        }
        if partial > 0 {
            break;
        }
    }
    // The point of the test: maps that failed part-way and undid what they had installed.
    assert!(partial > 0, "no map failed part-way");
}

/// Every thread maps and unmaps its own pages in a last-level table that does not exist yet while another
/// trims: installs race each other and the trim's unlinks, over and over.
#[test]
fn installs_race_trims_of_the_same_tables() {
    for threads in [2u64, 4, 8] {
        let frames = HeapFrames::default();
        let mut t = IoPageTable::new(format(Granule::Size4K, 39), &frames, true).unwrap();
        let gathers = std::thread::scope(|s| {
            let t = &t;
            let workers: Vec<_> = (0..threads)
                .map(|k| {
                    s.spawn(move || {
                        let mut gathers = Vec::new();
                        let mut gather = Gather::default();
                        for round in 0..300u64 {
                            // Page k of last-level table `round % 4`, under a level-2 table per 16 rounds.
                            let va = (round % 16 / 4) << 30 | (round % 4) << 21 | k << 12;
                            t.map_shared(Iova(va), PhysAddr(va), 0x1000, RW, &mut gather).unwrap();
                            assert_eq!(t.iova_to_phys(Iova(va)), Some(PhysAddr(va)));
                            assert_eq!(t.unmap_page_shared(Iova(va), &mut gather), Ok(0x1000));
                            if k == 0 {
                                let mut trimmed = Gather::default();
                                t.trim_shared(&mut trimmed).unwrap();
                                gathers.push(trimmed);
                            }
                        }
                        gathers.push(gather);
                        gathers
                    })
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().unwrap()).collect::<Vec<_>>()
        });
        let found = check(&t);
        assert!(found.leaves.is_empty());
        let waiting: u32 = gathers.iter().map(|g| g.freed_tables()).sum();
        assert_eq!(frames.live_blocks(), (found.tables + waiting) as usize);
        for gather in gathers {
            release(&mut t, gather);
        }
        let mut gather = Gather::default();
        t.trim_shared(&mut gather).unwrap();
        release(&mut t, gather);
        let found = check(&t);
        assert_eq!((found.tables, found.empty, frames.live_blocks()), (1, 0, 1));
    }
}
