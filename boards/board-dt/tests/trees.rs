//! `iommus` read from trees compiled by dtc from the sources in `tests/data/dt/` (see its README): the i.MX95's
//! SMMU and NPU, and trees written for each shape and each malformation.

use fdt::Fdt;
use smmuv3_board_dt::{Master, MastersError, platform_masters};

fn data(name: &str) -> Vec<u8> {
    let path = format!("{}/../../tests/data/dt/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The masters of the SMMU at `smmu_path` in tree `name`, or the error.
fn masters(name: &str, smmu_path: &str) -> Result<Vec<Master>, MastersError> {
    let blob = data(name);
    let fdt = Fdt::new(&blob).expect("a valid tree");
    let smmu = fdt.find_node(smmu_path).expect("the SMMU node");
    let mut found = Vec::new();
    let n = platform_masters(&fdt, smmu, |m| found.push(m))?;
    assert_eq!(n, found.len(), "the count is what was handed over");
    Ok(found)
}

fn master(path: &str, stream_id: u32, mask: u32, enabled: bool) -> Master {
    Master {
        path: path.try_into().unwrap(),
        stream_id,
        mask,
        enabled,
    }
}

#[test]
fn the_imx95_npu_is_stream_0xd_of_its_smmu() {
    assert_eq!(
        masters("imx95-smmu.dtb", "/soc/bus@49000000/iommu@490d0000"),
        Ok(vec![master("/soc/npu@4ab00000", 0xd, 0, true)]),
        "the PCIe controller's StreamIDs come from its iommu-map, not iommus"
    );
}

#[test]
fn every_specifier_naming_the_smmu_is_found_with_its_path_and_status() {
    assert_eq!(
        masters("iommus-cases.dtb", "/iommu@9050000"),
        Ok(vec![
            master("/sata@c0000", 0x4c0, 0, true),
            master("/sata@c0000", 0x4c1, 0, true),
            master("/usb@d0000", 0x860, 0, false),
            master("/dma@e0000", 0x20, 0, true),
            master("/bus@100000/sub@0/display@40", 0x31, 0, true),
        ])
    );
    // The other IOMMU's own masters, read with its two cells (the SMMUv3 binding does not limit other IOMMUs).
    assert_eq!(masters("iommus-cases.dtb", "/iommu@a000000").map(|m| m.len()), Ok(3));
}

#[test]
fn two_cells_give_a_stream_id_and_a_mask() {
    let found = masters("iommus-mask.dtb", "/iommu@9050000").unwrap();
    assert_eq!(
        found,
        vec![
            master("/ethernet@5b040000", 0x12, 0x7f80, true),
            master("/mmc@5b010000", 0x11, 0x7, true),
        ]
    );
    assert_eq!(
        found[1].stream_ids(),
        (0x10, 0x17),
        "the low three bits ignored: eight StreamIDs"
    );
}

#[test]
fn malformed_iommus_are_errors_that_name_the_node() {
    assert_eq!(
        masters("iommus-bad.dtb", "/iommu@9050000"),
        Err(MastersError::Truncated {
            path: "/short@1000".try_into().unwrap()
        })
    );
    assert_eq!(
        masters("iommus-dangling.dtb", "/iommu@9050000"),
        Err(MastersError::UnknownPhandle {
            path: "/dma@2000".try_into().unwrap(),
            phandle: 0x77
        })
    );
    let nocells = masters("iommus-nocells.dtb", "/iommu@9050000");
    assert!(
        matches!(&nocells, Err(MastersError::NoIommuCells { path, .. }) if path == "/dma@3000"),
        "{nocells:?}"
    );
    assert_eq!(
        masters("iommus-nocells.dtb", "/iommu@9070000"),
        Err(MastersError::SmmuCells { cells: Some(3) })
    );
    assert_eq!(
        masters("iommus-nocells.dtb", "/iommu@9090000"),
        Err(MastersError::SmmuCells { cells: None })
    );
    // Every error says where.
    let e = masters("iommus-dangling.dtb", "/iommu@9050000").unwrap_err();
    assert_eq!(e.to_string(), "/dma@2000: iommus names phandle 0x77, which no node has");
}

/// QEMU's virt tree has no platform master behind its SMMU (PCI only, through iommu-map).
#[test]
fn qemu_virt_has_no_platform_master() {
    let blob = data("qemu-virt.dtb");
    let fdt = Fdt::new(&blob).unwrap();
    let smmu = fdt.find_compatible(&["arm,smmu-v3"]).expect("virt's SMMU");
    assert_eq!(platform_masters(&fdt, smmu, |_| panic!("none expected")), Ok(0));
}
