//! Live-update scenarios of isolation: what a refused or interrupted hand-off leaves behind. No DMA may land
//! anywhere but where a domain in force translates it: not at the physical addresses an abandoned domain mapped,
//! not at PA = IOVA.
//!
//! - `lu-adopt-refused`: a hand-off with the SMMU left translating whose restore the new image refuses.
//! - `lu-dma-across-reset`: a DMA in flight across a warm reset, with bus mastering on before the SMMU's driver.

use core::fmt::Write;
use smmuv3::{Iova, PhysAddr};

use smmuv3::handover::pool::HandoverMemory;
use smmuv3::handover::restore::running_smmu;
use smmuv3::handover::verify::RestoreOptions;
use smmuv3::hw::ste::Config;
use smmuv3::{DomainKind, Iommu, Stage1Options, Stage2Options};

use super::core_smmu::{edu_stream, start};
use super::domains::{IOVA_DESTINATION, IOVA_SOURCE, LEN, RW, byte, fill, memory, pattern};
use super::live_update::{TOKEN, after_reset, arena, dma, dma_page, note_data, smmu_base, surviving};
use super::{Context, FAILED_SO_FAR, Failure, LIST_POSITION, PASSED_SO_FAR};
use crate::edu::Direction;
use crate::handover::POOL;
use crate::power::{self, LiveUpdateNote};
use crate::{handoff, println, time};

/// The canary the pages that no DMA may reach are filled with.
const CANARY: u8 = 0xc5;

/// Bytes of the page at `pa` that no longer hold [`CANARY`].
fn changed(pa: u64) -> usize {
    (0..4096).filter(|&i| byte(pa, i) != CANARY).count()
}

/// Scratch page `n`: RAM outside every allocator that keeps its contents across a reset, so its address can be
/// an IOVA whose PA = IOVA is a canary.
fn scratch_page(n: usize) -> Result<u64, Failure> {
    match power::scratch_page(n) {
        Some(page) => Ok(page),
        None => fail!("no scratch area for canary pages"),
    }
}

/// Leaves `data` for the next boot, at this scenario's place in the list (what a live-update scenario does before
/// its reset or hand-off).
fn leave_note(data: [u64; 16]) {
    use core::sync::atomic::Ordering::Relaxed;
    power::set_live_update_note(Some(LiveUpdateNote {
        magic: LiveUpdateNote::MAGIC,
        index: LIST_POSITION.load(Relaxed) as u32,
        passed: PASSED_SO_FAR.load(Relaxed) as u32,
        failed: FAILED_SO_FAR.load(Relaxed) as u32,
        phase: 1,
        data,
    }));
}

/// Input bits of a domain of `kind` whose IOVAs reach `iova` (a RAM address): the usual 39 (stage 1) or 40
/// (stage 2) when they do, else a level-0 root (QEMU walks only the first table of a concatenated stage-2 root).
fn input_bits_for(kind: DomainKind, iova: u64, oas_bits: u8) -> u8 {
    let needed = (64 - iova.leading_zeros()) as u8;
    match kind {
        DomainKind::Stage1 if needed <= 39 => 39,
        DomainKind::Stage1 => 48,
        _ if needed <= 40 => 40.min(oas_bits),
        _ => oas_bits.min(48),
    }
}

