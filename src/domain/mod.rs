//! Domains: the product surface. A hypervisor creates stage-1, stage-2 and nested domains, attaches streams (and,
//! for stage 1, substreams) to them, maps and unmaps, reads their faults and frees them, without encoding an STE, a
//! CD or a TLBI. A domain owns its page tables, its ASID or VMID and (for stage 1) the CD its streams use, and
//! issues every invalidation the architecture requires itself:
//!
//! | operation | what the domain issues |
//! |---|---|
//! | `map` | nothing: only invalid entries are filled, which no SMMU caches |
//! | `unmap`, `protect` | TLBI by range (RIL) or per granule, or the whole ASID/VMID, then one CMD_SYNC; a stage-2 parent of nested domains adds CMD_SYNC, TLBI_NH_ALL, CMD_SYNC; unlinked tables are freed only after |
//! | `unmap_deferred` | nothing (`sync_domain` issues what `unmap` would); a lazy trim past the limit gets its own TLBI + CMD_SYNC |
//! | `invalidate_domain` | TLBI_NH_ASID / TLBI_EL2_ALL / TLBI_S12_VMALL + CMD_SYNC |
//! | `attach` | the STE through the hitless writer (CFGI_STE + CMD_SYNC per step) |
//! | `attach_substream`, `detach_substream` | the CD, then CFGI_CD + CMD_SYNC |
//! | `detach` | the STE to abort (CFGI_STE + CMD_SYNC), CFGI_CD_ALL + CMD_SYNC before the stream's CD table is freed; the last detach from a domain drops its TLB entries |
//! | `free` | TLBI_NH_ASID / TLBI_EL2_ALL / TLBI_S12_VMALL / TLBI_NH_ALL + CMD_SYNC, then tables and IDs |
//!
//! **Storage.** The driver has no allocator, so domains live in a fixed-capacity table inside
//! [`Iommu`] (`D` slots, [`DEFAULT_DOMAINS`] unless [`Smmu::init_with_capacity`] says otherwise). A caller
//! holds a [`DomainId`]: a slot index and the slot's generation. Freeing a domain bumps its slot's generation, so
//! a stale handle is refused with [`DomainError::StaleDomain`], never a use-after-free. A handle never becomes
//! valid again: the generation is 64 bits wide (a slot freed once a nanosecond would take 584 years to exhaust
//! it), and a slot whose generation would wrap is retired, never handed out again. The table (rather than
//! caller-owned domain objects) is what lets the driver route a fault record to the domain its stream is attached
//! to, find every nested domain under a stage-2 parent when the parent changes, and (live update) enumerate what
//! to preserve.
//!
//! **Memory.** Each domain takes its page tables (and its streams' CD tables) from the [`DomainMemory`] given at
//! creation, so that a domain meant to survive a live update can take them from the handover pool and others from
//! ordinary memory.
//!
//! **Nested domains** follow iommufd's nested HWPT: the stage-2 part is a stage-2 domain the hypervisor owns (the
//! parent; several nested domains may share one and its VMID), the stage-1 part belongs to a guest, whose CD table
//! and stage-1 tables live in guest memory and are given as IPAs ([`GuestStage1`]).
//!
//! **EL2 stage-1 domains** ([`Stage1Options::el2`]: STE.STRW = EL2, without E2H) translate in a regime without
//! ASIDs, where every context's TLB entries match every other's (IHI 0070 §3.17). So at most one EL2 domain is *in
//! use*, i.e. has a stream or substream attached, at a time: any number may exist, but attaching another while one
//! is in use is refused with [`DomainError::El2DomainInUse`]. Its last detach drops every EL2 entry (TLBI_EL2_ALL +
//! CMD_SYNC) before the next one can be attached; when that invalidation failed, the next EL2 attach issues it
//! first. A stream's substreams use the stream's regime ([`DomainError::RegimeMismatch`]). An EL2 domain is
//! invalidated with the EL2 commands only: TLBI_EL2_VA (by range where IDR3.RIL) for unmap, protect and trim,
//! TLBI_EL2_ALL for the last detach and free, never TLBI_NH_*. It still holds an ASID, which its CD carries and
//! the EL2 regime does not tag entries with.
//!
//! # Concurrency
//!
//! [`Iommu`] is `Send + Sync` because its parts are, and every operation takes `&self`: a hypervisor keeps one in
//! a `static` and calls it from every CPU. The locks (all `spin`, each held briefly; none is held while waiting
//! for anything but the command queue or another lock below it in the order):
//!
//! | lock | guards | taken by |
//! |---|---|---|
//! | `book` (`spin::Mutex`) | the bookkeeping every domain shares: free slots, attached streams (routing, ownership, CD tables, a busy mark), tokens, restored domains, the EL2 debt, the restored generation | briefly, by the structural operations: create (to take a slot), attach and detach (to reserve a stream, marking its record busy, and to settle it; the STE or CD is written and its CMD_SYNCs awaited without the lock), free (to give the slot back; an EL2 domain's free across its TLBI_EL2_ALL, which settles the EL2 debt), preserve, unpreserve; the hand-off and `handover_records` (after waiting for busy streams: `book_quiet`); a drain (routing). A thread's guard drains the event queue before unlocking when interrupt context failed to take it |
//! | a slot's `state` (`spin::RwLock`, one per domain) | the domain: its page table, IDs, attachments (a list through a pool of nodes every domain shares; its free nodes are the bookkeeping's, so a list changes under both, and is walked under the read lock alone), pending gathers, token | map, unmap, protect, trim, deferred unmaps and syncs, invalidations: that domain's only; the structural operations for the domains they change. A waiting writer turns new readers away (so no thread takes a slot's read lock twice) |
//! | `prepared` (`spin::Mutex`) | the hand-off's phase | checks of it; `prepare_handover` and `cancel_handover` |
//! | `protected` (a seqlock for readers, a `spin::Mutex` for writers) | memory no mapping may reach | read by every map without writing anything shared (retried while a writer publishes); `protect_memory` and a restore (across its verification and rebuild) hold the writer lock |
//! | the stream table (core) | finding an STE, and a new level-2 span until its first CFGI_STE + CMD_SYNC | attach, detach, the raw entry calls, restore; the STE's hitless write and its syncs run without it, one writer per STE being the bookkeeping's rule (a busy record, or the bookkeeping held) |
//! | the event queue (core) | the queue and its overflow | drains (interrupt context only tries it) |
//! | a slot's `faults`, `unattached_faults` (`spin::Mutex`) | fault reports | filing (interrupt context only tries them), reading and clearing |
//! | a domain's `failed` (`spin::Mutex`, inside its state) | a gather of the concurrent paths whose invalidation failed, published under the read lock | the map or unmap whose flush failed; the next exclusive operation moves it to its retry |
//!
//! **The lock order** (a lock is only ever taken while holding locks above it): `book` → `protected`'s writer lock
//! (readers take none) → slot `state` locks → `prepared` → the stream table or the event queue (never both) → fault reports (a domain's
//! `failed` is a leaf too, taken under its slot lock only). Among slot locks: without `book`, one at a time (a
//! nested domain carries its parent's VMID and stage 2, so nothing takes the parent's lock under the child's:
//! `prepare_handover` write-locks parents before children); with `book` (one holder at a time) any number,
//! `prepare_handover` taking the preserved domains' in ascending slot order (held in a block of the SMMU's
//! allocator, however many). The command queue takes no lock (its
//! multi-producer protocol, [`crate::queue::cmdq`]); ASIDs and VMIDs are atomic bitmaps. Map and unmap hold one slot lock and nothing
//! above it, so they never wait for another domain's operations: operations on different domains meet only at the
//! command queue. Attach, detach and free hold the bookkeeping only to check and record (never across a CMD_SYNC,
//! but for an EL2 domain's last detach or free, whose TLBI_EL2_ALL must complete before another EL2 domain may be
//! attached), so structural operations on different streams and domains also meet only at the command queue and
//! briefly at the bookkeeping. An operation on a stream whose record is busy (an attach or detach of it half-way
//! on another CPU) waits until that one settles it; so do the hand-off and `handover_records`, for every busy
//! stream. A free takes its domain out of the slot under the slot's write lock, where it checks that nothing
//! references it (attachments, nested children, a token: each added under the same lock), so nothing can
//! reference it after; its handles are stale from then on, and valid again only if its invalidation fails.
//! Interrupt context never waits for any lock (see [`Iommu`], "Interrupt context").
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the public type, [`Iommu`]: an initialised SMMU and its domain table |
//! | `raw.rs` | the SMMU's information, and its raw calls (STEs, commands, IDs) behind [`Iommu::low_level`], refused where they would undercut a domain |
//! | `types.rs`, `error.rs` | what a domain user names, and why an operation failed |
//! | `table.rs` | the domain table: slots and generations, attached streams, tokens |
//! | `entries.rs` | the CDs and STEs a domain gives its streams |
//! | `create.rs` | creating and freeing domains |
//! | `attach.rs` | attaching and detaching streams and substreams |
//! | `map.rs` | map, unmap, protect and their invalidations; protected memory |
//! | `preserve.rs` | tokens for a live update |
//! | `fault.rs` | faults filed per domain |

