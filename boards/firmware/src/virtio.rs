//! virtio glue for devices behind the SMMU: virtio-drivers' [`Hal`] over one DMA arena whose device addresses are
//! IOVAs, and its PCI configuration access over the firmware's [`Ecam`] (enumeration has already numbered the buses
//! and assigned the BARs, so nothing is enumerated again).
//!
//! The arena is a physically contiguous block of RAM that the caller maps, in a domain, at an IOVA different from
//! its physical address: every device address this Hal hands out lies in that IOVA range, so the device's DMA works
//! only through the SMMU's translation. Its first [`RING_PAGES`] pages serve `dma_alloc` (the virtqueues); the rest
//! is a bounce area: `share` copies a buffer in (the driver passes stack buffers, which the domain does not map) and
//! `unshare` copies it back, as swiotlb does. virtio-drivers' `Hal` has associated functions without `self`, so the
//! arena's bookkeeping lives in a static, installed for the duration of a scenario by [`ArenaHal::install`].

use core::ptr::NonNull;

use spin::mutex::SpinMutex;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::{PciTransport, VirtioPciError};
use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE, PhysAddr};

use crate::pci::{Bdf, Ecam};

/// PCI vendor ID of virtio devices.
pub const VENDOR: u16 = 0x1af4;
/// PCI device ID of a modern (virtio 1.0) block device; 0x1001 is the transitional one.
pub const BLOCK_DEVICES: [u16; 2] = [0x1042, 0x1001];
/// Pages of the arena that `dma_alloc` hands out (virtqueue rings); the rest bounces shared buffers.
pub const RING_PAGES: usize = 16;
/// Alignment of a bounced buffer inside the bounce area.
const BOUNCE_ALIGN: u64 = 64;

/// A virtio block device on the PCI transport, its DMA through [`ArenaHal`].
pub type Block = virtio_drivers::device::blk::VirtIOBlk<ArenaHal, PciTransport>;

/// A physically contiguous, identity-mapped block of RAM and the IOVA the device sees it at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arena {
    /// Physical (= CPU) address, page-aligned.
    pub pa: u64,
    /// Device address (IOVA) of its first byte, page-aligned.
    pub iova: u64,
    /// Bytes; more than [`RING_PAGES`] pages.
    pub size: u64,
}

impl Arena {
    fn bounce_start(&self) -> u64 {
        (RING_PAGES * PAGE_SIZE) as u64
    }

    /// The CPU address of the byte at IOVA `iova`, if it lies in the arena.
    fn cpu_address(&self, iova: u64) -> Option<u64> {
        let offset = iova.checked_sub(self.iova)?;
        (offset < self.size).then_some(self.pa + offset)
    }
}

/// What the arena served while it was installed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArenaStats {
    /// `dma_alloc` calls served.
    pub allocations: u32,
    /// Buffers shared (bounced).
    pub shared: u32,
    /// Bytes bounced in either direction.
    pub bounced_bytes: u64,
    /// Requests refused for want of room (`dma_alloc` then returns address 0, `share` an IOVA outside the arena,
    /// which faults in the SMMU rather than reaching RAM).
    pub refused: u32,
}

struct State {
    arena: Arena,
    /// Next free ring page and how many ring allocations are live (all freed: the pages are reused).
    next_page: usize,
    live_allocations: usize,
    /// Next free byte offset in the bounce area and how many shared buffers are live (none: it starts over).
    bounce_next: u64,
    live_shares: usize,
    stats: ArenaStats,
}

static STATE: SpinMutex<Option<State>> = SpinMutex::new(None);

/// Why [`ArenaHal::install`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstallError {
    /// Another arena is installed.
    Busy,
    /// The arena is unaligned or has no room for the rings and a bounce area.
    BadArena(Arena),
}

impl core::fmt::Display for InstallError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            InstallError::Busy => f.write_str("a virtio DMA arena is installed already"),
            InstallError::BadArena(a) => write!(
                f,
                "DMA arena {:#x}+{:#x} at IOVA {:#x}: unaligned or smaller than {} ring pages and a bounce area",
                a.pa, a.size, a.iova, RING_PAGES
            ),
        }
    }
}

/// virtio-drivers' [`Hal`] over the installed [`Arena`]. Installing returns a guard; dropping it uninstalls the
/// arena, so drop every device using this Hal first (a device is reset when its transport is dropped).
#[derive(Debug)]
pub struct ArenaHal {
    _private: (),
}

impl ArenaHal {
    /// Installs `arena` for [`ArenaHal`]'s functions.
    ///
    /// # Safety
    /// The arena's RAM must be identity-mapped normal memory that nothing else uses until the guard is dropped
    /// and no device DMAs into it any more.
    ///
    /// # Errors
    /// [`InstallError`]; nothing is installed then.
    pub unsafe fn install(arena: Arena) -> Result<ArenaHal, InstallError> {
        let page = PAGE_SIZE as u64;
        if !arena.pa.is_multiple_of(page)
            || !arena.iova.is_multiple_of(page)
            || !arena.size.is_multiple_of(page)
            || arena.size <= arena.bounce_start()
        {
            return Err(InstallError::BadArena(arena));
        }
        let mut state = STATE.lock();
        if state.is_some() {
            return Err(InstallError::Busy);
        }
        *state = Some(State {
            arena,
            next_page: 0,
            live_allocations: 0,
            bounce_next: arena.bounce_start(),
            live_shares: 0,
            stats: ArenaStats::default(),
        });
        Ok(ArenaHal { _private: () })
    }

