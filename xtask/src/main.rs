//! Project automation: `cargo xtask qemu` (the demo), `cargo xtask test` (everything CI checks), `cargo xtask build`.
//!
//! Argument parsing is hand-written on purpose: four flags do not justify a dependency tree in the tool every
//! developer and CI build first.

use std::process::{Command, ExitCode};
use std::time::Duration;

use smmuv3_harness::{Board, Run, Stage, build_firmware, ensure_qemu};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  qemu [--board qemu-virt|sbsa-ref] [--stage 1|2|nested] [--scenarios a,b] [--timeout SECONDS] [-- EXTRA QEMU ARGS]
        build the firmware and boot it under QEMU (default: board qemu-virt, stage nested, the firmware's default
        scenarios); exits with the firmware's status (0 when every scenario passed). sbsa-ref's SMMU is always
        nested
  test  check the prerequisites (installing QEMU from Debian bookworm-backports when root), then run
        rustfmt --check, every host and QEMU test, and clippy for the host and aarch64-unknown-none
  build build the firmware of every board (release, aarch64-unknown-none)
  bench [--quick]
        run the page-table benchmarks (criterion, host, release) and print ours / aarch64-paging / memset with the
        ratios; --quick keeps the whole run to a few minutes";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("qemu") => qemu(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("build") => build(),
        Some("bench") => bench(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    };
    match result {
        Ok(code) => code,
        Err(why) => {
            eprintln!("xtask: {why}");
            ExitCode::FAILURE
        }
    }
}

fn value<'a>(args: &mut impl Iterator<Item = &'a String>, flag: &str) -> Result<&'a str, String> {
    args.next()
        .map(String::as_str)
        .ok_or_else(|| format!("{flag} needs a value"))
}

fn qemu(args: &[String]) -> Result<ExitCode, String> {
    let mut board = Board::QemuVirt;
    let mut stage = Stage::Nested;
    let mut scenarios: Vec<String> = Vec::new();
    let mut timeout = Duration::from_secs(300);
    let mut extra = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--board" => {
                let name = value(&mut it, arg)?;
                board = Board::from_name(name).ok_or_else(|| format!("unknown board {name:?}"))?;
            }
            "--stage" => {
                let name = value(&mut it, arg)?;
                stage = Stage::from_name(name).ok_or_else(|| format!("unknown stage {name:?} (1, 2 or nested)"))?;
            }
            "--scenarios" => {
                scenarios.extend(
                    value(&mut it, arg)?
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                );
            }
            "--timeout" => {
                let s = value(&mut it, arg)?;
                timeout = Duration::from_secs(s.parse().map_err(|_| format!("bad --timeout {s:?}"))?);
            }
            "--" => {
                extra.extend(it.by_ref().cloned());
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    board.check_stage(stage)?;
    ensure_qemu(true)?;
    eprintln!("xtask: building the {} firmware", board.name());
    let firmware = build_firmware(board)?;
    let names: Vec<&str> = scenarios.iter().map(String::as_str).collect();
    let mut run = Run::new(board, stage, &names);
    run.timeout = timeout;
    run.extra_args = extra;
    run.echo = true;
    eprintln!("xtask: {:?}", run.command(&firmware));
    let outcome = run.execute(&firmware)?;
    eprint!("{}", outcome.stderr);
    let events = outcome.smmu_events();
    let errors = outcome.command_errors();
    if !events.is_empty() || !errors.is_empty() {
        eprintln!(
            "xtask: the emulated SMMU recorded {} event(s), {} command error(s):",
            events.len(),
            errors.len()
        );
        // Identical lines once, with their count: a faulting DMA records one event per 4 bytes.
        let mut distinct: Vec<(&String, usize)> = Vec::new();
        for line in events.iter().chain(&errors) {
            match distinct.iter_mut().find(|(l, _)| *l == line) {
                Some((_, n)) => *n += 1,
                None => distinct.push((line, 1)),
            }
        }
        for (line, n) in distinct {
            eprintln!("  {n} x {line}");
        }
    }
    if outcome.timed_out {
        return Err(format!("QEMU did not exit within {timeout:?}"));
    }
    match outcome.exit_code {
        Some(0) => Ok(ExitCode::SUCCESS),
        Some(code) => {
            eprintln!("xtask: firmware exited with status {code}");
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1).max(1)))
        }
        None => Err("QEMU was killed by a signal".into()),
    }
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn step(name: &str, mut command: Command) -> Result<(), String> {
    eprintln!("xtask: == {name}: {command:?}");
    let status = command
        .current_dir(smmuv3_harness::workspace_root())
        .status()
        .map_err(|e| format!("{name}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{name} failed ({status})"))
    }
}

/// The crates that build only for `aarch64-unknown-none` (boot assembly, `no_main`): left out of host builds.
const FIRMWARE_EXCLUDES: [&str; 6] = [
    "--exclude",
    "smmuv3-firmware",
    "--exclude",
    "qemu-virt",
    "--exclude",
    "sbsa-ref",
];