use crate::mem::FrameAllocator;
use crate::smmu::{InitError, InitOptions, RunningSmmu, Smmu, SmmuCore};

mod attach;
mod attachments;
mod create;
mod entries;
mod error;
mod fault;
#[cfg(all(loom, test))]
mod loom_models;
mod map;
mod preserve;
mod raw;
mod storage;
mod table;
#[cfg(test)]
pub(crate) mod tests;
mod types;

pub use crate::ids::DomainId;
pub use entries::GuestContext;
pub(crate) use entries::stage1_cd_of;
pub use error::{Capacity, DomainError, Unsupported, Wanted};
pub use fault::{Fault, FaultKind, FaultReport, FaultStage};
pub use raw::LowLevel;
pub(crate) use storage::{Storage, StorageVec};
pub(crate) use table::{Book, DomainState, Domains, Prepared, StateMut, StreamRecord, Translation};
pub use types::{DomainKind, DomainMemory, GuestInvalidation, GuestStage1, Stage1Options, Stage2Options};

/// Domains an [`Iommu`] holds unless [`Smmu::init_with_capacity`] chooses another number.
pub const DEFAULT_DOMAINS: usize = 16;
/// Streams the SMMU may have attached to domains at once unless [`InitOptions::attached_streams`] asks for more
/// (or the domain table holds more domains): one domain may hold all of them.
pub const MAX_ATTACHED_STREAMS: usize = crate::smmu::DEFAULT_ATTACHED_STREAMS;
/// Substreams (besides substream 0) one stream may have attached.
pub const MAX_SUBSTREAMS_PER_STREAM: usize = 7;
/// SubstreamID bits of the CD table a stream gets when attached to a stage-1 domain (capped by IDR1.SSIDSIZE).
pub const STREAM_SSID_BITS: u8 = 3;
/// Faults a domain's report keeps (later ones are counted in [`FaultReport::lost`]).
pub const FAULT_REPORT_CAPACITY: usize = 8;

