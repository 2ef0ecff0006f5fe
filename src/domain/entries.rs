//! The entries a domain gives its streams: the CD of a stage-1 domain, the STE of each kind, and a guest's
//! stage-1 context as a guest's own driver builds it.

use crate::ctx::{CdTable, CdTableFormat};
use crate::hw::cd::{Cd, CdConfig};
use crate::hw::ste::{self, CdTableLayout, DefaultSubstream, EntryError, Stage1Config, Stage2Config, StallRule, Ste};
use crate::ids::DomainId;
use crate::mem::{FrameAllocator, PhysAddr};
use crate::pgtable::{Format, Granule, IoPageTable, Stage};
use crate::smmu::features::{Features, StallModel};

use super::{DomainError, DomainMemory, GuestStage1, Iommu, Translation, Unsupported};

/// A guest's stage-1 context as a guest's own driver builds it: a CD table with one CD for the guest's stage-1
/// table, in guest memory. For hypervisor firmware that plays the guest in tests (a real guest builds these itself,
/// and the hypervisor only learns [`GuestContext::stage1`]).
pub struct GuestContext {
    /// The CD table, at an IPA of guest memory.
    pub cd_table: CdTable,
    /// What the hypervisor passes to [`Iommu::create_nested`].
    pub stage1: GuestStage1,
}

impl GuestContext {
    /// Builds the context for `table` (a stage-1 table whose memory reports IPAs as its physical addresses) with
    /// the guest's `asid`, its CD table from `memory` (the same guest memory), walk attributes and output size
    /// as `features` require.
    ///
    /// # Errors
    /// [`DomainError::CdTable`] without memory, [`DomainError::Entry`] for a CD the SMMU would refuse (an ASID
    /// beyond its width, forced stalling).
    pub fn build<M: FrameAllocator>(
        features: &Features,
        memory: &M,
        table: &IoPageTable<M>,
        asid: u16,
    ) -> Result<GuestContext, DomainError> {
        let cd = stage1_cd(features, asid, table).map_err(DomainError::Entry)?;
        let mut cd_table = CdTable::new(CdTableFormat::Linear { ssid_bits: 0 }, memory, features.coherent)
            .map_err(|e| DomainError::CdTable(e.widen()))?;
        // No STE points to it yet: nothing to invalidate.
        if let Err(e) = cd_table.write(0, &cd, memory, |_| Ok(())) {
            // SAFETY: never referenced by an STE.
            unsafe { cd_table.free(memory) };
            return Err(DomainError::CdTable(e));
        }
        let stage1 = GuestStage1 {
            cd_table: cd_table.base().0,
            cd_max_log2: 0,
            layout: CdTableLayout::Linear,
            default_substream: DefaultSubstream::Terminate,
        };
        Ok(GuestContext { cd_table, stage1 })
    }
}

/// The CD of a stage-1 context with `asid` and `table` (a domain's, or a guest context the driver builds): walks
/// with the SMMU's attributes, the driver's MAIR, faults recorded and aborted, never stalled.
pub(super) fn stage1_cd<M: FrameAllocator>(
    features: &Features,
    asid: u16,
    table: &IoPageTable<M>,
) -> Result<Cd, EntryError> {
    stage1_cd_of(features, asid, table.format(), table.root())
}

/// The CD of a stage-1 domain with `asid` whose table of `format` has its root at `root` (what a restore compares
/// an adopted CD with, before any table is adopted).
pub(crate) fn stage1_cd_of(features: &Features, asid: u16, format: &Format, root: PhysAddr) -> Result<Cd, EntryError> {
    let (cacheability, shareability) = ste::walk_attributes(features.coherent);
    Cd::new(
        &CdConfig {
            asid,
            table: root,
            t0sz: 64 - format.input_bits,
            granule: format.granule,
            ips: size_encoding(format.output_bits),
            cacheability,
            shareability,
            mair: crate::pgtable::desc::MAIR,
            record_faults: true,
            abort_on_fault: true,
            stall: false,
            private_asid: true,
        },
        &features.entry_rules(),
    )
}

/// STE.S2PS / CD.IPS for an output size.
pub(super) fn size_encoding(bits: u8) -> u8 {
    match bits {
        0..=32 => 0,
        33..=36 => 1,
        37..=40 => 2,
        41..=42 => 3,
        43..=44 => 4,
        45..=48 => 5,
        _ => 6,
    }
}

