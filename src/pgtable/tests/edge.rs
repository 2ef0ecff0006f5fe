//! Edge cases: protection changes, block splitting, allocation failures at every point, stage-2 start levels, attributes.

use super::*;

#[test]
fn protect_changes_permissions_in_place_and_gathers_them() {
    let mut t = table(Stage::Two, Granule::Size4K, 40);
    t.set_bbm_level(2);
    t.map(Iova(0x4000_0000), PhysAddr(0x4000_0000), 0x20_0000 + 0x2000, RW)
        .unwrap();
    let ro = Prot::READ | Prot::CACHEABLE;
    let mut g = Gather::default();
    // The 2 MiB block's second page and the first following page: the block is split, one page kept RW.
    assert_eq!(t.protect(Iova(0x4000_1000), 0x20_0000, ro, &mut g), Ok(0x20_0000));
    assert_eq!(t.translate(Iova(0x4000_0000)), Some((PhysAddr(0x4000_0000), RW)));
    assert_eq!(t.translate(Iova(0x4000_1000)), Some((PhysAddr(0x4000_1000), ro)));
    assert_eq!(t.translate(Iova(0x4020_0000)), Some((PhysAddr(0x4020_0000), ro)));
    assert_eq!(t.translate(Iova(0x4020_1000)), Some((PhysAddr(0x4020_1000), RW)));
    assert!(g.start <= 0x4000_1000 && g.end >= 0x4020_1000, "{g:?}");
    release(&mut t, g);
    // The same protection again changes nothing to invalidate.
    let mut g = Gather::default();
    assert_eq!(t.protect(Iova(0x4000_1000), 0x1000, ro, &mut g), Ok(0x1000));
    assert!(g.is_empty());
    assert_eq!(
        t.protect(Iova(0), 0x1000, Prot::PRIVILEGED, &mut g),
        Err(MapError::BadProt(Prot::PRIVILEGED))
    );
    // Unmapped parts are left alone.
    assert_eq!(t.protect(Iova(0), 0x1000, ro, &mut g), Ok(0));
}

#[test]
fn block_splitting_is_off_by_default_and_allowed_only_with_bbml_2() {
    for bbml in [None, Some(0), Some(1), Some(3), Some(2)] {
        let mut t = table(Stage::One, Granule::Size4K, 39);
        t.map(Iova(0x20_0000), PhysAddr(0x20_0000), 0x20_0000, RW).unwrap();
        if let Some(level) = bbml {
            t.set_bbm_level(level);
        }
        let before = raw_words(&t);
        let mut g = Gather::default();
        if bbml == Some(2) {
            assert!(t.splits_blocks());
            assert_eq!(t.unmap(Iova(0x20_0000), 0x1000, &mut g), Ok(0x1000));
            assert_eq!(
                t.iova_to_phys(Iova(0x20_1000)),
                Some(PhysAddr(0x20_1000)),
                "split in place"
            );
            release(&mut t, g);
            continue;
        }
        assert!(!t.splits_blocks(), "BBML {bbml:?}");
        assert_eq!(
            t.unmap(Iova(0x20_0000), 0x1000, &mut g),
            Err(MapError::WouldSplitBlock { iova: 0x20_1000 })
        );
        assert_eq!(
            t.protect(Iova(0x20_1000), 0x1000, RW, &mut g),
            Err(MapError::WouldSplitBlock { iova: 0x20_1000 })
        );
        assert!(g.is_empty());
        assert_eq!(raw_words(&t), before, "nothing changed");
        // The whole block is fine.
        assert_eq!(t.unmap(Iova(0x20_0000), 0x20_0000, &mut g), Ok(0x20_0000));
        release(&mut t, g);
    }
}

