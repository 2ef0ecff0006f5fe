//! The domain scenarios: the firmware uses the driver the way a hypervisor would, through domains only (no STE,
//! CD or TLBI is encoded here), and every result is a real edu DMA checked by reading memory.
//!
//! - `s1-dma`, `s2-dma`: a round trip through a stage-1 or stage-2 domain, both directions.
//! - `nested-dma`: a guest's stage 1 (built by the firmware playing the guest, in guest memory at IPAs) inside a
//!   stage-2 parent that is *not* the identity, so data landing at S2(S1(iova)) proves both stages applied; then
//!   the parent's stage 2 is remapped under the live stage 1 and the next DMA lands on the new page. Also the cost
//!   of attach, detach and a stage-2 change, in generic-timer ticks.
//! - `unmapped-fault`, `readonly-fault`, `unmap-invalidate`, `detach-aborts`: what must not get through, and the
//!   fault the domain's report shows for it.
//! - `isolation`: two edu devices in two domains; each reaches only its own buffer, and an IOVA only the other
//!   domain maps faults in the right domain.
//! - `block-mappings`: a buffer mapped with 2 MiB and 1 GiB blocks, DMA at several offsets, a partial unmap that
//!   splits a block where IDR3.BBML allows it.

use core::fmt::Write;
use core::sync::atomic::Ordering;
use smmuv3::Iova;

use smmuv3::mem::{AllocError, DmaBlock, FrameAllocator, PhysAddr};
use smmuv3::pgtable::{Format, Granule, IoPageTable, Stage};
use smmuv3::{DomainId, DomainKind, DomainMemory, FaultReport, GuestContext, Prot, Stage1Options, Stage2Options};

use super::core_smmu::{Session, edu_stream, start};
use super::{Context, Failure, edu_functions, open_edu};
use crate::edu::{Direction, Edu};
use crate::frames::{self, Frames};
use crate::{println, time};

/// The frame pool as every domain's memory.
pub(super) static POOL: Frames = Frames;

pub(super) fn memory() -> DomainMemory {
    &POOL
}

/// Device addresses (below edu's default 28-bit DMA mask, far from the physical pages behind them).
pub(super) const IOVA_SOURCE: u64 = 0x0bad_0000;
pub(super) const IOVA_DESTINATION: u64 = 0x0bad_1000;
pub(super) const LEN: usize = 256;
pub(super) const RW: Prot = Prot::READ.union(Prot::WRITE).union(Prot::CACHEABLE);
pub(super) const RO: Prot = Prot::READ.union(Prot::CACHEABLE);

pub(super) fn page() -> Result<u64, Failure> {
    match frames::alloc(4096, 4096) {
        Ok(a) => Ok(a as u64),
        Err(e) => fail!("{e}"),
    }
}

pub(super) fn fill(pa: u64, f: impl Fn(usize) -> u8) {
    for i in 0..4096 {
        // SAFETY: `pa` is an identity-mapped page this scenario owns.
        unsafe { core::ptr::write_volatile((pa as *mut u8).add(i), f(i)) };
    }
}

pub(super) fn byte(pa: u64, i: usize) -> u8 {
    // SAFETY: as in `fill`.
    unsafe { core::ptr::read_volatile((pa as *const u8).add(i)) }
}

pub(super) fn pattern(seed: u8) -> impl Fn(usize) -> u8 {
    move |i| (i as u8).wrapping_mul(13).wrapping_add(seed)
}

/// Fails unless the first `LEN` bytes at `pa` follow `pattern(seed)` and the rest of the page still holds
/// `untouched`.
pub(super) fn check_landed(pa: u64, seed: u8, untouched: u8, what: &str) -> Result<(), Failure> {
    let p = pattern(seed);
    if let Some(i) = (0..4096).find(|&i| byte(pa, i) != if i < LEN { p(i) } else { untouched }) {
        fail!("{what}: byte {i} of PA {pa:#x} is {:#x}", byte(pa, i))
    }
    Ok(())
}

/// Creates a domain of `kind` (stage 1 or stage 2) with a 39-bit (stage 1) or 40-bit (stage 2) input range.
fn create(s: &mut Session, kind: DomainKind) -> Result<DomainId, Failure> {
    let result = match kind {
        DomainKind::Stage1 => s.create_stage1(
            memory(),
            Stage1Options {
                input_bits: 39,
                el2: false,
            },
        ),
        _ => {
            let input_bits = 40.min(s.features().oas_bits);
            s.create_stage2(memory(), Stage2Options { input_bits })
        }
    };
    result.or_else(|e| fail!("create a {kind} domain: {e}"))
}

