//! What a restore examines in the preserved memory itself before it installs anything (the region's records are
//! validated by [`super::format::decode`]; this checks that the memory they point at says what they say): every
//! preserved page table walked from its root, every adopted CD compared with the one the driver builds. See
//! `docs/handover.md`, "Threat model", for what this guards against and what it trusts.
//!
//! The walk is cheap enough to run on every restore: per last-level table one tight loop gathers the entries'
//! count, the union of their bits and the lowest and highest output address, and the output range is checked once
//! per table (each leaf is looked at again only when that summary fails, to name the first bad one, or when a
//! table's outputs span several DMA-able extents).

use core::fmt;

use super::pool::{FRAME, HandoverPool, PreservedView};
use super::{DomainRecord, Entries, Extent, InstanceRecords, RecordKind, TableShape};
use crate::hw::ste::EntryError;
use crate::mem::PhysAddr;
use crate::pgtable::{Format, Geometry, Granule, MapError, Stage, desc};
use crate::smmu::features::Features;

/// How much of the preserved memory [`crate::Iommu::restore_handover`] examines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Verification {
    /// Every preserved page table is walked from its root before anything is installed (the default): see
    /// [`VerifyFailure`] for what is checked.
    #[default]
    Full,
    /// The page tables are adopted as recorded, unread (the CDs are still compared, the records still validated).
    /// **Risk:** a table descriptor, a leaf or a count changed in preserved memory (by the previous image, by
    /// anything that could write RAM during the reset window) is installed as it stands: a device may then reach
    /// any memory, the handover region and this image's own tables included, and a wrong count lets a later
    /// unmap free a table still in use. Use it only where preserved memory is known not to have been written
    /// since the previous image prepared it.
    TrustRecordedTables,
}

/// What a restore is told besides the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreOptions<'a> {
    /// The memory devices may be given (physical): every leaf of a preserved table must lie inside one of these
    /// extents, and outside the handover region and every extent declared with
    /// [`crate::Iommu::protect_memory`].
    pub dma_memory: &'a [Extent],
    /// How much to examine.
    pub verify: Verification,
}

impl<'a> RestoreOptions<'a> {
    /// Full verification against `dma_memory`.
    pub const fn new(dma_memory: &'a [Extent]) -> Self {
        RestoreOptions {
            dma_memory,
            verify: Verification::Full,
        }
    }
}

/// What verification found wrong in a record's preserved memory. Addresses are physical: `entry` is the
/// descriptor's own address, `table` the table it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerifyFailure {
    /// The record's shape does not describe a table this driver builds.
    Format(MapError),
    /// The recorded starting level is not the one the format implies (and the STE will use).
    StartLevel {
        /// Recorded.
        recorded: u8,
        /// Implied by granule and input size.
        expected: u8,
    },
    /// The record's extents span more granules than one walk tracks.
    ExtentTooLarge {
        /// The span of the extents: from the first one's base to the last one's end.
        extent: Extent,
        /// The largest extent verified, in bytes, at this granule.
        max: u64,
    },
    /// The root table is not wholly inside one of the record's extents, or not aligned to its size.
    BadRoot {
        /// Its address.
        root: u64,
        /// Its size.
        size: u64,
    },
    /// A table descriptor names a table outside the record's own extents.
    TableOutsideExtent {
        /// The descriptor.
        entry: u64,
        /// The table.
        table: u64,
    },
    /// A table descriptor names an address that is not aligned to the granule.
    MisalignedTable {
        /// The descriptor.
        entry: u64,
        /// The table.
        table: u64,
    },
    /// A table is reached a second time (a cycle, two descriptors naming one table, or a table inside the root or
    /// inside a CD table).
    TableReachedTwice {
        /// The second descriptor.
        entry: u64,
        /// The table.
        table: u64,
    },
    /// A descriptor this driver never writes.
    BadDescriptor {
        /// The descriptor.
        entry: u64,
        /// Its level.
        level: u8,
        /// Its value.
        descriptor: u64,
        /// What is wrong.
        what: DescriptorDefect,
    },
    /// A table descriptor's live-entry count differs from the table it names.
    CountMismatch {
        /// The descriptor.
        entry: u64,
        /// What the descriptor says.
        recorded: usize,
        /// Valid entries found.
        walked: usize,
    },
    /// A table descriptor's full bit or trim mark contradicts the table it names.
    SoftwareBits {
        /// The descriptor.
        entry: u64,
        /// Its value.
        descriptor: u64,
        /// What is wrong.
        what: SoftwareBitsDefect,
    },
    /// The record's table count (or emptied-table count) differs from the tables walked.
    TableTotals {
        /// Which count.
        what: TableTotal,
        /// Recorded.
        recorded: u32,
        /// Walked.
        walked: u32,
    },
    /// A leaf's output is not inside memory declared DMA-able.
    OutputOutsideDmaMemory {
        /// The leaf descriptor.
        entry: u64,
        /// Its output address.
        output: u64,
        /// The bytes it maps.
        size: u64,
    },
    /// A leaf's output reaches the handover region or memory declared protected.
    OutputProtected {
        /// The leaf descriptor.
        entry: u64,
        /// Its output address.
        output: u64,
        /// The bytes it maps.
        size: u64,
        /// The protected extent it reaches.
        protected: Extent,
    },
    /// A substream's record names another CD table (or width) than its stream's record.
    CdTableMismatch {
        /// StreamID.
        sid: u32,
        /// SubstreamID.
        ssid: u32,
        /// The CD table this record names.
        recorded: u64,
        /// The one the stream's record names.
        stream: u64,
    },
    /// A stream's CD table is not where the driver allocates one: at the start of a frame of its domain's memory,
    /// aligned to its size (at least [`FRAME`] bytes). Adopted elsewhere, a detach would give its block back
    /// as a frame it does not start.
    CdTableMisplaced {
        /// StreamID.
        sid: u32,
        /// The CD table.
        cd_table: u64,
    },
    /// A stream's CD table does not have its frames to itself: another stream's CD table (two streams naming one
    /// table included) or the domain's root table shares one. Adopted, a detach of one stream would free the
    /// table (or the frame) under the other's live STE.
    CdTableOverlap {
        /// StreamID.
        sid: u32,
        /// The CD table.
        cd_table: u64,
        /// The CD table or root table it shares a frame with.
        other: u64,
    },
    /// A CD does not lie in the pool.
    CdOutsidePool {
        /// StreamID.
        sid: u32,
        /// SubstreamID.
        ssid: u32,
        /// The CD's address.
        cd: u64,
    },
    /// The CD the driver would build for the record could not be built.
    CdBuild(EntryError),
    /// A nested record's guest context cannot go into an STE of this SMMU (what `create_nested` and `attach`
    /// refuse): found before any STE is written rather than half-way through the rebuild.
    GuestContext {
        /// What is beyond this SMMU: its `Display` names the value's meaning.
        what: GuestContextLimit,
        /// The value (which [`GuestContextLimit`] variant says what it is).
        value: u64,
    },
    /// An adopted CD differs from the one the driver builds for the record.
    CdMismatch {
        /// StreamID.
        sid: u32,
        /// SubstreamID.
        ssid: u32,
        /// The CD's address.
        cd: u64,
        /// The first differing word (0..8).
        word: usize,
        /// Its value in memory.
        found: u64,
        /// The value the driver builds.
        expected: u64,
    },
}

