//! Tokens, deferred unmaps and trims, failed detaches, and handover arenas as domain memory.

use super::*;
use crate::Iova;

/// A handover pool over leaked host memory, for domains to preserve.
pub(super) fn handover_pool() -> &'static crate::handover::pool::HandoverPool {
    use crate::handover::pool::{HandoverPool, METADATA_BYTES};
    let bytes = METADATA_BYTES as usize + (4 << 20);
    let memory: &'static mut [u64] = std::boxed::Box::leak(std::vec![0u64; bytes / 8].into_boxed_slice());
    let pool: &'static HandoverPool = std::boxed::Box::leak(std::boxed::Box::new(HandoverPool::new()));
    let region = crate::mem::Extent {
        base: 0x80_0000_0000,
        len: bytes as u64,
    };
    // SAFETY: leaked, zeroed, used by nothing else.
    unsafe { pool.set_up(region, core::ptr::NonNull::new(memory.as_mut_ptr().cast()).unwrap()) }.unwrap();
    pool
}

#[test]
fn tokens_collide_in_the_index_and_preservation_never_outlives_its_domain() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let pool = handover_pool();
    let arena: DomainMemory = pool.take_memory().unwrap();
    let a = smmu
        .create_stage1(
            arena,
            Stage1Options {
                input_bits: 39,
                el2: false,
            },
        )
        .unwrap();
    let parent = smmu
        .create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 40 })
        .unwrap();
    let ordinary = s1(&mut smmu, frames);
    // Ordinary memory would not survive.
    assert_eq!(
        smmu.preserve(ordinary, 9),
        Err(DomainError::NotHandoverMemory(ordinary))
    );
    smmu.preserve(a, 0xa).unwrap();
    assert_eq!(smmu.preserved(0xa), Some(a));
    assert_eq!(smmu.token_of(a), Ok(Some(0xa)));
    // Collision: nothing changes.
    assert_eq!(
        smmu.preserve(parent, 0xa),
        Err(DomainError::TokenInUse { token: 0xa, domain: a })
    );
    assert_eq!(smmu.token_of(parent), Ok(None));
    assert_eq!(
        smmu.preserve(a, 0xb),
        Err(DomainError::AlreadyPreserved { domain: a, token: 0xa })
    );
    // A nested domain needs its parent preserved first.
    let nested = smmu.create_nested(parent, GUEST).unwrap();
    assert_eq!(
        smmu.preserve(nested, 0xc),
        Err(DomainError::ParentNotPreserved { domain: nested, parent })
    );
    smmu.preserve(parent, 0x5).unwrap();
    smmu.preserve(nested, 0xc).unwrap();
    assert_eq!(
        smmu.unpreserve(0x5),
        Err(DomainError::NestedStillPreserved { token: 0x5 })
    );
    // A preserved domain stays usable.
    smmu.map(a, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    smmu.attach(a, SID).unwrap();
    smmu.unmap(a, Iova(0x1000), 0x1000).unwrap();
    smmu.detach(SID).unwrap();
    // Freeing a preserved domain is refused; after unpreserve the token is gone and free works.
    assert_eq!(
        smmu.free_domain(a),
        Err(DomainError::Preserved { domain: a, token: 0xa })
    );
    assert_eq!(smmu.unpreserve(0xa), Ok(a));
    assert_eq!(smmu.preserved(0xa), None);
    assert_eq!(smmu.unpreserve(0xa), Err(DomainError::UnknownToken(0xa)));
    smmu.free_domain(a).unwrap();
    // The token is free for another domain.
    let b = smmu
        .create_stage1(pool.take_memory().unwrap(), Stage1Options::default())
        .unwrap();
    smmu.preserve(b, 0xa).unwrap();
    assert_eq!(smmu.preserved(0xa), Some(b));
    assert_eq!(smmu.unpreserve(0xc), Ok(nested));
    assert_eq!(smmu.unpreserve(0x5), Ok(parent));
}

