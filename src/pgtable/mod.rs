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
//! [`desc::SW_NO_TABLES`] promises that a table above the last level holds no table descriptor (set where the
//! driver knows it, cleared by every path that links a table into it), so a range unmap that empties it need not
//! read its entries to rule one out.
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
//! command queue does (DMB OSHST before every PROD write; `Iommu::flush`). For a coherent SMMU that single
//! barrier is all an unmap needs; for a non-coherent one each store is also cleaned to the point of coherency
//! (with its DSB) as it is made.
//!
//! **Who invalidates.** This module never issues a command. [`IoPageTable::unmap`] and [`IoPageTable::protect`]
//! add what they removed or changed to a [`Gather`]; the caller must issue the TLB invalidation it describes
//! (leaf-only unless [`Gather::tables_unlinked`], walk caches too then) and wait for its CMD_SYNC
//! (`Iommu::flush` does both, then calls [`IoPageTable::release`]). Until then the SMMU may still use the
//! old translations. A table that an unmap empties (or that a range unmap removes whole, or whose every valid
//! entry is a leaf the range removes, **with its leaves left in place**: clearing them would cost a write per
//! entry) or that a trim finds empty is unlinked and handed to the [`Gather`], and goes back to the allocator only through [`IoPageTable::release`] (an `unsafe fn`: its
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
mod gather;
mod map;
mod shared;
mod trim;
mod unmap;
mod walk;

use core::fmt;
use core::ptr::NonNull;

