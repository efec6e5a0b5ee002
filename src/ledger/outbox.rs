//! The outbox: checkpoints waiting to be anchored, kept in the ledger database until their
//! ledger confirms them, so that an unreachable ledger, a failed transaction or a restart loses
//! none. Ingest never waits on it: only the anchor stage reads it.

use std::ops::ControlFlow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sled::Transactional;

use super::db::LedgerDb;
use super::{LedgerError, Receipt, Submission};
use crate::model::reading::now_micros;

/// A checkpoint waiting for its anchor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    pub size: u64,
    /// The signed note of the checkpoint.
    pub note: String,
    /// What the ledger was handed, while it is not final.
    pub submission: Option<Submission>,
    pub attempts: u32,
    /// µs since the epoch.
    pub queued_at: i64,
    /// Why the last attempt failed (never a key or a reading).
    pub last_error: Option<String>,
    /// Set when the ledger refused this anchor for good (a mined transaction that reverted):
    /// it is not sent again, and stays here for an operator to see.
    #[serde(default)]
    pub refused: Option<String>,
}

/// The outbox of one ledger database.
#[derive(Clone)]
pub struct Outbox {
    db: Arc<LedgerDb>,
}

fn size_of(db: &LedgerDb, k: &[u8]) -> Result<u64, LedgerError> {
    db.u64_of("an outbox key", k)
}

impl Outbox {
    pub fn new(db: Arc<LedgerDb>) -> Self {
        Outbox { db }
    }

    fn parse(&self, size: u64, v: &[u8]) -> Result<Pending, LedgerError> {
        serde_json::from_slice(v).map_err(|e| self.db.error(format!("outbox entry {size}: {e}")))
    }

    /// Queues the checkpoint of `size` unless it is queued or anchored already. Durable when it
    /// returns. A different checkpoint of the same size queued or anchored before is an error:
    /// the store no longer holds what this ledger database anchored (it was restored from an
    /// older copy), which must be seen, not skipped.
    pub fn enqueue(&self, size: u64, note: &str) -> Result<bool, LedgerError> {
        let key = size.to_be_bytes();
        let err = |e: sled::Error| self.db.error(e);
        let conflict = || LedgerError::Refused {
            ledger: "outbox".into(),
            reason: format!(
                "another checkpoint of tree size {size} was queued or anchored before: the \
                 store was rolled back or replaced behind the ledger database (run verify)"
            ),
        };
        if let Some(v) = self.db.outbox.get(key).map_err(err)? {
            return match self.parse(size, &v)?.note == note {
                true => Ok(false),
                false => Err(conflict()),
            };
        }
        if self.db.receipts.contains_key(key).map_err(err)? {
            return match self.anchored_note(size)? {
                Some(n) if n != note => Err(conflict()),
                _ => Ok(false),
            };
        }
        let p = Pending {
            size,
            note: note.to_owned(),
            submission: None,
            attempts: 0,
            queued_at: now_micros(),
            last_error: None,
            refused: None,
        };
        let v = serde_json::to_vec(&p).expect("pending serialises");
        self.db.outbox.insert(key, v).map_err(err)?;
        self.db.durable()?;
        Ok(true)
    }

    /// Up to `limit` pending anchors, oldest (smallest tree size) first.
    pub fn pending(&self, limit: usize) -> Result<Vec<Pending>, LedgerError> {
        let mut out = Vec::new();
        for kv in self.db.outbox.iter().take(limit) {
            let (k, v) = kv.map_err(|e| self.db.error(e))?;
            out.push(self.parse(size_of(&self.db, &k)?, &v)?);
        }
        Ok(out)
    }

    /// Records where a pending anchor stands (a submission made or dropped, an attempt failed).
    pub fn update(&self, p: &Pending) -> Result<(), LedgerError> {
        let v = serde_json::to_vec(p).expect("pending serialises");
        self.db
            .outbox
            .insert(p.size.to_be_bytes(), v)
            .map_err(|e| self.db.error(e))?;
        self.db.durable()
    }

    /// The note of the anchored checkpoint of `size`, kept beside its receipt.
    fn anchored_note(&self, size: u64) -> Result<Option<String>, LedgerError> {
        match self
            .db
            .anchored_notes
            .get(size.to_be_bytes())
            .map_err(|e| self.db.error(e))?
        {
            None => Ok(None),
            Some(v) => String::from_utf8(v.to_vec())
                .map(Some)
                .map_err(|_| self.db.error(format!("anchored note {size}: not UTF-8"))),
        }
    }

