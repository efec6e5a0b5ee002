//! The `local` ledger backend: an append-only hash chain of signed checkpoints in the ledger
//! database (`<data>/ledger/`). Each entry holds the SHA-256 of the entry before it, so an
//! entry edited, reordered or removed from the middle breaks the chain at the next one; one
//! removed from the end is found by `verify`, which finds a stored checkpoint neither anchored
//! nor pending.
//!
//! Entry encoding version 1, integers big-endian:
//!
//! ```text
//! u8   0x01          version
//! u64  index         the entry's place in the chain, from 0
//! [32] previous      SHA-256 of the previous entry's bytes (32 zero bytes for entry 0)
//! i64  anchored_at   µs since the Unix epoch, UTC
//! u64  tree size     of the checkpoint
//! [32] root          of the checkpoint
//! u32  length, then the checkpoint's signed note (UTF-8), exactly as signed
//! ```
//!
//! An entry's hash is SHA-256 of these bytes.

use std::sync::{Arc, Mutex};

use ring::digest::{digest, SHA256};

use super::db::LedgerDb;
use super::{Anchor, AnchorStatus, BoxFuture, Ledger, LedgerError, Receipt, Submission};
use crate::model::reading::now_micros;
use crate::seal::checkpoint::Checkpoint;
use crate::seal::merkle::{to_hex, Hash};

pub const ENTRY_VERSION: u8 = 1;

/// One entry of the chain, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainEntry {
    pub index: u64,
    pub previous: Hash,
    pub anchored_at: i64,
    pub size: u64,
    pub root: Hash,
    pub note: String,
}

impl ChainEntry {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 8 + 32 + 8 + 8 + 32 + 4 + self.note.len());
        out.push(ENTRY_VERSION);
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.previous);
        out.extend_from_slice(&self.anchored_at.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.root);
        out.extend_from_slice(&(self.note.len() as u32).to_be_bytes());
        out.extend_from_slice(self.note.as_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        const FIXED: usize = 1 + 8 + 32 + 8 + 8 + 32 + 4;
        if bytes.len() < FIXED {
            return Err(format!("{} bytes, shorter than any entry", bytes.len()));
        }
        if bytes[0] != ENTRY_VERSION {
            return Err(format!("entry version {} is not known", bytes[0]));
        }
        let u64_at = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8"));
        let hash_at = |at: usize| -> Hash { bytes[at..at + 32].try_into().expect("32") };
        let len = u32::from_be_bytes(bytes[89..93].try_into().expect("4")) as usize;
        if bytes.len() != FIXED + len {
            return Err(format!(
                "its note is said to be {len} bytes, {} follow",
                bytes.len() - FIXED
            ));
        }
        Ok(ChainEntry {
            index: u64_at(1),
            previous: hash_at(9),
            anchored_at: u64_at(41) as i64,
            size: u64_at(49),
            root: hash_at(57),
            note: String::from_utf8(bytes[FIXED..].to_vec())
                .map_err(|_| "its note is not UTF-8".to_owned())?,
        })
    }

    pub fn hash(bytes: &[u8]) -> Hash {
        digest(&SHA256, bytes)
            .as_ref()
            .try_into()
            .expect("32 bytes")
    }
}

/// The embedded hash chain.
pub struct LocalChain {
    db: Arc<LedgerDb>,
    /// One append at a time: the head is read, then written.
    append: Mutex<()>,
}

impl LocalChain {
    pub fn new(db: Arc<LedgerDb>) -> Self {
        LocalChain {
            db,
            append: Mutex::new(()),
        }
    }

    fn receipt(&self, index: u64) -> Result<Option<(ChainEntry, Receipt)>, LedgerError> {
        let Some(bytes) = self
            .db
            .chain
            .get(index.to_be_bytes())
            .map_err(|e| self.db.error(e))?
        else {
            return Ok(None);
        };
        let entry = ChainEntry::decode(&bytes)
            .map_err(|reason| self.db.error(format!("chain entry {index}: {reason}")))?;
        let receipt = Receipt::Local {
            index,
            entry_hash: to_hex(&ChainEntry::hash(&bytes)),
            anchored_at: entry.anchored_at,
        };
        Ok(Some((entry, receipt)))
    }

    /// The entry anchoring the checkpoint of `size`, if any.
    fn by_size(&self, size: u64) -> Result<Option<(ChainEntry, Receipt)>, LedgerError> {
        match self
            .db
            .chain_sizes
            .get(size.to_be_bytes())
            .map_err(|e| self.db.error(e))?
        {
            None => Ok(None),
            Some(v) => self.receipt(self.db.u64_of(format_args!("chain size {size}"), &v)?),
        }
    }

