//! Pure architectural encodings of the SMMUv3 (Arm IHI 0070): register layouts and fields.

#[allow(missing_docs)] // register_bitfields! generates undocumented modules, masks and values.
pub mod regs;