/// Stage 1 where the SMMU has it, else stage 2.
pub(super) fn preferred_kind(features: &smmuv3::Features) -> DomainKind {
    if features.stage1 {
        DomainKind::Stage1
    } else {
        DomainKind::Stage2
    }
}

/// Drains the event queue into the domains' reports and takes `domain`'s; fails on faults routed elsewhere.
pub(super) fn take_faults(s: &mut Session, domain: DomainId) -> Result<FaultReport, Failure> {
    s.drain_faults(|_| {}).or_else(|e| fail!("{e}"))?;
    let elsewhere = s.clear_unattached_faults();
    if elsewhere.total() != 0 {
        fail!(
            "{} fault(s) of unattached streams: {:?}",
            elsewhere.total(),
            elsewhere.faults.first()
        )
    }
    s.clear_domain_faults(domain).or_else(|e| fail!("{e}"))
}

/// Has edu write `LEN` bytes to `iova`, which must not reach `pa` (filled with `canary`); the domain must record
/// only faults of `kind` for `sid` at `iova`, with the write flag. Returns how many.
pub(super) fn expect_blocked_write(
    s: &mut Session,
    edu: &Edu,
    domain: DomainId,
    sid: u32,
    iova: u64,
    pa: u64,
    kind: smmuv3::FaultKind,
) -> Result<u32, Failure> {
    fill(pa, |_| 0xc3);
    edu.dma(Direction::FromDevice, iova, 0, LEN as u64)
        .or_else(|e| fail!("{e}"))?;
    if (0..4096).any(|i| byte(pa, i) != 0xc3) {
        fail!("edu's write reached PA {pa:#x}: the SMMU used a stale or too permissive translation")
    }
    let report = take_faults(s, domain)?;
    let matching = report
        .faults
        .iter()
        .filter(|f| {
            f.kind == kind && f.stream == sid && f.address.is_some_and(|a| a & !0xfff == iova) && f.write == Some(true)
        })
        .count();
    if matching == 0 || matching != report.faults.len() {
        fail!(
            "expected {kind} write faults for stream {sid:#x} at {iova:#x} in {domain}, got {} record(s), the first {:?}",
            report.total(),
            report.faults.first()
        )
    }
    Ok(report.total())
}

/// A domain of `kind` with the two pages mapped and edu's stream attached, and a verified round trip through it.
struct Mapped {
    domain: DomainId,
    source: u64,
    destination: u64,
}

fn round_trip(s: &mut Session, edu: &Edu, sid: u32, kind: DomainKind, seed: u8) -> Result<Mapped, Failure> {
    let domain = create(s, kind)?;
    let (source, destination) = (page()?, page()?);
    for (iova, pa) in [(IOVA_SOURCE, source), (IOVA_DESTINATION, destination)] {
        s.map(domain, Iova(iova), PhysAddr(pa), 4096, RW)
            .or_else(|e| fail!("map: {e}"))?;
    }
    s.attach(domain, sid).or_else(|e| fail!("attach: {e}"))?;
    fill(source, pattern(seed));
    fill(destination, |_| 0xee);
    edu.dma(Direction::ToDevice, IOVA_SOURCE, 0, LEN as u64)
        .or_else(|e| fail!("RAM -> edu: {e}"))?;
    edu.dma(Direction::FromDevice, IOVA_DESTINATION, 0, LEN as u64)
        .or_else(|e| fail!("edu -> RAM: {e}"))?;
    check_landed(destination, seed, 0xee, "translated DMA")?;
    let quiet = take_faults(s, domain)?;
    if quiet.total() != 0 {
        fail!(
            "{} fault(s) on a clean round trip: {:?}",
            quiet.total(),
            quiet.faults.first()
        )
    }
    Ok(Mapped {
        domain,
        source,
        destination,
    })
}

fn detach_and_free(s: &mut Session, sid: u32, domain: DomainId) -> Result<(), Failure> {
    s.detach(sid).or_else(|e| fail!("detach: {e}"))?;
    s.free_domain(domain).or_else(|e| fail!("free: {e}"))
}

fn single_stage(context: &mut Context, kind: DomainKind) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let mut s = start(context, &smmuv3::InitOptions::default())?;
    let has = match kind {
        DomainKind::Stage1 => s.features().stage1,
        _ => s.features().stage2,
    };
    if !has {
        fail!("the SMMU has no {kind}")
    }
    let m = round_trip(&mut s, &edu, sid, kind, 0x5d)?;
    println!(
        "  {} ({kind}): stream {sid:#x}; IOVA {IOVA_SOURCE:#x} -> PA {:#x} read, IOVA {IOVA_DESTINATION:#x} -> PA {:#x} written; {LEN} bytes both ways, verified",
        m.domain, m.source, m.destination
    );
    detach_and_free(&mut s, sid, m.domain)
}

