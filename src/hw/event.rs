//! Event records (IHI 0070, "Event queue record formats") decoded into typed events, and SMMU_GERROR.
//!
//! A record is 32 bytes. Common to all types: bits \[7:0\] the event type, \[11\] SSV, \[31:12\] SubstreamID,
//! \[63:32\] StreamID. Translation-related faults add, in the second word: \[15:0\] STAG, \[31\] Stall, \[33\] PnU,
//! \[34\] InD, \[35\] RnW, \[39\] S2, \[41:40\] CLASS; the third word is the input address; the fourth holds
//! \[0\] NSIPA and IPA \[51:12\] (stage-2 faults), or the fetch address \[51:3\] (fetch aborts).
//! Decoding never panics: reserved bits are ignored and unknown types are kept whole.

use core::fmt;

use bitflags::bitflags;

/// Event type codes.
pub mod kind {
    /// Unsupported upstream transaction.
    pub const F_UUT: u8 = 0x01;
    /// StreamID out of the stream table's range.
    pub const C_BAD_STREAMID: u8 = 0x02;
    /// External abort fetching an STE.
    pub const F_STE_FETCH: u8 = 0x03;
    /// Invalid or illegal STE.
    pub const C_BAD_STE: u8 = 0x04;
    /// ATS translation request out of range or disallowed.
    pub const F_BAD_ATS_TREQ: u8 = 0x05;
    /// Non-substream transaction on a stream whose STE disables it.
    pub const F_STREAM_DISABLED: u8 = 0x06;
    /// Translation forbidden (ATS with translation disabled).
    pub const F_TRANSL_FORBIDDEN: u8 = 0x07;
    /// SubstreamID out of the CD table's range.
    pub const C_BAD_SUBSTREAMID: u8 = 0x08;
    /// External abort fetching a CD.
    pub const F_CD_FETCH: u8 = 0x09;
    /// Invalid or illegal CD.
    pub const C_BAD_CD: u8 = 0x0a;
    /// External abort on a translation table walk.
    pub const F_WALK_EABT: u8 = 0x0b;
    /// Translation fault.
    pub const F_TRANSLATION: u8 = 0x10;
    /// Address size fault.
    pub const F_ADDR_SIZE: u8 = 0x11;
    /// Access flag fault.
    pub const F_ACCESS: u8 = 0x12;
    /// Permission fault.
    pub const F_PERMISSION: u8 = 0x13;
    /// TLB conflict.
    pub const F_TLB_CONFLICT: u8 = 0x20;
    /// Configuration cache conflict.
    pub const F_CFG_CONFLICT: u8 = 0x21;
    /// PRI page request (stall-less PRI).
    pub const E_PAGE_REQUEST: u8 = 0x24;
    /// External abort fetching a VMS.
    pub const F_VMS_FETCH: u8 = 0x25;
    /// First IMPLEMENTATION DEFINED event type.
    pub const IMPDEF_FIRST: u8 = 0xe0;
    /// Last IMPLEMENTATION DEFINED event type.
    pub const IMPDEF_LAST: u8 = 0xef;
}

