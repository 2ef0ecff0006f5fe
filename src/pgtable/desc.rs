//! VMSAv8-64 translation table descriptors for the SMMU's stage-1 (CD) and stage-2 (STE) tables: pure encoders
//! and decoders. Field positions follow the Arm ARM's "VMSAv8-64 translation table format descriptors" (the SMMU
//! walks the same format; IHI 0070 "Translation tables and TTD").

use bitflags::bitflags;

bitflags! {
    /// What a mapping allows.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Prot: u8 {
        /// Reads (and, for stage 1, any access: stage 1 cannot express write-only).
        const READ = 1 << 0;
        /// Writes.
        const WRITE = 1 << 1;
        /// Instruction fetches.
        const EXEC = 1 << 2;
        /// Normal inner and outer write-back cacheable memory (inner shareable). Without it and without
        /// [`Prot::MMIO`], Normal non-cacheable memory.
        const CACHEABLE = 1 << 3;
        /// Stage 1 of the NS-EL1 regime only ([`Stage::One`]): only privileged transactions may use the mapping.
        const PRIVILEGED = 1 << 4;
        /// Device-nGnRE memory, for MMIO (registers, doorbells). Never together with [`Prot::CACHEABLE`].
        const MMIO = 1 << 5;
    }
}

/// The memory type a protection selects (Linux's `arm_lpae_prot_to_pte` makes the same three-way choice).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryType {
    /// Device-nGnRE ([`Prot::MMIO`]).
    Device,
    /// Normal inner/outer write-back ([`Prot::CACHEABLE`]).
    NormalCacheable,
    /// Normal inner/outer non-cacheable (neither flag).
    NormalNonCacheable,
}

impl MemoryType {
    /// The memory type of `prot`, or `None` when it asks for both [`Prot::MMIO`] and [`Prot::CACHEABLE`].
    pub fn of(prot: Prot) -> Option<Self> {
        match (prot.contains(Prot::MMIO), prot.contains(Prot::CACHEABLE)) {
            (true, true) => None,
            (true, false) => Some(MemoryType::Device),
            (false, true) => Some(MemoryType::NormalCacheable),
            (false, false) => Some(MemoryType::NormalNonCacheable),
        }
    }

    /// The flags of [`Prot`] that select this type.
    pub fn prot(self) -> Prot {
        match self {
            MemoryType::Device => Prot::MMIO,
            MemoryType::NormalCacheable => Prot::CACHEABLE,
            MemoryType::NormalNonCacheable => Prot::empty(),
        }
    }
}

/// Which translation stage (and, for stage 1, which translation regime) a table serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Stage 1 of the NS-EL1 regime (STE.STRW = NS-EL1, the default): VA → IPA (or PA), attributes through the
    /// CD's MAIR, PXN (bit 53) and UXN (bit 54), privileged and unprivileged access, nG set (ASID-tagged).
    One,
    /// Stage 1 of the EL2 regime without E2H (STE.STRW = EL2): as [`Stage::One`], but with one exception level:
    /// bit 53 (PXN) is RES0 and bit 54 is XN, AP\[1\] is RES1 (so [`Prot::PRIVILEGED`] cannot be expressed), and
    /// nG is left clear (the regime has no ASIDs).
    OneEl2,
    /// Stage 2: IPA → PA, attributes in the descriptor (MemAttr).
    Two,
}

