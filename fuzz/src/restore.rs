//! The restore target: a real first image on the host (domains in handover arenas, streams attached, preserved,
//! prepared: the driver against a fake SMMU), then, per case, its region's records and the preserved memory (page
//! tables and CDs) mutated, a fresh driver restoring them, and an independent walker judging what got installed.
//!
//! The oracle: whatever `restore_handover` accepts, every walk the SMMU could make from every installed STE (its
//! CDs, their TTB0 and TTB1, the stage-2 table) reads tables only inside the extents of the domain whose record
//! names the stream (or substream), and every page or block it reaches lies inside the memory declared DMA-able,
//! through a non-global leaf wherever the stream's stage 1 is ASID-tagged (NS-EL1); every CD table an STE names
//! starts a frame that no other stream's CD table shares.
//! The walker interprets the STE and CD fields itself (T0SZ, TG0, EPD0/EPD1, S2T0SZ, S2SL0, S2TG, Config), as the
//! architecture defines them, and trusts nothing the driver's verifier computed; what it cannot interpret is a
//! failure. An unmutated region must be accepted.

use smmuv3::{Iova, PhysAddr};
use std::collections::{BTreeMap, HashSet};
use std::ptr::NonNull;
use std::sync::atomic::AtomicBool;

use smmuv3::handover::format::record_size;
use smmuv3::handover::format::sample::decode;
use smmuv3::handover::format::sample::{Rng, reseal};
use smmuv3::handover::pool::{HandoverPool, METADATA_BYTES};
use smmuv3::handover::restore::RestoreError;
use smmuv3::handover::verify::RestoreOptions;
use smmuv3::handover::{DomainRecord, Extent, InstanceRecords};
use smmuv3::pgtable::desc;
use smmuv3::{DomainId, GuestStage1, InitOptions, Iommu, Prot, Smmu, Stage1Options, Stage2Options};

#[path = "../../benches/common/mod.rs"]
mod common;

use common::{HeapFrames, fake_smmu};

/// The SMMU's register base as the records name it.
const REGISTER_BASE: u64 = 0x905_0000;
/// The region: 64 KiB of records and a pool of 4 MiB.
const REGION_BYTES: usize = METADATA_BYTES as usize + 16 * (256 << 10);
/// The region's physical base.
const REGION_PHYS: u64 = 0x80_0000_0000;
/// The memory devices may be given: 2 GiB at 32 GiB (every domain's pages and blocks lie there).
pub const DMA_MEMORY: [Extent; 1] = [Extent {
    base: 0x8_0000_0000,
    len: 0x8000_0000,
}];
/// StreamID bits of the stream table (linear: every STE is read by the oracle).
const SID_BITS: u8 = 8;
const RW: Prot = Prot::READ.union(Prot::WRITE).union(Prot::CACHEABLE);
/// Where the records start in the region (one instance).
const RECORDS_AT: usize = 96 + 64;

type Active = Iommu<&'static HeapFrames>;

/// The first image's region and preserved memory, and where its descriptors and CDs are.
pub struct World {
    region: NonNull<u8>,
    pool: &'static HandoverPool,
    frames: &'static HeapFrames,
    registers: usize,
    metadata: Vec<u8>,
    extents: Vec<(Extent, Vec<u8>)>,
    /// Physical addresses of the valid descriptors of every preserved table.
    descriptors: Vec<u64>,
    /// Physical addresses of the preserved CDs.
    cds: Vec<u64>,
    /// The tables' roots.
    roots: Vec<u64>,
    /// Records with a table: their byte offset in the region (format 3's records have variable lengths).
    tabled: Vec<usize>,
}

fn options() -> InitOptions {
    InitOptions {
        max_sid_bits: SID_BITS,
        ..InitOptions::default()
    }
}

