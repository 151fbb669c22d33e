//! History stores: where a core keeps its documents' operations and
//! snapshots beyond the in-memory rings, behind one interface
//! ([`HistoryStore`]).
//!
//! - [`MemoryStore`]: today's behaviour. History lives in the document hub
//!   only and dies with it (on unload or restart); every document starts a
//!   new epoch when it is loaded.
//! - [`log::LogStore`]: each core's own segmented write-ahead log under
//!   `storage.dir`, on glommio's io_uring DMA file API, recovered at start
//!   ([`recover`]). `docs/storage.md` describes the format.
//!
//! The interface is what a document needs: append, read a range, the latest
//! snapshot, the epoch; plus the notion of a record being *stored*, which an
//! acknowledgement waits for.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

pub mod index;
pub mod log;
pub mod record;
pub mod recover;

/// A boxed future on one core.
pub type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// The identity of one history of a document: chosen when the history
/// starts, kept as long as the history is (`docs/protocol.md`, "Epochs").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch(pub u64);

impl Epoch {
    /// A new epoch, unlike any other with overwhelming probability.
    pub fn random() -> Epoch {
        Epoch(crate::clock::unique_u64().max(1))
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Identifies an appended record; tickets grow by one per append, on a core.
pub type Ticket = u64;

/// Why a store cannot take or give a record.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Writing failed (disk full, I/O error); the store refuses appends for a
    /// while and then tries again.
    #[error("storage is unavailable: {0}")]
    Unavailable(String),
    /// Reading a stored record failed.
    #[error("reading stored history failed: {0}")]
    Read(String),
}

/// A snapshot as stored.
#[derive(Debug, Clone)]
pub struct StoredSnapshot {
    pub seq: u64,
    pub state: Box<[u8]>,
}

/// What the store knows of a document without reading anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub epoch: Epoch,
    /// Seq of the last stored operation.
    pub seq: u64,
    /// Oldest seq whose operation can be read back (`seq + 1` when none).
    pub oldest: u64,
}

/// A core's history store (`docs/storage.md`). Appends are synchronous and
/// cheap (they queue); a record is *stored* once [`HistoryStore::stored`]
/// reaches its ticket. All methods run on the owning core.
pub trait HistoryStore {
    /// The stored head of a document, if the store has any history of it.
    fn head(&self, document: &str) -> Option<Head>;

    /// Appends an accepted operation (`data`: its broadcast JSON) or a
    /// snapshot (`data`: its state). An error means nothing was queued.
    fn append(
        &self,
        document: &str,
        epoch: Epoch,
        kind: record::Kind,
        seq: u64,
        data: &[u8],
    ) -> Result<Ticket, StoreError>;

    /// Every ticket up to this one is stored.
    fn stored(&self) -> Ticket;

    /// Tickets above `stored()` up to this one failed and never will be.
    fn failed(&self) -> Ticket;

    /// Every ticket up to this one is written where a load would read it
    /// (differs from `stored()` with `fsync = "never"`, where a record counts
    /// as stored before it is written).
    fn written(&self) -> Ticket;

    /// Resolves when `stored() >= ticket` (`Ok`), or when a failure dropped
    /// every record after `stored()` (`Err`: they will never be stored).
    fn wait(&self, ticket: Ticket) -> LocalFuture<'_, Result<(), StoreError>>;

    /// The stored operations `from..=to` of a document, oldest first.
    fn read_range<'a>(
        &'a self,
        document: &'a str,
        from: u64,
        to: u64,
    ) -> LocalFuture<'a, Result<Vec<Box<[u8]>>, StoreError>>;

    /// The latest stored snapshot of a document.
    fn latest_snapshot<'a>(&'a self, document: &'a str) -> LocalFuture<'a, Result<Option<StoredSnapshot>, StoreError>>;
}

/// History in memory only: the hub's own, lost with it. Appends are stored
/// at once.
#[derive(Debug, Default)]
pub struct MemoryStore {
    tickets: std::cell::Cell<Ticket>,
}

impl HistoryStore for MemoryStore {
    fn head(&self, _document: &str) -> Option<Head> {
        None
    }

    fn append(&self, _: &str, _: Epoch, _: record::Kind, _: u64, _: &[u8]) -> Result<Ticket, StoreError> {
        let t = self.tickets.get() + 1;
        self.tickets.set(t);
        Ok(t)
    }

    fn stored(&self) -> Ticket {
        self.tickets.get()
    }

    fn failed(&self) -> Ticket {
        0
    }

    fn written(&self) -> Ticket {
        self.tickets.get()
    }

    fn wait(&self, _ticket: Ticket) -> LocalFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    fn read_range<'a>(&'a self, _: &'a str, _: u64, _: u64) -> LocalFuture<'a, Result<Vec<Box<[u8]>>, StoreError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn latest_snapshot<'a>(&'a self, _: &'a str) -> LocalFuture<'a, Result<Option<StoredSnapshot>, StoreError>> {
        Box::pin(async { Ok(None) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_print_as_16_hex_digits_and_differ() {
        let e = Epoch(0xab);
        assert_eq!(e.to_string(), "00000000000000ab");
        assert_ne!(Epoch::random(), Epoch::random());
    }
}
