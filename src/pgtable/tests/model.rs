//! Property tests: random map / unmap / protect sequences against a model, on every stage and granule.

use super::*;

/// Where an operation aims: at a page of an existing mapping (picked by index among the mapped pages, then moved
/// by `shift` pages, so that ranges start inside, before and after mappings and cut blocks), or anywhere in the
/// window.
#[derive(Clone, Copy, Debug)]
pub(super) enum Target {
    Mapped { pick: usize, shift: i64 },
    Anywhere { page: u64 },
}

#[derive(Clone, Debug)]
pub(super) enum Op {
    Map {
        page: u64,
        pages: u64,
        out: u64,
        prot: usize,
    },
    Unmap {
        at: Target,
        pages: u64,
    },
    Protect {
        at: Target,
        pages: u64,
        prot: usize,
    },
    /// The allocation after `after` more succeed fails (once): in the next operation that allocates.
    FailAllocation {
        after: usize,
    },
    /// `trim`, then the invalidation and `release`.
    Trim,
    /// Single-page unmaps of each page of `pages` from `at` (aligned down to a last-level table's span when
    /// `table_aligned`), skipping pages inside blocks: empties tables on the single-page path.
    UnmapEach {
        at: Target,
        pages: u64,
        table_aligned: bool,
    },
    /// `set_lazy_free_limit`.
    LazyLimit {
        tables: u32,
    },
}

/// The protections the property tests use: every memory type, read-only and read-write, executable or not.
pub(super) const PROTS: [Prot; 6] = [
    RW,
    Prot::READ.union(Prot::CACHEABLE),
    Prot::READ.union(Prot::WRITE),
    Prot::READ.union(Prot::WRITE).union(Prot::MMIO),
    Prot::READ.union(Prot::MMIO),
    RW.union(Prot::EXEC),
];

/// The window operations draw from, in pages: 64 MiB across the 1 GiB boundary, so that level-2 tables empty and
/// go too, and two of them exist at once.
pub(super) const WINDOW_START: u64 = (1 << 18) - (1 << 13);
pub(super) const WINDOW_PAGES: u64 = 1 << 14;

pub(super) fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    // Sizes favour block-sized runs and small cuts.
    // Single pages (the dma_map fast path) often.
    let pages = prop_oneof![3 => Just(1u64), 1 => 1u64..8, 1 => Just(512u64), 1 => Just(1024u64), 1 => 1u64..2048];
    let target = prop_oneof![
        4 => (any::<usize>(), prop_oneof![3 => Just(0i64), 1 => -4i64..4, 1 => -600i64..600])
            .prop_map(|(pick, shift)| Target::Mapped { pick, shift }),
        1 => (0..WINDOW_PAGES).prop_map(|page| Target::Anywhere { page: WINDOW_START + page }),
    ];
    prop_oneof![
        // The output is aligned like the input (blocks where possible) or one page off (only pages: whole
        // last-level tables filled by `map`).
        4 => (0..WINDOW_PAGES, pages.clone(), 0u64..(1 << 20), any::<bool>(), 0..PROTS.len()).prop_map(
            |(page, pages, out, skew, prot)| {
                let align = (pages.next_power_of_two() - 1) & 0x1ff;
                Op::Map {
                    page: WINDOW_START + (page & !align),
                    pages,
                    out: (out & !align) + u64::from(skew),
                    prot,
                }
            }
        ),
        3 => (target.clone(), pages.clone()).prop_map(|(at, pages)| Op::Unmap { at, pages }),
        2 => (target.clone(), prop_oneof![1u64..8, Just(512u64), Just(1024u64), 1u64..2048], 0..PROTS.len())
            .prop_map(|(at, pages, prot)| Op::Protect { at, pages, prot }),
        1 => (0usize..4).prop_map(|after| Op::FailAllocation { after }),
        1 => Just(Op::Trim),
        1 => (target, prop_oneof![1u64..16, Just(512u64), 1u64..1024], any::<bool>())
            .prop_map(|(at, pages, table_aligned)| Op::UnmapEach { at, pages, table_aligned }),
        1 => prop_oneof![Just(0u32), Just(1), Just(3), Just(DEFAULT_LAZY_FREE_LIMIT)]
            .prop_map(|tables| Op::LazyLimit { tables }),
    ]
}

