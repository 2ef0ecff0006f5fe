//! A live update on the host: one SMMU model's domains preserved and prepared, the "reset" (the old driver
//! forgotten, a new pool object over the same region memory, a new SMMU model), then restore, retrieve and
//! finish, against the same page tables in place.
extern crate std;

use super::*;
use crate::domain::{DomainId, Stage1Options, Stage2Options};
use crate::handover::pool::ARENAS;
use crate::handover::pool::METADATA_BYTES;
use crate::hw::ste::Config;
use crate::pgtable::Prot;
use crate::smmu::tests::{Issued, Model, assert_ste_steps, frames, issued_since};
use crate::testing::HeapFrames;
use crate::{InitOptions, Iommu};
use core::ptr::NonNull;
use std::boxed::Box;

pub(crate) const BASE: u64 = 0x905_0000;
/// The whole 48-bit output space declared DMA-able (less the region and protected memory, as always): the
/// tests of the restore itself, not of what the leaves reach.
pub(crate) const ANYWHERE: RestoreOptions<'static> = RestoreOptions::new(SURVIVING);
/// What survives a hand-off in these tests: as above.
pub(crate) const SURVIVING: &[Extent] = &[Extent { base: 0, len: 1 << 48 }];
pub(crate) const RW: Prot = Prot::READ.union(Prot::WRITE).union(Prot::CACHEABLE);

/// Region memory that outlives both "images", and a fresh pool object over it per image.
pub(crate) struct Region {
    pub(crate) memory: &'static mut [u64],
    pub(crate) extent: Extent,
}

impl Region {
    pub(crate) fn new() -> Region {
        let bytes = METADATA_BYTES as usize + ARENAS * 256 * 1024;
        Region {
            memory: Box::leak(std::vec![0u64; bytes / 8].into_boxed_slice()),
            extent: Extent {
                base: 0x80_0000_0000,
                len: bytes as u64,
            },
        }
    }

    pub(crate) fn pool(&mut self) -> &'static HandoverPool {
        let pool: &'static HandoverPool = Box::leak(Box::new(HandoverPool::new()));
        // SAFETY: leaked memory used by nothing else (the previous "image" is forgotten).
        unsafe { pool.set_up(self.extent, NonNull::new(self.memory.as_mut_ptr().cast()).unwrap()) }.unwrap();
        pool
    }

    fn byte(&mut self, offset: usize) -> &mut u8 {
        // SAFETY: inside the leaked block.
        unsafe { &mut *self.memory.as_mut_ptr().cast::<u8>().add(offset) }
    }
}

