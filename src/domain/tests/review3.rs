//! Review 3 (adversarial): interleavings of safe calls the `iommu` branch gets wrong. Each test FAILS on the branch.

use crate::Iova;
use std::boxed::Box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32};

use super::*;

const PAGE: u64 = 0x1000;

/// Finding 1. `LowLevel::free_asid` used to check "a live domain owns it" by scanning the slots, then free: a
/// domain being created holds its ASID before it is in a slot (`create_claimed` builds without any lock), so a raw
/// free on another CPU in that window succeeded, and the next create got the same ASID: two live domains, one
/// ASID. Now the allocator knows who took an ID: a raw free of a domain's ID is refused at every moment. (The
/// closure is `create_stage1`'s own build; the raw call is placed where another CPU can land.)
#[test]
fn a_raw_free_asid_never_frees_an_id_a_domain_is_building_with() {
    let frames = frames();
    // 8-bit ASIDs: every ASID but one is taken raw first, so the allocator's next-fit cannot hide a reuse.
    let model = Model::start_with(frames, IDRS[0].1 & !(1 << 12 | 1 << 18));
    let smmu = smmu(&model, frames);
    let raw: Vec<u16> = core::iter::from_fn(|| smmu.low_level().allocate_asid().ok()).collect();
    assert_eq!(raw.len(), 255);
    smmu.low_level().free_asid(raw[0]).unwrap();
    let mut raced = None;
    let a = smmu
        .create_claimed(memory(frames), |s| {
            let table = s.new_table(memory(frames), crate::pgtable::Stage::One, 39)?;
            let asid = s.core.allocate_asid().map_err(DomainError::Id)?;
            // Another CPU: the ASID is in no slot yet.
            raced = Some((asid, s.low_level().free_asid(asid)));
            let cd = s.stage1_cd(asid, &table).map_err(DomainError::Entry)?;
            Ok(Translation::Stage1 {
                table,
                asid,
                cd,
                el2: false,
            })
        })
        .unwrap();
    let (asid, raced) = raced.unwrap();
    assert_eq!(
        raced,
        Err(IdError::Owned { id: asid }),
        "the raw free refused the building domain's ASID"
    );
    let b = smmu.create_stage1(
        memory(frames),
        Stage1Options {
            input_bits: 39,
            el2: false,
        },
    );
    match b {
        Ok(b) => assert_ne!(asid_of(&smmu, a), asid_of(&smmu, b), "two live domains share one ASID"),
        Err(e) => assert_eq!(e, DomainError::Id(IdError::Exhausted { bits: 8 }), "no ASID is left"),
    }
    // The domain's ASID is still refused once it is in its slot, and goes back with the domain only.
    assert_eq!(smmu.low_level().free_asid(asid), Err(IdError::Owned { id: asid }));
    smmu.free_domain(a).unwrap();
    assert_eq!(
        smmu.low_level().free_asid(asid),
        Err(IdError::WrongState {
            id: asid,
            allocated: false
        })
    );
}