/// Rewrites the record of [`TOKEN`] in the prepared region: its ASID (stage 1) or VMID (stage 2) becomes 0, the
/// ID the driver reserves for itself, and the CRC is computed again, so that only a check deeper than the CRC (the
/// restore's: is the ID free in this image?) refuses it.
fn tamper_with_the_record(kind: DomainKind) -> Result<(), Failure> {
    use smmuv3::handover::format;
    let (Ok(region), Ok(pool)) = (POOL.metadata_extent(), POOL.pool()) else {
        fail!("no handover region")
    };
    let Ok(mut guard) = POOL.lock_metadata() else {
        fail!("no handover region")
    };
    let (bytes, staging, scratch) = guard.with_staging();
    // The records are views of the region: the tampered copy is encoded into the pool's staging buffer from them,
    // then copied over the region (as the driver rewrites it).
    let (written, what) = {
        // Only the instance holding the record is rebuilt as a list; the others stay views of the region.
        let decoded = format::decode(bytes, pool, scratch).or_else(|e| fail!("the prepared region: {e}"))?;
        let Some(at) = decoded
            .instances
            .iter()
            .position(|i| i.records.iter().any(|r| r.token == TOKEN))
        else {
            fail!("the prepared region has no record {TOKEN:#x}")
        };
        let mut list: heapless::Vec<smmuv3::handover::DomainRecord<'_>, 32> = heapless::Vec::new();
        let mut what = None;
        for mut record in decoded.instances[at].records.iter() {
            if record.token == TOKEN {
                what = Some(if kind == DomainKind::Stage1 {
                    ("ASID", core::mem::replace(&mut record.asid, 0))
                } else {
                    ("VMID", core::mem::replace(&mut record.vmid, 0))
                });
            }
            if list.push(record).is_err() {
                fail!("more than 32 records in the instance")
            }
        }
        let mut instances: heapless::Vec<smmuv3::handover::InstanceRecords<'_>, 8> =
            decoded.instances.iter().copied().collect();
        instances[at].records = smmuv3::handover::Records::from_slice(&list);
        let Some(what) = what else {
            fail!("the prepared region has no record {TOKEN:#x}")
        };
        let written =
            format::encode(&instances, decoded.generation, region, pool, staging).or_else(|e| fail!("{e}"))?;
        (written, what)
    };
    bytes[..written].copy_from_slice(&staging[..written]);
    println!(
        "  record {TOKEN:#x}: its {} {} rewritten to 0 (the driver's reserved ID) and the CRC fixed",
        what.0, what.1
    );
    Ok(())
}

