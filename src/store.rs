//! The store: sealed batches and node metadata, behind the [`Store`] trait, kept in sled.
//!
//! sled trees and their keys:
//! - `batches`: batch id (u64 big-endian, so keys sort by id) → the encoded [`SealedBatch`];
//! - `headers`: batch id → the header as JSON, to list batches without reading ciphertext;
//! - `meta`: `seq_reserved` → u64, the first seq no process has handed out yet.
//!
//! A batch and its header are written in one transaction and flushed before `put_batch` returns.

use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::seal::crypt::Envelope;
use crate::seal::{BatchHeader, SealedBatch};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("batch {0} is already stored")]
    Duplicate(u64),
}

/// Durable storage of sealed batches. `put_batch` returns only once the batch would survive a
/// crash of the process or the machine.
pub trait Store: Send + Sync + 'static {
    fn put_batch(&self, batch: &SealedBatch) -> Result<(), StoreError>;
    /// Stores several batches, durably, as one group.
    fn put_batches(&self, batches: &[SealedBatch]) -> Result<(), StoreError> {
        batches.iter().try_for_each(|b| self.put_batch(b))
    }
    fn batch(&self, id: u64) -> Result<Option<SealedBatch>, StoreError>;
    /// Headers of every stored batch, by id.
    fn headers(&self) -> Result<Vec<BatchHeader>, StoreError>;
    /// The header of the batch with the highest id.
    fn last_header(&self) -> Result<Option<BatchHeader>, StoreError>;
    /// The first seq that was never handed out.
    fn seq_reserved(&self) -> Result<u64, StoreError>;
    /// Durably records that seqs below `next` may have been handed out.
    fn reserve_seq(&self, next: u64) -> Result<(), StoreError>;
    /// Bytes the store occupies on disk.
    fn size_on_disk(&self) -> u64;
}

const VALUE_VERSION: u8 = 1;
const SEQ_RESERVED: &[u8] = b"seq_reserved";

#[derive(Debug, Clone)]
pub struct SledStore {
    db: sled::Db,
    batches: sled::Tree,
    headers: sled::Tree,
    meta: sled::Tree,
}

impl SledStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(64 << 20)
            .open()?;
        Ok(SledStore {
            batches: db.open_tree("batches")?,
            headers: db.open_tree("headers")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }
}

fn corrupt(key: impl std::fmt::Display, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// `[version u8][header json len u32][header json][wrapped key len u16][wrapped key]
/// [key nonce 12][nonce 12][ciphertext …]`
fn encode(b: &SealedBatch) -> Vec<u8> {
    let header = serde_json::to_vec(&b.header).expect("header serialises");
    let e = &b.envelope;
    let mut out = Vec::with_capacity(
        1 + 4 + header.len() + 2 + e.wrapped_key.len() + 24 + e.ciphertext.len(),
    );
    out.push(VALUE_VERSION);
    out.extend_from_slice(&(header.len() as u32).to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&(e.wrapped_key.len() as u16).to_be_bytes());
    out.extend_from_slice(&e.wrapped_key);
    out.extend_from_slice(&e.key_nonce);
    out.extend_from_slice(&e.nonce);
    out.extend_from_slice(&e.ciphertext);
    out
}

fn decode(id: u64, v: &[u8]) -> Result<SealedBatch, StoreError> {
    let short = || corrupt(format!("batch {id}"), "truncated");
    let (&version, rest) = v.split_first().ok_or_else(short)?;
    if version != VALUE_VERSION {
        return Err(corrupt(
            format!("batch {id}"),
            format!("unknown version {version}"),
        ));
    }
    let (len, rest) = rest.split_first_chunk::<4>().ok_or_else(short)?;
    let len = u32::from_be_bytes(*len) as usize;
    let header = rest.get(..len).ok_or_else(short)?;
    let header: BatchHeader = serde_json::from_slice(header)
        .map_err(|e| corrupt(format!("batch {id}"), e.to_string()))?;
    let rest = &rest[len..];
    let (klen, rest) = rest.split_first_chunk::<2>().ok_or_else(short)?;
    let klen = u16::from_be_bytes(*klen) as usize;
    let wrapped_key = rest.get(..klen).ok_or_else(short)?.to_vec();
    let rest = &rest[klen..];
    let (key_nonce, rest) = rest.split_first_chunk::<12>().ok_or_else(short)?;
    let (nonce, ciphertext) = rest.split_first_chunk::<12>().ok_or_else(short)?;
    Ok(SealedBatch {
        header,
        envelope: Envelope {
            wrapped_key,
            key_nonce: *key_nonce,
            nonce: *nonce,
            ciphertext: ciphertext.to_vec(),
        },
    })
}

fn id_of(key: &[u8]) -> Result<u64, StoreError> {
    key.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| corrupt(format!("{key:?}"), "key is not a u64"))
}

