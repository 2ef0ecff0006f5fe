//! Event queue records (Arm IHI 0070 §7.3) and global errors (SMMU_GERROR, §6.3.19 and §7.5), decoded.
//!
//! An event record is 32 bytes, little-endian, read from the Event queue as four 64-bit words. The specification
//! numbers the record's bits 255..0; word `n` holds record bits `[64n+63:64n]`. Each field below is a mask named by
//! the word it lives in (`EVT1_STAG` is in word 1, record bits `[79:64]`); address fields stay masks, not shifts, so
//! `word & EVT3_IPA` is the address itself. Field positions are those of IHI 0070 G.b (SMMUv3.4 and RME DA); the
//! fields later versions added (GPCF, IMPL_DEF, NSIPA, the F_PERMISSION Overlay/DirtyBit/AssuredOnly bits, address
//! bits `[55:52]`) sit in bits that earlier versions keep RES0, so one decoder serves every SMMUv3 version.
//!
//! Provenance of the positions. Checked against two independent codebases: Linux's `arm-smmu-v3.h` (EVTQ_0_SSV,
//! SSID, SID; EVTQ_1_STAG, STALL, PnU, InD, RnW, S2, CLASS, TT_READ = TTRnW at record bit `[108]`; EVTQ_2_ADDR;
//! EVTQ_3_IPA) and QEMU's `hw/arm/smmuv3-internal.h` (EVT_SET_TYPE, SSV, SSID, SID, STAG, STALL, PNU, IND, RNW, S2,
//! CLASS, ADDR, ADDR2, on 32-bit words), and the tests below include records assembled by hand from those
//! layouts. NSIPA `[102]`, GPCF `[80]` and the SMMUv3.4 F_PERMISSION bits AssuredOnly `[106]`, DirtyBit `[107]` and
//! Overlay `[109]` appear in neither source and no copy of the record figure was found: they are read from the
//! specification's text and **unverified**.
//!
//! [`Event::decode`] never panics and reads no reserved bit: an event number the architecture does not define
//! becomes [`Event::Unknown`], an IMPLEMENTATION DEFINED one (0xE0..=0xEF) becomes [`Event::ImpDef`], both keeping
//! the raw words. [`GlobalErrors`] is SMMU_GERROR; an error is active while its GERROR and GERRORN bits differ
//! ([`active`]) and is acknowledged by toggling the GERRORN bit ([`acknowledge`]).

use core::fmt;

use bitflags::bitflags;

/// Size of one event record in bytes (§7.3).
pub const EVENT_RECORD_BYTES: usize = 32;
/// Size of one event record in 64-bit words.
pub const EVENT_RECORD_WORDS: usize = 4;

/// Event numbers, record bits `[7:0]` (§7.3.2 to §7.3.21).
pub mod number {
    /// Unsupported Upstream Transaction (§7.3.2).
    pub const F_UUT: u8 = 0x01;
    /// StreamID out of range of the Stream table (§7.3.3).
    pub const C_BAD_STREAMID: u8 = 0x02;
    /// External abort fetching an STE (§7.3.4).
    pub const F_STE_FETCH: u8 = 0x03;
    /// Used STE invalid or ILLEGAL (§7.3.5).
    pub const C_BAD_STE: u8 = 0x04;
    /// ATS Translation Request disallowed (§7.3.6).
    pub const F_BAD_ATS_TREQ: u8 = 0x05;
    /// Non-substream traffic disabled by the STE (§7.3.7).
    pub const F_STREAM_DISABLED: u8 = 0x06;
    /// ATS Translated transaction not allowed (§7.3.8).
    pub const F_TRANSL_FORBIDDEN: u8 = 0x07;
    /// SubstreamID present but not allowed or out of range (§7.3.9).
    pub const C_BAD_SUBSTREAMID: u8 = 0x08;
    /// External abort fetching a CD (§7.3.10).
    pub const F_CD_FETCH: u8 = 0x09;
    /// Fetched CD invalid or ILLEGAL (§7.3.11).
    pub const C_BAD_CD: u8 = 0x0A;
    /// External abort walking a translation table (§7.3.12).
    pub const F_WALK_EABT: u8 = 0x0B;
    /// Translation fault (§7.3.13).
    pub const F_TRANSLATION: u8 = 0x10;
    /// Address Size fault (§7.3.14).
    pub const F_ADDR_SIZE: u8 = 0x11;
    /// Access flag fault (§7.3.15).
    pub const F_ACCESS: u8 = 0x12;
    /// Permission fault (§7.3.16).
    pub const F_PERMISSION: u8 = 0x13;
    /// TLB conflict (§7.3.17).
    pub const F_TLB_CONFLICT: u8 = 0x20;
    /// Configuration cache conflict (§7.3.18).
    pub const F_CFG_CONFLICT: u8 = 0x21;
    /// Speculative page request hint (§7.3.19).
    pub const E_PAGE_REQUEST: u8 = 0x24;
    /// External abort fetching a VMS (§7.3.20).
    pub const F_VMS_FETCH: u8 = 0x25;
    /// First IMPLEMENTATION DEFINED event number (§7.3.21).
    pub const IMPDEF_FIRST: u8 = 0xE0;
    /// Last IMPLEMENTATION DEFINED event number (§7.3.21).
    pub const IMPDEF_LAST: u8 = 0xEF;
}

// Word 0, record bits [63:0]: common to every architected record.
/// Event number, record bits `[7:0]`.
const EVT0_ID: u64 = 0xff;
/// SSV, record bit `[11]`: SubstreamID valid.
const EVT0_SSV: u64 = 1 << 11;
/// SubstreamID, record bits `[31:12]`.
const EVT0_SUBSTREAM_ID: u64 = 0xf_ffff << 12;
/// StreamID, record bits `[63:32]`.
const EVT0_STREAM_ID: u64 = 0xffff_ffff << 32;

