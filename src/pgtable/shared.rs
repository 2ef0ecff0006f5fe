//! The concurrent paths: map, single-page unmap and trim through `&self`, for any number of CPUs at once on one
//! table (Linux's io-pgtable-arm installs tables the same way; the live-entry counts are this driver's own).
//!
//! **Protocol.** Every change to a table descriptor is a compare-and-swap on the whole word, so the count, the
//! full bit and the trim mark always change together, and the count (which spans two bit fields, \[11:2\] and
//! \[55:52\]) never carries into the address. For a table T named by the descriptor P:
//! - *Reserve* (a map): before a map writes an entry of T it raises P's count with a CAS that also checks that P
//!   still names T. The count is then never below the number of valid entries plus the reservations in flight.
//!   A reservation pins T: a trim unlinks a table only by a CAS from a descriptor whose count is 0, so once
//!   pinned, the trim's CAS fails; and if the trim unlinked T first, the reservation's CAS sees that P no longer
//!   names T and the map walks again from the root.
//! - *Install* (a map below an invalid entry): the missing tables are allocated and filled where no one sees
//!   them (down to the leaf), then linked by one CAS from the invalid entry (after the reservation in the table
//!   holding it). The loser of two installs frees its tables, never visible to anyone, gives its reservation
//!   back and walks on through the winner's table.
//! - *Leaf*: a map CASes the leaf from invalid to the new leaf; failing, the entry is already mapped:
//!   [`MapError::Overlap`], and the reservation goes back. An unmap CASes a live leaf to 0: only the CPU whose CAS
//!   takes the live leaf owns its removal (a second unmap of the page finds nothing mapped), and only then gives
//!   its entry back to P's count.
//! - *Give back*: a CAS loop lowering P's count, clearing the full bit, and setting the trim mark when the count
//!   reaches 0 (in the same CAS); the CPU that brought it to 0 counts the table as waiting and marks its
//!   ancestors.
//! - *Trim*: visits the marked descriptors; clears an intermediate descriptor's mark *before* reading the entries
//!   below it (so a table emptied meanwhile is either seen, or re-marks the descriptor); unlinks a table whose
//!   count is 0 by one CAS, and gives its entry back to the table above (which may empty and be unlinked in
//!   turn).
//!
//! **What the caller serialises.** These paths run together with each other and with the read-only walks
//! ([`IoPageTable::translate`], [`IoPageTable::walk`]): the domain takes its read lock around them. Everything
//! taking `&mut self` (range unmap, protect, block splits, the exclusive trim, [`IoPageTable::release`]) runs
//! alone: the domain's write lock. Tables a concurrent trim unlinks go back to the allocator only through
//! [`IoPageTable::release`], which needs `&mut self`: no CPU can still be inside them then (one that read their
//! descriptor before the unlink may read them, never write them, until it leaves).
//!
//! **Memory ordering.** For the SMMU, as on the exclusive paths: a new table's contents are cleaned (non-coherent
//! SMMU) and ordered by a DMB OSHST before the CAS that links it, a map ends with a DMB OSHST (its leaves are
//! visible before the caller starts a DMA), and an unmap's store is ordered before the invalidation by the
//! command queue's barrier before its PROD write. Between CPUs, in the weakest orderings that hold (each is
//! justified where it is used):
//! - the CAS linking a table is `Release`, and every walk reads descriptors with `Acquire`, so a CPU that sees the
//!   link sees the table's contents;
//! - a map's leaf CAS is `Release` and an unmap's is `Acquire`, so a map's reservation comes before the unmap's
//!   give-back in the descriptor's modification order (the count never goes below the valid entries);
//! - setting a trim mark is a `Release` read-modify-write (even when the bit is already set), and a trim clears a
//!   mark with an `Acquire` one before reading the entries below: the store-buffering pattern where the trim
//!   misses the emptied table *and* the unmap misses the clearing cannot happen;
//! - reservations and give-backs are `Relaxed` otherwise: a reservation and a trim's unlink are read-modify-writes
//!   of one word, and one of them fails whatever the order; the counters beside the descriptors are `Relaxed`.

