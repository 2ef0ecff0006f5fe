//! Queue pointer arithmetic for the SMMU's circular queues (Arm IHI 0070, 3.5 "Queues"), as tiny pure predicates.
//!
//! Every queue (command, event, PRI) has 2^log2size entries and is described by a PROD and a CONS register. In both,
//! bits `[log2size-1:0]` are the entry index and bit `[log2size]` is the wrap bit, which toggles each time the index
//! wraps to 0; together they form a *position* counted modulo 2 × entries. The queue is empty when the two
//! positions are equal and full when the indices are equal but the wrap bits differ. Bits above the position carry
//! flags that this arithmetic ignores: bit 31 is OVFLG in EVENTQ_PROD / PRIQ_PROD and OVACKFLG in EVENTQ_CONS /
//! PRIQ_CONS, and CMDQ_CONS holds the command error code in `[30:24]`. log2size is at most 19 (SMMU_IDR1.CMDQS,
//! EVENTQS and PRIQS cannot exceed 19).
//!
//! All functions are `const`, never panic, and accept any `u32`: bits that are not part of the position are
//! ignored on input. Functions that return a position ([`QueueGeometry::advance`], [`QueueGeometry::position`])
//! return the index and wrap bits only, with every flag bit cleared.

use core::fmt;

/// The largest queue the architecture allows: 2^19 entries.
pub const MAX_LOG2_ENTRIES: u8 = 19;

/// Bit 31 of a PROD or CONS register: OVFLG (EVENTQ_PROD, PRIQ_PROD) or OVACKFLG (EVENTQ_CONS, PRIQ_CONS).
pub const OVERFLOW_FLAG: u32 = 1 << 31;

/// Why a queue geometry was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueGeometryError {
    /// log2 of the entry count is above [`MAX_LOG2_ENTRIES`].
    TooLarge {
        /// The log2 entry count asked for.
        log2_entries: u8,
    },
}

impl fmt::Display for QueueGeometryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueGeometryError::TooLarge { log2_entries } => {
                write!(
                    f,
                    "queue of 2^{log2_entries} entries is larger than the 2^{MAX_LOG2_ENTRIES} allowed"
                )
            }
        }
    }
}

/// The size of one queue, and the PROD/CONS arithmetic that follows from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QueueGeometry {
    log2_entries: u8,
}

impl QueueGeometry {
    /// A queue of 2^`log2_entries` entries.
    ///
    /// # Errors
    /// [`QueueGeometryError::TooLarge`] when `log2_entries` is above [`MAX_LOG2_ENTRIES`] (19).
    pub const fn new(log2_entries: u8) -> Result<Self, QueueGeometryError> {
        if log2_entries > MAX_LOG2_ENTRIES {
            Err(QueueGeometryError::TooLarge { log2_entries })
        } else {
            Ok(QueueGeometry { log2_entries })
        }
    }

    /// log2 of the number of entries (the LOG2SIZE field of the queue's base register).
    pub const fn log2_entries(self) -> u8 {
        self.log2_entries
    }

    /// Number of entries: 1 to 2^19.
    pub const fn entries(self) -> u32 {
        1 << self.log2_entries
    }

    /// Mask of the index bits, `[log2size-1:0]` (0 for a one-entry queue).
    pub const fn index_mask(self) -> u32 {
        self.entries() - 1
    }

    /// The wrap bit, bit `[log2size]`.
    pub const fn wrap_bit(self) -> u32 {
        self.entries()
    }

    /// Mask of the position: the index bits and the wrap bit.
    pub const fn position_mask(self) -> u32 {
        (self.entries() << 1) - 1
    }

    /// The entry index of a PROD or CONS value: the slot it points at, `0..entries()`.
    pub const fn index(self, value: u32) -> u32 {
        value & self.index_mask()
    }

    /// The wrap bit of a PROD or CONS value.
    pub const fn wrap(self, value: u32) -> bool {
        value & self.wrap_bit() != 0
    }

    /// The position (wrap bit and index) of a PROD or CONS value, with every flag bit cleared.
    pub const fn position(self, value: u32) -> u32 {
        value & self.position_mask()
    }

    /// Bit 31 of a PROD or CONS value: OVFLG or OVACKFLG, depending on the register.
    pub const fn overflow_flag(self, value: u32) -> bool {
        value & OVERFLOW_FLAG != 0
    }

    /// `value`'s position with bit 31 set to `flag` and every other flag bit cleared: a value to write to
    /// EVENTQ_CONS / PRIQ_CONS, whose bit 31 (OVACKFLG) acknowledges an overflow when it equals PROD.OVFLG.
    pub const fn with_overflow_flag(self, value: u32, flag: bool) -> u32 {
        self.position(value) | if flag { OVERFLOW_FLAG } else { 0 }
    }

