//! Boot code for boards that need more than aarch64-rt's defaults, written once for every such board:
//!
//! - [`el3_boot_stub!`]: for a CPU that starts at EL3 with no firmware underneath (QEMU sbsa-ref, and many boards'
//!   boot ROMs). It parks secondary CPUs, installs EL3 vectors, gives non-secure EL2 the GIC, the FPU and the
//!   timers (CNTFRQ_EL0 from the board), drops to non-secure EL2 at aarch64-rt's `entry`, and stays resident as a
//!   minimal PSCI service for a single-CPU firmware: an SMC from EL2 for PSCI_VERSION (1.1), PSCI_FEATURES,
//!   SYSTEM_OFF or SYSTEM_RESET is answered at EL3, the last two by the 32-bit register writes the board names (its
//!   reset controller is usually secure-only). Every other function, including the CPU_ON, CPU_OFF, CPU_SUSPEND
//!   and AFFINITY_INFO that a full PSCI 1.1 implementation must have, returns NOT_SUPPORTED (PSCI_FEATURES says
//!   so too). It assumes the non-VHE EL2 layouts (FEAT_E2H0: HCR_EL2.E2H may be 0), and does no CPU-specific
//!   setup, errata work or system-counter enabling (CNTCR.EN): add those for a board that needs them.
//! - [`el2_boot_map_48!`]: an `enable_mmu` for aarch64-rt's entry with 48-bit virtual addresses (level-0 root),
//!   for boards whose RAM lies beyond the 512 GiB that aarch64-rt's single-table boot map reaches.
//!
//! Both are macros because they must be instantiated once, in the board's binary, with the board's constants.

use aarch64_paging::descriptor::El23Attributes;

/// A 4 KiB translation table of the boot map (level 0 or level 1), built at compile time.
#[repr(C, align(4096))]
pub struct Table(pub [u64; 512]);

/// Size of a level-1 block (4 KiB granule).
pub const GIB: u64 = 1 << 30;

/// Attributes of RAM in a boot map: normal write-back, inner shareable, executable (the image runs from it).
pub const MEMORY: El23Attributes = El23Attributes::VALID
    .union(El23Attributes::ATTRIBUTE_INDEX_1)
    .union(El23Attributes::INNER_SHAREABLE)
    .union(El23Attributes::USER_RES1)
    .union(El23Attributes::ACCESSED);

impl Table {
    /// A table with no valid entry.
    pub const EMPTY: Table = Table([0; 512]);

    /// This table with entry `index` a 1 GiB block at physical address `pa` (level-1 tables only).
    ///
    /// # Panics
    /// At compile time (the tables are constants) when `pa` is not 1 GiB-aligned or `index` is out of range.
    pub const fn with_block(mut self, index: usize, pa: u64, attributes: El23Attributes) -> Table {
        assert!(pa.is_multiple_of(GIB), "a level-1 block must be 1 GiB-aligned");
        // Bits [1:0] = 0b01: block descriptor.
        self.0[index] = pa | attributes.bits() as u64;
        self
    }
}

/// TCR_EL2 of the 48-bit boot map: T0SZ 16 (level-0 root), 4 KiB granule, inner-shareable write-back walks,
/// RES1 bits 31, 23. PS (bits 18:16) is filled in at boot from ID_AA64MMFR0_EL1.PARange, at most 48 bits.
pub const TCR_EL2_48: u64 = 16 | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 23) | (1 << 31);
/// SCTLR_EL2 with the MMU, caches and stack alignment check on (RES1 bits of the non-VHE layout included).
pub const SCTLR_EL2_MMU_ON: u64 = SCTLR_EL2_RES1 | 1 | (1 << 2) | (1 << 3) | (1 << 12);
/// SCTLR_EL2's RES1 bits (non-VHE): the value EL3 writes before EL2 runs, MMU and caches off.
pub const SCTLR_EL2_RES1: u64 =
    (1 << 4) | (1 << 5) | (1 << 11) | (1 << 16) | (1 << 18) | (1 << 22) | (1 << 23) | (3 << 28);

