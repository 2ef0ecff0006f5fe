//! The host side of the on-target tests: checks (and, where it may, installs) QEMU, builds a board's firmware,
//! boots it on QEMU with a stage, a scenario list and a timeout, and reads back the console, the exit status and
//! the emulated SMMU's own trace.
//!
//! Shared by the integration tests in `tests/` and by `cargo xtask`.

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod prerequisites;

pub use prerequisites::{QemuInfo, ensure_qemu};

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-aarch64";
/// fw_cfg file naming the scenarios (the contract with the firmware).
pub const SCENARIOS_KEY: &str = "opt/smmuv3/scenarios";
/// fw_cfg file naming the stages QEMU's SMMU was configured with.
pub const STAGE_KEY: &str = "opt/smmuv3/stage";
/// fw_cfg file giving edu's DMA mask.
pub const EDU_DMA_MASK_KEY: &str = "opt/smmuv3/edu-dma-mask";
/// The scenarios the firmware runs when it is told none (its `DEFAULT_SCENARIOS`): the demo.
pub const DEFAULT_SCENARIOS: [&str; 6] = ["probe", "edu-ident", "init", "abort-default", "bypass", "pgtable-dma"];
/// The trace event QEMU's SMMU emits when it raises a global error (`toggled=…, new GERROR=…`).
pub const GERROR_TRACE_EVENT: &str = "smmuv3_write_gerror";
/// The edu DMA mask virt runs use unless told otherwise: 40 bits, enough to reach its RAM without translation.
pub const DEFAULT_EDU_DMA_MASK: u64 = 0xff_ffff_ffff;

/// The repository's root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// A board the firmware runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Board {
    /// QEMU's `virt` machine: firmware at EL2, everything described by the device tree, configuration by fw_cfg.
    QemuVirt,
    /// QEMU's `sbsa-ref` machine: firmware from EL3 (its own stub) to EL2, devices from the board's static
    /// description, configuration by the semihosting command line.
    SbsaRef,
}

impl Board {
    /// Every board.
    pub const ALL: [Board; 2] = [Board::QemuVirt, Board::SbsaRef];

    /// The name used by `--board` and by the firmware crate (`boards/<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Board::QemuVirt => "qemu-virt",
            Board::SbsaRef => "sbsa-ref",
        }
    }

    /// Parses a `--board` value.
    pub fn from_name(name: &str) -> Option<Board> {
        Board::ALL.into_iter().find(|b| b.name() == name)
    }

    /// Whether QEMU can present an SMMU of `stage` on this board. sbsa-ref has no versioned machine types, and
    /// QEMU 10 ignores `arm-smmuv3.stage` on it: its SMMU always has both stages.
    pub fn supports(self, stage: Stage) -> bool {
        match self {
            Board::QemuVirt => true,
            Board::SbsaRef => stage == Stage::Nested,
        }
    }

    /// [`Board::supports`] as `cargo xtask qemu` reports it.
    ///
    /// # Errors
    /// Why the board cannot present `stage`.
    pub fn check_stage(self, stage: Stage) -> Result<(), String> {
        if self.supports(stage) {
            Ok(())
        } else {
            Err(format!(
                "QEMU presents no stage-{} SMMU on {}: its SMMU always has both stages (--stage nested)",
                stage.name(),
                self.name()
            ))
        }
    }

    /// The PCI address the runs give edu (sbsa-ref puts its own NIC and display at 01.0 and 02.0 by default).
    pub fn edu_device(self) -> u8 {
        match self {
            Board::QemuVirt => 2,
            Board::SbsaRef => 3,
        }
    }

    /// The PCI slot the runs give a virtio-blk disk ([`Run::virtio_disk`]): the one after edu's.
    pub fn virtio_device(self) -> u8 {
        self.edu_device() + 1
    }

    /// The virtio-blk disk's StreamID: its requester ID (bus 0).
    pub fn virtio_stream_id(self) -> u32 {
        u32::from(self.virtio_device()) << 3
    }

    /// edu's StreamID: its requester ID (bus 0), as both boards map requester IDs to StreamIDs one to one.
    pub fn edu_stream_id(self) -> u32 {
        u32::from(self.edu_device()) << 3
    }

    /// The edu DMA mask the runs use unless told otherwise: wide enough to reach the board's RAM without
    /// translation (virt: RAM at 1 GiB, 40 bits; sbsa-ref: RAM at 1 TiB, 41 bits).
    pub fn default_edu_dma_mask(self) -> u64 {
        match self {
            Board::QemuVirt => DEFAULT_EDU_DMA_MASK,
            Board::SbsaRef => (1 << 41) - 1,
        }
    }
}

/// Where an edu device sits in the PCI topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EduPlacement {
    /// On the root bus, at the board's [`Board::edu_device`] slot.
    RootBus,
    /// Behind a `pcie-root-port` at 00:08.0: the first bridge, so bus 1, edu at 01:00.0 (StreamID 0x100).
    RootPort,
    /// Behind a switch (`x3130-upstream` + `xio3130-downstream`) under a root port at 00:09.0: buses 2 (root
    /// port), 3 (upstream port) and 4 (downstream port) when it comes after [`EduPlacement::RootPort`], edu at
    /// 04:00.0 (StreamID 0x400); without a root-port edu, buses 1, 2, 3 and edu at 03:00.0 (StreamID 0x300).
    Switch,
}

impl EduPlacement {
    /// The QEMU `-device` values that build this placement, edu last.
    pub fn devices(self, board: Board, dma_mask: u64) -> Vec<String> {
        let edu = |bus_and_addr: String| format!("edu,{bus_and_addr},dma_mask={dma_mask:#x}");
        match self {
            EduPlacement::RootBus => vec![edu(format!("addr={}.0", board.edu_device()))],
            EduPlacement::RootPort => vec![
                "pcie-root-port,id=smmuv3-rp,bus=pcie.0,chassis=1,addr=8.0".into(),
                edu("bus=smmuv3-rp,addr=0.0".into()),
            ],
            EduPlacement::Switch => vec![
                "pcie-root-port,id=smmuv3-sw-rp,bus=pcie.0,chassis=2,addr=9.0".into(),
                "x3130-upstream,id=smmuv3-up,bus=smmuv3-sw-rp".into(),
                "xio3130-downstream,id=smmuv3-down,bus=smmuv3-up,chassis=3,slot=0".into(),
                edu("bus=smmuv3-down,addr=0.0".into()),
            ],
        }
    }
}

