//! The service anchoring on a real chain (anvil): checkpoints reach the anchor contract while
//! devices publish; anvil stopped for a while (SIGSTOP: it answers nothing) holds up nothing
//! but the anchors, which all land once it runs again; the events are read back by hand;
//! `verify --rpc` and `verify-proof --rpc` find them.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::anvil::*;
use common::*;
use iomt_edge::ledger::ethereum::{self, load_or_create_key};
use iomt_edge::seal::checkpoint::{Checkpoint, NoteSigner, NoteVerifier};
use iomt_edge::store::{SledStore, Store};
use serde_json::json;

const T0: i64 = 1_700_000_000;

fn sha256_hex(bytes: &[u8]) -> String {
    merkle_hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn merkle_hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn signal_anvil(anvil: &Anvil, sig: &str) {
    assert!(Command::new("kill")
        .args([format!("-{sig}"), anvil.child.id().to_string()])
        .status()
        .unwrap()
        .success());
}

/// Publishes `n` vitals messages (2 readings each) and returns once all are acknowledged.
async fn publish(edge: &Edge, from: u32, n: u32) {
    let messages: Vec<_> = (from..from + n)
        .map(|i| vitals(i % 4, T0 + i as i64, 60.0 + (i % 30) as f64, 97.0))
        .collect();
    publish_all(edge.mqtt_port(), &messages).await;
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_checkpoint_is_anchored_on_the_chain_even_across_a_stalled_node() {
    // A block a second, so confirmations come without transactions to mine.
    let anvil = Anvil::start_with(&["--block-time", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let keys = data.join("keys");
    let node = load_or_create_key(&keys).unwrap().address();
    anvil.fund(&node.to_string());
    let contract = ethereum::deploy(&anvil.url(), &keys).await.unwrap();
    let text = pipeline(&format!(
        "[ledger]\nbackend = \"ethereum\"\ncheckpoint_every = \"1s\"\n\
         [ledger.ethereum]\nrpc = \"{}\"\ncontract = \"{contract}\"\nconfirmations = 2\n\
         poll_every = \"200ms\"\ntimeout = \"1s\"\nchain_id = {ANVIL_CHAIN_ID}\n",
        anvil.url()
    ));
    let edge = Edge::start(&text, &data);
    let done = "iomt_anchors_total{backend=\"ethereum\",result=\"done\"}";
    let failed = "iomt_anchors_total{backend=\"ethereum\",result=\"failed\"}";
    publish(&edge, 0, 100).await;
    edge.wait_metric(done, 1.0);

    // The chain stops answering. Devices go on publishing: every message is acknowledged
    // (= stored), health stays ok, checkpoints are cut and wait in the outbox.
    signal_anvil(&anvil, "STOP");
    let cut_before = edge.metric("iomt_checkpoints_cut_total");
    for round in 0..4 {
        publish(&edge, 100 + round * 50, 50).await;
        assert_eq!(edge.health().0, 200, "ingest never waits on the ledger");
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert_eq!(edge.metric("iomt_readings_stored_total"), 600.0);
    edge.wait_metric(failed, 1.0);
    assert!(edge.metric("iomt_checkpoints_cut_total") >= cut_before + 2.0);
    assert!(edge.metric("iomt_anchor_outbox_depth") >= 1.0);

    // The chain runs again: the outbox empties, every checkpoint cut so far anchored.
    signal_anvil(&anvil, "CONT");
    wait_until("the outbox to empty", Duration::from_secs(60), || {
        edge.metric("iomt_anchor_outbox_depth") == 0.0
            && edge.metric(done) == edge.metric("iomt_checkpoints_cut_total")
    });
    assert!(edge.stop().success());

    // Read back, by hand, the contract's events: one per stored checkpoint (the last, cut at
    // the stop, at least submitted), each with the checkpoint's size and origin hash.
    let store = SledStore::open_existing(&data.join("store")).unwrap();
    let mut checkpoints = Vec::new();
    store
        .checkpoints(&mut |size, note| {
            checkpoints.push((size, note));
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    drop(store);
    wait_sled_released(&data.join("store"));
    let key = std::fs::read_to_string(keys.join("node.key")).unwrap();
    let verifier = NoteVerifier::parse(
        &NoteSigner::from_private_key(key.trim())
            .unwrap()
            .verifier_key(),
    )
    .unwrap();
    let topic0 = anvil.keccak("Anchored(bytes32,uint64,bytes32,address)");
    anvil.mine(3);
    let logs = anvil.rpc(
        "eth_getLogs",
        json!([{"address": contract.to_string(), "fromBlock": "0x0", "toBlock": "latest",
                "topics": [topic0]}]),
    );
    let logs = logs.as_array().unwrap();
    for (i, (size, note)) in checkpoints.iter().enumerate() {
        let c = Checkpoint::parse(verifier.verify(note).unwrap()).unwrap();
        let root = format!("0x{}", merkle_hex(&c.root));
        let found = logs.iter().find(|l| l["topics"][1] == root.as_str());
        let last = i + 1 == checkpoints.len();
        let Some(log) = found else {
            assert!(last, "checkpoint of size {size} is not on the chain");
            continue;
        };
        let data = log["data"].as_str().unwrap().trim_start_matches("0x");
        assert_eq!(u64::from_str_radix(&data[48..64], 16).unwrap(), *size);
        assert_eq!(
            log["topics"][2].as_str().unwrap(),
            format!("0x{}", sha256_hex(c.origin.as_bytes()))
        );
    }
    assert!(checkpoints.len() >= 3, "{} checkpoints", checkpoints.len());

    // verify finds every anchor on the chain, and a proof's anchor is found from its file.
    let bin = env!("CARGO_BIN_EXE_iomt-edge");
    let out = Command::new(bin)
        .args([
            "verify",
            "--data",
            data.to_str().unwrap(),
            "--rpc",
            &anvil.url(),
        ])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("anchors found on the chain"), "{report}");
    let out = Command::new(bin)
        .args(["proof", "10", "--data", data.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = dir.path().join("proof.json");
    std::fs::write(&file, &out.stdout).unwrap();
    let out = Command::new(bin)
        .args([
            "verify-proof",
            file.to_str().unwrap(),
            "--rpc",
            &anvil.url(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("anchor found on the chain: transaction 0x"),
        "{text}"
    );
}
