//! Scenarios of the SMMU core: init, aborting and bypassing streams, command errors, event queue overflow. Each
//! initialises the SMMU itself and shuts it down at the end (back to QEMU's reset state, global bypass), so
//! scenarios run in any order.

use core::fmt::Write;
use core::ops::{Deref, DerefMut};

use smmuv3::hw::command::Command;
use smmuv3::hw::event::Event;
use smmuv3::hw::ste::Ste;
use smmuv3::queue::cmdq::{Batch, CommandQueueError};
use smmuv3::queue::evtq::{DrainReport, Overflow};
use smmuv3::stream::StreamTableFormat;
use smmuv3::{InitOptions, InterruptSources, Iommu};

use super::{Context, Failure, dma_onto_canary, find_edu, round_trip, smmu};
use crate::edu::Edu;
use crate::frames::Frames;
use crate::{irq, println};

/// An initialised SMMU, shut down when the scenario ends, however it ends: back to the state the boot left it in,
/// translation off with every incoming transaction aborting (GBPA.ABORT = 1).
pub(super) struct Session {
    active: Option<Iommu<Frames>>,
    /// The SMMU's interrupt lines as the GIC delivers them (none when the board has no GIC or no lines).
    pub(super) lines: Lines,
}

impl Deref for Session {
    type Target = Iommu<Frames>;
    fn deref(&self) -> &Self::Target {
        self.active
            .as_ref()
            .unwrap_or_else(|| unreachable!("a session holds its SMMU until dropped"))
    }
}

impl DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.active
            .as_mut()
            .unwrap_or_else(|| unreachable!("a session holds its SMMU until dropped"))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(active) = self.active.take()
            && let Err(e) = active.shutdown(false)
        {
            println!("  SMMU shutdown failed: {e}");
        }
    }
}

/// Initialises the SMMU with `options`, its event-queue and GERROR interrupts enabled when the GIC delivers them.
pub(super) fn start(context: &Context, options: &InitOptions) -> Result<Session, Failure> {
    let smmu = smmu(context)?;
    let lines = Lines::of(context);
    let options = InitOptions {
        interrupts: lines.sources(),
        ..*options
    };
    match smmu.init(Frames, &options) {
        Ok(active) => Ok(Session {
            active: Some(active),
            lines,
        }),
        Err(e) => fail!("{e}"),
    }
}

/// One SMMU interrupt line through the GIC: its INTID and how often it had been taken when the session began.
#[derive(Clone, Copy)]
pub(super) struct Line {
    intid: u32,
    baseline: u32,
}

impl Line {
    fn new(intid: Option<u32>) -> Option<Line> {
        intid.map(|intid| Line {
            intid,
            baseline: irq::count(intid),
        })
    }

    /// Times taken since the session began.
    pub(super) fn taken(&self) -> u32 {
        irq::count(self.intid) - self.baseline
    }
}

/// The event-queue and GERROR lines of a session.
#[derive(Clone, Copy)]
pub(super) struct Lines {
    pub(super) eventq: Option<Line>,
    pub(super) gerror: Option<Line>,
    edge: bool,
}

impl Lines {
    fn of(context: &Context) -> Lines {
        let wired = context.platform.smmu.interrupts;
        let available = irq::smmu_lines_enabled();
        Lines {
            eventq: Line::new(wired.eventq.filter(|_| available)),
            gerror: Line::new(wired.gerror.filter(|_| available)),
            edge: wired.edge_triggered,
        }
    }

    fn sources(&self) -> InterruptSources {
        let mut sources = InterruptSources::empty();
        sources.set(InterruptSources::EVENTQ, self.eventq.is_some());
        sources.set(InterruptSources::GERROR, self.gerror.is_some());
        sources
    }

    /// Waits (up to 100 ms) for `line` to have been taken in this session; prints it. Without the line (no GIC,
    /// no wire, or a level-triggered one) there is nothing to wait for: the scenario polls, and says so.
    pub(super) fn expect(&self, line: Option<Line>, what: &str) -> Result<(), Failure> {
        let Some(line) = line else {
            println!("  {what} interrupt: not taken through a GIC here; polled");
            return Ok(());
        };
        match irq::wait_beyond(line.intid, line.baseline, 100_000) {
            Some(now) => {
                println!(
                    "  {what} interrupt: INTID {} ({}) taken at EL2, {} time(s) in this scenario",
                    line.intid,
                    if self.edge { "edge" } else { "level" },
                    now - line.baseline
                );
                Ok(())
            }
            None => fail!(
                "no {what} interrupt (INTID {}) within 100 ms, though IRQ_CTRL enables it",
                line.intid
            ),
        }
    }

