//! `iomt-edge verify` against a data directory the real service wrote, untouched and then
//! tampered with in each way an attacker or a damaged disk could: each is caught and named.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use iomt_edge::ledger::local::ChainEntry;
use iomt_edge::seal::checkpoint::NoteSigner;

const T0: i64 = 1_700_000_000;

async fn publish_rounds(edge: &Edge, rounds: u32, from: u32) {
    for r in 0..rounds {
        let messages: Vec<_> = (0..30)
            .map(|i| {
                let n = from + r * 30 + i;
                vitals(n % 4, T0 + n as i64, 60.0 + (n % 30) as f64, 97.0)
            })
            .collect();
        publish_all(edge.mqtt_port(), &messages).await;
        // A checkpoint between rounds (checkpoint_every = 1s).
        let cut = edge.metric("iomt_checkpoints_cut_total");
        edge.wait_metric("iomt_checkpoints_cut_total", cut + 1.0);
    }
}

/// `verify --data dir`: success, and standard output.
fn verify(data: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
        .args(["verify", "--data"])
        .arg(data)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn copy(from: &Path, to: &Path) -> PathBuf {
    let ok = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    to.to_owned()
}

/// Both sled databases of a data directory, released by this process.
fn wait_sled_released_all(data: &Path) {
    wait_sled_released(&data.join("store"));
    wait_sled_released(&data.join("ledger"));
}

fn tree(db: &sled::Db, name: &str) -> sled::Tree {
    db.open_tree(name).unwrap()
}

fn assert_caught(data: &Path, names: &[&str]) {
    let (ok, text) = verify(data);
    assert!(!ok, "verify passed:\n{text}");
    for n in names {
        assert!(text.contains(n), "expected {n:?} in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_a_sound_directory_and_names_every_kind_of_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let text = pipeline("[ledger]\ncheckpoint_every = \"1s\"\n");
    let edge = Edge::start(&text, &data);
    publish_rounds(&edge, 3, 0).await;
    assert!(edge.stop().success());
    let early = copy(&data.join("store"), &dir.path().join("early-store"));

    let edge = Edge::start(&text, &data);
    publish_rounds(&edge, 2, 90).await;
    assert!(edge.stop().success());

    let (ok, report) = verify(&data);
    assert!(ok, "{report}");
    assert!(report.contains("OK: everything holds"), "{report}");
    let batches: u64 = {
        let db = sled::open(data.join("store")).unwrap();
        tree(&db, "headers").len() as u64
    };
    wait_sled_released(&data.join("store"));
    assert!(batches >= 5, "{batches} batches");
    assert!(
        report.contains(&format!("batches: {batches} (300 readings)")),
        "{report}"
    );

    // A flipped byte in the last batch's stored ciphertext (the end of the last segment file).
    let d = copy(&data, &dir.path().join("flipped"));
    let seg_dir = d.join("store/segments");
    let mut segs: Vec<_> = std::fs::read_dir(&seg_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    let last_seg = segs.last().unwrap();
    let mut bytes = std::fs::read(last_seg).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x01;
    std::fs::write(last_seg, bytes).unwrap();
    assert_caught(&d, &[&format!("FAIL batch {}:", batches - 1)]);

    // A header entry edited (its row count).
    let d = copy(&data, &dir.path().join("header"));
    {
        let db = sled::open(d.join("store")).unwrap();
        let headers = tree(&db, "headers");
        let mut h: serde_json::Value =
            serde_json::from_slice(&headers.get(1u64.to_be_bytes()).unwrap().unwrap()).unwrap();
        h["rows"] = (h["rows"].as_u64().unwrap() + 1).into();
        headers
            .insert(1u64.to_be_bytes(), serde_json::to_vec(&h).unwrap())
            .unwrap();
        db.flush().unwrap();
    }
    wait_sled_released_all(&d);
    assert_caught(&d, &["FAIL batch 1:"]);

    // A batch deleted: it is missing (the log still proves it existed).
    let d = copy(&data, &dir.path().join("deleted"));
    {
        let db = sled::open(d.join("store")).unwrap();
        tree(&db, "batches").remove(2u64.to_be_bytes()).unwrap();
        tree(&db, "headers").remove(2u64.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    wait_sled_released_all(&d);
    assert_caught(&d, &["FAIL batch 2: missing"]);

    // Two batches swapped, entries and all.
    let d = copy(&data, &dir.path().join("swapped"));
    {
        let db = sled::open(d.join("store")).unwrap();
        for name in ["batches", "headers"] {
            let t = tree(&db, name);
            let (a, b) = (
                t.get(1u64.to_be_bytes()).unwrap().unwrap(),
                t.get(2u64.to_be_bytes()).unwrap().unwrap(),
            );
            t.insert(1u64.to_be_bytes(), b).unwrap();
            t.insert(2u64.to_be_bytes(), a).unwrap();
        }
        db.flush().unwrap();
    }
    wait_sled_released_all(&d);
    assert_caught(&d, &["FAIL batch 1:", "FAIL batch 2:"]);

    // A local chain entry edited.
    let d = copy(&data, &dir.path().join("chain"));
    {
        let db = sled::open(d.join("ledger")).unwrap();
        let chain = tree(&db, "chain");
        let mut e = ChainEntry::decode(&chain.get(0u64.to_be_bytes()).unwrap().unwrap()).unwrap();
        e.anchored_at += 1;
        chain.insert(0u64.to_be_bytes(), e.encode()).unwrap();
        db.flush().unwrap();
    }
    wait_sled_released_all(&d);
    assert_caught(
        &d,
        &["FAIL chain entry 1 does not hold the hash of entry 0"],
    );

    // The last chain entry edited: no entry after it holds its hash, but its receipt does.
    let d = copy(&data, &dir.path().join("chain-last"));
    {
        let db = sled::open(d.join("ledger")).unwrap();
        let chain = tree(&db, "chain");
        let (k, v) = chain.last().unwrap().unwrap();
        let mut e = ChainEntry::decode(&v).unwrap();
        e.anchored_at += 1;
        chain.insert(k, e.encode()).unwrap();
        db.flush().unwrap();
    }
    wait_sled_released_all(&d);
    assert_caught(&d, &["its receipt names chain entry"]);

    // An interior node of the stored log damaged: proofs and tiles read it.
    let d = copy(&data, &dir.path().join("log-node"));
    {
        let db = sled::open(d.join("store")).unwrap();
        let mut key = vec![1u8];
        key.extend_from_slice(&0u64.to_be_bytes());
        tree(&db, "log").insert(key, &[7u8; 32][..]).unwrap();
        db.flush().unwrap();
    }
    wait_sled_released_all(&d);
    assert_caught(
        &d,
        &["the stored log's node 1/0 is not the hash of its leaves"],
    );

    // A checkpoint signed by another key of the same name.
    let d = copy(&data, &dir.path().join("forged"));
    {
        let db = sled::open(d.join("store")).unwrap();
        let cps = tree(&db, "checkpoints");
        let (k, v) = cps.first().unwrap().unwrap();
        let note = String::from_utf8(v.to_vec()).unwrap();
        let text = note.split_once("\n\n").unwrap().0.to_owned() + "\n";
        let origin = text.lines().next().unwrap();
        let forger = NoteSigner::from_seed(origin, &[7u8; 32]).unwrap();
        cps.insert(k, forger.sign(&text).unwrap().as_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    wait_sled_released_all(&d);
    assert_caught(&d, &["signature does not verify"]);

    // The store rolled back to the copy taken after the first run: the chain anchored more.
    let d = copy(&data, &dir.path().join("rolled-back"));
    std::fs::remove_dir_all(d.join("store")).unwrap();
    copy(&early, &d.join("store"));
    assert_caught(&d, &["the store does not hold (the store was rolled back"]);

    // Not a data directory: an error, nothing created.
    let (ok, text) = verify(&dir.path().join("nothing"));
    assert!(!ok && text.contains("no iomt-edge data here"), "{text}");
    assert!(!dir.path().join("nothing").exists());
}
