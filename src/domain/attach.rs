//! Attaching streams and substreams to domains and detaching them: the STE or CD written through the hitless
//! writer and invalidated, the routing kept, faults filed before a stream is forgotten, the EL2 rule kept.

use crate::ctx::{CdTable, CdTableError, CdTableFormat};
use crate::hw::cd::Cd;
use crate::hw::command::Command;
use crate::ids::DomainId;
use crate::mem::FrameAllocator;
use crate::queue::cmdq::Batch;
use crate::smmu::AttachError;
use crate::stream::StreamError;

use super::table::Book;
use super::{DomainError, Iommu, STREAM_SSID_BITS, StreamRecord, Translation};

impl<A: FrameAllocator, const D: usize> Iommu<A, D> {
    /// Attaches the whole stream `sid` to `domain`: its STE is written (hitlessly where the architecture allows)
    /// and invalidated. A stage-1 domain's stream gets a CD table of its own (from the domain's memory) with the
    /// domain's CD at substream 0 and room for [`STREAM_SSID_BITS`] bits of substreams where the SMMU has them.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`], [`DomainError::StreamInUse`] when the stream is attached anywhere,
    /// [`DomainError::Stream`] for a StreamID beyond the table, [`DomainError::TooMany`], [`DomainError::CdTable`],
    /// [`DomainError::Entry`], [`DomainError::HandoverPrepared`] (a preserved domain while a prepared hand-off
    /// records it), [`DomainError::StreamsFrozen`] (any domain while a hand-off with the SMMU left running is
    /// prepared), [`DomainError::El2DomainInUse`] for an EL2 stage-1 domain while another is in use: nothing
    /// changed then. [`DomainError::Invalidation`] when the TLBI_EL2_ALL owed by an earlier failed EL2 detach
    /// fails again (nothing written). [`DomainError::Attach`] when an STE invalidation failed: the
    /// STE is left as the error says and the stream is recorded as attached (so the domain cannot be freed under
    /// it); `detach` cleans up.
    pub fn attach(&self, domain: DomainId, sid: u32) -> Result<(), DomainError> {
        let mut book = self.book();
        self.unfrozen(domain)?;
        self.streams_unfrozen()?;
        if let Some(i) = book.stream(sid) {
            return Err(DomainError::StreamInUse {
                sid,
                domain: book.streams[i].domain,
            });
        }
        if book.streams.is_full() {
            return Err(DomainError::TooMany("attached streams"));
        }
        if self.domains.get(domain)?.attachments.is_full() {
            return Err(DomainError::TooMany("attachments of the domain"));
        }
        let sid_bits = self.stream_sid_bits();
        if sid_bits < 32 && sid >> sid_bits != 0 {
            return Err(DomainError::Stream(StreamError::UnknownStream { sid, sid_bits }));
        }
        self.enter_el2(&mut book, domain)?;
        let (memory, stage1_cd) = {
            let state = self.domains.get(domain)?;
            let cd = match &state.translation {
                Translation::Stage1 { cd, .. } => Some(*cd),
                _ => None,
            };
            (state.memory, cd)
        };
        let cd_table = match stage1_cd {
            Some(cd) => {
                let bits = STREAM_SSID_BITS.min(self.features().ssid_bits);
                let mut table = CdTable::new(
                    CdTableFormat::Linear { ssid_bits: bits },
                    &memory,
                    self.features().coherent,
                )
                .map_err(|e| DomainError::CdTable(e.widen()))?;
                // No STE points to the table yet: nothing to invalidate while it is written.
                if let Err(e) = table.write(0, &cd, &memory, |_| Ok(())) {
                    // SAFETY: never referenced by an STE.
                    unsafe { table.free(&memory) };
                    return Err(DomainError::CdTable(e));
                }
                Some(table)
            }
            None => None,
        };
        let ste = match self.domain_ste(domain, cd_table.as_ref()) {
            Ok(ste) => ste,
            Err(e) => {
                if let Some(t) = cd_table {
                    // SAFETY: never referenced by an STE.
                    unsafe { t.free(&memory) };
                }
                return Err(e);
            }
        };
        if let Err(e) = self.core.install_ste(sid, &ste) {
            if let AttachError::Invalidation(_) = e {
                // The STE may reference the domain (and its CD table) now: record the stream as attached, so that
                // the domain cannot be freed under it and `detach` can clean up.
                let _ = book.streams.push(StreamRecord {
                    sid,
                    domain,
                    cd_table,
                    substreams: heapless::Vec::new(),
                });
                if let Ok(mut state) = self.domains.get_mut(domain) {
                    let _ = state.attachments.push((sid, 0));
                }
            } else if let Some(t) = cd_table {
                // SAFETY: the STE was not written, so nothing references the table.
                unsafe { t.free(&memory) };
            }
            return Err(DomainError::Attach(e));
        }
        let record = StreamRecord {
            sid,
            domain,
            cd_table,
            substreams: heapless::Vec::new(),
        };
        // Room was checked above.
        let _ = book.streams.push(record);
        if let Ok(mut state) = self.domains.get_mut(domain) {
            let _ = state.attachments.push((sid, 0));
        }
        Ok(())
    }

