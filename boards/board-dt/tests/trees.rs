//! The SMMU description and `iommus`, read from trees compiled by dtc from the sources in `tests/data/dt/` (see its
//! README): the i.MX95 19x19 EVK (a shipping SoC with an MMU-700), QEMU virt's own tree, and trees written for each
//! shape and each malformation.

use fdt::Fdt;
use smmuv3::board::IommuMapEntry;
use smmuv3::{SmmuDescription, SmmuInterrupts};
use smmuv3_board_dt::{DescribeError, Master, MastersError, iommu_map, platform_masters, registers, smmu_description};

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
        masters("imx95-19x19-evk.dtb", "/soc/bus@49000000/iommu@490d0000"),
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

/// The i.MX95 19x19 EVK, every value against its upstream tree: the SMMU's registers (inside the aips4 bus, whose
/// `ranges` maps them one to one), its four edge-triggered SPIs (eventq 325, gerror 328, priq 334, cmdq-sync 326:
/// INTIDs 32 higher), no `dma-coherent`; PCIe controller 0's map (requester ID 0 to StreamID 0x10, 0x100 and the
/// 7 after it to 0x11.., under mask 0x1ff); the NPU's StreamID 0xd; 2 GiB of RAM from 0x8000_0000; the console
/// lpuart1 at 0x4438_0000 (inside aips1).
#[test]
fn the_imx95_evk_is_described_as_its_upstream_tree_says() {
    let blob = data("imx95-19x19-evk.dtb");
    let fdt = Fdt::new(&blob).unwrap();
    let smmu = fdt.find_compatible(&["arm,smmu-v3"]).expect("the SMMU");
    assert_eq!(
        smmu_description(&fdt, smmu),
        Ok(SmmuDescription {
            base: 0x490d_0000,
            size: 0x10_0000,
            interrupts: SmmuInterrupts {
                eventq: Some(32 + 325),
                priq: Some(32 + 334),
                cmdq_sync: Some(32 + 326),
                gerror: Some(32 + 328),
                edge_triggered: true,
            },
            dma_coherent: false,
        })
    );
    let pcie0 = fdt.find_node("/soc/pcie@4c300000").unwrap();
    let (map, mask) = iommu_map(pcie0, smmu).unwrap();
    assert_eq!(
        map.entries(),
        [
            IommuMapEntry {
                rid_base: 0,
                sid_base: 0x10,
                length: 1
            },
            IommuMapEntry {
                rid_base: 0x100,
                sid_base: 0x11,
                length: 7
            },
        ]
    );
    assert_eq!(mask, Some(0x1ff));
    // 01:00.0 behind the root port: requester ID 0x100, StreamID 0x11; 01:00.6 is 0x17; bus 2 aliases bus 0.
    assert_eq!(map.stream_id(0x100 & 0x1ff), Some(0x11));
    assert_eq!(map.stream_id(0x106 & 0x1ff), Some(0x17));
    assert_eq!(map.stream_id(0x200 & 0x1ff), Some(0x10));
    let mut masters = Vec::new();
    platform_masters(&fdt, smmu, |m| masters.push((m.path.to_string(), m.stream_id))).unwrap();
    assert_eq!(masters, [("/soc/npu@4ab00000".to_string(), 0xd)]);
    let ram: Vec<_> = fdt
        .memory()
        .regions()
        .map(|r| (r.starting_address as u64, r.size))
        .collect();
    assert_eq!(ram, [(0x8000_0000, Some(0x8000_0000))]);
    let console = fdt.chosen().stdout().expect("stdout-path");
    assert!(console.compatible().unwrap().all().any(|c| c == "fsl,imx95-lpuart"));
    assert_eq!(registers(&fdt, console), Ok((0x4438_0000, 0x1000)));
}

