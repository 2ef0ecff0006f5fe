//! The SMMU described by ACPI alone on QEMU virt (`description` = `acpi`, what `cargo xtask qemu --description acpi`
//! sets): the firmware links QEMU's ACPI tables from fw_cfg's table-loader, takes the SMMU and PCI segment 0's
//! requester-ID map from the IORT (`boards/iort`) in place of the device tree's, and runs the demo, the domain
//! scenarios and a live update that way. QEMU builds its tables when they are first read; the firmware reads them
//! before PCI enumeration (it needs the SMMU first), so the IORT maps the root bus alone: every scenario here uses
//! edu on the root bus (`isolation`'s second edu, behind a root port, has no StreamID there). That the IORT and the
//! tree agree, read after enumeration with devices behind root ports and a switch, is `topology`'s test.

use smmuv3_harness::{Board, EduPlacement, Outcome, Run, Stage};

fn run_acpi(stage: Stage, scenarios: &[&str]) -> Outcome {
    let mut run = Run::new(Board::QemuVirt, stage, scenarios);
    run.edus = vec![EduPlacement::RootBus];
    run.settings.push(("description".into(), "acpi".into()));
    run.boot()
}

/// The faults the domain scenarios and `lu-s1` provoke on purpose, for edu's stream.
fn provoked(event: &str) -> bool {
    ["F_TRANSLATION", "F_PERMISSION"]
        .iter()
        .any(|kind| event == format!("SMMU_EVT_{kind} sid=0x10"))
}

/// What the boot prints when the IORT is the description (QEMU virt's SMMU: SPIs 74 to 77, coherent; the root
/// bus's 256 requester IDs to StreamIDs 0..).
const FROM_IORT: [&str; 3] = [
    "SMMU: from the ACPI IORT alone (description = acpi; ",
    "0x9050000, INTIDs [Some(106), Some(107), Some(108), Some(109)], coherent",
    "  IORT: RID 0x0..0x100 -> SID 0x0",
];

#[test]
fn the_demo_runs_from_the_iort_alone() {
    let outcome = run_acpi(Stage::Nested, &[]);
    // `abort-default` provokes C_BAD_STREAMID (edu's stream before its STE exists); `pgtable-dma` translation and
    // permission faults.
    outcome.assert_passed_provoking(
        &["probe", "edu-ident", "init", "abort-default", "bypass", "pgtable-dma"],
        |e| provoked(e) || e == "SMMU_EVT_C_BAD_STREAMID sid=0x10",
        0,
    );
    outcome.assert_console_shows(&FROM_IORT);
    assert!(
        !outcome.console.contains("ACPI: IORT ("),
        "the tree's description is not compared, it is not used\n{}",
        outcome.report()
    );
}

#[test]
fn the_domain_scenarios_run_from_the_iort_alone() {
    let scenarios = [
        "s1-dma",
        "s2-dma",
        "nested-dma",
        "unmapped-fault",
        "readonly-fault",
        "unmap-invalidate",
        "detach-aborts",
        "block-mappings",
    ];
    let outcome = run_acpi(Stage::Nested, &scenarios);
    outcome.assert_passed_provoking(&scenarios, provoked, 0);
    outcome.assert_console_shows(&FROM_IORT);
}

#[test]
fn lu_s1_runs_from_the_iort_alone() {
    let outcome = run_acpi(Stage::One, &["lu-s1"]);
    outcome.assert_passed_provoking(&["lu-s1"], provoked, 0);
    assert_eq!(
        outcome.console.matches("SMMU: from the ACPI IORT alone").count(),
        2,
        "both boots, before and after the warm reset, take the SMMU from the IORT\n{}",
        outcome.report()
    );
    outcome.assert_console_shows(&["the same IOVA lands at the same PA"]);
}

#[test]
fn a_description_other_than_acpi_or_dt_is_refused() {
    let mut run = Run::new(Board::QemuVirt, Stage::Nested, &["probe"]);
    run.settings.push(("description".into(), "iort".into()));
    let outcome = run.boot();
    outcome.assert_console_shows(&["FATAL: configuration: description: expected acpi or dt"]);
    assert_ne!(outcome.exit_code, Some(0), "{}", outcome.report());
}

/// The map in use is the IORT's, not the tree's: an edu behind a root port (bus 1, which the tree's `iommu-map`
/// covers but QEMU's IORT, built before enumeration, does not) has no StreamID, and the one on the root bus keeps
/// 0x10.
#[test]
fn the_requester_id_map_in_use_is_the_iorts() {
    let mut run = Run::new(Board::QemuVirt, Stage::Nested, &["probe"]);
    run.edus = vec![EduPlacement::RootBus, EduPlacement::RootPort];
    run.settings.push(("description".into(), "acpi".into()));
    let outcome = run.boot();
    outcome.assert_passed(&["probe"]);
    outcome.assert_console_shows(&[
        "PCI 00:02.0 1234:11e8 class 00ff00 SID Some(16)",
        "PCI 01:00.0 1234:11e8 class 00ff00 SID None",
    ]);
}
