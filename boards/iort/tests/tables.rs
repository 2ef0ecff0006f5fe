//! The IORT reader on tables built here field by field from DEN 0049 (a QEMU-virt-like layout: an ITS group, an
//! SMMUv3, a root complex whose requester IDs go to the SMMU and the SMMU's own ID to the ITS, a named component),
//! then every way a table can be wrong, and every truncation and single-byte change of a good one.

use smmuv3::board::IommuMapEntry;
use smmuv3_iort::sample::{NAME, NAMED, RC, SMMU, fix_checksum, good, table_with};
use smmuv3_iort::{Iort, IortError, NamedMapping};

#[test]
fn a_good_table_gives_the_smmu_its_pci_map_and_its_platform_masters() {
    let bytes = good();
    assert_eq!(bytes.len() as u32, NAMED + 16 + 13 + NAME.len() as u32 + 40);
    let iort = Iort::parse(&bytes).unwrap();
    let smmus: Vec<_> = iort.smmus().collect();
    assert_eq!(smmus.len(), 1);
    let s = smmus[0];
    assert_eq!((s.node, s.identifier, s.model), (SMMU, 1, 0));
    let d = s.description;
    assert_eq!((d.base, d.size, d.dma_coherent), (0x905_0000, 0x2_0000, true));
    assert_eq!(
        (
            d.interrupts.eventq,
            d.interrupts.priq,
            d.interrupts.cmdq_sync,
            d.interrupts.gerror
        ),
        (Some(106), Some(107), Some(108), Some(109))
    );
    assert!(d.interrupts.edge_triggered);
    let map = iort.iommu_map(0, SMMU).unwrap().unwrap();
    assert_eq!(
        map.entries(),
        [IommuMapEntry {
            rid_base: 0,
            sid_base: 0,
            length: 0x1_0000
        }],
        "the ITS mapping is not a StreamID"
    );
    assert!(iort.iommu_map(1, SMMU).is_none(), "no root complex of segment 1");
    let named: Vec<_> = iort.named_components().collect();
    assert_eq!(
        named,
        [
            NamedMapping {
                name: b"\\_SB.DMA0",
                smmu: SMMU,
                stream_id: 0x40,
                count: 1
            },
            NamedMapping {
                name: b"\\_SB.DMA0",
                smmu: SMMU,
                stream_id: 0x48,
                count: 8
            },
        ]
    );
}

#[test]
fn every_malformation_is_refused_with_where_it_is() {
    let good = good();
    let patched = |at: usize, value: &[u8]| {
        let mut t = good.clone();
        t[at..at + value.len()].copy_from_slice(value);
        fix_checksum(&mut t);
        t
    };
    assert_eq!(Iort::parse(&good[..47]).unwrap_err(), IortError::TooShort);
    assert_eq!(
        Iort::parse(&patched(0, b"IORX")).unwrap_err(),
        IortError::Signature(*b"IORX")
    );
    let len = good.len();
    assert_eq!(
        Iort::parse(&good[..len - 1]).unwrap_err(),
        IortError::Length {
            length: len as u32,
            given: len - 1
        }
    );
    assert!(matches!(
        Iort::parse(&patched(4, &40u32.to_le_bytes())),
        Err(IortError::Length { length: 40, .. })
    ));
    let mut bad_sum = good.clone();
    bad_sum[100] ^= 1;
    assert!(matches!(Iort::parse(&bad_sum), Err(IortError::Checksum { .. })));
    // A fifth node that is not there: the array runs past the table.
    assert!(matches!(
        Iort::parse(&patched(36, &5u32.to_le_bytes())),
        Err(IortError::Node(_))
    ));
    // The SMMU node cut below its fixed fields (and the node after it moves: whichever is found first).
    assert_eq!(
        Iort::parse(&patched(SMMU as usize + 1, &40u16.to_le_bytes())).unwrap_err(),
        IortError::Node(SMMU)
    );
    // Its mapping array past its end.
    assert_eq!(
        Iort::parse(&patched(SMMU as usize + 12, &80u32.to_le_bytes())).unwrap_err(),
        IortError::Mappings(SMMU)
    );
    // A mapping whose output reference is inside a node, not its start.
    assert_eq!(
        Iort::parse(&table_with(&[(0, 0xffff, 0, SMMU + 4, 0)])).unwrap_err(),
        IortError::Reference(RC)
    );
    // Ranges that wrap: input and output.
    assert_eq!(
        Iort::parse(&table_with(&[(0xffff_ff00, 0x1000, 0, SMMU, 0)])).unwrap_err(),
        IortError::Overflow(RC)
    );
    assert_eq!(
        Iort::parse(&table_with(&[(0, 0xffff, 0xffff_0001, SMMU, 0)])).unwrap_err(),
        IortError::Overflow(RC)
    );
    // The named component's name without its NUL: its three NULs become 'x'.
    let name_end = NAMED as usize + 16 + 13 + NAME.len() - 3;
    assert_eq!(
        Iort::parse(&patched(name_end - 1, b"xxxx")).unwrap_err(),
        IortError::Name(NAMED)
    );
    assert_eq!(
        IortError::Overflow(RC).to_string(),
        format!("IORT: node at {RC:#x} has an ID mapping that wraps past 2^32")
    );
}

