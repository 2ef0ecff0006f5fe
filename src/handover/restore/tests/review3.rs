//! Review 3 (adversarial): `attach_bypass` checked the freeze before it took the bookkeeping.

use super::*;
use crate::handover::pool::HandoverMemory;

/// Review 3, finding 5. `LowLevel::attach_bypass` read `streams_frozen()` and only then locked the bookkeeping: a
/// `prepare_handover` (SMMU left running) that took the bookkeeping in between checked every stream (0x30 still
/// aborted), recorded, froze and returned Ok; then the bypass was written, across the running hand-off, which the
/// freeze promised could not happen (`AttachError::StreamsFrozen`). Now the freeze is checked under the
/// bookkeeping: one of the two fails. Racy by nature (both spin for the bookkeeping): repeated.
#[test]
fn attach_bypass_racing_prepare_checks_the_freeze_under_the_bookkeeping_and_never_bypasses_a_running_hand_off() {
    let mut bad = None;
    for trial in 0..40 {
        let frames = frames();
        let mut region = Region::new();
        let model = Model::start(frames);
        let pool = region.pool();
        *model.window.lock().unwrap() = Some((region.extent.base, region.memory.as_ptr() as usize, region.extent.len));
        let core = pool.take_window(pool.window_bytes().unwrap()).unwrap();
        let mut first: Iommu<&'static HandoverMemory> = model.smmu().init(core, &InitOptions::default()).unwrap();
        let d = arena_stage1_on(&mut first, pool);
        first.attach(d, 0x10).unwrap();
        first.preserve(d, 0x77).unwrap();
        let smmu = &first;
        // Another structural operation holds the bookkeeping while both calls start.
        let book = smmu.book();
        let (bypassed, prepared) = std::thread::scope(|scope| {
            let prep = scope.spawn(|| smmu.prepare_handover(pool, BASE, 3, SURVIVING));
            std::thread::sleep(std::time::Duration::from_millis(5));
            // SAFETY: the device behind the stream is trusted with all memory (a test of bypass).
            let byp = scope.spawn(|| unsafe { smmu.low_level().attach_bypass(0x30) });
            std::thread::sleep(std::time::Duration::from_millis(5));
            drop(book);
            (byp.join().unwrap(), prep.join().unwrap())
        });
        let config = smmu.low_level().ste(0x30).unwrap().config();
        if prepared.is_ok() && bypassed.is_ok() {
            bad = Some((trial, config));
            core::mem::forget(first);
            break;
        }
        core::mem::forget(first);
    }
    assert_eq!(
        bad, None,
        "prepare_handover (running) succeeded and stream 0x30 was then set to bypass: (trial, STE config)"
    );
}
