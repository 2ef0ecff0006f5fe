//! The root's marks: [`IoPageTable::walk_exclusive`] reads only the parts of the root a map has reached, so
//! every path that can make a root entry valid must mark its part first. Random maps (exclusive and shared, one
//! page and ranges, blocks where aligned), unmaps, live-update adoptions and exclusive walks, at the root parts'
//! edges and across them, on roots of 2 to 8,192 entries: after each step the exclusive walk finds exactly what
//! the full walk finds, and doing it twice in a row still does (it narrows the marks as it goes).

use super::*;

/// Formats whose roots have few entries (2, 32: a bit an entry), exactly 64, and many (512, 1,024 and 8,192
/// concatenated: several entries a bit).
const SHAPES: [(Stage, Granule, u8); 6] = [
    (Stage::One, Granule::Size4K, 40),
    (Stage::Two, Granule::Size4K, 44),
    (Stage::One, Granule::Size64K, 38),
    (Stage::One, Granule::Size4K, 39),
    (Stage::Two, Granule::Size4K, 40),
    (Stage::Two, Granule::Size16K, 38),
];

#[derive(Clone, Debug)]
enum Step {
    /// Map `pages` granules at `at` (a root part edge, picked below), exclusively or shared.
    Map {
        at: Where,
        pages: u64,
        shared: bool,
    },
    Unmap {
        at: Where,
        pages: u64,
    },
    Adopt,
    Walk,
}

/// An address near a root part's edge: part `part % parts`, `before` granules below its start (wrapping below
/// the space's start to its top).
#[derive(Clone, Copy, Debug)]
struct Where {
    part: usize,
    before: u64,
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    let at = (0usize..64, prop_oneof![Just(0u64), Just(1), 0u64..4]).prop_map(|(part, before)| Where { part, before });
    let pages = prop_oneof![Just(1u64), Just(2), 1u64..600];
    prop_oneof![
        4 => (at.clone(), pages.clone(), any::<bool>()).prop_map(|(at, pages, shared)| Step::Map { at, pages, shared }),
        2 => (at, pages).prop_map(|(at, pages)| Step::Unmap { at, pages }),
        1 => Just(Step::Adopt),
        1 => Just(Step::Walk),
    ]
}

fn run(shape: usize, steps: Vec<Step>) {
    let (stage, granule, bits) = SHAPES[shape];
    let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::default());
    let f = format(stage, granule, bits);
    let mut t = IoPageTable::new(f, frames, true).unwrap();
    let g = *t.geometry();
    let page = 1u64 << g.granule_bits;
    let space = 1u64 << bits;
    let parts = g.root_entries.min(64) as u64;
    let part_bytes = space / parts;
    let address = |w: Where| ((w.part as u64 % parts) * part_bytes).wrapping_sub(w.before * page) & (space - 1);
    let what = std::format!("{stage:?} {granule:?} {bits}");
    for step in steps {
        match step {
            Step::Map { at, pages, shared } => {
                let iova = address(at);
                let size = (pages * page).min(space - iova);
                // Output aligned like the input, so that blocks are used where the range allows.
                let pa = iova & ((1 << 40) - 1);
                let result = if shared {
                    let mut gather = Gather::default();
                    let r = t.map_shared(Iova(iova), PhysAddr(pa), size, RW, &mut gather);
                    release(&mut t, gather);
                    r
                } else {
                    t.map(Iova(iova), PhysAddr(pa), size, RW)
                };
                assert!(
                    matches!(result, Ok(()) | Err(MapError::Overlap { .. })),
                    "{what}: {result:?}"
                );
            }
            Step::Unmap { at, pages } => {
                let iova = address(at);
                let size = (pages * page).min(space - iova);
                let mut gather = Gather::default();
                let _ = t.unmap(Iova(iova), size, &mut gather);
                release(&mut t, gather);
            }
            Step::Adopt => {
                let counts = AdoptedCounts {
                    tables: t.tables(),
                    empty: t.empty_tables(),
                };
                let root = t.root();
                core::mem::forget(t);
                t = IoPageTable::adopt(f, root, frames, true, Some(counts)).unwrap();
            }
            Step::Walk => {}
        }
        for _ in 0..2 {
            let (mut full, mut counted) = (Vec::new(), Vec::new());
            t.walk(|m| full.push((m.iova, m.pa, m.size)));
            t.walk_exclusive(|m| counted.push((m.iova, m.pa, m.size)));
            assert_eq!(counted, full, "{what}: after {step:?}");
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    #[test]
    fn the_exclusive_walk_reads_every_marked_root_part(
        shape in 0..SHAPES.len(),
        steps in proptest::collection::vec(step(), 1..24),
    ) {
        run(shape, steps);
    }
}

/// The point of the marks: after a map at one end of a concatenated root, an exclusive walk reads the root part
/// holding it and no other (the table's other parts hold garbage nothing marked, which a read would report).
#[test]
fn the_exclusive_walk_reads_only_the_marked_part_of_the_root() {
    let mut t = table(Stage::Two, Granule::Size4K, 42);
    let g = *t.geometry();
    assert_eq!(g.root_entries, 4096);
    t.map(Iova(0x4000_0000), PhysAddr(0x8000_1000), 0x1000, RW).unwrap();
    // An entry the walk must not read: in another part (entries 64..128), a block no map wrote.
    let stray = desc::leaf(Stage::Two, 0x40_0000_0000, RW, false);
    t.root_entries()[100].store(stray, Ordering::Relaxed);
    let mut seen = Vec::new();
    t.walk_exclusive(|m| seen.push(m.iova));
    assert_eq!(seen, [0x4000_0000]);
    // The full walk sees it: the exclusive one skipped it by its marks, not by chance.
    let mut all = Vec::new();
    t.walk(|m| all.push(m.iova));
    assert_eq!(all.len(), 2);
    t.root_entries()[100].store(0, Ordering::Relaxed);
}