/// Review 3, finding 2 (lock order). `invalidate_guest(nested)` used to hold the nested domain's read lock and then
/// take its parent's (no bookkeeping held), while `prepare_handover` holds the bookkeeping and write-locks every
/// preserved domain in slot order, the parent (lower slot) first: guest reads N, prepare writes P, prepare spins
/// for N, guest spins for P, for good. The nested domain now carries its parent's VMID (and stage 2), so no
/// operation takes a second slot lock outside the bookkeeping. Here a structural operation on the parent holds it
/// for a moment so that both arrive at it; racy, repeated (bounded: 2 s a trial at worst, a few ms on a correct
/// driver).
#[test]
fn a_guest_invalidation_racing_prepare_takes_no_second_slot_lock_and_never_deadlocks() {
    let mut hung = None;
    for trial in 0..40 {
        let frames = frames();
        let model = Model::start(frames);
        let smmu: &'static Iommu<&'static HeapFrames> = Box::leak(Box::new(smmu(&model, frames)));
        let pool = handover_pool();
        let parent = smmu
            .create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 40 })
            .unwrap();
        let nested = smmu.create_nested(parent, GUEST).unwrap();
        assert!(parent.index() < nested.index());
        smmu.preserve(parent, 0xa).unwrap();
        smmu.preserve(nested, 0xb).unwrap();
        // A structural operation on the parent (a range unmap, say) holds it for a moment.
        let held = smmu.domains.slots[usize::from(parent.index())].state.write();
        let guest = std::thread::spawn(move || smmu.invalidate_guest(nested, GuestInvalidation::All));
        std::thread::sleep(std::time::Duration::from_millis(5));
        let prep = std::thread::spawn(move || {
            smmu.prepare_handover(pool, 0x905_0000, 1, &[crate::mem::Extent { base: 0, len: 1 << 48 }])
        });
        std::thread::sleep(std::time::Duration::from_millis(5));
        drop(held);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while !(guest.is_finished() && prep.is_finished()) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if !(guest.is_finished() && prep.is_finished()) {
            hung = Some((trial, guest.is_finished(), prep.is_finished()));
            // Both threads spin on the slot locks for good (no register access): left behind.
            core::mem::forget(model);
            break;
        }
        guest.join().unwrap().unwrap();
        prep.join().unwrap().unwrap();
    }
    assert_eq!(
        hung, None,
        "(trial, invalidate_guest finished, prepare_handover finished): deadlocked for 2 s"
    );
}

/// Review 3, finding 3. A single-page unmap that leaves a trim due checks the freeze under the read lock, drops it,
/// and trims under the write lock: a `prepare_handover` that takes the write lock in between records the table
/// and seals it, so the trim must check the freeze again (it used not to, and unlinked and freed tables of the
/// frozen, recorded domain: the records no longer matched the table). The order is forced: the unmap's TLBI is
/// held (the model's probe) until `prepare_handover` waits for the domain's write lock, so prepare, the waiting
/// writer, goes before the unmap's trim (a waiting writer turns readers and later writers away).
#[test]
fn a_trim_after_a_single_page_unmap_rechecks_the_freeze_and_never_changes_a_frozen_domain() {
    for _ in 0..5 {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = smmu(&model, frames);
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
        table_of(&mut smmu, d).set_lazy_free_limit(1);
        for iova in [0, 0x20_0000, 0x40_0000] {
            smmu.map(d, Iova(iova), PhysAddr(0x8000_0000 + iova), PAGE, RW).unwrap();
        }
        // One emptied table: at the limit, no trim.
        assert_eq!(smmu.unmap(d, Iova(0x20_0000), PAGE), Ok(PAGE));
        let smmu: &'static Iommu<&'static HeapFrames> = Box::leak(Box::new(smmu));
        let in_flush = Arc::new(AtomicBool::new(false));
        let writer_waits = Arc::new(AtomicBool::new(false));
        let (flush, waits) = (in_flush.clone(), writer_waits.clone());
        *model.probe.lock().unwrap() = Some(Box::new(move || {
            if !flush.swap(true, Ordering::SeqCst) {
                // The unmap's TLBI, its read lock held: wait until prepare waits for the write lock.
                let slot = &smmu.domains.slots[usize::from(d.index())];
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
                while std::time::Instant::now() < deadline {
                    if slot.state.try_read().is_none() {
                        waits.store(true, Ordering::SeqCst);
                        break;
                    }
                    std::thread::yield_now();
                }
            }
            0
        }));
        let (unmapped, prepared) = std::thread::scope(|scope| {
            // The second emptied table goes over the limit: a trim is due after the page's own flush.
            let unmap = scope.spawn(|| smmu.unmap(d, Iova(0x40_0000), PAGE));
            while !in_flush.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            let prep = scope
                .spawn(|| smmu.prepare_handover(pool, 0x905_0000, 1, &[crate::mem::Extent { base: 0, len: 1 << 48 }]));
            (unmap.join().unwrap(), prep.join().unwrap())
        });
        *model.probe.lock().unwrap() = None;
        assert!(
            writer_waits.load(Ordering::SeqCst),
            "prepare waited for the write lock during the unmap"
        );
        assert_eq!(unmapped, Ok(PAGE));
        prepared.unwrap();
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
            "the preserved domain's table changed after prepare_handover froze and recorded it"
        );
    }
}

