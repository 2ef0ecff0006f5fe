//! The board-independent part of the smmuv3 test firmware: it boots at EL2, finds its hardware, drives a real
//! DMA master behind the SMMU and runs the driver's scenarios. A board crate supplies only its entry, its memory
//! layout and where its description comes from.
#![no_std]

pub mod acpi;
pub mod boot;
pub mod config;
pub mod console;
pub mod cpus;
pub mod dt;
pub mod edu;
pub mod exceptions;
pub mod finish;
pub mod frames;
pub mod fw_cfg;
pub mod handoff;
pub mod handover;
pub mod irq;
pub mod mmu;
pub mod pci;
pub mod power;
pub mod scenarios;
pub mod smp;
pub mod time;
pub mod virtio;

use core::sync::atomic::{AtomicBool, Ordering};

use aarch64_cpu::registers::{CurrentEL, Readable};

use smmuv3_reserved_memory::{MAX_RESERVED, Range, highest_free, largest_free};

use crate::dt::{PcieHost, Platform, StaticDescription};
use crate::mmu::{CODE, DATA, DEVICE, IdentityMap, RODATA};

unsafe extern "C" {
    static text_begin: u8;
    static text_end: u8;
    static rodata_begin: u8;
    static rodata_end: u8;
    static dma_region: u8;
    static image_slots_end: u8;
}

static EXITING: AtomicBool = AtomicBool::new(false);

/// Bytes of RAM below the handover region kept for DMA buffers (see [`frames`]).
const DMA_POOL_BYTES: usize = 16 << 20;

/// Ends the run: prints the RESULT line ([`finish::report`]), then hands `code` to the host through semihosting
/// (0: every scenario passed), or, on a machine without semihosting, powers off through PSCI (or parks the CPU).
pub fn exit(code: i32) -> ! {
    finish::report(code == 0);
    if EXITING.swap(true, Ordering::SeqCst) {
        // The way out itself failed (PSCI SYSTEM_OFF returned, or faulted): nothing left to report to.
        finish::park("FATAL: the run cannot exit; parking the CPU")
    }
    if finish::semihosting_absent() {
        finish::without_semihosting()
    }
    // Should semihosting be absent after all, the call traps and the exception handler ends the run without it.
    semihosting::process::exit(code)
}

/// Reports a fatal boot error and exits with failure.
pub fn fatal(what: &str, error: &dyn core::fmt::Display) -> ! {
    println!("FATAL: {what}: {error}");
    exit(2)
}

/// The board's side of the boot: how to find its description and configuration.
pub trait Board {
    /// The board's name, for the console.
    const NAME: &'static str;
    /// Address of the flattened device tree, when the board is handed one. The tree must be mapped by the boot
    /// page table.
    fn device_tree(&self) -> Option<usize>;
    /// Whether the firmware enumerates the ECAM PCIe host the tree or the description names (`false`: a board
    /// whose only ECAM host is one the enumeration cannot drive; no PCI function is then listed).
    const PCI: bool = true;
    /// The board's static description, used for every device the tree does not describe (none by default: a
    /// fully described board such as QEMU virt needs nothing here).
    fn description(&self) -> StaticDescription {
        StaticDescription::default()
    }
    /// Reads the run configuration (scenario list and expectations).
    ///
    /// # Errors
    /// A message for the console when the configuration is unusable.
    fn config(&self, platform: &Platform) -> Result<config::Config, config::ConfigError>;
}

fn print_pcie(host: &PcieHost) {
    println!(
        "PCIe: ECAM {} buses {}..={}",
        host.ecam, host.bus_range.0, host.bus_range.1
    );
    for w in &host.windows {
        println!(
            "  window {:?}{} pci {:#x} cpu {:#x} size {:#x}",
            w.kind,
            if w.prefetchable { " prefetchable" } else { "" },
            w.pci_base,
            w.cpu_base,
            w.size
        );
    }
    for e in host.iommu_map.entries() {
        println!(
            "  iommu-map: RID {:#x}..{:#x} -> SID {:#x}",
            e.rid_base,
            e.rid_base + e.length,
            e.sid_base
        );
    }
    if let Some(mask) = host.iommu_map_mask {
        println!("  iommu-map-mask: {mask:#x}");
    }
}

