//! IO page tables in the VMSAv8-64 format the SMMU walks: stage 1 (VA → IPA/PA, for CDs; the NS-EL1 regime, or
//! the EL2 regime with [`Stage::OneEl2`]) and stage 2 (IPA → PA, for STEs), 4 KiB, 16 KiB or 64 KiB granules, the
//! largest naturally aligned blocks, tables from the caller's [`FrameAllocator`], and invalidation gathered for
//! the command queue.
//!
//! The SMMU may walk a table at any moment: descriptors are written with single 64-bit stores, a new table's
//! contents before the descriptor that points to it.
//!
//! **The single-page path** (Linux's `dma_map_page` / `dma_unmap_page`). [`IoPageTable::map`] and
//! [`IoPageTable::unmap`] of exactly one granule descend once from the root: the leaf slot itself is the overlap
//! check, the leaf is built from one template, and no range planning or boundary walk runs. Only a block met on
//! the way sends an unmap to the range path (which splits or refuses it); a map allocates the missing tables (one
//! per level at most) before writing anything.
//!
//! **Live-entry counts.** Every table descriptor carries the number of valid entries of the table it names, in
//! bits the walk ignores (\[11:2\] and \[55:52\], [`desc::count`]), so "is this table empty / full" never
//! scans a table. [`desc::SW_TABLE_FULL`] is set exactly when a last-level table's count is its size. The counts
//! live in the tables' own memory: tables preserved across a live update keep them (and their trim marks), so an
//! adopting image trusts them as they are; the one in-memory number, how many emptied tables wait for a trim, is
//! rebuilt by [`IoPageTable::recount`] when the table is adopted, which also rebuilds every count, full bit and
//! mark from the entries (one read of each table) for tables written by other code. Changing a count rewrites
//! only ignored bits of a live descriptor: one 64-bit store, no cache maintenance, no barrier.
//!
//! **Lazy freeing.** A last-level table that a single-page unmap empties stays linked (a later map there reuses
//! it) and its descriptor, with its ancestors', is marked ([`desc::SW_TRIM_CANDIDATE`]). [`IoPageTable::trim`],
//! and every range unmap, unlink the marked tables still empty (and the tables above them that empty in turn)
//! into the [`Gather`], to be freed by [`IoPageTable::release`] after the invalidation, like any unlinked table.
//! A single-page unmap trims by itself, into its own gather, when more than the lazy-free limit
//! ([`IoPageTable::set_lazy_free_limit`], default [`DEFAULT_LAZY_FREE_LIMIT`]) are waiting
//! ([`IoPageTable::trim_due`]). [`IoPageTable::unmap_without_trim`] never trims, for a gather whose invalidation
//! is deferred: its caller trims into a gather of its own and flushes that at once (the domain's `unmap_deferred`
//! does), so a deferred gather never holds tables a trim unlinked far from its range. **Memory bound:** at
//! any moment the tables in use are at most those the live mappings need, plus `limit` emptied last-level tables
//! and the tables above them that only they keep alive: at most `limit × (levels below the root)` extra frames
//! (4 KiB granule, limit 512: at most 2 MiB of emptied last-level tables, plus their ancestors); after a trim
//! (and its flush and release), none.
//!
//! **Ordering the caller provides.** The page-table code issues at most these barriers: one DMB OSHST between a
//! new table's contents and the descriptor that links it, and one at the end of `map` (new translations are
//! visible before the caller starts a DMA through them). `unmap`, `protect` and `trim` end without a barrier: the
//! caller's invalidation must order their descriptor stores before the command queue's PROD write, which the
//! command queue does (DMB OSHST before every PROD write; `ActiveSmmu::flush`). For a coherent SMMU that single
//! barrier is all an unmap needs; for a non-coherent one each store is also cleaned to the point of coherency
//! (with its DSB) as it is made.
//!
//! **Who invalidates.** This module never issues a command. [`IoPageTable::unmap`] and [`IoPageTable::protect`]
//! add what they removed or changed to a [`Gather`]; the caller must issue the TLB invalidation it describes
//! (leaf-only unless [`Gather::tables_unlinked`], walk caches too then) and wait for its CMD_SYNC
//! (`ActiveSmmu::flush` does both, then calls [`IoPageTable::release`]). Until then the SMMU may still use the
//! old translations. A table that an unmap empties (or that a range unmap removes whole, **with its leaves left
//! in place**: clearing them would cost a write per entry) or that a trim finds empty is unlinked and handed to
//! the [`Gather`], and goes back to the allocator only through [`IoPageTable::release`] (an `unsafe fn`: its
//! caller vouches for that invalidation), after that invalidation has completed; if it fails, do not release the
//! gather (leak it) rather than free tables the SMMU may still walk. A gather is stamped with the [`TableId`] of
//! the table that filled it, and every other table refuses it.
//!
//! **What an unflushed gather allows.** [`IoPageTable::map`] only fills invalid entries, which needs no
//! invalidation, except over the span of a gather not flushed yet: there the TLB may still hold the old
//! translations and a walk cache may still name an unlinked table, whose leaves (after a range unmap) still
//! hold the old output addresses, so a DMA meant for a new mapping there could reach the old memory. Do not map
//! over an unflushed gather's span ([`Gather::start`]..[`Gather::end`]: the domain API refuses it), nor reuse the
//! memory it unmapped, until its flush has completed. Everything else is allowed.
//!
//! **What a failed operation leaves.** Nothing: every error is returned before the first store. `map`
//! allocates all the tables it needs first, and gives them back on [`MapError::NoMemory`]; `unmap` and
//! `protect` allocate the tables a block split needs first, and check every refusal
//! ([`MapError::WouldSplitBlock`], a memory-type change) before changing anything.
//!
//! **Block splitting.** A block that an unmap or protect cuts is replaced in place by a table only on an SMMU
//! with IDR3.BBML = 2 ([`IoPageTable::set_bbm_level`]); otherwise (the default) the request is refused with
//! [`MapError::WouldSplitBlock`]. The BBML = 1 nT sequence is not implemented.
//!
//! **Memory types.** [`Prot::CACHEABLE`]: Normal write-back; [`Prot::MMIO`]: Device-nGnRE; neither: Normal
//! non-cacheable (stage 1 through [`desc::MAIR`], which the CD must program; stage 2 MemAttr 0b0101). A live
//! mapping's memory type never changes in place (break-before-make: unmap, invalidate, map).

pub mod desc;

use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

pub use self::desc::{MemoryType, Prot, Stage};
pub use crate::hw::command::Granule;
use crate::mem::{AllocError, Coherency, DmaBlock, FrameAllocator, PhysAddr, write_barrier};

/// The shape of a table: stage, granule, and the input and output sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Format {
    /// Stage 1 or 2.
    pub stage: Stage,
    /// Translation granule.
    pub granule: Granule,
    /// Input address bits (VA for stage 1, IPA for stage 2): 25..=48.
    pub input_bits: u8,
    /// Output address bits (at most the SMMU's OAS, at most 48 here).
    pub output_bits: u8,
}

/// Where a table's walk starts, as the architecture derives it from the format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the granule.
    pub granule_bits: u8,
    /// Address bits resolved per level below the root (granule_bits - 3).
    pub level_bits: u8,
    /// The level of the root table (0..=3).
    pub start_level: u8,
    /// Entries of the root table (more than one granule's worth when stage-2 root tables are concatenated).
    pub root_entries: usize,
}

impl Geometry {
    /// The geometry of `format`: the fewest levels, and for stage 2 up to 16 concatenated root tables instead of
    /// a level that would resolve 4 bits or fewer (where the starting level stays encodable in STE.S2SL0).
    ///
    /// # Errors
    /// [`MapError::BadFormat`] for input or output sizes outside 25..=48 (output 32..=48) bits, or a stage-2
    /// input wider than the output.
    pub fn of(format: &Format) -> Result<Self, MapError> {
        let g = format.granule.log2();
        let s = g - 3;
        // Stage 2's input (IPA) cannot exceed the output size (IAS = OAS for AArch64 tables).
        let ipa_too_wide = format.stage == Stage::Two && format.input_bits > format.output_bits;
        if !(25..=48).contains(&format.input_bits) || !(32..=48).contains(&format.output_bits) || ipa_too_wide {
            return Err(MapError::BadFormat {
                input_bits: format.input_bits,
                output_bits: format.output_bits,
            });
        }
        let span = format.input_bits - g;
        let levels = span.div_ceil(s);
        let mut start = 4 - levels;
        let mut root_bits = span - s * (levels - 1);
        let lowest_start = if format.granule == Granule::Size4K { 2 } else { 3 };
        if format.stage == Stage::Two && root_bits <= 4 && start < lowest_start {
            start += 1;
            root_bits += s;
        }
        Ok(Geometry {
            granule_bits: g,
            level_bits: s,
            start_level: start,
            root_entries: 1 << root_bits,
        })
    }

    /// log2 of the bytes one entry at `level` maps.
    pub fn entry_shift(&self, level: u8) -> u8 {
        self.granule_bits + self.level_bits * (3 - level)
    }

    fn entries(&self, level: u8) -> usize {
        if level == self.start_level {
            self.root_entries
        } else {
            1 << self.level_bits
        }
    }

    fn index(&self, level: u8, address: u64) -> usize {
        ((address >> self.entry_shift(level)) as usize) & (self.entries(level) - 1)
    }

    /// Whether a block (not a page) may be written at `level` with this granule (4 KiB: 1 GiB and 2 MiB blocks;
    /// 16 KiB: 32 MiB; 64 KiB: 512 MiB; larger blocks need 52-bit addressing, which this driver does not use).
    pub fn block_allowed(&self, level: u8) -> bool {
        match self.granule_bits {
            12 => level == 1 || level == 2,
            _ => level == 2,
        }
    }

    /// STE.S2SL0 for this starting level (stage 2).
    pub fn s2_sl0(&self) -> u8 {
        match self.granule_bits {
            12 => 2 - self.start_level,
            _ => 3 - self.start_level,
        }
    }
}

