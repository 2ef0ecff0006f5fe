extern crate std;

use super::*;
use proptest::prelude::*;
use std::string::ToString;
use std::vec::Vec;

/// A range literal on one line.
const fn tlbi_range(num: u8, scale: u8, granule: Granule, ttl: u8) -> TlbiRange {
    TlbiRange {
        num,
        scale,
        granule,
        ttl,
    }
}

fn enc(command: Command) -> [u64; 2] {
    command.encode().unwrap_or_else(|error| panic!("{command:?}: {error}"))
}

const RANGE_4K_L3: TlbiRange = tlbi_range(3, 9, Granule::Size4K, 3);

// Expected words below are written from the command layouts of IHI 0070 chapter 4 (opcode [7:0]; SSV [11];
// SubstreamID [31:12]; StreamID [63:32]; NUM [16:12]; SCALE [24:20]; VMID [47:32]; ASID [63:48]; Leaf [64];
// Range [68:64]; TTL [73:72]; TG [75:74]; Address [127:76]; CS [13:12]; MSH [23:22]; MSIAttr [27:24];
// MSIData [63:32]; MSIAddress [119:66]), not from the constants above.

#[test]
fn prefetch_config() {
    // 4.2.1 CMD_PREFETCH_CONFIG: SSV = 0.
    assert_eq!(
        enc(Command::PrefetchConfig { sid: 0x10, ssid: None }),
        [0x0000_0010_0000_0001, 0]
    );
    // SSV = 1, SubstreamID 0x12345.
    assert_eq!(
        enc(Command::PrefetchConfig {
            sid: 0xffff_ffff,
            ssid: Some(0x12345)
        }),
        [0xffff_ffff_1234_5801, 0]
    );
    assert_eq!(
        Command::PrefetchConfig {
            sid: 0,
            ssid: Some(1 << 20)
        }
        .encode(),
        Err(CommandError::SubstreamIdTooLarge { ssid: 1 << 20 })
    );
}

#[test]
fn cfgi_ste_and_range_and_all() {
    // 4.3.1 CMD_CFGI_STE.
    assert_eq!(
        enc(Command::CfgiSte {
            sid: 0xabcd,
            leaf: true
        }),
        [0x0000_abcd_0000_0003, 1]
    );
    assert_eq!(
        enc(Command::CfgiSte {
            sid: 0xabcd,
            leaf: false
        }),
        [0x0000_abcd_0000_0003, 0]
    );
    // 4.3.2 CMD_CFGI_STE_RANGE: Range in [68:64].
    assert_eq!(
        enc(Command::CfgiSteRange { sid: 0x20, range: 4 }),
        [0x0000_0020_0000_0004, 4]
    );
    assert_eq!(enc(Command::CfgiSteRange { sid: 0, range: 31 }), [0x04, 0x1f]);
    assert_eq!(
        Command::CfgiSteRange { sid: 0, range: 32 }.encode(),
        Err(CommandError::SteRangeTooLarge { range: 32 })
    );
    // 4.3.6 CMD_CFGI_ALL = CMD_CFGI_STE_RANGE with Range = 31.
    assert_eq!(enc(Command::CfgiAll), [0x04, 0x1f]);
    assert_eq!(Command::CfgiAll.opcode(), 0x04);
}

#[test]
fn cfgi_cd_and_cd_all() {
    // 4.3.3 CMD_CFGI_CD.
    assert_eq!(
        enc(Command::CfgiCd {
            sid: 7,
            ssid: 0xf_ffff,
            leaf: false
        }),
        [0x0000_0007_ffff_f005, 0]
    );
    assert_eq!(
        enc(Command::CfgiCd {
            sid: 7,
            ssid: 0,
            leaf: true
        }),
        [0x0000_0007_0000_0005, 1]
    );
    assert_eq!(
        Command::CfgiCd {
            sid: 7,
            ssid: 0x10_0000,
            leaf: true
        }
        .encode(),
        Err(CommandError::SubstreamIdTooLarge { ssid: 0x10_0000 })
    );
    // 4.3.4 CMD_CFGI_CD_ALL.
    assert_eq!(enc(Command::CfgiCdAll { sid: 3 }), [0x0000_0003_0000_0006, 0]);
}

#[test]
fn tlbi_nh_all_and_asid() {
    // 4.4.2.1 CMD_TLBI_NH_ALL: VMID [47:32].
    assert_eq!(enc(Command::TlbiNhAll { vmid: 0x1234 }), [0x0000_1234_0000_0010, 0]);
    // 4.4.2.2 CMD_TLBI_NH_ASID: ASID [63:48], VMID [47:32].
    assert_eq!(
        enc(Command::TlbiNhAsid { vmid: 1, asid: 0xbeef }),
        [0xbeef_0001_0000_0011, 0]
    );
}

