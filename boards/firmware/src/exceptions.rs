//! Exception handling: IRQs go to the GIC handler ([`crate::irq::handle`]); any other exception is unexpected,
//! reported (ESR, ELR, FAR) and ends the run with a failure status, so that a test harness sees it instead of a
//! hang.

use aarch64_cpu::registers::{ESR_EL2, FAR_EL2, Readable};
use aarch64_rt::{ExceptionHandlers, RegisterStateRef};

use crate::{exit, finish, println};

/// The firmware's exception handlers: IRQs at EL2 are handled, everything else is fatal.
pub struct Exceptions;

fn fatal(kind: &str, state: &RegisterStateRef) -> ! {
    let esr = ESR_EL2.get();
    println!(
        "FATAL: unexpected {kind} exception at EL2: ESR_EL2={esr:#x} (EC {:#x}) ELR_EL2={:#x} FAR_EL2={:#x} SPSR={:#x}",
        (esr >> 26) & 0x3f,
        state.elr,
        FAR_EL2.get(),
        state.spsr
    );
    exit(3)
}

impl ExceptionHandlers for Exceptions {
    extern "C" fn sync_current(mut state: RegisterStateRef) {
        let esr = ESR_EL2.get();
        // Only an undefined instruction (EC 0) is looked at: its ELR is the instruction, in mapped code.
        // SAFETY: for EC 0 the CPU executed the instruction at ELR, so ELR points at readable, aligned code.
        if (esr >> 26) & 0x3f == 0 && finish::is_semihosting_trap(esr, unsafe { (state.elr as *const u32).read() }) {
            finish::set_semihosting_absent();
            let operation = state.registers[0];
            if operation == finish::SYS_EXIT || operation == finish::SYS_EXIT_EXTENDED {
                finish::without_semihosting()
            }
            // SAFETY: skipping the HLT with x0 = -1 is what a semihosting host does for a call that failed; the
            // caller expects x0 to change and nothing else.
            let saved = unsafe { state.get_mut() };
            saved.registers[0] = u64::MAX;
            saved.elr += 4;
            return;
        }
        fatal("synchronous", &state)
    }
    extern "C" fn irq_current(_state: RegisterStateRef) {
        crate::irq::handle()
    }
    extern "C" fn fiq_current(state: RegisterStateRef) {
        fatal("FIQ", &state)
    }
    extern "C" fn serror_current(state: RegisterStateRef) {
        fatal("SError", &state)
    }
    extern "C" fn sync_lower(state: RegisterStateRef) {
        fatal("lower-EL synchronous", &state)
    }
    extern "C" fn irq_lower(state: RegisterStateRef) {
        fatal("lower-EL IRQ", &state)
    }
    extern "C" fn fiq_lower(state: RegisterStateRef) {
        fatal("lower-EL FIQ", &state)
    }
    extern "C" fn serror_lower(state: RegisterStateRef) {
        fatal("lower-EL SError", &state)
    }
}
