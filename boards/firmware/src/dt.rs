//! Discovery from the flattened device tree: memory, console, SMMU, PCIe host (ECAM, windows, `iommu-map`),
//! fw_cfg, GIC and CPUs. A board whose tree is silent about a device fills the same [`Platform`] from its constants.

use core::fmt;

use fdt::Fdt;
use fdt::node::FdtNode;
use smmuv3::{IommuMap, SmmuDescription};

/// A physical address range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
}

impl Region {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.base + self.size
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..{:#x}", self.base, self.end())
    }
}

/// The console UART's programming model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UartKind {
    /// Arm PL011 (`arm,pl011`): QEMU's machines, most Arm reference boards.
    Pl011,
    /// NXP's 32-bit low-power UART with its registers 0x10 in (`fsl,imx7ulp-lpuart` and its successors:
    /// i.MX 8ULP, 8QXP, 93, 95).
    Lpuart,
}

impl fmt::Display for UartKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UartKind::Pl011 => "PL011",
            UartKind::Lpuart => "LPUART",
        })
    }
}

/// The console UART: its programming model and registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uart {
    /// Programming model.
    pub kind: UartKind,
    /// Registers.
    pub region: Region,
}

/// The compatibles of each UART the console drives, most specific first.
const UART_COMPATIBLES: [(UartKind, &[&str]); 2] = [
    (UartKind::Pl011, &["arm,pl011"]),
    (
        UartKind::Lpuart,
        &[
            "fsl,imx7ulp-lpuart",
            "fsl,imx8ulp-lpuart",
            "fsl,imx8qxp-lpuart",
            "fsl,imx93-lpuart",
            "fsl,imx95-lpuart",
        ],
    ),
];

/// The kind of UART `node` is, when the console drives it.
fn uart_kind(node: &FdtNode) -> Option<UartKind> {
    let compatible = node.compatible()?;
    UART_COMPATIBLES
        .iter()
        .find(|(_, names)| compatible.all().any(|c| names.contains(&c)))
        .map(|(kind, _)| *kind)
}

/// Kind of a PCI address window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowKind {
    /// I/O space.
    Io,
    /// 32-bit memory space.
    Mem32,
    /// 64-bit memory space.
    Mem64,
}

/// One entry of a PCIe host's `ranges`: a PCI bus address window and where the CPU sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciWindow {
    /// Address space.
    pub kind: WindowKind,
    /// Prefetchable.
    pub prefetchable: bool,
    /// Address on the PCI bus.
    pub pci_base: u64,
    /// Address the CPU uses.
    pub cpu_base: u64,
    /// Length in bytes.
    pub size: u64,
}

/// A generic ECAM PCIe host bridge.
#[derive(Clone, Debug, Default)]
pub struct PcieHost {
    /// The ECAM (configuration space) region.
    pub ecam: Region,
    /// First and last bus number: the tree's `bus-range`, cut to the buses the ECAM region covers.
    pub bus_range: (u8, u8),
    /// Address windows.
    pub windows: heapless::Vec<PciWindow, 4>,
    /// Requester ID to StreamID map (empty when the tree gives none: then no requester is behind the SMMU).
    pub iommu_map: IommuMap,
    /// The tree's `iommu-map-mask`: ANDed with a requester ID before it is looked up in `iommu_map` (`None`: the
    /// whole requester ID is used).
    pub iommu_map_mask: Option<u32>,
}

impl PcieHost {
    /// The StreamID of requester ID `rid`: masked by `iommu-map-mask` when the tree gives one, then looked up in
    /// the `iommu-map` (PCI `iommu-map` binding). `None` when no range covers it.
    pub fn stream_id(&self, rid: u32) -> Option<u32> {
        self.iommu_map
            .stream_id(self.iommu_map_mask.map_or(rid, |mask| rid & mask))
    }
}

/// A GICv3.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gic {
    /// Distributor.
    pub distributor: Region,
    /// Redistributors.
    pub redistributors: Region,
}

