//! The mixed-path model: single-page and range paths interleaved on every shape, and gathers tied to their table.

use super::*;

/// The shapes the mixed-path model runs on: every granule and stage, start levels 0 to 3, concatenated stage-2
/// roots (at level 1, 2 and 3), and windows at the middle and at the very top of the input range.
pub(super) const SHAPES: [(Stage, Granule, u8); 10] = [
    (Stage::One, Granule::Size4K, 48),
    (Stage::OneEl2, Granule::Size4K, 39),
    (Stage::Two, Granule::Size4K, 40),
    (Stage::One, Granule::Size16K, 47),
    (Stage::Two, Granule::Size16K, 40),
    (Stage::Two, Granule::Size16K, 25),
    (Stage::One, Granule::Size64K, 42),
    (Stage::Two, Granule::Size64K, 44),
    (Stage::One, Granule::Size64K, 29),
    (Stage::Two, Granule::Size64K, 32),
];

/// An operation of the mixed-path model, in granules relative to its window.
#[derive(Clone, Debug)]
pub(super) enum MixOp {
    /// A range (or, with one granule, single-page) map; `skew` moves the output one granule off alignment.
    Map {
        at: u64,
        pages: u64,
        skew: bool,
        prot: usize,
    },
    /// Single-page maps of each granule of `pages` from `at` (skipping mapped ones).
    MapEach {
        at: u64,
        pages: u64,
        prot: usize,
    },
    Unmap {
        at: u64,
        pages: u64,
    },
    /// Single-page unmaps of each granule of `pages` from `at`.
    UnmapEach {
        at: u64,
        pages: u64,
    },
    Protect {
        at: u64,
        pages: u64,
        prot: usize,
    },
    Trim,
    LazyLimit {
        tables: u32,
    },
    FailAllocation {
        after: usize,
    },
    /// A live update: the table is forgotten and adopted in place, with the recorded counts or by a recount.
    Adopt {
        recorded: bool,
    },
}

/// What the raw tables hold, decoded from the architecture's format (not through `desc`): the leaves (input,
/// size, output), the tables linked below the root, and the linked tables that map nothing. Asserts the
/// software state in every table descriptor: the count (bits \[11:2\] and \[55:52\]) is the number of valid
/// entries, bit 56 is set exactly on a full last-level table, and an empty linked table is a last-level table
/// whose descriptor and every ancestor's carry bit 57.
pub(super) fn decode_shape(frames: &HeapFrames, root: u64, g: &Geometry) -> (Vec<(u64, u64, u64)>, usize, usize) {
    #[allow(clippy::too_many_arguments)]
    fn go(
        frames: &HeapFrames,
        table: u64,
        level: u8,
        base: u64,
        g: &Geometry,
        link: Option<u64>,
        marked: bool,
        out: &mut (Vec<(u64, u64, u64)>, usize, usize),
    ) {
        let entries = if level == g.start_level {
            g.root_entries
        } else {
            1 << g.level_bits
        };
        let shift = g.granule_bits as u64 + g.level_bits as u64 * (3 - level as u64);
        let words = frames.virt(table) as *const u64;
        // SAFETY: a live table of `entries` descriptors.
        let all: Vec<u64> = (0..entries).map(|i| unsafe { words.add(i).read() }).collect();
        let valid = all.iter().filter(|&&d| d & 1 != 0).count() as u64;
        if let Some(link) = link {
            assert_link_state(link, level, valid, entries, marked, table);
            if valid == 0 {
                out.2 += 1;
            }
        }
        let granule_mask = (1u64 << g.granule_bits) - 1;
        for (i, &d) in all.iter().enumerate() {
            if d & 1 == 0 {
                continue;
            }
            let va = base + ((i as u64) << shift);
            let oa = d & 0x0000_ffff_ffff_f000 & !granule_mask;
            if level < 3 && d & 2 != 0 {
                out.1 += 1;
                let marked = link.is_none_or(|l| marked && l & (1 << 57) != 0);
                go(frames, oa, level + 1, va, g, Some(d), marked, out);
            } else {
                assert!(level == 3 || d & 2 == 0, "level-3 descriptors are pages");
                assert_ne!(d & (1 << 10), 0, "AF set");
                out.0.push((va, 1 << shift, oa));
            }
        }
    }
    let mut out = (Vec::new(), 0, 0);
    go(frames, root, g.start_level, 0, g, None, true, &mut out);
    out
}

