//! Mapping: the single-page path (one descent, the leaf slot as the overlap check) and the range path (tables
//! counted and allocated first, then filled in one pass, blocks where alignment allows).

use super::*;

/// Up to three frames of one size, their physical and CPU addresses in arrays of their own: each frame comes
/// in as two 8-byte words (read from the `DmaBlock` its allocator just wrote, field by field), never one 16-byte
/// copy, which a CPU cannot forward from the two 8-byte stores that wrote it (the load waits for them to land).
#[derive(Default)]
struct Kept {
    phys: [u64; 3],
    virt: [usize; 3],
    len: usize,
}

impl Kept {
    /// Keeps `table`, or gives it back when three are kept.
    fn push(&mut self, table: DmaBlock) -> Result<(), DmaBlock> {
        if self.len == 3 {
            return Err(table);
        }
        self.phys[self.len] = table.phys.0;
        self.virt[self.len] = table.virt.as_ptr() as usize;
        self.len += 1;
        Ok(())
    }

    /// The last frame kept, of `size` bytes.
    #[inline]
    fn pop(&mut self, size: usize) -> Option<DmaBlock> {
        let k = self.len.checked_sub(1)?;
        self.len = k;
        Some(DmaBlock {
            phys: PhysAddr(self.phys[k]),
            virt: NonNull::new(self.virt[k] as *mut u8)?,
            size,
        })
    }
}

/// Frames `map` allocated before writing anything, one set of zeroed frames and one of frames to be overwritten
/// whole, all of `size` bytes: the first few of each kept here, the rest chained through their first two words
/// (the next frame's physical and CPU addresses), so that a map needing few tables does not write into their
/// frames twice.
struct Pool {
    size: usize,
    zeroed: Kept,
    overwrite: Kept,
    zeroed_chain: Option<DmaBlock>,
    overwrite_chain: Option<DmaBlock>,
}

impl Pool {
    fn new(size: usize) -> Self {
        Pool {
            size,
            zeroed: Kept::default(),
            overwrite: Kept::default(),
            zeroed_chain: None,
            overwrite_chain: None,
        }
    }

    fn push(&mut self, table: DmaBlock, full: bool) {
        let (kept, head) = match full {
            true => (&mut self.overwrite, &mut self.overwrite_chain),
            false => (&mut self.zeroed, &mut self.zeroed_chain),
        };
        let Err(table) = kept.push(table) else {
            return;
        };
        let link = entries_of(table.virt, 2);
        let (phys, virt) = head
            .take()
            .map_or((0, 0), |next| (next.phys.0, next.virt.as_ptr() as u64));
        link[0].store(phys, Ordering::Relaxed);
        link[1].store(virt, Ordering::Relaxed);
        *head = Some(table);
    }

    /// The next frame: a kept one first (a map needing few tables never looks at the chain), then a chained one
    /// with its link words zeroed again.
    #[inline]
    fn pop(&mut self, full: bool) -> Option<DmaBlock> {
        let size = self.size;
        let (kept, head) = match full {
            true => (&mut self.overwrite, &mut self.overwrite_chain),
            false => (&mut self.zeroed, &mut self.zeroed_chain),
        };
        if let Some(table) = kept.pop(size) {
            return Some(table);
        }
        let table = head.take()?;
        let link = entries_of(table.virt, 2);
        // Plain loads and stores: a swap is a locked read-modify-write on x86 (it drains the store buffer full of
        // the previous table's entries) and an exclusive pair or LDADD-class atomic on Arm, and nothing else can
        // touch a frame on this chain.
        let (phys, virt) = (link[0].load(Ordering::Relaxed), link[1].load(Ordering::Relaxed));
        link[0].store(0, Ordering::Relaxed);
        link[1].store(0, Ordering::Relaxed);
        *head = NonNull::new(virt as *mut u8).map(|virt| DmaBlock {
            phys: PhysAddr(phys),
            virt,
            size: table.size,
        });
        Some(table)
    }

    fn is_empty(&self) -> bool {
        self.zeroed.len == 0 && self.overwrite.len == 0 && self.zeroed_chain.is_none() && self.overwrite_chain.is_none()
    }
}