/// A raw disk image for the `virtio-dma` scenario, under `target/virtio-disks/`, and the contract with it: the
/// host writes [`VirtioDisk::host_byte`] into sector [`VirtioDisk::HOST_SECTOR`] (every other sector zero), the
/// firmware writes [`VirtioDisk::written_byte`] into [`VirtioDisk::WRITE_COUNT`] sectors from
/// [`VirtioDisk::WRITE_SECTOR`] on (the firmware's `scenarios/virtio_dma.rs` holds the same constants).
#[derive(Debug)]
pub struct VirtioDisk {
    /// The image file (removed on drop).
    pub path: PathBuf,
}

impl VirtioDisk {
    /// Sector size.
    pub const SECTOR: usize = 512;
    /// Sectors in the image (1 MiB).
    pub const SECTORS: usize = 2048;
    /// The sector the host pre-fills.
    pub const HOST_SECTOR: usize = 100;
    /// The first sector the firmware writes.
    pub const WRITE_SECTOR: usize = 8;
    /// How many sectors it writes.
    pub const WRITE_COUNT: usize = 4;

    /// Byte `i` of the host's sector: a signature, then a counting pattern.
    pub fn host_byte(i: usize) -> u8 {
        const SIGNATURE: &[u8; 16] = b"smmuv3 host disk";
        match SIGNATURE.get(i) {
            Some(&b) => b,
            None => (i as u8).wrapping_mul(29).wrapping_add(0x47) ^ ((i >> 8) as u8),
        }
    }

    /// Byte `i` of sector `sector` as the firmware writes it.
    pub fn written_byte(sector: usize, i: usize) -> u8 {
        (i as u8).wrapping_mul(7) ^ ((i >> 8) as u8).wrapping_mul(0x5f) ^ (sector as u8).wrapping_mul(0x3b) ^ 0xa5
    }

    /// Creates a fresh image named after `tag`, this process and thread.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn create(tag: &str) -> VirtioDisk {
        let dir = workspace_root().join("target/virtio-disks");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let path = dir.join(format!(
            "{tag}-{}-{:?}.img",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut image = vec![0u8; Self::SECTORS * Self::SECTOR];
        let host = &mut image[Self::HOST_SECTOR * Self::SECTOR..][..Self::SECTOR];
        for (i, b) in host.iter_mut().enumerate() {
            *b = Self::host_byte(i);
        }
        std::fs::write(&path, &image).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        VirtioDisk { path }
    }

    /// Reads sector `sector` of the image back (after the run).
    ///
    /// # Panics
    /// When the file cannot be read or is too short.
    pub fn sector(&self, sector: usize) -> Vec<u8> {
        let image = std::fs::read(&self.path).unwrap_or_else(|e| panic!("{}: {e}", self.path.display()));
        image[sector * Self::SECTOR..][..Self::SECTOR].to_vec()
    }

    /// Whether the firmware's sectors hold its pattern in the image.
    pub fn holds_written_pattern(&self) -> bool {
        (Self::WRITE_SECTOR..Self::WRITE_SECTOR + Self::WRITE_COUNT).all(|s| {
            self.sector(s)
                .iter()
                .enumerate()
                .all(|(i, &b)| b == Self::written_byte(s, i))
        })
    }
}

impl Drop for VirtioDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Which SMMU QEMU presents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Stage 1 only (needs `-M virt-9.1`: newer machine versions ignore the property).
    One,
    /// Stage 2 only (likewise).
    Two,
    /// Both stages: nested translation.
    Nested,
}

impl Stage {
    /// Every stage.
    pub const ALL: [Stage; 3] = [Stage::One, Stage::Two, Stage::Nested];

    /// The value of QEMU's `arm-smmuv3.stage` property and of `--stage`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::One => "1",
            Stage::Two => "2",
            Stage::Nested => "nested",
        }
    }

    /// Parses a `--stage` value.
    pub fn from_name(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Builds the firmware for `board` (release, `aarch64-unknown-none`) and returns the ELF's path.
///
/// Uses its own target directory (`target/firmware`) so that it can run from inside `cargo test` without waiting
/// for the outer build's lock.
///
/// # Errors
/// The build's output when cargo fails.
pub fn build_firmware(board: Board) -> Result<PathBuf, String> {
    build_firmware_package(board.name())
}

/// Builds the firmware crate `package` (a `boards/` binary of the same name, QEMU's or a hardware board's) for
/// aarch64-unknown-none in release, in `target/firmware`; returns the ELF's path.
///
/// # Errors
/// The build's output when it fails.
pub fn build_firmware_package(package: &str) -> Result<PathBuf, String> {
    let root = workspace_root();
    let target_dir = root.join("target/firmware");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(&root)
        .args(["build", "--release", "--target", "aarch64-unknown-none", "-p", package])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "firmware build failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(target_dir.join("aarch64-unknown-none/release").join(package))
}

/// [`build_firmware`] once per process, for tests that share one build.
///
/// # Panics
/// With the build's output when it fails.
pub fn firmware(board: Board) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<(Board, PathBuf)>>> = OnceLock::new();
    let cell = BUILT.get_or_init(|| Mutex::new(Vec::new()));
    let mut built = cell.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = built.iter().find(|(b, _)| *b == board) {
        return p.clone();
    }
    let path = build_firmware(board).unwrap_or_else(|e| panic!("{e}"));
    built.push((board, path.clone()));
    path
}

