//! Host tests of the handover format: layout, round trips, every validation error, torn writes, and a property
//! over mutated regions.

extern crate std;

use std::format;
use std::string::ToString;
use std::vec;
use std::vec::Vec;

use super::sample::{self, OwnedInstance, OwnedRecord, POOL, REGION, Rng, decode};
use super::*;
use crate::handover::{GuestRecord, RecordKind, StreamRecord, TableShape};

const P: u64 = POOL.base;

fn ext(base: u64, len: u64) -> Extent {
    Extent { base, len }
}

fn record(token: u64, kind: RecordKind) -> OwnedRecord {
    OwnedRecord {
        head: DomainRecord {
            token,
            kind,
            asid: 0,
            vmid: 0,
            table: None,
            parent_token: None,
            guest: None,
            streams: Entries::empty(),
            extents: Entries::empty(),
            identity: false,
        },
        streams: Vec::new(),
        extents: Vec::new(),
    }
}

fn shape(root: u64, granule_log2: u8, input_bits: u8, output_bits: u8, start_level: u8) -> TableShape {
    TableShape {
        root,
        granule_log2,
        input_bits,
        output_bits,
        start_level,
        tables: 3,
        empty: 1,
    }
}

fn identity(base: u64) -> SmmuIdentity {
    SmmuIdentity {
        base,
        idr: [0x0d44_101b, 0x0273_0010, 0, 0x1414, 0, 0x74],
        iidr: 0x43b,
        strtab_base: 0x4100_0000,
        strtab_format: 1,
        strtab_sid_bits: 16,
        strtab_split: 8,
        core_len: 0,
    }
}

/// Two instances, every kind of record, two regimes sharing an ASID, a 2-level CD table, a concatenated stage-2
/// root, and a token and a StreamID repeated across instances (allowed).
fn fixture() -> Vec<OwnedInstance> {
    let mut s1 = record(0x10, RecordKind::Stage1);
    s1.asid = 1;
    s1.table = Some(shape(P, 12, 48, 48, 0));
    s1.extents.push(ext(P, 0x2_0000));
    s1.streams.push(StreamRecord {
        sid: 1,
        ssid: 0,
        cd_table: P + 0x1_0000,
        cd_ssid_bits: 0,
        cd_two_level: false,
    });
    let mut s2 = record(0x20, RecordKind::Stage2);
    s2.vmid = 5;
    s2.table = Some(shape(P + 0x2_0000, 12, 40, 44, 1));
    s2.extents.push(ext(P + 0x2_0000, 0x1_0000));
    s2.streams.push(StreamRecord {
        sid: 2,
        ..Default::default()
    });
    let mut nested = record(0x30, RecordKind::Nested);
    nested.vmid = 5;
    nested.parent_token = Some(0x20);
    nested.guest = Some(GuestRecord {
        cd_table_ipa: 0x4000_0000,
        cd_max_log2: 0,
        layout: 0,
        default_substream: 0,
    });
    nested.streams.push(StreamRecord {
        sid: 3,
        ..Default::default()
    });
    nested.extents.push(ext(P + 0x3_0000, 0x1000));
    let mut el2 = record(0x40, RecordKind::Stage1El2);
    el2.asid = 1;
    el2.table = Some(shape(P + 0x4_0000, 16, 48, 48, 1));
    el2.extents.push(ext(P + 0x4_0000, 0x1_0000));
    el2.extents.push(ext(P + 0x5_0000, 0x1_0000));
    el2.streams.push(StreamRecord {
        sid: 4,
        ssid: 3,
        cd_table: P + 0x5_0000,
        cd_ssid_bits: 12,
        cd_two_level: true,
    });
    let mut other = s1.clone();
    other.table = Some(shape(P + 0x10_0000, 12, 48, 48, 0));
    other.extents[0].base = P + 0x10_0000;
    other.streams[0].cd_table = P + 0x11_0000;
    vec![
        OwnedInstance {
            identity: identity(0x0905_0000),
            records: vec![s1, s2, nested, el2],
        },
        OwnedInstance {
            identity: identity(0x0906_0000),
            records: vec![other],
        },
    ]
}