use super::*;

/// The descriptors naming the tables a walk went through, from the root's entry down (none for the root):
/// the reservation and give-back of the deepest, and the trim marks of its ancestors.
type Path<'t> = heapless::Vec<&'t AtomicU64, 4>;

/// What a leaf run of the concurrent range map stopped at.
struct Stopped {
    /// Why.
    error: MapError,
    /// Everything below this address (from the start of the map) is installed; nothing from it on.
    reached: u64,
}

impl<A: FrameAllocator + Sync> IoPageTable<A> {
    /// Maps `[iova, iova + size)` to `[pa, pa + size)` with `prot`, as [`IoPageTable::map`] does (the largest
    /// blocks alignment allows), through `&self`: any number of CPUs may map, unmap single pages
    /// ([`IoPageTable::unmap_page_shared`]) and trim ([`IoPageTable::trim_shared`]) in one table at once (see the
    /// module documentation of the protocol). One granule takes one descent from the root and two CAS (the
    /// reservation and the leaf), plus one per missing table.
    ///
    /// Overlapping requests: the first to take an entry wins; the other fails with [`MapError::Overlap`], and
    /// the table stays whole. A range that something already maps is refused before anything is written (as
    /// [`IoPageTable::map`]). Only a request racing another over the same range can fail part-way: then the
    /// leaves it installed are removed again, exactly those (a leaf equal to one it wrote, for the same output
    /// and protection, is taken for its own), and added to `gather`, which the caller must then flush like an
    /// unmap's (the SMMU may have cached them meanwhile); the tables it linked stay, emptied, for the next trim.
    /// Otherwise `gather` is not touched.
    ///
    /// # Errors
    /// As [`IoPageTable::map`] ([`MapError::NoMemory`] changes nothing: tables are allocated before anything they
    /// hold is linked), and [`MapError::ForeignGather`] for a gather another table filled.
    pub fn map_shared(
        &self,
        iova: Iova,
        pa: PhysAddr,
        size: u64,
        prot: Prot,
        gather: &mut Gather,
    ) -> Result<(), MapError> {
        let (iova, pa) = (iova.0, pa.0);
        self.check_owner(gather)?;
        let granule = 1u64 << self.geometry.granule_bits;
        // The single-page checks of `map`, with the template of the last exclusive map when the protection is
        // the same (it was checked expressible then); `&self` cannot cache a new one.
        if size == granule
            && (iova | pa) & (granule - 1) == 0
            && iova >> self.format.input_bits == 0
            && pa >> self.format.output_bits == 0
        {
            let template = match self.last_prot {
                Some(last) if last == prot => self.last_template,
                _ if self.expressible(prot) => desc::leaf(self.format.stage, 0, prot, true),
                _ => return Err(MapError::BadProt(prot)),
            };
            self.mark_root_shared(iova, size);
            return self.map_page_shared(iova, template | pa);
        }
        self.check_range(iova, size)?;
        if !pa.is_multiple_of(granule) {
            return Err(MapError::UnalignedOutput { pa, size });
        }
        match pa.checked_add(size) {
            Some(end) if end <= 1 << self.format.output_bits => {}
            _ => return Err(MapError::OutputOutOfRange { pa, size }),
        }
        if !self.expressible(prot) {
            return Err(MapError::BadProt(prot));
        }
        if let Some(mapped) = self.first_mapped(iova, size) {
            return Err(MapError::Overlap { iova: mapped });
        }
        self.mark_root_shared(iova, size);
        let end = iova + size;
        let mut va = iova;
        while va < end {
            match self.map_run_shared(va, end, iova, pa, prot, self.geometry.start_level) {
                Ok(next) => va = next,
                Err(stopped) => {
                    self.undo_shared(iova, stopped.reached, pa, prot, gather);
                    return Err(stopped.error);
                }
            }
        }
        // New translations visible before the caller starts a DMA through them.
        write_barrier();
        Ok(())
    }

