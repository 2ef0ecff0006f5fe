//! PCI enumeration through ECAM: find the functions on the host's buses, size and assign their memory BARs from
//! the host's windows, enable memory decoding and bus mastering.
//!
//! Bridges are reported but not configured: the QEMU machines this firmware targets put every device on bus 0.

use core::fmt;

use crate::dt::{PciWindow, PcieHost, WindowKind};

/// Configuration space offsets (PCI Local Bus 3.0, type 0 header).
mod cfg {
    pub const VENDOR_DEVICE: usize = 0x00;
    pub const COMMAND: usize = 0x04;
    pub const CLASS_REVISION: usize = 0x08;
    pub const HEADER_TYPE_DWORD: usize = 0x0c;
    pub const BAR0: usize = 0x10;
    pub const COMMAND_MEMORY: u32 = 1 << 1;
    pub const COMMAND_BUS_MASTER: u32 = 1 << 2;
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
    /// Memory BARs by index; `None` where unimplemented, I/O, or the upper half of a 64-bit BAR.
    pub bars: [Option<Bar>; 6],
    /// Type 1 (bridge) header: found but not configured.
    pub is_bridge: bool,
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
}

impl fmt::Display for PciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PciError::NoSpaceForBar { bdf, bar, size } => {
                write!(f, "no PCI window space for BAR{bar} ({size:#x} bytes) of {bdf}")
            }
            PciError::TooManyFunctions => f.write_str("more PCI functions than the firmware tracks"),
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

    /// Enables memory decoding and bus mastering (so the function may DMA).
    pub fn enable_memory_and_bus_master(&self, bdf: Bdf) {
        self.enable(bdf, cfg::COMMAND_MEMORY | cfg::COMMAND_BUS_MASTER);
    }
}

/// Bump allocator over one window.
struct WindowAllocator {
    window: PciWindow,
    next: u64,
}

impl WindowAllocator {
    fn take(&mut self, size: u64) -> Option<u64> {
        let start = self.next.next_multiple_of(size);
        let end = start.checked_add(size)?;
        (end <= self.window.pci_base + self.window.size).then(|| {
            self.next = end;
            start
        })
    }
}

/// The functions found on a host bridge.
pub type Functions = heapless::Vec<Function, 32>;

/// Enumerates the host's first bus, assigns every memory BAR from the windows (32-bit BARs from the 32-bit
/// window, 64-bit BARs from the 32-bit window too: the firmware's identity map covers only the low windows),
/// and enables memory decoding. Bus mastering is left to each device's driver.
///
/// # Errors
/// [`PciError::NoSpaceForBar`] when the windows run out, [`PciError::TooManyFunctions`].
pub fn enumerate(ecam: &Ecam, host: &PcieHost) -> Result<Functions, PciError> {
    let mut mem32 = host
        .windows
        .iter()
        .find(|w| w.kind == WindowKind::Mem32)
        .map(|w| WindowAllocator {
            window: *w,
            next: w.pci_base,
        });
    let mut found = Functions::new();
    let bus = host.bus_range.0;
    for device in 0..32u8 {
        for function in 0..8u8 {
            let bdf = Bdf { bus, device, function };
            let id = ecam.read(bdf, cfg::VENDOR_DEVICE);
            if id & 0xffff == 0xffff {
                if function == 0 {
                    break;
                }
                continue;
            }
            let header = (ecam.read(bdf, cfg::HEADER_TYPE_DWORD) >> 16) & 0xff;
            let mut f = Function {
                bdf,
                vendor: id as u16,
                device: (id >> 16) as u16,
                class_revision: ecam.read(bdf, cfg::CLASS_REVISION),
                bars: [None; 6],
                is_bridge: header & 0x7f == 1,
            };
            if header & 0x7f == 0 {
                assign_bars(ecam, &mut f, mem32.as_mut())?;
            }
            found.push(f).map_err(|_| PciError::TooManyFunctions)?;
            if function == 0 && header & 0x80 == 0 {
                break;
            }
        }
    }
    Ok(found)
}

fn assign_bars(ecam: &Ecam, f: &mut Function, mut window: Option<&mut WindowAllocator>) -> Result<(), PciError> {
    let bdf = f.bdf;
    // Decoding off while BARs are sized and moved.
    let command = ecam.read(bdf, cfg::COMMAND) & 0xffff;
    ecam.write(bdf, cfg::COMMAND, command & !0x3);
    let mut index = 0;
    while index < 6 {
        let offset = cfg::BAR0 + 4 * index;
        let original = ecam.read(bdf, offset);
        if original & 1 == 1 {
            // I/O BAR: not used by the devices this firmware drives.
            index += 1;
            continue;
        }
        let is64 = (original >> 1) & 0x3 == 0x2;
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
        let pci_address = window
            .as_deref_mut()
            .and_then(|w| w.take(size))
            .ok_or(PciError::NoSpaceForBar {
                bdf,
                bar: index as u8,
                size,
            })?;
        ecam.write(bdf, offset, pci_address as u32);
        if is64 {
            ecam.write(bdf, offset + 4, (pci_address >> 32) as u32);
        }
        let w = window.as_deref().map(|w| w.window).unwrap_or(PciWindow {
            kind: WindowKind::Mem32,
            prefetchable: false,
            pci_base: 0,
            cpu_base: 0,
            size: 0,
        });
        f.bars[index] = Some(Bar {
            cpu_address: pci_address - w.pci_base + w.cpu_base,
            size,
        });
        index += if is64 { 2 } else { 1 };
    }
    ecam.write(bdf, cfg::COMMAND, command | cfg::COMMAND_MEMORY);
    Ok(())
}
