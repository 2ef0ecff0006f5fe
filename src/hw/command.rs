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

/// Translation granule of the TLB entries a range invalidation targets (field TG).
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

/// Shareability of a CMD_SYNC completion MSI (field MSH).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shareability {
    /// Non-shareable, MSH = 0b00.
    NonShareable,
    /// Outer Shareable, MSH = 0b10.
    OuterShareable,
    /// Inner Shareable, MSH = 0b11.
    InnerShareable,
}

impl Shareability {
    const fn msh(self) -> u64 {
        match self {
            Shareability::NonShareable => 0b00,
            Shareability::OuterShareable => 0b10,
            Shareability::InnerShareable => 0b11,
        }
    }
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
                            | field(CMD0_SYNC_MSH, shareability.msh())
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
pub enum CommandQueueError {
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

impl CommandQueueError {
    /// Decodes a 7-bit error code; bits above bit 6 are ignored.
    pub const fn from_code(code: u8) -> Self {
        match code & CMDQ_CONS_ERR_MASK as u8 {
            0 => CommandQueueError::None,
            1 => CommandQueueError::Illegal,
            2 => CommandQueueError::Abort,
            3 => CommandQueueError::AtcInvalidationSync,
            other => CommandQueueError::Reserved(other),
        }
    }

    /// Decodes the ERR field of an SMMU_CMDQ_CONS value.
    pub const fn from_cons(cons: u32) -> Self {
        Self::from_code(((cons >> CMDQ_CONS_ERR_SHIFT) & CMDQ_CONS_ERR_MASK) as u8)
    }

    /// The 7-bit error code.
    pub const fn code(self) -> u8 {
        match self {
            CommandQueueError::None => 0,
            CommandQueueError::Illegal => 1,
            CommandQueueError::Abort => 2,
            CommandQueueError::AtcInvalidationSync => 3,
            CommandQueueError::Reserved(code) => code,
        }
    }

    /// Whether this is an error (anything but CERROR_NONE).
    pub const fn is_error(self) -> bool {
        !matches!(self, CommandQueueError::None)
    }
}

impl fmt::Display for CommandQueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandQueueError::None => f.write_str("CERROR_NONE (no error)"),
            CommandQueueError::Illegal => f.write_str("CERROR_ILL (illegal command)"),
            CommandQueueError::Abort => f.write_str("CERROR_ABT (abort reading the command)"),
            CommandQueueError::AtcInvalidationSync => {
                f.write_str("CERROR_ATC_INV_SYNC (CMD_SYNC could not complete an ATS invalidation)")
            }
            CommandQueueError::Reserved(code) => write!(f, "reserved command error code {code:#x}"),
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
mod tests {
    extern crate std;

    use super::*;
    use proptest::prelude::*;
    use std::string::ToString;
    use std::vec::Vec;

    /// A range literal on one line.
    const fn tlbi_range(num: u8, scale: u8, granule: Granule, ttl: u8) -> TlbiRange {
        TlbiRange {
            num,
            scale,
            granule,
            ttl,
        }
    }

    fn enc(command: Command) -> [u64; 2] {
        command.encode().unwrap_or_else(|error| panic!("{command:?}: {error}"))
    }

    const RANGE_4K_L3: TlbiRange = tlbi_range(3, 9, Granule::Size4K, 3);

    // Expected words below are written from the command layouts of IHI 0070 chapter 4 (opcode [7:0]; SSV [11];
    // SubstreamID [31:12]; StreamID [63:32]; NUM [16:12]; SCALE [24:20]; VMID [47:32]; ASID [63:48]; Leaf [64];
    // Range [68:64]; TTL [73:72]; TG [75:74]; Address [127:76]; CS [13:12]; MSH [23:22]; MSIAttr [27:24];
    // MSIData [63:32]; MSIAddress [119:66]), not from the constants above.

    #[test]
    fn prefetch_config() {
        // 4.2.1 CMD_PREFETCH_CONFIG: SSV = 0.
        assert_eq!(
            enc(Command::PrefetchConfig { sid: 0x10, ssid: None }),
            [0x0000_0010_0000_0001, 0]
        );
        // SSV = 1, SubstreamID 0x12345.
        assert_eq!(
            enc(Command::PrefetchConfig {
                sid: 0xffff_ffff,
                ssid: Some(0x12345)
            }),
            [0xffff_ffff_1234_5801, 0]
        );
        assert_eq!(
            Command::PrefetchConfig {
                sid: 0,
                ssid: Some(1 << 20)
            }
            .encode(),
            Err(CommandError::SubstreamIdTooLarge { ssid: 1 << 20 })
        );
    }

