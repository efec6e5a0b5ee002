//! The external broker (a hospital's MQTT broker): an MQTT 5 persistent session (clean start off,
//! a session that never expires), QoS 1 subscriptions to every route's filter, and
//! acknowledgements sent only once a message's readings are stored. A crash therefore loses
//! nothing the broker considers delivered: it resends every unacknowledged message when the
//! session resumes (so a reading may, rarely, be stored twice).
//!
//! The incoming window is MQTT 5's Receive Maximum (`broker.inflight`, 65,535 by default): the
//! broker may send that many messages ahead of their acknowledgements, which keeps it sending
//! through a commit, and keeps what it holds for this session in flight rather than in its
//! queue (a broker drops from a full queue: mosquitto's default holds 1,000 messages). MQTT
//! 3.1.1 has no such window (mosquitto allows 20), which is why this client speaks MQTT 5.
//! `broker.max_packet_bytes` is announced as the Maximum Packet Size, so the broker withholds
//! larger messages instead of sending something that would break the session; payloads above
//! `ingest.max_payload_bytes` are dead-lettered and acknowledged by ingest.
//!
//! Two connections: the receiving session (`session.rs`), and one that publishes alarms and dead
//! letters (rumqttc), so that neither can hold up the other. Both log in with the node's account
//! (`broker.external_username`, its password read at start from `external_password_file`) and,
//! for an `mqtts://` broker, speak TLS on ring, trusting `external_ca` or the system's roots.

mod session;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::config::BrokerConfig;
use crate::pipeline::health::{Health, Problem};
use crate::pipeline::input::InputSender;
use crate::pipeline::{AckToken, Acker, GiveUp, Publisher};
use crate::topic::check_topic_name;
use crate::transport::credentials::read_password_file;
use crate::transport::tls_client::{client_config, BrokerUrl};

const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Requests the publishing connection queues (alarms and dead letters on their way out).
const PUBLISH_QUEUE: usize = 1024;

/// Ingest's input, for as long as the session hands it messages: a stop takes it out (and so
/// ends ingest's input) whatever the session is doing at that moment.
pub(crate) type InputSlot = Arc<Mutex<Option<InputSender>>>;

/// A password: kept out of every `Debug` output, and so out of logs.
#[derive(Clone)]
pub struct Secret(pub(crate) String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// The running connections to the external broker.
pub struct ExternalBroker {
    publisher: AsyncClient,
    input: InputSlot,
    stopping: watch::Sender<bool>,
    finish: watch::Sender<bool>,
    publishing_stopped: Arc<AtomicBool>,
    receive: tokio::task::JoinHandle<()>,
    publish: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ExternalBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExternalBroker")
    }
}

impl ExternalBroker {
    /// Starts connecting in the background (health shows `broker` until the session is up and
    /// every subscription accepted). `ended` is called if a connection's task ends on its own
    /// (a panic): the service must then fail. Alarms waiting for the publishing connection
    /// give up once `give_up` is due.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        url: &str,
        client_id: &str,
        filters: Vec<String>,
        c: &BrokerConfig,
        input: InputSender,
        health: Arc<Health>,
        give_up: GiveUp,
        ended: Arc<dyn Fn(String) + Send + Sync>,
    ) -> Result<(Self, ClientPublisher, ClientAcker), String> {
        let BrokerUrl { host, port, tls } = BrokerUrl::parse(url)?;
        let login = match (&c.external_username, &c.external_password_file) {
            (Some(name), Some(file)) => {
                let password = read_password_file(file)
                    .map_err(|e| format!("broker.external_password_file: {e}"))?;
                Some((name.clone(), Secret(password)))
            }
            _ => None,
        };
        let tls = if tls {
            Some(
                client_config(c.external_ca.as_deref())
                    .map_err(|e| format!("broker.external_ca: {e}"))?,
            )
        } else {
            None
        };
        let server_name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("broker.external: `{host}`: {e}"))?;
        let cfg = session::SessionConfig {
            host: host.clone(),
            port,
            client_id: client_id.to_owned(),
            filters,
            window: c.inflight.max(1),
            max_packet: c.max_packet_bytes,
            keep_alive: KEEP_ALIVE,
            login: login.clone(),
            tls: tls
                .clone()
                .map(|t| (tokio_rustls::TlsConnector::from(t), server_name)),
        };
        let mut out_opts = MqttOptions::new(format!("{client_id}-out"), host, port);
        out_opts
            .set_clean_start(false)
            .set_session_expiry_interval(Some(u32::MAX))
            .set_keep_alive(KEEP_ALIVE)
            .set_max_packet_size(Some(c.max_packet_bytes.min(u32::MAX as usize) as u32));
        if let Some((name, password)) = login {
            out_opts.set_credentials(name, password.0);
        }
        if let Some(tls) = tls {
            out_opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        }
        let (publisher, out_loop) = AsyncClient::new(out_opts, PUBLISH_QUEUE);
        let epoch = Arc::new(AtomicU64::new(0));
        let (stopping, stopping_rx) = watch::channel(false);
        let (finish, finish_rx) = watch::channel(false);
        health.problem(Problem::Broker, &format!("connecting to {url}"));
        health.problem(Problem::Publishing, &format!("connecting to {url}"));
        let supervised = |name: &'static str, task: tokio::task::JoinHandle<()>| {
            let ended = ended.clone();
            let finish = finish_rx.clone();
            tokio::spawn(async move {
                let outcome = task.await;
                if !*finish.borrow() {
                    let why = match outcome {
                        Ok(()) => "ended".to_owned(),
                        Err(e) if e.is_panic() => "panicked".to_owned(),
                        Err(e) => e.to_string(),
                    };
                    ended(format!("external broker {name}: {why}"));
                }
            })
        };
        let input: InputSlot = Arc::new(Mutex::new(Some(input)));
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let receive = supervised(
            "session",
            tokio::spawn(session::run(
                cfg,
                input.clone(),
                health.clone(),
                ack_rx,
                epoch,
                stopping_rx,
                finish_rx.clone(),
            )),
        );
        let publish = supervised(
            "publisher",
            tokio::spawn(publish(out_loop, health, finish_rx.clone())),
        );
        let publishing_stopped = Arc::new(AtomicBool::new(false));
        Ok((
            ExternalBroker {
                publisher: publisher.clone(),
                input,
                stopping,
                finish,
                publishing_stopped: publishing_stopped.clone(),
                receive,
                publish,
            },
            ClientPublisher {
                client: publisher,
                stopped: publishing_stopped,
                give_up,
            },
            ClientAcker { tx: ack_tx },
        ))
    }

    /// Stops handing messages to ingest, at once: ingest's input ends, and the messages the
    /// broker sends from now on are left unacknowledged, so it resends them next session.
    pub async fn stop_accepting(&mut self) {
        self.input.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.stopping.send_replace(true);
    }

    /// Commit and output have ended: every acknowledgement and alarm is queued. Sends them,
    /// then each connection's DISCONNECT, and waits for the tasks until `deadline`. False if
    /// something had to be abandoned.
    pub async fn finish(self, deadline: Instant) -> bool {
        let deadline = tokio::time::Instant::from(deadline);
        // A publisher still retrying would hold output; it gives up now.
        self.publishing_stopped.store(true, Ordering::Release);
        self.finish.send_replace(true);
        // Requests go out in order: the DISCONNECT after every queued publish.
        let _ = tokio::time::timeout_at(deadline, self.publisher.disconnect()).await;
        let received = tokio::time::timeout_at(deadline, self.receive)
            .await
            .is_ok();
        let published = tokio::time::timeout_at(deadline, self.publish)
            .await
            .is_ok();
        received && published
    }
}

