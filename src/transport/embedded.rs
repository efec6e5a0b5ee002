//! The embedded rumqttd broker: its configuration from `[broker]`, its listeners, in-process
//! links for ingest and for output, and its alerts.
//!
//! rumqttd traps this module works around (found in rumqttd 0.20's source):
//! - `RouterConfig::default()` has `max_connections = 0`, which refuses everything: every limit
//!   is set explicitly here.
//! - each subscription filter keeps an in-memory log of `max_segment_size × max_segment_count`
//!   bytes and drops its oldest segment when full, so a consumer that falls behind loses
//!   messages silently (the router only logs "cursor jumped" and raises an alert). Ingest's
//!   filter (`#`) gets a log of `broker.backlog_bytes`; the alert becomes a metric and a log line.
//! - its metrics timer thread panics unless both `alerts` and `meters` intervals are set.
//! - it logs every ordinary client disconnect at ERROR, so its log target is off by default
//!   (`RUST_LOG=rumqttd=warn` brings it back); what matters is counted as metrics here.
//! - rumqttd binds its listeners itself and does not report the port, so a port 0 in the
//!   pipeline file is resolved to a free port here first.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rumqttd::local::{LinkRx, LinkTx};
use serde_json::json;

use crate::config::BrokerConfig;
use crate::model::events::{BrokerAlert, InternalEvent};
use crate::model::metrics::Metrics;
use crate::pipeline::Publisher;
use bytes::Bytes;
use rumqttd::protocol::{Packet, Publish};

/// The filter ingest subscribes to: every topic, so that unrouted topics can be counted and no
/// message arrives twice through overlapping route filters.
pub const INGEST_FILTER: &str = "#";
/// Segment size of every filter log but ingest's.
const SMALL_SEGMENT_BYTES: usize = 1 << 20;
const SMALL_SEGMENT_COUNT: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the broker did not start listening on {0} within 10 s")]
    NotListening(SocketAddr),
    #[error("invalid broker configuration: {0}")]
    Config(String),
    #[error("the broker refused an in-process link: {0}")]
    Link(String),
    #[error("{0}")]
    Thread(#[from] std::io::Error),
}

/// Where the embedded broker listens, with any port 0 resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listeners {
    pub mqtt: SocketAddr,
    pub mqtt_v5: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
}

/// The running embedded broker. Its listener threads run until the process exits (rumqttd has
/// no shutdown); ingest stopping is what stops taking input.
pub struct EmbeddedBroker {
    pub listeners: Listeners,
    /// Taken by ingest.
    pub ingest: Option<Link>,
    /// Taken by the output stage (alarms, dead letters).
    pub output: Option<Link>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("listeners", &self.listeners)
            .finish()
    }
}

fn resolve_port(addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    // The kernel picks a free port; rumqttd binds it a moment later. The window is short and
    // only port-0 listeners (tests, benchmarks) take it.
    let l = TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
    l.local_addr()
        .map_err(|source| BrokerError::Bind { addr, source })
}

fn server(name: &str, listen: SocketAddr, c: &BrokerConfig) -> serde_json::Value {
    json!({
        "name": name,
        "listen": listen,
        "next_connection_delay_ms": 0,
        "connections": {
            "connection_timeout_ms": 10_000,
            "max_payload_size": c.max_packet_bytes,
            "max_inflight_count": 500,
            "dynamic_filters": true,
        }
    })
}

