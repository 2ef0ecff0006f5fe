//! The handover pool: memory inside the reserved handover region from which preserved domains take their page
//! tables and CD tables, so that they survive a warm reset (or a jump into a new image) where they are, and the
//! next image adopts them in place.
//!
//! The region is split once: its first [`METADATA_BYTES`] hold the records ([`super::format`]); the rest is the
//! pool, handed out by the frame. Each page of the pool has an owner, kept in an owner map (two bytes a page)
//! that lives in the pool itself, placed where the records found at set-up name nothing: free, one of the pool's
//! [`MAX_MEMORIES`] memories ([`HandoverMemory`]), held by a window, named by the region (waiting for a restore to
//! adopt it), or the map's own.
//!
//! A domain meant to be preserved is created with a memory from [`HandoverPool::take_memory`]: it takes frames
//! from anywhere in the pool as the domain grows (next fit, so a domain built at once lies in few runs) and gives
//! them back as it frees them, so no domain is capped but by the pool. Its record lists the runs of frames it
//! holds (`HandoverMemory::handover_run`); after the hand-off the next image adopts exactly those frames
//! ([`HandoverPool::adopt`]) before it adopts the tables inside them, and hands none of them out again until the
//! domain is freed. An SMMU's own structures, which a hand-off with the SMMU running records as one extent from
//! its stream table (`core_len`), come from a window ([`HandoverPool::take_window`]): a contiguous run of frames
//! set aside at once, handed out from its start.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, AtomicU16, Ordering};

use spin::{Mutex, RwLock};
use zerocopy::FromBytes;

use super::Extent;
use crate::mem::sealed::Hooks;
use crate::mem::{AllocError, DmaBlock, FrameAllocator, PhysAddr};

/// Bytes at the start of the region for the header and records.
pub const METADATA_BYTES: u64 = 64 << 10;
/// Memories a pool can hand out at once (preserved domains, and SMMUs' own windows): one owner number each.
pub const MAX_MEMORIES: usize = 4096 + 64;
/// The unit the pool hands out: every block starts a frame (aligned to its size, at least a frame) and takes whole
/// frames.
pub const FRAME: u64 = 4096;
/// The pool's length is a multiple of this many frames: version 2 cut the pool into 16 equal arenas, and keeping
/// the same extent lets a region that version wrote name the same pool.
const POOL_GRAIN: u64 = 16 * FRAME;

/// Owner of a free page.
const FREE: u16 = 0;
/// Owner of a page the region names (a record's extent, or a running SMMU's structures), which no memory holds
/// yet: only [`HandoverPool::adopt`] and [`HandoverPool::adopt_window`] take it.
const NAMED: u16 = u16::MAX - 2;
/// Owner of a page a window sets aside but has not handed out.
const HELD: u16 = u16::MAX - 1;
/// Owner of the owner map's own pages.
const MAP: u16 = u16::MAX;
const _: () = assert!(MAX_MEMORIES < NAMED as usize);

/// Why the pool cannot be set up or used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolError {
    /// The region is too small (or misaligned, physically or at its CPU address) for the metadata, the owner map
    /// and a frame.
    RegionTooSmall(Extent),
    /// The pool was set up already.
    AlreadySetUp,
    /// The pool is not set up.
    NotSetUp,
    /// Every one of the [`MAX_MEMORIES`] memories is in use.
    NoFreeMemory,
    /// No run of free frames is long enough (`bytes` asked for a window).
    OutOfFrames {
        /// Bytes asked for.
        bytes: u64,
    },
    /// An extent to adopt is not frame-aligned, lies outside the pool, or does not come after the one before it
    /// (the extents of one memory are adopted in ascending order, none overlapping).
    BadExtent(Extent),
    /// A frame of an extent to adopt is held already (by a memory, a window, or the owner map).
    InUse(Extent),
    /// The records found at set-up leave no room in the pool for its owner map.
    NoRoomForMap,
}

impl core::fmt::Display for PoolError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PoolError::RegionTooSmall(e) => write!(
                f,
                "handover region {:#x}+{:#x} is too small or misaligned for its records, its owner map and a frame",
                e.base, e.len
            ),
            PoolError::AlreadySetUp => f.write_str("the handover pool is set up already"),
            PoolError::NotSetUp => f.write_str("the handover pool is not set up"),
            PoolError::NoFreeMemory => write!(f, "all {MAX_MEMORIES} handover memories are in use"),
            PoolError::OutOfFrames { bytes } => {
                write!(f, "the handover pool has no run of free frames for {bytes:#x} bytes")
            }
            PoolError::BadExtent(e) => write!(
                f,
                "extent {:#x}+{:#x} is not frame-aligned, not inside the pool, or out of order",
                e.base, e.len
            ),
            PoolError::InUse(e) => write!(f, "a frame of extent {:#x}+{:#x} is in use", e.base, e.len),
            PoolError::NoRoomForMap => {
                f.write_str("the handover region's records leave no room in the pool for its owner map")
            }
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Layout {
    /// The whole region (physical).
    region: Extent,
    /// CPU address of the region's first byte.
    virt: usize,
    /// Bytes of the metadata area (the region's first bytes; the pool starts after them).
    metadata: u64,
    /// The caller's workspace (CPU address, words): the staging buffer (`metadata` bytes) then the decode's
    /// scratch. `None`: the pool's own (for the default metadata area).
    workspace: Option<(usize, usize)>,
    /// The pool (physical): the region after the metadata, a multiple of [`POOL_GRAIN`] long.
    pool: Extent,
    /// Frames in the pool.
    pages: usize,
    /// The owner map: its first page (counted from the pool's base) and how many pages it takes.
    map_first: usize,
    map_pages: usize,
}

impl Layout {
    fn virt_of(&self, phys: u64) -> usize {
        self.virt + (phys - self.region.base) as usize
    }

    fn phys_of(&self, page: usize) -> u64 {
        self.pool.base + page as u64 * FRAME
    }

    /// The pool page holding `phys`, or `None` outside the pool.
    fn page_of(&self, phys: u64) -> Option<usize> {
        (phys >= self.pool.base && phys - self.pool.base < self.pool.len)
            .then(|| ((phys - self.pool.base) / FRAME) as usize)
    }

    /// The pages of a frame-aligned `extent` inside the pool, or `None`.
    fn pages_of(&self, extent: Extent) -> Option<core::ops::Range<usize>> {
        if extent.len == 0
            || !extent.base.is_multiple_of(FRAME)
            || !extent.len.is_multiple_of(FRAME)
            || !self.pool.contains(extent.base, extent.len)
        {
            return None;
        }
        let first = self.page_of(extent.base)?;
        Some(first..first + (extent.len / FRAME) as usize)
    }

    /// The owner map: one owner per pool page.
    fn owners<'a>(&self) -> &'a [AtomicU16] {
        // SAFETY: `set_up` placed `pages` owners at `map_first` inside the region (which its contract maps at
        // `virt` for the pool alone, 8-byte aligned, for the program's life), zeroed them, and never hands those
        // pages out; `AtomicU16` has the layout of `u16`, and every access goes through it.
        unsafe {
            core::slice::from_raw_parts(
                self.virt_of(self.phys_of(self.map_first)) as *const AtomicU16,
                self.pages,
            )
        }
    }
}

/// The first `count` pages from `from` (below `to`), starting at a physical frame number that is a multiple of
/// `align` frames, whose owners are all `want`.
fn find_run(
    l: &Layout,
    owners: &[AtomicU16],
    range: core::ops::Range<usize>,
    count: usize,
    align: usize,
    want: u16,
) -> Option<usize> {
    let pfn0 = (l.pool.base / FRAME) as usize;
    let aligned = |page: usize| (pfn0 + page).next_multiple_of(align) - pfn0;
    let mut start = aligned(range.start);
    while start + count <= range.end {
        match (start..start + count)
            .rev()
            .find(|&p| owners[p].load(Ordering::Relaxed) != want)
        {
            None => return Some(start),
            Some(taken) => start = aligned(taken + 1),
        }
    }
    None
}

