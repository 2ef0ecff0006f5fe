//! Live update: domains preserved under caller-chosen 64-bit tokens, recorded in a reserved handover region, and
//! rebuilt by token after a warm reset or a jump into a new image.
//!
//! This module holds the records' in-memory form, shared by the encoder/validator ([`format`]) and the driver's
//! preserve/restore path. The byte format itself is documented in `docs/handover.md`.
//!
//! # The lifecycle: one state machine
//!
//! Each [`crate::Iommu`] is in one phase ([`restore::HandoverPhase`], from
//! [`crate::Iommu::handover_phase`]); each domain is unpreserved, preserved under a token, or (in the next
//! image) restored and waiting under its token. Every call the table does not allow is a typed error that changes
//! nothing.
//!
//! | phase | allowed (→ next phase) | refused |
//! |---|---|---|
//! | `Idle` | `preserve`, `unpreserve`; `prepare_handover` → `Prepared`; `restore_handover` → `Restored` when the region holds this SMMU's records (else stays `Idle`; a refusal stays `Idle`, region untouched); `finish_handover` (re-arms the region without this SMMU's records: declines them) | `cancel_handover`: `PrepareError::NotPrepared` |
//! | `Prepared` | `prepare_handover` again (records rewritten); `cancel_handover` → `Idle`; changes to domains that are not preserved (with the SMMU left running: but no attach); making a stream abort | `preserve`, `unpreserve`: `DomainError::HandoverPrepared`; map, unmap, protect, trim, attach, detach of a preserved domain: `HandoverPrepared`; `free_domain` of one: `DomainError::Preserved`; a domain created with sealed memory: `DomainError::MemorySealed`; with the SMMU left running, `attach` and `attach_substream` to any domain: `DomainError::StreamsFrozen`, `attach_bypass`: `AttachError::StreamsFrozen`; `restore_handover`: `RestoreError::HandoverPrepared`; `finish_handover`: `FinishError::HandoverPrepared` |
//! | `Restored` | `retrieve` (each token once); `finish_handover` → `Idle` (a failed finish stays `Restored`: finish again) | `restore_handover`: `RestoreError::AlreadyRestored`; `prepare_handover`: `PrepareError::RestoreNotFinished`; `cancel_handover`: `NotPrepared`; `preserve` under a token a restored domain waits under: `DomainError::TokenInUse` |
//!
//! A successful restore consumes the records (the region is re-armed without this SMMU's): a record restores once,
//! so a domain retrieved and freed (its memory handed out again) can never come back, in this image or after
//! another reset. Only `prepare_handover` writes records again. A refused restore leaves nothing translating: see
//! [`crate::Iommu::restore_handover`].
//!
//! A hand-off with the SMMU left running (its own structures in a handover memory) is prepared only while every
//! stream that does not abort translates through a preserved domain (`PrepareError::UnpreservedStream` names the
//! first that does not), and from then on no stream starts translating or bypassing until it is cancelled.
//!
//! On an SMMU adopted running ([`crate::Smmu::adopt_running`]) no ASID or VMID is allocated, so no domain created
//! (`IdError::HandOffUnsettled`), until the hand-off is settled: a successful `restore_handover` (records found or
//! not) makes every stream no restored domain holds abort and invalidates everything before it returns
//! (`abort_unrestored_streams` does the same without a restore).

mod finish;
pub mod format;
pub mod live;
pub mod pool;
mod prepare;
pub mod restore;
pub mod verify;

/// SMMU instances one region can describe.
pub const MAX_INSTANCES: usize = 8;

/// A range of physical memory (defined with the frames it describes, in [`crate::mem`]).
pub use crate::mem::Extent;
pub use finish::{FinishError, FinishReport, REGION_METADATA_BYTES};
pub use prepare::{HandoverPhase, PrepareError};

/// Which SMMU a set of records belongs to, as probed when they were written. The next image compares it with what
/// it probes: a region written for another SMMU (another base, other ID registers) is refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmmuIdentity {
    /// Register base (physical).
    pub base: u64,
    /// SMMU_IDR0..5 as probed.
    pub idr: [u32; 6],
    /// SMMU_IIDR as probed.
    pub iidr: u32,
    /// The stream table the SMMU used: its base (physical), format (0 linear, 1 two-level), StreamID bits and split.
    pub strtab_base: u64,
    /// Stream table format: 0 linear, 1 2-level.
    pub strtab_format: u8,
    /// StreamID bits the stream table covers.
    pub strtab_sid_bits: u8,
    /// 2-level split (0 for linear).
    pub strtab_split: u8,
    /// For a hand-off with the SMMU left running: the bytes, from `strtab_base`, of the handover memory holding
    /// the SMMU's own structures (the stream table first, then its level-2 spans), which the next image adopts
    /// as found. 0 when the stream table is not in the pool (a warm reset re-creates it).
    pub core_len: u64,
}