/// What is wrong with a descriptor this driver never writes ([`VerifyFailure::BadDescriptor`]). Its `Display` is
/// the words after the descriptor's address and value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DescriptorDefect {
    /// A table descriptor with bits this driver never sets (APTable, XNTable, NSTable, address bits \[51:48\], ...).
    TableBits,
    /// A block descriptor at a level where the granule allows no block.
    BlockNotAllowed,
    /// A leaf (block or page) with the contiguous hint or output address bits \[51:48\] set, which this driver never
    /// sets.
    ForbiddenLeafBits,
    /// A block whose output address is not aligned to the block's size (RES0 bits set).
    MisalignedBlockOutput,
    /// A level-3 descriptor with the reserved encoding (bits \[1:0\] = 0b01).
    ReservedEncoding,
    /// A page whose output address has bits set below the granule.
    MisalignedPageOutput,
    /// A leaf (block or page) with attribute bits this driver never writes for its stage (nG, AP/S2AP, XN,
    /// AttrIndx/MemAttr, SH, AF, NS, software or PBHA bits): not the leaf it builds for the protection these bits
    /// grant.
    NotADriverLeaf,
}

impl fmt::Display for DescriptorDefect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DescriptorDefect::TableBits => {
                "a table descriptor with bits this driver never sets (APTable, XNTable, NSTable, address bits \
                 [51:48], ...)"
            }
            DescriptorDefect::BlockNotAllowed => "a block where the granule allows none",
            DescriptorDefect::ForbiddenLeafBits => {
                "the contiguous hint or output bits [51:48], which this driver never sets"
            }
            DescriptorDefect::MisalignedBlockOutput => "a block output not aligned to its size (RES0 bits set)",
            DescriptorDefect::ReservedEncoding => "a reserved encoding (bits [1:0] = 0b01 at level 3)",
            DescriptorDefect::MisalignedPageOutput => "output address bits below the granule",
            DescriptorDefect::NotADriverLeaf => {
                "attribute bits this driver never writes for this stage (nG, AP/S2AP, XN, AttrIndx/MemAttr, SH, AF, \
                 NS, software or PBHA bits): not the leaf it builds for the protection these bits grant"
            }
        })
    }
}

/// Which software bit of a table descriptor contradicts the table it names ([`VerifyFailure::SoftwareBits`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SoftwareBitsDefect {
    /// The no-tables bit is set, yet the descriptor names a last-level table or a table that holds a table
    /// descriptor (a range unmap trusting it would unlink the table without its subtables).
    NoTablesBit,
    /// The full bit is set on a table that is not a full last-level table, or clear on one that is.
    FullBit,
    /// No trim mark, yet the descriptor leads to an emptied table.
    MissingTrimMark,
}

impl fmt::Display for SoftwareBitsDefect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SoftwareBitsDefect::NoTablesBit => {
                "its no-tables bit is set, yet it names a last-level table or a table that holds one"
            }
            SoftwareBitsDefect::FullBit => "its full bit disagrees with the table it names",
            SoftwareBitsDefect::MissingTrimMark => "no trim mark, yet it leads to an emptied table",
        })
    }
}