/// An initialised SMMU (SMMUEN = 1), every stream aborting until something is attached, with room for `D` domains:
/// the type a hypervisor drives (see the [module docs](self)).
///
/// **Dropping it** (a plain drop, a `?` past it) turns translation off with every incoming transaction aborting
/// ([`Smmu::disable_aborting`]: GBPA.ABORT = 1, then SMMUEN = 0): nothing may translate through memory that nobody
/// manages any more. The domains' page tables go back to their memory only once SMMUEN = 0 is acknowledged; when
/// the SMMU does not acknowledge, they are leaked, since it may still walk them. The stream table, the queues and
/// the streams' CD tables are leaked either way ([`Iommu::shutdown`] gives the first two back). To leave the
/// SMMU translating for the next image (a hand-off with the SMMU running), `core::mem::forget` the driver instead.
///
/// STEs are written by the driver alone: there is no public call that installs one.
///
/// # Sharing it between CPUs
///
/// `Iommu` is `Send + Sync` and every operation takes `&self` (see the [module docs](self#concurrency) for the
/// locks and their order). A hypervisor keeps it in a `static`:
///
/// ```no_run
/// use smmuv3::{FrameAllocator, Iommu, InitOptions, Smmu};
///
/// // Any allocator that lives as long as the firmware (every `FrameAllocator` is `Sync`).
/// fn frames() -> &'static (dyn FrameAllocator + Sync) {
///     unimplemented!("the board's frame pool")
/// }
///
/// static IOMMU: spin::Once<Iommu<&'static (dyn FrameAllocator + Sync)>> = spin::Once::new();
///
/// fn boot(registers: core::ptr::NonNull<u8>) {
///     // SAFETY (the board's): `registers` maps the SMMU's 128 KiB of registers as device memory.
///     let smmu = unsafe { Smmu::probe(registers, 0x2_0000) }.unwrap();
///     IOMMU.call_once(|| smmu.init(frames(), &InitOptions::default()).unwrap());
/// }
///
/// // On any CPU, at once:
/// fn dma_map(domain: smmuv3::DomainId, iova: smmuv3::Iova, pa: smmuv3::PhysAddr) -> Result<(), smmuv3::DomainError> {
///     IOMMU.get().unwrap().map(domain, iova, pa, 4096, smmuv3::Prot::READ | smmuv3::Prot::WRITE)
/// }
/// ```
///
/// # Interrupt context
///
/// An interrupt may stop a CPU inside any call, holding any lock; so in interrupt context only calls that never
/// wait for a lock are safe:
/// - [`Iommu::handle_interrupt`]: drains the event queue and files each fault under its domain, only *trying*
///   every lock; what it cannot file now stays in the queue (`pending`), never lost or filed twice, and is filed
///   by the lock's holder, never left for the next interrupt (the SMMU raises one only when the queue goes from
///   empty to non-empty): a failed try sets a flag (then tries once more), and a thread holding the bookkeeping
///   drains before it unlocks it, a thread that read or cleared a fault report drains after it unlocked it, and
///   the event queue's holder drains again before it unlocks;
/// - [`Iommu::handle_global_errors`] (the global-error interrupt): GERRORN is written under a lock it only tries;
/// - reading what needs no lock: [`Iommu::features`], [`Iommu::is_enabled`].
///
/// Never from interrupt context: a command submission of any kind (a submit interrupted mid-write on the same CPU
/// would deadlock the queue's publication order), map, unmap, protect, attach, detach, create, free, preserve,
/// the hand-off, [`Iommu::drain_faults`], [`Iommu::domain_faults`] (each may wait for a lock the interrupted code
/// holds).
///
/// ```compile_fail,E0599
/// fn raw<A: smmuv3::FrameAllocator>(smmu: &mut smmuv3::Iommu<A>) {
///     let _ = smmu.install_ste(0x10, &smmuv3::hw::ste::Ste::abort());
/// }
/// ```
pub struct Iommu<A: FrameAllocator, const D: usize = DEFAULT_DOMAINS> {
    /// The SMMU: its registers, stream table, queues and IDs.
    pub(crate) core: SmmuCore<A>,
    /// The domains and what they own.
    pub(crate) domains: Domains<D>,
}

