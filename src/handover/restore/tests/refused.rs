//! Refused restores and rebuilds: what they abort and invalidate before anything goes back, forbidden transitions, and a finish that fails half-way.

use super::*;
use crate::Iova;

/// The record's page table, rewritten so that only a walk finds it broken (its table count cleared, so the
/// rebuild walks it; a table descriptor pointing outside the domain's arena): the rebuild fails after it took
/// the domain's arena back.
pub(super) fn break_the_recorded_table(region: &mut Region, pool: &HandoverPool) {
    let mut root = 0;
    tamper(pool, |instance| {
        let table = instance.records[0].table.as_mut().unwrap();
        root = table.root;
        (table.tables, table.empty) = (0, 0);
    });
    // IOVA 0x1000: entry 0 of the level-1 root, a table descriptor.
    let index = ((root - region.extent.base) / 8) as usize;
    assert_eq!(region.memory[index] & 0b11, 0b11);
    region.memory[index] = 0x1_0000_0000 | 0b11;
}

/// A running hand-off whose rebuild fails after it took an arena back: the previous image's STEs (one of which
/// walks that arena) abort and CFGI_ALL + CMD_SYNC complete while the arena is still taken; it goes back to the
/// pool only then.
#[test]
fn a_refused_rebuild_gives_its_arenas_back_only_after_every_stream_aborts_and_cfgi_all() {
    let frames = frames();
    let mut region = Region::new();
    let model = running_first_image(&mut region, frames);
    let pool = region.pool();
    break_the_recorded_table(&mut region, pool);
    let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
    let next = model
        .smmu()
        .adopt_running(core, &InitOptions::default(), &running)
        .unwrap();
    *model.probe.lock().unwrap() = Some(Box::new(move || pool.memories_in_use()));
    let before = model.seen.lock().unwrap().commands.len();
    // Trusting the recorded tables, so that the broken one is found by the rebuild (after its arena was taken),
    // not by verification before it.
    let trusted = RestoreOptions {
        verify: crate::handover::verify::Verification::TrustRecordedTables,
        ..ANYWHERE
    };
    let error = next.restore_handover(pool, BASE, &trusted).unwrap_err();
    assert!(
        matches!(
            error,
            RestoreError::Rebuild {
                token: 0x77,
                what: RebuildFailure::Table(MapError::NotAdoptable(_))
            }
        ),
        "{error}"
    );
    assert!(every_ste_aborts(&next));
    let issued = issued_since(&model, before);
    let probed = model.seen.lock().unwrap().probed[before..].to_vec();
    assert_eq!(
        issued[issued.len() - 3..],
        [Issued::CfgiAll, Issued::NsnhAll, Issued::Sync],
        "{issued:?}"
    );
    assert!(issued.contains(&Issued::Ste { sid: 0x10 }), "{issued:?}");
    assert!(
        probed.iter().all(|&p| p == Some(2)),
        "the SMMU's arena and the domain's stay taken until the last CMD_SYNC: {probed:?}"
    );
    assert_eq!(pool.memories_in_use(), 1, "the domain's arena is back afterwards");
    // The region still names the domain's frames: given back, they are named again, and no memory takes them.
    let named: std::vec::Vec<Extent> = {
        let metadata = pool.lock_metadata().unwrap();
        let decoded = crate::handover::format::sample::decode(&metadata, pool.pool().unwrap()).unwrap();
        decoded.instances[0]
            .records
            .iter()
            .flat_map(|r| r.extents.iter().collect::<std::vec::Vec<_>>())
            .collect()
    };
    assert!(!named.is_empty());
    let other = pool.take_memory().unwrap();
    while let Ok(block) = other.allocate_zeroed(4096, 4096) {
        assert!(
            named.iter().all(|e| !e.contains(block.phys.0, 4096)),
            "{:#x}",
            block.phys.0
        );
    }
    core::mem::forget(next);
}

/// The same with the command queue refusing every CFGI_STE: the streams cannot be aborted one by one, so the
/// refusal turns translation off with every incoming transaction aborting (GBPA.ABORT = 1), and says so through
/// `is_enabled`.
#[test]
fn a_refused_restore_whose_aborts_fail_turns_the_smmu_off_with_gbpa_abort() {
    let frames = frames();
    let mut region = Region::new();
    let model = running_first_image(&mut region, frames);
    let pool = region.pool();
    break_the_recorded_table(&mut region, pool);
    let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
    let next = model
        .smmu()
        .adopt_running(core, &InitOptions::default(), &running)
        .unwrap();
    model.refuse.store(
        crate::hw::command::opcode::CFGI_STE,
        std::sync::atomic::Ordering::SeqCst,
    );
    assert!(next.restore_handover(pool, BASE, &ANYWHERE).is_err());
    assert!(!next.is_enabled());
    assert!(disabled_aborting(&model), "{:x?}", cr0_and_gbpa(&model));
    assert_eq!(
        pool.memories_in_use(),
        1,
        "the domain's arena is back only because translation is off"
    );
    core::mem::forget(next);
}