impl<A: FrameAllocator> IoPageTable<A> {
    /// Maps one granule at `iova` (checked by `map`): one descent from the root, the leaf slot itself as the
    /// overlap check, the missing tables (at most one per level) allocated before anything is written.
    #[inline]
    pub(super) fn map_page(&mut self, iova: u64, pa: u64, template: u64) -> Result<(), MapError> {
        let g = self.geometry;
        // The descriptor that names the current table (none for the root).
        let mut parent: Option<&AtomicU64> = None;
        let mut level = g.start_level;
        let mut entries = entries_of(self.root.virt, g.root_entries);
        let (mut shift, mut mask) = (g.entry_shift(level), g.root_entries - 1);
        let slot = loop {
            let slot = &entries[(iova >> shift) as usize & mask];
            let d = slot.load(Ordering::Relaxed);
            if level == 3 || !desc::is_table(d, level) {
                if desc::is_valid(d) {
                    // A page, or a block that maps it.
                    return Err(MapError::Overlap { iova });
                }
                break slot;
            }
            let Some(virt) = self.allocator.phys_to_virt(PhysAddr(desc::address(d))) else {
                // A table the allocator does not know: a broken allocator (as `tables_needed` reports it).
                return Err(MapError::NoMemory(AllocError::OutOfMemory { size: 0 }));
            };
            parent = Some(slot);
            entries = entries_of(virt, 1 << g.level_bits);
            level += 1;
            (shift, mask) = (shift - g.level_bits, (1 << g.level_bits) - 1);
        };
        let word = if level < 3 {
            self.new_tables(level, iova, template | pa)?
        } else {
            template | pa
        };
        self.store(slot, word);
        if let Some(parent) = parent {
            // The current table gained an entry.
            let p = parent.load(Ordering::Relaxed);
            let n = desc::count(p);
            if n == 0 {
                // It was empty and waiting for a trim (emptied by `unmap_page`, or found empty by `recount`).
                self.empty.decrement();
            }
            // A table linked into it (`level` < 3) breaks its "holds no table" promise.
            let keep = if level < 3 { !desc::SW_NO_TABLES } else { !0 };
            parent.store(self.with_count(p, level, n + 1) & keep, Ordering::Relaxed);
        }
        write_barrier();
        Ok(())
    }

    /// `n` (at most `N`) zeroed frames of a granule each, or none: on a failure the ones already allocated go back.
    pub(super) fn zeroed_frames<const N: usize>(&self, n: usize) -> Result<heapless::Vec<DmaBlock, N>, MapError> {
        let mut frames = heapless::Vec::new();
        self.zeroed_frames_into(n, &mut frames)?;
        Ok(frames)
    }

    /// [`IoPageTable::zeroed_frames`] into `frames` (empty), which the caller keeps where it is: a vector of
    /// frames is a few hundred bytes, which a returned `Result` would copy (twice) even when it holds none.
    pub(super) fn zeroed_frames_into<const N: usize>(
        &self,
        n: usize,
        frames: &mut heapless::Vec<DmaBlock, N>,
    ) -> Result<(), MapError> {
        let granule = 1usize << self.geometry.granule_bits;
        for _ in 0..n.min(N) {
            match self.allocator.allocate_zeroed(granule, granule) {
                Ok(t) => {
                    let _ = frames.push(t);
                }
                Err(e) => {
                    while let Some(t) = frames.pop() {
                        // SAFETY: just allocated here, never published.
                        unsafe { self.allocator.free(t) };
                    }
                    return Err(MapError::NoMemory(e));
                }
            }
        }
        Ok(())
    }

    /// The tables from `level + 1` down to the last level that a page at `iova` needs below an invalid entry at
    /// `level`, holding `leaf` (see [`IoPageTable::chain`]); the descriptor that will link them is returned.
    #[inline(never)]
    pub(super) fn new_tables(&mut self, level: u8, iova: u64, leaf: u64) -> Result<u64, MapError> {
        let (word, frames) = self.chain(level, iova, 3, leaf, 1)?;
        self.tables.add(frames.len() as u32);
        Ok(word)
    }

