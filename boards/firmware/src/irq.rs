//! Interrupts through a GICv3 (arm-gic): the SMMU's lines are configured with the trigger type the board
//! describes, taken at EL2, acknowledged and counted (in all, and per CPU). The handler is the top half: it records
//! that a line fired and calls the hook a scenario installed ([`set_hook`]), if any; the scenario (the bottom half)
//! drains the event queue or the global errors with the driver, or the hook does it in interrupt context.
//!
//! Every CPU the firmware starts ([`crate::smp`]) initialises its own redistributor and CPU interface
//! ([`init_this_cpu`]) and takes interrupts at EL2, so an SPI is taken wherever it is routed ([`route`]): to one
//! CPU, or to any participating CPU ([`Route::AnyCpu`]: the GIC's 1-of-N distribution where it has it, else the
//! handler moves the line to the next online CPU each time it takes it).

use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use aarch64_cpu::asm::barrier::{SY, isb};
use aarch64_cpu::registers::{HCR_EL2, ReadWriteable};
use arm_gic::gicv3::{GicCpuInterface, GicV3, Group, SgiTarget, SgiTargetGroup};
use arm_gic::{IntId, InterruptGroup, Trigger, UniqueMmioPointer};
use smmuv3::SmmuInterrupts;
use spin::RwLock;
use spin::mutex::SpinMutex;

use crate::cpus::{self as smp, MAX_CPUS};
use crate::dt::Gic;
use crate::time;

/// INTIDs counted: SGIs, PPIs and the SPIs up to 1019.
const COUNTED: usize = 1020;
/// The SGI that wakes or pings a CPU ([`send_sgi`]); enabled on every CPU the firmware starts.
pub const PING_SGI: u32 = 1;

static COUNTS: [AtomicU32; COUNTED] = [const { AtomicU32::new(0) }; COUNTED];
/// Per CPU: how many times it took each INTID.
static COUNTS_BY_CPU: [[AtomicU32; COUNTED]; MAX_CPUS] = [const { [const { AtomicU32::new(0) }; COUNTED] }; MAX_CPUS];
static GIC: SpinMutex<Option<GicV3<'static>>> = SpinMutex::new(None);
static ENABLED: AtomicBool = AtomicBool::new(false);
/// Each CPU's redistributor (its index among the GIC's frames), found by affinity; `usize::MAX` unknown.
static REDISTRIBUTORS: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(usize::MAX) }; MAX_CPUS];
/// SPIs the handler moves to the next online CPU each time it takes them ([`Route::AnyCpu`] without 1-of-N).
static ROTATING: [AtomicBool; COUNTED] = [const { AtomicBool::new(false) }; COUNTED];
/// SPIs [`route`] moved from the boot CPU, for [`reset_routes`].
static ROUTED: SpinMutex<heapless::Vec<u32, 16>> = SpinMutex::new(heapless::Vec::new());
/// A handler the handler calls in interrupt context for every interrupt taken: the INTID and the CPU's number.
pub type Hook = fn(u32, usize);

/// The scenario's hook ([`set_hook`]).
static HOOK: RwLock<Option<Hook>> = RwLock::new(None);

/// Why interrupts could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqError {
    /// The board describes no GIC.
    NoGic,
    /// The GIC driver refused the configuration.
    Gic(&'static str),
    /// No redistributor frame carries this CPU's affinity.
    NoRedistributor {
        /// The CPU.
        cpu: usize,
        /// Its affinity.
        mpidr: u64,
    },
    /// No such CPU, or not online.
    NoCpu(usize),
}

impl core::fmt::Display for IrqError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            IrqError::NoGic => f.write_str("the board describes no GICv3"),
            IrqError::Gic(what) => write!(f, "GIC: {what}"),
            IrqError::NoRedistributor { cpu, mpidr } => {
                write!(f, "GIC: no redistributor for CPU {cpu} (MPIDR {mpidr:#x})")
            }
            IrqError::NoCpu(cpu) => write!(f, "CPU {cpu} is not online"),
        }
    }
}

