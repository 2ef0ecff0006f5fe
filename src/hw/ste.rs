//! Stream Table Entries (IHI 0070, "STE, Stream Table Entry"): 64 bytes, pure builders for abort, bypass,
//! stage 1, stage 2 and nested, the bits the SMMU reads for each, and the level-1 stream table descriptor.
//! Fields are named by the qword they live in (`Q0_CONFIG` is in bits \[3:1\] of qword 0).

use core::fmt;

use crate::hitless::UsedBits;
use crate::mem::PhysAddr;

/// V: the entry is valid.
pub const Q0_V: u64 = 1 << 0;
/// Config, bits \[3:1\].
pub const Q0_CONFIG: u64 = 0b111 << 1;
/// S1Fmt, bits \[5:4\]: CD table format.
pub const Q0_S1FMT: u64 = 0b11 << 4;
/// S1ContextPtr, bits \[51:6\].
pub const Q0_S1CONTEXTPTR: u64 = ((1 << 52) - 1) & !0x3f;
/// S1CDMax, bits \[63:59\]: log2 of the number of CDs.
pub const Q0_S1CDMAX: u64 = 0b11111 << 59;
/// S1DSS, bits \[1:0\]: what happens to transactions without a SubstreamID.
pub const Q1_S1DSS: u64 = 0b11;
/// S1CIR, bits \[3:2\]: inner cacheability of CD and stage-1 table fetches.
pub const Q1_S1CIR: u64 = 0b11 << 2;
/// S1COR, bits \[5:4\]: outer cacheability.
pub const Q1_S1COR: u64 = 0b11 << 4;
/// S1CSH, bits \[7:6\]: shareability.
pub const Q1_S1CSH: u64 = 0b11 << 6;
/// S1STALLD, bit 27: stall disable.
pub const Q1_S1STALLD: u64 = 1 << 27;
/// EATS, bits \[29:28\]: ATS.
pub const Q1_EATS: u64 = 0b11 << 28;
/// STRW, bits \[31:30\]: StreamWorld.
pub const Q1_STRW: u64 = 0b11 << 30;
/// SHCFG, bits \[45:44\]: shareability override.
pub const Q1_SHCFG: u64 = 0b11 << 44;
/// S2VMID, bits \[15:0\].
pub const Q2_S2VMID: u64 = 0xffff;
/// S2T0SZ, bits \[37:32\].
pub const Q2_S2T0SZ: u64 = 0x3f << 32;
/// S2SL0, bits \[39:38\].
pub const Q2_S2SL0: u64 = 0b11 << 38;
/// S2IR0, bits \[41:40\].
pub const Q2_S2IR0: u64 = 0b11 << 40;
/// S2OR0, bits \[43:42\].
pub const Q2_S2OR0: u64 = 0b11 << 42;
/// S2SH0, bits \[45:44\].
pub const Q2_S2SH0: u64 = 0b11 << 44;
/// S2TG, bits \[47:46\].
pub const Q2_S2TG: u64 = 0b11 << 46;
/// S2PS, bits \[50:48\].
pub const Q2_S2PS: u64 = 0b111 << 48;
/// S2AA64, bit 51.
pub const Q2_S2AA64: u64 = 1 << 51;
/// S2ENDI, bit 52.
pub const Q2_S2ENDI: u64 = 1 << 52;
/// S2AFFD, bit 53: access flag fault disable.
pub const Q2_S2AFFD: u64 = 1 << 53;
/// S2PTW, bit 54: protected table walk.
pub const Q2_S2PTW: u64 = 1 << 54;
/// S2HD, bit 55.
pub const Q2_S2HD: u64 = 1 << 55;
/// S2HA, bit 56.
pub const Q2_S2HA: u64 = 1 << 56;
/// S2S, bit 57: stall.
pub const Q2_S2S: u64 = 1 << 57;
/// S2R, bit 58: record faults.
pub const Q2_S2R: u64 = 1 << 58;
/// S2TTB, bits \[51:4\].
pub const Q3_S2TTB: u64 = ((1 << 52) - 1) & !0xf;
/// The stage-2 fields of qword 2 the SMMU reads when stage 2 translates.
const Q2_S2_FIELDS: u64 = Q2_S2VMID
    | Q2_S2T0SZ
    | Q2_S2SL0
    | Q2_S2IR0
    | Q2_S2OR0
    | Q2_S2SH0
    | Q2_S2TG
    | Q2_S2PS
    | Q2_S2AA64
    | Q2_S2ENDI
    | Q2_S2AFFD
    | Q2_S2PTW
    | Q2_S2HD
    | Q2_S2HA
    | Q2_S2S
    | Q2_S2R;

/// Level-1 stream table descriptor: Span, bits \[4:0\].
pub const L1_DESCRIPTOR_SPAN: u64 = 0x1f;
/// Level-1 stream table descriptor: L2Ptr, bits \[51:6\].
pub const L1_DESCRIPTOR_L2PTR_MASK: u64 = ((1 << 52) - 1) & !0x3f;

