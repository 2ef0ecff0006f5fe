//! A `no_std` driver for the Arm System MMU v3 (Arm IHI 0070), for hypervisor firmware running at EL2.
//!
//! The driver never hard-codes an address: a board hands it an [`SmmuDescription`] (from its device tree, its ACPI
//! tables or its own constants) and it finds everything else in the SMMU's ID registers. A hypervisor works with
//! **domains** (an address space a device's DMA goes through) and never encodes an STE, a CD or a TLBI. No heap:
//! every table comes from a [`FrameAllocator`] the hypervisor gives.
//!
//! # The guide
//!
//! Each step below runs as a doctest on the host, against the fake SMMU of the `testing` module (feature `testing`): the
//! hidden lines start it where real firmware would map the SMMU's registers. Everything else is what firmware on
//! a board writes.
//!
//! ## 1. Probe and initialise
//!
//! [`Smmu::probe`] reads the ID registers of the SMMU at a mapped address; [`Smmu::init`] programs the stream
//! table and the queues from the allocator it is given and turns translation on, every stream aborting until a
//! domain is attached. The [`Iommu`] it returns is `Send + Sync`: keep it in a `static` and call it from every CPU.
//!
//! ```
//! # use smmuv3::testing::{FakeSmmu, HeapFrames};
//! use smmuv3::{InitOptions, Iommu};
//! # let frames = HeapFrames::leaked();
//! # let fake = FakeSmmu::start(frames);
//! // On a board: `unsafe { Smmu::probe(registers, description.size) }?`, registers mapped as Device memory,
//! // and the firmware's frame allocator for `frames`.
//! let smmu = fake.smmu();
//! assert_eq!(smmu.features().stages(), smmuv3::Stages::NESTED); // stage 1, stage 2 and nesting
//! let iommu: Iommu<&HeapFrames> = smmu.init(frames, &InitOptions::default())?;
//! assert!(iommu.is_enabled());
//! # Ok::<(), smmuv3::InitError>(())
//! ```
//!
//! ## 2. A device's StreamID
//!
//! A PCI function's StreamID is its requester ID (bus, device, function) through the root complex's `iommu-map`
//! (device tree) or IORT ID mappings (ACPI), which the board hands over as an [`IommuMap`].
//!
//! ```
//! use smmuv3::{IommuMap, IommuMapEntry};
//! let mut map = IommuMap::new();
//! map.push(IommuMapEntry { rid_base: 0, sid_base: 0x1_0000, length: 0x1_0000 })?;
//! let rid = (0 << 8) | (2 << 3); // 00:02.0
//! assert_eq!(map.stream_id(rid), Some(0x1_0010));
//! # Ok::<(), smmuv3::board::IommuMapFull>(())
//! ```
//!
//! ## 3. A stage-1 domain
//!
//! ```
//! # use smmuv3::testing::{FakeSmmu, HeapFrames};
//! # use smmuv3::{InitOptions, Iommu};
//! # let frames = HeapFrames::leaked();
//! # let fake = FakeSmmu::start(frames);
//! # let iommu: Iommu<&HeapFrames> = fake.smmu().init(frames, &InitOptions::default()).unwrap();
//! use smmuv3::{Iova, PhysAddr, Prot, Stage1Options};
//! let rw = Prot::READ | Prot::WRITE | Prot::CACHEABLE;
//! let dma = iommu.create_stage1(frames, Stage1Options { input_bits: 39, el2: false })?;
//! iommu.map(dma, Iova(0x1000_0000), PhysAddr(0x8000_0000), 0x4000, rw)?; // size in bytes
//! iommu.attach(dma, 0x10)?;                                  // the STE written hitlessly, CFGI_STE + CMD_SYNC
//! assert_eq!(iommu.iova_to_phys(dma, Iova(0x1000_2345))?, Some(PhysAddr(0x8000_2345)));
//! iommu.unmap(dma, Iova(0x1000_0000), 0x4000)?;              // cleared and invalidated before it returns
//! iommu.detach(0x10)?;
//! iommu.free_domain(dma)?;
//! # Ok::<(), smmuv3::DomainError>(())
//! ```
//!
//! ## 4. A VM's stage 2
//!
//! A stage-2 domain translates a VM's IPAs; RAM goes in blocks where alignment allows.
//!
//! ```
//! # use smmuv3::testing::{FakeSmmu, HeapFrames};
//! # use smmuv3::{InitOptions, Iommu};
//! # let frames = HeapFrames::leaked();
//! # let fake = FakeSmmu::start(frames);
//! # let iommu: Iommu<&HeapFrames> = fake.smmu().init(frames, &InitOptions::default()).unwrap();
//! use smmuv3::{DomainKind, Iova, PhysAddr, Prot, Stage2Options};
//! let vm = iommu.create_stage2(frames, Stage2Options { input_bits: 40 })?;
//! iommu.map(vm, Iova(0x4000_0000), PhysAddr(0x1_0000_0000), 64 << 20, Prot::READ | Prot::WRITE | Prot::CACHEABLE)?;
//! iommu.attach(vm, 0x100)?; // a virtual function given to the VM
//! assert_eq!(iommu.domain_kind(vm)?, DomainKind::Stage2);
//! # Ok::<(), smmuv3::DomainError>(())
//! ```
//!
//! ## 5. A guest's stage 1 inside it (nested)
//!
//! The guest owns its CD table and stage-1 tables (in its memory, named by IPA); the hypervisor's stage 2 confines
//! them. The guest's invalidations go through [`Iommu::invalidate_guest`], under the parent's VMID.
//!
//! ```
//! # use smmuv3::testing::{FakeSmmu, HeapFrames, Issued};
//! # use smmuv3::{InitOptions, Iommu, Prot, Stage2Options};
//! # let frames = HeapFrames::leaked();
//! # let fake = FakeSmmu::start(frames);
//! # let iommu: Iommu<&HeapFrames> = fake.smmu().init(frames, &InitOptions::default()).unwrap();
//! # let vm = iommu.create_stage2(frames, Stage2Options { input_bits: 40 }).unwrap();
//! # iommu.map(vm, Iova(0x4000_0000), PhysAddr(0x1_0000_0000), 2 << 20, Prot::READ | Prot::WRITE | Prot::CACHEABLE).unwrap();
//! use smmuv3::{CdTableLayout, DefaultSubstream, GuestInvalidation, GuestStage1, Iova, PhysAddr};
//! let guest = GuestStage1 {
//!     cd_table: 0x4000_0000, // the guest's CD table, an IPA
//!     cd_max_log2: 0,
//!     layout: CdTableLayout::Linear,
//!     default_substream: DefaultSubstream::Terminate,
//! };
//! let nested = iommu.create_nested(vm, guest)?;
//! iommu.attach(nested, 0x18)?;
//! let mark = fake.command_count();
//! iommu.invalidate_guest(nested, GuestInvalidation::Cd { ssid: 0, leaf: true })?;
//! assert_eq!(fake.issued_since(mark), [Issued::Cd { sid: 0x18, ssid: 0 }, Issued::Sync]);
//! # Ok::<(), smmuv3::DomainError>(())
//! ```
//!
//! ## 6. Faults, and errors that say what happened
//!
//! [`Iommu::drain_faults`] files each event record under the domain of its stream (interrupt handlers call
//! [`Iommu::handle_interrupt`]); every error is a [`core::error::Error`] whose [`source`](core::error::Error::source)
//! is what it wraps.
//!
//! ```
//! # use smmuv3::testing::{FakeSmmu, HeapFrames};
//! # use smmuv3::{InitOptions, Iommu, Prot, Stage2Options};
//! # let frames = HeapFrames::leaked();
//! # let fake = FakeSmmu::start(frames);
//! # let iommu: Iommu<&HeapFrames> = fake.smmu().init(frames, &InitOptions::default()).unwrap();
//! # let vm = iommu.create_stage2(frames, Stage2Options { input_bits: 40 }).unwrap();
//! use smmuv3::{Iova, PhysAddr};
//! use core::error::Error;
//! use smmuv3::DomainError;
//! iommu.drain_faults(|_event| {})?;
//! assert!(iommu.domain_faults(vm)?.faults.is_empty());
//! let rw = Prot::READ | Prot::WRITE;
//! iommu.map(vm, Iova(0x1000), PhysAddr(0x8000_0000), 0x1000, rw)?;
//! let error = iommu.map(vm, Iova(0x1000), PhysAddr(0x9000_0000), 0x1000, rw).unwrap_err(); // mapped already
//! assert!(matches!(error, DomainError::Map(_)));
//! assert!(error.source().is_some(), "{error}: the page table's own error beneath");
//! # Ok::<(), Box<dyn Error>>(())
//! ```
//!
//! ## 7. Preserve domains for a live update
//!
//! A preserved domain's tables live in a [`HandoverPool`] over a reserved-memory region that survives the
//! update; [`Iommu::prepare_handover`] writes the records (CRC-checked) and freezes what it recorded.
//!
//! ```
//! # use smmuv3::testing::{FakeSmmu, HeapFrames};
//! # use smmuv3::{InitOptions, Iommu};
//! # use core::ptr::NonNull;
//! # let frames = HeapFrames::leaked();
//! # let fake = FakeSmmu::start(frames);
//! # let iommu: Iommu<&HeapFrames> = fake.smmu().init(frames, &InitOptions::default()).unwrap();
//! # let bytes = smmuv3::handover::REGION_METADATA_BYTES as usize + (1 << 20);
//! # let memory: &'static mut [u64] = Box::leak(vec![0u64; bytes / 8].into_boxed_slice());
//! # let (region, virt) = (Extent { base: 0x80_0000_0000, len: bytes as u64 }, NonNull::from(&mut memory[0]).cast());
//! use smmuv3::{Extent, HandoverPool, Iova, PhysAddr, Prot, Stage2Options};
//! static POOL: HandoverPool = HandoverPool::new();
//! // SAFETY: `region` is reserved memory nothing else uses, mapped at `virt` (on a board: from /reserved-memory).
//! unsafe { POOL.set_up(region, virt) }?;
//! let vm = iommu.create_stage2(POOL.take_memory()?, Stage2Options { input_bits: 40 })?;
//! iommu.map(vm, Iova(0x4000_0000), PhysAddr(0x1_0000_0000), 2 << 20, Prot::READ | Prot::WRITE | Prot::CACHEABLE)?;
//! iommu.attach(vm, 0x100)?;
//! iommu.preserve(vm, 0x5eed)?;  // a token of the caller's choosing
//! let ram = [Extent { base: 0x1_0000_0000, len: 1 << 30 }]; // memory that survives the update
//! let written = iommu.prepare_handover(&POOL, 0x905_0000, 1, &ram)?;
//! assert!(written > 0);
//! // Then: a warm reset, or a jump into the next image, with the SMMU left translating (Smmu::adopt_running).
//! # Ok::<(), Box<dyn core::error::Error>>(())
//! ```
//!
//! ## 8. Restore them in the next image
//!
//! The next image (after a reset: the SMMU initialised afresh, every stream aborting) validates the region, walks
//! every preserved table to check it reaches only memory it may, and rebuilds the domains; the hypervisor takes
//! each back by its token, and [`Iommu::finish_handover`] frees what nobody took.
//!
//! ```
//! # use smmuv3::testing::{FakeSmmu, HeapFrames};
//! # use smmuv3::{InitOptions, Iommu, Prot, Stage2Options};
//! # use core::ptr::NonNull;
//! # let frames = HeapFrames::leaked();
//! # let bytes = smmuv3::handover::REGION_METADATA_BYTES as usize + (1 << 20);
//! # let memory: &'static mut [u64] = Box::leak(vec![0u64; bytes / 8].into_boxed_slice());
//! # let (region, virt) = (Extent { base: 0x80_0000_0000, len: bytes as u64 }, NonNull::from(&mut memory[0]).cast());
//! # let ram = [Extent { base: 0x1_0000_0000, len: 1 << 30 }];
//! # {
//! #     let fake = FakeSmmu::start(frames);
//! #     let first: Iommu<&HeapFrames> = fake.smmu().init(frames, &InitOptions::default()).unwrap();
//! #     let pool: &'static HandoverPool = Box::leak(Box::new(HandoverPool::new()));
//! #     // SAFETY: the leaked region above, used by nothing else; this "first image" is forgotten below.
//! #     unsafe { pool.set_up(region, virt) }.unwrap();
//! #     let vm = first.create_stage2(pool.take_memory().unwrap(), Stage2Options { input_bits: 40 }).unwrap();
//! #     first.map(vm, Iova(0x4000_0000), PhysAddr(0x1_0000_0000), 2 << 20, Prot::READ | Prot::WRITE | Prot::CACHEABLE).unwrap();
//! #     first.attach(vm, 0x100).unwrap();
//! #     first.preserve(vm, 0x5eed).unwrap();
//! #     first.prepare_handover(pool, 0x905_0000, 1, &ram).unwrap();
//! #     core::mem::forget(first); // the first image is gone: a reset
//! # }
//! # let fake = FakeSmmu::start(frames);
//! # let iommu: Iommu<&HeapFrames> = fake.smmu().init(frames, &InitOptions::default()).unwrap();
//! use smmuv3::{Extent, HandoverPool, Iova, PhysAddr, RestoreOptions};
//! static POOL: HandoverPool = HandoverPool::new();
//! // SAFETY: the same reserved region, now this image's.
//! unsafe { POOL.set_up(region, virt) }?;
//! let report = iommu.restore_handover(&POOL, 0x905_0000, &RestoreOptions::new(&ram))?;
//! assert_eq!((report.domains, report.streams), (1, 1));
//! let vm = iommu.retrieve(0x5eed)?;
//! assert_eq!(iommu.iova_to_phys(vm, Iova(0x4000_1234))?, Some(PhysAddr(0x1_0000_1234))); // the same translation
//! iommu.finish_handover(&POOL, 0x905_0000)?;
//! # Ok::<(), Box<dyn core::error::Error>>(())
//! ```
//!
//! The rest: [`Iommu::low_level`] for what a domain does not cover (raw STEs, vetted commands), [`handover`] for
//! the region's format and what a restore trusts, `testing` (feature `testing`) for the test doubles, and the README for the QEMU
//! scenarios that run all of this with real DMA.
#![no_std]
#![deny(missing_docs)]