impl World {
    /// Builds the first image: a 39-bit and a 48-bit stage-1 domain, a stage-2 domain with a 1 GiB block and a
    /// nested domain in it, with single-page unmaps that leave emptied, marked tables; all preserved, prepared.
    pub fn new() -> World {
        static STOP: AtomicBool = AtomicBool::new(false);
        static NEVER: AtomicBool = AtomicBool::new(false);
        let frames = HeapFrames::leaked();
        let registers = fake_smmu(&STOP, &NEVER);
        let memory: &'static mut [u64] = Box::leak(vec![0u64; REGION_BYTES / 8].into_boxed_slice());
        let region = NonNull::new(memory.as_mut_ptr().cast::<u8>()).unwrap();
        let pool: &'static HandoverPool = Box::leak(Box::new(HandoverPool::new()));
        let mut world = World {
            region,
            pool,
            frames,
            registers,
            metadata: Vec::new(),
            extents: Vec::new(),
            descriptors: Vec::new(),
            cds: Vec::new(),
            roots: Vec::new(),
            tabled: Vec::new(),
        };
        world.set_up_pool();
        let smmu = init(&world).unwrap();
        let base = DMA_MEMORY[0].base;
        let arena = || pool.take_memory().unwrap();
        let s1 = smmu
            .create_stage1(
                arena(),
                Stage1Options {
                    input_bits: 39,
                    el2: false,
                },
            )
            .unwrap();
        smmu.map(s1, Iova(0x1000), PhysAddr(base + 0x1000), 0x3000, RW).unwrap();
        smmu.map(s1, Iova(0x20_0000), PhysAddr(base + 0x20_0000), 0x20_0000, RW)
            .unwrap();
        smmu.map(s1, Iova(0x4000_0000), PhysAddr(base + 0x100_0000), 0x10_000, RW)
            .unwrap();
        smmu.map(s1, Iova(0x60_0000), PhysAddr(base + 0x60_0000), 0x1000, RW)
            .unwrap();
        smmu.unmap(s1, Iova(0x2000), 0x1000).unwrap();
        // Emptied by a single-page unmap: linked, counted 0, marked for the next trim.
        smmu.unmap(s1, Iova(0x60_0000), 0x1000).unwrap();
        smmu.attach(s1, 0x10).unwrap();
        let s1b = smmu
            .create_stage1(
                arena(),
                Stage1Options {
                    input_bits: 48,
                    el2: false,
                },
            )
            .unwrap();
        smmu.map(s1b, Iova(0x80_0000_0000), PhysAddr(base + 0x200_0000), 0x4000, RW)
            .unwrap();
        smmu.map(s1b, Iova(0x1000), PhysAddr(base + 0x300_0000), 0x1000, RW)
            .unwrap();
        smmu.attach(s1b, 0x28).unwrap();
        let s2 = smmu.create_stage2(arena(), Stage2Options { input_bits: 40 }).unwrap();
        smmu.map(s2, Iova(0x1000), PhysAddr(base + 0x400_0000), 0x2000, RW)
            .unwrap();
        smmu.map(s2, Iova(0x4000_0000), PhysAddr(base + 0x4000_0000), 0x4000_0000, RW)
            .unwrap();
        smmu.map(s2, Iova(0x80_0000), PhysAddr(base + 0x80_0000), 0x20_0000, RW)
            .unwrap();
        smmu.attach(s2, 0x20).unwrap();
        let guest = GuestStage1 {
            cd_table: 0x4800_0000,
            cd_max_log2: 0,
            layout: smmuv3::hw::ste::CdTableLayout::Linear,
            default_substream: smmuv3::hw::ste::DefaultSubstream::Terminate,
        };
        let nested = smmu.create_nested(s2, guest).unwrap();
        smmu.attach(nested, 0x18).unwrap();
        for (token, d) in [(1u64, s1), (2, s1b), (3, s2), (4, nested)] {
            smmu.preserve(d, token).unwrap();
        }
        smmu.prepare_handover(pool, REGISTER_BASE, 1, &DMA_MEMORY).unwrap();
        let mut buffer = vec![0u8; METADATA_BYTES as usize];
        let records = smmu.handover_records(REGISTER_BASE, &mut buffer).unwrap();
        world.roots = [s1, s1b, s2]
            .iter()
            .map(|&d: &DomainId| smmu.domain_table(d).unwrap().root().0)
            .collect();
        // The first image is gone without a trace, as after a reset.
        core::mem::forget(smmu);
        world.metadata = world.bytes(REGION_PHYS, METADATA_BYTES as usize).to_vec();
        let mut at = RECORDS_AT;
        for r in records.records.iter() {
            if r.table.is_some() {
                world.tabled.push(at);
            }
            at += record_size(&r);
            for e in &r.extents {
                let bytes = world.bytes(e.base, e.len as usize).to_vec();
                world.extents.push((e, bytes));
            }
            for s in r.streams.iter().filter(|s| s.cd_table != 0) {
                world.cds.push(s.cd_table + 64 * u64::from(s.ssid));
            }
        }
        // Every valid descriptor of every preserved table (the mutator's favourite targets), found by the oracle's
        // own walker over the unmutated memory.
        let metadata = world.metadata.clone();
        let decoded = decode(&metadata, pool.pool().unwrap()).unwrap();
        let instance = &decoded.instances[0];
        let mut descriptors = Vec::new();
        for r in instance.records.iter().filter(|r| r.table.is_some()) {
            let shape = r.table.unwrap();
            let (g, ia, start) = (shape.granule_log2, shape.input_bits, shape.start_level);
            let entries = 1usize << (ia - (g + (g - 3) * (3 - start)));
            let extents: Vec<Extent> = r.extents.iter().collect();
            let mut walker = Walker {
                world: &world,
                extents: &extents,
                seen: HashSet::new(),
                found: Some(&mut descriptors),
                tagged: r.kind == smmuv3::handover::RecordKind::Stage1,
            };
            walker.table(shape.root, start, entries, g).unwrap();
        }
        drop(decoded);
        world.descriptors = descriptors;
        world
    }

