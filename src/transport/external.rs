//! The external broker (a hospital's MQTT broker): an MQTT 5 persistent session (clean start off,
//! a session that never expires), QoS 1 subscriptions to every route's filter, and manual
//! acknowledgements sent only once a message's readings are stored. A crash therefore loses
//! nothing the broker considers delivered: it resends every unacknowledged message when the
//! session resumes (so a reading may, rarely, be stored twice).
//!
//! The incoming window is MQTT 5's Receive Maximum (`broker.inflight`): the broker may send that
//! many messages before the first is acknowledged, which covers the messages of a commit cycle.
//! MQTT 3.1.1 has no such window (mosquitto's default is 20 messages), which is why this client
//! speaks MQTT 5. `broker.max_packet_bytes` is announced as the Maximum Packet Size, so the
//! broker withholds larger messages instead of sending something that would break the session;
//! payloads above `ingest.max_payload_bytes` are dead-lettered and acknowledged by ingest.
//!
//! Two connections: the session that receives (its task stops polling while ingest's queue is
//! full or intake is paused, so nothing more is read and the broker keeps the messages; if the
//! pause outlasts the keep-alive the broker drops the connection, and resends them all when the
//! session resumes), and one that publishes alarms and dead letters, so that neither can hold up
//! the other. Acknowledgements go through a task of their own that waits for room in the
//! receiving client's request queue: none is ever dropped (a dropped one would hold a slot of the
//! broker's window for the rest of the session).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{parse_mqtt_url, BrokerConfig};
use crate::pipeline::health::{Health, Problem};
use crate::pipeline::input::{InputSender, Received};
use crate::pipeline::{AckToken, Acker, Publisher};

const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Requests the publishing connection queues (alarms and dead letters on their way out).
const PUBLISH_QUEUE: usize = 1024;

/// The running connections to the external broker.
pub struct ExternalBroker {
    client: AsyncClient,
    publisher: AsyncClient,
    stopping: watch::Sender<bool>,
    finish: watch::Sender<bool>,
    publishing_stopped: Arc<AtomicBool>,
    receive: tokio::task::JoinHandle<()>,
    acks: tokio::task::JoinHandle<()>,
    publish: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ExternalBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExternalBroker")
    }
}

fn options(url: &str, client_id: &str, c: &BrokerConfig) -> Result<MqttOptions, String> {
    let (host, port) = parse_mqtt_url(url)?;
    let mut opts = MqttOptions::new(client_id, host, port);
    opts.set_clean_start(false)
        .set_session_expiry_interval(Some(u32::MAX))
        .set_keep_alive(KEEP_ALIVE)
        .set_max_packet_size(Some(c.max_packet_bytes.min(u32::MAX as usize) as u32));
    Ok(opts)
}

impl ExternalBroker {
    /// Starts connecting in the background (health shows `broker` until the session is up and
    /// every subscription accepted). `ended` is called if a connection's task ends on its own
    /// (a panic): the service must then fail.
    pub fn start(
        url: &str,
        client_id: &str,
        filters: Vec<String>,
        c: &BrokerConfig,
        input: InputSender,
        health: Arc<Health>,
        ended: Arc<dyn Fn(String) + Send + Sync>,
    ) -> Result<(Self, ClientPublisher, ClientAcker), String> {
        let window = c.inflight.max(1);
        let mut opts = options(url, client_id, c)?;
        opts.set_manual_acks(true).set_receive_maximum(Some(window));
        // The request queue holds a whole window of acknowledgements and the subscriptions.
        let (client, eventloop) = AsyncClient::new(opts, usize::from(window) + 64);
        let out_opts = options(url, &format!("{client_id}-out"), c)?;
        let (publisher, out_loop) = AsyncClient::new(out_opts, PUBLISH_QUEUE);
        let epoch = Arc::new(AtomicU64::new(0));
        let (stopping, stopping_rx) = watch::channel(false);
        let (finish, finish_rx) = watch::channel(false);
        health.problem(Problem::Broker, &format!("connecting to {url}"));
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
        let receive = supervised(
            "session",
            tokio::spawn(receive(
                eventloop,
                client.clone(),
                filters,
                Some(input),
                health,
                epoch.clone(),
                stopping_rx,
                finish_rx.clone(),
            )),
        );
        let (ack_tx, ack_rx) = flume::unbounded();
        let acks = tokio::spawn(pump_acks(ack_rx, client.clone(), epoch.clone()));
        let publish = supervised(
            "publisher",
            tokio::spawn(publish(out_loop, finish_rx.clone())),
        );
        let publishing_stopped = Arc::new(AtomicBool::new(false));
        Ok((
            ExternalBroker {
                client,
                publisher: publisher.clone(),
                stopping,
                finish,
                publishing_stopped: publishing_stopped.clone(),
                receive,
                acks,
                publish,
            },
            ClientPublisher {
                client: publisher,
                stopped: publishing_stopped,
            },
            ClientAcker { tx: ack_tx },
        ))
    }

