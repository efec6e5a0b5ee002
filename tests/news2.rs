//! NEWS2 scores over MQTT, black box: the real binary, a real client. A subject's score is
//! published retained on `news2/<site>/<subject>` each time it changes, naming the reading
//! behind each parameter; flagged readings never move it; nobody else may publish there.

mod common;

use common::*;

const T0: i64 = 1_700_000_000;

fn total(payload: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(payload).ok()?["total"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subjects_score_is_published_retained_with_its_evidence() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&pipeline(""), &dir.path().join("data"));
    let port = edge.mqtt_port();
    let mut scores = subscribe(port, "news2/#").await;
    let topic = format!("news2/{SITE}/w7-b3");

    // Pulse 120 (2) and SpO2 91 (3): 5, medium, partial (five parameters not seen).
    publish_all(port, &[vitals(3, T0, 120.0, 91.0)]).await;
    let (_, payload, _) =
        next_matching(&mut scores, |t, p| t == topic && total(p) == Some(5)).await;
    let s: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(s["band"], "medium");
    assert_eq!(s["partial"], true);
    assert_eq!(s["scale"], 1);
    assert_eq!(s["parameters"]["spo2"]["score"], 3);
    assert_eq!(s["parameters"]["spo2"]["value"], 91.0);
    assert_eq!(s["parameters"]["pulse"]["score"], 2);
    assert!(s["missing"]
        .as_array()
        .unwrap()
        .contains(&"resp_rate".into()));
    assert_eq!(s["time"], "2023-11-14T22:13:20Z");
    let spo2_seq = s["parameters"]["spo2"]["seq"].as_u64().unwrap();

    // Better: SpO2 97 brings the total to 2, low.
    publish_all(port, &[vitals(3, T0 + 60, 120.0, 97.0)]).await;
    let (_, payload, _) =
        next_matching(&mut scores, |t, p| t == topic && total(p) == Some(2)).await;
    let s: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(s["band"], "low");

    // Retained: a dashboard that connects now sees the latest score.
    let mut late = subscribe(port, &topic).await;
    let (_, retained, retain_flag) = next_matching(&mut late, |_, _| true).await;
    assert!(retain_flag);
    assert_eq!(retained, payload);

    // A client cannot plant a score: the topic is the service's own, refused and counted, and
    // the retained score stays the service's.
    publish_all(port, &[(topic.clone(), br#"{"total":0}"#.to_vec())]).await;
    edge.wait_metric("iomt_topics_refused_total{reason=\"reserved\"}", 1.0);
    let mut later = subscribe(port, &topic).await;
    let (_, retained, _) = next_matching(&mut later, |_, _| true).await;
    assert_eq!(retained, payload);
    assert!(edge.stop().success());

    // The evidence named is the stored reading.
    let stored = stored_readings(&dir.path().join("data"));
    let r = stored.iter().find(|r| r.seq == spo2_seq).unwrap();
    assert_eq!((r.metric.name(), r.value), ("spo2", Some(91.0)));
}

/// The shipped ward pipeline scores NEWS2 out of the box: one SenML pack with every input
/// gives a whole (not partial) score.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ward_pipeline_scores_a_whole_news2_from_one_senml_pack() {
    let dir = tempfile::tempdir().unwrap();
    let text = on_free_ports(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/ward.toml"))
            .unwrap(),
        "ward",
    );
    let edge = Edge::start(&text, &dir.path().join("data"));
    let port = edge.mqtt_port();
    let mut scores = subscribe(port, "news2/#").await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // SenML's "/" is a ratio: 0.93 is 93 %.
    let pack = format!(
        r#"[{{"bn":"urn:dev:patch:3:","bt":{now},"n":"temp","u":"Cel","v":38.6}},{{"n":"hr","u":"/min","v":112}},{{"n":"rr","u":"/min","v":23}},{{"n":"spo2","u":"/","v":0.93}},{{"n":"sys","u":"mm[Hg]","v":98}},{{"n":"avpu","vs":"A"}},{{"n":"o2flow","u":"L/min","v":2}}]"#
    );
    publish_all(
        port,
        &[("ward/7/bed/3/senml".to_owned(), pack.into_bytes())],
    )
    .await;
    let topic = format!("news2/{SITE}/ward7-bed3");
    let (_, payload, _) = next_matching(&mut scores, |t, p| {
        t == topic
            && serde_json::from_slice::<serde_json::Value>(p).is_ok_and(|v| v["partial"] == false)
    })
    .await;
    let s: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    // temp 1, pulse 2, resp 2, SpO2 2, systolic 2, alert 0, oxygen 2.
    assert_eq!(s["total"], 11, "{s}");
    assert_eq!(s["band"], "high");
    assert_eq!(s["parameters"]["consciousness"]["value"], "A");
    assert_eq!(s["parameters"]["air_or_oxygen"]["value"], "oxygen");
    assert!(s["missing"].as_array().unwrap().is_empty());
    assert!(edge.stop().success());
}
