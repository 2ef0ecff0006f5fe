//! A live update on the host: one SMMU model's domains preserved and prepared, the "reset" (the old driver
//! forgotten, a new pool object over the same region memory, a new SMMU model), then restore, retrieve and
//! finish, against the same page tables in place.
extern crate std;

use super::*;
use crate::Iova;
use crate::domain::{DomainId, Stage1Options, Stage2Options};
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
        let bytes = METADATA_BYTES as usize + 16 * 256 * 1024;
        Region {
            memory: Box::leak(std::vec![0u64; bytes / 8].into_boxed_slice()),
            extent: Extent {
                base: 0x80_0000_0000,
                len: bytes as u64,
            },
        }
    }

    /// A region whose pool is `pool_bytes` (a multiple of 64 KiB; its memory zeroed lazily by the host: only what
    /// is written is committed).
    pub(crate) fn with_pool_of(pool_bytes: usize) -> Region {
        let bytes = METADATA_BYTES as usize + pool_bytes;
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

    /// A fresh pool object over the region, with a metadata area of `metadata_bytes` and a workspace of its own.
    pub(crate) fn pool_with(&mut self, metadata_bytes: u64) -> &'static HandoverPool {
        let pool: &'static HandoverPool = Box::leak(Box::new(HandoverPool::new()));
        let words = crate::handover::pool::workspace_words(metadata_bytes);
        let workspace: &'static mut [u64] = Box::leak(std::vec![0u64; words].into_boxed_slice());
        let virt = NonNull::new(self.memory.as_mut_ptr().cast()).unwrap();
        // SAFETY: leaked memory used by nothing else (the previous "image" is forgotten).
        unsafe { pool.set_up_with(self.extent, virt, metadata_bytes, workspace) }.unwrap();
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

/// A fake SMMU with substreams: SSIDSIZE 5 (IDR1\[10:6\]), the other ID registers QEMU's.
pub(crate) fn model_with_substreams(frames: &'static HeapFrames) -> Model {
    Model::start_with_idrs(
        frames,
        crate::smmu::tests::IDRS[0].1,
        crate::smmu::tests::IDRS[1].1 | 5 << 6,
    )
}

/// A stage-1 domain (39-bit input, EL1&0 regime) in a fresh handover arena.
pub(crate) fn arena_stage1(smmu: &mut Iommu<&'static HeapFrames>, pool: &'static HandoverPool) -> DomainId {
    let options = Stage1Options {
        input_bits: 39,
        el2: false,
    };
    smmu.create_stage1(pool.take_memory().unwrap(), options).unwrap()
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
    smmu.map(s1, Iova(0x1000), PhysAddr(0x8000_0000), 0x2000, RW).unwrap();
    smmu.map(s1, Iova(0x4000_0000), PhysAddr(0x9000_0000), 0x20_0000, RW)
        .unwrap();
    smmu.attach(s1, 0x10).unwrap();
    let parent = smmu
        .create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 40 })
        .unwrap();
    smmu.map(parent, Iova(0x4000_0000), PhysAddr(0x4000_0000), 0x4000_0000, RW)
        .unwrap();
    let guest = crate::domain::GuestStage1 {
        cd_table: 0x4800_0000,
        cd_max_log2: 0,
        layout: CdTableLayout::Linear,
        default_substream: DefaultSubstream::Terminate,
    };
    let nested = smmu.create_nested(parent, guest).unwrap();
    smmu.attach(nested, 0x18).unwrap();
    let dropped = smmu
        .create_stage1(pool.take_memory().unwrap(), Stage1Options::default())
        .unwrap();
    let unclaimed = smmu
        .create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 40 })
        .unwrap();
    smmu.map(unclaimed, Iova(0), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    smmu.attach(unclaimed, 0x20).unwrap();
    smmu.preserve(s1, 0x51).unwrap();
    smmu.preserve(parent, 0x52).unwrap();
    smmu.preserve(nested, 0x53).unwrap();
    smmu.preserve(dropped, 0x54).unwrap();
    smmu.preserve(unclaimed, 0x55).unwrap();
    smmu.unpreserve(0x54).unwrap();
    // Mutations after preserve are what is restored: the state at prepare.
    smmu.unmap(s1, Iova(0x2000), 0x1000).unwrap();
    smmu.map(s1, Iova(0x3000), PhysAddr(0x8000_3000), 0x1000, RW).unwrap();
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
    assert_eq!(smmu.iova_to_phys(s1, Iova(0x1000)), Ok(Some(PhysAddr(0x8000_0000))));
    assert_eq!(
        smmu.iova_to_phys(s1, Iova(0x2000)),
        Ok(None),
        "unmapped after preserve: gone"
    );
    assert_eq!(
        smmu.iova_to_phys(s1, Iova(0x3000)),
        Ok(Some(PhysAddr(0x8000_3000))),
        "mapped after preserve: there"
    );
    assert_eq!(
        smmu.iova_to_phys(s1, Iova(0x401f_f000)),
        Ok(Some(PhysAddr(0x901f_f000)))
    );
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
    assert_eq!(smmu.attached(nested).as_deref(), Ok(&[(0x18, 0)][..]));
    // The restored domains work: map, unmap (with invalidation), and the parent cannot go before its child.
    smmu.map(s1, Iova(0x5000), PhysAddr(0x8000_5000), 0x1000, RW).unwrap();
    assert_eq!(smmu.unmap(s1, Iova(0x1000), 0x1000), Ok(0x1000));
    assert!(matches!(
        smmu.free_domain(parent),
        Err(DomainError::HasNestedDomains { .. })
    ));

    // finish: the unclaimed domain's stream aborts, its arena is free again, the region is re-armed empty.
    assert_eq!(smmu.low_level().ste(0x20).unwrap().config(), Config::Stage2);
    let in_use = pool.memories_in_use();
    assert_eq!(smmu.finish_handover(pool, BASE), Ok(FinishReport { unclaimed: 1 }));
    assert_eq!(smmu.low_level().ste(0x20).unwrap().config(), Config::Abort);
    assert_eq!(pool.memories_in_use(), in_use - 1);
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
    assert_eq!(pool.memories_in_use(), 0, "no arena taken back");
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
    use crate::handover::pool::HandoverMemory;
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let pool = region.pool();
    *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
    let core = pool.take_window(pool.window_bytes().unwrap()).unwrap();
    let mut first: Iommu<&'static HandoverMemory> = model.smmu().init(core, &InitOptions::default()).unwrap();
    let d = first
        .create_stage1(
            pool.take_memory().unwrap(),
            Stage1Options {
                input_bits: 39,
                el2: false,
            },
        )
        .unwrap();
    first.map(d, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
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
    assert_eq!(next.iova_to_phys(d, Iova(0x1000)), Ok(Some(PhysAddr(0x8000_0000))));
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
    let arena = pool.take_memory().unwrap();
    let d = smmu
        .create_stage1(
            arena,
            Stage1Options {
                input_bits: 39,
                el2: false,
            },
        )
        .unwrap();
    smmu.map(d, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    smmu.preserve(d, 9).unwrap();
    smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
    // The domain is frozen (see `a_prepared_domain_is_frozen_until_the_hand_off_is_cancelled`), and its
    // memory hands out nothing, whoever asks.
    assert!(crate::mem::FrameAllocator::allocate_zeroed(&arena, 4096, 4096).is_err());
    assert!(matches!(
        smmu.map(d, Iova(0x4000_0000), PhysAddr(0x8000_2000), 0x1000, RW),
        Err(DomainError::HandoverPrepared { token: 9 })
    ));
    // Cancelled: memory again, and the region no longer names this SMMU's domains.
    smmu.cancel_handover(pool, BASE).unwrap();
    smmu.map(d, Iova(0x4000_0000), PhysAddr(0x8000_2000), 0x1000, RW)
        .unwrap();
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
                what: RestoreLimit::DomainSlots,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(
        (pool.memories_in_use(), smmu.asids_in_use(), smmu.vmids_in_use()),
        (0, 0, 0)
    );
    assert_ne!(
        smmu.low_level().ste(0x10).map(|s| s.config()),
        Ok(Config::Stage1),
        "no STE installed"
    );
    assert!(smmu.retrieve(0x51).is_err());
}

/// The format has no cap on a record's streams (version 3), nor on a stream's substreams; a stream of this image
/// has at most `MAX_SUBSTREAMS_PER_STREAM` substreams attached. A record with more (its CRC valid) is refused by
/// `check_limits`, before anything is taken, never rebuilt with some of them silently dropped.
#[test]
fn a_record_with_more_substreams_of_a_stream_than_this_image_attaches_is_refused_before_anything_changes() {
    use crate::domain::MAX_SUBSTREAMS_PER_STREAM;
    use crate::handover::StreamRecord;
    let frames = frames();
    // An SMMU with substreams, in both images.
    let mut region = Region::new();
    {
        let model = model_with_substreams(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let d = arena_stage1(&mut smmu, pool);
        smmu.map(d, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
        smmu.attach(d, 0x10).unwrap();
        smmu.preserve(d, 0x51).unwrap();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        core::mem::forget(smmu);
    }
    running::tamper(region.pool(), |instance| {
        let r = instance.records.iter_mut().find(|r| r.token == 0x51).unwrap();
        // Its whole stream (with a CD table of 4 SubstreamID bits, which this SMMU has), then one substream more
        // than a stream of this image holds.
        let whole = StreamRecord {
            cd_ssid_bits: 4,
            ..r.streams[0]
        };
        r.streams = (0..=MAX_SUBSTREAMS_PER_STREAM as u32 + 1)
            .map(|ssid| StreamRecord { ssid, ..whole })
            .collect();
    });
    let model = model_with_substreams(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let before = model.seen.lock().unwrap().consumed.len();
    let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
    assert_eq!(
        error,
        RestoreError::BeyondLimits {
            token: 0x51,
            what: RestoreLimit::SubstreamsOfStream,
            value: 0x10
        }
    );
    assert_eq!(issued_since(&model, before), [], "nothing installed, nothing to undo");
    assert_eq!(
        (pool.memories_in_use(), smmu.asids_in_use(), smmu.vmids_in_use()),
        (0, 0, 0)
    );
    assert!(smmu.retrieve(0x51).is_err());
    core::mem::forget(smmu);
}

/// Suspicion 6: a region whose streams do not fit this image's stream records ([`MAX_ATTACHED_STREAMS`] with
/// the ones it has attached) is refused by `check_limits`, before anything is installed, not half-way through
/// the rebuild after STEs were written.
///
/// [`MAX_ATTACHED_STREAMS`]: crate::domain::MAX_ATTACHED_STREAMS
#[test]
fn a_region_with_more_streams_than_this_image_can_hold_is_refused_before_any_ste_is_written() {
    use crate::domain::MAX_ATTACHED_STREAMS;
    let frames = frames();
    let mut region = Region::new();
    {
        let model = Model::start(frames);
        let smmu = boot(&model, frames);
        let pool = region.pool();
        let d = smmu
            .create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 40 })
            .unwrap();
        smmu.map(d, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
        smmu.attach(d, 0x10).unwrap();
        smmu.preserve(d, 0x61).unwrap();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        core::mem::forget(smmu);
    }
    // The next image has every stream record in use already, all in one domain (stage 1: no VMID shared with
    // the record).
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let d = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
    for j in 0..MAX_ATTACHED_STREAMS {
        smmu.attach(d, (0x100 + j) as u32).unwrap();
    }
    assert_eq!(smmu.attached(d).unwrap().len(), MAX_ATTACHED_STREAMS);
    let pool = region.pool();
    let before = model.seen.lock().unwrap().consumed.len();
    let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
    assert_eq!(
        error,
        RestoreError::BeyondLimits {
            token: 0x61,
            what: RestoreLimit::AttachableStreams,
            value: MAX_ATTACHED_STREAMS as u64 + 1
        }
    );
    assert_eq!(issued_since(&model, before), [], "nothing installed, nothing to undo");
    assert_eq!(pool.memories_in_use(), 0);
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
            .create_stage1(pool.take_memory().unwrap(), Stage1Options::default())
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
            .create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 40 })
            .unwrap();
        let d = arena_stage1(&mut smmu, pool);
        smmu.map(d, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
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
    assert_eq!(pool.memories_in_use(), 0, "every arena taken back is given back");
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
    smmu.map(mine, Iova(0), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    smmu.free_domain(mine).unwrap();
    // The same with the recorded ID free but the recorded stream attached here: refused, this image's STE kept.
    let recorded_asid = smmu.low_level().allocate_asid().unwrap();
    let mine = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
    smmu.low_level().free_asid(recorded_asid).unwrap();
    smmu.attach(mine, 0x10).unwrap();
    let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
    assert!(
        matches!(
            error,
            RestoreError::BeyondLimits {
                token: 0x61,
                what: RestoreLimit::StreamAttached,
                value: 0x10
            }
        ),
        "{error}"
    );
    assert_eq!(pool.memories_in_use(), 0);
    assert_eq!(
        smmu.low_level().ste(0x10).map(|s| s.config()),
        Ok(Config::Stage1),
        "this image's attachment kept"
    );
    smmu.detach(0x10).unwrap();
    smmu.free_domain(mine).unwrap();
}

mod capacity;
mod findings;
mod prepare;
mod refused;
mod review3;
mod running;
mod streams;

#[allow(unused_imports)]
use {findings::*, prepare::*, refused::*, running::*};

/// Format 3 records an identity domain's kind: it comes back an identity domain (1:1, nothing may change it),
/// not an ordinary stage-1 or stage-2 domain whose mappings the next image could change.
#[test]
fn an_identity_domain_comes_back_an_identity_domain() {
    for stage2 in [false, true] {
        let frames = frames();
        let mut region = Region::new();
        let ram = [Extent {
            base: 0x8000_0000,
            len: 0x40_0000,
        }];
        {
            let model = Model::start(frames);
            let smmu = boot(&model, frames);
            let pool = region.pool();
            let id = smmu.create_identity(pool.take_memory().unwrap(), stage2, &ram).unwrap();
            smmu.attach(id, 0x10).unwrap();
            smmu.preserve(id, 0x1d).unwrap();
            smmu.prepare_handover(pool, BASE, 3, SURVIVING).unwrap();
            core::mem::forget(smmu);
        }
        let model = Model::start(frames);
        let smmu = boot(&model, frames);
        let pool = region.pool();
        smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
        let id = smmu.retrieve(0x1d).unwrap();
        assert_eq!(
            smmu.domain_kind(id),
            Ok(crate::domain::DomainKind::Identity),
            "stage 2: {stage2}"
        );
        assert_eq!(
            smmu.iova_to_phys(id, Iova(0x8012_3000)),
            Ok(Some(PhysAddr(0x8012_3000)))
        );
        assert!(matches!(
            smmu.map(id, Iova(0x4000_0000), PhysAddr(0x4000_0000), 0x1000, RW),
            Err(DomainError::WrongKind { .. })
        ));
        assert!(matches!(
            smmu.unmap(id, Iova(0x8000_0000), 0x1000),
            Err(DomainError::WrongKind { .. })
        ));
        let expected = if stage2 { Config::Stage2 } else { Config::Stage1 };
        assert_eq!(smmu.low_level().ste(0x10).unwrap().config(), expected);
    }
}

/// Several SMMUs preserve into one region, each under its own identity, and restore independently (issue 23).
/// The order that used to lose the second one's domains: after the reset the first SMMU restores, finishes, and
/// creates new preserved domains (taking arenas) before the second restores. The arenas the second's records name
/// are not handed out meanwhile, so its tables are intact when it restores.
#[test]
fn two_smmus_preserve_into_one_region_and_restore_independently() {
    // Two drivers (and their decoded regions) at once: more than a test thread's default stack in a debug build.
    std::thread::Builder::new()
        .stack_size(32 << 20)
        .spawn(two_smmus)
        .unwrap()
        .join()
        .unwrap();
}

fn two_smmus() {
    const BASE_B: u64 = 0x906_0000;
    let frames = frames();
    let mut region = Region::new();
    {
        let (model_a, model_b) = (Model::start(frames), Model::start(frames));
        let (mut a, mut b) = (boot(&model_a, frames), boot(&model_b, frames));
        let pool = region.pool();
        let da = arena_stage1(&mut a, pool);
        let db = arena_stage1(&mut b, pool);
        a.map(da, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
        b.map(db, Iova(0x1000), PhysAddr(0x9000_0000), 0x1000, RW).unwrap();
        a.attach(da, 0x10).unwrap();
        b.attach(db, 0x10).unwrap();
        a.preserve(da, 0xa).unwrap();
        b.preserve(db, 0xb).unwrap();
        a.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        b.prepare_handover(pool, BASE_B, 1, SURVIVING).unwrap();
        let bases: std::vec::Vec<u64> = {
            let metadata = pool.lock_metadata().unwrap();
            let decoded = crate::handover::format::sample::decode(&metadata, pool.pool().unwrap()).unwrap();
            decoded.instances.iter().map(|i| i.identity.base).collect()
        };
        assert_eq!(bases, [BASE, BASE_B], "one region, two identities");
        core::mem::forget(a);
        core::mem::forget(b);
    }
    let (model_a, model_b) = (Model::start(frames), Model::start(frames));
    let (a, b) = (boot(&model_a, frames), boot(&model_b, frames));
    let pool = region.pool();
    assert_eq!(a.restore_handover(pool, BASE, &ANYWHERE).unwrap().domains, 1);
    let da = a.retrieve(0xa).unwrap();
    assert_eq!(a.iova_to_phys(da, Iova(0x1000)), Ok(Some(PhysAddr(0x8000_0000))));
    assert_eq!(a.finish_handover(pool, BASE), Ok(FinishReport { unclaimed: 0 }));
    // The first SMMU grows: a domain of its takes (and zeroes) every frame the pool hands out, until none is
    // left; none of them is one the second's record names.
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
    let memory = pool.take_memory().unwrap();
    a.create_stage1(
        memory,
        Stage1Options {
            input_bits: 39,
            el2: false,
        },
    )
    .unwrap();
    let mut grown = 0;
    while let Ok(block) = memory.allocate_zeroed(4096, 4096) {
        assert!(
            named.iter().all(|e| !e.contains(block.phys.0, 4096)),
            "{:#x}",
            block.phys.0
        );
        grown += 1;
    }
    assert_eq!(pool.free_frames(), 0);
    assert!(grown > 1000);
    // The second restores as if alone: its record, its arena and its table as it left them.
    assert_eq!(b.restore_handover(pool, BASE_B, &ANYWHERE).unwrap().domains, 1);
    let db = b.retrieve(0xb).unwrap();
    assert_eq!(b.iova_to_phys(db, Iova(0x1000)), Ok(Some(PhysAddr(0x9000_0000))));
    assert_eq!(b.low_level().ste(0x10).unwrap().config(), Config::Stage1);
    assert_eq!(b.finish_handover(pool, BASE_B), Ok(FinishReport { unclaimed: 0 }));
    // Each restore took only its own instance's records; none is left.
    let metadata = pool.lock_metadata().unwrap();
    assert!(
        matches!(
            crate::handover::format::sample::decode(&metadata, pool.pool().unwrap()),
            Ok(d) if d.instances.iter().all(|i| i.records.is_empty())
        ) || metadata[..8] == [0; 8]
    );
}

/// After a hand-off with the SMMU left running, the frames holding its live stream table are not handed out
/// before that SMMU is adopted, any more than the frames its records name: another SMMU's driver taking memory
/// first (several SMMUs share the region) would otherwise zero the running SMMU's STEs.
#[test]
fn a_running_smmus_own_arena_is_not_handed_out() {
    let frames = frames();
    let mut region = Region::new();
    running::running_first_image(&mut region, frames);
    let pool = region.pool();
    // The running SMMU's own structures, as its identity records them.
    let core = {
        let metadata = pool.lock_metadata().unwrap();
        let decoded = crate::handover::format::sample::decode(&metadata, pool.pool().unwrap()).unwrap();
        let id = decoded.instances[0].identity;
        Extent {
            base: id.strtab_base,
            len: id.core_len,
        }
    };
    assert_ne!(core.len, 0, "a hand-off with the SMMU running");
    let memory = pool.take_memory().unwrap();
    let mut taken = 0;
    while let Ok(block) = memory.allocate_zeroed(4096, 4096) {
        assert!(
            !core.contains(block.phys.0, 4096),
            "the live stream table's frame {:#x}",
            block.phys.0
        );
        taken += 1;
    }
    assert!(taken > 900, "every other frame");
    // The running SMMU is adopted with its window, as it left it.
    assert!(pool.adoptable(core::iter::once(core)));
}

/// The restore reads the records from the copy it validated, never again from the region: a region rewritten
/// while the restore runs (as a device that could write it would) changes nothing the restore does. The region's
/// metadata is overwritten with ones at the first command the restore issues (its first STE, after the checks).
#[test]
fn a_region_rewritten_during_the_restore_changes_nothing_it_does() {
    use std::sync::atomic::AtomicBool;
    let frames = frames();
    let mut region = Region::new();
    first_image(&mut region, frames);
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let metadata = region.memory.as_mut_ptr() as usize;
    let pool = region.pool();
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let once = done.clone();
    *model.probe.lock().unwrap() = Some(Box::new(move || {
        if !once.swap(true, core::sync::atomic::Ordering::SeqCst) {
            for at in (crate::handover::format::HEADER_SIZE..METADATA_BYTES as usize).step_by(8) {
                // SAFETY: inside the leaked region's metadata area, which the restore only reads before its
                // first command (into its snapshot); written once, here.
                unsafe { ((metadata + at) as *mut u64).write_volatile(u64::MAX) };
            }
        }
        0
    }));
    let report = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
    assert!(
        done.load(core::sync::atomic::Ordering::SeqCst),
        "the region was rewritten mid-restore"
    );
    assert_eq!((report.generation, report.domains, report.streams), (7, 4, 3));
    let s1 = smmu.retrieve(0x51).unwrap();
    assert_eq!(smmu.iova_to_phys(s1, Iova(0x1000)), Ok(Some(PhysAddr(0x8000_0000))));
    assert_eq!(smmu.low_level().ste(0x18).unwrap().config(), Config::Nested);
    assert_eq!(smmu.low_level().ste(0x20).unwrap().config(), Config::Stage2);
    *model.probe.lock().unwrap() = None;
    core::mem::forget(smmu);
}

/// The format has no cap on records; one restore rebuilds as many as the SMMU has free domain slots. More (a
/// region with a valid CRC holding one more than `DEFAULT_DOMAINS`) is refused by `check_limits` before anything
/// is taken.
#[test]
fn more_records_than_one_restore_rebuilds_are_refused_before_anything_changes() {
    use crate::domain::DEFAULT_DOMAINS as MAX_RECORDS;
    let frames = frames();
    let mut region = Region::new();
    first_image(&mut region, frames);
    running::tamper(region.pool(), |instance| {
        let nested = instance.records.iter().find(|r| r.token == 0x53).unwrap().clone();
        let extra = MAX_RECORDS + 1 - instance.records.len();
        for i in 0..extra as u64 {
            let mut copy = nested.clone();
            copy.head.token = 0x1000 + i;
            copy.streams.clear();
            instance.records.push(copy);
        }
        assert_eq!(instance.records.len(), MAX_RECORDS + 1);
    });
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let before = model.seen.lock().unwrap().consumed.len();
    let error = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap_err();
    assert!(
        matches!(error, RestoreError::BeyondLimits { what: RestoreLimit::DomainSlots, value, .. }
            if value == MAX_RECORDS as u64 + 1),
        "{error}"
    );
    assert_eq!(issued_since(&model, before), [], "nothing installed, nothing to undo");
    assert_eq!(
        (pool.memories_in_use(), smmu.asids_in_use(), smmu.vmids_in_use()),
        (0, 0, 0)
    );
    core::mem::forget(smmu);
}
