//! A stable-Rust fuzzer for live update, two targets, half the run each:
//!
//! - **decode**: the handover region decoder on valid regions from the format's sample generator, mutated (bit
//!   flips, interesting values in whole fields, copies between records, splices, count and length edits with and
//!   without the CRC fixed up, truncation, records dropped or duplicated), plus random bytes with and without a
//!   valid magic. A case fails when `decode` panics, when it refuses an unmutated valid region, or when it accepts
//!   a region whose tables, CD tables or extents leave the pool (or overlap), as [`sample::check_accepted`] judges
//!   independently.
//! - **restore** ([`restore`]): a whole `restore_handover` against a fake SMMU, over a region a real first image
//!   wrote, with the preserved memory (page-table descriptors, whole tables, CD words) and the records (CRC fixed
//!   or not) mutated. A case fails on a panic, an unmutated region refused, or a restore accepted whose installed
//!   STEs lead a walk outside its domain's extents or outside the memory declared DMA-able, as an independent
//!   walker judges.
//!
//! Every case is fixed by `(seed, index)`, so a failure replays exactly.

pub mod iort;
pub mod restore;

use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use smmuv3::handover::format::HandoverError;
use smmuv3::handover::format::sample::decode;
use smmuv3::handover::format::sample::{self, POOL, REGION, Rng};
use smmuv3::handover::format::{MAGIC, VERSION};

/// A failing case: how to replay it and the bytes that failed.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The run's seed.
    pub seed: u64,
    /// The case's index in the run.
    pub index: u64,
    /// What went wrong.
    pub what: String,
    /// The region bytes given to `decode`.
    pub input: Vec<u8>,
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Decoder cases run.
    pub execs: u64,
    /// Regions `decode` accepted (mutated or not).
    pub accepted: u64,
    /// Refusals by error variant.
    pub refused: BTreeMap<&'static str, u64>,
    /// Failing cases (at most the run's limit).
    pub failures: Vec<Failure>,
    /// Time spent on decoder cases.
    pub elapsed: Duration,
    /// The restore target's cases.
    pub restore: restore::RestoreStats,
    /// Time spent on restore cases.
    pub restore_elapsed: Duration,
    /// The IORT reader's cases.
    pub iort: iort::IortStats,
    /// Time spent on IORT cases.
    pub iort_elapsed: Duration,
}

impl Stats {
    /// Decoder cases per second.
    pub fn rate(&self) -> f64 {
        self.execs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Restore cases per second.
    pub fn restore_rate(&self) -> f64 {
        self.restore.execs as f64 / self.restore_elapsed.as_secs_f64().max(1e-9)
    }

    /// IORT cases per second.
    pub fn iort_rate(&self) -> f64 {
        self.iort.execs as f64 / self.iort_elapsed.as_secs_f64().max(1e-9)
    }
}

/// The name of an error's variant, for the statistics.
pub fn variant(e: &HandoverError) -> &'static str {
    use HandoverError as E;
    match e {
        E::Truncated { .. } => "Truncated",
        E::BadMagic { .. } => "BadMagic",
        E::UnknownVersion { .. } => "UnknownVersion",
        E::LengthMismatch { .. } => "LengthMismatch",
        E::BadCrc { .. } => "BadCrc",
        E::ScratchTooSmall { .. } => "ScratchTooSmall",
        E::ReservedNonZero { .. } => "ReservedNonZero",
        E::TooManyInstances { .. } => "TooManyInstances",
        E::TooManyRecords { .. } => "TooManyRecords",
        E::RecordCountMismatch { .. } => "RecordCountMismatch",
        E::DuplicateInstance { .. } => "DuplicateInstance",
        E::BadStreamTable { .. } => "BadStreamTable",
        E::BadRegion { .. } => "BadRegion",
        E::PoolMismatch { .. } => "PoolMismatch",
        E::BadKind { .. } => "BadKind",
        E::BadFlags { .. } => "BadFlags",
        E::TooManyEntries { .. } => "TooManyEntries",
        E::BadTableShape { .. } => "BadTableShape",
        E::BadValue { .. } => "BadValue",
        E::Misaligned { .. } => "Misaligned",
        E::OutsidePool { .. } => "OutsidePool",
        E::OutsideOwnExtents { .. } => "OutsideOwnExtents",
        E::Overlap { .. } => "Overlap",
        E::OverlapsRegion { .. } => "OverlapsRegion",
        E::DuplicateToken(_) => "DuplicateToken",
        E::MissingParent { .. } => "MissingParent",
        E::ParentNotStage2 { .. } => "ParentNotStage2",
        E::ParentVmidMismatch { .. } => "ParentVmidMismatch",
        E::DuplicateStream { .. } => "DuplicateStream",
        E::StreamOutOfRange { .. } => "StreamOutOfRange",
        E::DuplicateAsid { .. } => "DuplicateAsid",
        E::DuplicateVmid { .. } => "DuplicateVmid",
        E::IdentityMismatch { .. } => "IdentityMismatch",
        // A variant added later (the enum is non-exhaustive): counted under one name until listed here.
        _ => "Other",
    }
}