    #[test]
    fn cfgi_ste_and_range_and_all() {
        // 4.3.1 CMD_CFGI_STE.
        assert_eq!(
            enc(Command::CfgiSte {
                sid: 0xabcd,
                leaf: true
            }),
            [0x0000_abcd_0000_0003, 1]
        );
        assert_eq!(
            enc(Command::CfgiSte {
                sid: 0xabcd,
                leaf: false
            }),
            [0x0000_abcd_0000_0003, 0]
        );
        // 4.3.2 CMD_CFGI_STE_RANGE: Range in [68:64].
        assert_eq!(
            enc(Command::CfgiSteRange { sid: 0x20, range: 4 }),
            [0x0000_0020_0000_0004, 4]
        );
        assert_eq!(enc(Command::CfgiSteRange { sid: 0, range: 31 }), [0x04, 0x1f]);
        assert_eq!(
            Command::CfgiSteRange { sid: 0, range: 32 }.encode(),
            Err(CommandError::SteRangeTooLarge { range: 32 })
        );
        // 4.3.6 CMD_CFGI_ALL = CMD_CFGI_STE_RANGE with Range = 31.
        assert_eq!(enc(Command::CfgiAll), [0x04, 0x1f]);
        assert_eq!(Command::CfgiAll.opcode(), 0x04);
    }

    #[test]
    fn cfgi_cd_and_cd_all() {
        // 4.3.3 CMD_CFGI_CD.
        assert_eq!(
            enc(Command::CfgiCd {
                sid: 7,
                ssid: 0xf_ffff,
                leaf: false
            }),
            [0x0000_0007_ffff_f005, 0]
        );
        assert_eq!(
            enc(Command::CfgiCd {
                sid: 7,
                ssid: 0,
                leaf: true
            }),
            [0x0000_0007_0000_0005, 1]
        );
        assert_eq!(
            Command::CfgiCd {
                sid: 7,
                ssid: 0x10_0000,
                leaf: true
            }
            .encode(),
            Err(CommandError::SubstreamIdTooLarge { ssid: 0x10_0000 })
        );
        // 4.3.4 CMD_CFGI_CD_ALL.
        assert_eq!(enc(Command::CfgiCdAll { sid: 3 }), [0x0000_0003_0000_0006, 0]);
    }

    #[test]
    fn tlbi_nh_all_and_asid() {
        // 4.4.2.1 CMD_TLBI_NH_ALL: VMID [47:32].
        assert_eq!(enc(Command::TlbiNhAll { vmid: 0x1234 }), [0x0000_1234_0000_0010, 0]);
        // 4.4.2.2 CMD_TLBI_NH_ASID: ASID [63:48], VMID [47:32].
        assert_eq!(
            enc(Command::TlbiNhAsid { vmid: 1, asid: 0xbeef }),
            [0xbeef_0001_0000_0011, 0]
        );
    }

    #[test]
    fn tlbi_nh_va_and_vaa() {
        // 4.4.2.4 CMD_TLBI_NH_VA, no range (TG = 0).
        let cmd = Command::TlbiNhVa {
            vmid: 2,
            asid: 3,
            address: 0x0000_8000_1234_5000,
            leaf: true,
            range: None,
        };
        assert_eq!(enc(cmd), [0x0003_0002_0000_0012, 0x0000_8000_1234_5001]);
        // With a range: NUM 3 [16:12], SCALE 9 [24:20], TG 4K = 0b01 [75:74], TTL 3 [73:72].
        let cmd = Command::TlbiNhVa {
            vmid: 2,
            asid: 3,
            address: 0x4000_0000,
            leaf: true,
            range: Some(RANGE_4K_L3),
        };
        assert_eq!(enc(cmd), [0x0003_0002_0090_3012, 0x4000_0701]);
        // A VA uses all of [63:12].
        let cmd = Command::TlbiNhVaa {
            vmid: 5,
            address: 0xffff_ffff_ffff_f000,
            leaf: false,
            range: None,
        };
        assert_eq!(enc(cmd), [0x0000_0005_0000_0013, 0xffff_ffff_ffff_f000]);
        // 4.4.2.3 CMD_TLBI_NH_VAA with a 16K range, TTL 2 (32 MiB aligned).
        let range = tlbi_range(0, 0, Granule::Size16K, 2);
        let cmd = Command::TlbiNhVaa {
            vmid: 0,
            address: 0x200_0000,
            leaf: false,
            range: Some(range),
        };
        assert_eq!(enc(cmd), [0x13, 0x200_0000 | (0b10 << 10) | (0b10 << 8)]);
    }

    #[test]
    fn tlbi_el2() {
        // 4.4.2.7 CMD_TLBI_EL2_ALL, 4.4.2.10 CMD_TLBI_EL2_ASID.
        assert_eq!(enc(Command::TlbiEl2All), [0x20, 0]);
        assert_eq!(enc(Command::TlbiEl2Asid { asid: 0x42 }), [0x0042_0000_0000_0021, 0]);
        // 4.4.2.8 CMD_TLBI_EL2_VA.
        let cmd = Command::TlbiEl2Va {
            asid: 0x42,
            address: 0x1000,
            leaf: true,
            range: None,
        };
        assert_eq!(enc(cmd), [0x0042_0000_0000_0022, 0x1001]);
        // 4.4.2.9 CMD_TLBI_EL2_VAA with a 64K range NUM 1 SCALE 2, no hint.
        let range = tlbi_range(1, 2, Granule::Size64K, 0);
        let cmd = Command::TlbiEl2Vaa {
            address: 0x3_0000,
            leaf: false,
            range: Some(range),
        };
        assert_eq!(enc(cmd), [0x0000_0000_0020_1023, 0x3_0c00]);
    }

