extern crate std;

use std::format;
use std::string::ToString;

use proptest::prelude::*;

use super::*;

/// Test-only encoder: places `value` at record bits [hi:lo], numbered 255..0 as in the figures of §7.3, one bit
/// at a time. It knows nothing of the decoder's words and masks.
fn put(rec: &mut [u64; 4], hi: u32, lo: u32, value: u64) {
    assert!(lo <= hi && hi < 256, "bad field [{hi}:{lo}]");
    let width = hi - lo + 1;
    assert!(
        width == 64 || value >> width == 0,
        "{value:#x} does not fit [{hi}:{lo}]"
    );
    for i in 0..width {
        let bit = lo + i;
        let word = (bit / 64) as usize;
        if (value >> i) & 1 == 1 {
            rec[word] |= 1 << (bit % 64);
        } else {
            rec[word] &= !(1 << (bit % 64));
        }
    }
}

/// A record with the event number (bits `[7:0]`), StreamID (bits `[63:32]`) and, when given, SSV (bit `[11]`) and
/// SubstreamID (bits `[31:12]`): the head every architected record shares.
fn head(number: u8, stream_id: u32, substream_id: Option<u32>) -> [u64; 4] {
    let mut r = [0; 4];
    put(&mut r, 7, 0, number.into());
    put(&mut r, 63, 32, stream_id.into());
    if let Some(ssid) = substream_id {
        put(&mut r, 11, 11, 1);
        put(&mut r, 31, 12, ssid.into());
    }
    r
}

#[test]
fn qemu_c_bad_ste_literal_words() {
    // C_BAD_STE for StreamID 0x18 as QEMU writes it: word 0 = StreamID << 32 | 0x04, the rest zero.
    let e = Event::decode(&[0x0000_0018_0000_0004, 0, 0, 0]);
    assert_eq!(
        e,
        Event::CBadSte(BadConfig {
            stream_id: 0x18,
            substream_id: None
        })
    );
    assert_eq!(e.to_string(), "C_BAD_STE sid 0x18");
}

#[test]
fn f_uut() {
    // §7.3.2: Reason [79:64], PnU [97], InD [98], RnW [99], InputAddr [191:128].
    let mut r = head(0x01, 0x42, Some(0x7));
    put(&mut r, 79, 64, 0xbeef);
    put(&mut r, 97, 97, 1);
    put(&mut r, 98, 98, 0);
    put(&mut r, 99, 99, 1);
    put(&mut r, 191, 128, 0xffff_8000_1234_5678);
    assert_eq!(
        Event::decode(&r),
        Event::FUut(UnsupportedTransaction {
            stream_id: 0x42,
            substream_id: Some(0x7),
            reason: 0xbeef,
            access: Access {
                read: true,
                instruction: false,
                privileged: true
            },
            input_addr: 0xffff_8000_1234_5678,
        })
    );
}

#[test]
fn configuration_errors_carry_stream_and_substream() {
    // §7.3.3, §7.3.5, §7.3.11: SSV [11], SubstreamID [31:12], StreamID [63:32].
    let r = head(0x02, 0x1_0000, Some(0xf_ffff));
    assert_eq!(
        Event::decode(&r),
        Event::CBadStreamId(BadConfig {
            stream_id: 0x1_0000,
            substream_id: Some(0xf_ffff)
        })
    );
    let r = head(0x04, 0x10, None);
    assert_eq!(
        Event::decode(&r),
        Event::CBadSte(BadConfig {
            stream_id: 0x10,
            substream_id: None
        })
    );
    let r = head(0x0a, 0xffff_ffff, Some(0));
    assert_eq!(
        Event::decode(&r),
        Event::CBadCd(BadConfig {
            stream_id: 0xffff_ffff,
            substream_id: Some(0)
        })
    );
}

#[test]
fn fetch_aborts() {
    // §7.3.4, §7.3.10, §7.3.20: Reason [79:64], GPCF [80], FetchAddr[55:3] at [247:195].
    for (number, wrap) in [
        (0x03, Event::FSteFetch as fn(FetchAbort) -> Event),
        (0x09, Event::FCdFetch),
        (0x25, Event::FVmsFetch),
    ] {
        let mut r = head(number, 0x20, Some(3));
        put(&mut r, 79, 64, 0x5a5a);
        put(&mut r, 80, 80, 1);
        put(&mut r, 247, 195, 0x00ab_cdef_1234_5678 >> 3);
        let e = Event::decode(&r);
        assert_eq!(
            e,
            wrap(FetchAbort {
                stream_id: 0x20,
                substream_id: Some(3),
                reason: 0x5a5a,
                gpcf: true,
                fetch_addr: 0x00ab_cdef_1234_5678,
            })
        );
        assert_eq!(e.fetch_address(), Some(0x00ab_cdef_1234_5678));
        assert_eq!(e.address(), Some(0x00ab_cdef_1234_5678));
        assert_eq!(e.input_address(), None);
    }
}