/// Why a page-table operation was refused. Nothing changed when one is returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// The format's sizes are outside what this driver builds.
    BadFormat {
        /// Input bits asked for.
        input_bits: u8,
        /// Output bits asked for.
        output_bits: u8,
    },
    /// The input address or the size is not a multiple of the granule, or the size is zero.
    Unaligned {
        /// The IOVA.
        iova: u64,
        /// The size.
        size: u64,
    },
    /// The output (physical) address is not a multiple of the granule.
    UnalignedOutput {
        /// The physical address.
        pa: u64,
        /// The size.
        size: u64,
    },
    /// The range does not fit the input address space.
    InputOutOfRange {
        /// The IOVA.
        iova: u64,
        /// The size.
        size: u64,
    },
    /// The output range does not fit the output size.
    OutputOutOfRange {
        /// The physical address.
        pa: u64,
        /// The size.
        size: u64,
    },
    /// The protection cannot be expressed (stage 1 without READ; neither READ nor WRITE at stage 2; PRIVILEGED at
    /// stage 2 or in the EL2 regime; MMIO together with CACHEABLE), or, from [`IoPageTable::protect`], it would
    /// change the memory type of a live mapping (that needs break-before-make: unmap, invalidate, map again).
    BadProt(Prot),
    /// Part of the range is already mapped.
    Overlap {
        /// The first mapped IOVA met.
        iova: u64,
    },
    /// No memory for a table.
    NoMemory(AllocError),
    /// A root table to adopt is misaligned or not (wholly) inside memory the allocator reaches, or a table below
    /// it to recount is not inside that memory.
    NotAdoptable(PhysAddr),
    /// The range cuts a block mapping, and splitting it in place is not allowed: replacing a valid block by a table
    /// in one store is legal only on an SMMU with IDR3.BBML = 2 (see [`IoPageTable::set_bbm_level`]). Below that
    /// the architecture needs break-before-make (or, with BBML = 1, the nT sequence, not implemented here): unmap
    /// the whole block, invalidate, and map the parts to keep.
    WouldSplitBlock {
        /// An address where the range cuts a block.
        iova: u64,
    },
    /// The [`Gather`] was filled by another page table: its contents are that table's to invalidate and release.
    ForeignGather {
        /// The table that filled the gather.
        owner: TableId,
        /// The table it was handed to.
        table: TableId,
    },
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapError::BadFormat {
                input_bits,
                output_bits,
            } => {
                write!(
                    f,
                    "unsupported table format: {input_bits}-bit input, {output_bits}-bit output"
                )
            }
            MapError::Unaligned { iova, size } => {
                write!(f, "range {iova:#x}+{size:#x} is empty or not aligned to the granule")
            }
            MapError::UnalignedOutput { pa, size } => {
                write!(f, "output {pa:#x}+{size:#x} is not aligned to the granule")
            }
            MapError::InputOutOfRange { iova, size } => {
                write!(f, "range {iova:#x}+{size:#x} is beyond the input address space")
            }
            MapError::OutputOutOfRange { pa, size } => {
                write!(f, "output {pa:#x}+{size:#x} is beyond the output address size")
            }
            MapError::BadProt(p) => write!(f, "protection {p:?} cannot be expressed"),
            MapError::Overlap { iova } => write!(f, "{iova:#x} is already mapped"),
            MapError::NoMemory(e) => write!(f, "page table: {e}"),
            MapError::NotAdoptable(table) => write!(
                f,
                "the table at {table} cannot be adopted (misaligned, or outside the allocator's memory)"
            ),
            MapError::WouldSplitBlock { iova } => {
                write!(
                    f,
                    "{iova:#x} cuts a block mapping, and splitting it in place needs IDR3.BBML = 2"
                )
            }
            MapError::ForeignGather { owner, table } => {
                write!(f, "a gather filled by {owner} was handed to {table}")
            }
        }
    }
}

/// The identity of an [`IoPageTable`], unique among every table created or adopted since the program started
/// (a global counter, never reused), so that a [`Gather`] names the one table whose unlinked tables it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TableId(u64);

impl TableId {
    /// The next identity. A 64-bit counter: at one table a nanosecond it would take 584 years to wrap, so it
    /// never hands out an identity twice. 0 is never handed out (it marks a gather no table has used yet).
    fn next() -> TableId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        // Relaxed: only the uniqueness of the values matters, which the atomic read-modify-write gives.
        TableId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "page table #{}", self.0)
    }
}

/// A [`Gather`] refused by a page table other than the one that filled it ([`IoPageTable::release`],
/// [`IoPageTable::merge`]). Nothing changed: the gather comes back whole, still owing its invalidation, and its
/// tables stay unfreed.
#[derive(Debug)]
pub struct ForeignGather {
    /// The table that refused it.
    pub table: TableId,
    /// The gather, unchanged.
    pub gather: Gather,
}

impl fmt::Display for ForeignGather {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.gather.owner() {
            Some(owner) => write!(f, "a gather filled by {owner} was handed to {}", self.table),
            None => write!(f, "a gather was handed to {}", self.table),
        }
    }
}

/// One mapping found by [`IoPageTable::walk`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Input address.
    pub iova: u64,
    /// Output address.
    pub pa: u64,
    /// Bytes (a page or a block).
    pub size: u64,
    /// Its protection.
    pub prot: Prot,
}

/// What an unmap (or any change that removes translations) leaves for the caller to invalidate, and the tables
/// that may be freed once that invalidation has completed.
///
/// A gather cannot be forged: its fields are private, only [`IoPageTable::unmap`], [`IoPageTable::protect`] and
/// [`IoPageTable::trim`] fill it, and the first of them to use it stamps it with its table's [`TableId`]. From
/// then on every other table refuses it ([`MapError::ForeignGather`], [`ForeignGather`]), so one table's unlinked
/// tables never go back through another's [`IoPageTable::release`], and no range or flag can be edited to
/// skip the invalidation that must come before they are freed:
///
/// ```compile_fail
/// let mut gather = smmuv3::pgtable::Gather::default();
/// // Private: a gather cannot be told that no table was unlinked, or that it covers nothing.
/// gather.tables_unlinked = false;
/// gather.end = gather.start;
/// ```
///
/// What it holds is read through its accessors:
///
/// ```
/// let gather = smmuv3::pgtable::Gather::default();
/// assert!(gather.is_empty() && gather.owner().is_none());
/// assert_eq!((gather.start(), gather.end(), gather.leaves(), gather.tables_unlinked()), (0, 0, 0, false));
/// ```
#[derive(Debug, Default)]
pub struct Gather {
    /// The lowest input address whose translation was removed.
    start: u64,
    /// One past the highest.
    end: u64,
    /// Leaf descriptors cleared.
    leaves: u32,
    /// The smallest leaf size cleared (log2), for the invalidation's granule and level hint.
    leaf_shift: u8,
    /// Tables were unlinked: the invalidation must cover walk caches too (not leaf-only).
    tables_unlinked: bool,
    /// Unlinked tables, chained through a word of each (a granule-aligned physical address tagged with
    /// [`LINK_PRESENT`], and with [`LINK_SUBTREE`] for a level-2 table that goes with its last-level tables; 0 ends
    /// the chain; never a valid descriptor should the SMMU still walk the table before the invalidation).
    freed_head: u64,
    freed: u32,
    /// The [`TableId`] of the table that used the gather first; 0 until then.
    owner: u64,
    /// A number the owner's caller inside the crate may keep with the gather: the domain layer records in which
    /// of its epochs it counted the gather as a pending deferred unmap (0: not counted). Epochs only grow.
    pub(crate) ticket: u64,
    /// How many gathers counted in epoch `ticket` this one stands for: 1 when counted, more once others counted
    /// in the same epoch were merged into it ([`IoPageTable::merge`]), so that syncing it uncounts them all.
    pub(crate) counted: u32,
}

impl Gather {
    /// Whether nothing needs invalidating.
    pub fn is_empty(&self) -> bool {
        self.end == self.start && !self.tables_unlinked
    }

    /// The lowest input address to invalidate.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// One past the highest input address to invalidate.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Bytes of input address space to invalidate.
    pub fn size(&self) -> u64 {
        self.end - self.start
    }

    /// Leaf descriptors removed or changed.
    pub fn leaves(&self) -> u32 {
        self.leaves
    }

    /// The smallest leaf size removed or changed (log2), for the invalidation's granule and level hint.
    pub fn leaf_shift(&self) -> u8 {
        self.leaf_shift
    }

    /// Whether tables were unlinked: the invalidation must then cover walk caches too (not leaf-only).
    pub fn tables_unlinked(&self) -> bool {
        self.tables_unlinked
    }

    /// Tables waiting for [`IoPageTable::release`].
    pub fn freed_tables(&self) -> u32 {
        self.freed
    }

    /// The table that filled the gather, `None` before any table used it.
    pub fn owner(&self) -> Option<TableId> {
        (self.owner != 0).then_some(TableId(self.owner))
    }

    #[inline]
    fn add(&mut self, iova: u64, size: u64, shift: u8) {
        self.add_run(iova, iova + size, shift, 1);
    }

    /// `leaves` leaves of `1 << shift` bytes each, together spanning `[start, end)`.
    #[inline]
    fn add_run(&mut self, start: u64, end: u64, shift: u8, leaves: u32) {
        if self.end == self.start {
            (self.start, self.end, self.leaf_shift) = (start, end, shift);
        } else {
            self.start = self.start.min(start);
            self.end = self.end.max(end);
            self.leaf_shift = self.leaf_shift.min(shift);
        }
        self.leaves += leaves;
    }
}

/// Tag (bit 1) of a link in [`Gather`]'s chain of unlinked tables: the table is a level-2 table whose last-level
/// tables, still named by its descriptors, go with it. That link's successor is stored in the first word of its
/// first last-level table when entry 0 names one (so the level-2 table keeps every pointer to its children), else
/// in the level-2 table's own first word. Bit 0 stays clear: a link is never a valid descriptor.
const LINK_SUBTREE: u64 = 1 << 1;

/// Tag (bit 2) of every link in [`Gather`]'s chain: a table may sit at physical address 0, so the address alone
/// cannot tell a link from the chain's end (0).
const LINK_PRESENT: u64 = 1 << 2;

/// Frames `map` allocated before writing anything, chained through their first two words (the next frame's
/// physical and CPU addresses), one chain of zeroed frames and one of frames to be overwritten whole.
#[derive(Default)]
struct Pool {
    zeroed: Option<DmaBlock>,
    overwrite: Option<DmaBlock>,
}

impl Pool {
    fn push(&mut self, table: DmaBlock, full: bool) {
        let head = if full { &mut self.overwrite } else { &mut self.zeroed };
        let link = entries_of(table.virt, 2);
        let (phys, virt) = head
            .take()
            .map_or((0, 0), |next| (next.phys.0, next.virt.as_ptr() as u64));
        link[0].store(phys, Ordering::Relaxed);
        link[1].store(virt, Ordering::Relaxed);
        *head = Some(table);
    }

