//! The live-update handover region in a flattened device tree (FDT).
//!
//! A device-tree board states the region as a child of `/reserved-memory` whose `compatible` is
//! [`HANDOVER_COMPATIBLE`]:
//!
//! ```dts
//! reserved-memory {
//!     #address-cells = <2>;
//!     #size-cells = <2>;
//!     ranges;
//!
//!     handover@7dff0000 {
//!         compatible = "smmuv3,handover-region";
//!         reg = <0x0 0x7dff0000 0x0 0x2000000>;   /* base and size, in /reserved-memory's cells */
//!         no-map;
//!     };
//! };
//! ```
//!
//! - [`reserved_memory`] reads every child of `/reserved-memory` (and the header's `/memreserve/` entries): the
//!   handover region when one child has the compatible, and every other fixed range, which the firmware must keep
//!   out of its own allocators as well. Whatever is wrong with the tree's handover node (or nodes), every range one
//!   names is reserved ([`ReservedMemory::kept_out`]).
//! - [`check_region`] says whether a region may be used: page-aligned, inside one RAM bank, clear of what the firmware
//!   protects.
//! - [`largest_free`] and [`highest_free`] find where the firmware's pools and its reset notes go, clear of all of
//!   it.
//! - [`add_handover_region`] writes the node into a tree in place (within [`editable_len`] bytes of its start),
//!   creating `/reserved-memory` when the tree has none (QEMU's generated trees), so that the image a running
//!   hand-off jumps to reads the region from the tree it is passed.
//!
//! Why a writer of our own: the `fdt` crate only reads, and the crates that edit a tree (`fdt-edit`, `vm-fdt`)
//! rebuild it in `alloc` collections; the firmware has no allocator. Adding one node at the end of a node is a
//! structure-block insertion plus a few strings, done here in place with bounds checked before the first write.
#![no_std]

pub mod patch;

use core::fmt;

use fdt::Fdt;

pub use patch::{PatchError, Patched, add_handover_region, editable_len};

/// The `compatible` of the `/reserved-memory` child that is the live-update handover region.
pub const HANDOVER_COMPATIBLE: &str = "smmuv3,handover-region";

/// The granule the region must be aligned to (base and size).
pub const PAGE: u64 = 4096;

/// Reserved ranges other than the handover region that [`reserved_memory`] keeps (every fixed child of
/// `/reserved-memory` and every `/memreserve/` entry); a tree with more is refused rather than some dropped.
pub const MAX_RESERVED: usize = 16;

/// A physical address range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range {
    /// First byte.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
}

impl Range {
    /// One past the last byte (`None` when that overflows).
    pub fn end(&self) -> Option<u64> {
        self.base.checked_add(self.size)
    }

    /// Whether the two ranges share a byte (empty ranges share none).
    pub fn overlaps(&self, other: &Range) -> bool {
        let (Some(a), Some(b)) = (self.end(), other.end()) else {
            return self.size != 0 && other.size != 0;
        };
        self.base < b && other.base < a
    }

    /// Whether `other` lies wholly inside this range.
    pub fn contains(&self, other: &Range) -> bool {
        match (self.end(), other.end()) {
            (Some(a), Some(b)) => self.base <= other.base && b <= a,
            _ => false,
        }
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.end() {
            Some(end) => write!(f, "{:#x}..{:#x}", self.base, end),
            None => write!(f, "{:#x}+{:#x}", self.base, self.size),
        }
    }
}

/// What a tree reserves.
///
/// Every range a handover-compatible node names is in exactly one place: `handover` when the tree states one
/// usable region, `others` otherwise (with `handover_error` saying why). So `others` plus `handover` is everything
/// no allocator may take ([`ReservedMemory::kept_out`]), whatever is wrong with the tree's handover nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReservedMemory<'a> {
    /// The handover region: the one enabled `/reserved-memory` child whose `compatible` is
    /// [`HANDOVER_COMPATIBLE`], when it and its parent are well-formed. `None` whenever `handover_error` is set.
    pub handover: Option<Range>,
    /// Why the tree's handover region cannot be used ([`ReadError::HandoverNotOneRange`], [`ReadError::Reg`],
    /// [`ReadError::TwoHandoverRegions`]); `handover` is `None` then, and every range any handover node names is
    /// in `others`. The other ranges are still read: the region is unusable, the rest of the tree is not.
    pub handover_error: Option<ReadError<'a>>,
    /// Every other fixed reserved range: the other children's `reg` entries, the `/memreserve/` entries, and the
    /// ranges of handover nodes that cannot be used. A range that wraps past the end of the address space runs to
    /// its end here.
    pub others: heapless::Vec<Range, MAX_RESERVED>,
}

