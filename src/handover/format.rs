//! The handover region's byte format (see `docs/handover.md`): encoding, and decoding with full validation.
//!
//! A region is a [`HEADER_SIZE`]-byte header, then one [`IDENTITY_SIZE`]-byte identity per SMMU instance, then
//! every instance's records in instance order: in version 3 (written) each record is a [`RECORD_HEAD_SIZE`]-byte
//! head followed by its streams ([`STREAM_SIZE`] bytes each) and extents ([`EXTENT_SIZE`] bytes each), as many as
//! its head says; in version 2 (still read) each record is [`RECORD_SIZE`] bytes with room for 8 of each. Every field is little-endian, every
//! structure `#[repr(C)]` with explicit reserved fields (which must be zero) and a size that is a multiple of 8, so
//! every structure starts 64-bit aligned. The bytes are untrusted when decoded: they are read through `zerocopy`
//! (no `unsafe` here) and [`decode`] checks everything before it returns a record.

use crate::mem::MemoryHooks;
use core::mem::{offset_of, size_of};
use core::sync::atomic::{Ordering, fence};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use super::{
    DomainRecord, Entries, Extent, GuestRecord, InstanceRecords, MAX_INSTANCES, RecordKind, SmmuIdentity, StreamRecord,
    TableShape,
};

/// The first eight bytes of a region.
pub const MAGIC: [u8; 8] = *b"SMMU3HND";
/// The format version [`encode`] writes. Version 3: records of variable length (a head, then as many streams and
/// extents as it says), and a record flag for identity domains. Version 2: the preserved page tables carry their
/// live-entry counts in table-descriptor bits \[11:2\] and \[55:52\] (version 1 used \[55:51\], and bit 51 is
/// RES0): a version-1 region's tables would be misread, so it is refused.
pub const VERSION: u32 = 3;
/// Every version [`decode`] reads (the oldest first). A region of any other version is refused
/// ([`HandoverError::UnknownVersion`], naming its version and these).
pub const KNOWN_VERSIONS: &[u32] = &[2, 3];

/// Bytes of the header (every version).
pub const HEADER_SIZE: usize = size_of::<RawHeader>();
/// Bytes of one SMMU instance's identity (every version).
pub const IDENTITY_SIZE: usize = size_of::<RawIdentity>();
/// Bytes of one version-2 record.
pub const RECORD_SIZE: usize = size_of::<RawRecord>();
/// Bytes of a version-3 record's head.
pub const RECORD_HEAD_SIZE: usize = size_of::<RawRecordHead>();
/// Bytes of one stream of a version-3 record.
pub const STREAM_SIZE: usize = size_of::<RawStream>();
/// Bytes of one extent of a version-3 record.
pub const EXTENT_SIZE: usize = size_of::<RawExtent>();
/// Bytes of a version-2 region with `instances` identities and `records` records in all.
pub const fn v2_region_size(instances: usize, records: usize) -> usize {
    HEADER_SIZE + instances * IDENTITY_SIZE + records * RECORD_SIZE
}

/// Bytes of `record` in a version-3 region.
pub fn record_size(record: &DomainRecord) -> usize {
    RECORD_HEAD_SIZE + record.streams.len() * STREAM_SIZE + record.extents.len() * EXTENT_SIZE
}

/// Bytes of the version-3 region [`encode`] writes for `instances`.
pub fn region_size(instances: &[InstanceRecords]) -> usize {
    HEADER_SIZE
        + instances.len() * IDENTITY_SIZE
        + instances
            .iter()
            .flat_map(|i| i.records.iter())
            .map(|r| record_size(&r))
            .sum::<usize>()
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
/// Record flag (version 3): an identity domain ([`DomainRecord::identity`]); only with [`FLAG_TABLE`].
const FLAG_IDENTITY: u32 = 1 << 3;

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
    streams: [RawStream; V2_ENTRIES],
    extents: [RawExtent; V2_ENTRIES],
}

/// Streams, and extents, a version-2 record has room for.
pub(crate) const V2_ENTRIES: usize = 8;

