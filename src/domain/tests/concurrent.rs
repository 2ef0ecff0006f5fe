//! One `Iommu` shared by threads, as CPUs share it: maps and unmaps in one domain at once, overlapping requests,
//! faults drained from "interrupt context" while others map, and a hand-off prepared while others map.

use crate::Iova;
use std::collections::BTreeMap;
use std::sync::Barrier;
use std::sync::atomic::AtomicBool;

use super::*;

const PAGE: u64 = 0x1000;

/// Threads map and unmap disjoint pages of one domain at once (the concurrent paths, under the domain's read
/// lock): every page ends up as its thread left it, and the table's counts are whole.
#[test]
fn threads_map_and_unmap_disjoint_pages_of_one_domain() {
    for threads in [2usize, 4, 8] {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
        let d = s1(&mut smmu, frames);
        let smmu = &smmu;
        std::thread::scope(|scope| {
            for t in 0..threads as u64 {
                scope.spawn(move || {
                    for round in 0..3u64 {
                        for page in 0..64u64 {
                            let iova = (t << 30) | (page * PAGE);
                            smmu.map(d, Iova(iova), PhysAddr(0x8000_0000 + iova), PAGE, RW).unwrap();
                        }
                        // Every other page goes again (odd ones on the last round stay mapped).
                        for page in (0..64u64).filter(|p| round < 2 || p % 2 == 0) {
                            let iova = (t << 30) | (page * PAGE);
                            assert_eq!(smmu.unmap(d, Iova(iova), PAGE), Ok(PAGE), "{t} {round} {page}");
                        }
                    }
                });
            }
        });
        for t in 0..threads as u64 {
            for page in 0..64u64 {
                let iova = (t << 30) | (page * PAGE);
                let expected = (page % 2 == 1).then_some(0x8000_0000 + iova);
                assert_eq!(
                    smmu.iova_to_phys(d, Iova(iova)),
                    Ok(expected.map(PhysAddr)),
                    "{threads} threads: {iova:#x}"
                );
            }
        }
    }
}

