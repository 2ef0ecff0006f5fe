//! The command queue: commands from every CPU at once, with no global lock, each submitter waiting only for the
//! CMD_SYNC that covers its own commands; batched submission (many commands, one CMDQ_PROD write); completion by a
//! bounded poll of CMDQ_CONS; recovery from command errors as IHI 0070 (7.1) describes them.
//!
//! # The protocol
//! Three 64-bit counters of positions in the queue's entry stream, which never wrap (CMDQ_PROD and CMDQ_CONS hold a
//! position modulo twice the queue's size): `reserved` (entries owned by a submitter), `published` (entries written
//! and covered by a CMDQ_PROD write) and `consumed` (a lower bound of CMDQ_CONS, advanced with `fetch_max` by every
//! CPU that reads the register). [`CommandQueue::submit`]:
//! 1. cuts the submission into *segments*, each at most a queue-full; on an SMMU that needs a CMD_SYNC every 63
//!    commands (Arm MMU-700, [`crate::features::Quirks::CMDQ_SYNC_EVERY_63`]) CMD_SYNCs are inserted and every
//!    segment ends with one, so that another CPU's segment following it in the queue never extends a run of commands
//!    past the limit;
//! 2. *reserves* a segment by compare-and-swap on `reserved`, once the queue has room for it (CMDQ_CONS is read
//!    first: a CONS that is no position the queue can have gets nothing more published);
//! 3. *writes* its slots (cleaning them to memory for an SMMU that does not snoop the caches);
//! 4. *publishes* in reservation order: it waits until `published` reaches its start (the CPUs before it are in their
//!    short write phases, never waiting on the SMMU), writes CMDQ_PROD unless a later reservation exists (that
//!    owner's write, which cannot come before this one's publication, covers both: PROD writes coalesce under
//!    contention), then advances `published`. So CMDQ_PROD only moves forward and never passes an unwritten slot;
//! 5. *waits* until `consumed` passes its last entry (its own CMD_SYNC, or another CPU's later one that was
//!    consumed first: one CMD_SYNC completes every command before it), reading CMDQ_CONS while it polls.
//!
//! A slot is rewritten only after `consumed` passed it, so never before the SMMU read it.
//!
//! # Errors
//! Any waiter that sees GERROR.CMDQ_ERR takes the queue's recovery lock if it is free (`try_lock`: the others keep
//! polling), reads GERROR again, and then for CERROR_ILL records the refused command (its position and words) in a
//! shared fault log, replaces it with a CMD_SYNC and acknowledges GERRORN; for CERROR_ABT (a fetch that aborted) and
//! CERROR_ATC_INV_SYNC (an ATC invalidation that timed out) it only acknowledges, and the SMMU tries again. Each
//! submitter, once its commands were consumed, looks up the records inside its own reservations: a refused command
//! fails its owner's submission with [`CommandQueueError::Refused`] and nobody else's; a log that overflowed and may
//! have lost one of the owner's fails it with [`CommandQueueError::FaultLogOverflow`], never `Ok`. GERROR.SFM_ERR
//! (service failure) fails every waiter with [`CommandQueueError::ServiceFailure`]. Every wait is bounded by
//! [`COMPLETION_TIMEOUT_US`] and ends in [`CommandQueueError::Timeout`].
//!
//! # Interrupt context
//! An interrupt handler must never submit: a submission interrupted between its reservation and its publication
//! would make the handler's own submission wait for it forever (publication is in reservation order). The calls
//! that are safe in interrupt context drain faults only. A submitter that is preempted between reservation and
//! publication delays every submitter after it; firmware that can be preempted there should mask interrupts
//! around [`CommandQueue::submit`].
//!
//! The errors in detail:
//! - CERROR_ILL: the command is illegal. It is reported, overwritten with a CMD_SYNC and the queue restarted, so
//!   the commands after it still complete; the submission then fails with [`CommandQueueError::Refused`].
//! - CERROR_ABT: the SMMU could not fetch the command (an external abort on the queue's memory). Nothing is
//!   wrong with the command: the error is acknowledged and the SMMU fetches it again (counted in
//!   [`BatchReport::fetch_retries`] of the submitter that acknowledged it) until the batch's deadline.
//! - CERROR_ATC_INV_SYNC: a CMD_SYNC found an ATC invalidation that timed out. The CMD_SYNC is retried the same way.