/// STE.Config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Config {
    /// The entry is invalid (V = 0): transactions abort with C_BAD_STE.
    Invalid,
    /// 0b000: abort every transaction, no event.
    Abort,
    /// 0b100: bypass both stages.
    Bypass,
    /// 0b101: stage 1 translates, stage 2 bypassed.
    Stage1,
    /// 0b110: stage 2 translates, stage 1 bypassed.
    Stage2,
    /// 0b111: both stages translate.
    Nested,
    /// A reserved encoding (0b001..0b011).
    Reserved(u8),
}

const CONFIG_ABORT: u64 = 0b000 << 1;
const CONFIG_BYPASS: u64 = 0b100 << 1;
const CONFIG_S1: u64 = 0b101 << 1;
const CONFIG_S2: u64 = 0b110 << 1;
const CONFIG_NESTED: u64 = 0b111 << 1;
/// SHCFG = 0b01: use the incoming shareability.
const SHCFG_INCOMING: u64 = 0b01 << 44;

/// SHCFG for "use incoming": 0b01 where the SMMU can override attributes (IDR1.ATTR_TYPES_OVR), else 0, as the
/// field is then RES0 and the incoming shareability is used anyway.
const fn shcfg_incoming(rules: &EntryRules) -> u64 {
    if rules.attribute_types_override {
        SHCFG_INCOMING
    } else {
        0
    }
}

/// Cacheability of the SMMU's fetches of CDs and tables (S1CIR/S1COR, S2IR0/S2OR0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cacheability {
    /// 0b00 non-cacheable.
    NonCacheable = 0,
    /// 0b01 write-back, read/write-allocate.
    WriteBackAllocate = 1,
    /// 0b10 write-through, read-allocate.
    WriteThrough = 2,
    /// 0b11 write-back, no write-allocate.
    WriteBack = 3,
}

/// Shareability (the SH encoding): of the SMMU's table fetches (S1CSH, S2SH0, the CD's SH0) and of a CMD_SYNC's
/// completion MSI (MSH).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shareability {
    /// 0b00 non-shareable.
    NonShareable = 0,
    /// 0b10 outer shareable.
    Outer = 2,
    /// 0b11 inner shareable.
    Inner = 3,
}

/// The attributes of the SMMU's table walks (STE S1CIR/S1COR/S1CSH, S2IR0/S2OR0/S2SH0, CD IRGN0/ORGN0/SH0) for an
/// SMMU whose accesses are coherent with the CPU caches (write-back, inner shareable) or not (non-cacheable, outer
/// shareable, as the architecture treats non-cacheable memory; the CPU then cleans what it writes).
pub fn walk_attributes(coherent: bool) -> (Cacheability, Shareability) {
    if coherent {
        (Cacheability::WriteBackAllocate, Shareability::Inner)
    } else {
        (Cacheability::NonCacheable, Shareability::Outer)
    }
}

/// STE.S1Fmt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CdTableLayout {
    /// 0b00: a linear array of `2^S1CDMax` CDs.
    Linear = 0,
    /// 0b01: 2-level, 4 KiB leaf tables (64 CDs each).
    TwoLevel4K = 1,
    /// 0b10: 2-level, 64 KiB leaf tables (1024 CDs each).
    TwoLevel64K = 2,
}

/// STE.S1DSS: transactions without a SubstreamID, when S1CDMax > 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultSubstream {
    /// 0b00: terminate them (F_STREAM_DISABLED).
    Terminate = 0,
    /// 0b01: bypass stage 1 for them.
    Bypass = 1,
    /// 0b10: translate them with CD 0 (and refuse SubstreamID 0).
    Substream0 = 2,
}

/// Translation granule of a stage-2 table: the crate's one [`Granule`] type, encoded into S2TG by
/// [`Granule::tg_field`].
pub use crate::hw::command::Granule;

/// The stage-1 part of an STE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stage1Config {
    /// The CD table (S1ContextPtr), 64-byte aligned.
    pub cd_table: PhysAddr,
    /// S1CDMax: log2 of the number of CDs (0: one CD, no substreams), at most 20.
    pub cd_max_log2: u8,
    /// S1Fmt.
    pub layout: CdTableLayout,
    /// S1DSS.
    pub default_substream: DefaultSubstream,
    /// S1CIR and S1COR.
    pub cacheability: Cacheability,
    /// S1CSH.
    pub shareability: Shareability,
    /// S1STALLD: forbid stalling for this stream (the device must not be stalled). Only an SMMU whose stall model
    /// is configurable ([`StallRule::Configurable`]) allows it; elsewhere it is ILLEGAL.
    pub stall_disable: bool,
    /// StreamWorld EL2 (STRW = 0b10) rather than NS-EL1 (0b00): the CDs hold EL2 contexts, whose TLB entries are
    /// invalidated with the TLBI_EL2_* commands. Needs IDR0.HYP ([`EntryRules::hyp`]).
    pub el2: bool,
}

