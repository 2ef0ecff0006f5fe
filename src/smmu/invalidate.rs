//! Invalidation and command submission: the least TLB invalidation that covers a page-table change (a gather),
//! whole-SMMU invalidation, and batches of commands, vetted or not.

use core::fmt;

use crate::hw::command::{Command, SyncCompletion, TlbiRange, plan_range_invalidation};
use crate::mem::FrameAllocator;
use crate::pgtable::{Gather, Granule, IoPageTable, TableId};
use crate::queue::cmdq::{BATCH_CAPACITY, Batch, BatchReport, CommandQueue, CommandQueueError};

use super::{Smmu, SmmuCore};

/// Above this many granules without range invalidation, [`LowLevel::flush`](crate::LowLevel::flush) invalidates the whole ASID or VMID.
pub const PER_GRANULE_LIMIT: u32 = 32;

/// Whose TLB entries a page-table change affects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlbContext {
    /// A stage-1 table used with `asid` (and `vmid`, 0 without stage 2).
    Stage1 {
        /// ASID of the CD.
        asid: u16,
        /// VMID of the STE.
        vmid: u16,
    },
    /// A stage-1 table of the EL2 translation regime (STE.STRW = EL2, no E2H: one VA range, no ASIDs), on an
    /// SMMU with IDR0.HYP. Invalidated with TLBI_EL2_VA / TLBI_EL2_ALL.
    Stage1El2,
    /// A stage-2 table used with `vmid`.
    Stage2 {
        /// VMID of the STE.
        vmid: u16,
        /// Streams translate with both stages: combined entries must go too.
        nested: bool,
    },
}

/// Why a TLB invalidation could not be done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidationError {
    /// The command queue failed (a command refused, a timeout, service failure).
    Queue(CommandQueueError),
    /// [`TlbContext::Stage1El2`] on an SMMU without EL2 contexts (IDR0.HYP = 0); nothing was issued.
    NoEl2Contexts,
    /// The gather was filled by another page table than the one given ([`LowLevel::flush`](crate::LowLevel::flush)): nothing was
    /// issued and nothing freed.
    ForeignGather {
        /// The table that filled the gather.
        owner: TableId,
        /// The table given with it.
        table: TableId,
    },
}

impl fmt::Display for InvalidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidationError::Queue(e) => write!(f, "{e}"),
            InvalidationError::NoEl2Contexts => {
                f.write_str("an EL2 stage-1 context on an SMMU without EL2 contexts (IDR0.HYP = 0)")
            }
            InvalidationError::ForeignGather { owner, table } => {
                write!(f, "a gather filled by {owner} was flushed with {table}")
            }
        }
    }
}

/// Why [`LowLevel::flush`](crate::LowLevel::flush) failed. The gathered tables were not released: they are handed back in
/// [`FlushError::gather`], still owned by the caller, since a walk may still reach them. Flushing that gather again
/// (once the queue works) completes the job; dropping it leaks the tables, which is safe.
#[derive(Debug)]
pub struct FlushError {
    /// What went wrong.
    pub error: InvalidationError,
    /// The invalidation still owed, and the unlinked tables it guards.
    pub gather: Gather,
}

impl fmt::Display for FlushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TLB invalidation failed ({}); {} unlinked table(s) kept until it succeeds",
            self.error,
            self.gather.freed_tables()
        )
    }
}

