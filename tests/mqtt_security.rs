//! The embedded broker opened to a ward network, black box: per-device passwords (made with
//! `iomt-edge credentials add`), identities that hold a device to its own topics, operators,
//! sessions kept apart per account, and the limits that keep one device from hurting the rest.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::security::*;
use common::*;
use iomt_edge::model::reading::Metric;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use tokio::sync::mpsc;

/// A credentials file with these accounts, in `dir`.
fn accounts(dir: &Path, list: &[(&str, &str)]) -> PathBuf {
    let file = dir.join("credentials");
    for (name, password) in list {
        add_account(&file, name, password);
    }
    file
}

fn secured_pipeline(credentials: &Path, broker_extra: &str, extra: &str) -> String {
    pipeline_with_broker(
        &format!(
            "auth.credentials = {:?}\nauth.operators = [\"nurse\"]\n\
             auth.device_subscribe = [\"ward/cmd/{{identity}}/#\"]\n{broker_extra}",
            credentials.display().to_string()
        ),
        extra,
    )
}

/// What a v5 client saw.
#[derive(Debug)]
enum Seen {
    Connected,
    Refused(ConnectReturnCode),
    PubAck(PubAckReason),
    SubAck(Vec<SubscribeReasonCode>),
    Message(String),
    Closed,
}

struct Client {
    mqtt: AsyncClient,
    seen: mpsc::UnboundedReceiver<Seen>,
}