/// Whatever the bytes, reading never panics, and an accepted table yields only what lies inside it.
fn read_all(bytes: &[u8]) {
    if let Ok(iort) = Iort::parse(bytes) {
        for s in iort.smmus() {
            assert!((s.node as usize) < bytes.len());
            let _ = iort.iommu_map(0, s.node);
        }
        for n in iort.named_components() {
            assert!((n.smmu as usize) < bytes.len());
            assert!(n.count >= 1);
        }
    }
}

#[test]
fn every_truncation_and_every_byte_change_is_read_without_panicking() {
    let good = good();
    for len in 0..good.len() {
        read_all(&good[..len]);
        // The header's length made to match the cut, so the check goes past the length test.
        let mut cut = good[..len].to_vec();
        if len >= 8 {
            cut[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        }
        if len >= 10 {
            fix_checksum(&mut cut);
        }
        read_all(&cut);
    }
    let mut accepted = 0;
    for at in 0..good.len() {
        for value in 0..=255u8 {
            let mut t = good.clone();
            t[at] = value;
            fix_checksum(&mut t);
            read_all(&t);
            accepted += usize::from(Iort::parse(&t).is_ok());
        }
    }
    assert!(
        accepted > 0,
        "some changes (reserved fields, names, identifiers) are still good tables"
    );
}

/// QEMU virt's own IORT (`tests/data/qemu-virt-iort.bin`, saved by the firmware from a run with buses 0 to 4):
/// revision 3, an ITS group, the SMMUv3 at 0x905_0000 with GSIVs 106 (event), 107 (PRI), 109 (GERROR), 108 (sync),
/// coherent; the root complex's requester IDs 0x0-0x4ff through the SMMU with StreamID = requester ID, the rest
/// straight to the ITS (so no StreamID); no named component.
#[test]
fn qemu_virts_own_iort_is_read_as_qemu_built_it() {
    let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/qemu-virt-iort.bin")).unwrap();
    let iort = Iort::parse(&bytes).unwrap();
    let smmus: Vec<_> = iort.smmus().collect();
    assert_eq!(smmus.len(), 1);
    let d = smmus[0].description;
    assert_eq!((d.base, d.dma_coherent), (0x905_0000, true));
    assert_eq!(
        (
            d.interrupts.eventq,
            d.interrupts.priq,
            d.interrupts.cmdq_sync,
            d.interrupts.gerror,
            d.interrupts.edge_triggered
        ),
        (Some(106), Some(107), Some(108), Some(109), true)
    );
    let map = iort.iommu_map(0, smmus[0].node).unwrap().unwrap();
    assert_eq!(
        map.entries(),
        [IommuMapEntry {
            rid_base: 0,
            sid_base: 0,
            length: 0x500
        }]
    );
    assert_eq!(map.stream_id(0x400), Some(0x400), "04:00.0, the edu behind the switch");
    assert_eq!(map.stream_id(0x500), None, "bus 5 goes to the ITS without the SMMU");
    assert!(iort.iommu_map(1, smmus[0].node).is_none(), "one PCI segment");
    assert_eq!(iort.named_components().count(), 0);
}