#[test]
fn tlbi_nh_va_and_vaa() {
    // 4.4.2.4 CMD_TLBI_NH_VA, no range (TG = 0).
    let cmd = Command::TlbiNhVa {
        vmid: 2,
        asid: 3,
        address: 0x0000_8000_1234_5000,
        leaf: true,
        range: None,
    };
    assert_eq!(enc(cmd), [0x0003_0002_0000_0012, 0x0000_8000_1234_5001]);
    // With a range: NUM 3 [16:12], SCALE 9 [24:20], TG 4K = 0b01 [75:74], TTL 3 [73:72].
    let cmd = Command::TlbiNhVa {
        vmid: 2,
        asid: 3,
        address: 0x4000_0000,
        leaf: true,
        range: Some(RANGE_4K_L3),
    };
    assert_eq!(enc(cmd), [0x0003_0002_0090_3012, 0x4000_0701]);
    // A VA uses all of [63:12].
    let cmd = Command::TlbiNhVaa {
        vmid: 5,
        address: 0xffff_ffff_ffff_f000,
        leaf: false,
        range: None,
    };
    assert_eq!(enc(cmd), [0x0000_0005_0000_0013, 0xffff_ffff_ffff_f000]);
    // 4.4.2.3 CMD_TLBI_NH_VAA with a 16K range, TTL 2 (32 MiB aligned).
    let range = tlbi_range(0, 0, Granule::Size16K, 2);
    let cmd = Command::TlbiNhVaa {
        vmid: 0,
        address: 0x200_0000,
        leaf: false,
        range: Some(range),
    };
    assert_eq!(enc(cmd), [0x13, 0x200_0000 | (0b10 << 10) | (0b10 << 8)]);
}

#[test]
fn tlbi_el2() {
    // 4.4.2.7 CMD_TLBI_EL2_ALL, 4.4.2.10 CMD_TLBI_EL2_ASID.
    assert_eq!(enc(Command::TlbiEl2All), [0x20, 0]);
    assert_eq!(enc(Command::TlbiEl2Asid { asid: 0x42 }), [0x0042_0000_0000_0021, 0]);
    // 4.4.2.8 CMD_TLBI_EL2_VA.
    let cmd = Command::TlbiEl2Va {
        asid: 0x42,
        address: 0x1000,
        leaf: true,
        range: None,
    };
    assert_eq!(enc(cmd), [0x0042_0000_0000_0022, 0x1001]);
    // 4.4.2.9 CMD_TLBI_EL2_VAA with a 64K range NUM 1 SCALE 2, no hint.
    let range = tlbi_range(1, 2, Granule::Size64K, 0);
    let cmd = Command::TlbiEl2Vaa {
        address: 0x3_0000,
        leaf: false,
        range: Some(range),
    };
    assert_eq!(enc(cmd), [0x0000_0000_0020_1023, 0x3_0c00]);
}

#[test]
fn tlbi_stage2_and_nsnh() {
    // 4.4.3.2 CMD_TLBI_S12_VMALL.
    assert_eq!(enc(Command::TlbiS12Vmall { vmid: 0xffff }), [0x0000_ffff_0000_0028, 0]);
    // 4.4.3.1 CMD_TLBI_S2_IPA: the widest IPA, maximal NUM and SCALE, 64K granule.
    let range = tlbi_range(31, 31, Granule::Size64K, 0);
    let cmd = Command::TlbiS2Ipa {
        vmid: 9,
        address: 0x00ff_ffff_ffff_0000,
        leaf: true,
        range: Some(range),
    };
    assert_eq!(enc(cmd), [0x0000_0009_01f1_f02a, 0x00ff_ffff_ffff_0c01]);
    let cmd = Command::TlbiS2Ipa {
        vmid: 9,
        address: 0x8000_0000,
        leaf: false,
        range: None,
    };
    assert_eq!(enc(cmd), [0x0000_0009_0000_002a, 0x8000_0000]);
    // 4.4.4.1 CMD_TLBI_NSNH_ALL.
    assert_eq!(enc(Command::TlbiNsnhAll), [0x30, 0]);
}

