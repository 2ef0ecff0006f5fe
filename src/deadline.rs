//! Bounded waits. Every poll of the SMMU ends with an error after a time bound, never a hang: on AArch64 the bound
//! is measured with the generic timer (CNTPCT_EL0 / CNTFRQ_EL0); in host tests with the host clock; on any other
//! target with an iteration count (one poll per microsecond of budget). Loom models count polls too: a model must
//! be deterministic, and a wait that never ends in one of its interleavings should fail as a timeout.

/// A wait ran out of time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimedOut;

/// How much longer a bound is in a host build than asked: host tests share the machine's cores between many
/// threads (fake SMMUs among them, which real hardware is not), and a fake SMMU thread descheduled for longer than
/// the architecture's bound must not read as an SMMU that never answers. Measured on the 2-core development
/// machine: the eight-submitter queue stress test timed out at 1 s, beside the other stress tests, in about one run
/// in twenty.
#[cfg(all(not(target_arch = "aarch64"), any(test, feature = "std"), not(all(loom, test))))]
const HOST_SLACK: u64 = 4;

/// The shortest bound a host build waits (microseconds): the init handshake's 100 ms, four times over, still
/// timed out once on the 2-core machine with a QEMU run and the other stress tests beside it (the fake SMMU's
/// thread descheduled for longer).
#[cfg(all(not(target_arch = "aarch64"), any(test, feature = "std"), not(all(loom, test))))]
const HOST_MIN_MICROS: u64 = 2_000_000;

/// Polls a host build makes (yielding between them) before it sleeps between polls.
#[cfg(all(not(target_arch = "aarch64"), any(test, feature = "std"), not(all(loom, test))))]
const HOST_SPINS_BEFORE_SLEEP: u32 = 64;

/// A point in time after which a wait gives up.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    #[cfg(target_arch = "aarch64")]
    end: u64,
    #[cfg(all(not(target_arch = "aarch64"), any(test, feature = "std"), not(all(loom, test))))]
    end: std::time::Instant,
    #[cfg(all(not(target_arch = "aarch64"), any(not(any(test, feature = "std")), all(loom, test))))]
    remaining: u64,
}

#[cfg(all(not(target_arch = "aarch64"), any(test, feature = "std"), not(all(loom, test))))]
extern crate std;

#[cfg(target_arch = "aarch64")]
fn counter() -> (u64, u64) {
    use aarch64_cpu::registers::{CNTFRQ_EL0, CNTPCT_EL0, Readable};
    (CNTPCT_EL0.get(), CNTFRQ_EL0.get().max(1))
}

impl Deadline {
    /// A deadline `micros` microseconds from now.
    pub fn after_micros(micros: u64) -> Self {
        #[cfg(target_arch = "aarch64")]
        {
            let (now, frequency) = counter();
            Deadline {
                end: now.saturating_add(micros.saturating_mul(frequency) / 1_000_000),
            }
        }
        #[cfg(all(not(target_arch = "aarch64"), any(test, feature = "std"), not(all(loom, test))))]
        {
            Deadline {
                end: std::time::Instant::now()
                    + std::time::Duration::from_micros(micros.saturating_mul(HOST_SLACK).max(HOST_MIN_MICROS)),
            }
        }
        #[cfg(all(not(target_arch = "aarch64"), any(not(any(test, feature = "std")), all(loom, test))))]
        {
            Deadline { remaining: micros }
        }
    }

    /// Whether the deadline has passed.
    pub fn expired(&mut self) -> bool {
        #[cfg(target_arch = "aarch64")]
        {
            counter().0 >= self.end
        }
        #[cfg(all(not(target_arch = "aarch64"), any(test, feature = "std"), not(all(loom, test))))]
        {
            std::time::Instant::now() >= self.end
        }
        #[cfg(all(not(target_arch = "aarch64"), any(not(any(test, feature = "std")), all(loom, test))))]
        {
            if self.remaining == 0 {
                return true;
            }
            self.remaining -= 1;
            false
        }
    }

    /// Polls `condition` until it returns `Some` or the deadline passes.
    ///
    /// # Errors
    /// [`TimedOut`] when the deadline passed first.
    pub fn poll<T>(mut self, mut condition: impl FnMut() -> Option<T>) -> Result<T, TimedOut> {
        #[cfg(all(not(target_arch = "aarch64"), any(test, feature = "std"), not(all(loom, test))))]
        let mut polls = 0u32;
        loop {
            if let Some(value) = condition() {
                return Ok(value);
            }
            if self.expired() {
                // One last look: the condition may have become true while this CPU was elsewhere.
                return condition().ok_or(TimedOut);
            }
            // On a host (tests, benchmarks: more threads than cores) a long wait sleeps between polls, so that
            // waiters do not keep the thread they wait for (a fake SMMU, another submitter) off the processor.
            #[cfg(all(not(target_arch = "aarch64"), any(test, feature = "std"), not(all(loom, test))))]
            {
                polls = polls.saturating_add(1);
                if polls > HOST_SPINS_BEFORE_SLEEP {
                    std::thread::sleep(std::time::Duration::from_micros(5));
                    continue;
                }
            }
            crate::sync::spin_loop();
        }
    }
}