#[test]
fn no_memory_below_a_new_table_leaves_no_table_behind() {
    // Root and a level-2 table fit, the level-3 table below it does not: the new level-2 table must not stay.
    // (Test from the benchmark helper's branch, which found this on an earlier map.)
    let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::new(HeapFrames::with_limit(2 * 4096)));
    let mut t = IoPageTable::new(format(Stage::One, Granule::Size4K, 39), frames, true).unwrap();
    let error = t.map(Iova(0x4000_0000), PhysAddr(0), 0x1000, RW);
    assert!(matches!(error, Err(MapError::NoMemory(_))), "{error:?}");
    assert_eq!((t.tables(), frames.live_blocks()), (1, 1));
    assert_eq!(decode(frames, t.root().0, t.geometry()), BTreeMap::new());
}

/// A frame allocator that plays the SMMU's walker: at every allocation and free it walks the live tables from the
/// root it watches and remembers every table it found linked; freeing one of those before the test declares an
/// invalidation complete ([`Witness::invalidated`]) is recorded as a violation.
pub(super) struct Witness {
    pub(super) frames: HeapFrames,
    pub(super) watch: std::sync::Mutex<Option<(u64, Geometry)>>,
    pub(super) seen: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    pub(super) violations: std::sync::Mutex<Vec<u64>>,
    /// Allocations left to succeed before one fails (once); `usize::MAX`: none fails.
    pub(super) fail_in: std::sync::atomic::AtomicUsize,
}

impl Witness {
    pub(super) fn new(frames: HeapFrames) -> &'static Self {
        std::boxed::Box::leak(std::boxed::Box::new(Witness {
            frames,
            watch: std::sync::Mutex::new(None),
            seen: std::sync::Mutex::new(std::collections::BTreeSet::new()),
            violations: std::sync::Mutex::new(Vec::new()),
            fail_in: std::sync::atomic::AtomicUsize::new(usize::MAX),
        }))
    }

    pub(super) fn watch<A: FrameAllocator>(&self, t: &IoPageTable<A>) {
        *self.watch.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((t.root().0, *t.geometry()));
        self.invalidated();
    }

    pub(super) fn unwatch(&self) {
        *self.watch.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// The tables linked now (the root excluded), walked from the raw memory.
    pub(super) fn linked(&self) -> std::collections::BTreeSet<u64> {
        let mut out = std::collections::BTreeSet::new();
        let Some((root, g)) = *self.watch.lock().unwrap_or_else(std::sync::PoisonError::into_inner) else {
            return out;
        };
        fn go(w: &Witness, table: u64, level: u8, g: &Geometry, out: &mut std::collections::BTreeSet<u64>) {
            let count = if level == g.start_level {
                g.root_entries
            } else {
                1 << g.level_bits
            };
            let Some(words) = w.frames.phys_to_virt(PhysAddr(table)) else {
                return;
            };
            let words = words.as_ptr() as *const u64;
            for i in 0..count {
                // SAFETY: a live table of `count` descriptors.
                let d = unsafe { words.add(i).read() };
                if level < 3 && d & 3 == 3 {
                    let child = d & 0x0000_ffff_ffff_f000;
                    out.insert(child);
                    go(w, child, level + 1, g, out);
                }
            }
        }
        go(self, root, g.start_level, &g, &mut out);
        out
    }

    pub(super) fn observe(&self) {
        if std::thread::panicking() {
            // A test already failed; its unwinding drops the table.
            return;
        }
        let linked = self.linked();
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(linked);
    }

    /// Fails this allocation if it is the one [`Witness::fail_in`] names.
    pub(super) fn injected_failure(&self, size: usize) -> Result<(), AllocError> {
        use std::sync::atomic::Ordering::Relaxed;
        match self.fail_in.load(Relaxed) {
            usize::MAX => Ok(()),
            0 => {
                self.fail_in.store(usize::MAX, Relaxed);
                Err(AllocError::OutOfMemory { size })
            }
            n => {
                self.fail_in.store(n - 1, Relaxed);
                Ok(())
            }
        }
    }

    /// An invalidation covering every walk has completed: only what is linked now can be cached.
    pub(super) fn invalidated(&self) {
        *self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = self.linked();
    }
}

