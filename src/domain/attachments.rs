//! The streams and substreams attached to each domain: one list per domain, through a pool of nodes every domain
//! of the SMMU shares, sized with the attached streams (so a domain may hold every stream the SMMU can attach: a
//! physical function and all its virtual functions, with no per-domain cap).
//!
//! A list changes only under both the bookkeeping (which owns the free nodes) and its domain's write lock (which
//! owns the list), so its domain's read lock is enough to walk it: an invalidation of a nested domain's CDs reads
//! its streams without the bookkeeping. The nodes are atomics so that one domain's list can change while another
//! domain's is walked (different nodes of the same block); the locks order the accesses to any one node, so
//! `Relaxed` suffices.

use super::storage::Storage;
use crate::mem::{AllocError, FrameAllocator};
use crate::sync::{AtomicU32, Ordering};

/// No node.
const NIL: u32 = u32::MAX;

/// One attachment: a (StreamID, SubstreamID) pair and the node after it (in its domain's list, or the free list).
struct Node {
    sid: AtomicU32,
    ssid: AtomicU32,
    next: AtomicU32,
}

/// The shared pool of nodes (out of line, in the bookkeeping's memory).
pub(crate) struct AttachmentNodes {
    nodes: Storage<Node>,
}

/// The free nodes, as a stack through `next`: kept in the bookkeeping ([`super::Book`]), so that taking or giving
/// back a node needs it.
#[derive(Debug)]
pub(crate) struct FreeNodes {
    head: u32,
    len: u32,
}

impl FreeNodes {
    /// No node.
    pub(crate) const NONE: FreeNodes = FreeNodes { head: NIL, len: 0 };

    /// Nodes left.
    pub(crate) fn len(&self) -> usize {
        self.len as usize
    }
}

/// A domain's attachments (kept in its state, under its lock): a list through [`AttachmentNodes`], in the order
/// they were attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Attachments {
    head: u32,
    tail: u32,
    len: u32,
}

impl Attachments {
    /// None.
    pub(crate) const EMPTY: Attachments = Attachments {
        head: NIL,
        tail: NIL,
        len: 0,
    };

