//! QEMU's fw_cfg device, MMIO flavour (`qemu,fw-cfg-mmio`): read named files.
//!
//! Written here rather than taken from the `qemu-fw-cfg` crate: its 0.2.0 MMIO reader reads whole 8-byte words
//! even for shorter reads, so it consumes 4 bytes too many after the directory's count and misparses every
//! entry on Arm. This reader uses byte accesses, which the device defines for any length.

/// Data register (any width; bytes come out in stream order).
const DATA: usize = 0x0;
/// Selector register (16-bit, big-endian).
const SELECTOR: usize = 0x8;
/// Signature item.
const KEY_SIGNATURE: u16 = 0x0000;
/// File directory item.
const KEY_FILE_DIR: u16 = 0x0019;

/// A fw_cfg device.
pub struct FwCfg {
    base: usize,
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
        let mut device = FwCfg { base };
        device.select(KEY_SIGNATURE);
        let mut signature = [0u8; 4];
        device.read(&mut signature);
        (&signature == b"QEMU").then_some(device)
    }

    fn select(&mut self, key: u16) {
        // SAFETY: `new`'s contract maps the device; the selector is a 16-bit big-endian register.
        unsafe { ((self.base + SELECTOR) as *mut u16).write_volatile(key.to_be()) }
    }

    fn read(&mut self, buffer: &mut [u8]) {
        for b in buffer {
            // SAFETY: as in `select`; byte reads of the data register return the item's next byte.
            *b = unsafe { ((self.base + DATA) as *const u8).read_volatile() };
        }
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
