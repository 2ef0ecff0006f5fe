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

use super::fault::BookGuard;
use super::table::Book;
use super::{Capacity, DomainError, Iommu, STREAM_SSID_BITS, StreamRecord, Translation, Wanted};

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
        // Under the bookkeeping, briefly: the checks, then the stream reserved by a busy record (its faults routed
        // to `domain`, no other writer of its STE) and the domain's attachment (it cannot be freed meanwhile).
        let (memory, stage1_cd) = {
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
                return Err(DomainError::TooMany(Capacity::AttachedStreams));
            }
            if book.free_nodes.len() == 0 {
                return Err(DomainError::TooMany(Capacity::Attachments));
            }
            let sid_bits = self.stream_sid_bits();
            if sid_bits < 32 && sid >> sid_bits != 0 {
                return Err(DomainError::Stream(StreamError::UnknownStream { sid, sid_bits }));
            }
            self.enter_el2(&mut book, domain)?;
            // Only holders of the bookkeeping add attachments, so there is still room; a free that took the domain
            // meanwhile makes this fail (a free takes only a domain without attachments).
            let mut state = self.domains.get_mut(domain)?;
            let cd = match &state.translation {
                Translation::Stage1 { cd, .. } => Some(*cd),
                _ => None,
            };
            let memory = state.memory;
            let _ = self.domains.add_attachment(&mut book, &mut state, (sid, 0));
            drop(state);
            // Room was checked above.
            let _ = book.streams.push(StreamRecord {
                sid,
                domain,
                cd_table: None,
                substreams: heapless::Vec::new(),
                busy: true,
            });
            (memory, cd)
        };
        // The STE (and a stage-1 stream's CD table) written without the bookkeeping: attaches of other streams,
        // and every other domain's operations, go on meanwhile.
        let (cd_table, written) = self.write_attached_ste(domain, sid, &memory, stage1_cd);
        let mut book = self.book();
        let Some(index) = book.stream(sid) else {
            unreachable!("a busy stream record stays until its owner settles it");
        };
        // Written, or an invalidation that failed: the STE may reference the domain (and its CD table) now, so
        // the stream stays recorded as attached (the domain cannot be freed under it) and `detach` cleans up.
        let referenced = matches!(written, Ok(()) | Err(DomainError::Attach(AttachError::Invalidation(_))));
        if referenced {
            book.streams[index].cd_table = cd_table;
            book.streams[index].busy = false;
        } else {
            // Nothing was written: the record and the attachment are undone, then records still queued are filed
            // as the stream is routed again (a record an interrupt filed meanwhile stays where the reservation
            // routed it).
            book.streams.swap_remove(index);
            if let Ok(mut state) = self.domains.get_mut(domain) {
                self.domains.remove_attachment(&mut book, &mut state, (sid, 0));
            }
            self.file_queued_faults(&book);
        }
        written
    }

    /// Writes the STE that attaches `sid` to `domain` (with a new CD table for a stage-1 domain), the stream
    /// reserved by its busy record. Returns the CD table the STE may reference (none when nothing was written and
    /// the table went back to `memory`).
    fn write_attached_ste(
        &self,
        domain: DomainId,
        sid: u32,
        memory: &crate::domain::DomainMemory,
        stage1_cd: Option<Cd>,
    ) -> (Option<CdTable>, Result<(), DomainError>) {
        let cd_table = match stage1_cd {
            Some(cd) => {
                let bits = STREAM_SSID_BITS.min(self.features().ssid_bits);
                let mut table = match CdTable::new(
                    CdTableFormat::Linear { ssid_bits: bits },
                    memory,
                    self.features().coherent,
                ) {
                    Ok(table) => table,
                    Err(e) => return (None, Err(DomainError::CdTable(e.widen()))),
                };
                // No STE points to the table yet: nothing to invalidate while it is written.
                if let Err(e) = table.write(0, &cd, memory, |_| Ok(())) {
                    // SAFETY: never referenced by an STE.
                    unsafe { table.free(memory) };
                    return (None, Err(DomainError::CdTable(e)));
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
                    unsafe { t.free(memory) };
                }
                return (None, Err(e));
            }
        };
        match self.core.install_ste(sid, &ste) {
            Ok(_) => (cd_table, Ok(())),
            Err(e @ AttachError::Invalidation(_)) => (cd_table, Err(DomainError::Attach(e))),
            Err(e) => {
                if let Some(t) = cd_table {
                    // SAFETY: the STE was not written, so nothing references the table.
                    unsafe { t.free(memory) };
                }
                (None, Err(DomainError::Attach(e)))
            }
        }
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
        let (cd, mut table, memory) = {
            let mut book = self.book_settled(sid);
            self.unfrozen(domain)?;
            self.streams_unfrozen()?;
            let (cd, el2) = {
                let state = self.domains.get(domain)?;
                let Translation::Stage1 { cd, .. } = state.translation else {
                    return Err(DomainError::WrongKind {
                        domain,
                        kind: state.kind(),
                        wanted: Wanted::Stage1,
                    });
                };
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
                return Err(DomainError::TooMany(Capacity::SubstreamsOfStream));
            }
            if book.free_nodes.len() == 0 {
                return Err(DomainError::TooMany(Capacity::Attachments));
            }
            let stream_domain = record.domain;
            let (stream_el2, memory) = {
                let state = self.domains.get(stream_domain)?;
                (state.is_el2(), state.memory)
            };
            if stream_el2 != el2 {
                return Err(DomainError::RegimeMismatch { sid, ssid, stream_el2 });
            }
            self.enter_el2(&mut book, domain)?;
            // Only holders of the bookkeeping add attachments, so there is still room; a free that took the domain
            // meanwhile makes this fail.
            let _ = self
                .domains
                .add_attachment(&mut book, &mut *self.domains.get_mut(domain)?, (sid, ssid));
            // The stream busy while its CD table is written outside the bookkeeping; the substream routed to
            // `domain` already. Room was checked above.
            let record = &mut book.streams[index];
            let _ = record.substreams.push((ssid, domain));
            record.busy = true;
            let Some(table) = record.cd_table.take() else {
                unreachable!("checked above");
            };
            (cd, table, memory)
        };
        let written = self
            .core
            .install_cd(&mut table, sid, ssid, &cd, &memory)
            .map(drop)
            .map_err(DomainError::CdTable);
        let mut book = self.book();
        let index = self.busy_record(&book, sid);
        let record = &mut book.streams[index];
        record.cd_table = Some(table);
        record.busy = false;
        if let Err(e) = written
            && !matches!(e, DomainError::CdTable(CdTableError::Invalidation(_)))
        {
            // Nothing was written: the substream and the attachment are undone, then records still queued are
            // filed as the substream is routed again (see `attach`).
            record.substreams.retain(|(s, _)| *s != ssid);
            if let Ok(mut state) = self.domains.get_mut(domain) {
                self.domains.remove_attachment(&mut book, &mut state, (sid, ssid));
            }
            self.file_queued_faults(&book);
            return Err(e);
        }
        // Recorded even when an invalidation failed: the CD may be valid in memory (and fetched) and name the
        // domain's table and ASID, so the domain must not be freed under it; `detach_substream` cleans up.
        written
    }

    /// The index of `sid`'s record, which the caller marked busy (so it stays until the caller settles it).
    fn busy_record(&self, book: &Book<D>, sid: u32) -> usize {
        match book.stream(sid) {
            Some(index) if book.streams[index].busy => index,
            _ => unreachable!("a busy stream record stays until its owner settles it"),
        }
    }

    /// Detaches substream `ssid` of stream `sid`: its CD is made invalid (CFGI_CD + CMD_SYNC).
    ///
    /// # Errors
    /// [`DomainError::NotAttached`]; [`DomainError::HandoverPrepared`] (nothing changes); [`DomainError::CdTable`]
    /// when the invalidation failed: the substream stays
    /// recorded (its domain cannot be freed) and the detach can be tried again.
    pub fn detach_substream(&self, sid: u32, ssid: u32) -> Result<(), DomainError> {
        let (mut table, memory, domain) = {
            let mut book = self.book_settled(sid);
            let not_attached = DomainError::NotAttached { sid, ssid: Some(ssid) };
            let index = book.stream(sid).ok_or(not_attached)?;
            let record = &book.streams[index];
            let &(_, domain) = record.substreams.iter().find(|(s, _)| *s == ssid).ok_or(not_attached)?;
            self.unfrozen(domain)?;
            let memory = self.domains.get(record.domain)?.memory;
            let record = &mut book.streams[index];
            let Some(table) = record.cd_table.take() else {
                return Err(not_attached);
            };
            record.busy = true;
            (table, memory, domain)
        };
        // The CD invalid and invalidated first: until then the substream stays recorded.
        let written = self.core.install_cd(&mut table, sid, ssid, &Cd::invalid(), &memory);
        let mut book = self.book();
        let index = self.busy_record(&book, sid);
        book.streams[index].cd_table = Some(table);
        book.streams[index].busy = false;
        written.map_err(DomainError::CdTable)?;
        self.file_queued_faults(&book);
        book.streams[index].substreams.retain(|(s, _)| *s != ssid);
        if let Ok(mut state) = self.domains.get_mut(domain) {
            self.domains.remove_attachment(&mut book, &mut state, (sid, ssid));
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
        let (domain, table) = loop {
            let mut book = self.book_settled(sid);
            let index = book.stream(sid).ok_or(DomainError::NotAttached { sid, ssid: None })?;
            let record = &book.streams[index];
            self.unfrozen(record.domain)?;
            for &(_, domain) in &record.substreams {
                self.unfrozen(domain)?;
            }
            if let Some(&(ssid, _)) = record.substreams.last() {
                // Substreams first, each detached as `detach_substream` does.
                drop(book);
                match self.detach_substream(sid, ssid) {
                    // Detached by another CPU meanwhile: look again.
                    Ok(()) | Err(DomainError::NotAttached { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
            let record = &mut book.streams[index];
            record.busy = true;
            break (record.domain, record.cd_table.take());
        };
        // The STE to abort and the stream's cached CDs invalidated first: until both completed the stream stays
        // recorded (so its domain cannot be freed), and a failed detach can simply be tried again.
        let aborted = self.core.abort_stream(sid).map_err(DomainError::Attach).and_then(|_| {
            if table.is_some() {
                let mut batch = Batch::new();
                batch.push(&Command::CfgiCdAll { sid })?;
                self.core.submit(&batch)?;
            }
            Ok(())
        });
        let mut book = self.book();
        let index = self.busy_record(&book, sid);
        if let Err(e) = aborted {
            book.streams[index].cd_table = table;
            book.streams[index].busy = false;
            return Err(e);
        }
        self.file_queued_faults(&book);
        book.streams.swap_remove(index);
        let memory = self.domains.get(domain).map(|s| s.memory).ok();
        if let Ok(mut state) = self.domains.get_mut(domain) {
            self.domains.remove_attachment(&mut book, &mut state, (sid, 0));
        }
        if let (Some(table), Some(memory)) = (table, memory) {
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

    /// When `domain` has no attachment left, drops its TLB entries (its IDs stay allocated until `free`). Called
    /// with the bookkeeping that removed the attachment: an EL2 domain's entries are dropped before it goes (they
    /// match every EL2 context, so until then no other EL2 domain may be attached: the attachment just removed no
    /// longer says so), any other domain's after (another CPU attaching meanwhile costs one extra invalidation).
    pub(super) fn after_last_detach(&self, book: BookGuard<'_, A, D>, domain: DomainId) -> Result<(), DomainError> {
        let (el2, command) = {
            let Ok(state) = self.domains.get(domain) else {
                return Ok(());
            };
            if !state.attachments.is_empty() {
                return Ok(());
            }
            // Worked out while the domain is held: once the bookkeeping goes, a free may take it (and then issues
            // its own invalidation; this one is then one too many, never one too few).
            (state.is_el2(), self.whole_invalidation_of(&state)?)
        };
        // The slot's lock is gone before the bookkeeping is (its guard may lock it again to drain: the lock order).
        // Kept for an EL2 domain only.
        let mut el2_book = el2.then_some(book);
        let Some(command) = command else {
            return Ok(());
        };
        let mut batch = Batch::new();
        batch.push(&command)?;
        let done = self.core.submit(&batch);
        if let Some(book) = el2_book.as_mut() {
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
