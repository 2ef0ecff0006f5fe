//! `smp-dma`: every CPU maps and unmaps on its own domain and on one domain they share, while two edu devices DMA
//! through them, with one [`Iommu`] shared by reference (no lock around it).
//!
//! - Edu A's stream is attached to the shared domain for the whole run. Each CPU, round after round, maps a source
//!   and a destination page at IOVAs interleaved with the other CPUs' (so that they install and fill the same
//!   tables at once), has edu A copy a pattern through them, checks it landed, and unmaps them.
//! - Edu B is every CPU's in turn: a CPU attaches it to its own domain (mapped meanwhile, while the others map
//!   theirs), DMAs through it, and detaches it again.
//! - Every fourth round a CPU has edu A write to the destination it has just unmapped: the write must fault (its
//!   page keeps its canary), in the shared domain. The event-queue interrupt goes round the CPUs; whichever CPU
//!   takes it drains the queue in interrupt context ([`Iommu::handle_interrupt`]), filing each fault under its
//!   domain (a thread's detach files what the queue holds too). At the end the shared domain holds every fault,
//!   and nothing is filed elsewhere; the host test checks the total against the records QEMU's trace shows the
//!   SMMU wrote: none lost, none filed twice.
//!
//! Edu's DMA engine is one per device, so a CPU holds the device's lock across its DMA; map, unmap, attach and
//! detach run outside it, on every CPU at once.

use core::fmt::Write;
use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};
use smmuv3::{Iova, PhysAddr};

use smmuv3::{DomainId, DomainKind, Iommu, Stage1Options, Stage2Options};
use spin::mutex::SpinMutex;

use super::core_smmu::start;
use super::domains::{LEN, RW, byte, fill, memory, pattern, preferred_kind, two_edus};
use super::{Context, Failure};
use crate::edu::{Direction, Edu};
use crate::frames::{self, Frames};
use crate::irq::{self, Route};
use crate::smp::{self, Barrier, Cpus, MAX_CPUS};
use crate::{println, time};

/// Rounds per CPU.
const ROUNDS: u64 = 24;
/// Every this many rounds a CPU provokes a fault in the shared domain.
const FAULT_EVERY: u64 = 4;
/// The shared domain's IOVA window: CPU `c`'s round `r` uses the two pages at `SHARED_BASE + 2 * (r * cpus + c)`.
const SHARED_BASE: u64 = 0x4000_0000;
/// Each CPU's own domain maps its pages here.
const OWN_BASE: u64 = 0x1000_0000;
/// What an unwritten destination holds.
const CANARY: u8 = 0xc5;

/// The driver the interrupt hook drains (set for the scenario's length only), and what the hook drained.
static SHARED: AtomicPtr<Iommu<Frames>> = AtomicPtr::new(ptr::null_mut());
static DRAINED_IN_IRQ: AtomicU64 = AtomicU64::new(0);
static DRAINS_ON: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
static DRAIN_ERRORS: AtomicU32 = AtomicU32::new(0);
static WATCHED: AtomicU32 = AtomicU32::new(u32::MAX);

