//! ACPI as QEMU virt publishes it: the tables come through fw_cfg (`etc/acpi/rsdp`, `etc/acpi/tables`) unlinked,
//! with a script (`etc/table-loader`) that says where each blob goes and which pointers and checksums to fix, as
//! platform firmware (EDK2, SeaBIOS) runs it. This module runs that script into a static buffer of its own, then
//! walks RSDP → XSDT → IORT and reads the SMMU and the root complex's requester-ID map with `smmuv3-iort`.
//!
//! The script's commands (QEMU `hw/acpi/bios-linker-loader.c`, each 128 bytes, little-endian): ALLOCATE a file
//! (name, alignment, zone), ADD_POINTER (add a file's address to a field of another), ADD_CHECKSUM (make a range
//! sum to 0 through one byte), WRITE_POINTER (tell QEMU where a file went: for devices that write guest memory,
//! VMGENID and GHES; not needed to read the tables, and skipped). Every offset the script gives is checked against
//! the file it names, and every address the tables then hold against the buffer, before anything is read there.
//!
//! Why not the `acpi` crate for RSDP and XSDT: it reaches tables through an `AcpiHandler` that maps physical regions
//! on demand, and knows no IORT; here the tables are one identity-mapped buffer this module filled itself, so the
//! walk is a bounds-checked slice lookup (the RSDP's XSDT pointer, the XSDT's entries), shorter than the handler,
//! and the IORT goes to `smmuv3-iort`. No crate runs QEMU's table-loader script.

use core::fmt;

use smmuv3::{IommuMap, SmmuDescription};
use smmuv3_iort::{Iort, IortError};

use crate::fw_cfg::FwCfg;

/// Bytes for the linked blobs (QEMU pads its tables blob to 128 KiB, or to the next 64 KiB past that; the RSDP is
/// 36 bytes).
const BUFFER_BYTES: usize = 512 << 10;
/// Files the script may allocate.
const MAX_FILES: usize = 8;
/// A script entry's size.
const ENTRY: usize = 128;
/// Longest script (QEMU writes a few dozen entries).
const MAX_SCRIPT: usize = 16 << 10;
/// A file name's field in a script entry.
const NAME: usize = 56;

const ALLOCATE: u32 = 1;
const ADD_POINTER: u32 = 2;
const ADD_CHECKSUM: u32 = 3;
const WRITE_POINTER: u32 = 4;

/// The script, read whole before it runs.
static mut SCRIPT: [u8; MAX_SCRIPT] = [0; MAX_SCRIPT];

/// The buffer the blobs are linked in: 4 KiB aligned, in the image's `.bss` (identity-mapped, so a blob's CPU
/// address is the physical address the tables' pointers hold).
#[repr(C, align(4096))]
struct Buffer([u8; BUFFER_BYTES]);

static mut BUFFER: Buffer = Buffer([0; BUFFER_BYTES]);

/// Why the ACPI description could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    /// A fw_cfg file is missing (its name).
    NoFile(&'static str),
    /// The script is malformed: an entry past its end, a name that is not a file, an offset outside a file, a
    /// blob that does not fit the buffer (the entry's index).
    Script(usize),
    /// The RSDP is not one (signature, or no XSDT).
    Rsdp,
    /// A table pointer of the XSDT lies outside the linked blobs.
    Pointer(u64),
    /// The XSDT has no IORT.
    NoIort,
    /// The IORT does not validate.
    Iort(IortError),
    /// The IORT has no SMMUv3, or no root complex of segment 0 mapped to it.
    NoSmmu,
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcpiError::NoFile(name) => write!(f, "no fw_cfg file {name}"),
            AcpiError::Script(i) => write!(f, "etc/table-loader entry {i} is malformed or does not fit"),
            AcpiError::Rsdp => f.write_str("etc/acpi/rsdp is not an ACPI 2.0 RSDP with an XSDT"),
            AcpiError::Pointer(a) => write!(f, "a table pointer {a:#x} lies outside the linked tables"),
            AcpiError::NoIort => f.write_str("the XSDT lists no IORT"),
            AcpiError::Iort(e) => write!(f, "{e}"),
            AcpiError::NoSmmu => f.write_str("the IORT has no SMMUv3 with a segment-0 root complex mapped to it"),
        }
    }
}

