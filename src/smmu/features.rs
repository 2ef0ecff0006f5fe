//! What an SMMU implements, decoded from its ID registers (SMMU_IDR0..5, SMMU_IIDR, SMMU_AIDR).

use core::fmt;

use bitflags::bitflags;
use tock_registers::LocalRegisterCopy;

use crate::hw::regs::{AIDR, IDR0, IDR1, IDR3, IDR5, IIDR};
use crate::hw::ste::{EntryRules, StallRule};

/// The raw ID registers, as read from the SMMU. Kept so that a report can show the exact values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdRegisters {
    /// SMMU_IDR0..SMMU_IDR5 (IDR4 is implementation defined).
    pub idr: [u32; 6],
    /// SMMU_IIDR.
    pub iidr: u32,
    /// SMMU_AIDR.
    pub aidr: u32,
}

/// Translation table endianness the SMMU supports (IDR0.TTENDIAN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableEndianness {
    /// Both little- and big-endian, selected per context.
    Mixed,
    /// Little-endian only.
    Little,
    /// Big-endian only.
    Big,
    /// The reserved encoding.
    Reserved,
}

/// Stall model (IDR0.STALL_MODEL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StallModel {
    /// Stall and terminate models both supported.
    StallAndTerminate,
    /// Only the terminate model: faulting transactions are never stalled.
    TerminateOnly,
    /// Stall is forced for faults that can stall.
    StallForced,
    /// The reserved encoding.
    Reserved,
}

/// Hardware update of the Access flag and dirty state (IDR0.HTTU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HardwareUpdate {
    /// No hardware update.
    None,
    /// Access flag updated by hardware.
    AccessFlag,
    /// Access flag and dirty state updated by hardware.
    AccessFlagAndDirty,
    /// The reserved encoding.
    Reserved,
}

/// Translation granules the SMMU supports (IDR5.GRAN*).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Granules {
    /// 4 KiB.
    pub size_4k: bool,
    /// 16 KiB.
    pub size_16k: bool,
    /// 64 KiB.
    pub size_64k: bool,
}

bitflags! {
    /// Behaviour the driver must change for a known implementation erratum, found from SMMU_IIDR in the table
    /// [`ERRATA`] (the same errata Linux's `arm_smmu_device_iidr_probe` works around). [`Features::decode`] has
    /// already applied the first three to the features it reports; the command queue applies the last.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Quirks: u32 {
        /// Nested translation (stage 1 and stage 2 on one stream) must not be used: [`Features::nesting`] is
        /// false and [`Features::stages`] reports no nesting. Each stage alone stays usable.
        const NO_NESTING = 1 << 0;
        /// WFE wake-up events must not be relied on: [`Features::sev`] is false.
        const NO_SEV = 1 << 1;
        /// Broadcast TLB maintenance must not be relied on: [`Features::broadcast_tlb`] is false.
        const NO_BTM = 1 << 2;
        /// At most 63 commands may be issued between two CMD_SYNCs: a batch of 63 commands needs its CMD_SYNC
        /// before a 64th command.
        const CMDQ_SYNC_EVERY_63 = 1 << 3;
    }
}

/// SMMU_IIDR.Implementer of Arm Ltd (JEP106 bank 4, code 0x3B).
pub const IMPLEMENTER_ARM: u16 = 0x43b;
/// SMMU_IIDR.ProductID of Arm's CoreLink MMU-600.
pub const PRODUCT_ARM_MMU_600: u16 = 0x483;
/// SMMU_IIDR.ProductID of Arm's CoreLink MMU-700.
pub const PRODUCT_ARM_MMU_700: u16 = 0x487;

/// One implementation erratum the driver works around: which parts it affects and what the driver does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Erratum {
    /// SMMU_IIDR.Implementer.
    pub implementer: u16,
    /// SMMU_IIDR.ProductID.
    pub product: u16,
    /// The product's name.
    pub product_name: &'static str,
    /// First affected release, `(variant, revision)`: r`variant`p`revision`.
    pub first: (u8, u8),
    /// Last affected release, `(variant, revision)`.
    pub last: (u8, u8),
    /// The erratum numbers, as the vendor's errata notice names them.
    pub errata: &'static str,
    /// What the driver does about it.
    pub quirks: Quirks,
}

