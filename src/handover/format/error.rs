//! Why a region could not be written or read: every refusal names the field and the offending value.

use core::fmt;

use super::super::{Extent, RecordKind};
use super::MAGIC;

/// Why [`encode`](super::encode) could not write a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// `out` is shorter than the region.
    BufferTooSmall {
        /// Bytes the region needs.
        needed: usize,
        /// Bytes `out` has.
        have: usize,
    },
    /// The region's extent is shorter than the region.
    RegionTooSmall {
        /// Bytes the region needs.
        needed: usize,
        /// The region's extent.
        region: Extent,
    },
    /// More SMMU instances than [`MAX_INSTANCES`](crate::handover::MAX_INSTANCES).
    TooManyInstances {
        /// Instances given.
        count: usize,
        /// The capacity.
        max: usize,
    },
    /// More records in one instance (or streams or extents in one of its records) than a count field holds.
    TooManyRecords {
        /// Index of the instance.
        instance: usize,
        /// Records given.
        count: usize,
        /// The capacity.
        max: usize,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FormatError::BufferTooSmall { needed, have } => {
                write!(f, "the handover region needs {needed} bytes, the buffer has {have}")
            }
            FormatError::RegionTooSmall { needed, region } => write!(
                f,
                "the handover region needs {needed} bytes, its extent {:#x}+{:#x} is shorter",
                region.base, region.len
            ),
            FormatError::TooManyInstances { count, max } => {
                write!(f, "{count} SMMU instances to record, a region holds at most {max}")
            }
            FormatError::TooManyRecords { instance, count, max } => write!(
                f,
                "{count} records for SMMU instance {instance}, a region holds at most {max} per instance"
            ),
        }
    }
}

impl core::error::Error for FormatError {}

