//! The SMMU core against the model (`model`), driven through the public type as a user drives it.
extern crate std;

pub(crate) mod model;

pub(crate) use model::*;

use crate::hitless::EntryState;
use crate::hw::command::{Command, opcode};
use crate::hw::event::GlobalErrors;
use crate::hw::regs::CR0;
use crate::hw::ste::Ste;
use crate::mem::MAX_WRITEBACK_GRANULE;
use crate::queue::cmdq::{Batch, CommandQueueError};
use crate::queue::evtq::Overflow;
use crate::smmu::*;
use crate::stream::{StreamError, StreamTableFormat};
use crate::testing::HeapFrames;
use crate::{FrameAllocator, Iommu};
use crate::{Iova, PhysAddr};
use core::sync::atomic::Ordering;
use std::vec::Vec;
use tock_registers::interfaces::{Readable, Writeable};

#[test]
fn init_follows_the_architecture_order_and_attaches() {
    let frames = frames();
    let model = Model::start(frames);
    let smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
    let (abort, strtab, consumed) = model.seen.lock().unwrap().at_enable.clone().expect("SMMUEN was set");
    assert!(abort, "GBPA.ABORT set before translation was enabled");
    assert_eq!(strtab & !0x3f & ((1 << 52) - 1), smmu.configuration().stream_table_base);
    assert_eq!(strtab >> 62 & 1, 1, "RA");
    let read64 = |offset| {
        // SAFETY: inside the live block.
        unsafe {
            u64::from(reg32(model.base, offset).read_volatile())
                | u64::from(reg32(model.base, offset + 4).read_volatile()) << 32
        }
    };
    let eventq_base = read64(0xa0);
    assert_eq!(eventq_base >> 62, 0b01, "EVENTQ_BASE.WA is bit 62; bit 63 is RES0");
    assert_eq!(eventq_base & !(0b11 << 62) & !0x1f, smmu.configuration().eventq_base);
    assert_eq!(read64(0x90) >> 62, 0b01, "CMDQ_BASE.RA");
    // CFGI_ALL, TLBI_NSNH_ALL (no EL2 contexts: IDR0.HYP = 0), CMD_SYNC, all before SMMUEN.
    assert_eq!(consumed, [opcode::CFGI_ALL, opcode::TLBI_NSNH_ALL, opcode::SYNC]);
    assert!(matches!(
        smmu.stream_table_format(),
        StreamTableFormat::TwoLevel { sid_bits: 16, split: 8 }
    ));
    assert_eq!((smmu.cmdq_entries(), smmu.eventq_entries()), (256, 256));

    // SAFETY: the device behind the stream is trusted with all memory (a test of bypass).
    let report = unsafe { smmu.low_level().attach_bypass(0x10) }.unwrap();
    assert!(report.new_span);
    assert_eq!(
        smmu.low_level().ste(0x10),
        Ok(Ste::bypass_for(&smmu.features().entry_rules()))
    );
    assert_eq!(
        smmu.low_level().ste(0x11),
        Ok(Ste::abort()),
        "the rest of the new span aborts"
    );
    assert_eq!(
        smmu.low_level().ste(0x110),
        Ok(Ste::invalid()),
        "other spans do not exist yet"
    );
    // SAFETY: the device behind the stream is trusted with all memory (a test of bypass).
    assert_eq!(unsafe { smmu.low_level().attach_bypass(0x10) }.unwrap().syncs, 0);
    assert_eq!(
        smmu.low_level().attach_abort(1 << 16),
        Err(AttachError::Stream(StreamError::UnknownStream {
            sid: 1 << 16,
            sid_bits: 16
        }))
    );
    let before = model.seen.lock().unwrap().consumed.len();
    smmu.low_level().attach_abort(0x10).unwrap();
    let consumed = model.seen.lock().unwrap().consumed[before..].to_vec();
    assert_eq!(
        consumed,
        [opcode::CFGI_STE, opcode::SYNC],
        "bypass -> abort: one qword (QEMU has no IDR1.ATTR_TYPES_OVR, so bypass has no SHCFG to clear)"
    );

    let asid = smmu.low_level().allocate_asid().unwrap();
    let vmid = smmu.low_level().allocate_vmid().unwrap();
    assert_eq!((asid, vmid), (1, 1));
    assert_eq!(smmu.low_level().free_asid(asid), Ok(()));
    assert!(smmu.low_level().free_vmid(2).is_err());

    let smmu = smmu.shutdown(true).unwrap();
    assert!(!smmu.is_enabled());
    assert!(!smmu.global_bypass_aborts());
    assert_eq!(frames.live_blocks(), 0, "shutdown returns every table and queue");
}

