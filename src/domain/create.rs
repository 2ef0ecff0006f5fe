//! Creating and freeing domains: stage 1, stage 2 and nested, each with its IDs, tables and memory.

use crate::hw::command::Command;
use crate::hw::ste::EntryError;
use crate::ids::DomainId;
use crate::mem::MemoryHooks;
use crate::mem::{FrameAllocator, Iova, PhysAddr};
use crate::pgtable::{IoPageTable, Stage};
use crate::queue::cmdq::Batch;

use super::table::Fixed;
use super::{
    DomainError, DomainKind, DomainMemory, DomainState, GuestStage1, Iommu, Stage1Options, Stage2Options, Translation,
    Unsupported, Wanted,
};

impl<A: FrameAllocator, const D: usize> Iommu<A, D> {
    /// Creates a stage-1 domain: an ASID, an empty stage-1 table of `options.input_bits` from `memory`, and the
    /// CD its streams will use (NS-EL1, or EL2 with `options.el2`).
    ///
    /// # Errors
    /// [`DomainError::Unsupported`] without stage 1 (or EL2 without IDR0.HYP, or forced stalling),
    /// [`DomainError::Map`] for a bad input size or no memory, [`DomainError::Id`] without a free ASID (or
    /// [`IdError::HandOffUnsettled`](crate::ids::IdError::HandOffUnsettled) on an SMMU adopted running whose hand-off is not restored yet),
    /// [`DomainError::NoDomainSlot`], [`DomainError::MemoryOwned`] for a handover memory another domain owns.
    /// Nothing is allocated then.
    pub fn create_stage1(&self, memory: DomainMemory, options: Stage1Options) -> Result<DomainId, DomainError> {
        let features = *self.features();
        if !features.stage1 {
            return Err(DomainError::Unsupported(Unsupported::NoStage1));
        }
        if options.el2 && !features.hyp {
            return Err(DomainError::Unsupported(Unsupported::NoEl2Contexts));
        }
        self.stalls_forced()?;
        self.book().check_free_slot()?;
        self.create_claimed(memory, |smmu| {
            let stage = if options.el2 { Stage::OneEl2 } else { Stage::One };
            let table = smmu.new_table(memory, stage, options.input_bits)?;
            let asid = smmu.core.allocate_asid().map_err(DomainError::Id)?;
            let cd = smmu.stage1_cd(asid, &table).map_err(|e| {
                let _ = smmu.core.release_asid(asid);
                DomainError::Entry(e)
            })?;
            Ok(Translation::Stage1 {
                table,
                asid,
                cd,
                el2: options.el2,
            })
        })
    }

    /// Creates a stage-2 domain: a VMID and an empty stage-2 table of `options.input_bits` from `memory`.
    ///
    /// # Errors
    /// As [`Iommu::create_stage1`] (stage 2, a VMID).
    pub fn create_stage2(&self, memory: DomainMemory, options: Stage2Options) -> Result<DomainId, DomainError> {
        let features = *self.features();
        if !features.stage2 {
            return Err(DomainError::Unsupported(Unsupported::NoStage2));
        }
        self.stalls_forced()?;
        self.book().check_free_slot()?;
        self.create_claimed(memory, |smmu| {
            let table = smmu.new_table(memory, Stage::Two, options.input_bits)?;
            let vmid = smmu.core.allocate_vmid().map_err(DomainError::Id)?;
            let config = smmu.stage2_config(vmid, &table);
            Ok(Translation::Stage2 {
                table,
                vmid,
                config,
                children: 0,
            })
        })
    }

    /// Claims `memory` for a new domain, builds its translation with `build` and records it. When the memory is a
    /// handover memory another domain owns, nothing is allocated; when `build` fails (having given back what it
    /// took), so does the claim.
    pub(super) fn create_claimed(
        &self,
        memory: DomainMemory,
        build: impl FnOnce(&Self) -> Result<Translation, DomainError>,
    ) -> Result<DomainId, DomainError> {
        // A sealed memory (a preserved domain's or the SMMU's own, while a hand-off is prepared) hands out nothing:
        // refused as such, not as the allocation failure it would become.
        if memory.sealed() {
            return Err(DomainError::MemorySealed);
        }
        if !memory.take_ownership() {
            return Err(DomainError::MemoryOwned);
        }
        // Built without any lock of the domain table (tables, IDs and the CD come from their own allocators):
        // only the slot is taken under the bookkeeping's lock.
        let translation = build(self).inspect_err(|_| memory.give_up_ownership())?;
        let inserted = {
            let mut book = self.book();
            self.domains.insert(&mut book, DomainState::new(translation, memory))
        };
        inserted.map_err(|state| {
            // The last slot went to another CPU's domain meanwhile: undo.
            self.release_ids(&state);
            drop(state);
            memory.give_up_ownership();
            DomainError::NoDomainSlot { capacity: D }
        })
    }