/// After a warm reset, a rebuild that fails after it took an arena back (a substream's CD invalidation
/// refused): CFGI_ALL + CMD_SYNC complete while the arena is taken, and it goes back only then.
#[test]
fn after_a_warm_reset_a_refused_rebuild_invalidates_everything_before_its_arena_goes_back() {
    let idr1 = crate::smmu::tests::IDRS[1].1 | 5 << 6;
    let idr0 = crate::smmu::tests::IDRS[0].1;
    let frames = frames();
    let mut region = Region::new();
    {
        let model = Model::start_with_idrs(frames, idr0, idr1);
        let smmu = boot(&model, frames);
        let pool = region.pool();
        let whole = smmu
            .create_stage1(pool.take_memory().unwrap(), Stage1Options::default())
            .unwrap();
        let dropped = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
        smmu.attach(whole, 0x10).unwrap();
        smmu.attach_substream(dropped, 0x10, 3).unwrap();
        smmu.preserve(whole, 0x61).unwrap();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        core::mem::forget(smmu);
    }
    let model = Model::start_with_idrs(frames, idr0, idr1);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    *model.probe.lock().unwrap() = Some(Box::new(move || pool.memories_in_use()));
    model
        .refuse
        .store(crate::hw::command::opcode::CFGI_CD, std::sync::atomic::Ordering::SeqCst);
    let before = model.seen.lock().unwrap().commands.len();
    let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
    assert!(
        matches!(
            error,
            RestoreError::Rebuild {
                token: 0x61,
                what: RebuildFailure::CdTable(_)
            }
        ),
        "{error}"
    );
    let issued = issued_since(&model, before);
    let probed = model.seen.lock().unwrap().probed[before..].to_vec();
    let n = issued.len();
    assert_eq!(
        issued[n - 3..],
        [Issued::CfgiAll, Issued::NsnhAll, Issued::Sync],
        "{issued:?}"
    );
    assert_eq!(
        probed[n - 3..],
        [Some(1); 3],
        "the arena is taken until the last CMD_SYNC"
    );
    assert_eq!(pool.memories_in_use(), 0);
    assert!(every_ste_aborts(&smmu));
    assert!(smmu.retrieve(0x61).is_err());
}