/// Which of a record's table counts differs from the tables walked ([`VerifyFailure::TableTotals`]). Its `Display`
/// is the counted noun ("tables", "emptied tables").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TableTotal {
    /// Every table of the record, the root included.
    Tables,
    /// The tables without a valid entry (left for a trim).
    EmptiedTables,
}

impl fmt::Display for TableTotal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TableTotal::Tables => "tables",
            TableTotal::EmptiedTables => "emptied tables",
        })
    }
}

/// What a nested record's guest context holds that cannot go into an STE of this SMMU
/// ([`VerifyFailure::GuestContext`]); each variant says what the failure's `value` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GuestContextLimit {
    /// An S1CDMax (the guest CD table's SubstreamID bits) beyond this SMMU's SubstreamID bits (IDR1.SSIDSIZE):
    /// `value` is the S1CDMax.
    CdMaxBeyondSsidBits,
    /// A guest CD table IPA beyond the 52 bits of the STE's S1ContextPtr (checked for a record with streams):
    /// `value` is the IPA.
    CdTableIpaBeyondContextPtr,
}

impl fmt::Display for GuestContextLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GuestContextLimit::CdMaxBeyondSsidBits => "an S1CDMax beyond this SMMU's SubstreamID bits",
            GuestContextLimit::CdTableIpaBeyondContextPtr => "a CD table IPA beyond S1ContextPtr's 52 bits",
        })
    }
}

impl fmt::Display for VerifyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use VerifyFailure as V;
        match *self {
            V::Format(e) => write!(f, "its table format: {e}"),
            V::StartLevel { recorded, expected } => {
                write!(
                    f,
                    "its table starts at level {recorded}, the format implies level {expected}"
                )
            }
            V::ExtentTooLarge { extent, max } => write!(
                f,
                "its extents span {:#x}+{:#x}, more than verification tracks ({max:#x} bytes)",
                extent.base, extent.len
            ),
            V::BadRoot { root, size } => write!(
                f,
                "root table {root:#x} ({size:#x} bytes) is misaligned or outside its extents"
            ),
            V::TableOutsideExtent { entry, table } => {
                write!(
                    f,
                    "descriptor at {entry:#x} names table {table:#x}, outside its own extents"
                )
            }
            V::MisalignedTable { entry, table } => {
                write!(
                    f,
                    "descriptor at {entry:#x} names table {table:#x}, not aligned to the granule"
                )
            }
            V::TableReachedTwice { entry, table } => write!(
                f,
                "descriptor at {entry:#x} names table {table:#x}, reached before (a cycle, a shared table, or the root \
                 or a CD table)"
            ),
            V::BadDescriptor {
                entry,
                level,
                descriptor,
                what,
            } => write!(f, "level-{level} descriptor at {entry:#x} = {descriptor:#x}: {what}"),
            V::CountMismatch {
                entry,
                recorded,
                walked,
            } => write!(
                f,
                "descriptor at {entry:#x} counts {recorded} live entries, its table holds {walked}"
            ),
            V::SoftwareBits {
                entry,
                descriptor,
                what,
            } => {
                write!(f, "descriptor at {entry:#x} = {descriptor:#x}: {what}")
            }
            V::TableTotals { what, recorded, walked } => {
                write!(f, "{recorded} {what} recorded, {walked} walked")
            }
            V::OutputOutsideDmaMemory { entry, output, size } => write!(
                f,
                "leaf at {entry:#x} maps {output:#x}+{size:#x}, outside the memory declared DMA-able"
            ),
            V::OutputProtected {
                entry,
                output,
                size,
                protected,
            } => write!(
                f,
                "leaf at {entry:#x} maps {output:#x}+{size:#x}, inside protected memory {:#x}+{:#x}",
                protected.base, protected.len
            ),
            V::CdTableMismatch {
                sid,
                ssid,
                recorded,
                stream,
            } => write!(
                f,
                "stream {sid:#x} substream {ssid:#x} names CD table {recorded:#x}, its stream's record {stream:#x}"
            ),
            V::CdTableMisplaced { sid, cd_table } => write!(
                f,
                "the CD table of stream {sid:#x} at {cd_table:#x} does not start a frame aligned to its size, as the \
                 driver allocates one"
            ),
            V::CdTableOverlap { sid, cd_table, other } => write!(
                f,
                "the CD table of stream {sid:#x} at {cd_table:#x} shares a frame with the table at {other:#x}"
            ),
            V::CdOutsidePool { sid, ssid, cd } => {
                write!(
                    f,
                    "the CD of stream {sid:#x} substream {ssid:#x} at {cd:#x} is outside the pool"
                )
            }
            V::CdBuild(e) => write!(f, "its CD cannot be built: {e}"),
            V::GuestContext { what, value } => write!(f, "its guest context has {what} ({value:#x})"),
            V::CdMismatch {
                sid,
                ssid,
                cd,
                word,
                found,
                expected,
            } => write!(
                f,
                "the CD of stream {sid:#x} substream {ssid:#x} at {cd:#x}: word {word} is {found:#x}, the driver builds \
                 {expected:#x}"
            ),
        }
    }
}

