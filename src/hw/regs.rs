//! SMMUv3 register map (Arm IHI 0070, chapter 6): the page 0 and page 1 register blocks and their fields.
//!
//! Offsets and field positions are the architecture's; each field sits under the register it belongs to, so a
//! line can be checked against the specification's register description.

use tock_registers::register_bitfields;
use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, ReadWrite};

register_bitfields! [u32,
    /// SMMU_IDR0: features of the translation.
    pub IDR0 [
        /// Stage-2 translation supported.
        S2P OFFSET(0) NUMBITS(1) [],
        /// Stage-1 translation supported.
        S1P OFFSET(1) NUMBITS(1) [],
        /// Translation table formats supported.
        TTF OFFSET(2) NUMBITS(2) [Reserved = 0, AArch32 = 1, AArch64 = 2, AArch32AndAArch64 = 3],
        /// Coherent access to in-memory structures (tables, queues) supported.
        COHACC OFFSET(4) NUMBITS(1) [],
        /// Broadcast TLB maintenance supported.
        BTM OFFSET(5) NUMBITS(1) [],
        /// Hardware translation table update of Access flag and Dirty state.
        HTTU OFFSET(6) NUMBITS(2) [None = 0, AccessFlag = 1, AccessFlagAndDirty = 2],
        /// Dormant hint supported.
        DORMHINT OFFSET(8) NUMBITS(1) [],
        /// Hypervisor stage-1 contexts (EL2 StreamWorld) supported.
        HYP OFFSET(9) NUMBITS(1) [],
        /// PCIe ATS supported.
        ATS OFFSET(10) NUMBITS(1) [],
        /// Non-secure stage-1-only ATS supported.
        NS1ATS OFFSET(11) NUMBITS(1) [],
        /// 16-bit ASIDs supported.
        ASID16 OFFSET(12) NUMBITS(1) [],
        /// MSIs supported.
        MSI OFFSET(13) NUMBITS(1) [],
        /// WFE wake-up events supported.
        SEV OFFSET(14) NUMBITS(1) [],
        /// Address translation operations supported.
        ATOS OFFSET(15) NUMBITS(1) [],
        /// PRI supported.
        PRI OFFSET(16) NUMBITS(1) [],
        /// VMID wildcard matching supported.
        VMW OFFSET(17) NUMBITS(1) [],
        /// 16-bit VMIDs supported.
        VMID16 OFFSET(18) NUMBITS(1) [],
        /// Two-level CD tables supported.
        CD2L OFFSET(19) NUMBITS(1) [],
        /// Virtual ATOS supported.
        VATOS OFFSET(20) NUMBITS(1) [],
        /// Endianness of translation table walks.
        TTENDIAN OFFSET(21) NUMBITS(2) [Mixed = 0, Reserved = 1, Little = 2, Big = 3],
        /// Stall model.
        STALL_MODEL OFFSET(24) NUMBITS(2) [StallAndTerminate = 0, TerminateOnly = 1, StallForced = 2],
        /// Terminate model. 0: a terminated transaction either aborts or reads as zero with writes ignored
        /// (RAZ/WI), as CD.A selects. 1: a terminated transaction always aborts, and CD.A = 0 is ILLEGAL.
        TERM_MODEL OFFSET(26) NUMBITS(1) [],
        /// Stream table formats supported.
        ST_LEVEL OFFSET(27) NUMBITS(2) [Linear = 0, TwoLevel = 1]
    ],
    /// SMMU_IDR1: table and queue sizes.
    pub IDR1 [
        /// Bits of StreamID supported.
        SIDSIZE OFFSET(0) NUMBITS(6) [],
        /// Bits of SubstreamID supported.
        SSIDSIZE OFFSET(6) NUMBITS(5) [],
        /// log2 of the maximum PRI queue entries.
        PRIQS OFFSET(11) NUMBITS(5) [],
        /// log2 of the maximum event queue entries.
        EVENTQS OFFSET(16) NUMBITS(5) [],
        /// log2 of the maximum command queue entries.
        CMDQS OFFSET(21) NUMBITS(5) [],
        /// Attribute permissions override supported.
        ATTR_PERMS_OVR OFFSET(26) NUMBITS(1) [],
        /// Attribute types override supported.
        ATTR_TYPES_OVR OFFSET(27) NUMBITS(1) [],
        /// Relative base pointers.
        REL OFFSET(28) NUMBITS(1) [],
        /// Queue base addresses are fixed.
        QUEUES_PRESET OFFSET(29) NUMBITS(1) [],
        /// Table base addresses are fixed.
        TABLES_PRESET OFFSET(30) NUMBITS(1) [],
        /// Enhanced command queue interfaces supported.
        ECMDQ OFFSET(31) NUMBITS(1) []
    ],
    /// SMMU_IDR3: further optional features.
    pub IDR3 [
        /// Hierarchical attribute disables supported.
        HAD OFFSET(2) NUMBITS(1) [],
        /// Page-based hardware attributes supported.
        PBHA OFFSET(3) NUMBITS(1) [],
        /// EL0/EL1 execute-never distinction at stage 2 supported.
        XNX OFFSET(4) NUMBITS(1) [],
        /// PASID-per-stream (PPS) supported.
        PPS OFFSET(5) NUMBITS(1) [],
        /// MPAM supported.
        MPAM OFFSET(7) NUMBITS(1) [],
        /// Stage-2 forced write-back (FWB) supported.
        FWB OFFSET(8) NUMBITS(1) [],
        /// Small translation tables (STT) supported.
        STT OFFSET(9) NUMBITS(1) [],
        /// Range-based TLB invalidation supported.
        RIL OFFSET(10) NUMBITS(1) [],
        /// Break-before-make level.
        BBML OFFSET(11) NUMBITS(2) [Level0 = 0, Level1 = 1, Level2 = 2],
        /// E0PD supported.
        E0PD OFFSET(13) NUMBITS(1) [],
        /// Stage-1 PTW not-non-cacheable (PTWNNC).
        PTWNNC OFFSET(14) NUMBITS(1) []
    ],
    /// SMMU_IDR5: output address size, granules, stall limits.
    pub IDR5 [
        /// Output address size.
        OAS OFFSET(0) NUMBITS(3) [Bits32 = 0, Bits36 = 1, Bits40 = 2, Bits42 = 3, Bits44 = 4, Bits48 = 5, Bits52 = 6],
        /// 4 KiB translation granule supported.
        GRAN4K OFFSET(4) NUMBITS(1) [],
        /// 16 KiB translation granule supported.
        GRAN16K OFFSET(5) NUMBITS(1) [],
        /// 64 KiB translation granule supported.
        GRAN64K OFFSET(6) NUMBITS(1) [],
        /// Virtual address extension: 48 or 52 bits.
        VAX OFFSET(10) NUMBITS(2) [Bits48 = 0, Bits52 = 1],
        /// Maximum number of outstanding stalled transactions.
        STALL_MAX OFFSET(16) NUMBITS(16) []
    ],
    /// SMMU_IIDR: implementation identification.
    pub IIDR [
        /// JEP106 code of the implementer.
        IMPLEMENTER OFFSET(0) NUMBITS(12) [],
        /// Minor revision.
        REVISION OFFSET(12) NUMBITS(4) [],
        /// Major revision.
        VARIANT OFFSET(16) NUMBITS(4) [],
        /// Product identifier.
        PRODUCT_ID OFFSET(20) NUMBITS(12) []
    ],
    /// SMMU_AIDR: architecture revision.
    pub AIDR [
        /// Minor revision: SMMUv3.<minor>.
        ARCH_MINOR_REV OFFSET(0) NUMBITS(4) [],
        /// Major revision: 0 means SMMUv3.
        ARCH_MAJOR_REV OFFSET(4) NUMBITS(4) []
    ],
    /// SMMU_CR0 (and SMMU_CR0ACK): global enables.
    pub CR0 [
        /// Enable translation.
        SMMUEN OFFSET(0) NUMBITS(1) [],
        /// Enable the PRI queue.
        PRIQEN OFFSET(1) NUMBITS(1) [],
        /// Enable the event queue.
        EVENTQEN OFFSET(2) NUMBITS(1) [],
        /// Enable the command queue.
        CMDQEN OFFSET(3) NUMBITS(1) [],
        /// Enable ATS checking.
        ATSCHK OFFSET(4) NUMBITS(1) [],
        /// VMID wildcard.
        VMW OFFSET(6) NUMBITS(3) []
    ],
    /// SMMU_CR1: attributes of the SMMU's own accesses to tables and queues.
    pub CR1 [
        /// Queue access inner cacheability.
        QUEUE_IC OFFSET(0) NUMBITS(2) [NonCacheable = 0, WriteBackAllocate = 1, WriteThrough = 2, WriteBack = 3],
        /// Queue access outer cacheability.
        QUEUE_OC OFFSET(2) NUMBITS(2) [NonCacheable = 0, WriteBackAllocate = 1, WriteThrough = 2, WriteBack = 3],
        /// Queue access shareability.
        QUEUE_SH OFFSET(4) NUMBITS(2) [NonShareable = 0, Outer = 2, Inner = 3],
        /// Table access inner cacheability.
        TABLE_IC OFFSET(6) NUMBITS(2) [NonCacheable = 0, WriteBackAllocate = 1, WriteThrough = 2, WriteBack = 3],
        /// Table access outer cacheability.
        TABLE_OC OFFSET(8) NUMBITS(2) [NonCacheable = 0, WriteBackAllocate = 1, WriteThrough = 2, WriteBack = 3],
        /// Table access shareability.
        TABLE_SH OFFSET(10) NUMBITS(2) [NonShareable = 0, Outer = 2, Inner = 3]
    ],
    /// SMMU_CR2: further controls.
    pub CR2 [
        /// Enable E2H for EL2 StreamWorld.
        E2H OFFSET(0) NUMBITS(1) [],
        /// Record C_BAD_STREAMID for invalid input streams.
        RECINVSID OFFSET(1) NUMBITS(1) [],
        /// Private TLB maintenance: ignore broadcast TLBI.
        PTM OFFSET(2) NUMBITS(1) []
    ],
    /// SMMU_STATUSR.
    pub STATUSR [
        /// The SMMU is dormant.
        DORMANT OFFSET(0) NUMBITS(1) []
    ],
    /// SMMU_GBPA: global bypass attributes, used while SMMUEN = 0.
    pub GBPA [
        /// Memory attribute.
        MEMATTR OFFSET(0) NUMBITS(4) [],
        /// Override MemAttr.
        MTCFG OFFSET(4) NUMBITS(1) [],
        /// Allocation hints.
        ALLOCCFG OFFSET(8) NUMBITS(4) [],
        /// Shareability.
        SHCFG OFFSET(12) NUMBITS(2) [NonShareable = 0, UseIncoming = 1, Outer = 2, Inner = 3],
        /// Privileged / instruction attribute.
        PRIVCFG OFFSET(16) NUMBITS(2) [],
        /// Instruction / data attribute.
        INSTCFG OFFSET(18) NUMBITS(2) [],
        /// Abort all incoming transactions while SMMUEN = 0.
        ABORT OFFSET(20) NUMBITS(1) [],
        /// Update in progress: software sets it with a change; the SMMU clears it when done.
        UPDATE OFFSET(31) NUMBITS(1) []
    ],
    /// SMMU_IRQ_CTRL (and SMMU_IRQ_CTRLACK): interrupt enables.
    pub IRQ_CTRL [
        /// GERROR interrupt enable.
        GERROR_IRQEN OFFSET(0) NUMBITS(1) [],
        /// PRI queue interrupt enable.
        PRIQ_IRQEN OFFSET(1) NUMBITS(1) [],
        /// Event queue interrupt enable.
        EVENTQ_IRQEN OFFSET(2) NUMBITS(1) []
    ],
    /// SMMU_GERROR (and SMMU_GERRORN): global errors, active when the two differ.
    pub GERROR [
        /// Command queue error (see CMDQ_CONS.ERR).
        CMDQ_ERR OFFSET(0) NUMBITS(1) [],
        /// Event queue write aborted.
        EVENTQ_ABT_ERR OFFSET(2) NUMBITS(1) [],
        /// PRI queue write aborted.
        PRIQ_ABT_ERR OFFSET(3) NUMBITS(1) [],
        /// CMD_SYNC MSI write aborted.
        MSI_CMDQ_ABT_ERR OFFSET(4) NUMBITS(1) [],
        /// Event queue MSI write aborted.
        MSI_EVENTQ_ABT_ERR OFFSET(5) NUMBITS(1) [],
        /// PRI queue MSI write aborted.
        MSI_PRIQ_ABT_ERR OFFSET(6) NUMBITS(1) [],
        /// GERROR MSI write aborted.
        MSI_GERROR_ABT_ERR OFFSET(7) NUMBITS(1) [],
        /// Service failure mode: the SMMU has stopped serving.
        SFM_ERR OFFSET(8) NUMBITS(1) [],
        /// Command queue control page error.
        CMDQP_ERR OFFSET(9) NUMBITS(1) [],
        /// DPT lookup error.
        DPT_ERR OFFSET(10) NUMBITS(1) []
    ],
    /// SMMU_STRTAB_BASE_CFG: stream table format.
    pub STRTAB_BASE_CFG [
        /// log2 of the number of STEs the table covers.
        LOG2SIZE OFFSET(0) NUMBITS(6) [],
        /// Split point of a 2-level table: StreamID bits resolved by level 2.
        SPLIT OFFSET(6) NUMBITS(5) [],
        /// Format.
        FMT OFFSET(16) NUMBITS(2) [Linear = 0, TwoLevel = 1]
    ],
    /// SMMU_CMDQ_PROD / SMMU_EVENTQ_PROD / SMMU_PRIQ_PROD and their CONS: queue indices.
    pub QUEUE_INDEX [
        /// Index and wrap bit (the index width is the queue's log2 size; the bit above it is the wrap bit).
        WR_RD OFFSET(0) NUMBITS(20) [],
        /// CMDQ_CONS only: error code of the command at CONS.
        ERR OFFSET(24) NUMBITS(7) [None = 0, Illegal = 1, Abort = 2, AtcInvalidationSync = 3],
        /// EVENTQ_PROD / PRIQ_PROD: overflow flag; EVENTQ_CONS / PRIQ_CONS: overflow acknowledge.
        OVFLG OFFSET(31) NUMBITS(1) []
    ]
];

