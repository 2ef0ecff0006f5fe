//! SMMU commands (Arm IHI 0070, chapter 4 "Commands"): one typed [`Command`], one [`Command::encode`].
//!
//! A command is 16 bytes, two little-endian 64-bit words, with its opcode in bits `[7:0]` of word 0. Field positions
//! below are named by the word they live in (`CMD0_*` in word 0, i.e. bits `[63:0]` of the command; `CMD1_*` in
//! word 1, i.e. bits `[127:64]`). [`Command::encode`] checks every field against its width and the rules of the
//! command's description, and returns a [`CommandError`] rather than a truncated or ILLEGAL encoding.
//!
//! Range invalidation (SMMU_IDR3.RIL == 1, section 4.4.1.1) is described by a [`TlbiRange`];
//! [`plan_range_invalidation`] splits an address range into a handful of such commands.

use core::fmt;
use core::iter::FusedIterator;

/// Command opcodes (section 4.1.1, "Command opcodes").
pub mod opcode {
    /// CMD_PREFETCH_CONFIG.
    pub const PREFETCH_CONFIG: u8 = 0x01;
    /// CMD_PREFETCH_ADDR.
    pub const PREFETCH_ADDR: u8 = 0x02;
    /// CMD_CFGI_STE.
    pub const CFGI_STE: u8 = 0x03;
    /// CMD_CFGI_STE_RANGE; CMD_CFGI_ALL is this opcode with Range == 31.
    pub const CFGI_STE_RANGE: u8 = 0x04;
    /// CMD_CFGI_ALL: the same opcode as CMD_CFGI_STE_RANGE.
    pub const CFGI_ALL: u8 = CFGI_STE_RANGE;
    /// CMD_CFGI_CD.
    pub const CFGI_CD: u8 = 0x05;
    /// CMD_CFGI_CD_ALL.
    pub const CFGI_CD_ALL: u8 = 0x06;
    /// CMD_CFGI_VMS_PIDM.
    pub const CFGI_VMS_PIDM: u8 = 0x07;
    /// CMD_TLBI_NH_ALL.
    pub const TLBI_NH_ALL: u8 = 0x10;
    /// CMD_TLBI_NH_ASID.
    pub const TLBI_NH_ASID: u8 = 0x11;
    /// CMD_TLBI_NH_VA.
    pub const TLBI_NH_VA: u8 = 0x12;
    /// CMD_TLBI_NH_VAA.
    pub const TLBI_NH_VAA: u8 = 0x13;
    /// CMD_TLBI_EL3_ALL (Secure Command queue only).
    pub const TLBI_EL3_ALL: u8 = 0x18;
    /// CMD_TLBI_EL3_VA (Secure Command queue only).
    pub const TLBI_EL3_VA: u8 = 0x1a;
    /// CMD_TLBI_EL2_ALL.
    pub const TLBI_EL2_ALL: u8 = 0x20;
    /// CMD_TLBI_EL2_ASID.
    pub const TLBI_EL2_ASID: u8 = 0x21;
    /// CMD_TLBI_EL2_VA.
    pub const TLBI_EL2_VA: u8 = 0x22;
    /// CMD_TLBI_EL2_VAA.
    pub const TLBI_EL2_VAA: u8 = 0x23;
    /// CMD_TLBI_S12_VMALL.
    pub const TLBI_S12_VMALL: u8 = 0x28;
    /// CMD_TLBI_S2_IPA.
    pub const TLBI_S2_IPA: u8 = 0x2a;
    /// CMD_TLBI_NSNH_ALL.
    pub const TLBI_NSNH_ALL: u8 = 0x30;
    /// CMD_ATC_INV.
    pub const ATC_INV: u8 = 0x40;
    /// CMD_PRI_RESP.
    pub const PRI_RESP: u8 = 0x41;
    /// CMD_RESUME (resumes or terminates one stalled transaction).
    pub const RESUME: u8 = 0x44;
    /// CMD_STALL_TERM.
    pub const STALL_TERM: u8 = 0x45;
    /// CMD_SYNC.
    pub const SYNC: u8 = 0x46;
    /// CMD_TLBI_S_EL2_ALL (Secure Command queue only).
    pub const TLBI_S_EL2_ALL: u8 = 0x50;
    /// CMD_TLBI_S_EL2_ASID (Secure Command queue only).
    pub const TLBI_S_EL2_ASID: u8 = 0x51;
    /// CMD_TLBI_S_EL2_VA (Secure Command queue only).
    pub const TLBI_S_EL2_VA: u8 = 0x52;
    /// CMD_TLBI_S_EL2_VAA (Secure Command queue only).
    pub const TLBI_S_EL2_VAA: u8 = 0x53;
    /// CMD_TLBI_S_S12_VMALL (Secure Command queue only).
    pub const TLBI_S_S12_VMALL: u8 = 0x58;
    /// CMD_TLBI_S_S2_IPA (Secure Command queue only).
    pub const TLBI_S_S2_IPA: u8 = 0x5a;
    /// CMD_TLBI_SNH_ALL (Secure Command queue only).
    pub const TLBI_SNH_ALL: u8 = 0x60;
    /// CMD_DPTI_ALL.
    pub const DPTI_ALL: u8 = 0x70;
    /// CMD_DPTI_PA.
    pub const DPTI_PA: u8 = 0x73;
}

