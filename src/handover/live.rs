//! The driver's side of a live update: what the preserved domains look like as records ([`super::DomainRecord`]),
//! and writing them into the handover region.

use super::{
    DomainRecord, Entries, Extent, GuestRecord, InstanceRecords, RecordKind, Records, SmmuIdentity, StreamRecord,
    TableShape,
};
use crate::domain::Iommu;
use crate::domain::{Book, DomainId, DomainState, MAX_ATTACHMENTS, MAX_PRESERVED, Translation};
use crate::hw::ste::{CdTableLayout, DefaultSubstream};
use crate::mem::FrameAllocator;
use crate::pgtable::IoPageTable;
use crate::stream::StreamTableFormat;

/// A preserved domain's record as the driver builds it from the live domain: the record, with its streams and
/// its memory's extent beside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveRecord {
    head: DomainRecord<'static>,
    streams: heapless::Vec<StreamRecord, MAX_ATTACHMENTS>,
    /// The runs of frames its memory holds, read from the memory (which is frozen while a hand-off is prepared,
    /// and write-locked while the records are built).
    extents: Entries<'static, Extent>,
}

impl LiveRecord {
    /// The record.
    pub fn record(&self) -> DomainRecord<'_> {
        DomainRecord {
            streams: Entries::from_slice(&self.streams),
            extents: self.extents,
            ..self.head
        }
    }
}

/// The records of an SMMU's preserved domains as they stand ([`Iommu::handover_records`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveRecords {
    /// The SMMU.
    pub identity: SmmuIdentity,
    records: heapless::Vec<LiveRecord, MAX_PRESERVED>,
}

impl LiveRecords {
    /// The records as one SMMU's part of a region: what [`super::format::encode`] writes.
    pub fn instance(&self) -> InstanceRecords<'_> {
        InstanceRecords {
            identity: self.identity,
            records: Records::from_live(&self.records),
        }
    }
}

/// Why the preserved domains cannot be recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// More preserved domains, streams or extents than a record holds.
    TooMany(&'static str),
    /// A preserved domain's memory is not (any longer) a handover memory.
    NotHandoverMemory(DomainId),
    /// A nested domain's parent is not preserved (cannot happen through the API; reported, not assumed).
    ParentNotPreserved(DomainId),
    /// The domain is attached to a substream of a stream whose CD table belongs to another domain: only
    /// substreams of the domain's own streams can be handed over.
    SubstreamOfAnotherDomain {
        /// The domain.
        domain: DomainId,
        /// StreamID.
        sid: u32,
        /// SubstreamID.
        ssid: u32,
    },
}

impl core::fmt::Display for RecordError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RecordError::TooMany(what) => write!(f, "too many {what} for a handover record"),
            RecordError::NotHandoverMemory(d) => write!(f, "{d}'s memory is not a handover memory"),
            RecordError::ParentNotPreserved(d) => write!(f, "{d}'s stage-2 parent is not preserved"),
            RecordError::SubstreamOfAnotherDomain { domain, sid, ssid } => write!(
                f,
                "{domain} holds substream {ssid:#x} of stream {sid:#x}, whose CD table is another domain's: not preservable"
            ),
        }
    }
}

fn shape<A: FrameAllocator>(table: &IoPageTable<A>) -> TableShape {
    let format = table.format();
    TableShape {
        root: table.root().0,
        granule_log2: format.granule.log2(),
        input_bits: format.input_bits,
        output_bits: format.output_bits,
        start_level: table.geometry().start_level,
        // Past u16 the counts are not recorded (0): the next image recounts.
        tables: u16::try_from(table.tables()).unwrap_or(0),
        empty: if table.tables() > u32::from(u16::MAX) {
            0
        } else {
            u16::try_from(table.empty_tables()).unwrap_or(0)
        },
    }
}

