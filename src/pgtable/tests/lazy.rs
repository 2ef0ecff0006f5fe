//! Lazy freeing: single-page unmaps, the trim limit, recounting and adopting tables, a table at physical address zero.

use super::*;

#[test]
fn a_single_page_unmap_leaves_its_empty_table_linked_until_a_trim() {
    let w = Witness::new(HeapFrames::default());
    let mut t = IoPageTable::new(format(Stage::One, Granule::Size4K, 39), w, true).unwrap();
    w.watch(&t);
    t.map(Iova(0x4020_3000), PhysAddr(0x9000), 0x1000, RW).unwrap();
    assert_eq!(t.tables(), 3, "root, level 2, level 3");
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(0x4020_3000), 0x1000, &mut g), Ok(0x1000));
    assert_eq!(
        (g.start, g.end, g.leaves, g.tables_unlinked),
        (0x4020_3000, 0x4020_4000, 1, false)
    );
    assert_eq!((t.tables(), t.empty_tables()), (3, 1), "the emptied table stays linked");
    w.invalidated();
    release(&mut t, g);
    // Mapping there again reuses it: no allocation, counts back up.
    let live = w.frames.live_blocks();
    t.map(Iova(0x4020_5000), PhysAddr(0x9000), 0x1000, RW).unwrap();
    assert_eq!((w.frames.live_blocks(), t.empty_tables()), (live, 0));
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(0x4020_5000), 0x1000, &mut g), Ok(0x1000));
    w.invalidated();
    release(&mut t, g);
    // The trim unlinks the last-level table and the level-2 table above it, which emptied in turn, into the
    // gather; they are freed only by `release`, after the walk-cache invalidation of their spans.
    let mut g = Gather::default();
    assert_eq!(t.trim(&mut g).unwrap(), 2);
    assert!(
        g.tables_unlinked && g.start <= 0x4000_0000 && g.end >= 0x8000_0000,
        "{g:?}"
    );
    assert_eq!((t.tables(), t.empty_tables(), w.frames.live_blocks()), (1, 0, live));
    assert_eq!(linked_empty_tables(&w.frames, t.root().0, t.geometry()), 0);
    w.invalidated();
    release(&mut t, g);
    assert_eq!(w.frames.live_blocks(), live - 2);
    // Nothing waiting: a trim does nothing.
    let mut g = Gather::default();
    assert_eq!(t.trim(&mut g).unwrap(), 0);
    assert!(g.is_empty());
    assert_eq!(*w.violations.lock().unwrap(), []);
    w.unwatch();
}

#[test]
fn the_lazy_free_limit_bounds_the_tables_left_empty() {
    let mut t = table(Stage::Two, Granule::Size4K, 40);
    t.set_lazy_free_limit(2);
    let mut g = Gather::default();
    for k in 0..3u64 {
        let iova = k << 21;
        t.map(Iova(iova), PhysAddr(iova), 0x1000, RW).unwrap();
        t.unmap(Iova(iova), 0x1000, &mut g).unwrap();
    }
    // The third emptied table went over the limit: that unmap trimmed all three (and the level-2 table).
    assert_eq!((t.empty_tables(), g.freed_tables(), t.tables()), (0, 4, 1));
    release(&mut t, g);
    t.set_lazy_free_limit(0);
    let mut g = Gather::default();
    t.map(Iova(0x1000), PhysAddr(0x1000), 0x1000, RW).unwrap();
    t.unmap(Iova(0x1000), 0x1000, &mut g).unwrap();
    assert_eq!((t.empty_tables(), g.freed_tables()), (0, 2), "limit 0: freed at once");
    release(&mut t, g);
}

