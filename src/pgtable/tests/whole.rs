//! Tables written whole by a range map (every entry once, in a frame allocated for overwrite), and tables a range
//! unmap empties without covering them whole (unlinked with their leaves in place, freed after the invalidation).

use super::*;
use crate::mem::{Maintenance, maintenance_log};

const GIB: u64 = 1 << 30;
const BLOCK: u64 = 1 << 21;

/// The words of the table that the root entry `index` names (stage 1, 4 KiB, 39 bits: the root is at level 1).
fn level2_words(frames: &HeapFrames, t: &IoPageTable<&'static HeapFrames>, index: usize) -> (u64, Vec<u64>) {
    let link = t.root_entries()[index].load(Ordering::Relaxed);
    assert!(desc::is_table(link, 1), "root entry {index} names a table: {link:#x}");
    let words = frames.virt(desc::address(link)) as *const u64;
    // SAFETY: a live table of 512 descriptors.
    (link, (0..512).map(|i| unsafe { words.add(i).read() }).collect())
}

/// The 2 MiB blocks of `words` (a level-2 table covering from `base`): index → output.
fn blocks(words: &[u64]) -> BTreeMap<usize, u64> {
    words
        .iter()
        .enumerate()
        .filter(|&(_, &d)| d & 3 == 1)
        .map(|(i, &d)| (i, d & 0x0000_ffff_ffff_f000))
        .collect()
}

/// 1 GiB of 2 MiB blocks from 2 MiB past a 1 GiB boundary: two level-2 tables, 511 blocks in the first (entry 0
/// left invalid) and 1 in the second, both written whole into frames that the test allocator fills with garbage
/// (0xa5 bytes, a valid-looking descriptor), so an entry the map failed to write shows. Then unmapped in parts:
/// a block from the middle (the table stays), the rest of the first table (emptied: unlinked whole), the second
/// table's block.
#[test]
fn a_table_written_whole_holds_its_blocks_and_zeros_and_unmaps_in_parts() {
    let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::default());
    let mut t = IoPageTable::new(format(Stage::One, Granule::Size4K, 39), frames, true).unwrap();
    let (iova, pa) = (GIB + BLOCK, 4 * GIB);
    t.map(Iova(iova), PhysAddr(pa), GIB, RW).unwrap();
    assert_eq!(t.tables(), 3);
    let (link, first) = level2_words(frames, &t, 1);
    assert_eq!(desc::count(link), 511);
    assert_eq!(first[0], 0, "entry 0, outside the range, written 0 over the garbage");
    let expected: BTreeMap<usize, u64> = (1..512).map(|i| (i, pa + (i as u64 - 1) * BLOCK)).collect();
    assert_eq!(blocks(&first), expected);
    let (link, second) = level2_words(frames, &t, 2);
    assert_eq!(desc::count(link), 1);
    assert_eq!(blocks(&second), BTreeMap::from([(0, pa + 511 * BLOCK)]));
    assert!(second[1..].iter().all(|&d| d == 0), "entries past the run written 0");
    checks::check(&t);
    assert_eq!(leaves(frames, t.root().0, t.geometry()).len() as u64, GIB / 4096);

    // One block from the middle: the ordinary path (the table keeps 510 blocks).
    let mut g = Gather::default();
    let hole = GIB + 100 * BLOCK;
    assert_eq!(t.unmap(Iova(hole), BLOCK, &mut g), Ok(BLOCK));
    assert_eq!((g.freed_tables(), g.leaves()), (0, 1));
    release(&mut t, g);
    assert_eq!(t.iova_to_phys(Iova(hole)), None);
    assert_eq!(t.iova_to_phys(Iova(hole + BLOCK)), Some(PhysAddr(pa + 100 * BLOCK)));
    checks::check(&t);

    // The rest of the first table, from its entry 1 (entry 0 was never mapped): every block goes, the table is
    // unlinked whole with its leaves left in place, its whole span gathered for the walk caches.
    let mut g = Gather::default();
    let first_table = desc::address(t.root_entries()[1].load(Ordering::Relaxed));
    assert_eq!(t.unmap(Iova(GIB + BLOCK), GIB - BLOCK, &mut g), Ok(510 * BLOCK));
    assert_eq!((g.freed_tables(), g.tables_unlinked(), g.leaves()), (1, true, 510));
    assert_eq!((g.start(), g.end(), g.leaf_shift()), (GIB, 2 * GIB, 12));
    assert_eq!(t.root_entries()[1].load(Ordering::Relaxed), 0);
    let words = frames.virt(first_table) as *const u64;
    // SAFETY: the unlinked table is not freed before `release`.
    assert_eq!(unsafe { words.add(5).read() } & 3, 1, "its leaves were not cleared");
    release(&mut t, g);
    assert_eq!(t.tables(), 2);
    checks::check(&t);

    // The second table's one block: the range covers one entry, which is its count.
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(2 * GIB), BLOCK, &mut g), Ok(BLOCK));
    assert_eq!(
        (g.freed_tables(), g.leaves(), g.start(), g.end()),
        (1, 1, 2 * GIB, 3 * GIB)
    );
    release(&mut t, g);
    assert_eq!((t.tables(), frames.live_blocks()), (1, 1));
    assert!(raw_words(&t).iter().all(|&(_, _, d)| d == 0));
    drop(t);
    assert_eq!(frames.live_blocks(), 0);
}

