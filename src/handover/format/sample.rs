//! Valid sample regions, a mutator for them and the pool invariant: shared by the format's tests, the stable fuzzer
//! (`fuzz/`) and tools. Built for the crate's tests and with the `sample` feature only.

extern crate alloc;

use alloc::vec::Vec;

use super::decode::{cd_table_bytes, table_bytes};
use super::{
    CRC_OFFSET, EXTENT_SIZE, FormatError, HEADER_SIZE, IDENTITY_SIZE, RECORD_HEAD_SIZE, RECORD_SIZE, RawHeader,
    RawIdentity, RawRecord, RawStream, RawTable, STREAM_SIZE, checksum,
};
use super::{Decoded, DomainRecord, Extent, InstanceRecords, MAX_INSTANCES};
use super::{SmmuIdentity, encode};
use crate::handover::{Entries, GuestRecord, RecordKind, Records, StreamRecord, TableShape};
use core::mem::offset_of;

/// Records the samples hold per instance, at most.
pub const MAX_SAMPLE_RECORDS: usize = 32;
/// Streams, and extents, a sample record holds at most.
pub const MAX_SAMPLE_ENTRIES: usize = 8;

/// A record with its own streams and extents: what the samples and tests build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedRecord {
    /// The record (its `streams` and `extents` are ignored: those below are its).
    pub head: DomainRecord<'static>,
    /// Its streams.
    pub streams: Vec<StreamRecord>,
    /// Its extents.
    pub extents: Vec<Extent>,
}

impl OwnedRecord {
    /// The record, over its own streams and extents.
    pub fn record(&self) -> DomainRecord<'_> {
        DomainRecord {
            streams: Entries::from_slice(&self.streams),
            extents: Entries::from_slice(&self.extents),
            ..self.head
        }
    }

    /// The record of `r` (a decoded one, say), owned.
    pub fn of(r: &DomainRecord<'_>) -> Self {
        OwnedRecord {
            head: DomainRecord {
                streams: Entries::empty(),
                extents: Entries::empty(),
                ..*r
            },
            streams: r.streams.iter().collect(),
            extents: r.extents.iter().collect(),
        }
    }
}

impl core::ops::Deref for OwnedRecord {
    type Target = DomainRecord<'static>;
    fn deref(&self) -> &DomainRecord<'static> {
        &self.head
    }
}

impl core::ops::DerefMut for OwnedRecord {
    fn deref_mut(&mut self) -> &mut DomainRecord<'static> {
        &mut self.head
    }
}

/// One SMMU's records, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedInstance {
    /// The SMMU.
    pub identity: SmmuIdentity,
    /// Its records.
    pub records: Vec<OwnedRecord>,
}

impl OwnedInstance {
    /// The records of `i`, owned.
    pub fn of(i: &InstanceRecords<'_>) -> Self {
        OwnedInstance {
            identity: i.identity,
            records: i.records.iter().map(|r| OwnedRecord::of(&r)).collect(),
        }
    }
}

