//! The handover region's byte format (see `docs/handover.md`): encoding, and decoding with full validation.