/// The benchmark's shape, unmapped in one call: both level-2 tables empty, neither covered whole. Each is
/// unlinked and handed to the gather, and the fake walker ([`Witness`]) sees that it was linked until then:
/// freeing it before the invalidation would be a violation; after it, none.
#[test]
fn tables_a_range_unmap_empties_are_freed_only_after_the_invalidation() {
    for stage in [Stage::One, Stage::Two] {
        let w = Witness::new(HeapFrames::default());
        let bits = if stage == Stage::One { 39 } else { 40 };
        let mut t = IoPageTable::new(format(stage, Granule::Size4K, bits), w, true).unwrap();
        w.watch(&t);
        let (iova, pa) = (GIB + BLOCK, 4 * GIB);
        for round in 0..3 {
            t.map(Iova(iova), PhysAddr(pa), GIB, RW).unwrap();
            w.observe();
            let linked = w.linked();
            assert_eq!(linked.len(), 2, "two level-2 tables");
            let live = w.frames.live_blocks();
            let mut g = Gather::default();
            assert_eq!(t.unmap(Iova(iova), GIB, &mut g), Ok(GIB), "{stage:?} round {round}");
            assert_eq!((g.freed_tables(), g.tables_unlinked(), g.leaves()), (2, true, 512));
            assert_eq!((g.start(), g.end()), (GIB, 3 * GIB));
            assert!(w.linked().is_empty(), "both unlinked");
            assert_eq!(w.frames.live_blocks(), live, "nothing freed before the invalidation");
            let seen = w.seen.lock().unwrap().clone();
            assert!(linked.is_subset(&seen), "the walker may still hold both tables");
            w.invalidated();
            release(&mut t, g);
            assert_eq!(w.frames.live_blocks(), live - 2);
            assert!(w.violations.lock().unwrap().is_empty());
            checks::check(&t);
            assert_eq!(t.tables(), 1);
        }
        w.unwatch();
        drop(t);
        assert_eq!(w.frames.live_blocks(), 0);
    }
}

/// Where a range unmap must not unlink a table whole, it takes the ordinary path: the table keeps an entry the
/// range does not reach (whichever side of it is read), or holds a table inside the range.
#[test]
fn a_table_keeping_an_entry_or_holding_a_table_is_not_unlinked_whole() {
    let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::default());
    let mut t = IoPageTable::new(format(Stage::One, Granule::Size4K, 39), frames, true).unwrap();
    let pa = 4 * GIB;

    // Two blocks, entries 0 and 1; unmapping entry 0 reads the one entry in the range (1 valid, count 2).
    t.map(Iova(GIB), PhysAddr(pa), 2 * BLOCK, RW).unwrap();
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(GIB), BLOCK, &mut g), Ok(BLOCK));
    assert_eq!(g.freed_tables(), 0);
    release(&mut t, g);
    assert_eq!(t.iova_to_phys(Iova(GIB + BLOCK)), Some(PhysAddr(pa + BLOCK)));
    assert_eq!(desc::count(t.root_entries()[1].load(Ordering::Relaxed)), 1);
    checks::check(&t);
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(GIB + BLOCK), BLOCK, &mut g), Ok(BLOCK));
    assert_eq!(g.freed_tables(), 1, "now it empties");
    release(&mut t, g);

    // 512 blocks (output 2 MiB off a 1 GiB boundary: no 1 GiB block); unmapping entries 1..512 reads entry 0
    // alone, which is valid: the table stays with it.
    t.map(Iova(GIB), PhysAddr(pa + BLOCK), GIB, RW).unwrap();
    assert_eq!(t.tables(), 2);
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(GIB + BLOCK), GIB - BLOCK, &mut g), Ok(GIB - BLOCK));
    assert_eq!((g.freed_tables(), g.leaves()), (0, 511));
    release(&mut t, g);
    assert_eq!(t.iova_to_phys(Iova(GIB)), Some(PhysAddr(pa + BLOCK)));
    assert_eq!(t.iova_to_phys(Iova(GIB + BLOCK)), None);
    checks::check(&t);
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(GIB), BLOCK, &mut g), Ok(BLOCK));
    release(&mut t, g);
    assert_eq!(t.tables(), 1);

    // Blocks in entries 1..512 but a page (and so a last-level table) in entry 5: the range 1..512 holds a table.
    // The level-2 table empties, and the last-level table inside it must be freed too (not leaked with it).
    t.map(Iova(GIB + BLOCK), PhysAddr(pa), 4 * BLOCK, RW).unwrap();
    t.map(Iova(GIB + 5 * BLOCK), PhysAddr(0x1000), 0x1000, RW).unwrap();
    t.map(Iova(GIB + 6 * BLOCK), PhysAddr(pa + 6 * BLOCK), GIB - 6 * BLOCK, RW)
        .unwrap();
    assert_eq!(t.tables(), 3);
    let live = frames.live_blocks();
    let mut g = Gather::default();
    assert_eq!(
        t.unmap(Iova(GIB + BLOCK), GIB - BLOCK, &mut g),
        Ok(510 * BLOCK + 0x1000)
    );
    assert_eq!(g.freed_tables(), 2);
    release(&mut t, g);
    assert_eq!((t.tables(), frames.live_blocks()), (1, live - 2));
    checks::check(&t);

    // The range reads its one entry, which is a table (the count, 1, matches): the ordinary path, which frees
    // both tables.
    t.map(Iova(GIB + 0x1000), PhysAddr(0x1000), 0x1000, RW).unwrap();
    assert_eq!(t.tables(), 3);
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(GIB), BLOCK, &mut g), Ok(0x1000));
    assert_eq!(g.freed_tables(), 2);
    release(&mut t, g);
    assert_eq!((t.tables(), frames.live_blocks()), (1, 1));
    drop(t);
    assert_eq!(frames.live_blocks(), 0);
}