    fn set_up_pool(&self) {
        // SAFETY: the leaked region, used by nothing else: the previous "image" is forgotten.
        unsafe {
            self.pool.forget_previous_image();
            self.pool
                .set_up(
                    Extent {
                        base: REGION_PHYS,
                        len: REGION_BYTES as u64,
                    },
                    self.region,
                )
                .unwrap();
        }
    }

    fn smmu(&self) -> Smmu {
        // SAFETY: the fake SMMU's register block lives for the program.
        unsafe { Smmu::probe(NonNull::new(self.registers as *mut u8).unwrap(), 0x2_0000) }.unwrap()
    }

    /// The region bytes at `phys` (inside the region). Callers never hold two overlapping slices at once.
    #[allow(clippy::mut_from_ref)] // The memory is the leaked region's, not `self`'s.
    fn bytes(&self, phys: u64, len: usize) -> &mut [u8] {
        assert!(phys >= REGION_PHYS && phys - REGION_PHYS + len as u64 <= REGION_BYTES as u64);
        // SAFETY: inside the leaked region; cases run one at a time and no driver runs while the bytes are used.
        unsafe { std::slice::from_raw_parts_mut(self.region.as_ptr().add((phys - REGION_PHYS) as usize), len) }
    }

    /// The word at `phys`, if it lies in the region.
    fn word(&self, phys: u64) -> Option<u64> {
        let inside = phys >= REGION_PHYS && phys + 8 <= REGION_PHYS + REGION_BYTES as u64 && phys.is_multiple_of(8);
        inside.then(|| u64::from_le_bytes(self.bytes(phys, 8).try_into().unwrap()))
    }

    fn set_word(&self, phys: u64, value: u64) {
        self.bytes(phys, 8).copy_from_slice(&value.to_le_bytes());
    }

    /// Puts back what the first image left: the records and every preserved extent.
    fn reset(&self) {
        self.bytes(REGION_PHYS, METADATA_BYTES as usize)
            .copy_from_slice(&self.metadata);
        for (e, bytes) in &self.extents {
            self.bytes(e.base, e.len as usize).copy_from_slice(bytes);
        }
        self.set_up_pool();
    }