    /// Stops handing messages to ingest: those the broker sends from now on are left
    /// unacknowledged, so it resends them next session.
    pub async fn stop_accepting(&mut self) {
        self.stopping.send_replace(true);
    }

    /// Commit and output have ended: every acknowledgement and alarm is queued. Sends them,
    /// then each connection's DISCONNECT, and waits for the tasks until `deadline`. False if
    /// something had to be abandoned.
    pub async fn finish(self, deadline: Instant) -> bool {
        let deadline = tokio::time::Instant::from(deadline);
        // A publisher still retrying would hold output; it gives up now.
        self.publishing_stopped.store(true, Ordering::Release);
        // The acknowledgements first: the pump ends once commit's acker is gone and every
        // token is handed to the client.
        let acks_sent = tokio::time::timeout_at(deadline, self.acks).await.is_ok();
        self.finish.send_replace(true);
        // Requests go out in order: the DISCONNECTs after every acknowledgement and publish.
        let _ = tokio::time::timeout_at(deadline, self.client.disconnect()).await;
        let _ = tokio::time::timeout_at(deadline, self.publisher.disconnect()).await;
        let received = tokio::time::timeout_at(deadline, self.receive)
            .await
            .is_ok();
        let published = tokio::time::timeout_at(deadline, self.publish)
            .await
            .is_ok();
        acks_sent && received && published
    }
}

