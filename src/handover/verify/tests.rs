//! Each test prepares a real hand-off on the host (domains in handover arenas, the SMMU model), then writes
//! into the preserved memory what the next image must catch (as the previous image, or anything with write
//! access to RAM across the reset, could), and restores: the refusal names the record, the address and what
//! is wrong, and nothing is installed (no command at all is issued; no arena, ID or stream is taken).
extern crate std;

use super::*;
use crate::Iova;
use crate::domain::{DomainId, Stage2Options};
use crate::handover::restore::RestoreError;
use crate::handover::restore::tests::{BASE, RW, Region, SURVIVING, boot};
use crate::hw::ste::Config;
use crate::pgtable::Prot;
use crate::smmu::tests::{Model, frames, issued_since};
use crate::testing::HeapFrames;
use crate::{Iommu, Stage1Options};

/// Memory these tests declare DMA-able: 2 GiB from 0x4000_0000.
const DMA: &[Extent] = &[Extent {
    base: 0x4000_0000,
    len: 0x8000_0000,
}];
const S1: u64 = 0xa1;
const S2: u64 = 0xa2;

/// What the first image left, for the tampering.
struct Preserved {
    /// The stage-1 domain's root (48-bit input: levels 0 to 3) and its stream's CD table.
    s1_root: u64,
    cd_table: u64,
    /// The stage-2 domain's root (40-bit input: a level-1 root of two concatenated tables).
    s2_root: u64,
}

/// The first image: a 48-bit stage-1 domain (stream 0x10) mapping two pages at IOVA 0x1000, one at
/// 0x20_0000 and a 2 MiB block at 0x4000_0000; a stage-2 domain (stream 0x20) mapping a page at 0x1000 and a
/// 1 GiB block at 0x4000_0000; both preserved and prepared.
fn first_image(region: &mut Region, frames: &'static HeapFrames) -> Preserved {
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let s1 = smmu
        .create_stage1(
            pool.take_memory().unwrap(),
            Stage1Options {
                input_bits: 48,
                el2: false,
            },
        )
        .unwrap();
    smmu.map(s1, Iova(0x1000), PhysAddr(0x8000_0000), 0x2000, RW).unwrap();
    smmu.map(s1, Iova(0x20_0000), PhysAddr(0x8000_4000), 0x1000, RW)
        .unwrap();
    smmu.map(s1, Iova(0x4000_0000), PhysAddr(0x9000_0000), 0x20_0000, RW)
        .unwrap();
    smmu.attach(s1, 0x10).unwrap();
    let s2 = smmu
        .create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 40 })
        .unwrap();
    smmu.map(s2, Iova(0x1000), PhysAddr(0x8100_0000), 0x1000, RW).unwrap();
    smmu.map(s2, Iova(0x4000_0000), PhysAddr(0x4000_0000), 0x4000_0000, RW)
        .unwrap();
    smmu.attach(s2, 0x20).unwrap();
    smmu.preserve(s1, S1).unwrap();
    smmu.preserve(s2, S2).unwrap();
    smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
    let root = |d: DomainId| smmu.domain_table(d).unwrap().root().0;
    let cd_table = smmu
        .handover_records(BASE, &mut std::vec![0; 1 << 16])
        .unwrap()
        .records
        .first()
        .unwrap()
        .streams
        .first()
        .unwrap()
        .cd_table;
    let preserved = Preserved {
        s1_root: root(s1),
        cd_table,
        s2_root: root(s2),
    };
    core::mem::forget(smmu);
    drop(model);
    preserved
}

fn word(region: &mut Region, phys: u64) -> &mut u64 {
    &mut region.memory[((phys - region.extent.base) / 8) as usize]
}

/// The address of the descriptor at `level` on the walk of `iova` from `root` (starting at `start`).
fn slot(region: &mut Region, root: u64, start: u8, iova: u64, level: u8) -> u64 {
    let mut table = root;
    for l in start..=level {
        let index = (iova >> (12 + 9 * (3 - l))) & if l == start && start == 1 { 1023 } else { 511 };
        let entry = table + 8 * index;
        if l == level {
            return entry;
        }
        table = desc::address(*word(region, entry));
    }
    unreachable!()
}

/// A fresh image restoring with `options` (after `declare` on it): the result, with the image and its model.
fn restore(
    region: &mut Region,
    frames: &'static HeapFrames,
    options: &RestoreOptions<'_>,
    declare: &[Extent],
) -> (Result<u32, RestoreError>, Iommu<&'static HeapFrames>, Model) {
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    for &e in declare {
        smmu.protect_memory(e).unwrap();
    }
    let pool = region.pool();
    let before = model.seen.lock().unwrap().consumed.len();
    let result = smmu.restore_handover(pool, BASE, options).map(|r| r.domains);
    if result.is_err() {
        assert_eq!(
            issued_since(&model, before),
            [],
            "a refusal issues nothing: no STE, no CD"
        );
        assert_eq!(pool.memories_in_use(), 0, "no arena taken");
        assert_eq!((smmu.asids_in_use(), smmu.vmids_in_use()), (0, 0), "no ID taken");
        for sid in [0x10, 0x20] {
            assert!(
                !matches!(
                    smmu.low_level().ste(sid).map(|s| s.config()),
                    Ok(Config::Stage1 | Config::Stage2)
                ),
                "stream {sid:#x} translates nothing"
            );
        }
        assert!(smmu.retrieve(S1).is_err() && smmu.retrieve(S2).is_err());
    }
    (result, smmu, model)
}

