//! An initialised, translating SMMU: init in the architecture's order, STE installation through the hitless
//! writer, command submission, event draining and global-error handling.

use core::fmt;
use core::sync::atomic::Ordering;

use tock_registers::interfaces::{Readable, Writeable};

use crate::deadline::{Deadline, TimedOut};
use crate::domain::{DEFAULT_DOMAINS, DomainId, Domains};
use crate::features::{Features, Quirks};
use crate::hitless::{self, EntryState, EntryWriter, UpdateFailed, UpdateKind};
use crate::hw::command::{Command, SyncCompletion, TlbiRange, plan_range_invalidation};
use crate::hw::event::{Event, GlobalErrors};
use crate::hw::regs::{CR0, CR1, CR2, GBPA, STRTAB_BASE_CFG, SmmuPage0, cmdq_base, strtab_base, written_queue_base};
use crate::hw::ste::Ste;
use crate::ids::{IdAllocator, IdError};
use crate::mem::{AllocError, Coherency, FrameAllocator, MAX_WRITEBACK_GRANULE, PhysAddr, write_barrier};
use crate::pgtable::{Gather, IoPageTable, TableId};
use crate::queue::cmdq::{
    BATCH_CAPACITY, Batch, BatchReport, COMMAND_BYTES, CommandQueue, CommandQueueError, MMU700_COMMANDS_PER_SYNC,
};
use crate::queue::evtq::{DrainReport, EVENT_BYTES, EventQueue, Overflow};
use crate::queue::index::QueueGeometry;
use crate::smmu::Smmu;
use crate::stream::{StreamError, StreamTable, StreamTableFormat};
use crate::table::SlotWriter;

/// Above this many granules without range invalidation, [`ActiveSmmu::flush`] invalidates the whole ASID or VMID.
pub const PER_GRANULE_LIMIT: u32 = 32;

/// Whose TLB entries a page-table change affects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlbContext {
    /// A stage-1 table used with `asid` (and `vmid`, 0 without stage 2).
    Stage1 {
        /// ASID of the CD.
        asid: u16,
        /// VMID of the STE.
        vmid: u16,
    },
    /// A stage-1 table of the EL2 translation regime (STE.STRW = EL2, no E2H: one VA range, no ASIDs), on an
    /// SMMU with IDR0.HYP. Invalidated with TLBI_EL2_VA / TLBI_EL2_ALL.
    Stage1El2,
    /// A stage-2 table used with `vmid`.
    Stage2 {
        /// VMID of the STE.
        vmid: u16,
        /// Streams translate with both stages: combined entries must go too.
        nested: bool,
    },
}

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
    /// [`ActiveSmmu::drain_events`] and [`ActiveSmmu::handle_global_errors`]. With interrupts the caller still
    /// calls those, from its handler or after it.
    pub interrupts: InterruptSources,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            cmdq_log2_max: 8,
            eventq_log2_max: 8,
            max_sid_bits: 32,
            stream_table: StreamTableChoice::Auto,
            interrupts: InterruptSources::empty(),
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
    /// to STEs the driver cannot reach), or the SMMU runs with CR2.E2H set.
    StreamTableNotAdoptable {
        /// STRTAB_BASE's address as the SMMU holds it.
        running: u64,
        /// Where the caller said it is.
        expected: u64,
    },
    /// The allocator is memory for a single owner (a handover arena) that a domain or another SMMU owns already
    /// ([`FrameAllocator::take_ownership`]): the SMMU's own structures cannot share it, since freeing that domain
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
                f.write_str("SMMU init: its memory (a handover arena) is owned already, by a domain or another SMMU")
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

/// Why an entry could not be installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachError {
    /// The stream cannot be reached.
    Stream(StreamError),
    /// The STE's invalidation command could not be encoded; nothing was written.
    Queue(CommandQueueError),
    /// An invalidation (CFGI_STE + CMD_SYNC) between two steps of the hitless writer failed. The writer stopped
    /// there: the STE in memory holds [`UpdateFailed::left`], a configuration the SMMU may read safely, but the
    /// SMMU may still be using the one the last completed sync announced.
    Invalidation(UpdateFailed<CommandQueueError>),
    /// The stream is attached to a domain, which owns its STE: detach it first. Nothing was written.
    StreamInUse {
        /// StreamID.
        sid: u32,
        /// The domain it is attached to.
        domain: DomainId,
    },
}

impl fmt::Display for AttachError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttachError::Stream(e) => write!(f, "{e}"),
            AttachError::Queue(e) => write!(f, "STE invalidation: {e}"),
            AttachError::Invalidation(e) => write!(
                f,
                "STE invalidation failed after {} sync(s); the STE is left {}: {}",
                e.syncs, e.left, e.error
            ),
            AttachError::StreamInUse { sid, domain } => {
                write!(
                    f,
                    "stream {sid:#x} is attached to {domain}, which owns its STE: detach it first"
                )
            }
        }
    }
}

/// Why a TLB invalidation could not be done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidationError {
    /// The command queue failed (a command refused, a timeout, service failure).
    Queue(CommandQueueError),
    /// [`TlbContext::Stage1El2`] on an SMMU without EL2 contexts (IDR0.HYP = 0); nothing was issued.
    NoEl2Contexts,
    /// The gather was filled by another page table than the one given ([`ActiveSmmu::flush`]): nothing was
    /// issued and nothing freed.
    ForeignGather {
        /// The table that filled the gather.
        owner: TableId,
        /// The table given with it.
        table: TableId,
    },
}

impl fmt::Display for InvalidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidationError::Queue(e) => write!(f, "{e}"),
            InvalidationError::NoEl2Contexts => {
                f.write_str("an EL2 stage-1 context on an SMMU without EL2 contexts (IDR0.HYP = 0)")
            }
            InvalidationError::ForeignGather { owner, table } => {
                write!(f, "a gather filled by {owner} was flushed with {table}")
            }
        }
    }
}

/// Why [`ActiveSmmu::flush`] failed. The gathered tables were not released: they are handed back in
/// [`FlushError::gather`], still owned by the caller, since a walk may still reach them. Flushing that gather again
/// (once the queue works) completes the job; dropping it leaks the tables, which is safe.
#[derive(Debug)]
pub struct FlushError {
    /// What went wrong.
    pub error: InvalidationError,
    /// The invalidation still owed, and the unlinked tables it guards.
    pub gather: Gather,
}

impl fmt::Display for FlushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TLB invalidation failed ({}); {} unlinked table(s) kept until it succeeds",
            self.error,
            self.gather.freed_tables()
        )
    }
}

/// What an STE installation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstallReport {
    /// The path the hitless writer took.
    pub kind: UpdateKind,
    /// CFGI_STE + CMD_SYNC rounds issued.
    pub syncs: u32,
    /// A level-2 span was allocated for the stream.
    pub new_span: bool,
}

/// A fatal global error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalError {
    /// GERROR.SFM_ERR: the SMMU entered service failure mode and stopped translating; it needs a reset.
    ServiceFailure(GlobalErrors),
}

impl fmt::Display for GlobalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GlobalError::ServiceFailure(all) => write!(
                f,
                "SMMU service failure (GERROR.SFM_ERR; active: {all}): translation stopped, the SMMU needs a reset"
            ),
        }
    }
}

