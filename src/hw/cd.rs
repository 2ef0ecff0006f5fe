//! Context Descriptors (IHI 0070, "CD, Context Descriptor"): 64 bytes, the stage-1 translation context of a
//! substream, and the level-1 CD table descriptor. Fields are named by the qword they live in.

use crate::hitless::UsedBits;
use crate::hw::ste::{EntryError, EntryRules, Rule, check_address, check_range, check_stall};
use crate::mem::PhysAddr;

/// T0SZ, bits \[5:0\].
pub const Q0_T0SZ: u64 = 0x3f;
/// TG0, bits \[7:6\].
pub const Q0_TG0: u64 = 0b11 << 6;
/// IR0, bits \[9:8\].
pub const Q0_IR0: u64 = 0b11 << 8;
/// OR0, bits \[11:10\].
pub const Q0_OR0: u64 = 0b11 << 10;
/// SH0, bits \[13:12\].
pub const Q0_SH0: u64 = 0b11 << 12;
/// EPD0, bit 14: no walks through TTB0.
pub const Q0_EPD0: u64 = 1 << 14;
/// ENDI, bit 15: big-endian tables.
pub const Q0_ENDI: u64 = 1 << 15;
/// T1SZ, bits \[21:16\].
pub const Q0_T1SZ: u64 = 0x3f << 16;
/// TG1, bits \[23:22\].
pub const Q0_TG1: u64 = 0b11 << 22;
/// IR1, bits \[25:24\].
pub const Q0_IR1: u64 = 0b11 << 24;
/// OR1, bits \[27:26\].
pub const Q0_OR1: u64 = 0b11 << 26;
/// SH1, bits \[29:28\].
pub const Q0_SH1: u64 = 0b11 << 28;
/// EPD1, bit 30: no walks through TTB1.
pub const Q0_EPD1: u64 = 1 << 30;
/// V, bit 31.
pub const Q0_V: u64 = 1 << 31;
/// IPS, bits \[34:32\]: intermediate (output) address size.
pub const Q0_IPS: u64 = 0b111 << 32;
/// AFFD, bit 35.
pub const Q0_AFFD: u64 = 1 << 35;
/// AA64, bit 41.
pub const Q0_AA64: u64 = 1 << 41;
/// S, bit 44: stall on faults.
pub const Q0_S: u64 = 1 << 44;
/// R, bit 45: record faults.
pub const Q0_R: u64 = 1 << 45;
/// A, bit 46: terminated faults abort (rather than read-as-zero/write-ignored).
pub const Q0_A: u64 = 1 << 46;
/// ASET, bit 47: the ASID set is not shared with PE broadcast TLB maintenance.
pub const Q0_ASET: u64 = 1 << 47;
/// ASID, bits \[63:48\].
pub const Q0_ASID: u64 = 0xffff << 48;
/// TTB0, bits \[51:4\] of qword 1.
pub const Q1_TTB0: u64 = ((1 << 52) - 1) & !0xf;
/// TTB1, bits \[51:4\] of qword 2.
pub const Q2_TTB1: u64 = ((1 << 52) - 1) & !0xf;
/// Level-1 CD descriptor: V, bit 0.
pub const L1_CD_V: u64 = 1;
/// Level-1 CD descriptor: L2Ptr, bits \[51:12\].
pub const L1_CD_L2PTR_MASK: u64 = ((1 << 52) - 1) & !0xfff;

/// Translation granule of TTB0: the crate's one [`Granule`] type, encoded into TG0 by [`Granule::tg_field`].
pub use crate::hw::command::Granule;

pub use crate::hw::ste::{Cacheability, Shareability};

/// A stage-1 context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CdConfig {
    /// ASID (16 bits when IDR0.ASID16, else 8).
    pub asid: u16,
    /// The TTB0 translation table, 16-byte aligned.
    pub table: PhysAddr,
    /// T0SZ: the VA space is `2^(64 - t0sz)` bytes (at most 63).
    pub t0sz: u8,
    /// TG0.
    pub granule: Granule,
    /// IPS: output size encoding (0 = 32 bits .. 6 = 52 bits).
    pub ips: u8,
    /// IR0 and OR0.
    pub cacheability: Cacheability,
    /// SH0.
    pub shareability: Shareability,
    /// MAIR, the memory attributes the table's AttrIndx selects.
    pub mair: u64,
    /// R: record faults.
    pub record_faults: bool,
    /// A: terminated transactions abort (rather than RAZ/WI). Must be true where IDR0.TERM_MODEL = 1
    /// ([`EntryRules::terminate_always_aborts`]).
    pub abort_on_fault: bool,
    /// S: stall on faults. Must be true where the SMMU forces stalling, false where it cannot stall
    /// ([`EntryRules::stall`]).
    pub stall: bool,
    /// ASET: the ASID is private to the SMMU (not shared with PE broadcast TLB maintenance).
    pub private_asid: bool,
}