/// What the generators hit, counted by [`run`] on its thread.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Hits {
    pub(super) unmaps: u32,
    pub(super) unmaps_hit: u32,
    pub(super) protects: u32,
    pub(super) protects_hit: u32,
    pub(super) splits: u32,
    pub(super) refused_splits: u32,
    pub(super) tables_freed: u32,
    pub(super) failed_allocations: u32,
    /// Single-page maps that succeeded / failed for an injected allocation failure.
    pub(super) page_maps: u32,
    pub(super) page_maps_failed: u32,
    /// Single-page unmaps that removed a page.
    pub(super) page_unmaps_hit: u32,
    /// Unmaps after which more emptied tables wait than before (lazy freeing).
    pub(super) left_empty: u32,
    /// Trims that unlinked tables, and tables the single-page unmap's own trim (over the limit) unlinked.
    pub(super) trims_unlinked: u32,
    pub(super) limit_trims: u32,
}

std::thread_local! {
    static HITS: core::cell::Cell<Hits> = core::cell::Cell::new(Hits::default());
}

pub(super) fn count(f: impl FnOnce(&mut Hits)) {
    HITS.with(|h| {
        let mut hits = h.get();
        f(&mut hits);
        h.set(hits);
    });
}

/// Whether `[iova, iova + size)` cuts a leaf bigger than a page: a leaf holds `iova` (or the page at the end)
/// without starting there.
pub(super) fn cuts_a_block(leaves: &BTreeMap<u64, Leaf>, iova: u64, size: u64) -> bool {
    [iova, iova + size]
        .iter()
        .any(|&a| leaves.get(&a).is_some_and(|leaf| leaf.base != a))
}

