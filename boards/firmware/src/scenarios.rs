//! The on-target scenarios. Each prints `SCENARIO <name> PASS` or `SCENARIO <name> FAIL: <reason>` (a contract
//! with the host harness) and the run's exit status says whether all passed.

// A failure carries its formatted reason inline (no allocator in the firmware); the 256-byte `Err` is returned
// once per scenario, off any hot path.
#![allow(clippy::result_large_err)]

use core::fmt::Write;
use core::ptr::NonNull;

use smmuv3::Smmu;

use crate::config::Config;
use crate::dt::Platform;
use crate::edu::{self, Direction, Edu};
use crate::pci::{Ecam, Function};
use crate::{power, println, time};

/// A scenario's failure reason.
pub type Failure = heapless::String<256>;

/// What a scenario sees of the machine.
pub struct Context<'a> {
    /// The platform description.
    pub platform: &'a Platform,
    /// Configuration space access.
    pub ecam: &'a Ecam,
    /// The enumerated PCI functions.
    pub functions: &'a [Function],
    /// The host's configuration.
    pub config: &'a Config,
}

/// Builds a [`Failure`] from format arguments and returns it from the enclosing scenario.
macro_rules! fail {
    ($($arg:tt)*) => {{
        let mut reason = Failure::new();
        let _ = write!(reason, $($arg)*);
        return Err(reason)
    }};
}

type Scenario = fn(&mut Context) -> Result<(), Failure>;

/// Every scenario the firmware knows, by its contract name.
pub const SCENARIOS: &[(&str, Scenario)] = &[
    ("probe", probe),
    ("edu-ident", edu_ident),
    ("init", core_smmu::init),
    ("abort-default", core_smmu::abort_default),
    ("bypass", core_smmu::bypass),
    ("cmdq-error", core_smmu::cmdq_error),
    ("evtq-overflow", core_smmu::evtq_overflow),
    ("pgtable-dma", translate::pgtable_dma),
    ("psci-reset", psci_reset),
    ("el3-fault-report", el3_fault_report),
];

mod core_smmu;
mod translate;

/// Runs the named scenarios in order; returns how many failed.
pub fn run_all(context: &mut Context) -> usize {
    let mut failed = 0;
    let mut count = 0;
    crate::finish::set_asked(context.config.scenario_names().count());
    for name in context.config.scenario_names() {
        count += 1;
        let start = time::ticks();
        let outcome = match SCENARIOS.iter().find(|(n, _)| *n == name) {
            Some((_, scenario)) => scenario(context),
            None => {
                let mut reason = Failure::new();
                let _ = write!(reason, "unknown scenario '{name}' (known:");
                for (n, _) in SCENARIOS {
                    let _ = write!(reason, " {n}");
                }
                let _ = write!(reason, ")");
                Err(reason)
            }
        };
        let micros = time::to_us(time::ticks() - start);
        match outcome {
            Ok(()) => {
                crate::finish::record_pass();
                println!("SCENARIO {name} PASS ({micros} us)");
            }
            Err(reason) => {
                failed += 1;
                println!("SCENARIO {name} FAIL: {reason}");
            }
        }
    }
    println!("scenarios: {} passed, {} failed", count - failed, failed);
    failed
}

fn smmu(context: &Context) -> Result<Smmu, Failure> {
    let desc = &context.platform.smmu;
    let Some(base) = NonNull::new(desc.base as *mut u8) else {
        fail!("SMMU at address 0")
    };
    // SAFETY: the board identity-maps the SMMU's register space as device memory; scenarios run one at a time,
    // so nothing else programs the SMMU while this handle lives.
    match unsafe { Smmu::probe(base, desc.size) } {
        Ok(mut smmu) => {
            let cohacc = smmu.features().coherent;
            let coherent = desc.dma_coherent && !context.config.non_coherent;
            static SAID: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
            if smmu.apply_board_coherency(coherent) && !SAID.swap(true, core::sync::atomic::Ordering::Relaxed) {
                println!(
                    "  IDR0.COHACC {} overridden: dma-coherent {} ({})",
                    cohacc as u8,
                    coherent,
                    if context.config.non_coherent {
                        "the host asked for non-coherent walks"
                    } else {
                        "the board says so"
                    }
                );
            }
            Ok(smmu)
        }
        Err(e) => fail!("probe: {e}"),
    }
}

