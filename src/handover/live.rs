//! The driver's side of a live update: what the preserved domains look like as records ([`super::DomainRecord`]),
//! and writing them into the handover region.

use super::format::{self, FormatError, RegionWriter};
use super::{
    DomainRecord, Entries, EntrySource, Extent, GuestRecord, InstanceRecords, RecordKind, Records, SmmuIdentity,
    StreamRecord, TableShape,
};
use crate::domain::{Book, DomainId, DomainState, Domains, Iommu, StateMut, Storage, Translation};
use crate::hw::ste::{CdTableLayout, DefaultSubstream};
use crate::mem::FrameAllocator;
use crate::mem::MemoryHooks;
use crate::pgtable::IoPageTable;
use crate::stream::StreamTableFormat;

/// Why the preserved domains cannot be recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordError {
    /// More preserved domains than the driver could hold locked at once: no memory for the list of their locks.
    NoMemoryForLocks {
        /// The preserved domains whose locks were to be held.
        domains: usize,
    },
    /// The records do not fit the buffer given to [`Iommu::handover_records`] (its bytes needed, at least).
    Format(FormatError),
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
            RecordError::NoMemoryForLocks { domains } => write!(
                f,
                "too many preserved domains ({domains}) for a handover record: no memory to hold their locks"
            ),
            RecordError::Format(e) => write!(f, "{e}"),
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

    /// The records of every preserved domain as they stand now (parents before the nested domains under them),
    /// written into `out` in the region's record format and returned as a view of it: what
    /// [`Iommu::prepare_handover`] would record, for tests and tools. It allocates nothing (so it answers after a
    /// prepared hand-off too, whose memory is sealed). Under the bookkeeping (no domain is preserved, unpreserved,
    /// attached or detached meanwhile, so what links records, a nested domain's parent, stays), each domain is
    /// read-locked while its record is written, one at a time: a record is one domain as it stood then.
    ///
    /// # Errors
    /// [`RecordError::Format`] ([`FormatError::BufferTooSmall`], with the bytes needed so far) when the records do
    /// not fit `out`; the other [`RecordError`]s for a domain that cannot be recorded. Nothing is changed anywhere
    /// but `out`.
    pub fn handover_records<'b>(
        &self,
        register_base: u64,
        out: &'b mut [u8],
    ) -> Result<InstanceRecords<'b>, RecordError> {
        // No attach or detach half-way: each is waited for.
        let book = self.book_quiet();
        let identity = self.handover_identity(register_base);
        let mut writer = RegionWriter::new(&mut *out, 1).map_err(RecordError::Format)?;
        writer.instance(&identity).map_err(RecordError::Format)?;
        self.write_preserved(&mut writer, &book, None)?;
        let (len, count) = (writer.len(), writer.records());
        drop(book);
        let out: &'b [u8] = out;
        Ok(InstanceRecords {
            identity,
            records: Records::from_bytes(
                &out[format::HEADER_SIZE + format::IDENTITY_SIZE..len],
                count,
                format::VERSION,
            ),
        })
    }

    /// Writes the records of the preserved domains through `writer` (the caller holds the bookkeeping, `book`):
    /// parents (stage 1 and stage 2) first, then nested domains, so that a reader meets a parent before its
    /// children. From `held` when the caller holds every preserved domain locked (`prepare_handover`); else each
    /// domain read-locked in turn, in slot order (a nested domain's parent before it, never under its lock).
    pub(crate) fn write_preserved(
        &self,
        writer: &mut RegionWriter<'_>,
        book: &Book<D>,
        held: Option<&Held<'_, StateMut<'_>>>,
    ) -> Result<(), RecordError> {
        for nested_pass in [false, true] {
            if let Some(held) = held {
                for (id, state) in held.iter() {
                    if matches!(state.translation, Translation::Nested { .. }) != nested_pass {
                        continue;
                    }
                    let parent_token = match state.translation {
                        Translation::Nested { parent, .. } => held.get(parent).and_then(|p| p.token),
                        _ => None,
                    };
                    self.write_record(writer, book, id, state, parent_token)?;
                }
                continue;
            }
            for (_, id) in self.domains.preserved() {
                let parent = match self.domains.get(id) {
                    Ok(state) => match state.translation {
                        Translation::Nested { parent, .. } => Some(parent),
                        _ => None,
                    },
                    Err(_) => continue,
                };
                if parent.is_some() != nested_pass {
                    continue;
                }
                // The parent's token read under its own lock, before the child's is taken (the lock order).
                let parent_token = parent.and_then(|p| self.domains.get(p).ok()?.token);
                let Ok(state) = self.domains.get(id) else { continue };
                self.write_record(writer, book, id, &state, parent_token)?;
            }
        }
        Ok(())
    }

    /// Writes the record of preserved domain `id` (`state`, locked by the caller; `parent_token` its stage-2
    /// parent's token for a nested domain), its streams read from its attachments as they are written.
    fn write_record(
        &self,
        writer: &mut RegionWriter<'_>,
        book: &Book<D>,
        id: DomainId,
        state: &DomainState,
        parent_token: Option<u64>,
    ) -> Result<(), RecordError> {
        let Some(token) = state.token else { return Ok(()) };
        let (head, extents) = self.record_of(book, token, id, state, parent_token)?;
        let streams = AttachedStreamsOf {
            domains: &self.domains,
            state,
            book,
        };
        let record = DomainRecord {
            streams: Entries::from_source(&streams, state.attachments.len()),
            extents,
            ..head
        };
        writer.record(&record).map_err(RecordError::Format)
    }

    /// The record of preserved domain `id` (`state`, under `token`; `parent_token` its stage-2 parent's token for
    /// a nested domain: `None` when the parent is not preserved) but its streams ([`AttachedStreamsOf`]), with its memory's runs (read from the memory as
    /// they are iterated), once its streams are checked.
    pub(crate) fn record_of(
        &self,
        book: &Book<D>,
        token: u64,
        id: DomainId,
        state: &DomainState,
        parent_token: Option<u64>,
    ) -> Result<(DomainRecord<'static>, Entries<'static, Extent>), RecordError> {
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
            Translation::Nested { guest, vmid, .. } => {
                record.kind = RecordKind::Nested;
                // The parent's VMID, as the nested domain recorded it at creation.
                record.vmid = *vmid;
                record.parent_token = Some(parent_token.ok_or(RecordError::ParentNotPreserved(id))?);
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
        // Only substreams of the domain's own streams: their CD table is the domain's.
        for (sid, ssid) in self.domains.attachments(state) {
            let owner = book.stream(sid).map(|i| &book.streams[i]);
            if ssid != 0 && owner.is_some_and(|r| r.domain != id) {
                return Err(RecordError::SubstreamOfAnotherDomain { domain: id, sid, ssid });
            }
        }
        Ok((record, own_extents))
    }
}

