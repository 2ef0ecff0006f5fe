//! On-target tests of the SMMU core on QEMU virt, for each SMMU flavour: init with a 2-level stream table,
//! aborting and bypassing streams with real edu DMA, command-error recovery and event-queue overflow. QEMU's own
//! trace is the witness: the only SMMU events are the bad-stream records the scenarios provoke for edu's stream,
//! and the only command error is the one `cmdq-error` injects.

use smmuv3_harness::{Board, Outcome, Run, Stage};

const CORE: [&str; 5] = ["init", "abort-default", "bypass", "cmdq-error", "evtq-overflow"];

fn boot(stage: Stage, scenarios: &[&str]) -> Outcome {
    Run::new(Board::QemuVirt, stage, scenarios).boot()
}

/// edu sits at 00:02.0: requester ID 0x10, StreamID 0x10 through the identity `iommu-map`. QEMU traces events
/// as `SMMU_EVT_<name> sid=0x..`; an unallocated level-2 span gives C_BAD_STREAMID, an invalid STE C_BAD_STE.
fn provoked(event: &str) -> bool {
    (event.contains("_C_BAD_STE ") || event.contains("_C_BAD_STREAMID ")) && event.ends_with("sid=0x10")
}

fn core_scenarios(stage: Stage) {
    let outcome = boot(stage, &CORE);
    outcome.assert_passed_provoking(&CORE, provoked, 1);
    assert!(
        !outcome.smmu_events().is_empty(),
        "the provoked faults reached QEMU's trace\n{}",
        outcome.report()
    );
    assert!(
        outcome.console.contains("2-level"),
        "init chose a 2-level stream table\n{}",
        outcome.report()
    );
    assert!(
        outcome.console.contains("with 1 PROD write(s)"),
        "one PROD write per batch\n{}",
        outcome.report()
    );
    // The tree's edge-triggered lines (SPIs 74 and 77: INTIDs 106 and 109) reach EL2 through the GIC.
    outcome.assert_console_shows(&[
        "event-queue interrupt: INTID 106 (edge) taken at EL2",
        "GERROR (CMDQ_ERR) interrupt: INTID 109 (edge) taken at EL2",
    ]);
}

#[test]
fn core_scenarios_pass_on_stage_1() {
    core_scenarios(Stage::One);
}

#[test]
fn core_scenarios_pass_on_stage_2() {
    core_scenarios(Stage::Two);
}

#[test]
fn core_scenarios_pass_on_nested() {
    core_scenarios(Stage::Nested);
}

#[test]
fn init_and_bypass_provoke_nothing() {
    boot(Stage::Nested, &["init", "bypass", "edu-ident"]).assert_passed(&["init", "bypass", "edu-ident"]);
}

#[test]
fn scenarios_are_independent_of_order() {
    let order = [
        "evtq-overflow",
        "cmdq-error",
        "bypass",
        "abort-default",
        "init",
        "edu-ident",
        "probe",
    ];
    boot(Stage::Nested, &order).assert_passed_provoking(&order, provoked, 1);
}

/// The non-coherent path on real DMA: with `coherency=non-coherent` the firmware overrides IDR0.COHACC, so the
/// SMMU's tables and queues are non-cacheable and every CPU write to them is cleaned to memory. QEMU models no
/// caches, so this proves the encodings and the cache maintenance run on target, not that they are needed.
#[test]
fn core_and_translated_dma_with_non_coherent_walks() {
    let scenarios = [
        "init",
        "abort-default",
        "bypass",
        "cmdq-error",
        "evtq-overflow",
        "pgtable-dma",
    ];
    let mut run = Run::new(Board::QemuVirt, Stage::Nested, &scenarios);
    run.settings.push(("coherency".into(), "non-coherent".into()));
    let outcome = run.boot();
    let translation = |e: &str| e == "SMMU_EVT_F_TRANSLATION sid=0x10" || e == "SMMU_EVT_F_PERMISSION sid=0x10";
    outcome.assert_passed_provoking(&scenarios, |e| provoked(e) || translation(e), 1);
    outcome.assert_console_shows(&[
        "IDR0.COHACC 1 overridden: dma-coherent false (the host asked for non-coherent walks)",
        "SMMU accesses non-cacheable (not coherent)",
    ]);
}

/// QEMU's register trace is the witness of the base-register encodings: EVENTQ_BASE carries its write-allocate
/// hint in bit 62 (bit 63 is RES0), CMDQ_BASE and STRTAB_BASE their read-allocate hint in bit 62.
#[test]
fn queue_and_table_bases_carry_their_hints_in_bit_62() {
    let mut run = Run::new(Board::QemuVirt, Stage::Nested, &["init"]);
    run.trace_events.push("smmuv3_write_mmio".into());
    let outcome = run.boot();
    outcome.assert_passed(&["init"]);
    let writes = |offset: u64| -> Vec<u64> {
        outcome
            .trace
            .lines()
            .filter_map(|l| {
                let rest = l.split_once("smmuv3_write_mmio ")?.1;
                let (addr, rest) = rest.strip_prefix("addr: ")?.split_once(' ')?;
                let value = rest.strip_prefix("val:")?.split_whitespace().next()?;
                let addr = u64::from_str_radix(addr.trim_start_matches("0x"), 16).ok()?;
                let value = u64::from_str_radix(value.trim_start_matches("0x"), 16).ok()?;
                (addr == offset).then_some(value)
            })
            .collect()
    };
    for (name, offset) in [("STRTAB_BASE", 0x80), ("CMDQ_BASE", 0x90), ("EVENTQ_BASE", 0xa0)] {
        let values = writes(offset);
        assert!(!values.is_empty(), "no {name} write traced\n{}", outcome.report());
        for v in values {
            assert_eq!(
                v >> 62,
                0b01,
                "{name} written as {v:#x}: bit 62 set, bit 63 (RES0) clear"
            );
        }
    }
}
