//! A second real DMA master: QEMU's `virtio-blk-pci` with `iommu_platform=on`, driven by virtio-drivers through a
//! domain in `virtio-dma`, on every SMMU flavour of virt and on sbsa-ref. The device reads a sector the host wrote,
//! writes a pattern that the host finds in the image afterwards, and faults (only) where the scenario unmaps its
//! DMA arena on purpose. QEMU's trace is the witness: no C_BAD_STE, no C_BAD_CD, no command error, and the only
//! events are the translation faults of the virtio stream.

use smmuv3_harness::{Board, Outcome, Run, Stage, VirtioDisk};

fn run(board: Board, stage: Stage) -> (Outcome, VirtioDisk) {
    let disk = VirtioDisk::create(&format!("{}-{}", board.name(), stage.name()));
    let mut run = Run::new(board, stage, &["virtio-dma"]);
    run.virtio_disk = Some(disk.path.clone());
    (run.boot(), disk)
}

fn virtio_dma(board: Board, stage: Stage, kind: &str) {
    let (outcome, disk) = run(board, stage);
    let sid = board.virtio_stream_id();
    let provoked = format!("SMMU_EVT_F_TRANSLATION sid={sid:#x}");
    outcome.assert_passed_provoking(&["virtio-dma"], |e| e == provoked, 0);
    let bdf = format!("00:{:02x}.0", board.virtio_device());
    outcome.assert_console_shows(&[
        &format!("virtio-blk {bdf}: StreamID {sid:#x}, {kind} domain"),
        "IOVA 0x1000000..0x1020000 -> PA 0x",
        &format!(
            "sector {} from the host verified; {} sectors written at {}, {} read back, verified",
            VirtioDisk::HOST_SECTOR,
            VirtioDisk::WRITE_COUNT,
            VirtioDisk::WRITE_SECTOR,
            VirtioDisk::WRITE_COUNT
        ),
        "the next request never completed; the domain reported",
        "domain detached and freed; its handle is stale",
    ]);
    assert!(
        !outcome.smmu_events().is_empty(),
        "the provoked faults reached QEMU's trace\n{}",
        outcome.report()
    );
    assert!(
        disk.holds_written_pattern(),
        "the image holds the firmware's pattern in sectors {}..{}\n{}",
        VirtioDisk::WRITE_SECTOR,
        VirtioDisk::WRITE_SECTOR + VirtioDisk::WRITE_COUNT,
        outcome.report()
    );
}

#[test]
fn virtio_dma_through_a_stage_1_domain() {
    virtio_dma(Board::QemuVirt, Stage::One, "stage 1");
}

#[test]
fn virtio_dma_through_a_stage_2_domain() {
    virtio_dma(Board::QemuVirt, Stage::Two, "stage 2");
}

#[test]
fn virtio_dma_on_a_nested_smmu_uses_stage_1() {
    virtio_dma(Board::QemuVirt, Stage::Nested, "stage 1");
}

#[test]
fn virtio_dma_on_sbsa_ref() {
    virtio_dma(Board::SbsaRef, Stage::Nested, "stage 1");
}

/// edu and the virtio disk side by side: the edu scenarios are unaffected by the second device.
#[test]
fn virtio_dma_beside_edu_scenarios() {
    let disk = VirtioDisk::create("beside-edu");
    let scenarios = ["edu-ident", "bypass", "virtio-dma", "pgtable-dma"];
    let mut run = Run::new(Board::QemuVirt, Stage::Nested, &scenarios);
    run.virtio_disk = Some(disk.path.clone());
    let outcome = run.boot();
    let edu = Board::QemuVirt.edu_stream_id();
    let virtio = Board::QemuVirt.virtio_stream_id();
    let provoked = |e: &str| {
        e == format!("SMMU_EVT_F_TRANSLATION sid={virtio:#x}")
            || e == format!("SMMU_EVT_F_TRANSLATION sid={edu:#x}")
            || e == format!("SMMU_EVT_F_PERMISSION sid={edu:#x}")
    };
    outcome.assert_passed_provoking(&scenarios, provoked, 0);
}
