//! The ledger's own database, `<data>/ledger/`: the embedded hash chain of checkpoints (the
//! `local` backend), the outbox of anchors waiting for their ledger, and the receipts of those
//! done.
//!
//! Apart from the store on purpose: a store rolled back to an older copy, or edited, no longer
//! matches the checkpoints this database anchored, and `verify` says so.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::LedgerError;
use crate::store::SLED_LOG;

pub struct LedgerDb {
    path: PathBuf,
    db: sled::Db,
    /// The local chain: entry index (u64 BE) → the entry's bytes (`ledger/local.rs`).
    pub(super) chain: sled::Tree,
    /// Tree size of a checkpoint (u64 BE) → the index of its chain entry.
    pub(super) chain_sizes: sled::Tree,
    /// Tree size (u64 BE) → a pending anchor as JSON (`ledger/outbox.rs`).
    pub(super) outbox: sled::Tree,
    /// Tree size (u64 BE) → the receipt of its anchor as JSON.
    pub(super) receipts: sled::Tree,
    /// Tree size (u64 BE) → the signed note of the checkpoint anchored.
    pub(super) anchored_notes: sled::Tree,
    log: File,
}

impl std::fmt::Debug for LedgerDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerDb")
            .field("path", &self.path)
            .finish()
    }
}

impl LedgerDb {
    /// Opens (or creates) the ledger database at `path`.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let sled = |e: sled::Error| LedgerError::Db {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let db = crate::store::open_sled(sled::Config::new().path(path).cache_capacity(4 << 20))
            .map_err(sled)?;
        let log = crate::store::sled_log(path).map_err(|e| LedgerError::Db {
            path: path.join(SLED_LOG),
            reason: e.to_string(),
        })?;
        Ok(LedgerDb {
            path: path.to_owned(),
            chain: db.open_tree("chain").map_err(sled)?,
            chain_sizes: db.open_tree("chain_sizes").map_err(sled)?,
            outbox: db.open_tree("outbox").map_err(sled)?,
            receipts: db.open_tree("receipts").map_err(sled)?,
            anchored_notes: db.open_tree("anchored_notes").map_err(sled)?,
            db,
            log,
        })
    }

    /// Opens the ledger database at `path` only if it exists (commands that only read).
    pub fn open_existing(path: &Path) -> Result<Option<Self>, LedgerError> {
        if !path.join(SLED_LOG).is_file() {
            return Ok(None);
        }
        Self::open(path).map(Some)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn error(&self, e: impl std::fmt::Display) -> LedgerError {
        LedgerError::Db {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// A u64 key or value (big-endian), `what` naming it when it is not 8 bytes.
    pub(super) fn u64_of(
        &self,
        what: impl std::fmt::Display,
        bytes: &[u8],
    ) -> Result<u64, LedgerError> {
        bytes
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| self.error(format!("{what}: not 8 bytes")))
    }

    /// Flushes sled and `fdatasync`s its log ([`crate::store::make_durable`]).
    pub(super) fn durable(&self) -> Result<(), LedgerError> {
        crate::store::make_durable(&self.db, &self.log).map_err(|e| self.error(e))
    }
}