fn test(args: &[String]) -> Result<ExitCode, String> {
    if let Some(a) = args.first() {
        return Err(format!("`test` takes no arguments (got {a:?})"));
    }
    let info = ensure_qemu(true)?;
    eprintln!(
        "xtask: QEMU {}.{}.{} with a nesting SMMUv3 (IDR0 {:#010x})",
        info.version.0, info.version.1, info.version.2, info.nested_idr0
    );
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);
    step("rustfmt", fmt)?;
    let mut tests = cargo();
    tests.args(["test", "--workspace"]).args(FIRMWARE_EXCLUDES);
    step("host and QEMU tests", tests)?;
    let mut host = cargo();
    host.args(["clippy", "--workspace", "--all-targets"])
        .args(FIRMWARE_EXCLUDES);
    host.args(["--", "-D", "warnings"]);
    step("clippy (host)", host)?;
    let mut target = cargo();
    target.args([
        "clippy",
        "--target",
        "aarch64-unknown-none",
        "-p",
        "smmuv3",
        "-p",
        "smmuv3-firmware",
    ]);
    target.args(["-p", "qemu-virt", "-p", "sbsa-ref", "--", "-D", "warnings"]);
    step("clippy (aarch64-unknown-none)", target)?;
    let mut doc = cargo();
    doc.args(["doc", "--no-deps", "-p", "smmuv3"])
        .env("RUSTDOCFLAGS", "-D warnings");
    step("rustdoc", doc)?;
    eprintln!("xtask: all checks passed");
    Ok(ExitCode::SUCCESS)
}

fn build() -> Result<ExitCode, String> {
    for board in Board::ALL {
        let path = build_firmware(board)?;
        println!("{}: {}", board.name(), path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The benchmark groups and the rows of the table `bench` prints.
const BENCH_GROUPS: [(&str, &str); 7] = [
    ("map_unmap_1g_4k", "map + unmap 1 GiB as 4 KiB pages"),
    ("map_unmap_1g_2m", "map + unmap 1 GiB as 2 MiB blocks"),
    ("map_one_4k", "map one 4 KiB page (random IOVA)"),
    ("unmap_one_4k", "unmap one 4 KiB page (random IOVA)"),
    ("map_unmap_same_4k", "map + unmap the same 4 KiB page"),
    ("random_4k", "map + unmap 4096 random 4 KiB pages"),
    ("iova_to_phys", "4096 random lookups in 1 GiB of pages"),
];

/// Reads criterion's mean point estimate (ns) of `group/function`.
fn criterion_mean(group: &str, function: &str) -> Option<f64> {
    // Criterion writes below the cargo target directory, which CARGO_TARGET_DIR may move.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| smmuv3_harness::workspace_root().join("target"));
    let path = target.join(format!("criterion/{group}/{function}/new/estimates.json"));
    let text = std::fs::read_to_string(path).ok()?;
    let mean = &text[text.find("\"mean\"")?..];
    let estimate = &mean[mean.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = estimate.find([',', '}'])?;
    estimate[..end].trim().parse().ok()
}

fn format_ns(ns: Option<f64>) -> String {
    match ns {
        None => "-".into(),
        Some(ns) if ns >= 1e6 => format!("{:.2} ms", ns / 1e6),
        Some(ns) if ns >= 1e3 => format!("{:.1} us", ns / 1e3),
        Some(ns) => format!("{ns:.0} ns"),
    }
}

fn bench(args: &[String]) -> Result<ExitCode, String> {
    let quick = match args {
        [] => false,
        [q] if q == "--quick" => true,
        _ => return Err(format!("`bench` takes only --quick (got {args:?})")),
    };
    let mut command = cargo();
    command.args(["bench", "-p", "smmuv3", "--bench", "pgtable", "--"]);
    if quick {
        command.args(["--warm-up-time", "1", "--measurement-time", "2", "--sample-size", "10"]);
    }
    step("page-table benchmarks", command)?;
    println!();
    println!(
        "| benchmark | ours | aarch64-paging (same pool) | aarch64-paging (global allocator) | memset of the PTE bytes | \
         speed-up vs peer | ours / memset |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (group, title) in BENCH_GROUPS {
        let ours = criterion_mean(group, "ours");
        let peer = criterion_mean(group, "peer_pool");
        let global = criterion_mean(group, "peer_global");
        let memset = criterion_mean(group, "memset");
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        println!(
            "| {title} | {} | {} | {} | {} | {} | {} |",
            format_ns(ours),
            format_ns(peer),
            format_ns(global),
            format_ns(memset),
            ratio(peer, ours),
            ratio(ours, memset)
        );
    }
    println!();
    println!(
        "(criterion mean per iteration{}; single-page rows: per operation, in a populated 1 GiB range, the other \
         phase untimed; aarch64-paging unmaps by writing invalid entries and keeps its tables, this driver frees \
         empty tables: at once on range unmaps, lazily (at the next trim) after single-page unmaps)",
        if quick {
            ", --quick: 1 s warm-up, 2 s measurement, 10 samples"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}