    #[test]
    fn tlbi_stage2_and_nsnh() {
        // 4.4.3.2 CMD_TLBI_S12_VMALL.
        assert_eq!(enc(Command::TlbiS12Vmall { vmid: 0xffff }), [0x0000_ffff_0000_0028, 0]);
        // 4.4.3.1 CMD_TLBI_S2_IPA: the widest IPA, maximal NUM and SCALE, 64K granule.
        let range = tlbi_range(31, 31, Granule::Size64K, 0);
        let cmd = Command::TlbiS2Ipa {
            vmid: 9,
            address: 0x00ff_ffff_ffff_0000,
            leaf: true,
            range: Some(range),
        };
        assert_eq!(enc(cmd), [0x0000_0009_01f1_f02a, 0x00ff_ffff_ffff_0c01]);
        let cmd = Command::TlbiS2Ipa {
            vmid: 9,
            address: 0x8000_0000,
            leaf: false,
            range: None,
        };
        assert_eq!(enc(cmd), [0x0000_0009_0000_002a, 0x8000_0000]);
        // 4.4.4.1 CMD_TLBI_NSNH_ALL.
        assert_eq!(enc(Command::TlbiNsnhAll), [0x30, 0]);
    }

    #[test]
    fn sync() {
        // 4.7.3 CMD_SYNC: CS = SIG_NONE / SIG_IRQ / SIG_SEV.
        assert_eq!(
            enc(Command::Sync {
                completion: SyncCompletion::None
            }),
            [0x46, 0]
        );
        assert_eq!(
            enc(Command::Sync {
                completion: SyncCompletion::Irq
            }),
            [0x1046, 0]
        );
        assert_eq!(
            enc(Command::Sync {
                completion: SyncCompletion::Sev
            }),
            [0x2046, 0]
        );
        // MSI: MSIData [63:32], MSIAttr 0xF [27:24], MSH Inner = 0b11 [23:22], CS = SIG_IRQ; MSIAddress [119:66].
        let msi = SyncCompletion::Msi {
            address: 0x4000_1234,
            data: 0xdead_beef,
            shareability: Shareability::InnerShareable,
            attributes: 0xf,
        };
        assert_eq!(
            enc(Command::Sync { completion: msi }),
            [0xdead_beef_0fc0_1046, 0x4000_1234]
        );
        let msi = SyncCompletion::Msi {
            address: 0x00ff_ffff_ffff_fffc,
            data: 1,
            shareability: Shareability::OuterShareable,
            attributes: 0,
        };
        assert_eq!(
            enc(Command::Sync { completion: msi }),
            [0x0000_0001_0080_1046, 0x00ff_ffff_ffff_fffc]
        );
        let msi = SyncCompletion::Msi {
            address: 8,
            data: 0,
            shareability: Shareability::NonShareable,
            attributes: 1,
        };
        assert_eq!(enc(Command::Sync { completion: msi }), [0x0100_1046, 8]);
    }

    #[test]
    fn sync_errors() {
        let msi = |address, attributes| Command::Sync {
            completion: SyncCompletion::Msi {
                address,
                data: 0,
                shareability: Shareability::InnerShareable,
                attributes,
            },
        };
        assert_eq!(msi(0, 0).encode(), Err(CommandError::MsiAddressZero));
        assert_eq!(
            msi(0x1002, 0).encode(),
            Err(CommandError::MisalignedAddress {
                address: 0x1002,
                alignment: 4
            })
        );
        assert_eq!(
            msi(1 << 56, 0).encode(),
            Err(CommandError::AddressTooWide {
                address: 1 << 56,
                bits: 56
            })
        );
        assert_eq!(
            msi(0x1000, 0x10).encode(),
            Err(CommandError::MsiAttributesTooLarge { attributes: 0x10 })
        );
    }

