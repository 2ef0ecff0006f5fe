//! Golden handover regions: the bytes a version of the driver left for the next image, committed under
//! `tests/data/handover/`, restored by this image. They are how a newer image proves it still reads what an older
//! one wrote (`docs/handover.md`, "Compatibility").
//!
//! A golden file holds the whole handover region of a host live update (its metadata and every arena page that
//! is not zero: the records and the preserved page tables) in a small container:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 16 | magic `SMMUV3-GOLDEN\0\0\0` |
//! | 16 | 4 | container version (1), little-endian like every field |
//! | 20 | 4 | the region format version the image wrote (informative: the region's own header is authoritative) |
//! | 24 | 8 | the region's base (physical address) |
//! | 32 | 8 | the region's length |
//! | 40 | 4 | number of pages that follow |
//! | 44 | 4 | zero |
//! | 48 | n * (8 + 4096) | each page: its offset in the region, then its 4096 bytes |
//!
//! `v2-first-image.region` is the first image of [`super::tests`]' live update (a stage-1 domain, a stage-2
//! parent with a nested domain, one preserved and unpreserved, one never retrieved), written by the format-2
//! driver (`cargo test -p smmuv3 --lib write_golden_regions -- --ignored` regenerates it, which a newer format
//! must never do: the file is what an old image wrote).

extern crate std;

use crate::mem::Iova;
use std::vec::Vec;

use super::tests::{ANYWHERE, BASE, RW, Region, boot, first_image};
use super::*;
use crate::hw::ste::Config;
use crate::smmu::tests::{Model, frames};

const MAGIC: &[u8; 16] = b"SMMUV3-GOLDEN\0\0\0";
const CONTAINER_VERSION: u32 = 1;
const PAGE: usize = 4096;
const HEADER: usize = 48;

/// The golden file of the format-2 driver.
const V2_FIRST_IMAGE: &[u8] = include_bytes!("../../../tests/data/handover/v2-first-image.region");

/// The region's bytes as a container (see the module documentation).
fn pack(region: &Region, format_version: u32) -> Vec<u8> {
    // SAFETY: the region's memory is a leaked block of `extent.len` bytes, read while nothing writes it.
    let bytes = unsafe { core::slice::from_raw_parts(region.memory.as_ptr().cast::<u8>(), region.extent.len as usize) };
    let pages: Vec<usize> = (0..bytes.len() / PAGE)
        .filter(|&p| bytes[p * PAGE..(p + 1) * PAGE].iter().any(|&b| b != 0))
        .collect();
    let mut out = Vec::with_capacity(HEADER + pages.len() * (8 + PAGE));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&CONTAINER_VERSION.to_le_bytes());
    out.extend_from_slice(&format_version.to_le_bytes());
    out.extend_from_slice(&region.extent.base.to_le_bytes());
    out.extend_from_slice(&region.extent.len.to_le_bytes());
    out.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for p in pages {
        out.extend_from_slice(&((p * PAGE) as u64).to_le_bytes());
        out.extend_from_slice(&bytes[p * PAGE..(p + 1) * PAGE]);
    }
    out
}

/// A region as the golden file left it: a fresh region of this image's size at the file's base, with the file's
/// pages in place. Panics on a malformed container (a test's own data).
fn unpack(file: &[u8]) -> (Region, u32) {
    let word = |at: usize| u32::from_le_bytes(file[at..at + 4].try_into().unwrap());
    let long = |at: usize| u64::from_le_bytes(file[at..at + 8].try_into().unwrap());
    assert_eq!(&file[..16], MAGIC, "not a golden region");
    assert_eq!(word(16), CONTAINER_VERSION);
    let (format_version, base, len, pages) = (word(20), long(24), long(32), word(40) as usize);
    assert_eq!(file.len(), HEADER + pages * (8 + PAGE), "truncated");
    let region = Region::new();
    assert_eq!(
        region.extent.base, base,
        "the tests' region base moved: the golden file names {base:#x}"
    );
    assert!(
        region.extent.len >= len,
        "this image's region is smaller than the golden one"
    );
    // SAFETY: the region's memory is a leaked block of `extent.len` bytes that nothing else uses yet.
    let bytes =
        unsafe { core::slice::from_raw_parts_mut(region.memory.as_mut_ptr().cast::<u8>(), region.extent.len as usize) };
    for p in 0..pages {
        let at = HEADER + p * (8 + PAGE);
        let offset = long(at) as usize;
        bytes[offset..offset + PAGE].copy_from_slice(&file[at + 8..at + 8 + PAGE]);
    }
    (region, format_version)
}

