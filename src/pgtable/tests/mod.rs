//! Page-table tests: geometry per the architecture's rules, each bad input, and property tests of random
//! map / unmap sequences against a model, checked through `translate`, `walk`, and an independent decoder of the
//! raw table memory written from the architecture (not from `desc`).

extern crate std;

use std::collections::BTreeMap;
use std::vec::Vec;

use super::*;
use crate::testing::HeapFrames;

const RW: Prot = Prot::READ.union(Prot::WRITE).union(Prot::CACHEABLE);

fn format(stage: Stage, granule: Granule, input_bits: u8) -> Format {
    Format {
        stage,
        granule,
        input_bits,
        output_bits: 44,
    }
}

#[test]
fn geometry_follows_the_architecture() {
    let g = |stage, granule, bits| Geometry::of(&format(stage, granule, bits)).unwrap();
    // 4 KiB, 48-bit VA: 4 levels from level 0; 39 bits: 3 levels from level 1.
    assert_eq!(
        g(Stage::One, Granule::Size4K, 48),
        Geometry {
            granule_bits: 12,
            level_bits: 9,
            start_level: 0,
            root_entries: 512
        }
    );
    assert_eq!(g(Stage::One, Granule::Size4K, 39).start_level, 1);
    // Stage 2, 4 KiB, 40-bit IPA: level 0 would resolve 1 bit, so 2 concatenated level-1 tables (SL0 = 1).
    let s2 = g(Stage::Two, Granule::Size4K, 40);
    assert_eq!((s2.start_level, s2.root_entries, s2.s2_sl0()), (1, 1024, 1));
    // 42-bit IPA: 8 concatenated level-1 tables; 44-bit would need 32, more than the 16 allowed, so a 32-entry
    // level-0 root.
    assert_eq!(g(Stage::Two, Granule::Size4K, 42).root_entries, 4096);
    let s2 = g(Stage::Two, Granule::Size4K, 44);
    assert_eq!((s2.start_level, s2.root_entries), (0, 32));
    // 48-bit IPA (with a 48-bit output): a level-0 root of 512 entries (SL0 = 2); stage 1 40-bit keeps a
    // 2-entry level-0 root.
    let s2 = Geometry::of(&Format {
        output_bits: 48,
        ..format(Stage::Two, Granule::Size4K, 48)
    })
    .unwrap();
    assert_eq!((s2.start_level, s2.root_entries, s2.s2_sl0()), (0, 512, 2));
    assert_eq!(
        (
            g(Stage::One, Granule::Size4K, 40).start_level,
            g(Stage::One, Granule::Size4K, 40).root_entries
        ),
        (0, 2)
    );
    // 64 KiB, 42-bit: 2 levels (13 + 13 + 16); 16 KiB, 47-bit: 3 levels from level 1 (11 + 11 + 11 + 14).
    assert_eq!(g(Stage::One, Granule::Size64K, 42).start_level, 2);
    assert_eq!(g(Stage::One, Granule::Size16K, 47).start_level, 1);
    assert_eq!(
        Geometry::of(&format(Stage::One, Granule::Size4K, 49)),
        Err(MapError::BadFormat {
            input_bits: 49,
            output_bits: 44
        })
    );
}

#[test]
fn a_52_bit_output_is_refused_in_every_granule() {
    // A 52-bit OA would put OA[51:48] in descriptor bits [15:12] (64 KiB, FEAT_LPA; the leaf and table encoders
    // keep only bits [47:12]) or OA[51:50] in bits [9:8] (4/16 KiB, FEAT_LPA2 with DS = 1, inside the
    // live-entry count's bits [11:2] of table descriptors): the format is refused instead.
    for granule in [Granule::Size4K, Granule::Size16K, Granule::Size64K] {
        for output_bits in [49, 52] {
            let f = Format {
                output_bits,
                ..format(Stage::One, granule, 48)
            };
            assert_eq!(
                Geometry::of(&f),
                Err(MapError::BadFormat {
                    input_bits: 48,
                    output_bits
                })
            );
        }
    }
}