#[test]
fn sync() {
    // 4.7.3 CMD_SYNC: CS = SIG_NONE / SIG_IRQ / SIG_SEV.
    assert_eq!(
        enc(Command::Sync {
            completion: SyncCompletion::None
        }),
        [0x46, 0]
    );
    assert_eq!(
        enc(Command::Sync {
            completion: SyncCompletion::Irq
        }),
        [0x1046, 0]
    );
    assert_eq!(
        enc(Command::Sync {
            completion: SyncCompletion::Sev
        }),
        [0x2046, 0]
    );
    // MSI: MSIData [63:32], MSIAttr 0xF [27:24], MSH Inner = 0b11 [23:22], CS = SIG_IRQ; MSIAddress [119:66].
    let msi = SyncCompletion::Msi {
        address: 0x4000_1234,
        data: 0xdead_beef,
        shareability: Shareability::Inner,
        attributes: 0xf,
    };
    assert_eq!(
        enc(Command::Sync { completion: msi }),
        [0xdead_beef_0fc0_1046, 0x4000_1234]
    );
    let msi = SyncCompletion::Msi {
        address: 0x00ff_ffff_ffff_fffc,
        data: 1,
        shareability: Shareability::Outer,
        attributes: 0,
    };
    assert_eq!(
        enc(Command::Sync { completion: msi }),
        [0x0000_0001_0080_1046, 0x00ff_ffff_ffff_fffc]
    );
    let msi = SyncCompletion::Msi {
        address: 8,
        data: 0,
        shareability: Shareability::NonShareable,
        attributes: 1,
    };
    assert_eq!(enc(Command::Sync { completion: msi }), [0x0100_1046, 8]);
}

#[test]
fn sync_errors() {
    let msi = |address, attributes| Command::Sync {
        completion: SyncCompletion::Msi {
            address,
            data: 0,
            shareability: Shareability::Inner,
            attributes,
        },
    };
    assert_eq!(msi(0, 0).encode(), Err(CommandError::MsiAddressZero));
    assert_eq!(
        msi(0x1002, 0).encode(),
        Err(CommandError::MisalignedAddress {
            address: 0x1002,
            alignment: 4
        })
    );
    assert_eq!(
        msi(1 << 56, 0).encode(),
        Err(CommandError::AddressTooWide {
            address: 1 << 56,
            bits: 56
        })
    );
    assert_eq!(
        msi(0x1000, 0x10).encode(),
        Err(CommandError::MsiAttributesTooLarge { attributes: 0x10 })
    );
}

#[test]
fn address_errors() {
    // Non-range: Address[11:0] are not encoded, so they must be zero.
    let cmd = Command::TlbiNhVa {
        vmid: 0,
        asid: 0,
        address: 0x1234,
        leaf: false,
        range: None,
    };
    assert_eq!(
        cmd.encode(),
        Err(CommandError::MisalignedAddress {
            address: 0x1234,
            alignment: 0x1000
        })
    );
    let cmd = Command::TlbiEl2Vaa {
        address: 0x800,
        leaf: false,
        range: None,
    };
    assert_eq!(
        cmd.encode(),
        Err(CommandError::MisalignedAddress {
            address: 0x800,
            alignment: 0x1000
        })
    );
    // IPA field is [55:12].
    let cmd = Command::TlbiS2Ipa {
        vmid: 0,
        address: 1 << 56,
        leaf: false,
        range: None,
    };
    assert_eq!(
        cmd.encode(),
        Err(CommandError::AddressTooWide {
            address: 1 << 56,
            bits: 56
        })
    );
    // Range with a 16K granule and no hint: Address[13:12] must be zero.
    let range = tlbi_range(1, 0, Granule::Size16K, 0);
    let cmd = Command::TlbiNhVaa {
        vmid: 0,
        address: 0x1000,
        leaf: false,
        range: Some(range),
    };
    assert_eq!(
        cmd.encode(),
        Err(CommandError::MisalignedAddress {
            address: 0x1000,
            alignment: 0x4000
        })
    );
    // 4K with TTL 2 (2 MiB blocks): Address[20:12] must be zero.
    let range = tlbi_range(1, 0, Granule::Size4K, 2);
    let cmd = Command::TlbiEl2Va {
        asid: 0,
        address: 0x10_0000,
        leaf: true,
        range: Some(range),
    };
    assert_eq!(
        cmd.encode(),
        Err(CommandError::MisalignedAddress {
            address: 0x10_0000,
            alignment: 0x20_0000
        })
    );
    // 4K with TTL 1 (1 GiB blocks), 64K with TTL 1 (4 TiB) and TTL 2 (512 MiB).
    for (granule, ttl, alignment) in [
        (Granule::Size4K, 1, 1u64 << 30),
        (Granule::Size64K, 1, 1 << 42),
        (Granule::Size64K, 2, 1 << 29),
    ] {
        let range = TlbiRange {
            num: 0,
            scale: 1,
            granule,
            ttl,
        };
        let half = alignment / 2;
        let cmd = Command::TlbiS2Ipa {
            vmid: 0,
            address: half,
            leaf: true,
            range: Some(range),
        };
        assert_eq!(
            cmd.encode(),
            Err(CommandError::MisalignedAddress {
                address: half,
                alignment
            })
        );
        let cmd = Command::TlbiS2Ipa {
            vmid: 0,
            address: alignment,
            leaf: true,
            range: Some(range),
        };
        assert!(cmd.encode().is_ok());
    }
}

