//! Domains against the SMMU model (`crate::smmu::tests::model`): every operation's commands (the model records the
//! whole commands it consumes, so the tests check the stream, ASID, VMID and address of each invalidation), the
//! entries it writes, every misuse error, stale handles and fault routing.
extern crate std;

use super::*;
use crate::Iova;
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

impl<A: FrameAllocator, const D: usize> Iommu<A, D> {
    /// Every attachment of `domain`, in order (`Iommu::attachments` into a buffer as large as they need).
    pub(crate) fn attached(&self, domain: DomainId) -> Result<Vec<(u32, u32)>, DomainError> {
        let mut out = std::vec![(0, 0); 8];
        loop {
            let n = self.attachments(domain, &mut out)?;
            if n <= out.len() {
                out.truncate(n);
                return Ok(out);
            }
            out.resize(n, (0, 0));
        }
    }
}

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
    smmu.map(d, Iova(0x40_0000), PhysAddr(0x8000_0000), 0x4000, RW).unwrap();
    assert_eq!(smmu.iova_to_phys(d, Iova(0x40_1234)), Ok(Some(PhysAddr(0x8000_1234))));

    let before = consumed(&model);
    smmu.attach(d, SID).unwrap();
    let ste = smmu.low_level().ste(SID).unwrap();
    assert_eq!(ste.config(), Config::Stage1);
    assert!(
        since(&model, before)
            .iter()
            .all(|&op| op == opcode::CFGI_STE || op == opcode::SYNC)
    );
    assert_eq!(smmu.attached(d).as_deref(), Ok(&[(SID, 0)][..]));

    // Unmap: one range TLBI by ASID (RIL) and one CMD_SYNC, nothing else.
    let before = consumed(&model);
    assert_eq!(smmu.unmap(d, Iova(0x40_1000), 0x1000), Ok(0x1000));
    assert_eq!(since(&model, before), [opcode::TLBI_NH_VA, opcode::SYNC]);
    assert_eq!(smmu.iova_to_phys(d, Iova(0x40_1000)), Ok(None));
    // Protect likewise.
    let before = consumed(&model);
    assert_eq!(
        smmu.protect(d, Iova(0x40_0000), 0x1000, Prot::READ | Prot::CACHEABLE),
        Ok(0x1000)
    );
    assert_eq!(since(&model, before), [opcode::TLBI_NH_VA, opcode::SYNC]);
    // Map needs none.
    let before = consumed(&model);
    smmu.map(d, Iova(0x40_1000), PhysAddr(0x9000_0000), 0x1000, RW).unwrap();
    assert_eq!(since(&model, before), [0u8; 0]);

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
    assert_eq!(smmu.map(d, Iova(0), PhysAddr(0), 0x1000, RW), stale);
    assert_eq!(smmu.unmap(d, Iova(0), 0x1000), stale.map(|()| 0));
    assert_eq!(smmu.protect(d, Iova(0), 0x1000, RW), stale.map(|()| 0));
    assert_eq!(smmu.iova_to_phys(d, Iova(0)), stale.map(|()| None));
    assert_eq!(smmu.attach(d, SID), stale);
    assert_eq!(smmu.attach_substream(d, SID, 1), stale);
    assert_eq!(smmu.free_domain(d), stale);
    assert!(smmu.domain_faults(d).is_err());
    assert_eq!(smmu.create_nested(d, GUEST).err(), Some(DomainError::StaleDomain(d)));
    // The live domain in that slot is untouched.
    smmu.map(reused, Iova(0), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    assert_eq!(smmu.iova_to_phys(reused, Iova(0)), Ok(Some(PhysAddr(0x8000_0000))));
}

const GUEST: GuestStage1 = GuestStage1 {
    cd_table: 0x4000_0000,
    cd_max_log2: 0,
    layout: CdTableLayout::Linear,
    default_substream: DefaultSubstream::Terminate,
};

