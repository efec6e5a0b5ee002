//! Proofs that readings existed, unchanged: made from a store (`iomt-edge proof`, `GET
//! /proof/<seq>`), checked with nothing but the proof file (`iomt-edge verify-proof`). The file
//! format is documented in docs/proof-format.md, so that a third party can write a verifier.
//!
//! A proof carries, for each reading, its canonical bytes (seal::leaf; under leaf encoding 2 they
//! hold the reading's own salt, never the batch's salt key) and its inclusion path in its batch's
//! tree; for each batch, its header's canonical bytes (seal::entry) and its inclusion path in the
//! log of batches; then one signed checkpoint of the log, the node's verifier key, and the ledger
//! receipt of that checkpoint's anchor when it has one.

use serde::{Deserialize, Serialize};

use super::log::BatchLog;
use super::outbox::Outbox;
use super::{LedgerError, Receipt};
use crate::model::batch::{BatchView, ReadingRef};
use crate::model::reading::format_ts;
use crate::seal::checkpoint::{Checkpoint, NoteVerifier};
use crate::seal::leaf;
use crate::seal::merkle::{self, from_hex, to_hex, Hash};
use crate::seal::{entry, BatchHeader, Sealer};
use crate::store::Store;

/// The `format` of the proof files this code writes and reads.
pub const FORMAT: &str = "iomt-edge-proof/1";

/// A proof file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofFile {
    pub format: String,
    pub readings: Vec<ReadingProof>,
    pub batches: Vec<BatchProof>,
    /// The signed checkpoint every batch path leads to, exactly as signed.
    pub checkpoint: String,
    /// The node's note verifier key (`<name>+<id>+<base64>`).
    pub verifier_key: String,
    /// The checkpoint's anchor; `null` while it waits in the outbox.
    pub receipt: Option<Receipt>,
}

/// One reading and the path from it to its batch's root.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadingProof {
    /// The reading as stored, for people: every field is also in `leaf`, which is what counts.
    pub reading: ProvenReading,
    /// Hex: the reading's canonical bytes (seal::leaf); SHA-256(0x00 ‖ these) is its leaf.
    pub leaf: String,
    /// The batch it is in, and its row there: its leaf index in the batch's tree.
    pub batch: u64,
    pub index: u64,
    /// Hex hashes, nearest sibling first (RFC 6962 inclusion path in a tree of the batch's
    /// `rows` leaves).
    pub path: Vec<String>,
}

/// The fields of a reading, as `leaf` encodes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvenReading {
    pub seq: u64,
    /// µs since the Unix epoch, UTC, and the same as RFC 3339.
    pub ts: i64,
    pub time: String,
    pub received: i64,
    pub source: String,
    pub subject: Option<String>,
    pub metric: String,
    pub value: Option<f64>,
    pub text: Option<String>,
    pub unit: String,
    pub flags: u16,
}

impl ProvenReading {
    pub fn from_ref(r: &ReadingRef<'_>) -> Self {
        ProvenReading {
            seq: r.seq,
            ts: r.ts,
            time: format_ts(r.ts),
            received: r.received,
            source: r.source.to_owned(),
            subject: r.subject.map(str::to_owned),
            metric: r.metric.to_owned(),
            value: r.value,
            text: r.text.map(str::to_owned),
            unit: r.unit.to_owned(),
            flags: r.flags,
        }
    }

    /// The fields as the leaf encoding takes them (`time` aside).
    pub fn fields(&self) -> ReadingRef<'_> {
        ReadingRef {
            seq: self.seq,
            ts: self.ts,
            received: self.received,
            source: &self.source,
            subject: self.subject.as_deref(),
            metric: &self.metric,
            value: self.value,
            text: self.text.as_deref(),
            unit: &self.unit,
            flags: self.flags,
        }
    }
}

/// One batch and the path from it to the checkpoint's root.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchProof {
    pub id: u64,
    /// Hex: the batch header's canonical bytes (seal::entry); SHA-256(0x00 ‖ these) is its
    /// leaf in the log of batches.
    pub entry: String,
    /// Hex hashes, nearest sibling first (inclusion path in the log at the checkpoint's size).
    pub path: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("no reading has seq {0}")]
    NoSuchSeq(u64),
    #[error("no reading of that subject between those times")]
    NothingInRange,
    #[error(
        "batch {0} holds it, and no checkpoint covers that batch yet: try again after the next \
         checkpoint (ledger.checkpoint_every)"
    )]
    NotCheckpointed(u64),
    #[error("batch {id}: {reason}")]
    Batch { id: u64, reason: String },
}

