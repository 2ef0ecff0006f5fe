//! Gathers tied to their domain, pending deferred unmaps, handles that never come back, and the first review's findings.

use super::*;
use crate::Iova;

/// The page table of a stage-1 or stage-2 domain, for tests that change its settings.
pub(super) fn table_of<'a>(smmu: &'a mut Iommu<&'static HeapFrames>, d: DomainId) -> &'a mut IoPageTable<DomainMemory> {
    let slot = &mut smmu.domains.slots[usize::from(d.index())];
    match &mut slot.state.get_mut().as_mut().unwrap().translation {
        Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => table,
        Translation::Nested { .. } | Translation::Fixed(_) => unreachable!(),
    }
}

/// The Leaf bit (word 1, bit 0) of every TLBI consumed since `from`.
pub(super) fn leaf_bits_since(model: &Model, from: usize) -> Vec<bool> {
    let seen = model.seen.lock().unwrap();
    seen.commands[from..]
        .iter()
        .filter(|w| !matches!(Issued::decode(**w), Issued::Sync))
        .map(|w| w[1] & 1 != 0)
        .collect()
}

#[test]
fn sync_domain_refuses_a_gather_another_domain_filled() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let a = s1(&mut smmu, frames);
    let b = s1(&mut smmu, frames);
    // A page at 0 keeps a's level-2 table: the unmap below unlinks one last-level table.
    smmu.map(a, Iova(0), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    smmu.map(a, Iova(0x20_0000), PhysAddr(0x8000_1000), 0x2000, RW).unwrap();
    smmu.map(b, Iova(0x20_0000), PhysAddr(0x9000_0000), 0x2000, RW).unwrap();
    let mut g = Gather::default();
    assert_eq!(smmu.unmap_deferred(a, Iova(0x20_0000), 0x2000, &mut g), Ok(0x2000));
    assert_eq!(g.freed_tables(), 1);
    let live = frames.live_blocks();
    let before = consumed(&model);
    assert_eq!(
        smmu.sync_domain(b, &mut g),
        Err(DomainError::ForeignGather { domain: b })
    );
    assert_eq!(issued_since(&model, before), [], "b gets no command");
    assert_eq!(frames.live_blocks(), live, "a's unlinked table is not freed");
    // b's own unmaps refuse it too, and the gather is left as it was: a still syncs it.
    assert_eq!(
        smmu.unmap_deferred(b, Iova(0x20_0000), 0x1000, &mut g),
        Err(DomainError::ForeignGather { domain: b })
    );
    assert_eq!(smmu.iova_to_phys(b, Iova(0x20_0000)), Ok(Some(PhysAddr(0x9000_0000))));
    assert_eq!(g.freed_tables(), 1);
    let asid = asid_of(&smmu, a);
    smmu.sync_domain(a, &mut g).unwrap();
    let mut expected: Vec<Issued> =
        crate::hw::command::plan_range_invalidation(0x20_0000, 0x20_0000, Granule::Size4K, 0)
            .unwrap()
            .map(|piece| Issued::NhVa {
                vmid: 0,
                asid,
                address: piece.address,
            })
            .collect();
    expected.push(Issued::Sync);
    assert_eq!(issued_since(&model, before), expected);
    assert_eq!(frames.live_blocks(), live - 1, "freed after a's invalidation");
    assert!(g.is_empty() && g.owner().is_none(), "synced: empty, reusable");
}