fn encode_vec(instances: &[OwnedInstance], generation: u64) -> Vec<u8> {
    let mut buf = vec![0u8; sample::BUFFER_SIZE];
    let n = sample::encode_owned(instances, generation, REGION, POOL, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

/// Encodes the fixture after `edit`, decodes it.
fn decode_edited(edit: impl FnOnce(&mut Vec<OwnedInstance>)) -> Result<Vec<OwnedInstance>, HandoverError> {
    let mut f = fixture();
    edit(&mut f);
    decode(&encode_vec(&f, 1), POOL).map(|d| sample::owned(&d))
}

/// Decodes the fixture's bytes after `poke` and a CRC fix-up.
fn decode_poked(poke: impl FnOnce(&mut Vec<u8>)) -> Result<Vec<OwnedInstance>, HandoverError> {
    let mut bytes = encode_vec(&fixture(), 1);
    poke(&mut bytes);
    sample::reseal(&mut bytes);
    decode(&bytes, POOL).map(|d| sample::owned(&d))
}

/// Byte offset of record `n` of the fixture (two instances) in the version-3 region `encode` writes.
fn rec(n: usize) -> usize {
    let f = fixture();
    HEADER_SIZE
        + 2 * IDENTITY_SIZE
        + f.iter()
            .flat_map(|i| i.records.iter())
            .take(n)
            .map(|r| record_size(&r.record()))
            .sum::<usize>()
}

/// Byte offset of record `n` of the fixture in the version-2 region [`encode_v2`] writes.
fn rec_v2(n: usize) -> usize {
    HEADER_SIZE + 2 * IDENTITY_SIZE + n * RECORD_SIZE
}

/// A record in version 2's fixed layout (what the version-2 writer wrote).
fn raw_record_v2(r: &OwnedRecord) -> RawRecord {
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
    // The fixtures have at most 8 of each.
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

/// `instances` as the version-2 writer (the format-2 driver) wrote them: fixed 384-byte records.
fn encode_v2(instances: &[OwnedInstance], generation: u64) -> Vec<u8> {
    let records: usize = instances.iter().map(|i| i.records.len()).sum();
    let total = v2_region_size(instances.len(), records);
    let mut out = vec![0u8; total];
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
        out[offset..offset + RECORD_SIZE].copy_from_slice(raw_record_v2(record).as_bytes());
        offset += RECORD_SIZE;
    }
    let mut header = RawHeader {
        magic: MAGIC,
        version: U32::new(2),
        crc32c: U32::ZERO,
        total_len: U64::new(total as u64),
        generation: U64::new(generation),
        instance_count: U32::new(instances.len() as u32),
        record_count: U32::new(records as u32),
        region: RawExtent::new(REGION),
        pool: RawExtent::new(POOL),
        reserved: [U64::ZERO; 3],
    };
    header.crc32c = U32::new(checksum(header.as_bytes(), &out[HEADER_SIZE..total]));
    out[..HEADER_SIZE].copy_from_slice(header.as_bytes());
    out
}

/// Decodes the fixture's version-2 bytes after `poke` and a CRC fix-up.
fn decode_poked_v2(poke: impl FnOnce(&mut Vec<u8>)) -> Result<Vec<OwnedInstance>, HandoverError> {
    let mut bytes = encode_v2(&fixture(), 1);
    poke(&mut bytes);
    sample::reseal(&mut bytes);
    decode(&bytes, POOL).map(|d| sample::owned(&d))
}

fn put(bytes: &mut [u8], at: usize, value: &[u8]) {
    bytes[at..at + value.len()].copy_from_slice(value);
}

#[test]
fn the_layout_is_the_documented_one() {
    assert_eq!((HEADER_SIZE, IDENTITY_SIZE, RECORD_SIZE), (96, 64, 384));
    assert_eq!(offset_of!(RawHeader, version), 8);
    assert_eq!(offset_of!(RawHeader, crc32c), 12);
    assert_eq!(offset_of!(RawHeader, total_len), 16);
    assert_eq!(offset_of!(RawHeader, generation), 24);
    assert_eq!(offset_of!(RawHeader, instance_count), 32);
    assert_eq!(offset_of!(RawHeader, record_count), 36);
    assert_eq!(offset_of!(RawHeader, region), 40);
    assert_eq!(offset_of!(RawHeader, pool), 56);
    assert_eq!(offset_of!(RawHeader, reserved), 72);
    assert_eq!(offset_of!(RawIdentity, idr), 8);
    assert_eq!(offset_of!(RawIdentity, iidr), 32);
    assert_eq!(offset_of!(RawIdentity, record_count), 36);
    assert_eq!(offset_of!(RawIdentity, strtab_base), 40);
    assert_eq!(offset_of!(RawIdentity, strtab_format), 48);
    assert_eq!(offset_of!(RawIdentity, reserved0), 51);
    assert_eq!(offset_of!(RawIdentity, reserved1), 52);
    assert_eq!(offset_of!(RawIdentity, core_len), 56);
    assert_eq!(offset_of!(RawRecord, kind), 8);
    assert_eq!(offset_of!(RawRecord, flags), 12);
    assert_eq!(offset_of!(RawRecord, asid), 16);
    assert_eq!(offset_of!(RawRecord, vmid), 18);
    assert_eq!(offset_of!(RawRecord, stream_count), 20);
    assert_eq!(offset_of!(RawRecord, extent_count), 21);
    assert_eq!(offset_of!(RawRecord, reserved0), 22);
    assert_eq!(offset_of!(RawRecord, parent_token), 24);
    assert_eq!(offset_of!(RawRecord, table), 32);
    assert_eq!(offset_of!(RawTable, tables), 12);
    assert_eq!(offset_of!(RawTable, empty), 14);
    assert_eq!(offset_of!(RawRecord, guest), 48);
    assert_eq!(offset_of!(RawGuest, reserved), 11);
    assert_eq!(offset_of!(RawRecord, streams), 64);
    assert_eq!(size_of::<RawStream>(), 24);
    assert_eq!(offset_of!(RawStream, cd_table), 8);
    assert_eq!(offset_of!(RawStream, cd_ssid_bits), 16);
    assert_eq!(offset_of!(RawStream, cd_format), 17);
    assert_eq!(offset_of!(RawRecord, extents), 256);
    // Version 3's record head: version 2's fields up to the guest context, then 32-bit counts.
    assert_eq!((RECORD_HEAD_SIZE, STREAM_SIZE, EXTENT_SIZE), (72, 24, 16));
    assert_eq!(offset_of!(RawRecordHead, reserved0), 20);
    assert_eq!(offset_of!(RawRecordHead, parent_token), 24);
    assert_eq!(offset_of!(RawRecordHead, table), 32);
    assert_eq!(offset_of!(RawRecordHead, guest), 48);
    assert_eq!(offset_of!(RawRecordHead, stream_count), 64);
    assert_eq!(offset_of!(RawRecordHead, extent_count), 68);
    // The decoded form is a view: a few hundred bytes whatever the region holds.
    assert!(size_of::<Decoded>() <= 1024, "{}", size_of::<Decoded>());
}

#[test]
fn the_fixture_round_trips() {
    let f = fixture();
    let bytes = encode_vec(&f, 7);
    assert_eq!(bytes.len(), sample::with_views(&f, region_size));
    assert_eq!(&bytes[..8], &MAGIC);
    let d = decode(&bytes, POOL).unwrap();
    assert_eq!((d.generation, d.region, d.pool), (7, REGION, POOL));
    assert_eq!(sample::owned(&d), f);
    // Trailing bytes past the region are ignored.
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0xa5; 100]);
    assert_eq!(decode(&longer, POOL).unwrap(), d);
}