// SAFETY: forwards to `HeapFrames`, which upholds the contract; the walks only read live tables.
unsafe impl FrameAllocator for Witness {
    fn allocate_zeroed(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError> {
        self.observe();
        self.injected_failure(size)?;
        self.frames.allocate_zeroed(size, align)
    }

    fn allocate_for_overwrite(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError> {
        self.observe();
        self.injected_failure(size)?;
        self.frames.allocate_for_overwrite(size, align)
    }

    unsafe fn free(&self, block: DmaBlock) {
        self.observe();
        if self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&block.phys.0)
        {
            self.violations
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(block.phys.0);
        }
        // SAFETY: the caller's guarantee, passed on.
        unsafe { self.frames.free(block) }
    }

    fn phys_to_virt(&self, phys: PhysAddr) -> Option<NonNull<u8>> {
        self.frames.phys_to_virt(phys)
    }
}

#[test]
fn a_failed_map_frees_no_table_the_smmu_may_have_walked() {
    // A page at 0 first, so the level-2 table is live when `map` needs three full last-level tables below it:
    // root, level 2 and the page's table, then room for none, one or two of the three.
    for frames_allowed in [3usize, 4, 5] {
        let w = Witness::new(HeapFrames::with_limit(frames_allowed * 4096));
        let mut t = IoPageTable::new(format(Stage::One, Granule::Size4K, 39), w, true).unwrap();
        t.map(Iova(0), PhysAddr(0), 0x1000, RW).unwrap();
        w.watch(&t);
        let (before, live) = (raw_words(&t), w.frames.live_blocks());
        let result = t.map(Iova(0x20_0000), PhysAddr(0x1000), 0x60_0000, RW);
        assert!(matches!(result, Err(MapError::NoMemory(_))), "{result:?}");
        assert_eq!(
            *w.violations.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            [],
            "tables freed after the SMMU could walk them, with no invalidation ({frames_allowed} frames)"
        );
        assert_eq!(raw_words(&t), before, "a failed map changes nothing");
        assert_eq!((w.frames.live_blocks(), t.tables()), (live, 3));
        w.unwatch();
        drop(t);
        assert_eq!(w.frames.live_blocks(), 0);
    }
}

#[test]
fn protect_refuses_a_memory_type_change_and_changes_nothing() {
    let nc = Prot::READ | Prot::WRITE;
    let mmio = Prot::READ | Prot::WRITE | Prot::MMIO;
    for stage in [Stage::One, Stage::Two] {
        let mut t = table(stage, Granule::Size4K, 39);
        t.set_bbm_level(2);
        t.map(Iova(0x20_0000), PhysAddr(0x20_0000), 0x20_0000, RW).unwrap();
        t.map(Iova(0x40_0000), PhysAddr(0x40_0000), 0x1000, mmio).unwrap();
        let before = raw_words(&t);
        let mut g = Gather::default();
        // Normal WB -> NC or Device, Device -> Normal: all break-before-make, all refused before any change (not
        // even the block that the range cuts is split).
        for (iova, size, prot) in [
            (0x20_0000, 0x20_0000, nc),
            (0x20_1000, 0x1000, mmio),
            (0x40_0000, 0x1000, RW),
            (0x3f_f000, 0x2000, RW | Prot::EXEC),
        ] {
            assert_eq!(
                t.protect(Iova(iova), size, prot, &mut g),
                Err(MapError::BadProt(prot)),
                "{stage:?} {iova:#x}"
            );
        }
        assert!(g.is_empty());
        assert_eq!(raw_words(&t), before, "nothing changed");
        // Permissions alone still change in place, within a memory type.
        assert_eq!(
            t.protect(Iova(0x40_0000), 0x1000, Prot::READ | Prot::MMIO, &mut g),
            Ok(0x1000)
        );
        assert_eq!(
            t.translate(Iova(0x40_0000)),
            Some((PhysAddr(0x40_0000), Prot::READ | Prot::MMIO))
        );
        release(&mut t, g);
        // Both memory flags at once are refused everywhere.
        let both = Prot::READ | Prot::MMIO | Prot::CACHEABLE;
        assert_eq!(
            t.map(Iova(0x80_0000), PhysAddr(0), 0x1000, both),
            Err(MapError::BadProt(both))
        );
    }
}

#[test]
fn mappings_without_cacheable_are_normal_non_cacheable_and_mmio_is_device() {
    // Read back from the raw descriptors with the architecture's field positions, not through `desc`.
    for stage in [Stage::One, Stage::Two] {
        let mut t = table(stage, Granule::Size4K, 39);
        t.map(Iova(0x1000), PhysAddr(0x1000), 0x1000, Prot::READ | Prot::WRITE)
            .unwrap();
        t.map(
            Iova(0x2000),
            PhysAddr(0x2000),
            0x1000,
            Prot::READ | Prot::WRITE | Prot::MMIO,
        )
        .unwrap();
        t.map(Iova(0x3000), PhysAddr(0x3000), 0x1000, RW).unwrap();
        let leaves: Vec<u64> = raw_words(&t)
            .into_iter()
            .filter(|&(_, i, d)| d & 3 == 3 && (1..=3).contains(&i) && d & 0xffff_ffff_f000 == (i as u64) << 12)
            .map(|(_, _, d)| d)
            .collect();
        assert_eq!(leaves.len(), 3, "{stage:?}");
        let attr = |d: u64| match stage {
            // AttrIndx [4:2] through the CD's MAIR byte.
            Stage::One | Stage::OneEl2 => (desc::MAIR >> (8 * ((d >> 2) & 0b111))) & 0xff,
            // MemAttr [5:2].
            Stage::Two => (d >> 2) & 0b1111,
        };
        let expected = match stage {
            Stage::Two => [0b0101, 0b0001, 0b1111],
            _ => [0x44, 0x04, 0xff],
        };
        assert_eq!(
            leaves.iter().map(|&d| attr(d)).collect::<Vec<_>>(),
            expected,
            "{stage:?}"
        );
        assert_eq!(
            leaves.iter().map(|&d| (d >> 8) & 0b11).collect::<Vec<_>>(),
            [0b10, 0b10, 0b11],
            "SH: outer for NC and Device, inner for WB"
        );
    }
}

#[test]
fn a_split_copies_the_blocks_attribute_bits() {
    let mut t = table(Stage::One, Granule::Size4K, 39);
    t.set_bbm_level(2);
    t.map(Iova(0x20_0000), PhysAddr(0x60_0000), 0x20_0000, RW).unwrap();
    // Give the block a bit no `Prot` stands for (software bit 55, ignored by the walk): a split must keep it.
    let root = t.root_entries()[0].load(Ordering::Relaxed);
    let l2 = desc::address(root);
    let block = t.table_entries(2, l2).unwrap()[1].load(Ordering::Relaxed) | 1 << 55;
    t.table_entries(2, l2).unwrap()[1].store(block, Ordering::Relaxed);
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(0x20_0000), 0x1000, &mut g), Ok(0x1000));
    let link = t.table_entries(2, l2).unwrap()[1].load(Ordering::Relaxed);
    let l3 = t.table_entries(3, desc::address(link)).unwrap();
    for (j, e) in l3.iter().enumerate().skip(1) {
        let expected = (block & !0x0000_ffff_ffff_f000) | 0b10 | (0x60_0000 + ((j as u64) << 12));
        assert_eq!(e.load(Ordering::Relaxed), expected, "page {j}");
    }
    release(&mut t, g);
}

