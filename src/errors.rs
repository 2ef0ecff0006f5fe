//! [`core::error::Error`] for every public error of the crate, in one place, with what each wraps: an error that
//! carries another (a domain operation's [`MapError`], a restore's [`VerifyFailure`]) returns it from
//! [`Error::source`], so a caller's error report walks the chain down to the hardware's or the allocator's
//! refusal. A host test (`every_public_error_is_an_error`) finds every public type of the crate named `…Error`
//! or `…Failure` in the sources and checks it is listed here.

use core::error::Error;

use crate::board::IommuMapFull;
use crate::ctx::CdTableError;
use crate::domain::DomainError;
use crate::handover::live::RecordError;
use crate::handover::pool::PoolError;
use crate::handover::restore::{RebuildFailure, RestoreError};
use crate::handover::verify::VerifyFailure;
use crate::handover::{FinishError, PrepareError};
use crate::hitless::UpdateFailed;
use crate::hw::command::{CmdqConsError, CommandError, Unvetted};
use crate::hw::ste::EntryError;
use crate::ids::IdError;
use crate::mem::AllocError;
use crate::pgtable::{ForeignGather, MapError};
use crate::queue::cmdq::CommandQueueError;
use crate::queue::index::QueueGeometryError;
use crate::smmu::{AttachError, FlushError, GlobalError, InitError, InvalidationError, ProbeError};
use crate::stream::StreamError;

/// Errors that wrap nothing.
macro_rules! leaf_errors {
    ($($error:ty),* $(,)?) => {
        $(impl Error for $error {})*
    };
}

leaf_errors!(
    AllocError,
    CommandError,
    CmdqConsError,
    EntryError,
    ForeignGather,
    GlobalError,
    IdError,
    IommuMapFull,
    PoolError,
    ProbeError,
    QueueGeometryError,
    Unvetted,
);

impl<E: Error + 'static> Error for UpdateFailed<E> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.error)
    }
}

impl<E: Error + 'static> Error for CdTableError<E> {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            CdTableError::NoMemory(e) => Some(e),
            CdTableError::Invalidation(e) => Some(e),
            _ => None,
        }
    }
}

impl Error for MapError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            MapError::NoMemory(e) => Some(e),
            _ => None,
        }
    }
}

impl Error for StreamError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            StreamError::NoMemory(e) => Some(e),
            _ => None,
        }
    }
}

impl Error for CommandQueueError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            CommandQueueError::Encoding(e) => Some(e),
            _ => None,
        }
    }
}

impl Error for InvalidationError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            InvalidationError::Queue(e) => Some(e),
            _ => None,
        }
    }
}

impl Error for FlushError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.error)
    }
}

impl Error for AttachError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            AttachError::Stream(e) => Some(e),
            AttachError::Queue(e) => Some(e),
            AttachError::Invalidation(e) => Some(e),
            _ => None,
        }
    }
}

impl Error for InitError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            InitError::NoMemory(e) => Some(e),
            InitError::Invalidation(e) => Some(e),
            _ => None,
        }
    }
}

impl Error for DomainError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            DomainError::Stream(e) => Some(e),
            DomainError::Map(e) => Some(e),
            DomainError::Id(e) => Some(e),
            DomainError::Entry(e) => Some(e),
            DomainError::CdTable(e) => Some(e),
            DomainError::Attach(e) => Some(e),
            DomainError::Invalidation(e) => Some(e),
            _ => None,
        }
    }
}

impl Error for RecordError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            RecordError::Format(e) => Some(e),
            _ => None,
        }
    }
}

impl Error for PrepareError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            PrepareError::Pool(e) => Some(e),
            PrepareError::Records(e) => Some(e),
            PrepareError::Format(e) => Some(e),
            PrepareError::SelfCheck(e) | PrepareError::ExistingRegion(e) => Some(e),
            _ => None,
        }
    }
}

impl Error for VerifyFailure {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            VerifyFailure::Format(e) => Some(e),
            VerifyFailure::CdBuild(e) => Some(e),
            _ => None,
        }
    }
}

