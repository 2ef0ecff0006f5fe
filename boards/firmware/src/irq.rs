//! Interrupts through a GICv3 (arm-gic): the SMMU's lines are configured with the trigger type the board
//! describes, taken at EL2, acknowledged and counted. The handler is the top half only: it records that a line
//! fired; the scenario (the bottom half) then drains the event queue or the global errors with the driver.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use aarch64_cpu::asm::barrier::{SY, isb};
use aarch64_cpu::registers::{HCR_EL2, MPIDR_EL1, ReadWriteable, Readable};
use arm_gic::gicv3::{GicCpuInterface, GicV3, Group};
use arm_gic::{IntId, InterruptGroup, Trigger, UniqueMmioPointer};
use smmuv3::SmmuInterrupts;
use spin::mutex::SpinMutex;

use crate::dt::Gic;
use crate::time;

/// INTIDs counted: SGIs, PPIs and the SPIs up to 1019.
const COUNTED: usize = 1020;

static COUNTS: [AtomicU32; COUNTED] = [const { AtomicU32::new(0) }; COUNTED];
static GIC: SpinMutex<Option<GicV3<'static>>> = SpinMutex::new(None);
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Why interrupts could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqError {
    /// The board describes no GIC.
    NoGic,
    /// The GIC driver refused the configuration.
    Gic(&'static str),
}

impl core::fmt::Display for IrqError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            IrqError::NoGic => f.write_str("the board describes no GICv3"),
            IrqError::Gic(what) => write!(f, "GIC: {what}"),
        }
    }
}

/// Takes the GIC: distributor and this CPU's redistributor on, every SPI group 1, system-register interface at
/// EL2, physical IRQs (and FIQs, SErrors) routed to EL2 (HCR_EL2.IMO/FMO/AMO) and unmasked.
///
/// # Errors
/// [`IrqError::Gic`] when the redistributor frames cannot be walked.
///
/// # Safety
/// `gic` must be the machine's GICv3, identity-mapped as device memory, driven by nothing else; call once.
pub unsafe fn init(gic: &Gic) -> Result<(), IrqError> {
    let (Some(gicd), Some(gicr)) = (
        NonNull::new(gic.distributor.base as *mut _),
        NonNull::new(gic.redistributors.base as *mut _),
    ) else {
        return Err(IrqError::NoGic);
    };
    GicCpuInterface::enable_system_register_el2(true);
    // The ICC_* accesses below must see the system-register interface enabled.
    isb(SY);
    // SAFETY: the caller guarantees the GIC's registers, mapped and unaliased, for the rest of the run.
    let mut driver = unsafe { GicV3::new(UniqueMmioPointer::new(gicd), gicr, 1) }
        .map_err(|_| IrqError::Gic("no redistributor frames"))?;
    driver.setup(0);
    GicCpuInterface::set_priority_mask(0xff);
    *GIC.lock() = Some(driver);
    // Physical IRQs, FIQs and SErrors target EL2 (with IMO/FMO/AMO clear they would target EL1, and EL2 would
    // never take them), synchronised before they are unmasked.
    HCR_EL2.modify(HCR_EL2::IMO::EnableVirtualIRQ + HCR_EL2::FMO::EnableVirtualFIQ + HCR_EL2::AMO::SET);
    isb(SY);
    arm_gic::irq_enable();
    Ok(())
}

/// Whether the SMMU's lines are taken through the GIC ([`init`] and [`enable_smmu_lines`] succeeded for
/// edge-triggered lines).
pub fn smmu_lines_enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Enables every line the SMMU has, edge-triggered, routed to this CPU, and returns whether it did. A
/// level-triggered line stays disabled (returns `false`): the handler only counts, and a level line stays asserted
/// until the scenario has drained the queue, so it would fire again at once, for ever. Such a board's scenarios
/// poll instead.
///
/// # Errors
/// [`IrqError::NoGic`] before [`init`]; [`IrqError::Gic`] for a line the GIC refuses.
pub fn enable_smmu_lines(lines: &SmmuInterrupts) -> Result<bool, IrqError> {
    if !lines.edge_triggered {
        return Ok(false);
    }
    let mut guard = GIC.lock();
    let gic = guard.as_mut().ok_or(IrqError::NoGic)?;
    let this_cpu = MPIDR_EL1.get();
    for intid in [lines.eventq, lines.priq, lines.cmdq_sync, lines.gerror]
        .into_iter()
        .flatten()
    {
        let Some(spi) = intid.checked_sub(32) else {
            return Err(IrqError::Gic("an SMMU line below the SPIs"));
        };
        let id = IntId::spi(spi);
        gic.set_trigger(id, None, Trigger::Edge)
            .and_then(|()| gic.set_interrupt_priority(id, None, 0x80))
            .and_then(|()| gic.set_group(id, None, Group::Group1NS))
            .and_then(|()| gic.distributor().set_routing(id, Some(this_cpu)))
            .and_then(|()| gic.enable_interrupt(id, None, true))
            .map_err(|_| IrqError::Gic("SPI configuration"))?;
    }
    ENABLED.store(true, Ordering::SeqCst);
    Ok(true)
}

/// The IRQ handler: acknowledges every pending group-1 interrupt, counts it, ends it.
pub fn handle() {
    while let Some(intid) = GicCpuInterface::get_and_acknowledge_interrupt(InterruptGroup::Group1) {
        if let Some(count) = COUNTS.get(intid.raw_value() as usize) {
            count.fetch_add(1, Ordering::SeqCst);
        }
        GicCpuInterface::end_interrupt(intid, InterruptGroup::Group1);
    }
}

/// How many times `intid` has been taken since boot.
pub fn count(intid: u32) -> u32 {
    COUNTS.get(intid as usize).map_or(0, |c| c.load(Ordering::SeqCst))
}

/// Waits up to `timeout_us` for `intid` to be taken more than `seen` times; returns the new count, or `None`
/// when it did not arrive.
pub fn wait_beyond(intid: u32, seen: u32, timeout_us: u64) -> Option<u32> {
    let deadline = time::deadline_us(timeout_us);
    loop {
        let now = count(intid);
        if now > seen {
            return Some(now);
        }
        if time::expired(deadline) {
            return None;
        }
        core::hint::spin_loop();
    }
}
