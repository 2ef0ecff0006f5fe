//! EL2 domains across a hand-off, and what a prepared hand-off freezes, refuses and cleans.

use super::*;
use crate::Iova;

/// An SMMU with EL2 contexts (IDR0.HYP), for EL2 stage-1 domains.
pub(super) fn el2_model(frames: &'static HeapFrames) -> Model {
    Model::start_with(frames, crate::smmu::tests::IDRS[0].1 | 1 << 9)
}

pub(super) const EL2: Stage1Options = Stage1Options {
    input_bits: 39,
    el2: true,
};

/// A first image with EL2 domain 0x71 attached to stream 0x10 and, when `second` (an image that broke the
/// one-in-use rule: simulated by hiding 0x71's regime while 0x72 attaches), EL2 domain 0x72 on stream 0x11.
pub(super) fn el2_first_image(region: &mut Region, frames: &'static HeapFrames, second: bool) {
    let model = el2_model(frames);
    let mut smmu = boot(&model, frames);
    let pool = region.pool();
    let a = smmu.create_stage1(pool.take_memory().unwrap(), EL2).unwrap();
    smmu.map(a, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    smmu.attach(a, 0x10).unwrap();
    smmu.preserve(a, 0x71).unwrap();
    if second {
        let b = smmu.create_stage1(pool.take_memory().unwrap(), EL2).unwrap();
        let set_el2 = |smmu: &mut Iommu<&'static HeapFrames>, value: bool| {
            if let Translation::Stage1 { el2, .. } = &mut smmu.domains.get_mut(a).unwrap().translation {
                *el2 = value;
            }
        };
        set_el2(&mut smmu, false);
        smmu.attach(b, 0x11).unwrap();
        set_el2(&mut smmu, true);
        smmu.preserve(b, 0x72).unwrap();
    }
    smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
    core::mem::forget(smmu);
    drop(model);
}

