//! Hitless update of a live 64-byte table entry (STE or CD): the SMMU, which may read the entry at any moment,
//! only ever sees the old entry, the new one, or (when no other order exists) an invalid one, never a mix that is
//! illegal or more permissive than either.
//!
//! A type says which bits the SMMU reads for a given entry ([`UsedBits`]). From the live and the target entry the
//! writer finds the qwords whose *used* bits change:
//! - none: write the changed (unused) bits; one sync if anything changed;
//! - exactly one ("critical"): write every other qword as the union of the target and the bits the live entry
//!   still uses, sync, write the critical qword whole, sync, then clear what only the old entry read, sync;
//! - more: break: write V = 0 in qword 0, sync, write qwords 1..7, sync, write qword 0, sync.
//!
//! Each sync is the caller's invalidation (CFGI_STE / CFGI_CD + CMD_SYNC). Only changed qwords are written and a
//! sync follows only a change, so sync counts are exact.
//!
//! A sync can fail (the invalidation was refused or timed out). The writer then stops at once: the entry is left
//! as it was when that sync was issued, which by construction the SMMU may read safely (the old configuration,
//! the new one, or invalid), and [`UpdateFailed`] says which, so the caller knows what the SMMU may be using.

/// Which bits of an entry the SMMU reads, given the entry's own configuration.
pub trait UsedBits {
    /// The V bit, in qword 0.
    const VALID: u64;
    /// The mask of bits the SMMU reads when the entry holds `words` (with V = 0: only V).
    fn used_bits(words: &[u64; 8]) -> [u64; 8];
}

/// Where the writer's stores and invalidations go.
pub trait EntryWriter {
    /// Why a sync failed.
    type Error;
    /// Stores one qword of the live entry (a single 64-bit store).
    fn write_qword(&mut self, index: usize, value: u64);
    /// Makes the stores so far visible to the SMMU and invalidates its cached copy.
    ///
    /// # Errors
    /// When the invalidation could not be completed; the writer then writes nothing more.
    fn sync(&mut self) -> Result<(), Self::Error>;
}

/// What a live entry holds, judged by the bits the SMMU reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryState {
    /// The configuration it held before the update.
    Old,
    /// The target configuration.
    New,
    /// V = 0: every access through it aborts (and is reported as C_BAD_STE / C_BAD_CD).
    Invalid,
}

impl core::fmt::Display for EntryState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            EntryState::Old => "the old configuration",
            EntryState::New => "the new configuration",
            EntryState::Invalid => "invalid (V = 0)",
        })
    }
}

/// An update stopped at a failed sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpdateFailed<E> {
    /// The sync's error.
    pub error: E,
    /// Syncs that completed before it.
    pub syncs: u32,
    /// What the entry in memory holds now: what the failed sync was to announce. Whether the SMMU has fetched it
    /// is unknown; it may still use what the last completed sync announced.
    pub left: EntryState,
}

impl<E: core::fmt::Display> core::fmt::Display for UpdateFailed<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "a sync failed ({}) after {} completed; the entry in memory holds {}",
            self.error, self.syncs, self.left
        )
    }
}

/// The path an update took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateKind {
    /// The entry already was the target.
    NoChange,
    /// Only bits the SMMU does not read changed, or one qword carried every used change.
    Hitless,
    /// More than one qword's used bits changed: the entry was made invalid in between.
    Breaking,
}

struct Tracked<'a, W: EntryWriter> {
    live: [u64; 8],
    writer: &'a mut W,
    dirty: bool,
    syncs: u32,
}

impl<W: EntryWriter> Tracked<'_, W> {
    fn set(&mut self, index: usize, value: u64) {
        if self.live[index] != value {
            self.live[index] = value;
            self.writer.write_qword(index, value);
            self.dirty = true;
        }
    }

    fn sync(&mut self) -> Result<(), W::Error> {
        if self.dirty {
            self.writer.sync()?;
            self.syncs += 1;
            self.dirty = false;
        }
        Ok(())
    }
}

/// Which configuration `words` holds, judged by the bits the SMMU reads.
fn state_of<E: UsedBits>(words: &[u64; 8], old: &[u64; 8]) -> EntryState {
    if words[0] & E::VALID == 0 {
        return EntryState::Invalid;
    }
    let used = E::used_bits(old);
    if E::used_bits(words) == used && (0..8).all(|i| (words[i] ^ old[i]) & used[i] == 0) {
        EntryState::Old
    } else {
        EntryState::New
    }
}