    /// The tables from `level + 1` down to `leaf_level` below an invalid entry at `level`, the one at
    /// `leaf_level` holding `n` leaves from `va` (`first_leaf`, then one entry further each), the others one table
    /// descriptor each: allocated first, so that a failure changes nothing (every frame goes back), then filled
    /// bottom-up with their counts, cleaned, and ordered (DMB OSHST) before the descriptor that will link them,
    /// which is returned with the frames (nothing refers to them yet: a caller that cannot link them frees them).
    /// A last-level table that the leaves fill whole is not zeroed first. The descriptor of a table of leaves above
    /// the last level says it holds no table ([`desc::SW_NO_TABLES`]).
    pub(super) fn chain(
        &self,
        level: u8,
        va: u64,
        leaf_level: u8,
        first_leaf: u64,
        n: usize,
    ) -> Result<(u64, Frames), MapError> {
        let g = self.geometry;
        let entries = 1usize << g.level_bits;
        let whole = leaf_level == 3 && n == entries;
        let levels = usize::from(leaf_level - level);
        let mut frames: Frames = self.zeroed_frames(levels - usize::from(whole))?;
        if whole {
            let granule = 1usize << g.granule_bits;
            match self.allocator.allocate_for_overwrite(granule, granule) {
                Ok(t) => {
                    let _ = frames.push(t);
                }
                Err(e) => {
                    self.free_frames(frames);
                    return Err(MapError::NoMemory(e));
                }
            }
        }
        let mut word = 0;
        for (k, table) in frames.iter().enumerate().rev() {
            let table_level = level + 1 + k as u8;
            let slots = entries_of(table.virt, entries);
            let index = g.index(table_level, va);
            let count = if table_level == leaf_level {
                // Nothing refers to the new table yet.
                fill(
                    &slots[index..index + n],
                    first_leaf,
                    u32::from(g.entry_shift(leaf_level)),
                );
                n
            } else {
                slots[index].store(word, Ordering::Relaxed);
                1
            };
            self.coherency.clean(table.virt.as_ptr(), table.size);
            let no_tables = if table_level == leaf_level && table_level < 3 {
                desc::SW_NO_TABLES
            } else {
                0
            };
            word = self.with_count(desc::table(table.phys.0), table_level, count) | no_tables;
        }
        // The new tables' contents before the descriptor that links them.
        write_barrier();
        Ok((word, frames))
    }

    /// Gives back frames never linked.
    pub(super) fn free_frames(&self, frames: Frames) {
        for t in frames {
            // SAFETY: allocated from this allocator and never published: nothing can reach it.
            unsafe { self.allocator.free(t) };
        }
    }

    pub(super) fn check_range(&self, iova: u64, size: u64) -> Result<(), MapError> {
        let granule = 1u64 << self.geometry.granule_bits;
        if size == 0 || !iova.is_multiple_of(granule) || !size.is_multiple_of(granule) {
            return Err(MapError::Unaligned { iova, size });
        }
        match iova.checked_add(size) {
            Some(end) if end <= 1 << self.format.input_bits => Ok(()),
            _ => Err(MapError::InputOutOfRange { iova, size }),
        }
    }

    /// The first mapped address in `[iova, iova + size)`, if any.
    pub(super) fn first_mapped(&self, iova: u64, size: u64) -> Option<u64> {
        self.first_mapped_in(self.geometry.start_level, self.root_entries(), 0, iova, iova + size)
    }

    /// The first mapped address of `[start, end)` under a table covering from `base`, visiting only the entries
    /// that overlap the range.
    pub(super) fn first_mapped_in(
        &self,
        level: u8,
        entries: &[AtomicU64],
        base: u64,
        start: u64,
        end: u64,
    ) -> Option<u64> {
        let shift = self.geometry.entry_shift(level);
        let first = ((start - base) >> shift) as usize;
        let last = (((end - 1) - base) >> shift) as usize;
        for (i, e) in entries.iter().enumerate().take(last + 1).skip(first) {
            let d = e.load(Ordering::Acquire);
            if !desc::is_valid(d) {
                continue;
            }
            let entry_base = base + ((i as u64) << shift);
            let (from, to) = (start.max(entry_base), end.min(entry_base + (1 << shift)));
            if !desc::is_table(d, level) {
                return Some(from);
            }
            let next = self.table_entries(level + 1, desc::address(d))?;
            if let Some(found) = self.first_mapped_in(level + 1, next, entry_base, from, to) {
                return Some(found);
            }
        }
        None
    }