fn parse_header(key: &[u8], v: &[u8]) -> Result<BatchHeader, StoreError> {
    serde_json::from_slice(v).map_err(|e| corrupt(format!("header {key:?}"), e.to_string()))
}

impl Store for SledStore {
    fn put_batch(&self, batch: &SealedBatch) -> Result<(), StoreError> {
        let key = batch.header.id.to_be_bytes();
        let value = encode(batch);
        let header = serde_json::to_vec(&batch.header).expect("header serialises");
        let result = (&self.batches, &self.headers).transaction(|(batches, headers)| {
            if batches.get(key)?.is_some() {
                return Err(ConflictableTransactionError::Abort(()));
            }
            batches.insert(&key, value.as_slice())?;
            headers.insert(&key, header.as_slice())?;
            Ok(())
        });
        match result {
            Ok(()) => {}
            Err(TransactionError::Abort(())) => return Err(StoreError::Duplicate(batch.header.id)),
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        }
        self.db.flush()?;
        Ok(())
    }

    fn batch(&self, id: u64) -> Result<Option<SealedBatch>, StoreError> {
        self.batches
            .get(id.to_be_bytes())?
            .map(|v| decode(id, &v))
            .transpose()
    }

    fn headers(&self) -> Result<Vec<BatchHeader>, StoreError> {
        self.headers
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                id_of(&k)?;
                parse_header(&k, &v)
            })
            .collect()
    }

    fn last_header(&self) -> Result<Option<BatchHeader>, StoreError> {
        self.headers
            .last()?
            .map(|(k, v)| parse_header(&k, &v))
            .transpose()
    }

    fn seq_reserved(&self) -> Result<u64, StoreError> {
        let stored = match self.meta.get(SEQ_RESERVED)? {
            Some(v) => id_of(&v)?,
            None => 0,
        };
        // The batches themselves are the last word, should the meta record lag behind them.
        let after_last = self.last_header()?.map_or(0, |h| h.seq_last + 1);
        Ok(stored.max(after_last))
    }

    fn reserve_seq(&self, next: u64) -> Result<(), StoreError> {
        self.meta.insert(SEQ_RESERVED, &next.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(id: u64) -> SealedBatch {
        SealedBatch {
            header: BatchHeader {
                id,
                rows: 2,
                seq_first: id * 10,
                seq_last: id * 10 + 1,
                ts_min: 1,
                ts_max: 2,
                received_min: 3,
                received_max: 4,
                root: "00".repeat(32),
                sealed_at: 5,
                leaf_encoding: 1,
            },
            envelope: Envelope {
                wrapped_key: vec![1; 48],
                key_nonce: [2; 12],
                nonce: [3; 12],
                ciphertext: vec![4; 100],
            },
        }
    }

    #[test]
    fn batches_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.put_batch(&sealed(0)).unwrap();
            s.put_batch(&sealed(1)).unwrap();
            assert!(matches!(
                s.put_batch(&sealed(1)),
                Err(StoreError::Duplicate(1))
            ));
            s.reserve_seq(5).unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.batch(1).unwrap().unwrap(), sealed(1));
        assert_eq!(s.batch(2).unwrap(), None);
        assert_eq!(s.headers().unwrap().len(), 2);
        assert_eq!(s.last_header().unwrap().unwrap().id, 1);
        // The last batch ends at seq 11, above the reservation of 5.
        assert_eq!(s.seq_reserved().unwrap(), 12);
        s.reserve_seq(1_000).unwrap();
        assert_eq!(s.seq_reserved().unwrap(), 1_000);
    }

    #[test]
    fn truncated_records_are_reported_not_misread() {
        let v = encode(&sealed(7));
        for cut in 0..v.len() - 100 {
            assert!(decode(7, &v[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(decode(7, &v).unwrap(), sealed(7));
    }
}