    /// The next frame, its link words zeroed again.
    fn pop(&mut self, full: bool) -> Option<DmaBlock> {
        let head = if full { &mut self.overwrite } else { &mut self.zeroed };
        let table = head.take()?;
        let link = entries_of(table.virt, 2);
        // Plain loads and stores: a swap is a locked read-modify-write on x86 (it drains the store buffer full of
        // the previous table's entries) and an exclusive pair or LDADD-class atomic on Arm, and nothing else can
        // touch a frame on this chain.
        let (phys, virt) = (link[0].load(Ordering::Relaxed), link[1].load(Ordering::Relaxed));
        link[0].store(0, Ordering::Relaxed);
        link[1].store(0, Ordering::Relaxed);
        *head = NonNull::new(virt as *mut u8).map(|virt| DmaBlock {
            phys: PhysAddr(phys),
            virt,
            size: table.size,
        });
        Some(table)
    }
}

/// An IO page table.
pub struct IoPageTable<A: FrameAllocator> {
    /// This table's identity, stamped on the gathers it fills.
    id: TableId,
    format: Format,
    geometry: Geometry,
    root: DmaBlock,
    allocator: A,
    coherency: Coherency,
    tables: u32,
    split_blocks: bool,
    /// Linked tables whose count is zero, waiting for a trim: last-level tables emptied by the single-page unmap,
    /// and any table `recount` found empty (other code may leave an empty table at any level).
    empty: u32,
    /// How many of those may stay linked before the single-page unmap trims (see `set_lazy_free_limit`).
    lazy_limit: u32,
    /// The protection of the last single-page map (checked expressible) and its page descriptor template, so that
    /// repeated maps with one protection neither re-check nor re-encode it. Starts as `None`, which no protection
    /// equals, so the first map takes the checked path (any `Prot` value, `Prot::empty()` included, may be asked
    /// for, so none can serve as the "nothing checked yet" mark).
    last_prot: Option<Prot>,
    last_template: u64,
}

/// What [`IoPageTable::adopt`] takes from a record instead of walking the tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdoptedCounts {
    /// Tables in use, the root included ([`IoPageTable::tables`]).
    pub tables: u32,
    /// Emptied last-level tables waiting for a trim ([`IoPageTable::empty_tables`]).
    pub empty: u32,
}

/// The default of [`IoPageTable::set_lazy_free_limit`]: one level-2 table's worth of 4 KiB last-level tables.
pub const DEFAULT_LAZY_FREE_LIMIT: u32 = 512;

/// A table's entries.
fn entries_of<'a>(virt: NonNull<u8>, count: usize) -> &'a [AtomicU64] {
    // SAFETY: callers pass a live, 8-byte aligned table of `count` entries owned by this page table; the SMMU and
    // the CPU access it only through single-copy-atomic 64-bit accesses.
    unsafe { core::slice::from_raw_parts(virt.as_ptr().cast(), count) }
}

impl<A: FrameAllocator> IoPageTable<A> {
    /// An empty table of `format`, its root from `allocator`.
    ///
    /// # Errors
    /// [`MapError::BadFormat`], [`MapError::NoMemory`].
    pub fn new(format: Format, allocator: A, coherent: bool) -> Result<Self, MapError> {
        let geometry = Geometry::of(&format)?;
        let size = (geometry.root_entries * 8).max(1 << geometry.granule_bits);
        let root = allocator.allocate_zeroed(size, size).map_err(MapError::NoMemory)?;
        let coherency = Coherency { coherent };
        coherency.clean(root.virt.as_ptr(), root.size);
        Ok(IoPageTable {
            id: TableId::next(),
            format,
            geometry,
            root,
            allocator,
            coherency,
            tables: 1,
            split_blocks: false,
            empty: 0,
            lazy_limit: DEFAULT_LAZY_FREE_LIMIT,
            last_prot: None,
            last_template: 0,
        })
    }

    /// Adopts, in place, the table of `format` whose root a previous image left at `root` (a live update): nothing
    /// is copied or written. With `counts` (the numbers the previous image recorded: [`IoPageTable::tables`] and
    /// [`IoPageTable::empty_tables`]) nothing is read either, since every table's live-entry count travels in its
    /// descriptor; without them the tables are walked once ([`IoPageTable::recount`]) to rebuild them.
    ///
    /// # Errors
    /// [`MapError::BadFormat`]; [`MapError::NotAdoptable`] when `allocator` does not reach the whole root table
    /// (or, without `counts`, a table below it).
    pub fn adopt(
        format: Format,
        root: PhysAddr,
        allocator: A,
        coherent: bool,
        counts: Option<AdoptedCounts>,
    ) -> Result<Self, MapError> {
        let geometry = Geometry::of(&format)?;
        let size = (geometry.root_entries * 8).max(1 << geometry.granule_bits);
        let aligned = root.0.is_multiple_of(size as u64);
        let virt = allocator
            .phys_to_virt(root)
            .filter(|_| aligned && allocator.phys_to_virt(PhysAddr(root.0 + size as u64 - 1)).is_some())
            .ok_or(MapError::NotAdoptable(root))?;
        let mut table = IoPageTable {
            id: TableId::next(),
            format,
            geometry,
            root: DmaBlock { phys: root, virt, size },
            allocator,
            coherency: Coherency { coherent },
            tables: 1,
            split_blocks: false,
            empty: 0,
            lazy_limit: DEFAULT_LAZY_FREE_LIMIT,
            last_prot: None,
            last_template: 0,
        };
        match counts {
            Some(c) => {
                table.tables = c.tables.max(1);
                table.empty = c.empty;
            }
            None => {
                if let Err(e) = table.recount() {
                    // The tables stay their previous owner's: dropping `table` would free them.
                    core::mem::forget(table);
                    return Err(e);
                }
            }
        }
        Ok(table)
    }

    /// Tells the table the SMMU's IDR3.BBML (`Features::bbm_level`), which decides whether an unmap or protect
    /// that cuts a block may replace the block by a table of the same mappings in one store. Only BBML = 2
    /// allows that (the SMMU then never sees a TLB conflict and uses either translation); with BBML 0 or 1
    /// (and before this is called: the default is off) such requests fail with [`MapError::WouldSplitBlock`] and
    /// change nothing. BBML = 1 would allow the nT sequence (the block rewritten with nT = 1, TLBI and CMD_SYNC,
    /// then the table), which this driver does not implement.
    pub fn set_bbm_level(&mut self, bbml: u8) {
        self.split_blocks = bbml == 2;
    }

    /// Whether blocks are split in place (see [`IoPageTable::set_bbm_level`]).
    pub fn splits_blocks(&self) -> bool {
        self.split_blocks
    }

    /// This table's identity: unique, never reused (a table adopted after a live update gets a new one).
    pub fn id(&self) -> TableId {
        self.id
    }

    /// Whether `gather` may be handed to this table: no table has used it yet, or this one filled it.
    pub fn owns(&self, gather: &Gather) -> bool {
        gather.owner == 0 || gather.owner == self.id.0
    }

    /// Refuses a gather another table filled; nothing changes then.
    #[inline]
    fn check_owner(&self, gather: &Gather) -> Result<(), MapError> {
        match self.owns(gather) {
            true => Ok(()),
            false => Err(MapError::ForeignGather {
                owner: TableId(gather.owner),
                table: self.id,
            }),
        }
    }

    /// The format.
    pub fn format(&self) -> &Format {
        &self.format
    }

    /// The geometry the format implies (starting level, concatenation).
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The root table's physical address (CD.TTB0 or STE.S2TTB).
    pub fn root(&self) -> PhysAddr {
        self.root.phys
    }

    /// Tables in use, the root included (emptied tables waiting for a trim too).
    pub fn tables(&self) -> u32 {
        self.tables
    }

    /// The allocator.
    pub fn allocator(&self) -> &A {
        &self.allocator
    }

    fn table_entries(&self, level: u8, phys: u64) -> Option<&[AtomicU64]> {
        let virt = self.allocator.phys_to_virt(PhysAddr(phys))?;
        Some(entries_of(virt, self.geometry.entries(level)))
    }

    fn root_entries(&self) -> &[AtomicU64] {
        entries_of(self.root.virt, self.geometry.root_entries)
    }

    /// Writes a descriptor the SMMU may walk: one single-copy-atomic 64-bit store (relaxed: the order against the
    /// SMMU comes from the explicit barriers, before a table link and before the command queue's PROD write),
    /// cleaned to the point of coherency for a non-coherent SMMU.
    #[inline]
    fn store(&self, entry: &AtomicU64, value: u64) {
        entry.store(value, Ordering::Relaxed);
        self.coherency.clean(core::ptr::from_ref(entry).cast(), 8);
    }

    /// `d` (a table descriptor naming a table at `child_level`) with the count `n`, and the full bit set exactly
    /// when a last-level table's every entry is valid. Other software bits are kept.
    fn with_count(&self, d: u64, child_level: u8, n: usize) -> u64 {
        let full = child_level == 3 && n == 1 << self.geometry.level_bits;
        desc::with_count(d & !desc::SW_TABLE_FULL, n) | if full { desc::SW_TABLE_FULL } else { 0 }
    }

    /// Sets the count of the table that the table descriptor in `entry` names (at `child_level`) to `n`. Only
    /// bits the walk ignores change, so the store needs no cache maintenance and no barrier: the SMMU sees the
    /// old or the new word, and both name the same table.
    fn set_count(&mut self, entry: &AtomicU64, child_level: u8, n: usize) {
        let d = entry.load(Ordering::Relaxed);
        if desc::count(d) == 0 && n > 0 {
            self.empty = self.empty.saturating_sub(1);
        }
        entry.store(self.with_count(d, child_level, n), Ordering::Relaxed);
    }

    /// The table descriptor `d` is going: if it named an empty table (a last-level table left empty by
    /// `unmap_page`, or any table `recount` found empty), that table no longer waits for a trim.
    fn forget_if_empty(&mut self, d: u64) {
        if desc::is_valid(d) && desc::count(d) == 0 {
            self.empty = self.empty.saturating_sub(1);
        }
    }

    /// Sets how many emptied last-level tables may stay linked (see [`IoPageTable::trim`]) before the single-page
    /// unmap trims by itself, into the gather it was given (checked at every single-page unmap that removes a
    /// page, so a lower limit takes effect there or at the next trim). 0 frees every emptied table at the unmap
    /// that emptied it (as the range path does). The default is [`DEFAULT_LAZY_FREE_LIMIT`]. When that unmap
    /// trims, its gather also spans the trimmed tables, so its invalidation may be wider (up to the whole ASID or
    /// VMID when they lie far apart).
    pub fn set_lazy_free_limit(&mut self, tables: u32) {
        self.lazy_limit = tables;
    }

    /// Emptied tables still linked, waiting for the next [`IoPageTable::trim`]: last-level tables emptied by
    /// single-page unmaps, and any table [`IoPageTable::recount`] found empty.
    pub fn empty_tables(&self) -> u32 {
        self.empty
    }