// Word 1, record bits [127:64].
/// Reason (IMPLEMENTATION DEFINED), record bits `[79:64]`: F_UUT, F_STE_FETCH, F_CD_FETCH, F_VMS_FETCH, F_WALK_EABT.
const EVT1_REASON: u64 = 0xffff;
/// STAG, record bits `[79:64]`: the stall tag of F_TRANSLATION, F_ADDR_SIZE, F_ACCESS, F_PERMISSION.
const EVT1_STAG: u64 = 0xffff;
/// GPCF, record bit `[80]`: the fetch abort arose from a Granule Protection Check fault. Position unverified (read
/// from the text; in neither Linux nor QEMU).
const EVT1_GPCF: u64 = 1 << 16;
/// Reason (IMPLEMENTATION DEFINED), record bits `[95:64]`: F_TLB_CONFLICT, F_CFG_CONFLICT.
const EVT1_CONFLICT_REASON: u64 = 0xffff_ffff;
/// Stall, record bit `[95]`: the transaction is stalled and waits for CMD_RESUME or CMD_STALL_TERM.
const EVT1_STALL: u64 = 1 << 31;
/// F_BAD_ATS_TREQ Span, record bits `[67:64]`: number of STUs requested.
const EVT1_ATS_SPAN: u64 = 0xf;
/// F_BAD_ATS_TREQ P, record bit `[92]`: privileged access requested.
const EVT1_ATS_P: u64 = 1 << 28;
/// F_BAD_ATS_TREQ X, record bit `[93]`: execute permission requested.
const EVT1_ATS_X: u64 = 1 << 29;
/// F_BAD_ATS_TREQ W, record bit `[94]`: write permission requested (!NW).
const EVT1_ATS_W: u64 = 1 << 30;
/// F_BAD_ATS_TREQ R, record bit `[95]`: read permission requested.
const EVT1_ATS_R: u64 = 1 << 31;
/// PnU, record bit `[97]`: privileged (1) or unprivileged (0).
const EVT1_PNU: u64 = 1 << 33;
/// InD, record bit `[98]`: instruction (1) or data (0).
const EVT1_IND: u64 = 1 << 34;
/// RnW, record bit `[99]`: read (1) or write (0).
const EVT1_RNW: u64 = 1 << 35;
/// NSIPA, record bit `[102]`: the IPA is in the Non-secure IPA space (Secure event queue, S2 == 1 only).
/// Position unverified (read from the text; in neither Linux nor QEMU).
const EVT1_NSIPA: u64 = 1 << 38;
/// S2, record bit `[103]`: the fault occurred at stage 2.
const EVT1_S2: u64 = 1 << 39;
/// CLASS, record bits `[105:104]`: what the faulting access was for.
const EVT1_CLASS: u64 = 0b11 << 40;
/// F_PERMISSION AssuredOnly, record bit `[106]` (SMMUv3.4, SMMU_IDR3.S2PI). Position unverified (read from the
/// text; in neither Linux nor QEMU).
const EVT1_ASSURED_ONLY: u64 = 1 << 42;
/// F_PERMISSION DirtyBit, record bit `[107]` (SMMUv3.4, SMMU_IDR3.S1PI or S2PI). Position unverified (read from
/// the text; in neither Linux nor QEMU).
const EVT1_DIRTY_BIT: u64 = 1 << 43;
/// F_PERMISSION TTRnW, record bit `[108]`: the stage 1 table walk access that faulted at stage 2 was a read
/// (Linux's EVTQ_1_TT_READ agrees).
const EVT1_TTRNW: u64 = 1 << 44;
/// F_PERMISSION Overlay, record bit `[109]` (SMMUv3.4, SMMU_IDR3.S2PO). Position unverified (read from the text;
/// in neither Linux nor QEMU).
const EVT1_OVERLAY: u64 = 1 << 45;
/// IMPL_DEF, record bits `[127:112]`: F_TRANSLATION, F_ADDR_SIZE, F_ACCESS, F_PERMISSION.
const EVT1_IMPDEF: u64 = 0xffff << 48;
/// E_PAGE_REQUEST uX, record bit `[97]`.
const EVT1_PRQ_UX: u64 = 1 << 33;
/// E_PAGE_REQUEST uW, record bit `[98]`.
const EVT1_PRQ_UW: u64 = 1 << 34;
/// E_PAGE_REQUEST uR, record bit `[99]`.
const EVT1_PRQ_UR: u64 = 1 << 35;
/// E_PAGE_REQUEST pX, record bit `[101]`.
const EVT1_PRQ_PX: u64 = 1 << 37;
/// E_PAGE_REQUEST pW, record bit `[102]`.
const EVT1_PRQ_PW: u64 = 1 << 38;
/// E_PAGE_REQUEST pR, record bit `[103]`.
const EVT1_PRQ_PR: u64 = 1 << 39;
/// E_PAGE_REQUEST Span, record bits `[115:108]`: the hinted span is Span * 4 KiB.
const EVT1_PRQ_SPAN: u64 = 0xff << 44;

// Word 2, record bits [191:128].
/// `InputAddr[63:0]`, record bits `[191:128]`.
const EVT2_INPUT_ADDR: u64 = u64::MAX;
/// `InputAddr[63:12]`, record bits `[191:140]`: F_BAD_ATS_TREQ, E_PAGE_REQUEST.
const EVT2_INPUT_PAGE: u64 = !0xfff;

// Word 3, record bits [255:192].
/// `IPA[55:12]`, record bits `[247:204]`.
const EVT3_IPA: u64 = 0x00ff_ffff_ffff_f000;
/// `FetchAddr[55:3]`, record bits `[247:195]`.
const EVT3_FETCH_ADDR: u64 = 0x00ff_ffff_ffff_fff8;

/// The field `mask` of `word`, shifted down to bit 0. `mask` is one of the non-zero constants above.
const fn field(word: u64, mask: u64) -> u64 {
    (word & mask) >> mask.trailing_zeros()
}

/// Whether the one-bit field `mask` of `word` is set.
const fn flag(word: u64, mask: u64) -> bool {
    word & mask != 0
}

/// SubstreamID when SSV (record bit `[11]`) says it is valid.
fn substream(word0: u64) -> Option<u32> {
    flag(word0, EVT0_SSV).then_some(field(word0, EVT0_SUBSTREAM_ID) as u32)
}

/// CLASS: what the access that faulted was for (record bits `[105:104]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// `0b00` CD: fetching a context descriptor.
    ContextDescriptor,
    /// `0b01` TT: fetching (or updating) a stage 1 translation table descriptor.
    TranslationTable,
    /// `0b10` IN: translating the input address of the transaction.
    Input,
    /// `0b11`: reserved.
    Reserved,
}

impl Class {
    fn decode(word1: u64) -> Class {
        match field(word1, EVT1_CLASS) {
            0 => Class::ContextDescriptor,
            1 => Class::TranslationTable,
            2 => Class::Input,
            _ => Class::Reserved,
        }
    }
}

impl fmt::Display for Class {
    /// The specification's short names: `CD`, `TT`, `IN`, or `reserved`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Class::ContextDescriptor => "CD",
            Class::TranslationTable => "TT",
            Class::Input => "IN",
            Class::Reserved => "reserved",
        })
    }
}

/// The translation stage a fault occurred at (S2, record bit `[103]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// S2 == 0: stage 1.
    One,
    /// S2 == 1: stage 2.
    Two,
}

