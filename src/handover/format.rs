//! The handover region's byte format (see `docs/handover.md`): encoding, and decoding with full validation.
//!
//! A region is a [`HEADER_SIZE`]-byte header, then one [`IDENTITY_SIZE`]-byte identity per SMMU instance, then
//! every instance's records ([`RECORD_SIZE`] bytes each) in instance order. Every field is little-endian, every
//! structure `#[repr(C)]` with explicit reserved fields (which must be zero) and a size that is a multiple of 8, so
//! every structure starts 64-bit aligned. The bytes are untrusted when decoded: they are read through `zerocopy`
//! (no `unsafe` here) and [`decode`] checks everything before it returns a record.

use core::fmt;
use core::mem::{offset_of, size_of};
use core::sync::atomic::{Ordering, fence};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use super::{
    DomainRecord, Extent, GuestRecord, InstanceRecords, MAX_EXTENTS, MAX_INSTANCES, MAX_RECORDS, MAX_STREAMS,
    RecordKind, SmmuIdentity, StreamRecord, TableShape,
};

/// The first eight bytes of a region.
pub const MAGIC: [u8; 8] = *b"SMMU3HND";
/// The format version [`encode`] writes. Version 2: the preserved page tables carry their live-entry counts in
/// table-descriptor bits \[11:2\] and \[55:52\] (version 1 used \[55:51\], and bit 51 is RES0): a version-1
/// region's tables would be misread, so it is refused.
pub const VERSION: u32 = 2;
/// Every version [`decode`] reads (the oldest first).
pub const KNOWN_VERSIONS: &[u32] = &[2];

/// Bytes of the header (versions 1 and 2).
pub const HEADER_SIZE: usize = size_of::<RawHeader>();
/// Bytes of one SMMU instance's identity (versions 1 and 2).
pub const IDENTITY_SIZE: usize = size_of::<RawIdentity>();
/// Bytes of one record (versions 1 and 2).
pub const RECORD_SIZE: usize = size_of::<RawRecord>();
/// Bytes of a region that holds every record it can: [`MAX_INSTANCES`] instances of [`MAX_RECORDS`] records.
pub const MAX_REGION_SIZE: usize = region_size(MAX_INSTANCES, MAX_INSTANCES * MAX_RECORDS);

/// Bytes of a region with `instances` identities and `records` records in all.
pub const fn region_size(instances: usize, records: usize) -> usize {
    HEADER_SIZE + instances * IDENTITY_SIZE + records * RECORD_SIZE
}

const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// Offset of the header's CRC field: the CRC covers the header with these four bytes taken as zero.
const CRC_OFFSET: usize = offset_of!(RawHeader, crc32c);

/// Record flag: the record has a page table ([`DomainRecord::table`]).
const FLAG_TABLE: u32 = 1 << 0;
/// Record flag: the record names a parent ([`DomainRecord::parent_token`]).
const FLAG_PARENT: u32 = 1 << 1;
/// Record flag: the record carries a guest context ([`DomainRecord::guest`]).
const FLAG_GUEST: u32 = 1 << 2;

/// SubstreamID bits a CD table can have (the STE's S1CDMax).
const MAX_SSID_BITS: u8 = 20;
/// SubstreamID bits resolved by one leaf of a 2-level CD table.
const CD_SPLIT: u8 = 10;
/// Bytes of one CD.
const CD_BYTES: u64 = 64;

#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawExtent {
    base: U64,
    len: U64,
}

#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawHeader {
    magic: [u8; 8],
    version: U32,
    crc32c: U32,
    total_len: U64,
    generation: U64,
    instance_count: U32,
    record_count: U32,
    region: RawExtent,
    pool: RawExtent,
    reserved: [U64; 3],
}

#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawIdentity {
    base: U64,
    idr: [U32; 6],
    iidr: U32,
    record_count: U32,
    strtab_base: U64,
    strtab_format: u8,
    strtab_sid_bits: u8,
    strtab_split: u8,
    reserved0: u8,
    reserved1: U32,
    core_len: U64,
}

#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawTable {
    root: U64,
    granule_log2: u8,
    input_bits: u8,
    output_bits: u8,
    start_level: u8,
    tables: U16,
    empty: U16,
}

#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawGuest {
    cd_table_ipa: U64,
    cd_max_log2: u8,
    layout: u8,
    default_substream: u8,
    reserved: [u8; 5],
}

#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawStream {
    sid: U32,
    ssid: U32,
    cd_table: U64,
    cd_ssid_bits: u8,
    cd_format: u8,
    reserved: [u8; 6],
}

#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawRecord {
    token: U64,
    kind: U32,
    flags: U32,
    asid: U16,
    vmid: U16,
    stream_count: u8,
    extent_count: u8,
    reserved0: [u8; 2],
    parent_token: U64,
    table: RawTable,
    guest: RawGuest,
    streams: [RawStream; MAX_STREAMS],
    extents: [RawExtent; MAX_EXTENTS],
}

