//! loom models of the concurrent page-table paths (`RUSTFLAGS="--cfg loom" cargo test --release -p smmuv3 --lib
//! pgtable::loom`; `cargo xtask test` runs them with a preemption bound). The tables are tiny (two entries per
//! table) and their frames are loom atomics, so that loom explores every interleaving of the very code the
//! driver runs, and every outcome its memory orderings allow.
//!
//! Each model checks, after the threads join, the whole table ([`check`]: every count is the number of valid
//! entries, full bits and trim marks agree, the table's numbers of tables and of waiting tables are right), the
//! leaves, what each call returned, and that every frame is linked, waits in a gather, or went back once.

extern crate std;

use std::boxed::Box;
use std::sync::{Arc, Mutex};
use std::vec::Vec;

use loom::thread;

use super::checks::check;
use super::*;

const RW: Prot = Prot::READ.union(Prot::WRITE).union(Prot::CACHEABLE);
const PAGE: u64 = 0x1000;

/// Frames made of loom atomics: each holds at most [`ENTRIES`] words (the models' tables have two entries).
/// Physical addresses are page-aligned numbers far from the CPU addresses; a frame freed twice, or one unknown,
/// panics, and a freed frame is never reached again.
struct LoomFrames {
    frames: Mutex<Vec<Frame>>,
}

struct Frame {
    phys: u64,
    words: Box<[AtomicU64]>,
    live: bool,
}

/// Words per frame.
const ENTRIES: usize = 4;

impl LoomFrames {
    fn new() -> Self {
        LoomFrames {
            frames: Mutex::new(Vec::new()),
        }
    }

    fn live(&self) -> usize {
        self.frames.lock().unwrap().iter().filter(|f| f.live).count()
    }
}

// SAFETY: every frame is a distinct boxed array of zeroed atomics, page-aligned in its (fake) physical address,
// live until freed; its memory is kept (and never handed out again) after it is freed.
unsafe impl FrameAllocator for LoomFrames {
    fn allocate_zeroed(&self, size: usize, _align: usize) -> Result<DmaBlock, AllocError> {
        let words: Box<[AtomicU64]> = (0..ENTRIES.min(size / 8)).map(|_| AtomicU64::new(0)).collect();
        let mut frames = self.frames.lock().unwrap();
        let phys = (1 << 40) + (frames.len() as u64 + 1) * 0x10_0000;
        let virt = NonNull::new(words.as_ptr() as *mut u8).unwrap();
        frames.push(Frame {
            phys,
            words,
            live: true,
        });
        Ok(DmaBlock {
            phys: PhysAddr(phys),
            virt,
            size,
        })
    }

    fn phys_to_virt(&self, phys: PhysAddr) -> Option<NonNull<u8>> {
        let frames = self.frames.lock().unwrap();
        let frame = frames
            .iter()
            .find(|f| f.live && (f.phys..f.phys + 8 * f.words.len() as u64).contains(&phys.0))?;
        let word = &frame.words[((phys.0 - frame.phys) / 8) as usize];
        NonNull::new(core::ptr::from_ref(word) as *mut u8)
    }

    unsafe fn free(&self, block: DmaBlock) {
        let mut frames = self.frames.lock().unwrap();
        let frame = frames
            .iter_mut()
            .find(|f| f.phys == block.phys.0)
            .expect("free of a frame this allocator never handed out");
        assert!(frame.live, "frame {:#x} freed twice", frame.phys);
        assert_eq!(
            frame.words.as_ptr() as *mut u8,
            block.virt.as_ptr(),
            "a frame freed with another address"
        );
        frame.live = false;
    }
}

/// A table with `levels` levels (2: the root at level 2; 3: at level 1) of two entries each, 4 KiB pages.
fn tiny(frames: &'static LoomFrames, levels: u8) -> IoPageTable<&'static LoomFrames> {
    let start_level = 4 - levels;
    let format = Format {
        stage: Stage::One,
        granule: Granule::Size4K,
        input_bits: 12 + levels,
        output_bits: 44,
    };
    let geometry = Geometry {
        granule_bits: 12,
        level_bits: 1,
        start_level,
        root_entries: 2,
    };
    let root = frames.allocate_zeroed(4096, 4096).unwrap();
    IoPageTable {
        id: TableId::next(),
        format,
        geometry,
        root,
        allocator: frames,
        coherency: Coherency { coherent: true },
        tables: Counter::new(1),
        split_blocks: false,
        empty: Counter::new(0),
        lazy_limit: DEFAULT_LAZY_FREE_LIMIT,
        last_prot: None,
        last_template: 0,
        root_marks: core::sync::atomic::AtomicU64::new(0),
    }
}

/// Runs `f` under loom with the preemption bound of `LOOM_MAX_PREEMPTIONS`, 3 when it is not set.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

/// A frame allocator for one execution of a model (leaked: loom runs the model many times, each small).
fn frames() -> &'static LoomFrames {
    Box::leak(Box::new(LoomFrames::new()))
}