/// The stage-2 part of an STE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stage2Config {
    /// S2VMID.
    pub vmid: u16,
    /// S2T0SZ: the IPA space is `2^(64 - t0sz)` bytes (16..=64 - 25 per the granule's limits; at most 63).
    pub t0sz: u8,
    /// S2SL0: starting level, encoded per the granule.
    pub sl0: u8,
    /// S2TG.
    pub granule: Granule,
    /// S2PS: output size encoding (0 = 32 bits .. 6 = 52 bits).
    pub ps: u8,
    /// S2IR0 and S2OR0.
    pub cacheability: Cacheability,
    /// S2SH0.
    pub shareability: Shareability,
    /// The stage-2 translation table (S2TTB), 16-byte aligned at least (aligned to the table size in practice).
    pub table: PhysAddr,
    /// S2AFFD: do not fault on a clear access flag.
    pub access_flag_fault_disable: bool,
    /// S2PTW: stage-1 walks that hit Device memory at stage 2 fault.
    pub protected_table_walk: bool,
    /// S2S: stall on faults. Must be 1 when the SMMU forces stalling, 0 when it cannot stall.
    pub stall: bool,
    /// S2R: record faults in the event queue.
    pub record_faults: bool,
}

/// Whether and how the SMMU stalls faulting transactions (IDR0.STALL_MODEL), as it constrains CD.S, STE.S2S and
/// STE.S1STALLD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StallRule {
    /// STALL_MODEL 0b00: stalling is chosen per context (CD.S, STE.S2S) and may be disabled per stream (S1STALLD).
    Configurable,
    /// STALL_MODEL 0b01: the SMMU never stalls; CD.S, STE.S2S and STE.S1STALLD must be 0.
    Never,
    /// STALL_MODEL 0b10: stalling is forced; CD.S = 0 and STE.S2S = 0 are ILLEGAL, and so is STE.S1STALLD = 1.
    Forced,
}

/// What an SMMU's ID registers allow in the STEs and CDs built for it. [`crate::Features::entry_rules`] derives
/// it; every builder of a valid translating entry takes it, so that no entry carries a field the SMMU treats as
/// RES0 or ILLEGAL (an SMMU may report a non-zero RES0 field as C_BAD_STE / C_BAD_CD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryRules {
    /// IDR1.ATTR_TYPES_OVR: STE.SHCFG may be written; without it SHCFG is RES0 and incoming shareability is used.
    pub attribute_types_override: bool,
    /// IDR0.HYP: the EL2 StreamWorld (STE.STRW = 0b10) exists.
    pub hyp: bool,
    /// IDR0.STALL_MODEL.
    pub stall: StallRule,
    /// IDR0.TERM_MODEL = 1: terminated transactions always abort, so CD.A must be 1.
    pub terminate_always_aborts: bool,
}

/// The ID register rule an entry would break.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// IDR0.HYP = 0: there is no EL2 StreamWorld.
    NoHyp,
    /// IDR0.STALL_MODEL = 0b01: the SMMU cannot stall.
    StallNotSupported,
    /// IDR0.STALL_MODEL = 0b10: stalling is forced.
    StallForced,
    /// IDR0.TERM_MODEL = 1: terminated transactions always abort.
    TerminateAlwaysAborts,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rule::NoHyp => "the SMMU has no EL2 StreamWorld (IDR0.HYP = 0)",
            Rule::StallNotSupported => "the SMMU cannot stall (IDR0.STALL_MODEL = 0b01)",
            Rule::StallForced => "the SMMU forces stalling (IDR0.STALL_MODEL = 0b10)",
            Rule::TerminateAlwaysAborts => "terminated transactions always abort (IDR0.TERM_MODEL = 1)",
        })
    }
}

/// Checks the stall fields of an entry against `rules`: `stall` is CD.S or STE.S2S, named `field`.
pub(crate) fn check_stall(field: &'static str, stall: bool, rules: &EntryRules) -> Result<(), EntryError> {
    match (rules.stall, stall) {
        (StallRule::Never, true) => Err(EntryError::Forbidden {
            field,
            value: 1,
            rule: Rule::StallNotSupported,
        }),
        (StallRule::Forced, false) => Err(EntryError::Forbidden {
            field,
            value: 0,
            rule: Rule::StallForced,
        }),
        _ => Ok(()),
    }
}

