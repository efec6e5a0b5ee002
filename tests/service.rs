//! Black-box tests of the service: the real binary, a real MQTT client, HTTP.

mod common;

use std::collections::BTreeSet;

use common::*;
use iomt_edge::model::reading::{flags, Metric};

const T0: i64 = 1_700_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_batches_decrypt_to_exactly_the_published_readings() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let edge = Edge::start(&pipeline(""), &data);
    let mut messages = Vec::new();
    for i in 0..300u32 {
        messages.push(vitals(
            i % 8,
            T0 + i as i64,
            60.0 + (i % 40) as f64,
            95.0 + (i % 5) as f64,
        ));
    }
    messages.push((
        "ward/7/bed/2/senml".into(),
        br#"[{"bn":"urn:dev:therm:9:","bt":1700000500,"n":"body_temp","u":"[degF]","v":100.4},{"n":"heart_rate","u":"/min","v":81,"t":1}]"#.to_vec(),
    ));
    publish_all(edge.mqtt_port(), &messages).await;
    edge.wait_metric("iomt_readings_stored_total", 602.0);
    assert!(edge.stop().success());

    let stored = stored_readings(&data);
    assert_eq!(stored.len(), 602);
    // Seqs are unique and strictly increasing in storage order.
    assert!(stored.windows(2).all(|w| w[0].seq < w[1].seq));

    let key = |r: &iomt_edge::model::reading::Reading| {
        (
            r.ts,
            r.source.clone(),
            r.subject.clone(),
            r.metric.name(),
            r.value.map(f64::to_bits),
        )
    };
    let got: BTreeSet<_> = stored.iter().map(key).collect();
    let mut want = BTreeSet::new();
    for i in 0..300u32 {
        let bed = i % 8;
        let ts = (T0 + i as i64) * 1_000_000;
        let source = format!("w7-b{bed}-mon");
        let subject = Some(format!("w7-b{bed}"));
        want.insert((
            ts,
            source.clone(),
            subject.clone(),
            "heart_rate",
            Some((60.0 + (i % 40) as f64).to_bits()),
        ));
        want.insert((
            ts,
            source,
            subject,
            "spo2",
            Some((95.0 + (i % 5) as f64).to_bits()),
        ));
    }
    let senml_temp = stored
        .iter()
        .find(|r| r.metric == Metric::BodyTemp)
        .unwrap();
    assert!(
        (senml_temp.value.unwrap() - 38.0).abs() < 1e-9,
        "°F converted to Cel"
    );
    assert_eq!(senml_temp.unit, "Cel");
    assert_eq!(senml_temp.ts, 1_700_000_500_000_000);
    assert_eq!(senml_temp.source, "w7-b2-sensor");
    want.insert((
        senml_temp.ts,
        senml_temp.source.clone(),
        senml_temp.subject.clone(),
        "body_temp",
        senml_temp.value.map(f64::to_bits),
    ));
    want.insert((
        1_700_000_501_000_000,
        "w7-b2-sensor".into(),
        Some("w7-b2".into()),
        "heart_rate",
        Some(81f64.to_bits()),
    ));
    assert_eq!(got, want);
    assert!(stored.iter().all(|r| r.flags == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_alarm_arrives_retained_on_its_topic_and_clears() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&pipeline(""), &dir.path().join("data"));
    let port = edge.mqtt_port();
    let mut alarms = subscribe(port, "alarms/#").await;
    let topic = format!("alarms/{SITE}/w7-b3/spo2-low");

    // SpO2 below 92 from t=0; the rule wants 30 s of device time, reached at t=30.
    let low: Vec<_> = (0..=3)
        .map(|i| vitals(3, T0 + i * 10, 80.0, 89.0))
        .collect();
    publish_all(port, &low).await;
    let (t, payload, _) = next_matching(&mut alarms, |t, p| t == topic && !p.is_empty()).await;
    assert_eq!(t, topic);
    let alarm: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(alarm["state"], "active");
    assert_eq!(alarm["priority"], "high");
    assert_eq!(alarm["rule"], "spo2-low");
    assert_eq!(alarm["value"], 89.0);
    assert_eq!(alarm["since"], "2023-11-14T22:13:20Z");
    assert_eq!(alarm["ts"], "2023-11-14T22:13:50Z");

    // Retained while active: a dashboard that connects now still sees it.
    let mut late = subscribe(port, &topic).await;
    let (_, retained, retain_flag) = next_matching(&mut late, |_, _| true).await;
    assert!(retain_flag);
    assert_eq!(retained, payload);

    // Back to 93: inside the 2-point hysteresis band, nothing; 95 clears it.
    publish_all(
        port,
        &[
            vitals(3, T0 + 40, 80.0, 93.0),
            vitals(3, T0 + 50, 80.0, 95.0),
        ],
    )
    .await;
    let (_, cleared, _) = next_matching(&mut alarms, |t, _| t == topic).await;
    let cleared: serde_json::Value = serde_json::from_slice(&cleared).unwrap();
    assert_eq!(cleared["state"], "cleared");
    let history: Vec<&str> = cleared["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["what"].as_str().unwrap())
        .collect();
    assert_eq!(history, ["raised", "condition-cleared", "cleared"]);
    assert_eq!(
        cleared["evidence"]["value"], 89.0,
        "the evidence reading itself"
    );
    // The cleared state stays retained, with its history: a dashboard that connects now sees
    // that it cleared, and when.
    let mut later = subscribe(port, &topic).await;
    let (_, retained, _) = next_matching(&mut later, |_, _| true).await;
    let retained: serde_json::Value = serde_json::from_slice(&retained).unwrap();
    assert_eq!(retained["state"], "cleared");

    edge.wait_metric("iomt_readings_stored_total", 12.0);
    assert_eq!(
        edge.metric("iomt_alarms_raised_total{priority=\"high\"}"),
        1.0
    );
    assert_eq!(edge.metric("iomt_alarms_cleared_total"), 1.0);
    let data = edge.data.clone();
    assert!(edge.stop().success());

    // The alarm names the reading that raised it: its evidence is in the store.
    let stored = stored_readings(&data);
    let seq = alarm["seq"].as_u64().unwrap();
    let evidence = stored
        .iter()
        .find(|r| r.seq == seq)
        .expect("evidence stored");
    assert_eq!(
        (evidence.metric, evidence.value),
        (Metric::Spo2, Some(89.0))
    );
    assert_eq!(evidence.ts, (T0 + 30) * 1_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_go_to_the_dead_letter_topic_and_good_traffic_continues() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&pipeline(""), &dir.path().join("data"));
    let port = edge.mqtt_port();
    let mut dead = subscribe(port, "edge/deadletter/#").await;

    let oversized = format!(r#"{{"ts":{T0},"hr":70,"pad":"{}"}}"#, "x".repeat(5000));
    publish_all(
        port,
        &[
            vitals(1, T0, 70.0, 97.0),
            ("ward/7/bed/1/vitals".into(), b"{\"ts\":17000".to_vec()),
            (
                "ward/7/bed/1/senml".into(),
                br#"[{"n":"spo2","v":97,"bver":99}]"#.to_vec(),
            ),
            ("ward/7/bed/1/vitals".into(), oversized.into_bytes()),
            (
                "ward/7/bed/1/vitals".into(),
                format!(r#"{{"ts":{T0},"hr":"fast"}}"#).into_bytes(),
            ),
            ("somewhere/else".into(), b"{}".to_vec()),
            vitals(1, T0 + 1, 71.0, 98.0),
        ],
    )
    .await;

    let mut reasons = Vec::new();
    for _ in 0..4 {
        let (topic, payload, _) = next_matching(&mut dead, |_, _| true).await;
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            topic,
            format!("edge/deadletter/{}", v["topic"].as_str().unwrap())
        );
        reasons.push((
            v["codec"].as_str().unwrap().to_owned(),
            v["reason"].as_str().unwrap().to_owned(),
        ));
        match v["reason"].as_str().unwrap() {
            "syntax" => assert_eq!(v["payload_b64"], "eyJ0cyI6MTcwMDA="),
            "oversized" => assert!(v["payload_b64"].is_null()),
            _ => assert!(v["payload_b64"].is_string()),
        }
        assert!(
            !v["detail"].as_str().unwrap().contains("fast"),
            "no payload values in reasons"
        );
    }
    reasons.sort();
    assert_eq!(
        reasons,
        [
            ("json", "bad_type"),
            ("json", "oversized"),
            ("json", "syntax"),
            ("senml-json", "version")
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );

    edge.wait_metric("iomt_readings_stored_total", 4.0);
    let m = edge.metrics();
    assert_eq!(
        metric_value(
            &m,
            "iomt_decode_failures_total{codec=\"json\",reason=\"syntax\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "iomt_decode_failures_total{codec=\"json\",reason=\"bad_type\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "iomt_decode_failures_total{codec=\"senml-json\",reason=\"version\"}"
        ),
        1.0
    );
    assert_eq!(metric_value(&m, "iomt_payloads_oversized_total"), 1.0);
    assert_eq!(metric_value(&m, "iomt_messages_unrouted_total"), 1.0);
    assert_eq!(metric_value(&m, "iomt_dead_letters_total"), 4.0);
    let data = edge.data.clone();
    assert!(edge.stop().success());
    let stored = stored_readings(&data);
    // Exactly the two good messages, two readings each: nothing of a bad one leaked in.
    let values: Vec<_> = stored
        .iter()
        .map(|r| (r.metric.name(), r.value.unwrap()))
        .collect();
    assert_eq!(
        values,
        [
            ("heart_rate", 70.0),
            ("spo2", 97.0),
            ("heart_rate", 71.0),
            ("spo2", 98.0)
        ]
    );
    assert_eq!(
        stored.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [0, 1, 2, 3],
        "failed messages use no seq"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&pipeline(""), &dir.path().join("data"));
    let (code, body) = edge.get("/healthz");
    assert_eq!(code, 200);
    assert!(body.contains("\"status\":\"ok\""));
    let msgs: Vec<_> = (0..50)
        .map(|i| vitals(i % 4, T0 + i as i64, 70.0, 97.0))
        .collect();
    publish_all(edge.mqtt_port(), &msgs).await;
    publish_all(
        edge.mqtt_port(),
        &[(
            "ward/7/bed/1/senml".into(),
            br#"[{"n":"heart_rate","v":900}]"#.to_vec(),
        )],
    )
    .await;
    edge.wait_metric("iomt_readings_stored_total", 101.0);
    let m = edge.metrics();
    assert_eq!(
        metric_value(
            &m,
            "iomt_messages_received_total{route=\"ward/+/bed/+/vitals\"}"
        ),
        50.0
    );
    assert_eq!(
        metric_value(
            &m,
            "iomt_messages_received_total{route=\"ward/+/bed/+/senml\"}"
        ),
        1.0
    );
    assert_eq!(metric_value(&m, "iomt_readings_decoded_total"), 101.0);
    assert!(metric_value(&m, "iomt_batches_sealed_total") >= 1.0);
    assert!(metric_value(&m, "iomt_bytes_stored_total") > 0.0);
    assert!(metric_value(&m, "iomt_store_size_bytes") > 0.0);
    assert_eq!(
        metric_value(&m, "iomt_receive_to_stored_seconds_count"),
        101.0
    );
    assert!(m.contains("iomt_queue_depth{stage=\"commit\"}"));
    assert!(m.contains("iomt_queue_bytes{stage=\"output\"}"));
    assert!(m.contains("iomt_queue_bytes{stage=\"ingest\"}"));
    assert!(m.contains("# TYPE iomt_receive_to_stored_seconds histogram"));
    let data = edge.data.clone();
    assert!(edge.stop().success());
    // The implausible heart rate is kept, flagged.
    let hr900 = stored_readings(&data)
        .into_iter()
        .find(|r| r.value == Some(900.0))
        .unwrap();
    // The pack has no time: its reading takes the receive time, and says so.
    assert_eq!(hr900.flags, flags::OUT_OF_RANGE | flags::TIME_FROM_RECEIPT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_data_and_continues_the_seq() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let edge = Edge::start(&pipeline(""), &data);
    publish_all(edge.mqtt_port(), &[vitals(1, T0, 70.0, 97.0)]).await;
    edge.wait_metric("iomt_readings_stored_total", 2.0);
    assert!(edge.stop().success());
    let first = stored_readings(&data);

    let edge = Edge::start(&pipeline(""), &data);
    publish_all(edge.mqtt_port(), &[vitals(1, T0 + 1, 71.0, 98.0)]).await;
    edge.wait_metric("iomt_readings_stored_total", 2.0);
    assert!(edge.stop().success());
    let all = stored_readings(&data);
    assert_eq!(
        &all[..2],
        &first[..],
        "the first run's batch is still readable, unchanged"
    );
    assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1, 2, 3]);

    // After a crash, seqs go on above everything handed out: never reused.
    let edge = Edge::start(&pipeline(""), &data);
    publish_all(edge.mqtt_port(), &[vitals(1, T0 + 2, 72.0, 99.0)]).await;
    edge.wait_metric("iomt_readings_stored_total", 2.0);
    edge.crash();
    let edge = Edge::start(&pipeline(""), &data);
    publish_all(edge.mqtt_port(), &[vitals(1, T0 + 3, 73.0, 99.0)]).await;
    edge.wait_metric("iomt_readings_stored_total", 2.0);
    assert!(edge.stop().success());
    let all = stored_readings(&data);
    assert_eq!(all.len(), 8);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stores_the_open_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A long batch window, and QoS 0 (nothing waits for an acknowledgement, so nothing cuts the
    // batch early): everything below is still in the open batch when SIGTERM arrives.
    let text = pipeline("")
        .replace("max_age = \"100ms\"", "max_age = \"60s\"")
        .replace("max_rows = 1000", "max_rows = 1000000");
    let edge = Edge::start(&text, &data);
    let msgs: Vec<_> = (0..5000)
        .map(|i| vitals(i % 8, T0 + i as i64, 70.0, 97.0))
        .collect();
    publish_all_qos0(edge.mqtt_port(), &msgs).await;
    edge.wait_metric("iomt_readings_decoded_total", 10_000.0);
    assert_eq!(edge.metric("iomt_readings_stored_total"), 0.0);
    assert!(edge.stop().success(), "exit 0");
    assert_eq!(stored_readings(&data).len(), 10_000);
}

#[test]
fn a_bad_pipeline_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, "site = \"w\"\n[batch]\nmax_rows = \"many\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
        .args(["run", "--pipeline"])
        .arg(&p)
        .arg("--data")
        .arg(dir.path().join("d"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:3:"), "{err}");
    assert!(
        err.contains("max_rows") || err.contains("invalid type"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_client_publishes_through_the_v5_listener() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let edge = Edge::start(&pipeline(""), &data);
    let endpoints: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("endpoints.json")).unwrap())
            .unwrap();
    let v5: std::net::SocketAddr = endpoints["mqtt_v5"].as_str().unwrap().parse().unwrap();
    let (client, mut ev) =
        AsyncClient::new(MqttOptions::new("v5-device", "127.0.0.1", v5.port()), 10);
    let (topic, payload) = vitals(6, T0, 66.0, 96.0);
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_)) =
                ev.poll().await.unwrap()
            {
                break;
            }
        }
    })
    .await
    .expect("PUBACK over MQTT 5");
    edge.wait_metric("iomt_readings_stored_total", 2.0);
    assert!(edge.stop().success());
    let stored = stored_readings(&data);
    assert_eq!(
        stored.iter().map(|r| r.value.unwrap()).collect::<Vec<_>>(),
        [66.0, 96.0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_payload_is_dead_lettered_as_empty_whatever_the_codec() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&pipeline(""), &dir.path().join("data"));
    let port = edge.mqtt_port();
    let mut dead = subscribe(port, "edge/deadletter/#").await;
    publish_all(
        port,
        &[
            ("ward/7/bed/1/vitals".into(), Vec::new()),
            ("ward/7/bed/1/senml".into(), Vec::new()),
            vitals(1, T0, 70.0, 97.0),
        ],
    )
    .await;
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let (_, payload, _) = next_matching(&mut dead, |_, _| true).await;
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        reasons.push(format!("{} {}", v["codec"], v["reason"]));
    }
    reasons.sort();
    assert_eq!(reasons, [r#""json" "empty""#, r#""senml-json" "empty""#]);
    edge.wait_metric("iomt_readings_stored_total", 2.0);
    assert!(edge.stop().success());
}

/// Subjects taken from payloads become alarm topic levels percent-encoded: `ward7/bed3` and
/// `ward7_bed3` are two patients with two alarms, and clearing one leaves the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_from_payloads_get_alarm_topics_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let extra = r#"
[[route]]
topic = "gw/+/obs"
codec = "json"
source = "gw{2}"
[route.json]
ts = "/ts"
subject = "/patient"
[[route.json.reading]]
value = "/spo2"
metric = "spo2"
"#;
    let text = pipeline(extra).replace("for = \"30s\"", "for = \"0s\"");
    let edge = Edge::start(&text, &dir.path().join("data"));
    let port = edge.mqtt_port();
    let mut alarms = subscribe(port, "alarms/#").await;
    let obs = |patient: &str, t: i64, spo2: f64| {
        (
            "gw/1/obs".to_owned(),
            format!(r#"{{"ts":{t},"patient":"{patient}","spo2":{spo2}}}"#).into_bytes(),
        )
    };
    publish_all(
        port,
        &[obs("ward7/bed3", T0, 85.0), obs("ward7_bed3", T0, 86.0)],
    )
    .await;
    let slash = format!("alarms/{SITE}/ward7%2Fbed3/spo2-low");
    let underscore = format!("alarms/{SITE}/ward7_bed3/spo2-low");
    let mut raised = BTreeSet::new();
    while raised.len() < 2 {
        let (t, p, _) = next_matching(&mut alarms, |_, _| true).await;
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["state"], "active");
        raised.insert((t, v["subject"].as_str().unwrap().to_owned()));
    }
    assert_eq!(
        raised,
        BTreeSet::from([
            (slash.clone(), "ward7/bed3".to_owned()),
            (underscore.clone(), "ward7_bed3".to_owned())
        ])
    );
    // Clearing the first leaves the second retained.
    publish_all(port, &[obs("ward7/bed3", T0 + 10, 97.0)]).await;
    let state = |p: &[u8]| serde_json::from_slice::<serde_json::Value>(p).unwrap()["state"].clone();
    let (t, _, _) = next_matching(&mut alarms, |_, p| state(p) == "cleared").await;
    assert_eq!(t, slash);
    let mut late = subscribe(port, "alarms/#").await;
    let mut retained = BTreeSet::new();
    while retained.len() < 2 {
        let (t, p, flag) = next_matching(&mut late, |_, _| true).await;
        assert!(flag);
        retained.insert((t, state(&p).as_str().unwrap().to_owned()));
    }
    assert_eq!(
        retained,
        BTreeSet::from([
            (slash, "cleared".to_owned()),
            (underscore, "active".to_owned())
        ])
    );
    assert!(edge.stop().success());
}

/// Logs at info level and above carry no patient identifier and no payload value: subjects,
/// topics (which name beds and patients), values and client ids stay at debug level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_at_info_carry_no_patient_identifiers_or_values() {
    let dir = tempfile::tempdir().unwrap();
    let extra = r#"
[[route]]
topic = "gw/+/obs"
codec = "json"
source = "gw{2}"
[route.json]
ts = "/ts"
subject = "/patient"
[[route.json.reading]]
value = "/spo2"
metric = "spo2"
"#;
    let text = pipeline(extra).replace("for = \"30s\"", "for = \"0s\"");
    // The default log level of the binary, as an operator runs it.
    let edge = Edge::start_with_env(&text, &dir.path().join("data"), &[("RUST_LOG", "")]);
    let port = edge.mqtt_port();
    let patient = "MRN-4711-Doe";
    publish_all(
        port,
        &[
            // Raises and clears an alarm for the patient.
            (
                "gw/1/obs".into(),
                format!(r#"{{"ts":{T0},"patient":"{patient}","spo2":83.25}}"#).into_bytes(),
            ),
            (
                "gw/1/obs".into(),
                format!(r#"{{"ts":{},"patient":"{patient}","spo2":97.75}}"#, T0 + 5).into_bytes(),
            ),
            // An undecodable payload and an unrouted topic naming the patient.
            (
                "gw/1/obs".into(),
                format!(r#"{{"ts":{T0},"patient":"{patient}","spo2":"83.25"}}"#).into_bytes(),
            ),
            (format!("unrouted/{patient}"), b"{}".to_vec()),
        ],
    )
    .await;
    edge.wait_metric("iomt_alarms_cleared_total", 1.0);
    edge.wait_metric("iomt_dead_letters_total", 1.0);
    let log = edge.log();
    assert!(edge.stop().success());
    assert!(
        log.contains("alarm changed"),
        "the events were logged:\n{log}"
    );
    for secret in [patient, "83.25", "97.75"] {
        assert!(!log.contains(secret), "`{secret}` in the log:\n{log}");
    }
}
