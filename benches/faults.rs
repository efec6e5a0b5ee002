//! The fault tests of tests/faults.rs at benchmark size: the real release binary under load from
//! publishers that record every PUBACK, killed with SIGKILL 20 times (and stopped with SIGTERM
//! 3 times) mid-stream. After each scenario: acknowledged messages missing from the store (must
//! be 0), duplicates, and whether any seq was used twice.
//!
//! ```sh
//! cargo bench --bench faults
//! IOMT_BENCH_CYCLES=5 cargo bench --bench faults
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::load::{stored_ids, Load, Target};
use common::{env_or, free_port, pipeline, stored_readings, Edge};

/// Prints the verdict of one scenario; false if anything acknowledged is missing or a seq was
/// reused.
fn verdict(name: &str, acked: &BTreeSet<u64>, data: &std::path::Path, secs: f64) -> bool {
    let readings = stored_readings(data);
    let stored = stored_ids(&readings);
    let missing = acked.iter().filter(|id| !stored.contains_key(id)).count();
    let duplicates: usize = stored.values().filter(|&&n| n > 1).count();
    let mut seqs = BTreeSet::new();
    let reused = readings.iter().filter(|r| !seqs.insert(r.seq)).count();
    println!(
        "{name}: {} acknowledged in {secs:.1} s ({:.0}/s), {} stored, missing {missing}, duplicates {duplicates}, seqs reused {reused}",
        acked.len(),
        acked.len() as f64 / secs,
        readings.len()
    );
    missing == 0 && reused == 0
}

async fn sigkill_cycles(cycles: usize) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let text = pipeline("").replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
        1,
    );
    let load = Load::start(Target::new(port), 4, 128, None);
    let t = Instant::now();
    let mut lost_window = Vec::new();
    for _ in 0..cycles {
        let edge = Edge::start(&text, &data);
        let before = load.acked_count();
        load.wait_acked(before + 5_000, Duration::from_secs(120))
            .await;
        // Killed while the publishers are mid-stream.
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 300)).await;
        let at_kill = load.sent();
        edge.crash();
        lost_window.push(at_kill);
    }
    let edge = Edge::start(&text, &data);
    let before = load.acked_count();
    load.wait_acked(before + 1_000, Duration::from_secs(120))
        .await;
    let acked = load.stop().await;
    let secs = t.elapsed().as_secs_f64();
    assert!(edge.stop().success());
    verdict(&format!("SIGKILL x{cycles}"), &acked, &data, secs)
}

async fn sigterm_runs(runs: usize) -> bool {
    let mut ok = true;
    for run in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let edge = Edge::start(&pipeline(""), &data);
        let load = Load::start(Target::new(edge.mqtt_port()), 4, 128, None);
        let t = Instant::now();
        load.wait_acked(50_000, Duration::from_secs(120)).await;
        let exit = tokio::task::spawn_blocking(move || edge.stop_timed())
            .await
            .unwrap();
        let acked = load.stop().await;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "SIGTERM run {run}: exit {:?}, stop took {:?}",
            exit.0.code(),
            exit.1
        );
        ok &= exit.0.success() && verdict(&format!("SIGTERM run {run}"), &acked, &data, secs);
    }
    ok
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("faults: run with `cargo bench --bench faults`");
        return;
    }
    let cycles = env_or("IOMT_BENCH_CYCLES", 20);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "machine: {} cores; the release binary, 4 publishers with 128 unacknowledged messages each",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let a = runtime.block_on(sigkill_cycles(cycles));
    let b = runtime.block_on(sigterm_runs(3));
    if !(a && b) {
        println!("FAIL");
        std::process::exit(1);
    }
    println!("PASS: nothing acknowledged was lost, no seq was used twice");
}
