//! The node's append-only log of batch roots, its signed checkpoints, and the [`Ledger`] seam
//! that anchors them.
//!
//! Batch `i`'s root is leaf `i` of an RFC 6962 log; a checkpoint is a C2SP signed note of that
//! log's size and root, signed with the node key. A ledger backend (the embedded hash chain, an
//! Ethereum-compatible chain) takes a signed checkpoint and returns a receipt; backends plug in
//! here through the trait.

pub mod ethereum;

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

/// A future a [`Ledger`] returns: backends talk to networks (Ethereum JSON-RPC) or to disk.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// What is anchored: one signed checkpoint of the node's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub checkpoint: Checkpoint,
    /// The checkpoint's signed note, exactly as signed.
    pub note: String,
}

/// An anchor handed to a ledger and not yet known to be final: kept in the outbox until
/// [`Ledger::status`] says [`AnchorStatus::Confirmed`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Submission {
    /// The backend's name for what it sent: a transaction hash (0x-prefixed hex), an entry index.
    pub reference: String,
    /// µs since the epoch.
    pub submitted_at: i64,
}

/// Where a submitted anchor stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnchorStatus {
    /// On the ledger with at least the confirmations asked for: done.
    Confirmed(Receipt),
    /// On the ledger, not yet as deep as asked for (or not yet mined).
    Pending { confirmations: u64 },
    /// Not on the ledger (never mined, or dropped by a reorg): submit it again.
    Dropped,
}

/// What a ledger returns for an anchored checkpoint: enough for anyone to find and check it there
/// without this node. Part of the proof file format (docs/proof-format.md).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case", deny_unknown_fields)]
pub enum Receipt {
    /// An entry of the node's own hash chain (`<data>/ledger/`).
    Local {
        /// The entry's index in the chain.
        index: u64,
        /// SHA-256 of the entry's bytes, hex: the next entry holds it.
        entry_hash: String,
        /// µs since the epoch.
        anchored_at: i64,
    },
    /// An `Anchored` event of the anchor contract (contracts/) on an Ethereum-compatible chain.
    Ethereum {
        chain_id: u64,
        /// 0x-prefixed, EIP-55 checksummed.
        contract: String,
        /// 0x-prefixed hex.
        tx_hash: String,
        block_number: u64,
        /// 0x-prefixed hex.
        block_hash: String,
        log_index: u64,
    },
}

/// A ledger backend. Every call may be repeated after a crash: anchoring the same checkpoint
/// twice must be harmless.
pub trait Ledger: Send + Sync {
    /// The backend's name, for metrics and logs: `local`, `ethereum`.
    fn name(&self) -> &str;
    /// Hands `anchor` to the ledger; does not wait for it to be final.
    fn submit<'a>(&'a self, anchor: &'a Anchor) -> BoxFuture<'a, Result<Submission, LedgerError>>;
    /// Where a submission stands now.
    fn status<'a>(
        &'a self,
        anchor: &'a Anchor,
        submission: &'a Submission,
    ) -> BoxFuture<'a, Result<AnchorStatus, LedgerError>>;
    /// Looks for `anchor` on the ledger itself, without the outbox (for `verify`): its receipt,
    /// once it is there with the confirmations asked for.
    fn find<'a>(
        &'a self,
        anchor: &'a Anchor,
    ) -> BoxFuture<'a, Result<Option<Receipt>, LedgerError>>;
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