/// What a preserved domain is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum RecordKind {
    /// A stage-1 domain (NS-EL1).
    Stage1 = 1,
    /// A stage-2 domain.
    Stage2 = 2,
    /// A nested domain: a guest's stage 1 inside a stage-2 parent, named by the parent's token.
    Nested = 3,
    /// A stage-1 domain of the EL2 regime.
    Stage1El2 = 4,
}

/// A page table's root and shape: what adopting it in place needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableShape {
    /// Physical address of the root table.
    pub root: u64,
    /// log2 of the granule: 12, 14 or 16.
    pub granule_log2: u8,
    /// Input (IOVA / IPA) bits.
    pub input_bits: u8,
    /// Output bits.
    pub output_bits: u8,
    /// Level of the root (0..=3).
    pub start_level: u8,
    /// Tables in use, the root included, when the handover was prepared (0: not recorded, the next image walks
    /// the tables once to count them).
    pub tables: u16,
    /// Emptied last-level tables waiting for a trim then (at most `tables`).
    pub empty: u16,
}

/// One attached stream (or substream) of a preserved domain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamRecord {
    /// StreamID.
    pub sid: u32,
    /// SubstreamID; 0 for the whole stream.
    pub ssid: u32,
    /// Physical address of the stream's CD table (stage-1 domains; 0 otherwise).
    pub cd_table: u64,
    /// SubstreamID bits of that CD table.
    pub cd_ssid_bits: u8,
    /// Whether that CD table is 2-level (S1Fmt 0b10, 1024-CD leaves): then only its level-1 table's size is known
    /// from the record; `false` for a linear table (and for streams without a CD table).
    pub cd_two_level: bool,
}

/// The guest's stage-1 context of a nested domain, as [`crate::domain::GuestStage1`] carries it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRecord {
    /// IPA of the guest's CD table.
    pub cd_table_ipa: u64,
    /// S1CDMax.
    pub cd_max_log2: u8,
    /// S1Fmt (0 linear, 1 2-level 4K, 2 2-level 64K).
    pub layout: u8,
    /// S1DSS (0 terminate, 1 bypass, 2 substream 0).
    pub default_substream: u8,
}

/// One preserved domain: decoded from a region (its streams and extents read from the region's bytes as they are
/// iterated), or built by a caller (over slices it owns) to be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainRecord<'a> {
    /// The caller's token.
    pub token: u64,
    /// What it is.
    pub kind: RecordKind,
    /// ASID (stage 1 and EL2 stage 1; 0 otherwise).
    pub asid: u16,
    /// VMID (stage 2; a nested domain's is its parent's; 0 for stage 1).
    pub vmid: u16,
    /// The page table (stage 1 and stage 2; `None` for nested: the guest owns its stage 1).
    pub table: Option<TableShape>,
    /// The stage-2 parent's token (nested only).
    pub parent_token: Option<u64>,
    /// The guest's stage-1 context (nested only).
    pub guest: Option<GuestRecord>,
    /// The streams attached at hand-off: any number.
    pub streams: Entries<'a, StreamRecord>,
    /// The pool memory the domain owns (its tables and CD tables lie inside): any number of extents.
    pub extents: Entries<'a, Extent>,
    /// An identity domain (stage 1 or stage 2): its table maps RAM one to one and nothing may change it. Recorded
    /// from format version 3; `false` in a version-2 region (which could not hold one).
    pub identity: bool,
}

/// One SMMU's part of a region: decoded (a view of the region's bytes), or built by a caller to be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstanceRecords<'a> {
    /// The SMMU the records belong to.
    pub identity: SmmuIdentity,
    /// Its preserved domains: any number.
    pub records: Records<'a>,
}

/// A list of entries of a record (its streams or its extents): a view of a decoded region's bytes, or a slice.
/// Iterating a decoded list reads the bytes that were validated: it never fails.
#[derive(Clone, Copy)]
pub struct Entries<'a, T: 'static> {
    repr: EntriesRepr<'a, T>,
}