/// `probe`: read and decode the ID registers; the stages must be those the host started QEMU with.
fn probe(context: &mut Context) -> Result<(), Failure> {
    let smmu = smmu(context)?;
    let desc = &context.platform.smmu;
    println!(
        "SMMU at {:#x} (size {:#x}), board says dma-coherent: {}",
        desc.base, desc.size, desc.dma_coherent
    );
    let irq = desc.interrupts;
    println!(
        "  interrupts: eventq {:?} priq {:?} cmdq-sync {:?} gerror {:?} ({})",
        irq.eventq,
        irq.priq,
        irq.cmdq_sync,
        irq.gerror,
        if irq.edge_triggered { "edge" } else { "level" }
    );
    for line in FeatureLines::new(smmu.features()) {
        println!("  {line}");
    }
    println!(
        "  state: SMMUEN {}, GBPA.ABORT {} ({})",
        smmu.is_enabled() as u8,
        smmu.global_bypass_aborts() as u8,
        if smmu.is_enabled() {
            "translating"
        } else if smmu.global_bypass_aborts() {
            "disabled, incoming DMA aborts"
        } else {
            "disabled, incoming DMA bypasses"
        }
    );
    match power::version() {
        Ok(version) => println!(
            "PSCI {version} through SMC; SYSTEM_OFF and SYSTEM_RESET {}",
            if power::off_and_reset_supported() {
                "supported"
            } else {
                "NOT supported"
            }
        ),
        Err(e) => println!("PSCI through SMC: {e:?}"),
    }
    let found = smmu.features().stages();
    match context.config.expected_stages {
        Some(expected) if expected != found => {
            fail!("QEMU was started for {expected} but the SMMU offers {found}")
        }
        Some(expected) => println!("  stages match the host's request ({expected})"),
        None => println!("  the host named no expected stages"),
    }
    Ok(())
}

/// Splits the multi-line features report into lines without an allocator.
struct FeatureLines {
    text: heapless::String<2048>,
    position: usize,
}

impl FeatureLines {
    fn new(features: &smmuv3::Features) -> Self {
        let mut text = heapless::String::new();
        let _ = write!(text, "{features}");
        FeatureLines { text, position: 0 }
    }
}

impl Iterator for FeatureLines {
    type Item = heapless::String<256>;
    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.text.get(self.position..)?;
        if rest.is_empty() {
            return None;
        }
        let line = rest.split('\n').next().unwrap_or_default();
        self.position += line.len() + 1;
        let mut out = heapless::String::new();
        let _ = out.push_str(line.get(..line.len().min(255)).unwrap_or_default());
        Some(out)
    }
}

/// Finds the edu device and wraps it.
fn find_edu(context: &Context) -> Result<Edu, Failure> {
    let Some(f) = context
        .functions
        .iter()
        .find(|f| f.vendor == edu::VENDOR && f.device == edu::DEVICE)
    else {
        fail!("no edu device (1234:11e8) on the PCI bus; start QEMU with -device edu")
    };
    let Some(bar0) = f.bars[0] else {
        fail!("edu at {} has no BAR0 assigned", f.bdf)
    };
    context.ecam.enable_memory_and_bus_master(f.bdf);
    // SAFETY: BAR0 was assigned by enumeration inside a window the board maps as device memory, and only this
    // scenario drives the device.
    Ok(unsafe { Edu::new(f.bdf, bar0, context.config.edu_dma_mask) })
}

/// A 4 KiB-aligned DMA buffer in the image's data.
#[repr(C, align(4096))]
struct DmaPage([u8; 4096]);

static mut EDU_PAGES: [DmaPage; 2] = [DmaPage([0; 4096]), DmaPage([0; 4096])];

/// `edu-ident`: the edu device answers (ident, liveness, factorial) and its DMA engine moves a pattern from RAM
/// into its buffer and back to another RAM page, through the SMMU in its reset state (translation disabled,
/// global bypass), so the bus addresses are physical addresses.
fn edu_ident(context: &mut Context) -> Result<(), Failure> {
    let edu = find_edu(context)?;
    let rid = edu.bdf().requester_id();
    let sid = context.platform.pcie.iommu_map.stream_id(rid);
    let (major, minor) = edu.identify().or_else(|e| fail!("{e}"))?;
    println!(
        "edu {} v{major}.{minor}: requester ID {rid:#x}, StreamID {sid:?}, DMA mask {:#x}",
        edu.bdf(),
        edu.dma_mask()
    );
    edu.check_liveness(0x5a5a_1234).or_else(|e| fail!("{e}"))?;
    match edu.factorial(10) {
        Ok(3_628_800) => {}
        Ok(other) => fail!("edu computed 10! = {other}"),
        Err(e) => fail!("{e}"),
    }
    let smmu = smmu(context)?;
    if smmu.is_enabled() || smmu.global_bypass_aborts() {
        fail!(
            "the SMMU is not in global bypass (SMMUEN {}, GBPA.ABORT {})",
            smmu.is_enabled() as u8,
            smmu.global_bypass_aborts() as u8
        )
    }
    let (from, to) = round_trip(&edu, 256)?;
    println!("edu DMA: 256 bytes {from:#x} -> edu buffer -> {to:#x}, verified");
    Ok(())
}