/// How the SPIs [`route`] handles reach CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// To one CPU (its logical number, see [`crate::smp`]).
    Cpu(usize),
    /// To any participating (online) CPU: 1-of-N (GICD_IROUTER.IRM = 1) where the GIC supports it, else explicit
    /// routing that the handler moves round the online CPUs, one step per interrupt taken.
    AnyCpu,
}

/// How [`Route::AnyCpu`] was carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distribution {
    /// To one CPU ([`Route::Cpu`]).
    Fixed,
    /// The GIC's 1-of-N selection (IRM = 1).
    OneOfN,
    /// Explicit routing, moved by the handler round the online CPUs (the GIC has no 1-of-N: GICD_TYPER.No1N).
    RoundRobin,
}

impl core::fmt::Display for Distribution {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Distribution::Fixed => "one CPU",
            Distribution::OneOfN => "1-of-N (GICD_IROUTER.IRM = 1)",
            Distribution::RoundRobin => "round robin (the GIC has no 1-of-N: explicit routing moved by the handler)",
        })
    }
}

/// Takes the GIC: distributor and every redistributor configured, this CPU's (the boot CPU's) awake, every SPI
/// group 1, system-register interface at EL2, physical IRQs (and FIQs, SErrors) routed to EL2 (HCR_EL2.IMO/FMO/AMO)
/// and unmasked. Each CPU's redistributor is found by its affinity in GICR_TYPER ([`crate::cpus::record`] has
/// numbered the CPUs); the GIC is driven for as many CPUs as have one.
///
/// # Errors
/// [`IrqError::Gic`] when the redistributor frames cannot be walked, [`IrqError::NoRedistributor`] when none
/// carries the boot CPU's affinity.
///
/// # Safety
/// `gic` must be the machine's GICv3, identity-mapped as device memory, driven by nothing else; call once.
pub unsafe fn init(gic: &Gic) -> Result<(), IrqError> {
    let (Some(gicd), Some(gicr)) = (
        NonNull::new(gic.distributor.base as *mut _),
        NonNull::new(gic.redistributors.base as *mut _),
    ) else {
        return Err(IrqError::NoGic);
    };
    GicCpuInterface::enable_system_register_el2(true);
    // The ICC_* accesses below must see the system-register interface enabled.
    isb(SY);
    let cpus = smp::cpu_count();
    // The frames, in order, until the one marked last: which CPU (affinity) each serves.
    let frames = {
        // SAFETY: the caller guarantees the GIC's registers, mapped and unaliased; this driver is gone before the
        // one kept below is made.
        let mut walker = unsafe { GicV3::new(UniqueMmioPointer::new(gicd), gicr, cpus) }
            .map_err(|_| IrqError::Gic("no redistributor frames"))?;
        let mut frames = 0;
        while frames < cpus {
            let typer = walker
                .gicr_typer(frames)
                .map_err(|_| IrqError::Gic("redistributor frames"))?;
            let affinity = typer.core_mpidr() & smp::AFFINITY_MASK;
            if let Some(cpu) = (0..cpus).find(|&cpu| smp::mpidr(cpu) == affinity) {
                REDISTRIBUTORS[cpu].store(frames, Ordering::Relaxed);
            }
            frames += 1;
            if typer.last_redistributor() {
                break;
            }
        }
        frames
    };
    // Driven for as many CPUs as there are frames (a CPU without one cannot take interrupts).
    // SAFETY: the caller guarantees the GIC's registers, mapped and unaliased, for the rest of the run.
    let mut driver = unsafe { GicV3::new(UniqueMmioPointer::new(gicd), gicr, frames) }
        .map_err(|_| IrqError::Gic("no redistributor frames"))?;
    let boot = redistributor_of(0)?;
    driver.setup(boot);
    enable_ping(&mut driver, boot)?;
    GicCpuInterface::set_priority_mask(0xff);
    *GIC.lock() = Some(driver);
    take_interrupts_at_el2();
    Ok(())
}

fn redistributor_of(cpu: usize) -> Result<usize, IrqError> {
    match REDISTRIBUTORS.get(cpu).map(|r| r.load(Ordering::Relaxed)) {
        Some(index) if index != usize::MAX => Ok(index),
        _ => Err(IrqError::NoRedistributor {
            cpu,
            mpidr: smp::mpidr(cpu),
        }),
    }
}

