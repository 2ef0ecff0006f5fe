//! The review findings of live update, each a test that failed before its fix.

use super::*;
use crate::Iova;

/// The ASID of a stage-1 domain.
pub(super) fn stage1_asid<A: FrameAllocator>(smmu: &Iommu<A>, d: DomainId) -> u16 {
    match smmu.domains.get(d).unwrap().translation {
        Translation::Stage1 { asid, .. } => asid,
        _ => unreachable!(),
    }
}

/// Review finding 4. A hand-off with the SMMU running, through the whole documented lifecycle
/// (`running_smmu`, `adopt_running`, `restore_handover`, `retrieve`, `finish_handover`): the previous image's
/// stream that no record names (0x20, a domain that was not preserved) keeps its live stage-1 STE, whose CD
/// uses an ASID this image's allocator considers free. The next domain this image creates gets that ASID
/// and is attached elsewhere: both streams then translate under the same (VMID 0, ASID) tag, so each may hit
/// the other's TLB entries (the old device reaching the new domain's memory, the new device the old
/// domain's). Nothing but a call the docs ask for (`abort_unrestored_streams`) prevents it.
#[test]
fn finding4_after_a_running_hand_off_no_new_domain_shares_an_asid_with_a_stream_the_previous_image_left() {
    use crate::handover::pool::HandoverMemory;
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let pool = region.pool();
    *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
    let core = pool.take_window(pool.window_bytes().unwrap()).unwrap();
    let mut first: Iommu<&'static HandoverMemory> = model.smmu().init(core, &InitOptions::default()).unwrap();
    let options = Stage1Options {
        input_bits: 39,
        el2: false,
    };
    let kept = first.create_stage1(pool.take_memory().unwrap(), options).unwrap();
    first
        .map(kept, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW)
        .unwrap();
    first.attach(kept, 0x10).unwrap();
    // Not preserved: its tables in ordinary memory, its stream live at the hand-off. This driver refuses to
    // prepare a running hand-off with such a stream (`PrepareError::UnpreservedStream`), so it is attached
    // after the prepare, as a previous image that is not this driver may leave it.
    let left = first.create_stage1(frames, options).unwrap();
    first
        .map(left, Iova(0x1000), PhysAddr(0x9000_0000), 0x1000, RW)
        .unwrap();
    let left_asid = stage1_asid(&first, left);
    first.preserve(kept, 0x77).unwrap();
    first.prepare_handover(pool, BASE, 3, SURVIVING).unwrap();
    assert_eq!(
        first.attach(left, 0x20),
        Err(DomainError::StreamsFrozen { generation: 3 })
    );
    as_another_driver(&mut first, |first| first.attach(left, 0x20)).unwrap();
    core::mem::forget(first);

    let pool = region.pool();
    let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
    let next = model
        .smmu()
        .adopt_running(core, &InitOptions::default(), &running)
        .unwrap();
    next.restore_handover(pool, BASE, &ANYWHERE).unwrap();
    let d = next.retrieve(0x77).unwrap();
    next.finish_handover(pool, BASE).unwrap();
    assert_eq!(next.handover_phase(), HandoverPhase::Idle);
    assert_eq!(next.iova_to_phys(d, Iova(0x1000)), Ok(Some(PhysAddr(0x8000_0000))));
    // The hand-off is over. A new domain on another stream.
    let fresh = next.create_stage1(frames, options).unwrap();
    next.map(fresh, Iova(0x1000), PhysAddr(0xa000_0000), 0x1000, RW)
        .unwrap();
    next.attach(fresh, 0x40).unwrap();
    let fresh_asid = stage1_asid(&next, fresh);
    let inherited_live = next.low_level().ste(0x20).map(|s| s.config()) == Ok(Config::Stage1);
    assert!(
        !(inherited_live && fresh_asid == left_asid),
        "stream 0x20 (the previous image's, unrestored) still translates with ASID {left_asid}, which the new \
         domain on stream 0x40 was given"
    );
    core::mem::forget(next);
}