/// The architectural name of a command opcode (for example `"CMD_SYNC"`), for reporting a command read back from
/// the queue, such as the one at CMDQ_CONS after a command queue error.
///
/// Returns `None` for reserved opcodes and for the IMPLEMENTATION DEFINED range 0x80..=0x8F. Opcode 0x04 is
/// reported as `"CMD_CFGI_STE_RANGE"` (CMD_CFGI_ALL is the same opcode with Range == 31).
pub const fn opcode_name(opcode: u8) -> Option<&'static str> {
    Some(match opcode {
        opcode::PREFETCH_CONFIG => "CMD_PREFETCH_CONFIG",
        opcode::PREFETCH_ADDR => "CMD_PREFETCH_ADDR",
        opcode::CFGI_STE => "CMD_CFGI_STE",
        opcode::CFGI_STE_RANGE => "CMD_CFGI_STE_RANGE",
        opcode::CFGI_CD => "CMD_CFGI_CD",
        opcode::CFGI_CD_ALL => "CMD_CFGI_CD_ALL",
        opcode::CFGI_VMS_PIDM => "CMD_CFGI_VMS_PIDM",
        opcode::TLBI_NH_ALL => "CMD_TLBI_NH_ALL",
        opcode::TLBI_NH_ASID => "CMD_TLBI_NH_ASID",
        opcode::TLBI_NH_VA => "CMD_TLBI_NH_VA",
        opcode::TLBI_NH_VAA => "CMD_TLBI_NH_VAA",
        opcode::TLBI_EL3_ALL => "CMD_TLBI_EL3_ALL",
        opcode::TLBI_EL3_VA => "CMD_TLBI_EL3_VA",
        opcode::TLBI_EL2_ALL => "CMD_TLBI_EL2_ALL",
        opcode::TLBI_EL2_ASID => "CMD_TLBI_EL2_ASID",
        opcode::TLBI_EL2_VA => "CMD_TLBI_EL2_VA",
        opcode::TLBI_EL2_VAA => "CMD_TLBI_EL2_VAA",
        opcode::TLBI_S12_VMALL => "CMD_TLBI_S12_VMALL",
        opcode::TLBI_S2_IPA => "CMD_TLBI_S2_IPA",
        opcode::TLBI_NSNH_ALL => "CMD_TLBI_NSNH_ALL",
        opcode::ATC_INV => "CMD_ATC_INV",
        opcode::PRI_RESP => "CMD_PRI_RESP",
        opcode::RESUME => "CMD_RESUME",
        opcode::STALL_TERM => "CMD_STALL_TERM",
        opcode::SYNC => "CMD_SYNC",
        opcode::TLBI_S_EL2_ALL => "CMD_TLBI_S_EL2_ALL",
        opcode::TLBI_S_EL2_ASID => "CMD_TLBI_S_EL2_ASID",
        opcode::TLBI_S_EL2_VA => "CMD_TLBI_S_EL2_VA",
        opcode::TLBI_S_EL2_VAA => "CMD_TLBI_S_EL2_VAA",
        opcode::TLBI_S_S12_VMALL => "CMD_TLBI_S_S12_VMALL",
        opcode::TLBI_S_S2_IPA => "CMD_TLBI_S_S2_IPA",
        opcode::TLBI_SNH_ALL => "CMD_TLBI_SNH_ALL",
        opcode::DPTI_ALL => "CMD_DPTI_ALL",
        opcode::DPTI_PA => "CMD_DPTI_PA",
        _ => return None,
    })
}

/// The opcode of an encoded command (bits `[7:0]` of word 0), for example one read back from the queue.
pub const fn opcode_of(words: &[u64; 2]) -> u8 {
    (words[0] & CMD0_OP) as u8
}

/// Why [`vet`] refuses a command that code outside the driver wants queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Unvetted {
    /// A CMD_SYNC whose completion is an MSI (CS = SIG_IRQ, MSIAddress != 0): a 32-bit write the SMMU itself makes
    /// to any physical address (on an SMMU with SMMU_IDR0.MSI).
    MsiWrite {
        /// The MSI's physical address.
        address: u64,
    },
    /// A CMD_SYNC with the reserved completion CS = 0b11.
    ReservedCompletion,
    /// An opcode [`Command`] does not model (ATS, PRI, stall, Secure-only and reserved opcodes, CMD_PREFETCH_ADDR):
    /// what it makes the SMMU do is not known to be only an invalidation, a prefetch or a synchronisation.
    Unmodelled {
        /// The opcode.
        opcode: u8,
    },
}

impl fmt::Display for Unvetted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unvetted::MsiWrite { address } => {
                write!(f, "a CMD_SYNC whose MSI writes physical address {address:#x}")
            }
            Unvetted::ReservedCompletion => f.write_str("a CMD_SYNC with the reserved completion CS = 0b11"),
            Unvetted::Unmodelled { opcode } => match opcode_name(*opcode) {
                Some(name) => write!(f, "{name} ({opcode:#04x}), which the driver does not model"),
                None => write!(f, "opcode {opcode:#04x}, reserved"),
            },
        }
    }
}

/// Whether the encoded command `words` can only invalidate cached configuration or translations, prefetch
/// configuration, or synchronise: a command of an opcode [`Command`] models, and for CMD_SYNC a completion that
/// writes no memory (SIG_NONE, SIG_SEV, or SIG_IRQ without an MSI address). Its other fields are not judged: such
/// a command invalidates, prefetches or synchronises whatever they say, or the SMMU refuses it (CERROR_ILL).
///
/// # Errors
/// The [`Unvetted`] reason for any other command.
pub const fn vet(words: &[u64; 2]) -> Result<(), Unvetted> {
    match opcode_of(words) {
        opcode::PREFETCH_CONFIG
        | opcode::CFGI_STE
        | opcode::CFGI_STE_RANGE
        | opcode::CFGI_CD
        | opcode::CFGI_CD_ALL
        | opcode::TLBI_NH_ALL
        | opcode::TLBI_NH_ASID
        | opcode::TLBI_NH_VA
        | opcode::TLBI_NH_VAA
        | opcode::TLBI_EL2_ALL
        | opcode::TLBI_EL2_ASID
        | opcode::TLBI_EL2_VA
        | opcode::TLBI_EL2_VAA
        | opcode::TLBI_S12_VMALL
        | opcode::TLBI_S2_IPA
        | opcode::TLBI_NSNH_ALL => Ok(()),
        opcode::SYNC => match (words[0] & CMD0_SYNC_CS) >> 12 {
            0b01 if words[1] & CMD1_SYNC_MSIADDR != 0 => Err(Unvetted::MsiWrite {
                address: words[1] & CMD1_SYNC_MSIADDR,
            }),
            0b11 => Err(Unvetted::ReservedCompletion),
            _ => Ok(()),
        },
        opcode => Err(Unvetted::Unmodelled { opcode }),
    }
}

