//! Blocked, bypass and identity domains: attached like any other, each with the STE its kind gives; their
//! mappings cannot change; the raw calls (behind `low_level`) cannot undercut them.

use super::*;
use crate::Iova;
use crate::mem::Extent;

#[test]
fn a_blocked_domain_aborts_its_streams_and_keeps_them_from_raw_calls() {
    let frames = frames();
    let model = Model::start(frames);
    let smmu = smmu(&model, frames);
    let blocked = smmu.create_blocked().unwrap();
    assert_eq!(smmu.domain_kind(blocked), Ok(DomainKind::Blocked));
    smmu.attach(blocked, SID).unwrap();
    assert_eq!(smmu.low_level().ste(SID).unwrap().config(), Config::Abort);
    assert_eq!(smmu.attached(blocked).as_deref(), Ok(&[(SID, 0)][..]));
    // Nothing to map in it, and no raw call may change its stream.
    assert!(matches!(
        smmu.map(blocked, Iova(0), PhysAddr(0x8000_0000), 0x1000, RW),
        Err(DomainError::WrongKind {
            kind: DomainKind::Blocked,
            ..
        })
    ));
    assert!(matches!(
        // SAFETY: refused before anything is written (the stream is a domain's).
        unsafe { smmu.low_level().attach_bypass(SID) },
        Err(AttachError::StreamInUse { sid: SID, .. })
    ));
    assert_eq!(smmu.low_level().ste(SID).unwrap().config(), Config::Abort);
    assert!(matches!(
        smmu.free_domain(blocked),
        Err(DomainError::StillAttached { .. })
    ));
    smmu.detach(SID).unwrap();
    let before = consumed(&model);
    smmu.free_domain(blocked).unwrap();
    assert_eq!(
        since(&model, before),
        Vec::<u8>::new(),
        "nothing of it is cached: nothing to invalidate"
    );
}

#[test]
fn a_bypass_domain_is_an_explicit_opt_in_attached_like_any_other() {
    let frames = frames();
    let model = Model::start(frames);
    let smmu = smmu(&model, frames);
    // SAFETY: the test's stream stands for a device trusted with all memory.
    let bypass = unsafe { smmu.create_bypass() }.unwrap();
    assert_eq!(smmu.domain_kind(bypass), Ok(DomainKind::Bypass));
    smmu.attach(bypass, SID).unwrap();
    assert_eq!(smmu.low_level().ste(SID).unwrap().config(), Config::Bypass);
    assert!(matches!(
        smmu.preserve(bypass, 1),
        Err(DomainError::NotHandoverMemory(_))
    ));
    smmu.detach(SID).unwrap();
    assert_eq!(smmu.low_level().ste(SID).unwrap().config(), Config::Abort);
    smmu.free_domain(bypass).unwrap();
}

#[test]
fn an_identity_domain_maps_its_ram_one_to_one_and_nothing_else() {
    for stage2 in [true, false] {
        let frames = frames();
        let model = Model::start(frames);
        let smmu = smmu(&model, frames);
        let ram = [
            Extent {
                base: 0x8000_0000,
                len: 0x20_0000,
            },
            Extent {
                base: 0x9000_0000,
                len: 0x1000,
            },
        ];
        let id = smmu.create_identity(memory(frames), stage2, &ram).unwrap();
        assert_eq!(smmu.domain_kind(id), Ok(DomainKind::Identity));
        assert_eq!(
            smmu.iova_to_phys(id, Iova(0x8000_1234)),
            Ok(Some(PhysAddr(0x8000_1234)))
        );
        assert_eq!(
            smmu.iova_to_phys(id, Iova(0x801f_f000)),
            Ok(Some(PhysAddr(0x801f_f000)))
        );
        assert_eq!(
            smmu.iova_to_phys(id, Iova(0x9000_0008)),
            Ok(Some(PhysAddr(0x9000_0008)))
        );
        // The rest is isolated.
        assert_eq!(smmu.iova_to_phys(id, Iova(0x8020_0000)), Ok(None));
        assert_eq!(smmu.iova_to_phys(id, Iova(0x4000_0000)), Ok(None));
        // Its mappings are fixed.
        for refused in [
            smmu.map(id, Iova(0x4000_0000), PhysAddr(0x4000_0000), 0x1000, RW)
                .map(|_| 0),
            smmu.unmap(id, Iova(0x8000_0000), 0x1000),
            smmu.unmap(id, Iova(0x8000_0000), 0x20_0000),
            smmu.protect(id, Iova(0x8000_0000), 0x1000, Prot::READ),
        ] {
            assert!(
                matches!(
                    refused,
                    Err(DomainError::WrongKind {
                        kind: DomainKind::Identity,
                        ..
                    })
                ),
                "{refused:?}"
            );
        }
        // Attached like any other: a real translating STE.
        smmu.attach(id, SID).unwrap();
        let expected = if stage2 { Config::Stage2 } else { Config::Stage1 };
        assert_eq!(smmu.low_level().ste(SID).unwrap().config(), expected);
        smmu.detach(SID).unwrap();
        smmu.free_domain(id).unwrap();
    }
}

#[test]
fn an_identity_domain_over_protected_memory_is_refused_and_leaves_nothing() {
    let frames = frames();
    let model = Model::start(frames);
    let smmu = smmu(&model, frames);
    smmu.protect_memory(Extent {
        base: 0x9000_0000,
        len: 0x1000,
    })
    .unwrap();
    let free = smmu.domains.book.lock().free_slots();
    let live = frames.live_blocks();
    let (asids, vmids) = (smmu.asids_in_use(), smmu.vmids_in_use());
    let refused = smmu.create_identity(
        memory(frames),
        true,
        &[Extent {
            base: 0x8fff_f000,
            len: 0x2000,
        }],
    );
    assert!(
        matches!(refused, Err(DomainError::ProtectedOutput { .. })),
        "{refused:?}"
    );
    assert_eq!(smmu.domains.book.lock().free_slots(), free);
    assert_eq!((smmu.asids_in_use(), smmu.vmids_in_use()), (asids, vmids));
    assert_eq!(frames.live_blocks(), live, "its tables went back");
}