/// A version-3 record's head: a version-2 record's fields up to the guest context (at the same offsets), with
/// 32-bit counts after them instead of 8-bit ones before; then `stream_count` [`RawStream`]s and `extent_count`
/// [`RawExtent`]s.
#[derive(Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawRecordHead {
    token: U64,
    kind: U32,
    flags: U32,
    asid: U16,
    vmid: U16,
    reserved0: [u8; 4],
    parent_token: U64,
    table: RawTable,
    guest: RawGuest,
    stream_count: U32,
    extent_count: U32,
}

const _: () = assert!(HEADER_SIZE == 96 && IDENTITY_SIZE == 64 && RECORD_SIZE == 384);
const _: () = assert!(RECORD_HEAD_SIZE == 72 && STREAM_SIZE == 24 && EXTENT_SIZE == 16);
const _: () = assert!(
    offset_of!(RawRecordHead, parent_token) == offset_of!(RawRecord, parent_token)
        && offset_of!(RawRecordHead, table) == offset_of!(RawRecord, table)
        && offset_of!(RawRecordHead, guest) == offset_of!(RawRecord, guest)
);
const _: () =
    assert!(HEADER_SIZE.is_multiple_of(8) && IDENTITY_SIZE.is_multiple_of(8) && RECORD_SIZE.is_multiple_of(8));

impl RawTable {
    fn shape(&self) -> TableShape {
        TableShape {
            root: self.root.get(),
            granule_log2: self.granule_log2,
            input_bits: self.input_bits,
            output_bits: self.output_bits,
            start_level: self.start_level,
            tables: self.tables.get(),
            empty: self.empty.get(),
        }
    }
}

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

/// A validated region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// The generation the writer gave.
    pub generation: u64,
    /// The region's own extent, as its header records it.
    pub region: Extent,
    /// The pool the records' memory comes from (equal to the pool [`decode`] was given).
    pub pool: Extent,
    /// Each SMMU instance's identity and records.
    pub instances: heapless::Vec<InstanceRecords<'a>, MAX_INSTANCES>,
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

/// Reads a header (the same in every version) without validating it.
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