/// One boot of the firmware under QEMU.
#[derive(Clone, Debug)]
pub struct Run {
    /// The board.
    pub board: Board,
    /// The SMMU QEMU presents.
    pub stage: Stage,
    /// Scenario names; empty means the firmware's default (the demo).
    pub scenarios: Vec<String>,
    /// The stages the firmware is told to expect (normally `stage`; a test may lie to check that probe notices).
    pub expected_stage: Option<Stage>,
    /// edu's `dma_mask` property.
    pub edu_dma_mask: u64,
    /// The edu devices and where they sit (one on the root bus by default).
    pub edus: Vec<EduPlacement>,
    /// A raw disk image to attach as a `virtio-blk-pci` device with `iommu_platform=on` (its DMA goes through the
    /// SMMU) at the board's [`Board::virtio_device`] slot; see [`VirtioDisk`].
    pub virtio_disk: Option<PathBuf>,
    /// Guest RAM (`-m`), `1G` by default.
    pub memory: String,
    /// Wall-clock bound for the whole run.
    pub timeout: Duration,
    /// QEMU trace events to record (for example `smmuv3_record_event`).
    pub trace_events: Vec<String>,
    /// Further firmware settings by short name (fw_cfg `opt/smmuv3/<name>` on virt, `<name>=<value>` on the
    /// semihosting command line elsewhere), e.g. `("exit", "psci-off")`.
    pub settings: Vec<(String, String)>,
    /// Further QEMU arguments. A `-D FILE` among them is honoured: QEMU's trace goes there (and is read back from
    /// there) instead of to the harness's own file.
    pub extra_args: Vec<String>,
    /// Copy the console to this process's stdout as it arrives.
    pub echo: bool,
    /// Give the machine semihosting (`-semihosting-config enable=on,…`). Without it the firmware cannot return an
    /// exit status: it prints its RESULT line and powers off through PSCI. sbsa-ref then gets no configuration
    /// either (it travels on the semihosting command line), so it runs the default scenarios.
    pub semihosting: bool,
    /// virt's `gic-version` (3, which the firmware drives; 2, which it does not, so the SMMU is polled).
    pub gic_version: u8,
    /// CPUs (`-smp`), 1 by default. With more, the firmware is told how many (`cpus=N`), and on sbsa-ref, where
    /// QEMU starts every CPU at reset, each secondary is pointed at the firmware's ELF entry (its EL3 stub) with
    /// `-device loader,addr=<entry>,cpu-num=N`, where it waits for PSCI CPU_ON.
    pub smp: usize,
    /// Load the second image (`<board>-next`, the same firmware linked into the second image slot) beside the
    /// first and tell the firmware (`next-image=on`), so that a hand-off (`lu-noreset`) goes to a separate binary;
    /// without it the firmware enters itself again. On by default.
    pub next_image: bool,
}

/// Scenarios that drive two edu devices: the second sits behind a root port, so that the two differ in bus and
/// StreamID as devices of two slots of a real machine do.
pub const TWO_EDU_SCENARIOS: [&str; 2] = ["isolation", "smp-dma"];

/// The edu devices a run of `scenarios` needs: one on the root bus, and a second behind a root port when a
/// scenario of [`TWO_EDU_SCENARIOS`] is among them.
pub fn edus_for(scenarios: &[&str]) -> Vec<EduPlacement> {
    if scenarios.iter().any(|s| TWO_EDU_SCENARIOS.contains(s)) {
        vec![EduPlacement::RootBus, EduPlacement::RootPort]
    } else {
        vec![EduPlacement::RootBus]
    }
}

/// The trace events every test records: the SMMU's event records and command errors.
pub const SMMU_ERROR_TRACE_EVENTS: [&str; 2] = ["smmuv3_record_event", "smmuv3_cmdq_consume_error"];

/// Every QEMU this test process runs holds this lock: shared by [`Run::boot`], exclusive for [`Run::boot_alone`].
static QEMU_RUNS: std::sync::RwLock<()> = std::sync::RwLock::new(());

impl Run {
    /// A run of `scenarios` on `board` with the SMMU of `stage`, told the truth about the stage, with the SMMU's
    /// error trace recorded and a 120 s bound.
    pub fn new(board: Board, stage: Stage, scenarios: &[&str]) -> Self {
        Run {
            board,
            stage,
            scenarios: scenarios.iter().map(|s| s.to_string()).collect(),
            expected_stage: Some(stage),
            edu_dma_mask: board.default_edu_dma_mask(),
            edus: edus_for(scenarios),
            virtio_disk: None,
            memory: "1G".into(),
            timeout: Duration::from_secs(120),
            trace_events: SMMU_ERROR_TRACE_EVENTS.iter().map(|s| s.to_string()).collect(),
            settings: Vec::new(),
            extra_args: Vec::new(),
            echo: false,
            semihosting: true,
            gic_version: 3,
            next_image: true,
            smp: 1,
        }
    }

    /// The scenarios the firmware will run: those named, or the default list when none are, or when the board
    /// cannot be told (sbsa-ref without semihosting).
    pub fn asked_scenarios(&self) -> Vec<String> {
        let told = !self.scenarios.is_empty() && (self.semihosting || self.board == Board::QemuVirt);
        if told {
            self.scenarios.clone()
        } else {
            DEFAULT_SCENARIOS.iter().map(|s| s.to_string()).collect()
        }
    }

    /// The `-device` values of the run's edu devices and the bridges above them.
    fn edu_devices(&self) -> Vec<String> {
        self.edus
            .iter()
            .flat_map(|p| p.devices(self.board, self.edu_dma_mask))
            .collect()
    }

    /// The `-drive` and `-device` arguments of the run's virtio-blk disk, if it has one. `disable-legacy=on` leaves
    /// only the virtio 1.0 interface (device 1af4:1042, no I/O BAR); `iommu_platform=on` makes QEMU send the
    /// device's DMA (rings and buffers) through the SMMU.
    fn virtio_args(&self) -> Vec<String> {
        let Some(image) = &self.virtio_disk else {
            return Vec::new();
        };
        vec![
            "-drive".into(),
            format!("if=none,id=smmuv3-vdisk,format=raw,file={}", image.display()),
            "-device".into(),
            format!(
                "virtio-blk-pci,drive=smmuv3-vdisk,iommu_platform=on,disable-legacy=on,addr={}.0",
                self.board.virtio_device()
            ),
        ]
    }

    /// The second image beside `firmware` (`<name>-next` in the same directory), when [`Run::next_image`] asks for
    /// it and it exists.
    pub fn next_image_beside(&self, firmware: &Path) -> Option<PathBuf> {
        let name = firmware.file_name()?.to_str()?;
        let next = firmware.with_file_name(format!("{name}-next"));
        (self.next_image && next.is_file()).then_some(next)
    }