#[derive(Clone, Copy)]
enum EntriesRepr<'a, T: 'static> {
    /// `len` entries of the format's encoding of `T`, back to back.
    Bytes {
        bytes: &'a [u8],
        len: usize,
    },
    Slice(&'a [T]),
    /// The `len` runs of frames a handover memory holds (extents only), read from it as they are iterated.
    Runs {
        memory: &'a (dyn crate::mem::FrameAllocator + Sync),
        len: usize,
    },
    /// `len` entries read from `source` as they are iterated (a live domain's streams).
    Source {
        source: &'a dyn EntrySource<T>,
        len: usize,
    },
}

/// Entries a list reads as it is iterated: the driver's live bookkeeping, walked without a copy.
pub(crate) trait EntrySource<T>: Sync {
    /// The entry at `cursor` (0 for the first) and the cursor of the one after it; `None` past the end.
    fn entry_at(&self, cursor: u64) -> Option<(T, u64)>;
}

/// What a record's list holds, with how the region encodes it (see [`format`]).
pub trait Entry: Copy + PartialEq + core::fmt::Debug + 'static + sealed::Sealed {}
impl Entry for StreamRecord {}
impl Entry for Extent {}

mod sealed {
    pub trait Sealed: Sized {
        const SIZE: usize;
        fn read(bytes: &[u8]) -> Self;
        /// The first run at or after `from` of a handover memory (extents only; `None` for anything else).
        fn run(memory: &(dyn crate::mem::FrameAllocator + Sync), from: u64) -> Option<Self>;
        /// Where a run ends (extents only).
        fn end(&self) -> u64;
    }
}

impl<'a, T: Entry> Entries<'a, T> {
    /// The entries of `slice`, for a record built to be encoded.
    pub const fn from_slice(slice: &'a [T]) -> Self {
        Entries {
            repr: EntriesRepr::Slice(slice),
        }
    }

    /// No entries.
    pub const fn empty() -> Self {
        Entries {
            repr: EntriesRepr::Slice(&[]),
        }
    }

    /// The runs of frames `memory` holds (a live domain's handover memory), counted now and read as they are
    /// iterated: the memory must not change while the entries are used.
    pub(crate) fn from_runs(memory: &'a (dyn crate::mem::FrameAllocator + Sync)) -> Self {
        let mut len = 0;
        let mut from = 0;
        while let Some(run) = T::run(memory, from) {
            len += 1;
            from = run.end();
        }
        Entries {
            repr: EntriesRepr::Runs { memory, len },
        }
    }

    /// `len` entries of `source`, read as they are iterated: the source must not change while the entries are
    /// used.
    pub(crate) fn from_source(source: &'a dyn EntrySource<T>, len: usize) -> Self {
        Entries {
            repr: EntriesRepr::Source { source, len },
        }
    }

    /// `len` entries encoded back to back in `bytes` (already validated).
    pub(crate) fn from_bytes(bytes: &'a [u8], len: usize) -> Self {
        Entries {
            repr: EntriesRepr::Bytes { bytes, len },
        }
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        match self.repr {
            EntriesRepr::Bytes { len, .. } | EntriesRepr::Runs { len, .. } | EntriesRepr::Source { len, .. } => len,
            EntriesRepr::Slice(s) => s.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entry `index`, or `None` past the end.
    pub fn get(&self, index: usize) -> Option<T> {
        match self.repr {
            EntriesRepr::Bytes { bytes, len } if index < len => {
                bytes.get(index * T::SIZE..(index + 1) * T::SIZE).map(T::read)
            }
            EntriesRepr::Bytes { .. } => None,
            EntriesRepr::Slice(s) => s.get(index).copied(),
            EntriesRepr::Runs { .. } | EntriesRepr::Source { .. } => self.iter().nth(index),
        }
    }

    /// The first entry, or `None`.
    pub fn first(&self) -> Option<T> {
        self.get(0)
    }

    /// The entries, in order.
    pub fn iter(&self) -> EntriesIter<'a, T> {
        EntriesIter {
            entries: *self,
            index: 0,
            from: 0,
        }
    }
}

impl<'a, T: Entry> IntoIterator for &Entries<'a, T> {
    type Item = T;
    type IntoIter = EntriesIter<'a, T>;
    fn into_iter(self) -> EntriesIter<'a, T> {
        self.iter()
    }
}

/// The entries of an [`Entries`], in order.
#[derive(Clone)]
pub struct EntriesIter<'a, T: 'static> {
    entries: Entries<'a, T>,
    index: usize,
    /// Where the next run is looked for (runs), the next entry's cursor (a source).
    from: u64,
}

impl<T: Entry> Iterator for EntriesIter<'_, T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        let entry = match self.entries.repr {
            EntriesRepr::Runs { memory, len } if self.index < len => {
                let run = T::run(memory, self.from)?;
                self.from = run.end();
                run
            }
            EntriesRepr::Runs { .. } => return None,
            EntriesRepr::Source { source, len } if self.index < len => {
                let (entry, next) = source.entry_at(self.from)?;
                self.from = next;
                entry
            }
            EntriesRepr::Source { .. } => return None,
            _ => self.entries.get(self.index)?,
        };
        self.index += 1;
        Some(entry)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.entries.len().saturating_sub(self.index);
        (left, Some(left))
    }
}