/// What the IORT says: the first SMMUv3 and segment 0's requester-ID map for it.
#[derive(Clone, Debug)]
pub struct AcpiSmmu {
    /// The SMMU.
    pub smmu: SmmuDescription,
    /// PCI segment 0's requester IDs to its StreamIDs.
    pub iommu_map: IommuMap,
    /// The IORT's length in bytes.
    pub iort_bytes: usize,
}

/// One allocated file: its name and where it is in the buffer.
#[derive(Clone, Copy)]
struct Blob {
    name: [u8; NAME],
    start: usize,
    len: usize,
}

fn name_of(field: &[u8]) -> &[u8] {
    let len = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    &field[..len]
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// The fw_cfg setting that chooses where the SMMU's description comes from (`opt/smmuv3/description`).
pub const DESCRIPTION_KEY: &str = "opt/smmuv3/description";

/// Whether the run asks for the SMMU described by ACPI alone (`description` = `acpi`; `dt`, or no setting, keeps
/// the device tree's, or the board's static description).
///
/// # Errors
/// A message when the value is neither.
pub fn acpi_wanted(fw_cfg: &mut FwCfg) -> Result<bool, &'static str> {
    let Some(file) = fw_cfg.find(DESCRIPTION_KEY) else {
        return Ok(false);
    };
    let mut value = [0u8; 8];
    let n = fw_cfg.read_file(file, &mut value);
    match value[..n].trim_ascii() {
        b"acpi" => Ok(true),
        b"dt" | b"" => Ok(false),
        _ => Err("description: expected acpi or dt"),
    }
}