/// What a memory is, and what it holds (pages counted from the pool's base: a pool holds fewer than 2^32).
#[derive(Clone, Copy, Debug)]
struct MemoryState {
    in_use: bool,
    /// A domain (or an SMMU) owns it: one owner per memory.
    owned: bool,
    /// Nothing may be handed out, nor given back to the pool, until the hand-off (the records were written).
    sealed: bool,
    /// A window of `window_pages` pages from `lo` (it hands out only those); 0: frames from anywhere.
    window_pages: u32,
    /// The pages this memory holds lie in `[lo, hi)` (not shrunk as it frees; for a window, `hi` is the end of
    /// the last page it handed out).
    lo: u32,
    hi: u32,
    /// Pages it holds now.
    pages: u32,
}

const UNUSED: MemoryState = MemoryState {
    in_use: false,
    owned: false,
    sealed: false,
    window_pages: 0,
    lo: u32::MAX,
    hi: 0,
    pages: 0,
};

impl MemoryState {
    fn hold(&mut self, pages: core::ops::Range<usize>) {
        self.lo = self.lo.min(pages.start as u32);
        self.hi = self.hi.max(pages.end as u32);
        self.pages += pages.len() as u32;
    }

    /// The window's pages, for a window.
    fn window(&self) -> Option<core::ops::Range<usize>> {
        (self.window_pages != 0).then(|| self.lo as usize..(self.lo + self.window_pages) as usize)
    }

    /// The pages it may hold: its window's, or `[lo, hi)`.
    fn span(&self) -> core::ops::Range<usize> {
        self.window().unwrap_or(self.lo as usize..self.hi as usize)
    }
}

/// One memory of the pool: a preserved domain's (frames from anywhere), or an SMMU's own (a window). Hand it to a
/// domain ([`crate::domain::DomainMemory`]) or to `Smmu::init`.
pub struct HandoverMemory {
    /// The pool it belongs to (set when taken).
    pool: AtomicPtr<HandoverPool>,
    state: Mutex<MemoryState>,
}

impl HandoverMemory {
    const fn new() -> Self {
        HandoverMemory {
            pool: AtomicPtr::new(core::ptr::null_mut()),
            state: Mutex::new(UNUSED),
        }
    }
}

/// The handover region's pool. Lives in a `static`; set up once per boot with [`HandoverPool::set_up`].
pub struct HandoverPool {
    layout: RwLock<Option<Layout>>,
    /// The next-fit cursor (a pool page), under the lock every change to the owner map takes.
    cursor: Mutex<usize>,
    /// The metadata lock, and the staging buffer a region is rewritten through under it (the new region is
    /// encoded there from views of the old one, then copied over it). Held while the driver reads or writes the
    /// metadata area ([`HandoverPool::lock_metadata`]), so that two SMMUs sharing the pool (on two CPUs) never
    /// touch the records at once.
    metadata_lock: Mutex<Staging>,
    memories: [HandoverMemory; MAX_MEMORIES],
    /// Where the search for a memory not in use starts (after the last one taken): taking thousands of memories
    /// costs O(1) each, not a scan from the first.
    next_memory: core::sync::atomic::AtomicUsize,
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

/// The workspace a pool needs for a metadata area of `metadata_bytes` ([`HandoverPool::set_up_with`]): a staging
/// buffer as long, and the scratch [`super::format::decode`] sorts in.
pub const fn workspace_words(metadata_bytes: u64) -> usize {
    metadata_bytes as usize / 8 + super::format::scratch_words(metadata_bytes as usize)
}

/// The metadata area of a [`HandoverPool`] (the region's first bytes, [`HandoverPool::metadata_extent`]), with the
/// pool's metadata lock held until it is dropped.
pub struct MetadataGuard<'a> {
    lock: spin::MutexGuard<'a, Staging>,
    bytes: *mut u8,
    len: usize,
    workspace: Option<(usize, usize)>,
}

impl MetadataGuard<'_> {
    /// The metadata area, the pool's staging buffer (as long) and the scratch [`super::format::decode`] needs for
    /// a region of that size, all under the lock this guard holds.
    pub fn with_staging(&mut self) -> (&mut [u8], &mut [u8], &mut [u64]) {
        // SAFETY: as in `deref_mut`.
        let metadata = unsafe { core::slice::from_raw_parts_mut(self.bytes, self.len) };
        match self.workspace {
            Some((virt, words)) => {
                // SAFETY: the workspace `set_up_with` was given, for the pool alone for the program's life (its
                // contract), 8-byte aligned and `words` long (checked there); used only under the metadata lock,
                // which this guard holds; `&mut self` makes these the only views.
                let all = unsafe { core::slice::from_raw_parts_mut(virt as *mut u64, words) };
                let (staging, scratch) = all.split_at_mut(self.len / 8);
                (metadata, zerocopy::IntoBytes::as_mut_bytes(staging), scratch)
            }
            None => {
                let staging = &mut *self.lock;
                (metadata, &mut staging.buffer[..self.len], &mut staging.scratch)
            }
        }
    }
}

impl core::ops::Deref for MetadataGuard<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `set_up`'s contract maps the metadata area at `bytes` for the pool alone; the lock this guard
        // holds keeps every other user of `lock_metadata` out while the borrow of the guard lasts.
        unsafe { core::slice::from_raw_parts(self.bytes, self.len) }
    }
}

