//! PCI enumeration through ECAM: walk the host's buses depth-first, number every bridge's secondary and
//! subordinate buses, size and assign memory BARs from the host's windows, program each bridge's memory windows
//! around what lies below it, and enable memory decoding (and, on bridges, forwarding of DMA upstream).
//!
//! Real PCIe puts nearly every endpoint behind a root port, often behind a switch: an endpoint's requester ID is
//! `(bus << 8) | devfn` on the bus number given to its bridge here, and the SMMU's StreamID comes from it through
//! the `iommu-map`. A bridge left with secondary bus 0 would make two buses answer as bus 0.

use core::fmt;

use crate::dt::{PciWindow, PcieHost, WindowKind};
use crate::time;

/// Configuration space offsets (PCI Local Bus 3.0, type 0 header).
mod cfg {
    pub const VENDOR_DEVICE: usize = 0x00;
    pub const COMMAND: usize = 0x04;
    pub const CLASS_REVISION: usize = 0x08;
    pub const HEADER_TYPE_DWORD: usize = 0x0c;
    pub const BAR0: usize = 0x10;
    /// Status register (upper half of the COMMAND dword) bit 4: the function has a capability list.
    pub const STATUS_CAPABILITIES: u32 = 1 << (16 + 4);
    /// Offset of the capability list's first entry.
    pub const CAPABILITIES_POINTER: usize = 0x34;
    /// Capability ID of the PCI Express capability.
    pub const CAP_ID_PCIE: u32 = 0x10;
    /// PCI Express capability, Device/Port Type: Root Port, Downstream Port of a switch, PCI/PCI-X to PCIe
    /// bridge: ports whose secondary side is a PCIe link, with only device 0 on it.
    pub const PORT_TYPES_WITH_ONE_DEVICE: [u32; 3] = [0x4, 0x6, 0x8];
    pub const COMMAND_MEMORY: u32 = 1 << 1;
    pub const COMMAND_BUS_MASTER: u32 = 1 << 2;
    /// Type 1 header: primary, secondary, subordinate bus numbers and the secondary latency timer.
    pub const BUS_NUMBERS: usize = 0x18;
    /// Type 1 header: I/O base and limit (low bytes) and the secondary status.
    pub const IO_BASE_LIMIT: usize = 0x1c;
    /// Type 1 header: memory base (bits [15:4] = address [31:20]) and limit.
    pub const MEMORY_BASE_LIMIT: usize = 0x20;
    /// Type 1 header: prefetchable memory base and limit (low 16 bits each; bits [3:0] = 1: 64-bit).
    pub const PREFETCH_BASE_LIMIT: usize = 0x24;
    /// Type 1 header: upper 32 bits of the prefetchable base and limit.
    pub const PREFETCH_BASE_UPPER: usize = 0x28;
    pub const PREFETCH_LIMIT_UPPER: usize = 0x2c;
    /// Bridge windows are aligned to 1 MiB.
    pub const WINDOW_ALIGN: u64 = 1 << 20;
}

/// Bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
}

impl Bdf {
    /// The requester ID: bus << 8 | device << 3 | function.
    pub fn requester_id(&self) -> u32 {
        u32::from(self.bus) << 8 | u32::from(self.device) << 3 | u32::from(self.function)
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// An assigned memory BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// CPU physical address.
    pub cpu_address: u64,
    /// Size in bytes.
    pub size: u64,
}

/// One PCI function.
#[derive(Clone, Copy, Debug)]
pub struct Function {
    /// Where it is.
    pub bdf: Bdf,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code (base, sub, interface) and revision.
    pub class_revision: u32,
    /// Memory BARs by index; `None` where unimplemented, I/O, or the upper half of a 64-bit BAR (a bridge has
    /// two).
    pub bars: [Option<Bar>; 6],
    /// For a bridge (type 1 header): the buses behind it and the windows it forwards.
    pub bridge: Option<BridgeSetup>,
}

/// How enumeration configured a bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BridgeSetup {
    /// Its secondary bus (the bus right behind it).
    pub secondary: u8,
    /// The highest bus number behind it.
    pub subordinate: u8,
    /// The non-prefetchable memory window (CPU addresses, end exclusive), if anything behind it needs one.
    pub memory: Option<(u64, u64)>,
    /// The 64-bit prefetchable memory window (CPU addresses, end exclusive), if anything behind it needs one.
    pub prefetchable: Option<(u64, u64)>,
}

