//! On-target tests on QEMU virt: the firmware boots at EL2 with each SMMU flavour and its scenarios pass; a
//! wrong expectation or an unknown scenario fails as it must.

use smmuv3_harness::{Board, Run, Stage};

fn boot(stage: Stage, scenarios: &[&str]) -> smmuv3_harness::Outcome {
    Run::new(Board::QemuVirt, stage, scenarios).boot()
}

#[test]
fn foundation_scenarios_pass_on_stage_1() {
    boot(Stage::One, &["probe", "edu-ident"]).assert_passed(&["probe", "edu-ident"]);
}

#[test]
fn foundation_scenarios_pass_on_stage_2() {
    boot(Stage::Two, &["probe", "edu-ident"]).assert_passed(&["probe", "edu-ident"]);
}

#[test]
fn foundation_scenarios_pass_on_nested() {
    let outcome = boot(Stage::Nested, &["probe", "edu-ident"]);
    outcome.assert_passed(&["probe", "edu-ident"]);
    // The EL2 firmware really ran and decoded a nesting SMMU.
    assert!(outcome.console.contains("at EL2"), "{}", outcome.report());
    assert!(
        outcome.console.contains("stages: stage 1 + stage 2 (nested)"),
        "{}",
        outcome.report()
    );
}

#[test]
fn default_scenarios_are_the_demo() {
    let outcome = boot(Stage::Nested, &[]);
    let demo = ["probe", "edu-ident", "init", "abort-default", "bypass", "pgtable-dma"];
    // abort-default provokes bad-stream records for edu's stream (StreamID 0x10) on purpose, pgtable-dma
    // translation and permission faults after its unmap and its protect.
    outcome.assert_passed_provoking(
        &demo,
        |e| {
            (e.contains("_C_BAD_STE ")
                || e.contains("_C_BAD_STREAMID ")
                || e.contains("_F_TRANSLATION ")
                || e.contains("_F_PERMISSION "))
                && e.ends_with("sid=0x10")
        },
        0,
    );
    assert_eq!(outcome.scenarios().len(), demo.len(), "{}", outcome.report());
    assert!(
        outcome.console.contains("stream table at"),
        "the demo prints the stream table it chose\n{}",
        outcome.report()
    );
    assert!(
        outcome.console.contains("command queue at"),
        "the demo prints its queues\n{}",
        outcome.report()
    );
}

#[test]
fn unknown_scenario_fails_naming_it() {
    let outcome = boot(Stage::Nested, &["probe", "no-such-scenario"]);
    assert_eq!(outcome.scenario("probe"), Some(Ok(())), "{}", outcome.report());
    let reason = outcome
        .scenario("no-such-scenario")
        .expect("a FAIL line for the unknown name");
    assert!(
        reason.unwrap_err().contains("unknown scenario 'no-such-scenario'"),
        "{}",
        outcome.report()
    );
    assert_eq!(outcome.exit_code, Some(1), "{}", outcome.report());
}

#[test]
fn probe_fails_when_the_smmu_lacks_the_promised_stages() {
    // A stage-1-only SMMU, while the firmware is told it has both stages.
    let mut run = Run::new(Board::QemuVirt, Stage::One, &["probe"]);
    run.expected_stage = Some(Stage::Nested);
    let outcome = run.boot();
    let reason = outcome.scenario("probe").expect("probe result").unwrap_err();
    assert!(reason.contains("offers stage 1 only"), "{}", outcome.report());
    assert_ne!(outcome.exit_code, Some(0), "{}", outcome.report());
}

#[test]
fn edu_cannot_reach_ram_without_translation_under_its_default_mask() {
    let mut run = Run::new(Board::QemuVirt, Stage::Nested, &["edu-ident"]);
    run.edu_dma_mask = (1 << 28) - 1;
    let outcome = run.boot();
    let reason = outcome.scenario("edu-ident").expect("edu-ident result").unwrap_err();
    assert!(reason.contains("beyond edu's DMA mask"), "{}", outcome.report());
}

#[test]
fn psci_reset_and_power_off_through_qemus_psci() {
    smmuv3_harness::assert_psci_reset_and_power_off(Board::QemuVirt);
}