#[test]
fn an_over_limit_trim_in_a_deferred_unmap_is_flushed_inside_the_call() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let d = s1(&mut smmu, frames);
    let asid = asid_of(&smmu, d);
    table_of(&mut smmu, d).set_lazy_free_limit(1);
    // A page at 0 keeps the level-2 table; one page in each of two last-level tables.
    smmu.map(d, Iova(0), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    smmu.map(d, Iova(0x20_0000), PhysAddr(0x8000_1000), 0x1000, RW).unwrap();
    smmu.map(d, Iova(0x40_0000), PhysAddr(0x8000_2000), 0x1000, RW).unwrap();
    let live = frames.live_blocks();
    let before = consumed(&model);
    let mut g = Gather::default();
    // The first emptied table stays linked (at the limit); the second goes over it: a trim of both.
    assert_eq!(smmu.unmap_deferred(d, Iova(0x20_0000), 0x1000, &mut g), Ok(0x1000));
    assert_eq!(issued_since(&model, before), []);
    assert_eq!(smmu.unmap_deferred(d, Iova(0x40_0000), 0x1000, &mut g), Ok(0x1000));
    assert_eq!(g.freed_tables(), 0, "the gather returned holds no unlinked table");
    // The trim was flushed inside the call: a walk-cache invalidation (not leaf-only) of both tables' spans
    // under the domain's ASID, its CMD_SYNC, and only then were the two tables freed.
    let mut expected: Vec<Issued> =
        crate::hw::command::plan_range_invalidation(0x20_0000, 0x40_0000, Granule::Size4K, 0)
            .unwrap()
            .map(|piece| Issued::NhVa {
                vmid: 0,
                asid,
                address: piece.address,
            })
            .collect();
    expected.push(Issued::Sync);
    assert_eq!(issued_since(&model, before), expected);
    assert!(leaf_bits_since(&model, before).iter().all(|leaf| !leaf));
    assert_eq!(frames.live_blocks(), live - 2);
    assert_eq!(smmu.domain_table(d).unwrap().empty_tables(), 0);
    // What is left for the sync: the two pages, leaf-only.
    let before = consumed(&model);
    smmu.sync_domain(d, &mut g).unwrap();
    let mut expected: Vec<Issued> =
        crate::hw::command::plan_range_invalidation(0x20_0000, 0x20_1000, Granule::Size4K, 0)
            .unwrap()
            .map(|piece| Issued::NhVa {
                vmid: 0,
                asid,
                address: piece.address,
            })
            .collect();
    expected.push(Issued::Sync);
    assert_eq!(issued_since(&model, before), expected);
    assert!(leaf_bits_since(&model, before).iter().all(|leaf| *leaf));
}

#[test]
fn a_map_over_a_pending_deferred_unmap_is_refused_until_the_sync() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let d = s1(&mut smmu, frames);
    smmu.map(d, Iova(0), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    smmu.map(d, Iova(0x20_0000), PhysAddr(0x8000_1000), 0x2000, RW).unwrap();
    let mut g = Gather::default();
    // A range unmap: the last-level table is unlinked with its leaves in place, and the walk cache may still
    // name it (and the TLB the old translations) until the sync.
    assert_eq!(smmu.unmap_deferred(d, Iova(0x20_0000), 0x2000, &mut g), Ok(0x2000));
    let live = frames.live_blocks();
    // Anywhere in the unlinked table's span (a walk cache may name it for any address there), and a range
    // that reaches into it from below.
    let pending = |iova| {
        Err(DomainError::PendingInvalidation {
            iova,
            start: 0x20_0000,
            end: 0x40_0000,
        })
    };
    for iova in [0x20_0000, 0x20_1000, 0x3f_f000] {
        assert_eq!(
            smmu.map(d, Iova(iova), PhysAddr(0x9000_0000), 0x1000, RW),
            pending(iova)
        );
    }
    assert_eq!(
        smmu.map(d, Iova(0x1f_e000), PhysAddr(0x9000_0000), 0x4000, RW),
        pending(0x20_0000)
    );
    assert_eq!(frames.live_blocks(), live, "nothing allocated");
    assert_eq!(smmu.iova_to_phys(d, Iova(0x20_0000)), Ok(None));
    assert_eq!(smmu.iova_to_phys(d, Iova(0x1f_e000)), Ok(None));
    // Elsewhere: allowed.
    smmu.map(d, Iova(0x40_0000), PhysAddr(0x9000_0000), 0x1000, RW).unwrap();
    smmu.sync_domain(d, &mut g).unwrap();
    smmu.map(d, Iova(0x20_0000), PhysAddr(0x9000_1000), 0x1000, RW).unwrap();
    assert_eq!(smmu.iova_to_phys(d, Iova(0x20_0000)), Ok(Some(PhysAddr(0x9000_1000))));
}