/// With `description` = `acpi` (fw_cfg `opt/smmuv3/description`): the SMMU and PCI segment 0's requester-ID map
/// from the ACPI IORT alone, in place of the tree's (`true` then). Read as soon as the MMU is on (linking the
/// tables needs normal memory), before the SMMU is first touched and before PCI enumeration: QEMU builds the
/// tables at that first read, so the root complex maps the buses that exist then (the root bus). The firmware maps
/// the SMMU its tree or board names before this, so an IORT whose SMMU is elsewhere is refused rather than used
/// unmapped. Without the setting, nothing is read here (see [`acpi_report`]).
fn acpi_description(mut platform: Platform) -> (Platform, bool) {
    let Some(mut fw_cfg) = open_fw_cfg(&platform) else {
        return (platform, false);
    };
    if !acpi::acpi_wanted(&mut fw_cfg).unwrap_or_else(|e| fatal("configuration", &e)) {
        return (platform, false);
    }
    // SAFETY: once, on the boot CPU, at start-up.
    let a = unsafe { acpi::read_iort(&mut fw_cfg, None) }.unwrap_or_else(|e| fatal("ACPI description", &e));
    if a.smmu.base != platform.smmu.base {
        fatal("ACPI description", &"the IORT's SMMU is not the one the board maps");
    }
    platform.smmu = smmuv3::SmmuDescription {
        size: platform.smmu.size.max(a.smmu.size),
        ..a.smmu
    };
    let Some(host) = platform.pcie.as_mut() else {
        fatal(
            "ACPI description",
            &"the IORT maps a root complex, and the board has no ECAM host for it",
        )
    };
    host.iommu_map = a.iommu_map;
    host.iommu_map_mask = None;
    println!(
        "SMMU: from the ACPI IORT alone (description = acpi; {} bytes, linked from fw_cfg's table-loader): {:#x}, \
         INTIDs {:?}, {}coherent",
        a.iort_bytes,
        platform.smmu.base,
        [
            platform.smmu.interrupts.eventq,
            platform.smmu.interrupts.priq,
            platform.smmu.interrupts.cmdq_sync,
            platform.smmu.interrupts.gerror
        ],
        if platform.smmu.dma_coherent { "" } else { "not " }
    );
    print_iort_map(&host.iommu_map);
    (platform, true)
}

/// ACPI, where the machine publishes it through fw_cfg (QEMU virt): the IORT's SMMU, and the StreamID its
/// requester-ID map gives each enumerated PCI function, compared with the tree's (or the board's) and printed.
/// Read after PCI enumeration, as platform firmware publishes its tables (QEMU builds them when they are first
/// read, with the buses assigned by then: read before, its root complex would map bus 0 alone).
/// With `save` (the `dump-iort` setting), the IORT is also written to that host path as it was linked.
fn acpi_report(platform: &Platform, functions: &pci::Functions, save: Option<&str>) {
    let Some(mut fw_cfg) = open_fw_cfg(platform) else {
        return;
    };
    // SAFETY: once, on the boot CPU, at start-up.
    match unsafe { acpi::read_iort(&mut fw_cfg, save) } {
        Ok(a) => {
            let d = &a.smmu;
            let same_smmu = d.base == platform.smmu.base
                && d.interrupts == platform.smmu.interrupts
                && d.dma_coherent == platform.smmu.dma_coherent;
            // The IORT maps the buses that exist when it is built; the tree may map more. What must agree is the
            // StreamID of every function there is.
            let same_map = functions.iter().all(|f| {
                let rid = f.bdf.requester_id();
                a.iommu_map.stream_id(rid) == platform.stream_id(rid)
            });
            println!(
                "ACPI: IORT ({} bytes, linked from fw_cfg's table-loader): SMMUv3 at {:#x}, {} requester-ID range(s); {}",
                a.iort_bytes,
                d.base,
                a.iommu_map.entries().len(),
                match (same_smmu, same_map) {
                    (true, true) => "the same SMMU, and the same StreamID for every PCI function, as the device tree",
                    (false, _) => "another SMMU description than the device tree's",
                    (true, false) => "another StreamID than the device tree's for a PCI function",
                }
            );
            if !(same_smmu && same_map) {
                println!("  IORT: {d:x?}");
                print_iort_map(&a.iommu_map);
            }
        }
        Err(e) => println!("ACPI: {e}"),
    }
}