impl<A: FrameAllocator> SmmuCore<A> {
    /// Submits a batch and a CMD_SYNC, and waits for completion. A command the SMMU could not fetch
    /// (CERROR_ABT) is fetched again; one it refuses as illegal (CERROR_ILL) is replaced with a CMD_SYNC so the
    /// rest of the batch completes, and the submission then fails. On an SMMU with
    /// [`crate::smmu::features::Quirks::CMDQ_SYNC_EVERY_63`] a CMD_SYNC is inserted after every 63 commands. Public for
    /// experts: every command is vetted first ([`crate::hw::command::vet`]) so that it can only invalidate,
    /// prefetch or synchronise: an extra batch costs time but cannot change what a domain translates, nor make the
    /// SMMU write memory (a CMD_SYNC with an MSI is refused).
    ///
    /// # Errors
    /// [`CommandQueueError::NotAllowed`] for a command the vetting refuses (nothing is written),
    /// [`CommandQueueError::Refused`] (after the rest of the batch completed) when a command was illegal,
    /// [`CommandQueueError::Timeout`] when the SMMU stops consuming, [`CommandQueueError::ServiceFailure`].
    pub(crate) fn submit(&self, batch: &Batch) -> Result<BatchReport, CommandQueueError> {
        for (index, words) in batch.words().iter().enumerate() {
            crate::hw::command::vet(words).map_err(|reason| CommandQueueError::NotAllowed { index, reason })?;
        }
        self.cmdq.submit(self.smmu.regs(), batch.words(), true)
    }

    /// [`SmmuCore::submit`] without the vetting: any command, for tests that inject one the SMMU must refuse
    /// (a reserved opcode) and for commands this driver does not model.
    ///
    /// # Safety
    /// No command of `batch` may make the SMMU write memory the caller does not own for that purpose (a CMD_SYNC's
    /// MSI), nor change what a stream translates or what a device caches (ATS, PRI and stall commands): the driver
    /// cannot tell what they do.
    ///
    /// # Errors
    /// As [`SmmuCore::submit`], without [`CommandQueueError::NotAllowed`].
    pub(crate) unsafe fn submit_unvetted(&self, batch: &Batch) -> Result<BatchReport, CommandQueueError> {
        self.cmdq.submit(self.smmu.regs(), batch.words(), true)
    }

    /// Invalidates every cached configuration and TLB entry: CFGI_ALL, TLBI_EL2_ALL (when the SMMU has EL2
    /// contexts), TLBI_NSNH_ALL, CMD_SYNC.
    ///
    /// # Errors
    /// As [`SmmuCore::submit`].
    pub(crate) fn invalidate_all(&self) -> Result<BatchReport, CommandQueueError> {
        let mut batch = Batch::new();
        batch.push(&Command::CfgiAll)?;
        if self.features().hyp {
            batch.push(&Command::TlbiEl2All)?;
        }
        batch.push(&Command::TlbiNsnhAll)?;
        self.submit(&batch)
    }

    /// Invalidates what `gather` collected from `table` for `context`, waits for it to complete (CMD_SYNC), then
    /// gives the tables the gather unlinked back to their allocator (only now can no walk reach them). The least
    /// invalidation: range TLBIs when the SMMU has them (IDR3.RIL), one TLBI per granule up to
    /// [`PER_GRANULE_LIMIT`], else the whole ASID, VMID or EL2 regime. Leaf-only when no table was unlinked.
    ///
    /// A stage-2 change under nested translation also drops the VMID's combined stage-1 entries, which cannot be
    /// found by IPA, in the order the architecture's stage-2 maintenance needs (as the CPU's TLBI IPAS2E1; DSB;
    /// TLBI VMALLE1): TLBI_S2_IPA, **CMD_SYNC**, TLBI_NH_ALL, CMD_SYNC. Without the first sync a walk could
    /// rebuild a combined entry from a stage-2 entry that is still being invalidated.
    ///
    /// The page-table code changes descriptors but invalidates nothing itself: after `map` over what was unmapped,
    /// `unmap` or `protect`, the caller flushes the gather here before it relies on the change (or before it reuses
    /// what was unmapped).
    ///
    /// # Errors
    /// [`FlushError`] when the invalidation failed (a refused command, a timeout, service failure), for
    /// [`TlbContext::Stage1El2`] when the SMMU has no EL2 contexts, or with
    /// [`InvalidationError::ForeignGather`] when another table than `table` filled `gather` (nothing issued). The
    /// tables are then **not** released: the error hands the gather back.
    pub(crate) fn flush<T: FrameAllocator>(
        &self,
        table: &mut IoPageTable<T>,
        gather: Gather,
        context: TlbContext,
    ) -> Result<BatchReport, FlushError> {
        if let Some(owner) = gather.owner()
            && !table.owns(&gather)
        {
            return Err(FlushError {
                error: InvalidationError::ForeignGather {
                    owner,
                    table: table.id(),
                },
                gather,
            });
        }
        let report = if gather.is_empty() {
            BatchReport::default()
        } else if context == TlbContext::Stage1El2 && !self.features().hyp {
            return Err(FlushError {
                error: InvalidationError::NoEl2Contexts,
                gather,
            });
        } else {
            match self.invalidate_gather(table.format().granule, &gather, context) {
                Ok(report) => report,
                Err(error) => {
                    return Err(FlushError {
                        error: InvalidationError::Queue(error),
                        gather,
                    });
                }
            }
        };
        // SAFETY: the invalidation covering `gather` (walk caches included when it unlinked tables) has completed
        // with its CMD_SYNC, or the gather is empty (it unlinked nothing).
        match unsafe { table.release(gather) } {
            Ok(()) => Ok(report),
            // Checked above; kept as an error rather than a panic.
            Err(refused) => Err(FlushError {
                error: InvalidationError::ForeignGather {
                    owner: refused.gather.owner().unwrap_or(refused.table),
                    table: refused.table,
                },
                gather: refused.gather,
            }),
        }
    }

