//! An independent decoder of the raw table memory, written from the architecture's descriptor formats (not from `desc`).

use super::*;

/// Every descriptor of every table reachable from the root, in walk order (table address, index, word).
pub(super) fn raw_words<A: FrameAllocator>(t: &IoPageTable<A>) -> Vec<(u64, usize, u64)> {
    fn go<A: FrameAllocator>(t: &IoPageTable<A>, level: u8, phys: u64, out: &mut Vec<(u64, usize, u64)>) {
        let entries = t.table_entries(level, phys).unwrap();
        for (i, e) in entries.iter().enumerate() {
            let d = e.load(Ordering::Relaxed);
            out.push((phys, i, d));
            if level < 3 && d & 3 == 3 {
                go(t, level + 1, d & 0x0000_ffff_ffff_f000, out);
            }
        }
    }
    let mut out = Vec::new();
    go(t, t.geometry().start_level, t.root().0, &mut out);
    out
}

/// One leaf found in raw table memory: the output of the page, where its leaf starts, the leaf's size, and the
/// raw descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Leaf {
    pub(super) out: u64,
    pub(super) base: u64,
    pub(super) size: u64,
    pub(super) raw: u64,
}

/// Decodes raw table memory per the VMSAv8-64 format, independently of `desc`, walking from `root` at the start
/// level and with the root size that `g` gives: every 4 KiB page mapped, with its leaf. Asserts the invariants
/// the SMMU relies on: a table marked full holds only pages, AF is set, level-3 descriptors are pages; and the
/// software state kept in table descriptors: each one's count (bits \[11:2\] low, \[55:52\] high) is the number
/// of valid entries of the table it names, the full bit (56) is set exactly when a last-level table's count is
/// its size, and a linked table is empty only if it is a last-level table marked as a trim candidate (bit 57)
/// with every ancestor's descriptor marked too; a table whose descriptor has the "no tables" bit (58) is above
/// the last level and holds no table descriptor.
pub(super) fn leaves(frames: &HeapFrames, root: u64, g: &Geometry) -> BTreeMap<u64, Leaf> {
    let mut out = BTreeMap::new();
    go(frames, root, g.start_level, 0, g, &mut out, None, true);
    out
}