const _: () = assert!(HEADER_SIZE == 96 && IDENTITY_SIZE == 64 && RECORD_SIZE == 384);
const _: () =
    assert!(HEADER_SIZE.is_multiple_of(8) && IDENTITY_SIZE.is_multiple_of(8) && RECORD_SIZE.is_multiple_of(8));

impl RawExtent {
    fn new(e: Extent) -> Self {
        RawExtent {
            base: U64::new(e.base),
            len: U64::new(e.len),
        }
    }

    fn get(&self) -> Extent {
        Extent {
            base: self.base.get(),
            len: self.len.get(),
        }
    }
}

/// Why [`encode`] could not write a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// More SMMU instances than [`MAX_INSTANCES`].
    TooManyInstances {
        /// Instances given.
        count: usize,
        /// The capacity.
        max: usize,
    },
    /// More records in one instance than [`MAX_RECORDS`].
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

/// Why [`decode`] or [`validate_identity`] refused a region. Each variant carries the offending values; tokens
/// name the record at fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
        /// The length the instance and record counts give.
        expected: u64,
    },
    /// The CRC32C over the header and the body does not match: a torn or corrupted write.
    BadCrc {
        /// The header's CRC.
        stored: u32,
        /// The CRC of the bytes present.
        computed: u32,
    },
    /// A reserved field, an unused slot or a field the record's kind does not use is not zero.
    ReservedNonZero {
        /// Which field.
        what: &'static str,
        /// Its byte offset in the region.
        offset: u64,
    },
    /// More SMMU instances than [`MAX_INSTANCES`].
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
        count: u8,
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
            E::UnknownVersion { found, known } => {
                write!(
                    f,
                    "handover format version {found} is not one this image reads ({known:?})"
                )
            }
            E::LengthMismatch { stated, expected } => write!(
                f,
                "handover header states {stated} bytes, its instance and record counts give {expected}"
            ),
            E::BadCrc { stored, computed } => write!(
                f,
                "handover CRC32C mismatch (torn or corrupted write): stored {stored:#010x}, computed {computed:#010x}"
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

/// A validated region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// The generation the writer gave.
    pub generation: u64,
    /// The region's own extent, as its header records it.
    pub region: Extent,
    /// The pool the records' memory comes from (equal to the pool [`decode`] was given).
    pub pool: Extent,
    /// Each SMMU instance's identity and records.
    pub instances: heapless::Vec<InstanceRecords, MAX_INSTANCES>,
}

/// A region's header fields as they read, unvalidated: what a dump tool shows when [`decode`] refuses a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The first eight bytes.
    pub magic: [u8; 8],
    /// Format version.
    pub version: u32,
    /// CRC32C as stored.
    pub crc32c: u32,
    /// Total length in bytes.
    pub total_len: u64,
    /// Generation.
    pub generation: u64,
    /// SMMU instances.
    pub instance_count: u32,
    /// Records in all instances.
    pub record_count: u32,
    /// The region's own extent.
    pub region: Extent,
    /// The pool the records describe.
    pub pool: Extent,
}

/// Reads a version-1 header without validating it.
///
/// # Errors
///
/// [`HandoverError::Truncated`] when `bytes` is shorter than [`HEADER_SIZE`].
pub fn peek_header(bytes: &[u8]) -> Result<Header, HandoverError> {
    let raw = raw_header(bytes)?;
    Ok(Header {
        magic: raw.magic,
        version: raw.version.get(),
        crc32c: raw.crc32c.get(),
        total_len: raw.total_len.get(),
        generation: raw.generation.get(),
        instance_count: raw.instance_count.get(),
        record_count: raw.record_count.get(),
        region: raw.region.get(),
        pool: raw.pool.get(),
    })
}

fn raw_header(bytes: &[u8]) -> Result<RawHeader, HandoverError> {
    let truncated = HandoverError::Truncated {
        needed: HEADER_SIZE as u64,
        have: bytes.len() as u64,
    };
    let head = bytes.get(..HEADER_SIZE).ok_or(truncated)?;
    RawHeader::read_from_bytes(head).map_err(|_| truncated)
}

/// The CRC32C of a region: its header with the CRC field taken as zero, then its body.
fn checksum(header: &[u8], body: &[u8]) -> u32 {
    let mut digest = CRC32C.digest();
    digest.update(&header[..CRC_OFFSET]);
    digest.update(&[0; 4]);
    digest.update(&header[CRC_OFFSET + 4..]);
    digest.update(body);
    digest.finalize()
}

