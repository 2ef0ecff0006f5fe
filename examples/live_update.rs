//! A live update against the fake SMMU (`smmuv3::testing`): the first image preserves a VM's stage 2 under a
//! token and prepares the handover region; the "next image" (a new driver over the same region, as after a warm
//! reset) validates it, walks the preserved tables, rebuilds the domain, and the hypervisor takes it back by its
//! token. Prints each step.
//!
//! `cargo run --example live_update`

use core::ptr::NonNull;
use smmuv3::{Iova, PhysAddr};

use smmuv3::testing::{FakeSmmu, HeapFrames};
use smmuv3::{Extent, HandoverPool, InitOptions, Iommu, Prot, RestoreOptions, Stage2Options};

/// The SMMU's register base, as the board describes it: a record names its SMMU by it.
const SMMU_BASE: u64 = 0x905_0000;
/// The VM's token, the caller's choice.
const TOKEN: u64 = 0x5eed_0001;
/// The VF's StreamID.
const VF: u32 = 0x100;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let frames = HeapFrames::leaked();
    // The reserved region (on a board: a /reserved-memory node, or the board's static description): 64 KiB of
    // records and 4 MiB of pool, at physical 0x80_0000_0000 (host memory here).
    let bytes = smmuv3::handover::REGION_METADATA_BYTES as usize + (4 << 20);
    let memory: &'static mut [u64] = Box::leak(vec![0u64; bytes / 8].into_boxed_slice());
    let region = Extent {
        base: 0x80_0000_0000,
        len: bytes as u64,
    };
    let virt = NonNull::from(&mut memory[0]).cast::<u8>();
    // The guest RAM that survives the update: every preserved mapping must lie in it.
    let ram = [Extent {
        base: 0x8_0000_0000,
        len: 1 << 30,
    }];

    // The first image.
    {
        let fake = FakeSmmu::start(frames);
        let iommu: Iommu<&HeapFrames> = fake.smmu().init(frames, &InitOptions::default())?;
        let pool: &'static HandoverPool = Box::leak(Box::new(HandoverPool::new()));
        // SAFETY: leaked memory used by nothing else.
        unsafe { pool.set_up(region, virt) }?;
        let vm = iommu.create_stage2(pool.take_memory()?, Stage2Options { input_bits: 40 })?;
        iommu.map(
            vm,
            Iova(0x4000_0000),
            PhysAddr(0x8_0000_0000),
            16 << 20,
            Prot::READ | Prot::WRITE | Prot::CACHEABLE,
        )?;
        iommu.map(
            vm,
            Iova(0x7000_0000),
            PhysAddr(0x8_3000_0000),
            0x3000,
            Prot::READ | Prot::WRITE,
        )?;
        iommu.attach(vm, VF)?;
        iommu.preserve(vm, TOKEN)?;
        let written = iommu.prepare_handover(pool, SMMU_BASE, 1, &ram)?;
        println!("first image: VM preserved under {TOKEN:#x}, {written} bytes of records written");
        println!("  phase: {:?}", iommu.handover_phase());
        // A warm reset: the driver is gone without a trace, the region's memory stays.
        core::mem::forget(iommu);
    }

    // The next image.
    let fake = FakeSmmu::start(frames);
    let iommu: Iommu<&HeapFrames> = fake.smmu().init(frames, &InitOptions::default())?;
    let pool: &'static HandoverPool = Box::leak(Box::new(HandoverPool::new()));
    // SAFETY: as above; the first image is gone.
    unsafe { pool.set_up(region, virt) }?;
    let report = iommu.restore_handover(pool, SMMU_BASE, &RestoreOptions::new(&ram))?;
    println!(
        "next image: restored {} domain(s) and {} stream(s) of generation {}, every preserved table walked",
        report.domains, report.streams, report.generation
    );
    let vm = iommu.retrieve(TOKEN)?;
    for iova in [0x4000_1234u64, 0x40ff_fff0, 0x7000_2000] {
        println!("  IOVA {iova:#x} -> PA {:#x}", iova_to_phys(&iommu, vm, iova)?);
    }
    println!("  StreamID {VF:#x}: {:?}", iommu.low_level().ste(VF)?.config());
    let finish = iommu.finish_handover(pool, SMMU_BASE)?;
    println!(
        "finished: {} unclaimed domain(s) freed; phase {:?}",
        finish.unclaimed,
        iommu.handover_phase()
    );
    Ok(())
}

fn iova_to_phys(iommu: &Iommu<&HeapFrames>, vm: smmuv3::DomainId, iova: u64) -> Result<u64, String> {
    iommu
        .iova_to_phys(vm, Iova(iova))
        .map_err(|e| e.to_string())?
        .map(|pa| pa.0)
        .ok_or_else(|| format!("IOVA {iova:#x} not mapped after the restore"))
}
