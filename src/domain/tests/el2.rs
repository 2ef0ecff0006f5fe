//! EL2 stage-1 domains: their own invalidation commands, one in use at a time, and a stream's substreams in one regime.

use super::*;
use crate::Iova;

/// IDR0.HYP (bit 9): EL2 contexts; IDR1.SSIDSIZE 5: substreams.
pub(super) fn el2_model(frames: &'static HeapFrames) -> Model {
    Model::start_with_idrs(frames, IDRS[0].1 | 1 << 9, IDRS[1].1 | 5 << 6)
}

pub(super) fn el2(smmu: &mut Iommu<&'static HeapFrames>, frames: &'static HeapFrames) -> DomainId {
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
    smmu.map(d, Iova(0x40_0000), PhysAddr(0x8000_0000), 0x8000, RW).unwrap();
    smmu.map(d, Iova(0x20_0000), PhysAddr(0x9000_0000), 0x1000, RW).unwrap();
    let before = consumed(&model);
    smmu.attach(d, SID).unwrap();
    assert_ste_steps(&issued_since(&model, before), SID);
    assert_eq!(smmu.low_level().ste(SID).unwrap().0[1] >> 30 & 0b11, 0b10, "STRW = EL2");
    let el2_va = |address| [Issued::El2Va { address }, Issued::Sync];

    let before = consumed(&model);
    smmu.unmap(d, Iova(0x40_1000), 0x1000).unwrap();
    assert_eq!(issued_since(&model, before), el2_va(0x40_1000));
    // A range: one TLBI_EL2_VA with a range (IDR3.RIL).
    let before = consumed(&model);
    smmu.unmap(d, Iova(0x40_4000), 0x4000).unwrap();
    assert_eq!(issued_since(&model, before), el2_va(0x40_4000));
    let before = consumed(&model);
    smmu.protect(d, Iova(0x40_2000), 0x1000, Prot::READ | Prot::CACHEABLE)
        .unwrap();
    assert_eq!(issued_since(&model, before), el2_va(0x40_2000));
    let before = consumed(&model);
    let mut gather = Gather::default();
    smmu.unmap_deferred(d, Iova(0x40_3000), 0x1000, &mut gather).unwrap();
    assert_eq!(issued_since(&model, before), []);
    smmu.sync_domain(d, &mut gather).unwrap();
    assert_eq!(issued_since(&model, before), el2_va(0x40_3000));
    // Trim: the emptied table at 0x20_0000 unlinked, invalidated (non-leaf) in the EL2 regime.
    smmu.unmap(d, Iova(0x20_0000), 0x1000).unwrap();
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
    assert_eq!(smmu.attached(b).as_deref(), Ok(&[][..]));
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
        smmu.attached(a).as_deref(),
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
    assert_eq!(smmu.attached(el2).as_deref(), Ok(&[][..]));
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
    assert_eq!(smmu.attached(el1).as_deref(), Ok(&[(SID, 0)][..]));
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