impl<A: FrameAllocator, const D: usize> Iommu<A, D> {
    pub(super) fn walk_attributes(&self) -> (ste::Cacheability, ste::Shareability) {
        ste::walk_attributes(self.features().coherent)
    }

    pub(super) fn output_bits(&self) -> u8 {
        self.features().oas_bits.min(48)
    }

    pub(super) fn stalls_forced(&self) -> Result<(), DomainError> {
        match self.features().entry_rules().stall {
            StallRule::Forced => Err(DomainError::Unsupported(Unsupported::StallsForced)),
            _ => Ok(()),
        }
    }

    pub(super) fn new_table(
        &self,
        memory: DomainMemory,
        stage: Stage,
        input_bits: u8,
    ) -> Result<IoPageTable<DomainMemory>, DomainError> {
        let format = Format {
            stage,
            granule: Granule::Size4K,
            input_bits,
            output_bits: self.output_bits(),
        };
        let mut table = IoPageTable::new(format, memory, self.features().coherent)?;
        table.set_bbm_level(self.features().bbm_level);
        Ok(table)
    }

    /// The CD of a stage-1 domain with `asid` and `table`.
    pub(crate) fn stage1_cd(&self, asid: u16, table: &IoPageTable<DomainMemory>) -> Result<Cd, EntryError> {
        stage1_cd(self.features(), asid, table)
    }

    /// The STE's stage-2 fields of a stage-2 domain with `vmid` and `table`.
    pub(crate) fn stage2_config(&self, vmid: u16, table: &IoPageTable<DomainMemory>) -> Stage2Config {
        let (cacheability, shareability) = self.walk_attributes();
        let format = *table.format();
        Stage2Config {
            vmid,
            t0sz: 64 - format.input_bits,
            sl0: table.geometry().s2_sl0(),
            granule: format.granule,
            ps: size_encoding(format.output_bits),
            cacheability,
            shareability,
            table: table.root(),
            access_flag_fault_disable: false,
            // A stage-1 walk or CD fetch that reaches Device memory at stage 2 faults (as Linux sets it): a guest
            // cannot aim its CD table or tables at a passthrough BAR and make the SMMU read MMIO.
            protected_table_walk: true,
            stall: false,
            record_faults: true,
        }
    }

    /// The STE `domain` gives a stream, with `cd_table` for a stage-1 domain.
    pub(crate) fn domain_ste(&self, domain: DomainId, cd_table: Option<&CdTable>) -> Result<Ste, DomainError> {
        let features = *self.features();
        let rules = features.entry_rules();
        let (cacheability, shareability) = self.walk_attributes();
        let stall_disable = features.stall_model == StallModel::StallAndTerminate;
        let state = self.domains.get(domain)?;
        let ste = match &state.translation {
            Translation::Fixed(super::table::Fixed::Blocked) => Ok(Ste::abort()),
            Translation::Fixed(super::table::Fixed::Bypass) => Ok(Ste::bypass_for(&rules)),
            Translation::Stage1 { el2, .. } => {
                let Some(cds) = cd_table else {
                    return Err(DomainError::Unsupported(Unsupported::Stage1WithoutCdTable));
                };
                let bits = cds.format().ssid_bits();
                Ste::stage1(
                    &Stage1Config {
                        cd_table: cds.base(),
                        cd_max_log2: bits,
                        layout: CdTableLayout::Linear,
                        default_substream: if bits > 0 {
                            DefaultSubstream::Substream0
                        } else {
                            DefaultSubstream::Terminate
                        },
                        cacheability,
                        shareability,
                        stall_disable,
                        el2: *el2,
                    },
                    &rules,
                )
            }
            Translation::Stage2 { config, .. } => Ste::stage2(config, &rules),
            // The parent's stage 2 as the nested domain recorded it (no second slot lock).
            Translation::Nested {
                guest, stage2: config, ..
            } => Ste::nested(
                &Stage1Config {
                    cd_table: PhysAddr(guest.cd_table),
                    cd_max_log2: guest.cd_max_log2,
                    layout: guest.layout,
                    default_substream: guest.default_substream,
                    cacheability,
                    shareability,
                    stall_disable,
                    el2: false,
                },
                config,
                &rules,
            ),
        };
        ste.map_err(DomainError::Entry)
    }
}
