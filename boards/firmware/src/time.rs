//! The generic timer: monotonic time for bounded waits and measurements.

use aarch64_cpu::registers::{CNTFRQ_EL0, CNTPCT_EL0, Readable};

/// Counter ticks since boot.
pub fn ticks() -> u64 {
    aarch64_cpu::asm::barrier::isb(aarch64_cpu::asm::barrier::SY);
    CNTPCT_EL0.get()
}

/// Counter frequency in Hz.
pub fn frequency() -> u64 {
    CNTFRQ_EL0.get().max(1)
}

/// A deadline `micros` microseconds from now.
pub fn deadline_us(micros: u64) -> u64 {
    ticks().saturating_add(micros.saturating_mul(frequency()) / 1_000_000)
}

/// Whether `deadline` has passed.
pub fn expired(deadline: u64) -> bool {
    ticks() >= deadline
}

/// Ticks converted to microseconds.
pub fn to_us(ticks: u64) -> u64 {
    ticks.saturating_mul(1_000_000) / frequency()
}
