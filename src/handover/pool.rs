//! The handover pool: memory inside the reserved handover region from which preserved domains take their page
//! tables and CD tables, so that they survive a warm reset (or a jump into a new image) where they are, and the
//! next image adopts them in place.
//!
//! The region is split once: its first [`METADATA_BYTES`] hold the records ([`super::format`]); the rest is the
//! pool, cut into [`ARENAS`] equal arenas. A domain meant to be preserved is created with an arena as its
//! [`crate::domain::DomainMemory`]; the arena hands out frames front to back (reusing freed single frames), so the
//! memory a domain owns is one extent: the arena's base up to what it has used. That extent goes into the domain's
//! record; after the hand-off the next image gives the arena back the same extent ([`HandoverPool::adopt`]) before
//! it adopts the tables inside it, and so never hands that memory out again until `finish` releases it.

use core::ptr::NonNull;

use spin::Mutex;

use super::Extent;
use crate::mem::{AllocError, DmaBlock, FrameAllocator, PhysAddr};

/// Bytes at the start of the region for the header and records.
pub const METADATA_BYTES: u64 = 64 << 10;
/// Arenas the pool is cut into (at most this many preserved domains own memory).
pub const ARENAS: usize = 16;
const _: () = assert!(ARENAS <= 32, "take_arena keeps a bit per arena in a u32");
/// Freed single frames an arena remembers for reuse (more are left unused until the arena is released).
pub const ARENA_FREE_FRAMES: usize = 256;
/// The unit an arena hands out: every block starts a frame (aligned to its size, at least a frame) and takes whole
/// frames.
pub const FRAME: u64 = 4096;

/// Why the pool cannot be set up or used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolError {
    /// The region is too small (or misaligned, physically or at its CPU address) for the metadata and [`ARENAS`] arenas of at least a frame each.
    RegionTooSmall(Extent),
    /// The pool was set up already.
    AlreadySetUp,
    /// The pool is not set up.
    NotSetUp,
    /// Every arena is taken.
    NoFreeArena,
    /// An extent to adopt is not the start of an arena, or runs past it.
    NotAnArena(Extent),
    /// The arena of an extent to adopt is in use.
    ArenaInUse(Extent),
}

impl core::fmt::Display for PoolError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PoolError::RegionTooSmall(e) => write!(
                f,
                "handover region {:#x}+{:#x} is too small or misaligned for its records and {ARENAS} arenas",
                e.base, e.len
            ),
            PoolError::AlreadySetUp => f.write_str("the handover pool is set up already"),
            PoolError::NotSetUp => f.write_str("the handover pool is not set up"),
            PoolError::NoFreeArena => write!(f, "all {ARENAS} handover arenas are in use"),
            PoolError::NotAnArena(e) => write!(f, "extent {:#x}+{:#x} is not an arena's", e.base, e.len),
            PoolError::ArenaInUse(e) => write!(f, "the arena of extent {:#x}+{:#x} is in use", e.base, e.len),
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Layout {
    /// The whole region (physical).
    region: Extent,
    /// CPU address of the region's first byte.
    virt: usize,
    /// Bytes per arena.
    arena_bytes: u64,
}

impl Layout {
    fn pool(&self) -> Extent {
        Extent {
            base: self.region.base + METADATA_BYTES,
            len: self.arena_bytes * ARENAS as u64,
        }
    }

    fn arena_base(&self, index: usize) -> u64 {
        self.pool().base + self.arena_bytes * index as u64
    }

    fn virt_of(&self, phys: u64) -> usize {
        self.virt + (phys - self.region.base) as usize
    }
}

struct ArenaState {
    in_use: bool,
    /// A domain owns it (one domain per arena).
    owned: bool,
    /// Nothing may be handed out until the hand-off (the records were written).
    sealed: bool,
    /// Bytes handed out front to back from the arena's base.
    used: u64,
    free: heapless::Vec<u64, ARENA_FREE_FRAMES>,
}