impl Erratum {
    /// Whether the SMMU this IIDR value identifies is affected.
    pub fn affects(&self, iidr: u32) -> bool {
        let iidr = LocalRegisterCopy::<u32, IIDR::Register>::new(iidr);
        let release = (iidr.read(IIDR::VARIANT) as u8, iidr.read(IIDR::REVISION) as u8);
        iidr.read(IIDR::IMPLEMENTER) as u16 == self.implementer
            && iidr.read(IIDR::PRODUCT_ID) as u16 == self.product
            && self.first <= release
            && release <= self.last
    }
}

impl fmt::Display for Erratum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} r{}p{}..r{}p{}: Arm erratum {} ({})",
            self.product_name, self.first.0, self.first.1, self.last.0, self.last.1, self.errata, self.quirks
        )
    }
}

/// The errata the driver knows, keyed by SMMU_IIDR. Sources: Arm's MMU-600 and MMU-700 software developer errata
/// notices, as Linux applies them (`arm_smmu_device_iidr_probe`).
pub const ERRATA: [Erratum; 4] = [
    Erratum {
        implementer: IMPLEMENTER_ARM,
        product: PRODUCT_ARM_MMU_600,
        product_name: "MMU-600",
        first: (0, 0),
        last: (0, 2),
        errata: "1076982",
        quirks: Quirks::NO_SEV,
    },
    Erratum {
        implementer: IMPLEMENTER_ARM,
        product: PRODUCT_ARM_MMU_600,
        product_name: "MMU-600",
        first: (0, 0),
        last: (1, 15),
        errata: "1209401",
        quirks: Quirks::NO_NESTING,
    },
    Erratum {
        implementer: IMPLEMENTER_ARM,
        product: PRODUCT_ARM_MMU_700,
        product_name: "MMU-700",
        first: (0, 0),
        last: (15, 15),
        errata: "2812531",
        quirks: Quirks::NO_BTM.union(Quirks::CMDQ_SYNC_EVERY_63),
    },
    Erratum {
        implementer: IMPLEMENTER_ARM,
        product: PRODUCT_ARM_MMU_700,
        product_name: "MMU-700",
        first: (0, 0),
        last: (15, 15),
        errata: "2268618, 2812531",
        quirks: Quirks::NO_NESTING,
    },
];

/// The entries of [`ERRATA`] that affect the SMMU this IIDR value identifies.
pub fn errata_for(iidr: u32) -> impl Iterator<Item = &'static Erratum> {
    ERRATA.iter().filter(move |e| e.affects(iidr))
}

impl Quirks {
    /// The quirks every erratum of [`ERRATA`] affecting this IIDR value calls for.
    pub fn from_iidr(iidr: u32) -> Quirks {
        errata_for(iidr).fold(Quirks::empty(), |q, e| q | e.quirks)
    }

    /// Each quirk of `self` with the errata that call for it, e.g. `(NO_BTM, "MMU-700 2812531")`.
    pub fn errata(&self) -> impl Iterator<Item = (Quirks, &'static str)> + '_ {
        const NAMES: [(Quirks, &str); 4] = [
            (Quirks::NO_NESTING, "MMU-600 r0/r1 1209401; MMU-700 2268618, 2812531"),
            (Quirks::NO_SEV, "MMU-600 r0p0..r0p2 1076982"),
            (Quirks::NO_BTM, "MMU-700 2812531"),
            (Quirks::CMDQ_SYNC_EVERY_63, "MMU-700 2812531"),
        ];
        NAMES.into_iter().filter(move |(q, _)| self.contains(*q))
    }
}

impl fmt::Display for Quirks {
    /// `none`, or each quirk with the Arm errata behind it: `no nesting (Arm errata MMU-700 2268618, 2812531)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        for (i, (quirk, errata)) in self.errata().enumerate() {
            let what = match quirk {
                Quirks::NO_NESTING => "no nesting",
                Quirks::NO_SEV => "no SEV",
                Quirks::NO_BTM => "no BTM",
                _ => "CMD_SYNC every 63 commands",
            };
            write!(f, "{}{what} (Arm errata {errata})", if i == 0 { "" } else { ", " })?;
        }
        Ok(())
    }
}