/// The architectural name of an event type (`None` for reserved codes; IMPLEMENTATION DEFINED codes are
/// named `IMPDEF`).
pub const fn kind_name(code: u8) -> Option<&'static str> {
    Some(match code {
        kind::F_UUT => "F_UUT",
        kind::C_BAD_STREAMID => "C_BAD_STREAMID",
        kind::F_STE_FETCH => "F_STE_FETCH",
        kind::C_BAD_STE => "C_BAD_STE",
        kind::F_BAD_ATS_TREQ => "F_BAD_ATS_TREQ",
        kind::F_STREAM_DISABLED => "F_STREAM_DISABLED",
        kind::F_TRANSL_FORBIDDEN => "F_TRANSL_FORBIDDEN",
        kind::C_BAD_SUBSTREAMID => "C_BAD_SUBSTREAMID",
        kind::F_CD_FETCH => "F_CD_FETCH",
        kind::C_BAD_CD => "C_BAD_CD",
        kind::F_WALK_EABT => "F_WALK_EABT",
        kind::F_TRANSLATION => "F_TRANSLATION",
        kind::F_ADDR_SIZE => "F_ADDR_SIZE",
        kind::F_ACCESS => "F_ACCESS",
        kind::F_PERMISSION => "F_PERMISSION",
        kind::F_TLB_CONFLICT => "F_TLB_CONFLICT",
        kind::F_CFG_CONFLICT => "F_CFG_CONFLICT",
        kind::E_PAGE_REQUEST => "E_PAGE_REQUEST",
        kind::F_VMS_FETCH => "F_VMS_FETCH",
        kind::IMPDEF_FIRST..=kind::IMPDEF_LAST => "IMPDEF",
        _ => return None,
    })
}

/// What a faulting access was doing when it faulted (the CLASS field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultClass {
    /// Fetching a CD (stage 2 fault on the CD's IPA).
    CdFetch,
    /// Walking stage-1 translation tables (stage 2 fault on a table's IPA).
    TableWalk,
    /// The input transaction itself.
    Input,
    /// Reserved encoding 0b11.
    Reserved,
}

/// The fields a translation-related fault carries (F_UUT, F_TRANSLATION, F_ADDR_SIZE, F_ACCESS, F_PERMISSION,
/// F_WALK_EABT, F_TLB_CONFLICT, F_TRANSL_FORBIDDEN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// StreamID.
    pub sid: u32,
    /// SubstreamID, when the transaction had one (SSV).
    pub ssid: Option<u32>,
    /// The transaction is stalled, waiting for CMD_RESUME / CMD_STALL_TERM with `stag`.
    pub stall: bool,
    /// Stall tag.
    pub stag: u16,
    /// Privileged (PnU).
    pub privileged: bool,
    /// Instruction fetch (InD).
    pub instruction: bool,
    /// Read (RnW = 1) or write.
    pub read: bool,
    /// The fault arose at stage 2 (S2).
    pub stage2: bool,
    /// What was being accessed.
    pub class: FaultClass,
    /// The transaction's input address.
    pub address: u64,
    /// For stage-2 faults: the IPA (bits \[51:12\]) and whether it is non-secure (NSIPA).
    pub ipa: Option<u64>,
}