/// A Context Descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cd(pub [u64; 8]);

impl Cd {
    /// An invalid CD (V = 0): transactions using it abort with C_BAD_CD.
    pub const fn invalid() -> Self {
        Cd([0; 8])
    }

    /// A valid AArch64 CD translating through TTB0 (EPD1 = 1: no TTB1), little-endian tables.
    ///
    /// # Errors
    /// [`EntryError`] for a misaligned or too wide table, T0SZ > 63, IPS > 6; [`EntryError::Forbidden`] for
    /// A = 0 where IDR0.TERM_MODEL = 1, S = 1 on an SMMU that cannot stall, S = 0 on one that forces stalling.
    pub fn new(c: &CdConfig, rules: &EntryRules) -> Result<Self, EntryError> {
        let t0sz = check_range("T0SZ", u64::from(c.t0sz), 63)?;
        if rules.terminate_always_aborts && !c.abort_on_fault {
            return Err(EntryError::Forbidden {
                field: "A",
                value: 0,
                rule: Rule::TerminateAlwaysAborts,
            });
        }
        check_stall("S", c.stall, rules)?;
        let ips = check_range("IPS", u64::from(c.ips), 6)?;
        let table = check_address("TTB0", c.table.0, 16)?;
        let q0 = t0sz
            | c.granule.tg_field() << 6
            | (c.cacheability as u64) << 8
            | (c.cacheability as u64) << 10
            | (c.shareability as u64) << 12
            | Q0_EPD1
            | Q0_V
            | ips << 32
            | Q0_AA64
            | if c.stall { Q0_S } else { 0 }
            | if c.record_faults { Q0_R } else { 0 }
            | if c.abort_on_fault { Q0_A } else { 0 }
            | if c.private_asid { Q0_ASET } else { 0 }
            | u64::from(c.asid) << 48;
        Ok(Cd([q0, table, 0, c.mair, 0, 0, 0, 0]))
    }

    /// Whether V is set.
    pub fn is_valid(&self) -> bool {
        self.0[0] & Q0_V != 0
    }

    /// The ASID.
    pub fn asid(&self) -> u16 {
        (self.0[0] >> 48) as u16
    }

    /// TTB0.
    pub fn ttb0(&self) -> PhysAddr {
        PhysAddr(self.0[1] & Q1_TTB0)
    }
}

impl UsedBits for Cd {
    const VALID: u64 = Q0_V;

    fn used_bits(words: &[u64; 8]) -> [u64; 8] {
        if words[0] & Q0_V == 0 {
            return [Q0_V, 0, 0, 0, 0, 0, 0, 0];
        }
        // Everything the architecture defines in qwords 0-3 is read, except what a disabled table walk ignores.
        let mut used = [u64::MAX, u64::MAX, u64::MAX, u64::MAX, 0, 0, 0, 0];
        if words[0] & Q0_EPD0 != 0 {
            used[0] &= !(Q0_T0SZ | Q0_TG0 | Q0_IR0 | Q0_OR0 | Q0_SH0);
            used[1] &= !Q1_TTB0;
        }
        if words[0] & Q0_EPD1 != 0 {
            used[0] &= !(Q0_T1SZ | Q0_TG1 | Q0_IR1 | Q0_OR1 | Q0_SH1);
            used[2] &= !Q2_TTB1;
        }
        used
    }
}

/// Encodes a valid level-1 CD descriptor pointing to a leaf table.
///
/// # Errors
/// [`EntryError::Misaligned`] unless 4 KiB aligned, [`EntryError::AddressTooWide`].
pub fn l1_cd_descriptor(leaf: PhysAddr) -> Result<u64, EntryError> {
    Ok(check_address("L2Ptr", leaf.0, 4096)? | L1_CD_V)
}