    /// The QEMU command line (without the trace file, which [`Run::execute`] adds).
    pub fn command(&self, firmware: &Path) -> Command {
        let mut c = Command::new(QEMU);
        let mut settings = self.settings.clone();
        let second = self.next_image_beside(firmware);
        if second.is_some() {
            settings.push(("next-image".into(), "on".into()));
        }
        let smp = self.smp.max(1);
        if smp > 1 {
            settings.push(("cpus".into(), smp.to_string()));
        }
        match self.board {
            Board::QemuVirt => {
                let machine = match self.stage {
                    Stage::Nested => "virt",
                    // Newer machine versions always present both stages; only virt-9.1 honours the property.
                    Stage::One | Stage::Two => "virt-9.1",
                };
                c.args([
                    "-M",
                    &format!(
                        "{machine},virtualization=on,iommu=smmuv3,gic-version={}",
                        self.gic_version
                    ),
                ]);
                c.args(["-global", &format!("arm-smmuv3.stage={}", self.stage.name())]);
                c.args(["-cpu", "max", "-m", &self.memory, "-smp", &smp.to_string()]);
                c.args(["-device", &format!("loader,file={},cpu-num=0", firmware.display())]);
                if let Some(next) = &second {
                    // Without `cpu-num` the loader only copies the ELF into RAM: the first image starts it.
                    c.args(["-device", &format!("loader,file={}", next.display())]);
                }
                for device in self.edu_devices() {
                    c.args(["-device", &device]);
                }
                c.args(self.virtio_args());
                if !self.scenarios.is_empty() {
                    // QEMU's option parser takes ",," for a literal comma.
                    let list = self.scenarios.join(",,");
                    c.args(["-fw_cfg", &format!("name={SCENARIOS_KEY},string={list}")]);
                }
                if let Some(s) = self.expected_stage {
                    c.args(["-fw_cfg", &format!("name={STAGE_KEY},string={}", s.name())]);
                }
                c.args([
                    "-fw_cfg",
                    &format!("name={EDU_DMA_MASK_KEY},string={:#x}", self.edu_dma_mask),
                ]);
                for (name, value) in &settings {
                    c.args(["-fw_cfg", &format!("name=opt/smmuv3/{name},string={value}")]);
                }
                if self.semihosting {
                    c.args(["-semihosting-config", "enable=on,target=native"]);
                }
            }
            Board::SbsaRef => {
                // No fw_cfg: the configuration travels on the semihosting command line. The machine always adds a
                // bochs-display, whose VGA BIOS Debian ships in another package: without a ROM file it works the
                // same for this firmware.
                c.args([
                    "-M",
                    "sbsa-ref",
                    "-cpu",
                    "max",
                    "-m",
                    &self.memory,
                    "-smp",
                    &smp.to_string(),
                ]);
                c.args(["-global", "bochs-display.romfile="]);
                c.args(["-device", &format!("loader,file={},cpu-num=0", firmware.display())]);
                // QEMU starts every CPU at reset (no PSCI of its own here): the secondaries at the ELF's entry, the
                // EL3 stub, which keeps them until CPU_ON (without this they would spin in empty flash).
                if smp > 1 {
                    let entry = elf_entry(firmware).unwrap_or(0);
                    for cpu in 1..smp {
                        c.args(["-device", &format!("loader,addr={entry:#x},cpu-num={cpu}")]);
                    }
                }
                if let Some(next) = &second {
                    // Without `cpu-num` the loader only copies the ELF into RAM: the first image starts it.
                    c.args(["-device", &format!("loader,file={}", next.display())]);
                }
                for device in self.edu_devices() {
                    c.args(["-device", &device]);
                }
                c.args(self.virtio_args());
                let mut semihosting = String::from("enable=on,target=native,arg=sbsa-ref");
                if !self.scenarios.is_empty() {
                    semihosting.push_str(&format!(",arg=scenarios={}", self.scenarios.join(",,")));
                }
                if let Some(s) = self.expected_stage {
                    semihosting.push_str(&format!(",arg=stage={}", s.name()));
                }
                semihosting.push_str(&format!(",arg=edu-dma-mask={:#x}", self.edu_dma_mask));
                for (name, value) in &settings {
                    semihosting.push_str(&format!(",arg={name}={value}"));
                }
                if self.semihosting {
                    c.args(["-semihosting-config", &semihosting]);
                }
            }
        }
        c.args([
            "-display", "none", "-serial", "stdio", "-monitor", "none", "-nic", "none",
        ]);
        c.args(&self.extra_args);
        c
    }

    /// For tests: checks QEMU (never installing it), builds this board's firmware once per process, boots it and
    /// returns what happened.
    ///
    /// # Panics
    /// When QEMU is missing or too old, the firmware does not build, or QEMU cannot be started.
    pub fn boot(&self) -> Outcome {
        let _shared = QEMU_RUNS.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.boot_now()
    }

    /// [`Run::boot`] with no other QEMU of this test process running: it waits until the runs under way end, and
    /// holds the others back until it ends. For a run whose result depends on the guest's wall-clock timing (a
    /// device timer that must not fire before the guest is ready), retried after a loaded machine made it
    /// inconclusive.
    pub fn boot_alone(&self) -> Outcome {
        let _exclusive = QEMU_RUNS.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.boot_now()
    }

    fn boot_now(&self) -> Outcome {
        if let Err(why) = ensure_qemu(false) {
            panic!("the QEMU tests need QEMU: {why}");
        }
        self.execute(&firmware(self.board)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The trace file the user named with `-D FILE` (or `-D=FILE`, `--D FILE`) among [`Run::extra_args`].
    pub fn user_trace_file(&self) -> Option<PathBuf> {
        let mut args = self.extra_args.iter();
        let mut found = None;
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-D" | "--D" => found = args.next().map(PathBuf::from),
                other => {
                    if let Some(file) = other.strip_prefix("-D=").or_else(|| other.strip_prefix("--D=")) {
                        found = Some(PathBuf::from(file));
                    }
                }
            }
        }
        found
    }

