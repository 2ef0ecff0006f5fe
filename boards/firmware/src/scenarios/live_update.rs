//! The live-update scenarios, each across a real PSCI SYSTEM_RESET within one QEMU run. The first boot builds
//! domains in handover arenas (their tables), with their DMA buffers in the firmware's DMA pool (RAM that survives
//! the reset too, and the only memory either boot declares DMA-able: see `frames`), proves DMA through them,
//! preserves them under tokens, prepares the handover region and resets, leaving a note (in the reset-persistent
//! scratch RAM) that makes the scenario list resume at the same scenario. The second boot initialises the SMMU
//! (every stream aborting), restores, retrieves by token, and checks with real DMA that the same data lands at the
//! same physical addresses, then finishes the hand-off.
//!
//! - `lu-s1`, `lu-s2`: a stage-1 or stage-2 domain.
//! - `lu-nested`: a stage-2 parent and a nested domain whose guest stage 1 lives in guest memory (DMA pool).
//! - `lu-mutate`: a map and an unmap after `preserve`: the new mapping works after the restore, the removed one
//!   faults.
//! - `lu-unclaimed`: a preserved domain never retrieved: after `finish` its stream aborts and its arena is free.
//! - `lu-unpreserved`: preserved, then unpreserved before the reset: not restored, its stream aborts.
//! - `lu-collision`: a second domain under a token in use is refused and changes nothing; both domains come back
//!   under their own tokens.
//! - `lu-corrupt`: a bit of the region flipped before the reset: the restore refuses it with the reason, every
//!   stream aborts (DMA blocked), the region's bytes stay for diagnosis until `finish` re-arms it.
//! - `lu-tampered`: the region intact (its CRC holds), the preserved memory rewritten before the reset: a table
//!   descriptor aimed at a forged table in DMA memory (which maps edu's IOVA onto the region) and a CD word. The
//!   restore's verification refuses it naming the descriptor, edu's stream aborts (its canary and the region are
//!   untouched) and the event queue records the blocked writes.

use core::fmt::Write;
use smmuv3::{Iova, PhysAddr};

use smmuv3::handover::Extent;
use smmuv3::handover::pool::HandoverMemory;
use smmuv3::handover::verify::RestoreOptions;
use smmuv3::mem::FrameAllocator;
use smmuv3::{DomainId, DomainKind, GuestContext, Iommu, Stage1Options, Stage2Options};

use super::core_smmu::{Session, edu_stream, start};
use super::domains::{
    GuestMemory, GuestPages, IOVA_DESTINATION, IOVA_SOURCE, LEN, RW, byte, check_landed, expect_blocked_write, fill,
    guest_stage1, pattern,
};
use super::{Context, FAILED_SO_FAR, Failure, LIST_POSITION, PASSED_SO_FAR};
use crate::edu::{Direction, Edu};
use crate::handover::POOL;
use crate::power::{self, LiveUpdateNote};
use crate::{println, time};

pub(super) const TOKEN: u64 = 0x1d0_0000_0000_0001;
const IOVA_NEW: u64 = 0x0bad_2000;

/// The note this scenario left before the reset, if the list resumed here (consumed: a second reset starts over).
pub(super) fn after_reset() -> Option<LiveUpdateNote> {
    let note = power::live_update_note()?;
    let here = LIST_POSITION.load(core::sync::atomic::Ordering::Relaxed);
    if note.index as usize != here {
        return None;
    }
    power::set_live_update_note(None);
    Some(note)
}

/// Leaves `data` for the second boot, keeps the SMMU running (no shutdown) and resets.
pub(super) fn reset_with<T>(session: T, data: [u64; 16]) -> ! {
    use core::sync::atomic::Ordering::Relaxed;
    power::set_live_update_note(Some(LiveUpdateNote {
        magic: LiveUpdateNote::MAGIC,
        index: LIST_POSITION.load(Relaxed) as u32,
        passed: PASSED_SO_FAR.load(Relaxed) as u32,
        failed: FAILED_SO_FAR.load(Relaxed) as u32,
        phase: 1,
        data,
    }));
    println!("  handover prepared; resetting with the SMMU translating");
    core::mem::forget(session);
    super::dump::save_for_host();
    power::system_reset()
}

/// A note's data: `values`, then zeros.
pub(super) fn note_data(values: &[u64]) -> [u64; 16] {
    let mut data = [0; 16];
    data[..values.len()].copy_from_slice(values);
    data
}

pub(super) fn arena() -> Result<&'static HandoverMemory, Failure> {
    POOL.take_memory().or_else(|e| fail!("{e}"))
}

/// The frame pool, for the driver's bookkeeping of an SMMU whose own memory is a handover window.
static FRAMES: crate::frames::Frames = crate::frames::Frames;

/// Options for an SMMU whose own memory is a handover window (a hand-off with the SMMU running): the driver's
/// bookkeeping in the frame pool, so that only the SMMU's structures are recorded and carried to the next image.
pub(super) fn running_options() -> smmuv3::InitOptions {
    smmuv3::InitOptions {
        bookkeeping: smmuv3::Bookkeeping(Some(&FRAMES)),
        ..smmuv3::InitOptions::default()
    }
}

/// A window of the pool for the SMMU's own structures (a hand-off with the SMMU running records them as one
/// extent from the stream table).
pub(super) fn core_window() -> Result<&'static HandoverMemory, Failure> {
    let bytes = POOL.window_bytes().or_else(|e| fail!("{e}"))?;
    POOL.take_window(bytes).or_else(|e| fail!("{e}"))
}

/// A DMA buffer page (physical = virtual in this firmware), from the DMA pool: RAM that survives the reset and
/// that the next boot declares DMA-able (never a handover arena: no device may be given the region).
pub(super) fn dma_page() -> Result<u64, Failure> {
    match crate::frames::alloc_dma(4096, 4096) {
        Ok(a) => Ok(a as u64),
        Err(e) => fail!("{e}"),
    }
}

/// What survives the hand-off for devices, and what the next boot declares DMA-able: the DMA pool.
pub(super) fn surviving() -> [Extent; 1] {
    [crate::frames::layout().dma]
}

/// Declares the memory no device may be given: the image, the frame pool (the SMMU's own tables and queues) and
/// the handover region with the boot notes (the region separately when the tree placed it elsewhere).
pub(super) fn declare<A: FrameAllocator, const D: usize>(s: &mut Iommu<A, D>) -> Result<(), Failure> {
    let layout = crate::frames::layout();
    for extent in [layout.image, layout.frames, layout.reserved] {
        s.protect_memory(extent).or_else(|e| fail!("{e}"))?;
    }
    let (region, reserved) = (layout.handover, layout.reserved);
    let inside = region.base >= reserved.base && region.base + region.len <= reserved.base + reserved.len;
    if region.len != 0 && !inside {
        s.protect_memory(region).or_else(|e| fail!("{e}"))?;
    }
    Ok(())
}

