//! `lu-scale` and `lu-scale-noreset`: a live update at server scale, through a warm reset and through a running
//! hand-off (a jump into the next image with the SMMU translating).
//!
//! `lu-scale`: The first image preserves [`DOMAINS`] domains, each with a stream
//! of its own spread across the StreamID space (STEs for streams that have no device: nothing DMAs through them,
//! but each is installed, recorded, restored and aborted like a device's), and edu's stream in the first of them,
//! DMA-ing before the hand-off (a warm reset) and after it, and [`EXTRA_STREAMS`] more in that domain (257 streams
//! in one domain: a physical function and its virtual functions' worth). The next image restores them all (every table walked),
//! prints how long that took, retrieves a sample (every [`SAMPLE`]th domain and edu's), checks their translations
//! and STEs, DMAs through edu's again, and finish frees the rest.

use core::fmt::Write;
use smmuv3::{Iova, PhysAddr};

use smmuv3::{DomainId, DomainKind, InitOptions, Iommu, Stage1Options, Stage2Options};

use super::core_smmu::edu_stream;
use super::domains::{IOVA_DESTINATION, IOVA_SOURCE, RW, preferred_kind};
use super::live_update::{
    after_reset, arena, core_window, declare, dma, dma_page, note_data, reset_with, running_options, smmu_base,
    surviving,
};
use super::{Context, FAILED_SO_FAR, Failure, LIST_POSITION, PASSED_SO_FAR};
use crate::frames::Frames;
use crate::handover::POOL;
use crate::{println, time};

/// Domains preserved.
const DOMAINS: usize = 1024;
/// Domains the driver has room for.
const CAPACITY: usize = DOMAINS + 16;
/// Every how many domains one is retrieved after the restore (the rest are left for finish).
const SAMPLE: usize = 37;
/// Domain `i`'s token.
const fn token(i: usize) -> u64 {
    0x5ca1_0000_0000 + i as u64
}
/// The IOVA of each domain's own page.
const IOVA_OWN: u64 = 0x4000_0000;
/// Streams the first domain holds beside edu's and its own (each with an STE, no device behind it): 257 in all.
const EXTRA_STREAMS: usize = 255;

/// The options of both images: room for every domain's stream and the first domain's extra ones.
fn with_room(options: InitOptions) -> InitOptions {
    InitOptions {
        attached_streams: DOMAINS + EXTRA_STREAMS + 1,
        ..options
    }
}

type Scaled = Iommu<Frames, CAPACITY>;

/// The SMMU with room for [`CAPACITY`] domains, every stream aborting, the memory no device may be given declared.
fn start(context: &Context) -> Result<Scaled, Failure> {
    let smmu = super::smmu(context)?;
    let mut s: Scaled = smmu
        .init_with_capacity(Frames, &with_room(InitOptions::default()))
        .or_else(|e| fail!("{e}"))?;
    declare(&mut s)?;
    Ok(s)
}

/// Domain `i`'s stream: spread evenly across the StreamIDs the stream table covers, never edu's.
fn stream_of(i: usize, sid_bits: u8, edu: u32) -> u32 {
    let span = 1u64 << sid_bits.min(24);
    let step = (span / DOMAINS as u64).max(1);
    let sid = ((i as u64 * step + (i as u64 % step.max(1)) / 2) % span) as u32;
    if sid == edu { sid ^ 1 } else { sid }
}

/// The first domain's `k`th extra stream: the last StreamID of domain `k + 1`'s step, which [`stream_of`] never
/// takes (it stays in the first half of each step), in a level-2 span that stream made already.
fn extra_stream(k: usize, sid_bits: u8) -> u32 {
    let span = 1u64 << sid_bits.min(24);
    let step = (span / DOMAINS as u64).max(1);
    ((k as u64 + 1) * step + step - 1) as u32
}

fn sid_bits<A: smmuv3::FrameAllocator>(s: &Iommu<A, CAPACITY>) -> u8 {
    match s.stream_table_format() {
        smmuv3::stream::StreamTableFormat::Linear { sid_bits }
        | smmuv3::stream::StreamTableFormat::TwoLevel { sid_bits, .. } => sid_bits,
    }
}

fn create<A: smmuv3::FrameAllocator>(s: &Iommu<A, CAPACITY>, kind: DomainKind) -> Result<DomainId, Failure> {
    let memory = arena()?;
    match kind {
        DomainKind::Stage1 => s.create_stage1(
            memory,
            Stage1Options {
                input_bits: 39,
                el2: false,
            },
        ),
        _ => s.create_stage2(
            memory,
            Stage2Options {
                input_bits: 40.min(s.features().oas_bits),
            },
        ),
    }
    .or_else(|e| fail!("create a {kind} domain: {e}"))
}

