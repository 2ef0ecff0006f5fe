//! `pgtable-dma`: edu's DMA through IO page tables, for every stage the SMMU has, through domains only: a round
//! trip through translated addresses, an unmap whose invalidation the domain issues (the DMA must then fault, and
//! the domain's report shows it), a remap to another page, and a read-only protect (writes fault with
//! F_PERMISSION, reads work). On a nesting SMMU a third pass runs both stages on one stream: the firmware plays a
//! guest whose stage-1 table and CD sit at IPAs that an identity stage 2 of RAM translates, and the guest's own
//! changes go with the guest's invalidations.

use core::fmt::Write;
use smmuv3::{Iova, PhysAddr};

use smmuv3::pgtable::{Format, Gather, Granule, IoPageTable, Stage};
use smmuv3::{DomainId, GuestContext, GuestInvalidation, Prot, Stage1Options, Stage2Options};

use super::core_smmu::{Session, edu_stream, start};
use super::domains::{
    IOVA_DESTINATION, IOVA_SOURCE, LEN, POOL, RW, byte, expect_blocked_write, fill, page, take_faults,
};
use super::{Context, Failure};
use crate::edu::{Direction, Edu};
use crate::frames::Frames;
use crate::println;

fn pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(13).wrapping_add(0x5d)
}

/// `pgtable-dma`, for each stage the SMMU implements, and nested where it can nest.
pub fn pgtable_dma(context: &mut Context) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let features = {
        let s = start(context, &smmuv3::InitOptions::default())?;
        *s.features()
    };
    let mut ran = 0;
    if features.stage1 {
        translate(context, &edu, sid, Pass::Stage1)?;
        ran += 1;
    }
    if features.stage2 {
        translate(context, &edu, sid, Pass::Stage2)?;
        ran += 1;
    }
    if features.nesting {
        translate(context, &edu, sid, Pass::Nested)?;
    }
    if ran == 0 {
        fail!("the SMMU translates at no stage")
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Stage1,
    Stage2,
    Nested,
}

/// Where the translation of a pass lives: a domain's own table, or (nested) the guest's.
struct Guest {
    table: IoPageTable<Frames>,
    context: GuestContext,
    parent: DomainId,
}

