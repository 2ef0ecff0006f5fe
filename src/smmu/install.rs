//! STE and CD installation: every entry through the hitless writer, each step followed by its invalidation
//! (CFGI_STE or CFGI_CD, then CMD_SYNC). Blind to who owns a stream: the layers above keep that bookkeeping.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::ctx::{CdTable, CdTableError, CdWriteReport};
use crate::hitless::{self, EntryState, EntryWriter, UpdateFailed, UpdateKind};
use crate::hw::cd::Cd;
use crate::hw::command::Command;
use crate::hw::ste::Ste;
use crate::ids::DomainId;
use crate::mem::FrameAllocator;
use crate::queue::cmdq::CommandQueueError;
use crate::stream::StreamError;
use crate::table::SlotWriter;

use super::SmmuCore;

/// Why an entry could not be installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttachError {
    /// The stream cannot be reached.
    Stream(StreamError),
    /// The STE's invalidation command could not be encoded; nothing was written.
    Queue(CommandQueueError),
    /// An invalidation (CFGI_STE + CMD_SYNC) between two steps of the hitless writer failed. The writer stopped
    /// there: the STE in memory holds [`UpdateFailed::left`], a configuration the SMMU may read safely, but the
    /// SMMU may still be using the one the last completed sync announced.
    Invalidation(UpdateFailed<CommandQueueError>),
    /// The stream is attached to a domain, which owns its STE: detach it first. Nothing was written.
    StreamInUse {
        /// StreamID.
        sid: u32,
        /// The domain it is attached to.
        domain: DomainId,
    },
    /// A hand-off with the SMMU left running is prepared (records of `generation`): no stream may start bypassing
    /// (or translating) until it is cancelled; making one abort stays allowed. Nothing was written.
    StreamsFrozen {
        /// The prepared records' generation.
        generation: u64,
    },
}

impl fmt::Display for AttachError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttachError::Stream(e) => write!(f, "{e}"),
            AttachError::Queue(e) => write!(f, "STE invalidation: {e}"),
            AttachError::Invalidation(e) => write!(
                f,
                "STE invalidation failed after {} sync(s); the STE is left {}: {}",
                e.syncs, e.left, e.error
            ),
            AttachError::StreamInUse { sid, domain } => {
                write!(
                    f,
                    "stream {sid:#x} is attached to {domain}, which owns its STE: detach it first"
                )
            }
            AttachError::StreamsFrozen { generation } => write!(
                f,
                "a hand-off with the SMMU running is prepared (generation {generation}): no stream may start \
                 bypassing until it is cancelled"
            ),
        }
    }
}

/// What an STE installation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstallReport {
    /// The path the hitless writer took.
    pub kind: UpdateKind,
    /// CFGI_STE + CMD_SYNC rounds issued.
    pub syncs: u32,
    /// A level-2 span was allocated for the stream.
    pub new_span: bool,
}

impl<A: FrameAllocator> SmmuCore<A> {
    /// Installs `ste` for `sid` through the hitless writer: the SMMU never sees an entry that is illegal or more
    /// permissive than the old or the new one; each step is followed by CFGI_STE + CMD_SYNC.
    ///
    /// Crate-private, and blind to the domain bookkeeping: its callers (domains attaching and detaching, a
    /// restore) keep that bookkeeping themselves. An STE written from outside could name a live domain's VMID or
    /// CD table, or replace the STE of a stream a domain owns; safe code outside uses a domain,
    /// `attach_abort` or `attach_bypass`.
    ///
    /// **One writer per STE.** The stream table's lock is held only to find the entry (and, when its level-2 span
    /// is new, until the span's level-1 descriptor is invalidated): STEs of different streams are written, and
    /// their CFGI_STE + CMD_SYNC awaited, in parallel. The callers make sure that one stream's STE has one writer
    /// at a time: the domain layer writes only the STEs of streams it recorded as its own (a record marked busy
    /// while its STE is written), and every other caller holds the domain bookkeeping and skips those streams.
    ///
    /// # Errors
    /// [`AttachError::Stream`] for a StreamID beyond the table or no memory for its level-2 span (nothing
    /// changes then); [`AttachError::Invalidation`] when an invalidation fails: the writer stops at that step and
    /// says what the STE holds.
    pub(crate) fn install_ste(&self, sid: u32, ste: &Ste) -> Result<InstallReport, AttachError> {
        let mut streams = self.streams.lock();
        let coherency = streams.coherency();
        let slot = streams.slot(sid, &self.allocator).map_err(AttachError::Stream)?;
        let new_span = slot.new_span;
        // SAFETY: the entry's words are in the linear table or in a level-2 span, which stay allocated for the
        // stream table's life (`ensure_leaf` never frees one, and `StreamTable::free` takes the table by value,
        // which needs the core by value: not while `&self` is borrowed). They are only ever accessed atomically.
        let words: &[AtomicU64] = unsafe { core::slice::from_raw_parts(slot.words.as_ptr(), slot.words.len()) };
        // A new span: the lock is kept until its level-1 descriptor is invalidated, so that no other stream of the
        // span is written (and synced with a leaf CFGI_STE) before the SMMU can reach the span.
        let _span_lock = if new_span {
            Some(streams)
        } else {
            drop(streams);
            None
        };
        let live: [u64; 8] = core::array::from_fn(|i| words[i].load(Ordering::Relaxed));
        let invalidate = Command::CfgiSte { sid, leaf: !new_span }
            .encode()
            .map_err(|e| AttachError::Queue(CommandQueueError::Encoding(e)))?;
        let (cmdq, regs) = (&self.cmdq, self.smmu.regs());
        let mut writer = SlotWriter {
            words,
            coherency,
            invalidate: || cmdq.submit(regs, &[invalidate], true).map(drop),
            syncs: 0,
        };
        let kind = hitless::update_entry::<Ste, _>(&live, &ste.0, &mut writer).map_err(AttachError::Invalidation)?;
        if new_span && writer.syncs == 0 {
            // A new span's level-1 descriptor is invalidated even when the STE itself did not change.
            writer.sync().map_err(|error| {
                AttachError::Invalidation(UpdateFailed {
                    error,
                    syncs: 0,
                    left: EntryState::New,
                })
            })?;
        }
        Ok(InstallReport {
            kind,
            syncs: writer.syncs,
            new_span,
        })
    }

