//! Driver for QEMU's `edu` PCI device (1234:11e8): identification, liveness, factorial, and its DMA engine,
//! which moves up to 4 KiB between bus addresses and the device's internal buffer.
//!
//! The DMA engine is the firmware's real DMA master behind the SMMU: a bus address it uses is an IOVA once
//! the SMMU translates its stream.

use core::fmt;

use crate::pci::{Bar, Bdf};
use crate::time;

/// PCI vendor ID of QEMU's devices.
pub const VENDOR: u16 = 0x1234;
/// PCI device ID of edu.
pub const DEVICE: u16 = 0x11e8;
/// Device address of edu's internal buffer.
pub const BUFFER: u64 = 0x40000;
/// Size of edu's internal buffer.
pub const BUFFER_SIZE: u64 = 4096;
/// QEMU's default `dma_mask` property: 28 bits.
pub const DEFAULT_DMA_MASK: u64 = (1 << 28) - 1;

mod reg {
    pub const IDENT: usize = 0x00;
    pub const LIVENESS: usize = 0x04;
    pub const FACTORIAL: usize = 0x08;
    pub const STATUS: usize = 0x20;
    pub const DMA_SOURCE: usize = 0x80;
    pub const DMA_DESTINATION: usize = 0x88;
    pub const DMA_COUNT: usize = 0x90;
    pub const DMA_COMMAND: usize = 0x98;
    pub const STATUS_COMPUTING: u32 = 1;
    pub const DMA_START: u64 = 1 << 0;
    pub const DMA_TO_RAM: u64 = 1 << 1;
}

/// Direction of a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Bus address → edu buffer (the device reads memory).
    ToDevice,
    /// edu buffer → bus address (the device writes memory).
    FromDevice,
}

/// Errors of the edu driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EduError {
    /// The identification register does not read 0xXXYY00ED.
    BadIdent(u32),
    /// The liveness register did not return the complement.
    NotAlive {
        /// Written.
        wrote: u32,
        /// Read back.
        read: u32,
    },
    /// A transfer outside the device's 4 KiB buffer (edu would overrun QEMU's own memory).
    BufferRange {
        /// Offset into the buffer.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A bus address the device cannot emit: beyond its DMA mask (edu would silently clamp it).
    BeyondDmaMask {
        /// The last byte's bus address.
        address: u64,
        /// The device's mask.
        mask: u64,
    },
    /// The device did not finish in time.
    Timeout(&'static str),
}

impl fmt::Display for EduError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EduError::BadIdent(v) => write!(f, "edu identification {v:#010x} is not 0x..0000ed"),
            EduError::NotAlive { wrote, read } => {
                write!(f, "edu liveness: wrote {wrote:#x}, read {read:#x}")
            }
            EduError::BufferRange { offset, len } => {
                write!(f, "edu buffer transfer {offset:#x}+{len:#x} outside its 4 KiB buffer")
            }
            EduError::BeyondDmaMask { address, mask } => {
                write!(f, "bus address {address:#x} beyond edu's DMA mask {mask:#x}")
            }
            EduError::Timeout(what) => write!(f, "edu {what} did not complete within its bound"),
        }
    }
}

/// One edu device with its BAR0 mapped.
pub struct Edu {
    regs: usize,
    bdf: Bdf,
    dma_mask: u64,
}

impl Edu {
    /// Wraps the edu at `bdf` whose BAR0 is `bar0` (identity-mapped), whose DMA engine emits bus addresses up to
    /// `dma_mask`.
    ///
    /// # Safety
    /// `bar0` must be edu's BAR0, mapped as device memory, driven by nothing else.
    pub unsafe fn new(bdf: Bdf, bar0: Bar, dma_mask: u64) -> Self {
        Edu {
            regs: bar0.cpu_address as usize,
            bdf,
            dma_mask,
        }
    }

    /// Where it is.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// The DMA mask the driver enforces.
    pub fn dma_mask(&self) -> u64 {
        self.dma_mask
    }

    fn read32(&self, offset: usize) -> u32 {
        // SAFETY: `new`'s contract: BAR0 (1 MiB) is mapped; every offset used is a register inside it.
        unsafe { ((self.regs + offset) as *const u32).read_volatile() }
    }

    fn write32(&self, offset: usize, value: u32) {
        // SAFETY: as in `read32`.
        unsafe { ((self.regs + offset) as *mut u32).write_volatile(value) }
    }

    fn read64(&self, offset: usize) -> u64 {
        // SAFETY: as in `read32`; the DMA registers take 64-bit accesses.
        unsafe { ((self.regs + offset) as *const u64).read_volatile() }
    }

    fn write64(&self, offset: usize, value: u64) {
        // SAFETY: as in `read64`.
        unsafe { ((self.regs + offset) as *mut u64).write_volatile(value) }
    }

