//! `dma-map-bench`: the dma_map path as a hypervisor runs it, on the target. Many times: map one page at a
//! device address (the page-table single-page path), have edu DMA through it (checked), unmap it and invalidate
//! (TLBI + CMD_SYNC through `ActiveSmmu::flush`). The cost is reported split into page-table work (map + unmap)
//! and invalidation (flush: TLBI, CMD_SYNC, waiting for it, releasing tables), in generic-timer ticks. Under QEMU
//! the ticks measure the emulator, not hardware; a board runs the same measurement.
//!
//! The SMMU and stream setup sits in [`attach`], on its own: the domain API will replace it.

use core::fmt::Write;

use smmuv3::active::TlbContext;
use smmuv3::ctx::{CdTable, CdTableFormat};
use smmuv3::features::StallModel;
use smmuv3::hw::cd::{self, Cd, CdConfig};
use smmuv3::hw::command::Command;
use smmuv3::hw::ste::{self, CdTableLayout, DefaultSubstream, Stage1Config, Stage2Config, Ste};
use smmuv3::pgtable::{Format, Gather, Granule, IoPageTable, Prot, Stage, desc};
use smmuv3::queue::cmdq::Batch;

use super::core_smmu::{Session, edu_stream, expect_quiet, start};
use super::{Context, Failure};
use crate::edu::Direction;
use crate::frames::{self, Frames};
use crate::{println, time};

/// Map, DMA, unmap, invalidate: this many times (each DMA waits for edu's 100 ms timer). The first round (which
/// also pays the first touch of code and tables) is left out of the averages.
const ROUNDS: u64 = 24;
/// Device addresses used, one per round, spread over 64 pages below edu's default 28-bit DMA mask, in another
/// last-level table than `IOVA_SOURCE`, so that the rounds leave it empty for the trim.
const IOVA_BASE: u64 = 0x0a00_0000;
/// Where edu's buffer is loaded from once, before the rounds.
const IOVA_SOURCE: u64 = 0x0bf0_0000;
const LEN: usize = 256;

/// The OAS encoding of STE.S2PS / CD.IPS.
fn size_encoding(bits: u8) -> u8 {
    match bits {
        0..=32 => 0,
        33..=36 => 1,
        37..=40 => 2,
        41..=42 => 3,
        43..=44 => 4,
        45..=48 => 5,
        _ => 6,
    }
}

fn page() -> Result<u64, Failure> {
    match frames::alloc(4096, 4096) {
        Ok(a) => Ok(a as u64),
        Err(e) => fail!("{e}"),
    }
}

fn fill(pa: u64, f: impl Fn(usize) -> u8) {
    for i in 0..4096 {
        // SAFETY: `pa` is an identity-mapped page this scenario owns.
        unsafe { core::ptr::write_volatile((pa as *mut u8).add(i), f(i)) };
    }
}

fn byte(pa: u64, i: usize) -> u8 {
    // SAFETY: as in `fill`.
    unsafe { core::ptr::read_volatile((pa as *const u8).add(i)) }
}

fn pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(29).wrapping_add(0x3b)
}

/// A translated stream for edu: its page table, the TLB context to invalidate, and what detaching frees.
struct Attached {
    table: IoPageTable<Frames>,
    tlb: TlbContext,
    cd_table: Option<CdTable>,
}

