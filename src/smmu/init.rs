//! Bringing an SMMU up and down: init in the architecture's order, taking over one a previous image left
//! translating, turning translation off, and shutting down with the memory given back.

use crate::mem::MemoryHooks;
use core::fmt;

use tock_registers::interfaces::{Readable, Writeable};

use crate::deadline::{Deadline, TimedOut};
use crate::hw::regs::{CR0, CR1, CR2, GBPA, STRTAB_BASE_CFG, SmmuPage0, cmdq_base, strtab_base, written_queue_base};
use crate::mem::{AllocError, Coherency, FrameAllocator, MAX_WRITEBACK_GRANULE, PhysAddr, write_barrier};
use crate::queue::cmdq::{COMMAND_BYTES, CommandQueue, CommandQueueError, MMU700_COMMANDS_PER_SYNC};
use crate::queue::evtq::{EVENT_BYTES, EventQueue};
use crate::queue::index::QueueGeometry;
use crate::stream::{StreamTable, StreamTableFormat};

use super::features::{Features, Quirks};
use super::{Smmu, SmmuCore};

/// How long a register handshake (CR0ACK, GBPA.UPDATE, IRQ_CTRLACK) may take.
pub const HANDSHAKE_TIMEOUT_US: u64 = 100_000;

/// The caller's choices for [`Smmu::init`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitOptions {
    /// Largest command queue wanted, log2 of entries (capped by IDR1.CMDQS).
    pub cmdq_log2_max: u8,
    /// Largest event queue wanted, log2 of entries (capped by IDR1.EVENTQS).
    pub eventq_log2_max: u8,
    /// StreamID bits to serve (capped by IDR1.SIDSIZE); StreamIDs beyond are refused.
    pub max_sid_bits: u8,
    /// Stream table format.
    pub stream_table: StreamTableChoice,
    /// Interrupts to enable (wired lines; MSIs are turned off). Empty by default: the caller polls
    /// `drain_events` and `handle_global_errors`. With interrupts the caller still
    /// calls those, from its handler or after it.
    pub interrupts: InterruptSources,
    /// Where the driver keeps its own bookkeeping (the domain table, the token index, the attached streams, a
    /// restore's and a prepare's working lists): the CPU's alone, never read by the SMMU, never carried across a
    /// hand-off. The default: the SMMU's allocator. Give ordinary RAM when that allocator is a handover window (a
    /// hand-off with the SMMU running), where the bookkeeping would be recorded with the SMMU's own structures and
    /// carried to the next image.
    pub bookkeeping: Bookkeeping,
    /// Streams that may be attached to domains at once (whole streams; each may also have
    /// [`MAX_SUBSTREAMS_PER_STREAM`](crate::domain::MAX_SUBSTREAMS_PER_STREAM) substreams attached): at least the
    /// domain table's capacity is kept. Any number may go to one domain. The bookkeeping costs about 140 bytes a
    /// stream. Default [`DEFAULT_ATTACHED_STREAMS`].
    pub attached_streams: usize,
}

/// Memory for the driver's bookkeeping ([`InitOptions::bookkeeping`]): `None` for the SMMU's allocator.
#[derive(Clone, Copy, Default)]
pub struct Bookkeeping(pub Option<&'static (dyn FrameAllocator + Sync)>);

impl core::fmt::Debug for Bookkeeping {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self.0 {
            Some(_) => "Bookkeeping(an allocator of its own)",
            None => "Bookkeeping(the SMMU's allocator)",
        })
    }
}

impl PartialEq for Bookkeeping {
    fn eq(&self, other: &Self) -> bool {
        match (self.0, other.0) {
            (Some(a), Some(b)) => core::ptr::addr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl Eq for Bookkeeping {}

/// [`InitOptions::attached_streams`] by default.
pub const DEFAULT_ATTACHED_STREAMS: usize = 64;

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            cmdq_log2_max: 8,
            eventq_log2_max: 8,
            max_sid_bits: 32,
            stream_table: StreamTableChoice::Auto,
            interrupts: InterruptSources::empty(),
            bookkeeping: Bookkeeping(None),
            attached_streams: DEFAULT_ATTACHED_STREAMS,
        }
    }
}