/// Two threads map one page to different outputs, over and over: exactly one wins each time, the other gets the
/// defined overlap error, and the page translates to the winner's output.
#[test]
fn overlapping_maps_have_one_winner_and_a_defined_error() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let d = s1(&mut smmu, frames);
    let smmu = &smmu;
    for round in 0..200u64 {
        let iova = round * PAGE;
        let barrier = Barrier::new(2);
        let results: Vec<_> = std::thread::scope(|scope| {
            let barrier = &barrier;
            let handles: Vec<_> = (0..2u64)
                .map(|t| {
                    scope.spawn(move || {
                        barrier.wait();
                        smmu.map(d, Iova(iova), PhysAddr(0x1_0000_0000 * (t + 1) + iova), PAGE, RW)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<u64> = (0..2u64).filter(|&t| results[t as usize].is_ok()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        let loser = 1 - winners[0] as usize;
        assert!(
            matches!(results[loser], Err(DomainError::Map(MapError::Overlap { .. }))),
            "{:?}",
            results[loser]
        );
        assert_eq!(
            smmu.iova_to_phys(d, Iova(iova)),
            Ok(Some(PhysAddr(0x1_0000_0000 * (winners[0] + 1) + iova)))
        );
    }
}

/// While threads map, "interrupt handlers" on other threads drain the event queue with `handle_interrupt` (only
/// trying locks): every fault is filed under its domain exactly once, whatever held the locks when they ran.
#[test]
fn faults_drained_in_interrupt_context_while_others_map_are_filed_once() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let a = s1(&mut smmu, frames);
    let b = s2(&mut smmu, frames);
    smmu.attach(a, 0x10).unwrap();
    smmu.attach(b, 0x18).unwrap();
    let smmu = &smmu;
    let done = AtomicBool::new(false);
    let mut injected = [0u32; 2];
    std::thread::scope(|scope| {
        let done = &done;
        for t in 0..2u64 {
            scope.spawn(move || {
                let d = [a, b][t as usize];
                let mut page = 0;
                while !done.load(Ordering::Relaxed) {
                    let iova = 0x100_0000 + page * PAGE;
                    smmu.map(d, Iova(iova), PhysAddr(0x8000_0000 + iova), PAGE, RW).unwrap();
                    smmu.unmap(d, Iova(iova), PAGE).unwrap();
                    page = (page + 1) % 64;
                }
            });
        }
        for _ in 0..2 {
            scope.spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    smmu.handle_interrupt().unwrap();
                }
            });
        }
        // The SMMU reports faults of both streams meanwhile (a few at a time: the queue holds 256).
        for burst in 0..40u32 {
            let records: Vec<[u64; 4]> = (0..6)
                .map(|i| {
                    let on_b = (burst + i) % 3 == 0;
                    injected[usize::from(on_b)] += 1;
                    fault(if on_b { 0x18 } else { 0x10 }, None, 0x1000 * u64::from(i), true)
                })
                .collect();
            // Injected only between drains' reads of PROD and CONS writes would race the model's writer: the
            // model writes records where the queue has room, which it always has here (at most 240 in flight).
            inject(&model, smmu, frames, &records);
            std::thread::yield_now();
        }
        done.store(true, Ordering::Relaxed);
    });
    // What no interrupt got to (records arriving after the last one) is filed by a thread's drain.
    smmu.drain_faults(|_| {}).unwrap();
    assert_eq!(smmu.domain_faults(a).unwrap().total(), injected[0]);
    assert_eq!(smmu.domain_faults(b).unwrap().total(), injected[1]);
    assert_eq!(smmu.unattached_faults().total(), 0);
}

/// An interrupt that finds a lock taken (the bookkeeping, then a fault report) files nothing and leaves the
/// records queued, and the lock's holder files them once it unlocks: no second interrupt is needed (the SMMU raises
/// one only when the queue goes from empty to non-empty).
#[test]
fn an_interrupt_that_finds_a_lock_taken_leaves_the_records_to_the_holder() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let a = s1(&mut smmu, frames);
    smmu.attach(a, SID).unwrap();
    let slot = &smmu.domains.slots[usize::from(a.index())];
    inject(
        &model,
        &smmu,
        frames,
        &[fault(SID, None, 0x1000, true), fault(SID, None, 0x2000, false)],
    );
    // The bookkeeping held by a thread (a structural operation): its unlock files the records.
    let book = smmu.book();
    let report = smmu.handle_interrupt().unwrap();
    assert!(report.pending && report.events == 0, "{report:?}");
    assert_eq!(slot.faults.lock().total(), 0);
    drop(book);
    assert_eq!(
        slot.faults.lock().total(),
        2,
        "filed by the bookkeeping's holder as it unlocked"
    );
    // The fault report's own lock taken (a reader on this CPU): the record waits in the queue until the reader,
    // done, drains (`domain_faults` is the reader here).
    inject(&model, &smmu, frames, &[fault(SID, None, 0x3000, true)]);
    let held = slot.faults.lock();
    let report = smmu.handle_interrupt().unwrap();
    assert!(report.pending && report.events == 0, "{report:?}");
    drop(held);
    // A reader drains after it unlocked the report (its copy was taken before): the record is filed then.
    assert_eq!(smmu.domain_faults(a).unwrap().total(), 2);
    assert_eq!(
        slot.faults.lock().total(),
        3,
        "filed by the report's reader after it unlocked"
    );
    assert_eq!(smmu.drain_faults(|_| {}).unwrap().events, 0, "filed once");
}

/// The event queue's lock held (a thread draining, on this CPU or another): an interrupt's drain takes nothing,
/// sets the drain-again flag, and the holder's next pass files the records.
#[test]
fn an_interrupt_that_finds_the_event_queue_taken_asks_its_holder_to_drain_again() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let a = s1(&mut smmu, frames);
    smmu.attach(a, SID).unwrap();
    inject(&model, &smmu, frames, &[fault(SID, None, 0x1000, true)]);
    let held = smmu.core.evtq.lock();
    let report = smmu.handle_interrupt().unwrap();
    assert!(report.pending && report.events == 0, "{report:?}");
    assert!(
        smmu.core.drain_again.load(Ordering::Acquire),
        "the holder is asked to drain again"
    );
    drop(held);
    assert_eq!(smmu.drain_faults(|_| {}).unwrap().events, 1);
    assert!(!smmu.core.drain_again.load(Ordering::Acquire));
    assert_eq!(smmu.domain_faults(a).unwrap().total(), 1);
}