/// Linked tables that map nothing (always last-level tables waiting for a trim, per [`leaves`]).
pub(super) fn linked_empty_tables(frames: &HeapFrames, root: u64, g: &Geometry) -> usize {
    fn walk(frames: &HeapFrames, table: u64, level: u8, g: &Geometry) -> usize {
        let entries = if level == g.start_level {
            g.root_entries
        } else {
            1 << g.level_bits
        };
        let words = frames.virt(table) as *const u64;
        // SAFETY: a live table of `entries` descriptors.
        let all: Vec<u64> = (0..entries).map(|i| unsafe { words.add(i).read() }).collect();
        let mut n = usize::from(level != g.start_level && all.iter().all(|d| d & 1 == 0));
        for d in all {
            if level < 3 && d & 3 == 3 {
                n += walk(frames, d & 0x0000_ffff_ffff_f000, level + 1, g);
            }
        }
        n
    }
    walk(frames, root, g.start_level, g)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn go(
    frames: &HeapFrames,
    table: u64,
    level: u8,
    base: u64,
    g: &Geometry,
    out: &mut BTreeMap<u64, Leaf>,
    link: Option<u64>,
    ancestors_marked: bool,
) {
    {
        let entries = if level == g.start_level {
            g.root_entries
        } else {
            1 << g.level_bits
        };
        let shift = g.granule_bits as u64 + g.level_bits as u64 * (3 - level as u64);
        let words = frames.virt(table) as *const u64;
        if let Some(link) = link {
            // SAFETY: a live table of `entries` descriptors.
            let valid = (0..entries)
                .filter(|&i| unsafe { words.add(i).read() } & 1 != 0)
                .count() as u64;
            assert_link_state(link, level, valid, entries, ancestors_marked, table);
            if link & (1 << 58) != 0 {
                // The software "no tables" bit promises a table above the last level with no table descriptor.
                assert!(level < 3, "a last-level table at {table:#x} marked as holding no table");
                // SAFETY: a live table of `entries` descriptors.
                let tables = (0..entries)
                    .filter(|&i| unsafe { words.add(i).read() } & 3 == 3)
                    .count();
                assert_eq!(
                    tables, 0,
                    "the level-{level} table at {table:#x} is marked as holding no table"
                );
            }
        }
        for i in 0..entries {
            // SAFETY: a live table of `entries` descriptors.
            let d = unsafe { words.add(i).read() };
            if d & 1 == 0 {
                continue;
            }
            let va = base + ((i as u64) << shift);
            let oa = d & 0x0000_ffff_ffff_f000;
            if level < 3 && d & 2 != 0 {
                if d & (1 << 56) != 0 {
                    // The software "table full" bit promises a last-level table of valid pages only.
                    assert_eq!(level, 2, "only last-level tables are marked full");
                    let child = frames.virt(oa) as *const u64;
                    for j in 0..1usize << g.level_bits {
                        // SAFETY: a live table of `1 << level_bits` descriptors.
                        let e = unsafe { child.add(j).read() };
                        assert_eq!(e & 3, 3, "entry {j} of a full table is a page");
                    }
                }
                let marked = link.is_none_or(|l| ancestors_marked && l & (1 << 57) != 0);
                go(frames, oa, level + 1, va, g, out, Some(d), marked);
            } else {
                assert!(level == 3 || d & 2 == 0, "level-3 descriptors must be pages");
                assert_ne!(d & (1 << 10), 0, "AF set");
                for p in 0..(1u64 << (shift - 12)) {
                    let leaf = Leaf {
                        out: oa + (p << 12),
                        base: va,
                        size: 1 << shift,
                        raw: d,
                    };
                    out.insert(va + (p << 12), leaf);
                }
            }
        }
    }
}

/// Asserts the software state that `link`, the descriptor naming the level-`level` table at `table` (`valid` of
/// its `entries` entries valid), keeps: its count (bits \[11:2\] low, \[55:52\] high) is `valid`, the full bit
/// (56) is set exactly on a full last-level table, and an empty table is a last-level table marked as a trim
/// candidate (bit 57) whose ancestors are all marked (`marked`).
pub(super) fn assert_link_state(link: u64, level: u8, valid: u64, entries: usize, marked: bool, table: u64) {
    let count = ((link >> 2) & 0x3ff) | (((link >> 52) & 0xf) << 10);
    assert_eq!(count, valid, "the count of the level-{level} table at {table:#x}");
    assert_eq!(
        link & (1 << 56) != 0,
        level == 3 && valid == entries as u64,
        "the full bit of the level-{level} table at {table:#x} ({valid} valid entries)"
    );
    if valid == 0 {
        assert!(
            level == 3 && marked && link & (1 << 57) != 0,
            "a linked level-{level} table at {table:#x} is empty and not waiting for a trim"
        );
    }
}

/// [`leaves`], as page → output page.
pub(super) fn decode(frames: &HeapFrames, root: u64, geometry: &Geometry) -> BTreeMap<u64, u64> {
    leaves(frames, root, geometry)
        .into_iter()
        .map(|(page, leaf)| (page, leaf.out))
        .collect()
}

/// What the architecture says a leaf for `prot` holds, from the descriptor formats (not from `desc`): the memory
/// attribute (stage 1: the MAIR byte its AttrIndx selects; stage 2: MemAttr), SH, the access permission bits
/// \[7:6\], and the execute-never bits \[54:53\].
pub(super) fn expected_attributes(stage: Stage, prot: Prot) -> (u64, u64, u64, u64) {
    let (write, read, exec) = (
        prot.contains(Prot::WRITE),
        prot.contains(Prot::READ),
        prot.contains(Prot::EXEC),
    );
    let sh = if prot.contains(Prot::CACHEABLE) { 0b11 } else { 0b10 };
    match stage {
        // MAIR bytes: 0xff Normal WB RW-allocate, 0x44 Normal NC, 0x04 Device-nGnRE. AP[2:1] = read-only, EL0;
        // unprivileged executable: PXN only.
        Stage::One => {
            let attr = if prot.contains(Prot::MMIO) {
                0x04
            } else if prot.contains(Prot::CACHEABLE) {
                0xff
            } else {
                0x44
            };
            (attr, sh, u64::from(!write) << 1 | 1, if exec { 0b01 } else { 0b11 })
        }
        Stage::OneEl2 => unreachable!(),
        // MemAttr 0b1111 WB, 0b0101 NC, 0b0001 Device-nGnRE; S2AP = W:R; XN 0b10 never executable.
        Stage::Two => {
            let attr = if prot.contains(Prot::MMIO) {
                0b0001
            } else if prot.contains(Prot::CACHEABLE) {
                0b1111
            } else {
                0b0101
            };
            (
                attr,
                sh,
                u64::from(write) << 1 | u64::from(read),
                if exec { 0 } else { 0b10 },
            )
        }
    }
}

pub(super) fn attributes(stage: Stage, d: u64) -> (u64, u64, u64, u64) {
    let attr = match stage {
        Stage::Two => (d >> 2) & 0b1111,
        _ => (desc::MAIR >> (8 * ((d >> 2) & 0b111))) & 0xff,
    };
    (attr, (d >> 8) & 0b11, (d >> 6) & 0b11, (d >> 53) & 0b11)
}