bitflags::bitflags! {
    /// The SMMU's interrupt sources, as SMMU_IRQ_CTRL enables them.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct InterruptSources: u32 {
        /// A global error became active (SMMU_GERROR differs from SMMU_GERRORN).
        const GERROR = 1 << 0;
        /// The event queue became non-empty (or overflowed).
        const EVENTQ = 1 << 2;
    }
}

/// Which stream table format to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamTableChoice {
    /// Linear when small or when the SMMU has no 2-level tables, else 2-level.
    Auto,
    /// Always linear (covering `max_sid_bits`).
    Linear,
}

/// What the previous image recorded about an SMMU it left translating (from the handover region, see
/// [`crate::handover::restore::running_smmu`]): [`Smmu::adopt_running`] adopts nothing unless the running SMMU is
/// this one, with this stream table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunningSmmu {
    /// SMMU_IDR0..5 as the previous image probed them.
    pub idr: [u32; 6],
    /// SMMU_IIDR as the previous image probed it.
    pub iidr: u32,
    /// The format of the stream table the SMMU runs with.
    pub format: StreamTableFormat,
    /// Its base (physical).
    pub strtab_base: u64,
}

/// Why [`Smmu::init`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InitError {
    /// No memory for a table or a queue.
    NoMemory(AllocError),
    /// A register handshake did not complete: the SMMU is stuck.
    Timeout {
        /// The register waited on.
        register: &'static str,
        /// The value it held.
        value: u32,
    },
    /// The SMMU's table or queue bases are fixed by the implementation (IDR1.TABLES_PRESET / QUEUES_PRESET),
    /// which this driver does not support.
    PresetBases,
    /// The initial invalidation failed.
    Invalidation(CommandQueueError),
    /// A hand-off with the SMMU running was asked of an SMMU that is not translating (SMMUEN = 0).
    NotRunning,
    /// The running SMMU's stream table is not where (or not of the format) the caller said, not reachable through
    /// its allocator (or holds a level-1 descriptor this driver would not have written, which the SMMU could follow
    /// to STEs the driver cannot reach, or two descriptors naming one level-2 span, or a span over the level-1
    /// table), or the SMMU runs with CR2.E2H set.
    StreamTableNotAdoptable {
        /// STRTAB_BASE's address as the SMMU holds it.
        running: u64,
        /// Where the caller said it is.
        expected: u64,
    },
    /// The allocator is memory for a single owner (a handover memory) that a domain or another SMMU owns already
    /// (a [`HandoverMemory`](crate::handover::pool::HandoverMemory) has one owner): the SMMU's own structures cannot share it, since freeing that domain
    /// would hand the memory out again under the SMMU. Nothing was allocated or written.
    MemoryOwned,
    /// The running SMMU is not the one the previous image recorded: an ID register reads otherwise.
    IdentityMismatch {
        /// The register (`IDR0`..`IDR5`, `IIDR`).
        register: &'static str,
        /// Its value as recorded.
        recorded: u32,
        /// Its value as this image probed it.
        probed: u32,
    },
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::NoMemory(e) => write!(f, "SMMU init: {e}"),
            InitError::Timeout { register, value } => {
                write!(
                    f,
                    "SMMU init: {register} did not acknowledge (reads {value:#x}): the SMMU is stuck"
                )
            }
            InitError::PresetBases => f.write_str("SMMU init: preset table/queue bases are not supported"),
            InitError::Invalidation(e) => write!(f, "SMMU init: initial invalidation failed: {e}"),
            InitError::NotRunning => f.write_str("SMMU hand-off: the SMMU is not translating (SMMUEN = 0)"),
            InitError::MemoryOwned => {
                f.write_str("SMMU init: its memory (a handover memory) is owned already, by a domain or another SMMU")
            }
            InitError::StreamTableNotAdoptable { running, expected } => write!(
                f,
                "SMMU hand-off: the running stream table at {running:#x} is not the one expected at {expected:#x} (or not reachable)"
            ),
            InitError::IdentityMismatch {
                register,
                recorded,
                probed,
            } => write!(
                f,
                "SMMU hand-off: not the SMMU the previous image left running: {register} recorded {recorded:#x}, probed {probed:#x}"
            ),
        }
    }
}