/// [`PING_SGI`] on at the redistributor `index`, group 1.
fn enable_ping(gic: &mut GicV3, index: usize) -> Result<(), IrqError> {
    let sgi = IntId::sgi(PING_SGI);
    gic.set_group(sgi, Some(index), Group::Group1NS)
        .and_then(|()| gic.set_interrupt_priority(sgi, Some(index), 0x80))
        .and_then(|()| gic.enable_interrupt(sgi, Some(index), true))
        .map_err(|_| IrqError::Gic("SGI configuration"))
}

/// Physical IRQs, FIQs and SErrors to EL2 (with IMO/FMO/AMO clear they would target EL1, and EL2 would never take
/// them), synchronised before they are unmasked.
fn take_interrupts_at_el2() {
    HCR_EL2.modify(HCR_EL2::IMO::EnableVirtualIRQ + HCR_EL2::FMO::EnableVirtualFIQ + HCR_EL2::AMO::SET);
    isb(SY);
    arm_gic::irq_enable();
}

/// A secondary CPU's share of the GIC, on that CPU: system-register interface at EL2, its redistributor awake with
/// its SGIs and PPIs in their default configuration ([`PING_SGI`] enabled), group 1 on at its CPU interface,
/// interrupts taken at EL2 and unmasked. Without a GIC ([`init`] not run) it does nothing.
///
/// # Errors
/// [`IrqError::NoRedistributor`] when no frame serves this CPU; [`IrqError::Gic`] for a refused configuration.
pub fn init_this_cpu(cpu: usize) -> Result<(), IrqError> {
    let mut guard = GIC.lock();
    let Some(gic) = guard.as_mut() else {
        return Ok(());
    };
    let index = redistributor_of(cpu)?;
    GicCpuInterface::enable_system_register_el2(true);
    isb(SY);
    gic.init_cpu(index);
    gic.redistributor(index)
        .map_err(|_| IrqError::Gic("redistributor"))?
        .configure_default_settings();
    enable_ping(gic, index)?;
    drop(guard);
    GicCpuInterface::set_priority_mask(0xff);
    GicCpuInterface::enable_group1(true);
    take_interrupts_at_el2();
    Ok(())
}

/// Before a secondary CPU turns off, on that CPU: interrupts masked, group 1 off at its CPU interface, its
/// redistributor marked asleep. Move the SPIs routed to it elsewhere first ([`reset_routes`]).
pub fn quiesce_this_cpu(cpu: usize) {
    arm_gic::irq_disable();
    let mut guard = GIC.lock();
    let Some(gic) = guard.as_mut() else {
        return;
    };
    GicCpuInterface::enable_group1(false);
    if let Ok(index) = redistributor_of(cpu) {
        let _ = gic.redistributor_mark_core_asleep(index);
    }
}

/// Sends [`PING_SGI`] to CPU `cpu` (counted by the handler there, like every interrupt).
///
/// # Errors
/// [`IrqError::NoGic`] before [`init`] (without a GICv3 the instruction would not exist); [`IrqError::NoCpu`] for a
/// CPU that is not online; [`IrqError::Gic`] when the GIC refuses.
pub fn send_sgi(cpu: usize) -> Result<(), IrqError> {
    if GIC.lock().is_none() {
        return Err(IrqError::NoGic);
    }
    if !smp::is_online(cpu) || cpu >= smp::cpu_count() {
        return Err(IrqError::NoCpu(cpu));
    }
    let mpidr = smp::mpidr(cpu);
    let byte = |shift: u32| (mpidr >> shift) as u8;
    let aff0 = byte(0);
    if aff0 >= 16 {
        return Err(IrqError::Gic("SGI target list reaches Aff0 0..=15 only"));
    }
    GicCpuInterface::send_sgi(
        IntId::sgi(PING_SGI),
        SgiTarget::List {
            affinity3: byte(32),
            affinity2: byte(16),
            affinity1: byte(8),
            target_list: 1 << aff0,
        },
        SgiTargetGroup::CurrentGroup1,
    )
    .map_err(|_| IrqError::Gic("SGI"))
}

