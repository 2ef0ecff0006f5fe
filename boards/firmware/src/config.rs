//! Run configuration handed in by the host: which scenarios to run, which SMMU stages QEMU was asked for, and
//! the DMA mask QEMU gave edu. On QEMU virt it comes from fw_cfg files under `opt/smmuv3/`.

use core::str::FromStr;

use smmuv3::Stages;

use crate::edu;
use crate::fw_cfg::FwCfg;

/// Prefix of every fw_cfg file the firmware reads.
pub const KEY_PREFIX: &str = "opt/smmuv3/";
/// fw_cfg file naming the scenarios (a contract with the harness and outside checks).
pub const SCENARIOS_KEY: &str = "opt/smmuv3/scenarios";
/// fw_cfg file naming the stages QEMU's SMMU was configured with: `1`, `2` or `nested`.
pub const STAGE_KEY: &str = "opt/smmuv3/stage";
/// fw_cfg file giving edu's `dma_mask` property (hexadecimal with 0x, or decimal).
pub const EDU_DMA_MASK_KEY: &str = "opt/smmuv3/edu-dma-mask";
/// fw_cfg file overriding the board's word on the SMMU's coherency: `board` (the default) or `non-coherent` (table
/// walks and queues non-cacheable, the CPU cleaning what it writes), to run the non-coherent path on a coherent
/// machine.
pub const COHERENCY_KEY: &str = "opt/smmuv3/coherency";
/// fw_cfg file saying how a run that passed ends: `semihosting` (the default: exit status 0) or `psci-off`
/// (PSCI SYSTEM_OFF, which QEMU turns into exit status 0). A failed run always exits through semihosting.
pub const EXIT_KEY: &str = "opt/smmuv3/exit";

/// A host path to save the handover region to, through semihosting, at a hand-off (a warm reset or a jump into the
/// next image) after a scenario prepared it: what `cargo xtask qemu --dump-handover FILE` asks for.
pub const DUMP_HANDOVER_KEY: &str = "opt/smmuv3/dump-handover";
/// A host path to save the ACPI IORT to, through semihosting, as the firmware read it from fw_cfg's tables (QEMU
/// virt): a real table for the IORT reader's host tests.
pub const DUMP_IORT_KEY: &str = "opt/smmuv3/dump-iort";
/// The longest path [`DUMP_HANDOVER_KEY`] and [`DUMP_IORT_KEY`] take.
pub const MAX_PATH_BYTES: usize = crate::finish::MAX_HOST_PATH_BYTES;
/// fw_cfg file asking for DMA memory above 4 GiB: `on` makes the frame pool hand out only memory at or above
/// 4 GiB, so every queue, table and DMA buffer the scenarios use lies there (the run fails at boot when RAM does
/// not reach that high); `off` (the default) allocates from the end of the image upwards.
pub const DMA_ABOVE_4G_KEY: &str = "opt/smmuv3/dma-above-4g";
/// fw_cfg file saying a second image waits in the second image slot (the same firmware linked there, loaded with
/// `-device loader`): `on` makes `lu-noreset` hand off to it, a genuinely separate binary; `off` (the default)
/// enters this binary again.
pub const NEXT_IMAGE_KEY: &str = "opt/smmuv3/next-image";
/// fw_cfg file giving the number of CPUs the host started QEMU with (`-smp`), which scenarios that use every CPU
/// check against the CPUs the device tree lists.
pub const CPUS_KEY: &str = "opt/smmuv3/cpus";
/// The longest scenario list (and semihosting command line) the firmware takes, in bytes. The firmware has no
/// allocator: the list is read whole into a buffer of this size, and a longer one is refused rather than cut.
pub const MAX_LIST_BYTES: usize = 4096;

/// The scenarios run when the host names none: the demo.
pub const DEFAULT_SCENARIOS: &str = "probe,edu-ident,init,abort-default,bypass,pgtable-dma";

/// What the host asked for.
#[derive(Clone, Debug)]
pub struct Config {
    /// Scenario names separated by `,` (or spaces, `;`, `:`).
    pub scenarios: heapless::String<MAX_LIST_BYTES>,
    /// The stages QEMU was started with, when the host says.
    pub expected_stages: Option<Stages>,
    /// edu's DMA mask.
    pub edu_dma_mask: u64,
    /// End a run that passed with PSCI SYSTEM_OFF instead of a semihosting exit.
    pub power_off: bool,
    /// Treat the SMMU as non-coherent whatever the board says.
    pub non_coherent: bool,
    /// Allocate every frame at or above 4 GiB.
    pub dma_above_4g: bool,
    /// A second image waits in the second image slot ([`NEXT_IMAGE_KEY`]).
    pub next_image: bool,
    /// The CPUs the host started the machine with ([`CPUS_KEY`]), when it says.
    pub expected_cpus: Option<usize>,
    /// Where to save the handover region at a hand-off ([`DUMP_HANDOVER_KEY`]).
    pub dump_handover: Option<heapless::String<MAX_PATH_BYTES>>,
    /// Where to save the ACPI IORT ([`DUMP_IORT_KEY`]).
    pub dump_iort: Option<heapless::String<MAX_PATH_BYTES>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            scenarios: heapless::String::from_str(DEFAULT_SCENARIOS).unwrap_or_default(),
            expected_stages: None,
            edu_dma_mask: edu::DEFAULT_DMA_MASK,
            power_off: false,
            non_coherent: false,
            dma_above_4g: false,
            next_image: false,
            expected_cpus: None,
            dump_handover: None,
            dump_iort: None,
        }
    }
}

