//! Hand-off to a new image without a reset, with the SMMU left translating: either a genuinely separate binary (the
//! same firmware linked into the second image slot, loaded beside this one with `-device loader`; the board's linker
//! script names the slots) or, without one, this binary entered again at aarch64-rt's `entry`. Interrupts masked; this
//! image, the handover region and the new image's slot cleaned and invalidated from the caches by address; then the MMU
//! and data cache off, this image (its stack) cleaned and invalidated once more, the EL2 TLB and instruction cache
//! invalidated, and a branch to the new image's first byte, its EL2 entry (which turns the MMU on with its own boot
//! map, zeroes its `.bss` and starts). Entered again, this binary's `.data` keeps its values, so a new image relies
//! only on `.bss` and the handover region; the separate binary proves it, as it shares no address with this one.
//! Before it goes, this image writes the handover region's node into the device tree it passes on (in place, see
//! [`crate::handover::pass_in_tree`]): the new image reads the region from there.

use crate::println;

// SAFETY: symbols the linker scripts define at the image's first byte, at the DMA region and at the image slots;
// only their addresses are taken, never their contents read.
unsafe extern "C" {
    static text_begin: u8;
    static dma_region: u8;
    static second_image_slot: u8;
    static image_slots_end: u8;
}

/// Cleans and invalidates `[start, end)` by address (DC CIVAC, at the line size CTR_EL0.DminLine gives), to the
/// point of coherency, then a DSB SY.
pub(crate) fn clean_invalidate(start: usize, end: usize) {
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

/// This image's first byte (its EL2 entry).
pub fn this_image() -> usize {
    // SAFETY: only the symbol's address is used.
    core::ptr::addr_of!(text_begin) as usize
}

/// Where a hand-off goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextImage {
    /// This binary, entered again at its first byte.
    ThisOne,
    /// The separate binary loaded in the second image slot, at this address (its first byte).
    SecondSlot(usize),
}

/// The image to hand off to: the second image slot when the host says an image waits there (`next-image=on`),
/// else this binary. This binary when it is itself the second image.
///
/// # Errors
/// When the host says an image waits in the slot but its first instruction is zero (nothing was loaded there).
pub fn next_image(separate: bool) -> Result<NextImage, &'static str> {
    // Only the symbol's address is used.
    let slot = core::ptr::addr_of!(second_image_slot) as usize;
    if !separate || slot == this_image() {
        return Ok(NextImage::ThisOne);
    }
    // SAFETY: the slot is RAM the identity map covers and the frame pool never hands out; reading its first
    // word has no side effect.
    let first = unsafe { (slot as *const u32).read_volatile() };
    if first == 0 {
        return Err("next-image=on, but the second image slot holds no image (its first instruction is 0)");
    }
    Ok(NextImage::SecondSlot(slot))
}

/// Hands off to `next`, keeping the SMMU (and whatever DMA is in flight) running.
pub fn hand_off(next: NextImage) -> ! {
    // Only the symbols' addresses are used.
    let (image_start, image_end) = (this_image(), core::ptr::addr_of!(dma_region) as usize);
    let target = match next {
        NextImage::ThisOne => {
            println!("handing off to a new image (the same binary entered again), the SMMU left translating");
            image_start
        }
        NextImage::SecondSlot(address) => {
            println!(
                "handing off to a new image (a separate binary at {address:#x}; this one is at {image_start:#x}), \
                 the SMMU left translating"
            );
            address
        }
    };
    // The tree passed on names the handover region (QEMU's own tree has no node for it), and reaches memory before
    // the next image reads it with its caches off.
    let tree = crate::handover::pass_in_tree();
    // SAFETY: masking interrupts only.
    unsafe { core::arch::asm!("msr daifset, #0xf", options(nomem, nostack, preserves_flags)) };
    if let Some((address, len)) = tree {
        clean_invalidate(address, address + len);
    }
    clean_invalidate(image_start, image_end);
    if let Some(region) = crate::handover::region() {
        clean_invalidate(region.base as usize, (region.base + region.len) as usize);
    }
    if target != image_start {
        // The new image was loaded into memory this one never wrote, but this one's cacheable identity map may
        // hold lines of it (speculation): none may outlive the switch.
        // Only the symbol's address is used.
        clean_invalidate(target, core::ptr::addr_of!(image_slots_end) as usize);
    }
    // SAFETY: the code runs from identity-mapped memory, so turning the MMU off keeps fetching the same
    // instructions; nothing below touches the stack or memory until the new image's entry, which starts afresh.
    // The compiler's code between the cleans above and this block may still have written the stack (spills, the
    // epilogue of a call), leaving dirty lines that a later eviction would write over whatever the new image
    // stores there with its MMU off. So, once the MMU and data cache are off (no data access allocates a line
    // any more), the image, which holds the stack, `.data` and `.bss`, is cleaned and invalidated again by
    // address, as TF-A does for its stack on power-down.
    unsafe {
        core::arch::asm!(
            "mrs x9, sctlr_el2",
            "bic x9, x9, #1",
            "bic x9, x9, #(1 << 2)",
            "msr sctlr_el2, x9",
            "isb",
            // Line size: 4 << CTR_EL0.DminLine bytes.
            "mrs x9, ctr_el0",
            "ubfx x9, x9, #16, #4",
            "mov x13, #4",
            "lsl x9, x13, x9",
            "sub x13, x9, #1",
            "bic x11, x11, x13",
            "0:",
            "cmp x11, x12",
            "b.hs 1f",
            "dc civac, x11",
            "add x11, x11, x9",
            "b 0b",
            "1:",
            "dsb sy",
            "tlbi alle2",
            "dsb sy",
            "ic iallu",
            "dsb sy",
            "isb",
            "br x10",
            // The tree's address in x0, as the arm64 boot protocol passes it (the firmware's next image reads it at
            // its board's address, the same one).
            in("x0") tree.map_or(0, |(address, _)| address),
            in("x10") target,
            in("x11") image_start,
            in("x12") image_end,
            options(noreturn)
        )
    }
}
