//! Every CPU: the secondaries started through PSCI CPU_ON (QEMU's PSCI on virt, the EL3 stub's on sbsa-ref), each
//! on its own stack with the boot CPU's EL2 identity map, the firmware's exception vectors and its own GIC
//! redistributor and CPU interface, then running a Rust entry the firmware chooses.
//!
//! Two levels:
//! - [`start_secondaries`] / [`wait_until_off`]: start CPUs 1..=n at an entry `fn(cpu)`; a CPU whose entry returns
//!   powers itself off (PSCI CPU_OFF).
//! - [`Cpus`]: a team of CPUs that run work items. [`Cpus::start`] starts the secondaries with an entry that waits
//!   for work; [`Cpus::run`] runs one closure on every CPU of the team at once (the boot CPU included) and returns
//!   what each returned, in CPU order; dropping the team (or [`Cpus::stop`]) routes the SPIs it moved back to the
//!   boot CPU and turns the secondaries off, so the next scenario finds one CPU, as at boot.
//!
//! CPU numbers ([`cpu_id`]) are logical: 0 is the boot CPU, then the CPUs of the device tree's `/cpus` in tree
//! order (or the board's static description). Each CPU keeps its number in TPIDR_EL2. A [`Barrier`] lines CPUs up.
//!
//! Idle secondaries of a team wait for work with WFE (QEMU treats it as a yield), woken by the SEV that publishes
//! a work item or stops the team, or by an interrupt: interrupts are unmasked on every started CPU, so an SPI routed
//! to it is taken there ([`crate::irq::route`]). Waits with a deadline spin.

use core::fmt;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicPtr, AtomicU8, AtomicU64, AtomicUsize, Ordering};

use aarch64_cpu::asm::{sev, wfe};
use aarch64_cpu::registers::{MAIR_EL2, Readable, SCTLR_EL2, TCR_EL2, TPIDR_EL2, TTBR0_EL2, Writeable};
use aarch64_rt::Stack;
use smccc::Smc;
use smccc::psci::{self, AffinityState, LowestAffinityLevel};
use spin::mutex::SpinMutex;

use crate::cpus::{self, CpuState};
pub use crate::cpus::{AFFINITY_MASK, MAX_CPUS, cpu_count, cpu_id, is_online, mpidr, next_online, state, this_mpidr};
use crate::{irq, time};

/// Pages of stack per secondary CPU (256 KiB: work items may hold a driver handle or two on their stack).
pub const STACK_PAGES: usize = 64;
/// How long a started CPU may take to come online, and a stopped one to be reported off.
const START_TIMEOUT_US: u64 = 2_000_000;
/// How long [`Cpus::run`] waits for the slowest CPU before ending the run.
const RUN_TIMEOUT_US: u64 = 120_000_000;

/// The secondaries' stacks (CPU n uses `STACKS[n - 1]`), in aarch64-rt's NOLOAD stack region of the image, which
/// both the boot map and the identity map cover with the same normal write-back attributes.
// SAFETY (attributes): the section is aarch64-rt's `.stack.*`, NOLOAD, which nothing else overlaps.
#[unsafe(link_section = ".stack.smp")]
static mut STACKS: [Stack<STACK_PAGES>; MAX_CPUS - 1] = [const { Stack::new() }; MAX_CPUS - 1];

/// Why CPUs could not be started, stopped or given work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmpError {
    /// Only the boot CPU may start, stop or give work to CPUs.
    NotBootCpu(usize),
    /// More CPUs were asked for than the platform has (or the firmware drives: [`MAX_CPUS`]).
    TooMany {
        /// CPUs asked for.
        asked: usize,
        /// CPUs available.
        available: usize,
    },
    /// The CPU is not off, so it cannot be started.
    Busy(usize),
    /// PSCI refused CPU_ON (or AFFINITY_INFO) for the CPU.
    Psci {
        /// The CPU.
        cpu: usize,
        /// Its affinity (MPIDR).
        mpidr: u64,
        /// What PSCI said.
        error: psci::Error,
    },
    /// The CPU did not come online (or go off) in time.
    Timeout {
        /// The CPU.
        cpu: usize,
        /// Its state when the wait gave up.
        state: CpuState,
    },
    /// Another team of CPUs is running (one [`Cpus`] at a time).
    TeamRunning,
}