/// Review 3, finding 4. An event-queue interrupt that lands while a structural operation (here an EL2 domain's
/// free on another CPU, waiting for its CMD_SYNC: the one free that holds the bookkeeping across it) holds the
/// bookkeeping files nothing and returns `pending`. The SMMU raises the interrupt again only when the queue goes from
/// empty to non-empty (evtq.rs), so the holder must file the records when it unlocks (it used not to, and they sat
/// there until some thread called `drain_faults`): no second `handle_interrupt` here.
#[test]
fn an_interrupt_while_the_bookkeeping_is_held_has_its_faults_filed_when_the_holder_unlocks() {
    let (frames, model, smmu, a) = interrupt_setup();
    let el2 = smmu
        .create_stage1(
            memory(frames),
            Stage1Options {
                input_bits: 39,
                el2: true,
            },
        )
        .unwrap();
    let (fired, irq_events, irq_pending) = interrupt_during_next_sync(frames, &model, smmu);
    smmu.free_domain(el2).unwrap();
    *model.probe.lock().unwrap() = None;
    assert!(fired.load(Ordering::SeqCst), "the interrupt ran during the free");
    assert_eq!(irq_events.load(Ordering::SeqCst), 0);
    assert!(irq_pending.load(Ordering::SeqCst), "the interrupt left the records");
    // The free is over and no interrupt will come for these records: were they filed by the lock's holder? (The
    // report read directly: no reader's drain.)
    let slot = &smmu.domains.slots[usize::from(a.index())];
    assert_eq!(
        slot.faults.lock().total(),
        2,
        "faults announced by an interrupt while the bookkeeping was held are stranded in the event queue"
    );
    assert_eq!(smmu.drain_faults(|_| {}).unwrap().events, 0, "filed once");
}

/// Issue 22 ("attach, detach and free serialise only what they must"): an attach waits for its STE's CMD_SYNC
/// without the bookkeeping, so an interrupt taken on another CPU meanwhile files its records at once.
#[test]
fn an_attach_waits_for_its_sync_without_the_bookkeeping() {
    let (frames, model, smmu, a) = interrupt_setup();
    let b = smmu
        .create_stage2(memory(frames), Stage2Options { input_bits: 40 })
        .unwrap();
    let (fired, irq_events, irq_pending) = interrupt_during_next_sync(frames, &model, smmu);
    smmu.attach(b, 0x18).unwrap();
    *model.probe.lock().unwrap() = None;
    assert!(fired.load(Ordering::SeqCst), "the interrupt ran during the attach");
    assert_eq!(irq_events.load(Ordering::SeqCst), 2, "filed by the interrupt itself");
    assert!(!irq_pending.load(Ordering::SeqCst));
    let slot = &smmu.domains.slots[usize::from(a.index())];
    assert_eq!(slot.faults.lock().total(), 2);
    assert_eq!(smmu.drain_faults(|_| {}).unwrap().events, 0, "filed once");
}

/// An SMMU (with EL2 contexts) with a stage-1 domain attached to `SID`, for the interrupt tests.
fn interrupt_setup() -> (
    &'static HeapFrames,
    Model,
    &'static Iommu<&'static HeapFrames>,
    DomainId,
) {
    let frames = frames();
    let model = super::el2::el2_model(frames);
    let smmu: &'static Iommu<&'static HeapFrames> = Box::leak(Box::new(smmu(&model, frames)));
    let a = smmu
        .create_stage1(
            memory(frames),
            Stage1Options {
                input_bits: 39,
                el2: false,
            },
        )
        .unwrap();
    smmu.attach(a, SID).unwrap();
    (frames, model, smmu, a)
}

