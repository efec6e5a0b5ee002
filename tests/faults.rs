//! Fault tests: the real binary under load, broken on purpose, and then the count that matters:
//! every message a publisher holds a PUBACK for must be in the store. Publishers (tests/common/
//! load.rs) record exactly which message ids were acknowledged.
//!
//! Sizes fit CI (a few seconds each); `cargo bench --bench faults` runs the same scenarios
//! longer and repeats the kill cycles 20 times.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::load::{assert_all_stored, stored_ids, Load, Target};
use common::tmpfs::Tmpfs;
use common::*;

/// The test pipeline with its MQTT listener on `port`.
fn pipeline_on(port: u16, extra: &str) -> String {
    pipeline(extra).replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
        1,
    )
}

/// `text` with `top` (top-level keys, then tables) before its first table.
fn with_top(text: &str, top: &str) -> String {
    text.replacen("[broker]\n", &format!("{top}[broker]\n"), 1)
}

/// Seqs are unique and increase in storage order, across every run of the data directory.
fn assert_seqs_never_reused(readings: &[iomt_edge::model::reading::Reading]) {
    let mut seen = BTreeSet::new();
    for r in readings {
        assert!(seen.insert(r.seq), "seq {} stored twice", r.seq);
    }
    assert!(
        readings.windows(2).all(|w| w[0].seq < w[1].seq),
        "seqs increase in storage order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_live_load_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let edge = Edge::start(&pipeline(""), &data);
    let load = Load::start(Target::new(edge.mqtt_port()), 4, 64, None);
    load.wait_acked(3_000, Duration::from_secs(60)).await;
    // Publishers are mid-stream when the signal arrives.
    let (status, took) = tokio::task::spawn_blocking(move || edge.stop_timed())
        .await
        .unwrap();
    let acked = load.stop().await;
    assert!(status.success(), "exit 0 after a clean stop");
    assert!(took < Duration::from_secs(15), "stopped in {took:?}");
    let readings = stored_readings(&data);
    let stored = stored_ids(&readings);
    assert_all_stored(&acked, &stored);
    assert!(
        stored.values().all(|&n| n == 1),
        "the embedded broker stores each message once"
    );
    assert_seqs_never_reused(&readings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_cycles_lose_nothing_acknowledged_and_never_reuse_a_seq() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let text = pipeline_on(port, "");
    let load = Load::start(Target::new(port), 4, 64, None);
    let mut want = 0;
    for _ in 0..3 {
        let edge = Edge::start(&text, &data);
        want += 1_500;
        load.wait_acked(want, Duration::from_secs(60)).await;
        edge.crash();
        want = load.acked_count();
    }
    // A last run takes what the publishers still send, and stops cleanly.
    let edge = Edge::start(&text, &data);
    load.wait_acked(want + 500, Duration::from_secs(60)).await;
    let acked = load.stop().await;
    assert!(edge.stop().success());
    let readings = stored_readings(&data);
    assert_all_stored(&acked, &stored_ids(&readings));
    assert_seqs_never_reused(&readings);
}

/// A data directory on a small tmpfs that fills up under load. Intake pauses before the store
/// is out of room (`store.min_free_bytes`), nothing is acknowledged while it is paused, and it
/// resumes by itself when space returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filling_disk_pauses_intake_and_space_coming_back_resumes_it() {
    let fs = match Tmpfs::mount(48 << 20) {
        Ok(fs) => fs,
        Err(reason) => {
            eprintln!("skipped: cannot mount a tmpfs to fill up ({reason})");
            return;
        }
    };
    // The data directory is the tmpfs itself; the log goes beside it, on another disk.
    let data = fs.path().to_owned();
    let text = with_top(
        &pipeline(""),
        "stop_timeout = \"10s\"\n[store]\nmin_free_bytes = 16777216\n",
    );
    let edge = Edge::start(&text, &data);
    let load = Load::start(Target::new(edge.mqtt_port()), 4, 32, None);
    load.wait_acked(1_000, Duration::from_secs(60)).await;

    // Leave 8 MiB: below the 16 MiB minimum.
    let filler = fs.path().join("filler");
    let free = iomt_edge::pipeline::disk::free_bytes(fs.path()).unwrap();
    std::fs::write(&filler, vec![0u8; (free - (8 << 20)) as usize]).unwrap();
    wait_until(Duration::from_secs(10), || edge.health().0 == 503).await;
    let (_, health) = edge.health();
    assert_eq!(health["intake"], false, "{health}");
    assert!(health["problems"]["disk"].is_string(), "{health}");
    // Once what was taken in is stored, nothing more is acknowledged while intake is paused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paused_at = load.acked_count();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(load.acked_count(), paused_at, "no PUBACK while paused");

    std::fs::remove_file(&filler).unwrap();
    wait_until(Duration::from_secs(10), || edge.health().0 == 200).await;
    load.wait_acked(paused_at + 1_000, Duration::from_secs(60))
        .await;
    let acked = load.stop().await;
    assert!(edge.stop().success());
    let readings = stored_readings(&data);
    assert_all_stored(&acked, &stored_ids(&readings));
    assert_seqs_never_reused(&readings);
}

/// The same, with the safety margin off: the store itself runs out of room mid-write. Health
/// says why, nothing is acknowledged, the store recovers once space returns, and a stop while
/// the disk is full still ends within the stop timeout (exiting non-zero if what it had taken
/// in could not be stored, which was then never acknowledged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_writes_then_recovers_and_a_stop_still_ends_in_time() {
    let fs = match Tmpfs::mount(32 << 20) {
        Ok(fs) => fs,
        Err(reason) => {
            eprintln!("skipped: cannot mount a tmpfs to fill up ({reason})");
            return;
        }
    };
    let data = fs.path().to_owned();
    let text = with_top(
        &pipeline(""),
        "stop_timeout = \"5s\"\n[store]\nmin_free_bytes = 0\n",
    );
    let edge = Edge::start(&text, &data);
    let load = Load::start(Target::new(edge.mqtt_port()), 4, 32, None);
    load.wait_acked(1_000, Duration::from_secs(60)).await;
    let filler = fs.path().join("filler");
    fill(&filler);
    wait_until(Duration::from_secs(20), || {
        edge.health().1["problems"]["store"].is_string()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stuck_at = load.acked_count();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(load.acked_count(), stuck_at, "no PUBACK while writes fail");

    std::fs::remove_file(&filler).unwrap();
    wait_until(Duration::from_secs(20), || edge.health().0 == 200).await;
    load.wait_acked(stuck_at + 500, Duration::from_secs(60))
        .await;

    // Full again, and a stop requested while writes fail: it ends within the stop timeout
    // (non-zero: what was taken in could not be stored, and was never acknowledged).
    fill(&filler);
    wait_until(Duration::from_secs(20), || {
        edge.health().1["problems"]["store"].is_string()
    })
    .await;
    let (status, took) = tokio::task::spawn_blocking(move || edge.stop_timed())
        .await
        .unwrap();
    let acked = load.stop().await;
    assert!(took < Duration::from_secs(8), "stopped in {took:?}");
    // Intake was paused before the stop, so there may have been nothing left to store: either
    // exit is right, as long as nothing acknowledged is missing (checked below).
    let _ = status;
    std::fs::remove_file(&filler).unwrap();
    let readings = stored_readings(&data);
    assert_all_stored(&acked, &stored_ids(&readings));
    assert_seqs_never_reused(&readings);
}

/// Writes zeros to `path` until the filesystem is full.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 256 << 10];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

async fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A store that fails every write (the fault point `store-put`) is retried, not skipped:
/// health says why, nothing is acknowledged, and a stop ends within its timeout.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_stops_acknowledgements_and_a_stop_still_ends_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let text = with_top(&pipeline(""), "stop_timeout = \"3s\"\n");
    // Every write after the first five groups fails.
    let edge = Edge::start_with_env(&text, &data, &[("FAILPOINTS", "store-put=5*off->return")]);
    let load = Load::start(Target::new(edge.mqtt_port()), 2, 32, None);
    wait_until(Duration::from_secs(20), || {
        edge.health().1["problems"]["store"].is_string()
    })
    .await;
    let (_, h) = edge.health();
    assert_eq!(h["intake"], false, "{h}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stuck_at = load.acked_count();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(load.acked_count(), stuck_at);
    assert!(edge.metric("iomt_store_errors_total") >= 1.0);
    let (status, took) = tokio::task::spawn_blocking(move || edge.stop_timed())
        .await
        .unwrap();
    let acked = load.stop().await;
    assert!(
        !status.success(),
        "readings taken in could not be stored: exit non-zero"
    );
    assert!(took < Duration::from_secs(6), "stopped in {took:?}");
    let readings = stored_readings(&data);
    assert_all_stored(&acked, &stored_ids(&readings));
}

/// A stage that dies takes the service to a defined state: health 503 with the reason, intake
/// stopped, what was stored acknowledged, exit non-zero naming the stage. Never a hang, never
/// a service that keeps accepting publishes nobody reads.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_that_fails_stops_the_service_with_its_reason() {
    for (failpoint, stage) in [
        ("commit-group=20*off->panic", "commit"),
        ("ingest-message=2000*off->panic", "ingest"),
        ("output-message=panic", "output"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // A rule every reading raises an alarm for: output has work from the start.
        let text = pipeline(
            "[[rule]]\nname = \"hr-any\"\nmetric = \"heart_rate\"\nabove = 0\npriority = \"low\"\n",
        );
        let edge = Edge::start_with_env(&text, &data, &[("FAILPOINTS", failpoint)]);
        let port = edge.mqtt_port();
        let load = Load::start(Target::new(port), 2, 32, None);
        let (status, log) = tokio::task::spawn_blocking(move || edge.wait_for_exit_keeping_log())
            .await
            .unwrap();
        let acked = load.stop().await;
        assert!(!status.success(), "{stage}: exit non-zero");
        assert!(
            log.contains(&format!("stage {stage} ended: panicked")),
            "{stage}: the reason is printed:\n{log}"
        );
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err(),
            "{stage}: nothing listens any more"
        );
        let readings = stored_readings(&data);
        assert_all_stored(&acked, &stored_ids(&readings));
        assert_seqs_never_reused(&readings);
    }
}

/// The test pipeline subscribed to an external broker on `port`.
fn external_on(port: u16) -> String {
    pipeline("").replace(
        "[broker]\n",
        &format!("[broker]\nexternal = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"edge-faults\"\n"),
    )
}

/// Waits until the running service has stored at least `at_least` readings and stores nothing
/// more for a second: what the broker held for it has arrived. (The store itself is read, and
/// compared with what was acknowledged, once the service is stopped.)
async fn wait_drained(edge: &Edge, at_least: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let stored = edge.metric("iomt_readings_stored_total");
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let now = edge.metric("iomt_readings_stored_total");
        if now == stored && now as usize >= at_least {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stored {now}, waiting for {at_least}"
        );
    }
}