impl fmt::Display for SmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SmpError::NotBootCpu(cpu) => write!(f, "CPU {cpu} is not the boot CPU, which alone manages CPUs"),
            SmpError::TooMany { asked, available } => {
                write!(f, "{asked} CPUs asked for, {available} available")
            }
            SmpError::Busy(cpu) => write!(f, "CPU {cpu} is not off ({:?})", state(*cpu)),
            SmpError::Psci { cpu, mpidr, error } => {
                write!(f, "PSCI refused CPU {cpu} (MPIDR {mpidr:#x}): {error}")
            }
            SmpError::Timeout { cpu, state } => write!(f, "CPU {cpu} timed out in state {state:?}"),
            SmpError::TeamRunning => f.write_str("a team of CPUs is already running"),
        }
    }
}

/// The boot CPU's TTBR0_EL2, TCR_EL2, MAIR_EL2 and SCTLR_EL2 once its identity map is active.
static MMU: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
/// Why each secondary's GIC set-up failed, if it did (reported by [`Cpus::start`]).
static GIC_ERRORS: [SpinMutex<Option<irq::IrqError>>; MAX_CPUS] = [const { SpinMutex::new(None) }; MAX_CPUS];

/// The stack range of secondary CPU `cpu` (`None` for the boot CPU, whose stack is aarch64-rt's boot stack).
pub fn stack_range(cpu: usize) -> Option<core::ops::Range<usize>> {
    let index = cpu.checked_sub(1).filter(|&i| i < MAX_CPUS - 1)?;
    let start = (&raw const STACKS).cast::<Stack<STACK_PAGES>>().wrapping_add(index) as usize;
    Some(start..start + size_of::<Stack<STACK_PAGES>>())
}

/// Records the platform's CPUs (their affinities, in the order the tree lists them; the boot CPU becomes CPU 0
/// whatever its place) and the boot CPU's MMU registers, and numbers the boot CPU 0. Called once at boot on the
/// boot CPU, after its identity map is active and before any CPU is started. CPUs beyond [`MAX_CPUS`] are left
/// out; an empty list means the boot CPU alone.
pub fn init(cpus: &[u64]) {
    crate::cpus::record(cpus);
    for (slot, value) in MMU
        .iter()
        .zip([TTBR0_EL2.get(), TCR_EL2.get(), MAIR_EL2.get(), SCTLR_EL2.get()])
    {
        slot.store(value, Ordering::Relaxed);
    }
}

/// Waits (up to `timeout_us`) until `done` holds; returns whether it did. Spins rather than waiting for an event:
/// a CPU in WFE would not see its deadline pass unless something sent it an event (and on QEMU WFE is a yield).
fn wait_for(timeout_us: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = time::deadline_us(timeout_us);
    loop {
        if done() {
            return true;
        }
        if time::expired(deadline) {
            return false;
        }
        core::hint::spin_loop();
    }
}

fn boot_cpu_only() -> Result<(), SmpError> {
    match cpu_id() {
        0 => Ok(()),
        cpu => Err(SmpError::NotBootCpu(cpu)),
    }
}

/// Starts CPUs 1..=`n` at `entry` (given the CPU's number) and waits until each is online (its MMU, vectors and
/// GIC set up, interrupts unmasked). A CPU whose `entry` returns masks its interrupts, parks its redistributor and
/// turns itself off through PSCI CPU_OFF; [`wait_until_off`] waits for that. Boot CPU only.
///
/// # Errors
/// [`SmpError::NotBootCpu`] elsewhere; [`SmpError::TooMany`] when the platform has fewer than `n + 1` CPUs;
/// [`SmpError::Busy`] for a CPU not off; [`SmpError::Psci`] when CPU_ON is refused (the CPUs started before stay
/// online: stop them); [`SmpError::Timeout`] for a CPU that did not come online within 2 s.
pub fn start_secondaries(n: usize, entry: fn(usize)) -> Result<(), SmpError> {
    boot_cpu_only()?;
    if n + 1 > cpu_count() {
        return Err(SmpError::TooMany {
            asked: n + 1,
            available: cpu_count(),
        });
    }
    if let Some(busy) = (1..=n).find(|&cpu| state(cpu) != CpuState::Off) {
        return Err(SmpError::Busy(busy));
    }
    for (cpu, gic_error) in GIC_ERRORS.iter().enumerate().take(n + 1).skip(1) {
        *gic_error.lock() = None;
        cpus::set_state(cpu, CpuState::Starting);
        let stack = (&raw mut STACKS).cast::<Stack<STACK_PAGES>>().wrapping_add(cpu - 1);
        // SAFETY: the stack is CPU `cpu`'s alone (its state was Off, so nothing runs on it: a CPU reaches Off
        // only once PSCI reports it off), in the image, which the boot map that `secondary_entry` turns on maps
        // with the same normal write-back attributes as the identity map this CPU writes it through.
        let started = unsafe {
            aarch64_rt::start_core::<Smc, _, STACK_PAGES>(mpidr(cpu), stack, move || secondary_main(cpu, entry))
        };
        if let Err(error) = started {
            cpus::set_state(cpu, CpuState::Off);
            return Err(SmpError::Psci {
                cpu,
                mpidr: mpidr(cpu),
                error,
            });
        }
    }
    for cpu in 1..=n {
        if !wait_for(START_TIMEOUT_US, || state(cpu) != CpuState::Starting) {
            return Err(SmpError::Timeout { cpu, state: state(cpu) });
        }
    }
    Ok(())
}