/// A nested domain holding more streams than a command batch does (every function of a device given to one
/// guest): a guest's CD invalidation reaches each of them once, in order, in batches that each end with their
/// CMD_SYNC; `attachments` copies as many as fit and says how many there are.
#[test]
fn a_guest_cd_invalidation_reaches_every_stream_of_a_domain_with_hundreds() {
    use crate::queue::cmdq::BATCH_CAPACITY;
    use crate::smmu::tests::Issued;
    const STREAMS: u32 = 300;
    let frames = frames();
    let model = Model::start(frames);
    let options = InitOptions {
        attached_streams: STREAMS as usize,
        ..InitOptions::default()
    };
    let mut smmu: Iommu<&'static HeapFrames> = model.smmu().init(frames, &options).unwrap();
    let parent = s2(&mut smmu, frames);
    let nested = smmu.create_nested(parent, GUEST).unwrap();
    let sids: Vec<u32> = (0..STREAMS).map(|i| 0x100 + i).collect();
    for &sid in &sids {
        smmu.attach(nested, sid).unwrap();
    }
    // One more than the SMMU was given room for: refused, nothing changed.
    assert_eq!(
        smmu.attach(nested, 0x100 + STREAMS),
        Err(DomainError::TooMany(Capacity::AttachedStreams))
    );
    let pairs: Vec<(u32, u32)> = sids.iter().map(|&sid| (sid, 0)).collect();
    assert_eq!(smmu.attached(nested).unwrap(), pairs);
    let mut first = [(0, 0); 5];
    assert_eq!(smmu.attachments(nested, &mut first), Ok(STREAMS as usize));
    assert_eq!(first[..], pairs[..5]);

    let before = model.seen.lock().unwrap().commands.len();
    smmu.invalidate_guest(nested, GuestInvalidation::Cd { ssid: 0, leaf: true })
        .unwrap();
    let issued = issued_since(&model, before);
    let cds: Vec<u32> = issued
        .iter()
        .filter_map(|i| match *i {
            Issued::Cd { sid, ssid: 0 } => Some(sid),
            _ => None,
        })
        .collect();
    assert_eq!(cds, sids, "every stream once, in order");
    assert_eq!(issued.last(), Some(&Issued::Sync), "the last batch completed");
    for batch in issued.split(|i| *i == Issued::Sync) {
        assert!(batch.len() <= BATCH_CAPACITY, "a batch of {}", batch.len());
    }
    let before = model.seen.lock().unwrap().commands.len();
    smmu.invalidate_guest(nested, GuestInvalidation::CdAll).unwrap();
    let all: Vec<u32> = issued_since(&model, before)
        .iter()
        .filter_map(|i| match *i {
            Issued::CdAll { sid } => Some(sid),
            _ => None,
        })
        .collect();
    assert_eq!(all, sids);

    // Detached from the middle, the end and the start: the rest keep their order.
    for sid in [0x100 + STREAMS / 2, 0x100 + STREAMS - 1, 0x100] {
        smmu.detach(sid).unwrap();
    }
    let left: Vec<(u32, u32)> = pairs
        .iter()
        .copied()
        .filter(|&(sid, _)| ![0x100 + STREAMS / 2, 0x100 + STREAMS - 1, 0x100].contains(&sid))
        .collect();
    assert_eq!(smmu.attached(nested).unwrap(), left);
    for (sid, _) in left {
        smmu.detach(sid).unwrap();
    }
    smmu.free_domain(nested).unwrap();
    assert_eq!(
        smmu.domains.book.lock().free_nodes.len(),
        STREAMS as usize * 8,
        "every node back"
    );
}