impl Stage {
    fn decode(word1: u64) -> Stage {
        if flag(word1, EVT1_S2) { Stage::Two } else { Stage::One }
    }
}

impl fmt::Display for Stage {
    /// `stage 1` or `stage 2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::One => "stage 1",
            Stage::Two => "stage 2",
        })
    }
}

/// The access attributes of the transaction that caused an event: RnW, InD and PnU (record bits `[99:97]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Access {
    /// RnW: a read (true) or a write (false).
    pub read: bool,
    /// InD: an instruction fetch (true) or a data access (false).
    pub instruction: bool,
    /// PnU: privileged (true) or unprivileged (false).
    pub privileged: bool,
}

impl Access {
    fn decode(word1: u64) -> Access {
        Access {
            read: flag(word1, EVT1_RNW),
            instruction: flag(word1, EVT1_IND),
            privileged: flag(word1, EVT1_PNU),
        }
    }
}

impl fmt::Display for Access {
    /// `read` or `write`, then ` instruction` and ` privileged` when those are set.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.read { "read" } else { "write" })?;
        if self.instruction {
            f.write_str(" instruction")?;
        }
        if self.privileged {
            f.write_str(" privileged")?;
        }
        Ok(())
    }
}

/// Read, write and execute rights requested by an ATS Translation Request or hinted by a page request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Rights {
    /// Read.
    pub read: bool,
    /// Write.
    pub write: bool,
    /// Execute.
    pub execute: bool,
}

impl fmt::Display for Rights {
    /// `rwx` with `-` for a right not asked for, as in `r-x`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bit = |set: bool, c: &'static str| if set { c } else { "-" };
        write!(
            f,
            "{}{}{}",
            bit(self.read, "r"),
            bit(self.write, "w"),
            bit(self.execute, "x")
        )
    }
}

/// A configuration error that carries only the stream: C_BAD_STREAMID, C_BAD_STE, C_BAD_CD (§7.3.3, §7.3.5,
/// §7.3.11).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BadConfig {
    /// StreamID, record bits `[63:32]`.
    pub stream_id: u32,
    /// SubstreamID (record bits `[31:12]`) when SSV (bit `[11]`) is set.
    pub substream_id: Option<u32>,
}

impl BadConfig {
    fn decode(r: &[u64; 4]) -> BadConfig {
        BadConfig {
            stream_id: field(r[0], EVT0_STREAM_ID) as u32,
            substream_id: substream(r[0]),
        }
    }
}

/// F_UUT: a transaction the SMMU does not support (§7.3.2). PnU and InD are the incoming attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnsupportedTransaction {
    /// StreamID, record bits `[63:32]`.
    pub stream_id: u32,
    /// SubstreamID (record bits `[31:12]`) when SSV (bit `[11]`) is set.
    pub substream_id: Option<u32>,
    /// IMPLEMENTATION DEFINED cause, record bits `[79:64]`.
    pub reason: u16,
    /// RnW, InD, PnU, record bits `[99:97]`.
    pub access: Access,
    /// InputAddr, record bits `[191:128]`.
    pub input_addr: u64,
}

/// An external abort fetching a configuration structure: F_STE_FETCH, F_CD_FETCH, F_VMS_FETCH (§7.3.4, §7.3.10,
/// §7.3.20).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FetchAbort {
    /// StreamID, record bits `[63:32]`.
    pub stream_id: u32,
    /// SubstreamID (record bits `[31:12]`) when SSV (bit `[11]`) is set.
    pub substream_id: Option<u32>,
    /// IMPLEMENTATION DEFINED cause, record bits `[79:64]`.
    pub reason: u16,
    /// GPCF, record bit `[80]`: the abort came from a Granule Protection Check fault.
    pub gpcf: bool,
    /// Physical address of the fetch, `FetchAddr[55:3]` at record bits `[247:195]`; bits above OAS are UNKNOWN.
    pub fetch_addr: u64,
}

impl FetchAbort {
    fn decode(r: &[u64; 4]) -> FetchAbort {
        FetchAbort {
            stream_id: field(r[0], EVT0_STREAM_ID) as u32,
            substream_id: substream(r[0]),
            reason: field(r[1], EVT1_REASON) as u16,
            gpcf: flag(r[1], EVT1_GPCF),
            fetch_addr: r[3] & EVT3_FETCH_ADDR,
        }
    }
}

/// F_BAD_ATS_TREQ: an ATS Translation Request the STE (or the disabled SMMU) does not allow (§7.3.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BadAtsRequest {
    /// StreamID, record bits `[63:32]`.
    pub stream_id: u32,
    /// SubstreamID (record bits `[31:12]`) when SSV (bit `[11]`) is set.
    pub substream_id: Option<u32>,
    /// Span, record bits `[67:64]`: the number of STUs requested.
    pub span: u8,
    /// R, W, X, record bits `[95:93]`: the rights requested, before the STE's overrides.
    pub rights: Rights,
    /// P, record bit `[92]`: a privileged access was requested.
    pub privileged: bool,
    /// `InputAddr[63:12]` (record bits `[191:140]`), with bits `[11:0]` zero.
    pub input_addr: u64,
}

/// F_WALK_EABT: an external abort fetching or updating a translation table descriptor (§7.3.12).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WalkAbort {
    /// StreamID, record bits `[63:32]`.
    pub stream_id: u32,
    /// SubstreamID (record bits `[31:12]`) when SSV (bit `[11]`) is set.
    pub substream_id: Option<u32>,
    /// IMPLEMENTATION DEFINED cause, record bits `[79:64]`.
    pub reason: u16,
    /// GPCF, record bit `[80]`: the abort came from a Granule Protection Check fault.
    pub gpcf: bool,
    /// RnW, InD, PnU of the input transaction, record bits `[99:97]`.
    pub access: Access,
    /// NSIPA, record bit `[102]` (position unverified against the record figure).
    pub nsipa: bool,
    /// S2, record bit `[103]`: the stage whose walk aborted.
    pub stage: Stage,
    /// CLASS, record bits `[105:104]`.
    pub class: Class,
    /// InputAddr, record bits `[191:128]`.
    pub input_addr: u64,
    /// Physical address of the descriptor fetch, `FetchAddr[55:3]` at record bits `[247:195]`.
    pub fetch_addr: u64,
}