#[test]
fn el2_stage1_tables_leave_pxn_clear_and_refuse_privileged() {
    let mut t = table(Stage::OneEl2, Granule::Size4K, 39);
    t.map(Iova(0), PhysAddr(0), 0x2000, Prot::READ | Prot::EXEC | Prot::CACHEABLE)
        .unwrap();
    t.map(Iova(0x2000), PhysAddr(0x2000), 0x1000, RW).unwrap();
    let privileged = RW | Prot::PRIVILEGED;
    assert_eq!(
        t.map(Iova(0x4000), PhysAddr(0), 0x1000, privileged),
        Err(MapError::BadProt(privileged))
    );
    let leaves: Vec<u64> = raw_words(&t)
        .into_iter()
        .filter(|&(_, i, d)| d & 3 == 3 && i < 3 && d & 0xffff_ffff_f000 == (i as u64) << 12)
        .map(|(_, _, d)| d)
        .collect();
    assert_eq!(leaves.len(), 3);
    for (i, d) in leaves.into_iter().enumerate() {
        assert_eq!(d & (1 << 53), 0, "PXN is RES0 in the EL2 regime");
        assert_eq!(d & (1 << 54) != 0, i == 2, "bit 54 is XN");
        assert_ne!(d & (1 << 6), 0, "AP[1] is RES1");
    }
}