/// Runs `ops` on a fresh table of `shape` with a window of four last-level tables' span, centred on the middle
/// of the input range or ending at its top, checking after each operation the model (granule → output,
/// protection), the software state of every descriptor, `tables()` and `empty_tables()` against the raw tables,
/// that a failed operation changes nothing, and that no table is freed while the SMMU could walk it.
pub(super) fn run_mixed(shape: (Stage, Granule, u8), top: bool, split_blocks: bool, ops: Vec<MixOp>) {
    let (stage, granule, bits) = shape;
    let w = Witness::new(HeapFrames::default());
    let f = format(stage, granule, bits);
    let mut t = IoPageTable::new(f, w, true).unwrap();
    let g = *t.geometry();
    let page = 1u64 << g.granule_bits;
    let per_table = 1u64 << g.level_bits;
    let window = (4 * per_table).min((1u64 << bits) / page);
    let first = if top {
        (1u64 << bits) / page - window
    } else {
        ((1u64 << bits) / page / 2).saturating_sub(window / 2)
    };
    let (mut split, mut limit) = (split_blocks, DEFAULT_LAZY_FREE_LIMIT);
    t.set_bbm_level(if split { 2 } else { 0 });
    w.watch(&t);
    // Granule index → (output granule index, protection).
    let mut model: BTreeMap<u64, (u64, Prot)> = BTreeMap::new();
    let scale = |n: u64| match n {
        0 => 1,
        1 => per_table,
        2 => 2 * per_table,
        n => n % (2 * per_table) + 1,
    };
    let clamp = |at: u64, pages: u64| {
        let at = first + at % window;
        (at, pages.min(first + window - at))
    };
    let what = std::format!("{stage:?} {granule:?} {bits} top={top}");
    for op in ops {
        let before = raw_words(&t);
        let (live, tables) = (w.frames.live_blocks(), t.tables());
        let armed = w.fail_in.load(std::sync::atomic::Ordering::Relaxed) != usize::MAX;
        let blocks: Vec<(u64, u64)> = decode_shape(&w.frames, t.root().0, &g)
            .0
            .into_iter()
            .filter(|&(_, size, _)| size > page)
            .map(|(va, size, _)| (va, size))
            .collect();
        let in_block = |p: u64| blocks.iter().any(|&(va, size)| va <= p * page && p * page < va + size);
        let cuts = |at: u64, pages: u64| {
            [at, at + pages]
                .iter()
                .any(|&p| blocks.iter().any(|&(va, size)| va < p * page && p * page < va + size))
        };
        let failed = |t: &IoPageTable<&Witness>, result: &Result<u64, MapError>| {
            if matches!(result, Err(MapError::NoMemory(_))) {
                assert!(armed, "{what}: {result:?} without an injected failure");
                assert!(raw_words(t) == before, "{what}: a failed operation changes nothing");
                assert_eq!((w.frames.live_blocks(), t.tables()), (live, tables), "{what}");
                return true;
            }
            false
        };
        match op {
            MixOp::Map { at, pages, skew, prot } => {
                let pages = scale(pages);
                let align = pages.next_power_of_two().min(per_table) - 1;
                let (at, pages) = clamp(at & !align, pages);
                let out = (((at * 7919) & !align) + u64::from(skew)) % ((1 << 32) / page * 64);
                let prot = PROTS[prot];
                let overlaps = model.range(at..at + pages).next().is_some();
                let result = t.map(Iova(at * page), PhysAddr(out * page), pages * page, prot);
                if overlaps {
                    assert!(matches!(result, Err(MapError::Overlap { .. })), "{what}: {result:?}");
                    assert!(raw_words(&t) == before, "{what}: a refused map changes nothing");
                } else if !failed(&t, &result.map(|()| 0)) {
                    assert_eq!(result, Ok(()), "{what}");
                    for p in 0..pages {
                        model.insert(at + p, (out + p, prot));
                    }
                }
            }
            MixOp::MapEach { at, pages, prot } => {
                let (at, pages) = clamp(at, scale(pages));
                let prot = PROTS[prot];
                for p in at..at + pages {
                    if model.contains_key(&p) {
                        continue;
                    }
                    let armed = w.fail_in.load(std::sync::atomic::Ordering::Relaxed) != usize::MAX;
                    let before = if armed { raw_words(&t) } else { Vec::new() };
                    let (live, tables) = (w.frames.live_blocks(), t.tables());
                    let out = (p ^ 0x5a) % ((1 << 32) / page * 64);
                    match t.map(Iova(p * page), PhysAddr(out * page), page, prot) {
                        Ok(()) => {
                            model.insert(p, (out, prot));
                        }
                        Err(MapError::NoMemory(_)) => {
                            assert!(armed, "{what}");
                            assert!(raw_words(&t) == before, "{what}: a failed map changes nothing");
                            assert_eq!((w.frames.live_blocks(), t.tables()), (live, tables), "{what}");
                        }
                        Err(e) => panic!("{what}: single-page map of {p:#x}: {e:?}"),
                    }
                }
            }
            MixOp::Unmap { at, pages } => {
                let (at, pages) = clamp(at, scale(pages));
                let expected = model.range(at..at + pages).count() as u64 * page;
                let cut = cuts(at, pages);
                let mut gather = Gather::default();
                let result = t.unmap(Iova(at * page), pages * page, &mut gather);
                if cut && !split {
                    assert!(
                        matches!(result, Err(MapError::WouldSplitBlock { .. })),
                        "{what}: {result:?}"
                    );
                    assert!(raw_words(&t) == before, "{what}: a refused split changes nothing");
                    continue;
                }
                if failed(&t, &result) {
                    continue;
                }
                assert_eq!(result, Ok(expected), "{what}: unmap {at:#x}+{pages:#x}");
                if pages != 1 || cut {
                    assert_eq!(t.empty_tables(), 0, "{what}: a range unmap trims");
                }
                model.retain(|&k, _| k < at || k >= at + pages);
                w.invalidated();
                release(&mut t, gather);
            }
            MixOp::UnmapEach { at, pages } => {
                let (at, pages) = clamp(at, scale(pages));
                for p in at..at + pages {
                    if in_block(p) && !split {
                        continue;
                    }
                    let removed = model.remove(&p);
                    let expected = if removed.is_some() { page } else { 0 };
                    let armed = w.fail_in.load(std::sync::atomic::Ordering::Relaxed) != usize::MAX;
                    let before = if armed { raw_words(&t) } else { Vec::new() };
                    let (live, tables) = (w.frames.live_blocks(), t.tables());
                    let mut gather = Gather::default();
                    let result = t.unmap(Iova(p * page), page, &mut gather);
                    if matches!(result, Err(MapError::NoMemory(_))) {
                        // Splitting the block that holds it failed: nothing changed.
                        assert!(armed && in_block(p), "{what}");
                        assert!(raw_words(&t) == before, "{what}: a failed split changes nothing");
                        assert_eq!((w.frames.live_blocks(), t.tables()), (live, tables), "{what}");
                        model.insert(p, removed.unwrap());
                        continue;
                    }
                    assert_eq!(result, Ok(expected), "{what}: single-page unmap of {p:#x}");
                    if expected > 0 && !in_block(p) {
                        assert!(t.empty_tables() <= limit, "{what}: {} > {limit}", t.empty_tables());
                    }
                    if gather.freed_tables() > 0 {
                        w.invalidated();
                    }
                    release(&mut t, gather);
                }
            }
            MixOp::Protect { at, pages, prot } => {
                let (at, pages) = clamp(at, scale(pages));
                let prot = PROTS[prot];
                let memory = |p: Prot| p & (Prot::MMIO | Prot::CACHEABLE);
                let touched: Vec<u64> = model.range(at..at + pages).map(|(&k, _)| k).collect();
                let other_type = touched.iter().any(|k| memory(model[k].1) != memory(prot));
                let cut = cuts(at, pages);
                let mut gather = Gather::default();
                let result = t.protect(Iova(at * page), pages * page, prot, &mut gather);
                if other_type || (cut && !split) {
                    assert!(result.is_err(), "{what}: {result:?}");
                    assert!(raw_words(&t) == before, "{what}: a refused protect changes nothing");
                    continue;
                }
                if failed(&t, &result) {
                    continue;
                }
                assert_eq!(result, Ok(touched.len() as u64 * page), "{what}");
                for k in touched {
                    model.get_mut(&k).unwrap().1 = prot;
                }
                w.invalidated();
                release(&mut t, gather);
            }
            MixOp::Trim => {
                let mut gather = Gather::default();
                t.trim(&mut gather).unwrap();
                assert_eq!(t.empty_tables(), 0, "{what}");
                w.invalidated();
                release(&mut t, gather);
                assert_eq!(
                    decode_shape(&w.frames, t.root().0, &g).2,
                    0,
                    "{what}: nothing empty is left"
                );
            }
            MixOp::LazyLimit { tables } => {
                limit = tables;
                t.set_lazy_free_limit(tables);
            }
            MixOp::FailAllocation { after } => {
                w.fail_in.store(after, std::sync::atomic::Ordering::Relaxed);
            }
            MixOp::Adopt { recorded } => {
                let counts = AdoptedCounts {
                    tables: t.tables(),
                    empty: t.empty_tables(),
                };
                let root = t.root();
                core::mem::forget(t);
                t = IoPageTable::adopt(f, root, w, true, recorded.then_some(counts)).unwrap();
                assert_eq!((t.tables(), t.empty_tables()), (counts.tables, counts.empty), "{what}");
                if recorded {
                    assert!(raw_words(&t) == before, "{what}: adopting writes nothing");
                }
                t.set_bbm_level(if split { 2 } else { 0 });
                t.set_lazy_free_limit(limit);
                split = t.splits_blocks();
            }
        }
        let (leaves, linked, empty) = decode_shape(&w.frames, t.root().0, &g);
        let mut decoded = BTreeMap::new();
        for &(va, size, oa) in &leaves {
            for k in 0..size / page {
                decoded.insert(va / page + k, oa / page + k);
            }
        }
        assert_eq!(
            decoded,
            model.iter().map(|(&k, &(out, _))| (k, out)).collect::<BTreeMap<_, _>>(),
            "{what}: raw tables agree with the model"
        );
        t.walk(|m| {
            assert_eq!(m.prot, model[&(m.iova / page)].1, "{what}: protection of {:#x}", m.iova);
        });
        // The walk bounded by the live-entry counts finds exactly what the full walk finds.
        let (mut full, mut counted) = (Vec::new(), Vec::new());
        t.walk(|m| full.push((m.iova, m.pa, m.size, m.prot)));
        t.walk_exclusive(|m| counted.push((m.iova, m.pa, m.size, m.prot)));
        assert_eq!(counted, full, "{what}: the counted walk finds every mapping");
        assert_eq!(
            t.tables() as usize,
            linked + 1,
            "{what}: tables() counts the linked tables"
        );
        assert_eq!(
            t.empty_tables() as usize,
            empty,
            "{what}: empty_tables() counts the waiting tables"
        );
        assert_eq!(
            *w.violations.lock().unwrap(),
            [],
            "{what}: a table was freed while walkable"
        );
    }
    w.fail_in.store(usize::MAX, std::sync::atomic::Ordering::Relaxed);
    let mut gather = Gather::default();
    t.unmap(Iova(0), 1 << bits, &mut gather).unwrap();
    w.invalidated();
    release(&mut t, gather);
    assert_eq!(t.tables(), 1, "{what}: only the root is left");
    w.unwatch();
    drop(t);
    assert_eq!(w.frames.live_blocks(), 0, "{what}");
}

