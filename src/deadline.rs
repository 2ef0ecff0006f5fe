//! Bounded waits. Every poll of the SMMU ends with an error after a time bound, never a hang: on AArch64 the bound
//! is measured with the generic timer (CNTPCT_EL0 / CNTFRQ_EL0); in host tests with the host clock; on any other
//! target with an iteration count (one poll per microsecond of budget).

/// A wait ran out of time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimedOut;

/// A point in time after which a wait gives up.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    #[cfg(target_arch = "aarch64")]
    end: u64,
    #[cfg(all(not(target_arch = "aarch64"), any(test, feature = "std")))]
    end: std::time::Instant,
    #[cfg(all(not(target_arch = "aarch64"), not(any(test, feature = "std"))))]
    remaining: u64,
}

#[cfg(all(not(target_arch = "aarch64"), any(test, feature = "std")))]
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
        #[cfg(all(not(target_arch = "aarch64"), any(test, feature = "std")))]
        {
            Deadline {
                end: std::time::Instant::now() + std::time::Duration::from_micros(micros),
            }
        }
        #[cfg(all(not(target_arch = "aarch64"), not(any(test, feature = "std"))))]
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
        #[cfg(all(not(target_arch = "aarch64"), any(test, feature = "std")))]
        {
            std::time::Instant::now() >= self.end
        }
        #[cfg(all(not(target_arch = "aarch64"), not(any(test, feature = "std"))))]
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
        loop {
            if let Some(value) = condition() {
                return Ok(value);
            }
            if self.expired() {
                // One last look: the condition may have become true while this CPU was elsewhere.
                return condition().ok_or(TimedOut);
            }
            core::hint::spin_loop();
        }
    }
}
