//! `smp-hello`: every CPU of the machine started through PSCI CPU_ON, each running a work item on its own stack
//! with the boot CPU's EL2 identity map and vectors and a GIC redistributor and CPU interface of its own; an SGI
//! taken by each secondary; the SMMU's event-queue interrupt routed to CPU 2 and taken (and handled by the hook)
//! there only, then routed to any CPU and taken by every CPU in turn; every CPU off again at the end.

use core::fmt::Write;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use aarch64_cpu::registers::{CurrentEL, MAIR_EL2, Readable, SCTLR_EL2, TCR_EL2, TTBR0_EL2, VBAR_EL2};
use smmuv3::InitOptions;

use super::core_smmu::{Session, edu_stream, expect_quiet, start};
use super::{Context, Failure, dma_onto_canary};
use crate::edu::Edu;
use crate::irq::{self, Distribution, Route};
use crate::smp::{self, Barrier, Cpus, MAX_CPUS};
use crate::{println, time};

/// Increments each CPU makes, of its own counter and of the shared one.
const ITERATIONS: u64 = 10_000;
/// The CPU the event-queue interrupt is routed to first (the last CPU on a machine with fewer).
const TARGET_CPU: usize = 2;

/// What one CPU reports from its work item.
struct Hello {
    /// Its number as TPIDR_EL2 holds it.
    tpidr: usize,
    mpidr: u64,
    el: u64,
    /// TTBR0_EL2, TCR_EL2, MAIR_EL2, SCTLR_EL2 and VBAR_EL2 equal the boot CPU's.
    same_regime: bool,
    /// The address of a local: on its own stack.
    stack: usize,
    /// Both barriers completed.
    barriers: bool,
    /// Its own counter after its increments.
    own: u64,
    /// The shared counter after the second barrier: every CPU's increments.
    shared_seen: u64,
    /// From the start of the work item to the second barrier, in microseconds.
    micros: u64,
}

fn regime() -> [u64; 5] {
    [
        TTBR0_EL2.get(),
        TCR_EL2.get(),
        MAIR_EL2.get(),
        SCTLR_EL2.get(),
        VBAR_EL2.get(),
    ]
}

/// The event-queue INTID the hook watches, and how many times each CPU's hook saw it.
static WATCHED: AtomicU32 = AtomicU32::new(u32::MAX);
static HANDLED: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];

/// The hook: runs in interrupt context on the CPU that took the interrupt.
fn handled(intid: u32, cpu: usize) {
    if intid == WATCHED.load(Ordering::Relaxed)
        && let Some(count) = HANDLED.get(cpu)
    {
        count.fetch_add(1, Ordering::Relaxed);
    }
}

/// `smp-hello` (see the module documentation).
pub fn smp_hello(context: &mut Context) -> Result<(), Failure> {
    let total = smp::cpu_count();
    if let Some(expected) = context.config.expected_cpus
        && expected != total
    {
        fail!("the host started {expected} CPUs, the platform lists {total}")
    }
    if total < 2 {
        fail!("needs at least 2 CPUs; the platform lists 1 (QEMU: -smp 4, `cargo xtask qemu --smp 4`)")
    }
    let started = time::ticks();
    let cpus = Cpus::all().or_else(|e| fail!("starting the secondaries: {e}"))?;
    let start_us = time::to_us(time::ticks() - started);
    for cpu in 1..total {
        if let Some(e) = smp::gic_error(cpu) {
            fail!("CPU {cpu} came online without its GIC: {e}")
        }
    }
    println!(
        "  {total} CPUs online: CPUs 1-{} started through PSCI CPU_ON in {start_us} us",
        total - 1
    );
    hello(&cpus)?;
    ping(total)?;
    smmu_interrupts(context, total)?;
    let stopping = time::ticks();
    cpus.stop().or_else(|e| fail!("stopping the secondaries: {e}"))?;
    println!(
        "  CPUs 1-{} off again (PSCI CPU_OFF, AFFINITY_INFO OFF) in {} us",
        total - 1,
        time::to_us(time::ticks() - stopping)
    );
    Ok(())
}