impl Client {
    fn options(port: u16, id: &str, login: Option<(&str, &str)>) -> MqttOptions {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_outgoing_inflight_upper_limit(100);
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
        }
        opts
    }

    fn start(opts: MqttOptions) -> Client {
        let (mqtt, mut ev) = AsyncClient::new(opts, 1000);
        let (tx, seen) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let s = match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Seen::Connected,
                    Ok(Event::Incoming(Packet::PubAck(a))) => Seen::PubAck(a.reason),
                    Ok(Event::Incoming(Packet::SubAck(a))) => Seen::SubAck(a.return_codes),
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        Seen::Message(String::from_utf8_lossy(&p.topic).into_owned())
                    }
                    Ok(_) => continue,
                    Err(ConnectionError::ConnectionRefused(code)) => {
                        let _ = tx.send(Seen::Refused(code));
                        return;
                    }
                    Err(_) => {
                        let _ = tx.send(Seen::Closed);
                        return;
                    }
                };
                if tx.send(s).is_err() {
                    return;
                }
            }
        });
        Client { mqtt, seen }
    }

    async fn next(&mut self) -> Seen {
        tokio::time::timeout(Duration::from_secs(20), self.seen.recv())
            .await
            .expect("the broker answered")
            .unwrap_or(Seen::Closed)
    }

    /// Connects and returns how the broker answered.
    async fn connect(port: u16, id: &str, login: Option<(&str, &str)>) -> (Client, Seen) {
        Client::connect_with(Client::options(port, id, login)).await
    }

    async fn connect_with(opts: MqttOptions) -> (Client, Seen) {
        let mut c = Client::start(opts);
        let first = c.next().await;
        (c, first)
    }

    /// Publishes at QoS 1 and returns the PUBACK's reason.
    async fn publish(&mut self, topic: &str, payload: &[u8]) -> PubAckReason {
        self.mqtt
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .unwrap();
        loop {
            match self.next().await {
                Seen::PubAck(reason) => return reason,
                Seen::Closed | Seen::Refused(_) => panic!("closed while publishing"),
                _ => {}
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
        self.mqtt.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        loop {
            match self.next().await {
                Seen::SubAck(codes) => return codes[0],
                Seen::Closed | Seen::Refused(_) => panic!("closed while subscribing"),
                _ => {}
            }
        }
    }
}

/// The stored heart-rate readings (the vitals payloads carry SpO2 too). The service must be
/// stopped.
fn heart_rates(data: &Path) -> Vec<iomt_edge::model::reading::Reading> {
    stored_readings(data)
        .into_iter()
        .filter(|r| r.metric == Metric::HeartRate)
        .collect()
}

fn vitals_json(ts: i64, hr: f64) -> Vec<u8> {
    format!(r#"{{"ts":{ts},"hr":{hr},"spo2":97}}"#).into_bytes()
}

const TS: i64 = 1_700_000_000_000;

/// A relay whose payload must name the patient its topic does, and a gateway trusted to name its devices and patients.
const RELAY_ROUTES: &str = r#"
[[route]]
topic = "relay/+/+/obs"
codec = "json"
source = "{2}"
subject = "{3}"
[route.json]
ts = "/ts"
subject = "/patient"
[[route.json.reading]]
value = "/hr"
metric = "heart_rate"

[[route]]
topic = "gw/+/obs"
codec = "json"
source = "{2}"
trust_payload_ids = true
[route.json]
ts = "/ts"
source = "/device"
subject = "/patient"
[[route.json.reading]]
value = "/hr"
metric = "heart_rate"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_decide_who_connects_and_a_new_one_needs_no_restart() {
    let dir = tempfile::tempdir().unwrap();
    let creds = accounts(dir.path(), &[("w7-b3-mon", "first-password")]);
    let edge = Edge::start(&secured_pipeline(&creds, "", ""), &dir.path().join("data"));
    let port = edge.mqtt_port();

    let (_, seen) = Client::connect(port, "a", Some(("w7-b3-mon", "wrong-password"))).await;
    assert!(
        matches!(seen, Seen::Refused(ConnectReturnCode::BadUserNamePassword)),
        "{seen:?}"
    );
    let (_, seen) = Client::connect(port, "b", Some(("nobody", "first-password"))).await;
    assert!(
        matches!(seen, Seen::Refused(ConnectReturnCode::BadUserNamePassword)),
        "an unknown account: {seen:?}"
    );
    let (_, seen) = Client::connect(port, "c", None).await;
    assert!(
        matches!(seen, Seen::Refused(ConnectReturnCode::NotAuthorized)),
        "anonymous: {seen:?}"
    );
    let (mut dev, seen) = Client::connect(port, "d", Some(("w7-b3-mon", "first-password"))).await;
    assert!(matches!(seen, Seen::Connected), "{seen:?}");
    let reason = dev
        .publish("ward/7/bed/3/vitals", &vitals_json(TS, 80.0))
        .await;
    assert_eq!(reason, PubAckReason::Success);
    assert_eq!(
        edge.metric("iomt_connections_refused_total{reason=\"credentials\"}"),
        2.0
    );
    assert_eq!(
        edge.metric("iomt_connections_refused_total{reason=\"anonymous\"}"),
        1.0
    );

    // A new password, with the running service: the old one no longer opens, the new one does.
    add_account(&creds, "w7-b3-mon", "second-password");
    let (_, seen) = Client::connect(port, "e", Some(("w7-b3-mon", "first-password"))).await;
    assert!(
        matches!(seen, Seen::Refused(ConnectReturnCode::BadUserNamePassword)),
        "the rotated password: {seen:?}"
    );
    let (mut dev2, seen) = Client::connect(port, "f", Some(("w7-b3-mon", "second-password"))).await;
    assert!(matches!(seen, Seen::Connected), "{seen:?}");
    let reason = dev2
        .publish("ward/7/bed/3/vitals", &vitals_json(TS + 1000, 81.0))
        .await;
    assert_eq!(reason, PubAckReason::Success);
    drop((dev, dev2));
    let data = edge.data.clone();
    assert_eq!(edge.stop().code(), Some(0));
    assert_eq!(heart_rates(&data).len(), 2);
    assert!(stored_readings(&data)
        .iter()
        .all(|r| r.source == "w7-b3-mon"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_is_refused_counted_and_neither_stored_nor_seen() {
    let dir = tempfile::tempdir().unwrap();
    let creds = accounts(
        dir.path(),
        &[
            ("w7-b3-mon", "monitor-password"),
            ("relay1", "relay-password"),
            ("gw1", "gateway-password"),
            ("nurse", "nurse-password"),
        ],
    );
    let edge = Edge::start(
        &secured_pipeline(&creds, "", RELAY_ROUTES),
        &dir.path().join("data"),
    );
    let port = edge.mqtt_port();
    // The nurses' station watches every device topic.
    let (mut nurse, seen) =
        Client::connect(port, "station", Some(("nurse", "nurse-password"))).await;
    assert!(matches!(seen, Seen::Connected), "{seen:?}");
    for filter in ["ward/#", "relay/#", "gw/#"] {
        assert_eq!(
            nurse.subscribe(filter).await,
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        );
    }

    let (mut mon, _) = Client::connect(port, "mon", Some(("w7-b3-mon", "monitor-password"))).await;
    // Bed 4's monitor, said bed 3's.
    assert_eq!(
        mon.publish("ward/7/bed/4/vitals", &vitals_json(TS, 150.0))
            .await,
        PubAckReason::NotAuthorized
    );
    // A topic no route takes is nobody's.
    assert_eq!(
        mon.publish("ward/7/bed/3/notes", b"x").await,
        PubAckReason::NotAuthorized
    );
    // A device acknowledging an alarm, or setting a patient's SpO2 scale: operators only.
    assert_eq!(
        mon.publish(
            &format!("alarms/{SITE}/w7-b3/spo2-low/ack"),
            br#"{"by":"x"}"#
        )
        .await,
        PubAckReason::NotAuthorized
    );
    assert_eq!(
        mon.publish(&format!("config/{SITE}/w7-b3"), br#"{"spo2_scale":2}"#)
            .await,
        PubAckReason::NotAuthorized
    );
    // A device reads its own commands, not the ward.
    assert_eq!(
        mon.subscribe("ward/#").await,
        SubscribeReasonCode::NotAuthorized
    );
    assert_eq!(
        mon.subscribe("ward/cmd/w7-b4-mon/#").await,
        SubscribeReasonCode::NotAuthorized
    );
    assert_eq!(
        mon.subscribe("ward/cmd/w7-b3-mon/sampling").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );

    // A relay's own topic, but a payload that names another patient than the topic: the route
    // does not trust it to.
    let (mut relay, _) = Client::connect(port, "relay", Some(("relay1", "relay-password"))).await;
    assert_eq!(
        relay
            .publish(
                "relay/relay1/w7-b6/obs",
                format!(r#"{{"ts":{TS},"patient":"w7-b4","hr":150}}"#).as_bytes()
            )
            .await,
        PubAckReason::NotAuthorized
    );
    // A gateway's route trusts it to name the devices and patients behind it.
    let (mut gw, _) = Client::connect(port, "gw", Some(("gw1", "gateway-password"))).await;
    assert_eq!(
        gw.publish(
            "gw/gw1/obs",
            format!(r#"{{"ts":{TS},"device":"w7-b5-patch","patient":"w7-b5","hr":90}}"#).as_bytes()
        )
        .await,
        PubAckReason::Success
    );
    // What the devices may publish still goes through, after all of that.
    assert_eq!(
        mon.publish("ward/7/bed/3/vitals", &vitals_json(TS, 80.0))
            .await,
        PubAckReason::Success
    );
    assert_eq!(
        relay
            .publish(
                "relay/relay1/w7-b6/obs",
                format!(r#"{{"ts":{TS},"patient":"w7-b6","hr":88}}"#).as_bytes()
            )
            .await,
        PubAckReason::Success
    );

    assert_eq!(
        edge.metric("iomt_publishes_refused_total{reason=\"impostor\"}"),
        3.0
    );
    assert_eq!(
        edge.metric("iomt_publishes_refused_total{reason=\"not_operator\"}"),
        2.0
    );
    // The station saw none of the impostors' messages. (A payload's names are judged when it is
    // decoded, after subscribers have had it: the relay's refused one was seen.)
    let mut topics = Vec::new();
    while topics.len() < 4 {
        if let Seen::Message(t) = nurse.next().await {
            topics.push(t);
        }
    }
    assert_eq!(
        topics,
        [
            "relay/relay1/w7-b6/obs",
            "gw/gw1/obs",
            "ward/7/bed/3/vitals",
            "relay/relay1/w7-b6/obs"
        ]
    );
    drop((mon, relay, gw, nurse));
    let data = edge.data.clone();
    assert_eq!(edge.stop().code(), Some(0));
    let stored = stored_readings(&data);
    let sources: std::collections::BTreeSet<_> = stored.iter().map(|r| r.source.as_str()).collect();
    assert_eq!(sources, ["relay1", "w7-b3-mon", "w7-b5-patch"].into());
    for r in &stored {
        let want = match r.source.as_str() {
            "w7-b3-mon" => Some("w7-b3"),
            "w7-b5-patch" => Some("w7-b5"),
            "relay1" => Some("w7-b6"),
            _ => None,
        };
        assert_eq!(r.subject.as_deref(), want, "{r:?}");
    }
    assert!(!stored.iter().any(|r| r.value == Some(150.0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_cannot_take_over_another_accounts_session() {
    let dir = tempfile::tempdir().unwrap();
    let creds = accounts(
        dir.path(),
        &[
            ("w7-b3-mon", "monitor-password"),
            ("w7-b4-mon", "other-password"),
        ],
    );
    let edge = Edge::start(&secured_pipeline(&creds, "", ""), &dir.path().join("data"));
    let port = edge.mqtt_port();
    let (mut victim, _) =
        Client::connect(port, "bed-monitor", Some(("w7-b3-mon", "monitor-password"))).await;
    // Same client id, another account: a session of its own, not the victim's.
    let (mut other, seen) =
        Client::connect(port, "bed-monitor", Some(("w7-b4-mon", "other-password"))).await;
    assert!(matches!(seen, Seen::Connected), "{seen:?}");
    assert_eq!(
        other
            .publish("ward/7/bed/4/vitals", &vitals_json(TS, 70.0))
            .await,
        PubAckReason::Success
    );
    assert_eq!(
        victim
            .publish("ward/7/bed/3/vitals", &vitals_json(TS, 71.0))
            .await,
        PubAckReason::Success,
        "the first connection is still there"
    );
    // The same account and id does take its own session over, as MQTT says.
    let (_again, seen) =
        Client::connect(port, "bed-monitor", Some(("w7-b3-mon", "monitor-password"))).await;
    assert!(matches!(seen, Seen::Connected), "{seen:?}");
    assert!(matches!(victim.next().await, Seen::Closed));
    drop(other);
    assert_eq!(edge.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_device_is_slowed_not_lost_and_the_limits_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let creds = accounts(dir.path(), &[("w7-b3-mon", "monitor-password")]);
    let text = secured_pipeline(
        &creds,
        "max_messages_per_second = 100\nmax_burst = 10\nmax_inflight = 4\nmax_connections = 3\n",
        "",
    );
    let edge = Edge::start(&text, &dir.path().join("data"));
    let port = edge.mqtt_port();
    // 150 messages as fast as the client can: 20 in flight at once, past the broker's 4 (an
    // MQTT 3.1.1 client: a v5 one keeps to the Receive Maximum the CONNACK announces), and far
    // past 100 a second.
    let mut opts = rumqttc::MqttOptions::new("flood", "127.0.0.1", port);
    opts.set_credentials("w7-b3-mon", "monitor-password");
    opts.set_inflight(20);
    let (publisher, mut ev) = rumqttc::AsyncClient::new(opts, 200);
    const N: i64 = 150;
    tokio::spawn(async move {
        for i in 0..N {
            publisher
                .publish(
                    "ward/7/bed/3/vitals",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    vitals_json(TS + i * 1000, 60.0 + i as f64 / 10.0),
                )
                .await
                .unwrap();
        }
    });
    let mut acked = 0;
    while acked < N {
        let event = tokio::time::timeout(Duration::from_secs(20), ev.poll())
            .await
            .expect("the broker answered")
            .expect("the connection held");
        if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = event {
            acked += 1;
        }
    }
    assert!(edge.metric("iomt_publishes_delayed_total{limit=\"rate\"}") > 0.0);
    assert!(edge.metric("iomt_publishes_delayed_total{limit=\"inflight\"}") > 0.0);

    // Connections past max_connections are refused (and counted) once its margin for the
    // refusing CONNACK is spent too.
    let mut idle = Vec::new();
    for i in 0..40 {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        idle.push(s);
        if edge.metric("iomt_connections_refused_total{reason=\"limit\"}") > 0.0 {
            break;
        }
        assert!(i < 39, "never refused");
    }
    drop(idle);
    drop(ev);
    let data = edge.data.clone();
    assert_eq!(edge.stop().code(), Some(0));
    assert_eq!(heart_rates(&data).len(), N as usize);
}

#[test]
fn a_listener_off_loopback_without_tls_is_refused_at_start_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let text = pipeline("").replace(
        "listen = \"127.0.0.1:0\"\nlisten_v5",
        "listen = \"0.0.0.0:0\"\nlisten_v5",
    );
    assert!(text.contains("0.0.0.0:0"));
    let stderr = refused_at_start(dir.path(), &text);
    assert!(
        stderr.contains("broker.listen: 0.0.0.0:0 is not on loopback and has no TLS: anonymous"),
        "{stderr}"
    );
    // Without anonymous clients it still needs TLS, or plaintext said out loud.
    let text = text.replace("auth.allow_anonymous = true", "auth.credentials = \"c\"");
    let stderr = refused_at_start(dir.path(), &text);
    assert!(
        stderr.contains("Set [broker.tls] (cert, key), or broker.allow_plaintext"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "refused before anything was made"
    );
}

// ---- TLS: the ward's CA, device certificates, websockets ----

/// The broker's certificate (for 127.0.0.1 and localhost, from the ward CA) in `dir`: the
/// `[broker.tls]` keys (dotted, for `[broker]`) and the ward CA's PEM.
fn broker_tls(dir: &Path, client_ca: Option<&str>) -> (String, String) {
    let (ward_ca, issuer) = ca("ward CA");
    let (cert, key) = signed(&issuer, &["127.0.0.1", "localhost"], None);
    let cert = write_file(&dir.join("broker.crt"), &cert, 0o644);
    let key = write_file(&dir.join("broker.key"), &key, 0o600);
    let mut keys = format!(
        "tls.cert = {:?}\ntls.key = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    if let Some(pem) = client_ca {
        let path = write_file(&dir.join("devices-ca.crt"), pem, 0o644);
        keys += &format!("tls.client_ca = {:?}\n", path.display().to_string());
    }
    (keys, ward_ca)
}

/// Client options for the broker's TLS port.
fn over_tls(
    port: u16,
    id: &str,
    login: Option<(&str, &str)>,
    tls: std::sync::Arc<rustls::ClientConfig>,
) -> MqttOptions {
    let mut opts = Client::options(port, id, login);
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_lets_in_a_client_that_trusts_the_ward_ca_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let creds = accounts(dir.path(), &[("w7-b3-mon", "monitor-password")]);
    let (tls_keys, ward_ca) = broker_tls(dir.path(), None);
    let edge = Edge::start(
        &secured_pipeline(&creds, &tls_keys, ""),
        &dir.path().join("data"),
    );
    let port = edge.mqtt_port();
    let good = tls_client(&ward_ca, None);

    let (mut dev, seen) = Client::connect_with(over_tls(
        port,
        "good",
        Some(("w7-b3-mon", "monitor-password")),
        good.clone(),
    ))
    .await;
    assert!(matches!(seen, Seen::Connected), "{seen:?}");
    assert_eq!(
        dev.publish("ward/7/bed/3/vitals", &vitals_json(TS, 72.0))
            .await,
        PubAckReason::Success
    );
    // The right CA is no substitute for the password.
    let (_, seen) = Client::connect_with(over_tls(
        port,
        "wrong-password",
        Some(("w7-b3-mon", "guess")),
        good,
    ))
    .await;
    assert!(
        matches!(seen, Seen::Refused(ConnectReturnCode::BadUserNamePassword)),
        "{seen:?}"
    );
    // A client that trusts another CA will not talk to this broker (as a device that
    // checks whom it talks to refuses a stand-in for it).
    let (rogue_ca, _) = ca("rogue CA");
    let (_, seen) = Client::connect_with(over_tls(
        port,
        "other-ca",
        Some(("w7-b3-mon", "monitor-password")),
        tls_client(&rogue_ca, None),
    ))
    .await;
    assert!(matches!(seen, Seen::Closed), "{seen:?}");
    // Plain text to the TLS port: no CONNACK, the password never read.
    let (_, seen) = Client::connect(port, "plain", Some(("w7-b3-mon", "monitor-password"))).await;
    assert!(matches!(seen, Seen::Closed), "{seen:?}");
    assert_eq!(
        edge.metric("iomt_connections_refused_total{reason=\"tls\"}"),
        2.0
    );
    assert_eq!(
        edge.metric("iomt_connections_refused_total{reason=\"credentials\"}"),
        1.0
    );
    drop(dev);
    let data = edge.data.clone();
    assert_eq!(edge.stop().code(), Some(0));
    let hr = heart_rates(&data);
    assert_eq!(hr.len(), 1, "{hr:?}");
    assert_eq!(hr[0].value, Some(72.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_certificate_is_its_identity_and_holds_it_to_its_own_topics() {
    let dir = tempfile::tempdir().unwrap();
    let (devices_ca, devices) = ca("ward 7 devices CA");
    let (tls_keys, ward_ca) = broker_tls(dir.path(), Some(&devices_ca));
    let text = pipeline_with_broker(
        &format!("{tls_keys}auth.device_subscribe = [\"ward/cmd/{{identity}}/#\"]\n"),
        "",
    )
    .replace("auth.allow_anonymous = true\n", "");
    assert!(!text.contains("allow_anonymous"));
    let edge = Edge::start(&text, &dir.path().join("data"));
    let port = edge.mqtt_port();
    let monitor = signed(&devices, &[], Some("w7-b3-mon"));

    // No password: the certificate says who it is.
    let (mut dev, seen) = Client::connect_with(over_tls(
        port,
        "mon",
        None,
        tls_client(&ward_ca, Some(&monitor)),
    ))
    .await;
    assert!(matches!(seen, Seen::Connected), "{seen:?}");
    assert_eq!(
        dev.publish("ward/7/bed/3/vitals", &vitals_json(TS, 64.0))
            .await,
        PubAckReason::Success
    );
    assert_eq!(
        dev.publish("ward/7/bed/4/vitals", &vitals_json(TS, 150.0))
            .await,
        PubAckReason::NotAuthorized
    );
    // Its will is a publish in its name: on another bed's topic, refused at CONNECT.
    let mut opts = over_tls(port, "will", None, tls_client(&ward_ca, Some(&monitor)));
    opts.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
        "ward/7/bed/4/vitals",
        vitals_json(TS, 150.0),
        QoS::AtLeastOnce,
        false,
        None,
    ));
    let (_, seen) = Client::connect_with(opts).await;
    assert!(
        matches!(seen, Seen::Refused(ConnectReturnCode::NotAuthorized)),
        "{seen:?}"
    );
    // A user name beside the certificate cannot claim another account.
    let (_, seen) = Client::connect_with(over_tls(
        port,
        "claims",
        Some(("w7-b4-mon", "anything")),
        tls_client(&ward_ca, Some(&monitor)),
    ))
    .await;
    assert!(
        matches!(seen, Seen::Refused(ConnectReturnCode::BadUserNamePassword)),
        "{seen:?}"
    );
    // A name that would pass for a session or topic of another account.
    let odd = signed(&devices, &[], Some("nurse:w7-b3"));
    let (_, seen) = Client::connect_with(over_tls(
        port,
        "odd",
        None,
        tls_client(&ward_ca, Some(&odd)),
    ))
    .await;
    assert!(
        matches!(seen, Seen::Refused(ConnectReturnCode::NotAuthorized)),
        "{seen:?}"
    );
    // The same name from a CA the broker does not trust, or no certificate at all: the
    // handshake fails.
    let (_, rogue) = ca("rogue CA");
    let forged = signed(&rogue, &[], Some("w7-b3-mon"));
    for (id, identity) in [("forged", Some(&forged)), ("none", None)] {
        let (_, seen) =
            Client::connect_with(over_tls(port, id, None, tls_client(&ward_ca, identity))).await;
        assert!(matches!(seen, Seen::Closed), "{id}: {seen:?}");
    }
    assert_eq!(
        edge.metric("iomt_connections_refused_total{reason=\"tls\"}"),
        2.0
    );
    assert_eq!(
        edge.metric("iomt_connections_refused_total{reason=\"certificate\"}"),
        1.0
    );
    assert_eq!(
        edge.metric("iomt_publishes_refused_total{reason=\"impostor\"}"),
        2.0
    );
    drop(dev);
    let data = edge.data.clone();
    assert_eq!(edge.stop().code(), Some(0));
    let hr = heart_rates(&data);
    assert_eq!(hr.len(), 1, "{hr:?}");
    assert_eq!(
        (hr[0].source.as_str(), hr[0].value),
        ("w7-b3-mon", Some(64.0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_are_served_over_tls_and_ask_for_the_password_too() {
    use async_tungstenite::tungstenite::client::IntoClientRequest;
    use async_tungstenite::tungstenite::Message;
    use futures_util::{SinkExt, StreamExt};
    let dir = tempfile::tempdir().unwrap();
    let creds = accounts(dir.path(), &[("w7-b3-mon", "monitor-password")]);
    let (tls_keys, ward_ca) = broker_tls(dir.path(), None);
    let edge = Edge::start(
        &secured_pipeline(&creds, &tls_keys, ""),
        &dir.path().join("data"),
    );
    let endpoints: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(edge.data.join("endpoints.json")).unwrap())
            .unwrap();
    let ws: std::net::SocketAddr = endpoints["ws"].as_str().unwrap().parse().unwrap();
    let connack = |password: &'static str| {
        let ward_ca = ward_ca.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(ws).await.unwrap();
            let tls = tokio_rustls::TlsConnector::from(tls_client(&ward_ca, None))
                .connect("localhost".try_into().unwrap(), tcp)
                .await
                .unwrap();
            let mut req = format!("wss://localhost:{}/mqtt", ws.port())
                .into_client_request()
                .unwrap();
            req.headers_mut()
                .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
            let (mut stream, _) = async_tungstenite::tokio::client_async(req, tls)
                .await
                .unwrap();
            let connect =
                raw::connect_packet_with_login("ws-device", 4, Some(("w7-b3-mon", password)));
            stream.send(Message::binary(connect)).await.unwrap();
            loop {
                let m = tokio::time::timeout(Duration::from_secs(20), stream.next())
                    .await
                    .expect("an answer")
                    .expect("a message")
                    .unwrap();
                if let Message::Binary(b) = m {
                    return b.to_vec();
                }
            }
        }
    };
    // CONNACK: accepted; then refused, bad user name or password (3.1.1 code 4).
    assert_eq!(connack("monitor-password").await, [0x20, 2, 0, 0]);
    assert_eq!(connack("guess").await, [0x20, 2, 0, 4]);
    assert_eq!(edge.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_may_not_open_an_mqtt_websocket_unless_its_origin_is_listed() {
    use async_tungstenite::tungstenite::client::IntoClientRequest;
    let dir = tempfile::tempdir().unwrap();
    // Anonymous clients on loopback, as the shipped ward pipeline: what a page in a browser on
    // the base station would reach.
    let edge = Edge::start(
        &pipeline_with_broker(
            "auth.allow_anonymous = true\nws_allowed_origins = [\"https://dashboard.ward.example\"]\n",
            "",
        ),
        &dir.path().join("data"),
    );
    let endpoints: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(edge.data.join("endpoints.json")).unwrap())
            .unwrap();
    let ws: std::net::SocketAddr = endpoints["ws"].as_str().unwrap().parse().unwrap();
    let upgrade = |origin: Option<&'static str>| async move {
        let tcp = tokio::net::TcpStream::connect(ws).await.unwrap();
        let mut req = format!("ws://{ws}/mqtt").into_client_request().unwrap();
        req.headers_mut()
            .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
        if let Some(o) = origin {
            req.headers_mut().insert("origin", o.parse().unwrap());
        }
        match async_tungstenite::tokio::client_async(req, tcp).await {
            Ok(_) => 101,
            Err(async_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(upgrade(Some("https://evil.example")).await, 403);
    assert_eq!(upgrade(Some("null")).await, 403);
    assert_eq!(upgrade(Some("https://dashboard.ward.example")).await, 101);
    // A device sends no Origin.
    assert_eq!(upgrade(None).await, 101);
    assert_eq!(
        edge.metric("iomt_connections_refused_total{reason=\"origin\"}"),
        2.0
    );
    assert_eq!(edge.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_before_login_is_held_to_64_kib_whatever_max_packet_bytes_allows() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&pipeline(""), &dir.path().join("data"));
    let port = edge.mqtt_port();
    // MQTT 3.1.1 CONNECT, clean session, with a will of `will_len` bytes.
    let connect = |will_len: usize| {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x06, 0, 60];
        for field in [
            &b"big-will"[..],
            b"ward/7/bed/3/status",
            &vec![b'x'; will_len],
        ] {
            body.extend_from_slice(&(field.len() as u16).to_be_bytes());
            body.extend_from_slice(field);
        }
        let mut p = vec![0x10];
        raw::remaining_length(body.len(), &mut p);
        p.extend(body);
        p
    };
    // Within the cap: accepted.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(&connect(60 << 10)).await.unwrap();
    let mut body = Vec::new();
    let t = raw::read_packet(&mut s, &mut body).await.unwrap();
    assert_eq!((t, body.as_slice()), (0x20, &[0u8, 0][..]));
    drop(s);
    // Past it (well within max_packet_bytes, 1 MiB): closed as soon as the fixed header and
    // the protocol level say so, before the rest is sent (well before the 10 s a CONNECT
    // has), and no CONNACK.
    let big = connect(65_535);
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(&big[..14]).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("closed without waiting for the body");
    assert!(read.is_err() || answer.is_empty(), "{answer:?}");
    assert_eq!(edge.stop().code(), Some(0));
}
