//! On-target tests on QEMU sbsa-ref: the firmware starts at EL3 in its own stub, drops to EL2 and runs the same
//! scenarios as on virt, with every device taken from the board's static description (its device tree names only
//! memory) and the configuration from the semihosting command line. QEMU's trace is the witness, as on virt: the
//! only SMMU events are those the scenarios provoke for edu's stream (00:03.0, StreamID 0x18).

use smmuv3_harness::{Board, Outcome, Run, Stage};

const BOARD: Board = Board::SbsaRef;

fn boot(scenarios: &[&str]) -> Outcome {
    Run::new(BOARD, Stage::Nested, scenarios).boot()
}

/// A fault record of one of `kinds` for edu's stream.
fn provoked(event: &str, kinds: &[&str]) -> bool {
    let sid = format!(" sid={:#x}", BOARD.edu_stream_id());
    kinds.iter().any(|k| event == format!("SMMU_EVT_{k}{sid}"))
}

#[test]
fn demo_runs_at_el2_from_the_board_description() {
    let outcome = boot(&[]);
    let demo = ["probe", "edu-ident", "init", "abort-default", "bypass", "pgtable-dma"];
    outcome.assert_passed_provoking(
        &demo,
        |e| provoked(e, &["C_BAD_STE", "C_BAD_STREAMID", "F_TRANSLATION", "F_PERMISSION"]),
        0,
    );
    assert_eq!(outcome.scenarios().len(), demo.len(), "{}", outcome.report());
    outcome.assert_console_shows(&[
        "smmuv3 firmware on QEMU sbsa-ref at EL2",
        "SMMU: 0x60050000 size 0x20000",
        "interrupts: eventq Some(44) priq Some(45) cmdq-sync Some(46) gerror Some(47) (edge)",
        "stages: stage 1 + stage 2 (nested)",
        "PCI 00:03.0 1234:11e8",
        "StreamID 0x18",
        "  nested (stage 1 inside",
    ]);
}

#[test]
fn core_scenarios_pass_on_sbsa_ref() {
    let core = ["init", "abort-default", "bypass", "cmdq-error", "evtq-overflow"];
    let outcome = boot(&core);
    outcome.assert_passed_provoking(&core, |e| provoked(e, &["C_BAD_STE", "C_BAD_STREAMID"]), 1);
    assert!(
        !outcome.smmu_events().is_empty(),
        "the provoked faults reached QEMU's trace\n{}",
        outcome.report()
    );
    // The board's edge-triggered lines (SPIs 12 and 15: INTIDs 44 and 47) reach EL2 through the GIC.
    outcome.assert_console_shows(&[
        "event-queue interrupt: INTID 44 (edge) taken at EL2",
        "GERROR (CMDQ_ERR) interrupt: INTID 47 (edge) taken at EL2",
        "GERROR (EVENTQ_ABT_ERR) interrupt: INTID 47 (edge) taken at EL2",
    ]);
}

#[test]
fn clean_scenarios_provoke_nothing_on_sbsa_ref() {
    let clean = ["probe", "edu-ident", "init", "bypass"];
    boot(&clean).assert_passed(&clean);
}