#[test]
fn a_stage2_domain_and_its_nested_domains() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let parent = s2(&mut smmu, frames);
    smmu.map(parent, Iova(0x4000_0000), PhysAddr(0x8000_0000), 0x20_0000, RW)
        .unwrap();
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
    smmu.unmap(parent, Iova(0x4000_0000), 0x1000).unwrap();
    let ops = since(&model, before);
    assert_eq!(
        ops,
        [opcode::TLBI_S2_IPA, opcode::SYNC, opcode::TLBI_NH_ALL, opcode::SYNC],
        "split 2 MiB block? {ops:?}"
    );

    // The guest owns the stage 1: no map on the nested domain; guest invalidations go under the VMID.
    assert!(matches!(
        smmu.map(nested, Iova(0), PhysAddr(0), 0x1000, RW),
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
            wanted: Wanted::Stage2Parent,
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
    smmu.map(d, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    smmu.attach(d, SID).unwrap();
    assert_eq!(smmu.low_level().ste(SID).unwrap().config(), Config::Stage2);
    let before = consumed(&model);
    smmu.unmap(d, Iova(0x1000), 0x1000).unwrap();
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
        smmu.map(a, Iova(1 << 39), PhysAddr(0x8000_0000), 0x1000, RW),
        Err(DomainError::Map(MapError::InputOutOfRange { .. }))
    ));
    assert!(matches!(
        smmu.map(a, Iova(0x800), PhysAddr(0x8000_0000), 0x1000, RW),
        Err(DomainError::Map(_))
    ));
    // Overlap.
    smmu.map(a, Iova(0), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    assert!(matches!(
        smmu.map(a, Iova(0), PhysAddr(0x9000_0000), 0x1000, RW),
        Err(DomainError::Map(MapError::Overlap { .. }))
    ));
    assert_eq!(
        smmu.iova_to_phys(a, Iova(0)),
        Ok(Some(PhysAddr(0x8000_0000))),
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
    assert_eq!(since(&model, before), [0u8; 0], "no command was issued");
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
    assert_eq!(since(&model, before), [0u8; 0], "no command was issued");
    assert_eq!(smmu.attached(d).as_deref(), Ok(&[(SID, 0)][..]));

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
    assert_eq!(smmu.attached(sub).as_deref(), Ok(&[(SID, 3)][..]));
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
    assert_eq!(smmu.attached(sub).as_deref(), Ok(&[][..]));
    assert!(smmu.domains.book.lock().streams.is_empty());
}

mod concurrent;
mod el2;
mod faults;
mod gathers;
mod handover;
mod invalidations;
mod kinds;
mod review3;
mod stress;
mod structural;

#[allow(unused_imports)]
use {el2::*, faults::*, gathers::*, handover::*, invalidations::*};

/// The domain table lives out of line (its slots in a block of the SMMU's allocator): an SMMU with room for 4,096
/// domains is a small value (returned by value from `init`), holds 4,096 live domains, and gives the block back
/// when it goes.
#[test]
fn four_thousand_domains_fit_a_small_iommu() {
    let frames = frames();
    let model = Model::start(frames);
    // Only the free-slot stack (two bytes a domain) grows inline; the slots (a KiB each) are out of line.
    let (small, large) = (
        core::mem::size_of::<Iommu<&'static HeapFrames, 16>>(),
        core::mem::size_of::<Iommu<&'static HeapFrames, 4096>>(),
    );
    assert!(large - small <= 2 * 4096 + 64, "{small} -> {large} bytes");
    let before = frames.live_blocks();
    let smmu: Iommu<&'static HeapFrames, 4096> = model
        .smmu()
        .init_with_capacity(frames, &InitOptions::default())
        .unwrap();
    let ids: Vec<DomainId> = (0..4096).map(|_| smmu.create_blocked().unwrap()).collect();
    assert_eq!(smmu.create_blocked(), Err(DomainError::NoDomainSlot { capacity: 4096 }));
    for id in ids {
        smmu.free_domain(id).unwrap();
    }
    smmu.shutdown(false).unwrap();
    assert_eq!(frames.live_blocks(), before, "the slots' block went back with the rest");
}