/// `s1-dma`: edu reads and writes RAM through a stage-1 domain.
pub fn s1_dma(context: &mut Context) -> Result<(), Failure> {
    single_stage(context, DomainKind::Stage1)
}

/// `s2-dma`: edu reads and writes RAM through a stage-2 domain.
pub fn s2_dma(context: &mut Context) -> Result<(), Failure> {
    single_stage(context, DomainKind::Stage2)
}

/// Guest memory as the guest sees it: frames of one block from the pool, whose "physical" addresses are IPAs
/// (`ipa_base` + offset into the block). The guest's page-table code and its CD table come from here, so every
/// pointer in them is an IPA, which the hypervisor's stage 2 translates to the block.
pub(super) struct GuestMemory {
    pub(super) pa: u64,
    pub(super) ipa: u64,
    pub(super) size: u64,
    pub(super) next: core::sync::atomic::AtomicU64,
}

// SAFETY: blocks are disjoint, 4 KiB-aligned pieces of one zeroed, identity-mapped block this memory owns for the
// scenario's life; their "physical" address is the IPA the stage 2 maps onto them, which is what the guest's
// tables must hold.
unsafe impl FrameAllocator for GuestMemory {
    fn allocate_zeroed(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError> {
        if size == 0 || !align.is_power_of_two() {
            return Err(AllocError::BadRequest { size, align });
        }
        // Relaxed: a bump counter (each block is disjoint whoever wins); the blocks' contents are ordered by
        // whatever hands them to another CPU.
        let mut offset = 0;
        self.next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |next| {
                offset = next.next_multiple_of(align.max(4096) as u64);
                let end = offset + (size as u64).next_multiple_of(4096);
                (end <= self.size).then_some(end)
            })
            .map_err(|_| AllocError::OutOfMemory { size })?;
        let virt = core::ptr::NonNull::new((self.pa + offset) as *mut u8).ok_or(AllocError::OutOfMemory { size })?;
        // SAFETY: inside the block, which the pool zeroed and nothing else uses.
        unsafe { virt.as_ptr().write_bytes(0, size) };
        Ok(DmaBlock {
            phys: PhysAddr(self.ipa + offset),
            virt,
            size,
        })
    }

    unsafe fn free(&self, _block: DmaBlock) {
        // The block goes back with the scenario.
    }

    fn phys_to_virt(&self, phys: PhysAddr) -> Option<core::ptr::NonNull<u8>> {
        let offset = phys.0.checked_sub(self.ipa).filter(|o| *o < self.size)?;
        core::ptr::NonNull::new((self.pa + offset) as *mut u8)
    }
}

/// A guest's stage 1 over its memory: see [`guest_stage1`].
pub(super) struct GuestPages<'g> {
    pub(super) table: IoPageTable<&'g GuestMemory>,
    /// The page at [`IOVA_SOURCE`]: (IPA, PA).
    pub(super) source: (u64, u64),
    /// The page at [`IOVA_DESTINATION`]: (IPA, PA).
    pub(super) destination: (u64, u64),
}

/// A guest's stage 1 over `guest`: two zeroed data pages and a 4 KiB-granule table of 39 input bits and `ipa_bits`
/// output bits that maps [`IOVA_SOURCE`] and [`IOVA_DESTINATION`] to them.
pub(super) fn guest_stage1(guest: &GuestMemory, coherent: bool, ipa_bits: u8) -> Result<GuestPages<'_>, Failure> {
    let page = |g: &GuestMemory| {
        g.allocate_zeroed(4096, 4096)
            .map(|b| (b.phys.0, b.virt.as_ptr() as u64))
    };
    let (source, destination) = match (page(guest), page(guest)) {
        (Ok(a), Ok(b)) => (a, b),
        _ => fail!("guest memory exhausted"),
    };
    let format = Format {
        stage: Stage::One,
        granule: Granule::Size4K,
        input_bits: 39,
        output_bits: ipa_bits,
    };
    let mut table = IoPageTable::new(format, guest, coherent).or_else(|e| fail!("guest table: {e}"))?;
    for (iova, (ipa, _)) in [(IOVA_SOURCE, source), (IOVA_DESTINATION, destination)] {
        table
            .map(Iova(iova), PhysAddr(ipa), 4096, RW)
            .or_else(|e| fail!("guest map: {e}"))?;
    }
    Ok(GuestPages {
        table,
        source,
        destination,
    })
}

