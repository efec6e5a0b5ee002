//! The cost of the log of batches as it grows: `cargo bench --bench log`.
//!
//! Builds logs of 10^3, 10^5 and 10^6 batches (small stand-in batches through the real store, so
//! the log is the real one: sled, its `log` tree, the segment files), then times, at each size,
//! appending one more batch (the store's whole durable write: segment sync, sled transaction,
//! fdatasync), cutting a checkpoint (the root from stored hashes, an Ed25519 signature), and
//! an inclusion and a consistency proof, and counts the stored hashes each reads. The point is
//! the shape: flat in n (only the hashes read grow, as log n).

use std::time::{Duration, Instant};

use iomt_edge::ledger::{self, log::BatchLog};
use iomt_edge::seal::checkpoint::NoteSigner;
use iomt_edge::seal::crypt::Envelope;
use iomt_edge::seal::merkle::to_hex;
use iomt_edge::seal::{BatchHeader, SealedBatch};
use iomt_edge::store::{SledStore, Store};

fn batch(id: u64) -> SealedBatch {
    let mut root = [0u8; 32];
    root[..8].copy_from_slice(&id.to_be_bytes());
    SealedBatch {
        header: BatchHeader {
            id,
            rows: 1000,
            seq_first: id * 1000,
            seq_last: id * 1000 + 999,
            ts_min: id as i64,
            ts_max: id as i64 + 1,
            received_min: id as i64,
            received_max: id as i64 + 1,
            root: to_hex(&root),
            sealed_at: id as i64,
            leaf_encoding: 1,
        },
        envelope: Envelope {
            wrapped_key: vec![1; 48],
            key_nonce: [2; 12],
            nonce: [3; 12],
            ciphertext: vec![4; 64],
        },
    }
}

/// Median of `reps` timings of `f`.
fn median(reps: usize, mut f: impl FnMut()) -> Duration {
    let mut t: Vec<Duration> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort();
    t[reps / 2]
}

fn main() {
    println!(
        "machine: {} cores; median of repeated runs at each size",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let signer = NoteSigner::from_seed("iomt-edge/bench", &[1u8; 32]).unwrap();
    let mut size = 0u64;
    println!(
        "{:>9}  {:>12}  {:>12}  {:>14}  {:>16}  hashes read: root / inclusion / consistency",
        "batches", "append", "checkpoint", "inclusion", "consistency"
    );
    for target in [1_000u64, 100_000, 1_000_000] {
        let built = Instant::now();
        while size < target {
            let n = (target - size).min(20_000);
            let group: Vec<_> = (size..size + n).map(batch).collect();
            store.put_batches(&group).unwrap();
            size += n;
        }
        let build = built.elapsed();
        let append = median(21, || {
            store.put_batch(&batch(size)).unwrap();
            size += 1;
        });
        let checkpoint = median(101, || {
            ledger::checkpoint(&store, &signer).unwrap();
        });
        let mut i = 0u64;
        let inclusion = median(1001, || {
            i = (i * 7919 + 13) % size;
            BatchLog::new(&store).inclusion_proof(i, size).unwrap();
        });
        let consistency = median(1001, || {
            i = (i * 7919 + 13) % size;
            BatchLog::new(&store)
                .consistency_proof(i.max(1), size)
                .unwrap();
        });
        let reads = |f: &dyn Fn(&BatchLog)| {
            let log = BatchLog::new(&store);
            f(&log);
            log.hashes_read()
        };
        println!(
            "{size:>9}  {append:>12.2?}  {checkpoint:>12.2?}  {inclusion:>14.2?}  {consistency:>16.2?}  {} / {} / {}   (built in {build:.1?})",
            reads(&|l| {
                l.root(size).unwrap();
            }),
            reads(&|l| {
                l.inclusion_proof(size / 3, size).unwrap();
            }),
            reads(&|l| {
                l.consistency_proof(size / 3, size).unwrap();
            }),
        );
    }
}
