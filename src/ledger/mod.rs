//! The node's append-only log of batch roots, its signed checkpoints, and the [`Ledger`] seam
//! that anchors them.
//!
//! Batch `i`'s root is leaf `i` of an RFC 6962 log; a checkpoint is a C2SP signed note of that
//! log's size and root, signed with the node key. A ledger backend (the embedded hash chain, an
//! Ethereum-compatible chain) takes a signed checkpoint and returns a receipt; backends plug in
//! here through the trait.

use crate::seal::checkpoint::{Checkpoint, NoteError, NoteSigner};
use crate::seal::merkle::{self, Hash};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("batch {0} has a malformed root")]
    BadRoot(u64),
    #[error("batch ids are not contiguous: expected {expected}, found {found}")]
    Gap { expected: u64, found: u64 },
    #[error("signing: {0}")]
    Note(#[from] NoteError),
    /// The backend could not anchor now; the checkpoint stays queued and is retried.
    #[error("{ledger} is unavailable: {reason}")]
    Unavailable { ledger: String, reason: String },
    #[error("{ledger} refused the checkpoint: {reason}")]
    Refused { ledger: String, reason: String },
}

/// What a ledger returns for an anchored checkpoint: enough to find and check it there.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Receipt {
    pub ledger: String,
    /// Backend-specific: a block hash and index, a transaction hash, …
    pub reference: String,
    pub anchored_at: i64,
}

/// A ledger backend.
pub trait Ledger: Send + Sync {
    fn name(&self) -> &str;
    /// Anchors one signed checkpoint (its note text, as signed). Must be idempotent: the outbox
    /// may offer the same checkpoint again after a crash.
    fn anchor(&self, checkpoint: &Checkpoint, signed_note: &str) -> Result<Receipt, LedgerError>;
}

/// The leaves of the log: every stored batch's root, in batch order.
pub fn log_leaves(store: &dyn Store) -> Result<Vec<Hash>, LedgerError> {
    store
        .headers()?
        .iter()
        .enumerate()
        .map(|(i, h)| {
            if h.id != i as u64 {
                return Err(LedgerError::Gap {
                    expected: i as u64,
                    found: h.id,
                });
            }
            h.root_hash().ok_or(LedgerError::BadRoot(h.id))
        })
        .collect()
}

/// The origin line of this node's checkpoints.
pub fn origin(signer: &NoteSigner) -> String {
    signer.name().to_owned()
}

/// The current checkpoint of the log, and its signed note.
pub fn checkpoint(
    store: &dyn Store,
    signer: &NoteSigner,
) -> Result<(Checkpoint, String), LedgerError> {
    let leaves = log_leaves(store)?;
    let c = Checkpoint {
        origin: origin(signer),
        size: leaves.len() as u64,
        root: merkle::root(&leaves),
    };
    let note = signer.sign(&c.to_text())?;
    Ok((c, note))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::batch::{BatchBuilder, Row};
    use crate::model::reading::Metric;
    use crate::seal::checkpoint::NoteVerifier;
    use crate::seal::crypt::MasterKey;
    use crate::seal::Sealer;
    use crate::store::SledStore;

    #[test]
    fn checkpoints_sign_the_log_of_batch_roots() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let sealer = Sealer::new(MasterKey::from_bytes(&[5u8; 32]).unwrap());
        let signer = NoteSigner::from_seed("iomt-edge/ward", &[6u8; 32]).unwrap();
        let verifier = NoteVerifier::parse(&signer.verifier_key()).unwrap();

        let (empty, _) = checkpoint(&store, &signer).unwrap();
        assert_eq!((empty.size, empty.root), (0, merkle::empty_root()));

        let mut roots = Vec::new();
        let mut b = BatchBuilder::new(0, 4);
        for id in 0..3u64 {
            b.push(Row {
                ts: id as i64,
                received: 0,
                source: "d",
                subject: None,
                metric: Metric::HeartRate,
                value: Some(60.0 + id as f64),
                text: None,
                flags: 0,
            });
            let sealed = sealer.seal(id, b.take()).unwrap();
            roots.push(sealed.header.root_hash().unwrap());
            store.put_batch(&sealed).unwrap();
        }
        let (c, note) = checkpoint(&store, &signer).unwrap();
        assert_eq!(c.size, 3);
        assert_eq!(c.root, merkle::root(&roots));
        let text = verifier.verify(&note).unwrap();
        assert_eq!(Checkpoint::parse(text).unwrap(), c);
        // Each batch root is provably in the checkpoint.
        for (i, r) in roots.iter().enumerate() {
            let path = merkle::inclusion_proof(&roots, i).unwrap();
            merkle::verify_inclusion(r, i as u64, 3, &path, &c.root).unwrap();
        }
    }
}