/// One arena: a domain's memory.
pub struct HandoverArena {
    index: usize,
    layout: Mutex<Option<Layout>>,
    state: Mutex<ArenaState>,
}

/// The handover region's pool. Lives in a `static`; set up once per boot with [`HandoverPool::set_up`].
pub struct HandoverPool {
    layout: Mutex<Option<Layout>>,
    /// Held while the driver reads or writes the metadata area ([`HandoverPool::lock_metadata`]), so that two
    /// SMMUs sharing the pool (on two CPUs) never touch the records at once.
    /// The metadata lock, and the staging buffer a region is rewritten through under it (the new region is
    /// encoded there from views of the old one, then copied over it).
    metadata_lock: Mutex<Staging>,
    arenas: [HandoverArena; ARENAS],
}

/// What a region is rewritten and decoded through, under the metadata lock: a region's worth of bytes, and the
/// scratch [`super::format::decode`] sorts in.
#[repr(C, align(8))]
struct Staging {
    buffer: [u8; METADATA_BYTES as usize],
    scratch: [u64; SCRATCH_WORDS],
}

// The largest version-2 region (4 instances of 32 records, each with 8 streams and 8 extents) re-encoded as
// version 3 (prepare and finish rewrite other SMMUs' records): it fits the metadata area.
const _: () = {
    use super::format::{
        EXTENT_SIZE, HEADER_SIZE, IDENTITY_SIZE, RECORD_HEAD_SIZE, STREAM_SIZE, V2_ENTRIES, V2_INSTANCES, V2_RECORDS,
    };
    let record = RECORD_HEAD_SIZE + V2_ENTRIES * (STREAM_SIZE + EXTENT_SIZE);
    assert!(HEADER_SIZE + V2_INSTANCES * (IDENTITY_SIZE + V2_RECORDS * record) <= METADATA_BYTES as usize);
};

/// Words of scratch a region of the metadata area's size needs to be decoded.
const SCRATCH_WORDS: usize = super::format::scratch_words(METADATA_BYTES as usize);

/// The metadata area of a [`HandoverPool`] (the region's first [`METADATA_BYTES`]), with the pool's metadata lock
/// held until it is dropped.
pub struct MetadataGuard<'a> {
    lock: spin::MutexGuard<'a, Staging>,
    bytes: *mut u8,
}

impl MetadataGuard<'_> {
    /// The metadata area, the pool's staging buffer (as long) and the scratch [`super::format::decode`] needs for
    /// a region of that size, all under the lock this guard holds.
    pub fn with_staging(&mut self) -> (&mut [u8], &mut [u8], &mut [u64]) {
        // SAFETY: as in `deref_mut`; the staging buffer and scratch are the lock's own data, other objects.
        let metadata = unsafe { core::slice::from_raw_parts_mut(self.bytes, METADATA_BYTES as usize) };
        let staging = &mut *self.lock;
        (metadata, &mut staging.buffer, &mut staging.scratch)
    }
}

impl core::ops::Deref for MetadataGuard<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `set_up`'s contract maps the metadata area at `bytes` for the pool alone; the lock this guard
        // holds keeps every other user of `lock_metadata` out while the borrow of the guard lasts.
        unsafe { core::slice::from_raw_parts(self.bytes, METADATA_BYTES as usize) }
    }
}

impl core::ops::DerefMut for MetadataGuard<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes this the guard's only live view.
        unsafe { core::slice::from_raw_parts_mut(self.bytes, METADATA_BYTES as usize) }
    }
}

impl Default for HandoverPool {
    fn default() -> Self {
        Self::new()
    }
}