/// The platform's fw_cfg device, when it has one.
fn open_fw_cfg(platform: &Platform) -> Option<fw_cfg::FwCfg> {
    let region = platform.fw_cfg?;
    // SAFETY: the identity map covers fw_cfg as a device; only the boot CPU uses it (here, and for the
    // configuration).
    unsafe { fw_cfg::FwCfg::new(region.base as usize) }
}

/// Prints an IORT's requester-ID ranges.
fn print_iort_map(map: &smmuv3::IommuMap) {
    for e in map.entries() {
        println!(
            "  IORT: RID {:#x}..{:#x} -> SID {:#x}",
            e.rid_base,
            u64::from(e.rid_base) + u64::from(e.length),
            e.sid_base
        );
    }
}

fn symbol(s: &u8) -> usize {
    s as *const u8 as usize
}

/// Builds the identity map from the platform: RAM banks as data, the image's code and read-only data with their
/// own permissions, every device the firmware drives as device memory.
fn build_identity_map(platform: &Platform) -> IdentityMap {
    let mut map = IdentityMap::new();
    let mut add = |start: u64, end: u64, attributes, what: &str| {
        if let Err(e) = map.map(start as usize, end as usize, attributes) {
            fatal(what, &e);
        }
    };
    for bank in &platform.memory {
        add(bank.base, bank.end(), DATA, "map RAM");
    }
    // SAFETY: the linker script defines these symbols; only their addresses are used.
    let (text, rodata) = unsafe {
        (
            (symbol(&text_begin), symbol(&text_end)),
            (symbol(&rodata_begin), symbol(&rodata_end)),
        )
    };
    add(text.0 as u64, text.1 as u64, CODE, "map code");
    add(rodata.0 as u64, rodata.1 as u64, RODATA, "map rodata");
    add(
        platform.uart.region.base,
        platform.uart.region.end(),
        DEVICE,
        "map UART",
    );
    add(
        platform.smmu.base,
        platform.smmu.base + platform.smmu.size,
        DEVICE,
        "map SMMU",
    );
    let pcie = platform.pcie.as_ref();
    if let Some(host) = pcie {
        add(host.ecam.base, host.ecam.end(), DEVICE, "map ECAM");
    }
    for w in pcie.iter().flat_map(|host| &host.windows) {
        match w.kind {
            dt::WindowKind::Mem32 => add(w.cpu_base, w.cpu_base + w.size, DEVICE, "map PCI window"),
            // Enumeration assigns 64-bit prefetchable BARs from the start of this window only.
            dt::WindowKind::Mem64 => add(
                w.cpu_base,
                w.cpu_base + w.size.min(pci::MEM64_MAPPED),
                DEVICE,
                "map 64-bit PCI window",
            ),
            dt::WindowKind::Io => {}
        }
    }
    if let Some(f) = platform.fw_cfg {
        add(f.base, f.end(), DEVICE, "map fw_cfg");
    }
    if let Some(g) = platform.gic {
        add(g.distributor.base, g.distributor.end(), DEVICE, "map GIC distributor");
        add(
            g.redistributors.base,
            g.redistributors.end(),
            DEVICE,
            "map GIC redistributors",
        );
    }
    map
}