pub(super) fn mix_op() -> impl proptest::strategy::Strategy<Value = MixOp> {
    use proptest::prelude::*;
    // Sizes: 0 one granule, 1 a last-level table's span, 2 two, else random (see `run_mixed`).
    let pages = prop_oneof![4 => Just(0u64), 1 => 3u64..10, 2 => Just(1u64), 1 => Just(2u64), 1 => 3u64..1 << 20];
    let at = prop_oneof![3 => any::<u64>(), 1 => (0u64..8).prop_map(|k| k << 30)];
    prop_oneof![
        3 => (at.clone(), pages.clone(), any::<bool>(), 0..PROTS.len())
            .prop_map(|(at, pages, skew, prot)| MixOp::Map { at, pages, skew, prot }),
        2 => (at.clone(), pages.clone(), 0..PROTS.len()).prop_map(|(at, pages, prot)| MixOp::MapEach { at, pages, prot }),
        2 => (at.clone(), pages.clone()).prop_map(|(at, pages)| MixOp::Unmap { at, pages }),
        2 => (at.clone(), pages.clone()).prop_map(|(at, pages)| MixOp::UnmapEach { at, pages }),
        1 => (at, pages, 0..PROTS.len()).prop_map(|(at, pages, prot)| MixOp::Protect { at, pages, prot }),
        1 => Just(MixOp::Trim),
        1 => prop_oneof![Just(0u32), Just(1), Just(2), Just(DEFAULT_LAZY_FREE_LIMIT)]
            .prop_map(|tables| MixOp::LazyLimit { tables }),
        1 => (0usize..4).prop_map(|after| MixOp::FailAllocation { after }),
        1 => any::<bool>().prop_map(|recorded| MixOp::Adopt { recorded }),
    ]
}