/// Rewrites the live entry `live` into `target` through `writer`, hitlessly when the architecture allows.
///
/// # Errors
/// [`UpdateFailed`] when a sync fails: nothing is written after it, and the error says what the entry holds.
pub fn update_entry<E: UsedBits, W: EntryWriter>(
    live: &[u64; 8],
    target: &[u64; 8],
    writer: &mut W,
) -> Result<UpdateKind, UpdateFailed<W::Error>> {
    if live == target {
        return Ok(UpdateKind::NoChange);
    }
    let mut t = Tracked {
        live: *live,
        writer,
        dirty: false,
        syncs: 0,
    };
    match steps::<E, W>(live, target, &mut t) {
        Ok(kind) => Ok(kind),
        Err(error) => Err(UpdateFailed {
            error,
            syncs: t.syncs,
            left: state_of::<E>(&t.live, live),
        }),
    }
}

fn steps<E: UsedBits, W: EntryWriter>(
    live: &[u64; 8],
    target: &[u64; 8],
    t: &mut Tracked<'_, W>,
) -> Result<UpdateKind, W::Error> {
    let used_live = E::used_bits(live);
    let used_target = E::used_bits(target);
    // The entry the SMMU would read if every qword held the target but the bits the live entry uses kept their
    // live values: the union, safe to write while the live configuration is in force.
    let union: [u64; 8] = core::array::from_fn(|i| (target[i] & !used_live[i]) | (live[i] & used_live[i]));
    // Qwords in which a bit the target reads still differs after that: each needs its own moment. Bits only the
    // live entry reads are left alone until the target configuration no longer reads them.
    let critical: heapless::Vec<usize, 8> = (0..8)
        .filter(|&i| (union[i] ^ target[i]) & used_target[i] != 0)
        .collect();
    match critical.len() {
        0 => {
            for (i, &word) in target.iter().enumerate() {
                t.set(i, word);
            }
            t.sync()?;
            Ok(UpdateKind::Hitless)
        }
        1 => {
            let c = critical[0];
            for i in (0..8).filter(|&i| i != c) {
                t.set(i, union[i]);
            }
            t.sync()?;
            t.set(c, target[c]);
            t.sync()?;
            for (i, &word) in target.iter().enumerate() {
                t.set(i, word);
            }
            t.sync()?;
            Ok(UpdateKind::Hitless)
        }
        _ => {
            t.set(0, live[0] & !E::VALID);
            t.sync()?;
            for (i, &word) in target.iter().enumerate().skip(1) {
                t.set(i, word);
            }
            t.sync()?;
            t.set(0, target[0]);
            t.sync()?;
            Ok(UpdateKind::Breaking)
        }
    }
}

#[cfg(test)]
mod tests {
    //! Every transition between abort, bypass, stage 1, stage 2, nested and stage 1 with another CD table, and the
    //! CD transitions, run against a fake writer that checks after *every* qword write that the SMMU, reading the
    //! entry at that moment, would see either the old or the new configuration (or an invalid entry), and counts
    //! the syncs.
    extern crate std;

    use super::*;
    use crate::hw::cd::{self, Cd, CdConfig};
    use crate::hw::ste::{Cacheability, CdTableLayout, DefaultSubstream, Stage1Config, Stage2Config, Ste};
    use crate::mem::PhysAddr;
    use std::vec;
    use std::vec::Vec;

    const S1: Stage1Config = crate::hw::ste::EXAMPLE_S1;
    const S2: Stage2Config = crate::hw::ste::EXAMPLE_S2;
    const CD: CdConfig = cd::EXAMPLE;

    /// A fake entry plus an SMMU that may fetch it at any moment, one qword at a time: between two syncs it may
    /// combine, qword by qword, any of the values each qword held since the last sync. At every sync every such
    /// combination must be legal: invalid (V = 0), or the old or the new configuration on exactly the bits that
    /// configuration reads. (The window idea is the STE helper's, whose encoders were otherwise not merged.)
    struct Checker<E: UsedBits> {
        entry: [u64; 8],
        old: [u64; 8],
        new: [u64; 8],
        window: [Vec<u64>; 8],
        syncs: u32,
        dirty: bool,
        _kind: core::marker::PhantomData<E>,
    }

