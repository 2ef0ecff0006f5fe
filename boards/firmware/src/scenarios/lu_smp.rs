//! `lu-smp`: `prepare_handover` while the other CPUs keep mapping, then the hand-off (a warm reset).
//!
//! First boot: a preserved domain with edu's stream; every secondary CPU maps and unmaps pages of a window of that
//! domain (interleaved with the other CPUs', so they share its tables), keeping its own record of what it has
//! mapped, and maps and unmaps in a domain of its own that is not preserved. Once every CPU is under way, CPU 0
//! prepares the hand-off. From then on the preserved domain refuses every map and unmap with `HandoverPrepared`
//! (each CPU stops there), while the unpreserved domains keep working. The preserved domain's tables must then
//! hold exactly what the CPUs' records say (an operation finished before the freeze and is recorded, or it failed:
//! nothing half-done), and a digest of them goes to the next boot.
//!
//! Second boot: the restored domain, retrieved by its token, holds the same mappings (the same digest, page for
//! page), and edu's DMA through it lands as before.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use smmuv3::{Iova, PhysAddr};

use smmuv3::{DomainError, DomainId, Iommu, Stage1Options, Stage2Options};

use super::core_smmu::{Session, edu_stream};
use super::domains::{IOVA_DESTINATION, IOVA_SOURCE, RW, memory, preferred_kind};
use super::live_update::{
    TOKEN, after_reset, arena, create, dma, dma_page, finish_all_claimed, note_data, reset_with, restore, smmu_base,
    start_lu, surviving,
};
use super::{Context, Failure};
use crate::frames::Frames;
use crate::handover::POOL;
use crate::println;
use crate::smp::{self, Cpus, MAX_CPUS};

/// The window of the preserved domain the CPUs work in: page `i` is at `WINDOW + i * 4096`, and CPU `c` (from 1)
/// owns the pages `i` with `i % (cpus - 1) == c - 1`.
const WINDOW: u64 = 0x2000_0000;
/// Pages of the window.
const PAGES: usize = 1024;
/// Operations every secondary completes on the preserved domain before CPU 0 prepares.
const BEFORE_PREPARE: u64 = 200;
/// Operations every secondary runs on its own (unpreserved) domain after it saw the freeze.
const AFTER_PREPARE: u64 = 64;
/// Where each CPU's own domain maps its pages.
const OWN_WINDOW: u64 = 0x1000_0000;

/// What a secondary did.
#[derive(Default, Clone, Copy)]
struct Mapper {
    /// Maps and unmaps of the preserved domain that succeeded.
    done: u64,
    /// The first refusal's token (the freeze), if any.
    refused: Option<u64>,
    /// Operations on its own domain after the freeze (all succeeded).
    own_after: u64,
}