fn batch_error(id: u64, reason: impl std::fmt::Display) -> ProofError {
    ProofError::Batch {
        id,
        reason: reason.to_string(),
    }
}

/// Makes proofs from a store.
pub struct Prover<'a> {
    pub store: &'a dyn Store,
    pub sealer: &'a Sealer,
    pub verifier_key: &'a str,
    /// Where receipts are kept; `None` makes proofs without one.
    pub outbox: Option<&'a Outbox>,
}

impl Prover<'_> {
    /// The batch holding `seq`: batches hold increasing seq ranges in id order.
    fn batch_of(&self, seq: u64) -> Result<Option<BatchHeader>, ProofError> {
        let (mut lo, mut hi) = (0, self.store.log_size().map_err(LedgerError::from)?);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let h = self
                .store
                .header(mid)
                .map_err(LedgerError::from)?
                .ok_or_else(|| batch_error(mid, "it has no header"))?;
            if h.seq_last < seq {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        match self.store.header(lo).map_err(LedgerError::from)? {
            Some(h) if h.seq_first <= seq && seq <= h.seq_last => Ok(Some(h)),
            _ => Ok(None),
        }
    }

    /// A proof of the reading `seq`.
    pub fn seq(&self, seq: u64) -> Result<ProofFile, ProofError> {
        let h = self.batch_of(seq)?.ok_or(ProofError::NoSuchSeq(seq))?;
        let mut picked = Vec::new();
        self.readings(h.id, &mut |r| r.seq == seq, &mut picked)?;
        if picked.is_empty() {
            return Err(ProofError::NoSuchSeq(seq));
        }
        self.finish(picked)
    }

    /// A proof of every reading of `subject` with a device time in `from ..= to` (µs).
    pub fn range(&self, subject: &str, from: i64, to: i64) -> Result<ProofFile, ProofError> {
        let mut picked = Vec::new();
        for h in self.store.headers().map_err(LedgerError::from)? {
            if h.ts_max < from || h.ts_min > to {
                continue;
            }
            self.readings(
                h.id,
                &mut |r| r.subject == Some(subject) && (from..=to).contains(&r.ts),
                &mut picked,
            )?;
        }
        if picked.is_empty() {
            return Err(ProofError::NothingInRange);
        }
        self.finish(picked)
    }

    /// Appends the proofs of batch `id`'s readings that `want` picks.
    fn readings(
        &self,
        id: u64,
        want: &mut dyn FnMut(&crate::model::batch::ReadingRef<'_>) -> bool,
        out: &mut Vec<ReadingProof>,
    ) -> Result<(), ProofError> {
        let sealed = self
            .store
            .batch(id)
            .map_err(LedgerError::from)?
            .ok_or_else(|| batch_error(id, "missing from the store"))?;
        let opened = self.sealer.open(&sealed).map_err(|e| batch_error(id, e))?;
        let leaves = opened.leaves().map_err(|e| batch_error(id, e))?;
        let view = BatchView::new(&opened.batch).map_err(|e| batch_error(id, e))?;
        let mut bytes = Vec::new();
        for i in 0..view.len() {
            let r = view.row(i);
            if !want(&r) {
                continue;
            }
            let salt = opened
                .salt_key
                .as_ref()
                .map(|k| leaf::reading_salt(k, r.seq));
            bytes.clear();
            leaf::encode(&r, salt.as_ref(), &mut bytes);
            let path = merkle::inclusion_proof(&leaves, i).map_err(|e| batch_error(id, e))?;
            out.push(ReadingProof {
                reading: ProvenReading::from_ref(&r),
                leaf: to_hex(&bytes),
                batch: id,
                index: i as u64,
                path: path.iter().map(|h| to_hex(h)).collect(),
            });
        }
        Ok(())
    }

    /// The batches' paths to one checkpoint covering them all, and its receipt: the first
    /// anchored checkpoint that covers them if there is one, else the newest.
    fn finish(&self, readings: Vec<ReadingProof>) -> Result<ProofFile, ProofError> {
        let last = readings
            .iter()
            .map(|r| r.batch)
            .max()
            .expect("some reading");
        let err = |e| ProofError::Ledger(LedgerError::from(e));
        let first = self.store.checkpoint_from(last + 1).map_err(err)?;
        let newest = self.store.latest_checkpoint().map_err(err)?;
        let receipt_of = |size: u64| -> Result<Option<Receipt>, ProofError> {
            Ok(match self.outbox {
                Some(o) => o.receipt(size)?,
                None => None,
            })
        };
        let mut chosen = None;
        for candidate in [first, newest].into_iter().flatten() {
            if candidate.0 <= last {
                continue;
            }
            let receipt = receipt_of(candidate.0)?;
            let anchored = receipt.is_some();
            if chosen.is_none() || anchored {
                chosen = Some((candidate, receipt));
            }
            if anchored {
                break;
            }
        }
        let ((size, note), receipt) = chosen.ok_or(ProofError::NotCheckpointed(last))?;
        let log = BatchLog::new(self.store);
        let mut ids: Vec<u64> = readings.iter().map(|r| r.batch).collect();
        ids.dedup();
        let mut batches = Vec::with_capacity(ids.len());
        for id in ids {
            let h = self
                .store
                .header(id)
                .map_err(err)?
                .ok_or_else(|| batch_error(id, "it has no header"))?;
            let bytes = entry::encode(&h).map_err(|e| batch_error(id, e))?;
            let path = log.inclusion_proof(id, size)?;
            batches.push(BatchProof {
                id,
                entry: to_hex(&bytes),
                path: path.iter().map(|h| to_hex(h)).collect(),
            });
        }
        Ok(ProofFile {
            format: FORMAT.to_owned(),
            readings,
            batches,
            checkpoint: note,
            verifier_key: self.verifier_key.to_owned(),
            receipt,
        })
    }
}

/// A step of checking a proof that failed, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{step}: {reason}")]
pub struct CheckError {
    pub step: String,
    pub reason: String,
}

fn fail<T>(step: impl Into<String>, reason: impl std::fmt::Display) -> Result<T, CheckError> {
    Err(CheckError {
        step: step.into(),
        reason: reason.to_string(),
    })
}

fn hashes(step: &str, hex: &[String]) -> Result<Vec<Hash>, CheckError> {
    hex.iter()
        .map(|h| {
            from_hex(h)
                .and_then(|b| Hash::try_from(b).ok())
                .map_or_else(
                    || fail(step, format!("{h:?} is not a 32-byte hex hash")),
                    Ok,
                )
        })
        .collect()
}

/// What a proof proved.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub checkpoint: Checkpoint,
    pub readings: usize,
    pub receipt: Option<Receipt>,
    /// Whether the checkpoint was checked against a key given by the caller (rather than the
    /// one the proof carries).
    pub key_trusted: bool,
}

