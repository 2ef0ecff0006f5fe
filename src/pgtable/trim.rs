//! Lazy freeing and the software state in table descriptors: marking emptied tables, trimming them, and
//! rebuilding counts, full bits and marks from the entries (`recount`).

use super::*;

impl<A: FrameAllocator> IoPageTable<A> {
    /// The last-level table for `iova` has just emptied: mark its descriptor and its ancestors' as leading to a
    /// trim candidate (bottom-up, stopping at the first already marked: a mark implies its ancestors' marks), and
    /// count it.
    #[inline(never)]
    pub(super) fn note_empty(&mut self, iova: u64) {
        self.empty.add(1);
        let g = self.geometry;
        let mut path: heapless::Vec<&AtomicU64, 3> = heapless::Vec::new();
        let mut entries = entries_of(self.root.virt, g.root_entries);
        for level in g.start_level..3 {
            let slot = &entries[g.index(level, iova)];
            let d = slot.load(Ordering::Relaxed);
            if !desc::is_table(d, level) {
                return;
            }
            let _ = path.push(slot);
            let Some(virt) = self.allocator.phys_to_virt(PhysAddr(desc::address(d))) else {
                return;
            };
            entries = entries_of(virt, 1 << g.level_bits);
        }
        for slot in path.iter().rev() {
            let d = slot.load(Ordering::Relaxed);
            if d & desc::SW_TRIM_CANDIDATE != 0 {
                break;
            }
            // A bit the walk ignores: no maintenance, no barrier (as `set_count`).
            slot.store(d | desc::SW_TRIM_CANDIDATE, Ordering::Relaxed);
        }
    }

    /// Unlinks every table that maps nothing (last-level tables emptied by single-page unmaps, and the tables
    /// above them that empty in turn) into `gather`, and returns how many tables it unlinked. As with
    /// [`IoPageTable::unmap`], the tables go back to the allocator only through [`IoPageTable::release`] after
    /// the caller's invalidation of `gather` has completed (walk caches included: [`Gather::tables_unlinked`]).
    /// Every range unmap through [`IoPageTable::unmap`] (one of more than a granule, or one that meets a block)
    /// trims too, into its own gather.
    ///
    /// Cost: it visits only the tables whose descriptors lead to an emptied table (software bit 57,
    /// [`desc::SW_TRIM_CANDIDATE`]); nothing when none is waiting.
    ///
    /// # Errors
    /// [`MapError::ForeignGather`] for a gather another table filled; nothing changes then.
    pub fn trim(&mut self, gather: &mut Gather) -> Result<u32, MapError> {
        self.check_owner(gather)?;
        gather.owner = self.id.0;
        Ok(self.trim_in_place(gather))
    }

    /// Whether more emptied tables wait than the lazy-free limit allows: the single-page [`IoPageTable::unmap`]
    /// trims then; after [`IoPageTable::unmap_without_trim`] the caller should [`IoPageTable::trim`] (into a
    /// gather of its own, flushed at once).
    pub fn trim_due(&self) -> bool {
        self.empty.signed() > self.lazy_limit as i32
    }

    /// `trim` into a gather already checked to be this table's.
    pub(super) fn trim_in_place(&mut self, gather: &mut Gather) -> u32 {
        if self.empty.signed() <= 0 {
            return 0;
        }
        let before = gather.freed;
        let (start, root) = (self.geometry.start_level, self.root.phys.0);
        self.trim_in(start, root, 0, gather);
        self.empty.set(0);
        gather.freed - before
    }

    /// Rebuilds the software state this driver keeps in table descriptors (each table's live-entry count, the
    /// full bit, the trim marks) and the number of emptied tables waiting for a trim, from the entries
    /// themselves. Tables this driver built carry that state in their descriptors, so a table preserved across
    /// a live update needs only the waiting count back; tables written by other code (or whose software bits
    /// were lost) need this whole pass before any other operation. It reads every table twice (first only to
    /// check that the allocator reaches each one) and writes only bits the walk ignores.
    ///
    /// # Errors
    /// [`MapError::NotAdoptable`] with the first table below the root that the allocator cannot reach (its count
    /// cannot be known, and a table taken for empty would be trimmed with its mappings); nothing changes then.
    pub fn recount(&mut self) -> Result<(), MapError> {
        let (start, root) = (self.geometry.start_level, self.root.phys.0);
        self.reachable(start, root)?;
        self.empty.set(0);
        self.tables.set(1);
        self.recount_in(start, root);
        Ok(())
    }