    /// Fails when any line was taken since the session began (a clean scenario raises none).
    pub(super) fn expect_none(&self, what: &str) -> Result<(), Failure> {
        for (line, name) in [(self.eventq, "event-queue"), (self.gerror, "GERROR")] {
            if let Some(line) = line
                && line.taken() != 0
            {
                fail!("{what}: {} {name} interrupt(s)", line.taken())
            }
        }
        Ok(())
    }
}

/// Events drained by [`drain`]: how many of each interesting kind, and the first few for the console.
#[derive(Default)]
pub(super) struct Drained {
    pub(super) report: DrainReport,
    first: heapless::Vec<Event, 4>,
    /// C_BAD_STE or C_BAD_STREAMID for the expected stream.
    pub(super) bad_stream: u32,
    /// Anything else.
    pub(super) other: u32,
}

pub(super) fn drain(session: &mut Session, sid: Option<u32>) -> Result<Drained, Failure> {
    let mut d = Drained::default();
    // A drain stops at its bound with `pending` when records keep arriving: drain until it does not.
    loop {
        let report = session.low_level().drain_events(|event| {
            let bad = matches!(event.name(), "C_BAD_STE" | "C_BAD_STREAMID");
            if bad && sid.is_some() && event.stream_id() == sid {
                d.bad_stream += 1;
            } else {
                d.other += 1;
            }
            let _ = d.first.push(event);
        });
        match report {
            Ok(r) => {
                d.report.events += r.events;
                d.report.overflow = d.report.overflow.or(r.overflow);
                if !r.pending {
                    break;
                }
            }
            Err(e) => fail!("{e}"),
        }
    }
    for e in &d.first {
        println!("  event: {e}");
    }
    Ok(d)
}

pub(super) fn expect_quiet(session: &mut Session, what: &str) -> Result<(), Failure> {
    let d = drain(session, None)?;
    if d.report.events != 0 || d.report.overflow.is_some() {
        fail!(
            "{what}: {} unexpected event(s), overflow {:?}",
            d.report.events,
            d.report.overflow
        )
    }
    match session.handle_global_errors() {
        Ok(errors) if errors.is_empty() => Ok(()),
        Ok(errors) => fail!("{what}: global errors {errors}"),
        Err(e) => fail!("{what}: {e}"),
    }
}

pub(super) fn edu_stream(context: &Context) -> Result<(Edu, u32), Failure> {
    let edu = find_edu(context)?;
    let rid = edu.bdf().requester_id();
    let Some(sid) = context.platform.stream_id(rid) else {
        fail!(
            "edu {} (requester ID {rid:#x}) is not behind the SMMU (iommu-map)",
            edu.bdf()
        )
    };
    Ok((edu, sid))
}

