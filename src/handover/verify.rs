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

use super::pool::{FRAME, HandoverPool};
use super::{DomainRecord, Extent, InstanceRecords, MAX_STREAMS, RecordKind, TableShape};
use crate::hw::ste::EntryError;
use crate::mem::PhysAddr;
use crate::pgtable::{Format, Geometry, Granule, MapError, Stage, desc};
use crate::smmu::features::Features;

/// How much of the preserved memory [`crate::ActiveSmmu::restore_handover`] examines.
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
    /// [`crate::ActiveSmmu::protect_memory`].
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
    /// The record's extent holds more granules than one walk tracks.
    ExtentTooLarge {
        /// The extent.
        extent: Extent,
        /// The largest extent verified, in bytes, at this granule.
        max: u64,
    },
    /// The root table is not wholly inside the record's extent, or not aligned to its size.
    BadRoot {
        /// Its address.
        root: u64,
        /// Its size.
        size: u64,
    },
    /// A table descriptor names a table outside the record's own extent.
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
        what: &'static str,
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
        what: &'static str,
    },
    /// The record's table count (or emptied-table count) differs from the tables walked.
    TableTotals {
        /// "tables" or "emptied tables".
        what: &'static str,
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
    /// A stream's CD table is not where the driver allocates one: at the start of a frame of its domain's arena,
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
        /// What.
        what: &'static str,
        /// The value.
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
                "its extent {:#x}+{:#x} is larger than verification tracks ({max:#x} bytes)",
                extent.base, extent.len
            ),
            V::BadRoot { root, size } => write!(
                f,
                "root table {root:#x} ({size:#x} bytes) is misaligned or outside its extent"
            ),
            V::TableOutsideExtent { entry, table } => {
                write!(
                    f,
                    "descriptor at {entry:#x} names table {table:#x}, outside its own extent"
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

/// Granules of one record's extent that a walk tracks (its visited bitmap: 8 KiB on the stack). With 4 KiB
/// granules an extent of up to 256 MiB, far more than a handover arena holds today.
pub const MAX_VERIFIED_GRANULES: usize = 1 << 16;

/// Output address bits \[51:12\] of a leaf (bits \[51:48\] included, so that a leaf setting them, which this driver
/// never does, cannot pass for a lower address).
const LEAF_ADDRESS: u64 = ((1 << 52) - 1) & !0xfff;
/// Leaf bits this driver never sets: the contiguous hint (a misprogrammed contiguous run may translate with
/// another entry's output) and output bits \[51:48\].
const FORBIDDEN_LEAF: u64 = desc::CONTIGUOUS | 0xf << 48;
/// What a leaf whose attribute bits this driver never writes is refused as.
const NOT_A_DRIVER_LEAF: &str = "attribute bits this driver never writes for this stage (nG, AP/S2AP, XN, \
                                 AttrIndx/MemAttr, SH, AF, NS, software or PBHA bits): not the leaf it builds for \
                                 the protection these bits grant";
/// Every bit this driver sets in a table descriptor.
const TABLE_BITS: u64 = desc::VALID
    | desc::TABLE_OR_PAGE
    | desc::OUTPUT_ADDRESS
    | desc::SW_COUNT_LOW
    | desc::SW_COUNT_HIGH
    | desc::SW_TABLE_FULL
    | desc::SW_TRIM_CANDIDATE;

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

/// One record's table, walked from its root.
struct Walk<'a> {
    /// The record's extent, as words.
    words: &'a [u64],
    extent: Extent,
    /// The table's stage (and regime): which leaf encodings the driver writes.
    stage: Stage,
    /// The attribute bits of the last last-level table found uniform and a driver page's (most tables of a
    /// domain share one protection: the check then costs one comparison per table).
    page_attributes: u64,
    geometry: Geometry,
    /// One bit per granule of the extent (counted from the granule holding its first byte): a table lives there.
    visited: &'a mut [u64],
    /// The frames of the CD tables inside the extent: no page table may share a byte with them.
    cd_tables: heapless::Vec<Extent, MAX_STREAMS>,
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

    /// The `n` entries of the table at `phys` (claimed: inside the extent).
    fn entries(&self, phys: u64, n: usize) -> &'a [u64] {
        let first = ((phys - self.extent.base) / 8) as usize;
        &self.words[first..first + n]
    }

    /// Marks the granule-aligned `[phys, phys + size)` as a table's: inside the extent, sharing no byte with a CD
    /// table, and never claimed before.
    fn claim(&mut self, entry: u64, phys: u64, size: u64) -> Result<(), VerifyFailure> {
        if !phys.is_multiple_of(self.granule()) {
            return Err(VerifyFailure::MisalignedTable { entry, table: phys });
        }
        if !self.extent.contains(phys, size) {
            return Err(VerifyFailure::TableOutsideExtent { entry, table: phys });
        }
        let twice = VerifyFailure::TableReachedTwice { entry, table: phys };
        let table = Extent { base: phys, len: size };
        if self.cd_tables.iter().any(|c| c.overlaps(&table)) {
            return Err(twice);
        }
        let bits = self.geometry.granule_bits;
        let origin = self.extent.base >> bits;
        for g in (phys >> bits) - origin..((phys + size) >> bits) - origin {
            let (word, bit) = ((g / 64) as usize, 1u64 << (g % 64));
            if self.visited[word] & bit != 0 {
                return Err(twice);
            }
            self.visited[word] |= bit;
        }
        Ok(())
    }

    /// Walks the table at `phys` (level `level` < 3, `n` entries): its valid entries, and whether one of its
    /// descriptors carries a trim mark.
    fn table(&mut self, level: u8, phys: u64, n: usize) -> Result<(usize, bool), VerifyFailure> {
        let entries = self.entries(phys, n);
        let child_entries = 1usize << self.geometry.level_bits;
        let (mut valid, mut marked) = (0, false);
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
                    what: "a table descriptor with bits this driver never sets (APTable, XNTable, NSTable, address \
                           bits [51:48], ...)",
                });
            }
            let child = desc::address(d);
            self.claim(entry, child, self.granule())?;
            let (walked, below) = if level + 1 == 3 {
                // A descriptor that says its table is full lets the walk try the cheapest pass first.
                let full = self.counts && d & desc::SW_TABLE_FULL != 0;
                (self.leaf_table(child, child_entries, full)?, false)
            } else {
                self.table(level + 1, child, child_entries)?
            };
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
                    what: "its full bit disagrees with the table it names",
                });
            }
            if (walked == 0 || below) && d & desc::SW_TRIM_CANDIDATE == 0 {
                return Err(VerifyFailure::SoftwareBits {
                    entry,
                    descriptor: d,
                    what: "no trim mark, yet it leads to an emptied table",
                });
            }
        }
        Ok((valid, marked))
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
            return Err(bad("a block where the granule allows none"));
        }
        let size = 1u64 << self.geometry.entry_shift(level);
        if d & FORBIDDEN_LEAF != 0 {
            return Err(bad(
                "the contiguous hint or output bits [51:48], which this driver never sets",
            ));
        }
        let output = d & LEAF_ADDRESS;
        if !output.is_multiple_of(size) {
            return Err(bad("a block output not aligned to its size (RES0 bits set)"));
        }
        if !desc::is_driver_leaf(self.stage, d, false) {
            return Err(bad(NOT_A_DRIVER_LEAF));
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
            return Err(bad("a reserved encoding (bits [1:0] = 0b01 at level 3)"));
        }
        if d & FORBIDDEN_LEAF != 0 {
            return Err(bad(
                "the contiguous hint or output bits [51:48], which this driver never sets",
            ));
        }
        let output = d & LEAF_ADDRESS;
        if !output.is_multiple_of(self.granule()) {
            return Err(bad("output address bits below the granule"));
        }
        if !desc::is_driver_leaf(self.stage, d, true) {
            return Err(bad(NOT_A_DRIVER_LEAF));
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

/// Walks the page table of `record` (a stage-1 or stage-2 record with one extent, as `check_limits` ensures) in
/// `pool`: see [`VerifyFailure`]. `cd_tables` are the frames of the CD tables inside the record's extent (no page
/// table may share them).
fn verify_table(
    pool: &HandoverPool,
    record: &DomainRecord,
    shape: &TableShape,
    cd_tables: &[Extent],
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
    let extent = record.extents.first().copied().unwrap_or_default();
    let max = ((MAX_VERIFIED_GRANULES - 1) as u64) << geometry.granule_bits;
    if extent.len > max {
        return Err(VerifyFailure::ExtentTooLarge { extent, max });
    }
    let root_size = root_size(&geometry);
    let root = shape.root;
    if !root.is_multiple_of(root_size) || !extent.contains(root, root_size) {
        return Err(VerifyFailure::BadRoot { root, size: root_size });
    }
    // SAFETY: `check_limits` found the record's arena free: nothing in this image writes the extent until the
    // restore adopts it, after this walk.
    let words = unsafe { pool.preserved_words(extent) }.ok_or(VerifyFailure::BadRoot { root, size: root_size })?;
    let mut visited = [0u64; MAX_VERIFIED_GRANULES / 64];
    let granules =
        ((extent.base + extent.len - 1) >> geometry.granule_bits) - (extent.base >> geometry.granule_bits) + 1;
    let mut walk = Walk {
        words,
        extent,
        stage: format.stage,
        // No attribute pattern is all zero (a valid page has bits [1:0] set): nothing matches until one is checked.
        page_attributes: 0,
        geometry,
        visited: &mut visited[..(granules as usize).div_ceil(64)],
        cd_tables: cd_tables.iter().copied().filter(|c| c.overlaps(&extent)).collect(),
        outputs,
        counts: shape.tables != 0,
        tables: 1,
        empty: 0,
    };
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
                what: "tables",
                recorded: recorded.0,
                walked: walk.tables,
            });
        }
        if recorded.1 != walk.empty {
            return Err(VerifyFailure::TableTotals {
                what: "emptied tables",
                recorded: recorded.1,
                walked: walk.empty,
            });
        }
    }
    Ok(())
}

