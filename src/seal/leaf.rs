//! The canonical bytes of one reading, whose RFC 6962 leaf hash is its leaf in the batch tree.
//!
//! The leaf hash is SHA-256(0x00 ‖ canonical bytes). Every field of the stored row is covered,
//! so a proof shows the reading exactly as it was stored. Anyone can re-implement the encodings
//! from the tables below to verify a proof without this code.
//!
//! Two encodings exist. A batch header's `leaf_encoding` (part of the associated data the batch
//! is sealed with) says which one its leaves use, and the first byte of the canonical bytes
//! repeats it. Every integer is big-endian, every string a u32 byte length then UTF-8, every
//! optional field one byte 0 (absent) or 1 (present) then the field.
//!
//! # Encoding version 2 (every batch sealed now)
//!
//! ```text
//! u8       0x02                encoding version
//! [u8;32]  salt                this reading's salt (below)
//! u64      seq
//! i64      ts                  µs since the Unix epoch, UTC
//! i64      received            µs since the Unix epoch, UTC
//! str      source
//! opt str  subject
//! str      metric              canonical name, e.g. "heart_rate"
//! opt f64  value               IEEE 754 binary64 bits
//! opt str  text
//! str      unit                UCUM code
//! u16      flags
//! ```
//!
//! That is version 1's fields, in version 1's order, with the salt between the version byte and
//! `seq`: at a fixed offset, so a verifier can take it out without parsing the rest.
//!
//! The salt of the reading with sequence number `seq` is
//!
//! ```text
//! salt = HMAC-SHA-256(key = the batch's salt key,
//!                     message = "iomt-edge leaf salt v2" ‖ 0x00 ‖ seq as u64 big-endian)
//! ```
//!
//! the label being those 22 ASCII bytes and one zero byte ([`SALT_LABEL`]), so the message is 31
//! bytes. The batch's salt key is 32 bytes from the system random number generator, new for
//! every batch, and kept only inside the batch's encrypted envelope (`seal/mod.rs` gives the
//! plaintext layout); it is never in the header and never in the clear on disk.
//!
//! Why the salt: an inclusion proof for one reading hands its holder the sibling hashes on its
//! path, among them other readings' leaves, i.e. other patients'. Under version 1 a holder who
//! guesses a neighbour's source, subject, time and value can encode the guess, hash it and find
//! it among the siblings. Under version 2 each leaf also commits to 32 bytes nobody outside the
//! node knows, so a leaf confirms nothing about a guess. A proof carries its own readings' salts,
//! never the batch's key: HMAC being a pseudo-random function, one reading's salt says nothing
//! about another's.
//!
//! # Encoding version 1 (batches sealed before salted leaves; still opened and verified)
//!
//! ```text
//! u8       0x01                encoding version
//! u64      seq
//! i64      ts                  µs since the Unix epoch, UTC
//! i64      received            µs since the Unix epoch, UTC
//! str      source
//! opt str  subject
//! str      metric              canonical name, e.g. "heart_rate"
//! opt f64  value               IEEE 754 binary64 bits
//! opt str  text
//! str      unit                UCUM code
//! u16      flags
//! ```

use arrow_array::RecordBatch;
use arrow_schema::ArrowError;
use ring::hmac;

use super::merkle::{leaf_hash, Hash};
use crate::model::batch::{BatchView, ReadingRef};

pub const SALT_LEN: usize = 32;
pub const SALT_KEY_LEN: usize = 32;
/// One reading's salt: what its proof reveals.
pub type Salt = [u8; SALT_LEN];
/// A batch's salt key: what every salt of the batch is derived from. Never leaves the envelope
/// but to make proofs.
pub type SaltKey = [u8; SALT_KEY_LEN];
/// The HMAC message prefix of a salt: "iomt-edge leaf salt v2" then a zero byte.
pub const SALT_LABEL: &[u8; 23] = b"iomt-edge leaf salt v2\0";

/// A leaf encoding version: the first byte of a reading's canonical bytes and a batch header's
/// `leaf_encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafEncoding {
    /// No salt; batches sealed before version 2.
    V1 = 1,
    /// Salted.
    V2 = 2,
}

impl LeafEncoding {
    /// The encoding new batches are sealed with.
    pub const CURRENT: LeafEncoding = LeafEncoding::V2;