/// `init`: initialise in the architecture's order with a 2-level stream table (when the SMMU has one and its
/// StreamIDs need it), allocate a level-2 span on first attach, submit a batch with one PROD write, and see no
/// event or error.
pub fn init(context: &mut Context) -> Result<(), Failure> {
    let mut s = start(context, &InitOptions::default())?;
    let configuration = s.configuration();
    println!("{configuration}");
    if !s.is_enabled() {
        fail!("SMMUEN not acknowledged after init")
    }
    let f = *s.features();
    let wants_two_level = f.stream_table_two_level && f.sid_bits > smmuv3::stream::SPLIT;
    if wants_two_level != matches!(s.stream_table_format(), StreamTableFormat::TwoLevel { .. }) {
        fail!(
            "stream table format {} for SIDSIZE {} (2-level supported: {})",
            s.stream_table_format(),
            f.sid_bits,
            f.stream_table_two_level
        )
    }
    let sid = context.platform.stream_id(0x10).unwrap_or(0x10);
    let first = s
        .low_level()
        .attach_abort(sid)
        .or_else(|e| fail!("attach_abort({sid:#x}): {e}"))?;
    println!(
        "  attach_abort({sid:#x}): {:?}, {} sync(s), new level-2 span: {}",
        first.kind, first.syncs, first.new_span
    );
    if wants_two_level && (!first.new_span || s.allocated_spans() != 1) {
        fail!(
            "the first STE of a 2-level table did not allocate exactly one span ({} spans)",
            s.allocated_spans()
        )
    }
    match s.low_level().ste(sid) {
        Ok(ste) if ste == Ste::abort() => {}
        Ok(ste) => fail!("STE {sid:#x} reads back {:x?}", ste.0),
        Err(e) => fail!("{e}"),
    }
    let again = s.low_level().attach_abort(sid).or_else(|e| fail!("{e}"))?;
    if again.syncs != 0 {
        fail!("rewriting an identical STE cost {} syncs", again.syncs)
    }
    // A batch: 32 CFGI_STEs of the span and a TLBI, one PROD write, one CMD_SYNC.
    let mut batch = Batch::new();
    for i in 0..32 {
        batch
            .push(&Command::CfgiSte {
                sid: (sid & !0xff) | i,
                leaf: true,
            })
            .or_else(|e| fail!("{e}"))?;
    }
    batch.push(&Command::TlbiNsnhAll).or_else(|e| fail!("{e}"))?;
    let report = s.low_level().submit(&batch).or_else(|e| fail!("batch: {e}"))?;
    println!(
        "  batch: {} commands ({} CMD_SYNC) with {} PROD write(s), {} MMIO write(s) in all",
        report.commands, report.syncs, report.prod_writes, report.mmio_writes
    );
    if report.prod_writes != 1 || report.commands != 34 {
        fail!(
            "batch of 33 + CMD_SYNC took {} PROD writes for {} commands",
            report.prod_writes,
            report.commands
        )
    }
    measure_batching(&mut s, sid)?;
    s.low_level()
        .invalidate_all()
        .or_else(|e| fail!("invalidate all: {e}"))?;
    s.lines.expect_none("after init")?;
    expect_quiet(&mut s, "after init")
}

/// Times 32 CFGI_STEs submitted one by one (each with its CMD_SYNC) against the same 32 in one batch with one
/// CMD_SYNC, on the generic timer, and prints the ratio. A measurement for the console, not an assertion.
fn measure_batching(s: &mut Session, sid: u32) -> Result<(), Failure> {
    const N: u32 = 32;
    const ROUNDS: u32 = 8;
    let command = |i: u32| Command::CfgiSte {
        sid: (sid & !0xff) | i,
        leaf: true,
    };
    let (mut single_ticks, mut batch_ticks, mut single_writes, mut batch_writes) = (0, 0, 0, 0);
    for _ in 0..ROUNDS {
        let start = crate::time::ticks();
        for i in 0..N {
            let mut one = Batch::new();
            one.push(&command(i)).or_else(|e| fail!("{e}"))?;
            single_writes += s.low_level().submit(&one).or_else(|e| fail!("{e}"))?.mmio_writes;
        }
        single_ticks += crate::time::ticks() - start;
        let start = crate::time::ticks();
        let mut batch = Batch::new();
        for i in 0..N {
            batch.push(&command(i)).or_else(|e| fail!("{e}"))?;
        }
        batch_writes += s.low_level().submit(&batch).or_else(|e| fail!("{e}"))?.mmio_writes;
        batch_ticks += crate::time::ticks() - start;
    }
    let per_command = |ticks: u64| crate::time::to_us(ticks * 1000) / u64::from(N * ROUNDS);
    println!(
        "  {N} CFGI_STE x {ROUNDS} rounds: one by one {} ns/command ({} MMIO writes per round), batched {} ns/command \
         ({} MMIO write per round): batching is {}.{}x faster",
        per_command(single_ticks),
        single_writes / ROUNDS,
        per_command(batch_ticks),
        batch_writes / ROUNDS,
        single_ticks / batch_ticks.max(1),
        (single_ticks * 10 / batch_ticks.max(1)) % 10
    );
    Ok(())
}