/// A translation-related fault: F_TRANSLATION, F_ADDR_SIZE, F_ACCESS, and the common part of F_PERMISSION
/// (§7.3.13 to §7.3.16).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TranslationFault {
    /// StreamID, record bits `[63:32]`.
    pub stream_id: u32,
    /// SubstreamID (record bits `[31:12]`) when SSV (bit `[11]`) is set.
    pub substream_id: Option<u32>,
    /// STAG (record bits `[79:64]`) when Stall (bit `[95]`) is set: the transaction is stalled and must be answered
    /// with CMD_RESUME carrying this tag, or CMD_STALL_TERM. `None` when the transaction was terminated.
    pub stag: Option<u16>,
    /// RnW, InD, PnU of the input transaction (post-STE override), record bits `[99:97]`.
    pub access: Access,
    /// NSIPA, record bit `[102]` (position unverified against the record figure).
    pub nsipa: bool,
    /// S2, record bit `[103]`.
    pub stage: Stage,
    /// CLASS, record bits `[105:104]`.
    pub class: Class,
    /// IMPL_DEF, record bits `[127:112]`.
    pub impdef: u16,
    /// InputAddr, record bits `[191:128]` (a VA, or an IPA for a stage 2-only stream).
    pub input_addr: u64,
    /// `IPA[55:12]` (record bits `[247:204]`) for a stage 2 fault: the CD address (CLASS CD), the stage 1 descriptor
    /// address (CLASS TT) or the transaction's IPA (CLASS IN). `None` for a stage 1 fault, where it is UNKNOWN.
    pub ipa: Option<u64>,
}

impl TranslationFault {
    fn decode(r: &[u64; 4]) -> TranslationFault {
        let stage = Stage::decode(r[1]);
        TranslationFault {
            stream_id: field(r[0], EVT0_STREAM_ID) as u32,
            substream_id: substream(r[0]),
            stag: flag(r[1], EVT1_STALL).then_some(field(r[1], EVT1_STAG) as u16),
            access: Access::decode(r[1]),
            nsipa: flag(r[1], EVT1_NSIPA),
            stage,
            class: Class::decode(r[1]),
            impdef: field(r[1], EVT1_IMPDEF) as u16,
            input_addr: r[2] & EVT2_INPUT_ADDR,
            ipa: (stage == Stage::Two).then_some(r[3] & EVT3_IPA),
        }
    }
}

/// F_PERMISSION: a Permission fault (§7.3.16).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PermissionFault {
    /// The fields F_PERMISSION shares with F_TRANSLATION.
    pub fault: TranslationFault,
    /// TTRnW (record bit `[108]`) when CLASS is TT: whether the stage 1 table walk access that faulted at stage 2 was
    /// a read (true) or a write, such as a hardware Access flag update (false). `None` for other classes.
    pub table_walk_read: Option<bool>,
    /// Overlay, record bit `[109]`: a stage 2 Overlay permission prevented the access (SMMU_IDR3.S2PO). Bit
    /// position unverified against the record figure.
    pub overlay: bool,
    /// DirtyBit, record bit `[107]`: the access would have updated the dirty state, but hardware update of it is
    /// disabled in a stage using the Indirect Permission Scheme. Bit position unverified against the record figure.
    pub dirty_bit: bool,
    /// AssuredOnly, record bit `[106]`: a stage 2 fault caused only by the AssuredOnly check (SMMU_IDR3.S2PI). Bit
    /// position unverified against the record figure.
    pub assured_only: bool,
}

/// F_TLB_CONFLICT: a TLB conflict caused by the transaction (§7.3.17).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TlbConflict {
    /// StreamID, record bits `[63:32]`.
    pub stream_id: u32,
    /// SubstreamID (record bits `[31:12]`) when SSV (bit `[11]`) is set.
    pub substream_id: Option<u32>,
    /// IMPLEMENTATION DEFINED conflict reason, record bits `[95:64]`.
    pub reason: u32,
    /// RnW, InD, PnU of the input transaction, record bits `[99:97]`.
    pub access: Access,
    /// NSIPA, record bit `[102]` (position unverified against the record figure).
    pub nsipa: bool,
    /// S2, record bit `[103]`.
    pub stage: Stage,
    /// InputAddr, record bits `[191:128]`.
    pub input_addr: u64,
    /// `IPA[55:12]` (record bits `[247:204]`) when S2 is set; `None` otherwise, where it is UNKNOWN.
    pub ipa: Option<u64>,
}

/// F_CFG_CONFLICT: a configuration cache conflict caused by the transaction (§7.3.18).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConfigConflict {
    /// StreamID, record bits `[63:32]`.
    pub stream_id: u32,
    /// SubstreamID (record bits `[31:12]`) when SSV (bit `[11]`) is set.
    pub substream_id: Option<u32>,
    /// IMPLEMENTATION DEFINED conflict reason, record bits `[95:64]`.
    pub reason: u32,
}

/// E_PAGE_REQUEST: a device hints that it will soon access an address span (§7.3.19). No response is needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRequest {
    /// StreamID, record bits `[63:32]`.
    pub stream_id: u32,
    /// SubstreamID (record bits `[31:12]`) when SSV (bit `[11]`) is set.
    pub substream_id: Option<u32>,
    /// uR, uW, uX (record bits `[99:97]`): the unprivileged accesses anticipated.
    pub unprivileged: Rights,
    /// pR, pW, pX (record bits `[103:101]`): the privileged accesses anticipated.
    pub privileged: Rights,
    /// Span, record bits `[115:108]`: the span is `span` * 4 KiB.
    pub span: u8,
    /// `InputAddr[63:12]` (record bits `[191:140]`), with bits `[11:0]` zero.
    pub input_addr: u64,
}