#[test]
fn f_bad_ats_treq() {
    // §7.3.6: Span [67:64], P [92], X [93], W [94], R [95], InputAddr[63:12] at [191:140].
    let mut r = head(0x05, 0x300, Some(0x11));
    put(&mut r, 67, 64, 0x9);
    put(&mut r, 92, 92, 1);
    put(&mut r, 93, 93, 0);
    put(&mut r, 94, 94, 1);
    put(&mut r, 95, 95, 1);
    put(&mut r, 191, 140, 0x8_0000_4321);
    assert_eq!(
        Event::decode(&r),
        Event::FBadAtsTreq(BadAtsRequest {
            stream_id: 0x300,
            substream_id: Some(0x11),
            span: 9,
            rights: Rights {
                read: true,
                write: true,
                execute: false
            },
            privileged: true,
            input_addr: 0x8_0000_4321 << 12,
        })
    );
}

#[test]
fn f_stream_disabled_has_no_substream() {
    // §7.3.7: only StreamID [63:32]; bits [31:8] are RES0, so a set SSV means nothing.
    let r = head(0x06, 0x77, Some(0x5));
    let e = Event::decode(&r);
    assert_eq!(e, Event::FStreamDisabled { stream_id: 0x77 });
    assert_eq!(e.substream_id(), None);
    assert_eq!(e.stream_id(), Some(0x77));
}

#[test]
fn f_transl_forbidden() {
    // §7.3.8: RnW [99], InputAddr [191:128]; no SubstreamID.
    let mut r = head(0x07, 0x8, None);
    put(&mut r, 99, 99, 0);
    put(&mut r, 191, 128, 0x4000_1fff);
    assert_eq!(
        Event::decode(&r),
        Event::FTranslForbidden {
            stream_id: 0x8,
            read: false,
            input_addr: 0x4000_1fff
        }
    );
}

#[test]
fn c_bad_substreamid_is_always_valid() {
    // §7.3.9: SubstreamID [31:12] with no SSV qualifier (bit [11] is RES0).
    let mut r = [0; 4];
    put(&mut r, 7, 0, 0x08);
    put(&mut r, 31, 12, 0x1234);
    put(&mut r, 63, 32, 0x9);
    let e = Event::decode(&r);
    assert_eq!(
        e,
        Event::CBadSubstreamId {
            stream_id: 0x9,
            substream_id: 0x1234
        }
    );
    assert_eq!(e.substream_id(), Some(0x1234));
}

#[test]
fn f_walk_eabt() {
    // §7.3.12: Reason [79:64], GPCF [80], PnU [97], InD [98], RnW [99], NSIPA [102], S2 [103],
    // CLASS [105:104], InputAddr [191:128], FetchAddr[55:3] at [247:195].
    let mut r = head(0x0b, 0x10, None);
    put(&mut r, 79, 64, 0x2);
    put(&mut r, 98, 98, 1);
    put(&mut r, 99, 99, 1);
    put(&mut r, 102, 102, 1);
    put(&mut r, 103, 103, 1);
    put(&mut r, 105, 104, 0b01);
    put(&mut r, 191, 128, 0x7fff_f000);
    put(&mut r, 247, 195, 0x8000_0ff8 >> 3);
    let e = Event::decode(&r);
    assert_eq!(
        e,
        Event::FWalkEabt(WalkAbort {
            stream_id: 0x10,
            substream_id: None,
            reason: 2,
            gpcf: false,
            access: Access {
                read: true,
                instruction: true,
                privileged: false
            },
            nsipa: true,
            stage: Stage::Two,
            class: Class::TranslationTable,
            input_addr: 0x7fff_f000,
            fetch_addr: 0x8000_0ff8,
        })
    );
    // The input address is the one to report; the fetch address stays reachable.
    assert_eq!(e.address(), Some(0x7fff_f000));
    assert_eq!(e.fetch_address(), Some(0x8000_0ff8));
}