/// Builds case `index` of a run with `seed` into `buf` and returns its length and whether it is an unmutated valid
/// region (which `decode` must accept).
pub fn build_case(seed: u64, index: u64, buf: &mut [u8]) -> (usize, bool) {
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0xd134_2543_de82_ef95));
    match rng.below(16) {
        0 => {
            // Random bytes.
            let len = rng.below(4096).min(buf.len() as u64) as usize;
            buf[..len].iter_mut().for_each(|b| *b = rng.next_u64() as u8);
            (len, false)
        }
        1 | 2 => {
            // Random bytes behind a valid magic and version, sealed or not.
            let len = (12 + rng.below(4096) as usize).min(buf.len());
            buf[..len].iter_mut().for_each(|b| *b = rng.next_u64() as u8);
            buf[..8].copy_from_slice(&MAGIC);
            buf[8..12].copy_from_slice(&VERSION.to_le_bytes());
            if rng.chance(1, 2) {
                sample::reseal(&mut buf[..len]);
            }
            (len, false)
        }
        _ => {
            let max = [1, 4, 8, 32][rng.below(4) as usize];
            let instances = sample::instances(&mut rng, max);
            let Ok(len) = sample::encode_owned(&instances, rng.next_u64(), REGION, POOL, buf) else {
                return (0, false);
            };
            if rng.chance(1, 16) {
                return (len, true);
            }
            // A donor for splices: this region, or another sample.
            let donor: Vec<u8> = if rng.chance(1, 2) {
                buf[..len].to_vec()
            } else {
                let mut other = vec![0; sample::BUFFER_SIZE];
                let others = sample::instances(&mut rng, 8);
                match sample::encode_owned(&others, 1, REGION, POOL, &mut other) {
                    Ok(n) => other[..n].to_vec(),
                    Err(_) => Vec::new(),
                }
            };
            let mut len = len;
            for _ in 0..1 + rng.below(3) {
                len = sample::mutate(buf, len, &donor, &mut rng);
            }
            (len, false)
        }
    }
}

/// What a caught panic said (its `&str` or `String` payload; empty for another type).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// Runs one case; `Err` says why it failed.
pub fn run_case(seed: u64, index: u64, buf: &mut [u8], stats: &mut Stats) -> Result<(), String> {
    let (len, valid) = build_case(seed, index, buf);
    let input = &buf[..len];
    let result = panic::catch_unwind(AssertUnwindSafe(|| decode(input, POOL)));
    match result {
        Err(payload) => {
            let why = panic_message(&payload);
            Err(format!("decode panicked: {why}"))
        }
        Ok(Ok(decoded)) => {
            stats.accepted += 1;
            sample::check_accepted(&decoded, POOL)
                .map_err(|(what, token)| format!("accepted a bad region: {what} (record {token:#x})"))
        }
        Ok(Err(e)) if valid => Err(format!("refused a valid region: {e}")),
        Ok(Err(e)) => {
            *stats.refused.entry(variant(&e)).or_default() += 1;
            Ok(())
        }
    }
}

/// Runs decoder cases from index 0 for two fifths of `duration`, then restore cases from index 0 for two fifths
/// (checking the clock every 64 and every 8 cases), then IORT cases for the last fifth, or until `max_failures`
/// cases failed.
pub fn run(seed: u64, duration: Duration, max_failures: usize) -> Stats {
    let mut stats = run_decode(seed, duration * 2 / 5, max_failures);
    if stats.failures.len() < max_failures {
        run_restore(seed, duration * 2 / 5, max_failures - stats.failures.len(), &mut stats);
    }
    if stats.failures.len() < max_failures {
        iort::run_iort(seed, duration / 5, max_failures, &mut stats);
    }
    stats
}

/// Runs restore cases from index 0 for `duration`, adding to `stats`.
pub fn run_restore(seed: u64, duration: Duration, max_failures: usize, stats: &mut Stats) {
    run_restore_until(seed, max_failures, stats, |index, start| {
        index.is_multiple_of(8) && start.elapsed() >= duration
    });
}

/// Runs restore cases `0..cases` of `seed` (a deterministic run, whatever the machine's speed), as
/// [`run_restore`] does otherwise.
pub fn run_restore_cases(seed: u64, cases: u64, max_failures: usize, stats: &mut Stats) {
    run_restore_until(seed, max_failures, stats, |index, _| index >= cases);
}

fn run_restore_until(seed: u64, max_failures: usize, stats: &mut Stats, done: impl Fn(u64, Instant) -> bool) {
    let world = restore::World::new();
    let start = Instant::now();
    let hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let mut failed = 0;
    let mut index = 0u64;
    loop {
        if done(index, start) {
            break;
        }
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            restore::run_case(&world, seed, index, &mut stats.restore)
        }))
        .unwrap_or_else(|payload| {
            let why = panic_message(&payload);
            Err(format!("restore panicked: {why}"))
        });
        if let Err(what) = outcome {
            stats.failures.push(Failure {
                seed,
                index,
                what: format!("restore case: {what}"),
                input: world.mutated_region(seed, index),
            });
            failed += 1;
            if failed >= max_failures {
                break;
            }
        }
        index += 1;
    }
    panic::set_hook(hook);
    stats.restore_elapsed = start.elapsed();
}