fn handshake<T: Copy + PartialEq + Into<u32>>(
    register: &'static str,
    read: impl Fn() -> T,
    wanted: impl Fn(T) -> bool,
) -> Result<(), InitError> {
    Deadline::after_micros(HANDSHAKE_TIMEOUT_US)
        .poll(|| wanted(read()).then_some(()))
        .map_err(|TimedOut| InitError::Timeout {
            register,
            value: read().into(),
        })
}
/// Writes CR0 and waits for CR0ACK to match.
pub(super) fn set_cr0(regs: &SmmuPage0, value: u32) -> Result<(), InitError> {
    regs.cr0.set(value);
    handshake("CR0ACK", || regs.cr0ack.get(), |v| v == value)
}
/// GBPA update protocol: wait for UPDATE = 0, write with UPDATE = 1, wait for UPDATE = 0.
fn set_global_abort(regs: &SmmuPage0) -> Result<(), InitError> {
    write_gbpa_abort(regs, true)
}
/// GBPA.ABORT = `abort` through the update protocol, the other fields kept.
fn write_gbpa_abort(regs: &SmmuPage0, abort: bool) -> Result<(), InitError> {
    handshake("GBPA", || regs.gbpa.get(), |v| v & GBPA::UPDATE::SET.value == 0)?;
    let kept = regs.gbpa.get() & !GBPA::ABORT::SET.value;
    let value = kept | if abort { GBPA::ABORT::SET.value } else { 0 } | GBPA::UPDATE::SET.value;
    regs.gbpa.set(value);
    handshake("GBPA", || regs.gbpa.get(), |v| v & GBPA::UPDATE::SET.value == 0)
}
/// What STRTAB_BASE_CFG.FMT, LOG2SIZE and SPLIT describe; `None` for a reserved format.
fn programmed_format(
    cfg: tock_registers::LocalRegisterCopy<u32, STRTAB_BASE_CFG::Register>,
) -> Option<StreamTableFormat> {
    let sid_bits = cfg.read(STRTAB_BASE_CFG::LOG2SIZE) as u8;
    match cfg.read(STRTAB_BASE_CFG::FMT) {
        0 => Some(StreamTableFormat::Linear { sid_bits }),
        1 => Some(StreamTableFormat::TwoLevel {
            sid_bits,
            split: cfg.read(STRTAB_BASE_CFG::SPLIT) as u8,
        }),
        _ => None,
    }
}
/// The command and event queues, allocated from `allocator` and sized by `features` within `options`: memory
/// only, nothing on the SMMU.
pub(super) fn allocate_queues<A: FrameAllocator>(
    allocator: &A,
    features: &Features,
    options: &InitOptions,
) -> Result<(CommandQueue, EventQueue, u8, u8), AllocError> {
    let coherency = Coherency {
        coherent: features.coherent,
    };
    let cmdq_log2 = features.cmdq_log2_max.min(options.cmdq_log2_max);
    let evtq_log2 = features.eventq_log2_max.min(options.eventq_log2_max);
    let cmdq_bytes = COMMAND_BYTES << cmdq_log2;
    let evtq_bytes = EVENT_BYTES << evtq_log2;
    let cmdq_memory = allocator.allocate_zeroed(cmdq_bytes, cmdq_bytes.max(32))?;
    // The SMMU writes the event queue: its block spans whole writeback granules, so that no line of it is shared
    // with memory the CPU writes, whose write-back would land on records a non-coherent SMMU wrote.
    let evtq_block = evtq_bytes.max(MAX_WRITEBACK_GRANULE);
    let evtq_memory = match allocator.allocate_zeroed(evtq_block, evtq_block) {
        Ok(m) => m,
        Err(e) => {
            // SAFETY: allocated just above and never shared with the SMMU.
            unsafe { allocator.free(cmdq_memory) };
            return Err(e);
        }
    };
    // IDR1 sizes were checked at probe (at most 19), so the geometries exist.
    let (Ok(cmdq_geometry), Ok(evtq_geometry)) = (QueueGeometry::new(cmdq_log2), QueueGeometry::new(evtq_log2)) else {
        unreachable!("queue sizes are checked at probe")
    };
    // SAFETY: a live block of the queue's size from the allocator (8-byte aligned and exclusively ours by its
    // contract), owned by the queue until `into_memory`.
    let mut cmdq = unsafe { CommandQueue::new(cmdq_memory, cmdq_geometry, coherency.coherent) };
    if features.quirks.contains(Quirks::CMDQ_SYNC_EVERY_63) {
        cmdq.limit_commands_per_sync(MMU700_COMMANDS_PER_SYNC);
    }
    let evtq = EventQueue::new(evtq_memory, evtq_geometry, coherency);
    Ok((cmdq, evtq, cmdq_log2, evtq_log2))
}
/// Whether SMMU_CR1 makes the SMMU's accesses to its tables and queues cacheable and shareable (so, on a coherent
/// interconnect, snooping the CPU caches); non-cacheable or non-shareable accesses go to memory.
fn cr1_snoops(cr1: tock_registers::LocalRegisterCopy<u32, CR1::Register>) -> bool {
    [
        CR1::QUEUE_IC,
        CR1::QUEUE_OC,
        CR1::TABLE_IC,
        CR1::TABLE_OC,
        CR1::QUEUE_SH,
        CR1::TABLE_SH,
    ]
    .into_iter()
    .all(|field| cr1.read(field) != 0)
}
/// Gives the (disabled) queues their bases, empty, then turns them on with `cr0` (SMMUEN as it is to stay).
fn program_queues(
    smmu: &Smmu,
    cmdq: &CommandQueue,
    evtq: &EventQueue,
    (cmdq_log2, evtq_log2): (u8, u8),
    cr0: u32,
) -> Result<(), InitError> {
    let regs = smmu.regs();
    write_barrier();
    regs.cmdq_base.set(cmdq_base(cmdq.memory().phys.0, cmdq_log2));
    regs.cmdq_prod.set(0);
    regs.cmdq_cons.set(0);
    regs.eventq_base
        .set(written_queue_base(evtq.memory().phys.0, evtq_log2));
    let page1 = smmu.page1_regs();
    page1.eventq_prod.set(0);
    page1.eventq_cons.set(0);
    set_cr0(regs, cr0 | CR0::CMDQEN::SET.value | CR0::EVENTQEN::SET.value)
}
/// The interrupts the caller asked for, as wired lines: an SMMU with MSIs sends one only to a non-zero IRQ_CFG0
/// address, so clearing those selects the wires.
fn enable_interrupts(regs: &SmmuPage0, features: &Features, options: &InitOptions) -> Result<(), InitError> {
    if options.interrupts.is_empty() {
        return Ok(());
    }
    if features.msi {
        regs.gerror_irq_cfg0.set(0);
        regs.eventq_irq_cfg0.set(0);
    }
    let wanted = options.interrupts.bits();
    regs.irq_ctrl.set(wanted);
    handshake("IRQ_CTRLACK", || regs.irq_ctrlack.get(), |v| v == wanted)
}

