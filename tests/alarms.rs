//! The alarm lifecycle, black-box: a real service on loopback, real MQTT clients. Acks over
//! MQTT, a restart that keeps alarms and acknowledgements, forged device clocks, flagged
//! readings, and every alarm's evidence read back from the store.

mod common;

use std::collections::BTreeMap;

use common::*;
use serde_json::Value;

const T0: i64 = 1_700_000_000;

fn json(p: &[u8]) -> Value {
    serde_json::from_slice(p).unwrap()
}

fn history(v: &Value) -> Vec<String> {
    v["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["what"].as_str().unwrap().to_owned())
        .collect()
}

/// SpO2 readings of bed 3, one message each, every 10 s from `from` (s after T0).
fn low_spo2(from: i64, n: i64, spo2: f64) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| vitals(3, T0 + from + i * 10, 80.0, spo2))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alarm_is_acknowledged_over_mqtt_and_survives_a_restart_without_a_second_raise() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let text = pipeline("latching = true\n");
    let topic = format!("alarms/{SITE}/w7-b3/spo2-low");

    let edge = Edge::start(&text, &data);
    let port = edge.mqtt_port();
    let mut alarms = subscribe(port, &topic).await;
    publish_all(port, &low_spo2(0, 4, 88.0)).await;
    let (_, p, retained) = next_matching(&mut alarms, |_, _| true).await;
    let raised = json(&p);
    assert!(!retained);
    assert_eq!(raised["state"], "active");
    assert_eq!(raised["kind"], "clinical");
    assert_eq!(raised["evidence"]["value"], 88.0);
    assert_eq!(raised["evidence"]["source"], "w7-b3-mon");
    assert_eq!(raised["evidence"]["seq"], raised["seq"]);

    // A bad acknowledgement changes nothing and is counted; a good one acknowledges.
    publish_all(
        port,
        &[
            (format!("{topic}/ack"), b"{\"who\": 1}".to_vec()),
            (
                format!("alarms/{SITE}/w7-b9/spo2-low/ack"),
                b"{\"by\": \"nurse-jo\"}".to_vec(),
            ),
            (format!("{topic}/ack"), b"{\"by\": \"nurse-jo\"}".to_vec()),
        ],
    )
    .await;
    let (_, p, _) = next_matching(&mut alarms, |_, _| true).await;
    let acked = json(&p);
    assert_eq!(acked["state"], "acknowledged");
    assert_eq!(acked["acknowledged"]["by"], "nurse-jo");
    assert_eq!(history(&acked), ["raised", "acknowledged"]);
    edge.wait_metric("iomt_alarm_acks_refused_total", 2.0);
    assert!(edge.stop().success());

    // After a restart: still acknowledged, not raised again by readings that are still low.
    wait_sled_released(&data.join("store"));
    let edge = Edge::start(&text, &data);
    let port = edge.mqtt_port();
    let mut alarms = subscribe(port, &topic).await;
    let (_, p, retained) = next_matching(&mut alarms, |_, _| true).await;
    assert!(retained, "published again, retained, by the new process");
    let kept = json(&p);
    assert_eq!(kept["state"], "acknowledged");
    assert_eq!(kept["acknowledged"]["by"], "nurse-jo");
    assert_eq!(history(&kept), ["raised", "acknowledged", "restored"]);
    // Back in range, the very first reading after the restart: the acknowledged alarm clears,
    // because the rule was told it had raised it (a rule that forgot would see nothing to
    // clear, and the alarm would stay).
    publish_all(port, &low_spo2(40, 1, 97.0)).await;
    let (_, p, _) = next_matching(&mut alarms, |_, _| true).await;
    let cleared = json(&p);
    assert_eq!(cleared["state"], "cleared");
    assert_eq!(
        history(&cleared),
        [
            "raised",
            "acknowledged",
            "restored",
            "condition-cleared",
            "cleared"
        ],
    );
    // Still low for long enough: a new episode, raised once; the old one was never raised
    // again.
    publish_all(port, &low_spo2(50, 4, 87.0)).await;
    let (_, p, _) = next_matching(&mut alarms, |_, _| true).await;
    assert_eq!(history(&json(&p)), ["raised"]);
    assert_eq!(
        edge.metric("iomt_alarms_raised_total{priority=\"high\"}"),
        1.0
    );
    assert!(edge.stop().success());
}