/// Granules of one record's extents that a walk tracks (its visited bitmap: 8 KiB on the stack). With 4 KiB
/// granules up to 256 MiB of frames: the tables of 128 GiB mapped in 4 KiB pages, wherever in the pool the frames
/// lie when the record has at most [`RANKED_RUNS`] runs (and within a span of 256 MiB when it has more).
pub const MAX_VERIFIED_GRANULES: usize = 1 << 16;

/// Runs of a record whose granules the walk counts one run after another (2 KiB of ranks on the stack); a record
/// with more is tracked over the span of its runs.
pub const RANKED_RUNS: usize = 512;

/// Output address bits \[51:12\] of a leaf (bits \[51:48\] included, so that a leaf setting them, which this driver
/// never does, cannot pass for a lower address).
const LEAF_ADDRESS: u64 = ((1 << 52) - 1) & !0xfff;
/// Leaf bits this driver never sets: the contiguous hint (a misprogrammed contiguous run may translate with
/// another entry's output) and output bits \[51:48\].
const FORBIDDEN_LEAF: u64 = desc::CONTIGUOUS | 0xf << 48;
/// Every bit this driver sets in a table descriptor.
const TABLE_BITS: u64 = desc::VALID
    | desc::TABLE_OR_PAGE
    | desc::OUTPUT_ADDRESS
    | desc::SW_COUNT_LOW
    | desc::SW_COUNT_HIGH
    | desc::SW_TABLE_FULL
    | desc::SW_TRIM_CANDIDATE
    | desc::SW_NO_TABLES;

/// Where leaves may point.
pub(crate) struct Outputs<'a> {
    /// Memory declared DMA-able.
    pub(crate) dma: &'a [Extent],
    /// The handover region.
    pub(crate) region: Extent,
    /// Memory declared protected.
    pub(crate) protected: &'a [Extent],
}

/// Why an output range may not be given to a device.
pub(crate) enum Refusal {
    /// It reaches the handover region or protected memory (this extent).
    Protected(Extent),
    /// It is not inside the allowed memory.
    Outside,
}

impl Outputs<'_> {
    /// Whether a leaf may map `[output, output + size)`.
    #[inline]
    pub(crate) fn judge(&self, output: u64, size: u64) -> Result<(), Refusal> {
        let end = output.checked_add(size).ok_or(Refusal::Outside)?;
        if let Some(&protected) = core::iter::once(&self.region)
            .chain(self.protected)
            .find(|p| output < p.base.saturating_add(p.len) && p.base < end)
        {
            return Err(Refusal::Protected(protected));
        }
        if !self.dma.iter().any(|e| e.contains(output, size)) {
            return Err(Refusal::Outside);
        }
        Ok(())
    }

    /// [`Outputs::judge`] for a leaf at `entry`.
    fn check(&self, entry: u64, output: u64, size: u64) -> Result<(), VerifyFailure> {
        self.judge(output, size).map_err(|refusal| match refusal {
            Refusal::Protected(protected) => VerifyFailure::OutputProtected {
                entry,
                output,
                size,
                protected,
            },
            Refusal::Outside => VerifyFailure::OutputOutsideDmaMemory { entry, output, size },
        })
    }
}

/// Whether `[base, base + len)` lies inside one of `runs` (ascending, not overlapping): a binary search.
fn within(runs: &Entries<'_, Extent>, base: u64, len: u64) -> bool {
    run_holding(runs, base, len).is_some()
}

/// The run of `runs` (ascending, not overlapping) that holds `[base, base + len)`, with its index.
fn run_holding(runs: &Entries<'_, Extent>, base: u64, len: u64) -> Option<(usize, Extent)> {
    let (mut lo, mut hi) = (0, runs.len());
    // The last run whose base is at or below `base`.
    while lo < hi {
        let mid = (lo + hi) / 2;
        match runs.get(mid) {
            Some(run) if run.base <= base => lo = mid + 1,
            _ => hi = mid,
        }
    }
    let index = lo.checked_sub(1)?;
    let run = runs.get(index)?;
    run.contains(base, len).then_some((index, run))
}

/// Granules of `run` (counted from the one holding its first byte to the one holding its last).
fn granules_of(run: Extent, bits: u32) -> u64 {
    ((run.base + run.len - 1) >> bits) - (run.base >> bits) + 1
}

/// One record's table, walked from its root.
struct Walk<'a> {
    /// Reads the pool's frames where they are.
    view: PreservedView,
    /// The record's extents (ascending, as decoding checked), and their span.
    runs: Entries<'a, Extent>,
    span: Extent,
    /// The table's stage (and regime): which leaf encodings the driver writes.
    stage: Stage,
    /// The attribute bits of the last last-level table found uniform and a driver page's (most tables of a
    /// domain share one protection: the check then costs one comparison per table).
    page_attributes: u64,
    geometry: Geometry,
    /// One bit per granule of the runs, counted one run after another from `ranks` (the bit of run `k`'s first
    /// granule), or, for a record with more runs than [`RANKED_RUNS`], one per granule of their span: a table
    /// lives there.
    visited: &'a mut [u64],
    ranks: Option<&'a [u32]>,
    outputs: &'a Outputs<'a>,
    /// The record carries counts: check every descriptor's against its table.
    counts: bool,
    tables: u32,
    empty: u32,
}