impl<A: FrameAllocator, const D: usize> Iommu<A, D> {
    /// This SMMU as a record names it: `register_base` (the physical base the board gave), the ID registers as
    /// probed, the stream table's geometry, and (when the SMMU's own memory is a handover memory that starts with
    /// the stream table, for a hand-off with the SMMU running) how much of that memory it uses.
    pub fn handover_identity(&self, register_base: u64) -> SmmuIdentity {
        let raw = self.features().raw;
        let (strtab_format, strtab_sid_bits, strtab_split) = match self.stream_table_format() {
            StreamTableFormat::Linear { sid_bits } => (0, sid_bits, 0),
            StreamTableFormat::TwoLevel { sid_bits, split } => (1, sid_bits, split),
        };
        SmmuIdentity {
            base: register_base,
            idr: raw.idr,
            iidr: raw.iidr,
            strtab_base: self.configuration().stream_table_base,
            strtab_format,
            strtab_sid_bits,
            strtab_split,
            // One extent (a window's), from the stream table.
            core_len: self
                .allocator()
                .handover_run(0)
                .filter(|e| {
                    e.base == self.configuration().stream_table_base
                        && self.allocator().handover_run(e.base + e.len).is_none()
                })
                .map_or(0, |e| e.len),
        }
    }

    /// The records of every preserved domain as they stand now (parents before the nested domains under them).
    /// A record's extents are read from its domain's memory as they are iterated (counted now): they describe the
    /// memory as it is then, and a domain changed since (this call holds no lock once it returns) may yield fewer
    /// runs than counted, which `format::encode` writes as zeroed slots no decode accepts. `prepare_handover`
    /// reads them under its freeze, where nothing changes.
    ///
    /// # Errors
    /// [`RecordError`]; nothing is written anywhere.
    pub fn handover_records(&self, register_base: u64) -> Result<LiveRecords, RecordError> {
        // No attach or detach half-way: each is waited for.
        let book = self.book_quiet();
        if book.tokens.len() > MAX_PRESERVED {
            return Err(RecordError::TooMany(
                "preserved domains (handover_records holds MAX_PRESERVED)",
            ));
        }
        // Read-locked in slot order (the lock order), all at once: the records are one consistent picture.
        let guards = preserved_in_slot_order(&book)
            .into_iter()
            .filter_map(|id| Some((id, self.domains.get(id).ok()?)))
            .collect::<heapless::Vec<_, MAX_PRESERVED>>();
        let states: heapless::Vec<(DomainId, &DomainState), MAX_PRESERVED> =
            guards.iter().map(|(id, g)| (*id, &**g)).collect();
        self.records_locked(&book, &states, register_base)
    }

    /// [`Iommu::handover_records`] under the bookkeeping the caller holds, of the preserved domains in
    /// `states` (which the caller holds locked).
    pub(crate) fn records_locked(
        &self,
        book: &Book<D>,
        states: &[(DomainId, &DomainState)],
        register_base: u64,
    ) -> Result<LiveRecords, RecordError> {
        let held = |id: DomainId| states.iter().find(|(x, _)| *x == id).map(|(_, s)| *s);
        let mut records: heapless::Vec<LiveRecord, MAX_PRESERVED> = heapless::Vec::new();
        // Parents (stage 1 and stage 2) first, then nested domains, so a reader meets a parent before its children.
        for nested_pass in [false, true] {
            for &(id, state) in states {
                let Some(token) = state.token else { continue };
                if matches!(state.translation, Translation::Nested { .. }) != nested_pass {
                    continue;
                }
                let parent = match state.translation {
                    Translation::Nested { parent, .. } => {
                        Some(held(parent).ok_or(RecordError::ParentNotPreserved(id))?)
                    }
                    _ => None,
                };
                let (head, streams, extents) = self.record_of(book, token, id, state, parent)?;
                records
                    .push(LiveRecord { head, streams, extents })
                    .map_err(|_| RecordError::TooMany("preserved domains"))?;
            }
        }
        Ok(LiveRecords {
            identity: self.handover_identity(register_base),
            records,
        })
    }