    pub fn from_byte(b: u8) -> Result<Self, LeafError> {
        match b {
            1 => Ok(LeafEncoding::V1),
            2 => Ok(LeafEncoding::V2),
            other => Err(LeafError::UnknownEncoding(other)),
        }
    }

    pub fn byte(self) -> u8 {
        self as u8
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeafError {
    #[error("leaf encoding {0} is unknown: this build knows encodings 1 and 2")]
    UnknownEncoding(u8),
    #[error("leaf encoding 2 salts every leaf, and no salt key was given for the batch")]
    MissingSaltKey,
    #[error("leaf encoding 1 has no salts, yet a salt key was given for the batch")]
    UnexpectedSaltKey,
    #[error("the record batch is not a batch of readings: {0}")]
    Arrow(#[from] ArrowError),
}

/// Why canonical bytes could not be decoded. Offsets count from the version byte, 0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the canonical bytes are empty: there is not even an encoding version byte")]
    Empty,
    #[error("the canonical bytes start with encoding version {0}: this build knows 1 and 2")]
    UnknownVersion(u8),
    #[error("the canonical bytes end inside {field} at byte {offset}: it needs {needed} bytes, {available} are left")]
    Truncated {
        field: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("the canonical bytes mark {field} at byte {offset} with {tag}, which is neither 0 (absent) nor 1 (present)")]
    BadPresence {
        field: &'static str,
        offset: usize,
        tag: u8,
    },
    #[error("the canonical bytes hold {field} at byte {offset} that is not UTF-8")]
    NotUtf8 { field: &'static str, offset: usize },
    #[error("the canonical bytes go on for {extra} bytes after their last field (flags), which ends at byte {end}")]
    Trailing { end: usize, extra: usize },
}

/// Derives the salts of one batch. Keyed once per batch, as keying HMAC costs as much as two
/// SHA-256 blocks.
pub struct Salts {
    key: hmac::Key,
}

impl std::fmt::Debug for Salts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Salts(..)")
    }
}

impl Salts {
    pub fn new(salt_key: &SaltKey) -> Self {
        Salts {
            key: hmac::Key::new(hmac::HMAC_SHA256, salt_key),
        }
    }