#[test]
fn sample_regions_round_trip() {
    for seed in 0..300 {
        let max = if seed % 10 == 0 { sample::MAX_SAMPLE_RECORDS } else { 8 };
        let instances = sample::instances(&mut Rng::new(seed), max);
        let bytes = encode_vec(&instances, seed);
        let d = decode(&bytes, POOL).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(sample::owned(&d), instances, "seed {seed}");
        sample::check_accepted(&d, POOL).unwrap();
    }
}

#[test]
fn an_empty_region_and_a_full_one_round_trip() {
    let bytes = encode_vec(&[], 1);
    assert_eq!(bytes.len(), HEADER_SIZE);
    assert!(decode(&bytes, POOL).unwrap().instances.is_empty());
    // Every instance at capacity.
    let mut full: Vec<OwnedInstance> = Vec::new();
    let mut rng = Rng::new(3);
    while full.len() < MAX_INSTANCES {
        for inst in sample::instances(&mut rng, sample::MAX_SAMPLE_RECORDS) {
            if inst.records.len() == sample::MAX_SAMPLE_RECORDS && full.len() < MAX_INSTANCES {
                full.push(inst);
            }
        }
    }
    // Give each instance its own base, and every record its memory from one cursor so instances do not overlap.
    for (i, inst) in full.iter_mut().enumerate() {
        inst.identity.base = 0x0905_0000 + i as u64 * 0x2_0000;
    }
    let mut cursor = P;
    for inst in full.iter_mut() {
        for r in inst.records.iter_mut() {
            let old = r.extents.clone();
            for e in r.extents.iter_mut() {
                let moved = cursor;
                cursor += e.len;
                let delta = moved.wrapping_sub(e.base);
                if let Some(t) = r.head.table.as_mut()
                    && e.contains(t.root, 1)
                {
                    t.root = t.root.wrapping_add(delta);
                }
                for s in r.streams.iter_mut() {
                    if s.cd_table != 0 && e.contains(s.cd_table, 1) {
                        s.cd_table = s.cd_table.wrapping_add(delta);
                    }
                }
                e.base = moved;
            }
            assert_eq!(old.len(), r.extents.len());
        }
    }
    let bytes = encode_vec(&full, 2);
    assert_eq!(bytes.len(), sample::with_views(&full, region_size));
    assert!(bytes.len() <= sample::BUFFER_SIZE);
    assert_eq!(sample::owned(&decode(&bytes, POOL).unwrap()), full);
}