    fn behaves_as<E: UsedBits>(entry: &[u64; 8], reference: &[u64; 8]) -> bool {
        let used = E::used_bits(reference);
        E::used_bits(entry) == used && (0..8).all(|i| (entry[i] ^ reference[i]) & used[i] == 0)
    }

    impl<E: UsedBits> Checker<E> {
        fn check_window(&self) {
            let combinations: usize = self.window.iter().map(Vec::len).product();
            assert!(combinations <= 1 << 12, "{combinations} states between two syncs");
            for n in 0..combinations {
                let mut x = [0u64; 8];
                let mut k = n;
                for (i, values) in self.window.iter().enumerate() {
                    x[i] = values[k % values.len()];
                    k /= values.len();
                }
                let invalid = x[0] & E::VALID == 0;
                assert!(
                    invalid || behaves_as::<E>(&x, &self.old) || behaves_as::<E>(&x, &self.new),
                    "before sync {} the SMMU could read a mix:\n old {:x?}\n mix {:x?}\n new {:x?}",
                    self.syncs,
                    self.old,
                    x,
                    self.new
                );
            }
        }
    }

    impl<E: UsedBits> EntryWriter for Checker<E> {
        type Error = core::convert::Infallible;

        fn write_qword(&mut self, index: usize, value: u64) {
            assert_ne!(self.entry[index], value, "qword {index} written without a change");
            self.entry[index] = value;
            if !self.window[index].contains(&value) {
                self.window[index].push(value);
            }
            self.dirty = true;
        }

        fn sync(&mut self) -> Result<(), Self::Error> {
            assert!(self.dirty, "sync {} without a write before it", self.syncs);
            self.check_window();
            self.syncs += 1;
            self.window = self.entry.map(|q| vec![q]);
            self.dirty = false;
            Ok(())
        }
    }

    /// Runs one transition and returns (kind, syncs).
    fn transition<E: UsedBits>(old: [u64; 8], new: [u64; 8]) -> (UpdateKind, u32) {
        let mut checker = Checker::<E> {
            entry: old,
            old,
            new,
            window: old.map(|q| vec![q]),
            syncs: 0,
            dirty: false,
            _kind: core::marker::PhantomData,
        };
        let Ok(kind) = update_entry::<E, _>(&old, &new, &mut checker);
        assert!(!checker.dirty, "writes not followed by a sync");
        assert_eq!(checker.entry, new, "final entry");
        (kind, checker.syncs)
    }

    fn ste(old: Ste, new: Ste) -> (UpdateKind, u32) {
        transition::<Ste>(old.0, new.0)
    }

    fn s1() -> Ste {
        Ste::stage1(&S1, &crate::hw::ste::EXAMPLE_RULES).unwrap()
    }
    fn s2() -> Ste {
        Ste::stage2(&S2, &crate::hw::ste::EXAMPLE_RULES).unwrap()
    }
    fn nested() -> Ste {
        Ste::nested(&S1, &S2, &crate::hw::ste::EXAMPLE_RULES).unwrap()
    }

    use UpdateKind::{Breaking, Hitless, NoChange};

    #[test]
    fn identical_entries_cost_nothing() {
        for e in [
            Ste::abort(),
            Ste::bypass_for(&crate::hw::ste::EXAMPLE_RULES),
            s1(),
            s2(),
            nested(),
        ] {
            assert_eq!(ste(e, e), (NoChange, 0));
        }
    }

    #[test]
    fn abort_and_bypass() {
        // abort -> bypass: SHCFG first (unused by abort), then Config.
        assert_eq!(
            ste(Ste::abort(), Ste::bypass_for(&crate::hw::ste::EXAMPLE_RULES)),
            (Hitless, 2)
        );
        // bypass -> abort: Config first, then SHCFG cleared once abort no longer reads it.
        assert_eq!(
            ste(Ste::bypass_for(&crate::hw::ste::EXAMPLE_RULES), Ste::abort()),
            (Hitless, 2)
        );
    }

