//! The ACPI I/O Remapping Table (IORT, Arm DEN 0049) as an SMMUv3 driver needs it.
//!
//! Arm servers (SBSA) describe their SMMUs in ACPI rather than a device tree: the IORT lists each SMMUv3 (its
//! registers, its interrupts as GSIVs, whether its table walks are coherent), and each PCI root complex and named
//! (platform) component with the ranges of IDs it issues and where they go: a requester ID of a root complex
//! becomes a StreamID of an SMMU through an ID mapping whose output reference is that SMMU's node.
//!
//! [`Iort::parse`] checks the whole table before anything is read from it: the signature, the length against the
//! bytes given, the checksum (every byte of the table sums to 0 mod 256), every node inside the table and at
//! least as long as its type's fixed fields, every ID mapping array inside its node, every output reference to a
//! node that exists, and no ID range that wraps. After that, [`Iort::smmus`], [`Iort::iommu_map`] and
//! [`Iort::named_components`] cannot fail. Nothing panics on any input (fuzzed by `smmuv3-fuzz`).
//!
//! The ACPI plumbing around the table (RSDP, XSDT, QEMU's table-loader script) is the platform's; this crate reads
//! the one table the `acpi` crates do not: they stop at the SDT header for IORT.
#![no_std]

use core::fmt;

#[cfg(feature = "sample")]
pub mod sample;

use smmuv3::board::IommuMapEntry;
use smmuv3::{IommuMap, SmmuDescription, SmmuInterrupts};
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

/// The common ACPI table header (ACPI 6.5 §5.2.6).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
struct SdtHeader {
    signature: [u8; 4],
    length: U32,
    revision: u8,
    checksum: u8,
    oem_id: [u8; 6],
    oem_table_id: [u8; 8],
    oem_revision: U32,
    creator_id: U32,
    creator_revision: U32,
}

/// The IORT's own fields after the header.
#[derive(FromBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
struct IortHeader {
    sdt: SdtHeader,
    node_count: U32,
    node_offset: U32,
    reserved: U32,
}

/// Every node's first 16 bytes.
#[derive(FromBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
struct NodeHeader {
    kind: u8,
    length: U16,
    revision: u8,
    identifier: U32,
    mapping_count: U32,
    mapping_offset: U32,
}

/// One ID mapping: IDs `input_base ..= input_base + id_count` go to `output_base ..` of the node at
/// `output_reference` (an offset from the table's start). `id_count` is the number of IDs minus one.
#[derive(FromBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
struct IdMapping {
    input_base: U32,
    id_count: U32,
    output_base: U32,
    output_reference: U32,
    flags: U32,
}

/// The SMMUv3 node's fields after the node header (DEN 0049 table 10).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
struct SmmuV3Fields {
    base_address: U64,
    flags: U32,
    reserved: U32,
    vatos_address: U64,
    model: U32,
    event_gsiv: U32,
    pri_gsiv: U32,
    gerr_gsiv: U32,
    sync_gsiv: U32,
}

/// The root complex node's fields after the node header (the part every revision has).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
struct RootComplexFields {
    memory_access: U64,
    ats: U32,
    segment: U32,
}

/// Node types (DEN 0049 table 4).
const ITS_GROUP: u8 = 0;
const NAMED_COMPONENT: u8 = 1;
const ROOT_COMPLEX: u8 = 2;
const SMMU_V3: u8 = 4;

/// SMMUv3 node flags: COHACC override (the SMMU's table walks are coherent).
const SMMU_COHACC: u32 = 1 << 0;
/// ID mapping flags: a single mapping (the node's own ID, not a range of input IDs).
const SINGLE_MAPPING: u32 = 1 << 0;

/// The fixed fields a node of each type must hold beyond its header, in bytes (0 for types not read).
fn fixed_len(kind: u8) -> usize {
    match kind {
        SMMU_V3 => size_of::<SmmuV3Fields>(),
        ROOT_COMPLEX => size_of::<RootComplexFields>(),
        // Named component: flags (4), cache coherency (4), allocation hints (1), reserved (2), memory access
        // flags (1), address size limit (1), then the NUL-terminated device object name.
        NAMED_COMPONENT => 13,
        // ITS group: the count of ITS identifiers.
        ITS_GROUP => 4,
        _ => 0,
    }
}