/// A decoded event record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// F_UUT: the transaction's attributes are not supported.
    UnsupportedUpstream(Fault),
    /// C_BAD_STREAMID: the StreamID is beyond the stream table (or its level-1 descriptor is invalid).
    BadStreamId {
        /// StreamID.
        sid: u32,
        /// SubstreamID, when valid.
        ssid: Option<u32>,
    },
    /// F_STE_FETCH: fetching the STE aborted.
    SteFetch {
        /// StreamID.
        sid: u32,
        /// SubstreamID, when valid.
        ssid: Option<u32>,
        /// Physical address of the fetch.
        fetch_address: u64,
    },
    /// C_BAD_STE: the STE is invalid (V = 0) or illegal.
    BadSte {
        /// StreamID.
        sid: u32,
        /// SubstreamID, when valid.
        ssid: Option<u32>,
    },
    /// F_BAD_ATS_TREQ: an ATS translation request was refused.
    BadAtsRequest {
        /// StreamID.
        sid: u32,
        /// SubstreamID, when valid.
        ssid: Option<u32>,
        /// The requested address.
        address: u64,
        /// Privileged, execute, read request flags (word 1 bits \[33\], \[34\], \[35\]).
        flags: u8,
    },
    /// F_STREAM_DISABLED: the STE disallows transactions without a SubstreamID (S1DSS = terminate).
    StreamDisabled {
        /// StreamID.
        sid: u32,
    },
    /// F_TRANSL_FORBIDDEN: a translated (ATS) transaction where translation is not allowed.
    TranslationForbidden(Fault),
    /// C_BAD_SUBSTREAMID: the SubstreamID is beyond the CD table.
    BadSubstreamId {
        /// StreamID.
        sid: u32,
        /// SubstreamID.
        ssid: Option<u32>,
    },
    /// F_CD_FETCH: fetching a CD aborted.
    CdFetch {
        /// StreamID.
        sid: u32,
        /// SubstreamID, when valid.
        ssid: Option<u32>,
        /// Physical address of the fetch.
        fetch_address: u64,
    },
    /// C_BAD_CD: the CD is invalid or illegal.
    BadCd {
        /// StreamID.
        sid: u32,
        /// SubstreamID, when valid.
        ssid: Option<u32>,
    },
    /// F_WALK_EABT: a translation table walk aborted.
    WalkAbort {
        /// The faulting transaction.
        fault: Fault,
        /// Physical address of the descriptor fetch.
        fetch_address: u64,
    },
    /// F_TRANSLATION: no valid translation.
    Translation(Fault),
    /// F_ADDR_SIZE: an address beyond the configured size.
    AddressSize(Fault),
    /// F_ACCESS: access flag not set.
    Access(Fault),
    /// F_PERMISSION: the access is not permitted.
    Permission(Fault),
    /// F_TLB_CONFLICT: conflicting TLB entries.
    TlbConflict(Fault),
    /// F_CFG_CONFLICT: conflicting configuration cache entries.
    ConfigConflict {
        /// StreamID.
        sid: u32,
        /// SubstreamID, when valid.
        ssid: Option<u32>,
    },
    /// E_PAGE_REQUEST: a page request (PRI without a PRI queue).
    PageRequest {
        /// StreamID.
        sid: u32,
        /// SubstreamID, when valid.
        ssid: Option<u32>,
        /// The requested address.
        address: u64,
    },
    /// F_VMS_FETCH: fetching a Virtual Machine Structure aborted.
    VmsFetch {
        /// StreamID.
        sid: u32,
        /// Physical address of the fetch.
        fetch_address: u64,
    },
    /// An IMPLEMENTATION DEFINED event (types 0xE0..=0xEF).
    ImplementationDefined {
        /// The type.
        code: u8,
        /// StreamID.
        sid: u32,
        /// The whole record.
        raw: [u64; 4],
    },
    /// A reserved event type: the whole record.
    Unknown {
        /// The record.
        raw: [u64; 4],
    },
}

const fn bit(word: u64, n: u32) -> bool {
    (word >> n) & 1 != 0
}

const fn field(word: u64, low: u32, width: u32) -> u64 {
    (word >> low) & ((1u64 << width) - 1)
}

fn stream(raw: &[u64; 4]) -> (u32, Option<u32>) {
    let sid = field(raw[0], 32, 32) as u32;
    let ssid = bit(raw[0], 11).then_some(field(raw[0], 12, 20) as u32);
    (sid, ssid)
}

fn fault(raw: &[u64; 4]) -> Fault {
    let (sid, ssid) = stream(raw);
    let stage2 = bit(raw[1], 39);
    Fault {
        sid,
        ssid,
        stall: bit(raw[1], 31),
        stag: field(raw[1], 0, 16) as u16,
        privileged: bit(raw[1], 33),
        instruction: bit(raw[1], 34),
        read: bit(raw[1], 35),
        stage2,
        class: match field(raw[1], 40, 2) {
            0 => FaultClass::CdFetch,
            1 => FaultClass::TableWalk,
            2 => FaultClass::Input,
            _ => FaultClass::Reserved,
        },
        address: raw[2],
        ipa: stage2.then_some(raw[3] & (((1u64 << 52) - 1) & !0xfff)),
    }
}

fn fetch_address(raw: &[u64; 4]) -> u64 {
    raw[3] & (((1u64 << 52) - 1) & !0x7)
}