    #[test]
    fn abort_and_bypass_without_attribute_override_change_one_qword() {
        // IDR1.ATTR_TYPES_OVR = 0 (QEMU): SHCFG is RES0 and stays 0, so only Config changes.
        let rules = crate::hw::ste::EntryRules {
            attribute_types_override: false,
            ..crate::hw::ste::EXAMPLE_RULES
        };
        let bypass = Ste::bypass_for(&rules);
        assert_eq!(bypass.0[1], 0, "no SHCFG");
        assert_eq!(ste(Ste::abort(), bypass), (Hitless, 1));
        assert_eq!(ste(bypass, Ste::abort()), (Hitless, 1));
    }

    #[test]
    fn invalid_to_anything_and_back() {
        for e in [
            Ste::abort(),
            Ste::bypass_for(&crate::hw::ste::EXAMPLE_RULES),
            s1(),
            s2(),
            nested(),
        ] {
            let (kind, syncs) = ste(Ste::invalid(), e);
            assert_eq!(kind, Hitless);
            assert_eq!(syncs, if e.0[1..] == [0; 7] { 1 } else { 2 }, "{e:x?}");
            let (kind, syncs) = ste(e, Ste::invalid());
            assert_eq!(kind, Hitless);
            assert_eq!(syncs, if e.0[1..] == [0; 7] { 1 } else { 2 }, "{e:x?}");
        }
    }

    #[test]
    fn stage1_and_abort_or_bypass() {
        assert_eq!(ste(Ste::abort(), s1()), (Hitless, 2));
        assert_eq!(ste(s1(), Ste::abort()), (Hitless, 2));
        // bypass -> S1: Config and SHCFG change together in hitless order? SHCFG is read by bypass only.
        assert_eq!(ste(Ste::bypass_for(&crate::hw::ste::EXAMPLE_RULES), s1()), (Hitless, 3));
        assert_eq!(ste(s1(), Ste::bypass_for(&crate::hw::ste::EXAMPLE_RULES)), (Hitless, 3));
    }

    #[test]
    fn stage1_default_substream_change() {
        let bypass_dss = Ste::stage1(
            &Stage1Config {
                default_substream: DefaultSubstream::Bypass,
                ..S1
            },
            &crate::hw::ste::EXAMPLE_RULES,
        )
        .unwrap();
        // Only qword 1 changes (S1DSS and SHCFG): one critical qword.
        assert_eq!(ste(s1(), bypass_dss), (Hitless, 1));
        assert_eq!(ste(bypass_dss, s1()), (Hitless, 1));
    }

    #[test]
    fn stage1_with_another_cd_table() {
        let other = Ste::stage1(
            &Stage1Config {
                cd_table: PhysAddr(0x4300_0040),
                ..S1
            },
            &crate::hw::ste::EXAMPLE_RULES,
        )
        .unwrap();
        assert_eq!(ste(s1(), other), (Hitless, 1));
        // A new table format and size as well (still all in qword 0).
        let two_level = Ste::stage1(
            &Stage1Config {
                cd_table: PhysAddr(0x4300_0000),
                cd_max_log2: 16,
                layout: CdTableLayout::TwoLevel64K,
                ..S1
            },
            &crate::hw::ste::EXAMPLE_RULES,
        )
        .unwrap();
        assert_eq!(ste(s1(), two_level), (Hitless, 1));
        // Another CD table *and* other walk attributes: qwords 0 and 1 both change what stage 1 reads.
        let other_attributes = Ste::stage1(
            &Stage1Config {
                cd_table: PhysAddr(0x4300_0000),
                cacheability: Cacheability::NonCacheable,
                ..S1
            },
            &crate::hw::ste::EXAMPLE_RULES,
        )
        .unwrap();
        assert_eq!(ste(s1(), other_attributes), (Breaking, 3));
    }

    #[test]
    fn stage2_and_abort_or_bypass() {
        assert_eq!(ste(Ste::abort(), s2()), (Hitless, 2));
        assert_eq!(ste(s2(), Ste::abort()), (Hitless, 2));
        // SHCFG is the same (use incoming) in bypass and S2: Config is the only used change that must come last.
        assert_eq!(ste(Ste::bypass_for(&crate::hw::ste::EXAMPLE_RULES), s2()), (Hitless, 2));
        assert_eq!(ste(s2(), Ste::bypass_for(&crate::hw::ste::EXAMPLE_RULES)), (Hitless, 2));
    }