pub use self::desc::{MemoryType, Prot, Stage};
pub use crate::hw::command::Granule;
use crate::mem::{AllocError, Coherency, DmaBlock, FrameAllocator, Iova, PhysAddr, write_barrier};
use crate::sync::{AtomicU32, AtomicU64, Ordering};

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
#[non_exhaustive]
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
    /// A concurrent path ([`IoPageTable::unmap_page_shared`]) met a block mapping that the page lies in: removing
    /// part of a block splits it, a structural change that only the exclusive [`IoPageTable::unmap`] makes.
    NeedsExclusive {
        /// The page asked for.
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
            MapError::NeedsExclusive { iova } => {
                write!(
                    f,
                    "{iova:#x} lies in a block mapping: unmapping part of it needs exclusive access"
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
        // `core`'s atomic (a static), never a loom one: no protocol depends on it.
        static NEXT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(1);
        // Relaxed: only the uniqueness of the values matters, which the atomic read-modify-write gives.
        TableId(NEXT.fetch_add(1, core::sync::atomic::Ordering::Relaxed))
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

/// An IO page table.
pub struct IoPageTable<A: FrameAllocator> {
    /// This table's identity, stamped on the gathers it fills.
    id: TableId,
    format: Format,
    geometry: Geometry,
    root: DmaBlock,
    allocator: A,
    coherency: Coherency,
    /// Tables in use, the root included.
    tables: Counter,
    split_blocks: bool,
    /// Linked tables whose count is zero, waiting for a trim: last-level tables emptied by the single-page unmap,
    /// and any table `recount` found empty or that a concurrent path left empty (other code may leave an empty
    /// table at any level).
    empty: Counter,
    /// How many of those may stay linked before the single-page unmap trims (see `set_lazy_free_limit`).
    lazy_limit: u32,
    /// The protection of the last single-page map (checked expressible) and its page descriptor template, so that
    /// repeated maps with one protection neither re-check nor re-encode it. Starts as `None`, which no protection
    /// equals, so the first map takes the checked path (any `Prot` value, `Prot::empty()` included, may be asked
    /// for, so none can serve as the "nothing checked yet" mark).
    last_prot: Option<Prot>,
    last_template: u64,
    /// Which sixty-fourths of the root may hold a valid entry (bit `c`: the root's entries from
    /// `c * per` to `(c + 1) * per`, `per` its entries / 64, at least 1). Set before every map writes (a map
    /// reaches only the root entries its range covers); never cleared by a CPU path that may run beside another,
    /// only by [`IoPageTable::walk_exclusive`], which reads exactly the marked parts and clears those it finds
    /// empty. So a walk under `&mut` reads the root's few live lines, not its 4 KiB (or 64 KiB concatenated).
    /// A plain `core` atomic even under loom: only `&mut` paths read it.
    root_marks: core::sync::atomic::AtomicU64,
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

/// A number the table keeps beside its descriptors (tables in use, emptied tables waiting for a trim): an atomic,
/// so that the concurrent paths ([`IoPageTable::map_shared`], [`IoPageTable::unmap_page_shared`],
/// [`IoPageTable::trim_shared`]) change it through `&self`, while the exclusive paths (`&mut self`, where nothing
/// else can touch it) use a plain load and store rather than a locked read-modify-write.
///
/// Every access is `Relaxed`: these are statistics and a trim signal, and no memory is reached through them. On
/// the concurrent paths the increments and decrements of one table's transitions may land in either order (a map
/// refilling a table may decrement `empty` before the unmap that emptied it increments it), so the value is read
/// as a signed number that can be briefly negative ([`Counter::signed`]); once the concurrent operations are over,
/// it is exact.
struct Counter(AtomicU32);

impl Counter {
    fn new(value: u32) -> Self {
        Counter(AtomicU32::new(value))
    }

    /// The value, as a signed number (briefly negative while concurrent operations are in flight).
    #[inline]
    fn signed(&self) -> i32 {
        self.0.load(Ordering::Relaxed) as i32
    }

    /// The value, 0 while it is briefly negative.
    #[inline]
    fn get(&self) -> u32 {
        self.signed().max(0) as u32
    }

    /// Sets the value (exclusive access).
    #[inline]
    fn set(&mut self, value: u32) {
        self.0.store(value, Ordering::Relaxed);
    }

    /// Adds `n` (exclusive access: a plain load and store).
    #[inline]
    fn add(&mut self, n: u32) {
        self.0
            .store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    /// Subtracts 1 unless the value is already 0 or below (exclusive access).
    #[inline]
    fn decrement(&mut self) {
        let v = self.signed();
        if v > 0 {
            self.0.store(v as u32 - 1, Ordering::Relaxed);
        }
    }

    /// Adds `n` (any number of CPUs at once: an atomic read-modify-write, wrapping).
    #[inline]
    fn add_shared(&self, n: u32) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Subtracts `n` (any number of CPUs at once: wrapping, so the value may be briefly negative).
    #[inline]
    fn sub_shared(&self, n: u32) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Writes `first`, `first + (1 << shift)`, `first + (2 << shift)`, ... into `entries`, which no other CPU
/// accesses: a table not linked yet, or entries of a live table that `&mut self` keeps from every other CPU-side
/// access. A running sum (each entry the previous one plus `1 << shift`) rather than `first + (k << shift)`: the
/// compiler keeps a vector of consecutive entries and adds a constant to it, one add per vector of stores, where
/// the shifted index cost a shift and an add per vector on top (and not every vector ISA multiplies 64-bit lanes,
/// so no step multiplies either).
#[inline(always)]
fn fill(entries: &[AtomicU64], first: u64, shift: u32) {
    #[cfg(not(all(loom, test)))]
    {
        // SAFETY: `entries`, which the caller has to itself (see above), viewed as plain words. Plain stores let
        // the compiler write several entries per instruction; every entry is 8-byte aligned, and the architecture
        // makes each 64-bit element of a wider aligned store single-copy atomic, so the SMMU sees every entry
        // either as it was or whole.
        let mut words = unsafe { core::slice::from_raw_parts_mut(entries.as_ptr() as *mut u64, entries.len()) };
        let (step, mut d) = (1u64 << shift, first);
        // The vector stores from a 16-byte boundary: a run from an odd entry (a range from the second block of a
        // table) would otherwise split every fourth 16-byte store (SSE2, NEON) across two cache lines.
        if !(words.as_ptr() as usize).is_multiple_of(16)
            && let Some((w, rest)) = core::mem::take(&mut words).split_first_mut()
        {
            *w = d;
            d = d.wrapping_add(step);
            words = rest;
        }
        for w in words {
            *w = d;
            d = d.wrapping_add(step);
        }
    }
    // Under loom the entries are loom's atomics, not plain words.
    #[cfg(all(loom, test))]
    for (k, e) in entries.iter().enumerate() {
        e.store(first + ((k as u64) << shift), Ordering::Relaxed);
    }
}

/// Writes every entry of a table that nothing links yet (a frame from [`FrameAllocator::allocate_for_overwrite`],
/// whose old contents may be anything): `first`, `first + (1 << shift)`, ... into `entries[run]` (as [`fill`]),
/// and 0 into every other entry, each entry once.
#[inline(always)]
fn fill_table(entries: &[AtomicU64], run: core::ops::Range<usize>, first: u64, shift: u32) {
    #[cfg(not(all(loom, test)))]
    {
        let words = entries.as_ptr() as *mut u64;
        // The zeros outside the lines the run touches in whole cache lines, by memset (a fast-string memset starts
        // slower on a destination that is not line-aligned); the run's partial lines at its ends zeroed by one
        // fixed-size line store each (inline stores: a call to memset for 64 bytes costs more than the bytes),
        // the run then written over them.
        const LINE: usize = 8;
        debug_assert!(entries.len().is_multiple_of(LINE));
        let (head, tail) = (run.start - run.start % LINE, run.end.next_multiple_of(LINE));
        // SAFETY: every range lies inside `entries` (a table's entries are a whole number of lines, at least one;
        // `head` <= `run.start` <= `run.end` <= `tail` <= its length, and a partial line's start is inside it),
        // a table no one else can reach yet. `write_bytes` becomes the platform's memset, the fastest way to
        // store many zeros; an empty side is skipped rather than passed to it.
        unsafe {
            if head > 0 {
                words.write_bytes(0, head);
            }
            if tail < entries.len() {
                words.add(tail).write_bytes(0, entries.len() - tail);
            }
            if !run.start.is_multiple_of(LINE) {
                words.add(head).cast::<[u64; LINE]>().write([0; LINE]);
            }
            if !run.end.is_multiple_of(LINE) {
                words
                    .add(run.end - run.end % LINE)
                    .cast::<[u64; LINE]>()
                    .write([0; LINE]);
            }
        }
    }
    #[cfg(all(loom, test))]
    for e in entries[..run.start].iter().chain(&entries[run.end..]) {
        e.store(0, Ordering::Relaxed);
    }
    fill(&entries[run], first, shift);
}

/// How many of `entries` are valid, in a table no other CPU writes (`&mut self`, or unlinked).
#[inline]
fn count_valid(entries: &[AtomicU64]) -> u64 {
    #[cfg(not(all(loom, test)))]
    {
        // SAFETY: live entries that nothing writes meanwhile (see above; the SMMU only reads descriptors:
        // hardware updates are not enabled). Plain reads let the count use wide loads.
        let words = unsafe { core::slice::from_raw_parts(entries.as_ptr() as *const u64, entries.len()) };
        words.iter().map(|d| d & desc::VALID).sum::<u64>()
    }
    #[cfg(all(loom, test))]
    entries
        .iter()
        .map(|e| e.load(Ordering::Relaxed) & desc::VALID)
        .sum::<u64>()
}

/// Frames a walk allocates below one entry: at most one per level below the root.
type Frames = heapless::Vec<DmaBlock, 3>;

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
            tables: Counter::new(1),
            split_blocks: false,
            empty: Counter::new(0),
            lazy_limit: DEFAULT_LAZY_FREE_LIMIT,
            last_prot: None,
            last_template: 0,
            root_marks: core::sync::atomic::AtomicU64::new(0),
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
            tables: Counter::new(1),
            split_blocks: false,
            empty: Counter::new(0),
            lazy_limit: DEFAULT_LAZY_FREE_LIMIT,
            last_prot: None,
            last_template: 0,
            // A previous image's root: any part may be live (the first exclusive walk narrows this).
            root_marks: core::sync::atomic::AtomicU64::new(u64::MAX),
        };
        match counts {
            Some(c) => {
                table.tables.set(c.tables.max(1));
                table.empty.set(c.empty);
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
        self.tables.get()
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

    /// log2 of the root entries one bit of `root_marks` covers.
    #[inline]
    fn root_mark_shift(&self) -> u32 {
        self.geometry.root_entries.trailing_zeros().saturating_sub(6)
    }

    /// The `root_marks` bits of the root entries that `[iova, iova + size)` reaches (a range inside the input
    /// space: the caller checked it; an empty one counts as its first granule).
    #[inline]
    fn root_marks_of(&self, iova: u64, size: u64) -> u64 {
        let g = &self.geometry;
        let shift = u32::from(g.entry_shift(g.start_level)) + self.root_mark_shift();
        let last = iova.saturating_add(size.max(1) - 1);
        // Both below 64: the root's entries cover the input space exactly, in at most 64 parts.
        let (first, last) = (((iova >> shift) & 63) as u32, ((last >> shift) & 63) as u32);
        (u64::MAX >> (63 - last)) & (u64::MAX << first)
    }

    /// Marks the root parts `[iova, iova + size)` reaches as possibly live, before a map writes there (exclusive).
    #[inline]
    fn mark_root(&mut self, iova: u64, size: u64) {
        let marks = self.root_marks_of(iova, size);
        *self.root_marks.get_mut() |= marks;
    }

    /// [`IoPageTable::mark_root`] beside other CPUs: an atomic OR, skipped when the parts are marked already (the
    /// usual case), so concurrent maps do not all write one word.
    #[inline]
    fn mark_root_shared(&self, iova: u64, size: u64) {
        let marks = self.root_marks_of(iova, size);
        if self.root_marks.load(Ordering::Relaxed) & marks != marks {
            self.root_marks.fetch_or(marks, Ordering::Relaxed);
        }
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

    /// Sets the count of the table that the table descriptor in `entry` names (at `child_level`) to `n`, and
    /// when `linked` (a table was linked into that table) clears its [`desc::SW_NO_TABLES`]. Only bits the walk
    /// ignores change, so the store needs no cache maintenance and no barrier: the SMMU sees the old or the new
    /// word, and both name the same table.
    fn set_count(&mut self, entry: &AtomicU64, child_level: u8, n: usize, linked: bool) {
        let d = entry.load(Ordering::Relaxed);
        if desc::count(d) == 0 && n > 0 {
            self.empty.decrement();
        }
        let keep = if linked { !desc::SW_NO_TABLES } else { !0 };
        entry.store(self.with_count(d, child_level, n) & keep, Ordering::Relaxed);
    }

    /// The table descriptor `d` is going: if it named an empty table (a last-level table left empty by
    /// `unmap_page`, or any table `recount` found empty), that table no longer waits for a trim.
    fn forget_if_empty(&mut self, d: u64) {
        if desc::is_valid(d) && desc::count(d) == 0 {
            self.empty.decrement();
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
        self.empty.get()
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
mod checks;
#[cfg(all(test, not(loom)))]
mod concurrent_tests;
#[cfg(all(test, loom))]
mod loom_models;
#[cfg(all(test, not(loom)))]
mod tests;