/// The region and pool a region's header records, when `bytes` (the region from its first byte) start with a
/// header of a known version whose CRC holds over the length it states: how a pool set up over a region finds the
/// split between records and pool that the region was written with. `None` otherwise (nothing else is checked:
/// [`decode`] does that).
pub fn recorded_layout(bytes: &[u8]) -> Option<(Extent, Extent)> {
    let header = raw_header(bytes).ok()?;
    if header.magic != MAGIC || !KNOWN_VERSIONS.contains(&header.version.get()) {
        return None;
    }
    let total = usize::try_from(header.total_len.get()).ok()?;
    let region = bytes.get(..total).filter(|_| total >= HEADER_SIZE)?;
    (checksum(&region[..HEADER_SIZE], &region[HEADER_SIZE..]) == header.crc32c.get())
        .then(|| (header.region.get(), header.pool.get()))
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

/// Writes `r` at the start of `out` (at least [`record_size`] bytes) as a version-3 record.
fn write_record(r: &DomainRecord, out: &mut [u8]) {
    let mut raw = RawRecordHead::new_zeroed();
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
    if r.identity {
        flags |= FLAG_IDENTITY;
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
    // Checked by `encode`: at most u32::MAX of each.
    raw.stream_count = U32::new(r.streams.len() as u32);
    raw.extent_count = U32::new(r.extents.len() as u32);
    out[..RECORD_HEAD_SIZE].copy_from_slice(raw.as_bytes());
    let mut at = RECORD_HEAD_SIZE;
    // Exactly the counts written above: entries read as they are iterated (a live memory's runs) that are no
    // longer there leave zeroed slots (which no decode accepts), never bytes of another record.
    let streams_end = at + r.streams.len() * STREAM_SIZE;
    out[at..streams_end + r.extents.len() * EXTENT_SIZE].fill(0);
    for s in r.streams.iter().take(r.streams.len()) {
        let raw = RawStream {
            sid: U32::new(s.sid),
            ssid: U32::new(s.ssid),
            cd_table: U64::new(s.cd_table),
            cd_ssid_bits: s.cd_ssid_bits,
            cd_format: u8::from(s.cd_two_level),
            reserved: [0; 6],
        };
        out[at..at + STREAM_SIZE].copy_from_slice(raw.as_bytes());
        at += STREAM_SIZE;
    }
    at = streams_end;
    for e in r.extents.iter().take(r.extents.len()) {
        out[at..at + EXTENT_SIZE].copy_from_slice(RawExtent::new(e).as_bytes());
        at += EXTENT_SIZE;
    }
}

/// Writes a region describing `instances` into `out`, the start of the region's memory: the identities and
/// records first, then a release fence, then the header (with its CRC32C over header and body), so that a reader
/// never accepts a body without the header written for it. The caller cleans the caches to the point of coherency
/// after this returns (and before a reset). `encode` does not validate the records: [`decode`] of its output (a
/// cheap self-check) says whether the next image will accept them.
///
/// Returns the bytes written ([`region_size`] of `instances`).
///
/// # Errors
///
/// [`FormatError::TooManyInstances`] for more than [`MAX_INSTANCES`] instances, [`FormatError::TooManyRecords`] for
/// more than `u32::MAX` records in one (or streams or extents in one record), [`FormatError::BufferTooSmall`] when
/// `out` is shorter than the region, [`FormatError::RegionTooSmall`] when `region` is. Nothing is written on error.
pub fn encode(
    instances: &[InstanceRecords<'_>],
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
    let max = u32::MAX as usize;
    let mut records = 0usize;
    for (i, inst) in instances.iter().enumerate() {
        let too_many = |count| FormatError::TooManyRecords {
            instance: i,
            count,
            max,
        };
        if inst.records.len() > max {
            return Err(too_many(inst.records.len()));
        }
        for r in inst.records.iter() {
            if r.streams.len() > max || r.extents.len() > max {
                return Err(too_many(r.streams.len().max(r.extents.len())));
            }
        }
        records += inst.records.len();
    }
    if records > max {
        return Err(FormatError::TooManyRecords {
            instance: instances.len(),
            count: records,
            max,
        });
    }
    let total = region_size(instances);
    if out.len() < total {
        return Err(FormatError::BufferTooSmall {
            needed: total,
            have: out.len(),
        });
    }
    if region.len < total as u64 {
        return Err(FormatError::RegionTooSmall { needed: total, region });
    }
    // Everything is checked above: the writer cannot fail past this point, and writes what `region_size` says.
    let mut writer = RegionWriter::new(out, instances.len())?;
    for inst in instances {
        writer.instance(&inst.identity)?;
        for record in inst.records.iter() {
            writer.record(&record)?;
        }
    }
    let written = writer.finish(generation, region, pool)?;
    debug_assert_eq!(written, total);
    Ok(written)
}

/// Writes a version-3 region record by record, for a writer that cannot hold every record at once (the driver's
/// preserved domains, each read under its own lock): the identities first (each instance's record count patched
/// as its records come), then the records in instance order, then [`RegionWriter::finish`] writes the header and
/// its CRC. On an error the bytes written so far are garbage without a header: write into a staging buffer and
/// copy it to the region only once `finish` succeeds.
pub struct RegionWriter<'a> {
    out: &'a mut [u8],
    instances: usize,
    /// Instances begun so far.
    begun: usize,
    /// Records of the current instance, and in all.
    current: u32,
    records: u32,
    offset: usize,
}

impl<'a> RegionWriter<'a> {
    /// A region of `instances` SMMU instances, written into `out`.
    ///
    /// # Errors
    /// [`FormatError::TooManyInstances`], [`FormatError::BufferTooSmall`] for an `out` without room for the header
    /// and identities.
    pub fn new(out: &'a mut [u8], instances: usize) -> Result<Self, FormatError> {
        if instances > MAX_INSTANCES {
            return Err(FormatError::TooManyInstances {
                count: instances,
                max: MAX_INSTANCES,
            });
        }
        let offset = HEADER_SIZE + instances * IDENTITY_SIZE;
        if out.len() < offset {
            return Err(FormatError::BufferTooSmall {
                needed: offset,
                have: out.len(),
            });
        }
        Ok(RegionWriter {
            out,
            instances,
            begun: 0,
            current: 0,
            records: 0,
            offset,
        })
    }

    /// Begins the next instance: its identity (the records that follow are its own).
    ///
    /// # Errors
    /// [`FormatError::TooManyInstances`] past the count given to [`RegionWriter::new`].
    pub fn instance(&mut self, id: &SmmuIdentity) -> Result<(), FormatError> {
        if self.begun == self.instances {
            return Err(FormatError::TooManyInstances {
                count: self.begun + 1,
                max: self.instances,
            });
        }
        let raw = RawIdentity {
            base: U64::new(id.base),
            idr: id.idr.map(U32::new),
            iidr: U32::new(id.iidr),
            record_count: U32::ZERO,
            strtab_base: U64::new(id.strtab_base),
            strtab_format: id.strtab_format,
            strtab_sid_bits: id.strtab_sid_bits,
            strtab_split: id.strtab_split,
            reserved0: 0,
            reserved1: U32::ZERO,
            core_len: U64::new(id.core_len),
        };
        let at = HEADER_SIZE + self.begun * IDENTITY_SIZE;
        self.out[at..at + IDENTITY_SIZE].copy_from_slice(raw.as_bytes());
        self.begun += 1;
        self.current = 0;
        Ok(())
    }

    /// Appends a record of the current instance.
    ///
    /// # Errors
    /// [`FormatError::BufferTooSmall`] when it does not fit (the bytes the region would need so far, at least),
    /// [`FormatError::TooManyRecords`] beyond `u32::MAX` records, streams or extents, or before any instance.
    pub fn record(&mut self, r: &DomainRecord) -> Result<(), FormatError> {
        let max = u32::MAX as usize;
        let instance = self.begun.wrapping_sub(1);
        if self.begun == 0 || self.records as usize == max || r.streams.len() > max || r.extents.len() > max {
            return Err(FormatError::TooManyRecords {
                instance,
                count: (self.records as usize + 1).max(r.streams.len()).max(r.extents.len()),
                max,
            });
        }
        let size = record_size(r);
        let end = self.offset.checked_add(size).filter(|&end| end <= self.out.len());
        let Some(end) = end else {
            return Err(FormatError::BufferTooSmall {
                needed: self.offset.saturating_add(size),
                have: self.out.len(),
            });
        };
        write_record(r, &mut self.out[self.offset..end]);
        self.offset = end;
        self.current += 1;
        self.records += 1;
        let count = HEADER_SIZE + instance * IDENTITY_SIZE + offset_of!(RawIdentity, record_count);
        self.out[count..count + 4].copy_from_slice(&self.current.to_le_bytes());
        Ok(())
    }

    /// Bytes written so far (the region's length once finished).
    pub fn len(&self) -> usize {
        self.offset
    }

    /// Records written so far.
    pub fn records(&self) -> usize {
        self.records as usize
    }

    /// Whether nothing but the header and identities is written.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Writes the header (with its CRC32C over header and body) after a release fence, so that a reader never
    /// accepts a body without the header written for it. Returns the region's length.
    ///
    /// # Errors
    /// [`FormatError::TooManyInstances`] when fewer instances were begun than announced,
    /// [`FormatError::RegionTooSmall`] when `region` is shorter than what was written.
    pub fn finish(self, generation: u64, region: Extent, pool: Extent) -> Result<usize, FormatError> {
        if self.begun != self.instances {
            return Err(FormatError::TooManyInstances {
                count: self.begun,
                max: self.instances,
            });
        }
        let total = self.offset;
        if region.len < total as u64 {
            return Err(FormatError::RegionTooSmall { needed: total, region });
        }
        let mut header = RawHeader {
            magic: MAGIC,
            version: U32::new(VERSION),
            crc32c: U32::ZERO,
            total_len: U64::new(total as u64),
            generation: U64::new(generation),
            instance_count: U32::new(self.instances as u32),
            record_count: U32::new(self.records),
            region: RawExtent::new(region),
            pool: RawExtent::new(pool),
            reserved: [U64::ZERO; 3],
        };
        header.crc32c = U32::new(checksum(header.as_bytes(), &self.out[HEADER_SIZE..total]));
        // The body must be visible before the header that makes it valid.
        fence(Ordering::Release);
        self.out[..HEADER_SIZE].copy_from_slice(header.as_bytes());
        Ok(total)
    }
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

const _: () = assert!(MAX_INSTANCES <= 256);

impl super::sealed::Sealed for StreamRecord {
    const SIZE: usize = STREAM_SIZE;
    fn run(_: &(dyn crate::mem::FrameAllocator + Sync), _: u64) -> Option<Self> {
        None
    }
    fn end(&self) -> u64 {
        0
    }
    fn read(bytes: &[u8]) -> Self {
        let Ok((s, _)) = RawStream::read_from_prefix(bytes) else {
            return StreamRecord::default();
        };
        StreamRecord {
            sid: s.sid.get(),
            ssid: s.ssid.get(),
            cd_table: s.cd_table.get(),
            cd_ssid_bits: s.cd_ssid_bits,
            cd_two_level: s.cd_format == 1,
        }
    }
}

impl super::sealed::Sealed for Extent {
    const SIZE: usize = EXTENT_SIZE;
    fn read(bytes: &[u8]) -> Self {
        RawExtent::read_from_prefix(bytes).map_or(Extent { base: 0, len: 0 }, |(e, _)| e.get())
    }
    fn run(memory: &(dyn crate::mem::FrameAllocator + Sync), from: u64) -> Option<Self> {
        memory.handover_run(from)
    }
    fn end(&self) -> u64 {
        self.base.saturating_add(self.len)
    }
}

/// Reads the record of format `version` at the start of `bytes`, which [`decode`] validated, with its length:
/// `None` only past the end of `bytes` (never for a validated region).
pub(crate) fn read_record(bytes: &[u8], version: u32) -> Option<(DomainRecord<'_>, usize)> {
    let (head, streams, extents, len) = match version {
        2 => {
            let (raw, _) = RawRecord::read_from_prefix(bytes).ok()?;
            let (n, m) = (usize::from(raw.stream_count), usize::from(raw.extent_count));
            let streams = bytes.get(offset_of!(RawRecord, streams)..)?.get(..n * STREAM_SIZE)?;
            let extents = bytes.get(offset_of!(RawRecord, extents)..)?.get(..m * EXTENT_SIZE)?;
            let head = RawRecordHead::read_from_prefix(bytes).ok()?.0;
            (head, (streams, n), (extents, m), RECORD_SIZE)
        }
        _ => {
            let (head, _) = RawRecordHead::read_from_prefix(bytes).ok()?;
            let n = head.stream_count.get() as usize;
            let m = head.extent_count.get() as usize;
            let streams_at = RECORD_HEAD_SIZE;
            let extents_at = streams_at + n.checked_mul(STREAM_SIZE)?;
            let end = extents_at.checked_add(m.checked_mul(EXTENT_SIZE)?)?;
            let streams = bytes.get(streams_at..extents_at)?;
            let extents = bytes.get(extents_at..end)?;
            (head, (streams, n), (extents, m), end)
        }
    };
    let flags = head.flags.get();
    let g = &head.guest;
    let record = DomainRecord {
        token: head.token.get(),
        kind: decode::record_kind(head.kind.get()).unwrap_or(RecordKind::Stage1),
        asid: head.asid.get(),
        vmid: head.vmid.get(),
        table: (flags & FLAG_TABLE != 0).then(|| head.table.shape()),
        parent_token: (flags & FLAG_PARENT != 0).then(|| head.parent_token.get()),
        guest: (flags & FLAG_GUEST != 0).then(|| GuestRecord {
            cd_table_ipa: g.cd_table_ipa.get(),
            cd_max_log2: g.cd_max_log2,
            layout: g.layout,
            default_substream: g.default_substream,
        }),
        streams: Entries::from_bytes(streams.0, streams.1),
        extents: Entries::from_bytes(extents.0, extents.1),
        identity: version >= 3 && flags & FLAG_IDENTITY != 0,
    };
    Some((record, len))
}

mod decode;
mod error;
#[cfg(any(test, feature = "sample"))]
pub mod sample;

pub(crate) use decode::{V2_INSTANCES, V2_RECORDS};
pub use decode::{decode, scratch_words};
pub use error::{FormatError, HandoverError};

#[cfg(test)]
mod tests;