#[test]
fn the_pending_span_clears_with_the_last_gather_or_a_whole_domain_invalidation() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let d = s1(&mut smmu, frames);
    let asid = asid_of(&smmu, d);
    for k in 0..4u64 {
        smmu.map(d, Iova(k << 21), PhysAddr(0x8000_0000 + (k << 12)), 0x1000, RW)
            .unwrap();
    }
    let refused = |smmu: &mut Iommu<&'static HeapFrames>, iova| {
        matches!(
            smmu.map(d, iova, PhysAddr(0x9000_0000), 0x1000, RW),
            Err(DomainError::PendingInvalidation { .. })
        )
    };
    // Two gathers outstanding: syncing one keeps the other's part of the span refused.
    let (mut g1, mut g2) = (Gather::default(), Gather::default());
    smmu.unmap_deferred(d, Iova(0x20_0000), 0x1000, &mut g1).unwrap();
    smmu.unmap_deferred(d, Iova(0x40_0000), 0x1000, &mut g2).unwrap();
    smmu.sync_domain(d, &mut g1).unwrap();
    assert!(refused(&mut smmu, Iova(0x40_0000)));
    smmu.sync_domain(d, &mut g2).unwrap();
    assert!(!refused(&mut smmu, Iova(0x40_0000)), "the last one synced: cleared");
    // A dropped gather keeps its span refused until the whole domain is invalidated.
    {
        let mut dropped = Gather::default();
        smmu.unmap_deferred(d, Iova(0x60_0000), 0x1000, &mut dropped).unwrap();
    }
    assert!(refused(&mut smmu, Iova(0x60_0000)));
    let before = consumed(&model);
    smmu.invalidate_domain(d).unwrap();
    assert_eq!(
        issued_since(&model, before),
        [Issued::NhAsid { vmid: 0, asid }, Issued::Sync]
    );
    assert!(!refused(&mut smmu, Iova(0x60_0000)));
    // A gather counted before that invalidation no longer counts: syncing it does not clear the span of one
    // taken after.
    let (mut old, mut new) = (Gather::default(), Gather::default());
    smmu.unmap_deferred(d, Iova(0x20_0000), 0x1000, &mut old).unwrap();
    smmu.invalidate_domain(d).unwrap();
    smmu.unmap_deferred(d, Iova(0x40_0000), 0x1000, &mut new).unwrap();
    smmu.sync_domain(d, &mut old).unwrap();
    assert!(refused(&mut smmu, Iova(0x40_0000)));
    smmu.sync_domain(d, &mut new).unwrap();
    assert!(!refused(&mut smmu, Iova(0x40_0000)));
}