fn raw_record(r: &DomainRecord) -> RawRecord {
    let mut raw = RawRecord::new_zeroed();
    raw.token = U64::new(r.token);
    raw.kind = U32::new(r.kind as u32);
    raw.asid = U16::new(r.asid);
    raw.vmid = U16::new(r.vmid);
    let mut flags = 0;
    if let Some(t) = r.table {
        flags |= FLAG_TABLE;
        raw.table = RawTable {
            root: U64::new(t.root),
            granule_log2: t.granule_log2,
            input_bits: t.input_bits,
            output_bits: t.output_bits,
            start_level: t.start_level,
            tables: U16::new(t.tables),
            empty: U16::new(t.empty),
        };
    }
    if let Some(p) = r.parent_token {
        flags |= FLAG_PARENT;
        raw.parent_token = U64::new(p);
    }
    if let Some(g) = r.guest {
        flags |= FLAG_GUEST;
        raw.guest = RawGuest {
            cd_table_ipa: U64::new(g.cd_table_ipa),
            cd_max_log2: g.cd_max_log2,
            layout: g.layout,
            default_substream: g.default_substream,
            reserved: [0; 5],
        };
    }
    raw.flags = U32::new(flags);
    // The heapless capacities are MAX_STREAMS and MAX_EXTENTS, both below 256.
    raw.stream_count = r.streams.len() as u8;
    raw.extent_count = r.extents.len() as u8;
    for (slot, s) in raw.streams.iter_mut().zip(&r.streams) {
        *slot = RawStream {
            sid: U32::new(s.sid),
            ssid: U32::new(s.ssid),
            cd_table: U64::new(s.cd_table),
            cd_ssid_bits: s.cd_ssid_bits,
            cd_format: u8::from(s.cd_two_level),
            reserved: [0; 6],
        };
    }
    for (slot, e) in raw.extents.iter_mut().zip(&r.extents) {
        *slot = RawExtent::new(*e);
    }
    raw
}

/// Writes a region describing `instances` into `out`, the start of the region's memory: the identities and
/// records first, then a release fence, then the header (with its CRC32C over header and body), so that a reader
/// never accepts a body without the header written for it. The caller cleans the caches to the point of coherency
/// after this returns (and before a reset). `encode` does not validate the records: [`decode`] of its output (a
/// cheap self-check) says whether the next image will accept them.
///
/// Returns the bytes written ([`region_size`] of the instance and record counts).
///
/// # Errors
///
/// [`FormatError::TooManyInstances`] for more than [`MAX_INSTANCES`] instances, [`FormatError::TooManyRecords`] for
/// more than [`MAX_RECORDS`] records in one, [`FormatError::BufferTooSmall`] when `out` is shorter than the region,
/// [`FormatError::RegionTooSmall`] when `region` is. Nothing is written on error.
pub fn encode(
    instances: &[InstanceRecords],
    generation: u64,
    region: Extent,
    pool: Extent,
    out: &mut [u8],
) -> Result<usize, FormatError> {
    if instances.len() > MAX_INSTANCES {
        return Err(FormatError::TooManyInstances {
            count: instances.len(),
            max: MAX_INSTANCES,
        });
    }
    let mut records = 0;
    for (i, inst) in instances.iter().enumerate() {
        if inst.records.len() > MAX_RECORDS {
            return Err(FormatError::TooManyRecords {
                instance: i,
                count: inst.records.len(),
                max: MAX_RECORDS,
            });
        }
        records += inst.records.len();
    }
    let total = region_size(instances.len(), records);
    if out.len() < total {
        return Err(FormatError::BufferTooSmall {
            needed: total,
            have: out.len(),
        });
    }
    if region.len < total as u64 {
        return Err(FormatError::RegionTooSmall { needed: total, region });
    }
    let mut offset = HEADER_SIZE;
    for inst in instances {
        let id = &inst.identity;
        let raw = RawIdentity {
            base: U64::new(id.base),
            idr: id.idr.map(U32::new),
            iidr: U32::new(id.iidr),
            record_count: U32::new(inst.records.len() as u32),
            strtab_base: U64::new(id.strtab_base),
            strtab_format: id.strtab_format,
            strtab_sid_bits: id.strtab_sid_bits,
            strtab_split: id.strtab_split,
            reserved0: 0,
            reserved1: U32::ZERO,
            core_len: U64::new(id.core_len),
        };
        out[offset..offset + IDENTITY_SIZE].copy_from_slice(raw.as_bytes());
        offset += IDENTITY_SIZE;
    }
    for record in instances.iter().flat_map(|i| i.records.iter()) {
        out[offset..offset + RECORD_SIZE].copy_from_slice(raw_record(record).as_bytes());
        offset += RECORD_SIZE;
    }
    let mut header = RawHeader {
        magic: MAGIC,
        version: U32::new(VERSION),
        crc32c: U32::ZERO,
        total_len: U64::new(total as u64),
        generation: U64::new(generation),
        instance_count: U32::new(instances.len() as u32),
        record_count: U32::new(records as u32),
        region: RawExtent::new(region),
        pool: RawExtent::new(pool),
        reserved: [U64::ZERO; 3],
    };
    header.crc32c = U32::new(checksum(header.as_bytes(), &out[HEADER_SIZE..total]));
    // The body must be visible before the header that makes it valid.
    fence(Ordering::Release);
    out[..HEADER_SIZE].copy_from_slice(header.as_bytes());
    Ok(total)
}