/// SCTLR_EL3's RES1 bits: MMU, caches and alignment checks off, little-endian.
pub const SCTLR_EL3_RES1: u64 =
    (1 << 4) | (1 << 5) | (1 << 11) | (1 << 16) | (1 << 18) | (1 << 22) | (1 << 23) | (3 << 28);

/// SCR_EL3 for a non-secure AArch64 EL2: NS, RES1 bits 5:4, HVC enabled, EL2 AArch64. Interrupts are not
/// routed to EL3 (IRQ = FIQ = EA = 0), SMC is enabled (SMD = 0).
pub const SCR_EL3_NS_EL2: u64 = 1 | (3 << 4) | (1 << 8) | (1 << 10);
/// SPSR_EL3 for the drop: EL2h with D, A, I and F masked.
pub const SPSR_EL2H_MASKED: u64 = 0x3c9;
/// HCR_EL2 before EL2 runs: EL1 would be AArch64; nothing trapped, nothing routed.
pub const HCR_EL2_RW: u64 = 1 << 31;
/// CPTR_EL2 (non-VHE) with only its RES1 bits: FP/SIMD not trapped.
pub const CPTR_EL2_RES1: u64 = 0x33ff;
/// ICC_SRE_EL3: system-register GIC interface at EL3, lower ELs may enable theirs (SRE, DFB, DIB, Enable).
pub const ICC_SRE_EL3_ALL: u64 = 0xf;
/// GICD_CTLR.DS: disable security, so non-secure EL2 may program the whole GIC.
pub const GICD_CTLR_DS: u32 = 1 << 6;

/// PSCI function IDs the EL3 stub answers (SMC32 calling convention, PSCI 1.1, DEN 0022).
pub mod psci {
    /// PSCI_VERSION.
    pub const VERSION: u32 = 0x8400_0000;
    /// SYSTEM_OFF.
    pub const SYSTEM_OFF: u32 = 0x8400_0008;
    /// SYSTEM_RESET.
    pub const SYSTEM_RESET: u32 = 0x8400_0009;
    /// PSCI_FEATURES.
    pub const FEATURES: u32 = 0x8400_000a;
    /// The version the stub reports: 1.1.
    pub const STUB_VERSION: u32 = 0x0001_0001;
    /// NOT_SUPPORTED.
    pub const NOT_SUPPORTED: i32 = -1;
}

/// The assembler macro both boot routines use: `mov_i xN, CONSTANT` loads a 64-bit constant.
#[doc(hidden)]
#[macro_export]
macro_rules! __asm_mov_i {
    () => {
        concat!(
            ".macro mov_i, reg:req, imm:req\n",
            "movz \\reg, :abs_g3:\\imm\n",
            "movk \\reg, :abs_g2_nc:\\imm\n",
            "movk \\reg, :abs_g1_nc:\\imm\n",
            "movk \\reg, :abs_g0_nc:\\imm\n",
            ".endm"
        )
    };
}

