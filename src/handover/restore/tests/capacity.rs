//! Capacity at server scale (issue 23): one preserved domain of 1 TiB in 1 GiB and 2 MiB blocks, preserved,
//! restored with every table walked, and translating as before.

use super::*;
use crate::Iova;

const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// 1 TiB of a VM's stage 2: the first half in 1 GiB blocks, the second in 2 MiB blocks (its output 2 MiB off a
/// 1 GiB boundary, so no 1 GiB block fits), preserved in one arena and restored with every table verified.
#[test]
fn a_tib_in_blocks_is_preserved_and_restored_verified() {
    tib_in_blocks(false);
}

/// The same terabyte, its very last 2 MiB block rewritten (after the prepare, its CRC untouched) to reach the
/// handover region: the verified restore walks every table down to it and refuses.
#[test]
fn the_last_block_of_a_tib_is_verified_too() {
    tib_in_blocks(true);
}

fn tib_in_blocks(tamper_last: bool) {
    let frames = frames();
    // 1 TiB in 2 MiB blocks needs 512 level-2 tables for its second half: 2 MiB of tables, plus the root.
    let mut region = Region::with_pool_of(4 << 20);
    let half = TIB / 2;
    {
        let model = Model::start(frames);
        let smmu = boot(&model, frames);
        let pool = region.pool();
        let d = smmu
            .create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 42 })
            .unwrap();
        smmu.map(d, Iova(0), PhysAddr(TIB), half, RW).unwrap();
        smmu.map(d, Iova(half), PhysAddr(TIB + half + (2 << 20)), half, RW)
            .unwrap();
        smmu.attach(d, 0x10).unwrap();
        smmu.preserve(d, 0x7b).unwrap();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        let root = smmu.domain_table(d).unwrap().root().0;
        core::mem::forget(smmu);
        if tamper_last {
            // Stage 2, 4 KiB granule, 42 bits: concatenated level-1 tables at the root, then level 2.
            let last = TIB - (2 << 20);
            let word = |phys: u64| ((phys - region.extent.base) / 8) as usize;
            let l1 = region.memory[word(root + 8 * (last >> 30))];
            let l2 = (l1 & 0x0000_ffff_ffff_f000) + 8 * ((last >> 21) & 511);
            let block = &mut region.memory[word(l2)];
            assert_eq!(*block & 0b11, 0b01, "a block descriptor");
            *block = (*block & !0x0000_ffff_ffe0_0000) | region.extent.base;
        }
    }
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let result = smmu.restore_handover(pool, BASE, &ANYWHERE);
    if tamper_last {
        assert!(
            matches!(result, Err(RestoreError::Verify { token: 0x7b, .. })),
            "{result:?}"
        );
        assert_eq!(pool.memories_in_use(), 0);
        core::mem::forget(smmu);
        return;
    }
    let report = result.unwrap();
    assert_eq!((report.domains, report.streams), (1, 1));
    let d = smmu.retrieve(0x7b).unwrap();
    for iova in [0, GIB + 0x1234, half - 1, half, half + 0x20_1000, TIB - 1] {
        let expected = if iova < half {
            TIB + iova
        } else {
            TIB + iova + (2 << 20)
        };
        assert_eq!(
            smmu.iova_to_phys(d, Iova(iova)),
            Ok(Some(PhysAddr(expected))),
            "IOVA {iova:#x}"
        );
    }
    assert_eq!(smmu.iova_to_phys(d, Iova(TIB)), Ok(None));
    assert_eq!(smmu.low_level().ste(0x10).unwrap().config(), Config::Stage2);
    // Unmapping the whole terabyte after the restore empties the restored tables.
    assert_eq!(smmu.unmap(d, Iova(0), TIB), Ok(TIB));
    assert_eq!(smmu.iova_to_phys(d, Iova(half + 0x20_1000)), Ok(None));
    core::mem::forget(smmu);
}

