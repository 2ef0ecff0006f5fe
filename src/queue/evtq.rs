//! The event queue: drain and decode the records the SMMU wrote, detect overflow.
//!
//! The architecture signals a lost event by toggling EVENTQ_PROD.OVFLG, acknowledged by copying it to
//! EVENTQ_CONS.OVACKFLG. QEMU's SMMU (10.0) never sets OVFLG: it drops the event and raises GERROR.EVENTQ_ABT_ERR
//! instead. The driver handles both: [`DrainReport::overflow`] says which one it saw.

use core::sync::atomic::Ordering;

use tock_registers::interfaces::{Readable, Writeable};

use crate::hw::event::Event;
use crate::hw::regs::SmmuPage1Queues;
use crate::mem::{Coherency, DmaBlock, full_barrier, read_barrier};
use crate::queue::index::QueueGeometry;

/// Bytes per event record.
pub const EVENT_BYTES: usize = 32;

/// How overflow was signalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// EVENTQ_PROD.OVFLG differed from EVENTQ_CONS.OVACKFLG (the architecture's way).
    ProdOverflowFlag,
    /// GERROR.EVENTQ_ABT_ERR: the SMMU could not write a record (QEMU's way for a full queue).
    EventQueueAbort,
}

impl core::fmt::Display for Overflow {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Overflow::ProdOverflowFlag => "event queue overflowed (EVENTQ_PROD.OVFLG): events were lost",
            Overflow::EventQueueAbort => {
                "event queue write aborted (GERROR.EVENTQ_ABT_ERR, a full queue on QEMU): events were lost"
            }
        })
    }
}

/// What one drain found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Records consumed.
    pub events: u32,
    /// Events were lost since the last drain, and how the SMMU said so.
    pub overflow: Option<Overflow>,
    /// The drain stopped at its bound ([`DRAIN_BOUND_QUEUES`] queues' worth of records) with records still
    /// arriving: call it again (the event-queue interrupt will not fire again while the queue stays non-empty).
    pub pending: bool,
}

/// One drain consumes at most this many queues' worth of records, so an SMMU that keeps reporting (a device
/// hammering an unmapped address) cannot hold the CPU forever; [`DrainReport::pending`] says when it stopped
/// there.
pub const DRAIN_BOUND_QUEUES: u32 = 2;

/// The event queue in memory and the driver's copy of CONS.
pub(crate) struct EventQueue {
    memory: DmaBlock,
    geometry: QueueGeometry,
    cons: u32,
    coherency: Coherency,
}

impl EventQueue {
    /// Takes `memory` (zeroed by the CPU) as the queue. For a non-coherent SMMU the whole queue is cleaned and
    /// invalidated here, before its base is given to the SMMU: a dirty zero line left in the CPU's cache could
    /// otherwise be evicted over a record the SMMU wrote, or written back by the `DC CIVAC` that precedes each
    /// read.
    pub(crate) fn new(memory: DmaBlock, geometry: QueueGeometry, coherency: Coherency) -> Self {
        coherency.clean_invalidate(memory.virt.as_ptr(), memory.size);
        EventQueue {
            memory,
            geometry,
            cons: 0,
            coherency,
        }
    }

    pub(crate) fn into_memory(self) -> DmaBlock {
        self.memory
    }

    pub(crate) fn memory(&self) -> &DmaBlock {
        &self.memory
    }

    pub(crate) fn geometry(&self) -> QueueGeometry {
        self.geometry
    }

