//! Input from an external broker: a persistent session (clean session off), QoS 1 subscriptions
//! to every route's filter, and manual acknowledgements sent only after a message's readings
//! are stored. A crash therefore loses nothing the broker considers delivered: it resends every
//! unacknowledged message when the session resumes (so a reading may, rarely, be stored twice).

use std::thread;
use std::time::{Duration, Instant};

use rumqttc::{Client, Connection, Event, MqttOptions, Packet, QoS};
use tracing::{info, warn};

use crate::config::parse_mqtt_url;
use crate::pipeline::{Acker, Incoming, Input, InputClosed, Publisher};
use bytes::Bytes;

/// Enough for every packet id MQTT has, so the connection thread can never block on ingest
/// (it must keep draining the acknowledgements the commit stage sends).
const CHANNEL_CAPACITY: usize = 65_536;

/// A connection to the external broker: the client (cheap to clone; acks and publishes go
/// through it) and its input.
pub struct ExternalBroker {
    pub client: Client,
    pub input: ExternalInput,
}

pub struct ExternalInput {
    rx: flume::Receiver<Incoming>,
}

impl ExternalBroker {
    /// Connects in the background and subscribes to `filters` at each (re)connection.
    pub fn connect(
        url: &str,
        client_id: &str,
        filters: Vec<String>,
        inflight: u16,
        max_packet_bytes: usize,
    ) -> Result<Self, String> {
        let (host, port) = parse_mqtt_url(url)?;
        let mut opts = MqttOptions::new(client_id, host, port);
        opts.set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(15))
            .set_inflight(inflight.max(1))
            .set_max_packet_size(max_packet_bytes, max_packet_bytes);
        let (client, connection) = Client::new(opts, 4096);
        let (tx, rx) = flume::bounded(CHANNEL_CAPACITY);
        let sub_client = client.clone();
        thread::Builder::new()
            .name("mqtt-external".into())
            .spawn(move || run_connection(connection, sub_client, filters, tx))
            .map_err(|e| e.to_string())?;
        Ok(ExternalBroker {
            client,
            input: ExternalInput { rx },
        })
    }
}

fn run_connection(
    mut connection: Connection,
    client: Client,
    filters: Vec<String>,
    tx: flume::Sender<Incoming>,
) {
    let mut backoff = Duration::from_millis(100);
    for event in connection.iter() {
        match event {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let incoming = Incoming {
                    topic: p.topic.clone().into(),
                    payload: p.payload.clone(),
                    ack: Some(p),
                };
                if tx.send(incoming).is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                info!(
                    session_present = ack.session_present,
                    "connected to the external broker"
                );
                backoff = Duration::from_millis(100);
                for f in &filters {
                    if let Err(e) = client.try_subscribe(f.as_str(), QoS::AtLeastOnce) {
                        warn!(filter = %f, error = %e, "cannot subscribe");
                    }
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                info!("disconnecting from the external broker");
            }
            Ok(_) => {}
            Err(rumqttc::ConnectionError::RequestsDone) => return,
            Err(e) => {
                if tx.is_disconnected() {
                    return;
                }
                warn!(error = %e, retry_in = ?backoff, "external broker connection failed");
                thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

impl Input for ExternalInput {
    fn recv(&mut self, deadline: Instant) -> Result<Option<Incoming>, InputClosed> {
        match self.rx.recv_deadline(deadline) {
            Ok(m) => Ok(Some(m)),
            Err(flume::RecvTimeoutError::Timeout) => Ok(None),
            Err(flume::RecvTimeoutError::Disconnected) => {
                Err(InputClosed("external broker connection ended".into()))
            }
        }
    }

    fn drain_on_shutdown(&self) -> bool {
        // Unacknowledged messages stay with the broker, which resends them next session.
        false
    }
}

/// Publishes through the external broker's client, at QoS 1.
pub struct ClientPublisher(pub rumqttc::Client);

impl Publisher for ClientPublisher {
    fn publish(&mut self, topic: String, payload: Bytes, retain: bool) -> Result<(), String> {
        self.0
            .publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload.to_vec())
            .map_err(|e| e.to_string())
    }
}

impl Acker for rumqttc::Client {
    fn ack(&mut self, token: &crate::pipeline::AckToken) -> Result<(), String> {
        rumqttc::Client::ack(self, token).map_err(|e| e.to_string())
    }
}