/// 64 GiB of a VM's RAM in 4 KiB pages (a stage 2 whose output is 4 KiB off every block boundary, so only pages
/// fit): 128 MiB of level-3 tables from a pool of sparse host memory, preserved, restored with every table
/// walked, translating as before.
#[test]
fn sixty_four_gib_in_pages_is_preserved_and_restored_verified() {
    const SIZE: u64 = 64 * GIB;
    let frames = frames();
    // 16 Mi pages: 32 Ki level-3 tables (128 MiB), 64 level-2 tables and the root.
    let mut region = Region::with_pool_of(132 << 20);
    let output = TIB + 0x1000;
    {
        let model = Model::start(frames);
        let smmu = boot(&model, frames);
        let pool = region.pool();
        let d = smmu
            .create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 40 })
            .unwrap();
        smmu.map(d, Iova(0), PhysAddr(output), SIZE, RW).unwrap();
        smmu.attach(d, 0x10).unwrap();
        smmu.preserve(d, 0x64).unwrap();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        core::mem::forget(smmu);
    }
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let report = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
    assert_eq!((report.domains, report.streams), (1, 1));
    let d = smmu.retrieve(0x64).unwrap();
    for iova in [0, 0x1000, GIB + 0x5_3000, SIZE / 2 + 0x7ff, SIZE - 0x1000] {
        assert_eq!(
            smmu.iova_to_phys(d, Iova(iova)),
            Ok(Some(PhysAddr(output + iova))),
            "IOVA {iova:#x}"
        );
    }
    assert_eq!(smmu.iova_to_phys(d, Iova(SIZE)), Ok(None));
    core::mem::forget(smmu);
}

/// More preserved domains than version 2's 16 arenas, of different sizes, grown in turns so that their frames
/// interleave in the pool: each record lists its runs, and each domain comes back translating as before, its
/// frames exactly adopted; those of the one nobody retrieves go back to the pool at finish.
#[test]
fn thirty_two_domains_grown_in_turns_come_back_from_their_runs() {
    const N: u64 = 32;
    let frames = frames();
    let mut region = Region::with_pool_of(8 << 20);
    let output = |i: u64| 0x10_0000_0000 + i * GIB;
    let before = {
        let model = Model::start(frames);
        let smmu: Iommu<&'static HeapFrames, 32> = model
            .smmu()
            .init_with_capacity(frames, &InitOptions::default())
            .unwrap();
        let pool = region.pool();
        let domains: std::vec::Vec<DomainId> = (0..N)
            .map(|_| {
                smmu.create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 40 })
                    .unwrap()
            })
            .collect();
        // Domain i maps i + 1 level-3 tables' worth, one 2 MiB span a round (rounds 0 to i): in each round every
        // domain still growing takes a frame, so their frames interleave.
        for round in 0..N {
            for (i, &d) in domains.iter().enumerate().skip(round as usize) {
                smmu.map(
                    d,
                    Iova(round * (2 << 20)),
                    PhysAddr(output(i as u64) + round * (2 << 20) + 0x1000),
                    2 << 20,
                    RW,
                )
                .unwrap();
            }
        }
        for (i, &d) in domains.iter().enumerate() {
            smmu.attach(d, 0x100 + i as u32).unwrap();
            smmu.preserve(d, 0x1000 + i as u64).unwrap();
        }
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        let runs: std::vec::Vec<usize> = {
            let metadata = pool.lock_metadata().unwrap();
            let decoded = crate::handover::format::sample::decode(&metadata, pool.pool().unwrap()).unwrap();
            decoded.instances[0].records.iter().map(|r| r.extents.len()).collect()
        };
        assert!(
            runs.iter().any(|&n| n > 1),
            "interleaved domains hold several runs: {runs:?}"
        );
        let free = pool.free_frames();
        core::mem::forget(smmu);
        free
    };
    let model = Model::start(frames);
    let smmu: Iommu<&'static HeapFrames, 32> = model
        .smmu()
        .init_with_capacity(frames, &InitOptions::default())
        .unwrap();
    let pool = region.pool();
    assert_eq!(pool.free_frames(), before, "the same frames free, the rest named");
    let report = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
    assert_eq!((report.domains, report.streams), (N as u32, N as u32));
    assert_eq!(pool.free_frames(), before, "exactly the recorded frames adopted");
    for i in 1..N {
        let d = smmu.retrieve(0x1000 + i).unwrap();
        for span in [0, i] {
            let iova = span * (2 << 20) + 0x3000;
            assert_eq!(
                smmu.iova_to_phys(d, Iova(iova)),
                Ok(Some(PhysAddr(output(i) + iova + 0x1000))),
                "domain {i}"
            );
        }
        assert_eq!(smmu.iova_to_phys(d, Iova((i + 1) * (2 << 20))), Ok(None), "domain {i}");
    }
    // Domain 0 is not retrieved: finish frees it, and its frames are the pool's again.
    assert_eq!(smmu.finish_handover(pool, BASE), Ok(FinishReport { unclaimed: 1 }));
    assert!(pool.free_frames() > before);
    assert_eq!(pool.memories_in_use(), N as usize - 1);
    core::mem::forget(smmu);
}

