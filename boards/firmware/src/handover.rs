//! The live-update handover region: reserved at the top of the image's RAM bank (the board's
//! [`crate::dt::StaticDescription::handover_bytes`]), never given to the frame pool, and set up as the driver's
//! [`HandoverPool`] at every boot, so that domains preserved by one boot are found by the next.

use smmuv3::handover::Extent;
use smmuv3::handover::pool::HandoverPool;

/// The region's size on the QEMU boards: 64 KiB of records and 16 arenas of about 2 MiB.
pub const REGION_BYTES: u64 = 32 << 20;

/// The pool over the region (set up by [`crate::run`] when the board reserves one).
pub static POOL: HandoverPool = HandoverPool::new();

/// The region, once set up.
pub fn region() -> Option<Extent> {
    POOL.region().ok()
}