impl Smmu {
    /// Makes incoming transactions abort (`abort`) or bypass while translation is off: SMMU_GBPA.ABORT through the
    /// update protocol (wait for UPDATE = 0, write with UPDATE = 1, wait for it to clear), the other GBPA fields
    /// kept. SMMUEN is not touched; while translation is on, GBPA has no effect. An SMMU leaves reset with
    /// GBPA.ABORT IMPLEMENTATION DEFINED (0 on QEMU: DMA bypasses), so a board sets it before any PCI function or
    /// bridge may master the bus, and bypass is only ever an explicit request.
    ///
    /// # Errors
    /// [`InitError::Timeout`] when GBPA.UPDATE does not clear.
    pub fn set_gbpa_abort(&self, abort: bool) -> Result<(), InitError> {
        write_gbpa_abort(self.regs(), abort)
    }

    /// Turns translation off with every incoming transaction aborting: GBPA.ABORT = 1 first (so that nothing
    /// bypasses once SMMUEN drops), then interrupts, SMMUEN and the queues off, each acknowledged. The SMMU then
    /// walks no table and fetches no command; its memory is not freed (see [`Iommu::shutdown`](crate::Iommu::shutdown) for that). What
    /// a refused hand-off falls back to when the streams cannot be aborted one by one.
    ///
    /// # Errors
    /// [`InitError::Timeout`] for a handshake that does not complete (the steps before it took effect).
    pub fn disable_aborting(&self) -> Result<(), InitError> {
        let regs = self.regs();
        set_global_abort(regs)?;
        regs.irq_ctrl.set(0);
        handshake("IRQ_CTRLACK", || regs.irq_ctrlack.get(), |v| v == 0)?;
        set_cr0(regs, 0)
    }