#[test]
fn a_stage_sbsa_ref_cannot_present_is_refused() {
    assert_eq!(BOARD.check_stage(Stage::Nested), Ok(()));
    for stage in [Stage::One, Stage::Two] {
        let refusal = BOARD.check_stage(stage).unwrap_err();
        assert!(
            refusal.contains("sbsa-ref") && refusal.contains("--stage nested"),
            "{refusal}"
        );
    }
    // And `cargo xtask qemu` says so before building or booting anything.
    let output = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(smmuv3_harness::workspace_root())
        .args(["xtask", "qemu", "--board", "sbsa-ref", "--stage", "1"])
        .output()
        .expect("cargo runs");
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("QEMU presents no stage-1 SMMU on sbsa-ref"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn psci_reset_and_power_off_through_the_el3_stub() {
    smmuv3_harness::assert_psci_reset_and_power_off(BOARD);
}

/// The EL3 stub reports an exception it does not expect: an HCRX_EL2 read at EL2 traps to EL3 (SCR_EL3.HXEn = 0)
/// with EC 0x18, and the stub prints ESR_EL3 and ends the run with status 5 instead of hanging.
#[test]
fn the_el3_stub_reports_an_unexpected_exception() {
    let outcome = boot(&["el3-fault-report"]);
    assert_eq!(outcome.exit_code, Some(5), "{}", outcome.report());
    // EC 0x18 (trapped system register access) with IL set: ESR_EL3 = 0x62xx_xxxx.
    outcome.assert_console_shows(&["EL3: unexpected exception, ESR_EL3=0x0000000062"]);
    assert_eq!(
        outcome.scenario("el3-fault-report"),
        None,
        "the run ended inside it\n{}",
        outcome.report()
    );
}

/// The semihosting command line is read whole (up to 4 KiB): a list longer than the old 512-byte buffer runs
/// every name (the old firmware fell back to the demo).
#[test]
fn a_semihosting_list_longer_than_512_bytes_runs_every_name() {
    let names = vec!["probe"; 120];
    let outcome = boot(&names);
    outcome.assert_passed(&["probe"]);
    assert_eq!(outcome.scenarios().len(), 120, "{}", outcome.report());
    outcome.assert_console_shows(&["\nRESULT PASS 120/120\n"]);
}

/// A command line longer than the firmware's 4 KiB buffer is refused (SYS_GET_CMDLINE does not say its size).
#[test]
fn an_oversize_semihosting_command_line_is_refused_naming_the_limit() {
    let outcome = boot(&vec!["probe"; 700]);
    outcome.assert_console_shows(&[
        "FATAL: configuration: the semihosting command line is longer than the firmware's limit of 4096 bytes",
        "\nRESULT FAIL 0/0\n",
    ]);
    assert!(outcome.scenarios().is_empty(), "{}", outcome.report());
    assert_eq!(outcome.exit_code, Some(2), "{}", outcome.report());
}

#[test]
fn an_empty_semihosting_list_is_an_error() {
    let mut run = Run::new(BOARD, Stage::Nested, &[]);
    run.settings.push(("scenarios".into(), ",,".into()));
    let outcome = run.boot();
    outcome.assert_console_shows(&["names no scenario", "\nRESULT FAIL 0/0\n"]);
    assert_eq!(outcome.exit_code, Some(2), "{}", outcome.report());
}

/// Without semihosting sbsa-ref has no configuration (it travels on the semihosting command line), so the demo
/// runs with the firmware's defaults; the run must still end by itself through the EL3 stub's PSCI SYSTEM_OFF with
/// a RESULT line over the six demo scenarios, and no FATAL exception on the exit call.
#[test]
fn without_semihosting_sbsa_ref_prints_its_result_and_powers_off() {
    let mut run = Run::new(BOARD, Stage::Nested, &[]);
    run.semihosting = false;
    let outcome = run.boot();
    assert!(!outcome.timed_out, "QEMU exits by itself\n{}", outcome.report());
    assert_eq!(outcome.exit_code, Some(0), "{}", outcome.report());
    assert!(!outcome.console.contains("FATAL"), "{}", outcome.report());
    assert!(!outcome.console.contains("exception"), "{}", outcome.report());
    outcome.assert_console_shows(&["semihosting: absent", "powering off through PSCI SYSTEM_OFF"]);
    let result = outcome.result().expect("a RESULT line");
    let passed = outcome.scenarios().iter().filter(|s| s.result.is_ok()).count();
    assert_eq!((result.passed, result.asked), (passed, 6), "{}", outcome.report());
    assert_eq!(result.pass, passed == 6, "{}", outcome.report());
}
