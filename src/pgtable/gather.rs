//! The chain of unlinked tables a [`Gather`] holds: linking, merging, and releasing them after the invalidation.

use super::*;

/// Tables a release gives back per [`FrameAllocator::free_many`] call.
const FREE_BATCH: usize = 64;

impl<A: FrameAllocator> IoPageTable<A> {
    /// Where the chain link of the unlinked level-2 table `entries` (at `virt`) is kept: the first word of its
    /// first last-level table when entry 0 names one (so every pointer to a child survives), else its own first
    /// word.
    pub(super) fn subtree_link_slot(&self, entries: &[AtomicU64], virt: NonNull<u8>) -> &AtomicU64 {
        let first = entries[0].load(Ordering::Relaxed);
        let child0 = if desc::is_table(first, 2) {
            self.allocator.phys_to_virt(PhysAddr(desc::address(first)))
        } else {
            None
        };
        &entries_of(child0.unwrap_or(virt), 1)[0]
    }

    pub(super) fn free_later(&mut self, table_phys: u64, gather: &mut Gather) {
        if self.chain_unlinked(table_phys, gather) {
            self.tables.decrement();
        }
    }

    /// Puts the unlinked table at `table_phys` on `gather`'s chain; false when the allocator does not know it.
    pub(super) fn chain_unlinked(&self, table_phys: u64, gather: &mut Gather) -> bool {
        let Some(virt) = self.allocator.phys_to_virt(PhysAddr(table_phys)) else {
            return false;
        };
        // Chain through the first word: the table is unlinked, and a link is never a valid descriptor. No CPU
        // writes an unlinked table any more (a concurrent map writes only after reserving an entry in a linked
        // table, an unmap only over a valid leaf, and an unlinked table holds none), though one may still read it.
        entries_of(virt, 1)[0].store(gather.freed_head, Ordering::Relaxed);
        gather.freed_head = table_phys | LINK_PRESENT;
        gather.freed += 1;
        gather.tables_unlinked = true;
        true
    }

    /// Moves what `other` collected (its range and its unlinked tables) into `into`, so that one invalidation and
    /// one [`IoPageTable::release`] cover both. `into` is stamped as this table's.
    ///
    /// # Errors
    /// [`ForeignGather`] when either gather was filled by another table: nothing changes, and `other` comes back.
    pub fn merge(&self, into: &mut Gather, other: Gather) -> Result<(), ForeignGather> {
        if !self.owns(into) || !self.owns(&other) {
            return Err(ForeignGather {
                table: self.id,
                gather: other,
            });
        }
        self.merge_owned(into, other);
        Ok(())
    }

    /// [`IoPageTable::merge`] of two gathers the caller has checked are this table's ([`IoPageTable::owns`]).
    pub(crate) fn merge_owned(&self, into: &mut Gather, other: Gather) {
        debug_assert!(self.owns(into) && self.owns(&other));
        into.owner = self.id.0;
        // The count of the newer epoch survives (an older epoch's gathers no longer count); within one epoch the
        // merged gathers add up.
        match into.ticket.cmp(&other.ticket) {
            core::cmp::Ordering::Less => (into.ticket, into.counted) = (other.ticket, other.counted),
            core::cmp::Ordering::Equal => into.counted = into.counted.saturating_add(other.counted),
            core::cmp::Ordering::Greater => {}
        }
        if other.end != other.start {
            into.add_run(other.start, other.end, other.leaf_shift, other.leaves);
        } else {
            into.leaves += other.leaves;
        }
        into.tables_unlinked |= other.tables_unlinked;
        if other.freed_head == 0 {
            return;
        }
        if into.freed_head != 0 {
            // `other`'s chain goes in front: its last link (0 now) names `into`'s first table.
            let mut link = other.freed_head;
            loop {
                let phys = link & !(LINK_SUBTREE | LINK_PRESENT);
                let Some(virt) = self.allocator.phys_to_virt(PhysAddr(phys)) else {
                    // Not this table's memory (cannot happen): keep `into`'s chain rather than lose it.
                    return;
                };
                let entries = entries_of(virt, 1 << self.geometry.level_bits);
                let slot = if link & LINK_SUBTREE != 0 {
                    self.subtree_link_slot(entries, virt)
                } else {
                    &entries[0]
                };
                let next = slot.load(Ordering::Relaxed);
                if next == 0 {
                    slot.store(into.freed_head, Ordering::Relaxed);
                    break;
                }
                link = next;
            }
        }
        into.freed_head = other.freed_head;
        into.freed += other.freed;
    }

