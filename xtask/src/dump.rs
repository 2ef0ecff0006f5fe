//! `cargo xtask handover-dump FILE`: a raw handover region, decoded and printed for a bring-up engineer.

use std::fmt::Write;

use smmuv3::handover::format::{Header, MAGIC, decode, peek_header};
use smmuv3::handover::{DomainRecord, Extent, InstanceRecords};

fn extent(e: &Extent) -> String {
    match e.end() {
        Some(end) => format!("{:#x}..{end:#x} ({:#x} bytes)", e.base, e.len),
        None => format!("{:#x}+{:#x} (wraps)", e.base, e.len),
    }
}

fn header(out: &mut String, h: &Header) {
    let magic = if h.magic == MAGIC {
        format!("{:?} (ok)", String::from_utf8_lossy(&h.magic))
    } else {
        format!("{:02x?} (expected {:?})", h.magic, String::from_utf8_lossy(&MAGIC))
    };
    let _ = writeln!(out, "header");
    let _ = writeln!(out, "  magic        {magic}");
    let _ = writeln!(out, "  version      {}", h.version);
    let _ = writeln!(out, "  total length {} bytes", h.total_len);
    let _ = writeln!(out, "  generation   {}", h.generation);
    let _ = writeln!(out, "  crc32c       {:#010x}", h.crc32c);
    let _ = writeln!(out, "  instances    {}", h.instance_count);
    let _ = writeln!(out, "  records      {}", h.record_count);
    let _ = writeln!(out, "  region       {}", extent(&h.region));
    let _ = writeln!(out, "  pool         {}", extent(&h.pool));
}

fn record(out: &mut String, r: &DomainRecord) {
    let _ = writeln!(out, "  record {:#018x} {:?}", r.token, r.kind);
    let _ = writeln!(out, "    asid {} vmid {}", r.asid, r.vmid);
    if let Some(t) = &r.table {
        let _ = writeln!(
            out,
            "    table root {:#x}: {} KiB granule, {}-bit input, {}-bit output, start level {}",
            t.root,
            1u32 << (t.granule_log2 - 10),
            t.input_bits,
            t.output_bits,
            t.start_level
        );
    }
    if let Some(p) = r.parent_token {
        let _ = writeln!(out, "    parent {p:#018x}");
    }
    if let Some(g) = &r.guest {
        let _ = writeln!(
            out,
            "    guest CD table IPA {:#x}, S1CDMax {}, S1Fmt {}, S1DSS {}",
            g.cd_table_ipa, g.cd_max_log2, g.layout, g.default_substream
        );
    }
    for s in &r.streams {
        let _ = write!(out, "    stream sid {:#x} ssid {:#x}", s.sid, s.ssid);
        if s.cd_table != 0 {
            let _ = write!(
                out,
                ", CD table {:#x} ({} SubstreamID bits, {})",
                s.cd_table,
                s.cd_ssid_bits,
                if s.cd_two_level { "2-level" } else { "linear" }
            );
        }
        let _ = writeln!(out);
    }
    for e in &r.extents {
        let _ = writeln!(out, "    extent {}", extent(&e));
    }
}

fn instance(out: &mut String, i: usize, inst: &InstanceRecords<'_>) {
    let id = &inst.identity;
    let _ = writeln!(out, "instance {i}: SMMU at {:#x}", id.base);
    let idr: Vec<String> = id.idr.iter().map(|r| format!("{r:#010x}")).collect();
    let _ = writeln!(out, "  IDR0-5 {}  IIDR {:#010x}", idr.join(" "), id.iidr);
    let _ = writeln!(
        out,
        "  stream table {:#x}: {}, {} StreamID bits, split {}",
        id.strtab_base,
        if id.strtab_format == 0 { "linear" } else { "2-level" },
        id.strtab_sid_bits,
        id.strtab_split
    );
    let _ = writeln!(out, "  {} record(s)", inst.records.len());
    for r in &inst.records {
        record(out, &r);
    }
}