    /// Maps one granule at `iova` (checked by `map`): one descent from the root, the leaf slot itself as the
    /// overlap check, the missing tables (at most one per level) allocated before anything is written.
    #[inline]
    fn map_page(&mut self, iova: u64, pa: u64, template: u64) -> Result<(), MapError> {
        let g = self.geometry;
        // The descriptor that names the current table (none for the root).
        let mut parent: Option<&AtomicU64> = None;
        let mut level = g.start_level;
        let mut entries = entries_of(self.root.virt, g.root_entries);
        let (mut shift, mut mask) = (g.entry_shift(level), g.root_entries - 1);
        let slot = loop {
            let slot = &entries[(iova >> shift) as usize & mask];
            let d = slot.load(Ordering::Relaxed);
            if level == 3 || !desc::is_table(d, level) {
                if desc::is_valid(d) {
                    // A page, or a block that maps it.
                    return Err(MapError::Overlap { iova });
                }
                break slot;
            }
            let Some(virt) = self.allocator.phys_to_virt(PhysAddr(desc::address(d))) else {
                // A table the allocator does not know: a broken allocator (as `tables_needed` reports it).
                return Err(MapError::NoMemory(AllocError::OutOfMemory { size: 0 }));
            };
            parent = Some(slot);
            entries = entries_of(virt, 1 << g.level_bits);
            level += 1;
            (shift, mask) = (shift - g.level_bits, (1 << g.level_bits) - 1);
        };
        let word = if level < 3 {
            self.new_tables(level, iova, template | pa)?
        } else {
            template | pa
        };
        self.store(slot, word);
        if let Some(parent) = parent {
            // The current table gained an entry.
            let p = parent.load(Ordering::Relaxed);
            let n = desc::count(p);
            if n == 0 {
                // It was empty and waiting for a trim (emptied by `unmap_page`, or found empty by `recount`).
                self.empty = self.empty.saturating_sub(1);
            }
            parent.store(self.with_count(p, level, n + 1), Ordering::Relaxed);
        }
        write_barrier();
        Ok(())
    }

    /// The tables from `level + 1` down to the last level that a page at `iova` needs below an invalid entry at
    /// `level`, holding `leaf`: allocated first, so that a failure changes nothing (every frame goes back), then
    /// filled bottom-up (each holds one entry), cleaned, and ordered before the descriptor that will link them,
    /// which is returned.
    /// `n` (at most `N`) zeroed frames of a granule each, or none: on a failure the ones already allocated go back.
    fn zeroed_frames<const N: usize>(&self, n: usize) -> Result<heapless::Vec<DmaBlock, N>, MapError> {
        let granule = 1usize << self.geometry.granule_bits;
        let mut frames = heapless::Vec::new();
        for _ in 0..n.min(N) {
            match self.allocator.allocate_zeroed(granule, granule) {
                Ok(t) => {
                    let _ = frames.push(t);
                }
                Err(e) => {
                    for t in frames {
                        // SAFETY: just allocated here, never published.
                        unsafe { self.allocator.free(t) };
                    }
                    return Err(MapError::NoMemory(e));
                }
            }
        }
        Ok(frames)
    }

    #[inline(never)]
    fn new_tables(&mut self, level: u8, iova: u64, leaf: u64) -> Result<u64, MapError> {
        let g = self.geometry;
        let new: heapless::Vec<DmaBlock, 3> = self.zeroed_frames(usize::from(3 - level))?;
        let mut word = leaf;
        for (k, table) in new.into_iter().enumerate().rev() {
            let table_level = level + 1 + k as u8;
            entries_of(table.virt, 1 << g.level_bits)[g.index(table_level, iova)].store(word, Ordering::Relaxed);
            self.coherency.clean(table.virt.as_ptr(), table.size);
            word = self.with_count(desc::table(table.phys.0), table_level, 1);
            self.tables += 1;
        }
        // The new tables' contents before the descriptor that links them.
        write_barrier();
        Ok(word)
    }

    /// Unmaps the granule at `iova` (checked by `unmap`) with one descent from the root: `None` when a block maps
    /// it (the range path splits or refuses it). A last-level table that this empties stays linked and waits
    /// for [`IoPageTable::trim`], unless more than the lazy-free limit already wait: then this trims, when
    /// `TRIM`.
    #[inline]
    fn unmap_page<const TRIM: bool>(&mut self, iova: u64, gather: &mut Gather) -> Option<u64> {
        let g = self.geometry;
        let mut parent: Option<&AtomicU64> = None;
        let mut level = g.start_level;
        let mut entries = entries_of(self.root.virt, g.root_entries);
        let (mut shift, mut mask) = (g.entry_shift(level), g.root_entries - 1);
        loop {
            let slot = &entries[(iova >> shift) as usize & mask];
            let d = slot.load(Ordering::Relaxed);
            if !desc::is_valid(d) {
                return Some(0);
            }
            if level == 3 {
                break;
            }
            if !desc::is_table(d, level) {
                return None;
            }
            let virt = self.allocator.phys_to_virt(PhysAddr(desc::address(d)))?;
            parent = Some(slot);
            entries = entries_of(virt, 1 << g.level_bits);
            level += 1;
            (shift, mask) = (shift - g.level_bits, (1 << g.level_bits) - 1);
        }
        let slot = &entries[(iova >> shift) as usize & mask];
        self.store(slot, 0);
        gather.add(iova, 1 << g.granule_bits, g.granule_bits);
        if let Some(parent) = parent {
            // One entry fewer: the count goes down (a borrow-free subtraction in its low bits when they are not
            // zero) and the table is no longer full.
            let p = parent.load(Ordering::Relaxed) & !desc::SW_TABLE_FULL;
            let p = if p & desc::SW_COUNT_LOW != 0 {
                p - (1 << 2)
            } else {
                desc::with_count(p, desc::count(p).saturating_sub(1))
            };
            parent.store(p, Ordering::Relaxed);
            if p & (desc::SW_COUNT_LOW | desc::SW_COUNT_HIGH) == 0 {
                self.note_empty(iova);
            }
        }
        if TRIM && self.trim_due() {
            self.trim_in_place(gather);
        }
        Some(1 << g.granule_bits)
    }

    /// The last-level table for `iova` has just emptied: mark its descriptor and its ancestors' as leading to a
    /// trim candidate (bottom-up, stopping at the first already marked: a mark implies its ancestors' marks), and
    /// count it.
    #[inline(never)]
    fn note_empty(&mut self, iova: u64) {
        self.empty += 1;
        let g = self.geometry;
        let mut path: heapless::Vec<&AtomicU64, 3> = heapless::Vec::new();
        let mut entries = entries_of(self.root.virt, g.root_entries);
        for level in g.start_level..3 {
            let slot = &entries[g.index(level, iova)];
            let d = slot.load(Ordering::Relaxed);
            if !desc::is_table(d, level) {
                return;
            }
            let _ = path.push(slot);
            let Some(virt) = self.allocator.phys_to_virt(PhysAddr(desc::address(d))) else {
                return;
            };
            entries = entries_of(virt, 1 << g.level_bits);
        }
        for slot in path.iter().rev() {
            let d = slot.load(Ordering::Relaxed);
            if d & desc::SW_TRIM_CANDIDATE != 0 {
                break;
            }
            // A bit the walk ignores: no maintenance, no barrier (as `set_count`).
            slot.store(d | desc::SW_TRIM_CANDIDATE, Ordering::Relaxed);
        }
    }

    /// Unlinks every table that maps nothing (last-level tables emptied by single-page unmaps, and the tables
    /// above them that empty in turn) into `gather`, and returns how many tables it unlinked. As with
    /// [`IoPageTable::unmap`], the tables go back to the allocator only through [`IoPageTable::release`] after
    /// the caller's invalidation of `gather` has completed (walk caches included: [`Gather::tables_unlinked`]).
    /// Every range unmap through [`IoPageTable::unmap`] (one of more than a granule, or one that meets a block)
    /// trims too, into its own gather.
    ///
    /// Cost: it visits only the tables whose descriptors lead to an emptied table (software bit 57,
    /// [`desc::SW_TRIM_CANDIDATE`]); nothing when none is waiting.
    ///
    /// # Errors
    /// [`MapError::ForeignGather`] for a gather another table filled; nothing changes then.
    pub fn trim(&mut self, gather: &mut Gather) -> Result<u32, MapError> {
        self.check_owner(gather)?;
        gather.owner = self.id.0;
        Ok(self.trim_in_place(gather))
    }

    /// Whether more emptied tables wait than the lazy-free limit allows: the single-page [`IoPageTable::unmap`]
    /// trims then; after [`IoPageTable::unmap_without_trim`] the caller should [`IoPageTable::trim`] (into a
    /// gather of its own, flushed at once).
    pub fn trim_due(&self) -> bool {
        self.empty > self.lazy_limit
    }

    /// `trim` into a gather already checked to be this table's.
    fn trim_in_place(&mut self, gather: &mut Gather) -> u32 {
        if self.empty == 0 {
            return 0;
        }
        let before = gather.freed;
        let (start, root) = (self.geometry.start_level, self.root.phys.0);
        self.trim_in(start, root, 0, gather);
        self.empty = 0;
        gather.freed - before
    }

    /// Rebuilds the software state this driver keeps in table descriptors (each table's live-entry count, the
    /// full bit, the trim marks) and the number of emptied tables waiting for a trim, from the entries
    /// themselves. Tables this driver built carry that state in their descriptors, so a table preserved across
    /// a live update needs only the waiting count back; tables written by other code (or whose software bits
    /// were lost) need this whole pass before any other operation. It reads every table twice (first only to
    /// check that the allocator reaches each one) and writes only bits the walk ignores.
    ///
    /// # Errors
    /// [`MapError::NotAdoptable`] with the first table below the root that the allocator cannot reach (its count
    /// cannot be known, and a table taken for empty would be trimmed with its mappings); nothing changes then.
    pub fn recount(&mut self) -> Result<(), MapError> {
        let (start, root) = (self.geometry.start_level, self.root.phys.0);
        self.reachable(start, root)?;
        self.empty = 0;
        self.tables = 1;
        self.recount_in(start, root);
        Ok(())
    }

    /// Checks that every table below the table at `table_phys` (at `level`, itself reachable) is reachable.
    fn reachable(&self, level: u8, table_phys: u64) -> Result<(), MapError> {
        let Some(virt) = self.allocator.phys_to_virt(PhysAddr(table_phys)) else {
            return Err(MapError::NotAdoptable(PhysAddr(table_phys)));
        };
        for entry in entries_of(virt, self.geometry.entries(level)) {
            let d = entry.load(Ordering::Relaxed);
            if !desc::is_table(d, level) {
                continue;
            }
            let child = desc::address(d);
            if level + 1 < 3 {
                self.reachable(level + 1, child)?;
            } else if self.allocator.phys_to_virt(PhysAddr(child)).is_none() {
                return Err(MapError::NotAdoptable(PhysAddr(child)));
            }
        }
        Ok(())
    }