/// The SMMU initialised (every stream aborting), the memory no device may be given declared.
pub(super) fn start_lu(context: &Context) -> Result<Session, Failure> {
    let mut s = start(context, &smmuv3::InitOptions::default())?;
    declare(&mut s)?;
    Ok(s)
}

pub(super) fn create(s: &mut Session, kind: DomainKind, arena: &'static HandoverMemory) -> Result<DomainId, Failure> {
    let ipa_bits = 40.min(s.features().oas_bits);
    match kind {
        DomainKind::Stage1 => s.create_stage1(
            arena,
            Stage1Options {
                input_bits: 39,
                el2: false,
            },
        ),
        _ => s.create_stage2(arena, Stage2Options { input_bits: ipa_bits }),
    }
    .or_else(|e| fail!("create a {kind} domain: {e}"))
}

pub(super) fn smmu_base(context: &Context) -> u64 {
    context.platform.smmu.base
}

/// Round trip through `domain`: edu reads `IOVA_SOURCE`, writes `iova`, which must land at `pa`.
pub(super) fn dma(edu: &Edu, source: u64, iova: u64, pa: u64, seed: u8) -> Result<(), Failure> {
    fill(source, pattern(seed));
    fill(pa, |_| 0xee);
    edu.dma(Direction::ToDevice, IOVA_SOURCE, 0, LEN as u64)
        .or_else(|e| fail!("RAM -> edu: {e}"))?;
    edu.dma(Direction::FromDevice, iova, 0, LEN as u64)
        .or_else(|e| fail!("edu -> RAM: {e}"))?;
    check_landed(pa, seed, 0xee, "DMA")
}

/// The second boot's start: restore, and report what came back.
pub(super) fn restore(context: &Context, s: &mut Session) -> Result<smmuv3::handover::restore::RestoreReport, Failure> {
    let t0 = time::ticks();
    let report = s
        .restore_handover(&POOL, smmu_base(context), &RestoreOptions::new(&surviving()))
        .or_else(|e| fail!("{e}"))?;
    println!(
        "  restored generation {}: {} domain(s), {} stream(s), {} page table(s) adopted without a walk, in {} us",
        report.generation,
        report.domains,
        report.streams,
        report.adopted_without_walk,
        time::to_us(time::ticks() - t0)
    );
    Ok(report)
}

fn finish(context: &Context, s: &mut Session) -> Result<u32, Failure> {
    let r = s
        .finish_handover(&POOL, smmu_base(context))
        .or_else(|e| fail!("finish: {e}"))?;
    Ok(r.unclaimed)
}

/// The first boot's domain: `kind`, in an arena of the handover region, mapping a source and a destination page
/// from the DMA pool at `IOVA_SOURCE` and `IOVA_DESTINATION`.
fn two_page_domain(s: &mut Session, kind: DomainKind) -> Result<(DomainId, u64, u64), Failure> {
    let domain = create(s, kind, arena()?)?;
    let (source, destination) = (dma_page()?, dma_page()?);
    s.map(domain, Iova(IOVA_SOURCE), PhysAddr(source), 4096, RW)
        .or_else(|e| fail!("{e}"))?;
    s.map(domain, Iova(IOVA_DESTINATION), PhysAddr(destination), 4096, RW)
        .or_else(|e| fail!("{e}"))?;
    Ok((domain, source, destination))
}

/// The second boot's start for one preserved domain: restore, retrieve it by `TOKEN`, and check that both its pages
/// map where they did and that it has the `tables` it had; returns it and its table count.
fn restore_two_page_domain(
    context: &Context,
    s: &mut Session,
    source: u64,
    destination: u64,
    tables: u64,
) -> Result<(DomainId, u32), Failure> {
    let report = restore(context, s)?;
    if report.domains != 1 {
        fail!("{} domains restored, 1 preserved", report.domains)
    }
    let domain = s.retrieve(TOKEN).or_else(|e| fail!("retrieve: {e}"))?;
    for (iova, pa) in [(IOVA_SOURCE, source), (IOVA_DESTINATION, destination)] {
        if s.iova_to_phys(domain, Iova(iova)).ok().flatten() != Some(PhysAddr(pa)) {
            fail!("IOVA {iova:#x} no longer maps PA {pa:#x}")
        }
    }
    let now = s.domain_table(domain).or_else(|e| fail!("{e}"))?.tables();
    if u64::from(now) != tables {
        fail!("{now} table(s) after the restore, {tables} before")
    }
    Ok((domain, now))
}

fn single(context: &mut Context, kind: DomainKind) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let mut s = start_lu(context)?;
    let has = if kind == DomainKind::Stage1 {
        s.features().stage1
    } else {
        s.features().stage2
    };
    if !has {
        fail!("the SMMU has no {kind}")
    }
    match after_reset() {
        None => {
            let (domain, source, destination) = two_page_domain(&mut s, kind)?;
            s.attach(domain, sid).or_else(|e| fail!("{e}"))?;
            dma(&edu, source, IOVA_DESTINATION, destination, 0x31)?;
            // The last good DMA before the hand-off: the blackout runs from here to the first good one after.
            let last_good = time::ticks();
            let tables = s.domain_table(domain).or_else(|e| fail!("{e}"))?.tables();
            s.preserve(domain, TOKEN).or_else(|e| fail!("{e}"))?;
            let bytes = s
                .prepare_handover(&POOL, smmu_base(context), 1, &surviving())
                .or_else(|e| fail!("{e}"))?;
            println!(
                "  {domain} ({kind}) preserved as {TOKEN:#x}: IOVA {IOVA_DESTINATION:#x} -> PA {destination:#x}, {tables} table(s), {bytes} bytes of records"
            );
            reset_with(s, note_data(&[source, destination, u64::from(tables), last_good]))
        }
        Some(note) => {
            let [source, destination, tables, last_good, ..] = note.data;
            let (domain, now) = restore_two_page_domain(context, &mut s, source, destination, tables)?;
            dma(&edu, source, IOVA_DESTINATION, destination, 0x32)?;
            let first_good = time::ticks();
            // QEMU's counter keeps running across SYSTEM_RESET; were it reset, the difference would say nothing.
            match first_good.checked_sub(last_good) {
                Some(blackout) => println!(
                    "  blackout (warm reset): from the last good DMA before to the first good DMA after: {} us (the reboot, the firmware's own boot, the restore, and edu's 100 ms DMA timer)",
                    time::to_us(blackout)
                ),
                None => {
                    println!("  blackout: the generic timer restarted at the reset, so it cannot be measured across it")
                }
            }
            finish_all_claimed(context, &mut s)?;
            println!(
                "  after the reset: {domain} ({kind}) retrieved by {TOKEN:#x}; the same IOVA lands at the same PA {destination:#x} ({now} table(s), as before)"
            );
            s.detach(sid).or_else(|e| fail!("{e}"))?;
            s.free_domain(domain).or_else(|e| fail!("{e}"))
        }
    }
}

