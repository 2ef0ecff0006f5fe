//! Power control through PSCI. The firmware runs at EL2, so its PSCI implementation sits at EL3 and is reached by
//! SMC: QEMU's built-in PSCI on `virt`, the EL3 boot stub ([`crate::el3_boot_stub!`]) on boards without firmware
//! underneath. The same calls work on both, which is what a live update across a reset relies on.

use core::sync::atomic::{AtomicU64, Ordering};

use smccc::Smc;
use smccc::psci::{self, Version};

use crate::{exit, println};

/// PSCI_VERSION.
///
/// # Errors
/// The PSCI error the implementation returned.
pub fn version() -> Result<Version, psci::Error> {
    psci::version::<Smc>()
}

/// PSCI_FEATURES for SYSTEM_OFF and SYSTEM_RESET: whether both are implemented.
pub fn off_and_reset_supported() -> bool {
    [psci::PSCI_SYSTEM_OFF, psci::PSCI_SYSTEM_RESET]
        .into_iter()
        .all(|function| psci::psci_features::<Smc>(function).is_ok())
}

/// Powers the machine off through PSCI SYSTEM_OFF; QEMU then exits with status 0. Should the call return, the
/// run ends through semihosting with status 6.
pub fn system_off() -> ! {
    println!("powering off through PSCI SYSTEM_OFF");
    crate::console::flush();
    let result = psci::system_off::<Smc>();
    println!("FATAL: PSCI SYSTEM_OFF returned {result:?}");
    exit(6)
}

/// Resets the machine through PSCI SYSTEM_RESET; the board restarts the firmware from its entry. Should the call
/// return, the run ends through semihosting with status 6.
pub fn system_reset() -> ! {
    println!("resetting through PSCI SYSTEM_RESET");
    crate::console::flush();
    let result = psci::system_reset::<Smc>();
    println!("FATAL: PSCI SYSTEM_RESET returned {result:?}");
    exit(6)
}

/// The last bytes of the RAM bank that holds the image, kept out of the frame pool: RAM outside the image keeps
/// its contents across a reset (on QEMU, and on boards whose reset does not clear DRAM), so a boot can leave a
/// note for the next one here.
pub const SCRATCH_BYTES: usize = 64 * 1024;

static SCRATCH: AtomicU64 = AtomicU64::new(0);

/// The note left across a reset.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResetNote {
    /// [`ResetNote::MAGIC`] when the note is valid.
    pub magic: u64,
    /// The generic timer when the reset was asked for.
    pub ticks: u64,
}

impl ResetNote {
    /// Marks a valid note ("SMMUv3RS").
    pub const MAGIC: u64 = u64::from_le_bytes(*b"SMMUv3RS");
}

/// Declares the scratch area at `address` (the end of the image's RAM bank minus [`SCRATCH_BYTES`]).
///
/// # Safety
/// `address..address + SCRATCH_BYTES` must be identity-mapped RAM that nothing else uses.
pub unsafe fn set_scratch(address: usize) {
    SCRATCH.store(address as u64, Ordering::SeqCst);
}

/// Pages of the scratch area clear of the notes (from 32 KiB in), for a scenario's canaries that must keep their
/// contents across a reset and that nothing else allocates.
pub const SCRATCH_PAGES: usize = 8;

/// The physical (= virtual) address of scratch page `n` (below [`SCRATCH_PAGES`]); `None` without a scratch area
/// or beyond.
pub fn scratch_page(n: usize) -> Option<u64> {
    let address = SCRATCH.load(Ordering::SeqCst);
    (address != 0 && n < SCRATCH_PAGES).then_some(address + (32 << 10) + 4096 * n as u64)
}

fn note_pointer() -> Option<*mut ResetNote> {
    let address = SCRATCH.load(Ordering::SeqCst);
    (address != 0).then_some(address as *mut ResetNote)
}

/// The note a previous boot left, if any.
pub fn reset_note() -> Option<ResetNote> {
    // SAFETY: `set_scratch`'s caller guarantees the area; the note is plain data, read volatile because a
    // previous boot wrote it.
    let note = unsafe { note_pointer()?.read_volatile() };
    (note.magic == ResetNote::MAGIC).then_some(note)
}

/// Leaves `note` for the next boot (or clears it with `None`). Does nothing without a scratch area.
pub fn set_reset_note(note: Option<ResetNote>) {
    if let Some(pointer) = note_pointer() {
        let value = note.unwrap_or(ResetNote { magic: 0, ticks: 0 });
        // SAFETY: as in `reset_note`.
        unsafe { pointer.write_volatile(value) };
        // The next boot may start with caches off: push the note to memory.
        // SAFETY: cleaning a line of mapped RAM has no other effect.
        unsafe { core::arch::asm!("dc civac, {}", "dsb sy", in(reg) pointer, options(nostack, preserves_flags)) };
    }
}

/// What a live-update scenario leaves for the next boot, beside the reset note (at scratch + 4 KiB): where to resume
/// the scenario list, the counts so far, and the scenario's own data (physical addresses, tokens, counts).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveUpdateNote {
    /// [`LiveUpdateNote::MAGIC`] when valid.
    pub magic: u64,
    /// Position of the scenario in the list that resumes after the reset.
    pub index: u32,
    /// Scenarios that passed and failed before the reset (so the RESULT line counts the whole list).
    pub passed: u32,
    /// As `passed`.
    pub failed: u32,
    /// The scenario's phase: 1 before the reset.
    pub phase: u32,
    /// The scenario's data.
    pub data: [u64; 16],
}

impl LiveUpdateNote {
    /// "SMMUv3LU".
    pub const MAGIC: u64 = u64::from_le_bytes(*b"SMMUv3LU");
}

fn live_update_pointer() -> Option<*mut LiveUpdateNote> {
    let address = SCRATCH.load(Ordering::SeqCst);
    (address != 0).then_some((address + 4096) as *mut LiveUpdateNote)
}

/// The live-update note the previous boot left, if any.
pub fn live_update_note() -> Option<LiveUpdateNote> {
    // SAFETY: `set_scratch`'s caller guarantees the area (64 KiB, the note at 4 KiB in); plain data, read volatile
    // because the previous boot wrote it.
    let note = unsafe { live_update_pointer()?.read_volatile() };
    (note.magic == LiveUpdateNote::MAGIC).then_some(note)
}

/// Leaves `note` for the next boot (or clears it), cleaned to memory so a reset finds it.
pub fn set_live_update_note(note: Option<LiveUpdateNote>) {
    if let Some(pointer) = live_update_pointer() {
        let value = note.unwrap_or(LiveUpdateNote {
            magic: 0,
            index: 0,
            passed: 0,
            failed: 0,
            phase: 0,
            data: [0; 16],
        });
        // SAFETY: as in `live_update_note`.
        unsafe { pointer.write_volatile(value) };
        // Every line of it, at this CPU's line size (CTR_EL0.DminLine), then a DSB.
        let start = pointer as usize;
        crate::handoff::clean_invalidate(start, start + core::mem::size_of::<LiveUpdateNote>());
    }
}