/// Review finding 5 (issue #21 item 2, "a stream's substreams all use its regime", against a region whose CRC
/// is valid). `prepare_handover` records a substream only in the record of the domain that holds the whole
/// stream (`RecordError::SubstreamOfAnotherDomain`), but the restore only checks that *some* record holds
/// it. So records in which an EL2 stage-1 domain holds substream 3 of a stream whose whole-stream record is
/// an NS-EL1 domain are accepted: the STE keeps STRW = NS-EL1, the EL2 domain is booked on that substream, and
/// whatever it translates there is cached as NS-EL1 entries while every invalidation of the EL2 domain (its
/// unmaps, its free) is TLBI_EL2_*, which misses them. The restore must refuse such records.
#[test]
fn finding5_a_restore_refuses_a_substream_of_a_stream_another_record_holds() {
    // IDR0.HYP (EL2 contexts) and SSIDSIZE 5.
    let (idr0, idr1) = (
        crate::smmu::tests::IDRS[0].1 | 1 << 9,
        crate::smmu::tests::IDRS[1].1 | 5 << 6,
    );
    let frames = frames();
    let mut region = Region::new();
    {
        let model = Model::start_with_idrs(frames, idr0, idr1);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let whole = arena_stage1(&mut smmu, pool);
        let el2 = smmu
            .create_stage1(
                pool.take_memory().unwrap(),
                Stage1Options {
                    input_bits: 39,
                    el2: true,
                },
            )
            .unwrap();
        smmu.map(el2, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
        smmu.attach(whole, 0x10).unwrap();
        smmu.attach(el2, 0x11).unwrap();
        smmu.preserve(whole, 0x61).unwrap();
        smmu.preserve(el2, 0x62).unwrap();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        core::mem::forget(smmu);
    }
    // A region with a valid CRC in which the EL2 domain holds substream 3 of the NS-EL1 domain's stream.
    tamper(region.pool(), |instance| {
        let record = instance.records.iter_mut().find(|r| r.token == 0x62).unwrap();
        assert_eq!(record.kind, RecordKind::Stage1El2);
        let stream = &mut record.streams[0];
        (stream.sid, stream.ssid) = (0x10, 3);
    });
    let model = Model::start_with_idrs(frames, idr0, idr1);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let restored = smmu.restore_handover(pool, BASE, &ANYWHERE);
    if restored.is_ok() {
        let strw = smmu.low_level().ste(0x10).unwrap().0[1] >> 30 & 0b11;
        let d = smmu.retrieve(0x62).unwrap();
        let attachments = smmu.attached(d).unwrap().to_vec();
        let before = model.seen.lock().unwrap().commands.len();
        smmu.unmap(d, Iova(0x1000), 0x1000).unwrap();
        let issued = issued_since(&model, before);
        core::mem::forget(smmu);
        panic!(
            "restored the EL2 domain on {attachments:x?}, a substream of stream 0x10 whose STE has STRW \
             {strw:#b} (NS-EL1); its unmap invalidates only {issued:x?}"
        );
    }
    core::mem::forget(smmu);
}

/// Review finding 6 (issue #21 item 2: "an EL2 entry left cached when another EL2 domain attaches"). When an
/// EL2 domain's last detach cannot drop its entries (TLBI_EL2_ALL fails), `el2_stale` makes the next EL2
/// attach issue TLBI_EL2_ALL first. A restore that installs a record's EL2 stream does not: the restored EL2
/// domain's stream starts translating while the previous EL2 domain's entries, which match every EL2 context,
/// may still be cached, so its DMA can use them and reach the other domain's memory.
#[test]
fn finding6_a_restored_el2_stream_is_installed_only_after_stale_el2_entries_are_dropped() {
    let frames = frames();
    let mut region = Region::new();
    el2_first_image(&mut region, frames, false);
    let model = el2_model(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    // This image's EL2 domain, on another ASID than the record's, attached, then detached while TLBI_EL2_ALL
    // is refused: its EL2 entries may stay cached.
    let spare = smmu.low_level().allocate_asid().unwrap();
    let mine = smmu.create_stage1(frames, EL2).unwrap();
    smmu.low_level().free_asid(spare).unwrap();
    smmu.map(mine, Iova(0x1000), PhysAddr(0x9000_0000), 0x1000, RW).unwrap();
    smmu.attach(mine, 0x11).unwrap();
    model.refuse.store(
        crate::hw::command::opcode::TLBI_EL2_ALL,
        std::sync::atomic::Ordering::SeqCst,
    );
    assert!(smmu.detach(0x11).is_err());
    model.refuse.store(0, std::sync::atomic::Ordering::SeqCst);
    assert!(
        smmu.domains.book.lock().el2_stale,
        "the EL2 entries of {mine} may still be cached"
    );
    let before = model.seen.lock().unwrap().commands.len();
    smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
    let issued = issued_since(&model, before);
    let installed = issued.iter().position(|i| *i == Issued::Ste { sid: 0x10 }).unwrap();
    assert!(
        issued[..installed].contains(&Issued::El2All),
        "the restored EL2 stream 0x10 was installed with the stale EL2 entries still cached: {issued:?}"
    );
    core::mem::forget(smmu);
}

/// Review finding 7. `finish_handover` keeps a restored stage-2 parent whose nested domain was retrieved (the
/// live nested domain translates through it), waiting in `restored` after the phase is back to `Idle`. A
/// later restore that is refused (here a pool that is not set up; a corrupt region does the same) goes through
/// `contain_refused_restore`, which forgets *every* domain in `restored`, this earlier hand-off's parent
/// included, and gives back its VMID, while the retrieved nested domain's STE still translates with that VMID
/// and that parent's stage-2 table. The next stage-2 domain may get the VMID (shared TLB entries), and the
/// nested domain can no longer be freed (its parent is stale).
#[test]
fn finding7_a_refused_restore_never_takes_away_a_parent_an_earlier_hand_off_left_to_a_live_nested_domain() {
    let frames = frames();
    let mut region = Region::new();
    first_image(&mut region, frames);
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
    let nested = smmu.retrieve(0x53).unwrap();
    smmu.finish_handover(pool, BASE).unwrap();
    assert_eq!(smmu.handover_phase(), HandoverPhase::Idle);
    assert!(
        smmu.domains.book.lock().restored.contains_key(&0x52),
        "the parent stays for its nested domain"
    );
    let ste = smmu.low_level().ste(0x18).unwrap();
    assert_eq!(ste.config(), Config::Nested);
    let vmid = ste.vmid();
    assert!(smmu.core.vmid_taken(vmid));
    // A restore refused for a reason that has nothing to do with that parent.
    let unset: &'static HandoverPool = Box::leak(Box::new(HandoverPool::new()));
    assert!(matches!(
        smmu.restore_handover(unset, BASE, &ANYWHERE),
        Err(RestoreError::Pool(_))
    ));
    let still_nested = smmu.low_level().ste(0x18).map(|s| s.config()) == Ok(Config::Nested);
    assert!(
        !still_nested || (smmu.core.vmid_taken(vmid) && smmu.retrieve(0x52).is_ok()),
        "stream 0x18 still translates nested with VMID {vmid}, whose parent was forgotten (VMID free again: {})",
        !smmu.core.vmid_taken(vmid)
    );
    let _ = nested;
    core::mem::forget(smmu);
}

/// Review finding 9. An SMMU whose own structures (stream table, its level-2 spans, the queues, and the
/// driver's own array of span pointers) come from a handover arena (as for a hand-off with the SMMU running)
/// does not claim that arena, so a domain can be created with it (only a prepared hand-off refuses that, as
/// `MemorySealed`). Freeing that domain retires the arena: the pool takes it back and hands it out again,
/// zeroed, while the SMMU is still translating through the stream table in it. (Letting the next domain map
/// in the reused arena aborts this test binary: the driver's span-pointer array is overwritten by page-table
/// descriptors and `EntryTable::entry` builds a slice from one, table.rs:209; a descriptor written over a live
/// STE is read by the SMMU as that STE.)
#[test]
fn finding9_a_domain_never_frees_the_arena_that_holds_the_smmus_own_stream_table() {
    use crate::handover::pool::HandoverMemory;
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let pool = region.pool();
    *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
    let core = pool.take_window(pool.window_bytes().unwrap()).unwrap();
    let smmu: Iommu<&'static HandoverMemory> = model.smmu().init(core, &InitOptions::default()).unwrap();
    let strtab = smmu.configuration().stream_table_base;
    let other = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
    smmu.attach(other, 0x10).unwrap();
    assert_eq!(smmu.low_level().ste(0x10).map(|s| s.config()), Ok(Config::Stage1));
    assert_eq!(pool.memories_in_use(), 1, "the SMMU's own arena");
    if let Ok(d) = smmu.create_stage1(core, Stage1Options::default()) {
        smmu.map(d, Iova(0), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
        smmu.free_domain(d).unwrap();
    }
    assert_eq!(
        pool.memories_in_use(),
        1,
        "the arena holding the live stream table at {strtab:#x} went back to the pool, to be handed out again zeroed"
    );
    core::mem::forget(smmu);
}

/// Review 2: a running stream table whose level-1 descriptor for StreamIDs 0x100..0x200 is a copy of the one
/// for 0x0..0x100 (both name the span of the restored stream 0x10: each exactly the descriptor the driver
/// writes for that span, so `StreamTable::adopt` takes it). Adopted and restored, StreamIDs 0x10 and 0x110
/// share one STE: whatever this image installs for one is what the other translates with, so attaching a
/// domain to 0x110 (another device, another owner) redirects the restored domain's device 0x10 to it.
#[test]
fn review_a_running_stream_table_whose_level1_descriptors_share_a_span_is_not_adopted() {
    let frames = frames();
    let mut region = Region::new();
    let model = running_first_image(&mut region, frames);
    let pool = region.pool();
    let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
    let index = ((running.strtab_base - region.extent.base) / 8) as usize;
    assert_ne!(region.memory[index], 0, "the span of 0x0..0x100 exists");
    assert_eq!(region.memory[index + 1], 0);
    region.memory[index + 1] = region.memory[index];
    let adopted = model.smmu().adopt_running(core, &InitOptions::default(), &running);
    let refused = adopted.as_ref().err().copied();
    if let Ok(next) = adopted {
        if next.restore_handover(pool, BASE, &ANYWHERE).is_err() {
            core::mem::forget(next);
            return;
        }
        let restored = next.low_level().ste(0x10).unwrap().config();
        let d = next.retrieve(0x77).unwrap();
        assert_eq!(next.iova_to_phys(d, Iova(0x1000)), Ok(Some(PhysAddr(0x8000_0000))));
        // Another domain, for another device.
        let other = next.create_stage2(frames, Stage2Options { input_bits: 40 }).unwrap();
        next.attach(other, 0x110).unwrap();
        let (ste_10, ste_110) = (
            next.low_level().ste(0x10).unwrap(),
            next.low_level().ste(0x110).unwrap(),
        );
        core::mem::forget(next);
        assert_ne!(
            ste_10,
            ste_110,
            "accepted: stream 0x10, attached to the restored stage-1 domain 0x77 (its STE {restored:?} once \
             the restore returned), now translates with the STE installed for stream 0x110 ({:?})",
            ste_10.config()
        );
    }
    // Refused as the other refusals of `adopt_running` are: the SMMU disabled, every transaction aborting.
    assert!(
        matches!(refused, Some(crate::InitError::StreamTableNotAdoptable { .. })),
        "refused as a stream table not adoptable: {refused:?}"
    );
    assert!(disabled_aborting(&model), "{:x?}", cr0_and_gbpa(&model));
}

/// Finding 3's other half: a level-1 descriptor naming, as a span, memory over the level-1 table itself (the
/// table is 16 KiB-aligned as a span is: the descriptor is exactly the one the driver writes for a span
/// there), so the SMMU would read level-1 descriptors as STEs and STE writes would rewrite descriptors.
#[test]
fn a_running_stream_table_whose_span_overlaps_its_level1_table_is_not_adopted() {
    let frames = frames();
    let mut region = Region::new();
    let model = running_first_image(&mut region, frames);
    let pool = region.pool();
    let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
    let crate::stream::StreamTableFormat::TwoLevel { split, .. } = running.format else {
        panic!("a 2-level stream table: {:?}", running.format);
    };
    let over = crate::hw::ste::l1_descriptor(PhysAddr(running.strtab_base), split + 1).unwrap();
    let index = ((running.strtab_base - region.extent.base) / 8) as usize;
    region.memory[index + 1] = over;
    let adopted = model.smmu().adopt_running(core, &InitOptions::default(), &running);
    assert!(
        matches!(
            adopted.as_ref().err(),
            Some(crate::InitError::StreamTableNotAdoptable { .. })
        ),
        "{:?}",
        adopted.as_ref().err()
    );
    core::mem::forget(adopted);
    assert!(disabled_aborting(&model), "{:x?}", cr0_and_gbpa(&model));
}

/// Review 2: the threat model says a device whose stream the previous image left translating across a running
/// hand-off "reaches only what those STEs map, which that image's `prepare_handover` checked". But
/// `prepare_handover` checks only the preserved domains: the first image's stream 0x30 bypasses (every byte,
/// the handover region and its arenas included) from the prepare until the next image's restore aborts it, and
/// the restore then adopts whatever that device wrote into the records and the preserved memory.
#[test]
fn review_a_running_hand_off_leaves_no_unchecked_stream_translating_after_prepare() {
    use crate::handover::pool::HandoverMemory;
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let pool = region.pool();
    *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
    let core = pool.take_window(pool.window_bytes().unwrap()).unwrap();
    let mut first: Iommu<&'static HandoverMemory> = model.smmu().init(core, &InitOptions::default()).unwrap();
    let d = arena_stage1_on(&mut first, pool);
    first.map(d, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    first.attach(d, 0x10).unwrap();
    // SAFETY: the device behind the stream is trusted with all memory (a test of bypass).
    unsafe { first.low_level().attach_bypass(0x30) }.unwrap();
    first.preserve(d, 0x77).unwrap();
    let prepared = first.prepare_handover(pool, BASE, 3, SURVIVING);
    let left = first.low_level().ste(0x30).unwrap().config();
    core::mem::forget(first);
    assert!(
        prepared.is_err() || !matches!(left, Config::Bypass | Config::Stage1 | Config::Stage2 | Config::Nested),
        "prepared ({prepared:?}) with stream 0x30 left {left:?} across the hand-off, unchecked: its device can \
         write the region and the preserved arenas before the next image restores them"
    );
    // Refused naming the stream, with nothing written.
    assert_eq!(prepared, Err(PrepareError::UnpreservedStream { sid: 0x30, ssid: 0 }));
    assert!(pool.lock_metadata().unwrap().iter().all(|&b| b == 0), "nothing written");
}

/// Finding 5, the rest of the rule: for a running hand-off, a stream attached to a domain that is not preserved,
/// and a substream of a preserved stream attached to one, are refused too (each named); once they are detached
/// (or made to abort) the hand-off is prepared, and from then on the stream configuration is frozen: no attach
/// to any domain, no substream, no bypass (each a typed error that changes nothing, no command issued), while
/// making a stream abort stays allowed; cancelling unfreezes it. A hand-off through a warm reset freezes no
/// stream.
#[test]
fn a_running_hand_off_translates_only_preserved_streams_and_freezes_the_stream_configuration() {
    use crate::handover::pool::HandoverMemory;
    // SSIDSIZE 5 (IDR1[10:6]): substreams exist.
    let idr1 = crate::smmu::tests::IDRS[1].1 | 5 << 6;
    let idr0 = crate::smmu::tests::IDRS[0].1;
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start_with_idrs(frames, idr0, idr1);
    let pool = region.pool();
    *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
    let core = pool.take_window(pool.window_bytes().unwrap()).unwrap();
    let mut first: Iommu<&'static HandoverMemory> = model.smmu().init(core, &InitOptions::default()).unwrap();
    let d = arena_stage1_on(&mut first, pool);
    first.map(d, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    first.attach(d, 0x10).unwrap();
    first.preserve(d, 0x77).unwrap();
    let other = first.create_stage1(frames, Stage1Options::default()).unwrap();
    first.attach(other, 0x20).unwrap();
    first.attach_substream(other, 0x10, 3).unwrap();
    let nothing_written = |pool: &HandoverPool| pool.lock_metadata().unwrap().iter().all(|&b| b == 0);
    assert_eq!(
        first.prepare_handover(pool, BASE, 3, SURVIVING),
        Err(PrepareError::UnpreservedStream { sid: 0x10, ssid: 3 })
    );
    first.detach_substream(0x10, 3).unwrap();
    assert_eq!(
        first.prepare_handover(pool, BASE, 3, SURVIVING),
        Err(PrepareError::UnpreservedStream { sid: 0x20, ssid: 0 })
    );
    assert!(nothing_written(pool));
    first.detach(0x20).unwrap();
    first.prepare_handover(pool, BASE, 3, SURVIVING).unwrap();
    assert_eq!(first.handover_phase(), HandoverPhase::Prepared { generation: 3 });

    // Frozen: nothing issued, nothing changed.
    let before = model.seen.lock().unwrap().consumed.len();
    let frozen = DomainError::StreamsFrozen { generation: 3 };
    assert_eq!(first.attach(other, 0x20), Err(frozen));
    assert_eq!(first.attach_substream(other, 0x10, 3), Err(frozen));
    assert_eq!(
        // SAFETY: the device behind the stream is trusted with all memory (a test of bypass).
        unsafe { first.low_level().attach_bypass(0x30) }.err(),
        Some(AttachError::StreamsFrozen { generation: 3 })
    );
    assert_eq!(
        first.attach(d, 0x11),
        Err(DomainError::HandoverPrepared { token: 0x77 })
    );
    assert_eq!(issued_since(&model, before), [], "nothing issued");
    for sid in [0x11, 0x20, 0x30] {
        assert_eq!(
            first.low_level().ste(sid).unwrap().config(),
            Config::Abort,
            "stream {sid:#x}"
        );
    }
    assert_eq!(first.attached(other).as_deref(), Ok(&[][..]));
    for e in [
        std::format!("{frozen}"),
        std::format!("{}", AttachError::StreamsFrozen { generation: 3 }),
    ] {
        assert!(e.contains("generation 3"), "{e}");
    }
    // Aborting stays allowed.
    first.low_level().attach_abort(0x40).unwrap();
    // Cancelled: the configuration is free again (and a warm-reset hand-off below freezes nothing).
    first.cancel_handover(pool, BASE).unwrap();
    // SAFETY: the device behind the stream is trusted with all memory (a test of bypass).
    unsafe { first.low_level().attach_bypass(0x30) }.unwrap();
    first.low_level().attach_abort(0x30).unwrap();
    core::mem::forget(first);

    // Through a warm reset (the SMMU's structures not in an arena): nothing translates across it, so streams
    // are neither checked nor frozen.
    let model = Model::start(frames);
    let mut smmu = boot(&model, frames);
    let pool = Region::new().pool();
    let kept = arena_stage1(&mut smmu, pool);
    smmu.attach(kept, 0x10).unwrap();
    smmu.preserve(kept, 0x78).unwrap();
    // SAFETY: the device behind the stream is trusted with all memory (a test of bypass).
    unsafe { smmu.low_level().attach_bypass(0x30) }.unwrap();
    smmu.prepare_handover(pool, BASE, 4, SURVIVING).unwrap();
    let not_preserved = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
    smmu.attach(not_preserved, 0x20).unwrap();
    // SAFETY: the device behind the stream is trusted with all memory (a test of bypass).
    unsafe { smmu.low_level().attach_bypass(0x31) }.unwrap();
    core::mem::forget(smmu);
}

pub(super) fn arena_stage1_on(
    smmu: &mut Iommu<&'static crate::handover::pool::HandoverMemory>,
    pool: &'static HandoverPool,
) -> DomainId {
    let options = Stage1Options {
        input_bits: 39,
        el2: false,
    };
    smmu.create_stage1(pool.take_memory().unwrap(), options).unwrap()
}
