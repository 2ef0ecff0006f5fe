//! `pgtable-dma`: edu's DMA through IO page tables built by the driver, for every stage the SMMU has: a
//! round trip through translated addresses, an unmap whose invalidation must reach the SMMU's TLB (QEMU caches
//! translations, so a missing TLBI lets the DMA through and fails the scenario), the fault the SMMU records for
//! the unmapped address, and a remap to another page.

use core::fmt::Write;

use smmuv3::active::TlbContext;
use smmuv3::ctx::{CdTable, CdTableFormat};
use smmuv3::features::StallModel;
use smmuv3::hw::cd::{self, Cd, CdConfig};
use smmuv3::hw::command::Command;
use smmuv3::hw::event::Event;
use smmuv3::hw::ste::{self, CdTableLayout, DefaultSubstream, Stage1Config, Stage2Config, Ste};
use smmuv3::pgtable::{Format, Gather, Granule, IoPageTable, Prot, Stage, desc};
use smmuv3::queue::cmdq::Batch;

use super::core_smmu::{Session, edu_stream, expect_quiet, start};
use super::{Context, Failure};
use crate::edu::{Direction, Edu};
use crate::frames::{self, Frames};
use crate::println;

/// Device addresses edu uses (below its default 28-bit DMA mask, far from the physical pages behind them).
const IOVA_SOURCE: u64 = 0x0bad_0000;
const IOVA_DESTINATION: u64 = 0x0bad_1000;
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
    (i as u8).wrapping_mul(13).wrapping_add(0x5d)
}

/// The translation faults recorded for `sid` at `iova`, and any other event.
fn faults_at(s: &mut Session, sid: u32, iova: u64, permission: bool) -> Result<(u32, u32), Failure> {
    let (mut at, mut other) = (0, 0);
    loop {
        let report = s.drain_events(|e: Event| {
            let is_fault = if permission {
                matches!(e, Event::FPermission(p) if !p.fault.access.read)
            } else {
                matches!(e, Event::FTranslation(_))
            };
            if is_fault && e.stream_id() == Some(sid) && e.address().is_some_and(|a| a & !0xfff == iova) {
                at += 1;
            } else {
                other += 1;
                println!("  unexpected event: {e}");
            }
        });
        match report {
            Ok(r) if r.pending => {}
            Ok(_) => return Ok((at, other)),
            Err(e) => fail!("{e}"),
        }
    }
}

/// Has edu write to `IOVA_DESTINATION`, which must not reach `pa` (filled with `canary`): the SMMU must abort the
/// writes and record only translation faults (or, with `permission`, write permission faults) there. Returns how
/// many it recorded.
fn expect_blocked_write(
    s: &mut Session,
    edu: &Edu,
    sid: u32,
    pa: u64,
    canary: u8,
    permission: bool,
) -> Result<u32, Failure> {
    fill(pa, |_| canary);
    edu.dma(Direction::FromDevice, IOVA_DESTINATION, 0, LEN as u64)
        .or_else(|e| fail!("{e}"))?;
    if (0..4096).any(|i| byte(pa, i) != canary) {
        fail!("edu's write reached PA {pa:#x}: the SMMU used a stale or too permissive translation")
    }
    let kind = if permission {
        "F_PERMISSION (write)"
    } else {
        "F_TRANSLATION"
    };
    let (faults, unexpected) = faults_at(s, sid, IOVA_DESTINATION, permission)?;
    if faults == 0 || unexpected != 0 {
        fail!("{faults} {kind} at {IOVA_DESTINATION:#x}, {unexpected} other event(s)")
    }
    Ok(faults)
}

/// `pgtable-dma`, for each stage the SMMU implements.
pub fn pgtable_dma(context: &mut Context) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let stages = {
        let s = start(context, &smmuv3::InitOptions::default())?;
        s.features().stages()
    };
    let mut ran = 0;
    for stage in [Stage::One, Stage::Two] {
        if (stage == Stage::One && !stages.stage1) || (stage == Stage::Two && !stages.stage2) {
            continue;
        }
        translate(context, &edu, sid, stage, false)?;
        ran += 1;
    }
    if stages.nested {
        // Both stages for one stream: the stage-1 tables (and the CD) sit at IPAs that stage 2 translates.
        translate(context, &edu, sid, Stage::One, true)?;
    }
    if ran == 0 {
        fail!("the SMMU translates at no stage")
    }
    Ok(())
}

/// An empty 4 KiB-granule page table of `stage` from the frame pool.
fn new_table(stage: Stage, input_bits: u8, output_bits: u8, coherent: bool) -> Result<IoPageTable<Frames>, Failure> {
    let format = Format {
        stage,
        granule: Granule::Size4K,
        input_bits,
        output_bits,
    };
    match IoPageTable::new(format, Frames, coherent) {
        Ok(t) => Ok(t),
        Err(e) => fail!("{e}"),
    }
}

