//! How a run ends. Every run prints one machine-readable summary line, `RESULT PASS <passed>/<asked>` or
//! `RESULT FAIL <passed>/<asked>` (a contract with the host), then hands its status to the host through
//! semihosting. A machine without semihosting (every real board; QEMU without `-semihosting-config enable=on`)
//! has nothing to take that status: there the run powers off through PSCI SYSTEM_OFF where there is PSCI, or
//! parks the CPU in a low-power loop, and the RESULT line is the verdict.
//!
//! Absent semihosting is detected, not configured: the semihosting call `HLT #0xF000` is an undefined instruction
//! (ESR_ELx.EC 0x00) when no debugger or emulator implements it, and the EL2 exception handler recognises it
//! ([`is_semihosting_trap`]), notes that semihosting is absent and either returns -1 to the caller (as a
//! semihosting host does for a call that failed) or, for an exit call, ends the run without semihosting.

use core::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

use crate::{power, println};

/// The A64 encoding of `HLT #0xF000`, the semihosting call.
pub const SEMIHOSTING_HLT: u32 = 0xd45e_0000;
/// ESR_ELx.EC for an unknown reason, which an undefined instruction (such as an unimplemented HLT) reports.
const EC_UNKNOWN: u64 = 0x00;
/// Semihosting operation SYS_EXIT.
pub const SYS_EXIT: u64 = 0x18;
/// Semihosting operation SYS_EXIT_EXTENDED.
pub const SYS_EXIT_EXTENDED: u64 = 0x20;
/// Semihosting operation SYS_ERRNO: harmless, used to probe.
const SYS_ERRNO: u64 = 0x13;

const UNKNOWN: u8 = 0;
const PRESENT: u8 = 1;
const ABSENT: u8 = 2;

static SEMIHOSTING: AtomicU8 = AtomicU8::new(UNKNOWN);
static ASKED: AtomicUsize = AtomicUsize::new(0);
static PASSED: AtomicUsize = AtomicUsize::new(0);
static REPORTED: AtomicBool = AtomicBool::new(false);

/// Records how many scenarios the host asked for (the denominator of the RESULT line).
pub fn set_asked(asked: usize) {
    ASKED.store(asked, Ordering::SeqCst);
}

/// Records one scenario that passed.
pub fn record_pass() {
    PASSED.fetch_add(1, Ordering::SeqCst);
}

/// Prints the RESULT line, once per boot: PASS when `passed` (the run's status is 0), FAIL otherwise, with the
/// scenarios that passed out of those asked.
pub fn report(passed: bool) {
    if REPORTED.swap(true, Ordering::SeqCst) {
        return;
    }
    println!(
        "RESULT {} {}/{}",
        if passed { "PASS" } else { "FAIL" },
        PASSED.load(Ordering::SeqCst),
        ASKED.load(Ordering::SeqCst)
    );
}

/// Whether an exception with syndrome `esr` at the instruction `instruction` is a semihosting call the machine
/// does not implement.
pub fn is_semihosting_trap(esr: u64, instruction: u32) -> bool {
    (esr >> 26) & 0x3f == EC_UNKNOWN && instruction == SEMIHOSTING_HLT
}

/// Notes that a semihosting call trapped: the machine has no semihosting.
pub fn set_semihosting_absent() {
    SEMIHOSTING.store(ABSENT, Ordering::SeqCst);
}

/// Whether a semihosting call has trapped (the machine has none).
pub fn semihosting_absent() -> bool {
    SEMIHOSTING.load(Ordering::SeqCst) == ABSENT
}

/// Makes one harmless semihosting call (SYS_ERRNO) and returns whether the machine implements semihosting. Where
/// it does not, the call traps, the exception handler notes it and returns, and the run will end through PSCI.
pub fn probe_semihosting() -> bool {
    let mut x0 = SYS_ERRNO;
    // SAFETY: SYS_ERRNO reads the host's last error number and changes nothing; without semihosting the HLT
    // traps to the EL2 handler, which skips it with x0 = -1. Only x0 is written either way.
    unsafe {
        core::arch::asm!("hlt #0xf000", inout("x0") x0, in("x1") 0u64, options(nostack));
    }
    let _ = x0;
    if semihosting_absent() {
        false
    } else {
        SEMIHOSTING.store(PRESENT, Ordering::SeqCst);
        true
    }
}

/// Ends the run on a machine without semihosting: PSCI SYSTEM_OFF where PSCI answers, else a low-power park.
/// The RESULT line, printed before, carries the verdict.
pub fn without_semihosting() -> ! {
    report(false);
    if power::version().is_ok() {
        println!("no semihosting to take the exit status: the RESULT line is the verdict");
        power::system_off()
    }
    park("no semihosting and no PSCI: the RESULT line is the verdict; parking the CPU")
}

/// Prints `why`, masks interrupts and waits for interrupts for ever.
pub fn park(why: &str) -> ! {
    println!("{why}");
    // SAFETY: masking exceptions at the end of the run affects nothing but this CPU's wake-ups.
    unsafe { core::arch::asm!("msr daifset, #0xf", options(nomem, nostack)) };
    loop {
        aarch64_cpu::asm::wfi();
    }
}

/// The longest host path [`save_to_host`] takes.
pub const MAX_HOST_PATH_BYTES: usize = 512;

/// Writes `bytes` to the host file `path` through semihosting (a debugger's or QEMU's host).
///
/// # Errors
/// A reason for the console: no semihosting, a path too long or with a NUL in it, or the host's refusal.
pub fn save_to_host(path: &str, bytes: &[u8]) -> Result<(), &'static str> {
    if semihosting_absent() {
        return Err("no semihosting");
    }
    let mut name: heapless::Vec<u8, { MAX_HOST_PATH_BYTES + 1 }> = heapless::Vec::new();
    if path.bytes().any(|b| b == 0) || name.extend_from_slice(path.as_bytes()).is_err() || name.push(0).is_err() {
        return Err("the path is too long or holds a NUL");
    }
    let name = core::ffi::CStr::from_bytes_with_nul(&name).map_err(|_| "the path holds a NUL")?;
    semihosting::fs::write(name, bytes).map_err(|_| "the host refused the write")
}