/// The dump of `bytes` and whether validation accepted them. The pool comes from the region's own header, so the
/// dump is validated standalone (a restore also compares that pool with its own).
pub fn dump(bytes: &[u8]) -> (String, bool) {
    let mut out = String::new();
    let _ = writeln!(out, "{} bytes", bytes.len());
    let h = match peek_header(bytes) {
        Ok(h) => h,
        Err(e) => {
            let _ = writeln!(out, "validation: REFUSED: {e}");
            return (out, false);
        }
    };
    header(&mut out, &h);
    let mut scratch = vec![0u64; smmuv3::handover::format::scratch_words(bytes.len())];
    match decode(bytes, h.pool, &mut scratch) {
        Ok(d) => {
            for (i, inst) in d.instances.iter().enumerate() {
                instance(&mut out, i, inst);
            }
            let _ = writeln!(
                out,
                "validation: OK (generation {}, {} instance(s), {} record(s))",
                d.generation, h.instance_count, h.record_count
            );
            (out, true)
        }
        Err(e) => {
            let _ = writeln!(out, "validation: REFUSED: {e}");
            (out, false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smmuv3::handover::RecordKind;
    use smmuv3::handover::format::sample::{self, POOL, REGION, Rng};

    fn sample_bytes() -> (Vec<u8>, Vec<sample::OwnedInstance>) {
        // A seed whose sample has every kind of record.
        for seed in 0.. {
            let instances = sample::instances(&mut Rng::new(seed), 8);
            let kinds = |k| instances.iter().flat_map(|i| i.records.iter()).any(|r| r.kind == k);
            if [
                RecordKind::Stage1,
                RecordKind::Stage2,
                RecordKind::Nested,
                RecordKind::Stage1El2,
            ]
            .into_iter()
            .all(kinds)
            {
                let mut buf = vec![0u8; sample::BUFFER_SIZE];
                let n = sample::encode_owned(&instances, 41, REGION, POOL, &mut buf).unwrap();
                buf.truncate(n);
                return (buf, instances.to_vec());
            }
        }
        unreachable!()
    }

    #[test]
    fn a_valid_region_is_printed_whole() {
        let (bytes, instances) = sample_bytes();
        let (text, ok) = dump(&bytes);
        assert!(ok, "{text}");
        assert!(text.contains("magic        \"SMMU3HND\" (ok)"), "{text}");
        assert!(text.contains("generation   41"), "{text}");
        assert!(
            text.contains("pool         0x80000000..0x90000000 (0x10000000 bytes)"),
            "{text}"
        );
        assert!(text.contains("instance 0: SMMU at 0x9050000"), "{text}");
        assert!(text.contains("validation: OK (generation 41"), "{text}");
        for r in instances.iter().flat_map(|i| i.records.iter()) {
            assert!(
                text.contains(&format!("record {:#018x} {:?}", r.token, r.kind)),
                "{text}"
            );
            if let Some(p) = r.parent_token {
                assert!(text.contains(&format!("parent {p:#018x}")), "{text}");
            }
        }
        assert!(text.contains("KiB granule"), "{text}");
        assert!(text.contains("guest CD table IPA"), "{text}");
        assert!(text.contains(", CD table 0x"), "{text}");
        assert!(text.contains("    extent 0x8"), "{text}");
    }

    /// The region the format-2 driver wrote (the committed golden file's metadata pages): read and validated as
    /// version 2, every record printed.
    #[test]
    fn a_version_2_region_is_read_too() {
        const GOLDEN: &[u8] = include_bytes!("../../tests/data/handover/v2-first-image.region");
        // The container (see src/handover/restore/golden.rs): a 48-byte header, then (offset, 4096 bytes) pages.
        let pages = u32::from_le_bytes(GOLDEN[40..44].try_into().unwrap()) as usize;
        let mut metadata = vec![0u8; 64 << 10];
        for p in 0..pages {
            let at = 48 + p * (8 + 4096);
            let offset = u64::from_le_bytes(GOLDEN[at..at + 8].try_into().unwrap()) as usize;
            if offset < metadata.len() {
                metadata[offset..offset + 4096].copy_from_slice(&GOLDEN[at + 8..at + 8 + 4096]);
            }
        }
        let (text, ok) = dump(&metadata);
        assert!(ok, "{text}");
        assert!(text.contains("  version      2"), "{text}");
        assert!(text.contains("validation: OK"), "{text}");
        for token in [0x51u64, 0x52, 0x53, 0x55] {
            assert!(text.contains(&format!("record {token:#018x}")), "{text}");
        }
    }

    #[test]
    fn a_refused_region_still_shows_its_header_and_why() {
        let (mut bytes, _) = sample_bytes();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        let (text, ok) = dump(&bytes);
        assert!(!ok);
        assert!(text.contains("generation   41"), "{text}");
        assert!(text.contains("validation: REFUSED: handover CRC32C mismatch"), "{text}");
        assert!(!text.contains("instance 0"), "{text}");
        let (text, ok) = dump(&bytes[..10]);
        assert!(!ok);
        assert!(
            text.contains("REFUSED: handover region truncated: 96 bytes needed, 10 present"),
            "{text}"
        );
        let (text, _) = dump(&[0u8; 128]);
        assert!(text.contains("(expected \"SMMU3HND\")"), "{text}");
        assert!(text.contains("REFUSED: no handover region"), "{text}");
    }
}