/// Makes the SMMU abort incoming DMA (GBPA.ABORT = 1) before PCI enumeration gives any bridge (or a driver any
/// function) bus mastering, on every boot: an SMMU leaves reset with GBPA.ABORT IMPLEMENTATION DEFINED (QEMU: 0,
/// bypass), and a DMA that was in flight across a warm reset lands as soon as bus mastering is on, at PA = IOVA
/// were the SMMU bypassing. An SMMU a previous image left translating (a hand-off) keeps translating: GBPA applies
/// only once translation is off. Translation is the scenarios' business; bypass is only ever asked for.
fn block_dma_before_pci(platform: &Platform) {
    let Some(base) = core::ptr::NonNull::new(platform.smmu.base as *mut u8) else {
        fatal("SMMU", &"at address 0: DMA cannot be blocked before PCI enumeration")
    };
    // SAFETY: the identity map covers the SMMU's register space as device memory; nothing else drives the SMMU
    // during the boot, and the handle is dropped before any scenario probes it again.
    let smmu = unsafe { smmuv3::Smmu::probe(base, platform.smmu.size) }.unwrap_or_else(|e| fatal("SMMU probe", &e));
    if let Err(e) = smmu.set_gbpa_abort(true) {
        fatal("SMMU GBPA.ABORT before PCI enumeration", &e)
    }
    println!(
        "SMMU: incoming DMA aborts before PCI enumeration (GBPA.ABORT 1{})",
        if smmu.is_enabled() {
            "; SMMUEN 1: translating as the previous image left it"
        } else {
            ", SMMUEN 0"
        }
    );
}

