//! Sealing a batch: leaf hash per reading, the batch's Merkle root, Arrow IPC bytes encrypted in
//! an envelope whose associated data is the batch header. Opening reverses it and checks the
//! root again, so a stored batch that decrypts is also known to hash to its recorded root.
//!
//! What the envelope encrypts depends on the header's `leaf_encoding` (seal::leaf), which is part
//! of the associated data, so it cannot be changed without the batch failing to open:
//!
//! ```text
//! leaf_encoding 1:  Arrow IPC stream
//! leaf_encoding 2:  "iomt-edge plaintext v2" 0x00  (23 bytes)
//!                   batch salt key                 (32 bytes)
//!                   Arrow IPC stream
//! ```
//!
//! The salt key every leaf salt of the batch is derived from thus travels encrypted and
//! authenticated with the readings, under the same data key: it is in no header and never in the
//! clear on disk, and whoever can read the readings can also prove them. The leading label is
//! redundant with the header on purpose: bytes laid out otherwise (an IPC stream starts with
//! 0xffffffff) are reported as such instead of lending their first bytes to a key.

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
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::model::batch::Columns;
use crate::model::reading::schema;
use crypt::{CryptError, Envelope, MasterKey};
use leaf::{LeafEncoding, LeafError, SaltKey, SALT_KEY_LEN};
use merkle::Hash;

/// The first bytes of a leaf-encoding-2 plaintext: "iomt-edge plaintext v2" then a zero byte.
pub const PLAINTEXT_V2_LABEL: &[u8; 23] = b"iomt-edge plaintext v2\0";

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
    #[error("batch {id}: the decrypted bytes are not an Arrow IPC stream of readings: {source}")]
    Ipc { id: u64, source: ArrowError },
    #[error("batch {id}: {source}")]
    Leaves { id: u64, source: LeafError },
    #[error("batch {id}: its header says leaf encoding 2, but the decrypted bytes {problem}")]
    Plaintext { id: u64, problem: &'static str },
    #[error("the system random number generator failed to make a batch salt key")]
    Random,
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

/// An opened batch: its readings and, under leaf encoding 2, the key their salts derive from,
/// which proofs need. The key is as secret as the readings, so `Debug` leaves it out.
#[derive(Clone, PartialEq)]
pub struct OpenedBatch {
    pub batch: RecordBatch,
    /// `Some` exactly when the batch was sealed with leaf encoding 2.
    pub salt_key: Option<SaltKey>,
}

impl std::fmt::Debug for OpenedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedBatch")
            .field("rows", &self.batch.num_rows())
            .field("salt_key", &self.salt_key.map(|_| ".."))
            .finish()
    }
}

impl OpenedBatch {
    pub fn leaf_encoding(&self) -> LeafEncoding {
        match self.salt_key {
            Some(_) => LeafEncoding::V2,
            None => LeafEncoding::V1,
        }
    }

    /// The batch's leaf hashes, in row order, under its own encoding.
    pub fn leaves(&self) -> Result<Vec<Hash>, LeafError> {
        leaf::batch_leaves(self.leaf_encoding(), &self.batch, self.salt_key.as_ref())
    }
}

/// Seals and opens batches with the node's master key.
#[derive(Debug)]
pub struct Sealer {
    master: MasterKey,
    rng: SystemRandom,
}

impl Sealer {
    pub fn new(master: MasterKey) -> Self {
        Sealer {
            master,
            rng: SystemRandom::new(),
        }
    }

    /// Seals the readings of `columns` as batch `id`, with leaf encoding 2 under a new salt key.
    pub fn seal(&self, id: u64, columns: Columns) -> Result<SealedBatch, SealError> {
        let (received_min, received_max) = min_max(&columns.received);
        let (ts_min, ts_max) = min_max(&columns.ts);
        let seq_first = columns.seq.first().copied().unwrap_or(0);
        let seq_last = columns.seq.last().copied().unwrap_or(0);
        let batch = columns.into_record_batch()?;
        let mut salt_key: SaltKey = [0; SALT_KEY_LEN];
        self.rng
            .fill(&mut salt_key)
            .map_err(|_| SealError::Random)?;
        let leaves = leaf::batch_leaves(LeafEncoding::V2, &batch, Some(&salt_key))
            .map_err(|source| SealError::Leaves { id, source })?;
        let header = BatchHeader {
            id,
            rows: batch.num_rows() as u32,
            seq_first,
            seq_last,
            ts_min,
            ts_max,
            received_min,
            received_max,
            root: merkle::to_hex(&merkle::root(&leaves)),
            sealed_at: crate::model::reading::now_micros(),
            leaf_encoding: LeafEncoding::V2.byte(),
        };
        // The IPC stream is written straight after the label and key, so the batch is not copied.
        let mut plaintext = Vec::with_capacity(
            PLAINTEXT_V2_LABEL.len() + SALT_KEY_LEN + batch.get_array_memory_size(),
        );
        plaintext.extend_from_slice(PLAINTEXT_V2_LABEL);
        plaintext.extend_from_slice(&salt_key);
        let plaintext = write_ipc(plaintext, &batch)?;
        let envelope = self.master.seal(plaintext, &header.aad())?;
        Ok(SealedBatch { header, envelope })
    }