#[test]
fn interrupts_are_enabled_after_the_queues_and_off_at_shutdown() {
    let frames = frames();
    let model = Model::start(frames);
    let irq_ctrl = || {
        // SAFETY: inside the live block.
        unsafe { reg32(model.base, 0x50).read_volatile() }
    };
    let smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
    assert_eq!(irq_ctrl(), 0, "polling by default");
    smmu.shutdown(true).unwrap();
    let options = InitOptions {
        interrupts: InterruptSources::EVENTQ | InterruptSources::GERROR,
        ..InitOptions::default()
    };
    let smmu = model.smmu().init(frames, &options).unwrap();
    assert_eq!(irq_ctrl(), 0b101, "EVENTQ_IRQEN and GERROR_IRQEN, never PRIQ_IRQEN");
    let cr0ack = model.seen.lock().unwrap().cr0ack_at_irq_enable;
    assert_eq!(
        cr0ack,
        Some(0b1100),
        "enabled once CMDQEN and EVENTQEN were acknowledged, before SMMUEN"
    );
    smmu.shutdown(true).unwrap();
    assert_eq!(irq_ctrl(), 0, "no interrupt outlives the driver");
}

#[test]
fn the_boards_coherency_decides_the_smmus_attributes() {
    let frames = frames();
    let model = Model::start(frames);
    let cr1 = || {
        // SAFETY: inside the live block.
        unsafe { reg32(model.base, 0x28).read_volatile() }
    };
    let mut smmu = model.smmu();
    assert!(
        !smmu.apply_board_coherency(true),
        "IDR0.COHACC = 1 and the board agrees"
    );
    let active = smmu.init(frames, &InitOptions::default()).unwrap();
    assert_eq!(
        cr1(),
        0xd75,
        "tables and queues write-back (0b01), inner shareable (0b11)"
    );
    let mut smmu = active.shutdown(true).unwrap();
    assert!(smmu.apply_board_coherency(false), "the board overrides IDR0.COHACC");
    assert!(!smmu.features().coherent);
    let active = smmu.init(frames, &InitOptions::default()).unwrap();
    assert_eq!(cr1(), 0, "tables and queues non-cacheable, non-shareable");
    active.shutdown(true).unwrap();
}

#[test]
fn global_errors() {
    let frames = frames();
    let model = Model::start(frames);
    let smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
    // An event queue abort is acknowledged and reported as lost events.
    model.set_gerror(GlobalErrors::EVENTQ_ABT_ERR.bits());
    let report = smmu.low_level().drain_events(|_| panic!("no records")).unwrap();
    assert_eq!(report.overflow, Some(Overflow::EventQueueAbort));
    assert!(
        smmu.handle_global_errors().unwrap().is_empty(),
        "acknowledged through GERRORN"
    );
    // An implementation that turned the event queue off on the abort: it is turned back on, and the call
    // returns only once CR0ACK says so.
    let regs = smmu.core.smmu.regs();
    regs.cr0.set(regs.cr0.get() & !CR0::EVENTQEN::SET.value);
    while regs.cr0ack.is_set(CR0::EVENTQEN) {
        std::thread::yield_now();
    }
    // (A GERROR bit is active while it differs from GERRORN's: toggled back, the abort is active again.)
    model.set_gerror(0);
    assert!(
        smmu.handle_global_errors()
            .unwrap()
            .contains(GlobalErrors::EVENTQ_ABT_ERR)
    );
    assert!(
        smmu.core.smmu.regs().cr0ack.is_set(CR0::EVENTQEN),
        "the event queue is on again"
    );
    smmu.low_level().drain_events(|_| {}).unwrap();
    // Service failure is fatal, with a message that says so (the abort bit left as acknowledged).
    model.set_gerror(GlobalErrors::SFM_ERR.bits());
    let error = smmu.handle_global_errors().unwrap_err();
    assert_eq!(error, GlobalError::ServiceFailure(GlobalErrors::SFM_ERR));
    assert!(std::format!("{error}").contains("needs a reset"));
}