#[test]
fn an_unmap_without_trim_leaves_emptied_tables_for_the_callers_own_trim() {
    let mut t = table(Stage::Two, Granule::Size4K, 40);
    t.set_lazy_free_limit(0);
    for k in 1..3u64 {
        t.map(Iova(k << 21), PhysAddr(k << 21), 0x1000, RW).unwrap();
    }
    t.map(Iova(0), PhysAddr(0), 0x1000, RW).unwrap();
    let mut g = Gather::default();
    // Past the limit, a single page and a range elsewhere: neither gathers a trim.
    t.unmap_without_trim(Iova(1 << 21), 0x1000, &mut g).unwrap();
    assert_eq!((g.freed_tables(), t.empty_tables(), t.trim_due()), (0, 1, true));
    let mut range = Gather::default();
    t.unmap_without_trim(Iova(2 << 21), 0x2000, &mut range).unwrap();
    assert_eq!(range.freed_tables(), 1, "only the table the range emptied");
    assert_eq!((range.start(), range.end()), (2 << 21, 3 << 21), "{range:?}");
    assert_eq!(t.empty_tables(), 1, "the table emptied before is still linked");
    let mut trimmed = Gather::default();
    assert_eq!(t.trim(&mut trimmed), Ok(1));
    assert!(!t.trim_due());
    release(&mut t, g);
    release(&mut t, range);
    release(&mut t, trimmed);
}

#[test]
fn a_range_unmap_trims_and_a_range_map_fills_an_emptied_table_instead_of_covering_it() {
    let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::default());
    let mut t = IoPageTable::new(format(Stage::One, Granule::Size4K, 39), frames, true).unwrap();
    t.map(Iova(0x20_0000), PhysAddr(0x20_0000), 0x1000, RW).unwrap();
    let mut g = Gather::default();
    t.unmap(Iova(0x20_0000), 0x1000, &mut g).unwrap();
    release(&mut t, g);
    assert_eq!(t.empty_tables(), 1);
    // A 2 MiB-aligned range over the emptied table: no block may replace the linked table (that would need an
    // invalidation map cannot issue), so its pages go into the table, which is now full.
    let live = frames.live_blocks();
    t.map(Iova(0x20_0000), PhysAddr(0x4000_0000), 0x40_0000, RW).unwrap();
    assert_eq!(
        (t.empty_tables(), frames.live_blocks()),
        (0, live),
        "no table allocated"
    );
    let mut sizes = Vec::new();
    t.walk(|m| sizes.push(m.size));
    assert_eq!(
        sizes.iter().filter(|&&s| s == 4096).count(),
        512,
        "pages in the old table"
    );
    assert_eq!(
        sizes.iter().filter(|&&s| s == 2 << 20).count(),
        1,
        "a block where no table was"
    );
    // Counts and the full bit agree with the entries (the decoder checks them).
    let _ = leaves(frames, t.root().0, t.geometry());
    // A range unmap elsewhere trims what single-page unmaps emptied.
    let mut g = Gather::default();
    t.map(Iova(0x4000_0000), PhysAddr(0), 0x1000, RW).unwrap();
    t.unmap(Iova(0x4000_0000), 0x1000, &mut g).unwrap();
    assert_eq!(t.empty_tables(), 1);
    assert_eq!(t.unmap(Iova(0x20_0000), 0x2000, &mut g), Ok(0x2000));
    assert_eq!(t.empty_tables(), 0);
    assert_eq!(g.freed_tables(), 2, "the emptied table and its level-2 table");
    release(&mut t, g);
}

#[test]
fn recount_rebuilds_counts_marks_and_the_waiting_tables() {
    let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::default());
    let mut t = IoPageTable::new(format(Stage::One, Granule::Size4K, 39), frames, true).unwrap();
    t.map(Iova(0x20_0000), PhysAddr(0x1000), 0x40_0000, RW).unwrap();
    t.map(Iova(0x4000_0000), PhysAddr(0), 0x1000, RW).unwrap();
    let mut g = Gather::default();
    t.unmap(Iova(0x4000_0000), 0x1000, &mut g).unwrap();
    release(&mut t, g);
    let expected = raw_words(&t);
    // Tables written by code that kept no counts: every table descriptor's software bits cleared.
    fn clear<A: FrameAllocator>(t: &IoPageTable<A>, level: u8, phys: u64) {
        for e in t.table_entries(level, phys).unwrap() {
            let d = e.load(Ordering::Relaxed);
            if desc::is_table(d, level) {
                e.store(desc::table(desc::address(d)), Ordering::Relaxed);
                clear(t, level + 1, desc::address(d));
            }
        }
    }
    clear(&t, t.geometry().start_level, t.root().0);
    t.empty.set(0);
    assert_ne!(raw_words(&t), expected);
    t.recount().unwrap();
    assert_eq!(
        raw_words(&t),
        expected,
        "counts, full bits and trim marks as the table kept them"
    );
    assert_eq!(t.empty_tables(), 1);
}