/// `lu-adopt-refused`: a hand-off with the SMMU left translating (as `lu-noreset`) whose restore is refused. The
/// first image keeps its SMMU's structures in a handover arena, translates edu's stream through a domain that maps
/// IOVA X (the address of a canary page) and two other IOVAs to pages of its arena, preserves it, prepares, and
/// then rewrites the record so that only the restore's own checks refuse it ([`tamper_with_the_record`]). The new
/// image finds the SMMU as recorded (ID registers, stream table), adopts it translating, and its restore is
/// refused: before the refusal returns every stream aborts, so that edu's writes land nowhere: 0 bytes at the old
/// PAs, 0 at PA = X.
pub fn lu_adopt_refused(context: &mut Context) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let base = smmu_base(context);
    let Some(note) = after_reset() else {
        let next = handoff::next_image(context.config.next_image).or_else(|e| fail!("{e}"))?;
        let smmu = super::smmu(context)?;
        let core = super::live_update::core_window()?;
        let s: Iommu<&'static HandoverMemory> = smmu
            .init(core, &super::live_update::running_options())
            .or_else(|e| fail!("{e}"))?;
        let kind = super::domains::preferred_kind(s.features());
        let x = scratch_page(0)?;
        let input_bits = input_bits_for(kind, x, s.features().oas_bits);
        let a = arena()?;
        let domain = match kind {
            DomainKind::Stage1 => s.create_stage1(a, Stage1Options { input_bits, el2: false }),
            _ => s.create_stage2(a, Stage2Options { input_bits }),
        }
        .or_else(|e| fail!("{e}"))?;
        let (source, old_x, old_destination) = (dma_page()?, dma_page()?, dma_page()?);
        for (iova, pa) in [(IOVA_SOURCE, source), (x, old_x), (IOVA_DESTINATION, old_destination)] {
            s.map(domain, Iova(iova), PhysAddr(pa), 4096, RW)
                .or_else(|e| fail!("{e}"))?;
        }
        s.attach(domain, sid).or_else(|e| fail!("{e}"))?;
        dma(&edu, source, x, old_x, 0x91)?;
        s.preserve(domain, TOKEN).or_else(|e| fail!("{e}"))?;
        s.prepare_handover(&POOL, base, 1, &surviving())
            .or_else(|e| fail!("{e}"))?;
        println!(
            "  {domain} ({kind}) translates stream {sid:#x}: IOVA {x:#x} (a canary page's PA) -> PA {old_x:#x}, verified; preserved as {TOKEN:#x}"
        );
        tamper_with_the_record(kind)?;
        leave_note(note_data(&[
            source,
            old_x,
            old_destination,
            x,
            handoff::this_image() as u64,
        ]));
        core::mem::forget(s);
        super::dump::save_for_host();
        handoff::hand_off(next)
    };
    let [_, old_x, old_destination, x, previous_image, ..] = note.data;
    let here = handoff::this_image() as u64;
    if here != previous_image {
        println!("  running in a separate image at {here:#x}, handed off from the image at {previous_image:#x}");
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
    let s = smmu
        .adopt_running(core, &super::live_update::running_options(), &running)
        .or_else(|e| fail!("{e}"))?;
    let before = s
        .low_level()
        .ste(sid)
        .map(|ste| ste.config())
        .or_else(|e| fail!("{e}"))?;
    if !matches!(before, Config::Stage1 | Config::Stage2) {
        fail!("the adopted SMMU does not translate stream {sid:#x} as the first image left it ({before:?})")
    }
    let t0 = time::ticks();
    let error = match s.restore_handover(&POOL, base, &RestoreOptions::new(&surviving())) {
        Ok(report) => fail!("the rewritten record was restored ({} domain(s))", report.domains),
        Err(e) => e,
    };
    let refused_us = time::to_us(time::ticks() - t0);
    println!("  SMMU adopted translating stream {sid:#x} ({before:?}); {error}");
    // The firmware's own part: should the refusal have failed to abort the streams one by one, the driver turned
    // translation off with GBPA.ABORT = 1 (is_enabled reads false); whatever happened, the SMMU ends this
    // scenario disabled and aborting.
    let contained = if s.is_enabled() {
        match s.low_level().ste(sid).map(|ste| ste.config()) {
            Ok(Config::Abort) => "stream aborts (its STE rewritten, CFGI_ALL, CMD_SYNC)",
            other => fail!("after the refusal stream {sid:#x} is {other:?}, not aborting"),
        }
    } else {
        "the streams could not be aborted one by one: translation is off with GBPA.ABORT = 1"
    };
    for page in [old_x, old_destination, x] {
        fill(page, |_| CANARY);
    }
    for iova in [x, IOVA_DESTINATION] {
        edu.dma(Direction::FromDevice, iova, 0, LEN as u64)
            .or_else(|e| fail!("edu -> IOVA {iova:#x}: {e}"))?;
    }
    let landed = [
        (old_x, "the old PA of IOVA X"),
        (old_destination, "the old PA of IOVA_DESTINATION"),
        (x, "PA = IOVA X"),
    ];
    for (page, what) in landed {
        let n = changed(page);
        if n != 0 {
            fail!("{n} byte(s) of edu's DMA landed at {page:#x}, {what}")
        }
    }
    s.finish_handover(&POOL, base).or_else(|e| fail!("{e}"))?;
    println!(
        "  refused in {refused_us} us: every {contained}; 0 bytes of edu's DMA landed (canaries intact at the old PAs {old_x:#x} and {old_destination:#x} and at PA = IOVA {x:#x})"
    );
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

/// `lu-dma-across-reset`: a DMA in flight across a warm reset lands translated or aborts, never at PA = IOVA. The
/// first boot maps IOVA X (a canary page's address) to another canary page T through a domain, loads edu's buffer,
/// starts edu writing it to X and resets at once: edu completes a DMA on a 100 ms timer that a reset does not stop,
/// and clears nothing of its own. The second boot, before it touches the SMMU, turns edu's bus mastering on (as a
/// device driver that comes up before the IOMMU's would; a bridge gets it at enumeration) and waits for the DMA.
/// Only the boot's own order keeps it from landing at PA = X: the SMMU was made to abort incoming DMA before PCI
/// enumeration.
pub fn lu_dma_across_reset(context: &mut Context) -> Result<(), Failure> {
    let Some(note) = after_reset() else {
        let (edu, sid) = edu_stream(context)?;
        let s = start(context, &smmuv3::InitOptions::default())?;
        let kind = super::domains::preferred_kind(s.features());
        let (x, t) = (scratch_page(0)?, scratch_page(1)?);
        let input_bits = input_bits_for(kind, x, s.features().oas_bits);
        let domain = match kind {
            DomainKind::Stage1 => s.create_stage1(memory(), Stage1Options { input_bits, el2: false }),
            _ => s.create_stage2(memory(), Stage2Options { input_bits }),
        }
        .or_else(|e| fail!("{e}"))?;
        let source = match crate::frames::alloc(4096, 4096) {
            Ok(page) => page as u64,
            Err(e) => fail!("{e}"),
        };
        s.map(domain, Iova(IOVA_SOURCE), PhysAddr(source), 4096, RW)
            .or_else(|e| fail!("{e}"))?;
        s.map(domain, Iova(x), PhysAddr(t), 4096, RW)
            .or_else(|e| fail!("{e}"))?;
        s.attach(domain, sid).or_else(|e| fail!("{e}"))?;
        // Translation proven, and edu's buffer loaded with the pattern the DMA in flight will write.
        dma(&edu, source, x, t, 0xa7)?;
        fill(source, pattern(0xa7));
        edu.dma(Direction::ToDevice, IOVA_SOURCE, 0, LEN as u64)
            .or_else(|e| fail!("{e}"))?;
        for page in [x, t] {
            fill(page, |_| CANARY);
            handoff::clean_invalidate(page as usize, page as usize + 4096);
        }
        edu.start_dma(Direction::FromDevice, x, 0, LEN as u64)
            .or_else(|e| fail!("{e}"))?;
        println!("  {domain} ({kind}): IOVA {x:#x} -> PA {t:#x}; a DMA to IOVA {x:#x} in flight, resetting now");
        leave_note(note_data(&[x, t, time::ticks()]));
        core::mem::forget(s);
        super::dump::save_for_host();
        power::system_reset()
    };
    let [x, t, started, ..] = note.data;
    let smmu = super::smmu(context)?;
    let state = (smmu.is_enabled(), smmu.global_bypass_aborts());
    // Bus mastering on, the SMMU untouched by this scenario.
    let (edu, _) = edu_stream(context)?;
    let after_ms = time::to_us(time::ticks().saturating_sub(started)) / 1000;
    if !edu.dma_in_flight() {
        fail!(
            "edu's DMA was no longer in flight when bus mastering came on, {after_ms} ms after it started (its timer is 100 ms): nothing shown"
        )
    }
    edu.wait_dma().or_else(|e| fail!("{e}"))?;
    let at_x = changed(x);
    if at_x != 0 {
        fail!(
            "{at_x} byte(s) of the DMA in flight across the reset landed at PA = IOVA {x:#x} (SMMUEN {}, GBPA.ABORT {} when bus mastering came on, {after_ms} ms after the DMA started)",
            state.0 as u8,
            state.1 as u8
        )
    }
    let outcome = match changed(t) {
        0 => "aborted",
        n if n == LEN && (0..LEN).all(|i| byte(t, i) == pattern(0xa7)(i)) => "landed translated",
        n => fail!("{n} byte(s) of PA {t:#x} changed, not the DMA's pattern"),
    };
    println!(
        "  after the reset (SMMUEN {}, GBPA.ABORT {}): bus mastering on {after_ms} ms after the DMA started, still in flight; it {outcome}: PA = IOVA {x:#x} untouched",
        state.0 as u8, state.1 as u8
    );
    Ok(())
}