/// Runs decoder cases from index 0 until `duration` has passed (checking the clock every 64 cases) or
/// `max_failures` cases failed.
pub fn run_decode(seed: u64, duration: Duration, max_failures: usize) -> Stats {
    run_decode_while(seed, max_failures, |index, start| {
        !(index.is_multiple_of(64) && start.elapsed() >= duration)
    })
}

/// Runs decoder cases `0..cases` (or until `max_failures` failed): the same cases however busy the machine is.
pub fn run_decode_cases(seed: u64, cases: u64, max_failures: usize) -> Stats {
    run_decode_while(seed, max_failures, |index, _| index < cases)
}

fn run_decode_while(seed: u64, max_failures: usize, go_on: impl Fn(u64, Instant) -> bool) -> Stats {
    let mut stats = Stats::default();
    let mut buf = vec![0u8; sample::BUFFER_SIZE];
    let start = Instant::now();
    let hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let mut index = 0u64;
    loop {
        if !go_on(index, start) {
            break;
        }
        // A panic in the case generator itself is a failure too (the hook above is silent), never a silent stop.
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| run_case(seed, index, &mut buf, &mut stats)))
            .unwrap_or_else(|_| Err("the case generator panicked".into()));
        if let Err(what) = outcome {
            let (len, _) = build_case(seed, index, &mut buf);
            stats.failures.push(Failure {
                seed,
                index,
                what,
                input: buf[..len].to_vec(),
            });
            if stats.failures.len() >= max_failures {
                index += 1;
                break;
            }
        }
        index += 1;
    }
    panic::set_hook(hook);
    stats.execs = index;
    stats.elapsed = start.elapsed();
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decoder cases the smoke test runs.
    const DECODE_CASES: u64 = 10_000;

    #[test]
    fn a_short_run_fails_nothing_and_reaches_the_deep_checks() {
        // A fixed number of cases (seed 1 reaches every check named below within them), so the test reaches
        // the same checks however busy the machine is.
        let stats = run_decode_cases(1, DECODE_CASES, 1);
        assert_eq!(stats.execs, DECODE_CASES);
        assert!(stats.failures.is_empty(), "{:?}", stats.failures[0]);
        assert!(stats.accepted > 0);
        for deep in [
            "BadCrc",
            "ReservedNonZero",
            "OutsidePool",
            "Overlap",
            "DuplicateToken",
            "DuplicateStream",
            "BadTableShape",
        ] {
            assert!(
                stats.refused.contains_key(deep),
                "{deep} never reached: {:?}",
                stats.refused
            );
        }
    }

    /// IORT cases the smoke test runs.
    const IORT_CASES: u64 = 20_000;

    #[test]
    fn a_short_iort_run_fails_nothing_and_reaches_every_check() {
        let mut stats = Stats::default();
        iort::run_iort_cases(1, IORT_CASES, &mut stats);
        assert!(stats.failures.is_empty(), "{:?}", stats.failures[0]);
        assert_eq!(stats.iort.execs, IORT_CASES);
        assert!(stats.iort.accepted > 0);
        for check in [
            "Signature",
            "Length",
            "Checksum",
            "Node",
            "Mappings",
            "Reference",
            "Overflow",
        ] {
            assert!(
                stats.iort.refused.contains_key(check),
                "{check} never reached: {:?}",
                stats.iort.refused
            );
        }
    }

    #[test]
    fn cases_replay_exactly() {
        let (mut a, mut b) = (vec![0u8; sample::BUFFER_SIZE], vec![0u8; sample::BUFFER_SIZE]);
        for index in 0..50 {
            let (la, _) = build_case(9, index, &mut a);
            let (lb, _) = build_case(9, index, &mut b);
            assert_eq!(a[..la], b[..lb]);
        }
    }

    /// Restore cases the smoke test runs: seed 3 reaches every check it names by case 145.
    const RESTORE_CASES: u64 = 400;

    #[test]
    fn a_short_restore_run_fails_nothing_and_reaches_the_verification() {
        let mut stats = Stats::default();
        // A fixed number of cases, so the test reaches the same checks however busy the machine is.
        run_restore_cases(3, RESTORE_CASES, 1, &mut stats);
        assert!(stats.failures.is_empty(), "{:?}", stats.failures[0].what);
        assert!(stats.restore.accepted > 0, "{:?}", stats.restore);
        for deep in [
            "Verify:TableOutsideExtent",
            "Verify:CountMismatch",
            "Verify:CdMismatch",
            "Region:BadCrc",
        ] {
            assert!(
                stats.restore.refused.contains_key(deep),
                "{deep} never reached: {:?}",
                stats.restore.refused
            );
        }
    }

    #[test]
    fn restore_cases_replay_exactly() {
        let world = restore::World::new();
        assert_eq!(world.mutated_region(5, 17), world.mutated_region(5, 17));
        assert_ne!(world.mutated_region(5, 17), world.mutated_region(5, 18));
    }
}
