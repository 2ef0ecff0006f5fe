//! Project automation: `cargo xtask qemu` (the demo), `cargo xtask test` (everything CI checks), `cargo xtask build`,
//! `cargo xtask fuzz` (the handover decoder's fuzzer), `cargo xtask handover-dump FILE`.
//!
//! Argument parsing is hand-written on purpose: four flags do not justify a dependency tree in the tool every
//! developer and CI build first.

mod dump;
mod image;

use std::process::{Command, ExitCode};
use std::time::Duration;

use smmuv3_harness::{
    Board, GERROR_TRACE_EVENT, Outcome, Run, Stage, VirtioDisk, build_firmware, build_firmware_package, ensure_qemu,
};

/// Each command and its usage (what `cargo xtask <command> --help` prints).
const COMMANDS: [(&str, &str); 6] = [
    (
        "qemu",
        "\
  qemu [--board qemu-virt|sbsa-ref] [--stage 1|2|nested] [--smp N] [--scenarios a,b] [--timeout SECONDS]
       [--description dt|acpi] [--dump-handover FILE] [-- EXTRA QEMU ARGS]
        build the firmware and boot it under QEMU (default: board qemu-virt, stage nested, 1 CPU, the firmware's
        default scenarios); --smp N gives the machine N CPUs (1-8), which the scenarios that use every CPU start
        through PSCI CPU_ON (smp-hello); exits 0 when every scenario asked printed SCENARIO … PASS and the firmware's RESULT line says
        PASS, else with the firmware's status (or 1). sbsa-ref's SMMU is always nested. A `-D FILE` among the
        extra arguments keeps QEMU's trace (with the SMMU events the summary counts) in FILE. The machine gets
        the devices the scenarios need (printed before the command line): edu on the root bus, a second edu behind
        a root port for isolation and smp-dma, a virtio-blk disk for virtio-dma (its image checked after the run),
        and the next image for the running hand-offs. An empty --scenarios list is refused.
        --description acpi (virt only) takes the SMMU and the requester-ID map from the ACPI IORT alone (fw_cfg
        opt/smmuv3/description), not from the device tree. --dump-handover FILE
        saves the handover region's records to FILE (on the host, through semihosting) when a scenario hands off
        (a warm reset or a jump into the next image), for `cargo xtask handover-dump FILE`; the run fails when no
        hand-off saved it",
    ),
    (
        "test",
        "\
  test  check the prerequisites (installing QEMU from Debian bookworm-backports when root), then run
        rustfmt --check, every host and QEMU test (the guide's doctests among them), the examples, the loom
        models, clippy for the host and
        aarch64-unknown-none, the hardware boards' firmware (`build --board imx95`), rustdoc, `cargo publish --dry-run -p smmuv3`, and a check of the library with its
        minimum supported Rust version (rust-version in Cargo.toml, installed through rustup when missing)",
    ),
    (
        "build",
        "\
  build [--board qemu-virt|sbsa-ref|imx95]
        build the firmware of every board, or of one (release, aarch64-unknown-none) and print where it is; a
        hardware board's (imx95) also as a raw arm64 Image next to its ELF (`imx95.bin`), which U-Boot's booti
        loads (see boards/README.md)",
    ),
    (
        "bench",
        "\
  bench [--quick]
        run the page-table benchmarks (criterion, host, release) and print ours / aarch64-paging / memset with the
        ratios, then the domain-table and live-update benchmarks (preserve, prepare_handover, a verified and a
        trusted restore against what each scales with, and a plain read of the same table bytes), then the
        every-CPU table (map + unmap by 1 and 2 threads through one shared Iommu, the command queue with 1 and 2
        submitters, 4 and 8 as figures); --quick keeps the whole run to a few minutes",
    ),
    (
        "fuzz",
        "\
  fuzz [--seconds N] [--seed S]
        fuzz live update (stable Rust, release build) for N seconds (default 180), half on the handover region
        decoder (mutated valid regions and random bytes), half on whole restores of a real first image's region
        with its records and preserved tables and CDs mutated; prints cases per second and the refusals by
        cause, saves failing inputs under target/fuzz-failures and exits 1 when a case failed (a panic, a valid
        region refused, a region accepted with memory outside its pool, or a restore accepted whose installed
        STEs lead a walk outside its domain's extents or the memory declared DMA-able)",
    ),
    (
        "handover-dump",
        "\
  handover-dump FILE
        decode a raw handover region dump with the pool its own header names, print the header, each SMMU
        instance's identity and each record, and what validation concluded (exit 1 when it refused the region)",
    ),
];

/// The whole usage: every command's.
fn usage() -> String {
    let mut text = String::from("usage: cargo xtask <command> [--help]\n\ncommands:\n");
    for (_, block) in COMMANDS {
        text.push_str("  ");
        text.push_str(block);
        text.push('\n');
    }
    text
}

/// Whether `args` (a command's, up to a `--` that starts QEMU's own) ask for help.
fn asks_help(args: &[String]) -> bool {
    args.iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "-h" || a == "--help")
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some((_, block)) = args
        .first()
        .and_then(|verb| COMMANDS.iter().find(|(name, _)| name == verb))
        && asks_help(&args[1..])
    {
        println!("usage: cargo xtask {block}");
        return ExitCode::SUCCESS;
    }
    let result = match args.first().map(String::as_str) {
        Some("qemu") => qemu(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("build") => build(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("fuzz") => fuzz(&args[1..]),
        Some("handover-dump") => handover_dump(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{}", usage());
            Ok(ExitCode::SUCCESS)
        }
        other => Err(format!("unknown command {other:?}\n{}", usage())),
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
    let mut smp = 1;
    let mut extra = Vec::new();
    let mut dump: Option<std::path::PathBuf> = None;
    let mut acpi = false;
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
            "--scenarios" => scenarios.extend(scenario_list(value(&mut it, arg)?)?),
            "--dump-handover" => dump = Some(dump_path(value(&mut it, arg)?)?),
            "--description" => {
                acpi = match value(&mut it, arg)? {
                    "acpi" => true,
                    "dt" => false,
                    other => return Err(format!("unknown description {other:?} (dt or acpi)")),
                }
            }
            "--timeout" => {
                let s = value(&mut it, arg)?;
                timeout = Duration::from_secs(s.parse().map_err(|_| format!("bad --timeout {s:?}"))?);
            }
            "--smp" => {
                let s = value(&mut it, arg)?;
                smp = parse_smp(s)?;
            }
            "--" => {
                extra.extend(it.by_ref().cloned());
            }
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    board.check_stage(stage)?;
    if acpi && board != Board::QemuVirt {
        return Err("--description acpi needs qemu-virt (its ACPI tables come through fw_cfg)".into());
    }
    ensure_qemu(true)?;
    ensure_firmware_target()?;
    eprintln!("xtask: building the {} firmware", board.name());
    let firmware = build_firmware(board)?;
    let names: Vec<&str> = scenarios.iter().map(String::as_str).collect();
    let mut run = Run::new(board, stage, &names);
    run.timeout = timeout;
    run.smp = smp;
    run.extra_args = extra;
    run.echo = true;
    run.trace_events.push(GERROR_TRACE_EVENT.into());
    let disk = names
        .contains(&"virtio-dma")
        .then(|| VirtioDisk::create(&format!("xtask-{}", board.name())));
    run.virtio_disk = disk.as_ref().map(|d| d.path.clone());
    if acpi {
        run.settings.push(("description".into(), "acpi".into()));
    }
    if let Some(path) = &dump {
        // A file left by an earlier run must not pass for this one's.
        let _ = std::fs::remove_file(path);
        run.settings.push(("dump-handover".into(), path.display().to_string()));
    }
    eprintln!("xtask: devices: {}", devices_of(&run, &firmware));
    let (command, trace_file) = run.traced_command(&firmware)?;
    eprintln!("xtask: {command:?}");
    let outcome = run.execute(&firmware)?;
    eprint!("{}", outcome.stderr);
    for line in trace_summary(&outcome) {
        eprintln!("{line}");
    }
    if let Some(file) = &trace_file {
        let whose = if run.user_trace_file().is_some() {
            "your -D file"
        } else {
            "the harness's file"
        };
        eprintln!("xtask: QEMU's trace went to {} ({whose})", file.display());
    }
    if outcome.timed_out {
        return Err(format!("QEMU did not exit within {timeout:?}"));
    }
    if let Some(disk) = &disk {
        if !disk.holds_written_pattern() {
            return Err(format!(
                "the virtio disk image {} lacks the pattern virtio-dma writes (sectors {}..{})",
                disk.path.display(),
                VirtioDisk::WRITE_SECTOR,
                VirtioDisk::WRITE_SECTOR + VirtioDisk::WRITE_COUNT
            ));
        }
        eprintln!("xtask: the virtio disk image holds the sectors virtio-dma wrote");
    }
    if let Some(path) = &dump {
        match std::fs::metadata(path) {
            Ok(m) => eprintln!(
                "xtask: the handover region's records ({} bytes) were saved to {}: `cargo xtask handover-dump {}` reads them",
                m.len(),
                path.display(),
                path.display()
            ),
            Err(_) => {
                return Err(format!(
                    "no hand-off saved the handover region to {} (the live-update scenarios, lu-*, hand off)",
                    path.display()
                ));
            }
        }
    }
    match outcome.verdict() {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(why) => {
            eprintln!("xtask: the run failed: {why}");
            let code = outcome.exit_code.unwrap_or(1);
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1).max(1)))
        }
    }
}

/// The names of a `--scenarios` list (separated by commas): at least one.
fn scenario_list(text: &str) -> Result<Vec<String>, String> {
    let names: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if names.is_empty() {
        return Err(format!(
            "--scenarios {text:?} names no scenario (leave --scenarios out for the firmware's default list)"
        ));
    }
    Ok(names)
}

/// `--dump-handover`'s file as an absolute path (QEMU's semihosting opens it relative to QEMU's directory), in a
/// directory that exists, with no comma or white space (QEMU's option syntax and the semihosting command line
/// would cut it).
fn dump_path(text: &str) -> Result<std::path::PathBuf, String> {
    if text.is_empty() || text.contains(',') || text.chars().any(char::is_whitespace) {
        return Err(format!(
            "--dump-handover {text:?}: give a file name without commas or white space"
        ));
    }
    let path = std::path::Path::new(text);
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| e.to_string())?.join(path)
    };
    match path.parent() {
        Some(dir) if dir.is_dir() => Ok(path),
        _ => Err(format!("--dump-handover {text:?}: its directory does not exist")),
    }
}