    #[test]
    fn stage2_with_a_new_vmid_or_table() {
        let other_vmid = Ste::stage2(&Stage2Config { vmid: 8, ..S2 }, &crate::hw::ste::EXAMPLE_RULES).unwrap();
        assert_eq!(ste(s2(), other_vmid), (Hitless, 1));
        let other_table = Ste::stage2(
            &Stage2Config {
                table: PhysAddr(0x4400_0000),
                ..S2
            },
            &crate::hw::ste::EXAMPLE_RULES,
        )
        .unwrap();
        assert_eq!(ste(s2(), other_table), (Hitless, 1));
        // A new VMID and a new table at once: two qwords, so the entry must break.
        let both = Ste::stage2(
            &Stage2Config {
                vmid: 9,
                table: PhysAddr(0x4400_0000),
                ..S2
            },
            &crate::hw::ste::EXAMPLE_RULES,
        )
        .unwrap();
        assert_eq!(ste(s2(), both), (Breaking, 3));
    }

    #[test]
    fn stage1_and_stage2() {
        // Stage 1's VMID (0) differs from stage 2's and Config differs: two critical qwords.
        assert_eq!(ste(s1(), s2()), (Breaking, 3));
        assert_eq!(ste(s2(), s1()), (Breaking, 3));
    }

    #[test]
    fn nesting_and_unnesting() {
        // S2 -> nested: stage 2 reads neither the CD table pointer (qword 0) nor the stage-1 fields (qword 1), so
        // they go in first and Config last: hitless.
        assert_eq!(ste(s2(), nested()), (Hitless, 2));
        // nested -> S2: Config first, then the stage-1 fields nothing reads any more.
        assert_eq!(ste(nested(), s2()), (Hitless, 2));
        // S1 (VMID 0) -> nested: Config, and VMID with the stage-2 fields.
        assert_eq!(ste(s1(), nested()), (Breaking, 3));
        assert_eq!(ste(nested(), s1()), (Breaking, 3));
    }

    fn cd(old: Cd, new: Cd) -> (UpdateKind, u32) {
        transition::<Cd>(old.0, new.0)
    }

    #[test]
    fn context_descriptors() {
        let valid = Cd::new(&CD, &crate::hw::ste::EXAMPLE_RULES).unwrap();
        // invalid -> valid: TTB0 and MAIR first, then qword 0 with V.
        assert_eq!(cd(Cd::invalid(), valid), (Hitless, 2));
        // valid -> invalid: V cleared first, then the rest.
        assert_eq!(cd(valid, Cd::invalid()), (Hitless, 2));
        // A new ASID lives in qword 0 only.
        assert_eq!(
            cd(
                valid,
                Cd::new(&CdConfig { asid: 2, ..CD }, &crate::hw::ste::EXAMPLE_RULES).unwrap()
            ),
            (Hitless, 1)
        );
        // A new TTB0 lives in qword 1 only.
        assert_eq!(
            cd(
                valid,
                Cd::new(
                    &CdConfig {
                        table: PhysAddr(0x4900_0000),
                        ..CD
                    },
                    &crate::hw::ste::EXAMPLE_RULES
                )
                .unwrap()
            ),
            (Hitless, 1)
        );
        // A new ASID and a new table: not hitless.
        let both = Cd::new(
            &CdConfig {
                asid: 3,
                table: PhysAddr(0x4900_0000),
                ..CD
            },
            &crate::hw::ste::EXAMPLE_RULES,
        )
        .unwrap();
        assert_eq!(cd(valid, both), (Breaking, 3));
    }