/// The highest StreamID the SMMU has (at most 16 bits) that no enumerated PCI function and no `iommus` master of
/// the tree uses: a stream with no device behind it.
fn unused_stream(context: &Context, s: &Session) -> Result<u32, Failure> {
    if !context.platform.masters_complete {
        fail!("the tree's masters could not all be listed: no StreamID is known to be unused")
    }
    let top = (1u32 << s.features().sid_bits.min(16)) - 1;
    let used = |sid: u32| {
        context
            .functions
            .iter()
            .any(|f| context.platform.stream_id(f.bdf.requester_id()) == Some(sid))
            || context
                .platform
                .masters
                .iter()
                .any(|(first, last)| (*first..=*last).contains(&sid))
    };
    match (0..=top).rev().find(|sid| !used(*sid)) {
        Some(sid) => Ok(sid),
        None => fail!("every StreamID has a PCI function or a platform master behind it"),
    }
}

/// `lu-tables`: a live update with no DMA master, for a board whose devices the firmware does not drive. A domain of
/// the preferred kind maps two pages and is attached to a stream no device uses; it is preserved, the board resets
/// through PSCI SYSTEM_RESET, and the next boot restores it, retrieves it by
/// token and checks both translations, its table count and the stream's STE (translating, as the domain's kind
/// says). It shows that the handover region, the records and the preserved tables survive the board's reset, which
/// a board whose reset does not keep DRAM fails here, with the reason, before any device is involved.
pub fn lu_tables(context: &mut Context) -> Result<(), Failure> {
    let mut s = start_lu(context)?;
    let kind = super::domains::preferred_kind(s.features());
    let sid = unused_stream(context, &s)?;
    let expected_config = match kind {
        DomainKind::Stage1 => smmuv3::hw::ste::Config::Stage1,
        _ => smmuv3::hw::ste::Config::Stage2,
    };
    match after_reset() {
        None => {
            let (domain, source, destination) = two_page_domain(&mut s, kind)?;
            s.attach(domain, sid).or_else(|e| fail!("{e}"))?;
            let tables = s.domain_table(domain).or_else(|e| fail!("{e}"))?.tables();
            s.preserve(domain, TOKEN).or_else(|e| fail!("{e}"))?;
            let bytes = s
                .prepare_handover(&POOL, smmu_base(context), 1, &surviving())
                .or_else(|e| fail!("{e}"))?;
            println!(
                "  {domain} ({kind}) on stream {sid:#x} (no device) preserved as {TOKEN:#x}: IOVA {IOVA_SOURCE:#x} -> PA {source:#x}, IOVA {IOVA_DESTINATION:#x} -> PA {destination:#x}, {tables} table(s), {bytes} bytes of records"
            );
            reset_with(s, note_data(&[source, destination, u64::from(tables), u64::from(sid)]))
        }
        Some(note) => {
            let [source, destination, tables, preserved_sid, ..] = note.data;
            if preserved_sid != u64::from(sid) {
                fail!("stream {preserved_sid:#x} preserved, {sid:#x} chosen after the reset")
            }
            let (domain, now) = restore_two_page_domain(context, &mut s, source, destination, tables)?;
            let config = s.low_level().ste(sid).map(|ste| ste.config());
            if config != Ok(expected_config) {
                fail!("stream {sid:#x}'s STE after the restore: {config:?}, not {expected_config:?}")
            }
            finish_all_claimed(context, &mut s)?;
            println!(
                "  after the reset: {domain} ({kind}) retrieved by {TOKEN:#x}; both IOVAs map the same PAs, {now} table(s) as before, stream {sid:#x}'s STE {expected_config:?}"
            );
            s.detach(sid).or_else(|e| fail!("{e}"))?;
            s.free_domain(domain).or_else(|e| fail!("{e}"))
        }
    }
}

/// `lu-s1`.
pub fn lu_s1(context: &mut Context) -> Result<(), Failure> {
    single(context, DomainKind::Stage1)
}

/// `lu-s2`.
pub fn lu_s2(context: &mut Context) -> Result<(), Failure> {
    single(context, DomainKind::Stage2)
}

const GUEST_IPA: u64 = 0x8000_0000;
const GUEST_BYTES: u64 = 32 * 4096;

/// `lu-nested`: a stage-2 parent and a nested domain, the guest's stage 1 in the parent's arena.
pub fn lu_nested(context: &mut Context) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let mut s = start_lu(context)?;
    let features = *s.features();
    if !features.nesting {
        fail!("the SMMU cannot nest")
    }
    let ram_top = context.platform.memory.iter().map(|b| b.end() - 1).max().unwrap_or(0);
    let ipa_bits = if 64 - ram_top.leading_zeros() <= 40 {
        40.min(features.oas_bits)
    } else {
        features.oas_bits.min(48)
    };
    match after_reset() {
        None => {
            let a = arena()?;
            let parent = s
                .create_stage2(a, Stage2Options { input_bits: ipa_bits })
                .or_else(|e| fail!("{e}"))?;
            // Guest RAM (its tables and CD table included): a block of the DMA pool, at IPA 0x8000_0000.
            let guest_pa = match crate::frames::alloc_dma(GUEST_BYTES as usize, 4096) {
                Ok(a) => a as u64,
                Err(e) => fail!("{e}"),
            };
            s.map(parent, Iova(GUEST_IPA), PhysAddr(guest_pa), GUEST_BYTES, RW)
                .or_else(|e| fail!("{e}"))?;
            if guest_pa == GUEST_IPA {
                fail!("the guest's block landed at PA {guest_pa:#x}, its own IPA: stage 2 would be the identity")
            }
            let guest = GuestMemory {
                pa: guest_pa,
                ipa: GUEST_IPA,
                size: GUEST_BYTES,
                next: core::sync::atomic::AtomicU64::new(0),
            };
            let GuestPages {
                table,
                source: (_, source),
                destination: (destination_ipa, destination),
            } = guest_stage1(&guest, features.coherent, ipa_bits)?;
            let guest_context = GuestContext::build(&features, &&guest, &table, 9).or_else(|e| fail!("{e}"))?;
            let nested = s
                .create_nested(parent, guest_context.stage1)
                .or_else(|e| fail!("{e}"))?;
            s.attach(nested, sid).or_else(|e| fail!("{e}"))?;
            dma(&edu, source, IOVA_DESTINATION, destination, 0x41)?;
            s.preserve(parent, TOKEN).or_else(|e| fail!("{e}"))?;
            s.preserve(nested, TOKEN + 1).or_else(|e| fail!("{e}"))?;
            s.prepare_handover(&POOL, smmu_base(context), 1, &surviving())
                .or_else(|e| fail!("{e}"))?;
            println!(
                "  {nested} (nested in {parent}) preserved as {:#x} (parent {TOKEN:#x}): IOVA {IOVA_DESTINATION:#x} -> IPA {destination_ipa:#x} -> PA {destination:#x}",
                TOKEN + 1
            );
            // The guest's tables and CD table live in guest memory and must outlive this boot: the table object is
            // forgotten, not dropped (a CdTable frees nothing when dropped).
            core::mem::forget(table);
            let _ = guest_context;
            reset_with(s, note_data(&[source, destination, destination_ipa]))
        }
        Some(note) => {
            let [source, destination, destination_ipa, ..] = note.data;
            let report = restore(context, &mut s)?;
            if report.domains != 2 {
                fail!("{} domains restored, 2 preserved", report.domains)
            }
            let parent = s.retrieve(TOKEN).or_else(|e| fail!("{e}"))?;
            let nested = s.retrieve(TOKEN + 1).or_else(|e| fail!("{e}"))?;
            dma(&edu, source, IOVA_DESTINATION, destination, 0x42)?;
            finish_all_claimed(context, &mut s)?;
            println!(
                "  after the reset: {nested} (nested in {parent}) retrieved; IOVA {IOVA_DESTINATION:#x} -> IPA {destination_ipa:#x} -> PA {destination:#x} again"
            );
            s.detach(sid).or_else(|e| fail!("{e}"))?;
            s.free_domain(nested).or_else(|e| fail!("{e}"))?;
            s.free_domain(parent).or_else(|e| fail!("{e}"))
        }
    }
}