#[test]
fn deferred_unmaps_invalidate_only_at_sync_and_trim_frees_emptied_tables() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let d = s1(&mut smmu, frames);
    smmu.map(d, Iova(0x20_0000), PhysAddr(0x8000_0000), 0x1000, RW).unwrap();
    smmu.map(d, Iova(0x40_0000), PhysAddr(0x8000_1000), 0x1000, RW).unwrap();
    let tables = smmu.domain_table(d).unwrap().tables();
    let before = consumed(&model);
    let mut gather = Gather::default();
    assert_eq!(smmu.unmap_deferred(d, Iova(0x20_0000), 0x1000, &mut gather), Ok(0x1000));
    assert_eq!(since(&model, before), [0u8; 0], "nothing issued before the sync");
    smmu.sync_domain(d, &mut gather).unwrap();
    assert_eq!(since(&model, before), [opcode::TLBI_NH_VA, opcode::SYNC]);
    // The single-page unmap left its last-level table linked (empty) until a trim.
    assert_eq!(smmu.domain_table(d).unwrap().tables(), tables);
    let before = consumed(&model);
    assert_eq!(smmu.trim_domain(d), Ok(1));
    assert_eq!(smmu.domain_table(d).unwrap().tables(), tables - 1);
    let ops = since(&model, before);
    assert_eq!(ops.last(), Some(&opcode::SYNC));
    assert!(
        ops.contains(&opcode::TLBI_NH_VA) || ops.contains(&opcode::TLBI_NH_ASID),
        "{ops:?}"
    );
    assert_eq!(
        smmu.iova_to_phys(d, Iova(0x40_0000)),
        Ok(Some(PhysAddr(0x8000_1000))),
        "the other mapping stays"
    );
    assert_eq!(smmu.trim_domain(d), Ok(0), "nothing left to trim");
}

#[test]
fn a_failed_detach_keeps_the_stream_so_its_domain_cannot_be_freed_under_it() {
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = smmu(&model, frames);
    let d = s1(&mut smmu, frames);
    smmu.attach(d, SID).unwrap();
    model.refuse.store(opcode::CFGI_STE, Ordering::SeqCst);
    assert!(matches!(smmu.detach(SID), Err(DomainError::Attach(_))));
    assert_eq!(smmu.attached(d).as_deref(), Ok(&[(SID, 0)][..]), "still recorded");
    assert!(matches!(smmu.free_domain(d), Err(DomainError::StillAttached { .. })));
    model.refuse.store(0, Ordering::SeqCst);
    smmu.detach(SID).unwrap();
    smmu.free_domain(d).unwrap();
    // A failed attach records the stream, so detach can clean up and free waits for it.
    let d = s1(&mut smmu, frames);
    model.refuse.store(opcode::CFGI_STE, Ordering::SeqCst);
    assert!(matches!(smmu.attach(d, SID), Err(DomainError::Attach(_))));
    assert!(matches!(smmu.free_domain(d), Err(DomainError::StillAttached { .. })));
    model.refuse.store(0, Ordering::SeqCst);
    smmu.detach(SID).unwrap();
    smmu.free_domain(d).unwrap();
}

#[test]
fn a_handover_arena_serves_one_domain() {
    let frames = frames();
    let model = Model::start(frames);
    let smmu = smmu(&model, frames);
    let pool = handover_pool();
    let arena = pool.take_memory().unwrap();
    let d = smmu.create_stage1(arena, Stage1Options::default()).unwrap();
    let used = arena.frames();
    assert_eq!(
        smmu.create_stage2(arena, Stage2Options { input_bits: 40 }),
        Err(DomainError::MemoryOwned)
    );
    assert_eq!(smmu.vmids_in_use(), 0, "the refused creation gave its VMID back");
    assert_eq!(
        arena.frames(),
        used,
        "the refused creation allocated nothing from the arena"
    );
    // A creation that fails after the claim gives the claim back: the arena still serves a domain.
    let other = pool.take_memory().unwrap();
    assert!(matches!(
        smmu.create_stage1(
            other,
            Stage1Options {
                input_bits: 70,
                el2: false
            }
        ),
        Err(DomainError::Map(_))
    ));
    let e = smmu.create_stage1(other, Stage1Options::default()).unwrap();
    smmu.free_domain(e).unwrap();
    smmu.free_domain(d).unwrap();
    assert_eq!(pool.memories_in_use(), 0, "freeing the owner retires the arena");
}