/// A context for host tests.
#[cfg(test)]
pub(crate) const EXAMPLE: CdConfig = CdConfig {
    asid: 0xbeef,
    table: PhysAddr(0x4800_0000),
    t0sz: 16,
    granule: Granule::Size4K,
    ips: 4,
    cacheability: Cacheability::WriteBackAllocate,
    shareability: Shareability::Inner,
    mair: 0x0000_0000_0004_ff44,
    record_faults: true,
    abort_on_fault: true,
    stall: false,
    private_asid: true,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hw::ste::{EXAMPLE_RULES, StallRule};

    const CONFIG: CdConfig = EXAMPLE;

    /// TG0, bits [7:6] (IHI 0070, the CD's layout): 0b00 4 KiB, 0b01 64 KiB, 0b10 16 KiB, from the one
    /// `Granule` type the page tables use.
    #[test]
    fn tg0_encodes_each_granule() {
        for (granule, tg0) in [
            (Granule::Size4K, 0b00),
            (Granule::Size64K, 0b01),
            (Granule::Size16K, 0b10),
        ] {
            let cd = Cd::new(&CdConfig { granule, ..CONFIG }, &EXAMPLE_RULES).unwrap();
            assert_eq!((cd.0[0] >> 6) & 0b11, tg0, "{granule:?}");
        }
    }

    #[test]
    fn words_match_the_layout() {
        let cd = Cd::new(&CONFIG, &EXAMPLE_RULES).unwrap();
        // T0SZ 16, TG0 00, IR0 01 [9:8], OR0 01 [11:10], SH0 11 [13:12], EPD1 bit 30, V bit 31, IPS 4 [34:32],
        // AA64 bit 41, R bit 45, A bit 46, ASET bit 47, ASID [63:48].
        let q0 = 16
            | 1 << 8
            | 1 << 10
            | 3 << 12
            | 1 << 30
            | 1 << 31
            | 4 << 32
            | 1 << 41
            | 1 << 45
            | 1 << 46
            | 1 << 47
            | 0xbeef << 48;
        assert_eq!(cd.0, [q0, 0x4800_0000, 0, 0x4_ff44, 0, 0, 0, 0]);
        assert!(cd.is_valid());
        assert_eq!((cd.asid(), cd.ttb0()), (0xbeef, PhysAddr(0x4800_0000)));
        assert!(!Cd::invalid().is_valid());
    }

    #[test]
    fn bad_fields_are_refused() {
        assert_eq!(
            Cd::new(
                &CdConfig {
                    table: PhysAddr(0x4800_0008),
                    ..CONFIG
                },
                &EXAMPLE_RULES
            ),
            Err(EntryError::Misaligned {
                field: "TTB0",
                address: 0x4800_0008,
                alignment: 16
            })
        );
        assert_eq!(
            Cd::new(&CdConfig { ips: 7, ..CONFIG }, &EXAMPLE_RULES),
            Err(EntryError::OutOfRange {
                field: "IPS",
                value: 7,
                max: 6
            })
        );
        assert_eq!(l1_cd_descriptor(PhysAddr(0x1000)), Ok(0x1001));
        assert!(l1_cd_descriptor(PhysAddr(0x1800)).is_err());
    }

    #[test]
    fn used_bits() {
        assert_eq!(Cd::used_bits(&Cd::invalid().0), [Q0_V, 0, 0, 0, 0, 0, 0, 0]);
        let used = Cd::used_bits(&Cd::new(&CONFIG, &EXAMPLE_RULES).unwrap().0);
        assert_eq!(used[0] & (Q0_T1SZ | Q0_TG1), 0, "TTB1 fields are ignored with EPD1");
        assert_eq!(used[1], u64::MAX);
        assert_eq!(used[2] & Q2_TTB1, 0);
        assert_eq!(used[3], u64::MAX, "MAIR");
    }

    #[test]
    fn term_model_1_requires_cd_a() {
        let term = EntryRules {
            terminate_always_aborts: true,
            ..EXAMPLE_RULES
        };
        let raz = CdConfig {
            abort_on_fault: false,
            ..CONFIG
        };
        assert_eq!(
            Cd::new(&raz, &term),
            Err(EntryError::Forbidden {
                field: "A",
                value: 0,
                rule: Rule::TerminateAlwaysAborts
            })
        );
        assert_ne!(Cd::new(&CONFIG, &term).unwrap().0[0] & Q0_A, 0);
        // With TERM_MODEL = 0 the caller may choose RAZ/WI.
        assert_eq!(Cd::new(&raz, &EXAMPLE_RULES).unwrap().0[0] & Q0_A, 0);
    }

    #[test]
    fn stall_model_decides_cd_s() {
        let never = EntryRules {
            stall: StallRule::Never,
            ..EXAMPLE_RULES
        };
        let forced = EntryRules {
            stall: StallRule::Forced,
            ..EXAMPLE_RULES
        };
        let stalling = CdConfig { stall: true, ..CONFIG };
        assert_eq!(
            Cd::new(&stalling, &never),
            Err(EntryError::Forbidden {
                field: "S",
                value: 1,
                rule: Rule::StallNotSupported
            })
        );
        assert_eq!(
            Cd::new(&CONFIG, &forced),
            Err(EntryError::Forbidden {
                field: "S",
                value: 0,
                rule: Rule::StallForced
            })
        );
        assert_ne!(Cd::new(&stalling, &forced).unwrap().0[0] & Q0_S, 0);
        assert!(Cd::new(&CONFIG, &never).is_ok());
    }
}