/// `lu-mutate`: changes after `preserve` are what comes back.
pub fn lu_mutate(context: &mut Context) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let mut s = start_lu(context)?;
    let kind = super::domains::preferred_kind(s.features());
    match after_reset() {
        None => {
            let a = arena()?;
            let domain = create(&mut s, kind, a)?;
            let (source, removed, added) = (dma_page()?, dma_page()?, dma_page()?);
            s.map(domain, Iova(IOVA_SOURCE), PhysAddr(source), 4096, RW)
                .or_else(|e| fail!("{e}"))?;
            s.map(domain, Iova(IOVA_DESTINATION), PhysAddr(removed), 4096, RW)
                .or_else(|e| fail!("{e}"))?;
            s.attach(domain, sid).or_else(|e| fail!("{e}"))?;
            s.preserve(domain, TOKEN).or_else(|e| fail!("{e}"))?;
            // After preserve the domain stays usable: unmap one page, map another.
            s.unmap(domain, Iova(IOVA_DESTINATION), 4096)
                .or_else(|e| fail!("{e}"))?;
            s.map(domain, Iova(IOVA_NEW), PhysAddr(added), 4096, RW)
                .or_else(|e| fail!("{e}"))?;
            dma(&edu, source, IOVA_NEW, added, 0x51)?;
            s.prepare_handover(&POOL, smmu_base(context), 1, &surviving())
                .or_else(|e| fail!("{e}"))?;
            println!(
                "  {domain} preserved, then IOVA {IOVA_DESTINATION:#x} unmapped and IOVA {IOVA_NEW:#x} -> PA {added:#x} mapped"
            );
            reset_with(s, note_data(&[source, removed, added]))
        }
        Some(note) => {
            let [source, removed, added, ..] = note.data;
            restore(context, &mut s)?;
            let domain = s.retrieve(TOKEN).or_else(|e| fail!("{e}"))?;
            dma(&edu, source, IOVA_NEW, added, 0x52)?;
            let n = expect_blocked_write(
                &mut s,
                &edu,
                domain,
                sid,
                IOVA_DESTINATION,
                removed,
                smmuv3::FaultKind::Translation,
            )?;
            finish_all_claimed(context, &mut s)?;
            println!(
                "  after the reset: IOVA {IOVA_NEW:#x} (mapped after preserve) lands at PA {added:#x}; IOVA {IOVA_DESTINATION:#x} (unmapped after preserve) faults ({n} F_TRANSLATION in {domain}'s report)"
            );
            s.detach(sid).or_else(|e| fail!("{e}"))?;
            s.free_domain(domain).or_else(|e| fail!("{e}"))
        }
    }
}

/// Fails unless edu's write to `iova` is blocked (`pa` keeps its canary): the stream aborts.
fn expect_aborted(edu: &Edu, iova: u64, pa: u64) -> Result<(), Failure> {
    fill(pa, |_| 0xc3);
    edu.dma(Direction::FromDevice, iova, 0, LEN as u64)
        .or_else(|e| fail!("{e}"))?;
    if (0..4096).any(|i| byte(pa, i) != 0xc3) {
        fail!("a write to IOVA {iova:#x} reached PA {pa:#x}: the stream does not abort")
    }
    Ok(())
}

/// The positive control of an abort check: the same stream, attached to a new domain, does translate (edu works;
/// the abort seen before was the SMMU's). Leaves the stream detached and the domain freed.
fn translates_again(s: &mut Session, edu: &Edu, sid: u32) -> Result<(), Failure> {
    let a = arena()?;
    let domain = create(s, super::domains::preferred_kind(s.features()), a)?;
    let (source, destination) = (dma_page()?, dma_page()?);
    s.map(domain, Iova(IOVA_SOURCE), PhysAddr(source), 4096, RW)
        .or_else(|e| fail!("{e}"))?;
    s.map(domain, Iova(IOVA_DESTINATION), PhysAddr(destination), 4096, RW)
        .or_else(|e| fail!("{e}"))?;
    s.attach(domain, sid).or_else(|e| fail!("{e}"))?;
    dma(edu, source, IOVA_DESTINATION, destination, 0x6e)?;
    s.detach(sid).or_else(|e| fail!("{e}"))?;
    s.free_domain(domain).or_else(|e| fail!("{e}"))
}

/// [`finish`], which must find no unclaimed domain.
pub(super) fn finish_all_claimed(context: &Context, s: &mut Session) -> Result<(), Failure> {
    match finish(context, s)? {
        0 => Ok(()),
        n => fail!("finish found {n} unclaimed domain(s)"),
    }
}

/// The first boot of `lu-unclaimed` and `lu-unpreserved`: a domain with edu's stream, preserved (and, for
/// `unpreserve`, unpreserved), prepared, reset.
fn preserve_and_reset(context: &Context, edu: &Edu, sid: u32, mut s: Session, unpreserve: bool) -> Result<(), Failure> {
    let kind = super::domains::preferred_kind(s.features());
    let a = arena()?;
    let domain = create(&mut s, kind, a)?;
    let (source, destination) = (dma_page()?, dma_page()?);
    s.map(domain, Iova(IOVA_SOURCE), PhysAddr(source), 4096, RW)
        .or_else(|e| fail!("{e}"))?;
    s.map(domain, Iova(IOVA_DESTINATION), PhysAddr(destination), 4096, RW)
        .or_else(|e| fail!("{e}"))?;
    s.attach(domain, sid).or_else(|e| fail!("{e}"))?;
    dma(edu, source, IOVA_DESTINATION, destination, 0x61)?;
    s.preserve(domain, TOKEN).or_else(|e| fail!("{e}"))?;
    if unpreserve {
        s.unpreserve(TOKEN).or_else(|e| fail!("{e}"))?;
    }
    s.prepare_handover(&POOL, smmu_base(context), 1, &surviving())
        .or_else(|e| fail!("{e}"))?;
    reset_with(s, note_data(&[source, destination, POOL.memories_in_use() as u64]))
}

