//! `virtio-dma`: a second real DMA master. A virtio-blk device (`iommu_platform=on`, so QEMU sends its DMA through
//! the SMMU) does real disk I/O through a domain, as a hypervisor would set it up: a stage-1 domain (stage 2 where
//! the SMMU has no stage 1) maps one DMA arena at an IOVA far from its physical address, the device's StreamID is
//! attached, and virtio-drivers drives the device with the device addresses [`ArenaHal`] hands out, which are IOVAs.
//! The scenario reads a sector the host pre-filled, writes sectors with a pattern and reads them back, then unmaps
//! the arena and shows that the next request faults in the domain's fault report; it detaches and frees the domain.
//!
//! Contract with the host (`tests/harness`): the disk image holds [`host_byte`] in sector [`HOST_SECTOR`]; the
//! scenario writes [`written_byte`] to [`WRITE_COUNT`] sectors from [`WRITE_SECTOR`] on.

use core::fmt::Write;
use smmuv3::{Iova, PhysAddr};

use smmuv3::{InitOptions, Prot, Stage1Options, Stage2Options};
use virtio_drivers::device::blk::{BlkReq, BlkResp, SECTOR_SIZE};

use super::core_smmu::{Session, start};
use super::{Context, Failure};
use crate::frames::{self, Frames};
use crate::pci::Function;
use crate::virtio::{self, Arena, ArenaHal, Block};
use crate::{println, time};

/// The sector the host pre-fills with [`host_byte`].
pub const HOST_SECTOR: usize = 100;
/// The first sector the scenario writes.
pub const WRITE_SECTOR: usize = 8;
/// Sectors written (and read back) in one request.
pub const WRITE_COUNT: usize = 4;
/// Where the device sees the arena: in low memory, outside every PCI window of both boards (so that no bridge of a
/// real topology would claim it as peer-to-peer) and far from RAM (virt 1 GiB, sbsa-ref 1 TiB).
pub const IOVA_BASE: u64 = 0x0100_0000;
/// The DMA arena: [`virtio::RING_PAGES`] pages of rings, the rest bounce buffers.
const ARENA_BYTES: u64 = 128 * 1024;
/// How long one request may take.
const REQUEST_US: u64 = 2_000_000;
/// How long the faulting request is given to (not) complete.
const FAULT_WAIT_US: u64 = 200_000;

/// Byte `i` of sector [`HOST_SECTOR`] as the host wrote it: a signature, then a counting pattern.
pub fn host_byte(i: usize) -> u8 {
    const SIGNATURE: &[u8; 16] = b"smmuv3 host disk";
    match SIGNATURE.get(i) {
        Some(&b) => b,
        None => (i as u8).wrapping_mul(29).wrapping_add(0x47) ^ ((i >> 8) as u8),
    }
}

/// Byte `i` of sector `sector` as the scenario writes it.
pub fn written_byte(sector: usize, i: usize) -> u8 {
    (i as u8).wrapping_mul(7) ^ ((i >> 8) as u8).wrapping_mul(0x5f) ^ (sector as u8).wrapping_mul(0x3b) ^ 0xa5
}

/// Domains' tables come from the frame pool.
static FRAMES: Frames = Frames;

fn block_function<'a>(context: &'a Context) -> Result<&'a Function, Failure> {
    match context
        .functions
        .iter()
        .find(|f| f.vendor == virtio::VENDOR && virtio::BLOCK_DEVICES.contains(&f.device))
    {
        Some(f) => Ok(f),
        None => fail!(
            "no virtio-blk device (1af4:1042) on any PCI bus; start QEMU with -device virtio-blk-pci,iommu_platform=on"
        ),
    }
}

/// Waits for the request `token` to complete.
fn wait(blk: &mut Block, token: u16, what: &str) -> Result<(), Failure> {
    let deadline = time::deadline_us(REQUEST_US);
    loop {
        match blk.peek_used() {
            Some(t) if t == token => return Ok(()),
            Some(t) => fail!("{what}: request {t} completed, expected {token}"),
            None if time::expired(deadline) => fail!("{what}: no completion within {REQUEST_US} us"),
            None => core::hint::spin_loop(),
        }
    }
}

/// Reads `buffer.len() / SECTOR_SIZE` sectors from `sector` on, bounded in time.
fn read(blk: &mut Block, sector: usize, buffer: &mut [u8]) -> Result<(), Failure> {
    let mut request = BlkReq::default();
    let mut response = BlkResp::default();
    // SAFETY: `request`, `buffer` and `response` are not touched until the request completes below (or, on a
    // timeout, ever again by the device: `ArenaHal` bounced them, so the device only sees the arena).
    let token = unsafe { blk.read_blocks_nb(sector, &mut request, buffer, &mut response) }
        .or_else(|e| fail!("read of sector {sector}: {e}"))?;
    wait(blk, token, "read")?;
    // SAFETY: the same buffers as given to `read_blocks_nb` for `token`.
    unsafe { blk.complete_read_blocks(token, &request, buffer, &mut response) }
        .or_else(|e| fail!("read of sector {sector}: {e}"))
}

