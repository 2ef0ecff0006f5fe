//! Boot code for boards that need more than aarch64-rt's defaults, written once for every such board:
//!
//! - [`el3_boot_stub!`]: for a CPU that starts at EL3 with no firmware underneath (QEMU sbsa-ref, and many boards'
//!   boot ROMs). Every CPU that enters it sets up its own EL3 state; the boot CPU (affinity 0.0.0.0) gives
//!   non-secure EL2 the GIC, the FPU and the timers (CNTFRQ_EL0 from the board) and drops to non-secure EL2 at
//!   aarch64-rt's `entry`; every other CPU registers itself in a mailbox and waits there (WFE) until a PSCI
//!   CPU_ON names it. The stub stays resident as a minimal PSCI service: an SMC from EL2 for PSCI_VERSION (1.1),
//!   PSCI_FEATURES, CPU_ON (64-bit), CPU_OFF, AFFINITY_INFO (64-bit), SYSTEM_OFF or SYSTEM_RESET is answered at
//!   EL3, the last two by the 32-bit register writes the board names (its reset controller is usually
//!   secure-only). CPU_ON drops the named CPU to non-secure EL2h at the requested entry with the context in x0,
//!   as the boot CPU is dropped; CPU_OFF sends the calling CPU back to its mailbox. Every other function (among
//!   them CPU_SUSPEND, which a full PSCI 1.1 implementation must have) returns NOT_SUPPORTED, and PSCI_FEATURES
//!   says so too. CPUs are numbered by affinity ([`el3_cpu_slot`]: up to [`EL3_CPUS`] CPUs, Aff0 0..=7 in
//!   Aff1 0 or 1, Aff2 = Aff3 = 0, as QEMU numbers its CPUs); a CPU outside that range is parked for good.
//!   It assumes the non-VHE EL2 layouts (FEAT_E2H0: HCR_EL2.E2H may be 0), and does no CPU-specific setup,
//!   errata work or system-counter enabling (CNTCR.EN): add those for a board that needs them.
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

    /// This table (level 2) with `count` 2 MiB blocks mapping `pa` onwards at the same addresses: each at the
    /// entry its address selects within the table's 1 GiB (bits 29:21). RAM that starts or ends off a 1 GiB
    /// boundary, mapped without the memory around it (a SoC's secure DRAM). The level-1 entry that points here is
    /// written at boot ([`el2_boot_map_48!`]'s links).
    ///
    /// # Panics
    /// At compile time when `pa` is not 2 MiB-aligned or the blocks run past the table's 1 GiB.
    pub const fn with_2m_blocks(mut self, pa: u64, count: usize, attributes: El23Attributes) -> Table {
        assert!(pa.is_multiple_of(2 << 20), "a level-2 block must be 2 MiB-aligned");
        let first = ((pa >> 21) & 511) as usize;
        assert!(first + count <= 512, "a level-2 table maps one 1 GiB-aligned GiB");
        let mut i = 0;
        while i < count {
            // Bits [1:0] = 0b01: block descriptor.
            self.0[first + i] = (pa + ((i as u64) << 21)) | attributes.bits() as u64;
            i += 1;
        }
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

/// PSCI function IDs the EL3 stub answers (SMC32 and SMC64 calling conventions, PSCI 1.1, DEN 0022).
pub mod psci {
    /// PSCI_VERSION.
    pub const VERSION: u32 = 0x8400_0000;
    /// CPU_OFF.
    pub const CPU_OFF: u32 = 0x8400_0002;
    /// CPU_ON, SMC64.
    pub const CPU_ON_64: u32 = 0xc400_0003;
    /// AFFINITY_INFO, SMC64.
    pub const AFFINITY_INFO_64: u32 = 0xc400_0004;
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
    /// INVALID_PARAMETERS.
    pub const INVALID_PARAMETERS: i32 = -2;
    /// ALREADY_ON.
    pub const ALREADY_ON: i32 = -4;
    /// ON_PENDING.
    pub const ON_PENDING: i32 = -5;
}

/// How many CPUs the EL3 stub serves (mailbox slots; see [`el3_cpu_slot`]).
pub const EL3_CPUS: usize = 16;
/// MPIDR bits that put a CPU outside the stub's numbering: Aff0 >= 8, Aff1 >= 2, any Aff2 or Aff3 (MPIDR bits
/// 3-7, 9-23 and 32-39; bits 24-31, MT, U and RES1, do not matter).
pub const EL3_BAD_AFFINITY: u64 = 0xff_00ff_fef8;
/// Bytes of EL3 stack per CPU: the SMC service saves four registers, the fault report two.
pub const EL3_STACK_BYTES: usize = 512;

/// The mailbox slot of the CPU with affinity `mpidr` in the EL3 stub: Aff1 * 8 + Aff0, for Aff0 0..=7, Aff1 0
/// or 1 and Aff2 = Aff3 = 0 (QEMU's numbering: CPU n has Aff0 = n % 8, Aff1 = n / 8); `None` outside that. The
/// stub's assembly computes the same.
pub const fn el3_cpu_slot(mpidr: u64) -> Option<usize> {
    if mpidr & EL3_BAD_AFFINITY != 0 {
        None
    } else {
        Some(((mpidr >> 5) & 8 | mpidr & 7) as usize)
    }
}

/// A CPU's power state in the EL3 stub's mailbox, as AFFINITY_INFO returns it (0 ON, 1 OFF, 2 ON_PENDING), and
/// one value of the stub's own: absent (no CPU with that affinity has entered the stub).
pub mod cpu_state {
    /// Running in the non-secure world.
    pub const ON: u64 = 0;
    /// Waiting in its mailbox for CPU_ON.
    pub const OFF: u64 = 1;
    /// CPU_ON was accepted; the CPU has not left its mailbox yet.
    pub const ON_PENDING: u64 = 2;
    /// No CPU has registered in this slot.
    pub const ABSENT: u64 = 3;
}

/// The EL3 stub's mailboxes, one per CPU slot: `[state, entry, context, unused]` (32 bytes each). Only EL3 reads
/// and writes them, with its MMU off (so non-cacheable); the alignment keeps them off every cache line EL2 writes
/// (2 KiB: the largest cache writeback granule), so no dirty line of EL2's can be written back over them.
#[repr(C, align(2048))]
pub struct El3Mailbox(pub [[u64; 4]; EL3_CPUS]);

impl El3Mailbox {
    /// At boot: the boot CPU (slot 0) ON, every other slot absent until its CPU enters the stub.
    pub const INITIAL: El3Mailbox = {
        let mut slots = [[cpu_state::ABSENT, 0, 0, 0]; EL3_CPUS];
        slots[0][0] = cpu_state::ON;
        El3Mailbox(slots)
    };
}

/// The EL3 stub's stacks, [`EL3_STACK_BYTES`] per CPU slot, page-aligned so that no line is shared with memory
/// EL2 writes.
#[repr(C, align(4096))]
pub struct El3Stacks(pub [u8; EL3_CPUS * EL3_STACK_BYTES]);

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
/// entry must be `el3_entry` (`-C link-arg=--entry=el3_entry`), and every CPU of the machine should start there
/// (on QEMU: `-device loader,addr=<el3_entry>,cpu-num=N` for each secondary CPU N): a CPU that never enters the
/// stub stays absent, and CPU_ON for it returns INVALID_PARAMETERS.
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
///
/// What the stub does not arbitrate: two CPUs asking CPU_ON for the same target at the same moment may both be
/// told SUCCESS (its mailboxes are plain non-cacheable memory, without exclusives). The firmware starts every
/// secondary from the boot CPU.
#[macro_export]
macro_rules! el3_boot_stub {
    (
        counter_frequency: $frequency:expr,
        gic_distributor: $gicd:expr,
        uart: $uart:expr,
        system_off: ($off_register:expr, $off_value:expr),
        system_reset: ($reset_register:expr, $reset_value:expr) $(,)?
    ) => {
        /// The EL3 stub's stacks, one per CPU slot: the SMC service and the fault report use them.
        // SAFETY (attributes): `el3_stacks` is defined only here, the macro is instantiated once per binary, and
        // `.stack.*` is aarch64-rt's NOLOAD stack region, which nothing else overlaps.
        #[unsafe(link_section = ".stack.el3")]
        #[unsafe(export_name = "el3_stacks")]
        static mut EL3_STACKS: $crate::boot::El3Stacks =
            $crate::boot::El3Stacks([0; $crate::boot::EL3_CPUS * $crate::boot::EL3_STACK_BYTES]);

        /// The CPUs' mailboxes (state, entry, context), read and written at EL3 only.
        // SAFETY (attributes): `el3_mailbox` is defined only here, once per binary; in `.data` so that the loader
        // (and every reset, which reloads the image) sets its initial states, and aarch64-rt never zeroes it.
        #[unsafe(link_section = ".data.el3_mailbox")]
        #[unsafe(export_name = "el3_mailbox")]
        static mut EL3_MAILBOX: $crate::boot::El3Mailbox = $crate::boot::El3Mailbox::INITIAL;

        core::arch::global_asm!(
            $crate::__asm_mov_i!(),
            // `el3_slot out, mpidr, tmp`: out = the CPU's mailbox slot (Aff1 * 8 + Aff0), or {cpus} when the
            // affinity is outside the stub's numbering (see `boot::el3_cpu_slot`). Flags and tmp clobbered.
            ".macro el3_slot, out:req, mpidr:req, tmp:req",
            "mov_i \\tmp, {bad_affinity}",
            "tst \\mpidr, \\tmp",
            "and \\tmp, \\mpidr, #7",
            "ubfx \\out, \\mpidr, #8, #1",
            "orr \\out, \\tmp, \\out, lsl #3",
            "mov \\tmp, #{cpus}",
            "csel \\out, \\out, \\tmp, eq",
            ".endm",
            // `el3_stack slot, tmp`: sp = the top of that slot's EL3 stack.
            ".macro el3_stack, slot:req, tmp:req",
            "adrp \\tmp, el3_stacks",
            "add \\tmp, \\tmp, :lo12:el3_stacks",
            "add \\tmp, \\tmp, \\slot, lsl #{stack_shift}",
            "add sp, \\tmp, #{stack_bytes}",
            ".endm",
            // EL2's registers whose reset values are UNKNOWN, written before every drop to EL2 (x9 clobbered).
            ".macro el2_registers",
            "mov_i x9, {hcr}",
            "msr hcr_el2, x9",
            "mov_i x9, {cptr2}",
            "msr cptr_el2, x9",
            "mov_i x9, {sctlr2}",
            "msr sctlr_el2, x9",
            // Timers: no virtual offset, EL1 counter access.
            "msr cntvoff_el2, xzr",
            "mov x9, #3",
            "msr cnthctl_el2, x9",
            "msr vttbr_el2, xzr",
            ".endm",
            ".section .init.el3, \"ax\"",
            ".global el3_entry",
            "el3_entry:",
            // Every CPU: its slot (x20) and mailbox (x21); a CPU outside the numbering waits forever.
            "mrs x19, mpidr_el1",
            "el3_slot x20, x19, x9",
            "cmp x20, #{cpus}",
            "b.hs 79f",
            // EL3 itself: MMU and caches off, little-endian, no alignment checks (SCTLR_EL3's RES1 bits only).
            "mov_i x9, {sctlr3}",
            "msr sctlr_el3, x9",
            "isb",
            "adrp x9, el3_vectors",
            "add x9, x9, :lo12:el3_vectors",
            "msr vbar_el3, x9",
            "el3_stack x20, x9",
            // FP/SIMD, debug and PMU untrapped at EL3; non-secure EL2, AArch64.
            "msr cptr_el3, xzr",
            "msr mdcr_el3, xzr",
            "mov_i x9, {scr}",
            "msr scr_el3, x9",
            // GIC: system registers for the lower ELs (a per-CPU register).
            "mov x9, #{sre}",
            "msr icc_sre_el3, x9",
            "isb",
            // The counter's frequency (a per-CPU register, writable only here).
            "mov_i x9, {frequency}",
            "msr cntfrq_el0, x9",
            "adrp x21, el3_mailbox",
            "add x21, x21, :lo12:el3_mailbox",
            "add x21, x21, x20, lsl #5",
            "cbnz x20, 70f",
            // The boot CPU: one security state in the GIC (so EL2 owns the distributor); GICD_CTLR.RWP (bit 31)
            // tracks the write to DS.
            "mov_i x9, {gicd}",
            "ldr w10, [x9]",
            "orr w10, w10, #{ds}",
            "str w10, [x9]",
            "87:",
            "ldr w10, [x9]",
            "tbnz w10, #31, 87b",
            "el2_registers",
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
            // A secondary CPU: registers itself (absent -> off) once, then waits in its mailbox.
            "70:",
            "ldr x9, [x21]",
            "cmp x9, #{absent}",
            "b.ne el3_wait_for_cpu_on",
            "mov x9, #{off}",
            "str x9, [x21]",
            "dsb sy",
            // Waits for CPU_ON (x20: slot, x21: mailbox; the stack is this CPU's), then drops to EL2h at the
            // entry with the context in x0. CPU_OFF comes back here.
            "el3_wait_for_cpu_on:",
            "ldr x9, [x21]",
            "cmp x9, #{on_pending}",
            "b.eq 72f",
            "wfe",
            "b el3_wait_for_cpu_on",
            "72:",
            "ldr x0, [x21, #16]",
            "ldr x22, [x21, #8]",
            "str xzr, [x21]",
            "dsb sy",
            "el2_registers",
            "mov x9, #{spsr}",
            "msr spsr_el3, x9",
            "msr elr_el3, x22",
            "mov x1, xzr",
            "mov x2, xzr",
            "mov x3, xzr",
            "isb",
            "eret",
            "79:",
            "wfe",
            "b 79b",
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
            // SMC from EL2/EL1 (AArch64): PSCI on w0, arguments in x1-x3, result in x0; x9-x12 saved on this
            // CPU's EL3 stack, every other register untouched. The EL3 stub reads no memory of the caller's (its
            // MMU is off, so its view of RAM would not be the caller's cacheable one): only its own mailboxes
            // and stack. The power paths never return and may clobber anything.
            "92:",
            "stp x9, x10, [sp, #-32]!",
            "stp x11, x12, [sp, #16]",
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
            "mov_i x9, {cpu_on}",
            "cmp w0, w9",
            "b.eq 60f",
            "mov_i x9, {cpu_off}",
            "cmp w0, w9",
            "b.eq 65f",
            "mov_i x9, {affinity_info}",
            "cmp w0, w9",
            "b.eq 67f",
            "97:",
            "mov x0, #{not_supported}",
            "98:",
            "ldp x11, x12, [sp, #16]",
            "ldp x9, x10, [sp], #32",
            "eret",
            "93:",
            "mov_i x0, {stub_version}",
            "b 98b",
            // PSCI_FEATURES(x1): 0 for the functions served here, NOT_SUPPORTED otherwise.
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
            "mov_i x9, {cpu_on}",
            "cmp w1, w9",
            "b.eq 99f",
            "mov_i x9, {cpu_off}",
            "cmp w1, w9",
            "b.eq 99f",
            "mov_i x9, {affinity_info}",
            "cmp w1, w9",
            "b.eq 99f",
            "b 97b",
            "99:",
            "mov x0, xzr",
            "b 98b",
            // CPU_ON(x1 target, x2 entry, x3 context): an OFF target gets its entry and context, then ON_PENDING
            // and an event; an absent or unnumbered one is INVALID_PARAMETERS.
            "60:",
            "el3_slot x9, x1, x10",
            "cmp x9, #{cpus}",
            "b.hs 61f",
            "adrp x10, el3_mailbox",
            "add x10, x10, :lo12:el3_mailbox",
            "add x10, x10, x9, lsl #5",
            "ldr x11, [x10]",
            "cmp x11, #{off}",
            "b.eq 62f",
            "cmp x11, #{on}",
            "b.eq 63f",
            "cmp x11, #{on_pending}",
            "b.eq 64f",
            "61:",
            "mov x0, #{invalid_parameters}",
            "b 98b",
            "63:",
            "mov x0, #{already_on}",
            "b 98b",
            "64:",
            "mov x0, #{on_pending_error}",
            "b 98b",
            "62:",
            "str x2, [x10, #8]",
            "str x3, [x10, #16]",
            "dsb sy",
            "mov x11, #{on_pending}",
            "str x11, [x10]",
            "dsb sy",
            "sev",
            "mov x0, xzr",
            "b 98b",
            // CPU_OFF: the calling CPU goes back to its mailbox, OFF, with a fresh EL3 stack (never returns).
            "65:",
            "mrs x9, mpidr_el1",
            "el3_slot x20, x9, x10",
            "cmp x20, #{cpus}",
            "b.hs 79b",
            "adrp x21, el3_mailbox",
            "add x21, x21, :lo12:el3_mailbox",
            "add x21, x21, x20, lsl #5",
            "mov x9, #{off}",
            "str x9, [x21]",
            "dsb sy",
            "el3_stack x20, x9",
            "b el3_wait_for_cpu_on",
            // AFFINITY_INFO(x1 target, x2 lowest level 0): the target's state, which is the PSCI encoding.
            "67:",
            "cbnz x2, 61b",
            "el3_slot x9, x1, x10",
            "cmp x9, #{cpus}",
            "b.hs 61b",
            "adrp x10, el3_mailbox",
            "add x10, x10, :lo12:el3_mailbox",
            "add x10, x10, x9, lsl #5",
            "ldr x0, [x10]",
            "cmp x0, #{absent}",
            "b.eq 61b",
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
            // Unexpected: report ESR_EL3 on the UART, then exit through semihosting with status 5. This CPU's stack
            // starts afresh (slot 0's for an unnumbered CPU) and any further exception halts, so that a HLT without
            // a semihosting host cannot loop.
            "91:",
            "mrs x9, mpidr_el1",
            "el3_slot x10, x9, x11",
            "cmp x10, #{cpus}",
            "csel x10, x10, xzr, lo",
            "el3_stack x10, x9",
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
            ".purgem el2_registers",
            ".purgem el3_stack",
            ".purgem el3_slot",
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
            cpus = const $crate::boot::EL3_CPUS,
            bad_affinity = const $crate::boot::EL3_BAD_AFFINITY,
            stack_shift = const $crate::boot::EL3_STACK_BYTES.trailing_zeros(),
            stack_bytes = const $crate::boot::EL3_STACK_BYTES,
            on = const $crate::boot::cpu_state::ON,
            off = const $crate::boot::cpu_state::OFF,
            on_pending = const $crate::boot::cpu_state::ON_PENDING,
            absent = const $crate::boot::cpu_state::ABSENT,
            psci_version = const $crate::boot::psci::VERSION,
            psci_features = const $crate::boot::psci::FEATURES,
            system_off = const $crate::boot::psci::SYSTEM_OFF,
            system_reset = const $crate::boot::psci::SYSTEM_RESET,
            cpu_on = const $crate::boot::psci::CPU_ON_64,
            cpu_off = const $crate::boot::psci::CPU_OFF,
            affinity_info = const $crate::boot::psci::AFFINITY_INFO_64,
            stub_version = const $crate::boot::psci::STUB_VERSION,
            not_supported = const $crate::boot::psci::NOT_SUPPORTED,
            invalid_parameters = const $crate::boot::psci::INVALID_PARAMETERS,
            already_on = const $crate::boot::psci::ALREADY_ON,
            on_pending_error = const $crate::boot::psci::ON_PENDING,
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
///
/// After a `;`, links make an entry of a level-1 table a table descriptor pointing at a level-2 [`Table`] (2 MiB
/// blocks, [`Table::with_2m_blocks`]), written at boot like the root's entries. A linked level-1 table must be a
/// `static mut` (it is written through its symbol, never read by Rust) in `.data`: one with a block of its own is
/// there; an otherwise empty one would land in `.bss`, which aarch64-rt's entry zeroes after `enable_mmu` has
/// linked it, so give it `#[unsafe(link_section = ".data.boot_tables")]`:
///
/// ```ignore
/// static mut LOW: Table = Table::EMPTY.with_block(0, 0, mmu::DEVICE);
/// static DRAM: Table = Table::EMPTY.with_2m_blocks(0x9000_0000, 384, BOOT_MEMORY);
/// smmuv3_firmware::el2_boot_map_48!(0 => LOW; LOW[2] => DRAM);
/// ```
#[macro_export]
macro_rules! el2_boot_map_48 {
    ($($slot:literal => $table:path),+ $(; $($parent:ident [$index:literal] => $child:path),+)? $(,)?) => {
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
            // Links (level-1 entries to level-2 tables) first, each written and its line invalidated alike.
            $($(
                "adrp x9, {}",
                "add x9, x9, :lo12:{}",
                "orr x9, x9, #3",
                "adrp x10, {}",
                "add x10, x10, :lo12:{}",
                concat!("add x10, x10, #(", stringify!($index), " * 8)"),
                "str x9, [x10]",
                "dsb sy",
                "dc ivac, x10",
            )+)?
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
            $($(sym $child, sym $child, sym $parent, sym $parent,)+)?
            $(sym $table, sym $table,)+
            mair = const $crate::mmu::MAIR.0,
            tcr = const $crate::boot::TCR_EL2_48,
            sctlr = const $crate::boot::SCTLR_EL2_MMU_ON,
        );
    };
}