/// Checks that the identity recorded for an instance is the SMMU this boot probed: register base, IDR0–5 and
/// IIDR. The stream-table geometry is not compared: a reset re-creates the stream table (and an image that takes
/// over a running SMMU adopts the one it finds), so the caller compares it with what it will use.
///
/// # Errors
///
/// [`HandoverError::IdentityMismatch`] naming the first register that differs, with both values.
pub fn validate_identity(instance: &SmmuIdentity, probed: &SmmuIdentity) -> Result<(), HandoverError> {
    const IDR: [&str; 6] = ["IDR0", "IDR1", "IDR2", "IDR3", "IDR4", "IDR5"];
    let mismatch = |what, recorded: u64, probed: u64| HandoverError::IdentityMismatch { what, recorded, probed };
    if instance.base != probed.base {
        return Err(mismatch("register base", instance.base, probed.base));
    }
    for (i, name) in IDR.iter().enumerate() {
        if instance.idr[i] != probed.idr[i] {
            return Err(mismatch(name, instance.idr[i].into(), probed.idr[i].into()));
        }
    }
    if instance.iidr != probed.iidr {
        return Err(mismatch("IIDR", instance.iidr.into(), probed.iidr.into()));
    }
    Ok(())
}

/// Decodes and validates a region (see `docs/handover.md` for the full list of checks): `bytes` starts at the
/// region's first byte and may run past its end; `pool` is the memory this boot kept aside for the preserved
/// domains. Nothing is returned unless every check passes, so every table, CD table and extent of the result lies
/// inside `pool`.
///
/// # Errors
///
/// The first check that fails, as a [`HandoverError`] carrying the offending values: [`HandoverError::BadMagic`]
/// for a region never written (or torn before its header), [`HandoverError::UnknownVersion`] for a format this
/// image does not read, [`HandoverError::Truncated`], [`HandoverError::BadCrc`] for a torn or corrupted write, and
/// the structural errors for records that are intact but inconsistent.
pub fn decode(bytes: &[u8], pool: Extent) -> Result<Decoded, HandoverError> {
    // Magic and version come first, at fixed offsets in every version.
    let magic: [u8; 8] = match bytes.get(..8).and_then(|b| b.try_into().ok()) {
        Some(m) => m,
        None => {
            return Err(HandoverError::Truncated {
                needed: HEADER_SIZE as u64,
                have: bytes.len() as u64,
            });
        }
    };
    if magic != MAGIC {
        return Err(HandoverError::BadMagic { found: magic });
    }
    let version = match bytes.get(8..12) {
        Some(v) => u32::from_le_bytes([v[0], v[1], v[2], v[3]]),
        None => {
            return Err(HandoverError::Truncated {
                needed: HEADER_SIZE as u64,
                have: bytes.len() as u64,
            });
        }
    };
    match version {
        // Version 2 has version 1's byte layout; only the page tables' count bits moved.
        2 => decode_v1(bytes, pool),
        found => Err(HandoverError::UnknownVersion {
            found,
            known: KNOWN_VERSIONS,
        }),
    }
}

fn nonzero(what: &'static str, offset: usize) -> HandoverError {
    HandoverError::ReservedNonZero {
        what,
        offset: offset as u64,
    }
}

