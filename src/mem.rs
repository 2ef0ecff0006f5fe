//! Memory the SMMU reads and writes (stream table, CD tables, queues, page tables): physically contiguous,
//! aligned, zeroed frames supplied by the caller through [`FrameAllocator`]. The driver never assumes that a
//! physical address is also a usable pointer.

use core::fmt;
use core::ptr::NonNull;

/// A physical (output) address as the SMMU sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct PhysAddr(pub u64);

impl fmt::Display for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PA {:#x}", self.0)
    }
}

/// An input address of a domain's translation as a device issues it: a VA for a stage-1 domain, an IPA for a
/// stage-2 one. Its own type, so that an IOVA and a [`PhysAddr`] passed the wrong way round do not compile:
///
/// ```compile_fail,E0308
/// # use smmuv3::testing::{FakeSmmu, HeapFrames};
/// # use smmuv3::{InitOptions, Iommu, Iova, PhysAddr, Prot, Stage1Options};
/// # let frames = HeapFrames::leaked();
/// # let fake = FakeSmmu::start(frames);
/// # let iommu: Iommu<&HeapFrames> = fake.smmu().init(frames, &InitOptions::default()).unwrap();
/// # let dma = iommu.create_stage1(frames, Stage1Options { input_bits: 39, el2: false }).unwrap();
/// iommu.map(dma, PhysAddr(0x8000_0000), Iova(0x1000_0000), 0x4000, Prot::READ).unwrap(); // swapped
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct Iova(pub u64);

impl fmt::Display for Iova {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IOVA {:#x}", self.0)
    }
}

impl fmt::LowerHex for Iova {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

impl fmt::LowerHex for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

/// A range of physical memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extent {
    /// First byte.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Extent {
    /// One past the last byte, or `None` when it wraps.
    pub fn end(&self) -> Option<u64> {
        self.base.checked_add(self.len)
    }

    /// Whether `[base, base + len)` lies inside this extent (`false` when either range wraps).
    pub fn contains(&self, base: u64, len: u64) -> bool {
        match (self.end(), base.checked_add(len)) {
            (Some(end), Some(e)) => base >= self.base && e <= end,
            _ => false,
        }
    }

    /// Whether the two extents share a byte (`true` when either wraps).
    pub fn overlaps(&self, other: &Extent) -> bool {
        match (self.end(), other.end()) {
            (Some(a), Some(b)) => self.base < b && other.base < a,
            _ => true,
        }
    }
}

/// A block of memory shared with the SMMU: its physical address and where the CPU reaches it.
#[derive(Debug, PartialEq, Eq)]
pub struct DmaBlock {
    /// Physical address of the first byte (aligned as requested).
    pub phys: PhysAddr,
    /// CPU pointer to the first byte.
    pub virt: NonNull<u8>,
    /// Length in bytes.
    pub size: usize,
}

// SAFETY: a `DmaBlock` is the driver's own block of memory (handed over by a `FrameAllocator`, whose contract makes
// it exclusively the owner's until freed), not a reference into someone else's data: moving it to another CPU moves
// that ownership. The pointer is only a handle; every access through it is made by the code that owns the block, with
// atomics where several CPUs or the SMMU may touch it (`DmaBlock::words`).
unsafe impl Send for DmaBlock {}
// SAFETY: sharing `&DmaBlock` only shares the handle (its fields are read-only through `&`); the memory itself is
// reached through `DmaBlock::words`, whose contract requires atomic access, or by the owner through `&mut`.
unsafe impl Sync for DmaBlock {}

/// Why memory could not be had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AllocError {
    /// The allocator has no block of this size and alignment left.
    OutOfMemory {
        /// Bytes asked for.
        size: usize,
    },
    /// The size is zero or the alignment not a power of two.
    BadRequest {
        /// Bytes asked for.
        size: usize,
        /// Alignment asked for.
        align: usize,
    },
}

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllocError::OutOfMemory { size } => write!(f, "out of DMA memory for {size:#x} bytes"),
            AllocError::BadRequest { size, align } => {
                write!(f, "bad DMA allocation request: size {size:#x}, alignment {align:#x}")
            }
        }
    }
}