    /// Whether the producer has signalled an overflow that the consumer has not acknowledged yet: PROD.OVFLG
    /// differs from CONS.OVACKFLG.
    pub const fn overflow_unacknowledged(self, prod: u32, cons: u32) -> bool {
        self.overflow_flag(prod) != self.overflow_flag(cons)
    }

    /// Whether the queue is empty: the two positions are equal.
    pub const fn is_empty(self, prod: u32, cons: u32) -> bool {
        self.position(prod) == self.position(cons)
    }

    /// Whether the queue is full: the indices are equal and the wrap bits differ.
    pub const fn is_full(self, prod: u32, cons: u32) -> bool {
        self.position(prod ^ cons) == self.wrap_bit()
    }

    /// Number of entries between CONS and PROD: written and not yet consumed.
    ///
    /// Returns `None` when the pair is impossible: the distance from CONS to PROD (modulo 2 × entries) is more
    /// than `entries()`, which means the consumer is ahead of the producer (a corrupted register or a driver bug).
    pub const fn used(self, prod: u32, cons: u32) -> Option<u32> {
        let distance = self.position(prod.wrapping_sub(cons));
        if distance > self.entries() {
            None
        } else {
            Some(distance)
        }
    }

    /// Number of entries the producer may still write before the queue is full.
    ///
    /// Returns `None` for an impossible pair, as [`QueueGeometry::used`] does.
    pub const fn free_slots(self, prod: u32, cons: u32) -> Option<u32> {
        match self.used(prod, cons) {
            Some(used) => Some(self.entries() - used),
            None => None,
        }
    }

    /// The position `count` entries after `value`'s position, modulo 2 × entries (the wrap bit toggles each time
    /// the index passes the end). Flag bits (bit 31, CMDQ_CONS.ERR) are **cleared** in the result: a new CMDQ_PROD
    /// value can be written as it is; a consumer of the event queue adds OVACKFLG with
    /// [`QueueGeometry::with_overflow_flag`].
    pub const fn advance(self, value: u32, count: u32) -> u32 {
        self.position(value.wrapping_add(count))
    }