/// Everything the driver uses about an SMMU, decoded from its ID registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// The registers this was decoded from.
    pub raw: IdRegisters,
    /// Stage-1 translation supported.
    pub stage1: bool,
    /// Stage-2 translation supported.
    pub stage2: bool,
    /// Nested translation (both stages on one stream): both stages, and no erratum against it
    /// ([`Quirks::NO_NESTING`]).
    pub nesting: bool,
    /// AArch64 (VMSAv8-64) translation tables supported.
    pub aarch64_tables: bool,
    /// AArch32 (VMSAv8-32 LPAE) translation tables supported.
    pub aarch32_tables: bool,
    /// The SMMU's accesses to tables and queues are IO-coherent (IDR0.COHACC, unless the board overrode it with
    /// [`crate::Smmu::apply_board_coherency`]).
    pub coherent: bool,
    /// Broadcast TLB maintenance (IDR0.BTM, unless [`Quirks::NO_BTM`]).
    pub broadcast_tlb: bool,
    /// Hardware Access flag / dirty updates.
    pub hardware_update: HardwareUpdate,
    /// EL2 (hypervisor) stage-1 contexts.
    pub hyp: bool,
    /// PCIe ATS.
    pub ats: bool,
    /// PRI (and a PRI queue).
    pub pri: bool,
    /// MSIs.
    pub msi: bool,
    /// WFE wake-up events (IDR0.SEV, unless [`Quirks::NO_SEV`]).
    pub sev: bool,
    /// Address translation operations.
    pub atos: bool,
    /// Two-level context-descriptor tables.
    pub cd_two_level: bool,
    /// ASID width in bits: 8 or 16.
    pub asid_bits: u8,
    /// VMID width in bits: 8 or 16.
    pub vmid_bits: u8,
    /// Translation table endianness.
    pub endianness: TableEndianness,
    /// Stall model.
    pub stall_model: StallModel,
    /// Terminate model (IDR0.TERM_MODEL = 1): a terminated transaction always aborts, so CD.A must be 1; with 0 it
    /// aborts or reads as zero and ignores writes, as CD.A selects.
    pub terminate_always_aborts: bool,
    /// Two-level stream tables supported (IDR0.ST_LEVEL).
    pub stream_table_two_level: bool,
    /// StreamID width in bits.
    pub sid_bits: u8,
    /// SubstreamID width in bits (0: no substreams).
    pub ssid_bits: u8,
    /// log2 of the largest command queue.
    pub cmdq_log2_max: u8,
    /// log2 of the largest event queue.
    pub eventq_log2_max: u8,
    /// log2 of the largest PRI queue, when PRI is supported.
    pub priq_log2_max: Option<u8>,
    /// Queue base registers are fixed by the implementation.
    pub queues_preset: bool,
    /// Table base registers are fixed by the implementation.
    pub tables_preset: bool,
    /// Base addresses of preset tables and queues are relative to the SMMU's base (IDR1.REL).
    pub relative_base_pointers: bool,
    /// The STE may override incoming memory types and shareability (IDR1.ATTR_TYPES_OVR); without it STE.SHCFG,
    /// MTCFG, MemAttr and ALLOCCFG are RES0.
    pub attribute_types_override: bool,
    /// Range-based TLB invalidation (IDR3.RIL).
    pub range_invalidation: bool,
    /// Hierarchical attribute disables.
    pub hierarchical_attribute_disables: bool,
    /// EL0/EL1 execute-never distinction at stage 2.
    pub xnx: bool,
    /// Break-before-make level (0, 1 or 2).
    pub bbm_level: u8,
    /// Stage-2 forced write-back.
    pub fwb: bool,
    /// Output address size in bits.
    pub oas_bits: u8,
    /// Translation granules.
    pub granules: Granules,
    /// Largest stage-1 input address in bits (48, or 52 with IDR5.VAX).
    pub va_bits: u8,
    /// Architecture revision: (major 3, minor).
    pub version: (u8, u8),
    /// Errata workarounds for this implementation (from SMMU_IIDR), already applied to the fields above.
    pub quirks: Quirks,
}