/// Why an entry cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EntryError {
    /// An address is not aligned as its field requires.
    Misaligned {
        /// The field.
        field: &'static str,
        /// The address.
        address: u64,
        /// Required alignment in bytes.
        alignment: u64,
    },
    /// An address is beyond the field's 52 bits.
    AddressTooWide {
        /// The field.
        field: &'static str,
        /// The address.
        address: u64,
    },
    /// A value is outside its field's range.
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The value.
        value: u64,
        /// The largest legal value.
        max: u64,
    },
    /// The SMMU's ID registers make this field value ILLEGAL (or the field RES0).
    Forbidden {
        /// The field.
        field: &'static str,
        /// The value asked for.
        value: u64,
        /// The rule it breaks.
        rule: Rule,
    },
}

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryError::Misaligned {
                field,
                address,
                alignment,
            } => {
                write!(f, "{field} address {address:#x} is not {alignment}-byte aligned")
            }
            EntryError::AddressTooWide { field, address } => write!(f, "{field} address {address:#x} exceeds 52 bits"),
            EntryError::OutOfRange { field, value, max } => write!(f, "{field} = {value} exceeds its maximum {max}"),
            EntryError::Forbidden { field, value, rule } => write!(f, "{field} = {value} is not allowed: {rule}"),
        }
    }
}

pub(crate) fn check_address(field: &'static str, address: u64, alignment: u64) -> Result<u64, EntryError> {
    if address & (alignment - 1) != 0 {
        return Err(EntryError::Misaligned {
            field,
            address,
            alignment,
        });
    }
    if address >> 52 != 0 {
        return Err(EntryError::AddressTooWide { field, address });
    }
    Ok(address)
}

pub(crate) fn check_range(field: &'static str, value: u64, max: u64) -> Result<u64, EntryError> {
    if value > max {
        return Err(EntryError::OutOfRange { field, value, max });
    }
    Ok(value)
}

/// A Stream Table Entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ste(pub [u64; 8]);

impl Ste {
    /// An invalid entry (V = 0): transactions abort and record C_BAD_STE.
    pub const fn invalid() -> Self {
        Ste([0; 8])
    }

    /// Aborts every transaction without recording an event.
    pub const fn abort() -> Self {
        Ste([Q0_V | CONFIG_ABORT, 0, 0, 0, 0, 0, 0, 0])
    }

    /// Lets every transaction through untranslated with its incoming attributes: SHCFG = 0b01 (use incoming) where
    /// the SMMU has IDR1.ATTR_TYPES_OVR, else 0 (RES0, and incoming shareability is used anyway).
    pub const fn bypass_for(rules: &EntryRules) -> Self {
        Ste([Q0_V | CONFIG_BYPASS, shcfg_incoming(rules), 0, 0, 0, 0, 0, 0])
    }

    fn stage1_words(s1: &Stage1Config, rules: &EntryRules, words: &mut [u64; 8]) -> Result<(), EntryError> {
        let pointer = check_address("S1ContextPtr", s1.cd_table.0, 64)?;
        let cd_max = check_range("S1CDMax", u64::from(s1.cd_max_log2), 20)?;
        if s1.el2 && !rules.hyp {
            return Err(EntryError::Forbidden {
                field: "STRW",
                value: 0b10,
                rule: Rule::NoHyp,
            });
        }
        if s1.stall_disable && rules.stall != StallRule::Configurable {
            return Err(EntryError::Forbidden {
                field: "S1STALLD",
                value: 1,
                rule: if rules.stall == StallRule::Forced {
                    Rule::StallForced
                } else {
                    Rule::StallNotSupported
                },
            });
        }
        words[0] |= (s1.layout as u64) << 4 | pointer | cd_max << 59;
        words[1] |= s1.default_substream as u64
            | (s1.cacheability as u64) << 2
            | (s1.cacheability as u64) << 4
            | (s1.shareability as u64) << 6
            | if s1.stall_disable { Q1_S1STALLD } else { 0 }
            | if s1.el2 { 0b10 << 30 } else { 0 };
        Ok(())
    }

    fn stage2_words(s2: &Stage2Config, rules: &EntryRules, words: &mut [u64; 8]) -> Result<(), EntryError> {
        let t0sz = check_range("S2T0SZ", u64::from(s2.t0sz), 63)?;
        check_stall("S2S", s2.stall, rules)?;
        let sl0 = check_range("S2SL0", u64::from(s2.sl0), 3)?;
        let ps = check_range("S2PS", u64::from(s2.ps), 6)?;
        let table = check_address("S2TTB", s2.table.0, 16)?;
        // S2AA64 is always 1: this driver writes only AArch64 tables (and QEMU asserts on 0).
        words[2] |= u64::from(s2.vmid)
            | t0sz << 32
            | sl0 << 38
            | (s2.cacheability as u64) << 40
            | (s2.cacheability as u64) << 42
            | (s2.shareability as u64) << 44
            | s2.granule.tg_field() << 46
            | ps << 48
            | Q2_S2AA64
            | if s2.access_flag_fault_disable { Q2_S2AFFD } else { 0 }
            | if s2.protected_table_walk { Q2_S2PTW } else { 0 }
            | if s2.stall { Q2_S2S } else { 0 }
            | if s2.record_faults { Q2_S2R } else { 0 };
        words[3] = table;
        Ok(())
    }