/// [`IoPageTable::release`] in host tests, where no SMMU walks the tables (so no invalidation is owed first).
fn release<A: FrameAllocator>(t: &mut IoPageTable<A>, g: Gather) {
    // SAFETY: no SMMU walks the tables of a host test.
    unsafe { t.release(g) }.unwrap();
}

fn table(stage: Stage, granule: Granule, bits: u8) -> IoPageTable<&'static HeapFrames> {
    let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::default());
    IoPageTable::new(format(stage, granule, bits), frames, true).unwrap()
}

#[test]
fn blocks_are_used_where_alignment_allows() {
    let mut t = table(Stage::One, Granule::Size4K, 39);
    // 1 GiB + 2 MiB + 4 KiB, all aligned: one 1 GiB block, one 2 MiB block, one page.
    t.map(Iova(0x4000_0000), PhysAddr(0x8000_0000), 0x4020_1000, RW)
        .unwrap();
    let mut sizes = Vec::new();
    t.walk(|m| sizes.push(m.size));
    assert_eq!(sizes, [1 << 30, 1 << 21, 1 << 12]);
    assert_eq!(
        t.iova_to_phys(Iova(0x4000_0000 + 0x1234_5678)),
        Some(PhysAddr(0x8000_0000 + 0x1234_5678))
    );
    assert_eq!(t.iova_to_phys(Iova(0x8020_0fff)), Some(PhysAddr(0xc020_0fff)));
    assert_eq!(t.iova_to_phys(Iova(0x8020_1000)), None);
    // Misaligned output: pages only.
    let mut t = table(Stage::Two, Granule::Size4K, 40);
    t.map(Iova(0x20_0000), PhysAddr(0x1000), 0x20_0000, RW).unwrap();
    let mut n = 0;
    t.walk(|m| {
        assert_eq!(m.size, 4096);
        n += 1;
    });
    assert_eq!(n, 512);
}

#[test]
fn bad_inputs_change_nothing() {
    let mut t = table(Stage::One, Granule::Size4K, 39);
    t.map(Iova(0x10_0000), PhysAddr(0x10_0000), 0x2000, RW).unwrap();
    let tables = t.tables();
    assert_eq!(
        t.map(Iova(0x1800), PhysAddr(0), 0x1000, RW),
        Err(MapError::Unaligned {
            iova: 0x1800,
            size: 0x1000
        })
    );
    assert_eq!(
        t.map(Iova(0x1000), PhysAddr(0), 0, RW),
        Err(MapError::Unaligned { iova: 0x1000, size: 0 })
    );
    assert_eq!(
        t.map(Iova(0x1000), PhysAddr(0x800), 0x1000, RW),
        Err(MapError::UnalignedOutput {
            pa: 0x800,
            size: 0x1000
        })
    );
    assert_eq!(
        t.map(Iova((1 << 39) - 0x1000), PhysAddr(0), 0x2000, RW),
        Err(MapError::InputOutOfRange {
            iova: (1 << 39) - 0x1000,
            size: 0x2000
        })
    );
    assert_eq!(
        t.map(Iova(0), PhysAddr(1 << 44), 0x1000, RW),
        Err(MapError::OutputOutOfRange {
            pa: 1 << 44,
            size: 0x1000
        })
    );
    // The whole output range must fit, not only its start.
    assert_eq!(
        t.map(Iova(0), PhysAddr((1 << 44) - 0x1000), 0x2000, RW),
        Err(MapError::OutputOutOfRange {
            pa: (1 << 44) - 0x1000,
            size: 0x2000
        })
    );
    assert_eq!(
        t.map(Iova(0), PhysAddr(0), 0x1000, Prot::WRITE),
        Err(MapError::BadProt(Prot::WRITE))
    );
    assert_eq!(
        t.map(Iova(0xf_f000), PhysAddr(0), 0x2000, RW),
        Err(MapError::Overlap { iova: 0x10_0000 })
    );
    assert_eq!(t.tables(), tables);
    let mut g = Gather::default();
    assert_eq!(
        t.unmap(Iova(0x10_0800), 0x1000, &mut g),
        Err(MapError::Unaligned {
            iova: 0x10_0800,
            size: 0x1000
        })
    );
    assert!(g.is_empty());
    assert_eq!(t.iova_to_phys(Iova(0x10_1000)), Some(PhysAddr(0x10_1000)));
}

