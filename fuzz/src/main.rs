//! `smmuv3-fuzz [--seconds N] [--seed S] [--out DIR]`: fuzzes the handover decoder, then restore (two fifths of
//! the time each), then the ACPI IORT reader (the last fifth), for N seconds (default 180) and prints their throughput and what they found; failing inputs go to DIR
//! (default `target/fuzz-failures`). `--iort` runs the IORT reader alone for the N seconds. `smmuv3-fuzz --replay FILE` decodes one saved decoder input;
//! `smmuv3-fuzz --replay-restore SEED INDEX` runs one restore case again; `smmuv3-fuzz --sample FILE [--seed S]`
//! writes a valid sample region (for `cargo xtask handover-dump`). Exit status 1 when a case failed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use smmuv3::handover::format::sample::decode;
use smmuv3::handover::format::sample::{self, POOL, REGION, Rng};

/// The seed of a run when none is given.
const DEFAULT_SEED: u64 = 0x5eed_0017;

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(why) => {
            eprintln!("smmuv3-fuzz: {why}");
            ExitCode::FAILURE
        }
    }
}

fn parse(flag: &str, v: Option<String>) -> Result<u64, String> {
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
    .ok_or_else(|| format!("bad {flag} {v:?}"))
}

fn real_main() -> Result<ExitCode, String> {
    let mut seconds = 180u64;
    let mut seed = DEFAULT_SEED;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let mut out = target.join("fuzz-failures");
    let mut sample_file = None;
    let mut iort_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => seconds = parse("--seconds", args.next())?,
            "--seed" => seed = parse("--seed", args.next())?,
            "--out" => out = PathBuf::from(args.next().ok_or("--out needs a value")?),
            "--sample" => sample_file = Some(args.next().ok_or("--sample needs a file")?),
            "--iort" => iort_only = true,
            "--replay-restore" => {
                let seed = parse("--replay-restore", args.next())?;
                let index = parse("--replay-restore", args.next())?;
                let world = smmuv3_fuzz::restore::World::new();
                let mut stats = smmuv3_fuzz::restore::RestoreStats::default();
                return Ok(match smmuv3_fuzz::restore::run_case(&world, seed, index, &mut stats) {
                    Ok(()) => {
                        println!("restore case {index} (seed {seed:#x}) passes: {stats:?}");
                        ExitCode::SUCCESS
                    }
                    Err(why) => {
                        println!("restore case {index} (seed {seed:#x}) fails: {why}");
                        ExitCode::FAILURE
                    }
                });
            }
            "--replay" => {
                let file = args.next().ok_or("--replay needs a file")?;
                let bytes = std::fs::read(&file).map_err(|e| format!("{file}: {e}"))?;
                return Ok(match decode(&bytes, POOL) {
                    Ok(d) => {
                        println!("accepted: {d:#x?}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        println!("refused: {e}");
                        ExitCode::SUCCESS
                    }
                });
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if let Some(file) = sample_file {
        let instances = sample::instances(&mut Rng::new(seed), 4);
        let mut buf = vec![0u8; sample::BUFFER_SIZE];
        let n = sample::encode_owned(&instances, seed, REGION, POOL, &mut buf).map_err(|e| e.to_string())?;
        std::fs::write(&file, &buf[..n]).map_err(|e| format!("{file}: {e}"))?;
        println!("{file}: a valid {n}-byte region");
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "smmuv3-fuzz: seed {seed:#x}, {seconds} s{}",
        if iort_only { ", the IORT reader only" } else { "" }
    );
    let stats = if iort_only {
        let mut stats = smmuv3_fuzz::Stats::default();
        smmuv3_fuzz::iort::run_iort(seed, Duration::from_secs(seconds), 10, &mut stats);
        stats
    } else {
        smmuv3_fuzz::run(seed, Duration::from_secs(seconds), 10)
    };
    println!(
        "smmuv3-fuzz decode: {} cases in {:.1} s ({:.0} per second), {} accepted",
        stats.execs,
        stats.elapsed.as_secs_f64(),
        stats.rate(),
        stats.accepted
    );
    let mut refused: Vec<_> = stats.refused.iter().collect();
    refused.sort_by(|a, b| b.1.cmp(a.1));
    println!("refused by cause ({} distinct):", refused.len());
    for (name, n) in refused {
        println!("  {n:>10} {name}");
    }
    println!(
        "smmuv3-fuzz restore: {} cases in {:.1} s ({:.0} per second), {} accepted and judged safe",
        stats.restore.execs,
        stats.restore_elapsed.as_secs_f64(),
        stats.restore_rate(),
        stats.restore.accepted
    );
    let mut refused: Vec<_> = stats.restore.refused.iter().collect();
    refused.sort_by(|a, b| b.1.cmp(a.1));
    println!("restore refused by cause ({} distinct):", refused.len());
    for (name, n) in refused {
        println!("  {n:>10} {name}");
    }
    println!(
        "smmuv3-fuzz iort: {} cases in {:.1} s ({:.0} per second), {} accepted",
        stats.iort.execs,
        stats.iort_elapsed.as_secs_f64(),
        stats.iort_rate(),
        stats.iort.accepted
    );
    let mut refused: Vec<_> = stats.iort.refused.iter().collect();
    refused.sort_by(|a, b| b.1.cmp(a.1));
    println!("iort refused by cause ({} distinct):", refused.len());
    for (name, n) in refused {
        println!("  {n:>10} {name}");
    }
    println!("smmuv3-fuzz: {} case(s) failed", stats.failures.len());
    if stats.failures.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    for f in &stats.failures {
        let target = if f.what.starts_with("restore case") {
            "restore"
        } else if f.what.starts_with("iort case") {
            "iort"
        } else {
            "decode"
        };
        let path = out.join(format!("{target}-case-{:x}-{}.bin", f.seed, f.index));
        std::fs::write(&path, &f.input).map_err(|e| format!("{}: {e}", path.display()))?;
        println!(
            "FAILED case {} (seed {:#x}): {} -> {}",
            f.index,
            f.seed,
            f.what,
            path.display()
        );
    }
    Ok(ExitCode::FAILURE)
}
