//! Black-box tests of the log of batches and its anchoring: the real binary cuts signed
//! checkpoints on its schedule and at a clean stop, serves them and the log's tiles over HTTP
//! the way c2sp.org/tlog-tiles says, and anchors every checkpoint in the local hash chain; the
//! test checks all of it as an outside client would, with the node's public key only.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::ControlFlow;

use common::*;
use iomt_edge::ledger::db::LedgerDb;
use iomt_edge::ledger::local::LocalChain;
use iomt_edge::ledger::log::BatchLog;
use iomt_edge::seal::checkpoint::{Checkpoint, NoteSigner, NoteVerifier};
use iomt_edge::seal::entry;
use iomt_edge::seal::merkle;
use iomt_edge::store::{SledStore, Store};

const T0: i64 = 1_700_000_000;

/// The tree sizes of the checkpoints the local chain of `data` anchors, in chain order.
fn chained_sizes(data: &std::path::Path) -> Vec<u64> {
    let db = LedgerDb::open_existing(&data.join("ledger"))
        .unwrap()
        .unwrap();
    let mut sizes = Vec::new();
    LocalChain::walk(&db, &mut |e, _| {
        sizes.push(e.size);
        Ok(())
    })
    .unwrap();
    sizes
}

/// GET `path`: the status and the body's bytes.
fn get_bytes(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let code = std::str::from_utf8(&all[9..12]).unwrap().parse().unwrap();
    let at = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    (code, all[at..].to_vec())
}

fn verifier(data: &std::path::Path) -> NoteVerifier {
    let key = std::fs::read_to_string(data.join("keys/node.key")).unwrap();
    let signer = NoteSigner::from_private_key(key.trim()).unwrap();
    NoteVerifier::parse(&signer.verifier_key()).unwrap()
}

/// Rounds of vitals messages, each round published and acknowledged before the next, so that
/// the rounds land in several batches.
async fn publish_rounds(edge: &Edge, rounds: u32, per_round: u32, from: u32) {
    for r in 0..rounds {
        let messages: Vec<_> = (0..per_round)
            .map(|i| {
                let n = from + r * per_round + i;
                vitals(n % 4, T0 + n as i64, 60.0 + (n % 30) as f64, 97.0)
            })
            .collect();
        publish_all(edge.mqtt_port(), &messages).await;
    }
}