/// The stage-2 half of a nested configuration: RAM mapped IPA = PA with the largest blocks, and the STE fields.
fn nested_stage2(context: &Context, s: &mut Session) -> Result<(IoPageTable<Frames>, Stage2Config), Failure> {
    let features = *s.features();
    let output_bits = features.oas_bits.min(48);
    // IPA = PA for all of RAM: 40 bits (a level-1 root of 2 concatenated tables) where RAM lies below 1 TiB, the
    // whole output size (a level-0 root) where it lies higher, as on sbsa-ref. Not 41-43 bits: QEMU 10.0 walks
    // only the first table of a concatenated stage-2 root (it masks the table index off the base address), and
    // sbsa-ref's RAM would sit in the third.
    let ram_top = context.platform.memory.iter().map(|b| b.end() - 1).max().unwrap_or(0);
    let ram_bits = (64 - ram_top.leading_zeros()) as u8;
    let input_bits = if ram_bits <= 40 {
        40.min(output_bits)
    } else {
        output_bits
    };
    if ram_bits > input_bits {
        fail!("RAM up to {ram_top:#x} is beyond the SMMU's {output_bits}-bit output size")
    }
    let mut table = new_table(Stage::Two, input_bits, output_bits, features.coherent)?;
    for bank in &context.platform.memory {
        table
            .map(
                bank.base,
                bank.base,
                bank.size,
                Prot::READ | Prot::WRITE | Prot::CACHEABLE,
            )
            .or_else(|e| fail!("stage-2 map of RAM {bank}: {e}"))?;
    }
    let vmid = s.allocate_vmid().or_else(|e| fail!("{e}"))?;
    let config = stage2_config(&table, vmid, features.coherent);
    Ok((table, config))
}

/// The STE's stage-2 fields for `table` (4 KiB granule) with `vmid`; faults are recorded.
fn stage2_config(table: &IoPageTable<Frames>, vmid: u16, coherent: bool) -> Stage2Config {
    let format = table.format();
    let (cacheability, shareability) = ste::walk_attributes(coherent);
    Stage2Config {
        vmid,
        t0sz: 64 - format.input_bits,
        sl0: table.geometry().s2_sl0(),
        granule: ste::Granule::Size4K,
        ps: size_encoding(format.output_bits),
        cacheability,
        shareability,
        table: table.root(),
        access_flag_fault_disable: false,
        protected_table_walk: false,
        stall: false,
        record_faults: true,
    }
}

