//! The registers the command queue touches, as a trait: the SMMU's page 0 in the driver, atomics in a loom model or
//! a host benchmark where a thread plays the SMMU.

use tock_registers::interfaces::{Readable, Writeable};

use crate::hw::regs::SmmuPage0;
use crate::mem::{full_barrier, read_barrier, write_barrier};

/// CMDQ_PROD, CMDQ_CONS, GERROR and GERRORN, with the ordering each access needs against the queue's memory.
///
/// Implementations give every access the ordering documented on it (the driver's with Arm barriers, a model's with
/// acquire and release atomics); the command queue relies on nothing else. Every access may be made from several
/// CPUs at once.
pub trait CommandQueueRegisters {
    /// Writes CMDQ_PROD (index and wrap bits). A release: every write the CPU made to memory before it (the commands,
    /// written by this CPU or by others whose writes this CPU has observed through an acquire) is visible to the
    /// SMMU before the new PROD is (DMB OSHST; Arm barriers are cumulative, so commands other CPUs published through
    /// an acquire-release chain are covered too).
    fn write_prod(&self, value: u32);

    /// Reads CMDQ_CONS (index, wrap and ERR bits). An acquire: the SMMU's reads of every slot CONS has passed happen
    /// before any later CPU access, so a slot it freed can be rewritten (DMB OSHLD after the read orders it before
    /// later loads and stores).
    fn read_cons(&self) -> u32;

    /// Reads SMMU_GERROR. An acquire, as for [`CommandQueueRegisters::read_cons`].
    fn read_gerror(&self) -> u32;

    /// Reads SMMU_GERRORN. An acquire.
    fn read_gerrorn(&self) -> u32;

    /// Writes SMMU_GERRORN (acknowledging errors). A release (the faulting slot's replacement is visible to the SMMU
    /// before the acknowledgement restarts it), and complete before any later memory access of this CPU (the
    /// recovery lock is released after it: the next CPU to take the lock must read the acknowledged GERRORN).
    fn write_gerrorn(&self, value: u32);
}

impl CommandQueueRegisters for SmmuPage0 {
    fn write_prod(&self, value: u32) {
        // Commands before PROD (DMB OSHST).
        write_barrier();
        self.cmdq_prod.set(value);
    }

    fn read_cons(&self) -> u32 {
        let cons = self.cmdq_cons.get();
        // CONS before the reads and writes it allows (DMB OSHLD orders an earlier load before later loads and
        // stores).
        read_barrier();
        cons
    }

    fn read_gerror(&self) -> u32 {
        let gerror = self.gerror.get();
        read_barrier();
        gerror
    }

    fn read_gerrorn(&self) -> u32 {
        let gerrorn = self.gerrorn.get();
        read_barrier();
        gerrorn
    }

    fn write_gerrorn(&self, value: u32) {
        write_barrier();
        self.gerrorn.set(value);
        // The acknowledgement before the recovery lock's release (DMB OSH: a device write before a later store).
        full_barrier();
    }
}
