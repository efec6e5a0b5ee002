//! Proofs of readings, end to end: the running service answers `GET /proof/<seq>`, the stopped
//! one `iomt-edge proof`, and `iomt-edge verify-proof` checks them with the proof file alone. Any
//! alteration of the reading, a path, the header, the checkpoint or its signature fails, naming
//! the step; a proof confirms nothing about the neighbours whose leaves it carries.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use iomt_edge::ledger::proof::{self, ProofFile};
use iomt_edge::seal::checkpoint::NoteSigner;
use iomt_edge::seal::leaf;
use iomt_edge::seal::merkle;

const T0: i64 = 1_700_000_000;

fn node_key(data: &Path) -> String {
    let key = std::fs::read_to_string(data.join("keys/node.key")).unwrap();
    NoteSigner::from_private_key(key.trim())
        .unwrap()
        .verifier_key()
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn verify_file(dir: &Path, p: &ProofFile, key: Option<&str>) -> (bool, String) {
    let file = dir.join(format!("proof-{}.json", rand::random::<u32>()));
    std::fs::write(&file, serde_json::to_vec(p).unwrap()).unwrap();
    let mut args = vec!["verify-proof", file.to_str().unwrap()];
    if let Some(k) = key {
        args.extend(["--key", k]);
    }
    let (ok, out, err) = run(&args);
    (ok, out + &err)
}

/// `p` with `change` applied must fail at `step`.
fn refused(dir: &Path, p: &ProofFile, key: &str, step: &str, change: impl FnOnce(&mut ProofFile)) {
    let mut bad = p.clone();
    change(&mut bad);
    let err = proof::check(&bad, Some(key)).unwrap_err();
    assert!(err.to_string().contains(step), "{step}: {err}");
    let (ok, text) = verify_file(dir, &bad, Some(key));
    assert!(!ok && text.contains(step), "{step}: {text}");
}

fn flip_hex(h: &mut String, at: usize) {
    let mut b = merkle::from_hex(h).unwrap();
    b[at] ^= 1;
    *h = merkle::to_hex(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proofs_verify_offline_and_every_alteration_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let text = pipeline("[ledger]\ncheckpoint_every = \"1s\"\n");
    let edge = Edge::start(&text, &data);
    let messages: Vec<_> = (0..200u32)
        .map(|i| {
            vitals(
                i % 4,
                T0 + i as i64,
                60.0 + (i % 30) as f64,
                90.0 + (i % 9) as f64,
            )
        })
        .collect();
    publish_all(edge.mqtt_port(), &messages).await;
    edge.wait_metric("iomt_readings_stored_total", 400.0);
    edge.wait_metric("iomt_anchors_total{backend=\"local\",result=\"done\"}", 1.0);
    let key = node_key(&data);

    // The running service proves a reading.
    let (code, body) = edge.get("/proof/123");
    assert_eq!(code, 200, "{body}");
    let live: ProofFile = serde_json::from_str(&body).unwrap();
    let checked = proof::check(&live, Some(&key)).unwrap();
    assert_eq!(checked.readings, 1);
    assert_eq!(live.readings[0].reading.seq, 123);
    assert!(matches!(
        live.receipt,
        Some(iomt_edge::ledger::Receipt::Local { .. })
    ));
    let (code, _) = edge.get("/proof/99999999");
    assert_eq!(code, 404);
    let (code, _) = edge.get("/proof/x");
    assert_eq!(code, 400);
    assert!(edge.stop().success());

    // The stopped node proves the same reading from the command line.
    let data_s = data.to_str().unwrap();
    let (ok, out, err) = run(&["proof", "123", "--data", data_s]);
    assert!(ok, "{err}");
    let p: ProofFile = serde_json::from_str(&out).unwrap();
    assert_eq!(p.readings[0].reading, live.readings[0].reading);
    let (ok, text) = verify_file(dir.path(), &p, Some(&key));
    assert!(ok, "{text}");
    assert!(text.contains("OK: 1 reading(s)"), "{text}");
    let (ok, text) = verify_file(dir.path(), &p, None);
    assert!(
        ok && text.contains("checked with the key the proof carries"),
        "{text}"
    );

    // What a proof holds of others: salted leaves. The leaf next to this reading's (its sibling,
    // the first hash on its path) is a neighbour's; knowing that reading field by field, one
    // cannot reproduce its leaf without its secret salt, with no salt or any other.
    let r = &p.readings[0];
    let (sibling_leaf, sibling_row) = {
        use iomt_edge::model::batch::BatchView;
        use iomt_edge::seal::Sealer;
        use iomt_edge::store::{open_node_keys, KeyMode, SledStore, Store};
        let store = SledStore::open_existing(&data.join("store")).unwrap();
        let keys = open_node_keys(&store, &data.join("keys"), "", KeyMode::ReadOnly).unwrap();
        let opened = Sealer::new(keys.master)
            .open(&store.batch(r.batch).unwrap().unwrap())
            .unwrap();
        let view = BatchView::new(&opened.batch).unwrap();
        let sibling = (r.index ^ 1) as usize;
        assert!(sibling < view.len(), "pick a reading with a sibling leaf");
        let row = view.row(sibling);
        let salt = leaf::reading_salt(opened.salt_key.as_ref().unwrap(), row.seq);
        let mut scratch = Vec::new();
        let real = merkle::to_hex(&leaf::reading_leaf(&row, Some(&salt), &mut scratch));
        let fields: Vec<u8> = {
            let mut v = Vec::new();
            leaf::encode(&row, None, &mut v);
            v
        };
        (real, fields)
    };
    wait_sled_released(&data.join("store"));
    // The test can fail: the neighbour's real, salted leaf is on the path.
    assert_eq!(r.path[0], sibling_leaf);
    let guess = leaf::decode(&sibling_row).unwrap();
    let mut scratch = Vec::new();
    for salt in [None, Some([0u8; 32]), Some([0xffu8; 32])] {
        let guessed = merkle::to_hex(&leaf::reading_leaf(
            &guess.reading(),
            salt.as_ref(),
            &mut scratch,
        ));
        assert!(
            !r.path.contains(&guessed),
            "a guessed neighbour's leaf is on the path"
        );
    }
    assert!(
        !out.contains(&format!("\"seq\": {},", guess.seq)),
        "only its own reading"
    );

    // Every alteration fails at its step.
    refused(dir.path(), &p, &key, "reading 123", |b| {
        b.readings[0].reading.value = Some(b.readings[0].reading.value.unwrap() + 1.0)
    });
    refused(dir.path(), &p, &key, "reading 123: inclusion", |b| {
        flip_hex(&mut b.readings[0].leaf, 5)
    });
    refused(dir.path(), &p, &key, "reading 123: inclusion", |b| {
        flip_hex(&mut b.readings[0].path[0], 0)
    });
    refused(dir.path(), &p, &key, "reading 123: inclusion", |b| {
        b.readings[0].index += 1
    });
    let batch = p.batches[0].id;
    refused(
        dir.path(),
        &p,
        &key,
        &format!("batch {batch}: inclusion"),
        |b| flip_hex(&mut b.batches[0].entry, 20),
    );
    if !p.batches[0].path.is_empty() {
        refused(
            dir.path(),
            &p,
            &key,
            &format!("batch {batch}: inclusion"),
            |b| flip_hex(&mut b.batches[0].path[0], 3),
        );
    }
    refused(dir.path(), &p, &key, "checkpoint signature", |b| {
        b.checkpoint = b.checkpoint.replacen('\n', "\n1", 1)
    });
    let forger = NoteSigner::from_seed(&format!("iomt-edge/{SITE}"), &[9u8; 32]).unwrap();
    refused(dir.path(), &p, &key, "verifier key", |b| {
        b.verifier_key = forger.verifier_key()
    });
    let (ok, text) = verify_file(dir.path(), &p, Some(&forger.verifier_key()));
    assert!(!ok && text.contains("verifier key"), "{text}");
    refused(dir.path(), &p, &key, "format", |b| {
        b.format = "other".into()
    });

    // A range: every reading of one subject in a time window, in one file.
    let (ok, out, err) = run(&[
        "proof",
        "--subject",
        "w7-b1",
        "--from",
        &(T0 + 10).to_string(),
        "--to",
        &(T0 + 49).to_string(),
        "--data",
        data_s,
    ]);
    assert!(ok, "{err}");
    let range: ProofFile = serde_json::from_str(&out).unwrap();
    // Beds 0..3 in turn: bed 1 at T0+11, +15, … +47 (10 messages), 2 readings each.
    assert_eq!(range.readings.len(), 20);
    assert!(range
        .readings
        .iter()
        .all(|r| r.reading.subject.as_deref() == Some("w7-b1")));
    assert_eq!(proof::check(&range, Some(&key)).unwrap().readings, 20);

    // Bad input: a seq nobody has, a file that is not a proof.
    let (ok, _, err) = run(&["proof", "99999999", "--data", data_s]);
    assert!(!ok && err.contains("no reading has seq 99999999"), "{err}");
    let junk = dir.path().join("junk.json");
    std::fs::write(&junk, "{}").unwrap();
    let (ok, _, err) = run(&["verify-proof", junk.to_str().unwrap()]);
    assert!(!ok && err.contains("not a proof file"), "{err}");
}
