//! Host tests of the handover format: layout, round trips, every validation error, torn writes, and a property
//! over mutated regions.

extern crate std;

use std::format;
use std::string::ToString;
use std::vec;
use std::vec::Vec;

use super::sample::{self, POOL, REGION, Rng};
use super::*;
use crate::handover::{GuestRecord, RecordKind, StreamRecord, TableShape};

const P: u64 = POOL.base;

fn ext(base: u64, len: u64) -> Extent {
    Extent { base, len }
}

fn record(token: u64, kind: RecordKind) -> DomainRecord {
    DomainRecord {
        token,
        kind,
        asid: 0,
        vmid: 0,
        table: None,
        parent_token: None,
        guest: None,
        streams: heapless::Vec::new(),
        extents: heapless::Vec::new(),
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
fn fixture() -> heapless::Vec<InstanceRecords, MAX_INSTANCES> {
    let mut s1 = record(0x10, RecordKind::Stage1);
    s1.asid = 1;
    s1.table = Some(shape(P, 12, 48, 48, 0));
    s1.extents.push(ext(P, 0x2_0000)).unwrap();
    s1.streams
        .push(StreamRecord {
            sid: 1,
            ssid: 0,
            cd_table: P + 0x1_0000,
            cd_ssid_bits: 0,
            cd_two_level: false,
        })
        .unwrap();
    let mut s2 = record(0x20, RecordKind::Stage2);
    s2.vmid = 5;
    s2.table = Some(shape(P + 0x2_0000, 12, 40, 44, 1));
    s2.extents.push(ext(P + 0x2_0000, 0x1_0000)).unwrap();
    s2.streams
        .push(StreamRecord {
            sid: 2,
            ..Default::default()
        })
        .unwrap();
    let mut nested = record(0x30, RecordKind::Nested);
    nested.vmid = 5;
    nested.parent_token = Some(0x20);
    nested.guest = Some(GuestRecord {
        cd_table_ipa: 0x4000_0000,
        cd_max_log2: 0,
        layout: 0,
        default_substream: 0,
    });
    nested
        .streams
        .push(StreamRecord {
            sid: 3,
            ..Default::default()
        })
        .unwrap();
    nested.extents.push(ext(P + 0x3_0000, 0x1000)).unwrap();
    let mut el2 = record(0x40, RecordKind::Stage1El2);
    el2.asid = 1;
    el2.table = Some(shape(P + 0x4_0000, 16, 48, 48, 1));
    el2.extents.push(ext(P + 0x4_0000, 0x1_0000)).unwrap();
    el2.extents.push(ext(P + 0x5_0000, 0x1_0000)).unwrap();
    el2.streams
        .push(StreamRecord {
            sid: 4,
            ssid: 3,
            cd_table: P + 0x5_0000,
            cd_ssid_bits: 12,
            cd_two_level: true,
        })
        .unwrap();
    let mut other = s1.clone();
    other.table = Some(shape(P + 0x10_0000, 12, 48, 48, 0));
    other.extents[0].base = P + 0x10_0000;
    other.streams[0].cd_table = P + 0x11_0000;
    let mut out = heapless::Vec::new();
    out.push(InstanceRecords {
        identity: identity(0x0905_0000),
        records: [s1, s2, nested, el2].into_iter().collect(),
    })
    .unwrap();
    out.push(InstanceRecords {
        identity: identity(0x0906_0000),
        records: [other].into_iter().collect(),
    })
    .unwrap();
    out
}

fn encode_vec(instances: &[InstanceRecords], generation: u64) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_REGION_SIZE];
    let n = encode(instances, generation, REGION, POOL, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

/// Encodes the fixture after `edit`, decodes it.
fn decode_edited(
    edit: impl FnOnce(&mut heapless::Vec<InstanceRecords, MAX_INSTANCES>),
) -> Result<Decoded, HandoverError> {
    let mut f = fixture();
    edit(&mut f);
    decode(&encode_vec(&f, 1), POOL)
}

/// Decodes the fixture's bytes after `poke` and a CRC fix-up.
fn decode_poked(poke: impl FnOnce(&mut Vec<u8>)) -> Result<Decoded, HandoverError> {
    let mut bytes = encode_vec(&fixture(), 1);
    poke(&mut bytes);
    sample::reseal(&mut bytes);
    decode(&bytes, POOL)
}

/// Byte offset of record `n` of the fixture (two instances).
fn rec(n: usize) -> usize {
    HEADER_SIZE + 2 * IDENTITY_SIZE + n * RECORD_SIZE
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
    assert_eq!(MAX_REGION_SIZE, 96 + 4 * 64 + 128 * 384);
    // docs/handover.md tells callers how large the decoded form is.
    assert!(size_of::<Decoded>() <= 53 * 1024, "{}", size_of::<Decoded>());
}

#[test]
fn the_fixture_round_trips() {
    let f = fixture();
    let bytes = encode_vec(&f, 7);
    assert_eq!(bytes.len(), region_size(2, 5));
    assert_eq!(&bytes[..8], &MAGIC);
    let d = decode(&bytes, POOL).unwrap();
    assert_eq!((d.generation, d.region, d.pool), (7, REGION, POOL));
    assert_eq!(&d.instances[..], &f[..]);
    // Trailing bytes past the region are ignored.
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0xa5; 100]);
    assert_eq!(decode(&longer, POOL).unwrap(), d);
}