/// Prepares, applies `tamper`, restores with full verification against [`DMA`]: the error.
fn refused(tamper: impl FnOnce(&mut Region, &Preserved)) -> RestoreError {
    let frames = frames();
    let mut region = Region::new();
    let preserved = first_image(&mut region, frames);
    tamper(&mut region, &preserved);
    let (result, smmu, _model) = restore(&mut region, frames, &RestoreOptions::new(DMA), &[]);
    core::mem::forget(smmu);
    result.expect_err("the tampered memory must be refused")
}

fn verify_error(e: RestoreError) -> (u64, VerifyFailure) {
    match e {
        RestoreError::Verify { token, what } => (token, what),
        other => panic!("not a verification failure: {other}"),
    }
}

#[test]
fn untouched_preserved_memory_is_verified_and_restored() {
    let frames = frames();
    let mut region = Region::new();
    first_image(&mut region, frames);
    let (result, smmu, _model) = restore(&mut region, frames, &RestoreOptions::new(DMA), &[]);
    assert_eq!(result, Ok(2));
    let s1 = smmu.retrieve(S1).unwrap();
    assert_eq!(
        smmu.iova_to_phys(s1, Iova(0x4010_0000)),
        Ok(Some(PhysAddr(0x9010_0000)))
    );
    assert_eq!(smmu.low_level().ste(0x10).unwrap().config(), Config::Stage1);
    core::mem::forget(smmu);
}

#[test]
fn a_table_outside_its_domains_own_extent_is_refused_before_any_ste_is_written() {
    // The stage-1 domain's level-1 descriptor for IOVA 0x1000 names the stage-2 domain's root: a table shared
    // between two domains.
    let mut at = (0, 0);
    let e = refused(|r, p| {
        let entry = slot(r, p.s1_root, 0, 0x1000, 1);
        *word(r, entry) = (*word(r, entry) & !desc::OUTPUT_ADDRESS) | p.s2_root;
        at = (entry, p.s2_root);
    });
    assert_eq!(
        verify_error(e),
        (
            S1,
            VerifyFailure::TableOutsideExtent {
                entry: at.0,
                table: at.1
            }
        )
    );
    assert!(std::format!("{e}").contains("outside its own extent"), "{e}");
}

#[test]
fn a_table_reached_twice_is_refused() {
    // Two level-0 descriptors naming one level-1 table.
    let mut at = (0, 0);
    let e = refused(|r, p| {
        let d = *word(r, p.s1_root);
        *word(r, p.s1_root + 8 * 5) = d;
        at = (p.s1_root + 8 * 5, desc::address(d));
    });
    assert_eq!(
        verify_error(e),
        (
            S1,
            VerifyFailure::TableReachedTwice {
                entry: at.0,
                table: at.1
            }
        )
    );
    // A cycle: a level-2 descriptor naming the root.
    let e = refused(|r, p| {
        let entry = slot(r, p.s1_root, 0, 0x1000, 2);
        *word(r, entry) = (*word(r, entry) & !desc::OUTPUT_ADDRESS) | p.s1_root;
        at = (entry, p.s1_root);
    });
    assert_eq!(
        verify_error(e),
        (
            S1,
            VerifyFailure::TableReachedTwice {
                entry: at.0,
                table: at.1
            }
        )
    );
    // A level-2 descriptor naming the stream's CD table.
    let e = refused(|r, p| {
        let entry = slot(r, p.s1_root, 0, 0x1000, 2);
        *word(r, entry) = (*word(r, entry) & !desc::OUTPUT_ADDRESS) | p.cd_table;
        at = (entry, p.cd_table);
    });
    assert_eq!(
        verify_error(e),
        (
            S1,
            VerifyFailure::TableReachedTwice {
                entry: at.0,
                table: at.1
            }
        )
    );
}

#[test]
fn descriptors_follow_the_levels_and_the_encodings_this_driver_writes() {
    let bad = |e| match verify_error(e) {
        (S1, VerifyFailure::BadDescriptor { level, what, .. }) => (level, what),
        other => panic!("{other:?}"),
    };
    // A block at level 0 (4 KiB granule: blocks only at levels 1 and 2).
    let e = refused(|r, p| *word(r, p.s1_root) &= !desc::TABLE_OR_PAGE);
    assert_eq!(bad(e), (0, DescriptorDefect::BlockNotAllowed));
    // A reserved level-3 encoding (bits [1:0] = 0b01).
    let e = refused(|r, p| {
        let entry = slot(r, p.s1_root, 0, 0x1000, 3);
        *word(r, entry) &= !desc::TABLE_OR_PAGE;
    });
    assert_eq!(bad(e), (3, DescriptorDefect::ReservedEncoding));
    // The contiguous hint on a page.
    let e = refused(|r, p| {
        let entry = slot(r, p.s1_root, 0, 0x2000, 3);
        *word(r, entry) |= desc::CONTIGUOUS;
    });
    assert_eq!(bad(e), (3, DescriptorDefect::ForbiddenLeafBits));
    // APTable in a table descriptor.
    let e = refused(|r, p| {
        let entry = slot(r, p.s1_root, 0, 0x1000, 2);
        *word(r, entry) |= 1 << 61;
    });
    assert_eq!(bad(e), (2, DescriptorDefect::TableBits));
    // A 2 MiB block whose output has RES0 bits set.
    let e = refused(|r, p| {
        let entry = slot(r, p.s1_root, 0, 0x4000_0000, 2);
        *word(r, entry) |= 0x1000;
    });
    assert_eq!(bad(e), (2, DescriptorDefect::MisalignedBlockOutput));
}

