//! Fixture replay: publishes a recorded fixture (fixtures/README.md) to a broker with its
//! original timing scaled by a speed factor, or as fast as the broker takes it, and waits for
//! every QoS 1 acknowledgement before it reports. It counts only what the broker took, and says
//! so plainly when it could not reach the broker at all. A broker that wants a login gets one
//! (the password read from a 0600 file), and an `mqtts://` broker TLS on ring.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use indicatif::{ProgressBar, ProgressStyle};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde::Deserialize;
use serde_json::Value;

use crate::transport::credentials::read_password_file;
use crate::transport::tls_client::{client_config, BrokerUrl};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}: {message}")]
    Fixture {
        file: String,
        line: usize,
        message: String,
    },
    #[error("{0}")]
    Broker(String),
    /// No connection was ever established, so no message reached the broker.
    #[error("cannot connect to {broker}: {error}; nothing was published")]
    Unreachable { broker: String, error: String },
    /// The connection failed after the broker had taken `delivered` messages (acknowledged at
    /// QoS 1 and 2, written at QoS 0).
    #[error("the broker connection failed after {delivered} messages were delivered: {error}")]
    Connection { delivered: u64, error: String },
}

/// How to reach the broker beyond its URL: an account, and the CA for `mqtts://`.
#[derive(Debug, Clone, Default)]
pub struct BrokerLogin {
    pub username: Option<String>,
    /// A file holding the password (mode 0600 or stricter): never on the command line.
    pub password_file: Option<PathBuf>,
    /// PEM CA certificates for an `mqtts://` broker; the system's trust store without it.
    pub ca: Option<PathBuf>,
}

/// The client options for `broker` with `login`: every mistake in them said before connecting.
fn client_options(broker: &str, login: &BrokerLogin) -> Result<MqttOptions, ReplayError> {
    let url = BrokerUrl::parse(broker).map_err(ReplayError::Broker)?;
    let id = format!("iomt-replay-{}", std::process::id());
    let mut opts = MqttOptions::new(id, url.host, url.port);
    match (&login.username, &login.password_file) {
        (Some(name), Some(file)) => {
            let password =
                read_password_file(file).map_err(|e| ReplayError::Broker(e.to_string()))?;
            opts.set_credentials(name.clone(), password);
        }
        (Some(_), None) => {
            return Err(ReplayError::Broker(
                "--username needs --password-file (a password is never taken on the command line)"
                    .into(),
            ))
        }
        (None, Some(_)) => {
            return Err(ReplayError::Broker(
                "--password-file needs --username".into(),
            ))
        }
        (None, None) => {}
    }
    if url.tls {
        let tls = client_config(login.ca.as_deref()).map_err(ReplayError::Broker)?;
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    } else if login.ca.is_some() {
        return Err(ReplayError::Broker(format!(
            "--ca is for a TLS broker: `{broker}` is not mqtts://"
        )));
    }
    Ok(opts)
}

/// One line of a fixture.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureLine {
    t_ms: u64,
    topic: String,
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    payload_b64: Option<String>,
    #[serde(default = "default_qos")]
    qos: u8,
    /// What the edge should make of the message (format fixtures): read by tests, not replayed.
    #[serde(default, rename = "expect")]
    _expect: Option<Value>,
}

const fn default_qos() -> u8 {
    1
}

/// One message ready to publish.
#[derive(Debug, Clone)]
pub struct FixtureMessage {
    pub t_ms: u64,
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
}

/// How fast to replay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    /// Original timing divided by this factor.
    Factor(f64),
    /// As fast as the broker acknowledges.
    Max,
}

impl std::str::FromStr for Speed {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "max" {
            return Ok(Speed::Max);
        }
        match s.parse::<f64>() {
            Ok(f) if f > 0.0 && f.is_finite() => Ok(Speed::Factor(f)),
            _ => Err(format!("`{s}`: expected a positive number or `max`")),
        }
    }
}

/// Reads and checks a whole fixture; any bad line is an error naming it.
pub fn load_fixture(path: &Path) -> Result<Vec<FixtureMessage>, ReplayError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ReplayError::Read {
        file: file.clone(),
        source,
    })?;
    parse_fixture(&text, &file)
}