/// Why a table was refused. Nothing was read from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IortError {
    /// Fewer bytes than the IORT's fixed header (48).
    TooShort,
    /// The signature is not `IORT`.
    Signature([u8; 4]),
    /// The header's length is below the fixed header or past the bytes given.
    Length {
        /// The header's length.
        length: u32,
        /// The bytes given.
        given: usize,
    },
    /// The bytes do not sum to 0 (mod 256).
    Checksum {
        /// What they sum to.
        sum: u8,
    },
    /// The node array, or a node, lies (partly) outside the table, or a node is shorter than its header and its
    /// type's fixed fields (the offset of the node).
    Node(u32),
    /// A node's ID mapping array lies (partly) outside the node (the offset of the node).
    Mappings(u32),
    /// An ID mapping's output reference is not the offset of a node of the table (the mapping's node).
    Reference(u32),
    /// An ID mapping's input or output range wraps past 2^32 (the mapping's node).
    Overflow(u32),
    /// A named component's device name is not NUL-terminated inside its node (the node).
    Name(u32),
}

impl fmt::Display for IortError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IortError::TooShort => f.write_str("IORT: shorter than its 48-byte header"),
            IortError::Signature(s) => write!(f, "IORT: signature {s:02x?} is not \"IORT\""),
            IortError::Length { length, given } => {
                write!(
                    f,
                    "IORT: header length {length:#x} outside 48..={given:#x} (the bytes given)"
                )
            }
            IortError::Checksum { sum } => write!(f, "IORT: the bytes sum to {sum:#x}, not 0"),
            IortError::Node(at) => write!(
                f,
                "IORT: node at {at:#x} is outside the table or shorter than its fields"
            ),
            IortError::Mappings(at) => write!(f, "IORT: node at {at:#x} has ID mappings outside itself"),
            IortError::Reference(at) => {
                write!(
                    f,
                    "IORT: node at {at:#x} has an ID mapping whose output reference is not a node"
                )
            }
            IortError::Overflow(at) => write!(f, "IORT: node at {at:#x} has an ID mapping that wraps past 2^32"),
            IortError::Name(at) => write!(f, "IORT: named component at {at:#x} has no NUL-terminated name"),
        }
    }
}

impl core::error::Error for IortError {}

/// A checked IORT.
#[derive(Clone, Copy, Debug)]
pub struct Iort<'a> {
    table: &'a [u8],
    node_offset: usize,
    node_count: usize,
}

/// One SMMUv3 node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IortSmmu {
    /// The node's offset in the table: what ID mappings name it by.
    pub node: u32,
    /// The node's identifier (unique among the table's nodes from IORT revision E on; 0 before).
    pub identifier: u32,
    /// The SMMU as the driver takes it: base address, the four GSIVs (INTIDs; 0 in the table is none), edge
    /// triggered (SBSA: an SMMUv3's wired interrupts are edge-triggered, and Linux registers them so), coherent
    /// when the COHACC override flag is set. The size is the architecture's two 64 KiB pages (the table has none).
    pub description: SmmuDescription,
    /// The model field (0: generic SMMUv3; others name implementations with their own quirks).
    pub model: u32,
}

/// One named component (a platform device) and one of its ID mappings to an SMMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamedMapping<'a> {
    /// The ACPI device object name (`\_SB.DMA0`).
    pub name: &'a [u8],
    /// The SMMU node the mapping goes to.
    pub smmu: u32,
    /// The first StreamID.
    pub stream_id: u32,
    /// How many StreamIDs (1 for a single mapping).
    pub count: u64,
}

fn read<T: FromBytes + KnownLayout + Immutable + Unaligned + Copy>(bytes: &[u8], at: usize) -> Option<T> {
    let end = at.checked_add(size_of::<T>())?;
    T::read_from_bytes(bytes.get(at..end)?).ok()
}

