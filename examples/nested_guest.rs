//! A guest's stage 1 inside a hypervisor's stage 2, against the fake SMMU (`smmuv3::testing`): what a hypervisor
//! does when it gives a VM a device whose DMA the guest's own IOMMU driver translates. Prints each step and the
//! commands the driver issued for it.
//!
//! `cargo run --example nested_guest`

use smmuv3::testing::{FakeSmmu, HeapFrames, Issued};
use smmuv3::{
    CdTableLayout, DefaultSubstream, DomainKind, GuestInvalidation, GuestStage1, InitOptions, Iommu, Prot,
    Stage2Options,
};
use smmuv3::{Iova, PhysAddr};

/// The device's StreamID (a virtual function at 01:00.2 behind a root port, say).
const VF: u32 = 0x102;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let frames = HeapFrames::leaked();
    let fake = FakeSmmu::start(frames);
    let smmu = fake.smmu();
    println!("probed: {}", smmu.features());
    let iommu: Iommu<&HeapFrames> = smmu.init(frames, &InitOptions::default())?;
    let rw = Prot::READ | Prot::WRITE | Prot::CACHEABLE;
    let mark = |what: &str, from: usize| {
        let issued: Vec<Issued> = fake.issued_since(from);
        println!("{what}: {} command(s) {issued:?}", issued.len());
    };

    // The hypervisor's stage 2 for the VM: guest RAM (IPA 0x4000_0000..) onto host RAM, in 2 MiB blocks.
    let from = fake.command_count();
    let vm = iommu.create_stage2(frames, Stage2Options { input_bits: 40 })?;
    iommu.map(vm, Iova(0x4000_0000), PhysAddr(0x8_0000_0000), 64 << 20, rw)?;
    mark("stage 2 for the VM (64 MiB of guest RAM)", from);

    // The guest's stage 1, named by IPA: its CD table at IPA 0x4010_0000, one context.
    let guest = GuestStage1 {
        cd_table: 0x4010_0000,
        cd_max_log2: 0,
        layout: CdTableLayout::Linear,
        default_substream: DefaultSubstream::Terminate,
    };
    let nested = iommu.create_nested(vm, guest)?;
    let from = fake.command_count();
    iommu.attach(nested, VF)?;
    mark(
        &format!("the VF (StreamID {VF:#x}) attached to the nested domain"),
        from,
    );
    let ste = iommu.low_level().ste(VF)?;
    println!(
        "  its STE: config {:?}, CD table at IPA {:#x}",
        ste.config(),
        ste.cd_table().0
    );
    assert_eq!(iommu.domain_kind(nested)?, DomainKind::Nested);

    // The guest changed its CD and its page tables: it asks the hypervisor to invalidate (a trapped command).
    let from = fake.command_count();
    iommu.invalidate_guest(nested, GuestInvalidation::Cd { ssid: 0, leaf: true })?;
    iommu.invalidate_guest(nested, GuestInvalidation::Asid(7))?;
    mark("the guest's CD and ASID 7 invalidated under the VM's VMID", from);

    // The hypervisor moves a page of guest RAM: stage 2 by IPA, then every nested domain's combined entries.
    let from = fake.command_count();
    iommu.unmap(vm, Iova(0x4000_0000), 0x1000)?;
    mark("a guest page unmapped at stage 2 (a 2 MiB block split first)", from);

    // Teardown: the VF detached (its STE aborts), the nested domain and the stage 2 freed.
    let from = fake.command_count();
    iommu.detach(VF)?;
    iommu.free_domain(nested)?;
    iommu.free_domain(vm)?;
    mark("detached and freed", from);
    println!(
        "done: {} commands in all, every one completed by a CMD_SYNC",
        fake.command_count()
    );
    Ok(())
}
