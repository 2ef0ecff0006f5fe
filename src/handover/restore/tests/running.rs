//! A hand-off with the SMMU left running: adopting it, checking what it runs with, and aborting what the previous image left.

use super::*;
use crate::Iova;

/// Rewrites the region's records with `change` applied and the CRC recomputed: a corruption only checks
/// deeper than the CRC can find.
pub(super) fn tamper(pool: &HandoverPool, change: impl FnOnce(&mut crate::handover::format::sample::OwnedInstance)) {
    use crate::handover::format::sample;
    let region = pool.metadata_extent().unwrap();
    let pool_extent = pool.pool().unwrap();
    let mut bytes = pool.lock_metadata().unwrap();
    let (mut instances, generation) = {
        let decoded = format::sample::decode(&bytes, pool_extent).unwrap();
        (sample::owned(&decoded), decoded.generation)
    };
    change(&mut instances[0]);
    sample::encode_owned(&instances, generation, region, pool_extent, &mut bytes).unwrap();
}

/// SMMU_CR0 and SMMU_GBPA as the model holds them.
pub(super) fn cr0_and_gbpa(model: &Model) -> (u32, u32) {
    let read = |offset| {
        // SAFETY: the model's live register block.
        unsafe { crate::smmu::tests::reg32(model.base, offset).read_volatile() }
    };
    (read(0x20), read(0x44))
}

/// Translation off and every incoming transaction aborting: CR0.SMMUEN = 0 and GBPA.ABORT = 1.
pub(super) fn disabled_aborting(model: &Model) -> bool {
    let (cr0, gbpa) = cr0_and_gbpa(model);
    cr0 & 1 == 0 && gbpa & (1 << 20) != 0
}

/// Every STE of the span that holds StreamIDs 0..256 aborts (an invalid STE aborts too, with C_BAD_STE).
pub(super) fn every_ste_aborts<A: FrameAllocator>(smmu: &Iommu<A>) -> bool {
    (0..256).all(|sid| {
        matches!(
            smmu.low_level().ste(sid).map(|s| s.config()),
            Ok(Config::Abort | Config::Invalid)
        )
    })
}