/// The F_TRANSLATION-shaped record of §7.3.13 to §7.3.16: STAG `[79:64]`, Stall `[95]`, PnU `[97]`, InD `[98]`,
/// RnW `[99]`, NSIPA `[102]`, S2 `[103]`, CLASS `[105:104]`, IMPL_DEF `[127:112]`, InputAddr `[191:128]`,
/// `IPA[55:12]` at `[247:204]`.
fn translation_record(number: u8, stage2: bool, class: u64) -> [u64; 4] {
    let mut r = head(number, 0x10, Some(0x2));
    put(&mut r, 79, 64, 0xcafe);
    put(&mut r, 95, 95, 1);
    put(&mut r, 97, 97, 0);
    put(&mut r, 98, 98, 0);
    put(&mut r, 99, 99, 1);
    put(&mut r, 102, 102, 0);
    put(&mut r, 103, 103, stage2.into());
    put(&mut r, 105, 104, class);
    put(&mut r, 127, 112, 0x00ee);
    put(&mut r, 191, 128, 0x1234_5000);
    put(&mut r, 247, 204, 0x0080_0000_9876_5000 >> 12);
    r
}

fn expected_translation_fault(stage2: bool, class: Class) -> TranslationFault {
    TranslationFault {
        stream_id: 0x10,
        substream_id: Some(0x2),
        stag: Some(0xcafe),
        access: Access {
            read: true,
            instruction: false,
            privileged: false,
        },
        nsipa: false,
        stage: if stage2 { Stage::Two } else { Stage::One },
        class,
        impdef: 0xee,
        input_addr: 0x1234_5000,
        ipa: stage2.then_some(0x0080_0000_9876_5000),
    }
}

#[test]
fn translation_faults() {
    for (number, wrap) in [
        (0x10, Event::FTranslation as fn(TranslationFault) -> Event),
        (0x11, Event::FAddrSize),
        (0x12, Event::FAccess),
    ] {
        for (class_bits, class) in [(0b00, Class::ContextDescriptor), (0b01, Class::TranslationTable)] {
            let e = Event::decode(&translation_record(number, true, class_bits));
            assert_eq!(e, wrap(expected_translation_fault(true, class)));
            assert_eq!(e.stall_tag(), Some(0xcafe));
            assert_eq!(e.ipa(), Some(0x0080_0000_9876_5000));
        }
        // Stage 1: the IPA field is UNKNOWN and not reported.
        let e = Event::decode(&translation_record(number, false, 0b10));
        assert_eq!(e, wrap(expected_translation_fault(false, Class::Input)));
        assert_eq!(e.ipa(), None);
    }
}

#[test]
fn stag_only_when_stalled() {
    // §7.3.13: a terminated transaction (Stall [95] == 0) has no STAG to resume.
    let mut r = translation_record(0x10, false, 0b10);
    put(&mut r, 95, 95, 0);
    let e = Event::decode(&r);
    assert_eq!(e.stall_tag(), None);
    assert_eq!(e.translation_fault().map(|t| t.stag), Some(None));
}

#[test]
fn f_permission() {
    // §7.3.16: as F_TRANSLATION plus AssuredOnly [106], DirtyBit [107], TTRnW [108], Overlay [109].
    let mut r = translation_record(0x13, true, 0b01);
    put(&mut r, 106, 106, 1);
    put(&mut r, 107, 107, 0);
    put(&mut r, 108, 108, 0);
    put(&mut r, 109, 109, 1);
    assert_eq!(
        Event::decode(&r),
        Event::FPermission(PermissionFault {
            fault: expected_translation_fault(true, Class::TranslationTable),
            table_walk_read: Some(false),
            overlay: true,
            dirty_bit: false,
            assured_only: true,
        })
    );
    // TTRnW is UNKNOWN unless CLASS is TT.
    let mut r = translation_record(0x13, true, 0b10);
    put(&mut r, 107, 107, 1);
    put(&mut r, 108, 108, 1);
    assert_eq!(
        Event::decode(&r),
        Event::FPermission(PermissionFault {
            fault: expected_translation_fault(true, Class::Input),
            table_walk_read: None,
            overlay: false,
            dirty_bit: true,
            assured_only: false,
        })
    );
}