    /// Every anchored or queued checkpoint, by tree size, with its note (for `verify`).
    pub fn known(&self) -> Result<Vec<(u64, String)>, LedgerError> {
        let mut out = Vec::new();
        for kv in self.db.anchored_notes.iter() {
            let (k, v) = kv.map_err(|e| self.db.error(e))?;
            out.push((
                size_of(&self.db, &k)?,
                String::from_utf8_lossy(&v).into_owned(),
            ));
        }
        for kv in self.db.outbox.iter() {
            let (k, v) = kv.map_err(|e| self.db.error(e))?;
            let size = size_of(&self.db, &k)?;
            out.push((size, self.parse(size, &v)?.note));
        }
        out.sort();
        Ok(out)
    }

    /// The anchor of `size` is done: its receipt replaces its outbox entry, in one transaction,
    /// and its note is kept beside it.
    pub fn complete(&self, size: u64, receipt: &Receipt) -> Result<(), LedgerError> {
        let key = size.to_be_bytes();
        let v = serde_json::to_vec(receipt).expect("receipt serialises");
        let note = match self.db.outbox.get(key).map_err(|e| self.db.error(e))? {
            Some(p) => self.parse(size, &p)?.note,
            None => return Err(self.db.error(format!("outbox entry {size} is gone"))),
        };
        (&self.db.outbox, &self.db.receipts, &self.db.anchored_notes)
            .transaction(|(outbox, receipts, notes)| {
                outbox.remove(&key)?;
                receipts.insert(&key, v.as_slice())?;
                notes.insert(&key, note.as_bytes())?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| self.db.error(format!("{e:?}")))?;
        self.db.durable()
    }

    /// The receipt of the anchor of the checkpoint of `size`, once done.
    pub fn receipt(&self, size: u64) -> Result<Option<Receipt>, LedgerError> {
        match self
            .db
            .receipts
            .get(size.to_be_bytes())
            .map_err(|e| self.db.error(e))?
        {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| self.db.error(format!("receipt {size}: {e}"))),
        }
    }

    /// Whether the checkpoint of `size` is waiting in the outbox.
    pub fn is_pending(&self, size: u64) -> Result<bool, LedgerError> {
        self.db
            .outbox
            .contains_key(size.to_be_bytes())
            .map_err(|e| self.db.error(e))
    }

    /// Every receipt, by tree size, until `each` breaks.
    pub fn receipts(
        &self,
        each: &mut dyn FnMut(u64, Receipt) -> ControlFlow<()>,
    ) -> Result<(), LedgerError> {
        for kv in self.db.receipts.iter() {
            let (k, v) = kv.map_err(|e| self.db.error(e))?;
            let size = size_of(&self.db, &k)?;
            let r = serde_json::from_slice(&v)
                .map_err(|e| self.db.error(format!("receipt {size}: {e}")))?;
            if each(size, r).is_break() {
                break;
            }
        }
        Ok(())
    }

    /// The tree size of the newest checkpoint queued or anchored.
    pub fn newest(&self) -> Result<Option<u64>, LedgerError> {
        let err = |e: sled::Error| self.db.error(e);
        let a = match self.db.outbox.last().map_err(err)? {
            Some((k, _)) => Some(size_of(&self.db, &k)?),
            None => None,
        };
        let b = match self.db.receipts.last().map_err(err)? {
            Some((k, _)) => Some(size_of(&self.db, &k)?),
            None => None,
        };
        Ok(a.max(b))
    }