    /// Stage 1 translates through the CD table; stage 2 is bypassed. SHCFG (read only for the substream-less
    /// transactions S1DSS bypasses) is "use incoming" where `rules` allow it, else 0.
    ///
    /// # Errors
    /// [`EntryError`] for a misaligned or too wide CD table pointer or S1CDMax > 20;
    /// [`EntryError::Forbidden`] for `el2` without IDR0.HYP, or `stall_disable` on an SMMU whose stall model is
    /// not configurable.
    pub fn stage1(s1: &Stage1Config, rules: &EntryRules) -> Result<Self, EntryError> {
        let mut words = [Q0_V | CONFIG_S1, 0, 0, 0, 0, 0, 0, 0];
        Self::stage1_words(s1, rules, &mut words)?;
        if s1.default_substream == DefaultSubstream::Bypass {
            words[1] |= shcfg_incoming(rules);
        }
        Ok(Ste(words))
    }

    /// Stage 2 translates; stage 1 is bypassed. SHCFG = use incoming where `rules` allow it, else 0.
    ///
    /// # Errors
    /// [`EntryError`] for a field out of range or a misaligned/too wide table address;
    /// [`EntryError::Forbidden`] for S2S = 1 on an SMMU that cannot stall, or S2S = 0 on one that forces stalling.
    pub fn stage2(s2: &Stage2Config, rules: &EntryRules) -> Result<Self, EntryError> {
        let mut words = [Q0_V | CONFIG_S2, shcfg_incoming(rules), 0, 0, 0, 0, 0, 0];
        Self::stage2_words(s2, rules, &mut words)?;
        Ok(Ste(words))
    }

    /// Both stages translate: the CD table's and stage-1 tables' addresses are IPAs translated by stage 2.
    ///
    /// # Errors
    /// As [`Ste::stage1`] and [`Ste::stage2`].
    pub fn nested(s1: &Stage1Config, s2: &Stage2Config, rules: &EntryRules) -> Result<Self, EntryError> {
        let mut words = [Q0_V | CONFIG_NESTED, shcfg_incoming(rules), 0, 0, 0, 0, 0, 0];
        Self::stage1_words(s1, rules, &mut words)?;
        Self::stage2_words(s2, rules, &mut words)?;
        Ok(Ste(words))
    }

    /// The configuration this entry selects.
    pub fn config(&self) -> Config {
        if self.0[0] & Q0_V == 0 {
            return Config::Invalid;
        }
        match ((self.0[0] & Q0_CONFIG) >> 1) as u8 {
            0b000 => Config::Abort,
            0b100 => Config::Bypass,
            0b101 => Config::Stage1,
            0b110 => Config::Stage2,
            0b111 => Config::Nested,
            other => Config::Reserved(other),
        }
    }

    /// S2VMID.
    pub fn vmid(&self) -> u16 {
        (self.0[2] & Q2_S2VMID) as u16
    }

    /// S1ContextPtr.
    pub fn cd_table(&self) -> PhysAddr {
        PhysAddr(self.0[0] & Q0_S1CONTEXTPTR)
    }

    /// S2TTB.
    pub fn s2_table(&self) -> PhysAddr {
        PhysAddr(self.0[3] & Q3_S2TTB)
    }
}

impl UsedBits for Ste {
    const VALID: u64 = Q0_V;

    fn used_bits(words: &[u64; 8]) -> [u64; 8] {
        let mut used = [0u64; 8];
        used[0] = Q0_V;
        if words[0] & Q0_V == 0 {
            return used;
        }
        used[0] |= Q0_CONFIG;
        let config = (words[0] & Q0_CONFIG) >> 1;
        if config & 0b100 == 0 {
            // Abort (and the reserved encodings, which the SMMU treats as illegal): nothing else is read.
            return used;
        }
        if config == 0b100 {
            used[1] |= Q1_SHCFG;
        }
        if config & 0b001 != 0 {
            // Stage 1 translates.
            used[0] |= Q0_S1FMT | Q0_S1CONTEXTPTR | Q0_S1CDMAX;
            used[1] |= Q1_S1DSS | Q1_S1CIR | Q1_S1COR | Q1_S1CSH | Q1_S1STALLD | Q1_STRW | Q1_EATS;
            // The VMID tags stage-1 TLB entries even without stage 2.
            used[2] |= Q2_S2VMID;
            if words[1] & Q1_S1DSS == DefaultSubstream::Bypass as u64 {
                used[1] |= Q1_SHCFG;
            }
        }
        if config & 0b010 != 0 {
            // Stage 2 translates.
            used[1] |= Q1_EATS | Q1_SHCFG;
            used[2] |= Q2_S2_FIELDS;
            used[3] |= Q3_S2TTB;
        }
        used
    }
}

/// Encodes a level-1 stream table descriptor pointing to a level-2 table of `2^(span - 1)` STEs.
///
/// # Errors
/// [`EntryError::OutOfRange`] for a span above 12 (the architecture's largest), [`EntryError::Misaligned`] when
/// the table is not aligned to its size (at least 64 bytes), [`EntryError::AddressTooWide`].
pub fn l1_descriptor(l2_table: PhysAddr, span: u8) -> Result<u64, EntryError> {
    let span = check_range("Span", u64::from(span), 12)?;
    let alignment = if span == 0 { 64 } else { (64u64 << (span - 1)).max(64) };
    let address = check_address("L2Ptr", l2_table.0, alignment)?;
    Ok(address | span)
}

