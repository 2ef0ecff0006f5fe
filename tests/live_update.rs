//! Live update on QEMU: each `lu-*` scenario preserves domains, resets through PSCI SYSTEM_RESET within the same
//! QEMU run, and restores them on the next boot (QEMU keeps RAM across the reset and resets the SMMU). `lu-s1`
//! runs on stage 1 and nested, `lu-s2` on stage 2 and nested, the rest on nested, and all of them on sbsa-ref.

use smmuv3_harness::{Board, Outcome, Run, Stage};

fn run(board: Board, stage: Stage, scenarios: &[&str]) -> Outcome {
    Run::new(board, stage, scenarios).boot()
}

/// Records provoked on purpose: `lu-mutate`'s write to the IOVA it unmapped (F_TRANSLATION), and the writes of a
/// stream nobody restored (`lu-unclaimed`, `lu-unpreserved`, `lu-corrupt`): after the reset its stream-table span
/// does not exist, so the SMMU reports C_BAD_STREAMID and aborts.
fn provoked(event: &str) -> bool {
    event.starts_with("SMMU_EVT_F_TRANSLATION sid=") || event.starts_with("SMMU_EVT_C_BAD_STREAMID sid=")
}

fn assert_reset_and_restored(outcome: &Outcome, scenarios: &[&str]) {
    outcome.assert_passed_provoking(scenarios, provoked, 0);
    let resets = outcome.console.matches("resetting through PSCI SYSTEM_RESET").count();
    assert_eq!(
        resets,
        scenarios.len(),
        "one real reset per scenario\n{}",
        outcome.report()
    );
}

#[test]
fn lu_s1_on_a_stage_1_smmu() {
    let outcome = run(Board::QemuVirt, Stage::One, &["lu-s1"]);
    assert_reset_and_restored(&outcome, &["lu-s1"]);
    outcome.assert_console_shows(&[
        "the same IOVA lands at the same PA",
        "1 page table(s) adopted without a walk",
    ]);
}

/// `lu-tables`, the live update of a board whose DMA masters the firmware does not drive (the i.MX95's
/// first-power-on step): a domain on a stream with no device, preserved, restored across a real reset with its
/// translations, table count and STE. Stage 1 and stage 2 on virt, nested on sbsa-ref; and on a virt machine with
/// no edu at all, as on such a board.
#[test]
fn lu_tables_needs_no_dma_master() {
    let scenario = ["lu-tables"];
    let mut no_device = Run::new(Board::QemuVirt, Stage::Nested, &scenario);
    no_device.edus.clear();
    for (r, stage) in [
        (Run::new(Board::QemuVirt, Stage::One, &scenario), "stage 1"),
        (Run::new(Board::QemuVirt, Stage::Two, &scenario), "stage 2"),
        (Run::new(Board::SbsaRef, Stage::Nested, &scenario), "stage 1"),
        (no_device, "stage 1"),
    ] {
        let outcome = r.boot();
        assert_reset_and_restored(&outcome, &scenario);
        outcome.assert_console_shows(&[
            &format!("({stage}) on stream 0xffff (no device) preserved as"),
            "restored generation 1: 1 domain(s), 1 stream(s)",
            "both IOVAs map the same PAs",
        ]);
    }
}

/// The firmware saves the handover region's records to the host at the hand-off (`dump-handover`, what
/// `cargo xtask qemu --dump-handover FILE` asks for), and the host decodes them with the driver's own format code:
/// one stage-1 record holding edu's stream, in this board's pool. Virt and sbsa-ref (fw_cfg and the semihosting
/// command line carry the path).
#[test]
fn the_region_saved_at_the_hand_off_decodes_on_the_host() {
    for board in [Board::QemuVirt, Board::SbsaRef] {
        let dir = smmuv3_harness::workspace_root().join("target/handover-dumps");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}-{}.bin", board.name(), std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut run = Run::new(board, Stage::Nested, &["lu-s1"]);
        run.settings.push(("dump-handover".into(), path.display().to_string()));
        let outcome = run.boot();
        assert_reset_and_restored(&outcome, &["lu-s1"]);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}\n{}", path.display(), outcome.report()));
        outcome.assert_console_shows(&[&format!(
            "handover region: {} bytes saved to {}",
            bytes.len(),
            path.display()
        )]);
        let header = smmuv3::handover::format::peek_header(&bytes).unwrap();
        let mut scratch = vec![0u64; smmuv3::handover::format::scratch_words(bytes.len())];
        let region = smmuv3::handover::format::decode(&bytes, header.pool, &mut scratch).unwrap();
        let records = &region.instances[0].records;
        assert_eq!(records.len(), 1);
        let record = records.first().unwrap();
        assert_eq!(record.kind, smmuv3::handover::RecordKind::Stage1);
        let sids: Vec<u32> = record.streams.iter().map(|s| s.sid).collect();
        assert_eq!(sids, [board.edu_stream_id()]);
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn lu_s2_on_a_stage_2_smmu() {
    let outcome = run(Board::QemuVirt, Stage::Two, &["lu-s2"]);
    assert_reset_and_restored(&outcome, &["lu-s2"]);
}

