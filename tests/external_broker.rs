//! External-broker mode against a real mosquitto: a persistent QoS 1 session whose messages are
//! acknowledged only once stored, so killing the service loses nothing.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::mosquitto::Mosquitto;
use common::*;

/// The test pipeline subscribed to the mosquitto on `port`, with a small receive window: it
/// must not stall a commit cycle.
fn external_pipeline(port: u16) -> String {
    pipeline("").replace(
        "[broker]\n",
        &format!("[broker]\nexternal = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"edge-under-test\"\ninflight = 100\n"),
    )
}

/// Waits until the service has stored nothing new for a second.
async fn wait_quiet(edge: &Edge) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stored = edge.metric("iomt_readings_stored_total");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        if edge.metric("iomt_readings_stored_total") == stored {
            return;
        }
        assert!(Instant::now() < deadline, "still storing after 60 s");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loses_nothing_the_external_broker_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "max_queued_messages 0");
    let data = dir.path().join("data");
    let text = external_pipeline(broker.port);

    // First start creates the persistent session and its subscriptions.
    let edge = Edge::start(&text, &data);
    assert!(
        edge.endpoints.mqtt.is_none(),
        "no embedded broker in external mode"
    );
    let first: Vec<_> = (0..200)
        .map(|i| vitals(i % 8, 1_700_000_000 + i as i64, 70.0, 97.0))
        .collect();
    publish_all(broker.port, &first).await;
    edge.wait_metric("iomt_readings_stored_total", 400.0);
    edge.wait_metric("iomt_acks_sent_total", 200.0);

    // Kill it hard while the broker keeps taking messages for its session.
    let more: Vec<_> = (200..3000)
        .map(|i| vitals(i % 8, 1_700_000_000 + i as i64, 70.0, 97.0))
        .collect();
    let (half1, half2) = more.split_at(1400);
    let publisher = {
        let half2 = half2.to_vec();
        let port = broker.port;
        tokio::spawn(async move { publish_all(port, &half2).await })
    };
    publish_all(broker.port, half1).await;
    edge.crash();
    publisher.await.unwrap();

    // The restarted service resumes the session and gets every unacknowledged message.
    let edge = Edge::start(&text, &data);
    // The broker resends the session's unacknowledged messages as soon as the service is
    // connected (it is when `start` returns).
    wait_quiet(&edge).await;
    assert!(edge.stop().success());

    let stored = stored_readings(&data);
    let ts: BTreeSet<i64> = stored
        .iter()
        .map(|r| r.ts / 1_000_000 - 1_700_000_000)
        .collect();
    let missing: Vec<i64> = (0..3000).filter(|i| !ts.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "lost {} messages, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    // At-least-once: a message stored just before the crash may come again, never fewer.
    assert!(stored.len() >= 6000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_and_dead_letters_go_out_through_the_external_broker() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let edge = Edge::start(&external_pipeline(broker.port), &dir.path().join("data"));
    let mut out = subscribe(broker.port, "#").await;
    let mut msgs: Vec<_> = (0..=3)
        .map(|i| vitals(5, 1_700_000_000 + i * 10, 80.0, 85.0))
        .collect();
    msgs.push(("ward/7/bed/5/vitals".into(), b"garbage".to_vec()));
    publish_all(broker.port, &msgs).await;
    let alarm_topic = format!("alarms/{SITE}/w7-b5/spo2-low");
    let dl_topic = "edge/deadletter/ward/7/bed/5/vitals";
    // The alarm goes through the alarm stage, the dead letter straight out: either may be
    // first.
    let (mut alarm, mut dl) = (None, None);
    while alarm.is_none() || dl.is_none() {
        let (t, p, _) = next_matching(&mut out, |t, _| t == alarm_topic || t == dl_topic).await;
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        if t == alarm_topic {
            alarm = Some(v);
        } else {
            dl = Some(v);
        }
    }
    assert_eq!(alarm.unwrap()["state"], "active");
    // Acknowledged through the hospital's broker, as a nurses' station would.
    publish_all(
        broker.port,
        &[(
            format!("{alarm_topic}/ack"),
            br#"{"by": "nurse-jo"}"#.to_vec(),
        )],
    )
    .await;
    let (_, acked, _) = next_matching(&mut out, |t, p| {
        t == alarm_topic
            && serde_json::from_slice::<serde_json::Value>(p).unwrap()["state"] == "acknowledged"
    })
    .await;
    let acked: serde_json::Value = serde_json::from_slice(&acked).unwrap();
    assert_eq!(acked["acknowledged"]["by"], "nurse-jo");
    let dl = dl.unwrap();
    assert_eq!(dl["reason"], "syntax");
    assert!(edge.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_acknowledges_everything_it_stored() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let data = dir.path().join("data");
    let text = external_pipeline(broker.port);
    let edge = Edge::start(&text, &data);
    let msgs: Vec<_> = (0..500)
        .map(|i| vitals(i % 8, 1_700_000_000 + i as i64, 70.0, 97.0))
        .collect();
    publish_all(broker.port, &msgs).await;
    edge.wait_metric("iomt_readings_stored_total", 1000.0);
    assert!(edge.stop().success());
    // Had the last acknowledgements not gone out before the DISCONNECT, the broker would
    // resend their messages now.
    let edge = Edge::start(&text, &data);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        edge.metric("iomt_readings_stored_total"),
        0.0,
        "nothing resent"
    );
    assert!(edge.stop().success());
    assert_eq!(stored_readings(&data).len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_undecodable_messages_are_dead_lettered_and_acknowledged_never_looped() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "");
    let data = dir.path().join("data");
    // Payloads above 4 KiB are refused by ingest; packets above 64 KiB are withheld by the
    // broker (announced as MQTT 5's Maximum Packet Size).
    let text = external_pipeline(broker.port)
        .replace("[broker]\n", "[broker]\nmax_packet_bytes = 65536\n");
    let edge = Edge::start(&text, &data);
    let mut dead = subscribe(broker.port, "edge/deadletter/#").await;
    let big = format!(
        r#"{{"ts":1700000000,"hr":70,"pad":"{}"}}"#,
        "x".repeat(20_000)
    );
    let huge = format!(
        r#"{{"ts":1700000000,"hr":70,"pad":"{}"}}"#,
        "x".repeat(200_000)
    );
    publish_all(
        broker.port,
        &[
            vitals(1, 1_700_000_000, 70.0, 97.0),
            ("ward/7/bed/1/vitals".into(), big.into_bytes()),
            ("ward/7/bed/1/vitals".into(), b"\xff not json".to_vec()),
            ("ward/7/bed/1/vitals".into(), huge.into_bytes()),
            vitals(1, 1_700_000_001, 71.0, 98.0),
        ],
    )
    .await;
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let (_, p, _) = next_matching(&mut dead, |_, _| true).await;
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        reasons.push(v["reason"].as_str().unwrap().to_owned());
    }
    reasons.sort();
    assert_eq!(reasons, ["oversized", "syntax"]);
    edge.wait_metric("iomt_readings_stored_total", 4.0);
    wait_quiet(&edge).await;
    assert!(edge.stop().success());
    // Nothing was left unacknowledged, so a restart gets nothing again; and the session was
    // never broken by the huge message.
    let edge = Edge::start(&text, &data);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(edge.metric("iomt_readings_stored_total"), 0.0);
    let log = edge.log();
    assert!(edge.stop().success());
    assert_eq!(
        log.matches("connected to the external broker").count(),
        2,
        "one connection per run, no reconnect loop:\n{log}"
    );
    assert!(!log.contains("connection failed"), "{log}");
    assert_eq!(stored_readings(&data).len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_the_broker_is_down_until_the_session_is_up() {
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on yet.
    let port = free_port();
    let text = external_pipeline(port);
    let edge = Edge::spawn(&text, &dir.path().join("data"), &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, health) = edge.health();
    assert_eq!(code, 503, "{health}");
    assert!(health["problems"]["broker"].is_string(), "{health}");
    // Alarms could not go out either.
    assert!(health["problems"]["publishing"].is_string(), "{health}");
    // The broker comes up on that port: the service connects and turns healthy by itself.
    let _late = Mosquitto::start_on(dir.path(), port, "");
    let deadline = Instant::now() + Duration::from_secs(20);
    while edge.health().0 != 200 {
        assert!(Instant::now() < deadline, "never healthy: {}", edge.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(edge.stop().success());
}