// `Iommu` is shared by every CPU because its parts are `Send + Sync` (no `unsafe impl` on it): checked here for
// the allocator type a hypervisor stores it with.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<Iommu<DomainMemory>>();
    shareable::<Iommu<&'static (dyn FrameAllocator + Sync), 4>>();
};

impl Smmu {
    /// Initialises the SMMU in the architecture's order and enables translation with every stream aborting:
    /// GBPA.ABORT = 1 (so nothing bypasses while it is reprogrammed), SMMUEN and the queues off, interrupts off,
    /// global errors acknowledged, the stream table (see [`StreamTableFormat::choose`](crate::stream::StreamTableFormat::choose)), CR1/CR2, the command and
    /// event queues, the interrupts of [`InitOptions::interrupts`] (none by default), a full invalidation (CFGI_ALL, TLBI_EL2_ALL when EL2 contexts exist,
    /// TLBI_NSNH_ALL, CMD_SYNC), then SMMUEN.
    ///
    /// Memory comes from `allocator`, which the returned handle keeps and owns
    /// (a [`HandoverMemory`](crate::handover::pool::HandoverMemory) has one owner): a domain cannot be created on memory for a single owner (a handover
    /// memory) that holds the SMMU's own structures, since freeing the domain would give that memory back.
    ///
    /// # Errors
    /// [`InitError::MemoryOwned`] for an allocator a domain or another SMMU owns (nothing done),
    /// [`InitError::NoMemory`] (everything allocated so far is freed), [`InitError::PresetBases`],
    /// [`InitError::Timeout`] for a register handshake that never completes and [`InitError::Invalidation`];
    /// after a timeout the SMMU is left disabled with GBPA.ABORT set where that much succeeded, and its memory
    /// kept (the allocator stays owned), since the SMMU may have been given it.
    pub fn init<A: FrameAllocator>(self, allocator: A, options: &InitOptions) -> Result<Iommu<A>, InitError> {
        self.init_with_capacity::<A, DEFAULT_DOMAINS>(allocator, options)
    }