/// The caller's supply of memory the SMMU may access.
///
/// # Safety
/// Implementations must return blocks that are physically contiguous, zero-filled (except from
/// [`FrameAllocator::allocate_for_overwrite`]: initialised, any content), aligned to at least `align` in physical
/// address (and at `virt` to at least the smaller of `align` and 8: the driver views blocks as `AtomicU64`s),
/// exclusively owned by the caller until freed, readable and writable by the CPU at `virt` (normal
/// memory, mapped cacheable when the SMMU is coherent) and reachable by the SMMU at `phys`.
///
/// A block may come with dirty lines in the CPU's caches (the zeroing, or an earlier user): for a non-coherent
/// SMMU the driver itself cleans every block the SMMU reads (stream table, CD tables, page tables, command queue)
/// to the point of coherency before the SMMU can reach it, and cleans *and invalidates* the event queue, which the
/// SMMU writes, before giving the SMMU its base, so that no dirty line can later be evicted over a record.
///
/// An implementation writes three methods: [`allocate_zeroed`](FrameAllocator::allocate_zeroed),
/// [`free`](FrameAllocator::free) and [`phys_to_virt`](FrameAllocator::phys_to_virt) (the CPU address of a frame
/// the SMMU reaches at a physical address). Three more have defaults it may replace for speed
/// (`allocate_for_overwrite`, `allocate_many`, `free_many`). What a live update needs of memory (ownership,
/// sealing, the runs of frames to record) is the driver's own `HandoverMemory`'s business, not an
/// allocator's.
///
/// ```
/// use core::ptr::NonNull;
/// use smmuv3::mem::{AllocError, DmaBlock, FrameAllocator};
/// use smmuv3::PhysAddr;
///
/// /// A board's frame pool: CPU address = physical address (an identity-mapped EL2).
/// struct Frames;
///
/// # fn take_zeroed_frames(size: usize, align: usize) -> Option<u64> { None }
/// # fn give_back_frames(phys: u64, size: usize) {}
/// # fn in_pool(phys: u64) -> bool { false }
/// // SAFETY: blocks come zeroed, contiguous and aligned from the board's reserved pool, each held by one user.
/// unsafe impl FrameAllocator for Frames {
///     fn allocate_zeroed(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError> {
///         let phys = take_zeroed_frames(size, align).ok_or(AllocError::OutOfMemory { size })?;
///         let virt = NonNull::new(phys as *mut u8).ok_or(AllocError::OutOfMemory { size })?;
///         Ok(DmaBlock { phys: PhysAddr(phys), virt, size })
///     }
///
///     unsafe fn free(&self, block: DmaBlock) {
///         give_back_frames(block.phys.0, block.size);
///     }
///
///     fn phys_to_virt(&self, phys: PhysAddr) -> Option<NonNull<u8>> {
///         in_pool(phys.0).then(|| NonNull::new(phys.0 as *mut u8)).flatten()
///     }
/// }
/// ```
pub unsafe trait FrameAllocator: Sync {
    /// Allocates `size` zeroed bytes aligned to `align` (a power of two).
    ///
    /// # Errors
    /// [`AllocError::OutOfMemory`] when exhausted, [`AllocError::BadRequest`] for a zero size or an alignment that
    /// is not a power of two.
    fn allocate_zeroed(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError>;

    /// As [`FrameAllocator::allocate_zeroed`], for a block the caller overwrites entirely before anything reads
    /// it (a page table filled before it is linked): an allocator may hand out a used frame without zeroing it.
    /// The default zeroes anyway.
    ///
    /// # Errors
    /// As [`FrameAllocator::allocate_zeroed`].
    fn allocate_for_overwrite(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError> {
        self.allocate_zeroed(size, align)
    }

    /// Returns a block obtained from [`FrameAllocator::allocate_zeroed`] (or
    /// [`FrameAllocator::allocate_for_overwrite`]) of this allocator.
    ///
    /// # Safety
    /// The block must come from this allocator, and nothing (CPU or SMMU) may access it afterwards.
    unsafe fn free(&self, block: DmaBlock);

    /// Allocates `count` blocks as [`FrameAllocator::allocate_zeroed`] (or, when `for_overwrite`,
    /// [`FrameAllocator::allocate_for_overwrite`]) would, handing each to `each` as it comes: what a page table
    /// needs for one range map, asked for at once. An allocator that takes a lock per call can take it once here;
    /// the default calls the single-block method `count` times.
    ///
    /// # Errors
    /// The first allocation's error; the blocks handed to `each` before it are the caller's (to use or free).
    fn allocate_many(
        &self,
        size: usize,
        align: usize,
        count: usize,
        for_overwrite: bool,
        each: &mut dyn FnMut(DmaBlock),
    ) -> Result<(), AllocError> {
        for _ in 0..count {
            each(match for_overwrite {
                true => self.allocate_for_overwrite(size, align)?,
                false => self.allocate_zeroed(size, align)?,
            });
        }
        Ok(())
    }

    /// Returns every block `blocks` yields, as [`FrameAllocator::free`] does one (the tables a page table unlinked
    /// and invalidated, given back at once). The default calls `free` for each.
    ///
    /// # Safety
    /// As [`FrameAllocator::free`], for every block.
    unsafe fn free_many(&self, blocks: &mut dyn Iterator<Item = DmaBlock>) {
        for block in blocks {
            // SAFETY: the caller's guarantee, for each block.
            unsafe { self.free(block) };
        }
    }

    /// The CPU address of `phys`, which lies inside a block this allocator handed out and has not taken back
    /// (page-table walks follow physical addresses found in descriptors). Returns `None` for any other address.
    fn phys_to_virt(&self, phys: PhysAddr) -> Option<NonNull<u8>>;

    /// Not for implementations: the driver's own handover memory (`handover::pool::HandoverMemory`) answers here, which is how
    /// the driver tells memory that survives a live update from any other. The default (`None`) is the only
    /// answer another allocator can give: the argument's type cannot be named outside this crate, so this method
    /// can be neither called nor overridden there.
    #[doc(hidden)]
    fn handover_memory(&self, _: sealed::Token) -> Option<&dyn sealed::Hooks> {
        None
    }
}

/// The unnameable argument of `FrameAllocator::handover_memory`.
pub(crate) mod sealed {
    /// Only this crate makes one.
    #[derive(Clone, Copy, Debug)]
    pub struct Token(pub(crate) ());

    /// What memory that survives a live update answers (the driver's `HandoverMemory`): named here, in a module
    /// no one outside the crate reaches, so that `mem` does not depend on the handover pool that depends on it.
    /// See [`super::MemoryHooks`] for each method.
    pub trait Hooks {
        /// The first run of frames held at or after `from`.
        fn handover_run(&self, from: u64) -> Option<super::Extent>;
        /// The owning domain is freed: the memory is free for another.
        ///
        /// # Safety
        /// Nothing (CPU or SMMU) may access a block this memory handed out afterwards.
        unsafe fn retire(&self);
        /// Claims the memory for one owner: `false` when it is owned already.
        fn take_ownership(&self) -> bool;
        /// Undoes a successful claim.
        fn give_up_ownership(&self);
        /// Hands out nothing until unsealed.
        fn seal(&self);
        /// Undoes `seal`.
        fn unseal(&self);
        /// Whether sealed.
        fn sealed(&self) -> bool;
    }
}

/// What the driver asks of memory beyond allocating and freeing: how memory that survives a live update (a
/// `HandoverMemory`) is owned, sealed and listed. Every other allocator gets the answers of shared memory that
/// does not survive: owned by anyone, never sealed, no runs. Implemented for every [`FrameAllocator`]; a user
/// implements none of it.
pub(crate) trait MemoryHooks {
    /// Whether this is memory that survives a live update (memory of the handover pool), which a domain to be
    /// preserved must use.
    fn survives_handover(&self) -> bool;

    /// For memory that survives a live update: the first run of frames it holds (has handed out, or holds for
    /// itself) that starts at or after physical address `from` (see `HandoverMemory::handover_run`). `None`
    /// past the last, and always for ordinary memory.
    fn handover_run(&self, from: u64) -> Option<Extent>;

    /// Called when the domain that owned this memory alone is freed, after everything it allocated went back: a
    /// memory of the handover pool becomes free for another domain. Nothing for shared memory.
    ///
    /// # Safety
    /// Nothing (CPU or SMMU) may access a block this memory handed out afterwards.
    unsafe fn retire(&self);

    /// Claims this memory for one owner, a domain or an SMMU's own structures (`Smmu::init`,
    /// `Smmu::adopt_running`): a handover memory answers `false` when it is owned already; shared memory always
    /// answers `true`.
    fn take_ownership(&self) -> bool;

    /// Undoes a successful [`MemoryHooks::take_ownership`] whose owner was never created or is gone without
    /// retiring the memory.
    fn give_up_ownership(&self);

    /// From now until the hand-off, hand out nothing (memory that survives a live update).
    fn seal(&self);

    /// Undoes [`MemoryHooks::seal`] (the hand-off was cancelled).
    fn unseal(&self);

    /// Whether [`MemoryHooks::seal`] is in force.
    fn sealed(&self) -> bool;
}

impl<T: FrameAllocator + ?Sized> MemoryHooks for T {
    #[inline]
    fn survives_handover(&self) -> bool {
        self.handover_memory(sealed::Token(())).is_some()
    }

    fn handover_run(&self, from: u64) -> Option<Extent> {
        self.handover_memory(sealed::Token(()))?.handover_run(from)
    }

    unsafe fn retire(&self) {
        if let Some(memory) = self.handover_memory(sealed::Token(())) {
            // SAFETY: the caller's guarantee, passed on.
            unsafe { memory.retire() }
        }
    }

    fn take_ownership(&self) -> bool {
        self.handover_memory(sealed::Token(()))
            .is_none_or(|memory| memory.take_ownership())
    }

    fn give_up_ownership(&self) {
        if let Some(memory) = self.handover_memory(sealed::Token(())) {
            memory.give_up_ownership();
        }
    }

    fn seal(&self) {
        if let Some(memory) = self.handover_memory(sealed::Token(())) {
            memory.seal();
        }
    }

    fn unseal(&self) {
        if let Some(memory) = self.handover_memory(sealed::Token(())) {
            memory.unseal();
        }
    }

    #[inline]
    fn sealed(&self) -> bool {
        self.handover_memory(sealed::Token(()))
            .is_some_and(|memory| memory.sealed())
    }
}

// SAFETY: forwards to `T`, which upholds the contract.
unsafe impl<T: FrameAllocator + ?Sized> FrameAllocator for &T {
    #[inline]
    fn allocate_zeroed(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError> {
        (**self).allocate_zeroed(size, align)
    }

    #[inline]
    fn allocate_for_overwrite(&self, size: usize, align: usize) -> Result<DmaBlock, AllocError> {
        (**self).allocate_for_overwrite(size, align)
    }

    #[inline]
    unsafe fn free(&self, block: DmaBlock) {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { (**self).free(block) }
    }

    #[inline]
    fn allocate_many(
        &self,
        size: usize,
        align: usize,
        count: usize,
        for_overwrite: bool,
        each: &mut dyn FnMut(DmaBlock),
    ) -> Result<(), AllocError> {
        (**self).allocate_many(size, align, count, for_overwrite, each)
    }

    #[inline]
    unsafe fn free_many(&self, blocks: &mut dyn Iterator<Item = DmaBlock>) {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { (**self).free_many(blocks) }
    }

    #[inline]
    fn phys_to_virt(&self, phys: PhysAddr) -> Option<NonNull<u8>> {
        (**self).phys_to_virt(phys)
    }

    fn handover_memory(&self, token: sealed::Token) -> Option<&dyn sealed::Hooks> {
        (**self).handover_memory(token)
    }
}

impl DmaBlock {
    /// The block as 64-bit words the SMMU may read or write concurrently: every access is a single-copy-atomic
    /// 64-bit load or store.
    ///
    /// # Safety
    /// The block must be live (allocated and not freed), 8-byte aligned, and not accessed through other
    /// non-atomic references while the returned slice lives.
    pub(crate) unsafe fn words(&self) -> &[core::sync::atomic::AtomicU64] {
        // SAFETY: the caller guarantees a live, aligned block; AtomicU64 has the layout of u64.
        unsafe { core::slice::from_raw_parts(self.virt.as_ptr().cast(), self.size / 8) }
    }
}

/// Orders the CPU's writes to memory the SMMU reads before a following register write (DMB OSHST).
#[inline]
pub(crate) fn write_barrier() {
    #[cfg(target_arch = "aarch64")]
    aarch64_cpu::asm::barrier::dmb(aarch64_cpu::asm::barrier::OSHST);
    #[cfg(not(target_arch = "aarch64"))]
    core::sync::atomic::fence(HostBarrier::WriteWrite.ordering());
}

/// Orders a register read (a queue's PROD) before the reads of the memory it announces (DMB OSHLD).
#[inline]
pub(crate) fn read_barrier() {
    #[cfg(target_arch = "aarch64")]
    aarch64_cpu::asm::barrier::dmb(aarch64_cpu::asm::barrier::OSHLD);
    #[cfg(not(target_arch = "aarch64"))]
    core::sync::atomic::fence(HostBarrier::ReadRead.ordering());
}

/// Orders every earlier memory access before later ones, including register writes (DMB OSH).
#[inline]
pub(crate) fn full_barrier() {
    #[cfg(target_arch = "aarch64")]
    aarch64_cpu::asm::barrier::dmb(aarch64_cpu::asm::barrier::OSH);
    #[cfg(not(target_arch = "aarch64"))]
    core::sync::atomic::fence(HostBarrier::Full.ordering());
}

/// The architectural barriers above as the host build (tests, benchmarks) models them: each by the weakest fence
/// of the C++/Rust memory model that still gives the ordering the SMMU side of a host model relies on, so a host
/// benchmark measures the algorithm rather than a stronger fence than the hardware executes (`SeqCst` is a full
/// `lock`-prefixed barrier on x86, where DMB OSHST orders stores only).
#[cfg(not(target_arch = "aarch64"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HostBarrier {
    /// DMB OSHST: earlier stores before later stores (the PROD write after the commands, a table link after
    /// its contents).
    WriteWrite,
    /// DMB OSHLD: an earlier load (PROD) before later loads (the records it announces).
    ReadRead,
    /// DMB OSH: everything before everything.
    Full,
}

#[cfg(not(target_arch = "aarch64"))]
impl HostBarrier {
    const fn ordering(self) -> core::sync::atomic::Ordering {
        use core::sync::atomic::Ordering;
        match self {
            // A release fence orders earlier loads and stores before every later store: the store-store part is
            // what DMB OSHST gives.
            HostBarrier::WriteWrite => Ordering::Release,
            // An acquire fence orders earlier loads before every later load and store.
            HostBarrier::ReadRead => Ordering::Acquire,
            HostBarrier::Full => Ordering::SeqCst,
        }
    }
}

/// The largest cache writeback granule the architecture allows (CTR_EL0.CWG at most 0b1001: 2 KiB). A block the SMMU
/// writes that spans whole granules of this size shares no cache line with anything else, so no dirty line of
/// other memory can be written back over what a non-coherent SMMU wrote.
pub(crate) const MAX_WRITEBACK_GRANULE: usize = 2048;

/// Cache maintenance for an SMMU whose table walks and queue accesses do not snoop the CPU caches
/// (IDR0.COHACC = 0, or a board that does not declare `dma-coherent`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Coherency {
    pub(crate) coherent: bool,
}

impl Coherency {
    /// Makes the CPU's writes to `[ptr, ptr+len)` visible to a non-coherent SMMU (DC CVAC by line, DSB).
    pub(crate) fn clean(self, ptr: *const u8, len: usize) {
        if self.coherent {
            return;
        }
        #[cfg(test)]
        maintenance_log::record(Maintenance::Clean, ptr, len);
        #[cfg(target_arch = "aarch64")]
        for_each_line(ptr, len, |line| {
            // SAFETY: cleaning a cache line has no effect on memory contents and the line is in a live block.
            unsafe { core::arch::asm!("dc cvac, {}", in(reg) line, options(nostack, preserves_flags)) }
        });
        #[cfg(not(target_arch = "aarch64"))]
        let _ = (ptr, len);
    }