/// Two devices of one subject: a patch whose readings carry the receive time (no clock of its
/// own) runs years ahead of a monitor replaying its own clock; each device's readings are in
/// order on their own, so the patch does not hide the monitor's breach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_of_a_subject_does_not_make_anothers_readings_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&pipeline(""), &dir.path().join("data"));
    let port = edge.mqtt_port();
    let mut alarms = subscribe(port, "alarms/#").await;
    let patch = (
        "ward/7/bed/3/senml".to_owned(),
        br#"[{"n":"spo2","u":"%","v":97}]"#.to_vec(),
    );
    let mut messages = vec![patch.clone()];
    for (i, m) in low_spo2(0, 4, 88.0).into_iter().enumerate() {
        messages.push(m);
        if i == 1 {
            messages.push(patch.clone());
        }
    }
    publish_all(port, &messages).await;
    let (t, p, _) = next_matching(&mut alarms, |_, _| true).await;
    assert_eq!(t, format!("alarms/{SITE}/w7-b3/spo2-low"));
    let v = json(&p);
    assert_eq!(v["evidence"]["source"], "w7-b3-mon");
    // The patch's normal readings do not clear the monitor's breach either: only the monitor's.
    publish_all(port, &[patch]).await;
    publish_all(port, &low_spo2(40, 1, 97.0)).await;
    let (_, p, _) = next_matching(&mut alarms, |_, _| true).await;
    let v = json(&p);
    assert_eq!(v["state"], "cleared");
    assert_eq!(history(&v), ["raised", "condition-cleared", "cleared"]);
    assert!(edge.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_device_clocks_neither_hold_off_nor_fire_a_delay() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&pipeline(""), &dir.path().join("data"));
    let port = edge.mqtt_port();
    let mut alarms = subscribe(port, "alarms/#").await;
    // Bed 3: a reading stamped 9999 in the middle of a real low breach. It is flagged
    // clock_suspect and ignored: the breach still fires after 30 s of real readings.
    let year_9999 = 253_402_300_000i64;
    let mut bed3 = low_spo2(0, 2, 88.0);
    bed3.push(vitals(3, year_9999, 80.0, 88.0));
    bed3.extend(low_spo2(20, 2, 88.0));
    publish_all(port, &bed3).await;
    let (t, p, _) = next_matching(&mut alarms, |_, _| true).await;
    assert_eq!(t, format!("alarms/{SITE}/w7-b3/spo2-low"));
    assert_eq!(json(&p)["since"], "2023-11-14T22:13:20Z");
    assert_eq!(json(&p)["ts"], "2023-11-14T22:13:50Z");

    // Bed 4: one reading stamped 1970 (inside this pipeline's 100-year window), then one
    // message carrying 40 s of readings: decades apart, and one message, so no delay was held
    // by readings received over it.
    publish_all(
        port,
        &[
            vitals(4, 1, 80.0, 85.0),
            (
                "ward/7/bed/4/vitals".to_owned(),
                format!(
                    r#"[{{"ts":{T0},"spo2":85}},{{"ts":{},"spo2":85}}]"#,
                    T0 + 40
                )
                .into_bytes(),
            ),
        ],
    )
    .await;
    // The next real reading, in a message of its own, completes the breach begun at T0.
    publish_all(port, &[vitals(4, T0 + 60, 80.0, 85.0)]).await;
    let (t, p, _) = next_matching(&mut alarms, |_, _| true).await;
    assert_eq!(t, format!("alarms/{SITE}/w7-b4/spo2-low"));
    let v = json(&p);
    assert_eq!(v["since"], "2023-11-14T22:13:20Z", "not 1970");
    assert_eq!(
        v["ts"], "2023-11-14T22:14:20Z",
        "raised by the fifth reading's message"
    );
    assert!(edge.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagged_readings_raise_a_technical_alarm_never_a_clinical_one() {
    let dir = tempfile::tempdir().unwrap();
    let extra = r#"
[[rule]]
name = "probe-off"
kind = "flagged"
metric = "spo2"
count = 3
priority = "low"
"#;
    let text = pipeline(extra).replace("for = \"30s\"", "for = \"0s\"");
    let edge = Edge::start(&text, &dir.path().join("data"));
    let port = edge.mqtt_port();
    let mut alarms = subscribe(port, "alarms/#").await;
    // SpO2 of -5 %: far below the spo2-low threshold, and flagged out of range (a probe that
    // lost its signal), so it must never raise spo2-low.
    let flagged: Vec<(String, Vec<u8>)> = (0..4).map(|i| vitals(5, T0 + i, 80.0, -5.0)).collect();
    publish_all(port, &flagged).await;
    let (t, p, _) = next_matching(&mut alarms, |_, _| true).await;
    assert_eq!(t, format!("alarms/{SITE}/w7-b5/probe-off"));
    let v = json(&p);
    assert_eq!(
        (v["kind"].as_str(), v["state"].as_str()),
        (Some("technical"), Some("active"))
    );
    edge.wait_metric("iomt_readings_decoded_total", 4.0);
    assert_eq!(
        edge.metric("iomt_alarms_raised_total{priority=\"high\"}"),
        0.0,
        "no clinical alarm from flagged readings"
    );
    assert!(edge.stop().success());
}

/// After a clean run of the ward fixture, every alarm names evidence that the store holds:
/// the same seq, metric and value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alarms_evidence_is_in_the_store_after_a_clean_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = on_free_ports(
        &std::fs::read_to_string(root.join("pipelines/ward-demo.toml")).unwrap(),
        SITE,
    );
    let edge = Edge::start(&text, &data);
    let port = edge.mqtt_port();
    let mut alarms = subscribe(port, "alarms/#").await;
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
        .args(["replay", "--speed", "max", "--broker"])
        .arg(format!("mqtt://127.0.0.1:{port}"))
        .arg(root.join("fixtures/ward-demo.jsonl"))
        .status()
        .unwrap();
    assert!(status.success());
    edge.wait_metric("iomt_alarms_raised_total{priority=\"high\"}", 2.0);
    let mut evidence = BTreeMap::new();
    while let Ok(Some((_, p, _))) =
        tokio::time::timeout(std::time::Duration::from_secs(2), alarms.recv()).await
    {
        let v = json(&p);
        if let Some(seq) = v["evidence"]["seq"].as_u64() {
            evidence.insert(
                seq,
                (
                    v["evidence"]["metric"].as_str().unwrap().to_owned(),
                    v["evidence"]["value"].as_f64().unwrap(),
                ),
            );
        }
    }
    assert!(evidence.len() >= 5, "the fixture raises five alarms");
    assert!(edge.stop().success());
    let stored: BTreeMap<u64, (String, f64)> = stored_readings(&data)
        .into_iter()
        .map(|r| {
            (
                r.seq,
                (r.metric.name().to_owned(), r.value.unwrap_or(f64::NAN)),
            )
        })
        .collect();
    for (seq, want) in evidence {
        assert_eq!(stored.get(&seq), Some(&want), "evidence seq {seq}");
    }
}