    /// The stream table the SMMU holds now, as read back: STRTAB_BASE's address and STRTAB_BASE_CFG's format
    /// (`None` for a reserved format). For a translating SMMU, the table it walks.
    pub fn programmed_stream_table(&self) -> (u64, Option<StreamTableFormat>) {
        let regs = self.regs();
        (
            regs.strtab_base.get() & 0x000f_ffff_ffff_ffc0,
            programmed_format(regs.strtab_base_cfg.extract()),
        )
    }

    /// Whether this is the SMMU `running` describes, translating as recorded: SMMUEN on, IDR0..5 and IIDR as
    /// recorded, STRTAB_BASE and STRTAB_BASE_CFG read back as the recorded stream table, and CR2.E2H clear (an EL2
    /// regime this driver does not drive; STRTAB_BASE_CFG, CR1 and CR2 cannot change while SMMUEN = 1).
    fn check_running(&self, running: &RunningSmmu) -> Result<(), InitError> {
        if !self.is_enabled() {
            return Err(InitError::NotRunning);
        }
        const IDR: [&str; 6] = ["IDR0", "IDR1", "IDR2", "IDR3", "IDR4", "IDR5"];
        let raw = self.features().raw;
        let recorded = running.idr.iter().chain([&running.iidr]);
        let probed = raw.idr.iter().chain([&raw.iidr]);
        for ((register, &recorded), &probed) in IDR.iter().chain(&["IIDR"]).zip(recorded).zip(probed) {
            if recorded != probed {
                return Err(InitError::IdentityMismatch {
                    register,
                    recorded,
                    probed,
                });
            }
        }
        let (base, format) = self.programmed_stream_table();
        if base != running.strtab_base || format != Some(running.format) || self.regs().cr2.is_set(CR2::E2H) {
            return Err(InitError::StreamTableNotAdoptable {
                running: base,
                expected: running.strtab_base,
            });
        }
        Ok(())
    }

