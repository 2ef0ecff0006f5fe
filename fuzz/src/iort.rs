//! The IORT reader (`smmuv3-iort`) under mutation: a good table (`smmuv3_iort::sample`), each case changed by one
//! to four edits (a byte, an aligned 32-bit field set to a value that matters to a reader: 0, 1, the length, a
//! node's offset, all ones; a cut; random bytes appended; the root complex given random mappings), with the
//! length field and the checksum made consistent most of the time so that the checks behind them are reached.
//! A case fails when the reader panics, refuses the unchanged table, or accepts a table that an independent
//! reading of the rules (plain byte reads, not the reader's code) finds malformed, or then reports something
//! outside it or an ID range that wraps.

use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use smmuv3::handover::format::sample::Rng;
use smmuv3_iort::sample::{ITS, NAMED, RC, SMMU, fix_checksum, good, table_with};
use smmuv3_iort::{Iort, IortError};

use super::{Failure, Stats};

/// What the IORT target did.
#[derive(Clone, Debug, Default)]
pub struct IortStats {
    /// Cases run.
    pub execs: u64,
    /// Tables the reader accepted.
    pub accepted: u64,
    /// Refusals by error variant.
    pub refused: BTreeMap<&'static str, u64>,
}

fn variant(e: &IortError) -> &'static str {
    match e {
        IortError::TooShort => "TooShort",
        IortError::Signature(_) => "Signature",
        IortError::Length { .. } => "Length",
        IortError::Checksum { .. } => "Checksum",
        IortError::Node(_) => "Node",
        IortError::Mappings(_) => "Mappings",
        IortError::Reference(_) => "Reference",
        IortError::Overflow(_) => "Overflow",
        IortError::Name(_) => "Name",
        _ => "other",
    }
}