/// Everything the firmware needs about the machine.
#[derive(Clone, Debug)]
pub struct Platform {
    /// RAM banks.
    pub memory: heapless::Vec<Region, 4>,
    /// The console.
    pub uart: Uart,
    /// The SMMU.
    pub smmu: SmmuDescription,
    /// The ECAM PCIe host behind the SMMU; `None` when the machine has none the firmware drives (a SoC's
    /// DesignWare host, whose link its own driver trains: then no PCI function is enumerated).
    pub pcie: Option<PcieHost>,
    /// QEMU's fw_cfg, when present.
    pub fw_cfg: Option<Region>,
    /// The interrupt controller, when the tree names one.
    pub gic: Option<Gic>,
    /// The CPUs' affinities (the `reg` of each `/cpus/cpu@…`, MPIDR format), in tree order; empty when neither the
    /// tree nor the board lists them (then the boot CPU runs alone).
    pub cpus: Cpus,
    /// The StreamIDs (first, last) of the masters the tree names through `iommus`, and of the `iommu-map` of a PCI
    /// host the board does not enumerate (filled at boot; at most [`MAX_MASTER_STREAMS`] ranges, the rest left out
    /// and said so).
    pub masters: heapless::Vec<(u32, u32), MAX_MASTER_STREAMS>,
    /// `masters` holds every such StreamID (false when the tree's `iommus` could not be read whole or did not fit).
    pub masters_complete: bool,
}

/// How many `iommus` StreamID ranges a [`Platform`] keeps.
pub const MAX_MASTER_STREAMS: usize = 64;

impl Platform {
    /// The StreamID of PCI requester ID `rid` ([`PcieHost::stream_id`]); `None` without a PCI host or when its
    /// map does not cover `rid`.
    pub fn stream_id(&self, rid: u32) -> Option<u32> {
        self.pcie.as_ref()?.stream_id(rid)
    }
}

/// The CPUs a platform lists, by affinity (MPIDR format), at most [`crate::cpus::MAX_CPUS`].
pub type Cpus = heapless::Vec<u64, { crate::cpus::MAX_CPUS }>;

/// Why the device tree could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtError {
    /// No valid FDT header at the address.
    BadHeader,
    /// A device the firmware needs is missing.
    Missing(&'static str),
    /// A property is malformed.
    Malformed(&'static str),
    /// The SMMU's node or a PCI host's `iommu-map` cannot be described (`smmuv3-board-dt`).
    Describe(smmuv3_board_dt::DescribeError),
}

impl fmt::Display for DtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DtError::BadHeader => f.write_str("no valid device tree header"),
            DtError::Missing(what) => write!(f, "device tree has no {what}"),
            DtError::Malformed(what) => write!(f, "device tree property {what} is malformed"),
            DtError::Describe(e) => write!(f, "device tree SMMU description: {e}"),
        }
    }
}

/// Parses the tree at `address`.
///
/// # Errors
/// [`DtError::BadHeader`] when no FDT is there.
///
/// # Safety
/// `address` must be mapped and readable, and if it holds an FDT header, the whole `totalsize` must be too.
pub unsafe fn parse<'a>(address: usize) -> Result<Fdt<'a>, DtError> {
    // SAFETY: the caller guarantees the mapping.
    unsafe { Fdt::from_ptr(address as *const u8) }.map_err(|_| DtError::BadHeader)
}

fn first_reg(node: &FdtNode) -> Option<Region> {
    let r = node.reg()?.next()?;
    Some(Region {
        base: r.starting_address as u64,
        size: r.size.unwrap_or(0) as u64,
    })
}

fn cells(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
}

fn cells_to_u64(cells: &[u32]) -> u64 {
    cells.iter().fold(0u64, |acc, c| (acc << 32) | u64::from(*c))
}

/// Reads the memory banks from `/memory`.
///
/// # Errors
/// [`DtError::Missing`] when there is none.
pub fn memory(fdt: &Fdt) -> Result<heapless::Vec<Region, 4>, DtError> {
    let mut banks = heapless::Vec::new();
    for r in fdt.memory().regions() {
        let _ = banks.push(Region {
            base: r.starting_address as u64,
            size: r.size.unwrap_or(0) as u64,
        });
    }
    if banks.is_empty() {
        Err(DtError::Missing("memory"))
    } else {
        Ok(banks)
    }
}