/// Where the guest's memory sits in its IPA space, and how much of it there is.
const GUEST_IPA: u64 = 0x8000_0000;
const GUEST_BYTES: u64 = 64 * 4096;

/// Warm rounds of each cost measurement.
const COST_ROUNDS: u64 = 8;

/// `nested-dma`: both stages on one stream, the stage 2 not the identity.
pub fn nested_dma(context: &mut Context) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let mut s = start(context, &smmuv3::InitOptions::default())?;
    let features = *s.features();
    if !features.nesting {
        fail!("the SMMU cannot nest (stages: {})", features.stages())
    }
    // Guest RAM: 64 frames at IPA 0x8000_0000, somewhere else physically.
    let guest_pa = match frames::alloc(GUEST_BYTES as usize, 4096) {
        Ok(a) => a as u64,
        Err(e) => fail!("{e}"),
    };
    if guest_pa == GUEST_IPA {
        fail!("the guest's block landed at PA {guest_pa:#x}, its own IPA: stage 2 would be the identity")
    }
    let guest = GuestMemory {
        pa: guest_pa,
        ipa: GUEST_IPA,
        size: GUEST_BYTES,
        next: core::sync::atomic::AtomicU64::new(0),
    };
    // The hypervisor's stage 2: guest IPAs -> the block. A 40-bit IPA space (a level-1 root of two concatenated
    // tables) where RAM lies below 1 TiB; where it lies higher (sbsa-ref) the whole output size from level 0, as
    // `pgtable-dma` does: with the 40-bit layout there QEMU 10.0 reports F_WALK_EABT for the guest's walks
    // (observed; it walks only the first table of a concatenated stage-2 root, see DESIGN.md).
    let ram_top = context.platform.memory.iter().map(|b| b.end() - 1).max().unwrap_or(0);
    let ipa_bits = if 64 - ram_top.leading_zeros() <= 40 {
        40.min(features.oas_bits)
    } else {
        features.oas_bits.min(48)
    };
    let parent = s
        .create_stage2(memory(), Stage2Options { input_bits: ipa_bits })
        .or_else(|e| fail!("create the stage-2 parent: {e}"))?;
    s.map(parent, Iova(GUEST_IPA), PhysAddr(guest_pa), GUEST_BYTES, RW)
        .or_else(|e| fail!("stage-2 map: {e}"))?;

    // The guest: its data pages, its stage-1 table and CD table, all in its memory (IPAs).
    let GuestPages {
        table: guest_table,
        source: (_, source_pa),
        destination: (destination_ipa, destination_pa),
    } = guest_stage1(&guest, features.coherent, ipa_bits)?;
    let guest_context = GuestContext::build(&features, &&guest, &guest_table, 7).or_else(|e| fail!("guest CD: {e}"))?;

    // The hypervisor's nested domain, from what the guest tells it.
    let nested = s
        .create_nested(parent, guest_context.stage1)
        .or_else(|e| fail!("nested domain: {e}"))?;
    s.attach(nested, sid).or_else(|e| fail!("attach: {e}"))?;
    // The cost of detach and attach (hitless STE writes and their syncs), warm: QEMU translates code on first use,
    // so the first round is left out.
    let (mut attach_ticks, mut detach_ticks) = (0, 0);
    for round in 0..=COST_ROUNDS {
        let t0 = time::ticks();
        s.detach(sid).or_else(|e| fail!("detach: {e}"))?;
        let t1 = time::ticks();
        s.attach(nested, sid).or_else(|e| fail!("attach: {e}"))?;
        let t2 = time::ticks();
        if round > 0 {
            detach_ticks += t1 - t0;
            attach_ticks += t2 - t1;
        }
    }

    fill(source_pa, pattern(0x21));
    fill(destination_pa, |_| 0xee);
    edu.dma(Direction::ToDevice, IOVA_SOURCE, 0, LEN as u64)
        .or_else(|e| fail!("RAM -> edu: {e}"))?;
    edu.dma(Direction::FromDevice, IOVA_DESTINATION, 0, LEN as u64)
        .or_else(|e| fail!("edu -> RAM: {e}"))?;
    check_landed(destination_pa, 0x21, 0xee, "nested DMA")?;
    println!(
        "  {nested} (nested in {parent}): stream {sid:#x}; IOVA {IOVA_DESTINATION:#x} -> IPA {destination_ipa:#x} -> PA {destination_pa:#x} (stage 2 not the identity); {LEN} bytes both ways, verified"
    );

    // Remap the stage 2 under the live stage 1: the destination's IPA now goes to another page.
    let alternate = page()?;
    fill(alternate, |_| 0);
    fill(destination_pa, |_| 0xee);
    // Warm rounds as above, ending on the alternate page: each change is an unmap (S2 TLBI, CMD_SYNC, the nested
    // domains' TLBI_NH_ALL, CMD_SYNC) and a map.
    let mut change_ticks = 0;
    let mut current = destination_pa;
    for round in 0..=2 * COST_ROUNDS {
        let next = if current == destination_pa {
            alternate
        } else {
            destination_pa
        };
        let t0 = time::ticks();
        s.unmap(parent, Iova(destination_ipa), 4096)
            .or_else(|e| fail!("stage-2 unmap: {e}"))?;
        s.map(parent, Iova(destination_ipa), PhysAddr(next), 4096, RW)
            .or_else(|e| fail!("stage-2 remap: {e}"))?;
        if round > 0 {
            change_ticks += time::ticks() - t0;
        }
        current = next;
    }
    if current != alternate {
        fail!("the remap rounds ended on the wrong page")
    }
    edu.dma(Direction::FromDevice, IOVA_DESTINATION, 0, LEN as u64)
        .or_else(|e| fail!("edu -> RAM: {e}"))?;
    check_landed(alternate, 0x21, 0, "DMA after the stage-2 remap")?;
    if (0..4096).any(|i| byte(destination_pa, i) != 0xee) {
        fail!("after the stage-2 remap the DMA still reached the old page PA {destination_pa:#x}")
    }
    println!(
        "  stage 2 remapped under the live stage 1: IPA {destination_ipa:#x} -> PA {alternate:#x}; the next DMA landed there"
    );
    let faults = take_faults(&mut s, nested)?;
    if faults.total() != 0 {
        fail!(
            "{} fault(s) in the nested domain: {:?}",
            faults.total(),
            faults.faults.first()
        )
    }

    s.detach(sid).or_else(|e| fail!("detach: {e}"))?;
    let ns = |ticks: u64, n: u64| time::to_us(ticks * 1000) / n;
    println!(
        "  cost (generic timer, mean of {COST_ROUNDS} warm rounds): attach {} ns, detach {} ns, stage-2 change under a nested domain (unmap + invalidation + map) {} ns",
        ns(attach_ticks, COST_ROUNDS),
        ns(detach_ticks, COST_ROUNDS),
        ns(change_ticks, 2 * COST_ROUNDS)
    );
    s.free_domain(nested).or_else(|e| fail!("free nested: {e}"))?;
    s.free_domain(parent).or_else(|e| fail!("free parent: {e}"))?;
    drop(guest_table);
    Ok(())
}

