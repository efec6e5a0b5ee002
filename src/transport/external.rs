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
//! The connection runs as one task that polls rumqttc's event loop. While ingest's queue is full
//! or intake is paused it stops polling, so nothing more is read (the broker keeps the messages;
//! if the pause outlasts the keep-alive it drops the connection, and resends them all when the
//! session resumes).

use std::sync::atomic::{AtomicU64, Ordering};
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

/// The running connection to the external broker.
pub struct ExternalBroker {
    client: AsyncClient,
    stopping: watch::Sender<bool>,
    finish: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ExternalBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExternalBroker")
    }
}

impl ExternalBroker {
    /// Starts connecting in the background (health shows `broker` until the session is up and
    /// every subscription accepted).
    pub fn start(
        url: &str,
        client_id: &str,
        filters: Vec<String>,
        c: &BrokerConfig,
        input: InputSender,
        health: Arc<Health>,
    ) -> Result<(Self, ClientPublisher, ClientAcker), String> {
        let (host, port) = parse_mqtt_url(url)?;
        let window = c.inflight.max(1);
        let mut opts = MqttOptions::new(client_id, host, port);
        opts.set_clean_start(false)
            .set_session_expiry_interval(Some(u32::MAX))
            .set_manual_acks(true)
            .set_keep_alive(KEEP_ALIVE)
            .set_receive_maximum(Some(window))
            .set_max_packet_size(Some(c.max_packet_bytes.min(u32::MAX as usize) as u32));
        // Every message of the window may need an acknowledgement, and alarms and dead letters
        // go out through the same channel: it never fills.
        let (client, eventloop) = AsyncClient::new(opts, usize::from(window) + 8192);
        let epoch = Arc::new(AtomicU64::new(0));
        let (stopping, stopping_rx) = watch::channel(false);
        let (finish, finish_rx) = watch::channel(false);
        health.problem(Problem::Broker, &format!("connecting to {url}"));
        let task = tokio::spawn(run(
            eventloop,
            client.clone(),
            filters,
            Some(input),
            health,
            epoch.clone(),
            stopping_rx,
            finish_rx,
        ));
        Ok((
            ExternalBroker {
                client: client.clone(),
                stopping,
                finish,
                task,
            },
            ClientPublisher(client.clone()),
            ClientAcker { client, epoch },
        ))
    }

    /// Stops handing messages to ingest: those the broker sends from now on are left
    /// unacknowledged, so it resends them next session.
    pub async fn stop_accepting(&mut self) {
        self.stopping.send_replace(true);
    }

    /// Every acknowledgement is queued: sends them, then DISCONNECT, and waits for the
    /// connection task until `deadline`. False if it had to be abandoned.
    pub async fn finish(self, deadline: Instant) -> bool {
        self.finish.send_replace(true);
        // Requests go out in order: every queued acknowledgement before the DISCONNECT.
        let _ = self.client.try_disconnect();
        let mut task = self.task;
        match tokio::time::timeout_at(deadline.into(), &mut task).await {
            Ok(_) => true,
            Err(_) => {
                task.abort();
                false
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
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
                let ack = match p.qos {
                    QoS::AtMostOnce => None,
                    QoS::AtLeastOnce => {
                        Some(AckToken::new(epoch.load(Ordering::Acquire), p.pkid, 1))
                    }
                    QoS::ExactlyOnce => {
                        Some(AckToken::new(epoch.load(Ordering::Acquire), p.pkid, 2))
                    }
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

/// Acknowledges stored messages to the external broker. Tokens of an earlier connection are
/// dropped: the broker resends those messages on the resumed session.
///
/// Acknowledgements already queued when a connection drops go out on the next one. With the
/// session resumed, their packet ids name the same messages, resent: right. With the session
/// lost (a broker that forgot it), they reach the broker before the new SUBSCRIBE (requests go
/// out in order), so before it has any message for this client that they could name.
#[derive(Debug, Clone)]
pub struct ClientAcker {
    client: AsyncClient,
    epoch: Arc<AtomicU64>,
}

impl Acker for ClientAcker {
    fn ack(&mut self, tokens: &[AckToken]) {
        let epoch = self.epoch.load(Ordering::Acquire);
        for t in tokens {
            if t.session() != epoch {
                continue;
            }
            let mut p = Publish::new(
                "",
                if t.qos() == 2 {
                    QoS::ExactlyOnce
                } else {
                    QoS::AtLeastOnce
                },
                Bytes::new(),
                None,
            );
            p.pkid = t.packet_id();
            // The request channel holds a whole window: it cannot be full.
            let _ = self.client.try_ack(&p);
        }
    }
}

/// Publishes alarms and dead letters through the external broker, at QoS 1.
pub struct ClientPublisher(pub AsyncClient);

impl Publisher for ClientPublisher {
    fn publish(&mut self, topic: String, payload: Bytes, retain: bool) -> Result<(), String> {
        let mut backoff = Duration::from_millis(1);
        loop {
            match self
                .0
                .try_publish(topic.clone(), QoS::AtLeastOnce, retain, payload.clone())
            {
                Ok(()) => return Ok(()),
                Err(rumqttc::v5::ClientError::TryRequest(_))
                    if backoff < Duration::from_secs(5) =>
                {
                    std::thread::sleep(backoff);
                    backoff *= 2;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}
