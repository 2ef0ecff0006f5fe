//! Preserving domains under tokens for a live update: the token index (collisions found in O(1)), nested domains
//! after their parents, nothing preserved or unpreserved while a hand-off is prepared.

use crate::ids::DomainId;
use crate::mem::FrameAllocator;
use crate::mem::MemoryHooks;

use super::{Capacity, DomainError, Iommu, Translation};

impl<A: FrameAllocator, const D: usize> Iommu<A, D> {
    /// Preserves `domain` under `token` for a live update: [`Iommu::handover_records`] will record it, and
    /// the next image rebuilds it by this token. The domain stays fully usable (map, unmap, attach, detach); what
    /// is recorded is its state when the handover is prepared. A stage-1 or stage-2 domain must have been created
    /// with a handover memory as its memory; a nested domain's stage-2 parent must be preserved first (its record
    /// names the parent by token).
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`], [`DomainError::TokenInUse`] (found in O(1) through the token index),
    /// [`DomainError::AlreadyPreserved`], [`DomainError::NotHandoverMemory`], [`DomainError::ParentNotPreserved`],
    /// [`DomainError::TooMany`] when the token index is full (it holds as many as the domain table); [`DomainError::HandoverPrepared`] between
    /// `prepare_handover` and `cancel_handover` (the region is written: a domain preserved now would silently not
    /// come back); [`DomainError::TokenInUse`] also for a token a restored domain still waits under (until
    /// `retrieve` or `finish_handover`). Nothing changes then.
    pub fn preserve(&self, domain: DomainId, token: u64) -> Result<(), DomainError> {
        let mut book = self.book();
        let state = self.domains.get(domain)?;
        if self.domains.handover_prepared() {
            return Err(DomainError::HandoverPrepared { token });
        }
        if let Some(&holder) = book.tokens.get(&token) {
            return Err(DomainError::TokenInUse { token, domain: holder });
        }
        if let Some(&holder) = book.restored.get(&token) {
            return Err(DomainError::TokenInUse { token, domain: holder });
        }
        if let Some(token) = state.token {
            return Err(DomainError::AlreadyPreserved { domain, token });
        }
        let parent = match state.translation {
            Translation::Nested { parent, .. } => Some(parent),
            _ => {
                if !state.memory.survives_handover() {
                    return Err(DomainError::NotHandoverMemory(domain));
                }
                None
            }
        };
        drop(state);
        // Whether the parent is preserved: its token, read under its own lock once the nested domain's is let go
        // (a parent's token changes only under the bookkeeping, held here). O(1), whatever the number preserved.
        if let Some(parent) = parent
            && !self.domains.get(parent).is_ok_and(|p| p.token.is_some())
        {
            return Err(DomainError::ParentNotPreserved { domain, parent });
        }
        if book.tokens.insert(token, domain).is_err() {
            return Err(DomainError::TooMany(Capacity::PreservedDomains));
        }
        // A free that took the domain since the look above (a free does not take the bookkeeping) makes this fail:
        // the token goes again.
        match self.domains.get_mut(domain) {
            Ok(mut state) => state.token = Some(token),
            Err(e) => {
                book.tokens.swap_remove(&token);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Drops the preservation of the domain preserved under `token`: it is no longer recorded for a live update
    /// (the domain itself is untouched). Returns the domain.
    ///
    /// # Errors
    /// [`DomainError::UnknownToken`]; [`DomainError::NestedStillPreserved`] for a stage-2 parent whose nested
    /// domains are preserved; [`DomainError::HandoverPrepared`] between `prepare_handover` and `cancel_handover`
    /// (the region records the domain, and unpreserving cannot take the record back). Nothing changes then.
    pub fn unpreserve(&self, token: u64) -> Result<DomainId, DomainError> {
        let mut book = self.book();
        let domain = *book.tokens.get(&token).ok_or(DomainError::UnknownToken(token))?;
        // The region records every preserved domain while a hand-off is prepared.
        if self.domains.handover_prepared() {
            return Err(DomainError::HandoverPrepared { token });
        }
        // Only a stage-2 parent with nested domains can have preserved ones under it: the scan over the preserved
        // domains (each read-locked in turn) is for those alone, so unpreserving any other domain is O(1).
        let parent_of_nested = self
            .domains
            .get(domain)
            .is_ok_and(|s| matches!(s.translation, Translation::Stage2 { children, .. } if children > 0));
        let nested_preserved = parent_of_nested
            && book.tokens.values().any(|&id| {
                self.domains.get(id).is_ok_and(|s| {
                    s.token.is_some() && matches!(s.translation, Translation::Nested { parent, .. } if parent == domain)
                })
            });
        if nested_preserved {
            return Err(DomainError::NestedStillPreserved { token });
        }
        book.tokens.swap_remove(&token);
        if let Ok(mut state) = self.domains.get_mut(domain) {
            state.token = None;
        }
        Ok(domain)
    }

    /// The domain preserved under `token`, if any (O(1)).
    pub fn preserved(&self, token: u64) -> Option<DomainId> {
        self.book().tokens.get(&token).copied()
    }

    /// The token `domain` is preserved under, if any.
    ///
    /// # Errors
    /// [`DomainError::StaleDomain`].
    pub fn token_of(&self, domain: DomainId) -> Result<Option<u64>, DomainError> {
        Ok(self.domains.get(domain)?.token)
    }
}
