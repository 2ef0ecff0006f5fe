//! On-target test of the IO page tables: edu DMA through stage-1 and stage-2 tables built by the driver, on each
//! SMMU flavour. The only SMMU events allowed are the faults the scenario provokes: translation faults after the
//! unmap, permission faults after making the page read-only.

use smmuv3_harness::{Board, Run, Stage};

fn pgtable_dma(stage: Stage) {
    let outcome = Run::new(Board::QemuVirt, stage, &["pgtable-dma"]).boot();
    let provoked = |e: &str| e == "SMMU_EVT_F_TRANSLATION sid=0x10" || e == "SMMU_EVT_F_PERMISSION sid=0x10";
    outcome.assert_passed_provoking(&["pgtable-dma"], provoked, 0);
    let events = outcome.smmu_events();
    for kind in ["F_TRANSLATION", "F_PERMISSION"] {
        assert!(
            events.iter().any(|e| e.contains(kind)),
            "QEMU's own trace shows the {kind} the scenario provoked\n{}",
            outcome.report()
        );
    }
    let translated = outcome.console.matches("verified").count();
    // Stage 1 alone, stage 2 alone, and on a nesting SMMU both of those and the nested pair.
    let passes = if stage == Stage::Nested { 3 } else { 1 };
    assert_eq!(
        translated,
        2 * passes,
        "a round trip and a remap per pass\n{}",
        outcome.report()
    );
    if stage == Stage::Nested {
        assert!(
            outcome.console.contains("  nested (stage 1 inside"),
            "{}",
            outcome.report()
        );
    }
}

#[test]
fn translated_dma_on_stage_1() {
    pgtable_dma(Stage::One);
}

#[test]
fn translated_dma_on_stage_2() {
    pgtable_dma(Stage::Two);
}

#[test]
fn translated_dma_on_both_stages_of_a_nesting_smmu() {
    pgtable_dma(Stage::Nested);
}

/// `dma-map-bench`: map a page, edu DMA through it, unmap and invalidate, many times, with no SMMU event; it prints
/// its cost split into page-table work and invalidation. Only that the split is reported is checked: QEMU's timing
/// is not hardware's, so no number is judged here.
#[test]
fn dma_map_bench_runs_and_reports_its_cost_split() {
    let outcome = Run::new(Board::QemuVirt, Stage::Nested, &["dma-map-bench"]).boot();
    outcome.assert_passed(&["dma-map-bench"]);
    let split = outcome
        .console
        .lines()
        .find(|l| l.trim_start().starts_with("dma-map-bench: per round: page tables"));
    assert!(
        split.is_some_and(|l| l.contains("ticks (map") && l.contains("invalidation") && l.contains("Hz")),
        "the cost split line\n{}",
        outcome.report()
    );
    for line in outcome
        .console
        .lines()
        .filter(|l| l.contains("rounds") || l.contains("dma-map-bench"))
    {
        eprintln!("{line}");
    }
}

/// Every physical address the console reports after `marker` (queues, tables, DMA buffers): `PA 0x…` and
/// `at 0x…` values.
fn reported_addresses(console: &str) -> Vec<u64> {
    let mut addresses = Vec::new();
    for line in console.lines() {
        for prefix in ["PA 0x", "table at 0x", "queue at 0x"] {
            let mut rest = line;
            while let Some(at) = rest.find(prefix) {
                rest = &rest[at + prefix.len()..];
                let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
                addresses.push(u64::from_str_radix(&hex, 16).expect("hex address"));
            }
        }
    }
    addresses
}

/// `dma-above-4g=on` with 8 GiB of RAM on virt: the frame pool starts at 4 GiB, so the stream table, the queues,
/// the page tables and every DMA buffer lie above it, and edu's DMA (through the SMMU, translated and not) reaches
/// them there.
#[test]
fn translated_dma_with_every_buffer_queue_and_table_above_4_gib() {
    let scenarios = ["edu-ident", "init", "bypass", "pgtable-dma"];
    let mut run = Run::new(Board::QemuVirt, Stage::Nested, &scenarios);
    run.memory = "8G".into();
    run.settings.push(("dma-above-4g".into(), "on".into()));
    let outcome = run.boot();
    let provoked = |e: &str| e == "SMMU_EVT_F_TRANSLATION sid=0x10" || e == "SMMU_EVT_F_PERMISSION sid=0x10";
    outcome.assert_passed_provoking(&scenarios, provoked, 0);
    outcome.assert_console_shows(&["frames: from 0x100000000 on (dma-above-4g)"]);
    let addresses = reported_addresses(&outcome.console);
    assert!(addresses.len() >= 10, "{addresses:x?}\n{}", outcome.report());
    assert!(
        addresses.iter().all(|&a| a >= 1 << 32),
        "every address above 4 GiB: {addresses:x?}\n{}",
        outcome.report()
    );
}

/// Without enough RAM the setting fails the boot with a clear message instead of quietly using low memory.
#[test]
fn dma_above_4g_without_ram_there_fails_clearly() {
    let mut run = Run::new(Board::QemuVirt, Stage::Nested, &["init"]);
    run.settings.push(("dma-above-4g".into(), "on".into()));
    let outcome = run.boot();
    assert_ne!(outcome.exit_code, Some(0), "{}", outcome.report());
    outcome.assert_console_shows(&[
        "FATAL: dma-above-4g: frames asked for at or above 0x100000000, but the pool's RAM ends at",
    ]);
}

/// sbsa-ref's RAM starts at 1 TiB: there the setting changes nothing, and the same scenarios pass.
#[test]
fn translated_dma_above_4_gib_on_sbsa_ref() {
    let scenarios = ["edu-ident", "pgtable-dma"];
    let mut run = Run::new(Board::SbsaRef, Stage::Nested, &scenarios);
    run.settings.push(("dma-above-4g".into(), "on".into()));
    let outcome = run.boot();
    let provoked = |e: &str| e == "SMMU_EVT_F_TRANSLATION sid=0x18" || e == "SMMU_EVT_F_PERMISSION sid=0x18";
    outcome.assert_passed_provoking(&scenarios, provoked, 0);
    let addresses = reported_addresses(&outcome.console);
    assert!(addresses.iter().all(|&a| a >= 1 << 40), "{addresses:x?}");
}