    /// Reads and checks the identification register; returns (major, minor) version.
    ///
    /// # Errors
    /// [`EduError::BadIdent`].
    pub fn identify(&self) -> Result<(u8, u8), EduError> {
        let ident = self.read32(reg::IDENT);
        if ident & 0xffff != 0x00ed {
            return Err(EduError::BadIdent(ident));
        }
        Ok(((ident >> 24) as u8, (ident >> 16) as u8))
    }

    /// Writes `value` to the liveness register and checks that it reads back inverted.
    ///
    /// # Errors
    /// [`EduError::NotAlive`].
    pub fn check_liveness(&self, value: u32) -> Result<(), EduError> {
        self.write32(reg::LIVENESS, value);
        let read = self.read32(reg::LIVENESS);
        if read != !value {
            return Err(EduError::NotAlive { wrote: value, read });
        }
        Ok(())
    }

    /// Computes `n!` on the device (its worker thread), waiting at most 1 s.
    ///
    /// # Errors
    /// [`EduError::Timeout`].
    pub fn factorial(&self, n: u32) -> Result<u32, EduError> {
        self.write32(reg::FACTORIAL, n);
        let deadline = time::deadline_us(1_000_000);
        while self.read32(reg::STATUS) & reg::STATUS_COMPUTING != 0 {
            if time::expired(deadline) {
                return Err(EduError::Timeout("factorial"));
            }
            core::hint::spin_loop();
        }
        Ok(self.read32(reg::FACTORIAL))
    }

    /// Moves `len` bytes between bus address `bus_address` and offset `offset` of the device's buffer, and
    /// waits (at most 2 s; edu completes on a 100 ms virtual timer) for the engine to finish.
    ///
    /// A transfer the IOMMU aborts still "completes": check the data and the SMMU's event queue.
    ///
    /// # Errors
    /// [`EduError::BufferRange`] or [`EduError::BeyondDmaMask`] before anything is started; [`EduError::Timeout`].
    pub fn dma(&self, direction: Direction, bus_address: u64, offset: u64, len: u64) -> Result<(), EduError> {
        self.start_dma(direction, bus_address, offset, len)?;
        self.wait_dma()
    }

    /// Starts a DMA as [`Edu::dma`] does, without waiting for it (edu completes it on its 100 ms timer): a DMA in
    /// flight across a hand-off. [`Edu::wait_dma`] waits for it.
    ///
    /// # Errors
    /// As [`Edu::dma`], but no [`EduError::Timeout`] for the transfer itself.
    pub fn start_dma(&self, direction: Direction, bus_address: u64, offset: u64, len: u64) -> Result<(), EduError> {
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > BUFFER_SIZE) {
            return Err(EduError::BufferRange { offset, len });
        }
        let last = bus_address.checked_add(len - 1).ok_or(EduError::BeyondDmaMask {
            address: u64::MAX,
            mask: self.dma_mask,
        })?;
        if last & !self.dma_mask != 0 {
            return Err(EduError::BeyondDmaMask {
                address: last,
                mask: self.dma_mask,
            });
        }
        if self.read64(reg::DMA_COMMAND) & reg::DMA_START != 0 {
            return Err(EduError::Timeout("previous DMA"));
        }
        let (source, destination, command) = match direction {
            Direction::ToDevice => (bus_address, BUFFER + offset, reg::DMA_START),
            Direction::FromDevice => (BUFFER + offset, bus_address, reg::DMA_START | reg::DMA_TO_RAM),
        };
        // Memory the device reads must be written before the engine starts.
        aarch64_cpu::asm::barrier::dsb(aarch64_cpu::asm::barrier::SY);
        self.write64(reg::DMA_SOURCE, source);
        self.write64(reg::DMA_DESTINATION, destination);
        self.write64(reg::DMA_COUNT, len);
        self.write64(reg::DMA_COMMAND, command);
        Ok(())
    }

    /// Whether a DMA is in flight (the command register's start bit: edu clears it when its timer fires).
    pub fn dma_in_flight(&self) -> bool {
        self.read64(reg::DMA_COMMAND) & reg::DMA_START != 0
    }

    /// Waits (up to 2 s) for the DMA in flight, if any, to complete.
    ///
    /// # Errors
    /// [`EduError::Timeout`].
    pub fn wait_dma(&self) -> Result<(), EduError> {
        let deadline = time::deadline_us(2_000_000);
        while self.read64(reg::DMA_COMMAND) & reg::DMA_START != 0 {
            if time::expired(deadline) {
                return Err(EduError::Timeout("DMA"));
            }
            core::hint::spin_loop();
        }
        aarch64_cpu::asm::barrier::dsb(aarch64_cpu::asm::barrier::SY);
        Ok(())
    }
}