/// The console UART: `/chosen/stdout-path` when it is a UART the console drives (a PL011 or an LPUART), else the
/// first PL011, else the first LPUART.
///
/// # Errors
/// [`DtError::Missing`] when there is no such UART (or it has no `reg`).
pub fn console(fdt: &Fdt) -> Result<Uart, DtError> {
    // `stdout-path` names a path or an alias, with options after a ':' ("serial0:115200n8"), which the fdt
    // crate's `stdout` does not strip.
    let chosen = fdt
        .find_node("/chosen")
        .and_then(|chosen| chosen.property("stdout-path")?.as_str())
        .and_then(|path| fdt.find_node(path.split(':').next()?))
        .and_then(|n| Some((uart_kind(&n)?, n)));
    let (kind, node) = chosen
        .or_else(|| {
            UART_COMPATIBLES
                .iter()
                .find_map(|(kind, names)| Some((*kind, fdt.find_compatible(names)?)))
        })
        .ok_or(DtError::Missing("a PL011 or LPUART console"))?;
    // The UART's registers as the CPU sees them, through every enclosing bus's `ranges` (an SoC's UARTs sit
    // inside bus nodes).
    let (base, size) = smmuv3_board_dt::describe::registers(fdt, node).map_err(DtError::Describe)?;
    Ok(Uart {
        kind,
        region: Region { base, size },
    })
}

/// The SMMUv3 the scenarios drive (public so that the boot can list its platform masters): the one the PCIe host's `iommu-map` names (its first entry's phandle), where
/// the tree has several; else the tree's first `arm,smmu-v3` node.
pub fn smmu_node<'b, 'a>(fdt: &'b Fdt<'a>) -> Option<FdtNode<'b, 'a>> {
    let named = fdt
        .find_compatible(&["pci-host-ecam-generic"])
        .and_then(|host| host.property("iommu-map"))
        .and_then(|map| cells(map.value).nth(1))
        .and_then(|phandle| fdt.find_phandle(phandle))
        .filter(|node| {
            node.compatible()
                .is_some_and(|c| c.all().any(|name| name == "arm,smmu-v3"))
        });
    named.or_else(|| fdt.find_compatible(&["arm,smmu-v3"]))
}

/// The `arm,smmu-v3` node (the PCIe host's, where the tree has several): registers (translated through every
/// enclosing bus's `ranges`), interrupts by name, coherency (`smmuv3_board_dt::smmu_description`, host-tested on
/// QEMU's and a SoC's trees).
///
/// # Errors
/// [`DtError::Missing`] when the tree describes no SMMUv3, [`DtError::Describe`] when its node cannot be read
/// (no `reg`, registers no enclosing `ranges` reaches, interrupts that are not a GIC's).
pub fn smmu(fdt: &Fdt) -> Result<SmmuDescription, DtError> {
    let node = smmu_node(fdt).ok_or(DtError::Missing("arm,smmu-v3 node"))?;
    smmuv3_board_dt::smmu_description(fdt, node).map_err(DtError::Describe)
}

/// What [`pcie`] reports missing when the tree has no ECAM host at all (any other `Missing` is a host that is
/// there, malformed).
const PCIE_NODE: &str = "pci-host-ecam-generic node";

