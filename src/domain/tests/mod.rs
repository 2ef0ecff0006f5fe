//! Domains against the SMMU model (`crate::smmu::tests::model`): every operation's commands (the model records the
//! whole commands it consumes, so the tests check the stream, ASID, VMID and address of each invalidation), the
//! entries it writes, every misuse error, stale handles and fault routing.
extern crate std;

use super::*;
use crate::ctx::CdTableError;
use crate::hw::command::Command;
use crate::hw::command::opcode;
use crate::hw::event::Event;
use crate::hw::ste::Config;
use crate::hw::ste::{self, CdTableLayout, DefaultSubstream};
use crate::ids::IdError;
use crate::mem::{FrameAllocator, PhysAddr};
use crate::pgtable::{Format, Gather, Granule, IoPageTable, MapError, Prot, Stage};
use crate::queue::cmdq::Batch;
use crate::smmu::AttachError;
use crate::smmu::tests::{IDRS, Issued, Model, assert_ste_steps, frames, issued_since, reg32};
use crate::testing::HeapFrames;
use crate::{InitOptions, Iommu};
use core::sync::atomic::Ordering;
use std::vec::Vec;

const RW: Prot = Prot::READ.union(Prot::WRITE).union(Prot::CACHEABLE);
const SID: u32 = 0x10;

fn memory(frames: &'static HeapFrames) -> DomainMemory {
    frames
}

fn consumed(model: &Model) -> usize {
    model.seen.lock().unwrap().consumed.len()
}

fn since(model: &Model, from: usize) -> Vec<u8> {
    model.seen.lock().unwrap().consumed[from..].to_vec()
}

fn smmu(model: &Model, frames: &'static HeapFrames) -> Iommu<&'static HeapFrames> {
    model.smmu().init(frames, &InitOptions::default()).unwrap()
}

fn s1(smmu: &mut Iommu<&'static HeapFrames>, frames: &'static HeapFrames) -> DomainId {
    smmu.create_stage1(
        memory(frames),
        Stage1Options {
            input_bits: 39,
            el2: false,
        },
    )
    .unwrap()
}

fn s2(smmu: &mut Iommu<&'static HeapFrames>, frames: &'static HeapFrames) -> DomainId {
    smmu.create_stage2(memory(frames), Stage2Options { input_bits: 40 })
        .unwrap()
}

#[test]
fn a_stage1_domain_issues_every_invalidation_itself() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    // The stream's level-2 span of the stream table stays once allocated: allocate it before counting.
    smmu.low_level().attach_abort(SID).unwrap();
    let baseline = frames.live_blocks();
    let d = s1(&mut smmu, frames);
    assert_eq!(smmu.domain_kind(d), Ok(DomainKind::Stage1));
    smmu.map(d, 0x40_0000, 0x8000_0000, 0x4000, RW).unwrap();
    assert_eq!(smmu.iova_to_phys(d, 0x40_1234), Ok(Some(0x8000_1234)));

    let before = consumed(&model);
    smmu.attach(d, SID).unwrap();
    let ste = smmu.low_level().ste(SID).unwrap();
    assert_eq!(ste.config(), Config::Stage1);
    assert!(
        since(&model, before)
            .iter()
            .all(|&op| op == opcode::CFGI_STE || op == opcode::SYNC)
    );
    assert_eq!(smmu.attachments(d).as_deref(), Ok(&[(SID, 0)][..]));

    // Unmap: one range TLBI by ASID (RIL) and one CMD_SYNC, nothing else.
    let before = consumed(&model);
    assert_eq!(smmu.unmap(d, 0x40_1000, 0x1000), Ok(0x1000));
    assert_eq!(since(&model, before), [opcode::TLBI_NH_VA, opcode::SYNC]);
    assert_eq!(smmu.iova_to_phys(d, 0x40_1000), Ok(None));
    // Protect likewise.
    let before = consumed(&model);
    assert_eq!(
        smmu.protect(d, 0x40_0000, 0x1000, Prot::READ | Prot::CACHEABLE),
        Ok(0x1000)
    );
    assert_eq!(since(&model, before), [opcode::TLBI_NH_VA, opcode::SYNC]);
    // Map needs none.
    let before = consumed(&model);
    smmu.map(d, 0x40_1000, 0x9000_0000, 0x1000, RW).unwrap();
    assert_eq!(since(&model, before), []);

    // Detach: STE to abort, the stream's cached CDs, then (last attachment) the domain's TLB entries.
    let before = consumed(&model);
    smmu.detach(SID).unwrap();
    assert_eq!(smmu.low_level().ste(SID).unwrap().config(), Config::Abort);
    let ops = since(&model, before);
    assert_eq!(
        &ops[ops.len() - 4..],
        [opcode::CFGI_CD_ALL, opcode::SYNC, opcode::TLBI_NH_ASID, opcode::SYNC]
    );
    assert!(
        ops[..ops.len() - 4]
            .iter()
            .all(|&op| op == opcode::CFGI_STE || op == opcode::SYNC)
    );

    // Free: the ASID's entries go (with their CMD_SYNC) before the tables and the ASID.
    let before = consumed(&model);
    smmu.free_domain(d).unwrap();
    assert_eq!(since(&model, before), [opcode::TLBI_NH_ASID, opcode::SYNC]);
    assert_eq!(frames.live_blocks(), baseline, "tables and CD table returned");
    // The ASID is free again: the next domain gets it.
    let again = s1(&mut smmu, frames);
    assert_ne!(again, d, "a new generation");
}

#[test]
fn a_stale_handle_is_an_error_for_every_operation() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let d = s1(&mut smmu, frames);
    smmu.free_domain(d).unwrap();
    // The slot is reused by the next domain: the old handle must still be refused.
    let reused = s1(&mut smmu, frames);
    assert_eq!(reused.index(), d.index());
    let stale = Err(DomainError::StaleDomain(d));
    assert_eq!(smmu.domain_kind(d), stale.map(|()| DomainKind::Stage1));
    assert_eq!(smmu.map(d, 0, 0, 0x1000, RW), stale);
    assert_eq!(smmu.unmap(d, 0, 0x1000), stale.map(|()| 0));
    assert_eq!(smmu.protect(d, 0, 0x1000, RW), stale.map(|()| 0));
    assert_eq!(smmu.iova_to_phys(d, 0), stale.map(|()| None));
    assert_eq!(smmu.attach(d, SID), stale);
    assert_eq!(smmu.attach_substream(d, SID, 1), stale);
    assert_eq!(smmu.free_domain(d), stale);
    assert!(smmu.domain_faults(d).is_err());
    assert_eq!(smmu.create_nested(d, GUEST).err(), Some(DomainError::StaleDomain(d)));
    // The live domain in that slot is untouched.
    smmu.map(reused, 0, 0x8000_0000, 0x1000, RW).unwrap();
    assert_eq!(smmu.iova_to_phys(reused, 0), Ok(Some(0x8000_0000)));
}

const GUEST: GuestStage1 = GuestStage1 {
    cd_table: 0x4000_0000,
    cd_max_log2: 0,
    layout: CdTableLayout::Linear,
    default_substream: DefaultSubstream::Terminate,
};

#[test]
fn a_stage2_domain_and_its_nested_domains() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let parent = s2(&mut smmu, frames);
    smmu.map(parent, 0x4000_0000, 0x8000_0000, 0x20_0000, RW).unwrap();
    let nested = smmu.create_nested(parent, GUEST).unwrap();
    assert_eq!(smmu.domain_kind(nested), Ok(DomainKind::Nested));
    smmu.attach(nested, SID).unwrap();
    let ste = smmu.low_level().ste(SID).unwrap();
    assert_eq!(ste.config(), Config::Nested);
    assert_eq!(
        ste.cd_table(),
        PhysAddr(GUEST.cd_table),
        "S1ContextPtr is the guest's IPA"
    );
    let Translation::Stage2 { vmid, .. } = smmu.domains.get(parent).unwrap().translation else {
        unreachable!()
    };
    assert_eq!(ste.vmid(), vmid, "the parent's VMID");
    assert_eq!(ste.s2_table(), smmu.domain_table(parent).unwrap().root());

    // A stage-2 change under a live nested domain: S2 by IPA, CMD_SYNC, then the combined entries, CMD_SYNC.
    let before = consumed(&model);
    smmu.unmap(parent, 0x4000_0000, 0x1000).unwrap();
    let ops = since(&model, before);
    assert_eq!(
        ops,
        [opcode::TLBI_S2_IPA, opcode::SYNC, opcode::TLBI_NH_ALL, opcode::SYNC],
        "split 2 MiB block? {ops:?}"
    );

    // The guest owns the stage 1: no map on the nested domain; guest invalidations go under the VMID.
    assert!(matches!(
        smmu.map(nested, 0, 0, 0x1000, RW),
        Err(DomainError::WrongKind {
            kind: DomainKind::Nested,
            ..
        })
    ));
    let before = consumed(&model);
    smmu.invalidate_guest(nested, GuestInvalidation::Asid(7)).unwrap();
    smmu.invalidate_guest(nested, GuestInvalidation::Cd { ssid: 0, leaf: true })
        .unwrap();
    assert_eq!(
        since(&model, before),
        [opcode::TLBI_NH_ASID, opcode::SYNC, opcode::CFGI_CD, opcode::SYNC]
    );

    // The parent cannot go while a nested domain uses it; a nested domain cannot be a parent.
    assert_eq!(
        smmu.free_domain(parent),
        Err(DomainError::HasNestedDomains {
            domain: parent,
            children: 1
        })
    );
    assert!(matches!(
        smmu.create_nested(nested, GUEST),
        Err(DomainError::WrongKind {
            wanted: "a stage-2 parent",
            ..
        })
    ));
    smmu.detach(SID).unwrap();
    let before = consumed(&model);
    smmu.free_domain(nested).unwrap();
    assert_eq!(since(&model, before), [opcode::TLBI_NH_ALL, opcode::SYNC]);
    let before = consumed(&model);
    smmu.free_domain(parent).unwrap();
    assert_eq!(since(&model, before), [opcode::TLBI_S12_VMALL, opcode::SYNC]);
}