/// Drives the publishing connection: always polling, reconnecting with back-off, until its
/// DISCONNECT is out after a stop. Health shows `publishing` while it is not connected: output
/// (and ingest behind it) waits for it, so the broker keeps the readings meanwhile.
async fn publish(mut eventloop: EventLoop, health: Arc<Health>, finish: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match eventloop.poll().await {
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) if *finish.borrow() => {
                let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
                return;
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                health.clear(Problem::Publishing);
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if !matches!(
                    ack.reason,
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                ) {
                    // The broker took the message and dropped it (an ACL, a quota): say so,
                    // without the topic (it names a patient).
                    warn!(reason = ?ack.reason, "the external broker refused an alarm or dead letter");
                }
            }
            Ok(_) => {}
            Err(e) => {
                if *finish.borrow() {
                    return;
                }
                health.problem(
                    Problem::Publishing,
                    &format!("alarms and dead letters cannot be published: {e}"),
                );
                warn!(error = %e, retry_in = ?backoff, "external broker publishing connection failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Acknowledges stored messages to the external broker: the receiving session writes them, a
/// commit's worth at a time. Those of an earlier connection are dropped (their messages come
/// again on the resumed session).
#[derive(Debug, Clone)]
pub struct ClientAcker {
    tx: mpsc::UnboundedSender<Vec<AckToken>>,
}

impl Acker for ClientAcker {
    fn ack(&mut self, tokens: &[AckToken]) {
        // Bounded by the broker's window: it sends no more than that unacknowledged.
        let _ = self.tx.send(tokens.to_vec());
    }
}

/// Publishes alarms and dead letters through the external broker's publishing connection, at
/// QoS 1. While that connection's queue is full (the broker is slow or away) it waits, and so
/// does ingest behind it; once a stop's give-up time has come it gives up instead.
pub struct ClientPublisher {
    client: AsyncClient,
    stopped: Arc<AtomicBool>,
    give_up: GiveUp,
}

impl Publisher for ClientPublisher {
    fn publish(&mut self, topic: String, payload: Bytes, retain: bool) -> Result<(), String> {
        // rumqttc answers an invalid topic as it answers a full queue: it must never get one,
        // or this would wait on it for good.
        check_topic_name(topic.as_bytes()).map_err(|e| e.to_string())?;
        let mut wait = Duration::from_millis(1);
        loop {
            match self
                .client
                .try_publish(topic.clone(), QoS::AtLeastOnce, retain, payload.clone())
            {
                Ok(()) => return Ok(()),
                Err(rumqttc::v5::ClientError::TryRequest(_))
                    if !self.stopped.load(Ordering::Acquire) && !self.give_up.due() =>
                {
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_millis(100));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}