#[test]
fn encode_writes_nothing_when_it_refuses() {
    let f = fixture();
    let size = sample::with_views(&f, region_size);
    let mut small = vec![0u8; size - 1];
    assert_eq!(
        sample::encode_owned(&f, 1, REGION, POOL, &mut small),
        Err(FormatError::BufferTooSmall {
            needed: size,
            have: size - 1
        })
    );
    assert!(small.iter().all(|&b| b == 0));
    let mut buf = vec![0u8; sample::BUFFER_SIZE];
    assert_eq!(
        sample::encode_owned(&f, 1, ext(REGION.base, 100), POOL, &mut buf),
        Err(FormatError::RegionTooSmall {
            needed: size,
            region: ext(REGION.base, 100)
        })
    );
    let nine: Vec<OwnedInstance> = (0..9).map(|_| f[1].clone()).collect();
    assert_eq!(
        sample::encode_owned(&nine, 1, REGION, POOL, &mut buf),
        Err(FormatError::TooManyInstances { count: 9, max: 8 })
    );
    assert!(buf.iter().all(|&b| b == 0));
    assert!(
        FormatError::TooManyInstances { count: 9, max: 8 }
            .to_string()
            .contains("9 SMMU instances")
    );
}

#[test]
fn a_torn_write_is_refused() {
    let old = fixture();
    let mut new = fixture();
    new[0].records[0].asid = 9;
    let old_bytes = encode_vec(&old, 1);
    let new_bytes = encode_vec(&new, 2);
    assert_eq!(old_bytes.len(), new_bytes.len());
    // The new body landed, the header is still the old generation's.
    let mut torn = new_bytes.clone();
    torn[..HEADER_SIZE].copy_from_slice(&old_bytes[..HEADER_SIZE]);
    assert!(matches!(decode(&torn, POOL), Err(HandoverError::BadCrc { .. })));
    // The body landed, the header never did (a first hand-off: zeros).
    let mut absent = new_bytes.clone();
    absent[..HEADER_SIZE].fill(0);
    assert_eq!(decode(&absent, POOL), Err(HandoverError::BadMagic { found: [0; 8] }));
    // Half the body landed over the old region, with the old header.
    let mut half = old_bytes.clone();
    let mid = old_bytes.len() / 2;
    half[HEADER_SIZE..mid].copy_from_slice(&new_bytes[HEADER_SIZE..mid]);
    let e = decode(&half, POOL).unwrap_err();
    assert!(matches!(e, HandoverError::BadCrc { .. }), "{e}");
    assert!(e.to_string().contains("torn"));
    // The new header landed without its body: also refused.
    let mut header_only = old_bytes.clone();
    header_only[..HEADER_SIZE].copy_from_slice(&new_bytes[..HEADER_SIZE]);
    assert!(matches!(decode(&header_only, POOL), Err(HandoverError::BadCrc { .. })));
    // Whole writes decode to their own generation.
    assert_eq!(decode(&new_bytes, POOL).unwrap().generation, 2);
    assert_eq!(decode(&old_bytes, POOL).unwrap().generation, 1);
}

mod checks;
mod errors;

/// The compatibility rule: this image reads the regions the format-2 driver wrote (fixed 384-byte records), and
/// writes version 3 (variable-length records).
#[test]
fn a_version_2_region_is_read_and_version_3_is_written() {
    let f = fixture();
    let v2 = encode_v2(&f, 5);
    assert_eq!(v2.len(), v2_region_size(2, 5));
    assert_eq!(peek_header(&v2).unwrap().version, 2);
    let d = decode(&v2, POOL).unwrap();
    assert_eq!((d.generation, sample::owned(&d)), (5, f.clone()));
    let v3 = encode_vec(&f, 5);
    assert_eq!(peek_header(&v3).unwrap().version, VERSION);
    assert_eq!(VERSION, 3);
    assert!(
        v3.len() < v2.len(),
        "a record takes what it holds: {} vs {}",
        v3.len(),
        v2.len()
    );
    assert_eq!(decode(&v3, POOL).unwrap(), d);
}