fn decode_v1(bytes: &[u8], pool: Extent) -> Result<Decoded, HandoverError> {
    let header = raw_header(bytes)?;
    let instance_count = header.instance_count.get();
    let record_count = header.record_count.get();
    if instance_count as usize > MAX_INSTANCES {
        return Err(HandoverError::TooManyInstances {
            count: instance_count,
            max: MAX_INSTANCES,
        });
    }
    if record_count as usize > MAX_INSTANCES * MAX_RECORDS {
        return Err(HandoverError::TooManyRecords {
            instance: None,
            count: record_count,
            max: MAX_INSTANCES * MAX_RECORDS,
        });
    }
    let expected = region_size(instance_count as usize, record_count as usize);
    let stated = header.total_len.get();
    if stated != expected as u64 {
        return Err(HandoverError::LengthMismatch {
            stated,
            expected: expected as u64,
        });
    }
    let region_bytes = bytes.get(..expected).ok_or(HandoverError::Truncated {
        needed: stated,
        have: bytes.len() as u64,
    })?;
    let computed = checksum(&region_bytes[..HEADER_SIZE], &region_bytes[HEADER_SIZE..]);
    if computed != header.crc32c.get() {
        return Err(HandoverError::BadCrc {
            stored: header.crc32c.get(),
            computed,
        });
    }
    if header.reserved.as_bytes().iter().any(|&b| b != 0) {
        return Err(nonzero("header reserved", offset_of!(RawHeader, reserved)));
    }
    let region = header.region.get();
    if region.end().is_none() || region.len < stated {
        return Err(HandoverError::BadRegion { region, needed: stated });
    }
    let recorded_pool = header.pool.get();
    if recorded_pool != pool {
        return Err(HandoverError::PoolMismatch {
            recorded: recorded_pool,
            expected: pool,
        });
    }

    let mut decoded = Decoded {
        generation: header.generation.get(),
        region,
        pool,
        instances: heapless::Vec::new(),
    };
    let mut counts = [0usize; MAX_INSTANCES];
    let mut sum = 0u64;
    for (i, slot) in counts.iter_mut().enumerate().take(instance_count as usize) {
        let offset = HEADER_SIZE + i * IDENTITY_SIZE;
        let raw = RawIdentity::read_from_bytes(&region_bytes[offset..offset + IDENTITY_SIZE]).map_err(|_| {
            HandoverError::Truncated {
                needed: stated,
                have: bytes.len() as u64,
            }
        })?;
        let identity = decode_identity(&raw, i, offset)?;
        if decoded.instances.iter().any(|inst| inst.identity.base == identity.base) {
            return Err(HandoverError::DuplicateInstance { base: identity.base });
        }
        let count = raw.record_count.get();
        if count as usize > MAX_RECORDS {
            return Err(HandoverError::TooManyRecords {
                instance: Some(i),
                count,
                max: MAX_RECORDS,
            });
        }
        *slot = count as usize;
        sum += u64::from(count);
        // At most MAX_INSTANCES identities: the header's count was checked.
        let _ = decoded.instances.push(InstanceRecords {
            identity,
            records: heapless::Vec::new(),
        });
    }
    if sum != u64::from(record_count) {
        return Err(HandoverError::RecordCountMismatch {
            header: record_count,
            instances: sum,
        });
    }
    let mut offset = HEADER_SIZE + instance_count as usize * IDENTITY_SIZE;
    for (i, inst) in decoded.instances.iter_mut().enumerate() {
        for _ in 0..counts[i] {
            let raw = RawRecord::read_from_bytes(&region_bytes[offset..offset + RECORD_SIZE]).map_err(|_| {
                HandoverError::Truncated {
                    needed: stated,
                    have: bytes.len() as u64,
                }
            })?;
            let record = decode_record(&raw, offset, pool, region, inst.identity.strtab_sid_bits)?;
            // counts[i] <= MAX_RECORDS was checked.
            let _ = inst.records.push(record);
            offset += RECORD_SIZE;
        }
        check_instance(&inst.records)?;
    }
    check_overlaps(&decoded.instances)?;
    check_core_extents(&decoded.instances, pool)?;
    Ok(decoded)
}

fn decode_identity(raw: &RawIdentity, instance: usize, offset: usize) -> Result<SmmuIdentity, HandoverError> {
    if raw.reserved0 != 0 {
        return Err(nonzero(
            "identity reserved0",
            offset + offset_of!(RawIdentity, reserved0),
        ));
    }
    if raw.reserved1 != U32::ZERO {
        return Err(nonzero(
            "identity reserved1",
            offset + offset_of!(RawIdentity, reserved1),
        ));
    }
    let bad = |what, value: u64| HandoverError::BadStreamTable { instance, what, value };
    let sid_bits = raw.strtab_sid_bits;
    if sid_bits > 32 {
        return Err(bad("StreamID bits (at most 32)", sid_bits.into()));
    }
    match raw.strtab_format {
        0 if raw.strtab_split != 0 => return Err(bad("split of a linear table (must be 0)", raw.strtab_split.into())),
        0 => {}
        1 if !matches!(raw.strtab_split, 6 | 8 | 10) => {
            return Err(bad("2-level split (6, 8 or 10)", raw.strtab_split.into()));
        }
        1 => {}
        other => return Err(bad("format (0 linear, 1 2-level)", other.into())),
    }
    if !raw.strtab_base.get().is_multiple_of(64) {
        return Err(bad("base (64-byte aligned)", raw.strtab_base.get()));
    }
    Ok(SmmuIdentity {
        base: raw.base.get(),
        idr: raw.idr.map(|r| r.get()),
        iidr: raw.iidr.get(),
        strtab_base: raw.strtab_base.get(),
        strtab_format: raw.strtab_format,
        strtab_sid_bits: raw.strtab_sid_bits,
        strtab_split: raw.strtab_split,
        core_len: raw.core_len.get(),
    })
}

fn record_kind(kind: u32) -> Option<RecordKind> {
    Some(match kind {
        1 => RecordKind::Stage1,
        2 => RecordKind::Stage2,
        3 => RecordKind::Nested,
        4 => RecordKind::Stage1El2,
        _ => return None,
    })
}

/// Bytes of a root table of `shape`, or the constraint it breaks and the offending value. A stage-2 root may be up
/// to 16 concatenated tables.
fn table_bytes(shape: &TableShape, stage2: bool) -> Result<u64, (&'static str, u64)> {
    let g = shape.granule_log2;
    if !matches!(g, 12 | 14 | 16) {
        return Err(("granule log2 (12, 14 or 16)", g.into()));
    }
    if !(25..=48).contains(&shape.input_bits) {
        return Err(("input bits (25..=48)", shape.input_bits.into()));
    }
    if !(32..=52).contains(&shape.output_bits) {
        return Err(("output bits (32..=52)", shape.output_bits.into()));
    }
    if shape.start_level > 3 {
        return Err(("start level (0..=3)", shape.start_level.into()));
    }
    let stride = i32::from(g) - 3;
    let root_bits = i32::from(shape.input_bits) - i32::from(g) - (3 - i32::from(shape.start_level)) * stride;
    let max = if stage2 { stride + 4 } else { stride };
    if root_bits < 1 || root_bits > max {
        return Err((
            "start level inconsistent with granule and input bits",
            shape.start_level.into(),
        ));
    }
    Ok(8u64 << root_bits)
}

