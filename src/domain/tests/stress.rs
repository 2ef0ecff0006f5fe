//! Host stress: N threads (2, 4, 8) share one `Iommu` and run random maps, unmaps, protects, attaches, detaches,
//! fault injections, preserves and domain churn against a model of what each domain maps, in a few seconds. The
//! fake SMMU (the command model) is the witness of the reuse rules: no page-table or CD-table frame goes back to its
//! allocator, and no ASID goes back to its allocator, before a TLBI (or CFGI) and a CMD_SYNC covering it were
//! consumed.

use crate::Iova;
use std::collections::BTreeMap;
use std::sync::Mutex;

use super::*;
use crate::mem::{AllocError, DmaBlock};

const PAGE: u64 = 0x1000;
/// Pages in each thread's window (one last-level table).
const WINDOW_PAGES: u64 = 32;
/// The stream of the shared domain, attached throughout: the injected faults are filed under it.
const SHARED_SID: u32 = 0x40;

/// A frame allocator that checks, as each frame goes back, that the SMMU consumed an invalidation (TLBI or CFGI)
/// followed by a CMD_SYNC since the frame was handed out: the SMMU may have cached (or walk-cached) what the frame
/// held until then. Valid for tables that were linked (the stress maps each thread's window below a root entry of
/// its own, so no two maps race to install one table and no never-linked table is ever freed).
struct Witness {
    frames: &'static HeapFrames,
    seen: std::sync::Arc<Mutex<crate::testing::Seen>>,
    /// Physical address -> the consumed-command count when it was handed out.
    live: Mutex<BTreeMap<u64, usize>>,
    /// Frames that went back without a covering invalidation.
    violations: Mutex<Vec<u64>>,
    /// Frames that went back (and were checked).
    checked: core::sync::atomic::AtomicUsize,
}

impl Witness {
    fn covered_since(&self, from: usize) -> bool {
        let seen = self.seen.lock().unwrap();
        let mut invalidated = false;
        for &op in &seen.consumed[from.min(seen.consumed.len())..] {
            let invalidation = (opcode::CFGI_STE..=opcode::CFGI_VMS_PIDM).contains(&op)
                || (opcode::TLBI_NH_ALL..=opcode::TLBI_NSNH_ALL).contains(&op);
            if invalidation {
                invalidated = true;
            } else if op == opcode::SYNC && invalidated {
                return true;
            }
        }
        false
    }
}

