//! A submission's entry stream (its commands, the CMD_SYNCs an erratum needs between them, its final CMD_SYNC) and
//! how it is cut into segments, each reserved and published on its own.

use crate::hw::command;

/// Whether `words` is a CMD_SYNC.
pub(super) fn is_sync(words: &[u64; 2]) -> bool {
    words[0] & 0xff == u64::from(command::opcode::SYNC)
}

/// The entries of one submission, produced on demand from a [`Cursor`] (twice per segment: once to measure it,
/// once to write it).
pub(super) struct Entries<'a> {
    commands: &'a [[u64; 2]],
    /// At most this many commands between two CMD_SYNCs (`None`: no limit).
    limit: Option<usize>,
    /// Whether the submission ends with a CMD_SYNC of its own.
    final_sync: bool,
    sync_words: [u64; 2],
}

/// A position in an [`Entries`] stream.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Cursor {
    /// The next caller command.
    next: usize,
    /// Commands since the last CMD_SYNC.
    since_sync: usize,
    /// Whether the closing CMD_SYNC was produced.
    closed: bool,
}

impl<'a> Entries<'a> {
    /// The stream of `commands`, a CMD_SYNC inserted wherever `limit` commands would otherwise pass without one,
    /// and a final CMD_SYNC when `final_sync`. With a limit the stream always ends with a CMD_SYNC: another CPU's
    /// commands may follow it in the queue.
    pub(super) fn new(commands: &'a [[u64; 2]], final_sync: bool, limit: Option<usize>, sync_words: [u64; 2]) -> Self {
        Entries {
            commands,
            limit: limit.map(|l| l.max(1)),
            final_sync,
            sync_words,
        }
    }

    /// The entry at `cursor`, advancing it; `None` at the end.
    pub(super) fn next(&self, cursor: &mut Cursor) -> Option<[u64; 2]> {
        if let Some(&words) = self.commands.get(cursor.next) {
            let sync = is_sync(&words);
            if !sync && self.limit == Some(cursor.since_sync) {
                cursor.since_sync = 0;
                return Some(self.sync_words);
            }
            cursor.next += 1;
            cursor.since_sync = if sync { 0 } else { cursor.since_sync + 1 };
            return Some(words);
        }
        let close = self.final_sync || (self.limit.is_some() && cursor.since_sync > 0);
        if close && !cursor.closed {
            cursor.closed = true;
            cursor.since_sync = 0;
            return Some(self.sync_words);
        }
        None
    }

    /// The segment starting at `from`: its length (at most `capacity`, the queue's size) and the cursor after it;
    /// `None` when the stream is over. With a limit a segment that does not end the stream ends at its last
    /// CMD_SYNC, so that no other CPU's segment ever extends a run of commands past the limit.
    pub(super) fn segment(&self, from: Cursor, capacity: u64) -> Option<(u64, Cursor)> {
        let mut cursor = from;
        let mut length = 0;
        let mut last_sync = None;
        while length < capacity {
            let Some(words) = self.next(&mut cursor) else {
                break;
            };
            length += 1;
            if is_sync(&words) {
                last_sync = Some((length, cursor));
            }
        }
        if length == 0 {
            return None;
        }
        let more = self.next(&mut cursor.clone()).is_some();
        match last_sync {
            // A limit below the queue's size puts a CMD_SYNC in every queue-full of entries.
            Some(cut) if more && self.limit.is_some() => Some(cut),
            _ => Some((length, cursor)),
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    const SYNC: [u64; 2] = [command::opcode::SYNC as u64, 0];
    const CMD: [u64; 2] = [command::opcode::CFGI_STE as u64, 0];

    fn segments(commands: &[[u64; 2]], sync: bool, limit: Option<usize>, capacity: u64) -> Vec<Vec<bool>> {
        let entries = Entries::new(commands, sync, limit, SYNC);
        let mut cursor = Cursor::default();
        let mut out = Vec::new();
        while let Some((n, next)) = entries.segment(cursor, capacity) {
            let mut c = cursor;
            out.push((0..n).map(|_| is_sync(&entries.next(&mut c).unwrap())).collect());
            cursor = next;
        }
        out
    }

    #[test]
    fn without_a_limit_segments_are_queue_fulls_and_one_sync_ends_the_stream() {
        let s = segments(&[CMD; 20], true, None, 8);
        assert_eq!(s.iter().map(Vec::len).collect::<Vec<_>>(), [8, 8, 5]);
        assert_eq!(s.concat().iter().filter(|&&x| x).count(), 1);
        assert!(segments(&[], false, None, 8).is_empty());
        assert_eq!(segments(&[], true, None, 8), [[true]]);
    }

    #[test]
    fn with_a_limit_every_segment_ends_with_a_sync_and_no_run_exceeds_it() {
        for capacity in [4u64, 5, 8, 64, 256] {
            for count in [0usize, 1, 3, 4, 7, 63, 64, 130] {
                for sync in [false, true] {
                    let limit = 3.min(capacity as usize - 1);
                    let s = segments(&std::vec![CMD; count], sync, Some(limit), capacity);
                    for segment in &s {
                        assert!(segment.len() as u64 <= capacity);
                        assert!(*segment.last().unwrap(), "{capacity} {count} {sync}: {s:?}");
                    }
                    let all = s.concat();
                    assert_eq!(all.iter().filter(|&&x| !x).count(), count);
                    assert!(all.split(|&x| x).all(|run| run.len() <= limit));
                }
            }
        }
    }
}