/// An alarm raised from a reading whose batch a crash lost says so after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alarm_whose_evidence_a_crash_lost_says_so_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let text = pipeline("").replace("for = \"30s\"", "for = \"0s\"");
    let topic = format!("alarms/{SITE}/w7-b3/spo2-low");
    // The store refuses every batch: the alarm is raised (ingest judges readings before they
    // are stored) and kept, but its reading never reaches the store.
    let edge = Edge::start_with_env(&text, &data, &[("FAILPOINTS", "store-put=return")]);
    let port = edge.mqtt_port();
    let mut alarms = subscribe(port, &topic).await;
    publish_all_qos0(port, &low_spo2(0, 1, 85.0)).await;
    let (_, p, _) = next_matching(&mut alarms, |_, _| true).await;
    let seq = json(&p)["seq"].as_u64().unwrap();
    // The alarm stage makes its change durable right after publishing it.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    edge.crash();

    wait_sled_released(&data.join("store"));
    let edge = Edge::start(&text, &data);
    let mut alarms = subscribe(edge.mqtt_port(), &topic).await;
    let (_, p, _) = next_matching(&mut alarms, |_, _| true).await;
    let v = json(&p);
    assert_eq!(v["state"], "active");
    assert_eq!(history(&v), ["raised", "restored", "evidence-lost"]);
    let note = v["history"][2]["note"].as_str().unwrap();
    assert!(note.contains(&format!("seq {seq}")), "{note}");
    assert!(edge.stop().success());
    assert!(stored_readings(&data).iter().all(|r| r.seq != seq));
}