/// Bit 0: the descriptor is valid.
pub const VALID: u64 = 1 << 0;
/// Bit 1: table (levels 0-2) or page (level 3) rather than block.
pub const TABLE_OR_PAGE: u64 = 1 << 1;
/// Stage 1 AttrIndx, bits \[4:2\].
pub const S1_ATTR_INDEX: u64 = 0b111 << 2;
/// Stage 1 AP\[1\], bit 6: unprivileged (EL0) access allowed.
pub const S1_AP_UNPRIVILEGED: u64 = 1 << 6;
/// Stage 1 AP\[2\], bit 7: read-only.
pub const S1_AP_READ_ONLY: u64 = 1 << 7;
/// Stage 2 MemAttr, bits \[5:2\].
pub const S2_MEMATTR: u64 = 0b1111 << 2;
/// Stage 2 S2AP\[0\], bit 6: reads allowed.
pub const S2_AP_READ: u64 = 1 << 6;
/// Stage 2 S2AP\[1\], bit 7: writes allowed.
pub const S2_AP_WRITE: u64 = 1 << 7;
/// SH, bits \[9:8\]: shareability ([`SH_INNER`] or [`SH_OUTER`]).
pub const SH: u64 = 0b11 << 8;
/// AF, bit 10: access flag.
pub const AF: u64 = 1 << 10;
/// Stage 1 nG, bit 11: not global (tagged with the ASID).
pub const S1_NOT_GLOBAL: u64 = 1 << 11;
/// Contiguous hint, bit 52.
pub const CONTIGUOUS: u64 = 1 << 52;
/// Stage 1 PXN, bit 53.
pub const S1_PXN: u64 = 1 << 53;
/// Stage 1 UXN / XN, bit 54.
pub const S1_UXN: u64 = 1 << 54;
/// Stage 2 XN\[1:0\], bits \[54:53\] (0b10: never executable).
pub const S2_XN: u64 = 0b11 << 53;
/// Output address bits \[47:12\] (the granule's low bits are zero in any aligned output address).
pub const OUTPUT_ADDRESS: u64 = ((1 << 48) - 1) & !0xfff;

/// Stage 1 (EL2 regime) XN, bit 54.
pub const S1_EL2_XN: u64 = 1 << 54;
/// SH value of inner shareable (Normal cacheable memory).
pub const SH_INNER: u64 = 0b11 << 8;
/// SH value of outer shareable (Device and Normal non-cacheable memory, which the architecture treats as outer
/// shareable whatever SH says; written so that the descriptor says what applies).
pub const SH_OUTER: u64 = 0b10 << 8;

/// MAIR attribute index of Device-nGnRE memory in the MAIR this driver puts in its CDs.
pub const MAIR_INDEX_DEVICE: u64 = 0;
/// MAIR attribute index of Normal write-back read/write-allocate memory.
pub const MAIR_INDEX_NORMAL: u64 = 1;
/// MAIR attribute index of Normal non-cacheable memory.
pub const MAIR_INDEX_NON_CACHEABLE: u64 = 2;
/// The MAIR value for stage-1 CDs: index 0 Device-nGnRE (0x04), 1 Normal WB RW-allocate (0xff), 2 Normal NC (0x44).
pub const MAIR: u64 = 0x04 | 0xff << 8 | 0x44 << 16;
/// Stage 2 MemAttr of Device-nGnRE.
pub const S2_MEMATTR_DEVICE: u64 = 0b0001;
/// Stage 2 MemAttr of Normal inner/outer write-back.
pub const S2_MEMATTR_NORMAL: u64 = 0b1111;
/// Stage 2 MemAttr of Normal inner/outer non-cacheable.
pub const S2_MEMATTR_NON_CACHEABLE: u64 = 0b0101;

/// A leaf (page or block) descriptor mapping `output` with `prot`. `page` selects the level-3 encoding. The caller
/// checks alignment, the output size and that `prot` is expressible (one [`MemoryType`]; stage 1 with READ; no
/// PRIVILEGED at stage 2 or in the EL2 regime): an inexpressible `prot` encodes Device memory. Bits outside
/// [`OUTPUT_ADDRESS`] are dropped.
pub fn leaf(stage: Stage, output: u64, prot: Prot, page: bool) -> u64 {
    let mut d = VALID | AF | (output & OUTPUT_ADDRESS);
    if page {
        d |= TABLE_OR_PAGE;
    }
    let memory = MemoryType::of(prot).unwrap_or(MemoryType::Device);
    d |= if memory == MemoryType::NormalCacheable {
        SH_INNER
    } else {
        SH_OUTER
    };
    match stage {
        Stage::One | Stage::OneEl2 => {
            d |= match memory {
                MemoryType::Device => MAIR_INDEX_DEVICE,
                MemoryType::NormalCacheable => MAIR_INDEX_NORMAL,
                MemoryType::NormalNonCacheable => MAIR_INDEX_NON_CACHEABLE,
            } << 2;
            if !prot.contains(Prot::WRITE) {
                d |= S1_AP_READ_ONLY;
            }
            if stage == Stage::OneEl2 {
                // AP[1] is RES1, PXN RES0, bit 54 is XN; no ASIDs, so nG stays clear.
                d |= S1_AP_UNPRIVILEGED;
                if !prot.contains(Prot::EXEC) {
                    d |= S1_EL2_XN;
                }
                return d;
            }
            d |= S1_NOT_GLOBAL;
            if !prot.contains(Prot::PRIVILEGED) {
                d |= S1_AP_UNPRIVILEGED;
            }
            d |= match (prot.contains(Prot::EXEC), prot.contains(Prot::PRIVILEGED)) {
                (false, _) => S1_PXN | S1_UXN,
                (true, true) => S1_UXN,
                (true, false) => S1_PXN,
            };
        }
        Stage::Two => {
            d |= match memory {
                MemoryType::Device => S2_MEMATTR_DEVICE,
                MemoryType::NormalCacheable => S2_MEMATTR_NORMAL,
                MemoryType::NormalNonCacheable => S2_MEMATTR_NON_CACHEABLE,
            } << 2;
            if prot.contains(Prot::READ) {
                d |= S2_AP_READ;
            }
            if prot.contains(Prot::WRITE) {
                d |= S2_AP_WRITE;
            }
            if !prot.contains(Prot::EXEC) {
                d |= 0b10 << 53;
            }
        }
    }
    d
}