/// `abort-default`: a stream nobody configured cannot write memory (its DMA is aborted, a canary survives, the
/// SMMU reports the bad stream); an explicitly aborting stream is silent.
pub fn abort_default(context: &mut Context) -> Result<(), Failure> {
    let mut s = start(context, &InitOptions::default())?;
    let (edu, sid) = edu_stream(context)?;
    let (intact, pa) = dma_onto_canary(&edu, 256, 0xc5)?;
    if !intact {
        fail!("edu wrote {pa:#x} through an unconfigured stream {sid:#x}")
    }
    let lines = s.lines;
    lines.expect(lines.eventq, "event-queue")?;
    let d = drain(&mut s, Some(sid))?;
    println!(
        "  unconfigured stream {sid:#x}: DMA to {pa:#x} aborted, canary intact, {} event(s)",
        d.report.events
    );
    if d.bad_stream == 0 || d.other != 0 {
        fail!(
            "expected only C_BAD_STE/C_BAD_STREAMID for {sid:#x}: {} such, {} other",
            d.bad_stream,
            d.other
        )
    }
    s.low_level().attach_abort(sid).or_else(|e| fail!("{e}"))?;
    let (intact, _) = dma_onto_canary(&edu, 256, 0x3a)?;
    if !intact {
        fail!("edu wrote through an aborting STE")
    }
    expect_quiet(&mut s, "abort STE")?;
    println!("  aborting STE: DMA aborted silently, canary intact");
    Ok(())
}

/// `bypass`: an explicitly bypassed stream reaches RAM with physical addresses; switching it to abort and back
/// takes effect at once (QEMU caches STEs, so a missing CFGI_STE would leave the old configuration in force).
pub fn bypass(context: &mut Context) -> Result<(), Failure> {
    let mut s = start(context, &InitOptions::default())?;
    let (edu, sid) = edu_stream(context)?;
    // SAFETY: the device behind the stream is trusted with all memory (a test of bypass).
    let r = unsafe { s.low_level().attach_bypass(sid) }.or_else(|e| fail!("{e}"))?;
    let (from, to) = round_trip(&edu, 256)?;
    println!(
        "  bypass STE for {sid:#x} ({:?}, {} sync(s)): 256 bytes {from:#x} -> edu -> {to:#x}, verified",
        r.kind, r.syncs
    );
    let r = s.low_level().attach_abort(sid).or_else(|e| fail!("{e}"))?;
    let (intact, _) = dma_onto_canary(&edu, 256, 0x4b)?;
    if !intact {
        fail!(
            "the stream still bypassed after its STE was rewritten to abort ({:?}, {} syncs)",
            r.kind,
            r.syncs
        )
    }
    // SAFETY: the device behind the stream is trusted with all memory (a test of bypass).
    unsafe { s.low_level().attach_bypass(sid) }.or_else(|e| fail!("{e}"))?;
    round_trip(&edu, 256)?;
    println!(
        "  bypass -> abort ({:?}, {} syncs): DMA aborted; -> bypass: DMA verified again",
        r.kind, r.syncs
    );
    s.lines.expect_none("bypass")?;
    expect_quiet(&mut s, "bypass")
}

/// The opcode injected by `cmdq-error`: reserved in IHI 0070, so the SMMU must refuse it with CERROR_ILL.
const ILLEGAL_OPCODE: u64 = 0x7f;

