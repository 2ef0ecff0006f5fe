//! Every invalidation a domain issues names the right stream, substream, ASID, VMID and address.

use super::*;
use crate::Iova;

pub(super) fn asid_of(smmu: &Iommu<&'static HeapFrames>, d: DomainId) -> u16 {
    match smmu.domains.get(d).unwrap().translation {
        Translation::Stage1 { asid, .. } => asid,
        _ => unreachable!(),
    }
}

pub(super) fn vmid_of(smmu: &Iommu<&'static HeapFrames>, d: DomainId) -> u16 {
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
    smmu.map(d, Iova(0x40_0000), PhysAddr(0x8000_0000), 0x4000, RW).unwrap();
    smmu.map(d, Iova(0x20_0000), PhysAddr(0x9000_0000), 0x1000, RW).unwrap();

    let before = consumed(&model);
    smmu.attach(d, SID).unwrap();
    assert_ste_steps(&issued_since(&model, before), SID);

    let before = consumed(&model);
    smmu.unmap(d, Iova(0x40_1000), 0x1000).unwrap();
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
    smmu.protect(d, Iova(0x40_2000), 0x1000, Prot::READ | Prot::CACHEABLE)
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
    smmu.map(d, Iova(0x40_1000), PhysAddr(0xa000_0000), 0x1000, RW).unwrap();
    assert_eq!(issued_since(&model, before), []);

    // Deferred: nothing until the sync, then the address under the ASID.
    let before = consumed(&model);
    let mut gather = Gather::default();
    smmu.unmap_deferred(d, Iova(0x40_3000), 0x1000, &mut gather).unwrap();
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
    smmu.unmap(d, Iova(0x20_0000), 0x1000).unwrap();
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
    smmu.map(parent, Iova(0x4000_0000), PhysAddr(0x8000_0000), 0x20_0000, RW)
        .unwrap();
    smmu.map(parent, Iova(0x1000), PhysAddr(0x9000_0000), 0x1000, RW)
        .unwrap();

    // Without nested domains: S2 by IPA, one CMD_SYNC.
    let before = consumed(&model);
    smmu.protect(parent, Iova(0x1000), 0x1000, Prot::READ | Prot::CACHEABLE)
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
    smmu.unmap(parent, Iova(0x1000), 0x1000).unwrap();
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
    smmu.protect(parent, Iova(0x4000_0000), 0x20_0000, Prot::READ | Prot::CACHEABLE)
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
    smmu.map(parent, Iova(0x1000), PhysAddr(0x9000_0000), 0x1000, RW)
        .unwrap();
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