impl ReservedMemory<'_> {
    /// Everything no allocator may take: `others` and the handover region.
    pub fn kept_out(&self) -> impl Iterator<Item = Range> + '_ {
        self.others.iter().copied().chain(self.handover)
    }
}

/// Why `/reserved-memory` cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadError<'a> {
    /// `/reserved-memory`'s `#address-cells` or `#size-cells` is missing, not one cell, or outside 1..=2 (0 for
    /// the size).
    Cells {
        /// The address cells found (0 when missing or malformed).
        address: u32,
        /// The size cells found (0 when missing or malformed).
        size: u32,
    },
    /// A child's `reg` is not a whole number of (address, size) pairs, or (the handover region's) a range wraps
    /// past the end of the address space.
    Reg {
        /// The child's name.
        node: &'a str,
        /// The `reg` property's length in bytes.
        len: usize,
    },
    /// The handover region's node has no `reg`, or more than one range in it.
    HandoverNotOneRange {
        /// The node's name.
        node: &'a str,
    },
    /// Two (or more) enabled children carry [`HANDOVER_COMPATIBLE`].
    TwoHandoverRegions {
        /// The first one's name.
        first: &'a str,
        /// The second one's name.
        second: &'a str,
    },
    /// The handover region's node is not `no-map`, or is `reusable`: an OS could map it or hand it out.
    HandoverMappable {
        /// The node's name.
        node: &'a str,
    },
    /// `/reserved-memory` does not have the root's `#address-cells` and `#size-cells` and an empty `ranges`, as
    /// Linux requires: the handover region is not used (its children's addresses are still read as they stand).
    ParentLayout {
        /// Its cells (address, size).
        cells: (u32, u32),
        /// The root's cells (2 and 1 when absent; 0 when malformed).
        root_cells: (u32, u32),
        /// The length of its `ranges`, `None` without one.
        ranges: Option<usize>,
    },
    /// More than [`MAX_RESERVED`] other reserved ranges.
    TooManyReserved,
}

impl fmt::Display for ReadError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Cells { address, size } => write!(
                f,
                "/reserved-memory has #address-cells {address} and #size-cells {size} (1 or 2 each expected)"
            ),
            ReadError::Reg { node, len } => write!(
                f,
                "/reserved-memory/{node}: reg of {len} bytes is not whole (address, size) pairs inside the address space"
            ),
            ReadError::HandoverNotOneRange { node } => write!(
                f,
                "/reserved-memory/{node} ({HANDOVER_COMPATIBLE}) must have a reg of exactly one range"
            ),
            ReadError::TwoHandoverRegions { first, second } => write!(
                f,
                "two /reserved-memory nodes are {HANDOVER_COMPATIBLE}: {first} and {second}"
            ),
            ReadError::HandoverMappable { node } => write!(
                f,
                "/reserved-memory/{node} ({HANDOVER_COMPATIBLE}) must be no-map and not reusable"
            ),
            ReadError::ParentLayout {
                cells,
                root_cells,
                ranges,
            } => write!(
                f,
                "/reserved-memory has cells {cells:?} (the root {root_cells:?}) and a ranges of {ranges:?} bytes: the root's cells and an empty ranges expected"
            ),
            ReadError::TooManyReserved => write!(
                f,
                "more than {MAX_RESERVED} reserved ranges in /reserved-memory and /memreserve/"
            ),
        }
    }
}

fn be_cells(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

fn one_cell(fdt_value: Option<&[u8]>) -> u32 {
    match fdt_value {
        Some(&[a, b, c, d]) => u32::from_be_bytes([a, b, c, d]),
        _ => 0,
    }
}

/// The range `base` and `size` name, and whether it wraps past the end of the address space: a range that wraps
/// runs to the end of it (the last byte of a 64-bit address space is RAM nowhere).
fn clamped(base: u64, size: u64) -> (Range, bool) {
    match base.checked_add(size) {
        Some(_) => (Range { base, size }, false),
        None => (
            Range {
                base,
                size: u64::MAX - base,
            },
            true,
        ),
    }
}

/// Decodes a `reg` value of (address, size) pairs, `address_cells` and `size_cells` cells each (1 or 2): each
/// range, and whether it wrapped ([`clamped`]).
fn reg_ranges(value: &[u8], address_cells: u32, size_cells: u32) -> Option<impl Iterator<Item = (Range, bool)> + '_> {
    let (a, s) = (4 * address_cells as usize, 4 * size_cells as usize);
    if value.is_empty() || !value.len().is_multiple_of(a + s) {
        return None;
    }
    Some(
        value
            .chunks_exact(a + s)
            .map(move |pair| clamped(be_cells(&pair[..a]), be_cells(&pair[a..]))),
    )
}