/// `prepare_handover` while other threads map in the preserved domain: each map either finished before the
/// freeze (and is in the table the records describe) or fails with `HandoverPrepared` after it; the records equal
/// the table, and nothing changes it until the hand-off is cancelled.
#[test]
fn prepare_freezes_atomically_while_other_threads_map() {
    for threads in [2usize, 4] {
        let frames = frames();
        let model = Model::start(frames);
        let smmu = smmu(&model, frames);
        let pool = handover_pool();
        let d = smmu
            .create_stage1(
                pool.take_memory().unwrap(),
                Stage1Options {
                    input_bits: 39,
                    el2: false,
                },
            )
            .unwrap();
        smmu.preserve(d, 0xd).unwrap();
        let smmu = &smmu;
        let started = Barrier::new(threads + 1);
        let landed = std::sync::atomic::AtomicUsize::new(0);
        let outcomes: Vec<Vec<(u64, Result<(), DomainError>)>> = std::thread::scope(|scope| {
            let (started, landed) = (&started, &landed);
            let handles: Vec<_> = (0..threads as u64)
                .map(|t| {
                    scope.spawn(move || {
                        started.wait();
                        let mut out = Vec::new();
                        // Until frozen (or one last-level table full).
                        for page in 0..512u64 {
                            let iova = (t << 24) | (page * PAGE);
                            let r = smmu.map(d, Iova(iova), PhysAddr(0x8000_0000 + iova), PAGE, RW);
                            landed.fetch_add(1, Ordering::Relaxed);
                            let frozen = matches!(r, Err(DomainError::HandoverPrepared { .. }));
                            out.push((iova, r));
                            if frozen {
                                break;
                            }
                        }
                        out
                    })
                })
                .collect();
            started.wait();
            // Some maps land before the freeze, the others race it.
            while landed.load(Ordering::Relaxed) < threads * 8 {
                std::thread::yield_now();
            }
            smmu.prepare_handover(pool, 0x905_0000, 1, &[crate::mem::Extent { base: 0, len: 1 << 48 }])
                .unwrap();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Every map succeeded or was refused as frozen; after a refusal the thread stopped.
        let frozen = outcomes.iter().flatten().filter(|(_, r)| r.is_err()).count();
        let mut mapped = BTreeMap::new();
        for out in &outcomes {
            for (iova, r) in out {
                match r {
                    Ok(()) => {
                        mapped.insert(*iova, 0x8000_0000 + iova);
                    }
                    Err(DomainError::HandoverPrepared { token: 0xd }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }
        // The table holds exactly what succeeded, and the records (taken again now) are what was written.
        let mut leaves = BTreeMap::new();
        smmu.domain_table(d).unwrap().walk(|m| {
            leaves.insert(m.iova, m.pa);
        });
        assert_eq!(leaves, mapped, "{threads} threads ({frozen} maps refused as frozen)");
        assert!(!mapped.is_empty());
        let decoded = {
            let bytes = pool.lock_metadata().unwrap();
            crate::handover::format::sample::owned(
                &crate::handover::format::sample::decode(&bytes, pool.pool().unwrap()).unwrap(),
            )
        };
        let mut buffer = std::vec![0; 1 << 16];
        let now = smmu.handover_records(0x905_0000, &mut buffer).unwrap();
        assert_eq!(
            decoded[0],
            crate::handover::format::sample::OwnedInstance::of(&now),
            "recorded = the table now"
        );
        // Frozen until cancelled.
        assert!(matches!(
            smmu.map(d, Iova(0x7000_0000), PhysAddr(0x8000_0000), PAGE, RW),
            Err(DomainError::HandoverPrepared { .. })
        ));
        smmu.cancel_handover(pool, 0x905_0000).unwrap();
        smmu.map(d, Iova(0x7000_0000), PhysAddr(0x8000_0000), PAGE, RW).unwrap();
    }
}

/// A single-page unmap (the concurrent path, under the read lock) whose invalidation fails parks its gather before
/// it lets go of the lock: the next operation, whatever it is, invalidates it again first, and a map of the page
/// waits for that.
#[test]
fn a_failed_invalidation_of_the_concurrent_unmap_is_retried_by_the_next_operation() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let d = s1(&mut smmu, frames);
    smmu.map(d, Iova(0x40_0000), PhysAddr(0x8000_0000), PAGE, RW).unwrap();
    model.refuse.store(opcode::TLBI_NH_VA, Ordering::SeqCst);
    assert!(matches!(
        smmu.unmap(d, Iova(0x40_0000), PAGE),
        Err(DomainError::Invalidation(_))
    ));
    assert_eq!(smmu.iova_to_phys(d, Iova(0x40_0000)), Ok(None), "the entry is cleared");
    assert!(smmu.domains.get(d).unwrap().has_unflushed());
    // Still refused: the map fails with the retried invalidation and maps nothing.
    assert!(matches!(
        smmu.map(d, Iova(0x40_0000), PhysAddr(0x9000_0000), PAGE, RW),
        Err(DomainError::Invalidation(_))
    ));
    assert_eq!(smmu.iova_to_phys(d, Iova(0x40_0000)), Ok(None));
    model.refuse.store(0, Ordering::SeqCst);
    let before = consumed(&model);
    smmu.map(d, Iova(0x40_0000), PhysAddr(0x9000_0000), PAGE, RW).unwrap();
    assert_eq!(
        since(&model, before)[..2],
        [opcode::TLBI_NH_VA, opcode::SYNC],
        "invalidated first"
    );
    assert!(!smmu.domains.get(d).unwrap().has_unflushed());
    assert_eq!(smmu.iova_to_phys(d, Iova(0x40_0000)), Ok(Some(PhysAddr(0x9000_0000))));
}
