//! Unmapping and reprotecting: the single-page path, and the range path that splits blocks (BBML = 2), unlinks
//! emptied tables into the gather and counts the pages of whole subtrees without rewriting them.

use super::*;

impl<A: FrameAllocator> IoPageTable<A> {
    /// Unmaps the granule at `iova` (checked by `unmap`) with one descent from the root: `None` when a block maps
    /// it (the range path splits or refuses it). A last-level table that this empties stays linked and waits
    /// for [`IoPageTable::trim`], unless more than the lazy-free limit already wait: then this trims, when
    /// `TRIM`.
    #[inline]
    pub(super) fn unmap_page<const TRIM: bool>(&mut self, iova: u64, gather: &mut Gather) -> Option<u64> {
        let g = self.geometry;
        let mut parent: Option<&AtomicU64> = None;
        let mut level = g.start_level;
        let mut entries = entries_of(self.root.virt, g.root_entries);
        let (mut shift, mut mask) = (g.entry_shift(level), g.root_entries - 1);
        loop {
            let slot = &entries[(iova >> shift) as usize & mask];
            let d = slot.load(Ordering::Relaxed);
            if !desc::is_valid(d) {
                return Some(0);
            }
            if level == 3 {
                break;
            }
            if !desc::is_table(d, level) {
                return None;
            }
            let virt = self.allocator.phys_to_virt(PhysAddr(desc::address(d)))?;
            parent = Some(slot);
            entries = entries_of(virt, 1 << g.level_bits);
            level += 1;
            (shift, mask) = (shift - g.level_bits, (1 << g.level_bits) - 1);
        }
        let slot = &entries[(iova >> shift) as usize & mask];
        self.store(slot, 0);
        gather.add(iova, 1 << g.granule_bits, g.granule_bits);
        if let Some(parent) = parent {
            // One entry fewer: the count goes down (a borrow-free subtraction in its low bits when they are not
            // zero) and the table is no longer full.
            let p = parent.load(Ordering::Relaxed) & !desc::SW_TABLE_FULL;
            let p = if p & desc::SW_COUNT_LOW != 0 {
                p - (1 << 2)
            } else {
                desc::with_count(p, desc::count(p).saturating_sub(1))
            };
            parent.store(p, Ordering::Relaxed);
            if p & (desc::SW_COUNT_LOW | desc::SW_COUNT_HIGH) == 0 {
                self.note_empty(iova);
            }
        }
        if TRIM && self.trim_due() {
            self.trim_in_place(gather);
        }
        Some(1 << g.granule_bits)
    }

    /// Unmaps every mapping inside `[iova, iova + size)` and returns the bytes unmapped. A block that straddles an
    /// end is split in place only when [`IoPageTable::set_bbm_level`] allowed it (BBML = 2).
    ///
    /// The caller invalidates: the removed translations (and any unlinked table's span, for walk caches) are
    /// added to `gather`, and the SMMU may keep using them until the caller has issued that invalidation and its
    /// CMD_SYNC has completed (`Iommu::flush` does both). Tables that emptied are unlinked but not freed:
    /// they go back to the allocator only through [`IoPageTable::release`], to be called after that completion.
    /// The first use stamps `gather` with this table's identity (see [`Gather`]).
    ///
    /// An unmap of exactly one granule takes the single-page path: a last-level table it empties stays linked
    /// until the next [`IoPageTable::trim`] (or range unmap), unless the lazy-free limit is exceeded. Any other
    /// unmap also trims. Returns 0 (and gathers nothing) where nothing was mapped.
    ///
    /// # Errors
    /// [`MapError::Unaligned`], [`MapError::InputOutOfRange`], [`MapError::WouldSplitBlock`] (a cut block without
    /// BBML = 2), [`MapError::NoMemory`] (for splitting a block), [`MapError::ForeignGather`] (a gather another
    /// table filled); nothing changes then, `gather` included.
    #[inline]
    pub fn unmap(&mut self, iova: Iova, size: u64, gather: &mut Gather) -> Result<u64, MapError> {
        let iova = iova.0;
        self.unmap_in::<true>(iova, size, gather)
    }