impl Config {
    /// The scenario names, in order.
    pub fn scenario_names(&self) -> impl Iterator<Item = &str> {
        names(&self.scenarios)
    }
}

/// The names in a scenario list, in order.
fn names(list: &str) -> impl Iterator<Item = &str> {
    list.split([',', ' ', ';', ':', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// The stages by the names of QEMU's `arm-smmuv3.stage` property (and `cargo xtask --stage`): `1`, `2`, `nested`.
fn stages_from_name(name: &str) -> Option<Stages> {
    match name {
        "1" => Some(Stages::STAGE1),
        "2" => Some(Stages::STAGE2),
        "nested" => Some(Stages::NESTED),
        _ => None,
    }
}

fn parse_u64(text: &str) -> Option<u64> {
    let t = text.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

/// Why the configuration could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// A value is not what its key expects.
    BadValue(&'static str),
    /// A file (or the semihosting command line) is longer than the firmware reads: refused, never cut.
    TooLong {
        /// What was too long.
        what: &'static str,
        /// Its size in bytes, when the source says (fw_cfg's directory does; semihosting does not).
        size: Option<usize>,
        /// The firmware's limit in bytes.
        limit: usize,
    },
    /// The scenario list names no scenario (empty, blanks or separators only).
    EmptyScenarioList,
    /// `/chosen/smmuv3,settings` is malformed.
    Chosen(smmuv3_board_dt::chosen::SettingsError),
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ConfigError::BadValue(key) => {
                write!(f, "setting {key} has a value the firmware cannot use")
            }
            ConfigError::TooLong {
                what,
                size: Some(size),
                limit,
            } => write!(
                f,
                "{what} is {size} bytes, more than the firmware's limit of {limit} bytes"
            ),
            ConfigError::TooLong {
                what,
                size: None,
                limit,
            } => {
                write!(f, "{what} is longer than the firmware's limit of {limit} bytes")
            }
            ConfigError::EmptyScenarioList => {
                write!(f, "the scenario list ({SCENARIOS_KEY}) names no scenario")
            }
            ConfigError::Chosen(e) => write!(f, "{e}"),
        }
    }
}

impl Config {
    /// Sets one setting by its short name (`scenarios`, `stage`, `edu-dma-mask`, `coherency`, `exit`, `dma-above-4g`, `next-image`, `cpus`, `dump-handover`: the fw_cfg key without its
    /// `opt/smmuv3/` prefix); unknown names are ignored.
    ///
    /// # Errors
    /// [`ConfigError::BadValue`] when the value does not parse; the configuration is then unchanged.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), ConfigError> {
        let value = value.trim_end_matches('\0').trim();
        match name {
            "scenarios" => {
                if names(value).next().is_none() {
                    return Err(ConfigError::EmptyScenarioList);
                }
                self.scenarios = heapless::String::from_str(value).map_err(|_| ConfigError::TooLong {
                    what: SCENARIOS_KEY,
                    size: Some(value.len()),
                    limit: MAX_LIST_BYTES,
                })?;
            }
            "stage" => {
                self.expected_stages = Some(stages_from_name(value).ok_or(ConfigError::BadValue(STAGE_KEY))?);
            }
            "edu-dma-mask" => {
                self.edu_dma_mask = parse_u64(value).ok_or(ConfigError::BadValue(EDU_DMA_MASK_KEY))?;
            }
            "coherency" => {
                self.non_coherent = match value {
                    "board" => false,
                    "non-coherent" => true,
                    _ => return Err(ConfigError::BadValue(COHERENCY_KEY)),
                };
            }
            "dma-above-4g" => {
                self.dma_above_4g = match value {
                    "on" => true,
                    "off" => false,
                    _ => return Err(ConfigError::BadValue(DMA_ABOVE_4G_KEY)),
                };
            }
            "next-image" => {
                self.next_image = match value {
                    "on" => true,
                    "off" => false,
                    _ => return Err(ConfigError::BadValue(NEXT_IMAGE_KEY)),
                };
            }
            "cpus" => {
                let cpus = parse_u64(value)
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|&n| n > 0)
                    .ok_or(ConfigError::BadValue(CPUS_KEY))?;
                self.expected_cpus = Some(cpus);
            }
            "dump-handover" => self.dump_handover = Some(host_path(DUMP_HANDOVER_KEY, value)?),
            "dump-iort" => self.dump_iort = Some(host_path(DUMP_IORT_KEY, value)?),
            "exit" => {
                self.power_off = match value {
                    "semihosting" => false,
                    "psci-off" => true,
                    _ => return Err(ConfigError::BadValue(EXIT_KEY)),
                };
            }
            _ => {}
        }
        Ok(())
    }
}