/// The "no tables" bit (58) the driver sets on the descriptor of a table of leaves only (the level-2 table of the
/// stage-1 domain's 2 MiB block) passes; on a table that holds a table descriptor, or on a last-level table, it
/// is refused (a range unmap trusting it would unlink the table without its subtables).
#[test]
fn a_no_tables_bit_must_be_true_of_the_table_it_names() {
    let frames = frames();
    let mut region = Region::new();
    let p = first_image(&mut region, frames);
    let blocks = slot(&mut region, p.s1_root, 0, 0x4000_0000, 1);
    assert_ne!(
        *word(&mut region, blocks) & desc::SW_NO_TABLES,
        0,
        "set by the map of the block"
    );
    let pages = slot(&mut region, p.s1_root, 0, 0x1000, 1);
    assert_eq!(
        *word(&mut region, pages) & desc::SW_NO_TABLES,
        0,
        "its table holds last-level tables"
    );
    let (result, smmu, _model) = restore(&mut region, frames, &RestoreOptions::new(DMA), &[]);
    assert_eq!(result, Ok(2));
    core::mem::forget(smmu);
    for level in [1, 2] {
        let mut entry = 0;
        let e = refused(|r, p| {
            entry = slot(r, p.s1_root, 0, 0x1000, level);
            *word(r, entry) |= desc::SW_NO_TABLES;
        });
        match verify_error(e) {
            (S1, VerifyFailure::SoftwareBits { entry: at, what, .. }) => {
                assert_eq!(at, entry, "level {level}");
                assert_eq!(what, SoftwareBitsDefect::NoTablesBit, "level {level}");
            }
            other => panic!("level {level}: {other:?}"),
        }
    }
}

#[test]
fn live_entry_counts_full_bits_trim_marks_and_totals_must_match_the_walk() {
    // A count one too high.
    let mut entry = 0;
    let e = refused(|r, p| {
        entry = slot(r, p.s1_root, 0, 0x1000, 2);
        *word(r, entry) = desc::with_count(*word(r, entry), 3);
    });
    assert_eq!(
        verify_error(e),
        (
            S1,
            VerifyFailure::CountMismatch {
                entry,
                recorded: 3,
                walked: 2
            }
        )
    );
    // The full bit on a table of two pages.
    let e = refused(|r, p| {
        entry = slot(r, p.s1_root, 0, 0x1000, 2);
        *word(r, entry) |= desc::SW_TABLE_FULL;
    });
    assert!(matches!(
        verify_error(e),
        (S1, VerifyFailure::SoftwareBits { entry: at, what: SoftwareBitsDefect::FullBit, .. }) if at == entry
    ));
    // A last-level table emptied behind the counts' back, its count made to agree, its trim mark missing.
    let e = refused(|r, p| {
        for iova in [0x1000, 0x2000] {
            let leaf = slot(r, p.s1_root, 0, iova, 3);
            *word(r, leaf) = 0;
        }
        entry = slot(r, p.s1_root, 0, 0x1000, 2);
        *word(r, entry) = desc::with_count(*word(r, entry), 0);
    });
    assert!(matches!(
        verify_error(e),
        (S1, VerifyFailure::SoftwareBits { entry: at, what: SoftwareBitsDefect::MissingTrimMark, .. }) if at == entry
    ));
    // A whole subtree unlinked from the root (which carries no count of its own): the recorded total differs.
    let e = refused(|r, p| *word(r, p.s1_root) = 0);
    assert_eq!(
        verify_error(e),
        (
            S1,
            VerifyFailure::TableTotals {
                what: TableTotal::Tables,
                recorded: 6,
                walked: 1
            }
        )
    );
}

#[test]
fn a_leaf_outside_dma_memory_or_inside_protected_memory_is_refused() {
    // A page mapping the domain's own root (inside the handover region): the device could rewrite its tables.
    let mut at = (0, 0);
    let e = refused(|r, p| {
        at.0 = slot(r, p.s1_root, 0, 0x1000, 3);
        at.1 = p.s1_root;
        *word(r, at.0) = (*word(r, at.0) & !desc::OUTPUT_ADDRESS) | p.s1_root;
    });
    match verify_error(e) {
        (
            S1,
            VerifyFailure::OutputProtected {
                entry,
                output,
                size: 0x1000,
                protected,
            },
        ) => {
            assert_eq!((entry, output), at);
            assert!(protected.contains(at.1, 0x1000), "the region");
        }
        other => panic!("{other:?}"),
    }
    // A page outside the declared DMA-able memory.
    let e = refused(|r, p| {
        at.0 = slot(r, p.s1_root, 0, 0x20_0000, 3);
        *word(r, at.0) = (*word(r, at.0) & !desc::OUTPUT_ADDRESS) | 0x1_0000_0000;
    });
    assert_eq!(
        verify_error(e),
        (
            S1,
            VerifyFailure::OutputOutsideDmaMemory {
                entry: at.0,
                output: 0x1_0000_0000,
                size: 0x1000
            }
        )
    );
    // The stage-2 domain's 1 GiB block moved past the end of the DMA-able memory.
    let e = refused(|r, p| {
        at.0 = slot(r, p.s2_root, 1, 0x4000_0000, 1);
        *word(r, at.0) = (*word(r, at.0) & !desc::OUTPUT_ADDRESS) | 0xc000_0000;
    });
    assert_eq!(
        verify_error(e),
        (
            S2,
            VerifyFailure::OutputOutsideDmaMemory {
                entry: at.0,
                output: 0xc000_0000,
                size: 0x4000_0000
            }
        )
    );
    // Memory this image declared protected (its own frames, say), untouched memory otherwise.
    let frames = frames();
    let mut region = Region::new();
    first_image(&mut region, frames);
    let mine = Extent {
        base: 0x8100_0000,
        len: 0x1000,
    };
    let (result, smmu, _model) = restore(&mut region, frames, &RestoreOptions::new(DMA), &[mine]);
    assert!(
        matches!(result, Err(RestoreError::Verify { token: S2, what: VerifyFailure::OutputProtected { output: 0x8100_0000, protected, .. } }) if protected == mine),
        "{result:?}"
    );
    core::mem::forget(smmu);
}