/// A domain whose frames lie far apart in a large pool (another memory took 300 MiB between its first tables and
/// its last): verification tracks the frames it holds, not the span between them, so it is walked and restored
/// (over a span of 256 MiB of 4 KiB granules the bitmap would not reach).
#[test]
fn a_domain_whose_frames_lie_far_apart_is_verified() {
    let frames = frames();
    let mut region = Region::with_pool_of(512 << 20);
    let output = 0x10_0000_0000u64;
    {
        let model = Model::start(frames);
        let smmu = boot(&model, frames);
        let pool = region.pool();
        let memory = pool.take_memory().unwrap();
        let d = smmu.create_stage2(memory, Stage2Options { input_bits: 40 }).unwrap();
        smmu.map(d, Iova(0), PhysAddr(output), 4 << 20, RW).unwrap();
        // Another memory takes 300 MiB right after (not written: for overwrite).
        let other = pool.take_memory().unwrap();
        other.allocate_for_overwrite(300 << 20, 4096).unwrap();
        smmu.map(d, Iova(GIB), PhysAddr(output + GIB), 4 << 20, RW).unwrap();
        let runs: std::vec::Vec<Extent> = memory.runs().collect();
        let span = runs.last().unwrap().base + runs.last().unwrap().len - runs[0].base;
        assert!(span > 256 << 20, "{runs:x?}");
        smmu.attach(d, 0x10).unwrap();
        smmu.preserve(d, 0xfa).unwrap();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        core::mem::forget(smmu);
    }
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let report = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
    assert_eq!(report.domains, 1);
    let d = smmu.retrieve(0xfa).unwrap();
    for iova in [0x1000, (4 << 20) - 0x1000, GIB, GIB + (4 << 20) - 0x1000] {
        assert_eq!(
            smmu.iova_to_phys(d, Iova(iova)),
            Ok(Some(PhysAddr(output + iova))),
            "IOVA {iova:#x}"
        );
    }
    core::mem::forget(smmu);
}