// SAFETY: forwards to `HeapFrames`, which upholds the contract; it only watches.
unsafe impl FrameAllocator for Witness {
    fn allocate_zeroed(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError> {
        let block = self.frames.allocate_zeroed(size, align)?;
        let at = self.seen.lock().unwrap().consumed.len();
        self.live.lock().unwrap().insert(block.phys.0, at);
        Ok(block)
    }

    unsafe fn free(&self, block: DmaBlock) {
        let since = self.live.lock().unwrap().remove(&block.phys.0).unwrap_or(0);
        self.checked.fetch_add(1, Ordering::Relaxed);
        if !self.covered_since(since) {
            self.violations.lock().unwrap().push(block.phys.0);
        }
        // SAFETY: the caller's guarantee, passed on.
        unsafe { self.frames.free(block) }
    }

    fn phys_to_virt(&self, phys: PhysAddr) -> Option<core::ptr::NonNull<u8>> {
        self.frames.phys_to_virt(phys)
    }
}

/// A small deterministic generator (xorshift64*), one per thread.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a thread believes one of its windows maps: IOVA -> (PA, writable).
type Expected = BTreeMap<u64, (u64, bool)>;

fn prot_of(writable: bool) -> Prot {
    if writable {
        RW
    } else {
        Prot::READ.union(Prot::CACHEABLE)
    }
}

/// One thread's random operations on its own domain (a window of it) and its window of the shared domain.
#[allow(clippy::too_many_arguments)]
fn worker(
    smmu: &Iommu<&'static HeapFrames>,
    model: &Model,
    frames: &'static HeapFrames,
    witness: &'static Witness,
    injector: &Mutex<u32>,
    asids: &Mutex<BTreeMap<u16, usize>>,
    reused: &core::sync::atomic::AtomicUsize,
    t: u64,
    own: DomainId,
    shared: DomainId,
    ops: usize,
) -> (Expected, Expected) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    let (mut mine, mut ours) = (Expected::new(), Expected::new());
    // Each thread's window is below a root entry (1 GiB) of its own, in both domains.
    let base = (t + 1) << 30;
    let sid = 0x100 + t as u32;
    let mut attached = false;
    let mut preserved = false;
    for _ in 0..ops {
        let (domain, expected) = if rng.below(2) == 0 {
            (own, &mut mine)
        } else {
            (shared, &mut ours)
        };
        let page = rng.below(WINDOW_PAGES);
        let iova = base + page * PAGE;
        match rng.below(12) {
            0..=3 => {
                let pa = 0x8000_0000 + (t << 24) + rng.below(1 << 12) * PAGE;
                let writable = rng.below(2) == 0;
                match smmu.map(domain, Iova(iova), PhysAddr(pa), PAGE, prot_of(writable)) {
                    Ok(()) => assert!(expected.insert(iova, (pa, writable)).is_none(), "mapped twice"),
                    Err(DomainError::Map(MapError::Overlap { .. })) => assert!(expected.contains_key(&iova)),
                    Err(e) => panic!("map: {e}"),
                }
            }
            4..=5 => {
                let bytes = smmu.unmap(domain, Iova(iova), PAGE).unwrap();
                assert_eq!(bytes, if expected.remove(&iova).is_some() { PAGE } else { 0 });
            }
            6 => {
                // A range: up to 8 pages (the exclusive path).
                let pages = 1 + rng.below(8).min(WINDOW_PAGES - page - 1);
                let bytes = smmu.unmap(domain, Iova(iova), pages * PAGE).unwrap();
                let gone: Vec<u64> = expected.range(iova..iova + pages * PAGE).map(|(&k, _)| k).collect();
                assert_eq!(bytes, gone.len() as u64 * PAGE);
                for k in gone {
                    expected.remove(&k);
                }
            }
            7 => {
                let pages = 1 + rng.below(4).min(WINDOW_PAGES - page - 1);
                let writable = rng.below(2) == 0;
                let bytes = smmu
                    .protect(domain, Iova(iova), pages * PAGE, prot_of(writable))
                    .unwrap();
                let mut changed = 0;
                for (_, v) in expected.range_mut(iova..iova + pages * PAGE) {
                    v.1 = writable;
                    changed += PAGE;
                }
                assert_eq!(bytes, changed);
            }
            8 => {
                if attached {
                    smmu.detach(sid).unwrap();
                } else {
                    smmu.attach(own, sid).unwrap();
                }
                attached = !attached;
            }
            9 => {
                // The SMMU reports faults on the shared domain's stream; another CPU's interrupt may file them.
                let mut injected = injector.lock().unwrap();
                inject(model, smmu, frames, &[fault(SHARED_SID, None, iova, true)]);
                *injected += 1;
                drop(injected);
                smmu.handle_interrupt().unwrap();
            }
            10 => {
                // Preserving needs handover memory: a domain on ordinary memory is refused, changing nothing.
                if preserved {
                    smmu.unpreserve(0x5_0000 + t).unwrap();
                } else {
                    assert!(matches!(
                        smmu.preserve(own, 0x5_0000 + t),
                        Err(DomainError::NotHandoverMemory(_))
                    ));
                    preserved = false;
                    continue;
                }
                preserved = !preserved;
            }
            _ => {
                // Domain churn: a scratch domain on the witnessing allocator, mapped, trimmed and freed; its ASID
                // and tables go back only after its TLBI + CMD_SYNC.
                let scratch = match smmu.create_stage1(
                    witness,
                    Stage1Options {
                        input_bits: 39,
                        el2: false,
                    },
                ) {
                    Ok(d) => d,
                    // Every ASID left is another thread's scratch domain's now.
                    Err(DomainError::Id(IdError::Exhausted { .. })) => continue,
                    Err(e) => panic!("{e}"),
                };
                let asid = match smmu.domains.get(scratch).unwrap().translation {
                    Translation::Stage1 { asid, .. } => asid,
                    _ => unreachable!(),
                };
                // Reused only after the TLBI + CMD_SYNC that dropped its previous owner's entries was consumed.
                {
                    let now = consumed(model);
                    let mut created = asids.lock().unwrap();
                    if let Some(&previous) = created.get(&asid) {
                        reused.fetch_add(1, Ordering::Relaxed);
                        let issued = issued_since(model, previous);
                        let until_now = &issued[..issued.len().min(now - previous)];
                        let dropped = until_now
                            .iter()
                            .position(|i| matches!(i, Issued::NhAsid { asid: a, .. } if *a == asid));
                        assert!(
                            dropped.is_some_and(|at| until_now[at..].contains(&Issued::Sync)),
                            "ASID {asid} handed out again before its TLBI + CMD_SYNC was consumed"
                        );
                    }
                    created.insert(asid, now);
                }
                smmu.map(scratch, Iova(0x4000_0000), PhysAddr(0x9000_0000), 4 * PAGE, RW)
                    .unwrap();
                smmu.unmap(scratch, Iova(0x4000_0000), 4 * PAGE).unwrap();
                let before = consumed(model);
                smmu.free_domain(scratch).unwrap();
                let issued = issued_since(model, before);
                let dropped = issued
                    .iter()
                    .position(|i| matches!(i, Issued::NhAsid { asid: a, .. } if *a == asid));
                assert!(
                    dropped.is_some_and(|at| issued[at..].contains(&Issued::Sync)),
                    "ASID {asid} freed without its TLBI + CMD_SYNC: {issued:?}"
                );
            }
        }
    }
    if attached {
        smmu.detach(sid).unwrap();
    }
    (mine, ours)
}