    /// Takes over an SMMU that a previous image left translating (see `Smmu::adopt_running`): the core the domain
    /// layer builds on.
    pub(crate) fn take_over<A: FrameAllocator>(
        mut self,
        allocator: A,
        options: &InitOptions,
        running: &RunningSmmu,
    ) -> Result<SmmuCore<A>, InitError> {
        if let Err(e) = self.check_running(running) {
            let _ = self.disable_aborting();
            return Err(e);
        }
        // The SMMU's memory is its own, as for `init`.
        if !allocator.take_ownership() {
            let _ = self.disable_aborting();
            return Err(InitError::MemoryOwned);
        }
        // On a refusal from here on: translation off, and the memory no longer the SMMU's once it is.
        let refuse = |smmu: &Smmu, allocator: &A, e: InitError| {
            let _ = smmu.disable_aborting();
            if !smmu.is_enabled() {
                allocator.give_up_ownership();
            }
            Err(e)
        };
        // CR1 cannot change while SMMUEN = 1: if the previous image made the SMMU's own accesses non-cacheable,
        // they do not snoop the CPU caches whatever this image was told, and everything the CPU writes for the SMMU
        // must be cleaned (and the event queue invalidated) as for a non-coherent SMMU.
        if self.features().coherent && !cr1_snoops(self.regs().cr1.extract()) {
            self.apply_board_coherency(false);
        }
        let features = *self.features();
        let coherency = Coherency {
            coherent: features.coherent,
        };
        let Some(streams) = StreamTable::adopt(running.format, PhysAddr(running.strtab_base), &allocator, coherency)
        else {
            let e = InitError::StreamTableNotAdoptable {
                running: running.strtab_base,
                expected: running.strtab_base,
            };
            return refuse(&self, &allocator, e);
        };
        let (cmdq, evtq, cmdq_log2, evtq_log2) = match allocate_queues(&allocator, &features, options) {
            Ok(queues) => queues,
            Err(e) => return refuse(&self, &allocator, InitError::NoMemory(e)),
        };
        // Queues and interrupts off, translation on throughout.
        let programmed = (|| {
            let regs = self.regs();
            regs.irq_ctrl.set(0);
            handshake("IRQ_CTRLACK", || regs.irq_ctrlack.get(), |v| v == 0)?;
            set_cr0(regs, CR0::SMMUEN::SET.value)?;
            // Global errors the previous image left latched (a stale CMDQ_ERR would stall the new queue).
            regs.gerrorn.set(regs.gerror.get());
            program_queues(&self, &cmdq, &evtq, (cmdq_log2, evtq_log2), CR0::SMMUEN::SET.value)?;
            enable_interrupts(regs, &features, options)
        })();
        if let Err(e) = programmed {
            return refuse(&self, &allocator, e);
        }
        let active = SmmuCore::assemble(self, allocator, streams, cmdq, evtq);
        active.set_inherited_stes(true);
        if let Err(e) = active.invalidate_all() {
            // `active` has no domain yet; its drop turns translation off once more.
            return refuse(&active.smmu, &active.allocator, InitError::Invalidation(e));
        }
        Ok(active)
    }

