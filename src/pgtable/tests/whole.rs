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
    t.map(iova, pa, GIB, RW).unwrap();
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
    assert_eq!(t.unmap(hole, BLOCK, &mut g), Ok(BLOCK));
    assert_eq!((g.freed_tables(), g.leaves()), (0, 1));
    release(&mut t, g);
    assert_eq!(t.iova_to_phys(hole), None);
    assert_eq!(t.iova_to_phys(hole + BLOCK), Some(pa + 100 * BLOCK));
    checks::check(&t);

    // The rest of the first table, from its entry 1 (entry 0 was never mapped): every block goes, the table is
    // unlinked, its whole span gathered for the walk caches.
    let mut g = Gather::default();
    assert_eq!(t.unmap(GIB + BLOCK, GIB - BLOCK, &mut g), Ok(510 * BLOCK));
    assert_eq!((g.freed_tables(), g.tables_unlinked(), g.leaves()), (1, true, 510));
    assert_eq!((g.start(), g.end(), g.leaf_shift()), (GIB, 2 * GIB, 12));
    assert_eq!(t.root_entries()[1].load(Ordering::Relaxed), 0);
    release(&mut t, g);
    assert_eq!(t.tables(), 2);
    checks::check(&t);

    // The second table's one block: the range covers one entry, which is its count.
    let mut g = Gather::default();
    assert_eq!(t.unmap(2 * GIB, BLOCK, &mut g), Ok(BLOCK));
    assert_eq!((g.freed_tables(), g.leaves(), g.start(), g.end()), (1, 1, 2 * GIB, 3 * GIB));
    release(&mut t, g);
    assert_eq!((t.tables(), frames.live_blocks()), (1, 1));
    assert!(raw_words(&t).iter().all(|&(_, _, d)| d == 0));
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
    t.map(GIB + BLOCK, 4 * GIB, GIB, RW).unwrap();
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
    assert_eq!(t.unmap(GIB + BLOCK, GIB, &mut g), Ok(GIB));
    let log = maintenance_log::take();
    for index in [1usize, 2] {
        let entry = core::ptr::from_ref(&t.root_entries()[index]) as usize;
        assert!(maintenance_log::covers(&log, Maintenance::Clean, entry, 8), "unlink of table {index} cleaned");
    }
    release(&mut t, g);
}