/// A table the allocator cannot reach has no knowable count: taken for empty, the next trim would unlink it with
/// its mappings. Recount refuses before writing anything.
#[test]
fn recount_refuses_a_table_the_allocator_cannot_reach() {
    let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::default());
    let mut t = IoPageTable::new(format(Stage::One, Granule::Size4K, 39), frames, true).unwrap();
    t.map(Iova(0x20_0000), PhysAddr(0x1000), 0x40_0000, RW).unwrap();
    t.map(Iova(0x4000_0000), PhysAddr(0x80_0000), 0x1000, RW).unwrap();
    // The last-level table of 0x4000_0000 moved (by other code) to memory this allocator does not know.
    let root = t.root().0;
    let l1 = t.table_entries(1, root).unwrap()[1].load(Ordering::Relaxed);
    let l2 = &t.table_entries(2, desc::address(l1)).unwrap()[0];
    let (stray, original) = (0xdead_0000, l2.load(Ordering::Relaxed));
    l2.store(
        desc::table(stray) | (l2.load(Ordering::Relaxed) & !desc::table(desc::address(l2.load(Ordering::Relaxed)))),
        Ordering::Relaxed,
    );
    // The words recount would rewrite: the root's and the level-2 tables' (whose descriptors carry the counts).
    let words = |t: &IoPageTable<&HeapFrames>| -> std::vec::Vec<u64> {
        let mut words = std::vec::Vec::new();
        for e in t.table_entries(1, root).unwrap() {
            let d = e.load(Ordering::Relaxed);
            words.push(d);
            if desc::is_table(d, 1) {
                let below = t.table_entries(2, desc::address(d)).unwrap();
                words.extend(below.iter().map(|e| e.load(Ordering::Relaxed)));
            }
        }
        words
    };
    let before = (words(&t), t.tables(), t.empty_tables());
    assert_eq!(t.recount(), Err(MapError::NotAdoptable(PhysAddr(stray))));
    assert_eq!((words(&t), t.tables(), t.empty_tables()), before, "nothing changed");
    // Adopting without counts refuses the same way.
    let adopted = IoPageTable::adopt(*t.format(), PhysAddr(root), frames, true, None);
    assert_eq!(adopted.err(), Some(MapError::NotAdoptable(PhysAddr(stray))));
    // The refused adoption freed none of the tables it did not take.
    assert_eq!(t.iova_to_phys(Iova(0x20_0000)), Some(PhysAddr(0x1000)));
    t.table_entries(2, desc::address(l1)).unwrap()[0].store(original, Ordering::Relaxed);
}

#[test]
fn single_pages_in_every_granule_keep_counts_through_a_full_table() {
    for (stage, granule, bits) in [
        (Stage::One, Granule::Size4K, 48),
        (Stage::Two, Granule::Size16K, 40),
        (Stage::One, Granule::Size64K, 42),
        (Stage::Two, Granule::Size64K, 44),
    ] {
        let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::default());
        let mut t = IoPageTable::new(format(stage, granule, bits), frames, true).unwrap();
        let g = *t.geometry();
        let page = 1u64 << g.granule_bits;
        let span = page << g.level_bits;
        let what = std::format!("{stage:?} {granule:?} {bits}");
        // A full last-level table (count 512, 2048 or 8192: the 64 KiB count needs the high bits), written by the
        // range path with the output one page off so no block fits.
        t.map(Iova(span), PhysAddr(span + page), span, RW).unwrap();
        let mut g0 = Gather::default();
        // Single pages out of it, then back in, then all out one by one.
        assert_eq!(t.unmap(Iova(span + 3 * page), page, &mut g0), Ok(page), "{what}");
        let _ = leaves(frames, t.root().0, &g);
        t.map(Iova(span + 3 * page), PhysAddr(span + 4 * page), page, RW)
            .unwrap();
        let _ = leaves(frames, t.root().0, &g);
        for k in 0..span / page {
            assert_eq!(t.unmap(Iova(span + k * page), page, &mut g0), Ok(page), "{what}");
        }
        assert_eq!(t.empty_tables(), 1, "{what}");
        let _ = leaves(frames, t.root().0, &g);
        release(&mut t, g0);
        let mut g1 = Gather::default();
        assert!(t.trim(&mut g1).unwrap() >= 1, "{what}");
        release(&mut t, g1);
        assert_eq!(
            (t.tables(), linked_empty_tables(frames, t.root().0, &g)),
            (1, 0),
            "{what}"
        );
    }
}