    #[test]
    fn address_errors() {
        // Non-range: Address[11:0] are not encoded, so they must be zero.
        let cmd = Command::TlbiNhVa {
            vmid: 0,
            asid: 0,
            address: 0x1234,
            leaf: false,
            range: None,
        };
        assert_eq!(
            cmd.encode(),
            Err(CommandError::MisalignedAddress {
                address: 0x1234,
                alignment: 0x1000
            })
        );
        let cmd = Command::TlbiEl2Vaa {
            address: 0x800,
            leaf: false,
            range: None,
        };
        assert_eq!(
            cmd.encode(),
            Err(CommandError::MisalignedAddress {
                address: 0x800,
                alignment: 0x1000
            })
        );
        // IPA field is [55:12].
        let cmd = Command::TlbiS2Ipa {
            vmid: 0,
            address: 1 << 56,
            leaf: false,
            range: None,
        };
        assert_eq!(
            cmd.encode(),
            Err(CommandError::AddressTooWide {
                address: 1 << 56,
                bits: 56
            })
        );
        // Range with a 16K granule and no hint: Address[13:12] must be zero.
        let range = tlbi_range(1, 0, Granule::Size16K, 0);
        let cmd = Command::TlbiNhVaa {
            vmid: 0,
            address: 0x1000,
            leaf: false,
            range: Some(range),
        };
        assert_eq!(
            cmd.encode(),
            Err(CommandError::MisalignedAddress {
                address: 0x1000,
                alignment: 0x4000
            })
        );
        // 4K with TTL 2 (2 MiB blocks): Address[20:12] must be zero.
        let range = tlbi_range(1, 0, Granule::Size4K, 2);
        let cmd = Command::TlbiEl2Va {
            asid: 0,
            address: 0x10_0000,
            leaf: true,
            range: Some(range),
        };
        assert_eq!(
            cmd.encode(),
            Err(CommandError::MisalignedAddress {
                address: 0x10_0000,
                alignment: 0x20_0000
            })
        );
        // 4K with TTL 1 (1 GiB blocks), 64K with TTL 1 (4 TiB) and TTL 2 (512 MiB).
        for (granule, ttl, alignment) in [
            (Granule::Size4K, 1, 1u64 << 30),
            (Granule::Size64K, 1, 1 << 42),
            (Granule::Size64K, 2, 1 << 29),
        ] {
            let range = TlbiRange {
                num: 0,
                scale: 1,
                granule,
                ttl,
            };
            let half = alignment / 2;
            let cmd = Command::TlbiS2Ipa {
                vmid: 0,
                address: half,
                leaf: true,
                range: Some(range),
            };
            assert_eq!(
                cmd.encode(),
                Err(CommandError::MisalignedAddress {
                    address: half,
                    alignment
                })
            );
            let cmd = Command::TlbiS2Ipa {
                vmid: 0,
                address: alignment,
                leaf: true,
                range: Some(range),
            };
            assert!(cmd.encode().is_ok());
        }
    }

    #[test]
    fn range_field_errors() {
        let va = |range| Command::TlbiNhVa {
            vmid: 0,
            asid: 0,
            address: 0,
            leaf: false,
            range: Some(range),
        };
        assert_eq!(
            va(tlbi_range(32, 1, Granule::Size4K, 0)).encode(),
            Err(CommandError::RangeNumTooLarge { num: 32 })
        );
        assert_eq!(
            va(tlbi_range(1, 32, Granule::Size4K, 0)).encode(),
            Err(CommandError::RangeScaleTooLarge { scale: 32 })
        );
        assert_eq!(
            va(tlbi_range(1, 1, Granule::Size4K, 4)).encode(),
            Err(CommandError::TtlTooLarge { ttl: 4 })
        );
        assert_eq!(
            va(tlbi_range(1, 1, Granule::Size16K, 1)).encode(),
            Err(CommandError::ReservedTtl {
                granule: Granule::Size16K,
                ttl: 1
            })
        );
        // NUM = SCALE = TTL = 0 with TG != 0 is reserved (CERROR_ILL), ...
        assert_eq!(
            va(tlbi_range(0, 0, Granule::Size4K, 0)).encode(),
            Err(CommandError::ReservedRangeEncoding)
        );
        // ... but a single granule with a level hint is fine.
        assert!(va(tlbi_range(0, 0, Granule::Size4K, 3)).encode().is_ok());
        // Bounds are inclusive.
        assert!(va(tlbi_range(31, 31, Granule::Size4K, 3)).encode().is_ok());
    }

    #[test]
    fn range_sizes() {
        assert_eq!(RANGE_4K_L3.granules(), Some(4 << 9));
        assert_eq!(RANGE_4K_L3.size(), Some(4 << 21));
        let max = tlbi_range(31, 31, Granule::Size64K, 0);
        assert_eq!(max.granules(), Some(MAX_RANGE_GRANULES));
        assert_eq!(max.size(), Some(1 << 52));
        assert_eq!(TlbiRange { num: 32, ..max }.granules(), None);
        assert_eq!(TlbiRange { scale: 40, ..max }.size(), None);
        assert_eq!(TlbiRange { ttl: 7, ..max }.address_alignment(), None);
        assert_eq!(Granule::from_log2(14), Some(Granule::Size16K));
        assert_eq!(Granule::from_log2(13), None);
        for granule in [Granule::Size4K, Granule::Size16K, Granule::Size64K] {
            assert_eq!(Granule::from_log2(granule.log2()), Some(granule));
            assert_eq!(granule.size(), 1 << granule.log2());
        }
    }