/// Whether `prot` is a protection [`leaf`] encodes faithfully for `stage` (what a page table accepts in `map` and
/// `protect`): one memory type; at stage 1 with [`Prot::READ`]; never [`Prot::PRIVILEGED`] at stage 2 or in the
/// EL2 regime; at stage 2 with [`Prot::READ`] or [`Prot::WRITE`].
pub fn expressible(stage: Stage, prot: Prot) -> bool {
    MemoryType::of(prot).is_some()
        && match stage {
            Stage::One => prot.contains(Prot::READ),
            Stage::OneEl2 => prot.contains(Prot::READ) && !prot.contains(Prot::PRIVILEGED),
            Stage::Two => prot.intersects(Prot::READ | Prot::WRITE) && !prot.contains(Prot::PRIVILEGED),
        }
}

/// Whether `d` is a leaf (a page when `page`, else a block) exactly as this driver writes one for `stage`: equal,
/// bit for bit, to [`leaf`] of its own output address (bits \[47:12\]) and of the protection it grants ([`prot`]),
/// that protection [`expressible`]. Every attribute bit is covered: AttrIndx / MemAttr, AP / S2AP, SH, AF, nG (set
/// in every NS-EL1 stage-1 leaf, clear in the EL2 regime's and at stage 2), PXN/UXN/XN, the contiguous hint,
/// output bits \[51:48\], the software and PBHA bits \[63:55\] and the NS bit, which this driver never sets. The
/// output address's alignment to the granule or block is not judged here.
pub fn is_driver_leaf(stage: Stage, d: u64, page: bool) -> bool {
    let p = prot(stage, d);
    expressible(stage, p) && leaf(stage, d & OUTPUT_ADDRESS, p, page) == d
}

/// The memory type a leaf descriptor of `stage` selects (as [`leaf`] encodes it).
pub fn memory_type(stage: Stage, d: u64) -> MemoryType {
    match stage {
        Stage::One | Stage::OneEl2 => match (d & S1_ATTR_INDEX) >> 2 {
            MAIR_INDEX_NORMAL => MemoryType::NormalCacheable,
            MAIR_INDEX_NON_CACHEABLE => MemoryType::NormalNonCacheable,
            _ => MemoryType::Device,
        },
        Stage::Two => match (d & S2_MEMATTR) >> 2 {
            S2_MEMATTR_NORMAL => MemoryType::NormalCacheable,
            S2_MEMATTR_NON_CACHEABLE => MemoryType::NormalNonCacheable,
            _ => MemoryType::Device,
        },
    }
}

/// Software bit 56 of a table descriptor (bits \[58:52\] of table descriptors are IGNORED by the table walk at
/// both stages, VMSAv8-64; bits \[51:48\] are RES0, kept for output address bits, so this driver leaves them 0): set on the descriptor of a last-level table whose every entry is a valid page, so that
/// an unmap removing the whole table counts its pages without reading them. Always equal to "the descriptor's
/// [`count`] is the table's number of entries" for a last-level table, and never set on other tables.
pub const SW_TABLE_FULL: u64 = 1 << 56;