/// A live update adopts a table in place: with the recorded counts nothing is read; without them one walk
/// rebuilds the same numbers; either way the adopted table translates as the old one did and keeps working.
#[test]
fn an_adopted_table_translates_as_before_and_keeps_its_counts() {
    let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::default());
    let f = format(Stage::One, Granule::Size4K, 39);
    let mut old = IoPageTable::new(f, frames, true).unwrap();
    let rw = Prot::READ | Prot::WRITE | Prot::CACHEABLE;
    old.map(Iova(0x4000_0000), PhysAddr(0x8000_0000), 0x40_0000, rw)
        .unwrap();
    for page in 0..8 {
        old.map(
            Iova(0x1000_0000 + page * 0x1000),
            PhysAddr(0x9000_0000 + page * 0x1000),
            0x1000,
            rw,
        )
        .unwrap();
    }
    // Single-page unmaps empty one last-level table, left linked for a trim.
    for page in 0..8 {
        let mut g = Gather::default();
        old.unmap(Iova(0x1000_0000 + page * 0x1000), 0x1000, &mut g).unwrap();
        release(&mut old, g);
    }
    old.map(Iova(0x2000_0000), PhysAddr(0xa000_0000), 0x1000, rw).unwrap();
    let counts = AdoptedCounts {
        tables: old.tables(),
        empty: old.empty_tables(),
    };
    assert_eq!(counts.empty, 1);
    let root = old.root();
    let before: Vec<_> = [0x4000_0000u64, 0x403f_f000, 0x1000_0000, 0x2000_0000]
        .iter()
        .map(|&iova| old.iova_to_phys(Iova(iova)))
        .collect();
    let raw = raw_words(&old);
    // The old image is gone without freeing anything.
    core::mem::forget(old);

    let mut walked = IoPageTable::adopt(f, root, frames, true, None).unwrap();
    assert_eq!(
        (walked.tables(), walked.empty_tables()),
        (counts.tables, counts.empty),
        "one walk rebuilds the counts"
    );
    assert_eq!(raw_words(&walked), raw, "the walk wrote only what was there");
    core::mem::forget(core::mem::replace(
        &mut walked,
        IoPageTable::new(f, frames, true).unwrap(),
    ));

    let mut adopted = IoPageTable::adopt(f, root, frames, true, Some(counts)).unwrap();
    let after: Vec<_> = [0x4000_0000u64, 0x403f_f000, 0x1000_0000, 0x2000_0000]
        .iter()
        .map(|&iova| adopted.iova_to_phys(Iova(iova)))
        .collect();
    assert_eq!(after, before);
    // It keeps working: the emptied table trims, new mappings land, unmaps free.
    let mut g = Gather::default();
    assert_eq!(adopted.trim(&mut g).unwrap(), 1);
    release(&mut adopted, g);
    adopted
        .map(Iova(0x3000_0000), PhysAddr(0xb000_0000), 0x1000, rw)
        .unwrap();
    assert_eq!(adopted.iova_to_phys(Iova(0x3000_0000)), Some(PhysAddr(0xb000_0000)));
    // A root the allocator does not reach, or misaligned, is refused.
    assert!(matches!(
        IoPageTable::adopt(f, PhysAddr(0x1000), frames, true, None),
        Err(MapError::NotAdoptable(_))
    ));
    assert!(matches!(
        IoPageTable::adopt(f, PhysAddr(root.0 + 8), frames, true, None),
        Err(MapError::NotAdoptable(_))
    ));
}