#[test]
fn no_memory_changes_nothing_on_the_smmu() {
    let frames: &'static HeapFrames = std::boxed::Box::leak(std::boxed::Box::new(HeapFrames::with_limit(4096)));
    let model = Model::start(frames);
    let error = model.smmu().init(frames, &InitOptions::default()).err();
    assert!(matches!(error, Some(InitError::NoMemory(_))), "{error:?}");
    assert_eq!(frames.live_blocks(), 0);
    // SAFETY: inside the live block.
    let (cr0, gbpa) = unsafe {
        (
            reg32(model.base, 0x20).read_volatile(),
            reg32(model.base, 0x44).read_volatile(),
        )
    };
    assert_eq!((cr0, gbpa), (0, 0), "CR0 and GBPA untouched");
}

#[test]
fn flush_issues_the_least_invalidation_then_releases_tables() {
    use crate::pgtable::{Format, Gather, Granule, IoPageTable, Prot, Stage};
    let frames = frames();
    let model = Model::start(frames);
    let smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
    let rw = Prot::READ | Prot::WRITE | Prot::CACHEABLE;
    let format = Format {
        stage: Stage::One,
        granule: Granule::Size4K,
        input_bits: 39,
        output_bits: 44,
    };
    let mut table = IoPageTable::new(format, frames, true).unwrap();
    table
        .map(Iova(0x40_0000), PhysAddr(0x8000_0000), 16 * 4096, rw)
        .unwrap();
    let consumed = |model: &Model, from: usize| model.seen.lock().unwrap().consumed[from..].to_vec();

    // Part of a level-3 table: leaf-only range invalidation (RIL), one CMD_SYNC.
    let before = model.seen.lock().unwrap().consumed.len();
    let mut gather = Gather::default();
    table.unmap(Iova(0x40_0000), 4 * 4096, &mut gather).unwrap();
    let report = smmu
        .low_level()
        .flush(&mut table, gather, TlbContext::Stage1 { asid: 3, vmid: 0 })
        .unwrap();
    assert_eq!(consumed(&model, before), [opcode::TLBI_NH_VA, opcode::SYNC]);
    assert_eq!(
        issued_since(&model, before),
        [
            Issued::NhVa {
                vmid: 0,
                asid: 3,
                address: 0x40_0000
            },
            Issued::Sync
        ]
    );
    assert_eq!(report.syncs, 1);

    // The rest: the level-3 and level-2 tables are unlinked, freed only by the flush.
    let before = model.seen.lock().unwrap().consumed.len();
    let mut gather = Gather::default();
    table.unmap(Iova(0x40_0000), 16 * 4096, &mut gather).unwrap();
    assert_eq!(gather.freed_tables(), 2);
    let live = frames.live_blocks();
    smmu.low_level()
        .flush(&mut table, gather, TlbContext::Stage2 { vmid: 5, nested: true })
        .unwrap();
    assert_eq!(frames.live_blocks(), live - 2);
    let ops = consumed(&model, before);
    assert_eq!(ops.first(), Some(&opcode::TLBI_S2_IPA));
    assert_eq!(
        &ops[ops.len() - 3..],
        [opcode::SYNC, opcode::TLBI_NH_ALL, opcode::SYNC],
        "nested: the stage-2 invalidation completes before the combined entries go"
    );
    assert!(ops[..ops.len() - 3].iter().all(|&op| op == opcode::TLBI_S2_IPA));
    let issued = issued_since(&model, before);
    assert!(
        issued[..issued.len() - 3]
            .iter()
            .all(|i| matches!(*i, Issued::S2Ipa { vmid: 5, address } if address < 0x4000_0000)),
        "{issued:?}"
    );
    assert_eq!(issued[issued.len() - 2], Issued::NhAll { vmid: 5 });

    // Nothing gathered: nothing issued.
    let before = model.seen.lock().unwrap().consumed.len();
    smmu.low_level()
        .flush(&mut table, Gather::default(), TlbContext::Stage1 { asid: 3, vmid: 0 })
        .unwrap();
    assert_eq!(consumed(&model, before), []);
}