/// Reads what the tree reserves: every enabled child of `/reserved-memory` with a `reg` (a child without one is
/// allocated dynamically and names no fixed range), and the header's `/memreserve/` entries. A tree without
/// `/reserved-memory` reserves only the latter.
///
/// A handover region node that is not one well-formed range, or a second one, is not an error here: it is
/// [`ReservedMemory::handover_error`], and every range any handover node names (each one that reads as a range: a
/// `reg` that is not whole pairs names none; one that wraps runs to the end of the address space) is among
/// `others`, so that no allocator takes it.
///
/// # Errors
/// [`ReadError`]: `/reserved-memory`'s cells are unusable, another child's `reg` is not whole pairs, or there are
/// more than [`MAX_RESERVED`] ranges. Nothing is guessed: a caller that gets an error cannot know which RAM is
/// free.
pub fn reserved_memory<'a>(fdt: &Fdt<'a>) -> Result<ReservedMemory<'a>, ReadError<'a>> {
    let mut out = ReservedMemory::default();
    for r in fdt.memory_reservations() {
        let (range, _) = clamped(r.address() as u64, r.size() as u64);
        if range.size != 0 {
            out.others.push(range).map_err(|_| ReadError::TooManyReserved)?;
        }
    }
    let Some(parent) = fdt.find_node("/reserved-memory") else {
        return Ok(out);
    };
    let address_cells = one_cell(parent.property("#address-cells").map(|p| p.value));
    let size_cells = one_cell(parent.property("#size-cells").map(|p| p.value));
    if !(1..=2).contains(&address_cells) || !(1..=2).contains(&size_cells) {
        return Err(ReadError::Cells {
            address: address_cells,
            size: size_cells,
        });
    }
    // As Linux requires: the root's cells (2 and 1 when absent) and an empty `ranges`.
    let root = fdt.find_node("/");
    let root_cell = |name, absent| {
        root.and_then(|r| r.property(name))
            .map_or(absent, |p| one_cell(Some(p.value)))
    };
    let root_cells = (root_cell("#address-cells", 2), root_cell("#size-cells", 1));
    let ranges = parent.property("ranges").map(|p| p.value.len());
    let layout_error =
        ((address_cells, size_cells) != root_cells || ranges != Some(0)).then_some(ReadError::ParentLayout {
            cells: (address_cells, size_cells),
            root_cells,
            ranges,
        });
    // Every range the handover nodes name, the first two nodes' names, and the first thing wrong with one.
    let mut claims = heapless::Vec::<Range, MAX_RESERVED>::new();
    let mut claimants: (Option<&'a str>, Option<&'a str>) = (None, None);
    let mut node_error = None;
    for child in parent.children() {
        if !enabled(child.property("status").map(|p| p.value)) {
            continue;
        }
        let handover = child
            .compatible()
            .is_some_and(|c| c.all().any(|s| s == HANDOVER_COMPATIBLE));
        let reg = child.property("reg");
        if !handover {
            // A child without `reg` is allocated dynamically: it names no fixed range.
            let Some(reg) = reg else { continue };
            let bad_reg = ReadError::Reg {
                node: child.name,
                len: reg.value.len(),
            };
            for (range, _) in reg_ranges(reg.value, address_cells, size_cells).ok_or(bad_reg)? {
                if range.size != 0 {
                    out.others.push(range).map_err(|_| ReadError::TooManyReserved)?;
                }
            }
            continue;
        }
        match claimants {
            (None, _) => claimants.0 = Some(child.name),
            (Some(_), None) => claimants.1 = Some(child.name),
            _ => {}
        }
        if child.property("no-map").is_none() || child.property("reusable").is_some() {
            node_error.get_or_insert(ReadError::HandoverMappable { node: child.name });
        }
        let Some(reg) = reg else {
            node_error.get_or_insert(ReadError::HandoverNotOneRange { node: child.name });
            continue;
        };
        let bad_reg = ReadError::Reg {
            node: child.name,
            len: reg.value.len(),
        };
        // A `reg` that is not whole pairs names no range: there is nothing to keep out for it.
        let Some(ranges) = reg_ranges(reg.value, address_cells, size_cells) else {
            node_error.get_or_insert(bad_reg);
            continue;
        };
        let mut count = 0;
        for (range, wrapped) in ranges {
            count += 1;
            if wrapped {
                node_error.get_or_insert(bad_reg);
            }
            claims.push(range).map_err(|_| ReadError::TooManyReserved)?;
        }
        if count != 1 {
            node_error.get_or_insert(ReadError::HandoverNotOneRange { node: child.name });
        }
    }
    let error = match claimants {
        (None, _) => None,
        (Some(_), _) if layout_error.is_some() => layout_error,
        (Some(first), Some(second)) => Some(ReadError::TwoHandoverRegions { first, second }),
        (Some(_), None) => node_error,
    };
    match (error, claims.as_slice()) {
        (None, [region]) => out.handover = Some(*region),
        (error, _) => {
            // No region is used; none of what the handover nodes name is free RAM.
            out.handover_error = error;
            for range in claims.iter().filter(|r| r.size != 0) {
                out.others.push(*range).map_err(|_| ReadError::TooManyReserved)?;
            }
        }
    }
    Ok(out)
}

