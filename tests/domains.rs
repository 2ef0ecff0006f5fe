//! The domain scenarios on QEMU: every one a real edu DMA checked by reading memory, through the domain API only.
//! Single-stage scenarios run on their own `--stage` and on nested; the nested ones on nested; all of them but
//! `isolation` (which needs a second edu, behind a root port) on sbsa-ref (nested only). QEMU's trace must show no C_BAD_STE, C_BAD_CD or command error: only the translation
//! and permission faults the scenarios provoke for edu's streams.

use smmuv3_harness::{Board, EduPlacement, Outcome, Run, Stage};

/// The faults the scenarios provoke on purpose, for `sids`.
fn provoked(event: &str, sids: &[u32]) -> bool {
    ["F_TRANSLATION", "F_PERMISSION"]
        .iter()
        .any(|kind| sids.iter().any(|sid| event == format!("SMMU_EVT_{kind} sid={sid:#x}")))
}

fn run(board: Board, stage: Stage, scenarios: &[&str], edus: &[EduPlacement]) -> Outcome {
    let mut run = Run::new(board, stage, scenarios);
    run.edus = edus.to_vec();
    run.boot()
}

const ANY_STAGE: [&str; 5] = [
    "unmapped-fault",
    "readonly-fault",
    "unmap-invalidate",
    "detach-aborts",
    "block-mappings",
];

#[test]
fn single_stage_domains_on_a_stage_1_smmu() {
    let scenarios: Vec<&str> = ["s1-dma"].into_iter().chain(ANY_STAGE).collect();
    let outcome = run(Board::QemuVirt, Stage::One, &scenarios, &[EduPlacement::RootBus]);
    outcome.assert_passed_provoking(&scenarios, |e| provoked(e, &[0x10]), 0);
    outcome.assert_console_shows(&["(stage 1): stream 0x10;", "2 MiB blocks and a GiB as one 1 GiB block"]);
}

#[test]
fn single_stage_domains_on_a_stage_2_smmu() {
    let scenarios: Vec<&str> = ["s2-dma"].into_iter().chain(ANY_STAGE).collect();
    let outcome = run(Board::QemuVirt, Stage::Two, &scenarios, &[EduPlacement::RootBus]);
    outcome.assert_passed_provoking(&scenarios, |e| provoked(e, &[0x10]), 0);
    outcome.assert_console_shows(&["(stage 2): stream 0x10;"]);
}

#[test]
fn every_domain_scenario_on_a_nesting_smmu() {
    let scenarios: Vec<&str> = ["s1-dma", "s2-dma", "nested-dma", "isolation"]
        .into_iter()
        .chain(ANY_STAGE)
        .collect();
    let outcome = run(
        Board::QemuVirt,
        Stage::Nested,
        &scenarios,
        &[EduPlacement::RootBus, EduPlacement::RootPort],
    );
    outcome.assert_passed_provoking(&scenarios, |e| provoked(e, &[0x10, 0x100]), 0);
    outcome.assert_console_shows(&[
        "-> IPA 0x800",
        "stage 2 remapped under the live stage 1",
        "cost (generic timer, mean of 8 warm rounds): attach",
        "in the second domain, none in the first",
        "unmapped 4 KiB inside a 2 MiB block (split in place, IDR3.BBML = 2)",
    ]);
}

#[test]
fn every_domain_scenario_on_sbsa_ref() {
    let scenarios: Vec<&str> = ["s1-dma", "s2-dma", "nested-dma"]
        .into_iter()
        .chain(ANY_STAGE)
        .collect();
    let outcome = run(Board::SbsaRef, Stage::Nested, &scenarios, &[EduPlacement::RootBus]);
    outcome.assert_passed_provoking(&scenarios, |e| provoked(e, &[0x18]), 0);
}