/// Writes `buffer` to the sectors from `sector` on, bounded in time.
fn write(blk: &mut Block, sector: usize, buffer: &[u8]) -> Result<(), Failure> {
    let mut request = BlkReq::default();
    let mut response = BlkResp::default();
    // SAFETY: as in `read`.
    let token = unsafe { blk.write_blocks_nb(sector, &mut request, buffer, &mut response) }
        .or_else(|e| fail!("write of sector {sector}: {e}"))?;
    wait(blk, token, "write")?;
    // SAFETY: the same buffers as given to `write_blocks_nb` for `token`.
    unsafe { blk.complete_write_blocks(token, &request, buffer, &mut response) }
        .or_else(|e| fail!("write of sector {sector}: {e}"))
}

/// Drains the event queue into the domains' reports; fails on a fault of a stream attached to no domain, or a
/// global error.
fn drain(s: &mut Session, what: &str) -> Result<(), Failure> {
    s.drain_faults(|_| {}).or_else(|e| fail!("{what}: {e}"))?;
    let unattached = s.unattached_faults().total();
    if unattached != 0 {
        fail!(
            "{what}: {unattached} fault(s) of unattached streams, the first {:?}",
            s.unattached_faults().faults.first()
        )
    }
    match s.handle_global_errors() {
        Ok(errors) if errors.is_empty() => Ok(()),
        Ok(errors) => fail!("{what}: global errors {errors}"),
        Err(e) => fail!("{what}: {e}"),
    }
}

