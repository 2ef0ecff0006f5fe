//! Saving the handover region to the host at a hand-off (`dump-handover`, what `cargo xtask qemu --dump-handover
//! FILE` asks for): the scenarios that hand off call [`save_for_host`] just before the warm reset or the jump.
//! Here, at the top of the firmware's layers, so that the power and hand-off code below stays free of it.

/// The host path the region is saved to at a hand-off, empty for none.
static SAVE_PATH: spin::Mutex<heapless::String<{ crate::config::MAX_PATH_BYTES }>> =
    spin::Mutex::new(heapless::String::new());

/// Asks [`save_for_host`] to save the region to `path` (a host path) at the hand-off.
pub fn save_at_hand_off(path: &str) {
    let mut saved = SAVE_PATH.lock();
    saved.clear();
    // Room: the configuration holds at most MAX_PATH_BYTES.
    let _ = saved.push_str(path);
}

/// At a hand-off (a warm reset or a jump into the next image): saves the region's records, as the header says how
/// long they are (the whole metadata area when it does not validate as a header), to the host file
/// [`save_at_hand_off`] named, through semihosting, for `cargo xtask handover-dump`. Nothing without a path, a
/// region or semihosting.
pub fn save_for_host() {
    let path = SAVE_PATH.lock().clone();
    if path.is_empty() {
        return;
    }
    let Ok(bytes) = crate::handover::POOL.lock_metadata() else {
        crate::println!("handover region: not saved to {path}: no region");
        return;
    };
    let len = match smmuv3::handover::format::peek_header(&bytes) {
        Ok(header) => usize::try_from(header.total_len).map_or(bytes.len(), |n| n.min(bytes.len())),
        Err(_) => bytes.len(),
    };
    match crate::finish::save_to_host(&path, &bytes[..len]) {
        Ok(()) => crate::println!("handover region: {len} bytes saved to {path} on the host"),
        Err(e) => crate::println!("handover region: not saved to {path}: {e}"),
    }
}