/// Every CPU runs one work item: two barriers around its increments of its own counter and a shared atomic, and
/// a report of where it runs.
fn hello(cpus: &Cpus) -> Result<(), Failure> {
    let total = cpus.count();
    let shared = AtomicU64::new(0);
    let own = [const { AtomicU64::new(0) }; MAX_CPUS];
    let barrier = Barrier::new(total);
    let boot = regime();
    let started = time::ticks();
    let reports = cpus.run(|cpu| {
        let start = time::ticks();
        let lined_up = barrier.wait();
        for _ in 0..ITERATIONS {
            own[cpu].fetch_add(1, Ordering::Relaxed);
            shared.fetch_add(1, Ordering::Relaxed);
        }
        let all_done = barrier.wait();
        let local = 0u8;
        Hello {
            tpidr: smp::cpu_id(),
            mpidr: smp::this_mpidr(),
            el: CurrentEL.read(CurrentEL::EL),
            same_regime: regime() == boot,
            stack: core::hint::black_box(&local) as *const u8 as usize,
            barriers: lined_up && all_done,
            own: own[cpu].load(Ordering::Relaxed),
            shared_seen: shared.load(Ordering::Relaxed),
            micros: time::to_us(time::ticks() - start),
        }
    });
    let run_us = time::to_us(time::ticks() - started);
    if reports.len() != total {
        fail!("{} of {total} CPUs reported", reports.len())
    }
    let expected = ITERATIONS * total as u64;
    for (cpu, report) in reports.iter().enumerate() {
        if report.tpidr != cpu || report.mpidr != smp::mpidr(cpu) {
            fail!(
                "CPU {cpu} ran on TPIDR_EL2 {} MPIDR {:#x} (expected MPIDR {:#x})",
                report.tpidr,
                report.mpidr,
                smp::mpidr(cpu)
            )
        }
        if report.el != 2 || !report.same_regime {
            fail!(
                "CPU {cpu} at EL{} with {} the boot CPU's translation regime and vectors",
                report.el,
                if report.same_regime { "" } else { "NOT" }
            )
        }
        if let Some(stack) = smp::stack_range(cpu)
            && !stack.contains(&report.stack)
        {
            fail!("CPU {cpu} ran on {:#x}, outside its stack {stack:x?}", report.stack)
        }
        if !report.barriers || report.own != ITERATIONS || report.shared_seen != expected {
            fail!(
                "CPU {cpu}: barriers {}, own counter {} (expected {ITERATIONS}), shared counter seen {} (expected \
                 {expected})",
                report.barriers,
                report.own,
                report.shared_seen
            )
        }
        let mut whose = heapless::String::<64>::new();
        let _ = match smp::stack_range(cpu) {
            Some(stack) => write!(
                whose,
                "its own stack at {:#x}, CPU 0's EL2 map and vectors",
                stack.start
            ),
            None => write!(whose, "the boot stack"),
        };
        println!(
            "  CPU {cpu}: MPIDR {:#x}, EL{}, {whose}; {ITERATIONS} own + {ITERATIONS} shared increments between two \
             barriers in {} us",
            report.mpidr, report.el, report.micros
        );
    }
    let total_seen = shared.load(Ordering::Relaxed);
    if total_seen != expected {
        fail!("the shared counter reads {total_seen}, expected {expected}")
    }
    println!(
        "  every CPU reported; shared atomic {total_seen} = {total} x {ITERATIONS}; the work item took {run_us} us"
    );
    Ok(())
}

/// The boot CPU sends the ping SGI to each secondary, which takes it on its own redistributor and CPU interface.
fn ping(total: usize) -> Result<(), Failure> {
    for cpu in 1..total {
        let before = irq::count_on(irq::PING_SGI, cpu);
        irq::send_sgi(cpu).or_else(|e| fail!("SGI to CPU {cpu}: {e}"))?;
        let deadline = time::deadline_us(100_000);
        while irq::count_on(irq::PING_SGI, cpu) == before {
            if time::expired(deadline) {
                fail!("CPU {cpu} did not take SGI {} within 100 ms", irq::PING_SGI)
            }
            core::hint::spin_loop();
        }
    }
    println!(
        "  SGI {} from CPU 0 taken by each of CPUs 1-{}",
        irq::PING_SGI,
        total - 1
    );
    Ok(())
}

/// Counts of `intid` taken, per CPU.
fn taken(intid: u32, total: usize) -> [u32; MAX_CPUS] {
    core::array::from_fn(|cpu| if cpu < total { irq::count_on(intid, cpu) } else { 0 })
}

/// Drains the event queue without printing; returns (bad-stream events for `sid`, other events).
fn drain_quietly(s: &mut Session, sid: u32) -> Result<(u32, u32), Failure> {
    let (mut bad, mut other) = (0, 0);
    loop {
        let report = s.low_level().drain_events(|event| {
            if matches!(event.name(), "C_BAD_STE" | "C_BAD_STREAMID") && event.stream_id() == Some(sid) {
                bad += 1;
            } else {
                other += 1;
            }
        });
        match report {
            Ok(r) if r.overflow.is_some() => fail!("event queue overflow: {:?}", r.overflow),
            Ok(r) if !r.pending => return Ok((bad, other)),
            Ok(_) => {}
            Err(e) => fail!("{e}"),
        }
    }
}

/// One faulting DMA from edu's unconfigured stream: `len` bytes aborted, one event per 4 bytes.
fn provoke(edu: &Edu, len: usize) -> Result<(), Failure> {
    let (intact, pa) = dma_onto_canary(edu, len, 0x5c)?;
    if !intact {
        fail!("edu wrote {pa:#x} through an unconfigured stream")
    }
    Ok(())
}