/// The first image's domains: [`DOMAINS`] of `kind`, each with one page at [`IOVA_OWN`] onto `pages[0]` and a stream
/// of its own; edu's stream in the first too, with the source and destination pages (`pages[1]`, `pages[2]`) mapped
/// and a DMA through them checked (`seed`); each preserved under its token.
fn build<A: smmuv3::FrameAllocator>(
    s: &Iommu<A, CAPACITY>,
    kind: DomainKind,
    bits: u8,
    edu: &crate::edu::Edu,
    edu_sid: u32,
    pages: [u64; 3],
    seed: u8,
) -> Result<(), Failure> {
    let [own, source, destination] = pages;
    for i in 0..DOMAINS {
        let d = create(s, kind)?;
        s.map(d, Iova(IOVA_OWN), PhysAddr(own), 4096, RW)
            .or_else(|e| fail!("domain {i}: {e}"))?;
        s.attach(d, stream_of(i, bits, edu_sid))
            .or_else(|e| fail!("domain {i}: {e}"))?;
        if i == 0 {
            s.map(d, Iova(IOVA_SOURCE), PhysAddr(source), 4096, RW)
                .or_else(|e| fail!("{e}"))?;
            s.map(d, Iova(IOVA_DESTINATION), PhysAddr(destination), 4096, RW)
                .or_else(|e| fail!("{e}"))?;
            s.attach(d, edu_sid).or_else(|e| fail!("{e}"))?;
            if (1u64 << bits.min(24)) / (DOMAINS as u64) < 4 {
                fail!("{bits} StreamID bits leave no room for the extra streams")
            }
            for k in 0..EXTRA_STREAMS {
                let sid = extra_stream(k, bits);
                if sid == edu_sid {
                    fail!("extra stream {k} is edu's ({sid:#x})")
                }
                s.attach(d, sid).or_else(|e| fail!("extra stream {sid:#x}: {e}"))?;
            }
            dma(edu, source, IOVA_DESTINATION, destination, seed)?;
        }
        s.preserve(d, token(i)).or_else(|e| fail!("domain {i}: {e}"))?;
    }
    Ok(())
}

/// After the restore: every domain and stream came back, and every [`SAMPLE`]th domain, retrieved, maps its page
/// as before, its stream's STE translating. Returns how many were retrieved.
fn check_sample<A: smmuv3::FrameAllocator>(
    s: &Iommu<A, CAPACITY>,
    report: &smmuv3::handover::restore::RestoreReport,
    own: u64,
    bits: u8,
    edu_sid: u32,
) -> Result<usize, Failure> {
    if report.domains as usize != DOMAINS || report.streams as usize != DOMAINS + 1 + EXTRA_STREAMS {
        fail!("{} domains and {} streams restored", report.domains, report.streams)
    }
    let mut retrieved = 0;
    for i in (0..DOMAINS).filter(|i| i % SAMPLE == 0) {
        let d = s.retrieve(token(i)).or_else(|e| fail!("retrieve domain {i}: {e}"))?;
        if s.iova_to_phys(d, Iova(IOVA_OWN + 0x10)).ok().flatten() != Some(PhysAddr(own + 0x10)) {
            fail!("domain {i}: IOVA {IOVA_OWN:#x} no longer maps PA {own:#x}")
        }
        let extra = (i == 0).then_some(0..EXTRA_STREAMS).into_iter().flatten();
        for sid in core::iter::once(stream_of(i, bits, edu_sid)).chain(extra.map(|k| extra_stream(k, bits))) {
            let config = s.low_level().ste(sid).map(|ste| ste.config());
            if config.is_err() || config == Ok(smmuv3::hw::ste::Config::Abort) {
                fail!("domain {i}: stream {sid:#x}'s STE does not translate")
            }
        }
        if i == 0 {
            let mut first = [(0, 0); 2];
            let held = s.attachments(d, &mut first).or_else(|e| fail!("{e}"))?;
            if held != 2 + EXTRA_STREAMS || first != [(stream_of(0, bits, edu_sid), 0), (edu_sid, 0)] {
                fail!("the first domain holds {held} streams, first {first:x?}")
            }
        }
        retrieved += 1;
    }
    Ok(retrieved)
}