/// Why enumeration failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciError {
    /// No window can hold a BAR of this size.
    NoSpaceForBar {
        /// The function.
        bdf: Bdf,
        /// BAR index.
        bar: u8,
        /// Size wanted.
        size: u64,
    },
    /// More functions than the firmware keeps track of.
    TooManyFunctions,
    /// A bridge needs a bus number beyond the host's bus range.
    OutOfBusNumbers {
        /// The bridge.
        bdf: Bdf,
    },
}

impl fmt::Display for PciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PciError::NoSpaceForBar { bdf, bar, size } => {
                write!(f, "no PCI window space for BAR{bar} ({size:#x} bytes) of {bdf}")
            }
            PciError::TooManyFunctions => f.write_str("more PCI functions than the firmware tracks"),
            PciError::OutOfBusNumbers { bdf } => {
                write!(
                    f,
                    "no bus number left for the bridge at {bdf} within the host's bus range"
                )
            }
        }
    }
}

/// ECAM access to one host bridge's configuration space.
pub struct Ecam {
    base: usize,
    buses: (u8, u8),
}

impl Ecam {
    /// Wraps the ECAM region of `host`.
    ///
    /// # Safety
    /// The ECAM region must be identity-mapped as device memory and used by nothing else.
    pub unsafe fn new(host: &PcieHost) -> Self {
        Ecam {
            base: host.ecam.base as usize,
            buses: host.bus_range,
        }
    }

    fn address(&self, bdf: Bdf, offset: usize) -> *mut u32 {
        let b = usize::from(bdf.bus - self.buses.0);
        (self.base + (b << 20 | usize::from(bdf.device) << 15 | usize::from(bdf.function) << 12 | (offset & 0xffc)))
            as *mut u32
    }

    /// Reads a configuration dword.
    pub fn read(&self, bdf: Bdf, offset: usize) -> u32 {
        // SAFETY: `new`'s contract maps the ECAM; the address stays inside the function's 4 KiB of it.
        unsafe { self.address(bdf, offset).read_volatile() }
    }

    /// Writes a configuration dword.
    pub fn write(&self, bdf: Bdf, offset: usize, value: u32) {
        // SAFETY: as in `read`.
        unsafe { self.address(bdf, offset).write_volatile(value) }
    }

    /// Sets bits of the command register.
    pub fn enable(&self, bdf: Bdf, bits: u32) {
        let command = self.read(bdf, cfg::COMMAND) & 0xffff;
        self.write(bdf, cfg::COMMAND, command | bits);
    }

    /// The vendor and device ID dword of the function at `bdf`, or `None` when no function is there: vendor 0xffff
    /// (all-ones, the answer to a request nothing claims) or 0x0000 (no valid vendor, what some hosts return
    /// instead). A function still coming out of reset may answer the vendor ID read with 0x0001, Configuration
    /// Request Retry Status (when earlier firmware enabled CRS Software Visibility in its root port): it is asked
    /// again for up to the 1 s a function may take to become ready (PCIe base spec 6.6.1), and then counted absent.
    fn probe(&self, bdf: Bdf) -> Option<u32> {
        let mut id = self.read(bdf, cfg::VENDOR_DEVICE);
        if id & 0xffff == 0x0001 {
            let deadline = time::deadline_us(1_000_000);
            while id & 0xffff == 0x0001 && !time::expired(deadline) {
                core::hint::spin_loop();
                id = self.read(bdf, cfg::VENDOR_DEVICE);
            }
        }
        match id & 0xffff {
            0xffff | 0x0000 | 0x0001 => None,
            _ => Some(id),
        }
    }

    /// The Device/Port Type of the function's PCI Express capability (PCIe base spec 7.5.3.2), or `None` for a
    /// conventional PCI function.
    fn pcie_port_type(&self, bdf: Bdf) -> Option<u32> {
        if self.read(bdf, cfg::COMMAND) & cfg::STATUS_CAPABILITIES == 0 {
            return None;
        }
        let mut next = self.read(bdf, cfg::CAPABILITIES_POINTER) & 0xfc;
        // Bounded: at most 48 capabilities fit in the 192 bytes after the header, a malformed list may loop.
        for _ in 0..48 {
            if next < 0x40 {
                return None;
            }
            let header = self.read(bdf, next as usize);
            if header & 0xff == cfg::CAP_ID_PCIE {
                return Some((header >> 20) & 0xf);
            }
            next = (header >> 8) & 0xfc;
        }
        None
    }

    /// Enables memory decoding and bus mastering (so the function may DMA).
    pub fn enable_memory_and_bus_master(&self, bdf: Bdf) {
        self.enable(bdf, cfg::COMMAND_MEMORY | cfg::COMMAND_BUS_MASTER);
    }
}

