//! The reader and the writer on real trees: QEMU 10.0's own (`virt` and `sbsa-ref`, dumped with `dumpdtb=`) and
//! trees compiled by dtc from the sources beside them in `tests/data/dt/` (see its README).

use fdt::Fdt;
use smmuv3_reserved_memory::{
    HANDOVER_COMPATIBLE, PatchError, Patched, Range, ReadError, RegionError, ReservedMemory, add_handover_region,
    check_region, editable_len, highest_free, largest_free, reserved_memory,
};

fn data(name: &str) -> Vec<u8> {
    let path = format!("{}/../../tests/data/dt/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The tree followed by `spare` bytes of room (QEMU's trees carry about 1 MiB of it inside their `totalsize`; the
/// committed ones were cut to their blocks).
fn with_room(tree: &[u8], spare: usize) -> Vec<u8> {
    let mut buffer = tree.to_vec();
    buffer.resize(tree.len() + spare, 0);
    buffer
}

fn read(blob: &[u8]) -> ReservedMemory<'_> {
    let fdt = Fdt::new(blob).expect("a valid tree");
    reserved_memory(&fdt).expect("a readable /reserved-memory")
}

/// A node's name with its properties (name and value).
type Node = (String, Vec<(String, Vec<u8>)>);

/// Every node as its path-free name with its properties, in tree order.
fn nodes(blob: &[u8]) -> Vec<Node> {
    let fdt = Fdt::new(blob).expect("a valid tree");
    fdt.all_nodes()
        .map(|n| {
            let props = n.properties().map(|p| (p.name.to_string(), p.value.to_vec())).collect();
            (n.name.to_string(), props)
        })
        .collect()
}

const REGION: Range = Range {
    base: 0x7dff_0000,
    size: 0x200_0000,
};

#[test]
fn qemu_trees_get_reserved_memory_with_the_region_and_keep_everything_else() {
    for (tree, region) in [
        ("qemu-virt.dtb", REGION),
        (
            "qemu-sbsa-ref.dtb",
            Range {
                base: 0x100_3dff_0000,
                size: 0x200_0000,
            },
        ),
    ] {
        let original = data(tree);
        assert_eq!(
            read(&original),
            ReservedMemory::default(),
            "{tree}: QEMU reserves nothing"
        );
        let mut blob = with_room(&original, 4096);
        let outcome = add_handover_region(&mut blob, region).unwrap();
        let Patched::Added {
            created_reserved_memory,
            total_size,
        } = outcome
        else {
            panic!("{tree}: {outcome:?}")
        };
        assert!(created_reserved_memory, "{tree}");
        assert!(
            total_size > original.len() && total_size <= blob.len(),
            "{tree}: {total_size}"
        );
        // The strings block grew by exactly the names it lacked (those it has are reused).
        let strings_size = |b: &[u8]| u32::from_be_bytes(b[32..36].try_into().unwrap()) as usize;
        let lacking: usize = ["#address-cells", "#size-cells", "ranges", "compatible", "reg", "no-map"]
            .iter()
            .filter(|name| {
                let wanted = format!("{name}\0");
                !original.windows(wanted.len()).any(|w| w == wanted.as_bytes())
            })
            .map(|name| name.len() + 1)
            .sum();
        assert_eq!(strings_size(&blob), strings_size(&original) + lacking, "{tree}");
        let found = read(&blob);
        assert_eq!(found.handover, Some(region), "{tree}");
        assert!(found.others.is_empty(), "{tree}: {:?}", found.others);

        let fdt = Fdt::new(&blob).unwrap();
        assert_eq!(fdt.total_size(), total_size);
        let parent = fdt.find_node("/reserved-memory").unwrap();
        let cell = |name| parent.property(name).and_then(|p| p.as_usize());
        // The root's cells (2 and 2 on both machines), and an empty `ranges`.
        assert_eq!(
            (cell("#address-cells"), cell("#size-cells")),
            (Some(2), Some(2)),
            "{tree}"
        );
        assert_eq!(parent.property("ranges").map(|p| p.value.len()), Some(0), "{tree}");
        let name = format!("handover@{:x}", region.base);
        let node = parent.children().find(|c| c.name == name).expect("the region's node");
        assert_eq!(node.compatible().unwrap().first(), HANDOVER_COMPATIBLE);
        assert_eq!(node.property("no-map").map(|p| p.value.len()), Some(0));
        let mut reg = region.base.to_be_bytes().to_vec();
        reg.extend_from_slice(&region.size.to_be_bytes());
        assert_eq!(node.property("reg").unwrap().value, reg.as_slice());

        // Every node and property of the original, unchanged and in order, and nothing else but the two nodes.
        let before = nodes(&original);
        let after: Vec<_> = nodes(&blob)
            .into_iter()
            .filter(|(n, _)| n != "reserved-memory" && *n != name)
            .collect();
        assert_eq!(before, after, "{tree}");
        // The memory node (what discovery reads) still reads the same.
        let bank = |b: &[u8]| {
            let f = Fdt::new(b).unwrap();
            let r = f.memory().regions().next().unwrap();
            (r.starting_address as u64, r.size)
        };
        assert_eq!(bank(&original), bank(&blob));
    }
}

#[test]
fn a_tree_that_names_the_region_is_left_alone_and_one_naming_another_is_refused_unchanged() {
    let mut blob = with_room(&data("qemu-virt.dtb"), 4096);
    add_handover_region(&mut blob, REGION).unwrap();
    let once = blob.clone();
    assert_eq!(add_handover_region(&mut blob, REGION), Ok(Patched::AlreadyPresent));
    assert_eq!(blob, once);
    let other = Range {
        base: REGION.base - 0x200_0000,
        ..REGION
    };
    assert_eq!(
        add_handover_region(&mut blob, other),
        Err(PatchError::AlreadyNamesAnother(REGION))
    );
    assert_eq!(blob, once);
}

#[test]
fn without_room_the_tree_is_refused_unchanged() {
    let original = data("qemu-virt.dtb");
    let mut blob = original.clone();
    let error = add_handover_region(&mut blob, REGION).unwrap_err();
    assert!(
        matches!(error, PatchError::NoSpace { needed, capacity } if needed > capacity && capacity == original.len()),
        "{error:?}"
    );
    assert_eq!(blob, original);
    // Exactly the room it needs is enough.
    let PatchError::NoSpace { needed, .. } = error else {
        unreachable!()
    };
    let mut exact = with_room(&original, needed - original.len());
    assert!(matches!(
        add_handover_region(&mut exact, REGION),
        Ok(Patched::Added { .. })
    ));
    assert_eq!(read(&exact).handover, Some(REGION));
}

#[test]
fn a_board_tree_gives_its_region_and_keeps_every_other_fixed_range() {
    let blob = data("board-reserved.dtb");
    let found = read(&blob);
    assert_eq!(
        found.handover,
        Some(Range {
            base: 0x7000_0000,
            size: 0x400_0000
        })
    );
    // The /memreserve/ entry, the secure carve-out and the shared pool; not the disabled node, nor the dynamically
    // allocated one (no `reg`).
    let others: Vec<Range> = found.others.iter().copied().collect();
    assert_eq!(
        others,
        [
            Range {
                base: 0x4000_0000,
                size: 0x1_0000
            },
            Range {
                base: 0x7e00_0000,
                size: 0x100_0000
            },
            Range {
                base: 0x6000_0000,
                size: 0x20_0000
            },
        ]
    );
    // The writer sees the same region.
    let mut copy = with_room(&blob, 1024);
    assert_eq!(
        add_handover_region(&mut copy, found.handover.unwrap()),
        Ok(Patched::AlreadyPresent)
    );
    assert_eq!(
        add_handover_region(&mut copy, REGION),
        Err(PatchError::AlreadyNamesAnother(found.handover.unwrap()))
    );
}

#[test]
fn the_region_is_written_in_the_cells_reserved_memory_uses() {
    let original = data("cells-1-1.dtb");
    assert_eq!(read(&original).handover, None);
    let region = Range {
        base: 0x9000_0000,
        size: 0x200_0000,
    };
    let mut blob = with_room(&original, 1024);
    assert!(matches!(
        add_handover_region(&mut blob, region),
        Ok(Patched::Added {
            created_reserved_memory: false,
            ..
        })
    ));
    let found = read(&blob);
    assert_eq!(found.handover, Some(region));
    let others: Vec<Range> = found.others.iter().copied().collect();
    assert_eq!(
        others,
        [Range {
            base: 0x8800_0000,
            size: 0x80_0000
        }]
    );
    let fdt = Fdt::new(&blob).unwrap();
    let node = fdt.find_node("/reserved-memory/handover@90000000").unwrap();
    assert_eq!(node.property("reg").unwrap().value, [0x90, 0, 0, 0, 0x02, 0, 0, 0]);
    // The node after /reserved-memory is intact.
    assert_eq!(
        fdt.find_node("/chosen")
            .and_then(|c| c.property("bootargs"))
            .and_then(|p| p.as_str()),
        Some("after reserved-memory")
    );
    // Above 4 GiB the region does not fit one cell: refused, the tree unchanged.
    let mut again = with_room(&original, 1024);
    let high = Range {
        base: 0x1_0000_0000,
        size: 0x200_0000,
    };
    assert_eq!(add_handover_region(&mut again, high), Err(PatchError::DoesNotFit(high)));
    assert_eq!(again, with_room(&original, 1024));
}

#[test]
fn malformed_region_nodes_are_errors_for_the_reader_and_the_writer() {
    let two = data("two-handover.dtb");
    let fdt = Fdt::new(&two).unwrap();
    let found = reserved_memory(&fdt).unwrap();
    assert_eq!(found.handover, None);
    assert_eq!(
        found.handover_error,
        Some(ReadError::TwoHandoverRegions {
            first: "handover@70000000",
            second: "handover@72000000"
        })
    );
    // Neither is used, and neither is free RAM.
    let bases: Vec<u64> = found.others.iter().map(|r| r.base).collect();
    assert_eq!(bases, [0x7000_0000, 0x7200_0000]);
    let mut blob = with_room(&two, 1024);
    assert!(matches!(
        add_handover_region(&mut blob, REGION),
        Err(PatchError::AlreadyNamesAnother(_))
    ));
    assert_eq!(blob, with_room(&two, 1024));

    let bad = data("bad-reg.dtb");
    let fdt = Fdt::new(&bad).unwrap();
    let found = reserved_memory(&fdt).unwrap();
    assert_eq!(found.handover, None);
    let error = found.handover_error.unwrap();
    assert_eq!(
        error,
        ReadError::Reg {
            node: "handover@70000000",
            len: 12
        }
    );
    assert!(error.to_string().contains("handover@70000000"), "{error}");
    let mut blob = with_room(&bad, 1024);
    assert!(matches!(
        add_handover_region(&mut blob, REGION),
        Err(PatchError::MalformedRegionNode(_))
    ));
    assert_eq!(blob, with_room(&bad, 1024));
}

/// The header field at byte `at`.
fn field(blob: &[u8], at: usize) -> usize {
    u32::from_be_bytes(blob[at..at + 4].try_into().unwrap()) as usize
}

/// Checks that `after` is `before` with one node inserted in its structure block and names appended to its strings
/// block, and nothing else changed: the header but for the four fields an insertion changes, every byte before the
/// insertion point, every byte after it (moved up by the node), and the room past the strings. Byte for byte, as
/// the `fdt` crate panics on some corrupted trees.
fn only_a_node_was_inserted(before: &[u8], after: &[u8]) -> Result<(), String> {
    let (size_struct, size_strings) = (field(before, 36), field(before, 32));
    let node = field(after, 36)
        .checked_sub(size_struct)
        .ok_or("the structure block shrank")?;
    let names = field(after, 32)
        .checked_sub(size_strings)
        .ok_or("the strings block shrank")?;
    let old_end = field(before, 12) + size_strings;
    if node == 0 || field(after, 12) != field(before, 12) + node {
        return Err(format!(
            "node of {node} bytes, strings moved to {:#x}",
            field(after, 12)
        ));
    }
    // Magic, the structure and reservation offsets, the versions, the boot CPU.
    if before[..4] != after[..4] || before[8..12] != after[8..12] || before[16..32] != after[16..32] {
        return Err("a header field an insertion does not change changed".into());
    }
    if field(after, 4) != field(before, 4).max(old_end + node + names) {
        return Err(format!("totalsize {}", field(after, 4)));
    }
    let first_difference = (40..old_end)
        .find(|&k| before[k] != after[k])
        .ok_or("no insertion found")?;
    // The node starts with BEGIN_NODE where the tree had an END_NODE: they differ in the token's last byte.
    let at = first_difference & !3;
    if after[at..at + 4] != 1u32.to_be_bytes() || before[at..at + 4] != 2u32.to_be_bytes() {
        return Err(format!("the insertion at {at:#x} is not a node before an END_NODE"));
    }
    if before[at..old_end] != after[at + node..old_end + node] {
        return Err(format!(
            "the bytes after the insertion at {at:#x} are not the tree's, moved up"
        ));
    }
    let new_end = old_end + node + names;
    if before[new_end..] != after[new_end..] {
        return Err("bytes past the edited tree changed".into());
    }
    Ok(())
}

/// Every single-bit flip of real trees: the writer never panics; whenever it refuses, or finds the region already
/// there, the bytes are unchanged; whenever it adds the node, the rest of the tree is unchanged and it finds the
/// region it wrote when asked again. QEMU's sbsa-ref tree (no `/reserved-memory`: the node is created), a board's
/// tree whose `/reserved-memory` names its region (flips in the node's `compatible` or `status` make the writer
/// add one to the existing `/reserved-memory`), and one with a disabled handover node (the writer adds one beside
/// it: the edit-existing path on every flip it accepts).
#[test]
fn corrupted_trees_never_panic_and_refusals_change_nothing() {
    for (tree, region) in [
        ("qemu-sbsa-ref.dtb", REGION),
        (
            "board-reserved.dtb",
            Range {
                base: 0x7000_0000,
                size: 0x400_0000,
            },
        ),
        ("board-reserved.dtb", REGION),
        ("handover-disabled.dtb", REGION),
    ] {
        let original = with_room(&data(tree), 1024);
        let tree_len = data(tree).len();
        let (mut refused, mut present, mut added) = (0, 0, 0);
        for byte in 0..tree_len {
            for bit in 0..8 {
                let mut corrupted = original.clone();
                corrupted[byte] ^= 1 << bit;
                let before = corrupted.clone();
                match add_handover_region(&mut corrupted, region) {
                    Err(_) => {
                        refused += 1;
                        assert_eq!(corrupted, before, "{tree}: byte {byte} bit {bit}");
                    }
                    Ok(Patched::AlreadyPresent) => {
                        present += 1;
                        assert_eq!(corrupted, before, "{tree}: byte {byte} bit {bit}");
                    }
                    Ok(Patched::Added { .. }) => {
                        added += 1;
                        if let Err(e) = only_a_node_was_inserted(&before, &corrupted) {
                            panic!("{tree}: byte {byte} bit {bit}: {e}");
                        }
                        // The writer reads back what it wrote (the `fdt` crate is not used here: it panics on some
                        // corrupted trees).
                        assert_eq!(
                            add_handover_region(&mut corrupted, region),
                            Ok(Patched::AlreadyPresent),
                            "{tree}: byte {byte} bit {bit}"
                        );
                    }
                }
            }
        }
        assert!(
            refused > 0 && present + added > 0,
            "{tree}: {refused} refused, {present} present, {added} added"
        );
        eprintln!(
            "{tree} ({:#x}): {refused} refused, {present} already present, {added} added",
            region.base
        );
    }
    // The clean trees, for the record: the same check on the edits the flips did not reach.
    for tree in ["qemu-sbsa-ref.dtb", "handover-disabled.dtb", "cells-1-1.dtb"] {
        let before = with_room(&data(tree), 1024);
        let mut after = before.clone();
        assert!(
            matches!(add_handover_region(&mut after, REGION), Ok(Patched::Added { .. })),
            "{tree}"
        );
        only_a_node_was_inserted(&before, &after).unwrap_or_else(|e| panic!("{tree}: {e}"));
    }
}

#[test]
fn region_checks() {
    let ram = [Range {
        base: 0x4000_0000,
        size: 0x4000_0000,
    }];
    let image = (
        "the image",
        Range {
            base: 0x4000_0000,
            size: 0x1e0_0000,
        },
    );
    let notes = (
        "the reset notes",
        Range {
            base: 0x7fff_0000,
            size: 0x1_0000,
        },
    );
    let ok = Range {
        base: 0x7dff_0000,
        size: 0x200_0000,
    };
    assert_eq!(check_region(ok, &ram, &[image, notes]), Ok(()));
    for bad in [
        Range {
            base: ok.base + 0x800,
            ..ok
        },
        Range {
            size: ok.size - 0x800,
            ..ok
        },
        Range { size: 0, ..ok },
    ] {
        assert_eq!(
            check_region(bad, &ram, &[image, notes]),
            Err(RegionError::Misaligned(bad))
        );
    }
    // One page past the bank.
    let past = Range {
        base: 0x7e00_1000,
        ..ok
    };
    assert_eq!(check_region(past, &ram, &[]), Err(RegionError::OutsideRam(past)));
    assert_eq!(
        check_region(past, &ram, &[image]).unwrap_err().to_string(),
        "0x7e001000..0x80001000 is not inside one RAM bank"
    );
    // Overlapping the notes by one page.
    let over = Range {
        base: 0x7ffe_f000,
        size: 0x2000,
    };
    assert_eq!(
        check_region(over, &ram, &[image, notes]),
        Err(RegionError::Overlaps {
            region: over,
            what: "the reset notes",
            other: notes.1
        })
    );
    // Overlapping the image by its last page.
    let low = Range {
        base: 0x41df_f000,
        size: 0x10_0000,
    };
    assert!(matches!(
        check_region(low, &ram, &[image, notes]),
        Err(RegionError::Overlaps { what: "the image", .. })
    ));
    // Just after the image: fine.
    let after = Range {
        base: 0x41e0_0000,
        size: 0x10_0000,
    };
    assert_eq!(check_region(after, &ram, &[image, notes]), Ok(()));
}

const VALID: Range = Range {
    base: 0x7dff_0000,
    size: 0x200_0000,
};

/// Every range a handover node names stays out of every allocator, whatever is wrong with it or with the other
/// handover nodes: no region is used then (`handover` is `None`), the reason is `handover_error`, and the valid
/// region is among `others`.
#[test]
fn a_malformed_second_handover_node_keeps_the_valid_region_reserved() {
    for (tree, error, kept) in [
        (
            "handover-then-no-reg.dtb",
            ReadError::TwoHandoverRegions {
                first: "handover@7dff0000",
                second: "handover",
            },
            vec![VALID],
        ),
        (
            "handover-two-ranges.dtb",
            ReadError::TwoHandoverRegions {
                first: "handover@7dff0000",
                second: "handover@60000000",
            },
            vec![
                VALID,
                Range {
                    base: 0x6000_0000,
                    size: 0x10_0000,
                },
                Range {
                    base: 0x6200_0000,
                    size: 0x10_0000,
                },
            ],
        ),
        (
            "handover-bad-then-good.dtb",
            ReadError::TwoHandoverRegions {
                first: "handover@70000000",
                second: "handover@7dff0000",
            },
            // The bad node's reg is not whole pairs: it names no range.
            vec![VALID],
        ),
        (
            "three-handover.dtb",
            ReadError::TwoHandoverRegions {
                first: "handover@7dff0000",
                second: "handover@70000000",
            },
            vec![
                VALID,
                Range {
                    base: 0x7000_0000,
                    size: 0x200_0000,
                },
                Range {
                    base: 0x7200_0000,
                    size: 0x200_0000,
                },
            ],
        ),
    ] {
        let blob = data(tree);
        let found = read(&blob);
        assert_eq!(found.handover, None, "{tree}");
        assert_eq!(found.handover_error, Some(error), "{tree}");
        let others: Vec<Range> = found.others.iter().copied().collect();
        assert_eq!(others, kept, "{tree}");
        assert_eq!(found.kept_out().collect::<Vec<_>>(), kept, "{tree}");
        assert!(error.to_string().contains("handover@"), "{error}");
    }
}

/// A handover `reg` that wraps is not a boot error: live update is off, and the region is kept out from its base
/// to the end of the address space.
#[test]
fn a_wrapping_handover_reg_turns_live_update_off_and_keeps_everything_above_its_base() {
    let blob = data("handover-wraps.dtb");
    let fdt = Fdt::new(&blob).unwrap();
    let found = reserved_memory(&fdt).expect("not an error for the whole tree");
    assert_eq!(found.handover, None);
    assert_eq!(
        found.handover_error,
        Some(ReadError::Reg {
            node: "handover@7dff0000",
            len: 16
        })
    );
    let others: Vec<Range> = found.others.iter().copied().collect();
    assert_eq!(
        others,
        [Range {
            base: 0x7dff_0000,
            size: u64::MAX - 0x7dff_0000
        }]
    );
}

/// QEMU virt's layout with 1 GiB: RAM from 0x4000_0000, the image and its second slot up to 0x41e0_0000.
const AFTER_IMAGE: Range = Range {
    base: 0x41e0_0000,
    size: 0x8000_0000 - 0x41e0_0000,
};
const NOTES: Range = Range {
    base: 0x7fff_0000,
    size: 0x1_0000,
};

/// The firmware's pools skip reserved ranges: a region right above the image (which `check_region` accepts) left
/// no RAM below it, and the pools used to end at the lowest reserved base, a fatal boot.
#[test]
fn the_pools_take_the_largest_free_part_not_the_ram_below_the_first_reserved_range() {
    let just_above = Range {
        base: AFTER_IMAGE.base,
        size: 0x200_0000,
    };
    assert_eq!(
        check_region(
            just_above,
            &[Range {
                base: 0x4000_0000,
                size: 0x4000_0000
            }],
            &[
                (
                    "the image",
                    Range {
                        base: 0x4000_0000,
                        size: AFTER_IMAGE.base - 0x4000_0000
                    }
                ),
                ("the reset notes", NOTES)
            ]
        ),
        Ok(())
    );
    assert_eq!(
        largest_free(AFTER_IMAGE, &[NOTES, just_above]),
        Some(Range {
            base: 0x43e0_0000,
            size: NOTES.base - 0x43e0_0000
        })
    );
    // The board's rule: the region right below the notes; the pools from the image up to it, as always.
    let board = Range {
        base: 0x7dff_0000,
        size: 0x200_0000,
    };
    assert_eq!(
        largest_free(AFTER_IMAGE, &[board, NOTES]),
        Some(Range {
            base: AFTER_IMAGE.base,
            size: board.base - AFTER_IMAGE.base
        })
    );
    // A region in the middle: the larger side (here above it), whatever the order of the ranges.
    let middle = Range {
        base: 0x5000_0000,
        size: 0x200_0000,
    };
    let above = Range {
        base: 0x5200_0000,
        size: NOTES.base - 0x5200_0000,
    };
    assert_eq!(largest_free(AFTER_IMAGE, &[middle, NOTES]), Some(above));
    assert_eq!(largest_free(AFTER_IMAGE, &[NOTES, middle]), Some(above));
    // Overlapping and nested ranges, ranges outside the window, and empty ones.
    let outside = Range {
        base: 0x1000,
        size: 0x4000_0000,
    };
    let inside_middle = Range {
        base: 0x5100_0000,
        size: 0x1000,
    };
    let empty = Range {
        base: 0x6000_0000,
        size: 0,
    };
    assert_eq!(
        largest_free(AFTER_IMAGE, &[outside, middle, inside_middle, empty, NOTES]),
        Some(above)
    );
    // Everything reserved: none.
    assert_eq!(largest_free(AFTER_IMAGE, &[AFTER_IMAGE]), None);
    let wraps = Range {
        base: 0x3000_0000,
        size: u64::MAX - 0x3000_0000,
    };
    assert_eq!(largest_free(AFTER_IMAGE, &[wraps]), None);
}

/// A `/memreserve/` entry that wraps is read as running to the end of the address space (it used to be kept with
/// its wrapping size, and then dropped by the firmware's filter: the pools covered it); a tree that reserves the
/// bank's last 64 KiB moves the reset notes below what it reserves.
#[test]
fn a_wrapping_memreserve_and_reserved_notes_stay_out_of_the_pools() {
    let blob = data("memreserve-wraps.dtb");
    let found = read(&blob);
    let others: Vec<Range> = found.others.iter().copied().collect();
    assert_eq!(
        others,
        [
            Range {
                base: 0x7000_0000,
                size: u64::MAX - 0x7000_0000
            },
            Range {
                base: 0x7fff_8000,
                size: 0x8000
            },
        ]
    );
    assert!(others.iter().all(|r| r.end().is_some()));
    // As the firmware lays RAM out: the notes in the highest free 64 KiB, the pools in the largest free part.
    let notes = highest_free(AFTER_IMAGE, &others, 0x1_0000, 0x1_0000).unwrap();
    assert_eq!(notes, 0x6fff_0000);
    let mut reserved = others.clone();
    reserved.push(Range {
        base: notes,
        size: 0x1_0000,
    });
    assert_eq!(
        largest_free(AFTER_IMAGE, &reserved),
        Some(Range {
            base: AFTER_IMAGE.base,
            size: 0x6fff_0000 - AFTER_IMAGE.base
        })
    );
}

#[test]
fn the_notes_go_in_the_highest_free_aligned_block() {
    // Nothing reserved: the bank's last 64 KiB.
    assert_eq!(highest_free(AFTER_IMAGE, &[], 0x1_0000, 0x1_0000), Some(NOTES.base));
    // The last page reserved: the 64 KiB below it.
    let page = Range {
        base: 0x7fff_f000,
        size: 0x1000,
    };
    assert_eq!(
        highest_free(AFTER_IMAGE, &[page], 0x1_0000, 0x1_0000),
        Some(0x7ffe_0000)
    );
    // Two ranges in a row, the lower one unaligned.
    let lower = Range {
        base: 0x7ffd_8800,
        size: 0x1_0000,
    };
    assert_eq!(
        highest_free(AFTER_IMAGE, &[page, lower], 0x1_0000, 0x1_0000),
        Some(0x7ffc_0000)
    );
    // Nothing free, nonsense arguments: none.
    assert_eq!(highest_free(AFTER_IMAGE, &[AFTER_IMAGE], 0x1_0000, 0x1_0000), None);
    assert_eq!(highest_free(AFTER_IMAGE, &[], 0, 0x1_0000), None);
    assert_eq!(highest_free(AFTER_IMAGE, &[], 0x1_0000, 3), None);
    let tiny = Range {
        base: 0x1000,
        size: 0x1000,
    };
    assert_eq!(highest_free(tiny, &[], 0x1_0000, 0x1_0000), None);
}

/// The reader and the writer agree on which handover nodes count: a disabled one is ignored by both (the writer adds
/// an enabled node beside it), and `status = "ok"` is enabled for both.
#[test]
fn disabled_handover_nodes_are_ignored_by_the_reader_and_the_writer() {
    let original = data("handover-disabled.dtb");
    assert_eq!(read(&original), ReservedMemory::default());
    let mut blob = with_room(&original, 1024);
    assert!(matches!(
        add_handover_region(&mut blob, VALID),
        Ok(Patched::Added {
            created_reserved_memory: false,
            ..
        })
    ));
    let found = read(&blob);
    assert_eq!((found.handover, found.handover_error), (Some(VALID), None));
    assert!(found.others.is_empty());

    let ok = data("status-ok.dtb");
    let found = read(&ok);
    assert_eq!((found.handover, found.handover_error), (Some(VALID), None));
    let mut blob = with_room(&ok, 1024);
    assert_eq!(add_handover_region(&mut blob, VALID), Ok(Patched::AlreadyPresent));
    assert_eq!(blob, with_room(&ok, 1024));
}

/// What Linux requires of the node and its parent: the region `no-map` and not `reusable`, `/reserved-memory` with
/// the root's cells and an empty `ranges`. Otherwise no region is used (its range is still kept out) and the writer
/// refuses the tree, unchanged.
#[test]
fn a_mappable_region_or_a_translated_reserved_memory_is_refused_and_kept_out() {
    let reusable = data("handover-reusable.dtb");
    let found = read(&reusable);
    assert_eq!(found.handover, None);
    assert_eq!(
        found.handover_error,
        Some(ReadError::HandoverMappable {
            node: "handover@7dff0000"
        })
    );
    assert_eq!(found.others.as_slice(), [VALID]);
    let mut blob = with_room(&reusable, 1024);
    assert!(matches!(
        add_handover_region(&mut blob, VALID),
        Err(PatchError::MalformedRegionNode(_))
    ));
    assert_eq!(blob, with_room(&reusable, 1024));

    for (tree, region, error) in [
        (
            "ranges-not-empty.dtb",
            VALID,
            ReadError::ParentLayout {
                cells: (2, 2),
                root_cells: (2, 2),
                ranges: Some(24),
            },
        ),
        (
            "cells-not-root.dtb",
            Range {
                base: 0x9000_0000,
                size: 0x200_0000,
            },
            ReadError::ParentLayout {
                cells: (1, 1),
                root_cells: (2, 2),
                ranges: Some(16),
            },
        ),
    ] {
        let original = data(tree);
        let found = read(&original);
        assert_eq!(found.handover, None, "{tree}");
        assert_eq!(found.handover_error, Some(error), "{tree}");
        assert!(found.others.contains(&region), "{tree}: {:?}", found.others);
        assert!(error.to_string().contains("empty ranges"), "{error}");
        let mut blob = with_room(&original, 1024);
        let refused = add_handover_region(&mut blob, region).unwrap_err();
        assert!(
            matches!(refused, PatchError::ParentLayout { .. }),
            "{tree}: {refused:?}"
        );
        assert_eq!(blob, with_room(&original, 1024), "{tree}");
    }
}

/// The firmware edits the tree in place in the memory below its image: the header's `totalsize` is checked against
/// that room, never trusted to bound the slice.
#[test]
fn a_tree_whose_totalsize_runs_past_the_writable_room_is_not_edited() {
    let tree = data("qemu-virt.dtb");
    let header: [u8; 8] = tree[..8].try_into().unwrap();
    let total = tree.len();
    assert_eq!(editable_len(header, total), Ok(total));
    assert_eq!(editable_len(header, 1 << 20), Ok(total));
    assert_eq!(
        editable_len(header, total - 1),
        Err(PatchError::BeyondWritable { total, room: total - 1 })
    );
    // A header claiming 4 GiB less a byte, as a corrupted one may.
    let mut huge = header;
    huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(
        editable_len(huge, 1 << 20),
        Err(PatchError::BeyondWritable {
            total: u32::MAX as usize,
            room: 1 << 20
        })
    );
    let mut no_magic = header;
    no_magic[0] ^= 1;
    assert!(matches!(
        editable_len(no_magic, 1 << 20),
        Err(PatchError::BeyondWritable { total: 0, .. })
    ));
    assert!(
        editable_len(huge, 1 << 20)
            .unwrap_err()
            .to_string()
            .contains("4294967295")
    );
}