/// `unmapped-fault`: a write to an IOVA the domain does not map faults with F_TRANSLATION, in that domain's
/// report, for the right stream and address; the page behind it is untouched.
pub fn unmapped_fault(context: &mut Context) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let mut s = start(context, &smmuv3::InitOptions::default())?;
    let kind = preferred_kind(s.features());
    let domain = create(&mut s, kind)?;
    let source = page()?;
    s.map(domain, Iova(IOVA_SOURCE), PhysAddr(source), 4096, RW)
        .or_else(|e| fail!("map: {e}"))?;
    s.attach(domain, sid).or_else(|e| fail!("attach: {e}"))?;
    let canary = page()?;
    let n = expect_blocked_write(
        &mut s,
        &edu,
        domain,
        sid,
        IOVA_DESTINATION,
        canary,
        smmuv3::FaultKind::Translation,
    )?;
    println!(
        "  {domain} ({kind}): write to unmapped IOVA {IOVA_DESTINATION:#x} -> {n} F_TRANSLATION fault(s) for stream {sid:#x} in its report; canary intact"
    );
    detach_and_free(&mut s, sid, domain)
}

/// `readonly-fault`: a write through a read-only mapping faults with F_PERMISSION; reads still work.
pub fn readonly_fault(context: &mut Context) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let mut s = start(context, &smmuv3::InitOptions::default())?;
    let kind = preferred_kind(s.features());
    let domain = create(&mut s, kind)?;
    let page_pa = page()?;
    s.map(domain, Iova(IOVA_DESTINATION), PhysAddr(page_pa), 4096, RO)
        .or_else(|e| fail!("map: {e}"))?;
    s.attach(domain, sid).or_else(|e| fail!("attach: {e}"))?;
    let n = expect_blocked_write(
        &mut s,
        &edu,
        domain,
        sid,
        IOVA_DESTINATION,
        page_pa,
        smmuv3::FaultKind::Permission,
    )?;
    // A read-write page to see what edu holds: first it loads other bytes from there, so that only the read
    // through the read-only mapping can put the pattern in its buffer.
    let out_pa = page()?;
    s.map(domain, Iova(IOVA_SOURCE), PhysAddr(out_pa), 4096, RW)
        .or_else(|e| fail!("map: {e}"))?;
    fill(out_pa, |_| 0x11);
    edu.dma(Direction::ToDevice, IOVA_SOURCE, 0, LEN as u64)
        .or_else(|e| fail!("{e}"))?;
    fill(page_pa, pattern(0x44));
    edu.dma(Direction::ToDevice, IOVA_DESTINATION, 0, LEN as u64)
        .or_else(|e| fail!("read through the read-only mapping: {e}"))?;
    let quiet = take_faults(&mut s, domain)?;
    if quiet.total() != 0 {
        fail!("a read through a read-only mapping faulted: {:?}", quiet.faults.first())
    }
    // What edu read comes back out through the read-write page: the read really fetched the data.
    fill(out_pa, |_| 0xee);
    edu.dma(Direction::FromDevice, IOVA_SOURCE, 0, LEN as u64)
        .or_else(|e| fail!("{e}"))?;
    check_landed(out_pa, 0x44, 0xee, "the data read through the read-only mapping")?;
    println!(
        "  {domain} ({kind}): read-only IOVA {IOVA_DESTINATION:#x}: writes abort with {n} F_PERMISSION fault(s), reads fetch the page"
    );
    detach_and_free(&mut s, sid, domain)
}