fn stage1_table(frames: &'static HeapFrames) -> crate::pgtable::IoPageTable<&'static HeapFrames> {
    use crate::pgtable::{Format, Granule, IoPageTable, Prot, Stage};
    let format = Format {
        stage: Stage::One,
        granule: Granule::Size4K,
        input_bits: 39,
        output_bits: 44,
    };
    let mut table = IoPageTable::new(format, frames, true).unwrap();
    table
        .map(
            Iova(0x40_0000),
            PhysAddr(0x8000_0000),
            16 * 4096,
            Prot::READ | Prot::WRITE | Prot::CACHEABLE,
        )
        .unwrap();
    table
}

#[test]
fn flush_keeps_the_unlinked_tables_when_the_invalidation_fails() {
    use crate::pgtable::Gather;
    let frames = frames();
    let model = Model::start(frames);
    let smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
    let mut table = stage1_table(frames);
    let mut gather = Gather::default();
    table.unmap(Iova(0x40_0000), 16 * 4096, &mut gather).unwrap();
    assert_eq!(gather.freed_tables(), 2);
    let live = frames.live_blocks();
    model.refuse.store(opcode::TLBI_NH_VA, Ordering::SeqCst);
    let context = TlbContext::Stage1 { asid: 3, vmid: 0 };
    let error = smmu.low_level().flush(&mut table, gather, context).unwrap_err();
    assert!(
        matches!(
            error.error,
            InvalidationError::Queue(CommandQueueError::Refused { count: 1, .. })
        ),
        "{error}"
    );
    assert_eq!(frames.live_blocks(), live, "no table freed: a walk may still reach it");
    assert_eq!(error.gather.freed_tables(), 2, "the tables come back to the caller");
    // Once the SMMU takes the command, the same gather completes the job.
    model.refuse.store(0, Ordering::SeqCst);
    smmu.low_level().flush(&mut table, error.gather, context).unwrap();
    assert_eq!(frames.live_blocks(), live - 2);
}

#[test]
fn flush_refuses_a_gather_another_table_filled() {
    use crate::pgtable::Gather;
    let frames = frames();
    let model = Model::start(frames);
    let smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
    let mut a = stage1_table(frames);
    let mut b = stage1_table(frames);
    let mut gather = Gather::default();
    a.unmap(Iova(0x40_0000), 16 * 4096, &mut gather).unwrap();
    assert_eq!(gather.freed_tables(), 2);
    let live = frames.live_blocks();
    let before = model.seen.lock().unwrap().consumed.len();
    let context = TlbContext::Stage1 { asid: 3, vmid: 0 };
    let refused = smmu.low_level().flush(&mut b, gather, context).unwrap_err();
    assert_eq!(
        refused.error,
        InvalidationError::ForeignGather {
            owner: a.id(),
            table: b.id()
        }
    );
    assert_eq!(model.seen.lock().unwrap().consumed.len(), before, "nothing issued");
    assert_eq!(frames.live_blocks(), live, "a's tables are not freed through b");
    // The gather comes back whole: flushed with its own table, it is invalidated, then freed.
    assert_eq!(refused.gather.freed_tables(), 2);
    smmu.low_level().flush(&mut a, refused.gather, context).unwrap();
    assert_eq!(frames.live_blocks(), live - 2);
    assert!(model.seen.lock().unwrap().consumed.len() > before);
}

#[test]
fn a_failed_ste_invalidation_stops_the_hitless_writer() {
    use crate::hw::ste::{Config, EXAMPLE_S2, Ste};
    let frames = frames();
    let model = Model::start(frames);
    let smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
    smmu.low_level().attach_abort(0x10).unwrap();
    // abort -> stage 2 takes two steps: the qwords abort does not read (sync), then qword 0 (sync). The first
    // CFGI_STE is refused: the writer must not go on to qword 0.
    model.refuse.store(opcode::CFGI_STE, Ordering::SeqCst);
    let target = Ste::stage2(&EXAMPLE_S2, &smmu.features().entry_rules()).unwrap();
    let error = smmu.core.install_ste(0x10, &target).unwrap_err();
    let AttachError::Invalidation(failed) = error else {
        panic!("{error:?}")
    };
    assert_eq!((failed.syncs, failed.left), (0, EntryState::Old));
    assert!(matches!(failed.error, CommandQueueError::Refused { .. }));
    let left = smmu.low_level().ste(0x10).unwrap();
    assert_eq!(left.config(), Config::Abort, "qword 0 untouched after the failed sync");
    assert_eq!(left.0[1..], target.0[1..], "what the first step wrote stays");
    assert!(std::format!("{error}").contains("the old configuration"));
    model.refuse.store(0, Ordering::SeqCst);
    assert_eq!(
        smmu.core.install_ste(0x10, &target).unwrap().syncs,
        1,
        "the rest, on retry"
    );
    assert_eq!(smmu.low_level().ste(0x10), Ok(target));
}

#[test]
fn init_fails_when_its_invalidation_is_refused() {
    let frames = frames();
    let model = Model::start(frames);
    model.refuse.store(opcode::CFGI_ALL, Ordering::SeqCst);
    let error = model.smmu().init(frames, &InitOptions::default()).err();
    assert!(
        matches!(error, Some(InitError::Invalidation(CommandQueueError::Refused { .. }))),
        "{error:?}"
    );
    // SAFETY: inside the live block.
    let cr0 = unsafe { reg32(model.base, 0x20).read_volatile() };
    assert_eq!(cr0 & 1, 0, "translation is not enabled over stale cached state");
}

#[test]
fn el2_stage1_is_invalidated_with_el2_commands_only_where_the_smmu_has_el2_contexts() {
    use crate::pgtable::Gather;
    let frames = frames();
    // QEMU's SMMU has no IDR0.HYP: an EL2 context is refused, and nothing is issued.
    let model = Model::start(frames);
    let smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
    let mut table = stage1_table(frames);
    let mut gather = Gather::default();
    table.unmap(Iova(0x40_0000), 4096, &mut gather).unwrap();
    let before = model.seen.lock().unwrap().consumed.len();
    let error = smmu
        .low_level()
        .flush(&mut table, gather, TlbContext::Stage1El2)
        .unwrap_err();
    assert_eq!(error.error, InvalidationError::NoEl2Contexts);
    assert_eq!(model.seen.lock().unwrap().consumed.len(), before);
    smmu.shutdown(false).unwrap();
    drop(model);

    // With IDR0.HYP (bit 9): TLBI_EL2_VA, and init's invalidation includes TLBI_EL2_ALL.
    let model = Model::start_with(frames, IDRS[0].1 | 1 << 9);
    let smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
    let at_init = model.seen.lock().unwrap().consumed.clone();
    assert!(at_init.contains(&opcode::TLBI_EL2_ALL));
    let before = at_init.len();
    smmu.low_level()
        .flush(&mut table, error.gather, TlbContext::Stage1El2)
        .unwrap();
    let ops = model.seen.lock().unwrap().consumed[before..].to_vec();
    assert_eq!(ops, [opcode::TLBI_EL2_VA, opcode::SYNC]);
}

#[test]
fn an_mmu700_gets_a_cmd_sync_within_every_63_commands() {
    let frames = frames();
    // IIDR of an Arm MMU-700 r0p0: ProductID 0x487, implementer 0x43B.
    let model = Model::start(frames);
    // SAFETY: inside the live block (IIDR at 0x18; the model never writes it).
    unsafe { reg32(model.base, 0x18).write_volatile(0x487 << 20 | 0x43b) };
    let smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
    assert!(smmu.features().quirks.contains(Quirks::CMDQ_SYNC_EVERY_63));
    let before = model.seen.lock().unwrap().consumed.len();
    let mut batch = Batch::new();
    while !batch.is_full() {
        batch.push(&Command::CfgiSte { sid: 1, leaf: true }).unwrap();
    }
    let report = smmu.low_level().submit(&batch).unwrap();
    assert_eq!((report.commands, report.syncs), (66, 2));
    let ops = model.seen.lock().unwrap().consumed[before..].to_vec();
    let runs: Vec<usize> = ops.split(|&op| op == opcode::SYNC).map(<[u8]>::len).collect();
    assert_eq!(runs, [63, 1, 0], "never more than 63 commands without a CMD_SYNC");
}

#[test]
fn a_small_event_queue_shares_no_cache_line_with_memory_the_cpu_writes() {
    // The SMMU writes the event queue; a non-coherent SMMU's records would be overwritten by the write-back of
    // a dirty line the CPU shares with them (a command, an STE of a neighbouring block). Whatever its size, the
    // queue's block spans whole lines of the largest cache writeback granule (CTR_EL0.CWG, at most 2 KiB).
    let frames = frames();
    let model = Model::start(frames);
    let mut smmu = model.smmu();
    smmu.apply_board_coherency(false);
    let features = *smmu.features();
    for log2 in [0u8, 1, 4, 6] {
        let options = InitOptions {
            eventq_log2_max: log2,
            cmdq_log2_max: log2,
            ..InitOptions::default()
        };
        let (cmdq, evtq, _, evtq_log2) = init::allocate_queues(&frames, &features, &options).unwrap();
        assert_eq!(evtq_log2, log2);
        let block = evtq.memory();
        assert!(
            block.phys.0.is_multiple_of(MAX_WRITEBACK_GRANULE as u64)
                && block.size.is_multiple_of(MAX_WRITEBACK_GRANULE),
            "{log2}: event queue block at {:#x}, {:#x} bytes",
            block.phys.0,
            block.size
        );
        assert_eq!(evtq.geometry().entries(), 1 << log2, "the queue itself keeps its size");
        // SAFETY: never given to the SMMU.
        unsafe {
            frames.free(cmdq.into_memory());
            frames.free(evtq.into_memory());
        }
    }
}

/// The public `submit` vets the whole batch before it writes any of it: a reserved opcode (or an MSI) is
/// refused and the SMMU sees nothing; `submit_unvetted` queues it, and the SMMU refuses it (CERROR_ILL).
#[test]
fn submit_vets_the_whole_batch_before_writing_any_of_it() {
    let frames = frames();
    let model = Model::start(frames);
    let smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
    let mut batch = Batch::new();
    batch.push(&Command::CfgiAll).unwrap();
    batch.push_words([0x7f, 0]).unwrap();
    batch.push(&Command::TlbiNsnhAll).unwrap();
    let before = model.seen.lock().unwrap().commands.len();
    assert_eq!(
        smmu.low_level().submit(&batch),
        Err(CommandQueueError::NotAllowed {
            index: 1,
            reason: crate::hw::command::Unvetted::Unmodelled { opcode: 0x7f }
        })
    );
    assert_eq!(issued_since(&model, before), [], "nothing of the batch written");
    model.refuse.store(0x7f, Ordering::SeqCst);
    // SAFETY: CFGI_ALL, TLBI_NSNH_ALL and a reserved opcode the model refuses: nothing writes memory.
    let submitted = unsafe { smmu.low_level().submit_unvetted(&batch) };
    assert!(
        matches!(submitted, Err(CommandQueueError::Refused { count: 1, .. })),
        "{submitted:?}"
    );
    assert_eq!(
        issued_since(&model, before)[..2],
        [Issued::CfgiAll, Issued::Sync],
        "the refused command replaced with a CMD_SYNC"
    );
}

/// Dropping the driver turns translation off with every incoming transaction aborting (GBPA.ABORT = 1 before
/// SMMUEN = 0), and only once SMMUEN = 0 is acknowledged do the domains' page tables go back to their memory.
/// An SMMU that does not acknowledge keeps translating, so its tables stay allocated (leaked).
#[test]
fn dropping_the_driver_turns_translation_off_aborting_before_any_page_table_goes_back() {
    let frames = frames();
    let rw = crate::pgtable::Prot::READ | crate::pgtable::Prot::WRITE;
    let options = crate::domain::Stage1Options {
        input_bits: 39,
        el2: false,
    };
    let root_of = |smmu: &mut Iommu<&'static HeapFrames>| {
        let d = smmu.create_stage1(frames, options).unwrap();
        smmu.map(d, Iova(0x40_0000), PhysAddr(0x8000_0000), 0x1000, rw).unwrap();
        smmu.attach(d, 0x10).unwrap();
        smmu.domain_table(d).unwrap().root()
    };
    let registers = |model: &Model| {
        // SAFETY: the model's live register block.
        unsafe {
            (
                reg32(model.base, 0x20).read_volatile(),
                reg32(model.base, 0x44).read_volatile(),
            )
        }
    };

    let model = Model::start(frames);
    let mut smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
    let root = root_of(&mut smmu);
    drop(smmu);
    let (cr0, gbpa) = registers(&model);
    assert_eq!(cr0, 0, "translation, the queues and nothing else");
    assert_ne!(gbpa & GBPA::ABORT::SET.value, 0, "incoming transactions abort");
    assert!(frames.phys_to_virt(root).is_none(), "back once translation is off");

    let model = Model::start(frames);
    let mut smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
    let root = root_of(&mut smmu);
    model.stop.store(true, Ordering::SeqCst);
    std::thread::sleep(std::time::Duration::from_millis(20));
    drop(smmu);
    assert_ne!(
        registers(&model).0 & 1,
        0,
        "still translating: the SMMU did not acknowledge"
    );
    assert!(frames.phys_to_virt(root).is_some(), "the table it may walk is kept");
}