    /// Maps one granule at `iova` with the page descriptor `leaf` (checked by `map_shared`).
    fn map_page_shared(&self, iova: u64, leaf: u64) -> Result<(), MapError> {
        let g = self.geometry;
        'walk: loop {
            let mut path = Path::new();
            let mut table = self.root.phys.0;
            let mut level = g.start_level;
            let mut entries = self.root_entries();
            loop {
                let slot = &entries[g.index(level, iova)];
                // Acquire: pairs with the Release of the CAS that linked a table here, so that the walk below
                // reads the contents its installer wrote before linking it.
                let d = slot.load(Ordering::Acquire);
                if level < 3 && desc::is_table(d, level) {
                    let virt = self.table_virt(d)?;
                    let _ = path.push(slot);
                    (table, level, entries) = (desc::address(d), level + 1, entries_of(virt, 1 << g.level_bits));
                    continue;
                }
                if desc::is_valid(d) {
                    // A page, or a block that maps it.
                    return Err(MapError::Overlap { iova });
                }
                // The tables below the invalid entry, holding the leaf, made before anything is reserved.
                let (word, frames) = if level < 3 {
                    self.chain(level, iova, 3, leaf, 1)?
                } else {
                    (leaf, Frames::new())
                };
                if !self.reserve(&path, table, level, 1, level < 3) {
                    // The table was unlinked (trimmed) since this walk read its descriptor.
                    self.free_frames(frames);
                    continue 'walk;
                }
                // Counted before they can be seen, so that a trim unlinking them never counts below.
                self.tables.add_shared(frames.len() as u32);
                // Release: the new tables' contents (or, for a leaf, the reservation above) before the entry, for
                // a CPU that reads it with Acquire. Acquire on failure: the walk goes on through what won.
                match slot.compare_exchange(d, word, Ordering::Release, Ordering::Acquire) {
                    Ok(_) => {
                        self.clean_entry(slot);
                        write_barrier();
                        return Ok(());
                    }
                    Err(now) => {
                        self.tables.sub_shared(frames.len() as u32);
                        self.free_frames(frames);
                        self.give_back(&path, level, 1);
                        if level < 3 && desc::is_table(now, level) {
                            // Another CPU linked a table here first: continue through it.
                            continue;
                        }
                        if desc::is_valid(now) {
                            return Err(MapError::Overlap { iova });
                        }
                        continue 'walk;
                    }
                }
            }
        }
    }

    /// Maps the leaves of one level that start at `va` inside one table (the largest leaves alignment allows at
    /// `min_level` or below), of the map of `[iova, end)` to output `pa` at `iova`, and returns where the next
    /// run starts. On failure, everything below [`Stopped::reached`] is installed and nothing above it.
    #[allow(clippy::too_many_arguments)]
    fn map_run_shared(&self, va: u64, end: u64, iova: u64, pa: u64, prot: Prot, min_level: u8) -> Result<u64, Stopped> {
        let g = self.geometry;
        let output = |x: u64| pa + (x - iova);
        let stop = |error: MapError, reached: u64| Stopped { error, reached };
        // The leaf level: the first (largest) whose entry at `va` is covered, with an aligned output, where
        // leaves are allowed.
        let leaf_level = (min_level..3)
            .find(|&l| {
                let size = 1u64 << g.entry_shift(l);
                g.block_allowed(l) && va.is_multiple_of(size) && output(va).is_multiple_of(size) && end - va >= size
            })
            .unwrap_or(3);
        let shift = g.entry_shift(leaf_level);
        let entry = 1u64 << shift;
        // The run ends with the range or with the table that holds it.
        let table_span = (g.entries(leaf_level) as u64) << shift;
        let table_end = (va | (table_span - 1)).saturating_add(1);
        let n = ((end.min(table_end) - va) >> shift) as usize;
        let template = desc::leaf(self.format.stage, 0, prot, leaf_level == 3);
        let run_end = va + n as u64 * entry;
        'walk: loop {
            let mut path = Path::new();
            let mut table = self.root.phys.0;
            let mut level = g.start_level;
            let mut entries = self.root_entries();
            while level < leaf_level {
                let slot = &entries[g.index(level, va)];
                // Acquire: as in `map_page_shared`.
                let d = slot.load(Ordering::Acquire);
                if desc::is_table(d, level) {
                    let virt = self.table_virt(d).map_err(|e| stop(e, va))?;
                    let _ = path.push(slot);
                    (table, level, entries) = (desc::address(d), level + 1, entries_of(virt, 1 << g.level_bits));
                    continue;
                }
                if desc::is_valid(d) {
                    return Err(stop(MapError::Overlap { iova: va }, va));
                }
                let (word, frames) = self
                    .chain(level, va, leaf_level, template | output(va), n)
                    .map_err(|e| stop(e, va))?;
                if !self.reserve(&path, table, level, 1, true) {
                    self.free_frames(frames);
                    continue 'walk;
                }
                self.tables.add_shared(frames.len() as u32);
                // Release / Acquire: as in `map_page_shared`.
                match slot.compare_exchange(d, word, Ordering::Release, Ordering::Acquire) {
                    Ok(_) => {
                        self.clean_entry(slot);
                        return Ok(run_end);
                    }
                    Err(_) => {
                        self.tables.sub_shared(frames.len() as u32);
                        self.free_frames(frames);
                        self.give_back(&path, level, 1);
                        // Read the entry again: a table to go through, or a leaf in the way.
                    }
                }
            }
            // The table that holds the run exists: reserve its entries, then fill them one by one.
            if !self.reserve(&path, table, leaf_level, n, false) {
                continue 'walk;
            }
            let first = g.index(leaf_level, va);
            for k in 0..n {
                let slot = &entries[first + k];
                let x = va + k as u64 * entry;
                let mut d = slot.load(Ordering::Relaxed);
                let failed = loop {
                    if desc::is_valid(d) {
                        break Some(d);
                    }
                    // Release: as a single page's leaf.
                    match slot.compare_exchange(d, template | output(x), Ordering::Release, Ordering::Acquire) {
                        Ok(_) => break None,
                        Err(now) => d = now,
                    }
                };
                let Some(d) = failed else { continue };
                if leaf_level < 3 && desc::is_table(d, leaf_level) {
                    // A table left empty by an unmap (`map_shared` found nothing mapped here): a block must not
                    // replace a linked table without an invalidation, so the entry's span goes into it. The
                    // entry is valid already: its reservation goes back.
                    self.give_back(&path, leaf_level, 1);
                    let mut at = x;
                    while at < x + entry {
                        match self.map_run_shared(at, x + entry, iova, pa, prot, leaf_level + 1) {
                            Ok(next) => at = next,
                            Err(stopped) => {
                                self.clean_run(&entries[first..first + k]);
                                self.give_back(&path, leaf_level, n - k - 1);
                                return Err(stopped);
                            }
                        }
                    }
                    continue;
                }
                // Mapped by a racing request: the entries from here on are not installed.
                self.clean_run(&entries[first..first + k]);
                self.give_back(&path, leaf_level, n - k);
                return Err(stop(MapError::Overlap { iova: x }, x));
            }
            self.clean_run(&entries[first..first + n]);
            return Ok(run_end);
        }
    }

    /// Removes the leaves a failed `map_shared` of `[iova, ..)` (output `pa` at `iova`, protection `prot`)
    /// installed below `reached`, into `gather`.
    pub(super) fn undo_shared(&self, iova: u64, reached: u64, pa: u64, prot: Prot, gather: &mut Gather) {
        if reached > iova {
            let mut path = Path::new();
            let (start, root) = (self.geometry.start_level, self.root_entries());
            self.undo_in(start, root, 0, (iova, reached), (iova, pa, prot), &mut path, gather);
        }
    }

    /// `undo_shared` inside a table at `level` covering from `base`.
    #[allow(clippy::too_many_arguments)]
    fn undo_in<'t>(
        &'t self,
        level: u8,
        entries: &'t [AtomicU64],
        base: u64,
        (start, end): (u64, u64),
        map: (u64, u64, Prot),
        path: &mut Path<'t>,
        gather: &mut Gather,
    ) {
        let (iova, pa, prot) = map;
        let shift = self.geometry.entry_shift(level);
        let entry = 1u64 << shift;
        let first = ((start - base) >> shift) as usize;
        let last = ((end - 1 - base) >> shift) as usize;
        let mut removed = 0;
        for (i, slot) in entries.iter().enumerate().take(last + 1).skip(first) {
            let x = base + ((i as u64) << shift);
            // Acquire: as in a walk.
            let d = slot.load(Ordering::Acquire);
            if desc::is_table(d, level) {
                let Some(virt) = self.allocator.phys_to_virt(PhysAddr(desc::address(d))) else {
                    continue;
                };
                let below = entries_of(virt, 1 << self.geometry.level_bits);
                let _ = path.push(slot);
                let span = (start.max(x), end.min(x + entry));
                self.undo_in(level + 1, below, x, span, map, path, gather);
                path.pop();
                continue;
            }
            let ours = desc::leaf(self.format.stage, pa + (x - iova), prot, level == 3);
            // Acquire: as an unmap's, pairing with the Release of the CAS that wrote the leaf. A leaf another
            // request wrote (or already removed) is left alone.
            if start <= x
                && x + entry <= end
                && slot
                    .compare_exchange(ours, 0, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                self.clean_entry(slot);
                gather.add(x, entry, shift);
                removed += 1;
            }
        }
        if removed > 0 {
            gather.owner = self.id.0;
            self.give_back(path, level, removed);
        }
    }

    /// Unmaps the granule at `iova` through `&self`, concurrently with [`IoPageTable::map_shared`], other
    /// single-page unmaps and [`IoPageTable::trim_shared`]: one descent from the root and one CAS taking the
    /// leaf, then one giving its entry back. Returns the bytes unmapped: a granule, or 0 when nothing was mapped
    /// there (of two unmaps of one page, exactly one removes it and returns a granule). The removed translation is
    /// added to `gather`, which the caller must invalidate and flush as an unmap's.
    ///
    /// A last-level table this empties stays linked and waits for a trim, whatever the lazy-free limit: this
    /// never trims by itself (a trim may unlink tables anywhere, which widens the invalidation). When
    /// [`IoPageTable::trim_due`] says so afterwards, trim: [`IoPageTable::trim_shared`] (concurrently), or
    /// [`IoPageTable::trim`] (exclusively), into a gather of its own.
    ///
    /// # Errors
    /// [`MapError::Unaligned`], [`MapError::InputOutOfRange`], [`MapError::ForeignGather`], and
    /// [`MapError::NeedsExclusive`] when a block maps the page (splitting it is the exclusive
    /// [`IoPageTable::unmap`]'s); nothing changes then, `gather` included.
    pub fn unmap_page_shared(&self, iova: Iova, gather: &mut Gather) -> Result<u64, MapError> {
        let iova = iova.0;
        self.check_owner(gather)?;
        let g = self.geometry;
        let granule = 1u64 << g.granule_bits;
        if !iova.is_multiple_of(granule) {
            return Err(MapError::Unaligned { iova, size: granule });
        }
        if iova >> self.format.input_bits != 0 {
            return Err(MapError::InputOutOfRange { iova, size: granule });
        }
        let mut path = Path::new();
        let mut level = g.start_level;
        let mut entries = self.root_entries();
        let (slot, mut d) = loop {
            let slot = &entries[g.index(level, iova)];
            // Acquire: as in a map's walk.
            let d = slot.load(Ordering::Acquire);
            if !desc::is_valid(d) {
                return Ok(0);
            }
            if level == 3 {
                break (slot, d);
            }
            if !desc::is_table(d, level) {
                return Err(MapError::NeedsExclusive { iova });
            }
            let virt = self.table_virt(d)?;
            let _ = path.push(slot);
            (level, entries) = (level + 1, entries_of(virt, 1 << g.level_bits));
        };
        loop {
            if !desc::is_valid(d) {
                // Another unmap took it first.
                return Ok(0);
            }
            // Acquire: pairs with the Release of the map that wrote the leaf, so that its reservation comes
            // before the give-back below in the count's modification order.
            match slot.compare_exchange(d, 0, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => d = now,
            }
        }
        self.clean_entry(slot);
        gather.owner = self.id.0;
        gather.add(iova, granule, g.granule_bits);
        self.give_back(&path, 3, 1);
        Ok(granule)
    }

    /// Unlinks every table that maps nothing (as [`IoPageTable::trim`]) through `&self`, concurrently with
    /// [`IoPageTable::map_shared`], [`IoPageTable::unmap_page_shared`] and other trims, into `gather`, and returns
    /// how many tables it unlinked. A table is unlinked only by a CAS from a descriptor whose count is 0: a map
    /// that reserved an entry in it first keeps it; a map that comes later walks again and links a new one. A
    /// table emptied while the trim runs may be left for the next one.
    ///
    /// The unlinked tables go back to the allocator only through [`IoPageTable::release`] (after the caller's
    /// invalidation of `gather`, walk caches included), which takes `&mut self`: by then no CPU can still be
    /// reading them.
    ///
    /// # Errors
    /// [`MapError::ForeignGather`] for a gather another table filled; nothing changes then.
    pub fn trim_shared(&self, gather: &mut Gather) -> Result<u32, MapError> {
        self.check_owner(gather)?;
        gather.owner = self.id.0;
        if self.empty.signed() <= 0 {
            // Nothing waits (or its count has not landed yet: the next trim finds it).
            return Ok(0);
        }
        let before = gather.freed;
        let mut path = Path::new();
        let (start, root) = (self.geometry.start_level, self.root_entries());
        self.trim_shared_in(start, root, 0, &mut path, gather);
        Ok(gather.freed - before)
    }

    /// `trim_shared` below a table at `level` covering from `base`, named by the last descriptor of `path`.
    fn trim_shared_in<'t>(
        &'t self,
        level: u8,
        entries: &'t [AtomicU64],
        base: u64,
        path: &mut Path<'t>,
        gather: &mut Gather,
    ) {
        let shift = self.geometry.entry_shift(level);
        for (i, slot) in entries.iter().enumerate() {
            // Acquire: as in a walk (this reads the table below).
            let d = slot.load(Ordering::Acquire);
            if !desc::is_table(d, level) || d & desc::SW_TRIM_CANDIDATE == 0 {
                continue;
            }
            let child = desc::address(d);
            let x = base + ((i as u64) << shift);
            if level + 1 < 3 {
                // The mark goes before the entries below are read (Acquire: pairs with the Release of an unmap's
                // marking, see the module documentation): a table emptied from here on marks it again.
                if !self.unmark(slot, d, level, Ordering::Acquire) {
                    continue;
                }
                let Some(virt) = self.allocator.phys_to_virt(PhysAddr(child)) else {
                    continue;
                };
                let _ = path.push(slot);
                self.trim_shared_in(
                    level + 1,
                    entries_of(virt, 1 << self.geometry.level_bits),
                    x,
                    path,
                    gather,
                );
                path.pop();
            }
            self.unlink_if_empty(slot, child, level, x, path, gather);
        }
    }

    /// Clears the trim mark of the table descriptor `slot` (at `level`, last read as `d`) with `order`, as long as
    /// it names the same table; false when it no longer does.
    fn unmark(&self, slot: &AtomicU64, mut d: u64, level: u8, order: Ordering) -> bool {
        let table = desc::address(d);
        loop {
            if !desc::is_table(d, level) || desc::address(d) != table {
                return false;
            }
            if d & desc::SW_TRIM_CANDIDATE == 0 {
                return true;
            }
            match slot.compare_exchange_weak(d, d & !desc::SW_TRIM_CANDIDATE, order, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => d = now,
            }
        }
    }

    /// Unlinks the table at `child` that `slot` (an entry at `level`, covering from `x`, of the table `path`
    /// ends with) names, if its count is 0; a last-level table still in use loses its mark instead.
    fn unlink_if_empty(&self, slot: &AtomicU64, child: u64, level: u8, x: u64, path: &Path<'_>, gather: &mut Gather) {
        let mut d = slot.load(Ordering::Relaxed);
        loop {
            if !desc::is_table(d, level) || desc::address(d) != child {
                // Another trim unlinked it.
                return;
            }
            let result = if desc::count(d) != 0 {
                if level + 1 < 3 || d & desc::SW_TRIM_CANDIDATE == 0 {
                    // In use (an intermediate table's mark was cleared before its entries were read).
                    return;
                }
                // A last-level table in use again loses its mark; should an unmap empty it meanwhile, this CAS
                // fails and the count is read again. An unmap that empties it later sets the mark in the CAS that
                // empties it.
                slot.compare_exchange(d, d & !desc::SW_TRIM_CANDIDATE, Ordering::Relaxed, Ordering::Relaxed)
                    .map(|_| false)
            } else {
                // Count 0: no valid entry and no reservation. Acquire: the entries' last writes (the removals that
                // brought the count to 0, each ordered before its give-back) come before the table is chained
                // below.
                slot.compare_exchange(d, 0, Ordering::Acquire, Ordering::Relaxed)
                    .map(|_| true)
            };
            match result {
                Ok(true) => break,
                Ok(false) => return,
                Err(now) => d = now,
            }
        }
        self.clean_entry(slot);
        self.empty.sub_shared(1);
        if self.chain_unlinked(child, gather) {
            self.tables.sub_shared(1);
        }
        // Walk caches may hold the unlinked table: its span is invalidated, though nothing is mapped there.
        let span = 1u64 << self.geometry.entry_shift(level);
        gather.add_run(x, x + span, self.geometry.granule_bits, 0);
        // The table holding `slot` has one entry fewer.
        self.give_back(path, level, 1);
    }

    /// Reserves `n` entries of the table at `table` (at `level`), named by the last descriptor of `path` (none:
    /// the root, which is never unlinked): a CAS raising its count, made only while the descriptor still names
    /// that table. False when it no longer does: a concurrent trim unlinked it, and the caller walks again.
    /// `linking`: one of the entries will be a table descriptor, so the same CAS clears [`desc::SW_NO_TABLES`]
    /// (before the table can be linked; should the link lose its race, the bit stays clear, which promises
    /// nothing).
    ///
    /// Relaxed: a trim unlinks only by a CAS from count 0 on the same word, so of the two read-modify-writes one
    /// fails whatever the order; nothing else is published through the count.
    fn reserve(&self, path: &Path<'_>, table: u64, level: u8, n: usize, linking: bool) -> bool {
        let Some(parent) = path.last() else {
            return true;
        };
        let keep = if linking { !desc::SW_NO_TABLES } else { !0 };
        let mut d = parent.load(Ordering::Relaxed);
        loop {
            if !desc::is_table(d, level - 1) || desc::address(d) != table {
                return false;
            }
            let count = desc::count(d);
            debug_assert!(count + n <= desc::SW_COUNT_MAX, "a count beyond its field");
            match parent.compare_exchange_weak(
                d,
                self.with_count(d, level, count + n) & keep,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    if count == 0 {
                        // It was empty and counted as waiting for a trim.
                        self.empty.sub_shared(1);
                    }
                    return true;
                }
                Err(now) => d = now,
            }
        }
    }

    /// Gives back `n` entries of the table (at `level`) named by the last descriptor of `path` (none: the root):
    /// a CAS loop lowering the count and clearing the full bit, and setting the trim mark when the count reaches
    /// 0; the table is then counted as waiting and its ancestors are marked. The entries were reserved (by this
    /// CPU or by the map that wrote the leaves it removed), so the table is still linked.
    ///
    /// Release: the removals that came before (a leaf's CAS to 0, an unlink) are ordered before the count a trim
    /// reads.
    fn give_back(&self, path: &[&AtomicU64], level: u8, n: usize) {
        let Some((parent, ancestors)) = path.split_last() else {
            return;
        };
        if n == 0 {
            return;
        }
        let mut d = parent.load(Ordering::Relaxed);
        let emptied = loop {
            debug_assert!(desc::count(d) >= n, "a count below the entries it holds");
            let count = desc::count(d).saturating_sub(n);
            let mut new = self.with_count(d, level, count);
            if count == 0 {
                new |= desc::SW_TRIM_CANDIDATE;
            }
            match parent.compare_exchange_weak(d, new, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => break count == 0,
                Err(now) => d = now,
            }
        };
        if emptied {
            self.empty.add_shared(1);
            self.mark(ancestors);
        }
    }

    /// Marks the table descriptors of `path` (from the root's entry down), bottom-up, as leading to an emptied
    /// table: each a Release read-modify-write, even where the mark is already set, so that a trim clearing it
    /// (Acquire) before reading the entries below either comes after this write and sees the emptied table, or
    /// comes before it and leaves the mark set. Stops at a descriptor that no longer names a table (unlinked).
    fn mark(&self, path: &[&AtomicU64]) {
        for slot in path.iter().rev() {
            let mut d = slot.load(Ordering::Relaxed);
            loop {
                if d & (desc::VALID | desc::TABLE_OR_PAGE) != desc::VALID | desc::TABLE_OR_PAGE {
                    return;
                }
                match slot.compare_exchange_weak(d, d | desc::SW_TRIM_CANDIDATE, Ordering::Release, Ordering::Relaxed) {
                    Ok(_) => break,
                    Err(now) => d = now,
                }
            }
        }
    }
}

impl<A: FrameAllocator> IoPageTable<A> {
    /// Where the CPU reaches the table the table descriptor `d` names.
    ///
    /// # Errors
    /// [`MapError::NoMemory`] when the allocator does not know it (a broken allocator, as `tables_needed`
    /// reports it).
    #[inline]
    fn table_virt(&self, d: u64) -> Result<NonNull<u8>, MapError> {
        self.allocator
            .phys_to_virt(PhysAddr(desc::address(d)))
            .ok_or(MapError::NoMemory(AllocError::OutOfMemory { size: 0 }))
    }

    /// Makes a CAS on a live entry visible to a non-coherent SMMU (a clean to the point of coherency, with its DSB).
    #[inline]
    fn clean_entry(&self, entry: &AtomicU64) {
        self.coherency.clean(core::ptr::from_ref(entry).cast(), 8);
    }

    /// `clean_entry` for a run of entries.
    #[inline]
    fn clean_run(&self, run: &[AtomicU64]) {
        if !run.is_empty() {
            self.coherency.clean(run.as_ptr().cast(), core::mem::size_of_val(run));
        }
    }
}