#[test]
fn without_nested_domains_a_stage2_change_is_one_sync() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let d = s2(&mut smmu, frames);
    smmu.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
    smmu.attach(d, SID).unwrap();
    assert_eq!(smmu.low_level().ste(SID).unwrap().config(), Config::Stage2);
    let before = consumed(&model);
    smmu.unmap(d, 0x1000, 0x1000).unwrap();
    assert_eq!(since(&model, before), [opcode::TLBI_S2_IPA, opcode::SYNC]);
}

/// STE.S2PTW (qword 2, bit 54), as Linux sets it: a stage-1 walk or CD fetch that lands on Device memory at
/// stage 2 faults, so a guest cannot aim its CD table or stage-1 tables at a passthrough BAR and make the SMMU
/// read MMIO with side effects.
#[test]
fn stage2_and_nested_stes_protect_table_walks_from_device_memory() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let parent = s2(&mut smmu, frames);
    smmu.attach(parent, SID).unwrap();
    let ste = smmu.low_level().ste(SID).unwrap();
    assert_eq!(ste.config(), Config::Stage2);
    assert_ne!(ste.0[2] & ste::Q2_S2PTW, 0, "stage 2: {:#x}", ste.0[2]);
    smmu.detach(SID).unwrap();
    let nested = smmu.create_nested(parent, GUEST).unwrap();
    smmu.attach(nested, SID).unwrap();
    let ste = smmu.low_level().ste(SID).unwrap();
    assert_eq!(ste.config(), Config::Nested);
    assert_ne!(ste.0[2] & ste::Q2_S2PTW, 0, "nested: {:#x}", ste.0[2]);
}

#[test]
fn misuse_is_refused_and_changes_nothing() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let a = s1(&mut smmu, frames);
    let b = s2(&mut smmu, frames);
    smmu.attach(a, SID).unwrap();
    let ste = smmu.low_level().ste(SID).unwrap();
    let before = consumed(&model);

    // A stream attached elsewhere.
    assert_eq!(
        smmu.attach(b, SID),
        Err(DomainError::StreamInUse { sid: SID, domain: a })
    );
    assert_eq!(
        smmu.attach(a, SID),
        Err(DomainError::StreamInUse { sid: SID, domain: a })
    );
    // A stream beyond the table (16 SID bits on the model).
    assert!(matches!(smmu.attach(b, 1 << 16), Err(DomainError::Stream(_))));
    // Free while attached.
    assert_eq!(
        smmu.free_domain(a),
        Err(DomainError::StillAttached {
            domain: a,
            attachments: 1
        })
    );
    // Wrong kinds.
    assert!(matches!(
        smmu.attach_substream(b, SID, 1),
        Err(DomainError::WrongKind {
            kind: DomainKind::Stage2,
            ..
        })
    ));
    assert!(matches!(
        smmu.create_nested(a, GUEST),
        Err(DomainError::WrongKind {
            kind: DomainKind::Stage1,
            ..
        })
    ));
    // No substreams on this SMMU (SSIDSIZE 0): every SubstreamID is beyond the stream's CD table.
    assert_eq!(
        smmu.attach_substream(a, SID, 1),
        Err(DomainError::BadSubstream { ssid: 1, ssid_bits: 0 })
    );
    // IOVAs outside the domain's 39-bit input range, and unaligned ones.
    assert!(matches!(
        smmu.map(a, 1 << 39, 0x8000_0000, 0x1000, RW),
        Err(DomainError::Map(MapError::InputOutOfRange { .. }))
    ));
    assert!(matches!(
        smmu.map(a, 0x800, 0x8000_0000, 0x1000, RW),
        Err(DomainError::Map(_))
    ));
    // Overlap.
    smmu.map(a, 0, 0x8000_0000, 0x1000, RW).unwrap();
    assert!(matches!(
        smmu.map(a, 0, 0x9000_0000, 0x1000, RW),
        Err(DomainError::Map(MapError::Overlap { .. }))
    ));
    assert_eq!(
        smmu.iova_to_phys(a, 0),
        Ok(Some(0x8000_0000)),
        "the first mapping stays"
    );
    // Unknown streams.
    assert_eq!(
        smmu.detach(0x11),
        Err(DomainError::NotAttached { sid: 0x11, ssid: None })
    );
    assert_eq!(
        smmu.detach_substream(SID, 3),
        Err(DomainError::NotAttached {
            sid: SID,
            ssid: Some(3)
        })
    );
    assert_eq!(smmu.low_level().ste(SID), Ok(ste), "the STE is as it was");
    assert_eq!(since(&model, before), [], "no command was issued");
    // A nested domain on an SMMU that cannot nest.
    let guest = GuestStage1 {
        cd_table: 0x4000_0020,
        ..GUEST
    };
    assert!(
        matches!(smmu.create_nested(b, guest), Err(DomainError::Entry(_))),
        "misaligned CD table IPA"
    );
}

#[test]
fn capacity_is_a_clear_error_and_a_failed_creation_leaks_no_id() {
    let frames = frames();
    let model = Model::start(frames);
    let smmu: Iommu<&'static HeapFrames, 3> = model
        .smmu()
        .init_with_capacity(frames, &InitOptions::default())
        .unwrap();
    let baseline = frames.live_blocks();
    for round in 0..5 {
        let ids: Vec<DomainId> = (0..3)
            .map(|_| smmu.create_stage1(memory(frames), Stage1Options::default()).unwrap())
            .collect();
        assert_eq!(
            smmu.create_stage1(memory(frames), Stage1Options::default()),
            Err(DomainError::NoDomainSlot { capacity: 3 })
        );
        // The refused creation gave its ASID back: three in use, never more.
        assert_eq!(smmu.asids_in_use(), 3, "round {round}");
        for id in ids {
            smmu.free_domain(id).unwrap();
        }
        assert_eq!(frames.live_blocks(), baseline, "round {round}: every table returned");
    }
}