    /// Initialises the SMMU (see `Smmu::init`): the core the domain layer builds on.
    pub(crate) fn start<A: FrameAllocator>(
        self,
        allocator: A,
        options: &InitOptions,
    ) -> Result<SmmuCore<A>, InitError> {
        let features = *self.features();
        if features.queues_preset || features.tables_preset {
            return Err(InitError::PresetBases);
        }
        let coherency = Coherency {
            coherent: features.coherent,
        };
        // The SMMU's memory is its own: no domain may take it (and give it back when freed).
        if !allocator.take_ownership() {
            return Err(InitError::MemoryOwned);
        }

        // Memory first, so that a shortage changes nothing on the SMMU.
        let format = match options.stream_table {
            StreamTableChoice::Auto => {
                StreamTableFormat::choose(features.sid_bits, features.stream_table_two_level, options.max_sid_bits)
            }
            StreamTableChoice::Linear => {
                StreamTableFormat::choose(features.sid_bits, false, options.max_sid_bits.min(features.sid_bits))
            }
        };
        let streams = match StreamTable::new(format, &allocator, coherency) {
            Ok(streams) => streams,
            Err(e) => {
                allocator.give_up_ownership();
                return Err(InitError::NoMemory(e));
            }
        };
        let (cmdq, evtq, cmdq_log2, evtq_log2) = match allocate_queues(&allocator, &features, options) {
            Ok(q) => q,
            Err(e) => {
                // SAFETY: the table was never handed to the SMMU.
                unsafe { streams.free(&allocator) };
                allocator.give_up_ownership();
                return Err(InitError::NoMemory(e));
            }
        };

        let regs = self.regs();
        // 1. Nothing may bypass while the SMMU is reprogrammed.
        set_global_abort(regs)?;
        // 2. Translation and queues off.
        set_cr0(regs, 0)?;
        // 3. Interrupts off until the queues they report on exist.
        regs.irq_ctrl.set(0);
        handshake("IRQ_CTRLACK", || regs.irq_ctrlack.get(), |v| v == 0)?;
        // 4. Acknowledge every global error left from before.
        regs.gerrorn.set(regs.gerror.get());
        // 5. Stream table.
        write_barrier();
        regs.strtab_base.set(strtab_base(streams.base().0));
        regs.strtab_base_cfg.write(match format {
            StreamTableFormat::Linear { sid_bits } => {
                STRTAB_BASE_CFG::FMT::Linear + STRTAB_BASE_CFG::LOG2SIZE.val(u32::from(sid_bits))
            }
            StreamTableFormat::TwoLevel { sid_bits, split } => {
                STRTAB_BASE_CFG::FMT::TwoLevel
                    + STRTAB_BASE_CFG::LOG2SIZE.val(u32::from(sid_bits))
                    + STRTAB_BASE_CFG::SPLIT.val(u32::from(split))
            }
        });
        // 6. Attributes of the SMMU's own accesses: write-back inner-shareable when coherent, else non-cacheable.
        regs.cr1.write(if features.coherent {
            CR1::QUEUE_IC::WriteBackAllocate
                + CR1::QUEUE_OC::WriteBackAllocate
                + CR1::QUEUE_SH::Inner
                + CR1::TABLE_IC::WriteBackAllocate
                + CR1::TABLE_OC::WriteBackAllocate
                + CR1::TABLE_SH::Inner
        } else {
            CR1::QUEUE_IC::NonCacheable
                + CR1::QUEUE_OC::NonCacheable
                + CR1::QUEUE_SH::NonShareable
                + CR1::TABLE_IC::NonCacheable
                + CR1::TABLE_OC::NonCacheable
                + CR1::TABLE_SH::NonShareable
        });
        // Record C_BAD_STREAMID for streams beyond the table; private TLB maintenance (no broadcast TLBI).
        regs.cr2.write(CR2::RECINVSID::SET + CR2::PTM::SET);
        // 7. Queues, then (7a) the interrupts the caller asked for.
        program_queues(&self, &cmdq, &evtq, (cmdq_log2, evtq_log2), 0)?;
        enable_interrupts(regs, &features, options)?;
        let queues = CR0::CMDQEN::SET.value | CR0::EVENTQEN::SET.value;

        let active = SmmuCore::assemble(self, allocator, streams, cmdq, evtq);
        // 8. Forget everything the SMMU may have cached from before.
        active.invalidate_all().map_err(InitError::Invalidation)?;
        // 9. Translate.
        set_cr0(active.smmu.regs(), queues | CR0::SMMUEN::SET.value)?;
        Ok(active)
    }
}

