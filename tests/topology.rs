//! Real PCIe topologies on QEMU virt: edu behind a `pcie-root-port` and behind a switch (`x3130-upstream` +
//! `xio3130-downstream` under a root port). The firmware numbers every bridge's buses depth-first and opens its
//! windows, so each edu gets the StreamID of its requester ID, `(bus << 8) | devfn`, and its DMA goes through the
//! SMMU: untranslated in `edu-ident`, through an STE in `bypass`, through page tables in `pgtable-dma`. The ACPI
//! IORT QEMU publishes agrees with the tree on every function's StreamID.

use smmuv3_harness::{Board, EduPlacement, Outcome, Run, Stage};

fn boot(edus: &[EduPlacement], scenarios: &[&str]) -> Outcome {
    let mut run = Run::new(Board::QemuVirt, Stage::Nested, scenarios);
    run.edus = edus.to_vec();
    run.boot()
}

/// Also saves QEMU's IORT as the firmware linked it (`dump-iort`), and reads it on the host: it must be the table
/// committed as `boards/iort/tests/data/qemu-virt-iort.bin` (the same topology) says, requester IDs 0x0-0x4ff through
/// the SMMU, read the same way.
#[test]
fn every_edu_is_found_behind_root_ports_and_switches() {
    use EduPlacement::{RootBus, RootPort, Switch};
    let dir = smmuv3_harness::workspace_root().join("target/acpi-dumps");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("qemu-virt-iort-{}.bin", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut run = Run::new(Board::QemuVirt, Stage::Nested, &["edu-ident"]);
    run.edus = vec![RootBus, RootPort, Switch];
    run.settings.push(("dump-iort".into(), path.display().to_string()));
    let outcome = run.boot();
    outcome.assert_passed(&["edu-ident"]);
    let saved = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}\n{}", path.display(), outcome.report()));
    outcome.assert_console_shows(&[&format!(
        "ACPI: IORT ({} bytes) saved to {}",
        saved.len(),
        path.display()
    )]);
    let committed =
        std::fs::read(smmuv3_harness::workspace_root().join("boards/iort/tests/data/qemu-virt-iort.bin")).unwrap();
    let read = |bytes: &[u8]| {
        let iort = smmuv3_iort::Iort::parse(bytes).unwrap();
        let smmu = iort.smmus().next().unwrap();
        let map = iort.iommu_map(0, smmu.node).unwrap().unwrap();
        (smmu.description, map.entries().to_vec())
    };
    assert_eq!(read(&saved), read(&committed));
    let _ = std::fs::remove_file(&path);
    outcome.assert_console_shows(&[
        // The root port at 00:08.0 gets bus 1; the switch's root port at 00:09.0 bus 2, its upstream port bus 3,
        // its downstream port bus 4.
        "bridge: buses 01..=01, memory 0x",
        "PCI 01:00.0 1234:11e8 class 00ff00 SID Some(256) BAR0 0x",
        "bridge: buses 02..=04, memory 0x",
        "PCI 02:00.0 104c:8232 class 060400 SID Some(512) bridge: buses 03..=04",
        "PCI 03:00.0 104c:8233 class 060400 SID Some(768) bridge: buses 04..=04",
        "PCI 04:00.0 1234:11e8 class 00ff00 SID Some(1024) BAR0 0x",
        "edu 00:02.0 v1.0: requester ID 0x10, StreamID 0x10",
        "edu 01:00.0 v1.0: requester ID 0x100, StreamID 0x100",
        "edu 04:00.0 v1.0: requester ID 0x400, StreamID 0x400",
        "edu: 3 device(s) identified, DMA verified through each",
        // The ACPI tables QEMU publishes through fw_cfg, linked by the firmware's table-loader after enumeration:
        // the IORT's SMMU and its requester-ID map agree with the device tree for every function on buses 0 to 4
        // (`boards/iort`).
        "ACPI: IORT (",
        "the same SMMU, and the same StreamID for every PCI function, as the device tree",
    ]);
}

/// The first edu in bus order drives the SMMU scenarios: here the one behind the root port (StreamID 0x100), with
/// no edu on the root bus at all.
#[test]
fn translation_works_for_an_edu_behind_a_root_port() {
    let scenarios = ["edu-ident", "bypass", "pgtable-dma"];
    let outcome = boot(&[EduPlacement::RootPort], &scenarios);
    let translation = |e: &str| e == "SMMU_EVT_F_TRANSLATION sid=0x100" || e == "SMMU_EVT_F_PERMISSION sid=0x100";
    outcome.assert_passed_provoking(&scenarios, translation, 0);
    outcome.assert_console_shows(&[
        "edu 01:00.0 v1.0: requester ID 0x100, StreamID 0x100",
        "bypass STE for 0x100",
    ]);
}

/// The same behind a switch: edu at 03:00.0 (root port bus 1, upstream port bus 2, downstream port bus 3).
#[test]
fn translation_works_for_an_edu_behind_a_switch() {
    let scenarios = ["edu-ident", "bypass", "pgtable-dma"];
    let outcome = boot(&[EduPlacement::Switch], &scenarios);
    let translation = |e: &str| e == "SMMU_EVT_F_TRANSLATION sid=0x300" || e == "SMMU_EVT_F_PERMISSION sid=0x300";
    outcome.assert_passed_provoking(&scenarios, translation, 0);
    outcome.assert_console_shows(&[
        "edu 03:00.0 v1.0: requester ID 0x300, StreamID 0x300",
        "bypass STE for 0x300",
    ]);
}

/// A hand-off with the SMMU running and edu behind a switch: the DMA in flight across it and one issued during
/// the restore must both land although the new image enumerates the bridges again.
#[test]
fn a_hand_off_keeps_dma_flowing_behind_a_switch() {
    let outcome = boot(&[EduPlacement::Switch], &["lu-noreset"]);
    outcome.assert_passed(&["lu-noreset"]);
    outcome.assert_console_shows(&["running in a separate image at", "both DMAs landed, 0 faulted"]);
}