/// External mode, a stop while publishers are mid-stream: the broker keeps what the service
/// did not acknowledge, and the next run stores it. "Acknowledged" here is what mosquitto
/// acknowledged to the publishers: all of it must end up stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_live_load_in_external_mode_loses_nothing_the_broker_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The broker must queue what arrives while the service restarts (its default is 1,000).
    let broker = common::mosquitto::Mosquitto::start(dir.path(), "max_queued_messages 0");
    let text = external_on(broker.port);
    let edge = Edge::start(&text, &data);
    let load = Load::start(Target::new(broker.port), 4, 64, None);
    load.wait_acked(3_000, Duration::from_secs(60)).await;
    let (status, _) = tokio::task::spawn_blocking(move || edge.stop_timed())
        .await
        .unwrap();
    assert!(status.success());
    let edge = Edge::start(&text, &data);
    let before = load.acked_count();
    load.wait_acked(before + 1_000, Duration::from_secs(60))
        .await;
    let acked = load.stop().await;
    wait_drained(&edge, 1_000).await;
    assert!(edge.stop().success());
    let readings = stored_readings(&data);
    assert_all_stored(&acked, &stored_ids(&readings));
    assert_seqs_never_reused(&readings);
}

/// The hospital's broker restarts mid-stream (persistence on, as a broker that promises
/// QoS 1 must run): the service reconnects to its session and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_broker_restarted_mid_stream_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let persistence = dir.path().join("mosquitto-db/");
    std::fs::create_dir_all(&persistence).unwrap();
    // Started as root, mosquitto drops to its own user, which must be able to save there.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&persistence, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut broker = common::mosquitto::Mosquitto::start(
        dir.path(),
        &format!(
            "max_queued_messages 0\npersistence true\npersistence_location {}\n",
            persistence.display()
        ),
    );
    let edge = Edge::start(&external_on(broker.port), &data);
    let load = Load::start(Target::new(broker.port), 4, 64, None);
    load.wait_acked(2_000, Duration::from_secs(60)).await;
    // Kept to the end of the test, which stops it.
    let _broker = tokio::task::spawn_blocking(move || {
        broker.restart();
        broker
    })
    .await
    .unwrap();
    let before = load.acked_count();
    load.wait_acked(before + 2_000, Duration::from_secs(60))
        .await;
    let acked = load.stop().await;
    wait_drained(&edge, acked.len()).await;
    let log = edge.log();
    assert!(edge.stop().success());
    assert!(
        log.matches("connected to the external broker").count() >= 2,
        "it reconnected:\n{log}"
    );
    let readings = stored_readings(&data);
    assert_all_stored(&acked, &stored_ids(&readings));
}

/// A slow link to the broker (every chunk from it delayed): the service keeps up as the link
/// allows, stays healthy, loses nothing, and still stops within its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_external_broker_loses_nothing_and_stops_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = common::mosquitto::Mosquitto::start(dir.path(), "max_queued_messages 0");
    let slow = common::proxy::slow(broker.port, Duration::from_millis(20), 4096).await;
    let edge = Edge::start(&external_on(slow), &data);
    let load = Load::start(Target::new(broker.port), 2, 64, Some(1_500));
    let acked = load.finish(Duration::from_secs(60)).await;
    assert_eq!(acked.len(), 3_000);
    wait_drained(&edge, 3_000).await;
    assert_eq!(edge.health().0, 200, "slow is not unhealthy");
    let (status, took) = tokio::task::spawn_blocking(move || edge.stop_timed())
        .await
        .unwrap();
    assert!(status.success());
    assert!(took < Duration::from_secs(15), "stopped in {took:?}");
    let readings = stored_readings(&data);
    assert_all_stored(&acked, &stored_ids(&readings));
}