/// The live-update lifecycle (the table in `crate::handover`): every transition it forbids is a typed error
/// that changes nothing.
#[test]
fn every_forbidden_handover_transition_is_a_typed_error_that_changes_nothing() {
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let mut smmu = boot(&model, frames);
    let pool = region.pool();
    let d = arena_stage1(&mut smmu, pool);
    smmu.map(d, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    smmu.attach(d, 0x10).unwrap();
    let late = arena_stage1(&mut smmu, pool);
    assert_eq!(smmu.handover_phase(), HandoverPhase::Idle);
    // Idle: nothing to cancel (the region may hold a previous image's records, still to restore).
    assert_eq!(smmu.cancel_handover(pool, BASE), Err(PrepareError::NotPrepared));
    smmu.preserve(d, 0x51).unwrap();
    smmu.prepare_handover(pool, BASE, 5, SURVIVING).unwrap();
    assert_eq!(smmu.handover_phase(), HandoverPhase::Prepared { generation: 5 });
    // Prepared: a domain preserved now would not be in the records, and vanish in the next image.
    assert_eq!(
        smmu.preserve(late, 0x52),
        Err(DomainError::HandoverPrepared { token: 0x52 })
    );
    assert_eq!((smmu.preserved(0x52), smmu.token_of(late)), (None, Ok(None)));
    assert_eq!(
        smmu.unpreserve(0x51),
        Err(DomainError::HandoverPrepared { token: 0x51 })
    );
    assert_eq!(
        smmu.restore_handover(pool, BASE, &ANYWHERE).err(),
        Some(RestoreError::HandoverPrepared { generation: 5 })
    );
    assert_eq!(
        smmu.finish_handover(pool, BASE),
        Err(FinishError::HandoverPrepared { generation: 5 })
    );
    assert_eq!(smmu.handover_phase(), HandoverPhase::Prepared { generation: 5 });
    let snapshot: std::vec::Vec<u8> = (0..4096).map(|i| *region.byte(i)).collect();
    // Cancelled and prepared again: the region records what is preserved now.
    smmu.cancel_handover(pool, BASE).unwrap();
    smmu.preserve(late, 0x52).unwrap();
    smmu.unpreserve(0x52).unwrap();
    smmu.prepare_handover(pool, BASE, 5, SURVIVING).unwrap();
    let again: std::vec::Vec<u8> = (0..4096).map(|i| *region.byte(i)).collect();
    assert_eq!(again, snapshot, "the refused calls changed nothing the records say");
    core::mem::forget(smmu);
    drop(model);

    // The next image.
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    assert_eq!(smmu.restore_handover(pool, BASE, &ANYWHERE).map(|r| r.domains), Ok(1));
    assert_eq!(smmu.handover_phase(), HandoverPhase::Restored { generation: 5 });
    let mine = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
    // Restored: no second restore, no prepare before finish, no cancel, no token a waiting domain holds.
    assert_eq!(
        smmu.restore_handover(pool, BASE, &ANYWHERE).err(),
        Some(RestoreError::AlreadyRestored { generation: 5 })
    );
    assert_eq!(
        smmu.prepare_handover(pool, BASE, 6, SURVIVING),
        Err(PrepareError::RestoreNotFinished { generation: 5 })
    );
    assert_eq!(smmu.cancel_handover(pool, BASE), Err(PrepareError::NotPrepared));
    let waiting = *smmu.domains.book.lock().restored.get(&0x51).unwrap();
    assert_eq!(
        smmu.preserve(mine, 0x51),
        Err(DomainError::TokenInUse {
            token: 0x51,
            domain: waiting
        })
    );
    assert_eq!(smmu.token_of(mine), Ok(None));
    // Retrieved and freed: the record can never bring it back.
    let d = smmu.retrieve(0x51).unwrap();
    smmu.detach(0x10).unwrap();
    smmu.free_domain(d).unwrap();
    assert_eq!(
        smmu.restore_handover(pool, BASE, &ANYWHERE).err(),
        Some(RestoreError::AlreadyRestored { generation: 5 })
    );
    assert_eq!(pool.memories_in_use(), 0, "nothing taken back again");
    assert_ne!(smmu.low_level().ste(0x10).map(|s| s.config()), Ok(Config::Stage1));
    // Not even another driver over the same region (a second image, or this one reset before finishing): the
    // restore consumed the records.
    let model2 = Model::start(frames);
    let other = boot(&model2, frames);
    assert_eq!(other.restore_handover(pool, BASE, &ANYWHERE).map(|r| r.domains), Ok(0));
    assert_eq!(other.handover_phase(), HandoverPhase::Idle);
    assert_eq!(smmu.finish_handover(pool, BASE), Ok(FinishReport { unclaimed: 0 }));
    assert_eq!(smmu.handover_phase(), HandoverPhase::Idle);
    assert_eq!(smmu.restore_handover(pool, BASE, &ANYWHERE).map(|r| r.domains), Ok(0));
    smmu.free_domain(mine).unwrap();
}

/// A finish that fails half way (the invalidation of the second unclaimed domain refused) keeps that domain
/// waiting and the hand-off restored (no second restore); finishing again frees it; a reset at any point
/// restores nothing again.
#[test]
fn a_finish_that_fails_half_way_stays_restored_until_finished_again() {
    let frames = frames();
    let mut region = Region::new();
    {
        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let s1 = arena_stage1(&mut smmu, pool);
        smmu.attach(s1, 0x10).unwrap();
        let s2 = smmu
            .create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 40 })
            .unwrap();
        smmu.attach(s2, 0x20).unwrap();
        smmu.preserve(s1, 0x51).unwrap();
        smmu.preserve(s2, 0x52).unwrap();
        smmu.prepare_handover(pool, BASE, 8, SURVIVING).unwrap();
        core::mem::forget(smmu);
    }
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    assert_eq!(smmu.restore_handover(pool, BASE, &ANYWHERE).map(|r| r.domains), Ok(2));
    // The stage-2 domain's VMID invalidation is refused: the stage-1 one is freed, the stage-2 one waits.
    model.refuse.store(
        crate::hw::command::opcode::TLBI_S12_VMALL,
        std::sync::atomic::Ordering::SeqCst,
    );
    assert!(matches!(smmu.finish_handover(pool, BASE), Err(FinishError::Domain(_))));
    assert_eq!(smmu.handover_phase(), HandoverPhase::Restored { generation: 8 });
    assert!(
        smmu.domains.book.lock().restored.contains_key(&0x52) && !smmu.domains.book.lock().restored.contains_key(&0x51)
    );
    assert_eq!(
        smmu.restore_handover(pool, BASE, &ANYWHERE).err(),
        Some(RestoreError::AlreadyRestored { generation: 8 })
    );
    assert_eq!(pool.memories_in_use(), 1, "the freed domain's arena is not taken back");
    // A reset now: the next image finds nothing to restore.
    let model2 = Model::start(frames);
    let other = boot(&model2, frames);
    assert_eq!(
        other
            .restore_handover(region.pool(), BASE, &ANYWHERE)
            .map(|r| r.domains),
        Ok(0)
    );
    // The queue works again: finishing frees what waits.
    model.refuse.store(0, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(smmu.finish_handover(pool, BASE), Ok(FinishReport { unclaimed: 1 }));
    assert_eq!(smmu.handover_phase(), HandoverPhase::Idle);
    assert_eq!(pool.memories_in_use(), 0);
}