pub fn parse_fixture(text: &str, file: &str) -> Result<Vec<FixtureMessage>, ReplayError> {
    let mut out = Vec::new();
    let mut last_t = 0;
    for (i, line) in text.lines().enumerate() {
        let bad = |message: String| ReplayError::Fixture {
            file: file.to_owned(),
            line: i + 1,
            message,
        };
        if line.trim().is_empty() || line.starts_with("//") {
            continue;
        }
        let l: FixtureLine = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let payload = match (l.payload, l.payload_b64) {
            (Some(Value::String(s)), None) => s.into_bytes(),
            (Some(v), None) => v.to_string().into_bytes(),
            (None, Some(b)) => B64
                .decode(b)
                .map_err(|e| bad(format!("payload_b64: {e}")))?,
            (None, None) => Vec::new(),
            (Some(_), Some(_)) => return Err(bad("set one of payload and payload_b64".into())),
        };
        let qos = match l.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            2 => QoS::ExactlyOnce,
            q => return Err(bad(format!("qos {q} is not 0, 1 or 2"))),
        };
        if l.t_ms < last_t {
            return Err(bad(format!(
                "t_ms {} goes back in time (previous {last_t})",
                l.t_ms
            )));
        }
        if l.topic.is_empty() || l.topic.contains(['+', '#']) {
            return Err(bad("topic must be non-empty, without wildcards".into()));
        }
        last_t = l.t_ms;
        out.push(FixtureMessage {
            t_ms: l.t_ms,
            topic: l.topic,
            payload,
            qos,
        });
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy)]
pub struct ReplaySummary {
    pub messages: u64,
    pub seconds: f64,
}

impl ReplaySummary {
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.messages as f64 / self.seconds
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "replayed {} messages in {:.2} s ({:.0} messages/s)",
            self.messages,
            self.seconds,
            self.rate()
        )
    }
}

/// What the connection has achieved so far, as the event loop sees it.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// The broker accepted the connection (CONNACK).
    connected: bool,
    /// Messages the broker has taken: QoS 1 and 2 ones it acknowledged, QoS 0 ones written to it.
    delivered: u64,
    /// Why the connection ended, if it failed.
    error: Option<String>,
}

impl Progress {
    /// The error to report once the connection failed with `error`.
    fn failure(&self, broker: &str, error: String) -> ReplayError {
        if self.connected {
            ReplayError::Connection {
                delivered: self.delivered,
                error,
            }
        } else {
            ReplayError::Unreachable {
                broker: broker.to_owned(),
                error,
            }
        }
    }
}

/// Whether an event says the broker has taken a message: a QoS 1 or 2 acknowledgement, or a QoS 0
/// publish (packet id 0) written to it, which has no reply to come.
fn is_delivery(e: &Event) -> bool {
    matches!(
        e,
        Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))
            | Event::Outgoing(rumqttc::Outgoing::Publish(0))
    )
}

/// A connection error in a user's words: `connection refused`, not `I/O: Connection refused
/// (os error 111)`.
fn describe(e: &rumqttc::ConnectionError) -> String {
    use std::io::ErrorKind as K;
    match e {
        rumqttc::ConnectionError::Io(io) => match io.kind() {
            k @ (K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::TimedOut
            | K::HostUnreachable
            | K::NetworkUnreachable
            | K::AddrNotAvailable
            | K::UnexpectedEof) => k.to_string(),
            _ => io.to_string(),
        },
        other => other.to_string(),
    }
}

