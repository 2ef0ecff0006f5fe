//! Adds the handover region's node to a flattened device tree, in place.
//!
//! The tree must have the layout dtc and libfdt write (and that libfdt's own read-write functions require): the
//! header, the memory reservation block, the structure block, then the strings block, each inside `totalsize`.
//! The node is inserted just before the `END_NODE` of `/reserved-memory` (or, when the tree has none, a
//! `/reserved-memory` holding it just before the root's `END_NODE`); the names it needs that the strings block lacks
//! are appended to that block. Everything after the insertion point moves up, so the blob grows by the node and the
//! new strings; it may use the whole buffer it is given (the tree's free space after its strings, as in QEMU's
//! trees, or more). The whole tree is walked and every bound checked before the first byte is written: a tree this
//! module cannot edit is left unchanged.

use core::fmt::{self, Write as _};

use crate::{HANDOVER_COMPATIBLE, Range};

const MAGIC: u32 = 0xd00d_feed;
const HEADER_BYTES: usize = 40;
const BEGIN_NODE: u32 = 1;
const END_NODE: u32 = 2;
const PROP: u32 = 3;
const NOP: u32 = 4;
const END: u32 = 9;

/// What [`add_handover_region`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Patched {
    /// The node was added (and `/reserved-memory` with it when the tree had none).
    Added {
        /// Whether `/reserved-memory` was created.
        created_reserved_memory: bool,
        /// The tree's `totalsize` afterwards.
        total_size: usize,
    },
    /// The tree already names this region: unchanged.
    AlreadyPresent,
}

/// Why the tree was not edited. It is unchanged in every case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchError {
    /// No FDT magic, or a header that does not fit the buffer.
    BadHeader,
    /// A format version this writer does not produce (it needs version 17 or a later one compatible with it).
    Version {
        /// The header's `version`.
        version: u32,
        /// The header's `last_comp_version`.
        last_compatible: u32,
    },
    /// The blocks are not in the order header, reservations, structure, strings inside `totalsize`, or are
    /// misaligned.
    Layout,
    /// The structure block is malformed at this offset (from the start of the blob).
    Structure(usize),
    /// A node's `#address-cells` or `#size-cells` (the root's, or `/reserved-memory`'s) is not 1 or 2.
    Cells {
        /// The address cells.
        address: u32,
        /// The size cells.
        size: u32,
    },
    /// The region does not fit in the cells `/reserved-memory` uses (one cell holds 32 bits).
    DoesNotFit(Range),
    /// The tree already has a handover region, another one (or several).
    AlreadyNamesAnother(Range),
    /// The tree's handover region node has a `reg` that is not one range in `/reserved-memory`'s cells, or it is
    /// not `no-map` or is `reusable` (its `reg` value is at this offset).
    MalformedRegionNode(usize),
    /// `/reserved-memory` does not have the root's cells and an empty `ranges`, as Linux requires (and the reader).
    ParentLayout {
        /// Its cells (address, size).
        cells: (u32, u32),
        /// The root's cells.
        root_cells: (u32, u32),
        /// The length of its `ranges`, `None` without one.
        ranges: Option<usize>,
    },
    /// The tree's header says it is `total` bytes, more than the `room` its caller may write in (or the header is
    /// not there: `total` 0).
    BeyondWritable {
        /// The header's `totalsize`.
        total: usize,
        /// Bytes the caller may write from the tree's start.
        room: usize,
    },
    /// The edited tree would need `needed` bytes; the buffer has `capacity`.
    NoSpace {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        capacity: usize,
    },
}

impl fmt::Display for PatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PatchError::BadHeader => f.write_str("no flattened device tree header (or one larger than its buffer)"),
            PatchError::Version {
                version,
                last_compatible,
            } => write!(
                f,
                "tree format version {version} (compatible with {last_compatible}); version 17 is written"
            ),
            PatchError::Layout => f.write_str(
                "the tree's blocks are not header, reservations, structure, strings in that order, aligned, inside totalsize",
            ),
            PatchError::Structure(at) => write!(f, "the tree's structure block is malformed at byte {at:#x}"),
            PatchError::Cells { address, size } => write!(
                f,
                "#address-cells {address} and #size-cells {size}: 1 or 2 each expected"
            ),
            PatchError::DoesNotFit(r) => write!(f, "{r} does not fit /reserved-memory's cells"),
            PatchError::AlreadyNamesAnother(r) => {
                write!(f, "the tree already names another handover region ({r})")
            }
            PatchError::MalformedRegionNode(at) => write!(
                f,
                "the tree's handover region node has a reg that is not one range, or is not no-map (reg at byte {at:#x})"
            ),
            PatchError::ParentLayout {
                cells,
                root_cells,
                ranges,
            } => write!(
                f,
                "/reserved-memory has cells {cells:?} (the root {root_cells:?}) and a ranges of {ranges:?} bytes: the root's cells and an empty ranges expected"
            ),
            PatchError::BeyondWritable { total, room } => write!(
                f,
                "the tree's header says {total} bytes where {room} may be written (or has no magic)"
            ),
            PatchError::NoSpace { needed, capacity } => write!(
                f,
                "the edited tree needs {needed} bytes and its buffer holds {capacity}"
            ),
        }
    }
}