/// While a hand-off is prepared, the SMMU's own arena (it holds the stream table the next image adopts) is
/// sealed: a domain created with it is refused as such, not as the allocation failure it would become.
#[test]
fn a_domain_cannot_be_created_with_memory_a_prepared_hand_off_sealed() {
    use crate::handover::pool::HandoverMemory;
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let pool = region.pool();
    *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
    let core = pool.take_window(pool.window_bytes().unwrap()).unwrap();
    let smmu: Iommu<&'static HandoverMemory> = model.smmu().init(core, &InitOptions::default()).unwrap();
    smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
    assert_eq!(
        smmu.create_stage1(core, Stage1Options::default()),
        Err(DomainError::MemorySealed)
    );
    assert_eq!(smmu.domains.book.lock().free_slots(), crate::domain::DEFAULT_DOMAINS);
    smmu.cancel_handover(pool, BASE).unwrap();
    core::mem::forget(smmu);
}

/// A refused restore gives the frames it adopted back named (the region still names them), never free for a
/// moment: a CPU allocating meanwhile takes none of them.
#[test]
fn a_refused_restore_never_lets_a_named_frame_go() {
    use core::sync::atomic::{AtomicBool, Ordering};
    let frames = frames();
    let mut region = Region::new();
    let model = running_first_image(&mut region, frames);
    let pool = region.pool();
    break_the_recorded_table(&mut region, pool);
    let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
    let next = model
        .smmu()
        .adopt_running(core, &InitOptions::default(), &running)
        .unwrap();
    let named: std::vec::Vec<Extent> = {
        let metadata = pool.lock_metadata().unwrap();
        let decoded = crate::handover::format::sample::decode(&metadata, pool.pool().unwrap()).unwrap();
        decoded.instances[0]
            .records
            .iter()
            .flat_map(|r| r.extents.iter().collect::<std::vec::Vec<_>>())
            .collect()
    };
    static STOP: AtomicBool = AtomicBool::new(false);
    STOP.store(false, Ordering::SeqCst);
    // Another CPU: a domain growing, taking every frame that is free.
    let other = pool.take_memory().unwrap();
    let grabber = std::thread::spawn(move || {
        let mut got = std::vec::Vec::new();
        while !STOP.load(Ordering::SeqCst) {
            if let Ok(block) = other.allocate_for_overwrite(4096, 4096) {
                got.push(block.phys.0);
            }
        }
        got
    });
    while pool.free_frames() != 0 {
        std::thread::yield_now();
    }
    let trusted = RestoreOptions {
        verify: crate::handover::verify::Verification::TrustRecordedTables,
        ..ANYWHERE
    };
    next.restore_handover(pool, BASE, &trusted).unwrap_err();
    std::thread::sleep(std::time::Duration::from_millis(20));
    STOP.store(true, Ordering::SeqCst);
    let got = grabber.join().unwrap();
    let taken: std::vec::Vec<u64> = got
        .into_iter()
        .filter(|&p| named.iter().any(|e| e.contains(p, 4096)))
        .collect();
    assert!(taken.is_empty(), "frames the region names handed out: {taken:x?}");
    core::mem::forget(next);
}