/// Instantiates the EL3 boot stub (see the module documentation) with the board's constants. The image's ELF
/// entry must be `el3_entry` (`-C link-arg=--entry=el3_entry`).
///
/// ```ignore
/// smmuv3_firmware::el3_boot_stub! {
///     counter_frequency: 1_000_000_000,
///     gic_distributor: 0x4006_0000,
///     uart: 0x6000_0000,
///     system_off: (0x5000_0000, 1),
///     system_reset: (0x5000_0000, 2),
/// }
/// ```
/// An unexpected exception at EL3 prints `EL3: unexpected exception, ESR_EL3=…` on the PL011 at `uart` and ends
/// the run through semihosting with status 5.
#[macro_export]
macro_rules! el3_boot_stub {
    (
        counter_frequency: $frequency:expr,
        gic_distributor: $gicd:expr,
        uart: $uart:expr,
        system_off: ($off_register:expr, $off_value:expr),
        system_reset: ($reset_register:expr, $reset_value:expr) $(,)?
    ) => {
        /// The EL3 stub's stack: only its fault report uses it (the SMC service touches no memory).
        // SAFETY (attributes): `el3_stack` is defined only here, the macro is instantiated once per binary, and
        // `.stack.*` is aarch64-rt's NOLOAD stack region, which nothing else overlaps.
        #[unsafe(link_section = ".stack.el3")]
        #[unsafe(export_name = "el3_stack")]
        static mut EL3_STACK: [u64; 512] = [0; 512];

        core::arch::global_asm!(
            $crate::__asm_mov_i!(),
            ".section .init.el3, \"ax\"",
            ".global el3_entry",
            "el3_entry:",
            // Only the CPU with affinity 0.0.0.0 boots; the others wait forever.
            "mrs x9, mpidr_el1",
            "and x10, x9, #0xffffff",
            "lsr x9, x9, #32",
            "and x9, x9, #0xff",
            "orr x9, x9, x10",
            "cbnz x9, 90f",
            // EL3 itself: MMU and caches off, little-endian, no alignment checks (SCTLR_EL3's RES1 bits only).
            "mov_i x9, {sctlr3}",
            "msr sctlr_el3, x9",
            "isb",
            "adrp x9, el3_vectors",
            "add x9, x9, :lo12:el3_vectors",
            "msr vbar_el3, x9",
            "adrp x9, el3_stack",
            "add x9, x9, :lo12:el3_stack",
            "add sp, x9, #4096",
            // FP/SIMD, debug and PMU untrapped at EL3; non-secure EL2, AArch64.
            "msr cptr_el3, xzr",
            "msr mdcr_el3, xzr",
            "mov_i x9, {scr}",
            "msr scr_el3, x9",
            // GIC: system registers for the lower ELs, one security state (so EL2 owns the distributor).
            "mov x9, #{sre}",
            "msr icc_sre_el3, x9",
            "isb",
            "mov_i x9, {gicd}",
            "ldr w10, [x9]",
            "orr w10, w10, #{ds}",
            "str w10, [x9]",
            // GICD_CTLR.RWP (bit 31) tracks the write to DS.
            "87:",
            "ldr w10, [x9]",
            "tbnz w10, #31, 87b",
            // EL2's registers whose reset values are UNKNOWN.
            "mov_i x9, {hcr}",
            "msr hcr_el2, x9",
            "mov_i x9, {cptr2}",
            "msr cptr_el2, x9",
            "mov_i x9, {sctlr2}",
            "msr sctlr_el2, x9",
            // Timers: the counter's frequency (writable only here), no virtual offset, EL1 counter access.
            "mov_i x9, {frequency}",
            "msr cntfrq_el0, x9",
            "msr cntvoff_el2, xzr",
            "mov x9, #3",
            "msr cnthctl_el2, x9",
            "msr vttbr_el2, xzr",
            // Drop to EL2h at aarch64-rt's entry, registers clean.
            "mov x9, #{spsr}",
            "msr spsr_el3, x9",
            "adrp x9, entry",
            "add x9, x9, :lo12:entry",
            "msr elr_el3, x9",
            "mov x0, xzr",
            "mov x1, xzr",
            "mov x2, xzr",
            "mov x3, xzr",
            "isb",
            "eret",
            "90:",
            "wfe",
            "b 90b",
            // The vector table: everything is unexpected but an SMC from the lower ELs.
            ".section .text.el3_vectors, \"ax\"",
            ".balign 2048",
            "el3_vectors:",
            ".rept 8",
            ".balign 128",
            "b 91f",
            ".endr",
            ".balign 128",
            "b 92f",
            ".rept 7",
            ".balign 128",
            "b 91f",
            ".endr",
            // SMC from EL2/EL1 (AArch64): PSCI on w0, result in x0; x9 kept in TPIDR_EL3 (no memory: EL3 runs with
            // its MMU off, so its view of RAM would not be the caller's cacheable one), everything else untouched.
            // The power paths never return and may clobber x10.
            "92:",
            "msr tpidr_el3, x9",
            "mrs x9, esr_el3",
            "ubfx x9, x9, #26, #6",
            "cmp x9, #0x17",
            "b.ne 91f",
            "mov_i x9, {psci_version}",
            "cmp w0, w9",
            "b.eq 93f",
            "mov_i x9, {psci_features}",
            "cmp w0, w9",
            "b.eq 94f",
            "mov_i x9, {system_off}",
            "cmp w0, w9",
            "b.eq 95f",
            "mov_i x9, {system_reset}",
            "cmp w0, w9",
            "b.eq 96f",
            "97:",
            "mov x0, #-1",
            "98:",
            "mrs x9, tpidr_el3",
            "eret",
            "93:",
            "mov_i x0, {stub_version}",
            "b 98b",
            // PSCI_FEATURES(x1): 0 for the four functions served here, NOT_SUPPORTED otherwise.
            "94:",
            "mov_i x9, {psci_version}",
            "cmp w1, w9",
            "b.eq 99f",
            "mov_i x9, {psci_features}",
            "cmp w1, w9",
            "b.eq 99f",
            "mov_i x9, {system_off}",
            "cmp w1, w9",
            "b.eq 99f",
            "mov_i x9, {system_reset}",
            "cmp w1, w9",
            "b.eq 99f",
            "b 97b",
            "99:",
            "mov x0, xzr",
            "b 98b",
            "95:",
            "mov_i x9, {off_register}",
            "mov_i x10, {off_value}",
            "b 89f",
            "96:",
            "mov_i x9, {reset_register}",
            "mov_i x10, {reset_value}",
            "89:",
            "dsb sy",
            "str w10, [x9]",
            "dsb sy",
            "88:",
            "wfi",
            "b 88b",
            // Unexpected: report ESR_EL3 on the UART, then exit through semihosting with status 5. The stack starts
            // afresh and any further exception halts, so that a HLT without a semihosting host cannot loop.
            "91:",
            "adrp x9, el3_stack",
            "add x9, x9, :lo12:el3_stack",
            "add sp, x9, #4096",
            "adrp x9, el3_halt_vectors",
            "add x9, x9, :lo12:el3_halt_vectors",
            "msr vbar_el3, x9",
            "isb",
            "mov_i x9, {uart}",
            "adr x10, 80f",
            "81:",
            "ldrb w11, [x10], #1",
            "cbz w11, 82f",
            "bl 86f",
            "b 81b",
            "82:",
            "mrs x12, esr_el3",
            "mov x13, #60",
            "83:",
            "lsr x11, x12, x13",
            "and x11, x11, #0xf",
            "cmp x11, #10",
            "add x14, x11, #0x30",
            "add x11, x11, #0x57",
            "csel x11, x14, x11, lo",
            "bl 86f",
            "subs x13, x13, #4",
            "b.ge 83b",
            "mov x11, #0x0a",
            "bl 86f",
            "mov_i x9, 0x20026",
            "mov x10, #5",
            "stp x9, x10, [sp, #-16]!",
            "mov x1, sp",
            "mov w0, #0x18",
            "hlt #0xf000",
            "b 88b",
            // Write w11 to the PL011 at x9 when its FIFO has room.
            "86:",
            "ldr w15, [x9, #0x18]",
            "tbnz w15, #5, 86b",
            "str w11, [x9]",
            "ret",
            "80:",
            ".asciz \"\\nEL3: unexpected exception, ESR_EL3=0x\"",
            ".balign 2048",
            "el3_halt_vectors:",
            ".rept 16",
            ".balign 128",
            "b 88b",
            ".endr",
            ".purgem mov_i",
            scr = const $crate::boot::SCR_EL3_NS_EL2,
            sctlr3 = const $crate::boot::SCTLR_EL3_RES1,
            frequency = const $frequency,
            sre = const $crate::boot::ICC_SRE_EL3_ALL,
            gicd = const $gicd,
            ds = const $crate::boot::GICD_CTLR_DS,
            hcr = const $crate::boot::HCR_EL2_RW,
            cptr2 = const $crate::boot::CPTR_EL2_RES1,
            sctlr2 = const $crate::boot::SCTLR_EL2_RES1,
            spsr = const $crate::boot::SPSR_EL2H_MASKED,
            psci_version = const $crate::boot::psci::VERSION,
            psci_features = const $crate::boot::psci::FEATURES,
            system_off = const $crate::boot::psci::SYSTEM_OFF,
            system_reset = const $crate::boot::psci::SYSTEM_RESET,
            stub_version = const $crate::boot::psci::STUB_VERSION,
            off_register = const $off_register,
            off_value = const $off_value,
            reset_register = const $reset_register,
            reset_value = const $reset_value,
            uart = const $uart,
        );
    };
}