/// A decoded event record (§7.3): one variant per event number the architecture defines.
///
/// Variants are named after the specification's event names (`CBadSte` is C_BAD_STE), so that a log line and a
/// search of the specification meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// F_UUT (0x01): unsupported upstream transaction.
    FUut(UnsupportedTransaction),
    /// C_BAD_STREAMID (0x02): StreamID out of range (recorded when SMMU_CR2.RECINVSID is set).
    CBadStreamId(BadConfig),
    /// F_STE_FETCH (0x03): external abort fetching the STE.
    FSteFetch(FetchAbort),
    /// C_BAD_STE (0x04): the STE is invalid (V == 0) or ILLEGAL.
    CBadSte(BadConfig),
    /// F_BAD_ATS_TREQ (0x05): ATS Translation Request disallowed.
    FBadAtsTreq(BadAtsRequest),
    /// F_STREAM_DISABLED (0x06): a transaction without SubstreamID (or with SubstreamID 0 under S1DSS 0b10) on a
    /// stream whose STE disables non-substream traffic.
    FStreamDisabled {
        /// StreamID, record bits `[63:32]`.
        stream_id: u32,
    },
    /// F_TRANSL_FORBIDDEN (0x07): an ATS Translated transaction the STE or SMMU does not allow.
    FTranslForbidden {
        /// StreamID, record bits `[63:32]`.
        stream_id: u32,
        /// RnW, record bit `[99]`: the transaction was a read.
        read: bool,
        /// InputAddr, record bits `[191:128]`.
        input_addr: u64,
    },
    /// C_BAD_SUBSTREAMID (0x08): SubstreamID not allowed or out of range.
    CBadSubstreamId {
        /// StreamID, record bits `[63:32]`.
        stream_id: u32,
        /// SubstreamID, record bits `[31:12]`; always valid in this event (no SSV).
        substream_id: u32,
    },
    /// F_CD_FETCH (0x09): external abort fetching the CD.
    FCdFetch(FetchAbort),
    /// C_BAD_CD (0x0A): the CD is invalid or ILLEGAL.
    CBadCd(BadConfig),
    /// F_WALK_EABT (0x0B): external abort walking a translation table.
    FWalkEabt(WalkAbort),
    /// F_TRANSLATION (0x10): Translation fault.
    FTranslation(TranslationFault),
    /// F_ADDR_SIZE (0x11): Address Size fault.
    FAddrSize(TranslationFault),
    /// F_ACCESS (0x12): Access flag fault.
    FAccess(TranslationFault),
    /// F_PERMISSION (0x13): Permission fault.
    FPermission(PermissionFault),
    /// F_TLB_CONFLICT (0x20): TLB conflict.
    FTlbConflict(TlbConflict),
    /// F_CFG_CONFLICT (0x21): configuration cache conflict.
    FCfgConflict(ConfigConflict),
    /// E_PAGE_REQUEST (0x24): speculative page request hint.
    EPageRequest(PageRequest),
    /// F_VMS_FETCH (0x25): external abort fetching the VMS.
    FVmsFetch(FetchAbort),
    /// IMPDEF_EVENTn (0xE0..=0xEF): an IMPLEMENTATION DEFINED event; no field is architected beyond the number.
    ImpDef {
        /// The event number, 0xE0..=0xEF.
        number: u8,
        /// The record as read.
        raw: [u64; 4],
    },
    /// An event number the architecture reserves. Arm recommends treating it as non-fatal.
    Unknown {
        /// The record as read.
        raw: [u64; 4],
    },
}

impl Event {
    /// Decodes one event record, as the four little-endian 64-bit words read from the Event queue.
    ///
    /// Never panics. Reserved (RES0) bits and fields the record leaves UNKNOWN (the IPA of a stage 1 fault, STAG
    /// when not stalled, SubstreamID when SSV is clear) are ignored. A reserved event number gives
    /// [`Event::Unknown`], an IMPLEMENTATION DEFINED one [`Event::ImpDef`].
    pub fn decode(record: &[u64; 4]) -> Event {
        let r = record;
        let stream_id = field(r[0], EVT0_STREAM_ID) as u32;
        match field(r[0], EVT0_ID) as u8 {
            number::F_UUT => Event::FUut(UnsupportedTransaction {
                stream_id,
                substream_id: substream(r[0]),
                reason: field(r[1], EVT1_REASON) as u16,
                access: Access::decode(r[1]),
                input_addr: r[2] & EVT2_INPUT_ADDR,
            }),
            number::C_BAD_STREAMID => Event::CBadStreamId(BadConfig::decode(r)),
            number::F_STE_FETCH => Event::FSteFetch(FetchAbort::decode(r)),
            number::C_BAD_STE => Event::CBadSte(BadConfig::decode(r)),
            number::F_BAD_ATS_TREQ => Event::FBadAtsTreq(BadAtsRequest {
                stream_id,
                substream_id: substream(r[0]),
                span: field(r[1], EVT1_ATS_SPAN) as u8,
                rights: Rights {
                    read: flag(r[1], EVT1_ATS_R),
                    write: flag(r[1], EVT1_ATS_W),
                    execute: flag(r[1], EVT1_ATS_X),
                },
                privileged: flag(r[1], EVT1_ATS_P),
                input_addr: r[2] & EVT2_INPUT_PAGE,
            }),
            number::F_STREAM_DISABLED => Event::FStreamDisabled { stream_id },
            number::F_TRANSL_FORBIDDEN => Event::FTranslForbidden {
                stream_id,
                read: flag(r[1], EVT1_RNW),
                input_addr: r[2] & EVT2_INPUT_ADDR,
            },
            number::C_BAD_SUBSTREAMID => Event::CBadSubstreamId {
                stream_id,
                substream_id: field(r[0], EVT0_SUBSTREAM_ID) as u32,
            },
            number::F_CD_FETCH => Event::FCdFetch(FetchAbort::decode(r)),
            number::C_BAD_CD => Event::CBadCd(BadConfig::decode(r)),
            number::F_WALK_EABT => Event::FWalkEabt(WalkAbort {
                stream_id,
                substream_id: substream(r[0]),
                reason: field(r[1], EVT1_REASON) as u16,
                gpcf: flag(r[1], EVT1_GPCF),
                access: Access::decode(r[1]),
                nsipa: flag(r[1], EVT1_NSIPA),
                stage: Stage::decode(r[1]),
                class: Class::decode(r[1]),
                input_addr: r[2] & EVT2_INPUT_ADDR,
                fetch_addr: r[3] & EVT3_FETCH_ADDR,
            }),
            number::F_TRANSLATION => Event::FTranslation(TranslationFault::decode(r)),
            number::F_ADDR_SIZE => Event::FAddrSize(TranslationFault::decode(r)),
            number::F_ACCESS => Event::FAccess(TranslationFault::decode(r)),
            number::F_PERMISSION => {
                let fault = TranslationFault::decode(r);
                Event::FPermission(PermissionFault {
                    fault,
                    table_walk_read: (fault.class == Class::TranslationTable).then_some(flag(r[1], EVT1_TTRNW)),
                    overlay: flag(r[1], EVT1_OVERLAY),
                    dirty_bit: flag(r[1], EVT1_DIRTY_BIT),
                    assured_only: flag(r[1], EVT1_ASSURED_ONLY),
                })
            }
            number::F_TLB_CONFLICT => {
                let stage = Stage::decode(r[1]);
                Event::FTlbConflict(TlbConflict {
                    stream_id,
                    substream_id: substream(r[0]),
                    reason: field(r[1], EVT1_CONFLICT_REASON) as u32,
                    access: Access::decode(r[1]),
                    nsipa: flag(r[1], EVT1_NSIPA),
                    stage,
                    input_addr: r[2] & EVT2_INPUT_ADDR,
                    ipa: (stage == Stage::Two).then_some(r[3] & EVT3_IPA),
                })
            }
            number::F_CFG_CONFLICT => Event::FCfgConflict(ConfigConflict {
                stream_id,
                substream_id: substream(r[0]),
                reason: field(r[1], EVT1_CONFLICT_REASON) as u32,
            }),
            number::E_PAGE_REQUEST => Event::EPageRequest(PageRequest {
                stream_id,
                substream_id: substream(r[0]),
                unprivileged: Rights {
                    read: flag(r[1], EVT1_PRQ_UR),
                    write: flag(r[1], EVT1_PRQ_UW),
                    execute: flag(r[1], EVT1_PRQ_UX),
                },
                privileged: Rights {
                    read: flag(r[1], EVT1_PRQ_PR),
                    write: flag(r[1], EVT1_PRQ_PW),
                    execute: flag(r[1], EVT1_PRQ_PX),
                },
                span: field(r[1], EVT1_PRQ_SPAN) as u8,
                input_addr: r[2] & EVT2_INPUT_PAGE,
            }),
            number::F_VMS_FETCH => Event::FVmsFetch(FetchAbort::decode(r)),
            n @ number::IMPDEF_FIRST..=number::IMPDEF_LAST => Event::ImpDef { number: n, raw: *r },
            _ => Event::Unknown { raw: *r },
        }
    }