/// Calls `visit` with the location, vendor and device ID dword, and header type of every function on devices
/// `0..devices` of `bus`, in order; functions 1 to 7 only of a multi-function device (header type bit 7).
fn each_function(
    ecam: &Ecam,
    bus: u8,
    devices: u8,
    mut visit: impl FnMut(Bdf, u32, u32) -> Result<(), PciError>,
) -> Result<(), PciError> {
    for device in 0..devices {
        for function in 0..8u8 {
            let bdf = Bdf { bus, device, function };
            let Some(id) = ecam.probe(bdf) else {
                if function == 0 {
                    break;
                }
                continue;
            };
            let header = (ecam.read(bdf, cfg::HEADER_TYPE_DWORD) >> 16) & 0xff;
            visit(bdf, id, header)?;
            if function == 0 && header & 0x80 == 0 {
                break;
            }
        }
    }
    Ok(())
}

/// Bump allocator over one window.
struct WindowAllocator {
    window: PciWindow,
    next: u64,
}

impl WindowAllocator {
    /// Allocates from the first `limit` bytes of `window`.
    fn new(window: PciWindow, limit: u64) -> Self {
        WindowAllocator {
            window: PciWindow {
                size: window.size.min(limit),
                ..window
            },
            next: window.pci_base,
        }
    }

    fn take(&mut self, size: u64) -> Option<u64> {
        let start = self.next.next_multiple_of(size);
        let end = start.checked_add(size)?;
        (end <= self.window.pci_base + self.window.size).then(|| {
            self.next = end;
            start
        })
    }

    /// Aligns the next allocation to a bridge window's granule and returns it.
    fn align_for_bridge(&mut self) -> u64 {
        self.next = self.next.next_multiple_of(cfg::WINDOW_ALIGN);
        self.next
    }

    fn to_cpu(&self, pci_address: u64) -> u64 {
        pci_address - self.window.pci_base + self.window.cpu_base
    }
}

/// The functions found below a host bridge, bridges before what lies behind them.
pub type Functions = heapless::Vec<Function, 64>;

/// How much of a 64-bit window the firmware maps, and so assigns BARs from: the first GiB.
pub const MEM64_MAPPED: u64 = 1 << 30;

struct Enumeration<'a> {
    ecam: &'a Ecam,
    last_bus: u8,
    next_bus: u8,
    /// Non-prefetchable BARs, and 32-bit prefetchable ones, come from the 32-bit window.
    mem32: Option<WindowAllocator>,
    /// 64-bit prefetchable BARs come from the first [`MEM64_MAPPED`] bytes of the 64-bit window (or the 32-bit
    /// window when the host has none, or a bridge above them no 64-bit prefetchable window).
    mem64: Option<WindowAllocator>,
    /// Whether every bridge above the bus being scanned has a 64-bit prefetchable window, so that a BAR there may
    /// be given a [`Self::mem64`] address: a bridge with a 32-bit prefetchable window, or none, cannot forward it.
    mem64_reachable: bool,
    found: Functions,
}

/// Enumerates every bus below the host bridge depth-first, as firmware does on real PCIe: numbers each bridge's
/// secondary and subordinate buses, assigns memory BARs (32-bit and non-prefetchable ones from the 32-bit window,
/// 64-bit prefetchable ones from the first [`MEM64_MAPPED`] bytes of the 64-bit window), programs each bridge's
/// memory and prefetchable windows around what lies behind it (I/O forwarding off), and enables memory decoding,
/// and on bridges bus mastering too (a bridge forwards no DMA upstream without it). An endpoint's bus mastering
/// is left to its driver.
///
/// # Errors
/// [`PciError::NoSpaceForBar`] when the windows run out, [`PciError::OutOfBusNumbers`],
/// [`PciError::TooManyFunctions`].
pub fn enumerate(ecam: &Ecam, host: &PcieHost) -> Result<Functions, PciError> {
    let window = |kind| host.windows.iter().find(|w| w.kind == kind).copied();
    let mut e = Enumeration {
        ecam,
        last_bus: host.bus_range.1,
        next_bus: host.bus_range.0,
        mem32: window(WindowKind::Mem32).map(|w| WindowAllocator::new(w, u64::MAX)),
        mem64: window(WindowKind::Mem64).map(|w| WindowAllocator::new(w, MEM64_MAPPED)),
        mem64_reachable: true,
        found: Functions::new(),
    };
    e.scan_bus(host.bus_range.0, 32)?;
    Ok(e.found)
}