    /// Cleans and invalidates `[ptr, ptr+len)` (DC CIVAC by line, DSB): afterwards no line of the range is in
    /// the CPU's caches, dirty or clean. Before the CPU reads what a non-coherent SMMU wrote, this discards stale
    /// lines; before a non-coherent SMMU starts writing a block the CPU zeroed, it writes the zeros back so that
    /// no dirty line can later be evicted over what the SMMU wrote.
    pub(crate) fn clean_invalidate(self, ptr: *const u8, len: usize) {
        if self.coherent {
            return;
        }
        #[cfg(test)]
        maintenance_log::record(Maintenance::CleanInvalidate, ptr, len);
        #[cfg(target_arch = "aarch64")]
        for_each_line(ptr, len, |line| {
            // SAFETY: clean-and-invalidate keeps any dirty data, so no CPU write is lost; the line is in a live block.
            unsafe { core::arch::asm!("dc civac, {}", in(reg) line, options(nostack, preserves_flags)) }
        });
        #[cfg(not(target_arch = "aarch64"))]
        let _ = (ptr, len);
    }
}

/// Cache maintenance the driver asked for, as host tests see it.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Maintenance {
    /// DC CVAC.
    Clean,
    /// DC CIVAC.
    CleanInvalidate,
}

/// A per-thread record of the cache maintenance a non-coherent configuration issued, so host tests can check
/// that memory the SMMU writes or reads was maintained before the SMMU was given it.
#[cfg(test)]
pub(crate) mod maintenance_log {
    extern crate std;
    use super::Maintenance;
    use std::cell::RefCell;
    use std::vec::Vec;