    pub(super) fn stream_sid_bits(&self) -> u8 {
        match self.stream_table_format() {
            crate::stream::StreamTableFormat::Linear { sid_bits }
            | crate::stream::StreamTableFormat::TwoLevel { sid_bits, .. } => sid_bits,
        }
    }

    /// Attaches substream `ssid` of stream `sid` to the stage-1 domain `domain`: the domain's CD goes into the
    /// stream's CD table at `ssid`, then CFGI_CD + CMD_SYNC. The stream must be attached (at substream 0) to a
    /// stage-1 domain already.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`], [`DomainError::WrongKind`] for a domain that is not stage 1,
    /// [`DomainError::NotAttached`] for a stream without a stage-1 attachment, [`DomainError::BadSubstream`] for
    /// SubstreamID 0 or one beyond the stream's CD table (on an SMMU without substreams, every one),
    /// [`DomainError::StreamInUse`] for a substream attached already, [`DomainError::TooMany`],
    /// [`DomainError::HandoverPrepared`], [`DomainError::StreamsFrozen`], [`DomainError::RegimeMismatch`] for a
    /// domain of another regime than the stream's (EL2 and NS-EL1 do not mix), [`DomainError::El2DomainInUse`]:
    /// nothing changed.
    /// [`DomainError::Invalidation`] as for [`Iommu::attach`].
    /// [`DomainError::CdTable`] when the CD's invalidation failed: the writer stopped at that step (the error says
    /// what the CD holds) and the substream is recorded as attached, so that its domain cannot be freed while the
    /// SMMU may use the CD; [`Iommu::detach_substream`] cleans up.
    pub fn attach_substream(&self, domain: DomainId, sid: u32, ssid: u32) -> Result<(), DomainError> {
        let mut book = self.book();
        self.unfrozen(domain)?;
        self.streams_unfrozen()?;
        let (cd, el2) = {
            let state = self.domains.get(domain)?;
            let Translation::Stage1 { cd, .. } = state.translation else {
                return Err(DomainError::WrongKind {
                    domain,
                    kind: state.kind(),
                    wanted: "a stage-1 domain",
                });
            };
            if state.attachments.is_full() {
                return Err(DomainError::TooMany("attachments of the domain"));
            }
            (cd, state.is_el2())
        };
        let Some(index) = book.stream(sid) else {
            return Err(DomainError::NotAttached { sid, ssid: None });
        };
        let record = &book.streams[index];
        let Some(table) = record.cd_table.as_ref() else {
            return Err(DomainError::NotAttached { sid, ssid: None });
        };
        let ssid_bits = table.format().ssid_bits();
        if ssid == 0 || (ssid_bits < 32 && ssid >> ssid_bits != 0) {
            return Err(DomainError::BadSubstream { ssid, ssid_bits });
        }
        if let Some((_, d)) = record.substreams.iter().find(|(s, _)| *s == ssid) {
            return Err(DomainError::StreamInUse { sid, domain: *d });
        }
        if record.substreams.is_full() {
            return Err(DomainError::TooMany("substreams of the stream"));
        }
        let stream_el2 = self.domains.get(record.domain)?.is_el2();
        if stream_el2 != el2 {
            return Err(DomainError::RegimeMismatch { sid, ssid, stream_el2 });
        }
        self.enter_el2(&mut book, domain)?;
        let written = self.write_stream_cd(&mut book, index, ssid, &cd);
        if let Err(e) = written
            && !matches!(e, DomainError::CdTable(CdTableError::Invalidation(_)))
        {
            return Err(e);
        }
        // Recorded even when an invalidation failed: the CD may be valid in memory (and fetched) and name the
        // domain's table and ASID, so the domain must not be freed under it; `detach_substream` cleans up. Room was
        // checked above.
        let _ = book.streams[index].substreams.push((ssid, domain));
        if let Ok(mut state) = self.domains.get_mut(domain) {
            let _ = state.attachments.push((sid, ssid));
        }
        written
    }

