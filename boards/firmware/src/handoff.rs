//! Hand-off to a new image without a reset: the same binary entered again at aarch64-rt's `entry`, as a new image
//! would be, with the SMMU left translating. Interrupts masked, the image and the handover region cleaned and
//! invalidated from the caches by address, then the MMU and data cache off, the EL2 TLB invalidated, and a branch to
//! `entry` (which turns the MMU on again with the boot map, zeroes `.bss` and starts over; `.data` keeps this
//! image's values, so the new image relies only on `.bss` and the handover region).

use crate::println;

// SAFETY: symbols the linker script defines at the image's first byte and at the DMA region; only their addresses
// are taken, never their contents read.
unsafe extern "C" {
    static text_begin: u8;
    static dma_region: u8;
}

/// Cleans and invalidates `[start, end)` by address (DC CIVAC), to the point of coherency.
fn clean_invalidate(start: usize, end: usize) {
    let ctr: u64;
    // SAFETY: reading CTR_EL0 has no side effects.
    unsafe { core::arch::asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags)) };
    let line = 4usize << ((ctr >> 16) & 0xf);
    let mut address = start & !(line - 1);
    while address < end {
        // SAFETY: clean-and-invalidate keeps dirty data and the range is mapped RAM.
        unsafe { core::arch::asm!("dc civac, {}", in(reg) address, options(nostack, preserves_flags)) };
        address += line;
    }
    // SAFETY: a barrier only.
    unsafe { core::arch::asm!("dsb sy", options(nostack, preserves_flags)) };
}

/// Enters this binary again as a new image, keeping the SMMU (and whatever DMA is in flight) running.
pub fn reenter() -> ! {
    println!("handing off to a new image (the same binary entered again), the SMMU left translating");
    // Only the symbols' addresses are used.
    let (image_start, image_end) = (
        core::ptr::addr_of!(text_begin) as usize,
        core::ptr::addr_of!(dma_region) as usize,
    );
    // SAFETY: masking interrupts only.
    unsafe { core::arch::asm!("msr daifset, #0xf", options(nomem, nostack, preserves_flags)) };
    clean_invalidate(image_start, image_end);
    if let Some(region) = crate::handover::region() {
        clean_invalidate(region.base as usize, (region.base + region.len) as usize);
    }
    // SAFETY: the code runs from identity-mapped memory, so turning the MMU off keeps fetching the same
    // instructions; nothing below touches the stack or memory until `entry`, which starts the image afresh.
    unsafe {
        core::arch::asm!(
            "mrs x9, sctlr_el2",
            "bic x9, x9, #1",
            "bic x9, x9, #(1 << 2)",
            "msr sctlr_el2, x9",
            "isb",
            "tlbi alle2",
            "dsb sy",
            "ic iallu",
            "dsb sy",
            "isb",
            "adrp x9, entry",
            "add x9, x9, :lo12:entry",
            "br x9",
            options(noreturn)
        )
    }
}