    /// Checks that every table below the table at `table_phys` (at `level`, itself reachable) is reachable.
    pub(super) fn reachable(&self, level: u8, table_phys: u64) -> Result<(), MapError> {
        let Some(virt) = self.allocator.phys_to_virt(PhysAddr(table_phys)) else {
            return Err(MapError::NotAdoptable(PhysAddr(table_phys)));
        };
        for entry in entries_of(virt, self.geometry.entries(level)) {
            let d = entry.load(Ordering::Relaxed);
            if !desc::is_table(d, level) {
                continue;
            }
            let child = desc::address(d);
            if level + 1 < 3 {
                self.reachable(level + 1, child)?;
            } else if self.allocator.phys_to_virt(PhysAddr(child)).is_none() {
                return Err(MapError::NotAdoptable(PhysAddr(child)));
            }
        }
        Ok(())
    }

    /// Recounts below the table at `table_phys` (at `level`): its valid entries, whether an empty table lies
    /// below it, and whether it holds a table descriptor (for [`desc::SW_NO_TABLES`], set exactly here).
    pub(super) fn recount_in(&mut self, level: u8, table_phys: u64) -> (usize, bool, bool) {
        let Some(virt) = self.allocator.phys_to_virt(PhysAddr(table_phys)) else {
            return (0, false, true);
        };
        let entries = entries_of(virt, self.geometry.entries(level));
        let (mut valid, mut empty_below, mut holds_table) = (0, false, false);
        for entry in entries {
            let d = entry.load(Ordering::Relaxed);
            if !desc::is_valid(d) {
                continue;
            }
            valid += 1;
            if !desc::is_table(d, level) {
                continue;
            }
            holds_table = true;
            self.tables.add(1);
            let (n, below, tables) = if level + 1 < 3 {
                self.recount_in(level + 1, desc::address(d))
            } else {
                let child = self.allocator.phys_to_virt(PhysAddr(desc::address(d))).map_or(0, |c| {
                    entries_of(c, 1 << self.geometry.level_bits)
                        .iter()
                        .filter(|e| desc::is_valid(e.load(Ordering::Relaxed)))
                        .count()
                });
                (child, false, true)
            };
            if n == 0 {
                self.empty.add(1);
            }
            let mark = n == 0 || below;
            let d = self.with_count(d & !(desc::SW_TRIM_CANDIDATE | desc::SW_NO_TABLES), level + 1, n);
            let d = if mark { d | desc::SW_TRIM_CANDIDATE } else { d };
            entry.store(if tables { d } else { d | desc::SW_NO_TABLES }, Ordering::Relaxed);
            empty_below |= mark;
        }
        (valid, empty_below, holds_table)
    }

    /// Trims below the table at `table_phys` (at `level`, covering from `table_base`); returns how many of its
    /// entries it removed.
    pub(super) fn trim_in(&mut self, level: u8, table_phys: u64, table_base: u64, gather: &mut Gather) -> usize {
        let Some(virt) = self.allocator.phys_to_virt(PhysAddr(table_phys)) else {
            return 0;
        };
        let entries = entries_of(virt, self.geometry.entries(level));
        let shift = self.geometry.entry_shift(level);
        let mut removed = 0;
        for (i, entry) in entries.iter().enumerate() {
            let d = entry.load(Ordering::Relaxed);
            if !desc::is_table(d, level) || d & desc::SW_TRIM_CANDIDATE == 0 {
                continue;
            }
            let entry_base = table_base + ((i as u64) << shift);
            let mut left = desc::count(d);
            if level + 1 < 3 {
                left = left.saturating_sub(self.trim_in(level + 1, desc::address(d), entry_base, gather));
            }
            if left == 0 {
                self.forget_if_empty(d);
                self.store(entry, 0);
                self.free_later(desc::address(d), gather);
                // Walk caches may hold the unlinked table: its span is invalidated, though nothing is mapped there.
                gather.add_run(entry_base, entry_base + (1 << shift), self.geometry.granule_bits, 0);
                removed += 1;
            } else {
                entry.store(
                    self.with_count(d & !desc::SW_TRIM_CANDIDATE, level + 1, left),
                    Ordering::Relaxed,
                );
            }
        }
        removed
    }
}