    /// Recounts below the table at `table_phys` (at `level`): its valid entries, and whether an empty table lies
    /// below it.
    fn recount_in(&mut self, level: u8, table_phys: u64) -> (usize, bool) {
        let Some(virt) = self.allocator.phys_to_virt(PhysAddr(table_phys)) else {
            return (0, false);
        };
        let entries = entries_of(virt, self.geometry.entries(level));
        let (mut valid, mut empty_below) = (0, false);
        for entry in entries {
            let d = entry.load(Ordering::Relaxed);
            if !desc::is_valid(d) {
                continue;
            }
            valid += 1;
            if !desc::is_table(d, level) {
                continue;
            }
            self.tables += 1;
            let (n, below) = if level + 1 < 3 {
                self.recount_in(level + 1, desc::address(d))
            } else {
                let child = self.allocator.phys_to_virt(PhysAddr(desc::address(d))).map_or(0, |c| {
                    entries_of(c, 1 << self.geometry.level_bits)
                        .iter()
                        .filter(|e| desc::is_valid(e.load(Ordering::Relaxed)))
                        .count()
                });
                (child, false)
            };
            if n == 0 {
                self.empty += 1;
            }
            let mark = n == 0 || below;
            let d = self.with_count(d & !desc::SW_TRIM_CANDIDATE, level + 1, n);
            entry.store(if mark { d | desc::SW_TRIM_CANDIDATE } else { d }, Ordering::Relaxed);
            empty_below |= mark;
        }
        (valid, empty_below)
    }

    /// Trims below the table at `table_phys` (at `level`, covering from `table_base`); returns how many of its
    /// entries it removed.
    fn trim_in(&mut self, level: u8, table_phys: u64, table_base: u64, gather: &mut Gather) -> usize {
        let Some(virt) = self.allocator.phys_to_virt(PhysAddr(table_phys)) else {
            return 0;
        };
        let entries = entries_of(virt, self.geometry.entries(level));
        let shift = self.geometry.entry_shift(level);
        let mut removed = 0;
        for (i, entry) in entries.iter().enumerate() {
            let d = entry.load(Ordering::Relaxed);
            if !desc::is_table(d, level) || d & desc::SW_TRIM_CANDIDATE == 0 {
                continue;
            }
            let entry_base = table_base + ((i as u64) << shift);
            let mut left = desc::count(d);
            if level + 1 < 3 {
                left = left.saturating_sub(self.trim_in(level + 1, desc::address(d), entry_base, gather));
            }
            if left == 0 {
                self.forget_if_empty(d);
                self.store(entry, 0);
                self.free_later(desc::address(d), gather);
                // Walk caches may hold the unlinked table: its span is invalidated, though nothing is mapped there.
                gather.add_run(entry_base, entry_base + (1 << shift), self.geometry.granule_bits, 0);
                removed += 1;
            } else {
                entry.store(
                    self.with_count(d & !desc::SW_TRIM_CANDIDATE, level + 1, left),
                    Ordering::Relaxed,
                );
            }
        }
        removed
    }

    fn check_range(&self, iova: u64, size: u64) -> Result<(), MapError> {
        let granule = 1u64 << self.geometry.granule_bits;
        if size == 0 || !iova.is_multiple_of(granule) || !size.is_multiple_of(granule) {
            return Err(MapError::Unaligned { iova, size });
        }
        match iova.checked_add(size) {
            Some(end) if end <= 1 << self.format.input_bits => Ok(()),
            _ => Err(MapError::InputOutOfRange { iova, size }),
        }
    }

    /// The first mapped address in `[iova, iova + size)`, if any.
    fn first_mapped(&self, iova: u64, size: u64) -> Option<u64> {
        self.first_mapped_in(self.geometry.start_level, self.root_entries(), 0, iova, iova + size)
    }

    /// The first mapped address of `[start, end)` under a table covering from `base`, visiting only the entries
    /// that overlap the range.
    fn first_mapped_in(&self, level: u8, entries: &[AtomicU64], base: u64, start: u64, end: u64) -> Option<u64> {
        let shift = self.geometry.entry_shift(level);
        let first = ((start - base) >> shift) as usize;
        let last = (((end - 1) - base) >> shift) as usize;
        for (i, e) in entries.iter().enumerate().take(last + 1).skip(first) {
            let d = e.load(Ordering::Acquire);
            if !desc::is_valid(d) {
                continue;
            }
            let entry_base = base + ((i as u64) << shift);
            let (from, to) = (start.max(entry_base), end.min(entry_base + (1 << shift)));
            if !desc::is_table(d, level) {
                return Some(from);
            }
            let next = self.table_entries(level + 1, desc::address(d))?;
            if let Some(found) = self.first_mapped_in(level + 1, next, entry_base, from, to) {
                return Some(found);
            }
        }
        None
    }

    /// Maps `[iova, iova + size)` to `[pa, pa + size)` with `prot`, using the largest blocks that alignment allows.
    ///
    /// Every table the mapping needs is allocated before anything is written, so a failure leaves the tables
    /// exactly as they were: nothing was linked, so nothing needs invalidating and no table the SMMU may have
    /// walked is freed. A successful map only adds translations where there were none: it needs no invalidation
    /// (the SMMU caches no invalid entries in the formats used here), and publishes its descriptors with a
    /// barrier before it returns. Over the span of a [`Gather`] not flushed yet (an unmap, or a trim, including
    /// the one a single-page unmap runs past the lazy-free limit) the SMMU may still use the old translations,
    /// through its TLB or through a walk cache naming a table that gather unlinked (whose leaves a range unmap
    /// left in place): flush that gather before mapping there (see the module documentation).
    ///
    /// # Errors
    /// [`MapError::Unaligned`] (the IOVA or the size), [`MapError::UnalignedOutput`] (the physical address),
    /// [`MapError::InputOutOfRange`], [`MapError::OutputOutOfRange`] (the whole output range must fit),
    /// [`MapError::BadProt`], [`MapError::Overlap`], [`MapError::NoMemory`]; nothing changes then (the allocator
    /// has every frame back).
    #[inline]
    pub fn map(&mut self, iova: u64, pa: u64, size: u64, prot: Prot) -> Result<(), MapError> {
        let granule = 1u64 << self.geometry.granule_bits;
        if size == granule
            && (iova | pa) & (granule - 1) == 0
            && iova >> self.format.input_bits == 0
            && pa >> self.format.output_bits == 0
            && Some(prot) == self.last_prot
        {
            // One granule, aligned, inside both address spaces, with the protection of the previous map (already
            // checked): the checks below would all pass.
            return self.map_page(iova, pa, self.last_template);
        }
        self.map_range(iova, pa, size, prot)
    }

    /// `map`, every check in order, then the single-page path or the range path.
    #[inline(never)]
    fn map_range(&mut self, iova: u64, pa: u64, size: u64, prot: Prot) -> Result<(), MapError> {
        self.check_range(iova, size)?;
        if !pa.is_multiple_of(1 << self.geometry.granule_bits) {
            return Err(MapError::UnalignedOutput { pa, size });
        }
        match pa.checked_add(size) {
            Some(end) if end <= 1 << self.format.output_bits => {}
            _ => return Err(MapError::OutputOutOfRange { pa, size }),
        }
        if !self.expressible(prot) {
            return Err(MapError::BadProt(prot));
        }
        if size == 1 << self.geometry.granule_bits {
            self.last_template = desc::leaf(self.format.stage, 0, prot, true);
            self.last_prot = Some(prot);
            return self.map_page(iova, pa, self.last_template);
        }
        if let Some(mapped) = self.first_mapped(iova, size) {
            return Err(MapError::Overlap { iova: mapped });
        }
        let root = self.root_entries();
        let mut needed = (0, 0);
        self.tables_needed(
            self.geometry.start_level,
            Some(root),
            0,
            iova,
            iova + size,
            pa,
            &mut needed,
        )?;
        let mut pool = Pool::default();
        let granule = 1usize << self.geometry.granule_bits;
        for full in [false, true] {
            for _ in 0..if full { needed.1 } else { needed.0 } {
                let table = if full {
                    self.allocator.allocate_for_overwrite(granule, granule)
                } else {
                    self.allocator.allocate_zeroed(granule, granule)
                };
                match table {
                    Ok(table) => pool.push(table, full),
                    Err(e) => {
                        self.free_pool(&mut pool);
                        return Err(MapError::NoMemory(e));
                    }
                }
            }
        }
        let root = self.root.phys.0;
        self.map_in(
            self.geometry.start_level,
            root,
            0,
            iova,
            iova + size,
            pa,
            prot,
            &mut pool,
        );
        debug_assert!(
            pool.zeroed.is_none() && pool.overwrite.is_none(),
            "tables counted exactly"
        );
        self.free_pool(&mut pool);
        write_barrier();
        Ok(())
    }

    /// Gives the frames left in `pool` (never linked) back to the allocator.
    fn free_pool(&mut self, pool: &mut Pool) {
        for full in [false, true] {
            while let Some(table) = pool.pop(full) {
                // SAFETY: allocated from this allocator by `map` and never linked: nothing can reach it.
                unsafe { self.allocator.free(table) };
            }
        }
    }

    /// Which entries of a table covering from `table_base`, of those from `first` to `last` that `[start, end)`
    /// (output from `pa` at `start`) touches, become leaves in one run: the entries wholly covered, when leaves
    /// are allowed at `level` and the output is aligned to an entry. An empty range when none.
    #[allow(clippy::too_many_arguments)]
    fn leaf_run(
        &self,
        level: u8,
        table_base: u64,
        first: usize,
        last: usize,
        start: u64,
        end: u64,
        pa: u64,
    ) -> (usize, usize) {
        let shift = self.geometry.entry_shift(level);
        let leaf_here = level == 3 || self.geometry.block_allowed(level);
        let run_start = if start == table_base + ((first as u64) << shift) {
            first
        } else {
            first + 1
        };
        let run_end = if end == table_base + ((last as u64 + 1) << shift) {
            last + 1
        } else {
            last
        };
        let output = pa + (table_base + ((run_start as u64) << shift)).wrapping_sub(start);
        if leaf_here && run_start < run_end && output.is_multiple_of(1 << shift) {
            (run_start, run_end)
        } else {
            (0, 0)
        }
    }