impl HandoverPool {
    /// An empty, not yet set up pool (usable in a `static`).
    pub const fn new() -> Self {
        const fn arena(index: usize) -> HandoverArena {
            HandoverArena {
                index,
                layout: Mutex::new(None),
                state: Mutex::new(ArenaState {
                    in_use: false,
                    owned: false,
                    sealed: false,
                    used: 0,
                    free: heapless::Vec::new(),
                }),
            }
        }
        HandoverPool {
            layout: Mutex::new(None),
            metadata_lock: Mutex::new(Staging {
                buffer: [0; METADATA_BYTES as usize],
                scratch: [0; SCRATCH_WORDS],
            }),
            arenas: [
                arena(0),
                arena(1),
                arena(2),
                arena(3),
                arena(4),
                arena(5),
                arena(6),
                arena(7),
                arena(8),
                arena(9),
                arena(10),
                arena(11),
                arena(12),
                arena(13),
                arena(14),
                arena(15),
            ],
        }
    }

    /// Sets the pool up over the reserved region `region` (physical, 4 KiB aligned), which the CPU reaches at
    /// `virt`. Every arena starts free and empty; an image that restores then [`HandoverPool::adopt`]s the extents
    /// its records name.
    ///
    /// # Errors
    /// [`PoolError::RegionTooSmall`] (also for a `virt` that is not 8-byte aligned), [`PoolError::AlreadySetUp`].
    ///
    /// # Safety
    /// The region must be RAM reserved for this purpose (never handed to any other allocator), mapped at `virt`
    /// as normal memory for the life of the program, and used by nothing else.
    pub unsafe fn set_up(&self, region: Extent, virt: NonNull<u8>) -> Result<(), PoolError> {
        let mut layout = self.layout.lock();
        if layout.is_some() {
            return Err(PoolError::AlreadySetUp);
        }
        // Blocks are handed out at `virt` + a multiple of a frame and viewed as `AtomicU64`s: `virt` must be
        // 8-byte aligned.
        let aligned =
            region.base.is_multiple_of(FRAME) && (virt.as_ptr() as usize).is_multiple_of(8) && region.end().is_some();
        let arena_bytes = (region.len.saturating_sub(METADATA_BYTES) / ARENAS as u64) & !(FRAME - 1);
        if !aligned || arena_bytes < FRAME {
            return Err(PoolError::RegionTooSmall(region));
        }
        let l = Layout {
            region,
            virt: virt.as_ptr() as usize,
            arena_bytes,
        };
        *layout = Some(l);
        for arena in &self.arenas {
            *arena.layout.lock() = Some(l);
        }
        Ok(())
    }

    fn layout(&self) -> Result<Layout, PoolError> {
        self.layout.lock().ok_or(PoolError::NotSetUp)
    }

    /// The region (physical).
    ///
    /// # Errors
    /// [`PoolError::NotSetUp`].
    pub fn region(&self) -> Result<Extent, PoolError> {
        Ok(self.layout()?.region)
    }

    /// The metadata area: the region's first [`METADATA_BYTES`], where the header and records live.
    ///
    /// # Errors
    /// [`PoolError::NotSetUp`].
    pub fn metadata_extent(&self) -> Result<Extent, PoolError> {
        let l = self.layout()?;
        Ok(Extent {
            base: l.region.base,
            len: METADATA_BYTES,
        })
    }

    /// The pool's extent: the region less its metadata.
    ///
    /// # Errors
    /// [`PoolError::NotSetUp`].
    pub fn pool(&self) -> Result<Extent, PoolError> {
        Ok(self.layout()?.pool())
    }