register_bitfields! [u64,
    /// SMMU_STRTAB_BASE (IHI 0070 6.3.23): the stream table's base. Bit 63 is RES0.
    pub STRTAB_BASE [
        /// Physical address bits [51:6] (the table is at least 64-byte aligned).
        ADDR OFFSET(6) NUMBITS(46) [],
        /// Read-allocate hint for the SMMU's table fetches.
        RA OFFSET(62) NUMBITS(1) []
    ],
    /// SMMU_CMDQ_BASE (IHI 0070 6.3.25): the command queue's base, which the SMMU only reads. Bit 63 is RES0.
    pub CMDQ_BASE [
        /// log2 of the number of entries.
        LOG2SIZE OFFSET(0) NUMBITS(5) [],
        /// Physical address bits [51:5].
        ADDR OFFSET(5) NUMBITS(47) [],
        /// Read-allocate hint.
        RA OFFSET(62) NUMBITS(1) []
    ],
    /// SMMU_EVENTQ_BASE and SMMU_PRIQ_BASE (IHI 0070 6.3.28, 6.3.32): queues the SMMU writes. Bit 63 is RES0.
    pub WRITTEN_QUEUE_BASE [
        /// log2 of the number of entries.
        LOG2SIZE OFFSET(0) NUMBITS(5) [],
        /// Physical address bits [51:5].
        ADDR OFFSET(5) NUMBITS(47) [],
        /// Write-allocate hint.
        WA OFFSET(62) NUMBITS(1) []
    ],
    /// SMMU_*_IRQ_CFG0: MSI target address.
    pub IRQ_CFG0 [
        /// MSI address bits [51:2].
        ADDR OFFSET(2) NUMBITS(50) []
    ]
];