/// Bytes of a CD table (of its level-1 table when 2-level).
fn cd_table_bytes(ssid_bits: u8, two_level: bool) -> u64 {
    if two_level {
        8u64 << (ssid_bits - CD_SPLIT)
    } else {
        CD_BYTES << ssid_bits
    }
}

/// Checks a table at `address` of `len` bytes: aligned, inside the pool, inside one of `extents`.
fn check_table(
    token: u64,
    what: &'static str,
    address: u64,
    len: u64,
    align: u64,
    pool: Extent,
    extents: &[Extent],
) -> Result<(), HandoverError> {
    if !address.is_multiple_of(align) {
        return Err(HandoverError::Misaligned {
            token,
            what,
            address,
            align,
        });
    }
    if !pool.contains(address, len) {
        return Err(HandoverError::OutsidePool {
            token,
            what,
            address,
            len,
        });
    }
    if !extents.iter().any(|e| e.contains(address, len)) {
        return Err(HandoverError::OutsideOwnExtents {
            token,
            what,
            address,
            len,
        });
    }
    Ok(())
}

fn decode_record(
    raw: &RawRecord,
    offset: usize,
    pool: Extent,
    region: Extent,
    sid_bits: u8,
) -> Result<DomainRecord, HandoverError> {
    let token = raw.token.get();
    let kind_value = raw.kind.get();
    let kind = record_kind(kind_value).ok_or(HandoverError::BadKind {
        token,
        kind: kind_value,
    })?;
    let flags = raw.flags.get();
    let expected = match kind {
        RecordKind::Nested => FLAG_PARENT | FLAG_GUEST,
        RecordKind::Stage1 | RecordKind::Stage2 | RecordKind::Stage1El2 => FLAG_TABLE,
    };
    if flags != expected {
        return Err(HandoverError::BadFlags {
            token,
            kind: kind_value,
            flags,
        });
    }
    if raw.reserved0 != [0; 2] {
        return Err(nonzero("record reserved0", offset + offset_of!(RawRecord, reserved0)));
    }
    let stage1 = matches!(kind, RecordKind::Stage1 | RecordKind::Stage1El2);
    let (asid, vmid) = (raw.asid.get(), raw.vmid.get());
    if stage1 && vmid != 0 {
        return Err(nonzero(
            "VMID of a stage-1 record",
            offset + offset_of!(RawRecord, vmid),
        ));
    }
    if !stage1 && asid != 0 {
        return Err(nonzero(
            "ASID of a stage-2 or nested record",
            offset + offset_of!(RawRecord, asid),
        ));
    }
    let (stream_count, extent_count) = (raw.stream_count, raw.extent_count);
    if stream_count as usize > MAX_STREAMS {
        return Err(HandoverError::TooManyEntries {
            token,
            what: "streams",
            count: stream_count,
            max: MAX_STREAMS,
        });
    }
    if extent_count as usize > MAX_EXTENTS {
        return Err(HandoverError::TooManyEntries {
            token,
            what: "extents",
            count: extent_count,
            max: MAX_EXTENTS,
        });
    }
    let streams_at = offset + offset_of!(RawRecord, streams);
    let extents_at = offset + offset_of!(RawRecord, extents);
    for (i, s) in raw.streams.iter().enumerate().skip(stream_count as usize) {
        if s.as_bytes().iter().any(|&b| b != 0) {
            return Err(nonzero("unused stream slot", streams_at + i * size_of::<RawStream>()));
        }
    }
    for (i, e) in raw.extents.iter().enumerate().skip(extent_count as usize) {
        if e.as_bytes().iter().any(|&b| b != 0) {
            return Err(nonzero("unused extent slot", extents_at + i * size_of::<RawExtent>()));
        }
    }
    if flags & FLAG_PARENT == 0 && raw.parent_token != U64::ZERO {
        return Err(nonzero(
            "parent token of a record without parent",
            offset + offset_of!(RawRecord, parent_token),
        ));
    }
    let table_at = offset + offset_of!(RawRecord, table);
    if flags & FLAG_TABLE == 0 && raw.table.as_bytes().iter().any(|&b| b != 0) {
        return Err(nonzero("table of a record without table", table_at));
    }
    if raw.table.empty.get() > raw.table.tables.get() {
        return Err(HandoverError::BadValue {
            token: raw.token.get(),
            what: "table.empty (more emptied tables than tables)",
            value: u64::from(raw.table.empty.get()),
        });
    }
    let guest_at = offset + offset_of!(RawRecord, guest);
    if flags & FLAG_GUEST == 0 && raw.guest.as_bytes().iter().any(|&b| b != 0) {
        return Err(nonzero("guest context of a record without guest", guest_at));
    }
    if raw.guest.reserved != [0; 5] {
        return Err(nonzero("guest reserved", guest_at + offset_of!(RawGuest, reserved)));
    }

    let mut extents = heapless::Vec::new();
    for e in &raw.extents[..extent_count as usize] {
        let e = e.get();
        if e.len == 0 {
            return Err(HandoverError::BadValue {
                token,
                what: "extent length (must not be 0)",
                value: 0,
            });
        }
        if !pool.contains(e.base, e.len) {
            return Err(HandoverError::OutsidePool {
                token,
                what: "extent",
                address: e.base,
                len: e.len,
            });
        }
        if e.overlaps(&region) {
            return Err(HandoverError::OverlapsRegion {
                token,
                extent: e,
                region,
            });
        }
        // At most MAX_EXTENTS: checked above.
        let _ = extents.push(e);
    }

    let table = if flags & FLAG_TABLE != 0 {
        let t = &raw.table;
        let shape = TableShape {
            root: t.root.get(),
            granule_log2: t.granule_log2,
            input_bits: t.input_bits,
            output_bits: t.output_bits,
            start_level: t.start_level,
            tables: t.tables.get(),
            empty: t.empty.get(),
        };
        let len = table_bytes(&shape, kind == RecordKind::Stage2)
            .map_err(|(what, value)| HandoverError::BadTableShape { token, what, value })?;
        check_table(token, "root table", shape.root, len, len, pool, &extents)?;
        Some(shape)
    } else {
        None
    };

    let guest = if flags & FLAG_GUEST != 0 {
        let g = &raw.guest;
        let bad = |what, value: u8| HandoverError::BadValue {
            token,
            what,
            value: value.into(),
        };
        if g.cd_max_log2 > MAX_SSID_BITS {
            return Err(bad("guest S1CDMax (at most 20)", g.cd_max_log2));
        }
        if g.layout > 2 {
            return Err(bad("guest S1Fmt (0, 1 or 2)", g.layout));
        }
        if g.default_substream > 2 {
            return Err(bad("guest S1DSS (0, 1 or 2)", g.default_substream));
        }
        let ipa = g.cd_table_ipa.get();
        if !ipa.is_multiple_of(CD_BYTES) {
            return Err(HandoverError::Misaligned {
                token,
                what: "guest CD table (IPA)",
                address: ipa,
                align: CD_BYTES,
            });
        }
        Some(GuestRecord {
            cd_table_ipa: ipa,
            cd_max_log2: g.cd_max_log2,
            layout: g.layout,
            default_substream: g.default_substream,
        })
    } else {
        None
    };

    let mut streams = heapless::Vec::new();
    for (i, s) in raw.streams[..stream_count as usize].iter().enumerate() {
        let at = streams_at + i * size_of::<RawStream>();
        if s.reserved != [0; 6] {
            return Err(nonzero("stream reserved", at + offset_of!(RawStream, reserved)));
        }
        let (sid, ssid, cd_table) = (s.sid.get(), s.ssid.get(), s.cd_table.get());
        if sid_bits < 32 && sid >> sid_bits != 0 {
            return Err(HandoverError::StreamOutOfRange { token, sid, sid_bits });
        }
        let bad = |what, value: u64| HandoverError::BadValue { token, what, value };
        if stage1 {
            if cd_table == 0 {
                return Err(bad("CD table of a stage-1 stream (must not be 0)", 0));
            }
            if s.cd_ssid_bits > MAX_SSID_BITS {
                return Err(bad("CD table SubstreamID bits (at most 20)", s.cd_ssid_bits.into()));
            }
            let two_level = match s.cd_format {
                0 => false,
                1 if s.cd_ssid_bits > CD_SPLIT => true,
                1 => {
                    return Err(bad(
                        "SubstreamID bits of a 2-level CD table (above 10)",
                        s.cd_ssid_bits.into(),
                    ));
                }
                other => return Err(bad("CD table format (0 linear, 1 2-level)", other.into())),
            };
            if u64::from(ssid) >> s.cd_ssid_bits != 0 {
                return Err(bad("SubstreamID beyond its CD table", ssid.into()));
            }
            let len = cd_table_bytes(s.cd_ssid_bits, two_level);
            check_table(token, "CD table", cd_table, len, CD_BYTES, pool, &extents)?;
            let _ = streams.push(StreamRecord {
                sid,
                ssid,
                cd_table,
                cd_ssid_bits: s.cd_ssid_bits,
                cd_two_level: two_level,
            });
        } else {
            if cd_table != 0 || s.cd_ssid_bits != 0 || s.cd_format != 0 {
                return Err(nonzero(
                    "CD table of a stage-2 or nested stream",
                    at + offset_of!(RawStream, cd_table),
                ));
            }
            if ssid != 0 {
                return Err(bad(
                    "SubstreamID of a stage-2 or nested stream (must be 0)",
                    ssid.into(),
                ));
            }
            let _ = streams.push(StreamRecord {
                sid,
                ..StreamRecord::default()
            });
        }
    }

    Ok(DomainRecord {
        token,
        kind,
        asid,
        vmid,
        table,
        parent_token: (flags & FLAG_PARENT != 0).then(|| raw.parent_token.get()),
        guest,
        streams,
        extents,
    })
}