impl<'a> Walk<'a> {
    fn granule(&self) -> u64 {
        1 << self.geometry.granule_bits
    }

    /// The `n` entries of the table at `phys` (claimed: inside one of the extents).
    fn entries(&self, phys: u64, n: usize) -> &'a [u64] {
        let table = Extent {
            base: phys,
            len: n as u64 * 8,
        };
        // SAFETY: `check_limits` found every frame of the record's extents free (no memory of this image holds
        // them, so nothing here writes them until the restore adopts them, after this walk), and a claimed
        // table lies inside one of them.
        unsafe { self.view.words(table) }.unwrap_or_default()
    }

    /// Marks the granule-aligned `[phys, phys + size)` as a table's: inside the extent, sharing no byte with a CD
    /// table, and never claimed before.
    fn claim(&mut self, entry: u64, phys: u64, size: u64) -> Result<(), VerifyFailure> {
        if !phys.is_multiple_of(self.granule()) {
            return Err(VerifyFailure::MisalignedTable { entry, table: phys });
        }
        let Some((index, run)) = run_holding(&self.runs, phys, size) else {
            return Err(VerifyFailure::TableOutsideExtent { entry, table: phys });
        };
        let twice = VerifyFailure::TableReachedTwice { entry, table: phys };
        let bits = self.geometry.granule_bits;
        // The bitmap counts the granules of the runs one after another (ranked), or those of their span.
        let (origin, first) = match self.ranks {
            Some(ranks) => (run.base >> bits, u64::from(ranks[index])),
            None => (self.span.base >> bits, 0),
        };
        for g in first + (phys >> bits) - origin..first + ((phys + size) >> bits) - origin {
            let (word, bit) = ((g / 64) as usize, 1u64 << (g % 64));
            if self.visited[word] & bit != 0 {
                return Err(twice);
            }
            self.visited[word] |= bit;
        }
        Ok(())
    }

    /// Marks the granules of the record's CD tables (found where the driver allocates them by
    /// [`cd_table_frames`]) as claimed, so that a table that shares a byte with one is reached twice: one bit test
    /// per table, however many streams the record has. CD tables may share a granule larger than their frames
    /// (each is a frame of its own, which `cd_table_frames` checked).
    fn mark_cd_tables(&mut self, streams: &Entries<'_, super::StreamRecord>) {
        let bits = self.geometry.granule_bits;
        for s in streams.iter().filter(|s| s.ssid == 0 && s.cd_table != 0) {
            let size = (64u64 << s.cd_ssid_bits).next_multiple_of(FRAME);
            let first = s.cd_table >> bits;
            let last = (s.cd_table + size - 1) >> bits;
            for granule in first..=last {
                let phys = granule << bits;
                // A granule no run holds whole cannot hold a table either.
                let Some((index, run)) = run_holding(&self.runs, phys, 1 << bits) else {
                    continue;
                };
                let (origin, first) = match self.ranks {
                    Some(ranks) => (run.base >> bits, u64::from(ranks[index])),
                    None => (self.span.base >> bits, 0),
                };
                let g = first + granule - origin;
                self.visited[(g / 64) as usize] |= 1 << (g % 64);
            }
        }
    }

    /// Walks the table at `phys` (level `level` < 3, `n` entries): its valid entries, whether one of its
    /// descriptors carries a trim mark, and whether it holds a table descriptor.
    fn table(&mut self, level: u8, phys: u64, n: usize) -> Result<(usize, bool, bool), VerifyFailure> {
        let entries = self.entries(phys, n);
        let child_entries = 1usize << self.geometry.level_bits;
        let (mut valid, mut marked, mut holds_table) = (0, false, false);
        for (i, &d) in entries.iter().enumerate() {
            if !desc::is_valid(d) {
                continue;
            }
            valid += 1;
            let entry = phys + 8 * i as u64;
            if d & desc::TABLE_OR_PAGE == 0 {
                self.block(entry, level, d)?;
                continue;
            }
            if d & !TABLE_BITS != 0 {
                return Err(VerifyFailure::BadDescriptor {
                    entry,
                    level,
                    descriptor: d,
                    what: DescriptorDefect::TableBits,
                });
            }
            holds_table = true;
            let child = desc::address(d);
            self.claim(entry, child, self.granule())?;
            let (walked, below, tables) = if level + 1 == 3 {
                // A descriptor that says its table is full lets the walk try the cheapest pass first.
                let full = self.counts && d & desc::SW_TABLE_FULL != 0;
                (self.leaf_table(child, child_entries, full)?, false, false)
            } else {
                self.table(level + 1, child, child_entries)?
            };
            // A promise a range unmap relies on to skip reading the table: refused when untrue, whether or not
            // the record carries counts (without them the adopting image rebuilds the bit, but a lie is a table
            // this driver did not leave).
            if d & desc::SW_NO_TABLES != 0 && (level + 1 == 3 || tables) {
                return Err(VerifyFailure::SoftwareBits {
                    entry,
                    descriptor: d,
                    what: SoftwareBitsDefect::NoTablesBit,
                });
            }
            self.tables += 1;
            self.empty += u32::from(walked == 0);
            marked |= d & desc::SW_TRIM_CANDIDATE != 0;
            if !self.counts {
                continue;
            }
            if desc::count(d) != walked {
                return Err(VerifyFailure::CountMismatch {
                    entry,
                    recorded: desc::count(d),
                    walked,
                });
            }
            let full = level + 1 == 3 && walked == child_entries;
            if (d & desc::SW_TABLE_FULL != 0) != full {
                return Err(VerifyFailure::SoftwareBits {
                    entry,
                    descriptor: d,
                    what: SoftwareBitsDefect::FullBit,
                });
            }
            if (walked == 0 || below) && d & desc::SW_TRIM_CANDIDATE == 0 {
                return Err(VerifyFailure::SoftwareBits {
                    entry,
                    descriptor: d,
                    what: SoftwareBitsDefect::MissingTrimMark,
                });
            }
        }
        Ok((valid, marked, holds_table))
    }

    /// A block descriptor at `level` (< 3).
    fn block(&self, entry: u64, level: u8, d: u64) -> Result<(), VerifyFailure> {
        let bad = |what| VerifyFailure::BadDescriptor {
            entry,
            level,
            descriptor: d,
            what,
        };
        if !self.geometry.block_allowed(level) {
            return Err(bad(DescriptorDefect::BlockNotAllowed));
        }
        let size = 1u64 << self.geometry.entry_shift(level);
        if d & FORBIDDEN_LEAF != 0 {
            return Err(bad(DescriptorDefect::ForbiddenLeafBits));
        }
        let output = d & LEAF_ADDRESS;
        if !output.is_multiple_of(size) {
            return Err(bad(DescriptorDefect::MisalignedBlockOutput));
        }
        if !desc::is_driver_leaf(self.stage, d, false) {
            return Err(bad(DescriptorDefect::NotADriverLeaf));
        }
        self.outputs.check(entry, output, size)
    }

    /// One leaf of a last-level table.
    fn page(&self, entry: u64, d: u64) -> Result<(), VerifyFailure> {
        let bad = |what| VerifyFailure::BadDescriptor {
            entry,
            level: 3,
            descriptor: d,
            what,
        };
        if d & desc::TABLE_OR_PAGE == 0 {
            return Err(bad(DescriptorDefect::ReservedEncoding));
        }
        if d & FORBIDDEN_LEAF != 0 {
            return Err(bad(DescriptorDefect::ForbiddenLeafBits));
        }
        let output = d & LEAF_ADDRESS;
        if !output.is_multiple_of(self.granule()) {
            return Err(bad(DescriptorDefect::MisalignedPageOutput));
        }
        if !desc::is_driver_leaf(self.stage, d, true) {
            return Err(bad(DescriptorDefect::NotADriverLeaf));
        }
        self.outputs.check(entry, output, self.granule())
    }

    /// Walks the last-level table at `phys` (`n` entries) and returns its valid entries. One pass gathers the
    /// count, the union of every entry's bits and the intersection of the valid entries' bits: every valid output
    /// then lies between the intersection's address bits and the union's, a hull checked at once; and where union
    /// and intersection agree outside the address bits, every leaf carries the same attribute bits, which are
    /// checked once to be a page this driver writes ([`desc::is_driver_leaf`]). Only when that summary fails does a
    /// second pass find the exact lowest and highest outputs, and only when their range fails (or the attributes
    /// differ between leaves) is each leaf checked alone (naming the first bad one, or passing outputs spread over
    /// several DMA-able extents, or leaves of several protections).
    ///
    /// With `full` (its descriptor says every entry is valid) the first pass gathers only the union and the
    /// intersection; the count is then the table's size if the intersection has the valid bit, and the general
    /// pass runs when it does not.
    fn leaf_table(&mut self, phys: u64, n: usize, full: bool) -> Result<usize, VerifyFailure> {
        let entries = self.entries(phys, n);
        let (mut valid, mut union, mut common) = (0u64, 0u64, u64::MAX);
        if full {
            for &d in entries {
                union |= d;
                common &= d;
            }
            valid = if common & desc::VALID != 0 { n as u64 } else { 0 };
        }
        if valid == 0 {
            (union, common) = (0, u64::MAX);
            for &d in entries {
                let v = d & desc::VALID;
                valid += v;
                union |= d;
                // An invalid entry (v = 0) leaves the intersection alone: d | all ones.
                common &= d | v.wrapping_sub(1);
            }
        }
        if valid == 0 {
            return Ok(0);
        }
        let granule = self.granule();
        // One attribute pattern for every leaf (invalid entries included in the union: the driver leaves them
        // zero), and that pattern a page's this driver writes; no output bit below the granule or above 47.
        let attributes = common & !LEAF_ADDRESS;
        let uniform = (union ^ common) & !LEAF_ADDRESS == 0
            && (attributes == self.page_attributes || desc::is_driver_leaf(self.stage, attributes, true));
        if uniform {
            self.page_attributes = attributes;
        }
        let clean = uniform && union & (FORBIDDEN_LEAF | (LEAF_ADDRESS & (granule - 1))) == 0;
        let (low, high) = (common & LEAF_ADDRESS, union & LEAF_ADDRESS);
        if clean && self.outputs.judge(low, high - low + granule).is_ok() {
            return Ok(valid as usize);
        }
        let (mut low, mut high) = (u64::MAX, 0);
        for &d in entries.iter().filter(|d| desc::is_valid(**d)) {
            low = low.min(d & LEAF_ADDRESS);
            high = high.max(d & LEAF_ADDRESS);
        }
        if !(clean && self.outputs.judge(low, high - low + granule).is_ok()) {
            for (i, &d) in entries.iter().enumerate() {
                if desc::is_valid(d) {
                    self.page(phys + 8 * i as u64, d)?;
                }
            }
        }
        Ok(valid as usize)
    }
}

