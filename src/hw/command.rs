//! TODO: filled in by the SMMU core work.