fn release(t: &mut IoPageTable<&'static LoomFrames>, gather: Gather) {
    // SAFETY: no SMMU walks a model's tables.
    unsafe { t.release(gather) }.unwrap();
}

/// The tables (level, physical address) the walk to `iova` goes through below the root.
fn tables_to(t: &IoPageTable<&'static LoomFrames>, iova: u64) -> Vec<(u8, u64)> {
    let g = *t.geometry();
    let mut out = Vec::new();
    let (mut level, mut phys) = (g.start_level, t.root().0);
    while level < 3 {
        let d = t.table_entries(level, phys).unwrap()[g.index(level, iova)].load(Ordering::Relaxed);
        if !desc::is_table(d, level) {
            break;
        }
        (level, phys) = (level + 1, desc::address(d));
        out.push((level, phys));
    }
    out
}

/// Drops the table and checks that every frame went back exactly once.
fn finish(t: IoPageTable<&'static LoomFrames>, frames: &LoomFrames) {
    drop(t);
    assert_eq!(frames.live(), 0, "a frame leaked");
}

/// Two threads map the two pages of a last-level table that does not exist yet: both build one, one links it,
/// the other frees its own (never seen by anyone) and maps into the winner's. Both pages end up mapped in one
/// table whose count is 2 (and full).
#[test]
fn loom_two_maps_install_one_table() {
    model(|| {
        let frames = frames();
        let t = Arc::new(tiny(frames, 2));
        let threads: Vec<_> = [0, 1]
            .map(|k| {
                let t = t.clone();
                thread::spawn(move || {
                    t.map_shared(
                        Iova(k * PAGE),
                        PhysAddr(0x8000_0000 + k * PAGE),
                        PAGE,
                        RW,
                        &mut Gather::default(),
                    )
                })
            })
            .into_iter()
            .collect();
        for thread in threads {
            assert_eq!(thread.join().unwrap(), Ok(()));
        }
        let t = Arc::into_inner(t).unwrap();
        let found = check(&t);
        assert_eq!(found.leaves.len(), 2);
        assert_eq!(found.leaves[&PAGE], (0x8000_1000, PAGE));
        assert_eq!(
            (found.tables, found.empty, frames.live()),
            (2, 0, 2),
            "the loser's table went back"
        );
        let d = t.root_entries()[0].load(Ordering::Relaxed);
        assert_eq!((desc::count(d), d & desc::SW_TABLE_FULL != 0), (2, true));
        finish(t, frames);
    });
}

/// A map into an emptied last-level table races a trim of it: either the map reserved its entry first (the
/// trim leaves the table) or the trim unlinked it first (the map walks again and links a new one). Never a leaf
/// in an unlinked table, never a lost count.
#[test]
fn loom_a_map_races_a_trim_of_its_emptied_table() {
    for levels in [2, 3] {
        model(move || {
            let frames = frames();
            let t = tiny(frames, levels);
            let mut gather = Gather::default();
            t.map_shared(Iova(0), PhysAddr(0x8000_0000), PAGE, RW, &mut gather)
                .unwrap();
            assert_eq!(t.unmap_page_shared(Iova(0), &mut gather), Ok(PAGE));
            assert_eq!(t.empty_tables(), 1);
            let before = tables_to(&t, 0);
            assert_eq!(before.len(), usize::from(levels) - 1);
            let t = Arc::new(t);
            let mapper = {
                let t = t.clone();
                thread::spawn(move || t.map_shared(Iova(PAGE), PhysAddr(0x8000_1000), PAGE, RW, &mut Gather::default()))
            };
            let trimmer = {
                let t = t.clone();
                thread::spawn(move || {
                    let mut trimmed = Gather::default();
                    let n = t.trim_shared(&mut trimmed).unwrap();
                    (n, trimmed)
                })
            };
            assert_eq!(mapper.join().unwrap(), Ok(()));
            let (unlinked, trimmed) = trimmer.join().unwrap();
            let mut t = Arc::into_inner(t).unwrap();
            assert_eq!(
                t.iova_to_phys(Iova(PAGE + 8)),
                Some(PhysAddr(0x8000_1008)),
                "the map's leaf is reachable"
            );
            let found = check(&t);
            assert_eq!(found.leaves.len(), 1);
            assert_eq!(trimmed.freed_tables(), unlinked);
            // The tables the trim unlinked (the map walked again and linked new ones) hold no valid entry (the
            // chain link in word 0 is never one); those the map reserved an entry in first stay.
            let after = tables_to(&t, PAGE);
            let gone: Vec<_> = before.iter().filter(|b| !after.contains(b)).collect();
            assert_eq!(gone.len() as u32, unlinked);
            for &&(level, phys) in &gone {
                let entries = t.table_entries(level, phys).unwrap();
                assert!(entries.iter().all(|e| !desc::is_valid(e.load(Ordering::Relaxed))));
            }
            assert_eq!(frames.live(), (found.tables + unlinked) as usize);
            release(&mut t, gather);
            release(&mut t, trimmed);
            assert_eq!(frames.live(), found.tables as usize);
            finish(t, frames);
        });
    }
}

