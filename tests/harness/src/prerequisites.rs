//! QEMU prerequisites: version >= 9.2 and an `arm-smmuv3` that really presents the stages the tests ask for.
//! Installs Debian's `qemu-system-arm` from bookworm-backports when running as root with apt, by adding that
//! suite to the apt sources already configured (no host is named); otherwise says exactly what to run.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use crate::QEMU;

/// Oldest QEMU whose SMMUv3 model the project supports.
pub const MINIMUM_VERSION: (u32, u32) = (9, 2);

/// The commands that install QEMU by hand on Debian bookworm.
pub const INSTALL_HINT: &str = "as root on Debian bookworm: add `bookworm-backports` to the Suites of the \
     existing entry in /etc/apt/sources.list.d/debian.sources (or a `deb <same mirror> bookworm-backports main` \
     line in /etc/apt/sources.list), then `apt-get update && apt-get install -y -t bookworm-backports \
     qemu-system-arm` (or run `cargo xtask test` as root, which does this)";

/// What was found.
#[derive(Clone, Debug)]
pub struct QemuInfo {
    /// (major, minor, micro).
    pub version: (u32, u32, u32),
    /// SMMU IDR0 with `-global arm-smmuv3.stage=nested` on `virt`.
    pub nested_idr0: u32,
}

fn version() -> Result<(u32, u32, u32), String> {
    let out = Command::new(QEMU)
        .arg("--version")
        .output()
        .map_err(|e| format!("{QEMU} not found ({e})"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .ok_or_else(|| format!("cannot read the version in: {text}"))?;
    let mut parts = v.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse().ok());
    Ok((
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    ))
}

/// Reads SMMU IDR0 of `-M machine,iommu=smmuv3 -global arm-smmuv3.stage=stage` through QEMU's qtest protocol
/// (no firmware involved).
///
/// # Errors
/// When QEMU refuses the command line or the read fails.
pub fn smmu_idr0(machine: &str, stage: &str) -> Result<u32, String> {
    let mut child = Command::new(QEMU)
        .args([
            "-M",
            &format!("{machine},iommu=smmuv3"),
            "-global",
            &format!("arm-smmuv3.stage={stage}"),
        ])
        .args(["-qtest", "stdio", "-display", "none", "-nodefaults", "-S"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{QEMU}: {e}"))?;
    // qtest keeps QEMU alive after stdin closes: read the one answer, then stop it.
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let _ = stdin.write_all(b"readl 0x09050000\n");
    let _ = stdin.flush();
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut answer = None;
    let mut seen = String::new();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if let Some(hex) = line.strip_prefix("OK 0x") {
            answer = u32::from_str_radix(hex.trim(), 16).ok();
            break;
        }
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("FAIL") || line.starts_with("ERR") {
            break;
        }
    }
    drop(stdin);
    let _ = child.kill();
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    answer.ok_or_else(|| {
        format!(
            "qtest read of SMMU IDR0 failed: {seen}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Checks the installed QEMU.
///
/// # Errors
/// A message saying what is missing.
pub fn check() -> Result<QemuInfo, String> {
    let version = version()?;
    if (version.0, version.1) < MINIMUM_VERSION {
        return Err(format!(
            "{QEMU} {}.{}.{} is older than {}.{}",
            version.0, version.1, version.2, MINIMUM_VERSION.0, MINIMUM_VERSION.1
        ));
    }
    let nested_idr0 = smmu_idr0("virt", "nested")?;
    if nested_idr0 & 0b11 != 0b11 {
        return Err(format!(
            "{QEMU}'s arm-smmuv3 with stage=nested offers no nesting (IDR0 {nested_idr0:#x})"
        ));
    }
    Ok(QemuInfo { version, nested_idr0 })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}"))
    }
}

/// Adds `bookworm-backports` to the apt sources already configured for bookworm: to the `Suites:` line of a
/// deb822 source that lists `bookworm`, or as a copy of a one-line `deb … bookworm main` entry. Returns whether
/// anything changed.
///
/// # Errors
/// When no bookworm source exists to extend, or a file cannot be written.
pub fn add_backports_suite() -> Result<bool, String> {
    let deb822 = std::path::Path::new("/etc/apt/sources.list.d/debian.sources");
    if let Ok(text) = std::fs::read_to_string(deb822) {
        if text.contains("bookworm-backports") {
            return Ok(false);
        }
        let mut done = false;
        let new: Vec<String> = text
            .lines()
            .map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                if !done && words.first() == Some(&"Suites:") && words.contains(&"bookworm") {
                    done = true;
                    format!("{l} bookworm-backports")
                } else {
                    l.to_string()
                }
            })
            .collect();
        if done {
            std::fs::write(deb822, new.join("\n") + "\n").map_err(|e| format!("{}: {e}", deb822.display()))?;
            return Ok(true);
        }
    }
    let list = std::path::Path::new("/etc/apt/sources.list");
    if let Ok(text) = std::fs::read_to_string(list) {
        if text.contains("bookworm-backports") {
            return Ok(false);
        }
        if let Some(line) = text.lines().find(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.first() == Some(&"deb") && w.contains(&"bookworm")
        }) {
            let backports = line.replacen(" bookworm ", " bookworm-backports ", 1);
            std::fs::write(list, format!("{text}\n{backports}\n")).map_err(|e| format!("{}: {e}", list.display()))?;
            return Ok(true);
        }
    }
    Err("no Debian bookworm apt source to add bookworm-backports to".into())
}

/// Installs `qemu-system-arm` from bookworm-backports (root with apt only).
///
/// # Errors
/// When not root, without apt, or when apt fails.
pub fn install() -> Result<(), String> {
    if !is_root() || Command::new("apt-get").arg("--version").output().is_err() {
        return Err(format!("cannot install QEMU here (needs root and apt); {INSTALL_HINT}"));
    }
    add_backports_suite()?;
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-t",
            "bookworm-backports",
            "qemu-system-arm",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Checks QEMU; when it is missing or too old and `may_install`, installs it and checks again.
///
/// # Errors
/// What is missing and the exact commands to fix it.
pub fn ensure_qemu(may_install: bool) -> Result<QemuInfo, String> {
    match check() {
        Ok(info) => Ok(info),
        Err(why) if may_install => {
            eprintln!("xtask: {why}; installing qemu-system-arm from bookworm-backports");
            install()?;
            check()
        }
        Err(why) => Err(format!(
            "{why}. Install QEMU >= 9.2 with SMMUv3 nesting: {INSTALL_HINT}"
        )),
    }
}
