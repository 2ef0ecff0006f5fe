//! Attach, detach and free serialise only what they must (issue 22): each waits for its CMD_SYNCs holding neither
//! the bookkeeping nor the stream table, so other CPUs' structural operations (and interrupts) go on meanwhile; and
//! what reads every stream (a hand-off's records, prepare, restore) waits for an attach or detach half-way.

use std::boxed::Box;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::{Arc, Mutex};

use super::el2::el2_model;
use super::handover::handover_pool;
use super::*;

/// Every command of an attach, a substream attach and detach, a detach and a free is consumed while neither the
/// bookkeeping nor the stream table's lock is held (the model's probe looks as it consumes each one, while the
/// operation waits for it). Before, both were held across every STE write's CFGI_STE + CMD_SYNC, and the
/// bookkeeping across a free's TLBI + CMD_SYNC: every other CPU's attach, detach, free, create and preserve waited.
#[test]
fn attach_detach_and_free_wait_for_the_smmu_holding_neither_the_bookkeeping_nor_the_stream_table() {
    let frames = frames();
    let model = el2_model(frames);
    let smmu: &'static Iommu<&'static HeapFrames> = Box::leak(Box::new(smmu(&model, frames)));
    let stage1 = |smmu: &Iommu<&'static HeapFrames>| {
        smmu.create_stage1(
            memory(frames),
            Stage1Options {
                input_bits: 39,
                el2: false,
            },
        )
        .unwrap()
    };
    let (a, b) = (stage1(smmu), stage1(smmu));
    let c = smmu
        .create_stage2(memory(frames), Stage2Options { input_bits: 40 })
        .unwrap();
    // The streams' level-2 span made first: a new span's level-1 descriptor is the one write that keeps the
    // stream table's lock until its invalidation completes.
    smmu.attach(c, SID + 1).unwrap();
    smmu.detach(SID + 1).unwrap();
    let (seen, held) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let (s, h) = (seen.clone(), held.clone());
    *model.probe.lock().unwrap() = Some(Box::new(move || {
        s.fetch_add(1, Ordering::SeqCst);
        if smmu.domains.book.try_lock().is_none() || smmu.core.stream_table_held() {
            h.fetch_add(1, Ordering::SeqCst);
        }
        0
    }));
    smmu.attach(a, SID).unwrap();
    smmu.attach_substream(b, SID, 1).unwrap();
    smmu.attach(c, SID + 1).unwrap();
    smmu.detach_substream(SID, 1).unwrap();
    smmu.detach(SID).unwrap();
    smmu.detach(SID + 1).unwrap();
    for d in [a, b, c] {
        smmu.free_domain(d).unwrap();
    }
    *model.probe.lock().unwrap() = None;
    assert!(seen.load(Ordering::SeqCst) >= 14, "{seen:?} commands");
    assert_eq!(
        held.load(Ordering::SeqCst),
        0,
        "commands waited for with the bookkeeping or the stream table held"
    );
}