    #[test]
    fn opcodes_match_encoding() {
        let commands = [
            Command::PrefetchConfig { sid: 0, ssid: None },
            Command::CfgiSte { sid: 0, leaf: false },
            Command::CfgiSteRange { sid: 0, range: 0 },
            Command::CfgiCd {
                sid: 0,
                ssid: 0,
                leaf: false,
            },
            Command::CfgiCdAll { sid: 0 },
            Command::CfgiAll,
            Command::TlbiNhAll { vmid: 0 },
            Command::TlbiNhAsid { vmid: 0, asid: 0 },
            Command::TlbiNhVa {
                vmid: 0,
                asid: 0,
                address: 0,
                leaf: false,
                range: None,
            },
            Command::TlbiNhVaa {
                vmid: 0,
                address: 0,
                leaf: false,
                range: None,
            },
            Command::TlbiEl2All,
            Command::TlbiEl2Asid { asid: 0 },
            Command::TlbiEl2Va {
                asid: 0,
                address: 0,
                leaf: false,
                range: None,
            },
            Command::TlbiEl2Vaa {
                address: 0,
                leaf: false,
                range: None,
            },
            Command::TlbiS12Vmall { vmid: 0 },
            Command::TlbiS2Ipa {
                vmid: 0,
                address: 0,
                leaf: false,
                range: None,
            },
            Command::TlbiNsnhAll,
            Command::Sync {
                completion: SyncCompletion::None,
            },
        ];
        let expected = [
            0x01, 0x03, 0x04, 0x05, 0x06, 0x04, 0x10, 0x11, 0x12, 0x13, 0x20, 0x21, 0x22, 0x23, 0x28, 0x2a, 0x30, 0x46,
        ];
        for (command, opcode) in commands.iter().zip(expected) {
            assert_eq!(command.opcode(), opcode, "{command:?}");
            let words = enc(*command);
            assert_eq!(opcode_of(&words), opcode);
            assert!(opcode_name(opcode).is_some());
        }
    }

    #[test]
    fn opcode_names_cover_the_spec_table() {
        // Section 4.1.1: every defined opcode and its name.
        let table: &[(u8, &str)] = &[
            (0x01, "CMD_PREFETCH_CONFIG"),
            (0x02, "CMD_PREFETCH_ADDR"),
            (0x03, "CMD_CFGI_STE"),
            (0x04, "CMD_CFGI_STE_RANGE"),
            (0x05, "CMD_CFGI_CD"),
            (0x06, "CMD_CFGI_CD_ALL"),
            (0x07, "CMD_CFGI_VMS_PIDM"),
            (0x10, "CMD_TLBI_NH_ALL"),
            (0x11, "CMD_TLBI_NH_ASID"),
            (0x12, "CMD_TLBI_NH_VA"),
            (0x13, "CMD_TLBI_NH_VAA"),
            (0x18, "CMD_TLBI_EL3_ALL"),
            (0x1a, "CMD_TLBI_EL3_VA"),
            (0x20, "CMD_TLBI_EL2_ALL"),
            (0x21, "CMD_TLBI_EL2_ASID"),
            (0x22, "CMD_TLBI_EL2_VA"),
            (0x23, "CMD_TLBI_EL2_VAA"),
            (0x28, "CMD_TLBI_S12_VMALL"),
            (0x2a, "CMD_TLBI_S2_IPA"),
            (0x30, "CMD_TLBI_NSNH_ALL"),
            (0x40, "CMD_ATC_INV"),
            (0x41, "CMD_PRI_RESP"),
            (0x44, "CMD_RESUME"),
            (0x45, "CMD_STALL_TERM"),
            (0x46, "CMD_SYNC"),
            (0x50, "CMD_TLBI_S_EL2_ALL"),
            (0x51, "CMD_TLBI_S_EL2_ASID"),
            (0x52, "CMD_TLBI_S_EL2_VA"),
            (0x53, "CMD_TLBI_S_EL2_VAA"),
            (0x58, "CMD_TLBI_S_S12_VMALL"),
            (0x5a, "CMD_TLBI_S_S2_IPA"),
            (0x60, "CMD_TLBI_SNH_ALL"),
            (0x70, "CMD_DPTI_ALL"),
            (0x73, "CMD_DPTI_PA"),
        ];
        for opcode in 0..=u8::MAX {
            let expected = table.iter().find(|(op, _)| *op == opcode).map(|(_, name)| *name);
            assert_eq!(opcode_name(opcode), expected, "opcode {opcode:#x}");
        }
    }

    #[test]
    fn command_queue_error_codes() {
        // SMMU_CMDQ_CONS.ERR is [30:24].
        assert_eq!(CommandQueueError::from_cons(0x0000_0005), CommandQueueError::None);
        assert_eq!(CommandQueueError::from_cons(0x0100_0005), CommandQueueError::Illegal);
        assert_eq!(CommandQueueError::from_cons(0x0200_0000), CommandQueueError::Abort);
        assert_eq!(
            CommandQueueError::from_cons(0x8300_0000),
            CommandQueueError::AtcInvalidationSync
        );
        assert_eq!(
            CommandQueueError::from_cons(0x7f0f_ffff),
            CommandQueueError::Reserved(0x7f)
        );
        assert_eq!(CommandQueueError::from_code(0x84), CommandQueueError::Reserved(4));
        for code in 0..0x80u8 {
            let error = CommandQueueError::from_code(code);
            assert_eq!(error.code(), code);
            assert_eq!(error.is_error(), code != 0);
            assert_eq!(CommandQueueError::from_cons(u32::from(code) << 24), error);
        }
        assert!(CommandQueueError::Illegal.to_string().contains("CERROR_ILL"));
        assert!(CommandQueueError::None.to_string().contains("CERROR_NONE"));
        assert!(CommandQueueError::Abort.to_string().contains("CERROR_ABT"));
        assert!(
            CommandQueueError::AtcInvalidationSync
                .to_string()
                .contains("CERROR_ATC_INV_SYNC")
        );
        assert!(CommandQueueError::Reserved(9).to_string().contains("0x9"));
    }