/// Regenerates the golden files from this driver. Run by hand, and only by the version that owns the file.
#[test]
#[ignore = "writes tests/data/handover/: run by hand by the format version that owns the file"]
fn write_golden_regions() {
    let frames = frames();
    let mut region = Region::new();
    first_image(&mut region, frames);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/handover/v2-first-image.region");
    std::fs::write(path, pack(&region, 2)).unwrap();
}

/// The container round-trips: what `unpack` lays out is what `pack` read.
#[test]
fn a_golden_container_round_trips() {
    let (region, version) = unpack(V2_FIRST_IMAGE);
    assert_eq!(version, 2);
    assert_eq!(pack(&region, 2), V2_FIRST_IMAGE);
}

/// The format-2 driver's region comes back whole in this image: the same domains by token, the same
/// translations, the same stream configurations, the same report.
#[test]
fn a_region_the_format_2_driver_wrote_is_restored() {
    let frames = frames();
    let (region, _) = unpack(V2_FIRST_IMAGE);
    let mut region = region;
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let report = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
    assert_eq!((report.generation, report.domains, report.streams), (7, 4, 3));
    let s1 = smmu.retrieve(0x51).unwrap();
    for (iova, pa) in [
        (0x1000, Some(0x8000_0000)),
        (0x2000, None),
        (0x3000, Some(0x8000_3000)),
        (0x4000_0000, Some(0x9000_0000)),
        (0x401f_f000, Some(0x901f_f000)),
    ] {
        assert_eq!(smmu.iova_to_phys(s1, Iova(iova)), Ok(pa.map(PhysAddr)), "{iova:#x}");
    }
    let parent = smmu.retrieve(0x52).unwrap();
    assert_eq!(
        smmu.iova_to_phys(parent, Iova(0x4123_4000)),
        Ok(Some(PhysAddr(0x4123_4000)))
    );
    let nested = smmu.retrieve(0x53).unwrap();
    assert_eq!(smmu.retrieve(0x54), Err(DomainError::UnknownToken(0x54)));
    for (sid, config) in [(0x10, Config::Stage1), (0x18, Config::Nested), (0x20, Config::Stage2)] {
        assert_eq!(smmu.low_level().ste(sid).unwrap().config(), config, "{sid:#x}");
    }
    assert_eq!(smmu.low_level().ste(0x18).unwrap().cd_table(), PhysAddr(0x4800_0000));
    assert_eq!(smmu.attached(nested).as_deref(), Ok(&[(0x18, 0)][..]));
    // Usable as any domain: a new mapping, then the hand-off finished (the unclaimed domain's stream aborts).
    smmu.map(s1, Iova(0x5000), PhysAddr(0x8000_5000), 0x1000, RW).unwrap();
    assert_eq!(smmu.finish_handover(pool, BASE), Ok(FinishReport { unclaimed: 1 }));
    assert_eq!(smmu.low_level().ste(0x20).unwrap().config(), Config::Abort);
}

/// An image whose board chose a larger metadata area (for more records) still restores what the format-2 driver
/// wrote with 64 KiB: the pool keeps the split the region's header records for this boot.
#[test]
fn a_larger_metadata_area_keeps_the_split_an_older_region_was_written_with() {
    let frames = frames();
    let (region, _) = unpack(V2_FIRST_IMAGE);
    let mut region = region;
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool_with(256 << 10);
    assert_eq!(pool.metadata_extent().unwrap().len, 64 << 10, "the region's own split");
    let report = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
    assert_eq!((report.generation, report.domains, report.streams), (7, 4, 3));
    assert_eq!(
        smmu.iova_to_phys(smmu.retrieve(0x51).unwrap(), Iova(0x1000)),
        Ok(Some(PhysAddr(0x8000_0000)))
    );
}
