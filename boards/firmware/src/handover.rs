//! The live-update handover region: where it comes from, the driver's [`HandoverPool`] over it, and the node that
//! carries it to the next image.
//!
//! **Where it comes from** ([`crate::run`], at every boot): a `/reserved-memory` child of the tree the board hands
//! the image whose `compatible` is [`HANDOVER_COMPATIBLE`] (base and size as the node says, checked: page-aligned,
//! inside a RAM bank, clear of the image, the reset notes and the tree's other reserved memory); without one, the
//! board's static description ([`crate::dt::StaticDescription::handover_bytes`]): that many bytes at the top of
//! the image's RAM bank, just below the reset notes. QEMU's trees have no such node, so a first boot takes the
//! board's rule; a running hand-off ([`crate::handoff::hand_off`]) writes the node into the tree it passes on
//! ([`pass_in_tree`]), and the next image reads the region from there. A warm reset makes QEMU copy its own tree
//! back (it is a ROM blob), so the boot after a reset takes the board's rule again: the same region, which is why
//! the rule depends on nothing but the board. A node that cannot be used is printed and leaves live update off.

use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use smmuv3::handover::Extent;
use smmuv3::handover::pool::HandoverPool;
pub use smmuv3_reserved_memory::HANDOVER_COMPATIBLE;
use smmuv3_reserved_memory::{Patched, Range, add_handover_region, editable_len};

/// The pool over the region (set up by [`crate::run`] when the board reserves one).
pub static POOL: HandoverPool = HandoverPool::new();

/// Where this boot's region came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A `/reserved-memory` node with [`HANDOVER_COMPATIBLE`] in the tree this image was handed.
    Tree,
    /// The board's static description (no such node in the tree, or no tree).
    Board,
}

static SOURCE: AtomicU8 = AtomicU8::new(0);
/// The tree this image was handed, passed on (edited) to the next image: its address, 0 for none.
static TREE: AtomicUsize = AtomicUsize::new(0);
/// Where the memory the tree may be edited in ends: the image's first byte (the tree lies below it).
static TREE_LIMIT: AtomicUsize = AtomicUsize::new(0);

/// Records where the region came from (once, at boot, when the pool is set up).
pub fn set_source(source: Source) {
    SOURCE.store(
        match source {
            Source::Tree => 1,
            Source::Board => 2,
        },
        Ordering::SeqCst,
    );
}

/// Where this boot's region came from; `None` without a region (live update off).
pub fn source() -> Option<Source> {
    match SOURCE.load(Ordering::SeqCst) {
        1 => Some(Source::Tree),
        2 => Some(Source::Board),
        _ => None,
    }
}

/// Records the address of the tree this image was handed (at boot), for [`pass_in_tree`], and `limit`, the end of
/// the memory the firmware may write when it edits the tree: the image's first byte (on QEMU the tree sits in the
/// RAM below the image, which starts 2 MiB into the bank).
pub fn set_tree(address: usize, limit: usize) {
    TREE.store(address, Ordering::SeqCst);
    TREE_LIMIT.store(limit, Ordering::SeqCst);
}

/// The region, once set up.
pub fn region() -> Option<Extent> {
    POOL.region().ok()
}

/// Writes the region's node into the tree this image was handed, in place, for the image a running hand-off
/// jumps to (the tree keeps its address; QEMU's carries about 1 MiB of free space inside its `totalsize`, which
/// the node uses). Only the memory between the tree and the image's first byte is written: a header whose
/// `totalsize` runs past it is refused ([`editable_len`]), not trusted. Prints what it did. Returns the tree's bytes (address and length) for the caller to clean to
/// memory before the next image starts with its caches off; `None` when nothing was written.
///
/// Called on the hand-off path only: with the run's discovery long done, nothing reads the tree any more.
pub fn pass_in_tree() -> Option<(usize, usize)> {
    let tree = TREE.load(Ordering::SeqCst);
    let region = region()?;
    if tree == 0 {
        crate::println!("handover region: no device tree to pass it in; the next image takes the board's rule");
        return None;
    }
    // The tree is edited only below the image: its header's `totalsize` is not trusted to stay there.
    let room = TREE_LIMIT.load(Ordering::SeqCst).saturating_sub(tree);
    if room < 8 {
        crate::println!("handover region: the tree at {tree:#x} is not below the image; not edited");
        return None;
    }
    // SAFETY: `set_tree` recorded the address of the tree the board handed this image, in RAM the identity map
    // covers and no allocator hands out (below the image, at least 8 bytes of it: checked just above); its header
    // was valid at boot (`dt::parse`), and only the header's first 8 bytes are read here.
    let header = unsafe { *(tree as *const [u8; 8]) };
    let total = match editable_len(header, room) {
        Ok(total) => total,
        Err(e) => {
            crate::println!(
                "handover region: not added to the tree at {tree:#x} (below the image at {limit:#x}): {e}",
                limit = tree + room
            );
            return None;
        }
    };
    // SAFETY: as above, `totalsize` bytes from `tree` are the tree, all below the image (checked), which discovery
    // read through `dt::parse` and which nothing reads or writes any more (discovery copied what it needed into the
    // platform); this is the only reference to it.
    let blob = unsafe { core::slice::from_raw_parts_mut(tree as *mut u8, total) };
    let range = Range {
        base: region.base,
        size: region.len,
    };
    match add_handover_region(blob, range) {
        Ok(Patched::Added {
            created_reserved_memory,
            total_size,
        }) => {
            crate::println!(
                "handover region: /reserved-memory/handover@{:x} ({HANDOVER_COMPATIBLE}) added to the tree at \
                 {tree:#x} passed to the next image{} ({total_size} bytes)",
                range.base,
                if created_reserved_memory {
                    ", with /reserved-memory"
                } else {
                    ""
                }
            );
            Some((tree, total))
        }
        Ok(Patched::AlreadyPresent) => {
            crate::println!("handover region: the tree at {tree:#x} passed to the next image names it already");
            Some((tree, total))
        }
        Err(e) => {
            crate::println!("handover region: not added to the tree passed to the next image: {e}");
            None
        }
    }
}