/// Every scenario that goes through a warm reset (all but `lu-noreset`).
const ACROSS_A_RESET: [&str; 8] = [
    "lu-s1",
    "lu-s2",
    "lu-nested",
    "lu-mutate",
    "lu-unclaimed",
    "lu-unpreserved",
    "lu-collision",
    "lu-corrupt",
];

#[test]
fn every_live_update_scenario_on_a_nesting_smmu() {
    let scenarios = ACROSS_A_RESET;
    let mut r = Run::new(Board::QemuVirt, Stage::Nested, &scenarios);
    r.timeout = std::time::Duration::from_secs(240);
    let outcome = r.boot();
    assert_reset_and_restored(&outcome, &scenarios);
    outcome.assert_console_shows(&[
        "-> IPA 0x80001000 -> PA",
        "(unmapped after preserve) faults",
        "finish freed it",
        "was not restored",
        "refused, the token is",
        "the handover region is refused: ",
        "every stream aborts (DMA blocked)",
    ]);
}

#[test]
fn live_update_on_sbsa_ref() {
    let scenarios = ACROSS_A_RESET;
    let mut r = Run::new(Board::SbsaRef, Stage::Nested, &scenarios);
    r.timeout = std::time::Duration::from_secs(240);
    let outcome = r.boot();
    assert_reset_and_restored(&outcome, &scenarios);
}

/// `lu-tampered`: preserved memory rewritten behind an intact region (a table descriptor aimed at a forged table in
/// DMA memory, a CD word) is refused by the next boot's verification, naming the descriptor; edu's stream aborts
/// (its canary and the region untouched) and the event queue shows the blocked writes, on virt and on sbsa-ref.
#[test]
fn tampered_preserved_memory_is_refused_by_verification_and_the_stream_aborts() {
    for board in [Board::QemuVirt, Board::SbsaRef] {
        let outcome = run(board, Stage::Nested, &["lu-tampered"]);
        assert_reset_and_restored(&outcome, &["lu-tampered"]);
        outcome.assert_console_shows(&[
            "the region still validates (its CRC holds)",
            "after the reset: restore: record 0x1d0000000000001 refused: descriptor at 0x",
            ", outside its own extent",
            "the canary at PA",
            "and the region untouched; the event queue recorded",
        ]);
        let sid = format!(" sid={:#x}", board.edu_stream_id());
        assert!(
            outcome
                .smmu_events()
                .iter()
                .any(|e| e.starts_with("SMMU_EVT_C_BAD_") && e.ends_with(&sid)),
            "QEMU traced the blocked writes of edu's stream\n{}",
            outcome.report()
        );
    }
}

/// `lu-noreset`: the hand-off without a reset, the SMMU left translating; a DMA in flight across it and one issued
/// during the restore land, with no SMMU event at all.
#[test]
fn a_hand_off_with_the_smmu_running_loses_no_dma() {
    for (board, stage) in [
        (Board::QemuVirt, Stage::Nested),
        (Board::QemuVirt, Stage::One),
        (Board::SbsaRef, Stage::Nested),
    ] {
        let outcome = run(board, stage, &["lu-noreset"]);
        outcome.assert_passed(&["lu-noreset"]);
        assert_eq!(
            outcome.console.matches("handing off to a new image").count(),
            1,
            "{}",
            outcome.report()
        );
        // A genuinely separate binary (linked into the second image slot) took over.
        outcome.assert_console_shows(&[
            "handing off to a new image (a separate binary at",
            "running in a separate image at",
            "both DMAs landed, 0 faulted",
        ]);
        // The first image took the region from the board (QEMU's tree names none) and passed it in the tree; the
        // next image read it from there.
        in_order(
            &outcome,
            &[
                "handover region: from the board description",
                "/reserved-memory/handover@",
                "added to the tree at",
                "handover region: from /reserved-memory (compatible \"smmuv3,handover-region\")",
                "read from the tree the previous image passed",
            ],
        );
    }
}