    #[test]
    fn error_display_names_the_value() {
        let cases: &[(CommandError, &str)] = &[
            (
                CommandError::MisalignedAddress {
                    address: 0x1234,
                    alignment: 0x1000,
                },
                "0x1234",
            ),
            (
                CommandError::AddressTooWide {
                    address: 1 << 56,
                    bits: 56,
                },
                "56-bit",
            ),
            (CommandError::SubstreamIdTooLarge { ssid: 0x100000 }, "0x100000"),
            (CommandError::SteRangeTooLarge { range: 40 }, "40"),
            (CommandError::RangeNumTooLarge { num: 33 }, "33"),
            (CommandError::RangeScaleTooLarge { scale: 34 }, "34"),
            (CommandError::TtlTooLarge { ttl: 5 }, "5"),
            (
                CommandError::ReservedTtl {
                    granule: Granule::Size16K,
                    ttl: 1,
                },
                "16K",
            ),
            (CommandError::ReservedRangeEncoding, "reserved"),
            (CommandError::MsiAttributesTooLarge { attributes: 0x20 }, "0x20"),
            (CommandError::MsiAddressZero, "address is 0"),
            (
                CommandError::MisalignedSize {
                    size: 0x1800,
                    alignment: 0x1000,
                },
                "0x1800",
            ),
            (
                CommandError::RangeWrapsAround {
                    address: 0xffff_f000,
                    size: 0x2000,
                },
                "0xfffff000",
            ),
        ];
        for (error, needle) in cases {
            let text = error.to_string();
            assert!(text.contains(needle), "{error:?}: {text}");
        }
    }

    // ---- Range planning ----

    /// Whether `granules` can be covered by one range command: (NUM + 1) * 2^SCALE with both in 0..=31.
    fn single_piece(granules: u64) -> bool {
        (0..=31u32).any(|scale| {
            granules.trailing_zeros() >= scale && {
                let multiple = granules >> scale;
                (1..=32).contains(&multiple)
            }
        })
    }

    /// Fewest pieces for every count up to `limit`, by dynamic programming over all (NUM + 1) * 2^SCALE values.
    fn optimal_counts(limit: usize) -> Vec<u32> {
        let mut coins: Vec<usize> = (0..=31u32)
            .flat_map(|scale| (1..=32usize).map(move |multiple| multiple << scale))
            .filter(|&value| value <= limit)
            .collect();
        coins.sort_unstable();
        coins.dedup();
        let mut best = std::vec![u32::MAX; limit + 1];
        best[0] = 0;
        for total in 1..=limit {
            for &coin in coins.iter().take_while(|&&coin| coin <= total) {
                best[total] = best[total].min(best[total - coin].saturating_add(1));
            }
        }
        best
    }

    fn check_plan(address: u64, size: u64, granule: Granule, ttl: u8) {
        let pieces: Vec<RangePiece> = plan_range_invalidation(address, size, granule, ttl).unwrap().collect();
        let granules = size >> granule.log2();
        // The pieces tile the range exactly, in order.
        let mut next = address;
        let mut covered = 0u128;
        for piece in &pieces {
            assert_eq!(piece.address, next, "{pieces:?}");
            assert!(piece.size > 0);
            covered += u128::from(piece.size);
            next = next.wrapping_add(piece.size);
            // Every piece encodes, as a VA and (when in range) an IPA invalidation, and says what it covers.
            let command = Command::TlbiNhVa {
                vmid: 1,
                asid: 2,
                address: piece.address,
                leaf: true,
                range: piece.range,
            };
            command.encode().unwrap_or_else(|error| panic!("{piece:?}: {error}"));
            if piece.address < (1 << 56) {
                let command = Command::TlbiS2Ipa {
                    vmid: 1,
                    address: piece.address,
                    leaf: false,
                    range: piece.range,
                };
                command.encode().unwrap_or_else(|error| panic!("{piece:?}: {error}"));
            }
            match piece.range {
                Some(range) => {
                    assert_eq!(range.size(), Some(piece.size));
                    assert_eq!((range.granule, range.ttl), (granule, ttl));
                }
                None => assert_eq!((piece.size, ttl), (granule.size(), 0)),
            }
        }
        assert_eq!(covered, u128::from(size));
        // No two neighbours could have been one command.
        for pair in pieces.windows(2) {
            let merged = (pair[0].size + pair[1].size) >> granule.log2();
            assert!(!single_piece(merged), "{pair:?} could be merged");
        }
        assert!(
            pieces.len() as u64 <= RangePlan::max_pieces(granules),
            "{} pieces for {granules}",
            pieces.len()
        );
        assert!(pieces.len() as u64 <= 8 + granules / MAX_RANGE_GRANULES);
    }

    #[test]
    fn plan_is_optimal_for_every_small_count() {
        let limit = 1 << 14;
        let best = optimal_counts(limit);
        for granules in 1..=limit as u64 {
            let plan = plan_range_invalidation(0x8000_0000, granules << 12, Granule::Size4K, 0).unwrap();
            let count = plan.count() as u32;
            assert_eq!(count, best[granules as usize], "{granules} granules");
        }
        // The model agrees with single_piece.
        for (granules, &count) in best.iter().enumerate().skip(1) {
            assert_eq!(count == 1, single_piece(granules as u64), "{granules}");
        }
    }