/// Instantiates aarch64-rt's `enable_mmu` for a 48-bit EL2 boot map: a level-0 root (in `.data`, filled before
/// the MMU goes on) whose listed slots point at the given level-1 [`Table`]s (slot `n` covers
/// `n * 512 GiB ..`). The board crate must enable aarch64-rt's `initial-pagetable` feature without calling its
/// `initial_pagetable!`. MAIR_EL2 is the firmware's [`crate::mmu::MAIR`]. Like aarch64-rt's own routine it keeps
/// x0-x3 (the boot arguments) and clobbers only x8-x11. (aarch64-rt 0.4.3's own EL2 routine copies PARange into
/// TCR_EL2 bits 35:32, the EL1 IPS position, where non-VHE TCR_EL2 has DS and MTX; this one sets PS.)
///
/// ```ignore
/// static LOW: Table = Table::EMPTY.with_block(1, 0x4000_0000, mmu::DEVICE);
/// static RAM: Table = Table::EMPTY.with_block(0, 0x100_0000_0000, BOOT_MEMORY);
/// smmuv3_firmware::el2_boot_map_48!(0 => LOW, 2 => RAM);
/// ```
#[macro_export]
macro_rules! el2_boot_map_48 {
    ($($slot:literal => $table:path),+ $(,)?) => {
        // SAFETY (attributes): `boot_root_table` is defined only here, once per binary; in `.data` (not `.bss`) so
        // that aarch64-rt's entry does not zero it after `enable_mmu` has filled it and turned the MMU on.
        #[unsafe(link_section = ".data.boot_root")]
        #[unsafe(export_name = "boot_root_table")]
        static mut BOOT_ROOT_TABLE: $crate::boot::Table = $crate::boot::Table::EMPTY;

        core::arch::global_asm!(
            $crate::__asm_mov_i!(),
            ".section .init.enable_mmu, \"ax\"",
            ".global enable_mmu",
            "enable_mmu:",
            "adrp x8, boot_root_table",
            "add x8, x8, :lo12:boot_root_table",
            // The root entries are written with the MMU and caches off (straight to memory); then their lines are
            // invalidated, after a barrier, so that no stale cached copy hides them from the cacheable table walk.
            $(
                "adrp x9, {}",
                "add x9, x9, :lo12:{}",
                "orr x9, x9, #3",
                concat!("str x9, [x8, #(", stringify!($slot), " * 8)]"),
            )+
            "dsb sy",
            $(
                concat!("add x10, x8, #(", stringify!($slot), " * 8)"),
                "dc ivac, x10",
            )+
            "dsb sy",
            "mov_i x9, {mair}",
            "msr mair_el2, x9",
            "msr ttbr0_el2, x8",
            // TCR_EL2.PS: the implemented physical address size, at most 48 bits (4 KiB granule without LPA2).
            "mov_i x9, {tcr}",
            "mrs x10, id_aa64mmfr0_el1",
            "and x10, x10, #0xf",
            "mov x11, #5",
            "cmp x10, x11",
            "csel x10, x10, x11, lo",
            "bfi x9, x10, #16, #3",
            "msr tcr_el2, x9",
            "isb",
            "tlbi alle2",
            "ic iallu",
            "dsb nsh",
            "isb",
            "mov_i x9, {sctlr}",
            "msr sctlr_el2, x9",
            "isb",
            "ret",
            ".purgem mov_i",
            $(sym $table, sym $table,)+
            mair = const $crate::mmu::MAIR.0,
            tcr = const $crate::boot::TCR_EL2_48,
            sctlr = const $crate::boot::SCTLR_EL2_MMU_ON,
        );
    };
}