/// At the next command the model consumes: the SMMU records two faults of `SID` (queue empty -> non-empty: one
/// interrupt), and that interrupt is taken by another CPU. Returns (fired, the interrupt's events, its pending).
fn interrupt_during_next_sync(
    frames: &'static HeapFrames,
    model: &Model,
    smmu: &'static Iommu<&'static HeapFrames>,
) -> (Arc<AtomicBool>, Arc<AtomicU32>, Arc<AtomicBool>) {
    let queue = frames.virt(smmu.configuration().eventq_base) as usize;
    let prod_register = reg32(model.base, 0x1_00a8) as usize;
    let fired = Arc::new(AtomicBool::new(false));
    let irq_events = Arc::new(AtomicU32::new(u32::MAX));
    let irq_pending = Arc::new(AtomicBool::new(false));
    let (f, e, p) = (fired.clone(), irq_events.clone(), irq_pending.clone());
    *model.probe.lock().unwrap() = Some(Box::new(move || {
        if !f.swap(true, Ordering::SeqCst) {
            // SAFETY: the model's registers and the driver's event queue are live.
            unsafe {
                let prod_register = prod_register as *mut u32;
                let base = queue as *mut u64;
                let mut prod = prod_register.read_volatile();
                for r in [fault(SID, None, 0x1000, true), fault(SID, None, 0x2000, false)] {
                    let index = (prod & 0xff) as usize;
                    for (i, w) in r.iter().enumerate() {
                        base.add(index * 4 + i).write_volatile(*w);
                    }
                    prod = (prod + 1) & 0x1ff;
                }
                prod_register.write_volatile(prod);
            }
            let report = smmu.handle_interrupt().unwrap();
            e.store(report.events, Ordering::SeqCst);
            p.store(report.pending, Ordering::SeqCst);
        }
        0
    }));
    (fired, irq_events, irq_pending)
}

/// Review 3, finding 6 (liveness). spin's `write` lets new readers in while it waits, so a structural operation
/// (and `prepare_handover`, which waits for the preserved domains' write locks holding the bookkeeping) could wait
/// for good while other CPUs map the domain in a loop. A waiting writer now turns new readers away: with one reader
/// inside and a writer (a trim) waiting, a new reader is refused until the writer is done. Deterministic: polls
/// until the writer waits (bounded at 2 s, which only a writer that never blocks readers reaches).
#[test]
fn a_waiting_writer_turns_new_readers_away_so_maps_in_a_loop_cannot_starve_it() {
    let frames = frames();
    let model = Model::start(frames);
    let smmu = smmu(&model, frames);
    let d = smmu
        .create_stage1(
            memory(frames),
            Stage1Options {
                input_bits: 39,
                el2: false,
            },
        )
        .unwrap();
    smmu.map(d, Iova(0), PhysAddr(0x8000_0000), PAGE, RW).unwrap();
    let slot = &smmu.domains.slots[usize::from(d.index())];
    let smmu = &smmu;
    let inside = slot.state.read();
    let refused = std::thread::scope(|scope| {
        let writer = scope.spawn(|| smmu.trim_domain(d));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut refused = false;
        while !refused && std::time::Instant::now() < deadline {
            // A new reader (another CPU's map): refused once the writer waits.
            refused = slot.state.try_read().is_none();
            std::thread::yield_now();
        }
        assert!(!writer.is_finished(), "the writer waits for the reader inside");
        drop(inside);
        assert_eq!(writer.join().unwrap(), Ok(0));
        refused
    });
    assert!(
        refused,
        "a new reader got in while a writer waited: readers in a loop starve it"
    );
    // And the domain works as before.
    assert_eq!(smmu.unmap(d, Iova(0), PAGE), Ok(PAGE));
}