pub(crate) fn boot(model: &Model, frames: &'static HeapFrames) -> Iommu<&'static HeapFrames> {
    model.smmu().init(frames, &InitOptions::default()).unwrap()
}

/// A stage-1 domain (39-bit input, EL1&0 regime) in a fresh handover arena.
pub(crate) fn arena_stage1(smmu: &mut Iommu<&'static HeapFrames>, pool: &'static HandoverPool) -> DomainId {
    let options = Stage1Options {
        input_bits: 39,
        el2: false,
    };
    smmu.create_stage1(pool.take_arena().unwrap(), options).unwrap()
}

/// Makes `sid` bypass on a driver whose running hand-off is prepared, writing its STE through the crate's
/// own path (`install_ste`, blind to the freeze): the state a previous image leaves when it is not this driver
/// (or an older one), whose `prepare_handover` refuses a bypassing stream (`PrepareError::UnpreservedStream`)
/// and whose `attach_bypass` is frozen meanwhile. The next image must contain it all the same.
pub(crate) fn leave_bypassing<A: FrameAllocator>(smmu: &mut Iommu<A>, sid: u32) {
    let bypass = crate::hw::ste::Ste::bypass_for(&smmu.features().entry_rules());
    smmu.core.install_ste(sid, &bypass).unwrap();
}

/// Runs `f` with the stream configuration of a prepared running hand-off unfrozen, then freezes it again: as
/// [`leave_bypassing`], the state a previous image that is not this driver may leave (streams translating
/// through domains no record describes), built after this driver's `prepare_handover`, which refuses it.
fn as_another_driver<A: FrameAllocator, R>(smmu: &mut Iommu<A>, f: impl FnOnce(&mut Iommu<A>) -> R) -> R {
    let prepared = smmu.domains.prepared.lock().take();
    let result = f(smmu);
    *smmu.domains.prepared.lock() = prepared;
    result
}

/// The first image: a stage-1 domain (stream 0x10), a stage-2 parent with a nested domain (stream 0x18), a
/// stage-1 domain preserved and then unpreserved, and one preserved but never retrieved (stream 0x20).
pub(crate) fn first_image(region: &mut Region, frames: &'static HeapFrames) {
    let model = Model::start(frames);
    let mut smmu = boot(&model, frames);
    let pool = region.pool();
    let s1 = arena_stage1(&mut smmu, pool);
    smmu.map(s1, 0x1000, 0x8000_0000, 0x2000, RW).unwrap();
    smmu.map(s1, 0x4000_0000, 0x9000_0000, 0x20_0000, RW).unwrap();
    smmu.attach(s1, 0x10).unwrap();
    let parent = smmu
        .create_stage2(pool.take_arena().unwrap(), Stage2Options { input_bits: 40 })
        .unwrap();
    smmu.map(parent, 0x4000_0000, 0x4000_0000, 0x4000_0000, RW).unwrap();
    let guest = crate::domain::GuestStage1 {
        cd_table: 0x4800_0000,
        cd_max_log2: 0,
        layout: CdTableLayout::Linear,
        default_substream: DefaultSubstream::Terminate,
    };
    let nested = smmu.create_nested(parent, guest).unwrap();
    smmu.attach(nested, 0x18).unwrap();
    let dropped = smmu
        .create_stage1(pool.take_arena().unwrap(), Stage1Options::default())
        .unwrap();
    let unclaimed = smmu
        .create_stage2(pool.take_arena().unwrap(), Stage2Options { input_bits: 40 })
        .unwrap();
    smmu.map(unclaimed, 0, 0x8000_0000, 0x1000, RW).unwrap();
    smmu.attach(unclaimed, 0x20).unwrap();
    smmu.preserve(s1, 0x51).unwrap();
    smmu.preserve(parent, 0x52).unwrap();
    smmu.preserve(nested, 0x53).unwrap();
    smmu.preserve(dropped, 0x54).unwrap();
    smmu.preserve(unclaimed, 0x55).unwrap();
    smmu.unpreserve(0x54).unwrap();
    // Mutations after preserve are what is restored: the state at prepare.
    smmu.unmap(s1, 0x2000, 0x1000).unwrap();
    smmu.map(s1, 0x3000, 0x8000_3000, 0x1000, RW).unwrap();
    let written = smmu.prepare_handover(pool, BASE, 7, SURVIVING).unwrap();
    assert!(written > 0);
    // The reset: nothing is freed, the SMMU model goes away.
    core::mem::forget(smmu);
    drop(model);
}

#[test]
fn preserved_domains_come_back_by_token_with_their_tables_in_place() {
    let frames = frames();
    let mut region = Region::new();
    first_image(&mut region, frames);

    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let before = model.seen.lock().unwrap().consumed.len();
    let report = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
    assert_eq!((report.generation, report.domains, report.streams), (7, 4, 3));
    assert_eq!(report.adopted_without_walk, 3, "counts recorded: no walk");
    // No STE or CD was scanned: the IDs come from the records.
    assert_eq!((smmu.asids_in_use(), smmu.vmids_in_use()), (1, 2));
    let ops = model.seen.lock().unwrap().consumed[before..].to_vec();
    assert!(
        ops.iter()
            .all(|&op| op == crate::hw::command::opcode::CFGI_STE || op == crate::hw::command::opcode::SYNC)
    );

    let s1 = smmu.retrieve(0x51).unwrap();
    assert_eq!(smmu.iova_to_phys(s1, 0x1000), Ok(Some(0x8000_0000)));
    assert_eq!(smmu.iova_to_phys(s1, 0x2000), Ok(None), "unmapped after preserve: gone");
    assert_eq!(
        smmu.iova_to_phys(s1, 0x3000),
        Ok(Some(0x8000_3000)),
        "mapped after preserve: there"
    );
    assert_eq!(smmu.iova_to_phys(s1, 0x401f_f000), Ok(Some(0x901f_f000)));
    assert_eq!(smmu.low_level().ste(0x10).unwrap().config(), Config::Stage1);
    assert_eq!(smmu.retrieve(0x51), Err(DomainError::UnknownToken(0x51)), "once");
    assert_eq!(
        smmu.retrieve(0x54),
        Err(DomainError::UnknownToken(0x54)),
        "unpreserved: not restored"
    );
    let parent = smmu.retrieve(0x52).unwrap();
    let nested = smmu.retrieve(0x53).unwrap();
    assert_eq!(smmu.low_level().ste(0x18).unwrap().config(), Config::Nested);
    assert_eq!(smmu.low_level().ste(0x18).unwrap().cd_table(), PhysAddr(0x4800_0000));
    // Rebuilt through the same stage-2 configuration as a new attach: protected table walks (S2PTW).
    for sid in [0x18, 0x20] {
        assert_ne!(
            smmu.low_level().ste(sid).unwrap().0[2] & crate::hw::ste::Q2_S2PTW,
            0,
            "{sid:#x}"
        );
    }
    assert_eq!(smmu.attachments(nested).as_deref(), Ok(&[(0x18, 0)][..]));
    // The restored domains work: map, unmap (with invalidation), and the parent cannot go before its child.
    smmu.map(s1, 0x5000, 0x8000_5000, 0x1000, RW).unwrap();
    assert_eq!(smmu.unmap(s1, 0x1000, 0x1000), Ok(0x1000));
    assert!(matches!(
        smmu.free_domain(parent),
        Err(DomainError::HasNestedDomains { .. })
    ));

    // finish: the unclaimed domain's stream aborts, its arena is free again, the region is re-armed empty.
    assert_eq!(smmu.low_level().ste(0x20).unwrap().config(), Config::Stage2);
    let in_use = pool.arenas_in_use();
    assert_eq!(smmu.finish_handover(pool, BASE), Ok(FinishReport { unclaimed: 1 }));
    assert_eq!(smmu.low_level().ste(0x20).unwrap().config(), Config::Abort);
    assert_eq!(pool.arenas_in_use(), in_use - 1);
    assert_eq!(
        smmu.restore_handover(pool, BASE, &ANYWHERE).map(|r| r.domains),
        Ok(0),
        "nothing left to restore"
    );
}

#[test]
fn a_corrupt_region_is_refused_whole_and_left_untouched() {
    let frames = frames();
    let mut region = Region::new();
    first_image(&mut region, frames);
    // One flipped bit in a record.
    *region.byte(200) ^= 0x10;
    let snapshot: std::vec::Vec<u8> = (0..4096).map(|i| *region.byte(i)).collect();

    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
    assert!(
        matches!(error, RestoreError::Region(HandoverError::BadCrc { .. })),
        "{error}"
    );
    assert_eq!(smmu.retrieve(0x51), Err(DomainError::UnknownToken(0x51)));
    for sid in [0x10, 0x18, 0x20] {
        assert_ne!(smmu.low_level().ste(sid).map(|s| s.config()), Ok(Config::Stage1));
    }
    assert_eq!(pool.arenas_in_use(), 0, "no arena taken back");
    let after: std::vec::Vec<u8> = (0..4096).map(|i| *region.byte(i)).collect();
    assert_eq!(after, snapshot, "the region's bytes are left for diagnosis");
}

#[test]
fn a_region_for_another_smmu_is_refused() {
    let frames = frames();
    let mut region = Region::new();
    first_image(&mut region, frames);
    // The same base, another SMMU: a stage-1-only model (IDR0 differs).
    let model = Model::start_with(frames, 0x0d44_101a);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
    assert!(matches!(error, RestoreError::Identity(_)), "{error}");
    // Records for another base are simply not ours.
    let model2 = Model::start(frames);
    let other = boot(&model2, frames);
    assert_eq!(
        other
            .restore_handover(region.pool(), BASE + 0x1_0000, &ANYWHERE)
            .map(|r| r.domains),
        Ok(0)
    );
}

#[test]
fn a_hand_off_with_the_smmu_running_never_turns_translation_off() {
    use crate::handover::pool::HandoverArena;
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let pool = region.pool();
    *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
    let core = pool.take_arena().unwrap();
    let mut first: Iommu<&'static HandoverArena> = model.smmu().init(core, &InitOptions::default()).unwrap();
    let d = first
        .create_stage1(
            pool.take_arena().unwrap(),
            Stage1Options {
                input_bits: 39,
                el2: false,
            },
        )
        .unwrap();
    first.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
    first.attach(d, 0x10).unwrap();
    first.preserve(d, 0x77).unwrap();
    first.prepare_handover(pool, BASE, 3, SURVIVING).unwrap();
    // Stream 0x30 bypassing across the hand-off: what a previous image that is not this driver may leave (this
    // one refuses to prepare with it), written after the prepare; the next image must abort it.
    leave_bypassing(&mut first, 0x30);
    let strtab = first.configuration().stream_table_base;
    let format = first.stream_table_format();
    assert!(matches!(format, StreamTableFormat::TwoLevel { .. }));
    let ste = first.low_level().ste(0x10).unwrap();
    core::mem::forget(first);

    // The next image: the same SMMU, still translating; where its structures are comes from the region.
    let pool = region.pool();
    let (running, core) = running_smmu(pool, &model.smmu(), BASE).unwrap().unwrap();
    assert_eq!((running.format, running.strtab_base), (format, strtab));
    let before = model.seen.lock().unwrap().consumed.len();
    let next = model
        .smmu()
        .adopt_running(core, &InitOptions::default(), &running)
        .unwrap();
    // Whatever the old image left cached goes: every configuration and TLB entry (no EL2 contexts here).
    assert_eq!(
        issued_since(&model, before),
        [Issued::CfgiAll, Issued::NsnhAll, Issued::Sync]
    );
    assert_eq!(
        next.low_level().ste(0x10),
        Ok(ste),
        "the running stream table adopted as found"
    );
    assert_eq!(
        next.low_level().ste(0x30).unwrap().config(),
        Config::Bypass,
        "until the restore"
    );
    assert_eq!(
        next.low_level().allocate_asid(),
        Err(crate::ids::IdError::HandOffUnsettled),
        "nothing allocated while the previous image's streams may use any ID"
    );
    let before = model.seen.lock().unwrap().consumed.len();
    let report = next.restore_handover(pool, BASE, &ANYWHERE).unwrap();
    assert_eq!((report.domains, report.streams, report.aborted), (1, 1, 1));
    assert_eq!(
        next.low_level().ste(0x10),
        Ok(ste),
        "the restored STE is the one the SMMU was using: nothing rewritten"
    );
    assert_eq!(next.low_level().ste(0x30).unwrap().config(), Config::Abort);
    // Before the restore returns: the unrestored stream's STE (and only it), then everything it may have cached
    // under IDs this image reuses.
    let issued = issued_since(&model, before);
    let (ste_steps, rest) = issued.split_at(issued.len() - 3);
    assert_ste_steps(ste_steps, 0x30);
    assert_eq!(rest, [Issued::CfgiAll, Issued::NsnhAll, Issued::Sync]);
    assert_eq!(next.abort_unrestored_streams(), Ok(0), "nothing left to abort");
    let d = next.retrieve(0x77).unwrap();
    assert_eq!(next.iova_to_phys(d, 0x1000), Ok(Some(0x8000_0000)));
    assert!(
        !model.seen.lock().unwrap().smmuen_dropped,
        "translation never turned off"
    );
    // A stream table elsewhere than the SMMU's is refused.
    core::mem::forget(next);
    let error = model
        .smmu()
        .adopt_running(
            core,
            &InitOptions::default(),
            &RunningSmmu {
                strtab_base: strtab + 0x1000,
                ..running
            },
        )
        .err();
    assert!(
        matches!(error, Some(crate::InitError::StreamTableNotAdoptable { .. })),
        "{error:?}"
    );
}

#[test]
fn after_prepare_nothing_recorded_grows_until_the_hand_off_is_cancelled() {
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let arena = pool.take_arena().unwrap();
    let d = smmu
        .create_stage1(
            arena,
            Stage1Options {
                input_bits: 39,
                el2: false,
            },
        )
        .unwrap();
    smmu.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
    smmu.preserve(d, 9).unwrap();
    smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
    // The domain is frozen (see `a_prepared_domain_is_frozen_until_the_hand_off_is_cancelled`), and its
    // memory hands out nothing, whoever asks.
    assert!(crate::mem::FrameAllocator::allocate_zeroed(&arena, 4096, 4096).is_err());
    assert!(matches!(
        smmu.map(d, 0x4000_0000, 0x8000_2000, 0x1000, RW),
        Err(DomainError::HandoverPrepared { token: 9 })
    ));
    // Cancelled: memory again, and the region no longer names this SMMU's domains.
    smmu.cancel_handover(pool, BASE).unwrap();
    smmu.map(d, 0x4000_0000, 0x8000_2000, 0x1000, RW).unwrap();
    assert_eq!(smmu.restore_handover(pool, BASE, &ANYWHERE).map(|r| r.domains), Ok(0));
}

#[test]
fn a_region_beyond_this_image_is_refused_before_anything_changes() {
    let frames = frames();
    let mut region = Region::new();
    first_image(&mut region, frames);
    // The next image keeps only 2 domain slots: 4 records cannot be rebuilt.
    let model = Model::start(frames);
    let smmu: Iommu<&'static HeapFrames, 2> = model
        .smmu()
        .init_with_capacity(frames, &InitOptions::default())
        .unwrap();
    let pool = region.pool();
    let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
    assert!(
        matches!(
            error,
            RestoreError::BeyondLimits {
                what: "more domains than free slots",
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(
        (pool.arenas_in_use(), smmu.asids_in_use(), smmu.vmids_in_use()),
        (0, 0, 0)
    );
    assert_ne!(
        smmu.low_level().ste(0x10).map(|s| s.config()),
        Ok(Config::Stage1),
        "no STE installed"
    );
    assert!(smmu.retrieve(0x51).is_err());
}

/// Suspicion 6: a region whose streams do not fit this image's stream records ([`MAX_ATTACHED_STREAMS`] with
/// the ones it has attached) is refused by `check_limits`, before anything is installed, not half-way through
/// the rebuild after STEs were written.
///
/// [`MAX_ATTACHED_STREAMS`]: crate::domain::MAX_ATTACHED_STREAMS
#[test]
fn a_region_with_more_streams_than_this_image_can_hold_is_refused_before_any_ste_is_written() {
    use crate::domain::{MAX_ATTACHED_STREAMS, MAX_ATTACHMENTS};
    let frames = frames();
    let mut region = Region::new();
    {
        let model = Model::start(frames);
        let smmu = boot(&model, frames);
        let pool = region.pool();
        let d = smmu
            .create_stage2(pool.take_arena().unwrap(), Stage2Options { input_bits: 40 })
            .unwrap();
        smmu.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.attach(d, 0x10).unwrap();
        smmu.preserve(d, 0x61).unwrap();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        core::mem::forget(smmu);
    }
    // The next image has every stream record in use already (stage-1 domains: no VMID shared with the record).
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    for k in 0..MAX_ATTACHED_STREAMS / MAX_ATTACHMENTS {
        let d = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
        for j in 0..MAX_ATTACHMENTS {
            smmu.attach(d, (0x100 + k * MAX_ATTACHMENTS + j) as u32).unwrap();
        }
    }
    let pool = region.pool();
    let before = model.seen.lock().unwrap().consumed.len();
    let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
    assert_eq!(
        error,
        RestoreError::BeyondLimits {
            token: 0x61,
            what: "more streams than this image can attach, with those attached already",
            value: MAX_ATTACHED_STREAMS as u64 + 1
        }
    );
    assert_eq!(issued_since(&model, before), [], "nothing installed, nothing to undo");
    assert_eq!(pool.arenas_in_use(), 0);
    assert_ne!(smmu.low_level().ste(0x10).map(|s| s.config()), Ok(Config::Stage2));
    core::mem::forget(smmu);
}

fn vmid_of(smmu: &Iommu<&'static HeapFrames>, token: u64) -> u16 {
    let id = smmu.domains.book.lock().restored.get(&token).copied().unwrap();
    match smmu.domains.get(id).unwrap().translation {
        Translation::Stage2 { vmid, .. } => vmid,
        _ => unreachable!(),
    }
}

#[test]
fn restore_and_finish_invalidate_exactly_the_restored_streams_and_the_freed_ids() {
    let frames = frames();
    let mut region = Region::new();
    first_image(&mut region, frames);

    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let before = model.seen.lock().unwrap().consumed.len();
    smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
    // After a reset (init invalidated everything): each restored stream's STE, nothing else.
    let issued = issued_since(&model, before);
    let mut sids: std::vec::Vec<u32> = std::vec::Vec::new();
    for pair in issued.chunks(2) {
        match pair {
            [Issued::Ste { sid }, Issued::Sync] => sids.push(*sid),
            _ => panic!("{issued:?}"),
        }
    }
    sids.sort_unstable();
    sids.dedup();
    assert_eq!(sids, [0x10, 0x18, 0x20]);

    // Only the stage-1 domain is claimed: finish frees the nested domain, then its parent and the other stage 2.
    let parent_vmid = vmid_of(&smmu, 0x52);
    let unclaimed_vmid = vmid_of(&smmu, 0x55);
    assert_ne!(parent_vmid, unclaimed_vmid);
    smmu.retrieve(0x51).unwrap();
    let vmids = smmu.vmids_in_use();
    let before = model.seen.lock().unwrap().consumed.len();
    assert_eq!(smmu.finish_handover(pool, BASE), Ok(FinishReport { unclaimed: 3 }));
    assert_eq!(
        smmu.vmids_in_use(),
        vmids - 2,
        "both VMIDs freed, after their invalidation"
    );
    let issued = issued_since(&model, before);
    // Nested (stream 0x18): its STE, its combined entries (last detach), again when freed.
    let steps = issued
        .iter()
        .take_while(|i| **i == Issued::Ste { sid: 0x18 } || **i == Issued::Sync);
    let n = steps.count();
    assert_ste_steps(&issued[..n], 0x18);
    let nested = [
        Issued::NhAll { vmid: parent_vmid },
        Issued::Sync,
        Issued::NhAll { vmid: parent_vmid },
        Issued::Sync,
    ];
    assert_eq!(issued[n..n + 4], nested, "{issued:?}");
    let rest = &issued[n + 4..];
    // The parent (no stream left): its VMID. The unclaimed stage 2 (stream 0x20): its STE, its VMID on the last
    // detach, again when freed. In either order.
    let parent = [Issued::S12Vmall { vmid: parent_vmid }, Issued::Sync];
    let first = if rest.starts_with(&parent) {
        &rest[2..]
    } else {
        assert!(rest.ends_with(&parent), "{issued:?}");
        &rest[..rest.len() - 2]
    };
    let (ste_steps, ids) = first.split_at(first.len() - 4);
    assert_ste_steps(ste_steps, 0x20);
    assert_eq!(
        ids,
        [
            Issued::S12Vmall { vmid: unclaimed_vmid },
            Issued::Sync,
            Issued::S12Vmall { vmid: unclaimed_vmid },
            Issued::Sync
        ],
        "{issued:?}"
    );
}

#[test]
fn a_restored_cd_table_loses_the_substreams_no_record_names_with_their_cfgi_cd() {
    // SSIDSIZE 5 (IDR1[10:6]) in both images.
    let idr1 = crate::smmu::tests::IDRS[1].1 | 5 << 6;
    let idr0 = crate::smmu::tests::IDRS[0].1;
    let frames = frames();
    let mut region = Region::new();
    {
        let model = Model::start_with_idrs(frames, idr0, idr1);
        let smmu = boot(&model, frames);
        let pool = region.pool();
        let whole = smmu
            .create_stage1(pool.take_arena().unwrap(), Stage1Options::default())
            .unwrap();
        let dropped = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
        smmu.attach(whole, 0x10).unwrap();
        smmu.attach_substream(dropped, 0x10, 3).unwrap();
        smmu.preserve(whole, 0x61).unwrap();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        core::mem::forget(smmu);
        drop(model);
    }
    let model = Model::start_with_idrs(frames, idr0, idr1);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let before = model.seen.lock().unwrap().consumed.len();
    let report = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
    assert_eq!((report.domains, report.streams), (1, 1));
    // Substream 3 (its domain not preserved): its CD made invalid, V first then the rest, each CFGI_CD of
    // (0x10, 3) + CMD_SYNC; then the stream's STE.
    let issued = issued_since(&model, before);
    let cd = [
        Issued::Cd { sid: 0x10, ssid: 3 },
        Issued::Sync,
        Issued::Cd { sid: 0x10, ssid: 3 },
        Issued::Sync,
    ];
    assert_eq!(issued[..4], cd, "{issued:?}");
    assert_ste_steps(&issued[4..], 0x10);
}
#[test]
fn a_restore_into_an_image_that_took_a_recorded_id_or_stream_changes_nothing() {
    let frames = frames();
    let mut region = Region::new();
    {
        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let parent = smmu
            .create_stage2(pool.take_arena().unwrap(), Stage2Options { input_bits: 40 })
            .unwrap();
        let d = arena_stage1(&mut smmu, pool);
        smmu.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.attach(d, 0x10).unwrap();
        // The stage-2 record first: it is rebuilt before the stage-1 one fails.
        smmu.preserve(parent, 0x62).unwrap();
        smmu.preserve(d, 0x61).unwrap();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        core::mem::forget(smmu);
        drop(model);
    }
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    // This image took the recorded ASID before restoring: the stage-1 record cannot claim it.
    let mine = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
    assert_eq!((smmu.asids_in_use(), smmu.vmids_in_use()), (1, 0));
    let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
    // Found while validating, before anything changed (the rebuild's own undo stays as a second line).
    assert!(
        matches!(error, RestoreError::BeyondLimits { token: 0x61, .. }),
        "{error}"
    );
    assert_eq!(pool.arenas_in_use(), 0, "every arena taken back is given back");
    assert_eq!((smmu.asids_in_use(), smmu.vmids_in_use()), (1, 0), "no ID kept");
    assert_eq!(
        smmu.domains.book.lock().free_slots(),
        crate::domain::DEFAULT_DOMAINS - 1,
        "no slot kept"
    );
    assert!(smmu.retrieve(0x61).is_err() && smmu.retrieve(0x62).is_err());
    assert_ne!(
        smmu.low_level().ste(0x10).map(|s| s.config()),
        Ok(Config::Stage1),
        "no STE installed"
    );
    // This image's own domain is untouched.
    smmu.map(mine, 0, 0x8000_0000, 0x1000, RW).unwrap();
    smmu.free_domain(mine).unwrap();
    // The same with the recorded ID free but the recorded stream attached here: refused, this image's STE kept.
    let recorded_asid = smmu.low_level().allocate_asid().unwrap();
    let mine = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
    smmu.low_level().free_asid(recorded_asid).unwrap();
    smmu.attach(mine, 0x10).unwrap();
    let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
    assert!(
        matches!(error, RestoreError::BeyondLimits { token: 0x61, what, value: 0x10 } if what.contains("StreamID")),
        "{error}"
    );
    assert_eq!(pool.arenas_in_use(), 0);
    assert_eq!(
        smmu.low_level().ste(0x10).map(|s| s.config()),
        Ok(Config::Stage1),
        "this image's attachment kept"
    );
    smmu.detach(0x10).unwrap();
    smmu.free_domain(mine).unwrap();
}

/// An SMMU with EL2 contexts (IDR0.HYP), for EL2 stage-1 domains.
fn el2_model(frames: &'static HeapFrames) -> Model {
    Model::start_with(frames, crate::smmu::tests::IDRS[0].1 | 1 << 9)
}

const EL2: Stage1Options = Stage1Options {
    input_bits: 39,
    el2: true,
};

/// A first image with EL2 domain 0x71 attached to stream 0x10 and, when `second` (an image that broke the
/// one-in-use rule: simulated by hiding 0x71's regime while 0x72 attaches), EL2 domain 0x72 on stream 0x11.
fn el2_first_image(region: &mut Region, frames: &'static HeapFrames, second: bool) {
    let model = el2_model(frames);
    let mut smmu = boot(&model, frames);
    let pool = region.pool();
    let a = smmu.create_stage1(pool.take_arena().unwrap(), EL2).unwrap();
    smmu.map(a, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
    smmu.attach(a, 0x10).unwrap();
    smmu.preserve(a, 0x71).unwrap();
    if second {
        let b = smmu.create_stage1(pool.take_arena().unwrap(), EL2).unwrap();
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
        matches!(error, RestoreError::BeyondLimits { token: 0x71, what, .. } if what.contains("EL2")),
        "{error}"
    );
    assert_eq!(pool.arenas_in_use(), 0);
    assert_ne!(
        smmu.low_level().ste(0x10).map(|s| s.config()),
        Ok(Config::Stage1),
        "no STE installed"
    );
    assert_eq!(
        smmu.attachments(mine).as_deref(),
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
        matches!(error, RestoreError::BeyondLimits { what, .. } if what.contains("another record")),
        "{error}"
    );
    assert_eq!(pool.arenas_in_use(), 0);
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
    let d = smmu.create_stage1(pool.take_arena().unwrap(), options).unwrap();
    let other = smmu.create_stage1(pool.take_arena().unwrap(), options).unwrap();
    smmu.map(d, 0x1000, 0x8000_0000, 0x2000, RW).unwrap();
    smmu.attach(d, 0x10).unwrap();
    smmu.preserve(d, 9).unwrap();
    smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
    let frozen = Err(DomainError::HandoverPrepared { token: 9 });
    assert_eq!(smmu.map(d, 0x4000, 0x8000_4000, 0x1000, RW), frozen);
    assert_eq!(smmu.unmap(d, 0x1000, 0x1000).map(|_| ()), frozen);
    let mut gather = crate::pgtable::Gather::default();
    assert_eq!(smmu.unmap_deferred(d, 0x1000, 0x1000, &mut gather).map(|_| ()), frozen);
    assert!(gather.is_empty());
    assert_eq!(smmu.protect(d, 0x1000, 0x1000, Prot::READ).map(|_| ()), frozen);
    assert_eq!(smmu.trim_domain(d).map(|_| ()), frozen);
    assert_eq!(smmu.detach(0x10), frozen);
    assert_eq!(smmu.attach(d, 0x11), frozen);
    assert_eq!(smmu.iova_to_phys(d, 0x2000), Ok(Some(0x8000_1000)), "nothing changed");
    assert_eq!(
        smmu.low_level().ste(0x10).map(|s| s.config()),
        Ok(Config::Stage1),
        "still attached"
    );
    // Not preserved: usable.
    smmu.map(other, 0x1000, 0x8000_8000, 0x1000, RW).unwrap();
    smmu.attach(other, 0x11).unwrap();
    smmu.detach(0x11).unwrap();
    // Cancelled: usable again.
    smmu.cancel_handover(pool, BASE).unwrap();
    smmu.unmap(d, 0x1000, 0x1000).unwrap();
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
    let d = smmu.create_stage1(pool.take_arena().unwrap(), options).unwrap();
    smmu.map(d, 0x1000, 0x8000_0000, 0x2000, RW).unwrap();
    smmu.attach(d, 0x10).unwrap();
    smmu.preserve(d, 9).unwrap();
    let mut gather = crate::pgtable::Gather::default();
    smmu.unmap_deferred(d, 0x1000, 0x1000, &mut gather).unwrap();
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
    smmu.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
    let parent = smmu
        .create_stage2(pool.take_arena().unwrap(), Stage2Options { input_bits: 40 })
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
    smmu.map(d, 0x4000_0000, 0x8000_2000, 0x1000, RW).unwrap();
    smmu.free_domain(d).unwrap();
    // Prepared again, the other way round: preserve, prepare, cancel, unpreserve, prepare records nothing of it.
    smmu.preserve(nested, 11).unwrap();
    smmu.prepare_handover(pool, BASE, 2, SURVIVING).unwrap();
    smmu.cancel_handover(pool, BASE).unwrap();
    smmu.unpreserve(11).unwrap();
    smmu.unpreserve(10).unwrap();
    smmu.map(parent, 0x4000_0000, 0x8000_2000, 0x1000, RW).unwrap();
}

#[test]
fn prepare_cleans_the_smmus_own_arena_for_a_hand_off_with_the_smmu_running() {
    use crate::handover::pool::HandoverArena;
    use crate::mem::{Maintenance, maintenance_log};
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let pool = region.pool();
    *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
    let core = pool.take_arena().unwrap();
    // A coherent SMMU: nothing was cleaned as it was written, so only prepare can put it in memory.
    let smmu: Iommu<&'static HandoverArena> = model.smmu().init(core, &InitOptions::default()).unwrap();
    assert!(smmu.features().coherent);
    let d = smmu
        .create_stage1(pool.take_arena().unwrap(), Stage1Options::default())
        .unwrap();
    smmu.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
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
    use crate::handover::pool::HandoverArena;
    use crate::mem::{Maintenance, maintenance_log};
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let pool = region.pool();
    *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
    // The first image treats the SMMU as non-coherent: CR1 non-cacheable, which cannot change while SMMUEN = 1.
    let mut smmu = model.smmu();
    smmu.apply_board_coherency(false);
    let first: Iommu<&'static HandoverArena> = smmu.init(pool.take_arena().unwrap(), &InitOptions::default()).unwrap();
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

/// Rewrites the region's records with `change` applied and the CRC recomputed: a corruption only checks
/// deeper than the CRC can find.
fn tamper(pool: &HandoverPool, change: impl FnOnce(&mut InstanceRecords)) {
    let region = pool.metadata_extent().unwrap();
    let pool_extent = pool.pool().unwrap();
    let mut bytes = pool.lock_metadata().unwrap();
    let mut decoded = format::decode(&bytes, pool_extent).unwrap();
    change(&mut decoded.instances[0]);
    format::encode(&decoded.instances, decoded.generation, region, pool_extent, &mut bytes).unwrap();
}

/// SMMU_CR0 and SMMU_GBPA as the model holds them.
fn cr0_and_gbpa(model: &Model) -> (u32, u32) {
    let read = |offset| {
        // SAFETY: the model's live register block.
        unsafe { crate::smmu::tests::reg32(model.base, offset).read_volatile() }
    };
    (read(0x20), read(0x44))
}

/// Translation off and every incoming transaction aborting: CR0.SMMUEN = 0 and GBPA.ABORT = 1.
fn disabled_aborting(model: &Model) -> bool {
    let (cr0, gbpa) = cr0_and_gbpa(model);
    cr0 & 1 == 0 && gbpa & (1 << 20) != 0
}

/// Every STE of the span that holds StreamIDs 0..256 aborts (an invalid STE aborts too, with C_BAD_STE).
fn every_ste_aborts<A: FrameAllocator>(smmu: &Iommu<A>) -> bool {
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
fn running_first_image(region: &mut Region, frames: &'static HeapFrames) -> Model {
    use crate::handover::pool::HandoverArena;
    let model = Model::start(frames);
    let pool = region.pool();
    *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
    let core = pool.take_arena().unwrap();
    let mut first: Iommu<&'static HandoverArena> = model.smmu().init(core, &InitOptions::default()).unwrap();
    let options = Stage1Options {
        input_bits: 39,
        el2: false,
    };
    let d = first.create_stage1(pool.take_arena().unwrap(), options).unwrap();
    first.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
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
    assert_eq!(pool.arenas_in_use(), 0, "nothing taken back");
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
    assert_eq!(pool.arenas_in_use(), 0);
    // As recorded: found, its arena taken back.
    write(0x88, cfg);
    write(0x20, 0xd);
    assert!(running_smmu(pool, &model.smmu(), BASE).unwrap().is_some());
    assert_eq!(pool.arenas_in_use(), 1);
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
        format::decode(&bytes, pool.pool().unwrap()).unwrap().instances[0].records[0].asid
    };
    // Nothing is allocated until the hand-off is settled; a claim (as another restore's) takes the recorded
    // ASID.
    assert_eq!(next.low_level().allocate_asid(), Err(IdError::HandOffUnsettled));
    next.core.claim_asid(recorded).unwrap();
    let before = model.seen.lock().unwrap().commands.len();
    let error = next.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
    assert!(
        matches!(error, RestoreError::BeyondLimits { token: 0x77, what, .. } if what.contains("ASID")),
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
    assert_eq!(pool.arenas_in_use(), 1, "only the SMMU's own arena is taken");
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
    assert_eq!(pool.arenas_in_use(), 1, "only the SMMU's own arena");
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
        matches!(error, RestoreError::BeyondLimits { token: 0x52, what, .. } if what.contains("token")),
        "{error}"
    );
    assert_eq!(smmu.low_level().ste(0x40).map(|s| s.config()), Ok(Config::Abort));
    assert_eq!(smmu.low_level().ste(0x18).map(|s| s.config()), Ok(Config::Nested));
    let parent = smmu.retrieve(0x52).unwrap();
    assert_eq!(smmu.domain_kind(parent), Ok(crate::DomainKind::Stage2));
    core::mem::forget(smmu);
}

/// The record's page table, rewritten so that only a walk finds it broken (its table count cleared, so the
/// rebuild walks it; a table descriptor pointing outside the domain's arena): the rebuild fails after it took
/// the domain's arena back.
fn break_the_recorded_table(region: &mut Region, pool: &HandoverPool) {
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
    *model.probe.lock().unwrap() = Some(Box::new(move || pool.arenas_in_use()));
    let before = model.seen.lock().unwrap().commands.len();
    // Trusting the recorded tables, so that the broken one is found by the rebuild (after its arena was taken),
    // not by verification before it.
    let trusted = RestoreOptions {
        verify: super::super::verify::Verification::TrustRecordedTables,
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
    assert_eq!(pool.arenas_in_use(), 1, "the domain's arena is back afterwards");
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
        pool.arenas_in_use(),
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
            .create_stage1(pool.take_arena().unwrap(), Stage1Options::default())
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
    *model.probe.lock().unwrap() = Some(Box::new(move || pool.arenas_in_use()));
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
    assert_eq!(pool.arenas_in_use(), 0);
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
    smmu.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
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
    assert_eq!(pool.arenas_in_use(), 0, "nothing taken back again");
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
            .create_stage2(pool.take_arena().unwrap(), Stage2Options { input_bits: 40 })
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
    assert_eq!(pool.arenas_in_use(), 1, "the freed domain's arena is not taken back");
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
    assert_eq!(pool.arenas_in_use(), 0);
}

/// While a hand-off is prepared, the SMMU's own arena (it holds the stream table the next image adopts) is
/// sealed: a domain created with it is refused as such, not as the allocation failure it would become.
#[test]
fn a_domain_cannot_be_created_with_memory_a_prepared_hand_off_sealed() {
    use crate::handover::pool::HandoverArena;
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let pool = region.pool();
    *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
    let core = pool.take_arena().unwrap();
    let smmu: Iommu<&'static HandoverArena> = model.smmu().init(core, &InitOptions::default()).unwrap();
    smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
    assert_eq!(
        smmu.create_stage1(core, Stage1Options::default()),
        Err(DomainError::MemorySealed)
    );
    assert_eq!(smmu.domains.book.lock().free_slots(), crate::domain::DEFAULT_DOMAINS);
    smmu.cancel_handover(pool, BASE).unwrap();
    core::mem::forget(smmu);
}

/// The ASID of a stage-1 domain.
fn stage1_asid<A: FrameAllocator>(smmu: &Iommu<A>, d: DomainId) -> u16 {
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
    use crate::handover::pool::HandoverArena;
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let pool = region.pool();
    *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
    let core = pool.take_arena().unwrap();
    let mut first: Iommu<&'static HandoverArena> = model.smmu().init(core, &InitOptions::default()).unwrap();
    let options = Stage1Options {
        input_bits: 39,
        el2: false,
    };
    let kept = first.create_stage1(pool.take_arena().unwrap(), options).unwrap();
    first.map(kept, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
    first.attach(kept, 0x10).unwrap();
    // Not preserved: its tables in ordinary memory, its stream live at the hand-off. This driver refuses to
    // prepare a running hand-off with such a stream (`PrepareError::UnpreservedStream`), so it is attached
    // after the prepare, as a previous image that is not this driver may leave it.
    let left = first.create_stage1(frames, options).unwrap();
    first.map(left, 0x1000, 0x9000_0000, 0x1000, RW).unwrap();
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
    assert_eq!(next.iova_to_phys(d, 0x1000), Ok(Some(0x8000_0000)));
    // The hand-off is over. A new domain on another stream.
    let fresh = next.create_stage1(frames, options).unwrap();
    next.map(fresh, 0x1000, 0xa000_0000, 0x1000, RW).unwrap();
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
                pool.take_arena().unwrap(),
                Stage1Options {
                    input_bits: 39,
                    el2: true,
                },
            )
            .unwrap();
        smmu.map(el2, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
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
        let attachments = smmu.attachments(d).unwrap().to_vec();
        let before = model.seen.lock().unwrap().commands.len();
        smmu.unmap(d, 0x1000, 0x1000).unwrap();
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
    smmu.map(mine, 0x1000, 0x9000_0000, 0x1000, RW).unwrap();
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
    use crate::handover::pool::HandoverArena;
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let pool = region.pool();
    *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
    let core = pool.take_arena().unwrap();
    let smmu: Iommu<&'static HandoverArena> = model.smmu().init(core, &InitOptions::default()).unwrap();
    let strtab = smmu.configuration().stream_table_base;
    let other = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
    smmu.attach(other, 0x10).unwrap();
    assert_eq!(smmu.low_level().ste(0x10).map(|s| s.config()), Ok(Config::Stage1));
    assert_eq!(pool.arenas_in_use(), 1, "the SMMU's own arena");
    if let Ok(d) = smmu.create_stage1(core, Stage1Options::default()) {
        smmu.map(d, 0, 0x8000_0000, 0x1000, RW).unwrap();
        smmu.free_domain(d).unwrap();
    }
    assert_eq!(
        pool.arenas_in_use(),
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
        assert_eq!(next.iova_to_phys(d, 0x1000), Ok(Some(0x8000_0000)));
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
    use crate::handover::pool::HandoverArena;
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let pool = region.pool();
    *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
    let core = pool.take_arena().unwrap();
    let mut first: Iommu<&'static HandoverArena> = model.smmu().init(core, &InitOptions::default()).unwrap();
    let d = arena_stage1_on(&mut first, pool);
    first.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
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
    use crate::handover::pool::HandoverArena;
    // SSIDSIZE 5 (IDR1[10:6]): substreams exist.
    let idr1 = crate::smmu::tests::IDRS[1].1 | 5 << 6;
    let idr0 = crate::smmu::tests::IDRS[0].1;
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start_with_idrs(frames, idr0, idr1);
    let pool = region.pool();
    *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
    let core = pool.take_arena().unwrap();
    let mut first: Iommu<&'static HandoverArena> = model.smmu().init(core, &InitOptions::default()).unwrap();
    let d = arena_stage1_on(&mut first, pool);
    first.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
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
    assert_eq!(first.attachments(other).as_deref(), Ok(&[][..]));
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

fn arena_stage1_on(
    smmu: &mut Iommu<&'static crate::handover::pool::HandoverArena>,
    pool: &'static HandoverPool,
) -> DomainId {
    let options = Stage1Options {
        input_bits: 39,
        el2: false,
    };
    smmu.create_stage1(pool.take_arena().unwrap(), options).unwrap()
}

mod review3;