/// The SMMU's own memory is its alone: an arena holding its stream table and queues serves no domain (whose
/// free would retire the arena, handing it out again under the SMMU), an arena a domain owns cannot hold an
/// SMMU's structures, and a shutdown gives the arena up.
#[test]
fn an_arena_holding_the_smmus_own_structures_serves_no_domain() {
    let frames = frames();
    let pool = handover_pool();
    let region = pool.region().unwrap();
    let model = Model::start(frames);
    *model.window.lock().unwrap() = Some((region.base, pool.metadata_address().unwrap() as usize, region.len));
    let owned = pool.take_memory().unwrap();
    let first = smmu(&model, frames);
    let d = first.create_stage1(owned, Stage1Options::default()).unwrap();
    drop(first);
    assert_eq!(
        model.smmu().init(owned, &crate::InitOptions::default()).err(),
        Some(crate::InitError::MemoryOwned),
        "{d}'s arena"
    );
    let core = pool.take_window(pool.window_bytes().unwrap()).unwrap();
    let on_arena = model.smmu().init(core, &crate::InitOptions::default()).unwrap();
    assert_eq!(
        on_arena.create_stage1(core, Stage1Options::default()),
        Err(DomainError::MemoryOwned)
    );
    assert_eq!(
        on_arena.domains.book.lock().free_slots(),
        DEFAULT_DOMAINS,
        "nothing created"
    );
    on_arena.shutdown(false).unwrap();
    let smmu = smmu(&model, frames);
    let d = smmu.create_stage1(core, Stage1Options::default()).unwrap();
    smmu.free_domain(d).unwrap();
    assert_eq!(
        pool.memories_in_use(),
        1,
        "only the first domain's arena, which it never freed"
    );
}

// Field-level checks: the SMMU model of QEMU 10.0 never hits in its IOTLB, so only these tests catch an
// invalidation of the wrong stream, ASID, VMID or address (or none at all).

/// A domain's memory grows frame by frame from the whole pool, past what a sixteenth of it (a version-2 arena)
/// held, two domains growing in turn never share a frame, and freeing a domain gives every frame back.
#[test]
fn domains_grow_from_the_whole_pool_and_give_every_frame_back() {
    use crate::handover::pool::FRAME;
    use crate::pgtable::Prot;
    let frames = frames();
    let model = Model::start(frames);
    let smmu = smmu(&model, frames);
    let pool = handover_pool();
    let free = pool.free_frames();
    let (a, b) = (pool.take_memory().unwrap(), pool.take_memory().unwrap());
    let s2 = Stage2Options { input_bits: 40 };
    let (da, db) = (smmu.create_stage2(a, s2).unwrap(), smmu.create_stage2(b, s2).unwrap());
    let rw = Prot::READ | Prot::WRITE;
    // In turns, 2 MiB of 4 KiB pages at a time (one level-3 table each): the two memories interleave.
    for i in 0..300u64 {
        let (d, base) = if i % 2 == 0 { (da, 0) } else { (db, 1 << 32) };
        smmu.map(
            d,
            Iova(base + (i / 2) * (2 << 20)),
            PhysAddr(0x8000_0000 + 0x1000),
            2 << 20,
            rw,
        )
        .unwrap();
    }
    let pool_frames = (pool.pool().unwrap().len / FRAME) as usize;
    assert!(
        a.frames() > pool_frames / 16,
        "{} frames, more than an arena held",
        a.frames()
    );
    let (runs_a, runs_b): (std::vec::Vec<_>, std::vec::Vec<_>) = (a.runs().collect(), b.runs().collect());
    assert!(runs_a.len() > 1, "interleaved: several runs");
    for x in &runs_a {
        assert!(runs_b.iter().all(|y| !x.overlaps(y)), "{x:?} shared");
    }
    let held: u64 = runs_a.iter().chain(&runs_b).map(|e| e.len / FRAME).sum();
    assert_eq!(held as usize, a.frames() + b.frames());
    assert_eq!(pool.free_frames(), free - held as usize);
    smmu.free_domain(da).unwrap();
    smmu.free_domain(db).unwrap();
    assert_eq!(pool.free_frames(), free, "every frame back in the pool");
    assert_eq!(pool.memories_in_use(), 0);
}