    /// Decodes one event record from its 32 bytes as they lie in the Event queue (little-endian, §7.3).
    pub fn from_le_bytes(bytes: &[u8; EVENT_RECORD_BYTES]) -> Event {
        let mut words = [0u64; EVENT_RECORD_WORDS];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *word = u64::from_le_bytes(b);
        }
        Event::decode(&words)
    }

    /// The event number, record bits `[7:0]`, for every variant (also [`Event::ImpDef`] and [`Event::Unknown`]).
    pub fn event_type(&self) -> u8 {
        match self {
            Event::FUut(_) => number::F_UUT,
            Event::CBadStreamId(_) => number::C_BAD_STREAMID,
            Event::FSteFetch(_) => number::F_STE_FETCH,
            Event::CBadSte(_) => number::C_BAD_STE,
            Event::FBadAtsTreq(_) => number::F_BAD_ATS_TREQ,
            Event::FStreamDisabled { .. } => number::F_STREAM_DISABLED,
            Event::FTranslForbidden { .. } => number::F_TRANSL_FORBIDDEN,
            Event::CBadSubstreamId { .. } => number::C_BAD_SUBSTREAMID,
            Event::FCdFetch(_) => number::F_CD_FETCH,
            Event::CBadCd(_) => number::C_BAD_CD,
            Event::FWalkEabt(_) => number::F_WALK_EABT,
            Event::FTranslation(_) => number::F_TRANSLATION,
            Event::FAddrSize(_) => number::F_ADDR_SIZE,
            Event::FAccess(_) => number::F_ACCESS,
            Event::FPermission(_) => number::F_PERMISSION,
            Event::FTlbConflict(_) => number::F_TLB_CONFLICT,
            Event::FCfgConflict(_) => number::F_CFG_CONFLICT,
            Event::EPageRequest(_) => number::E_PAGE_REQUEST,
            Event::FVmsFetch(_) => number::F_VMS_FETCH,
            Event::ImpDef { number, .. } => *number,
            Event::Unknown { raw } => field(raw[0], EVT0_ID) as u8,
        }
    }

    /// The specification's name of the event, such as `"C_BAD_STE"`; `"IMPDEF_EVENT"` for 0xE0..=0xEF and
    /// `"UNKNOWN"` for a reserved number.
    pub fn name(&self) -> &'static str {
        match self {
            Event::FUut(_) => "F_UUT",
            Event::CBadStreamId(_) => "C_BAD_STREAMID",
            Event::FSteFetch(_) => "F_STE_FETCH",
            Event::CBadSte(_) => "C_BAD_STE",
            Event::FBadAtsTreq(_) => "F_BAD_ATS_TREQ",
            Event::FStreamDisabled { .. } => "F_STREAM_DISABLED",
            Event::FTranslForbidden { .. } => "F_TRANSL_FORBIDDEN",
            Event::CBadSubstreamId { .. } => "C_BAD_SUBSTREAMID",
            Event::FCdFetch(_) => "F_CD_FETCH",
            Event::CBadCd(_) => "C_BAD_CD",
            Event::FWalkEabt(_) => "F_WALK_EABT",
            Event::FTranslation(_) => "F_TRANSLATION",
            Event::FAddrSize(_) => "F_ADDR_SIZE",
            Event::FAccess(_) => "F_ACCESS",
            Event::FPermission(_) => "F_PERMISSION",
            Event::FTlbConflict(_) => "F_TLB_CONFLICT",
            Event::FCfgConflict(_) => "F_CFG_CONFLICT",
            Event::EPageRequest(_) => "E_PAGE_REQUEST",
            Event::FVmsFetch(_) => "F_VMS_FETCH",
            Event::ImpDef { .. } => "IMPDEF_EVENT",
            Event::Unknown { .. } => "UNKNOWN",
        }
    }

    /// The translation-fault fields of F_TRANSLATION, F_ADDR_SIZE, F_ACCESS and F_PERMISSION; `None` otherwise.
    pub fn translation_fault(&self) -> Option<&TranslationFault> {
        match self {
            Event::FTranslation(t) | Event::FAddrSize(t) | Event::FAccess(t) => Some(t),
            Event::FPermission(p) => Some(&p.fault),
            _ => None,
        }
    }

    /// The StreamID of the transaction or request that caused the event; `None` for IMPLEMENTATION DEFINED and
    /// unknown events, whose StreamID field is not architected.
    pub fn stream_id(&self) -> Option<u32> {
        if let Some(t) = self.translation_fault() {
            return Some(t.stream_id);
        }
        match self {
            Event::FUut(e) => Some(e.stream_id),
            Event::CBadStreamId(e) | Event::CBadSte(e) | Event::CBadCd(e) => Some(e.stream_id),
            Event::FSteFetch(e) | Event::FCdFetch(e) | Event::FVmsFetch(e) => Some(e.stream_id),
            Event::FBadAtsTreq(e) => Some(e.stream_id),
            Event::FStreamDisabled { stream_id }
            | Event::FTranslForbidden { stream_id, .. }
            | Event::CBadSubstreamId { stream_id, .. } => Some(*stream_id),
            Event::FWalkEabt(e) => Some(e.stream_id),
            Event::FTlbConflict(e) => Some(e.stream_id),
            Event::FCfgConflict(e) => Some(e.stream_id),
            Event::EPageRequest(e) => Some(e.stream_id),
            _ => None,
        }
    }

    /// The SubstreamID: always for C_BAD_SUBSTREAMID, otherwise when the record has SSV set. `None` for events
    /// without a SubstreamID field (F_STREAM_DISABLED, F_TRANSL_FORBIDDEN, IMPLEMENTATION DEFINED, unknown).
    pub fn substream_id(&self) -> Option<u32> {
        if let Some(t) = self.translation_fault() {
            return t.substream_id;
        }
        match self {
            Event::FUut(e) => e.substream_id,
            Event::CBadStreamId(e) | Event::CBadSte(e) | Event::CBadCd(e) => e.substream_id,
            Event::FSteFetch(e) | Event::FCdFetch(e) | Event::FVmsFetch(e) => e.substream_id,
            Event::FBadAtsTreq(e) => e.substream_id,
            Event::CBadSubstreamId { substream_id, .. } => Some(*substream_id),
            Event::FWalkEabt(e) => e.substream_id,
            Event::FTlbConflict(e) => e.substream_id,
            Event::FCfgConflict(e) => e.substream_id,
            Event::EPageRequest(e) => e.substream_id,
            _ => None,
        }
    }

    /// InputAddr, the address the transaction presented to the SMMU, for the events that record it (for
    /// F_BAD_ATS_TREQ and E_PAGE_REQUEST only bits `[63:12]`); `None` otherwise.
    pub fn input_address(&self) -> Option<u64> {
        if let Some(t) = self.translation_fault() {
            return Some(t.input_addr);
        }
        match self {
            Event::FUut(e) => Some(e.input_addr),
            Event::FBadAtsTreq(e) => Some(e.input_addr),
            Event::FTranslForbidden { input_addr, .. } => Some(*input_addr),
            Event::FWalkEabt(e) => Some(e.input_addr),
            Event::FTlbConflict(e) => Some(e.input_addr),
            Event::EPageRequest(e) => Some(e.input_addr),
            _ => None,
        }
    }

    /// FetchAddr, the physical address of the structure or descriptor whose fetch aborted (F_STE_FETCH, F_CD_FETCH,
    /// F_VMS_FETCH, F_WALK_EABT); `None` otherwise.
    pub fn fetch_address(&self) -> Option<u64> {
        match self {
            Event::FSteFetch(e) | Event::FCdFetch(e) | Event::FVmsFetch(e) => Some(e.fetch_addr),
            Event::FWalkEabt(e) => Some(e.fetch_addr),
            _ => None,
        }
    }

    /// The IPA of a stage 2 translation-related fault or TLB conflict; `None` when the record has none or it is
    /// UNKNOWN (stage 1).
    pub fn ipa(&self) -> Option<u64> {
        match (self.translation_fault(), self) {
            (Some(t), _) => t.ipa,
            (None, Event::FTlbConflict(e)) => e.ipa,
            _ => None,
        }
    }

    /// The address most useful to report: the input address when the record has one, otherwise the fetch address;
    /// `None` for events that carry no address.
    pub fn address(&self) -> Option<u64> {
        self.input_address().or_else(|| self.fetch_address())
    }

    /// The STAG of a stalled transaction, which software must answer with CMD_RESUME (with this StreamID and STAG)
    /// or CMD_STALL_TERM; `None` when the event did not stall a transaction.
    pub fn stall_tag(&self) -> Option<u16> {
        self.translation_fault().and_then(|t| t.stag)
    }
}

