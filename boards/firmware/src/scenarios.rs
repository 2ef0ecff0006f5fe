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
    /// Configuration space access; `None` without a PCI host (then `functions` is empty).
    pub ecam: Option<&'a Ecam>,
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
    ("s1-dma", domains::s1_dma),
    ("s2-dma", domains::s2_dma),
    ("nested-dma", domains::nested_dma),
    ("unmapped-fault", domains::unmapped_fault),
    ("readonly-fault", domains::readonly_fault),
    ("unmap-invalidate", domains::unmap_invalidate),
    ("detach-aborts", domains::detach_aborts),
    ("isolation", domains::isolation),
    ("block-mappings", domains::block_mappings),
    ("virtio-dma", virtio_dma::virtio_dma),
    ("dma-map-bench", dma_map_bench::dma_map_bench),
    ("lu-s1", live_update::lu_s1),
    ("lu-tables", live_update::lu_tables),
    ("lu-big", live_update::lu_big),
    ("lu-scale", lu_scale::lu_scale),
    ("lu-scale-noreset", lu_scale::lu_scale_noreset),
    ("lu-s2", live_update::lu_s2),
    ("lu-nested", live_update::lu_nested),
    ("lu-mutate", live_update::lu_mutate),
    ("lu-unclaimed", live_update::lu_unclaimed),
    ("lu-unpreserved", live_update::lu_unpreserved),
    ("lu-collision", live_update::lu_collision),
    ("lu-corrupt", live_update::lu_corrupt),
    ("lu-tampered", live_update::lu_tampered),
    ("lu-noreset", live_update::lu_noreset),
    ("lu-adopt-refused", lu_isolation::lu_adopt_refused),
    ("lu-dma-across-reset", lu_isolation::lu_dma_across_reset),
    ("psci-reset", psci_reset),
    ("el3-fault-report", el3_fault_report),
    ("smp-hello", smp_hello::smp_hello),
    ("smp-dma", smp_dma::smp_dma),
    ("lu-smp", lu_smp::lu_smp),
];

mod dump;
pub use dump::save_at_hand_off;
mod core_smmu;
mod dma_map_bench;
mod domains;
mod live_update;
mod lu_isolation;
mod lu_scale;
mod lu_smp;
mod smp_dma;
mod smp_hello;
mod translate;
pub mod virtio_dma;

/// The running scenario's position in the list, and the counts before it (what a live-update scenario leaves in
/// its note, so the list resumes after the reset).
pub(crate) static LIST_POSITION: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);
pub(crate) static PASSED_SO_FAR: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);
pub(crate) static FAILED_SO_FAR: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Runs the named scenarios in order; returns how many failed.
pub fn run_all(context: &mut Context) -> usize {
    let mut failed = 0;
    let mut count = 0;
    crate::finish::set_asked(context.config.scenario_names().count());
    // After a live-update scenario's reset, the list resumes at that scenario with the counts of the first boot.
    let resume = power::live_update_note();
    if let Some(note) = resume {
        failed = note.failed as usize;
        count = note.index as usize;
        for _ in 0..note.passed {
            crate::finish::record_pass();
        }
    }
    for (index, name) in context.config.scenario_names().enumerate() {
        if resume.is_some_and(|note| index < note.index as usize) {
            continue;
        }
        LIST_POSITION.store(index, core::sync::atomic::Ordering::Relaxed);
        PASSED_SO_FAR.store(count - failed, core::sync::atomic::Ordering::Relaxed);
        FAILED_SO_FAR.store(failed, core::sync::atomic::Ordering::Relaxed);
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

/// The edu functions enumeration found, in bus order.
fn edu_functions<'a>(context: &'a Context) -> impl Iterator<Item = &'a Function> {
    context
        .functions
        .iter()
        .filter(|f| f.vendor == edu::VENDOR && f.device == edu::DEVICE)
}

/// Wraps one edu function, with memory decoding and bus mastering on.
fn open_edu(context: &Context, f: &Function) -> Result<Edu, Failure> {
    let Some(bar0) = f.bars[0] else {
        fail!(
            "edu at {} was found but has no BAR0 assigned, so it cannot be driven",
            f.bdf
        )
    };
    let Some(ecam) = context.ecam else {
        fail!("edu at {} was found without a PCI host", f.bdf)
    };
    ecam.enable_memory_and_bus_master(f.bdf);
    // SAFETY: BAR0 was assigned by enumeration inside a window the board maps as device memory, and only this
    // scenario drives the device.
    Ok(unsafe { Edu::new(f.bdf, bar0, context.config.edu_dma_mask) })
}

/// Finds the first edu device (in bus order) and wraps it.
fn find_edu(context: &Context) -> Result<Edu, Failure> {
    match edu_functions(context).next() {
        Some(f) => open_edu(context, f),
        None => fail!("no edu device (1234:11e8) on any PCI bus; start QEMU with -device edu"),
    }
}

/// Two pages for the untranslated DMA of `edu-ident`, `abort-default` and `bypass`, taken from the frame pool
/// on first use (so `dma-above-4g` moves them too) and kept for the run.
static EDU_PAGES: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// The two DMA pages' addresses (identity-mapped: physical = virtual): source, destination.
fn edu_pages() -> Result<(u64, u64), Failure> {
    use core::sync::atomic::Ordering;
    let mut address = EDU_PAGES.load(Ordering::Relaxed);
    if address == 0 {
        address = match crate::frames::alloc(2 * 4096, 4096) {
            Ok(a) => a,
            Err(e) => fail!("DMA pages: {e}"),
        };
        EDU_PAGES.store(address, Ordering::Relaxed);
    }
    Ok((address as u64, address as u64 + 4096))
}