/// The `pci-host-ecam-generic` node: ECAM, bus range, windows, `iommu-map` (its entries for the SMMU [`smmu`]
/// picks) and `iommu-map-mask`.
///
/// # Errors
/// [`DtError::Missing`] without such a node, [`DtError::Malformed`] for a `bus-range` or `ranges` of the wrong
/// length, [`DtError::Describe`] for an `iommu-map` or `iommu-map-mask` of the wrong length, a `bus-range` whose start is past its end, or an ECAM `reg` smaller
/// than one bus.
pub fn pcie(fdt: &Fdt) -> Result<PcieHost, DtError> {
    let node = fdt
        .find_compatible(&["pci-host-ecam-generic"])
        .ok_or(DtError::Missing(PCIE_NODE))?;
    let mut host = PcieHost {
        ecam: first_reg(&node).ok_or(DtError::Missing("ECAM reg"))?,
        ..Default::default()
    };
    // ECAM gives each bus 1 MiB, from the first bus of the range on.
    let ecam_buses = host.ecam.size >> 20;
    if ecam_buses == 0 {
        return Err(DtError::Malformed("ECAM reg (smaller than one bus)"));
    }
    host.bus_range = match node.property("bus-range").map(|p| p.value) {
        Some(value) if value.len() == 8 => {
            let mut r = cells(value);
            let (first, last) = (r.next().unwrap_or(0), r.next().unwrap_or(0));
            if first > last || first > 255 {
                return Err(DtError::Malformed("bus-range"));
            }
            (first as u8, last.min(255) as u8)
        }
        Some(_) => return Err(DtError::Malformed("bus-range")),
        None => (0, 255),
    };
    // An ECAM region that covers only part of the bus range limits it: configuration accesses to the buses
    // beyond it would land outside the region (Linux cuts the range the same way).
    let last_covered = u64::from(host.bus_range.0) + ecam_buses - 1;
    host.bus_range.1 = host.bus_range.1.min(last_covered.min(255) as u8);
    // `ranges` gives CPU addresses in the #address-cells of the host's parent, which need not be the root (a host
    // under a `/soc` bus node): the first `reg` entry, written in those cells, tells how many there are.
    let parent_address_cells = node
        .raw_reg()
        .and_then(|mut r| r.next())
        .map_or(fdt.root().cell_sizes().address_cells, |r| r.address.len() / 4);
    let size_cells = node.cell_sizes().size_cells;
    if let Some(ranges) = node.property("ranges") {
        // Entries are taken one at a time: a long `ranges` must not overflow a fixed buffer.
        let stride = 4 * (3 + parent_address_cells + size_cells);
        if parent_address_cells > 2 || size_cells > 2 || !ranges.value.len().is_multiple_of(stride) {
            return Err(DtError::Malformed("ranges"));
        }
        for entry in ranges.value.chunks_exact(stride) {
            let e: heapless::Vec<u32, 7> = cells(entry).collect();
            let kind = match (e[0] >> 24) & 0x3 {
                1 => WindowKind::Io,
                2 => WindowKind::Mem32,
                3 => WindowKind::Mem64,
                _ => continue,
            };
            let _ = host.windows.push(PciWindow {
                kind,
                prefetchable: e[0] & (1 << 30) != 0,
                pci_base: cells_to_u64(&e[1..3]),
                cpu_base: cells_to_u64(&e[3..3 + parent_address_cells]),
                size: cells_to_u64(&e[3 + parent_address_cells..]),
            });
        }
    }
    if let Some(smmu) = smmu_node(fdt) {
        (host.iommu_map, host.iommu_map_mask) = smmuv3_board_dt::iommu_map(node, smmu).map_err(DtError::Describe)?;
    }
    Ok(host)
}

/// QEMU's fw_cfg (`qemu,fw-cfg-mmio`), if the machine has one.
pub fn fw_cfg(fdt: &Fdt) -> Option<Region> {
    first_reg(&fdt.find_compatible(&["qemu,fw-cfg-mmio"])?)
}

/// Whether the tree describes a GICv2 (`arm,cortex-a15-gic`, `arm,gic-400` and kin), which the firmware does not
/// drive: QEMU virt's `gic-version=2`.
pub fn has_gic_v2(fdt: &Fdt) -> bool {
    fdt.find_compatible(&[
        "arm,cortex-a15-gic",
        "arm,cortex-a9-gic",
        "arm,cortex-a7-gic",
        "arm,gic-400",
        "arm,arm11mp-gic",
    ])
    .is_some()
}

/// The GICv3 (`arm,gic-v3`), if described.
pub fn gic(fdt: &Fdt) -> Option<Gic> {
    let node = fdt.find_compatible(&["arm,gic-v3"])?;
    let mut regs = node.reg()?;
    let mut next = || {
        regs.next().map(|r| Region {
            base: r.starting_address as u64,
            size: r.size.unwrap_or(0) as u64,
        })
    };
    Some(Gic {
        distributor: next()?,
        redistributors: next()?,
    })
}

/// What a board knows about itself without asking a device tree: its one static description. Every `Some` (and
/// a non-empty `memory`) is used where the tree is silent or absent; the tree wins where it has the answer.
#[derive(Clone, Debug, Default)]
pub struct StaticDescription {
    /// RAM banks.
    pub memory: heapless::Vec<Region, 4>,
    /// The console.
    pub uart: Option<Uart>,
    /// The SMMU.
    pub smmu: Option<SmmuDescription>,
    /// The PCIe host behind the SMMU.
    pub pcie: Option<PcieHost>,
    /// QEMU's fw_cfg.
    pub fw_cfg: Option<Region>,
    /// The interrupt controller.
    pub gic: Option<Gic>,
    /// The CPUs' affinities (MPIDR format), when the tree does not list them.
    pub cpus: Cpus,
    /// Bytes the board reserves for the live-update handover region when its tree names none (a `/reserved-memory`
    /// child with `compatible = "smmuv3,handover-region"`, see [`crate::handover`]): the top of the RAM bank holding
    /// the image, just below the reset note (see `power`), kept out of the frame pool from the first boot so that
    /// the next image finds it untouched. Each board states its own. 0: no handover region.
    pub handover_bytes: u64,
    /// The region grows with the RAM bank: at least `1 / handover_share` of it (0: never more than
    /// `handover_bytes`). A server preserving large domains needs their page tables there (a domain's memory is
    /// one of the region's 16 arenas).
    pub handover_share: u64,
    /// Bytes at the top of the RAM bank holding the image that the boot loader rewrites at every boot (U-Boot
    /// relocates its code, heap, stack and page tables to the top of its first bank), so that nothing a warm reset
    /// must find again can live there: kept from the frame pools, the reset notes and the board's handover region,
    /// and a tree's handover region there is refused. 0: the boot loader leaves the bank alone (QEMU's loaders).
    pub boot_loader_top: u64,
}