/// A first image that hands off with its SMMU running: its structures in a handover arena, a stage-1 domain
/// (ASID recorded) in another attached to stream 0x10, stream 0x30 bypassing; preserved as 0x77, prepared,
/// forgotten. The model keeps running for the next image. Stream 0x30's bypass is written after the prepare
/// ([`leave_bypassing`]): this driver refuses to prepare a running hand-off with it, but a previous image
/// need not be this driver, and the next image's containment is what these tests prove.
pub(super) fn running_first_image(region: &mut Region, frames: &'static HeapFrames) -> Model {
    use crate::handover::pool::HandoverMemory;
    let model = Model::start(frames);
    let pool = region.pool();
    *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
    let core = pool.take_window(pool.window_bytes().unwrap()).unwrap();
    let mut first: Iommu<&'static HandoverMemory> = model.smmu().init(core, &InitOptions::default()).unwrap();
    let options = Stage1Options {
        input_bits: 39,
        el2: false,
    };
    let d = first.create_stage1(pool.take_memory().unwrap(), options).unwrap();
    first.map(d, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    first.attach(d, 0x10).unwrap();
    first.preserve(d, 0x77).unwrap();
    first.prepare_handover(pool, BASE, 3, SURVIVING).unwrap();
    leave_bypassing(&mut first, 0x30);
    core::mem::forget(first);
    model
}

/// A running hand-off the new image declines (finish without a restore): the previous image's streams abort and
/// everything cached is invalidated before the region is re-armed (which frees the memory they walk), and IDs
/// can be allocated afterwards.
#[test]
fn finishing_an_adopted_smmu_without_a_restore_aborts_what_the_previous_image_left() {
    let frames = frames();
    let mut region = Region::new();
    let model = running_first_image(&mut region, frames);
    let pool = region.pool();
    let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
    let next = model
        .smmu()
        .adopt_running(core, &InitOptions::default(), &running)
        .unwrap();
    assert_eq!(next.low_level().ste(0x10).unwrap().config(), Config::Stage1);
    let before = model.seen.lock().unwrap().consumed.len();
    next.finish_handover(pool, BASE).unwrap();
    for sid in [0x10, 0x30] {
        assert_eq!(
            next.low_level().ste(sid).unwrap().config(),
            Config::Abort,
            "stream {sid:#x}"
        );
    }
    // Each STE to abort (two hitless steps for the translating one), then every cached entry dropped.
    assert_eq!(
        issued_since(&model, before),
        [
            Issued::Ste { sid: 0x10 },
            Issued::Sync,
            Issued::Ste { sid: 0x10 },
            Issued::Sync,
            Issued::Ste { sid: 0x30 },
            Issued::Sync,
            Issued::CfgiAll,
            Issued::NsnhAll,
            Issued::Sync
        ]
    );
    assert!(next.low_level().allocate_asid().is_ok(), "the hand-off is settled");
}

/// A level-1 stream table descriptor the SMMU would follow but the driver cannot (Span != 0 with L2Ptr = 0:
/// 256 streams walking STEs at PA 0, which no abort would reach) makes the stream table not adoptable: the SMMU
/// is left disabled with every transaction aborting.
#[test]
fn adopt_running_refuses_a_level1_descriptor_it_would_not_have_written() {
    let frames = frames();
    let mut region = Region::new();
    let model = running_first_image(&mut region, frames);
    let pool = region.pool();
    let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
    // The descriptor of StreamIDs 0x100..0x200, never allocated: Span = SPLIT + 1, L2Ptr = 0.
    let index = ((running.strtab_base - region.extent.base) / 8) as usize + 1;
    assert_eq!(region.memory[index], 0);
    region.memory[index] = u64::from(crate::stream::SPLIT) + 1;
    let error = model
        .smmu()
        .adopt_running(core, &InitOptions::default(), &running)
        .err();
    assert!(
        matches!(error, Some(crate::InitError::StreamTableNotAdoptable { .. })),
        "{error:?}"
    );
    assert!(disabled_aborting(&model), "{:x?}", cr0_and_gbpa(&model));
}

#[test]
fn adopt_running_refuses_another_smmu_and_leaves_it_disabled_with_every_transaction_aborting() {
    let frames = frames();
    let mut region = Region::new();
    let model = running_first_image(&mut region, frames);
    let pool = region.pool();
    let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
    // Another SMMU than the recorded one (its IIDR differs): nothing adopted, translation off, DMA aborting.
    let other = RunningSmmu {
        iidr: running.iidr ^ 0x43b,
        ..running
    };
    let error = model.smmu().adopt_running(core, &InitOptions::default(), &other).err();
    assert_eq!(
        error,
        Some(crate::InitError::IdentityMismatch {
            register: "IIDR",
            recorded: running.iidr ^ 0x43b,
            probed: running.iidr
        })
    );
    assert!(disabled_aborting(&model), "{:x?}", cr0_and_gbpa(&model));
}

#[test]
fn running_smmu_checks_the_id_registers_and_the_stream_table_the_smmu_runs_with() {
    let frames = frames();
    let mut region = Region::new();
    let model = running_first_image(&mut region, frames);
    let write = |offset, value| {
        // SAFETY: the model's live register block.
        unsafe { crate::smmu::tests::reg32(model.base, offset).write_volatile(value) }
    };
    let read = |offset| {
        // SAFETY: as above.
        unsafe { crate::smmu::tests::reg32(model.base, offset).read_volatile() }
    };
    let pool = region.pool();
    // Another implementation behind the same base (IIDR at 0x18): refused before any arena is taken back.
    write(0x18, 0x43b);
    let error = running_smmu(pool, &model.smmu(), BASE).err();
    assert!(
        matches!(
            error,
            Some(RestoreError::Identity(HandoverError::IdentityMismatch {
                what: "IIDR",
                recorded: 0,
                probed: 0x43b
            }))
        ),
        "{error:?}"
    );
    assert!(disabled_aborting(&model), "{:x?}", cr0_and_gbpa(&model));
    assert_eq!(pool.memories_in_use(), 0, "nothing taken back");
    // The same SMMU, translating again, but walking another stream table than the recorded one.
    write(0x18, 0);
    write(0x20, 0xd);
    let strtab = read(0x80);
    write(0x80, strtab + 0x1000);
    let error = running_smmu(pool, &model.smmu(), BASE).err();
    assert!(
        matches!(
            error,
            Some(RestoreError::Identity(HandoverError::IdentityMismatch {
                what: "STRTAB_BASE",
                ..
            }))
        ),
        "{error:?}"
    );
    assert!(disabled_aborting(&model));
    // Another format: STRTAB_BASE_CFG.LOG2SIZE one bit short.
    write(0x80, strtab);
    write(0x20, 0xd);
    let cfg = read(0x88);
    write(0x88, cfg - 1);
    let error = running_smmu(pool, &model.smmu(), BASE).err();
    assert!(
        matches!(
            error,
            Some(RestoreError::Identity(HandoverError::IdentityMismatch {
                what: "STRTAB_BASE_CFG",
                ..
            }))
        ),
        "{error:?}"
    );
    assert!(disabled_aborting(&model));
    assert_eq!(pool.memories_in_use(), 0);
    // As recorded: found, its arena taken back.
    write(0x88, cfg);
    write(0x20, 0xd);
    assert!(running_smmu(pool, &model.smmu(), BASE).unwrap().is_some());
    assert_eq!(pool.memories_in_use(), 1);
}

/// A running hand-off whose restore is refused by a check of the records (the recorded ASID is taken in the new
/// image): the STEs the previous image left (stream 0x10 translating through the refused domain, 0x30
/// bypassing) all abort, then everything cached is invalidated, before the restore returns.
#[test]
fn a_refused_restore_of_an_adopted_smmu_aborts_every_stream_the_previous_image_left() {
    let frames = frames();
    let mut region = Region::new();
    let model = running_first_image(&mut region, frames);
    let pool = region.pool();
    let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
    let next = model
        .smmu()
        .adopt_running(core, &InitOptions::default(), &running)
        .unwrap();
    assert_eq!(next.low_level().ste(0x10).map(|s| s.config()), Ok(Config::Stage1));
    let recorded = {
        let bytes = pool.lock_metadata().unwrap();
        let decoded = format::sample::decode(&bytes, pool.pool().unwrap()).unwrap();
        decoded.instances[0].records.first().unwrap().asid
    };
    // Nothing is allocated until the hand-off is settled; a claim (as another restore's) takes the recorded
    // ASID.
    assert_eq!(next.low_level().allocate_asid(), Err(IdError::HandOffUnsettled));
    next.core.claim_asid(recorded).unwrap();
    let before = model.seen.lock().unwrap().commands.len();
    let error = next.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
    assert!(
        matches!(
            error,
            RestoreError::BeyondLimits {
                token: 0x77,
                what: RestoreLimit::AsidTaken,
                ..
            }
        ),
        "{error}"
    );
    assert!(every_ste_aborts(&next), "every stream aborts");
    let issued = issued_since(&model, before);
    let (steps, invalidation) = issued.split_at(issued.len() - 3);
    assert_eq!(
        invalidation,
        [Issued::CfgiAll, Issued::NsnhAll, Issued::Sync],
        "{issued:?}"
    );
    let (first, second) = steps.split_at(steps.iter().position(|i| *i == Issued::Ste { sid: 0x30 }).unwrap());
    assert_ste_steps(first, 0x10);
    assert_ste_steps(second, 0x30);
    assert!(
        next.is_enabled(),
        "the aborts completed: translation stays on for this image's own streams"
    );
    assert_eq!(pool.memories_in_use(), 1, "only the SMMU's own arena is taken");
    core::mem::forget(next);
}

/// A running hand-off whose restore rebuilt its record but cannot make the previous image's other stream abort
/// (CFGI_STE refused): the restore is refused as a whole, through the refusal's one exit: the rebuilt domain is
/// forgotten, its arena back only once translation is off with every transaction aborting.
#[test]
fn a_restore_that_cannot_abort_the_previous_images_other_streams_is_refused_whole() {
    use crate::hw::command::opcode;
    use std::sync::atomic::Ordering;
    let frames = frames();
    let mut region = Region::new();
    let model = running_first_image(&mut region, frames);
    let pool = region.pool();
    let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
    let next = model
        .smmu()
        .adopt_running(core, &InitOptions::default(), &running)
        .unwrap();
    model.refuse.store(opcode::CFGI_STE, Ordering::SeqCst);
    let error = next.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
    model.refuse.store(0, Ordering::SeqCst);
    assert!(
        matches!(error, RestoreError::UnrestoredStreams(AttachError::Invalidation(_))),
        "{error}"
    );
    assert_eq!(next.retrieve(0x77), Err(DomainError::UnknownToken(0x77)));
    assert_eq!(next.handover_phase(), HandoverPhase::Idle);
    assert!(disabled_aborting(&model), "{:x?}", cr0_and_gbpa(&model));
    assert_eq!(pool.memories_in_use(), 1, "only the SMMU's own arena");
    core::mem::forget(next);
}

/// A token names one domain: a restore whose record reuses the token of a parent an earlier hand-off left
/// waiting (for its live nested domain) is refused before anything changes, and the parent stays.
#[test]
fn a_restore_never_reuses_the_token_of_a_domain_an_earlier_hand_off_left_waiting() {
    let frames = frames();
    let mut region = Region::new();
    first_image(&mut region, frames);
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
    smmu.retrieve(0x53).unwrap();
    smmu.finish_handover(pool, BASE).unwrap();
    assert!(
        smmu.domains.book.lock().restored.contains_key(&0x52),
        "kept for its nested domain"
    );
    // Another region whose one record (a stage-1 domain on a free stream, with a free ASID) reuses 0x52.
    let mut other = Region::new();
    {
        let model = Model::start(frames);
        let mut first = boot(&model, frames);
        let pool = other.pool();
        let d = arena_stage1(&mut first, pool);
        first.attach(d, 0x40).unwrap();
        first.preserve(d, 0x52).unwrap();
        first.prepare_handover(pool, BASE, 9, SURVIVING).unwrap();
        core::mem::forget(first);
    }
    let error = smmu.restore_handover(other.pool(), BASE, &ANYWHERE).unwrap_err();
    assert!(
        matches!(
            error,
            RestoreError::BeyondLimits {
                token: 0x52,
                what: RestoreLimit::TokenHeld,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(smmu.low_level().ste(0x40).map(|s| s.config()), Ok(Config::Abort));
    assert_eq!(smmu.low_level().ste(0x18).map(|s| s.config()), Ok(Config::Nested));
    let parent = smmu.retrieve(0x52).unwrap();
    assert_eq!(smmu.domain_kind(parent), Ok(crate::DomainKind::Stage2));
    core::mem::forget(smmu);
}
