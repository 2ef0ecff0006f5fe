//! QEMU's fw_cfg device, MMIO flavour (`qemu,fw-cfg-mmio`): read named files.
//!
//! Written here rather than taken from the `qemu-fw-cfg` crate: its 0.2.0 MMIO reader reads whole 8-byte words
//! even for shorter reads, so it consumes 4 bytes too many after the directory's count and misparses every
//! entry on Arm. This reader uses the device's DMA interface when it offers one (as EDK2 and Linux do: one register
//! write moves a whole file, where the data register costs a trap per byte, about 27 ms for virt's ACPI tables), and
//! byte accesses of the data register, which the device defines for any length, when it does not.

/// Data register (any width; bytes come out in stream order).
const DATA: usize = 0x0;
/// Selector register (16-bit, big-endian).
const SELECTOR: usize = 0x8;
/// DMA address register (64-bit, big-endian; a 64-bit write, or the write of its low half, starts the transfer).
const DMA_ADDRESS: usize = 0x10;
/// Signature item.
const KEY_SIGNATURE: u16 = 0x0000;
/// Feature bitmap item (32-bit, little-endian).
const KEY_FEATURES: u16 = 0x0001;
/// Feature bit: the DMA interface is present.
const FEATURE_DMA: u32 = 1 << 1;
/// DMA control: the device reports an error.
const DMA_ERROR: u32 = 1 << 0;
/// DMA control: read `length` bytes of the selected item to `address`.
const DMA_READ: u32 = 1 << 1;

/// The DMA interface's access descriptor (every field big-endian); the device clears `control` when it is done,
/// or leaves [`DMA_ERROR`] set.
#[repr(C, align(16))]
struct DmaAccess {
    control: u32,
    length: u32,
    address: u64,
}
/// File directory item.
const KEY_FILE_DIR: u16 = 0x0019;

/// A fw_cfg device.
pub struct FwCfg {
    base: usize,
    /// The device offers the DMA interface (and has not refused a transfer).
    dma: bool,
    /// The selected item, and how many of its bytes were read: where a refused DMA transfer's byte-wise retry
    /// starts.
    selected: u16,
    position: usize,
}

/// A file in the directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct File {
    /// Selector key.
    pub key: u16,
    /// Size in bytes.
    pub size: u32,
}

impl FwCfg {
    /// Opens the device at `base`; `None` when the signature is not "QEMU".
    ///
    /// # Safety
    /// `base` must be a fw_cfg MMIO device mapped as device memory, used by nothing else.
    pub unsafe fn new(base: usize) -> Option<Self> {
        let mut device = FwCfg {
            base,
            dma: false,
            selected: 0,
            position: 0,
        };
        device.select(KEY_SIGNATURE);
        let mut signature = [0u8; 4];
        device.read(&mut signature);
        if &signature != b"QEMU" {
            return None;
        }
        device.select(KEY_FEATURES);
        let mut features = [0u8; 4];
        device.read(&mut features);
        device.dma = u32::from_le_bytes(features) & FEATURE_DMA != 0;
        Some(device)
    }

    fn select(&mut self, key: u16) {
        (self.selected, self.position) = (key, 0);
        // SAFETY: `new`'s contract maps the device; the selector is a 16-bit big-endian register.
        unsafe { ((self.base + SELECTOR) as *mut u16).write_volatile(key.to_be()) }
    }

    /// Reads the selected item's next `buffer.len()` bytes.
    fn read(&mut self, buffer: &mut [u8]) {
        if self.dma {
            if self.read_dma(buffer) {
                self.position += buffer.len();
                return;
            }
            // Refused: the bytes go through the data register from here on, from where this read started.
            self.dma = false;
            let position = self.position;
            self.select(self.selected);
            for _ in 0..position {
                // SAFETY: as below.
                unsafe { ((self.base + DATA) as *const u8).read_volatile() };
            }
            self.position = position;
        }
        self.position += buffer.len();
        for b in buffer {
            // SAFETY: as in `select`; byte reads of the data register return the item's next byte.
            *b = unsafe { ((self.base + DATA) as *const u8).read_volatile() };
        }
    }

    /// Reads through the DMA interface; `false` when the device reported an error (QEMU does so only for a buffer
    /// outside guest memory), after which the caller reads the same bytes through the data register.
    fn read_dma(&mut self, buffer: &mut [u8]) -> bool {
        if buffer.is_empty() {
            return true;
        }
        // The firmware's memory is identity-mapped (or the MMU is off), so a buffer's address is the physical
        // address the device writes; fw_cfg is a platform device outside the SMMU, and QEMU's is coherent.
        let mut access = DmaAccess {
            control: DMA_READ.to_be(),
            length: (buffer.len() as u32).to_be(),
            address: (buffer.as_mut_ptr() as u64).to_be(),
        };
        // The device writes the descriptor's control word: every access from here goes through this pointer.
        let access = &raw mut access;
        let at = access as u64;
        // The descriptor and the buffer are in memory before the doorbell.
        aarch64_cpu::asm::barrier::dsb(aarch64_cpu::asm::barrier::SY);
        // SAFETY: `new`'s contract maps the device; the DMA address register takes the descriptor's address in one
        // 64-bit big-endian write, which starts the transfer (one trap, not two 32-bit halves). The descriptor and
        // `buffer` outlive it: the loop below waits until the device has cleared the descriptor's busy bits.
        unsafe { ((self.base + DMA_ADDRESS) as *mut u64).write_volatile(at.to_be()) };
        loop {
            // SAFETY: `access` points at a live local the device writes, so its control word is read volatile.
            let control = u32::from_be(unsafe { (&raw const (*access).control).read_volatile() });
            if control & DMA_ERROR != 0 {
                return false;
            }
            if control == 0 {
                break;
            }
            core::hint::spin_loop();
        }
        // The device's writes to the buffer are seen after its completion.
        aarch64_cpu::asm::barrier::dsb(aarch64_cpu::asm::barrier::SY);
        true
    }

    /// Finds a file by name.
    pub fn find(&mut self, name: &str) -> Option<File> {
        self.select(KEY_FILE_DIR);
        let mut count = [0u8; 4];
        self.read(&mut count);
        for _ in 0..u32::from_be_bytes(count) {
            let mut entry = [0u8; 64];
            self.read(&mut entry);
            let entry_name = &entry[8..];
            let len = entry_name.iter().position(|b| *b == 0).unwrap_or(entry_name.len());
            if &entry_name[..len] == name.as_bytes() {
                return Some(File {
                    size: u32::from_be_bytes([entry[0], entry[1], entry[2], entry[3]]),
                    key: u16::from_be_bytes([entry[4], entry[5]]),
                });
            }
        }
        None
    }

    /// Reads up to `buffer.len()` bytes of `file`; returns how many were read.
    pub fn read_file(&mut self, file: File, buffer: &mut [u8]) -> usize {
        let len = (file.size as usize).min(buffer.len());
        self.select(file.key);
        self.read(&mut buffer[..len]);
        len
    }
}