/// The interrupt hook: the CPU that took the event-queue interrupt drains it (the one call the driver allows in
/// interrupt context).
fn drain_in_irq(intid: u32, cpu: usize) {
    if intid != WATCHED.load(Ordering::Relaxed) {
        return;
    }
    // Acquire: pairs with the Release store that published the driver before the line was routed here.
    let iommu = SHARED.load(Ordering::Acquire);
    if iommu.is_null() {
        return;
    }
    // SAFETY: `smp_dma` publishes a pointer to the driver it holds, and clears it (with the hook removed) before the
    // driver is dropped; `Iommu` is Sync, so a shared reference from any CPU is sound.
    let iommu = unsafe { &*iommu };
    match iommu.handle_interrupt() {
        Ok(report) => {
            DRAINED_IN_IRQ.fetch_add(u64::from(report.events), Ordering::Relaxed);
            if report.events != 0
                && let Some(count) = DRAINS_ON.get(cpu)
            {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(_) => {
            DRAIN_ERRORS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One CPU's pages: two in the shared domain, two in its own.
#[derive(Clone, Copy)]
struct Pages {
    shared_source: u64,
    shared_destination: u64,
    own_source: u64,
    own_destination: u64,
}

/// What one CPU did.
#[derive(Default)]
struct Work {
    rounds: u64,
    own_dmas: u64,
    faults_provoked: u64,
}

/// `smp-dma` (see the module documentation).
pub fn smp_dma(context: &mut Context) -> Result<(), Failure> {
    let total = smp::cpu_count();
    if total < 2 {
        fail!("needs at least 2 CPUs; the platform lists 1 (QEMU: -smp 4, `cargo xtask qemu --smp 4`)")
    }
    let devices = two_edus(context, "smp-dma")?;
    if !irq::smmu_lines_enabled() {
        fail!("the SMMU's lines are not taken through a GIC on this board")
    }
    let Some(eventq) = context.platform.smmu.interrupts.eventq else {
        fail!("the SMMU has no event-queue interrupt")
    };
    let mut pages: heapless::Vec<Pages, MAX_CPUS> = heapless::Vec::new();
    for _ in 0..total {
        let mut four = [0u64; 4];
        for p in &mut four {
            *p = frames::alloc(4096, 4096).or_else(|e| fail!("DMA pages: {e}"))? as u64;
        }
        let _ = pages.push(Pages {
            shared_source: four[0],
            shared_destination: four[1],
            own_source: four[2],
            own_destination: four[3],
        });
    }

    let s = start(context, &smmuv3::InitOptions::default())?;
    let iommu: &Iommu<Frames> = &s;
    let kind = preferred_kind(iommu.features());
    let create = || match kind {
        DomainKind::Stage1 => iommu.create_stage1(
            memory(),
            Stage1Options {
                input_bits: 39,
                el2: false,
            },
        ),
        _ => iommu.create_stage2(
            memory(),
            Stage2Options {
                input_bits: 40.min(iommu.features().oas_bits),
            },
        ),
    };
    let shared = create().or_else(|e| fail!("create the shared domain: {e}"))?;
    let mut own: heapless::Vec<DomainId, MAX_CPUS> = heapless::Vec::new();
    for cpu in 0..total {
        let d = create().or_else(|e| fail!("create CPU {cpu}'s domain: {e}"))?;
        let _ = own.push(d);
    }
    let (edu_a, sid_a) = &devices[0];
    let (edu_b, sid_b) = &devices[1];
    iommu.attach(shared, *sid_a).or_else(|e| fail!("attach edu A: {e}"))?;

    // Interrupt context drains from here on, on whichever CPU takes the line.
    DRAINED_IN_IRQ.store(0, Ordering::Relaxed);
    DRAIN_ERRORS.store(0, Ordering::Relaxed);
    for count in &DRAINS_ON {
        count.store(0, Ordering::Relaxed);
    }
    WATCHED.store(eventq, Ordering::Relaxed);
    SHARED.store(ptr::from_ref(iommu).cast_mut(), Ordering::Release);
    irq::set_hook(Some(drain_in_irq));
    let distribution = irq::route(eventq, Route::AnyCpu);
    let before: [u32; MAX_CPUS] = core::array::from_fn(|cpu| if cpu < total { irq::count_on(eventq, cpu) } else { 0 });

    let edu_a = SpinMutex::new(edu_a);
    let edu_b = SpinMutex::new(edu_b);
    let started = time::ticks();
    let outcome = match (distribution, Cpus::all()) {
        (Ok(distribution), Ok(cpus)) => {
            let barrier = Barrier::new(total);
            let results = cpus.run(|cpu| {
                barrier.wait();
                work(iommu, cpu, total, pages[cpu], shared, own[cpu], *sid_b, &edu_a, &edu_b)
            });
            let stopped = cpus.stop();
            Ok((distribution, results, stopped))
        }
        (Err(e), _) => Err(fail_value(format_args!("routing INTID {eventq} to any CPU: {e}"))),
        (_, Err(e)) => Err(fail_value(format_args!("starting the secondaries: {e}"))),
    };
    let micros = time::to_us(time::ticks() - started);
    // Let the last interrupt land, then stop draining in interrupt context before the driver can go.
    let settle = time::deadline_us(20_000);
    while !time::expired(settle) {
        core::hint::spin_loop();
    }
    irq::set_hook(None);
    SHARED.store(ptr::null_mut(), Ordering::Release);
    let back = irq::route(eventq, Route::Cpu(0));
    let (distribution, results, stopped) = outcome?;
    stopped.or_else(|e| fail!("stopping the secondaries: {e}"))?;
    back.or_else(|e| fail!("routing back to CPU 0: {e}"))?;

    let mut done = Work::default();
    for (cpu, result) in results.into_iter().enumerate() {
        let work = result.or_else(|e| fail!("CPU {cpu}: {e}"))?;
        done.rounds += work.rounds;
        done.own_dmas += work.own_dmas;
        done.faults_provoked += work.faults_provoked;
    }
    if DRAIN_ERRORS.load(Ordering::Relaxed) != 0 {
        fail!(
            "{} drain(s) in interrupt context failed",
            DRAIN_ERRORS.load(Ordering::Relaxed)
        )
    }

    // Whatever interrupt context left (a record that arrived after the last interrupt) drains here.
    let mut drained_here = 0u64;
    loop {
        let report = iommu.drain_faults(|_| {}).or_else(|e| fail!("{e}"))?;
        drained_here += u64::from(report.events);
        if report.overflow.is_some() {
            fail!("event queue overflow: {:?}", report.overflow)
        }
        if !report.pending {
            break;
        }
    }
    let in_irq = DRAINED_IN_IRQ.load(Ordering::Relaxed);
    let filed = iommu.clear_domain_faults(shared).or_else(|e| fail!("{e}"))?;
    let elsewhere = iommu.clear_unattached_faults();
    if elsewhere.total() != 0 {
        fail!(
            "{} fault(s) filed outside any domain: {:?}",
            elsewhere.total(),
            elsewhere.faults.first()
        )
    }
    for (cpu, d) in own.iter().enumerate() {
        let faults = iommu.clear_domain_faults(*d).or_else(|e| fail!("{e}"))?;
        if faults.total() != 0 {
            fail!(
                "CPU {cpu}'s domain took {} fault(s): {:?}",
                faults.total(),
                faults.faults.first()
            )
        }
    }
    if let Some(f) = filed.faults.iter().find(|f| {
        f.stream != *sid_a
            || f.kind != smmuv3::FaultKind::Translation
            || f.write != Some(true)
            || !f
                .address
                .is_some_and(|a| (SHARED_BASE..SHARED_BASE + shared_window(total)).contains(&a))
    }) {
        fail!("an unexpected fault in the shared domain: {f}")
    }
    // Records also reach the domains through the threads' own drains (a detach files what the queue holds before
    // its stream's STE changes): the host compares the total filed with the records QEMU wrote.
    if in_irq == 0 {
        fail!("no fault was drained in interrupt context")
    }
    if u64::from(filed.total()) < in_irq + drained_here {
        fail!(
            "{} record(s) drained by interrupt context and the final drain but only {} fault(s) filed",
            in_irq + drained_here,
            filed.total()
        )
    }
    if u64::from(filed.total()) < done.faults_provoked {
        fail!(
            "{} faulting DMA(s) but {} fault(s) filed",
            done.faults_provoked,
            filed.total()
        )
    }
    let mut takers = heapless::String::<128>::new();
    for cpu in 0..total {
        let _ = write!(
            takers,
            "{}CPU {cpu}: {}/{}",
            if cpu == 0 { "" } else { ", " },
            irq::count_on(eventq, cpu) - before[cpu],
            DRAINS_ON[cpu].load(Ordering::Relaxed)
        );
    }
    println!(
        "  {total} CPUs, {kind} domains: {} rounds of map, DMA through edu A, unmap in the shared domain and {} DMAs \
         through edu B attached to each CPU's own domain in turn, in {} ms; every pattern landed",
        done.rounds,
        done.own_dmas,
        micros / 1000
    );
    println!(
        "  {} faulting DMA(s) -> {} fault(s) filed in the shared domain ({in_irq} drained in interrupt context, \
         {drained_here} by the final drain, {} by the threads' own drains), none elsewhere",
        done.faults_provoked,
        filed.total(),
        u64::from(filed.total()) - in_irq - drained_here
    );
    println!("  event-queue interrupt ({distribution}), taken/drained: {takers}");

    iommu.detach(*sid_a).or_else(|e| fail!("detach edu A: {e}"))?;
    iommu
        .free_domain(shared)
        .or_else(|e| fail!("free the shared domain: {e}"))?;
    for d in own {
        iommu.free_domain(d).or_else(|e| fail!("free a CPU's domain: {e}"))?;
    }
    drop(s);
    Ok(())
}

/// The bytes of the shared domain's IOVA window the CPUs use.
fn shared_window(total: usize) -> u64 {
    2 * ROUNDS * total as u64 * 4096
}

/// A failure built outside `fail!`'s early return.
fn fail_value(args: core::fmt::Arguments) -> Failure {
    let mut reason = Failure::new();
    let _ = reason.write_fmt(args);
    reason
}

/// One CPU's rounds.
#[allow(clippy::too_many_arguments)]
fn work(
    iommu: &Iommu<Frames>,
    cpu: usize,
    total: usize,
    pages: Pages,
    shared: DomainId,
    own: DomainId,
    sid_b: u32,
    edu_a: &SpinMutex<&Edu>,
    edu_b: &SpinMutex<&Edu>,
) -> Result<Work, Failure> {
    let mut done = Work::default();
    let err = |what: &str, e: &dyn core::fmt::Display| fail_value(format_args!("{what}: {e}"));
    for round in 0..ROUNDS {
        let seed = (cpu as u8).wrapping_mul(41).wrapping_add(round as u8);
        // Shared domain: two pages among every CPU's, through edu A.
        let slot = 2 * (round * total as u64 + cpu as u64);
        let source = SHARED_BASE + slot * 4096;
        let destination = source + 4096;
        fill(pages.shared_source, pattern(seed));
        fill(pages.shared_destination, |_| CANARY);
        iommu
            .map(shared, Iova(source), PhysAddr(pages.shared_source), 4096, RW)
            .map_err(|e| err("map (shared)", &e))?;
        iommu
            .map(shared, Iova(destination), PhysAddr(pages.shared_destination), 4096, RW)
            .map_err(|e| err("map (shared)", &e))?;
        {
            let edu = edu_a.lock();
            edu.dma(Direction::ToDevice, source, 0, LEN as u64)
                .map_err(|e| err("edu A read", &e))?;
            edu.dma(Direction::FromDevice, destination, 0, LEN as u64)
                .map_err(|e| err("edu A write", &e))?;
        }
        landed(pages.shared_destination, seed).map_err(|e| err("shared domain", &e))?;
        iommu
            .unmap(shared, Iova(source), 4096)
            .map_err(|e| err("unmap (shared)", &e))?;
        iommu
            .unmap(shared, Iova(destination), 4096)
            .map_err(|e| err("unmap (shared)", &e))?;
        if round % FAULT_EVERY == FAULT_EVERY - 1 {
            // The destination just unmapped (and invalidated): the write must fault and leave the page alone.
            fill(pages.shared_destination, |_| CANARY);
            {
                let edu = edu_a.lock();
                // Faulting DMA: edu reports completion or an error; either way nothing may land.
                let _ = edu.dma(Direction::FromDevice, destination, 0, LEN as u64);
            }
            if let Some(i) = (0..4096).find(|&i| byte(pages.shared_destination, i) != CANARY) {
                return Err(err("an unmapped IOVA was written", &i));
            }
            done.faults_provoked += 1;
        }
        // Own domain: mapped while the others work, then edu B for one DMA through it.
        let own_source = OWN_BASE + 2 * round * 4096;
        let own_destination = own_source + 4096;
        let own_seed = seed ^ 0x5a;
        fill(pages.own_source, pattern(own_seed));
        fill(pages.own_destination, |_| CANARY);
        iommu
            .map(own, Iova(own_source), PhysAddr(pages.own_source), 4096, RW)
            .map_err(|e| err("map (own)", &e))?;
        iommu
            .map(own, Iova(own_destination), PhysAddr(pages.own_destination), 4096, RW)
            .map_err(|e| err("map (own)", &e))?;
        {
            let edu = edu_b.lock();
            iommu.attach(own, sid_b).map_err(|e| err("attach edu B", &e))?;
            let copied = edu
                .dma(Direction::ToDevice, own_source, 0, LEN as u64)
                .and_then(|()| edu.dma(Direction::FromDevice, own_destination, 0, LEN as u64));
            iommu.detach(sid_b).map_err(|e| err("detach edu B", &e))?;
            copied.map_err(|e| err("edu B", &e))?;
        }
        landed(pages.own_destination, own_seed).map_err(|e| err("own domain", &e))?;
        iommu
            .unmap(own, Iova(own_source), 2 * 4096)
            .map_err(|e| err("unmap (own)", &e))?;
        done.own_dmas += 1;
        done.rounds += 1;
    }
    Ok(done)
}

/// The first `LEN` bytes at `pa` follow `pattern(seed)`, the rest still holds the canary: the index of the first
/// byte that does not.
fn landed(pa: u64, seed: u8) -> Result<(), usize> {
    let p = pattern(seed);
    match (0..4096).find(|&i| byte(pa, i) != if i < LEN { p(i) } else { CANARY }) {
        Some(i) => Err(i),
        None => Ok(()),
    }
}