    /// How many there are.
    pub(crate) fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether there are none.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl AttachmentNodes {
    /// Room for `capacity` attachments in a block of `allocator`, all free.
    ///
    /// # Errors
    /// The allocator's; [`AllocError::BadRequest`] for a capacity beyond what a node index holds.
    pub(crate) fn new(allocator: &dyn FrameAllocator, capacity: usize) -> Result<(Self, FreeNodes), AllocError> {
        let Some(len) = u32::try_from(capacity).ok().filter(|&n| n < NIL) else {
            return Err(AllocError::BadRequest {
                size: capacity,
                align: 4,
            });
        };
        let nodes = Storage::new(allocator, capacity, |i| Node {
            sid: AtomicU32::new(0),
            ssid: AtomicU32::new(0),
            next: AtomicU32::new(if i + 1 < capacity { i as u32 + 1 } else { NIL }),
        })?;
        let head = if capacity == 0 { NIL } else { 0 };
        Ok((AttachmentNodes { nodes }, FreeNodes { head, len }))
    }

    /// Nothing, no room, no block.
    pub(crate) const fn empty() -> Self {
        AttachmentNodes {
            nodes: Storage::empty(),
        }
    }

    fn node(&self, index: u32) -> &Node {
        // Indices come only from this pool's lists, which hold indices of its nodes.
        &self.nodes[index as usize]
    }

    /// Appends `(sid, ssid)` to `list` with a free node; `Err(())` when none is left (nothing changed).
    pub(crate) fn push(&self, free: &mut FreeNodes, list: &mut Attachments, (sid, ssid): (u32, u32)) -> Result<(), ()> {
        if free.head == NIL {
            return Err(());
        }
        let index = free.head;
        let node = self.node(index);
        free.head = node.next.load(Ordering::Relaxed);
        free.len -= 1;
        node.sid.store(sid, Ordering::Relaxed);
        node.ssid.store(ssid, Ordering::Relaxed);
        node.next.store(NIL, Ordering::Relaxed);
        match list.tail {
            NIL => list.head = index,
            tail => self.node(tail).next.store(index, Ordering::Relaxed),
        }
        list.tail = index;
        list.len += 1;
        Ok(())
    }

    /// Removes `(sid, ssid)` from `list` (its node back to `free`); whether it was there.
    pub(crate) fn remove(&self, free: &mut FreeNodes, list: &mut Attachments, pair: (u32, u32)) -> bool {
        let (mut previous, mut at) = (NIL, list.head);
        for _ in 0..list.len {
            let node = self.node(at);
            let next = node.next.load(Ordering::Relaxed);
            if (node.sid.load(Ordering::Relaxed), node.ssid.load(Ordering::Relaxed)) == pair {
                match previous {
                    NIL => list.head = next,
                    p => self.node(p).next.store(next, Ordering::Relaxed),
                }
                if list.tail == at {
                    list.tail = previous;
                }
                list.len -= 1;
                self.give_back(free, at);
                return true;
            }
            (previous, at) = (at, next);
        }
        false
    }

    /// Empties `list`, every node back to `free`.
    pub(crate) fn clear(&self, free: &mut FreeNodes, list: &mut Attachments) {
        let mut at = list.head;
        for _ in 0..list.len {
            let next = self.node(at).next.load(Ordering::Relaxed);
            self.give_back(free, at);
            at = next;
        }
        *list = Attachments::EMPTY;
    }

    fn give_back(&self, free: &mut FreeNodes, index: u32) {
        self.node(index).next.store(free.head, Ordering::Relaxed);
        free.head = index;
        free.len += 1;
    }

    /// The attachments of `list`, in order: the list must not change meanwhile (the caller holds its domain's
    /// lock, for reading at least, for as long as it borrows `list`).
    pub(crate) fn iter<'a>(&'a self, list: &'a Attachments) -> impl Iterator<Item = (u32, u32)> + 'a {
        let mut at = list.head;
        (0..list.len).map(move |_| {
            let node = self.node(at);
            at = node.next.load(Ordering::Relaxed);
            (node.sid.load(Ordering::Relaxed), node.ssid.load(Ordering::Relaxed))
        })
    }

    /// The attachment at `cursor` of `list` (0 for the first) and the cursor of the next: a walk a caller can
    /// resume, for lists read as they are iterated (a record's streams).
    pub(crate) fn at(&self, list: &Attachments, cursor: u64) -> Option<((u32, u32), u64)> {
        let index = match cursor {
            0 => list.head,
            c => u32::try_from(c - 1).ok()?,
        };
        if index == NIL || index as usize >= self.nodes.len() {
            return None;
        }
        let node = self.node(index);
        let next = node.next.load(Ordering::Relaxed);
        let pair = (node.sid.load(Ordering::Relaxed), node.ssid.load(Ordering::Relaxed));
        Some((pair, if next == NIL { u64::MAX } else { u64::from(next) + 1 }))
    }

    /// Gives the block back.
    ///
    /// # Safety
    /// As [`Storage::release`].
    pub(crate) unsafe fn release(self, allocator: &dyn FrameAllocator) {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { self.nodes.release(allocator) };
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    extern crate std;

    use super::*;
    use crate::host_frames::HeapFrames;
    use std::vec::Vec;

    fn pool(frames: &HeapFrames, capacity: usize) -> (AttachmentNodes, FreeNodes) {
        AttachmentNodes::new(frames, capacity).unwrap()
    }

    /// A model: each list a `Vec`, the free count; every step compared with it, including the order a list
    /// keeps and the nodes shared between lists (a node in two lists would show as a wrong pair in one).
    #[test]
    fn lists_through_one_pool_match_a_vec_model() {
        let frames = HeapFrames::default();
        let (nodes, mut free) = pool(&frames, 40);
        let mut lists = [Attachments::EMPTY; 4];
        let mut model: [Vec<(u32, u32)>; 4] = Default::default();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for step in 0..4000u32 {
            let l = rand(4) as usize;
            match rand(5) {
                0..=2 => {
                    let pair = (step, rand(3) as u32);
                    let pushed = nodes.push(&mut free, &mut lists[l], pair);
                    let used: usize = model.iter().map(Vec::len).sum();
                    assert_eq!(pushed.is_ok(), used < 40, "step {step}");
                    if pushed.is_ok() {
                        model[l].push(pair);
                    }
                }
                3 if !model[l].is_empty() => {
                    // The first, the last or one between: the tail must follow a removal of the last.
                    let k = rand(model[l].len() as u64) as usize;
                    let pair = model[l].remove(k);
                    assert!(nodes.remove(&mut free, &mut lists[l], pair));
                    assert!(!nodes.remove(&mut free, &mut lists[l], pair), "removed twice");
                }
                4 if rand(20) == 0 => {
                    nodes.clear(&mut free, &mut lists[l]);
                    model[l].clear();
                }
                _ => {}
            }
            for (list, expected) in lists.iter().zip(&model) {
                assert_eq!(nodes.iter(list).collect::<Vec<_>>(), *expected, "step {step}");
                assert_eq!(list.len(), expected.len());
                // The resumable walk yields the same.
                let (mut cursor, mut walked) = (0, Vec::new());
                while walked.len() < list.len() {
                    let (pair, next) = nodes.at(list, cursor).unwrap();
                    walked.push(pair);
                    cursor = next;
                }
                assert_eq!(walked, *expected);
            }
            assert_eq!(free.len() + model.iter().map(Vec::len).sum::<usize>(), 40);
        }
        // SAFETY: from `frames`.
        unsafe { nodes.release(&frames) };
        assert_eq!(frames.live_blocks(), 0);
    }

    #[test]
    fn an_empty_pool_refuses_and_changes_nothing() {
        let frames = HeapFrames::default();
        let (nodes, mut free) = pool(&frames, 0);
        let mut list = Attachments::EMPTY;
        assert_eq!(nodes.push(&mut free, &mut list, (1, 0)), Err(()));
        assert_eq!(list, Attachments::EMPTY);
        assert!(!nodes.remove(&mut free, &mut list, (1, 0)));
        assert_eq!(nodes.at(&list, 0), None);
    }
}
