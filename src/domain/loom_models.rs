//! loom models of the domain table's slots and generations (`RUSTFLAGS="--cfg loom" cargo test --release -p
//! smmuv3 --lib domain::loom`): a fault filed (by a drain, possibly in interrupt context, which takes no domain
//! lock) while its domain is freed and the slot handed to the next domain. The generation (an atomic) and the
//! slot's fault report (a loom mutex under `cfg(loom)`) are the driver's own; the slot's state lock is taken by one
//! thread only, so loom need not see it.

extern crate std;

use std::sync::Arc;

use loom::thread;

use super::create::NO_MEMORY;
use super::fault::Fault;
use super::table::{Book, Domains, Fixed};

/// Memory for the models' domain tables.
fn loom_frames() -> &'static crate::host_frames::HeapFrames {
    std::boxed::Box::leak(std::boxed::Box::default())
}
use super::{DomainState, StreamRecord, Translation};
use crate::hw::event::Event;
use crate::ids::DomainId;
use crate::smmu::Drainer;

/// Runs `f` under loom, on a thread with room for the domain table (its bookkeeping holds every attached stream:
/// some 40 KiB, built on the stack), with the preemption bound of `LOOM_MAX_PREEMPTIONS` (3 when it is not set).
fn model(f: impl Fn() + Sync + Send + 'static) {
    let f = Arc::new(f);
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(move || {
        let f = Arc::clone(&f);
        spawn(move || f()).join().unwrap();
    });
}

fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
    thread::Builder::new().stack_size(1 << 22).spawn(f).unwrap()
}

fn blocked() -> DomainState {
    DomainState::new(Translation::Fixed(Fixed::Blocked), &NO_MEMORY)
}

/// A translation fault of stream 0x10 (as `domain::tests::fault` builds it).
fn event() -> Event {
    Event::decode(&[0x10 | 0x10 << 32, 0, 0x1000, 0])
}

/// Routing that names `domain` for stream 0x10 (the drain's copy: the one it holds while filing).
fn routing(domain: DomainId) -> Domains<1> {
    let routing = Domains::<1>::new(loom_frames(), None, 1).unwrap();
    let _ = routing.book.lock().streams.push(StreamRecord {
        sid: 0x10,
        domain,
        cd_table: None,
        substreams: heapless::Vec::new(),
        busy: false,
    });
    routing
}

fn file(domains: &Domains<1>, book: &Book<1>, who: Drainer) -> bool {
    domains.file(book, &event(), who)
}

/// A fault filed for a domain that is freed meanwhile, its slot taken by the next domain: the fault is never in
/// the next domain's report, and it is filed exactly once (under the old domain, whose report goes with it, or
/// in the SMMU-wide report).
#[test]
fn loom_a_fault_for_a_freed_domain_never_reaches_the_slots_next_domain() {
    model(|| {
        let domains = Arc::new(Domains::<1>::new(loom_frames(), None, 1).unwrap());
        let first = domains.insert(&mut domains.book.lock(), blocked()).ok().unwrap();
        let filer = {
            let domains = Arc::clone(&domains);
            spawn(move || {
                let routing = routing(first);
                file(&domains, &routing.book.lock(), Drainer::Thread)
            })
        };
        let mut book = domains.book.lock();
        assert!(domains.remove(&mut book, first).is_some());
        let next = domains.insert(&mut book, blocked()).ok().unwrap();
        drop(book);
        assert!(filer.join().unwrap(), "a thread's filing always files");
        assert_eq!(next.index(), first.index());
        assert_ne!(next.generation(), first.generation());
        let slot = &domains.slots[0];
        assert_eq!(slot.faults.lock().total(), 0, "the next domain's report is its own");
        assert!(domains.unattached_faults.lock().total() <= 1);
    });
}

/// An interrupt's filing only tries the report's lock: against a reader holding it, the record is either filed
/// once or left for later (`false`), never lost while reported filed, never filed twice.
#[test]
fn loom_an_interrupt_filing_against_a_reader_files_once_or_leaves_the_record() {
    model(|| {
        let domains = Arc::new(Domains::<1>::new(loom_frames(), None, 1).unwrap());
        let d = domains.insert(&mut domains.book.lock(), blocked()).ok().unwrap();
        let filer = {
            let domains = Arc::clone(&domains);
            spawn(move || {
                let routing = routing(d);
                file(&domains, &routing.book.lock(), Drainer::Interrupt)
            })
        };
        // A reader copying the report meanwhile (`Iommu::domain_faults`).
        let seen = domains.slots[0].faults.lock().total();
        let filed = filer.join().unwrap();
        let now = domains.slots[0].faults.lock().total();
        assert!(seen <= now);
        assert_eq!(now, u32::from(filed));
        assert_eq!(domains.unattached_faults.lock().total(), 0);
        let _ = Fault::of(&event()).unwrap();
    });
}