/// `cmdq-error`: an illegal command in the middle of a batch is reported (CERROR_ILL), skipped, and the commands
/// after it complete; the queue keeps working.
pub fn cmdq_error(context: &mut Context) -> Result<(), Failure> {
    let mut s = start(context, &InitOptions::default())?;
    let mut batch = Batch::new();
    batch.push(&Command::CfgiAll).or_else(|e| fail!("{e}"))?;
    batch.push_words([ILLEGAL_OPCODE, 0]).or_else(|e| fail!("{e}"))?;
    batch.push(&Command::TlbiNsnhAll).or_else(|e| fail!("{e}"))?;
    batch.push(&Command::CfgiAll).or_else(|e| fail!("{e}"))?;
    // The batch completes past the refused command, and the submission reports it as an error: what the
    // command was for did not happen.
    // The vetted `submit` refuses a reserved opcode before the SMMU sees it.
    if !matches!(
        s.low_level().submit(&batch),
        Err(CommandQueueError::NotAllowed { index: 1, .. })
    ) {
        fail!("submit queued a reserved opcode")
    }
    // SAFETY: the commands are CFGI_ALL, TLBI_NSNH_ALL and a reserved opcode, which the SMMU refuses (CERROR_ILL):
    // none writes memory or changes a translation.
    let (fault, count) = match unsafe { s.low_level().submit_unvetted(&batch) } {
        Err(CommandQueueError::Refused { first, count }) => (first, count),
        Err(e) => fail!("batch with an illegal command: {e}"),
        Ok(report) => fail!(
            "a batch with an illegal command succeeded ({} commands)",
            report.commands
        ),
    };
    println!("  {fault}");
    let lines = s.lines;
    lines.expect(lines.gerror, "GERROR (CMDQ_ERR)")?;
    if !(count == 1 && fault.code == 1 && fault.words[0] & 0xff == ILLEGAL_OPCODE) {
        fail!("expected one CERROR_ILL on opcode {ILLEGAL_OPCODE:#x}, got {count} fault(s), the first {fault}")
    }
    // The queue goes on: a clean batch and an STE write (CFGI_STE + CMD_SYNC) complete without faults.
    s.low_level()
        .invalidate_all()
        .or_else(|e| fail!("after the error: {e}"))?;
    s.low_level()
        .attach_abort(0)
        .or_else(|e| fail!("STE write after the error: {e}"))?;
    println!("  CERROR_ILL reported and skipped; the later commands completed, the submission failed with it");
    expect_quiet(&mut s, "after the command error")
}

/// `evtq-overflow`: more faults than an 8-entry event queue holds; the loss is reported (however the SMMU
/// signals it) and the driver keeps working: new events arrive, and a bypassed stream still does DMA.
pub fn evtq_overflow(context: &mut Context) -> Result<(), Failure> {
    let options = InitOptions {
        eventq_log2_max: 3,
        ..InitOptions::default()
    };
    let mut s = start(context, &options)?;
    let (edu, sid) = edu_stream(context)?;
    let capacity = s.eventq_entries();
    // QEMU records one event per 4 faulting bytes: 256 bytes are 64 events for an 8-entry queue.
    let (intact, _) = dma_onto_canary(&edu, 256, 0x77)?;
    if !intact {
        fail!("edu wrote through an unconfigured stream")
    }
    let lines = s.lines;
    lines.expect(lines.eventq, "event-queue")?;
    let d = drain(&mut s, Some(sid))?;
    if d.report.overflow == Some(Overflow::EventQueueAbort) {
        // An SMMU that reports the loss as a global error (QEMU) raises GERROR; one that sets
        // EVENTQ_PROD.OVFLG, as the architecture describes, raises none.
        lines.expect(lines.gerror, "GERROR (EVENTQ_ABT_ERR)")?;
    }
    let Some(how) = d.report.overflow else {
        fail!(
            "{} events drained from a {capacity}-entry queue and no overflow reported",
            d.report.events
        )
    };
    println!(
        "  {} of the events drained from a {capacity}-entry queue; {how}",
        d.report.events
    );
    if d.report.events > capacity || d.other != 0 {
        fail!(
            "drained {} events ({} unexpected) from {capacity} entries",
            d.report.events,
            d.other
        )
    }
    // Nothing left, nothing lost any more.
    let d = drain(&mut s, Some(sid))?;
    if d.report.events != 0 || d.report.overflow.is_some() {
        fail!(
            "second drain: {} events, overflow {:?}",
            d.report.events,
            d.report.overflow
        )
    }
    // New faults are recorded again, within capacity.
    let (intact, _) = dma_onto_canary(&edu, 16, 0x78)?;
    let d = drain(&mut s, Some(sid))?;
    if !intact || d.report.events == 0 || d.report.overflow.is_some() || d.other != 0 {
        fail!(
            "after overflow: canary intact {intact}, {} events, overflow {:?}",
            d.report.events,
            d.report.overflow
        )
    }
    println!(
        "  after the overflow: {} new event(s) recorded, no loss",
        d.report.events
    );
    // SAFETY: the device behind the stream is trusted with all memory (a test of bypass).
    unsafe { s.low_level().attach_bypass(sid) }.or_else(|e| fail!("{e}"))?;
    round_trip(&edu, 64)?;
    println!("  bypassed DMA after the overflow verified");
    expect_quiet(&mut s, "after overflow")
}