fn read_u32(blob: &[u8], at: usize) -> Option<u32> {
    let bytes = blob.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn write_u32(blob: &mut [u8], at: usize, value: u32) {
    blob[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

/// The header fields the writer uses, checked against the buffer.
#[derive(Clone, Copy, Debug)]
struct Header {
    total: usize,
    off_struct: usize,
    off_strings: usize,
    size_strings: usize,
    size_struct: usize,
}

impl Header {
    fn read(blob: &[u8]) -> Result<Header, PatchError> {
        let field = |i: usize| read_u32(blob, 4 * i).map(|v| v as usize).ok_or(PatchError::BadHeader);
        if field(0)? != MAGIC as usize {
            return Err(PatchError::BadHeader);
        }
        let (version, last_compatible) = (field(5)? as u32, field(6)? as u32);
        if version < 17 || last_compatible > 17 {
            return Err(PatchError::Version {
                version,
                last_compatible,
            });
        }
        let h = Header {
            total: field(1)?,
            off_struct: field(2)?,
            off_strings: field(3)?,
            size_strings: field(8)?,
            size_struct: field(9)?,
        };
        if h.total > blob.len() || h.total < HEADER_BYTES {
            return Err(PatchError::BadHeader);
        }
        let struct_end = h.off_struct.checked_add(h.size_struct).ok_or(PatchError::Layout)?;
        let strings_end = h.off_strings.checked_add(h.size_strings).ok_or(PatchError::Layout)?;
        if !h.off_struct.is_multiple_of(4)
            || !h.size_struct.is_multiple_of(4)
            || struct_end > h.off_strings
            || strings_end > h.total
        {
            return Err(PatchError::Layout);
        }
        // The reservation block: 16-byte (address, size) entries ending with a zero one, before the structure
        // (which lies inside the buffer: checked above).
        let off_rsvmap = field(4)?;
        if off_rsvmap < HEADER_BYTES || !off_rsvmap.is_multiple_of(8) {
            return Err(PatchError::Layout);
        }
        let mut entry = off_rsvmap;
        loop {
            if entry + 16 > h.off_struct {
                return Err(PatchError::Layout);
            }
            if blob[entry..entry + 16].iter().all(|b| *b == 0) {
                break;
            }
            entry += 16;
        }
        Ok(h)
    }

    fn strings<'b>(&self, blob: &'b [u8]) -> &'b [u8] {
        &blob[self.off_strings..self.off_strings + self.size_strings]
    }
}

/// A property's name: the NUL-terminated string at `offset` in the strings block.
fn string_at(strings: &[u8], offset: usize) -> Option<&[u8]> {
    let tail = strings.get(offset..)?;
    let len = tail.iter().position(|b| *b == 0)?;
    Some(&tail[..len])
}

/// What the walk of the structure block found.
#[derive(Debug, Default)]
struct Scan {
    /// The root's `#address-cells` and `#size-cells` (the defaults, 2 and 1, when absent).
    root_cells: (Option<u32>, Option<u32>),
    /// Offset of the root's `END_NODE`.
    root_end: usize,
    /// `/reserved-memory`, when the tree has one.
    reserved: Option<ReservedNode>,
}

#[derive(Debug, Default)]
struct ReservedNode {
    cells: (Option<u32>, Option<u32>),
    /// The length of its `ranges` (`None` without one).
    ranges: Option<usize>,
    /// Offset of its `END_NODE`.
    end: usize,
    /// The enabled handover children's `reg` values (offset and length in the blob), and whether each is `no-map`
    /// and not `reusable`.
    handover_regs: heapless::Vec<(usize, usize, bool), 2>,
}

fn cell_value(value: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(value.try_into().ok()?))
}