    /// Maps `[iova, iova + size)` to `[pa, pa + size)` with `prot`, using the largest blocks that alignment allows.
    ///
    /// Every table the mapping needs is allocated before anything is written, so a failure leaves the tables
    /// exactly as they were: nothing was linked, so nothing needs invalidating and no table the SMMU may have
    /// walked is freed. A successful map only adds translations where there were none: it needs no invalidation
    /// (the SMMU caches no invalid entries in the formats used here), and publishes its descriptors with a
    /// barrier before it returns. Over the span of a [`Gather`] not flushed yet (an unmap, or a trim, including
    /// the one a single-page unmap runs past the lazy-free limit) the SMMU may still use the old translations,
    /// through its TLB or through a walk cache naming a table that gather unlinked (whose leaves a range unmap
    /// left in place): flush that gather before mapping there (see the module documentation).
    ///
    /// # Errors
    /// [`MapError::Unaligned`] (the IOVA or the size), [`MapError::UnalignedOutput`] (the physical address),
    /// [`MapError::InputOutOfRange`], [`MapError::OutputOutOfRange`] (the whole output range must fit),
    /// [`MapError::BadProt`], [`MapError::Overlap`], [`MapError::NoMemory`]; nothing changes then (the allocator
    /// has every frame back).
    #[inline]
    pub fn map(&mut self, iova: Iova, pa: PhysAddr, size: u64, prot: Prot) -> Result<(), MapError> {
        let (iova, pa) = (iova.0, pa.0);
        let granule = 1u64 << self.geometry.granule_bits;
        if size == granule
            && (iova | pa) & (granule - 1) == 0
            && iova >> self.format.input_bits == 0
            && pa >> self.format.output_bits == 0
            && Some(prot) == self.last_prot
        {
            // One granule, aligned, inside both address spaces, with the protection of the previous map (already
            // checked): the checks below would all pass.
            self.mark_root(iova, size);
            return self.map_page(iova, pa, self.last_template);
        }
        self.map_range(iova, pa, size, prot)
    }

    /// `map`, every check in order, then the single-page path or the range path.
    #[inline(never)]
    pub(super) fn map_range(&mut self, iova: u64, pa: u64, size: u64, prot: Prot) -> Result<(), MapError> {
        self.check_range(iova, size)?;
        if !pa.is_multiple_of(1 << self.geometry.granule_bits) {
            return Err(MapError::UnalignedOutput { pa, size });
        }
        match pa.checked_add(size) {
            Some(end) if end <= 1 << self.format.output_bits => {}
            _ => return Err(MapError::OutputOutOfRange { pa, size }),
        }
        if !self.expressible(prot) {
            return Err(MapError::BadProt(prot));
        }
        self.mark_root(iova, size);
        if size == 1 << self.geometry.granule_bits {
            self.last_template = desc::leaf(self.format.stage, 0, prot, true);
            self.last_prot = Some(prot);
            return self.map_page(iova, pa, self.last_template);
        }
        let root = self.root_entries();
        let mut needed = (0, 0);
        self.tables_needed(
            self.geometry.start_level,
            Some(root),
            0,
            iova,
            iova + size,
            pa,
            &mut needed,
        )?;
        let granule = 1usize << self.geometry.granule_bits;
        let mut pool = Pool::new(granule);
        for full in [false, true] {
            let count = if full { needed.1 } else { needed.0 };
            if count == 0 {
                continue;
            }
            // Every table the range needs, asked for at once (an allocator's lock taken once, not per table).
            let allocated = self
                .allocator
                .allocate_many(granule, granule, count, full, &mut |table| pool.push(table, full));
            if let Err(e) = allocated {
                self.free_pool(&mut pool);
                return Err(MapError::NoMemory(e));
            }
        }
        let root = self.root.phys.0;
        // Every leaf of the range from one template, encoded once here rather than in every table `map_in` fills.
        let block = desc::leaf(self.format.stage, 0, prot, false);
        self.map_in(
            self.geometry.start_level,
            root,
            0,
            iova,
            iova + size,
            pa,
            block,
            &mut pool,
        );
        debug_assert!(pool.is_empty(), "tables counted exactly");
        self.free_pool(&mut pool);
        write_barrier();
        Ok(())
    }