    /// [`IoPageTable::unmap`] without any trim: `gather` gets only what the range itself removes (with the tables
    /// the range empties, unlinked as by `unmap`, and their spans), never a table that a trim unlinked elsewhere; a
    /// single-page unmap leaves the table it empties linked even past the lazy-free limit, and the caller trims
    /// when [`IoPageTable::trim_due`] says so. For a gather whose invalidation is deferred.
    ///
    /// # Errors
    /// As [`IoPageTable::unmap`].
    #[inline]
    pub fn unmap_without_trim(&mut self, iova: Iova, size: u64, gather: &mut Gather) -> Result<u64, MapError> {
        let iova = iova.0;
        self.unmap_in::<false>(iova, size, gather)
    }

    #[inline(always)]
    pub(super) fn unmap_in<const TRIM: bool>(
        &mut self,
        iova: u64,
        size: u64,
        gather: &mut Gather,
    ) -> Result<u64, MapError> {
        self.check_owner(gather)?;
        let granule = 1u64 << self.geometry.granule_bits;
        if size == granule
            && iova & (granule - 1) == 0
            && iova >> self.format.input_bits == 0
            && let Some(bytes) = self.unmap_page::<TRIM>(iova, gather)
        {
            gather.owner = self.id.0;
            return Ok(bytes);
        }
        let bytes = self.change(iova, size, gather, None, TRIM)?;
        gather.owner = self.id.0;
        Ok(bytes)
    }

    /// Gives every mapping inside `[iova, iova + size)` the protection `prot` and returns the bytes of mappings
    /// changed. A block that straddles an end is split in place only when [`IoPageTable::set_bbm_level`] allowed
    /// it (BBML = 2). Only permissions change in place: the memory type (Device, Normal non-cacheable, Normal
    /// cacheable) of a live mapping is never changed, as that needs break-before-make.
    ///
    /// The caller invalidates: the translations whose protection changed go to `gather`, and a reduction is in
    /// force only once the caller's invalidation for it has completed (`Iommu::flush`).
    ///
    /// # Errors
    /// [`MapError::Unaligned`], [`MapError::InputOutOfRange`], [`MapError::BadProt`] (inexpressible, or another
    /// memory type than a mapping in the range has), [`MapError::WouldSplitBlock`], [`MapError::NoMemory`] (for
    /// splitting a block), [`MapError::ForeignGather`]; nothing changes then, `gather` included.
    pub fn protect(&mut self, iova: Iova, size: u64, prot: Prot, gather: &mut Gather) -> Result<u64, MapError> {
        let iova = iova.0;
        self.check_owner(gather)?;
        if !self.expressible(prot) {
            return Err(MapError::BadProt(prot));
        }
        self.check_range(iova, size)?;
        // A memory-type change on a live leaf needs break-before-make: refuse it before anything changes.
        let (stage, wanted) = (self.format.stage, MemoryType::of(prot));
        let mut other_type = false;
        self.visit(
            self.geometry.start_level,
            self.root_entries(),
            0,
            &mut |_, d| other_type |= Some(desc::memory_type(stage, d)) != wanted,
            Some((iova, iova + size)),
        );
        if other_type {
            return Err(MapError::BadProt(prot));
        }
        let bytes = self.change(iova, size, gather, Some(prot), false)?;
        gather.owner = self.id.0;
        Ok(bytes)
    }

    pub(super) fn expressible(&self, prot: Prot) -> bool {
        desc::expressible(self.format.stage, prot)
    }