/// Gathers merged through the table (which `domain_table` hands out) stand for every deferred unmap they
/// hold: syncing the merged one clears the pending span, as syncing each would have (it was left refused for
/// good, one count per merged gather never taken back).
#[test]
fn a_merged_gather_uncounts_every_deferred_unmap_it_holds_when_synced() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let d = s1(&mut smmu, frames);
    let asid = asid_of(&smmu, d);
    let refused = |smmu: &mut Iommu<&'static HeapFrames>, iova| {
        matches!(
            smmu.map(d, iova, PhysAddr(0x9000_0000), 0x1000, RW),
            Err(DomainError::PendingInvalidation { .. })
        )
    };
    let (a, b) = (0x100_0000, 0x120_0000);
    let fresh = |smmu: &mut Iommu<&'static HeapFrames>| {
        for iova in [a, b] {
            smmu.map(d, Iova(iova), PhysAddr(0x8800_0000), 0x1000, RW).unwrap();
        }
    };
    fresh(&mut smmu);
    let (mut g1, mut g2) = (Gather::default(), Gather::default());
    smmu.unmap_deferred(d, Iova(a), 0x1000, &mut g1).unwrap();
    smmu.unmap_deferred(d, Iova(b), 0x1000, &mut g2).unwrap();
    smmu.domain_table(d).unwrap().merge(&mut g1, g2).unwrap();
    let before = consumed(&model);
    smmu.sync_domain(d, &mut g1).unwrap();
    // Both pages in one invalidation (range TLBIs over the gather's span), one CMD_SYNC.
    let issued = issued_since(&model, before);
    assert_eq!(
        issued.first(),
        Some(&Issued::NhVa {
            vmid: 0,
            asid,
            address: a
        }),
        "{issued:?}"
    );
    assert_eq!(issued.iter().filter(|i| **i == Issued::Sync).count(), 1, "{issued:?}");
    assert_eq!(issued.last(), Some(&Issued::Sync));
    assert!(!refused(&mut smmu, Iova(b)), "both synced: cleared");
    smmu.unmap(d, Iova(b), 0x1000).unwrap();
    // An older epoch's gather merged into a newer one's counts as the newer alone, and the other way round.
    for older_into_newer in [true, false] {
        fresh(&mut smmu);
        let (mut old, mut new) = (Gather::default(), Gather::default());
        smmu.unmap_deferred(d, Iova(a), 0x1000, &mut old).unwrap();
        smmu.invalidate_domain(d).unwrap();
        smmu.unmap_deferred(d, Iova(b), 0x1000, &mut new).unwrap();
        assert!(refused(&mut smmu, Iova(b)));
        let table = smmu.domain_table(d).unwrap();
        let mut merged = if older_into_newer {
            table.merge(&mut new, old).unwrap();
            new
        } else {
            table.merge(&mut old, new).unwrap();
            old
        };
        drop(table);
        smmu.sync_domain(d, &mut merged).unwrap();
        assert!(!refused(&mut smmu, Iova(b)), "{older_into_newer}");
        smmu.unmap(d, Iova(b), 0x1000).unwrap();
    }
}

#[test]
fn a_domain_handle_never_becomes_valid_again() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let first = s1(&mut smmu, frames);
    smmu.free_domain(first).unwrap();
    // Slot 0 has been reused until its generation is the last one.
    smmu.domains.slots[0]
        .generation
        .store(u64::MAX, crate::sync::Ordering::Relaxed);
    let last = s1(&mut smmu, frames);
    assert_eq!(last.index(), 0);
    smmu.free_domain(last).unwrap();
    let next = s1(&mut smmu, frames);
    assert_ne!(next, first, "{next} was handed out before");
    assert_eq!(smmu.domain_kind(first), Err(DomainError::StaleDomain(first)));
    assert_eq!(smmu.domain_kind(last), Err(DomainError::StaleDomain(last)));
    assert_eq!(next.index(), 1, "slot 0 is retired");
    assert_eq!(smmu.domains.book.lock().free_slots(), DEFAULT_DOMAINS - 2);
}

