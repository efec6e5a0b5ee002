//! The shipped demo fixture, replayed by the real `replay` command through the running service
//! with the demo ward pipeline: every reading stored, the deteriorating patient's alarms raised;
//! and what `replay` says when the broker is unreachable or fails midway.

mod common;

use std::process::Command;

use common::*;
use iomt_edge::replay::load_fixture;

fn pipeline_file(name: &str) -> String {
    std::fs::read_to_string(format!("{}/pipelines/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The pipeline the README replays the demo into, on free ports.
fn demo_pipeline_on_free_ports() -> String {
    on_free_ports(&pipeline_file("ward-demo.toml"), "ward")
}

/// A pipeline file's settings: its lines without comments and blank lines.
fn settings(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split(" #").next().unwrap().trim_end())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_demo_pipeline_is_the_ward_pipeline_but_for_its_clock_window() {
    let ward = settings(&pipeline_file("ward.toml"));
    let demo = settings(&pipeline_file("ward-demo.toml"));
    let differ = |a: &[String], b: &[String]| -> Vec<String> {
        a.iter().filter(|l| !b.contains(l)).cloned().collect()
    };
    assert_eq!(differ(&ward, &demo), ["clock_max_past = \"24h\""]);
    assert_eq!(differ(&demo, &ward), ["clock_max_past = \"100years\""]);
    assert_eq!(ward.len(), demo.len());
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
    assert!(messages.len() > 400 && expected > 1200);

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let edge = Edge::start(&demo_pipeline_on_free_ports(), &data);
    let mut alarms = subscribe(edge.mqtt_port(), "alarms/#").await;
    let mut commands = subscribe(edge.mqtt_port(), "ward/cmd/#").await;
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

    // The deteriorating patient raises every alarm of the ward pipeline (fixtures/README.md,
    // README.md), each once; the recovering patient's NEWS2 alarm is raised and cleared; no
    // other bed raises any.
    edge.wait_metric("iomt_readings_stored_total", expected as f64);
    edge.wait_metric("iomt_alarm_transitions_total{what=\"cleared\"}", 1.0);
    // Anything raised besides arrives by now: ingest raised it before the last batch was stored.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut seen: std::collections::BTreeMap<String, Vec<(String, f64)>> = Default::default();
    while let Ok((topic, payload, _)) = alarms.try_recv() {
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        seen.entry(topic).or_default().push((
            v["state"].as_str().unwrap().to_owned(),
            v["value"].as_f64().unwrap(),
        ));
    }
    let mut want: Vec<(String, Vec<&str>)> = [
        "spo2-low",
        "hr-high",
        "rr-high",
        "temp-high",
        "sys-low",
        "news2-urgent",
    ]
    .iter()
    .map(|rule| (format!("alarms/{SITE}/ward4-bed3/{rule}"), vec!["active"]))
    .collect();
    want.push((
        format!("alarms/{SITE}/ward4-bed5/news2-urgent"),
        vec!["active", "cleared"],
    ));
    want.sort();
    let got: Vec<(String, Vec<&str>)> = seen
        .iter()
        .map(|(t, v)| (t.clone(), v.iter().map(|(s, _)| s.as_str()).collect()))
        .collect();
    assert_eq!(got, want);
    for (topic, states) in &seen {
        let value = states[0].1;
        let rule = topic.rsplit('/').next().unwrap();
        let breached = match rule {
            "spo2-low" => value < 92.0,
            "hr-high" => value > 130.0,
            "rr-high" => value > 24.0,
            "temp-high" => value > 39.0,
            "sys-low" => value < 90.0,
            "news2-urgent" => value >= 5.0,
            _ => false,
        };
        assert!(breached, "{topic} raised by {value}");
    }

    // Adaptive monitoring: the deteriorating patient's devices are asked to sample faster, the
    // recovering patient's to sample faster (the band is medium when the recording starts) and
    // then, three calm minutes later, to relax; nobody else's.
    let mut asked: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    while let Ok((topic, payload, _)) = commands.try_recv() {
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        asked
            .entry(topic)
            .or_default()
            .push(v["interval_s"].as_u64().unwrap());
    }
    let cmd = |source: &str| format!("ward/cmd/{source}/sampling");
    let want_commands = std::collections::BTreeMap::from([
        (cmd("ward4-bed3-monitor"), vec![5]),
        (cmd("ward4-bed3-sensor"), vec![5]),
        (cmd("ward4-bed5-monitor"), vec![5, 30]),
        // Bed 5's thermometer was not heard yet when its first monitor message raised the
        // band: a device is asked once the service knows it.
        (cmd("ward4-bed5-sensor"), vec![30]),
    ]);
    assert_eq!(asked, want_commands);
    // And the recording shows the devices doing as asked: bed 3's monitor samples every 30 s,
    // then every 5 s; bed 5's the other way round.
    let gaps = |bed: u32| -> Vec<i64> {
        let t: Vec<i64> = messages
            .iter()
            .filter(|m| m.topic == format!("ward/4/bed/{bed}/vitals"))
            .map(|m| m.t_ms as i64 / 1000)
            .collect();
        let mut g: Vec<i64> = t.windows(2).map(|w| w[1] - w[0]).collect();
        g.dedup();
        g
    };
    assert_eq!(gaps(3), [30, 5]);
    assert_eq!(gaps(5), [5, 30]);

    let m = edge.metrics();
    assert_eq!(
        metric_value(
            &m,
            "iomt_decode_failures_total{codec=\"json\",reason=\"syntax\"}"
        ),
        0.0
    );
    for (priority, n) in [("high", 2.0), ("medium", 4.0), ("low", 1.0)] {
        assert_eq!(
            metric_value(
                &m,
                &format!("iomt_alarms_raised_total{{priority=\"{priority}\"}}")
            ),
            n,
            "{priority}"
        );
    }
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

fn replay_to(fixture: &std::path::Path, broker: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
        .arg("replay")
        .arg(fixture)
        .args(["--speed", "max", "--broker", broker])
        .output()
        .unwrap()
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn an_unreachable_broker_is_said_plainly_and_nothing_is_counted() {
    let port = closed_port();
    let broker = format!("mqtt://127.0.0.1:{port}");
    // More messages than the client queues (1024), which once read as "failed after 1024".
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/ward-demo.jsonl");
    let out = replay_to(std::path::Path::new(fixture), &broker);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("error: cannot connect to {broker}: connection refused; nothing was published\n")
    );
}

/// Reads one MQTT packet: its first byte and its body.
fn read_packet(s: &mut std::net::TcpStream) -> Option<(u8, Vec<u8>)> {
    use std::io::Read;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).ok()?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut l = [0u8; 1];
        s.read_exact(&mut l).ok()?;
        len |= ((l[0] & 0x7f) as usize) << shift;
        shift += 7;
        if l[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((b[0], body))
}

/// A broker that accepts one client, acknowledges its first `acks` QoS 1 publishes, then
/// closes the connection (and reads on until the client goes).
fn broker_that_fails_after(acks: usize) -> (u16, std::thread::JoinHandle<()>) {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut acked = 0;
        while let Some((first, body)) = read_packet(&mut s) {
            match first >> 4 {
                1 => s.write_all(&[0x20, 0x02, 0x00, 0x00]).unwrap(), // CONNECT → CONNACK
                3 if acked < acks => {
                    let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
                    let pkid = &body[2 + topic_len..4 + topic_len];
                    s.write_all(&[0x40, 0x02, pkid[0], pkid[1]]).unwrap(); // PUBACK
                    acked += 1;
                    if acked == acks {
                        s.shutdown(std::net::Shutdown::Write).unwrap();
                    }
                }
                _ => {}
            }
        }
    });
    (port, handle)
}

#[test]
fn a_broken_connection_counts_only_what_the_broker_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = dir.path().join("ten.jsonl");
    let lines: Vec<String> = (0..10)
        .map(|i| format!(r#"{{"t_ms":{i},"topic":"ward/4/bed/1/vitals","payload":{{"hr":70}}}}"#))
        .collect();
    std::fs::write(&fixture, lines.join("\n")).unwrap();
    let (port, broker) = broker_that_fails_after(3);
    let out = replay_to(&fixture, &format!("mqtt://127.0.0.1:{port}"));
    broker.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: the broker connection failed after 3 messages were delivered: "),
        "{err}"
    );
}