/// Hands acknowledgements to the receiving client, waiting for room in its request queue.
/// Tokens of an earlier connection are dropped: the broker resends those messages on the
/// resumed session.
async fn pump_acks(rx: flume::Receiver<AckToken>, client: AsyncClient, epoch: Arc<AtomicU64>) {
    while let Ok(t) = rx.recv_async().await {
        if t.session() != epoch.load(Ordering::Acquire) {
            continue;
        }
        let qos = if t.qos() == 2 {
            QoS::ExactlyOnce
        } else {
            QoS::AtLeastOnce
        };
        let mut p = Publish::new("", qos, Bytes::new(), None);
        p.pkid = t.packet_id();
        if client.ack(&p).await.is_err() {
            return;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn receive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filters: Vec<String>,
    mut input: Option<InputSender>,
    health: Arc<Health>,
    epoch: Arc<AtomicU64>,
    mut stopping: watch::Receiver<bool>,
    mut finish: watch::Receiver<bool>,
) {
    let mut intake = health.intake();
    let mut backoff = Duration::from_millis(100);
    let mut subscriptions_pending = 0usize;
    let mut subscription_refused = false;
    loop {
        if *stopping.borrow() {
            input = None;
        }
        let event = tokio::select! {
            e = eventloop.poll() => e,
            _ = stopping.wait_for(|s| *s), if input.is_some() => continue,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                epoch.fetch_add(1, Ordering::AcqRel);
                backoff = Duration::from_millis(100);
                info!(
                    session_present = ack.session_present,
                    "connected to the external broker"
                );
                if *finish.borrow() {
                    continue;
                }
                subscriptions_pending = filters.len();
                subscription_refused = false;
                for f in &filters {
                    if let Err(e) = client.try_subscribe(f.as_str(), QoS::AtLeastOnce) {
                        health.problem(Problem::Broker, &format!("cannot subscribe: {e}"));
                    }
                }
                if filters.is_empty() {
                    health.clear(Problem::Broker);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| !matches!(c, SubscribeReasonCode::Success(_)));
                subscriptions_pending = subscriptions_pending.saturating_sub(1);
                if refused {
                    subscription_refused = true;
                    health.problem(
                        Problem::Broker,
                        "the external broker refused a subscription (check its ACL for this client)",
                    );
                } else if subscriptions_pending == 0 && !subscription_refused {
                    health.clear(Problem::Broker);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Some(sender) = input.as_ref() else {
                    // Stopping: left unacknowledged, resent next session.
                    continue;
                };
                let session = epoch.load(Ordering::Acquire);
                let ack = match p.qos {
                    QoS::AtMostOnce => None,
                    QoS::AtLeastOnce => Some(AckToken::new(session, p.pkid, 1)),
                    QoS::ExactlyOnce => Some(AckToken::new(session, p.pkid, 2)),
                };
                let received = Received::new(p.topic, p.payload, ack);
                // Not polling while this waits: nothing more is read, the broker keeps it.
                tokio::select! {
                    r = async {
                        let _ = intake.wait_for(|open| *open).await;
                        sender.send(received).await
                    } => if r.is_err() { input = None },
                    _ = stopping.wait_for(|s| *s) => input = None,
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                if *finish.borrow() {
                    // Let the event loop write the DISCONNECT out.
                    let _ =
                        tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                // Acknowledgements made from now on name messages of the broken connection.
                epoch.fetch_add(1, Ordering::AcqRel);
                if *finish.borrow() {
                    return;
                }
                health.problem(Problem::Broker, &format!("external broker: {e}"));
                warn!(error = %e, retry_in = ?backoff, "external broker connection failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = finish.wait_for(|f| *f) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Drives the publishing connection: always polling, reconnecting with back-off, until its
/// DISCONNECT is out after a stop.
async fn publish(mut eventloop: EventLoop, finish: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match eventloop.poll().await {
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) if *finish.borrow() => {
                let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
                return;
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => backoff = Duration::from_millis(100),
            Ok(_) => {}
            Err(e) => {
                if *finish.borrow() {
                    return;
                }
                warn!(error = %e, retry_in = ?backoff, "external broker publishing connection failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Acknowledges stored messages to the external broker, through the acknowledgement task.
///
/// Acknowledgements already queued when a connection drops go out on the next one. With the
/// session resumed, their packet ids name the same messages, resent: right. With the session
/// lost (a broker that forgot it), they reach the broker before the new SUBSCRIBE (requests go
/// out in order), so before it has any message for this client that they could name.
#[derive(Debug, Clone)]
pub struct ClientAcker {
    tx: flume::Sender<AckToken>,
}

impl Acker for ClientAcker {
    fn ack(&mut self, tokens: &[AckToken]) {
        for t in tokens {
            // Bounded by the broker's window: it sends no more than that unacknowledged.
            let _ = self.tx.send(*t);
        }
    }
}

/// Publishes alarms and dead letters through the external broker's publishing connection, at
/// QoS 1. While that connection's queue is full (the broker is slow or away) it waits, and so
/// does ingest behind it; once the service is stopping it gives up instead.
pub struct ClientPublisher {
    client: AsyncClient,
    stopped: Arc<AtomicBool>,
}

impl Publisher for ClientPublisher {
    fn publish(&mut self, topic: String, payload: Bytes, retain: bool) -> Result<(), String> {
        let mut wait = Duration::from_millis(1);
        loop {
            match self
                .client
                .try_publish(topic.clone(), QoS::AtLeastOnce, retain, payload.clone())
            {
                Ok(()) => return Ok(()),
                Err(rumqttc::v5::ClientError::TryRequest(_))
                    if !self.stopped.load(Ordering::Acquire) =>
                {
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_millis(100));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}
