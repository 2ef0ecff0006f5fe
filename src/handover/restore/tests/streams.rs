//! The attachment lists at the hand-off (issue 23: any number of streams a domain): nodes given back on every
//! path, the records `handover_records` writes, lists walked under a read lock while others change.

use super::*;
use crate::Iova;
use std::vec::Vec;

/// A first image with substreams (SSIDSIZE 5): a stage-1 domain on stream 0x10 with its substream 1, preserved
/// as 0x72 and prepared; then the record tampered (valid CRC) so that it lists (0x10, 1) twice.
fn image_with_a_duplicated_substream(region: &mut Region, frames: &'static HeapFrames) {
    {
        let model = model_with_substreams(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let s1 = arena_stage1(&mut smmu, pool);
        smmu.map(s1, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
        smmu.attach(s1, 0x10).unwrap();
        smmu.attach_substream(s1, 0x10, 1).unwrap();
        smmu.preserve(s1, 0x72).unwrap();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        core::mem::forget(smmu);
    }
    tamper(region.pool(), |instance| {
        let record = instance.records.iter_mut().find(|r| r.head.token == 0x72).unwrap();
        let sub = *record.streams.iter().find(|s| s.ssid == 1).unwrap();
        record.streams.push(sub);
        assert_eq!(
            record.streams.iter().map(|s| (s.sid, s.ssid)).collect::<Vec<_>>(),
            [(0x10, 0), (0x10, 1), (0x10, 1)]
        );
    });
}

/// A record that names one substream twice is either refused or, once restored, detached and freed like any
/// other domain: every node back. (The old 8-entry array's `retain` dropped both copies at the detach; the list's
/// `remove` drops one, leaving a node that no stream record backs: the domain can never be freed.)
#[test]
fn a_substream_named_twice_leaves_no_node_behind() {
    let frames = frames();
    let mut region = Region::new();
    image_with_a_duplicated_substream(&mut region, frames);
    let model = model_with_substreams(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let all = smmu.domains.book.lock().free_nodes.len();
    match smmu.restore_handover(pool, BASE, &ANYWHERE) {
        Err(_) => {}
        Ok(_) => {
            let d = smmu.retrieve(0x72).unwrap();
            smmu.detach_substream(0x10, 1).unwrap();
            smmu.detach(0x10).unwrap();
            let left = smmu.attached(d).unwrap();
            let freed = smmu.free_domain(d);
            let free_nodes = smmu.domains.book.lock().free_nodes.len();
            assert!(
                freed.is_ok() && left.is_empty() && free_nodes == all,
                "after detaching every stream: attachments {left:x?}, free_domain {freed:?}, free nodes {free_nodes} of {all}"
            );
        }
    }
    core::mem::forget(smmu);
}

/// The same region, never retrieved: `finish_handover` must be able to detach and free the unclaimed domain (the
/// old code needed a second finish; now no number of finishes does).
#[test]
fn finish_frees_an_unclaimed_domain_whose_record_named_a_substream_twice() {
    let frames = frames();
    let mut region = Region::new();
    image_with_a_duplicated_substream(&mut region, frames);
    let model = model_with_substreams(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    if smmu.restore_handover(pool, BASE, &ANYWHERE).is_ok() {
        let results: Vec<_> = (0..3).map(|_| smmu.finish_handover(pool, BASE)).collect();
        assert!(
            results.iter().any(Result::is_ok),
            "three finishes, none freed the unclaimed domain: {results:?}"
        );
    }
    core::mem::forget(smmu);
}

/// `handover_records` after a prepared hand-off with the SMMU running (its bookkeeping in the SMMU's handover
/// window, `InitOptions::default()`, as `running_first_image` builds it): the records are readable before the
/// prepare, and (the old driver read them into a fixed view) after it too.
#[test]
fn handover_records_reads_a_prepared_running_hand_off() {
    use crate::handover::pool::HandoverMemory;
    let frames = frames();
    let mut region = Region::new();
    let model = Model::start(frames);
    let pool = region.pool();
    *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
    let core = pool.take_window(pool.window_bytes().unwrap()).unwrap();
    let first: Iommu<&'static HandoverMemory> = model.smmu().init(core, &InitOptions::default()).unwrap();
    let options = Stage1Options {
        input_bits: 39,
        el2: false,
    };
    let d = first.create_stage1(pool.take_memory().unwrap(), options).unwrap();
    first.map(d, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    first.attach(d, 0x10).unwrap();
    first.preserve(d, 0x77).unwrap();
    let mut buffer = std::vec![0u8; 4096];
    let before = first.handover_records(BASE, &mut buffer).map(|r| r.records.len());
    assert_eq!(before, Ok(1), "before the prepare");
    first.prepare_handover(pool, BASE, 3, SURVIVING).unwrap();
    let after = first.handover_records(BASE, &mut buffer).map(|r| r.records.len());
    assert_eq!(after, Ok(1), "after the prepare (the SMMU's memory sealed)");
    core::mem::forget(first);
}

/// `handover_records` writes, byte for byte, the records `prepare_handover` writes for the same domains: a
/// stage-1 domain with 20 streams and substreams of two of them, a stage-2 parent with 40 streams and a nested
/// domain under it with 3.
#[test]
fn handover_records_are_the_bytes_prepare_writes() {
    use crate::handover::format::{HEADER_SIZE, IDENTITY_SIZE};
    let frames = frames();
    let options = InitOptions {
        attached_streams: 128,
        ..InitOptions::default()
    };
    let mut region = Region::new();
    let model = model_with_substreams(frames);
    let mut smmu: Iommu<&'static HeapFrames> = model.smmu().init(frames, &options).unwrap();
    let pool = region.pool();
    let s1 = arena_stage1(&mut smmu, pool);
    smmu.map(s1, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    for i in 0..20 {
        smmu.attach(s1, 0x100 + i).unwrap();
    }
    for (sid, ssid) in [(0x100, 1), (0x105, 3), (0x100, 2)] {
        smmu.attach_substream(s1, sid, ssid).unwrap();
    }
    // Detached from the middle and re-attached: the order is the list's.
    smmu.detach(0x103).unwrap();
    smmu.attach(s1, 0x103).unwrap();
    let parent = smmu
        .create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 40 })
        .unwrap();
    smmu.map(parent, Iova(0x4000_0000), PhysAddr(0x4000_0000), 0x1000, RW)
        .unwrap();
    for i in 0..40 {
        smmu.attach(parent, 0x200 + i).unwrap();
    }
    let guest = crate::domain::GuestStage1 {
        cd_table: 0x4800_0000,
        cd_max_log2: 0,
        layout: CdTableLayout::Linear,
        default_substream: DefaultSubstream::Terminate,
    };
    let nested = smmu.create_nested(parent, guest).unwrap();
    for i in 0..3 {
        smmu.attach(nested, 0x300 + i).unwrap();
    }
    smmu.preserve(s1, 0x91).unwrap();
    smmu.preserve(parent, 0x92).unwrap();
    smmu.preserve(nested, 0x93).unwrap();
    let mut out = std::vec![0u8; 1 << 16];
    let (live_len, live_count) = {
        let records = smmu.handover_records(BASE, &mut out).unwrap();
        (
            records
                .records
                .iter()
                .map(|r| crate::handover::format::record_size(&r))
                .sum::<usize>(),
            records.records.len(),
        )
    };
    assert_eq!(live_count, 3);
    let written = smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
    let bytes = pool.lock_metadata().unwrap();
    let at = HEADER_SIZE + IDENTITY_SIZE;
    assert_eq!(written, at + live_len);
    assert_eq!(&out[HEADER_SIZE..at + live_len], &bytes[HEADER_SIZE..at + live_len]);
    drop(bytes);
    core::mem::forget(smmu);
}

/// A restore refused half-way through its streams (the SMMU refuses CFGI_STE once a dozen went through): every
/// node the rebuild took goes back with the domains it forgets, and no stream record is left.
#[test]
fn a_restore_refused_half_way_through_its_streams_gives_every_node_back() {
    use crate::hw::command::opcode;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let frames = frames();
    let options = InitOptions {
        attached_streams: 128,
        ..InitOptions::default()
    };
    let mut region = Region::new();
    {
        let model = model_with_substreams(frames);
        let mut smmu: Iommu<&'static HeapFrames> = model.smmu().init(frames, &options).unwrap();
        let pool = region.pool();
        let s1 = arena_stage1(&mut smmu, pool);
        smmu.map(s1, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
        for i in 0..10 {
            smmu.attach(s1, 0x100 + i).unwrap();
        }
        for ssid in 1..=3 {
            smmu.attach_substream(s1, 0x104, ssid).unwrap();
        }
        let s2 = smmu
            .create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 40 })
            .unwrap();
        smmu.map(s2, Iova(0x1000), PhysAddr(0x8010_0000), 0x1000, RW).unwrap();
        for i in 0..30 {
            smmu.attach(s2, 0x200 + i).unwrap();
        }
        smmu.preserve(s1, 0x91).unwrap();
        smmu.preserve(s2, 0x92).unwrap();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        core::mem::forget(smmu);
    }
    for after in [1usize, 12, 35] {
        let model = model_with_substreams(frames);
        let smmu: Iommu<&'static HeapFrames> = model.smmu().init(frames, &options).unwrap();
        let all = smmu.domains.book.lock().free_nodes.len();
        // This image's own stream, with substreams, beside the restore.
        let mine = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
        smmu.attach(mine, 0x50).unwrap();
        smmu.attach_substream(mine, 0x50, 1).unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let (refuse, count) = (model.refuse.clone(), seen.clone());
        *model.probe.lock().unwrap() = Some(std::boxed::Box::new(move || {
            if count.fetch_add(1, Ordering::SeqCst) + 1 == after * 2 {
                refuse.store(opcode::CFGI_STE, Ordering::SeqCst);
            }
            0
        }));
        let pool = region.pool();
        let restored = smmu.restore_handover(pool, BASE, &ANYWHERE);
        assert!(restored.is_err(), "refused after {after}");
        let book = smmu.domains.book.lock();
        assert_eq!(
            book.free_nodes.len(),
            all - 2,
            "after {after}: only this image's two nodes taken"
        );
        assert_eq!(book.streams.len(), 1, "after {after}: only this image's stream");
        drop(book);
        assert_eq!(smmu.attached(mine).unwrap(), [(0x50, 0), (0x50, 1)]);
        core::mem::forget(smmu);
    }
}

/// `attached_streams` below the domain table's capacity (0): the table's capacity is kept, a node for each
/// stream and each of its substreams; an attach that cannot get its CD table gives its node back.
#[test]
fn attached_streams_zero_keeps_the_domain_capacity_and_failed_attaches_give_nodes_back() {
    let frames = frames();
    let model = model_with_substreams(frames);
    let options = InitOptions {
        attached_streams: 0,
        ..InitOptions::default()
    };
    let smmu: Iommu<&'static HeapFrames> = model.smmu().init(frames, &options).unwrap();
    let d = smmu.create_stage1(frames, Stage1Options::default()).unwrap();
    assert_eq!(
        smmu.domains.book.lock().free_nodes.len(),
        crate::domain::DEFAULT_DOMAINS * 8
    );
    for i in 0..crate::domain::DEFAULT_DOMAINS as u32 {
        smmu.attach(d, 0x100 + i).unwrap();
        for ssid in 1..=7 {
            smmu.attach_substream(d, 0x100 + i, ssid).unwrap();
        }
    }
    assert_eq!(smmu.domains.book.lock().free_nodes.len(), 0);
    assert_eq!(
        smmu.attach(d, 0x1),
        Err(DomainError::TooMany(Capacity::AttachedStreams))
    );
    assert_eq!(smmu.attached(d).unwrap().len(), crate::domain::DEFAULT_DOMAINS * 8);
    // A domain whose memory holds its root table and nothing more: its attach fails for its CD table.
    let tight: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::new(HeapFrames::with_limit(4096)));
    for i in 0..crate::domain::DEFAULT_DOMAINS as u32 {
        smmu.detach(0x100 + i).unwrap();
    }
    let all = smmu.domains.book.lock().free_nodes.len();
    assert_eq!(all, crate::domain::DEFAULT_DOMAINS * 8);
    {
        let t = smmu.create_stage1(tight, Stage1Options::default()).unwrap();
        assert!(smmu.attach(t, 0x20).is_err());
        assert_eq!(smmu.domains.book.lock().free_nodes.len(), all);
        assert_eq!(smmu.attached(t).unwrap(), []);
        smmu.free_domain(t).unwrap();
    }
    smmu.free_domain(d).unwrap();
}

/// A nested domain's list walked under its read lock alone (`attachments`, `invalidate_guest`) while other
/// threads attach and detach streams of other domains (taking and giving back nodes of the same pool): every
/// walk sees exactly the domain's streams, in order.
#[test]
fn a_list_walked_under_its_read_lock_is_unchanged_by_other_domains_attaching() {
    use crate::domain::GuestInvalidation;
    let frames = frames();
    let model = Model::start(frames);
    let options = InitOptions {
        attached_streams: 256,
        ..InitOptions::default()
    };
    let smmu: Iommu<&'static HeapFrames> = model.smmu().init(frames, &options).unwrap();
    let parent = smmu.create_stage2(frames, Stage2Options { input_bits: 40 }).unwrap();
    let guest = crate::domain::GuestStage1 {
        cd_table: 0x4800_0000,
        cd_max_log2: 0,
        layout: CdTableLayout::Linear,
        default_substream: DefaultSubstream::Terminate,
    };
    let nested = smmu.create_nested(parent, guest).unwrap();
    let others: Vec<_> = (0..2)
        .map(|_| smmu.create_stage2(frames, Stage2Options { input_bits: 40 }).unwrap())
        .collect();
    // Interleaved with the other domains' attachments, so the nested domain's nodes lie among theirs.
    let mut expected = Vec::new();
    for i in 0..60u32 {
        smmu.attach(nested, 0x100 + i).unwrap();
        expected.push((0x100 + i, 0));
        smmu.attach(others[(i % 2) as usize], 0x400 + i).unwrap();
    }
    for i in 0..60u32 {
        smmu.detach(0x400 + i).unwrap();
    }
    std::thread::scope(|s| {
        for (k, &d) in others.iter().enumerate() {
            let smmu = &smmu;
            s.spawn(move || {
                for round in 0..30u32 {
                    let sids: Vec<u32> = (0..8)
                        .map(|j| 0x800 + 0x100 * k as u32 + (round * 8 + j) % 64)
                        .collect();
                    for &sid in &sids {
                        smmu.attach(d, sid).unwrap();
                    }
                    for &sid in sids.iter().rev() {
                        smmu.detach(sid).unwrap();
                    }
                }
            });
        }
        for _ in 0..200 {
            assert_eq!(smmu.attached(nested).unwrap(), expected);
            smmu.invalidate_guest(nested, GuestInvalidation::CdAll).unwrap();
        }
    });
    assert_eq!(smmu.attached(nested).unwrap(), expected);
    assert_eq!(smmu.domains.book.lock().free_nodes.len(), 256 * 8 - 60);
}

/// A finish whose detach fails (CFGI_STE refused) ends there; the next finish detaches and frees the rest, every
/// node of the unclaimed domain back.
#[test]
fn a_failed_finish_is_finished_again_with_every_node_back() {
    use crate::hw::command::opcode;
    use std::sync::atomic::Ordering;
    let frames = frames();
    let mut region = Region::new();
    first_image(&mut region, frames);
    let model = Model::start(frames);
    let smmu = boot(&model, frames);
    let pool = region.pool();
    let all = smmu.domains.book.lock().free_nodes.len();
    smmu.restore_handover(pool, BASE, &ANYWHERE).unwrap();
    for token in [0x51, 0x52, 0x53] {
        smmu.retrieve(token).unwrap();
    }
    model.refuse.store(opcode::CFGI_STE, Ordering::SeqCst);
    assert!(smmu.finish_handover(pool, BASE).is_err());
    model.refuse.store(0, Ordering::SeqCst);
    assert_eq!(smmu.finish_handover(pool, BASE), Ok(FinishReport { unclaimed: 1 }));
    assert_eq!(
        smmu.domains.book.lock().free_nodes.len(),
        all - 2,
        "0x10 and 0x18 still attached"
    );
    core::mem::forget(smmu);
}
