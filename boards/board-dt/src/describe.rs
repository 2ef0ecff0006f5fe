//! The SMMU's own node, and a PCI host's `iommu-map`, as the driver's board types: [`SmmuDescription`] and
//! [`IommuMap`].
//!
//! Unlike QEMU's trees, a SoC's tree puts the SMMU inside buses (`/soc/bus@49000000/iommu@490d0000` on the
//! i.MX95), whose `reg` is in the bus's own address space: [`smmu_description`] translates it through every
//! enclosing bus's `ranges` to the CPU's physical address, as the DT specification says (an empty `ranges` is the
//! identity; a bus without one is not memory-mapped, and an address no `ranges` entry covers is refused).

use core::fmt;

use fdt::Fdt;
use fdt::node::FdtNode;
use smmuv3::board::IommuMapEntry;
use smmuv3::{IommuMap, SmmuDescription, SmmuInterrupts};

/// The deepest node [`smmu_description`] translates (buses nested beyond this are an error).
pub const MAX_DEPTH: usize = 16;

/// Why the SMMU or its map could not be described. Nothing is guessed: each names what is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DescribeError {
    /// The node has no `reg`, or its first entry is not a whole address and size.
    NoReg,
    /// A property does not have the shape its binding gives (the property's name).
    Malformed(&'static str),
    /// An enclosing bus has no `ranges`: its children are not in the CPU's address space.
    NotMemoryMapped,
    /// No entry of an enclosing bus's `ranges` covers the address (the bus address).
    Untranslated(u64),
    /// The node is nested deeper than [`MAX_DEPTH`], or not in the tree.
    NotFound,
    /// The interrupt parent is not a GIC-style controller (`#interrupt-cells` other than 3).
    InterruptCells(u32),
    /// The `iommu-map` has more ranges than an [`IommuMap`] holds.
    TooManyRanges,
}

impl fmt::Display for DescribeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DescribeError::NoReg => f.write_str("the node has no reg (address and size)"),
            DescribeError::Malformed(what) => write!(f, "property {what} is malformed"),
            DescribeError::NotMemoryMapped => {
                f.write_str("an enclosing bus has no ranges: the node is not in the CPU's address space")
            }
            DescribeError::Untranslated(a) => write!(f, "no ranges entry of an enclosing bus covers address {a:#x}"),
            DescribeError::NotFound => write!(f, "the node is not in the tree (or deeper than {MAX_DEPTH} levels)"),
            DescribeError::InterruptCells(n) => {
                write!(
                    f,
                    "the interrupt parent has #interrupt-cells {n}: only a GIC's 3 are read"
                )
            }
            DescribeError::TooManyRanges => f.write_str("the iommu-map has more ranges than an IommuMap holds"),
        }
    }
}

impl core::error::Error for DescribeError {}

type Ancestors<'b, 'a> = heapless::Vec<FdtNode<'b, 'a>, MAX_DEPTH>;

/// Whether `a` and `b` are the same node (their names are the same bytes of the structure block).
fn same(a: FdtNode<'_, '_>, b: FdtNode<'_, '_>) -> bool {
    core::ptr::eq(a.name.as_ptr(), b.name.as_ptr())
}

/// The nodes from the root down to `target`'s parent.
fn ancestors<'b, 'a>(fdt: &'b Fdt<'a>, target: FdtNode<'b, 'a>) -> Result<Ancestors<'b, 'a>, DescribeError> {
    fn search<'b, 'a>(node: FdtNode<'b, 'a>, target: FdtNode<'b, 'a>, stack: &mut Ancestors<'b, 'a>) -> bool {
        for child in node.children() {
            if same(child, target) {
                return true;
            }
            if stack.push(child).is_err() {
                continue;
            }
            if search(child, target, stack) {
                return true;
            }
            stack.pop();
        }
        false
    }
    let root = fdt.find_node("/").ok_or(DescribeError::NotFound)?;
    let mut stack = Ancestors::new();
    stack.push(root).map_err(|_| DescribeError::NotFound)?;
    if search(root, target, &mut stack) {
        Ok(stack)
    } else {
        Err(DescribeError::NotFound)
    }
}