/// Tables written by other code may hold a linked level-2 table with no entries (its last-level tables freed,
/// itself left): `recount` counts it among the tables waiting for a trim, and mapping into it, on either path,
/// must take it off that count again, as for an emptied last-level table.
#[test]
fn a_recounted_empty_level_2_table_leaves_the_waiting_count_when_it_fills() {
    for single_page in [true, false] {
        let w = Witness::new(HeapFrames::default());
        let mut t = IoPageTable::new(format(Stage::One, Granule::Size4K, 39), w, true).unwrap();
        t.map(Iova(0x4000_0000), PhysAddr(0x1000), 0x1000, RW).unwrap();
        t.map(Iova(0x8000_0000), PhysAddr(0x2000), 0x1000, RW).unwrap();
        // What other code left: the level-2 table of 1 GiB keeps no entry (its last-level table freed), and no
        // descriptor carries software bits.
        let root = t.root_entries();
        let l2 = desc::address(root[1].load(Ordering::Relaxed));
        let l2_entries = t.table_entries(2, l2).unwrap();
        let l3 = desc::address(l2_entries[0].load(Ordering::Relaxed));
        l2_entries[0].store(0, Ordering::Relaxed);
        // SAFETY: the last-level table is unlinked and nothing walks it.
        unsafe {
            w.free(DmaBlock {
                phys: PhysAddr(l3),
                virt: w.phys_to_virt(PhysAddr(l3)).unwrap(),
                size: 4096,
            })
        };
        for e in root {
            let d = e.load(Ordering::Relaxed);
            if desc::is_table(d, 1) {
                e.store(desc::table(desc::address(d)), Ordering::Relaxed);
            }
        }
        t.recount().unwrap();
        let linked = |t: &IoPageTable<&Witness>| linked_empty_tables(&w.frames, t.root().0, t.geometry());
        assert_eq!((t.empty_tables() as usize, t.tables()), (linked(&t), 4));
        // Mapping into the empty level-2 table: it is no longer empty, and nothing else is.
        if single_page {
            t.map(Iova(0x4000_0000), PhysAddr(0x3000), 0x1000, RW).unwrap();
        } else {
            t.map(Iova(0x4000_0000), PhysAddr(0x3000), 0x2000, RW).unwrap();
        }
        assert_eq!(linked(&t), 0);
        assert_eq!(t.empty_tables(), 0, "single page: {single_page}");
        let mut g = Gather::default();
        assert_eq!(t.trim(&mut g).unwrap(), 0);
        release(&mut t, g);
    }
}

/// No protection at all is inexpressible at every stage: a single-page map with it is refused like any other
/// inexpressible one, before anything is written, on a new table, an adopted one, and after earlier maps.
#[test]
fn a_single_page_map_without_protection_is_refused() {
    for stage in [Stage::One, Stage::OneEl2, Stage::Two] {
        let w = Witness::new(HeapFrames::default());
        let f = format(stage, Granule::Size4K, 39);
        let mut t = IoPageTable::new(f, w, true).unwrap();
        let check = |t: &mut IoPageTable<&Witness>| {
            let (before, live) = (raw_words(t), w.frames.live_blocks());
            assert_eq!(
                t.map(Iova(0x4000_3000), PhysAddr(0x8000), 0x1000, Prot::empty()),
                Err(MapError::BadProt(Prot::empty())),
                "{stage:?}"
            );
            assert!(raw_words(t) == before, "{stage:?}: a refused map changes nothing");
            assert_eq!((w.frames.live_blocks(), t.translate(Iova(0x4000_3000))), (live, None));
        };
        check(&mut t);
        t.map(Iova(0x1000), PhysAddr(0x1000), 0x1000, RW).unwrap();
        check(&mut t);
        let (root, counts) = (
            t.root(),
            AdoptedCounts {
                tables: t.tables(),
                empty: t.empty_tables(),
            },
        );
        core::mem::forget(t);
        let mut t = IoPageTable::adopt(f, root, w, true, Some(counts)).unwrap();
        check(&mut t);
        let _ = leaves(&w.frames, t.root().0, t.geometry());
    }
}

