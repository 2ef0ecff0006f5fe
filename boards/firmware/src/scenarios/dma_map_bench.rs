//! `dma-map-bench`: the dma_map path as a hypervisor runs it, on the target. Many times: map one page at a
//! device address (the page-table single-page path), have edu DMA through it (checked), unmap it and invalidate
//! (TLBI + CMD_SYNC: the domain's `unmap_deferred`, then `sync_domain`). The cost is reported split into page-table work (map + unmap)
//! and invalidation (flush: TLBI, CMD_SYNC, waiting for it, releasing tables), in generic-timer ticks. Under QEMU
//! the ticks measure the emulator, not hardware; a board runs the same measurement.
//!
//! Everything goes through a domain: no STE, CD or TLBI is built here.

use core::fmt::Write;
use smmuv3::{Iova, PhysAddr};

use smmuv3::pgtable::Gather;
use smmuv3::{DomainKind, Prot, Stage1Options, Stage2Options};

use super::core_smmu::{edu_stream, expect_quiet, start};
use super::domains::{POOL, byte, fill, page};
use super::{Context, Failure};
use crate::edu::Direction;
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

fn pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(29).wrapping_add(0x11)
}

/// `dma-map-bench`.
pub fn dma_map_bench(context: &mut Context) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let mut s = start(context, &smmuv3::InitOptions::default())?;
    // A domain (stage 1 where the SMMU has it), the stream attached: the domain owns the STE, CD and IDs.
    let kind = super::domains::preferred_kind(s.features());
    let ipa_bits = 40.min(s.features().oas_bits);
    let domain = match kind {
        DomainKind::Stage1 => s.create_stage1(
            &POOL,
            Stage1Options {
                input_bits: 39,
                el2: false,
            },
        ),
        _ => s.create_stage2(&POOL, Stage2Options { input_bits: ipa_bits }),
    }
    .or_else(|e| fail!("domain: {e}"))?;
    s.attach(domain, sid).or_else(|e| fail!("attach: {e}"))?;
    let rw = Prot::READ | Prot::WRITE | Prot::CACHEABLE;
    let (source, destination) = (page()?, page()?);

    // Load edu's buffer once through a mapping of its own (kept for the whole run).
    fill(source, pattern);
    s.map(domain, Iova(IOVA_SOURCE), PhysAddr(source), 4096, rw)
        .or_else(|e| fail!("map: {e}"))?;
    edu.dma(Direction::ToDevice, IOVA_SOURCE, 0, LEN as u64)
        .or_else(|e| fail!("{e}"))?;

    let (mut map_ticks, mut unmap_ticks, mut flush_ticks) = (0u64, 0u64, 0u64);
    for round in 0..ROUNDS {
        let iova = IOVA_BASE + ((round * 37) % 64) * 4096;
        fill(destination, |_| 0xee);

        let t0 = time::ticks();
        s.map(domain, Iova(iova), PhysAddr(destination), 4096, rw)
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

        // Unmap (page tables only) and invalidate (TLBI + CMD_SYNC, waiting for it), timed apart.
        let mut gather = Gather::default();
        let t0 = time::ticks();
        let unmapped = s
            .unmap_deferred(domain, Iova(iova), 4096, &mut gather)
            .or_else(|e| fail!("round {round}: unmap: {e}"))?;
        let t1 = time::ticks();
        s.sync_domain(domain, &mut gather)
            .or_else(|e| fail!("round {round}: invalidation: {e}"))?;
        let t2 = time::ticks();
        if round > 0 {
            map_ticks += mapped;
            unmap_ticks += t1 - t0;
            flush_ticks += t2 - t1;
        }
        if unmapped != 4096 {
            fail!("round {round}: unmapped {unmapped:#x} bytes")
        }
    }
    // Tables the rounds emptied stay linked until a trim; after it (and its invalidation) only what maps remains.
    let trimmed = s.trim_domain(domain).or_else(|e| fail!("trim: {e}"))?;
    let tables = s.domain_table(domain).or_else(|e| fail!("{e}"))?.tables();
    println!(
        "  {domain} ({kind}): {ROUNDS} rounds at {} IOVAs, {LEN}-byte DMA each verified; trim freed {trimmed} table(s), {tables} left",
        ROUNDS.min(64)
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
    s.detach(sid).or_else(|e| fail!("detach: {e}"))?;
    s.free_domain(domain).or_else(|e| fail!("free: {e}"))?;
    expect_quiet(&mut s, "after detach")
}