/// Records beyond 64 KiB (32 domains grown in turns, 150 runs each): a board's larger metadata area holds them,
/// the default one refuses them before writing anything, and the next image restores them with a metadata area
/// at least as large (one that cannot hold the recorded split keeps its own, and the restore is refused).
#[test]
fn a_larger_metadata_area_holds_records_beyond_64_kib() {
    const N: u64 = 32;
    const ROUNDS: u64 = 150;
    let frames = frames();
    let mut region = Region::with_pool_of(32 << 20);
    let output = |i: u64| 0x10_0000_0000 + i * GIB;
    {
        let model = Model::start(frames);
        let smmu: Iommu<&'static HeapFrames, 32> = model
            .smmu()
            .init_with_capacity(frames, &InitOptions::default())
            .unwrap();
        let pool = region.pool_with(256 << 10);
        let domains: std::vec::Vec<DomainId> = (0..N)
            .map(|_| {
                smmu.create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 40 })
                    .unwrap()
            })
            .collect();
        for round in 0..ROUNDS {
            for (i, &d) in domains.iter().enumerate() {
                let iova = round * (2 << 20);
                smmu.map(d, Iova(iova), PhysAddr(output(i as u64) + iova + 0x1000), 2 << 20, RW)
                    .unwrap();
            }
        }
        for (i, &d) in domains.iter().enumerate() {
            smmu.attach(d, 0x100 + i as u32).unwrap();
            smmu.preserve(d, 0x1000 + i as u64).unwrap();
        }
        let written = smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        assert!(written > 64 << 10, "{written} bytes of records");
        core::mem::forget(smmu);
    }
    // An image with the default 64 KiB area cannot serve the recorded split: it keeps its own, and the records
    // name another pool.
    {
        let model = Model::start(frames);
        let smmu = boot(&model, frames);
        let pool = region.pool();
        assert_eq!(pool.metadata_extent().unwrap().len, 64 << 10);
        assert!(matches!(
            smmu.restore_handover(pool, BASE, &ANYWHERE),
            Err(RestoreError::Region(_))
        ));
        core::mem::forget(smmu);
    }
    let model = Model::start(frames);
    let smmu: Iommu<&'static HeapFrames, 32> = model
        .smmu()
        .init_with_capacity(frames, &InitOptions::default())
        .unwrap();
    let pool = region.pool_with(256 << 10);
    let report = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
    assert_eq!((report.domains, report.streams), (N as u32, N as u32));
    for i in 0..N {
        let d = smmu.retrieve(0x1000 + i).unwrap();
        let iova = (ROUNDS - 1) * (2 << 20) + 0x5000;
        assert_eq!(
            smmu.iova_to_phys(d, Iova(iova)),
            Ok(Some(PhysAddr(output(i) + iova + 0x1000))),
            "domain {i}"
        );
    }
    core::mem::forget(smmu);
}

/// The default 64 KiB area refuses records that do not fit, before anything is written or sealed.
#[test]
fn records_beyond_the_metadata_area_are_refused_before_anything_is_written() {
    let frames = frames();
    let mut region = Region::with_pool_of(32 << 20);
    let model = Model::start(frames);
    let smmu: Iommu<&'static HeapFrames, 32> = model
        .smmu()
        .init_with_capacity(frames, &InitOptions::default())
        .unwrap();
    let pool = region.pool();
    let domains: std::vec::Vec<DomainId> = (0..32)
        .map(|_| {
            smmu.create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 40 })
                .unwrap()
        })
        .collect();
    for round in 0..150u64 {
        for (i, &d) in domains.iter().enumerate() {
            let iova = round * (2 << 20);
            smmu.map(
                d,
                Iova(iova),
                PhysAddr(0x10_0000_0000 + i as u64 * GIB + iova + 0x1000),
                2 << 20,
                RW,
            )
            .unwrap();
        }
    }
    for (i, &d) in domains.iter().enumerate() {
        smmu.preserve(d, 0x1000 + i as u64).unwrap();
    }
    let error = smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap_err();
    assert!(matches!(error, PrepareError::Format(_)), "{error}");
    assert!(
        pool.lock_metadata().unwrap()[..8].iter().all(|&b| b == 0),
        "nothing written"
    );
    // Nothing sealed: the domains still change.
    smmu.map(domains[0], Iova(1 << 36), PhysAddr(0x10_0000_0000), 0x1000, RW)
        .unwrap();
    core::mem::forget(smmu);
}

