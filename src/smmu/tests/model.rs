//! A small model of an SMMU on the host, for the tests of every layer: a thread that acknowledges CR0, IRQ_CTRL
//! and GBPA updates and consumes commands, recording what it saw (and when translation was switched on).
extern crate std;

use core::sync::atomic::Ordering;

use crate::hw::command::{opcode, opcode_of};
use crate::smmu::Smmu;
use crate::testing::HeapFrames;
use core::ptr::NonNull;
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::sync::atomic::{AtomicBool, AtomicU8};
use std::sync::{Arc, Mutex};
use std::vec::Vec;

/// QEMU's nested SMMU: IDR0, IDR1 (SIDSIZE 16, queues 2^19), IDR3, IDR5 (OAS 44, 4K/16K/64K), AIDR v3.1.
pub(crate) const IDRS: [(usize, u32); 5] = [
    (0x00, 0x0d44_101b),
    (0x04, 0x0273_0010),
    (0x0c, 0x1414),
    (0x14, 0x74),
    (0x1c, 1),
];

#[derive(Default, Debug)]
pub(crate) struct Seen {
    /// At the first CR0 write with SMMUEN: GBPA.ABORT, STRTAB_BASE, and the opcodes consumed so far.
    pub(crate) at_enable: Option<(bool, u64, Vec<u8>)>,
    /// CR0ACK when IRQ_CTRL was first seen non-zero.
    pub(crate) cr0ack_at_irq_enable: Option<u32>,
    /// CR0.SMMUEN went from 1 to 0 at some point.
    pub(crate) smmuen_dropped: bool,
    smmuen_was_on: bool,
    pub(crate) consumed: Vec<u8>,
    /// The whole commands consumed (index for index with `consumed`), for tests that check their fields.
    pub(crate) commands: Vec<[u64; 2]>,
    /// What [`Model::probe`] returned as each command was consumed (index for index with `commands`; `None`
    /// without a probe): the state of the driver's memory while a command was in flight.
    pub(crate) probed: Vec<Option<usize>>,
}

/// A consumed command with the fields that say what it invalidates (leaf, range and SYNC completion
/// ignored), for tests that check an operation invalidated exactly the right stream, ASID, VMID or address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Issued {
    Ste { sid: u32 },
    Cd { sid: u32, ssid: u32 },
    CdAll { sid: u32 },
    CfgiAll,
    NhAll { vmid: u16 },
    NhAsid { vmid: u16, asid: u16 },
    NhVa { vmid: u16, asid: u16, address: u64 },
    El2All,
    El2Va { address: u64 },
    S12Vmall { vmid: u16 },
    S2Ipa { vmid: u16, address: u64 },
    NsnhAll,
    Sync,
    Other(u8),
}

impl Issued {
    pub(crate) fn decode(words: [u64; 2]) -> Issued {
        let sid = (words[0] >> 32) as u32;
        let ssid = ((words[0] >> 12) & 0xf_ffff) as u32;
        let vmid = (words[0] >> 32) as u16;
        let asid = (words[0] >> 48) as u16;
        let address = words[1] & !0xfff;
        match opcode_of(&words) {
            opcode::CFGI_STE => Issued::Ste { sid },
            opcode::CFGI_ALL => Issued::CfgiAll,
            opcode::CFGI_CD => Issued::Cd { sid, ssid },
            opcode::CFGI_CD_ALL => Issued::CdAll { sid },
            opcode::TLBI_NH_ALL => Issued::NhAll { vmid },
            opcode::TLBI_NH_ASID => Issued::NhAsid { vmid, asid },
            opcode::TLBI_NH_VA => Issued::NhVa { vmid, asid, address },
            opcode::TLBI_EL2_ALL => Issued::El2All,
            opcode::TLBI_EL2_VA => Issued::El2Va { address },
            opcode::TLBI_S12_VMALL => Issued::S12Vmall { vmid },
            opcode::TLBI_S2_IPA => Issued::S2Ipa {
                vmid,
                address: address & ((1 << 56) - 1),
            },
            opcode::TLBI_NSNH_ALL => Issued::NsnhAll,
            opcode::SYNC => Issued::Sync,
            op => Issued::Other(op),
        }
    }
}