    /// The metadata area (the region's first [`METADATA_BYTES`]), locked: other callers of this method (another
    /// SMMU's prepare, restore or finish on another CPU) wait until the guard is dropped. Spins while another
    /// holds it; never take it twice on one CPU.
    ///
    /// # Errors
    /// [`PoolError::NotSetUp`].
    pub fn lock_metadata(&self) -> Result<MetadataGuard<'_>, PoolError> {
        let l = self.layout()?;
        Ok(MetadataGuard {
            lock: self.metadata_lock.lock(),
            bytes: l.virt as *mut u8,
        })
    }

    /// The CPU address of the metadata area's first byte (the region's), for address arithmetic only.
    ///
    /// # Errors
    /// [`PoolError::NotSetUp`].
    pub fn metadata_address(&self) -> Result<*const u8, PoolError> {
        Ok(self.layout()?.virt as *const u8)
    }

    /// The metadata area (the region's first [`METADATA_BYTES`]) as bytes, without the lock
    /// ([`HandoverPool::lock_metadata`] is the safe way).
    ///
    /// # Errors
    /// [`PoolError::NotSetUp`].
    ///
    /// # Safety
    /// No other reference to the metadata area may be live while the returned slice is, and no
    /// [`MetadataGuard`] either.
    #[allow(clippy::mut_from_ref)] // The memory is the region's, not `self`'s; exclusivity is the caller's contract.
    pub unsafe fn metadata(&self) -> Result<&mut [u8], PoolError> {
        let l = self.layout()?;
        // SAFETY: `set_up`'s contract maps the region at `virt`; the caller guarantees exclusivity.
        Ok(unsafe { core::slice::from_raw_parts_mut(l.virt as *mut u8, METADATA_BYTES as usize) })
    }

    /// The words of `extent` (8-byte aligned, wholly inside the pool), read where they are: how a restore examines
    /// the memory a record names before it adopts it. `None` for an extent that is misaligned or not inside the
    /// pool.
    ///
    /// # Safety
    /// Nothing may write `extent` while the returned slice lives: no arena in use may hand out any of it (a
    /// record's arena is free until the restore adopts it; the SMMU only reads it).
    pub(crate) unsafe fn preserved_words(&self, extent: Extent) -> Option<&[u64]> {
        let l = self.layout().ok()?;
        if !l.pool().contains(extent.base, extent.len) || !extent.base.is_multiple_of(8) {
            return None;
        }
        let words = usize::try_from(extent.len / 8).ok()?;
        // SAFETY: inside the region, which `set_up`'s contract maps at `virt` (8-byte aligned) for the program's
        // life; the caller guarantees that nothing writes it meanwhile.
        Some(unsafe { core::slice::from_raw_parts(l.virt_of(extent.base) as *const u64, words) })
    }

    /// Takes a free arena, empty, for a domain meant to be preserved. An arena that the region still names is not
    /// free, even before any restore has adopted it: one that a record's extent overlaps, or that holds an SMMU's
    /// own structures for a hand-off with that SMMU left running. After a hand-off another SMMU's preserved
    /// domains (or its live stream table) may wait in the region for its own restore (or `finish_handover`), and
    /// must be there, untouched, when it comes. A region that does not decode names nothing (its restore is
    /// refused and adopts nothing): restore, or stop, every SMMU left running before taking arenas. Takes the
    /// metadata lock: never call it while holding a [`MetadataGuard`].
    ///
    /// # Errors
    /// [`PoolError::NotSetUp`], [`PoolError::NoFreeArena`].
    pub fn take_arena(&'static self) -> Result<&'static HandoverArena, PoolError> {
        let l = self.layout()?;
        let named = self.named_arenas(&l)?;
        for (index, arena) in self.arenas.iter().enumerate() {
            if named & (1 << index) != 0 {
                continue;
            }
            let mut s = arena.state.lock();
            if !s.in_use {
                s.in_use = true;
                s.owned = false;
                s.sealed = false;
                s.used = 0;
                s.free.clear();
                return Ok(arena);
            }
        }
        Err(PoolError::NoFreeArena)
    }

    /// The arenas the region's records and running SMMUs name, one bit each: every arena that a record's extent
    /// or an SMMU's own structures (`strtab_base`, `core_len`) overlap. Out of line, so that the decoded region
    /// (some 53 KiB) lives only for this call; read under the metadata lock, which prepare, restore and finish hold
    /// while they change the records.
    #[inline(never)]
    fn named_arenas(&self, l: &Layout) -> Result<u32, PoolError> {
        let mut guard = self.lock_metadata()?;
        let (metadata, _, scratch) = guard.with_staging();
        if metadata[..8] != super::format::MAGIC {
            return Ok(0);
        }
        let Ok(decoded) = super::format::decode(metadata, l.pool(), scratch) else {
            return Ok(0);
        };
        let cores = decoded.instances.iter().map(|i| Extent {
            base: i.identity.strtab_base,
            len: i.identity.core_len,
        });
        let extents = decoded
            .instances
            .iter()
            .flat_map(|i| i.records.iter().flat_map(|r| r.extents.iter()))
            .chain(cores)
            .filter(|e| e.len != 0);
        let mut named = 0u32;
        for e in extents {
            for index in 0..ARENAS {
                let arena = Extent {
                    base: l.arena_base(index),
                    len: l.arena_bytes,
                };
                if arena.overlaps(&e) {
                    named |= 1 << index;
                }
            }
        }
        Ok(named)
    }

    /// Takes the arena whose used extent a record names (after a hand-off): the arena is in use again with
    /// `extent` used, so nothing in it is handed out twice.
    ///
    /// # Errors
    /// [`PoolError::NotAnArena`] for an extent that does not start at an arena's base or runs past it,
    /// [`PoolError::ArenaInUse`], [`PoolError::NotSetUp`].
    pub fn adopt(&'static self, extent: Extent) -> Result<&'static HandoverArena, PoolError> {
        let l = self.layout()?;
        let pool = l.pool();
        let offset = extent
            .base
            .checked_sub(pool.base)
            .ok_or(PoolError::NotAnArena(extent))?;
        let index = (offset / l.arena_bytes) as usize;
        if !offset.is_multiple_of(l.arena_bytes)
            || index >= ARENAS
            || extent.len > l.arena_bytes
            || !extent.len.is_multiple_of(FRAME)
        {
            return Err(PoolError::NotAnArena(extent));
        }
        let arena = &self.arenas[index];
        let mut s = arena.state.lock();
        if s.in_use {
            return Err(PoolError::ArenaInUse(extent));
        }
        s.in_use = true;
        s.owned = false;
        s.sealed = false;
        s.used = extent.len;
        s.free.clear();
        Ok(arena)
    }

    /// Forgets everything a previous image left in this pool's statics (a new image entered without a reset,
    /// whose `.data` keeps the old values): not set up, every arena free.
    ///
    /// # Safety
    /// Nothing may use the pool or its arenas from before.
    pub unsafe fn forget_previous_image(&self) {
        *self.layout.lock() = None;
        for arena in &self.arenas {
            *arena.layout.lock() = None;
            // SAFETY: the caller's guarantee: nothing uses the arenas from before.
            unsafe { arena.release() };
        }
    }

    /// Whether [`HandoverPool::adopt`] would take `extent` (the start of a free arena, no longer than it).
    pub fn adoptable(&self, extent: Extent) -> bool {
        let Ok(l) = self.layout() else { return false };
        let pool = l.pool();
        let Some(offset) = extent.base.checked_sub(pool.base) else {
            return false;
        };
        let index = (offset / l.arena_bytes) as usize;
        offset.is_multiple_of(l.arena_bytes)
            && index < ARENAS
            && extent.len <= l.arena_bytes
            && extent.len.is_multiple_of(FRAME)
            && !self.arenas[index].state.lock().in_use
    }

    /// Gives an arena back, empty (as [`HandoverArena::release`]).
    ///
    /// # Safety
    /// As [`HandoverArena::release`].
    pub unsafe fn release(&self, arena: &HandoverArena) {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { arena.release() };
    }

    /// Arenas in use now.
    pub fn arenas_in_use(&self) -> usize {
        self.arenas.iter().filter(|a| a.state.lock().in_use).count()
    }
}

impl HandoverArena {
    /// Gives the arena back to its pool, empty. Freeing the domain that owns the arena does this
    /// ([`FrameAllocator::retire`]).
    ///
    /// # Safety
    /// Nothing (CPU or SMMU) may access a block this arena handed out (or adopted) afterwards: everything in it
    /// was freed, or abandoned with no reference and no walk able to reach it. The arena hands the same memory out
    /// again, zeroed.
    pub unsafe fn release(&self) {
        let mut s = self.state.lock();
        s.in_use = false;
        s.owned = false;
        s.sealed = false;
        s.used = 0;
        s.free.clear();
    }

    /// The memory this arena has handed out: its base up to the end of what it has used (possibly empty).
    pub fn extent(&self) -> Option<Extent> {
        let l = (*self.layout.lock())?;
        Some(Extent {
            base: l.arena_base(self.index),
            len: self.state.lock().used,
        })
    }
}

// SAFETY: blocks are carved from the arena's part of the reserved region (set up as RAM used by nothing else),
// front to back, never overlapping; zeroed on allocation; physical = region base + offset, reached at the matching
// CPU address.
unsafe impl FrameAllocator for HandoverArena {
    fn allocate_zeroed(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError> {
        if size == 0 || !align.is_power_of_two() {
            return Err(AllocError::BadRequest { size, align });
        }
        let l = (*self.layout.lock()).ok_or(AllocError::OutOfMemory { size })?;
        let base = l.arena_base(self.index);
        let mut s = self.state.lock();
        if s.sealed {
            return Err(AllocError::OutOfMemory { size });
        }
        let phys = match s.free.pop() {
            // Only whole frames of this arena ever enter the free list (see `free`).
            Some(frame) if size as u64 <= FRAME && align as u64 <= FRAME && frame.is_multiple_of(FRAME) => frame,
            popped => {
                if let Some(frame) = popped {
                    let _ = s.free.push(frame);
                }
                let start = (base + s.used).next_multiple_of(align.max(FRAME as usize) as u64);
                let end = start + (size as u64).next_multiple_of(FRAME);
                if end > base + l.arena_bytes {
                    return Err(AllocError::OutOfMemory { size });
                }
                s.used = end - base;
                start
            }
        };
        // Every block starts a frame, aligned as asked: a table descriptor (address bits [47:12]) or a CD table
        // pointer then names exactly the block.
        debug_assert!(
            phys.is_multiple_of((align as u64).max(FRAME)),
            "{phys:#x} for alignment {align:#x}"
        );
        let virt = NonNull::new(l.virt_of(phys) as *mut u8).ok_or(AllocError::OutOfMemory { size })?;
        // SAFETY: inside the arena's part of the region, which the CPU reaches at `virt` (set_up's contract), and
        // handed out to nobody else.
        unsafe { virt.as_ptr().write_bytes(0, size) };
        Ok(DmaBlock {
            phys: PhysAddr(phys),
            virt,
            size,
        })
    }

    unsafe fn free(&self, block: DmaBlock) {
        // Single frames are reused; larger blocks stay used until the arena is released. Only a block this arena
        // can have handed out as one frame goes back on the free list: frame-aligned, inside what it used, at the
        // CPU address it maps that frame to, and not on the list already. Anything else (a block misplaced by
        // adopted memory, say a CD table that did not start its frame) is leaked rather than handed out again as
        // a frame it does not start, or twice.
        let Some(l) = *self.layout.lock() else { return };
        let base = l.arena_base(self.index);
        let phys = block.phys.0;
        let mut s = self.state.lock();
        let whole_frame = block.size as u64 <= FRAME
            && phys.is_multiple_of(FRAME)
            && phys >= base
            && phys < base + s.used
            && block.virt.as_ptr() as usize == l.virt_of(phys);
        if whole_frame && !s.free.contains(&phys) {
            let _ = s.free.push(phys);
        }
    }

    fn phys_to_virt(&self, phys: PhysAddr) -> Option<NonNull<u8>> {
        let l = (*self.layout.lock())?;
        let base = l.arena_base(self.index);
        let used = self.state.lock().used;
        (phys.0 >= base && phys.0 < base + used).then(|| NonNull::new(l.virt_of(phys.0) as *mut u8))?
    }

    fn handover_extent(&self) -> Option<Extent> {
        self.extent()
    }

    unsafe fn retire(&self) {
        // SAFETY: `retire`'s contract: nothing accesses what this arena handed out.
        unsafe { self.release() };
    }

    fn take_ownership(&self) -> bool {
        let mut s = self.state.lock();
        !core::mem::replace(&mut s.owned, true)
    }

    fn give_up_ownership(&self) {
        self.state.lock().owned = false;
    }

    fn seal(&self) {
        self.state.lock().sealed = true;
    }

    fn unseal(&self) {
        self.state.lock().sealed = false;
    }

    fn sealed(&self) -> bool {
        self.state.lock().sealed
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use std::boxed::Box;

    fn pool(bytes: usize) -> (&'static HandoverPool, Extent) {
        let memory: &'static mut [u64] = Box::leak(std::vec![0u64; bytes / 8].into_boxed_slice());
        let virt = NonNull::new(memory.as_mut_ptr().cast::<u8>()).unwrap();
        // A physical base far from the CPU address, 4 KiB aligned.
        let region = Extent {
            base: 0x80_0000_0000,
            len: bytes as u64,
        };
        let pool: &'static HandoverPool = Box::leak(Box::new(HandoverPool::new()));
        // SAFETY: leaked, zeroed, used by nothing else.
        unsafe { pool.set_up(region, virt) }.unwrap();
        (pool, region)
    }

    /// Two SMMUs sharing the pool on two CPUs take turns with the records: a second `lock_metadata` waits for
    /// the first guard.
    #[test]
    fn the_metadata_is_locked_while_a_guard_lives() {
        use core::sync::atomic::{AtomicBool, Ordering};
        let (pool, _) = pool(8 << 20);
        static TOOK_IT: AtomicBool = AtomicBool::new(false);
        let mut guard = pool.lock_metadata().unwrap();
        guard[0] = 0x5a;
        let other = std::thread::spawn(move || {
            let bytes = pool.lock_metadata().unwrap();
            TOOK_IT.store(true, Ordering::SeqCst);
            bytes[0]
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!TOOK_IT.load(Ordering::SeqCst), "the second caller waits");
        guard[0] = 0xa5;
        drop(guard);
        assert_eq!(other.join().unwrap(), 0xa5, "and sees the first one's writes");
    }

    #[test]
    fn arenas_partition_the_pool_and_record_what_they_used() {
        let (pool, region) = pool(METADATA_BYTES as usize + ARENAS * 64 * 1024);
        assert_eq!(pool.pool().unwrap().base, region.base + METADATA_BYTES);
        let a = pool.take_arena().unwrap();
        let b = pool.take_arena().unwrap();
        let x = a.allocate_zeroed(4096, 4096).unwrap();
        let y = a.allocate_zeroed(8192, 8192).unwrap();
        let z = b.allocate_zeroed(4096, 4096).unwrap();
        assert_eq!(x.phys.0, pool.pool().unwrap().base);
        assert_eq!(y.phys.0 % 8192, 0);
        assert_eq!(a.extent().unwrap().base, x.phys.0);
        assert_eq!(a.extent().unwrap().len, y.phys.0 + 8192 - x.phys.0);
        assert!(!a.extent().unwrap().overlaps(&b.extent().unwrap()));
        assert_eq!(z.phys.0, pool.pool().unwrap().base + 64 * 1024);
        assert_eq!(a.phys_to_virt(x.phys), Some(x.virt));
        assert_eq!(a.phys_to_virt(z.phys), None, "not this arena's");
        // A freed frame is reused; the extent does not grow.
        let used = a.extent().unwrap();
        // SAFETY: nothing uses it.
        unsafe { a.free(x) };
        assert_eq!(a.allocate_zeroed(4096, 4096).unwrap().phys.0, used.base);
        assert_eq!(a.extent().unwrap(), used);
        // Full.
        assert!(a.allocate_zeroed(64 * 1024, 4096).is_err());
    }

    /// The second line of defence behind a restore's CD-table checks: a block that does not start a frame of the
    /// arena (a CD table adopted at the end of its frame), or a frame freed twice, never goes back on the free
    /// list, so every block handed out still starts its own frame.
    #[test]
    fn only_whole_frames_this_arena_handed_out_are_reused() {
        let (pool, _) = pool(METADATA_BYTES as usize + ARENAS * 64 * 1024);
        let a = pool.take_arena().unwrap();
        let x = a.allocate_zeroed(4096, 4096).unwrap();
        let y = a.allocate_zeroed(4096, 4096).unwrap();
        let y_phys = y.phys;
        let misplaced = DmaBlock {
            phys: PhysAddr(x.phys.0 + 4096 - 64),
            // SAFETY: inside the block `x`.
            virt: NonNull::new(unsafe { x.virt.as_ptr().add(4096 - 64) }).unwrap(),
            size: 64,
        };
        // SAFETY: nothing uses the blocks (the misplaced one is refused; `y` is freed twice on purpose).
        unsafe {
            a.free(misplaced);
            a.free(DmaBlock { ..y });
            a.free(y);
        }
        let used = a.extent().unwrap();
        assert_eq!(
            a.allocate_zeroed(64, 64).unwrap().phys,
            y_phys,
            "the frame freed (once)"
        );
        let next = a.allocate_zeroed(64, 64).unwrap();
        assert_eq!(
            next.phys.0,
            used.base + used.len,
            "a fresh frame: nothing misplaced, nothing twice"
        );
        assert!(next.phys.0.is_multiple_of(FRAME));
    }

    #[test]
    fn a_cpu_address_that_is_not_8_byte_aligned_is_refused() {
        let memory: &'static mut [u64] = Box::leak(std::vec![0u64; 128 << 10].into_boxed_slice());
        let virt = NonNull::new(memory.as_mut_ptr().cast::<u8>().wrapping_add(4)).unwrap();
        let region = Extent {
            base: 0x80_0000_0000,
            len: 512 << 10,
        };
        let pool = HandoverPool::new();
        assert_eq!(
            // SAFETY: leaked, used by nothing else; refused before anything is written.
            unsafe { pool.set_up(region, virt) },
            Err(PoolError::RegionTooSmall(region))
        );
    }

    #[test]
    fn an_adopted_arena_hands_out_nothing_it_used_before() {
        let (pool, _) = pool(METADATA_BYTES as usize + ARENAS * 64 * 1024);
        let a = pool.take_arena().unwrap();
        a.allocate_zeroed(3 * 4096, 4096).unwrap();
        let extent = a.extent().unwrap();
        // The next image: the same region, a fresh pool.
        // SAFETY: nothing this arena handed out is used again.
        unsafe { pool.release(a) };
        let adopted = pool.adopt(extent).unwrap();
        assert_eq!(adopted.extent(), Some(extent));
        let next = adopted.allocate_zeroed(4096, 4096).unwrap();
        assert_eq!(next.phys.0, extent.base + extent.len);
        assert_eq!(pool.adopt(extent).err(), Some(PoolError::ArenaInUse(extent)));
        let inside = Extent {
            base: extent.base + 4096,
            len: 4096,
        };
        assert_eq!(pool.adopt(inside).err(), Some(PoolError::NotAnArena(inside)));
    }

    #[test]
    fn arenas_run_out_clearly() {
        let (pool, _) = pool(METADATA_BYTES as usize + ARENAS * 4096);
        for _ in 0..ARENAS {
            pool.take_arena().unwrap();
        }
        assert_eq!(pool.take_arena().err(), Some(PoolError::NoFreeArena));
        assert_eq!(pool.arenas_in_use(), ARENAS);
    }
}