impl core::ops::DerefMut for MetadataGuard<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes this the guard's only live view.
        unsafe { core::slice::from_raw_parts_mut(self.bytes, self.len) }
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
        HandoverPool {
            layout: RwLock::new(None),
            cursor: Mutex::new(0),
            metadata_lock: Mutex::new(Staging {
                buffer: [0; METADATA_BYTES as usize],
                scratch: [0; SCRATCH_WORDS],
            }),
            memories: [const { HandoverMemory::new() }; MAX_MEMORIES],
            next_memory: core::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Sets the pool up over the reserved region `region` (physical, 4 KiB aligned), which the CPU reaches at
    /// `virt`, with a metadata area of [`METADATA_BYTES`] (the pool's own staging buffer serves it): as
    /// [`HandoverPool::set_up_with`] without a workspace.
    ///
    /// # Errors
    /// As [`HandoverPool::set_up_with`].
    ///
    /// # Safety
    /// As [`HandoverPool::set_up_with`].
    pub unsafe fn set_up(&self, region: Extent, virt: NonNull<u8>) -> Result<(), PoolError> {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { self.set_up_inner(region, virt, METADATA_BYTES, None) }
    }

    /// Sets the pool up over the reserved region `region` (physical, 4 KiB aligned), which the CPU reaches at
    /// `virt`, with a metadata area of `metadata_bytes` (a multiple of 64 KiB, at least [`METADATA_BYTES`]: what
    /// the board chooses for the records it expects, about 110 bytes per preserved domain with a stream and a few
    /// runs) and `workspace` ([`workspace_words`] of it: the staging buffer and the decode's scratch). A region
    /// whose header (CRC checked) records another split of records and pool keeps it for this boot, if the
    /// workspace serves it, so that its records restore; the board's size takes effect once the region is
    /// re-armed and the next boot finds it written with the new split.
    ///
    /// Every frame starts free but for the owner map's and those the region's records name (a previous image's
    /// preserved domains and running SMMUs, which wait for a restore to adopt them, or for `finish_handover` to let
    /// them go); the owner map goes where no record points.
    ///
    /// # Errors
    /// [`PoolError::RegionTooSmall`] (also for a `virt` that is not 8-byte aligned, a metadata size that is not a
    /// multiple of 64 KiB or below [`METADATA_BYTES`], or a workspace too small for it),
    /// [`PoolError::AlreadySetUp`], [`PoolError::NoRoomForMap`].
    ///
    /// # Safety
    /// The region must be RAM reserved for this purpose (never handed to any other allocator), mapped at `virt`
    /// as normal memory for the life of the program, and used by nothing else; so must the workspace (any RAM
    /// the CPU reaches, used by nothing else for the life of the program).
    pub unsafe fn set_up_with(
        &self,
        region: Extent,
        virt: NonNull<u8>,
        metadata_bytes: u64,
        workspace: &'static mut [u64],
    ) -> Result<(), PoolError> {
        let words = workspace.len();
        let at = workspace.as_mut_ptr() as usize;
        // SAFETY: the caller's guarantee, passed on; the workspace is the pool's from now on.
        unsafe { self.set_up_inner(region, virt, metadata_bytes, Some((at, words))) }
    }

    /// # Safety
    /// As [`HandoverPool::set_up_with`].
    unsafe fn set_up_inner(
        &self,
        region: Extent,
        virt: NonNull<u8>,
        metadata_bytes: u64,
        workspace: Option<(usize, usize)>,
    ) -> Result<(), PoolError> {
        let mut layout = self.layout.write();
        if layout.is_some() {
            return Err(PoolError::AlreadySetUp);
        }
        // The largest metadata area the staging serves.
        let serves = |bytes: u64| match workspace {
            Some((_, words)) => words >= workspace_words(bytes),
            None => bytes <= METADATA_BYTES,
        };
        // Blocks are handed out at `virt` + a multiple of a frame and viewed as `AtomicU64`s: `virt` must be
        // 8-byte aligned.
        let aligned =
            region.base.is_multiple_of(FRAME) && (virt.as_ptr() as usize).is_multiple_of(8) && region.end().is_some();
        let sized =
            metadata_bytes >= METADATA_BYTES && metadata_bytes.is_multiple_of(POOL_GRAIN) && serves(metadata_bytes);
        if !aligned || !sized || region.len <= metadata_bytes {
            return Err(PoolError::RegionTooSmall(region));
        }
        let pool_of = |metadata: u64| Extent {
            base: region.base + metadata,
            len: region.len.saturating_sub(metadata) / POOL_GRAIN * POOL_GRAIN,
        };
        // The split the region was written with, when its header says so (and the staging serves it).
        let metadata = {
            let most = usize::try_from(region.len).unwrap_or(usize::MAX);
            // SAFETY: the contract maps the region at `virt`; nothing else uses it, and `set_up` runs before any
            // other user of it (the layout is not published yet). Read only.
            let whole = unsafe { core::slice::from_raw_parts(virt.as_ptr(), most) };
            match super::format::recorded_layout(whole) {
                // The header records the metadata area (its `region`) and the pool after it.
                Some((recorded, pool))
                    if recorded.base == region.base
                        && pool.base == region.base + recorded.len
                        && pool == pool_of(pool.base - region.base)
                        && (pool.base - region.base).is_multiple_of(POOL_GRAIN)
                        && serves(pool.base - region.base) =>
                {
                    pool.base - region.base
                }
                _ => metadata_bytes,
            }
        };
        let pool = pool_of(metadata);
        let pages = (pool.len / FRAME) as usize;
        let map_pages = (pages * 2).div_ceil(FRAME as usize);
        if pages <= map_pages || pages >= u32::MAX as usize {
            return Err(PoolError::RegionTooSmall(region));
        }
        let mut l = Layout {
            region,
            virt: virt.as_ptr() as usize,
            metadata,
            workspace,
            pool,
            pages,
            map_first: 0,
            map_pages,
        };
        let mut guard = MetadataGuard {
            lock: self.metadata_lock.lock(),
            bytes: virt.as_ptr(),
            len: metadata as usize,
            workspace: l.workspace,
        };
        let (metadata_bytes, buffer, scratch) = guard.with_staging();
        let metadata_bytes: &[u8] = metadata_bytes;
        l.map_first = place_map(&l, metadata_bytes, scratch, buffer).ok_or(PoolError::NoRoomForMap)?;
        let map = l.phys_of(l.map_first);
        // SAFETY: inside the pool (place_map keeps it there), mapped by the contract; nothing else uses it.
        unsafe { (l.virt_of(map) as *mut u8).write_bytes(0, l.map_pages * FRAME as usize) };
        let owners = l.owners();
        for owner in &owners[l.map_first..l.map_first + l.map_pages] {
            owner.store(MAP, Ordering::Relaxed);
        }
        name_recorded(&l, metadata_bytes, scratch);
        drop(guard);
        *self.cursor.lock() = 0;
        *layout = Some(l);
        Ok(())
    }

    fn layout(&self) -> Result<Layout, PoolError> {
        (*self.layout.read()).ok_or(PoolError::NotSetUp)
    }

    /// The region (physical).
    ///
    /// # Errors
    /// [`PoolError::NotSetUp`].
    pub fn region(&self) -> Result<Extent, PoolError> {
        Ok(self.layout()?.region)
    }

    /// The metadata area: the region's first bytes ([`METADATA_BYTES`], or what `set_up_with` chose or the region
    /// recorded), where the header and records live.
    ///
    /// # Errors
    /// [`PoolError::NotSetUp`].
    pub fn metadata_extent(&self) -> Result<Extent, PoolError> {
        let l = self.layout()?;
        Ok(Extent {
            base: l.region.base,
            len: l.metadata,
        })
    }

    /// The pool's extent: the region less its metadata (a multiple of 64 KiB long; the owner map is inside).
    ///
    /// # Errors
    /// [`PoolError::NotSetUp`].
    pub fn pool(&self) -> Result<Extent, PoolError> {
        Ok(self.layout()?.pool)
    }

    /// The owner map's extent (inside the pool; never handed out).
    ///
    /// # Errors
    /// [`PoolError::NotSetUp`].
    pub fn owner_map(&self) -> Result<Extent, PoolError> {
        let l = self.layout()?;
        Ok(Extent {
            base: l.phys_of(l.map_first),
            len: l.map_pages as u64 * FRAME,
        })
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
            len: l.metadata as usize,
            workspace: l.workspace,
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
        Ok(unsafe { core::slice::from_raw_parts_mut(l.virt as *mut u8, l.metadata as usize) })
    }

    /// The words of `extent` (8-byte aligned, wholly inside the pool), read where they are: how a restore examines
    /// the memory a record names before it adopts it. `None` for an extent that is misaligned or not inside the
    /// pool.
    ///
    /// # Safety
    /// Nothing may write `extent` while the returned slice lives: no memory in use may hold any of it (a
    /// record's frames are free, or named, until the restore adopts them; the SMMU only reads them).
    pub(crate) unsafe fn preserved_words(&self, extent: Extent) -> Option<&[u64]> {
        let l = self.layout().ok()?;
        // SAFETY: the caller's guarantee, passed on.
        unsafe { preserved_words(&l, extent) }
    }

    /// A view for reading many preserved extents (as [`HandoverPool::preserved_words`]) without the layout's lock
    /// each time.
    pub(crate) fn preserved_view(&self) -> Option<PreservedView> {
        Some(PreservedView(self.layout().ok()?))
    }

    /// Takes a free memory, empty, for a domain meant to be preserved: it takes frames from the whole pool as the
    /// domain grows (never a frame the region names, nor one another memory holds).
    ///
    /// # Errors
    /// [`PoolError::NotSetUp`], [`PoolError::NoFreeMemory`].
    pub fn take_memory(&'static self) -> Result<&'static HandoverMemory, PoolError> {
        self.layout()?;
        self.claim(|_, _| Ok(()))
    }

    /// Takes a window of `bytes` (rounded up to frames): a contiguous run of frames set aside at once and handed
    /// out from its start, for an SMMU's own structures (a hand-off with the SMMU running records them as one
    /// extent from the stream table). [`HandoverPool::window_bytes`] is a size that suits most SMMUs.
    ///
    /// # Errors
    /// [`PoolError::NotSetUp`], [`PoolError::NoFreeMemory`], [`PoolError::OutOfFrames`].
    pub fn take_window(&'static self, bytes: u64) -> Result<&'static HandoverMemory, PoolError> {
        let l = self.layout()?;
        let count = bytes.div_ceil(FRAME).max(1) as usize;
        self.claim(|s, _| {
            let owners = l.owners();
            let mut cursor = self.cursor.lock();
            let first = find_run(&l, owners, *cursor..l.pages, count, 1, FREE)
                .or_else(|| find_run(&l, owners, 0..l.pages, count, 1, FREE))
                .ok_or(PoolError::OutOfFrames { bytes })?;
            for owner in &owners[first..first + count] {
                owner.store(HELD, Ordering::Relaxed);
            }
            *cursor = first + count;
            s.window_pages = count as u32;
            s.lo = first as u32;
            s.hi = first as u32;
            Ok(())
        })
    }

    /// A window size for an SMMU's own structures: a sixteenth of the pool (what version 2 gave each arena), and
    /// how far a window adopted from a running SMMU may grow.
    ///
    /// # Errors
    /// [`PoolError::NotSetUp`].
    pub fn window_bytes(&self) -> Result<u64, PoolError> {
        Ok(self.layout()?.pool.len / 16)
    }

    /// Takes a memory that holds exactly the frames of `extents` (after a hand-off: a record's runs, in ascending
    /// order), so that none of them is handed out again while the adopted domain lives. The extents are read
    /// once, each checked before its frames are taken.
    ///
    /// # Errors
    /// [`PoolError::BadExtent`] for an extent that is empty, not frame-aligned, outside the pool or not after
    /// the one before; [`PoolError::InUse`] for a frame a memory, a window or the owner map holds;
    /// [`PoolError::NoFreeMemory`], [`PoolError::NotSetUp`]. Nothing is taken then.
    pub fn adopt(&'static self, extents: impl Iterator<Item = Extent>) -> Result<&'static HandoverMemory, PoolError> {
        let l = self.layout()?;
        self.claim(|s, id| {
            let owners = l.owners();
            let _cursor = self.cursor.lock();
            // Checked and taken in one pass over the extents (an iterator need not yield the same twice), each
            // extent's frames checked before any of them is taken; on a refusal the frames taken so far are named
            // again (they were free or named: named keeps them from every other memory until the records settle).
            let mut after = 0usize;
            let refuse = |e: PoolError, s: &mut MemoryState| {
                for owner in owners.get(s.lo as usize..s.hi as usize).unwrap_or_default() {
                    if owner.load(Ordering::Relaxed) == id {
                        owner.store(NAMED, Ordering::Relaxed);
                    }
                }
                Err(e)
            };
            for e in extents {
                let Some(pages) = l.pages_of(e).filter(|p| p.start >= after) else {
                    return refuse(PoolError::BadExtent(e), s);
                };
                if owners[pages.clone()]
                    .iter()
                    .any(|o| !matches!(o.load(Ordering::Relaxed), FREE | NAMED))
                {
                    return refuse(PoolError::InUse(e), s);
                }
                after = pages.end;
                for owner in &owners[pages.clone()] {
                    owner.store(id, Ordering::Relaxed);
                }
                s.hold(pages);
            }
            Ok(())
        })
    }

    /// Takes a window holding `extent` (a running SMMU's structures, recorded from its stream table): its frames
    /// as handed out, and as many free frames after it as keep the window within `bytes` (so the SMMU's structures
    /// can grow there, as they could in the previous image).
    ///
    /// # Errors
    /// As [`HandoverPool::adopt`].
    pub fn adopt_window(&'static self, extent: Extent, bytes: u64) -> Result<&'static HandoverMemory, PoolError> {
        let l = self.layout()?;
        let memory = self.adopt(core::iter::once(extent))?;
        let owners = l.owners();
        let mut s = memory.state.lock();
        let _cursor = self.cursor.lock();
        let first = s.lo as usize;
        let mut end = s.hi as usize;
        let limit = (first + bytes.div_ceil(FRAME) as usize).min(l.pages);
        while end < limit && owners[end].load(Ordering::Relaxed) == FREE {
            owners[end].store(HELD, Ordering::Relaxed);
            end += 1;
        }
        s.window_pages = (end - first) as u32;
        Ok(memory)
    }

    /// Whether [`HandoverPool::adopt`] would take `extents` now.
    pub fn adoptable(&self, extents: impl Iterator<Item = Extent>) -> bool {
        let Ok(l) = self.layout() else { return false };
        let _cursor = self.cursor.lock();
        check_adoptable(&l, extents).is_ok()
    }

    /// Marks the frames the region at `metadata` names (its records' extents, its running SMMUs' structures) that
    /// no memory holds, and only those, as named: after the records changed (a finish removed some), the frames
    /// they no longer name are free again.
    pub(crate) fn rename_recorded(&self, metadata: &[u8], scratch: &mut [u64]) {
        let Ok(l) = self.layout() else { return };
        let owners = l.owners();
        let _cursor = self.cursor.lock();
        for owner in owners {
            if owner.load(Ordering::Relaxed) == NAMED {
                owner.store(FREE, Ordering::Relaxed);
            }
        }
        name_recorded(&l, metadata, scratch);
    }

    /// Finds a memory not in use, marks it in use and empty, and runs `set` on its state and owner number (with
    /// the memory's lock held); on an error from `set` the memory is not in use again.
    fn claim(
        &'static self,
        set: impl FnOnce(&mut MemoryState, u16) -> Result<(), PoolError>,
    ) -> Result<&'static HandoverMemory, PoolError> {
        let start = self.next_memory.load(Ordering::Relaxed) % MAX_MEMORIES;
        for index in (start..MAX_MEMORIES).chain(0..start) {
            let memory = &self.memories[index];
            let mut s = memory.state.lock();
            if s.in_use {
                continue;
            }
            *s = MemoryState { in_use: true, ..UNUSED };
            memory
                .pool
                .store(self as *const HandoverPool as *mut HandoverPool, Ordering::Release);
            if let Err(e) = set(&mut s, index as u16 + 1) {
                *s = UNUSED;
                return Err(e);
            }
            self.next_memory.store(index + 1, Ordering::Relaxed);
            return Ok(memory);
        }
        Err(PoolError::NoFreeMemory)
    }

    /// The owner number of `memory` (one of this pool's).
    fn id_of(&self, memory: &HandoverMemory) -> u16 {
        let index = (memory as *const HandoverMemory as usize - self.memories.as_ptr() as usize)
            / core::mem::size_of::<HandoverMemory>();
        index as u16 + 1
    }

    /// Forgets everything a previous image left in this pool's statics (a new image entered without a reset,
    /// whose `.data` keeps the old values): not set up, every memory free.
    ///
    /// # Safety
    /// Nothing may use the pool or its memories from before.
    pub unsafe fn forget_previous_image(&self) {
        *self.layout.write() = None;
        *self.cursor.lock() = 0;
        self.next_memory.store(0, Ordering::Relaxed);
        for memory in &self.memories {
            *memory.state.lock() = UNUSED;
            memory.pool.store(core::ptr::null_mut(), Ordering::Release);
        }
    }

    /// Gives a memory back, empty (as [`HandoverMemory::release`]).
    ///
    /// # Safety
    /// As [`HandoverMemory::release`].
    pub unsafe fn release(&self, memory: &HandoverMemory) {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { memory.release() };
    }

    /// Memories in use now.
    pub fn memories_in_use(&self) -> usize {
        self.memories.iter().filter(|m| m.state.lock().in_use).count()
    }

    /// Frames of the pool free now (neither held, nor named by the region, nor the owner map's).
    pub fn free_frames(&self) -> usize {
        let Ok(l) = self.layout() else { return 0 };
        let _cursor = self.cursor.lock();
        l.owners().iter().filter(|o| o.load(Ordering::Relaxed) == FREE).count()
    }
}

/// Reads preserved extents of a pool's region (see [`HandoverPool::preserved_view`]).
#[derive(Clone, Copy)]
pub(crate) struct PreservedView(Layout);

impl PreservedView {
    /// As [`HandoverPool::preserved_words`] (the region lives as long as the program: `set_up`'s contract).
    ///
    /// # Safety
    /// As [`HandoverPool::preserved_words`], for as long as the returned slice lives.
    pub(crate) unsafe fn words<'a>(&self, extent: Extent) -> Option<&'a [u64]> {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { preserved_words(&self.0, extent) }
    }
}

/// # Safety
/// As [`HandoverPool::preserved_words`].
unsafe fn preserved_words<'a>(l: &Layout, extent: Extent) -> Option<&'a [u64]> {
    if !l.pool.contains(extent.base, extent.len) || !extent.base.is_multiple_of(8) {
        return None;
    }
    let words = usize::try_from(extent.len / 8).ok()?;
    // SAFETY: inside the region, which `set_up`'s contract maps at `virt` (8-byte aligned) for the program's
    // life; the caller guarantees that nothing writes it meanwhile.
    Some(unsafe { core::slice::from_raw_parts(l.virt_of(extent.base) as *const u64, words) })
}

/// Checks that every extent is frame-aligned, inside the pool, after the one before, and wholly free or named.
fn check_adoptable(l: &Layout, extents: impl Iterator<Item = Extent>) -> Result<(), PoolError> {
    let owners = l.owners();
    let mut after = 0usize;
    for e in extents {
        let pages = l.pages_of(e).ok_or(PoolError::BadExtent(e))?;
        if pages.start < after {
            return Err(PoolError::BadExtent(e));
        }
        after = pages.end;
        if owners[pages]
            .iter()
            .any(|o| !matches!(o.load(Ordering::Relaxed), FREE | NAMED))
        {
            return Err(PoolError::InUse(e));
        }
    }
    Ok(())
}

/// Every extent the region in `metadata` names (its records', its running SMMUs' structures), for each instance;
/// nothing for a region that does not decode.
fn recorded_extents<'a>(l: &Layout, metadata: &'a [u8], scratch: &'a mut [u64], mut each: impl FnMut(Extent)) {
    if metadata[..8] != super::format::MAGIC {
        return;
    }
    let Ok(decoded) = super::format::decode(metadata, l.pool, scratch) else {
        return;
    };
    for i in decoded.instances.iter() {
        if i.identity.core_len != 0 {
            each(Extent {
                base: i.identity.strtab_base,
                len: i.identity.core_len,
            });
        }
        for r in i.records.iter() {
            for e in r.extents.iter() {
                each(e);
            }
        }
    }
}

/// Marks every free frame the region in `metadata` names as named.
fn name_recorded(l: &Layout, metadata: &[u8], scratch: &mut [u64]) {
    let owners = l.owners();
    recorded_extents(l, metadata, scratch, |e| {
        for owner in owners.get(pages_spanned(l, e)).unwrap_or_default() {
            if owner.load(Ordering::Relaxed) == FREE {
                owner.store(NAMED, Ordering::Relaxed);
            }
        }
    });
}

/// Where the owner map goes: the end of the pool, else its start, else the first gap between the extents the
/// region names that holds it. `None` when there is no such place. The extents' pages are gathered in `buffer`
/// (the staging buffer, free at set-up) and sorted: one decode and n log n, however many records there are; a
/// region naming more extents than the buffer holds gets only the two ends tried.
fn place_map(l: &Layout, metadata: &[u8], scratch: &mut [u64], buffer: &mut [u8]) -> Option<usize> {
    let m = l.map_pages;
    let Ok(slots) = <[u64]>::mut_from_bytes(buffer) else {
        return None;
    };
    let (mut n, mut overflow) = (0usize, false);
    recorded_extents(l, metadata, scratch, |e| {
        let pages = pages_spanned(l, e);
        match slots.get_mut(n) {
            Some(slot) => *slot = (pages.start as u64) << 32 | pages.end as u64,
            None => overflow = true,
        }
        n += 1;
    });
    let kept = n.min(slots.len());
    let named = &mut slots[..kept];
    named.sort_unstable();
    let clear = |first: usize| {
        named
            .iter()
            .all(|&x| ((x >> 32) as usize) >= first + m || (x as u32 as usize) <= first)
    };
    if overflow {
        return [l.pages - m, 0].into_iter().find(|&first| {
            clear(first) && {
                let map = Extent {
                    base: l.phys_of(first),
                    len: m as u64 * FRAME,
                };
                let mut hit = false;
                recorded_extents(l, metadata, scratch, |e| hit |= e.overlaps(&map));
                !hit
            }
        });
    }
    if clear(l.pages - m) {
        return Some(l.pages - m);
    }
    // The gaps between the named ranges, in order (they may overlap one another: a running SMMU's window and
    // its records' extents are checked apart).
    let mut covered = 0usize;
    for &x in named.iter() {
        let (start, end) = ((x >> 32) as usize, x as u32 as usize);
        if start >= covered + m {
            return Some(covered);
        }
        covered = covered.max(end);
    }
    (covered + m <= l.pages).then_some(covered)
}

/// The pool pages `e` (inside the pool) touches.
fn pages_spanned(l: &Layout, e: Extent) -> core::ops::Range<usize> {
    let page = |phys: u64| (phys.saturating_sub(l.pool.base).div_ceil(FRAME) as usize).min(l.pages);
    let first = (e.base.saturating_sub(l.pool.base) / FRAME) as usize;
    first.min(l.pages)..page(e.base.saturating_add(e.len))
}

impl HandoverMemory {
    /// The pool this memory was taken from, its layout and this memory's owner number; `None` before it is taken,
    /// or once its pool is forgotten.
    fn context(&self) -> Option<(&HandoverPool, Layout, u16)> {
        let pool = self.pool.load(Ordering::Acquire);
        // SAFETY: only `HandoverPool::claim` stores a pointer here: that of the `'static` pool holding this memory.
        let pool = unsafe { pool.as_ref() }?;
        let layout = (*pool.layout.read())?;
        Some((pool, layout, pool.id_of(self)))
    }

    /// Gives the memory back to its pool, empty: every frame it holds (and every frame its window sets aside)
    /// is free again. Freeing the domain that owns the memory does this (the memory is retired).
    ///
    /// # Safety
    /// Nothing (CPU or SMMU) may access a block this memory handed out (or adopted) afterwards: everything in it
    /// was freed, or abandoned with no reference and no walk able to reach it. The pool hands the same frames out
    /// again, zeroed.
    pub unsafe fn release(&self) {
        let mut s = self.state.lock();
        if let Some((pool, l, id)) = self.context() {
            let owners = l.owners();
            let _cursor = pool.cursor.lock();
            let window = s.window().is_some();
            for owner in owners.get(s.span()).unwrap_or_default() {
                let o = owner.load(Ordering::Relaxed);
                if o == id || (o == HELD && window) {
                    owner.store(FREE, Ordering::Relaxed);
                }
            }
        }
        *s = UNUSED;
    }

    /// Gives the memory back as [`HandoverMemory::release`] does, but with every frame it held named rather than
    /// free: for frames a region still names (a refused restore's), which no other memory may take until
    /// [`HandoverPool::rename_recorded`] reads the records again.
    ///
    /// # Safety
    /// As [`HandoverMemory::release`].
    pub(crate) unsafe fn release_named(&self) {
        let mut s = self.state.lock();
        if let Some((pool, l, id)) = self.context() {
            let owners = l.owners();
            let _cursor = pool.cursor.lock();
            let window = s.window().is_some();
            for owner in owners.get(s.span()).unwrap_or_default() {
                let o = owner.load(Ordering::Relaxed);
                if o == id || (o == HELD && window) {
                    owner.store(NAMED, Ordering::Relaxed);
                }
            }
        }
        *s = UNUSED;
    }

    /// The frames this memory holds, as runs (ascending).
    pub fn runs(&self) -> impl Iterator<Item = Extent> + '_ {
        let mut from = 0;
        core::iter::from_fn(move || {
            let run = self.handover_run(from)?;
            from = run.base + run.len;
            Some(run)
        })
    }

    /// Frames this memory holds now (handed out, or adopted).
    pub fn frames(&self) -> usize {
        self.state.lock().pages as usize
    }

    fn allocate(&self, size: usize, align: usize, zero: bool) -> Result<DmaBlock, AllocError> {
        if size == 0 || !align.is_power_of_two() {
            return Err(AllocError::BadRequest { size, align });
        }
        let out = AllocError::OutOfMemory { size };
        let (pool, l, id) = self.context().ok_or(out)?;
        let count = (size as u64).div_ceil(FRAME) as usize;
        let frames_aligned = (align as u64 / FRAME).max(1) as usize;
        let first = {
            let mut s = self.state.lock();
            if s.sealed || !s.in_use {
                return Err(out);
            }
            let owners = l.owners();
            let mut cursor = pool.cursor.lock();
            let first = match s.window() {
                Some(window) => find_run(&l, owners, window, count, frames_aligned, HELD),
                None => find_run(&l, owners, *cursor..l.pages, count, frames_aligned, FREE)
                    .or_else(|| find_run(&l, owners, 0..l.pages, count, frames_aligned, FREE)),
            }
            .ok_or(out)?;
            for owner in &owners[first..first + count] {
                owner.store(id, Ordering::Relaxed);
            }
            if s.window().is_none() {
                *cursor = first + count;
            }
            s.hold(first..first + count);
            first
        };
        let phys = l.phys_of(first);
        // Every block starts a frame, aligned as asked: a table descriptor (address bits [47:12]) or a CD table
        // pointer then names exactly the block.
        debug_assert!(
            phys.is_multiple_of((align as u64).max(FRAME)),
            "{phys:#x} for alignment {align:#x}"
        );
        let virt = NonNull::new(l.virt_of(phys) as *mut u8).ok_or(out)?;
        if zero {
            // SAFETY: inside the pool, which the CPU reaches at `virt` (set_up's contract), and held by this
            // memory alone (the owner map says so) until freed.
            unsafe { virt.as_ptr().write_bytes(0, size) };
        }
        Ok(DmaBlock {
            phys: PhysAddr(phys),
            virt,
            size,
        })
    }
}

// SAFETY: blocks are runs of frames of the reserved region's pool (set up as RAM used by nothing else), each frame
// held by one memory at a time (the owner map, changed under the pool's lock); zeroed on allocation unless for
// overwrite; physical = region base + offset, reached at the matching CPU address.
unsafe impl FrameAllocator for HandoverMemory {
    fn allocate_zeroed(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError> {
        self.allocate(size, align, true)
    }

    fn allocate_for_overwrite(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError> {
        self.allocate(size, align, false)
    }

    unsafe fn free(&self, block: DmaBlock) {
        // Only a block this memory can have handed out goes back: frame-aligned, every frame of it held by this
        // memory, at the CPU address the pool maps it to. Anything else (a block misplaced by adopted memory, say
        // a CD table that did not start its frame, or a block freed twice) is leaked rather than handed out again
        // as frames it does not start, or twice. While sealed (a hand-off prepared) the frames stay held: the
        // records name them.
        let Some((pool, l, id)) = self.context() else { return };
        let phys = block.phys.0;
        let count = (block.size as u64).div_ceil(FRAME) as usize;
        let Some(first) = l.page_of(phys) else { return };
        let mut s = self.state.lock();
        if s.sealed || !phys.is_multiple_of(FRAME) || block.virt.as_ptr() as usize != l.virt_of(phys) {
            return;
        }
        let owners = l.owners();
        let _cursor = pool.cursor.lock();
        let Some(frames) = owners.get(first..first + count) else {
            return;
        };
        if frames.iter().any(|o| o.load(Ordering::Relaxed) != id) {
            return;
        }
        let back = if s.window().is_some() { HELD } else { FREE };
        for owner in frames {
            owner.store(back, Ordering::Relaxed);
        }
        s.pages -= count as u32;
    }

    fn phys_to_virt(&self, phys: PhysAddr) -> Option<NonNull<u8>> {
        let (_, l, id) = self.context()?;
        let page = l.page_of(phys.0)?;
        (l.owners()[page].load(Ordering::Relaxed) == id).then(|| NonNull::new(l.virt_of(phys.0) as *mut u8))?
    }

    fn handover_memory(&self, _: crate::mem::sealed::Token) -> Option<&dyn crate::mem::sealed::Hooks> {
        Some(self)
    }
}

/// What memory that survives a live update answers beyond allocating: the driver reaches these for any allocator
/// through `mem::MemoryHooks`, which answers for shared memory itself.
impl Hooks for HandoverMemory {
    /// The first run of frames this memory holds (has handed out, or holds for itself) that starts at or after
    /// physical address `from`. Runs come in ascending order and never touch one another, so `handover_run(0)`,
    /// then `handover_run(end of the last)`, and so on, lists them all; `None` past the last.
    fn handover_run(&self, from: u64) -> Option<Extent> {
        let (_, l, id) = self.context()?;
        let s = *self.state.lock();
        let (lo, hi) = (s.lo as usize, (s.hi as usize).min(l.pages));
        if s.window().is_some() {
            // A window is one extent from its start to the end of the last frame it handed out.
            let base = l.phys_of(lo);
            return (from <= base && hi > lo).then(|| Extent {
                base,
                len: (hi - lo) as u64 * FRAME,
            });
        }
        let owners = l.owners();
        // The first whole frame at or after `from`.
        let start = match l.page_of(from.checked_next_multiple_of(FRAME)?) {
            Some(page) => page.max(lo),
            None if from < l.pool.base => lo,
            None => return None,
        };
        let first = (start..hi).find(|&p| owners[p].load(Ordering::Relaxed) == id)?;
        let end = (first..hi)
            .find(|&p| owners[p].load(Ordering::Relaxed) != id)
            .unwrap_or(hi);
        Some(Extent {
            base: l.phys_of(first),
            len: (end - first) as u64 * FRAME,
        })
    }

    /// The domain that owned this memory alone is freed, and everything it allocated went back: the memory
    /// becomes free for another domain.
    ///
    /// # Safety
    /// Nothing (CPU or SMMU) may access a block this memory handed out afterwards.
    unsafe fn retire(&self) {
        // SAFETY: `retire`'s contract: nothing accesses what this memory handed out.
        unsafe { self.release() };
    }

    /// Claims this memory for one owner (a domain, or an SMMU's own structures): `false` when it is owned
    /// already.
    fn take_ownership(&self) -> bool {
        let mut s = self.state.lock();
        !core::mem::replace(&mut s.owned, true)
    }

    /// Undoes a successful `take_ownership`.
    fn give_up_ownership(&self) {
        self.state.lock().owned = false;
    }

    /// From now until the hand-off, hand out nothing: what is recorded must not grow after the records were
    /// written.
    fn seal(&self) {
        self.state.lock().sealed = true;
    }

    /// Undoes `seal` (the hand-off was cancelled).
    fn unseal(&self) {
        self.state.lock().sealed = false;
    }

    /// Whether `seal` is in force.
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

    fn runs(memory: &HandoverMemory) -> std::vec::Vec<Extent> {
        memory.runs().collect()
    }

    fn frame(pool: &HandoverPool, page: u64) -> u64 {
        pool.pool().unwrap().base + page * FRAME
    }

    /// Two domains growing in turn take frames from the whole pool, next to one another: each holds runs, listed
    /// in order, that never overlap the other's, and a frame freed goes back to the pool for either.
    #[test]
    fn memories_take_frames_from_the_whole_pool_and_give_them_back() {
        let (pool, region) = pool(METADATA_BYTES as usize + (1 << 20));
        assert_eq!(pool.pool().unwrap().base, region.base + METADATA_BYTES);
        let free = pool.free_frames();
        // 1 MiB: 256 frames, one of them the owner map (at the end of the pool).
        assert_eq!(free, 255);
        assert_eq!(pool.owner_map().unwrap().base, frame(pool, 255));
        let a = pool.take_memory().unwrap();
        let b = pool.take_memory().unwrap();
        let x = a.allocate_zeroed(4096, 4096).unwrap();
        let y = b.allocate_zeroed(4096, 4096).unwrap();
        let z = a.allocate_zeroed(8192, 8192).unwrap();
        assert_eq!((x.phys.0, y.phys.0), (frame(pool, 0), frame(pool, 1)));
        assert_eq!(z.phys.0 % 8192, 0);
        assert_eq!(
            runs(a),
            [
                Extent {
                    base: x.phys.0,
                    len: FRAME
                },
                Extent {
                    base: z.phys.0,
                    len: 2 * FRAME
                }
            ]
        );
        assert_eq!(
            runs(b),
            [Extent {
                base: y.phys.0,
                len: FRAME
            }]
        );
        assert_eq!(pool.free_frames(), free - 4);
        assert_eq!(a.phys_to_virt(x.phys), Some(x.virt));
        assert_eq!(a.phys_to_virt(y.phys), None, "b's frame");
        assert_eq!(b.phys_to_virt(y.phys), Some(y.virt));
        // A frame freed is the pool's again, for either memory.
        // SAFETY: nothing uses it.
        unsafe { a.free(x) };
        assert_eq!(pool.free_frames(), free - 3);
        assert_eq!(
            runs(a),
            [Extent {
                base: z.phys.0,
                len: 2 * FRAME
            }]
        );
        assert_eq!(a.phys_to_virt(PhysAddr(frame(pool, 0))), None);
        // Next fit: the frames after the last handed out first, then the freed one.
        let mut taken = std::vec::Vec::new();
        while let Ok(block) = b.allocate_zeroed(4096, 4096) {
            taken.push(block.phys.0);
        }
        assert_eq!(taken.len(), free - 3);
        assert_eq!(*taken.last().unwrap(), frame(pool, 0), "the freed frame came last");
        assert!(!taken.contains(&pool.owner_map().unwrap().base), "never the owner map");
        assert_eq!(pool.free_frames(), 0);
        assert_eq!(
            a.allocate_zeroed(4096, 4096).err(),
            Some(AllocError::OutOfMemory { size: 4096 })
        );
        // Released: every frame it held is free again.
        // SAFETY: nothing uses b's blocks.
        unsafe { pool.release(b) };
        assert_eq!(pool.free_frames(), free - 2);
        assert_eq!(pool.memories_in_use(), 1);
        assert_eq!(
            runs(a),
            [Extent {
                base: z.phys.0,
                len: 2 * FRAME
            }]
        );
    }

    /// The second line of defence behind a restore's CD-table checks: a block that does not start a frame this
    /// memory holds (a CD table adopted at the end of its frame, another memory's frame), or a frame freed twice,
    /// never goes back to the pool, so every block handed out still starts its own frame.
    #[test]
    fn only_whole_frames_this_memory_holds_go_back() {
        let (pool, _) = pool(METADATA_BYTES as usize + (1 << 20));
        let a = pool.take_memory().unwrap();
        let b = pool.take_memory().unwrap();
        let x = a.allocate_zeroed(4096, 4096).unwrap();
        let y = a.allocate_zeroed(4096, 4096).unwrap();
        let theirs = b.allocate_zeroed(4096, 4096).unwrap();
        let free = pool.free_frames();
        let misplaced = DmaBlock {
            phys: PhysAddr(x.phys.0 + 4096 - 64),
            // SAFETY: inside the block `x`.
            virt: NonNull::new(unsafe { x.virt.as_ptr().add(4096 - 64) }).unwrap(),
            size: 64,
        };
        // SAFETY: nothing uses the blocks (the misplaced one and b's are refused; `y` is freed twice on purpose).
        unsafe {
            a.free(misplaced);
            a.free(DmaBlock { ..theirs });
            a.free(DmaBlock { ..y });
            a.free(y);
        }
        assert_eq!(pool.free_frames(), free + 1, "y, once");
        assert_eq!(b.phys_to_virt(theirs.phys), Some(theirs.virt), "b's frame is still b's");
        assert_eq!(
            runs(a),
            [Extent {
                base: x.phys.0,
                len: FRAME
            }]
        );
    }

    /// While a hand-off is prepared the records name a memory's frames: a free keeps them held, and nothing is
    /// handed out.
    #[test]
    fn a_sealed_memory_keeps_its_frames() {
        let (pool, _) = pool(METADATA_BYTES as usize + (1 << 20));
        let a = pool.take_memory().unwrap();
        let x = a.allocate_zeroed(4096, 4096).unwrap();
        let before = runs(a);
        a.seal();
        assert!(a.allocate_zeroed(4096, 4096).is_err());
        // SAFETY: nothing uses it.
        unsafe { a.free(x) };
        assert_eq!(runs(a), before);
        a.unseal();
        assert!(a.allocate_zeroed(4096, 4096).is_ok());
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

    /// After a hand-off the next image adopts exactly the frames a record names: handed out to nobody while the
    /// adopted memory lives, and checked before anything is taken.
    #[test]
    fn an_adopted_memory_holds_exactly_its_extents() {
        let (pool, _) = pool(METADATA_BYTES as usize + (1 << 20));
        let a = pool.take_memory().unwrap();
        let other = pool.take_memory().unwrap();
        a.allocate_zeroed(4096, 4096).unwrap();
        other.allocate_zeroed(4096, 4096).unwrap();
        a.allocate_zeroed(3 * 4096, 4096).unwrap();
        let extents = runs(a);
        assert_eq!(extents.len(), 2);
        // The next image: the same frames, free in a fresh pool.
        // SAFETY: nothing these memories handed out is used again.
        unsafe {
            pool.release(a);
            pool.release(other);
        }
        let adopted = pool.adopt(extents.iter().copied()).unwrap();
        assert_eq!(runs(adopted), extents);
        assert_eq!(adopted.frames(), 4);
        assert!(adopted.phys_to_virt(PhysAddr(extents[1].base + 4096)).is_some());
        let fresh = adopted.allocate_zeroed(4096, 4096).unwrap();
        assert!(extents.iter().all(|e| !e.contains(fresh.phys.0, 4096)));
        assert_eq!(
            pool.adopt(extents.iter().copied()).err(),
            Some(PoolError::InUse(extents[0]))
        );
        assert!(!pool.adoptable(extents.iter().copied()));
        let p = pool.pool().unwrap();
        let free = Extent {
            base: p.base + 100 * FRAME,
            len: FRAME,
        };
        for bad in [
            Extent {
                base: free.base + 8,
                len: FRAME,
            },
            Extent {
                base: free.base,
                len: 100,
            },
            Extent {
                base: p.base + p.len,
                len: FRAME,
            },
            Extent {
                base: p.base - FRAME,
                len: FRAME,
            },
            Extent {
                base: free.base,
                len: 0,
            },
        ] {
            assert_eq!(pool.adopt(core::iter::once(bad)).err(), Some(PoolError::BadExtent(bad)));
        }
        let later = Extent {
            base: free.base + FRAME,
            len: FRAME,
        };
        assert_eq!(
            pool.adopt([later, free].into_iter()).err(),
            Some(PoolError::BadExtent(free)),
            "out of order"
        );
        let map = pool.owner_map().unwrap();
        assert_eq!(pool.adopt(core::iter::once(map)).err(), Some(PoolError::InUse(map)));
        // Nothing was taken by the refusals.
        assert_eq!(pool.memories_in_use(), 1);
        assert!(pool.adoptable(core::iter::once(free)));
    }

    /// An SMMU's own structures come from a window: one run from its start, wherever its frames are handed out
    /// and freed, that no other memory takes from.
    #[test]
    fn a_window_is_one_extent_no_other_memory_takes_from() {
        let (pool, _) = pool(METADATA_BYTES as usize + (1 << 20));
        let w = pool.take_window(16 * FRAME).unwrap();
        let start = frame(pool, 0);
        assert_eq!(w.handover_run(0), None, "nothing handed out yet");
        let a = w.allocate_zeroed(8192, 8192).unwrap();
        let b = w.allocate_zeroed(4096, 4096).unwrap();
        assert_eq!(a.phys.0, start);
        assert_eq!(
            w.handover_run(0),
            Some(Extent {
                base: start,
                len: 3 * FRAME
            })
        );
        assert_eq!(w.handover_run(start + 1), None, "one extent, from the start");
        // SAFETY: nothing uses it.
        unsafe { w.free(a) };
        assert_eq!(
            w.handover_run(0),
            Some(Extent {
                base: start,
                len: 3 * FRAME
            }),
            "still from the start"
        );
        let d = pool.take_memory().unwrap();
        let outside = d.allocate_zeroed(4096, 4096).unwrap();
        assert_eq!(outside.phys.0, frame(pool, 16), "never a frame of the window");
        assert_eq!(
            w.allocate_zeroed(4096, 4096).unwrap().phys.0,
            start,
            "the window's freed frame"
        );
        let rest = w.allocate_zeroed(13 * 4096, 4096).unwrap();
        assert_eq!(rest.phys.0, b.phys.0 + FRAME);
        assert_eq!(
            w.allocate_zeroed(4096, 4096).unwrap().phys.0,
            start + FRAME,
            "its last frame"
        );
        assert!(w.allocate_zeroed(4096, 4096).is_err(), "the window is full");
        assert_eq!(
            w.handover_run(0),
            Some(Extent {
                base: start,
                len: 16 * FRAME
            })
        );
        assert_eq!(
            pool.take_window(1 << 20).err(),
            Some(PoolError::OutOfFrames { bytes: 1 << 20 })
        );
        let free = pool.free_frames();
        // SAFETY: nothing uses the window's blocks.
        unsafe { pool.release(w) };
        assert_eq!(pool.free_frames(), free + 16);
    }

    #[test]
    fn memories_run_out_clearly() {
        let (pool, _) = pool(METADATA_BYTES as usize + (1 << 20));
        for _ in 0..MAX_MEMORIES {
            pool.take_memory().unwrap();
        }
        assert_eq!(pool.take_memory().err(), Some(PoolError::NoFreeMemory));
        assert_eq!(pool.memories_in_use(), MAX_MEMORIES);
    }

    /// `adopt` reads its extents once, checking each before taking it: an iterator that would not yield the same
    /// extents twice (a safe `from_fn` over a shared `Cell`) cannot make the adopted memory take a frame another
    /// memory holds, or the owner map's.
    #[test]
    fn adopt_stores_only_what_it_checked() {
        use core::cell::Cell;
        let (pool, _) = pool(METADATA_BYTES as usize + (1 << 20));
        let b = pool.take_memory().unwrap();
        let theirs = b.allocate_zeroed(4096, 4096).unwrap();
        let theirs_extent = Extent {
            base: theirs.phys.0,
            len: FRAME,
        };
        let free = Extent {
            base: frame(pool, 100),
            len: FRAME,
        };
        assert!(pool.adoptable(core::iter::once(free)));
        let passes = Cell::new(0u32);
        let extents = {
            let passes = &passes;
            let mut done = false;
            core::iter::from_fn(move || {
                if done {
                    return None;
                }
                done = true;
                let n = passes.get();
                passes.set(n + 1);
                // The check sees a free frame; the store, b's.
                Some(if n == 0 { free } else { theirs_extent })
            })
        };
        let adopted = pool.adopt(extents);
        let adopted = match adopted {
            Err(_) => return, // refused: sound
            Ok(m) => m,
        };
        // b still holds its frame, and it still has one owner.
        assert_eq!(
            b.phys_to_virt(theirs.phys),
            Some(theirs.virt),
            "b's frame was taken by the adopted memory"
        );
        assert_eq!(
            adopted.phys_to_virt(theirs.phys),
            None,
            "the adopted memory holds b's frame"
        );
    }

    /// The same with the owner map: were it adopted, its frame would be free once the adopted memory is released,
    /// and the next allocation would hand it out (and zero the owner map).
    #[test]
    fn adopt_never_takes_the_owner_map() {
        use core::cell::Cell;
        let (pool, _) = pool(METADATA_BYTES as usize + (1 << 20));
        let map = pool.owner_map().unwrap();
        let free = Extent {
            base: frame(pool, 100),
            len: FRAME,
        };
        let passes = Cell::new(0u32);
        let extents = {
            let passes = &passes;
            let mut done = false;
            core::iter::from_fn(move || {
                if done {
                    return None;
                }
                done = true;
                let n = passes.get();
                passes.set(n + 1);
                Some(if n == 0 { free } else { map })
            })
        };
        if let Ok(adopted) = pool.adopt(extents) {
            // SAFETY: nothing uses what it holds.
            unsafe { pool.release(adopted) };
        }
        let m = pool.take_memory().unwrap();
        let mut handed = std::vec::Vec::new();
        while let Ok(block) = m.allocate_for_overwrite(4096, 4096) {
            handed.push(block.phys.0);
            if handed.len() > 300 {
                break;
            }
        }
        assert!(!handed.contains(&map.base), "the owner map's frame was handed out");
    }

    /// `Entries::from_runs` counts the runs once and reads them again as iterated: when the memory changes in
    /// between (as it may for `Iommu::handover_records`, whose domains are unlocked once it returns), the entries
    /// iterated are never more than counted.
    #[test]
    fn live_runs_never_yield_more_than_they_counted() {
        let (pool, _) = pool(METADATA_BYTES as usize + (1 << 20));
        let a = pool.take_memory().unwrap();
        let b = pool.take_memory().unwrap();
        let x = a.allocate_zeroed(4096, 4096).unwrap();
        let _y = b.allocate_zeroed(4096, 4096).unwrap();
        let _z = a.allocate_zeroed(4096, 4096).unwrap();
        let entries: crate::handover::Entries<'_, Extent> = crate::handover::Entries::from_runs(a);
        assert_eq!(entries.len(), 2);
        // SAFETY: nothing uses it.
        unsafe { a.free(x) };
        // Read from the memory as iterated: never more than counted (the encoder writes exactly the count, and
        // zeroes a slot the memory no longer fills, which no decode accepts); counted afresh, the runs as they are.
        assert!(entries.iter().count() <= entries.len());
        assert_eq!(crate::handover::Entries::<'_, Extent>::from_runs(a).len(), 1);
    }

    /// `handover_run(from)` gives the first run that starts at or after `from`, even inside a frame.
    #[test]
    fn handover_run_starts_at_or_after_from() {
        let (pool, _) = pool(METADATA_BYTES as usize + (1 << 20));
        let a = pool.take_memory().unwrap();
        let x = a.allocate_zeroed(2 * 4096, 4096).unwrap();
        let from = x.phys.0 + 8;
        if let Some(run) = a.handover_run(from) {
            assert!(run.base >= from, "run {:#x} starts before from {from:#x}", run.base);
        }
    }
}

#[cfg(test)]
mod placement {
    extern crate std;

    use super::*;
    use crate::handover::format::sample::{self, POOL, REGION, Rng};
    use std::vec;
    use std::vec::Vec;
    use zerocopy::IntoBytes;

    /// The owner map goes where no extent of the region points (the end, the start, or a gap between them), and
    /// only when no gap that long exists is there none: against a brute-force search, over random valid regions
    /// whose named extents are made to reach both ends of the pool.
    #[test]
    fn the_owner_map_goes_where_no_record_points() {
        let mut rng = Rng::new(0x6f77_6e65_726d_6170);
        let mut placed_inside = 0;
        for _ in 0..300 {
            let instances = sample::instances(&mut rng, 8);
            let mut instances = instances;
            // A record naming the pool's last frames too (as a version-2 region's last arena would): both ends of
            // the pool are then named (the samples start at its base).
            let tail = 1 + rng.below(16);
            let Some(r) = instances
                .iter_mut()
                .flat_map(|i| i.records.iter_mut())
                .find(|r| !r.extents.is_empty())
            else {
                continue;
            };
            r.extents.push(Extent {
                base: POOL.base + POOL.len - tail * FRAME,
                len: tail * FRAME,
            });
            let mut metadata = vec![0u8; 1 << 20];
            let Ok(len) = sample::encode_owned(&instances, 1, REGION, POOL, &mut metadata) else {
                continue;
            };
            let mut named: Vec<Extent> = Vec::new();
            let decoded = sample::decode(&metadata[..len], POOL).unwrap();
            for i in decoded.instances.iter() {
                named.extend(i.records.iter().flat_map(|r| r.extents.iter().collect::<Vec<_>>()));
            }
            let pages = (POOL.len / FRAME) as usize;
            // Maps as long as the gaps the samples leave (a few frames to a few MiB).
            let scale = rng.below(12);
            let map_pages = 1 + rng.below(1 << scale) as usize;
            if pages <= map_pages {
                continue;
            }
            let l = Layout {
                region: REGION,
                virt: 0x1000,
                metadata: METADATA_BYTES,
                workspace: None,
                pool: Extent {
                    base: POOL.base,
                    len: pages as u64 * FRAME,
                },
                pages,
                map_first: 0,
                map_pages,
            };
            let mut scratch = vec![0u64; crate::handover::format::scratch_words(metadata.len())];
            let mut staging = vec![0u64; METADATA_BYTES as usize / 8];
            let found = place_map(&l, &metadata, &mut scratch, staging.as_mut_bytes());
            let clear = |first: usize| {
                let map = Extent {
                    base: l.phys_of(first),
                    len: map_pages as u64 * FRAME,
                };
                named.iter().all(|e| !e.overlaps(&map))
            };
            let any = (0..=pages - map_pages).find(|&c| clear(c));
            match found {
                Some(first) => {
                    assert!(
                        first + map_pages <= pages && clear(first),
                        "{first} over a named extent"
                    );
                    placed_inside += usize::from(first != 0 && first != pages - map_pages);
                }
                None => assert_eq!(any, None, "a gap was missed"),
            }
        }
        assert!(placed_inside > 10, "the gaps are exercised: {placed_inside}");
    }
}