    /// Decrypts a stored batch of either leaf encoding and checks that its readings hash to the
    /// header's root under that encoding.
    pub fn open(&self, sealed: &SealedBatch) -> Result<OpenedBatch, SealError> {
        let h = &sealed.header;
        let id = h.id;
        // Decrypting first authenticates the header, so an altered leaf encoding is reported
        // as an altered batch rather than as a layout problem.
        let plaintext = self.master.open(&sealed.envelope, &h.aad())?;
        let encoding = LeafEncoding::from_byte(h.leaf_encoding)
            .map_err(|source| SealError::Leaves { id, source })?;
        let (ipc, salt_key) = match encoding {
            LeafEncoding::V1 => (&plaintext[..], None),
            LeafEncoding::V2 => {
                let (key, ipc) =
                    split_v2(&plaintext).map_err(|problem| SealError::Plaintext { id, problem })?;
                (ipc, Some(key))
            }
        };
        let batch = from_ipc(ipc)
            .map_err(|source| SealError::Ipc { id, source })?
            .ok_or(SealError::Empty(id))?;
        let leaves = leaf::batch_leaves(encoding, &batch, salt_key.as_ref())
            .map_err(|source| SealError::Leaves { id, source })?;
        let actual = merkle::to_hex(&merkle::root(&leaves));
        if actual != h.root {
            return Err(SealError::RootMismatch {
                id,
                expected: h.root.clone(),
                actual,
            });
        }
        Ok(OpenedBatch { batch, salt_key })
    }
}

/// Splits a leaf-encoding-2 plaintext into the batch salt key and the IPC stream.
fn split_v2(plaintext: &[u8]) -> Result<(SaltKey, &[u8]), &'static str> {
    let rest = plaintext
        .strip_prefix(&PLAINTEXT_V2_LABEL[..])
        .ok_or("do not start with \"iomt-edge plaintext v2\" and a zero byte")?;
    if rest.len() < SALT_KEY_LEN {
        return Err("end inside the batch salt key");
    }
    let (key, ipc) = rest.split_at(SALT_KEY_LEN);
    let mut salt_key = [0u8; SALT_KEY_LEN];
    salt_key.copy_from_slice(key);
    Ok((salt_key, ipc))
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
    write_ipc(Vec::with_capacity(batch.get_array_memory_size()), batch)
}