// Word 0 (command bits [63:0]).
/// Opcode, `[7:0]`.
const CMD0_OP: u64 = 0xff;
/// Substream valid, [11] (CMD_PREFETCH_*, CMD_ATC_INV, CMD_PRI_RESP).
const CMD0_SSV: u64 = 1 << 11;
/// SubstreamID, `[31:12]`.
const CMD0_SSID: u64 = 0xf_ffff << 12;
/// StreamID, `[63:32]`.
const CMD0_SID: u64 = 0xffff_ffff << 32;
/// Range-invalidation multiplier NUM, `[16:12]`.
const CMD0_TLBI_NUM: u64 = 0x1f << 12;
/// Range-invalidation scale SCALE, `[24:20]` (bit 25 is used only when SMMU_IDR5.DS == 1).
const CMD0_TLBI_SCALE: u64 = 0x1f << 20;
/// VMID, `[47:32]`.
const CMD0_TLBI_VMID: u64 = 0xffff << 32;
/// ASID, `[63:48]`.
const CMD0_TLBI_ASID: u64 = 0xffff << 48;
/// CMD_SYNC completion signal CS, `[13:12]`.
const CMD0_SYNC_CS: u64 = 0b11 << 12;
/// CMD_SYNC MSI shareability MSH, `[23:22]`.
const CMD0_SYNC_MSH: u64 = 0b11 << 22;
/// CMD_SYNC MSI memory attributes MSIAttr, `[27:24]`.
const CMD0_SYNC_MSIATTR: u64 = 0xf << 24;
/// CMD_SYNC MSI payload MSIData, `[63:32]`.
const CMD0_SYNC_MSIDATA: u64 = 0xffff_ffff << 32;

// Word 1 (command bits [127:64]).
/// Leaf, [64] (CMD_CFGI_STE, CMD_CFGI_CD, CMD_TLBI_*).
const CMD1_LEAF: u64 = 1;
/// CMD_CFGI_STE_RANGE Range, `[68:64]`.
const CMD1_CFGI_RANGE: u64 = 0x1f;
/// Range-invalidation level hint TTL, `[73:72]`.
const CMD1_TLBI_TTL: u64 = 0b11 << 8;
/// Range-invalidation translation granule TG, `[75:74]`.
const CMD1_TLBI_TG: u64 = 0b11 << 10;
/// Virtual address, `[127:76]` = VA`[63:12]`.
const CMD1_TLBI_VA: u64 = !0xfff;
/// IPA, `[119:76]` = IPA`[55:12]` (bits `[55:52]` are RES0 in SMMUv3.1 to 3.3, `[55:48]` in SMMUv3.0).
const CMD1_TLBI_IPA: u64 = ((1 << 56) - 1) & !0xfff;
/// CMD_SYNC MSI address, `[119:66]` = MSIAddress`[55:2]`.
const CMD1_SYNC_MSIADDR: u64 = ((1 << 56) - 1) & !0b11;

/// Width of an IPA or physical address field (section 4.1.6: Address`[55:12]`, MSIAddress`[55:2]`).
pub const PHYSICAL_ADDRESS_BITS: u8 = 56;

/// Largest SubstreamID a command field can hold: 20 bits.
pub const MAX_SUBSTREAM_ID: u32 = (1 << 20) - 1;

/// Largest CMD_CFGI_STE_RANGE Range (invalidates 2^32 StreamIDs, i.e. CMD_CFGI_ALL).
pub const MAX_STE_RANGE: u8 = 31;

/// Largest range-invalidation NUM (5 bits).
pub const MAX_TLBI_NUM: u8 = 31;

/// Largest range-invalidation SCALE when SMMU_IDR5.DS == 0 (5 bits; the 6-bit form of DS == 1 is not used).
pub const MAX_TLBI_SCALE: u8 = 31;

/// Places `value` into the field `mask` (the FIELD_PREP of the spec's tables). Callers check the width first.
const fn field(mask: u64, value: u64) -> u64 {
    (value << mask.trailing_zeros()) & mask
}

/// A translation granule: of a page table (CD.TG0 and STE.S2TG encode it with [`Granule::tg_field`]) and of the
/// TLB entries a range invalidation targets (its TG field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Granule {
    /// 4 KiB granule, TG = 0b01.
    Size4K,
    /// 16 KiB granule, TG = 0b10.
    Size16K,
    /// 64 KiB granule, TG = 0b11.
    Size64K,
}

impl Granule {
    /// log2 of the granule size in bytes: 12, 14 or 16.
    pub const fn log2(self) -> u8 {
        match self {
            Granule::Size4K => 12,
            Granule::Size16K => 14,
            Granule::Size64K => 16,
        }
    }

    /// The granule size in bytes.
    pub const fn size(self) -> u64 {
        1 << self.log2()
    }

    /// The encoding of a translation-table granule field, CD.TG0 and STE.S2TG alike (4 KiB 0b00, 64 KiB 0b01,
    /// 16 KiB 0b10): not the TG of a range invalidation, which [`Command`] encodes itself.
    pub const fn tg_field(self) -> u64 {
        match self {
            Granule::Size4K => 0b00,
            Granule::Size64K => 0b01,
            Granule::Size16K => 0b10,
        }
    }

    /// The granule of `log2` bytes; `None` unless `log2` is 12, 14 or 16.
    pub const fn from_log2(log2: u8) -> Option<Self> {
        match log2 {
            12 => Some(Granule::Size4K),
            14 => Some(Granule::Size16K),
            16 => Some(Granule::Size64K),
            _ => None,
        }
    }

    /// The TG field encoding.
    const fn tg(self) -> u64 {
        match self {
            Granule::Size4K => 0b01,
            Granule::Size16K => 0b10,
            Granule::Size64K => 0b11,
        }
    }

    /// Alignment (log2 bytes) the start address needs for a level hint `ttl` (0 = no hint) so that the range is
    /// predictable (section 4.4.1.1): the size of a leaf entry at that level, or one granule when there is no hint.
    /// `None` for a TTL that is out of range or reserved for this granule.
    const fn ttl_alignment_log2(self, ttl: u8) -> Option<u8> {
        match (self, ttl) {
            (_, 0) | (_, 3) => Some(self.log2()),
            (Granule::Size4K, 1) => Some(30),
            (Granule::Size4K, 2) => Some(21),
            // Level 1 with a 16 KiB granule exists only with SMMU_IDR5.DS == 1 (52-bit); otherwise reserved.
            (Granule::Size16K, 1) => None,
            (Granule::Size16K, 2) => Some(25),
            (Granule::Size64K, 1) => Some(42),
            (Granule::Size64K, 2) => Some(29),
            _ => None,
        }
    }
}