    #[test]
    fn plan_examples() {
        // One granule without a hint: a plain invalidation.
        let pieces: Vec<_> = plan_range_invalidation(0x1000, 0x1000, Granule::Size4K, 0)
            .unwrap()
            .collect();
        assert_eq!(
            pieces,
            [RangePiece {
                address: 0x1000,
                size: 0x1000,
                range: None
            }]
        );
        // With a hint, the single granule is a range command.
        let pieces: Vec<_> = plan_range_invalidation(0x1000, 0x1000, Granule::Size4K, 3)
            .unwrap()
            .collect();
        let range = tlbi_range(0, 0, Granule::Size4K, 3);
        assert_eq!(
            pieces,
            [RangePiece {
                address: 0x1000,
                size: 0x1000,
                range: Some(range)
            }]
        );
        // 33 granules: 1 then 32 (NUM 0, SCALE 5).
        let pieces: Vec<_> = plan_range_invalidation(0, 33 << 12, Granule::Size4K, 0)
            .unwrap()
            .collect();
        let range = tlbi_range(0, 5, Granule::Size4K, 0);
        assert_eq!(
            pieces,
            [
                RangePiece {
                    address: 0,
                    size: 0x1000,
                    range: None
                },
                RangePiece {
                    address: 0x1000,
                    size: 32 << 12,
                    range: Some(range)
                },
            ]
        );
        // A whole 48-bit space of 4K pages is one command (NUM 31, SCALE 31).
        let pieces: Vec<_> = plan_range_invalidation(0, 1 << 48, Granule::Size4K, 0)
            .unwrap()
            .collect();
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0].range, Some(tlbi_range(31, 31, Granule::Size4K, 0)));
        // Empty.
        assert_eq!(plan_range_invalidation(0, 0, Granule::Size64K, 0).unwrap().count(), 0);
        // Ending exactly at 2^64 is allowed.
        let pieces: Vec<_> = plan_range_invalidation(0xffff_ffff_ffff_e000, 0x2000, Granule::Size4K, 0)
            .unwrap()
            .collect();
        assert_eq!(pieces.len(), 1);
    }

    #[test]
    fn plan_errors() {
        assert_eq!(
            plan_range_invalidation(0x800, 0x1000, Granule::Size4K, 0),
            Err(CommandError::MisalignedAddress {
                address: 0x800,
                alignment: 0x1000
            })
        );
        assert_eq!(
            plan_range_invalidation(0x1000, 0x1800, Granule::Size4K, 0),
            Err(CommandError::MisalignedSize {
                size: 0x1800,
                alignment: 0x1000
            })
        );
        assert_eq!(
            plan_range_invalidation(0x20_0000, 0x1000, Granule::Size4K, 2),
            Err(CommandError::MisalignedSize {
                size: 0x1000,
                alignment: 0x20_0000
            })
        );
        assert_eq!(
            plan_range_invalidation(0x4000, 0x4000, Granule::Size16K, 1),
            Err(CommandError::ReservedTtl {
                granule: Granule::Size16K,
                ttl: 1
            })
        );
        assert_eq!(
            plan_range_invalidation(0, 0x1000, Granule::Size4K, 4),
            Err(CommandError::TtlTooLarge { ttl: 4 })
        );
        assert_eq!(
            plan_range_invalidation(0xffff_ffff_ffff_f000, 0x2000, Granule::Size4K, 0),
            Err(CommandError::RangeWrapsAround {
                address: 0xffff_ffff_ffff_f000,
                size: 0x2000
            })
        );
    }

    #[test]
    fn plan_max_pieces() {
        assert_eq!(RangePlan::max_pieces(0), 0);
        assert_eq!(RangePlan::max_pieces(1), 1);
        assert_eq!(RangePlan::max_pieces(0b11111), 1);
        assert_eq!(RangePlan::max_pieces(0b100001), 2);
        assert_eq!(RangePlan::max_pieces(MAX_RANGE_GRANULES - 1), 8);
        assert_eq!(RangePlan::max_pieces(MAX_RANGE_GRANULES), 1);
        assert_eq!(RangePlan::max_pieces(3 * MAX_RANGE_GRANULES + 1), 4);
        // The worst case is reached: 2^36 - 1 granules needs 8 commands.
        let plan = plan_range_invalidation(0, (MAX_RANGE_GRANULES - 1) << 12, Granule::Size4K, 0).unwrap();
        assert_eq!(plan.count(), 8);
    }