fn scan(blob: &[u8], h: &Header) -> Result<Scan, PatchError> {
    let strings = h.strings(blob);
    let end = h.off_struct + h.size_struct;
    let mut at = h.off_struct;
    let mut depth = 0usize;
    let mut out = Scan::default();
    // Depth of `/reserved-memory` while inside it (it is a child of the root: depth 2).
    let mut in_reserved = false;
    // The current child of `/reserved-memory`: whether it is the handover region, and its `reg`.
    let mut child_handover = false;
    let mut child_reg: Option<(usize, usize)> = None;
    // Whether it is enabled (as the reader decides: `crate::enabled`), `no-map` and `reusable`.
    let (mut child_enabled, mut child_no_map, mut child_reusable) = (true, false, false);
    let mut finished = false;
    while !finished {
        let bad = PatchError::Structure(at);
        let token = if at + 4 <= end {
            read_u32(blob, at).ok_or(bad)?
        } else {
            return Err(bad);
        };
        let token_at = at;
        at += 4;
        match token {
            BEGIN_NODE => {
                let name_len = blob[at..end].iter().position(|b| *b == 0).ok_or(bad)?;
                let name = &blob[at..at + name_len];
                at = (at + name_len + 1).next_multiple_of(4);
                if at > end || (depth == 0 && out.root_end != 0) {
                    return Err(bad);
                }
                depth += 1;
                if depth == 1 && !name.is_empty() {
                    return Err(bad);
                }
                let is_reserved = name == b"reserved-memory" || name.starts_with(b"reserved-memory@");
                if depth == 2 && is_reserved && out.reserved.is_none() {
                    in_reserved = true;
                    out.reserved = Some(ReservedNode::default());
                }
                if depth == 3 && in_reserved {
                    child_handover = false;
                    child_reg = None;
                    (child_enabled, child_no_map, child_reusable) = (true, false, false);
                }
            }
            END_NODE => {
                match depth {
                    0 => return Err(bad),
                    1 => out.root_end = token_at,
                    2 if in_reserved => {
                        in_reserved = false;
                        if let Some(r) = out.reserved.as_mut() {
                            r.end = token_at;
                        }
                    }
                    // A disabled handover node is ignored, as the reader ignores it.
                    3 if in_reserved && child_handover && child_enabled => {
                        let (at, len) = child_reg.ok_or(bad)?;
                        if let Some(r) = out.reserved.as_mut() {
                            // A third claimant is refused as the second is: only "more than one" matters.
                            let _ = r.handover_regs.push((at, len, child_no_map && !child_reusable));
                        }
                    }
                    _ => {}
                }
                depth -= 1;
            }
            PROP => {
                let len = read_u32(blob, at).ok_or(bad)? as usize;
                let name_offset = read_u32(blob, at + 4).ok_or(bad)? as usize;
                let value_at = at + 8;
                let value_end = value_at.checked_add(len).ok_or(bad)?;
                if value_end > end || depth == 0 {
                    return Err(bad);
                }
                let name = string_at(strings, name_offset).ok_or(bad)?;
                let value = &blob[value_at..value_end];
                at = value_end.next_multiple_of(4);
                match (depth, in_reserved, name) {
                    (1, _, b"#address-cells") => out.root_cells.0 = Some(cell_value(value).ok_or(bad)?),
                    (1, _, b"#size-cells") => out.root_cells.1 = Some(cell_value(value).ok_or(bad)?),
                    (2, true, b"#address-cells") => {
                        if let Some(r) = out.reserved.as_mut() {
                            r.cells.0 = Some(cell_value(value).ok_or(bad)?);
                        }
                    }
                    (2, true, b"#size-cells") => {
                        if let Some(r) = out.reserved.as_mut() {
                            r.cells.1 = Some(cell_value(value).ok_or(bad)?);
                        }
                    }
                    (3, true, b"compatible") => {
                        child_handover = value.split(|b| *b == 0).any(|s| s == HANDOVER_COMPATIBLE.as_bytes());
                    }
                    (2, true, b"ranges") => {
                        if let Some(r) = out.reserved.as_mut() {
                            r.ranges = Some(len);
                        }
                    }
                    (3, true, b"reg") => child_reg = Some((value_at, len)),
                    (3, true, b"status") => child_enabled = crate::enabled(Some(value)),
                    (3, true, b"no-map") => child_no_map = true,
                    (3, true, b"reusable") => child_reusable = true,
                    _ => {}
                }
            }
            NOP => {}
            END => {
                if depth != 0 || out.root_end == 0 {
                    return Err(bad);
                }
                finished = true;
            }
            _ => return Err(bad),
        }
    }
    Ok(out)
}