impl fmt::Display for Granule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Granule::Size4K => f.write_str("4K"),
            Granule::Size16K => f.write_str("16K"),
            Granule::Size64K => f.write_str("64K"),
        }
    }
}

/// The range-invalidation fields of an address-based TLBI command (section 4.4.1.1, SMMU_IDR3.RIL == 1): the
/// command invalidates `(num + 1) * 2^scale` granules starting at the command's address, and `ttl` hints at the
/// level of the leaf entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TlbiRange {
    /// NUM, 0..=31.
    pub num: u8,
    /// SCALE, 0..=31.
    pub scale: u8,
    /// TG: the granule of the entries to invalidate.
    pub granule: Granule,
    /// TTL: 0 = leaf entries at any level, 1..=3 = leaf entries at that level only.
    /// Level 1 is reserved with a 16 KiB granule. NUM == 0, SCALE == 0, TTL == 0 is a reserved combination.
    pub ttl: u8,
}

impl TlbiRange {
    /// Number of granules covered, `(num + 1) * 2^scale`, or `None` when NUM or SCALE is out of range.
    pub const fn granules(&self) -> Option<u64> {
        if self.num > MAX_TLBI_NUM || self.scale > MAX_TLBI_SCALE {
            return None;
        }
        Some((self.num as u64 + 1) << self.scale)
    }

    /// Number of bytes covered, or `None` when NUM or SCALE is out of range.
    pub const fn size(&self) -> Option<u64> {
        match self.granules() {
            // At most 2^36 granules of at most 2^16 bytes: no overflow.
            Some(granules) => Some(granules << self.granule.log2()),
            None => None,
        }
    }

    /// Checks every field: the bounds of NUM, SCALE and TTL, the TTL reserved for a 16 KiB granule, and the
    /// reserved single-granule-without-hint combination.
    ///
    /// # Errors
    /// [`CommandError::RangeNumTooLarge`], [`CommandError::RangeScaleTooLarge`], [`CommandError::TtlTooLarge`],
    /// [`CommandError::ReservedTtl`] or [`CommandError::ReservedRangeEncoding`].
    pub const fn validate(&self) -> Result<(), CommandError> {
        if self.num > MAX_TLBI_NUM {
            return Err(CommandError::RangeNumTooLarge { num: self.num });
        }
        if self.scale > MAX_TLBI_SCALE {
            return Err(CommandError::RangeScaleTooLarge { scale: self.scale });
        }
        if self.ttl > 3 {
            return Err(CommandError::TtlTooLarge { ttl: self.ttl });
        }
        if self.granule.ttl_alignment_log2(self.ttl).is_none() {
            return Err(CommandError::ReservedTtl {
                granule: self.granule,
                ttl: self.ttl,
            });
        }
        if self.num == 0 && self.scale == 0 && self.ttl == 0 {
            return Err(CommandError::ReservedRangeEncoding);
        }
        Ok(())
    }

    /// Alignment in bytes that the start address needs (one granule, or the leaf-entry size of the TTL level),
    /// or `None` when TTL is out of range or reserved.
    pub const fn address_alignment(&self) -> Option<u64> {
        match self.granule.ttl_alignment_log2(self.ttl) {
            Some(log2) => Some(1 << log2),
            None => None,
        }
    }
}

/// Shareability of a CMD_SYNC completion MSI (field MSH: the same encoding as the table walks' SH fields): the
/// crate's one [`Shareability`] type.
pub use crate::hw::ste::Shareability;

/// MSH: 0b00 non-shareable, 0b10 outer, 0b11 inner shareable.
const fn msh(shareability: Shareability) -> u64 {
    shareability as u64
}

/// How a CMD_SYNC signals its completion (field CS). Whatever the choice, completion is also visible as CMDQ_CONS
/// moving past the CMD_SYNC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncCompletion {
    /// SIG_NONE (CS = 0b00): no signal.
    None,
    /// SIG_IRQ (CS = 0b01) with MSIAddress = 0: raises the wired CMD_SYNC interrupt where there is one, and writes
    /// no MSI.
    Irq,
    /// SIG_IRQ (CS = 0b01) with an MSI: on an SMMU with MSIs (SMMU_IDR0.MSI), writes `data` to `address`.
    Msi {
        /// Physical address of the 32-bit write: 4-byte aligned, non-zero, below 2^56.
        address: u64,
        /// The 32-bit value written.
        data: u32,
        /// Shareability of the write (MSH).
        shareability: Shareability,
        /// Memory attributes of the write (MSIAttr), encoded as STE.MemAttr: 0..=0xF.
        attributes: u8,
    },
    /// SIG_SEV (CS = 0b10): a WFE wake-up event, when SMMU_IDR0.SEV == 1 (otherwise no signal).
    Sev,
}