    /// Consumes every record the SMMU has written, handing each decoded event to `sink`, until the queue is
    /// empty *after* CONS was written: the event-queue interrupt fires only when the queue goes from empty to
    /// non-empty, so a record that arrives between the PROD read and the CONS write would otherwise sit there with
    /// no further interrupt. Bounded by [`DRAIN_BOUND_QUEUES`] queues' worth of records.
    ///
    /// A `sink` that answers `false` did not take the record (it could not file it now, e.g. a lock it only tries
    /// was held): the drain stops there, the record stays in the queue for the next drain, and the report says
    /// [`DrainReport::pending`].
    pub(crate) fn drain(&mut self, page1: &SmmuPage1Queues, mut sink: impl FnMut(Event) -> bool) -> DrainReport {
        let mut report = DrainReport::default();
        let budget = DRAIN_BOUND_QUEUES * self.geometry.entries();
        loop {
            let prod = page1.eventq_prod.get();
            let overflowed = self.geometry.overflow_flag(prod) != self.geometry.overflow_flag(self.cons);
            if overflowed {
                report.overflow = Some(Overflow::ProdOverflowFlag);
            }
            let empty = self.geometry.is_empty(prod, self.cons);
            if empty && !overflowed {
                return report;
            }
            if report.events >= budget {
                report.pending = true;
                return report;
            }
            // Records must be read after PROD that announced them.
            read_barrier();
            while !self.geometry.is_empty(prod, self.cons) && report.events < budget {
                let index = self.geometry.index(self.cons) as usize;
                // SAFETY: the queue memory is live for the life of `self` and accessed atomically.
                let words = unsafe { self.memory.words() };
                let record = &words[index * 4..][..4];
                self.coherency
                    .clean_invalidate(core::ptr::from_ref(&record[0]).cast(), EVENT_BYTES);
                let raw: [u64; 4] = core::array::from_fn(|i| record[i].load(Ordering::Relaxed));
                if !sink(Event::decode(&raw)) {
                    report.pending = true;
                    break;
                }
                report.events += 1;
                self.cons = self.geometry.advance(self.cons, 1);
            }
            // Acknowledge the overflow (OVACKFLG := OVFLG) with the new CONS; the reads above must be complete
            // before the SMMU may overwrite the slots.
            let ack = prod & (1 << 31);
            self.cons = (self.cons & !(1 << 31)) | ack;
            full_barrier();
            page1.eventq_cons.set(self.cons);
            if report.pending {
                return report;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::host_frames::HeapFrames;
    use crate::hw::event::number as kind;
    use crate::mem::FrameAllocator;
    use std::boxed::Box;
    use std::vec::Vec;

    /// The fake SMMU's side: writes records and PROD as the hardware would.
    struct Producer {
        queue: *mut u64,
        geometry: QueueGeometry,
        prod: u32,
    }

    impl Producer {
        fn push(&mut self, page1: &SmmuPage1Queues, code: u8, sid: u32) {
            let index = self.geometry.index(self.prod) as usize;
            let record = [u64::from(code) | u64::from(sid) << 32, 0, 0x1000 * u64::from(sid), 0];
            for (i, w) in record.iter().enumerate() {
                // SAFETY: the queue memory is live and `index` is inside it.
                unsafe { self.queue.add(index * 4 + i).write_volatile(*w) };
            }
            self.prod = self.geometry.advance(self.prod, 1) | (self.prod & (1 << 31));
            page1.eventq_prod.set(self.prod);
        }

        fn overflow(&mut self, page1: &SmmuPage1Queues) {
            self.prod ^= 1 << 31;
            page1.eventq_prod.set(self.prod);
        }
    }

    fn setup(frames: &HeapFrames, log2: u8) -> (EventQueue, Producer, Box<SmmuPage1Queues>) {
        let geometry = QueueGeometry::new(log2).unwrap();
        let memory = frames
            .allocate_zeroed(EVENT_BYTES << log2, EVENT_BYTES << log2)
            .unwrap();
        let producer = Producer {
            queue: memory.virt.as_ptr().cast(),
            geometry,
            prod: 0,
        };
        // SAFETY: plain register cells; zero is a valid value.
        let page1: Box<SmmuPage1Queues> = unsafe { Box::new(core::mem::zeroed()) };
        (
            EventQueue::new(memory, geometry, Coherency { coherent: true }),
            producer,
            page1,
        )
    }

    #[test]
    fn drains_in_order_across_the_wrap() {
        let frames = HeapFrames::default();
        let (mut q, mut p, page1) = setup(&frames, 2);
        let mut seen = Vec::new();
        for round in 0..5u32 {
            for i in 0..3 {
                p.push(&page1, kind::C_BAD_STE, round * 10 + i);
            }
            let report = q.drain(&page1, |e| {
                seen.push(e.stream_id().unwrap());
                true
            });
            assert_eq!(
                report,
                DrainReport {
                    events: 3,
                    overflow: None,
                    pending: false
                }
            );
            assert_eq!(
                page1.eventq_cons.get() & !(1 << 31),
                p.prod & !(1 << 31),
                "CONS caught up with PROD"
            );
        }
        let expected: Vec<u32> = (0..5).flat_map(|r| (0..3).map(move |i| r * 10 + i)).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn a_full_queue_is_drained_whole() {
        let frames = HeapFrames::default();
        let (mut q, mut p, page1) = setup(&frames, 3);
        for i in 0..8 {
            p.push(&page1, kind::F_TRANSLATION, i);
        }
        let mut n = 0;
        assert_eq!(
            q.drain(&page1, |_| {
                n += 1;
                true
            })
            .events,
            8
        );
        assert_eq!(n, 8);
    }

    #[test]
    fn overflow_flag_is_reported_once_and_acknowledged() {
        let frames = HeapFrames::default();
        let (mut q, mut p, page1) = setup(&frames, 2);
        p.push(&page1, kind::C_BAD_STE, 1);
        p.overflow(&page1);
        let report = q.drain(&page1, |_| true);
        assert_eq!(
            report,
            DrainReport {
                events: 1,
                overflow: Some(Overflow::ProdOverflowFlag),
                pending: false
            }
        );
        assert_eq!(page1.eventq_cons.get() >> 31, 1, "OVACKFLG copied from OVFLG");
        assert_eq!(q.drain(&page1, |_| true), DrainReport::default());
        // A second overflow toggles the flag back.
        p.overflow(&page1);
        assert_eq!(q.drain(&page1, |_| true).overflow, Some(Overflow::ProdOverflowFlag));
        assert_eq!(page1.eventq_cons.get() >> 31, 0);
    }
    #[test]
    fn records_that_arrive_while_draining_are_drained_too() {
        // The SMMU writes two more records after the driver read PROD (here: while it handles the first record)
        // and before it writes CONS. The queue never went empty, so no new interrupt comes: the drain that is
        // running must find them.
        let frames = HeapFrames::default();
        let (mut q, mut p, page1) = setup(&frames, 3);
        p.push(&page1, kind::C_BAD_STE, 1);
        p.push(&page1, kind::C_BAD_STE, 2);
        let mut seen = Vec::new();
        let report = q.drain(&page1, |e| {
            let sid = e.stream_id().unwrap();
            if sid == 1 {
                p.push(&page1, kind::F_TRANSLATION, 3);
                p.push(&page1, kind::F_TRANSLATION, 4);
            }
            seen.push(sid);
            true
        });
        assert_eq!(seen, [1, 2, 3, 4]);
        assert_eq!((report.events, report.pending), (4, false));
        assert_eq!(
            page1.eventq_cons.get(),
            p.prod,
            "the queue is empty after the last CONS write"
        );
    }

    /// A sink that cannot file a record now leaves it (and those after it) in the queue for the next drain: no
    /// record is lost or filed twice.
    #[test]
    fn a_refused_record_stays_for_the_next_drain() {
        let frames = HeapFrames::default();
        let (mut q, mut p, page1) = setup(&frames, 3);
        for sid in 1..=3 {
            p.push(&page1, kind::C_BAD_STE, sid);
        }
        let mut seen = Vec::new();
        let report = q.drain(&page1, |e| {
            let sid = e.stream_id().unwrap();
            if sid == 2 {
                return false;
            }
            seen.push(sid);
            true
        });
        assert_eq!((report.events, report.pending), (1, true));
        let report = q.drain(&page1, |e| {
            seen.push(e.stream_id().unwrap());
            true
        });
        assert_eq!((report.events, report.pending), (2, false));
        assert_eq!(seen, [1, 2, 3]);
    }

    #[test]
    fn an_endless_stream_of_records_is_drained_to_the_bound_and_reported_pending() {
        let frames = HeapFrames::default();
        let (mut q, mut p, page1) = setup(&frames, 2);
        p.push(&page1, kind::C_BAD_STE, 0);
        let mut n = 0u32;
        // Each record handled makes the SMMU write another: the drain must stop at its bound.
        let report = q.drain(&page1, |_| {
            n += 1;
            p.push(&page1, kind::C_BAD_STE, n);
            true
        });
        assert_eq!(report.events, DRAIN_BOUND_QUEUES * 4);
        assert!(report.pending, "records were left: the caller must drain again");
        assert_eq!(
            q.drain(&page1, |_| true).events,
            1,
            "the one left is found by the next drain"
        );
    }

    #[test]
    fn a_non_coherent_queue_is_cleaned_and_invalidated_before_the_smmu_owns_it() {
        use crate::mem::{Maintenance, maintenance_log};
        let frames = HeapFrames::default();
        let geometry = QueueGeometry::new(4).unwrap();
        let memory = frames.allocate_zeroed(EVENT_BYTES << 4, EVENT_BYTES << 4).unwrap();
        let (start, len) = (memory.virt.as_ptr() as usize, memory.size);
        maintenance_log::take();
        let q = EventQueue::new(memory, geometry, Coherency { coherent: false });
        let log = maintenance_log::take();
        assert!(
            maintenance_log::covers(&log, Maintenance::CleanInvalidate, start, len),
            "every line of the zeroed queue written back and dropped from the cache: {log:x?}"
        );
        // SAFETY: the SMMU never had it.
        unsafe { frames.free(q.into_memory()) };
    }
}