impl Enumeration<'_> {
    /// Scans devices `0..devices` of `bus`: all 32 on the root bus and behind conventional bridges and switch
    /// upstream ports, only device 0 on the link behind a PCIe downstream port.
    fn scan_bus(&mut self, bus: u8, devices: u8) -> Result<(), PciError> {
        let ecam = self.ecam;
        // Bridges here may still carry bus numbers from earlier firmware that overlap those given below: a
        // sibling not yet renumbered would claim configuration requests meant for buses behind the first. Stop
        // them all forwarding before any is scanned behind (Linux's first pass does the same).
        each_function(ecam, bus, devices, |bdf, _, header| {
            if header & 0x7f == 1 {
                let numbers = ecam.read(bdf, cfg::BUS_NUMBERS);
                ecam.write(bdf, cfg::BUS_NUMBERS, numbers & 0xff00_0000);
            }
            Ok(())
        })?;
        each_function(ecam, bus, devices, |bdf, id, header| {
            let mut f = Function {
                bdf,
                vendor: id as u16,
                device: (id >> 16) as u16,
                class_revision: ecam.read(bdf, cfg::CLASS_REVISION),
                bars: [None; 6],
                bridge: None,
            };
            match header & 0x7f {
                0 => self.assign_bars(&mut f, 6)?,
                1 => {
                    self.assign_bars(&mut f, 2)?;
                    f.bridge = Some(self.configure_bridge(bdf)?);
                }
                _ => {}
            }
            // What lies behind a bridge was found while configuring it: list the bridge before it.
            let behind = |g: &Function| {
                f.bridge
                    .is_some_and(|b| (b.secondary..=b.subordinate).contains(&g.bdf.bus))
            };
            let position = self.found.iter().position(behind).unwrap_or(self.found.len());
            self.found.insert(position, f).map_err(|_| PciError::TooManyFunctions)
        })
    }

    /// Numbers the bridge's buses, scans behind it, and opens its windows over what was assigned there.
    fn configure_bridge(&mut self, bdf: Bdf) -> Result<BridgeSetup, PciError> {
        let ecam = self.ecam;
        if self.next_bus >= self.last_bus {
            return Err(PciError::OutOfBusNumbers { bdf });
        }
        self.next_bus += 1;
        let secondary = self.next_bus;
        // Decoding and forwarding off while it is set up; the subordinate bus open to the end of the range until
        // the scan below is done, so configuration cycles reach every bus that may lie behind it.
        let command = ecam.read(bdf, cfg::COMMAND) & 0xffff;
        ecam.write(bdf, cfg::COMMAND, command & !0x7);
        let numbers = |subordinate: u8| u32::from(bdf.bus) | u32::from(secondary) << 8 | u32::from(subordinate) << 16;
        ecam.write(bdf, cfg::BUS_NUMBERS, numbers(self.last_bus));
        let memory_start = self.mem32.as_mut().map(WindowAllocator::align_for_bridge);
        // Bits [3:0] of the prefetchable base are read-only, 0001b for a 64-bit window; 0000b means a 32-bit one,
        // and the whole register reads 0 when the bridge has no prefetchable window (PCI-to-PCI Bridge
        // Architecture spec). Below such a bridge, 64-bit prefetchable BARs take 32-bit addresses in its memory
        // window instead.
        let prefetch64 = ecam.read(bdf, cfg::PREFETCH_BASE_LIMIT) & 0xf == 0x1;
        let outer_reachable = self.mem64_reachable;
        self.mem64_reachable &= prefetch64;
        let prefetch_start = match self.mem64.as_mut() {
            Some(a) if self.mem64_reachable => Some(a.align_for_bridge()),
            _ => None,
        };
        // A PCIe link carries only device 0: a host whose ports do not filter Type 0 configuration requests by
        // device number shows that device at all 32 numbers, and each copy would get its BARs again (Linux's
        // `only_one_child`). Functions beyond 7 of an ARI device stay hidden: ARI forwarding is not enabled.
        let devices = match ecam.pcie_port_type(bdf) {
            Some(t) if cfg::PORT_TYPES_WITH_ONE_DEVICE.contains(&t) => 1,
            _ => 32,
        };
        self.scan_bus(secondary, devices)?;
        self.mem64_reachable = outer_reachable;
        let subordinate = self.next_bus;
        ecam.write(bdf, cfg::BUS_NUMBERS, numbers(subordinate));
        // I/O forwarding off (base above limit).
        let io = ecam.read(bdf, cfg::IO_BASE_LIMIT);
        ecam.write(bdf, cfg::IO_BASE_LIMIT, (io & 0xffff_0000) | 0x00f0);

        // A window over what was assigned behind the bridge: (PCI start, PCI end), end exclusive.
        let window = |allocator: &mut Option<WindowAllocator>, start: Option<u64>| {
            let (a, start) = (allocator.as_mut()?, start?);
            let end = a.align_for_bridge();
            (end > start).then_some((start, end, a.to_cpu(start), a.to_cpu(end)))
        };
        let memory = window(&mut self.mem32, memory_start);
        let base_limit =
            |start: u64, end: u64| ((start >> 16) as u32 & 0xfff0) | ((((end - 1) >> 16) as u32) & 0xfff0) << 16;
        match memory {
            Some((start, end, ..)) => ecam.write(bdf, cfg::MEMORY_BASE_LIMIT, base_limit(start, end)),
            // Base above limit: closed.
            None => ecam.write(bdf, cfg::MEMORY_BASE_LIMIT, 0x0000_fff0),
        }
        let prefetchable = window(&mut self.mem64, prefetch_start);
        match prefetchable {
            Some((start, end, ..)) => {
                // Bits [3:0] of base and limit read 0b0001: a 64-bit window.
                ecam.write(bdf, cfg::PREFETCH_BASE_LIMIT, base_limit(start, end) | 0x0001_0001);
                ecam.write(bdf, cfg::PREFETCH_BASE_UPPER, (start >> 32) as u32);
                ecam.write(bdf, cfg::PREFETCH_LIMIT_UPPER, ((end - 1) >> 32) as u32);
            }
            None => {
                ecam.write(bdf, cfg::PREFETCH_BASE_UPPER, 0);
                ecam.write(bdf, cfg::PREFETCH_LIMIT_UPPER, 0);
                ecam.write(bdf, cfg::PREFETCH_BASE_LIMIT, 0x0001_fff1);
            }
        }
        ecam.write(
            bdf,
            cfg::COMMAND,
            (command & !0x1) | cfg::COMMAND_MEMORY | cfg::COMMAND_BUS_MASTER,
        );
        Ok(BridgeSetup {
            secondary,
            subordinate,
            memory: memory.map(|(.., cpu_start, cpu_end)| (cpu_start, cpu_end)),
            prefetchable: prefetchable.map(|(.., cpu_start, cpu_end)| (cpu_start, cpu_end)),
        })
    }

    /// Sizes and assigns the first `count` BARs of `f` (6 for an endpoint, 2 for a bridge).
    fn assign_bars(&mut self, f: &mut Function, count: usize) -> Result<(), PciError> {
        let ecam = self.ecam;
        let bdf = f.bdf;
        // Decoding off while BARs are sized and moved.
        let command = ecam.read(bdf, cfg::COMMAND) & 0xffff;
        ecam.write(bdf, cfg::COMMAND, command & !0x3);
        let mut index = 0;
        while index < count {
            let offset = cfg::BAR0 + 4 * index;
            let original = ecam.read(bdf, offset);
            if original & 1 == 1 {
                // I/O BAR: not used by the devices this firmware drives.
                index += 1;
                continue;
            }
            let is64 = (original >> 1) & 0x3 == 0x2;
            if is64 && index + 1 == count {
                // A 64-bit BAR in the last slot (BAR5, a bridge's BAR1) has no upper half: sizing one would write
                // all-ones to the register after the BARs (a bridge's bus numbers). Malformed: left alone.
                index += 1;
                continue;
            }
            let prefetchable = original & 0x8 != 0;
            ecam.write(bdf, offset, 0xffff_ffff);
            let mut mask = u64::from(ecam.read(bdf, offset) & !0xf);
            if is64 {
                ecam.write(bdf, offset + 4, 0xffff_ffff);
                mask |= u64::from(ecam.read(bdf, offset + 4)) << 32;
            } else if mask != 0 {
                mask |= 0xffff_ffff_0000_0000;
            }
            if mask == 0 {
                ecam.write(bdf, offset, original);
                index += 1;
                continue;
            }
            let size = (!mask).wrapping_add(1);
            let allocator = if is64 && prefetchable && self.mem64_reachable && self.mem64.is_some() {
                self.mem64.as_mut()
            } else {
                self.mem32.as_mut()
            };
            let Some((pci_address, cpu_address)) = allocator.and_then(|a| a.take(size).map(|pci| (pci, a.to_cpu(pci))))
            else {
                return Err(PciError::NoSpaceForBar {
                    bdf,
                    bar: index as u8,
                    size,
                });
            };
            ecam.write(bdf, offset, pci_address as u32);
            if is64 {
                ecam.write(bdf, offset + 4, (pci_address >> 32) as u32);
            }
            f.bars[index] = Some(Bar { cpu_address, size });
            index += if is64 { 2 } else { 1 };
        }
        ecam.write(bdf, cfg::COMMAND, command | cfg::COMMAND_MEMORY);
        Ok(())
    }
}