/// Runs `f` over `instances` as the format's views.
pub fn with_views<R>(instances: &[OwnedInstance], f: impl FnOnce(&[InstanceRecords<'_>]) -> R) -> R {
    let records: Vec<Vec<DomainRecord<'_>>> = instances
        .iter()
        .map(|i| i.records.iter().map(OwnedRecord::record).collect())
        .collect();
    let views: Vec<InstanceRecords<'_>> = instances
        .iter()
        .zip(&records)
        .map(|(i, r)| InstanceRecords {
            identity: i.identity,
            records: Records::from_slice(r),
        })
        .collect();
    f(&views)
}

/// [`encode`] of owned instances.
///
/// # Errors
/// As [`encode`].
pub fn encode_owned(
    instances: &[OwnedInstance],
    generation: u64,
    region: Extent,
    pool: Extent,
    out: &mut [u8],
) -> Result<usize, FormatError> {
    with_views(instances, |views| encode(views, generation, region, pool, out))
}

/// [`super::decode`] with scratch of its own.
///
/// # Errors
/// As [`super::decode`].
pub fn decode(bytes: &[u8], pool: Extent) -> Result<Decoded<'_>, super::HandoverError> {
    let mut scratch = alloc::vec![0u64; super::scratch_words(bytes.len())];
    super::decode(bytes, pool, &mut scratch)
}

/// The owned form of a decoded region's instances (what tests compare).
pub fn owned(decoded: &Decoded<'_>) -> Vec<OwnedInstance> {
    decoded.instances.iter().map(OwnedInstance::of).collect()
}

/// The pool of every sample (256 MiB).
pub const POOL: Extent = Extent {
    base: 0x8000_0000,
    len: 0x1000_0000,
};
/// The region extent of every sample (1 MiB below the pool).
pub const REGION: Extent = Extent {
    base: 0x7ff0_0000,
    len: 0x10_0000,
};
/// A buffer size that holds any sample and any mutation of one.
pub const BUFFER_SIZE: usize = HEADER_SIZE
    + MAX_INSTANCES * IDENTITY_SIZE
    + MAX_INSTANCES * MAX_SAMPLE_RECORDS * (RECORD_HEAD_SIZE + MAX_SAMPLE_ENTRIES * (STREAM_SIZE + EXTENT_SIZE))
    + RECORD_SIZE;

/// Pool memory is handed out in chunks of this size (aligned).
const CHUNK: u64 = 0x1_0000;

/// A small deterministic generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose sequence `seed` fixes.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

/// Stage-1 shapes (granule, input, output, start level) the samples use, all with root tables of at most 64 KiB.
const STAGE1_SHAPES: [(u8, u8, u8, u8); 4] = [(12, 48, 48, 0), (16, 48, 48, 1), (14, 47, 44, 1), (12, 39, 40, 1)];
/// Stage-2 shapes, some with concatenated roots.
const STAGE2_SHAPES: [(u8, u8, u8, u8); 4] = [(12, 40, 44, 1), (12, 42, 44, 1), (16, 42, 44, 2), (14, 36, 40, 2)];
/// SubstreamID bits of the samples' CD tables (above 10: 2-level).
const SSID_BITS: [u8; 6] = [0, 1, 2, 4, 11, 12];

/// Valid instances (1 to [`MAX_INSTANCES`], each with up to `max_records` records of every kind) whose memory
/// lies in [`POOL`]: [`super::decode`] accepts their encoding.
pub fn instances(rng: &mut Rng, max_records: usize) -> Vec<OwnedInstance> {
    let mut out = Vec::new();
    let mut cursor = POOL.base;
    let count = 1 + rng.below(MAX_INSTANCES as u64) as usize;
    for i in 0..count {
        let mut idr = [0u32; 6];
        for r in &mut idr {
            *r = rng.next_u64() as u32;
        }
        let identity = SmmuIdentity {
            base: 0x0905_0000 + i as u64 * 0x2_0000,
            idr,
            iidr: rng.next_u64() as u32,
            strtab_base: 0x4000_0000 + i as u64 * 0x10_0000,
            strtab_format: 1,
            strtab_sid_bits: 16,
            strtab_split: 8,
            core_len: 0,
        };
        let mut records: Vec<OwnedRecord> = Vec::new();
        let n = rng.below(max_records.min(MAX_SAMPLE_RECORDS) as u64 + 1) as usize;
        let (mut next_sid, mut next_asid, mut next_vmid) = (0u32, 1u16, 1u16);
        for _ in 0..n {
            let stage2: Vec<(u64, u16)> = records
                .iter()
                .filter(|r| r.head.kind == RecordKind::Stage2)
                .map(|r| (r.head.token, r.head.vmid))
                .collect();
            let kind = match rng.below(4) {
                0 => RecordKind::Stage1,
                1 => RecordKind::Stage2,
                2 if !stage2.is_empty() => RecordKind::Nested,
                2 => RecordKind::Stage2,
                _ => RecordKind::Stage1El2,
            };
            let token = loop {
                let t = if rng.chance(1, 4) {
                    rng.below(64)
                } else {
                    rng.next_u64()
                };
                if !records.iter().any(|r| r.head.token == t) {
                    break t;
                }
            };
            let nested = kind == RecordKind::Nested;
            let mut extents = Vec::new();
            let extent_count = if nested { rng.below(3) } else { 1 + rng.below(3) };
            for e in 0..extent_count {
                cursor += rng.below(2) * CHUNK;
                let chunks = if e == 0 && !nested { 2 } else { 1 + rng.below(3) };
                extents.push(Extent {
                    base: cursor,
                    len: chunks * CHUNK,
                });
                cursor += chunks * CHUNK;
            }
            let stage1 = matches!(kind, RecordKind::Stage1 | RecordKind::Stage1El2);
            let table = (!nested).then(|| {
                let shapes = if stage1 { STAGE1_SHAPES } else { STAGE2_SHAPES };
                let (granule_log2, input_bits, output_bits, start_level) = shapes[rng.below(4) as usize];
                let tables = rng.below(600) as u16;
                TableShape {
                    root: extents[0].base,
                    granule_log2,
                    input_bits,
                    output_bits,
                    start_level,
                    tables,
                    empty: if tables == 0 {
                        0
                    } else {
                        rng.below(u64::from(tables)) as u16
                    },
                }
            });
            let mut streams = Vec::new();
            for s in 0..rng.below(MAX_SAMPLE_ENTRIES as u64 + 1) {
                let sid = next_sid;
                next_sid += 1 + rng.below(3) as u32;
                let stream = if stage1 {
                    let bits = SSID_BITS[rng.below(SSID_BITS.len() as u64) as usize];
                    StreamRecord {
                        sid,
                        ssid: rng.below(1 << bits) as u32,
                        cd_table: extents[0].base + CHUNK + s * 0x2000,
                        cd_ssid_bits: bits,
                        cd_two_level: bits > 10,
                    }
                } else {
                    StreamRecord {
                        sid,
                        ..StreamRecord::default()
                    }
                };
                streams.push(stream);
            }
            let (asid, vmid, parent_token, guest) = match kind {
                RecordKind::Stage1 | RecordKind::Stage1El2 => {
                    next_asid += 1 + rng.below(3) as u16;
                    (next_asid, 0, None, None)
                }
                RecordKind::Stage2 => {
                    next_vmid += 1 + rng.below(3) as u16;
                    (0, next_vmid, None, None)
                }
                RecordKind::Nested => {
                    let (parent, vmid) = stage2[rng.below(stage2.len() as u64) as usize];
                    let guest = GuestRecord {
                        cd_table_ipa: rng.below(1 << 30) * 64,
                        cd_max_log2: rng.below(21) as u8,
                        layout: rng.below(3) as u8,
                        default_substream: rng.below(3) as u8,
                    };
                    (0, vmid, Some(parent), Some(guest))
                }
            };
            records.push(OwnedRecord {
                head: DomainRecord {
                    token,
                    kind,
                    asid,
                    vmid,
                    table,
                    parent_token,
                    guest,
                    streams: Entries::empty(),
                    extents: Entries::empty(),
                    identity: false,
                },
                streams,
                extents,
            });
        }
        out.push(OwnedInstance { identity, records });
    }
    out
}

/// Recomputes the CRC of a (possibly mutated) region in place, over the bytes its header's total length names (or
/// all of `bytes` when fewer), so that a mutation reaches the structural checks. False when `bytes` holds no
/// header.
pub fn reseal(bytes: &mut [u8]) -> bool {
    if bytes.len() < HEADER_SIZE {
        return false;
    }
    let total = u64::from_le_bytes(read8(bytes, offset_of!(RawHeader, total_len)));
    let end = usize::try_from(total)
        .unwrap_or(usize::MAX)
        .clamp(HEADER_SIZE, bytes.len());
    let crc = checksum(&bytes[..HEADER_SIZE], &bytes[HEADER_SIZE..end]);
    bytes[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    true
}

fn read8(bytes: &[u8], at: usize) -> [u8; 8] {
    let mut v = [0; 8];
    v.copy_from_slice(&bytes[at..at + 8]);
    v
}

fn read4(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn write_le(bytes: &mut [u8], at: usize, width: usize, value: u64) {
    if at + width <= bytes.len() {
        bytes[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
    }
}

/// Offsets and widths of a record's fields, for mutations that hit whole fields.
const RECORD_FIELDS: [(usize, usize); 16] = [
    (offset_of!(RawRecord, token), 8),
    (offset_of!(RawRecord, kind), 4),
    (offset_of!(RawRecord, flags), 4),
    (offset_of!(RawRecord, asid), 2),
    (offset_of!(RawRecord, vmid), 2),
    (offset_of!(RawRecord, stream_count), 1),
    (offset_of!(RawRecord, extent_count), 1),
    (offset_of!(RawRecord, parent_token), 8),
    (offset_of!(RawRecord, table) + offset_of!(RawTable, root), 8),
    (offset_of!(RawRecord, table) + offset_of!(RawTable, granule_log2), 1),
    (offset_of!(RawRecord, table) + offset_of!(RawTable, input_bits), 1),
    (offset_of!(RawRecord, table) + offset_of!(RawTable, start_level), 1),
    (offset_of!(RawRecord, streams) + offset_of!(RawStream, sid), 4),
    (offset_of!(RawRecord, streams) + offset_of!(RawStream, cd_table), 8),
    (offset_of!(RawRecord, extents), 8),
    (offset_of!(RawRecord, extents) + 8, 8),
];

/// Where the records start and how many the header claims (clamped to the buffer).
fn records_layout(buf: &[u8], len: usize) -> (usize, usize) {
    if len < HEADER_SIZE {
        return (len, 0);
    }
    let instances = (read4(buf, offset_of!(RawHeader, instance_count)) as usize).min(MAX_INSTANCES);
    let start = HEADER_SIZE + instances * IDENTITY_SIZE;
    (start, len.saturating_sub(start) / RECORD_SIZE)
}

/// Mutates the region in `buf[..len]` (one to four edits: bit flips, interesting values in whole fields, copies of
/// a field or a record from another record, splices from `donor`, count and length edits, truncation, records
/// dropped or duplicated with the counts kept consistent), reseals its CRC three times in four, and returns the
/// new length (at most `buf.len()`).
pub fn mutate(buf: &mut [u8], mut len: usize, donor: &[u8], rng: &mut Rng) -> usize {
    len = len.min(buf.len());
    for _ in 0..1 + rng.below(4) {
        let (records_at, records) = records_layout(buf, len);
        let record = |rng: &mut Rng| records_at + rng.below(records as u64) as usize * RECORD_SIZE;
        match rng.below(11) {
            0 if len > 0 => {
                for _ in 0..1 + rng.below(8) {
                    let at = rng.below(len as u64) as usize;
                    buf[at] ^= 1 << rng.below(8);
                }
            }
            1 if len > 0 => {
                let at = rng.below(len as u64) as usize;
                buf[at] = [0, 0xff, 0x7f, 0x80, 1, rng.next_u64() as u8][rng.below(6) as usize];
            }
            2 | 3 if records > 0 => {
                let (field, width) = RECORD_FIELDS[rng.below(RECORD_FIELDS.len() as u64) as usize];
                let slot = if field >= offset_of!(RawRecord, streams) {
                    let size = if field >= offset_of!(RawRecord, extents) {
                        16
                    } else {
                        24
                    };
                    rng.below(8) as usize * size
                } else {
                    0
                };
                let at = record(rng) + field + slot;
                let value = match rng.below(6) {
                    0 => 0,
                    1 => u64::MAX,
                    2 => rng.below(64),
                    3 => POOL
                        .base
                        .wrapping_add(rng.below(POOL.len + 2 * CHUNK))
                        .wrapping_sub(CHUNK),
                    4 => {
                        // The same field of another record: duplicates and overlaps.
                        let from = record(rng) + field + slot;
                        if from + 8 <= len {
                            u64::from_le_bytes(read8(buf, from))
                        } else {
                            0
                        }
                    }
                    _ => rng.next_u64(),
                };
                if at + width <= len {
                    write_le(buf, at, width, value);
                }
            }
            4 if records > 1 => {
                let (a, b) = (record(rng), record(rng));
                if a != b && a.max(b) + RECORD_SIZE <= len {
                    buf.copy_within(a..a + RECORD_SIZE, b);
                }
            }
            5 if !donor.is_empty() && len > 0 => {
                let from = rng.below(donor.len() as u64) as usize;
                let at = rng.below(len as u64) as usize;
                let n = (1 + rng.below(64) as usize).min(donor.len() - from).min(len - at);
                buf[at..at + n].copy_from_slice(&donor[from..from + n]);
            }
            6 if len >= HEADER_SIZE => {
                let field = [
                    offset_of!(RawHeader, instance_count),
                    offset_of!(RawHeader, record_count),
                    offset_of!(RawHeader, total_len),
                    HEADER_SIZE + offset_of!(RawIdentity, record_count),
                ][rng.below(4) as usize];
                let old = u64::from(read4(buf, field.min(len - 4)));
                let delta = rng.below(5).wrapping_sub(2);
                let new = if rng.chance(1, 4) {
                    rng.next_u64() as u32 as u64
                } else {
                    old.wrapping_add(delta)
                };
                write_le(buf, field, 4, new);
            }
            7 => len = rng.below(len as u64 + 1) as usize,
            8 if records > 0 && len >= records_at + RECORD_SIZE => {
                // Drop the last record, counts and length kept consistent.
                len -= RECORD_SIZE;
                adjust_counts(buf, len, -1, rng);
            }
            9 if records > 0 && len + RECORD_SIZE <= buf.len() => {
                // Append a copy of a record, counts and length kept consistent.
                let from = record(rng);
                buf.copy_within(from..from + RECORD_SIZE, len);
                len += RECORD_SIZE;
                adjust_counts(buf, len, 1, rng);
            }
            _ => {
                let at = rng.below(len as u64 + 1) as usize;
                let n = (rng.below(16) as usize).min(len - at);
                buf[at..at + n].fill(0);
            }
        }
    }
    if rng.chance(3, 4) {
        reseal(&mut buf[..len]);
    }
    len
}

/// After a record was dropped or added at the end: the header's record count and total length, and one
/// instance's count (the last one with records, or a random one).
fn adjust_counts(buf: &mut [u8], len: usize, delta: i64, rng: &mut Rng) {
    let rc = offset_of!(RawHeader, record_count);
    let count = i64::from(read4(buf, rc)) + delta;
    write_le(buf, rc, 4, count as u64);
    write_le(buf, offset_of!(RawHeader, total_len), 8, len as u64);
    let instances = (read4(buf, offset_of!(RawHeader, instance_count)) as usize).min(MAX_INSTANCES);
    if instances == 0 {
        return;
    }
    let mut pick = instances - 1;
    if rng.chance(1, 4) {
        pick = rng.below(instances as u64) as usize;
    } else {
        while pick > 0
            && read4(
                buf,
                HEADER_SIZE + pick * IDENTITY_SIZE + offset_of!(RawIdentity, record_count),
            ) == 0
        {
            pick -= 1;
        }
    }
    let at = HEADER_SIZE + pick * IDENTITY_SIZE + offset_of!(RawIdentity, record_count);
    if at + 4 <= buf.len() {
        let c = i64::from(read4(buf, at)) + delta;
        write_le(buf, at, 4, c as u64);
    }
}

/// The property every accepted region has, checked independently of [`super::decode`]'s own code: every extent,
/// root table (whole) and CD table (its level-1 table when 2-level) lies inside `pool`, each table inside one of
/// its own record's extents, and no two extents overlap (pairwise, not by sorting).
///
/// # Errors
///
/// What is broken, with the record's token.
pub fn check_accepted(decoded: &Decoded<'_>, pool: Extent) -> Result<(), (&'static str, u64)> {
    if decoded.pool != pool {
        return Err(("pool differs", 0));
    }
    let mut all: Vec<(u64, Extent)> = Vec::new();
    for r in decoded.instances.iter().flat_map(|i| i.records.iter()) {
        let own = |base: u64, len: u64| r.extents.iter().any(|e| e.contains(base, len));
        for e in &r.extents {
            if e.len == 0 || !pool.contains(e.base, e.len) {
                return Err(("extent outside the pool", r.token));
            }
            all.push((r.token, e));
        }
        if let Some(t) = &r.table {
            let Ok(len) = table_bytes(t, r.kind == RecordKind::Stage2) else {
                return Err(("bad table shape accepted", r.token));
            };
            if !pool.contains(t.root, len) || !own(t.root, len) {
                return Err(("root table outside the pool or its extents", r.token));
            }
        }
        for s in &r.streams {
            if s.cd_table != 0 {
                let len = cd_table_bytes(s.cd_ssid_bits, s.cd_two_level);
                if !pool.contains(s.cd_table, len) || !own(s.cd_table, len) {
                    return Err(("CD table outside the pool or its extents", r.token));
                }
            }
        }
    }
    for (i, (ta, a)) in all.iter().enumerate() {
        for (_, b) in &all[i + 1..] {
            if a.overlaps(b) {
                return Err(("overlapping extents accepted", *ta));
            }
        }
    }
    Ok(())
}