/// For a non-coherent SMMU a table written whole is cleaned, all of it, before the descriptor that links it is
/// written (and cleaned); the unmap that unlinks it cleans the cleared descriptor.
#[test]
fn a_table_written_whole_is_cleaned_before_it_is_linked() {
    let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::default());
    let mut t = IoPageTable::new(format(Stage::Two, Granule::Size4K, 40), frames, false).unwrap();
    maintenance_log::take();
    t.map(Iova(GIB + BLOCK), PhysAddr(4 * GIB), GIB, RW).unwrap();
    let log = maintenance_log::take();
    let root = t.root_entries();
    for index in [1usize, 2] {
        let table = frames.virt(desc::address(root[index].load(Ordering::Relaxed))) as usize;
        let entry = core::ptr::from_ref(&root[index]) as usize;
        let cleaned = |start: usize, len: usize| {
            log.iter().position(|&(k, s, l)| {
                k == Maintenance::Clean && (s..s + l).contains(&start) && (s..s + l).contains(&(start + len - 1))
            })
        };
        let table_clean = cleaned(table, 4096).expect("the whole new table cleaned");
        let link_clean = cleaned(entry, 8).expect("the descriptor linking it cleaned");
        assert!(table_clean < link_clean, "table {index}: cleaned after it was linked");
    }
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(GIB + BLOCK), GIB, &mut g), Ok(GIB));
    let log = maintenance_log::take();
    for index in [1usize, 2] {
        let entry = core::ptr::from_ref(&t.root_entries()[index]) as usize;
        assert!(
            maintenance_log::covers(&log, Maintenance::Clean, entry, 8),
            "unlink of table {index} cleaned"
        );
    }
    release(&mut t, g);
}