impl Features {
    /// Decodes the ID registers.
    ///
    /// Never fails: reserved encodings decode to a `Reserved` variant or the nearest safe value (a reserved OAS
    /// decodes as 32 bits, the smallest) so that a caller can print what it found before refusing it.
    pub fn decode(raw: IdRegisters) -> Self {
        let idr0 = LocalRegisterCopy::<u32, IDR0::Register>::new(raw.idr[0]);
        let idr1 = LocalRegisterCopy::<u32, IDR1::Register>::new(raw.idr[1]);
        let idr3 = LocalRegisterCopy::<u32, IDR3::Register>::new(raw.idr[3]);
        let idr5 = LocalRegisterCopy::<u32, IDR5::Register>::new(raw.idr[5]);
        let aidr = LocalRegisterCopy::<u32, AIDR::Register>::new(raw.aidr);
        let ttf = idr0.read(IDR0::TTF);
        let pri = idr0.is_set(IDR0::PRI);
        let quirks = Quirks::from_iidr(raw.iidr);
        let (stage1, stage2) = (idr0.is_set(IDR0::S1P), idr0.is_set(IDR0::S2P));
        Features {
            raw,
            stage1,
            stage2,
            nesting: stage1 && stage2 && !quirks.contains(Quirks::NO_NESTING),
            aarch64_tables: ttf & 0b10 != 0,
            aarch32_tables: ttf & 0b01 != 0,
            coherent: idr0.is_set(IDR0::COHACC),
            broadcast_tlb: idr0.is_set(IDR0::BTM) && !quirks.contains(Quirks::NO_BTM),
            hardware_update: match idr0.read(IDR0::HTTU) {
                0 => HardwareUpdate::None,
                1 => HardwareUpdate::AccessFlag,
                2 => HardwareUpdate::AccessFlagAndDirty,
                _ => HardwareUpdate::Reserved,
            },
            hyp: idr0.is_set(IDR0::HYP),
            ats: idr0.is_set(IDR0::ATS),
            pri,
            msi: idr0.is_set(IDR0::MSI),
            sev: idr0.is_set(IDR0::SEV) && !quirks.contains(Quirks::NO_SEV),
            atos: idr0.is_set(IDR0::ATOS),
            cd_two_level: idr0.is_set(IDR0::CD2L),
            asid_bits: if idr0.is_set(IDR0::ASID16) { 16 } else { 8 },
            vmid_bits: if idr0.is_set(IDR0::VMID16) { 16 } else { 8 },
            endianness: match idr0.read(IDR0::TTENDIAN) {
                0 => TableEndianness::Mixed,
                2 => TableEndianness::Little,
                3 => TableEndianness::Big,
                _ => TableEndianness::Reserved,
            },
            stall_model: match idr0.read(IDR0::STALL_MODEL) {
                0 => StallModel::StallAndTerminate,
                1 => StallModel::TerminateOnly,
                2 => StallModel::StallForced,
                _ => StallModel::Reserved,
            },
            terminate_always_aborts: idr0.is_set(IDR0::TERM_MODEL),
            stream_table_two_level: idr0.read(IDR0::ST_LEVEL) == 1,
            sid_bits: idr1.read(IDR1::SIDSIZE) as u8,
            ssid_bits: idr1.read(IDR1::SSIDSIZE) as u8,
            cmdq_log2_max: idr1.read(IDR1::CMDQS) as u8,
            eventq_log2_max: idr1.read(IDR1::EVENTQS) as u8,
            priq_log2_max: pri.then(|| idr1.read(IDR1::PRIQS) as u8),
            queues_preset: idr1.is_set(IDR1::QUEUES_PRESET),
            tables_preset: idr1.is_set(IDR1::TABLES_PRESET),
            relative_base_pointers: idr1.is_set(IDR1::REL),
            attribute_types_override: idr1.is_set(IDR1::ATTR_TYPES_OVR),
            range_invalidation: idr3.is_set(IDR3::RIL),
            hierarchical_attribute_disables: idr3.is_set(IDR3::HAD),
            xnx: idr3.is_set(IDR3::XNX),
            bbm_level: idr3.read(IDR3::BBML) as u8,
            fwb: idr3.is_set(IDR3::FWB),
            oas_bits: match idr5.read(IDR5::OAS) {
                1 => 36,
                2 => 40,
                3 => 42,
                4 => 44,
                5 => 48,
                6 => 52,
                _ => 32,
            },
            granules: Granules {
                size_4k: idr5.is_set(IDR5::GRAN4K),
                size_16k: idr5.is_set(IDR5::GRAN16K),
                size_64k: idr5.is_set(IDR5::GRAN64K),
            },
            va_bits: if idr5.read(IDR5::VAX) == 1 { 52 } else { 48 },
            version: (3, aidr.read(AIDR::ARCH_MINOR_REV) as u8),
            quirks,
        }
    }

    /// The translation stages this SMMU offers.
    pub fn stages(&self) -> Stages {
        Stages {
            stage1: self.stage1,
            stage2: self.stage2,
            nested: self.nesting,
        }
    }

