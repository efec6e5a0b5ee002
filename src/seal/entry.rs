//! The canonical bytes of a batch header: the entry of the node's log of batches, whose RFC 6962
//! leaf hash is the batch's leaf in that log.
//!
//! Entry encoding version 1, every integer big-endian:
//!
//! ```text
//! u8   0x01                  entry encoding version
//! u64  id                    the batch's index in the log (= its leaf index)
//! u32  rows
//! u64  seq_first
//! u64  seq_last
//! i64  ts_min                µs since the Unix epoch, UTC: range of the readings' device times
//! i64  ts_max
//! i64  received_min          µs since the Unix epoch, UTC: range of the readings' arrival times
//! i64  received_max
//! i64  sealed_at             µs since the Unix epoch, UTC
//! [32] root                  the batch's RFC 6962 root over its readings' leaves (seal::leaf)
//! u8   leaf_encoding         the version of the readings' leaf encoding (seal::leaf)
//! ```
//!
//! 102 bytes in all. The log's leaf for a batch is SHA-256(0x00 ‖ these bytes): the log commits
//! to each batch's seq and time ranges as well as its root, and since a leaf hash is never an
//! interior node's hash (RFC 6962's 0x00/0x01 prefixes), a batch root cannot pass for a subtree
//! of the log. These bytes are also the entries of the log's tiles (c2sp.org/tlog-tiles) and
//! the `batch.entry` of a proof file (docs/proof-format.md).

use super::merkle::{leaf_hash, Hash};
use super::BatchHeader;

pub const ENTRY_VERSION: u8 = 1;
pub const ENTRY_LEN: usize = 1 + 8 + 4 + 8 * 2 + 8 * 5 + 32 + 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("a log entry is {ENTRY_LEN} bytes, this one is {0}")]
    Length(usize),
    #[error("log entry encoding version {0} is not known (this build reads {ENTRY_VERSION})")]
    Version(u8),
    #[error("batch {0}: its header's root is not 32 bytes of hex")]
    Root(u64),
}

/// The canonical bytes of `h`.
pub fn encode(h: &BatchHeader) -> Result<[u8; ENTRY_LEN], EntryError> {
    let root = h.root_hash().ok_or(EntryError::Root(h.id))?;
    let mut out = [0u8; ENTRY_LEN];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        out[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(&[ENTRY_VERSION]);
    put(&h.id.to_be_bytes());
    put(&h.rows.to_be_bytes());
    put(&h.seq_first.to_be_bytes());
    put(&h.seq_last.to_be_bytes());
    for v in [
        h.ts_min,
        h.ts_max,
        h.received_min,
        h.received_max,
        h.sealed_at,
    ] {
        put(&v.to_be_bytes());
    }
    put(&root);
    put(&[h.leaf_encoding]);
    Ok(out)
}

/// The batch's leaf in the node's log.
pub fn log_leaf(h: &BatchHeader) -> Result<Hash, EntryError> {
    Ok(leaf_hash(&encode(h)?))
}

/// The header whose canonical bytes are `bytes`.
pub fn decode(bytes: &[u8]) -> Result<BatchHeader, EntryError> {
    if bytes.len() != ENTRY_LEN {
        return Err(EntryError::Length(bytes.len()));
    }
    if bytes[0] != ENTRY_VERSION {
        return Err(EntryError::Version(bytes[0]));
    }
    let mut at = 1;
    let mut take = |n: usize| {
        let s = &bytes[at..at + n];
        at += n;
        s
    };
    let u64_at = |s: &[u8]| u64::from_be_bytes(s.try_into().expect("8 bytes"));
    let i64_at = |s: &[u8]| i64::from_be_bytes(s.try_into().expect("8 bytes"));
    let id = u64_at(take(8));
    let rows = u32::from_be_bytes(take(4).try_into().expect("4 bytes"));
    let seq_first = u64_at(take(8));
    let seq_last = u64_at(take(8));
    let ts_min = i64_at(take(8));
    let ts_max = i64_at(take(8));
    let received_min = i64_at(take(8));
    let received_max = i64_at(take(8));
    let sealed_at = i64_at(take(8));
    let root = super::merkle::to_hex(take(32));
    let leaf_encoding = take(1)[0];
    Ok(BatchHeader {
        id,
        rows,
        seq_first,
        seq_last,
        ts_min,
        ts_max,
        received_min,
        received_max,
        root,
        sealed_at,
        leaf_encoding,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> BatchHeader {
        BatchHeader {
            id: 7,
            rows: 3,
            seq_first: 100,
            seq_last: 102,
            ts_min: -1,
            ts_max: 2,
            received_min: 3,
            received_max: 4,
            root: super::super::merkle::to_hex(&[0xab; 32]),
            sealed_at: 5,
            leaf_encoding: 1,
        }
    }

    #[test]
    fn encoding_is_the_documented_layout() {
        let bytes = encode(&header()).unwrap();
        let mut expect = vec![1u8];
        expect.extend_from_slice(&7u64.to_be_bytes());
        expect.extend_from_slice(&3u32.to_be_bytes());
        expect.extend_from_slice(&100u64.to_be_bytes());
        expect.extend_from_slice(&102u64.to_be_bytes());
        for v in [-1i64, 2, 3, 4, 5] {
            expect.extend_from_slice(&v.to_be_bytes());
        }
        expect.extend_from_slice(&[0xab; 32]);
        expect.push(1);
        assert_eq!(bytes.as_slice(), expect.as_slice());
        assert_eq!(ENTRY_LEN, 102);
        assert_eq!(decode(&bytes).unwrap(), header());
    }

    #[test]
    fn every_field_changes_the_leaf_and_bad_bytes_are_named() {
        let base = log_leaf(&header()).unwrap();
        let changed = [
            BatchHeader { id: 8, ..header() },
            BatchHeader {
                seq_last: 103,
                ..header()
            },
            BatchHeader {
                ts_max: 3,
                ..header()
            },
            BatchHeader {
                leaf_encoding: 2,
                ..header()
            },
        ];
        for h in changed {
            assert_ne!(log_leaf(&h).unwrap(), base, "{h:?}");
        }
        let bytes = encode(&header()).unwrap();
        assert_eq!(decode(&bytes[..101]), Err(EntryError::Length(101)));
        let mut v2 = bytes;
        v2[0] = 2;
        assert_eq!(decode(&v2), Err(EntryError::Version(2)));
        let bad = BatchHeader {
            root: "xyz".into(),
            ..header()
        };
        assert_eq!(log_leaf(&bad), Err(EntryError::Root(7)));
    }
}
