//! The node's append-only log of batches, its signed checkpoints, and the [`Ledger`] seam
//! that anchors them.
//!
//! Batch `i` is leaf `i` of an RFC 6962 log, its leaf the hash of its header's canonical bytes
//! (seal::entry); a checkpoint is a C2SP signed note of that log's size and root, signed with
//! the node key. A ledger backend (the embedded hash chain, an
//! Ethereum-compatible chain) takes a signed checkpoint and returns a receipt; backends plug in
//! here through the trait.

pub mod ethereum;

use crate::seal::checkpoint::{Checkpoint, NoteError, NoteSigner};
use crate::store::{Store, StoreError};

pub mod db;
pub mod local;
pub mod log;
pub mod outbox;
pub mod proof;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("batch {0} has a malformed root")]
    BadRoot(u64),
    #[error("the log of batches lacks its node {level}/{index}: the store is damaged")]
    MissingNode { level: u8, index: u64 },
    #[error("the log of batches holds {have} leaves, not {size}")]
    Beyond { size: u64, have: u64 },
    #[error("signing: {0}")]
    Note(#[from] NoteError),
    /// The backend could not anchor now; the checkpoint stays queued and is retried.
    #[error("{ledger} is unavailable: {reason}")]
    Unavailable { ledger: String, reason: String },
    #[error("{ledger} refused the checkpoint: {reason}")]
    Refused { ledger: String, reason: String },
    #[error("ledger database {}: {reason}", path.display())]
    Db {
        path: std::path::PathBuf,
        reason: String,
    },
}

/// `[ledger]` of the pipeline file: when checkpoints are cut and where they are anchored.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerOptions {
    #[serde(default)]
    pub backend: Backend,
    /// A checkpoint is cut this often when the log grew since the last one, and at a clean stop.
    #[serde(
        default = "LedgerOptions::default_checkpoint_every",
        with = "humantime_serde"
    )]
    pub checkpoint_every: std::time::Duration,
    /// `[ledger.ethereum]`: needed by `backend = "ethereum"`.
    #[serde(default)]
    pub ethereum: Option<ethereum::EthereumOptions>,
}

impl LedgerOptions {
    const fn default_checkpoint_every() -> std::time::Duration {
        std::time::Duration::from_secs(10)
    }

    /// What is wrong with these options, as a key and a message.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.checkpoint_every < std::time::Duration::from_secs(1) {
            return Err((
                "ledger.checkpoint_every",
                "must be at least 1s: each checkpoint is signed, stored and anchored".into(),
            ));
        }
        if self.backend == Backend::Ethereum && self.ethereum.is_none() {
            return Err((
                "ledger.backend",
                "\"ethereum\" needs a [ledger.ethereum] table with rpc and contract \
                 (`iomt-edge ledger deploy` prints it)"
                    .into(),
            ));
        }
        Ok(())
    }
}

impl Default for LedgerOptions {
    fn default() -> Self {
        LedgerOptions {
            backend: Backend::default(),
            checkpoint_every: Self::default_checkpoint_every(),
            ethereum: None,
        }
    }
}

/// Where checkpoints are anchored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The embedded hash chain in `<data>/ledger/`.
    #[default]
    Local,
    /// An Ethereum-compatible chain, through the anchor contract (`[ledger.ethereum]`).
    Ethereum,
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

/// The origin line of this node's checkpoints.
pub fn origin(signer: &NoteSigner) -> String {
    signer.name().to_owned()
}

/// The current checkpoint of the log, and its signed note.
pub fn checkpoint(
    store: &dyn Store,
    signer: &NoteSigner,
) -> Result<(Checkpoint, String), LedgerError> {
    let log = log::BatchLog::new(store);
    let size = log.size()?;
    let c = Checkpoint {
        origin: origin(signer),
        size,
        root: log.root(size)?,
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
    use crate::seal::{entry, merkle};
    use crate::store::SledStore;

    #[test]
    fn checkpoints_sign_the_log_of_batch_headers() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let sealer = Sealer::new(MasterKey::from_bytes(&[5u8; 32]).unwrap());
        let signer = NoteSigner::from_seed("iomt-edge/ward", &[6u8; 32]).unwrap();
        let verifier = NoteVerifier::parse(&signer.verifier_key()).unwrap();

        let (empty, _) = checkpoint(&store, &signer).unwrap();
        assert_eq!((empty.size, empty.root), (0, merkle::empty_root()));

        let mut leaves = Vec::new();
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
            leaves.push(entry::log_leaf(&sealed.header).unwrap());
            store.put_batch(&sealed).unwrap();
        }
        let (c, note) = checkpoint(&store, &signer).unwrap();
        assert_eq!(c.size, 3);
        assert_eq!(c.root, merkle::root(&leaves));
        let text = verifier.verify(&note).unwrap();
        assert_eq!(Checkpoint::parse(text).unwrap(), c);
        // Each batch's header is provably in the checkpoint.
        for (i, r) in leaves.iter().enumerate() {
            let path = merkle::inclusion_proof(&leaves, i).unwrap();
            merkle::verify_inclusion(r, i as u64, 3, &path, &c.root).unwrap();
        }
    }
}