register_structs! {
    /// Page 0 of the SMMU's non-secure register space (base + 0).
    pub SmmuPage0 {
        (0x00 => pub idr0: ReadOnly<u32, IDR0::Register>),
        (0x04 => pub idr1: ReadOnly<u32, IDR1::Register>),
        (0x08 => pub idr2: ReadOnly<u32>),
        (0x0c => pub idr3: ReadOnly<u32, IDR3::Register>),
        (0x10 => pub idr4: ReadOnly<u32>),
        (0x14 => pub idr5: ReadOnly<u32, IDR5::Register>),
        (0x18 => pub iidr: ReadOnly<u32, IIDR::Register>),
        (0x1c => pub aidr: ReadOnly<u32, AIDR::Register>),
        (0x20 => pub cr0: ReadWrite<u32, CR0::Register>),
        (0x24 => pub cr0ack: ReadOnly<u32, CR0::Register>),
        (0x28 => pub cr1: ReadWrite<u32, CR1::Register>),
        (0x2c => pub cr2: ReadWrite<u32, CR2::Register>),
        (0x30 => _reserved0),
        (0x40 => pub statusr: ReadOnly<u32, STATUSR::Register>),
        (0x44 => pub gbpa: ReadWrite<u32, GBPA::Register>),
        (0x48 => pub agbpa: ReadWrite<u32>),
        (0x4c => _reserved1),
        (0x50 => pub irq_ctrl: ReadWrite<u32, IRQ_CTRL::Register>),
        (0x54 => pub irq_ctrlack: ReadOnly<u32, IRQ_CTRL::Register>),
        (0x58 => _reserved2),
        (0x60 => pub gerror: ReadOnly<u32, GERROR::Register>),
        (0x64 => pub gerrorn: ReadWrite<u32, GERROR::Register>),
        (0x68 => pub gerror_irq_cfg0: ReadWrite<u64, IRQ_CFG0::Register>),
        (0x70 => pub gerror_irq_cfg1: ReadWrite<u32>),
        (0x74 => pub gerror_irq_cfg2: ReadWrite<u32>),
        (0x78 => _reserved3),
        (0x80 => pub strtab_base: ReadWrite<u64, STRTAB_BASE::Register>),
        (0x88 => pub strtab_base_cfg: ReadWrite<u32, STRTAB_BASE_CFG::Register>),
        (0x8c => _reserved4),
        (0x90 => pub cmdq_base: ReadWrite<u64, CMDQ_BASE::Register>),
        (0x98 => pub cmdq_prod: ReadWrite<u32, QUEUE_INDEX::Register>),
        (0x9c => pub cmdq_cons: ReadWrite<u32, QUEUE_INDEX::Register>),
        (0xa0 => pub eventq_base: ReadWrite<u64, WRITTEN_QUEUE_BASE::Register>),
        (0xa8 => _eventq_prod_alias),
        (0xb0 => pub eventq_irq_cfg0: ReadWrite<u64, IRQ_CFG0::Register>),
        (0xb8 => pub eventq_irq_cfg1: ReadWrite<u32>),
        (0xbc => pub eventq_irq_cfg2: ReadWrite<u32>),
        (0xc0 => pub priq_base: ReadWrite<u64, WRITTEN_QUEUE_BASE::Register>),
        (0xc8 => _priq_prod_alias),
        (0xd0 => pub priq_irq_cfg0: ReadWrite<u64, IRQ_CFG0::Register>),
        (0xd8 => pub priq_irq_cfg1: ReadWrite<u32>),
        (0xdc => pub priq_irq_cfg2: ReadWrite<u32>),
        (0xe0 => @END),
    }
}