    /// Creates a nested domain: the guest's stage 1 (`guest`, its CD table at an IPA) inside the stage-2 domain
    /// `parent`, whose VMID it shares. The parent cannot be freed while nested domains use it.
    ///
    /// # Errors
    /// [`DomainError::Unsupported`] on an SMMU that cannot nest (both stages and no erratum against it),
    /// [`DomainError::StaleDomain`] / [`DomainError::WrongKind`] for a parent that is not a live stage-2 domain,
    /// [`DomainError::Unsupported`] for a guest CD table the SMMU cannot index (more substreams than SSIDSIZE),
    /// [`DomainError::NoDomainSlot`].
    pub fn create_nested(&self, parent: DomainId, guest: GuestStage1) -> Result<DomainId, DomainError> {
        let features = *self.features();
        if !features.nesting {
            return Err(DomainError::Unsupported(Unsupported::NoNesting));
        }
        if guest.cd_max_log2 > features.ssid_bits {
            return Err(DomainError::Unsupported(Unsupported::GuestCdTableTooLarge {
                cd_max_log2: guest.cd_max_log2,
                ssid_bits: features.ssid_bits,
            }));
        }
        if !guest.cd_table.is_multiple_of(64) {
            return Err(DomainError::Entry(EntryError::Misaligned {
                field: "S1ContextPtr",
                address: guest.cd_table,
                alignment: 64,
            }));
        }
        // The child is counted under the parent's write lock, where a free checks the count: the parent cannot be
        // freed from then on. The bookkeeping for the slot; the parent's lock is dropped before the new slot's is
        // taken (one slot lock at a time).
        let mut book = self.book();
        book.check_free_slot()?;
        let (memory, vmid, stage2) = {
            let mut state = self.domains.get_mut(parent)?;
            let memory = state.memory;
            let Translation::Stage2 {
                children, vmid, config, ..
            } = &mut state.translation
            else {
                return Err(DomainError::WrongKind {
                    domain: parent,
                    kind: state.kind(),
                    wanted: Wanted::Stage2Parent,
                });
            };
            *children += 1;
            (memory, *vmid, *config)
        };
        let nested = Translation::Nested {
            parent,
            guest,
            vmid,
            stage2,
        };
        self.domains
            .insert(&mut book, DomainState::new(nested, memory))
            .map_err(|_| {
                // Checked above under the same lock; kept as an error rather than a panic.
                if let Ok(mut state) = self.domains.get_mut(parent)
                    && let Translation::Stage2 { children, .. } = &mut state.translation
                {
                    *children -= 1;
                }
                DomainError::NoDomainSlot { capacity: D }
            })
    }

    /// Creates a blocked domain: every stream attached to it aborts (its STE's Config = abort), as an unattached
    /// stream does, but owned by a domain (so no raw call can change it, and `attach` works the same for every
    /// kind). Nothing is allocated.
    ///
    /// # Errors
    /// [`DomainError::NoDomainSlot`].
    pub fn create_blocked(&self) -> Result<DomainId, DomainError> {
        self.create_fixed(Fixed::Blocked)
    }

    /// Creates a bypass domain: every stream attached to it bypasses translation (STE.Config = bypass), its
    /// device reaching all of physical memory. An explicit opt-in, for devices the hypervisor trusts as it trusts
    /// itself.
    ///
    /// # Safety
    /// A device attached to it can read and write any memory, the hypervisor's, the driver's tables and every
    /// other domain's included: the caller must trust every device it attaches (and what controls it) with all of
    /// it. Nothing else this driver guarantees holds for those devices.
    ///
    /// # Errors
    /// [`DomainError::NoDomainSlot`].
    pub unsafe fn create_bypass(&self) -> Result<DomainId, DomainError> {
        self.create_fixed(Fixed::Bypass)
    }

    fn create_fixed(&self, kind: Fixed) -> Result<DomainId, DomainError> {
        let mut book = self.book();
        book.check_free_slot()?;
        self.domains
            .insert(&mut book, DomainState::new(Translation::Fixed(kind), &NO_MEMORY))
            .map_err(|_| DomainError::NoDomainSlot { capacity: D })
    }