/// Writes byte `i` of the DMA page at `page` (one of [`edu_pages`]).
fn poke(page: u64, i: usize, value: u8) {
    debug_assert!(i < 4096);
    // SAFETY: `page` is one of the two identity-mapped frames the pool gave this module for the whole run, and
    // the device touches it only during a DMA the caller waits for; volatile because the device does.
    unsafe { core::ptr::write_volatile((page as *mut u8).add(i), value) }
}

/// Reads byte `i` of the DMA page at `page`, after the device wrote it (the DSB in `Edu::dma` orders it).
fn peek(page: u64, i: usize) -> u8 {
    debug_assert!(i < 4096);
    // SAFETY: as in `poke`.
    unsafe { core::ptr::read_volatile((page as *const u8).add(i)) }
}

/// `edu-ident`: every edu device in the topology (on the root bus, behind root ports and switches) answers
/// (ident, liveness, factorial) and its DMA engine moves a pattern from RAM into its buffer and back to another RAM
/// page, through the SMMU with translation disabled and global bypass asked for explicitly (the boot leaves
/// incoming DMA aborting), so the bus addresses are physical addresses; DMA aborts again afterwards. One line per
/// device gives its bus:device.function, requester ID and StreamID.
fn edu_ident(context: &mut Context) -> Result<(), Failure> {
    let smmu = smmu(context)?;
    if smmu.is_enabled() || !smmu.global_bypass_aborts() {
        fail!(
            "the SMMU is not as the boot left it, disabled and aborting (SMMUEN {}, GBPA.ABORT {})",
            smmu.is_enabled() as u8,
            smmu.global_bypass_aborts() as u8
        )
    }
    smmu.set_gbpa_abort(false).or_else(|e| fail!("{e}"))?;
    let identified = identify_each_edu(context);
    let aborting = smmu.set_gbpa_abort(true);
    identified?;
    aborting.or_else(|e| fail!("{e}"))
}

/// [`edu_ident`]'s work, with the SMMU bypassing.
fn identify_each_edu(context: &Context) -> Result<(), Failure> {
    let mut count = 0;
    for f in edu_functions(context) {
        let edu = open_edu(context, f)?;
        let rid = edu.bdf().requester_id();
        let Some(sid) = context.platform.stream_id(rid) else {
            fail!(
                "edu at {}: requester ID {rid:#x} has no StreamID in the iommu-map",
                edu.bdf()
            )
        };
        let (major, minor) = edu.identify().or_else(|e| fail!("edu at {}: {e}", edu.bdf()))?;
        edu.check_liveness(0x5a5a_1234)
            .or_else(|e| fail!("edu at {}: {e}", edu.bdf()))?;
        match edu.factorial(10) {
            Ok(3_628_800) => {}
            Ok(other) => fail!("edu at {} computed 10! = {other}", edu.bdf()),
            Err(e) => fail!("edu at {}: {e}", edu.bdf()),
        }
        let (from, to) = round_trip(&edu, 256)?;
        println!(
            "edu {} v{major}.{minor}: requester ID {rid:#x}, StreamID {sid:#x}, DMA mask {:#x}; 256 bytes {from:#x} -> edu buffer -> {to:#x}, verified",
            edu.bdf(),
            edu.dma_mask()
        );
        count += 1;
    }
    if count == 0 {
        fail!("no edu device (1234:11e8) on any PCI bus; start QEMU with -device edu")
    }
    println!("edu: {count} device(s) identified, DMA verified through each");
    Ok(())
}

/// Moves a pattern from one RAM page into edu's buffer and back into another RAM page (bus addresses = physical
/// addresses: the stream must be untranslated), then checks every byte, and that nothing beyond `len` changed.
/// Returns the two pages' addresses.
fn round_trip(edu: &Edu, len: usize) -> Result<(u64, u64), Failure> {
    let (source, destination) = edu_pages()?;
    let pattern = |i: usize| (i as u8).wrapping_mul(7).wrapping_add(0x3c);
    for i in 0..4096 {
        poke(source, i, pattern(i));
        poke(destination, i, 0xee);
    }
    edu.dma(Direction::ToDevice, source, 0, len as u64)
        .or_else(|e| fail!("RAM -> edu: {e}"))?;
    edu.dma(Direction::FromDevice, destination, 0, len as u64)
        .or_else(|e| fail!("edu -> RAM: {e}"))?;
    if let Some(i) = (0..len).find(|&i| peek(destination, i) != pattern(i)) {
        fail!(
            "DMA round trip corrupted byte {i}: expected {:#x}, found {:#x}",
            pattern(i),
            peek(destination, i)
        )
    }
    if let Some(i) = (len..4096).find(|&i| peek(destination, i) != 0xee) {
        fail!("DMA wrote past its {len} bytes (byte {i} changed)")
    }
    Ok((source, destination))
}

/// Fills the destination page with `canary`, asks edu to write `len` bytes of its buffer there, and returns
/// whether the canary survived (the write was aborted) and the page's address.
fn dma_onto_canary(edu: &Edu, len: usize, canary: u8) -> Result<(bool, u64), Failure> {
    let (_, destination) = edu_pages()?;
    for i in 0..4096 {
        poke(destination, i, canary);
    }
    edu.dma(Direction::FromDevice, destination, 0, len as u64)
        .or_else(|e| fail!("edu -> RAM: {e}"))?;
    let intact = (0..4096).all(|i| peek(destination, i) == canary);
    Ok((intact, destination))
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
         (SMMUEN 0; GBPA.ABORT {}, as this boot set it before PCI enumeration)",
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