/// The raw ID calls cannot take an ID from a live domain: freeing one is refused and changes nothing, so no
/// later allocation (raw or a new domain's) hands it out while the domain still tags TLB entries with it.
#[test]
fn freeing_a_live_domains_asid_or_vmid_is_refused_and_no_later_create_reuses_it() {
    let frames = frames();
    // IDR0.ASID16 (bit 12) and VMID16 (bit 18) clear: 8-bit IDs, quick to exhaust.
    let model = Model::start_with(frames, IDRS[0].1 & !(1 << 12 | 1 << 18));
    let mut smmu = smmu(&model, frames);
    let d = s1(&mut smmu, frames);
    let e = s2(&mut smmu, frames);
    let (asid, vmid) = (asid_of(&smmu, d), vmid_of(&smmu, e));
    let in_use = (smmu.asids_in_use(), smmu.vmids_in_use());
    assert_eq!(smmu.low_level().free_asid(asid), Err(IdError::Owned { id: asid }));
    assert_eq!(smmu.low_level().free_vmid(vmid), Err(IdError::Owned { id: vmid }));
    assert_eq!((smmu.asids_in_use(), smmu.vmids_in_use()), in_use, "nothing freed");

    // Every other ID taken raw: the domains' IDs are not among them.
    let raw_asids: Vec<u16> = core::iter::from_fn(|| smmu.low_level().allocate_asid().ok()).collect();
    let raw_vmids: Vec<u16> = core::iter::from_fn(|| smmu.low_level().allocate_vmid().ok()).collect();
    assert_eq!((raw_asids.len(), raw_vmids.len()), (254, 254));
    assert!(!raw_asids.contains(&asid) && !raw_vmids.contains(&vmid));
    // Refused again with every other ID taken: a new domain finds none rather than the live domain's.
    assert_eq!(smmu.low_level().free_asid(asid), Err(IdError::Owned { id: asid }));
    assert_eq!(smmu.low_level().free_vmid(vmid), Err(IdError::Owned { id: vmid }));
    let exhausted = Err(DomainError::Id(IdError::Exhausted { bits: 8 }));
    assert_eq!(smmu.create_stage1(memory(frames), Stage1Options::default()), exhausted);
    assert_eq!(
        smmu.create_stage2(memory(frames), Stage2Options { input_bits: 40 }),
        exhausted
    );

    // A raw ID is the caller's own: freed, and the next domain gets it.
    smmu.low_level().free_asid(raw_asids[7]).unwrap();
    smmu.low_level().free_vmid(raw_vmids[7]).unwrap();
    let d2 = s1(&mut smmu, frames);
    let e2 = s2(&mut smmu, frames);
    assert_eq!((asid_of(&smmu, d2), vmid_of(&smmu, e2)), (raw_asids[7], raw_vmids[7]));
    // A freed domain's ID goes back with it (and is then the caller's to allocate, not to free).
    smmu.free_domain(d).unwrap();
    smmu.free_domain(e).unwrap();
    assert_eq!(
        smmu.low_level().free_asid(asid),
        Err(IdError::WrongState {
            id: asid,
            allocated: false
        })
    );
    assert_eq!(
        (smmu.low_level().allocate_asid(), smmu.low_level().allocate_vmid()),
        (Ok(asid), Ok(vmid))
    );
}

/// A stream attached to a domain has its STE written by the domain alone: the raw STE calls refuse it (and
/// change nothing), so a bypass cannot replace a domain's translation behind its back.
#[test]
fn raw_ste_calls_refuse_a_stream_a_domain_owns() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let d = s1(&mut smmu, frames);
    smmu.attach(d, SID).unwrap();
    let ste = smmu.low_level().ste(SID).unwrap();
    let before = consumed(&model);
    let in_use = Some(AttachError::StreamInUse { sid: SID, domain: d });
    // SAFETY: the device behind the stream is trusted with all memory (a test of bypass).
    assert_eq!(unsafe { smmu.low_level().attach_bypass(SID) }.err(), in_use);
    assert_eq!(smmu.low_level().attach_abort(SID).err(), in_use);
    assert_eq!(
        smmu.low_level().abort_streams_except(|sid| sid == SID),
        Ok(0),
        "kept by the caller"
    );
    assert_eq!(smmu.low_level().abort_streams_except(|_| false).err(), in_use);
    assert_eq!(smmu.low_level().ste(SID), Ok(ste), "the domain's STE is as it was");
    assert_eq!(since(&model, before), [], "no command was issued");
    assert_eq!(smmu.attachments(d).as_deref(), Ok(&[(SID, 0)][..]));

    // Detached, the stream is the caller's again.
    smmu.detach(SID).unwrap();
    // SAFETY: the device behind the stream is trusted with all memory (a test of bypass).
    unsafe { smmu.low_level().attach_bypass(SID) }.unwrap();
    assert_eq!(smmu.low_level().ste(SID).unwrap().config(), Config::Bypass);
    // SAFETY: the device behind the stream is trusted with all memory (a test of bypass).
    unsafe { smmu.low_level().attach_bypass(SID + 1) }.unwrap();
    assert_eq!(smmu.low_level().abort_streams_except(|_| false), Ok(2));
    assert_eq!(smmu.low_level().ste(SID).unwrap().config(), Config::Abort);
}

#[test]
fn substreams_get_their_own_cds_and_their_faults() {
    let frames = frames();
    // SSIDSIZE 5 (IDR1[10:6]).
    let model = Model::start_with_idrs(frames, IDRS[0].1, IDRS[1].1 | 5 << 6);
    let mut smmu = smmu(&model, frames);
    let whole = s1(&mut smmu, frames);
    let sub = s1(&mut smmu, frames);
    smmu.attach(whole, SID).unwrap();
    let before = consumed(&model);
    smmu.attach_substream(sub, SID, 3).unwrap();
    // Invalid -> valid: qwords 1..7, CFGI_CD + CMD_SYNC, then qword 0 (V), CFGI_CD + CMD_SYNC.
    assert_eq!(
        since(&model, before),
        [opcode::CFGI_CD, opcode::SYNC, opcode::CFGI_CD, opcode::SYNC]
    );
    assert_eq!(smmu.attachments(sub).as_deref(), Ok(&[(SID, 3)][..]));
    let book = smmu.domains.book.lock();
    let record = &book.streams[0];
    let table = record.cd_table.as_ref().unwrap();
    assert_eq!(table.format().ssid_bits(), STREAM_SSID_BITS);
    let asid_of = |d| match smmu.domains.get(d).unwrap().translation {
        Translation::Stage1 { asid, .. } => asid,
        _ => unreachable!(),
    };
    assert_eq!(table.read(3).unwrap().asid(), asid_of(sub));
    assert_eq!(table.read(0).unwrap().asid(), asid_of(whole));
    assert_eq!(
        smmu.low_level().ste(SID).unwrap().0[0] >> 59 & 0x1f,
        u64::from(STREAM_SSID_BITS),
        "S1CDMax"
    );
    drop(book);
    // Substream 0 is the stream's own; beyond the table is refused; a used one too.
    assert!(matches!(
        smmu.attach_substream(sub, SID, 0),
        Err(DomainError::BadSubstream { .. })
    ));
    assert!(matches!(
        smmu.attach_substream(sub, SID, 8),
        Err(DomainError::BadSubstream { .. })
    ));
    assert_eq!(
        smmu.attach_substream(whole, SID, 3),
        Err(DomainError::StreamInUse { sid: SID, domain: sub })
    );

    // Faults route by (stream, substream).
    inject(
        &model,
        &smmu,
        frames,
        &[fault(SID, Some(3), 0x1000, true), fault(SID, None, 0x2000, false)],
    );
    smmu.drain_faults(|_| {}).unwrap();
    let f = smmu.domain_faults(sub).unwrap();
    assert_eq!(f.faults.len(), 1);
    assert_eq!(
        (f.faults[0].substream, f.faults[0].address, f.faults[0].write),
        (Some(3), Some(0x1000), Some(true))
    );
    assert_eq!(smmu.domain_faults(whole).unwrap().faults[0].address, Some(0x2000));

    // Detaching the substream clears its CD; the domain's last detach drops its TLB entries.
    let before = consumed(&model);
    smmu.detach_substream(SID, 3).unwrap();
    // Valid -> invalid: V first, then the rest (two CFGI_CD rounds), then the TLBI.
    assert_eq!(
        since(&model, before),
        [
            opcode::CFGI_CD,
            opcode::SYNC,
            opcode::CFGI_CD,
            opcode::SYNC,
            opcode::TLBI_NH_ASID,
            opcode::SYNC
        ]
    );
    assert!(
        !smmu.domains.book.lock().streams[0]
            .cd_table
            .as_ref()
            .unwrap()
            .read(3)
            .unwrap()
            .is_valid()
    );
    // Detaching the stream clears what substreams are left first.
    smmu.attach_substream(sub, SID, 5).unwrap();
    smmu.detach(SID).unwrap();
    assert_eq!(smmu.attachments(sub).as_deref(), Ok(&[][..]));
    assert!(smmu.domains.book.lock().streams.is_empty());
}

/// A hand-assembled F_TRANSLATION record (IHI 0070 7.3.11): number 0x10, SSV [11], SubstreamID [31:12],
/// StreamID [63:32]; RnW [99]; InputAddr [191:128].
fn fault(sid: u32, ssid: Option<u32>, address: u64, write: bool) -> [u64; 4] {
    let ssv = ssid.map_or(0, |s| 1 << 11 | u64::from(s) << 12);
    let rnw = if write { 0 } else { 1 << 35 };
    [0x10 | ssv | u64::from(sid) << 32, rnw, address, 0]
}