/// Whether the GIC can route an SPI to any participating CPU itself (GICD_TYPER.No1N = 0).
pub fn one_of_n_supported() -> bool {
    let mut guard = GIC.lock();
    guard.as_mut().is_some_and(|gic| gic.typer().one_of_n_supported())
}

/// Routes the SPI `intid` as `route` says and returns how: [`Route::Cpu`] to that CPU's affinity;
/// [`Route::AnyCpu`] with IRM = 1 where the GIC has 1-of-N, else to the next online CPU, the handler moving it on
/// after each interrupt. Routes other than to the boot CPU are remembered for [`reset_routes`].
///
/// # Errors
/// [`IrqError::NoGic`] before [`init`]; [`IrqError::NoCpu`] for a CPU that is not online;
/// [`IrqError::Gic`] for an INTID that is not an SPI, or a write the GIC refuses.
pub fn route(intid: u32, route: Route) -> Result<Distribution, IrqError> {
    let Some(spi) = intid.checked_sub(32) else {
        return Err(IrqError::Gic("only SPIs are routed"));
    };
    let mut guard = GIC.lock();
    let gic = guard.as_mut().ok_or(IrqError::NoGic)?;
    let (target, distribution) = match route {
        Route::Cpu(cpu) if smp::is_online(cpu) && cpu < smp::cpu_count() => {
            (Some(smp::mpidr(cpu)), Distribution::Fixed)
        }
        Route::Cpu(cpu) => return Err(IrqError::NoCpu(cpu)),
        Route::AnyCpu if gic.typer().one_of_n_supported() => (None, Distribution::OneOfN),
        Route::AnyCpu => (
            Some(smp::mpidr(smp::next_online(smp::cpu_id()))),
            Distribution::RoundRobin,
        ),
    };
    // Under the GIC lock, as the handler's moves are: the last word is this one.
    if let Some(flag) = ROTATING.get(intid as usize) {
        flag.store(distribution == Distribution::RoundRobin, Ordering::Relaxed);
    }
    gic.distributor()
        .set_routing(IntId::spi(spi), target)
        .map_err(|_| IrqError::Gic("SPI routing"))?;
    if route != Route::Cpu(0) {
        let mut routed = ROUTED.lock();
        if !routed.contains(&intid) {
            routed
                .push(intid)
                .map_err(|_| IrqError::Gic("too many SPIs routed away"))?;
        }
    }
    Ok(distribution)
}

/// Routes every SPI [`route`] moved back to the boot CPU (before secondaries turn off).
pub fn reset_routes() {
    let routed = core::mem::take(&mut *ROUTED.lock());
    for intid in routed {
        let _ = route(intid, Route::Cpu(0));
    }
}

/// Installs (or, with `None`, removes) the hook the handler calls for every interrupt it takes, in interrupt
/// context, on the CPU that took it, with the INTID and that CPU's number. Install it before enabling what it
/// serves: an interrupt taken while the hook is being replaced is counted but not passed to it. The hook runs with
/// interrupts masked on a CPU that may have been interrupted anywhere: it must not print, allocate or wait for a lock
/// that code outside interrupt context holds (a `try_lock` is fine).
pub fn set_hook(hook: Option<Hook>) {
    *HOOK.write() = hook;
}