/// A one-cell property.
fn cell(node: FdtNode<'_, '_>, name: &str) -> Option<u32> {
    Some(u32::from_be_bytes(node.property(name)?.value.try_into().ok()?))
}

/// A node's `#address-cells` and `#size-cells` for its children (the specification's defaults, 2 and 1, when
/// absent).
fn cell_sizes(node: FdtNode<'_, '_>) -> (usize, usize) {
    (
        cell(node, "#address-cells").unwrap_or(2) as usize,
        cell(node, "#size-cells").unwrap_or(1) as usize,
    )
}

/// A number of 1 or 2 big-endian cells.
fn number(bytes: &[u8]) -> Option<u64> {
    match bytes.len() {
        4 => Some(u64::from(u32::from_be_bytes(bytes.try_into().ok()?))),
        8 => Some(u64::from_be_bytes(bytes.try_into().ok()?)),
        _ => None,
    }
}

/// `address`, in the address space of the children of `ancestors[level]`, translated to the CPU's.
fn translate(ancestors: &[FdtNode<'_, '_>], mut address: u64) -> Result<u64, DescribeError> {
    // From the innermost bus out; the root's children are in the CPU's space already.
    for level in (1..ancestors.len()).rev() {
        let bus = ancestors[level];
        let ranges = bus.property("ranges").ok_or(DescribeError::NotMemoryMapped)?.value;
        if ranges.is_empty() {
            continue;
        }
        let (child_cells, size_cells) = cell_sizes(bus);
        let (parent_cells, _) = cell_sizes(ancestors[level - 1]);
        let stride = 4 * (child_cells + parent_cells + size_cells);
        if stride == 0 || !ranges.len().is_multiple_of(stride) {
            return Err(DescribeError::Malformed("ranges"));
        }
        let mut translated = None;
        for entry in ranges.chunks_exact(stride) {
            let (child, rest) = entry.split_at(4 * child_cells);
            let (parent, size) = rest.split_at(4 * parent_cells);
            let (child, parent, size) = match (number(child), number(parent), number(size)) {
                (Some(c), Some(p), Some(s)) => (c, p, s),
                _ => return Err(DescribeError::Malformed("ranges")),
            };
            if address >= child && address - child < size {
                translated = Some(parent + (address - child));
                break;
            }
        }
        address = translated.ok_or(DescribeError::Untranslated(address))?;
    }
    Ok(address)
}

/// The first `reg` entry of `node` (whose ancestors, root first, are `ancestors`) as a CPU physical address and a
/// size.
fn first_reg(ancestors: &[FdtNode<'_, '_>], node: FdtNode<'_, '_>) -> Result<(u64, u64), DescribeError> {
    let parent = *ancestors.last().ok_or(DescribeError::NotFound)?;
    let (address_cells, size_cells) = cell_sizes(parent);
    let reg = node.property("reg").ok_or(DescribeError::NoReg)?.value;
    let first = reg
        .get(..4 * (address_cells + size_cells))
        .ok_or(DescribeError::NoReg)?;
    let (address, size) = first.split_at(4 * address_cells);
    let (address, size) = (
        number(address).ok_or(DescribeError::Malformed("reg"))?,
        number(size).ok_or(DescribeError::Malformed("reg"))?,
    );
    Ok((translate(ancestors, address)?, size))
}

/// Where `node`'s registers are: its first `reg` entry, translated through every enclosing bus's `ranges` to a
/// CPU physical address, and its size (a console, a GIC, any device a board description names).
///
/// # Errors
/// As [`smmu_description`] for the address.
pub fn registers(fdt: &Fdt<'_>, node: FdtNode<'_, '_>) -> Result<(u64, u64), DescribeError> {
    first_reg(&ancestors(fdt, node)?, node)
}

