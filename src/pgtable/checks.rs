//! The software state the concurrent paths keep, checked once they are all over (host stress tests and loom
//! models).

extern crate std;

use std::collections::BTreeMap;

use super::*;

/// What [`check`] found: every leaf (its first address → output, size), linked tables (root included) and linked
/// tables whose count is 0.
pub(super) struct Found {
    pub(super) leaves: BTreeMap<u64, (u64, u64)>,
    pub(super) tables: u32,
    pub(super) empty: u32,
}

/// Walks the whole table and asserts the software state the concurrent paths keep, once they are all over: every
/// table descriptor's count is the number of valid entries of the table it names; the full bit is set exactly on
/// a last-level table whose every entry is valid (and then every entry is a page); a table whose count is 0 is
/// marked as a trim candidate, and so is every descriptor above it; a table marked as holding no table
/// ([`desc::SW_NO_TABLES`]) holds none and is above the last level; the table's own numbers of tables and of
/// waiting tables are what the walk finds.
pub(super) fn check<A: FrameAllocator>(t: &IoPageTable<A>) -> Found {
    fn go<A: FrameAllocator>(
        t: &IoPageTable<A>,
        level: u8,
        phys: u64,
        base: u64,
        marked: bool,
        found: &mut Found,
    ) -> usize {
        let g = *t.geometry();
        let entries = t
            .table_entries(level, phys)
            .expect("a linked table the allocator knows");
        let shift = g.entry_shift(level);
        let mut valid = 0;
        for (i, e) in entries.iter().enumerate() {
            let d = e.load(Ordering::Relaxed);
            if !desc::is_valid(d) {
                continue;
            }
            valid += 1;
            let va = base + ((i as u64) << shift);
            if !desc::is_table(d, level) {
                assert!(level == 3 || g.block_allowed(level), "a block where none is allowed");
                assert!(
                    level < 3 || d & desc::TABLE_OR_PAGE != 0,
                    "a level-3 entry that is not a page"
                );
                found.leaves.insert(va, (desc::address(d), 1 << shift));
                continue;
            }
            found.tables += 1;
            if d & desc::SW_NO_TABLES != 0 {
                let below = t.table_entries(level + 1, desc::address(d)).expect("a linked table");
                assert!(
                    level + 1 < 3
                        && !below
                            .iter()
                            .any(|e| desc::is_table(e.load(Ordering::Relaxed), level + 1)),
                    "the level-{} table at {va:#x} is marked as holding no table",
                    level + 1
                );
            }
            let child_marked = marked && d & desc::SW_TRIM_CANDIDATE != 0;
            let n = go(t, level + 1, desc::address(d), va, child_marked, found);
            assert_eq!(
                desc::count(d),
                n,
                "the count of the level-{} table at {va:#x}",
                level + 1
            );
            let size = 1usize << g.level_bits;
            assert_eq!(
                d & desc::SW_TABLE_FULL != 0,
                level + 1 == 3 && n == size,
                "the full bit of the level-{} table at {va:#x}",
                level + 1
            );
            if n == 0 {
                found.empty += 1;
                assert!(
                    child_marked,
                    "the empty level-{} table at {va:#x} is not marked",
                    level + 1
                );
            }
        }
        valid
    }
    let mut found = Found {
        leaves: BTreeMap::new(),
        tables: 1,
        empty: 0,
    };
    go(t, t.geometry().start_level, t.root().0, 0, true, &mut found);
    assert_eq!(t.tables(), found.tables, "tables in use");
    assert_eq!(t.empty_tables(), found.empty, "emptied tables waiting");
    found
}