    /// Gives the tables `gather` collected back to the allocator. `Iommu::flush` (and every domain operation)
    /// calls it after the invalidation that covers `gather` has completed; call it directly only for a table no
    /// SMMU walks, or after issuing that invalidation yourself.
    ///
    /// # Safety
    /// The invalidation that covers `gather` (by address over its span, or the whole ASID, VMID or regime; not
    /// leaf-only when [`Gather::tables_unlinked`]) has been issued for every SMMU that may walk this table, and a
    /// CMD_SYNC after it has completed: otherwise a walk cache may still name a freed table, which the allocator
    /// may hand out and a walk then read as descriptors.
    ///
    /// # Errors
    /// [`ForeignGather`] for a gather another table filled: nothing is freed, and the gather comes back.
    #[inline]
    pub unsafe fn release(&mut self, gather: Gather) -> Result<(), ForeignGather> {
        if !self.owns(&gather) {
            return Err(ForeignGather { table: self.id, gather });
        }
        if gather.freed_head != 0 {
            self.free_chain(gather.freed_head);
        }
        Ok(())
    }

    #[inline(never)]
    pub(super) fn free_chain(&mut self, head: u64) {
        let size = 1usize << self.geometry.granule_bits;
        // Given back in batches (an allocator's lock taken once per batch, not per table).
        let mut batch: heapless::Vec<DmaBlock, FREE_BATCH> = heapless::Vec::new();
        let allocator = &self.allocator;
        let give_back = |batch: &mut heapless::Vec<DmaBlock, FREE_BATCH>| {
            // SAFETY: each table was allocated by this page table with this size, unlinked, and the caller has
            // completed the invalidation that covers walks through it; its links were read before it got here.
            unsafe {
                allocator.free_many(&mut batch.iter().map(|b| DmaBlock {
                    phys: b.phys,
                    virt: b.virt,
                    size: b.size,
                }))
            };
            // Emptied in place, not moved out: the batch is as large as a few cache lines.
            batch.clear();
        };
        let mut free = |phys: u64, virt: NonNull<u8>| {
            let block = DmaBlock {
                phys: PhysAddr(phys),
                virt,
                size,
            };
            if let Err(block) = batch.push(block) {
                give_back(&mut batch);
                let _ = batch.push(block);
            }
        };
        let mut next = head;
        while next != 0 {
            let phys = next & !(LINK_SUBTREE | LINK_PRESENT);
            let Some(virt) = self.allocator.phys_to_virt(PhysAddr(phys)) else {
                break;
            };
            let entries = entries_of(virt, 1 << self.geometry.level_bits);
            let first = entries[0].load(Ordering::Relaxed);
            let following = if next & LINK_SUBTREE != 0 {
                let slot = self.subtree_link_slot(entries, virt);
                let following = slot.load(Ordering::Relaxed);
                slot.store(0, Ordering::Relaxed);
                for e in entries {
                    let d = e.load(Ordering::Relaxed);
                    if desc::is_table(d, 2)
                        && let Some(child) = self.allocator.phys_to_virt(PhysAddr(desc::address(d)))
                    {
                        free(desc::address(d), child);
                    }
                }
                following
            } else {
                entries[0].store(0, Ordering::Relaxed);
                first
            };
            free(phys, virt);
            next = following;
        }
        give_back(&mut batch);
    }
}