/// Finish: the domains nobody retrieved are freed, their streams aborting. Returns how many.
fn finish_rest<A: smmuv3::FrameAllocator>(
    s: &Iommu<A, CAPACITY>,
    base: u64,
    retrieved: usize,
    bits: u8,
    edu_sid: u32,
) -> Result<u32, Failure> {
    let finish = s.finish_handover(&POOL, base).or_else(|e| fail!("finish: {e}"))?;
    if finish.unclaimed as usize != DOMAINS - retrieved {
        fail!(
            "finish freed {} domains, {} were left",
            finish.unclaimed,
            DOMAINS - retrieved
        )
    }
    let unclaimed = stream_of(1, bits, edu_sid);
    if s.low_level().ste(unclaimed).map(|ste| ste.config()) != Ok(smmuv3::hw::ste::Config::Abort) {
        fail!("stream {unclaimed:#x} of an unclaimed domain still translates")
    }
    Ok(finish.unclaimed)
}

pub fn lu_scale(context: &mut Context) -> Result<(), Failure> {
    let (edu, edu_sid) = edu_stream(context)?;
    let s = start(context)?;
    let kind = preferred_kind(s.features());
    let bits = sid_bits(&s);
    match after_reset() {
        None => {
            let (own, source, destination) = (dma_page()?, dma_page()?, dma_page()?);
            let t0 = time::ticks();
            build(&s, kind, bits, &edu, edu_sid, [own, source, destination], 0x71)?;
            let built = time::to_us(time::ticks() - t0);
            let t0 = time::ticks();
            let bytes = s
                .prepare_handover(&POOL, smmu_base(context), 1, &surviving())
                .or_else(|e| fail!("{e}"))?;
            println!(
                "  {DOMAINS} {kind} domains preserved, each with a stream of its own across {bits} StreamID bits (edu's and {EXTRA_STREAMS} more in the first: {} streams in one domain), built in {built} us; prepared in {} us ({bytes} bytes of records)",
                EXTRA_STREAMS + 2,
                time::to_us(time::ticks() - t0)
            );
            reset_with(s, note_data(&[own, source, destination]))
        }
        Some(note) => {
            let [own, source, destination, ..] = note.data;
            let t0 = time::ticks();
            let report = s
                .restore_handover(
                    &POOL,
                    smmu_base(context),
                    &smmuv3::handover::verify::RestoreOptions::new(&surviving()),
                )
                .or_else(|e| fail!("{e}"))?;
            let took = time::to_us(time::ticks() - t0);
            println!(
                "  restored {} domain(s) and {} stream(s), every table walked, in {took} us ({} us a domain)",
                report.domains,
                report.streams,
                took / DOMAINS as u64
            );
            let retrieved = check_sample(&s, &report, own, bits, edu_sid)?;
            dma(&edu, source, IOVA_DESTINATION, destination, 0x72)?;
            let t0 = time::ticks();
            let unclaimed = finish_rest(&s, smmu_base(context), retrieved, bits, edu_sid)?;
            println!(
                "  {retrieved} domains retrieved and checked (edu's DMA lands through the first again); finish freed the other {unclaimed} in {} us",
                time::to_us(time::ticks() - t0)
            );
            Ok(())
        }
    }
}

/// StreamID bits `lu-scale-noreset` spreads its streams over: 4,096 StreamIDs, 16 level-2 spans of the 2-level
/// stream table, which a running hand-off keeps in the SMMU's window of the pool (the 65,536 of `lu-scale` would
/// take 256 spans, 4 MiB).
const RUNNING_SID_BITS: u8 = 12;