    #[inline(never)]
    pub(super) fn change(
        &mut self,
        iova: u64,
        size: u64,
        gather: &mut Gather,
        reprotect: Option<Prot>,
        trim: bool,
    ) -> Result<u64, MapError> {
        self.check_range(iova, size)?;
        // Splitting the blocks that straddle the range's ends needs at most one table per level below each:
        // allocate them first, so that running out of memory changes nothing.
        let needed = self.splits_needed(iova) + self.splits_needed(iova + size);
        if needed > 0 && !self.split_blocks {
            let cut = if self.splits_needed(iova) > 0 {
                iova
            } else {
                iova + size
            };
            return Err(MapError::WouldSplitBlock { iova: cut });
        }
        let mut reserve: heapless::Vec<DmaBlock, 8> = heapless::Vec::new();
        if needed > 0 {
            self.zeroed_frames_into(needed, &mut reserve)?;
        }
        let root = self.root.phys.0;
        let (unmapped, _, _) = self.change_in(
            self.geometry.start_level,
            root,
            0,
            iova,
            iova + size,
            gather,
            &mut reserve,
            reprotect,
        );
        // Popped in place, not iterated by value (which would copy the whole vector first).
        while let Some(t) = reserve.pop() {
            // SAFETY: never published.
            unsafe { self.allocator.free(t) };
        }
        if trim {
            self.trim_in_place(gather);
        }
        // No barrier here: the caller's invalidation orders these stores before its command queue's PROD write
        // (see the module documentation).
        Ok(unmapped)
    }

    /// Tables needed to split the block (if any) that maps `address` without starting at it. One descent from the
    /// root (through `root.virt`, not a translation of its physical address), reading one entry per level until
    /// the level whose entries `address` is aligned to: an address on a block boundary reads only the tables
    /// above that level.
    #[inline]
    pub(super) fn splits_needed(&self, address: u64) -> usize {
        let g = self.geometry;
        let mut level = g.start_level;
        let mut entries = self.root_entries();
        let (mut shift, mut mask) = (g.entry_shift(level), g.root_entries - 1);
        loop {
            if address & ((1 << shift) - 1) == 0 {
                // Aligned to this level's entries, so to every level's below: no block here or below starts
                // before it, and nothing needs reading.
                return 0;
            }
            // Relaxed: the callers hold `&mut self`, so no other CPU writes these tables.
            let d = entries[(address >> shift) as usize & mask].load(Ordering::Relaxed);
            if level == 3 || !desc::is_valid(d) {
                return 0;
            }
            if !desc::is_table(d, level) {
                // A block that starts before `address` (checked above): split down to the level whose entries
                // the address is aligned to.
                let target = (level + 1..=3)
                    .find(|&l| address.is_multiple_of(1 << g.entry_shift(l)))
                    .unwrap_or(3);
                return usize::from(target - level);
            }
            let Some(virt) = self.allocator.phys_to_virt(PhysAddr(desc::address(d))) else {
                return 0;
            };
            entries = entries_of(virt, 1 << g.level_bits);
            level += 1;
            (shift, mask) = (shift - g.level_bits, (1 << g.level_bits) - 1);
        }
    }