    /// An address a mutation may aim a descriptor, a root or a TTB at.
    fn target(&self, rng: &mut Rng) -> u64 {
        let page = |e: &Extent, rng: &mut Rng| e.base + (rng.below(e.len.max(4096) / 4096) << 12);
        match rng.below(8) {
            0 | 1 => {
                let (e, _) = &self.extents[rng.below(self.extents.len() as u64) as usize];
                page(e, rng)
            }
            2 => self.roots[rng.below(self.roots.len() as u64) as usize],
            3 => self.cds[rng.below(self.cds.len() as u64) as usize] & !0xfff,
            4 => REGION_PHYS + (rng.below(16) << 12),
            5 => DMA_MEMORY[0].base + (rng.below(DMA_MEMORY[0].len >> 12) << 12),
            6 => (DMA_MEMORY[0].base + DMA_MEMORY[0].len) + (rng.below(1 << 20) << 12),
            _ => rng.next_u64() & desc::OUTPUT_ADDRESS,
        }
    }

    /// A mutated copy of one descriptor.
    fn mutate_descriptor(&self, rng: &mut Rng, d: u64) -> u64 {
        match rng.below(12) {
            0 => d ^ 1 << rng.below(64),
            1 => d ^ 1 << (12 + rng.below(36)),
            2 | 3 => (d & !desc::OUTPUT_ADDRESS) | self.target(rng),
            4 => d ^ desc::VALID,
            5 => d ^ desc::TABLE_OR_PAGE,
            6 => {
                let n = desc::count(d);
                desc::with_count(d, if rng.chance(1, 2) { n + 1 } else { n.saturating_sub(1) })
            }
            7 => d ^ desc::SW_TABLE_FULL,
            8 => d ^ desc::SW_TRIM_CANDIDATE,
            9 => d | desc::CONTIGUOUS,
            10 => 0,
            _ => {
                let other = self.descriptors[rng.below(self.descriptors.len() as u64) as usize];
                self.word(other).unwrap_or(0)
            }
        }
    }