#[test]
fn f_tlb_conflict() {
    // §7.3.17: Reason [95:64], PnU [97], InD [98], RnW [99], NSIPA [102], S2 [103], InputAddr [191:128],
    // IPA[55:12] at [247:204].
    let mut r = head(0x20, 0x1, Some(0x1));
    put(&mut r, 95, 64, 0xdead_beef);
    put(&mut r, 97, 97, 1);
    put(&mut r, 99, 99, 0);
    put(&mut r, 102, 102, 1);
    put(&mut r, 103, 103, 1);
    put(&mut r, 105, 104, 0b11); // RES0 in this record: not a CLASS.
    put(&mut r, 191, 128, 0xabc0_0000);
    put(&mut r, 247, 204, 0x4_5678);
    assert_eq!(
        Event::decode(&r),
        Event::FTlbConflict(TlbConflict {
            stream_id: 0x1,
            substream_id: Some(0x1),
            reason: 0xdead_beef,
            access: Access {
                read: false,
                instruction: false,
                privileged: true
            },
            nsipa: true,
            stage: Stage::Two,
            input_addr: 0xabc0_0000,
            ipa: Some(0x4_5678 << 12),
        })
    );
}

#[test]
fn f_cfg_conflict() {
    // §7.3.18: Reason [95:64].
    let mut r = head(0x21, 0x33, None);
    put(&mut r, 95, 64, 0x8000_0001);
    assert_eq!(
        Event::decode(&r),
        Event::FCfgConflict(ConfigConflict {
            stream_id: 0x33,
            substream_id: None,
            reason: 0x8000_0001
        })
    );
}

#[test]
fn e_page_request() {
    // §7.3.19: uX [97], uW [98], uR [99], pX [101], pW [102], pR [103], Span [115:108],
    // InputAddr[63:12] at [191:140].
    let mut r = head(0x24, 0x44, Some(0x9));
    put(&mut r, 97, 97, 0);
    put(&mut r, 98, 98, 1);
    put(&mut r, 99, 99, 1);
    put(&mut r, 101, 101, 1);
    put(&mut r, 102, 102, 0);
    put(&mut r, 103, 103, 1);
    put(&mut r, 115, 108, 0x10);
    put(&mut r, 191, 140, 0xf_ffff);
    let e = Event::decode(&r);
    assert_eq!(
        e,
        Event::EPageRequest(PageRequest {
            stream_id: 0x44,
            substream_id: Some(0x9),
            unprivileged: Rights {
                read: true,
                write: true,
                execute: false
            },
            privileged: Rights {
                read: true,
                write: false,
                execute: true
            },
            span: 0x10,
            input_addr: 0xffff_f000,
        })
    );
    assert_eq!(
        e.to_string(),
        "E_PAGE_REQUEST sid 0x44 ssid 0x9 input 0xfffff000 span 16 x 4KiB privileged r-x unprivileged rw-"
    );
}

#[test]
fn impdef_and_reserved_numbers() {
    let raw = [0xffff_ffff_ffff_ffe3, 1, 2, 3];
    let e = Event::decode(&raw);
    assert_eq!(e, Event::ImpDef { number: 0xe3, raw });
    assert_eq!(
        (e.event_type(), e.name(), e.stream_id(), e.address()),
        (0xe3, "IMPDEF_EVENT", None, None)
    );
    for n in [0x00u8, 0x0c, 0x0f, 0x14, 0x22, 0x23, 0x26, 0xdf, 0xf0, 0xff] {
        let raw = [u64::from(n) | 0x1234 << 32, 0, 0, 0];
        let e = Event::decode(&raw);
        assert_eq!(e, Event::Unknown { raw });
        assert_eq!((e.event_type(), e.name(), e.stream_id()), (n, "UNKNOWN", None));
    }
    assert_eq!(
        Event::decode(&[0x42, 0, 0, 0]).to_string(),
        "UNKNOWN event 0x42 [0x0000000000000042 0x0000000000000000 0x0000000000000000 0x0000000000000000]"
    );
}

#[test]
fn from_le_bytes_matches_words() {
    let mut bytes = [0u8; EVENT_RECORD_BYTES];
    bytes[0] = 0x04; // record bits [7:0]: C_BAD_STE
    bytes[1] = 0x08; // record bit 11: SSV
    bytes[2] = 0x10; // record bit 20: SubstreamID bit 8
    bytes[4] = 0x18; // record bits [39:32]: StreamID[7:0]
    assert_eq!(
        Event::from_le_bytes(&bytes),
        Event::CBadSte(BadConfig {
            stream_id: 0x18,
            substream_id: Some(0x100)
        })
    );
}