#[test]
fn range_field_errors() {
    let va = |range| Command::TlbiNhVa {
        vmid: 0,
        asid: 0,
        address: 0,
        leaf: false,
        range: Some(range),
    };
    assert_eq!(
        va(tlbi_range(32, 1, Granule::Size4K, 0)).encode(),
        Err(CommandError::RangeNumTooLarge { num: 32 })
    );
    assert_eq!(
        va(tlbi_range(1, 32, Granule::Size4K, 0)).encode(),
        Err(CommandError::RangeScaleTooLarge { scale: 32 })
    );
    assert_eq!(
        va(tlbi_range(1, 1, Granule::Size4K, 4)).encode(),
        Err(CommandError::TtlTooLarge { ttl: 4 })
    );
    assert_eq!(
        va(tlbi_range(1, 1, Granule::Size16K, 1)).encode(),
        Err(CommandError::ReservedTtl {
            granule: Granule::Size16K,
            ttl: 1
        })
    );
    // NUM = SCALE = TTL = 0 with TG != 0 is reserved (CERROR_ILL), ...
    assert_eq!(
        va(tlbi_range(0, 0, Granule::Size4K, 0)).encode(),
        Err(CommandError::ReservedRangeEncoding)
    );
    // ... but a single granule with a level hint is fine.
    assert!(va(tlbi_range(0, 0, Granule::Size4K, 3)).encode().is_ok());
    // Bounds are inclusive.
    assert!(va(tlbi_range(31, 31, Granule::Size4K, 3)).encode().is_ok());
}

#[test]
fn range_sizes() {
    assert_eq!(RANGE_4K_L3.granules(), Some(4 << 9));
    assert_eq!(RANGE_4K_L3.size(), Some(4 << 21));
    let max = tlbi_range(31, 31, Granule::Size64K, 0);
    assert_eq!(max.granules(), Some(MAX_RANGE_GRANULES));
    assert_eq!(max.size(), Some(1 << 52));
    assert_eq!(TlbiRange { num: 32, ..max }.granules(), None);
    assert_eq!(TlbiRange { scale: 40, ..max }.size(), None);
    assert_eq!(TlbiRange { ttl: 7, ..max }.address_alignment(), None);
    assert_eq!(Granule::from_log2(14), Some(Granule::Size16K));
    assert_eq!(Granule::from_log2(13), None);
    for granule in [Granule::Size4K, Granule::Size16K, Granule::Size64K] {
        assert_eq!(Granule::from_log2(granule.log2()), Some(granule));
        assert_eq!(granule.size(), 1 << granule.log2());
    }
}

#[test]
fn opcodes_match_encoding() {
    let commands = [
        Command::PrefetchConfig { sid: 0, ssid: None },
        Command::CfgiSte { sid: 0, leaf: false },
        Command::CfgiSteRange { sid: 0, range: 0 },
        Command::CfgiCd {
            sid: 0,
            ssid: 0,
            leaf: false,
        },
        Command::CfgiCdAll { sid: 0 },
        Command::CfgiAll,
        Command::TlbiNhAll { vmid: 0 },
        Command::TlbiNhAsid { vmid: 0, asid: 0 },
        Command::TlbiNhVa {
            vmid: 0,
            asid: 0,
            address: 0,
            leaf: false,
            range: None,
        },
        Command::TlbiNhVaa {
            vmid: 0,
            address: 0,
            leaf: false,
            range: None,
        },
        Command::TlbiEl2All,
        Command::TlbiEl2Asid { asid: 0 },
        Command::TlbiEl2Va {
            asid: 0,
            address: 0,
            leaf: false,
            range: None,
        },
        Command::TlbiEl2Vaa {
            address: 0,
            leaf: false,
            range: None,
        },
        Command::TlbiS12Vmall { vmid: 0 },
        Command::TlbiS2Ipa {
            vmid: 0,
            address: 0,
            leaf: false,
            range: None,
        },
        Command::TlbiNsnhAll,
        Command::Sync {
            completion: SyncCompletion::None,
        },
    ];
    let expected = [
        0x01, 0x03, 0x04, 0x05, 0x06, 0x04, 0x10, 0x11, 0x12, 0x13, 0x20, 0x21, 0x22, 0x23, 0x28, 0x2a, 0x30, 0x46,
    ];
    for (command, opcode) in commands.iter().zip(expected) {
        assert_eq!(command.opcode(), opcode, "{command:?}");
        let words = enc(*command);
        assert_eq!(opcode_of(&words), opcode);
        assert!(opcode_name(opcode).is_some());
    }
}