/// An STE install: CFGI_STE of `sid` alone, each followed by its CMD_SYNC.
pub(crate) fn assert_ste_steps(issued: &[Issued], sid: u32) {
    assert!(!issued.is_empty() && issued.len().is_multiple_of(2), "{issued:?}");
    for pair in issued.chunks(2) {
        assert_eq!(pair, [Issued::Ste { sid }, Issued::Sync], "{issued:?}");
    }
}

/// The commands the model consumed from index `from` on, decoded.
pub(crate) fn issued_since(model: &Model, from: usize) -> Vec<Issued> {
    model.seen.lock().unwrap().commands[from..]
        .iter()
        .map(|&w| Issued::decode(w))
        .collect()
}

pub(crate) struct Model {
    pub(crate) base: usize,
    layout: Layout,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) seen: Arc<Mutex<Seen>>,
    /// An opcode the model refuses as illegal (CERROR_ILL), 0 for none.
    pub(crate) refuse: Arc<AtomicU8>,
    /// Memory outside the heap frames the queues may live in: (physical base, CPU address, length).
    pub(crate) window: Arc<Mutex<Option<(u64, usize, u64)>>>,
    /// Called as each command is consumed (while the driver waits for it), its answer kept in `Seen::probed`.
    pub(crate) probe: Probe,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A question the model asks as it consumes each command, e.g. how many handover arenas are in use.
pub(crate) type Probe = Arc<Mutex<Option<std::boxed::Box<dyn Fn() -> usize + Send>>>>;

pub(crate) fn reg32(base: usize, offset: usize) -> *mut u32 {
    (base + offset) as *mut u32
}

impl Model {
    pub(crate) fn start(frames: &'static HeapFrames) -> Model {
        Model::start_with(frames, IDRS[0].1)
    }

    /// A model whose IDR0 reads `idr0` (the other ID registers as QEMU's).
    pub(crate) fn start_with(frames: &'static HeapFrames, idr0: u32) -> Model {
        Model::start_with_idrs(frames, idr0, IDRS[1].1)
    }

