//! rumqttd's router: subscriptions, retained messages, QoS 1/2 delivery to subscribers and
//! persistent sessions, for every client of the embedded broker. The broker's own connection
//! handling (src/transport/broker/connection.rs) talks to it through one in-process link per
//! client; alarms and dead letters go in through the output link.
//!
//! rumqttd traps this module works around (found in rumqttd 0.20's source):
//! - `RouterConfig::default()` has `max_connections = 0`, which refuses everything: every limit
//!   is set explicitly here.
//! - each subscription filter keeps an in-memory log of `max_segment_size × max_segment_count`
//!   bytes and drops its oldest segment when full: a subscriber that falls that far behind
//!   misses messages (`broker.subscriber_backlog_bytes`). rumqttd reports that only through its
//!   metrics timer, which runs with its own listeners, which this broker does not use, so the
//!   loss is not counted; alarms are retained, so a dashboard that reconnects sees the current
//!   state.
//! - the router learns that a link is gone only from a DISCONNECT packet sent through it: a
//!   dropped link stays registered. Connections always send one when they end.
//! - it logs every ordinary client disconnect at ERROR, so its log target is off by default
//!   (`RUST_LOG=rumqttd=warn` brings it back); what matters is counted as metrics here.

use std::sync::Arc;
use std::thread;

use bytes::Bytes;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::{Notification, RouterConfig};
use serde_json::json;

use crate::config::BrokerConfig;
use crate::pipeline::Publisher;

/// The largest segment of a subscription's log.
const MAX_SEGMENT_BYTES: usize = 1 << 20;

/// Makes in-process links to the router (rumqttd names the router's channel type in a private
/// module, so it can only be held inside a closure).
type MakeLink = dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, Notification), String> + Send + Sync;

/// A running router. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    make_link: Arc<MakeLink>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Router")
    }
}

impl Router {
    /// Starts rumqttd's router thread.
    pub fn start(c: &BrokerConfig) -> Result<Self, String> {
        let segment = c
            .subscriber_backlog_bytes
            .clamp(64 << 10, MAX_SEGMENT_BYTES);
        let count = c.subscriber_backlog_bytes.div_ceil(segment).max(1);
        let config: RouterConfig = serde_json::from_value(json!({
            // The router counts in-process links as connections too (the output link).
            "max_connections": c.max_connections + 1,
            "max_outgoing_packet_count": 200,
            "max_segment_size": segment,
            "max_segment_count": count,
        }))
        .map_err(|e| format!("router configuration: {e}"))?;
        let router_tx = rumqttd::Router::new(0, config).spawn();
        let make_link = move |client_id: &str, clean: bool| {
            LinkBuilder::new(client_id, router_tx.clone())
                .clean_session(clean)
                .build()
                .map_err(|e: LinkError| e.to_string())
        };
        Ok(Router {
            make_link: Arc::new(make_link),
        })
    }

    /// Registers a client with the router: its link, and the router's CONNACK. Blocks briefly
    /// (the router answers from its own thread).
    pub fn link(
        &self,
        client_id: &str,
        clean_session: bool,
    ) -> Result<(LinkTx, LinkRx, Notification), String> {
        (self.make_link)(client_id, clean_session)
    }
}

/// Publishes alarms and dead letters into the router, which delivers them to every subscriber
/// at the QoS of its subscription and keeps retained ones.
pub struct LinkPublisher {
    tx: LinkTx,
}

impl LinkPublisher {
    /// Links to the router; the link's receiving half is drained on a thread of its own (the
    /// router queues notifications to every link and stops a link whose queue is never read).
    pub fn new(router: &Router, ended: Box<dyn FnOnce(String) + Send>) -> Result<Self, String> {
        let (tx, mut rx, _) = router
            .link("iomt-edge-output", true)
            .map_err(|e| format!("the router refused the output link: {e}"))?;
        thread::Builder::new()
            .name("output-acks".into())
            .spawn(move || loop {
                // This link lives as long as the router: its end is the router's.
                match rx.recv() {
                    Ok(Some(Notification::Unschedule)) => {
                        if rx.ready().is_err() {
                            return ended("rumqttd's router stopped".into());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return ended("rumqttd's router stopped".into()),
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(LinkPublisher { tx })
    }
}

impl Publisher for LinkPublisher {
    fn publish(&mut self, topic: String, payload: Bytes, retain: bool) -> Result<(), String> {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let packet = Packet::Publish(Publish::new(Bytes::from(topic), payload, retain), None);
        // LinkTx publishes a retained message only through its async `send`, which never
        // actually waits (it hands the packet over with a blocking channel send): one poll
        // completes it, with no runtime needed on this thread.
        let mut send = std::pin::pin!(self.tx.send(packet));
        match send.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(r) => r.map(|_| ()).map_err(|e| e.to_string()),
            Poll::Pending => Err("the router's link did not take the message".into()),
        }
    }
}
