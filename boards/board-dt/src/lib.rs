//! What a flattened device tree (FDT) says about an SMMUv3: its own node ([`smmu_description`], through every
//! enclosing bus's `ranges`), a PCI host's `iommu-map` ([`iommu_map`]), and the masters behind it that are not PCI
//! functions ([`platform_masters`]).
//!
//! On embedded SoCs the masters that are not PCI functions (Ethernet, USB, display, NPUs, DMA engines) name their
//! StreamIDs in an `iommus` property (the generic IOMMU binding, `Documentation/devicetree/bindings/iommu/
//! iommu.txt` in Linux): a list of specifiers, each the phandle of an IOMMU followed by that IOMMU's
//! `#iommu-cells` cells. For an SMMUv3 (`arm,smmu-v3`) the binding has one cell, the StreamID; some trees give
//! two, a StreamID and a mask of StreamID bits to ignore (the form of the Arm SMMU v1/v2 binding), which is read
//! here as the range of StreamIDs the mask covers.
//!
//! [`platform_masters`] walks the whole tree and hands every specifier that names the chosen SMMU to the caller
//! with its node's path, so a board description can list them and a hypervisor can give each device its own
//! domain. A malformed `iommus` (a specifier cut short, a phandle no node has, an IOMMU whose `#iommu-cells` is
//! missing or not 1 or 2 when it is the SMMU) is an error that names the node: never a guessed StreamID.
//!
//! [`chosen::settings`] reads the run settings a boot loader leaves in `/chosen` for the test firmware.
#![no_std]

pub mod chosen;
pub mod describe;

pub use describe::{DescribeError, iommu_map, registers, smmu_description};

use core::fmt;

use fdt::Fdt;
use fdt::node::FdtNode;

/// The longest node path [`platform_masters`] reports, in bytes (a longer one is an error, not cut: SoC trees
/// nest a few buses deep, about 60 bytes at most in the trees seen so far).
pub const MAX_PATH: usize = 96;

/// A node path, `/soc/bus@49000000/npu@4ab00000`.
pub type Path = heapless::String<MAX_PATH>;

/// One `iommus` specifier that names the SMMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Master {
    /// The master's node.
    pub path: Path,
    /// Its StreamID.
    pub stream_id: u32,
    /// StreamID bits the SMMU ignores for this master (`#iommu-cells = <2>`); 0 with one cell.
    pub mask: u32,
    /// Whether the node is enabled (`status` absent, `"okay"` or `"ok"`): a disabled master issues no DMA, but its
    /// StreamIDs still belong to it.
    pub enabled: bool,
}

impl Master {
    /// The StreamIDs the specifier covers: `stream_id` with every combination of the `mask` bits, lowest and
    /// highest (contiguous only when the mask's bits are the low ones, as in every tree seen so far).
    pub fn stream_ids(&self) -> (u32, u32) {
        (self.stream_id & !self.mask, self.stream_id | self.mask)
    }
}

/// Why the masters could not be read. Each names the node whose property is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MastersError {
    /// The SMMU's own node has no `#iommu-cells`, or a value other than 1 or 2.
    SmmuCells {
        /// The value found (`None`: missing or not one cell).
        cells: Option<u32>,
    },
    /// An `iommus` specifier names a phandle no node of the tree has.
    UnknownPhandle {
        /// The master's node.
        path: Path,
        /// The phandle.
        phandle: u32,
    },
    /// An `iommus` specifier names an IOMMU whose `#iommu-cells` is missing (so the rest of the list cannot be
    /// read).
    NoIommuCells {
        /// The master's node.
        path: Path,
        /// The IOMMU's phandle.
        phandle: u32,
    },
    /// The `iommus` list ends inside a specifier (or is not a whole number of cells).
    Truncated {
        /// The master's node.
        path: Path,
    },
    /// A node path is longer than [`MAX_PATH`].
    PathTooLong,
}

impl fmt::Display for MastersError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MastersError::SmmuCells { cells: Some(n) } => {
                write!(
                    f,
                    "the SMMU's #iommu-cells is {n}: an SMMUv3 master takes 1 (a StreamID) or 2 (and a mask)"
                )
            }
            MastersError::SmmuCells { cells: None } => write!(f, "the SMMU node has no (one-cell) #iommu-cells"),
            MastersError::UnknownPhandle { path, phandle } => {
                write!(f, "{path}: iommus names phandle {phandle:#x}, which no node has")
            }
            MastersError::NoIommuCells { path, phandle } => {
                write!(
                    f,
                    "{path}: iommus names phandle {phandle:#x}, whose node has no #iommu-cells"
                )
            }
            MastersError::Truncated { path } => write!(f, "{path}: iommus ends inside a specifier"),
            MastersError::PathTooLong => write!(f, "a node path is longer than {MAX_PATH} bytes"),
        }
    }
}