    /// Gives the frames left in `pool` (never linked) back to the allocator, if any (an allocator's
    /// `free_many` may take its lock even for nothing).
    fn free_pool(&mut self, pool: &mut Pool) {
        if pool.is_empty() {
            return;
        }
        for full in [false, true] {
            // SAFETY: allocated from this allocator by `map` and never linked: nothing can reach them.
            unsafe { self.allocator.free_many(&mut core::iter::from_fn(|| pool.pop(full))) };
        }
    }

    /// Which entries of a table covering from `table_base`, of those from `first` to `last` that `[start, end)`
    /// (output from `pa` at `start`) touches, become leaves in one run: the entries wholly covered, when leaves
    /// are allowed at `level` and the output is aligned to an entry. An empty range when none.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn leaf_run(
        &self,
        level: u8,
        table_base: u64,
        first: usize,
        last: usize,
        start: u64,
        end: u64,
        pa: u64,
    ) -> (usize, usize) {
        let shift = self.geometry.entry_shift(level);
        let leaf_here = level == 3 || self.geometry.block_allowed(level);
        let run_start = if start == table_base + ((first as u64) << shift) {
            first
        } else {
            first + 1
        };
        let run_end = if end == table_base + ((last as u64 + 1) << shift) {
            last + 1
        } else {
            last
        };
        let output = pa + (table_base + ((run_start as u64) << shift)).wrapping_sub(start);
        if leaf_here && run_start < run_end && output.is_multiple_of(1 << shift) {
            (run_start, run_end)
        } else {
            (0, 0)
        }
    }

    /// When `[start, end)` (output from `pa` at `start`) is, inside a new table at `level` covering from
    /// `table_base`, one run of leaves and nothing else (every entry it touches wholly covered, with aligned
    /// output, and leaves allowed at `level`): that run. Such a table is written whole, each entry once (leaves in
    /// the run, 0 elsewhere), so its frame need not be zeroed first.
    #[inline]
    pub(super) fn whole_run(
        &self,
        level: u8,
        table_base: u64,
        start: u64,
        end: u64,
        pa: u64,
    ) -> Option<(usize, usize)> {
        // `leaf_run` covering every entry touched, without computing it: both ends and the output on entry
        // boundaries (and leaves allowed here).
        let shift = self.geometry.entry_shift(level);
        let leaf_here = level == 3 || self.geometry.block_allowed(level);
        let whole = leaf_here && start < end && (start | end | pa) & ((1 << shift) - 1) == 0;
        let run = whole.then(|| {
            (
                ((start - table_base) >> shift) as usize,
                ((end - table_base) >> shift) as usize,
            )
        });
        #[cfg(debug_assertions)]
        {
            let first = ((start - table_base) >> shift) as usize;
            let last = (((end - 1) - table_base) >> shift) as usize;
            let by_run = self.leaf_run(level, table_base, first, last, start, end, pa);
            debug_assert_eq!(run, (by_run == (first, last + 1)).then_some(by_run));
        }
        run
    }

    /// Counts the tables `map_in` will create for `[start, end)` (output from `pa`) below the table `entries`
    /// (`None`: a table still to be created, all invalid) covering from `table_base`: `needed.0` zeroed ones,
    /// `needed.1` tables that the map writes whole (see [`IoPageTable::whole_run`]); and checks, in the same
    /// walk, that nothing in the range is mapped.
    ///
    /// # Errors
    /// [`MapError::Overlap`] with the first mapped address of the range; [`MapError::NoMemory`] when the
    /// allocator does not know a table's physical address (a broken allocator).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn tables_needed(
        &self,
        level: u8,
        entries: Option<&[AtomicU64]>,
        table_base: u64,
        start: u64,
        end: u64,
        pa: u64,
        needed: &mut (usize, usize),
    ) -> Result<(), MapError> {
        let shift = self.geometry.entry_shift(level);
        let entry_size = 1u64 << shift;
        let first = ((start - table_base) >> shift) as usize;
        let last = (((end - 1) - table_base) >> shift) as usize;
        let run = self.leaf_run(level, table_base, first, last, start, end, pa);
        // The run needs no table: only the entries outside it are counted for (at most one at each end); those of
        // an existing table are checked for mappings in address order, the run's between the two ends.
        let (before, after) = match run.0 < run.1 {
            true => (first..run.0, run.1..last + 1),
            false => (first..last + 1, 0..0),
        };
        let run_checked = run.0 >= run.1 || entries.is_none();
        for i in before.chain(after) {
            if !run_checked && i >= run.1 {
                self.run_unmapped(level, entries, table_base, run)?;
            }
            let entry_base = table_base + ((i as u64) << shift);
            let (from, to) = (start.max(entry_base), end.min(entry_base + entry_size));
            let output = pa + (from - start);
            let d = entries.map_or(0, |e| e[i].load(Ordering::Acquire));
            if desc::is_valid(d) && !desc::is_table(d, level) {
                // A page or block maps part of the range.
                return Err(MapError::Overlap { iova: from });
            }
            if desc::is_table(d, level) {
                let next = self
                    .table_entries(level + 1, desc::address(d))
                    .ok_or(MapError::NoMemory(AllocError::OutOfMemory { size: 0 }))?;
                self.tables_needed(level + 1, Some(next), entry_base, from, to, output, needed)?;
            } else if self.whole_run(level + 1, entry_base, from, to, output).is_some() {
                needed.1 += 1;
            } else {
                needed.0 += 1;
                self.tables_needed(level + 1, None, entry_base, from, to, output, needed)?;
            }
        }
        if !run_checked && last < run.1 {
            // No entry after the run.
            self.run_unmapped(level, entries, table_base, run)?;
        }
        Ok(())
    }

    /// Checks that the entries `run` of the existing table `entries` (at `level`, covering from `table_base`)
    /// map nothing: each is invalid, or a table (left empty by `unmap_page`) with nothing mapped below it.
    #[inline(never)]
    fn run_unmapped(
        &self,
        level: u8,
        entries: Option<&[AtomicU64]>,
        table_base: u64,
        run: (usize, usize),
    ) -> Result<(), MapError> {
        let Some(entries) = entries else {
            return Ok(());
        };
        let shift = self.geometry.entry_shift(level);
        let (from, to) = (
            table_base + ((run.0 as u64) << shift),
            table_base + ((run.1 as u64) << shift),
        );
        match self.first_mapped_in(level, entries, table_base, from, to) {
            Some(iova) => Err(MapError::Overlap { iova }),
            None => Ok(()),
        }
    }

    /// Maps `[start, end)` (output from `pa` at `start`) inside the table at `table_phys` (covering from
    /// `table_base`) in one pass over its entries: leaves where an entry is covered and aligned (blocks where the
    /// level allows them), tables below otherwise, taken from `pool` (which `tables_needed` sized) and filled
    /// before they are linked. Returns how many of the table's entries became valid (for its count), and whether a
    /// table was linked into it (which clears its [`desc::SW_NO_TABLES`]). `block` is the block descriptor of
    /// output address 0 with the map's protection ([`desc::leaf`]): a page's adds only the page bit, and each
    /// leaf its output address.
    #[allow(clippy::too_many_arguments)]
    fn map_in(
        &mut self,
        level: u8,
        table_phys: u64,
        table_base: u64,
        start: u64,
        end: u64,
        pa: u64,
        block: u64,
        pool: &mut Pool,
    ) -> (usize, bool) {
        let shift = self.geometry.entry_shift(level);
        let entry_size = 1u64 << shift;
        let count = self.geometry.entries(level);
        let Some(virt) = self.allocator.phys_to_virt(PhysAddr(table_phys)) else {
            // `tables_needed` found every existing table: unreachable with an allocator that keeps its word.
            return (0, false);
        };
        let entries = entries_of(virt, count);
        let first = ((start - table_base) >> shift) as usize;
        let last = (((end - 1) - table_base) >> shift) as usize;
        // The descriptor of output address 0 at a level: each leaf adds its output address.
        let template_at = |level: u8| block | if level == 3 { desc::TABLE_OR_PAGE } else { 0 };
        let template = template_at(level);
        let output = |va: u64| pa + (va - start);
        // Fast path: entries wholly covered, with aligned outputs, become leaves in one run of stores.
        let (run_start, run_end) = self.leaf_run(level, table_base, first, last, start, end, pa);
        let (mut added, mut linked) = (0, false);
        let mut i = first;
        while i <= last {
            let entry_base = table_base + ((i as u64) << shift);
            if i == run_start && run_start < run_end {
                if self.empty.signed() > 0
                    && entries[run_start..run_end]
                        .iter()
                        .any(|e| desc::is_valid(e.load(Ordering::Relaxed)))
                {
                    // Tables that `unmap_page` emptied are still linked inside the run (`map` found nothing
                    // mapped, so every valid entry here leads only to them): a leaf must not replace a linked
                    // table without an invalidation, so map into them instead. That needs no new table: the run
                    // covers them whole, with aligned output, so their entries become leaves too.
                    for (k, e) in entries.iter().enumerate().take(run_end).skip(run_start) {
                        let base = table_base + ((k as u64) << shift);
                        let d = e.load(Ordering::Relaxed);
                        if desc::is_table(d, level) {
                            let (more, below) = self.map_in(
                                level + 1,
                                desc::address(d),
                                base,
                                base,
                                base + entry_size,
                                output(base),
                                block,
                                pool,
                            );
                            self.set_count(e, level + 1, desc::count(d) + more, below);
                        } else {
                            self.store(e, template | output(base));
                            added += 1;
                        }
                    }
                    i = run_end;
                    continue;
                }
                let first_output = output(entry_base);
                // Entries of a live table that `&mut self` keeps from any other CPU-side access.
                fill(&entries[run_start..run_end], template | first_output, u32::from(shift));
                self.coherency
                    .clean(entries[run_start..].as_ptr().cast(), (run_end - run_start) * 8);
                added += run_end - run_start;
                i = run_end;
                continue;
            }
            let entry = &entries[i];
            i += 1;
            let from = start.max(entry_base);
            let to = end.min(entry_base + entry_size);
            let d = entry.load(Ordering::Acquire);
            if desc::is_table(d, level) {
                let (more, below) = self.map_in(
                    level + 1,
                    desc::address(d),
                    entry_base,
                    from,
                    to,
                    output(from),
                    block,
                    pool,
                );
                self.set_count(entry, level + 1, desc::count(d) + more, below);
                continue;
            }
            // Below an invalid entry (`map` checked that nothing is mapped here) a new table, filled before it is
            // linked. A new table whose part of the range is one run of leaves (pages, or blocks where the level
            // allows them) is written whole in one pass, 0 outside the run, so its frame need not be zeroed
            // first (a last-level table whose whole span is mapped is marked full by its count).
            let whole = self.whole_run(level + 1, entry_base, from, to, output(from));
            let Some(table) = pool.pop(whole.is_some()) else {
                // `tables_needed` counted every table: unreachable.
                return (added, linked);
            };
            self.tables.add(1);
            added += 1;
            linked = true;
            // Whether the new table holds a table of its own (below the last level only).
            let mut below = level + 1 == 3;
            let count = if let Some((run_start, run_end)) = whole {
                // A new table: nothing else refers to it yet.
                fill_table(
                    entries_of(table.virt, 1 << self.geometry.level_bits),
                    run_start..run_end,
                    template_at(level + 1) | output(from),
                    u32::from(self.geometry.entry_shift(level + 1)),
                );
                run_end - run_start
            } else {
                let (count, tables) =
                    self.map_in(level + 1, table.phys.0, entry_base, from, to, output(from), block, pool);
                below |= tables;
                count
            };
            self.coherency.clean(table.virt.as_ptr(), table.size);
            let no_tables = if below { 0 } else { desc::SW_NO_TABLES };
            let link = self.with_count(desc::table(table.phys.0), level + 1, count) | no_tables;
            // The filled table must be visible before the descriptor that points to it.
            write_barrier();
            self.store(entry, link);
        }
        (added, linked)
    }
}