#[test]
fn display_lines() {
    let e = Event::decode(&head(0x04, 0x10, None));
    assert_eq!(e.to_string(), "C_BAD_STE sid 0x10");
    let e = Event::decode(&head(0x0a, 0x10, Some(0x3)));
    assert_eq!(e.to_string(), "C_BAD_CD sid 0x10 ssid 0x3");

    let mut r = head(0x10, 0x10, None);
    put(&mut r, 99, 99, 1);
    put(&mut r, 105, 104, 0b10);
    put(&mut r, 191, 128, 0x1234000);
    assert_eq!(
        Event::decode(&r).to_string(),
        "F_TRANSLATION sid 0x10 ssid - read input 0x1234000 stage 1 class IN"
    );

    let r = translation_record(0x13, true, 0b01);
    assert_eq!(
        Event::decode(&r).to_string(),
        "F_PERMISSION sid 0x10 ssid 0x2 read input 0x12345000 stage 2 class TT ipa 0x80000098765000 \
         stalled stag 0xcafe impdef 0xee walk write"
    );

    let mut r = head(0x03, 0x5, None);
    put(&mut r, 247, 195, 0x4000_0040 >> 3);
    assert_eq!(
        Event::decode(&r).to_string(),
        "F_STE_FETCH sid 0x5 fetch 0x40000040 reason 0x0"
    );
}

// Records assembled by hand, word by word, from the field tables (Linux's EVTQ_* masks and QEMU's EVT_SET_*
// agree with them), without `put` or the decoder's masks: each hex literal is the sum written in its comment.

#[test]
fn hand_assembled_f_translation_stage2_read() {
    let record = [
        // [7:0] 0x10 F_TRANSLATION; SSV [11] = 0; StreamID 0x10 at [63:32].
        0x0000_0010_0000_0010,
        // word 1 = record [127:64]: RnW [99] -> bit 35 = 0x8_0000_0000; S2 [103] -> bit 39 = 0x80_0000_0000;
        // CLASS [105:104] = 0b10 (IN) -> bit 41 = 0x200_0000_0000; Stall [95] = 0, so STAG is meaningless.
        0x0000_0288_0000_0000,
        // InputAddr [191:128].
        0x0000_0000_8000_1234,
        // IPA[55:12] at [247:204]: word 3 bits [55:12].
        0x0000_0004_5678_9000,
    ];
    assert_eq!(
        Event::decode(&record),
        Event::FTranslation(TranslationFault {
            stream_id: 0x10,
            substream_id: None,
            stag: None,
            access: Access {
                read: true,
                instruction: false,
                privileged: false
            },
            nsipa: false,
            stage: Stage::Two,
            class: Class::Input,
            impdef: 0,
            input_addr: 0x8000_1234,
            ipa: Some(0x4_5678_9000),
        })
    );
}

#[test]
fn hand_assembled_f_permission_stage1_stalled_write() {
    let record = [
        // [7:0] 0x13 F_PERMISSION; SSV [11] = 0x800; SubstreamID 5 at [31:12] = 0x5000; StreamID 0x18.
        0x0000_0018_0000_5813,
        // STAG 0x42 at [79:64] -> bits [15:0]; Stall [95] -> bit 31 = 0x8000_0000; PnU [97] -> bit 33 =
        // 0x2_0000_0000; RnW [99] = 0 (write); CLASS IN -> bit 41 = 0x200_0000_0000; S2 = 0.
        0x0000_0202_8000_0042,
        0xffff_0000_1000_0000,
        // The IPA is UNKNOWN for a stage 1 fault: garbage here must not show.
        0xdead_beef_0000_0000,
    ];
    assert_eq!(
        Event::decode(&record),
        Event::FPermission(PermissionFault {
            fault: TranslationFault {
                stream_id: 0x18,
                substream_id: Some(5),
                stag: Some(0x42),
                access: Access {
                    read: false,
                    instruction: false,
                    privileged: true
                },
                nsipa: false,
                stage: Stage::One,
                class: Class::Input,
                impdef: 0,
                input_addr: 0xffff_0000_1000_0000,
                ipa: None,
            },
            table_walk_read: None,
            overlay: false,
            dirty_bit: false,
            assured_only: false,
        })
    );
}