/// `lu-unclaimed`.
pub fn lu_unclaimed(context: &mut Context) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let mut s = start_lu(context)?;
    let Some(note) = after_reset() else {
        return preserve_and_reset(context, &edu, sid, s, false);
    };
    let [source, destination, ..] = note.data;
    restore(context, &mut s)?;
    let in_use = POOL.memories_in_use();
    // Until finish, the preserved stream translates as before.
    dma(&edu, source, IOVA_DESTINATION, destination, 0x62)?;
    let unclaimed = finish(context, &mut s)?;
    if unclaimed != 1 || POOL.memories_in_use() != in_use - 1 {
        fail!(
            "finish freed {unclaimed} domain(s); arenas in use {} -> {}",
            in_use,
            POOL.memories_in_use()
        )
    }
    expect_aborted(&edu, IOVA_DESTINATION, destination)?;
    if s.retrieve(TOKEN).is_ok() {
        fail!("the token survived finish")
    }
    translates_again(&mut s, &edu, sid)?;
    println!(
        "  after the reset: {TOKEN:#x} never retrieved; finish freed it: stream {sid:#x} aborts, its arena is free again"
    );
    Ok(())
}

/// `lu-unpreserved`.
pub fn lu_unpreserved(context: &mut Context) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let mut s = start_lu(context)?;
    let Some(note) = after_reset() else {
        return preserve_and_reset(context, &edu, sid, s, true);
    };
    let [_, destination, ..] = note.data;
    let report = restore(context, &mut s)?;
    if report.domains != 0 {
        fail!("{} domain(s) restored though unpreserved", report.domains)
    }
    if let Ok(d) = s.retrieve(TOKEN) {
        fail!("{d} came back under an unpreserved token")
    }
    expect_aborted(&edu, IOVA_DESTINATION, destination)?;
    finish_all_claimed(context, &mut s)?;
    translates_again(&mut s, &edu, sid)?;
    println!("  after the reset: {TOKEN:#x} (unpreserved before the reset) was not restored; stream {sid:#x} aborts");
    Ok(())
}

/// `lu-collision`.
pub fn lu_collision(context: &mut Context) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let mut s = start_lu(context)?;
    let kind = super::domains::preferred_kind(s.features());
    match after_reset() {
        None => {
            let (a, b) = (arena()?, arena()?);
            let first = create(&mut s, kind, a)?;
            let second = create(&mut s, kind, b)?;
            let (source, page_a, page_b) = (dma_page()?, dma_page()?, dma_page()?);
            s.map(first, Iova(IOVA_SOURCE), PhysAddr(source), 4096, RW)
                .or_else(|e| fail!("{e}"))?;
            s.map(first, Iova(IOVA_DESTINATION), PhysAddr(page_a), 4096, RW)
                .or_else(|e| fail!("{e}"))?;
            s.map(second, Iova(IOVA_DESTINATION), PhysAddr(page_b), 4096, RW)
                .or_else(|e| fail!("{e}"))?;
            s.attach(first, sid).or_else(|e| fail!("{e}"))?;
            s.preserve(first, TOKEN).or_else(|e| fail!("{e}"))?;
            match s.preserve(second, TOKEN) {
                Err(smmuv3::DomainError::TokenInUse { domain, .. }) if domain == first => {
                    println!("  preserving {second} under {TOKEN:#x}: refused, the token is {first}'s (O(1) index)");
                }
                other => fail!("a second domain under {TOKEN:#x}: {other:?}"),
            }
            if s.token_of(second).ok().flatten().is_some() {
                fail!("the refused preserve changed the second domain")
            }
            s.preserve(second, TOKEN + 1).or_else(|e| fail!("{e}"))?;
            s.prepare_handover(&POOL, smmu_base(context), 1, &surviving())
                .or_else(|e| fail!("{e}"))?;
            reset_with(s, note_data(&[source, page_a, page_b]))
        }
        Some(note) => {
            let [source, page_a, page_b, ..] = note.data;
            restore(context, &mut s)?;
            let first = s.retrieve(TOKEN).or_else(|e| fail!("{e}"))?;
            let second = s.retrieve(TOKEN + 1).or_else(|e| fail!("{e}"))?;
            for (d, pa) in [(first, page_a), (second, page_b)] {
                if s.iova_to_phys(d, Iova(IOVA_DESTINATION)).ok().flatten() != Some(PhysAddr(pa)) {
                    fail!("{d} does not map IOVA {IOVA_DESTINATION:#x} to PA {pa:#x}")
                }
            }
            dma(&edu, source, IOVA_DESTINATION, page_a, 0x71)?;
            finish_all_claimed(context, &mut s)?;
            println!(
                "  after the reset: {TOKEN:#x} -> {first} (PA {page_a:#x}), {:#x} -> {second} (PA {page_b:#x})",
                TOKEN + 1
            );
            s.detach(sid).or_else(|e| fail!("{e}"))?;
            s.free_domain(first).or_else(|e| fail!("{e}"))?;
            s.free_domain(second).or_else(|e| fail!("{e}"))
        }
    }
}

/// `lu-corrupt`.
pub fn lu_corrupt(context: &mut Context) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let mut s = start_lu(context)?;
    let kind = super::domains::preferred_kind(s.features());
    match after_reset() {
        None => {
            let a = arena()?;
            let domain = create(&mut s, kind, a)?;
            let (source, destination) = (dma_page()?, dma_page()?);
            s.map(domain, Iova(IOVA_SOURCE), PhysAddr(source), 4096, RW)
                .or_else(|e| fail!("{e}"))?;
            s.map(domain, Iova(IOVA_DESTINATION), PhysAddr(destination), 4096, RW)
                .or_else(|e| fail!("{e}"))?;
            s.attach(domain, sid).or_else(|e| fail!("{e}"))?;
            s.preserve(domain, TOKEN).or_else(|e| fail!("{e}"))?;
            s.prepare_handover(&POOL, smmu_base(context), 1, &surviving())
                .or_else(|e| fail!("{e}"))?;
            // One bit of the first record flipped, as a stray write would.
            let Ok(region) = POOL.region() else {
                fail!("no handover region")
            };
            let byte_address = region.base + 200;
            // SAFETY: inside the reserved region, which only the handover code uses; identity-mapped RAM.
            unsafe {
                let p = byte_address as *mut u8;
                p.write_volatile(p.read_volatile() ^ 0x10);
                core::arch::asm!("dc civac, {}", "dsb sy", in(reg) p, options(nostack, preserves_flags));
            }
            println!("  bit 4 of region byte 200 flipped after prepare");
            reset_with(s, note_data(&[source, destination]))
        }
        Some(note) => {
            let [_, destination, ..] = note.data;
            let error = match s.restore_handover(&POOL, smmu_base(context), &RestoreOptions::new(&surviving())) {
                Err(e) => e,
                Ok(r) => fail!("a corrupt region restored {} domain(s)", r.domains),
            };
            println!("  after the reset: {error}");
            expect_aborted(&edu, IOVA_DESTINATION, destination)?;
            if s.retrieve(TOKEN).is_ok() {
                fail!("a domain came back from a corrupt region")
            }
            // After diagnosis, finish re-arms the region empty.
            finish_all_claimed(context, &mut s)?;
            translates_again(&mut s, &edu, sid)?;
            println!("  every stream aborts (DMA blocked), nothing retrievable; finish re-armed the region");
            Ok(())
        }
    }
}