    /// Issues the TLB invalidation that covers `gather` and waits for it.
    pub(crate) fn invalidate_gather(
        &self,
        granule: Granule,
        gather: &Gather,
        context: TlbContext,
    ) -> Result<BatchReport, CommandQueueError> {
        gather_invalidation(&self.cmdq, &self.smmu, granule, gather, context)
    }
}

/// Issues the TLB invalidation that covers `gather` (see [`LowLevel::flush`](crate::LowLevel::flush)) and waits for it.
fn gather_invalidation(
    cmdq: &CommandQueue,
    smmu: &Smmu,
    granule: Granule,
    gather: &Gather,
    context: TlbContext,
) -> Result<BatchReport, CommandQueueError> {
    let leaf = !gather.tables_unlinked();
    let one = |address: u64, range: Option<TlbiRange>| match context {
        TlbContext::Stage1 { asid, vmid } => Command::TlbiNhVa {
            vmid,
            asid,
            address,
            leaf,
            range,
        },
        TlbContext::Stage1El2 => Command::TlbiEl2Va {
            asid: 0,
            address,
            leaf,
            range,
        },
        TlbContext::Stage2 { vmid, .. } => Command::TlbiS2Ipa {
            vmid,
            address,
            leaf,
            range,
        },
    };
    let whole = match context {
        TlbContext::Stage1 { asid, vmid } => Command::TlbiNhAsid { vmid, asid },
        TlbContext::Stage1El2 => Command::TlbiEl2All,
        TlbContext::Stage2 { vmid, .. } => Command::TlbiS12Vmall { vmid },
    };
    let mut batch = Batch::new();
    let granules = gather.size() / granule.size();
    let ranged = if smmu.features().range_invalidation {
        plan_range_invalidation(gather.start(), gather.size(), granule, 0).ok()
    } else {
        None
    };
    match ranged {
        Some(plan) if plan.clone().count() < BATCH_CAPACITY - 2 => {
            for piece in plan {
                batch.push(&one(piece.address, piece.range))?;
            }
        }
        _ if granules <= u64::from(PER_GRANULE_LIMIT) => {
            for i in 0..granules {
                batch.push(&one(gather.start() + i * granule.size(), None))?;
            }
        }
        _ => batch.push(&whole)?,
    }
    if let TlbContext::Stage2 { vmid, nested: true } = context {
        // The stage-2 invalidation completes before the combined entries go (see `flush`).
        batch.push(&Command::Sync {
            completion: SyncCompletion::None,
        })?;
        batch.push(&Command::TlbiNhAll { vmid })?;
    }
    cmdq.submit(smmu.regs(), batch.words(), true)
}