#[test]
fn an_adopted_cd_that_is_not_the_one_the_driver_builds_is_refused() {
    // T0SZ, TG0, EPD0, EPD1 (a TTB1 walk), V, IPS, the ASID, TTB0, MAIR, a reserved word.
    for (word_index, bits) in [
        (0, 0x1),
        (0, 0b10 << 6),
        (0, 1 << 14),
        (0, 1 << 30),
        (0, 1 << 31),
        (0, 1 << 33),
        (0, 1 << 48),
        (1, 0x1000),
        (3, 0xff << 24),
        (5, 1),
    ] {
        let mut cd = 0;
        let e = refused(|r, p| {
            cd = p.cd_table;
            *word(r, p.cd_table + 8 * word_index as u64) ^= bits;
        });
        match verify_error(e) {
            (
                S1,
                VerifyFailure::CdMismatch {
                    sid: 0x10,
                    ssid: 0,
                    cd: at,
                    word,
                    found,
                    expected,
                },
            ) => {
                assert_eq!((at, word), (cd, word_index));
                assert_eq!(found ^ expected, bits);
            }
            other => panic!("word {word_index} bits {bits:#x}: {other:?}"),
        }
    }
}

#[test]
fn a_trusted_restore_skips_the_table_walk_but_still_compares_the_cds() {
    let trusted = RestoreOptions {
        dma_memory: DMA,
        verify: Verification::TrustRecordedTables,
    };
    // A leaf into the region: accepted unread (the documented risk of trusting the tables).
    let frames = frames();
    let mut region = Region::new();
    let p = first_image(&mut region, frames);
    let leaf = slot(&mut region, p.s1_root, 0, 0x20_0000, 3);
    *word(&mut region, leaf) = (*word(&mut region, leaf) & !desc::OUTPUT_ADDRESS) | p.s1_root;
    let (result, smmu, _model) = restore(&mut region, frames, &trusted, &[]);
    assert_eq!(result, Ok(2));
    core::mem::forget(smmu);
    // A CD changed: refused all the same.
    let mut region = Region::new();
    let p = first_image(&mut region, frames);
    *word(&mut region, p.cd_table + 8) ^= 0x1000;
    let (result, smmu, _model) = restore(&mut region, frames, &trusted, &[]);
    assert!(
        matches!(
            result,
            Err(RestoreError::Verify {
                token: S1,
                what: VerifyFailure::CdMismatch { word: 1, .. }
            })
        ),
        "{result:?}"
    );
    core::mem::forget(smmu);
}

#[test]
fn a_restore_declares_the_region_protected_memory() {
    let frames = frames();
    let mut region = Region::new();
    first_image(&mut region, frames);
    let (result, smmu, _model) = restore(&mut region, frames, &RestoreOptions::new(DMA), &[]);
    assert_eq!(result, Ok(2));
    let d = smmu.retrieve(S1).unwrap();
    let inside = region.extent.base + 0x10_0000;
    assert!(matches!(
        smmu.map(d, Iova(0x8000_0000), PhysAddr(inside), 0x1000, Prot::READ),
        Err(crate::DomainError::ProtectedOutput { protected, .. }) if protected == region.extent
    ));
    assert_eq!(smmu.protected_memory(), [region.extent]);
    core::mem::forget(smmu);
}

#[test]
fn no_unused_stream_slot_is_taken_as_stream_id_0() {
    // The records name one stream each; the region's unused slots are zero, which would read as StreamID 0.
    let frames = frames();
    let mut region = Region::new();
    first_image(&mut region, frames);
    let decoded = {
        let pool = region.pool();
        let bytes = pool.lock_metadata().unwrap();
        crate::handover::format::sample::owned(
            &crate::handover::format::sample::decode(&bytes, pool.pool().unwrap()).unwrap(),
        )
    };
    let streams: std::vec::Vec<u32> = decoded[0]
        .records
        .iter()
        .flat_map(|r| r.streams.iter().map(|s| s.sid))
        .collect();
    assert_eq!(streams, [0x10, 0x20]);
    let (result, smmu, _model) = restore(&mut region, frames, &RestoreOptions::new(DMA), &[]);
    assert_eq!(result, Ok(2));
    assert_ne!(smmu.low_level().ste(0).map(|s| s.config()), Ok(Config::Stage1));
    assert_ne!(smmu.low_level().ste(0).map(|s| s.config()), Ok(Config::Stage2));
    core::mem::forget(smmu);
}