/// An initialised SMMU (SMMUEN = 1), every stream aborting until something is attached, with room for `D` domains
/// (see [`crate::domain`]).
///
/// **Dropping it** (a plain drop, a `?` past it) turns translation off with every incoming transaction aborting
/// ([`Smmu::disable_aborting`]: GBPA.ABORT = 1, then SMMUEN = 0): nothing may translate through memory that nobody
/// manages any more. The domains' page tables go back to their memory only once SMMUEN = 0 is acknowledged; when
/// the SMMU does not acknowledge, they are leaked, since it may still walk them. The stream table, the queues and
/// the streams' CD tables are leaked either way ([`ActiveSmmu::shutdown`] gives the first two back). To leave the
/// SMMU translating for the next image (a hand-off with the SMMU running), `core::mem::forget` the driver instead.
pub struct ActiveSmmu<A: FrameAllocator, const D: usize = DEFAULT_DOMAINS> {
    pub(crate) smmu: Smmu,
    allocator: A,
    streams: StreamTable,
    pub(crate) cmdq: CommandQueue,
    pub(crate) evtq: EventQueue,
    asids: IdAllocator,
    vmids: IdAllocator,
    pub(crate) pending_overflow: Option<Overflow>,
    pub(crate) domains: Domains<D>,
    /// Adopted from a previous image ([`Smmu::adopt_running`]): STEs that image left may still be live, so a
    /// refused restore must make every stream but this image's own abort. Cleared once they are aborted.
    pub(crate) inherited_stes: bool,
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
fn set_cr0(regs: &SmmuPage0, value: u32) -> Result<(), InitError> {
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
fn allocate_queues<A: FrameAllocator>(
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
    /// Initialises the SMMU in the architecture's order and enables translation with every stream aborting:
    /// GBPA.ABORT = 1 (so nothing bypasses while it is reprogrammed), SMMUEN and the queues off, interrupts off,
    /// global errors acknowledged, the stream table (see [`StreamTableFormat::choose`]), CR1/CR2, the command and
    /// event queues, the interrupts of [`InitOptions::interrupts`] (none by default), a full invalidation (CFGI_ALL, TLBI_EL2_ALL when EL2 contexts exist,
    /// TLBI_NSNH_ALL, CMD_SYNC), then SMMUEN.
    ///
    /// Memory comes from `allocator`, which the returned handle keeps and owns
    /// ([`FrameAllocator::take_ownership`]): a domain cannot be created on memory for a single owner (a handover
    /// arena) that holds the SMMU's own structures, since freeing the domain would give that memory back.
    ///
    /// # Errors
    /// [`InitError::MemoryOwned`] for an allocator a domain or another SMMU owns (nothing done),
    /// [`InitError::NoMemory`] (everything allocated so far is freed), [`InitError::PresetBases`],
    /// [`InitError::Timeout`] for a register handshake that never completes and [`InitError::Invalidation`];
    /// after a timeout the SMMU is left disabled with GBPA.ABORT set where that much succeeded, and its memory
    /// kept (the allocator stays owned), since the SMMU may have been given it.
    pub fn init<A: FrameAllocator>(self, allocator: A, options: &InitOptions) -> Result<ActiveSmmu<A>, InitError> {
        self.init_with_capacity::<A, DEFAULT_DOMAINS>(allocator, options)
    }

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
    /// walks no table and fetches no command; its memory is not freed (see [`ActiveSmmu::shutdown`] for that). What
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

    /// Takes over an SMMU that a previous image left translating (SMMUEN = 1), without a moment of bypass or
    /// abort for the streams it serves: translation is never turned off and STRTAB_BASE (which must not be
    /// rewritten while SMMUEN = 1) is adopted as found, reached through `allocator` (the handover arena the previous
    /// image's SMMU took its memory from, which the returned handle then owns, as [`Smmu::init`]'s). Nothing is
    /// adopted unless the SMMU is the one `running` describes (what
    /// the previous image recorded): SMMUEN on, IDR0..5 and IIDR as recorded, STRTAB_BASE and STRTAB_BASE_CFG read
    /// back as the recorded stream table, CR2.E2H clear. The queues are
    /// turned off, global errors latched before acknowledged, the queues given fresh bases from `allocator` and
    /// turned on again, the interrupts of `options` enabled, and the cached configurations and TLB entries
    /// invalidated (the STEs and tables they came from are unchanged). Streams that nobody will restore keep their
    /// STEs until [`ActiveSmmu::restore_handover`] (or [`ActiveSmmu::abort_unrestored_streams`]) aborts them, and
    /// until then no ASID or VMID is allocated (a refused restore aborts them all). When the
    /// running SMMU_CR1 makes the SMMU's own accesses non-cacheable, the SMMU is treated as non-coherent
    /// ([`Features::coherent`] false) whatever the board said.
    ///
    /// # Errors
    /// [`InitError::NotRunning`], [`InitError::IdentityMismatch`], [`InitError::MemoryOwned`],
    /// [`InitError::StreamTableNotAdoptable`], [`InitError::NoMemory`] for the queues, [`InitError::Timeout`],
    /// [`InitError::Invalidation`]. On every error the SMMU is left as [`Smmu::disable_aborting`] leaves it (as far
    /// as its handshakes complete): translation off, every incoming transaction aborting. The previous image's STEs
    /// walk memory this image has not taken back, so nothing may translate through them; initialise the SMMU
    /// afresh. `allocator` stays owned only when translation could not be turned off.
    pub fn adopt_running<A: FrameAllocator>(
        mut self,
        allocator: A,
        options: &InitOptions,
        running: &RunningSmmu,
    ) -> Result<ActiveSmmu<A>, InitError> {
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
        let mut active = ActiveSmmu::assemble(self, allocator, streams, cmdq, evtq);
        active.inherited_stes = true;
        if let Err(e) = active.invalidate_all() {
            // `active` has no domain yet; its drop turns translation off once more.
            return refuse(&active.smmu, &active.allocator, InitError::Invalidation(e));
        }
        Ok(active)
    }

    /// As [`Smmu::init`], with room for `D` domains instead of [`DEFAULT_DOMAINS`].
    ///
    /// # Errors
    /// As [`Smmu::init`].
    pub fn init_with_capacity<A: FrameAllocator, const D: usize>(
        self,
        allocator: A,
        options: &InitOptions,
    ) -> Result<ActiveSmmu<A, D>, InitError> {
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

        let mut active = ActiveSmmu::assemble(self, allocator, streams, cmdq, evtq);
        // 8. Forget everything the SMMU may have cached from before.
        active.invalidate_all().map_err(InitError::Invalidation)?;
        // 9. Translate.
        set_cr0(active.smmu.regs(), queues | CR0::SMMUEN::SET.value)?;
        Ok(active)
    }
}

impl<A: FrameAllocator, const D: usize> ActiveSmmu<A, D> {
    /// The driver's state over an SMMU whose queues are programmed: no IDs taken, no domains.
    fn assemble(smmu: Smmu, allocator: A, streams: StreamTable, cmdq: CommandQueue, evtq: EventQueue) -> Self {
        let features = *smmu.features();
        ActiveSmmu {
            smmu,
            allocator,
            streams,
            cmdq,
            evtq,
            asids: IdAllocator::new(features.asid_bits),
            vmids: IdAllocator::new(features.vmid_bits),
            pending_overflow: None,
            domains: Domains::new(),
            inherited_stes: false,
        }
    }

    /// What the SMMU implements.
    pub fn features(&self) -> &Features {
        self.smmu.features()
    }

    /// The stream table format chosen at init.
    pub fn stream_table_format(&self) -> StreamTableFormat {
        self.streams.format()
    }

    /// Level-2 stream table spans allocated so far (2-level tables only).
    pub fn allocated_spans(&self) -> u32 {
        self.streams.allocated_spans()
    }

    /// Command queue entries.
    pub fn cmdq_entries(&self) -> u32 {
        self.cmdq.geometry().entries()
    }

    /// Event queue entries.
    pub fn eventq_entries(&self) -> u32 {
        self.evtq.geometry().entries()
    }

    /// The allocator the SMMU's memory comes from.
    pub fn allocator(&self) -> &A {
        &self.allocator
    }

    /// Whether translation is on (CR0ACK.SMMUEN).
    pub fn is_enabled(&self) -> bool {
        self.smmu.is_enabled()
    }

    /// Installs `ste` for `sid` through the hitless writer: the SMMU never sees an entry that is illegal or more
    /// permissive than the old or the new one; each step is followed by CFGI_STE + CMD_SYNC.
    ///
    /// Crate-private, and blind to the domain bookkeeping: its callers (domains attaching and detaching, a
    /// restore) keep that bookkeeping themselves. An STE written from outside could name a live domain's VMID or
    /// CD table, or replace the STE of a stream a domain owns; safe code outside uses a domain,
    /// [`ActiveSmmu::attach_abort`] or [`ActiveSmmu::attach_bypass`].
    ///
    /// ```compile_fail,E0624
    /// fn raw<A: smmuv3::FrameAllocator>(smmu: &mut smmuv3::ActiveSmmu<A>) {
    ///     let _ = smmu.install_ste(0x10, &smmuv3::hw::ste::Ste::abort());
    /// }
    /// ```
    ///
    /// # Errors
    /// [`AttachError::Stream`] for a StreamID beyond the table or no memory for its level-2 span (nothing
    /// changes then); [`AttachError::Invalidation`] when an invalidation fails: the writer stops at that step and
    /// says what the STE holds.
    pub(crate) fn install_ste(&mut self, sid: u32, ste: &Ste) -> Result<InstallReport, AttachError> {
        let coherency = self.streams.coherency();
        let slot = self.streams.slot(sid, &self.allocator).map_err(AttachError::Stream)?;
        let live: [u64; 8] = core::array::from_fn(|i| slot.words[i].load(Ordering::Relaxed));
        let invalidate = Command::CfgiSte {
            sid,
            leaf: !slot.new_span,
        }
        .encode()
        .map_err(|e| AttachError::Queue(CommandQueueError::Encoding(e)))?;
        let (cmdq, regs) = (&mut self.cmdq, self.smmu.regs());
        let mut writer = SlotWriter {
            words: slot.words,
            coherency,
            invalidate: || cmdq.submit(regs, &[invalidate], true).map(drop),
            syncs: 0,
        };
        let kind = hitless::update_entry::<Ste, _>(&live, &ste.0, &mut writer).map_err(AttachError::Invalidation)?;
        if slot.new_span && writer.syncs == 0 {
            // A new span's level-1 descriptor is invalidated even when the STE itself did not change.
            writer.sync().map_err(|error| {
                AttachError::Invalidation(UpdateFailed {
                    error,
                    syncs: 0,
                    left: EntryState::New,
                })
            })?;
        }
        Ok(InstallReport {
            kind,
            syncs: writer.syncs,
            new_span: slot.new_span,
        })
    }

    /// Fails with [`AttachError::StreamInUse`] when `sid` is attached to a domain (which owns its STE).
    fn unowned(&self, sid: u32) -> Result<(), AttachError> {
        match self.domains.stream(sid) {
            Some(i) => Err(AttachError::StreamInUse {
                sid,
                domain: self.domains.streams[i].domain,
            }),
            None => Ok(()),
        }
    }

    /// Makes every stream whose STE exists abort, except those `keep` names (after a hand-off with the SMMU
    /// running: the streams no record names). Returns how many were changed.
    ///
    /// # Errors
    /// [`AttachError::StreamInUse`] when a stream attached to a domain is not kept (detach it first): nothing
    /// changes then. Otherwise as [`ActiveSmmu::attach_abort`]: the streams before the failing one abort.
    pub fn abort_streams_except(&mut self, keep: impl Fn(u32) -> bool) -> Result<u32, AttachError> {
        if let Some(r) = self.domains.streams.iter().find(|r| !keep(r.sid)) {
            return Err(AttachError::StreamInUse {
                sid: r.sid,
                domain: r.domain,
            });
        }
        let mut changed = 0;
        let sid_bits = self.streams.format().sid_bits();
        let span = self.streams.span_len();
        // Only the spans that exist hold STEs: the others are skipped whole.
        for first in (0..(1u64 << sid_bits)).step_by(span as usize) {
            if !self.streams.exists(first as u32) {
                continue;
            }
            for sid in first..first + span {
                let sid = sid as u32;
                if keep(sid) {
                    continue;
                }
                let live = match self.streams.read(sid) {
                    Ok(ste) => ste,
                    Err(_) => continue,
                };
                if live == Ste::invalid() || live == Ste::abort() {
                    continue;
                }
                self.abort_stream(sid)?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// The STE currently installed for `sid` (all zero, i.e. invalid, for an unallocated level-2 span).
    ///
    /// # Errors
    /// [`StreamError::UnknownStream`] for a StreamID beyond the table.
    pub fn ste(&self, sid: u32) -> Result<Ste, StreamError> {
        self.streams.read(sid)
    }

    /// Makes `sid` abort every transaction, silently (no event). For a stream no domain holds (a domain's stream
    /// aborts when it is detached).
    ///
    /// # Errors
    /// [`AttachError::StreamInUse`] for a stream attached to a domain, and [`AttachError::Stream`] for a
    /// StreamID beyond the table or no memory for its level-2 span: nothing changes then.
    /// [`AttachError::Invalidation`] when an invalidation fails: the STE is left as the error says.
    pub fn attach_abort(&mut self, sid: u32) -> Result<InstallReport, AttachError> {
        self.unowned(sid)?;
        self.abort_stream(sid)
    }

    /// Makes `sid` abort, whether or not a domain holds it: for the crate's own paths that keep the bookkeeping
    /// (a detach, a restore undoing itself).
    pub(crate) fn abort_stream(&mut self, sid: u32) -> Result<InstallReport, AttachError> {
        self.install_ste(sid, &Ste::abort())
    }

    /// Lets `sid`'s transactions through untranslated. Only on explicit request: a bypassed device reaches all of
    /// memory.
    ///
    /// # Errors
    /// As [`ActiveSmmu::attach_abort`]: a stream attached to a domain is refused with
    /// [`AttachError::StreamInUse`].
    pub fn attach_bypass(&mut self, sid: u32) -> Result<InstallReport, AttachError> {
        self.unowned(sid)?;
        let bypass = Ste::bypass_for(&self.features().entry_rules());
        self.install_ste(sid, &bypass)
    }

    /// Submits a batch and a CMD_SYNC, and waits for completion. A command the SMMU could not fetch
    /// (CERROR_ABT) is fetched again; one it refuses as illegal (CERROR_ILL) is replaced with a CMD_SYNC so the
    /// rest of the batch completes, and the submission then fails. On an SMMU with
    /// [`crate::features::Quirks::CMDQ_SYNC_EVERY_63`] a CMD_SYNC is inserted after every 63 commands. Public for
    /// experts: every command is vetted first ([`crate::hw::command::vet`]) so that it can only invalidate,
    /// prefetch or synchronise: an extra batch costs time but cannot change what a domain translates, nor make the
    /// SMMU write memory (a CMD_SYNC with an MSI is refused).
    ///
    /// # Errors
    /// [`CommandQueueError::NotAllowed`] for a command the vetting refuses (nothing is written),
    /// [`CommandQueueError::Refused`] (after the rest of the batch completed) when a command was illegal,
    /// [`CommandQueueError::Timeout`] when the SMMU stops consuming, [`CommandQueueError::ServiceFailure`].
    pub fn submit(&mut self, batch: &Batch) -> Result<BatchReport, CommandQueueError> {
        for (index, words) in batch.words().iter().enumerate() {
            crate::hw::command::vet(words).map_err(|reason| CommandQueueError::NotAllowed { index, reason })?;
        }
        self.cmdq.submit(self.smmu.regs(), batch.words(), true)
    }

    /// [`ActiveSmmu::submit`] without the vetting: any command, for tests that inject one the SMMU must refuse
    /// (a reserved opcode) and for commands this driver does not model.
    ///
    /// # Safety
    /// No command of `batch` may make the SMMU write memory the caller does not own for that purpose (a CMD_SYNC's
    /// MSI), nor change what a stream translates or what a device caches (ATS, PRI and stall commands): the driver
    /// cannot tell what they do.
    ///
    /// # Errors
    /// As [`ActiveSmmu::submit`], without [`CommandQueueError::NotAllowed`].
    pub unsafe fn submit_unvetted(&mut self, batch: &Batch) -> Result<BatchReport, CommandQueueError> {
        self.cmdq.submit(self.smmu.regs(), batch.words(), true)
    }

    /// Invalidates every cached configuration and TLB entry: CFGI_ALL, TLBI_EL2_ALL (when the SMMU has EL2
    /// contexts), TLBI_NSNH_ALL, CMD_SYNC.
    ///
    /// # Errors
    /// As [`ActiveSmmu::submit`].
    pub fn invalidate_all(&mut self) -> Result<BatchReport, CommandQueueError> {
        let mut batch = Batch::new();
        batch.push(&Command::CfgiAll)?;
        if self.features().hyp {
            batch.push(&Command::TlbiEl2All)?;
        }
        batch.push(&Command::TlbiNsnhAll)?;
        self.submit(&batch)
    }

    /// Invalidates what `gather` collected from `table` for `context`, waits for it to complete (CMD_SYNC), then
    /// gives the tables the gather unlinked back to their allocator (only now can no walk reach them). The least
    /// invalidation: range TLBIs when the SMMU has them (IDR3.RIL), one TLBI per granule up to
    /// [`PER_GRANULE_LIMIT`], else the whole ASID, VMID or EL2 regime. Leaf-only when no table was unlinked.
    ///
    /// A stage-2 change under nested translation also drops the VMID's combined stage-1 entries, which cannot be
    /// found by IPA, in the order the architecture's stage-2 maintenance needs (as the CPU's TLBI IPAS2E1; DSB;
    /// TLBI VMALLE1): TLBI_S2_IPA, **CMD_SYNC**, TLBI_NH_ALL, CMD_SYNC. Without the first sync a walk could
    /// rebuild a combined entry from a stage-2 entry that is still being invalidated.
    ///
    /// The page-table code changes descriptors but invalidates nothing itself: after `map` over what was unmapped,
    /// `unmap` or `protect`, the caller flushes the gather here before it relies on the change (or before it reuses
    /// what was unmapped).
    ///
    /// # Errors
    /// [`FlushError`] when the invalidation failed (a refused command, a timeout, service failure), for
    /// [`TlbContext::Stage1El2`] when the SMMU has no EL2 contexts, or with
    /// [`InvalidationError::ForeignGather`] when another table than `table` filled `gather` (nothing issued). The
    /// tables are then **not** released: the error hands the gather back.
    pub fn flush<T: FrameAllocator>(
        &mut self,
        table: &mut IoPageTable<T>,
        gather: Gather,
        context: TlbContext,
    ) -> Result<BatchReport, FlushError> {
        if let Some(owner) = gather.owner()
            && !table.owns(&gather)
        {
            return Err(FlushError {
                error: InvalidationError::ForeignGather {
                    owner,
                    table: table.id(),
                },
                gather,
            });
        }
        let report = if gather.is_empty() {
            BatchReport::default()
        } else if context == TlbContext::Stage1El2 && !self.features().hyp {
            return Err(FlushError {
                error: InvalidationError::NoEl2Contexts,
                gather,
            });
        } else {
            match self.invalidation(table.format().granule, &gather, context) {
                Ok(report) => report,
                Err(error) => {
                    return Err(FlushError {
                        error: InvalidationError::Queue(error),
                        gather,
                    });
                }
            }
        };
        // SAFETY: the invalidation covering `gather` (walk caches included when it unlinked tables) has completed
        // with its CMD_SYNC, or the gather is empty (it unlinked nothing).
        match unsafe { table.release(gather) } {
            Ok(()) => Ok(report),
            // Checked above; kept as an error rather than a panic.
            Err(refused) => Err(FlushError {
                error: InvalidationError::ForeignGather {
                    owner: refused.gather.owner().unwrap_or(refused.table),
                    table: refused.table,
                },
                gather: refused.gather,
            }),
        }
    }

    /// Issues the TLB invalidation that covers `gather` and waits for it.
    fn invalidation(
        &mut self,
        granule: crate::pgtable::Granule,
        gather: &Gather,
        context: TlbContext,
    ) -> Result<BatchReport, CommandQueueError> {
        invalidate_gather(&mut self.cmdq, &self.smmu, granule, gather, context)
    }

    /// Reads the global errors, acknowledges the recoverable ones and reports them. An event queue abort is
    /// remembered as an overflow for the next [`ActiveSmmu::drain_events`]. Command errors are recovered by the
    /// command queue itself while it waits.
    ///
    /// # Errors
    /// [`GlobalError::ServiceFailure`] when GERROR.SFM_ERR is active (not acknowledged: the SMMU needs a reset).
    pub fn handle_global_errors(&mut self) -> Result<GlobalErrors, GlobalError> {
        let regs = self.smmu.regs();
        let gerror = regs.gerror.get();
        let gerrorn = regs.gerrorn.get();
        let active = crate::hw::event::active(gerror, gerrorn);
        if active.contains(GlobalErrors::SFM_ERR) {
            return Err(GlobalError::ServiceFailure(active));
        }
        let recoverable = active - GlobalErrors::CMDQ_ERR;
        if recoverable.contains(GlobalErrors::EVENTQ_ABT_ERR) {
            self.pending_overflow = Some(Overflow::EventQueueAbort);
        }
        if !recoverable.is_empty() {
            regs.gerrorn
                .set(crate::hw::event::acknowledge(gerror, gerrorn, recoverable));
            // An event queue abort may disable the queue on some implementations: turn it back on, and wait for
            // CR0ACK (bounded; on a timeout the next call tries again, as CR0ACK.EVENTQEN still reads 0).
            if !regs.cr0ack.is_set(CR0::EVENTQEN) {
                let _ = set_cr0(regs, regs.cr0.get() | CR0::EVENTQEN::SET.value);
            }
        }
        Ok(active)
    }

    /// Consumes every event the SMMU recorded, handing each to `sink`, and reports lost events however the SMMU
    /// signalled them (EVENTQ_PROD.OVFLG or GERROR.EVENTQ_ABT_ERR).
    ///
    /// # Errors
    /// [`GlobalError::ServiceFailure`] as [`ActiveSmmu::handle_global_errors`].
    pub fn drain_events(&mut self, sink: impl FnMut(Event)) -> Result<DrainReport, GlobalError> {
        self.handle_global_errors()?;
        let mut report = self.evtq.drain(self.smmu.page1_regs(), sink);
        if report.overflow.is_none() {
            report.overflow = self.pending_overflow;
        }
        self.pending_overflow = None;
        Ok(report)
    }

    /// Allocates an ASID (8 or 16 bits as IDR0.ASID16 says; 0 is reserved).
    ///
    /// # Errors
    /// [`IdError::Exhausted`]; [`IdError::HandOffUnsettled`] on an SMMU adopted running until the hand-off is
    /// restored (or its unrestored streams aborted): a stream the previous image left may use any ASID.
    pub fn allocate_asid(&mut self) -> Result<u16, IdError> {
        if self.inherited_stes {
            return Err(IdError::HandOffUnsettled);
        }
        self.asids.allocate()
    }

    /// Frees an ASID taken with [`ActiveSmmu::allocate_asid`]. A domain's ASID goes back when the domain is freed,
    /// after its TLB entries: freeing it here would let a later allocation hand it out while the domain still uses
    /// it.
    ///
    /// # Errors
    /// [`IdError::Owned`] for an ASID a live domain owns, [`IdError::WrongState`] / [`IdError::OutOfRange`] for an
    /// ASID that is not allocated; nothing changes.
    pub fn free_asid(&mut self, asid: u16) -> Result<(), IdError> {
        if self.domains.owns_asid(asid) {
            return Err(IdError::Owned { id: asid });
        }
        self.asids.free(asid)
    }

    /// Frees an ASID whatever owns it: for a domain that is going (or was never recorded).
    pub(crate) fn release_asid(&mut self, asid: u16) -> Result<(), IdError> {
        self.asids.free(asid)
    }

    /// Marks `asid` allocated (a restore reserving what a record names).
    pub(crate) fn claim_asid(&mut self, asid: u16) -> Result<(), IdError> {
        self.asids.claim(asid)
    }

    /// Whether `asid` is allocated here (0, reserved, always is).
    pub(crate) fn asid_taken(&self, asid: u16) -> bool {
        self.asids.is_allocated(asid)
    }

    /// Whether `vmid` is allocated here (0, reserved, always is).
    pub(crate) fn vmid_taken(&self, vmid: u16) -> bool {
        self.vmids.is_allocated(vmid)
    }

    /// Marks `vmid` allocated (a restore reserving what a record names).
    pub(crate) fn claim_vmid(&mut self, vmid: u16) -> Result<(), IdError> {
        self.vmids.claim(vmid)
    }

    /// ASIDs allocated now (the reserved ASID 0 not counted).
    pub fn asids_in_use(&self) -> u32 {
        self.asids.in_use() - 1
    }

    /// VMIDs allocated now (the reserved VMID 0 not counted).
    pub fn vmids_in_use(&self) -> u32 {
        self.vmids.in_use() - 1
    }

    /// Allocates a VMID (8 or 16 bits as IDR0.VMID16 says; 0 is reserved).
    ///
    /// # Errors
    /// As [`ActiveSmmu::allocate_asid`].
    pub fn allocate_vmid(&mut self) -> Result<u16, IdError> {
        if self.inherited_stes {
            return Err(IdError::HandOffUnsettled);
        }
        self.vmids.allocate()
    }

    /// Frees a VMID taken with [`ActiveSmmu::allocate_vmid`] (a domain's goes back when the domain is freed).
    ///
    /// # Errors
    /// As [`ActiveSmmu::free_asid`]: [`IdError::Owned`] for a VMID a live stage-2 domain owns.
    pub fn free_vmid(&mut self, vmid: u16) -> Result<(), IdError> {
        if self.domains.owns_vmid(vmid) {
            return Err(IdError::Owned { id: vmid });
        }
        self.vmids.free(vmid)
    }

    /// Frees a VMID whatever owns it: for a domain that is going (or was never recorded).
    pub(crate) fn release_vmid(&mut self, vmid: u16) -> Result<(), IdError> {
        self.vmids.free(vmid)
    }

    /// Turns interrupts, translation and the queues off and leaves incoming transactions to GBPA: aborting, or bypassing
    /// when `bypass` (the state QEMU resets to). The stream table and queues go back to the allocator (which no
    /// longer belongs to the SMMU, see [`FrameAllocator::take_ownership`]), every domain's page tables to its memory.
    ///
    /// # Errors
    /// [`InitError::Timeout`] when the SMMU does not acknowledge; the memory is then kept (leaked), the domains'
    /// page tables included, since the SMMU may still read it.
    pub fn shutdown(self, bypass: bool) -> Result<Smmu, InitError> {
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
        let (smmu, allocator, streams, cmdq, evtq, domains) = unsafe {
            (
                core::ptr::read(&this.smmu),
                core::ptr::read(&this.allocator),
                core::ptr::read(&this.streams),
                core::ptr::read(&this.cmdq),
                core::ptr::read(&this.evtq),
                core::ptr::read(&this.domains),
            )
        };
        // SAFETY: SMMUEN, CMDQEN and EVENTQEN are acknowledged off, so the SMMU no longer touches this memory;
        // all of it came from `allocator`.
        unsafe {
            streams.free(&allocator);
            allocator.free(cmdq.into_memory());
            allocator.free(evtq.into_memory());
        }
        // Translation is off: no walk reaches a domain's tables any more, and they go back to their memory.
        drop(domains);
        allocator.give_up_ownership();
        Ok(smmu)
    }

    /// A printable summary of the configuration chosen at init.
    pub fn configuration(&self) -> Configuration {
        Configuration {
            stream_table: self.streams.format(),
            stream_table_base: self.streams.base().0,
            cmdq_entries: self.cmdq.geometry().entries(),
            cmdq_base: self.cmdq.memory().phys.0,
            eventq_entries: self.evtq.geometry().entries(),
            eventq_base: self.evtq.memory().phys.0,
            coherent: self.features().coherent,
            asid_bits: self.asids.bits(),
            vmid_bits: self.vmids.bits(),
        }
    }
}

impl<A: FrameAllocator, const D: usize> Drop for ActiveSmmu<A, D> {
    /// Translation off, every incoming transaction aborting; the domains' page tables leaked unless SMMUEN = 0 is
    /// acknowledged (see [`ActiveSmmu`]).
    fn drop(&mut self) {
        let off = self.smmu.disable_aborting().is_ok() && !self.smmu.is_enabled();
        if !off {
            // The SMMU may still walk them: never back to an allocator that would hand them out again.
            self.domains.abandon_tables();
        }
    }
}

/// Issues the TLB invalidation that covers `gather` (see [`ActiveSmmu::flush`]) and waits for it.
pub(crate) fn invalidate_gather(
    cmdq: &mut CommandQueue,
    smmu: &Smmu,
    granule: crate::pgtable::Granule,
    gather: &Gather,
    context: TlbContext,
) -> Result<BatchReport, CommandQueueError> {
    let leaf = !gather.tables_unlinked();
    let one = |address: u64, range: Option<TlbiRange>| match context {
        TlbContext::Stage1 { asid, vmid } => Command::TlbiNhVa {
            vmid,
            asid,
            address,
            leaf,
            range,
        },
        TlbContext::Stage1El2 => Command::TlbiEl2Va {
            asid: 0,
            address,
            leaf,
            range,
        },
        TlbContext::Stage2 { vmid, .. } => Command::TlbiS2Ipa {
            vmid,
            address,
            leaf,
            range,
        },
    };
    let whole = match context {
        TlbContext::Stage1 { asid, vmid } => Command::TlbiNhAsid { vmid, asid },
        TlbContext::Stage1El2 => Command::TlbiEl2All,
        TlbContext::Stage2 { vmid, .. } => Command::TlbiS12Vmall { vmid },
    };
    let mut batch = Batch::new();
    let granules = gather.size() / granule.size();
    let ranged = if smmu.features().range_invalidation {
        plan_range_invalidation(gather.start(), gather.size(), granule, 0).ok()
    } else {
        None
    };
    match ranged {
        Some(plan) if plan.clone().count() < BATCH_CAPACITY - 2 => {
            for piece in plan {
                batch.push(&one(piece.address, piece.range))?;
            }
        }
        _ if granules <= u64::from(PER_GRANULE_LIMIT) => {
            for i in 0..granules {
                batch.push(&one(gather.start() + i * granule.size(), None))?;
            }
        }
        _ => batch.push(&whole)?,
    }
    if let TlbContext::Stage2 { vmid, nested: true } = context {
        // The stage-2 invalidation completes before the combined entries go (see `flush`).
        batch.push(&Command::Sync {
            completion: SyncCompletion::None,
        })?;
        batch.push(&Command::TlbiNhAll { vmid })?;
    }
    cmdq.submit(smmu.regs(), batch.words(), true)
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

#[cfg(test)]
pub(crate) mod tests {
    //! The whole driver against a small model of an SMMU on the host: a thread that acknowledges CR0, IRQ_CTRL
    //! and GBPA updates and consumes commands, recording what it saw when translation was switched on.
    extern crate std;

    use super::*;
    use crate::hw::command::{opcode, opcode_of};
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
        at_enable: Option<(bool, u64, Vec<u8>)>,
        /// CR0ACK when IRQ_CTRL was first seen non-zero.
        cr0ack_at_irq_enable: Option<u32>,
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
        stop: Arc<AtomicBool>,
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

        fn set_gerror(&self, value: u32) {
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

    #[test]
    fn init_follows_the_architecture_order_and_attaches() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
        let (abort, strtab, consumed) = model.seen.lock().unwrap().at_enable.clone().expect("SMMUEN was set");
        assert!(abort, "GBPA.ABORT set before translation was enabled");
        assert_eq!(strtab & !0x3f & ((1 << 52) - 1), smmu.configuration().stream_table_base);
        assert_eq!(strtab >> 62 & 1, 1, "RA");
        let read64 = |offset| {
            // SAFETY: inside the live block.
            unsafe {
                u64::from(reg32(model.base, offset).read_volatile())
                    | u64::from(reg32(model.base, offset + 4).read_volatile()) << 32
            }
        };
        let eventq_base = read64(0xa0);
        assert_eq!(eventq_base >> 62, 0b01, "EVENTQ_BASE.WA is bit 62; bit 63 is RES0");
        assert_eq!(eventq_base & !(0b11 << 62) & !0x1f, smmu.configuration().eventq_base);
        assert_eq!(read64(0x90) >> 62, 0b01, "CMDQ_BASE.RA");
        // CFGI_ALL, TLBI_NSNH_ALL (no EL2 contexts: IDR0.HYP = 0), CMD_SYNC, all before SMMUEN.
        assert_eq!(consumed, [opcode::CFGI_ALL, opcode::TLBI_NSNH_ALL, opcode::SYNC]);
        assert!(matches!(
            smmu.stream_table_format(),
            StreamTableFormat::TwoLevel { sid_bits: 16, split: 8 }
        ));
        assert_eq!((smmu.cmdq_entries(), smmu.eventq_entries()), (256, 256));

        let report = smmu.attach_bypass(0x10).unwrap();
        assert!(report.new_span);
        assert_eq!(smmu.ste(0x10), Ok(Ste::bypass_for(&smmu.features().entry_rules())));
        assert_eq!(smmu.ste(0x11), Ok(Ste::abort()), "the rest of the new span aborts");
        assert_eq!(smmu.ste(0x110), Ok(Ste::invalid()), "other spans do not exist yet");
        assert_eq!(smmu.attach_bypass(0x10).unwrap().syncs, 0);
        assert_eq!(
            smmu.attach_abort(1 << 16),
            Err(AttachError::Stream(StreamError::UnknownStream {
                sid: 1 << 16,
                sid_bits: 16
            }))
        );
        let before = model.seen.lock().unwrap().consumed.len();
        smmu.attach_abort(0x10).unwrap();
        let consumed = model.seen.lock().unwrap().consumed[before..].to_vec();
        assert_eq!(
            consumed,
            [opcode::CFGI_STE, opcode::SYNC],
            "bypass -> abort: one qword (QEMU has no IDR1.ATTR_TYPES_OVR, so bypass has no SHCFG to clear)"
        );

        let asid = smmu.allocate_asid().unwrap();
        let vmid = smmu.allocate_vmid().unwrap();
        assert_eq!((asid, vmid), (1, 1));
        assert_eq!(smmu.free_asid(asid), Ok(()));
        assert!(smmu.free_vmid(2).is_err());

        let smmu = smmu.shutdown(true).unwrap();
        assert!(!smmu.is_enabled());
        assert!(!smmu.global_bypass_aborts());
        assert_eq!(frames.live_blocks(), 0, "shutdown returns every table and queue");
    }

    #[test]
    fn interrupts_are_enabled_after_the_queues_and_off_at_shutdown() {
        let frames = frames();
        let model = Model::start(frames);
        let irq_ctrl = || {
            // SAFETY: inside the live block.
            unsafe { reg32(model.base, 0x50).read_volatile() }
        };
        let smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
        assert_eq!(irq_ctrl(), 0, "polling by default");
        smmu.shutdown(true).unwrap();
        let options = InitOptions {
            interrupts: InterruptSources::EVENTQ | InterruptSources::GERROR,
            ..InitOptions::default()
        };
        let smmu = model.smmu().init(frames, &options).unwrap();
        assert_eq!(irq_ctrl(), 0b101, "EVENTQ_IRQEN and GERROR_IRQEN, never PRIQ_IRQEN");
        let cr0ack = model.seen.lock().unwrap().cr0ack_at_irq_enable;
        assert_eq!(
            cr0ack,
            Some(0b1100),
            "enabled once CMDQEN and EVENTQEN were acknowledged, before SMMUEN"
        );
        smmu.shutdown(true).unwrap();
        assert_eq!(irq_ctrl(), 0, "no interrupt outlives the driver");
    }

    #[test]
    fn the_boards_coherency_decides_the_smmus_attributes() {
        let frames = frames();
        let model = Model::start(frames);
        let cr1 = || {
            // SAFETY: inside the live block.
            unsafe { reg32(model.base, 0x28).read_volatile() }
        };
        let mut smmu = model.smmu();
        assert!(
            !smmu.apply_board_coherency(true),
            "IDR0.COHACC = 1 and the board agrees"
        );
        let active = smmu.init(frames, &InitOptions::default()).unwrap();
        assert_eq!(
            cr1(),
            0xd75,
            "tables and queues write-back (0b01), inner shareable (0b11)"
        );
        let mut smmu = active.shutdown(true).unwrap();
        assert!(smmu.apply_board_coherency(false), "the board overrides IDR0.COHACC");
        assert!(!smmu.features().coherent);
        let active = smmu.init(frames, &InitOptions::default()).unwrap();
        assert_eq!(cr1(), 0, "tables and queues non-cacheable, non-shareable");
        active.shutdown(true).unwrap();
    }

    #[test]
    fn global_errors() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
        // An event queue abort is acknowledged and reported as lost events.
        model.set_gerror(GlobalErrors::EVENTQ_ABT_ERR.bits());
        let report = smmu.drain_events(|_| panic!("no records")).unwrap();
        assert_eq!(report.overflow, Some(Overflow::EventQueueAbort));
        assert!(
            smmu.handle_global_errors().unwrap().is_empty(),
            "acknowledged through GERRORN"
        );
        // An implementation that turned the event queue off on the abort: it is turned back on, and the call
        // returns only once CR0ACK says so.
        let regs = smmu.smmu.regs();
        regs.cr0.set(regs.cr0.get() & !CR0::EVENTQEN::SET.value);
        while regs.cr0ack.is_set(CR0::EVENTQEN) {
            std::thread::yield_now();
        }
        // (A GERROR bit is active while it differs from GERRORN's: toggled back, the abort is active again.)
        model.set_gerror(0);
        assert!(
            smmu.handle_global_errors()
                .unwrap()
                .contains(GlobalErrors::EVENTQ_ABT_ERR)
        );
        assert!(
            smmu.smmu.regs().cr0ack.is_set(CR0::EVENTQEN),
            "the event queue is on again"
        );
        smmu.drain_events(|_| {}).unwrap();
        // Service failure is fatal, with a message that says so (the abort bit left as acknowledged).
        model.set_gerror(GlobalErrors::SFM_ERR.bits());
        let error = smmu.handle_global_errors().unwrap_err();
        assert_eq!(error, GlobalError::ServiceFailure(GlobalErrors::SFM_ERR));
        assert!(std::format!("{error}").contains("needs a reset"));
    }

    #[test]
    fn no_memory_changes_nothing_on_the_smmu() {
        let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::new(HeapFrames::with_limit(4096)));
        let model = Model::start(frames);
        let error = model.smmu().init(frames, &InitOptions::default()).err();
        assert!(matches!(error, Some(InitError::NoMemory(_))), "{error:?}");
        assert_eq!(frames.live_blocks(), 0);
        // SAFETY: inside the live block.
        let (cr0, gbpa) = unsafe {
            (
                reg32(model.base, 0x20).read_volatile(),
                reg32(model.base, 0x44).read_volatile(),
            )
        };
        assert_eq!((cr0, gbpa), (0, 0), "CR0 and GBPA untouched");
    }

    #[test]
    fn flush_issues_the_least_invalidation_then_releases_tables() {
        use crate::pgtable::{Format, Gather, Granule, IoPageTable, Prot, Stage};
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
        let rw = Prot::READ | Prot::WRITE | Prot::CACHEABLE;
        let format = Format {
            stage: Stage::One,
            granule: Granule::Size4K,
            input_bits: 39,
            output_bits: 44,
        };
        let mut table = IoPageTable::new(format, frames, true).unwrap();
        table.map(0x40_0000, 0x8000_0000, 16 * 4096, rw).unwrap();
        let consumed = |model: &Model, from: usize| model.seen.lock().unwrap().consumed[from..].to_vec();

        // Part of a level-3 table: leaf-only range invalidation (RIL), one CMD_SYNC.
        let before = model.seen.lock().unwrap().consumed.len();
        let mut gather = Gather::default();
        table.unmap(0x40_0000, 4 * 4096, &mut gather).unwrap();
        let report = smmu
            .flush(&mut table, gather, TlbContext::Stage1 { asid: 3, vmid: 0 })
            .unwrap();
        assert_eq!(consumed(&model, before), [opcode::TLBI_NH_VA, opcode::SYNC]);
        assert_eq!(
            issued_since(&model, before),
            [
                Issued::NhVa {
                    vmid: 0,
                    asid: 3,
                    address: 0x40_0000
                },
                Issued::Sync
            ]
        );
        assert_eq!(report.syncs, 1);

        // The rest: the level-3 and level-2 tables are unlinked, freed only by the flush.
        let before = model.seen.lock().unwrap().consumed.len();
        let mut gather = Gather::default();
        table.unmap(0x40_0000, 16 * 4096, &mut gather).unwrap();
        assert_eq!(gather.freed_tables(), 2);
        let live = frames.live_blocks();
        smmu.flush(&mut table, gather, TlbContext::Stage2 { vmid: 5, nested: true })
            .unwrap();
        assert_eq!(frames.live_blocks(), live - 2);
        let ops = consumed(&model, before);
        assert_eq!(ops.first(), Some(&opcode::TLBI_S2_IPA));
        assert_eq!(
            &ops[ops.len() - 3..],
            [opcode::SYNC, opcode::TLBI_NH_ALL, opcode::SYNC],
            "nested: the stage-2 invalidation completes before the combined entries go"
        );
        assert!(ops[..ops.len() - 3].iter().all(|&op| op == opcode::TLBI_S2_IPA));
        let issued = issued_since(&model, before);
        assert!(
            issued[..issued.len() - 3]
                .iter()
                .all(|i| matches!(*i, Issued::S2Ipa { vmid: 5, address } if address < 0x4000_0000)),
            "{issued:?}"
        );
        assert_eq!(issued[issued.len() - 2], Issued::NhAll { vmid: 5 });

        // Nothing gathered: nothing issued.
        let before = model.seen.lock().unwrap().consumed.len();
        smmu.flush(&mut table, Gather::default(), TlbContext::Stage1 { asid: 3, vmid: 0 })
            .unwrap();
        assert_eq!(consumed(&model, before), []);
    }

    fn stage1_table(frames: &'static HeapFrames) -> crate::pgtable::IoPageTable<&'static HeapFrames> {
        use crate::pgtable::{Format, Granule, IoPageTable, Prot, Stage};
        let format = Format {
            stage: Stage::One,
            granule: Granule::Size4K,
            input_bits: 39,
            output_bits: 44,
        };
        let mut table = IoPageTable::new(format, frames, true).unwrap();
        table
            .map(
                0x40_0000,
                0x8000_0000,
                16 * 4096,
                Prot::READ | Prot::WRITE | Prot::CACHEABLE,
            )
            .unwrap();
        table
    }

    #[test]
    fn flush_keeps_the_unlinked_tables_when_the_invalidation_fails() {
        use crate::pgtable::Gather;
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
        let mut table = stage1_table(frames);
        let mut gather = Gather::default();
        table.unmap(0x40_0000, 16 * 4096, &mut gather).unwrap();
        assert_eq!(gather.freed_tables(), 2);
        let live = frames.live_blocks();
        model.refuse.store(opcode::TLBI_NH_VA, Ordering::SeqCst);
        let context = TlbContext::Stage1 { asid: 3, vmid: 0 };
        let error = smmu.flush(&mut table, gather, context).unwrap_err();
        assert!(
            matches!(
                error.error,
                InvalidationError::Queue(CommandQueueError::Refused { count: 1, .. })
            ),
            "{error}"
        );
        assert_eq!(frames.live_blocks(), live, "no table freed: a walk may still reach it");
        assert_eq!(error.gather.freed_tables(), 2, "the tables come back to the caller");
        // Once the SMMU takes the command, the same gather completes the job.
        model.refuse.store(0, Ordering::SeqCst);
        smmu.flush(&mut table, error.gather, context).unwrap();
        assert_eq!(frames.live_blocks(), live - 2);
    }

    #[test]
    fn flush_refuses_a_gather_another_table_filled() {
        use crate::pgtable::Gather;
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
        let mut a = stage1_table(frames);
        let mut b = stage1_table(frames);
        let mut gather = Gather::default();
        a.unmap(0x40_0000, 16 * 4096, &mut gather).unwrap();
        assert_eq!(gather.freed_tables(), 2);
        let live = frames.live_blocks();
        let before = model.seen.lock().unwrap().consumed.len();
        let context = TlbContext::Stage1 { asid: 3, vmid: 0 };
        let refused = smmu.flush(&mut b, gather, context).unwrap_err();
        assert_eq!(
            refused.error,
            InvalidationError::ForeignGather {
                owner: a.id(),
                table: b.id()
            }
        );
        assert_eq!(model.seen.lock().unwrap().consumed.len(), before, "nothing issued");
        assert_eq!(frames.live_blocks(), live, "a's tables are not freed through b");
        // The gather comes back whole: flushed with its own table, it is invalidated, then freed.
        assert_eq!(refused.gather.freed_tables(), 2);
        smmu.flush(&mut a, refused.gather, context).unwrap();
        assert_eq!(frames.live_blocks(), live - 2);
        assert!(model.seen.lock().unwrap().consumed.len() > before);
    }

    #[test]
    fn a_failed_ste_invalidation_stops_the_hitless_writer() {
        use crate::hw::ste::{Config, EXAMPLE_S2, Ste};
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
        smmu.attach_abort(0x10).unwrap();
        // abort -> stage 2 takes two steps: the qwords abort does not read (sync), then qword 0 (sync). The first
        // CFGI_STE is refused: the writer must not go on to qword 0.
        model.refuse.store(opcode::CFGI_STE, Ordering::SeqCst);
        let target = Ste::stage2(&EXAMPLE_S2, &smmu.features().entry_rules()).unwrap();
        let error = smmu.install_ste(0x10, &target).unwrap_err();
        let AttachError::Invalidation(failed) = error else {
            panic!("{error:?}")
        };
        assert_eq!((failed.syncs, failed.left), (0, EntryState::Old));
        assert!(matches!(failed.error, CommandQueueError::Refused { .. }));
        let left = smmu.ste(0x10).unwrap();
        assert_eq!(left.config(), Config::Abort, "qword 0 untouched after the failed sync");
        assert_eq!(left.0[1..], target.0[1..], "what the first step wrote stays");
        assert!(std::format!("{error}").contains("the old configuration"));
        model.refuse.store(0, Ordering::SeqCst);
        assert_eq!(smmu.install_ste(0x10, &target).unwrap().syncs, 1, "the rest, on retry");
        assert_eq!(smmu.ste(0x10), Ok(target));
    }

    #[test]
    fn init_fails_when_its_invalidation_is_refused() {
        let frames = frames();
        let model = Model::start(frames);
        model.refuse.store(opcode::CFGI_ALL, Ordering::SeqCst);
        let error = model.smmu().init(frames, &InitOptions::default()).err();
        assert!(
            matches!(error, Some(InitError::Invalidation(CommandQueueError::Refused { .. }))),
            "{error:?}"
        );
        // SAFETY: inside the live block.
        let cr0 = unsafe { reg32(model.base, 0x20).read_volatile() };
        assert_eq!(cr0 & 1, 0, "translation is not enabled over stale cached state");
    }

    #[test]
    fn el2_stage1_is_invalidated_with_el2_commands_only_where_the_smmu_has_el2_contexts() {
        use crate::pgtable::Gather;
        let frames = frames();
        // QEMU's SMMU has no IDR0.HYP: an EL2 context is refused, and nothing is issued.
        let model = Model::start(frames);
        let mut smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
        let mut table = stage1_table(frames);
        let mut gather = Gather::default();
        table.unmap(0x40_0000, 4096, &mut gather).unwrap();
        let before = model.seen.lock().unwrap().consumed.len();
        let error = smmu.flush(&mut table, gather, TlbContext::Stage1El2).unwrap_err();
        assert_eq!(error.error, InvalidationError::NoEl2Contexts);
        assert_eq!(model.seen.lock().unwrap().consumed.len(), before);
        smmu.shutdown(false).unwrap();
        drop(model);

        // With IDR0.HYP (bit 9): TLBI_EL2_VA, and init's invalidation includes TLBI_EL2_ALL.
        let model = Model::start_with(frames, IDRS[0].1 | 1 << 9);
        let mut smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
        let at_init = model.seen.lock().unwrap().consumed.clone();
        assert!(at_init.contains(&opcode::TLBI_EL2_ALL));
        let before = at_init.len();
        smmu.flush(&mut table, error.gather, TlbContext::Stage1El2).unwrap();
        let ops = model.seen.lock().unwrap().consumed[before..].to_vec();
        assert_eq!(ops, [opcode::TLBI_EL2_VA, opcode::SYNC]);
    }

    #[test]
    fn an_mmu700_gets_a_cmd_sync_within_every_63_commands() {
        let frames = frames();
        // IIDR of an Arm MMU-700 r0p0: ProductID 0x487, implementer 0x43B.
        let model = Model::start(frames);
        // SAFETY: inside the live block (IIDR at 0x18; the model never writes it).
        unsafe { reg32(model.base, 0x18).write_volatile(0x487 << 20 | 0x43b) };
        let mut smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
        assert!(smmu.features().quirks.contains(Quirks::CMDQ_SYNC_EVERY_63));
        let before = model.seen.lock().unwrap().consumed.len();
        let mut batch = Batch::new();
        while !batch.is_full() {
            batch.push(&Command::CfgiSte { sid: 1, leaf: true }).unwrap();
        }
        let report = smmu.submit(&batch).unwrap();
        assert_eq!((report.commands, report.syncs), (66, 2));
        let ops = model.seen.lock().unwrap().consumed[before..].to_vec();
        let runs: Vec<usize> = ops.split(|&op| op == opcode::SYNC).map(<[u8]>::len).collect();
        assert_eq!(runs, [63, 1, 0], "never more than 63 commands without a CMD_SYNC");
    }

    #[test]
    fn a_small_event_queue_shares_no_cache_line_with_memory_the_cpu_writes() {
        // The SMMU writes the event queue; a non-coherent SMMU's records would be overwritten by the write-back of
        // a dirty line the CPU shares with them (a command, an STE of a neighbouring block). Whatever its size, the
        // queue's block spans whole lines of the largest cache writeback granule (CTR_EL0.CWG, at most 2 KiB).
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = model.smmu();
        smmu.apply_board_coherency(false);
        let features = *smmu.features();
        for log2 in [0u8, 1, 4, 6] {
            let options = InitOptions {
                eventq_log2_max: log2,
                cmdq_log2_max: log2,
                ..InitOptions::default()
            };
            let (cmdq, evtq, _, evtq_log2) = allocate_queues(&frames, &features, &options).unwrap();
            assert_eq!(evtq_log2, log2);
            let block = evtq.memory();
            assert!(
                block.phys.0.is_multiple_of(MAX_WRITEBACK_GRANULE as u64)
                    && block.size.is_multiple_of(MAX_WRITEBACK_GRANULE),
                "{log2}: event queue block at {:#x}, {:#x} bytes",
                block.phys.0,
                block.size
            );
            assert_eq!(evtq.geometry().entries(), 1 << log2, "the queue itself keeps its size");
            // SAFETY: never given to the SMMU.
            unsafe {
                frames.free(cmdq.into_memory());
                frames.free(evtq.into_memory());
            }
        }
    }

    /// The public `submit` vets the whole batch before it writes any of it: a reserved opcode (or an MSI) is
    /// refused and the SMMU sees nothing; `submit_unvetted` queues it, and the SMMU refuses it (CERROR_ILL).
    #[test]
    fn submit_vets_the_whole_batch_before_writing_any_of_it() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
        let mut batch = Batch::new();
        batch.push(&Command::CfgiAll).unwrap();
        batch.push_words([0x7f, 0]).unwrap();
        batch.push(&Command::TlbiNsnhAll).unwrap();
        let before = model.seen.lock().unwrap().commands.len();
        assert_eq!(
            smmu.submit(&batch),
            Err(CommandQueueError::NotAllowed {
                index: 1,
                reason: crate::hw::command::Unvetted::Unmodelled { opcode: 0x7f }
            })
        );
        assert_eq!(issued_since(&model, before), [], "nothing of the batch written");
        model.refuse.store(0x7f, Ordering::SeqCst);
        // SAFETY: CFGI_ALL, TLBI_NSNH_ALL and a reserved opcode the model refuses: nothing writes memory.
        let submitted = unsafe { smmu.submit_unvetted(&batch) };
        assert!(
            matches!(submitted, Err(CommandQueueError::Refused { count: 1, .. })),
            "{submitted:?}"
        );
        assert_eq!(
            issued_since(&model, before)[..2],
            [Issued::CfgiAll, Issued::Sync],
            "the refused command replaced with a CMD_SYNC"
        );
    }

    /// Dropping the driver turns translation off with every incoming transaction aborting (GBPA.ABORT = 1 before
    /// SMMUEN = 0), and only once SMMUEN = 0 is acknowledged do the domains' page tables go back to their memory.
    /// An SMMU that does not acknowledge keeps translating, so its tables stay allocated (leaked).
    #[test]
    fn dropping_the_driver_turns_translation_off_aborting_before_any_page_table_goes_back() {
        let frames = frames();
        let rw = crate::pgtable::Prot::READ | crate::pgtable::Prot::WRITE;
        let options = crate::domain::Stage1Options {
            input_bits: 39,
            el2: false,
        };
        let root_of = |smmu: &mut ActiveSmmu<&'static HeapFrames>| {
            let d = smmu.create_stage1(frames, options).unwrap();
            smmu.map(d, 0x40_0000, 0x8000_0000, 0x1000, rw).unwrap();
            smmu.attach(d, 0x10).unwrap();
            smmu.domain_table(d).unwrap().root()
        };
        let registers = |model: &Model| {
            // SAFETY: the model's live register block.
            unsafe {
                (
                    reg32(model.base, 0x20).read_volatile(),
                    reg32(model.base, 0x44).read_volatile(),
                )
            }
        };

        let model = Model::start(frames);
        let mut smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
        let root = root_of(&mut smmu);
        drop(smmu);
        let (cr0, gbpa) = registers(&model);
        assert_eq!(cr0, 0, "translation, the queues and nothing else");
        assert_ne!(gbpa & GBPA::ABORT::SET.value, 0, "incoming transactions abort");
        assert!(frames.phys_to_virt(root).is_none(), "back once translation is off");

        let model = Model::start(frames);
        let mut smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
        let root = root_of(&mut smmu);
        model.stop.store(true, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(smmu);
        assert_ne!(
            registers(&model).0 & 1,
            0,
            "still translating: the SMMU did not acknowledge"
        );
        assert!(frames.phys_to_virt(root).is_some(), "the table it may walk is kept");
    }

    /// Review finding 8 (same root cause as finding 1, on a documented error path). `shutdown` says that when the
    /// SMMU does not acknowledge, "the memory is then kept (leaked), since the SMMU may still read it". The stream
    /// table and queues are, but `shutdown` consumed the `ActiveSmmu`, and its `?` drops the domains: every
    /// domain's page tables go back to the allocator while SMMUEN is still 1 and the STEs name them.
    #[test]
    fn finding8_a_shutdown_that_times_out_keeps_the_page_tables_the_smmu_may_still_walk() {
        let frames = frames();
        let model = Model::start(frames);
        let mut smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
        let d = smmu
            .create_stage1(
                frames,
                crate::domain::Stage1Options {
                    input_bits: 39,
                    el2: false,
                },
            )
            .unwrap();
        smmu.map(
            d,
            0x40_0000,
            0x8000_0000,
            0x1000,
            crate::pgtable::Prot::READ | crate::pgtable::Prot::WRITE,
        )
        .unwrap();
        smmu.attach(d, 0x10).unwrap();
        let root = smmu.domain_table(d).unwrap().root();
        // The SMMU stops answering (its registers keep their values; no handshake completes).
        model.stop.store(true, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let error = smmu.shutdown(false).err();
        assert!(matches!(error, Some(InitError::Timeout { .. })), "{error:?}");
        // SAFETY: the model's register block, still allocated.
        let translating = unsafe { reg32(model.base, 0x20).read_volatile() } & 1 != 0;
        assert!(
            !(translating && frames.phys_to_virt(root).is_none()),
            "the shutdown timed out with SMMUEN = 1, and stream 0x10's page table at {root} went back to the allocator"
        );
    }
}