#[test]
fn opcode_names_cover_the_spec_table() {
    // Section 4.1.1: every defined opcode and its name.
    let table: &[(u8, &str)] = &[
        (0x01, "CMD_PREFETCH_CONFIG"),
        (0x02, "CMD_PREFETCH_ADDR"),
        (0x03, "CMD_CFGI_STE"),
        (0x04, "CMD_CFGI_STE_RANGE"),
        (0x05, "CMD_CFGI_CD"),
        (0x06, "CMD_CFGI_CD_ALL"),
        (0x07, "CMD_CFGI_VMS_PIDM"),
        (0x10, "CMD_TLBI_NH_ALL"),
        (0x11, "CMD_TLBI_NH_ASID"),
        (0x12, "CMD_TLBI_NH_VA"),
        (0x13, "CMD_TLBI_NH_VAA"),
        (0x18, "CMD_TLBI_EL3_ALL"),
        (0x1a, "CMD_TLBI_EL3_VA"),
        (0x20, "CMD_TLBI_EL2_ALL"),
        (0x21, "CMD_TLBI_EL2_ASID"),
        (0x22, "CMD_TLBI_EL2_VA"),
        (0x23, "CMD_TLBI_EL2_VAA"),
        (0x28, "CMD_TLBI_S12_VMALL"),
        (0x2a, "CMD_TLBI_S2_IPA"),
        (0x30, "CMD_TLBI_NSNH_ALL"),
        (0x40, "CMD_ATC_INV"),
        (0x41, "CMD_PRI_RESP"),
        (0x44, "CMD_RESUME"),
        (0x45, "CMD_STALL_TERM"),
        (0x46, "CMD_SYNC"),
        (0x50, "CMD_TLBI_S_EL2_ALL"),
        (0x51, "CMD_TLBI_S_EL2_ASID"),
        (0x52, "CMD_TLBI_S_EL2_VA"),
        (0x53, "CMD_TLBI_S_EL2_VAA"),
        (0x58, "CMD_TLBI_S_S12_VMALL"),
        (0x5a, "CMD_TLBI_S_S2_IPA"),
        (0x60, "CMD_TLBI_SNH_ALL"),
        (0x70, "CMD_DPTI_ALL"),
        (0x73, "CMD_DPTI_PA"),
    ];
    for opcode in 0..=u8::MAX {
        let expected = table.iter().find(|(op, _)| *op == opcode).map(|(_, name)| *name);
        assert_eq!(opcode_name(opcode), expected, "opcode {opcode:#x}");
    }
}

#[test]
fn command_queue_error_codes() {
    // SMMU_CMDQ_CONS.ERR is [30:24].
    assert_eq!(CmdqConsError::from_cons(0x0000_0005), CmdqConsError::None);
    assert_eq!(CmdqConsError::from_cons(0x0100_0005), CmdqConsError::Illegal);
    assert_eq!(CmdqConsError::from_cons(0x0200_0000), CmdqConsError::Abort);
    assert_eq!(
        CmdqConsError::from_cons(0x8300_0000),
        CmdqConsError::AtcInvalidationSync
    );
    assert_eq!(CmdqConsError::from_cons(0x7f0f_ffff), CmdqConsError::Reserved(0x7f));
    assert_eq!(CmdqConsError::from_code(0x84), CmdqConsError::Reserved(4));
    for code in 0..0x80u8 {
        let error = CmdqConsError::from_code(code);
        assert_eq!(error.code(), code);
        assert_eq!(error.is_error(), code != 0);
        assert_eq!(CmdqConsError::from_cons(u32::from(code) << 24), error);
    }
    assert!(CmdqConsError::Illegal.to_string().contains("CERROR_ILL"));
    assert!(CmdqConsError::None.to_string().contains("CERROR_NONE"));
    assert!(CmdqConsError::Abort.to_string().contains("CERROR_ABT"));
    assert!(
        CmdqConsError::AtcInvalidationSync
            .to_string()
            .contains("CERROR_ATC_INV_SYNC")
    );
    assert!(CmdqConsError::Reserved(9).to_string().contains("0x9"));
}

#[test]
fn error_display_names_the_value() {
    let cases: &[(CommandError, &str)] = &[
        (
            CommandError::MisalignedAddress {
                address: 0x1234,
                alignment: 0x1000,
            },
            "0x1234",
        ),
        (
            CommandError::AddressTooWide {
                address: 1 << 56,
                bits: 56,
            },
            "56-bit",
        ),
        (CommandError::SubstreamIdTooLarge { ssid: 0x100000 }, "0x100000"),
        (CommandError::SteRangeTooLarge { range: 40 }, "40"),
        (CommandError::RangeNumTooLarge { num: 33 }, "33"),
        (CommandError::RangeScaleTooLarge { scale: 34 }, "34"),
        (CommandError::TtlTooLarge { ttl: 5 }, "5"),
        (
            CommandError::ReservedTtl {
                granule: Granule::Size16K,
                ttl: 1,
            },
            "16K",
        ),
        (CommandError::ReservedRangeEncoding, "reserved"),
        (CommandError::MsiAttributesTooLarge { attributes: 0x20 }, "0x20"),
        (CommandError::MsiAddressZero, "address is 0"),
        (
            CommandError::MisalignedSize {
                size: 0x1800,
                alignment: 0x1000,
            },
            "0x1800",
        ),
        (
            CommandError::RangeWrapsAround {
                address: 0xffff_f000,
                size: 0x2000,
            },
            "0xfffff000",
        ),
    ];
    for (error, needle) in cases {
        let text = error.to_string();
        assert!(text.contains(needle), "{error:?}: {text}");
    }
}