/// Rewrites the word at `address` (identity-mapped RAM this scenario owns or the handover region) with `f` and
/// cleans it to the point of coherency, as a stray or hostile write before the reset would leave it.
fn rewrite(address: u64, f: impl FnOnce(u64) -> u64) {
    let p = address as *mut u64;
    // SAFETY: the caller's address: an aligned word of identity-mapped RAM that nothing else uses meanwhile (the
    // preserved domains are frozen by `prepare_handover`; the SMMU only reads it).
    unsafe {
        p.write_volatile(f(p.read_volatile()));
        core::arch::asm!("dc civac, {}", "dsb sy", in(reg) p, options(nostack, preserves_flags));
    }
}

/// `lu-tampered`.
pub fn lu_tampered(context: &mut Context) -> Result<(), Failure> {
    use smmuv3::handover::restore::RestoreError;
    use smmuv3::handover::verify::VerifyFailure;
    use smmuv3::pgtable::{Stage, desc};
    let (edu, sid) = edu_stream(context)?;
    let mut s = start_lu(context)?;
    if !s.features().stage1 {
        fail!("the SMMU has no stage 1 (the scenario rewrites a CD)")
    }
    let Ok(region) = POOL.region() else {
        fail!("no handover region")
    };
    let base = smmu_base(context);
    let Some(note) = after_reset() else {
        let a = arena()?;
        let domain = create(&mut s, DomainKind::Stage1, a)?;
        let (source, destination, forged) = (dma_page()?, dma_page()?, dma_page()?);
        s.map(domain, Iova(IOVA_SOURCE), PhysAddr(source), 4096, RW)
            .or_else(|e| fail!("{e}"))?;
        s.map(domain, Iova(IOVA_DESTINATION), PhysAddr(destination), 4096, RW)
            .or_else(|e| fail!("{e}"))?;
        s.attach(domain, sid).or_else(|e| fail!("{e}"))?;
        dma(&edu, source, IOVA_DESTINATION, destination, 0x91)?;
        s.preserve(domain, TOKEN).or_else(|e| fail!("{e}"))?;
        s.prepare_handover(&POOL, base, 1, &surviving())
            .or_else(|e| fail!("{e}"))?;
        // The table descriptor naming the last-level table of IOVA_DESTINATION (the walk's level 2).
        let table = s.domain_table(domain).or_else(|e| fail!("{e}"))?;
        let g = *table.geometry();
        let (mut at, mut level) = (table.root().0, g.start_level);
        let entry = loop {
            let entry = at + 8 * ((IOVA_DESTINATION >> g.entry_shift(level)) & ((1 << g.level_bits) - 1));
            if level == 2 {
                break entry;
            }
            // SAFETY: a descriptor of the domain's live table, identity-mapped; read only.
            at = desc::address(unsafe { (entry as *const u64).read_volatile() });
            level += 1;
        };
        drop(table);
        // One domain with one stream: a few hundred bytes of records.
        let mut buffer = [0u8; 4096];
        let records = s.handover_records(base, &mut buffer).or_else(|e| fail!("{e}"))?;
        let Some(cd) = records
            .records
            .first()
            .and_then(|r| r.streams.first())
            .map(|s| s.cd_table)
        else {
            fail!("the record names no CD table")
        };
        // A forged last-level table in DMA memory that maps edu's IOVA onto the handover region's first page (the
        // records): what a device that could write its own tables would build.
        let index = (IOVA_DESTINATION >> g.entry_shift(3)) & ((1 << g.level_bits) - 1);
        rewrite(forged + 8 * index, |_| desc::leaf(Stage::One, region.base, RW, true));
        rewrite(entry, |d| (d & !desc::OUTPUT_ADDRESS) | forged);
        // EPD1 cleared: walks through TTB1 (which the driver never uses) allowed.
        rewrite(cd, |w| w ^ smmuv3::hw::cd::Q0_EPD1);
        let valid = {
            let mut guard = POOL.lock_metadata().or_else(|e| fail!("{e}"))?;
            let (bytes, _, scratch) = guard.with_staging();
            let pool = POOL.pool().or_else(|e| fail!("{e}"))?;
            smmuv3::handover::format::decode(bytes, pool, scratch).is_ok()
        };
        if !valid {
            fail!("the region no longer validates: only the preserved memory was to change")
        }
        println!(
            "  after prepare: the descriptor at {entry:#x} now names a forged table at {forged:#x} (DMA memory) mapping IOVA {IOVA_DESTINATION:#x} onto the region at {:#x}, and EPD1 of the CD at {cd:#x} is cleared; the region still validates (its CRC holds)",
            region.base
        );
        reset_with(s, note_data(&[destination, entry, forged]))
    };
    let [destination, entry, forged, ..] = note.data;
    let error = match s.restore_handover(&POOL, base, &RestoreOptions::new(&surviving())) {
        Err(e) => e,
        Ok(r) => fail!("the tampered memory restored {} domain(s)", r.domains),
    };
    println!("  after the reset: {error}");
    match error {
        RestoreError::Verify {
            token: TOKEN,
            what: VerifyFailure::TableOutsideExtent { entry: e, table },
        } if e == entry && table == forged => {}
        other => fail!("refused, but not for the forged table descriptor at {entry:#x}: {other}"),
    }
    let mut records = [0u8; LEN];
    records.copy_from_slice(&POOL.lock_metadata().or_else(|e| fail!("{e}"))?[..LEN]);
    expect_aborted(&edu, IOVA_DESTINATION, destination)?;
    if POOL.lock_metadata().or_else(|e| fail!("{e}"))?[..LEN] != records {
        fail!("edu's write reached the handover region")
    }
    // The blocked writes are in the event queue, for edu's stream.
    s.drain_faults(|_| {}).or_else(|e| fail!("{e}"))?;
    let report = s.clear_unattached_faults();
    let Some(kind) = report.faults.iter().find(|f| f.stream == sid).map(|f| f.kind) else {
        fail!("no event recorded for stream {sid:#x} ({} in all)", report.total())
    };
    if let Some(other) = report.faults.iter().find(|f| f.stream != sid) {
        fail!("an event for another stream: {other:?}")
    }
    if s.retrieve(TOKEN).is_ok() {
        fail!("a domain came back from tampered memory")
    }
    println!(
        "  edu's write to IOVA {IOVA_DESTINATION:#x} blocked: the canary at PA {destination:#x} and the region untouched; the event queue recorded {} record(s), {kind} for stream {sid:#x}",
        report.total()
    );
    finish_all_claimed(context, &mut s)?;
    translates_again(&mut s, &edu, sid)
}

