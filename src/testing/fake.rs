//! A small model of an SMMU on the host (see [the module docs](super)): a thread that acknowledges CR0, IRQ_CTRL
//! and GBPA updates and consumes commands, recording what it saw (and when translation was switched on).

use core::sync::atomic::Ordering;

use super::HeapFrames;
use crate::hw::command::{opcode, opcode_of};
use crate::smmu::Smmu;
use core::ptr::NonNull;
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::sync::atomic::{AtomicBool, AtomicU8};
use std::sync::{Arc, Mutex};
use std::vec::Vec;

extern crate std;

/// The ID registers [`FakeSmmu::start`] reports, as (offset, value): QEMU's nested SMMUv3's IDR0 (stage 1, stage 2,
/// 2-level tables, both endiannesses, VMID16, ASID16), IDR1 (SIDSIZE 16, queues 2^19, no substreams), IDR3, IDR5
/// (OAS 44 bits, 4K/16K/64K granules) and AIDR (v3.1).
pub const QEMU_IDRS: [(usize, u32); 5] = [
    (0x00, 0x0d44_101b),
    (0x04, 0x0273_0010),
    (0x0c, 0x1414),
    (0x14, 0x74),
    (0x1c, 1),
];

/// What the fake saw, for the crate's own tests.
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
#[non_exhaustive]
pub enum Issued {
    /// CMD_CFGI_STE of a stream.
    Ste {
        /// StreamID.
        sid: u32,
    },
    /// CMD_CFGI_CD of a stream's substream.
    Cd {
        /// StreamID.
        sid: u32,
        /// SubstreamID.
        ssid: u32,
    },
    /// CMD_CFGI_CD_ALL of a stream.
    CdAll {
        /// StreamID.
        sid: u32,
    },
    /// CMD_CFGI_ALL.
    CfgiAll,
    /// CMD_TLBI_NH_ALL of a VMID.
    NhAll {
        /// VMID.
        vmid: u16,
    },
    /// CMD_TLBI_NH_ASID.
    NhAsid {
        /// VMID.
        vmid: u16,
        /// ASID.
        asid: u16,
    },
    /// CMD_TLBI_NH_VA.
    NhVa {
        /// VMID.
        vmid: u16,
        /// ASID.
        asid: u16,
        /// The address, its page offset cleared.
        address: u64,
    },
    /// CMD_TLBI_EL2_ALL.
    El2All,
    /// CMD_TLBI_EL2_VA.
    El2Va {
        /// The address, its page offset cleared.
        address: u64,
    },
    /// CMD_TLBI_S12_VMALL.
    S12Vmall {
        /// VMID.
        vmid: u16,
    },
    /// CMD_TLBI_S2_IPA.
    S2Ipa {
        /// VMID.
        vmid: u16,
        /// The IPA, its page offset cleared.
        address: u64,
    },
    /// CMD_TLBI_NSNH_ALL.
    NsnhAll,
    /// CMD_SYNC.
    Sync,
    /// Any other command, by opcode.
    Other(u8),
}

impl Issued {
    /// The command in `words` (its two 64-bit words, as the queue holds them).
    pub fn decode(words: [u64; 2]) -> Issued {
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

/// A fake SMMU on the host (see [the module docs](super) for what it models): registers in a block of host
/// memory, and a thread that consumes the command queue the driver programs. Dropped, it stops its thread.
///
/// ```
/// use smmuv3::testing::{FakeSmmu, HeapFrames, Issued};
/// use smmuv3::{Iommu, InitOptions, Stage2Options};
///
/// let frames = HeapFrames::leaked();
/// let fake = FakeSmmu::start(frames);
/// let iommu: Iommu<&HeapFrames> = fake.smmu().init(frames, &InitOptions::default()).unwrap();
/// let vm = iommu.create_stage2(frames, Stage2Options { input_bits: 40 }).unwrap();
/// let before = fake.command_count();
/// iommu.attach(vm, 0x10).unwrap();
/// // The STE written and invalidated, each step completed by a CMD_SYNC.
/// assert_eq!(fake.issued_since(before)[..2], [Issued::Ste { sid: 0x10 }, Issued::Sync]);
/// ```
pub struct FakeSmmu {
    pub(crate) base: usize,
    layout: Layout,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) seen: Arc<Mutex<Seen>>,
    /// An opcode the model refuses as illegal (CERROR_ILL), 0 for none.
    pub(crate) refuse: Arc<AtomicU8>,
    /// Memory outside the heap frames the queues may live in: (physical base, CPU address, length). (Set by the
    /// crate's own tests.)
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) window: Arc<Mutex<Option<(u64, usize, u64)>>>,
    /// Called as each command is consumed (while the driver waits for it), its answer kept in `Seen::probed`.
    /// (Set by the crate's own tests.)
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) probe: Probe,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A question the fake asks as it consumes each command, e.g. how many handover arenas are in use.
pub(crate) type Probe = Arc<Mutex<Option<std::boxed::Box<dyn Fn() -> usize + Send>>>>;