    /// Creates an identity domain: `ranges` (RAM the devices may reach, physical) mapped 1:1 through a real
    /// stage-2 table (`stage2`, as a stage-2 domain's with the SMMU's output size, at most 48 bits) or stage-1
    /// table (48-bit input), from `memory`; everything else faults. Its mappings are fixed: map, unmap, protect and
    /// trim are refused ([`DomainError::WrongKind`]); attach works as for any domain.
    ///
    /// # Errors
    /// As [`Iommu::create_stage1`] / [`Iommu::create_stage2`], and as [`Iommu::map`] for a range (one that
    /// reaches protected memory, is unaligned, or beyond the input size): the domain is freed again then.
    pub fn create_identity(
        &self,
        memory: DomainMemory,
        stage2: bool,
        ranges: &[crate::mem::Extent],
    ) -> Result<DomainId, DomainError> {
        let domain = if stage2 {
            let input_bits = self.features().oas_bits.clamp(32, 48);
            self.create_stage2(memory, Stage2Options { input_bits })?
        } else {
            self.create_stage1(
                memory,
                Stage1Options {
                    input_bits: 48,
                    el2: false,
                },
            )?
        };
        let prot = crate::pgtable::Prot::READ | crate::pgtable::Prot::WRITE | crate::pgtable::Prot::CACHEABLE;
        for range in ranges {
            if let Err(e) = self.map(domain, Iova(range.base), PhysAddr(range.base), range.len, prot) {
                let _ = self.free_domain(domain);
                return Err(e);
            }
        }
        self.domains.get_mut(domain)?.identity = true;
        Ok(domain)
    }

    pub(super) fn release_ids(&self, state: &DomainState) {
        match state.translation {
            Translation::Stage1 { asid, .. } => {
                let _ = self.core.release_asid(asid);
            }
            Translation::Stage2 { vmid, .. } => {
                let _ = self.core.release_vmid(vmid);
            }
            Translation::Nested { .. } | Translation::Fixed(_) => {}
        }
    }

    /// The kind of `domain`.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`].
    pub fn domain_kind(&self, domain: DomainId) -> Result<DomainKind, DomainError> {
        Ok(self.domains.get(domain)?.kind())
    }

    /// Copies the (StreamID, SubstreamID) pairs attached to `domain` (SubstreamID 0: the whole stream), in the
    /// order they were attached, into `out` (as many as fit), and returns how many the domain has: a count larger
    /// than `out` says the copy is the first `out.len()` of them.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`] (nothing written).
    pub fn attachments(&self, domain: DomainId, out: &mut [(u32, u32)]) -> Result<usize, DomainError> {
        let state = self.domains.get(domain)?;
        for (slot, pair) in out.iter_mut().zip(self.domains.attachments(&state)) {
            *slot = pair;
        }
        Ok(state.attachments.len())
    }