/// Plays the SMMU writing `records` into the event queue and advancing EVENTQ_PROD.
fn inject(model: &Model, smmu: &Iommu<&'static HeapFrames>, frames: &HeapFrames, records: &[[u64; 4]]) {
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
    assert!(fa.faults.iter().all(|f| f.stream == 0x10 && f.kind == "F_TRANSLATION"));
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
    smmu.map(d, 0x40_0000, 0x8000_0000, 0x4000, RW).unwrap();
    let live = frames.live_blocks();
    model.refuse.store(opcode::TLBI_NH_VA, Ordering::SeqCst);
    assert!(matches!(
        smmu.unmap(d, 0x40_0000, 0x4000),
        Err(DomainError::Invalidation(_))
    ));
    assert_eq!(frames.live_blocks(), live, "the emptied tables are not freed");
    model.refuse.store(0, Ordering::SeqCst);
    // The next operation flushes them first.
    let before = consumed(&model);
    smmu.map(d, 0x80_0000, 0x8000_0000, 0x1000, RW).unwrap();
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
    smmu.map(d, 0, 0x8000_0000, 0x1000, RW).unwrap();
    smmu.map(d, 0x40_0000, 0x8000_0000, 0x1000, RW).unwrap();
    smmu.map(d, 0x80_0000, 0x9000_0000, 0x1000, RW).unwrap();
    let live = frames.live_blocks();
    let mut deferred = Gather::default();
    smmu.unmap_deferred(d, 0x80_0000, 0x20_0000, &mut deferred).unwrap();
    model.refuse.store(opcode::TLBI_NH_VA, Ordering::SeqCst);
    // This unmap's invalidation fails and is kept; so does the deferred one's.
    assert!(matches!(
        smmu.unmap(d, 0x40_0000, 0x20_0000),
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
    smmu.map(d, 0xc0_0000, 0x8000_0000, 0x1000, RW).unwrap();
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
        Err(DomainError::Unsupported(_))
    ));
    let el2 = Stage1Options {
        input_bits: 39,
        el2: true,
    };
    assert!(
        matches!(
            smmu.create_stage1(memory(frames), el2),
            Err(DomainError::Unsupported(_))
        ),
        "no IDR0.HYP"
    );
    let d = s1(&mut smmu, frames);
    let error = smmu.create_nested(d, GUEST).unwrap_err();
    assert!(matches!(error, DomainError::Unsupported(_)), "{error}");
    assert_eq!((smmu.asids_in_use(), smmu.vmids_in_use()), (1, 0));
    smmu.free_domain(d).unwrap();
    assert_eq!(frames.live_blocks(), live);
}

/// A handover pool over leaked host memory, for domains to preserve.
fn handover_pool() -> &'static crate::handover::pool::HandoverPool {
    use crate::handover::pool::{ARENAS, HandoverPool, METADATA_BYTES};
    let bytes = METADATA_BYTES as usize + ARENAS * 256 * 1024;
    let memory: &'static mut [u64] = std::boxed::Box::leak(std::vec![0u64; bytes / 8].into_boxed_slice());
    let pool: &'static HandoverPool = std::boxed::Box::leak(std::boxed::Box::new(HandoverPool::new()));
    let region = crate::mem::Extent {
        base: 0x80_0000_0000,
        len: bytes as u64,
    };
    // SAFETY: leaked, zeroed, used by nothing else.
    unsafe { pool.set_up(region, core::ptr::NonNull::new(memory.as_mut_ptr().cast()).unwrap()) }.unwrap();
    pool
}

#[test]
fn tokens_collide_in_the_index_and_preservation_never_outlives_its_domain() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let pool = handover_pool();
    let arena: DomainMemory = pool.take_arena().unwrap();
    let a = smmu
        .create_stage1(
            arena,
            Stage1Options {
                input_bits: 39,
                el2: false,
            },
        )
        .unwrap();
    let parent = smmu
        .create_stage2(pool.take_arena().unwrap(), Stage2Options { input_bits: 40 })
        .unwrap();
    let ordinary = s1(&mut smmu, frames);
    // Ordinary memory would not survive.
    assert_eq!(
        smmu.preserve(ordinary, 9),
        Err(DomainError::NotHandoverMemory(ordinary))
    );
    smmu.preserve(a, 0xa).unwrap();
    assert_eq!(smmu.preserved(0xa), Some(a));
    assert_eq!(smmu.token_of(a), Ok(Some(0xa)));
    // Collision: nothing changes.
    assert_eq!(
        smmu.preserve(parent, 0xa),
        Err(DomainError::TokenInUse { token: 0xa, domain: a })
    );
    assert_eq!(smmu.token_of(parent), Ok(None));
    assert_eq!(
        smmu.preserve(a, 0xb),
        Err(DomainError::AlreadyPreserved { domain: a, token: 0xa })
    );
    // A nested domain needs its parent preserved first.
    let nested = smmu.create_nested(parent, GUEST).unwrap();
    assert_eq!(
        smmu.preserve(nested, 0xc),
        Err(DomainError::ParentNotPreserved { domain: nested, parent })
    );
    smmu.preserve(parent, 0x5).unwrap();
    smmu.preserve(nested, 0xc).unwrap();
    assert_eq!(
        smmu.unpreserve(0x5),
        Err(DomainError::NestedStillPreserved { token: 0x5 })
    );
    // A preserved domain stays usable.
    smmu.map(a, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
    smmu.attach(a, SID).unwrap();
    smmu.unmap(a, 0x1000, 0x1000).unwrap();
    smmu.detach(SID).unwrap();
    // Freeing a preserved domain is refused; after unpreserve the token is gone and free works.
    assert_eq!(
        smmu.free_domain(a),
        Err(DomainError::Preserved { domain: a, token: 0xa })
    );
    assert_eq!(smmu.unpreserve(0xa), Ok(a));
    assert_eq!(smmu.preserved(0xa), None);
    assert_eq!(smmu.unpreserve(0xa), Err(DomainError::UnknownToken(0xa)));
    smmu.free_domain(a).unwrap();
    // The token is free for another domain.
    let b = smmu
        .create_stage1(pool.take_arena().unwrap(), Stage1Options::default())
        .unwrap();
    smmu.preserve(b, 0xa).unwrap();
    assert_eq!(smmu.preserved(0xa), Some(b));
    assert_eq!(smmu.unpreserve(0xc), Ok(nested));
    assert_eq!(smmu.unpreserve(0x5), Ok(parent));
}

#[test]
fn deferred_unmaps_invalidate_only_at_sync_and_trim_frees_emptied_tables() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let d = s1(&mut smmu, frames);
    smmu.map(d, 0x20_0000, 0x8000_0000, 0x1000, RW).unwrap();
    smmu.map(d, 0x40_0000, 0x8000_1000, 0x1000, RW).unwrap();
    let tables = smmu.domain_table(d).unwrap().tables();
    let before = consumed(&model);
    let mut gather = Gather::default();
    assert_eq!(smmu.unmap_deferred(d, 0x20_0000, 0x1000, &mut gather), Ok(0x1000));
    assert_eq!(since(&model, before), [], "nothing issued before the sync");
    smmu.sync_domain(d, &mut gather).unwrap();
    assert_eq!(since(&model, before), [opcode::TLBI_NH_VA, opcode::SYNC]);
    // The single-page unmap left its last-level table linked (empty) until a trim.
    assert_eq!(smmu.domain_table(d).unwrap().tables(), tables);
    let before = consumed(&model);
    assert_eq!(smmu.trim_domain(d), Ok(1));
    assert_eq!(smmu.domain_table(d).unwrap().tables(), tables - 1);
    let ops = since(&model, before);
    assert_eq!(ops.last(), Some(&opcode::SYNC));
    assert!(
        ops.contains(&opcode::TLBI_NH_VA) || ops.contains(&opcode::TLBI_NH_ASID),
        "{ops:?}"
    );
    assert_eq!(
        smmu.iova_to_phys(d, 0x40_0000),
        Ok(Some(0x8000_1000)),
        "the other mapping stays"
    );
    assert_eq!(smmu.trim_domain(d), Ok(0), "nothing left to trim");
}

#[test]
fn a_failed_detach_keeps_the_stream_so_its_domain_cannot_be_freed_under_it() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let d = s1(&mut smmu, frames);
    smmu.attach(d, SID).unwrap();
    model.refuse.store(opcode::CFGI_STE, Ordering::SeqCst);
    assert!(matches!(smmu.detach(SID), Err(DomainError::Attach(_))));
    assert_eq!(smmu.attachments(d).as_deref(), Ok(&[(SID, 0)][..]), "still recorded");
    assert!(matches!(smmu.free_domain(d), Err(DomainError::StillAttached { .. })));
    model.refuse.store(0, Ordering::SeqCst);
    smmu.detach(SID).unwrap();
    smmu.free_domain(d).unwrap();
    // A failed attach records the stream, so detach can clean up and free waits for it.
    let d = s1(&mut smmu, frames);
    model.refuse.store(opcode::CFGI_STE, Ordering::SeqCst);
    assert!(matches!(smmu.attach(d, SID), Err(DomainError::Attach(_))));
    assert!(matches!(smmu.free_domain(d), Err(DomainError::StillAttached { .. })));
    model.refuse.store(0, Ordering::SeqCst);
    smmu.detach(SID).unwrap();
    smmu.free_domain(d).unwrap();
}