impl<'a> Iort<'a> {
    /// Checks `table` (the IORT's bytes, from its signature; extra bytes after its length are ignored) and returns
    /// it for reading.
    ///
    /// # Errors
    /// [`IortError`]: the first thing wrong, with where it is.
    pub fn parse(table: &'a [u8]) -> Result<Self, IortError> {
        let header: IortHeader = read(table, 0).ok_or(IortError::TooShort)?;
        if header.sdt.signature != *b"IORT" {
            return Err(IortError::Signature(header.sdt.signature));
        }
        let length = header.sdt.length.get();
        let table = usize::try_from(length)
            .ok()
            .filter(|&l| l >= size_of::<IortHeader>())
            .and_then(|l| table.get(..l))
            .ok_or(IortError::Length {
                length,
                given: table.len(),
            })?;
        let sum = table.iter().fold(0u8, |s, b| s.wrapping_add(*b));
        if sum != 0 {
            return Err(IortError::Checksum { sum });
        }
        let iort = Iort {
            table,
            node_offset: header.node_offset.get() as usize,
            node_count: header.node_count.get() as usize,
        };
        // Every node: inside the table, long enough, its mappings inside it; then every reference a node.
        let mut at = iort.node_offset;
        for _ in 0..iort.node_count {
            let node = iort.node_at(at)?;
            at += usize::from(node.length.get());
        }
        for (at, node) in iort.nodes() {
            for m in iort.mappings(at, node) {
                let target = m.output_reference.get();
                if !iort.is_node(target as usize) {
                    return Err(IortError::Reference(at as u32));
                }
                let single = m.flags.get() & SINGLE_MAPPING != 0;
                if !single
                    && (m.input_base.get().checked_add(m.id_count.get()).is_none()
                        || m.output_base.get().checked_add(m.id_count.get()).is_none())
                {
                    return Err(IortError::Overflow(at as u32));
                }
            }
            if node.kind == NAMED_COMPONENT && iort.name(at, &node).is_none() {
                return Err(IortError::Name(at as u32));
            }
        }
        Ok(iort)
    }

    /// The node header at `at`, checked: inside the table, at least its header, its type's fixed fields and its
    /// mapping array long.
    fn node_at(&self, at: usize) -> Result<NodeHeader, IortError> {
        let node: NodeHeader = read(self.table, at).ok_or(IortError::Node(at as u32))?;
        let len = usize::from(node.length.get());
        let fixed = size_of::<NodeHeader>() + fixed_len(node.kind);
        if len < fixed || at.checked_add(len).is_none_or(|end| end > self.table.len()) {
            return Err(IortError::Node(at as u32));
        }
        let count = node.mapping_count.get() as usize;
        if count > 0 {
            let start = node.mapping_offset.get() as usize;
            let end = count
                .checked_mul(size_of::<IdMapping>())
                .and_then(|bytes| start.checked_add(bytes));
            if start < size_of::<NodeHeader>() || end.is_none_or(|end| end > len) {
                return Err(IortError::Mappings(at as u32));
            }
        }
        Ok(node)
    }

    /// Whether a node starts at `at`.
    fn is_node(&self, at: usize) -> bool {
        self.nodes().any(|(offset, _)| offset == at)
    }