#[test]
fn unlinking_an_empty_table_still_gathers_its_span() {
    let mut t = table(Stage::One, Granule::Size4K, 39);
    t.map(Iova(0x20_0000), PhysAddr(0x20_0000), 0x1000, RW).unwrap();
    // Empty the last-level table behind the table code's back: whatever its contents, the SMMU's walk caches
    // may hold the table, so unlinking it must be invalidated over its span.
    let root = t.root_entries()[0].load(Ordering::Relaxed);
    let link = t.table_entries(2, desc::address(root)).unwrap()[1].load(Ordering::Relaxed);
    t.table_entries(3, desc::address(link)).unwrap()[0].store(0, Ordering::Relaxed);
    let mut g = Gather::default();
    assert_eq!(t.unmap(Iova(0x20_0000), 0x20_0000, &mut g), Ok(0));
    assert!(g.tables_unlinked);
    assert!(g.start <= 0x20_0000 && g.end >= 0x40_0000, "{g:?}");
    release(&mut t, g);
}

/// The starting level the SMMU derives from STE.S2SL0 and the granule (IHI 0070 STE.S2SL0, as VTCR_EL2.SL0 in the
/// Arm ARM, without 52-bit addressing): 4 KiB: 0 → level 2, 1 → 1, 2 → 0; 16 KiB and 64 KiB: 0 → level 3, 1 → 2,
/// 2 → 1 (16 KiB: 3 → 0).
pub(super) fn s2_start_level(granule: Granule, sl0: u8) -> u8 {
    match (granule, sl0) {
        (Granule::Size4K, 0..=2) => 2 - sl0,
        (Granule::Size16K, 0..=3) | (Granule::Size64K, 0..=2) => 3 - sl0,
        _ => panic!("S2SL0 {sl0} is reserved for {granule:?}"),
    }
}

#[test]
fn stage2_walks_from_the_level_s2sl0_names_in_every_granule() {
    // For every granule and IPA size, the SMMU walks from the level S2SL0 names, with a root of as many entries as
    // the input bits above that level's entries resolve (concatenated tables: at most 16 granules' worth). Walk
    // the raw tables that way, independently of the table's own geometry.
    for granule in [Granule::Size4K, Granule::Size16K, Granule::Size64K] {
        let g = granule.log2();
        for input_bits in 32..=48u8 {
            let f = Format {
                stage: Stage::Two,
                granule,
                input_bits,
                output_bits: 48,
            };
            let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::default());
            let mut t = IoPageTable::new(f, frames, true).unwrap();
            let sl0 = t.geometry().s2_sl0();
            let start = s2_start_level(granule, sl0);
            let start_shift = g + (g - 3) * (3 - start);
            assert!(
                input_bits > start_shift,
                "{granule:?} {input_bits}: the root resolves no bits"
            );
            let root_bits = input_bits - start_shift;
            assert!(
                root_bits <= (g - 3) + 4,
                "{granule:?} {input_bits}: more than 16 concatenated tables"
            );
            let independent = Geometry {
                granule_bits: g,
                level_bits: g - 3,
                start_level: start,
                root_entries: 1 << root_bits,
            };
            let page = 1u64 << g;
            let top = (1u64 << input_bits) - page;
            for (i, iova) in [0, page * 3, 1 << (input_bits - 1), top].into_iter().enumerate() {
                t.map(Iova(iova), PhysAddr((i as u64 + 1) << 32), page, RW).unwrap();
            }
            let raw = decode(frames, t.root().0, &independent);
            for (i, iova) in [0, page * 3, 1 << (input_bits - 1), top].into_iter().enumerate() {
                assert_eq!(
                    raw.get(&iova),
                    Some(&((i as u64 + 1) << 32)),
                    "{granule:?} {input_bits}-bit IPA, S2SL0 {sl0}"
                );
            }
            assert_eq!(raw.len() as u64, 4 * page / 4096);
        }
    }
}