#[test]
fn a_handover_arena_serves_one_domain() {
    let frames = frames();
    let model = Model::start(frames);
    let smmu = smmu(&model, frames);
    let pool = handover_pool();
    let arena = pool.take_arena().unwrap();
    let d = smmu.create_stage1(arena, Stage1Options::default()).unwrap();
    let used = arena.extent().unwrap().len;
    assert_eq!(
        smmu.create_stage2(arena, Stage2Options { input_bits: 40 }),
        Err(DomainError::MemoryOwned)
    );
    assert_eq!(smmu.vmids_in_use(), 0, "the refused creation gave its VMID back");
    assert_eq!(
        arena.extent().unwrap().len,
        used,
        "the refused creation allocated nothing from the arena"
    );
    // A creation that fails after the claim gives the claim back: the arena still serves a domain.
    let other = pool.take_arena().unwrap();
    assert!(matches!(
        smmu.create_stage1(
            other,
            Stage1Options {
                input_bits: 70,
                el2: false
            }
        ),
        Err(DomainError::Map(_))
    ));
    let e = smmu.create_stage1(other, Stage1Options::default()).unwrap();
    smmu.free_domain(e).unwrap();
    smmu.free_domain(d).unwrap();
    assert_eq!(pool.arenas_in_use(), 0, "freeing the owner retires the arena");
}

/// The SMMU's own memory is its alone: an arena holding its stream table and queues serves no domain (whose
/// free would retire the arena, handing it out again under the SMMU), an arena a domain owns cannot hold an
/// SMMU's structures, and a shutdown gives the arena up.
#[test]
fn an_arena_holding_the_smmus_own_structures_serves_no_domain() {
    let frames = frames();
    let pool = handover_pool();
    let region = pool.region().unwrap();
    let model = Model::start(frames);
    *model.window.lock().unwrap() = Some((region.base, pool.metadata_address().unwrap() as usize, region.len));
    let owned = pool.take_arena().unwrap();
    let first = smmu(&model, frames);
    let d = first.create_stage1(owned, Stage1Options::default()).unwrap();
    drop(first);
    assert_eq!(
        model.smmu().init(owned, &crate::InitOptions::default()).err(),
        Some(crate::InitError::MemoryOwned),
        "{d}'s arena"
    );
    let core = pool.take_arena().unwrap();
    let on_arena = model.smmu().init(core, &crate::InitOptions::default()).unwrap();
    assert_eq!(
        on_arena.create_stage1(core, Stage1Options::default()),
        Err(DomainError::MemoryOwned)
    );
    assert_eq!(
        on_arena.domains.book.lock().free_slots(),
        DEFAULT_DOMAINS,
        "nothing created"
    );
    on_arena.shutdown(false).unwrap();
    let smmu = smmu(&model, frames);
    let d = smmu.create_stage1(core, Stage1Options::default()).unwrap();
    smmu.free_domain(d).unwrap();
    assert_eq!(
        pool.arenas_in_use(),
        1,
        "only the first domain's arena, which it never freed"
    );
}

// Field-level checks: the SMMU model of QEMU 10.0 never hits in its IOTLB, so only these tests catch an
// invalidation of the wrong stream, ASID, VMID or address (or none at all).

fn asid_of(smmu: &Iommu<&'static HeapFrames>, d: DomainId) -> u16 {
    match smmu.domains.get(d).unwrap().translation {
        Translation::Stage1 { asid, .. } => asid,
        _ => unreachable!(),
    }
}

fn vmid_of(smmu: &Iommu<&'static HeapFrames>, d: DomainId) -> u16 {
    match smmu.domains.get(d).unwrap().translation {
        Translation::Stage2 { vmid, .. } => vmid,
        _ => unreachable!(),
    }
}

#[test]
fn every_stage1_invalidation_names_the_stream_the_asid_and_the_address() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    smmu.low_level().attach_abort(SID).unwrap();
    // Another domain first, so that a wrong ASID would show.
    let other = s1(&mut smmu, frames);
    let d = s1(&mut smmu, frames);
    let asid = asid_of(&smmu, d);
    assert_ne!(asid, asid_of(&smmu, other));
    smmu.map(d, 0x40_0000, 0x8000_0000, 0x4000, RW).unwrap();
    smmu.map(d, 0x20_0000, 0x9000_0000, 0x1000, RW).unwrap();

    let before = consumed(&model);
    smmu.attach(d, SID).unwrap();
    assert_ste_steps(&issued_since(&model, before), SID);

    let before = consumed(&model);
    smmu.unmap(d, 0x40_1000, 0x1000).unwrap();
    assert_eq!(
        issued_since(&model, before),
        [
            Issued::NhVa {
                vmid: 0,
                asid,
                address: 0x40_1000
            },
            Issued::Sync
        ]
    );
    let before = consumed(&model);
    smmu.protect(d, 0x40_2000, 0x1000, Prot::READ | Prot::CACHEABLE)
        .unwrap();
    assert_eq!(
        issued_since(&model, before),
        [
            Issued::NhVa {
                vmid: 0,
                asid,
                address: 0x40_2000
            },
            Issued::Sync
        ]
    );
    // Map fills invalid entries only: nothing to invalidate.
    let before = consumed(&model);
    smmu.map(d, 0x40_1000, 0xa000_0000, 0x1000, RW).unwrap();
    assert_eq!(issued_since(&model, before), []);

    // Deferred: nothing until the sync, then the address under the ASID.
    let before = consumed(&model);
    let mut gather = Gather::default();
    smmu.unmap_deferred(d, 0x40_3000, 0x1000, &mut gather).unwrap();
    assert_eq!(issued_since(&model, before), []);
    smmu.sync_domain(d, &mut gather).unwrap();
    assert_eq!(
        issued_since(&model, before),
        [
            Issued::NhVa {
                vmid: 0,
                asid,
                address: 0x40_3000
            },
            Issued::Sync
        ]
    );

    // Trim: the emptied last-level table at 0x20_0000 unlinked, its 2 MiB invalidated (non-leaf) under the ASID.
    smmu.unmap(d, 0x20_0000, 0x1000).unwrap();
    let before = consumed(&model);
    assert_eq!(smmu.trim_domain(d), Ok(1));
    let issued = issued_since(&model, before);
    assert_eq!(issued.last(), Some(&Issued::Sync), "{issued:?}");
    assert!(
        issued[..issued.len() - 1].iter().all(|i| match *i {
            Issued::NhVa {
                vmid: 0,
                asid: a,
                address,
            } => a == asid && (0x20_0000..0x40_0000).contains(&address),
            Issued::NhAsid { vmid: 0, asid: a } => a == asid,
            _ => false,
        }),
        "{issued:?}"
    );
    assert!(issued.len() > 1, "{issued:?}");

    // Detach: the STE, the stream's cached CDs, then (last attachment) the ASID.
    let before = consumed(&model);
    smmu.detach(SID).unwrap();
    let issued = issued_since(&model, before);
    let (ste, rest) = issued.split_at(issued.len() - 4);
    assert_ste_steps(ste, SID);
    assert_eq!(
        rest,
        [
            Issued::CdAll { sid: SID },
            Issued::Sync,
            Issued::NhAsid { vmid: 0, asid },
            Issued::Sync
        ]
    );

    // Free: the ASID's entries dropped (and waited for) before the ASID is free again.
    let (before, in_use) = (consumed(&model), smmu.asids_in_use());
    smmu.free_domain(d).unwrap();
    assert_eq!(
        issued_since(&model, before),
        [Issued::NhAsid { vmid: 0, asid }, Issued::Sync]
    );
    assert_eq!(smmu.asids_in_use(), in_use - 1, "the invalidated ASID is the one freed");
}