/// A command the driver sends to the SMMU, with typed fields.
///
/// Secure-only commands (SSec, TLBI_EL3_*, TLBI_S_*), stall, ATS and PRI commands are not built by this driver;
/// [`opcode_name`] still names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// CMD_PREFETCH_CONFIG: prefetch the STE (and CD) of `sid`, and of substream `ssid` when given (SSV = 1).
    PrefetchConfig {
        /// StreamID.
        sid: u32,
        /// SubstreamID, below 2^20; `None` for SSV = 0.
        ssid: Option<u32>,
    },
    /// CMD_CFGI_STE: invalidate the cached STE of `sid`, and the CDs cached through it.
    CfgiSte {
        /// StreamID.
        sid: u32,
        /// Leaf = 1: only the STE, not the level-1 descriptor of a 2-level stream table.
        leaf: bool,
    },
    /// CMD_CFGI_STE_RANGE: invalidate the 2^(range+1) STEs of the aligned block containing `sid`.
    CfgiSteRange {
        /// StreamID; its bits `[range:0]` are ignored.
        sid: u32,
        /// 0..=31; 31 invalidates every StreamID (CMD_CFGI_ALL).
        range: u8,
    },
    /// CMD_CFGI_CD: invalidate the CD at index `ssid` of the CD table of `sid`.
    CfgiCd {
        /// StreamID.
        sid: u32,
        /// SubstreamID (CD table index), below 2^20; 0 for a stream without substreams.
        ssid: u32,
        /// Leaf = 1: only the CD, not the level-1 descriptor of a 2-level CD table.
        leaf: bool,
    },
    /// CMD_CFGI_CD_ALL: invalidate every CD cached through `sid`.
    CfgiCdAll {
        /// StreamID.
        sid: u32,
    },
    /// CMD_CFGI_ALL: invalidate all configuration; encoded as CMD_CFGI_STE_RANGE with Range = 31.
    CfgiAll,
    /// CMD_TLBI_NH_ALL: invalidate all stage-1 EL1 entries of `vmid`.
    TlbiNhAll {
        /// VMID (ignored by an SMMU without stage 2; use 0 there).
        vmid: u16,
    },
    /// CMD_TLBI_NH_ASID: invalidate the non-global stage-1 EL1 entries of `asid` in `vmid`.
    TlbiNhAsid {
        /// VMID.
        vmid: u16,
        /// ASID.
        asid: u16,
    },
    /// CMD_TLBI_NH_VA: invalidate stage-1 EL1 entries by VA, for `asid` and global entries, in `vmid`.
    TlbiNhVa {
        /// VMID.
        vmid: u16,
        /// ASID.
        asid: u16,
        /// VA: 4 KiB aligned, or aligned as [`TlbiRange::address_alignment`] for a range.
        address: u64,
        /// Leaf = 1: last-level entries only.
        leaf: bool,
        /// Range invalidation (SMMU_IDR3.RIL == 1); `None` for a single address (TG = 0).
        range: Option<TlbiRange>,
    },
    /// CMD_TLBI_NH_VAA: invalidate stage-1 EL1 entries by VA for all ASIDs in `vmid`.
    TlbiNhVaa {
        /// VMID.
        vmid: u16,
        /// VA, aligned as for [`Command::TlbiNhVa`].
        address: u64,
        /// Leaf = 1: last-level entries only.
        leaf: bool,
        /// Range invalidation, or `None`.
        range: Option<TlbiRange>,
    },
    /// CMD_TLBI_EL2_ALL: invalidate all stage-1 EL2 (and EL2-E2H) entries.
    TlbiEl2All,
    /// CMD_TLBI_EL2_ASID: invalidate the non-global EL2-E2H entries of `asid`.
    TlbiEl2Asid {
        /// ASID.
        asid: u16,
    },
    /// CMD_TLBI_EL2_VA: invalidate stage-1 EL2 entries by VA (and by ASID when SMMU_CR2.E2H == 1).
    TlbiEl2Va {
        /// ASID (ignored when SMMU_CR2.E2H == 0).
        asid: u16,
        /// VA, aligned as for [`Command::TlbiNhVa`].
        address: u64,
        /// Leaf = 1: last-level entries only.
        leaf: bool,
        /// Range invalidation, or `None`.
        range: Option<TlbiRange>,
    },
    /// CMD_TLBI_EL2_VAA: invalidate stage-1 EL2 entries by VA for all ASIDs.
    TlbiEl2Vaa {
        /// VA, aligned as for [`Command::TlbiNhVa`].
        address: u64,
        /// Leaf = 1: last-level entries only.
        leaf: bool,
        /// Range invalidation, or `None`.
        range: Option<TlbiRange>,
    },
    /// CMD_TLBI_S12_VMALL: invalidate all stage-1 and stage-2 entries of `vmid`.
    TlbiS12Vmall {
        /// VMID.
        vmid: u16,
    },
    /// CMD_TLBI_S2_IPA: invalidate stage-2 entries by IPA in `vmid` (not combined stage-1+2 entries).
    TlbiS2Ipa {
        /// VMID.
        vmid: u16,
        /// IPA: below 2^56, aligned as for [`Command::TlbiNhVa`].
        address: u64,
        /// Leaf = 1: last-level entries only.
        leaf: bool,
        /// Range invalidation, or `None`.
        range: Option<TlbiRange>,
    },
    /// CMD_TLBI_NSNH_ALL: invalidate all non-secure, non-EL2 entries at every stage.
    TlbiNsnhAll,
    /// CMD_SYNC: completes every earlier command of the queue, then signals as `completion` says.
    Sync {
        /// Completion signal.
        completion: SyncCompletion,
    },
}

/// Why a command (or a range plan) could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommandError {
    /// An address has bits set below the alignment its field or its range hint requires.
    MisalignedAddress {
        /// The address given.
        address: u64,
        /// The alignment required, in bytes.
        alignment: u64,
    },
    /// A physical address or IPA does not fit its field.
    AddressTooWide {
        /// The address given.
        address: u64,
        /// Width of the field, in bits.
        bits: u8,
    },
    /// A SubstreamID is 2^20 or more.
    SubstreamIdTooLarge {
        /// The SubstreamID given.
        ssid: u32,
    },
    /// A CMD_CFGI_STE_RANGE Range is above 31.
    SteRangeTooLarge {
        /// The Range given.
        range: u8,
    },
    /// A range-invalidation NUM is above 31.
    RangeNumTooLarge {
        /// The NUM given.
        num: u8,
    },
    /// A range-invalidation SCALE is above 31.
    RangeScaleTooLarge {
        /// The SCALE given.
        scale: u8,
    },
    /// A TTL level hint is above 3.
    TtlTooLarge {
        /// The TTL given.
        ttl: u8,
    },
    /// A TTL level hint is reserved for this granule (level 1 with 16 KiB granules).
    ReservedTtl {
        /// The granule.
        granule: Granule,
        /// The TTL given.
        ttl: u8,
    },
    /// NUM == 0, SCALE == 0 and TTL == 0 with a granule: a reserved combination (CERROR_ILL). Use a non-range
    /// command (no [`TlbiRange`]) for a single granule without a level hint.
    ReservedRangeEncoding,
    /// A CMD_SYNC MSI has memory attributes above 0xF.
    MsiAttributesTooLarge {
        /// The attributes given.
        attributes: u8,
    },
    /// A CMD_SYNC MSI has address 0, which means "no MSI"; use [`SyncCompletion::Irq`] for that.
    MsiAddressZero,
    /// A range to invalidate is not a multiple of the alignment its granule and level hint require.
    MisalignedSize {
        /// The size given, in bytes.
        size: u64,
        /// The alignment required, in bytes.
        alignment: u64,
    },
    /// A range to invalidate runs past the end of the 64-bit address space.
    RangeWrapsAround {
        /// Start of the range.
        address: u64,
        /// Size of the range, in bytes.
        size: u64,
    },
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandError::MisalignedAddress { address, alignment } => {
                write!(f, "address {address:#x} is not aligned to {alignment:#x}")
            }
            CommandError::AddressTooWide { address, bits } => {
                write!(f, "address {address:#x} does not fit a {bits}-bit field")
            }
            CommandError::SubstreamIdTooLarge { ssid } => write!(f, "SubstreamID {ssid:#x} is wider than 20 bits"),
            CommandError::SteRangeTooLarge { range } => write!(f, "CMD_CFGI_STE_RANGE Range {range} is above 31"),
            CommandError::RangeNumTooLarge { num } => write!(f, "range invalidation NUM {num} is above 31"),
            CommandError::RangeScaleTooLarge { scale } => write!(f, "range invalidation SCALE {scale} is above 31"),
            CommandError::TtlTooLarge { ttl } => write!(f, "TTL level hint {ttl} is above 3"),
            CommandError::ReservedTtl { granule, ttl } => {
                write!(f, "TTL level hint {ttl} is reserved with a {granule} granule")
            }
            CommandError::ReservedRangeEncoding => {
                f.write_str("NUM = 0, SCALE = 0 and TTL = 0 with a granule is a reserved range encoding")
            }
            CommandError::MsiAttributesTooLarge { attributes } => {
                write!(f, "CMD_SYNC MSI attributes {attributes:#x} are wider than 4 bits")
            }
            CommandError::MsiAddressZero => f.write_str("CMD_SYNC MSI address is 0 (no MSI would be written)"),
            CommandError::MisalignedSize { size, alignment } => {
                write!(f, "invalidation size {size:#x} is not a multiple of {alignment:#x}")
            }
            CommandError::RangeWrapsAround { address, size } => {
                write!(
                    f,
                    "invalidation of {size:#x} bytes at {address:#x} runs past the end of the address space"
                )
            }
        }
    }
}