/// The "no tables" bit (58, [`desc::SW_NO_TABLES`]) is set on the descriptor of each table a map writes with
/// leaves only, and stays a true promise through every path that links a table into one: the single-page map, a
/// range map, a block split by an unmap and by a protect, the concurrent map of one page; `recount` rebuilds it
/// exactly. A range unmap trusting a false one would unlink a table whole with a last-level table still inside it
/// (leaked, never freed): the frames left over show it.
#[test]
fn the_no_tables_bit_stays_true_through_every_path_that_links_a_table() {
    let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::default());
    let mut t = IoPageTable::new(format(Stage::One, Granule::Size4K, 39), frames, true).unwrap();
    t.set_bbm_level(2);
    let no_tables = |t: &IoPageTable<&'static HeapFrames>, index: usize| {
        t.root_entries()[index].load(Ordering::Relaxed) & desc::SW_NO_TABLES != 0
    };
    let settle = |t: &mut IoPageTable<&'static HeapFrames>| {
        checks::check(t);
        let _ = leaves(frames, t.root().0, t.geometry());
        assert_eq!(
            frames.live_blocks(),
            t.tables() as usize,
            "every frame is a linked table"
        );
    };
    let (iova, pa) = (GIB + BLOCK, 4 * GIB);
    let hole = GIB + 100 * BLOCK;

    // The range map: both level-2 tables hold blocks only.
    t.map(Iova(iova), PhysAddr(pa), GIB, RW).unwrap();
    assert!(no_tables(&t, 1) && no_tables(&t, 2));
    settle(&mut t);
    // A block unmapped, a page mapped in its place (the single-page path links a last-level table).
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(hole), BLOCK, &mut g), Ok(BLOCK));
    release(&mut t, g);
    assert!(no_tables(&t, 1), "unmapping links nothing");
    t.map(Iova(hole), PhysAddr(0x1000), 0x1000, RW).unwrap();
    assert!(!no_tables(&t, 1) && no_tables(&t, 2));
    settle(&mut t);
    // Every valid entry of the first table is in the range, the page's table among them: the range unmap must
    // not take it for a table of leaves.
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(iova), GIB - BLOCK, &mut g), Ok(510 * BLOCK + 0x1000));
    release(&mut t, g);
    settle(&mut t);
    assert_eq!(t.tables(), 2);

    // A range map of pages in a fresh 1 GiB slot: the new level-2 table holds a last-level table.
    t.map(Iova(3 * GIB), PhysAddr(0x1000), 0x2000, RW).unwrap();
    assert!(!no_tables(&t, 3));
    settle(&mut t);
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(3 * GIB), 0x2000, &mut g), Ok(0x2000));
    release(&mut t, g);
    // A range map that links a last-level table into a table of blocks (pages in entry 100, then blocks after).
    t.map(Iova(iova), PhysAddr(pa), 99 * BLOCK, RW).unwrap();
    assert!(no_tables(&t, 1));
    t.map(Iova(hole), PhysAddr(0x1000), BLOCK + 0x1000, RW).unwrap();
    assert!(!no_tables(&t, 1));
    settle(&mut t);
    let mut g = Gather::default();
    // With the second table's block, left from the first map.
    assert_eq!(t.unmap(Iova(GIB), 2 * GIB, &mut g), Ok(101 * BLOCK + 0x1000));
    release(&mut t, g);
    settle(&mut t);
    assert_eq!(t.tables(), 1);

    // Block splits: an unmap of one page of a block, a protect of one page of another.
    t.map(Iova(iova), PhysAddr(pa), GIB, RW).unwrap();
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(hole + 0x1000), 0x1000, &mut g), Ok(0x1000));
    release(&mut t, g);
    assert!(!no_tables(&t, 1) && no_tables(&t, 2));
    settle(&mut t);
    let mut g = Gather::default();
    let read_only = Prot::READ.union(Prot::CACHEABLE);
    assert_eq!(t.protect(Iova(2 * GIB + 0x1000), 0x1000, read_only, &mut g), Ok(0x1000));
    release(&mut t, g);
    assert!(!no_tables(&t, 2));
    settle(&mut t);
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(GIB), 2 * GIB, &mut g), Ok(GIB - 0x1000));
    release(&mut t, g);
    settle(&mut t);

    // The concurrent paths: a range of blocks (set), then one page in a hole (cleared by its reservation).
    let mut g = Gather::default();
    t.map_shared(Iova(iova), PhysAddr(pa), GIB, RW, &mut g).unwrap();
    assert!(g.is_empty() && no_tables(&t, 1) && no_tables(&t, 2));
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(hole), BLOCK, &mut g), Ok(BLOCK));
    release(&mut t, g);
    let mut g = Gather::default();
    t.map_shared(Iova(hole), PhysAddr(0x1000), 0x1000, RW, &mut g).unwrap();
    assert!(!no_tables(&t, 1) && no_tables(&t, 2));
    settle(&mut t);

    // `recount` rebuilds the bit exactly from the entries: a false one goes, a missing one comes back.
    let root = t.root_entries();
    root[1].store(root[1].load(Ordering::Relaxed) | desc::SW_NO_TABLES, Ordering::Relaxed);
    root[2].store(root[2].load(Ordering::Relaxed) & !desc::SW_NO_TABLES, Ordering::Relaxed);
    t.recount().unwrap();
    assert!(!no_tables(&t, 1) && no_tables(&t, 2));
    settle(&mut t);
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(GIB), 2 * GIB, &mut g), Ok(GIB - BLOCK + 0x1000));
    release(&mut t, g);
    assert_eq!((t.tables(), frames.live_blocks()), (1, 1));
    drop(t);
    assert_eq!(frames.live_blocks(), 0);
}
