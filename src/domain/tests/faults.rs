//! Faults filed per domain and substream, failed invalidations kept until the next operation, and what the SMMU lacks.

use super::*;
use crate::Iova;

/// A hand-assembled F_TRANSLATION record (IHI 0070 7.3.11): number 0x10, SSV [11], SubstreamID [31:12],
/// StreamID [63:32]; RnW [99]; InputAddr [191:128].
pub(super) fn fault(sid: u32, ssid: Option<u32>, address: u64, write: bool) -> [u64; 4] {
    let ssv = ssid.map_or(0, |s| 1 << 11 | u64::from(s) << 12);
    let rnw = if write { 0 } else { 1 << 35 };
    [0x10 | ssv | u64::from(sid) << 32, rnw, address, 0]
}

/// Plays the SMMU writing `records` into the event queue and advancing EVENTQ_PROD.
pub(super) fn inject(model: &Model, smmu: &Iommu<&'static HeapFrames>, frames: &HeapFrames, records: &[[u64; 4]]) {
    let base = frames.virt(smmu.configuration().eventq_base) as *mut u64;
    let prod_register = reg32(model.base, 0x1_00a8);
    // SAFETY: the model's register block and the driver's event queue are live.
    unsafe {
        let mut prod = prod_register.read_volatile();
        for r in records {
            let index = (prod & 0xff) as usize;
            for (i, w) in r.iter().enumerate() {
                base.add(index * 4 + i).write_volatile(*w);
            }
            prod = (prod + 1) & 0x1ff;
        }
        prod_register.write_volatile(prod);
    }
}

#[test]
fn faults_go_to_the_domain_of_their_stream_or_the_smmu_wide_report() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let a = s1(&mut smmu, frames);
    let b = s2(&mut smmu, frames);
    smmu.attach(a, 0x10).unwrap();
    smmu.attach(b, 0x18).unwrap();
    let records: Vec<[u64; 4]> = (0..12)
        .map(|i| fault(if i % 2 == 0 { 0x10 } else { 0x18 }, None, 0x1000 * i, true))
        .chain([fault(0x99, None, 0x5000, false)])
        .collect();
    inject(&model, &smmu, frames, &records);
    let mut typed = 0;
    let report = smmu.drain_faults(|_| typed += 1).unwrap();
    assert_eq!((report.events, typed), (13, 13), "typed events stay available");
    let fa = smmu.domain_faults(a).unwrap().clone();
    assert_eq!((fa.faults.len(), fa.lost), (6, 0));
    assert!(
        fa.faults
            .iter()
            .all(|f| f.stream == 0x10 && f.kind == FaultKind::Translation)
    );
    assert_eq!(fa.faults[1].address, Some(0x2000));
    assert_eq!(smmu.domain_faults(b).unwrap().total(), 6);
    assert_eq!(smmu.unattached_faults().faults[0].stream, 0x99);
    // Bounded: more faults than the report holds are counted as lost.
    let more: Vec<[u64; 4]> = (0..FAULT_REPORT_CAPACITY as u64)
        .map(|i| fault(0x10, None, i << 12, true))
        .collect();
    inject(&model, &smmu, frames, &more);
    smmu.drain_faults(|_| {}).unwrap();
    let fa = smmu.clear_domain_faults(a).unwrap();
    assert_eq!((fa.faults.len(), fa.lost), (FAULT_REPORT_CAPACITY, 6));
    assert_eq!(smmu.domain_faults(a).unwrap().total(), 0, "cleared");
    // After detach, the stream's faults are nobody's.
    smmu.detach(0x10).unwrap();
    inject(&model, &smmu, frames, &[fault(0x10, None, 0, true)]);
    smmu.drain_faults(|_| {}).unwrap();
    assert_eq!(smmu.domain_faults(a).unwrap().total(), 0);
    assert_eq!(smmu.clear_unattached_faults().total(), 2);
}

#[test]
fn a_full_report_with_a_saturated_lost_count_totals_without_overflowing() {
    let mut report = FaultReport::default();
    let f = Fault::of(&Event::decode(&fault(SID, None, 0, true))).unwrap();
    for _ in 0..FAULT_REPORT_CAPACITY {
        report.push(f);
    }
    report.lost = u32::MAX - 1;
    report.push(f);
    report.push(f);
    assert_eq!(report.lost, u32::MAX, "saturated");
    assert_eq!(report.total(), u32::MAX);
}