/// Rules of an SMMU that allows every field the builders can write, for host tests of the encodings.
#[cfg(test)]
pub(crate) const EXAMPLE_RULES: EntryRules = EntryRules {
    attribute_types_override: true,
    hyp: true,
    stall: StallRule::Configurable,
    terminate_always_aborts: false,
};

/// A stage-1 configuration for host tests.
#[cfg(test)]
pub(crate) const EXAMPLE_S1: Stage1Config = Stage1Config {
    cd_table: PhysAddr(0x4123_4000),
    cd_max_log2: 0,
    layout: CdTableLayout::Linear,
    default_substream: DefaultSubstream::Terminate,
    cacheability: Cacheability::WriteBackAllocate,
    shareability: Shareability::Inner,
    stall_disable: true,
    el2: false,
};

/// A stage-2 configuration for host tests.
#[cfg(test)]
pub(crate) const EXAMPLE_S2: Stage2Config = Stage2Config {
    vmid: 0x1234,
    t0sz: 24,
    sl0: 1,
    granule: Granule::Size4K,
    ps: 4,
    cacheability: Cacheability::WriteBackAllocate,
    shareability: Shareability::Inner,
    table: PhysAddr(0x4567_8000),
    access_flag_fault_disable: false,
    protected_table_walk: true,
    stall: false,
    record_faults: true,
};

#[cfg(test)]
mod tests {
    use super::*;

    const S1: Stage1Config = EXAMPLE_S1;
    const S2: Stage2Config = EXAMPLE_S2;

    #[test]
    fn walk_attributes_follow_coherency() {
        // Encodings of S1CIR/S1COR (0b01 WBRA, 0b00 NC) and S1CSH (0b11 inner, 0b10 outer).
        let (c, sh) = walk_attributes(true);
        assert_eq!((c as u8, sh as u8), (0b01, 0b11));
        let (c, sh) = walk_attributes(false);
        assert_eq!((c as u8, sh as u8), (0b00, 0b10));
    }