    /// What the STE and CD builders must respect on this SMMU: the fields its ID registers make RES0 or ILLEGAL.
    pub fn entry_rules(&self) -> EntryRules {
        EntryRules {
            attribute_types_override: self.attribute_types_override,
            hyp: self.hyp,
            stall: match self.stall_model {
                StallModel::StallAndTerminate => StallRule::Configurable,
                StallModel::StallForced => StallRule::Forced,
                StallModel::TerminateOnly | StallModel::Reserved => StallRule::Never,
            },
            terminate_always_aborts: self.terminate_always_aborts,
        }
    }

    /// Whether substreams exist (SSIDSIZE > 0); with none, only SubstreamID 0 can be used.
    pub fn has_substreams(&self) -> bool {
        self.ssid_bits > 0
    }
}

/// A set of translation stages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stages {
    /// Stage 1.
    pub stage1: bool,
    /// Stage 2.
    pub stage2: bool,
    /// Both stages on one stream (nested translation); only with both.
    pub nested: bool,
}

impl Stages {
    /// Stage 1 only.
    pub const STAGE1: Self = Stages {
        stage1: true,
        stage2: false,
        nested: false,
    };
    /// Stage 2 only.
    pub const STAGE2: Self = Stages {
        stage1: false,
        stage2: true,
        nested: false,
    };
    /// Both stages, each alone and nested.
    pub const NESTED: Self = Stages {
        stage1: true,
        stage2: true,
        nested: true,
    };
    /// Both stages, each alone only: nesting is forbidden by an erratum ([`Quirks::NO_NESTING`]).
    pub const BOTH_UNNESTED: Self = Stages {
        stage1: true,
        stage2: true,
        nested: false,
    };

    /// Whether every stage (and nesting) that `wanted` names is here.
    pub fn covers(&self, wanted: Stages) -> bool {
        (self.stage1 || !wanted.stage1) && (self.stage2 || !wanted.stage2) && (self.nested || !wanted.nested)
    }
}

impl fmt::Display for Stages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.stage1, self.stage2, self.nested) {
            (true, true, true) => f.write_str("stage 1 + stage 2 (nested)"),
            (true, true, false) => f.write_str("stage 1 and stage 2, not nested"),
            (true, false, _) => f.write_str("stage 1 only"),
            (false, true, _) => f.write_str("stage 2 only"),
            (false, false, _) => f.write_str("no translation stage"),
        }
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

