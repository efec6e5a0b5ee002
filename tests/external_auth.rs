//! External mode against a real mosquitto that demands accounts: its `password_file` written by
//! `iomt-edge credentials add`, an `acl_file` binding each device account to its own topics, TLS
//! with a CA made here. The service logs in with its own account; a device with the wrong
//! password is refused at CONNECT; an impostor's publish is refused by the broker (MQTT 5 reason
//! 0x87) and never stored; `replay` logs in over TLS.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::mosquitto::Mosquitto;
use common::security::*;
use common::*;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};

const DEVICE: &str = "ward7-bed3-monitor";
const DEVICE_PASSWORD: &str = "bed3-device-password";
const EDGE: &str = "edge";
const EDGE_PASSWORD: &str = "edge-service-password";

/// Each account may do only its own job: the device writes its bed's topics; the service reads
/// the ward and writes (and reads back acknowledgements of) alarms and dead letters.
const ACL: &str = "\
user ward7-bed3-monitor
topic write ward/7/bed/3/#

user edge
topic read ward/#
topic readwrite alarms/#
topic readwrite edge/#
";

/// mosquitto's lines for accounts from a credentials file written by `iomt-edge credentials`
/// and the ACL above, anonymous clients refused.
fn auth_config(dir: &Path) -> String {
    let passwd = dir.join("credentials");
    add_account(&passwd, DEVICE, DEVICE_PASSWORD);
    add_account(&passwd, EDGE, EDGE_PASSWORD);
    let acl = write_file(&dir.join("acl"), ACL, 0o600);
    // As root, mosquitto would switch to its own user, who cannot read these 0600 files.
    format!(
        "user root\nallow_anonymous false\npassword_file {}\nacl_file {}\n",
        passwd.display(),
        acl.display()
    )
}

/// The test pipeline on the external broker `url`, logged in as the service's account.
fn pipeline_on(url: &str, dir: &Path, password: &str, ca: Option<&Path>) -> String {
    let pw = write_file(
        &dir.join(format!("edge-pw-{}", rand::random::<u32>())),
        &format!("{password}\n"),
        0o600,
    );
    let ca = ca.map_or(String::new(), |c| {
        format!("external_ca = \"{}\"\n", c.display())
    });
    pipeline("").replace(
        "[broker]\n",
        &format!(
            "[broker]\nexternal = \"{url}\"\nclient_id = \"edge-under-test\"\ninflight = 100\n\
             external_username = \"{EDGE}\"\nexternal_password_file = \"{}\"\n{ca}",
            pw.display()
        ),
    )
}

/// An MQTT 5 device connection with an account: the CONNACK's refusal, or the connection.
async fn device(
    port: u16,
    name: &str,
    password: Option<&str>,
) -> Result<(AsyncClient, EventLoop), ConnectReturnCode> {
    let mut opts = MqttOptions::new(format!("dev-{}", rand::random::<u32>()), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    if let Some(p) = password {
        opts.set_credentials(name, p);
    }
    let (client, mut ev) = AsyncClient::new(opts, 10);
    let connack = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => return Err(code),
                Err(e) => panic!("device connection: {e}"),
            }
        }
    })
    .await
    .expect("a CONNACK");
    connack.map(|()| (client, ev))
}

/// Publishes one message at QoS 1 and returns the broker's PUBACK reason.
async fn publish(
    conn: &mut (AsyncClient, EventLoop),
    (topic, payload): (String, Vec<u8>),
) -> PubAckReason {
    conn.0
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::PubAck(ack)) = conn.1.poll().await.unwrap() {
                return ack.reason;
            }
        }
    })
    .await
    .expect("a PUBACK")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_device_account_is_held_to_its_own_topics() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), &auth_config(dir.path()));
    let data = dir.path().join("data");
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    // Healthy means logged in and every route's subscription granted by the ACL.
    let edge = Edge::start(&pipeline_on(&url, dir.path(), EDGE_PASSWORD, None), &data);

    // Wrong password, unknown account, no account at all: refused at CONNECT.
    for (name, password) in [
        (DEVICE, Some("not-the-password")),
        ("ward7-bed4-monitor", Some(DEVICE_PASSWORD)),
        (DEVICE, None),
    ] {
        let refused = device(broker.port, name, password).await.err();
        assert!(
            matches!(
                refused,
                Some(ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized)
            ),
            "{name} {password:?}: {refused:?}"
        );
    }

    let mut bed3 = device(broker.port, DEVICE, Some(DEVICE_PASSWORD))
        .await
        .expect("the device's own password is accepted");
    assert_eq!(
        publish(&mut bed3, vitals(3, 1_700_000_001, 71.0, 97.0)).await,
        PubAckReason::Success
    );
    // The same account posing as bed 4's monitor: mosquitto's ACL says no.
    assert_eq!(
        publish(&mut bed3, vitals(4, 1_700_000_002, 150.0, 80.0)).await,
        PubAckReason::NotAuthorized
    );
    // Published after the impostor's message: once it is stored, that one had its chance.
    assert_eq!(
        publish(&mut bed3, vitals(3, 1_700_000_003, 72.0, 98.0)).await,
        PubAckReason::Success
    );
    edge.wait_metric("iomt_readings_stored_total", 4.0);
    assert!(edge.stop().success());

    let stored = stored_readings(&data);
    let seconds: Vec<i64> = stored
        .iter()
        .map(|r| r.ts / 1_000_000 - 1_700_000_000)
        .collect();
    assert_eq!(seconds, [1, 1, 3, 3], "{stored:?}");
    assert!(
        stored.iter().all(|r| r.source == "w7-b3-mon"),
        "nothing of bed 4's impostor is stored: {stored:?}"
    );
}