// ---- Range planning ----

/// Whether `granules` can be covered by one range command: (NUM + 1) * 2^SCALE with both in 0..=31.
fn single_piece(granules: u64) -> bool {
    (0..=31u32).any(|scale| {
        granules.trailing_zeros() >= scale && {
            let multiple = granules >> scale;
            (1..=32).contains(&multiple)
        }
    })
}

/// Fewest pieces for every count up to `limit`, by dynamic programming over all (NUM + 1) * 2^SCALE values.
fn optimal_counts(limit: usize) -> Vec<u32> {
    let mut coins: Vec<usize> = (0..=31u32)
        .flat_map(|scale| (1..=32usize).map(move |multiple| multiple << scale))
        .filter(|&value| value <= limit)
        .collect();
    coins.sort_unstable();
    coins.dedup();
    let mut best = std::vec![u32::MAX; limit + 1];
    best[0] = 0;
    for total in 1..=limit {
        for &coin in coins.iter().take_while(|&&coin| coin <= total) {
            best[total] = best[total].min(best[total - coin].saturating_add(1));
        }
    }
    best
}

fn check_plan(address: u64, size: u64, granule: Granule, ttl: u8) {
    let pieces: Vec<RangePiece> = plan_range_invalidation(address, size, granule, ttl).unwrap().collect();
    let granules = size >> granule.log2();
    // The pieces tile the range exactly, in order.
    let mut next = address;
    let mut covered = 0u128;
    for piece in &pieces {
        assert_eq!(piece.address, next, "{pieces:?}");
        assert!(piece.size > 0);
        covered += u128::from(piece.size);
        next = next.wrapping_add(piece.size);
        // Every piece encodes, as a VA and (when in range) an IPA invalidation, and says what it covers.
        let command = Command::TlbiNhVa {
            vmid: 1,
            asid: 2,
            address: piece.address,
            leaf: true,
            range: piece.range,
        };
        command.encode().unwrap_or_else(|error| panic!("{piece:?}: {error}"));
        if piece.address < (1 << 56) {
            let command = Command::TlbiS2Ipa {
                vmid: 1,
                address: piece.address,
                leaf: false,
                range: piece.range,
            };
            command.encode().unwrap_or_else(|error| panic!("{piece:?}: {error}"));
        }
        match piece.range {
            Some(range) => {
                assert_eq!(range.size(), Some(piece.size));
                assert_eq!((range.granule, range.ttl), (granule, ttl));
            }
            None => assert_eq!((piece.size, ttl), (granule.size(), 0)),
        }
    }
    assert_eq!(covered, u128::from(size));
    // No two neighbours could have been one command.
    for pair in pieces.windows(2) {
        let merged = (pair[0].size + pair[1].size) >> granule.log2();
        assert!(!single_piece(merged), "{pair:?} could be merged");
    }
    assert!(
        pieces.len() as u64 <= RangePlan::max_pieces(granules),
        "{} pieces for {granules}",
        pieces.len()
    );
    assert!(pieces.len() as u64 <= 8 + granules / MAX_RANGE_GRANULES);
}

#[test]
fn plan_is_optimal_for_every_small_count() {
    let limit = 1 << 14;
    let best = optimal_counts(limit);
    for granules in 1..=limit as u64 {
        let plan = plan_range_invalidation(0x8000_0000, granules << 12, Granule::Size4K, 0).unwrap();
        let count = plan.count() as u32;
        assert_eq!(count, best[granules as usize], "{granules} granules");
    }
    // The model agrees with single_piece.
    for (granules, &count) in best.iter().enumerate().skip(1) {
        assert_eq!(count == 1, single_piece(granules as u64), "{granules}");
    }
}