    proptest::proptest! {
        #[test]
        fn every_transition_is_safe_at_every_write(
            a in 0usize..6, b in 0usize..6,
            vmid_a: u16, vmid_b: u16,
            table_a in 0u64..16, table_b in 0u64..16,
            dss_a in 0usize..3, dss_b in 0usize..3,
        ) {
            let build = |kind: usize, vmid: u16, table: u64, dss: usize| {
                let s1 = Stage1Config {
                    cd_table: PhysAddr(0x4000_0000 + table * 0x40),
                    default_substream: [DefaultSubstream::Terminate, DefaultSubstream::Bypass, DefaultSubstream::Substream0][dss],
                    ..S1
                };
                let s2 = Stage2Config { vmid, table: PhysAddr(0x5000_0000 + table * 0x1000), ..S2 };
                match kind {
                    0 => Ste::invalid(),
                    1 => Ste::abort(),
                    2 => Ste::bypass_for(&crate::hw::ste::EXAMPLE_RULES),
                    3 => Ste::stage1(&s1, &crate::hw::ste::EXAMPLE_RULES).unwrap(),
                    4 => Ste::stage2(&s2, &crate::hw::ste::EXAMPLE_RULES).unwrap(),
                    _ => Ste::nested(&s1, &s2, &crate::hw::ste::EXAMPLE_RULES).unwrap(),
                }
            };
            let old = build(a, vmid_a, table_a, dss_a);
            let new = build(b, vmid_b, table_b, dss_b);
            let (kind, syncs) = ste(old, new);
            proptest::prop_assert!(syncs <= 3);
            proptest::prop_assert_eq!(kind == NoChange, old == new);
        }
    }

    /// A writer whose `fail_at`-th sync (counting from 0) fails; any write after that is a bug.
    struct FailingWriter {
        entry: [u64; 8],
        syncs: u32,
        fail_at: u32,
        failed: bool,
    }

    impl EntryWriter for FailingWriter {
        type Error = &'static str;

        fn write_qword(&mut self, index: usize, value: u64) {
            assert!(!self.failed, "qword {index} written after a failed sync");
            self.entry[index] = value;
        }

        fn sync(&mut self) -> Result<(), Self::Error> {
            assert!(!self.failed, "sync after a failed sync");
            if self.syncs == self.fail_at {
                self.failed = true;
                return Err("refused");
            }
            self.syncs += 1;
            Ok(())
        }
    }

    /// The test's own judgement of an entry: invalid, or behaving as old or new (nothing else is allowed).
    fn judge<E: UsedBits>(entry: &[u64; 8], old: &[u64; 8], new: &[u64; 8]) -> EntryState {
        if entry[0] & E::VALID == 0 {
            EntryState::Invalid
        } else if behaves_as::<E>(entry, old) {
            EntryState::Old
        } else {
            assert!(
                behaves_as::<E>(entry, new),
                "left neither old, new nor invalid: {entry:x?}"
            );
            EntryState::New
        }
    }

    #[test]
    fn a_failed_sync_stops_the_writer_and_says_what_the_entry_holds() {
        let cd_a = Cd::new(&CD, &crate::hw::ste::EXAMPLE_RULES).unwrap();
        let cd_b = Cd::new(&CdConfig { asid: 9, ..CD }, &crate::hw::ste::EXAMPLE_RULES).unwrap();
        let pairs: [([u64; 8], [u64; 8], bool); 7] = [
            (Ste::abort().0, Ste::bypass_for(&crate::hw::ste::EXAMPLE_RULES).0, true),
            (Ste::abort().0, s2().0, true),
            (s1().0, s2().0, true),
            (s2().0, nested().0, true),
            (Ste::invalid().0, s1().0, true),
            (cd_a.0, cd_b.0, false),
            (Cd::invalid().0, cd_a.0, false),
        ];
        let mut checked = 0;
        for (old, new, is_ste) in pairs {
            let (_, total) = if is_ste {
                transition::<Ste>(old, new)
            } else {
                transition::<Cd>(old, new)
            };
            for fail_at in 0..total {
                let mut w = FailingWriter {
                    entry: old,
                    syncs: 0,
                    fail_at,
                    failed: false,
                };
                let result = if is_ste {
                    update_entry::<Ste, _>(&old, &new, &mut w)
                } else {
                    update_entry::<Cd, _>(&old, &new, &mut w)
                };
                let failed = result.expect_err("the sync failed");
                assert_eq!((failed.error, failed.syncs), ("refused", fail_at));
                // What the entry holds is what the failed sync was to announce, and the error names it.
                let expected = if is_ste {
                    judge::<Ste>(&w.entry, &old, &new)
                } else {
                    judge::<Cd>(&w.entry, &old, &new)
                };
                assert_eq!(failed.left, expected, "{old:x?} -> {new:x?}, sync {fail_at} failed");
                checked += 1;
            }
        }
        assert!(
            checked >= 14,
            "every sync of every transition was made to fail ({checked})"
        );
    }
}
