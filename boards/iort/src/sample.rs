//! A good IORT built field by field from DEN 0049, and the writer it is built with: the seed of the fuzzer
//! (`smmuv3-fuzz`) and of the tests. A QEMU-virt-like layout: an ITS group, an SMMUv3 (at QEMU virt's address,
//! coherent, its own DeviceID to the ITS), a root complex whose requester IDs go to the SMMU (and, for MSIs, to
//! the ITS), and a named component `\\_SB.DMA0` with a single StreamID and a range of eight.

extern crate alloc;

use alloc::vec::Vec;

/// Little-endian table writer: appends fields, patches the length and checksum at the end.
#[derive(Default)]
pub struct Table(Vec<u8>);

impl Table {
    /// Appends a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    /// Appends a little-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    /// Appends a little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    /// Appends a little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    /// Appends bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend(v);
        self
    }
    /// Bytes written so far (the offset of the next field).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u32 {
        self.0.len() as u32
    }
    /// Length at 4, checksum at 9 so that every byte sums to 0.
    pub fn finish(mut self) -> Vec<u8> {
        let len = self.len();
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        fix_checksum(&mut self.0);
        self.0
    }
}

/// Sets the checksum byte (offset 9) so that every byte of `t` sums to 0.
pub fn fix_checksum(t: &mut [u8]) {
    t[9] = 0;
    let sum = t.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    t[9] = 0u8.wrapping_sub(sum);
}

/// Appends a node header: type, length, revision, identifier, mapping count, mapping offset.
pub fn node(t: &mut Table, kind: u8, length: u16, identifier: u32, mappings: u32, mapping_offset: u32) {
    t.u8(kind)
        .u16(length)
        .u8(if kind == 4 { 5 } else { 0 })
        .u32(identifier)
        .u32(mappings)
        .u32(mapping_offset);
}

/// Appends an ID mapping: input base, count - 1, output base, output reference, flags.
pub fn mapping(t: &mut Table, input: u32, count_minus_one: u32, output: u32, reference: u32, flags: u32) {
    t.u32(input).u32(count_minus_one).u32(output).u32(reference).u32(flags);
}

/// The ITS group node's offset.
pub const ITS: u32 = 48;
/// The SMMUv3 node's offset.
pub const SMMU: u32 = ITS + 24;
/// The root complex node's offset.
pub const RC: u32 = SMMU + 68 + 20;
/// The named component node's offset.
pub const NAMED: u32 = RC + 36 + 40;
/// The named component's device object name, NUL-padded to 4 bytes.
pub const NAME: &[u8] = b"\\_SB.DMA0\0\0\0";

/// The good table; `rc_mappings` replaces the root complex's mappings (input, count - 1, output, reference,
/// flags).
pub fn table_with(rc_mappings: &[(u32, u32, u32, u32, u32)]) -> Vec<u8> {
    let mut t = Table::default();
    t.bytes(b"IORT")
        .u32(0)
        .u8(3)
        .u8(0)
        .bytes(b"SMMUV3")
        .bytes(b"TESTIORT")
        .u32(1)
        .u32(0x2020_2020)
        .u32(1);
    t.u32(4).u32(ITS).u32(0);
    // ITS group: one ITS, identifier 0.
    assert_eq!(t.len(), ITS);
    node(&mut t, 0, 24, 0, 0, 0);
    t.u32(1).u32(0);
    // SMMUv3 at QEMU virt's address, coherent, GSIVs event 106, PRI 107, GERR 109, sync 108; its own DeviceID
    // 0x10000 to the ITS (a single mapping).
    assert_eq!(t.len(), SMMU);
    node(&mut t, 4, 68 + 20, 1, 1, 68);
    t.u64(0x905_0000)
        .u32(1)
        .u32(0)
        .u64(0)
        .u32(0)
        .u32(106)
        .u32(107)
        .u32(109)
        .u32(108)
        .u32(0)
        .u32(0);
    mapping(&mut t, 0, 0, 0x1_0000, ITS, 1);
    // Root complex, segment 0: its mappings (two by default: requester IDs to the SMMU, and for MSIs to the ITS).
    assert_eq!(t.len(), RC);
    let rc_len = 36 + 20 * rc_mappings.len() as u16;
    node(&mut t, 2, rc_len, 2, rc_mappings.len() as u32, 36);
    t.u64(0).u32(0).u32(0).u8(0x30).bytes(&[0; 3]);
    for &(i, c, o, r, f) in rc_mappings {
        mapping(&mut t, i, c, o, r, f);
    }
    // Named component \_SB.DMA0 with one single mapping to StreamID 0x40 and a range of 8 from 0x48.
    assert_eq!(t.len(), RC + u32::from(rc_len));
    let named_len = 16 + 13 + NAME.len() as u16;
    node(&mut t, 1, named_len + 40, 3, 2, u32::from(named_len));
    t.u32(0).u32(1).u8(0).u16(0).u8(0).u8(48).bytes(NAME);
    mapping(&mut t, 0, 0, 0x40, SMMU, 1);
    mapping(&mut t, 0x100, 7, 0x48, SMMU, 0);
    t.finish()
}

/// The good table: requester IDs 0..=0xffff to StreamIDs 0.. of the SMMU, and to the ITS.
pub fn good() -> Vec<u8> {
    table_with(&[(0, 0xffff, 0, SMMU, 0), (0, 0xffff, 0, ITS, 0)])
}