impl Event {
    /// Decodes a record. Never panics.
    pub fn decode(raw: &[u64; 4]) -> Event {
        let (sid, ssid) = stream(raw);
        match (raw[0] & 0xff) as u8 {
            kind::F_UUT => Event::UnsupportedUpstream(fault(raw)),
            kind::C_BAD_STREAMID => Event::BadStreamId { sid, ssid },
            kind::F_STE_FETCH => Event::SteFetch {
                sid,
                ssid,
                fetch_address: fetch_address(raw),
            },
            kind::C_BAD_STE => Event::BadSte { sid, ssid },
            kind::F_BAD_ATS_TREQ => Event::BadAtsRequest {
                sid,
                ssid,
                address: raw[2],
                flags: field(raw[1], 33, 3) as u8,
            },
            kind::F_STREAM_DISABLED => Event::StreamDisabled { sid },
            kind::F_TRANSL_FORBIDDEN => Event::TranslationForbidden(fault(raw)),
            kind::C_BAD_SUBSTREAMID => Event::BadSubstreamId { sid, ssid },
            kind::F_CD_FETCH => Event::CdFetch {
                sid,
                ssid,
                fetch_address: fetch_address(raw),
            },
            kind::C_BAD_CD => Event::BadCd { sid, ssid },
            kind::F_WALK_EABT => Event::WalkAbort {
                fault: fault(raw),
                fetch_address: fetch_address(raw),
            },
            kind::F_TRANSLATION => Event::Translation(fault(raw)),
            kind::F_ADDR_SIZE => Event::AddressSize(fault(raw)),
            kind::F_ACCESS => Event::Access(fault(raw)),
            kind::F_PERMISSION => Event::Permission(fault(raw)),
            kind::F_TLB_CONFLICT => Event::TlbConflict(fault(raw)),
            kind::F_CFG_CONFLICT => Event::ConfigConflict { sid, ssid },
            kind::E_PAGE_REQUEST => Event::PageRequest {
                sid,
                ssid,
                address: raw[2],
            },
            kind::F_VMS_FETCH => Event::VmsFetch {
                sid,
                fetch_address: fetch_address(raw),
            },
            code @ kind::IMPDEF_FIRST..=kind::IMPDEF_LAST => Event::ImplementationDefined { code, sid, raw: *raw },
            _ => Event::Unknown { raw: *raw },
        }
    }

    /// The event type code.
    pub fn code(&self) -> u8 {
        match self {
            Event::UnsupportedUpstream(_) => kind::F_UUT,
            Event::BadStreamId { .. } => kind::C_BAD_STREAMID,
            Event::SteFetch { .. } => kind::F_STE_FETCH,
            Event::BadSte { .. } => kind::C_BAD_STE,
            Event::BadAtsRequest { .. } => kind::F_BAD_ATS_TREQ,
            Event::StreamDisabled { .. } => kind::F_STREAM_DISABLED,
            Event::TranslationForbidden(_) => kind::F_TRANSL_FORBIDDEN,
            Event::BadSubstreamId { .. } => kind::C_BAD_SUBSTREAMID,
            Event::CdFetch { .. } => kind::F_CD_FETCH,
            Event::BadCd { .. } => kind::C_BAD_CD,
            Event::WalkAbort { .. } => kind::F_WALK_EABT,
            Event::Translation(_) => kind::F_TRANSLATION,
            Event::AddressSize(_) => kind::F_ADDR_SIZE,
            Event::Access(_) => kind::F_ACCESS,
            Event::Permission(_) => kind::F_PERMISSION,
            Event::TlbConflict(_) => kind::F_TLB_CONFLICT,
            Event::ConfigConflict { .. } => kind::F_CFG_CONFLICT,
            Event::PageRequest { .. } => kind::E_PAGE_REQUEST,
            Event::VmsFetch { .. } => kind::F_VMS_FETCH,
            Event::ImplementationDefined { code, .. } => *code,
            Event::Unknown { raw } => (raw[0] & 0xff) as u8,
        }
    }