#[test]
fn an_overflow_signalled_both_ways_is_reported_by_one_drain_only() {
    use crate::hw::event::GlobalErrors;
    use crate::queue::evtq::Overflow;
    let frames = frames();
    let model = Model::start(frames);
    let smmu = smmu(&model, frames);
    // The SMMU toggles EVENTQ_PROD.OVFLG and also raises GERROR.EVENTQ_ABT_ERR for the same loss.
    let prod = reg32(model.base, 0x1_00a8);
    // SAFETY: the model's live register block.
    unsafe {
        prod.write_volatile(prod.read_volatile() ^ 1 << 31);
        reg32(model.base, 0x60).write_volatile(GlobalErrors::EVENTQ_ABT_ERR.bits());
    }
    assert!(smmu.drain_faults(|_| {}).unwrap().overflow.is_some());
    assert_eq!(
        smmu.drain_faults(|_| {}).unwrap().overflow,
        None::<Overflow>,
        "nothing was lost since the last drain"
    );
}

#[test]
fn a_stage2_fault_in_a_nested_walk_reports_its_ipa() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let parent = s2(&mut smmu, frames);
    let nested = smmu.create_nested(parent, GUEST).unwrap();
    smmu.attach(nested, SID).unwrap();
    // The guest's stage-1 descriptor fetch missed at stage 2: S2 [103], CLASS TT [105:104] = 1, InputAddr the
    // guest VA, IPA[55:12] at [247:204] the descriptor's IPA.
    let mut s2_fault = fault(SID, None, 0xdead_0000, false);
    s2_fault[1] |= 1 << 39 | 1 << 40;
    s2_fault[3] = 0x4123_4000;
    // A stage-1 fault: its IPA field is UNKNOWN.
    let mut s1_fault = fault(SID, None, 0xbeef_0000, true);
    s1_fault[3] = 0x7777_7000;
    inject(&model, &smmu, frames, &[s2_fault, s1_fault]);
    smmu.drain_faults(|_| {}).unwrap();
    let f = smmu.domain_faults(nested).unwrap();
    assert_eq!(f.faults.len(), 2);
    assert_eq!(
        (f.faults[0].stage, f.faults[0].address, f.faults[0].ipa),
        (Some(FaultStage::Two), Some(0xdead_0000), Some(0x4123_4000)),
        "the IPA the stage-2 table lacks, not only the guest VA"
    );
    assert_eq!((f.faults[1].stage, f.faults[1].ipa), (Some(FaultStage::One), None));
}

#[test]
fn faults_taken_before_a_detach_stay_with_the_domain_they_were_taken_in() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let a = s1(&mut smmu, frames);
    let b = s1(&mut smmu, frames);
    smmu.attach(a, SID).unwrap();
    // Taken while the stream was a's, not drained before it moved to b.
    inject(&model, &smmu, frames, &[fault(SID, None, 0xa000, true)]);
    smmu.detach(SID).unwrap();
    smmu.attach(b, SID).unwrap();
    smmu.drain_faults(|_| {}).unwrap();
    assert_eq!(
        smmu.domain_faults(b).unwrap().total(),
        0,
        "b never owned the stream when the fault was taken"
    );
    assert_eq!(smmu.domain_faults(a).unwrap().faults[0].address, Some(0xa000));
    // The same for a substream.
    let model2 = Model::start_with_idrs(frames, IDRS[0].1, IDRS[1].1 | 5 << 6);
    let mut smmu2 = model2.smmu().init(frames, &InitOptions::default()).unwrap();
    let (w, x, y) = (s1(&mut smmu2, frames), s1(&mut smmu2, frames), s1(&mut smmu2, frames));
    smmu2.attach(w, SID).unwrap();
    smmu2.attach_substream(x, SID, 3).unwrap();
    inject(&model2, &smmu2, frames, &[fault(SID, Some(3), 0x3000, false)]);
    smmu2.detach_substream(SID, 3).unwrap();
    smmu2.attach_substream(y, SID, 3).unwrap();
    smmu2.drain_faults(|_| {}).unwrap();
    assert_eq!(smmu2.domain_faults(y).unwrap().total(), 0);
    assert_eq!(smmu2.domain_faults(x).unwrap().total(), 1);
}