/// Shows an optional SubstreamID as `0x..`, or `-` when absent.
struct Ssid(Option<u32>);

impl fmt::Display for Ssid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(ssid) => write!(f, "{ssid:#x}"),
            None => f.write_str("-"),
        }
    }
}

/// Writes ` ssid 0x..` when a SubstreamID is present.
fn write_ssid_if_any(f: &mut fmt::Formatter<'_>, ssid: Option<u32>) -> fmt::Result {
    match ssid {
        Some(ssid) => write!(f, " ssid {ssid:#x}"),
        None => Ok(()),
    }
}

fn write_raw(f: &mut fmt::Formatter<'_>, raw: &[u64; 4]) -> fmt::Result {
    write!(
        f,
        "[{:#018x} {:#018x} {:#018x} {:#018x}]",
        raw[0], raw[1], raw[2], raw[3]
    )
}

fn write_translation_fault(f: &mut fmt::Formatter<'_>, t: &TranslationFault) -> fmt::Result {
    write!(
        f,
        " sid {:#x} ssid {} {} input {:#x} {} class {}",
        t.stream_id,
        Ssid(t.substream_id),
        t.access,
        t.input_addr,
        t.stage,
        t.class
    )?;
    if let Some(ipa) = t.ipa {
        write!(f, " ipa {ipa:#x}")?;
    }
    if t.nsipa {
        f.write_str(" nsipa")?;
    }
    if let Some(stag) = t.stag {
        write!(f, " stalled stag {stag:#x}")?;
    }
    if t.impdef != 0 {
        write!(f, " impdef {:#x}", t.impdef)?;
    }
    Ok(())
}