/// 4,096 preserved domains (the capacity), each with a stream, the StreamIDs spread across 16 bits (a
/// 2-level stream table's spans allocated as they come): prepared into a 512 KiB metadata area, restored whole,
/// each retrievable by its token and translating as before, its STE installed; the unretrieved ones freed at
/// finish (their streams aborting) with every frame back in the pool.
#[test]
fn four_thousand_and_ninety_six_domains_are_preserved_and_restored() {
    const N: u64 = 4096;
    let frames = frames();
    // Each domain: an 8 KiB root, a level-2 and a level-3 table.
    let mut region = Region::with_pool_of(80 << 20);
    let output = |i: u64| 0x10_0000_0000 + i * (2 << 20);
    let sid = |i: u64| (i * 16 + i % 16) as u32;
    let free = {
        let model = Model::start(frames);
        let smmu: Iommu<&'static HeapFrames, 4096> = model
            .smmu()
            .init_with_capacity(frames, &InitOptions::default())
            .unwrap();
        let pool = region.pool_with(512 << 10);
        let free = pool.free_frames();
        for i in 0..N {
            let d = smmu
                .create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 40 })
                .unwrap();
            smmu.map(d, Iova(0x1000), PhysAddr(output(i)), 0x1000, RW).unwrap();
            smmu.attach(d, sid(i)).unwrap();
            smmu.preserve(d, 0x10_0000 + i).unwrap();
        }
        let written = smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        assert!(written > 64 << 10, "{written} bytes of records");
        core::mem::forget(smmu);
        free
    };
    let model = Model::start(frames);
    let smmu: Iommu<&'static HeapFrames, 4096> = model
        .smmu()
        .init_with_capacity(frames, &InitOptions::default())
        .unwrap();
    let pool = region.pool_with(512 << 10);
    let report = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
    assert_eq!((report.domains, report.streams), (N as u32, N as u32));
    for i in (0..N).step_by(7) {
        let d = smmu.retrieve(0x10_0000 + i).unwrap();
        assert_eq!(
            smmu.iova_to_phys(d, Iova(0x1234)),
            Ok(Some(PhysAddr(output(i) + 0x234))),
            "domain {i}"
        );
        assert_eq!(smmu.attached(d).as_deref(), Ok(&[(sid(i), 0)][..]));
        assert_eq!(
            smmu.low_level().ste(sid(i)).unwrap().config(),
            crate::hw::ste::Config::Stage2
        );
    }
    let retrieved = N.div_ceil(7);
    assert_eq!(
        smmu.finish_handover(pool, BASE),
        Ok(FinishReport {
            unclaimed: (N - retrieved) as u32
        })
    );
    assert_eq!(pool.memories_in_use(), retrieved as usize);
    assert!(pool.free_frames() < free, "the retrieved domains' frames held");
    assert_eq!(
        smmu.low_level().ste(sid(1)).unwrap().config(),
        crate::hw::ste::Config::Abort,
        "unclaimed"
    );
    core::mem::forget(smmu);
}