    /// Unmaps (or, with `reprotect`, reprotects) `[start, end)` inside the table at `table_phys` (covering from
    /// `table_base`). Returns the bytes of mappings removed or changed, how many of the table's entries became
    /// invalid (for its count), and whether a block split linked a table into it (which clears its
    /// [`desc::SW_NO_TABLES`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn change_in(
        &mut self,
        level: u8,
        table_phys: u64,
        table_base: u64,
        start: u64,
        end: u64,
        gather: &mut Gather,
        reserve: &mut heapless::Vec<DmaBlock, 8>,
        reprotect: Option<Prot>,
    ) -> (u64, usize, bool) {
        let shift = self.geometry.entry_shift(level);
        let entry_size = 1u64 << shift;
        let count = self.geometry.entries(level);
        let Some(virt) = self.allocator.phys_to_virt(PhysAddr(table_phys)) else {
            return (0, 0, false);
        };
        let entries = entries_of(virt, count);
        let (mut removed, mut linked) = (0, false);
        let table_end = table_base.saturating_add(entry_size * count as u64);
        let first = ((start.max(table_base) - table_base) >> shift) as usize;
        let last = (((end.min(table_end) - 1) - table_base) >> shift) as usize;
        let mut unmapped = 0;
        // Whether leaves were cleared in this table: they are cleaned once, after the loop (and gathered in `span`).
        let mut cleared = false;
        // What this table's entries add to `gather` (the tables below add theirs themselves), added once after the
        // loop: the same union, without a read-modify-write of the gather per entry.
        let mut span = Span::EMPTY;
        // Fast path (an unmap): the entries wholly inside the range, when none of them is a table, are cleared in
        // one pass of plain loads and stores; the loop below then sees only the entries at the range's ends.
        let covered_first = first + usize::from(start > table_base + ((first as u64) << shift));
        let covered_last = if end >= table_base + ((last as u64 + 1) << shift) {
            Some(last)
        } else {
            last.checked_sub(1)
        };
        // The entries the loop below skips (none unless the fast path cleared them).
        let mut skip = (last + 1, last + 1);
        if reprotect.is_none()
            && let Some(covered_last) = covered_last
            && covered_first <= covered_last
            && let Some((lo, hi, n)) = clear_leaves(&entries[covered_first..=covered_last], level)
        {
            skip = (covered_first, covered_last + 1);
            if n > 0 {
                let base = |k: usize| table_base + (((covered_first + k) as u64) << shift);
                span.add(base(lo), base(hi) + entry_size, shift, n as u32);
                cleared = true;
                removed += n;
                unmapped += n as u64 * entry_size;
            }
        }
        let mut i = first;
        while i <= last {
            if i == skip.0 {
                i = skip.1;
                continue;
            }
            let entry = &entries[i];
            let entry_base = table_base + ((i as u64) << shift);
            i += 1;
            let d = entry.load(Ordering::Acquire);
            if !desc::is_valid(d) {
                continue;
            }
            let covered = start <= entry_base && entry_base + entry_size <= end;
            if covered
                && !desc::is_table(d, level)
                && let Some(prot) = reprotect
            {
                // A leaf inside the range keeps its output address and level, with the new protection.
                let new = desc::leaf(self.format.stage, desc::address(d), prot, level == 3);
                if new != d {
                    self.store(entry, new);
                    span.add(entry_base, entry_base + entry_size, shift, 1);
                }
                unmapped += entry_size;
                continue;
            }
            if covered && reprotect.is_none() {
                removed += 1;
                if desc::is_table(d, level) {
                    self.forget_if_empty(d);
                    self.store(entry, 0);
                    // The whole subtree goes: count its leaves and collect its tables without rewriting them.
                    let (bytes, smallest) = self.reclaim(level + 1, d, gather);
                    // Always: walk caches may hold the unlinked table even if it mapped nothing.
                    span.add(entry_base, entry_base + entry_size, smallest, 1);
                    unmapped += bytes;
                } else {
                    // Cleaned with the rest of the run after the loop; ordered by the barrier that ends `unmap`.
                    entry.store(0, Ordering::Relaxed);
                    span.add(entry_base, entry_base + entry_size, shift, 1);
                    cleared = true;
                    unmapped += entry_size;
                }
                continue;
            }
            if reprotect.is_none() && desc::is_table(d, level) {
                let (from, to) = (start.max(entry_base), end.min(entry_base + entry_size));
                if let Some(n) = self.empties_whole(level + 1, d, entry_base, from, to) {
                    // Every entry of the table below goes: it is unlinked whole, its leaves left in place (as for
                    // a table the range covers whole), and freed with the rest after the invalidation.
                    self.store(entry, 0);
                    self.free_later(desc::address(d), gather);
                    let child_shift = self.geometry.entry_shift(level + 1);
                    span.add(from, to, child_shift, n as u32);
                    // Walk caches may hold the unlinked table: its whole span.
                    span.add(entry_base, entry_base + entry_size, self.geometry.granule_bits, 0);
                    removed += 1;
                    unmapped += (n as u64) << child_shift;
                    continue;
                }
            }
            let (next, before) = if desc::is_table(d, level) {
                (desc::address(d), desc::count(d))
            } else {
                // A block straddling the range: replace it with a table of the same mappings, then recurse.
                let Some(table) = reserve.pop() else { continue };
                let sub = entries_of(table.virt, 1 << self.geometry.level_bits);
                let child_shift = self.geometry.entry_shift(level + 1);
                // The block's own attribute bits, copied (not re-derived from a `Prot`), with the page bit at
                // level 3.
                let attributes = (d & !desc::OUTPUT_ADDRESS & !desc::TABLE_OR_PAGE)
                    | if level + 1 == 3 { desc::TABLE_OR_PAGE } else { 0 };
                for (j, e) in sub.iter().enumerate() {
                    let out = desc::address(d) + ((j as u64) << child_shift);
                    e.store(attributes | out, Ordering::Relaxed);
                }
                self.coherency.clean(table.virt.as_ptr(), table.size);
                write_barrier();
                // A table of leaves only (above the last level: it says so).
                let no_tables = if level + 1 < 3 { desc::SW_NO_TABLES } else { 0 };
                self.store(
                    entry,
                    self.with_count(desc::table(table.phys.0), level + 1, sub.len()) | no_tables,
                );
                self.tables.add(1);
                linked = true;
                // The block's translation is replaced: the TLB may hold it.
                span.add(entry_base, entry_base + entry_size, shift, 1);
                (table.phys.0, sub.len())
            };
            let (bytes, gone, below) =
                self.change_in(level + 1, next, entry_base, start, end, gather, reserve, reprotect);
            unmapped += bytes;
            let after = before.saturating_sub(gone);
            if reprotect.is_none() && after == 0 {
                // Emptied now, or already empty (left linked by `unmap_page`): unlinked, and its span invalidated
                // for the walk caches even if nothing below it was mapped.
                self.forget_if_empty(entry.load(Ordering::Relaxed));
                self.store(entry, 0);
                self.free_later(next, gather);
                span.add(entry_base, entry_base + entry_size, self.geometry.granule_bits, 0);
                removed += 1;
            } else if gone > 0 || below {
                self.set_count(entry, level + 1, after, below);
            }
        }
        if cleared {
            let run = &entries[first..=last];
            self.coherency.clean(run.as_ptr().cast(), run.len() * 8);
        }
        span.add_to(gather);
        (unmapped, removed, linked)
    }

    /// Whether unmapping `[from, to)` (aligned to the entries of the table at `level` that the table descriptor
    /// `d` names, which covers from `table_base`) removes every valid entry of that table, none of them a table:
    /// then that many leaves (`Some`), and the table can be unlinked whole without clearing them. `None` when the
    /// table keeps an entry, holds a table in the range, is empty already (the ordinary path unlinks it), or the
    /// range cuts one of its entries. Only the shorter side of the table is read for the count: the entries in
    /// the range (each counted, each checked not to be a table), or those outside it (each checked invalid, so
    /// that the descriptor's count is all in the range; those in the range then only checked for no table
    /// descriptor, which a last-level table cannot hold, and a table whose descriptor says it holds none
    /// ([`desc::SW_NO_TABLES`]) does not either: then they are not read at all).
    pub(super) fn empties_whole(&self, level: u8, d: u64, table_base: u64, from: u64, to: u64) -> Option<usize> {
        let n = desc::count(d);
        let shift = self.geometry.entry_shift(level);
        if n == 0 || (from | to) & ((1 << shift) - 1) != 0 {
            return None;
        }
        let entries = self.table_entries(level, desc::address(d))?;
        let (a, b) = (
            ((from - table_base) >> shift) as usize,
            ((to - table_base) >> shift) as usize,
        );
        let inside = entries.get(a..b)?;
        // A table descriptor (levels 0-2) has bit 1 set; a block has it clear. An invalid entry with bit 1 set
        // (never written by this driver) only sends the unmap down the ordinary path.
        let holds_none = level == 3 || d & desc::SW_NO_TABLES != 0;
        let no_table = |bits: u64| holds_none || bits & desc::TABLE_OR_PAGE == 0;
        if inside.len() <= entries.len() - inside.len() {
            let (valid, bits) = scan(inside);
            return (valid == n && no_table(bits)).then_some(n);
        }
        let outside = scan_bits(&entries[..a]) | scan_bits(&entries[b..]);
        if outside & desc::VALID != 0 || (!holds_none && scan_bits(inside) & desc::TABLE_OR_PAGE != 0) {
            return None;
        }
        Some(n)
    }

    /// Bytes mapped below the unlinked table that the table descriptor `link` names, and the smallest leaf's
    /// shift; the table and its subtables go to `gather`. A level-2 table goes as one link with its last-level
    /// tables (see [`LINK_SUBTREE`]), which are counted without being written, and without being read when their
    /// descriptor says they are full.
    pub(super) fn reclaim(&mut self, level: u8, link: u64, gather: &mut Gather) -> (u64, u8) {
        let table_phys = desc::address(link);
        let shift = self.geometry.entry_shift(level);
        let Some(virt) = self.allocator.phys_to_virt(PhysAddr(table_phys)) else {
            return (0, shift);
        };
        let entries = entries_of(virt, 1 << self.geometry.level_bits);
        if level == 3 {
            let bytes = self.pages_in(link, entries);
            self.free_later(table_phys, gather);
            return (bytes, shift);
        }
        let mut bytes = 0;
        let mut smallest = shift;
        for e in entries {
            let d = e.load(Ordering::Relaxed);
            if desc::is_table(d, level) && level == 2 {
                self.forget_if_empty(d);
                if let Some(child) = self.allocator.phys_to_virt(PhysAddr(desc::address(d))) {
                    bytes += self.pages_in(d, entries_of(child, entries.len()));
                    smallest = smallest.min(self.geometry.entry_shift(3));
                    gather.freed += 1;
                    self.tables.decrement();
                }
            } else if desc::is_table(d, level) {
                self.forget_if_empty(d);
                let (b, s) = self.reclaim(level + 1, d, gather);
                bytes += b;
                smallest = smallest.min(s);
            } else if desc::is_valid(d) {
                bytes += 1 << shift;
            }
        }
        if level == 2 {
            self.subtree_link_slot(entries, virt)
                .store(gather.freed_head, Ordering::Relaxed);
            gather.freed_head = table_phys | LINK_SUBTREE | LINK_PRESENT;
            gather.freed += 1;
            gather.tables_unlinked = true;
            self.tables.decrement();
        } else {
            self.free_later(table_phys, gather);
        }
        (bytes, smallest)
    }

    /// Bytes the last-level table `entries`, named by the table descriptor `link`, maps.
    pub(super) fn pages_in(&self, link: u64, entries: &[AtomicU64]) -> u64 {
        let shift = self.geometry.entry_shift(3);
        if link & desc::SW_TABLE_FULL != 0 {
            return (entries.len() as u64) << shift;
        }
        // A live, unlinked table of this page table; nothing writes it while `&mut self` is held.
        count_valid(entries) << shift
    }
}