/// Software bit 57 of a table descriptor: the table it names emptied on the single-page unmap path and is recorded
/// as a candidate for the next trim (`IoPageTable::trim`). Set only while the table's position is in the page
/// table's candidate list.
pub const SW_TRIM_CANDIDATE: u64 = 1 << 57;
/// Software bit 58 of a table descriptor (the last of the bits \[58:52\] the walk ignores): the table it names,
/// at a level above the last, holds no table descriptor (only leaves and invalid entries), so that a range unmap
/// removing all of its entries need not read them to rule one out. A promise, not a summary: set only where the
/// driver knows it (a table it wrote with leaves only; [`IoPageTable::recount`](super::IoPageTable::recount)
/// sets it exactly), cleared by every path that links a table into that table, and never set on a last-level
/// table's descriptor. Clear says nothing.
pub const SW_NO_TABLES: u64 = 1 << 58;
/// Low part of the live-entry count of the table a table descriptor names: bits \[11:2\], IGNORED by the walk in a
/// table descriptor (VMSAv8-64, without FEAT_LPA2's DS = 1 and without FEAT_HAFT, neither of which this driver
/// enables).
pub const SW_COUNT_LOW: u64 = 0x3ff << 2;
/// High part of the count: bits \[55:52\], IGNORED in a table descriptor (bit 51 is RES0 there: an SMMU may take it
/// for an output address bit).
pub const SW_COUNT_HIGH: u64 = 0xf << 52;
/// The largest count the descriptor holds (14 bits: a 64 KiB granule's 8192 entries fit).
pub const SW_COUNT_MAX: usize = (1 << 14) - 1;

/// The live-entry count a table descriptor carries: how many valid entries the table it names holds.
pub fn count(d: u64) -> usize {
    (((d & SW_COUNT_LOW) >> 2) | ((d & SW_COUNT_HIGH) >> (52 - 10))) as usize
}

/// `d` with its count replaced by `n` (at most [`SW_COUNT_MAX`]; higher bits are dropped).
pub fn with_count(d: u64, n: usize) -> u64 {
    let n = n as u64;
    (d & !(SW_COUNT_LOW | SW_COUNT_HIGH)) | ((n << 2) & SW_COUNT_LOW) | ((n << (52 - 10)) & SW_COUNT_HIGH)
}

/// A table descriptor pointing to the next-level table at `table`.
pub fn table(table: u64) -> u64 {
    VALID | TABLE_OR_PAGE | (table & OUTPUT_ADDRESS)
}

/// Whether a descriptor is valid.
pub fn is_valid(d: u64) -> bool {
    d & VALID != 0
}

/// Whether a valid descriptor at `level` points to a table (levels 0-2 with bit 1 set).
pub fn is_table(d: u64, level: u8) -> bool {
    is_valid(d) && level < 3 && d & TABLE_OR_PAGE != 0
}

/// The output (or next-table) address of a descriptor.
pub fn address(d: u64) -> u64 {
    d & OUTPUT_ADDRESS
}

