//! Decoding a region with full validation, in the documented order: magic and version, lengths, CRC, reserved
//! fields, each identity and record, then what records say about each other (tokens, parents, extents).

use zerocopy::FromBytes;

use super::super::{Entries, Extent, InstanceRecords, MAX_INSTANCES, RecordKind, Records, SmmuIdentity, TableShape};
use super::*;

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
pub fn decode<'a>(bytes: &'a [u8], pool: Extent, scratch: &mut [u64]) -> Result<Decoded<'a>, HandoverError> {
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
        // Version 2 has version 1's byte layout (only the page tables' count bits moved); version 3 the same
        // header and identities, and records of variable length.
        2 | 3 => decode_region(bytes, pool, version, scratch),
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

fn decode_region<'a>(
    bytes: &'a [u8],
    pool: Extent,
    version: u32,
    scratch: &mut [u64],
) -> Result<Decoded<'a>, HandoverError> {
    let header = raw_header(bytes)?;
    let instance_count = header.instance_count.get();
    let record_count = header.record_count.get();
    // Version 2's writer held at most 4 instances of 32 records: what it wrote re-encodes as version 3 within the
    // metadata area (a full version-2 record takes 392 bytes as version 3, 8 more).
    let max_instances = if version == 2 { V2_INSTANCES } else { MAX_INSTANCES };
    if instance_count as usize > max_instances {
        return Err(HandoverError::TooManyInstances {
            count: instance_count,
            max: max_instances,
        });
    }
    let stated = header.total_len.get();
    // Version 2: the counts give the length. Version 3: records have variable lengths, so the length is checked
    // against the identities it must hold, the bytes there are (below), and where the last record ends (below).
    let expected = match version {
        2 => v2_region_size(instance_count as usize, record_count as usize) as u64,
        _ => stated.max((HEADER_SIZE + instance_count as usize * IDENTITY_SIZE) as u64),
    };
    if stated != expected {
        return Err(HandoverError::LengthMismatch { stated, expected });
    }
    let region_bytes =
        usize::try_from(expected)
            .ok()
            .and_then(|end| bytes.get(..end))
            .ok_or(HandoverError::Truncated {
                needed: stated,
                have: bytes.len() as u64,
            })?;
    let needed = scratch_words(region_bytes.len());
    if scratch.len() < needed {
        return Err(HandoverError::ScratchTooSmall {
            needed,
            have: scratch.len(),
        });
    }
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

    let mut counts = [0usize; MAX_INSTANCES];
    let mut identities: heapless::Vec<SmmuIdentity, MAX_INSTANCES> = heapless::Vec::new();
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
        if identities.iter().any(|id| id.base == identity.base) {
            return Err(HandoverError::DuplicateInstance { base: identity.base });
        }
        let count = raw.record_count.get();
        if version == 2 && count as usize > V2_RECORDS {
            return Err(HandoverError::TooManyRecords {
                instance: Some(i),
                count,
                max: V2_RECORDS,
            });
        }
        *slot = count as usize;
        sum += u64::from(count);
        // At most MAX_INSTANCES identities: the header's count was checked.
        let _ = identities.push(identity);
    }
    if sum != u64::from(record_count) {
        return Err(HandoverError::RecordCountMismatch {
            header: record_count,
            instances: sum,
        });
    }
    let mut decoded = Decoded {
        generation: header.generation.get(),
        region,
        pool,
        instances: heapless::Vec::new(),
    };
    let mut offset = HEADER_SIZE + instance_count as usize * IDENTITY_SIZE;
    for (i, identity) in identities.iter().enumerate() {
        let start = offset;
        // Every record takes bytes of the region: the loop ends at its end, whatever the count says.
        for _ in 0..counts[i] {
            let parts = read_parts(region_bytes, offset, version, stated)?;
            decode_record(&parts, offset, pool, region, identity.strtab_sid_bits, version)?;
            offset += parts.len;
        }
        let records = Records::from_bytes(&region_bytes[start..offset], counts[i], version);
        check_instance(&records, scratch)?;
        let _ = decoded.instances.push(InstanceRecords {
            identity: *identity,
            records,
        });
    }
    if offset as u64 != stated {
        return Err(HandoverError::LengthMismatch {
            stated,
            expected: offset as u64,
        });
    }
    check_overlaps(&decoded.instances, scratch)?;
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