/// The address word and range fields shared by every address-based TLBI command.
const fn encode_tlbi_address(
    word0: u64,
    address: u64,
    address_mask: u64,
    leaf: bool,
    range: Option<TlbiRange>,
) -> Result<[u64; 2], CommandError> {
    if address & !address_mask & !0xfff != 0 {
        return Err(CommandError::AddressTooWide {
            address,
            bits: PHYSICAL_ADDRESS_BITS,
        });
    }
    let mut word0 = word0;
    let mut word1 = address | leaf as u64;
    let alignment = match range {
        None => 1 << 12,
        Some(range) => {
            if let Err(error) = range.validate() {
                return Err(error);
            }
            word0 |= field(CMD0_TLBI_NUM, range.num as u64) | field(CMD0_TLBI_SCALE, range.scale as u64);
            word1 |= field(CMD1_TLBI_TTL, range.ttl as u64) | field(CMD1_TLBI_TG, range.granule.tg());
            match range.address_alignment() {
                Some(alignment) => alignment,
                None => {
                    return Err(CommandError::ReservedTtl {
                        granule: range.granule,
                        ttl: range.ttl,
                    });
                }
            }
        }
    };
    if address & (alignment - 1) != 0 {
        return Err(CommandError::MisalignedAddress { address, alignment });
    }
    Ok([word0, word1])
}

const fn check_ssid(ssid: u32) -> Result<u64, CommandError> {
    if ssid > MAX_SUBSTREAM_ID {
        Err(CommandError::SubstreamIdTooLarge { ssid })
    } else {
        Ok(ssid as u64)
    }
}

impl Command {
    /// The opcode this command is encoded with (CMD_CFGI_ALL is CMD_CFGI_STE_RANGE's 0x04).
    pub const fn opcode(&self) -> u8 {
        match self {
            Command::PrefetchConfig { .. } => opcode::PREFETCH_CONFIG,
            Command::CfgiSte { .. } => opcode::CFGI_STE,
            Command::CfgiSteRange { .. } | Command::CfgiAll => opcode::CFGI_STE_RANGE,
            Command::CfgiCd { .. } => opcode::CFGI_CD,
            Command::CfgiCdAll { .. } => opcode::CFGI_CD_ALL,
            Command::TlbiNhAll { .. } => opcode::TLBI_NH_ALL,
            Command::TlbiNhAsid { .. } => opcode::TLBI_NH_ASID,
            Command::TlbiNhVa { .. } => opcode::TLBI_NH_VA,
            Command::TlbiNhVaa { .. } => opcode::TLBI_NH_VAA,
            Command::TlbiEl2All => opcode::TLBI_EL2_ALL,
            Command::TlbiEl2Asid { .. } => opcode::TLBI_EL2_ASID,
            Command::TlbiEl2Va { .. } => opcode::TLBI_EL2_VA,
            Command::TlbiEl2Vaa { .. } => opcode::TLBI_EL2_VAA,
            Command::TlbiS12Vmall { .. } => opcode::TLBI_S12_VMALL,
            Command::TlbiS2Ipa { .. } => opcode::TLBI_S2_IPA,
            Command::TlbiNsnhAll => opcode::TLBI_NSNH_ALL,
            Command::Sync { .. } => opcode::SYNC,
        }
    }