#[test]
fn every_stage2_and_nested_invalidation_names_the_vmid_and_the_address() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let other = s2(&mut smmu, frames);
    let parent = s2(&mut smmu, frames);
    let vmid = vmid_of(&smmu, parent);
    assert_ne!(vmid, vmid_of(&smmu, other));
    smmu.map(parent, 0x4000_0000, 0x8000_0000, 0x20_0000, RW).unwrap();
    smmu.map(parent, 0x1000, 0x9000_0000, 0x1000, RW).unwrap();

    // Without nested domains: S2 by IPA, one CMD_SYNC.
    let before = consumed(&model);
    smmu.protect(parent, 0x1000, 0x1000, Prot::READ | Prot::CACHEABLE)
        .unwrap();
    assert_eq!(
        issued_since(&model, before),
        [Issued::S2Ipa { vmid, address: 0x1000 }, Issued::Sync]
    );

    let nested = smmu.create_nested(parent, GUEST).unwrap();
    let before = consumed(&model);
    smmu.attach(nested, SID).unwrap();
    assert_ste_steps(&issued_since(&model, before), SID);

    // Under a nested domain: S2 by IPA, CMD_SYNC, the VMID's combined entries, CMD_SYNC.
    let before = consumed(&model);
    smmu.unmap(parent, 0x1000, 0x1000).unwrap();
    assert_eq!(
        issued_since(&model, before),
        [
            Issued::S2Ipa { vmid, address: 0x1000 },
            Issued::Sync,
            Issued::NhAll { vmid },
            Issued::Sync
        ]
    );
    let before = consumed(&model);
    smmu.protect(parent, 0x4000_0000, 0x20_0000, Prot::READ | Prot::CACHEABLE)
        .unwrap();
    let issued = issued_since(&model, before);
    assert_eq!(
        issued,
        [
            Issued::S2Ipa {
                vmid,
                address: 0x4000_0000
            },
            Issued::Sync,
            Issued::NhAll { vmid },
            Issued::Sync
        ]
    );
    let before = consumed(&model);
    smmu.map(parent, 0x1000, 0x9000_0000, 0x1000, RW).unwrap();
    assert_eq!(issued_since(&model, before), []);

    // The guest's invalidations go under the parent's VMID; its CD invalidation names the attached stream.
    let before = consumed(&model);
    smmu.invalidate_guest(
        nested,
        GuestInvalidation::Address {
            asid: 7,
            address: 0x7000,
            leaf: true,
        },
    )
    .unwrap();
    smmu.invalidate_guest(nested, GuestInvalidation::Asid(7)).unwrap();
    smmu.invalidate_guest(nested, GuestInvalidation::All).unwrap();
    smmu.invalidate_guest(nested, GuestInvalidation::Cd { ssid: 0, leaf: true })
        .unwrap();
    assert_eq!(
        issued_since(&model, before),
        [
            Issued::NhVa {
                vmid,
                asid: 7,
                address: 0x7000
            },
            Issued::Sync,
            Issued::NhAsid { vmid, asid: 7 },
            Issued::Sync,
            Issued::NhAll { vmid },
            Issued::Sync,
            Issued::Cd { sid: SID, ssid: 0 },
            Issued::Sync
        ]
    );

    // Detach: the STE, then (last attachment) the nested domain's combined entries.
    let before = consumed(&model);
    smmu.detach(SID).unwrap();
    let issued = issued_since(&model, before);
    let (ste, rest) = issued.split_at(issued.len() - 2);
    assert_ste_steps(ste, SID);
    assert_eq!(rest, [Issued::NhAll { vmid }, Issued::Sync]);

    let before = consumed(&model);
    smmu.free_domain(nested).unwrap();
    assert_eq!(issued_since(&model, before), [Issued::NhAll { vmid }, Issued::Sync]);
    let (before, in_use) = (consumed(&model), smmu.vmids_in_use());
    smmu.free_domain(parent).unwrap();
    assert_eq!(issued_since(&model, before), [Issued::S12Vmall { vmid }, Issued::Sync]);
    assert_eq!(smmu.vmids_in_use(), in_use - 1, "the invalidated VMID is the one freed");
}

/// A guest may use a two-level CD table: invalidating one of its CDs after changing a level-1 descriptor needs
/// CFGI_CD with Leaf = 0, and a guest that rewrote its table wholesale asks for CFGI_CD_ALL. Both go to every
/// stream attached to the nested domain; a SubstreamID beyond the guest's table is refused, nothing issued.
#[test]
fn guest_cd_invalidations_carry_the_leaf_flag_and_cover_the_whole_table() {
    let frames = frames();
    // IDR1.SSIDSIZE (bits [10:6]) = 8: substreams, so a 256-entry two-level guest CD table is accepted.
    let model = Model::start_with_idrs(frames, IDRS[0].1, IDRS[1].1 | 8 << 6);
    let mut smmu = smmu(&model, frames);
    let parent = s2(&mut smmu, frames);
    let guest = GuestStage1 {
        cd_max_log2: 8,
        layout: CdTableLayout::TwoLevel4K,
        ..GUEST
    };
    let nested = smmu.create_nested(parent, guest).unwrap();
    smmu.attach(nested, SID).unwrap();
    smmu.attach(nested, SID + 1).unwrap();
    let raw_since = |from: usize| model.seen.lock().unwrap().commands[from..].to_vec();

    for leaf in [false, true] {
        let before = consumed(&model);
        smmu.invalidate_guest(nested, GuestInvalidation::Cd { ssid: 0x45, leaf })
            .unwrap();
        assert_eq!(
            issued_since(&model, before),
            [
                Issued::Cd { sid: SID, ssid: 0x45 },
                Issued::Cd {
                    sid: SID + 1,
                    ssid: 0x45
                },
                Issued::Sync
            ]
        );
        // CMD_CFGI_CD.Leaf is bit 0 of the second word.
        let words = raw_since(before);
        assert!(words[..2].iter().all(|w| w[1] & 1 == u64::from(leaf)), "{words:x?}");
    }

    let before = consumed(&model);
    smmu.invalidate_guest(nested, GuestInvalidation::CdAll).unwrap();
    assert_eq!(
        issued_since(&model, before),
        [Issued::CdAll { sid: SID }, Issued::CdAll { sid: SID + 1 }, Issued::Sync]
    );

    let before = consumed(&model);
    assert_eq!(
        smmu.invalidate_guest(
            nested,
            GuestInvalidation::Cd {
                ssid: 0x100,
                leaf: true
            }
        ),
        Err(DomainError::BadSubstream {
            ssid: 0x100,
            ssid_bits: 8
        })
    );
    assert_eq!(issued_since(&model, before), []);
}

#[test]
fn substream_invalidations_name_the_stream_and_the_substream() {
    let frames = frames();
    let model = Model::start_with_idrs(frames, IDRS[0].1, IDRS[1].1 | 5 << 6);
    let mut smmu = smmu(&model, frames);
    let whole = s1(&mut smmu, frames);
    let sub = s1(&mut smmu, frames);
    let (whole_asid, sub_asid) = (asid_of(&smmu, whole), asid_of(&smmu, sub));
    smmu.attach(whole, SID).unwrap();
    let cd = [
        Issued::Cd { sid: SID, ssid: 3 },
        Issued::Sync,
        Issued::Cd { sid: SID, ssid: 3 },
        Issued::Sync,
    ];

    let before = consumed(&model);
    smmu.attach_substream(sub, SID, 3).unwrap();
    assert_eq!(issued_since(&model, before), cd);
    let before = consumed(&model);
    smmu.detach_substream(SID, 3).unwrap();
    let issued = issued_since(&model, before);
    assert_eq!(issued[..4], cd);
    assert_eq!(
        issued[4..],
        [
            Issued::NhAsid {
                vmid: 0,
                asid: sub_asid
            },
            Issued::Sync
        ]
    );

    // Detaching the whole stream detaches its substreams first, then the STE, its CDs and the stream's ASID.
    smmu.attach_substream(sub, SID, 3).unwrap();
    let before = consumed(&model);
    smmu.detach(SID).unwrap();
    let issued = issued_since(&model, before);
    assert_eq!(issued[..4], cd);
    assert_eq!(
        issued[4..6],
        [
            Issued::NhAsid {
                vmid: 0,
                asid: sub_asid
            },
            Issued::Sync
        ]
    );
    let (ste, rest) = issued[6..].split_at(issued.len() - 10);
    assert_ste_steps(ste, SID);
    assert_eq!(
        rest,
        [
            Issued::CdAll { sid: SID },
            Issued::Sync,
            Issued::NhAsid {
                vmid: 0,
                asid: whole_asid
            },
            Issued::Sync
        ]
    );
}

/// IDR0.HYP (bit 9): EL2 contexts; IDR1.SSIDSIZE 5: substreams.
fn el2_model(frames: &'static HeapFrames) -> Model {
    Model::start_with_idrs(frames, IDRS[0].1 | 1 << 9, IDRS[1].1 | 5 << 6)
}

fn el2(smmu: &mut Iommu<&'static HeapFrames>, frames: &'static HeapFrames) -> DomainId {
    smmu.create_stage1(
        memory(frames),
        Stage1Options {
            input_bits: 39,
            el2: true,
        },
    )
    .unwrap()
}