/// The SMMU's event-queue interrupt taken by a secondary: routed to CPU 2 (taken and handled there only), then to
/// any CPU (taken by every CPU in turn where the GIC has no 1-of-N, as on QEMU).
fn smmu_interrupts(context: &Context, total: usize) -> Result<(), Failure> {
    if !irq::smmu_lines_enabled() {
        fail!("the SMMU's lines are not taken through a GIC on this board")
    }
    let Some(eventq) = context.platform.smmu.interrupts.eventq else {
        fail!("the SMMU has no event-queue interrupt")
    };
    WATCHED.store(eventq, Ordering::Relaxed);
    irq::set_hook(Some(handled));
    let outcome = smmu_interrupts_hooked(context, total, eventq);
    irq::set_hook(None);
    let back = irq::route(eventq, Route::Cpu(0));
    outcome?;
    back.map(|_| ()).or_else(|e| fail!("routing back to CPU 0: {e}"))
}

fn smmu_interrupts_hooked(context: &Context, total: usize, eventq: u32) -> Result<(), Failure> {
    let mut s = start(context, &InitOptions::default())?;
    let (edu, sid) = edu_stream(context)?;
    let target = TARGET_CPU.min(total - 1);
    irq::route(eventq, Route::Cpu(target)).or_else(|e| fail!("routing INTID {eventq} to CPU {target}: {e}"))?;
    let before = taken(eventq, total);
    let handled_before = HANDLED[target].load(Ordering::Relaxed);
    provoke(&edu, 256)?;
    let deadline = time::deadline_us(100_000);
    while irq::count_on(eventq, target) == before[target] {
        if time::expired(deadline) {
            fail!("CPU {target} did not take the event-queue interrupt (INTID {eventq}) within 100 ms")
        }
        core::hint::spin_loop();
    }
    let after = taken(eventq, total);
    if let Some(other) = (0..total).find(|&cpu| cpu != target && after[cpu] != before[cpu]) {
        fail!("CPU {other} took INTID {eventq}, which was routed to CPU {target}")
    }
    let hooked = HANDLED[target].load(Ordering::Relaxed) - handled_before;
    let times = after[target] - before[target];
    if hooked != times {
        fail!("CPU {target} took INTID {eventq} {times} time(s) but its hook ran {hooked} time(s)")
    }
    let (bad, other) = drain_quietly(&mut s, sid)?;
    if bad == 0 || other != 0 {
        fail!("expected only bad-stream events for {sid:#x}: {bad} such, {other} other")
    }
    println!(
        "  event-queue interrupt INTID {eventq} routed to CPU {target} (MPIDR {:#x}): taken and handled there {times} \
         time(s), by no other CPU; {bad} C_BAD_STREAMID/C_BAD_STE events for stream {sid:#x} drained",
        smp::mpidr(target)
    );

    let distribution =
        irq::route(eventq, Route::AnyCpu).or_else(|e| fail!("routing INTID {eventq} to any CPU: {e}"))?;
    let start = taken(eventq, total);
    let mut rounds = 0;
    let all_took = |now: &[u32; MAX_CPUS]| (0..total).all(|cpu| now[cpu] > start[cpu]);
    let any_took = |now: &[u32; MAX_CPUS]| (0..total).any(|cpu| now[cpu] > start[cpu]);
    let enough = |now: &[u32; MAX_CPUS]| match distribution {
        Distribution::RoundRobin => all_took(now),
        Distribution::OneOfN | Distribution::Fixed => any_took(now),
    };
    while !enough(&taken(eventq, total)) && rounds < 4 * total {
        provoke(&edu, 16)?;
        // The interrupt follows the DMA's last event closely; give it a moment before judging the round.
        let deadline = time::deadline_us(10_000);
        while !time::expired(deadline) && !enough(&taken(eventq, total)) {
            core::hint::spin_loop();
        }
        let (_, other) = drain_quietly(&mut s, sid)?;
        if other != 0 {
            fail!("{other} unexpected event(s) while routed to any CPU")
        }
        rounds += 1;
    }
    let now = taken(eventq, total);
    if !enough(&now) {
        fail!(
            "routed to any CPU ({distribution}): after {rounds} faulting DMAs the CPUs took it {:?} more time(s)",
            &core::array::from_fn::<u32, MAX_CPUS, _>(|cpu| now[cpu] - start[cpu])[..total]
        )
    }
    let mut counts = heapless::String::<96>::new();
    for cpu in 0..total {
        let _ = write!(
            counts,
            "{}CPU {cpu}: {}",
            if cpu == 0 { "" } else { ", " },
            now[cpu] - start[cpu]
        );
    }
    println!("  routed to any CPU, {distribution}: {rounds} faulting DMA(s), taken by {counts}");
    irq::route(eventq, Route::Cpu(0)).or_else(|e| fail!("routing back to CPU 0: {e}"))?;
    expect_quiet(&mut s, "after smp-hello")
}