    /// As [`Smmu::init`], with room for `D` domains instead of [`DEFAULT_DOMAINS`].
    ///
    /// # Errors
    /// As [`Smmu::init`].
    pub fn init_with_capacity<A: FrameAllocator, const D: usize>(
        self,
        allocator: A,
        options: &InitOptions,
    ) -> Result<Iommu<A, D>, InitError> {
        Iommu::over(self.start(allocator, options)?, options)
    }

    /// Takes over an SMMU that a previous image left translating (SMMUEN = 1), without a moment of bypass or
    /// abort for the streams it serves: translation is never turned off and STRTAB_BASE (which must not be
    /// rewritten while SMMUEN = 1) is adopted as found, reached through `allocator` (the handover memory the previous
    /// image's SMMU took its memory from, which the returned handle then owns, as [`Smmu::init`]'s). Nothing is
    /// adopted unless the SMMU is the one `running` describes (what
    /// the previous image recorded): SMMUEN on, IDR0..5 and IIDR as recorded, STRTAB_BASE and STRTAB_BASE_CFG read
    /// back as the recorded stream table, CR2.E2H clear; and, for a 2-level table, every level-1 descriptor the one
    /// this driver writes for a span `allocator` reaches, no span named twice, none over the level-1 table. The
    /// queues are
    /// turned off, global errors latched before acknowledged, the queues given fresh bases from `allocator` and
    /// turned on again, the interrupts of `options` enabled, and the cached configurations and TLB entries
    /// invalidated (the STEs and tables they came from are unchanged). Streams that nobody will restore keep their
    /// STEs until [`Iommu::restore_handover`] (or [`Iommu::abort_unrestored_streams`]) aborts them, and
    /// until then no ASID or VMID is allocated (a refused restore aborts them all). When the
    /// running SMMU_CR1 makes the SMMU's own accesses non-cacheable, the SMMU is treated as non-coherent
    /// ([`Features::coherent`](crate::smmu::Features::coherent) false) whatever the board said.
    ///
    /// # Errors
    /// [`InitError::NotRunning`], [`InitError::IdentityMismatch`], [`InitError::MemoryOwned`],
    /// [`InitError::StreamTableNotAdoptable`], [`InitError::NoMemory`] for the queues, [`InitError::Timeout`],
    /// [`InitError::Invalidation`]. On every error the SMMU is left as [`Smmu::disable_aborting`] leaves it (as far
    /// as its handshakes complete): translation off, every incoming transaction aborting. The previous image's STEs
    /// walk memory this image has not taken back, so nothing may translate through them; initialise the SMMU
    /// afresh. `allocator` stays owned only when translation could not be turned off.
    pub fn adopt_running<A: FrameAllocator>(
        self,
        allocator: A,
        options: &InitOptions,
        running: &RunningSmmu,
    ) -> Result<Iommu<A>, InitError> {
        self.adopt_running_with_capacity::<A, DEFAULT_DOMAINS>(allocator, options, running)
    }