/// Bytes of the root table of `geometry` (what the walk claims: a granule at least).
fn root_size(geometry: &Geometry) -> u64 {
    ((geometry.root_entries * 8) as u64).max(1 << geometry.granule_bits)
}

/// The format a record's table has.
pub(crate) fn table_format(kind: RecordKind, shape: &TableShape) -> Format {
    Format {
        stage: match kind {
            RecordKind::Stage2 => Stage::Two,
            RecordKind::Stage1El2 => Stage::OneEl2,
            _ => Stage::One,
        },
        granule: match shape.granule_log2 {
            14 => Granule::Size16K,
            16 => Granule::Size64K,
            _ => Granule::Size4K,
        },
        input_bits: shape.input_bits,
        output_bits: shape.output_bits,
    }
}

/// Walks the page table of `record` (a stage-1 or stage-2 record) in `pool`: see [`VerifyFailure`]. No page
/// table may share a byte with the record's CD tables, which [`cd_table_frames`] checked first.
fn verify_table(
    pool: &HandoverPool,
    record: &DomainRecord,
    shape: &TableShape,
    outputs: &Outputs<'_>,
) -> Result<(), VerifyFailure> {
    let format = table_format(record.kind, shape);
    let geometry = Geometry::of(&format).map_err(VerifyFailure::Format)?;
    if shape.start_level != geometry.start_level {
        return Err(VerifyFailure::StartLevel {
            recorded: shape.start_level,
            expected: geometry.start_level,
        });
    }
    let root_size = root_size(&geometry);
    let root = shape.root;
    let bad_root = VerifyFailure::BadRoot { root, size: root_size };
    let runs = record.extents;
    let (Some(first), Some(last)) = (runs.first(), runs.get(runs.len().wrapping_sub(1))) else {
        return Err(bad_root);
    };
    let span = Extent {
        base: first.base,
        len: last.base.saturating_add(last.len).saturating_sub(first.base),
    };
    let bits = u32::from(geometry.granule_bits);
    // The bitmap's bit for each run's first granule, for a record with few enough runs: its size then depends on
    // the frames the record holds, not on how far apart they lie.
    let mut rank_words = [0u32; RANKED_RUNS + 1];
    let mut total = 0u64;
    let ranks = if runs.len() <= RANKED_RUNS {
        for (k, run) in runs.iter().enumerate() {
            rank_words[k] = total as u32;
            total += granules_of(run, bits);
            if total > MAX_VERIFIED_GRANULES as u64 {
                break;
            }
        }
        Some(&rank_words[..runs.len()])
    } else {
        total = granules_of(span, bits);
        None
    };
    if total > MAX_VERIFIED_GRANULES as u64 {
        let max = (MAX_VERIFIED_GRANULES as u64) << bits;
        return Err(VerifyFailure::ExtentTooLarge { extent: span, max });
    }
    if !root.is_multiple_of(root_size) || !within(&runs, root, root_size) {
        return Err(bad_root);
    }
    let view = pool.preserved_view().ok_or(bad_root)?;
    let mut visited = [0u64; MAX_VERIFIED_GRANULES / 64];
    let granules = total;
    let mut walk = Walk {
        view,
        runs,
        span,
        stage: format.stage,
        // No attribute pattern is all zero (a valid page has bits [1:0] set): nothing matches until one is checked.
        page_attributes: 0,
        geometry,
        visited: &mut visited[..(granules as usize).div_ceil(64)],
        ranks,
        outputs,
        counts: shape.tables != 0,
        tables: 1,
        empty: 0,
    };
    walk.mark_cd_tables(&record.streams);
    walk.claim(root, root, root_size)?;
    if geometry.start_level == 3 {
        walk.leaf_table(root, geometry.root_entries, false)?;
    } else {
        walk.table(geometry.start_level, root, geometry.root_entries)?;
    }
    if walk.counts {
        let recorded = (u32::from(shape.tables), u32::from(shape.empty));
        if recorded.0 != walk.tables {
            return Err(VerifyFailure::TableTotals {
                what: TableTotal::Tables,
                recorded: recorded.0,
                walked: walk.tables,
            });
        }
        if recorded.1 != walk.empty {
            return Err(VerifyFailure::TableTotals {
                what: TableTotal::EmptiedTables,
                recorded: recorded.1,
                walked: walk.empty,
            });
        }
    }
    Ok(())
}