/// `lu-scale-noreset`: as `lu-scale`, through a running hand-off: the SMMU's own structures in a window of the pool
/// (the driver's bookkeeping in the frame pool), the 1,024 domains' streams across 4,096 StreamIDs, edu's DMA in
/// flight across the jump into the next image; the next image adopts the SMMU translating, restores every domain,
/// retrieves a sample, and finish frees the rest.
pub fn lu_scale_noreset(context: &mut Context) -> Result<(), Failure> {
    use crate::edu::Direction;
    use smmuv3::handover::pool::HandoverMemory;
    let (edu, edu_sid) = edu_stream(context)?;
    let base = smmu_base(context);
    let Some(note) = after_reset() else {
        let next = crate::handoff::next_image(context.config.next_image).or_else(|e| fail!("{e}"))?;
        let smmu = super::smmu(context)?;
        let core = core_window()?;
        let mut s: Iommu<&'static HandoverMemory, CAPACITY> = smmu
            .init_with_capacity(core, &with_room(running_options()))
            .or_else(|e| fail!("{e}"))?;
        declare(&mut s)?;
        let kind = preferred_kind(s.features());
        let bits = sid_bits(&s).min(RUNNING_SID_BITS);
        let (own, source, destination) = (dma_page()?, dma_page()?, dma_page()?);
        build(&s, kind, bits, &edu, edu_sid, [own, source, destination], 0x73)?;
        let t0 = time::ticks();
        let bytes = s
            .prepare_handover(&POOL, base, 1, &surviving())
            .or_else(|e| fail!("{e}"))?;
        let prepared = time::to_us(time::ticks() - t0);
        // A DMA in flight across the hand-off: edu writes its buffer (the pattern) to the destination.
        super::domains::fill(destination, |_| 0xee);
        edu.start_dma(Direction::FromDevice, IOVA_DESTINATION, 0, super::domains::LEN as u64)
            .or_else(|e| fail!("{e}"))?;
        println!(
            "  {DOMAINS} {kind} domains preserved with the SMMU running, each with a stream of its own across {bits} StreamID bits (edu's, a DMA in flight, and {EXTRA_STREAMS} more in the first: {} streams in one domain); prepared in {prepared} us ({bytes} bytes of records)",
            EXTRA_STREAMS + 2
        );
        use core::sync::atomic::Ordering::Relaxed;
        crate::power::set_live_update_note(Some(crate::power::LiveUpdateNote {
            magic: crate::power::LiveUpdateNote::MAGIC,
            index: LIST_POSITION.load(Relaxed) as u32,
            passed: PASSED_SO_FAR.load(Relaxed) as u32,
            failed: FAILED_SO_FAR.load(Relaxed) as u32,
            phase: 1,
            data: note_data(&[own, source, destination, u64::from(bits)]),
        }));
        core::mem::forget(s);
        super::dump::save_for_host();
        crate::handoff::hand_off(next)
    };
    let [own, source, destination, bits, ..] = note.data;
    let bits = bits as u8;
    let smmu = super::smmu(context)?;
    if !smmu.is_enabled() {
        fail!("the SMMU is not translating after the hand-off")
    }
    let Some((running, core)) =
        smmuv3::handover::restore::running_smmu(&POOL, &smmu, base).or_else(|e| fail!("{e}"))?
    else {
        fail!("the handover region names no running SMMU")
    };
    let mut s: Iommu<&'static HandoverMemory, CAPACITY> = smmu
        .adopt_running_with_capacity(core, &with_room(running_options()), &running)
        .or_else(|e| fail!("{e}"))?;
    declare(&mut s)?;
    edu.wait_dma().or_else(|e| fail!("{e}"))?;
    super::domains::check_landed(destination, 0x73, 0xee, "the DMA in flight across the hand-off")?;
    let t0 = time::ticks();
    let report = s
        .restore_handover(
            &POOL,
            base,
            &smmuv3::handover::verify::RestoreOptions::new(&surviving()),
        )
        .or_else(|e| fail!("{e}"))?;
    let took = time::to_us(time::ticks() - t0);
    println!(
        "  new image: SMMU adopted translating; restored {} domain(s) and {} stream(s), every table walked, in {took} us ({} us a domain)",
        report.domains,
        report.streams,
        took / DOMAINS as u64
    );
    let retrieved = check_sample(&s, &report, own, bits, edu_sid)?;
    dma(&edu, source, IOVA_DESTINATION, destination, 0x74)?;
    let unclaimed = finish_rest(&s, base, retrieved, bits, edu_sid)?;
    println!(
        "  {retrieved} domains retrieved and checked (both of edu's DMAs landed); finish freed the other {unclaimed}"
    );
    // Teardown: the retrieved domains freed, the SMMU off, its window back to the pool.
    for i in (0..DOMAINS).filter(|i| i % SAMPLE == 0) {
        let sid = stream_of(i, bits, edu_sid);
        s.detach(sid).or_else(|e| fail!("{e}"))?;
        if i == 0 {
            s.detach(edu_sid).or_else(|e| fail!("{e}"))?;
            for k in 0..EXTRA_STREAMS {
                s.detach(extra_stream(k, bits)).or_else(|e| fail!("{e}"))?;
            }
        }
    }
    match s.shutdown(false) {
        Ok(_) => {
            // SAFETY: the SMMU is off (the shutdown succeeded): nothing reads the window any more; the domains' own
            // memories went back with the driver.
            unsafe { core.release() };
            Ok(())
        }
        Err(e) => fail!("{e}"),
    }
}