/// Runs `ops` on a fresh table of `stage` (4 KiB granule), checking after each against a model of pages: the raw
/// tables (through an independent decoder, attributes included), the errors, the gathers, that a failed
/// operation changes nothing, and (through [`Witness`]) that no table is freed while the SMMU could still walk
/// it.
pub(super) fn run(stage: Stage, split_blocks: bool, ops: Vec<Op>) {
    let w = Witness::new(HeapFrames::default());
    let bits = if stage == Stage::One { 39 } else { 40 };
    let mut t = IoPageTable::new(format(stage, Granule::Size4K, bits), w, true).unwrap();
    if split_blocks {
        t.set_bbm_level(2);
    }
    w.watch(&t);
    let mut model: BTreeMap<u64, (u64, Prot)> = BTreeMap::new();
    let aim = |model: &BTreeMap<u64, (u64, Prot)>, at: Target| match at {
        Target::Mapped { pick, shift } if !model.is_empty() => {
            let page = model.keys().nth(pick % model.len()).unwrap() >> 12;
            page.saturating_add_signed(shift).max(1)
        }
        Target::Mapped { pick, .. } => WINDOW_START + (pick as u64 % WINDOW_PAGES),
        Target::Anywhere { page } => page,
    };
    for op in ops {
        let before = raw_words(&t);
        let (live, tables) = (w.frames.live_blocks(), t.tables());
        let raw = leaves(&w.frames, t.root().0, t.geometry());
        let armed = w.fail_in.load(std::sync::atomic::Ordering::Relaxed) != usize::MAX;
        let empty_before = t.empty_tables();
        // Whether `result` is an injected allocation failure, after checking that it changed nothing.
        let failed = |t: &IoPageTable<&Witness>, result: &Result<u64, MapError>| {
            if matches!(result, Err(MapError::NoMemory(_))) {
                assert!(armed, "{result:?} without an injected failure");
                assert_eq!(raw_words(t), before, "a failed operation changes nothing");
                assert_eq!((w.frames.live_blocks(), t.tables()), (live, tables));
                count(|h| h.failed_allocations += 1);
                return true;
            }
            false
        };
        match op {
            Op::FailAllocation { after } => {
                w.fail_in.store(after, std::sync::atomic::Ordering::Relaxed);
            }
            Op::LazyLimit { tables } => t.set_lazy_free_limit(tables),
            Op::UnmapEach {
                at,
                pages,
                table_aligned,
            } => {
                let first = aim(&model, at) & if table_aligned { !511 } else { !0 };
                for page in (first..first + pages).map(|p| p << 12) {
                    if page >= 1 << bits || raw.get(&page).is_some_and(|leaf| leaf.size > 4096) {
                        continue;
                    }
                    let expected = if model.remove(&page).is_some() { 4096 } else { 0 };
                    let empty_before = t.empty_tables();
                    let mut g = Gather::default();
                    assert_eq!(t.unmap(Iova(page), 4096, &mut g), Ok(expected), "{page:#x}");
                    if expected > 0 {
                        assert!(g.start <= page && page + 4096 <= g.end, "{g:?}");
                        assert!(t.empty_tables() <= t.lazy_limit);
                        count(|h| {
                            h.page_unmaps_hit += 1;
                            h.left_empty += u32::from(t.empty_tables() > empty_before);
                            h.limit_trims += u32::from(g.freed_tables() > 0);
                        });
                    }
                    assert_eq!(t.translate(Iova(page)), None);
                    w.invalidated();
                    release(&mut t, g);
                }
            }
            Op::Trim => {
                let mut g = Gather::default();
                let waiting = t.empty_tables();
                let unlinked = t.trim(&mut g).unwrap();
                assert_eq!(t.empty_tables(), 0);
                assert_eq!(
                    linked_empty_tables(&w.frames, t.root().0, t.geometry()),
                    0,
                    "nothing empty is left"
                );
                assert!(unlinked as usize >= waiting as usize, "{unlinked} < {waiting}");
                assert_eq!(g.freed_tables(), unlinked);
                assert_eq!(g.tables_unlinked, unlinked > 0);
                assert_eq!(g.leaves, 0, "a trim removes no translation");
                assert_eq!(raw_words(&t).len() < before.len(), unlinked > 0);
                assert_eq!(w.frames.live_blocks(), live, "nothing is freed before the invalidation");
                count(|h| h.trims_unlinked += u32::from(unlinked > 0));
                w.invalidated();
                release(&mut t, g);
                assert_eq!(w.frames.live_blocks(), live - unlinked as usize);
            }
            Op::Map { page, pages, out, prot } => {
                let (iova, pa, size, prot) = (page << 12, out << 12, pages << 12, PROTS[prot]);
                let overlaps = model.range(iova..iova + size).next().is_some();
                let result = t.map(Iova(iova), PhysAddr(pa), size, prot);
                if overlaps {
                    assert!(matches!(result, Err(MapError::Overlap { .. })), "{result:?}");
                } else if failed(&t, &result.map(|()| 0)) {
                    count(|h| h.page_maps_failed += u32::from(pages == 1));
                } else {
                    result.unwrap();
                    count(|h| h.page_maps += u32::from(pages == 1));
                    for p in 0..pages {
                        model.insert(iova + (p << 12), (pa + (p << 12), prot));
                    }
                }
            }
            Op::Unmap { at, pages } => {
                let (iova, size) = (aim(&model, at) << 12, pages << 12);
                let expected = model.range(iova..iova + size).count() as u64 * 4096;
                count(|h| {
                    h.unmaps += 1;
                    h.unmaps_hit += u32::from(expected > 0);
                });
                let cuts = cuts_a_block(&raw, iova, size);
                let mut g = Gather::default();
                let result = t.unmap(Iova(iova), size, &mut g);
                if !split_blocks && cuts {
                    assert!(
                        matches!(result, Err(MapError::WouldSplitBlock { iova: a }) if a == iova || a == iova + size),
                        "{result:?}"
                    );
                    assert_eq!(raw_words(&t), before, "a refused split changes nothing");
                    assert!(g.is_empty());
                    count(|h| h.refused_splits += 1);
                    continue;
                }
                if failed(&t, &result) {
                    assert!(cuts && g.is_empty());
                    continue;
                }
                assert_eq!(result, Ok(expected));
                let limit_trim = pages == 1 && !cuts && g.freed_tables() > 0;
                count(|h| {
                    h.splits += u32::from(cuts);
                    h.tables_freed += g.freed_tables();
                    h.page_unmaps_hit += u32::from(pages == 1 && expected > 0);
                    h.left_empty += u32::from(t.empty_tables() > empty_before);
                    h.limit_trims += u32::from(limit_trim);
                });
                if pages != 1 || cuts {
                    assert_eq!(t.empty_tables(), 0, "a range unmap trims");
                } else if expected > 0 {
                    assert!(
                        t.empty_tables() <= t.lazy_limit,
                        "at most the limit wait after a single-page unmap: {} > {}",
                        t.empty_tables(),
                        t.lazy_limit
                    );
                }
                if expected > 0 {
                    // The invalidation range covers every page that was mapped and is gone.
                    let lo = *model.range(iova..iova + size).next().unwrap().0;
                    let hi = *model.range(iova..iova + size).next_back().unwrap().0 + 4096;
                    assert!(
                        g.start <= lo && g.end >= hi,
                        "gather {:#x}..{:#x} covers the unmapped {lo:#x}..{hi:#x}",
                        g.start,
                        g.end
                    );
                }
                model.retain(|k, _| *k < iova || *k >= iova + size);
                w.invalidated();
                release(&mut t, g);
            }
            Op::Protect { at, pages, prot } => {
                let (iova, size, prot) = (aim(&model, at) << 12, pages << 12, PROTS[prot]);
                let touched: Vec<(u64, Prot)> = model.range(iova..iova + size).map(|(&k, &(_, p))| (k, p)).collect();
                count(|h| {
                    h.protects += 1;
                    h.protects_hit += u32::from(!touched.is_empty());
                });
                let memory = |p: Prot| p & (Prot::MMIO | Prot::CACHEABLE);
                let other_type = touched.iter().any(|&(_, p)| memory(p) != memory(prot));
                let cuts = cuts_a_block(&raw, iova, size);
                let mut g = Gather::default();
                let result = t.protect(Iova(iova), size, prot, &mut g);
                if other_type || (!split_blocks && cuts) {
                    if other_type {
                        assert_eq!(result, Err(MapError::BadProt(prot)));
                    } else {
                        assert!(
                            matches!(result, Err(MapError::WouldSplitBlock { iova: a }) if a == iova || a == iova + size),
                            "{result:?}"
                        );
                    }
                    assert_eq!(raw_words(&t), before, "a refused protect changes nothing");
                    assert!(g.is_empty());
                    continue;
                }
                if failed(&t, &result) {
                    continue;
                }
                assert_eq!(result, Ok(touched.len() as u64 * 4096));
                count(|h| h.splits += u32::from(cuts));
                // Every page whose protection changed is in the invalidation range.
                for &(page, old) in &touched {
                    if old != prot {
                        assert!(g.start <= page && page + 4096 <= g.end, "gather {g:?} misses {page:#x}");
                    }
                    model.get_mut(&page).unwrap().1 = prot;
                }
                w.invalidated();
                release(&mut t, g);
            }
        }
        let raw = leaves(&w.frames, t.root().0, t.geometry());
        assert_eq!(
            raw.iter().map(|(&k, l)| (k, l.out)).collect::<BTreeMap<_, _>>(),
            model.iter().map(|(&k, &(out, _))| (k, out)).collect::<BTreeMap<_, _>>(),
            "raw tables agree with the model"
        );
        for (page, leaf) in &raw {
            assert_eq!(
                attributes(stage, leaf.raw),
                expected_attributes(stage, model[page].1),
                "attributes of {page:#x}"
            );
        }
        assert_eq!(
            *w.violations.lock().unwrap(),
            [],
            "a table was freed while the SMMU could walk it"
        );
        let empty = linked_empty_tables(&w.frames, t.root().0, t.geometry());
        assert_eq!(t.empty_tables() as usize, empty, "emptied tables waiting for a trim");
    }
    w.fail_in.store(usize::MAX, std::sync::atomic::Ordering::Relaxed);
    for (&iova, &(pa, prot)) in model.iter().step_by(7) {
        assert_eq!(t.translate(Iova(iova + 0x123)), Some((PhysAddr(pa + 0x123), prot)));
    }
    let mut walked = 0;
    t.walk(|m| walked += m.size / 4096);
    assert_eq!(walked, model.len() as u64);
    let mut g = Gather::default();
    t.unmap(Iova(0), 1 << bits, &mut g).unwrap();
    w.invalidated();
    release(&mut t, g);
    assert_eq!(t.tables(), 1, "only the root is left");
    assert_eq!(*w.violations.lock().unwrap(), []);
    w.unwatch();
    drop(t);
    assert_eq!(w.frames.live_blocks(), 0);
}