/// `n` copies of `name`: a scenario list of a chosen length.
fn repeated(name: &'static str, n: usize) -> Vec<&'static str> {
    vec![name; n]
}

/// The firmware once read at most 512 bytes of the list and ran what was left, exiting 0: now the whole file is
/// read, so every one of 120 names (719 bytes) prints its line and the RESULT line counts them all.
#[test]
fn a_scenario_list_longer_than_512_bytes_runs_every_name() {
    let names = repeated("probe", 120);
    assert!(names.join(",").len() > 512);
    let outcome = boot(Stage::Nested, &names);
    outcome.assert_passed(&["probe"]);
    assert_eq!(outcome.scenarios().len(), 120, "{}", outcome.report());
    outcome.assert_console_shows(&["\nRESULT PASS 120/120\n"]);
}

/// A list larger than the firmware's 4 KiB buffer is refused, naming its size and the limit, before any scenario.
#[test]
fn an_oversize_scenario_list_is_refused_naming_its_size_and_the_limit() {
    let names = repeated("probe", 700);
    let bytes = names.join(",").len();
    assert_eq!(bytes, 4199);
    let outcome = boot(Stage::Nested, &names);
    outcome.assert_console_shows(&[
        "FATAL: configuration: opt/smmuv3/scenarios is 4199 bytes, more than the firmware's limit of 4096 bytes",
        "\nRESULT FAIL 0/0\n",
    ]);
    assert!(outcome.scenarios().is_empty(), "{}", outcome.report());
    assert_eq!(outcome.exit_code, Some(2), "{}", outcome.report());
}

/// A list with no name in it (separators only, or a blank) is an error, not a run of nothing that exits 0.
#[test]
fn a_scenario_list_without_names_is_an_error() {
    // QEMU's option parser turns ",,,," into the file ",,".
    for list in [",,,,", " "] {
        let mut run = Run::new(Board::QemuVirt, Stage::Nested, &[]);
        run.settings.push(("scenarios".into(), list.into()));
        let outcome = run.boot();
        outcome.assert_console_shows(&[
            "FATAL: configuration: the scenario list (opt/smmuv3/scenarios) names no scenario",
            "\nRESULT FAIL 0/0\n",
        ]);
        assert!(outcome.scenarios().is_empty(), "{}", outcome.report());
        assert_eq!(outcome.exit_code, Some(2), "{list:?}\n{}", outcome.report());
    }
}

/// A run without semihosting, as on a real board: no FATAL exception on the exit call; it prints the RESULT line
/// and QEMU exits by itself (PSCI SYSTEM_OFF, status 0).
fn boot_without_semihosting(scenarios: &[&str]) -> smmuv3_harness::Outcome {
    let mut run = Run::new(Board::QemuVirt, Stage::Nested, scenarios);
    run.semihosting = false;
    run.timeout = std::time::Duration::from_secs(60);
    let outcome = run.boot();
    assert!(!outcome.timed_out, "QEMU exits by itself\n{}", outcome.report());
    assert_eq!(outcome.exit_code, Some(0), "PSCI SYSTEM_OFF\n{}", outcome.report());
    assert!(!outcome.console.contains("FATAL"), "{}", outcome.report());
    assert!(!outcome.console.contains("exception"), "{}", outcome.report());
    outcome.assert_console_shows(&[
        "semihosting: absent",
        "the RESULT line is the verdict",
        "powering off through PSCI SYSTEM_OFF",
    ]);
    outcome
}

#[test]
fn without_semihosting_a_passing_run_says_result_pass_and_powers_off() {
    let outcome = boot_without_semihosting(&["probe", "edu-ident"]);
    outcome.assert_passed(&["probe", "edu-ident"]);
    outcome.assert_console_shows(&["\nRESULT PASS 2/2\n"]);
    eprintln!("without semihosting: powered off after {:?}", outcome.elapsed);
}

#[test]
fn without_semihosting_a_failing_run_says_result_fail_and_powers_off() {
    let outcome = boot_without_semihosting(&["probe", "no-such-scenario"]);
    outcome.assert_console_shows(&["\nRESULT FAIL 1/2\n"]);
    // QEMU's status is 0 (PSCI SYSTEM_OFF cannot carry one): the host's verdict reads the RESULT line.
    let verdict = outcome.verdict().unwrap_err();
    assert!(verdict.contains("no-such-scenario"), "{verdict}");
}

/// With semihosting the RESULT line is printed too, before the exit status.
#[test]
fn with_semihosting_the_result_line_precedes_the_exit_status() {
    let outcome = boot(Stage::Nested, &["probe", "no-such-scenario"]);
    outcome.assert_console_shows(&["semihosting: present", "\nRESULT FAIL 1/2\n"]);
    assert_eq!(outcome.exit_code, Some(1), "{}", outcome.report());
}

/// On `gic-version=2`, which the firmware does not drive, the boot says once that the SMMU is polled, and the
/// interrupt-driven scenarios still pass by polling.
#[test]
fn gic_version_2_is_said_once_at_boot() {
    let mut run = Run::new(Board::QemuVirt, Stage::Nested, &["abort-default", "bypass"]);
    run.gic_version = 2;
    let outcome = run.boot();
    outcome.assert_passed_provoking(
        &["abort-default", "bypass"],
        |e| (e.contains("_C_BAD_STE ") || e.contains("_C_BAD_STREAMID ")) && e.ends_with("sid=0x10"),
        0,
    );
    let line = "GIC: version 2 not driven; SMMU interrupts polled";
    assert_eq!(outcome.console.matches(line).count(), 1, "{}", outcome.report());
    let said = outcome.console.find(line).unwrap();
    let first_scenario = outcome.console.find("SCENARIO ").unwrap();
    assert!(said < first_scenario, "said at boot\n{}", outcome.report());
}