use core::fmt;

use crate::hw::command::{self, Command, CommandError};

mod faults;
#[cfg(all(loom, test))]
mod loom_models;
mod queue;
mod regs;
mod stream;
#[cfg(all(test, not(loom)))]
mod tests;

pub use queue::CommandQueue;
pub use regs::CommandQueueRegisters;

/// Bytes per command.
pub const COMMAND_BYTES: usize = 16;
/// How long a batch may take to complete before the driver gives up (the SMMU is considered stuck).
pub const COMPLETION_TIMEOUT_US: u64 = 1_000_000;
/// Command errors reported per batch (further ones are still skipped and counted).
pub const MAX_REPORTED_FAULTS: usize = 4;

/// A command the SMMU refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandFault {
    /// CMDQ_CONS.ERR: 1 CERROR_ILL, 2 CERROR_ABT, 3 CERROR_ATC_INV_SYNC.
    pub code: u8,
    /// The command's two words as they were in the queue.
    pub words: [u64; 2],
    /// Its slot.
    pub index: u32,
}

impl CommandFault {
    /// The error's architectural name.
    pub fn code_name(&self) -> &'static str {
        match self.code {
            0 => "CERROR_NONE",
            1 => "CERROR_ILL",
            2 => "CERROR_ABT",
            3 => "CERROR_ATC_INV_SYNC",
            _ => "CERROR_reserved",
        }
    }
}

impl fmt::Display for CommandFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opcode = (self.words[0] & 0xff) as u8;
        write!(f, "{} on ", self.code_name())?;
        match command::opcode_name(opcode) {
            Some(name) => write!(f, "{name} (opcode {opcode:#04x})")?,
            None => write!(f, "reserved opcode {opcode:#04x}")?,
        }
        write!(
            f,
            " at slot {}: {:#018x} {:#018x}; skipped",
            self.index, self.words[0], self.words[1]
        )
    }
}

/// What one submission did: the measure of batching. Under contention the MMIO writes are counted for the CPU
/// that made them: a submission whose PROD write was covered by a later submitter's has `prod_writes` 0, and the
/// submitter that acknowledged a command error counts the GERRORN write (and a retried fetch) whoever owned the
/// command.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Commands written, CMD_SYNCs included.
    pub commands: u32,
    /// CMD_SYNCs among them.
    pub syncs: u32,
    /// Writes to CMDQ_PROD.
    pub prod_writes: u32,
    /// Every MMIO write (PROD, and GERRORN for error recovery).
    pub mmio_writes: u32,
    /// Commands the SMMU could not fetch (CERROR_ABT) or CMD_SYNCs it could not complete (CERROR_ATC_INV_SYNC)
    /// that were retried and then completed.
    pub fetch_retries: u32,
    /// Commands the SMMU refused (first [`MAX_REPORTED_FAULTS`]); on a successful submission always empty.
    pub faults: heapless::Vec<CommandFault, MAX_REPORTED_FAULTS>,
    /// Commands refused in all; on a successful submission always 0.
    pub fault_count: u32,
}