/// The handover region and where it came from, with every range the tree reserves (the region included), which
/// the pools must leave alone. From the tree's `/reserved-memory` node with [`handover::HANDOVER_COMPATIBLE`] when
/// it has one, checked; else the board's `handover_bytes` at the top of the image's bank, below the notes at
/// `scratch`. A handover node that cannot be used (malformed, a second one, failing a check) is printed, every
/// range any handover node names stays reserved (one that wraps, from its base to the end of the address space),
/// and live update is off: `None`. A `/reserved-memory` that cannot be read at all (its cells, another child's
/// `reg`) is a boot error: which RAM is free is then unknown.
fn handover_region(
    tree: &smmuv3_reserved_memory::ReservedMemory<'_>,
    platform: &Platform,
    description: &StaticDescription,
    bank: &dt::Region,
    free_start: u64,
    scratch: usize,
    kept: &[(&'static str, Range)],
) -> (
    Option<(smmuv3::handover::Extent, handover::Source)>,
    heapless::Vec<Range, { MAX_RESERVED + 5 }>,
) {
    use smmuv3_reserved_memory::{HANDOVER_COMPATIBLE, check_region};
    // Everything the tree reserves, the handover region included: whatever is wrong with the region's node (or
    // nodes), every range one names is in here (the reader's `others` when no region is used).
    let mut reserved: heapless::Vec<Range, { MAX_RESERVED + 5 }> =
        tree.kept_out().chain(kept.iter().map(|(_, r)| *r)).collect();
    for r in &tree.others {
        println!("reserved memory (device tree): {r}, kept out of the frame pool");
    }
    let extent = |r: Range| smmuv3::handover::Extent {
        base: r.base,
        len: r.size,
    };
    if let Some(e) = &tree.handover_error {
        println!("handover region: /reserved-memory ({HANDOVER_COMPATIBLE}): {e}; live update off");
        return (None, reserved);
    }
    if let Some(region) = tree.handover {
        // Reserved (above) whatever the check says: the tree says no one else may use it.
        let ram: heapless::Vec<Range, 4> = platform
            .memory
            .iter()
            .map(|b| Range {
                base: b.base,
                size: b.size,
            })
            .collect();
        let mut protected: heapless::Vec<(&'static str, Range), { smmuv3_reserved_memory::MAX_RESERVED + 4 }> =
            heapless::Vec::new();
        let _ = protected.push((
            "the image (and the tree below it)",
            Range {
                base: bank.base,
                size: free_start - bank.base,
            },
        ));
        let _ = protected.push((
            "the reset notes",
            Range {
                base: scratch as u64,
                size: power::SCRATCH_BYTES as u64,
            },
        ));
        for other in &tree.others {
            let _ = protected.push(("memory the tree reserves", *other));
        }
        for k in kept {
            let _ = protected.push(*k);
        }
        return match check_region(region, &ram, &protected) {
            Ok(()) => {
                println!("handover region: from /reserved-memory (compatible \"{HANDOVER_COMPATIBLE}\"): {region}");
                (Some((extent(region), handover::Source::Tree)), reserved)
            }
            Err(e) => {
                println!("handover region: /reserved-memory ({HANDOVER_COMPATIBLE}): {e}; live update off");
                (None, reserved)
            }
        };
    }
    if description.handover_bytes == 0 {
        return (None, reserved);
    }
    // The board's size, or its share of the bank when that is larger: the same every boot, so a warm reset finds
    // the same region.
    let share = bank.size.checked_div(description.handover_share).unwrap_or(0);
    let bytes = description.handover_bytes.max(share) & !0xfff;
    let start = scratch.saturating_sub(bytes as usize) & !0xfff;
    let region = Range {
        base: start as u64,
        size: (scratch - start) as u64,
    };
    if start <= free_start as usize {
        println!("handover region: the board's {bytes} bytes do not fit after the image; live update off");
        return (None, reserved);
    }
    if let Some(other) = tree
        .others
        .iter()
        .chain(kept.iter().map(|(_, r)| r))
        .find(|o| o.overlaps(&region))
    {
        println!(
            "handover region: the board's rule gives {region}, which the tree reserves ({other}); live update off"
        );
        return (None, reserved);
    }
    println!(
        "handover region: from the board description ({bytes} bytes at the top of the image's RAM bank): {region}"
    );
    let _ = reserved.push(region);
    (Some((extent(region), handover::Source::Board)), reserved)
}

/// The firmware after the board's entry: discovery, MMU, PCI, scenarios, exit. Never returns.
pub fn run<B: Board>(board: &B) -> ! {
    // SAFETY: the board names where its DTB is; the boot page table maps it as normal memory.
    let fdt = board.device_tree().map(|address| unsafe { dt::parse(address) });
    if let Some(address) = board.device_tree() {
        // SAFETY: only the symbol's address is used: the image's first byte, where the tree's editable memory ends.
        handover::set_tree(address, symbol(unsafe { &text_begin }));
    }
    let description = board.description();
    let uart = dt::console_of(fdt.as_ref().and_then(|r| r.as_ref().ok()), &description)
        .unwrap_or_else(|e| fatal("console", &e));
    // SAFETY: the UART the tree names is mapped as device memory by the boot page table and only the console
    // drives it.
    unsafe { console::init(uart.kind, uart.region.base as usize) };
    println!();
    println!("smmuv3 firmware on {} at EL{}", B::NAME, CurrentEL.read(CurrentEL::EL));
    if finish::probe_semihosting() {
        println!("semihosting: present; the run ends with its exit status");
    } else {
        println!("semihosting: absent; the run ends with its RESULT line and PSCI SYSTEM_OFF (or a low-power park)");
    }
    let fdt = match fdt {
        Some(Ok(fdt)) => {
            println!("device tree: {} bytes", fdt.total_size());
            Some(fdt)
        }
        Some(Err(e)) => fatal("device tree", &e),
        None => None,
    };
    let mut platform = dt::platform(fdt.as_ref(), &description).unwrap_or_else(|e| fatal("platform discovery", &e));
    let unused_pci = if B::PCI { None } else { platform.pcie.take() };
    // The StreamIDs of a host the firmware leaves alone still belong to its devices.
    for e in unused_pci.iter().flat_map(|host| host.iommu_map.entries()) {
        if e.length != 0
            && platform
                .masters
                .push((e.sid_base, e.sid_base + (e.length - 1)))
                .is_err()
        {
            platform.masters_complete = false;
        }
    }
    for bank in &platform.memory {
        println!("memory: {bank}");
    }
    println!("console: {} at {:#x}", platform.uart.kind, platform.uart.region.base);
    println!("SMMU: {:#x} size {:#x}", platform.smmu.base, platform.smmu.size);
    match &platform.pcie {
        Some(host) => print_pcie(host),
        None if unused_pci.is_some() => {
            println!("PCIe: the tree's ECAM host is not one this board's firmware enumerates; no PCI function listed")
        }
        None => println!("PCIe: no ECAM host (pci-host-ecam-generic); no PCI function enumerated"),
    }
    // Masters that are not PCI functions, by their `iommus` (QEMU's trees have none: its SMMU serves PCI only).
    if let Some(smmu) = fdt.as_ref().and_then(|fdt| dt::smmu_node(fdt).map(|node| (fdt, node))) {
        let mut dropped = 0;
        let listed = smmuv3_board_dt::platform_masters(smmu.0, smmu.1, |m| {
            let (first, last) = m.stream_ids();
            let off = if m.enabled { "" } else { " (disabled)" };
            println!("  iommus: {} -> SID {first:#x}..={last:#x}{off}", m.path);
            if platform.masters.push((first, last)).is_err() {
                dropped += 1;
            }
        });
        if dropped != 0 {
            println!("  iommus: {dropped} more StreamID range(s) than the platform keeps; scenarios do not see them");
            platform.masters_complete = false;
        }
        if listed.is_err() {
            platform.masters_complete = false;
        }
        match listed {
            Ok(0) => println!("  iommus: no platform master names the SMMU"),
            Ok(_) => {}
            Err(e) => println!("  iommus: {e}; those masters stay unlisted"),
        }
    }

    // Free RAM: from the end of the image, and of the second image slot a hand-off test loads another image in
    // (see the board's linker script), to the end of the bank that holds it.
    // SAFETY: only the symbols' addresses are used.
    let free_start = symbol(unsafe { &dma_region }).max(symbol(unsafe { &image_slots_end })) as u64;
    let bank = platform
        .memory
        .iter()
        .find(|b| b.base <= free_start && free_start < b.end());
    let Some(bank) = bank else {
        fatal("memory", &"the image is not inside a RAM bank the tree describes")
    };
    let tree = match fdt.as_ref().map(smmuv3_reserved_memory::reserved_memory) {
        Some(Ok(tree)) => tree,
        Some(Err(e)) => fatal("device tree /reserved-memory", &e),
        None => Default::default(),
    };
    let after_image = Range {
        base: free_start,
        size: bank.end() - free_start,
    };
    // The reset notes: the bank's last 64 KiB (see `power`), a boot's notes for the next one; or, when the tree
    // reserves any of them, the highest 64 KiB below that it leaves free (the same at every boot with this tree).
    // What the firmware itself must not hand out beyond what the tree reserves: the boot loader's area at the top
    // of the bank (the board says how much) and the tree, when the boot loader left it after the image.
    let mut kept: heapless::Vec<(&'static str, Range), 2> = heapless::Vec::new();
    if description.boot_loader_top != 0 {
        let size = description.boot_loader_top.min(bank.size);
        let range = Range {
            base: bank.end() - size,
            size,
        };
        println!("boot loader: {range} rewritten at every boot (the board says); kept out of the frame pool");
        let _ = kept.push(("the boot loader's area at the top of the bank", range));
    }
    if let (Some(address), Some(fdt)) = (board.device_tree(), fdt.as_ref()) {
        let range = Range {
            base: address as u64,
            size: fdt.total_size() as u64,
        };
        if range.base + range.size > free_start && range.base < bank.end() {
            println!("device tree: {range}, after the image; kept out of the frame pool");
            let _ = kept.push(("the device tree", range));
        }
    }
    let tree_ranges: heapless::Vec<Range, { MAX_RESERVED + 3 }> =
        tree.kept_out().chain(kept.iter().map(|(_, r)| *r)).collect();
    let scratch_bytes = power::SCRATCH_BYTES as u64;
    let Some(scratch) = highest_free(after_image, &tree_ranges, scratch_bytes, scratch_bytes) else {
        fatal(
            "memory",
            &"no 64 KiB after the image for the reset notes clear of the tree's reserved memory",
        )
    };
    if scratch + scratch_bytes != bank.end() {
        println!(
            "reset notes: the tree or the boot loader keeps the bank's last 64 KiB; the notes go at {scratch:#x} instead"
        );
    }
    let scratch = scratch as usize;
    let (handover_region, mut reserved) =
        handover_region(&tree, &platform, &description, bank, free_start, scratch, &kept);
    let _ = reserved.push(Range {
        base: scratch as u64,
        size: scratch_bytes,
    });
    // The pools take the largest part of the RAM after the image that nothing reserves (the notes, the handover
    // region, the tree's reserved memory): they skip reserved ranges rather than stop at the first. On the board's
    // rule that is everything from the image to the region below the notes.
    let Some(free) = largest_free(after_image, &reserved) else {
        fatal("memory", &"no RAM after the image that the tree does not reserve")
    };
    let (pools_start, top) = (free.base as usize, (free.base + free.size) as usize);
    // At its top, the DMA buffers' own pool (see `frames`): the only memory the live-update scenarios give devices.
    let dma_start = top.saturating_sub(DMA_POOL_BYTES) & !0x1f_ffff;
    if dma_start <= pools_start {
        fatal(
            "memory",
            &"no free RAM after the image for the frame and DMA pools between the tree's reserved ranges",
        );
    }
    if pools_start != free_start as usize {
        println!("frames: from {pools_start:#x}, above reserved memory (the largest free part of the bank)");
    }
    // SAFETY: everything past the image in its bank is unused RAM (the DTB sits below the image), mapped by the
    // boot page table; the pools lie in a part of it clear of every reserved range (the handover region included)
    // and of the scratch area, and do not overlap each other.
    unsafe {
        frames::init(pools_start, dma_start);
        frames::init_dma(dma_start, top);
        power::set_scratch(scratch);
    }
    let extent = |start: usize, end: usize| smmuv3::handover::Extent {
        base: start as u64,
        len: (end - start) as u64,
    };
    frames::set_layout(frames::Layout {
        image: extent(bank.base as usize, pools_start),
        frames: extent(pools_start, dma_start),
        dma: extent(dma_start, top),
        reserved: extent(top, bank.end() as usize),
        handover: handover_region.map(|(r, _)| r).unwrap_or_default(),
    });

    let map = build_identity_map(&platform);
    // SAFETY: the map covers RAM (image, stack, DTB, pool) and every device used from now on.
    unsafe { map.activate() };
    println!(
        "EL2 MMU: identity map of the platform active; {} KiB of frames free",
        frames::remaining() / 1024
    );
    let (platform, from_acpi) = acpi_description(platform);
    smp::init(&platform.cpus);
    print!("CPUs: {} (MPIDR", smp::cpu_count());
    for cpu in 0..smp::cpu_count() {
        print!(" {:#x}", smp::mpidr(cpu));
    }
    println!("); this is CPU 0, the others start through PSCI CPU_ON when a scenario asks");
    block_dma_before_pci(&platform);
    if let Some((region, source)) = handover_region {
        // The records' area: a 64th of the region (about 110 bytes a preserved domain: 512 KiB holds some 4,700),
        // in 64 KiB steps, with its workspace (staging and scratch, twice as much) from the frame pool.
        let metadata = (region.len / 64 / (64 << 10) * (64 << 10)).max(smmuv3::handover::pool::METADATA_BYTES);
        let words = smmuv3::handover::pool::workspace_words(metadata);
        let workspace = frames::alloc(words * 8, 4096).ok().map(|at| {
            // SAFETY: `words` words of fresh, zeroed, identity-mapped frames, the pool's alone from now on.
            unsafe { core::slice::from_raw_parts_mut(at as *mut u64, words) }
        });
        // SAFETY: at boot nothing uses the pool yet; a previous image entered without a reset (a hand-off) left its
        // values in `.data`, which this forgets. The region is RAM kept out of both pools (checked against the
        // image, the notes and the tree's other reserved memory when the tree named it) and used by nothing else;
        // RAM is identity-mapped.
        let set_up = unsafe {
            handover::POOL.forget_previous_image();
            let virt =
                core::ptr::NonNull::new(region.base as usize as *mut u8).unwrap_or(core::ptr::NonNull::dangling());
            match workspace {
                Some(workspace) => handover::POOL.set_up_with(region, virt, metadata, workspace),
                None => handover::POOL.set_up(region, virt),
            }
        };
        match set_up {
            Ok(()) => {
                handover::set_source(source);
                println!(
                    "handover region: {:#x}..{:#x}, kept out of the frame pool",
                    region.base,
                    region.base + region.len
                );
                println!(
                    "handover records: {} KiB",
                    handover::POOL.metadata_extent().map_or(0, |m| m.len >> 10)
                )
            }
            // A region the board or the tree chose too small for the pool: live update is off, the rest runs.
            Err(e) => println!("handover region: {e}; live update off"),
        }
    }

    if let Some(gic) = &platform.gic {
        // SAFETY: the GIC is identity-mapped as device memory and only the interrupt module drives it.
        match unsafe { irq::init(gic) }.and_then(|()| irq::enable_smmu_lines(&platform.smmu.interrupts)) {
            Ok(enabled) => println!(
                "GIC: distributor {}, redistributors {}; the SMMU's lines {}",
                gic.distributor,
                gic.redistributors,
                if enabled {
                    "enabled, taken at EL2"
                } else {
                    "are level-triggered: polled"
                }
            ),
            Err(e) => fatal("interrupt controller", &e),
        }
    } else if fdt.as_ref().is_some_and(dt::has_gic_v2) {
        println!("GIC: version 2 not driven; SMMU interrupts polled");
    } else {
        println!("GIC: none described; SMMU interrupts polled");
    }

    let config = board.config(&platform).unwrap_or_else(|e| fatal("configuration", &e));
    if let Some(path) = &config.dump_handover {
        scenarios::save_at_hand_off(path);
    }
    if config.dma_above_4g {
        frames::start_at_or_above(1 << 32).unwrap_or_else(|e| fatal("dma-above-4g", &e));
        println!(
            "frames: from {:#x} on (dma-above-4g): every queue, table and DMA buffer lies above 4 GiB",
            frames::next_address()
        );
    }
    // SAFETY: the ECAM is mapped as device memory and only this firmware touches configuration space.
    let ecam = platform.pcie.as_ref().map(|host| unsafe { pci::Ecam::new(host) });
    let functions = match (&ecam, &platform.pcie) {
        (Some(ecam), Some(host)) => pci::enumerate(ecam, host).unwrap_or_else(|e| fatal("PCI", &e)),
        _ => pci::Functions::new(),
    };
    if !from_acpi {
        acpi_report(&platform, &functions, config.dump_iort.as_deref());
    }
    for f in &functions {
        let sid = platform.stream_id(f.bdf.requester_id());
        print!(
            "PCI {} {:04x}:{:04x} class {:06x} SID {:?}",
            f.bdf,
            f.vendor,
            f.device,
            f.class_revision >> 8,
            sid
        );
        for (i, bar) in f.bars.iter().enumerate() {
            if let Some(b) = bar {
                print!(" BAR{i} {:#x}+{:#x}", b.cpu_address, b.size);
            }
        }
        match f.bridge {
            Some(b) => {
                print!(" bridge: buses {:02x}..={:02x}", b.secondary, b.subordinate);
                if let Some((start, end)) = b.memory {
                    print!(", memory {start:#x}..{end:#x}");
                }
                if let Some((start, end)) = b.prefetchable {
                    print!(", prefetchable {start:#x}..{end:#x}");
                }
                println!();
            }
            None => println!(),
        }
    }

    let mut context = scenarios::Context {
        platform: &platform,
        ecam: ecam.as_ref(),
        functions: &functions,
        config: &config,
    };
    let failed = scenarios::run_all(&mut context);
    if failed == 0 && config.power_off {
        finish::report(true);
        power::system_off()
    }
    exit(if failed == 0 { 0 } else { 1 })
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("FATAL: panic: {info}");
    exit(4)
}