/// Runs the table-loader script of the fw_cfg device `fw_cfg` and reads the IORT; with `save`, also writes the
/// IORT's bytes, as linked, to that host path (through semihosting; what happened is printed), before it is
/// parsed, so a table the reader refuses is saved too.
///
/// # Errors
/// [`AcpiError`]: the first thing missing or malformed.
///
/// # Safety
/// Called once, on one CPU, before anything else uses the module's buffer (the boot CPU at start-up).
pub unsafe fn read_iort(fw_cfg: &mut FwCfg, save: Option<&str>) -> Result<AcpiSmmu, AcpiError> {
    // SAFETY: the caller's guarantee: nothing else touches the buffer now.
    let buffer: &mut [u8; BUFFER_BYTES] = unsafe { &mut (*core::ptr::addr_of_mut!(BUFFER)).0 };
    let base = buffer.as_ptr() as u64;
    let loader = fw_cfg
        .find("etc/table-loader")
        .ok_or(AcpiError::NoFile("etc/table-loader"))?;
    // SAFETY: as for the buffer.
    let script: &mut [u8; MAX_SCRIPT] = unsafe { &mut *core::ptr::addr_of_mut!(SCRIPT) };
    let script_len = fw_cfg.read_file(loader, script);
    if script_len < loader.size as usize {
        return Err(AcpiError::Script(script_len / ENTRY));
    }
    let mut blobs: heapless::Vec<Blob, MAX_FILES> = heapless::Vec::new();
    let mut next = 0usize;
    let find = |blobs: &heapless::Vec<Blob, MAX_FILES>, field: &[u8]| {
        blobs.iter().copied().find(|b| name_of(&b.name) == name_of(field))
    };
    for (i, entry) in script[..script_len].chunks_exact(ENTRY).enumerate() {
        let bad = AcpiError::Script(i);
        match u32_at(entry, 0).ok_or(bad)? {
            ALLOCATE => {
                let field = &entry[4..4 + NAME];
                let align = (u32_at(entry, 4 + NAME).ok_or(bad)? as usize).max(1);
                let name = core::str::from_utf8(name_of(field)).map_err(|_| bad)?;
                let file = fw_cfg.find(name).ok_or(bad)?;
                if !align.is_power_of_two() {
                    return Err(bad);
                }
                let start = next.next_multiple_of(align);
                let len = file.size as usize;
                let end = start.checked_add(len).filter(|&e| e <= BUFFER_BYTES).ok_or(bad)?;
                if fw_cfg.read_file(file, &mut buffer[start..end]) != len {
                    return Err(bad);
                }
                let mut blob = Blob {
                    name: [0; NAME],
                    start,
                    len,
                };
                blob.name.copy_from_slice(field);
                blobs.push(blob).map_err(|_| bad)?;
                next = end;
            }
            ADD_POINTER => {
                let (dest, src) = (
                    find(&blobs, &entry[4..4 + NAME]).ok_or(bad)?,
                    find(&blobs, &entry[4 + NAME..4 + 2 * NAME]).ok_or(bad)?,
                );
                let offset = u32_at(entry, 4 + 2 * NAME).ok_or(bad)? as usize;
                let size = usize::from(entry[8 + 2 * NAME]);
                if !matches!(size, 1 | 2 | 4 | 8) || offset.checked_add(size).is_none_or(|e| e > dest.len) {
                    return Err(bad);
                }
                let field = &mut buffer[dest.start + offset..dest.start + offset + size];
                let mut value = [0u8; 8];
                value[..size].copy_from_slice(field);
                let pointer = u64::from_le_bytes(value).wrapping_add(base + src.start as u64);
                field.copy_from_slice(&pointer.to_le_bytes()[..size]);
            }
            ADD_CHECKSUM => {
                let file = find(&blobs, &entry[4..4 + NAME]).ok_or(bad)?;
                let (offset, start, length) = (
                    u32_at(entry, 4 + NAME).ok_or(bad)? as usize,
                    u32_at(entry, 8 + NAME).ok_or(bad)? as usize,
                    u32_at(entry, 12 + NAME).ok_or(bad)? as usize,
                );
                if offset >= file.len || start.checked_add(length).is_none_or(|e| e > file.len) {
                    return Err(bad);
                }
                let blob = &mut buffer[file.start..file.start + file.len];
                let sum = blob[start..start + length].iter().fold(0u8, |s, b| s.wrapping_add(*b));
                blob[offset] = blob[offset].wrapping_sub(sum);
            }
            WRITE_POINTER | 0 => {}
            _ => return Err(bad),
        }
    }
    let buffer = &buffer[..next];
    // An address a table holds, as a slice of `len` bytes of the linked blobs.
    let at = |address: u64, len: usize| {
        let offset = address.checked_sub(base).ok_or(AcpiError::Pointer(address))? as usize;
        offset
            .checked_add(len)
            .and_then(|end| buffer.get(offset..end))
            .ok_or(AcpiError::Pointer(address))
    };
    let rsdp_blob = blobs
        .iter()
        .find(|b| name_of(&b.name) == b"etc/acpi/rsdp")
        .ok_or(AcpiError::NoFile("etc/acpi/rsdp"))?;
    let rsdp = &buffer[rsdp_blob.start..rsdp_blob.start + rsdp_blob.len];
    if rsdp.get(..8) != Some(b"RSD PTR ") || rsdp.get(15).is_none_or(|r| *r < 2) {
        return Err(AcpiError::Rsdp);
    }
    let xsdt_address = u64_at(rsdp, 24).ok_or(AcpiError::Rsdp)?;
    let xsdt_header = at(xsdt_address, 36)?;
    let xsdt_len = u32_at(xsdt_header, 4).ok_or(AcpiError::Rsdp)? as usize;
    if xsdt_header.get(..4) != Some(b"XSDT") || xsdt_len < 36 {
        return Err(AcpiError::Rsdp);
    }
    let xsdt = at(xsdt_address, xsdt_len)?;
    for entry in xsdt[36..].chunks_exact(8) {
        let address = u64::from_le_bytes(entry.try_into().map_err(|_| AcpiError::Rsdp)?);
        let header = at(address, 36)?;
        if header.get(..4) != Some(b"IORT") {
            continue;
        }
        let len = u32_at(header, 4).ok_or(AcpiError::Pointer(address))? as usize;
        let table = at(address, len)?;
        if let Some(path) = save {
            match crate::finish::save_to_host(path, table) {
                Ok(()) => crate::println!("ACPI: IORT ({len} bytes) saved to {path} on the host"),
                Err(e) => crate::println!("ACPI: IORT not saved to {path}: {e}"),
            }
        }
        let iort = Iort::parse(table).map_err(AcpiError::Iort)?;
        let smmu = iort.smmus().next().ok_or(AcpiError::NoSmmu)?;
        let iommu_map = match iort.iommu_map(0, smmu.node) {
            Some(Ok(map)) => map,
            _ => return Err(AcpiError::NoSmmu),
        };
        return Ok(AcpiSmmu {
            smmu: smmu.description,
            iommu_map,
            iort_bytes: len,
        });
    }
    Err(AcpiError::NoIort)
}