    /// Makes every stream whose STE exists abort, except those `keep` names (after a hand-off with the SMMU
    /// running: the streams no record names). Returns how many were changed.
    ///
    /// # Errors
    /// As [`SmmuCore::abort_stream`]: the streams before the failing one abort. Whether a stream may be changed
    /// (a domain's) is the caller's to check.
    pub(crate) fn abort_streams_except(&self, keep: impl Fn(u32) -> bool) -> Result<u32, AttachError> {
        let mut changed = 0;
        let (sid_bits, span) = {
            let streams = self.streams.lock();
            (streams.format().sid_bits(), streams.span_len())
        };
        // Only the spans that exist hold STEs: the others are skipped whole.
        for first in (0..(1u64 << sid_bits)).step_by(span as usize) {
            if !self.streams.lock().exists(first as u32) {
                continue;
            }
            for sid in first..first + span {
                let sid = sid as u32;
                if keep(sid) {
                    continue;
                }
                let live = match self.streams.lock().read(sid) {
                    Ok(ste) => ste,
                    Err(_) => continue,
                };
                if live == Ste::invalid() || live == Ste::abort() {
                    continue;
                }
                self.abort_stream(sid)?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// The first stream, in StreamID order, whose STE exists and neither aborts nor is invalid (it bypasses or
    /// translates), among those `keep` does not name.
    pub(crate) fn first_live_stream_except(&self, keep: impl Fn(u32) -> bool) -> Option<u32> {
        let streams = self.streams.lock();
        let sid_bits = streams.format().sid_bits();
        let span = streams.span_len();
        (0..(1u64 << sid_bits))
            .step_by(span as usize)
            .filter(|&first| streams.exists(first as u32))
            .flat_map(|first| first..first + span)
            .map(|sid| sid as u32)
            .filter(|&sid| !keep(sid))
            .find(|&sid| {
                streams.read(sid).is_ok_and(|live| {
                    !matches!(
                        live.config(),
                        crate::hw::ste::Config::Abort | crate::hw::ste::Config::Invalid
                    )
                })
            })
    }

    /// The STE currently installed for `sid` (all zero, i.e. invalid, for an unallocated level-2 span).
    ///
    /// # Errors
    /// [`StreamError::UnknownStream`] for a StreamID beyond the table.
    pub(crate) fn ste(&self, sid: u32) -> Result<Ste, StreamError> {
        self.streams.lock().read(sid)
    }

    /// Makes `sid` abort, whether or not a domain holds it: for the crate's own paths that keep the bookkeeping
    /// (a detach, a restore undoing itself).
    pub(crate) fn abort_stream(&self, sid: u32) -> Result<InstallReport, AttachError> {
        self.install_ste(sid, &Ste::abort())
    }

    /// Lets `sid`'s transactions through untranslated, whoever holds it: for callers that checked (a bypassed
    /// device reaches all of memory).
    pub(crate) fn bypass_stream(&self, sid: u32) -> Result<InstallReport, AttachError> {
        let bypass = Ste::bypass_for(&self.features().entry_rules());
        self.install_ste(sid, &bypass)
    }

    /// Writes `cd` at `ssid` of `table` (the CD table of stream `sid`, from `memory`) through the hitless writer,
    /// each step followed by CFGI_CD + CMD_SYNC.
    ///
    /// # Errors
    /// As [`CdTable::write`], with the command queue's error for a failed invalidation.
    pub(crate) fn install_cd(
        &self,
        table: &mut CdTable,
        sid: u32,
        ssid: u32,
        cd: &Cd,
        memory: &impl FrameAllocator,
    ) -> Result<CdWriteReport, CdTableError<CommandQueueError>> {
        let (cmdq, regs) = (&self.cmdq, self.smmu.regs());
        table.write(ssid, cd, memory, |leaf| {
            let words = [Command::CfgiCd { sid, ssid, leaf }
                .encode()
                .map_err(CommandQueueError::Encoding)?];
            cmdq.submit(regs, &words, true).map(drop)
        })
    }
}