/// Case `index` of `seed`: the table and whether it is the unchanged good one.
pub fn build_case(seed: u64, index: u64) -> (Vec<u8>, bool) {
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x1027);
    if index == 0 {
        return (good(), true);
    }
    let mut t = if rng.chance(1, 4) {
        let targets = [SMMU, ITS, RC, NAMED, SMMU + 4, 0];
        let mappings: Vec<_> = (0..rng.below(4))
            .map(|_| {
                let pick = |rng: &mut Rng| match rng.below(4) {
                    0 => 0,
                    1 => 0xffff,
                    2 => 0xffff_ffff,
                    _ => rng.next_u64() as u32,
                };
                let reference = targets[rng.below(targets.len() as u64) as usize];
                (
                    pick(&mut rng),
                    pick(&mut rng),
                    pick(&mut rng),
                    reference,
                    rng.below(2) as u32,
                )
            })
            .collect();
        table_with(&mappings)
    } else {
        good()
    };
    for _ in 0..1 + rng.below(4) {
        let len = t.len();
        match rng.below(5) {
            0 if len > 0 => {
                let at = rng.below(len as u64) as usize;
                t[at] = rng.next_u64() as u8;
            }
            1 if len >= 4 => {
                let at = (rng.below(len as u64 / 4) * 4) as usize;
                let values = [0, 1, len as u32, SMMU, RC, NAMED, 0xffff_ffff, 16, 20, 36];
                let v = values[rng.below(values.len() as u64) as usize];
                let v = if rng.chance(1, 4) {
                    v.wrapping_add(rng.below(8) as u32)
                } else {
                    v
                };
                t[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            2 if len > 0 => t.truncate(rng.below(len as u64) as usize),
            3 => t.extend((0..rng.below(64)).map(|_| rng.next_u64() as u8)),
            _ => {
                let at = rng.below(len.max(1) as u64) as usize;
                if let Some(b) = t.get_mut(at) {
                    *b ^= 1 << rng.below(8);
                }
            }
        }
    }
    let len = t.len();
    if len >= 8 && rng.chance(3, 4) {
        t[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    }
    if len >= 10 && rng.chance(3, 4) {
        fix_checksum(&mut t);
    }
    (t, false)
}

/// An independent reading of DEN 0049's rules, with plain byte reads: what an accepted table must satisfy
/// (the declared length within the bytes, the checksum, every node within the table and at least a header long,
/// every ID mapping array within its node, every output reference the start of a node, no range that wraps).
fn well_formed(table: &[u8]) -> Result<(), String> {
    let u32_at = |at: usize| -> Option<u32> { Some(u32::from_le_bytes(table.get(at..at + 4)?.try_into().ok()?)) };
    let u16_at = |at: usize| -> Option<u16> { Some(u16::from_le_bytes(table.get(at..at + 2)?.try_into().ok()?)) };
    let length = u32_at(4).ok_or("no length")? as usize;
    if length > table.len() || length < 48 {
        return Err(format!("declared length {length:#x} of {:#x} bytes", table.len()));
    }
    let table = &table[..length];
    if table.iter().fold(0u8, |s, b| s.wrapping_add(*b)) != 0 {
        return Err("checksum".into());
    }
    let (count, first) = (u32_at(36).ok_or("count")?, u32_at(40).ok_or("offset")? as usize);
    let mut starts = Vec::new();
    let mut at = first;
    for _ in 0..count {
        let len = usize::from(u16_at(at + 1).ok_or_else(|| format!("node at {at:#x} past the end"))?);
        if len < 16 || at + len > length {
            return Err(format!("node at {at:#x} of {len:#x} bytes outside the table"));
        }
        starts.push((at, len));
        at += len;
    }
    for &(at, len) in &starts {
        let (n, offset) = (
            u32_at(at + 8).unwrap_or(0) as usize,
            u32_at(at + 12).unwrap_or(0) as usize,
        );
        if n > 0 && (offset < 16 || offset + 20 * n > len) {
            return Err(format!("node at {at:#x}: mappings outside it"));
        }
        for k in 0..n {
            let m = at + offset + 20 * k;
            let (input, ids, output, reference, flags) = (
                u64::from(u32_at(m).unwrap_or(0)),
                u64::from(u32_at(m + 4).unwrap_or(0)),
                u64::from(u32_at(m + 8).unwrap_or(0)),
                u32_at(m + 12).unwrap_or(0) as usize,
                u32_at(m + 16).unwrap_or(0),
            );
            if !starts.iter().any(|&(s, _)| s == reference) {
                return Err(format!("node at {at:#x}: a reference to {reference:#x}, not a node"));
            }
            if flags & 1 == 0 && (input + ids > u64::from(u32::MAX) || output + ids > u64::from(u32::MAX)) {
                return Err(format!("node at {at:#x}: a range that wraps"));
            }
        }
    }
    Ok(())
}

/// Runs case `index`, adding to `stats`.
///
/// # Errors
/// Why the case failed.
pub fn run_case(seed: u64, index: u64, stats: &mut IortStats) -> Result<(), String> {
    let (table, good) = build_case(seed, index);
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        let iort = Iort::parse(&table)?;
        let mut problems = Vec::new();
        if let Err(why) = well_formed(&table) {
            problems.push(format!("not well formed: {why}"));
        }
        for s in iort.smmus() {
            if s.node as usize >= table.len() {
                problems.push(format!("an SMMU node at {:#x}, past the table", s.node));
            }
            if let Some(Ok(map)) = iort.iommu_map(0, s.node) {
                for e in map.entries() {
                    if u64::from(e.rid_base) + u64::from(e.length) > 1 << 32 || e.length == 0 {
                        problems.push(format!("a map entry that wraps or is empty: {e:?}"));
                    }
                }
            }
        }
        for n in iort.named_components() {
            if n.smmu as usize >= table.len() || n.count == 0 || n.count > 1 << 32 {
                problems.push(format!("a named mapping out of bounds: {n:?}"));
            }
        }
        Ok::<_, IortError>(problems)
    }));
    stats.execs += 1;
    match outcome {
        Err(payload) => {
            let why = super::panic_message(&payload);
            Err(format!("IORT reader panicked: {why}"))
        }
        Ok(Ok(problems)) if problems.is_empty() => {
            stats.accepted += 1;
            Ok(())
        }
        Ok(Ok(problems)) => Err(format!("IORT accepted, then: {}", problems.join("; "))),
        Ok(Err(e)) if good => Err(format!("IORT refused the good table: {e}")),
        Ok(Err(e)) => {
            *stats.refused.entry(variant(&e)).or_default() += 1;
            Ok(())
        }
    }
}

/// Runs IORT cases from index 0 for `duration` (checking the clock every 64), or until `max_failures` failed.
pub fn run_iort(seed: u64, duration: Duration, max_failures: usize, stats: &mut Stats) {
    let start = Instant::now();
    run_until(seed, stats, |index, stats| {
        (index.is_multiple_of(64) && start.elapsed() >= duration) || stats.failures.len() >= max_failures
    });
    stats.iort_elapsed += start.elapsed();
}

/// Runs IORT cases `0..cases` of `seed` (a deterministic run, whatever the machine's speed), adding to `stats`.
pub fn run_iort_cases(seed: u64, cases: u64, stats: &mut Stats) {
    run_until(seed, stats, |index, _| index >= cases);
}

/// Runs cases from index 0 until `done` says so (asked before each case), each failure recorded with its input.
fn run_until(seed: u64, stats: &mut Stats, done: impl Fn(u64, &Stats) -> bool) {
    let mut index = 0u64;
    while !done(index, stats) {
        if let Err(what) = run_case(seed, index, &mut stats.iort) {
            stats.failures.push(Failure {
                seed,
                index,
                what: format!("iort case: {what}"),
                input: build_case(seed, index).0,
            });
        }
        index += 1;
    }
}