/// A substream whose attach failed at an invalidation is recorded: its domain cannot be freed, and
/// `detach_substream` makes the CD invalid (CFGI_CD + CMD_SYNC) and drops the domain's TLB entries, after which
/// the domain can go.
#[test]
fn a_substream_left_by_a_failed_attach_is_cleaned_up_by_its_detach() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    let frames = frames();
    // SSIDSIZE 5 (IDR1[10:6]).
    let model = Model::start_with_idrs(frames, IDRS[0].1, IDRS[1].1 | 5 << 6);
    let mut smmu = smmu(&model, frames);
    let whole = s1(&mut smmu, frames);
    let sub = s1(&mut smmu, frames);
    smmu.attach(whole, SID).unwrap();
    // The second CFGI_CD (the one after V is set) is refused.
    let consumed_so_far = Arc::new(AtomicUsize::new(0));
    let (count, refuse) = (Arc::clone(&consumed_so_far), Arc::clone(&model.refuse));
    *model.probe.lock().unwrap() = Some(std::boxed::Box::new(move || {
        if count.fetch_add(1, Ordering::SeqCst) == 1 {
            refuse.store(opcode::CFGI_CD, Ordering::SeqCst);
        }
        0
    }));
    assert!(matches!(
        smmu.attach_substream(sub, SID, 3),
        Err(DomainError::CdTable(CdTableError::Invalidation(_)))
    ));
    *model.probe.lock().unwrap() = None;
    model.refuse.store(0, Ordering::SeqCst);
    assert_eq!(smmu.attached(sub).as_deref(), Ok(&[(SID, 3)][..]));
    assert!(matches!(
        smmu.free_domain(sub),
        Err(DomainError::StillAttached { attachments: 1, .. })
    ));
    let asid = asid_of(&smmu, sub);
    let before = model.seen.lock().unwrap().commands.len();
    smmu.detach_substream(SID, 3).unwrap();
    assert_eq!(
        issued_since(&model, before),
        [
            // V = 0 first, then the rest of the CD cleared, each step invalidated.
            Issued::Cd { sid: SID, ssid: 3 },
            Issued::Sync,
            Issued::Cd { sid: SID, ssid: 3 },
            Issued::Sync,
            Issued::NhAsid { vmid: 0, asid },
            Issued::Sync
        ]
    );
    let index = smmu.domains.book.lock().stream(SID).unwrap();
    let cd = smmu.domains.book.lock().streams[index]
        .cd_table
        .as_ref()
        .unwrap()
        .read(3)
        .unwrap();
    assert!(!cd.is_valid());
    smmu.free_domain(sub).unwrap();
}