/// One EL2 stage-1 domain in use at a time holds across a live update: a record's EL2 domain with streams is
/// not restored beside one this image has in use, nor beside another record's; refused before anything
/// changes.
#[test]
fn a_restore_never_puts_two_el2_domains_in_use() {
    let frames = frames();
    let mut region = Region::new();
    el2_first_image(&mut region, frames, false);
    let model = el2_model(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    // This image's domain on another ASID than the record's (1), so that only the EL2 rule stands in the way.
    let spare = smmu.low_level().allocate_asid().unwrap();
    let mine = smmu.create_stage1(frames, EL2).unwrap();
    smmu.low_level().free_asid(spare).unwrap();
    smmu.attach(mine, 0x11).unwrap();
    let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
    assert!(
        matches!(
            error,
            RestoreError::BeyondLimits {
                token: 0x71,
                what: RestoreLimit::El2InUse,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(pool.memories_in_use(), 0);
    assert_ne!(
        smmu.low_level().ste(0x10).map(|s| s.config()),
        Ok(Config::Stage1),
        "no STE installed"
    );
    assert_eq!(
        smmu.attached(mine).as_deref(),
        Ok(&[(0x11, 0)][..]),
        "this image's domain untouched"
    );
    core::mem::forget(smmu);
    drop(model);

    // Restored into an image without one in use, the restored domain is the EL2 domain in use.
    let model = el2_model(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
    let restored = smmu.retrieve(0x71).unwrap();
    let mine = smmu.create_stage1(frames, EL2).unwrap();
    assert_eq!(
        smmu.attach(mine, 0x11),
        Err(DomainError::El2DomainInUse {
            domain: mine,
            holder: restored
        })
    );
    core::mem::forget(smmu);
    drop(model);

    // Two records' EL2 domains in use: neither is restored.
    let mut region = Region::new();
    el2_first_image(&mut region, frames, true);
    let model = el2_model(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
    assert!(
        matches!(
            error,
            RestoreError::BeyondLimits {
                what: RestoreLimit::El2InUseByAnotherRecord,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(pool.memories_in_use(), 0);
    assert!(smmu.retrieve(0x71).is_err() && smmu.retrieve(0x72).is_err());
}

/// From prepare to cancel, a preserved domain is frozen: what the next image restores is what the region
/// records (a detach would come back attached, a trim would leave the recorded table count wrong). A domain
/// that is not preserved stays usable, and cancel thaws them all.
#[test]
fn a_prepared_domain_is_frozen_until_the_hand_off_is_cancelled() {
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let options = Stage1Options {
        input_bits: 39,
        el2: false,
    };
    let d = smmu.create_stage1(pool.take_memory().unwrap(), options).unwrap();
    let other = smmu.create_stage1(pool.take_memory().unwrap(), options).unwrap();
    smmu.map(d, Iova(0x1000), PhysAddr(0x8000_0000), 0x2000, RW).unwrap();
    smmu.attach(d, 0x10).unwrap();
    smmu.preserve(d, 9).unwrap();
    smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
    let frozen = Err(DomainError::HandoverPrepared { token: 9 });
    assert_eq!(smmu.map(d, Iova(0x4000), PhysAddr(0x8000_4000), 0x1000, RW), frozen);
    assert_eq!(smmu.unmap(d, Iova(0x1000), 0x1000).map(|_| ()), frozen);
    let mut gather = crate::pgtable::Gather::default();
    assert_eq!(
        smmu.unmap_deferred(d, Iova(0x1000), 0x1000, &mut gather).map(|_| ()),
        frozen
    );
    assert!(gather.is_empty());
    assert_eq!(smmu.protect(d, Iova(0x1000), 0x1000, Prot::READ).map(|_| ()), frozen);
    assert_eq!(smmu.trim_domain(d).map(|_| ()), frozen);
    assert_eq!(smmu.detach(0x10), frozen);
    assert_eq!(smmu.attach(d, 0x11), frozen);
    assert_eq!(
        smmu.iova_to_phys(d, Iova(0x2000)),
        Ok(Some(PhysAddr(0x8000_1000))),
        "nothing changed"
    );
    assert_eq!(
        smmu.low_level().ste(0x10).map(|s| s.config()),
        Ok(Config::Stage1),
        "still attached"
    );
    // Not preserved: usable.
    smmu.map(other, Iova(0x1000), PhysAddr(0x8000_8000), 0x1000, RW)
        .unwrap();
    smmu.attach(other, 0x11).unwrap();
    smmu.detach(0x11).unwrap();
    // Cancelled: usable again.
    smmu.cancel_handover(pool, BASE).unwrap();
    smmu.unmap(d, Iova(0x1000), 0x1000).unwrap();
    smmu.detach(0x10).unwrap();
}

/// The records say what the tables hold, not what the SMMU may still cache: a preserved domain with a deferred
/// unmap not synced (its old translations may still be in the TLB) is not recorded, and nothing is written;
/// once synced it is.
#[test]
fn a_preserved_domain_with_an_unsynced_deferred_unmap_is_not_prepared() {
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let options = Stage1Options {
        input_bits: 39,
        el2: false,
    };
    let d = smmu.create_stage1(pool.take_memory().unwrap(), options).unwrap();
    smmu.map(d, Iova(0x1000), PhysAddr(0x8000_0000), 0x2000, RW).unwrap();
    smmu.attach(d, 0x10).unwrap();
    smmu.preserve(d, 9).unwrap();
    let mut gather = crate::pgtable::Gather::default();
    smmu.unmap_deferred(d, Iova(0x1000), 0x1000, &mut gather).unwrap();
    assert_eq!(
        smmu.prepare_handover(pool, BASE, 1, SURVIVING),
        Err(PrepareError::PendingInvalidation { token: 9 })
    );
    assert!(
        pool.lock_metadata().unwrap()[..8].iter().all(|&b| b == 0),
        "nothing written"
    );
    assert_eq!(smmu.handover_phase(), HandoverPhase::Idle);
    smmu.sync_domain(d, &mut gather).unwrap();
    assert!(smmu.prepare_handover(pool, BASE, 1, SURVIVING).is_ok());
}

#[test]
fn a_prepared_domain_is_unpreserved_only_after_the_hand_off_is_cancelled() {
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let mut smmu = boot(&model, frames);
    let pool = region.pool();
    let d = arena_stage1(&mut smmu, pool);
    smmu.map(d, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    let parent = smmu
        .create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 40 })
        .unwrap();
    let guest = crate::domain::GuestStage1 {
        cd_table: 0x4800_0000,
        cd_max_log2: 0,
        layout: CdTableLayout::Linear,
        default_substream: DefaultSubstream::Terminate,
    };
    let nested = smmu.create_nested(parent, guest).unwrap();
    smmu.preserve(d, 9).unwrap();
    smmu.preserve(parent, 10).unwrap();
    smmu.preserve(nested, 11).unwrap();
    smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
    // The region records them: unpreserving now would leave a record of a domain that may be freed (and its
    // arena sealed for good). Refused, nothing changed.
    for token in [9, 11] {
        assert_eq!(smmu.unpreserve(token), Err(DomainError::HandoverPrepared { token }));
    }
    assert_eq!((smmu.preserved(9), smmu.preserved(11)), (Some(d), Some(nested)));
    assert!(matches!(smmu.free_domain(d), Err(DomainError::Preserved { .. })));
    // Cancelled: unpreserve works, and the domain's memory hands out tables again.
    smmu.cancel_handover(pool, BASE).unwrap();
    assert_eq!(smmu.unpreserve(9), Ok(d));
    assert_eq!(smmu.unpreserve(11), Ok(nested));
    smmu.map(d, Iova(0x4000_0000), PhysAddr(0x8000_2000), 0x1000, RW)
        .unwrap();
    smmu.free_domain(d).unwrap();
    // Prepared again, the other way round: preserve, prepare, cancel, unpreserve, prepare records nothing of it.
    smmu.preserve(nested, 11).unwrap();
    smmu.prepare_handover(pool, BASE, 2, SURVIVING).unwrap();
    smmu.cancel_handover(pool, BASE).unwrap();
    smmu.unpreserve(11).unwrap();
    smmu.unpreserve(10).unwrap();
    smmu.map(parent, Iova(0x4000_0000), PhysAddr(0x8000_2000), 0x1000, RW)
        .unwrap();
}

#[test]
fn prepare_cleans_the_smmus_own_arena_for_a_hand_off_with_the_smmu_running() {
    use crate::handover::pool::HandoverMemory;
    use crate::mem::{Maintenance, maintenance_log};
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let pool = region.pool();
    *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
    let core = pool.take_window(pool.window_bytes().unwrap()).unwrap();
    // A coherent SMMU: nothing was cleaned as it was written, so only prepare can put it in memory.
    let smmu: Iommu<&'static HandoverMemory> = model.smmu().init(core, &InitOptions::default()).unwrap();
    assert!(smmu.features().coherent);
    let d = smmu
        .create_stage1(pool.take_memory().unwrap(), Stage1Options::default())
        .unwrap();
    smmu.map(d, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    smmu.attach(d, 0x10).unwrap();
    smmu.preserve(d, 0x77).unwrap();
    let identity = smmu.handover_identity(BASE);
    assert!(
        identity.core_len > 0,
        "the stream table is in the pool: the next image adopts it"
    );
    maintenance_log::take();
    smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
    let log = maintenance_log::take();
    let virt = region.memory.as_ptr() as usize + (identity.strtab_base - region.extent.base) as usize;
    assert!(
        maintenance_log::covers(&log, Maintenance::Clean, virt, identity.core_len as usize),
        "the stream table and its spans, which the next image reads, are cleaned to memory"
    );
    core::mem::forget(smmu);
}

#[test]
fn an_smmu_left_running_with_non_cacheable_walks_is_maintained_by_the_next_image() {
    use crate::handover::pool::HandoverMemory;
    use crate::mem::{Maintenance, maintenance_log};
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let pool = region.pool();
    *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
    // The first image treats the SMMU as non-coherent: CR1 non-cacheable, which cannot change while SMMUEN = 1.
    let mut smmu = model.smmu();
    smmu.apply_board_coherency(false);
    let first: Iommu<&'static HandoverMemory> = smmu
        .init(
            pool.take_window(pool.window_bytes().unwrap()).unwrap(),
            &InitOptions::default(),
        )
        .unwrap();
    first.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
    core::mem::forget(first);

    // The next image does not know (IDR0.COHACC = 1, no board override): the running CR1 decides.
    let pool = region.pool();
    let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
    let next = model
        .smmu()
        .adopt_running(core, &InitOptions::default(), &running)
        .unwrap();
    assert!(
        !next.features().coherent,
        "the SMMU reads its tables and queues non-cacheable: the CPU must clean what it writes"
    );
    maintenance_log::take();
    // SAFETY: the device behind the stream is trusted with all memory (a test of bypass).
    unsafe { next.low_level().attach_bypass(0x30) }.unwrap();
    let log = maintenance_log::take();
    assert!(
        log.iter()
            .any(|&(kind, _, len)| kind == Maintenance::Clean && len == 64),
        "the STE is cleaned before its CFGI_STE: {log:?}"
    );
    core::mem::forget(next);
}

/// One ASID allocator serves both stage-1 regimes: two records, an NS-EL1 stage-1 domain and an EL2 one, with the
/// same ASID (a first image that broke the rule: simulated by rewriting one domain's ASID) are refused before
/// anything changes, found by one sort whatever the number of records.
#[test]
fn two_stage1_records_sharing_an_asid_across_regimes_are_refused() {
    let frames = frames();
    let mut region = Region::new();
    {
        let model = el2_model(frames);
        let smmu = boot(&model, frames);
        let pool = region.pool();
        let ns = Stage1Options {
            input_bits: 39,
            el2: false,
        };
        let a = smmu.create_stage1(pool.take_memory().unwrap(), ns).unwrap();
        let b = smmu.create_stage1(pool.take_memory().unwrap(), EL2).unwrap();
        let shared = match smmu.domains.get(a).unwrap().translation {
            Translation::Stage1 { asid, .. } => asid,
            _ => unreachable!(),
        };
        if let Translation::Stage1 { asid, .. } = &mut smmu.domains.get_mut(b).unwrap().translation {
            *asid = shared;
        }
        smmu.preserve(a, 0x81).unwrap();
        smmu.preserve(b, 0x82).unwrap();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        core::mem::forget(smmu);
        drop(model);
    }
    let model = el2_model(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
    assert!(
        matches!(
            error,
            RestoreError::BeyondLimits {
                token: 0x82,
                what: RestoreLimit::SharedAsid,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(pool.memories_in_use(), 0);
    core::mem::forget(smmu);
}