pub(super) fn record_kind(kind: u32) -> Option<RecordKind> {
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
pub(super) fn table_bytes(shape: &TableShape, stage2: bool) -> Result<u64, (&'static str, u64)> {
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
pub(super) fn cd_table_bytes(ssid_bits: u8, two_level: bool) -> u64 {
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
    extents: &Entries<'_, Extent>,
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

/// A record as read from the region, before its checks: its head (a version-2 record's fields at the same
/// offsets), and where its streams and extents are.
struct Parts<'a> {
    head: RawRecordHead,
    streams: &'a [u8],
    stream_count: usize,
    streams_at: usize,
    extents: &'a [u8],
    extent_count: usize,
    /// Bytes the record takes.
    len: usize,
}

/// Reads the record of format `version` at `offset` of the region's `bytes` (`stated` long), checking what only
/// one version has: version 2's unused slots and reserved bytes, version 3's reserved bytes and that its counts
/// stay inside the region.
fn read_parts(bytes: &[u8], offset: usize, version: u32, stated: u64) -> Result<Parts<'_>, HandoverError> {
    let past_end = |needed: Option<usize>| HandoverError::LengthMismatch {
        stated,
        expected: needed.map_or(u64::MAX, |n| n as u64),
    };
    if version == 2 {
        let truncated = HandoverError::Truncated {
            needed: stated,
            have: bytes.len() as u64,
        };
        let record = bytes.get(offset..offset + RECORD_SIZE).ok_or(truncated)?;
        let raw = RawRecord::read_from_bytes(record).map_err(|_| truncated)?;
        let (n, m) = (usize::from(raw.stream_count), usize::from(raw.extent_count));
        let token = raw.token.get();
        for (what, count) in [("streams", n), ("extents", m)] {
            if count > V2_ENTRIES {
                return Err(HandoverError::TooManyEntries {
                    token,
                    what,
                    count: count as u32,
                    max: V2_ENTRIES,
                });
            }
        }
        if raw.reserved0 != [0; 2] {
            return Err(nonzero("record reserved0", offset + offset_of!(RawRecord, reserved0)));
        }
        let (streams_at, extents_at) = (offset_of!(RawRecord, streams), offset_of!(RawRecord, extents));
        for (i, s) in raw.streams.iter().enumerate().skip(n) {
            if s.as_bytes().iter().any(|&b| b != 0) {
                return Err(nonzero("unused stream slot", offset + streams_at + i * STREAM_SIZE));
            }
        }
        for (i, e) in raw.extents.iter().enumerate().skip(m) {
            if e.as_bytes().iter().any(|&b| b != 0) {
                return Err(nonzero("unused extent slot", offset + extents_at + i * EXTENT_SIZE));
            }
        }
        let head = RawRecordHead::read_from_prefix(record).map_err(|_| truncated)?.0;
        return Ok(Parts {
            head,
            streams: &record[streams_at..streams_at + n * STREAM_SIZE],
            stream_count: n,
            streams_at: offset + streams_at,
            extents: &record[extents_at..extents_at + m * EXTENT_SIZE],
            extent_count: m,
            len: RECORD_SIZE,
        });
    }
    let head_end = offset + RECORD_HEAD_SIZE;
    let head_bytes = bytes.get(offset..head_end).ok_or(past_end(Some(head_end)))?;
    let head = RawRecordHead::read_from_bytes(head_bytes).map_err(|_| past_end(Some(head_end)))?;
    if head.reserved0 != [0; 4] {
        return Err(nonzero(
            "record reserved0",
            offset + offset_of!(RawRecordHead, reserved0),
        ));
    }
    let (n, m) = (head.stream_count.get() as usize, head.extent_count.get() as usize);
    let extents_at = n.checked_mul(STREAM_SIZE).and_then(|b| b.checked_add(head_end));
    let end = m
        .checked_mul(EXTENT_SIZE)
        .zip(extents_at)
        .and_then(|(b, at)| b.checked_add(at));
    let (Some(extents_at), Some(end)) = (extents_at, end) else {
        return Err(past_end(None));
    };
    let body = bytes.get(head_end..end).ok_or(past_end(Some(end)))?;
    Ok(Parts {
        head,
        streams: &body[..extents_at - head_end],
        stream_count: n,
        streams_at: head_end,
        extents: &body[extents_at - head_end..],
        extent_count: m,
        len: end - offset,
    })
}

/// The checks of one record on its own (every check but those across records).
fn decode_record(
    parts: &Parts<'_>,
    offset: usize,
    pool: Extent,
    region: Extent,
    sid_bits: u8,
    version: u32,
) -> Result<(), HandoverError> {
    let raw = &parts.head;
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
    // Version 3: a stage-1 or stage-2 record may be an identity domain's (never an EL2 one: identity domains
    // are created for devices, whose stage 1 is never the EL2 regime).
    let identity =
        version >= 3 && flags == expected | FLAG_IDENTITY && matches!(kind, RecordKind::Stage1 | RecordKind::Stage2);
    let flags = if identity { flags & !FLAG_IDENTITY } else { flags };
    if flags != expected {
        return Err(HandoverError::BadFlags {
            token,
            kind: kind_value,
            flags,
        });
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

    let extents: Entries<'_, Extent> = Entries::from_bytes(parts.extents, parts.extent_count);
    let mut after = 0u64;
    for e in extents.iter() {
        // A record's extents come in ascending order (a restore looks tables up in them by address).
        if e.base < after {
            return Err(HandoverError::BadValue {
                token,
                what: "extent base (each extent after the one before)",
                value: e.base,
            });
        }
        after = e.base.saturating_add(e.len);
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
    }
    // Every record's extents are checked against each other's (and other records') by `check_overlaps`.

    if flags & FLAG_TABLE != 0 {
        let shape = raw.table.shape();
        let len = table_bytes(&shape, kind == RecordKind::Stage2)
            .map_err(|(what, value)| HandoverError::BadTableShape { token, what, value })?;
        check_table(token, "root table", shape.root, len, len, pool, &extents)?;
    }

    if flags & FLAG_GUEST != 0 {
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
    }

    for i in 0..parts.stream_count {
        let at = parts.streams_at + i * STREAM_SIZE;
        let s =
            RawStream::read_from_bytes(&parts.streams[i * STREAM_SIZE..(i + 1) * STREAM_SIZE]).map_err(|_| past(at))?;
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
        }
    }
    Ok(())
}

/// A stream entry that cannot be read (never: the record's bytes were sliced to its counts).
fn past(at: usize) -> HandoverError {
    HandoverError::Truncated {
        needed: (at + STREAM_SIZE) as u64,
        have: at as u64,
    }
}

/// Words of scratch [`decode`] needs for a region of `len` bytes: its checks across records sort what the records
/// name (each stream, extent and record takes at least 16 bytes of the region and at most 2 words of scratch).
pub const fn scratch_words(len: usize) -> usize {
    len / 8 + 2
}

/// Records an instance of a version-2 region held at most.
pub(crate) const V2_RECORDS: usize = 32;
/// Instances a version-2 region held at most.
pub(crate) const V2_INSTANCES: usize = 4;

/// The checks across one instance's records: tokens, ASIDs and VMIDs unique, parents, streams unique. Each sorts
/// keys in `scratch` (at least a word per stream and two per record): n log n, whatever the region holds. The
/// records a duplicate names are found again by a walk, only then.
fn check_instance(records: &Records<'_>, scratch: &mut [u64]) -> Result<(), HandoverError> {
    let n = records.len();
    // Two records with `key`, in order (the keys were found twice, so there are two).
    let two = |key: &dyn Fn(&DomainRecord<'_>) -> Option<u64>, value: u64| {
        let mut found = records.iter().filter(|r| key(r) == Some(value));
        let a = found.next().map_or(0, |r| r.token);
        let b = found.next().map_or(0, |r| r.token);
        (a, b)
    };
    let sorted_duplicate = |keys: &mut [u64]| {
        keys.sort_unstable();
        keys.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
    };
    // Tokens.
    let keys = &mut scratch[..n];
    for (slot, r) in keys.iter_mut().zip(records.iter()) {
        *slot = r.token;
    }
    if let Some(token) = sorted_duplicate(keys) {
        return Err(HandoverError::DuplicateToken(token));
    }
    // ASIDs within a stage-1 regime (EL1 and EL2 tag their TLB entries apart), VMIDs among stage-2 records.
    for regime in [RecordKind::Stage1, RecordKind::Stage1El2, RecordKind::Stage2] {
        let id = move |r: &DomainRecord<'_>| match r.kind {
            k if k != regime => None,
            RecordKind::Stage2 => Some(u64::from(r.vmid)),
            _ => Some(u64::from(r.asid)),
        };
        let mut m = 0;
        for r in records.iter() {
            if let Some(v) = id(&r) {
                scratch[m] = v;
                m += 1;
            }
        }
        if let Some(v) = sorted_duplicate(&mut scratch[..m]) {
            let (token_a, token_b) = two(&id, v);
            return Err(match regime {
                RecordKind::Stage2 => HandoverError::DuplicateVmid {
                    vmid: v as u16,
                    token_a,
                    token_b,
                },
                _ => HandoverError::DuplicateAsid {
                    asid: v as u16,
                    token_a,
                    token_b,
                },
            });
        }
    }
    // Parents: every token with its kind and VMID, sorted by token (unique, checked above), searched by each
    // nested record.
    let (pairs, _) = scratch[..2 * n].as_chunks_mut::<2>();
    for (pair, r) in pairs.iter_mut().zip(records.iter()) {
        *pair = [r.token, (r.kind as u64) << 16 | u64::from(r.vmid)];
    }
    pairs.sort_unstable_by_key(|p| p[0]);
    for r in records.iter() {
        let Some(parent) = r.parent_token else { continue };
        let Ok(at) = pairs.binary_search_by_key(&parent, |p| p[0]) else {
            return Err(HandoverError::MissingParent { token: r.token, parent });
        };
        let (kind, vmid) = (pairs[at][1] >> 16, pairs[at][1] as u16);
        if kind != RecordKind::Stage2 as u64 {
            return Err(HandoverError::ParentNotStage2 {
                token: r.token,
                parent,
                kind: record_kind(kind as u32).unwrap_or(RecordKind::Stage1),
            });
        }
        if vmid != r.vmid {
            return Err(HandoverError::ParentVmidMismatch {
                token: r.token,
                vmid: r.vmid,
                parent_vmid: vmid,
            });
        }
    }
    // Streams: each (StreamID, SubstreamID) once in the instance; the pair is named lowest token first.
    let mut m = 0;
    for r in records.iter() {
        for s in r.streams.iter() {
            scratch[m] = u64::from(s.sid) << 32 | u64::from(s.ssid);
            m += 1;
        }
    }
    if let Some(key) = sorted_duplicate(&mut scratch[..m]) {
        let (sid, ssid) = ((key >> 32) as u32, key as u32);
        let mut owners = records
            .iter()
            .flat_map(|r| r.streams.iter().map(move |s| (s, r.token)))
            .filter(|(s, _)| (s.sid, s.ssid) == (sid, ssid))
            .map(|(_, token)| token);
        let (a, b) = (owners.next().unwrap_or(0), owners.next().unwrap_or(0));
        return Err(HandoverError::DuplicateStream {
            sid,
            ssid,
            token_a: a.min(b),
            token_b: a.max(b),
        });
    }
    Ok(())
}