/// Why [`decode`](super::decode) or [`validate_identity`](super::validate_identity) refused a region. Each variant carries the offending values; tokens
/// name the record at fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandoverError {
    /// Fewer bytes than the header or the header's total length says.
    Truncated {
        /// Bytes needed.
        needed: u64,
        /// Bytes present.
        have: u64,
    },
    /// The region does not start with [`MAGIC`]: never written, or overwritten.
    BadMagic {
        /// The first eight bytes found.
        found: [u8; 8],
    },
    /// A format version this image does not read.
    UnknownVersion {
        /// The region's version.
        found: u32,
        /// The versions this image reads.
        known: &'static [u32],
    },
    /// The header's total length is not the one its counts give.
    LengthMismatch {
        /// The header's total length.
        stated: u64,
        /// Where the region's identities and records end (version 2: what its counts give).
        expected: u64,
    },
    /// The CRC32C over the header and the body does not match: a torn or corrupted write.
    BadCrc {
        /// The header's CRC.
        stored: u32,
        /// The CRC of the bytes present.
        computed: u32,
    },
    /// The scratch the caller gave [`super::decode`] is shorter than [`super::scratch_words`] of the region: a
    /// caller's error, not the region's.
    ScratchTooSmall {
        /// Words needed.
        needed: usize,
        /// Words given.
        have: usize,
    },
    /// A reserved field, an unused slot or a field the record's kind does not use is not zero.
    ReservedNonZero {
        /// Which field.
        what: &'static str,
        /// Its byte offset in the region.
        offset: u64,
    },
    /// More SMMU instances than [`MAX_INSTANCES`](crate::handover::MAX_INSTANCES).
    TooManyInstances {
        /// The header's count.
        count: u32,
        /// The capacity.
        max: usize,
    },
    /// More records than the capacity, in one instance (`Some(index)`) or in the region (`None`).
    TooManyRecords {
        /// The instance, or `None` for the header's total.
        instance: Option<usize>,
        /// The count found.
        count: u32,
        /// The capacity.
        max: usize,
    },
    /// The instances' record counts do not add up to the header's.
    RecordCountMismatch {
        /// The header's count.
        header: u32,
        /// The sum of the instances' counts.
        instances: u64,
    },
    /// Two instances with the same register base.
    DuplicateInstance {
        /// The register base.
        base: u64,
    },
    /// A stream-table geometry that no SMMU has.
    BadStreamTable {
        /// Index of the instance.
        instance: usize,
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// The header's region extent wraps or is shorter than the region's total length.
    BadRegion {
        /// The header's region extent.
        region: Extent,
        /// The region's total length.
        needed: u64,
    },
    /// The header's pool is not the pool this boot preserved.
    PoolMismatch {
        /// The header's pool.
        recorded: Extent,
        /// The pool the caller expects.
        expected: Extent,
    },
    /// An unknown record kind.
    BadKind {
        /// The record.
        token: u64,
        /// The kind found.
        kind: u32,
    },
    /// Flags unknown or not those of the record's kind (a nested record has a parent and a guest context and no
    /// table; the other kinds a table and neither of the others).
    BadFlags {
        /// The record.
        token: u64,
        /// The kind.
        kind: u32,
        /// The flags found.
        flags: u32,
    },
    /// More streams or extents in a record than it can hold.
    TooManyEntries {
        /// The record.
        token: u64,
        /// "streams" or "extents".
        what: &'static str,
        /// The count found.
        count: u32,
        /// The capacity.
        max: usize,
    },
    /// A page-table shape the SMMU cannot walk.
    BadTableShape {
        /// The record.
        token: u64,
        /// Which constraint.
        what: &'static str,
        /// The offending value.
        value: u64,
    },
    /// A field with a value out of its range.
    BadValue {
        /// The record.
        token: u64,
        /// Which field and its rule.
        what: &'static str,
        /// The value found.
        value: u64,
    },
    /// A table not aligned as the SMMU needs.
    Misaligned {
        /// The record.
        token: u64,
        /// Which table.
        what: &'static str,
        /// Its address.
        address: u64,
        /// The alignment it needs.
        align: u64,
    },
    /// A table or an extent (or part of one) outside the preserved pool.
    OutsidePool {
        /// The record.
        token: u64,
        /// Which range.
        what: &'static str,
        /// Its first byte.
        address: u64,
        /// Its length.
        len: u64,
    },
    /// A table not inside one of its own record's extents.
    OutsideOwnExtents {
        /// The record.
        token: u64,
        /// Which table.
        what: &'static str,
        /// Its first byte.
        address: u64,
        /// Its length.
        len: u64,
    },
    /// Two extents share memory (`token_a == token_b` when both belong to one record).
    Overlap {
        /// One record.
        token_a: u64,
        /// Its extent.
        a: Extent,
        /// The other record.
        token_b: u64,
        /// Its extent.
        b: Extent,
    },
    /// An extent overlaps the handover region itself.
    OverlapsRegion {
        /// The record.
        token: u64,
        /// Its extent.
        extent: Extent,
        /// The region.
        region: Extent,
    },
    /// Two records of one instance with the same token.
    DuplicateToken(u64),
    /// A nested record whose parent is not in its instance.
    MissingParent {
        /// The nested record.
        token: u64,
        /// The parent it names.
        parent: u64,
    },
    /// A nested record whose parent is not a stage-2 record.
    ParentNotStage2 {
        /// The nested record.
        token: u64,
        /// The parent.
        parent: u64,
        /// The parent's kind.
        kind: RecordKind,
    },
    /// A nested record whose VMID is not its parent's.
    ParentVmidMismatch {
        /// The nested record.
        token: u64,
        /// Its VMID.
        vmid: u16,
        /// The parent's VMID.
        parent_vmid: u16,
    },
    /// One (StreamID, SubstreamID) in two places of one instance.
    DuplicateStream {
        /// StreamID.
        sid: u32,
        /// SubstreamID.
        ssid: u32,
        /// One record.
        token_a: u64,
        /// The other (or the same).
        token_b: u64,
    },
    /// A StreamID beyond the instance's stream table.
    StreamOutOfRange {
        /// The record.
        token: u64,
        /// StreamID.
        sid: u32,
        /// StreamID bits of the instance's stream table.
        sid_bits: u8,
    },
    /// Two stage-1 records of one instance and one regime with the same ASID.
    DuplicateAsid {
        /// The ASID.
        asid: u16,
        /// One record.
        token_a: u64,
        /// The other.
        token_b: u64,
    },
    /// Two stage-2 records of one instance with the same VMID.
    DuplicateVmid {
        /// The VMID.
        vmid: u16,
        /// One record.
        token_a: u64,
        /// The other.
        token_b: u64,
    },
    /// The recorded SMMU identity is not the probed one.
    IdentityMismatch {
        /// Which register.
        what: &'static str,
        /// The recorded value.
        recorded: u64,
        /// The probed value.
        probed: u64,
    },
}