/// `lu-noreset`: a hand-off to a new image with the SMMU left translating: the separate binary in the second image
/// slot when the host loaded one (`next-image=on`), else the same binary entered again. The first image's SMMU and
/// its stream table live in a handover arena; a DMA it starts completes after the hand-off, another starts while
/// the new image takes the SMMU over; both must land, with no fault and translation never turned off.
pub fn lu_noreset(context: &mut Context) -> Result<(), Failure> {
    use smmuv3::handover::restore::running_smmu;
    let (edu, sid) = edu_stream(context)?;
    let base = smmu_base(context);
    let Some(note) = after_reset() else {
        let next = crate::handoff::next_image(context.config.next_image).or_else(|e| fail!("{e}"))?;
        let smmu = super::smmu(context)?;
        let core = core_window()?;
        let mut s: Iommu<&'static HandoverMemory> = smmu.init(core, &running_options()).or_else(|e| fail!("{e}"))?;
        declare(&mut s)?;
        let kind = super::domains::preferred_kind(s.features());
        let a = arena()?;
        let ipa_bits = 40.min(s.features().oas_bits);
        let domain = match kind {
            DomainKind::Stage1 => s.create_stage1(
                a,
                Stage1Options {
                    input_bits: 39,
                    el2: false,
                },
            ),
            _ => s.create_stage2(a, Stage2Options { input_bits: ipa_bits }),
        }
        .or_else(|e| fail!("{e}"))?;
        let (source, destination) = (dma_page()?, dma_page()?);
        s.map(domain, Iova(IOVA_SOURCE), PhysAddr(source), 4096, RW)
            .or_else(|e| fail!("{e}"))?;
        s.map(domain, Iova(IOVA_DESTINATION), PhysAddr(destination), 4096, RW)
            .or_else(|e| fail!("{e}"))?;
        s.attach(domain, sid).or_else(|e| fail!("{e}"))?;
        dma(&edu, source, IOVA_DESTINATION, destination, 0x81)?;
        s.preserve(domain, TOKEN).or_else(|e| fail!("{e}"))?;
        s.prepare_handover(&POOL, base, 1, &surviving())
            .or_else(|e| fail!("{e}"))?;
        let region = POOL.region().or_else(|e| fail!("{e}"))?;
        // A DMA in flight across the hand-off: edu writes its buffer (the pattern) to the destination.
        fill(destination, |_| 0xee);
        let last_good = time::ticks();
        edu.start_dma(Direction::FromDevice, IOVA_DESTINATION, 0, LEN as u64)
            .or_else(|e| fail!("{e}"))?;
        println!(
            "  {domain} ({kind}) preserved; stream table in a handover arena; a DMA to IOVA {IOVA_DESTINATION:#x} in flight"
        );
        use core::sync::atomic::Ordering::Relaxed;
        power::set_live_update_note(Some(LiveUpdateNote {
            magic: LiveUpdateNote::MAGIC,
            index: LIST_POSITION.load(Relaxed) as u32,
            passed: PASSED_SO_FAR.load(Relaxed) as u32,
            failed: FAILED_SO_FAR.load(Relaxed) as u32,
            phase: 1,
            data: note_data(&[
                source,
                destination,
                last_good,
                crate::handoff::this_image() as u64,
                region.base,
                region.len,
            ]),
        }));
        core::mem::forget(s);
        super::dump::save_for_host();
        crate::handoff::hand_off(next)
    };
    let [
        source,
        destination,
        last_good,
        previous_image,
        region_base,
        region_len,
        ..,
    ] = note.data;
    // The new image found the region in the tree the previous one passed it (QEMU's own tree names none), and it is
    // the region the previous image prepared.
    let region = POOL.region().or_else(|e| fail!("{e}"))?;
    match crate::handover::source() {
        Some(crate::handover::Source::Tree) if (region.base, region.len) == (region_base, region_len) => println!(
            "  handover region {:#x}..{:#x} read from the tree the previous image passed (/reserved-memory, {})",
            region.base,
            region.base + region.len,
            crate::handover::HANDOVER_COMPATIBLE
        ),
        Some(crate::handover::Source::Tree) => fail!(
            "the tree names the handover region {:#x}+{:#x}, the previous image prepared {region_base:#x}+{region_len:#x}",
            region.base,
            region.len
        ),
        other => {
            fail!("the new image took the handover region from {other:?}, not from the tree the previous image passed")
        }
    }
    let here = crate::handoff::this_image() as u64;
    if here != previous_image {
        println!("  running in a separate image at {here:#x}, handed off from the image at {previous_image:#x}");
    } else if context.config.next_image {
        fail!("the hand-off to the second image slot came back to the image at {here:#x}")
    } else {
        println!("  running in the same image at {here:#x}, entered again");
    }
    let smmu = super::smmu(context)?;
    if !smmu.is_enabled() {
        fail!("the SMMU is not translating after the hand-off")
    }
    let Some((running, core)) = running_smmu(&POOL, &smmu, base).or_else(|e| fail!("{e}"))? else {
        fail!("the handover region names no running SMMU")
    };
    let t0 = time::ticks();
    let mut s = smmu
        .adopt_running(core, &running_options(), &running)
        .or_else(|e| fail!("{e}"))?;
    declare(&mut s)?;
    let adopt_ticks = time::ticks() - t0;
    // The DMA started before the hand-off lands.
    edu.wait_dma().or_else(|e| fail!("{e}"))?;
    check_landed(destination, 0x81, 0xee, "the DMA in flight across the hand-off")?;
    // Another starts while the new image restores.
    fill(source, |_| 0xee);
    edu.start_dma(Direction::FromDevice, IOVA_SOURCE, 0, LEN as u64)
        .or_else(|e| fail!("{e}"))?;
    let t1 = time::ticks();
    let report = s
        .restore_handover(&POOL, base, &RestoreOptions::new(&surviving()))
        .or_else(|e| fail!("{e}"))?;
    // The streams no record names abort inside the restore.
    let aborted = report.aborted;
    let restored_ticks = time::ticks() - t1;
    edu.wait_dma().or_else(|e| fail!("{e}"))?;
    check_landed(source, 0x81, 0xee, "the DMA issued during the restore")?;
    let first_good = time::ticks();
    let domain = s.retrieve(TOKEN).or_else(|e| fail!("{e}"))?;
    s.drain_faults(|_| {}).or_else(|e| fail!("{e}"))?;
    let faults = s.domain_faults(domain).or_else(|e| fail!("{e}"))?.total() + s.clear_unattached_faults().total();
    if faults != 0 {
        fail!("{faults} fault(s) across the hand-off")
    }
    s.finish_handover(&POOL, base).or_else(|e| fail!("{e}"))?;
    println!(
        "  new image: SMMU adopted translating in {} us, {} domain(s) and {} stream(s) restored and {aborted} other stream(s) aborted in {} us; both DMAs landed, 0 faulted; from the last good DMA issued before to the next verified after: {} us (edu's two 100 ms timers included)",
        time::to_us(adopt_ticks),
        report.domains,
        report.streams,
        time::to_us(restored_ticks),
        time::to_us(first_good.saturating_sub(last_good))
    );
    s.detach(sid).or_else(|e| fail!("{e}"))?;
    s.free_domain(domain).or_else(|e| fail!("{e}"))?;
    match s.shutdown(false) {
        Ok(_) => {
            // SAFETY: the SMMU is off (the shutdown succeeded) and its tables and queues, the blocks it took from this
            // arena, went back to it.
            unsafe { core.release() };
            Ok(())
        }
        Err(e) => fail!("{e}"),
    }
}