    /// The architectural name (`"RESERVED"` for an unknown type).
    pub fn name(&self) -> &'static str {
        kind_name(self.code()).unwrap_or("RESERVED")
    }

    /// The translation fault details, for the fault types that carry them.
    pub fn fault(&self) -> Option<&Fault> {
        match self {
            Event::UnsupportedUpstream(f)
            | Event::TranslationForbidden(f)
            | Event::Translation(f)
            | Event::AddressSize(f)
            | Event::Access(f)
            | Event::Permission(f)
            | Event::TlbConflict(f)
            | Event::WalkAbort { fault: f, .. } => Some(f),
            _ => None,
        }
    }

    /// The StreamID (`None` only for a reserved type, whose layout is unknown).
    pub fn stream_id(&self) -> Option<u32> {
        if let Some(f) = self.fault() {
            return Some(f.sid);
        }
        match *self {
            Event::BadStreamId { sid, .. }
            | Event::SteFetch { sid, .. }
            | Event::BadSte { sid, .. }
            | Event::BadAtsRequest { sid, .. }
            | Event::StreamDisabled { sid }
            | Event::BadSubstreamId { sid, .. }
            | Event::CdFetch { sid, .. }
            | Event::BadCd { sid, .. }
            | Event::ConfigConflict { sid, .. }
            | Event::PageRequest { sid, .. }
            | Event::VmsFetch { sid, .. }
            | Event::ImplementationDefined { sid, .. } => Some(sid),
            _ => None,
        }
    }

    /// The SubstreamID, when the record has a valid one.
    pub fn substream_id(&self) -> Option<u32> {
        if let Some(f) = self.fault() {
            return f.ssid;
        }
        match *self {
            Event::BadStreamId { ssid, .. }
            | Event::SteFetch { ssid, .. }
            | Event::BadSte { ssid, .. }
            | Event::BadAtsRequest { ssid, .. }
            | Event::BadSubstreamId { ssid, .. }
            | Event::CdFetch { ssid, .. }
            | Event::BadCd { ssid, .. }
            | Event::ConfigConflict { ssid, .. }
            | Event::PageRequest { ssid, .. } => ssid,
            _ => None,
        }
    }

    /// The input address of the faulting transaction, for the types that report one.
    pub fn address(&self) -> Option<u64> {
        if let Some(f) = self.fault() {
            return Some(f.address);
        }
        match *self {
            Event::BadAtsRequest { address, .. } | Event::PageRequest { address, .. } => Some(address),
            _ => None,
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        if let Some(sid) = self.stream_id() {
            write!(f, " sid {sid:#x}")?;
        }
        if let Some(ssid) = self.substream_id() {
            write!(f, " ssid {ssid:#x}")?;
        }
        if let Some(fault) = self.fault() {
            write!(
                f,
                " {} {}{}at {:#x}, stage {}, class {}",
                if fault.read { "read" } else { "write" },
                if fault.instruction { "instruction " } else { "" },
                if fault.privileged { "privileged " } else { "" },
                fault.address,
                if fault.stage2 { 2 } else { 1 },
                match fault.class {
                    FaultClass::CdFetch => "CD fetch",
                    FaultClass::TableWalk => "table walk",
                    FaultClass::Input => "input",
                    FaultClass::Reserved => "reserved",
                }
            )?;
            if let Some(ipa) = fault.ipa {
                write!(f, ", IPA {ipa:#x}")?;
            }
            if fault.stall {
                write!(f, ", stalled (STAG {:#x})", fault.stag)?;
            }
        }
        match self {
            Event::SteFetch { fetch_address, .. }
            | Event::CdFetch { fetch_address, .. }
            | Event::VmsFetch { fetch_address, .. }
            | Event::WalkAbort { fetch_address, .. } => write!(f, ", fetch at PA {fetch_address:#x}"),
            Event::BadAtsRequest { address, .. } | Event::PageRequest { address, .. } => {
                write!(f, " at {address:#x}")
            }
            Event::ImplementationDefined { code, raw, .. } => write!(f, " (type {code:#04x}) {raw:#x?}"),
            Event::Unknown { raw } => write!(f, " (type {:#04x}) {raw:#x?}", raw[0] & 0xff),
            _ => Ok(()),
        }
    }
}