/// A CA and a server certificate for 127.0.0.1 it signed, as PEM files in `dir`: (CA file,
/// mosquitto's TLS lines).
fn tls_files(dir: &Path, name: &str) -> (PathBuf, String) {
    let (ca_pem, issuer) = ca(&format!("{name} test CA"));
    let (cert_pem, key_pem) = signed(&issuer, &["127.0.0.1", "localhost"], None);
    let ca_file = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca_file, ca_pem).unwrap();
    let cert_file = dir.join(format!("{name}-server.pem"));
    std::fs::write(&cert_file, cert_pem).unwrap();
    let key_file = write_file(&dir.join(format!("{name}-server.key")), &key_pem, 0o600);
    let lines = format!(
        "certfile {}\nkeyfile {}\n",
        cert_file.display(),
        key_file.display()
    );
    (ca_file, lines)
}

/// `iomt-edge replay` of a two-message fixture for bed 3 into `url`, logged in as the device.
fn replay_as_device(dir: &Path, url: &str, ca: &Path) -> std::process::Output {
    let fixture = dir.join("bed3.jsonl");
    std::fs::write(
        &fixture,
        "{\"t_ms\":0,\"topic\":\"ward/7/bed/3/vitals\",\"payload\":{\"ts\":1700000011,\"hr\":70,\"spo2\":96}}\n\
         {\"t_ms\":1,\"topic\":\"ward/7/bed/3/vitals\",\"payload\":{\"ts\":1700000012,\"hr\":71,\"spo2\":97}}\n",
    )
    .unwrap();
    let pw = write_file(
        &dir.join("device-pw"),
        &format!("{DEVICE_PASSWORD}\n"),
        0o600,
    );
    Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
        .arg("replay")
        .arg(&fixture)
        .args(["--broker", url, "--speed", "max", "--username", DEVICE])
        .arg("--password-file")
        .arg(&pw)
        .arg("--ca")
        .arg(ca)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_mode_and_replay_over_tls_with_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, tls) = tls_files(dir.path(), "hospital");
    let broker = Mosquitto::start(dir.path(), &format!("{tls}{}", auth_config(dir.path())));
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    let data = dir.path().join("data");
    let edge = Edge::start(
        &pipeline_on(&url, dir.path(), EDGE_PASSWORD, Some(&ca)),
        &data,
    );

    let out = replay_as_device(dir.path(), &url, &ca);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("replayed 2 messages"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    edge.wait_metric("iomt_readings_stored_total", 4.0);
    assert!(edge.stop().success());
    let stored = stored_readings(&data);
    assert_eq!(stored.len(), 4, "{stored:?}");
    assert!(stored.iter().all(|r| r.source == "w7-b3-mon"));

    // Replay into the TLS broker without trusting its CA: refused, nothing published.
    let (other_ca, _) = tls_files(dir.path(), "other");
    let out = replay_as_device(dir.path(), &url, &other_ca);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nothing was published") && err.contains("UnknownIssuer"),
        "{err}"
    );
}

/// Waits until /healthz names a broker problem containing `want`.
async fn broker_problem(edge: &Edge, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, health) = edge.health();
        if let Some(p) = health["problems"]["broker"].as_str() {
            if p.contains(want) {
                assert_eq!(code, 503, "{health}");
                return p.to_owned();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no broker problem with {want:?}: {health}\n{}",
            edge.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_or_password_is_a_clear_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (_, tls) = tls_files(dir.path(), "hospital");
    let (other_ca, _) = tls_files(dir.path(), "other");
    let broker = Mosquitto::start(dir.path(), &format!("{tls}{}", auth_config(dir.path())));
    let url = format!("mqtts://127.0.0.1:{}", broker.port);

    let edge = Edge::spawn(
        &pipeline_on(&url, dir.path(), EDGE_PASSWORD, Some(&other_ca)),
        &dir.path().join("data-ca"),
        &[],
    );
    let problem = broker_problem(&edge, "TLS").await;
    assert!(problem.contains("UnknownIssuer"), "{problem}");
    assert!(edge.log().contains("UnknownIssuer"), "{}", edge.log());
    assert!(edge.stop().success());

    let ca = dir.path().join("hospital-ca.pem");
    let edge = Edge::spawn(
        &pipeline_on(&url, dir.path(), "wrong-password", Some(&ca)),
        &dir.path().join("data-pw"),
        &[],
    );
    let problem = broker_problem(&edge, "refused").await;
    // mosquitto answers a wrong password with 0x86 or 0x87 (its versions differ).
    assert!(problem.contains("password"), "{problem}");
    let log = edge.log();
    assert!(
        !log.contains("wrong-password") && !log.contains(EDGE_PASSWORD),
        "a password in the log: {log}"
    );
    assert!(edge.stop().success());
}