impl fmt::Display for Features {
    /// A multi-line human-readable report, one topic a line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.raw;
        writeln!(
            f,
            "IDR0={:#010x} IDR1={:#010x} IDR2={:#010x} IDR3={:#010x} IDR4={:#010x} IDR5={:#010x} IIDR={:#010x} AIDR={:#010x}",
            r.idr[0], r.idr[1], r.idr[2], r.idr[3], r.idr[4], r.idr[5], r.iidr, r.aidr
        )?;
        let iidr = LocalRegisterCopy::<u32, IIDR::Register>::new(r.iidr);
        writeln!(
            f,
            "version: SMMUv{}.{}, implementer {:#05x} product {:#05x} variant {} revision {}",
            self.version.0,
            self.version.1,
            iidr.read(IIDR::IMPLEMENTER),
            iidr.read(IIDR::PRODUCT_ID),
            iidr.read(IIDR::VARIANT),
            iidr.read(IIDR::REVISION)
        )?;
        writeln!(
            f,
            "stages: {}; table formats: AArch64 {}, AArch32 {}; endianness {:?}",
            self.stages(),
            yes(self.aarch64_tables),
            yes(self.aarch32_tables),
            self.endianness
        )?;
        writeln!(
            f,
            "stream table: {}; SIDSIZE {} bits; SSIDSIZE {} bits{}",
            if self.stream_table_two_level {
                "linear or 2-level"
            } else {
                "linear only"
            },
            self.sid_bits,
            self.ssid_bits,
            if self.has_substreams() {
                ""
            } else {
                " (no substreams: only SSID 0)"
            }
        )?;
        let g = self.granules;
        writeln!(
            f,
            "OAS {} bits; VA {} bits; granules:{}{}{}",
            self.oas_bits,
            self.va_bits,
            if g.size_4k { " 4K" } else { "" },
            if g.size_16k { " 16K" } else { "" },
            if g.size_64k { " 64K" } else { "" }
        )?;
        write!(
            f,
            "queues: CMDQ up to 2^{}, EVENTQ up to 2^{}, ",
            self.cmdq_log2_max, self.eventq_log2_max
        )?;
        match self.priq_log2_max {
            Some(n) => writeln!(f, "PRIQ up to 2^{n}")?,
            None => writeln!(f, "no PRIQ")?,
        }
        writeln!(
            f,
            "ASID {} bits; VMID {} bits; coherent (COHACC) {}; range TLBI (RIL) {}; BBML {}; HAD {}; XNX {}; FWB {}",
            self.asid_bits,
            self.vmid_bits,
            yes(self.coherent),
            yes(self.range_invalidation),
            self.bbm_level,
            yes(self.hierarchical_attribute_disables),
            yes(self.xnx),
            yes(self.fwb)
        )?;
        write!(
            f,
            "stall model {:?}; HTTU {:?}; MSI {}; ATS {}; PRI {}; SEV {}; ATOS {}; CD2L {}; HYP {}; BTM {}",
            self.stall_model,
            self.hardware_update,
            yes(self.msi),
            yes(self.ats),
            yes(self.pri),
            yes(self.sev),
            yes(self.atos),
            yes(self.cd_two_level),
            yes(self.hyp),
            yes(self.broadcast_tlb)
        )?;
        write!(f, "\nquirks: {}", self.quirks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hw::ste::{EntryRules, StallRule};

    /// ID registers of QEMU 10.0's SMMUv3 on `-M virt,iommu=smmuv3` (both stages).
    const QEMU_NESTED: IdRegisters = IdRegisters {
        idr: [0x0D44_101B, 0x0273_0010, 0, 0x1414, 0, 0x74],
        iidr: 0,
        aidr: 0,
    };

    #[test]
    fn decodes_qemu_nested_smmu() {
        let f = Features::decode(QEMU_NESTED);
        assert!(f.stage1 && f.stage2);
        assert!(f.aarch64_tables && !f.aarch32_tables);
        assert!(f.coherent);
        assert_eq!(f.asid_bits, 16);
        assert_eq!(f.vmid_bits, 16);
        assert_eq!(f.endianness, TableEndianness::Little);
        assert_eq!(f.stall_model, StallModel::TerminateOnly);
        assert!(f.stream_table_two_level);
        assert!(!f.msi && !f.ats && !f.pri && !f.sev && !f.atos && !f.cd_two_level);
        assert_eq!(f.hardware_update, HardwareUpdate::None);
        assert_eq!(f.sid_bits, 16);
        assert_eq!(f.ssid_bits, 0);
        assert!(!f.has_substreams());
        assert_eq!(f.cmdq_log2_max, 19);
        assert_eq!(f.eventq_log2_max, 19);
        assert_eq!(f.priq_log2_max, None);
        assert!(f.range_invalidation && f.hierarchical_attribute_disables && f.xnx);
        assert_eq!(f.bbm_level, 2);
        assert_eq!(f.oas_bits, 44);
        assert_eq!(
            f.granules,
            Granules {
                size_4k: true,
                size_16k: true,
                size_64k: true
            }
        );
        assert_eq!(f.va_bits, 48);
        assert_eq!(f.version, (3, 0));
        assert_eq!(f.stages(), Stages::NESTED);
    }

    #[test]
    fn decodes_single_stage_qemu_smmus() {
        let mut raw = QEMU_NESTED;
        raw.idr[0] = 0x0D44_101A;
        assert_eq!(Features::decode(raw).stages(), Stages::STAGE1);
        raw.idr[0] = 0x0D44_1019;
        assert_eq!(Features::decode(raw).stages(), Stages::STAGE2);
    }

    #[test]
    fn decodes_every_oas_encoding() {
        let expect = [32, 36, 40, 42, 44, 48, 52, 32];
        for (enc, bits) in expect.iter().enumerate() {
            let mut raw = QEMU_NESTED;
            raw.idr[5] = enc as u32;
            assert_eq!(Features::decode(raw).oas_bits, *bits, "OAS encoding {enc}");
        }
    }

    #[test]
    fn decodes_every_single_bit_field_of_idr0() {
        // Bit positions of IHI 0070 table "SMMU_IDR0".
        type Check = fn(&Features) -> bool;
        let cases: [(u32, Check); 13] = [
            (0, |f| f.stage2),
            (1, |f| f.stage1),
            (4, |f| f.coherent),
            (5, |f| f.broadcast_tlb),
            (9, |f| f.hyp),
            (10, |f| f.ats),
            (12, |f| f.asid_bits == 16),
            (13, |f| f.msi),
            (14, |f| f.sev),
            (15, |f| f.atos),
            (16, |f| f.pri),
            (18, |f| f.vmid_bits == 16),
            (19, |f| f.cd_two_level),
        ];
        for (bit, get) in cases {
            let off = Features::decode(IdRegisters {
                idr: [0; 6],
                iidr: 0,
                aidr: 0,
            });
            let on = Features::decode(IdRegisters {
                idr: [1 << bit, 0, 0, 0, 0, 0],
                iidr: 0,
                aidr: 0,
            });
            assert!(!get(&off) && get(&on), "IDR0 bit {bit}");
        }
    }

    #[test]
    fn decodes_idr1_sizes_and_pri_queue() {
        // SIDSIZE [5:0], SSIDSIZE [10:6], PRIQS [15:11], EVENTQS [20:16], CMDQS [25:21].
        let idr1 = 32 | (20 << 6) | (7 << 11) | (9 << 16) | (11 << 21);
        let f = Features::decode(IdRegisters {
            idr: [1 << 16, idr1, 0, 0, 0, 0],
            iidr: 0,
            aidr: 2,
        });
        assert_eq!((f.sid_bits, f.ssid_bits), (32, 20));
        assert_eq!(f.priq_log2_max, Some(7));
        assert_eq!((f.eventq_log2_max, f.cmdq_log2_max), (9, 11));
        assert_eq!(f.version, (3, 2));
    }

    #[test]
    fn report_names_the_key_features() {
        extern crate std;
        use std::string::ToString;
        let text = Features::decode(QEMU_NESTED).to_string();
        for needle in [
            "stage 1 + stage 2",
            "SIDSIZE 16",
            "SSIDSIZE 0",
            "OAS 44",
            "4K 16K 64K",
            "RIL) yes",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }

    /// SMMU_IIDR from its fields as IHI 0070 places them: ProductID `[31:20]`, Variant `[19:16]`, Revision
    /// `[15:12]`, Implementer `[11:0]`.
    const fn iidr(product: u32, variant: u32, revision: u32, implementer: u32) -> u32 {
        product << 20 | variant << 16 | revision << 12 | implementer
    }

    /// QEMU's nested SMMU with BTM (bit 5) and SEV (bit 14) added, identifying itself with `iidr`.
    fn arm_part(iidr: u32) -> Features {
        let mut raw = QEMU_NESTED;
        raw.idr[0] |= 1 << 5 | 1 << 14;
        raw.iidr = iidr;
        Features::decode(raw)
    }

    #[test]
    fn iidr_literals_name_the_arm_parts() {
        // Hand-assembled: MMU-700 r1p2 = 0x487 | 1 | 2 | 0x43B; MMU-600 r0p2 = 0x483 | 0 | 2 | 0x43B.
        assert_eq!(iidr(0x487, 1, 2, 0x43b), 0x4871_243b);
        assert_eq!(iidr(0x483, 0, 2, 0x43b), 0x4830_243b);
        assert_eq!(
            Quirks::from_iidr(0x4871_243b),
            Quirks::NO_NESTING | Quirks::NO_BTM | Quirks::CMDQ_SYNC_EVERY_63
        );
        assert_eq!(Quirks::from_iidr(0x4830_243b), Quirks::NO_NESTING | Quirks::NO_SEV);
    }

    #[test]
    fn mmu700_loses_nesting_and_btm_and_syncs_every_63_commands() {
        for (variant, revision) in [(0, 0), (1, 2), (15, 15)] {
            let f = arm_part(iidr(0x487, variant, revision, 0x43b));
            assert_eq!(
                f.quirks,
                Quirks::NO_NESTING | Quirks::NO_BTM | Quirks::CMDQ_SYNC_EVERY_63,
                "MMU-700 r{variant}p{revision}"
            );
            // Linux clears only the nesting feature: each stage alone stays.
            assert!(f.stage1 && f.stage2 && !f.nesting);
            assert_eq!(f.stages(), Stages::BOTH_UNNESTED);
            assert!(!f.broadcast_tlb, "erratum 2812531: no BTM");
            assert!(f.sev, "SEV is untouched on MMU-700");
        }
    }

    #[test]
    fn mmu600_quirks_follow_the_release() {
        // r0p0..r0p2: erratum 1076982 (SEV) and 1209401 (nesting, variant < 2).
        for revision in 0..=2 {
            let f = arm_part(iidr(0x483, 0, revision, 0x43b));
            assert_eq!(f.quirks, Quirks::NO_SEV | Quirks::NO_NESTING, "MMU-600 r0p{revision}");
            assert!(!f.sev && !f.nesting && f.broadcast_tlb);
        }
        // r0p3 and r1p*: nesting only.
        for (variant, revision) in [(0, 3), (1, 0), (1, 15)] {
            let f = arm_part(iidr(0x483, variant, revision, 0x43b));
            assert_eq!(f.quirks, Quirks::NO_NESTING, "MMU-600 r{variant}p{revision}");
            assert!(f.sev && !f.nesting);
        }
        // r2p0 and later: nothing.
        let f = arm_part(iidr(0x483, 2, 0, 0x43b));
        assert_eq!(f.quirks, Quirks::empty());
        assert!(f.sev && f.broadcast_tlb && f.nesting);
        assert_eq!(f.stages(), Stages::NESTED);
    }

    #[test]
    fn other_implementations_have_no_quirks() {
        // QEMU (IIDR 0), another implementer with Arm's product numbers, Arm's MMU-500-era product numbers.
        for iidr in [
            0,
            iidr(0x487, 0, 0, 0x43c),
            iidr(0x483, 0, 0, 0x001),
            iidr(0x482, 0, 0, 0x43b),
        ] {
            let f = arm_part(iidr);
            assert_eq!(f.quirks, Quirks::empty(), "IIDR {iidr:#x}");
            assert!(f.nesting && f.sev && f.broadcast_tlb);
        }
    }

    #[test]
    fn the_report_names_active_quirks_and_their_errata() {
        extern crate std;
        use std::string::ToString;
        let text = arm_part(iidr(0x487, 0, 1, 0x43b)).to_string();
        let line = text.lines().find(|l| l.starts_with("quirks:")).unwrap();
        for needle in [
            "no nesting",
            "2268618",
            "no BTM",
            "CMD_SYNC every 63 commands",
            "2812531",
        ] {
            assert!(line.contains(needle), "{needle} missing from {line}");
        }
        assert!(text.contains("stage 1 and stage 2, not nested"), "{text}");
        assert!(Features::decode(QEMU_NESTED).to_string().ends_with("quirks: none"));
        let errata: std::vec::Vec<_> = errata_for(iidr(0x483, 0, 0, 0x43b)).map(|e| e.errata).collect();
        assert_eq!(errata, ["1076982", "1209401"]);
        assert_eq!(
            ERRATA[0].to_string(),
            "MMU-600 r0p0..r0p2: Arm erratum 1076982 (no SEV (Arm errata MMU-600 r0p0..r0p2 1076982))"
        );
    }

    #[test]
    fn qemu_entry_rules_come_from_idr0_and_idr1() {
        // IDR0 0x0D44101B: HYP [9] = 0, STALL_MODEL [25:24] = 0b01, TERM_MODEL [26] = 1; IDR1 0x02730010:
        // ATTR_TYPES_OVR [27] = 0, REL [28] = 0.
        let f = Features::decode(QEMU_NESTED);
        assert_eq!(
            f.entry_rules(),
            EntryRules {
                attribute_types_override: false,
                hyp: false,
                stall: StallRule::Never,
                terminate_always_aborts: true,
            }
        );
        let mut raw = QEMU_NESTED;
        raw.idr[0] = (raw.idr[0] & !(0b111 << 24)) | 1 << 9 | 0b10 << 24;
        raw.idr[1] |= 1 << 27 | 1 << 28;
        let f = Features::decode(raw);
        assert!(f.attribute_types_override && f.relative_base_pointers && !f.terminate_always_aborts);
        assert_eq!(
            f.entry_rules(),
            EntryRules {
                attribute_types_override: true,
                hyp: true,
                stall: StallRule::Forced,
                terminate_always_aborts: false,
            }
        );
    }

    #[test]
    fn stages_cover_what_they_contain() {
        assert!(Stages::NESTED.covers(Stages::BOTH_UNNESTED));
        assert!(Stages::BOTH_UNNESTED.covers(Stages::STAGE1) && Stages::BOTH_UNNESTED.covers(Stages::STAGE2));
        assert!(!Stages::BOTH_UNNESTED.covers(Stages::NESTED));
        assert!(!Stages::STAGE1.covers(Stages::STAGE2));
    }
}