#[test]
fn a_nested_guest_context_no_ste_can_hold_is_refused_before_the_rebuild() {
    // A stage-2 parent and a nested domain (stream 0x18) preserved; the nested record's guest CD table IPA then
    // set beyond S1ContextPtr's 52 bits, or its S1CDMax beyond the SMMU's SubstreamID bits (the fake's are fewer
    // than the 20 a record may carry), the CRC fixed: the records validate, but no STE can hold it.
    for (edit, what, value) in [
        (0, GuestContextLimit::CdTableIpaBeyondContextPtr, 1u64 << 52),
        (8, GuestContextLimit::CdMaxBeyondSsidBits, 20),
    ] {
        let frames = frames();
        let mut region = Region::new();
        {
            let model = Model::start(frames);
            let smmu = boot(&model, frames);
            assert!(smmu.features().ssid_bits < 20);
            let pool = region.pool();
            let parent = smmu
                .create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 40 })
                .unwrap();
            smmu.map(parent, Iova(0x4000_0000), PhysAddr(0x4000_0000), 0x20_0000, RW)
                .unwrap();
            let guest = crate::domain::GuestStage1 {
                cd_table: 0x4800_0000,
                cd_max_log2: 0,
                layout: crate::hw::ste::CdTableLayout::Linear,
                default_substream: crate::hw::ste::DefaultSubstream::Terminate,
            };
            let nested = smmu.create_nested(parent, guest).unwrap();
            smmu.attach(nested, 0x18).unwrap();
            smmu.preserve(parent, S2).unwrap();
            smmu.preserve(nested, S1).unwrap();
            smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
            core::mem::forget(smmu);
        }
        {
            let pool = region.pool();
            let mut bytes = pool.lock_metadata().unwrap();
            // Header 96 bytes, one identity of 64, the parent's record (a 72-byte head, its streams of 24 bytes
            // and extents of 16, as many as the head's counts at 64 and 68 say), then the nested record's guest
            // context at offset 48: its IPA (8 bytes), then its S1CDMax (1 byte).
            let parent = 96 + 64;
            let count = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let guest = parent + 72 + 24 * count(parent + 64) + 16 * count(parent + 68) + 48;
            assert_eq!(bytes[guest..guest + 8], 0x4800_0000u64.to_le_bytes());
            assert_eq!(bytes[guest + 8], 0);
            if edit == 0 {
                bytes[guest..guest + 8].copy_from_slice(&value.to_le_bytes());
            } else {
                bytes[guest + edit] = value as u8;
            }
            crate::handover::format::sample::reseal(&mut bytes);
        }
        let (result, smmu, _model) = restore(&mut region, frames, &RestoreOptions::new(DMA), &[]);
        // Forgotten before the assertion: a failing one must not drop the driver over the region it adopted.
        core::mem::forget(smmu);
        assert_eq!(
            result,
            Err(RestoreError::Verify {
                token: S1,
                what: VerifyFailure::GuestContext { what, value }
            }),
            "{what}"
        );
    }
}

#[test]
fn prepare_refuses_a_preserved_domain_mapping_memory_that_does_not_survive_or_is_protected() {
    use crate::handover::restore::PrepareError;
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let surviving = [Extent {
        base: 0x8000_0000,
        len: 0x100_0000,
    }];
    let d = smmu
        .create_stage1(pool.take_memory().unwrap(), Stage1Options::default())
        .unwrap();
    smmu.map(d, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    // The image's own RAM, which the next image reuses.
    smmu.map(d, Iova(0x2000), PhysAddr(0x4020_0000), 0x1000, RW).unwrap();
    smmu.preserve(d, S1).unwrap();
    assert_eq!(
        smmu.prepare_handover(pool, BASE, 1, &surviving),
        Err(PrepareError::NotSurviving {
            token: S1,
            iova: 0x2000,
            output: 0x4020_0000,
            size: 0x1000
        })
    );
    assert!(pool.lock_metadata().unwrap().iter().all(|&b| b == 0), "nothing written");
    // Not frozen: the domain changes, and then it is prepared.
    smmu.unmap(d, Iova(0x2000), 0x1000).unwrap();
    // The region itself (its own tables), mapped before anything declared it: refused too.
    smmu.map(d, Iova(0x3000), PhysAddr(region.extent.base + 0x1_0000), 0x1000, RW)
        .unwrap();
    assert!(matches!(
        smmu.prepare_handover(pool, BASE, 1, &surviving),
        Err(PrepareError::ProtectedOutput { token: S1, iova: 0x3000, protected, .. }) if protected == region.extent
    ));
    smmu.unmap(d, Iova(0x3000), 0x1000).unwrap();
    // Memory declared protected after it was mapped.
    let mine = Extent {
        base: 0x8000_0000,
        len: 0x1000,
    };
    smmu.protect_memory(mine).unwrap();
    assert!(matches!(
        smmu.prepare_handover(pool, BASE, 1, &surviving),
        Err(PrepareError::ProtectedOutput { protected, output: 0x8000_0000, .. }) if protected == mine
    ));
    smmu.unmap(d, Iova(0x1000), 0x1000).unwrap();
    smmu.map(d, Iova(0x1000), PhysAddr(0x8000_1000), 0x1000, RW).unwrap();
    assert!(smmu.prepare_handover(pool, BASE, 1, &surviving).is_ok());
    core::mem::forget(smmu);
}

/// The IOVA of page `p`: spread over 4 level-1 entries and 2 last-level tables under each.
fn iova(p: u64) -> u64 {
    ((p % 4) << 30) | ((p / 4 % 2) << 21) | ((p / 8) << 12)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]

    /// No false refusal: whatever history of maps, unmaps (single-page and range) and trims the driver wrote,
    /// verification accepts its tables, counts, full bits and trim marks, and the same translations come back.
    /// Ops are `(kind, page, pages)`: 0 map, 1 single-page unmap (emptied tables stay, marked), 2 range unmap,
    /// 3 trim.
    #[test]
    fn every_table_history_the_driver_writes_passes_verification(
        ops in proptest::collection::vec((0u8..4, 0u64..1200, 1u64..6), 1..80)
    ) {
        let frames = frames();
        let mut region = Region::new();
        let mut expected = std::collections::BTreeMap::new();
        {
            let model = Model::start(frames);
            let smmu = boot(&model, frames);
            let pool = region.pool();
            let d = smmu.create_stage1(pool.take_memory().unwrap(), Stage1Options::default()).unwrap();
            for &(kind, p, n) in &ops {
                let n = if kind == 1 { 1 } else { n.min(192 - p / 8) };
                match kind {
                    0 => {
                        if smmu.map(d, Iova(iova(p)), PhysAddr(0x8000_0000 + (p << 12)), n << 12, RW).is_ok() {
                            for k in 0..n {
                                expected.insert(iova(p) + (k << 12), 0x8000_0000 + ((p + k) << 12));
                            }
                        }
                    }
                    1 | 2 => {
                        smmu.unmap(d, Iova(iova(p)), n << 12).unwrap();
                        for k in 0..n {
                            expected.remove(&(iova(p) + (k << 12)));
                        }
                    }
                    _ => {
                        smmu.trim_domain(d).unwrap();
                    }
                }
            }
            smmu.attach(d, 0x10).unwrap();
            smmu.preserve(d, S1).unwrap();
            smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
            core::mem::forget(smmu);
        }
        let (result, smmu, _model) = restore(&mut region, frames, &RestoreOptions::new(SURVIVING), &[]);
        proptest::prop_assert_eq!(result, Ok(1));
        let d = smmu.retrieve(S1).unwrap();
        for (&i, &pa) in &expected {
            proptest::prop_assert_eq!(smmu.iova_to_phys(d, Iova(i)), Ok(Some(PhysAddr(pa))));
        }
        core::mem::forget(smmu);
    }
}