    #[test]
    fn abort_and_bypass_words() {
        // Config 0b000 in bits [3:1] with V; bypass Config 0b100 = 0x8 | V, SHCFG = 0b01 at [45:44].
        assert_eq!(Ste::abort().0, [0x1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            Ste::bypass_for(&EXAMPLE_RULES).0,
            [0x9, 0x1000_0000_0000, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(Ste::invalid().config(), Config::Invalid);
        assert_eq!(Ste::abort().config(), Config::Abort);
        assert_eq!(Ste::bypass_for(&EXAMPLE_RULES).config(), Config::Bypass);
    }

    #[test]
    fn stage1_words() {
        let ste = Ste::stage1(&S1, &crate::hw::ste::EXAMPLE_RULES).unwrap();
        // V | Config 0b101 (0xa) | S1Fmt 0 | S1ContextPtr; S1DSS 0, S1CIR 01 [3:2], S1COR 01 [5:4], S1CSH 11 [7:6],
        // S1STALLD bit 27.
        assert_eq!(ste.0[0], 0x4123_4000 | 0xa | 1);
        assert_eq!(ste.0[1], 0b01 << 2 | 0b01 << 4 | 0b11 << 6 | 1 << 27);
        assert_eq!(&ste.0[2..], &[0; 6]);
        assert_eq!(ste.config(), Config::Stage1);
        assert_eq!(ste.cd_table(), PhysAddr(0x4123_4000));
        let el2 = Ste::stage1(
            &Stage1Config {
                el2: true,
                cd_max_log2: 20,
                ..S1
            },
            &crate::hw::ste::EXAMPLE_RULES,
        )
        .unwrap();
        assert_eq!(el2.0[1] >> 30 & 0b11, 0b10);
        assert_eq!(el2.0[0] >> 59, 20);
    }

    #[test]
    fn s2tg_encodes_each_granule() {
        // S2TG, bits [47:46] of word 2: 0b00 4 KiB, 0b01 64 KiB, 0b10 16 KiB.
        for (granule, s2tg) in [
            (Granule::Size4K, 0b00),
            (Granule::Size64K, 0b01),
            (Granule::Size16K, 0b10),
        ] {
            let ste = Ste::stage2(&Stage2Config { granule, ..S2 }, &crate::hw::ste::EXAMPLE_RULES).unwrap();
            assert_eq!((ste.0[2] & Q2_S2TG) >> 46, s2tg, "{granule:?}");
        }
    }

    #[test]
    fn stage2_words() {
        let ste = Ste::stage2(&S2, &crate::hw::ste::EXAMPLE_RULES).unwrap();
        assert_eq!(ste.0[0], 0b110 << 1 | 1);
        assert_eq!(ste.0[1], 0b01 << 44);
        // VMID [15:0], T0SZ 24 at [37:32], SL0 1 at [39:38], IR0/OR0 01 at [41:40]/[43:42], SH0 11 at [45:44],
        // TG 00, PS 4 at [50:48], AA64 bit 51, PTW bit 54, R bit 58.
        let expected = 0x1234
            | 24u64 << 32
            | 1 << 38
            | 0b01 << 40
            | 0b01 << 42
            | 0b11 << 44
            | 4 << 48
            | 1 << 51
            | 1 << 54
            | 1 << 58;
        assert_eq!(ste.0[2], expected);
        assert_eq!(ste.0[3], 0x4567_8000);
        assert_eq!((ste.vmid(), ste.s2_table()), (0x1234, PhysAddr(0x4567_8000)));
    }

    #[test]
    fn nested_has_both_stages() {
        let ste = Ste::nested(&S1, &S2, &crate::hw::ste::EXAMPLE_RULES).unwrap();
        let s1 = Ste::stage1(&S1, &crate::hw::ste::EXAMPLE_RULES).unwrap();
        let s2 = Ste::stage2(&S2, &crate::hw::ste::EXAMPLE_RULES).unwrap();
        assert_eq!(ste.config(), Config::Nested);
        assert_eq!(ste.0[0], (s1.0[0] & !Q0_CONFIG) | 0b111 << 1);
        assert_eq!(ste.0[1], s1.0[1] | s2.0[1]);
        assert_eq!(&ste.0[2..4], &s2.0[2..4]);
    }

    #[test]
    fn bad_fields_are_refused() {
        let misaligned = Stage1Config {
            cd_table: PhysAddr(0x4123_4020),
            ..S1
        };
        assert_eq!(
            Ste::stage1(&misaligned, &crate::hw::ste::EXAMPLE_RULES),
            Err(EntryError::Misaligned {
                field: "S1ContextPtr",
                address: 0x4123_4020,
                alignment: 64
            })
        );
        let wide = Stage2Config {
            table: PhysAddr(1 << 52),
            ..S2
        };
        assert_eq!(
            Ste::stage2(&wide, &crate::hw::ste::EXAMPLE_RULES),
            Err(EntryError::AddressTooWide {
                field: "S2TTB",
                address: 1 << 52
            })
        );
        assert_eq!(
            Ste::stage2(&Stage2Config { t0sz: 64, ..S2 }, &crate::hw::ste::EXAMPLE_RULES),
            Err(EntryError::OutOfRange {
                field: "S2T0SZ",
                value: 64,
                max: 63
            })
        );
        assert_eq!(
            Ste::stage1(&Stage1Config { cd_max_log2: 21, ..S1 }, &crate::hw::ste::EXAMPLE_RULES),
            Err(EntryError::OutOfRange {
                field: "S1CDMax",
                value: 21,
                max: 20
            })
        );
    }

    #[test]
    fn used_bits_follow_the_config() {
        assert_eq!(Ste::used_bits(&Ste::invalid().0), [1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(Ste::used_bits(&Ste::abort().0), [0xf, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            Ste::used_bits(&Ste::bypass_for(&EXAMPLE_RULES).0),
            [0xf, Q1_SHCFG, 0, 0, 0, 0, 0, 0]
        );
        let s1 = Ste::used_bits(&Ste::stage1(&S1, &crate::hw::ste::EXAMPLE_RULES).unwrap().0);
        assert_eq!(s1[0], 0xf | Q0_S1FMT | Q0_S1CONTEXTPTR | Q0_S1CDMAX);
        assert_eq!(s1[1] & Q1_SHCFG, 0, "SHCFG unused unless S1DSS bypasses");
        assert_eq!((s1[2], s1[3]), (Q2_S2VMID, 0));
        let s1_dss = Ste::stage1(
            &Stage1Config {
                default_substream: DefaultSubstream::Bypass,
                ..S1
            },
            &crate::hw::ste::EXAMPLE_RULES,
        )
        .unwrap();
        assert_ne!(Ste::used_bits(&s1_dss.0)[1] & Q1_SHCFG, 0);
        let s2 = Ste::used_bits(&Ste::stage2(&S2, &crate::hw::ste::EXAMPLE_RULES).unwrap().0);
        assert_eq!(s2[0], 0xf);
        assert_eq!((s2[2], s2[3]), (Q2_S2_FIELDS, Q3_S2TTB));
        // Every bit a builder sets is a bit the SMMU reads.
        for ste in [
            Ste::abort(),
            Ste::bypass_for(&EXAMPLE_RULES),
            Ste::stage1(&S1, &crate::hw::ste::EXAMPLE_RULES).unwrap(),
            Ste::stage2(&S2, &crate::hw::ste::EXAMPLE_RULES).unwrap(),
            Ste::nested(&S1, &S2, &crate::hw::ste::EXAMPLE_RULES).unwrap(),
        ] {
            let used = Ste::used_bits(&ste.0);
            for (i, (word, used)) in ste.0.iter().zip(used).enumerate() {
                assert_eq!(word & !used, 0, "{ste:x?} qword {i}");
            }
        }
    }

    #[test]
    fn level_1_descriptor() {
        // Span 9 = 256 STEs = 16 KiB leaf, L2Ptr [51:6].
        assert_eq!(l1_descriptor(PhysAddr(0x4100_4000), 9), Ok(0x4100_4000 | 9));
        assert_eq!(
            l1_descriptor(PhysAddr(0x4100_2000), 9),
            Err(EntryError::Misaligned {
                field: "L2Ptr",
                address: 0x4100_2000,
                alignment: 0x4000
            })
        );
        assert_eq!(
            l1_descriptor(PhysAddr(0), 13),
            Err(EntryError::OutOfRange {
                field: "Span",
                value: 13,
                max: 12
            })
        );
    }

    /// Rules of an SMMU like QEMU 10.0's: no ATTR_TYPES_OVR, no HYP, terminate only, TERM_MODEL = 1.
    extern crate std;
    use std::string::ToString;

    const STRICT: EntryRules = EntryRules {
        attribute_types_override: false,
        hyp: false,
        stall: StallRule::Never,
        terminate_always_aborts: true,
    };

    #[test]
    fn shcfg_is_written_only_with_attribute_types_override() {
        let s1 = Stage1Config {
            default_substream: DefaultSubstream::Bypass,
            stall_disable: false,
            ..S1
        };
        let without = [
            Ste::bypass_for(&STRICT),
            Ste::stage1(&s1, &STRICT).unwrap(),
            Ste::stage2(&S2, &STRICT).unwrap(),
            Ste::nested(&s1, &S2, &STRICT).unwrap(),
        ];
        for ste in without {
            assert_eq!(
                ste.0[1] & Q1_SHCFG,
                0,
                "SHCFG is RES0 without IDR1.ATTR_TYPES_OVR: {ste:x?}"
            );
        }
        let with = EntryRules {
            attribute_types_override: true,
            ..STRICT
        };
        for ste in [
            Ste::bypass_for(&with),
            Ste::stage1(&s1, &with).unwrap(),
            Ste::stage2(&S2, &with).unwrap(),
            Ste::nested(&s1, &S2, &with).unwrap(),
        ] {
            assert_eq!(ste.0[1] & Q1_SHCFG, 0b01 << 44, "SHCFG = use incoming: {ste:x?}");
        }
        assert_eq!(Ste::bypass_for(&STRICT).0, [0x9, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn el2_stream_world_needs_hyp() {
        let el2 = Stage1Config {
            el2: true,
            stall_disable: false,
            ..S1
        };
        let refused = Err(EntryError::Forbidden {
            field: "STRW",
            value: 0b10,
            rule: Rule::NoHyp,
        });
        assert_eq!(Ste::stage1(&el2, &STRICT), refused);
        assert_eq!(Ste::nested(&el2, &S2, &STRICT), refused);
        let hyp = EntryRules { hyp: true, ..STRICT };
        assert_eq!(Ste::stage1(&el2, &hyp).unwrap().0[1] & Q1_STRW, 0b10 << 30);
        assert!(
            Ste::stage1(&el2, &STRICT)
                .unwrap_err()
                .to_string()
                .contains("IDR0.HYP = 0")
        );
    }

    #[test]
    fn stall_model_decides_s2s_and_s1stalld() {
        let forced = EntryRules {
            stall: StallRule::Forced,
            ..STRICT
        };
        let stalling = Stage2Config { stall: true, ..S2 };
        // STALL_MODEL 0b01: the SMMU cannot stall.
        assert_eq!(
            Ste::stage2(&stalling, &STRICT),
            Err(EntryError::Forbidden {
                field: "S2S",
                value: 1,
                rule: Rule::StallNotSupported
            })
        );
        assert!(Ste::stage2(&S2, &STRICT).is_ok());
        // STALL_MODEL 0b10: S2S = 0 is ILLEGAL.
        assert_eq!(
            Ste::stage2(&S2, &forced),
            Err(EntryError::Forbidden {
                field: "S2S",
                value: 0,
                rule: Rule::StallForced
            })
        );
        assert_ne!(Ste::stage2(&stalling, &forced).unwrap().0[2] & Q2_S2S, 0);
        // S1STALLD = 1 is ILLEGAL unless STALL_MODEL is 0b00.
        for (rules, rule) in [(STRICT, Rule::StallNotSupported), (forced, Rule::StallForced)] {
            assert_eq!(
                Ste::stage1(&S1, &rules),
                Err(EntryError::Forbidden {
                    field: "S1STALLD",
                    value: 1,
                    rule
                })
            );
        }
        assert!(Ste::stage1(&S1, &EXAMPLE_RULES).is_ok());
    }
}