    /// Anchors waiting, and the age in seconds of the oldest.
    pub fn depth(&self) -> Result<(usize, f64), LedgerError> {
        let n = self.db.outbox.len();
        let age = match self.db.outbox.first().map_err(|e| self.db.error(e))? {
            Some((k, v)) => {
                let p = self.parse(size_of(&self.db, &k)?, &v)?;
                (now_micros() - p.queued_at).max(0) as f64 / 1e6
            }
            None => 0.0,
        };
        Ok((n, age))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::local::{ChainEntry, LocalChain};
    use crate::ledger::{Anchor, AnchorStatus, Ledger};
    use crate::seal::checkpoint::Checkpoint;

    fn anchor(size: u64, root: u8) -> Anchor {
        let checkpoint = Checkpoint {
            origin: "iomt-edge/test".into(),
            size,
            root: [root; 32],
        };
        Anchor {
            note: format!("{}\n— sig\n", checkpoint.to_text()),
            checkpoint,
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn the_outbox_survives_reopening_and_completes_once() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Arc::new(LedgerDb::open(dir.path()).unwrap());
            let outbox = Outbox::new(db);
            assert!(outbox.enqueue(5, "n5").unwrap());
            assert!(outbox.enqueue(9, "n9").unwrap());
            assert!(!outbox.enqueue(5, "n5").unwrap());
            let mut p = outbox.pending(10).unwrap();
            assert_eq!(p.iter().map(|p| p.size).collect::<Vec<_>>(), [5, 9]);
            p[0].attempts = 3;
            p[0].last_error = Some("unreachable".into());
            outbox.update(&p[0]).unwrap();
        }
        let db = Arc::new(LedgerDb::open(dir.path()).unwrap());
        let outbox = Outbox::new(db);
        let p = outbox.pending(1).unwrap();
        assert_eq!((p[0].size, p[0].attempts), (5, 3));
        assert_eq!(outbox.depth().unwrap().0, 2);
        let r = Receipt::Local {
            index: 0,
            entry_hash: "ab".into(),
            anchored_at: 1,
        };
        outbox.complete(5, &r).unwrap();
        assert_eq!(outbox.receipt(5).unwrap(), Some(r));
        assert!(!outbox.enqueue(5, "n5").unwrap(), "anchored already");
        // Another checkpoint of a size queued or anchored before: a store rolled back behind
        // the ledger database, never skipped in silence.
        for size in [5, 9] {
            let err = outbox.enqueue(size, "other").unwrap_err().to_string();
            assert!(err.contains("rolled back"), "{err}");
        }
        assert_eq!(
            outbox.known().unwrap(),
            vec![(5, "n5".to_owned()), (9, "n9".to_owned())]
        );
        assert_eq!(outbox.newest().unwrap(), Some(9));
        assert_eq!(outbox.depth().unwrap().0, 1);
    }

    #[test]
    fn the_local_chain_links_entries_and_anchors_a_checkpoint_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(LedgerDb::open(dir.path()).unwrap());
        let chain = LocalChain::new(db.clone());
        let (a, b) = (anchor(3, 1), anchor(8, 2));
        let sa = block_on(chain.submit(&a)).unwrap();
        let sb = block_on(chain.submit(&b)).unwrap();
        assert_eq!((sa.reference.as_str(), sb.reference.as_str()), ("0", "1"));
        // Again: the same entry, no new one.
        assert_eq!(block_on(chain.submit(&a)).unwrap(), sa);
        let AnchorStatus::Confirmed(Receipt::Local { index: 1, .. }) =
            block_on(chain.status(&b, &sb)).unwrap()
        else {
            panic!("b is confirmed as entry 1");
        };
        assert!(block_on(chain.find(&a)).unwrap().is_some());
        assert_eq!(block_on(chain.find(&anchor(3, 9))).unwrap(), None);
        let other = block_on(chain.submit(&anchor(3, 9)))
            .unwrap_err()
            .to_string();
        assert!(
            other.contains("another checkpoint of tree size 3"),
            "{other}"
        );
        assert_eq!(
            block_on(chain.status(&anchor(3, 9), &sa)).unwrap(),
            AnchorStatus::Dropped
        );

        let mut sizes = Vec::new();
        let n = LocalChain::walk(&db, &mut |e, _| {
            sizes.push(e.size);
            Ok(())
        })
        .unwrap();
        assert_eq!((n, sizes), (2, vec![3, 8]));

        // An edited entry breaks the link the next one holds.
        let mut e0 =
            ChainEntry::decode(&db.chain.get(0u64.to_be_bytes()).unwrap().unwrap()).unwrap();
        e0.anchored_at += 1;
        db.chain.insert(0u64.to_be_bytes(), e0.encode()).unwrap();
        let err = LocalChain::walk(&db, &mut |_, _| Ok(())).unwrap_err();
        assert!(
            err.contains("chain entry 1 does not hold the hash of entry 0"),
            "{err}"
        );
        // A removed one leaves a hole.
        db.chain.remove(0u64.to_be_bytes()).unwrap();
        let err = LocalChain::walk(&db, &mut |_, _| Ok(())).unwrap_err();
        assert!(err.contains("removed or reordered"), "{err}");
    }
}