fn translate(context: &Context, edu: &Edu, sid: u32, stage: Stage, nested: bool) -> Result<(), Failure> {
    let mut s = start(context, &smmuv3::InitOptions::default())?;
    let features = *s.features();
    let rules = features.entry_rules();
    let (cacheability, shareability) = ste::walk_attributes(features.coherent);
    let output_bits = features.oas_bits.min(48);
    let input_bits = if stage == Stage::One { 39 } else { 40.min(output_bits) };
    let mut table = new_table(stage, input_bits, output_bits, features.coherent)?;
    // Blocks are split in place only on an SMMU with BBML = 2; otherwise a cut block is refused.
    table.set_bbm_level(features.bbm_level);
    let (source, destination, alternate) = (page()?, page()?, page()?);
    let rw = Prot::READ | Prot::WRITE | Prot::CACHEABLE;
    table
        .map(IOVA_SOURCE, source, 4096, rw)
        .or_else(|e| fail!("map: {e}"))?;
    table
        .map(IOVA_DESTINATION, destination, 4096, rw)
        .or_else(|e| fail!("map: {e}"))?;

    // The context: a CD (stage 1) or the STE's stage-2 fields.
    let mut cd_table = None;
    let mut parent = None;
    let (ste, tlb) = match stage {
        Stage::OneEl2 => fail!("stage 1 of the EL2 regime is not exercised by this scenario"),
        Stage::One => {
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
            // No STE points to the table yet: nothing to invalidate while it is written.
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
            cd_table = Some(cds);
            if nested {
                let (s2_table, s2) = nested_stage2(context, &mut s)?;
                parent = Some(s2_table);
                let ste = Ste::nested(&s1, &s2, &rules).or_else(|e| fail!("STE: {e}"))?;
                (ste, TlbContext::Stage1 { asid, vmid: s2.vmid })
            } else {
                let ste = Ste::stage1(&s1, &rules).or_else(|e| fail!("STE: {e}"))?;
                (ste, TlbContext::Stage1 { asid, vmid: 0 })
            }
        }
        Stage::Two => {
            let vmid = s.allocate_vmid().or_else(|e| fail!("{e}"))?;
            let ste =
                Ste::stage2(&stage2_config(&table, vmid, features.coherent), &rules).or_else(|e| fail!("STE: {e}"))?;
            (ste, TlbContext::Stage2 { vmid, nested: false })
        }
    };
    let installed = s.install_ste(sid, &ste).or_else(|e| fail!("{e}"))?;
    let geometry = table.geometry();
    println!(
        "  {}: {input_bits}-bit input from level {} ({} root entries), STE {:?} in {} sync(s)",
        match (stage, nested) {
            (_, true) => "nested (stage 1 inside an identity stage 2 of RAM)",
            (Stage::One | Stage::OneEl2, false) => "stage 1",
            (Stage::Two, false) => "stage 2",
        },
        geometry.start_level,
        geometry.root_entries,
        installed.kind,
        installed.syncs
    );

    // Round trip through translated addresses.
    fill(source, pattern);
    fill(destination, |_| 0xee);
    edu.dma(Direction::ToDevice, IOVA_SOURCE, 0, LEN as u64)
        .or_else(|e| fail!("{e}"))?;
    edu.dma(Direction::FromDevice, IOVA_DESTINATION, 0, LEN as u64)
        .or_else(|e| fail!("{e}"))?;
    if let Some(i) = (0..4096).find(|&i| byte(destination, i) != if i < LEN { pattern(i) } else { 0xee }) {
        fail!(
            "translated DMA: byte {i} of PA {destination:#x} is {:#x}",
            byte(destination, i)
        )
    }
    println!(
        "  {LEN} bytes IOVA {IOVA_SOURCE:#x} (PA {source:#x}) -> edu -> IOVA {IOVA_DESTINATION:#x} (PA {destination:#x}), verified"
    );

    // Unmap the destination and invalidate: the DMA must now fault.
    let mut gather = Gather::default();
    let unmapped = table
        .unmap(IOVA_DESTINATION, 4096, &mut gather)
        .or_else(|e| fail!("unmap: {e}"))?;
    let flush = s
        .flush(&mut table, gather, tlb)
        .or_else(|e| fail!("invalidation: {e}"))?;
    println!(
        "  unmapped {unmapped:#x} bytes; invalidation: {} command(s), {} PROD write(s)",
        flush.commands, flush.prod_writes
    );
    let faults = expect_blocked_write(&mut s, edu, sid, destination, 0xc3, false)?;
    println!("  after unmap: DMA aborted, {faults} F_TRANSLATION event(s) at IOVA {IOVA_DESTINATION:#x}");

    // Map the address to an alternate page: the DMA lands there.
    table
        .map(IOVA_DESTINATION, alternate, 4096, rw)
        .or_else(|e| fail!("remap: {e}"))?;
    fill(alternate, |_| 0);
    edu.dma(Direction::FromDevice, IOVA_DESTINATION, 0, LEN as u64)
        .or_else(|e| fail!("{e}"))?;
    if let Some(i) = (0..LEN).find(|&i| byte(alternate, i) != pattern(i)) {
        fail!(
            "remapped DMA: byte {i} of PA {alternate:#x} is {:#x}",
            byte(alternate, i)
        )
    }
    println!("  remapped IOVA {IOVA_DESTINATION:#x} -> PA {alternate:#x}: verified");

    // Make it read-only: edu's writes fault with F_PERMISSION, its reads still work.
    let mut gather = Gather::default();
    let read_only = Prot::READ | Prot::CACHEABLE;
    table
        .protect(IOVA_DESTINATION, 4096, read_only, &mut gather)
        .or_else(|e| fail!("protect: {e}"))?;
    s.flush(&mut table, gather, tlb)
        .or_else(|e| fail!("invalidation: {e}"))?;
    let faults = expect_blocked_write(&mut s, edu, sid, alternate, 0x77, true)?;
    edu.dma(Direction::ToDevice, IOVA_DESTINATION, 0, LEN as u64)
        .or_else(|e| fail!("{e}"))?;
    expect_quiet(&mut s, "read through a read-only mapping")?;
    println!("  read-only IOVA {IOVA_DESTINATION:#x}: writes abort with {faults} F_PERMISSION event(s), reads work");

    // Detach: abort the stream, drop the context's TLB entries, then the tables may go.
    s.attach_abort(sid).or_else(|e| fail!("{e}"))?;
    let mut batch = Batch::new();
    let command = match tlb {
        TlbContext::Stage1 { asid, vmid } => Command::TlbiNhAsid { vmid, asid },
        TlbContext::Stage1El2 => Command::TlbiEl2All,
        TlbContext::Stage2 { vmid, .. } => Command::TlbiS12Vmall { vmid },
    };
    batch.push(&command).or_else(|e| fail!("{e}"))?;
    s.submit(&batch).or_else(|e| fail!("{e}"))?;
    if let (Some(_), TlbContext::Stage1 { vmid, .. }) = (&parent, tlb) {
        let mut batch = Batch::new();
        batch.push(&Command::TlbiS12Vmall { vmid }).or_else(|e| fail!("{e}"))?;
        s.submit(&batch).or_else(|e| fail!("{e}"))?;
        s.free_vmid(vmid).or_else(|e| fail!("{e}"))?;
    }
    drop(table);
    drop(parent);
    if let Some(cds) = cd_table {
        // SAFETY: no STE points to the CD table any more, and that was invalidated.
        unsafe { cds.free(&Frames) };
    }
    match tlb {
        TlbContext::Stage1 { asid, .. } => s.free_asid(asid).or_else(|e| fail!("{e}"))?,
        TlbContext::Stage1El2 => {}
        TlbContext::Stage2 { vmid, .. } => s.free_vmid(vmid).or_else(|e| fail!("{e}"))?,
    }
    expect_quiet(&mut s, "after detach")
}