#[test]
fn hand_assembled_f_permission_on_a_table_walk_reports_ttrnw() {
    let record = [
        // [7:0] 0x13; StreamID 0x20.
        0x0000_0020_0000_0013,
        // S2 [103] -> bit 39 = 0x80_0000_0000; CLASS [105:104] = 0b01 (TT) -> bit 40 = 0x100_0000_0000;
        // TTRnW [108] -> bit 44 = 0x1000_0000_0000 (Linux: EVTQ_1_TT_READ = BIT(44) of word 1).
        0x0000_1180_0000_0000,
        0x0000_0000_0000_1000,
        // IPA of the stage 1 descriptor, 0x4000_0000.
        0x0000_0000_4000_0000,
    ];
    let Event::FPermission(p) = Event::decode(&record) else {
        panic!("not F_PERMISSION")
    };
    assert_eq!(p.table_walk_read, Some(true));
    assert_eq!((p.fault.stage, p.fault.class), (Stage::Two, Class::TranslationTable));
    assert_eq!((p.fault.input_addr, p.fault.ipa), (0x1000, Some(0x4000_0000)));
    assert!(!p.overlay && !p.dirty_bit && !p.assured_only);
}

#[test]
fn hand_assembled_c_bad_cd_with_substream() {
    // [7:0] 0x0A C_BAD_CD; SSV 0x800; SubstreamID 3 at [31:12] = 0x3000; StreamID 0x20.
    let e = Event::decode(&[0x0000_0020_0000_380a, 0, 0, 0]);
    assert_eq!(
        e,
        Event::CBadCd(BadConfig {
            stream_id: 0x20,
            substream_id: Some(3)
        })
    );
}

/// Joins QEMU's eight 32-bit record words (`SMMUEvent.word[8]`) into the four 64-bit words the queue holds.
fn from_qemu_words(w: [u32; 8]) -> [u64; 4] {
    core::array::from_fn(|i| u64::from(w[2 * i]) | u64::from(w[2 * i + 1]) << 32)
}

#[test]
fn qemu_layout_f_translation() {
    // As QEMU's EVT_SET_* fill it: word[0] TYPE [7:0], SSV bit 11, SSID [31:12]; word[1] SID; word[2] STAG
    // [15:0], STALL bit 31; word[3] PNU bit 1, IND bit 2, RNW bit 3, S2 bit 7, CLASS [9:8]; word[4..5] input
    // address; word[6..7] the IPA (ADDR2), which QEMU writes whole, page offset included: record bits [203:192]
    // are not part of IPA[55:12] and must not show.
    let words = from_qemu_words([
        0x10,
        0x0000_0010,
        0,
        1 << 3 | 1 << 7 | 0b01 << 8,
        0x0000_2000,
        0,
        0x8765_4321,
        0x0000_0001,
    ]);
    assert_eq!(
        Event::decode(&words),
        Event::FTranslation(TranslationFault {
            stream_id: 0x10,
            substream_id: None,
            stag: None,
            access: Access {
                read: true,
                instruction: false,
                privileged: false
            },
            nsipa: false,
            stage: Stage::Two,
            class: Class::TranslationTable,
            impdef: 0,
            input_addr: 0x2000,
            ipa: Some(0x1_8765_4000),
        })
    );
}