/// The log at `size` as a tlog client rebuilds it from the served tiles and entry bundles:
/// the leaf hashes (checked against the entries they hash) and the headers.
fn leaves_from_tiles(http: SocketAddr, size: u64) -> (Vec<merkle::Hash>, Vec<u8>) {
    assert!(size > 0 && size < 256, "one partial tile is enough here");
    let (code, tile) = get_bytes(http, &format!("/log/tile/0/000.p/{size}"));
    assert_eq!(code, 200);
    assert_eq!(tile.len() as u64, size * 32);
    let leaves: Vec<merkle::Hash> = tile.chunks(32).map(|c| c.try_into().unwrap()).collect();
    let (code, bundle) = get_bytes(http, &format!("/log/tile/entries/000.p/{size}"));
    assert_eq!(code, 200);
    (leaves, bundle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_are_cut_served_as_tlog_tiles_and_anchored_in_the_local_chain() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let text = pipeline("[ledger]\ncheckpoint_every = \"1s\"\n");
    let edge = Edge::start(&text, &data);
    let http = edge.endpoints.http;
    assert_eq!(
        get_bytes(http, "/log/checkpoint").0,
        404,
        "nothing to sign yet"
    );

    publish_rounds(&edge, 5, 40, 0).await;
    edge.wait_metric("iomt_readings_stored_total", 400.0);
    edge.wait_metric("iomt_checkpoints_cut_total", 1.0);
    edge.wait_metric("iomt_anchors_total{backend=\"local\",result=\"done\"}", 1.0);

    // The latest checkpoint, signed by the node key, and the log it commits to, rebuilt from
    // the tiles alone.
    let (code, note) = get_bytes(http, "/log/checkpoint");
    assert_eq!(code, 200);
    let note = String::from_utf8(note).unwrap();
    let v = verifier(&data);
    let c = Checkpoint::parse(v.verify(&note).unwrap()).unwrap();
    assert_eq!(c.origin, format!("iomt-edge/{SITE}"));
    assert!(c.size >= 1);
    let (leaves, bundle) = leaves_from_tiles(http, c.size);
    assert_eq!(merkle::root(&leaves), c.root);
    let entry_len = 2 + entry::ENTRY_LEN;
    assert_eq!(bundle.len(), c.size as usize * entry_len);
    let mut next_seq = 0;
    for (i, chunk) in bundle.chunks(entry_len).enumerate() {
        assert_eq!(&chunk[..2], &(entry::ENTRY_LEN as u16).to_be_bytes());
        assert_eq!(merkle::leaf_hash(&chunk[2..]), leaves[i]);
        let h = entry::decode(&chunk[2..]).unwrap();
        assert_eq!(h.id, i as u64);
        assert!(h.seq_first >= next_seq && h.seq_last >= h.seq_first);
        next_seq = h.seq_last + 1;
    }
    // Not tiles: refused, not misread.
    for bad in [
        "/log/tile/0/0",
        "/log/tile/0/000.p/0",
        "/log/tile/0/001",
        "/log/tile/9/000",
    ] {
        assert_eq!(get_bytes(http, bad).0, 404, "{bad}");
    }

    // More readings, then a clean stop: the last checkpoint covers every batch.
    publish_rounds(&edge, 3, 40, 200).await;
    edge.wait_metric("iomt_readings_stored_total", 640.0);
    assert!(edge.stop().success());

    let store = SledStore::open_existing(&data.join("store")).unwrap();
    let batches = store.headers().unwrap().len() as u64;
    let (last, last_note) = store.latest_checkpoint().unwrap().unwrap();
    assert_eq!(last, batches, "the stop cut a checkpoint of every batch");
    let last_c = Checkpoint::parse(v.verify(&last_note).unwrap()).unwrap();
    let log = BatchLog::new(&store);
    assert_eq!(log.root(last).unwrap(), last_c.root);
    // Every checkpoint is kept, each consistent with the last; each is in the local chain.
    let mut kept = Vec::new();
    store
        .checkpoints(&mut |size, note| {
            kept.push((size, note));
            ControlFlow::Continue(())
        })
        .unwrap();
    assert!(kept.len() >= 2, "{} checkpoints", kept.len());
    for (size, note) in &kept {
        let ci = Checkpoint::parse(v.verify(note).unwrap()).unwrap();
        let proof = log.consistency_proof(*size, last).unwrap();
        merkle::verify_consistency(*size, last, &ci.root, &last_c.root, &proof).unwrap();
    }
    drop(store);
    let db = LedgerDb::open_existing(&data.join("ledger"))
        .unwrap()
        .unwrap();
    let mut chained = Vec::new();
    let n = LocalChain::walk(&db, &mut |e, _| {
        v.verify(&e.note).map_err(|e| e.to_string())?;
        chained.push((e.size, e.note.clone()));
        Ok(())
    })
    .unwrap();
    assert_eq!(n as usize, kept.len());
    assert_eq!(chained, kept, "each checkpoint anchored once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_continues_the_log_and_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let text = pipeline("[ledger]\ncheckpoint_every = \"1h\"\n");
    let edge = Edge::start(&text, &data);
    publish_rounds(&edge, 2, 30, 0).await;
    edge.wait_metric("iomt_readings_stored_total", 120.0);
    assert!(edge.stop().success());
    let first = {
        let store = SledStore::open_existing(&data.join("store")).unwrap();
        store.latest_checkpoint().unwrap().unwrap()
    };
    wait_sled_released(&data.join("store"));

    let edge = Edge::start(&text, &data);
    // An hour's period: nothing is cut while it runs; the stop cuts one.
    publish_rounds(&edge, 2, 30, 60).await;
    edge.wait_metric("iomt_readings_stored_total", 120.0);
    assert_eq!(edge.metric("iomt_checkpoints_cut_total"), 0.0);
    assert!(edge.stop().success());

    let store = SledStore::open_existing(&data.join("store")).unwrap();
    let (size, note) = store.latest_checkpoint().unwrap().unwrap();
    assert!(size > first.0);
    assert_eq!(size, store.headers().unwrap().len() as u64);
    let v = verifier(&data);
    let (c1, c2) = (
        Checkpoint::parse(v.verify(&first.1).unwrap()).unwrap(),
        Checkpoint::parse(v.verify(&note).unwrap()).unwrap(),
    );
    let proof = BatchLog::new(&store)
        .consistency_proof(c1.size, c2.size)
        .unwrap();
    merkle::verify_consistency(c1.size, c2.size, &c1.root, &c2.root, &proof).unwrap();
    drop(store);
    let sizes = chained_sizes(&data);
    assert_eq!(sizes, vec![c1.size, c2.size]);
}

/// A ledger that fails never holds up ingest: readings are stored and acknowledged, health
/// stays ok, every checkpoint waits in the outbox (counted), and the next start anchors them
/// all, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_ledger_never_stalls_ingest_and_the_outbox_anchors_everything_later() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let text = pipeline("[ledger]\ncheckpoint_every = \"1s\"\n");
    let edge = Edge::start_with_env(
        &text,
        &data,
        &[("FAILPOINTS", "ledger-local-append=return")],
    );
    for round in 0..3u32 {
        publish_rounds(&edge, 1, 50, round * 50).await;
        edge.wait_metric("iomt_checkpoints_cut_total", f64::from(round + 1));
    }
    edge.wait_metric(
        "iomt_anchors_total{backend=\"local\",result=\"failed\"}",
        1.0,
    );
    assert_eq!(edge.metric("iomt_readings_stored_total"), 300.0);
    assert_eq!(edge.health().0, 200, "ingest is not held up by the ledger");
    assert_eq!(
        edge.metric("iomt_anchors_total{backend=\"local\",result=\"done\"}"),
        0.0
    );
    edge.wait_metric("iomt_anchor_outbox_depth", 3.0);
    assert!(
        edge.stop().success(),
        "a pending anchor is not a failed stop"
    );

    let cut = {
        let store = SledStore::open_existing(&data.join("store")).unwrap();
        let mut sizes = Vec::new();
        store
            .checkpoints(&mut |size, _| {
                sizes.push(size);
                ControlFlow::Continue(())
            })
            .unwrap();
        sizes
    };
    wait_sled_released(&data.join("store"));
    assert!(cut.len() >= 3, "{cut:?}");

    // The ledger is back: the outbox empties, every checkpoint anchored once, in order.
    let edge = Edge::start(&text, &data);
    edge.wait_metric(
        "iomt_anchors_total{backend=\"local\",result=\"done\"}",
        cut.len() as f64,
    );
    assert!(edge.stop().success());
    let sizes = chained_sizes(&data);
    assert_eq!(sizes, cut);
}