    /// The salt of the reading with sequence number `seq`.
    pub fn salt(&self, seq: u64) -> Salt {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(SALT_LABEL);
        ctx.update(&seq.to_be_bytes());
        let mut out = [0u8; SALT_LEN];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }
}

/// The salt of the reading with sequence number `seq` in the batch whose salt key is `salt_key`.
pub fn reading_salt(salt_key: &SaltKey, seq: u64) -> Salt {
    Salts::new(salt_key).salt(seq)
}

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

/// The fields both versions share, from `seq` to `flags`.
fn put_fields(r: &ReadingRef<'_>, out: &mut Vec<u8>) {
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

/// Appends the version 1 canonical bytes of `r` to `out`.
pub fn encode_v1(r: &ReadingRef<'_>, out: &mut Vec<u8>) {
    out.push(LeafEncoding::V1.byte());
    put_fields(r, out);
}

/// Appends the version 2 canonical bytes of `r`, whose salt is `salt`, to `out`.
pub fn encode_v2(r: &ReadingRef<'_>, salt: &Salt, out: &mut Vec<u8>) {
    out.push(LeafEncoding::V2.byte());
    out.extend_from_slice(salt);
    put_fields(r, out);
}

/// Appends the canonical bytes of `r` to `out`: version 2 with a salt, version 1 without.
pub fn encode(r: &ReadingRef<'_>, salt: Option<&Salt>, out: &mut Vec<u8>) {
    match salt {
        Some(salt) => encode_v2(r, salt, out),
        None => encode_v1(r, out),
    }
}

/// The leaf hash of `r`: version 2 with a salt, version 1 without. `scratch` is reused so that
/// hashing a batch allocates once.
pub fn reading_leaf(r: &ReadingRef<'_>, salt: Option<&Salt>, scratch: &mut Vec<u8>) -> Hash {
    scratch.clear();
    encode(r, salt, scratch);
    leaf_hash(scratch)
}

/// The leaf hashes of every row of a batch, in row order. Encoding 2 needs the batch's salt key,
/// encoding 1 refuses one: a mismatch means the caller mixed up batches or versions.
pub fn batch_leaves(
    encoding: LeafEncoding,
    batch: &RecordBatch,
    salt_key: Option<&SaltKey>,
) -> Result<Vec<Hash>, LeafError> {
    let salts = match (encoding, salt_key) {
        (LeafEncoding::V1, None) => None,
        (LeafEncoding::V2, Some(key)) => Some(Salts::new(key)),
        (LeafEncoding::V1, Some(_)) => return Err(LeafError::UnexpectedSaltKey),
        (LeafEncoding::V2, None) => return Err(LeafError::MissingSaltKey),
    };
    let view = BatchView::new(batch)?;
    let mut scratch = Vec::with_capacity(160);
    Ok((0..view.len())
        .map(|i| {
            let r = view.row(i);
            let salt = salts.as_ref().map(|s| s.salt(r.seq));
            reading_leaf(&r, salt.as_ref(), &mut scratch)
        })
        .collect())
}

/// A reading decoded from its canonical bytes, owned: what a verifier compares with the reading a
/// proof states.
#[derive(Debug, Clone, PartialEq)]
pub struct CanonicalReading {
    pub encoding: LeafEncoding,
    /// Present exactly when `encoding` is version 2.
    pub salt: Option<Salt>,
    pub seq: u64,
    pub ts: i64,
    pub received: i64,
    pub source: String,
    pub subject: Option<String>,
    pub metric: String,
    pub value: Option<f64>,
    pub text: Option<String>,
    pub unit: String,
    pub flags: u16,
}

impl CanonicalReading {
    /// The reading's fields, borrowed; `encode(&c.reading(), c.salt.as_ref(), out)` gives back
    /// exactly the bytes `c` was decoded from.
    pub fn reading(&self) -> ReadingRef<'_> {
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

/// Reads canonical bytes front to back, naming the field and offset of whatever is wrong.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        let available = self.bytes.len() - self.pos;
        if n > available {
            return Err(DecodeError::Truncated {
                field,
                offset: self.pos,
                needed: n,
                available,
            });
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }

    fn str(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = u32::from_be_bytes(self.array(field)?) as usize;
        let offset = self.pos;
        let bytes = self.take(field, len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::NotUtf8 { field, offset })
    }

    fn present(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        let offset = self.pos;
        match self.take(field, 1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(DecodeError::BadPresence { field, offset, tag }),
        }
    }

    fn opt_str(&mut self, field: &'static str) -> Result<Option<String>, DecodeError> {
        Ok(if self.present(field)? {
            Some(self.str(field)?)
        } else {
            None
        })
    }
}

/// Decodes canonical bytes of either version. Only bytes [`encode`] can produce are accepted:
/// anything short, long or malformed is an error, so bytes that decode always re-encode to
/// themselves and hash to the same leaf.
pub fn decode(bytes: &[u8]) -> Result<CanonicalReading, DecodeError> {
    let version = *bytes.first().ok_or(DecodeError::Empty)?;
    let encoding = match version {
        1 => LeafEncoding::V1,
        2 => LeafEncoding::V2,
        other => return Err(DecodeError::UnknownVersion(other)),
    };
    let mut r = Reader { bytes, pos: 1 };
    let salt = match encoding {
        LeafEncoding::V1 => None,
        LeafEncoding::V2 => Some(r.array::<SALT_LEN>("salt")?),
    };
    let seq = u64::from_be_bytes(r.array("seq")?);
    let ts = i64::from_be_bytes(r.array("ts")?);
    let received = i64::from_be_bytes(r.array("received")?);
    let source = r.str("source")?;
    let subject = r.opt_str("subject")?;
    let metric = r.str("metric")?;
    let value = if r.present("value")? {
        Some(f64::from_bits(u64::from_be_bytes(r.array("value")?)))
    } else {
        None
    };
    let text = r.opt_str("text")?;
    let unit = r.str("unit")?;
    let flags = u16::from_be_bytes(r.array("flags")?);
    if r.pos != bytes.len() {
        return Err(DecodeError::Trailing {
            end: r.pos,
            extra: bytes.len() - r.pos,
        });
    }
    Ok(CanonicalReading {
        encoding,
        salt,
        seq,
        ts,
        received,
        source,
        subject,
        metric,
        value,
        text,
        unit,
        flags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::batch::{BatchBuilder, Row};
    use crate::model::reading::Metric;
    use crate::seal::merkle::{from_hex, to_hex};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    const READING: ReadingRef<'static> = ReadingRef {
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

    /// The key of the known-answer tests: bytes 0, 1, …, 31.
    fn counting_key() -> SaltKey {
        std::array::from_fn(|i| i as u8)
    }

    fn salt_from_hex(s: &str) -> Salt {
        from_hex(s).unwrap().try_into().unwrap()
    }

    /// Readings covering every optional field absent and present, empty and non-ASCII strings,
    /// extreme integers and awkward floats.
    fn assorted() -> Vec<ReadingRef<'static>> {
        vec![
            READING,
            ReadingRef {
                seq: u64::MAX,
                ts: i64::MIN,
                received: i64::MAX,
                source: "",
                subject: Some(""),
                metric: "consciousness",
                value: None,
                text: Some("V"),
                unit: "{ACVPU}",
                flags: u16::MAX,
            },
            ReadingRef {
                seq: 0,
                ts: -1,
                received: 0,
                source: "station-ü-7",
                subject: Some("Zimmer 3 – Bett 2"),
                metric: "body_temp",
                value: Some(-0.0),
                text: Some(""),
                unit: "Cel",
                flags: 0,
            },
            ReadingRef {
                value: Some(f64::NAN),
                ..READING
            },
            ReadingRef {
                value: Some(f64::MIN_POSITIVE / 2.0),
                subject: Some("w7-b1"),
                ..READING
            },
        ]
    }

    #[test]
    fn v1_encoding_is_the_documented_layout() {
        let mut out = Vec::new();
        encode_v1(&READING, &mut out);
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
        let mut via_encode = Vec::new();
        encode(&READING, None, &mut via_encode);
        assert_eq!(via_encode, expect);
        // A change to any field changes the leaf.
        let mut scratch = Vec::new();
        let base = reading_leaf(&READING, None, &mut scratch);
        assert_eq!(base, leaf_hash(&expect));
        for changed in [
            ReadingRef {
                value: Some(1.5),
                ..READING
            },
            ReadingRef {
                subject: Some(""),
                ..READING
            },
            ReadingRef {
                flags: 0,
                ..READING
            },
        ] {
            assert_ne!(
                base,
                reading_leaf(&changed, None, &mut scratch),
                "{changed:?}"
            );
        }
    }

    #[test]
    fn v2_encoding_is_the_documented_layout() {
        let salt: Salt = std::array::from_fn(|i| 0xa0 ^ i as u8);
        let mut out = Vec::new();
        encode_v2(&READING, &salt, &mut out);
        let mut expect = vec![2u8];
        expect.extend_from_slice(&salt);
        expect.extend_from_slice(&1u64.to_be_bytes());
        expect.extend_from_slice(&2i64.to_be_bytes());
        expect.extend_from_slice(&3i64.to_be_bytes());
        expect.extend_from_slice(&[0, 0, 0, 1, b's', 0, 0, 0, 0, 4]);
        expect.extend_from_slice(b"spo2");
        expect.push(1);
        expect.extend_from_slice(&1.0f64.to_bits().to_be_bytes());
        expect.extend_from_slice(&[0, 0, 0, 0, 1, b'%', 1, 2]);
        assert_eq!(out, expect);
        let mut via_encode = Vec::new();
        encode(&READING, Some(&salt), &mut via_encode);
        assert_eq!(via_encode, expect);
        assert_eq!(
            reading_leaf(&READING, Some(&salt), &mut Vec::new()),
            leaf_hash(&expect)
        );
    }

    /// Salt, canonical bytes and leaf of one reading as an independent implementation of the
    /// tables above makes them (Python: hmac, hashlib and struct.pack, ">Qqq", ">I", ">d", ">H").
    #[test]
    fn v2_leaf_matches_an_independent_implementation() {
        let r = ReadingRef {
            seq: 42,
            ts: 1_700_000_000_000_000,
            received: 1_700_000_000_000_250,
            source: "w7-b1-mon",
            subject: Some("w7-b1"),
            metric: "spo2",
            value: Some(97.5),
            text: None,
            unit: "%",
            flags: 0x0102,
        };
        let salt = reading_salt(&counting_key(), 42);
        assert_eq!(
            to_hex(&salt),
            "d2ea7dfd35e1276f9958e3f01f7ba1b9be728501b26f4424b2010487e5e896dc"
        );
        let mut bytes = Vec::new();
        encode_v2(&r, &salt, &mut bytes);
        assert_eq!(
            to_hex(&bytes),
            "02d2ea7dfd35e1276f9958e3f01f7ba1b9be728501b26f4424b2010487e5e896dc000000000000002a\
             00060a24181e400000060a24181e40fa0000000977372d62312d6d6f6e010000000577372d6231\
             0000000473706f320140586000000000000000000001250102"
        );
        assert_eq!(
            to_hex(&leaf_hash(&bytes)),
            "876e05bb56403948fc7f4b553fa5063ba9ad99f3f36727e757abcd719313426c"
        );
    }

    #[test]
    fn salts_are_deterministic_per_key_and_seq_and_differ_otherwise() {
        assert_eq!(SALT_LABEL, &b"iomt-edge leaf salt v2\x00"[..]);
        let key = counting_key();
        // Python: hmac.new(bytes(range(32)), b"iomt-edge leaf salt v2\x00" + seq.to_bytes(8,
        // "big"), hashlib.sha256).hexdigest()
        for (seq, hex) in [
            (
                0,
                "8cece8a36639c8906c20059d667dd4ed4b56e48e24b03339509868fbf94dc7df",
            ),
            (
                42,
                "d2ea7dfd35e1276f9958e3f01f7ba1b9be728501b26f4424b2010487e5e896dc",
            ),
            (
                u64::MAX,
                "ca3aa65aec3bc1dea5aa67c11b7ef3311d6992d2dfc54e275c4039f8ec1f6dcc",
            ),
        ] {
            assert_eq!(reading_salt(&key, seq), salt_from_hex(hex), "seq {seq}");
        }
        let salts = Salts::new(&key);
        let mut seen = std::collections::HashSet::new();
        for seq in 0..2_000 {
            let salt = salts.salt(seq);
            assert_eq!(salt, reading_salt(&key, seq), "same key and seq, same salt");
            assert_eq!(salt, salts.salt(seq));
            assert!(seen.insert(salt), "seq {seq} repeats an earlier salt");
        }
        let mut other_key = key;
        other_key[31] ^= 1;
        for seq in [0, 1, 42, u64::MAX] {
            assert_ne!(reading_salt(&key, seq), reading_salt(&other_key, seq));
        }
    }

    /// One batch's columns: the same five readings whatever the batch.
    fn five_readings() -> RecordBatch {
        let mut b = BatchBuilder::new(700, 5);
        for i in 0..5 {
            b.push(Row {
                ts: 1_000 + i,
                received: 2_000 + i,
                source: "dev-1",
                subject: Some("bed-1"),
                metric: Metric::HeartRate,
                value: Some(70.0),
                text: None,
                flags: 0,
            });
        }
        b.take().into_record_batch().unwrap()
    }

    #[test]
    fn identical_readings_in_two_batches_get_different_leaves() {
        let batch = five_readings();
        let (key_a, key_b) = ([1u8; 32], [2u8; 32]);
        let a = batch_leaves(LeafEncoding::V2, &batch, Some(&key_a)).unwrap();
        let b = batch_leaves(LeafEncoding::V2, &batch, Some(&key_b)).unwrap();
        assert_eq!(a.len(), 5);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_ne!(x, y, "row {i}");
        }
        // Unsalted, the same readings give the same leaves: what made guesses confirmable.
        assert_eq!(
            batch_leaves(LeafEncoding::V1, &batch, None).unwrap(),
            batch_leaves(LeafEncoding::V1, &five_readings(), None).unwrap()
        );
    }

    /// The holder of reading 0's proof knows its salt and, as a sibling, reading 1's leaf. Even
    /// guessing reading 1 exactly, nothing it can compute matches that leaf; only the salt derived
    /// from the batch key, which no proof carries, does.
    #[test]
    fn a_sibling_leaf_confirms_no_guess() {
        let batch = five_readings();
        let key = [9u8; 32];
        let leaves = batch_leaves(LeafEncoding::V2, &batch, Some(&key)).unwrap();
        let view = BatchView::new(&batch).unwrap();
        let (own, neighbour) = (view.row(0), view.row(1));
        let own_salt = reading_salt(&key, own.seq);
        let mut scratch = Vec::new();
        assert_eq!(reading_leaf(&own, Some(&own_salt), &mut scratch), leaves[0]);
        for guess_salt in [None, Some(own_salt), Some([0u8; 32])] {
            assert_ne!(
                reading_leaf(&neighbour, guess_salt.as_ref(), &mut scratch),
                leaves[1],
                "salt {guess_salt:?}"
            );
        }
        let real = reading_salt(&key, neighbour.seq);
        assert_eq!(
            reading_leaf(&neighbour, Some(&real), &mut scratch),
            leaves[1]
        );
    }

    #[test]
    fn any_field_or_the_salt_changes_the_v2_leaf() {
        let salt = reading_salt(&counting_key(), 1);
        let mut scratch = Vec::new();
        let base = reading_leaf(&READING, Some(&salt), &mut scratch);
        let r = READING;
        let changed = [
            ReadingRef { seq: 2, ..r },
            ReadingRef { ts: 3, ..r },
            ReadingRef { received: 4, ..r },
            ReadingRef { source: "t", ..r },
            ReadingRef {
                subject: Some("s"),
                ..r
            },
            ReadingRef {
                metric: "heart_rate",
                ..r
            },
            ReadingRef {
                value: Some(1.0000000000000002),
                ..r
            },
            ReadingRef { value: None, ..r },
            ReadingRef {
                text: Some(""),
                ..r
            },
            ReadingRef { unit: "%RH", ..r },
            ReadingRef { flags: 0x0103, ..r },
        ];
        for c in changed {
            assert_ne!(base, reading_leaf(&c, Some(&salt), &mut scratch), "{c:?}");
        }
        for bit in [0, 7, 100, 255] {
            let mut other = salt;
            other[bit / 8] ^= 1 << (bit % 8);
            assert_ne!(
                base,
                reading_leaf(&READING, Some(&other), &mut scratch),
                "salt bit {bit}"
            );
        }
        assert_ne!(base, reading_leaf(&READING, None, &mut scratch));
    }

    fn assert_same_reading(decoded: &CanonicalReading, r: &ReadingRef<'_>) {
        let d = decoded.reading();
        // Compared by bits: NaN is not equal to itself, and -0.0 equals 0.0.
        assert_eq!(d.value.map(f64::to_bits), r.value.map(f64::to_bits));
        assert_eq!(
            ReadingRef { value: None, ..d },
            ReadingRef { value: None, ..*r }
        );
    }

    #[test]
    fn decoding_round_trips_both_versions() {
        let salt = reading_salt(&counting_key(), 7);
        for r in assorted() {
            let mut v1 = Vec::new();
            encode_v1(&r, &mut v1);
            let d = decode(&v1).unwrap();
            assert_eq!((d.encoding, d.salt), (LeafEncoding::V1, None));
            assert_same_reading(&d, &r);
            let mut again = Vec::new();
            encode(&d.reading(), d.salt.as_ref(), &mut again);
            assert_eq!(again, v1);

            let mut v2 = Vec::new();
            encode_v2(&r, &salt, &mut v2);
            let d = decode(&v2).unwrap();
            assert_eq!((d.encoding, d.salt), (LeafEncoding::V2, Some(salt)));
            assert_same_reading(&d, &r);
            let mut again = Vec::new();
            encode(&d.reading(), d.salt.as_ref(), &mut again);
            assert_eq!(again, v2);
        }
    }

    #[test]
    fn decoding_rejects_truncated_extended_and_malformed_bytes() {
        let salt = reading_salt(&counting_key(), 7);
        for r in assorted() {
            for salt in [None, Some(&salt)] {
                let mut bytes = Vec::new();
                encode(&r, salt, &mut bytes);
                assert_eq!(decode(&[]), Err(DecodeError::Empty));
                for len in 1..bytes.len() {
                    match decode(&bytes[..len]) {
                        Err(DecodeError::Truncated {
                            offset,
                            needed,
                            available,
                            ..
                        }) => assert!(offset + available == len && available < needed),
                        other => panic!("{salt:?} {r:?} cut to {len}: {other:?}"),
                    }
                }
                let mut longer = bytes.clone();
                longer.push(0);
                assert_eq!(
                    decode(&longer),
                    Err(DecodeError::Trailing {
                        end: bytes.len(),
                        extra: 1
                    })
                );
            }
        }

        let mut v2 = Vec::new();
        encode_v2(&READING, &salt, &mut v2);
        let cut = decode(&v2[..20]).unwrap_err();
        assert_eq!(
            cut,
            DecodeError::Truncated {
                field: "salt",
                offset: 1,
                needed: 32,
                available: 19
            }
        );
        assert!(cut.to_string().contains("salt at byte 1"), "{cut}");
        for version in [0u8, 3, 0xff] {
            let mut bad = v2.clone();
            bad[0] = version;
            let e = decode(&bad).unwrap_err();
            assert_eq!(e, DecodeError::UnknownVersion(version));
            assert!(e.to_string().contains(&format!("version {version}")), "{e}");
        }
        // READING in version 1: version 1, seq 8, ts 8, received 8, source 4 + 1, then the
        // subject's presence byte at 30.
        let mut v1 = Vec::new();
        encode_v1(&READING, &mut v1);
        let mut bad = v1.clone();
        bad[30] = 2;
        let e = decode(&bad).unwrap_err();
        assert_eq!(
            e,
            DecodeError::BadPresence {
                field: "subject",
                offset: 30,
                tag: 2
            }
        );
        assert!(e.to_string().contains("subject at byte 30"), "{e}");
        let mut bad = v1.clone();
        bad[29] = 0xff;
        let e = decode(&bad).unwrap_err();
        assert_eq!(
            e,
            DecodeError::NotUtf8 {
                field: "source",
                offset: 29
            }
        );
        // A string length far past the end.
        let mut bad = v1;
        bad[25] = 0x7f;
        assert!(matches!(
            decode(&bad),
            Err(DecodeError::Truncated {
                field: "source",
                ..
            })
        ));
    }

    /// Whatever random bytes decode must be exactly what encoding the decoded reading gives, so a
    /// reading has one canonical form and a proof cannot carry another spelling of it.
    #[test]
    fn only_canonical_bytes_decode() {
        let mut rng = StdRng::seed_from_u64(8);
        let salt = reading_salt(&counting_key(), 7);
        let mut decoded = 0;
        for i in 0..20_000 {
            let mut bytes = Vec::new();
            encode(
                &assorted()[i % 5],
                (i % 2 == 0).then_some(&salt),
                &mut bytes,
            );
            // Flip a few bytes, or cut or extend, at random.
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..bytes.len());
                match rng.random_range(0..4) {
                    0 => bytes.truncate(at),
                    1 => bytes.insert(at, rng.random()),
                    _ => bytes[at] = rng.random(),
                }
                if bytes.is_empty() {
                    bytes.push(1);
                }
            }
            if let Ok(d) = decode(&bytes) {
                decoded += 1;
                let mut again = Vec::new();
                encode(&d.reading(), d.salt.as_ref(), &mut again);
                assert_eq!(again, bytes);
            }
        }
        // Some mutations (a changed value or salt byte) leave valid bytes: the check ran.
        assert!(decoded > 1_000, "{decoded}");
    }