/// The EL2 regime (STE.STRW = EL2, no E2H) has no ASIDs (IHI 0070 §3.17): its entries are invalidated only by
/// the EL2 commands, on every path, and never by TLBI_NH_*, which misses them.
#[test]
fn an_el2_stage1_domain_is_invalidated_with_el2_commands() {
    let frames = frames();
    let model = el2_model(frames);
    let mut smmu = smmu(&model, frames);
    let d = el2(&mut smmu, frames);
    smmu.map(d, 0x40_0000, 0x8000_0000, 0x8000, RW).unwrap();
    smmu.map(d, 0x20_0000, 0x9000_0000, 0x1000, RW).unwrap();
    let before = consumed(&model);
    smmu.attach(d, SID).unwrap();
    assert_ste_steps(&issued_since(&model, before), SID);
    assert_eq!(smmu.low_level().ste(SID).unwrap().0[1] >> 30 & 0b11, 0b10, "STRW = EL2");
    let el2_va = |address| [Issued::El2Va { address }, Issued::Sync];

    let before = consumed(&model);
    smmu.unmap(d, 0x40_1000, 0x1000).unwrap();
    assert_eq!(issued_since(&model, before), el2_va(0x40_1000));
    // A range: one TLBI_EL2_VA with a range (IDR3.RIL).
    let before = consumed(&model);
    smmu.unmap(d, 0x40_4000, 0x4000).unwrap();
    assert_eq!(issued_since(&model, before), el2_va(0x40_4000));
    let before = consumed(&model);
    smmu.protect(d, 0x40_2000, 0x1000, Prot::READ | Prot::CACHEABLE)
        .unwrap();
    assert_eq!(issued_since(&model, before), el2_va(0x40_2000));
    let before = consumed(&model);
    let mut gather = Gather::default();
    smmu.unmap_deferred(d, 0x40_3000, 0x1000, &mut gather).unwrap();
    assert_eq!(issued_since(&model, before), []);
    smmu.sync_domain(d, &mut gather).unwrap();
    assert_eq!(issued_since(&model, before), el2_va(0x40_3000));
    // Trim: the emptied table at 0x20_0000 unlinked, invalidated (non-leaf) in the EL2 regime.
    smmu.unmap(d, 0x20_0000, 0x1000).unwrap();
    let before = consumed(&model);
    assert_eq!(smmu.trim_domain(d), Ok(1));
    let issued = issued_since(&model, before);
    assert_eq!(issued.last(), Some(&Issued::Sync), "{issued:?}");
    assert!(issued.len() > 1, "{issued:?}");
    assert!(
        issued[..issued.len() - 1].iter().all(|i| match *i {
            Issued::El2Va { address } => (0x20_0000..0x40_0000).contains(&address),
            Issued::El2All => true,
            _ => false,
        }),
        "{issued:?}"
    );

    // A substream of the same domain: its CD, and its detach leaves the stream attached (no TLBI).
    let before = consumed(&model);
    smmu.attach_substream(d, SID, 2).unwrap();
    smmu.detach_substream(SID, 2).unwrap();
    assert!(
        issued_since(&model, before)
            .iter()
            .all(|i| matches!(i, Issued::Cd { sid: SID, ssid: 2 } | Issued::Sync)),
        "{:?}",
        issued_since(&model, before)
    );

    let before = consumed(&model);
    smmu.detach(SID).unwrap();
    let issued = issued_since(&model, before);
    let (ste, rest) = issued.split_at(issued.len() - 4);
    assert_ste_steps(ste, SID);
    assert_eq!(
        rest,
        [Issued::CdAll { sid: SID }, Issued::Sync, Issued::El2All, Issued::Sync]
    );
    let before = consumed(&model);
    smmu.free_domain(d).unwrap();
    assert_eq!(issued_since(&model, before), [Issued::El2All, Issued::Sync]);
}

/// EL2 entries carry no ASID, so two EL2 domains in use at once would hit each other's entries: while one has
/// an attachment (stream or substream), attaching another is refused and changes nothing; once it is
/// detached, the next one may be attached (its entries were dropped by that last detach).
#[test]
fn one_el2_stage1_domain_is_in_use_at_a_time() {
    let frames = frames();
    let model = el2_model(frames);
    let mut smmu = smmu(&model, frames);
    let a = el2(&mut smmu, frames);
    let b = el2(&mut smmu, frames);
    let el1 = s1(&mut smmu, frames);
    smmu.attach(a, SID).unwrap();
    smmu.attach(a, SID + 1).unwrap();
    let (before, ste) = (consumed(&model), smmu.low_level().ste(SID + 2));
    let in_use = Err(DomainError::El2DomainInUse { domain: b, holder: a });
    assert_eq!(smmu.attach(b, SID + 2), in_use);
    assert_eq!(smmu.low_level().ste(SID + 2), ste, "nothing written");
    assert_eq!(smmu.attachments(b).as_deref(), Ok(&[][..]));
    assert_eq!(issued_since(&model, before), []);
    // NS-EL1 domains are tagged by ASID: they are not concerned.
    smmu.attach(el1, SID + 2).unwrap();

    // Still in use through one stream.
    smmu.detach(SID).unwrap();
    assert_eq!(smmu.attach(b, SID), in_use);
    // No longer in use: b may take over, its first attach needs nothing more than a's last detach issued.
    let before = consumed(&model);
    smmu.detach(SID + 1).unwrap();
    let issued = issued_since(&model, before);
    assert_eq!(issued[issued.len() - 2..], [Issued::El2All, Issued::Sync]);
    let before = consumed(&model);
    smmu.attach(b, SID).unwrap();
    assert_ste_steps(&issued_since(&model, before), SID);
    assert_eq!(
        smmu.attach(a, SID + 1),
        Err(DomainError::El2DomainInUse { domain: a, holder: b })
    );
    // a may exist (and be freed) meanwhile.
    smmu.free_domain(a).unwrap();
}

/// When the last detach's TLBI_EL2_ALL failed, the previous EL2 domain's entries may still be cached: the
/// next EL2 domain's attach drops them (TLBI_EL2_ALL + CMD_SYNC) before its STE is written.
#[test]
fn switching_el2_domains_after_a_failed_invalidation_drops_the_old_entries_first() {
    let frames = frames();
    let model = el2_model(frames);
    let mut smmu = smmu(&model, frames);
    let a = el2(&mut smmu, frames);
    let b = el2(&mut smmu, frames);
    smmu.attach(a, SID).unwrap();
    model.refuse.store(opcode::TLBI_EL2_ALL, Ordering::SeqCst);
    assert!(matches!(smmu.detach(SID), Err(DomainError::Invalidation(_))));
    model.refuse.store(0, Ordering::SeqCst);
    assert_eq!(
        smmu.attachments(a).as_deref(),
        Ok(&[][..]),
        "the stream itself is detached"
    );

    let before = consumed(&model);
    smmu.attach(b, SID + 1).unwrap();
    let issued = issued_since(&model, before);
    assert_eq!(issued[..2], [Issued::El2All, Issued::Sync], "{issued:?}");
    assert_ste_steps(&issued[2..], SID + 1);
    // Done once: b's next attach needs none.
    let before = consumed(&model);
    smmu.attach(b, SID + 2).unwrap();
    assert_ste_steps(&issued_since(&model, before), SID + 2);
}

/// A stream's STE fixes its regime (STRW) for all its substreams: an EL2 domain's CD under an NS-EL1 stream
/// would be walked as NS-EL1 and invalidated by the wrong commands, and the reverse. Both are refused, nothing
/// written.
#[test]
fn a_streams_substreams_all_use_its_regime() {
    let frames = frames();
    let model = el2_model(frames);
    let mut smmu = smmu(&model, frames);
    let el1 = s1(&mut smmu, frames);
    let other_el1 = s1(&mut smmu, frames);
    let el2 = el2(&mut smmu, frames);
    smmu.attach(el1, SID).unwrap();
    let before = consumed(&model);
    assert_eq!(
        smmu.attach_substream(el2, SID, 1),
        Err(DomainError::RegimeMismatch {
            sid: SID,
            ssid: 1,
            stream_el2: false
        })
    );
    assert_eq!(issued_since(&model, before), []);
    assert_eq!(smmu.attachments(el2).as_deref(), Ok(&[][..]));
    smmu.attach_substream(other_el1, SID, 1).unwrap();

    smmu.attach(el2, SID + 1).unwrap();
    let before = consumed(&model);
    assert_eq!(
        smmu.attach_substream(el1, SID + 1, 1),
        Err(DomainError::RegimeMismatch {
            sid: SID + 1,
            ssid: 1,
            stream_el2: true
        })
    );
    assert_eq!(issued_since(&model, before), []);
    assert_eq!(smmu.attachments(el1).as_deref(), Ok(&[(SID, 0)][..]));
    smmu.attach_substream(el2, SID + 1, 1).unwrap();
}

#[test]
fn a_guest_context_cd_names_its_tables_granule() {
    // CD TG0, bits [7:6]: 0b00 4 KiB, 0b01 64 KiB, 0b10 16 KiB (IHI 0070 CD.TG0, as TCR_EL1.TG0). T0SZ
    // [5:0] is 64 - the VA bits; IPS [34:32] 0b101 for a 48-bit output.
    let frames = frames();
    let model = Model::start(frames);
    let smmu = smmu(&model, frames);
    for (granule, tg0) in [
        (Granule::Size4K, 0b00),
        (Granule::Size16K, 0b10),
        (Granule::Size64K, 0b01),
    ] {
        let format = Format {
            stage: Stage::One,
            granule,
            input_bits: 42,
            output_bits: 48,
        };
        let table = IoPageTable::new(format, frames, true).unwrap();
        let guest = GuestContext::build(smmu.features(), &frames, &table, 3).unwrap();
        let q0 = guest.cd_table.read(0).unwrap().0[0];
        assert_eq!((q0 >> 6) & 0b11, tg0, "{granule:?}");
        assert_eq!(q0 & 0x3f, 22, "{granule:?}");
        assert_eq!((q0 >> 32) & 0b111, 0b101, "{granule:?}");
    }
}