/// Points edu's stream at a new, empty 4 KiB-granule page table: stage 1 (a CD) when the SMMU has it, else stage 2.
fn attach(s: &mut Session, sid: u32) -> Result<Attached, Failure> {
    let features = *s.features();
    let rules = features.entry_rules();
    let (cacheability, shareability) = ste::walk_attributes(features.coherent);
    let output_bits = features.oas_bits.min(48);
    let stage = if features.stages().stage1 {
        Stage::One
    } else {
        Stage::Two
    };
    let input_bits = if stage == Stage::One { 39 } else { 40.min(output_bits) };
    let format = Format {
        stage,
        granule: Granule::Size4K,
        input_bits,
        output_bits,
    };
    let mut table = match IoPageTable::new(format, Frames, features.coherent) {
        Ok(t) => t,
        Err(e) => fail!("{e}"),
    };
    table.set_bbm_level(features.bbm_level);
    let (ste, tlb, cd_table) = if stage == Stage::One {
        let asid = s.allocate_asid().or_else(|e| fail!("{e}"))?;
        let mut cds = match CdTable::new(CdTableFormat::Linear { ssid_bits: 0 }, &Frames, features.coherent) {
            Ok(t) => t,
            Err(e) => fail!("{e}"),
        };
        let cd = Cd::new(
            &CdConfig {
                asid,
                table: table.root(),
                t0sz: 64 - input_bits,
                granule: cd::Granule::Size4K,
                ips: size_encoding(output_bits),
                cacheability,
                shareability,
                mair: desc::MAIR,
                record_faults: true,
                abort_on_fault: true,
                stall: false,
                private_asid: true,
            },
            &rules,
        )
        .or_else(|e| fail!("CD: {e}"))?;
        // No STE points to the CD table yet: nothing to invalidate while it is written.
        cds.write(0, &cd, &Frames, |_| Ok(()))
            .or_else(|e| fail!("CD table: {e}"))?;
        let s1 = Stage1Config {
            cd_table: cds.base(),
            cd_max_log2: 0,
            layout: CdTableLayout::Linear,
            default_substream: DefaultSubstream::Terminate,
            cacheability,
            shareability,
            stall_disable: features.stall_model == StallModel::StallAndTerminate,
            el2: false,
        };
        let ste = Ste::stage1(&s1, &rules).or_else(|e| fail!("STE: {e}"))?;
        (ste, TlbContext::Stage1 { asid, vmid: 0 }, Some(cds))
    } else {
        let vmid = s.allocate_vmid().or_else(|e| fail!("{e}"))?;
        let config = Stage2Config {
            vmid,
            t0sz: 64 - input_bits,
            sl0: table.geometry().s2_sl0(),
            granule: ste::Granule::Size4K,
            ps: size_encoding(output_bits),
            cacheability,
            shareability,
            table: table.root(),
            access_flag_fault_disable: false,
            protected_table_walk: false,
            stall: false,
            record_faults: true,
        };
        let ste = Ste::stage2(&config, &rules).or_else(|e| fail!("STE: {e}"))?;
        (ste, TlbContext::Stage2 { vmid, nested: false }, None)
    };
    s.install_ste(sid, &ste).or_else(|e| fail!("{e}"))?;
    println!(
        "  stage {} stream {sid:#x}, {input_bits}-bit input",
        if stage == Stage::One { 1 } else { 2 }
    );
    Ok(Attached { table, tlb, cd_table })
}

/// Aborts the stream, drops its TLB entries, and frees its tables and IDs.
fn detach(s: &mut Session, sid: u32, attached: Attached) -> Result<(), Failure> {
    s.attach_abort(sid).or_else(|e| fail!("{e}"))?;
    let mut batch = Batch::new();
    let command = match attached.tlb {
        TlbContext::Stage1 { asid, vmid } => Command::TlbiNhAsid { vmid, asid },
        TlbContext::Stage1El2 => Command::TlbiEl2All,
        TlbContext::Stage2 { vmid, .. } => Command::TlbiS12Vmall { vmid },
    };
    batch.push(&command).or_else(|e| fail!("{e}"))?;
    s.submit(&batch).or_else(|e| fail!("{e}"))?;
    drop(attached.table);
    if let Some(cds) = attached.cd_table {
        // SAFETY: no STE points to the CD table any more, and that was invalidated.
        unsafe { cds.free(&Frames) };
    }
    match attached.tlb {
        TlbContext::Stage1 { asid, .. } => s.free_asid(asid).or_else(|e| fail!("{e}")),
        TlbContext::Stage1El2 => Ok(()),
        TlbContext::Stage2 { vmid, .. } => s.free_vmid(vmid).or_else(|e| fail!("{e}")),
    }
}