    /// The full QEMU command line ([`Run::command`] with the trace events enabled) and where the trace goes: the
    /// user's `-D` file when [`Run::extra_args`] names one (then no second `-D` is added, so the user's wins), else
    /// a file under `target/qemu-traces/`. `None` when nothing is traced.
    ///
    /// # Errors
    /// When the trace directory cannot be created.
    pub fn traced_command(&self, firmware: &Path) -> Result<(Command, Option<PathBuf>), String> {
        let mut command = self.command(firmware);
        if let Some(file) = self.user_trace_file() {
            for event in &self.trace_events {
                command.args(["-trace", &format!("enable={event}")]);
            }
            return Ok((command, Some(file)));
        }
        if self.trace_events.is_empty() {
            return Ok((command, None));
        }
        let dir = workspace_root().join("target/qemu-traces");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let file = dir.join(format!(
            "{}-{}-{}-{:?}.log",
            self.board.name(),
            self.stage.name(),
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_file(&file);
        for event in &self.trace_events {
            command.args(["-trace", &format!("enable={event}")]);
        }
        command.args(["-D", &file.display().to_string()]);
        Ok((command, Some(file)))
    }

    /// Boots QEMU and waits for it to exit or for the timeout (then kills it).
    ///
    /// # Errors
    /// When QEMU cannot be started.
    pub fn execute(&self, firmware: &Path) -> Result<Outcome, String> {
        let (mut command, trace_file) = self.traced_command(firmware)?;
        let commandline = format!("{command:?}");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {QEMU}: {e}"))?;
        let console = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let echo = self.echo;
        let sink = Arc::clone(&console);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if echo {
                    println!("{line}");
                    let _ = std::io::stdout().flush();
                }
                let mut c = sink.lock().unwrap_or_else(|e| e.into_inner());
                c.push_str(&line);
                c.push('\n');
            }
        });
        let mut stderr = child.stderr.take().ok_or("no stderr")?;
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let started = Instant::now();
        let mut timed_out = false;
        let status: Option<ExitStatus> = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if started.elapsed() > self.timeout => {
                    timed_out = true;
                    let _ = child.kill();
                    break child.wait().ok();
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break None,
            }
        };
        let _ = reader.join();
        let stderr = err_reader.join().unwrap_or_default();
        let trace = trace_file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .unwrap_or_default();
        let console = console.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Ok(Outcome {
            asked: self.asked_scenarios(),
            commandline,
            console,
            stderr,
            exit_code: if timed_out { None } else { status.and_then(|s| s.code()) },
            timed_out,
            elapsed: started.elapsed(),
            trace,
            trace_file,
        })
    }
}

/// The entry point of a 64-bit little-endian ELF file (`e_entry`), `None` when the file is not one.
pub fn elf_entry(path: &Path) -> Option<u64> {
    let mut header = [0u8; 32];
    std::fs::File::open(path).ok()?.read_exact(&mut header).ok()?;
    let is_elf64_le = header.starts_with(b"\x7fELF") && header[4] == 2 && header[5] == 1;
    is_elf64_le.then(|| u64::from_le_bytes(header[24..32].try_into().unwrap_or_default()))
}

/// One `SCENARIO <name> PASS|FAIL: <reason>` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScenarioResult {
    /// The scenario.
    pub name: String,
    /// `Ok` for PASS, `Err(reason)` for FAIL.
    pub result: Result<(), String>,
}

/// The firmware's summary line, `RESULT PASS|FAIL <passed>/<asked>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunResult {
    /// PASS (the run's status was 0) or FAIL.
    pub pass: bool,
    /// Scenarios that passed.
    pub passed: usize,
    /// Scenarios asked for.
    pub asked: usize,
}

impl fmt::Display for RunResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.pass { "PASS" } else { "FAIL" };
        write!(f, "RESULT {verdict} {}/{}", self.passed, self.asked)
    }
}

/// Parses the last `RESULT PASS|FAIL <passed>/<asked>` line of console text (the exact form; anything else on the
/// line makes it no RESULT line).
pub fn run_result(console: &str) -> Option<RunResult> {
    console.lines().rev().find_map(|line| {
        let mut words = line.trim_end_matches('\r').strip_prefix("RESULT ")?.split(' ');
        let pass = match words.next()? {
            "PASS" => true,
            "FAIL" => false,
            _ => return None,
        };
        let (passed, asked) = words.next()?.split_once('/')?;
        if words.next().is_some() {
            return None;
        }
        Some(RunResult {
            pass,
            passed: passed.parse().ok()?,
            asked: asked.parse().ok()?,
        })
    })
}

/// The names in `asked` that printed no SCENARIO line, counting repeats: a name asked twice needs two lines.
pub fn missing_scenarios(asked: &[String], results: &[ScenarioResult]) -> Vec<String> {
    let mut unclaimed: Vec<&str> = results.iter().map(|r| r.name.as_str()).collect();
    let mut missing = Vec::new();
    for name in asked {
        match unclaimed.iter().position(|n| n == name) {
            Some(i) => {
                unclaimed.swap_remove(i);
            }
            None => missing.push(name.clone()),
        }
    }
    missing
}

/// What a run produced.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The scenarios the run asked for ([`Run::asked_scenarios`]).
    pub asked: Vec<String>,
    /// The QEMU command line, for reports.
    pub commandline: String,
    /// Everything the firmware printed.
    pub console: String,
    /// QEMU's own messages.
    pub stderr: String,
    /// QEMU's exit status (the firmware's semihosting exit code); `None` on a timeout or a signal.
    pub exit_code: Option<i32>,
    /// The run hit its timeout and was killed.
    pub timed_out: bool,
    /// How long it took.
    pub elapsed: Duration,
    /// The QEMU trace (empty when no events were requested).
    pub trace: String,
    /// Where the trace was written.
    pub trace_file: Option<PathBuf>,
}

/// Parses the scenario lines out of console text.
pub fn scenario_results(console: &str) -> Vec<ScenarioResult> {
    console
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("SCENARIO ")?;
            let (name, verdict) = rest.split_once(' ')?;
            let result = if verdict == "PASS" || verdict.starts_with("PASS ") {
                Ok(())
            } else {
                Err(verdict.strip_prefix("FAIL: ")?.to_string())
            };
            Some(ScenarioResult {
                name: name.to_string(),
                result,
            })
        })
        .collect()
}

impl Outcome {
    /// The scenario lines.
    pub fn scenarios(&self) -> Vec<ScenarioResult> {
        scenario_results(&self.console)
    }

    /// The result of one scenario, if it printed one.
    pub fn scenario(&self, name: &str) -> Option<Result<(), String>> {
        self.scenarios().into_iter().find(|s| s.name == name).map(|s| s.result)
    }