impl<A: FrameAllocator> SmmuCore<A> {
    /// Turns interrupts, translation and the queues off and leaves incoming transactions to GBPA: aborting, or bypassing
    /// when `bypass` (the state QEMU resets to). The stream table and queues go back to the allocator (which no
    /// longer belongs to the SMMU, a [`HandoverMemory`](crate::handover::pool::HandoverMemory) has one owner), the layers above give back their own.
    ///
    /// # Errors
    /// [`InitError::Timeout`] when the SMMU does not acknowledge; the memory is then kept (leaked), since the SMMU may still read
    /// it.
    ///
    /// `then` runs with the allocator once translation is acknowledged off, before the SMMU's own memory goes back
    /// to it (the layers above give back theirs there); on an error it is dropped without running.
    pub(crate) fn shutdown_then(self, bypass: bool, then: impl FnOnce(&A)) -> Result<Smmu, InitError> {
        // This function decides what is freed, not `Drop`: on an error everything is leaked.
        let this = core::mem::ManuallyDrop::new(self);
        let regs = this.smmu.regs();
        set_global_abort(regs)?;
        regs.irq_ctrl.set(0);
        handshake("IRQ_CTRLACK", || regs.irq_ctrlack.get(), |v| v == 0)?;
        set_cr0(regs, 0)?;
        if bypass {
            handshake("GBPA", || regs.gbpa.get(), |v| v & GBPA::UPDATE::SET.value == 0)?;
            regs.gbpa
                .set((regs.gbpa.get() & !GBPA::ABORT::SET.value) | GBPA::UPDATE::SET.value);
            handshake("GBPA", || regs.gbpa.get(), |v| v & GBPA::UPDATE::SET.value == 0)?;
        }
        // SAFETY: `this` is never used again and never dropped (`ManuallyDrop`), and each field that owns anything
        // is moved out exactly once, here; the others (the ID allocators, the overflow, the flags) are plain values
        // without drop glue.
        let (smmu, allocator, streams, cmdq, evtq) = unsafe {
            (
                core::ptr::read(&this.smmu),
                core::ptr::read(&this.allocator),
                core::ptr::read(&this.streams).into_inner(),
                core::ptr::read(&this.cmdq),
                core::ptr::read(&this.evtq).into_inner().queue,
            )
        };
        then(&allocator);
        // SAFETY: SMMUEN, CMDQEN and EVENTQEN are acknowledged off, so the SMMU no longer touches this memory;
        // all of it came from `allocator`.
        unsafe {
            streams.free(&allocator);
            allocator.free(cmdq.into_memory());
            allocator.free(evtq.into_memory());
        }
        allocator.give_up_ownership();
        Ok(smmu)
    }

    /// A printable summary of the configuration chosen at init.
    pub fn configuration(&self) -> Configuration {
        let (streams, evtq) = (self.streams.lock(), self.evtq.lock());
        Configuration {
            stream_table: streams.format(),
            stream_table_base: streams.base().0,
            cmdq_entries: self.cmdq.geometry().entries(),
            cmdq_base: self.cmdq.memory().phys.0,
            eventq_entries: evtq.queue.geometry().entries(),
            eventq_base: evtq.queue.memory().phys.0,
            coherent: self.features().coherent,
            asid_bits: self.asids.bits(),
            vmid_bits: self.vmids.bits(),
        }
    }
}

/// The configuration chosen at init, for the console.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Configuration {
    /// Stream table format.
    pub stream_table: StreamTableFormat,
    /// Its physical base.
    pub stream_table_base: u64,
    /// Command queue entries.
    pub cmdq_entries: u32,
    /// Its physical base.
    pub cmdq_base: u64,
    /// Event queue entries.
    pub eventq_entries: u32,
    /// Its physical base.
    pub eventq_base: u64,
    /// Coherent table walks and queue accesses (write-back, inner shareable) rather than non-cacheable.
    pub coherent: bool,
    /// ASID width.
    pub asid_bits: u8,
    /// VMID width.
    pub vmid_bits: u8,
}

impl fmt::Display for Configuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "stream table at {:#x}: {}",
            self.stream_table_base, self.stream_table
        )?;
        writeln!(
            f,
            "command queue at {:#x}: {} entries; event queue at {:#x}: {} entries",
            self.cmdq_base, self.cmdq_entries, self.eventq_base, self.eventq_entries
        )?;
        write!(
            f,
            "SMMU accesses {}; ASID {} bits, VMID {} bits; unattached streams abort",
            if self.coherent {
                "write-back inner-shareable (coherent)"
            } else {
                "non-cacheable (not coherent)"
            },
            self.asid_bits,
            self.vmid_bits
        )
    }
}