/// What a domain maps in `[base, base + WINDOW_PAGES pages)`.
fn leaves(smmu: &Iommu<&'static HeapFrames>, d: DomainId, base: u64) -> Expected {
    let mut found = Expected::new();
    smmu.domain_table(d).unwrap().walk(|m| {
        if (base..base + WINDOW_PAGES * PAGE).contains(&m.iova) {
            assert_eq!(m.size, PAGE);
            found.insert(m.iova, (m.pa, m.prot.contains(Prot::WRITE)));
        }
    });
    found
}

#[test]
fn stress_threads_against_a_model() {
    for threads in [2u64, 4, 8] {
        let frames = frames();
        // 8-bit ASIDs (IDR0.ASID16 = 0), most of them kept taken: the scratch domains share the few left, so their
        // ASIDs are reused within the run and the reuse rule is exercised.
        let model = &Model::start_with(frames, IDRS[0].1 & !(1 << 12));
        let witness: &'static Witness = std::boxed::Box::leak(std::boxed::Box::new(Witness {
            frames,
            seen: std::sync::Arc::clone(&model.seen),
            live: Mutex::new(BTreeMap::new()),
            violations: Mutex::new(Vec::new()),
            checked: core::sync::atomic::AtomicUsize::new(0),
        }));
        let mut smmu = smmu(model, frames);
        let own: Vec<DomainId> = (0..threads)
            .map(|t| {
                if t % 2 == 0 {
                    s1(&mut smmu, frames)
                } else {
                    s2(&mut smmu, frames)
                }
            })
            .collect();
        let shared = s1(&mut smmu, frames);
        smmu.attach(shared, SHARED_SID).unwrap();
        for _ in 0..240 {
            smmu.low_level().allocate_asid().unwrap();
        }
        let injector = Mutex::new(0u32);
        let asids = Mutex::new(BTreeMap::new());
        let reused = core::sync::atomic::AtomicUsize::new(0);
        // Some 600 operations per run, split among the threads: a few seconds for the three runs in a debug build.
        let ops = 600 / threads as usize;
        let smmu = &smmu;
        let results: Vec<(Expected, Expected)> = std::thread::scope(|scope| {
            let (injector, asids, reused) = (&injector, &asids, &reused);
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let own = own[t as usize];
                    scope.spawn(move || {
                        worker(
                            smmu, model, frames, witness, injector, asids, reused, t, own, shared, ops,
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // The final tables equal the model's.
        for (t, (mine, ours)) in results.iter().enumerate() {
            let base = (t as u64 + 1) << 30;
            assert_eq!(
                &leaves(smmu, own[t], base),
                mine,
                "{threads} threads: thread {t}'s domain"
            );
            assert_eq!(
                &leaves(smmu, shared, base),
                ours,
                "{threads} threads: thread {t}'s window of the shared one"
            );
        }
        // Every fault filed once, under the shared domain.
        smmu.drain_faults(|_| {}).unwrap();
        assert_eq!(smmu.domain_faults(shared).unwrap().total(), *injector.lock().unwrap());
        assert_eq!(smmu.unattached_faults().total(), 0);
        assert_eq!(
            *witness.violations.lock().unwrap(),
            Vec::<u64>::new(),
            "frames freed before their invalidation"
        );
        assert!(witness.live.lock().unwrap().is_empty(), "every scratch frame went back");
        assert!(
            witness.checked.load(Ordering::Relaxed) > 0,
            "the witness saw frames go back"
        );
        assert!(*injector.lock().unwrap() > 0, "faults were injected");
        assert!(reused.load(Ordering::Relaxed) > 0, "ASIDs were reused (and checked)");
    }
}