    std::thread_local! {
        static LOG: RefCell<Vec<(Maintenance, usize, usize)>> = const { RefCell::new(Vec::new()) };
    }

    pub(crate) fn record(kind: Maintenance, ptr: *const u8, len: usize) {
        LOG.with(|log| log.borrow_mut().push((kind, ptr as usize, len)));
    }

    /// Takes this thread's record: (operation, start address, length) in order.
    pub(crate) fn take() -> Vec<(Maintenance, usize, usize)> {
        LOG.with(|log| core::mem::take(&mut *log.borrow_mut()))
    }

    /// Whether `[start, start+len)` was covered, byte for byte, by operations of `kind` in `log`.
    pub(crate) fn covers(log: &[(Maintenance, usize, usize)], kind: Maintenance, start: usize, len: usize) -> bool {
        (start..start + len)
            .step_by(8)
            .all(|byte| log.iter().any(|&(k, s, l)| k == kind && (s..s + l).contains(&byte)))
    }
}

#[cfg(target_arch = "aarch64")]
fn for_each_line(ptr: *const u8, len: usize, mut op: impl FnMut(usize)) {
    let ctr: u64;
    // SAFETY: reading CTR_EL0 has no side effects.
    unsafe { core::arch::asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags)) };
    // CTR_EL0.DminLine, bits [19:16]: log2 of the smallest data cache line in words.
    let line = 4usize << ((ctr >> 16) & 0xf);
    let mut address = ptr as usize & !(line - 1);
    let end = ptr as usize + len;
    while address < end {
        op(address);
        address += line;
    }
    aarch64_cpu::asm::barrier::dsb(aarch64_cpu::asm::barrier::SY);
}

#[cfg(all(test, not(target_arch = "aarch64")))]
mod tests {
    use super::HostBarrier;
    use core::sync::atomic::Ordering;

    #[test]
    fn host_barriers_are_the_weakest_fences_that_model_the_arm_ones() {
        // DMB OSHST orders stores only: a release fence, not the `lock`-prefixed SeqCst fence, which would make
        // host benchmarks time a barrier the hardware never executes.
        assert_eq!(HostBarrier::WriteWrite.ordering(), Ordering::Release);
        assert_eq!(HostBarrier::ReadRead.ordering(), Ordering::Acquire);
        assert_eq!(HostBarrier::Full.ordering(), Ordering::SeqCst);
    }
}