    #[test]
    fn batch_leaves_takes_the_key_for_version_2_only() {
        let batch = five_readings();
        let key = [3u8; 32];
        assert!(matches!(
            batch_leaves(LeafEncoding::V2, &batch, None),
            Err(LeafError::MissingSaltKey)
        ));
        assert!(matches!(
            batch_leaves(LeafEncoding::V1, &batch, Some(&key)),
            Err(LeafError::UnexpectedSaltKey)
        ));
        // A proof generator, one reading at a time, gets the sealer's leaves.
        let leaves = batch_leaves(LeafEncoding::V2, &batch, Some(&key)).unwrap();
        let view = BatchView::new(&batch).unwrap();
        let mut scratch = Vec::new();
        for (i, leaf) in leaves.iter().enumerate() {
            let r = view.row(i);
            let salt = reading_salt(&key, r.seq);
            assert_eq!(
                &reading_leaf(&r, Some(&salt), &mut scratch),
                leaf,
                "row {i}"
            );
        }
        assert_eq!(LeafEncoding::from_byte(1).unwrap(), LeafEncoding::V1);
        assert_eq!(LeafEncoding::from_byte(2).unwrap(), LeafEncoding::V2);
        let e = LeafEncoding::from_byte(3).unwrap_err();
        assert!(e.to_string().contains("leaf encoding 3 is unknown"), "{e}");
    }
}