/// The devices the run gives the machine beside the board's own, in words.
fn devices_of(run: &Run, firmware: &std::path::Path) -> String {
    let mut devices: Vec<String> = run.edus.iter().map(|e| format!("edu ({e:?})")).collect();
    if let Some(disk) = &run.virtio_disk {
        devices.push(format!("virtio-blk disk {}", disk.display()));
    }
    if let Some(next) = run.next_image_beside(firmware) {
        devices.push(format!("the next image {}", next.display()));
    }
    devices.join(", ")
}

/// The most CPUs `--smp` gives a machine: the firmware drives up to 8.
const MAX_SMP: usize = 8;

/// Parses a `--smp` value: 1 to [`MAX_SMP`].
fn parse_smp(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=MAX_SMP).contains(&n) => Ok(n),
        _ => Err(format!("bad --smp {text:?} (1 to {MAX_SMP} CPUs)")),
    }
}

/// The summary of what the emulated SMMU saw: events, command errors and global errors raised, identical lines
/// once with their count (a faulting DMA records one event per 4 bytes). Empty when it saw none.
fn trace_summary(outcome: &Outcome) -> Vec<String> {
    let events = outcome.smmu_events();
    let errors = outcome.command_errors();
    let gerrors: Vec<String> = outcome
        .gerror_writes()
        .into_iter()
        .map(|l| format!("{GERROR_TRACE_EVENT} {l}"))
        .collect();
    if events.is_empty() && errors.is_empty() && gerrors.is_empty() {
        return Vec::new();
    }
    let mut lines = vec![format!(
        "xtask: the emulated SMMU recorded {} event(s), {} command error(s), {} GERROR write(s):",
        events.len(),
        errors.len(),
        gerrors.len()
    )];
    let mut distinct: Vec<(&String, usize)> = Vec::new();
    for line in events.iter().chain(&errors).chain(&gerrors) {
        match distinct.iter_mut().find(|(l, _)| *l == line) {
            Some((_, n)) => *n += 1,
            None => distinct.push((line, 1)),
        }
    }
    lines.extend(distinct.into_iter().map(|(line, n)| format!("  {n} x {line}")));
    lines
}