    fn matches(entry: &ChainEntry, c: &Checkpoint) -> bool {
        entry.size == c.size && entry.root == c.root
    }

    fn append(&self, anchor: &Anchor) -> Result<Submission, LedgerError> {
        #[cfg(feature = "failpoints")]
        fail::fail_point!("ledger-local-append", |_| Err(LedgerError::Unavailable {
            ledger: "local".into(),
            reason: "fault injected".into(),
        }));
        let _one = self.append.lock().unwrap_or_else(|e| e.into_inner());
        let c = &anchor.checkpoint;
        if let Some((entry, _)) = self.by_size(c.size)? {
            // Anchored before (a retry after a crash): harmless, the same entry.
            if Self::matches(&entry, c) {
                return Ok(Submission {
                    reference: entry.index.to_string(),
                    submitted_at: entry.anchored_at,
                });
            }
            return Err(LedgerError::Refused {
                ledger: "local".into(),
                reason: format!(
                    "chain entry {} anchors another checkpoint of tree size {}",
                    entry.index, c.size
                ),
            });
        }
        let (index, previous) = match self.db.chain.last().map_err(|e| self.db.error(e))? {
            None => (0, [0u8; 32]),
            Some((k, v)) => (self.db.u64_of("chain key", &k)? + 1, ChainEntry::hash(&v)),
        };
        let entry = ChainEntry {
            index,
            previous,
            anchored_at: now_micros(),
            size: c.size,
            root: c.root,
            note: anchor.note.clone(),
        };
        let bytes = entry.encode();
        use sled::Transactional;
        (&self.db.chain, &self.db.chain_sizes)
            .transaction(|(chain, sizes)| {
                chain.insert(&index.to_be_bytes(), bytes.as_slice())?;
                sizes.insert(&c.size.to_be_bytes(), &index.to_be_bytes())?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| self.db.error(format!("{e:?}")))?;
        self.db.durable()?;
        Ok(Submission {
            reference: index.to_string(),
            submitted_at: entry.anchored_at,
        })
    }

    /// Every entry of the chain in order, each with its hash, checked against the one before:
    /// the first break is an error naming the entry.
    pub fn walk(
        db: &LedgerDb,
        each: &mut dyn FnMut(&ChainEntry, &Hash) -> Result<(), String>,
    ) -> Result<u64, String> {
        let mut previous = [0u8; 32];
        let mut n = 0u64;
        for kv in db.chain.iter() {
            let (k, v) = kv.map_err(|e| format!("reading the chain: {e}"))?;
            let key = db.u64_of("a chain key", &k).map_err(|e| e.to_string())?;
            let entry = ChainEntry::decode(&v).map_err(|r| format!("chain entry {key}: {r}"))?;
            if key != n || entry.index != n {
                return Err(format!(
                    "chain entry {key} (index {}) is where entry {n} should be: entries were \
                     removed or reordered",
                    entry.index
                ));
            }
            if entry.previous != previous {
                return Err(format!(
                    "chain entry {n} does not hold the hash of entry {}: an entry before it was \
                     edited, removed or reordered",
                    n.wrapping_sub(1)
                ));
            }
            previous = ChainEntry::hash(&v);
            each(&entry, &previous)?;
            n += 1;
        }
        Ok(n)
    }
}

impl Ledger for LocalChain {
    fn name(&self) -> &str {
        "local"
    }

    fn submit<'a>(&'a self, anchor: &'a Anchor) -> BoxFuture<'a, Result<Submission, LedgerError>> {
        Box::pin(async move { self.append(anchor) })
    }

    fn status<'a>(
        &'a self,
        anchor: &'a Anchor,
        submission: &'a Submission,
    ) -> BoxFuture<'a, Result<AnchorStatus, LedgerError>> {
        Box::pin(async move {
            let Ok(index) = submission.reference.parse::<u64>() else {
                return Ok(AnchorStatus::Dropped);
            };
            Ok(match self.receipt(index)? {
                Some((entry, receipt)) if Self::matches(&entry, &anchor.checkpoint) => {
                    AnchorStatus::Confirmed(receipt)
                }
                _ => AnchorStatus::Dropped,
            })
        })
    }

    fn find<'a>(
        &'a self,
        anchor: &'a Anchor,
    ) -> BoxFuture<'a, Result<Option<Receipt>, LedgerError>> {
        Box::pin(async move {
            Ok(match self.by_size(anchor.checkpoint.size)? {
                Some((entry, receipt)) if Self::matches(&entry, &anchor.checkpoint) => {
                    Some(receipt)
                }
                _ => None,
            })
        })
    }
}