impl EmbeddedBroker {
    /// Starts the router and its listeners, and waits until the MQTT listeners accept
    /// connections.
    pub fn start(c: &BrokerConfig, metrics: Arc<Metrics>) -> Result<Self, BrokerError> {
        let listeners = Listeners {
            mqtt: resolve_port(c.listen)?,
            mqtt_v5: c.listen_v5.map(resolve_port).transpose()?,
            ws: c.listen_ws.map(resolve_port).transpose()?,
        };
        let segment = c.backlog_bytes.clamp(1024, 64 << 20);
        let count = c.backlog_bytes.div_ceil(segment).max(1);
        let mut config = json!({
            "id": 0,
            "router": {
                "max_connections": c.max_connections,
                "max_outgoing_packet_count": 200,
                "max_segment_size": SMALL_SEGMENT_BYTES,
                "max_segment_count": SMALL_SEGMENT_COUNT,
                "custom_segment": { INGEST_FILTER: { "max_segment_size": segment, "max_segment_count": count } },
            },
            "v4": { "1": server("mqtt-v4", listeners.mqtt, c) },
            // rumqttd's timer thread unwraps both intervals, so meters must be set too.
            "metrics": { "alerts": { "push_interval": 1 }, "meters": { "push_interval": 3600 } },
        });
        if let Some(v5) = listeners.mqtt_v5 {
            config["v5"] = json!({ "1": server("mqtt-v5", v5, c) });
        }
        if let Some(ws) = listeners.ws {
            config["ws"] = json!({ "1": server("mqtt-ws", ws, c) });
        }
        let config: rumqttd::Config =
            serde_json::from_value(config).map_err(|e| BrokerError::Config(e.to_string()))?;
        let mut router = rumqttd::Broker::new(config);

        let alerts = router
            .alerts()
            .map_err(|e| BrokerError::Link(e.to_string()))?;
        thread::Builder::new()
            .name("broker-alerts".into())
            .spawn(move || {
                while let Ok(batch) = alerts.router_rx.recv() {
                    for alert in batch {
                        let kind = alert.kind.name();
                        BrokerAlert {
                            kind: &kind,
                            client_id: &alert.client_id,
                            description: &alert.kind.description(),
                        }
                        .emit(&metrics);
                    }
                }
            })?;

        // Broker::start takes the broker and never returns, so every link is made first.
        let ingest = router
            .link("iomt-edge-ingest")
            .map_err(|e| BrokerError::Link(e.to_string()))?;
        let output = router
            .link("iomt-edge-output")
            .map_err(|e| BrokerError::Link(e.to_string()))?;
        thread::Builder::new()
            .name("broker".into())
            .spawn(move || {
                if let Err(e) = router.start() {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            })?;
        wait_listening(listeners.mqtt)?;
        if let Some(v5) = listeners.mqtt_v5 {
            wait_listening(v5)?;
        }
        if let Some(ws) = listeners.ws {
            wait_listening(ws)?;
        }
        Ok(EmbeddedBroker {
            listeners,
            ingest: Some(Link {
                tx: ingest.0,
                rx: ingest.1,
            }),
            output: Some(Link {
                tx: output.0,
                rx: output.1,
            }),
        })
    }
}

/// Connects to `addr` until it accepts, for up to 10 s.
pub fn wait_listening(addr: SocketAddr) -> Result<(), BrokerError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BrokerError::NotListening(addr));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// An in-process link to the router.
pub struct Link {
    pub tx: LinkTx,
    pub rx: LinkRx,
}

/// Publishes through the embedded broker's in-process link. rumqttd takes only QoS 0 from local
/// links but forwards every message at the QoS of each subscription, so a dashboard subscribed
/// at QoS 1 receives alarms at QoS 1, with redelivery.
pub struct LinkPublisher {
    tx: rumqttd::local::LinkTx,
    runtime: tokio::runtime::Runtime,
}

impl LinkPublisher {
    /// Takes the link; its receiving half is drained on a thread of its own (the router queues
    /// notifications to every link and stops a link whose queue is never read).
    pub fn new(link: Link) -> std::io::Result<Self> {
        let Link { tx, mut rx } = link;
        thread::Builder::new()
            .name("output-acks".into())
            .spawn(move || loop {
                match rx.recv() {
                    Ok(Some(rumqttd::Notification::Unschedule)) => {
                        if rx.ready().is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            })?;
        // LinkTx publishes a retained message only through its async `send`, which never
        // actually waits; a current-thread runtime on this stage's own thread drives it.
        let runtime = tokio::runtime::Builder::new_current_thread().build()?;
        Ok(LinkPublisher { tx, runtime })
    }
}

impl Publisher for LinkPublisher {
    fn publish(&mut self, topic: String, payload: Bytes, retain: bool) -> Result<(), String> {
        let packet = Packet::Publish(Publish::new(Bytes::from(topic), payload, retain), None);
        self.runtime
            .block_on(self.tx.send(packet))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}