    /// The SMMU event records QEMU traced (`smmuv3_record_event` lines): the event type names.
    pub fn smmu_events(&self) -> Vec<String> {
        self.trace
            .lines()
            .filter_map(|l| {
                l.split_once("smmuv3_record_event ")
                    .map(|(_, rest)| rest.trim().to_string())
            })
            .collect()
    }

    /// The summary line, if the firmware printed one.
    pub fn result(&self) -> Option<RunResult> {
        run_result(&self.console)
    }

    /// The scenarios asked for that printed no SCENARIO line.
    pub fn missing_scenarios(&self) -> Vec<String> {
        missing_scenarios(&self.asked, &self.scenarios())
    }

    /// Whether the run passed, judged as a host must when the exit status may not carry the verdict (no
    /// semihosting): QEMU exited by itself with status 0, every scenario asked printed a SCENARIO line and none
    /// failed, and the firmware's RESULT line says PASS for all of them.
    ///
    /// # Errors
    /// What went wrong, first found first.
    pub fn verdict(&self) -> Result<(), String> {
        if self.timed_out {
            return Err(format!("QEMU did not exit within {:?}", self.elapsed));
        }
        match self.exit_code {
            Some(0) => {}
            Some(code) => return Err(format!("the firmware exited with status {code}")),
            None => return Err("QEMU was killed by a signal".into()),
        }
        let missing = self.missing_scenarios();
        if !missing.is_empty() {
            return Err(format!(
                "{} of {} scenario(s) asked printed no SCENARIO line: {}",
                missing.len(),
                self.asked.len(),
                missing.join(", ")
            ));
        }
        let failed: Vec<String> = self
            .scenarios()
            .into_iter()
            .filter(|s| s.result.is_err())
            .map(|s| s.name)
            .collect();
        if !failed.is_empty() {
            return Err(format!("failed scenario(s): {}", failed.join(", ")));
        }
        let expected = RunResult {
            pass: true,
            passed: self.asked.len(),
            asked: self.asked.len(),
        };
        match self.result() {
            Some(result) if result == expected => Ok(()),
            Some(result) => Err(format!("the firmware says {result}, expected {expected}")),
            None => Err("the firmware printed no RESULT line".into()),
        }
    }

    /// The global errors QEMU's SMMU raised (`smmuv3_write_gerror` lines; not the acknowledgements,
    /// `smmuv3_write_gerrorn`).
    pub fn gerror_writes(&self) -> Vec<String> {
        let prefix = format!("{GERROR_TRACE_EVENT} ");
        self.trace
            .lines()
            .filter_map(|l| l.split_once(prefix.as_str()).map(|(_, rest)| rest.trim().to_string()))
            .collect()
    }

    /// The command errors QEMU traced (`smmuv3_cmdq_consume_error` lines).
    pub fn command_errors(&self) -> Vec<String> {
        self.trace
            .lines()
            .filter_map(|l| {
                l.split_once("smmuv3_cmdq_consume_error ")
                    .map(|(_, rest)| rest.trim().to_string())
            })
            .collect()
    }

    /// Asserts that the console shows each of `lines` (substrings), with the report when one is missing.
    ///
    /// # Panics
    /// With [`Outcome::report`] when a line is missing.
    pub fn assert_console_shows(&self, lines: &[&str]) {
        for line in lines {
            assert!(
                self.console.contains(line),
                "the console shows {line:?}\n{}",
                self.report()
            );
        }
    }

    /// A report of the run for a failing assertion.
    pub fn report(&self) -> String {
        format!(
            "command: {}\nasked: {}\nexit: {:?} (timed out: {}) after {:?}\n--- console ---\n{}--- QEMU stderr ---\n{}\n--- trace ({}) ---\n{}",
            self.commandline,
            self.asked.join(","),
            self.exit_code,
            self.timed_out,
            self.elapsed,
            self.console,
            self.stderr,
            self.trace_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            self.trace.lines().take(40).collect::<Vec<_>>().join("\n")
        )
    }

    /// Asserts that each of `names` printed PASS, that every scenario line is a PASS, that the firmware exited with
    /// status 0, and that QEMU's SMMU recorded no event and no command error: nothing was provoked.
    ///
    /// # Panics
    /// With [`Outcome::report`] when any of that does not hold.
    pub fn assert_passed(&self, names: &[&str]) {
        self.assert_passed_provoking(names, |_| false, 0);
    }

    /// As [`Outcome::assert_passed`], for runs whose scenarios provoke SMMU events and command errors on purpose:
    /// every event QEMU traced must satisfy `expected_event` (given the trace text, e.g. `C_BAD_STE sid=0x10`), and
    /// exactly `command_errors` command errors must have been traced.
    ///
    /// # Panics
    /// With [`Outcome::report`] when any of that does not hold.
    pub fn assert_passed_provoking(
        &self,
        names: &[&str],
        expected_event: impl Fn(&str) -> bool,
        command_errors: usize,
    ) {
        for name in names {
            match self.scenario(name) {
                Some(Ok(())) => {}
                Some(Err(reason)) => panic!("scenario {name} failed: {reason}\n{}", self.report()),
                None => panic!("scenario {name} printed no result\n{}", self.report()),
            }
        }
        let failed: Vec<_> = self.scenarios().into_iter().filter(|s| s.result.is_err()).collect();
        assert!(failed.is_empty(), "failed scenarios: {failed:?}\n{}", self.report());
        assert_eq!(self.exit_code, Some(0), "firmware exit status\n{}", self.report());
        if let Err(why) = self.verdict() {
            panic!("{why}\n{}", self.report());
        }
        let errors = self.command_errors();
        assert_eq!(
            errors.len(),
            command_errors,
            "QEMU traced command errors: {errors:?}\n{}",
            self.report()
        );
        let unexpected: Vec<String> = self.smmu_events().into_iter().filter(|e| !expected_event(e)).collect();
        assert!(
            unexpected.is_empty(),
            "QEMU traced unexpected SMMU events: {unexpected:?}\n{}",
            self.report()
        );
    }
}