/// Checks the frames of every CD table `record`'s whole streams name (substreams name their stream's): each where
/// the driver allocates a CD table from the domain's memory, at the start of a frame, aligned to its size (a block
/// of the memory starts a frame aligned as asked), inside the record's extent, and sharing no frame with another
/// stream's CD table or with the root table. The page-table walk then keeps every other table off these frames
/// ([`Walk::mark_cd_tables`]). Checked in every verification mode: a CD table adopted twice, or not starting its
/// frame, is freed by a detach as a frame it does not own. Each table is compared with those before it in the
/// record (quadratic in the record's streams, which this image's bookkeeping bounds: `check_limits`).
fn cd_table_frames(record: &DomainRecord, shape: &TableShape) -> Result<(), VerifyFailure> {
    let geometry = Geometry::of(&table_format(record.kind, shape)).map_err(VerifyFailure::Format)?;
    let root = Extent {
        base: shape.root,
        len: root_size(&geometry),
    };
    let frames_of = |s: &super::StreamRecord| Extent {
        base: s.cd_table,
        len: (64u64 << s.cd_ssid_bits).next_multiple_of(FRAME),
    };
    let with_cd_table = |s: &super::StreamRecord| s.ssid == 0 && s.cd_table != 0;
    for (i, s) in record.streams.iter().enumerate().filter(|(_, s)| with_cd_table(s)) {
        let size = 64u64 << s.cd_ssid_bits;
        let table = frames_of(&s);
        if !s.cd_table.is_multiple_of(size.max(FRAME)) || !within(&record.extents, table.base, table.len) {
            return Err(VerifyFailure::CdTableMisplaced {
                sid: s.sid,
                cd_table: s.cd_table,
            });
        }
        let overlap = |other| VerifyFailure::CdTableOverlap {
            sid: s.sid,
            cd_table: s.cd_table,
            other,
        };
        let mut earlier = record
            .streams
            .iter()
            .take(i)
            .filter(with_cd_table)
            .map(|s| frames_of(&s));
        if let Some(other) = earlier.find(|f| f.overlaps(&table)) {
            return Err(overlap(other.base));
        }
        if table.overlaps(&root) {
            return Err(overlap(shape.root));
        }
    }
    Ok(())
}

