//! Proof size and verification time as the data grows: `cargo bench --bench proof`.
//!
//! For 10^3, 10^6 and 10^9 readings in batches of 16,384 (the default `batch.max_rows`), builds
//! the proof of one reading the way `iomt-edge proof` does — its canonical bytes and path in a
//! full batch tree, the batch header's entry and path in a log of as many batches, a signed
//! checkpoint — and measures its JSON size and how long `verify-proof`'s check takes. The trees
//! are real RFC 6962 trees; only the other leaves are random stand-ins (a 10^9-reading store is
//! not built).

use std::time::{Duration, Instant};

use iomt_edge::ledger::proof::{self, BatchProof, ProofFile, ProvenReading, ReadingProof, FORMAT};
use iomt_edge::model::batch::ReadingRef;
use iomt_edge::seal::checkpoint::{Checkpoint, NoteSigner};
use iomt_edge::seal::merkle::{self, to_hex, Hash};
use iomt_edge::seal::{entry, leaf, BatchHeader};

const ROWS: u64 = 16_384;

fn random_hashes(n: u64, seed: u64) -> Vec<Hash> {
    (0..n)
        .map(|i| merkle::leaf_hash(&(seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_be_bytes()))
        .collect()
}

fn build(readings: u64, signer: &NoteSigner) -> ProofFile {
    let rows = readings.min(ROWS);
    let batches = readings.div_ceil(ROWS);
    let id = batches - 1;
    let index = rows / 2;
    let seq = id * ROWS + index;
    let r = ReadingRef {
        seq,
        ts: 1_700_000_000_000_000,
        received: 1_700_000_000_000_500,
        source: "w7-b3-mon",
        subject: Some("w7-b3"),
        metric: "spo2",
        value: Some(91.0),
        text: None,
        unit: "%",
        flags: 0,
    };
    let salt = leaf::reading_salt(&[7u8; 32], seq);
    let mut bytes = Vec::new();
    leaf::encode(&r, Some(&salt), &mut bytes);
    let mut leaves = random_hashes(rows, 1);
    leaves[index as usize] = merkle::leaf_hash(&bytes);
    let header = BatchHeader {
        id,
        rows: rows as u32,
        seq_first: id * ROWS,
        seq_last: id * ROWS + rows - 1,
        ts_min: r.ts,
        ts_max: r.ts,
        received_min: r.received,
        received_max: r.received,
        root: to_hex(&merkle::root(&leaves)),
        sealed_at: r.received,
        leaf_encoding: 2,
    };
    let entry_bytes = entry::encode(&header).unwrap();
    let mut log = random_hashes(batches, 2);
    log[id as usize] = merkle::leaf_hash(&entry_bytes);
    let checkpoint = Checkpoint {
        origin: signer.name().to_owned(),
        size: batches,
        root: merkle::root(&log),
    };
    let hex = |p: Vec<Hash>| p.iter().map(|h| to_hex(h)).collect::<Vec<_>>();
    ProofFile {
        format: FORMAT.to_owned(),
        readings: vec![ReadingProof {
            reading: ProvenReading::from_ref(&r),
            leaf: to_hex(&bytes),
            batch: id,
            index,
            path: hex(merkle::inclusion_proof(&leaves, index as usize).unwrap()),
        }],
        batches: vec![BatchProof {
            id,
            entry: to_hex(&entry_bytes),
            path: hex(merkle::inclusion_proof(&log, id as usize).unwrap()),
        }],
        checkpoint: signer.sign(&checkpoint.to_text()).unwrap(),
        verifier_key: signer.verifier_key(),
        receipt: None,
    }
}

fn main() {
    let signer = NoteSigner::from_seed("iomt-edge/ward", &[3u8; 32]).unwrap();
    println!(
        "machine: {} cores; one reading's proof, batches of {ROWS} readings",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:>14}  {:>8}  {:>12}  {:>12}  {:>14}",
        "readings", "batches", "path hashes", "JSON bytes", "verify (median)"
    );
    for readings in [1_000u64, 1_000_000, 1_000_000_000] {
        let p = build(readings, &signer);
        let json = serde_json::to_vec(&p).unwrap();
        let mut t: Vec<Duration> = (0..501)
            .map(|_| {
                let parsed: ProofFile = serde_json::from_slice(&json).unwrap();
                let s = Instant::now();
                proof::check(&parsed, Some(&p.verifier_key)).unwrap();
                s.elapsed()
            })
            .collect();
        t.sort();
        println!(
            "{readings:>14}  {:>8}  {:>12}  {:>12}  {:>14.1?}",
            readings.div_ceil(ROWS),
            p.readings[0].path.len() + p.batches[0].path.len(),
            json.len(),
            t[t.len() / 2]
        );
    }
}