/// Why a submission failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommandQueueError {
    /// A command has a field the architecture cannot encode; nothing was written.
    Encoding(CommandError),
    /// A command was pushed onto a [`Batch`] that already holds `capacity` commands; the batch is unchanged (submit
    /// it, then push again).
    BatchFull {
        /// [`BATCH_CAPACITY`].
        capacity: usize,
    },
    /// The SMMU did not consume the queue in time (CONS stuck at `cons`).
    Timeout {
        /// CMDQ_CONS when the driver gave up.
        cons: u32,
        /// The driver's PROD.
        prod: u32,
    },
    /// The SMMU entered service failure mode (GERROR.SFM_ERR): it stopped serving and needs a reset.
    ServiceFailure,
    /// The SMMU refused `count` commands of the batch as illegal (CERROR_ILL), the first being `first`. Each was
    /// replaced by a CMD_SYNC and the rest of the batch completed, but what the refused commands were meant to do
    /// (an invalidation, a prefetch) did not happen.
    Refused {
        /// The first command refused.
        first: CommandFault,
        /// Commands refused in all.
        count: u32,
    },
    /// More commands were refused while this submission was in the queue than the shared fault log holds, and
    /// `lost` records that may have included some of this submission's were overwritten before it read them: its
    /// commands completed, but some may have been refused (never reported as `Ok`).
    FaultLogOverflow {
        /// Records overwritten unread.
        lost: u64,
    },
    /// [`crate::LowLevel::submit`] refused the command at `index` of the batch: it may do more than invalidate,
    /// prefetch or synchronise (see [`crate::hw::command::vet`]). Nothing of the batch was written.
    NotAllowed {
        /// Its index in the batch.
        index: usize,
        /// What it would do.
        reason: crate::hw::command::Unvetted,
    },
}

impl fmt::Display for CommandQueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandQueueError::Encoding(e) => write!(f, "command not encodable: {e}"),
            CommandQueueError::BatchFull { capacity } => {
                write!(f, "command batch full ({capacity} commands): submit it first")
            }
            CommandQueueError::Timeout { cons, prod } => {
                write!(f, "command queue stuck: CONS {cons:#x}, PROD {prod:#x}")
            }
            CommandQueueError::ServiceFailure => {
                f.write_str("SMMU in service failure mode (GERROR.SFM_ERR): it stopped serving and needs a reset")
            }
            CommandQueueError::Refused { first, count } => {
                write!(f, "{count} command(s) refused, the first: {first}")
            }
            CommandQueueError::FaultLogOverflow { lost } => write!(
                f,
                "{lost} command fault record(s) overwritten before they were read: some commands of this \
                 submission may have been refused"
            ),
            CommandQueueError::NotAllowed { index, reason } => {
                write!(f, "command {index} of the batch not submitted, nor the rest: {reason}")
            }
        }
    }
}

/// Commands encoded on the stack before submission (a batch is submitted with one more, its CMD_SYNC).
pub const BATCH_CAPACITY: usize = 64;

/// Most commands an SMMU with [`crate::features::Quirks::CMDQ_SYNC_EVERY_63`] (Arm MMU-700, erratum 2812531)
/// may be given between two CMD_SYNCs.
pub const MMU700_COMMANDS_PER_SYNC: usize = 63;

/// A batch of encoded commands, submitted with one PROD write per queue-full.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    words: heapless::Vec<[u64; 2], BATCH_CAPACITY>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Batch::default()
    }

    /// Encodes and appends `command`.
    ///
    /// # Errors
    /// [`CommandQueueError::Encoding`] for a command with an unencodable field, [`CommandQueueError::BatchFull`]
    /// when the batch already holds [`BATCH_CAPACITY`] commands ([`Batch::is_full`]: submit first); the batch is
    /// unchanged then.
    pub fn push(&mut self, command: &Command) -> Result<(), CommandQueueError> {
        let words = command.encode().map_err(CommandQueueError::Encoding)?;
        self.push_words(words)
    }

    /// Appends a raw command (for commands this driver does not model, and for tests that inject bad ones).
    ///
    /// # Errors
    /// [`CommandQueueError::BatchFull`] when the batch already holds [`BATCH_CAPACITY`] commands; it is unchanged
    /// then.
    pub fn push_words(&mut self, words: [u64; 2]) -> Result<(), CommandQueueError> {
        self.words.push(words).map_err(|_| CommandQueueError::BatchFull {
            capacity: BATCH_CAPACITY,
        })
    }

    /// Whether the batch holds [`BATCH_CAPACITY`] commands.
    pub fn is_full(&self) -> bool {
        self.words.is_full()
    }

    /// Number of commands.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// The encoded commands.
    pub fn words(&self) -> &[[u64; 2]] {
        &self.words
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }
}