/// `unmap-invalidate`: after `unmap` (which invalidates) the same IOVA faults and the page is untouched.
pub fn unmap_invalidate(context: &mut Context) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let mut s = start(context, &smmuv3::InitOptions::default())?;
    let kind = preferred_kind(s.features());
    let m = round_trip(&mut s, &edu, sid, kind, 0x61)?;
    let unmapped = s
        .unmap(m.domain, Iova(IOVA_DESTINATION), 4096)
        .or_else(|e| fail!("unmap: {e}"))?;
    if unmapped != 4096 {
        fail!("unmap reported {unmapped:#x} bytes")
    }
    let n = expect_blocked_write(
        &mut s,
        &edu,
        m.domain,
        sid,
        IOVA_DESTINATION,
        m.destination,
        smmuv3::FaultKind::Translation,
    )?;
    println!(
        "  {} ({kind}): DMA to IOVA {IOVA_DESTINATION:#x} verified, unmapped (with its invalidation), then {n} F_TRANSLATION fault(s) and PA {:#x} untouched",
        m.domain, m.destination
    );
    detach_and_free(&mut s, sid, m.domain)
}

/// `detach-aborts`: once detached, the stream aborts: its writes reach nothing (an aborting STE records no
/// event); attached again, it works again.
pub fn detach_aborts(context: &mut Context) -> Result<(), Failure> {
    let (edu, sid) = edu_stream(context)?;
    let mut s = start(context, &smmuv3::InitOptions::default())?;
    let kind = preferred_kind(s.features());
    let m = round_trip(&mut s, &edu, sid, kind, 0x17)?;
    s.detach(sid).or_else(|e| fail!("detach: {e}"))?;
    fill(m.destination, |_| 0xc3);
    edu.dma(Direction::FromDevice, IOVA_DESTINATION, 0, LEN as u64)
        .or_else(|e| fail!("{e}"))?;
    if (0..4096).any(|i| byte(m.destination, i) != 0xc3) {
        fail!("a detached stream's write reached PA {:#x}", m.destination)
    }
    s.attach(m.domain, sid).or_else(|e| fail!("attach again: {e}"))?;
    fill(m.destination, |_| 0xee);
    edu.dma(Direction::FromDevice, IOVA_DESTINATION, 0, LEN as u64)
        .or_else(|e| fail!("{e}"))?;
    check_landed(m.destination, 0x17, 0xee, "DMA after attaching again")?;
    println!(
        "  {} ({kind}): detached, stream {sid:#x}'s write aborted (canary intact); attached again, verified",
        m.domain
    );
    detach_and_free(&mut s, sid, m.domain)
}

/// The first two edu devices (in bus order), opened, with their StreamIDs: what `isolation` and `smp-dma` drive.
pub(super) fn two_edus(context: &Context, scenario: &str) -> Result<heapless::Vec<(Edu, u32), 2>, Failure> {
    let functions: heapless::Vec<&crate::pci::Function, 2> = edu_functions(context).take(2).collect();
    if functions.len() < 2 {
        fail!("{scenario} needs two edu devices (found {})", functions.len())
    }
    let mut devices = heapless::Vec::new();
    for f in functions {
        let edu = open_edu(context, f)?;
        let Some(sid) = context.platform.stream_id(edu.bdf().requester_id()) else {
            fail!("edu {} is not behind the SMMU", edu.bdf())
        };
        let _ = devices.push((edu, sid));
    }
    Ok(devices)
}