pub(crate) fn reg32(base: usize, offset: usize) -> *mut u32 {
    (base + offset) as *mut u32
}

impl FakeSmmu {
    /// A fake with QEMU's nested SMMUv3's ID registers ([`QEMU_IDRS`]), its queues in `frames` (the allocator the
    /// driver is given).
    pub fn start(frames: &'static HeapFrames) -> FakeSmmu {
        FakeSmmu::start_with(frames, QEMU_IDRS[0].1)
    }

    /// A fake whose IDR0 reads `idr0` (the other ID registers as QEMU's): an SMMU with only stage 1, say.
    pub fn start_with(frames: &'static HeapFrames, idr0: u32) -> FakeSmmu {
        FakeSmmu::start_with_idrs(frames, idr0, QEMU_IDRS[1].1)
    }

    /// A fake whose IDR0 and IDR1 read `idr0` and `idr1` (the other ID registers as QEMU's): substreams
    /// (IDR1.SSIDSIZE), fewer StreamID bits, smaller queues.
    pub fn start_with_idrs(frames: &'static HeapFrames, idr0: u32, idr1: u32) -> FakeSmmu {
        let layout = Layout::from_size_align(0x2_0000, 0x1_0000).unwrap();
        // SAFETY: non-zero size.
        let base = unsafe { alloc_zeroed(layout) } as usize;
        for (offset, value) in QEMU_IDRS {
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
        FakeSmmu {
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

    /// The SMMU, probed (what [`crate::Smmu::probe`] returns for real hardware): initialise it into an
    /// `Iommu`. The fake must outlive what is made from it.
    ///
    /// # Panics
    /// When the probe refuses the ID registers the fake was started with.
    pub fn smmu(&self) -> Smmu {
        // SAFETY: the block models pages 0 and 1 and lives as long as the fake (the caller's duty, documented).
        unsafe { Smmu::probe(NonNull::new(self.base as *mut u8).unwrap(), 0x2_0000) }.unwrap()
    }

    /// Writes SMMU_GERROR, as the SMMU does when it raises a global error (toggling bits against GERRORN).
    pub fn set_gerror(&self, value: u32) {
        // SAFETY: inside the live block.
        unsafe { reg32(self.base, 0x60).write_volatile(value) };
    }

    /// How many commands the fake consumed so far (a mark for [`FakeSmmu::issued_since`]).
    pub fn command_count(&self) -> usize {
        self.seen.lock().unwrap().commands.len()
    }

    /// The commands consumed from index `from` on, decoded.
    ///
    /// # Panics
    /// When `from` is beyond [`FakeSmmu::command_count`].
    pub fn issued_since(&self, from: usize) -> Vec<Issued> {
        self.seen.lock().unwrap().commands[from..]
            .iter()
            .map(|&w| Issued::decode(w))
            .collect()
    }

    /// The commands consumed from index `from` on, as the queue held them (two 64-bit words each).
    pub fn commands_since(&self, from: usize) -> Vec<[u64; 2]> {
        self.seen.lock().unwrap().commands[from..].to_vec()
    }

    /// From now on the fake refuses commands of opcode `opcode` as illegal (CERROR_ILL at CONS, GERROR.CMDQ_ERR
    /// raised), as a real SMMU refuses one it does not implement; 0 refuses none.
    pub fn refuse_opcode(&self, opcode: u8) {
        self.refuse.store(opcode, Ordering::SeqCst);
    }
}

impl Drop for FakeSmmu {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // SAFETY: allocated in `start` with this layout; the thread is gone.
        unsafe { dealloc(self.base as *mut u8, self.layout) };
    }
}