/// Checks `proof` with nothing else: the checkpoint's signature (by `trusted_key` when given,
/// which must then be the proof's key), every batch's path to it and every reading's path to its
/// batch, and that every reading stated equals its canonical bytes. The ledger receipt is
/// returned for the caller to check on its ledger.
pub fn check(proof: &ProofFile, trusted_key: Option<&str>) -> Result<Checked, CheckError> {
    if proof.format != FORMAT {
        return fail("format", format!("{:?} is not {FORMAT:?}", proof.format));
    }
    let key = match trusted_key {
        Some(k) if k.trim() != proof.verifier_key.trim() => {
            return fail(
                "verifier key",
                "the proof names another key than the one given with --key",
            )
        }
        Some(k) => k.trim(),
        None => proof.verifier_key.trim(),
    };
    let verifier = NoteVerifier::parse(key).or_else(|e| fail("verifier key", e))?;
    let text = verifier
        .verify(&proof.checkpoint)
        .or_else(|e| fail("checkpoint signature", e))?;
    let checkpoint = Checkpoint::parse(text).or_else(|e| fail("checkpoint", e))?;
    let key_name = key.split('+').next().unwrap_or_default();
    if checkpoint.origin != key_name {
        return fail(
            "checkpoint",
            format!(
                "its origin {:?} is not the key's name {key_name:?}",
                checkpoint.origin
            ),
        );
    }
    if proof.readings.is_empty() {
        return fail("readings", "the proof holds none");
    }
    let mut headers = std::collections::HashMap::new();
    for b in &proof.batches {
        let step = format!("batch {}", b.id);
        let bytes = from_hex(&b.entry).map_or_else(|| fail(&step, "entry is not hex"), Ok)?;
        let h = entry::decode(&bytes).or_else(|e| fail(&step, e))?;
        if h.id != b.id {
            return fail(&step, format!("its entry is batch {}'s", h.id));
        }
        let path = hashes(&step, &b.path)?;
        merkle::verify_inclusion(
            &merkle::leaf_hash(&bytes),
            b.id,
            checkpoint.size,
            &path,
            &checkpoint.root,
        )
        .or_else(|e| {
            fail(
                format!(
                    "{step}: inclusion in the log at tree size {}",
                    checkpoint.size
                ),
                e,
            )
        })?;
        headers.insert(b.id, h);
    }
    for r in &proof.readings {
        let step = format!("reading {}", r.reading.seq);
        let h = headers.get(&r.batch).map_or_else(
            || fail(&step, format!("its batch {} is not in the proof", r.batch)),
            Ok,
        )?;
        let bytes = from_hex(&r.leaf).map_or_else(|| fail(&step, "leaf is not hex"), Ok)?;
        let c = leaf::decode(&bytes).or_else(|e| fail(format!("{step}: leaf bytes"), e))?;
        if c.encoding.byte() != h.leaf_encoding {
            return fail(
                &step,
                format!(
                    "its leaf is encoding {}, its batch's readings are encoding {}",
                    c.encoding.byte(),
                    h.leaf_encoding
                ),
            );
        }
        // The stated fields, encoded with the leaf's own salt, must be the leaf's bytes.
        let mut stated = Vec::with_capacity(bytes.len());
        leaf::encode(&r.reading.fields(), c.salt.as_ref(), &mut stated);
        if stated != bytes || format_ts(c.ts) != r.reading.time {
            return fail(
                &step,
                "the reading stated is not the one its leaf bytes encode",
            );
        }
        if !(h.seq_first..=h.seq_last).contains(&c.seq) || !(h.ts_min..=h.ts_max).contains(&c.ts) {
            return fail(
                &step,
                format!("its seq or time lies outside batch {}'s ranges", r.batch),
            );
        }
        let root = h
            .root_hash()
            .map_or_else(|| fail(&step, "its batch's root is not a hash"), Ok)?;
        let path = hashes(&step, &r.path)?;
        merkle::verify_inclusion(
            &merkle::leaf_hash(&bytes),
            r.index,
            u64::from(h.rows),
            &path,
            &root,
        )
        .or_else(|e| fail(format!("{step}: inclusion in batch {}", r.batch), e))?;
    }
    Ok(Checked {
        checkpoint,
        readings: proof.readings.len(),
        receipt: proof.receipt.clone(),
        key_trusted: trusted_key.is_some(),
    })
}