    /// Writes `cd` at `ssid` of stream record `index`'s CD table, invalidating with CFGI_CD + CMD_SYNC.
    pub(super) fn write_stream_cd(
        &self,
        book: &mut Book<D>,
        index: usize,
        ssid: u32,
        cd: &Cd,
    ) -> Result<(), DomainError> {
        let sid = book.streams[index].sid;
        let memory = self.domains.get(book.streams[index].domain)?.memory;
        let Some(table) = book.streams[index].cd_table.as_mut() else {
            return Err(DomainError::NotAttached { sid, ssid: Some(ssid) });
        };
        self.core
            .install_cd(table, sid, ssid, cd, &memory)
            .map(drop)
            .map_err(DomainError::CdTable)
    }

    /// Detaches substream `ssid` of stream `sid`: its CD is made invalid (CFGI_CD + CMD_SYNC).
    ///
    /// # Errors
    /// [`DomainError::NotAttached`]; [`DomainError::HandoverPrepared`] (nothing changes); [`DomainError::CdTable`]
    /// when the invalidation failed: the substream stays
    /// recorded (its domain cannot be freed) and the detach can be tried again.
    pub fn detach_substream(&self, sid: u32, ssid: u32) -> Result<(), DomainError> {
        let mut book = self.book();
        self.detach_substream_locked(&mut book, sid, ssid)
    }

    fn detach_substream_locked(&self, book: &mut Book<D>, sid: u32, ssid: u32) -> Result<(), DomainError> {
        let not_attached = DomainError::NotAttached { sid, ssid: Some(ssid) };
        let index = book.stream(sid).ok_or(not_attached)?;
        let position = book.streams[index]
            .substreams
            .iter()
            .position(|(s, _)| *s == ssid)
            .ok_or(not_attached)?;
        self.unfrozen(book.streams[index].substreams[position].1)?;
        // The CD invalid and invalidated first: until then the substream stays recorded.
        self.write_stream_cd(book, index, ssid, &Cd::invalid())?;
        self.file_queued_faults(book);
        let (_, domain) = book.streams[index].substreams.swap_remove(position);
        if let Ok(mut state) = self.domains.get_mut(domain) {
            state.attachments.retain(|a| *a != (sid, ssid));
        }
        self.after_last_detach(book, domain)
    }