#[test]
fn an_allocation_failure_at_any_point_changes_nothing() {
    // Operations that allocate several tables, from an empty and from a populated table: let the n-th
    // allocation fail, for every n until the operation succeeds.
    type Setup = fn(&mut IoPageTable<&'static Witness>);
    type Step = fn(&mut IoPageTable<&'static Witness>) -> Result<u64, MapError>;
    let empty: Setup = |_| {};
    let populated: Setup = |t| {
        t.map(Iova(0x4000_0000), PhysAddr(0x4000_0000), 1 << 30, RW).unwrap();
        t.map(Iova(0x20_0000), PhysAddr(0x1000), 0x1000, RW).unwrap();
    };
    let steps: [(Setup, Step); 7] = [
        // The single-page path: two new tables below the root, then one.
        (empty, |t| {
            t.map(Iova(0x7f_0000_0000), PhysAddr(0x1000), 0x1000, RW).map(|()| 0)
        }),
        (populated, |t| {
            t.map(Iova(0x4020_0000 - 0x1000 + (1 << 30)), PhysAddr(0x1000), 0x1000, RW)
                .map(|()| 0)
        }),
        (empty, |t| {
            t.map(Iova(0x1ff000), PhysAddr(0x1ff000), 0x20_2000, RW).map(|()| 0)
        }),
        (empty, |t| {
            t.map(Iova(0x3fe0_0000), PhysAddr(0x1000), 0x40_0000, RW).map(|()| 0)
        }),
        (populated, |t| {
            t.map(Iova(0x8000_1000), PhysAddr(0x1000), 0x40_0000, RW).map(|()| 0)
        }),
        (populated, |t| {
            t.unmap(Iova(0x4000_1000), 0x3fff_e000, &mut Gather::default())
        }),
        (populated, |t| {
            t.protect(
                Iova(0x4010_0000),
                0x1000,
                Prot::READ | Prot::CACHEABLE,
                &mut Gather::default(),
            )
        }),
    ];
    for (n, (setup, step)) in steps.into_iter().enumerate() {
        for fail_at in 0.. {
            let w = Witness::new(HeapFrames::default());
            let mut t = IoPageTable::new(format(Stage::Two, Granule::Size4K, 40), w, true).unwrap();
            t.set_bbm_level(2);
            setup(&mut t);
            w.watch(&t);
            let (before, live, tables) = (raw_words(&t), w.frames.live_blocks(), t.tables());
            w.fail_in.store(fail_at, std::sync::atomic::Ordering::Relaxed);
            let result = step(&mut t);
            let fired = w.fail_in.load(std::sync::atomic::Ordering::Relaxed) == usize::MAX;
            assert_eq!(*w.violations.lock().unwrap(), []);
            w.unwatch();
            if !fired {
                assert!(result.is_ok(), "step {n}: {result:?}");
                assert!(fail_at > 0, "step {n} allocates");
                break;
            }
            assert!(
                matches!(result, Err(MapError::NoMemory(_))),
                "step {n}, allocation {fail_at}: {result:?}"
            );
            assert_eq!(raw_words(&t), before, "step {n}, allocation {fail_at}");
            assert_eq!((w.frames.live_blocks(), t.tables()), (live, tables));
        }
    }
}