/// Reads the configuration from the fw_cfg device at `base`; missing files keep their defaults. Each file is read
/// whole, by the size its directory entry gives.
///
/// # Errors
/// [`ConfigError::BadValue`] for a file whose content does not parse, [`ConfigError::TooLong`] for a file larger
/// than [`MAX_LIST_BYTES`], [`ConfigError::EmptyScenarioList`] for a scenario list without a name.
///
/// # Safety
/// `base` must be QEMU's fw_cfg MMIO device, identity-mapped as device memory, used by nothing else.
pub unsafe fn from_fw_cfg(base: usize) -> Result<Config, ConfigError> {
    let mut config = Config::default();
    // SAFETY: the caller guarantees the device.
    let Some(mut fw_cfg) = (unsafe { FwCfg::new(base) }) else {
        return Ok(config);
    };
    let mut buffer = [0u8; MAX_LIST_BYTES];
    for key in [
        SCENARIOS_KEY,
        STAGE_KEY,
        EDU_DMA_MASK_KEY,
        COHERENCY_KEY,
        EXIT_KEY,
        DMA_ABOVE_4G_KEY,
        NEXT_IMAGE_KEY,
        CPUS_KEY,
        DUMP_HANDOVER_KEY,
        DUMP_IORT_KEY,
    ] {
        let Some(file) = fw_cfg.find(key) else { continue };
        if file.size as usize > buffer.len() {
            return Err(ConfigError::TooLong {
                what: key,
                size: Some(file.size as usize),
                limit: buffer.len(),
            });
        }
        let len = fw_cfg.read_file(file, &mut buffer);
        let text = core::str::from_utf8(&buffer[..len]).map_err(|_| ConfigError::BadValue(key))?;
        config.set(key.trim_start_matches(KEY_PREFIX), text)?;
    }
    Ok(config)
}

/// Reads the configuration from the semihosting command line, for boards without fw_cfg: arguments of the form
/// `scenarios=a,b`, `stage=nested`, `edu-dma-mask=0x…`, `coherency=non-coherent`, `exit=psci-off`, `dma-above-4g=on`, `next-image=on`,
/// `cpus=4` (QEMU: `-semihosting-config enable=on,arg=…`); other arguments (the program name) are ignored, missing settings
/// keep their defaults, and so does everything when the machine has no semihosting
/// ([`crate::finish::semihosting_absent`]).
///
/// # Errors
/// [`ConfigError::BadValue`] for a setting whose value does not parse or is not UTF-8; [`ConfigError::TooLong`]
/// when the host refuses the command line because it does not fit [`MAX_LIST_BYTES`] (SYS_GET_CMDLINE does not say
/// how long it is); [`ConfigError::EmptyScenarioList`] for a scenario list without a name.
pub fn from_semihosting() -> Result<Config, ConfigError> {
    let mut config = Config::default();
    let args = match semihosting::experimental::env::args::<MAX_LIST_BYTES>() {
        Ok(args) => args,
        Err(_) if crate::finish::semihosting_absent() => return Ok(config),
        // QEMU answers SYS_GET_CMDLINE with an error exactly when the line does not fit the buffer.
        Err(_) => {
            return Err(ConfigError::TooLong {
                what: "the semihosting command line",
                size: None,
                limit: MAX_LIST_BYTES,
            });
        }
    };
    for arg in &args {
        let arg = arg.map_err(|_| ConfigError::BadValue("semihosting command line"))?;
        if let Some((name, value)) = arg.split_once('=') {
            config.set(name, value)?;
        }
    }
    Ok(config)
}

/// Reads the settings a boot loader left in `/chosen` (`smmuv3,settings`, a list of `name=value` strings; see
/// [`smmuv3_board_dt::chosen`]) into `config`; `Ok(false)` when the tree has none.
///
/// # Errors
/// [`ConfigError::Chosen`] for a property that is not a list of UTF-8 strings, [`ConfigError::BadValue`] for a
/// setting whose value does not parse, [`ConfigError::EmptyScenarioList`] for a scenario list without a name.
pub fn from_chosen(fdt: &fdt::Fdt, config: &mut Config) -> Result<bool, ConfigError> {
    use smmuv3_board_dt::chosen;
    let Some(settings) = chosen::settings(fdt).map_err(ConfigError::Chosen)? else {
        return Ok(false);
    };
    for (name, value) in settings {
        config.set(name, value)?;
    }
    Ok(true)
}

/// A host path setting: not empty, at most [`MAX_PATH_BYTES`].
fn host_path(key: &'static str, value: &str) -> Result<heapless::String<MAX_PATH_BYTES>, ConfigError> {
    if value.is_empty() {
        return Err(ConfigError::BadValue(key));
    }
    heapless::String::from_str(value).map_err(|_| ConfigError::TooLong {
        what: key,
        size: Some(value.len()),
        limit: MAX_PATH_BYTES,
    })
}
