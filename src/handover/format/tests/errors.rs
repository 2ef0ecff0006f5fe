//! Every refusal of `decode` names what is wrong: header, identity, record fields, table shapes, addresses, overlaps and cross-record checks.

use super::*;

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
    put(&mut b, 8, &4u32.to_le_bytes());
    let e = decode(&b, POOL).unwrap_err();
    assert_eq!(
        e,
        HandoverError::UnknownVersion {
            found: 4,
            known: &[2, 3]
        }
    );
    // A newer image's region: the error names both versions.
    assert!(
        e.to_string().contains("version 4") && e.to_string().contains("writes version 3"),
        "{e}"
    );
    // Version 1 put table counts in bit 51, which this driver no longer reads: refused.
    let mut b = bytes.clone();
    put(&mut b, 8, &1u32.to_le_bytes());
    let e = decode(&b, POOL).unwrap_err();
    assert_eq!(
        e,
        HandoverError::UnknownVersion {
            found: 1,
            known: &[2, 3]
        }
    );
    assert!(!e.to_string().contains("newer"), "{e}");
    let mut b = bytes.clone();
    b[200] ^= 1;
    let e = decode(&b, POOL).unwrap_err();
    let HandoverError::BadCrc { stored, computed } = e else {
        panic!("{e}")
    };
    assert_ne!(stored, computed);
    assert!(e.to_string().contains(&format!("{stored:#010x}")), "{e}");
    // Version 3: the records end before the stated length.
    assert_eq!(
        decode_poked(|b| {
            put(b, 16, &(n + 8).to_le_bytes());
            b.extend_from_slice(&[0; 8]);
        }),
        Err(HandoverError::LengthMismatch {
            stated: n + 8,
            expected: n
        })
    );
    // Version 2: the counts give the length.
    let n2 = v2_region_size(2, 5) as u64;
    assert_eq!(
        decode_poked_v2(|b| put(b, 16, &(n2 + 8).to_le_bytes())),
        Err(HandoverError::LengthMismatch {
            stated: n2 + 8,
            expected: n2
        })
    );
    assert_eq!(
        decode_poked(|b| put(b, 32, &9u32.to_le_bytes())),
        Err(HandoverError::TooManyInstances { count: 9, max: 8 })
    );
    // Version 2's writer held at most 4 instances of 32 records (so that what it wrote re-encodes as version 3
    // within the metadata area): more is refused.
    assert_eq!(
        decode_poked_v2(|b| put(b, 32, &5u32.to_le_bytes())),
        Err(HandoverError::TooManyInstances { count: 5, max: 4 })
    );
    assert_eq!(
        decode_poked_v2(|b| put(b, HEADER_SIZE + IDENTITY_SIZE + 36, &33u32.to_le_bytes())),
        Err(HandoverError::TooManyRecords {
            instance: Some(1),
            count: 33,
            max: 32
        })
    );
    // No cap on records but the region's bytes: a count the bytes do not hold ends past the region.
    assert_eq!(
        decode_poked(|b| put(b, 36, &129u32.to_le_bytes())),
        Err(HandoverError::RecordCountMismatch {
            header: 129,
            instances: 5
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
    assert!(matches!(
        decode_poked(|b| {
            put(b, at + 36, &33u32.to_le_bytes());
            put(b, 36, &37u32.to_le_bytes());
        }),
        Err(HandoverError::LengthMismatch { .. })
    ));
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
            offset: (rec(1) + 20) as u64
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
    // Version 3 has no cap on streams or extents but the region's bytes: counts the record does not hold are
    // read from the next record's bytes (and refused there) or run past the region.
    assert!(decode_poked(|b| b[rec(0) + 64] = 9).is_err());
    assert!(matches!(
        decode_poked(|b| b[rec(0) + 68] = 200),
        Err(HandoverError::LengthMismatch { .. })
    ));
    assert_eq!(
        decode_poked_v2(|b| b[rec_v2(0) + 20] = 9),
        Err(HandoverError::TooManyEntries {
            token: 0x10,
            what: "streams",
            count: 9,
            max: 8
        })
    );
    // Version 2's fixed slots: the unused ones must be zero.
    assert_eq!(
        decode_poked_v2(|b| b[rec_v2(0) + 64 + 24 + 3] = 1),
        Err(HandoverError::ReservedNonZero {
            what: "unused stream slot",
            offset: (rec_v2(0) + 64 + 24) as u64
        })
    );
    assert_eq!(
        decode_poked_v2(|b| b[rec_v2(0) + 256 + 16 + 15] = 1),
        Err(HandoverError::ReservedNonZero {
            what: "unused extent slot",
            offset: (rec_v2(0) + 256 + 16) as u64
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
        decode_poked(|b| b[rec(0) + 72 + 20] = 1),
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
    let what = |r: Result<Vec<OwnedInstance>, HandoverError>| match r {
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
        decode_poked(|b| b[rec(0) + 72 + 17] = 2),
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
            let mut b = vec![0u8; sample::BUFFER_SIZE];
            let n = sample::encode_owned(&fixture(), 1, ext(P + 0x3_0000, 0x1_0000), POOL, &mut b).unwrap();
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
    // Within one record: each extent after the one before.
    assert_eq!(
        decode_edited(|f| f[0].records[0].extents.push(ext(P + 0x1_0000, 0x1000))),
        Err(HandoverError::BadValue {
            token: 0x10,
            what: "extent base (each extent after the one before)",
            value: P + 0x1_0000
        })
    );
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
    let e = decode_edited(|f| f[1].records[0].extents.insert(0, ext(P + 0x1_ffff, 2))).unwrap_err();
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
    // Within one record, an extent inside the one before it: not after it.
    assert!(matches!(
        decode_edited(|f| f[0].records[0].extents.push(ext(P + 0x100, 0x100))),
        Err(HandoverError::BadValue { token: 0x10, value, .. }) if value == P + 0x100
    ));
    // Adjacent extents do not overlap.
    assert!(decode_edited(|f| f[0].records[2].extents.push(ext(P + 0x3_1000, 0x1000))).is_ok());
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
            f[1].records.push(n);
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
            f[0].records.push(again);
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
            f[0].records.push(s);
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