/// FNV-1a over the mapped pages of the window (index, output address), and how many.
fn digest(mapped: impl Iterator<Item = (usize, u64)>) -> (u64, u64) {
    let (mut hash, mut count) = (0xcbf2_9ce4_8422_2325u64, 0);
    for (i, pa) in mapped {
        for word in [i as u64, pa] {
            for byte in word.to_le_bytes() {
                hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        count += 1;
    }
    (hash, count)
}

/// The window as the domain's tables have it.
fn walked(s: &Iommu<Frames>, domain: DomainId) -> Result<(u64, u64), Failure> {
    let mut pages = [None; PAGES];
    for (i, page) in pages.iter_mut().enumerate() {
        *page = s
            .iova_to_phys(domain, Iova(WINDOW + i as u64 * 4096))
            .or_else(|e| fail!("{e}"))?;
    }
    Ok(digest(
        pages.iter().enumerate().filter_map(|(i, p)| p.map(|pa| (i, pa.0))),
    ))
}

/// One map and unmap of page `page` of a CPU's own (unpreserved) domain onto `target`.
fn own_round(iommu: &Iommu<Frames>, own: DomainId, page: u64, target: u64) -> Result<(), DomainError> {
    let iova = OWN_WINDOW + page * 4096;
    iommu.map(own, Iova(iova), PhysAddr(target), 4096, RW)?;
    iommu.unmap(own, Iova(iova), 4096).map(|_| ())
}

/// xorshift64: each CPU's own sequence of pages.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// `lu-smp` (see the module documentation).
pub fn lu_smp(context: &mut Context) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let mut s = start_lu(context)?;
    let kind = preferred_kind(s.features());
    match after_reset() {
        None => first_boot(context, &edu, sid, s, kind),
        Some(note) => {
            let [source, destination, hash, count, ..] = note.data;
            let report = restore(context, &mut s)?;
            if report.domains != 1 {
                fail!("{} domains restored, 1 preserved", report.domains)
            }
            let domain = s.retrieve(TOKEN).or_else(|e| fail!("retrieve: {e}"))?;
            let (now_hash, now_count) = walked(&s, domain)?;
            if (now_hash, now_count) != (hash, count) {
                fail!(
                    "the restored window maps {now_count} page(s) (digest {now_hash:#x}); {count} were recorded \
                     (digest {hash:#x})"
                )
            }
            dma(&edu, source, IOVA_DESTINATION, destination, 0x72)?;
            finish_all_claimed(context, &mut s)?;
            println!(
                "  after the reset: {domain} retrieved by {TOKEN:#x}: its window maps the {count} page(s) recorded \
                 (digest {hash:#x}), and edu's DMA lands at PA {destination:#x} again"
            );
            s.detach(sid).or_else(|e| fail!("{e}"))?;
            s.free_domain(domain).or_else(|e| fail!("{e}"))
        }
    }
}

fn first_boot(
    context: &Context,
    edu: &crate::edu::Edu,
    sid: u32,
    mut s: Session,
    kind: smmuv3::DomainKind,
) -> Result<(), Failure> {
    let total = smp::cpu_count();
    if total < 3 {
        fail!("needs at least 3 CPUs (QEMU: -smp 4, `cargo xtask qemu --smp 4`); the platform lists {total}")
    }
    let preserved = create(&mut s, kind, arena()?)?;
    let (source, destination) = (dma_page()?, dma_page()?);
    s.map(preserved, Iova(IOVA_SOURCE), PhysAddr(source), 4096, RW)
        .or_else(|e| fail!("{e}"))?;
    s.map(preserved, Iova(IOVA_DESTINATION), PhysAddr(destination), 4096, RW)
        .or_else(|e| fail!("{e}"))?;
    s.attach(preserved, sid).or_else(|e| fail!("{e}"))?;
    dma(edu, source, IOVA_DESTINATION, destination, 0x71)?;
    s.preserve(preserved, TOKEN).or_else(|e| fail!("{e}"))?;
    // Each CPU maps its window pages onto a DMA-pool page of its own (memory that survives the hand-off).
    let mut targets = [0u64; MAX_CPUS];
    for target in targets.iter_mut().take(total).skip(1) {
        *target = dma_page()?;
    }
    let mut own = [None; MAX_CPUS];
    for slot in own.iter_mut().take(total).skip(1) {
        let d = match kind {
            smmuv3::DomainKind::Stage1 => s.create_stage1(
                memory(),
                Stage1Options {
                    input_bits: 39,
                    el2: false,
                },
            ),
            _ => s.create_stage2(
                memory(),
                Stage2Options {
                    input_bits: 40.min(s.features().oas_bits),
                },
            ),
        };
        *slot = Some(d.or_else(|e| fail!("create a CPU's own domain: {e}"))?);
    }

    // The CPUs' records: bit i of word i / 64 set when page i is mapped (each page has one owner).
    let records = [const { AtomicU64::new(0) }; PAGES / 64];
    let progress = [const { AtomicU64::new(0) }; MAX_CPUS];
    let prepared = AtomicBool::new(false);
    let iommu: &Iommu<Frames> = &s;
    let cpus = Cpus::all().or_else(|e| fail!("starting the secondaries: {e}"))?;
    let results = cpus.run(|cpu| -> Result<(Mapper, u64), Failure> {
        if cpu == 0 {
            // Wait until every secondary is under way, then freeze while they map.
            while (1..total).any(|c| progress[c].load(Ordering::Acquire) < BEFORE_PREPARE) {
                core::hint::spin_loop();
            }
            let bytes = iommu
                .prepare_handover(&POOL, smmu_base(context), 1, &surviving())
                .or_else(|e| fail!("prepare_handover: {e}"))?;
            prepared.store(true, Ordering::Release);
            return Ok((Mapper::default(), bytes as u64));
        }
        let mut mapper = Mapper::default();
        let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ cpu as u64;
        let owners = total - 1;
        let own = own[cpu].unwrap_or_else(|| unreachable!("every secondary has a domain"));
        while mapper.refused.is_none() {
            let i = (next(&mut state) as usize % (PAGES / owners)) * owners + (cpu - 1);
            let iova = WINDOW + i as u64 * 4096;
            let bit = 1u64 << (i % 64);
            let mapped = records[i / 64].load(Ordering::Relaxed) & bit != 0;
            let result = if mapped {
                iommu.unmap(preserved, Iova(iova), 4096).map(|_| ())
            } else {
                iommu.map(preserved, Iova(iova), PhysAddr(targets[cpu]), 4096, RW)
            };
            match result {
                Ok(()) => {
                    records[i / 64].fetch_xor(bit, Ordering::Relaxed);
                    mapper.done += 1;
                    progress[cpu].store(mapper.done, Ordering::Release);
                }
                Err(DomainError::HandoverPrepared { token }) => mapper.refused = Some(token),
                Err(e) => fail!("CPU {cpu}: {e}"),
            }
            // Between two operations, one on its own domain (not preserved).
            own_round(iommu, own, mapper.done % 64, targets[cpu]).or_else(|e| fail!("CPU {cpu}, own domain: {e}"))?;
        }
        // A refusal means the hand-off is prepared: the records are written and the phase says so (CPU 0's flag
        // may lag: it is set once prepare_handover has returned, after the domains were let go).
        if !prepared.load(Ordering::Acquire)
            && !matches!(
                iommu.handover_phase(),
                smmuv3::handover::restore::HandoverPhase::Prepared { .. }
            )
        {
            fail!("CPU {cpu} was refused before prepare_handover returned")
        }
        for n in 0..AFTER_PREPARE {
            own_round(iommu, own, n, targets[cpu]).or_else(|e| fail!("CPU {cpu}, own domain after the freeze: {e}"))?;
            mapper.own_after += 1;
        }
        Ok((mapper, 0))
    });
    cpus.stop().or_else(|e| fail!("stopping the secondaries: {e}"))?;
    let mut bytes = 0;
    let mut done = 0;
    for (cpu, result) in results.into_iter().enumerate() {
        let (mapper, b) = result?;
        if cpu == 0 {
            bytes = b;
            continue;
        }
        if mapper.refused != Some(TOKEN) {
            fail!("CPU {cpu} was refused for token {:?}, not {TOKEN:#x}", mapper.refused)
        }
        done += mapper.done;
    }
    // The tables as frozen equal the CPUs' records: every operation finished before the freeze, or failed.
    let recorded = digest((0..PAGES).filter_map(|i| {
        let mapped = records[i / 64].load(Ordering::Relaxed) & (1 << (i % 64)) != 0;
        let owner = i % (total - 1) + 1;
        mapped.then_some((i, targets[owner]))
    }));
    let (hash, count) = walked(&s, preserved)?;
    if (hash, count) != recorded {
        fail!(
            "the frozen tables map {count} page(s) (digest {hash:#x}) but the CPUs recorded {} (digest {:#x})",
            recorded.1,
            recorded.0
        )
    }
    for d in own.iter().flatten() {
        s.free_domain(*d).or_else(|e| fail!("{e}"))?;
    }
    println!(
        "  {} CPUs mapped and unmapped in {preserved} ({kind}, preserved as {TOKEN:#x}): {done} operation(s) before \
         CPU 0's prepare_handover froze it ({bytes} bytes of records), each CPU refused (HandoverPrepared) from \
         then on while its own domain kept working ({AFTER_PREPARE} map + unmap each); the frozen window maps \
         {count} page(s) (digest {hash:#x}), as the CPUs recorded",
        total - 1
    );
    reset_with(s, note_data(&[source, destination, hash, count]))
}