    /// What `ActiveSmmu::submit` lets code outside the driver queue: every opcode [`Command`] models, CMD_SYNC only
    /// with a completion that writes nothing. Checked over all 256 opcodes, with the CS and MSIAddress bits taken
    /// from IHI 0070 (CS [13:12]; MSIAddress [119:66]), not from the constants above.
    #[test]
    fn vetting_passes_only_invalidations_prefetches_and_syncs_that_write_nothing() {
        let modelled = [
            0x01, 0x03, 0x04, 0x05, 0x06, 0x10, 0x11, 0x12, 0x13, 0x20, 0x21, 0x22, 0x23, 0x28, 0x2a, 0x30,
        ];
        for op in 0..=255u8 {
            let words = [u64::from(op) | 0xffff_ffff << 32, u64::MAX];
            let expected = match op {
                _ if modelled.contains(&op) => Ok(()),
                // CS = 0b00 written in word 0 above (bits [13:12] clear): SIG_NONE, whatever word 1 holds.
                0x46 => Ok(()),
                _ => Err(Unvetted::Unmodelled { opcode: op }),
            };
            assert_eq!(vet(&words), expected, "opcode {op:#04x}");
        }
        // Every command the driver builds passes, as it encodes it.
        let address = 0x8000_1000;
        let range = Some(RANGE_4K_L3);
        for command in [
            Command::PrefetchConfig { sid: 1, ssid: Some(2) },
            Command::CfgiSte { sid: 3, leaf: true },
            Command::CfgiSteRange { sid: 0, range: 5 },
            Command::CfgiAll,
            Command::CfgiCd {
                sid: 3,
                ssid: 1,
                leaf: false,
            },
            Command::CfgiCdAll { sid: 3 },
            Command::TlbiNhAll { vmid: 1 },
            Command::TlbiNhAsid { vmid: 1, asid: 2 },
            Command::TlbiNhVa {
                vmid: 1,
                asid: 2,
                address,
                leaf: true,
                range,
            },
            Command::TlbiNhVaa {
                vmid: 1,
                address,
                leaf: false,
                range: None,
            },
            Command::TlbiEl2All,
            Command::TlbiEl2Asid { asid: 2 },
            Command::TlbiEl2Va {
                asid: 0,
                address,
                leaf: true,
                range,
            },
            Command::TlbiEl2Vaa {
                address,
                leaf: true,
                range: None,
            },
            Command::TlbiS12Vmall { vmid: 1 },
            Command::TlbiS2Ipa {
                vmid: 1,
                address,
                leaf: true,
                range,
            },
            Command::TlbiNsnhAll,
            Command::Sync {
                completion: SyncCompletion::None,
            },
            Command::Sync {
                completion: SyncCompletion::Irq,
            },
            Command::Sync {
                completion: SyncCompletion::Sev,
            },
        ] {
            assert_eq!(vet(&enc(command)), Ok(()), "{command:?}");
        }
        // A CMD_SYNC whose MSI writes memory, however it was built.
        let msi = enc(Command::Sync {
            completion: SyncCompletion::Msi {
                address,
                data: 0x4000_0003,
                shareability: Shareability::InnerShareable,
                attributes: 0xf,
            },
        });
        assert_eq!(vet(&msi), Err(Unvetted::MsiWrite { address }));
        let sig_irq = 0x46 | 0b01 << 12;
        assert_eq!(vet(&[sig_irq, 1 << 55]), Err(Unvetted::MsiWrite { address: 1 << 55 }));
        assert_eq!(vet(&[sig_irq, 0b100]), Err(Unvetted::MsiWrite { address: 0b100 }));
        // SIG_IRQ without an MSI address (bits [65:64] and [127:120] are not part of it), SIG_SEV, and the
        // reserved CS.
        assert_eq!(vet(&[sig_irq, 0xff00_0000_0000_0003]), Ok(()));
        assert_eq!(vet(&[0x46 | 0b10 << 12, u64::MAX]), Ok(()));
        assert_eq!(vet(&[0x46 | 0b11 << 12, 0]), Err(Unvetted::ReservedCompletion));
        assert_eq!(
            Unvetted::Unmodelled { opcode: 0x7f }.to_string(),
            "opcode 0x7f, reserved"
        );
        assert_eq!(
            Unvetted::Unmodelled { opcode: 0x40 }.to_string(),
            "CMD_ATC_INV (0x40), which the driver does not model"
        );
    }

    fn granule_strategy() -> impl Strategy<Value = Granule> {
        prop_oneof![Just(Granule::Size4K), Just(Granule::Size16K), Just(Granule::Size64K)]
    }

    proptest! {
        #[test]
        fn plan_tiles_and_encodes(
            granule in granule_strategy(),
            ttl in 0u8..=3,
            start in any::<u64>(),
            granules in prop_oneof![0u64..1 << 12, 0u64..1 << 40, any::<u64>()],
        ) {
            let Some(alignment_log2) = granule.ttl_alignment_log2(ttl) else {
                prop_assert_eq!(
                    plan_range_invalidation(0, 0, granule, ttl),
                    Err(CommandError::ReservedTtl { granule, ttl })
                );
                return Ok(());
            };
            // A size in whole leaf entries, and a start that leaves room for it below 2^64.
            let mask = !((1u64 << alignment_log2) - 1);
            let size = (granules << granule.log2()) & mask;
            let start = start & mask;
            let address = if size == 0 { start } else { start.min(0u64.wrapping_sub(size)) };
            check_plan(address, size, granule, ttl);
        }
    }
}