#[test]
fn sample_regions_round_trip() {
    for seed in 0..300 {
        let instances = sample::instances(&mut Rng::new(seed), if seed % 10 == 0 { MAX_RECORDS } else { 8 });
        let bytes = encode_vec(&instances, seed);
        let d = decode(&bytes, POOL).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(&d.instances[..], &instances[..], "seed {seed}");
        sample::check_accepted(&d, POOL).unwrap();
    }
}

#[test]
fn an_empty_region_and_a_full_one_round_trip() {
    let bytes = encode_vec(&[], 1);
    assert_eq!(bytes.len(), HEADER_SIZE);
    assert!(decode(&bytes, POOL).unwrap().instances.is_empty());
    // Every instance at capacity.
    let mut full = heapless::Vec::<InstanceRecords, MAX_INSTANCES>::new();
    let mut rng = Rng::new(3);
    while full.len() < MAX_INSTANCES {
        for inst in sample::instances(&mut rng, MAX_RECORDS) {
            if inst.records.len() == MAX_RECORDS && full.len() < MAX_INSTANCES {
                full.push(inst).unwrap();
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
                if let Some(t) = r.table.as_mut()
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
    assert_eq!(bytes.len(), MAX_REGION_SIZE);
    assert_eq!(&decode(&bytes, POOL).unwrap().instances[..], &full[..]);
}

#[test]
fn encode_writes_nothing_when_it_refuses() {
    let f = fixture();
    let mut small = vec![0u8; region_size(2, 5) - 1];
    assert_eq!(
        encode(&f, 1, REGION, POOL, &mut small),
        Err(FormatError::BufferTooSmall {
            needed: region_size(2, 5),
            have: region_size(2, 5) - 1
        })
    );
    assert!(small.iter().all(|&b| b == 0));
    let mut buf = vec![0u8; MAX_REGION_SIZE];
    assert_eq!(
        encode(&f, 1, ext(REGION.base, 100), POOL, &mut buf),
        Err(FormatError::RegionTooSmall {
            needed: region_size(2, 5),
            region: ext(REGION.base, 100)
        })
    );
    let five: Vec<InstanceRecords> = (0..5).map(|_| f[1].clone()).collect();
    assert_eq!(
        encode(&five, 1, REGION, POOL, &mut buf),
        Err(FormatError::TooManyInstances { count: 5, max: 4 })
    );
    assert!(buf.iter().all(|&b| b == 0));
    assert!(
        FormatError::TooManyInstances { count: 5, max: 4 }
            .to_string()
            .contains("5 SMMU instances")
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

#[test]
fn header_errors_name_what_is_wrong() {
    let bytes = encode_vec(&fixture(), 1);
    let n = bytes.len() as u64;
    assert_eq!(
        decode(&bytes[..5], POOL),
        Err(HandoverError::Truncated { needed: 96, have: 5 })
    );
    assert_eq!(
        decode(&bytes[..50], POOL),
        Err(HandoverError::Truncated { needed: 96, have: 50 })
    );
    assert_eq!(
        decode(&bytes[..bytes.len() - 1], POOL),
        Err(HandoverError::Truncated { needed: n, have: n - 1 })
    );
    let mut b = bytes.clone();
    b[0] = b'X';
    let e = decode(&b, POOL).unwrap_err();
    assert!(matches!(e, HandoverError::BadMagic { .. }));
    assert!(e.to_string().contains("magic"), "{e}");
    let mut b = bytes.clone();
    put(&mut b, 8, &3u32.to_le_bytes());
    let e = decode(&b, POOL).unwrap_err();
    assert_eq!(e, HandoverError::UnknownVersion { found: 3, known: &[2] });
    assert!(e.to_string().contains("version 3"), "{e}");
    // Version 1 put table counts in bit 51, which this driver no longer reads: refused.
    let mut b = bytes.clone();
    put(&mut b, 8, &1u32.to_le_bytes());
    let e = decode(&b, POOL).unwrap_err();
    assert_eq!(e, HandoverError::UnknownVersion { found: 1, known: &[2] });
    let mut b = bytes.clone();
    b[200] ^= 1;
    let e = decode(&b, POOL).unwrap_err();
    let HandoverError::BadCrc { stored, computed } = e else {
        panic!("{e}")
    };
    assert_ne!(stored, computed);
    assert!(e.to_string().contains(&format!("{stored:#010x}")), "{e}");
    assert_eq!(
        decode_poked(|b| put(b, 16, &(n + 8).to_le_bytes())),
        Err(HandoverError::LengthMismatch {
            stated: n + 8,
            expected: n
        })
    );
    assert_eq!(
        decode_poked(|b| put(b, 32, &5u32.to_le_bytes())),
        Err(HandoverError::TooManyInstances { count: 5, max: 4 })
    );
    assert_eq!(
        decode_poked(|b| put(b, 36, &129u32.to_le_bytes())),
        Err(HandoverError::TooManyRecords {
            instance: None,
            count: 129,
            max: 128
        })
    );
    assert_eq!(
        decode_poked(|b| b[80] = 1),
        Err(HandoverError::ReservedNonZero {
            what: "header reserved",
            offset: 72
        })
    );
    assert_eq!(
        decode_poked(|b| put(b, 48, &100u64.to_le_bytes())),
        Err(HandoverError::BadRegion {
            region: ext(REGION.base, 100),
            needed: n
        })
    );
    let other = ext(P, 0x1000);
    let e = decode(&bytes, other).unwrap_err();
    assert_eq!(
        e,
        HandoverError::PoolMismatch {
            recorded: POOL,
            expected: other
        }
    );
    assert!(e.to_string().contains("0x80000000+0x10000000"), "{e}");
}

#[test]
fn identity_errors_name_what_is_wrong() {
    let at = HEADER_SIZE + IDENTITY_SIZE;
    assert_eq!(
        decode_poked(|b| b[at + 51] = 1),
        Err(HandoverError::ReservedNonZero {
            what: "identity reserved0",
            offset: (at + 51) as u64
        })
    );
    // core_len: a running SMMU's structures far outside the pool.
    assert!(matches!(
        decode_poked(|b| b[at + 62] = 1),
        Err(HandoverError::OutsidePool { token: 0, .. })
    ));
    assert!(matches!(
        decode_poked(|b| b[at + 48] = 2),
        Err(HandoverError::BadStreamTable {
            instance: 1,
            value: 2,
            ..
        })
    ));
    assert!(matches!(
        decode_poked(|b| b[at + 50] = 7),
        Err(HandoverError::BadStreamTable {
            instance: 1,
            value: 7,
            ..
        })
    ));
    assert!(matches!(
        decode_poked(|b| b[at + 49] = 33),
        Err(HandoverError::BadStreamTable {
            instance: 1,
            value: 33,
            ..
        })
    ));
    assert_eq!(
        decode_edited(|f| f[1].identity.base = f[0].identity.base),
        Err(HandoverError::DuplicateInstance { base: 0x0905_0000 })
    );
    // Counts that do not add up.
    assert_eq!(
        decode_poked(|b| put(b, at + 36, &2u32.to_le_bytes())),
        Err(HandoverError::RecordCountMismatch {
            header: 5,
            instances: 6
        })
    );
    assert_eq!(
        decode_poked(|b| put(b, at + 36, &33u32.to_le_bytes())),
        Err(HandoverError::TooManyRecords {
            instance: Some(1),
            count: 33,
            max: 32
        })
    );
    // A StreamID beyond the instance's table.
    assert_eq!(
        decode_poked(|b| b[at + 49] = 0),
        Err(HandoverError::StreamOutOfRange {
            token: 0x10,
            sid: 1,
            sid_bits: 0
        })
    );
}

#[test]
fn record_field_errors_name_what_is_wrong() {
    assert_eq!(
        decode_poked(|b| put(b, rec(1) + 8, &9u32.to_le_bytes())),
        Err(HandoverError::BadKind { token: 0x20, kind: 9 })
    );
    assert_eq!(
        decode_poked(|b| put(b, rec(1) + 12, &3u32.to_le_bytes())),
        Err(HandoverError::BadFlags {
            token: 0x20,
            kind: 2,
            flags: 3
        })
    );
    assert_eq!(
        decode_edited(|f| f[0].records[0].table = None),
        Err(HandoverError::BadFlags {
            token: 0x10,
            kind: 1,
            flags: 0
        })
    );
    assert_eq!(
        decode_poked(|b| b[rec(1) + 23] = 1),
        Err(HandoverError::ReservedNonZero {
            what: "record reserved0",
            offset: (rec(1) + 22) as u64
        })
    );
    assert_eq!(
        decode_edited(|f| f[0].records[0].vmid = 3),
        Err(HandoverError::ReservedNonZero {
            what: "VMID of a stage-1 record",
            offset: (rec(0) + 18) as u64
        })
    );
    assert!(matches!(
        decode_edited(|f| f[0].records[1].asid = 3),
        Err(HandoverError::ReservedNonZero {
            what: "ASID of a stage-2 or nested record",
            ..
        })
    ));
    assert_eq!(
        decode_poked(|b| b[rec(0) + 20] = 9),
        Err(HandoverError::TooManyEntries {
            token: 0x10,
            what: "streams",
            count: 9,
            max: 8
        })
    );
    assert!(matches!(
        decode_poked(|b| b[rec(0) + 21] = 200),
        Err(HandoverError::TooManyEntries {
            what: "extents",
            count: 200,
            ..
        })
    ));
    assert_eq!(
        decode_poked(|b| b[rec(0) + 64 + 24 + 3] = 1),
        Err(HandoverError::ReservedNonZero {
            what: "unused stream slot",
            offset: (rec(0) + 64 + 24) as u64
        })
    );
    assert_eq!(
        decode_poked(|b| b[rec(0) + 256 + 16 + 15] = 1),
        Err(HandoverError::ReservedNonZero {
            what: "unused extent slot",
            offset: (rec(0) + 256 + 16) as u64
        })
    );
    assert!(matches!(
        decode_poked(|b| b[rec(0) + 24] = 1),
        Err(HandoverError::ReservedNonZero {
            what: "parent token of a record without parent",
            ..
        })
    ));
    assert!(matches!(
        decode_poked(|b| b[rec(2) + 33] = 1),
        Err(HandoverError::ReservedNonZero {
            what: "table of a record without table",
            ..
        })
    ));
    // More emptied tables than tables (the fixture records 3 tables, 1 empty): empty's high byte set.
    assert!(matches!(
        decode_poked(|b| b[rec(0) + 47] = 1),
        Err(HandoverError::BadValue { what, .. }) if what.starts_with("table.empty")
    ));
    assert!(matches!(
        decode_poked(|b| b[rec(0) + 50] = 1),
        Err(HandoverError::ReservedNonZero {
            what: "guest context of a record without guest",
            ..
        })
    ));
    assert!(matches!(
        decode_poked(|b| b[rec(2) + 60] = 1),
        Err(HandoverError::ReservedNonZero {
            what: "guest reserved",
            ..
        })
    ));
    assert!(matches!(
        decode_poked(|b| b[rec(0) + 64 + 20] = 1),
        Err(HandoverError::ReservedNonZero {
            what: "stream reserved",
            ..
        })
    ));
    assert!(matches!(
        decode_edited(|f| f[0].records[2].guest.as_mut().unwrap().layout = 3),
        Err(HandoverError::BadValue {
            token: 0x30,
            value: 3,
            ..
        })
    ));
    assert!(matches!(
        decode_edited(|f| f[0].records[2].guest.as_mut().unwrap().default_substream = 3),
        Err(HandoverError::BadValue {
            token: 0x30,
            value: 3,
            ..
        })
    ));
    assert!(matches!(
        decode_edited(|f| f[0].records[2].guest.as_mut().unwrap().cd_max_log2 = 21),
        Err(HandoverError::BadValue {
            token: 0x30,
            value: 21,
            ..
        })
    ));
    assert!(matches!(
        decode_edited(|f| f[0].records[2].guest.as_mut().unwrap().cd_table_ipa = 0x1008),
        Err(HandoverError::Misaligned {
            token: 0x30,
            address: 0x1008,
            align: 64,
            ..
        })
    ));
}

#[test]
fn table_shape_errors_name_what_is_wrong() {
    let edit = |g: u8, i: u8, o: u8, l: u8| {
        decode_edited(|f| {
            let t = f[0].records[0].table.as_mut().unwrap();
            (t.granule_log2, t.input_bits, t.output_bits, t.start_level) = (g, i, o, l);
        })
    };
    let what = |r: Result<Decoded, HandoverError>| match r {
        Err(HandoverError::BadTableShape {
            token: 0x10,
            what,
            value,
        }) => (what, value),
        other => panic!("{other:?}"),
    };
    assert_eq!(what(edit(13, 48, 48, 0)), ("granule log2 (12, 14 or 16)", 13));
    assert_eq!(what(edit(12, 49, 48, 0)), ("input bits (25..=48)", 49));
    assert_eq!(what(edit(12, 24, 48, 0)).1, 24);
    assert_eq!(what(edit(12, 48, 53, 0)).1, 53);
    assert_eq!(what(edit(12, 48, 31, 0)).1, 31);
    assert_eq!(what(edit(12, 48, 48, 4)).1, 4);
    // 48 bits with 4K pages need a level-0 root for stage 1.
    assert_eq!(
        what(edit(12, 48, 48, 1)),
        ("start level inconsistent with granule and input bits", 1)
    );
    // 64K pages have no level 0.
    assert_eq!(what(edit(16, 48, 48, 0)).1, 0);
    // 39 bits with 4K at level 0 resolves no bit at level 0.
    assert_eq!(what(edit(12, 39, 48, 0)).1, 0);
    // Stage 2 may concatenate up to 16 tables at the root, not more.
    let s2 = |i: u8, l: u8| {
        decode_edited(|f| {
            let t = f[0].records[1].table.as_mut().unwrap();
            (t.input_bits, t.start_level) = (i, l);
            // Give it room: a 16-table root is 64 KiB.
            f[0].records[1].extents[0].len = 0x1_0000;
        })
    };
    assert!(s2(40, 1).is_ok());
    assert!(s2(43, 1).is_ok(), "{:?}", s2(43, 1));
    assert!(matches!(
        s2(44, 1),
        Err(HandoverError::BadTableShape { token: 0x20, .. })
    ));
    // The same stage-1 shape concatenated is refused.
    assert_eq!(what(edit(12, 40, 44, 1)).1, 1);
}

#[test]
fn address_errors_name_what_is_wrong() {
    // A root table outside the pool, straddling its end, outside its own extents, misaligned.
    assert_eq!(
        decode_edited(|f| f[0].records[0].table.as_mut().unwrap().root = P - 0x1000),
        Err(HandoverError::OutsidePool {
            token: 0x10,
            what: "root table",
            address: P - 0x1000,
            len: 0x1000
        })
    );
    assert_eq!(
        decode_edited(|f| f[0].records[1].table.as_mut().unwrap().root = P + POOL.len - 0x1000),
        Err(HandoverError::Misaligned {
            token: 0x20,
            what: "root table",
            address: P + POOL.len - 0x1000,
            align: 0x2000
        })
    );
    assert_eq!(
        decode_edited(|f| f[0].records[1].table.as_mut().unwrap().root = P + POOL.len - 0x2000),
        Err(HandoverError::OutsideOwnExtents {
            token: 0x20,
            what: "root table",
            address: P + POOL.len - 0x2000,
            len: 0x2000
        })
    );
    assert_eq!(
        decode_edited(|f| f[0].records[0].table.as_mut().unwrap().root = P + 0x2_0000),
        Err(HandoverError::OutsideOwnExtents {
            token: 0x10,
            what: "root table",
            address: P + 0x2_0000,
            len: 0x1000
        })
    );
    // A table straddling the end of its extent.
    assert!(matches!(
        decode_edited(|f| f[0].records[1].extents[0].len = 0x1000),
        Err(HandoverError::OutsideOwnExtents {
            token: 0x20,
            len: 0x2000,
            ..
        })
    ));
    assert!(matches!(
        decode_edited(|f| f[0].records[0].table.as_mut().unwrap().root = P + 0x800),
        Err(HandoverError::Misaligned {
            token: 0x10,
            align: 0x1000,
            ..
        })
    ));
    // CD tables: outside the pool, outside the record's extents (in another record's), misaligned, 2-level.
    assert!(matches!(
        decode_edited(|f| f[0].records[0].streams[0].cd_table = 0x1000),
        Err(HandoverError::OutsidePool {
            token: 0x10,
            what: "CD table",
            address: 0x1000,
            len: 64
        })
    ));
    assert!(matches!(
        decode_edited(|f| f[0].records[0].streams[0].cd_table = P + 0x4_0000),
        Err(HandoverError::OutsideOwnExtents {
            token: 0x10,
            what: "CD table",
            ..
        })
    ));
    assert!(matches!(
        decode_edited(|f| f[0].records[0].streams[0].cd_table = P + 0x1_0020),
        Err(HandoverError::Misaligned {
            token: 0x10,
            what: "CD table",
            align: 64,
            ..
        })
    ));
    assert!(matches!(
        decode_edited(|f| f[0].records[0].streams[0].cd_table = 0),
        Err(HandoverError::BadValue { token: 0x10, .. })
    ));
    assert!(matches!(
        decode_edited(|f| f[0].records[0].streams[0].cd_ssid_bits = 21),
        Err(HandoverError::BadValue {
            token: 0x10,
            value: 21,
            ..
        })
    ));
    assert!(matches!(
        decode_edited(|f| f[0].records[0].streams[0].cd_two_level = true),
        Err(HandoverError::BadValue {
            token: 0x10,
            value: 0,
            ..
        })
    ));
    assert!(matches!(
        decode_poked(|b| b[rec(0) + 64 + 17] = 2),
        Err(HandoverError::BadValue {
            token: 0x10,
            value: 2,
            ..
        })
    ));
    assert!(matches!(
        decode_edited(|f| f[0].records[0].streams[0].ssid = 1),
        Err(HandoverError::BadValue {
            token: 0x10,
            value: 1,
            ..
        })
    ));
    // A linear CD table of 2^12 CDs is 256 KiB: larger than its extent.
    assert!(matches!(
        decode_edited(|f| f[0].records[3].streams[0].cd_two_level = false),
        Err(HandoverError::OutsideOwnExtents {
            token: 0x40,
            len: 0x4_0000,
            ..
        })
    ));
    // Stage-2 and nested streams have no CD table and no substream.
    assert!(matches!(
        decode_edited(|f| f[0].records[1].streams[0].cd_table = P + 0x2_0000),
        Err(HandoverError::ReservedNonZero {
            what: "CD table of a stage-2 or nested stream",
            ..
        })
    ));
    assert!(matches!(
        decode_edited(|f| f[0].records[2].streams[0].ssid = 1),
        Err(HandoverError::BadValue {
            token: 0x30,
            value: 1,
            ..
        })
    ));
    // Extents: empty, outside the pool, wrapping, over the region.
    assert!(matches!(
        decode_edited(|f| f[0].records[2].extents[0].len = 0),
        Err(HandoverError::BadValue {
            token: 0x30,
            value: 0,
            ..
        })
    ));
    assert_eq!(
        decode_edited(|f| f[0].records[2].extents[0] = ext(P + POOL.len - 0x800, 0x1000)),
        Err(HandoverError::OutsidePool {
            token: 0x30,
            what: "extent",
            address: P + POOL.len - 0x800,
            len: 0x1000
        })
    );
    assert!(matches!(
        decode_edited(|f| f[0].records[2].extents[0] = ext(u64::MAX - 0xfff, 0x2000)),
        Err(HandoverError::OutsidePool {
            token: 0x30,
            what: "extent",
            ..
        })
    ));
    let e = decode(
        &{
            let mut b = vec![0u8; MAX_REGION_SIZE];
            let n = encode(&fixture(), 1, ext(P + 0x3_0000, 0x1_0000), POOL, &mut b).unwrap();
            b.truncate(n);
            b
        },
        POOL,
    )
    .unwrap_err();
    assert_eq!(
        e,
        HandoverError::OverlapsRegion {
            token: 0x30,
            extent: ext(P + 0x3_0000, 0x1000),
            region: ext(P + 0x3_0000, 0x1_0000)
        }
    );
}

#[test]
fn overlapping_extents_are_refused_across_records_and_instances() {
    // Within one instance.
    assert_eq!(
        decode_edited(|f| f[0].records[2].extents[0] = ext(P + 0x2_8000, 0x1000)),
        Err(HandoverError::Overlap {
            token_a: 0x20,
            a: ext(P + 0x2_0000, 0x1_0000),
            token_b: 0x30,
            b: ext(P + 0x2_8000, 0x1000)
        })
    );
    // Across instances (the same token in both).
    let e = decode_edited(|f| f[1].records[0].extents.push(ext(P + 0x1_ffff, 2)).unwrap()).unwrap_err();
    assert_eq!(
        e,
        HandoverError::Overlap {
            token_a: 0x10,
            a: ext(P, 0x2_0000),
            token_b: 0x10,
            b: ext(P + 0x1_ffff, 2)
        }
    );
    assert!(e.to_string().contains("overlaps"), "{e}");
    // Within one record; an extent inside a larger one that precedes a third.
    assert!(matches!(
        decode_edited(|f| f[0].records[0].extents.push(ext(P + 0x100, 0x100)).unwrap()),
        Err(HandoverError::Overlap {
            token_a: 0x10,
            token_b: 0x10,
            ..
        })
    ));
    // Adjacent extents do not overlap.
    assert!(decode_edited(|f| f[0].records[2].extents.push(ext(P + 0x3_1000, 0x1000)).unwrap()).is_ok());
}

#[test]
fn cross_record_errors_name_what_is_wrong() {
    assert_eq!(
        decode_edited(|f| f[0].records[3].token = 0x20),
        Err(HandoverError::DuplicateToken(0x20))
    );
    assert_eq!(
        decode_edited(|f| f[0].records[2].parent_token = Some(0x99)),
        Err(HandoverError::MissingParent {
            token: 0x30,
            parent: 0x99
        })
    );
    assert_eq!(
        decode_edited(|f| f[0].records[2].parent_token = Some(0x10)),
        Err(HandoverError::ParentNotStage2 {
            token: 0x30,
            parent: 0x10,
            kind: RecordKind::Stage1
        })
    );
    // A parent in another instance does not count.
    assert!(matches!(
        decode_edited(|f| {
            let n = f[0].records.remove(2);
            f[1].records.push(n).unwrap();
        }),
        Err(HandoverError::MissingParent {
            token: 0x30,
            parent: 0x20
        })
    ));
    assert_eq!(
        decode_edited(|f| f[0].records[2].vmid = 6),
        Err(HandoverError::ParentVmidMismatch {
            token: 0x30,
            vmid: 6,
            parent_vmid: 5
        })
    );
    assert_eq!(
        decode_edited(|f| f[0].records[3].streams[0] = StreamRecord {
            sid: 1,
            ssid: 0,
            cd_table: P + 0x5_0000,
            cd_ssid_bits: 0,
            cd_two_level: false
        }),
        Err(HandoverError::DuplicateStream {
            sid: 1,
            ssid: 0,
            token_a: 0x10,
            token_b: 0x40
        })
    );
    // The same stream with another substream is another entry.
    assert!(
        decode_edited(|f| f[0].records[3].streams[0] = StreamRecord {
            sid: 1,
            ssid: 2,
            cd_table: P + 0x5_0000,
            cd_ssid_bits: 2,
            cd_two_level: false
        })
        .is_ok()
    );
    assert_eq!(
        decode_edited(|f| f[0].records[1].streams[0].sid = 3),
        Err(HandoverError::DuplicateStream {
            sid: 3,
            ssid: 0,
            token_a: 0x20,
            token_b: 0x30
        })
    );
    // ASIDs: unique per regime.
    assert_eq!(
        decode_edited(|f| {
            let mut again = f[1].records[0].clone();
            again.token = 0x11;
            again.streams[0].sid = 9;
            f[0].records.push(again).unwrap();
        }),
        Err(HandoverError::DuplicateAsid {
            asid: 1,
            token_a: 0x10,
            token_b: 0x11
        })
    );
    // VMIDs: unique among stage-2 records.
    let mut second = fixture()[0].records[1].clone();
    second.token = 0x21;
    second.table.as_mut().unwrap().root = P + 0x8_0000;
    second.extents[0].base = P + 0x8_0000;
    second.streams[0].sid = 8;
    let with = |vmid: u16| {
        let s = second.clone();
        decode_edited(move |f| {
            let mut s = s;
            s.vmid = vmid;
            f[0].records.push(s).unwrap();
        })
    };
    assert!(with(6).is_ok());
    assert_eq!(
        with(5),
        Err(HandoverError::DuplicateVmid {
            vmid: 5,
            token_a: 0x20,
            token_b: 0x21
        })
    );
}

#[test]
fn validate_identity_compares_base_idrs_and_iidr_only() {
    let a = identity(0x0905_0000);
    assert_eq!(validate_identity(&a, &a), Ok(()));
    let mut b = a;
    b.strtab_base = 0x5000_0000;
    b.strtab_sid_bits = 8;
    b.strtab_format = 0;
    assert_eq!(validate_identity(&a, &b), Ok(()));
    b.idr[3] = 0x1415;
    let e = validate_identity(&a, &b).unwrap_err();
    assert_eq!(
        e,
        HandoverError::IdentityMismatch {
            what: "IDR3",
            recorded: 0x1414,
            probed: 0x1415
        }
    );
    assert!(e.to_string().contains("IDR3 recorded 0x1414, probed 0x1415"), "{e}");
    let mut c = a;
    c.base = 0x0906_0000;
    assert!(matches!(
        validate_identity(&a, &c),
        Err(HandoverError::IdentityMismatch {
            what: "register base",
            ..
        })
    ));
    let mut d = a;
    d.iidr = 0;
    assert!(matches!(
        validate_identity(&a, &d),
        Err(HandoverError::IdentityMismatch { what: "IIDR", .. })
    ));
}

#[test]
fn peek_header_reads_a_refused_region() {
    let mut bytes = encode_vec(&fixture(), 42);
    bytes[300] ^= 0xff;
    let h = peek_header(&bytes).unwrap();
    assert_eq!((h.magic, h.version, h.generation), (MAGIC, VERSION, 42));
    assert_eq!(
        (h.instance_count, h.record_count, h.total_len),
        (2, 5, region_size(2, 5) as u64)
    );
    assert_eq!((h.region, h.pool), (REGION, POOL));
    assert!(matches!(decode(&bytes, POOL), Err(HandoverError::BadCrc { .. })));
    assert!(matches!(
        peek_header(&bytes[..95]),
        Err(HandoverError::Truncated { needed: 96, have: 95 })
    ));
}

#[test]
fn the_mutator_reaches_the_structural_checks() {
    let mut rng = Rng::new(1);
    let mut buf = vec![0u8; sample::BUFFER_SIZE];
    let (mut crc, mut other, mut accepted) = (0, 0, 0);
    for _ in 0..3000 {
        let instances = sample::instances(&mut rng, 6);
        let n = encode(&instances, 1, REGION, POOL, &mut buf).unwrap();
        let donor = buf[..n].to_vec();
        let len = sample::mutate(&mut buf, n, &donor, &mut rng);
        match decode(&buf[..len], POOL) {
            Ok(d) => {
                accepted += 1;
                sample::check_accepted(&d, POOL).unwrap();
            }
            Err(HandoverError::BadCrc { .. }) => crc += 1,
            Err(_) => other += 1,
        }
    }
    assert!(other > crc, "structural {other}, CRC {crc}");
    assert!(accepted > 0);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Whatever `decode` accepts (valid samples and their mutations, CRC fixed up or not) has every table, CD
    /// table and extent inside the pool.
    #[test]
    fn accepted_regions_stay_inside_the_pool(seed in proptest::prelude::any::<u64>(), rounds in 0usize..4) {
        let mut rng = Rng::new(seed);
        let instances = sample::instances(&mut rng, 8);
        let mut buf = vec![0u8; sample::BUFFER_SIZE];
        let mut len = encode(&instances, seed, REGION, POOL, &mut buf).unwrap();
        let donor = buf[..len].to_vec();
        for _ in 0..rounds {
            len = sample::mutate(&mut buf, len, &donor, &mut rng);
        }
        if let Ok(d) = decode(&buf[..len], POOL) {
            proptest::prop_assert_eq!(sample::check_accepted(&d, POOL), Ok(()));
            if rounds == 0 {
                proptest::prop_assert_eq!(&d.instances[..], &instances[..]);
            }
        } else {
            proptest::prop_assert!(rounds > 0, "a valid sample was refused");
        }
    }

    /// Arbitrary bytes behind a valid magic and version never panic the decoder.
    #[test]
    fn random_bytes_never_panic(mut bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048), seal: bool) {
        if bytes.len() >= 12 {
            bytes[..8].copy_from_slice(&MAGIC);
            bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        }
        if seal {
            sample::reseal(&mut bytes);
        }
        if let Ok(d) = decode(&bytes, POOL) {
            proptest::prop_assert_eq!(sample::check_accepted(&d, POOL), Ok(()));
        }
    }
}