/// Replaces the one occurrence of `old` (as a little-endian u64 at an 8-byte aligned offset) in the region's
/// records by `new` and fixes the CRC: what anyone who can write the region does.
fn rewrite_record_word(region: &mut Region, old: u64, new: u64) {
    let pool = region.pool();
    let mut bytes = pool.lock_metadata().unwrap();
    let at: std::vec::Vec<usize> = (0..bytes.len() / 8)
        .map(|i| i * 8)
        .filter(|&i| bytes[i..i + 8] == old.to_le_bytes())
        .collect();
    assert_eq!(at.len(), 1, "{old:#x} found once in the records");
    bytes[at[0]..at[0] + 8].copy_from_slice(&new.to_le_bytes());
    assert!(crate::handover::format::sample::reseal(&mut bytes));
}

#[test]
fn review_a_cd_table_not_at_the_start_of_a_frame_is_refused() {
    // The stream's CD copied, word for word, to the last 64 bytes of its own frame, and the record made to
    // name it there (CRC fixed). Decode wants 64-byte alignment only; verification compares the CD (equal) and
    // keeps page tables off its 64 bytes, and nothing else looks at the frame. Accepted, a detach then gives
    // the CD table's block back to the arena, whose free list takes any block up to a frame as a frame: the
    // next table the domain allocates is the misaligned `cd_table`, zeroed across the following frame, and
    // its table descriptor (address bits [47:12]) names the frame below it, so the SMMU walks bytes that
    // nothing verified (in the attack, anything the attacker left there) instead of what the driver writes.
    let frames = frames();
    let mut region = Region::new();
    let p = first_image(&mut region, frames);
    let moved = p.cd_table + 0x1000 - 64;
    for w in 0..8 {
        *word(&mut region, moved + 8 * w) = *word(&mut region, p.cd_table + 8 * w);
    }
    rewrite_record_word(&mut region, p.cd_table, moved);
    let (result, smmu, _model) = restore(&mut region, frames, &RestoreOptions::new(DMA), &[]);
    if result.is_ok() {
        // The consequence, with safe calls only.
        let d = smmu.retrieve(S1).unwrap();
        smmu.detach(0x10).unwrap();
        // IOVA 0x40_0000 needs a new last-level table under the level-2 table of 0x1000.
        smmu.map(d, Iova(0x40_0000), PhysAddr(0x8000_8000), 0x1000, RW).unwrap();
        let driver = smmu.iova_to_phys(d, Iova(0x40_0000));
        // The tables are abandoned as they stand (dropping the driver would walk them).
        core::mem::forget(smmu);
        let at = slot(&mut region, p.s1_root, 0, 0x40_0000, 2);
        let link = *word(&mut region, at);
        let at = slot(&mut region, p.s1_root, 0, 0x40_0000, 3);
        let leaf = *word(&mut region, at);
        panic!(
            "accepted: the map of IOVA 0x40_0000 (to 0x8000_8000) linked a table whose descriptor {link:#x} \
             makes the SMMU walk {:#x} (the frame of the misaligned CD table {moved:#x}), whose entry for the \
             IOVA is {leaf:#x}, not the page mapped (the driver itself now reads {driver:?})",
            desc::address(link)
        );
    }
    assert!(result.is_err(), "{result:?}");
    // Refused as a CD table the driver would not have placed there, before anything is installed.
    assert_eq!(
        result.map_err(verify_error),
        Err((
            S1,
            VerifyFailure::CdTableMisplaced {
                sid: 0x10,
                cd_table: moved
            }
        ))
    );
    core::mem::forget(smmu);
}