/// Each line after the one before it on the console.
fn in_order(outcome: &Outcome, lines: &[&str]) {
    let mut rest = outcome.console.as_str();
    for line in lines {
        let Some(at) = rest.find(line) else {
            panic!(
                "the console shows {line:?} after {lines:?}'s earlier lines\n{}",
                outcome.report()
            )
        };
        rest = &rest[at + line.len()..];
    }
}

/// A hand-off passes the region in the tree; a warm reset after it brings QEMU's own tree back (QEMU copies its
/// generated tree to RAM again on every reset), and the board's rule finds the same region, which the reset
/// scenario then restores from.
#[test]
fn after_a_hand_off_and_a_warm_reset_the_board_rule_finds_the_same_region() {
    let outcome = run(Board::QemuVirt, Stage::Nested, &["lu-noreset", "lu-s2"]);
    outcome.assert_passed(&["lu-noreset", "lu-s2"]);
    in_order(
        &outcome,
        &[
            "handover region: from /reserved-memory (compatible \"smmuv3,handover-region\")",
            "SCENARIO lu-noreset PASS",
            "resetting through PSCI SYSTEM_RESET",
            "handover region: from the board description",
            "SCENARIO lu-s2 PASS",
        ],
    );
    let regions: Vec<&str> = outcome
        .console
        .lines()
        .filter_map(|l| l.strip_suffix(", kept out of the frame pool"))
        .collect();
    assert!(
        regions.len() == 3 && regions.iter().all(|r| *r == regions[0]),
        "the same region at every boot: {regions:?}"
    );
}

/// Without a second image the firmware hands off to itself, entered again (its `.data` as the first run left it).
#[test]
fn a_hand_off_to_the_same_binary_entered_again_loses_no_dma() {
    let mut r = Run::new(Board::QemuVirt, Stage::Nested, &["lu-noreset"]);
    r.next_image = false;
    let outcome = r.boot();
    outcome.assert_passed(&["lu-noreset"]);
    outcome.assert_console_shows(&[
        "handing off to a new image (the same binary entered again)",
        "running in the same image at",
        "both DMAs landed, 0 faulted",
    ]);
}

/// Told a second image waits when none was loaded, the first image refuses to jump into empty RAM: the scenario
/// fails with the reason, the SMMU untouched.
#[test]
fn a_hand_off_to_an_empty_second_slot_is_refused() {
    let mut r = Run::new(Board::QemuVirt, Stage::Nested, &["lu-noreset"]);
    r.next_image = false;
    r.settings.push(("next-image".into(), "on".into()));
    let outcome = r.boot();
    outcome.assert_console_shows(&[
        "the second image slot holds no image",
        "SCENARIO lu-noreset FAIL",
        "\nRESULT FAIL 0/1\n",
    ]);
    assert!(!outcome.console.contains("handing off"), "{}", outcome.report());
}

/// `lu-adopt-refused`: a hand-off with the SMMU left translating whose restore is refused (the record's ASID
/// rewritten to the reserved 0, the CRC fixed, so that the restore's own checks refuse it). The new image adopts
/// the SMMU (its identity and stream table as recorded), the restore refuses, and before it returns every stream
/// aborts: edu's writes land neither at the old physical addresses nor at PA = IOVA. An aborting STE records no
/// event, so none may appear.
#[test]
fn a_refused_restore_after_a_running_hand_off_lets_no_dma_land() {
    for board in [Board::QemuVirt, Board::SbsaRef] {
        let outcome = run(board, Stage::Nested, &["lu-adopt-refused"]);
        outcome.assert_passed(&["lu-adopt-refused"]);
        outcome.assert_console_shows(&[
            "handing off to a new image (a separate binary at",
            "rewritten to 0 (the driver's reserved ID) and the CRC fixed",
            "SMMU adopted translating stream",
            "needs an ASID reserved or taken in this image 0x0",
            "every stream aborts (its STE rewritten, CFGI_ALL, CMD_SYNC); 0 bytes of edu's DMA landed",
        ]);
    }
}

