//! Sealing a batch: leaf hash per reading, the batch's Merkle root, Arrow IPC bytes encrypted in
//! an envelope whose associated data is the batch header. Opening reverses it and checks the
//! root again, so a stored batch that decrypts is also known to hash to its recorded root.

pub mod checkpoint;
pub mod crypt;
pub mod entry;
pub mod keys;
pub mod leaf;
pub mod merkle;

use arrow_array::RecordBatch;
use arrow_ipc::reader::StreamReader;
use arrow_ipc::writer::StreamWriter;
use arrow_schema::ArrowError;
use serde::{Deserialize, Serialize};

use crate::model::batch::Columns;
use crate::model::reading::schema;
use crypt::{CryptError, Envelope, MasterKey};
use merkle::Hash;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("arrow: {0}")]
    Arrow(#[from] ArrowError),
    #[error(transparent)]
    Crypt(#[from] CryptError),
    #[error("batch {id}: its readings hash to {actual}, the header says {expected}")]
    RootMismatch {
        id: u64,
        expected: String,
        actual: String,
    },
    #[error("batch {0}: the decrypted bytes hold no record batch")]
    Empty(u64),
}

/// What is known of a batch without decrypting it. Every field is bound to the ciphertext as
/// associated data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchHeader {
    /// The batch's index in the node's log of batch roots.
    pub id: u64,
    pub rows: u32,
    pub seq_first: u64,
    pub seq_last: u64,
    /// Range of the readings' `ts`, µs since the epoch.
    pub ts_min: i64,
    pub ts_max: i64,
    pub received_min: i64,
    pub received_max: i64,
    /// RFC 6962 root over the readings' leaf hashes, hex.
    pub root: String,
    pub sealed_at: i64,
    /// Version of the leaf encoding (seal::leaf).
    pub leaf_encoding: u8,
}

impl BatchHeader {
    /// The fixed binary form authenticated with the ciphertext.
    pub fn aad(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(b"iomt-edge batch v1\0");
        for v in [self.id, self.rows as u64, self.seq_first, self.seq_last] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        for v in [
            self.ts_min,
            self.ts_max,
            self.received_min,
            self.received_max,
            self.sealed_at,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(self.root.as_bytes());
        out.push(self.leaf_encoding);
        out
    }

    pub fn root_hash(&self) -> Option<Hash> {
        merkle::from_hex(&self.root)?.try_into().ok()
    }
}

/// A batch as stored: its header and its encrypted Arrow IPC stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedBatch {
    pub header: BatchHeader,
    pub envelope: Envelope,
}

/// Seals and opens batches with the node's master key.
#[derive(Debug)]
pub struct Sealer {
    master: MasterKey,
}

impl Sealer {
    pub fn new(master: MasterKey) -> Self {
        Sealer { master }
    }

    /// Seals the readings of `columns` as batch `id`.
    pub fn seal(&self, id: u64, columns: Columns) -> Result<SealedBatch, SealError> {
        let (received_min, received_max) = min_max(&columns.received);
        let (ts_min, ts_max) = min_max(&columns.ts);
        let seq_first = columns.seq.first().copied().unwrap_or(0);
        let seq_last = columns.seq.last().copied().unwrap_or(0);
        let batch = columns.into_record_batch()?;
        let root = merkle::root(&leaf::batch_leaves(&batch)?);
        let header = BatchHeader {
            id,
            rows: batch.num_rows() as u32,
            seq_first,
            seq_last,
            ts_min,
            ts_max,
            received_min,
            received_max,
            root: merkle::to_hex(&root),
            sealed_at: crate::model::reading::now_micros(),
            leaf_encoding: leaf::ENCODING_VERSION,
        };
        let ipc = to_ipc(&batch)?;
        let envelope = self.master.seal(ipc, &header.aad())?;
        Ok(SealedBatch { header, envelope })
    }

    /// Decrypts a stored batch and checks that its readings hash to the header's root.
    pub fn open(&self, sealed: &SealedBatch) -> Result<RecordBatch, SealError> {
        let h = &sealed.header;
        let ipc = self.master.open(&sealed.envelope, &h.aad())?;
        let batch = from_ipc(&ipc)?.ok_or(SealError::Empty(h.id))?;
        let actual = merkle::to_hex(&merkle::root(&leaf::batch_leaves(&batch)?));
        if actual != h.root {
            return Err(SealError::RootMismatch {
                id: h.id,
                expected: h.root.clone(),
                actual,
            });
        }
        Ok(batch)
    }
}

fn min_max(v: &[i64]) -> (i64, i64) {
    v.iter()
        .fold(None, |acc, &x| match acc {
            None => Some((x, x)),
            Some((lo, hi)) => Some((lo.min(x), hi.max(x))),
        })
        .unwrap_or((0, 0))
}

pub fn to_ipc(batch: &RecordBatch) -> Result<Vec<u8>, ArrowError> {
    let mut w =
        StreamWriter::try_new(Vec::with_capacity(batch.get_array_memory_size()), &schema())?;
    w.write(batch)?;
    w.finish()?;
    w.into_inner()
}

pub fn from_ipc(bytes: &[u8]) -> Result<Option<RecordBatch>, ArrowError> {
    let mut r = StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    r.next().transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::batch::{BatchBuilder, BatchView, Row};
    use crate::model::reading::Metric;

    fn columns() -> Columns {
        let mut b = BatchBuilder::new(100, 8);
        for i in 0..5 {
            b.push(Row {
                ts: 1_000 + i,
                received: 2_000 + i,
                source: "dev-1",
                subject: Some("bed-1"),
                metric: Metric::HeartRate,
                value: Some(70.0 + i as f64),
                text: None,
                flags: 0,
            });
        }
        b.take()
    }

    #[test]
    fn sealed_batches_open_to_the_same_readings() {
        let sealer = Sealer::new(MasterKey::from_bytes(&[1u8; 32]).unwrap());
        let cols = columns();
        let expected = BatchView::new(&columns().into_record_batch().unwrap())
            .unwrap()
            .readings()
            .unwrap();
        let sealed = sealer.seal(3, cols).unwrap();
        assert_eq!(sealed.header.rows, 5);
        assert_eq!(
            (sealed.header.seq_first, sealed.header.seq_last),
            (100, 104)
        );
        assert_eq!((sealed.header.ts_min, sealed.header.ts_max), (1_000, 1_004));
        let batch = sealer.open(&sealed).unwrap();
        assert_eq!(
            BatchView::new(&batch).unwrap().readings().unwrap(),
            expected
        );
    }

    #[test]
    fn an_altered_header_or_ciphertext_does_not_open() {
        let sealer = Sealer::new(MasterKey::from_bytes(&[1u8; 32]).unwrap());
        let sealed = sealer.seal(3, columns()).unwrap();
        let mut moved = sealed.clone();
        moved.header.id = 4;
        assert!(matches!(sealer.open(&moved), Err(SealError::Crypt(_))));
        let mut bad = sealed.clone();
        bad.header.root = merkle::to_hex(&[0u8; 32]);
        assert!(sealer.open(&bad).is_err());
        let mut bad = sealed;
        let n = bad.envelope.ciphertext.len();
        bad.envelope.ciphertext[n / 2] ^= 0x40;
        assert!(matches!(sealer.open(&bad), Err(SealError::Crypt(_))));
    }
}