/// Whether the SMMU's lines are taken through the GIC ([`init`] and [`enable_smmu_lines`] succeeded for
/// edge-triggered lines).
pub fn smmu_lines_enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Enables every line the SMMU has, edge-triggered, routed to this CPU, and returns whether it did. A
/// level-triggered line stays disabled (returns `false`): the handler only counts, and a level line stays asserted
/// until the scenario has drained the queue, so it would fire again at once, for ever. Such a board's scenarios
/// poll instead.
///
/// # Errors
/// [`IrqError::NoGic`] before [`init`]; [`IrqError::Gic`] for a line the GIC refuses.
pub fn enable_smmu_lines(lines: &SmmuInterrupts) -> Result<bool, IrqError> {
    if !lines.edge_triggered {
        return Ok(false);
    }
    let mut guard = GIC.lock();
    let gic = guard.as_mut().ok_or(IrqError::NoGic)?;
    let this_cpu = smp::this_mpidr();
    for intid in [lines.eventq, lines.priq, lines.cmdq_sync, lines.gerror]
        .into_iter()
        .flatten()
    {
        let Some(spi) = intid.checked_sub(32) else {
            return Err(IrqError::Gic("an SMMU line below the SPIs"));
        };
        let id = IntId::spi(spi);
        gic.set_trigger(id, None, Trigger::Edge)
            .and_then(|()| gic.set_interrupt_priority(id, None, 0x80))
            .and_then(|()| gic.set_group(id, None, Group::Group1NS))
            .and_then(|()| gic.distributor().set_routing(id, Some(this_cpu)))
            .and_then(|()| gic.enable_interrupt(id, None, true))
            .map_err(|_| IrqError::Gic("SPI configuration"))?;
    }
    ENABLED.store(true, Ordering::SeqCst);
    Ok(true)
}

/// The IRQ handler: acknowledges every pending group-1 interrupt, moves a round-robin SPI on to the next online
/// CPU, calls the hook ([`set_hook`]), counts it (for this CPU too) and ends it. The count comes after the hook: a
/// CPU that sees the count change knows the hook has run.
pub fn handle() {
    let cpu = smp::cpu_id();
    while let Some(intid) = GicCpuInterface::get_and_acknowledge_interrupt(InterruptGroup::Group1) {
        let raw = intid.raw_value();
        if ROTATING.get(raw as usize).is_some_and(|r| r.load(Ordering::Relaxed)) {
            rotate(raw, cpu);
        }
        // A writer holds the hook only while replacing it; then this interrupt is counted, not passed on.
        if let Some(guard) = HOOK.try_read()
            && let Some(hook) = *guard
        {
            hook(raw, cpu);
        }
        // SeqCst (a release): what the hook wrote is visible to whoever reads the new count.
        if let Some(count) = COUNTS_BY_CPU.get(cpu).and_then(|c| c.get(raw as usize)) {
            count.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(count) = COUNTS.get(raw as usize) {
            count.fetch_add(1, Ordering::SeqCst);
        }
        GicCpuInterface::end_interrupt(intid, InterruptGroup::Group1);
    }
}

/// Moves a round-robin SPI to the next online CPU after `cpu`. Skipped when the GIC lock is busy (this CPU may
/// hold it outside interrupt context): the line then stays where it is until the next interrupt.
fn rotate(intid: u32, cpu: usize) {
    let Some(mut guard) = GIC.try_lock() else {
        return;
    };
    let Some(gic) = guard.as_mut() else { return };
    // Re-read under the lock: `route` may have fixed the line since.
    if !ROTATING.get(intid as usize).is_some_and(|r| r.load(Ordering::Relaxed)) {
        return;
    }
    let next = smp::mpidr(smp::next_online(cpu));
    let _ = gic.distributor().set_routing(IntId::spi(intid - 32), Some(next));
}

/// How many times `intid` has been taken since boot.
pub fn count(intid: u32) -> u32 {
    COUNTS.get(intid as usize).map_or(0, |c| c.load(Ordering::SeqCst))
}

/// How many times CPU `cpu` has taken `intid` since boot.
pub fn count_on(intid: u32, cpu: usize) -> u32 {
    COUNTS_BY_CPU
        .get(cpu)
        .and_then(|c| c.get(intid as usize))
        .map_or(0, |c| c.load(Ordering::SeqCst))
}

/// Waits up to `timeout_us` for `intid` to be taken more than `seen` times; returns the new count, or `None`
/// when it did not arrive.
pub fn wait_beyond(intid: u32, seen: u32, timeout_us: u64) -> Option<u32> {
    let deadline = time::deadline_us(timeout_us);
    loop {
        let now = count(intid);
        if now > seen {
            return Some(now);
        }
        if time::expired(deadline) {
            return None;
        }
        core::hint::spin_loop();
    }
}