    /// As [`Smmu::adopt_running`], with room for `D` domains instead of [`DEFAULT_DOMAINS`].
    ///
    /// # Errors
    /// As [`Smmu::adopt_running`].
    pub fn adopt_running_with_capacity<A: FrameAllocator, const D: usize>(
        self,
        allocator: A,
        options: &InitOptions,
        running: &RunningSmmu,
    ) -> Result<Iommu<A, D>, InitError> {
        Iommu::over(self.take_over(allocator, options, running)?, options)
    }
}

impl<A: FrameAllocator, const D: usize> Iommu<A, D> {
    /// The driver over an initialised SMMU: no domains yet.
    fn over(core: SmmuCore<A>, options: &InitOptions) -> Result<Self, InitError> {
        match Domains::new(core.allocator(), options.bookkeeping.0, options.attached_streams) {
            Ok(domains) => Ok(Iommu { core, domains }),
            Err(e) => {
                // No domain yet: the SMMU goes off and its memory back, as if it had never been initialised.
                let _ = core.shutdown_then(false, |_| {});
                Err(InitError::NoMemory(e))
            }
        }
    }

    /// Turns interrupts, translation and the queues off and leaves incoming transactions to GBPA: aborting, or bypassing
    /// when `bypass` (the state QEMU resets to). The stream table and queues go back to the allocator (which no
    /// longer belongs to the SMMU, a [`HandoverMemory`](crate::handover::pool::HandoverMemory) has one owner), every domain's page tables to its memory.
    ///
    /// # Errors
    /// [`InitError::Timeout`] when the SMMU does not acknowledge; the memory is then kept (leaked), the domains'
    /// page tables included, since the SMMU may still read it.
    pub fn shutdown(self, bypass: bool) -> Result<Smmu, InitError> {
        // This function decides what is freed, not `Drop`: on an error everything is leaked.
        let this = core::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never used again and never dropped (`ManuallyDrop`), and each field is moved out exactly
        // once, here.
        let (core, domains) = unsafe { (core::ptr::read(&this.core), core::ptr::read(&this.domains)) };
        // Dropped only once translation is off (the closure runs then); on an error it is leaked with its tables,
        // which the SMMU may still read.
        let domains = core::mem::ManuallyDrop::new(domains);
        core.shutdown_then(bypass, move |allocator| {
            // Translation is off: no walk reaches a domain's tables any more, and they go back to their memory;
            // then the bookkeeping's own blocks to the SMMU's allocator, which they came from.
            // SAFETY: the bookkeeping came from this allocator (`Iommu::over`).
            unsafe { core::mem::ManuallyDrop::into_inner(domains).release(allocator) };
        })
    }
}

impl<A: FrameAllocator, const D: usize> Drop for Iommu<A, D> {
    /// Translation off, every incoming transaction aborting; the domains' page tables leaked unless SMMUEN = 0 is
    /// acknowledged (see [`Iommu`]).
    fn drop(&mut self) {
        let off = self.core.smmu.disable_aborting().is_ok() && !self.core.smmu.is_enabled();
        if !off {
            // The SMMU may still walk them: never back to an allocator that would hand them out again.
            self.domains.abandon_tables();
        }
        // The bookkeeping (the domains dropped first: tables back to their memory, or abandoned above) goes back
        // to the SMMU's allocator: the CPU's, which the SMMU never reads.
        let slots = core::mem::replace(&mut self.domains.slots, storage::Storage::empty());
        let (tokens, restored, streams) = {
            let book = self.domains.book.get_mut();
            (
                core::mem::replace(&mut book.tokens, storage::TokenIndex::empty()),
                core::mem::replace(&mut book.restored, storage::TokenIndex::empty()),
                core::mem::replace(&mut book.streams, table::AttachedStreams::empty()),
            )
        };
        let allocator = self.domains.bookkeeping_allocator(self.core.allocator());
        // SAFETY: all of them came from this allocator (`Iommu::over`).
        unsafe {
            streams.release(allocator);
            slots.release(allocator);
            tokens.release(allocator);
            restored.release(allocator);
        }
    }
}