fn check_cells((address, size): (u32, u32)) -> Result<(u32, u32), PatchError> {
    if (1..=2).contains(&address) && (1..=2).contains(&size) {
        Ok((address, size))
    } else {
        Err(PatchError::Cells { address, size })
    }
}

/// The bytes being built: the node and the strings to append.
struct Build {
    node: heapless::Vec<u8, 256>,
    strings: heapless::Vec<u8, 96>,
    /// The strings block's size before the append.
    strings_base: usize,
}

impl Build {
    fn word(&mut self, value: u32) {
        // Capacity: the largest node built (a `/reserved-memory` holding the region) is under 200 bytes.
        let _ = self.node.extend_from_slice(&value.to_be_bytes());
    }

    fn pad(&mut self) {
        while !self.node.len().is_multiple_of(4) {
            let _ = self.node.push(0);
        }
    }

    fn begin(&mut self, name: &str) {
        self.word(BEGIN_NODE);
        let _ = self.node.extend_from_slice(name.as_bytes());
        let _ = self.node.push(0);
        self.pad();
    }

    /// The offset of `name` in the strings block: where the block already has it (anywhere, as a suffix too:
    /// a name is read up to its NUL), else appended.
    fn name_offset(&mut self, existing: &[u8], name: &str) -> u32 {
        let wanted = name.as_bytes();
        let find = |block: &[u8]| {
            block
                .windows(wanted.len() + 1)
                .position(|w| &w[..wanted.len()] == wanted && w[wanted.len()] == 0)
        };
        if let Some(at) = find(existing) {
            return at as u32;
        }
        if let Some(at) = find(&self.strings) {
            return (self.strings_base + at) as u32;
        }
        let at = self.strings_base + self.strings.len();
        let _ = self.strings.extend_from_slice(wanted);
        let _ = self.strings.push(0);
        at as u32
    }

    fn prop(&mut self, existing: &[u8], name: &str, value: &[u8]) {
        let offset = self.name_offset(existing, name);
        self.word(PROP);
        self.word(value.len() as u32);
        self.word(offset);
        let _ = self.node.extend_from_slice(value);
        self.pad();
    }

    fn end(&mut self) {
        self.word(END_NODE);
    }
}

/// Encodes `value` in `cells` cells (1 or 2), `None` when it does not fit.
fn encode(value: u64, cells: u32, out: &mut heapless::Vec<u8, 16>) -> Option<()> {
    if cells == 1 {
        out.extend_from_slice(&u32::try_from(value).ok()?.to_be_bytes()).ok()
    } else {
        out.extend_from_slice(&value.to_be_bytes()).ok()
    }
}

fn decode(value: &[u8], (address, size): (u32, u32)) -> Option<Range> {
    let a = 4 * address as usize;
    if value.len() != a + 4 * size as usize {
        return None;
    }
    let number = |bytes: &[u8]| bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    Some(Range {
        base: number(&value[..a]),
        size: number(&value[a..]),
    })
}

/// How many bytes from the tree's start a caller that may write `room` bytes there should hand
/// [`add_handover_region`]: the tree's `totalsize`, read from `header` (the tree's first 8 bytes), when that fits in
/// `room`. A caller that finds a tree in memory uses this rather than trusting the header with the bounds of its
/// slice.
///
/// # Errors
/// [`PatchError::BeyondWritable`]: no FDT magic, or a `totalsize` past `room`; nothing may be edited then.
pub fn editable_len(header: [u8; 8], room: usize) -> Result<usize, PatchError> {
    let magic = read_u32(&header, 0).unwrap_or_default();
    let total = read_u32(&header, 4).unwrap_or_default() as usize;
    if magic != MAGIC {
        return Err(PatchError::BeyondWritable { total: 0, room });
    }
    if total > room {
        return Err(PatchError::BeyondWritable { total, room });
    }
    Ok(total)
}