/// Appends the IPC stream of `batch` to `out`.
fn write_ipc(out: Vec<u8>, batch: &RecordBatch) -> Result<Vec<u8>, ArrowError> {
    let mut w = StreamWriter::try_new(out, &schema())?;
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

    fn sealer() -> Sealer {
        Sealer::new(MasterKey::from_bytes(&[1u8; 32]).unwrap())
    }

    #[test]
    fn sealed_batches_open_to_the_same_readings() {
        let sealer = sealer();
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
        assert_eq!(sealed.header.leaf_encoding, 2);
        let opened = sealer.open(&sealed).unwrap();
        assert_eq!(
            BatchView::new(&opened.batch).unwrap().readings().unwrap(),
            expected
        );
        // Re-hashed with its salts, the batch gives the header's root.
        let salt_key = opened.salt_key.expect("encoding 2 hands back its salt key");
        assert_eq!(opened.leaf_encoding(), LeafEncoding::V2);
        let leaves = leaf::batch_leaves(LeafEncoding::V2, &opened.batch, Some(&salt_key)).unwrap();
        assert_eq!(opened.leaves().unwrap(), leaves);
        assert_eq!(Some(merkle::root(&leaves)), sealed.header.root_hash());
        assert_eq!(
            format!("{opened:?}"),
            r#"OpenedBatch { rows: 5, salt_key: Some("..") }"#
        );
    }

    #[test]
    fn every_batch_gets_its_own_salt_key() {
        let sealer = sealer();
        let a = sealer.seal(1, columns()).unwrap();
        let b = sealer.seal(1, columns()).unwrap();
        let (ka, kb) = (
            sealer.open(&a).unwrap().salt_key.unwrap(),
            sealer.open(&b).unwrap().salt_key.unwrap(),
        );
        assert_ne!(ka, kb);
        // The same readings, under other salts: another root.
        assert_ne!(a.header.root, b.header.root);
    }

    /// The envelope's plaintext is exactly the documented layout, and the salt key appears
    /// nowhere outside the ciphertext: not in the header (as stored, as JSON, or as associated
    /// data), the wrapped data key or the nonces.
    #[test]
    fn the_salt_key_travels_only_inside_the_ciphertext() {
        let sealer = sealer();
        let cols = columns();
        let batch = columns().into_record_batch().unwrap();
        let sealed = sealer.seal(3, cols).unwrap();
        let key = sealer.open(&sealed).unwrap().salt_key.unwrap();

        let plaintext = MasterKey::from_bytes(&[1u8; 32])
            .unwrap()
            .open(&sealed.envelope, &sealed.header.aad())
            .unwrap();
        let mut expect = b"iomt-edge plaintext v2\0".to_vec();
        expect.extend_from_slice(&key);
        expect.extend_from_slice(&to_ipc(&batch).unwrap());
        assert_eq!(plaintext, expect);

        let hex = merkle::to_hex(&key);
        // As `Debug` would print it: "[12, 200, …".
        let decimal = format!("{:?}", &key[..8]);
        let decimal = decimal.trim_end_matches(']');
        let json = serde_json::to_vec(&sealed.header).unwrap();
        let debug = format!("{:?}", sealed);
        let e = &sealed.envelope;
        for (name, bytes) in [
            ("aad", sealed.header.aad()),
            ("header json", json),
            ("sealed batch, debug-printed", debug.into_bytes()),
            ("wrapped key", e.wrapped_key.clone()),
            ("key nonce", e.key_nonce.to_vec()),
            ("nonce", e.nonce.to_vec()),
            ("ciphertext", e.ciphertext.clone()),
        ] {
            for needle in [
                &key[..],
                &key[..8],
                &key[24..],
                hex.as_bytes(),
                decimal.as_bytes(),
            ] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle),
                    "the salt key shows in the {name}"
                );
            }
        }
    }

    #[test]
    fn an_altered_header_or_ciphertext_does_not_open() {
        let sealer = sealer();
        let sealed = sealer.seal(3, columns()).unwrap();
        let mut moved = sealed.clone();
        moved.header.id = 4;
        assert!(matches!(sealer.open(&moved), Err(SealError::Crypt(_))));
        let mut bad = sealed.clone();
        bad.header.root = merkle::to_hex(&[0u8; 32]);
        assert!(matches!(sealer.open(&bad), Err(SealError::Crypt(_))));
        // Claimed unsalted, the batch would be checked without its salts: the header is bound.
        let mut bad = sealed.clone();
        bad.header.leaf_encoding = 1;
        assert!(matches!(sealer.open(&bad), Err(SealError::Crypt(_))));
        for i in 0..sealed.envelope.ciphertext.len() {
            let mut bad = sealed.clone();
            bad.envelope.ciphertext[i] ^= 0x40;
            assert!(
                matches!(sealer.open(&bad), Err(SealError::Crypt(_))),
                "byte {i}"
            );
        }
    }

    /// Envelopes whose plaintext does not match their header's leaf encoding, made with the
    /// master key directly as a buggy or future sealer could: each is refused naming the batch.
    #[test]
    fn a_plaintext_must_match_its_leaf_encoding() {
        let sealer = sealer();
        let master = MasterKey::from_bytes(&[1u8; 32]).unwrap();
        let good = sealer.seal(6, columns()).unwrap();
        let ipc = to_ipc(&columns().into_record_batch().unwrap()).unwrap();
        let with = |leaf_encoding: u8, plaintext: Vec<u8>| {
            let mut header = good.header.clone();
            header.leaf_encoding = leaf_encoding;
            let envelope = master.seal(plaintext, &header.aad()).unwrap();
            sealer.open(&SealedBatch { header, envelope }).unwrap_err()
        };

        let e = with(2, ipc.clone());
        assert!(matches!(e, SealError::Plaintext { id: 6, .. }), "{e}");
        assert!(e.to_string().starts_with("batch 6: its header says leaf encoding 2, but the decrypted bytes do not start with"), "{e}");
        let mut short = PLAINTEXT_V2_LABEL.to_vec();
        short.extend_from_slice(&[7; 31]);
        let e = with(2, short);
        assert!(
            e.to_string().ends_with("end inside the batch salt key"),
            "{e}"
        );
        // Not an IPC stream (a continuation marker, then a message of garbage). A version-2
        // plaintext under a version-1 header is not one either, but Arrow first zero-fills the
        // 1.9 GB its label's first four bytes spell as a length: too slow for a unit test.
        let mut garbage = vec![0xff; 4];
        garbage.extend_from_slice(&16u32.to_le_bytes());
        garbage.extend_from_slice(&[7; 16]);
        let e = with(1, garbage);
        assert!(matches!(e, SealError::Ipc { id: 6, .. }), "{e}");
        assert!(
            e.to_string()
                .starts_with("batch 6: the decrypted bytes are not an Arrow IPC stream"),
            "{e}"
        );
        let mut v2 = PLAINTEXT_V2_LABEL.to_vec();
        v2.extend_from_slice(&[7; 32]);
        v2.extend_from_slice(&ipc);
        // Another salt key than the one the root was made with: the root does not match.
        let e = with(2, v2);
        assert!(matches!(e, SealError::RootMismatch { id: 6, .. }), "{e}");
        let e = with(3, ipc);
        assert!(
            e.to_string()
                == "batch 6: leaf encoding 3 is unknown: this build knows encodings 1 and 2",
            "{e}"
        );
    }

    /// A batch as sealed by the code before leaf encoding 2 (tests/compat/README.md).
    struct V1Fixture {
        master: [u8; 32],
        sealed: SealedBatch,
        readings: Vec<serde_json::Value>,
        canonical: Vec<Vec<u8>>,
    }

    fn v1_fixture() -> V1Fixture {
        let text = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/compat/sealed-batch-leaf-v1.json"
        ));
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        let hex = |v: &serde_json::Value| merkle::from_hex(v.as_str().unwrap()).unwrap();
        let env = &v["envelope"];
        V1Fixture {
            master: hex(&v["master_key"]).try_into().unwrap(),
            sealed: SealedBatch {
                header: serde_json::from_value(v["header"].clone()).unwrap(),
                envelope: Envelope {
                    wrapped_key: hex(&env["wrapped_key"]),
                    key_nonce: hex(&env["key_nonce"]).try_into().unwrap(),
                    nonce: hex(&env["nonce"]).try_into().unwrap(),
                    ciphertext: hex(&env["ciphertext"]),
                },
            },
            readings: v["readings"].as_array().unwrap().clone(),
            canonical: v["canonical_bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(hex)
                .collect(),
        }
    }

    #[test]
    fn a_batch_sealed_with_leaf_encoding_1_still_opens() {
        let f = v1_fixture();
        assert_eq!(f.sealed.header.leaf_encoding, 1);
        let sealer = Sealer::new(MasterKey::from_bytes(&f.master).unwrap());
        let opened = sealer.open(&f.sealed).unwrap();
        assert_eq!(opened.salt_key, None);
        assert_eq!(opened.leaf_encoding(), LeafEncoding::V1);
        let view = BatchView::new(&opened.batch).unwrap();
        assert_eq!(view.len(), f.readings.len());
        assert_eq!(f.canonical.len(), f.readings.len());
        let mut leaves = Vec::new();
        for (i, (expected, canonical)) in f.readings.iter().zip(&f.canonical).enumerate() {
            let r = view.row(i);
            let as_json = serde_json::json!({
                "seq": r.seq, "ts": r.ts, "received": r.received, "source": r.source,
                "subject": r.subject, "metric": r.metric, "value": r.value, "text": r.text,
                "unit": r.unit, "flags": r.flags,
            });
            assert_eq!(&as_json, expected, "row {i}");
            // The old code's canonical bytes: this code encodes and decodes them alike.
            let mut bytes = Vec::new();
            leaf::encode_v1(&r, &mut bytes);
            assert_eq!(&bytes, canonical, "row {i}");
            let decoded = leaf::decode(canonical).unwrap();
            assert_eq!(decoded.reading(), r, "row {i}");
            assert_eq!(decoded.salt, None);
            leaves.push(merkle::leaf_hash(canonical));
        }
        assert_eq!(opened.leaves().unwrap(), leaves);
        assert_eq!(Some(merkle::root(&leaves)), f.sealed.header.root_hash());

        // Still bound to its header and its bytes.
        let mut bad = f.sealed.clone();
        bad.header.leaf_encoding = 2;
        assert!(matches!(sealer.open(&bad), Err(SealError::Crypt(_))));
        let mut bad = f.sealed.clone();
        bad.envelope.ciphertext[10] ^= 1;
        assert!(matches!(sealer.open(&bad), Err(SealError::Crypt(_))));
        let mut bad = f.sealed;
        bad.header.sealed_at += 1;
        assert!(matches!(sealer.open(&bad), Err(SealError::Crypt(_))));
    }
}
