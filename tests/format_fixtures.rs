//! The format fixtures (fixtures/formats/, one recorded-style stream per device format with
//! malformed messages mixed in) against pipelines/formats.toml: first decoded one by one, then
//! replayed by the real `replay` command through the running service. Every good reading is
//! stored with the value the fixture's `expect` says, every bad message arrives on the
//! dead-letter topic with its reason, and nothing else is lost.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::formats::*;
use common::*;
use iomt_edge::codec::{decode_to_readings, Message};
use iomt_edge::model::reading::Reading;
use serde_json::Value;

fn matches(r: &Reading, metric: &str, want: &Value) -> bool {
    r.metric.name() == metric
        && match want {
            Value::Null => r.value.is_none() && r.text.is_none(),
            Value::String(s) => r.text.as_deref() == Some(s),
            n => r
                .value
                .is_some_and(|v| (v - n.as_f64().unwrap()).abs() < 1e-9),
        }
}

#[test]
fn every_fixture_message_decodes_as_its_expectation_says() {
    let mut table = route_table();
    let (mut good, mut bad) = (0, 0);
    for name in formats() {
        let lines = lines(name);
        assert!(lines.len() >= 50, "{name}");
        let mut reasons = std::collections::BTreeSet::new();
        for (i, l) in lines.iter().enumerate() {
            let (route, resolved) = table.resolve(&l.topic).expect("a route for every topic");
            assert_eq!(route.codec.name(), name, "{name} line {}", i + 1);
            let msg = Message {
                topic: &l.topic,
                payload: &l.payload,
                received: 1_709_251_200_000_000,
                source: &resolved.source,
                subject: resolved.subject.as_deref(),
            };
            let got = decode_to_readings(route.codec.as_ref(), &msg);
            match (&l.expect, got) {
                (Expect::Readings(want), Ok(r)) => {
                    assert_eq!(r.len(), want.len(), "{name} line {}: {r:?}", i + 1);
                    for (r, (m, v)) in r.iter().zip(want) {
                        assert!(matches(r, m, v), "{name} line {}: {r:?} vs {m} {v}", i + 1);
                    }
                    good += 1;
                }
                (Expect::DeadLetter(reason), Err(e)) => {
                    assert_eq!(e.reason.as_str(), reason, "{name} line {}: {e}", i + 1);
                    reasons.insert(reason.clone());
                    bad += 1;
                }
                (want, got) => panic!("{name} line {}: expected {want:?}, got {got:?}", i + 1),
            }
        }
        assert!(
            reasons.len() >= 2,
            "{name}: malformed messages of several kinds"
        );
    }
    assert!(good > 500 && bad > 100, "{good} good, {bad} bad");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_fixture_replays_through_the_service() {
    let text = on_free_ports(&pipeline_text(), "formats");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let edge = Edge::start(&text, &data);
    let mut dead = subscribe(edge.mqtt_port(), "edge/deadletter/#").await;

    // Expected readings in publishing order (one replay at a time, each over one connection,
    // so the broker keeps their order), and expected dead letters per topic.
    let mut want_readings: Vec<(String, String, Value)> = Vec::new();
    let mut want_dead: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in formats() {
        for l in lines(name) {
            match l.expect {
                Expect::Readings(r) => {
                    want_readings.extend(r.into_iter().map(|(m, v)| (l.topic.clone(), m, v)))
                }
                Expect::DeadLetter(reason) => want_dead.entry(l.topic).or_default().push(reason),
            }
        }
        let out = Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
            .arg("replay")
            .arg(fixture(name))
            .args(["--speed", "max", "--broker"])
            .arg(format!("mqtt://127.0.0.1:{}", edge.mqtt_port()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let dead_count: usize = want_dead.values().map(Vec::len).sum();
    let mut got_dead: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for _ in 0..dead_count {
        let (topic, payload, _) = next_matching(&mut dead, |_, _| true).await;
        let v: Value = serde_json::from_slice(&payload).unwrap();
        let original = v["topic"].as_str().unwrap().to_owned();
        assert_eq!(topic, format!("edge/deadletter/{original}"));
        assert!(
            v["payload_b64"].is_string(),
            "the payload travels with its reason"
        );
        got_dead
            .entry(original)
            .or_default()
            .push(v["reason"].as_str().unwrap().to_owned());
    }
    assert_eq!(got_dead, want_dead);

    let total = want_readings.len();
    edge.wait_metric("iomt_readings_stored_total", total as f64);
    // No dead letter beyond the expected ones arrives.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(dead.try_recv().is_err(), "an unexpected dead letter");
    assert!(edge.stop().success());

    let stored = stored_readings(&data);
    assert_eq!(stored.len(), total, "nothing lost, nothing extra");
    for (r, (topic, m, v)) in stored.iter().zip(&want_readings) {
        assert!(matches(r, m, v), "{topic}: stored {r:?}, expected {m} {v}");
        let device = topic.split('/').nth(1).unwrap();
        // The route's source template is `{2}`, the device level, unless the payload names
        // the device (the gateway's JSON, a FHIR device reference).
        if !topic.starts_with("gw/") && !topic.starts_with("fhir/") {
            assert_eq!(r.source, device, "{topic}");
        }
        let subject = r.subject.as_deref().unwrap_or_default();
        match topic.split('/').next().unwrap() {
            "fhir" => assert!(subject.starts_with("Patient/"), "{r:?}"),
            "csv" => assert!(subject.starts_with("bed-"), "{r:?}"),
            "gw" => assert!(r.source.starts_with("C0:FF:EE:"), "{r:?}"),
            _ if topic.ends_with("2a35") => assert!(
                ["patient-1", "patient-2", device].contains(&subject),
                "cuff user ids map to subjects: {r:?}"
            ),
            _ => assert_eq!(subject, device),
        }
    }
}