#[test]
fn review_two_streams_naming_one_cd_table_are_refused() {
    // A stage-1 domain attached to streams 0x10 and 0x11 (a CD table each), preserved; then the record of
    // stream 0x11 made to name stream 0x10's CD table (CRC fixed). Both CDs compare equal to the domain's, so
    // the restore adopts one CD table twice. A detach of 0x10 then frees it into the arena while stream
    // 0x11's STE still points at it, and the domain's next table is allocated there: the SMMU reads a page
    // table (whose words a guest chooses through its mappings) as stream 0x11's CD.
    let frames = frames();
    let mut region = Region::new();
    let (root, cd_10, cd_11) = {
        let model = Model::start(frames);
        let smmu = boot(&model, frames);
        let pool = region.pool();
        let d = smmu
            .create_stage1(
                pool.take_memory().unwrap(),
                Stage1Options {
                    input_bits: 48,
                    el2: false,
                },
            )
            .unwrap();
        smmu.map(d, Iova(0x1000), PhysAddr(0x8000_0000), 0x2000, RW).unwrap();
        smmu.attach(d, 0x10).unwrap();
        smmu.attach(d, 0x11).unwrap();
        smmu.preserve(d, S1).unwrap();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        let streams: std::vec::Vec<_> = smmu
            .handover_records(BASE, &mut std::vec![0; 1 << 16])
            .unwrap()
            .records
            .first()
            .unwrap()
            .streams
            .iter()
            .collect();
        let cd = |sid| streams.iter().find(|s| s.sid == sid).unwrap().cd_table;
        let root = smmu.domain_table(d).unwrap().root().0;
        let cds = (cd(0x10), cd(0x11));
        core::mem::forget(smmu);
        (root, cds.0, cds.1)
    };
    rewrite_record_word(&mut region, cd_11, cd_10);
    let (result, smmu, _model) = restore(&mut region, frames, &RestoreOptions::new(DMA), &[]);
    if result.is_ok() {
        let d = smmu.retrieve(S1).unwrap();
        assert_eq!(smmu.low_level().ste(0x11).unwrap().cd_table().0, cd_10);
        smmu.detach(0x10).unwrap();
        // IOVA 0x40_0000 needs a new last-level table.
        smmu.map(d, Iova(0x40_0000), PhysAddr(0x8000_8000), 0x1000, RW).unwrap();
        let ste_cd = smmu.low_level().ste(0x11).unwrap().cd_table().0;
        core::mem::forget(smmu);
        let at = slot(&mut region, root, 0, 0x40_0000, 2);
        let table = desc::address(*word(&mut region, at));
        panic!(
            "accepted: after detaching stream 0x10, stream 0x11's STE still names CD table {ste_cd:#x}, now the \
             domain's last-level table {table:#x} (its first entry {:#x} is what the SMMU reads as CD word 0)",
            *word(&mut region, table)
        );
    }
    assert!(result.is_err(), "{result:?}");
    // Refused as a CD table sharing its frame, in every verification mode (see the test below).
    assert_eq!(
        result.map_err(verify_error),
        Err((
            S1,
            VerifyFailure::CdTableOverlap {
                sid: 0x11,
                cd_table: cd_10,
                other: cd_10
            }
        ))
    );
    core::mem::forget(smmu);
}

#[test]
fn review_a_global_leaf_in_an_asid_tagged_stage1_table_is_refused() {
    // The NS-EL1 stage-1 domain's page at IOVA 0x1000 with nG cleared (CRC untouched: only preserved memory
    // changes). Its output is inside the DMA-able memory, so the walk accepts it; but the driver writes nG = 1
    // in every leaf of such a domain, and a global entry matches every ASID: once the SMMU caches it, a DMA
    // at IOVA 0x1000 from any other stage-1 stream (any other ASID, same VMID) translates to this domain's
    // page, and the ASID-wide invalidation that frees the domain (TLBI_NH_ASID) does not remove it.
    let mut leaf = 0;
    let frames = frames();
    let mut region = Region::new();
    let p = first_image(&mut region, frames);
    let at = slot(&mut region, p.s1_root, 0, 0x1000, 3);
    assert_ne!(*word(&mut region, at) & desc::S1_NOT_GLOBAL, 0, "the driver wrote nG");
    *word(&mut region, at) &= !desc::S1_NOT_GLOBAL;
    let (result, smmu, model) = restore(&mut region, frames, &RestoreOptions::new(DMA), &[]);
    if result.is_ok() {
        leaf = *word(&mut region, at);
        let d = smmu.retrieve(S1).unwrap();
        smmu.detach(0x10).unwrap();
        let before = model.seen.lock().unwrap().consumed.len();
        smmu.free_domain(d).unwrap();
        let issued = issued_since(&model, before);
        core::mem::forget(smmu);
        panic!(
            "accepted: the leaf of IOVA 0x1000 is {leaf:#x} (nG = 0, global: it matches every ASID); freeing \
             the domain issued only {issued:?}, which leaves global entries cached"
        );
    }
    assert!(result.is_err(), "{result:?} {leaf:#x}");
    match result.map_err(verify_error) {
        Err((
            S1,
            VerifyFailure::BadDescriptor {
                entry, level: 3, what, ..
            },
        )) => {
            assert_eq!((entry, what), (at, DescriptorDefect::NotADriverLeaf));
        }
        other => panic!("{other:?}"),
    }
    core::mem::forget(smmu);
}