#[test]
fn no_memory_for_tables_changes_nothing() {
    let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::new(HeapFrames::with_limit(3 * 4096)));
    let mut t = IoPageTable::new(format(Stage::One, Granule::Size4K, 39), frames, true).unwrap();
    // Root + level 2 + level 3 fit; a second level-3 table does not.
    t.map(Iova(0), PhysAddr(0), 0x1000, RW).unwrap();
    let error = t.map(Iova(0x1ff000), PhysAddr(0x1ff000), 0x2000, RW);
    assert!(matches!(error, Err(MapError::NoMemory(_))), "{error:?}");
    assert_eq!(t.iova_to_phys(Iova(0x1ff000)), None, "the part that fitted was undone");
    assert_eq!(t.iova_to_phys(Iova(0)), Some(PhysAddr(0)));
}

#[test]
fn partial_unmap_splits_a_block_and_empty_tables_are_released_after_invalidation() {
    let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::default());
    let mut t = IoPageTable::new(format(Stage::Two, Granule::Size4K, 40), frames, true).unwrap();
    t.set_bbm_level(2);
    t.map(Iova(0x4000_0000), PhysAddr(0x4000_0000), 1 << 30, RW).unwrap();
    assert_eq!(t.tables(), 1, "one 1 GiB block in the root");
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(0x4000_1000), 0x1000, &mut g), Ok(0x1000));
    assert_eq!(t.tables(), 3, "split into a level-2 and a level-3 table");
    assert_eq!(t.iova_to_phys(Iova(0x4000_0fff)), Some(PhysAddr(0x4000_0fff)));
    assert_eq!(t.iova_to_phys(Iova(0x4000_1000)), None);
    assert_eq!(t.iova_to_phys(Iova(0x4000_2000)), Some(PhysAddr(0x4000_2000)));
    assert_eq!(t.iova_to_phys(Iova(0x7fff_f000)), Some(PhysAddr(0x7fff_f000)));
    assert!(g.start <= 0x4000_1000 && g.end >= 0x4000_2000);
    release(&mut t, g);
    // Unmap everything: all tables below the root are collected, freed only on release.
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(0x4000_0000), 1 << 30, &mut g), Ok((1 << 30) - 0x1000));
    assert_eq!((g.freed_tables(), g.tables_unlinked), (2, true));
    let live = frames.live_blocks();
    release(&mut t, g);
    assert_eq!(frames.live_blocks(), live - 2);
    drop(t);
    assert_eq!(frames.live_blocks(), 0);
}

#[test]
fn full_last_level_tables_are_counted_without_reading_and_freed_as_one_subtree() {
    let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::default());
    let mut t = IoPageTable::new(format(Stage::One, Granule::Size4K, 39), frames, true).unwrap();
    // 4 MiB of pages (the output is only page-aligned, so no blocks): two last-level tables filled by `map`.
    t.map(Iova(0x20_0000), PhysAddr(0x1000), 0x40_0000, RW).unwrap();
    let level2 = |t: &IoPageTable<&'static HeapFrames>, index: usize| {
        let root = t.root_entries()[0].load(Ordering::Relaxed);
        let l2 = t.table_entries(2, desc::address(root)).unwrap();
        l2[index].load(Ordering::Relaxed)
    };
    assert_ne!(level2(&t, 1) & desc::SW_TABLE_FULL, 0, "filled whole by map");
    assert_ne!(level2(&t, 2) & desc::SW_TABLE_FULL, 0);
    // Protecting keeps every page valid, so the mark stays; removing one page drops it first.
    let mut g = Gather::default();
    t.protect(Iova(0x20_0000), 0x1000, Prot::READ | Prot::CACHEABLE, &mut g)
        .unwrap();
    assert_ne!(level2(&t, 1) & desc::SW_TABLE_FULL, 0);
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(0x30_0000), 0x1000, &mut g), Ok(0x1000));
    assert_eq!(level2(&t, 1) & desc::SW_TABLE_FULL, 0, "no longer full");
    assert_ne!(level2(&t, 2) & desc::SW_TABLE_FULL, 0, "the other table is untouched");
    release(&mut t, g);
    // Unmapping the whole 1 GiB removes the level-2 table and both last-level tables: one full, counted from
    // its mark, one with a hole, counted from its entries; one link in the gather, three tables freed.
    let tables = t.tables();
    let live = frames.live_blocks();
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(0), 1 << 30, &mut g), Ok(0x40_0000 - 0x1000));
    assert_eq!((g.freed_tables(), g.leaf_shift), (3, 12));
    assert_eq!(t.tables(), tables - 3);
    assert_eq!(frames.live_blocks(), live, "nothing is freed before the invalidation");
    release(&mut t, g);
    assert_eq!(frames.live_blocks(), live - 3);
    assert_eq!(t.iova_to_phys(Iova(0x20_0000)), None);
    drop(t);
    assert_eq!(frames.live_blocks(), 0);
}