/// The checks across one instance's records: tokens, parents, streams, ASIDs and VMIDs.
fn check_instance(records: &[DomainRecord]) -> Result<(), HandoverError> {
    for (i, a) in records.iter().enumerate() {
        for b in &records[i + 1..] {
            if a.token == b.token {
                return Err(HandoverError::DuplicateToken(a.token));
            }
            let same_regime = a.kind == b.kind;
            if same_regime && matches!(a.kind, RecordKind::Stage1 | RecordKind::Stage1El2) && a.asid == b.asid {
                return Err(HandoverError::DuplicateAsid {
                    asid: a.asid,
                    token_a: a.token,
                    token_b: b.token,
                });
            }
            if same_regime && a.kind == RecordKind::Stage2 && a.vmid == b.vmid {
                return Err(HandoverError::DuplicateVmid {
                    vmid: a.vmid,
                    token_a: a.token,
                    token_b: b.token,
                });
            }
        }
    }
    for r in records {
        let Some(parent) = r.parent_token else { continue };
        let p = records
            .iter()
            .find(|p| p.token == parent)
            .ok_or(HandoverError::MissingParent { token: r.token, parent })?;
        if p.kind != RecordKind::Stage2 {
            return Err(HandoverError::ParentNotStage2 {
                token: r.token,
                parent,
                kind: p.kind,
            });
        }
        if p.vmid != r.vmid {
            return Err(HandoverError::ParentVmidMismatch {
                token: r.token,
                vmid: r.vmid,
                parent_vmid: p.vmid,
            });
        }
    }
    // Streams: sorted, duplicates are neighbours.
    let mut streams: heapless::Vec<(u32, u32, u64), { MAX_RECORDS * MAX_STREAMS }> = heapless::Vec::new();
    for r in records {
        for s in &r.streams {
            let _ = streams.push((s.sid, s.ssid, r.token));
        }
    }
    streams.sort_unstable();
    for pair in streams.windows(2) {
        if pair[0].0 == pair[1].0 && pair[0].1 == pair[1].1 {
            return Err(HandoverError::DuplicateStream {
                sid: pair[0].0,
                ssid: pair[0].1,
                token_a: pair[0].2,
                token_b: pair[1].2,
            });
        }
    }
    Ok(())
}