#[test]
fn a_failed_unmap_invalidation_keeps_the_tables_until_the_next_operation() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let d = s1(&mut smmu, frames);
    smmu.map(d, Iova(0x40_0000), PhysAddr(0x8000_0000), 0x4000, RW).unwrap();
    let live = frames.live_blocks();
    model.refuse.store(opcode::TLBI_NH_VA, Ordering::SeqCst);
    assert!(matches!(
        smmu.unmap(d, Iova(0x40_0000), 0x4000),
        Err(DomainError::Invalidation(_))
    ));
    assert_eq!(frames.live_blocks(), live, "the emptied tables are not freed");
    model.refuse.store(0, Ordering::SeqCst);
    // The next operation flushes them first.
    let before = consumed(&model);
    smmu.map(d, Iova(0x80_0000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    assert_eq!(since(&model, before)[..2], [opcode::TLBI_NH_VA, opcode::SYNC]);
}

#[test]
fn a_failed_sync_keeps_the_unmap_invalidation_that_failed_before_it() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let d = s1(&mut smmu, frames);
    let asid = asid_of(&smmu, d);
    // One last-level table in each of two 2 MiB ranges; each unmap below unlinks one (a page at 0 keeps
    // their level-2 table).
    smmu.map(d, Iova(0), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    smmu.map(d, Iova(0x40_0000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    smmu.map(d, Iova(0x80_0000), PhysAddr(0x9000_0000), 0x1000, RW).unwrap();
    let live = frames.live_blocks();
    let mut deferred = Gather::default();
    smmu.unmap_deferred(d, Iova(0x80_0000), 0x20_0000, &mut deferred)
        .unwrap();
    model.refuse.store(opcode::TLBI_NH_VA, Ordering::SeqCst);
    // This unmap's invalidation fails and is kept; so does the deferred one's.
    assert!(matches!(
        smmu.unmap(d, Iova(0x40_0000), 0x20_0000),
        Err(DomainError::Invalidation(_))
    ));
    assert!(matches!(
        smmu.sync_domain(d, &mut deferred),
        Err(DomainError::Invalidation(_))
    ));
    assert_eq!(frames.live_blocks(), live, "no unlinked table freed yet");
    model.refuse.store(0, Ordering::SeqCst);
    // The next operation flushes both: neither IOVA may stay in the TLB, and both tables are freed after.
    let before = consumed(&model);
    smmu.map(d, Iova(0xc0_0000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    // One range invalidation over both (RIL): its pieces, then the CMD_SYNC.
    let mut expected: Vec<Issued> =
        crate::hw::command::plan_range_invalidation(0x40_0000, 0x60_0000, Granule::Size4K, 0)
            .unwrap()
            .map(|piece| Issued::NhVa {
                vmid: 0,
                asid,
                address: piece.address,
            })
            .collect();
    expected.push(Issued::Sync);
    assert_eq!(issued_since(&model, before), expected);
    assert_eq!(
        frames.live_blocks(),
        live - 2 + 1,
        "both unlinked tables freed; one new"
    );
}

#[test]
fn what_the_smmu_lacks_is_unsupported_and_allocates_nothing() {
    let frames = frames();
    // QEMU's stage-1-only SMMU (IDR0 0x0D44101A: S2P = 0).
    let model = Model::start_with(frames, 0x0d44_101a);
    let mut smmu = smmu(&model, frames);
    let live = frames.live_blocks();
    assert!(matches!(
        smmu.create_stage2(memory(frames), Stage2Options { input_bits: 40 }),
        Err(DomainError::Unsupported(Unsupported::NoStage2))
    ));
    let el2 = Stage1Options {
        input_bits: 39,
        el2: true,
    };
    assert!(
        matches!(
            smmu.create_stage1(memory(frames), el2),
            Err(DomainError::Unsupported(Unsupported::NoEl2Contexts))
        ),
        "no IDR0.HYP"
    );
    let d = s1(&mut smmu, frames);
    let error = smmu.create_nested(d, GUEST).unwrap_err();
    assert!(
        matches!(error, DomainError::Unsupported(Unsupported::NoNesting)),
        "{error}"
    );
    assert_eq!((smmu.asids_in_use(), smmu.vmids_in_use()), (1, 0));
    smmu.free_domain(d).unwrap();
    assert_eq!(frames.live_blocks(), live);
}

/// Every event type's kind prints as the event's architectural name: the enum and the decoder agree on all 256
/// type codes.
#[test]
fn a_fault_kind_is_named_as_its_event() {
    for code in 0..=255u8 {
        let mut record = [0u8; crate::hw::event::EVENT_RECORD_BYTES];
        record[0] = code;
        let event = Event::from_le_bytes(&record);
        assert_eq!(FaultKind::of(&event).name(), event.name(), "type {code:#x}");
        assert_eq!(std::format!("{}", FaultKind::of(&event)), event.name());
    }
}