#[test]
fn a_failed_map_undoes_the_full_tables_it_linked() {
    // A page at 0 first, so the level-2 table is live (published) when `map` links full last-level tables into
    // it: root, level 2, the page's table, then room for one or two full tables of the three the map needs.
    for frames_allowed in [4usize, 5] {
        let frames: &'static HeapFrames =
            std::boxed::Box::leak(std::boxed::Box::new(HeapFrames::with_limit(frames_allowed * 4096)));
        let mut t = IoPageTable::new(format(Stage::One, Granule::Size4K, 39), frames, true).unwrap();
        t.map(Iova(0), PhysAddr(0), 0x1000, RW).unwrap();
        let result = t.map(Iova(0x20_0000), PhysAddr(0x1000), 0x60_0000, RW);
        assert!(matches!(result, Err(MapError::NoMemory(_))), "{result:?}");
        for page in (0x20_0000..0x80_0000).step_by(0x1000) {
            assert_eq!(t.iova_to_phys(Iova(page)), None, "{page:#x} mapped after a failed map");
        }
        let raw = decode(frames, t.root().0, t.geometry());
        assert_eq!(
            raw.into_iter().collect::<Vec<_>>(),
            [(0, 0)],
            "only the first page is left"
        );
        drop(t);
        assert_eq!(frames.live_blocks(), 0);
    }
}

#[test]
fn full_tables_in_every_granule_and_root_level() {
    let cases = [
        (Stage::One, Granule::Size4K, 39),
        (Stage::One, Granule::Size4K, 48),
        (Stage::One, Granule::Size16K, 47),
        (Stage::One, Granule::Size16K, 48),
        (Stage::One, Granule::Size64K, 48),
        (Stage::One, Granule::Size64K, 42),
        (Stage::Two, Granule::Size4K, 34),
        (Stage::Two, Granule::Size4K, 40),
        (Stage::Two, Granule::Size16K, 40),
        (Stage::Two, Granule::Size64K, 44),
    ];
    for (stage, granule, bits) in cases {
        let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::default());
        let mut t = IoPageTable::new(format(stage, granule, bits), frames, true).unwrap();
        let g = *t.geometry();
        let page = 1u64 << g.granule_bits;
        // Two last-level tables' worth of pages, output one page off so that no block fits: both filled whole.
        let span = 2 * (page << g.level_bits);
        let iova = span;
        t.map(Iova(iova), PhysAddr(iova + page), span, RW).unwrap();
        let raw = decode(frames, t.root().0, &g);
        assert_eq!(raw.len() as u64, span / 4096, "{stage:?} {granule:?} {bits}");
        assert_eq!(raw.get(&iova), Some(&(iova + page)));
        assert_eq!(raw.get(&(iova + span - 4096)), Some(&(iova + span + page - 4096)));
        let mut gather = Gather::default();
        assert_eq!(
            t.unmap(Iova(iova), span, &mut gather),
            Ok(span),
            "{stage:?} {granule:?} {bits}"
        );
        release(&mut t, gather);
        assert!(decode(frames, t.root().0, &g).is_empty());
        drop(t);
        assert_eq!(frames.live_blocks(), 0);
    }
}