    /// What the arena served so far.
    pub fn stats(&self) -> ArenaStats {
        STATE.lock().as_ref().map(|s| s.stats).unwrap_or_default()
    }
}

impl Drop for ArenaHal {
    fn drop(&mut self) {
        *STATE.lock() = None;
    }
}

// SAFETY: `dma_alloc` hands out zeroed, page-aligned pages of the installed arena, which is identity-mapped RAM used
// by nothing else (`install`'s contract) and never handed out twice while allocated; `mmio_phys_to_virt` returns
// the identity mapping of BARs that enumeration placed inside the windows the firmware maps as device memory;
// `share` and `unshare` copy only within the caller's buffer and the arena's bounce area.
unsafe impl Hal for ArenaHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let mut guard = STATE.lock();
        let Some(state) = guard.as_mut() else {
            return (0, NonNull::dangling());
        };
        if state.next_page + pages > RING_PAGES {
            state.stats.refused += 1;
            return (0, NonNull::dangling());
        }
        let offset = (state.next_page * PAGE_SIZE) as u64;
        state.next_page += pages;
        state.live_allocations += 1;
        state.stats.allocations += 1;
        let cpu = (state.arena.pa + offset) as *mut u8;
        // SAFETY: the pages lie inside the installed arena (checked above) and are allocated to no one else.
        unsafe { core::ptr::write_bytes(cpu, 0, pages * PAGE_SIZE) };
        match NonNull::new(cpu) {
            Some(cpu) => (state.arena.iova + offset, cpu),
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        if let Some(state) = STATE.lock().as_mut() {
            state.live_allocations = state.live_allocations.saturating_sub(1);
            if state.live_allocations == 0 {
                state.next_page = 0;
            }
        }
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // The BARs sit in the PCI windows, identity-mapped as device memory; virtio-drivers refuses address 0.
        NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        let len = buffer.len() as u64;
        let mut guard = STATE.lock();
        let Some(state) = guard.as_mut() else { return 0 };
        let offset = state.bounce_next.next_multiple_of(BOUNCE_ALIGN);
        if offset + len > state.arena.size {
            // An IOVA no domain maps: the device's access faults instead of touching RAM.
            state.stats.refused += 1;
            return 0;
        }
        state.bounce_next = offset + len;
        state.live_shares += 1;
        state.stats.shared += 1;
        let bounce = (state.arena.pa + offset) as *mut u8;
        if direction == BufferDirection::DeviceToDriver {
            // SAFETY: `offset..offset + len` lies in the arena's bounce area and belongs to this share alone.
            unsafe { core::ptr::write_bytes(bounce, 0, len as usize) };
        } else {
            state.stats.bounced_bytes += len;
            // SAFETY: the caller guarantees `buffer` is valid and not accessed concurrently; the bounce range lies
            // in the arena, belongs to this share alone, and cannot overlap a caller's buffer outside the arena.
            unsafe { core::ptr::copy_nonoverlapping(buffer.as_ptr().cast::<u8>(), bounce, len as usize) };
        }
        state.arena.iova + offset
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        let len = buffer.len();
        let mut guard = STATE.lock();
        let Some(state) = guard.as_mut() else { return };
        let Some(bounce) = state.arena.cpu_address(paddr) else {
            // A refused share (address 0): nothing was bounced.
            return;
        };
        if direction != BufferDirection::DriverToDevice && bounce + len as u64 <= state.arena.pa + state.arena.size {
            state.stats.bounced_bytes += len as u64;
            // SAFETY: `paddr` came from `share` of this buffer, so its bounce range lies in the arena and holds
            // what the device wrote; the caller guarantees `buffer` is valid and not accessed concurrently.
            unsafe { core::ptr::copy_nonoverlapping(bounce as *const u8, buffer.as_ptr().cast::<u8>(), len) };
        }
        state.live_shares = state.live_shares.saturating_sub(1);
        if state.live_shares == 0 {
            state.bounce_next = state.arena.bounce_start();
        }
    }
}

/// virtio-drivers' configuration access over the firmware's ECAM.
pub struct EcamAccess<'a> {
    ecam: &'a Ecam,
}

fn bdf(device_function: DeviceFunction) -> Bdf {
    Bdf {
        bus: device_function.bus,
        device: device_function.device,
        function: device_function.function,
    }
}

impl ConfigurationAccess for EcamAccess<'_> {
    fn read_word(&self, device_function: DeviceFunction, register_offset: u8) -> u32 {
        self.ecam.read(bdf(device_function), usize::from(register_offset))
    }

    fn write_word(&mut self, device_function: DeviceFunction, register_offset: u8, data: u32) {
        self.ecam
            .write(bdf(device_function), usize::from(register_offset), data);
    }

    unsafe fn unsafe_clone(&self) -> Self {
        EcamAccess { ecam: self.ecam }
    }
}

/// Opens the virtio PCI transport of the function at `at`, whose BARs enumeration assigned (its capabilities are
/// read from configuration space through `ecam`).
///
/// # Errors
/// virtio-drivers' [`VirtioPciError`]: not a virtio device, a capability missing, a BAR not assigned.
pub fn transport(ecam: &Ecam, at: Bdf) -> Result<PciTransport, VirtioPciError> {
    let mut root = PciRoot::new(EcamAccess { ecam });
    let function = DeviceFunction {
        bus: at.bus,
        device: at.device,
        function: at.function,
    };
    PciTransport::new::<ArenaHal, _>(&mut root, function)
}