/// Whether a node whose `status` is `status` is enabled: no `status`, `"okay"` or `"ok"` (the older spelling). A
/// `status` that is not a string reads as enabled, so that what the node names stays reserved. The reader and the
/// writer both decide with this.
pub(crate) fn enabled(status: Option<&[u8]>) -> bool {
    match status.map(core::str::from_utf8) {
        Some(Ok(s)) => matches!(s.trim_end_matches('\0'), "okay" | "ok"),
        _ => true,
    }
}

/// Why a handover region cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionError {
    /// Its base or size is not a multiple of [`PAGE`], or it is empty.
    Misaligned(Range),
    /// It does not lie wholly inside one RAM bank.
    OutsideRam(Range),
    /// It overlaps memory the firmware protects (the image, the reset notes, another reserved range).
    Overlaps {
        /// The region.
        region: Range,
        /// What it overlaps.
        what: &'static str,
        /// Where that is.
        other: Range,
    },
}

impl fmt::Display for RegionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegionError::Misaligned(r) => write!(f, "{r} is empty or not {PAGE}-byte aligned in base and size"),
            RegionError::OutsideRam(r) => write!(f, "{r} is not inside one RAM bank"),
            RegionError::Overlaps { region, what, other } => write!(f, "{region} overlaps {what} at {other}"),
        }
    }
}

/// Checks that `region` can be the handover region: page-aligned and not empty, inside one of the `ram` banks, and
/// clear of every range in `protected` (each with what it is, for the error).
///
/// # Errors
/// The first [`RegionError`] found.
pub fn check_region(region: Range, ram: &[Range], protected: &[(&'static str, Range)]) -> Result<(), RegionError> {
    if region.size == 0 || !region.base.is_multiple_of(PAGE) || !region.size.is_multiple_of(PAGE) {
        return Err(RegionError::Misaligned(region));
    }
    if !ram.iter().any(|bank| bank.contains(&region)) {
        return Err(RegionError::OutsideRam(region));
    }
    if let Some((what, other)) = protected.iter().find(|(_, other)| other.overlaps(&region)) {
        return Err(RegionError::Overlaps {
            region,
            what,
            other: *other,
        });
    }
    Ok(())
}

/// The largest part of `window` clear of every range in `reserved` (the lowest of equally large ones); `None` when
/// `reserved` covers all of it. What lies outside `window` is ignored; a reserved range that wraps covers
/// everything above its base.
pub fn largest_free(window: Range, reserved: &[Range]) -> Option<Range> {
    let window_end = window.end().unwrap_or(u64::MAX);
    let covers = |r: &Range, at: u64| r.size != 0 && r.base <= at && at < r.end().unwrap_or(u64::MAX);
    // A free part starts at the window's base or where a reserved range ends, and ends at the next reserved base.
    let starts = core::iter::once(window.base).chain(reserved.iter().filter_map(Range::end));
    let mut best: Option<Range> = None;
    for start in starts {
        if start < window.base || start >= window_end || reserved.iter().any(|r| covers(r, start)) {
            continue;
        }
        let end = reserved
            .iter()
            .filter(|r| r.size != 0 && r.base > start)
            .map(|r| r.base)
            .fold(window_end, u64::min);
        let free = Range {
            base: start,
            size: end - start,
        };
        if best.is_none_or(|b| free.size > b.size || (free.size == b.size && free.base < b.base)) {
            best = Some(free);
        }
    }
    best
}

/// The base of the highest `size`-byte block inside `window`, aligned to `align` (a power of two), clear of every
/// range in `reserved`; `None` when there is none.
pub fn highest_free(window: Range, reserved: &[Range], size: u64, align: u64) -> Option<u64> {
    if size == 0 || !align.is_power_of_two() {
        return None;
    }
    let mask = !(align - 1);
    let mut candidate = window.end().unwrap_or(u64::MAX).checked_sub(size)? & mask;
    // Each step moves below at least one reserved range for good: one more step than there are ranges suffices.
    for _ in 0..=reserved.len() {
        if candidate < window.base {
            return None;
        }
        let block = Range { base: candidate, size };
        match reserved.iter().filter(|r| r.overlaps(&block)).map(|r| r.base).min() {
            None => return Some(candidate),
            Some(base) => candidate = base.checked_sub(size)? & mask,
        }
    }
    None
}