/// The protection a leaf grants (the inverse of [`leaf`] for the encodings it produces).
pub fn prot(stage: Stage, d: u64) -> Prot {
    let mut p = memory_type(stage, d).prot();
    match stage {
        Stage::One | Stage::OneEl2 => {
            p |= Prot::READ;
            if d & S1_AP_READ_ONLY == 0 {
                p |= Prot::WRITE;
            }
            if stage == Stage::OneEl2 {
                if d & S1_EL2_XN == 0 {
                    p |= Prot::EXEC;
                }
                return p;
            }
            if d & S1_AP_UNPRIVILEGED == 0 {
                p |= Prot::PRIVILEGED;
            }
            let privileged = d & S1_AP_UNPRIVILEGED == 0;
            if (privileged && d & S1_PXN == 0) || (!privileged && d & S1_UXN == 0) {
                p |= Prot::EXEC;
            }
        }
        Stage::Two => {
            if d & S2_AP_READ != 0 {
                p |= Prot::READ;
            }
            if d & S2_AP_WRITE != 0 {
                p |= Prot::WRITE;
            }
            if d & S2_XN == 0 {
                p |= Prot::EXEC;
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage1_page_bits() {
        // Normal WB, read/write, no exec, unprivileged: V|page, AttrIndx 1, AP[1]=1 (EL0), SH 11, AF, nG, PXN|UXN.
        let d = leaf(
            Stage::One,
            0x4123_4000,
            Prot::READ | Prot::WRITE | Prot::CACHEABLE,
            true,
        );
        assert_eq!(
            d,
            0b11 | 1 << 2 | 1 << 6 | 0b11 << 8 | 1 << 10 | 1 << 11 | 0x4123_4000 | 1 << 53 | 1 << 54
        );
        // Read-only device, privileged, block: AttrIndx 0, AP[2]=1, AP[1]=0, SH 10 (outer).
        let d = leaf(
            Stage::One,
            0x4000_0000,
            Prot::READ | Prot::PRIVILEGED | Prot::MMIO,
            false,
        );
        assert_eq!(
            d,
            0b01 | 1 << 7 | 0b10 << 8 | 1 << 10 | 1 << 11 | 0x4000_0000 | 1 << 53 | 1 << 54
        );
        // Privileged executable: UXN only.
        let d = leaf(
            Stage::One,
            0,
            Prot::READ | Prot::EXEC | Prot::PRIVILEGED | Prot::CACHEABLE,
            true,
        );
        assert_eq!(d & (S1_PXN | S1_UXN), S1_UXN);
    }

    #[test]
    fn stage2_page_bits() {
        // MemAttr 1111, S2AP 11, SH 11, AF, XN 10.
        let d = leaf(
            Stage::Two,
            0x8000_1000,
            Prot::READ | Prot::WRITE | Prot::CACHEABLE,
            true,
        );
        assert_eq!(
            d,
            0b11 | 0b1111 << 2 | 0b11 << 6 | 0b11 << 8 | 1 << 10 | 0x8000_1000 | 0b10 << 53
        );
        // Write-only device block, executable: MemAttr 0001, S2AP 10, SH 10, XN 00.
        let d = leaf(Stage::Two, 0x20_0000, Prot::WRITE | Prot::EXEC | Prot::MMIO, false);
        assert_eq!(d, 0b01 | 0b0001 << 2 | 0b10 << 6 | 0b10 << 8 | 1 << 10 | 0x20_0000);
    }

    #[test]
    fn table_descriptor_and_decoders() {
        let t = table(0x4567_8000);
        assert_eq!(t, 0x4567_8000 | 0b11);
        assert!(is_table(t, 2) && !is_table(t, 3) && is_valid(t));
        assert_eq!(address(t), 0x4567_8000);
        assert!(!is_valid(0));
    }

    #[test]
    fn without_cacheable_memory_is_normal_non_cacheable_and_mmio_is_device() {
        // Stage 1: AttrIndx 2 (MAIR byte 0x44, Normal inner/outer NC), SH 10; MMIO: AttrIndx 0 (0x04, nGnRE).
        let nc = leaf(Stage::One, 0x1000, Prot::READ | Prot::WRITE, true);
        assert_eq!((nc >> 2) & 0b111, 2);
        assert_eq!((MAIR >> (8 * ((nc >> 2) & 0b111))) & 0xff, 0x44);
        assert_eq!((nc >> 8) & 0b11, 0b10);
        let mmio = leaf(Stage::One, 0x1000, Prot::READ | Prot::WRITE | Prot::MMIO, true);
        assert_eq!((MAIR >> (8 * ((mmio >> 2) & 0b111))) & 0xff, 0x04);
        // Stage 2 MemAttr: 0b0101 Normal NC, 0b0001 Device-nGnRE, 0b1111 Normal WB (SH 11).
        let nc = leaf(Stage::Two, 0x1000, Prot::READ | Prot::WRITE, true);
        assert_eq!(((nc >> 2) & 0b1111, (nc >> 8) & 0b11), (0b0101, 0b10));
        let mmio = leaf(Stage::Two, 0x1000, Prot::READ | Prot::MMIO, true);
        assert_eq!((mmio >> 2) & 0b1111, 0b0001);
        let wb = leaf(Stage::Two, 0x1000, Prot::READ | Prot::CACHEABLE, true);
        assert_eq!(((wb >> 2) & 0b1111, (wb >> 8) & 0b11), (0b1111, 0b11));
        assert_eq!(MemoryType::of(Prot::MMIO | Prot::CACHEABLE), None);
    }

    #[test]
    fn el2_stage1_leaves_keep_pxn_clear_and_use_bit_54_as_xn() {
        for exec in [false, true] {
            let p = Prot::READ | Prot::WRITE | Prot::CACHEABLE | if exec { Prot::EXEC } else { Prot::empty() };
            let d = leaf(Stage::OneEl2, 0x8000, p, true);
            assert_eq!(d & (1 << 53), 0, "PXN is RES0 in the EL2 regime");
            assert_eq!(d & (1 << 54) != 0, !exec, "bit 54 is XN");
            assert_ne!(d & (1 << 6), 0, "AP[1] is RES1");
            assert_eq!(d & (1 << 11), 0, "no ASID: nG clear");
            assert_eq!(prot(Stage::OneEl2, d), p);
        }
    }

    #[test]
    fn prot_round_trips() {
        for bits in 0..64u8 {
            let p = Prot::from_bits_truncate(bits);
            if MemoryType::of(p).is_none() {
                continue;
            }
            let s2 = p - Prot::PRIVILEGED;
            assert_eq!(prot(Stage::Two, leaf(Stage::Two, 0, s2, true)), s2, "{s2:?}");
            if p.contains(Prot::READ) {
                assert_eq!(prot(Stage::One, leaf(Stage::One, 0, p, true)), p, "{p:?}");
                assert_eq!(prot(Stage::OneEl2, leaf(Stage::OneEl2, 0, s2, true)), s2, "{s2:?}");
            }
        }
    }

    #[test]
    fn counts_live_in_ignored_bits_only() {
        let t = table(0x4567_8000) | SW_TABLE_FULL;
        for n in [0, 1, 511, 512, 1023, 1024, 2048, 8192, SW_COUNT_MAX] {
            let d = with_count(t, n);
            assert_eq!(count(d), n);
            assert_eq!(d & !(SW_COUNT_LOW | SW_COUNT_HIGH), t, "only the count's bits change");
            assert_eq!(address(d), 0x4567_8000);
            assert!(is_table(d, 2));
        }
        // Bits [11:2] and [55:52] of a table descriptor, clear of the full and candidate bits and of the RES0
        // bits [51:48].
        assert_eq!(SW_COUNT_LOW | SW_COUNT_HIGH, 0x00f0_0000_0000_0ffc);
        assert_eq!(
            (SW_COUNT_LOW | SW_COUNT_HIGH) & (SW_TABLE_FULL | SW_TRIM_CANDIDATE | SW_NO_TABLES | OUTPUT_ADDRESS),
            0
        );
        // The software bits: 56, 57 and 58, each its own, all inside the ignored bits [58:52].
        assert_eq!(SW_TABLE_FULL | SW_TRIM_CANDIDATE | SW_NO_TABLES, 0b111 << 56);
        let t = with_count(table(0x4567_8000) | SW_NO_TABLES, 5);
        assert_eq!((count(t), t & SW_NO_TABLES != 0, address(t)), (5, true, 0x4567_8000));
    }

    #[test]
    fn output_address_fields_hold_oa_47_to_the_granule_and_nothing_below() {
        // With a 48-bit OA the output address is bits [47:12] (4 KiB), [47:14] (16 KiB), [47:16] (64 KiB) of
        // page, block and table descriptors; the 64 KiB granule's bits [15:12] would be OA[51:48] only with a
        // 52-bit OA (FEAT_LPA), which this driver never configures (`Geometry::of` refuses outputs above 48
        // bits), so they stay clear, as do bits [51:48].
        let top = 0xffff_ffff_0000; // the highest 64 KiB-aligned 48-bit address
        for stage in [Stage::One, Stage::OneEl2, Stage::Two] {
            let d = leaf(stage, top, Prot::READ | Prot::CACHEABLE, true);
            assert_eq!(d & 0x000f_ffff_ffff_f000, 0x0000_ffff_ffff_0000, "{stage:?}");
        }
        assert_eq!(table(top) & 0x000f_ffff_ffff_f000, 0x0000_ffff_ffff_0000);
        // A count, even the largest, stays out of the address bits, bits [51:48] (RES0 in a table descriptor:
        // Armv8.0 lists only [58:52] as IGNORED) and the 64 KiB granule's bits [15:12].
        let t = with_count(table(top), SW_COUNT_MAX);
        assert_eq!(t & 0x000f_ffff_ffff_f000, 0x0000_ffff_ffff_0000);
        assert_eq!(t & 0xf000, 0);
        // Bits the driver's leaves never set: bits [51:48], the software bits [58:55], PBHA [62:59], bit 63 and
        // (stage 1) NS, bit 5 (stage 2's bit 5 is MemAttr[3]).
        for stage in [Stage::One, Stage::OneEl2, Stage::Two] {
            let ns = if stage == Stage::Two { 0 } else { 1 << 5 };
            for bits in 0..64u8 {
                let d = leaf(stage, 0, Prot::from_bits_truncate(bits) | Prot::READ, bits & 1 == 0);
                assert_eq!(d & (ns | 0xf << 48 | 0x1ff << 55), 0, "{stage:?} {bits:#x}");
            }
        }
    }

    #[test]
    fn every_leaf_the_driver_writes_is_a_driver_leaf_and_no_single_bit_change_of_one_is() {
        for stage in [Stage::One, Stage::OneEl2, Stage::Two] {
            for bits in 0..64u8 {
                let p = Prot::from_bits_truncate(bits);
                if !expressible(stage, p) {
                    continue;
                }
                for page in [false, true] {
                    let d = leaf(stage, 0x8000_0000, p, page);
                    assert!(is_driver_leaf(stage, d, page), "{stage:?} {p:?}");
                    assert!(
                        !is_driver_leaf(stage, d, !page),
                        "{stage:?} {p:?}: the other level's encoding"
                    );
                    for bit in (0..64).filter(|b| !(12..48).contains(b)) {
                        let flipped = d ^ (1 << bit);
                        // Flipping an attribute bit either leaves the encoding of another expressible protection
                        // (a different, equally valid leaf) or one this driver never writes.
                        if is_driver_leaf(stage, flipped, page) {
                            assert_ne!(prot(stage, flipped), p, "{stage:?} {p:?} bit {bit}");
                        }
                    }
                }
            }
        }
        // What the review found: a global (nG = 0) NS-EL1 stage-1 leaf; and the bits no protection explains.
        let d = leaf(Stage::One, 0x1000, Prot::READ | Prot::WRITE | Prot::CACHEABLE, true);
        assert!(!is_driver_leaf(Stage::One, d & !S1_NOT_GLOBAL, true));
        for extra in [AF, 1 << 5, 1 << 55, 0xf << 59, 1 << 63, CONTIGUOUS, 1 << 48] {
            let without = if d & extra != 0 { d & !extra } else { d | extra };
            assert!(!is_driver_leaf(Stage::One, without, true), "{extra:#x}");
        }
        // The EL2 regime's leaves are global by design, stage 2 has no nG.
        let el2 = leaf(Stage::OneEl2, 0x1000, Prot::READ, true);
        assert!(is_driver_leaf(Stage::OneEl2, el2, true));
        assert!(!is_driver_leaf(Stage::OneEl2, el2 | S1_NOT_GLOBAL, true));
        let s2 = leaf(Stage::Two, 0x1000, Prot::READ, true);
        assert!(!is_driver_leaf(Stage::Two, s2 | 1 << 11, true));
        // Stage 2 with neither read nor write: an encoding `leaf` produces but `map` refuses.
        assert!(!is_driver_leaf(Stage::Two, s2 & !S2_AP_READ, true));
    }

    #[test]
    fn mair_matches_the_indices() {
        assert_eq!((MAIR >> (8 * MAIR_INDEX_DEVICE)) & 0xff, 0x04);
        assert_eq!((MAIR >> (8 * MAIR_INDEX_NORMAL)) & 0xff, 0xff);
        assert_eq!((MAIR >> (8 * MAIR_INDEX_NON_CACHEABLE)) & 0xff, 0x44);
    }
}