/// Waits until CPUs 1..`count` have left their entries and PSCI AFFINITY_INFO reports each off, then marks them
/// [`CpuState::Off`] (so they may be started again). Boot CPU only; their entries must be returning.
///
/// # Errors
/// [`SmpError::NotBootCpu`] elsewhere; [`SmpError::Timeout`] for a CPU still running after 2 s;
/// [`SmpError::Psci`] when AFFINITY_INFO fails.
pub fn wait_until_off(count: usize) -> Result<(), SmpError> {
    boot_cpu_only()?;
    for cpu in 1..count.min(cpu_count()) {
        if state(cpu) == CpuState::Off {
            continue;
        }
        let mut error = None;
        let off = wait_for(START_TIMEOUT_US, || {
            state(cpu) == CpuState::Stopping
                && match psci::affinity_info::<Smc>(mpidr(cpu), LowestAffinityLevel::All) {
                    Ok(AffinityState::Off) => true,
                    Ok(_) => false,
                    Err(e) => {
                        error = Some(e);
                        true
                    }
                }
        });
        if let Some(error) = error {
            return Err(SmpError::Psci {
                cpu,
                mpidr: mpidr(cpu),
                error,
            });
        }
        if !off {
            return Err(SmpError::Timeout { cpu, state: state(cpu) });
        }
        cpus::set_state(cpu, CpuState::Off);
    }
    Ok(())
}

/// The boot CPU's EL2 translation regime on this CPU: MAIR_EL2, TCR_EL2, TTBR0_EL2 and SCTLR_EL2 as the boot CPU
/// has them, switched with the MMU off (as [`crate::mmu::IdentityMap::activate`] does: the boot map that
/// aarch64-rt's `secondary_entry` turned on and the identity map translate the same addresses differently, so
/// both must never be live in the TLB at once).
///
/// # Safety
/// [`init`] has recorded the boot CPU's registers, whose identity map maps this CPU's code and stack as the boot
/// map does, and stays alive and unchanged for the rest of the run.
unsafe fn adopt_boot_cpu_mmu() {
    let [ttbr0, tcr, mair, sctlr] = [0, 1, 2, 3].map(|i| MMU[i].load(Ordering::Relaxed));
    // SAFETY: the caller guarantees the map; nothing between the two SCTLR_EL2 writes touches memory (every value
    // is in a register), and the code runs identity-mapped in both maps.
    unsafe {
        core::arch::asm!(
            "mrs {off}, sctlr_el2",
            "bic {off}, {off}, #1",
            "msr sctlr_el2, {off}",
            "isb",
            "msr mair_el2, {mair}",
            "msr tcr_el2, {tcr}",
            "msr ttbr0_el2, {ttbr0}",
            "isb",
            "tlbi alle2",
            "dsb nsh",
            "isb",
            "msr sctlr_el2, {sctlr}",
            "isb",
            off = out(reg) _,
            mair = in(reg) mair,
            tcr = in(reg) tcr,
            ttbr0 = in(reg) ttbr0,
            sctlr = in(reg) sctlr,
            options(nostack, preserves_flags),
        );
    }
}

