//! Reading a table: translation of one address, and a walk over every mapping.

use super::*;

impl<A: FrameAllocator> IoPageTable<A> {
    /// The output address `iova` translates to, and the protection, if it is mapped.
    #[inline]
    pub fn translate(&self, iova: Iova) -> Option<(PhysAddr, Prot)> {
        let iova = iova.0;
        if iova >> self.format.input_bits != 0 {
            return None;
        }
        let mut level = self.geometry.start_level;
        let mut phys = self.root.phys.0;
        loop {
            let entries = self.table_entries(level, phys)?;
            let d = entries[self.geometry.index(level, iova)].load(Ordering::Acquire);
            if !desc::is_valid(d) {
                return None;
            }
            if desc::is_table(d, level) {
                phys = desc::address(d);
                level += 1;
                continue;
            }
            let offset = iova & ((1 << self.geometry.entry_shift(level)) - 1);
            return Some((PhysAddr(desc::address(d) + offset), desc::prot(self.format.stage, d)));
        }
    }

    /// The output address `iova` translates to, if it is mapped.
    pub fn iova_to_phys(&self, iova: Iova) -> Option<PhysAddr> {
        self.translate(iova).map(|(pa, _)| pa)
    }

    /// Calls `f` for every mapping (page or block), in address order.
    pub fn walk(&self, mut f: impl FnMut(Mapping)) {
        let stage = self.format.stage;
        self.visit(
            self.geometry.start_level,
            self.root_entries(),
            0,
            &mut with_prot(stage, &mut f),
            None,
        );
    }

    /// [`IoPageTable::walk`] for a caller that holds the table exclusively (`&mut`: no map or unmap can run
    /// meanwhile): each table below the root is read only up to its last valid entry, found by the live-entry
    /// count its descriptor carries, and the root only in the parts a map has reached (its marks, narrowed here
    /// to the parts found live). A domain with a few pages mapped is read in a few entries a table, not whole
    /// tables. Under concurrent maps a count can lag its entries, which is why this takes `&mut self`.
    pub fn walk_exclusive(&mut self, mut f: impl FnMut(Mapping)) {
        let stage = self.format.stage;
        let g = self.geometry;
        let (marks, per) = (*self.root_marks.get_mut(), 1usize << self.root_mark_shift());
        let (root, mut live) = (self.root_entries(), 0u64);
        let mut f = with_prot(stage, &mut f);
        let mut left = marks;
        while left != 0 {
            let part = left.trailing_zeros() as usize;
            left &= left - 1;
            let Some(entries) = root.get(part * per..(part + 1) * per) else {
                break;
            };
            let base = ((part * per) as u64) << g.entry_shift(g.start_level);
            if self.visit_counted(g.start_level, entries, base, &mut f, None) > 0 {
                live |= 1 << part;
            }
        }
        *self.root_marks.get_mut() = live;
    }

    /// [`IoPageTable::visit`] that stops reading a table once it has seen `live` valid entries (its descriptor's
    /// count; `None` for the root, read whole), and says how many valid entries it saw. Only with the table held
    /// exclusively.
    fn visit_counted(
        &self,
        level: u8,
        entries: &[AtomicU64],
        base: u64,
        f: &mut dyn FnMut(Mapping, u64),
        live: Option<usize>,
    ) -> usize {
        let shift = self.geometry.entry_shift(level);
        let mut seen = 0;
        for (i, e) in entries.iter().enumerate() {
            if live.is_some_and(|n| seen >= n) {
                return seen;
            }
            let d = e.load(Ordering::Acquire);
            if !desc::is_valid(d) {
                continue;
            }
            seen += 1;
            let iova = base + ((i as u64) << shift);
            if desc::is_table(d, level) {
                if let Some(next) = self.table_entries(level + 1, desc::address(d)) {
                    self.visit_counted(level + 1, next, iova, f, Some(desc::count(d)));
                }
            } else {
                let size = 1u64 << shift;
                f(
                    Mapping {
                        iova,
                        pa: desc::address(d),
                        size,
                        prot: Prot::empty(),
                    },
                    d,
                );
            }
        }
        seen
    }

    pub(super) fn visit(
        &self,
        level: u8,
        entries: &[AtomicU64],
        base: u64,
        f: &mut dyn FnMut(Mapping, u64),
        within: Option<(u64, u64)>,
    ) {
        let shift = self.geometry.entry_shift(level);
        for (i, e) in entries.iter().enumerate() {
            let iova = base + ((i as u64) << shift);
            let size = 1u64 << shift;
            if let Some((start, end)) = within
                && (iova + size <= start || end <= iova)
            {
                continue;
            }
            let d = e.load(Ordering::Acquire);
            if !desc::is_valid(d) {
                continue;
            }
            if desc::is_table(d, level) {
                if let Some(next) = self.table_entries(level + 1, desc::address(d)) {
                    self.visit(level + 1, next, iova, f, within);
                }
            } else {
                f(
                    Mapping {
                        iova,
                        pa: desc::address(d),
                        size,
                        prot: Prot::empty(),
                    },
                    d,
                );
            }
        }
    }
}

/// The visitors' callback for a walker's `f`: each leaf with the protection its descriptor gives.
fn with_prot(stage: Stage, f: &mut impl FnMut(Mapping)) -> impl FnMut(Mapping, u64) + '_ {
    move |m, d| {
        f(Mapping {
            prot: desc::prot(stage, d),
            ..m
        })
    }
}