/// Moves a pattern from one RAM page into edu's buffer and back into another RAM page (bus addresses = physical
/// addresses: the stream must be untranslated), then checks every byte, and that nothing beyond `len` changed.
/// Returns the two pages' addresses.
fn round_trip(edu: &Edu, len: usize) -> Result<(u64, u64), Failure> {
    // SAFETY: scenarios run one at a time on one CPU, so this is the only reference to the pages while it lives.
    let pages = unsafe { &mut *core::ptr::addr_of_mut!(EDU_PAGES) };
    let [source, destination] = pages;
    for (i, b) in source.0.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7).wrapping_add(0x3c);
    }
    destination.0.fill(0xee);
    let source_pa = source.0.as_ptr() as u64;
    let destination_pa = destination.0.as_ptr() as u64;
    edu.dma(Direction::ToDevice, source_pa, 0, len as u64)
        .or_else(|e| fail!("RAM -> edu: {e}"))?;
    edu.dma(Direction::FromDevice, destination_pa, 0, len as u64)
        .or_else(|e| fail!("edu -> RAM: {e}"))?;
    // SAFETY: the device wrote this memory behind the compiler's back; read it volatile after the DSB in `dma`.
    let arrived = |i: usize| unsafe { core::ptr::read_volatile(&destination.0[i]) };
    if let Some(i) = (0..len).find(|&i| arrived(i) != source.0[i]) {
        fail!(
            "DMA round trip corrupted byte {i}: expected {:#x}, found {:#x}",
            source.0[i],
            arrived(i)
        )
    }
    if let Some(i) = (len..4096).find(|&i| arrived(i) != 0xee) {
        fail!("DMA wrote past its {len} bytes (byte {i} changed)")
    }
    Ok((source_pa, destination_pa))
}

/// Fills the destination page with `canary`, asks edu to write `len` bytes of its buffer there, and returns
/// whether the canary survived (the write was aborted) and the page's address.
fn dma_onto_canary(edu: &Edu, len: usize, canary: u8) -> Result<(bool, u64), Failure> {
    // SAFETY: as in `round_trip`.
    let pages = unsafe { &mut *core::ptr::addr_of_mut!(EDU_PAGES) };
    let destination = &mut pages[1];
    destination.0.fill(canary);
    let pa = destination.0.as_ptr() as u64;
    edu.dma(Direction::FromDevice, pa, 0, len as u64)
        .or_else(|e| fail!("edu -> RAM: {e}"))?;
    // SAFETY: as in `round_trip`.
    let intact = (0..4096).all(|i| unsafe { core::ptr::read_volatile(&destination.0[i]) } == canary);
    Ok((intact, pa))
}

/// `psci-reset`: the machine resets through PSCI SYSTEM_RESET and the firmware comes back. The first boot leaves a
/// note in the reset-persistent scratch RAM and resets with the SMMU enabled; the boot after it finds the note,
/// clears it, and checks that the reset was real: the SMMU is back in its reset state. On a board without firmware
/// underneath this is the EL3 stub's SMC service at work. It runs once per scenario list.
fn psci_reset(context: &mut Context) -> Result<(), Failure> {
    use core::sync::atomic::{AtomicBool, Ordering};
    // Once per boot: listed twice, the second would reset again after every comeback.
    static RAN: AtomicBool = AtomicBool::new(false);
    if RAN.swap(true, Ordering::SeqCst) {
        fail!("psci-reset runs once per scenario list")
    }
    let Some(note) = power::reset_note() else {
        // Reset with the SMMU translating: only a real reset turns it off again.
        let session = core_smmu::start(context, &smmuv3::InitOptions::default())?;
        if !session.is_enabled() {
            fail!("SMMUEN not acknowledged before the reset")
        }
        println!("  SMMU left enabled (SMMUEN 1) for the reset");
        core::mem::forget(session);
        // The note last, so that no failure above leaves one behind.
        power::set_reset_note(Some(power::ResetNote {
            magic: power::ResetNote::MAGIC,
            ticks: time::ticks(),
        }));
        power::system_reset()
    };
    power::set_reset_note(None);
    let smmu = smmu(context)?;
    if smmu.is_enabled() {
        fail!("the SMMU kept SMMUEN across the reset")
    }
    println!(
        "  back after PSCI SYSTEM_RESET: the note left at timer {} survived in RAM, the SMMU is in its reset state \
         (SMMUEN 0, GBPA.ABORT {})",
        note.ticks,
        smmu.global_bypass_aborts() as u8
    );
    Ok(())
}

/// `el3-fault-report`: the EL3 stub's report of an exception it does not expect. EL2 reads HCRX_EL2, which
/// SCR_EL3.HXEn = 0 traps to EL3 on a CPU with FEAT_HCX; the stub must print ESR_EL3 and end the run through
/// semihosting with status 5, so on a board with the stub this scenario never returns. It cannot pass where EL2
/// is the highest level (virt: no EL3, so nothing traps the read): there it fails saying so.
fn el3_fault_report(_context: &mut Context) -> Result<(), Failure> {
    use aarch64_cpu::registers::{ID_AA64MMFR1_EL1, Readable};
    if (ID_AA64MMFR1_EL1.get() >> 40) & 0xf == 0 {
        fail!("the CPU has no FEAT_HCX, so no HCRX_EL2 access traps to EL3")
    }
    println!("  reading HCRX_EL2 at EL2 (SCR_EL3.HXEn = 0 traps it to EL3)");
    let value: u64;
    // SAFETY: reading HCRX_EL2 has no side effect; where EL3 traps it, the run ends there.
    unsafe { core::arch::asm!("mrs {}, S3_4_C1_C2_2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    fail!("HCRX_EL2 read returned {value:#x}: no EL3 trapped it (this board has no EL3 stub)")
}
