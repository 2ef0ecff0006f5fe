//! The EL2 stage-1 identity map built from what the device tree describes: RAM as normal cacheable memory (the
//! image's code read-only and executable, everything else execute-never), devices as Device-nGnRE.

use core::ptr::NonNull;

use aarch64_paging::descriptor::{El23Attributes, PhysicalAddress};
use aarch64_paging::mair::{Mair, MairAttribute, NormalMemory};
use aarch64_paging::paging::{Constraints, El2, MemoryRegion, PageTable, Translation};
use aarch64_paging::{MapError, Mapping};

use aarch64_cpu::registers::{Readable, TCR_EL2};

use crate::frames;

/// MAIR_EL2: index 0 Device-nGnRE, index 1 normal write-back cacheable.
pub const MAIR: Mair = Mair::EMPTY
    .with_attribute(0, MairAttribute::DEVICE_NGNRE)
    .with_attribute(
        1,
        MairAttribute::normal(
            NormalMemory::WriteBackNonTransientReadWriteAllocate,
            NormalMemory::WriteBackNonTransientReadWriteAllocate,
        ),
    );

// AP[1] (`USER_RES1`) is RES1 in the stage-1 descriptors of a regime with one exception level, such as EL2's.

/// Attributes of device memory.
pub const DEVICE: El23Attributes = El23Attributes::VALID
    .union(El23Attributes::ATTRIBUTE_INDEX_0)
    .union(El23Attributes::USER_RES1)
    .union(El23Attributes::ACCESSED)
    .union(El23Attributes::XN);
/// Attributes of normal read-write data memory.
pub const DATA: El23Attributes = El23Attributes::VALID
    .union(El23Attributes::ATTRIBUTE_INDEX_1)
    .union(El23Attributes::USER_RES1)
    .union(El23Attributes::INNER_SHAREABLE)
    .union(El23Attributes::ACCESSED)
    .union(El23Attributes::XN);
/// Attributes of the image's code.
pub const CODE: El23Attributes = El23Attributes::VALID
    .union(El23Attributes::ATTRIBUTE_INDEX_1)
    .union(El23Attributes::USER_RES1)
    .union(El23Attributes::INNER_SHAREABLE)
    .union(El23Attributes::ACCESSED)
    .union(El23Attributes::READ_ONLY);
/// Attributes of the image's read-only data.
pub const RODATA: El23Attributes = DATA.union(El23Attributes::READ_ONLY);

/// Page-table pages come from the firmware's frame pool.
pub struct PoolTranslation;

impl Translation<El23Attributes> for PoolTranslation {
    fn allocate_table(&mut self) -> (NonNull<PageTable<El23Attributes>>, PhysicalAddress) {
        // A firmware that cannot build its own page tables cannot run: aarch64-paging's trait has no error path.
        let pa = frames::alloc(frames::FRAME_SIZE, frames::FRAME_SIZE).expect("no frame for an EL2 page table");
        (
            NonNull::new(pa as *mut _).expect("frame at address 0"),
            PhysicalAddress(pa),
        )
    }

    unsafe fn deallocate_table(&mut self, page_table: NonNull<PageTable<El23Attributes>>) {
        // SAFETY: the table came from `allocate_table`, i.e. from the pool, and aarch64-paging no longer uses it.
        unsafe { frames::free_frame(page_table.as_ptr() as usize) }
    }

    fn physical_to_virtual(&self, pa: PhysicalAddress) -> NonNull<PageTable<El23Attributes>> {
        NonNull::new(pa.0 as *mut _).expect("page table at address 0")
    }
}

/// The identity map under construction.
pub struct IdentityMap {
    mapping: Mapping<PoolTranslation, El2>,
}

/// The root level the boot TCR_EL2 uses (4 KiB granule): level 0 for T0SZ 16..=24 (the 48-bit boot map of
/// [`crate::el2_boot_map_48!`], which both boards use), level 1 for T0SZ 25..=33 (aarch64-rt's 39-bit
/// `initial_pagetable!`). The identity map replaces the boot map without touching TCR_EL2, so it must start at
/// the same level.
fn boot_root_level() -> usize {
    let t0sz = TCR_EL2.read(TCR_EL2::T0SZ);
    if t0sz <= 24 { 0 } else { 1 }
}

impl IdentityMap {
    /// An empty map for the boot TCR_EL2's virtual address size.
    pub fn new() -> Self {
        IdentityMap {
            mapping: Mapping::new(PoolTranslation, boot_root_level(), El2),
        }
    }

    /// Identity-maps `start..end` (rounded out to pages) with `attributes`.
    ///
    /// # Errors
    /// aarch64-paging's [`MapError`] (for example a range beyond the boot map's virtual address space).
    pub fn map(&mut self, start: usize, end: usize, attributes: El23Attributes) -> Result<(), MapError> {
        let region = MemoryRegion::new(start, end);
        self.mapping.map_range(
            &region,
            PhysicalAddress(region.start().0),
            attributes,
            Constraints::empty(),
        )
    }

    /// Switches TTBR0_EL2 to this map and invalidates the EL2 TLB, with the MMU off for the switch.
    ///
    /// The boot map and this one translate the same addresses differently (1 GiB blocks there, pages and smaller
    /// blocks with other permissions here). Changing TTBR0_EL2 with the MMU on would let the TLB hold entries of
    /// both maps for one address until the TLBI completes, a break-before-make violation the Arm ARM allows to end
    /// in a TLB conflict abort or an unpredictable translation. So, as pKVM does when it replaces its EL2 tables:
    /// MMU off (the code runs identity-mapped, so it keeps fetching the same instructions), new TTBR0_EL2, TLBI
    /// ALLE2, MMU on again. Nothing between the two SCTLR_EL2 writes touches memory, so no access sees the
    /// non-cacheable view of RAM the MMU-off state gives.
    ///
    /// # Safety
    /// The map must cover everything the program touches (image, stack, console, devices) with attributes that
    /// keep Rust's aliasing guarantees, and it must outlive its use: keep it alive for the rest of the run (the
    /// firmware's `main` never returns, so a local there does).
    pub unsafe fn activate(&self) {
        let root = self.mapping.root_address().0;
        // What `Mapping::activate` would record: later changes to the map then follow break-before-make.
        self.mapping.mark_active();
        // SAFETY: the caller guarantees coverage and lifetime. The DSB makes the table writes (cacheable, like the
        // table walks TCR_EL2 asks for) complete before any walk of the new map; SCTLR_EL2 is restored as it was.
        unsafe {
            core::arch::asm!(
                "dsb ish",
                "mrs {sctlr}, sctlr_el2",
                "bic {off}, {sctlr}, #1",
                "msr sctlr_el2, {off}",
                "isb",
                "msr ttbr0_el2, {root}",
                "isb",
                "tlbi alle2",
                "dsb ish",
                "isb",
                "msr sctlr_el2, {sctlr}",
                "isb",
                root = in(reg) root,
                sctlr = out(reg) _,
                off = out(reg) _,
                options(nostack, preserves_flags),
            );
        }
    }
}

impl Default for IdentityMap {
    fn default() -> Self {
        Self::new()
    }
}