    /// Whether the consumer has consumed the entry at `position` (it has moved past it), taking the wrap bit into
    /// account: for waiting on a CMD_SYNC written at a known position.
    ///
    /// True when CONS is 1 to `entries()` positions after `position`. The answer is only meaningful while CONS is
    /// within one lap of `position` (the producer cannot overwrite that entry before it is consumed, so this holds
    /// as long as the caller checks before it has produced another full queue of entries past `position`).
    pub const fn has_consumed(self, cons: u32, position: u32) -> bool {
        let distance = self.position(cons.wrapping_sub(position));
        distance != 0 && distance <= self.entries()
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use proptest::prelude::*;
    use std::format;

    /// Model: unbounded counters of entries produced and consumed, `cons_count <= prod_count <= cons_count + N`.
    #[derive(Clone, Copy, Debug)]
    struct Model {
        entries: u64,
        prod_count: u64,
        cons_count: u64,
    }

    impl Model {
        /// The register value of a counter: the counter modulo 2N, ORed with `junk` (flag bits only, see
        /// [`junk_above`]).
        fn register(&self, count: u64, junk: u32) -> u32 {
            (count % (2 * self.entries)) as u32 | junk
        }
    }

    /// Junk placed in the bits above the position, which every function must ignore.
    const JUNKS: [u32; 4] = [0, OVERFLOW_FLAG, 0x7f00_0000, 0xfff0_0000];

    fn junk_above(geometry: QueueGeometry, junk: u32) -> u32 {
        junk & !geometry.position_mask()
    }

    #[test]
    fn new_accepts_up_to_19() {
        for log2 in 0..=19u8 {
            let g = QueueGeometry::new(log2).unwrap();
            assert_eq!(g.entries(), 1 << log2);
            assert_eq!(g.log2_entries(), log2);
        }
        assert_eq!(
            QueueGeometry::new(20),
            Err(QueueGeometryError::TooLarge { log2_entries: 20 })
        );
        assert_eq!(
            QueueGeometry::new(255),
            Err(QueueGeometryError::TooLarge { log2_entries: 255 })
        );
    }

    #[test]
    fn masks_for_known_sizes() {
        // 2^19 entries: index [18:0], wrap bit 19, as in SMMU_CMDQ_PROD.WR [19:0].
        let g = QueueGeometry::new(19).unwrap();
        assert_eq!(g.index_mask(), 0x7_ffff);
        assert_eq!(g.wrap_bit(), 0x8_0000);
        assert_eq!(g.position_mask(), 0xf_ffff);
        // One entry: no index bits, wrap bit 0.
        let g = QueueGeometry::new(0).unwrap();
        assert_eq!(g.index_mask(), 0);
        assert_eq!(g.wrap_bit(), 1);
        assert_eq!(g.position_mask(), 1);
    }

    #[test]
    fn field_accessors() {
        let g = QueueGeometry::new(4).unwrap();
        // EVENTQ_PROD with OVFLG set, wrap 1, index 5.
        let v = OVERFLOW_FLAG | 0x10 | 5;
        assert_eq!(g.index(v), 5);
        assert!(g.wrap(v));
        assert!(g.overflow_flag(v));
        assert_eq!(g.position(v), 0x15);
        // CMDQ_CONS with ERR = CERROR_ILL in [30:24], wrap 0, index 3.
        let v = (1 << 24) | 3;
        assert_eq!(g.index(v), 3);
        assert!(!g.wrap(v));
        assert!(!g.overflow_flag(v));
        assert_eq!(g.with_overflow_flag(v, true), OVERFLOW_FLAG | 3);
        assert_eq!(g.with_overflow_flag(OVERFLOW_FLAG | 0x13, false), 0x13);
        assert!(g.overflow_unacknowledged(OVERFLOW_FLAG, 0));
        assert!(!g.overflow_unacknowledged(OVERFLOW_FLAG | 2, OVERFLOW_FLAG | 7));
    }

    #[test]
    fn error_display() {
        let text = format!("{}", QueueGeometryError::TooLarge { log2_entries: 21 });
        assert!(text.contains("2^21"), "{text}");
    }

    /// Every PROD/CONS pair of every queue of 1 to 16 entries, with junk in the flag bits, against the model.
    #[test]
    fn exhaustive_small_queues_against_model() {
        for log2 in 0..=4u8 {
            let g = QueueGeometry::new(log2).unwrap();
            let n = u64::from(g.entries());
            // All consistent states, as unbounded counters: consumer at c (two laps' worth of starting points,
            // plus far-away counters to exercise the modulo), producer 0..=N entries ahead.
            let starts = (0..4 * n).chain([u64::MAX / 2, (1 << 40) + 3]);
            for cons_count in starts {
                for ahead in 0..=n {
                    let m = Model {
                        entries: n,
                        prod_count: cons_count + ahead,
                        cons_count,
                    };
                    for junk in JUNKS {
                        let prod = m.register(m.prod_count, junk_above(g, junk));
                        let cons = m.register(m.cons_count, junk_above(g, !junk));
                        assert_eq!(g.used(prod, cons), Some(ahead as u32), "log2 {log2} {m:?}");
                        assert_eq!(g.free_slots(prod, cons), Some((n - ahead) as u32));
                        assert_eq!(g.is_empty(prod, cons), ahead == 0);
                        assert_eq!(g.is_full(prod, cons), ahead == n);
                        assert_eq!(g.index(prod) as u64, m.prod_count % n);
                        assert_eq!(g.wrap(prod), (m.prod_count / n) % 2 == 1);
                    }
                }
            }
            // Every pair of register values: consistent ones are exactly those the model can produce.
            let positions = 2 * g.entries();
            for prod in 0..positions {
                for cons in 0..positions {
                    let ahead = (u64::from(prod) + 2 * n - u64::from(cons)) % (2 * n);
                    let consistent = ahead <= n;
                    for junk in JUNKS {
                        let p = prod | junk_above(g, junk);
                        let c = cons | junk_above(g, junk.rotate_left(7));
                        assert_eq!(
                            g.used(p, c),
                            consistent.then_some(ahead as u32),
                            "log2 {log2} {prod} {cons}"
                        );
                        assert_eq!(g.free_slots(p, c), consistent.then(|| (n - ahead) as u32));
                        assert_eq!(g.is_empty(p, c), ahead == 0);
                        assert_eq!(g.is_full(p, c), ahead == n);
                    }
                }
            }
        }
    }

    #[test]
    fn exhaustive_small_advance_against_model() {
        for log2 in 0..=4u8 {
            let g = QueueGeometry::new(log2).unwrap();
            let n = u64::from(g.entries());
            for start in 0..2 * n {
                for count in (0..5 * n).chain([u64::from(u32::MAX), u64::from(u32::MAX) - 1]) {
                    for junk in JUNKS {
                        let v = start as u32 | junk_above(g, junk);
                        let expected = ((start + count) % (2 * n)) as u32;
                        assert_eq!(g.advance(v, count as u32), expected, "log2 {log2} {start} + {count}");
                    }
                }
            }
        }
    }

    /// has_consumed against the model: the entry written at counter `p` is consumed once `cons_count > p`, for
    /// every consumer counter within one lap of it.
    #[test]
    fn exhaustive_small_has_consumed_against_model() {
        for log2 in 0..=4u8 {
            let g = QueueGeometry::new(log2).unwrap();
            let n = u64::from(g.entries());
            for slot in 3 * n..5 * n {
                // The consumer can be up to N - 1 entries behind the slot (the slot is in the queue, so at most
                // N entries are outstanding) and up to N entries past it (one lap).
                for cons_count in slot + 1 - n..=slot + n {
                    let m = Model {
                        entries: n,
                        prod_count: slot + 1,
                        cons_count,
                    };
                    for junk in JUNKS {
                        let cons = m.register(cons_count, junk_above(g, junk));
                        let position = m.register(slot, junk_above(g, !junk));
                        assert_eq!(
                            g.has_consumed(cons, position),
                            cons_count > slot,
                            "log2 {log2} slot {slot} cons {cons_count}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn linux_style_consumed_examples() {
        let g = QueueGeometry::new(3).unwrap();
        // Same wrap: consumed once CONS's index is beyond the slot's.
        assert!(!g.has_consumed(0x02, 0x02));
        assert!(g.has_consumed(0x03, 0x02));
        assert!(!g.has_consumed(0x01, 0x02));
        // Different wrap: CONS wrapped past the end after the slot.
        assert!(g.has_consumed(0x08, 0x07));
        assert!(g.has_consumed(0x0a, 0x02)); // a whole lap later: the slot was consumed
        assert!(!g.has_consumed(0x0f, 0x00)); // CONS one behind the slot, across the wrap
        // Flags on CONS (ERR field) do not matter.
        assert!(g.has_consumed((2 << 24) | 0x03, 0x02));
    }

    proptest! {
        #[test]
        fn size_19_against_model(
            cons_count in any::<u64>(),
            ahead in 0u64..=(1 << 19),
            count in any::<u32>(),
            junk_p in any::<u32>(),
            junk_c in any::<u32>(),
        ) {
            let g = QueueGeometry::new(19).unwrap();
            let n = 1u64 << 19;
            let cons_count = cons_count / 2; // leave room for the producer counter
            let m = Model { entries: n, prod_count: cons_count + ahead, cons_count };
            let prod = m.register(m.prod_count, junk_above(g, junk_p));
            let cons = m.register(m.cons_count, junk_above(g, junk_c));
            prop_assert_eq!(g.used(prod, cons), Some(ahead as u32));
            prop_assert_eq!(g.free_slots(prod, cons), Some((n - ahead) as u32));
            prop_assert_eq!(g.is_empty(prod, cons), ahead == 0);
            prop_assert_eq!(g.is_full(prod, cons), ahead == n);
            prop_assert_eq!(u64::from(g.index(prod)), m.prod_count % n);
            prop_assert_eq!(g.wrap(prod), (m.prod_count >> 19) & 1 == 1);
            prop_assert_eq!(g.overflow_flag(prod), junk_p & OVERFLOW_FLAG != 0);
            let advanced = m.register(m.prod_count + u64::from(count), 0);
            prop_assert_eq!(g.advance(prod, count), advanced);
            // The entry at cons_count + k (k < ahead) is consumed iff k == 0 would be: use the entry one behind
            // CONS (consumed) and the one at CONS (not consumed).
            if cons_count > 0 {
                let behind = m.register(cons_count - 1, junk_above(g, junk_p));
                prop_assert!(g.has_consumed(cons, behind));
            }
            prop_assert!(!g.has_consumed(cons, g.position(cons)));
            if ahead > 0 {
                let last = m.register(m.prod_count - 1, 0);
                prop_assert!(!g.has_consumed(cons, last));
            }
        }

        #[test]
        fn size_19_impossible_pairs(prod in any::<u32>(), cons in any::<u32>()) {
            let g = QueueGeometry::new(19).unwrap();
            let n = 1u32 << 19;
            let ahead = (prod.wrapping_sub(cons)) & ((n << 1) - 1);
            prop_assert_eq!(g.used(prod, cons).is_none(), ahead > n);
            prop_assert_eq!(g.free_slots(prod, cons).is_none(), ahead > n);
        }
    }
}