/// The SMMUv3 `node` of `fdt` as the driver takes it: its first `reg` translated to a CPU physical address, the
/// four interrupts by `interrupt-names` (GIC binding: SPI n is INTID 32 + n, PPI n is 16 + n; edge-triggered when
/// their flags say so), and `dma-coherent`.
///
/// # Errors
/// [`DescribeError`]: no `reg`; an enclosing bus without `ranges` or with none covering the registers; an
/// interrupt parent whose specifiers are not three cells; `interrupts` that is not a whole number of specifiers.
pub fn smmu_description(fdt: &Fdt<'_>, node: FdtNode<'_, '_>) -> Result<SmmuDescription, DescribeError> {
    let ancestors = ancestors(fdt, node)?;
    let (base, size) = first_reg(&ancestors, node)?;
    let mut interrupts = SmmuInterrupts::default();
    if let (Some(irqs), Some(names)) = (node.property("interrupts"), node.property("interrupt-names")) {
        // The interrupt parent: the node's own, or the nearest ancestor's.
        let parent_phandle = core::iter::once(node)
            .chain(ancestors.iter().rev().copied())
            .find_map(|n| cell(n, "interrupt-parent"));
        let cells_per_irq = parent_phandle
            .and_then(|p| fdt.find_phandle(p))
            .and_then(|controller| cell(controller, "#interrupt-cells"))
            .unwrap_or(3);
        if cells_per_irq != 3 {
            return Err(DescribeError::InterruptCells(cells_per_irq));
        }
        if !irqs.value.len().is_multiple_of(12) {
            return Err(DescribeError::Malformed("interrupts"));
        }
        let names = names.value.split(|b| *b == 0).filter(|n| !n.is_empty());
        for (spec, name) in irqs.value.chunks_exact(12).zip(names) {
            let word = |i: usize| u32::from_be_bytes([spec[4 * i], spec[4 * i + 1], spec[4 * i + 2], spec[4 * i + 3]]);
            let intid = word(1) + if word(0) == 0 { 32 } else { 16 };
            // Flags: 1 rising edge, 2 falling edge (4 and 8: level).
            interrupts.edge_triggered = word(2) & 0x3 != 0;
            match name {
                b"eventq" => interrupts.eventq = Some(intid),
                b"priq" => interrupts.priq = Some(intid),
                b"cmdq-sync" => interrupts.cmdq_sync = Some(intid),
                b"gerror" => interrupts.gerror = Some(intid),
                _ => {}
            }
        }
    }
    Ok(SmmuDescription {
        base,
        size,
        interrupts,
        dma_coherent: node.property("dma-coherent").is_some(),
    })
}

/// The `iommu-map` of PCI host `host` for the SMMU `smmu` (entries naming another IOMMU are skipped), and its
/// `iommu-map-mask` (ANDed with a requester ID before the lookup). An empty map when the host has none.
///
/// # Errors
/// [`DescribeError::Malformed`] for an `iommu-map` that is not whole `<rid-base iommu sid-base length>` entries
/// (the SMMUv3's one `#iommu-cells`) or an `iommu-map-mask` that is not one cell;
/// [`DescribeError::TooManyRanges`].
pub fn iommu_map(host: FdtNode<'_, '_>, smmu: FdtNode<'_, '_>) -> Result<(IommuMap, Option<u32>), DescribeError> {
    let ours = cell(smmu, "phandle").or_else(|| cell(smmu, "linux,phandle"));
    let mut map = IommuMap::new();
    if let Some(property) = host.property("iommu-map") {
        if !property.value.len().is_multiple_of(16) {
            return Err(DescribeError::Malformed("iommu-map"));
        }
        for entry in property.value.chunks_exact(16) {
            let word =
                |i: usize| u32::from_be_bytes([entry[4 * i], entry[4 * i + 1], entry[4 * i + 2], entry[4 * i + 3]]);
            if ours != Some(word(1)) {
                continue;
            }
            map.push(IommuMapEntry {
                rid_base: word(0),
                sid_base: word(2),
                length: word(3),
            })
            .map_err(|_| DescribeError::TooManyRanges)?;
        }
    }
    let mask = match host.property("iommu-map-mask") {
        None => None,
        Some(p) => Some(u32::from_be_bytes(
            p.value
                .try_into()
                .map_err(|_| DescribeError::Malformed("iommu-map-mask"))?,
        )),
    };
    Ok((map, mask))
}