/// Publishes `messages` to `broker` (`mqtt://host:port` or `mqtts://host:port`), logged in
/// with `login`. With `looped`, starts over after the last message until `stop` resolves.
/// Returns once the broker has taken every message; the summary counts only what it took.
#[allow(clippy::too_many_arguments)]
pub async fn replay(
    messages: &[FixtureMessage],
    broker: &str,
    login: &BrokerLogin,
    speed: Speed,
    looped: bool,
    progress: bool,
    stop: impl std::future::Future<Output = ()>,
) -> Result<ReplaySummary, ReplayError> {
    let mut opts = client_options(broker, login)?;
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(1000)
        .set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);

    // The client's queue takes messages whether or not a broker is there, so what counts is
    // what the event loop reports: acknowledgements and QoS 0 writes.
    let (state_tx, state_rx) = tokio::sync::watch::channel(Progress::default());
    let events = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    state_tx.send_modify(|p| p.connected = true);
                }
                Ok(e) if is_delivery(&e) => state_tx.send_modify(|p| p.delivered += 1),
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    // Packets read together with the end of the connection are still queued.
                    let late = eventloop.state.events.iter().filter(|e| is_delivery(e));
                    let late = late.count() as u64;
                    state_tx.send_modify(|p| {
                        p.delivered += late;
                        p.error = Some(describe(&e));
                    });
                    return;
                }
            }
        }
    });

    let total = if looped {
        None
    } else {
        Some(messages.len() as u64)
    };
    let bar = if progress {
        let b = match total {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::new_spinner(),
        };
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} {bar:40} {pos}/{len} messages {per_sec} {elapsed}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };

    let failed = |error: Option<String>| -> ReplayError {
        let state = state_rx.borrow().clone();
        let error = error
            .or(state.error.clone())
            .unwrap_or_else(|| "the connection closed".to_owned());
        state.failure(broker, error)
    };
    let start = Instant::now();
    let mut sent = 0u64;
    let mut offset_ms = 0u64;
    tokio::pin!(stop);
    'outer: loop {
        for m in messages {
            if let Speed::Factor(f) = speed {
                let at = start + Duration::from_secs_f64((offset_ms + m.t_ms) as f64 / 1000.0 / f);
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = &mut stop => break 'outer,
                }
            }
            if state_rx.borrow().error.is_some() {
                return Err(failed(None));
            }
            if client
                .publish(m.topic.clone(), m.qos, false, m.payload.clone())
                .await
                .is_err()
            {
                // The event loop has ended: its state says why.
                return Err(failed(None));
            }
            sent += 1;
            bar.inc(1);
        }
        if !looped || messages.is_empty() {
            break;
        }
        offset_ms += messages.last().map_or(0, |m| m.t_ms) + 1;
    }
    let mut rx = state_rx.clone();
    let done = rx
        .wait_for(|p| p.delivered >= sent || p.error.is_some())
        .await
        .map(|p| p.clone())
        .map_err(|_| failed(Some("the connection closed".to_owned())))?;
    if let (Some(error), true) = (&done.error, done.delivered < sent) {
        return Err(done.failure(broker, error.clone()));
    }
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), events).await;
    Ok(ReplaySummary {
        messages: done.delivered,
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_payload_form() {
        let text = r#"{"t_ms":0,"topic":"a/b","payload":{"hr":72}}
{"t_ms":5,"topic":"a/c","payload":"raw text","qos":0}
{"t_ms":5,"topic":"a/d","payload_b64":"AFU="}
"#;
        let m = parse_fixture(text, "f").unwrap();
        assert_eq!(m[0].payload, br#"{"hr":72}"#);
        assert_eq!(m[1].payload, b"raw text");
        assert_eq!(m[1].qos, QoS::AtMostOnce);
        assert_eq!(m[2].payload, [0x00, 0x55]);
        assert_eq!(m[2].qos, QoS::AtLeastOnce);
    }

    #[test]
    fn bad_lines_are_named() {
        for (text, want) in [
            ("{\"t_ms\":0,\"topic\":\"a\"}\n{\"t_ms\":1}\n", "f:2:"),
            (
                "{\"t_ms\":5,\"topic\":\"a\"}\n{\"t_ms\":1,\"topic\":\"a\"}\n",
                "f:2: t_ms 1 goes back",
            ),
            ("{\"t_ms\":0,\"topic\":\"a/#\"}\n", "f:1: topic"),
            ("{\"t_ms\":0,\"topic\":\"a\",\"qos\":3}\n", "f:1: qos 3"),
            (
                "{\"t_ms\":0,\"topic\":\"a\",\"payload_b64\":\"!!\"}\n",
                "f:1: payload_b64",
            ),
            ("{\"t_ms\":0,\"topic\":\"a\",\"extra\":1}\n", "f:1:"),
        ] {
            let e = parse_fixture(text, "f").unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
        }
        assert_eq!("max".parse::<Speed>().unwrap(), Speed::Max);
        assert_eq!("2.5".parse::<Speed>().unwrap(), Speed::Factor(2.5));
        assert!("0".parse::<Speed>().is_err());
        assert!("fast".parse::<Speed>().is_err());
    }
}