bitflags! {
    /// SMMU_GERROR bits: an error is active while its GERROR and GERRORN bits differ.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct GlobalErrors: u32 {
        /// Command queue error: see CMDQ_CONS.ERR.
        const CMDQ_ERR = 1 << 0;
        /// The event queue could not be written.
        const EVENTQ_ABT_ERR = 1 << 2;
        /// The PRI queue could not be written.
        const PRIQ_ABT_ERR = 1 << 3;
        /// A CMD_SYNC MSI write aborted.
        const MSI_CMDQ_ABT_ERR = 1 << 4;
        /// An event queue MSI write aborted.
        const MSI_EVENTQ_ABT_ERR = 1 << 5;
        /// A PRI queue MSI write aborted.
        const MSI_PRIQ_ABT_ERR = 1 << 6;
        /// A GERROR MSI write aborted.
        const MSI_GERROR_ABT_ERR = 1 << 7;
        /// Service failure mode: the SMMU stopped translating.
        const SFM_ERR = 1 << 8;
        /// Command queue control page error (ECMDQ).
        const CMDQP_ERR = 1 << 9;
        /// Device permission table lookup error.
        const DPT_ERR = 1 << 10;
    }
}

/// The active errors: bits where GERROR and GERRORN differ.
pub fn active(gerror: u32, gerrorn: u32) -> GlobalErrors {
    GlobalErrors::from_bits_truncate(gerror ^ gerrorn)
}

/// The GERRORN value that acknowledges `which` of the errors active in `gerror` / `gerrorn` (toggling their
/// GERRORN bits to match GERROR) and leaves the others active.
pub fn acknowledge(gerror: u32, gerrorn: u32, which: GlobalErrors) -> u32 {
    let ack = (gerror ^ gerrorn) & which.bits();
    gerrorn ^ ack
}