register_structs! {
    /// The queue indices the SMMU writes, in page 1 (base + 64 KiB), starting at offset 0xA8 of that page.
    pub SmmuPage1Queues {
        (0x00 => pub eventq_prod: ReadWrite<u32, QUEUE_INDEX::Register>),
        (0x04 => pub eventq_cons: ReadWrite<u32, QUEUE_INDEX::Register>),
        (0x08 => _reserved0),
        (0x20 => pub priq_prod: ReadWrite<u32, QUEUE_INDEX::Register>),
        (0x24 => pub priq_cons: ReadWrite<u32, QUEUE_INDEX::Register>),
        (0x28 => @END),
    }
}

/// Offset of page 1 from the SMMU's base.
pub const PAGE1_OFFSET: usize = 0x1_0000;
/// Offset of [`SmmuPage1Queues`] from the SMMU's base (page 1 + 0xA8).
pub const PAGE1_QUEUES_OFFSET: usize = PAGE1_OFFSET + 0xa8;
/// Size of the register space the driver uses: pages 0 and 1.
pub const REGISTER_SPACE_SIZE: usize = 2 * PAGE1_OFFSET;

/// The SMMU_STRTAB_BASE value for a stream table at `phys` (64-byte aligned), with read-allocate.
pub fn strtab_base(phys: u64) -> u64 {
    (STRTAB_BASE::RA::SET + STRTAB_BASE::ADDR.val(phys >> 6)).value
}