#[test]
fn plan_examples() {
    // One granule without a hint: a plain invalidation.
    let pieces: Vec<_> = plan_range_invalidation(0x1000, 0x1000, Granule::Size4K, 0)
        .unwrap()
        .collect();
    assert_eq!(
        pieces,
        [RangePiece {
            address: 0x1000,
            size: 0x1000,
            range: None
        }]
    );
    // With a hint, the single granule is a range command.
    let pieces: Vec<_> = plan_range_invalidation(0x1000, 0x1000, Granule::Size4K, 3)
        .unwrap()
        .collect();
    let range = tlbi_range(0, 0, Granule::Size4K, 3);
    assert_eq!(
        pieces,
        [RangePiece {
            address: 0x1000,
            size: 0x1000,
            range: Some(range)
        }]
    );
    // 33 granules: 1 then 32 (NUM 0, SCALE 5).
    let pieces: Vec<_> = plan_range_invalidation(0, 33 << 12, Granule::Size4K, 0)
        .unwrap()
        .collect();
    let range = tlbi_range(0, 5, Granule::Size4K, 0);
    assert_eq!(
        pieces,
        [
            RangePiece {
                address: 0,
                size: 0x1000,
                range: None
            },
            RangePiece {
                address: 0x1000,
                size: 32 << 12,
                range: Some(range)
            },
        ]
    );
    // A whole 48-bit space of 4K pages is one command (NUM 31, SCALE 31).
    let pieces: Vec<_> = plan_range_invalidation(0, 1 << 48, Granule::Size4K, 0)
        .unwrap()
        .collect();
    assert_eq!(pieces.len(), 1);
    assert_eq!(pieces[0].range, Some(tlbi_range(31, 31, Granule::Size4K, 0)));
    // Empty.
    assert_eq!(plan_range_invalidation(0, 0, Granule::Size64K, 0).unwrap().count(), 0);
    // Ending exactly at 2^64 is allowed.
    let pieces: Vec<_> = plan_range_invalidation(0xffff_ffff_ffff_e000, 0x2000, Granule::Size4K, 0)
        .unwrap()
        .collect();
    assert_eq!(pieces.len(), 1);
}

#[test]
fn plan_errors() {
    assert_eq!(
        plan_range_invalidation(0x800, 0x1000, Granule::Size4K, 0),
        Err(CommandError::MisalignedAddress {
            address: 0x800,
            alignment: 0x1000
        })
    );
    assert_eq!(
        plan_range_invalidation(0x1000, 0x1800, Granule::Size4K, 0),
        Err(CommandError::MisalignedSize {
            size: 0x1800,
            alignment: 0x1000
        })
    );
    assert_eq!(
        plan_range_invalidation(0x20_0000, 0x1000, Granule::Size4K, 2),
        Err(CommandError::MisalignedSize {
            size: 0x1000,
            alignment: 0x20_0000
        })
    );
    assert_eq!(
        plan_range_invalidation(0x4000, 0x4000, Granule::Size16K, 1),
        Err(CommandError::ReservedTtl {
            granule: Granule::Size16K,
            ttl: 1
        })
    );
    assert_eq!(
        plan_range_invalidation(0, 0x1000, Granule::Size4K, 4),
        Err(CommandError::TtlTooLarge { ttl: 4 })
    );
    assert_eq!(
        plan_range_invalidation(0xffff_ffff_ffff_f000, 0x2000, Granule::Size4K, 0),
        Err(CommandError::RangeWrapsAround {
            address: 0xffff_ffff_ffff_f000,
            size: 0x2000
        })
    );
}

#[test]
fn plan_max_pieces() {
    assert_eq!(RangePlan::max_pieces(0), 0);
    assert_eq!(RangePlan::max_pieces(1), 1);
    assert_eq!(RangePlan::max_pieces(0b11111), 1);
    assert_eq!(RangePlan::max_pieces(0b100001), 2);
    assert_eq!(RangePlan::max_pieces(MAX_RANGE_GRANULES - 1), 8);
    assert_eq!(RangePlan::max_pieces(MAX_RANGE_GRANULES), 1);
    assert_eq!(RangePlan::max_pieces(3 * MAX_RANGE_GRANULES + 1), 4);
    // The worst case is reached: 2^36 - 1 granules needs 8 commands.
    let plan = plan_range_invalidation(0, (MAX_RANGE_GRANULES - 1) << 12, Granule::Size4K, 0).unwrap();
    assert_eq!(plan.count(), 8);
}