#[test]
fn gerror_bits_match_the_register() {
    // §6.3.19 SMMU_GERROR: CMDQ_ERR [0], bit [1] RES0, EVENTQ_ABT_ERR [2], PRIQ_ABT_ERR [3],
    // MSI_CMDQ_ABT_ERR [4], MSI_EVENTQ_ABT_ERR [5], MSI_PRIQ_ABT_ERR [6], MSI_GERROR_ABT_ERR [7], SFM_ERR [8],
    // CMDQP_ERR [9], DPT_ERR [10], bits [31:11] RES0.
    assert_eq!(GlobalErrors::all().bits(), 0b111_1111_1101);
    assert_eq!(GlobalErrors::CMDQ_ERR.bits(), 1 << 0);
    assert_eq!(GlobalErrors::EVENTQ_ABT_ERR.bits(), 1 << 2);
    assert_eq!(GlobalErrors::PRIQ_ABT_ERR.bits(), 1 << 3);
    assert_eq!(GlobalErrors::MSI_CMDQ_ABT_ERR.bits(), 1 << 4);
    assert_eq!(GlobalErrors::MSI_EVENTQ_ABT_ERR.bits(), 1 << 5);
    assert_eq!(GlobalErrors::MSI_PRIQ_ABT_ERR.bits(), 1 << 6);
    assert_eq!(GlobalErrors::MSI_GERROR_ABT_ERR.bits(), 1 << 7);
    assert_eq!(GlobalErrors::SFM_ERR.bits(), 1 << 8);
    assert_eq!(GlobalErrors::CMDQP_ERR.bits(), 1 << 9);
    assert_eq!(GlobalErrors::DPT_ERR.bits(), 1 << 10);
    // The register block's field list (regs::GERROR) must agree.
    use crate::hw::regs::GERROR;
    assert_eq!(
        GERROR::CMDQ_ERR.mask << GERROR::CMDQ_ERR.shift,
        GlobalErrors::CMDQ_ERR.bits()
    );
    assert_eq!(
        GERROR::EVENTQ_ABT_ERR.mask << GERROR::EVENTQ_ABT_ERR.shift,
        GlobalErrors::EVENTQ_ABT_ERR.bits()
    );
    assert_eq!(
        GERROR::SFM_ERR.mask << GERROR::SFM_ERR.shift,
        GlobalErrors::SFM_ERR.bits()
    );
    assert_eq!(
        GERROR::DPT_ERR.mask << GERROR::DPT_ERR.shift,
        GlobalErrors::DPT_ERR.bits()
    );
}

#[test]
fn gerror_display() {
    assert_eq!(GlobalErrors::empty().to_string(), "none");
    assert_eq!(
        (GlobalErrors::CMDQ_ERR | GlobalErrors::SFM_ERR).to_string(),
        "CMDQ_ERR, SFM_ERR (service failure mode: the SMMU stopped translating)"
    );
    assert_eq!(active(0x4, 0x0).to_string(), "EVENTQ_ABT_ERR");
    assert_eq!(
        GlobalErrors::from_bits_retain(0x2 | 0x1).to_string(),
        "CMDQ_ERR, reserved 0x2"
    );
}

/// Spreads the low bits of `n` over GERROR bits 0, 1 (RES0), 2, 8, 10 and 11 (RES0).
fn spread(n: u32) -> u32 {
    [0, 1, 2, 8, 10, 11]
        .iter()
        .enumerate()
        .map(|(i, bit)| ((n >> i) & 1) << bit)
        .fold(0, |a, b| a | b)
}

#[test]
fn gerror_active_and_acknowledge_exhaustive() {
    for g in 0..64 {
        for n in 0..64 {
            let (gerror, gerrorn) = (spread(g), spread(n));
            let act = active(gerror, gerrorn);
            for bit in [0u32, 2, 8, 10] {
                let differs = (gerror ^ gerrorn) & (1 << bit) != 0;
                assert_eq!(
                    act.bits() & (1 << bit) != 0,
                    differs,
                    "bit {bit} of {gerror:#x}/{gerrorn:#x}"
                );
            }
            assert_eq!(act.bits() & (1 << 1 | 1 << 11), 0, "RES0 bits are never active");
            for w in 0..64 {
                let which = GlobalErrors::from_bits_truncate(spread(w));
                let ack = acknowledge(gerror, gerrorn, which);
                // Exactly the active errors in `which` are now inactive; the others keep their state.
                assert_eq!(active(gerror, ack), act - which);
                // Inactive errors are never toggled, and reserved bits are written as zero.
                assert_eq!((ack ^ gerrorn) & !act.bits() & GlobalErrors::all().bits(), 0);
                assert_eq!(ack & !GlobalErrors::all().bits(), 0);
            }
        }
    }
}