/// The SMMU_CMDQ_BASE value for a command queue of `2^log2_entries` entries at `phys` (32-byte aligned at
/// least), with read-allocate.
pub fn cmdq_base(phys: u64, log2_entries: u8) -> u64 {
    (CMDQ_BASE::RA::SET + CMDQ_BASE::ADDR.val(phys >> 5) + CMDQ_BASE::LOG2SIZE.val(u64::from(log2_entries))).value
}

/// The SMMU_EVENTQ_BASE (or SMMU_PRIQ_BASE) value for a queue of `2^log2_entries` entries at `phys`, with
/// write-allocate (bit 62; bit 63 is RES0).
pub fn written_queue_base(phys: u64, log2_entries: u8) -> u64 {
    (WRITTEN_QUEUE_BASE::WA::SET
        + WRITTEN_QUEUE_BASE::ADDR.val(phys >> 5)
        + WRITTEN_QUEUE_BASE::LOG2SIZE.val(u64::from(log2_entries)))
    .value
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn page0_offsets_match_the_architecture() {
        assert_eq!(offset_of!(SmmuPage0, idr0), 0x00);
        assert_eq!(offset_of!(SmmuPage0, idr5), 0x14);
        assert_eq!(offset_of!(SmmuPage0, iidr), 0x18);
        assert_eq!(offset_of!(SmmuPage0, aidr), 0x1c);
        assert_eq!(offset_of!(SmmuPage0, cr0), 0x20);
        assert_eq!(offset_of!(SmmuPage0, cr0ack), 0x24);
        assert_eq!(offset_of!(SmmuPage0, cr1), 0x28);
        assert_eq!(offset_of!(SmmuPage0, cr2), 0x2c);
        assert_eq!(offset_of!(SmmuPage0, statusr), 0x40);
        assert_eq!(offset_of!(SmmuPage0, gbpa), 0x44);
        assert_eq!(offset_of!(SmmuPage0, irq_ctrl), 0x50);
        assert_eq!(offset_of!(SmmuPage0, irq_ctrlack), 0x54);
        assert_eq!(offset_of!(SmmuPage0, gerror), 0x60);
        assert_eq!(offset_of!(SmmuPage0, gerrorn), 0x64);
        assert_eq!(offset_of!(SmmuPage0, gerror_irq_cfg0), 0x68);
        assert_eq!(offset_of!(SmmuPage0, gerror_irq_cfg2), 0x74);
        assert_eq!(offset_of!(SmmuPage0, strtab_base), 0x80);
        assert_eq!(offset_of!(SmmuPage0, strtab_base_cfg), 0x88);
        assert_eq!(offset_of!(SmmuPage0, cmdq_base), 0x90);
        assert_eq!(offset_of!(SmmuPage0, cmdq_prod), 0x98);
        assert_eq!(offset_of!(SmmuPage0, cmdq_cons), 0x9c);
        assert_eq!(offset_of!(SmmuPage0, eventq_base), 0xa0);
        assert_eq!(offset_of!(SmmuPage0, eventq_irq_cfg0), 0xb0);
        assert_eq!(offset_of!(SmmuPage0, eventq_irq_cfg2), 0xbc);
        assert_eq!(offset_of!(SmmuPage0, priq_base), 0xc0);
        assert_eq!(offset_of!(SmmuPage0, priq_irq_cfg0), 0xd0);
        assert_eq!(offset_of!(SmmuPage0, priq_irq_cfg2), 0xdc);
    }

    #[test]
    fn base_registers_match_the_architecture() {
        // IHI 0070 6.3.23/25/28: RA or WA at bit 62, bit 63 RES0; ADDR [51:6] for the stream table, [51:5]
        // for queues; LOG2SIZE [4:0]. Expected values written from the field tables, not from the encoder.
        assert_eq!(strtab_base(0x4029_e000), 0x4000_0000_4029_e000);
        assert_eq!(
            strtab_base(0xf_ffff_ffff_ffc0),
            0x400f_ffff_ffff_ffc0,
            "ADDR reaches bit 51"
        );
        assert_eq!(strtab_base(0x4029_e020) & 0x3f, 0, "bits [5:0] are not address bits");
        assert_eq!(cmdq_base(0x402c_0000, 8), 0x4000_0000_402c_0008);
        assert_eq!(cmdq_base(0xf_ffff_ffff_ffe0, 19), 0x400f_ffff_ffff_fff3);
        assert_eq!(
            written_queue_base(0x402c_2000, 8),
            0x4000_0000_402c_2008,
            "WA is bit 62"
        );
        assert_eq!(written_queue_base(0x1_0000_0000, 19) >> 63, 0, "bit 63 is RES0");
        assert_eq!(written_queue_base(0x1_0000_0000, 19), 0x4000_0001_0000_0013);
    }

    #[test]
    fn page1_offsets_match_the_architecture() {
        // EVENTQ_PROD is at page 1 + 0xA8, EVENTQ_CONS + 0xAC, PRIQ_PROD + 0xC8, PRIQ_CONS + 0xCC.
        assert_eq!(PAGE1_QUEUES_OFFSET + offset_of!(SmmuPage1Queues, eventq_prod), 0x100a8);
        assert_eq!(PAGE1_QUEUES_OFFSET + offset_of!(SmmuPage1Queues, eventq_cons), 0x100ac);
        assert_eq!(PAGE1_QUEUES_OFFSET + offset_of!(SmmuPage1Queues, priq_prod), 0x100c8);
        assert_eq!(PAGE1_QUEUES_OFFSET + offset_of!(SmmuPage1Queues, priq_cons), 0x100cc);
    }
}