/// Looks the proof's anchor up on the Ethereum chain at `rpc` (step "ledger receipt"): the
/// contract its receipt names must hold an `Anchored` event of the checkpoint's root, size and
/// origin. Returns the transaction found.
pub async fn check_anchor(
    proof: &ProofFile,
    checked: &Checked,
    rpc: &str,
) -> Result<String, CheckError> {
    let step = "ledger receipt";
    let Some(receipt @ Receipt::Ethereum { .. }) = &proof.receipt else {
        return fail(step, "the proof has no Ethereum receipt to look up");
    };
    let anchor = super::Anchor {
        checkpoint: checked.checkpoint.clone(),
        note: proof.checkpoint.clone(),
    };
    match super::ethereum::find_as_receipt_says(rpc, receipt, &anchor).await {
        Ok(Some(Receipt::Ethereum {
            tx_hash,
            block_number,
            ..
        })) => Ok(format!("transaction {tx_hash} in block {block_number}")),
        Ok(_) => fail(
            step,
            "no anchor of this checkpoint's root, size and origin is on that chain's contract",
        ),
        Err(e) => fail(step, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values unit conversions make (0.901 × 100, kelvin, kPa) come back from a proof file as
    /// the very same f64, or a genuine proof would fail and an edited one pass.
    #[test]
    fn reading_values_survive_the_proof_file_exactly() {
        for v in [
            0.901 * 100.0,
            27.150000000000034,
            37.503099999999996,
            1000.9999999999999,
            -0.0,
            f64::MIN_POSITIVE,
            f64::MAX,
        ] {
            let r = ProvenReading {
                seq: 1,
                ts: 0,
                time: format_ts(0),
                received: 0,
                source: "s".into(),
                subject: None,
                metric: "spo2".into(),
                value: Some(v),
                text: None,
                unit: "%".into(),
                flags: 0,
            };
            let back: ProvenReading =
                serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
            assert_eq!(back.value.map(f64::to_bits), Some(v.to_bits()), "{v:?}");
        }
    }
}