    /// The record of preserved domain `id` (`state`, under `token`; `parent` its stage-2 parent's state for a
    /// nested domain): its head, its streams and its memory's runs (read from the memory as they are iterated).
    pub(crate) fn record_of(
        &self,
        book: &Book<D>,
        token: u64,
        id: DomainId,
        state: &DomainState,
        parent: Option<&DomainState>,
    ) -> Result<RecordParts, RecordError> {
        let mut record = DomainRecord {
            token,
            kind: RecordKind::Stage1,
            asid: 0,
            vmid: 0,
            table: None,
            parent_token: None,
            guest: None,
            streams: Entries::empty(),
            extents: Entries::empty(),
            identity: state.identity,
        };
        let mut streams = heapless::Vec::new();
        let mut own_extents = Entries::empty();
        let is_nested = matches!(state.translation, Translation::Nested { .. });
        match &state.translation {
            Translation::Stage1 { table, asid, el2, .. } => {
                record.kind = if *el2 {
                    RecordKind::Stage1El2
                } else {
                    RecordKind::Stage1
                };
                record.asid = *asid;
                record.table = Some(shape(table));
            }
            Translation::Stage2 { table, vmid, .. } => {
                record.kind = RecordKind::Stage2;
                record.vmid = *vmid;
                record.table = Some(shape(table));
            }
            // Never preserved: a domain without a table has no handover memory.
            Translation::Fixed(_) => return Err(RecordError::NotHandoverMemory(id)),
            Translation::Nested { guest, .. } => {
                let parent_state = parent.ok_or(RecordError::ParentNotPreserved(id))?;
                let Translation::Stage2 { vmid, .. } = parent_state.translation else {
                    return Err(RecordError::ParentNotPreserved(id));
                };
                record.kind = RecordKind::Nested;
                record.vmid = vmid;
                record.parent_token = Some(parent_state.token.ok_or(RecordError::ParentNotPreserved(id))?);
                record.guest = Some(GuestRecord {
                    cd_table_ipa: guest.cd_table,
                    cd_max_log2: guest.cd_max_log2,
                    layout: match guest.layout {
                        CdTableLayout::Linear => 0,
                        CdTableLayout::TwoLevel4K => 1,
                        CdTableLayout::TwoLevel64K => 2,
                    },
                    default_substream: match guest.default_substream {
                        DefaultSubstream::Terminate => 0,
                        DefaultSubstream::Bypass => 1,
                        DefaultSubstream::Substream0 => 2,
                    },
                });
            }
        }
        if !is_nested {
            if !state.memory.survives_handover() {
                return Err(RecordError::NotHandoverMemory(id));
            }
            own_extents = Entries::from_runs(state.memory);
        }
        for &(sid, ssid) in state.attachments.iter() {
            let owner = book.streams.iter().find(|r| r.sid == sid);
            if ssid != 0 && owner.is_some_and(|r| r.domain != id) {
                return Err(RecordError::SubstreamOfAnotherDomain { domain: id, sid, ssid });
            }
            let cd_table = owner.and_then(|r| r.cd_table.as_ref());
            let stream = StreamRecord {
                sid,
                ssid,
                cd_table: cd_table.map_or(0, |t| t.base().0),
                cd_ssid_bits: cd_table.map_or(0, |t| t.format().ssid_bits()),
                cd_two_level: false,
            };
            streams.push(stream).map_err(|_| RecordError::TooMany("streams"))?;
        }
        Ok((record, streams, own_extents))
    }
}

/// A preserved domain's record as [`Iommu::record_of`] builds it: its head, its streams, its memory's runs.
pub(crate) type RecordParts = (
    DomainRecord<'static>,
    heapless::Vec<StreamRecord, MAX_ATTACHMENTS>,
    Entries<'static, Extent>,
);

/// The extent of everything `records` own, for tests and tools: each record's extents.
pub fn owned_extents<'a>(records: &InstanceRecords<'a>) -> impl Iterator<Item = Extent> + use<'a> {
    records.records.iter().flat_map(|r| r.extents.iter())
}

/// The preserved domains of `book`, in slot order: the order their locks are taken in when several are held.
/// At most [`MAX_PRESERVED`] of them (the first in the index's order beyond it): for [`Iommu::handover_records`],
/// which refuses more.
pub(crate) fn preserved_in_slot_order<const D: usize>(book: &Book<D>) -> heapless::Vec<DomainId, MAX_PRESERVED> {
    let mut ids: heapless::Vec<DomainId, MAX_PRESERVED> = book.tokens.values().copied().take(MAX_PRESERVED).collect();
    ids.sort_unstable_by_key(|id| id.index());
    ids
}
