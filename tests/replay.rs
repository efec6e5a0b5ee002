//! The shipped demo fixture, replayed by the real `replay` command through the running service
//! with the default ward pipeline: every reading stored, the deteriorating patient's alarms
//! raised.

mod common;

use std::process::Command;

use common::*;
use iomt_edge::replay::load_fixture;

fn default_pipeline_on_free_ports() -> String {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/ward.toml"))
        .unwrap();
    on_free_ports(&text, "ward")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ward_demo_replays_into_stored_readings_and_alarms() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/ward-demo.jsonl");
    let messages = load_fixture(std::path::Path::new(fixture)).unwrap();
    // Readings the fixture holds: each JSON field, each SenML record.
    let expected: usize = messages
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            match v {
                serde_json::Value::Array(records) => records.len(),
                serde_json::Value::Object(o) => o.keys().filter(|k| *k != "ts").count(),
                _ => unreachable!(),
            }
        })
        .sum();
    assert!(messages.len() > 1000 && expected > 3000);

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let edge = Edge::start(&default_pipeline_on_free_ports(), &data);
    let mut alarms = subscribe(edge.mqtt_port(), "alarms/#").await;
    let out = Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
        .args(["replay", fixture, "--speed", "max", "--broker"])
        .arg(format!("mqtt://127.0.0.1:{}", edge.mqtt_port()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8(out.stdout).unwrap();
    assert!(
        summary.starts_with(&format!("replayed {} messages in ", messages.len())),
        "{summary}"
    );
    assert!(summary.trim_end().ends_with("messages/s)"), "{summary}");

    // The deteriorating patient raises the SpO2 alarm, and only that bed does.
    let (topic, payload, _) = next_matching(&mut alarms, |t, p| {
        t.ends_with("/spo2-low") && !p.is_empty()
    })
    .await;
    assert_eq!(topic, format!("alarms/{SITE}/ward4-bed3/spo2-low"));
    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert!(v["value"].as_f64().unwrap() < 92.0);

    edge.wait_metric("iomt_readings_stored_total", expected as f64);
    let m = edge.metrics();
    assert_eq!(
        metric_value(
            &m,
            "iomt_decode_failures_total{codec=\"json\",reason=\"syntax\"}"
        ),
        0.0
    );
    assert!(metric_value(&m, "iomt_alarms_raised_total{priority=\"high\"}") >= 1.0);
    assert!(
        metric_value(&m, "iomt_alarms_raised_total{priority=\"low\"}") >= 1.0,
        "temperature alarm"
    );
    assert!(edge.stop().success());
    let stored = stored_readings(&data);
    assert_eq!(stored.len(), expected);
    let beds: std::collections::BTreeSet<_> =
        stored.iter().filter_map(|r| r.subject.clone()).collect();
    assert_eq!(beds.len(), 8, "eight beds");
}

#[test]
fn a_bad_fixture_line_is_named_and_nothing_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.jsonl");
    std::fs::write(
        &f,
        "{\"t_ms\":0,\"topic\":\"a\",\"payload\":1}\n{\"t_ms\":\"soon\",\"topic\":\"a\"}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
        .args(["replay"])
        .arg(&f)
        .args(["--broker", "mqtt://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.jsonl:2:"), "{err}");
}