    /// Counts the tables `map_in` will create for `[start, end)` (output from `pa`) below the table `entries`
    /// (`None`: a table still to be created, all invalid) covering from `table_base`: `needed.0` zeroed ones,
    /// `needed.1` last-level tables that the map fills whole.
    ///
    /// # Errors
    /// [`MapError::NoMemory`] when the allocator does not know a table's physical address (a broken allocator).
    #[allow(clippy::too_many_arguments)]
    fn tables_needed(
        &self,
        level: u8,
        entries: Option<&[AtomicU64]>,
        table_base: u64,
        start: u64,
        end: u64,
        pa: u64,
        needed: &mut (usize, usize),
    ) -> Result<(), MapError> {
        let shift = self.geometry.entry_shift(level);
        let entry_size = 1u64 << shift;
        let first = ((start - table_base) >> shift) as usize;
        let last = (((end - 1) - table_base) >> shift) as usize;
        let run = self.leaf_run(level, table_base, first, last, start, end, pa);
        for i in first..=last {
            if (run.0..run.1).contains(&i) {
                continue;
            }
            let entry_base = table_base + ((i as u64) << shift);
            let (from, to) = (start.max(entry_base), end.min(entry_base + entry_size));
            let output = pa + (from - start);
            let d = entries.map_or(0, |e| e[i].load(Ordering::Acquire));
            if desc::is_table(d, level) {
                let next = self
                    .table_entries(level + 1, desc::address(d))
                    .ok_or(MapError::NoMemory(AllocError::OutOfMemory { size: 0 }))?;
                self.tables_needed(level + 1, Some(next), entry_base, from, to, output, needed)?;
            } else if level + 1 == 3 && from == entry_base && to == entry_base + entry_size {
                needed.1 += 1;
            } else {
                needed.0 += 1;
                self.tables_needed(level + 1, None, entry_base, from, to, output, needed)?;
            }
        }
        Ok(())
    }

    /// Maps `[start, end)` (output from `pa` at `start`) inside the table at `table_phys` (covering from
    /// `table_base`) in one pass over its entries: leaves where an entry is covered and aligned (blocks where the
    /// level allows them), tables below otherwise, taken from `pool` (which `tables_needed` sized) and filled
    /// before they are linked. Returns how many of the table's entries became valid (for its count).
    #[allow(clippy::too_many_arguments)]
    fn map_in(
        &mut self,
        level: u8,
        table_phys: u64,
        table_base: u64,
        start: u64,
        end: u64,
        pa: u64,
        prot: Prot,
        pool: &mut Pool,
    ) -> usize {
        let shift = self.geometry.entry_shift(level);
        let entry_size = 1u64 << shift;
        let count = self.geometry.entries(level);
        let Some(virt) = self.allocator.phys_to_virt(PhysAddr(table_phys)) else {
            // `tables_needed` found every existing table: unreachable with an allocator that keeps its word.
            return 0;
        };
        let entries = entries_of(virt, count);
        let first = ((start - table_base) >> shift) as usize;
        let last = (((end - 1) - table_base) >> shift) as usize;
        // The descriptor of output address 0 at this level: each leaf adds its output address.
        let template = desc::leaf(self.format.stage, 0, prot, level == 3);
        let output = |va: u64| pa + (va - start);
        // Fast path: entries wholly covered, with aligned outputs, become leaves in one run of stores.
        let (run_start, run_end) = self.leaf_run(level, table_base, first, last, start, end, pa);
        let mut added = 0;
        let mut i = first;
        while i <= last {
            let entry_base = table_base + ((i as u64) << shift);
            if i == run_start && run_start < run_end {
                if self.empty > 0
                    && entries[run_start..run_end]
                        .iter()
                        .any(|e| desc::is_valid(e.load(Ordering::Relaxed)))
                {
                    // Tables that `unmap_page` emptied are still linked inside the run (`map` found nothing
                    // mapped, so every valid entry here leads only to them): a leaf must not replace a linked
                    // table without an invalidation, so map into them instead. That needs no new table: the run
                    // covers them whole, with aligned output, so their entries become leaves too.
                    for (k, e) in entries.iter().enumerate().take(run_end).skip(run_start) {
                        let base = table_base + ((k as u64) << shift);
                        let d = e.load(Ordering::Relaxed);
                        if desc::is_table(d, level) {
                            let more = self.map_in(
                                level + 1,
                                desc::address(d),
                                base,
                                base,
                                base + entry_size,
                                output(base),
                                prot,
                                pool,
                            );
                            self.set_count(e, level + 1, desc::count(d) + more);
                        } else {
                            self.store(e, template | output(base));
                            added += 1;
                        }
                    }
                    i = run_end;
                    continue;
                }
                let first_output = output(entry_base);
                let run = &entries[run_start..run_end];
                let words = run.as_ptr() as *mut u64;
                for k in 0..run.len() {
                    // SAFETY: `k` indexes the run, entries of a live table owned by this page table (which `&mut
                    // self` keeps from any other CPU-side access). Plain stores let the compiler write several
                    // entries per instruction; every entry is 8-byte aligned, and the architecture makes each
                    // 64-bit element of a wider aligned store single-copy atomic, so the SMMU sees every entry
                    // either invalid (as it was) or whole.
                    unsafe { words.add(k).write(template | (first_output + k as u64 * entry_size)) };
                }
                self.coherency
                    .clean(entries[run_start..].as_ptr().cast(), (run_end - run_start) * 8);
                added += run_end - run_start;
                i = run_end;
                continue;
            }
            let entry = &entries[i];
            i += 1;
            let from = start.max(entry_base);
            let to = end.min(entry_base + entry_size);
            let d = entry.load(Ordering::Acquire);
            if desc::is_table(d, level) {
                let more = self.map_in(
                    level + 1,
                    desc::address(d),
                    entry_base,
                    from,
                    to,
                    output(from),
                    prot,
                    pool,
                );
                self.set_count(entry, level + 1, desc::count(d) + more);
                continue;
            }
            // Below an invalid entry (`map` checked that nothing is mapped here) a new table, filled before it is
            // linked. A new last-level table whose whole span is mapped: every entry a page, written here in one
            // pass (so its frame need not be zeroed first), and marked full.
            let full = level + 1 == 3 && from == entry_base && to == entry_base + entry_size;
            let Some(table) = pool.pop(full) else {
                // `tables_needed` counted every table: unreachable.
                return added;
            };
            self.tables += 1;
            added += 1;
            let entries_below = 1usize << self.geometry.level_bits;
            let count = if full {
                let page = 1u64 << self.geometry.granule_bits;
                let mut d = desc::leaf(self.format.stage, output(from), prot, true);
                // SAFETY: the new table's entries, 8-byte aligned and initialised (any content); nothing else
                // refers to the table yet, so a plain mutable view is exclusive.
                let words = unsafe {
                    core::slice::from_raw_parts_mut(table.virt.as_ptr().cast::<u64>(), 1 << self.geometry.level_bits)
                };
                for w in words {
                    *w = d;
                    d += page;
                }
                entries_below
            } else {
                self.map_in(level + 1, table.phys.0, entry_base, from, to, output(from), prot, pool)
            };
            self.coherency.clean(table.virt.as_ptr(), table.size);
            let link = self.with_count(desc::table(table.phys.0), level + 1, count);
            // The filled table must be visible before the descriptor that points to it.
            write_barrier();
            self.store(entry, link);
        }
        added
    }

    /// Unmaps every mapping inside `[iova, iova + size)` and returns the bytes unmapped. A block that straddles an
    /// end is split in place only when [`IoPageTable::set_bbm_level`] allowed it (BBML = 2).
    ///
    /// The caller invalidates: the removed translations (and any unlinked table's span, for walk caches) are
    /// added to `gather`, and the SMMU may keep using them until the caller has issued that invalidation and its
    /// CMD_SYNC has completed (`ActiveSmmu::flush` does both). Tables that emptied are unlinked but not freed:
    /// they go back to the allocator only through [`IoPageTable::release`], to be called after that completion.
    /// The first use stamps `gather` with this table's identity (see [`Gather`]).
    ///
    /// An unmap of exactly one granule takes the single-page path: a last-level table it empties stays linked
    /// until the next [`IoPageTable::trim`] (or range unmap), unless the lazy-free limit is exceeded. Any other
    /// unmap also trims. Returns 0 (and gathers nothing) where nothing was mapped.
    ///
    /// # Errors
    /// [`MapError::Unaligned`], [`MapError::InputOutOfRange`], [`MapError::WouldSplitBlock`] (a cut block without
    /// BBML = 2), [`MapError::NoMemory`] (for splitting a block), [`MapError::ForeignGather`] (a gather another
    /// table filled); nothing changes then, `gather` included.
    #[inline]
    pub fn unmap(&mut self, iova: u64, size: u64, gather: &mut Gather) -> Result<u64, MapError> {
        self.unmap_in::<true>(iova, size, gather)
    }

    /// [`IoPageTable::unmap`] without any trim: `gather` gets only what the range itself removes (with the tables
    /// the range empties, unlinked as by `unmap`, and their spans), never a table that a trim unlinked elsewhere; a
    /// single-page unmap leaves the table it empties linked even past the lazy-free limit, and the caller trims
    /// when [`IoPageTable::trim_due`] says so. For a gather whose invalidation is deferred.
    ///
    /// # Errors
    /// As [`IoPageTable::unmap`].
    #[inline]
    pub fn unmap_without_trim(&mut self, iova: u64, size: u64, gather: &mut Gather) -> Result<u64, MapError> {
        self.unmap_in::<false>(iova, size, gather)
    }

    #[inline(always)]
    fn unmap_in<const TRIM: bool>(&mut self, iova: u64, size: u64, gather: &mut Gather) -> Result<u64, MapError> {
        self.check_owner(gather)?;
        let granule = 1u64 << self.geometry.granule_bits;
        if size == granule
            && iova & (granule - 1) == 0
            && iova >> self.format.input_bits == 0
            && let Some(bytes) = self.unmap_page::<TRIM>(iova, gather)
        {
            gather.owner = self.id.0;
            return Ok(bytes);
        }
        let bytes = self.change(iova, size, gather, None, TRIM)?;
        gather.owner = self.id.0;
        Ok(bytes)
    }