    /// The two 64-bit words of the command, to be stored little-endian into a queue slot. SSec is always 0
    /// (Non-secure Command queue) and every reserved field is zero.
    ///
    /// # Errors
    /// A [`CommandError`] naming the first field that does not fit: a SubstreamID of 2^20 or more, a Range
    /// above 31, a VA/IPA that is not 4 KiB aligned (or aligned as its range hint requires), an IPA of 2^56 or
    /// more, invalid range fields (see [`TlbiRange::validate`]), or a CMD_SYNC MSI whose address is zero, not
    /// 4-byte aligned or 2^56 or more, or whose attributes are above 0xF.
    pub const fn encode(&self) -> Result<[u64; 2], CommandError> {
        let op = self.opcode() as u64;
        match *self {
            Command::PrefetchConfig { sid, ssid } => {
                let mut word0 = op | field(CMD0_SID, sid as u64);
                if let Some(ssid) = ssid {
                    match check_ssid(ssid) {
                        Ok(ssid) => word0 |= CMD0_SSV | field(CMD0_SSID, ssid),
                        Err(error) => return Err(error),
                    }
                }
                Ok([word0, 0])
            }
            Command::CfgiSte { sid, leaf } => Ok([op | field(CMD0_SID, sid as u64), leaf as u64 & CMD1_LEAF]),
            Command::CfgiSteRange { sid, range } => {
                if range > MAX_STE_RANGE {
                    return Err(CommandError::SteRangeTooLarge { range });
                }
                Ok([op | field(CMD0_SID, sid as u64), field(CMD1_CFGI_RANGE, range as u64)])
            }
            Command::CfgiAll => Ok([op, field(CMD1_CFGI_RANGE, MAX_STE_RANGE as u64)]),
            Command::CfgiCd { sid, ssid, leaf } => match check_ssid(ssid) {
                Ok(ssid) => Ok([
                    op | field(CMD0_SID, sid as u64) | field(CMD0_SSID, ssid),
                    leaf as u64 & CMD1_LEAF,
                ]),
                Err(error) => Err(error),
            },
            Command::CfgiCdAll { sid } => Ok([op | field(CMD0_SID, sid as u64), 0]),
            Command::TlbiNhAll { vmid } | Command::TlbiS12Vmall { vmid } => {
                Ok([op | field(CMD0_TLBI_VMID, vmid as u64), 0])
            }
            Command::TlbiNhAsid { vmid, asid } => Ok([
                op | field(CMD0_TLBI_VMID, vmid as u64) | field(CMD0_TLBI_ASID, asid as u64),
                0,
            ]),
            Command::TlbiNhVa {
                vmid,
                asid,
                address,
                leaf,
                range,
            } => encode_tlbi_address(
                op | field(CMD0_TLBI_VMID, vmid as u64) | field(CMD0_TLBI_ASID, asid as u64),
                address,
                CMD1_TLBI_VA,
                leaf,
                range,
            ),
            Command::TlbiNhVaa {
                vmid,
                address,
                leaf,
                range,
            } => encode_tlbi_address(
                op | field(CMD0_TLBI_VMID, vmid as u64),
                address,
                CMD1_TLBI_VA,
                leaf,
                range,
            ),
            Command::TlbiEl2All | Command::TlbiNsnhAll => Ok([op, 0]),
            Command::TlbiEl2Asid { asid } => Ok([op | field(CMD0_TLBI_ASID, asid as u64), 0]),
            Command::TlbiEl2Va {
                asid,
                address,
                leaf,
                range,
            } => encode_tlbi_address(
                op | field(CMD0_TLBI_ASID, asid as u64),
                address,
                CMD1_TLBI_VA,
                leaf,
                range,
            ),
            Command::TlbiEl2Vaa { address, leaf, range } => encode_tlbi_address(op, address, CMD1_TLBI_VA, leaf, range),
            Command::TlbiS2Ipa {
                vmid,
                address,
                leaf,
                range,
            } => encode_tlbi_address(
                op | field(CMD0_TLBI_VMID, vmid as u64),
                address,
                CMD1_TLBI_IPA,
                leaf,
                range,
            ),
            Command::Sync { completion } => match completion {
                SyncCompletion::None => Ok([op | field(CMD0_SYNC_CS, 0b00), 0]),
                SyncCompletion::Irq => Ok([op | field(CMD0_SYNC_CS, 0b01), 0]),
                SyncCompletion::Sev => Ok([op | field(CMD0_SYNC_CS, 0b10), 0]),
                SyncCompletion::Msi {
                    address,
                    data,
                    shareability,
                    attributes,
                } => {
                    if address == 0 {
                        return Err(CommandError::MsiAddressZero);
                    }
                    if address & !CMD1_SYNC_MSIADDR & !0b11 != 0 {
                        return Err(CommandError::AddressTooWide {
                            address,
                            bits: PHYSICAL_ADDRESS_BITS,
                        });
                    }
                    if address & 0b11 != 0 {
                        return Err(CommandError::MisalignedAddress { address, alignment: 4 });
                    }
                    if attributes > 0xf {
                        return Err(CommandError::MsiAttributesTooLarge { attributes });
                    }
                    Ok([
                        op | field(CMD0_SYNC_CS, 0b01)
                            | field(CMD0_SYNC_MSH, msh(shareability))
                            | field(CMD0_SYNC_MSIATTR, attributes as u64)
                            | field(CMD0_SYNC_MSIDATA, data as u64),
                        address,
                    ])
                }
            },
        }
    }
}

/// The CMDQ_CONS.ERR field (bits `[30:24]`; section 7.1, "Command queue errors"): why the command at CONS could
/// not be consumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CmdqConsError {
    /// CERROR_NONE (0): no error.
    None,
    /// CERROR_ILL (1): a reserved opcode, an invalid parameter or a non-zero reserved field.
    Illegal,
    /// CERROR_ABT (2): an external abort while reading the command.
    Abort,
    /// CERROR_ATC_INV_SYNC (3): a CMD_SYNC could not complete an ATS invalidation.
    AtcInvalidationSync,
    /// A reserved error code, kept as read.
    Reserved(u8),
}

/// CMDQ_CONS.ERR, bits `[30:24]`.
const CMDQ_CONS_ERR_SHIFT: u32 = 24;
const CMDQ_CONS_ERR_MASK: u32 = 0x7f;

impl CmdqConsError {
    /// Decodes a 7-bit error code; bits above bit 6 are ignored.
    pub const fn from_code(code: u8) -> Self {
        match code & CMDQ_CONS_ERR_MASK as u8 {
            0 => CmdqConsError::None,
            1 => CmdqConsError::Illegal,
            2 => CmdqConsError::Abort,
            3 => CmdqConsError::AtcInvalidationSync,
            other => CmdqConsError::Reserved(other),
        }
    }

    /// Decodes the ERR field of an SMMU_CMDQ_CONS value.
    pub const fn from_cons(cons: u32) -> Self {
        Self::from_code(((cons >> CMDQ_CONS_ERR_SHIFT) & CMDQ_CONS_ERR_MASK) as u8)
    }

    /// The 7-bit error code.
    pub const fn code(self) -> u8 {
        match self {
            CmdqConsError::None => 0,
            CmdqConsError::Illegal => 1,
            CmdqConsError::Abort => 2,
            CmdqConsError::AtcInvalidationSync => 3,
            CmdqConsError::Reserved(code) => code,
        }
    }

    /// Whether this is an error (anything but CERROR_NONE).
    pub const fn is_error(self) -> bool {
        !matches!(self, CmdqConsError::None)
    }
}

