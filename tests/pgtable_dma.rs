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