    /// Gives every mapping inside `[iova, iova + size)` the protection `prot` and returns the bytes of mappings
    /// changed. A block that straddles an end is split in place only when [`IoPageTable::set_bbm_level`] allowed
    /// it (BBML = 2). Only permissions change in place: the memory type (Device, Normal non-cacheable, Normal
    /// cacheable) of a live mapping is never changed, as that needs break-before-make.
    ///
    /// The caller invalidates: the translations whose protection changed go to `gather`, and a reduction is in
    /// force only once the caller's invalidation for it has completed (`ActiveSmmu::flush`).
    ///
    /// # Errors
    /// [`MapError::Unaligned`], [`MapError::InputOutOfRange`], [`MapError::BadProt`] (inexpressible, or another
    /// memory type than a mapping in the range has), [`MapError::WouldSplitBlock`], [`MapError::NoMemory`] (for
    /// splitting a block), [`MapError::ForeignGather`]; nothing changes then, `gather` included.
    pub fn protect(&mut self, iova: u64, size: u64, prot: Prot, gather: &mut Gather) -> Result<u64, MapError> {
        self.check_owner(gather)?;
        if !self.expressible(prot) {
            return Err(MapError::BadProt(prot));
        }
        self.check_range(iova, size)?;
        // A memory-type change on a live leaf needs break-before-make: refuse it before anything changes.
        let (stage, wanted) = (self.format.stage, MemoryType::of(prot));
        let mut other_type = false;
        self.visit(
            self.geometry.start_level,
            self.root_entries(),
            0,
            &mut |_, d| other_type |= Some(desc::memory_type(stage, d)) != wanted,
            Some((iova, iova + size)),
        );
        if other_type {
            return Err(MapError::BadProt(prot));
        }
        let bytes = self.change(iova, size, gather, Some(prot), false)?;
        gather.owner = self.id.0;
        Ok(bytes)
    }

    fn expressible(&self, prot: Prot) -> bool {
        desc::expressible(self.format.stage, prot)
    }

    #[inline(never)]
    fn change(
        &mut self,
        iova: u64,
        size: u64,
        gather: &mut Gather,
        reprotect: Option<Prot>,
        trim: bool,
    ) -> Result<u64, MapError> {
        self.check_range(iova, size)?;
        // Splitting the blocks that straddle the range's ends needs at most one table per level below each:
        // allocate them first, so that running out of memory changes nothing.
        let needed = self.splits_needed(iova) + self.splits_needed(iova + size);
        if needed > 0 && !self.split_blocks {
            let cut = if self.splits_needed(iova) > 0 {
                iova
            } else {
                iova + size
            };
            return Err(MapError::WouldSplitBlock { iova: cut });
        }
        let mut reserve: heapless::Vec<DmaBlock, 8> = self.zeroed_frames(needed)?;
        let root = self.root.phys.0;
        let (unmapped, _) = self.change_in(
            self.geometry.start_level,
            root,
            0,
            iova,
            iova + size,
            gather,
            &mut reserve,
            reprotect,
        );
        for t in reserve {
            // SAFETY: never published.
            unsafe { self.allocator.free(t) };
        }
        if trim {
            self.trim_in_place(gather);
        }
        // No barrier here: the caller's invalidation orders these stores before its command queue's PROD write
        // (see the module documentation).
        Ok(unmapped)
    }

    /// Tables needed to split the block (if any) that maps `address` without starting at it.
    fn splits_needed(&self, address: u64) -> usize {
        let mut level = self.geometry.start_level;
        let mut phys = self.root.phys.0;
        loop {
            let Some(entries) = self.table_entries(level, phys) else {
                return 0;
            };
            let Some(entry) = entries.get(self.geometry.index(level, address)) else {
                return 0;
            };
            let d = entry.load(Ordering::Acquire);
            if desc::is_table(d, level) {
                phys = desc::address(d);
                level += 1;
                continue;
            }
            if !desc::is_valid(d) || level == 3 || address.is_multiple_of(1 << self.geometry.entry_shift(level)) {
                return 0;
            }
            // Split down to the level whose entries the address is aligned to.
            let target = (level + 1..=3)
                .find(|&l| address.is_multiple_of(1 << self.geometry.entry_shift(l)))
                .unwrap_or(3);
            return usize::from(target - level);
        }
    }

    /// Unmaps (or, with `reprotect`, reprotects) `[start, end)` inside the table at `table_phys` (covering from
    /// `table_base`). Returns the bytes of mappings removed or changed, and how many of the table's entries became
    /// invalid (for its count).
    #[allow(clippy::too_many_arguments)]
    fn change_in(
        &mut self,
        level: u8,
        table_phys: u64,
        table_base: u64,
        start: u64,
        end: u64,
        gather: &mut Gather,
        reserve: &mut heapless::Vec<DmaBlock, 8>,
        reprotect: Option<Prot>,
    ) -> (u64, usize) {
        let shift = self.geometry.entry_shift(level);
        let entry_size = 1u64 << shift;
        let count = self.geometry.entries(level);
        let Some(virt) = self.allocator.phys_to_virt(PhysAddr(table_phys)) else {
            return (0, 0);
        };
        let entries = entries_of(virt, count);
        let mut removed = 0;
        let table_end = table_base.saturating_add(entry_size * count as u64);
        let first = ((start.max(table_base) - table_base) >> shift) as usize;
        let last = (((end.min(table_end) - 1) - table_base) >> shift) as usize;
        let mut unmapped = 0;
        // Leaves cleared in this table: the lowest address, one past the highest, how many. They are cleaned and
        // gathered once, after the loop.
        let mut cleared = (u64::MAX, 0, 0);
        for (i, entry) in entries.iter().enumerate().take(last + 1).skip(first) {
            let entry_base = table_base + ((i as u64) << shift);
            let d = entry.load(Ordering::Acquire);
            if !desc::is_valid(d) {
                continue;
            }
            let covered = start <= entry_base && entry_base + entry_size <= end;
            if covered
                && !desc::is_table(d, level)
                && let Some(prot) = reprotect
            {
                // A leaf inside the range keeps its output address and level, with the new protection.
                let new = desc::leaf(self.format.stage, desc::address(d), prot, level == 3);
                if new != d {
                    self.store(entry, new);
                    gather.add(entry_base, entry_size, shift);
                }
                unmapped += entry_size;
                continue;
            }
            if covered && reprotect.is_none() {
                removed += 1;
                if desc::is_table(d, level) {
                    self.forget_if_empty(d);
                    self.store(entry, 0);
                    // The whole subtree goes: count its leaves and collect its tables without rewriting them.
                    let (bytes, smallest) = self.reclaim(level + 1, d, gather);
                    // Always: walk caches may hold the unlinked table even if it mapped nothing.
                    gather.add(entry_base, entry_size, smallest);
                    unmapped += bytes;
                } else {
                    // Cleaned with the rest of the run after the loop; ordered by the barrier that ends `unmap`.
                    entry.store(0, Ordering::Relaxed);
                    cleared = (cleared.0.min(entry_base), entry_base + entry_size, cleared.2 + 1);
                    unmapped += entry_size;
                }
                continue;
            }
            let (next, before) = if desc::is_table(d, level) {
                (desc::address(d), desc::count(d))
            } else {
                // A block straddling the range: replace it with a table of the same mappings, then recurse.
                let Some(table) = reserve.pop() else { continue };
                let sub = entries_of(table.virt, 1 << self.geometry.level_bits);
                let child_shift = self.geometry.entry_shift(level + 1);
                // The block's own attribute bits, copied (not re-derived from a `Prot`), with the page bit at
                // level 3.
                let attributes = (d & !desc::OUTPUT_ADDRESS & !desc::TABLE_OR_PAGE)
                    | if level + 1 == 3 { desc::TABLE_OR_PAGE } else { 0 };
                for (j, e) in sub.iter().enumerate() {
                    let out = desc::address(d) + ((j as u64) << child_shift);
                    e.store(attributes | out, Ordering::Relaxed);
                }
                self.coherency.clean(table.virt.as_ptr(), table.size);
                write_barrier();
                self.store(entry, self.with_count(desc::table(table.phys.0), level + 1, sub.len()));
                self.tables += 1;
                // The block's translation is replaced: the TLB may hold it.
                gather.add(entry_base, entry_size, shift);
                (table.phys.0, sub.len())
            };
            let (bytes, gone) = self.change_in(level + 1, next, entry_base, start, end, gather, reserve, reprotect);
            unmapped += bytes;
            let after = before.saturating_sub(gone);
            if reprotect.is_none() && after == 0 {
                // Emptied now, or already empty (left linked by `unmap_page`): unlinked, and its span invalidated
                // for the walk caches even if nothing below it was mapped.
                self.forget_if_empty(entry.load(Ordering::Relaxed));
                self.store(entry, 0);
                self.free_later(next, gather);
                gather.add_run(entry_base, entry_base + entry_size, self.geometry.granule_bits, 0);
                removed += 1;
            } else if gone > 0 {
                self.set_count(entry, level + 1, after);
            }
        }
        if cleared.2 > 0 {
            let run = &entries[first..=last];
            self.coherency.clean(run.as_ptr().cast(), run.len() * 8);
            gather.add_run(cleared.0, cleared.1, shift, cleared.2);
        }
        (unmapped, removed)
    }

    /// Bytes mapped below the unlinked table that the table descriptor `link` names, and the smallest leaf's
    /// shift; the table and its subtables go to `gather`. A level-2 table goes as one link with its last-level
    /// tables (see [`LINK_SUBTREE`]), which are counted without being written, and without being read when their
    /// descriptor says they are full.
    fn reclaim(&mut self, level: u8, link: u64, gather: &mut Gather) -> (u64, u8) {
        let table_phys = desc::address(link);
        let shift = self.geometry.entry_shift(level);
        let Some(virt) = self.allocator.phys_to_virt(PhysAddr(table_phys)) else {
            return (0, shift);
        };
        let entries = entries_of(virt, 1 << self.geometry.level_bits);
        if level == 3 {
            let bytes = self.pages_in(link, entries);
            self.free_later(table_phys, gather);
            return (bytes, shift);
        }
        let mut bytes = 0;
        let mut smallest = shift;
        for e in entries {
            let d = e.load(Ordering::Relaxed);
            if desc::is_table(d, level) && level == 2 {
                self.forget_if_empty(d);
                if let Some(child) = self.allocator.phys_to_virt(PhysAddr(desc::address(d))) {
                    bytes += self.pages_in(d, entries_of(child, entries.len()));
                    smallest = smallest.min(self.geometry.entry_shift(3));
                    gather.freed += 1;
                    self.tables -= 1;
                }
            } else if desc::is_table(d, level) {
                self.forget_if_empty(d);
                let (b, s) = self.reclaim(level + 1, d, gather);
                bytes += b;
                smallest = smallest.min(s);
            } else if desc::is_valid(d) {
                bytes += 1 << shift;
            }
        }
        if level == 2 {
            self.subtree_link_slot(entries, virt)
                .store(gather.freed_head, Ordering::Relaxed);
            gather.freed_head = table_phys | LINK_SUBTREE | LINK_PRESENT;
            gather.freed += 1;
            gather.tables_unlinked = true;
            self.tables -= 1;
        } else {
            self.free_later(table_phys, gather);
        }
        (bytes, smallest)
    }