pub mod board;
pub mod ctx;
pub mod deadline;
pub mod domain;
mod errors;
pub mod handover;
pub mod hitless;
#[cfg(any(test, feature = "testing"))]
mod host_frames;
pub mod hw;
pub mod ids;
pub mod mem;
pub mod pgtable;
pub mod protected;
pub mod queue;
pub mod smmu;
pub mod stream;
mod sync;
mod table;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use board::{IommuMap, IommuMapEntry, SmmuDescription, SmmuInterrupts};
pub use domain::{
    Capacity, DomainError, DomainId, DomainKind, DomainMemory, Fault, FaultKind, FaultReport, GuestContext,
    GuestInvalidation, GuestStage1, Iommu, LowLevel, Stage1Options, Stage2Options, Unsupported, Wanted,
};
pub use handover::pool::HandoverPool;
pub use handover::verify::RestoreOptions;
pub use hw::ste::{CdTableLayout, DefaultSubstream};
pub use mem::Extent;
pub use mem::{DmaBlock, FrameAllocator, Iova, PhysAddr};
pub use pgtable::Prot;
/// The ID registers decoded (kept at the crate root, where it was before the SMMU core had a folder).
pub use smmu::features;
pub use smmu::{
    Bookkeeping, Features, IdRegisters, InitError, InitOptions, InterruptSources, ProbeError, Quirks, Smmu, Stages,
};