/// A map and an unmap of one page race, the page unmapped at first (and mapped at first): the unmap removes it
/// only if the map came first; the count follows.
#[test]
fn loom_a_map_races_an_unmap_of_the_same_page() {
    for mapped_first in [false, true] {
        model(move || {
            let frames = frames();
            let t = tiny(frames, 2);
            let mut gather = Gather::default();
            // The other page keeps the table alive either way.
            t.map_shared(Iova(PAGE), PhysAddr(0x9000_0000), PAGE, RW, &mut gather)
                .unwrap();
            if mapped_first {
                t.map_shared(Iova(0), PhysAddr(0x8000_0000), PAGE, RW, &mut gather)
                    .unwrap();
            }
            let t = Arc::new(t);
            let mapper = {
                let t = t.clone();
                thread::spawn(move || t.map_shared(Iova(0), PhysAddr(0xa000_0000), PAGE, RW, &mut Gather::default()))
            };
            let unmapper = {
                let t = t.clone();
                thread::spawn(move || {
                    let mut removed = Gather::default();
                    let bytes = t.unmap_page_shared(Iova(0), &mut removed).unwrap();
                    (bytes, removed)
                })
            };
            let mapped = mapper.join().unwrap();
            let (unmapped, removed) = unmapper.join().unwrap();
            let mut t = Arc::into_inner(t).unwrap();
            let now = t.iova_to_phys(Iova(0));
            match (mapped_first, mapped, unmapped) {
                // Unmapped at first: the unmap came first (nothing to remove), or second (removes the map's).
                (false, Ok(()), 0) => assert_eq!(now, Some(PhysAddr(0xa000_0000))),
                (false, Ok(()), PAGE) => assert_eq!(now, None),
                // Mapped at first: the unmap always removes a page; the map succeeds only after it.
                (true, Ok(()), PAGE) => assert_eq!(now, Some(PhysAddr(0xa000_0000))),
                (true, Err(MapError::Overlap { iova: 0 }), PAGE) => assert_eq!(now, None),
                other => panic!("an outcome no order of the two explains: {other:?}"),
            }
            assert_eq!(removed.leaves(), u32::from(unmapped == PAGE));
            check(&t);
            release(&mut t, gather);
            release(&mut t, removed);
            finish(t, frames);
        });
    }
}

/// Two unmaps of one mapped page: exactly one removes it, and the count drops once (to 0: the table waits for
/// a trim, marked).
#[test]
fn loom_two_unmaps_of_one_page_remove_it_once() {
    model(|| {
        let frames = frames();
        let t = tiny(frames, 2);
        t.map_shared(Iova(0), PhysAddr(0x8000_0000), PAGE, RW, &mut Gather::default())
            .unwrap();
        let t = Arc::new(t);
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let t = t.clone();
                thread::spawn(move || {
                    let mut removed = Gather::default();
                    let bytes = t.unmap_page_shared(Iova(0), &mut removed).unwrap();
                    (bytes, removed)
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let mut t = Arc::into_inner(t).unwrap();
        let bytes: Vec<u64> = results.iter().map(|r| r.0).collect();
        assert!(
            bytes == [PAGE, 0] || bytes == [0, PAGE],
            "one owner of the removal: {bytes:?}"
        );
        let found = check(&t);
        assert!(found.leaves.is_empty());
        assert_eq!((found.tables, found.empty), (2, 1));
        let d = t.root_entries()[0].load(Ordering::Relaxed);
        assert_eq!((desc::count(d), d & desc::SW_TRIM_CANDIDATE != 0), (0, true));
        for (_, gather) in results {
            release(&mut t, gather);
        }
        finish(t, frames);
    });
}

/// Two maps of one page with different outputs: exactly one succeeds, the other gets `Overlap`; the leaf is the
/// winner's and the count 1.
#[test]
fn loom_two_maps_of_one_page_have_one_winner() {
    model(|| {
        let frames = frames();
        let t = Arc::new(tiny(frames, 2));
        let threads: Vec<_> = [0x8000_0000u64, 0x9000_0000]
            .map(|pa| {
                let t = t.clone();
                thread::spawn(move || {
                    (
                        pa,
                        t.map_shared(Iova(0), PhysAddr(pa), PAGE, RW, &mut Gather::default()),
                    )
                })
            })
            .into_iter()
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let t = Arc::into_inner(t).unwrap();
        let winners: Vec<u64> = results.iter().filter(|r| r.1.is_ok()).map(|r| r.0).collect();
        assert_eq!(winners.len(), 1, "{results:?}");
        assert!(results.iter().any(|r| r.1 == Err(MapError::Overlap { iova: 0 })));
        assert_eq!(t.iova_to_phys(Iova(0)), Some(PhysAddr(winners[0])));
        let found = check(&t);
        assert_eq!((found.leaves.len(), found.tables, frames.live()), (1, 2, 2));
        finish(t, frames);
    });
}