/// Boots `board` with `probe` and `psci-reset` and the run ending in PSCI SYSTEM_OFF, and asserts the whole round
/// trip through the board's PSCI (QEMU's on virt, the EL3 stub elsewhere): SYSTEM_RESET with the SMMU enabled, a
/// second boot that finds the note and the SMMU reset, SYSTEM_OFF ending QEMU with status 0.
///
/// # Panics
/// With the run's report when any of that does not hold.
pub fn assert_psci_reset_and_power_off(board: Board) {
    let mut run = Run::new(board, Stage::Nested, &["probe", "psci-reset"]);
    run.settings.push(("exit".into(), "psci-off".into()));
    let outcome = run.boot();
    outcome.assert_passed(&["probe", "psci-reset"]);
    outcome.assert_console_shows(&[
        "PSCI 1.1 through SMC; SYSTEM_OFF and SYSTEM_RESET supported",
        "SMMU left enabled (SMMUEN 1) for the reset",
        "resetting through PSCI SYSTEM_RESET",
        "back after PSCI SYSTEM_RESET",
        "SMMU is in its reset state (SMMUEN 0",
        "powering off through PSCI SYSTEM_OFF",
    ]);
    assert_eq!(
        outcome.console.matches("smmuv3 firmware on").count(),
        2,
        "two boots\n{}",
        outcome.report()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(asked: &[&str], console: &str, exit_code: Option<i32>) -> Outcome {
        Outcome {
            asked: asked.iter().map(|s| s.to_string()).collect(),
            commandline: String::new(),
            console: console.to_string(),
            stderr: String::new(),
            exit_code,
            timed_out: false,
            elapsed: Duration::from_secs(1),
            trace: String::new(),
            trace_file: None,
        }
    }

    #[test]
    fn a_run_that_printed_fewer_scenario_lines_than_asked_fails() {
        // The old firmware cut a long list at 512 bytes and still exited 0 with a clean summary.
        let console = "SCENARIO probe PASS (1 us)\nSCENARIO init PASS (2 us)\nRESULT PASS 2/2\n";
        let run = outcome(&["probe", "init", "bypass"], console, Some(0));
        assert_eq!(run.missing_scenarios(), ["bypass"]);
        let why = run.verdict().unwrap_err();
        assert!(
            why.contains("1 of 3 scenario(s) asked printed no SCENARIO line: bypass"),
            "{why}"
        );
    }

    #[test]
    fn a_name_asked_twice_needs_two_scenario_lines() {
        let asked: Vec<String> = ["probe", "probe"].iter().map(|s| s.to_string()).collect();
        let one = scenario_results("SCENARIO probe PASS (1 us)\n");
        assert_eq!(missing_scenarios(&asked, &one), ["probe"]);
        let two = scenario_results("SCENARIO probe PASS (1 us)\nSCENARIO probe PASS (1 us)\n");
        assert!(missing_scenarios(&asked, &two).is_empty());
    }

    #[test]
    fn a_complete_run_with_result_pass_passes() {
        let console = "SCENARIO probe PASS (1 us)\nSCENARIO init PASS (2 us)\nRESULT PASS 2/2\n";
        assert_eq!(outcome(&["probe", "init"], console, Some(0)).verdict(), Ok(()));
    }

    #[test]
    fn result_fail_is_a_failure_even_when_qemu_exits_0() {
        // Without semihosting PSCI SYSTEM_OFF ends every run with status 0: the RESULT line is the verdict.
        let console = "SCENARIO probe PASS (1 us)\nSCENARIO x FAIL: unknown scenario 'x'\nRESULT FAIL 1/2\n";
        let why = outcome(&["probe", "x"], console, Some(0)).verdict().unwrap_err();
        assert!(why.contains("failed scenario(s): x"), "{why}");
        let console = "SCENARIO probe PASS (1 us)\nRESULT FAIL 1/1\n";
        let why = outcome(&["probe"], console, Some(0)).verdict().unwrap_err();
        assert!(why.contains("says RESULT FAIL 1/1, expected RESULT PASS 1/1"), "{why}");
    }

    #[test]
    fn a_run_without_a_result_line_fails() {
        let why = outcome(&["probe"], "SCENARIO probe PASS (1 us)\n", Some(0))
            .verdict()
            .unwrap_err();
        assert!(why.contains("no RESULT line"), "{why}");
    }

    #[test]
    fn the_result_line_is_parsed_only_in_its_exact_form() {
        assert_eq!(
            run_result("x\nRESULT PASS 6/6\n"),
            Some(RunResult {
                pass: true,
                passed: 6,
                asked: 6
            })
        );
        assert_eq!(
            run_result("RESULT FAIL 0/0"),
            Some(RunResult {
                pass: false,
                passed: 0,
                asked: 0
            })
        );
        assert_eq!(run_result("RESULT PASS 6/6 extra"), None);
        assert_eq!(run_result("RESULT OK 6/6"), None);
        assert_eq!(run_result("  RESULT PASS 6/6"), None);
        assert_eq!(
            RunResult {
                pass: false,
                passed: 1,
                asked: 2
            }
            .to_string(),
            "RESULT FAIL 1/2"
        );
    }

    #[test]
    fn the_users_trace_file_wins_over_the_harness_one() {
        let mut run = Run::new(Board::QemuVirt, Stage::Nested, &["probe"]);
        run.extra_args = vec!["-D".into(), "/tmp/mine.log".into(), "-d".into(), "guest_errors".into()];
        assert_eq!(run.user_trace_file(), Some(PathBuf::from("/tmp/mine.log")));
        let (command, file) = run.traced_command(Path::new("fw.elf")).unwrap();
        assert_eq!(file, Some(PathBuf::from("/tmp/mine.log")));
        let args: Vec<String> = command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(args.iter().filter(|a| *a == "-D").count(), 1, "{args:?}");
        let d = args.iter().position(|a| a == "-D").unwrap();
        assert_eq!(args[d + 1], "/tmp/mine.log");
        // The harness's events are still enabled, into the user's file.
        assert!(args.contains(&"enable=smmuv3_record_event".to_string()), "{args:?}");
        run.extra_args = vec!["-D=/tmp/other.log".into()];
        assert_eq!(run.user_trace_file(), Some(PathBuf::from("/tmp/other.log")));
    }

    #[test]
    fn without_a_user_trace_file_the_harness_names_one() {
        let run = Run::new(Board::QemuVirt, Stage::Nested, &["probe"]);
        assert_eq!(run.user_trace_file(), None);
        let (command, file) = run.traced_command(Path::new("fw.elf")).unwrap();
        let file = file.unwrap();
        assert!(file.starts_with(workspace_root().join("target/qemu-traces")));
        let args: Vec<String> = command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(args.iter().filter(|a| *a == "-D").count(), 1, "{args:?}");
    }

    #[test]
    fn gerror_writes_are_counted_apart_from_their_acknowledgements() {
        let mut run = outcome(&[], "", Some(0));
        run.trace = "123@1.000001:smmuv3_write_gerror toggled=0x1, new GERROR=0x1\n\
                     123@1.000002:smmuv3_write_gerrorn acked=0x1, new GERRORN=0x1\n\
                     smmuv3_write_gerror toggled=0x4, new GERROR=0x5\n"
            .into();
        assert_eq!(
            run.gerror_writes(),
            ["toggled=0x1, new GERROR=0x1", "toggled=0x4, new GERROR=0x5"]
        );
    }

    #[test]
    fn a_virtio_disk_becomes_an_iommu_platform_device_at_the_next_slot() {
        for board in Board::ALL {
            let mut run = Run::new(board, Stage::Nested, &["virtio-dma"]);
            let args = |run: &Run| -> Vec<String> {
                run.command(Path::new("fw.elf"))
                    .get_args()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect()
            };
            assert!(!args(&run).iter().any(|a| a.starts_with("virtio-blk-pci")));
            run.virtio_disk = Some(PathBuf::from("/tmp/disk.img"));
            let args = args(&run);
            assert!(args.contains(&"if=none,id=smmuv3-vdisk,format=raw,file=/tmp/disk.img".to_string()));
            let device = format!(
                "virtio-blk-pci,drive=smmuv3-vdisk,iommu_platform=on,disable-legacy=on,addr={}.0",
                board.edu_device() + 1
            );
            assert!(args.contains(&device), "{args:?}");
            assert_eq!(board.virtio_stream_id(), board.edu_stream_id() + 8);
        }
    }

    #[test]
    fn a_virtio_disk_image_holds_the_host_pattern_only_where_agreed() {
        let disk = VirtioDisk::create("harness-unit");
        let host = disk.sector(VirtioDisk::HOST_SECTOR);
        assert_eq!(&host[..16], b"smmuv3 host disk");
        assert!(host.iter().enumerate().all(|(i, &b)| b == VirtioDisk::host_byte(i)));
        assert!(disk.sector(VirtioDisk::WRITE_SECTOR).iter().all(|&b| b == 0));
        assert!(!disk.holds_written_pattern());
        let path = disk.path.clone();
        drop(disk);
        assert!(!path.exists());
    }

    #[test]
    fn a_run_without_semihosting_leaves_the_option_out() {
        for board in Board::ALL {
            let mut run = Run::new(board, Stage::Nested, &["probe"]);
            let has = |run: &Run| {
                run.command(Path::new("fw.elf"))
                    .get_args()
                    .any(|a| a == "-semihosting-config")
            };
            assert!(has(&run));
            run.semihosting = false;
            assert!(!has(&run), "{board:?}");
        }
        // sbsa-ref's configuration travels on the semihosting command line: without it the default list runs.
        let mut run = Run::new(Board::SbsaRef, Stage::Nested, &["probe"]);
        run.semihosting = false;
        assert_eq!(run.asked_scenarios(), DEFAULT_SCENARIOS);
    }

    #[test]
    fn scenarios_that_drive_two_edus_get_a_second_behind_a_root_port() {
        for (scenarios, edus) in [
            (&["s1-dma"][..], vec![EduPlacement::RootBus]),
            (&[][..], vec![EduPlacement::RootBus]),
            (
                &["probe", "isolation"][..],
                vec![EduPlacement::RootBus, EduPlacement::RootPort],
            ),
            (&["smp-dma"][..], vec![EduPlacement::RootBus, EduPlacement::RootPort]),
        ] {
            assert_eq!(
                Run::new(Board::QemuVirt, Stage::Nested, scenarios).edus,
                edus,
                "{scenarios:?}"
            );
        }
    }

    #[test]
    fn smp_gives_qemu_the_cpus_and_tells_the_firmware() {
        let args = |run: &Run, firmware: &Path| -> Vec<String> {
            run.command(firmware)
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        let smp_value = |args: &[String]| args[args.iter().position(|a| a == "-smp").unwrap() + 1].clone();
        // An ELF header whose entry is 0x10000200000 (the sbsa-ref image's EL3 stub sits at its start).
        let dir = workspace_root().join("target/harness-unit");
        std::fs::create_dir_all(&dir).unwrap();
        let elf = dir.join(format!("entry-{}.elf", std::process::id()));
        let mut header = vec![0u8; 64];
        header[..4].copy_from_slice(b"\x7fELF");
        header[4] = 2;
        header[5] = 1;
        header[24..32].copy_from_slice(&0x100_0020_0000u64.to_le_bytes());
        std::fs::write(&elf, &header).unwrap();
        assert_eq!(elf_entry(&elf), Some(0x100_0020_0000));
        for board in Board::ALL {
            let mut run = Run::new(board, Stage::Nested, &["smp-hello"]);
            let single = args(&run, &elf);
            assert_eq!(smp_value(&single), "1");
            assert!(!single.iter().any(|a| a.contains("cpus=")), "{single:?}");
            assert!(!single.iter().any(|a| a.starts_with("loader,addr=")), "{single:?}");
            run.smp = 4;
            let four = args(&run, &elf);
            assert_eq!(smp_value(&four), "4");
            let loaders: Vec<&String> = four.iter().filter(|a| a.starts_with("loader,addr=")).collect();
            match board {
                Board::QemuVirt => {
                    // QEMU's own PSCI keeps the secondaries off until CPU_ON.
                    assert!(loaders.is_empty(), "{four:?}");
                    assert!(four.contains(&"name=opt/smmuv3/cpus,string=4".to_string()), "{four:?}");
                }
                Board::SbsaRef => {
                    assert_eq!(
                        loaders,
                        [1, 2, 3]
                            .map(|cpu| format!("loader,addr=0x10000200000,cpu-num={cpu}"))
                            .iter()
                            .collect::<Vec<_>>()
                    );
                    assert!(four.iter().any(|a| a.contains(",arg=cpus=4")), "{four:?}");
                }
            }
        }
        let _ = std::fs::remove_file(&elf);
        assert_eq!(elf_entry(Path::new("/nonexistent")), None);
    }
}