impl fmt::Display for Event {
    /// One line: the event name, then its fields, such as `C_BAD_STE sid 0x10` or
    /// `F_TRANSLATION sid 0x10 ssid - read input 0x1234000 stage 1 class IN`. Events that describe a transaction
    /// always show `ssid` (`-` when absent); configuration events show it only when present.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        match self {
            Event::FUut(e) => write!(
                f,
                " sid {:#x} ssid {} {} input {:#x} reason {:#x}",
                e.stream_id,
                Ssid(e.substream_id),
                e.access,
                e.input_addr,
                e.reason
            ),
            Event::CBadStreamId(e) | Event::CBadSte(e) | Event::CBadCd(e) => {
                write!(f, " sid {:#x}", e.stream_id)?;
                write_ssid_if_any(f, e.substream_id)
            }
            Event::FSteFetch(e) | Event::FCdFetch(e) | Event::FVmsFetch(e) => {
                write!(f, " sid {:#x}", e.stream_id)?;
                write_ssid_if_any(f, e.substream_id)?;
                write!(f, " fetch {:#x} reason {:#x}", e.fetch_addr, e.reason)?;
                if e.gpcf {
                    f.write_str(" gpcf")?;
                }
                Ok(())
            }
            Event::FBadAtsTreq(e) => {
                write!(f, " sid {:#x}", e.stream_id)?;
                write_ssid_if_any(f, e.substream_id)?;
                write!(f, " input {:#x} span {} rights {}", e.input_addr, e.span, e.rights)?;
                if e.privileged {
                    f.write_str(" privileged")?;
                }
                Ok(())
            }
            Event::FStreamDisabled { stream_id } => write!(f, " sid {stream_id:#x}"),
            Event::FTranslForbidden {
                stream_id,
                read,
                input_addr,
            } => write!(
                f,
                " sid {stream_id:#x} {} input {input_addr:#x}",
                if *read { "read" } else { "write" }
            ),
            Event::CBadSubstreamId {
                stream_id,
                substream_id,
            } => {
                write!(f, " sid {stream_id:#x} ssid {substream_id:#x}")
            }
            Event::FWalkEabt(e) => {
                write!(
                    f,
                    " sid {:#x} ssid {} {} input {:#x} {} class {} fetch {:#x} reason {:#x}",
                    e.stream_id,
                    Ssid(e.substream_id),
                    e.access,
                    e.input_addr,
                    e.stage,
                    e.class,
                    e.fetch_addr,
                    e.reason
                )?;
                if e.nsipa {
                    f.write_str(" nsipa")?;
                }
                if e.gpcf {
                    f.write_str(" gpcf")?;
                }
                Ok(())
            }
            Event::FTranslation(t) | Event::FAddrSize(t) | Event::FAccess(t) => write_translation_fault(f, t),
            Event::FPermission(p) => {
                write_translation_fault(f, &p.fault)?;
                match p.table_walk_read {
                    Some(true) => f.write_str(" walk read")?,
                    Some(false) => f.write_str(" walk write")?,
                    None => {}
                }
                if p.overlay {
                    f.write_str(" overlay")?;
                }
                if p.dirty_bit {
                    f.write_str(" dirty-bit")?;
                }
                if p.assured_only {
                    f.write_str(" assured-only")?;
                }
                Ok(())
            }
            Event::FTlbConflict(e) => {
                write!(
                    f,
                    " sid {:#x} ssid {} {} input {:#x} {}",
                    e.stream_id,
                    Ssid(e.substream_id),
                    e.access,
                    e.input_addr,
                    e.stage
                )?;
                if let Some(ipa) = e.ipa {
                    write!(f, " ipa {ipa:#x}")?;
                }
                if e.nsipa {
                    f.write_str(" nsipa")?;
                }
                write!(f, " reason {:#x}", e.reason)
            }
            Event::FCfgConflict(e) => {
                write!(f, " sid {:#x}", e.stream_id)?;
                write_ssid_if_any(f, e.substream_id)?;
                write!(f, " reason {:#x}", e.reason)
            }
            Event::EPageRequest(e) => {
                write!(f, " sid {:#x}", e.stream_id)?;
                write_ssid_if_any(f, e.substream_id)?;
                write!(
                    f,
                    " input {:#x} span {} x 4KiB privileged {} unprivileged {}",
                    e.input_addr, e.span, e.privileged, e.unprivileged
                )
            }
            Event::ImpDef { number, raw } => {
                write!(f, " {number:#04x} ")?;
                write_raw(f, raw)
            }
            Event::Unknown { raw } => {
                write!(f, " event {:#04x} ", field(raw[0], EVT0_ID))?;
                write_raw(f, raw)
            }
        }
    }
}

bitflags! {
    /// SMMU_GERROR (and SMMU_GERRORN), §6.3.19: one flag per global error. Bit 1 and bits `[31:11]` are RES0.
    ///
    /// The flag names are the specification's, so `iter_names` and [`fmt::Display`] print them as written there.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct GlobalErrors: u32 {
        /// Command queue error: SMMU_CMDQ_CONS.ERR holds the reason and command processing stopped at
        /// CMDQ_CONS.RD until acknowledged.
        const CMDQ_ERR = 1 << 0;
        /// An access to the Event queue aborted; event records might have been lost and delivery stops until
        /// acknowledged.
        const EVENTQ_ABT_ERR = 1 << 2;
        /// An access to the PRI queue aborted; page requests might have been lost.
        const PRIQ_ABT_ERR = 1 << 3;
        /// A CMD_SYNC MSI write aborted.
        const MSI_CMDQ_ABT_ERR = 1 << 4;
        /// An Event queue MSI write aborted.
        const MSI_EVENTQ_ABT_ERR = 1 << 5;
        /// A PRI queue MSI write aborted.
        const MSI_PRIQ_ABT_ERR = 1 << 6;
        /// A GERROR MSI write aborted (raises no GERROR interrupt itself).
        const MSI_GERROR_ABT_ERR = 1 << 7;
        /// The SMMU entered Service Failure Mode: it stopped translating, processing commands and recording
        /// events. Acknowledging does not leave the mode.
        const SFM_ERR = 1 << 8;
        /// An error on an Enhanced Command queue control page (SMMUv3.3, SMMU_IDR1.ECMDQ).
        const CMDQP_ERR = 1 << 9;
        /// One or more Device Permission Table lookup faults; see SMMU_DPT_CFG_FAR (SMMU_IDR3.DPT).
        const DPT_ERR = 1 << 10;
    }
}

/// The global errors that are active: those whose SMMU_GERROR and SMMU_GERRORN bits differ (§7.5). Reserved bits
/// are ignored.
pub fn active(gerror: u32, gerrorn: u32) -> GlobalErrors {
    GlobalErrors::from_bits_truncate(gerror ^ gerrorn)
}

/// The value to write to SMMU_GERRORN to acknowledge `which` errors, given the current SMMU_GERROR and
/// SMMU_GERRORN: the GERRORN bit of each error that is both active and in `which` is toggled to equal GERROR.
///
/// Inactive errors in `which` are left alone (the specification forbids toggling them), as are active errors not
/// in `which`. Reserved bits of the result are zero.
pub fn acknowledge(gerror: u32, gerrorn: u32, which: GlobalErrors) -> u32 {
    let toggle = active(gerror, gerrorn) & which;
    (gerrorn ^ toggle.bits()) & GlobalErrors::all().bits()
}

impl fmt::Display for GlobalErrors {
    /// The names of the flags set, separated by `, `, such as
    /// `CMDQ_ERR, SFM_ERR (service failure mode: the SMMU stopped translating)`; `none` when empty. Bits that are
    /// not architected are shown as `reserved 0x..`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let mut first = true;
        let mut separate = |f: &mut fmt::Formatter<'_>| -> fmt::Result {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            Ok(())
        };
        for (name, flag) in self.iter_names() {
            separate(f)?;
            f.write_str(name)?;
            if flag == GlobalErrors::SFM_ERR {
                f.write_str(" (service failure mode: the SMMU stopped translating)")?;
            }
        }
        let reserved = self.bits() & !GlobalErrors::all().bits();
        if reserved != 0 {
            separate(f)?;
            write!(f, "reserved {reserved:#x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