    /// Mutates the region's records and the preserved memory; false for an unmutated case.
    fn mutate(&self, rng: &mut Rng) -> bool {
        if rng.chance(1, 16) {
            return false;
        }
        for _ in 0..1 + rng.below(3) {
            match rng.below(12) {
                0..=5 => {
                    // A descriptor: mostly a valid one, sometimes any word of an extent.
                    let at = if rng.chance(4, 5) {
                        self.descriptors[rng.below(self.descriptors.len() as u64) as usize]
                    } else {
                        let (e, _) = &self.extents[rng.below(self.extents.len() as u64) as usize];
                        e.base + 8 * rng.below(e.len / 8)
                    };
                    let d = self.word(at).unwrap_or(0);
                    self.set_word(at, self.mutate_descriptor(rng, d));
                }
                6 | 7 => {
                    // A CD word: a bit, or TTB0 aimed elsewhere.
                    let cd = self.cds[rng.below(self.cds.len() as u64) as usize];
                    let w = rng.below(8);
                    let value = self.word(cd + 8 * w).unwrap_or(0);
                    let value = if w == 1 && rng.chance(1, 2) {
                        self.target(rng)
                    } else {
                        value ^ 1 << rng.below(64)
                    };
                    self.set_word(cd + 8 * w, value);
                }
                8 | 9 => {
                    // A consistent forgery: a record's root (or its counts) moved, the CD made to agree, and the
                    // CRC fixed, so that only the walk stands in the way.
                    let record = self.tabled[rng.below(self.tabled.len() as u64) as usize];
                    let meta = self.bytes(REGION_PHYS, METADATA_BYTES as usize);
                    let field = |o: usize| record + o;
                    if rng.chance(2, 3) {
                        let root = self.target(rng);
                        let old = u64::from_le_bytes(meta[field(32)..field(40)].try_into().unwrap());
                        meta[field(32)..field(40)].copy_from_slice(&root.to_le_bytes());
                        for &cd in &self.cds {
                            if self.word(cd + 8) == Some(old) {
                                self.set_word(cd + 8, root);
                            }
                        }
                    } else {
                        let o = if rng.chance(1, 2) { 44 } else { 46 };
                        let n = u16::from_le_bytes([meta[field(o)], meta[field(o) + 1]]);
                        let n = if rng.chance(1, 2) {
                            n.wrapping_add(1)
                        } else {
                            n.wrapping_sub(1)
                        };
                        meta[field(o)..field(o) + 2].copy_from_slice(&n.to_le_bytes());
                    }
                    reseal(meta);
                }
                10 => {
                    // The records' bytes: the format's own mutator, the CRC fixed or not.
                    let meta = self.bytes(REGION_PHYS, METADATA_BYTES as usize);
                    let len = u64::from_le_bytes(meta[16..24].try_into().unwrap()) as usize;
                    let len = len.min(meta.len());
                    let donor = meta[..len].to_vec();
                    let mut buf = meta[..len].to_vec();
                    buf.resize(smmuv3::handover::format::sample::BUFFER_SIZE, 0);
                    let n = smmuv3::handover::format::sample::mutate(&mut buf, len, &donor, rng);
                    let n = n.min(meta.len());
                    meta[..n].copy_from_slice(&buf[..n]);
                    if rng.chance(1, 2) {
                        reseal(meta);
                    }
                }
                _ => {
                    // A whole table page: zeroed, or another one copied over it.
                    let to = self.descriptors[rng.below(self.descriptors.len() as u64) as usize] & !0xfff;
                    let from = self.descriptors[rng.below(self.descriptors.len() as u64) as usize] & !0xfff;
                    let page: Vec<u8> = if rng.chance(1, 2) {
                        vec![0; 4096]
                    } else {
                        self.bytes(from, 4096).to_vec()
                    };
                    self.bytes(to, 4096).copy_from_slice(&page);
                }
            }
        }
        true
    }
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

/// Stage 1 (TG0 encoding already decoded to `g`): the starting level and the root's entries for `ia` input bits,
/// or `None` where the architecture faults the CD.
fn stage1_geometry(g: u8, ia: u8) -> Option<(u8, usize)> {
    let stride = g - 3;
    if !(25..=48).contains(&ia) || ia <= g {
        return None;
    }
    let levels = (ia - g).div_ceil(stride);
    if levels > 4 {
        return None;
    }
    let start = 4 - levels;
    let root_bits = ia - g - stride * (levels - 1);
    Some((start, 1 << root_bits))
}

/// Stage 2: the starting level S2SL0 selects and the root's entries (up to 16 concatenated tables), or `None` where
/// the architecture faults the STE.
fn stage2_geometry(g: u8, t0sz: u8, sl0: u8) -> Option<(u8, usize)> {
    let ia = 64u8.checked_sub(t0sz)?;
    let stride = g - 3;
    let start = match (g, sl0) {
        (12, 0) => 2,
        (12, 1) => 1,
        (12, 2) => 0,
        (_, 0) => 3,
        (_, 1) => 2,
        (_, 2) => 1,
        _ => return None,
    };
    let shift = g + stride * (3 - start);
    if !(25..=48).contains(&ia) || ia <= shift || ia - shift > stride + 4 {
        return None;
    }
    Some((start, 1 << (ia - shift)))
}

/// Whether a block may sit at `level` with granule `g` (without 52-bit addressing).
fn block_allowed(g: u8, level: u8) -> bool {
    match g {
        12 => level == 1 || level == 2,
        _ => level == 2,
    }
}

/// The independent walker: the tables a walk reads must lie in `extents`, the memory it reaches in DMA memory.
struct Walker<'a> {
    world: &'a World,
    extents: &'a [Extent],
    /// Tables walked already (a cycle or a shared table is walked once per level).
    seen: HashSet<(u64, u8)>,
    /// When set, collects the address of every valid descriptor (building the world).
    found: Option<&'a mut Vec<u64>>,
    /// An ASID-tagged (NS-EL1 stage-1) walk: every leaf must be non-global (nG, bit 11), or it would match every
    /// ASID and outlive the domain's ASID invalidation.
    tagged: bool,
}