    /// Every node with its offset (all checked by `parse`).
    fn nodes(&self) -> impl Iterator<Item = (usize, NodeHeader)> + '_ {
        let mut at = self.node_offset;
        (0..self.node_count).map_while(move |_| {
            let node = self.node_at(at).ok()?;
            let here = at;
            at += usize::from(node.length.get());
            Some((here, node))
        })
    }

    /// The ID mappings of the node at `at`.
    fn mappings(&self, at: usize, node: NodeHeader) -> impl Iterator<Item = IdMapping> + '_ {
        let start = at + node.mapping_offset.get() as usize;
        (0..node.mapping_count.get() as usize).filter_map(move |i| read(self.table, start + i * size_of::<IdMapping>()))
    }

    /// A named component's device object name (without its NUL), if it ends before the node's ID mappings (or,
    /// without mappings, inside the node).
    fn name(&self, at: usize, node: &NodeHeader) -> Option<&'a [u8]> {
        let start = at + size_of::<NodeHeader>() + fixed_len(NAMED_COMPONENT);
        let mut end = at + usize::from(node.length.get());
        if node.mapping_count.get() > 0 {
            end = end.min(at + node.mapping_offset.get() as usize);
        }
        let bytes = self.table.get(start..end)?;
        let nul = bytes.iter().position(|b| *b == 0)?;
        Some(&bytes[..nul])
    }

    /// Every SMMUv3 node, in table order.
    pub fn smmus(&self) -> impl Iterator<Item = IortSmmu> + '_ {
        self.nodes()
            .filter(|(_, n)| n.kind == SMMU_V3)
            .filter_map(|(at, node)| {
                let f: SmmuV3Fields = read(self.table, at + size_of::<NodeHeader>())?;
                let gsiv = |g: U32| Some(g.get()).filter(|&g| g != 0);
                Some(IortSmmu {
                    node: at as u32,
                    identifier: node.identifier.get(),
                    description: SmmuDescription {
                        base: f.base_address.get(),
                        size: 0x2_0000,
                        interrupts: SmmuInterrupts {
                            eventq: gsiv(f.event_gsiv),
                            priq: gsiv(f.pri_gsiv),
                            cmdq_sync: gsiv(f.sync_gsiv),
                            gerror: gsiv(f.gerr_gsiv),
                            edge_triggered: true,
                        },
                        dma_coherent: f.flags.get() & SMMU_COHACC != 0,
                    },
                    model: f.model.get(),
                })
            })
    }

    /// The requester-ID to StreamID map of PCI segment `segment`'s root complex for the SMMU at node offset
    /// `smmu` (mappings to other nodes, such as an ITS group for MSIs, are not StreamIDs of it). `None` when no
    /// root complex of that segment exists.
    ///
    /// # Errors
    /// [`smmuv3::board::IommuMapFull`] when the root complex has more ranges for it than an [`IommuMap`] holds.
    pub fn iommu_map(&self, segment: u32, smmu: u32) -> Option<Result<IommuMap, smmuv3::board::IommuMapFull>> {
        let (at, node) = self.nodes().find(|(at, n)| {
            n.kind == ROOT_COMPLEX
                && read::<RootComplexFields>(self.table, at + size_of::<NodeHeader>())
                    .is_some_and(|f| f.segment.get() == segment)
        })?;
        let mut map = IommuMap::new();
        for m in self.mappings(at, node) {
            if m.output_reference.get() != smmu || m.flags.get() & SINGLE_MAPPING != 0 {
                continue;
            }
            // `parse` checked that neither range wraps, so the count fits: id_count + 1 <= 2^32 - input_base.
            let entry = IommuMapEntry {
                rid_base: m.input_base.get(),
                sid_base: m.output_base.get(),
                length: m.id_count.get().saturating_add(1),
            };
            if let Err(e) = map.push(entry) {
                return Some(Err(e));
            }
        }
        Some(Ok(map))
    }

    /// Every ID mapping of a named component to an SMMU (platform masters), in table order.
    pub fn named_components(&self) -> impl Iterator<Item = NamedMapping<'a>> + '_ {
        self.nodes()
            .filter(|(_, n)| n.kind == NAMED_COMPONENT)
            .flat_map(move |(at, node)| {
                let name = self.name(at, &node).unwrap_or_default();
                self.mappings(at, node).filter_map(move |m| {
                    let target = m.output_reference.get() as usize;
                    let is_smmu = read::<NodeHeader>(self.table, target).is_some_and(|n| n.kind == SMMU_V3);
                    let single = m.flags.get() & SINGLE_MAPPING != 0;
                    is_smmu.then_some(NamedMapping {
                        name,
                        smmu: target as u32,
                        stream_id: m.output_base.get(),
                        count: if single { 1 } else { u64::from(m.id_count.get()) + 1 },
                    })
                })
            })
    }
}
