//! What a board tells the driver about its SMMU: where it is, its interrupts, and how requesters map to streams.
//!
//! The driver knows no board. A board fills these from its device tree (`arm,smmu-v3` node, `iommu-map` of its
//! PCIe host) or, where the tree is silent, from its own constants.

use core::fmt;

/// The SMMU's interrupt lines: GIC INTIDs (SPIs are 32 and up), `None` where the board wires none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmmuInterrupts {
    /// Event queue not empty.
    pub eventq: Option<u32>,
    /// PRI queue not empty.
    pub priq: Option<u32>,
    /// CMD_SYNC completion.
    pub cmdq_sync: Option<u32>,
    /// Global error.
    pub gerror: Option<u32>,
    /// The lines are edge-triggered (otherwise level-sensitive).
    pub edge_triggered: bool,
}

/// One SMMUv3 instance as the board sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmmuDescription {
    /// Physical base of the register space (page 0; page 1 follows at +64 KiB).
    pub base: u64,
    /// Size of the register space in bytes (at least 128 KiB).
    pub size: u64,
    /// Interrupt lines.
    pub interrupts: SmmuInterrupts,
    /// The board declares the SMMU's table walks coherent with the CPU caches (DT `dma-coherent`).
    pub dma_coherent: bool,
}

/// One range of an `iommu-map`: requester IDs `rid_base..rid_base+length` use StreamIDs from `sid_base` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IommuMapEntry {
    /// First requester ID (PCI bus/device/function) of the range.
    pub rid_base: u32,
    /// StreamID of `rid_base`.
    pub sid_base: u32,
    /// Number of requester IDs in the range.
    pub length: u32,
}

/// Error when an `iommu-map` has more ranges than [`IommuMap`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IommuMapFull;

impl fmt::Display for IommuMapFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "iommu-map has more than {} ranges", IommuMap::CAPACITY)
    }
}

/// The requester-ID to StreamID translation of a PCIe host bridge (DT `iommu-map`, PCI IORT ID mappings).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IommuMap {
    entries: heapless::Vec<IommuMapEntry, { IommuMap::CAPACITY }>,
}

impl IommuMap {
    /// How many ranges a map can hold.
    pub const CAPACITY: usize = 8;

    /// An empty map: no requester has a stream.
    pub const fn new() -> Self {
        IommuMap {
            entries: heapless::Vec::new(),
        }
    }

    /// Adds a range. Returns [`IommuMapFull`] (and changes nothing) when [`Self::CAPACITY`] ranges are there.
    pub fn push(&mut self, entry: IommuMapEntry) -> Result<(), IommuMapFull> {
        self.entries.push(entry).map_err(|_| IommuMapFull)
    }

    /// The ranges, in the order they were added.
    pub fn entries(&self) -> &[IommuMapEntry] {
        &self.entries
    }

    /// The StreamID of a requester ID, or `None` when no range covers it (such a requester's DMA never reaches
    /// the SMMU through this map, and a driver must not assume a stream for it).
    pub fn stream_id(&self, rid: u32) -> Option<u32> {
        self.entries.iter().find_map(|e| {
            let offset = rid.checked_sub(e.rid_base)?;
            (offset < e.length).then(|| e.sid_base.wrapping_add(offset))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_follow_the_ranges() {
        let mut map = IommuMap::new();
        map.push(IommuMapEntry {
            rid_base: 0,
            sid_base: 0,
            length: 0x100,
        })
        .unwrap();
        map.push(IommuMapEntry {
            rid_base: 0x200,
            sid_base: 0x1000,
            length: 0x10,
        })
        .unwrap();
        assert_eq!(map.stream_id(0x10), Some(0x10));
        assert_eq!(map.stream_id(0xff), Some(0xff));
        assert_eq!(map.stream_id(0x100), None);
        assert_eq!(map.stream_id(0x205), Some(0x1005));
        assert_eq!(map.stream_id(0x210), None);
    }

    #[test]
    fn a_full_map_refuses_and_keeps_its_ranges() {
        let mut map = IommuMap::new();
        for i in 0..IommuMap::CAPACITY as u32 {
            map.push(IommuMapEntry {
                rid_base: i * 16,
                sid_base: i,
                length: 16,
            })
            .unwrap();
        }
        let before = map.clone();
        assert_eq!(
            map.push(IommuMapEntry {
                rid_base: 0x1000,
                sid_base: 0,
                length: 1
            }),
            Err(IommuMapFull)
        );
        assert_eq!(map, before);
    }
}