impl core::error::Error for MastersError {}

/// A one-cell property's value.
fn cell(node: FdtNode<'_, '_>, name: &str) -> Option<u32> {
    let value = node.property(name)?.value;
    Some(u32::from_be_bytes(value.try_into().ok()?))
}

/// The node's phandle (`phandle`, or the older `linux,phandle`).
fn phandle(node: FdtNode<'_, '_>) -> Option<u32> {
    cell(node, "phandle").or_else(|| cell(node, "linux,phandle"))
}

fn enabled(node: FdtNode<'_, '_>) -> bool {
    match node.property("status") {
        None => true,
        Some(p) => matches!(p.as_str(), Some("okay") | Some("ok")),
    }
}

/// Calls `each` for every `iommus` specifier in the tree that names `smmu` (the SMMU's node), in tree order, and
/// returns how many there were. Specifiers that name other IOMMUs are read past (with their own
/// `#iommu-cells`) and not reported.
///
/// # Errors
/// [`MastersError`]: the SMMU's `#iommu-cells` is not 1 or 2, or an `iommus` property anywhere in the tree is
/// malformed (each error names the node). `each` may have been called for masters before the bad one.
pub fn platform_masters(
    fdt: &Fdt<'_>,
    smmu: FdtNode<'_, '_>,
    mut each: impl FnMut(Master),
) -> Result<usize, MastersError> {
    let cells = match cell(smmu, "#iommu-cells") {
        Some(n @ (1 | 2)) => n,
        other => return Err(MastersError::SmmuCells { cells: other }),
    };
    let target = phandle(smmu);
    let Some(root) = fdt.find_node("/") else {
        return Ok(0);
    };
    let mut path = Path::new();
    let mut found = 0;
    visit(root, &mut path, true, &mut |node, path| {
        let Some(list) = node.property("iommus") else {
            return Ok(());
        };
        let words = list.value;
        if words.len() % 4 != 0 {
            return Err(MastersError::Truncated { path: path.clone() });
        }
        let word = |i: usize| u32::from_be_bytes([words[4 * i], words[4 * i + 1], words[4 * i + 2], words[4 * i + 3]]);
        let n = words.len() / 4;
        let mut i = 0;
        while i < n {
            let ph = word(i);
            let specifier_cells = if Some(ph) == target {
                cells
            } else {
                let iommu = fdt.find_phandle(ph).ok_or_else(|| MastersError::UnknownPhandle {
                    path: path.clone(),
                    phandle: ph,
                })?;
                cell(iommu, "#iommu-cells").ok_or_else(|| MastersError::NoIommuCells {
                    path: path.clone(),
                    phandle: ph,
                })?
            } as usize;
            if i + 1 + specifier_cells > n {
                return Err(MastersError::Truncated { path: path.clone() });
            }
            if Some(ph) == target {
                each(Master {
                    path: path.clone(),
                    stream_id: word(i + 1),
                    mask: if cells == 2 { word(i + 2) } else { 0 },
                    enabled: enabled(node),
                });
                found += 1;
            }
            i += 1 + specifier_cells;
        }
        Ok(())
    })?;
    Ok(found)
}

/// Depth-first over `node` and its children with each node's path in `path`.
fn visit<'b, 'a>(
    node: FdtNode<'b, 'a>,
    path: &mut Path,
    is_root: bool,
    f: &mut dyn FnMut(FdtNode<'b, 'a>, &Path) -> Result<(), MastersError>,
) -> Result<(), MastersError> {
    let parent_len = path.len();
    if is_root {
        path.push('/').map_err(|_| MastersError::PathTooLong)?;
    } else {
        if parent_len > 1 {
            path.push('/').map_err(|_| MastersError::PathTooLong)?;
        }
        path.push_str(node.name).map_err(|_| MastersError::PathTooLong)?;
    }
    f(node, path)?;
    for child in node.children() {
        visit(child, path, false, f)?;
    }
    path.truncate(parent_len);
    Ok(())
}