/// What `Iommu::submit` lets code outside the driver queue: every opcode [`Command`] models, CMD_SYNC only
/// with a completion that writes nothing. Checked over all 256 opcodes, with the CS and MSIAddress bits taken
/// from IHI 0070 (CS [13:12]; MSIAddress [119:66]), not from the constants above.
#[test]
fn vetting_passes_only_invalidations_prefetches_and_syncs_that_write_nothing() {
    let modelled = [
        0x01, 0x03, 0x04, 0x05, 0x06, 0x10, 0x11, 0x12, 0x13, 0x20, 0x21, 0x22, 0x23, 0x28, 0x2a, 0x30,
    ];
    for op in 0..=255u8 {
        let words = [u64::from(op) | 0xffff_ffff << 32, u64::MAX];
        let expected = match op {
            _ if modelled.contains(&op) => Ok(()),
            // CS = 0b00 written in word 0 above (bits [13:12] clear): SIG_NONE, whatever word 1 holds.
            0x46 => Ok(()),
            _ => Err(Unvetted::Unmodelled { opcode: op }),
        };
        assert_eq!(vet(&words), expected, "opcode {op:#04x}");
    }
    // Every command the driver builds passes, as it encodes it.
    let address = 0x8000_1000;
    let range = Some(RANGE_4K_L3);
    for command in [
        Command::PrefetchConfig { sid: 1, ssid: Some(2) },
        Command::CfgiSte { sid: 3, leaf: true },
        Command::CfgiSteRange { sid: 0, range: 5 },
        Command::CfgiAll,
        Command::CfgiCd {
            sid: 3,
            ssid: 1,
            leaf: false,
        },
        Command::CfgiCdAll { sid: 3 },
        Command::TlbiNhAll { vmid: 1 },
        Command::TlbiNhAsid { vmid: 1, asid: 2 },
        Command::TlbiNhVa {
            vmid: 1,
            asid: 2,
            address,
            leaf: true,
            range,
        },
        Command::TlbiNhVaa {
            vmid: 1,
            address,
            leaf: false,
            range: None,
        },
        Command::TlbiEl2All,
        Command::TlbiEl2Asid { asid: 2 },
        Command::TlbiEl2Va {
            asid: 0,
            address,
            leaf: true,
            range,
        },
        Command::TlbiEl2Vaa {
            address,
            leaf: true,
            range: None,
        },
        Command::TlbiS12Vmall { vmid: 1 },
        Command::TlbiS2Ipa {
            vmid: 1,
            address,
            leaf: true,
            range,
        },
        Command::TlbiNsnhAll,
        Command::Sync {
            completion: SyncCompletion::None,
        },
        Command::Sync {
            completion: SyncCompletion::Irq,
        },
        Command::Sync {
            completion: SyncCompletion::Sev,
        },
    ] {
        assert_eq!(vet(&enc(command)), Ok(()), "{command:?}");
    }
    // A CMD_SYNC whose MSI writes memory, however it was built.
    let msi = enc(Command::Sync {
        completion: SyncCompletion::Msi {
            address,
            data: 0x4000_0003,
            shareability: Shareability::Inner,
            attributes: 0xf,
        },
    });
    assert_eq!(vet(&msi), Err(Unvetted::MsiWrite { address }));
    let sig_irq = 0x46 | 0b01 << 12;
    assert_eq!(vet(&[sig_irq, 1 << 55]), Err(Unvetted::MsiWrite { address: 1 << 55 }));
    assert_eq!(vet(&[sig_irq, 0b100]), Err(Unvetted::MsiWrite { address: 0b100 }));
    // SIG_IRQ without an MSI address (bits [65:64] and [127:120] are not part of it), SIG_SEV, and the
    // reserved CS.
    assert_eq!(vet(&[sig_irq, 0xff00_0000_0000_0003]), Ok(()));
    assert_eq!(vet(&[0x46 | 0b10 << 12, u64::MAX]), Ok(()));
    assert_eq!(vet(&[0x46 | 0b11 << 12, 0]), Err(Unvetted::ReservedCompletion));
    assert_eq!(
        Unvetted::Unmodelled { opcode: 0x7f }.to_string(),
        "opcode 0x7f, reserved"
    );
    assert_eq!(
        Unvetted::Unmodelled { opcode: 0x40 }.to_string(),
        "CMD_ATC_INV (0x40), which the driver does not model"
    );
}

fn granule_strategy() -> impl Strategy<Value = Granule> {
    prop_oneof![Just(Granule::Size4K), Just(Granule::Size16K), Just(Granule::Size64K)]
}

proptest! {
    #[test]
    fn plan_tiles_and_encodes(
        granule in granule_strategy(),
        ttl in 0u8..=3,
        start in any::<u64>(),
        granules in prop_oneof![0u64..1 << 12, 0u64..1 << 40, any::<u64>()],
    ) {
        let Some(alignment_log2) = granule.ttl_alignment_log2(ttl) else {
            prop_assert_eq!(
                plan_range_invalidation(0, 0, granule, ttl),
                Err(CommandError::ReservedTtl { granule, ttl })
            );
            return Ok(());
        };
        // A size in whole leaf entries, and a start that leaves room for it below 2^64.
        let mask = !((1u64 << alignment_log2) - 1);
        let size = (granules << granule.log2()) & mask;
        let start = start & mask;
        let address = if size == 0 { start } else { start.min(0u64.wrapping_sub(size)) };
        check_plan(address, size, granule, ttl);
    }
}