/// A subject's NEWS2 settings arrive on `config/<site>/<subject>`, change its score, and are
/// kept, with its readings, across a restart; a bad settings message is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_settings_and_news2_state_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let text = pipeline("");
    let edge = Edge::start(&text, &data);
    let port = edge.mqtt_port();
    let news2 = format!("news2/{SITE}/w7-b3");
    let mut scores = subscribe(port, &news2).await;
    let mut dead = subscribe(port, "edge/deadletter/#").await;
    publish_all(
        port,
        &[
            (
                format!("config/{SITE}/w7-b3"),
                br#"{"spo2_scale": 3}"#.to_vec(),
            ),
            (
                format!("config/{SITE}/w7-b3"),
                br#"{"spo2_scale": 2, "on_oxygen": true}"#.to_vec(),
            ),
            vitals(3, T0, 70.0, 95.0),
        ],
    )
    .await;
    let (_, p, _) = next_matching(&mut scores, |_, _| true).await;
    let v = json(&p);
    // Scale 2 on oxygen: 95 % scores 2, and oxygen 2.
    assert_eq!(v["scale"], 2);
    assert_eq!(v["parameters"]["spo2"]["score"], 2);
    assert_eq!(v["parameters"]["air_or_oxygen"]["value"], "oxygen");
    let (t, p, _) = next_matching(&mut dead, |_, _| true).await;
    assert_eq!(t, format!("edge/deadletter/config/{SITE}/w7-b3"));
    assert_eq!(json(&p)["codec"], "subject-settings");
    assert!(edge.stop().success());

    wait_sled_released(&data.join("store"));
    let edge = Edge::start(&text, &data);
    let port = edge.mqtt_port();
    let mut scores = subscribe(port, &news2).await;
    // Only a heart rate now: the score still has the SpO2 from before the restart, on the
    // subject's scale 2.
    publish_all(
        port,
        &[(
            "ward/7/bed/3/vitals".to_owned(),
            format!(r#"{{"ts":{},"hr":120}}"#, T0 + 10).into_bytes(),
        )],
    )
    .await;
    let (_, p, _) = next_matching(&mut scores, |_, p| {
        json(p)["parameters"]["pulse"]["value"] == 120.0
    })
    .await;
    let v = json(&p);
    assert_eq!(v["scale"], 2);
    assert_eq!(v["parameters"]["spo2"]["value"], 95.0);
    assert_eq!(v["parameters"]["air_or_oxygen"]["value"], "oxygen");
    assert!(edge.stop().success());
}

/// A silence rule raises a technical alarm when a device stops, on the service clock, and
/// clears it when the device is heard again; an escalation raises an unacknowledged alarm's
/// priority and says so on the escalation topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_and_escalation_run_on_the_service_clock() {
    let dir = tempfile::tempdir().unwrap();
    let extra = r#"
[[rule]]
name = "spo2-silent"
kind = "silence"
metric = "spo2"
after = "1s"
priority = "low"
escalate_after = "1s"
"#;
    let edge = Edge::start(&pipeline(extra), &dir.path().join("data"));
    let port = edge.mqtt_port();
    let topic = format!("alarms/{SITE}/w7-b3/spo2-silent");
    let mut alarms = subscribe(port, &topic).await;
    let mut escalated = subscribe(port, &format!("alarms/{SITE}/escalated")).await;
    publish_all(port, &low_spo2(0, 1, 97.0)).await;
    let started = std::time::Instant::now();
    let (_, p, _) = next_matching(&mut alarms, |_, _| true).await;
    let v = json(&p);
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    assert_eq!(
        (v["kind"].as_str(), v["state"].as_str()),
        (Some("technical"), Some("active"))
    );
    assert_eq!(v["priority"], "low");
    // Nobody acknowledges: a second later it escalates, on its topic and the escalation topic.
    let (_, p, _) = next_matching(&mut escalated, |_, _| true).await;
    let v = json(&p);
    assert_eq!(
        (v["priority"].as_str(), v["escalations"].as_u64()),
        (Some("medium"), Some(1))
    );
    let (_, p, _) = next_matching(&mut alarms, |_, _| true).await;
    assert_eq!(json(&p)["priority"], "medium");
    // Heard again: cleared.
    publish_all(port, &low_spo2(10, 1, 97.0)).await;
    let (_, p, _) = next_matching(&mut alarms, |_, p| json(p)["state"] == "cleared").await;
    assert_eq!(history(&json(&p)).last().unwrap(), "cleared");
    assert!(edge.stop().success());
}