/// The property tests' configuration: a fixed seed and 48 cases, so CI runs the same cases every time. For a
/// longer random run, override either through proptest's variables, e.g.
/// `PROPTEST_CASES=5000 PROPTEST_RNG_SEED=$RANDOM cargo test -p smmuv3 --lib pgtable -- matches_the_model`.
pub(super) fn config() -> proptest::test_runner::Config {
    let mut config = proptest::test_runner::Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 48;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = proptest::test_runner::RngSeed::Fixed(0x5eed_0013);
    }
    config
}

proptest::proptest! {
    #![proptest_config(config())]

    #[test]
    fn stage1_matches_the_model(split in proptest::bool::ANY, ops in proptest::collection::vec(op(), 1..32)) {
        run(Stage::One, split, ops);
    }

    #[test]
    fn stage2_matches_the_model(split in proptest::bool::ANY, ops in proptest::collection::vec(op(), 1..32)) {
        run(Stage::Two, split, ops);
    }
}

#[test]
fn the_generators_hit_their_targets() {
    use proptest::strategy::{Strategy, ValueTree};
    let mut runner = proptest::test_runner::TestRunner::new(config());
    HITS.with(|h| h.set(Hits::default()));
    let cases = 48;
    for i in 0..cases {
        let ops = proptest::collection::vec(op(), 1..32)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        run(if i % 2 == 0 { Stage::One } else { Stage::Two }, i % 4 < 2, ops);
    }
    let h = HITS.with(|h| h.get());
    std::println!("generator hits over {cases} sequences: {h:?}");
    assert!(h.unmaps_hit * 2 > h.unmaps, "most unmaps hit a mapping: {h:?}");
    assert!(h.protects_hit * 2 > h.protects, "most protects hit a mapping: {h:?}");
    assert!(
        h.splits > 0 && h.refused_splits > 0 && h.tables_freed > 0 && h.failed_allocations > 0,
        "{h:?}"
    );
    assert!(
        h.page_maps > 0 && h.page_maps_failed > 0 && h.page_unmaps_hit > 0,
        "the single-page paths run, and fail: {h:?}"
    );
    assert!(
        h.left_empty > 0 && h.trims_unlinked > 0 && h.limit_trims > 0,
        "tables are left empty, trimmed, and trimmed over the limit: {h:?}"
    );
}

#[test]
fn sixteen_and_sixty_four_kib_granules() {
    for (granule, block) in [(Granule::Size16K, 32u64 << 20), (Granule::Size64K, 512u64 << 20)] {
        let mut t = table(Stage::Two, granule, 42);
        t.set_bbm_level(2);
        let page = granule.size();
        t.map(Iova(block), PhysAddr(2 * block), block + page, RW).unwrap();
        let mut sizes = Vec::new();
        t.walk(|m| sizes.push(m.size));
        assert_eq!(sizes, [block, page], "{granule:?}");
        assert_eq!(
            t.iova_to_phys(Iova(block + page + 5)),
            Some(PhysAddr(2 * block + page + 5))
        );
        assert_eq!(
            t.map(Iova(page / 2), PhysAddr(0), page, RW),
            Err(MapError::Unaligned {
                iova: page / 2,
                size: page
            })
        );
        let mut g = Gather::default();
        assert_eq!(t.unmap(Iova(block), page, &mut g), Ok(page), "split the block");
        assert_eq!(t.iova_to_phys(Iova(block)), None);
        assert_eq!(t.iova_to_phys(Iova(block + page)), Some(PhysAddr(2 * block + page)));
        release(&mut t, g);
    }
}