/// Review 3, finding 7. A single-page unmap (read lock) whose TLBI fails used to drop the read lock and only then
/// record the failed gather under the write lock: a map of the same page in between passed the "failed
/// invalidation?" check and succeeded while the SMMU could still hold the old translation. The failure is now
/// published under the read lock, before it is dropped: the unmap ends while another reader is still inside
/// (before, it waited for the write lock), the reader sees the failure, and a later map of the page settles it
/// first (refused while the TLBI is refused, then mapped once it is issued). Deterministic.
#[test]
fn a_failed_single_page_unmap_invalidation_is_published_before_its_read_lock_goes_so_no_map_passes_it() {
    let frames = frames();
    let model = Model::start(frames);
    let smmu = smmu(&model, frames);
    let d = smmu
        .create_stage1(
            memory(frames),
            Stage1Options {
                input_bits: 39,
                el2: false,
            },
        )
        .unwrap();
    smmu.map(d, Iova(0x40_0000), PhysAddr(0x8000_0000), PAGE, RW).unwrap();
    let slot = &smmu.domains.slots[usize::from(d.index())];
    model.refuse.store(opcode::TLBI_NH_VA, Ordering::SeqCst);
    let smmu = &smmu;
    // Another CPU's map is inside the domain (its read lock held) throughout the unmap.
    let inside = slot.state.read();
    let (finished, published) = std::thread::scope(|scope| {
        let unmap = scope.spawn(|| smmu.unmap(d, Iova(0x40_0000), PAGE));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while !unmap.is_finished() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        let finished = unmap.is_finished();
        let published = inside.as_ref().unwrap().has_unflushed();
        drop(inside);
        assert!(matches!(unmap.join().unwrap(), Err(DomainError::Invalidation(_))));
        (finished, published)
    });
    assert!(
        finished && published,
        "the failed invalidation was published under the read lock (finished {finished}, published {published})"
    );
    // A map of the page settles the failed invalidation first: refused while it fails, nothing mapped.
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
        "the old translation dropped first"
    );
    assert_eq!(smmu.iova_to_phys(d, Iova(0x40_0000)), Ok(Some(PhysAddr(0x9000_0000))));
}

/// Review 3, finding 8. `domain_faults` checked the handle under the domain's read lock, dropped it, and only then
/// copied the slot's report: a domain freed and a new one created in the slot in between, the stale handle read the
/// new domain's faults. The read lock is now held across the copy: while the report's lock is taken by someone
/// else, the reader waits holding the domain (no write lock, so no free, can get in). Deterministic: the domain
/// must be seen read-held in 5 polls in a row (2 s bound), which a reader that let go never shows.
#[test]
fn domain_faults_holds_the_domain_across_the_copy_so_a_stale_handle_never_reads_the_next_domains_faults() {
    let frames = frames();
    let model = Model::start(frames);
    let smmu = smmu(&model, frames);
    let a = smmu
        .create_stage1(
            memory(frames),
            Stage1Options {
                input_bits: 39,
                el2: false,
            },
        )
        .unwrap();
    let slot = &smmu.domains.slots[usize::from(a.index())];
    let smmu = &smmu;
    // Another reader holds the report (a filer, say).
    let report = slot.faults.lock();
    let held = std::thread::scope(|scope| {
        let reader = scope.spawn(|| smmu.domain_faults(a));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut in_a_row = 0;
        while in_a_row < 5 && std::time::Instant::now() < deadline {
            // A free would need the write lock: refused while the reader holds the domain.
            in_a_row = if slot.state.try_write().is_none() {
                in_a_row + 1
            } else {
                0
            };
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(report);
        assert_eq!(reader.join().unwrap().map(|r| r.total()), Ok(0));
        in_a_row == 5
    });
    assert!(
        held,
        "domain_faults let go of the domain before it copied the slot's report"
    );
    // A stale handle is refused, never answered with the slot's next domain's report.
    smmu.free_domain(a).unwrap();
    let b = smmu
        .create_stage1(
            memory(frames),
            Stage1Options {
                input_bits: 39,
                el2: false,
            },
        )
        .unwrap();
    assert_eq!(b.index(), a.index());
    assert_eq!(smmu.domain_faults(a), Err(DomainError::StaleDomain(a)));
}