/// An SMMU left running keeps its own structures (stream table, spans) in the pool from `strtab_base` for
/// `core_len` bytes: inside the pool, and shared with no record's extent.
fn check_core_extents(instances: &[InstanceRecords], pool: Extent) -> Result<(), HandoverError> {
    for inst in instances {
        let id = &inst.identity;
        if id.core_len == 0 {
            continue;
        }
        let core = Extent {
            base: id.strtab_base,
            len: id.core_len,
        };
        if !pool.contains(core.base, core.len) {
            return Err(HandoverError::OutsidePool {
                token: 0,
                what: "the running SMMU's structures (identity core_len)",
                address: core.base,
                len: core.len,
            });
        }
        for other in instances {
            for r in &other.records {
                for e in &r.extents {
                    if e.overlaps(&core) {
                        return Err(HandoverError::Overlap {
                            token_a: 0,
                            a: core,
                            token_b: r.token,
                            b: *e,
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

/// No extent shares a byte with another, in any record of any instance. Extents are non-empty and do not wrap
/// (checked before): sorted by base, any overlap shows between neighbours.
fn check_overlaps(instances: &[InstanceRecords]) -> Result<(), HandoverError> {
    const ALL: usize = MAX_INSTANCES * MAX_RECORDS * MAX_EXTENTS;
    // (instance, record, extent) packed in 16 bits.
    let at = |key: u16| {
        let r = &instances[usize::from(key >> 8)].records[usize::from((key >> 3) & 0x1f)];
        (r.token, r.extents[usize::from(key & 7)])
    };
    let mut keys: heapless::Vec<u16, ALL> = heapless::Vec::new();
    for (i, inst) in instances.iter().enumerate() {
        for (r, record) in inst.records.iter().enumerate() {
            for e in 0..record.extents.len() {
                let _ = keys.push(((i as u16) << 8) | ((r as u16) << 3) | e as u16);
            }
        }
    }
    keys.sort_unstable_by_key(|&k| at(k).1.base);
    for pair in keys.windows(2) {
        let (token_a, a) = at(pair[0]);
        let (token_b, b) = at(pair[1]);
        if a.overlaps(&b) {
            return Err(HandoverError::Overlap { token_a, a, token_b, b });
        }
    }
    Ok(())
}

const _: () = assert!(MAX_EXTENTS <= 8 && MAX_RECORDS <= 32 && MAX_INSTANCES <= 256);

#[cfg(any(test, feature = "sample"))]
pub mod sample;

#[cfg(test)]
mod tests;