impl Walker<'_> {
    fn inside_extents(&self, base: u64, len: u64) -> bool {
        self.extents.iter().any(|e| e.contains(base, len))
    }

    fn table(&mut self, table: u64, level: u8, entries: usize, g: u8) -> Result<(), String> {
        let bytes = entries as u64 * 8;
        if !self.inside_extents(table, bytes) {
            return Err(format!(
                "a level-{level} table at {table:#x} outside the domain's extents {:x?}",
                self.extents
            ));
        }
        if !self.seen.insert((table, level)) {
            return Ok(());
        }
        let stride = g - 3;
        for i in 0..entries as u64 {
            let at = table + 8 * i;
            let d = self
                .world
                .word(at)
                .ok_or_else(|| format!("table word {at:#x} outside the region"))?;
            if d & 1 == 0 {
                continue;
            }
            if let Some(found) = self.found.as_deref_mut() {
                found.push(at);
            }
            let shift = g + stride * (3 - level);
            if level == 3 {
                if d & 2 != 0 {
                    self.leaf(at, d, shift, g)?;
                }
            } else if d & 2 != 0 {
                if d & (0xf << 48) != 0 || (g == 16 && d & 0xf000 != 0) {
                    return Err(format!("table descriptor {at:#x} = {d:#x} with address bits [51:48]"));
                }
                let next = d & ((1 << 48) - 1) & !((1u64 << g) - 1);
                self.table(next, level + 1, 1 << stride, g)?;
            } else if block_allowed(g, level) {
                self.leaf(at, d, shift, g)?;
            }
        }
        Ok(())
    }

    fn leaf(&self, at: u64, d: u64, shift: u8, g: u8) -> Result<(), String> {
        if self.tagged && d & (1 << 11) == 0 {
            return Err(format!(
                "leaf {at:#x} = {d:#x} is global (nG = 0) in an ASID-tagged stage 1"
            ));
        }
        if d & desc::CONTIGUOUS != 0 {
            return Err(format!("leaf {at:#x} = {d:#x} with the contiguous hint"));
        }
        if d & (0xf << 48) != 0 || (g == 16 && d & 0xf000 != 0) {
            return Err(format!("leaf {at:#x} = {d:#x} with output bits [51:48]"));
        }
        let size = 1u64 << shift;
        let raw = d & ((1 << 48) - 1) & !0xfff;
        for output in [raw, raw & !(size - 1)] {
            if !DMA_MEMORY.iter().any(|e| e.contains(output, size)) {
                return Err(format!(
                    "leaf {at:#x} = {d:#x} reaches {output:#x}+{size:#x}, outside the DMA-able memory"
                ));
            }
        }
        Ok(())
    }
}

/// The record naming `(sid, ssid)`.
fn owner<'a>(instance: &InstanceRecords<'a>, sid: u32, ssid: u32) -> Option<DomainRecord<'a>> {
    instance
        .records
        .iter()
        .find(|r| r.streams.iter().any(|s| s.sid == sid && s.ssid == ssid))
}

/// The extents a record's tables must lie in (a nested record's stage 2 is its parent's).
fn extents_of(instance: &InstanceRecords<'_>, r: &DomainRecord<'_>) -> Vec<Extent> {
    match r.parent_token {
        Some(parent) => instance
            .records
            .iter()
            .find(|x| x.token == parent)
            .map_or(Vec::new(), |p| p.extents.iter().collect()),
        None => r.extents.iter().collect(),
    }
}