/// Review finding 8 (same root cause as finding 1, on a documented error path). `shutdown` says that when the
/// SMMU does not acknowledge, "the memory is then kept (leaked), since the SMMU may still read it". The stream
/// table and queues are, but `shutdown` consumed the `Iommu`, and its `?` drops the domains: every
/// domain's page tables go back to the allocator while SMMUEN is still 1 and the STEs name them.
#[test]
fn finding8_a_shutdown_that_times_out_keeps_the_page_tables_the_smmu_may_still_walk() {
    let frames = frames();
    let model = Model::start(frames);
    let smmu = model.smmu().init(frames, &InitOptions::default()).unwrap();
    let d = smmu
        .create_stage1(
            frames,
            crate::domain::Stage1Options {
                input_bits: 39,
                el2: false,
            },
        )
        .unwrap();
    smmu.map(
        d,
        Iova(0x40_0000),
        PhysAddr(0x8000_0000),
        0x1000,
        crate::pgtable::Prot::READ | crate::pgtable::Prot::WRITE,
    )
    .unwrap();
    smmu.attach(d, 0x10).unwrap();
    let root = smmu.domain_table(d).unwrap().root();
    // The SMMU stops answering (its registers keep their values; no handshake completes).
    model.stop.store(true, Ordering::SeqCst);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let error = smmu.shutdown(false).err();
    assert!(matches!(error, Some(InitError::Timeout { .. })), "{error:?}");
    // SAFETY: the model's register block, still allocated.
    let translating = unsafe { reg32(model.base, 0x20).read_volatile() } & 1 != 0;
    assert!(
        !(translating && frames.phys_to_virt(root).is_none()),
        "the shutdown timed out with SMMUEN = 1, and stream 0x10's page table at {root} went back to the allocator"
    );
}