/// `isolation`: two edu devices in two domains. Each domain maps the same IOVA to its own page; each device's
/// write lands only on its own page; an IOVA that only the first domain maps faults for the second device, in the
/// second domain's report.
pub fn isolation(context: &mut Context) -> Result<(), Failure> {
    let devices = two_edus(context, "isolation")?;
    let mut s = start(context, &smmuv3::InitOptions::default())?;
    let kind = preferred_kind(s.features());
    let mut mapped: heapless::Vec<Mapped, 2> = heapless::Vec::new();
    for (i, (edu, sid)) in devices.iter().enumerate() {
        let _ = mapped.push(round_trip(&mut s, edu, *sid, kind, 0x30 + i as u8)?);
    }
    // The same IOVA, two pages: each device's write lands on its own.
    for (i, ((edu, _), m)) in devices.iter().zip(&mapped).enumerate() {
        for other in &mapped {
            fill(other.destination, |_| 0xee);
        }
        fill(m.source, pattern(0x70 + i as u8));
        edu.dma(Direction::ToDevice, IOVA_SOURCE, 0, LEN as u64)
            .or_else(|e| fail!("{e}"))?;
        edu.dma(Direction::FromDevice, IOVA_DESTINATION, 0, LEN as u64)
            .or_else(|e| fail!("{e}"))?;
        check_landed(m.destination, 0x70 + i as u8, 0xee, "own page")?;
        for (j, other) in mapped.iter().enumerate() {
            if j != i && (0..4096).any(|k| byte(other.destination, k) != 0xee) {
                fail!("edu {} wrote into the other domain's page", edu.bdf())
            }
        }
    }
    // An IOVA only the first domain maps: the second device faults, in the second domain.
    const ONLY_FIRST: u64 = 0x0bad_8000;
    let private = page()?;
    s.map(mapped[0].domain, Iova(ONLY_FIRST), PhysAddr(private), 4096, RW)
        .or_else(|e| fail!("map: {e}"))?;
    let (edu_b, sid_b) = &devices[1];
    let n = expect_blocked_write(
        &mut s,
        edu_b,
        mapped[1].domain,
        *sid_b,
        ONLY_FIRST,
        private,
        smmuv3::FaultKind::Translation,
    )?;
    let first = take_faults(&mut s, mapped[0].domain)?;
    if first.total() != 0 {
        fail!("the first domain got the second device's faults")
    }
    println!(
        "  {} (stream {:#x}) and {} (stream {:#x}), {kind}: the same IOVA reaches each device's own page; IOVA {ONLY_FIRST:#x} (mapped in the first only) -> {n} F_TRANSLATION fault(s) in the second domain, none in the first",
        mapped[0].domain, devices[0].1, mapped[1].domain, devices[1].1
    );
    for ((_, sid), m) in devices.iter().zip(&mapped) {
        detach_and_free(&mut s, *sid, m.domain)?;
    }
    Ok(())
}