/// The oracle, over what `active` installed from the region as it now reads.
fn judge(world: &World, region: &[u8], active: &Active) -> Result<(), String> {
    // `region` is the region as the restore found it (a successful restore consumes its records). One that does
    // not decode (never written, or re-armed: restore accepts it and restores nothing) or that names no instance
    // of this SMMU: nothing may translate.
    let decoded = decode(region, world.pool.pool().unwrap()).ok();
    let none = InstanceRecords {
        identity: Default::default(),
        records: smmuv3::handover::Records::empty(),
    };
    let instance = decoded
        .as_ref()
        .and_then(|d| d.instances.iter().find(|i| i.identity.base == REGISTER_BASE))
        .unwrap_or(&none);
    let mut cd_tables: Vec<(u32, u64)> = Vec::new();
    for sid in 0..1u32 << SID_BITS {
        let ste = active.low_level().ste(sid).map_err(|e| format!("STE {sid:#x}: {e}"))?.0;
        if ste[0] & 1 == 0 {
            continue;
        }
        let config = (ste[0] >> 1) & 0b111;
        let (s1, s2) = match config {
            0b000 => continue,
            0b100 => return Err(format!("stream {sid:#x} bypasses")),
            0b101 => (true, false),
            0b110 => (false, true),
            0b111 => (true, true),
            _ => continue,
        };
        let Some(record) = owner(instance, sid, 0) else {
            return Err(format!("stream {sid:#x} translates, but no record names it"));
        };
        if s2 {
            let g = match (ste[2] >> 46) & 0b11 {
                0 => 12,
                1 => 16,
                2 => 14,
                _ => return Err(format!("stream {sid:#x}: S2TG reserved")),
            };
            let t0sz = ((ste[2] >> 32) & 0x3f) as u8;
            let sl0 = ((ste[2] >> 38) & 0b11) as u8;
            let (start, entries) = stage2_geometry(g, t0sz, sl0)
                .ok_or_else(|| format!("stream {sid:#x}: stage 2 S2T0SZ {t0sz} S2SL0 {sl0} not interpretable"))?;
            let root = ste[3] & ((1 << 52) - 1) & !0xf;
            let mut w = Walker {
                world,
                extents: &extents_of(instance, &record),
                seen: HashSet::new(),
                found: None,
                tagged: false,
            };
            w.table(root, start, entries, g)
                .map_err(|e| format!("stream {sid:#x} stage 2: {e}"))?;
        }
        if s1 && !s2 {
            let (fmt, cdmax) = ((ste[0] >> 4) & 0b11, (ste[0] >> 59) as u32);
            if fmt != 0 {
                return Err(format!("stream {sid:#x}: a 2-level CD table"));
            }
            let cd_table = ste[0] & ((1 << 52) - 1) & !0x3f;
            // A CD table is a block of its domain's arena: it starts a frame, and no other stream's STE names a
            // table in that frame (a detach would free it under the other).
            if cd_table % 4096 != 0 {
                return Err(format!(
                    "stream {sid:#x}: CD table {cd_table:#x} does not start a frame"
                ));
            }
            if let Some(other) = cd_tables.iter().find(|(_, t)| *t >> 12 == cd_table >> 12) {
                return Err(format!(
                    "streams {:#x} and {sid:#x} name CD tables in one frame ({:#x}, {cd_table:#x})",
                    other.0, other.1
                ));
            }
            cd_tables.push((sid, cd_table));
            // The stream's regime: STRW (STE word 1, bits [31:30]) = 0b10 is EL2 (no ASIDs), else NS-EL1.
            let tagged = (ste[1] >> 30) & 0b11 != 0b10;
            for ssid in 0..1u32 << cdmax {
                let cd_at = cd_table + 64 * u64::from(ssid);
                if !extents_of(instance, &record).iter().any(|e| e.contains(cd_at, 64)) {
                    return Err(format!(
                        "stream {sid:#x}: CD {ssid} at {cd_at:#x} outside its domain's extents"
                    ));
                }
                let cd: Vec<u64> = (0..8).map(|w| world.word(cd_at + 8 * w).unwrap_or(0)).collect();
                if cd[0] & (1 << 31) == 0 {
                    continue;
                }
                let Some(r) = owner(instance, sid, ssid) else {
                    return Err(format!("stream {sid:#x}: valid CD {ssid} that no record names"));
                };
                let halves = [
                    (
                        cd[0] & (1 << 14) == 0,
                        (cd[0] & 0x3f) as u8,
                        match (cd[0] >> 6) & 0b11 {
                            0 => Some(12),
                            1 => Some(16),
                            2 => Some(14),
                            _ => None,
                        },
                        cd[1],
                    ),
                    (
                        cd[0] & (1 << 30) == 0,
                        ((cd[0] >> 16) & 0x3f) as u8,
                        match (cd[0] >> 22) & 0b11 {
                            1 => Some(14),
                            2 => Some(12),
                            3 => Some(16),
                            _ => None,
                        },
                        cd[2],
                    ),
                ];
                for (n, (enabled, tsz, g, ttb)) in halves.into_iter().enumerate() {
                    if !enabled {
                        continue;
                    }
                    let g = g.ok_or_else(|| format!("stream {sid:#x} CD {ssid}: TG{n} reserved"))?;
                    let (start, entries) = stage1_geometry(g, 64u8.saturating_sub(tsz))
                        .ok_or_else(|| format!("stream {sid:#x} CD {ssid}: T{n}SZ {tsz} not interpretable"))?;
                    let root = ttb & ((1 << 52) - 1) & !0xf;
                    let mut w = Walker {
                        world,
                        extents: &extents_of(instance, &r),
                        seen: HashSet::new(),
                        found: None,
                        tagged,
                    };
                    w.table(root, start, entries, g)
                        .map_err(|e| format!("stream {sid:#x} CD {ssid} TTB{n}: {e}"))?;
                }
            }
        }
    }
    Ok(())
}