/// Compares the CD of every stream of the stage-1 `record` with the one the driver builds for it
/// ([`crate::domain`]'s stage-1 CD builder): all eight words.
fn verify_cds(
    features: &Features,
    pool: &HandoverPool,
    record: &DomainRecord,
    shape: &TableShape,
) -> Result<(), VerifyFailure> {
    let format = table_format(record.kind, shape);
    let expected = crate::domain::stage1_cd_of(features, record.asid, &format, PhysAddr(shape.root))
        .map_err(VerifyFailure::CdBuild)?;
    for s in &record.streams {
        // A substream's whole stream is in the same record (`check_limits`, which runs first).
        let stream = record
            .streams
            .iter()
            .find(|y| y.sid == s.sid && y.ssid == 0)
            .unwrap_or(s);
        if (stream.cd_table, stream.cd_ssid_bits) != (s.cd_table, s.cd_ssid_bits) {
            return Err(VerifyFailure::CdTableMismatch {
                sid: s.sid,
                ssid: s.ssid,
                recorded: s.cd_table,
                stream: stream.cd_table,
            });
        }
        let cd = s.cd_table + 64 * u64::from(s.ssid);
        // SAFETY: as in `verify_table`: the memory holding the CD table is free until the restore adopts it.
        let words =
            unsafe { pool.preserved_words(Extent { base: cd, len: 64 }) }.ok_or(VerifyFailure::CdOutsidePool {
                sid: s.sid,
                ssid: s.ssid,
                cd,
            })?;
        if let Some(word) = (0..8).find(|&w| words[w] != expected.0[w]) {
            return Err(VerifyFailure::CdMismatch {
                sid: s.sid,
                ssid: s.ssid,
                cd,
                word,
                found: words[word],
                expected: expected.0[word],
            });
        }
    }
    Ok(())
}

/// Everything a restore examines in `instance`'s preserved memory, record by record: `Err` names the first record
/// that fails and why. Called after `check_limits` (every record's memory is free, its extent one memory) and before
/// anything is rebuilt.
pub(crate) fn verify_instance(
    features: &Features,
    pool: &HandoverPool,
    instance: &InstanceRecords,
    outputs: &Outputs<'_>,
    verify: Verification,
) -> Result<(), (u64, VerifyFailure)> {
    for r in &instance.records {
        if let Some(g) = r.guest {
            let bad = |what, value| (r.token, VerifyFailure::GuestContext { what, value });
            if g.cd_max_log2 > features.ssid_bits {
                return Err(bad(GuestContextLimit::CdMaxBeyondSsidBits, g.cd_max_log2.into()));
            }
            if !r.streams.is_empty() && g.cd_table_ipa >> 52 != 0 {
                return Err(bad(GuestContextLimit::CdTableIpaBeyondContextPtr, g.cd_table_ipa));
            }
        }
        let Some(shape) = r.table else { continue };
        // The frames of the record's CD tables (in every mode): each table where the driver allocates one, with
        // its frames to itself.
        cd_table_frames(&r, &shape).map_err(|e| (r.token, e))?;
        // The table first (the CD names its root), then the CDs.
        if verify == Verification::Full {
            verify_table(pool, &r, &shape, outputs).map_err(|e| (r.token, e))?;
        }
        if matches!(r.kind, RecordKind::Stage1 | RecordKind::Stage1El2) {
            verify_cds(features, pool, &r, &shape).map_err(|e| (r.token, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