/// [`config`] with 10 cases (each runs several shapes' worth of tables), unless `PROPTEST_CASES` says otherwise.
pub(super) fn mixed_config() -> proptest::test_runner::Config {
    let mut config = config();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 10;
    }
    config
}

proptest::proptest! {
    #![proptest_config(mixed_config())]

    #[test]
    fn every_shape_matches_the_model_through_mixed_paths(
        shape in 0..SHAPES.len(),
        top in proptest::bool::ANY,
        split in proptest::bool::ANY,
        ops in proptest::collection::vec(mix_op(), 1..24),
    ) {
        run_mixed(SHAPES[shape], top, split, ops);
    }
}

#[test]
fn a_gather_is_refused_by_every_table_but_the_one_that_filled_it() {
    let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::default());
    let mut a = IoPageTable::new(format(Stage::One, Granule::Size4K, 39), frames, true).unwrap();
    let mut b = IoPageTable::new(format(Stage::One, Granule::Size4K, 39), frames, true).unwrap();
    a.map(Iova(0x20_0000), PhysAddr(0x8000_0000), 0x2000, RW).unwrap();
    b.map(Iova(0x20_0000), PhysAddr(0x9000_0000), 0x2000, RW).unwrap();
    let mut g = Gather::default();
    assert_eq!(a.unmap(Iova(0x20_0000), 0x2000, &mut g), Ok(0x2000));
    assert_eq!(g.freed_tables(), 2, "a's last-level and level-2 tables, unlinked");
    assert_eq!(g.owner(), Some(a.id()));
    let live = frames.live_blocks();
    // b neither adds to a's gather, nor merges it, nor frees a's tables.
    let foreign = MapError::ForeignGather {
        owner: a.id(),
        table: b.id(),
    };
    assert_eq!(b.unmap(Iova(0x20_0000), 0x1000, &mut g), Err(foreign));
    assert_eq!(b.protect(Iova(0x20_0000), 0x1000, Prot::READ, &mut g), Err(foreign));
    assert_eq!(b.trim(&mut g), Err(foreign));
    assert_eq!(
        b.iova_to_phys(Iova(0x20_0000)),
        Some(PhysAddr(0x9000_0000)),
        "b unchanged"
    );
    let mut into = Gather::default();
    let refused = b.merge(&mut into, g).unwrap_err();
    assert!(into.is_empty() && into.owner().is_none(), "nothing merged");
    // SAFETY: refused before anything is freed (and no SMMU walks these tables).
    let refused = unsafe { b.release(refused.gather) }.unwrap_err();
    assert_eq!(refused.table, b.id());
    let g = refused.gather;
    assert_eq!(
        (g.freed_tables(), g.start(), g.end()),
        (2, 0, 1 << 30),
        "handed back whole"
    );
    assert_eq!(frames.live_blocks(), live, "a's tables are not b's to free");
    release(&mut a, g);
    assert_eq!(frames.live_blocks(), live - 2);
    // An unused gather is anyone's until its first use.
    let mut g = Gather::default();
    b.unmap(Iova(0x20_0000), 0x1000, &mut g).unwrap();
    assert_eq!(g.owner(), Some(b.id()));
    assert_ne!(a.id(), b.id());
}

#[test]
fn a_misaligned_output_address_is_reported_as_the_output() {
    let mut t = table(Stage::One, Granule::Size4K, 39);
    // Range path (two pages), then the single-page path once its protection is known.
    let range = t.map(Iova(0x1000), PhysAddr(0x8000_0800), 0x2000, RW);
    assert_eq!(
        range,
        Err(MapError::UnalignedOutput {
            pa: 0x8000_0800,
            size: 0x2000
        })
    );
    t.map(Iova(0x10_0000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    let page = t.map(Iova(0x1000), PhysAddr(0x8000_0800), 0x1000, RW);
    assert_eq!(
        page,
        Err(MapError::UnalignedOutput {
            pa: 0x8000_0800,
            size: 0x1000
        })
    );
    assert_eq!(t.iova_to_phys(Iova(0x1000)), None);
}