impl fmt::Display for CmdqConsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdqConsError::None => f.write_str("CERROR_NONE (no error)"),
            CmdqConsError::Illegal => f.write_str("CERROR_ILL (illegal command)"),
            CmdqConsError::Abort => f.write_str("CERROR_ABT (abort reading the command)"),
            CmdqConsError::AtcInvalidationSync => {
                f.write_str("CERROR_ATC_INV_SYNC (CMD_SYNC could not complete an ATS invalidation)")
            }
            CmdqConsError::Reserved(code) => write!(f, "reserved command error code {code:#x}"),
        }
    }
}

/// Most granules one range-invalidation command covers: (31 + 1) * 2^31 = 2^36.
pub const MAX_RANGE_GRANULES: u64 = 1 << 36;

/// One command's worth of a [`plan_range_invalidation`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RangePiece {
    /// First byte covered.
    pub address: u64,
    /// Bytes covered.
    pub size: u64,
    /// The range fields for the command; `None` for a single granule without a level hint, which must be sent
    /// as a non-range command (NUM = SCALE = TTL = 0 with a granule is reserved).
    pub range: Option<TlbiRange>,
}

/// The pieces of a range invalidation, lowest address first (see [`plan_range_invalidation`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangePlan {
    address: u64,
    remaining_granules: u64,
    granule: Granule,
    ttl: u8,
}

impl RangePlan {
    /// Upper bound on the number of pieces for `granules` granules: one per five bit positions between the
    /// lowest and highest set bit of `granules mod 2^36`, plus one per whole 2^36 granules. At most 8 when
    /// `granules <= 2^36` (every 48-bit VA space with 4 KiB granules, every 52-bit one with 64 KiB granules).
    pub const fn max_pieces(granules: u64) -> u64 {
        let low = granules % MAX_RANGE_GRANULES;
        let low_pieces = if low == 0 {
            0
        } else {
            let span = 64 - low.leading_zeros() - low.trailing_zeros();
            span.div_ceil(5) as u64
        };
        low_pieces + granules / MAX_RANGE_GRANULES
    }
}

impl Iterator for RangePlan {
    type Item = RangePiece;

    fn next(&mut self) -> Option<RangePiece> {
        if self.remaining_granules == 0 {
            return None;
        }
        let low = self.remaining_granules % MAX_RANGE_GRANULES;
        // Greedy from the lowest set bit of the count modulo 2^36: the next piece takes the five bits starting
        // there (SCALE = that bit, NUM + 1 = those bits, odd and at most 31). When the lowest set bit is above 31
        // (only bits 32..=35 remain), the rest fits one piece at SCALE 31 with NUM + 1 <= 30. Whole multiples of
        // 2^36 granules go last, one maximal command (NUM 31, SCALE 31) each.
        let (num, scale) = if low == 0 {
            (MAX_TLBI_NUM as u64, MAX_TLBI_SCALE)
        } else {
            let lowest = low.trailing_zeros();
            if lowest <= MAX_TLBI_SCALE as u32 {
                (((low >> lowest) & 0x1f) - 1, lowest as u8)
            } else {
                ((low >> MAX_TLBI_SCALE) - 1, MAX_TLBI_SCALE)
            }
        };
        let granules = (num + 1) << scale;
        let range = if granules == 1 && self.ttl == 0 {
            None
        } else {
            Some(TlbiRange {
                num: num as u8,
                scale,
                granule: self.granule,
                ttl: self.ttl,
            })
        };
        let piece = RangePiece {
            address: self.address,
            size: granules << self.granule.log2(),
            range,
        };
        self.remaining_granules -= granules;
        // The last piece may end exactly at 2^64.
        self.address = self.address.wrapping_add(piece.size);
        Some(piece)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let bound = Self::max_pieces(self.remaining_granules);
        (usize::from(self.remaining_granules != 0), usize::try_from(bound).ok())
    }
}

impl FusedIterator for RangePlan {}

/// Splits `[address, address + size)` into range-invalidation commands (SMMU_IDR3.RIL == 1): each piece covers
/// `(NUM + 1) * 2^SCALE` granules from its start, pieces are contiguous and in ascending order, and they tile the
/// range exactly. The split takes five bits of the granule count at a time from the lowest set bit; it uses the
/// fewest commands for every count below 2^14 granules (checked against an exhaustive model) and no two
/// neighbouring pieces could ever be one command. Every piece carries the level hint `ttl` (0 = none); with `ttl` 0, a
/// single-granule piece has no [`TlbiRange`] and is sent as a plain (non-range) invalidation.
///
/// The number of pieces is at most [`RangePlan::max_pieces`] of `size / granule` (8 for up to 2^36 granules).
/// Building the commands from the pieces (which ASID/VMID, leaf or not) is the caller's choice. Use it only when
/// the SMMU implements range invalidation; otherwise invalidate granule by granule (or by ASID/VMID).
///
/// A `size` of 0 yields no piece.
///
/// # Errors
/// [`CommandError::TtlTooLarge`] or [`CommandError::ReservedTtl`] for a bad `ttl`;
/// [`CommandError::MisalignedAddress`] / [`CommandError::MisalignedSize`] when `address` or `size` is not a
/// multiple of the granule (or, with a level hint, of the leaf-entry size at that level, as the spec requires of
/// each command's start address); [`CommandError::RangeWrapsAround`] when the range ends above 2^64.
pub const fn plan_range_invalidation(
    address: u64,
    size: u64,
    granule: Granule,
    ttl: u8,
) -> Result<RangePlan, CommandError> {
    if ttl > 3 {
        return Err(CommandError::TtlTooLarge { ttl });
    }
    let alignment = match granule.ttl_alignment_log2(ttl) {
        Some(log2) => 1u64 << log2,
        None => return Err(CommandError::ReservedTtl { granule, ttl }),
    };
    if address & (alignment - 1) != 0 {
        return Err(CommandError::MisalignedAddress { address, alignment });
    }
    if size & (alignment - 1) != 0 {
        return Err(CommandError::MisalignedSize { size, alignment });
    }
    if address.checked_add(size).is_none() && address.wrapping_add(size) != 0 {
        return Err(CommandError::RangeWrapsAround { address, size });
    }
    Ok(RangePlan {
        address,
        remaining_granules: size >> granule.log2(),
        granule,
        ttl,
    })
}

#[cfg(test)]
mod tests;