impl<T: Entry> ExactSizeIterator for EntriesIter<'_, T> {}

impl<T: Entry> Default for Entries<'_, T> {
    fn default() -> Self {
        Self::empty()
    }
}

impl<T: Entry> PartialEq for Entries<'_, T> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl<T: Entry> Eq for Entries<'_, T> {}

impl<T: Entry> core::fmt::Debug for Entries<'_, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// An SMMU's records: a view of a decoded region's bytes, or a slice of records built by a caller.
#[derive(Clone, Copy)]
pub struct Records<'a> {
    repr: RecordsRepr<'a>,
}

#[derive(Clone, Copy)]
enum RecordsRepr<'a> {
    /// `len` validated records of format `version`, back to back in `bytes`.
    Bytes {
        bytes: &'a [u8],
        len: usize,
        version: u32,
    },
    Slice(&'a [DomainRecord<'a>]),
}

impl<'a> Records<'a> {
    /// The records of `slice`, to be encoded.
    pub const fn from_slice(slice: &'a [DomainRecord<'a>]) -> Self {
        Records {
            repr: RecordsRepr::Slice(slice),
        }
    }

    /// No records.
    pub const fn empty() -> Self {
        Records {
            repr: RecordsRepr::Slice(&[]),
        }
    }

    /// `len` records of format `version` back to back in `bytes` (validated by [`format::decode`]).
    pub(crate) fn from_bytes(bytes: &'a [u8], len: usize, version: u32) -> Self {
        Records {
            repr: RecordsRepr::Bytes { bytes, len, version },
        }
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        match self.repr {
            RecordsRepr::Bytes { len, .. } => len,
            RecordsRepr::Slice(s) => s.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first record, or `None`.
    pub fn first(&self) -> Option<DomainRecord<'a>> {
        self.iter().next()
    }

    /// Record `index`, or `None` past the end (a decoded region's are read from the start: linear).
    pub fn get(&self, index: usize) -> Option<DomainRecord<'a>> {
        self.iter().nth(index)
    }

    /// The records, in order (a decoded region's are read from its bytes: linear in the records' size).
    pub fn iter(&self) -> RecordIter<'a> {
        RecordIter {
            repr: self.repr,
            index: 0,
            offset: 0,
        }
    }
}

impl Default for Records<'_> {
    fn default() -> Self {
        Self::empty()
    }
}

impl PartialEq for Records<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for Records<'_> {}

impl core::fmt::Debug for Records<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// The records of a [`Records`], in order.
#[derive(Clone)]
pub struct RecordIter<'a> {
    repr: RecordsRepr<'a>,
    index: usize,
    offset: usize,
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = DomainRecord<'a>;

    fn next(&mut self) -> Option<DomainRecord<'a>> {
        match self.repr {
            RecordsRepr::Slice(s) => {
                let r = s.get(self.index).copied();
                self.index += 1;
                r
            }
            RecordsRepr::Bytes { bytes, len, version } => {
                if self.index >= len {
                    return None;
                }
                let (record, size) = format::read_record(bytes.get(self.offset..)?, version)?;
                self.index += 1;
                self.offset += size;
                Some(record)
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let len = match self.repr {
            RecordsRepr::Slice(s) => s.len(),
            RecordsRepr::Bytes { len, .. } => len,
        };
        let left = len.saturating_sub(self.index);
        (left, Some(left))
    }
}

impl ExactSizeIterator for RecordIter<'_> {}

impl<'a> IntoIterator for &Records<'a> {
    type Item = DomainRecord<'a>;
    type IntoIter = RecordIter<'a>;
    fn into_iter(self) -> RecordIter<'a> {
        self.iter()
    }
}

/// Cleans `[ptr, ptr + len)` to the point of coherency whatever the SMMU's coherency: what a warm reset must find
/// in memory, not in a cache that the reset may discard.
pub(crate) fn clean_to_memory(ptr: *const u8, len: usize) {
    crate::mem::Coherency { coherent: false }.clean(ptr, len);
}