/// The tree's answer when it has one, else the board's; a malformed tree entry is an error, not a fallback.
fn pick<T>(from_tree: Option<Result<T, DtError>>, from_board: Option<T>, what: &'static str) -> Result<T, DtError> {
    match from_tree {
        Some(Ok(value)) => Ok(value),
        Some(Err(DtError::Missing(_))) | None => from_board.ok_or(DtError::Missing(what)),
        Some(Err(e)) => Err(e),
    }
}

/// The console UART, from the tree (see [`console`]) or the board.
///
/// # Errors
/// [`DtError::Missing`] when neither knows one.
pub fn console_of(fdt: Option<&Fdt>, board: &StaticDescription) -> Result<Uart, DtError> {
    pick(fdt.map(console), board.uart, "a PL011 or LPUART console")
}

/// The whole platform: each device from the tree where it describes it, else from the board's static description.
///
/// # Errors
/// [`DtError::Missing`] for a device neither describes; [`DtError::Malformed`] for a malformed tree property.
pub fn platform(fdt: Option<&Fdt>, board: &StaticDescription) -> Result<Platform, DtError> {
    let board_memory = (!board.memory.is_empty()).then(|| board.memory.clone());
    Ok(Platform {
        memory: pick(fdt.map(memory), board_memory, "memory")?,
        uart: console_of(fdt, board)?,
        smmu: pick(fdt.map(smmu), board.smmu, "arm,smmu-v3 node")?,
        pcie: match fdt.map(pcie) {
            Some(Ok(host)) => Some(host),
            Some(Err(DtError::Missing(PCIE_NODE))) | None => board.pcie.clone(),
            Some(Err(e)) => return Err(e),
        },
        fw_cfg: fdt.and_then(fw_cfg).or(board.fw_cfg),
        gic: fdt.and_then(gic).or(board.gic),
        cpus: pick(fdt.map(cpus), Some(board.cpus.clone()), "CPUs")?,
        masters: heapless::Vec::new(),
        masters_complete: true,
    })
}

/// The CPUs under `/cpus`: each `cpu` node's `reg` (one or two cells, as `/cpus`'s `#address-cells` says), in tree
/// order, skipping nodes whose `status` is not `okay`; at most [`crate::cpus::MAX_CPUS`] (the rest are left out).
///
/// # Errors
/// [`DtError::Missing`] without `/cpus` or without a CPU in it (the board's list then applies);
/// [`DtError::Malformed`] for a `reg` that is not one address.
pub fn cpus(fdt: &Fdt) -> Result<Cpus, DtError> {
    let parent = fdt.find_node("/cpus").ok_or(DtError::Missing("/cpus"))?;
    let cells = parent
        .property("#address-cells")
        .and_then(|p| p.as_usize())
        .unwrap_or(2);
    let mut list = Cpus::new();
    for node in parent.children() {
        if node.name.split('@').next() != Some("cpu") {
            continue;
        }
        if node
            .property("status")
            .and_then(|p| p.as_str())
            .is_some_and(|status| status != "okay" && status != "ok")
        {
            continue;
        }
        let Some(reg) = node.property("reg") else {
            return Err(DtError::Malformed("a /cpus/cpu node without reg"));
        };
        let affinity = match (cells, reg.value.len()) {
            (1, 4) => u64::from(u32::from_be_bytes(reg.value.try_into().unwrap_or_default())),
            (2, 8) => u64::from_be_bytes(reg.value.try_into().unwrap_or_default()),
            _ => return Err(DtError::Malformed("a /cpus/cpu reg that is not one address")),
        };
        if list.push(affinity).is_err() {
            break;
        }
    }
    if list.is_empty() {
        return Err(DtError::Missing("a CPU under /cpus"));
    }
    Ok(list)
}