/// A VM given every function of a device (a physical function and its virtual functions: 300 streams in one
/// stage-2 domain), beside a stage-1 domain with 260 streams, each with a CD table of its own, and substreams of
/// the first: recorded (`handover_records` into a buffer, refused with the bytes it needs when the buffer is too
/// small), prepared, restored with every STE installed and every attachment in the order it was made, the
/// stage-2 domain retrieved, and the stage-1 one's 260 streams detached by finish.
#[test]
fn domains_with_hundreds_of_streams_are_preserved_and_restored() {
    use crate::handover::format::FormatError;
    use crate::handover::live::RecordError;
    use std::vec::Vec;
    const VFS: u32 = 300;
    const S1_STREAMS: u32 = 260;
    let frames = frames();
    let options = InitOptions {
        attached_streams: 1024,
        ..InitOptions::default()
    };
    let vf = |i: u32| 0x1000 + i;
    let s1_sid = |i: u32| 0x2000 + i;
    let vf_pairs: Vec<(u32, u32)> = (0..VFS).map(|i| (vf(i), 0)).collect();
    let mut s1_pairs: Vec<(u32, u32)> = (0..S1_STREAMS).map(|i| (s1_sid(i), 0)).collect();
    s1_pairs.extend((1..=3).map(|ssid| (s1_sid(0), ssid)));
    let mut region = Region::with_pool_of(16 << 20);
    {
        let model = model_with_substreams(frames);
        let smmu: Iommu<&'static HeapFrames> = model.smmu().init(frames, &options).unwrap();
        let pool = region.pool();
        let vm = smmu
            .create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 40 })
            .unwrap();
        smmu.map(vm, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
        for i in 0..VFS {
            smmu.attach(vm, vf(i)).unwrap();
        }
        let s1 = smmu
            .create_stage1(
                pool.take_memory().unwrap(),
                Stage1Options {
                    input_bits: 39,
                    el2: false,
                },
            )
            .unwrap();
        smmu.map(s1, Iova(0x1000), PhysAddr(0x8010_0000), 0x1000, RW).unwrap();
        for i in 0..S1_STREAMS {
            smmu.attach(s1, s1_sid(i)).unwrap();
        }
        for ssid in 1..=3 {
            smmu.attach_substream(s1, s1_sid(0), ssid).unwrap();
        }
        smmu.preserve(vm, 0x71).unwrap();
        smmu.preserve(s1, 0x72).unwrap();

        let mut small = [0u8; 256];
        assert!(matches!(
            smmu.handover_records(BASE, &mut small),
            Err(RecordError::Format(FormatError::BufferTooSmall { .. }))
        ));
        let mut buffer = std::vec![0u8; 64 << 10];
        let records = smmu.handover_records(BASE, &mut buffer).unwrap();
        let streams_of = |token| -> Vec<(u32, u32)> {
            let r = records.records.iter().find(|r| r.token == token).unwrap();
            r.streams.iter().map(|s| (s.sid, s.ssid)).collect()
        };
        assert_eq!(streams_of(0x71), vf_pairs);
        assert_eq!(streams_of(0x72), s1_pairs);
        let s1_record = records.records.iter().find(|r| r.token == 0x72).unwrap();
        let mut cd_tables: Vec<u64> = s1_record.streams.iter().map(|s| s.cd_table).collect();
        assert!(cd_tables.iter().all(|&t| t != 0));
        cd_tables.sort_unstable();
        cd_tables.dedup();
        assert_eq!(
            cd_tables.len(),
            S1_STREAMS as usize,
            "a CD table a stream, its substreams in it"
        );

        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        core::mem::forget(smmu);
    }
    let model = model_with_substreams(frames);
    let smmu: Iommu<&'static HeapFrames> = model.smmu().init(frames, &options).unwrap();
    let pool = region.pool();
    let report = smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
    assert_eq!(
        (report.domains, report.streams),
        (2, VFS + S1_STREAMS + 3),
        "every stream and substream (the CD tables walked beside the page tables)"
    );
    let vm = smmu.retrieve(0x71).unwrap();
    assert_eq!(smmu.attached(vm).unwrap(), vf_pairs);
    for i in 0..VFS {
        assert_eq!(
            smmu.low_level().ste(vf(i)).unwrap().config(),
            crate::hw::ste::Config::Stage2
        );
    }
    assert_eq!(
        smmu.low_level().ste(s1_sid(S1_STREAMS - 1)).unwrap().config(),
        crate::hw::ste::Config::Stage1
    );
    assert_eq!(smmu.finish_handover(pool, BASE), Ok(FinishReport { unclaimed: 1 }));
    for i in 0..S1_STREAMS {
        assert_eq!(
            smmu.low_level().ste(s1_sid(i)).unwrap().config(),
            crate::hw::ste::Config::Abort,
            "stream {i} of the unclaimed domain"
        );
    }
    assert_eq!(
        smmu.domains.book.lock().free_nodes.len(),
        1024 * 8 - VFS as usize,
        "the unclaimed domain's nodes back"
    );
    core::mem::forget(smmu);
}