    /// A model whose IDR0 and IDR1 read `idr0` and `idr1` (the other ID registers as QEMU's).
    pub(crate) fn start_with_idrs(frames: &'static HeapFrames, idr0: u32, idr1: u32) -> Model {
        let layout = Layout::from_size_align(0x2_0000, 0x1_0000).unwrap();
        // SAFETY: non-zero size.
        let base = unsafe { alloc_zeroed(layout) } as usize;
        for (offset, value) in IDRS {
            let value = match offset {
                0 => idr0,
                4 => idr1,
                _ => value,
            };
            // SAFETY: inside the block.
            unsafe { reg32(base, offset).write_volatile(value) };
        }
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let refuse = Arc::new(AtomicU8::new(0));
        let window: Arc<Mutex<Option<(u64, usize, u64)>>> = Arc::new(Mutex::new(None));
        let probe: Probe = Arc::new(Mutex::new(None));
        let (stop2, seen2, refuse2, window2, probe2) = (
            Arc::clone(&stop),
            Arc::clone(&seen),
            Arc::clone(&refuse),
            Arc::clone(&window),
            Arc::clone(&probe),
        );
        let thread = std::thread::spawn(move || {
            let r = |o| {
                // SAFETY: inside the live block (joined before it is freed).
                unsafe { reg32(base, o).read_volatile() }
            };
            let w = |o, v| {
                // SAFETY: as above.
                unsafe { reg32(base, o).write_volatile(v) }
            };
            let mut cons = 0u32;
            let mut last_base = 0u64;
            while !stop2.load(Ordering::SeqCst) {
                let cr0 = r(0x20);
                {
                    let mut s = seen2.lock().unwrap();
                    if cr0 & 1 != 0 {
                        s.smmuen_was_on = true;
                    } else if s.smmuen_was_on {
                        s.smmuen_dropped = true;
                    }
                }
                if cr0 & 1 != 0 && r(0x24) & 1 == 0 {
                    let strtab = u64::from(r(0x80)) | u64::from(r(0x84)) << 32;
                    let mut s = seen2.lock().unwrap();
                    let consumed = s.consumed.clone();
                    s.at_enable.get_or_insert((r(0x44) & (1 << 20) != 0, strtab, consumed));
                }
                let irq_ctrl = r(0x50);
                if irq_ctrl != 0 {
                    seen2.lock().unwrap().cr0ack_at_irq_enable.get_or_insert(r(0x24));
                }
                w(0x24, cr0);
                w(0x54, irq_ctrl);
                let gbpa = r(0x44);
                if gbpa & (1 << 31) != 0 {
                    w(0x44, gbpa & !(1 << 31));
                }
                // A command error stops the queue until the driver acknowledges it (GERRORN.CMDQ_ERR).
                let error_pending = (r(0x60) ^ r(0x64)) & 1 != 0;
                if cr0 & (1 << 3) != 0 && !error_pending {
                    let base_reg = u64::from(r(0x90)) | u64::from(r(0x94)) << 32;
                    let log2 = (base_reg & 0x1f) as u32;
                    let phys = base_reg & (((1 << 52) - 1) & !0x1f);
                    let queue = match *window2.lock().unwrap() {
                        Some((base, virt, len)) if (base..base + len).contains(&phys) => {
                            (virt + (phys - base) as usize) as *const u64
                        }
                        _ => frames.virt(phys) as *const u64,
                    };
                    let prod = r(0x98);
                    let mask = (2u32 << log2) - 1;
                    if base_reg != last_base {
                        // A queue (re)programmed, as by `adopt_running`: consume from the CONS it was given.
                        last_base = base_reg;
                        cons = r(0x9c) & mask;
                    }
                    while cons & mask != prod & mask {
                        let index = (cons & ((1 << log2) - 1)) as usize;
                        // SAFETY: the queue is live while the driver runs.
                        let words = unsafe {
                            [
                                queue.add(index * 2).read_volatile(),
                                queue.add(index * 2 + 1).read_volatile(),
                            ]
                        };
                        let op = words[0] as u8;
                        if op != 0 && op == refuse2.load(Ordering::SeqCst) {
                            // CERROR_ILL at CONS, GERROR.CMDQ_ERR raised.
                            w(0x9c, cons | 1 << 24);
                            w(0x60, r(0x64) ^ 1);
                            break;
                        }
                        let probed = probe2.lock().unwrap().as_ref().map(|f| f());
                        {
                            let mut s = seen2.lock().unwrap();
                            s.consumed.push(op);
                            s.commands.push(words);
                            s.probed.push(probed);
                        }
                        cons = (cons + 1) & mask;
                        w(0x9c, cons);
                    }
                }
                std::thread::yield_now();
            }
        });
        Model {
            base,
            layout,
            stop,
            seen,
            refuse,
            window,
            probe,
            thread: Some(thread),
        }
    }

    pub(crate) fn smmu(&self) -> Smmu {
        // SAFETY: the block models pages 0 and 1 and lives as long as the model.
        unsafe { Smmu::probe(NonNull::new(self.base as *mut u8).unwrap(), 0x2_0000) }.unwrap()
    }

    pub(crate) fn set_gerror(&self, value: u32) {
        // SAFETY: inside the live block.
        unsafe { reg32(self.base, 0x60).write_volatile(value) };
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // SAFETY: allocated in `start` with this layout; the thread is gone.
        unsafe { dealloc(self.base as *mut u8, self.layout) };
    }
}

pub(crate) fn frames() -> &'static HeapFrames {
    std::boxed::Box::leak(std::boxed::Box::default())
}