/// A preserved domain's streams as its record lists them, read from its attachments as they are iterated (the
/// caller holds the domain locked and the bookkeeping): each with its stream's CD table.
struct AttachedStreamsOf<'a, const D: usize> {
    domains: &'a Domains<D>,
    state: &'a DomainState,
    book: &'a Book<D>,
}

impl<const D: usize> EntrySource<StreamRecord> for AttachedStreamsOf<'_, D> {
    fn entry_at(&self, cursor: u64) -> Option<(StreamRecord, u64)> {
        let ((sid, ssid), next) = self.domains.nodes.at(&self.state.attachments, cursor)?;
        let cd_table = self
            .book
            .stream(sid)
            .and_then(|i| self.book.streams[i].cd_table.as_ref());
        let stream = StreamRecord {
            sid,
            ssid,
            cd_table: cd_table.map_or(0, |t| t.base().0),
            cd_ssid_bits: cd_table.map_or(0, |t| t.format().ssid_bits()),
            cd_two_level: false,
        };
        Some((stream, next))
    }
}

/// The preserved domains a caller holds locked (read or write guards, `G`), in slot order.
pub(crate) struct Held<'s, G>(pub(crate) &'s Storage<Option<(DomainId, G)>>);

impl<'s, G: core::ops::Deref<Target = DomainState>> Held<'s, G> {
    pub(crate) fn iter(&self) -> impl Iterator<Item = (DomainId, &'s DomainState)> + '_ {
        self.0.iter().flatten().map(|(id, state)| (*id, &**state))
    }

    /// Domain `id`'s state, if held (a binary search: the slots are in ascending order).
    pub(crate) fn get(&self, id: DomainId) -> Option<&'s DomainState> {
        let held: &'s [Option<(DomainId, G)>] = self.0;
        let at = held.partition_point(|h| h.as_ref().is_none_or(|(x, _)| x.index() < id.index()));
        match held.get(at) {
            Some(Some((x, state))) if *x == id => Some(&**state),
            // (Only were a slot to have gone between the look and the lock, leaving a gap: then a plain search.)
            _ => self.iter().find(|(x, _)| *x == id).map(|(_, state)| state),
        }
    }
}

/// The extent of everything `records` own, for tests and tools: each record's extents.
pub fn owned_extents<'a>(records: &InstanceRecords<'a>) -> impl Iterator<Item = Extent> + use<'a> {
    records.records.iter().flat_map(|r| r.extents.iter())
}