/// A secondary CPU's life after aarch64-rt's `secondary_entry` (boot map on, its stack, the firmware's vectors):
/// the boot CPU's identity map, its number, its GIC, online; `entry`; then off.
fn secondary_main(cpu: usize, entry: fn(usize)) -> ! {
    // SAFETY: `start_secondaries` runs only after `init`, which the boot calls once the identity map is active;
    // the map lives (in `run`'s frame, which never returns) for the rest of the run.
    unsafe { adopt_boot_cpu_mmu() };
    TPIDR_EL2.set(cpu as u64);
    if let Err(e) = irq::init_this_cpu(cpu) {
        *GIC_ERRORS[cpu].lock() = Some(e);
    }
    cpus::set_state(cpu, CpuState::Online);
    entry(cpu);
    irq::quiesce_this_cpu(cpu);
    cpus::set_state(cpu, CpuState::Stopping);
    let refused = psci::cpu_off::<Smc>();
    crate::println!("FATAL: CPU {cpu}: PSCI CPU_OFF returned {refused:?}; parking it");
    loop {
        aarch64_cpu::asm::wfi();
    }
}

/// The GIC set-up error CPU `cpu` reported when it came online, if any.
pub fn gic_error(cpu: usize) -> Option<irq::IrqError> {
    GIC_ERRORS.get(cpu).and_then(|e| *e.lock())
}

/// One work item, published to the team by [`Cpus::run`].
struct Job<'a> {
    work: &'a (dyn Fn(usize) + Sync),
}

/// The work item being run (null between items), its sequence number, and the last number each CPU finished.
static JOB: AtomicPtr<Job<'static>> = AtomicPtr::new(core::ptr::null_mut());
static JOB_SEQUENCE: AtomicU64 = AtomicU64::new(0);
static FINISHED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Set by [`Cpus::stop`]: the team's entries return.
static STOP: AtomicU8 = AtomicU8::new(0);
/// Whether a team exists.
static TEAM: AtomicU8 = AtomicU8::new(0);

/// The entry of a team's secondaries: runs each work item [`Cpus::run`] publishes, once, and reports it finished;
/// returns when the team stops.
fn serve(cpu: usize) {
    let mut seen = FINISHED[cpu].load(Ordering::Relaxed);
    loop {
        if STOP.load(Ordering::Acquire) != 0 {
            return;
        }
        // Acquire: the job pointer (and everything the boot CPU wrote before publishing) is visible.
        let sequence = JOB_SEQUENCE.load(Ordering::Acquire);
        if sequence == seen {
            wfe();
            continue;
        }
        let job = JOB.load(Ordering::Acquire);
        // SAFETY: `Cpus::run` published this job for `sequence` and keeps it alive until every CPU of the team
        // has stored `sequence` in FINISHED (it never returns before, and ends the run if that does not come).
        if let Some(job) = unsafe { job.as_ref() } {
            (job.work)(cpu);
        }
        seen = sequence;
        // Release: the work's writes (its result included) are visible to the boot CPU that sees this.
        FINISHED[cpu].store(sequence, Ordering::Release);
    }
}

/// A team of CPUs that run work items: the boot CPU and secondaries 1..count, started by [`Cpus::start`].
/// Dropping it stops the secondaries (see [`Cpus::stop`]). It stays on the boot CPU (neither `Send` nor `Sync`).
pub struct Cpus {
    count: usize,
    _boot_cpu_only: PhantomData<*const ()>,
}

impl Cpus {
    /// Starts a team of `count` CPUs (the boot CPU and CPUs 1..count), each secondary waiting for work.
    ///
    /// # Errors
    /// As [`start_secondaries`] (the CPUs started before a failure are stopped again); [`SmpError::TeamRunning`]
    /// while another team exists. A CPU that came online without its GIC set up is still in the team:
    /// [`gic_error`] says why.
    pub fn start(count: usize) -> Result<Cpus, SmpError> {
        boot_cpu_only()?;
        if TEAM.swap(1, Ordering::AcqRel) != 0 {
            return Err(SmpError::TeamRunning);
        }
        STOP.store(0, Ordering::Release);
        let sequence = JOB_SEQUENCE.load(Ordering::Relaxed);
        for finished in &FINISHED {
            finished.store(sequence, Ordering::Relaxed);
        }
        let mut team = Cpus {
            count: 1,
            _boot_cpu_only: PhantomData,
        };
        let started = start_secondaries(count.saturating_sub(1), serve);
        // Whatever started is part of the team, so that a failure stops it again.
        team.count = (1..count.min(cpu_count()))
            .take_while(|&cpu| state(cpu) != CpuState::Off)
            .count()
            + 1;
        started.map(|()| team)
    }