/// QEMU virt's own tree (its SMMU at the root, `dma-coherent`, rising-edge SPIs 74..77) gives what the firmware has always
/// used there.
#[test]
fn qemu_virt_is_described_as_before() {
    let blob = data("qemu-virt.dtb");
    let fdt = Fdt::new(&blob).unwrap();
    let smmu = fdt.find_compatible(&["arm,smmu-v3"]).unwrap();
    let d = smmu_description(&fdt, smmu).unwrap();
    assert_eq!((d.base, d.size, d.dma_coherent), (0x905_0000, 0x2_0000, true));
    assert_eq!(
        (
            d.interrupts.eventq,
            d.interrupts.priq,
            d.interrupts.cmdq_sync,
            d.interrupts.gerror
        ),
        (Some(32 + 74), Some(32 + 75), Some(32 + 76), Some(32 + 77))
    );
    assert!(
        d.interrupts.edge_triggered,
        "QEMU virt declares its SMMU's SPIs rising-edge"
    );
    let host = fdt.find_compatible(&["pci-host-ecam-generic"]).unwrap();
    let (map, mask) = iommu_map(host, smmu).unwrap();
    assert_eq!(
        map.entries(),
        [IommuMapEntry {
            rid_base: 0,
            sid_base: 0,
            length: 0x1_0000
        }]
    );
    assert_eq!(mask, None);
}

/// Registers behind buses are translated through each `ranges`, nested ones included; a bus without `ranges`, or
/// whose window misses the registers, is refused.
#[test]
fn registers_behind_buses_are_translated_or_refused() {
    let blob = data("bus-ranges.dtb");
    let fdt = Fdt::new(&blob).unwrap();
    let node = |path| fdt.find_node(path).unwrap();
    let d = smmu_description(&fdt, node("/bus@20000000/iommu@50000")).unwrap();
    assert_eq!((d.base, d.size, d.dma_coherent), (0x2005_0000, 0x2_0000, true));
    assert_eq!(
        d.interrupts,
        SmmuInterrupts {
            eventq: Some(32 + 74),
            priq: Some(32 + 75),
            cmdq_sync: Some(32 + 76),
            gerror: Some(32 + 77),
            edge_triggered: false,
        }
    );
    let inner = smmu_description(&fdt, node("/bus@20000000/inner/iommu@100000")).unwrap();
    assert_eq!(
        inner.interrupts.gerror,
        Some(16 + 9),
        "a PPI's INTID is 16 above its number"
    );
    assert_eq!(
        registers(&fdt, node("/bus@20000000/inner/iommu@100000")),
        Ok((0x2008_0000, 0x2_0000)),
        "inner moves 0x100000 to its parent's 0x80000, which the outer bus puts at 0x2000_0000"
    );
    assert_eq!(
        smmu_description(&fdt, node("/opaque/iommu@0")),
        Err(DescribeError::NotMemoryMapped)
    );
    assert_eq!(
        smmu_description(&fdt, node("/narrow/iommu@40000")),
        Err(DescribeError::Untranslated(0x4_0000))
    );
}

/// `/chosen/smmuv3,settings`, the test firmware's settings on a board without fw_cfg or semihosting: each
/// `name=value` string in order, a string without `=` left out; no property, no settings; a malformed list refused
/// whole.
#[test]
fn chosen_settings_are_read_in_order_and_a_malformed_list_is_refused() {
    use smmuv3_board_dt::chosen::{SettingsError, settings};
    let blob = data("chosen-settings.dtb");
    let fdt = Fdt::new(&blob).unwrap();
    let found: Vec<_> = settings(&fdt).unwrap().expect("the property").collect();
    assert_eq!(found, [("scenarios", "probe,init,lu-tables"), ("exit", "psci-off")]);
    let blob = data("imx95-19x19-evk.dtb");
    assert!(settings(&Fdt::new(&blob).unwrap()).unwrap().is_none());
    let blob = data("chosen-settings-bad.dtb");
    assert_eq!(
        settings(&Fdt::new(&blob).unwrap()).map(|s| s.map(|s| s.count())),
        Err(SettingsError::NotUtf8 { index: 1 })
    );
    let blob = data("chosen-settings-unterminated.dtb");
    assert_eq!(
        settings(&Fdt::new(&blob).unwrap()).map(|s| s.map(|s| s.count())),
        Err(SettingsError::NotAStringList)
    );
}