/// The page table of a stage-1 or stage-2 domain, for tests that change its settings.
fn table_of<'a>(smmu: &'a mut Iommu<&'static HeapFrames>, d: DomainId) -> &'a mut IoPageTable<DomainMemory> {
    let slot = &mut smmu.domains.slots[usize::from(d.index())];
    match &mut slot.state.get_mut().as_mut().unwrap().translation {
        Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => table,
        Translation::Nested { .. } | Translation::Fixed(_) => unreachable!(),
    }
}

/// The Leaf bit (word 1, bit 0) of every TLBI consumed since `from`.
fn leaf_bits_since(model: &Model, from: usize) -> Vec<bool> {
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
    smmu.map(a, 0, 0x8000_0000, 0x1000, RW).unwrap();
    smmu.map(a, 0x20_0000, 0x8000_1000, 0x2000, RW).unwrap();
    smmu.map(b, 0x20_0000, 0x9000_0000, 0x2000, RW).unwrap();
    let mut g = Gather::default();
    assert_eq!(smmu.unmap_deferred(a, 0x20_0000, 0x2000, &mut g), Ok(0x2000));
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
        smmu.unmap_deferred(b, 0x20_0000, 0x1000, &mut g),
        Err(DomainError::ForeignGather { domain: b })
    );
    assert_eq!(smmu.iova_to_phys(b, 0x20_0000), Ok(Some(0x9000_0000)));
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
    smmu.map(d, 0, 0x8000_0000, 0x1000, RW).unwrap();
    smmu.map(d, 0x20_0000, 0x8000_1000, 0x1000, RW).unwrap();
    smmu.map(d, 0x40_0000, 0x8000_2000, 0x1000, RW).unwrap();
    let live = frames.live_blocks();
    let before = consumed(&model);
    let mut g = Gather::default();
    // The first emptied table stays linked (at the limit); the second goes over it: a trim of both.
    assert_eq!(smmu.unmap_deferred(d, 0x20_0000, 0x1000, &mut g), Ok(0x1000));
    assert_eq!(issued_since(&model, before), []);
    assert_eq!(smmu.unmap_deferred(d, 0x40_0000, 0x1000, &mut g), Ok(0x1000));
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
    smmu.map(d, 0, 0x8000_0000, 0x1000, RW).unwrap();
    smmu.map(d, 0x20_0000, 0x8000_1000, 0x2000, RW).unwrap();
    let mut g = Gather::default();
    // A range unmap: the last-level table is unlinked with its leaves in place, and the walk cache may still
    // name it (and the TLB the old translations) until the sync.
    assert_eq!(smmu.unmap_deferred(d, 0x20_0000, 0x2000, &mut g), Ok(0x2000));
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
        assert_eq!(smmu.map(d, iova, 0x9000_0000, 0x1000, RW), pending(iova));
    }
    assert_eq!(smmu.map(d, 0x1f_e000, 0x9000_0000, 0x4000, RW), pending(0x20_0000));
    assert_eq!(frames.live_blocks(), live, "nothing allocated");
    assert_eq!(smmu.iova_to_phys(d, 0x20_0000), Ok(None));
    assert_eq!(smmu.iova_to_phys(d, 0x1f_e000), Ok(None));
    // Elsewhere: allowed.
    smmu.map(d, 0x40_0000, 0x9000_0000, 0x1000, RW).unwrap();
    smmu.sync_domain(d, &mut g).unwrap();
    smmu.map(d, 0x20_0000, 0x9000_1000, 0x1000, RW).unwrap();
    assert_eq!(smmu.iova_to_phys(d, 0x20_0000), Ok(Some(0x9000_1000)));
}

#[test]
fn the_pending_span_clears_with_the_last_gather_or_a_whole_domain_invalidation() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let d = s1(&mut smmu, frames);
    let asid = asid_of(&smmu, d);
    for k in 0..4u64 {
        smmu.map(d, k << 21, 0x8000_0000 + (k << 12), 0x1000, RW).unwrap();
    }
    let refused = |smmu: &mut Iommu<&'static HeapFrames>, iova| {
        matches!(
            smmu.map(d, iova, 0x9000_0000, 0x1000, RW),
            Err(DomainError::PendingInvalidation { .. })
        )
    };
    // Two gathers outstanding: syncing one keeps the other's part of the span refused.
    let (mut g1, mut g2) = (Gather::default(), Gather::default());
    smmu.unmap_deferred(d, 0x20_0000, 0x1000, &mut g1).unwrap();
    smmu.unmap_deferred(d, 0x40_0000, 0x1000, &mut g2).unwrap();
    smmu.sync_domain(d, &mut g1).unwrap();
    assert!(refused(&mut smmu, 0x40_0000));
    smmu.sync_domain(d, &mut g2).unwrap();
    assert!(!refused(&mut smmu, 0x40_0000), "the last one synced: cleared");
    // A dropped gather keeps its span refused until the whole domain is invalidated.
    {
        let mut dropped = Gather::default();
        smmu.unmap_deferred(d, 0x60_0000, 0x1000, &mut dropped).unwrap();
    }
    assert!(refused(&mut smmu, 0x60_0000));
    let before = consumed(&model);
    smmu.invalidate_domain(d).unwrap();
    assert_eq!(
        issued_since(&model, before),
        [Issued::NhAsid { vmid: 0, asid }, Issued::Sync]
    );
    assert!(!refused(&mut smmu, 0x60_0000));
    // A gather counted before that invalidation no longer counts: syncing it does not clear the span of one
    // taken after.
    let (mut old, mut new) = (Gather::default(), Gather::default());
    smmu.unmap_deferred(d, 0x20_0000, 0x1000, &mut old).unwrap();
    smmu.invalidate_domain(d).unwrap();
    smmu.unmap_deferred(d, 0x40_0000, 0x1000, &mut new).unwrap();
    smmu.sync_domain(d, &mut old).unwrap();
    assert!(refused(&mut smmu, 0x40_0000));
    smmu.sync_domain(d, &mut new).unwrap();
    assert!(!refused(&mut smmu, 0x40_0000));
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
            smmu.map(d, iova, 0x9000_0000, 0x1000, RW),
            Err(DomainError::PendingInvalidation { .. })
        )
    };
    let (a, b) = (0x100_0000, 0x120_0000);
    let fresh = |smmu: &mut Iommu<&'static HeapFrames>| {
        for iova in [a, b] {
            smmu.map(d, iova, 0x8800_0000, 0x1000, RW).unwrap();
        }
    };
    fresh(&mut smmu);
    let (mut g1, mut g2) = (Gather::default(), Gather::default());
    smmu.unmap_deferred(d, a, 0x1000, &mut g1).unwrap();
    smmu.unmap_deferred(d, b, 0x1000, &mut g2).unwrap();
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
    assert!(!refused(&mut smmu, b), "both synced: cleared");
    smmu.unmap(d, b, 0x1000).unwrap();
    // An older epoch's gather merged into a newer one's counts as the newer alone, and the other way round.
    for older_into_newer in [true, false] {
        fresh(&mut smmu);
        let (mut old, mut new) = (Gather::default(), Gather::default());
        smmu.unmap_deferred(d, a, 0x1000, &mut old).unwrap();
        smmu.invalidate_domain(d).unwrap();
        smmu.unmap_deferred(d, b, 0x1000, &mut new).unwrap();
        assert!(refused(&mut smmu, b));
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
        assert!(!refused(&mut smmu, b), "{older_into_newer}");
        smmu.unmap(d, b, 0x1000).unwrap();
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
    assert_eq!(smmu.attachments(sub).as_deref(), Ok(&[(SID, 3)][..]));
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
    smmu.map(d, 0x40_0000, 0x8000_0000, 0x1000, RW).unwrap();
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
    smmu.map(d, 0x40_0000, 0x8000_0000, 0x1000, RW).unwrap();
    smmu.attach(d, SID).unwrap();
    let root = smmu.domain_table(d).unwrap().root().0;
    let mut batch = Batch::new();
    batch
        .push(&Command::Sync {
            completion: SyncCompletion::Msi {
                address: root,
                // A table descriptor naming PA 0x4000_0000.
                data: 0x4000_0003,
                shareability: Shareability::InnerShareable,
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
    smmu.map(sub, 0x40_0000, 0x8000_0000, 0x1000, RW).unwrap();
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
mod concurrent;
mod kinds;
mod review3;
mod stress;