/// `block-mappings`: 2 MiB and 1 GiB blocks (4 KiB granule), DMA at several offsets into them, and a partial unmap
/// that splits a 2 MiB block where IDR3.BBML = 2 (elsewhere the driver must refuse it).
pub fn block_mappings(context: &mut Context) -> Result<(), Failure> {
    const MIB2: u64 = 2 << 20;
    const GIB: u64 = 1 << 30;
    let (edu, sid) = edu_stream(context)?;
    let mut s = start(context, &smmuv3::InitOptions::default())?;
    let kind = preferred_kind(s.features());
    let domain = create(&mut s, kind)?;
    // 4 MiB of RAM, 2 MiB aligned: two 2 MiB blocks at IOVA 0x4000_0000.
    let buffer = match frames::alloc(2 * MIB2 as usize, MIB2 as usize) {
        Ok(a) => a as u64,
        Err(e) => fail!("{e}"),
    };
    const IOVA_2M: u64 = 0x4000_0000;
    s.map(domain, Iova(IOVA_2M), PhysAddr(buffer), 2 * MIB2, RW)
        .or_else(|e| fail!("map 2 MiB blocks: {e}"))?;
    // 1 GiB: the aligned GiB of RAM that holds the buffer, as one block at IOVA 256 GiB (inside 39 and 40 bits).
    let gib_pa = buffer & !(GIB - 1);
    let in_ram = context
        .platform
        .memory
        .iter()
        .any(|b| b.base <= gib_pa && gib_pa + GIB <= b.end());
    const IOVA_1G: u64 = 0x40_0000_0000;
    let gib = if in_ram {
        s.map(domain, Iova(IOVA_1G), PhysAddr(gib_pa), GIB, RW)
            .or_else(|e| fail!("map a 1 GiB block: {e}"))?;
        Some(gib_pa)
    } else {
        println!("  (no whole aligned GiB of RAM around the buffer: 1 GiB block skipped)");
        None
    };
    // The DMA source: one page at IOVA_SOURCE.
    let source = page()?;
    s.map(domain, Iova(IOVA_SOURCE), PhysAddr(source), 4096, RW)
        .or_else(|e| fail!("map: {e}"))?;
    let table = s.domain_table(domain).or_else(|e| fail!("{e}"))?;
    let tables = table.tables();
    // The tables themselves: the 4 MiB as two 2 MiB leaves, the GiB as one 1 GiB leaf (not pages).
    let (mut blocks_2m, mut blocks_1g) = (0, 0);
    table.walk(|m| {
        if m.size == MIB2 && (IOVA_2M..IOVA_2M + 2 * MIB2).contains(&m.iova) {
            blocks_2m += 1;
        } else if m.size == GIB && m.iova == IOVA_1G {
            blocks_1g += 1;
        }
    });
    // The table's read lock goes before the domain is used again.
    drop(table);
    if blocks_2m != 2 || blocks_1g != usize::from(gib.is_some()) {
        fail!("{blocks_2m} 2 MiB and {blocks_1g} 1 GiB leaves where the blocks were mapped")
    }
    s.attach(domain, sid).or_else(|e| fail!("attach: {e}"))?;
    // Writes at several offsets through the blocks: each lands at the matching PA.
    let mut offsets: heapless::Vec<(u64, u64), 8> = heapless::Vec::new();
    for offset in [0x1000, MIB2 - 0x1000, MIB2 + 0x3000, 2 * MIB2 - 0x1000] {
        let _ = offsets.push((IOVA_2M + offset, buffer + offset));
    }
    if let Some(gib_pa) = gib {
        let _ = offsets.push((IOVA_1G + (buffer - gib_pa) + 0x5000, buffer + 0x5000));
    }
    for (i, &(iova, pa)) in offsets.iter().enumerate() {
        fill(source, pattern(0x90 + i as u8));
        fill(pa, |_| 0xee);
        edu.dma(Direction::ToDevice, IOVA_SOURCE, 0, LEN as u64)
            .or_else(|e| fail!("{e}"))?;
        edu.dma(Direction::FromDevice, iova, 0, LEN as u64)
            .or_else(|e| fail!("{e}"))?;
        check_landed(pa, 0x90 + i as u8, 0xee, "DMA through a block")?;
    }
    println!(
        "  {domain} ({kind}): 4 MiB as 2 MiB blocks{} in {tables} table(s); DMA at {} offsets verified",
        if gib.is_some() {
            " and a GiB as one 1 GiB block"
        } else {
            ""
        },
        offsets.len()
    );
    // A partial unmap inside a 2 MiB block.
    let hole = IOVA_2M + MIB2 + 0x3000;
    match s.unmap(domain, Iova(hole), 4096) {
        Ok(_) if s.features().bbm_level != 2 => {
            fail!("a block was split with IDR3.BBML = {}", s.features().bbm_level)
        }
        Ok(_) => {
            let n = expect_blocked_write(
                &mut s,
                &edu,
                domain,
                sid,
                hole,
                buffer + MIB2 + 0x3000,
                smmuv3::FaultKind::Translation,
            )?;
            fill(buffer + MIB2 + 0x4000, |_| 0xee);
            fill(source, pattern(0xa5));
            edu.dma(Direction::ToDevice, IOVA_SOURCE, 0, LEN as u64)
                .or_else(|e| fail!("{e}"))?;
            edu.dma(Direction::FromDevice, hole + 0x1000, 0, LEN as u64)
                .or_else(|e| fail!("{e}"))?;
            check_landed(buffer + MIB2 + 0x4000, 0xa5, 0xee, "the page after the hole")?;
            println!(
                "  unmapped 4 KiB inside a 2 MiB block (split in place, IDR3.BBML = 2): {n} F_TRANSLATION fault(s) there, the next page still maps"
            );
        }
        Err(smmuv3::DomainError::Map(smmuv3::pgtable::MapError::WouldSplitBlock { .. }))
            if s.features().bbm_level != 2 =>
        {
            println!(
                "  partial unmap of a block refused: IDR3.BBML = {} (no split without break-before-make)",
                s.features().bbm_level
            );
        }
        Err(e) => fail!("partial unmap: {e}"),
    }
    detach_and_free(&mut s, sid, domain)
}