impl World {
    /// The records and preserved extents of restore case `index` of a run with `seed`, as mutated (what a failing
    /// case saves): the metadata area, then each preserved extent's bytes.
    pub fn mutated_region(&self, seed: u64, index: u64) -> Vec<u8> {
        let mut rng = Rng::new(case_seed(seed, index));
        self.reset();
        self.mutate(&mut rng);
        let mut out = self.bytes(REGION_PHYS, METADATA_BYTES as usize).to_vec();
        for (e, _) in &self.extents {
            out.extend_from_slice(self.bytes(e.base, e.len as usize));
        }
        out
    }
}

/// The generator seed of case `index` of a run with `seed`.
fn case_seed(seed: u64, index: u64) -> u64 {
    seed ^ index.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x7e57_0000
}

/// The name of a refusal, for the statistics (from its `Debug` form: robust to new variants).
fn refusal(e: &RestoreError) -> String {
    let debug = format!("{e:?}");
    let head: String = debug.chars().take_while(|c| c.is_alphanumeric()).collect();
    let inner = match e {
        RestoreError::Verify { what, .. } => format!("{what:?}"),
        RestoreError::Region(what) => format!("{what:?}"),
        RestoreError::Rebuild { what, .. } => format!("{what:?}"),
        _ => String::new(),
    };
    let inner: String = inner.chars().take_while(|c| c.is_alphanumeric()).collect();
    if inner.is_empty() {
        head
    } else {
        format!("{head}:{inner}")
    }
}

/// What the restore target did.
#[derive(Clone, Debug, Default)]
pub struct RestoreStats {
    /// Cases run.
    pub execs: u64,
    /// Restores accepted (and judged).
    pub accepted: u64,
    /// Refusals by error (and verification failure) variant.
    pub refused: BTreeMap<String, u64>,
}

/// Runs restore case `index` of a run with `seed`: `Err` says why it failed.
pub fn run_case(world: &World, seed: u64, index: u64, stats: &mut RestoreStats) -> Result<(), String> {
    let mut rng = Rng::new(case_seed(seed, index));
    world.reset();
    let mutated = world.mutate(&mut rng);
    stats.execs += 1;
    let active = init(world)?;
    let region = world.bytes(REGION_PHYS, METADATA_BYTES as usize).to_vec();
    match active.restore_handover(world.pool, REGISTER_BASE, &RestoreOptions::new(&DMA_MEMORY)) {
        Ok(_) => {
            stats.accepted += 1;
            if let Err(why) = judge(world, &region, &active) {
                // Its tables may be anything: never dropped.
                core::mem::forget(active);
                return Err(format!("accepted, but {why}"));
            }
        }
        Err(e) if !mutated => {
            core::mem::forget(active);
            return Err(format!("refused the unmutated region: {e}"));
        }
        Err(e) => *stats.refused.entry(refusal(&e)).or_default() += 1,
    }
    // A shutdown that times out waited on the fake SMMU thread, not on the driver: its memory is leaked, as the
    // driver does then, and the case stands.
    let _ = active.shutdown(false);
    Ok(())
}

/// A fresh driver over the fake SMMU. The fake is a thread on a shared host: a handshake that times out because
/// it was descheduled is tried again (up to 5 times) rather than reported as the driver's failure.
fn init(world: &World) -> Result<Active, String> {
    let mut last = String::new();
    for _ in 0..5 {
        match world.smmu().init(world.frames, &options()) {
            Ok(active) => return Ok(active),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!("init: {last}"))
}
