//! The raw image a boot loader copies to memory, from a firmware ELF: its loadable segments' file bytes laid out
//! by physical address from the lowest one (what `objcopy -O binary` writes), checked to start with an arm64
//! Image header (`booti` refuses anything else).

use object::read::elf::{ElfFile64, ProgramHeader};
use object::{Endianness, elf};

/// Byte offset and value of the arm64 Image header's magic ("ARM\x64", little-endian).
const MAGIC_AT: usize = 56;
const MAGIC: u32 = 0x644d_5241;

/// The raw image of the ELF `bytes`.
///
/// # Errors
/// When `bytes` is not a 64-bit ELF, has no loadable bytes, has segments that overlap or lie more than 64 MiB
/// apart, or does not start with an arm64 Image header.
pub fn raw_image(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let file = ElfFile64::<Endianness>::parse(bytes).map_err(|e| format!("not a 64-bit ELF: {e}"))?;
    let endian = file.endian();
    let mut segments = Vec::new();
    for header in file.elf_program_headers() {
        if header.p_type(endian) != elf::PT_LOAD || header.p_filesz(endian) == 0 {
            continue;
        }
        let data = header
            .data(endian, bytes)
            .map_err(|_| "a segment's bytes lie outside the file".to_string())?;
        segments.push((header.p_paddr(endian), data));
    }
    segments.sort_by_key(|(address, _)| *address);
    let Some(&(base, _)) = segments.first() else {
        return Err("no loadable bytes".into());
    };
    let mut image = Vec::new();
    for (address, data) in segments {
        let offset = usize::try_from(address - base).map_err(|e| e.to_string())?;
        if offset < image.len() {
            return Err(format!("segments overlap at {address:#x}"));
        }
        if offset + data.len() > 64 << 20 {
            return Err(format!("segments span more than 64 MiB (one at {address:#x})"));
        }
        image.resize(offset, 0);
        image.extend_from_slice(data);
    }
    let magic = image
        .get(MAGIC_AT..MAGIC_AT + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if magic != Some(MAGIC) {
        return Err(format!(
            "the image at {base:#x} does not start with an arm64 Image header (magic {magic:x?})"
        ));
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian ELF64 whose program headers are `segments` (type, physical address, file bytes, memory
    /// size), their bytes after the headers.
    fn elf(segments: &[(u32, u64, &[u8], u64)]) -> Vec<u8> {
        let (ehsize, phentsize) = (64usize, 56usize);
        let mut data_at = ehsize + phentsize * segments.len();
        let mut out = vec![0u8; data_at];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2; // 64-bit
        out[5] = 1; // little-endian
        out[6] = 1; // version
        out[16..18].copy_from_slice(&2u16.to_le_bytes()); // EXEC
        out[18..20].copy_from_slice(&183u16.to_le_bytes()); // AArch64
        out[20..24].copy_from_slice(&1u32.to_le_bytes());
        out[32..40].copy_from_slice(&(ehsize as u64).to_le_bytes()); // e_phoff
        out[52..54].copy_from_slice(&(ehsize as u16).to_le_bytes());
        out[54..56].copy_from_slice(&(phentsize as u16).to_le_bytes());
        out[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        for (i, (kind, address, bytes, memsz)) in segments.iter().enumerate() {
            let h = ehsize + i * phentsize;
            out[h..h + 4].copy_from_slice(&kind.to_le_bytes());
            out[h + 8..h + 16].copy_from_slice(&(data_at as u64).to_le_bytes());
            out[h + 16..h + 24].copy_from_slice(&address.to_le_bytes());
            out[h + 24..h + 32].copy_from_slice(&address.to_le_bytes());
            out[h + 32..h + 40].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            out[h + 40..h + 48].copy_from_slice(&memsz.to_le_bytes());
            data_at += bytes.len();
        }
        for (_, _, bytes, _) in segments {
            out.extend_from_slice(bytes);
        }
        out
    }

    fn header() -> Vec<u8> {
        let mut h = vec![0xaa; 64];
        h[MAGIC_AT..MAGIC_AT + 4].copy_from_slice(&MAGIC.to_le_bytes());
        h
    }

    #[test]
    fn segments_are_laid_out_by_physical_address_from_the_lowest() {
        let head = header();
        let file = elf(&[
            // Out of order, with a gap, a segment with no file bytes (BSS) and a non-loadable one.
            (elf::PT_LOAD, 0x9400_1000, &[1, 2, 3], 3),
            (elf::PT_LOAD, 0x9400_0000, &head, 64),
            (elf::PT_LOAD, 0x9400_2000, &[], 0x1000),
            (elf::PT_NOTE, 0x9500_0000, &[9; 8], 8),
        ]);
        let image = raw_image(&file).unwrap();
        assert_eq!(image.len(), 0x1003);
        assert_eq!(&image[..64], &head[..]);
        assert!(image[64..0x1000].iter().all(|b| *b == 0), "the gap is zero-filled");
        assert_eq!(&image[0x1000..], &[1, 2, 3]);
    }

    #[test]
    fn an_image_without_the_arm64_header_or_with_overlapping_segments_is_refused() {
        let no_magic = elf(&[(elf::PT_LOAD, 0x9400_0000, &[0; 64], 64)]);
        assert!(raw_image(&no_magic).unwrap_err().contains("arm64 Image header"));
        let head = header();
        let overlap = elf(&[
            (elf::PT_LOAD, 0x9400_0000, &head, 64),
            (elf::PT_LOAD, 0x9400_0020, &[1; 8], 8),
        ]);
        assert!(raw_image(&overlap).unwrap_err().contains("overlap"));
        let apart = elf(&[
            (elf::PT_LOAD, 0x9400_0000, &head, 64),
            (elf::PT_LOAD, 0x9800_0000, &[1; 8], 8),
        ]);
        assert!(raw_image(&apart).unwrap_err().contains("64 MiB"));
        assert!(raw_image(b"not an elf").is_err());
        assert!(raw_image(&elf(&[])).unwrap_err().contains("no loadable"));
    }
}