/// `dma-map-bench`.
pub fn dma_map_bench(context: &mut Context) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let mut s = start(context, &smmuv3::InitOptions::default())?;
    let mut a = attach(&mut s, sid)?;
    let rw = Prot::READ | Prot::WRITE | Prot::CACHEABLE;
    let (source, destination) = (page()?, page()?);

    // Load edu's buffer once through a mapping of its own (kept for the whole run).
    fill(source, pattern);
    a.table
        .map(IOVA_SOURCE, source, 4096, rw)
        .or_else(|e| fail!("map: {e}"))?;
    edu.dma(Direction::ToDevice, IOVA_SOURCE, 0, LEN as u64)
        .or_else(|e| fail!("{e}"))?;

    let (mut map_ticks, mut unmap_ticks, mut flush_ticks) = (0u64, 0u64, 0u64);
    let mut commands = 0;
    for round in 0..ROUNDS {
        let iova = IOVA_BASE + ((round * 37) % 64) * 4096;
        fill(destination, |_| 0xee);

        let t0 = time::ticks();
        a.table
            .map(iova, destination, 4096, rw)
            .or_else(|e| fail!("round {round}: map {iova:#x}: {e}"))?;
        let mapped = time::ticks() - t0;

        edu.dma(Direction::FromDevice, iova, 0, LEN as u64)
            .or_else(|e| fail!("{e}"))?;
        if let Some(i) = (0..4096).find(|&i| byte(destination, i) != if i < LEN { pattern(i) } else { 0xee }) {
            fail!(
                "round {round}: DMA to IOVA {iova:#x}: byte {i} of PA {destination:#x} is {:#x}",
                byte(destination, i)
            )
        }

        let mut gather = Gather::default();
        let t0 = time::ticks();
        let unmapped = a
            .table
            .unmap(iova, 4096, &mut gather)
            .or_else(|e| fail!("round {round}: unmap: {e}"))?;
        let t1 = time::ticks();
        let report = s
            .flush(&mut a.table, gather, a.tlb)
            .or_else(|e| fail!("round {round}: invalidation: {e}"))?;
        let t2 = time::ticks();
        if round > 0 {
            map_ticks += mapped;
            unmap_ticks += t1 - t0;
            flush_ticks += t2 - t1;
        }
        commands += report.commands;
        if unmapped != 4096 || report.syncs != 1 {
            fail!(
                "round {round}: unmapped {unmapped:#x} bytes, {} CMD_SYNC(s)",
                report.syncs
            )
        }
    }
    // Tables the rounds emptied stay linked until a trim; after it (and its flush) only what still maps remains.
    let mut gather = Gather::default();
    let trimmed = a.table.trim(&mut gather);
    s.flush(&mut a.table, gather, a.tlb)
        .or_else(|e| fail!("trim invalidation: {e}"))?;
    println!(
        "  {ROUNDS} rounds at {} IOVAs, {LEN}-byte DMA each verified; {commands} command(s); trim unlinked {trimmed} \
         table(s), {} left",
        ROUNDS.min(64),
        a.table.tables()
    );
    let (pt, measured) = (map_ticks + unmap_ticks, ROUNDS - 1);
    println!(
        "  dma-map-bench: per round: page tables {} ticks (map {}, unmap {}), invalidation {} ticks (TLBI + \
         CMD_SYNC); timer {} Hz, mean of rounds 2..{ROUNDS}",
        pt / measured,
        map_ticks / measured,
        unmap_ticks / measured,
        flush_ticks / measured,
        time::frequency()
    );
    if trimmed == 0 {
        fail!("the rounds' emptied last-level table was not trimmed")
    }
    expect_quiet(&mut s, "after the rounds")?;
    detach(&mut s, sid, a)?;
    expect_quiet(&mut s, "after detach")
}