/// Runs of translations for a [`Gather`], collected in locals: the lowest start, the highest end, the smallest
/// leaf shift and the leaves, as [`Gather::add_run`] would keep them (a union: the order of the runs does not
/// matter), added to the gather in one step.
#[derive(Clone, Copy)]
struct Span {
    start: u64,
    end: u64,
    shift: u8,
    leaves: u32,
}

impl Span {
    /// No run yet.
    const EMPTY: Span = Span {
        start: u64::MAX,
        end: 0,
        shift: u8::MAX,
        leaves: 0,
    };

    /// `leaves` leaves of `1 << shift` bytes each, together spanning `[start, end)` (not empty).
    #[inline]
    fn add(&mut self, start: u64, end: u64, shift: u8, leaves: u32) {
        self.start = self.start.min(start);
        self.end = self.end.max(end);
        self.shift = self.shift.min(shift);
        self.leaves += leaves;
    }

    /// Adds the runs collected (if any) to `gather`.
    #[inline]
    fn add_to(self, gather: &mut Gather) {
        if self.start <= self.end {
            gather.add_run(self.start, self.end, self.shift, self.leaves);
        }
    }
}

/// The bitwise OR of `entries`, in a table no other CPU writes (`&mut self`).
#[inline]
fn scan_bits(entries: &[AtomicU64]) -> u64 {
    #[cfg(not(all(loom, test)))]
    {
        // SAFETY: live entries that nothing writes meanwhile (`&mut self`; the SMMU only reads them). Plain reads
        // let the compiler use wide loads.
        let words = unsafe { core::slice::from_raw_parts(entries.as_ptr() as *const u64, entries.len()) };
        words.iter().fold(0, |bits, &d| bits | d)
    }
    #[cfg(all(loom, test))]
    entries.iter().fold(0, |bits, e| bits | e.load(Ordering::Relaxed))
}