/// `virtio-dma`.
pub fn virtio_dma(context: &mut Context) -> Result<(), Failure> {
    let function = *block_function(context)?;
    let bdf = function.bdf;
    let rid = bdf.requester_id();
    let Some(sid) = context.platform.stream_id(rid) else {
        fail!("virtio-blk {bdf} (requester ID {rid:#x}) is not behind the SMMU (iommu-map)")
    };
    let mut s = start(context, &InitOptions::default())?;
    let features = *s.features();
    let domain = if features.stage1 {
        s.create_stage1(&FRAMES, Stage1Options::default())
    } else if features.stage2 {
        s.create_stage2(
            &FRAMES,
            Stage2Options {
                input_bits: 40.min(features.oas_bits),
            },
        )
    } else {
        fail!("the SMMU translates at no stage")
    }
    .or_else(|e| fail!("create domain: {e}"))?;
    let kind = s.domain_kind(domain).or_else(|e| fail!("{e}"))?;
    let pa = match frames::alloc(ARENA_BYTES as usize, frames::FRAME_SIZE) {
        Ok(pa) => pa as u64,
        Err(e) => fail!("DMA arena: {e}"),
    };
    if pa == IOVA_BASE {
        fail!("the arena's PA {pa:#x} equals its IOVA: the test would not prove translation")
    }
    s.map(
        domain,
        Iova(IOVA_BASE),
        PhysAddr(pa),
        ARENA_BYTES,
        Prot::READ | Prot::WRITE | Prot::CACHEABLE,
    )
    .or_else(|e| fail!("map the arena: {e}"))?;
    match s.iova_to_phys(domain, Iova(IOVA_BASE)) {
        Ok(Some(out)) if out == PhysAddr(pa) => {}
        other => fail!("the domain translates IOVA {IOVA_BASE:#x} to {other:?}, not PA {pa:#x}"),
    }
    s.attach(domain, sid).or_else(|e| fail!("attach {sid:#x}: {e}"))?;
    let Some(ecam) = context.ecam else {
        fail!("virtio-blk at {bdf} was found without a PCI host")
    };
    ecam.enable_memory_and_bus_master(bdf);

    let arena = Arena {
        pa,
        iova: IOVA_BASE,
        size: ARENA_BYTES,
    };
    // SAFETY: the arena was just taken from the frame pool (identity-mapped RAM used by nothing else) and is never
    // returned to it; the device using it is dropped (and so reset) before `hal`, declared first.
    let hal = unsafe { ArenaHal::install(arena) }.or_else(|e| fail!("{e}"))?;
    let transport = virtio::transport(ecam, bdf).or_else(|e| fail!("virtio-blk {bdf}: {e}"))?;
    let mut blk = Block::new(transport).or_else(|e| fail!("virtio-blk {bdf} init: {e}"))?;
    let capacity = blk.capacity();
    if capacity <= HOST_SECTOR as u64 || blk.readonly() {
        fail!(
            "virtio-blk {bdf}: {capacity} sectors{}; the scenario needs a writable disk of more than {HOST_SECTOR}",
            if blk.readonly() { ", read-only" } else { "" }
        )
    }

    // What the host wrote reaches RAM through the domain.
    let mut sector = [0u8; SECTOR_SIZE];
    read(&mut blk, HOST_SECTOR, &mut sector)?;
    if let Some(i) = (0..SECTOR_SIZE).find(|&i| sector[i] != host_byte(i)) {
        fail!(
            "sector {HOST_SECTOR} byte {i} reads {:#x}, the host wrote {:#x}",
            sector[i],
            host_byte(i)
        )
    }
    // A pattern written through the domain, read back into another buffer.
    let mut out = [0u8; WRITE_COUNT * SECTOR_SIZE];
    for (i, b) in out.iter_mut().enumerate() {
        *b = written_byte(WRITE_SECTOR + i / SECTOR_SIZE, i % SECTOR_SIZE);
    }
    write(&mut blk, WRITE_SECTOR, &out)?;
    let mut back = [0x5au8; WRITE_COUNT * SECTOR_SIZE];
    read(&mut blk, WRITE_SECTOR, &mut back)?;
    if let Some(i) = (0..back.len()).find(|&i| back[i] != out[i]) {
        fail!(
            "sector {} byte {} reads back {:#x}, written {:#x}",
            WRITE_SECTOR + i / SECTOR_SIZE,
            i % SECTOR_SIZE,
            back[i],
            out[i]
        )
    }
    drain(&mut s, "after the I/O")?;
    let clean = s.domain_faults(domain).map(|r| r.total()).unwrap_or(u32::MAX);
    if clean != 0 {
        fail!("{clean} fault(s) in the domain during the I/O")
    }
    let stats = hal.stats();
    println!(
        "virtio-blk {bdf}: StreamID {sid:#x}, {kind} domain ({domain}), IOVA {IOVA_BASE:#x}..{:#x} -> PA {pa:#x}; \
         sector {HOST_SECTOR} from the host verified; {WRITE_COUNT} sectors written at {WRITE_SECTOR}, \
         {WRITE_COUNT} read back, verified",
        IOVA_BASE + ARENA_BYTES
    );
    println!(
        "  {capacity} sectors; {} ring allocation(s), {} buffer(s) bounced ({} bytes), no fault",
        stats.allocations, stats.shared, stats.bounced_bytes
    );

    // Unmapped, the device's next request faults in the domain's report and never completes.
    let unmapped = s
        .unmap(domain, Iova(IOVA_BASE), ARENA_BYTES)
        .or_else(|e| fail!("unmap the arena: {e}"))?;
    let mut request = BlkReq::default();
    let mut response = BlkResp::default();
    // SAFETY: the buffers are never touched again by the driver (the request is abandoned and the device reset
    // when `blk` is dropped below); the device could only reach the arena, which stays allocated.
    let token = unsafe { blk.read_blocks_nb(WRITE_SECTOR, &mut request, &mut sector, &mut response) }
        .or_else(|e| fail!("request after the unmap: {e}"))?;
    let deadline = time::deadline_us(FAULT_WAIT_US);
    while !time::expired(deadline) {
        if blk.peek_used() == Some(token) {
            fail!("the request completed though its rings and buffers were unmapped")
        }
        core::hint::spin_loop();
    }
    // Reset the device (dropping its transport) before the arena goes.
    drop(blk);
    drop(hal);
    drain(&mut s, "after the unmap")?;
    let report = s.domain_faults(domain).or_else(|e| fail!("{e}"))?.clone();
    let in_arena = |a: Option<u64>| a.is_some_and(|a| (IOVA_BASE..IOVA_BASE + ARENA_BYTES).contains(&a));
    let expected = report
        .faults
        .iter()
        .filter(|f| f.kind == smmuv3::FaultKind::Translation && f.stream == sid && in_arena(f.address))
        .count();
    if expected == 0 || expected != report.faults.len() {
        fail!(
            "after the unmap: {expected} F_TRANSLATION in the arena among {} fault(s) {:?}",
            report.total(),
            report.faults
        )
    }
    if let Some(first) = report.faults.first() {
        println!(
            "  arena unmapped ({unmapped:#x} bytes): the next request never completed; the domain reported {} fault(s), \
             the first {first}",
            report.total()
        );
    }
    s.detach(sid).or_else(|e| fail!("detach {sid:#x}: {e}"))?;
    s.free_domain(domain).or_else(|e| fail!("free domain: {e}"))?;
    if s.domain_faults(domain).is_ok() {
        fail!("{domain} still answers after free_domain")
    }
    drain(&mut s, "after the free")?;
    println!("  {kind} domain detached and freed; its handle is stale");
    Ok(())
}
