//! Sealing a batch against the raw crypto it is made of, measured in one run so the ratio holds
//! on a noisy machine: `cargo bench --bench seal`.
//!
//! - `seal/batch`: a 16,384-reading batch → Arrow, a salt per reading, leaf hashes (encoding 2),
//!   Merkle root, IPC, AES-256-GCM.
//! - `raw/hmac_salts`: HMAC-SHA-256 of the same number of salt messages, keyed once as sealing
//!   does.
//! - `raw/sha256_leaves`: SHA-256 of the same number of leaf-sized inputs, and their tree.
//! - `raw/aes_gcm`: AES-256-GCM of the same number of bytes as the batch's plaintext (salt-key
//!   label and key, then the IPC stream).
//!
//! The raw crypto sealing is made of is the sum of the three `raw` figures.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use iomt_edge::model::batch::{BatchBuilder, Columns, Row};
use iomt_edge::model::reading::Metric;
use iomt_edge::seal::crypt::MasterKey;
use iomt_edge::seal::{leaf, merkle, to_ipc, Sealer, PLAINTEXT_V2_LABEL};
use ring::hmac;

const ROWS: usize = 16_384;

fn columns() -> Columns {
    let mut b = BatchBuilder::new(0, ROWS);
    let sources: Vec<String> = (0..64).map(|i| format!("ward4-bed{i}-monitor")).collect();
    let subjects: Vec<String> = (0..64).map(|i| format!("ward4-bed{i}")).collect();
    for i in 0..ROWS {
        b.push(Row {
            ts: 1_700_000_000_000_000 + i as i64 * 1000,
            received: 1_700_000_000_000_100 + i as i64 * 1000,
            source: &sources[i % 64],
            subject: Some(&subjects[i % 64]),
            metric: Metric::HeartRate,
            value: Some(60.0 + (i % 50) as f64),
            text: None,
            flags: 0,
        });
    }
    b.take()
}

fn bench(c: &mut Criterion) {
    let sealer = Sealer::new(MasterKey::from_bytes(&[1u8; 32]).unwrap());
    let batch = columns().into_record_batch().unwrap();
    let plaintext_len =
        PLAINTEXT_V2_LABEL.len() + leaf::SALT_KEY_LEN + to_ipc(&batch).unwrap().len();
    let leaf_len = {
        let view = iomt_edge::model::batch::BatchView::new(&batch).unwrap();
        let mut v = Vec::new();
        leaf::encode_v2(&view.row(0), &[0u8; leaf::SALT_LEN], &mut v);
        v.len()
    };

    let mut g = c.benchmark_group("seal");
    g.throughput(Throughput::Elements(ROWS as u64));
    g.bench_function("batch", |b| {
        b.iter_batched(
            columns,
            |cols| sealer.seal(0, cols).unwrap(),
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("raw");
    g.throughput(Throughput::Elements(ROWS as u64));
    g.bench_function("hmac_salts", |b| {
        b.iter(|| {
            let key = hmac::Key::new(hmac::HMAC_SHA256, &[3u8; leaf::SALT_KEY_LEN]);
            (0..ROWS as u64)
                .map(|seq| {
                    let mut ctx = hmac::Context::with_key(&key);
                    ctx.update(leaf::SALT_LABEL);
                    ctx.update(&seq.to_be_bytes());
                    ctx.sign()
                })
                .collect::<Vec<_>>()
        })
    });
    let input = vec![7u8; leaf_len];
    g.bench_function("sha256_leaves", |b| {
        b.iter(|| {
            let leaves: Vec<_> = (0..ROWS).map(|_| merkle::leaf_hash(&input)).collect();
            merkle::root(&leaves)
        })
    });
    let key = MasterKey::from_bytes(&[2u8; 32]).unwrap();
    let plaintext = vec![5u8; plaintext_len];
    g.bench_function("aes_gcm", |b| {
        b.iter(|| key.seal(plaintext.clone(), b"aad").unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