    /// The page table of a stage-1 or stage-2 domain (for inspection: its format, geometry, tables).
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`], [`DomainError::WrongKind`] for a nested domain (the guest owns its tables).
    pub fn domain_table(&self, domain: DomainId) -> Result<TableRef<'_>, DomainError> {
        let state = self.domains.get(domain)?;
        match &state.translation {
            Translation::Stage1 { .. } | Translation::Stage2 { .. } => Ok(TableRef(state)),
            Translation::Nested { .. } | Translation::Fixed(_) => Err(DomainError::WrongKind {
                domain,
                kind: state.kind(),
                wanted: Wanted::Stage1OrStage2,
            }),
        }
    }

    /// Frees `domain`: its TLB entries are dropped (and the CMD_SYNC waited for) before its tables go back to its
    /// memory and its ASID or VMID is freed. The handle (and every copy of it) is stale afterwards.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`], [`DomainError::StillAttached`] while streams are attached,
    /// [`DomainError::HasNestedDomains`] for a stage-2 parent in use, [`DomainError::Preserved`] for a preserved
    /// domain (unpreserve it first): nothing changes. [`DomainError::Invalidation`] when the invalidation failed:
    /// the domain is kept as it was. While the free waits for its invalidation, other calls naming the domain fail
    /// with [`DomainError::StaleDomain`] (it is on its way out; if the invalidation fails it comes back as it was).
    pub fn free_domain(&self, domain: DomainId) -> Result<(), DomainError> {
        // An EL2 domain's free holds the bookkeeping throughout: its TLBI_EL2_ALL settles the EL2 debt, which no
        // other EL2 detach may change meanwhile. Any other free takes the bookkeeping only to give the slot back.
        // The slot's read lock goes before the bookkeeping is taken (the lock order).
        let el2 = self.domains.get(domain)?.is_el2();
        let el2_book = el2.then(|| self.book());
        // Checked and taken out of the slot under its write lock, at once: nothing can attach to it, nest under it
        // or preserve it from then on (each of those adds its reference under the same lock, and the slot is empty:
        // every handle fails with `StaleDomain` meanwhile). The slot is not free yet.
        let state = self.domains.take_for_free(domain, |state| {
            if !state.attachments.is_empty() {
                return Err(DomainError::StillAttached {
                    domain,
                    attachments: state.attachments.len(),
                });
            }
            if let Translation::Stage2 { children, .. } = state.translation
                && children > 0
            {
                return Err(DomainError::HasNestedDomains { domain, children });
            }
            if let Some(token) = state.token {
                return Err(DomainError::Preserved { domain, token });
            }
            Ok(())
        })?;
        let command = match self.whole_invalidation_of(&state) {
            Ok(command) => command,
            Err(e) => {
                self.domains.put_back(domain, state);
                return Err(e);
            }
        };
        if let Some(command) = command {
            let mut batch = Batch::new();
            let submitted = batch
                .push(&command)
                .map_err(DomainError::from)
                .and_then(|()| self.core.submit(&batch).map_err(DomainError::from));
            if let Err(e) = submitted {
                // Still cached, maybe: the domain stays as it was.
                self.domains.put_back(domain, state);
                return Err(e);
            }
        }
        let mut book = el2_book.unwrap_or_else(|| self.book());
        if command == Some(Command::TlbiEl2All) {
            // Every EL2 entry is gone, a previous domain's stale ones too.
            book.el2_stale = false;
        }
        self.domains.release_slot(&mut book, domain);
        drop(book);
        self.release_ids(&state);
        match state.translation {
            Translation::Nested { parent, .. } => {
                if let Ok(mut parent) = self.domains.get_mut(parent)
                    && let Translation::Stage2 { children, .. } = &mut parent.translation
                {
                    *children -= 1;
                }
            }
            Translation::Stage1 { mut table, .. } | Translation::Stage2 { mut table, .. } => {
                if let Some(gather) = state.unflushed {
                    // SAFETY: the whole-domain invalidation above covered it, and its CMD_SYNC completed. A
                    // refusal cannot happen (`unflushed` holds only this table's gathers); its tables would leak.
                    let _ = unsafe { table.release(gather) };
                }
                // Dropping the table returns its frames: nothing can walk it after the invalidation.
                drop(table);
                // Memory this domain owned alone (a handover memory) is free for another domain.
                // SAFETY: the domain has no attachments (checked above), so its streams' CD tables went back at
                // detach; its TLB entries are gone and its page table went back just above.
                unsafe { state.memory.retire() };
            }
            Translation::Fixed(_) => {}
        }
        Ok(())
    }
}

/// A stage-1 or stage-2 domain's page table, read-locked (see [`Iommu::domain_table`]): the domain's
/// structural operations wait while it is held, so hold it briefly and never across a call on the same domain.
pub struct TableRef<'a>(super::table::StateRef<'a>);

impl core::ops::Deref for TableRef<'_> {
    type Target = IoPageTable<DomainMemory>;
    fn deref(&self) -> &IoPageTable<DomainMemory> {
        match &self.0.translation {
            Translation::Stage1 { table, .. } | Translation::Stage2 { table, .. } => table,
            // Made only over a stage-1 or stage-2 domain, which stays one while the guard lives.
            Translation::Nested { .. } | Translation::Fixed(_) => {
                unreachable!("a TableRef is made over a paging domain")
            }
        }
    }
}

/// The memory of a domain without a table (blocked, bypass): hands out nothing.
pub(super) struct NoMemory;

pub(super) static NO_MEMORY: NoMemory = NoMemory;

// SAFETY: hands out no block, so there is nothing to uphold.
unsafe impl crate::mem::FrameAllocator for NoMemory {
    fn allocate_zeroed(&self, size: usize, _align: usize) -> Result<crate::mem::DmaBlock, crate::mem::AllocError> {
        Err(crate::mem::AllocError::OutOfMemory { size })
    }

    unsafe fn free(&self, _block: crate::mem::DmaBlock) {}

    fn phys_to_virt(&self, _phys: crate::mem::PhysAddr) -> Option<core::ptr::NonNull<u8>> {
        None
    }
}