/// The frames of every CD table `record`'s whole streams name (substreams name their stream's), each checked to be
/// where the driver allocates a CD table from the domain's arena: at the start of a frame, aligned to its size (a
/// block of the arena starts a frame aligned as asked), inside the record's extent, and sharing no frame with
/// another stream's CD table or with the root table. The page-table walk then keeps every other table off these
/// frames. Checked in every verification mode: a CD table adopted twice, or not starting its frame, is freed by a
/// detach as a frame it does not own.
fn cd_table_frames(
    record: &DomainRecord,
    shape: &TableShape,
) -> Result<heapless::Vec<Extent, MAX_STREAMS>, VerifyFailure> {
    let extent = record.extents.first().copied().unwrap_or_default();
    let geometry = Geometry::of(&table_format(record.kind, shape)).map_err(VerifyFailure::Format)?;
    let root = Extent {
        base: shape.root,
        len: root_size(&geometry),
    };
    let mut frames: heapless::Vec<Extent, MAX_STREAMS> = heapless::Vec::new();
    for s in record.streams.iter().filter(|s| s.ssid == 0 && s.cd_table != 0) {
        let size = 64u64 << s.cd_ssid_bits;
        let table = Extent {
            base: s.cd_table,
            len: size.next_multiple_of(FRAME),
        };
        if !s.cd_table.is_multiple_of(size.max(FRAME)) || !extent.contains(table.base, table.len) {
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
        if let Some(other) = frames.iter().find(|f| f.overlaps(&table)) {
            return Err(overlap(other.base));
        }
        if table.overlaps(&root) {
            return Err(overlap(shape.root));
        }
        // Room: at most one per stream slot.
        let _ = frames.push(table);
    }
    Ok(frames)
}

/// Compares the CD of every stream of the stage-1 `record` with the one the driver builds for it
/// ([`crate::domain`]'s stage-1 CD builder): all eight words.
fn verify_cds(
    features: &Features,
    pool: &HandoverPool,
    instance: &InstanceRecords,
    record: &DomainRecord,
    shape: &TableShape,
) -> Result<(), VerifyFailure> {
    let format = table_format(record.kind, shape);
    let expected = crate::domain::stage1_cd_of(features, record.asid, &format, PhysAddr(shape.root))
        .map_err(VerifyFailure::CdBuild)?;
    for s in &record.streams {
        let stream = instance
            .records
            .iter()
            .flat_map(|x| x.streams.iter())
            .find(|y| y.sid == s.sid && y.ssid == 0)
            .copied()
            .unwrap_or(*s);
        if (stream.cd_table, stream.cd_ssid_bits) != (s.cd_table, s.cd_ssid_bits) {
            return Err(VerifyFailure::CdTableMismatch {
                sid: s.sid,
                ssid: s.ssid,
                recorded: s.cd_table,
                stream: stream.cd_table,
            });
        }
        let cd = s.cd_table + 64 * u64::from(s.ssid);
        // SAFETY: as in `verify_table`: the arena holding the CD table is free until the restore adopts it.
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
/// that fails and why. Called after `check_limits` (every record's arena is free, its extent one arena) and before
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
                return Err(bad(
                    "an S1CDMax beyond this SMMU's SubstreamID bits",
                    g.cd_max_log2.into(),
                ));
            }
            if !r.streams.is_empty() && g.cd_table_ipa >> 52 != 0 {
                return Err(bad("a CD table IPA beyond S1ContextPtr's 52 bits", g.cd_table_ipa));
            }
        }
        let Some(shape) = r.table else { continue };
        // The frames of the record's CD tables (in every mode): each table where the driver allocates one, with
        // its frames to itself.
        let cd_tables = cd_table_frames(r, &shape).map_err(|e| (r.token, e))?;
        // The table first (the CD names its root), then the CDs.
        if verify == Verification::Full {
            verify_table(pool, r, &shape, &cd_tables, outputs).map_err(|e| (r.token, e))?;
        }
        if matches!(r.kind, RecordKind::Stage1 | RecordKind::Stage1El2) {
            verify_cds(features, pool, instance, r, &shape).map_err(|e| (r.token, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Each test prepares a real hand-off on the host (domains in handover arenas, the SMMU model), then writes
    //! into the preserved memory what the next image must catch (as the previous image, or anything with write
    //! access to RAM across the reset, could), and restores: the refusal names the record, the address and what
    //! is wrong, and nothing is installed (no command at all is issued; no arena, ID or stream is taken).
    extern crate std;

    use super::*;
    use crate::domain::{DomainId, Stage2Options};
    use crate::handover::restore::RestoreError;
    use crate::handover::restore::tests::{BASE, RW, Region, SURVIVING, boot};
    use crate::hw::ste::Config;
    use crate::pgtable::Prot;
    use crate::smmu::tests::{Model, frames, issued_since};
    use crate::testing::HeapFrames;
    use crate::{ActiveSmmu, Stage1Options};

    /// Memory these tests declare DMA-able: 2 GiB from 0x4000_0000.
    const DMA: &[Extent] = &[Extent {
        base: 0x4000_0000,
        len: 0x8000_0000,
    }];
    const S1: u64 = 0xa1;
    const S2: u64 = 0xa2;

    /// What the first image left, for the tampering.
    struct Preserved {
        /// The stage-1 domain's root (48-bit input: levels 0 to 3) and its stream's CD table.
        s1_root: u64,
        cd_table: u64,
        /// The stage-2 domain's root (40-bit input: a level-1 root of two concatenated tables).
        s2_root: u64,
    }

    /// The first image: a 48-bit stage-1 domain (stream 0x10) mapping two pages at IOVA 0x1000, one at
    /// 0x20_0000 and a 2 MiB block at 0x4000_0000; a stage-2 domain (stream 0x20) mapping a page at 0x1000 and a
    /// 1 GiB block at 0x4000_0000; both preserved and prepared.
    fn first_image(region: &mut Region, frames: &'static HeapFrames) -> Preserved {
        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let s1 = smmu
            .create_stage1(
                pool.take_arena().unwrap(),
                Stage1Options {
                    input_bits: 48,
                    el2: false,
                },
            )
            .unwrap();
        smmu.map(s1, 0x1000, 0x8000_0000, 0x2000, RW).unwrap();
        smmu.map(s1, 0x20_0000, 0x8000_4000, 0x1000, RW).unwrap();
        smmu.map(s1, 0x4000_0000, 0x9000_0000, 0x20_0000, RW).unwrap();
        smmu.attach(s1, 0x10).unwrap();
        let s2 = smmu
            .create_stage2(pool.take_arena().unwrap(), Stage2Options { input_bits: 40 })
            .unwrap();
        smmu.map(s2, 0x1000, 0x8100_0000, 0x1000, RW).unwrap();
        smmu.map(s2, 0x4000_0000, 0x4000_0000, 0x4000_0000, RW).unwrap();
        smmu.attach(s2, 0x20).unwrap();
        smmu.preserve(s1, S1).unwrap();
        smmu.preserve(s2, S2).unwrap();
        smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
        let root = |d: DomainId| smmu.domain_table(d).unwrap().root().0;
        let cd_table = smmu.handover_records(BASE).unwrap().records[0].streams[0].cd_table;
        let preserved = Preserved {
            s1_root: root(s1),
            cd_table,
            s2_root: root(s2),
        };
        core::mem::forget(smmu);
        drop(model);
        preserved
    }

    fn word(region: &mut Region, phys: u64) -> &mut u64 {
        &mut region.memory[((phys - region.extent.base) / 8) as usize]
    }

    /// The address of the descriptor at `level` on the walk of `iova` from `root` (starting at `start`).
    fn slot(region: &mut Region, root: u64, start: u8, iova: u64, level: u8) -> u64 {
        let mut table = root;
        for l in start..=level {
            let index = (iova >> (12 + 9 * (3 - l))) & if l == start && start == 1 { 1023 } else { 511 };
            let entry = table + 8 * index;
            if l == level {
                return entry;
            }
            table = desc::address(*word(region, entry));
        }
        unreachable!()
    }

    /// A fresh image restoring with `options` (after `declare` on it): the result, with the image and its model.
    fn restore(
        region: &mut Region,
        frames: &'static HeapFrames,
        options: &RestoreOptions<'_>,
        declare: &[Extent],
    ) -> (Result<u32, RestoreError>, ActiveSmmu<&'static HeapFrames>, Model) {
        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        for &e in declare {
            smmu.protect_memory(e).unwrap();
        }
        let pool = region.pool();
        let before = model.seen.lock().unwrap().consumed.len();
        let result = smmu.restore_handover(pool, BASE, options).map(|r| r.domains);
        if result.is_err() {
            assert_eq!(
                issued_since(&model, before),
                [],
                "a refusal issues nothing: no STE, no CD"
            );
            assert_eq!(pool.arenas_in_use(), 0, "no arena taken");
            assert_eq!((smmu.asids_in_use(), smmu.vmids_in_use()), (0, 0), "no ID taken");
            for sid in [0x10, 0x20] {
                assert!(
                    !matches!(smmu.ste(sid).map(|s| s.config()), Ok(Config::Stage1 | Config::Stage2)),
                    "stream {sid:#x} translates nothing"
                );
            }
            assert!(smmu.retrieve(S1).is_err() && smmu.retrieve(S2).is_err());
        }
        (result, smmu, model)
    }

    /// Prepares, applies `tamper`, restores with full verification against [`DMA`]: the error.
    fn refused(tamper: impl FnOnce(&mut Region, &Preserved)) -> RestoreError {
        let frames = frames();
        let mut region = Region::new();
        let preserved = first_image(&mut region, frames);
        tamper(&mut region, &preserved);
        let (result, smmu, _model) = restore(&mut region, frames, &RestoreOptions::new(DMA), &[]);
        core::mem::forget(smmu);
        result.expect_err("the tampered memory must be refused")
    }

    fn verify_error(e: RestoreError) -> (u64, VerifyFailure) {
        match e {
            RestoreError::Verify { token, what } => (token, what),
            other => panic!("not a verification failure: {other}"),
        }
    }

    #[test]
    fn untouched_preserved_memory_is_verified_and_restored() {
        let frames = frames();
        let mut region = Region::new();
        first_image(&mut region, frames);
        let (result, mut smmu, _model) = restore(&mut region, frames, &RestoreOptions::new(DMA), &[]);
        assert_eq!(result, Ok(2));
        let s1 = smmu.retrieve(S1).unwrap();
        assert_eq!(smmu.iova_to_phys(s1, 0x4010_0000), Ok(Some(0x9010_0000)));
        assert_eq!(smmu.ste(0x10).unwrap().config(), Config::Stage1);
        core::mem::forget(smmu);
    }

    #[test]
    fn a_table_outside_its_domains_own_extent_is_refused_before_any_ste_is_written() {
        // The stage-1 domain's level-1 descriptor for IOVA 0x1000 names the stage-2 domain's root: a table shared
        // between two domains.
        let mut at = (0, 0);
        let e = refused(|r, p| {
            let entry = slot(r, p.s1_root, 0, 0x1000, 1);
            *word(r, entry) = (*word(r, entry) & !desc::OUTPUT_ADDRESS) | p.s2_root;
            at = (entry, p.s2_root);
        });
        assert_eq!(
            verify_error(e),
            (
                S1,
                VerifyFailure::TableOutsideExtent {
                    entry: at.0,
                    table: at.1
                }
            )
        );
        assert!(std::format!("{e}").contains("outside its own extent"), "{e}");
    }

    #[test]
    fn a_table_reached_twice_is_refused() {
        // Two level-0 descriptors naming one level-1 table.
        let mut at = (0, 0);
        let e = refused(|r, p| {
            let d = *word(r, p.s1_root);
            *word(r, p.s1_root + 8 * 5) = d;
            at = (p.s1_root + 8 * 5, desc::address(d));
        });
        assert_eq!(
            verify_error(e),
            (
                S1,
                VerifyFailure::TableReachedTwice {
                    entry: at.0,
                    table: at.1
                }
            )
        );
        // A cycle: a level-2 descriptor naming the root.
        let e = refused(|r, p| {
            let entry = slot(r, p.s1_root, 0, 0x1000, 2);
            *word(r, entry) = (*word(r, entry) & !desc::OUTPUT_ADDRESS) | p.s1_root;
            at = (entry, p.s1_root);
        });
        assert_eq!(
            verify_error(e),
            (
                S1,
                VerifyFailure::TableReachedTwice {
                    entry: at.0,
                    table: at.1
                }
            )
        );
        // A level-2 descriptor naming the stream's CD table.
        let e = refused(|r, p| {
            let entry = slot(r, p.s1_root, 0, 0x1000, 2);
            *word(r, entry) = (*word(r, entry) & !desc::OUTPUT_ADDRESS) | p.cd_table;
            at = (entry, p.cd_table);
        });
        assert_eq!(
            verify_error(e),
            (
                S1,
                VerifyFailure::TableReachedTwice {
                    entry: at.0,
                    table: at.1
                }
            )
        );
    }

    #[test]
    fn descriptors_follow_the_levels_and_the_encodings_this_driver_writes() {
        let bad = |e| match verify_error(e) {
            (S1, VerifyFailure::BadDescriptor { level, what, .. }) => (level, what),
            other => panic!("{other:?}"),
        };
        // A block at level 0 (4 KiB granule: blocks only at levels 1 and 2).
        let e = refused(|r, p| *word(r, p.s1_root) &= !desc::TABLE_OR_PAGE);
        assert_eq!(bad(e).0, 0);
        assert!(bad(e).1.contains("granule allows none"));
        // A reserved level-3 encoding (bits [1:0] = 0b01).
        let e = refused(|r, p| {
            let entry = slot(r, p.s1_root, 0, 0x1000, 3);
            *word(r, entry) &= !desc::TABLE_OR_PAGE;
        });
        assert_eq!(bad(e).0, 3);
        // The contiguous hint on a page.
        let e = refused(|r, p| {
            let entry = slot(r, p.s1_root, 0, 0x2000, 3);
            *word(r, entry) |= desc::CONTIGUOUS;
        });
        assert!(bad(e).1.contains("contiguous"));
        // APTable in a table descriptor.
        let e = refused(|r, p| {
            let entry = slot(r, p.s1_root, 0, 0x1000, 2);
            *word(r, entry) |= 1 << 61;
        });
        assert_eq!(bad(e).0, 2);
        // A 2 MiB block whose output has RES0 bits set.
        let e = refused(|r, p| {
            let entry = slot(r, p.s1_root, 0, 0x4000_0000, 2);
            *word(r, entry) |= 0x1000;
        });
        assert!(bad(e).1.contains("not aligned"));
    }

    #[test]
    fn live_entry_counts_full_bits_trim_marks_and_totals_must_match_the_walk() {
        // A count one too high.
        let mut entry = 0;
        let e = refused(|r, p| {
            entry = slot(r, p.s1_root, 0, 0x1000, 2);
            *word(r, entry) = desc::with_count(*word(r, entry), 3);
        });
        assert_eq!(
            verify_error(e),
            (
                S1,
                VerifyFailure::CountMismatch {
                    entry,
                    recorded: 3,
                    walked: 2
                }
            )
        );
        // The full bit on a table of two pages.
        let e = refused(|r, p| {
            entry = slot(r, p.s1_root, 0, 0x1000, 2);
            *word(r, entry) |= desc::SW_TABLE_FULL;
        });
        assert!(matches!(verify_error(e), (S1, VerifyFailure::SoftwareBits { what, .. }) if what.contains("full")));
        // A last-level table emptied behind the counts' back, its count made to agree, its trim mark missing.
        let e = refused(|r, p| {
            for iova in [0x1000, 0x2000] {
                let leaf = slot(r, p.s1_root, 0, iova, 3);
                *word(r, leaf) = 0;
            }
            entry = slot(r, p.s1_root, 0, 0x1000, 2);
            *word(r, entry) = desc::with_count(*word(r, entry), 0);
        });
        assert!(matches!(verify_error(e), (S1, VerifyFailure::SoftwareBits { what, .. }) if what.contains("trim")));
        // A whole subtree unlinked from the root (which carries no count of its own): the recorded total differs.
        let e = refused(|r, p| *word(r, p.s1_root) = 0);
        assert_eq!(
            verify_error(e),
            (
                S1,
                VerifyFailure::TableTotals {
                    what: "tables",
                    recorded: 6,
                    walked: 1
                }
            )
        );
    }

    #[test]
    fn a_leaf_outside_dma_memory_or_inside_protected_memory_is_refused() {
        // A page mapping the domain's own root (inside the handover region): the device could rewrite its tables.
        let mut at = (0, 0);
        let e = refused(|r, p| {
            at.0 = slot(r, p.s1_root, 0, 0x1000, 3);
            at.1 = p.s1_root;
            *word(r, at.0) = (*word(r, at.0) & !desc::OUTPUT_ADDRESS) | p.s1_root;
        });
        match verify_error(e) {
            (
                S1,
                VerifyFailure::OutputProtected {
                    entry,
                    output,
                    size: 0x1000,
                    protected,
                },
            ) => {
                assert_eq!((entry, output), at);
                assert!(protected.contains(at.1, 0x1000), "the region");
            }
            other => panic!("{other:?}"),
        }
        // A page outside the declared DMA-able memory.
        let e = refused(|r, p| {
            at.0 = slot(r, p.s1_root, 0, 0x20_0000, 3);
            *word(r, at.0) = (*word(r, at.0) & !desc::OUTPUT_ADDRESS) | 0x1_0000_0000;
        });
        assert_eq!(
            verify_error(e),
            (
                S1,
                VerifyFailure::OutputOutsideDmaMemory {
                    entry: at.0,
                    output: 0x1_0000_0000,
                    size: 0x1000
                }
            )
        );
        // The stage-2 domain's 1 GiB block moved past the end of the DMA-able memory.
        let e = refused(|r, p| {
            at.0 = slot(r, p.s2_root, 1, 0x4000_0000, 1);
            *word(r, at.0) = (*word(r, at.0) & !desc::OUTPUT_ADDRESS) | 0xc000_0000;
        });
        assert_eq!(
            verify_error(e),
            (
                S2,
                VerifyFailure::OutputOutsideDmaMemory {
                    entry: at.0,
                    output: 0xc000_0000,
                    size: 0x4000_0000
                }
            )
        );
        // Memory this image declared protected (its own frames, say), untouched memory otherwise.
        let frames = frames();
        let mut region = Region::new();
        first_image(&mut region, frames);
        let mine = Extent {
            base: 0x8100_0000,
            len: 0x1000,
        };
        let (result, smmu, _model) = restore(&mut region, frames, &RestoreOptions::new(DMA), &[mine]);
        assert!(
            matches!(result, Err(RestoreError::Verify { token: S2, what: VerifyFailure::OutputProtected { output: 0x8100_0000, protected, .. } }) if protected == mine),
            "{result:?}"
        );
        core::mem::forget(smmu);
    }

    #[test]
    fn an_adopted_cd_that_is_not_the_one_the_driver_builds_is_refused() {
        // T0SZ, TG0, EPD0, EPD1 (a TTB1 walk), V, IPS, the ASID, TTB0, MAIR, a reserved word.
        for (word_index, bits) in [
            (0, 0x1),
            (0, 0b10 << 6),
            (0, 1 << 14),
            (0, 1 << 30),
            (0, 1 << 31),
            (0, 1 << 33),
            (0, 1 << 48),
            (1, 0x1000),
            (3, 0xff << 24),
            (5, 1),
        ] {
            let mut cd = 0;
            let e = refused(|r, p| {
                cd = p.cd_table;
                *word(r, p.cd_table + 8 * word_index as u64) ^= bits;
            });
            match verify_error(e) {
                (
                    S1,
                    VerifyFailure::CdMismatch {
                        sid: 0x10,
                        ssid: 0,
                        cd: at,
                        word,
                        found,
                        expected,
                    },
                ) => {
                    assert_eq!((at, word), (cd, word_index));
                    assert_eq!(found ^ expected, bits);
                }
                other => panic!("word {word_index} bits {bits:#x}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_trusted_restore_skips_the_table_walk_but_still_compares_the_cds() {
        let trusted = RestoreOptions {
            dma_memory: DMA,
            verify: Verification::TrustRecordedTables,
        };
        // A leaf into the region: accepted unread (the documented risk of trusting the tables).
        let frames = frames();
        let mut region = Region::new();
        let p = first_image(&mut region, frames);
        let leaf = slot(&mut region, p.s1_root, 0, 0x20_0000, 3);
        *word(&mut region, leaf) = (*word(&mut region, leaf) & !desc::OUTPUT_ADDRESS) | p.s1_root;
        let (result, smmu, _model) = restore(&mut region, frames, &trusted, &[]);
        assert_eq!(result, Ok(2));
        core::mem::forget(smmu);
        // A CD changed: refused all the same.
        let mut region = Region::new();
        let p = first_image(&mut region, frames);
        *word(&mut region, p.cd_table + 8) ^= 0x1000;
        let (result, smmu, _model) = restore(&mut region, frames, &trusted, &[]);
        assert!(
            matches!(
                result,
                Err(RestoreError::Verify {
                    token: S1,
                    what: VerifyFailure::CdMismatch { word: 1, .. }
                })
            ),
            "{result:?}"
        );
        core::mem::forget(smmu);
    }

    #[test]
    fn a_restore_declares_the_region_protected_memory() {
        let frames = frames();
        let mut region = Region::new();
        first_image(&mut region, frames);
        let (result, mut smmu, _model) = restore(&mut region, frames, &RestoreOptions::new(DMA), &[]);
        assert_eq!(result, Ok(2));
        let d = smmu.retrieve(S1).unwrap();
        let inside = region.extent.base + 0x10_0000;
        assert!(matches!(
            smmu.map(d, 0x8000_0000, inside, 0x1000, Prot::READ),
            Err(crate::DomainError::ProtectedOutput { protected, .. }) if protected == region.extent
        ));
        assert_eq!(smmu.protected_memory(), [region.extent]);
        core::mem::forget(smmu);
    }

    #[test]
    fn no_unused_stream_slot_is_taken_as_stream_id_0() {
        // The records name one stream each; the region's unused slots are zero, which would read as StreamID 0.
        let frames = frames();
        let mut region = Region::new();
        first_image(&mut region, frames);
        let decoded = {
            let pool = region.pool();
            let bytes = pool.lock_metadata().unwrap();
            crate::handover::format::decode(&bytes, pool.pool().unwrap()).unwrap()
        };
        let streams: std::vec::Vec<u32> = decoded.instances[0]
            .records
            .iter()
            .flat_map(|r| r.streams.iter().map(|s| s.sid))
            .collect();
        assert_eq!(streams, [0x10, 0x20]);
        let (result, smmu, _model) = restore(&mut region, frames, &RestoreOptions::new(DMA), &[]);
        assert_eq!(result, Ok(2));
        assert_ne!(smmu.ste(0).map(|s| s.config()), Ok(Config::Stage1));
        assert_ne!(smmu.ste(0).map(|s| s.config()), Ok(Config::Stage2));
        core::mem::forget(smmu);
    }

    #[test]
    fn a_nested_guest_context_no_ste_can_hold_is_refused_before_the_rebuild() {
        // A stage-2 parent and a nested domain (stream 0x18) preserved; the nested record's guest CD table IPA
        // then set beyond S1ContextPtr's 52 bits, the CRC fixed: the records validate, but no STE can hold it.
        let frames = frames();
        let mut region = Region::new();
        {
            let model = Model::start(frames);
            let mut smmu = boot(&model, frames);
            let pool = region.pool();
            let parent = smmu
                .create_stage2(pool.take_arena().unwrap(), Stage2Options { input_bits: 40 })
                .unwrap();
            smmu.map(parent, 0x4000_0000, 0x4000_0000, 0x20_0000, RW).unwrap();
            let guest = crate::domain::GuestStage1 {
                cd_table: 0x4800_0000,
                cd_max_log2: 0,
                layout: crate::hw::ste::CdTableLayout::Linear,
                default_substream: crate::hw::ste::DefaultSubstream::Terminate,
            };
            let nested = smmu.create_nested(parent, guest).unwrap();
            smmu.attach(nested, 0x18).unwrap();
            smmu.preserve(parent, S2).unwrap();
            smmu.preserve(nested, S1).unwrap();
            smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
            core::mem::forget(smmu);
        }
        {
            let pool = region.pool();
            let mut bytes = pool.lock_metadata().unwrap();
            // Header 96 bytes, one identity of 64, the parent's record of 384, then the nested record's guest IPA
            // at offset 48.
            let at = 96 + 64 + 384 + 48;
            assert_eq!(bytes[at..at + 8], 0x4800_0000u64.to_le_bytes());
            bytes[at..at + 8].copy_from_slice(&(1u64 << 52).to_le_bytes());
            crate::handover::format::sample::reseal(&mut bytes);
        }
        let (result, smmu, _model) = restore(&mut region, frames, &RestoreOptions::new(DMA), &[]);
        assert!(
            matches!(
                result,
                Err(RestoreError::Verify {
                    token: S1,
                    what: VerifyFailure::GuestContext { value, .. }
                }) if value == 1 << 52
            ),
            "{result:?}"
        );
        core::mem::forget(smmu);
    }

    #[test]
    fn prepare_refuses_a_preserved_domain_mapping_memory_that_does_not_survive_or_is_protected() {
        use crate::handover::restore::PrepareError;
        let frames = frames();
        let mut region = Region::new();
        let model = Model::start(frames);
        let mut smmu = boot(&model, frames);
        let pool = region.pool();
        let surviving = [Extent {
            base: 0x8000_0000,
            len: 0x100_0000,
        }];
        let d = smmu
            .create_stage1(pool.take_arena().unwrap(), Stage1Options::default())
            .unwrap();
        smmu.map(d, 0x1000, 0x8000_0000, 0x1000, RW).unwrap();
        // The image's own RAM, which the next image reuses.
        smmu.map(d, 0x2000, 0x4020_0000, 0x1000, RW).unwrap();
        smmu.preserve(d, S1).unwrap();
        assert_eq!(
            smmu.prepare_handover(pool, BASE, 1, &surviving),
            Err(PrepareError::NotSurviving {
                token: S1,
                iova: 0x2000,
                output: 0x4020_0000,
                size: 0x1000
            })
        );
        assert!(pool.lock_metadata().unwrap().iter().all(|&b| b == 0), "nothing written");
        // Not frozen: the domain changes, and then it is prepared.
        smmu.unmap(d, 0x2000, 0x1000).unwrap();
        // The region itself (its own tables), mapped before anything declared it: refused too.
        smmu.map(d, 0x3000, region.extent.base + 0x1_0000, 0x1000, RW).unwrap();
        assert!(matches!(
            smmu.prepare_handover(pool, BASE, 1, &surviving),
            Err(PrepareError::ProtectedOutput { token: S1, iova: 0x3000, protected, .. }) if protected == region.extent
        ));
        smmu.unmap(d, 0x3000, 0x1000).unwrap();
        // Memory declared protected after it was mapped.
        let mine = Extent {
            base: 0x8000_0000,
            len: 0x1000,
        };
        smmu.protect_memory(mine).unwrap();
        assert!(matches!(
            smmu.prepare_handover(pool, BASE, 1, &surviving),
            Err(PrepareError::ProtectedOutput { protected, output: 0x8000_0000, .. }) if protected == mine
        ));
        smmu.unmap(d, 0x1000, 0x1000).unwrap();
        smmu.map(d, 0x1000, 0x8000_1000, 0x1000, RW).unwrap();
        assert!(smmu.prepare_handover(pool, BASE, 1, &surviving).is_ok());
        core::mem::forget(smmu);
    }

    /// The IOVA of page `p`: spread over 4 level-1 entries and 2 last-level tables under each.
    fn iova(p: u64) -> u64 {
        ((p % 4) << 30) | ((p / 4 % 2) << 21) | ((p / 8) << 12)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]

        /// No false refusal: whatever history of maps, unmaps (single-page and range) and trims the driver wrote,
        /// verification accepts its tables, counts, full bits and trim marks, and the same translations come back.
        /// Ops are `(kind, page, pages)`: 0 map, 1 single-page unmap (emptied tables stay, marked), 2 range unmap,
        /// 3 trim.
        #[test]
        fn every_table_history_the_driver_writes_passes_verification(
            ops in proptest::collection::vec((0u8..4, 0u64..1200, 1u64..6), 1..80)
        ) {
            let frames = frames();
            let mut region = Region::new();
            let mut expected = std::collections::BTreeMap::new();
            {
                let model = Model::start(frames);
                let mut smmu = boot(&model, frames);
                let pool = region.pool();
                let d = smmu.create_stage1(pool.take_arena().unwrap(), Stage1Options::default()).unwrap();
                for &(kind, p, n) in &ops {
                    let n = if kind == 1 { 1 } else { n.min(192 - p / 8) };
                    match kind {
                        0 => {
                            if smmu.map(d, iova(p), 0x8000_0000 + (p << 12), n << 12, RW).is_ok() {
                                for k in 0..n {
                                    expected.insert(iova(p) + (k << 12), 0x8000_0000 + ((p + k) << 12));
                                }
                            }
                        }
                        1 | 2 => {
                            smmu.unmap(d, iova(p), n << 12).unwrap();
                            for k in 0..n {
                                expected.remove(&(iova(p) + (k << 12)));
                            }
                        }
                        _ => {
                            smmu.trim_domain(d).unwrap();
                        }
                    }
                }
                smmu.attach(d, 0x10).unwrap();
                smmu.preserve(d, S1).unwrap();
                smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
                core::mem::forget(smmu);
            }
            let (result, mut smmu, _model) = restore(&mut region, frames, &RestoreOptions::new(SURVIVING), &[]);
            proptest::prop_assert_eq!(result, Ok(1));
            let d = smmu.retrieve(S1).unwrap();
            for (&i, &pa) in &expected {
                proptest::prop_assert_eq!(smmu.iova_to_phys(d, i), Ok(Some(pa)));
            }
            core::mem::forget(smmu);
        }
    }

    /// Replaces the one occurrence of `old` (as a little-endian u64 at an 8-byte aligned offset) in the region's
    /// records by `new` and fixes the CRC: what anyone who can write the region does.
    fn rewrite_record_word(region: &mut Region, old: u64, new: u64) {
        let pool = region.pool();
        let mut bytes = pool.lock_metadata().unwrap();
        let at: std::vec::Vec<usize> = (0..bytes.len() / 8)
            .map(|i| i * 8)
            .filter(|&i| bytes[i..i + 8] == old.to_le_bytes())
            .collect();
        assert_eq!(at.len(), 1, "{old:#x} found once in the records");
        bytes[at[0]..at[0] + 8].copy_from_slice(&new.to_le_bytes());
        assert!(crate::handover::format::sample::reseal(&mut bytes));
    }

    #[test]
    fn review_a_cd_table_not_at_the_start_of_a_frame_is_refused() {
        // The stream's CD copied, word for word, to the last 64 bytes of its own frame, and the record made to
        // name it there (CRC fixed). Decode wants 64-byte alignment only; verification compares the CD (equal) and
        // keeps page tables off its 64 bytes, and nothing else looks at the frame. Accepted, a detach then gives
        // the CD table's block back to the arena, whose free list takes any block up to a frame as a frame: the
        // next table the domain allocates is the misaligned `cd_table`, zeroed across the following frame, and
        // its table descriptor (address bits [47:12]) names the frame below it, so the SMMU walks bytes that
        // nothing verified (in the attack, anything the attacker left there) instead of what the driver writes.
        let frames = frames();
        let mut region = Region::new();
        let p = first_image(&mut region, frames);
        let moved = p.cd_table + 0x1000 - 64;
        for w in 0..8 {
            *word(&mut region, moved + 8 * w) = *word(&mut region, p.cd_table + 8 * w);
        }
        rewrite_record_word(&mut region, p.cd_table, moved);
        let (result, mut smmu, _model) = restore(&mut region, frames, &RestoreOptions::new(DMA), &[]);
        if result.is_ok() {
            // The consequence, with safe calls only.
            let d = smmu.retrieve(S1).unwrap();
            smmu.detach(0x10).unwrap();
            // IOVA 0x40_0000 needs a new last-level table under the level-2 table of 0x1000.
            smmu.map(d, 0x40_0000, 0x8000_8000, 0x1000, RW).unwrap();
            let driver = smmu.iova_to_phys(d, 0x40_0000);
            // The tables are abandoned as they stand (dropping the driver would walk them).
            core::mem::forget(smmu);
            let at = slot(&mut region, p.s1_root, 0, 0x40_0000, 2);
            let link = *word(&mut region, at);
            let at = slot(&mut region, p.s1_root, 0, 0x40_0000, 3);
            let leaf = *word(&mut region, at);
            panic!(
                "accepted: the map of IOVA 0x40_0000 (to 0x8000_8000) linked a table whose descriptor {link:#x} \
                 makes the SMMU walk {:#x} (the frame of the misaligned CD table {moved:#x}), whose entry for the \
                 IOVA is {leaf:#x}, not the page mapped (the driver itself now reads {driver:?})",
                desc::address(link)
            );
        }
        assert!(result.is_err(), "{result:?}");
        // Refused as a CD table the driver would not have placed there, before anything is installed.
        assert_eq!(
            result.map_err(verify_error),
            Err((
                S1,
                VerifyFailure::CdTableMisplaced {
                    sid: 0x10,
                    cd_table: moved
                }
            ))
        );
        core::mem::forget(smmu);
    }

    #[test]
    fn review_two_streams_naming_one_cd_table_are_refused() {
        // A stage-1 domain attached to streams 0x10 and 0x11 (a CD table each), preserved; then the record of
        // stream 0x11 made to name stream 0x10's CD table (CRC fixed). Both CDs compare equal to the domain's, so
        // the restore adopts one CD table twice. A detach of 0x10 then frees it into the arena while stream
        // 0x11's STE still points at it, and the domain's next table is allocated there: the SMMU reads a page
        // table (whose words a guest chooses through its mappings) as stream 0x11's CD.
        let frames = frames();
        let mut region = Region::new();
        let (root, cd_10, cd_11) = {
            let model = Model::start(frames);
            let mut smmu = boot(&model, frames);
            let pool = region.pool();
            let d = smmu
                .create_stage1(
                    pool.take_arena().unwrap(),
                    Stage1Options {
                        input_bits: 48,
                        el2: false,
                    },
                )
                .unwrap();
            smmu.map(d, 0x1000, 0x8000_0000, 0x2000, RW).unwrap();
            smmu.attach(d, 0x10).unwrap();
            smmu.attach(d, 0x11).unwrap();
            smmu.preserve(d, S1).unwrap();
            smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
            let streams = smmu.handover_records(BASE).unwrap().records[0].streams.clone();
            let cd = |sid| streams.iter().find(|s| s.sid == sid).unwrap().cd_table;
            let root = smmu.domain_table(d).unwrap().root().0;
            let cds = (cd(0x10), cd(0x11));
            core::mem::forget(smmu);
            (root, cds.0, cds.1)
        };
        rewrite_record_word(&mut region, cd_11, cd_10);
        let (result, mut smmu, _model) = restore(&mut region, frames, &RestoreOptions::new(DMA), &[]);
        if result.is_ok() {
            let d = smmu.retrieve(S1).unwrap();
            assert_eq!(smmu.ste(0x11).unwrap().cd_table().0, cd_10);
            smmu.detach(0x10).unwrap();
            // IOVA 0x40_0000 needs a new last-level table.
            smmu.map(d, 0x40_0000, 0x8000_8000, 0x1000, RW).unwrap();
            let ste_cd = smmu.ste(0x11).unwrap().cd_table().0;
            core::mem::forget(smmu);
            let at = slot(&mut region, root, 0, 0x40_0000, 2);
            let table = desc::address(*word(&mut region, at));
            panic!(
                "accepted: after detaching stream 0x10, stream 0x11's STE still names CD table {ste_cd:#x}, now the \
                 domain's last-level table {table:#x} (its first entry {:#x} is what the SMMU reads as CD word 0)",
                *word(&mut region, table)
            );
        }
        assert!(result.is_err(), "{result:?}");
        // Refused as a CD table sharing its frame, in every verification mode (see the test below).
        assert_eq!(
            result.map_err(verify_error),
            Err((
                S1,
                VerifyFailure::CdTableOverlap {
                    sid: 0x11,
                    cd_table: cd_10,
                    other: cd_10
                }
            ))
        );
        core::mem::forget(smmu);
    }

    #[test]
    fn review_a_global_leaf_in_an_asid_tagged_stage1_table_is_refused() {
        // The NS-EL1 stage-1 domain's page at IOVA 0x1000 with nG cleared (CRC untouched: only preserved memory
        // changes). Its output is inside the DMA-able memory, so the walk accepts it; but the driver writes nG = 1
        // in every leaf of such a domain, and a global entry matches every ASID: once the SMMU caches it, a DMA
        // at IOVA 0x1000 from any other stage-1 stream (any other ASID, same VMID) translates to this domain's
        // page, and the ASID-wide invalidation that frees the domain (TLBI_NH_ASID) does not remove it.
        let mut leaf = 0;
        let frames = frames();
        let mut region = Region::new();
        let p = first_image(&mut region, frames);
        let at = slot(&mut region, p.s1_root, 0, 0x1000, 3);
        assert_ne!(*word(&mut region, at) & desc::S1_NOT_GLOBAL, 0, "the driver wrote nG");
        *word(&mut region, at) &= !desc::S1_NOT_GLOBAL;
        let (result, mut smmu, model) = restore(&mut region, frames, &RestoreOptions::new(DMA), &[]);
        if result.is_ok() {
            leaf = *word(&mut region, at);
            let d = smmu.retrieve(S1).unwrap();
            smmu.detach(0x10).unwrap();
            let before = model.seen.lock().unwrap().consumed.len();
            smmu.free_domain(d).unwrap();
            let issued = issued_since(&model, before);
            core::mem::forget(smmu);
            panic!(
                "accepted: the leaf of IOVA 0x1000 is {leaf:#x} (nG = 0, global: it matches every ASID); freeing \
                 the domain issued only {issued:?}, which leaves global entries cached"
            );
        }
        assert!(result.is_err(), "{result:?} {leaf:#x}");
        match result.map_err(verify_error) {
            Err((
                S1,
                VerifyFailure::BadDescriptor {
                    entry, level: 3, what, ..
                },
            )) => {
                assert_eq!((entry, what), (at, NOT_A_DRIVER_LEAF));
            }
            other => panic!("{other:?}"),
        }
        core::mem::forget(smmu);
    }

    /// Finding 4 beyond nG: every attribute bit of a leaf is what the driver writes for the protection it grants,
    /// at every level and stage, whether one leaf of a table differs (the per-leaf check) or every leaf of it does
    /// alike (the per-table summary, which must not take a uniform pattern for a good one).
    #[test]
    fn a_leaf_with_attribute_bits_the_driver_never_writes_is_refused() {
        let cases: [(&str, u64, u8, u64, bool); 9] = [
            // (what, IOVA, level, bits flipped, on every leaf of its table)
            ("stage 1: AF clear", 0x1000, 3, desc::AF, false),
            ("stage 1: PBHA bit 59 on every leaf", 0x1000, 3, 1 << 59, true),
            ("stage 1: nG clear on every leaf", 0x1000, 3, desc::S1_NOT_GLOBAL, true),
            (
                "stage 1: AttrIndx 3 (no MAIR byte the CD sets)",
                0x2000,
                3,
                0b011 << 2,
                false,
            ),
            ("stage 1: NS", 0x20_0000, 3, 1 << 5, false),
            (
                "stage 1: a global 2 MiB block",
                0x4000_0000,
                2,
                desc::S1_NOT_GLOBAL,
                false,
            ),
            ("stage 2: nG's bit (RES0 here)", 0x1000, 3, 1 << 11, false),
            (
                "stage 2: neither read nor write",
                0x1000,
                3,
                desc::S2_AP_READ | desc::S2_AP_WRITE,
                false,
            ),
            (
                "stage 2: a 1 GiB block with a software bit",
                0x4000_0000,
                1,
                1 << 55,
                false,
            ),
        ];
        for (what, iova, level, bits, whole_table) in cases {
            let mut at = 0;
            let stage2 = what.starts_with("stage 2");
            let e = refused(|r, p| {
                let (root, start) = if stage2 { (p.s2_root, 1) } else { (p.s1_root, 0) };
                at = slot(r, root, start, iova, level);
                let entries = if whole_table { 512 } else { 1 };
                let first = if whole_table { at & !0xfff } else { at };
                for k in 0..entries {
                    let e = first + 8 * k;
                    if desc::is_valid(*word(r, e)) {
                        *word(r, e) ^= bits;
                    }
                }
            });
            let token = if stage2 { S2 } else { S1 };
            match verify_error(e) {
                (
                    t,
                    VerifyFailure::BadDescriptor {
                        entry,
                        level: l,
                        what: why,
                        ..
                    },
                ) if t == token => {
                    // The first bad leaf of the table is named: the table's first valid one when all changed.
                    let expected = if whole_table { at & !0xfff | 8 } else { at };
                    assert_eq!((entry, l, why), (expected, level, NOT_A_DRIVER_LEAF), "{what}");
                }
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    /// Findings 1 and 2 in the trusted mode too: the page tables are taken as recorded, but the CD tables are still
    /// placed and kept apart (a CD table named twice, one over the root table, one not starting its frame).
    #[test]
    fn cd_tables_are_placed_and_kept_apart_in_every_verification_mode() {
        let trusted = RestoreOptions {
            dma_memory: DMA,
            verify: Verification::TrustRecordedTables,
        };
        let frames = frames();
        for case in 0..3 {
            let mut region = Region::new();
            let (root, cd_10, cd_11) = {
                let model = Model::start(frames);
                let mut smmu = boot(&model, frames);
                let pool = region.pool();
                let d = smmu
                    .create_stage1(pool.take_arena().unwrap(), Stage1Options::default())
                    .unwrap();
                smmu.map(d, 0x1000, 0x8000_0000, 0x2000, RW).unwrap();
                smmu.attach(d, 0x10).unwrap();
                smmu.attach(d, 0x11).unwrap();
                smmu.preserve(d, S1).unwrap();
                smmu.prepare_handover(pool, BASE, 1, SURVIVING).unwrap();
                let streams = smmu.handover_records(BASE).unwrap().records[0].streams.clone();
                let cd = |sid| streams.iter().find(|s| s.sid == sid).unwrap().cd_table;
                let root = smmu.domain_table(d).unwrap().root().0;
                let cds = (cd(0x10), cd(0x11));
                core::mem::forget(smmu);
                (root, cds.0, cds.1)
            };
            let expected = match case {
                0 => {
                    rewrite_record_word(&mut region, cd_11, cd_10);
                    VerifyFailure::CdTableOverlap {
                        sid: 0x11,
                        cd_table: cd_10,
                        other: cd_10,
                    }
                }
                1 => {
                    // The root's CD words copied over the root's first entries would be a CD that compares
                    // equal; the frame check refuses it before any CD is read.
                    rewrite_record_word(&mut region, cd_11, root);
                    VerifyFailure::CdTableOverlap {
                        sid: 0x11,
                        cd_table: root,
                        other: root,
                    }
                }
                _ => {
                    for w in 0..8 {
                        *word(&mut region, cd_11 + 0x40 + 8 * w) = *word(&mut region, cd_11 + 8 * w);
                    }
                    rewrite_record_word(&mut region, cd_11, cd_11 + 0x40);
                    VerifyFailure::CdTableMisplaced {
                        sid: 0x11,
                        cd_table: cd_11 + 0x40,
                    }
                }
            };
            let (result, smmu, _model) = restore(&mut region, frames, &trusted, &[]);
            core::mem::forget(smmu);
            assert_eq!(result.map_err(verify_error), Err((S1, expected)), "case {case}");
        }
    }
}