/// Review finding 1 (issue #21, item 1: "never release a table except after the invalidation that covers it").
/// Dropping an `Iommu` is a safe call. It must not give a domain's page tables back to the allocator
/// while the SMMU still translates through them (SMMUEN = 1, the STE naming the CD that names the table):
/// the allocator would hand those frames out again, and a walk would read whatever is written there next.
#[test]
fn finding1_dropping_the_smmu_never_frees_tables_it_still_walks() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let d = s1(&mut smmu, frames);
    smmu.map(d, Iova(0x40_0000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    smmu.attach(d, SID).unwrap();
    assert_eq!(smmu.low_level().ste(SID).unwrap().config(), Config::Stage1);
    let root = smmu.domain_table(d).unwrap().root();
    assert!(frames.phys_to_virt(root).is_some());
    drop(smmu);
    // SAFETY: the model's live register block.
    let translating = unsafe { reg32(model.base, 0x20).read_volatile() } & 1 != 0;
    let root_freed = frames.phys_to_virt(root).is_none();
    assert!(
        !(translating && root_freed),
        "SMMUEN = 1 and stream {SID:#x} still walks the table at {root}, which went back to the allocator"
    );
}

/// Review finding 2. `Iommu::submit` is public and safe, and says an extra batch "cannot change what a
/// domain translates". A CMD_SYNC with an MSI completion (SIG_IRQ, MSIAddress != 0) is a 32-bit write the SMMU
/// itself performs to any physical address on an SMMU with IDR0.MSI: here into a live page table's first
/// descriptor (the low word of a descriptor: valid, table/page bit, attributes and output address bits
/// [31:12]), i.e. a new translation to memory no domain maps. Such a command must never reach the queue from
/// safe code (through `Batch::push` or `Batch::push_words`).
#[test]
fn finding2_a_public_batch_cannot_make_the_smmu_write_memory() {
    use crate::hw::command::{Shareability, SyncCompletion};
    let frames = frames();
    // IDR0.MSI (bit 13): the SMMU performs CMD_SYNC's MSI write.
    let model = Model::start_with(frames, IDRS[0].1 | 1 << 13);
    let mut smmu = smmu(&model, frames);
    assert!(smmu.features().msi);
    let d = s1(&mut smmu, frames);
    smmu.map(d, Iova(0x40_0000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    smmu.attach(d, SID).unwrap();
    let root = smmu.domain_table(d).unwrap().root().0;
    let mut batch = Batch::new();
    batch
        .push(&Command::Sync {
            completion: SyncCompletion::Msi {
                address: root,
                // A table descriptor naming PA 0x4000_0000.
                data: 0x4000_0003,
                shareability: Shareability::Inner,
                attributes: 0xf,
            },
        })
        .unwrap();
    let before = model.seen.lock().unwrap().commands.len();
    let submitted = smmu.low_level().submit(&batch);
    let msi_writes = model.seen.lock().unwrap().commands[before..]
        .iter()
        .filter(|w| w[0] as u8 == opcode::SYNC && (w[0] >> 12) & 0b11 == 0b01 && w[1] & !0b11 != 0)
        .count();
    assert!(
        submitted.is_err() && msi_writes == 0,
        "safe code made the SMMU write {:#x} to the page table at {root:#x} ({msi_writes} MSI write(s), {submitted:?})",
        0x4000_0003
    );
}

/// Review finding 3. `attach_substream` whose second CFGI_CD fails returns `DomainError::CdTable` with the
/// domain's CD written and valid in the stream's CD table (the hitless writer stops after setting V), but the
/// substream is not recorded. Nothing then stops `free_domain`: the domain's page tables go back to the
/// allocator and its ASID is free again, while the valid CD at that substream still names both. (`attach`
/// records the stream on the same kind of failure "so that the domain cannot be freed under it".)
#[test]
fn finding3_a_substream_cd_left_valid_by_a_failed_attach_keeps_its_domain_from_being_freed() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    let frames = frames();
    // SSIDSIZE 5 (IDR1[10:6]).
    let model = Model::start_with_idrs(frames, IDRS[0].1, IDRS[1].1 | 5 << 6);
    let mut smmu = smmu(&model, frames);
    let whole = s1(&mut smmu, frames);
    let sub = s1(&mut smmu, frames);
    smmu.map(sub, Iova(0x40_0000), PhysAddr(0x8000_0000), 0x1000, RW)
        .unwrap();
    smmu.attach(whole, SID).unwrap();
    let root = smmu.domain_table(sub).unwrap().root();
    // The first CFGI_CD + CMD_SYNC (qwords 1..7 written) complete; from then on CFGI_CD is refused, so the
    // step that sets V cannot be invalidated.
    let consumed_so_far = Arc::new(AtomicUsize::new(0));
    let (count, refuse) = (Arc::clone(&consumed_so_far), Arc::clone(&model.refuse));
    *model.probe.lock().unwrap() = Some(std::boxed::Box::new(move || {
        if count.fetch_add(1, Ordering::SeqCst) == 1 {
            refuse.store(opcode::CFGI_CD, Ordering::SeqCst);
        }
        0
    }));
    let attached = smmu.attach_substream(sub, SID, 3);
    *model.probe.lock().unwrap() = None;
    model.refuse.store(0, Ordering::SeqCst);
    assert!(matches!(attached, Err(DomainError::CdTable(_))), "{attached:?}");
    let index = smmu.domains.book.lock().stream(SID).unwrap();
    let cd = smmu.domains.book.lock().streams[index]
        .cd_table
        .as_ref()
        .unwrap()
        .read(3)
        .unwrap();
    let freed = smmu.free_domain(sub);
    assert!(
        !(cd.is_valid() && freed.is_ok()),
        "substream 3 of stream {SID:#x} keeps a valid CD (ASID {}) naming the table at {root}, and its domain was \
         freed: the table is back in the allocator ({}), the ASID free for the next domain",
        cd.asid(),
        frames.phys_to_virt(root).is_none()
    );
}