/// The target the firmware is built for.
const FIRMWARE_TARGET: &str = "aarch64-unknown-none";

/// What to do about the firmware's target before a build.
#[derive(Clone, Debug, PartialEq, Eq)]
enum TargetStep {
    /// The toolchain has it.
    Present,
    /// rustup can add it: `rustup target add aarch64-unknown-none`.
    Add,
    /// Missing and no rustup to add it: the message says what to run.
    Missing(String),
}

/// Decides [`TargetStep`] from `rustup target list --installed` (`None` when rustup is absent) and whether the
/// toolchain's sysroot has the target's library directory (how a toolchain without rustup shows it).
fn target_step(rustup_installed: Option<&str>, in_sysroot: bool) -> TargetStep {
    match rustup_installed {
        Some(list) if list.lines().any(|l| l.trim() == FIRMWARE_TARGET) => TargetStep::Present,
        Some(_) => TargetStep::Add,
        None if in_sysroot => TargetStep::Present,
        None => TargetStep::Missing(format!(
            "the Rust toolchain lacks the {FIRMWARE_TARGET} target and rustup is not available to add it: run \
             `rustup target add {FIRMWARE_TARGET}` (with rustup) or install that target's standard library for \
             this toolchain"
        )),
    }
}

/// Adds the firmware's target to the project's toolchain (`rust-toolchain.toml`) when it lacks it, as `qemu` and
/// `test` install QEMU: rustup, when it exists, already picked that toolchain for this process.
fn ensure_firmware_target() -> Result<(), String> {
    let root = smmuv3_harness::workspace_root();
    let rustup = Command::new("rustup")
        .current_dir(&root)
        .args(["target", "list", "--installed"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let in_sysroot = Command::new("rustc")
        .current_dir(&root)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| {
            std::path::Path::new(String::from_utf8_lossy(&o.stdout).trim())
                .join("lib/rustlib")
                .join(FIRMWARE_TARGET)
                .join("lib")
                .is_dir()
        })
        .unwrap_or(false);
    match target_step(rustup.as_deref(), in_sysroot) {
        TargetStep::Present => Ok(()),
        TargetStep::Add => {
            eprintln!("xtask: the toolchain lacks {FIRMWARE_TARGET}; adding it through rustup");
            let mut add = Command::new("rustup");
            add.args(["target", "add", FIRMWARE_TARGET]);
            step("rustup target add", add)
        }
        TargetStep::Missing(why) => Err(why),
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
const FIRMWARE_EXCLUDES: [&str; 8] = [
    "--exclude",
    "smmuv3-firmware",
    "--exclude",
    "qemu-virt",
    "--exclude",
    "sbsa-ref",
    "--exclude",
    "imx95",
];

fn test(args: &[String]) -> Result<ExitCode, String> {
    if let Some(a) = args.first() {
        return Err(format!("`test` takes no arguments (got {a:?})"));
    }
    let info = ensure_qemu(true)?;
    ensure_firmware_target()?;
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
    for example in ["nested_guest", "live_update"] {
        let mut run = cargo();
        run.args(["run", "-q", "-p", "smmuv3", "--example", example]);
        step(&format!("example {example} (against the fake SMMU)"), run)?;
    }
    step(
        "loom models (command queue, page tables, ID allocators, domain slots)",
        loom_command(),
    )?;
    step("handover fuzzer smoke run", fuzz_command(FUZZ_SMOKE_SECONDS, None))?;
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
    target.args([
        "-p",
        "qemu-virt",
        "-p",
        "sbsa-ref",
        "-p",
        "imx95",
        "--",
        "-D",
        "warnings",
    ]);
    step("clippy (aarch64-unknown-none)", target)?;
    for board in HARDWARE_BOARDS {
        println!("xtask: cargo xtask build --board {board}");
        build(&["--board".into(), board.into()])?;
    }
    let mut doc = cargo();
    doc.args(["doc", "--no-deps", "-p", "smmuv3", "--features", "testing"])
        .env("RUSTDOCFLAGS", "-D warnings");
    step("rustdoc", doc)?;
    let mut publish = cargo();
    // `--allow-dirty`: a working tree with changes not committed yet checks the package too (a clean clone is
    // clean anyway).
    publish.args(["publish", "--dry-run", "-p", "smmuv3", "--allow-dirty"]);
    step("the package (cargo publish --dry-run)", publish)?;
    msrv_check()?;
    eprintln!("xtask: all checks passed");
    Ok(ExitCode::SUCCESS)
}

/// The `rust-version` the crate's manifest declares.
fn declared_msrv(manifest: &str) -> Option<&str> {
    manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("rust-version"))
        .and_then(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"'))
        .filter(|v| !v.is_empty())
}

/// Checks the library with the Rust version its manifest declares (`rust-version`), for the host and for
/// aarch64-unknown-none: the toolchain through rustup (installed when missing, as `.ci/run` does on a fresh
/// machine), in a target directory of its own.
fn msrv_check() -> Result<(), String> {
    let root = smmuv3_harness::workspace_root();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).map_err(|e| e.to_string())?;
    let msrv = declared_msrv(&manifest).ok_or("Cargo.toml declares no rust-version")?;
    let installed = Command::new("rustup")
        .args(["run", msrv, "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        let mut install = Command::new("rustup");
        install.args([
            "toolchain",
            "install",
            msrv,
            "--profile",
            "minimal",
            "--target",
            FIRMWARE_TARGET,
        ]);
        step(&format!("install the MSRV toolchain {msrv}"), install)?;
    }
    for target in [None, Some(FIRMWARE_TARGET)] {
        let mut check = Command::new("rustup");
        check.args(["run", msrv, "cargo", "check", "--locked", "-p", "smmuv3", "--lib"]);
        check.env("CARGO_TARGET_DIR", root.join("target/msrv"));
        // The pinned toolchain's own variables would point the older cargo at the newer rustc.
        check
            .env_remove("RUSTC")
            .env_remove("CARGO")
            .env_remove("RUSTUP_TOOLCHAIN");
        if let Some(t) = target {
            check.args(["--target", t]);
        }
        step(&format!("MSRV {msrv} ({})", target.unwrap_or("host")), check)?;
    }
    Ok(())
}

/// Seconds of preemption-bounded search per loom model in `test` (after its exhaustive search without preemption).
const LOOM_MODEL_SECONDS: u64 = 3;

/// The loom models (`src/queue/cmdq/loom_models.rs`, `src/pgtable/loom_models.rs`, `src/ids/loom_models.rs`, `src/domain/loom_models.rs`): the library's tests built with `--cfg loom`, in their own target
/// directory so that the normal build is not rebuilt, with the preemption bound and search time bounded.
fn loom_command() -> Command {
    let mut command = cargo();
    command.args(["test", "--release", "-q", "-p", "smmuv3", "--lib", "loom"]);
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| smmuv3_harness::workspace_root().join("target"));
    command
        .env("RUSTFLAGS", "--cfg loom")
        .env("CARGO_TARGET_DIR", target.join("loom"))
        .env("LOOM_MAX_PREEMPTIONS", "1")
        .env("LOOM_MODEL_SECONDS", LOOM_MODEL_SECONDS.to_string());
    command
}

/// Seconds of the fuzzer's smoke run in `test`.
const FUZZ_SMOKE_SECONDS: u64 = 5;
/// Seconds of `fuzz` when `--seconds` is not given.
const FUZZ_DEFAULT_SECONDS: u64 = 180;

/// The fuzzer's command line (release build: the smoke run's throughput matters more than its build time).
fn fuzz_command(seconds: u64, seed: Option<&str>) -> Command {
    let mut command = cargo();
    command.args(["run", "--release", "-q", "-p", "smmuv3-fuzz", "--", "--seconds"]);
    command.arg(seconds.to_string());
    if let Some(seed) = seed {
        command.args(["--seed", seed]);
    }
    command
}

fn fuzz(args: &[String]) -> Result<ExitCode, String> {
    let mut seconds = FUZZ_DEFAULT_SECONDS;
    let mut seed = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--seconds" => {
                let s = value(&mut it, arg)?;
                seconds = s.parse().map_err(|_| format!("bad --seconds {s:?}"))?;
            }
            "--seed" => seed = Some(value(&mut it, arg)?),
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    step("handover fuzzer", fuzz_command(seconds, seed))?;
    Ok(ExitCode::SUCCESS)
}

fn handover_dump(args: &[String]) -> Result<ExitCode, String> {
    let [file] = args else {
        return Err(format!("`handover-dump` takes one file (got {args:?})\n{}", usage()));
    };
    let bytes = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
    let (text, accepted) = dump::dump(&bytes);
    print!("{text}");
    Ok(if accepted { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The boards QEMU does not model: their firmware is built (by `build` and by `test`), never run here.
const HARDWARE_BOARDS: [&str; 1] = ["imx95"];

fn build(args: &[String]) -> Result<ExitCode, String> {
    let names: Vec<&str> = Board::ALL.iter().map(|b| b.name()).chain(HARDWARE_BOARDS).collect();
    let wanted: Vec<&str> = match args {
        [] => names.clone(),
        [flag, name] if flag == "--board" => match names.iter().find(|n| *n == name) {
            Some(n) => vec![*n],
            None => return Err(format!("unknown board {name:?} (one of {})", names.join(", "))),
        },
        _ => return Err(format!("`build` takes at most --board NAME (got {args:?})")),
    };
    ensure_firmware_target()?;
    for name in wanted {
        let elf = build_firmware_package(name)?;
        println!("{name}: {}", elf.display());
        if HARDWARE_BOARDS.contains(&name) {
            let image = elf.with_extension("bin");
            let bytes = image::raw_image(&std::fs::read(&elf).map_err(|e| format!("{}: {e}", elf.display()))?)?;
            std::fs::write(&image, &bytes).map_err(|e| format!("{}: {e}", image.display()))?;
            println!(
                "{name}: {} ({} bytes, arm64 Image for booti)",
                image.display(),
                bytes.len()
            );
        }
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
    criterion_estimate(group, function, "mean")
}

/// Reads criterion's median point estimate (ns) of `group/function`.
fn criterion_median(group: &str, function: &str) -> Option<f64> {
    criterion_estimate(group, function, "median")
}

/// Reads criterion's point estimate (ns) of `statistic` ("mean", "median") for `group/function`.
fn criterion_estimate(group: &str, function: &str, statistic: &str) -> Option<f64> {
    // Criterion writes below the cargo target directory, which CARGO_TARGET_DIR may move.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| smmuv3_harness::workspace_root().join("target"));
    let path = target.join(format!("criterion/{group}/{function}/new/estimates.json"));
    let text = std::fs::read_to_string(path).ok()?;
    let section = &text[text.find(&format!("\"{statistic}\""))?..];
    let estimate = &section[section.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
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
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    for (group, title) in BENCH_GROUPS {
        let ours = criterion_mean(group, "ours");
        let peer = criterion_mean(group, "peer_pool");
        let global = criterion_mean(group, "peer_global");
        let memset = criterion_mean(group, "memset");
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
    // What the memset line is made of: the same descriptors written with plain stores, at the ISA this build
    // targets and with AVX2 (glibc picks its memset for the CPU at run time; a driver compiled for the baseline
    // ISA cannot).
    println!();
    println!(
        "| bulk row | ours | memset of the PTE bytes | plain-store fill of the PTEs | the fill with AVX2 | ours / memset \
         | ours / fill | fill / memset |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (group, title) in &BENCH_GROUPS[..2] {
        let ours = criterion_mean(group, "ours");
        let memset = criterion_mean(group, "memset");
        let fill = criterion_mean(group, "fill");
        let wide = criterion_mean(group, "fill_avx2");
        println!(
            "| {title} | {} | {} | {} | {} | {} | {} | {} |",
            format_ns(ours),
            format_ns(memset),
            format_ns(fill),
            format_ns(wide),
            ratio(ours, memset),
            ratio(ours, fill),
            ratio(fill, memset)
        );
    }
    println!();
    println!(
        "(fill: the descriptors a map writes, an arithmetic sequence, stored with plain stores into one buffer and \
         compiled like the driver; the memset is glibc's, chosen for this CPU at run time)"
    );
    bench_domains(quick)?;
    bench_live_update(quick)?;
    bench_every_cpu(quick)?;
    Ok(ExitCode::SUCCESS)
}

/// The domain table's cost at both ends of its capacity (`benches/domains.rs`).
fn bench_domains(quick: bool) -> Result<(), String> {
    let mut command = cargo();
    command.args(["bench", "-p", "smmuv3", "--bench", "domains", "--"]);
    if quick {
        command.args(["--warm-up-time", "1", "--measurement-time", "2", "--sample-size", "10"]);
    }
    step("domain benchmarks", command)?;
    let empty = criterion_mean("domain_create_free", "empty_table");
    let full = criterion_mean("domain_create_free", "full_table");
    println!();
    println!("| benchmark | empty domain table | 63 of 64 slots taken | full / empty |");
    println!("|---|---|---|---|");
    println!(
        "| create + free a stage-1 domain (with its TLBI + CMD_SYNC) | {} | {} | {} |",
        format_ns(empty),
        format_ns(full),
        match (empty, full) {
            (Some(e), Some(f)) if e > 0.0 => format!("{:.2}x", f / e),
            _ => "-".into(),
        }
    );
    println!();
    println!("| benchmark | time |");
    println!("|---|---|");
    println!(
        "| map one 4 KiB page through a domain (`Iommu::map`, 3 protected extents declared) | {} |",
        format_ns(criterion_mean("domain_map_one_4k", "ours"))
    );
    Ok(())
}

/// Every CPU, in one table: map + unmap through one shared `Iommu` by 1 and 2 threads (on 2 domains and on 1), and
/// the command queue with 1 and 2 submitters, each row's total throughput against one thread's
/// (`benches/concurrency.rs`, `benches/cmdq.rs`); 4 and 8 threads, a lock around the driver, and the map paths
/// alone as figures.
fn bench_every_cpu(quick: bool) -> Result<(), String> {
    for (bench, what) in [
        ("concurrency", "every-CPU domain benchmarks"),
        ("cmdq", "command-queue benchmarks"),
    ] {
        let mut command = cargo();
        command.args(["bench", "-p", "smmuv3", "--bench", bench, "--"]);
        if quick {
            command.args(["--warm-up-time", "1", "--measurement-time", "2", "--sample-size", "10"]);
        }
        step(what, command)?;
    }
    // A row's speed-up: `threads` times one thread's time over the row's (each thread does one iteration's work).
    let speed_up = |group: &str, one: &str, function: &str, threads: f64| match (
        criterion_median(group, function),
        criterion_median(group, one),
    ) {
        (Some(t), Some(o)) if t > 0.0 => Some(threads * o / t),
        _ => None,
    };
    let shown = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{x:.2}x"));
    let domains = |function: &str, threads: f64| shown(speed_up("every_cpu", "1_thread", function, threads));
    let queue = |function: &str, submitters: f64| shown(speed_up("cmdq_throughput", "1", function, submitters));
    println!();
    println!("| benchmark | time per iteration | speed-up vs 1 thread |");
    println!("|---|---|---|");
    for (label, function, threads) in [
        ("map + unmap 4096 random 4 KiB pages, 1 thread", "1_thread", 1.0),
        (
            "map + unmap 4096 random 4 KiB pages, 2 threads on 2 domains",
            "2_threads_2_domains",
            2.0,
        ),
        (
            "map + unmap 4096 random 4 KiB pages, 2 threads on 1 domain",
            "2_threads_1_domain",
            2.0,
        ),
    ] {
        println!(
            "| {label} | {} | {} |",
            format_ns(criterion_median("every_cpu", function)),
            domains(function, threads)
        );
    }
    for (label, function, submitters) in [
        ("commands through the queue, 1 submitter", "1", 1.0),
        ("commands through the queue, 2 submitters", "2", 2.0),
    ] {
        println!(
            "| {label} | {} | {} |",
            format_ns(criterion_median("cmdq_throughput", function)),
            queue(function, submitters)
        );
    }
    println!();
    println!(
        "(criterion median; this machine has 2 cores. Bars: 2 threads on 2 domains >= 1.8x, on 1 domain >= 1.5x, \
         2 submitters >= 1.5x. An iteration: each thread maps its 4096 pages one by one, then unmaps them one by one \
         (each unmap waits for its TLBI's CMD_SYNC), through one Iommu shared by reference; for the queue, one batch \
         of 16 commands and a CMD_SYNC from each submitter. The fake SMMUs sleep between visits of their queue (a \
         real SMMU takes no core) and consume everything published in one visit, so the unmaps' round trips \
         dominate: the speed-up says how many CPUs' invalidations one visit completes, which a lock held through a \
         round trip keeps at 1x. Figures, not bars: 2 threads on 2 domains behind one lock around the driver {}; 4 \
         threads on 4 domains {}, on 1 domain {}; 8 threads on 8 domains {}; queue: 4 submitters {}, 8 submitters \
         {}, 2 behind one lock {}. The map paths alone (no SMMU wait; CPU-bound, so 2 cores bound them): 1 thread \
         {} per 4096 pages, 2 threads on 2 domains {}, on 1 domain {}. Attach + detach of a thread's own stream and \
         domain, 64 rounds (each STE write's CFGI_STE + CMD_SYNC awaited): 1 thread {}, 2 threads {}, 2 behind one \
         lock {})",
        domains("2_threads_2_domains_behind_one_lock", 2.0),
        domains("4_threads_4_domains", 4.0),
        domains("4_threads_1_domain", 4.0),
        domains("8_threads_8_domains", 8.0),
        queue("4", 4.0),
        queue("8", 8.0),
        queue("2_behind_one_lock", 2.0),
        format_ns(criterion_median("every_cpu", "map_only_1_thread")),
        shown(speed_up(
            "every_cpu",
            "map_only_1_thread",
            "map_only_2_threads_2_domains",
            2.0
        )),
        shown(speed_up(
            "every_cpu",
            "map_only_1_thread",
            "map_only_2_threads_1_domain",
            2.0
        )),
        format_ns(criterion_median("every_cpu", "attach_detach_1_thread")),
        shown(speed_up(
            "every_cpu",
            "attach_detach_1_thread",
            "attach_detach_2_threads",
            2.0
        )),
        shown(speed_up(
            "every_cpu",
            "attach_detach_1_thread",
            "attach_detach_2_threads_behind_one_lock",
            2.0
        )),
    );
    Ok(())
}

/// Live update's cost against what it scales with (`benches/live_update.rs`): `preserve` against the domains
/// already preserved, `prepare_handover` against the domains it records, a whole restore against the size the
/// restored domain maps. Medians: the timed sections wait on the fake SMMU thread, and on a loaded host a
/// descheduled thread inflates a few samples by an order of magnitude.
fn bench_live_update(quick: bool) -> Result<(), String> {
    let mut command = cargo();
    command.args(["bench", "-p", "smmuv3", "--bench", "live_update", "--"]);
    if quick {
        command.args(["--warm-up-time", "1", "--measurement-time", "2", "--sample-size", "10"]);
    }
    step("live-update benchmarks", command)?;
    // Per group: what its first row is (for the ratio column), then each row's label and criterion path.
    let groups: [(&str, &[(&str, &str)]); 5] = [
        (
            "1 domain",
            &[
                ("preserve, 1 domain preserved", "preserve/preserve/1"),
                ("preserve, 16 domains preserved", "preserve/preserve/16"),
                ("preserve, 4096 domains preserved", "preserve/preserve/4096"),
            ],
        ),
        (
            "1 domain",
            &[
                ("prepare_handover, 1 domain", "preserve/prepare_handover/1"),
                ("prepare_handover, 16 domains", "preserve/prepare_handover/16"),
                ("prepare_handover, 4096 domains", "preserve/prepare_handover/4096"),
            ],
        ),
        (
            "16 domains",
            &[
                (
                    "restore + retrieve + finish, 16 domains",
                    "restore_many/restore_retrieve_finish/16",
                ),
                (
                    "restore + retrieve + finish, 4096 domains",
                    "restore_many/restore_retrieve_finish/4096",
                ),
            ],
        ),
        (
            "4 KiB verified",
            &[
                (
                    "restore + retrieve + finish, 4 KiB mapped, verified",
                    "restore/restore_retrieve_finish_verified/4KiB",
                ),
                (
                    "restore + retrieve + finish, 2 MiB mapped, verified",
                    "restore/restore_retrieve_finish_verified/2MiB",
                ),
                (
                    "restore + retrieve + finish, 64 MiB mapped, verified",
                    "restore/restore_retrieve_finish_verified/64MiB",
                ),
                (
                    "restore + retrieve + finish, 1 GiB mapped, verified",
                    "restore/restore_retrieve_finish_verified/1GiB",
                ),
                (
                    "restore + retrieve + finish, 64 GiB mapped, verified",
                    "restore/restore_retrieve_finish_verified/64GiB",
                ),
            ],
        ),
        (
            "4 KiB trusted",
            &[
                (
                    "restore + retrieve + finish, 4 KiB mapped, trusted",
                    "restore/restore_retrieve_finish_trusted/4KiB",
                ),
                (
                    "restore + retrieve + finish, 64 MiB mapped, trusted",
                    "restore/restore_retrieve_finish_trusted/64MiB",
                ),
                (
                    "restore + retrieve + finish, 1 GiB mapped, trusted",
                    "restore/restore_retrieve_finish_trusted/1GiB",
                ),
                (
                    "restore + retrieve + finish, 64 GiB mapped, trusted",
                    "restore/restore_retrieve_finish_trusted/64GiB",
                ),
            ],
        ),
    ];
    let median = |path: &str| {
        let (group, function) = path.split_once('/')?;
        criterion_median(group, function)
    };
    println!();
    println!("| benchmark | time | ratio to the first row of its group |");
    println!("|---|---|---|");
    for (first_name, rows) in groups {
        let first = median(rows[0].1);
        for (label, path) in rows {
            let time = median(path);
            let ratio = match (time, first) {
                (Some(t), Some(f)) if f > 0.0 => format!("{:.2}x of {first_name}", t / f),
                _ => "-".into(),
            };
            println!("| {label} | {} | {ratio} |", format_ns(time));
        }
    }
    // Per domain: 4,096 against 16 (the bar: at most 2x).
    for (what, path) in [
        ("prepare_handover", "preserve/prepare_handover"),
        ("restore + retrieve + finish", "restore_many/restore_retrieve_finish"),
    ] {
        let (few, many) = (median(&format!("{path}/16")), median(&format!("{path}/4096")));
        println!(
            "| {what}, per domain at 4096 | {} | {} |",
            format_ns(many.map(|m| m / 4096.0)),
            match (few, many) {
                (Some(f), Some(m)) if f > 0.0 => format!(
                    "{:.2}x the per-domain cost at 16 (the bar: at most 2x)",
                    (m / 4096.0) / (f / 16.0)
                ),
                _ => "-".into(),
            }
        );
    }
    // The yardstick of the verified restore: the same table bytes read once, in the same run.
    for (size, path) in [("1 GiB", "1GiB"), ("64 GiB", "64GiB")] {
        let plain = median(&format!("restore/plain_read/{path}"));
        let verified = median(&format!("restore/restore_retrieve_finish_verified/{path}"));
        println!(
            "| plain read of the same table bytes ({size}) | {} | {} |",
            format_ns(plain),
            match (verified, plain) {
                (Some(v), Some(p)) if p > 0.0 => {
                    format!("{size} verified: {:.2}x of this (the bar: at most 2x)", v / p)
                }
                _ => "-".into(),
            }
        );
    }
    let times = |paths: &[&str]| {
        paths
            .iter()
            .map(|p| format_ns(median(p)))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    println!();
    println!(
        "(criterion median per operation{}; a fake SMMU thread acknowledges the commands; preserve timed alone \
         (the two clock reads around it: {}), unpreserve untimed; preserve + unpreserve timed together: {} with \
         1 / 4 / 8 / 16 / 4096 preserved (a driver with room for 4,104 domains, each with one page mapped); prepare_handover encodes every \
         record and decodes the region back and walks every preserved table for what survives, so it grows with the \
         domains (on aarch64 it also cleans their memory to the point of coherency, a no-op on the host); restore: \
         one stage-1 domain with one stream, its table of 4 KiB pages verified (every table walked, every leaf's \
         output range checked, every count compared, its CD compared) or trusted (adopted in place from recorded \
         counts, no table read), the region's bytes and a fresh driver set up untimed before each iteration, each \
         criterion sample the median of its iterations (an iteration waiting on a descheduled fake SMMU thread \
         does not weigh as it would in a mean), the plain read likewise, after the same untimed copy; decode + \
         validate of that region alone: {} for 4 KiB / 2 MiB / 64 MiB / 1 GiB mapped)",
        if quick {
            ", --quick: 1 s warm-up, 2 s measurement, 10 samples"
        } else {
            ""
        },
        times(&["preserve/clock_overhead"]),
        times(&[
            "preserve/preserve_unpreserve/1",
            "preserve/preserve_unpreserve/4",
            "preserve/preserve_unpreserve/8",
            "preserve/preserve_unpreserve/16",
            "preserve/preserve_unpreserve/4096",
        ]),
        times(&[
            "restore/decode/4KiB",
            "restore/decode/2MiB",
            "restore/decode/64MiB",
            "restore/decode/1GiB"
        ]),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(trace: &str) -> Outcome {
        Outcome {
            asked: Vec::new(),
            commandline: String::new(),
            console: String::new(),
            stderr: String::new(),
            exit_code: Some(0),
            timed_out: false,
            elapsed: Duration::from_secs(1),
            trace: trace.into(),
            trace_file: None,
        }
    }

    #[test]
    fn a_toolchain_without_the_firmware_target_gets_it_added() {
        assert_eq!(target_step(Some("x86_64-unknown-linux-gnu\n"), false), TargetStep::Add);
        assert_eq!(target_step(Some(""), false), TargetStep::Add);
    }

    #[test]
    fn a_toolchain_with_the_firmware_target_is_left_alone() {
        let list = "aarch64-unknown-none\nx86_64-unknown-linux-gnu\n";
        assert_eq!(target_step(Some(list), false), TargetStep::Present);
        // Without rustup, the sysroot decides.
        assert_eq!(target_step(None, true), TargetStep::Present);
    }

    #[test]
    fn without_rustup_a_missing_target_names_the_command() {
        let TargetStep::Missing(why) = target_step(None, false) else {
            panic!("expected Missing")
        };
        assert!(why.contains("rustup target add aarch64-unknown-none"), "{why}");
    }

    #[test]
    fn the_summary_counts_gerror_writes() {
        let summary = trace_summary(&outcome(
            "1@2.3:smmuv3_cmdq_consume_error CMD_TLBI_NH_ASID (cons=3): CERROR_ILL\n\
             1@2.4:smmuv3_write_gerror toggled=0x1, new GERROR=0x1\n\
             1@2.5:smmuv3_write_gerrorn acked=0x1, new GERRORN=0x1\n",
        ));
        assert_eq!(
            summary[0],
            "xtask: the emulated SMMU recorded 0 event(s), 1 command error(s), 1 GERROR write(s):"
        );
        assert!(
            summary.contains(&"  1 x smmuv3_write_gerror toggled=0x1, new GERROR=0x1".to_string()),
            "{summary:?}"
        );
    }

    #[test]
    fn a_trace_with_only_gerror_writes_still_gets_a_summary() {
        let summary = trace_summary(&outcome("smmuv3_write_gerror toggled=0x4, new GERROR=0x4\n"));
        assert_eq!(summary.len(), 2, "{summary:?}");
        assert!(trace_summary(&outcome("")).is_empty());
    }

    #[test]
    fn smp_takes_one_to_eight_cpus() {
        assert_eq!(parse_smp("1"), Ok(1));
        assert_eq!(parse_smp("4"), Ok(4));
        assert_eq!(parse_smp("8"), Ok(8));
        for bad in ["0", "9", "four", "-1", ""] {
            let why = parse_smp(bad).unwrap_err();
            assert!(why.contains("1 to 8 CPUs"), "{why}");
        }
    }

    #[test]
    fn the_msrv_is_read_from_the_manifest() {
        assert_eq!(
            declared_msrv("[package]\nname = \"x\"\nrust-version = \"1.88\"\n"),
            Some("1.88")
        );
        assert_eq!(declared_msrv("[package]\nname = \"x\"\n"), None);
        let ours = std::fs::read_to_string(smmuv3_harness::workspace_root().join("Cargo.toml")).unwrap();
        assert!(declared_msrv(&ours).is_some());
    }

    #[test]
    fn a_scenario_list_names_at_least_one() {
        assert_eq!(scenario_list("a,b"), Ok(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(scenario_list(" lu-s1 ,"), Ok(vec!["lu-s1".to_string()]));
        for empty in [",", "", " , ,"] {
            let why = scenario_list(empty).unwrap_err();
            assert!(why.contains("names no scenario"), "{why}");
        }
    }

    #[test]
    fn build_refuses_an_unknown_board_and_stray_arguments() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(
            build(&args(&["--board", "imx8"]))
                .unwrap_err()
                .contains("unknown board \"imx8\"")
        );
        assert!(build(&args(&["imx95"])).unwrap_err().contains("at most --board NAME"));
    }

    #[test]
    fn every_command_answers_help() {
        let dispatched = ["qemu", "test", "build", "bench", "fuzz", "handover-dump"];
        let named: Vec<&str> = COMMANDS.iter().map(|(name, _)| *name).collect();
        assert_eq!(named, dispatched);
        for (name, block) in COMMANDS {
            assert!(
                block.trim_start().starts_with(name),
                "{name}'s usage starts with its name"
            );
            assert!(usage().contains(block));
        }
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(asks_help(&args(&["--help"])));
        assert!(asks_help(&args(&["--board", "sbsa-ref", "-h"])));
        assert!(!asks_help(&args(&["FILE"])));
        assert!(!asks_help(&args(&["--", "--help"])), "QEMU's own --help after --");
    }

    #[test]
    fn a_dump_path_is_absolute_and_plain() {
        let path = dump_path("region.bin").unwrap();
        assert!(path.is_absolute() && path.ends_with("region.bin"));
        for bad in ["a,b", "a b", "", "/no/such/directory/region.bin"] {
            assert!(dump_path(bad).is_err(), "{bad:?}");
        }
    }
}