/// `lu-dma-across-reset`: edu's DMA to IOVA X (a canary page's address) is in flight across a warm reset, and the
/// next boot turns bus mastering on before it touches the SMMU: the boot made the SMMU abort incoming DMA before
/// PCI enumeration, so the DMA aborts instead of landing at PA = X (it did land there before the boot did so). On
/// virt, on sbsa-ref (whose boot starts at EL3), and on virt with every frame above 4 GiB (`dma-above-4g`).
///
/// edu completes a DMA on a 100 ms timer: should the machine be so loaded that the next boot reaches the scenario
/// after it fired (with bus mastering still off), the run shows nothing, says so, and is run again (at most
/// twice more) with no other QEMU of this test process running beside it. A DMA that landed at PA = X fails at once.
#[test]
fn a_dma_in_flight_across_a_warm_reset_never_lands_at_pa_equal_iova() {
    let scenario = ["lu-dma-across-reset"];
    let mut above_4g = Run::new(Board::QemuVirt, Stage::Nested, &scenario);
    above_4g.memory = "8G".into();
    above_4g.settings.push(("dma-above-4g".into(), "on".into()));
    for r in [
        Run::new(Board::QemuVirt, Stage::Nested, &scenario),
        Run::new(Board::SbsaRef, Stage::Nested, &scenario),
        above_4g,
    ] {
        let mut outcome = r.boot();
        for _ in 0..2 {
            if !outcome.console.contains("nothing shown") {
                break;
            }
            outcome = r.boot_alone();
        }
        outcome.assert_passed(&scenario);
        outcome.assert_console_shows(&[
            "SMMU: incoming DMA aborts before PCI enumeration (GBPA.ABORT 1, SMMUEN 0)",
            "a DMA to IOVA",
            "resetting through PSCI SYSTEM_RESET",
            "still in flight; it aborted: PA = IOVA",
        ]);
    }
}

/// `lu-scale`: 1,024 preserved domains, each with a stream of its own spread across the StreamID space, and edu in
/// the first, DMA-ing before and after a warm reset, with 255 more streams (257 in one domain); the next image restores them all with every table walked
/// (and prints how long), retrieves a sample, and finish frees the rest. Virt (nested) and sbsa-ref.
#[test]
fn lu_scale_on_virt_and_sbsa_ref() {
    for board in [Board::QemuVirt, Board::SbsaRef] {
        let outcome = run(board, Stage::Nested, &["lu-scale"]);
        assert_reset_and_restored(&outcome, &["lu-scale"]);
        outcome.assert_console_shows(&[
            "domains preserved, each with a stream of its own across 16 StreamID bits (edu's and 255 more in the first: 257 streams in one domain)",
            "restored 1024 domain(s) and 1280 stream(s), every table walked, in",
            "28 domains retrieved and checked",
            "finish freed the other 996",
        ]);
    }
}

/// `lu-scale-noreset`: the same 1,024 domains through a running hand-off (the SMMU translating across the jump into
/// the next image, edu's DMA in flight across it); the next image adopts the SMMU, restores every domain, retrieves
/// a sample, and finish frees the rest. Virt (nested) and sbsa-ref.
#[test]
fn lu_scale_across_a_running_hand_off_on_virt_and_sbsa_ref() {
    for board in [Board::QemuVirt, Board::SbsaRef] {
        let outcome = run(board, Stage::Nested, &["lu-scale-noreset"]);
        outcome.assert_passed(&["lu-scale-noreset"]);
        outcome.assert_console_shows(&[
            "domains preserved with the SMMU running, each with a stream of its own across 12 StreamID bits (edu's, a DMA in flight, and 255 more in the first: 257 streams in one domain)",
            "new image: SMMU adopted translating; restored 1024 domain(s) and 1280 stream(s), every table walked, in",
            "28 domains retrieved and checked (both of edu's DMAs landed); finish freed the other 996",
        ]);
    }
}

/// `lu-big`: one stage-2 domain of 3 GiB of IOVA in 4 KiB pages (6 MiB of tables, frame by frame from a region the
/// board sizes from its RAM: a 32nd of the 4 GiB the machine gets), edu's stream through it, across a warm reset; the
/// next image restores it with every table walked and DMAs through it again, into the last 2 MiB, the only ones
/// mapped onto their own window (a walk through any other level-3 table lands elsewhere: mapping them onto the
/// common window fails the scenario). Virt (nested) and sbsa-ref.
#[test]
fn lu_big_on_virt_and_sbsa_ref() {
    for board in [Board::QemuVirt, Board::SbsaRef] {
        let mut r = Run::new(board, Stage::Nested, &["lu-big"]);
        r.memory = "4G".into();
        let outcome = r.boot();
        assert_reset_and_restored(&outcome, &["lu-big"]);
        outcome.assert_console_shows(&[
            "(134217728 bytes at the top of the image's RAM bank)",
            "maps 3072 MiB of IOVA in 4 KiB pages (1540 tables",
            "1540 tables verified and adopted",
        ]);
    }
}