impl fmt::Display for HandoverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use HandoverError as E;
        match *self {
            E::Truncated { needed, have } => {
                write!(f, "handover region truncated: {needed} bytes needed, {have} present")
            }
            E::BadMagic { found } => write!(f, "no handover region: magic {found:02x?}, expected {MAGIC:02x?}"),
            E::UnknownVersion { found, known } => match known.last() {
                Some(&newest) if found > newest => write!(
                    f,
                    "handover format version {found} was written by a newer image: this one writes version \
                     {newest} and reads versions {known:?}"
                ),
                _ => write!(
                    f,
                    "handover format version {found} is not one this image reads ({known:?})"
                ),
            },
            E::LengthMismatch { stated, expected } => write!(
                f,
                "handover header states {stated} bytes, but its identities and records end at byte {expected}"
            ),
            E::BadCrc { stored, computed } => write!(
                f,
                "handover CRC32C mismatch (torn or corrupted write): stored {stored:#010x}, computed {computed:#010x}"
            ),
            E::ScratchTooSmall { needed, have } => write!(
                f,
                "decoding the handover region needs {needed} words of scratch, {have} were given"
            ),
            E::ReservedNonZero { what, offset } => {
                write!(f, "handover field must be zero: {what} at byte offset {offset:#x}")
            }
            E::TooManyInstances { count, max } => write!(f, "{count} SMMU instances in the region, at most {max}"),
            E::TooManyRecords {
                instance: Some(i),
                count,
                max,
            } => write!(f, "{count} records in SMMU instance {i}, at most {max}"),
            E::TooManyRecords {
                instance: None,
                count,
                max,
            } => write!(f, "{count} records in the region, at most {max}"),
            E::RecordCountMismatch { header, instances } => {
                write!(f, "the header counts {header} records, the instances {instances}")
            }
            E::DuplicateInstance { base } => write!(f, "two SMMU instances with register base {base:#x}"),
            E::BadStreamTable { instance, what, value } => {
                write!(f, "SMMU instance {instance}: bad stream table {what} {value:#x}")
            }
            E::BadRegion { region, needed } => write!(
                f,
                "the region extent {:#x}+{:#x} does not hold the region's {needed} bytes",
                region.base, region.len
            ),
            E::PoolMismatch { recorded, expected } => write!(
                f,
                "the region describes pool {:#x}+{:#x}, this boot preserved {:#x}+{:#x}",
                recorded.base, recorded.len, expected.base, expected.len
            ),
            E::BadKind { token, kind } => write!(f, "record {token:#x}: unknown kind {kind}"),
            E::BadFlags { token, kind, flags } => {
                write!(f, "record {token:#x}: flags {flags:#x} do not fit kind {kind}")
            }
            E::TooManyEntries {
                token,
                what,
                count,
                max,
            } => {
                write!(f, "record {token:#x}: {count} {what}, at most {max}")
            }
            E::BadTableShape { token, what, value } => {
                write!(f, "record {token:#x}: bad page-table shape: {what} ({value})")
            }
            E::BadValue { token, what, value } => write!(f, "record {token:#x}: bad {what}: {value:#x}"),
            E::Misaligned {
                token,
                what,
                address,
                align,
            } => write!(f, "record {token:#x}: {what} at {address:#x} is not {align:#x}-aligned"),
            E::OutsidePool {
                token,
                what,
                address,
                len,
            } => write!(
                f,
                "record {token:#x}: {what} {address:#x}+{len:#x} lies outside the pool"
            ),
            E::OutsideOwnExtents {
                token,
                what,
                address,
                len,
            } => write!(
                f,
                "record {token:#x}: {what} {address:#x}+{len:#x} lies outside the record's own extents"
            ),
            E::Overlap { token_a, a, token_b, b } => write!(
                f,
                "extent {:#x}+{:#x} of record {token_a:#x} overlaps extent {:#x}+{:#x} of record {token_b:#x}",
                a.base, a.len, b.base, b.len
            ),
            E::OverlapsRegion { token, extent, region } => write!(
                f,
                "record {token:#x}: extent {:#x}+{:#x} overlaps the handover region {:#x}+{:#x}",
                extent.base, extent.len, region.base, region.len
            ),
            E::DuplicateToken(token) => write!(f, "two records with token {token:#x} in one SMMU instance"),
            E::MissingParent { token, parent } => {
                write!(
                    f,
                    "nested record {token:#x}: parent {parent:#x} is not in its SMMU instance"
                )
            }
            E::ParentNotStage2 { token, parent, kind } => {
                write!(
                    f,
                    "nested record {token:#x}: parent {parent:#x} is {kind:?}, not Stage2"
                )
            }
            E::ParentVmidMismatch {
                token,
                vmid,
                parent_vmid,
            } => write!(
                f,
                "nested record {token:#x}: VMID {vmid} is not its parent's {parent_vmid}"
            ),
            E::DuplicateStream {
                sid,
                ssid,
                token_a,
                token_b,
            } => write!(
                f,
                "stream {sid:#x} substream {ssid:#x} recorded twice (records {token_a:#x} and {token_b:#x})"
            ),
            E::StreamOutOfRange { token, sid, sid_bits } => write!(
                f,
                "record {token:#x}: StreamID {sid:#x} beyond the stream table's {sid_bits} bits"
            ),
            E::DuplicateAsid { asid, token_a, token_b } => {
                write!(f, "ASID {asid} used by records {token_a:#x} and {token_b:#x}")
            }
            E::DuplicateVmid { vmid, token_a, token_b } => {
                write!(f, "VMID {vmid} used by stage-2 records {token_a:#x} and {token_b:#x}")
            }
            E::IdentityMismatch { what, recorded, probed } => write!(
                f,
                "the region was written for another SMMU: {what} recorded {recorded:#x}, probed {probed:#x}"
            ),
        }
    }
}

impl core::error::Error for HandoverError {}