    /// Starts every CPU the platform has.
    ///
    /// # Errors
    /// As [`Cpus::start`].
    pub fn all() -> Result<Cpus, SmpError> {
        Cpus::start(cpu_count())
    }

    /// The CPUs in the team (the boot CPU included).
    pub fn count(&self) -> usize {
        self.count
    }

    /// Runs `work` on every CPU of the team at once (the boot CPU too, as CPU 0) and returns what each returned,
    /// indexed by CPU number. Returns when every CPU has finished. `work` may borrow from the caller: it lives
    /// until then. Should a CPU not finish within 120 s, the run ends (`FATAL`): the others may still hold `work`.
    pub fn run<R: Send>(&self, work: impl Fn(usize) -> R + Sync) -> heapless::Vec<R, MAX_CPUS> {
        let results: [SpinMutex<Option<R>>; MAX_CPUS] = [const { SpinMutex::new(None) }; MAX_CPUS];
        let wrapper = |cpu: usize| {
            let result = work(cpu);
            if let Some(slot) = results.get(cpu) {
                *slot.lock() = Some(result);
            }
        };
        let job = Job { work: &wrapper };
        // The pointer outlives `job` only in JOB's type: see `serve`, and the wait below.
        JOB.store((&raw const job).cast::<Job<'static>>().cast_mut(), Ordering::Relaxed);
        // Release: publishes JOB and everything written before.
        let sequence = JOB_SEQUENCE.fetch_add(1, Ordering::Release) + 1;
        sev();
        wrapper(0);
        for (cpu, finished) in FINISHED.iter().enumerate().take(self.count).skip(1) {
            if !wait_for(RUN_TIMEOUT_US, || finished.load(Ordering::Acquire) == sequence) {
                crate::fatal(
                    "SMP",
                    &format_args!("CPU {cpu} did not finish its work item within 120 s ({:?})", state(cpu)),
                );
            }
        }
        JOB.store(core::ptr::null_mut(), Ordering::Relaxed);
        let mut out = heapless::Vec::new();
        for slot in results.into_iter().take(self.count) {
            if let Some(result) = slot.into_inner() {
                // At most MAX_CPUS results: the push cannot fail.
                let _ = out.push(result);
            }
        }
        out
    }

    /// Stops the team: the SPIs routed away from the boot CPU go back to it, every secondary leaves its wait and
    /// turns itself off (PSCI CPU_OFF), and this waits until PSCI reports each off.
    ///
    /// # Errors
    /// As [`wait_until_off`].
    pub fn stop(mut self) -> Result<(), SmpError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), SmpError> {
        if self.count == 0 {
            return Ok(());
        }
        irq::reset_routes();
        STOP.store(1, Ordering::Release);
        sev();
        let stopped = wait_until_off(self.count);
        self.count = 0;
        TEAM.store(0, Ordering::Release);
        stopped
    }
}

impl Drop for Cpus {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            crate::println!("  SMP: stopping the CPUs failed: {e}");
        }
    }
}

/// A reusable barrier for `parties` CPUs: [`Barrier::wait`] returns on every CPU once all have called it.
pub struct Barrier {
    parties: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
}

impl Barrier {
    /// A barrier for `parties` CPUs.
    pub const fn new(parties: usize) -> Barrier {
        Barrier {
            parties,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
        }
    }

    /// Waits (up to 10 s) until all parties have arrived. Every write a CPU made before its `wait` is visible to
    /// every CPU after theirs. Returns `false` on the timeout: the barrier is then out of step and must not be
    /// used again.
    pub fn wait(&self) -> bool {
        let generation = self.generation.load(Ordering::Acquire);
        // AcqRel: the last CPU to arrive acquires every earlier arrival's writes (their increments form one
        // release sequence) and releases them, with its own, through the generation below.
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.parties {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            true
        } else {
            wait_for(10_000_000, || self.generation.load(Ordering::Acquire) != generation)
        }
    }
}