mod decode;
mod edge;
mod lazy;
mod mixed;
mod model;
mod root_marks;
mod whole;

#[allow(unused_imports)]
use {decode::*, edge::*, lazy::*, mixed::*, model::*};

/// Counts the calls a page table makes of its allocator, passing each on to heap frames.
#[derive(Default)]
struct Counting {
    frames: HeapFrames,
    single_allocations: core::sync::atomic::AtomicUsize,
    batch_allocations: std::sync::Mutex<Vec<usize>>,
    single_frees: core::sync::atomic::AtomicUsize,
    batch_frees: std::sync::Mutex<Vec<usize>>,
}

// SAFETY: forwards to `HeapFrames`, which upholds the contract.
unsafe impl FrameAllocator for Counting {
    fn allocate_zeroed(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError> {
        self.single_allocations
            .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        self.frames.allocate_zeroed(size, align)
    }

    fn allocate_many(
        &self,
        size: usize,
        align: usize,
        count: usize,
        _for_overwrite: bool,
        each: &mut dyn FnMut(DmaBlock),
    ) -> Result<(), AllocError> {
        self.batch_allocations.lock().unwrap().push(count);
        for _ in 0..count {
            each(self.frames.allocate_zeroed(size, align)?);
        }
        Ok(())
    }

    unsafe fn free(&self, block: DmaBlock) {
        self.single_frees.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's guarantee.
        unsafe { self.frames.free(block) }
    }

    unsafe fn free_many(&self, blocks: &mut dyn Iterator<Item = DmaBlock>) {
        let mut n = 0;
        for block in blocks {
            n += 1;
            // SAFETY: the caller's guarantee, for each block.
            unsafe { self.frames.free(block) };
        }
        self.batch_frees.lock().unwrap().push(n);
    }

    fn phys_to_virt(&self, phys: crate::mem::PhysAddr) -> Option<core::ptr::NonNull<u8>> {
        self.frames.phys_to_virt(phys)
    }
}

/// A range map asks its allocator for every table it needs at once (one `allocate_many` per kind of table), and
/// a release gives the unlinked tables back in batches (`free_many`): an allocator behind a lock takes it once
/// per batch, not once per table (1 GiB of 4 KiB pages is 513 tables each way).
#[test]
fn a_range_map_allocates_its_tables_at_once_and_a_release_frees_them_in_batches() {
    let counting: &'static Counting = std::boxed::Box::leak(std::boxed::Box::default());
    let mut t = IoPageTable::new(format(Stage::One, Granule::Size4K, 39), counting, true).unwrap();
    let roots = counting.single_allocations.load(core::sync::atomic::Ordering::Relaxed);
    // Output 4 KiB off the input's 2 MiB alignment: pages only, no block.
    t.map(Iova(0x4000_0000), PhysAddr(0x8000_1000), 0x400_0000, RW).unwrap();
    assert_eq!(
        counting.single_allocations.load(core::sync::atomic::Ordering::Relaxed),
        roots,
        "no table asked for alone"
    );
    // 64 MiB from a 1 GiB boundary: one level-2 table (zeroed) and 32 full level-3 tables (for overwrite).
    let mut batches = counting.batch_allocations.lock().unwrap().clone();
    batches.sort_unstable();
    assert_eq!(batches, [1, 32]);
    let mut g = Gather::default();
    t.unmap(Iova(0x4000_0000), 0x400_0000, &mut g).unwrap();
    release(&mut t, g);
    assert_eq!(counting.single_frees.load(core::sync::atomic::Ordering::Relaxed), 0);
    let frees: Vec<usize> = counting
        .batch_frees
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|&n| n > 0)
        .collect();
    assert_eq!(frees.iter().sum::<usize>(), 33, "{frees:?}");
    assert!(frees.len() <= 2, "{frees:?}: batches of up to 64 tables");
}
