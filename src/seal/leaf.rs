//! The canonical bytes of one reading, whose RFC 6962 leaf hash is its leaf in the batch tree.
//!
//! Encoding version 1, every integer big-endian, every string as a u32 byte length then UTF-8,
//! every optional field as one byte 0 (absent) or 1 (present) then the field:
//!
//! ```text
//! u8   0x01                  encoding version
//! u64  seq
//! i64  ts                    µs since the Unix epoch, UTC
//! i64  received              µs since the Unix epoch, UTC
//! str  source
//! opt  str subject
//! str  metric                canonical name, e.g. "heart_rate"
//! opt  f64 value             IEEE 754 binary64 bits
//! opt  str text
//! str  unit                  UCUM code
//! u16  flags
//! ```
//!
//! The leaf hash is SHA-256(0x00 ‖ these bytes). Every field of the stored row is covered, so a
//! proof shows the reading exactly as it was stored. Anyone can re-implement this from the table
//! above to verify a proof without this code.

use arrow_array::RecordBatch;
use arrow_schema::ArrowError;

use super::merkle::{leaf_hash, Hash};
use crate::model::batch::{BatchView, ReadingRef};

pub const ENCODING_VERSION: u8 = 1;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

/// Appends the canonical bytes of `r` to `out`.
pub fn encode(r: &ReadingRef<'_>, out: &mut Vec<u8>) {
    out.push(ENCODING_VERSION);
    out.extend_from_slice(&r.seq.to_be_bytes());
    out.extend_from_slice(&r.ts.to_be_bytes());
    out.extend_from_slice(&r.received.to_be_bytes());
    put_str(out, r.source);
    put_opt_str(out, r.subject);
    put_str(out, r.metric);
    match r.value {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_bits().to_be_bytes());
        }
    }
    put_opt_str(out, r.text);
    put_str(out, r.unit);
    out.extend_from_slice(&r.flags.to_be_bytes());
}

pub fn reading_leaf(r: &ReadingRef<'_>, scratch: &mut Vec<u8>) -> Hash {
    scratch.clear();
    encode(r, scratch);
    leaf_hash(scratch)
}

/// The leaf hashes of every row of a batch, in row order.
pub fn batch_leaves(batch: &RecordBatch) -> Result<Vec<Hash>, ArrowError> {
    let view = BatchView::new(batch)?;
    let mut scratch = Vec::with_capacity(128);
    Ok((0..view.len())
        .map(|i| reading_leaf(&view.row(i), &mut scratch))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_the_documented_layout() {
        let r = ReadingRef {
            seq: 1,
            ts: 2,
            received: 3,
            source: "s",
            subject: None,
            metric: "spo2",
            value: Some(1.0),
            text: None,
            unit: "%",
            flags: 0x0102,
        };
        let mut out = Vec::new();
        encode(&r, &mut out);
        let mut expect = vec![1u8];
        expect.extend_from_slice(&1u64.to_be_bytes());
        expect.extend_from_slice(&2i64.to_be_bytes());
        expect.extend_from_slice(&3i64.to_be_bytes());
        expect.extend_from_slice(&[0, 0, 0, 1, b's', 0, 0, 0, 0, 4]);
        expect.extend_from_slice(b"spo2");
        expect.push(1);
        expect.extend_from_slice(&1.0f64.to_bits().to_be_bytes());
        expect.extend_from_slice(&[0, 0, 0, 0, 1, b'%', 1, 2]);
        assert_eq!(out, expect);
        // A change to any field changes the leaf.
        let mut scratch = Vec::new();
        let base = reading_leaf(&r, &mut scratch);
        assert_ne!(
            base,
            reading_leaf(
                &ReadingRef {
                    value: Some(1.5),
                    ..r
                },
                &mut scratch
            )
        );
        assert_ne!(
            base,
            reading_leaf(
                &ReadingRef {
                    subject: Some(""),
                    ..r
                },
                &mut scratch
            )
        );
        assert_ne!(
            base,
            reading_leaf(&ReadingRef { flags: 0, ..r }, &mut scratch)
        );
    }
}