/// How many of `entries` are valid, and the bitwise OR of the valid ones, in a table no other CPU writes.
#[inline]
fn scan(entries: &[AtomicU64]) -> (usize, u64) {
    let valid = |d: u64| if d & desc::VALID != 0 { d } else { 0 };
    #[cfg(not(all(loom, test)))]
    {
        // SAFETY: as in `scan_bits`.
        let words = unsafe { core::slice::from_raw_parts(entries.as_ptr() as *const u64, entries.len()) };
        let (n, bits) = words
            .iter()
            .fold((0u64, 0u64), |(n, bits), &d| (n + (d & desc::VALID), bits | valid(d)));
        (n as usize, bits)
    }
    #[cfg(all(loom, test))]
    {
        let (n, bits) = entries.iter().fold((0u64, 0u64), |(n, bits), e| {
            let d = e.load(Ordering::Relaxed);
            (n + (d & desc::VALID), bits | valid(d))
        });
        (n as usize, bits)
    }
}

/// Clears `entries` of a table no other CPU writes (the exclusive paths) when none of them is a table descriptor
/// (at `level` < 3): plain loads and stores, so that the compiler can use wide ones. Returns the first and the
/// last valid entry's index and how many were valid (`(0, 0, 0)` when none was), or `None` (nothing written)
/// when one is a table. Entries already invalid stay as they are.
fn clear_leaves(entries: &[AtomicU64], level: u8) -> Option<(usize, usize, usize)> {
    #[cfg(not(all(loom, test)))]
    {
        // SAFETY: live entries of a table `&mut self` keeps from any other CPU-side access; the SMMU only reads
        // them (no hardware updates), and every store below is an aligned 64-bit one, single-copy atomic.
        let words = unsafe { core::slice::from_raw_parts_mut(entries.as_ptr() as *mut u64, entries.len()) };
        // Bit 0 of `tables`: some entry has bits 0 and 1 set (a table descriptor above level 3).
        let (valid, tables) = words
            .iter()
            .fold((0u64, 0u64), |(n, t), &d| (n + (d & desc::VALID), t | (d & (d >> 1))));
        if level < 3 && tables & 1 != 0 {
            return None;
        }
        let valid = valid as usize;
        if valid == 0 {
            return Some((0, 0, 0));
        }
        let lo = words.iter().position(|d| d & desc::VALID != 0).unwrap_or(0);
        let hi = words.iter().rposition(|d| d & desc::VALID != 0).unwrap_or(lo);
        for w in &mut words[lo..=hi] {
            *w = 0;
        }
        Some((lo, hi, valid))
    }
    // Under loom the entries are loom's atomics, not plain words.
    #[cfg(all(loom, test))]
    {
        let d = |i: usize| entries[i].load(Ordering::Relaxed);
        let all = 0..entries.len();
        if level < 3 && all.clone().any(|i| d(i) & 0b11 == 0b11) {
            return None;
        }
        let valid = all.clone().filter(|&i| d(i) & desc::VALID != 0).count();
        let (Some(lo), Some(hi)) = (
            all.clone().position(|i| d(i) & desc::VALID != 0),
            all.clone().rposition(|i| d(i) & desc::VALID != 0),
        ) else {
            return Some((0, 0, 0));
        };
        for e in &entries[lo..=hi] {
            e.store(0, Ordering::Relaxed);
        }
        Some((lo, hi, valid))
    }
}