/// Every bit some architected field of record `number` occupies (§7.3 figures), written with the test encoder.
fn defined_bits(number: u8) -> [u64; 4] {
    let mut r = [0; 4];
    let mut set = |hi: u32, lo: u32| {
        put(
            &mut r,
            hi,
            lo,
            if hi - lo == 63 {
                u64::MAX
            } else {
                (1 << (hi - lo + 1)) - 1
            },
        )
    };
    set(7, 0);
    set(63, 32);
    match number {
        0x06 | 0x07 => {}
        0x08 => set(31, 12),
        _ => {
            set(11, 11);
            set(31, 12);
        }
    }
    match number {
        0x01 => {
            set(79, 64);
            set(99, 97);
            set(191, 128);
        }
        0x03 | 0x09 | 0x25 => {
            set(80, 64);
            set(247, 195);
        }
        0x05 => {
            set(67, 64);
            set(95, 92);
            set(191, 140);
        }
        0x07 => {
            set(99, 99);
            set(191, 128);
        }
        0x0b => {
            set(80, 64);
            set(99, 97);
            set(105, 102);
            set(191, 128);
            set(247, 195);
        }
        0x10..=0x12 => {
            set(79, 64);
            set(95, 95);
            set(99, 97);
            set(105, 102);
            set(127, 112);
            set(191, 128);
            set(247, 204);
        }
        0x13 => {
            set(79, 64);
            set(95, 95);
            set(99, 97);
            set(109, 102);
            set(127, 112);
            set(191, 128);
            set(247, 204);
        }
        0x20 => {
            set(95, 64);
            set(99, 97);
            set(103, 102);
            set(191, 128);
            set(247, 204);
        }
        0x21 => set(95, 64),
        0x24 => {
            set(99, 97);
            set(103, 101);
            set(115, 108);
            set(191, 140);
        }
        _ => {}
    }
    r
}

const ARCHITECTED: [u8; 19] = [
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x10, 0x11, 0x12, 0x13, 0x20, 0x21, 0x24, 0x25,
];

proptest! {
    #[test]
    fn decode_never_panics_and_keeps_the_number(raw in any::<[u64; 4]>()) {
        let e = Event::decode(&raw);
        prop_assert_eq!(e.event_type(), raw[0] as u8);
        let line = e.to_string();
        prop_assert!(line.starts_with(e.name()));
        prop_assert!(!line.contains('\n'));
        if ARCHITECTED.contains(&(raw[0] as u8)) {
            prop_assert_eq!(e.stream_id(), Some((raw[0] >> 32) as u32));
        } else {
            prop_assert_eq!(e.stream_id(), None);
        }
    }

    #[test]
    fn reserved_bits_are_ignored(raw in any::<[u64; 4]>(), pick in 0..ARCHITECTED.len()) {
        let number = ARCHITECTED[pick];
        let mut rec = raw;
        put(&mut rec, 7, 0, number.into());
        let defined = defined_bits(number);
        let mut clean = rec;
        for (word, mask) in clean.iter_mut().zip(defined) {
            *word &= mask;
        }
        prop_assert_eq!(Event::decode(&rec), Event::decode(&clean));
    }

    #[test]
    fn translation_fault_round_trips(
        sid in any::<u32>(), ssid in proptest::option::of(0u32..1 << 20), stag in proptest::option::of(any::<u16>()),
        read in any::<bool>(), instruction in any::<bool>(), privileged in any::<bool>(), nsipa in any::<bool>(),
        stage2 in any::<bool>(), class in 0u64..4, impdef in any::<u16>(), input in any::<u64>(),
        ipa_page in 0u64..1 << 44,
    ) {
        // Encoded field by field at the §7.3.13 positions, decoded, compared with the model.
        let mut r = head(0x10, sid, ssid);
        if let Some(stag) = stag {
            put(&mut r, 79, 64, stag.into());
            put(&mut r, 95, 95, 1);
        }
        put(&mut r, 97, 97, privileged.into());
        put(&mut r, 98, 98, instruction.into());
        put(&mut r, 99, 99, read.into());
        put(&mut r, 102, 102, nsipa.into());
        put(&mut r, 103, 103, stage2.into());
        put(&mut r, 105, 104, class);
        put(&mut r, 127, 112, impdef.into());
        put(&mut r, 191, 128, input);
        put(&mut r, 247, 204, ipa_page);
        let expected = TranslationFault {
            stream_id: sid,
            substream_id: ssid,
            stag,
            access: Access { read, instruction, privileged },
            nsipa,
            stage: if stage2 { Stage::Two } else { Stage::One },
            class: [Class::ContextDescriptor, Class::TranslationTable, Class::Input, Class::Reserved][class as usize],
            impdef,
            input_addr: input,
            ipa: stage2.then_some(ipa_page << 12),
        };
        let e = Event::decode(&r);
        prop_assert_eq!(e, Event::FTranslation(expected));
        prop_assert_eq!(e.address(), Some(input));
        prop_assert_eq!(e.substream_id(), ssid);
        prop_assert_eq!(e.stall_tag(), stag);
        let line = format!("{e}");
        prop_assert!(line.starts_with("F_TRANSLATION sid "));
    }
}