impl Error for RebuildFailure {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            RebuildFailure::Pool(e) => Some(e),
            RebuildFailure::Id(e) => Some(e),
            RebuildFailure::Table(e) => Some(e),
            RebuildFailure::CdTable(e) => Some(e),
            RebuildFailure::Attach(e) => Some(e),
            RebuildFailure::Domain(e) => Some(e),
        }
    }
}

impl Error for RestoreError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            RestoreError::Pool(e) => Some(e),
            RestoreError::Region(e) | RestoreError::Identity(e) => Some(e),
            RestoreError::UnrestoredStreams(e) => Some(e),
            RestoreError::Verify { what, .. } => Some(what),
            RestoreError::Rebuild { what, .. } => Some(what),
            _ => None,
        }
    }
}

impl Error for FinishError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            FinishError::Domain(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use std::string::{String, ToString};
    use std::vec::Vec;

    fn is_error<E: Error + 'static>() {}

    /// Every public type of the crate named `…Error` or `…Failure` (found in the sources, so that a new one cannot
    /// be missed) implements `core::error::Error`: those checked by the compiler below, each by name.
    #[test]
    fn every_public_error_is_an_error() {
        is_error::<AllocError>();
        is_error::<AttachError>();
        is_error::<CdTableError>();
        is_error::<CdTableError<CommandQueueError>>();
        is_error::<CommandError>();
        is_error::<CommandQueueError>();
        is_error::<CmdqConsError>();
        is_error::<DomainError>();
        is_error::<EntryError>();
        is_error::<FinishError>();
        is_error::<FlushError>();
        is_error::<ForeignGather>();
        is_error::<crate::handover::format::FormatError>();
        is_error::<GlobalError>();
        is_error::<crate::handover::format::HandoverError>();
        is_error::<IdError>();
        is_error::<InitError>();
        is_error::<InvalidationError>();
        is_error::<IommuMapFull>();
        is_error::<MapError>();
        is_error::<PoolError>();
        is_error::<PrepareError>();
        is_error::<ProbeError>();
        is_error::<crate::protected::ProtectError>();
        is_error::<QueueGeometryError>();
        is_error::<RebuildFailure>();
        is_error::<RecordError>();
        is_error::<RestoreError>();
        is_error::<StreamError>();
        is_error::<Unvetted>();
        is_error::<UpdateFailed<CommandQueueError>>();
        is_error::<VerifyFailure>();
        let checked = include_str!("errors.rs")
            .split("fn every_public_error_is_an_error")
            .nth(1)
            .unwrap_or_default();
        let mut found = Vec::new();
        let mut dirs = std::vec![std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    if !path.ends_with("tests") {
                        dirs.push(path);
                    }
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                for line in text.lines() {
                    let Some(rest) = line
                        .strip_prefix("pub enum ")
                        .or_else(|| line.strip_prefix("pub struct "))
                    else {
                        continue;
                    };
                    let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    if name.ends_with("Error") || name.ends_with("Failure") {
                        found.push((name, path.display().to_string()));
                    }
                }
            }
        }
        assert!(found.len() >= 25, "the scan found {found:?}");
        for (name, file) in found {
            assert!(
                checked.contains(&std::format!("{name}>")) || checked.contains(&std::format!("{name}<")),
                "{name} ({file}) is not checked to implement core::error::Error"
            );
        }
    }

    /// A domain operation's error reports the allocator's refusal as its source, two levels down.
    #[test]
    fn an_error_reports_what_it_wraps_as_its_source() {
        let oom = AllocError::OutOfMemory { size: 4096 };
        let error = DomainError::Map(MapError::NoMemory(oom));
        let map = error.source().unwrap();
        assert_eq!(map.to_string(), MapError::NoMemory(oom).to_string());
        assert_eq!(map.source().unwrap().to_string(), oom.to_string());
        assert!(map.source().unwrap().source().is_none());
        let restore = RestoreError::Rebuild {
            token: 7,
            what: RebuildFailure::Table(MapError::NoMemory(oom)),
        };
        let mut chain: Vec<String> = Vec::new();
        let mut next: Option<&(dyn Error + 'static)> = Some(&restore);
        while let Some(e) = next {
            chain.push(e.to_string());
            next = e.source();
        }
        assert_eq!(chain.len(), 4, "{chain:?}");
    }

    /// The payloads that replaced `&'static str` messages (issue 24) display as the messages did, words kept.
    #[test]
    fn payloads_display_as_the_messages_did() {
        use crate::domain::DomainKind;
        use crate::handover::restore::RestoreLimit;
        use crate::handover::verify::{DescriptorDefect, GuestContextLimit, SoftwareBitsDefect, TableTotal};
        use crate::ids::DomainId;
        use crate::{Capacity, Unsupported, Wanted};

        assert_eq!(
            DomainError::TooMany(Capacity::SubstreamsOfStream).to_string(),
            "too many substreams of the stream"
        );
        assert_eq!(
            DomainError::Unsupported(Unsupported::NoStage2).to_string(),
            "the SMMU cannot do this: no stage 2 (IDR0.S2P = 0)"
        );
        assert_eq!(
            DomainError::Unsupported(Unsupported::GuestCdTableTooLarge {
                cd_max_log2: 12,
                ssid_bits: 8
            })
            .to_string(),
            "the SMMU cannot do this: the guest's CD table has more substreams (2^12) than IDR1.SSIDSIZE (8 bits)"
        );
        let domain = DomainId::new(3, 1);
        assert_eq!(
            DomainError::WrongKind {
                domain,
                kind: DomainKind::Identity,
                wanted: Wanted::ChangingMappings,
            }
            .to_string(),
            std::format!(
                "{domain} is a identity domain; this needs a stage-1 or stage-2 domain whose mappings change (an \
                 identity domain's are fixed)"
            )
        );
        assert_eq!(
            RestoreError::BeyondLimits {
                token: 0x61,
                what: RestoreLimit::StreamAttached,
                value: 0x10,
            }
            .to_string(),
            "restore: record 0x61 needs a StreamID attached in this image 0x10, beyond this SMMU"
        );
        assert_eq!(
            RecordError::NoMemoryForLocks { domains: 3 }.to_string(),
            "too many preserved domains (3) for a handover record: no memory to hold their locks"
        );
        assert_eq!(
            VerifyFailure::BadDescriptor {
                entry: 0x1008,
                level: 3,
                descriptor: 0x1,
                what: DescriptorDefect::ReservedEncoding,
            }
            .to_string(),
            "level-3 descriptor at 0x1008 = 0x1: a reserved encoding (bits [1:0] = 0b01 at level 3)"
        );
        assert_eq!(
            VerifyFailure::BadDescriptor {
                entry: 0x10,
                level: 2,
                descriptor: 0x3,
                what: DescriptorDefect::TableBits,
            }
            .to_string(),
            "level-2 descriptor at 0x10 = 0x3: a table descriptor with bits this driver never sets (APTable, \
             XNTable, NSTable, address bits [51:48], ...)"
        );
        assert_eq!(
            VerifyFailure::SoftwareBits {
                entry: 0x20,
                descriptor: 0x3,
                what: SoftwareBitsDefect::MissingTrimMark,
            }
            .to_string(),
            "descriptor at 0x20 = 0x3: no trim mark, yet it leads to an emptied table"
        );
        assert_eq!(
            VerifyFailure::TableTotals {
                what: TableTotal::EmptiedTables,
                recorded: 2,
                walked: 1,
            }
            .to_string(),
            "2 emptied tables recorded, 1 walked"
        );
        assert_eq!(
            VerifyFailure::GuestContext {
                what: GuestContextLimit::CdTableIpaBeyondContextPtr,
                value: 1 << 52,
            }
            .to_string(),
            "its guest context has a CD table IPA beyond S1ContextPtr's 52 bits (0x10000000000000)"
        );
    }
}