/// Finding 4 beyond nG: every attribute bit of a leaf is what the driver writes for the protection it grants,
/// at every level and stage, whether one leaf of a table differs (the per-leaf check) or every leaf of it does
/// alike (the per-table summary, which must not take a uniform pattern for a good one).
#[test]
fn a_leaf_with_attribute_bits_the_driver_never_writes_is_refused() {
    let cases: [(&str, u64, u8, u64, bool); 9] = [
        // (what, IOVA, level, bits flipped, on every leaf of its table)
        ("stage 1: AF clear", 0x1000, 3, desc::AF, false),
        ("stage 1: PBHA bit 59 on every leaf", 0x1000, 3, 1 << 59, true),
        ("stage 1: nG clear on every leaf", 0x1000, 3, desc::S1_NOT_GLOBAL, true),
        (
            "stage 1: AttrIndx 3 (no MAIR byte the CD sets)",
            0x2000,
            3,
            0b011 << 2,
            false,
        ),
        ("stage 1: NS", 0x20_0000, 3, 1 << 5, false),
        (
            "stage 1: a global 2 MiB block",
            0x4000_0000,
            2,
            desc::S1_NOT_GLOBAL,
            false,
        ),
        ("stage 2: nG's bit (RES0 here)", 0x1000, 3, 1 << 11, false),
        (
            "stage 2: neither read nor write",
            0x1000,
            3,
            desc::S2_AP_READ | desc::S2_AP_WRITE,
            false,
        ),
        (
            "stage 2: a 1 GiB block with a software bit",
            0x4000_0000,
            1,
            1 << 55,
            false,
        ),
    ];
    for (what, iova, level, bits, whole_table) in cases {
        let mut at = 0;
        let stage2 = what.starts_with("stage 2");
        let e = refused(|r, p| {
            let (root, start) = if stage2 { (p.s2_root, 1) } else { (p.s1_root, 0) };
            at = slot(r, root, start, iova, level);
            let entries = if whole_table { 512 } else { 1 };
            let first = if whole_table { at & !0xfff } else { at };
            for k in 0..entries {
                let e = first + 8 * k;
                if desc::is_valid(*word(r, e)) {
                    *word(r, e) ^= bits;
                }
            }
        });
        let token = if stage2 { S2 } else { S1 };
        match verify_error(e) {
            (
                t,
                VerifyFailure::BadDescriptor {
                    entry,
                    level: l,
                    what: why,
                    ..
                },
            ) if t == token => {
                // The first bad leaf of the table is named: the table's first valid one when all changed.
                let expected = if whole_table { at & !0xfff | 8 } else { at };
                assert_eq!(
                    (entry, l, why),
                    (expected, level, DescriptorDefect::NotADriverLeaf),
                    "{what}"
                );
            }
            other => panic!("{what}: {other:?}"),
        }
    }
}

/// Findings 1 and 2 in the trusted mode too: the page tables are taken as recorded, but the CD tables are still
/// placed and kept apart (a CD table named twice, one over the root table, one not starting its frame).
#[test]
fn cd_tables_are_placed_and_kept_apart_in_every_verification_mode() {
    let trusted = RestoreOptions {
        dma_memory: DMA,
        verify: Verification::TrustRecordedTables,
    };
    let frames = frames();
    for case in 0..3 {
        let mut region = Region::new();
        let (root, cd_10, cd_11) = {
            let model = Model::start(frames);
            let smmu = boot(&model, frames);
            let pool = region.pool();
            let d = smmu
                .create_stage1(pool.take_memory().unwrap(), Stage1Options::default())
                .unwrap();
            smmu.map(d, Iova(0x1000), PhysAddr(0x8000_0000), 0x2000, RW).unwrap();
            smmu.attach(d, 0x10).unwrap();
            smmu.attach(d, 0x11).unwrap();
            smmu.preserve(d, S1).unwrap();
            smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
            let streams: std::vec::Vec<_> = smmu
                .handover_records(BASE, &mut std::vec![0; 1 << 16])
                .unwrap()
                .records
                .first()
                .unwrap()
                .streams
                .iter()
                .collect();
            let cd = |sid| streams.iter().find(|s| s.sid == sid).unwrap().cd_table;
            let root = smmu.domain_table(d).unwrap().root().0;
            let cds = (cd(0x10), cd(0x11));
            core::mem::forget(smmu);
            (root, cds.0, cds.1)
        };
        let expected = match case {
            0 => {
                rewrite_record_word(&mut region, cd_11, cd_10);
                VerifyFailure::CdTableOverlap {
                    sid: 0x11,
                    cd_table: cd_10,
                    other: cd_10,
                }
            }
            1 => {
                // The root's CD words copied over the root's first entries would be a CD that compares
                // equal; the frame check refuses it before any CD is read.
                rewrite_record_word(&mut region, cd_11, root);
                VerifyFailure::CdTableOverlap {
                    sid: 0x11,
                    cd_table: root,
                    other: root,
                }
            }
            _ => {
                for w in 0..8 {
                    *word(&mut region, cd_11 + 0x40 + 8 * w) = *word(&mut region, cd_11 + 8 * w);
                }
                rewrite_record_word(&mut region, cd_11, cd_11 + 0x40);
                VerifyFailure::CdTableMisplaced {
                    sid: 0x11,
                    cd_table: cd_11 + 0x40,
                }
            }
        };
        let (result, smmu, _model) = restore(&mut region, frames, &trusted, &[]);
        core::mem::forget(smmu);
        assert_eq!(result.map_err(verify_error), Err((S1, expected)), "case {case}");
    }
}