/// Version 3 records an identity domain; version 2 had no such flag, so one in a version-2 region is refused.
#[test]
fn the_identity_flag_is_version_3s() {
    let mut f = fixture();
    f[0].records[0].identity = true;
    f[0].records[1].identity = true;
    let bytes = encode_vec(&f, 1);
    let d = decode(&bytes, POOL).unwrap();
    assert_eq!(sample::owned(&d), f);
    let records = d.instances[0].records;
    assert!(records.get(0).unwrap().identity && !records.get(3).unwrap().identity);
    // Not on a nested record (it has no table of its own).
    let mut bytes = encode_vec(&fixture(), 1);
    let at = rec(2) + 12;
    let flags = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    put(&mut bytes, at, &(flags | 1 << 3).to_le_bytes());
    sample::reseal(&mut bytes);
    assert!(matches!(decode(&bytes, POOL), Err(HandoverError::BadFlags { .. })));
    // Nor on an EL2 stage 1 (identity domains are created for devices, never in the EL2 regime).
    let mut bytes = encode_vec(&fixture(), 1);
    let at = rec(3) + 12;
    let flags = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    put(&mut bytes, at, &(flags | 1 << 3).to_le_bytes());
    sample::reseal(&mut bytes);
    assert!(matches!(
        decode(&bytes, POOL),
        Err(HandoverError::BadFlags { token: 0x40, .. })
    ));
    // Nor in version 2.
    assert!(matches!(
        decode_poked_v2(|b| {
            let at = rec_v2(0) + 12;
            let flags = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
            put(b, at, &(flags | 1 << 3).to_le_bytes());
        }),
        Err(HandoverError::BadFlags { token: 0x10, .. })
    ));
}

/// A version-3 record whose counts run past the region's stated end is refused, never read beyond it.
#[test]
fn a_version_3_record_past_the_end_is_refused() {
    let mut bytes = encode_vec(&fixture(), 1);
    let last = rec(4);
    // One more extent than the bytes hold (but within the capacity).
    let at = last + offset_of!(RawRecordHead, extent_count);
    let n = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    put(&mut bytes, at, &(n + 1).to_le_bytes());
    sample::reseal(&mut bytes);
    assert!(matches!(
        decode(&bytes, POOL),
        Err(HandoverError::LengthMismatch { .. })
    ));
}

/// No cap on a record's streams or extents but the region's bytes (issue 23): a stage-2 record with 256 streams
/// (a physical function and its virtual functions) and 301 extents round-trips, and so do eight SMMU instances.
#[test]
fn a_record_holds_any_number_of_streams_and_extents() {
    let mut f = fixture();
    let r = &mut f[0].records[1];
    assert_eq!(r.kind, RecordKind::Stage2);
    r.streams = (0..256)
        .map(|i| StreamRecord {
            sid: 0x100 + i,
            ..StreamRecord::default()
        })
        .collect();
    r.extents
        .extend((0..300).map(|i| ext(P + 0x100_0000 + i * 0x2000, 0x1000)));
    let bytes = encode_vec(&f, 1);
    let d = decode(&bytes, POOL).unwrap();
    assert_eq!(sample::owned(&d), f);
    let record = d.instances[0].records.get(1).unwrap();
    assert_eq!((record.streams.len(), record.extents.len()), (256, 301));
    assert_eq!(record.streams.get(255).unwrap().sid, 0x1ff);
    // Two of them collide: refused, naming both.
    f[0].records[1].streams[7].sid = 0x100;
    assert!(matches!(
        decode(&encode_vec(&f, 1), POOL),
        Err(HandoverError::DuplicateStream {
            sid: 0x100,
            ssid: 0,
            ..
        })
    ));
    // Eight instances.
    let eight: Vec<OwnedInstance> = (0..8)
        .map(|i| OwnedInstance {
            identity: identity(0x0905_0000 + i * 0x2_0000),
            records: Vec::new(),
        })
        .collect();
    let bytes = encode_vec(&eight, 1);
    assert_eq!(decode(&bytes, POOL).unwrap().instances.len(), 8);
}
