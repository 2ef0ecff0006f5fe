//! The CPUs the platform has, by logical number: their affinities (MPIDR), their count, and where each is in its
//! life; what the GIC driver and the SMP start-up both read (below both of them: [`crate::smp`] starts CPUs and
//! changes their state, [`crate::irq`] routes interrupts to them).
//!
//! CPU numbers are logical: 0 is the boot CPU, then the CPUs of the device tree's `/cpus` in tree order (or the
//! board's static description). Each CPU keeps its number in TPIDR_EL2.

use core::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};

use aarch64_cpu::registers::{MPIDR_EL1, Readable, TPIDR_EL2, Writeable};

/// The most CPUs the firmware drives (the boot CPU included).
pub const MAX_CPUS: usize = 8;
/// The affinity fields of MPIDR_EL1 (Aff3, Aff2, Aff1, Aff0): what PSCI and GICD_IROUTER take.
pub const AFFINITY_MASK: u64 = 0xff_00ff_ffff;

/// Where a CPU is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CpuState {
    /// Not running (never started, or reported off by PSCI AFFINITY_INFO).
    Off = 0,
    /// CPU_ON was accepted; its entry has not reported yet.
    Starting = 1,
    /// Running its entry, interrupts on.
    Online = 2,
    /// Its entry returned; it is turning itself off.
    Stopping = 3,
}

impl CpuState {
    fn from_u8(value: u8) -> CpuState {
        match value {
            1 => CpuState::Starting,
            2 => CpuState::Online,
            3 => CpuState::Stopping,
            _ => CpuState::Off,
        }
    }
}

/// The CPUs' affinities (MPIDR & [`AFFINITY_MASK`]) by logical number, and how many there are.
static MPIDRS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static COUNT: AtomicUsize = AtomicUsize::new(1);
static STATES: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(CpuState::Off as u8) }; MAX_CPUS];

/// This CPU's affinity fields.
pub fn this_mpidr() -> u64 {
    MPIDR_EL1.get() & AFFINITY_MASK
}

/// This CPU's logical number (0: the boot CPU), from TPIDR_EL2.
pub fn cpu_id() -> usize {
    TPIDR_EL2.get() as usize
}

/// How many CPUs the platform has (at most [`MAX_CPUS`]).
pub fn cpu_count() -> usize {
    COUNT.load(Ordering::Relaxed)
}

/// The affinity (MPIDR) of CPU `cpu`.
pub fn mpidr(cpu: usize) -> u64 {
    MPIDRS.get(cpu).map_or(0, |m| m.load(Ordering::Relaxed))
}

/// CPU `cpu`'s state ([`CpuState::Off`] for a number beyond the platform's).
pub fn state(cpu: usize) -> CpuState {
    STATES
        .get(cpu)
        .map_or(CpuState::Off, |s| CpuState::from_u8(s.load(Ordering::Acquire)))
}

/// Whether CPU `cpu` is online (the boot CPU always is).
pub fn is_online(cpu: usize) -> bool {
    cpu == 0 || state(cpu) == CpuState::Online
}

/// The next online CPU after `cpu`, wrapping around (the boot CPU when no other is online).
pub fn next_online(cpu: usize) -> usize {
    let count = cpu_count();
    (1..=count)
        .map(|step| (cpu + step) % count)
        .find(|&c| is_online(c))
        .unwrap_or(0)
}

/// Records the platform's CPUs (their affinities, in the order the tree lists them; the boot CPU becomes CPU 0
/// whatever its place) and numbers the boot CPU 0. CPUs beyond [`MAX_CPUS`] are left out; an empty list means the
/// boot CPU alone.
pub(crate) fn record(cpus: &[u64]) {
    TPIDR_EL2.set(0);
    let me = this_mpidr();
    MPIDRS[0].store(me, Ordering::Relaxed);
    let mut count = 1;
    for &mpidr in cpus {
        let mpidr = mpidr & AFFINITY_MASK;
        if mpidr != me && count < MAX_CPUS {
            MPIDRS[count].store(mpidr, Ordering::Relaxed);
            count += 1;
        }
    }
    COUNT.store(count, Ordering::Relaxed);
    STATES[0].store(CpuState::Online as u8, Ordering::Release);
}

/// Sets CPU `cpu`'s state (Release: what the CPU did before is visible to whoever reads the new state).
pub(crate) fn set_state(cpu: usize, state: CpuState) {
    if let Some(s) = STATES.get(cpu) {
        s.store(state as u8, Ordering::Release);
    }
}
