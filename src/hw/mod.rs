//! Pure architectural encodings of the SMMUv3 (Arm IHI 0070): register layouts and fields, stream table entries,
//! context descriptors, commands and event records.

pub mod cd;
pub mod command;
pub mod event;
#[allow(missing_docs)] // register_bitfields! generates undocumented modules, masks and values.
pub mod regs;
pub mod ste;