    /// Where the chain link of the unlinked level-2 table `entries` (at `virt`) is kept: the first word of its
    /// first last-level table when entry 0 names one (so every pointer to a child survives), else its own first
    /// word.
    fn subtree_link_slot(&self, entries: &[AtomicU64], virt: NonNull<u8>) -> &AtomicU64 {
        let first = entries[0].load(Ordering::Relaxed);
        let child0 = if desc::is_table(first, 2) {
            self.allocator.phys_to_virt(PhysAddr(desc::address(first)))
        } else {
            None
        };
        &entries_of(child0.unwrap_or(virt), 1)[0]
    }

    /// Bytes the last-level table `entries`, named by the table descriptor `link`, maps.
    fn pages_in(&self, link: u64, entries: &[AtomicU64]) -> u64 {
        let shift = self.geometry.entry_shift(3);
        if link & desc::SW_TABLE_FULL != 0 {
            return (entries.len() as u64) << shift;
        }
        // SAFETY: a live, unlinked table of this page table; nothing writes it while `&mut self` is held (the SMMU
        // only reads descriptors: hardware updates are not enabled). Plain reads let the count use wide loads.
        let words = unsafe { core::slice::from_raw_parts(entries.as_ptr() as *const u64, entries.len()) };
        words.iter().map(|d| d & desc::VALID).sum::<u64>() << shift
    }

    fn free_later(&mut self, table_phys: u64, gather: &mut Gather) {
        if let Some(virt) = self.allocator.phys_to_virt(PhysAddr(table_phys)) {
            // Chain through the first word: the table is unlinked, and a link is never a valid descriptor.
            entries_of(virt, 1)[0].store(gather.freed_head, Ordering::Relaxed);
            gather.freed_head = table_phys | LINK_PRESENT;
            gather.freed += 1;
            gather.tables_unlinked = true;
            self.tables -= 1;
        }
    }

    /// Moves what `other` collected (its range and its unlinked tables) into `into`, so that one invalidation and
    /// one [`IoPageTable::release`] cover both. `into` is stamped as this table's.
    ///
    /// # Errors
    /// [`ForeignGather`] when either gather was filled by another table: nothing changes, and `other` comes back.
    pub fn merge(&self, into: &mut Gather, other: Gather) -> Result<(), ForeignGather> {
        if !self.owns(into) || !self.owns(&other) {
            return Err(ForeignGather {
                table: self.id,
                gather: other,
            });
        }
        self.merge_owned(into, other);
        Ok(())
    }

    /// [`IoPageTable::merge`] of two gathers the caller has checked are this table's ([`IoPageTable::owns`]).
    pub(crate) fn merge_owned(&self, into: &mut Gather, other: Gather) {
        debug_assert!(self.owns(into) && self.owns(&other));
        into.owner = self.id.0;
        // The count of the newer epoch survives (an older epoch's gathers no longer count); within one epoch the
        // merged gathers add up.
        match into.ticket.cmp(&other.ticket) {
            core::cmp::Ordering::Less => (into.ticket, into.counted) = (other.ticket, other.counted),
            core::cmp::Ordering::Equal => into.counted = into.counted.saturating_add(other.counted),
            core::cmp::Ordering::Greater => {}
        }
        if other.end != other.start {
            into.add_run(other.start, other.end, other.leaf_shift, other.leaves);
        } else {
            into.leaves += other.leaves;
        }
        into.tables_unlinked |= other.tables_unlinked;
        if other.freed_head == 0 {
            return;
        }
        if into.freed_head != 0 {
            // `other`'s chain goes in front: its last link (0 now) names `into`'s first table.
            let mut link = other.freed_head;
            loop {
                let phys = link & !(LINK_SUBTREE | LINK_PRESENT);
                let Some(virt) = self.allocator.phys_to_virt(PhysAddr(phys)) else {
                    // Not this table's memory (cannot happen): keep `into`'s chain rather than lose it.
                    return;
                };
                let entries = entries_of(virt, 1 << self.geometry.level_bits);
                let slot = if link & LINK_SUBTREE != 0 {
                    self.subtree_link_slot(entries, virt)
                } else {
                    &entries[0]
                };
                let next = slot.load(Ordering::Relaxed);
                if next == 0 {
                    slot.store(into.freed_head, Ordering::Relaxed);
                    break;
                }
                link = next;
            }
        }
        into.freed_head = other.freed_head;
        into.freed += other.freed;
    }

    /// Gives the tables `gather` collected back to the allocator. `ActiveSmmu::flush` (and every domain operation)
    /// calls it after the invalidation that covers `gather` has completed; call it directly only for a table no
    /// SMMU walks, or after issuing that invalidation yourself.
    ///
    /// # Safety
    /// The invalidation that covers `gather` (by address over its span, or the whole ASID, VMID or regime; not
    /// leaf-only when [`Gather::tables_unlinked`]) has been issued for every SMMU that may walk this table, and a
    /// CMD_SYNC after it has completed: otherwise a walk cache may still name a freed table, which the allocator
    /// may hand out and a walk then read as descriptors.
    ///
    /// # Errors
    /// [`ForeignGather`] for a gather another table filled: nothing is freed, and the gather comes back.
    #[inline]
    pub unsafe fn release(&mut self, gather: Gather) -> Result<(), ForeignGather> {
        if !self.owns(&gather) {
            return Err(ForeignGather { table: self.id, gather });
        }
        if gather.freed_head != 0 {
            self.free_chain(gather.freed_head);
        }
        Ok(())
    }

    #[inline(never)]
    fn free_chain(&mut self, head: u64) {
        let size = 1usize << self.geometry.granule_bits;
        let free = |phys: u64, virt: NonNull<u8>| {
            // SAFETY: the table was allocated by this page table with this size, unlinked, and the caller has
            // completed the invalidation that covers walks through it.
            unsafe {
                self.allocator.free(DmaBlock {
                    phys: PhysAddr(phys),
                    virt,
                    size,
                })
            }
        };
        let mut next = head;
        while next != 0 {
            let phys = next & !(LINK_SUBTREE | LINK_PRESENT);
            let Some(virt) = self.allocator.phys_to_virt(PhysAddr(phys)) else {
                break;
            };
            let entries = entries_of(virt, 1 << self.geometry.level_bits);
            let first = entries[0].load(Ordering::Relaxed);
            let following = if next & LINK_SUBTREE != 0 {
                let slot = self.subtree_link_slot(entries, virt);
                let following = slot.load(Ordering::Relaxed);
                slot.store(0, Ordering::Relaxed);
                for e in entries {
                    let d = e.load(Ordering::Relaxed);
                    if desc::is_table(d, 2)
                        && let Some(child) = self.allocator.phys_to_virt(PhysAddr(desc::address(d)))
                    {
                        free(desc::address(d), child);
                    }
                }
                following
            } else {
                entries[0].store(0, Ordering::Relaxed);
                first
            };
            free(phys, virt);
            next = following;
        }
    }

    /// The output address `iova` translates to, and the protection, if it is mapped.
    pub fn translate(&self, iova: u64) -> Option<(u64, Prot)> {
        if iova >> self.format.input_bits != 0 {
            return None;
        }
        let mut level = self.geometry.start_level;
        let mut phys = self.root.phys.0;
        loop {
            let entries = self.table_entries(level, phys)?;
            let d = entries[self.geometry.index(level, iova)].load(Ordering::Acquire);
            if !desc::is_valid(d) {
                return None;
            }
            if desc::is_table(d, level) {
                phys = desc::address(d);
                level += 1;
                continue;
            }
            let offset = iova & ((1 << self.geometry.entry_shift(level)) - 1);
            return Some((desc::address(d) + offset, desc::prot(self.format.stage, d)));
        }
    }

    /// The output address `iova` translates to, if it is mapped.
    pub fn iova_to_phys(&self, iova: u64) -> Option<u64> {
        self.translate(iova).map(|(pa, _)| pa)
    }

    /// Calls `f` for every mapping (page or block), in address order.
    pub fn walk(&self, mut f: impl FnMut(Mapping)) {
        let stage = self.format.stage;
        self.visit(
            self.geometry.start_level,
            self.root_entries(),
            0,
            &mut |m, d| {
                f(Mapping {
                    prot: desc::prot(stage, d),
                    ..m
                })
            },
            None,
        );
    }

    fn visit(
        &self,
        level: u8,
        entries: &[AtomicU64],
        base: u64,
        f: &mut dyn FnMut(Mapping, u64),
        within: Option<(u64, u64)>,
    ) {
        let shift = self.geometry.entry_shift(level);
        for (i, e) in entries.iter().enumerate() {
            let iova = base + ((i as u64) << shift);
            let size = 1u64 << shift;
            if let Some((start, end)) = within
                && (iova + size <= start || end <= iova)
            {
                continue;
            }
            let d = e.load(Ordering::Acquire);
            if !desc::is_valid(d) {
                continue;
            }
            if desc::is_table(d, level) {
                if let Some(next) = self.table_entries(level + 1, desc::address(d)) {
                    self.visit(level + 1, next, iova, f, within);
                }
            } else {
                f(
                    Mapping {
                        iova,
                        pa: desc::address(d),
                        size,
                        prot: Prot::empty(),
                    },
                    d,
                );
            }
        }
    }
}

impl<A: FrameAllocator> Drop for IoPageTable<A> {
    /// Frees every table. The caller must have detached the table from the SMMU (and invalidated) first.
    fn drop(&mut self) {
        fn free_below<A: FrameAllocator>(t: &IoPageTable<A>, level: u8, entries: &[AtomicU64]) {
            if level == 3 {
                return;
            }
            let size = 1usize << t.geometry.granule_bits;
            for e in entries {
                let d = e.load(Ordering::Relaxed);
                if desc::is_table(d, level)
                    && let Some(virt) = t.allocator.phys_to_virt(PhysAddr(desc::address(d)))
                {
                    free_below(t, level + 1, entries_of(virt, 1 << t.geometry.level_bits));
                    // SAFETY: allocated by this table with this size; the owner detached the table.
                    unsafe {
                        t.allocator.free(DmaBlock {
                            phys: PhysAddr(desc::address(d)),
                            virt,
                            size,
                        })
                    };
                }
            }
        }
        free_below(self, self.geometry.start_level, self.root_entries());
        let root = DmaBlock {
            phys: self.root.phys,
            virt: self.root.virt,
            size: self.root.size,
        };
        // SAFETY: the root came from this allocator; nothing uses it after drop.
        unsafe { self.allocator.free(root) };
    }
}

#[cfg(test)]
mod tests;
