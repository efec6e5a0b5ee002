//! The embedded broker as devices and dashboards see it: the real binary on port 0, spoken to by
//! hand (to watch every acknowledgement and to send what client libraries refuse to send), by
//! rumqttc, and by mosquitto's own clients.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::raw::{self, ack_pkid, handshake, publish_packet, read_packet};
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const T0: i64 = 1_700_000_000;

async fn raw_client(edge: &Edge, version: u8) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", edge.mqtt_port()))
        .await
        .unwrap();
    handshake(&mut s, &format!("raw-{}", rand::random::<u32>()), version)
        .await
        .unwrap();
    s
}

async fn raw_client_named(edge: &Edge, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", edge.mqtt_port()))
        .await
        .unwrap();
    handshake(&mut s, id, 4).await.unwrap();
    s
}

fn vitals_payload(ts: i64, hr: f64) -> Vec<u8> {
    format!(r#"{{"ts":{ts},"hr":{hr}}}"#).into_bytes()
}

/// Reads packets until one of type `kind` (high nibble) arrives, within 10 s.
async fn expect(s: &mut TcpStream, kind: u8) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut body = Vec::new();
        loop {
            let t = read_packet(s, &mut body).await.expect("connection open");
            if t >> 4 == kind {
                return body;
            }
        }
    })
    .await
    .expect("packet arrived")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puback_arrives_only_once_the_reading_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    // A batch window far longer than the test: only an acknowledgement waiting cuts it.
    let text = pipeline("").replace("max_age = \"100ms\"", "max_age = \"60s\"");
    let edge = Edge::start(&text, &dir.path().join("data"));
    let mut s = raw_client(&edge, 4).await;
    for i in 1..=20u16 {
        let mut p = Vec::new();
        let payload = vitals_payload(T0 + i64::from(i), 70.0);
        publish_packet(b"ward/7/bed/1/vitals", 1, i, &payload, 4, &mut p);
        s.write_all(&p).await.unwrap();
        let ack = expect(&mut s, 4).await;
        assert_eq!(ack_pkid(&ack), i);
        // Read after the PUBACK arrived: the reading is already counted as stored.
        assert_eq!(
            edge.metric("iomt_readings_stored_total"),
            f64::from(i),
            "PUBACK {i} came before its reading was stored"
        );
    }
    // Counted just after the acknowledgements are handed over: it may trail the last PUBACK.
    edge.wait_metric("iomt_acks_sent_total", 20.0);
    assert_eq!(edge.metric("iomt_acks_sent_total"), 20.0);
    assert!(edge.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_and_5_share_one_port() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let edge = Edge::start(&pipeline(""), &data);
    let (client, mut ev) = AsyncClient::new(
        MqttOptions::new("v5-on-main-port", "127.0.0.1", edge.mqtt_port()),
        10,
    );
    let (topic, payload) = vitals(6, T0, 66.0, 96.0);
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
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
    publish_all(edge.mqtt_port(), &[vitals(6, T0 + 1, 67.0, 97.0)]).await;
    assert!(edge.stop().success());
    let values: Vec<f64> = stored_readings(&data)
        .iter()
        .map(|r| r.value.unwrap())
        .collect();
    assert_eq!(values, [66.0, 96.0, 67.0, 97.0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_names_with_wildcards_or_nul_are_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let edge = Edge::start(&pipeline(""), &data);

    // MQTT 3.1.1: the server closes the connection (§4.7.3).
    let mut s = raw_client(&edge, 4).await;
    let mut p = Vec::new();
    publish_packet(
        b"ward/7/bed/+/vitals",
        1,
        1,
        &vitals_payload(T0, 70.0),
        4,
        &mut p,
    );
    s.write_all(&p).await.unwrap();
    let mut body = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), read_packet(&mut s, &mut body))
        .await
        .expect("answered");
    assert!(closed.is_err(), "no PUBACK: the connection is closed");

    // MQTT 5: that one message is refused (PUBACK reason 0x90), the connection stays.
    let mut s = raw_client(&edge, 5).await;
    let mut p = Vec::new();
    publish_packet(
        b"ward/7/bed/\0/vitals",
        1,
        7,
        &vitals_payload(T0, 70.0),
        5,
        &mut p,
    );
    publish_packet(
        b"ward/7/bed/2/vitals",
        1,
        8,
        &vitals_payload(T0, 71.0),
        5,
        &mut p,
    );
    s.write_all(&p).await.unwrap();
    let refused = expect(&mut s, 4).await;
    assert_eq!((ack_pkid(&refused), refused.get(2)), (7, Some(&0x90)));
    let accepted = expect(&mut s, 4).await;
    assert_eq!(ack_pkid(&accepted), 8);

    let m = edge.metrics();
    assert_eq!(
        metric_value(&m, "iomt_topics_refused_total{reason=\"wildcard\"}"),
        1.0
    );
    assert_eq!(
        metric_value(&m, "iomt_topics_refused_total{reason=\"nul\"}"),
        1.0
    );
    assert!(edge.stop().success());
    let stored = stored_readings(&data);
    assert_eq!(stored.len(), 1, "only the valid message");
    assert_eq!(stored[0].subject.as_deref(), Some("w7-b2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_publish_is_dead_lettered_and_acknowledged_and_the_connection_stays() {
    let dir = tempfile::tempdir().unwrap();
    let text = pipeline("").replace("[broker]\n", "[broker]\nmax_packet_bytes = 2048\n");
    let edge = Edge::start(&text, &dir.path().join("data"));
    let mut dead = subscribe(edge.mqtt_port(), "edge/deadletter/#").await;
    let mut s = raw_client(&edge, 4).await;
    let big = format!(r#"{{"ts":{T0},"hr":70,"pad":"{}"}}"#, "x".repeat(100_000));
    let mut p = Vec::new();
    publish_packet(b"ward/7/bed/1/vitals", 1, 1, big.as_bytes(), 4, &mut p);
    publish_packet(
        b"ward/7/bed/1/vitals",
        1,
        2,
        &vitals_payload(T0 + 1, 72.0),
        4,
        &mut p,
    );
    s.write_all(&p).await.unwrap();
    assert_eq!(ack_pkid(&expect(&mut s, 4).await), 1, "acknowledged");
    assert_eq!(ack_pkid(&expect(&mut s, 4).await), 2, "same connection");
    let (topic, payload, _) = next_matching(&mut dead, |_, _| true).await;
    assert_eq!(topic, "edge/deadletter/ward/7/bed/1/vitals");
    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v["reason"], "oversized");
    assert!(v["payload_b64"].is_null());
    edge.wait_metric("iomt_readings_stored_total", 1.0);
    assert_eq!(edge.metric("iomt_payloads_oversized_total"), 1.0);
    assert!(edge.stop().success());
}

#[test]
fn a_port_another_process_holds_is_an_error_at_start() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.toml");
    let text = pipeline("").replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
        1,
    );
    std::fs::write(&p, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
        .args(["run", "--pipeline"])
        .arg(&p)
        .arg("--data")
        .arg(dir.path().join("d"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(!dir.path().join("d/endpoints.json").exists(), "never ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_get_device_messages_retained_messages_and_wills() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&pipeline(""), &dir.path().join("data"));
    let port = edge.mqtt_port();
    let mut raw_feed = subscribe(port, "ward/+/bed/+/vitals").await;
    publish_all(port, &[vitals(2, T0, 70.0, 97.0)]).await;
    let (topic, payload, _) = next_matching(&mut raw_feed, |_, _| true).await;
    assert_eq!(topic, "ward/7/bed/2/vitals");
    assert_eq!(payload, vitals(2, T0, 70.0, 97.0).1);

    // A retained message (say, a subject's configuration) reaches later subscribers.
    let (client, mut ev) = client(port, "configurer");
    let poll = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    client
        .publish(
            "config/ward/w7-b2",
            rumqttc::QoS::AtLeastOnce,
            true,
            b"{\"spo2_scale\":2}".to_vec(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut late = subscribe(port, "config/#").await;
    let (topic, payload, retained) = next_matching(&mut late, |_, _| true).await;
    assert_eq!(
        (topic.as_str(), payload.as_slice(), retained),
        ("config/ward/w7-b2", &b"{\"spo2_scale\":2}"[..], true)
    );
    poll.abort();

    // A device whose connection drops without DISCONNECT gets its will published.
    let mut wills = subscribe(port, "status/#").await;
    let mut opts = rumqttc::MqttOptions::new("bed-9-monitor", "127.0.0.1", port);
    opts.set_last_will(rumqttc::LastWill::new(
        "status/bed-9",
        "offline",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let (_c, mut ev) = rumqttc::AsyncClient::new(opts, 10);
    let conn = tokio::spawn(async move {
        loop {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) = ev.poll().await {
                // Keep polling until aborted.
                while ev.poll().await.is_ok() {}
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.abort();
    let (topic, payload, _) = next_matching(&mut wills, |_, _| true).await;
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("status/bed-9", &b"offline"[..])
    );
    assert!(edge.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_interoperate_at_every_qos() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let edge = Edge::start(&pipeline(""), &data);
    let port = edge.mqtt_port().to_string();
    for (qos, hr) in [("0", 60), ("1", 61), ("2", 62)] {
        let out = std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-q", qos, "-t"])
            .arg("ward/7/bed/5/vitals")
            .arg("-m")
            .arg(format!(r#"{{"ts":{T0},"hr":{hr}}}"#))
            .output()
            .expect("mosquitto_pub is installed (scripts/test.sh installs mosquitto-clients)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // MQTT 5 too.
    let out = std::process::Command::new("mosquitto_pub")
        .args([
            "-V",
            "mqttv5",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
            "-t",
        ])
        .arg("ward/7/bed/5/vitals")
        .arg("-m")
        .arg(format!(r#"{{"ts":{T0},"hr":63}}"#))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    edge.wait_metric("iomt_readings_stored_total", 4.0);
    assert!(edge.stop().success());
    let mut hr: Vec<f64> = stored_readings(&data)
        .iter()
        .map(|r| r.value.unwrap())
        .collect();
    hr.sort_by(f64::total_cmp);
    assert_eq!(hr, [60.0, 61.0, 62.0, 63.0], "QoS 2 stored exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_clients_publish_like_tcp_ones() {
    use async_tungstenite::tungstenite::client::IntoClientRequest;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let edge = Edge::start(&pipeline(""), &data);
    let endpoints: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("endpoints.json")).unwrap())
            .unwrap();
    let ws: std::net::SocketAddr = endpoints["ws"].as_str().unwrap().parse().unwrap();
    let tcp = TcpStream::connect(ws).await.unwrap();
    let mut req = format!("ws://{ws}/mqtt").into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    let (stream, resp) = async_tungstenite::tokio::client_async(req, tcp)
        .await
        .unwrap();
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "mqtt"
    );
    let mut s = ws_stream_tungstenite::WsStream::new(stream);
    handshake(&mut s, "ws-device", 4).await.unwrap();
    let mut p = Vec::new();
    publish_packet(
        b"ward/7/bed/8/vitals",
        1,
        3,
        &vitals_payload(T0, 88.0),
        4,
        &mut p,
    );
    s.write_all(&p).await.unwrap();
    s.flush().await.unwrap();
    let mut body = Vec::new();
    let t = tokio::time::timeout(Duration::from_secs(10), read_packet(&mut s, &mut body))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((t >> 4, ack_pkid(&body)), (4, 3));
    assert!(edge.stop().success());
    let stored = stored_readings(&data);
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].value, Some(88.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_closes_the_listeners_first_and_answers_mqtt5_clients_why() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&pipeline(""), &dir.path().join("data"));
    let port = edge.mqtt_port();
    let mut v5 = raw_client(&edge, 5).await;
    let pid = edge.child.id();
    let exit = tokio::task::spawn_blocking(move || edge.stop());
    // The MQTT 5 client is told: DISCONNECT, reason 0x8B (server shutting down).
    let d = expect(&mut v5, 14).await;
    assert_eq!(d.first(), Some(&0x8B));
    assert!(exit.await.unwrap().success(), "pid {pid} exited 0");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).await.is_err(),
        "the listener is closed"
    );
}

/// A topic whose first character is not ASCII once killed rumqttd's router (its topic matching
/// slices the first byte). Such a message is still ingested; the broker goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_ascii_topic_cannot_take_the_broker_down() {
    let dir = tempfile::tempdir().unwrap();
    let extra = r#"
[[route]]
topic = "+/obs"
codec = "json"
source = "{1}"
[route.json]
ts = "/ts"
[[route.json.reading]]
value = "/hr"
metric = "heart_rate"
"#;
    let data = dir.path().join("data");
    let edge = Edge::start(&pipeline(extra), &data);
    let port = edge.mqtt_port();
    // A subscriber to everything makes every publish go to the router.
    let mut all = subscribe(port, "#").await;
    let mut s = raw_client(&edge, 4).await;
    let mut p = Vec::new();
    publish_packet(
        "é/obs".as_bytes(),
        1,
        1,
        &vitals_payload(T0, 61.0),
        4,
        &mut p,
    );
    s.write_all(&p).await.unwrap();
    assert_eq!(ack_pkid(&expect(&mut s, 4).await), 1);
    // Still a broker: the subscriber gets the next message, a new client connects.
    publish_all(port, &[vitals(1, T0, 70.0, 97.0)]).await;
    let (t, _, _) = next_matching(&mut all, |t, _| t.starts_with("ward/")).await;
    assert_eq!(t, "ward/7/bed/1/vitals");
    let _late = raw_client(&edge, 5).await;
    assert_eq!(edge.health().0, 200);
    assert!(edge.stop().success());
    let sources: Vec<String> = stored_readings(&data)
        .into_iter()
        .map(|r| r.source)
        .collect();
    assert!(sources.contains(&"é".to_owned()), "{sources:?}");
}

/// Clients cannot plant or clear this service's alarms (or dead letters): publishes and wills
/// on its own topics are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cannot_publish_on_the_services_own_topics() {
    let dir = tempfile::tempdir().unwrap();
    let text = pipeline("").replace("for = \"30s\"", "for = \"0s\"");
    let edge = Edge::start(&text, &dir.path().join("data"));
    let port = edge.mqtt_port();
    publish_all(port, &[vitals(3, T0, 70.0, 85.0)]).await;
    let alarm = format!("alarms/{SITE}/w7-b3/spo2-low");
    let mut watch = subscribe(port, &alarm).await;
    let (_, real, _) = next_matching(&mut watch, |_, p| !p.is_empty()).await;

    // MQTT 3.1.1: an empty retained message that would clear it is acknowledged and dropped.
    let mut s = raw_client(&edge, 4).await;
    let mut p = vec![0x33]; // PUBLISH, QoS 1, retain
    raw::remaining_length(2 + alarm.len() + 2, &mut p);
    p.extend_from_slice(&(alarm.len() as u16).to_be_bytes());
    p.extend_from_slice(alarm.as_bytes());
    p.extend_from_slice(&9u16.to_be_bytes());
    s.write_all(&p).await.unwrap();
    assert_eq!(ack_pkid(&expect(&mut s, 4).await), 9);
    // MQTT 5: refused, reason 0x87 (not authorized).
    let mut s5 = raw_client(&edge, 5).await;
    let mut p = Vec::new();
    publish_packet(b"edge/deadletter/fake", 1, 4, b"{}", 5, &mut p);
    s5.write_all(&p).await.unwrap();
    let ack = expect(&mut s5, 4).await;
    assert_eq!((ack_pkid(&ack), ack.get(2)), (4, Some(&0x87)));

    // The real alarm is still retained, unchanged.
    let mut late = subscribe(port, &alarm).await;
    let (_, retained, flag) = next_matching(&mut late, |_, _| true).await;
    assert!(flag);
    assert_eq!(retained, real);
    assert_eq!(
        edge.metric("iomt_topics_refused_total{reason=\"reserved\"}"),
        2.0
    );
    assert!(edge.stop().success());
}

/// An MQTT 5 publisher's message (with properties) reaches an MQTT 3.1.1 subscriber, and keeps
/// reaching it: properties are dropped for 3.1.1 instead of wedging its deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_messages_reach_mqtt3_subscribers() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS;
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&pipeline(""), &dir.path().join("data"));
    let port = edge.mqtt_port();
    let mut feed = subscribe(port, "ward/#").await;
    let (client, mut ev) = rumqttc::v5::AsyncClient::new(
        rumqttc::v5::MqttOptions::new("v5-publisher", "127.0.0.1", port),
        300,
    );
    let poll = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    let props = PublishProperties {
        content_type: Some("application/json".into()),
        user_properties: vec![("device".into(), "bed-7".into())],
        ..Default::default()
    };
    // More than rumqttd's 100 unacknowledged deliveries: a wedged subscriber would stop early.
    for i in 0..150 {
        let (topic, payload) = vitals(7, T0 + i, 70.0, 97.0);
        client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, props.clone())
            .await
            .unwrap();
    }
    for i in 0..150 {
        let (_, payload, _) = next_matching(&mut feed, |_, _| true).await;
        assert_eq!(payload, vitals(7, T0 + i, 70.0, 97.0).1);
    }
    poll.abort();
    assert!(edge.stop().success());
}

/// A dashboard whose client id is reused (a reconnect that takes its session over) keeps
/// getting device messages: the old connection's end does not erase the new one's subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_over_session_keeps_its_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&pipeline(""), &dir.path().join("data"));
    let mut first = raw_client_named(&edge, "dashboard").await;
    first
        .write_all(&raw::subscribe_packet("ward/#", 1))
        .await
        .unwrap();
    expect(&mut first, 9).await;
    let mut second = raw_client_named(&edge, "dashboard").await;
    second
        .write_all(&raw::subscribe_packet("ward/#", 1))
        .await
        .unwrap();
    expect(&mut second, 9).await;
    // The first connection is closed by the takeover.
    let mut body = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if read_packet(&mut first, &mut body).await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the old connection ends");
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish_all(edge.mqtt_port(), &[vitals(2, T0, 70.0, 97.0)]).await;
    let delivery = expect(&mut second, 3).await;
    assert!(delivery.windows(5).any(|w| w == b"ward/"));
    assert!(edge.stop().success());
}

/// QoS 2 is exactly-once within a connection: a PUBLISH sent again with DUP before its PUBREL
/// is not stored twice, and the flow ends with PUBCOMP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_qos2_publish_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let edge = Edge::start(&pipeline(""), &data);
    let mut s = raw_client(&edge, 4).await;
    let mut p = Vec::new();
    publish_packet(
        b"ward/7/bed/6/vitals",
        2,
        11,
        &vitals_payload(T0, 77.0),
        4,
        &mut p,
    );
    let mut dup = p.clone();
    dup[0] |= 0b1000; // DUP
    s.write_all(&p).await.unwrap();
    s.write_all(&dup).await.unwrap();
    assert_eq!(ack_pkid(&expect(&mut s, 5).await), 11, "PUBREC");
    s.write_all(&[0x62, 2, 0, 11]).await.unwrap(); // PUBREL
    assert_eq!(ack_pkid(&expect(&mut s, 7).await), 11, "PUBCOMP");
    assert!(edge.stop().success());
    let stored = stored_readings(&data);
    assert_eq!(stored.len(), 1, "stored once");
}

/// A client that sends without ever reading cannot make the broker take in (and queue
/// acknowledgements and deliveries for) more and more: once its writer is stuck and far
/// behind, its connection stops being read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_not_read_without_end() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&pipeline(""), &dir.path().join("data"));
    let mut s = raw_client(&edge, 4).await;
    // It subscribes to its own messages, so what it does not read piles up fast (kernel
    // buffers take megabytes before a write blocks).
    let mut sub = raw::subscribe_packet("ward/#", 1);
    let last = sub.len() - 1;
    sub[last] = 0; // QoS 0
    s.write_all(&sub).await.unwrap();
    let writer = tokio::spawn(async move {
        let mut p = Vec::new();
        let padding = "x".repeat(200);
        for i in 0..400_000u32 {
            p.clear();
            let pkid = (i % 65_535) as u16 + 1;
            let payload = format!(r#"{{"ts":1700000000,"hr":70,"pad":"{padding}"}}"#);
            publish_packet(
                b"ward/7/bed/1/vitals",
                1,
                pkid,
                payload.as_bytes(),
                4,
                &mut p,
            );
            if s.write_all(&p).await.is_err() {
                break;
            }
        }
        s
    });
    let sample = "iomt_messages_received_total{route=\"ward/+/bed/+/vitals\"}";
    let mut last = -1.0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = edge.metric(sample);
        if now == last {
            break;
        }
        last = now;
        assert!(
            tokio::time::Instant::now() < deadline,
            "still reading after 60 s ({now} messages)"
        );
    }
    assert!(
        last < 400_000.0,
        "the connection stopped being read before the client stopped sending ({last})"
    );
    assert!(!writer.is_finished(), "the client is still trying to send");
    writer.abort();
    assert!(edge.stop().success());
}

/// A stop does not wait for clients that connected and never sent CONNECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_does_not_wait_for_idle_connections() {
    let dir = tempfile::tempdir().unwrap();
    let text = pipeline("").replacen("[broker]\n", "stop_timeout = \"3s\"\n[broker]\n", 1);
    let edge = Edge::start(&text, &dir.path().join("data"));
    let _idle = TcpStream::connect(("127.0.0.1", edge.mqtt_port()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, took) = tokio::task::spawn_blocking(move || edge.stop_timed())
        .await
        .unwrap();
    assert!(status.success(), "a clean stop");
    assert!(took < Duration::from_secs(2), "stopped in {took:?}");
}