/// IOVA `lu-big` maps, from 0, in 4 KiB pages: 3 GiB (6 MiB of level-3 tables, taken frame by frame from a region sized
/// for it: the harness gives the machine 4 GiB, the board's region a 32nd of it).
const BIG_BYTES: u64 = 3 << 30;
/// The PA window every 2 MiB of `lu-big`'s IOVA maps onto (its pages are aliased: the tables are what is big).
const BIG_WINDOW: u64 = 2 << 20;

/// `lu-big`: one stage-2 domain of several GiB in 4 KiB pages ([`BIG_BYTES`]: every 2 MiB of IOVA onto the same 2
/// MiB of DMA memory, 4 KiB off a block boundary so that only pages fit, except the last 2 MiB, onto a window of
/// its own, so that the DMA there lands right only through the last level-3 table), edu's stream through it,
/// preserved across a warm reset; the next image restores it with every table walked and edu DMAs through it
/// again.
pub fn lu_big(context: &mut Context) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let mut s = start_lu(context)?;
    if !s.features().stage2 {
        fail!("the SMMU has no stage 2")
    }
    let destination_iova = BIG_BYTES - 2 * 4096;
    let at = |window: u64, iova: u64| window + (iova % BIG_WINDOW);
    // The PA of `iova`: the last 2 MiB through `last`, the rest through `window`.
    let pa = |window: u64, last: u64, iova: u64| at(if iova >= BIG_BYTES - BIG_WINDOW { last } else { window }, iova);
    match after_reset() {
        None => {
            let a = arena()?;
            let domain = create(&mut s, DomainKind::Stage2, a)?;
            // Two windows, each 4 MiB aligned to 2 MiB and used from 4 KiB in: no 2 MiB block fits the output.
            let mut windows = [0u64; 2];
            for w in &mut windows {
                *w = match crate::frames::alloc_dma(2 * BIG_WINDOW as usize, BIG_WINDOW as usize) {
                    Ok(b) => b as u64 + 4096,
                    Err(e) => fail!("{e}"),
                };
            }
            let [window, last] = windows;
            let t0 = time::ticks();
            for chunk in 0..BIG_BYTES / BIG_WINDOW {
                let iova = chunk * BIG_WINDOW;
                s.map(domain, Iova(iova), PhysAddr(pa(window, last, iova)), BIG_WINDOW, RW)
                    .or_else(|e| fail!("map of IOVA {iova:#x}: {e}"))?;
            }
            let mapped = time::to_us(time::ticks() - t0);
            s.attach(domain, sid).or_else(|e| fail!("{e}"))?;
            let destination = pa(window, last, destination_iova);
            dma(&edu, pa(window, last, IOVA_SOURCE), destination_iova, destination, 0x51)?;
            let tables = s.domain_table(domain).or_else(|e| fail!("{e}"))?.tables();
            s.preserve(domain, TOKEN).or_else(|e| fail!("{e}"))?;
            let t0 = time::ticks();
            let bytes = s
                .prepare_handover(&POOL, smmu_base(context), 1, &surviving())
                .or_else(|e| fail!("{e}"))?;
            println!(
                "  {domain} (stage 2) maps {} MiB of IOVA in 4 KiB pages ({tables} tables, mapped in {mapped} us); preserved as {TOKEN:#x}, prepared in {} us ({bytes} bytes of records)",
                BIG_BYTES >> 20,
                time::to_us(time::ticks() - t0)
            );
            reset_with(s, note_data(&[window, last, u64::from(tables)]))
        }
        Some(note) => {
            let [window, last, tables, ..] = note.data;
            let report = restore(context, &mut s)?;
            if report.domains != 1 {
                fail!("{} domains restored, 1 preserved", report.domains)
            }
            let domain = s.retrieve(TOKEN).or_else(|e| fail!("retrieve: {e}"))?;
            for iova in [
                0,
                BIG_BYTES / 2 + 0x3000,
                BIG_BYTES - BIG_WINDOW - 4096,
                BIG_BYTES - 4096,
            ] {
                if s.iova_to_phys(domain, Iova(iova)).ok().flatten() != Some(PhysAddr(pa(window, last, iova))) {
                    fail!("IOVA {iova:#x} no longer maps PA {:#x}", pa(window, last, iova))
                }
            }
            if s.iova_to_phys(domain, Iova(BIG_BYTES)).ok().flatten().is_some() {
                fail!("IOVA {BIG_BYTES:#x} maps something after the restore")
            }
            let now = s.domain_table(domain).or_else(|e| fail!("{e}"))?.tables();
            if u64::from(now) != tables {
                fail!("{now} table(s) after the restore, {tables} before")
            }
            let destination = pa(window, last, destination_iova);
            dma(&edu, pa(window, last, IOVA_SOURCE), destination_iova, destination, 0x52)?;
            finish_all_claimed(context, &mut s)?;
            println!(
                "  after the reset: {domain} retrieved by {TOKEN:#x}, {now} tables verified and adopted; IOVA {destination_iova:#x} lands at PA {destination:#x} again"
            );
            s.detach(sid).or_else(|e| fail!("{e}"))?;
            s.free_domain(domain).or_else(|e| fail!("{e}"))
        }
    }
}
