//! On-target tests of every CPU: `smp-hello` and `smp-dma` on QEMU virt (secondaries started by QEMU's PSCI CPU_ON) and on
//! sbsa-ref (by the EL3 stub's CPU_ON) with 4 CPUs. Each CPU runs a work item on its own stack with the boot CPU's
//! EL2 map and a GIC of its own, takes an SGI, and the SMMU's event-queue interrupt is taken on CPU 2 and then by
//! every CPU in turn. The only SMMU events are the bad-stream records the scenario provokes for edu's stream.
//! In `smp-dma` every CPU maps, unmaps, attaches and detaches through one shared driver while two edu devices DMA
//! through the domains; the only SMMU events are the translation faults it provokes for the first edu's stream,
//! each filed once in the shared domain by whichever CPU took the interrupt. In `lu-smp` CPU 0 prepares a hand-off
//! while the others map and unmap in the preserved domain: the frozen tables equal the CPUs' own records, and the
//! next boot (after a warm reset) restores exactly those mappings.
//!
//! The machine these run on may have fewer host cores than QEMU has vCPUs: the tests assert what happened, never
//! how fast; the console's timings are figures.

use smmuv3_harness::{Board, EduPlacement, Outcome, Run, Stage};

const CPUS: usize = 4;

fn smp_hello(board: Board) -> Outcome {
    let mut run = Run::new(board, Stage::Nested, &["smp-hello"]);
    run.smp = CPUS;
    run.boot()
}

/// A bad-stream record for edu's (unconfigured) stream: what the scenario provokes.
fn provoked(board: Board, event: &str) -> bool {
    let sid = format!(" sid={:#x}", board.edu_stream_id());
    ["C_BAD_STE", "C_BAD_STREAMID"]
        .iter()
        .any(|kind| event == format!("SMMU_EVT_{kind}{sid}"))
}

fn every_cpu_says_hello(board: Board) {
    let outcome = smp_hello(board);
    outcome.assert_passed_provoking(&["smp-hello"], |e| provoked(board, e), 0);
    outcome.assert_console_shows(&[
        "CPUs: 4 (MPIDR 0x0 0x1 0x2 0x3)",
        "4 CPUs online: CPUs 1-3 started through PSCI CPU_ON",
        "every CPU reported; shared atomic 40000 = 4 x 10000",
        "SGI 1 from CPU 0 taken by each of CPUs 1-3",
        "routed to CPU 2 (MPIDR 0x2): taken and handled there",
        "by no other CPU",
        // QEMU's GICv3 has no 1-of-N (GICD_TYPER.No1N): the handler moves the line round the CPUs.
        "routed to any CPU, round robin",
        "CPUs 1-3 off again (PSCI CPU_OFF, AFFINITY_INFO OFF)",
    ]);
    for cpu in 1..CPUS {
        outcome.assert_console_shows(&[&format!("CPU {cpu}: MPIDR {cpu:#x}, EL2, its own stack at")]);
    }
    // Round robin: every CPU took the line at least once.
    let line = outcome
        .console
        .lines()
        .find(|l| l.contains("routed to any CPU"))
        .unwrap_or_default();
    for cpu in 0..CPUS {
        assert!(
            !line.contains(&format!("CPU {cpu}: 0")),
            "CPU {cpu} never took the line: {line}\n{}",
            outcome.report()
        );
    }
    assert!(
        !outcome.smmu_events().is_empty(),
        "the provoked faults reached QEMU's trace\n{}",
        outcome.report()
    );
}

#[test]
fn smp_hello_on_virt_with_4_cpus() {
    every_cpu_says_hello(Board::QemuVirt);
}

#[test]
fn smp_hello_on_sbsa_ref_with_4_cpus() {
    every_cpu_says_hello(Board::SbsaRef);
}

/// The scenario needs secondaries: on one CPU it fails saying so, and the run reports the failure.
#[test]
fn smp_hello_on_one_cpu_fails_naming_the_option() {
    let outcome = Run::new(Board::QemuVirt, Stage::Nested, &["smp-hello"]).boot();
    match outcome.scenario("smp-hello") {
        Some(Err(reason)) => assert!(reason.contains("needs at least 2 CPUs"), "{reason}"),
        other => panic!("expected a failure, got {other:?}\n{}", outcome.report()),
    }
    assert_eq!(outcome.exit_code, Some(1), "{}", outcome.report());
}

fn smp_dma(board: Board) {
    let mut run = Run::new(board, Stage::Nested, &["smp-dma"]);
    run.smp = CPUS;
    assert_eq!(run.edus, [EduPlacement::RootBus, EduPlacement::RootPort]);
    let outcome = run.boot();
    let faulting = format!("SMMU_EVT_F_TRANSLATION sid={:#x}", board.edu_stream_id());
    outcome.assert_passed_provoking(&["smp-dma"], |e| e == faulting, 0);
    outcome.assert_console_shows(&[
        "4 CPUs, ",
        "96 rounds of map, DMA through edu A, unmap in the shared domain and 96 DMAs through edu B",
        "every pattern landed",
        "24 faulting DMA(s) -> ",
        "none elsewhere",
    ]);
    // Each record the SMMU wrote (QEMU's trace) is filed once: the total in the shared domain equals the trace's.
    let written = outcome.smmu_events().len();
    assert!(
        written >= 24,
        "the provoked faults reached QEMU's trace\n{}",
        outcome.report()
    );
    outcome.assert_console_shows(&[&format!(
        "24 faulting DMA(s) -> {written} fault(s) filed in the shared domain"
    )]);
}

#[test]
fn smp_dma_on_virt_with_4_cpus() {
    smp_dma(Board::QemuVirt);
}

#[test]
fn smp_dma_on_sbsa_ref_with_4_cpus() {
    smp_dma(Board::SbsaRef);
}

fn lu_smp(board: Board) {
    let mut run = Run::new(board, Stage::Nested, &["lu-smp"]);
    run.smp = CPUS;
    let outcome = run.boot();
    outcome.assert_passed_provoking(&["lu-smp"], |_| false, 0);
    outcome.assert_console_shows(&[
        "3 CPUs mapped and unmapped in",
        "each CPU refused (HandoverPrepared) from then on while its own domain kept working (64 map + unmap each)",
        "as the CPUs recorded",
        "resetting through PSCI SYSTEM_RESET",
        "restored generation 1: 1 domain(s)",
        "edu's DMA lands at PA",
    ]);
    // The digest the first boot recorded is the one the second boot walked.
    let digest = |marker: &str| {
        let line = outcome.console.lines().find(|l| l.contains(marker)).unwrap_or_default();
        line.split("(digest ")
            .nth(1)
            .and_then(|d| d.split(')').next())
            .map(str::to_string)
    };
    let before = digest("as the CPUs recorded");
    assert!(before.is_some(), "no digest before the reset\n{}", outcome.report());
    assert_eq!(before, digest("after the reset:"), "\n{}", outcome.report());
}

#[test]
fn lu_smp_on_virt_with_4_cpus() {
    lu_smp(Board::QemuVirt);
}

#[test]
fn lu_smp_on_sbsa_ref_with_4_cpus() {
    lu_smp(Board::SbsaRef);
}