/// Every extent of every record of `instances`, with its record's token.
fn all_extents<'a>(instances: &'a [InstanceRecords<'a>]) -> impl Iterator<Item = (u64, Extent)> + Clone + 'a {
    instances
        .iter()
        .flat_map(|i| i.records.iter())
        .flat_map(|r| r.extents.iter().map(move |e| (r.token, e)))
}

/// An SMMU left running keeps its own structures (stream table, spans) in the pool from `strtab_base` for
/// `core_len` bytes: inside the pool, and shared with no record's extent.
fn check_core_extents(instances: &[InstanceRecords<'_>], pool: Extent) -> Result<(), HandoverError> {
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
        if let Some((token, e)) = all_extents(instances).find(|(_, e)| e.overlaps(&core)) {
            return Err(HandoverError::Overlap {
                token_a: 0,
                a: core,
                token_b: token,
                b: e,
            });
        }
    }
    Ok(())
}

/// No extent shares a byte with another, in any record of any instance (extents are non-empty and do not wrap:
/// checked before): sorted by base in `scratch` (two words each), any overlap shows between neighbours. The pair
/// is named lower base first, with the records found again by a walk.
fn check_overlaps(instances: &[InstanceRecords<'_>], scratch: &mut [u64]) -> Result<(), HandoverError> {
    let n = all_extents(instances).count();
    let (pairs, _) = scratch[..2 * n].as_chunks_mut::<2>();
    for (pair, (_, e)) in pairs.iter_mut().zip(all_extents(instances)) {
        *pair = [e.base, e.len];
    }
    pairs.sort_unstable();
    let Some(w) = pairs.windows(2).find(|w| w[0][0] + w[0][1] > w[1][0]) else {
        return Ok(());
    };
    let (a, b) = (
        Extent {
            base: w[0][0],
            len: w[0][1],
        },
        Extent {
            base: w[1][0],
            len: w[1][1],
        },
    );
    // The owners: `a`'s first, then `b`'s other than that very entry (`a` and `b` may be equal).
    let mut entries = all_extents(instances).enumerate();
    let (ia, token_a) = entries
        .clone()
        .find(|(_, (_, e))| *e == a)
        .map_or((usize::MAX, 0), |(i, (t, _))| (i, t));
    let token_b = entries
        .find(|(i, (_, e))| *e == b && *i != ia)
        .map_or(0, |(_, (t, _))| t);
    Err(HandoverError::Overlap { token_a, a, token_b, b })
}