fn translate(context: &Context, edu: &Edu, sid: u32, pass: Pass) -> Result<(), Failure> {
    let mut s = start(context, &smmuv3::InitOptions::default())?;
    let features = *s.features();
    let (source, destination, alternate) = (page()?, page()?, page()?);
    let (domain, guest) = match pass {
        Pass::Stage1 => {
            let d = s
                .create_stage1(
                    &POOL,
                    Stage1Options {
                        input_bits: 39,
                        el2: false,
                    },
                )
                .or_else(|e| fail!("{e}"))?;
            (d, None)
        }
        Pass::Stage2 => {
            let d = s
                .create_stage2(
                    &POOL,
                    Stage2Options {
                        input_bits: 40.min(features.oas_bits),
                    },
                )
                .or_else(|e| fail!("{e}"))?;
            (d, None)
        }
        Pass::Nested => {
            // The hypervisor's stage 2: IPA = PA for all of RAM. 40 bits (a level-1 root of 2 concatenated
            // tables) where RAM lies below 1 TiB, the whole output size (a level-0 root) where it lies higher, as
            // on sbsa-ref: QEMU 10.0 walks only the first table of a concatenated stage-2 root.
            let ram_top = context.platform.memory.iter().map(|b| b.end() - 1).max().unwrap_or(0);
            let ram_bits = (64 - ram_top.leading_zeros()) as u8;
            let output_bits = features.oas_bits.min(48);
            let input_bits = if ram_bits <= 40 {
                40.min(output_bits)
            } else {
                output_bits
            };
            if ram_bits > input_bits {
                fail!("RAM up to {ram_top:#x} is beyond the SMMU's {output_bits}-bit output size")
            }
            let parent = s
                .create_stage2(&POOL, Stage2Options { input_bits })
                .or_else(|e| fail!("{e}"))?;
            for bank in &context.platform.memory {
                s.map(parent, Iova(bank.base), PhysAddr(bank.base), bank.size, RW)
                    .or_else(|e| fail!("stage-2 map of RAM {bank}: {e}"))?;
            }
            // The guest: its stage-1 table and CD in RAM (IPA = PA).
            let format = Format {
                stage: Stage::One,
                granule: Granule::Size4K,
                input_bits: 39,
                output_bits: input_bits,
            };
            let table = IoPageTable::new(format, Frames, features.coherent).or_else(|e| fail!("guest table: {e}"))?;
            let guest_context = GuestContext::build(&features, &Frames, &table, 1).or_else(|e| fail!("{e}"))?;
            let d = s
                .create_nested(parent, guest_context.stage1)
                .or_else(|e| fail!("{e}"))?;
            (
                d,
                Some(Guest {
                    table,
                    context: guest_context,
                    parent,
                }),
            )
        }
    };
    let mut guest = guest;
    // Maps through the domain, or (nested) the guest's table and its invalidation.
    let map = |s: &mut Session, guest: &mut Option<Guest>, iova: u64, pa: u64, prot: Prot| -> Result<(), Failure> {
        match guest {
            Some(g) => g
                .table
                .map(Iova(iova), PhysAddr(pa), 4096, prot)
                .or_else(|e| fail!("guest map: {e}")),
            None => s
                .map(domain, Iova(iova), PhysAddr(pa), 4096, prot)
                .or_else(|e| fail!("map: {e}")),
        }
    };
    map(&mut s, &mut guest, IOVA_SOURCE, source, RW)?;
    map(&mut s, &mut guest, IOVA_DESTINATION, destination, RW)?;
    s.attach(domain, sid).or_else(|e| fail!("attach: {e}"))?;
    let (input_bits, start_level, root_entries) = match &guest {
        Some(g) => (
            g.table.format().input_bits,
            g.table.geometry().start_level,
            g.table.geometry().root_entries,
        ),
        None => {
            let t = s.domain_table(domain).or_else(|e| fail!("{e}"))?;
            (
                t.format().input_bits,
                t.geometry().start_level,
                t.geometry().root_entries,
            )
        }
    };
    println!(
        "  {} {domain}: {input_bits}-bit input from level {start_level} ({root_entries} root entries), stream {sid:#x} attached",
        match pass {
            Pass::Nested => "nested (stage 1 inside an identity stage 2 of RAM)",
            Pass::Stage1 => "stage 1",
            Pass::Stage2 => "stage 2",
        }
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

    // Unmap the destination (the domain invalidates; a guest invalidates its own): the DMA must now fault.
    match &mut guest {
        Some(g) => {
            let mut gather = Gather::default();
            g.table
                .unmap(Iova(IOVA_DESTINATION), 4096, &mut gather)
                .or_else(|e| fail!("guest unmap: {e}"))?;
            // The page's TLB entry, or the whole ASID should the unmap have unlinked a table (its walk-cache
            // entries may name it at any address of its span).
            let invalidation = if gather.tables_unlinked() {
                GuestInvalidation::Asid(1)
            } else {
                GuestInvalidation::Address {
                    asid: 1,
                    address: IOVA_DESTINATION,
                    leaf: true,
                }
            };
            s.invalidate_guest(domain, invalidation).or_else(|e| fail!("{e}"))?;
            // SAFETY: the invalidation above covers the gather and waited for its CMD_SYNC.
            unsafe { g.table.release(gather) }.or_else(|e| fail!("guest release: {e}"))?;
        }
        None => {
            s.unmap(domain, Iova(IOVA_DESTINATION), 4096)
                .or_else(|e| fail!("unmap: {e}"))?;
        }
    }
    let n = expect_blocked_write(
        &mut s,
        edu,
        domain,
        sid,
        IOVA_DESTINATION,
        destination,
        smmuv3::FaultKind::Translation,
    )?;
    println!(
        "  after unmap: DMA aborted, {n} F_TRANSLATION fault(s) at IOVA {IOVA_DESTINATION:#x} in {domain}'s report"
    );

    // Map the address to an alternate page: the DMA lands there.
    map(&mut s, &mut guest, IOVA_DESTINATION, alternate, RW)?;
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
    let read_only = Prot::READ | Prot::CACHEABLE;
    match &mut guest {
        Some(g) => {
            let mut gather = Gather::default();
            g.table
                .protect(Iova(IOVA_DESTINATION), 4096, read_only, &mut gather)
                .or_else(|e| fail!("guest protect: {e}"))?;
            s.invalidate_guest(domain, GuestInvalidation::Asid(1))
                .or_else(|e| fail!("{e}"))?;
            // SAFETY: the whole ASID was invalidated, and its CMD_SYNC waited for.
            unsafe { g.table.release(gather) }.or_else(|e| fail!("guest release: {e}"))?;
        }
        None => {
            s.protect(domain, Iova(IOVA_DESTINATION), 4096, read_only)
                .or_else(|e| fail!("protect: {e}"))?;
        }
    }
    let n = expect_blocked_write(
        &mut s,
        edu,
        domain,
        sid,
        IOVA_DESTINATION,
        alternate,
        smmuv3::FaultKind::Permission,
    )?;
    edu.dma(Direction::ToDevice, IOVA_DESTINATION, 0, LEN as u64)
        .or_else(|e| fail!("{e}"))?;
    let quiet = take_faults(&mut s, domain)?;
    if quiet.total() != 0 {
        fail!("a read through a read-only mapping faulted: {:?}", quiet.faults.first())
    }
    // What edu read (the 0xc3 canary the blocked write left in place of the pattern edu held) comes back out
    // through the read-write source page: the read really fetched the data.
    fill(source, |_| 0xee);
    edu.dma(Direction::FromDevice, IOVA_SOURCE, 0, LEN as u64)
        .or_else(|e| fail!("{e}"))?;
    if let Some(i) = (0..4096).find(|&i| byte(source, i) != if i < LEN { 0xc3 } else { 0xee }) {
        fail!(
            "the data read through the read-only mapping: byte {i} of PA {source:#x} is {:#x}",
            byte(source, i)
        )
    }
    println!(
        "  read-only IOVA {IOVA_DESTINATION:#x}: writes abort with {n} F_PERMISSION fault(s), reads fetch the page"
    );

    // Detach and free: the domain invalidates before its tables and IDs go.
    s.detach(sid).or_else(|e| fail!("detach: {e}"))?;
    s.free_domain(domain).or_else(|e| fail!("free: {e}"))?;
    if let Some(g) = guest {
        s.free_domain(g.parent).or_else(|e| fail!("free the parent: {e}"))?;
        // SAFETY: no STE points to the guest's CD table any more (detached and invalidated).
        unsafe { g.context.cd_table.free(&Frames) };
        drop(g.table);
    }
    Ok(())
}