/// Adds `region` to the tree in `blob` as `/reserved-memory/handover@<base>` with `compatible =
/// "smmuv3,handover-region"`, `reg = <base size>` in `/reserved-memory`'s cells and `no-map`, creating
/// `/reserved-memory` (with the root's cells and an empty `ranges`) when the tree has none. The tree starts at
/// `blob[0]`; it may grow into the rest of `blob`.
///
/// # Errors
/// [`PatchError`]; the tree is then unchanged. A tree that already names this very region is unchanged too, and
/// that is [`Patched::AlreadyPresent`], not an error.
pub fn add_handover_region(blob: &mut [u8], region: Range) -> Result<Patched, PatchError> {
    let h = Header::read(blob)?;
    let found = scan(blob, &h)?;
    let root_cells = (found.root_cells.0.unwrap_or(2), found.root_cells.1.unwrap_or(1));
    let (cells, insert_at) = match &found.reserved {
        Some(r) => {
            let cells = check_cells((r.cells.0.unwrap_or(0), r.cells.1.unwrap_or(0)))?;
            // As Linux requires (and the reader): the root's cells and an empty `ranges`.
            if cells != root_cells || r.ranges != Some(0) {
                return Err(PatchError::ParentLayout {
                    cells,
                    root_cells,
                    ranges: r.ranges,
                });
            }
            match r.handover_regs.as_slice() {
                [] => {}
                [(at, len, usable)] => {
                    let named = decode(&blob[*at..*at + *len], cells)
                        .filter(|_| *usable)
                        .ok_or(PatchError::MalformedRegionNode(*at))?;
                    return if named == region {
                        Ok(Patched::AlreadyPresent)
                    } else {
                        Err(PatchError::AlreadyNamesAnother(named))
                    };
                }
                [(at, len, _), ..] => {
                    let named = decode(&blob[*at..*at + *len], cells).unwrap_or_default();
                    return Err(PatchError::AlreadyNamesAnother(named));
                }
            }
            (cells, r.end)
        }
        None => (check_cells(root_cells)?, found.root_end),
    };
    if region.end().is_none() {
        return Err(PatchError::DoesNotFit(region));
    }
    let mut reg = heapless::Vec::<u8, 16>::new();
    encode(region.base, cells.0, &mut reg)
        .and_then(|()| encode(region.size, cells.1, &mut reg))
        .ok_or(PatchError::DoesNotFit(region))?;

    let existing = h.strings(blob);
    let mut b = Build {
        node: heapless::Vec::new(),
        strings: heapless::Vec::new(),
        strings_base: h.size_strings,
    };
    let create = found.reserved.is_none();
    if create {
        b.begin("reserved-memory");
        b.prop(existing, "#address-cells", &cells.0.to_be_bytes());
        b.prop(existing, "#size-cells", &cells.1.to_be_bytes());
        b.prop(existing, "ranges", &[]);
    }
    let mut name = heapless::String::<32>::new();
    // "handover@" and at most 16 hex digits.
    let _ = write!(name, "handover@{:x}", region.base);
    b.begin(&name);
    let mut compatible = heapless::Vec::<u8, 32>::new();
    let _ = compatible.extend_from_slice(HANDOVER_COMPATIBLE.as_bytes());
    let _ = compatible.push(0);
    b.prop(existing, "compatible", &compatible);
    b.prop(existing, "reg", &reg);
    b.prop(existing, "no-map", &[]);
    b.end();
    if create {
        b.end();
    }

    // Every check is done; from here on the blob is written.
    let (node, strings) = (b.node.len(), b.strings.len());
    let strings_end = h.off_strings + h.size_strings;
    let needed = strings_end + strings + node;
    if needed > blob.len() {
        return Err(PatchError::NoSpace {
            needed,
            capacity: blob.len(),
        });
    }
    // The strings block is the last block: its new names go right after it.
    blob[strings_end..strings_end + strings].copy_from_slice(&b.strings);
    // The node goes before the `END_NODE` found; the rest of the structure block and the strings block move up.
    blob.copy_within(insert_at..strings_end + strings, insert_at + node);
    blob[insert_at..insert_at + node].copy_from_slice(&b.node);
    let total = h.total.max(needed);
    write_u32(blob, 4, total as u32);
    write_u32(blob, 12, (h.off_strings + node) as u32);
    write_u32(blob, 32, (h.size_strings + strings) as u32);
    write_u32(blob, 36, (h.size_struct + node) as u32);
    Ok(Patched::Added {
        created_reserved_memory: create,
        total_size: total,
    })
}