/// A hand-off's records are one consistent picture: an attach that writes its STE outside the bookkeeping is
/// waited for, and then recorded (prepare and restore wait the same way, through the same lock).
#[test]
fn a_handoffs_records_wait_for_an_attach_half_way_and_then_include_it() {
    let frames = frames();
    let model = Model::start(frames);
    let smmu: &'static Iommu<&'static HeapFrames> = Box::leak(Box::new(smmu(&model, frames)));
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
    smmu.preserve(d, 7).unwrap();
    // The stream's level-2 span made first (a new span keeps the stream table's lock across its sync, which
    // would hold up the reader for another reason).
    smmu.attach(d, SID + 1).unwrap();
    smmu.detach(SID + 1).unwrap();
    // The record's StreamIDs and its first stream's CD table, copied out of the reader's buffer.
    type Records = Result<(Vec<u32>, u64), crate::handover::live::RecordError>;
    let reader: Arc<Mutex<Option<std::thread::JoinHandle<Records>>>> = Arc::new(Mutex::new(None));
    let early = Arc::new(AtomicBool::new(true));
    let (r, e) = (reader.clone(), early.clone());
    *model.probe.lock().unwrap() = Some(Box::new(move || {
        let mut reader = r.lock().unwrap();
        if reader.is_none() {
            // The attach waits for its first STE sync: another CPU reads the records meanwhile.
            let handle = std::thread::spawn(move || {
                let mut buffer = std::vec![0; 4096];
                smmu.handover_records(0x905_0000, &mut buffer).map(|records| {
                    let first = records.records.first().unwrap();
                    let cd_table = first.streams.first().map_or(0, |s| s.cd_table);
                    (first.streams.iter().map(|s| s.sid).collect(), cd_table)
                })
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            e.store(handle.is_finished(), Ordering::SeqCst);
            *reader = Some(handle);
        }
        0
    }));
    smmu.attach(d, SID).unwrap();
    *model.probe.lock().unwrap() = None;
    let handle = reader.lock().unwrap().take().expect("the attach issued commands");
    let records = handle.join().unwrap().unwrap();
    assert!(
        !early.load(Ordering::SeqCst),
        "the records were read with the attach half-way"
    );
    let (streams, cd_table) = records;
    assert_eq!(streams, [SID], "the attach that was waited for is recorded");
    assert_ne!(cd_table, 0, "with its CD table");
}

/// Threads attach and detach their own streams to their own domains, and free and create domains, all at once:
/// every attach lands, every stream ends where its thread left it, the routing and the STEs agree.
#[test]
fn threads_attach_detach_and_free_at_once() {
    for threads in [2u32, 4, 8] {
        let frames = frames();
        let model = Model::start(frames);
        let smmu = smmu(&model, frames);
        let smmu = &smmu;
        std::thread::scope(|scope| {
            for t in 0..threads {
                scope.spawn(move || {
                    for round in 0..20u32 {
                        let d = match round % 2 {
                            0 => smmu
                                .create_stage1(
                                    memory(frames),
                                    Stage1Options {
                                        input_bits: 39,
                                        el2: false,
                                    },
                                )
                                .unwrap(),
                            _ => smmu
                                .create_stage2(memory(frames), Stage2Options { input_bits: 40 })
                                .unwrap(),
                        };
                        let sids = [0x100 + t * 4, 0x101 + t * 4];
                        for sid in sids {
                            smmu.attach(d, sid).unwrap();
                        }
                        assert_eq!(smmu.attached(d).unwrap().len(), 2);
                        assert!(matches!(
                            smmu.free_domain(d),
                            Err(DomainError::StillAttached { attachments: 2, .. })
                        ));
                        // The last round leaves the first stream attached.
                        for sid in sids.iter().skip(usize::from(round == 19)) {
                            smmu.detach(*sid).unwrap();
                        }
                        if round < 19 {
                            smmu.free_domain(d).unwrap();
                            assert_eq!(smmu.domain_kind(d), Err(DomainError::StaleDomain(d)));
                        }
                    }
                });
            }
        });
        for t in 0..threads {
            let (kept, gone) = (0x100 + t * 4, 0x101 + t * 4);
            let ste = smmu.low_level().ste(kept).unwrap();
            assert!(
                !matches!(ste.config(), crate::hw::ste::Config::Abort),
                "{threads} threads: stream {kept:#x} translates"
            );
            assert_eq!(smmu.low_level().ste(gone).unwrap(), crate::hw::ste::Ste::abort());
            let book = smmu.book();
            let record = &book.streams[book.stream(kept).unwrap()];
            assert!(!record.busy);
            assert!(book.stream(gone).is_none());
        }
        assert_eq!(smmu.book().streams.len(), threads as usize);
    }
}

/// Review of the change above, finding 1: an EL2 domain's free, which keeps the bookkeeping across its
/// TLBI_EL2_ALL, must not hold the domain's read lock while it waits for the bookkeeping (the lock order: the
/// bookkeeping first). It did (a guard living through a `match`), and an attach holding the bookkeeping that
/// write-locks the domain then waited for it for good. Here the bookkeeping is held while the free waits for it:
/// the domain's slot must be free to write-lock meanwhile.
#[test]
fn an_el2_free_waiting_for_the_bookkeeping_holds_no_slot_lock() {
    let frames = frames();
    let model = el2_model(frames);
    let smmu: &'static Iommu<&'static HeapFrames> = Box::leak(Box::new(smmu(&model, frames)));
    let d = smmu
        .create_stage1(
            memory(frames),
            Stage1Options {
                input_bits: 39,
                el2: true,
            },
        )
        .unwrap();
    let held = smmu.domains.book.lock();
    let free = std::thread::spawn(move || smmu.free_domain(d));
    std::thread::sleep(std::time::Duration::from_millis(100));
    let slot = &smmu.domains.slots[usize::from(d.index())];
    let writable = slot.state.try_write().is_some();
    drop(held);
    assert_eq!(free.join().unwrap(), Ok(()));
    assert!(
        writable,
        "the free held the domain's slot lock while it waited for the bookkeeping"
    );
}