impl fmt::Display for GlobalErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let mut first = true;
        for (name, flag) in self.iter_names() {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            f.write_str(name)?;
            if flag == GlobalErrors::SFM_ERR {
                f.write_str(" (service failure mode: the SMMU stopped translating)")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::format;

    /// Builds a record from the common fields (IHI 0070 event record layout).
    fn record(code: u8, sid: u32, ssid: Option<u32>) -> [u64; 4] {
        let mut w0 = u64::from(code) | (u64::from(sid) << 32);
        if let Some(s) = ssid {
            w0 |= 1 << 11 | (u64::from(s) << 12);
        }
        [w0, 0, 0, 0]
    }

    #[test]
    fn bad_ste_from_qemu() {
        // What QEMU writes for edu's unconfigured stream: type 0x04, StreamID 0x10, no SubstreamID.
        let e = Event::decode(&[0x0000_0010_0000_0004, 0, 0, 0]);
        assert_eq!(e, Event::BadSte { sid: 0x10, ssid: None });
        assert_eq!(e.name(), "C_BAD_STE");
        assert_eq!(format!("{e}"), "C_BAD_STE sid 0x10");
    }

    #[test]
    fn translation_fault_fields() {
        let mut raw = record(kind::F_TRANSLATION, 0x10, Some(0x3));
        // STAG 0x1234, Stall, PnU, RnW (read), S2, CLASS = input (0b10).
        raw[1] = 0x1234 | 1 << 31 | 1 << 33 | 1 << 35 | 1 << 39 | 0b10 << 40;
        raw[2] = 0xdead_b000;
        raw[3] = 0x0008_1234_5000 | 1; // IPA bits [51:12] and NSIPA
        let e = Event::decode(&raw);
        let Event::Translation(f) = e else { panic!("{e:?}") };
        assert_eq!(
            f,
            Fault {
                sid: 0x10,
                ssid: Some(3),
                stall: true,
                stag: 0x1234,
                privileged: true,
                instruction: false,
                read: true,
                stage2: true,
                class: FaultClass::Input,
                address: 0xdead_b000,
                ipa: Some(0x0008_1234_5000),
            }
        );
        assert_eq!(
            format!("{e}"),
            "F_TRANSLATION sid 0x10 ssid 0x3 read privileged at 0xdeadb000, stage 2, class input, IPA 0x812345000, \
             stalled (STAG 0x1234)"
        );
    }

    #[test]
    fn every_type_decodes_to_its_variant() {
        for code in 0..=255u8 {
            let raw = record(code, 0x42, Some(7));
            let e = Event::decode(&raw);
            assert_eq!(e.code(), code);
            match kind_name(code) {
                Some(name) => {
                    assert_eq!(e.name(), name);
                    assert_eq!(e.stream_id(), Some(0x42), "{name}");
                    assert!(!matches!(e, Event::Unknown { .. }), "{name}");
                }
                None => assert_eq!(e, Event::Unknown { raw }),
            }
        }
    }

    #[test]
    fn fetch_aborts_carry_the_fetch_address() {
        let mut raw = record(kind::F_STE_FETCH, 1, None);
        raw[3] = 0xfff0_0000_4000_0ff8 | 0x7; // bits above 51 and below 3 are not the address
        assert_eq!(
            Event::decode(&raw),
            Event::SteFetch {
                sid: 1,
                ssid: None,
                fetch_address: 0x4000_0ff8
            }
        );
        let mut raw = record(kind::F_WALK_EABT, 1, None);
        raw[1] = 0b01 << 40;
        raw[3] = 0x1000;
        let e = Event::decode(&raw);
        assert!(matches!(e, Event::WalkAbort { fetch_address: 0x1000, fault } if fault.class == FaultClass::TableWalk));
    }

    #[test]
    fn global_errors_active_and_acknowledge() {
        assert_eq!(active(0b101, 0b001), GlobalErrors::EVENTQ_ABT_ERR);
        let gerror = 0x105;
        let gerrorn = 0;
        let all = active(gerror, gerrorn);
        assert_eq!(
            all,
            GlobalErrors::CMDQ_ERR | GlobalErrors::EVENTQ_ABT_ERR | GlobalErrors::SFM_ERR
        );
        let n = acknowledge(gerror, gerrorn, GlobalErrors::EVENTQ_ABT_ERR);
        assert_eq!(active(gerror, n), GlobalErrors::CMDQ_ERR | GlobalErrors::SFM_ERR);
        assert_eq!(
            format!("{}", GlobalErrors::CMDQ_ERR | GlobalErrors::SFM_ERR),
            "CMDQ_ERR, SFM_ERR (service failure mode: the SMMU stopped translating)"
        );
        // Acknowledging what is not active changes nothing.
        assert_eq!(acknowledge(gerror, n, GlobalErrors::EVENTQ_ABT_ERR), n);
    }

    proptest::proptest! {
        #[test]
        fn decoding_never_panics(w0: u64, w1: u64, w2: u64, w3: u64) {
            let raw = [w0, w1, w2, w3];
            let e = Event::decode(&raw);
            proptest::prop_assert_eq!(e.code(), (w0 & 0xff) as u8);
            let _ = format!("{e}");
        }

        #[test]
        fn acknowledging_everything_clears_every_error(gerror: u32, gerrorn: u32) {
            let n = acknowledge(gerror, gerrorn, GlobalErrors::all());
            proptest::prop_assert!(active(gerror, n).is_empty());
        }
    }
}