    /// Detaches stream `sid` from its domain: its substreams' CDs are cleared, its STE made to abort (CFGI_STE +
    /// CMD_SYNC), its CD table's cached CDs invalidated (CFGI_CD_ALL + CMD_SYNC) before the table is freed. When the
    /// domain has no attachment left, its TLB entries are dropped too. Records already in the event queue are filed
    /// (in the domain the stream was attached to) before the stream is forgotten.
    ///
    /// # Errors
    /// [`DomainError::NotAttached`], [`DomainError::HandoverPrepared`] when the stream's domain (or a substream's)
    /// is preserved and a prepared hand-off records it (nothing changes). [`DomainError::Attach`] /
    /// [`DomainError::Invalidation`] when
    /// an invalidation failed: the stream stays recorded as attached (so its domain cannot be freed while the SMMU
    /// may still use it) and the detach can be tried again.
    pub fn detach(&self, sid: u32) -> Result<(), DomainError> {
        let mut book = self.book();
        let book = &mut *book;
        let index = book.stream(sid).ok_or(DomainError::NotAttached { sid, ssid: None })?;
        self.unfrozen(book.streams[index].domain)?;
        for &(_, domain) in &book.streams[index].substreams {
            self.unfrozen(domain)?;
        }
        while let Some(&(ssid, _)) = book.streams[index].substreams.last() {
            self.detach_substream_locked(book, sid, ssid)?;
        }
        // The STE to abort and the stream's cached CDs invalidated first: until both completed the stream stays
        // recorded (so its domain cannot be freed), and a failed detach can simply be tried again.
        self.core.abort_stream(sid).map_err(DomainError::Attach)?;
        if book.streams[index].cd_table.is_some() {
            let mut batch = Batch::new();
            batch.push(&Command::CfgiCdAll { sid })?;
            self.core.submit(&batch)?;
        }
        self.file_queued_faults(book);
        let record = book.streams.swap_remove(index);
        let domain = record.domain;
        let memory = self.domains.get(domain).map(|s| s.memory).ok();
        if let Ok(mut state) = self.domains.get_mut(domain) {
            state.attachments.retain(|a| *a != (sid, 0));
        }
        if let (Some(table), Some(memory)) = (record.cd_table, memory) {
            // SAFETY: the STE no longer points to the table and that was invalidated, as were the CDs cached from
            // it; the table came from the domain's memory.
            unsafe { table.free(&memory) };
        }
        self.after_last_detach(book, domain)
    }

    /// Files the records already in the event queue while their stream's routing still says whose they are: called
    /// by a detach once the STE (or CD) no longer translates for the old domain and that was synced, before the
    /// routing record goes, so that a fault taken before the detach is not filed under nobody, or under the domain
    /// the stream is attached to next. One bounded drain holds every record the queue can (a queue's worth); an
    /// overflow it sees is kept for the next [`Iommu::drain_faults`] / [`LowLevel::drain_events`](crate::LowLevel::drain_events). The
    /// records are not handed to a `drain_faults` callback.
    pub(super) fn file_queued_faults(&self, book: &Book<D>) {
        self.core
            .drain_queued(|event| self.domains.file(book, &event, crate::smmu::Drainer::Thread));
    }

    /// When `domain` has no attachment left, drops its TLB entries (its IDs stay allocated until `free`).
    pub(super) fn after_last_detach(&self, book: &mut Book<D>, domain: DomainId) -> Result<(), DomainError> {
        let Ok(state) = self.domains.get(domain) else {
            return Ok(());
        };
        if !state.attachments.is_empty() {
            return Ok(());
        }
        let el2 = state.is_el2();
        drop(state);
        let Some(command) = self.whole_domain_invalidation(domain)? else {
            return Ok(());
        };
        let mut batch = Batch::new();
        batch.push(&command)?;
        let done = self.core.submit(&batch);
        if el2 {
            // EL2 entries match every EL2 context: until dropped, they stand in the way of the next EL2 domain.
            book.el2_stale = done.is_err();
        }
        done?;
        Ok(())
    }

    /// Before an EL2 stage-1 domain's stream or substream is attached: refuses it while another EL2 domain is in
    /// use (EL2 has no ASIDs, so the two would share TLB entries), and drops the EL2 entries a previous domain may
    /// have left when its last detach's invalidation failed (TLBI_EL2_ALL + CMD_SYNC). Nothing for other domains.
    pub(crate) fn enter_el2(&self, book: &mut Book<D>, domain: DomainId) -> Result<(), DomainError> {
        if !self.domains.get(domain)?.is_el2() {
            return Ok(());
        }
        if let Some(holder) = self.domains.el2_in_use(Some(domain)) {
            return Err(DomainError::El2DomainInUse { domain, holder });
        }
        if book.el2_stale {
            let mut batch = Batch::new();
            batch.push(&Command::TlbiEl2All)?;
            self.core.submit(&batch)?;
            book.el2_stale = false;
        }
        Ok(())
    }

    /// Refuses to make a stream (or substream) translate while a hand-off with the SMMU left running is prepared:
    /// the next image takes over the streams as `prepare_handover` checked them.
    pub(super) fn streams_unfrozen(&self) -> Result<(), DomainError> {
        match self.domains.streams_frozen() {
            Some(generation) => Err(DomainError::StreamsFrozen { generation }),
            None => Ok(()),
        }
    }
}
