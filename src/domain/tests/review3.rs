//! Review 3 (adversarial): interleavings of safe calls the `iommu` branch gets wrong. Each test FAILS on the branch.

use super::*;

/// Finding 1. `LowLevel::free_asid` used to check "a live domain owns it" by scanning the slots, then free: a
/// domain being created holds its ASID before it is in a slot (`create_claimed` builds without any lock), so a raw
/// free on another CPU in that window succeeded, and the next create got the same ASID: two live domains, one
/// ASID. Now the allocator knows who took an ID: a raw free of a domain's ID is refused at every moment. (The
/// closure is `create_stage1`'s own build; the raw call is placed where another CPU can land.)
#[test]
fn a_raw_free_asid_never_frees_an_id_a_domain_is_building_with() {
    let frames = frames();
    // 8-bit ASIDs: every ASID but one is taken raw first, so the allocator's next-fit cannot hide a reuse.
    let model = Model::start_with(frames, IDRS[0].1 & !(1 << 12 | 1 << 18));
    let smmu = smmu(&model, frames);
    let raw: Vec<u16> = core::iter::from_fn(|| smmu.low_level().allocate_asid().ok()).collect();
    assert_eq!(raw.len(), 255);
    smmu.low_level().free_asid(raw[0]).unwrap();
    let mut raced = None;
    let a = smmu
        .create_claimed(memory(frames), |s| {
            let table = s.new_table(memory(frames), crate::pgtable::Stage::One, 39)?;
            let asid = s.core.allocate_asid().map_err(DomainError::Id)?;
            // Another CPU: the ASID is in no slot yet.
            raced = Some((asid, s.low_level().free_asid(asid)));
            let cd = s.stage1_cd(asid, &table).map_err(DomainError::Entry)?;
            Ok(Translation::Stage1 {
                table,
                asid,
                cd,
                el2: false,
            })
        })
        .unwrap();
    let (asid, raced) = raced.unwrap();
    assert_eq!(
        raced,
        Err(IdError::Owned { id: asid }),
        "the raw free refused the building domain's ASID"
    );
    let b = smmu.create_stage1(
        memory(frames),
        Stage1Options {
            input_bits: 39,
            el2: false,
        },
    );
    match b {
        Ok(b) => assert_ne!(asid_of(&smmu, a), asid_of(&smmu, b), "two live domains share one ASID"),
        Err(e) => assert_eq!(e, DomainError::Id(IdError::Exhausted { bits: 8 }), "no ASID is left"),
    }
    // The domain's ASID is still refused once it is in its slot, and goes back with the domain only.
    assert_eq!(smmu.low_level().free_asid(asid), Err(IdError::Owned { id: asid }));
    smmu.free_domain(a).unwrap();
    assert_eq!(
        smmu.low_level().free_asid(asid),
        Err(IdError::WrongState {
            id: asid,
            allocated: false
        })
    );
}