/// [`HeapFrames`], except that the `nth` block handed out gets physical address 0 (memory starting at address 0
/// is common outside QEMU's boards).
pub(super) struct FrameAtZero {
    pub(super) frames: HeapFrames,
    pub(super) nth: usize,
    pub(super) handed: std::sync::atomic::AtomicUsize,
    /// The block at 0: its `HeapFrames` physical address, CPU address and size.
    pub(super) zero: std::sync::Mutex<Option<(u64, usize, usize)>>,
}

impl FrameAtZero {
    pub(super) fn place(&self, block: DmaBlock) -> DmaBlock {
        if self.handed.fetch_add(1, std::sync::atomic::Ordering::Relaxed) != self.nth {
            return block;
        }
        *self.zero.lock().unwrap() = Some((block.phys.0, block.virt.as_ptr() as usize, block.size));
        DmaBlock {
            phys: PhysAddr(0),
            ..block
        }
    }
}

// SAFETY: forwards to `HeapFrames`, renaming one block's physical address consistently in every method.
unsafe impl FrameAllocator for FrameAtZero {
    fn allocate_zeroed(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError> {
        self.frames.allocate_zeroed(size, align).map(|b| self.place(b))
    }

    fn allocate_for_overwrite(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError> {
        self.frames.allocate_for_overwrite(size, align).map(|b| self.place(b))
    }

    unsafe fn free(&self, block: DmaBlock) {
        let phys = if block.phys.0 == 0 {
            self.zero.lock().unwrap().take().expect("the block at 0 is live").0
        } else {
            block.phys.0
        };
        // SAFETY: the caller's guarantee, passed on with the block's own physical address.
        unsafe {
            self.frames.free(DmaBlock {
                phys: PhysAddr(phys),
                ..block
            })
        }
    }

    fn phys_to_virt(&self, phys: PhysAddr) -> Option<NonNull<u8>> {
        match *self.zero.lock().unwrap() {
            Some((_, virt, size)) if (phys.0 as usize) < size => NonNull::new((virt + phys.0 as usize) as *mut u8),
            _ => self.frames.phys_to_virt(phys),
        }
    }
}

/// A table at physical address 0 is a table like any other: unlinked, it goes back to the allocator at
/// `release` with the rest of its gather (a trim's, a range unmap's, a whole subtree's).
#[test]
fn a_table_at_physical_address_zero_is_released_like_any_other() {
    // Allocation 1 is the level-2 table (0: the root, 2: the last-level table).
    for how in ["trim", "unmap", "subtree"] {
        let frames: &'static FrameAtZero = std::boxed::Box::leak(std::boxed::Box::new(FrameAtZero {
            frames: HeapFrames::default(),
            nth: 1,
            handed: std::sync::atomic::AtomicUsize::new(0),
            zero: std::sync::Mutex::new(None),
        }));
        let mut t = IoPageTable::new(format(Stage::One, Granule::Size4K, 39), frames, true).unwrap();
        t.map(Iova(0x4000_0000), PhysAddr(0x1000), 0x1000, RW).unwrap();
        assert_eq!(desc::address(t.root_entries()[1].load(Ordering::Relaxed)), 0);
        assert_eq!(t.translate(Iova(0x4000_0000)), Some((PhysAddr(0x1000), RW)));
        let mut g = Gather::default();
        match how {
            "trim" => {
                t.unmap(Iova(0x4000_0000), 0x1000, &mut g).unwrap();
                assert_eq!(t.trim(&mut g).unwrap(), 2);
            }
            "unmap" => {
                assert_eq!(t.unmap(Iova(0x4000_0000), 0x2000, &mut g), Ok(0x1000));
            }
            _ => {
                t.map(Iova(0x4000_0000 + (1 << 21)), PhysAddr(0x1000), 0x1000, RW)
                    .unwrap();
                assert_eq!(t.unmap(Iova(0x4000_0000), 1 << 30, &mut g), Ok(0x2000));
            }
        }
        assert_eq!(t.tables(), 1, "{how}");
        release(&mut t, g);
        assert_eq!(frames.frames.live_blocks(), 1, "{how}: only the root is left");
    }
}
