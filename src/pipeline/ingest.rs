//! Ingest: takes MQTT messages from an [`Input`] (the embedded broker's in-process link, or an
//! external broker's persistent session), finds each topic's route, decodes the payload into the
//! open batch, feeds the new readings to the alarm engine, and hands full (or old enough)
//! batches to the commit stage.
//!
//! It runs on its own thread: rumqttd's link blocks on bounded channels, which must stay off
//! tokio's workers, and a plain loop is the fastest way through ~10^5 messages a second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tracing::{debug, info};

pub use super::routes::{Route, RouteTable};
use super::{AckToken, Incoming, Input};
use crate::alarm::AlarmEngine;
use crate::codec::{decode_payload, ClockWindow, DecodeError, Message, ReadingSink, Reason};
use crate::config::{BatchConfig, IngestConfig};
use crate::model::batch::{BatchBuilder, Columns};
use crate::model::events::{
    AlarmChanged, DecodeFailed, InternalEvent, PayloadOversized, TopicUnrouted,
};
use crate::model::metrics::Metrics;
use crate::model::reading::now_micros;
use crate::pipeline::output::{Outgoing, OutputHandle};
use crate::store::{Store, StoreError};

/// Topics this service publishes on itself; ingest ignores them when they come back.
pub const OWN_TOPIC_PREFIXES: &[&str] = &["alarms/", "edge/"];

/// Seqs are reserved durably in blocks of this many, so a crash can never hand one out twice.
const SEQ_BLOCK: u64 = 1 << 20;

/// A batch on its way to the commit stage, with the acknowledgements it releases.
#[derive(Debug)]
pub struct PendingBatch {
    pub columns: Columns,
    pub acks: Vec<AckToken>,
}

/// The ingest stage, built and ready to run.
pub struct Ingest {
    routes: RouteTable,
    alarms: AlarmEngine,
    builder: BatchBuilder,
    batch: BatchConfig,
    max_payload: usize,
    dead_letter: bool,
    clock: ClockWindow,
    /// Flush once this many acknowledgements wait, so an external broker's in-flight window
    /// never stalls on a batch that is not full yet.
    max_pending_acks: usize,
    store: Arc<dyn Store>,
    seq_reserved: u64,
    metrics: Arc<Metrics>,
    route_counters: Vec<prometheus::IntCounter>,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest").finish_non_exhaustive()
    }
}

/// What an ingest run hands back when it stops.
#[derive(Debug)]
pub struct IngestSummary {
    pub next_seq: u64,
}

impl Ingest {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        routes: RouteTable,
        alarms: AlarmEngine,
        ingest: &IngestConfig,
        batch: &BatchConfig,
        max_pending_acks: usize,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let next_seq = store.seq_reserved()?;
        let route_counters = routes
            .routes()
            .iter()
            .map(|r| {
                metrics
                    .messages_received
                    .with_label_values(&[r.filter_text.as_str()])
            })
            .collect();
        metrics.next_seq.set(next_seq as i64);
        Ok(Ingest {
            routes,
            alarms,
            builder: BatchBuilder::new(next_seq, batch.max_rows.min(1 << 16)),
            batch: batch.clone(),
            max_payload: ingest.max_payload_bytes,
            dead_letter: ingest.dead_letter,
            clock: ingest.clock_window(),
            max_pending_acks: max_pending_acks.max(1),
            seq_reserved: next_seq,
            store,
            metrics,
            route_counters,
        })
    }

    /// Runs until `shutdown` turns true or the input closes; then drains what the input already
    /// acknowledged, seals the open batch and returns. Dropping `commit` and `output` on return
    /// lets the later stages finish.
    pub fn run(
        mut self,
        mut input: Box<dyn Input>,
        commit: flume::Sender<PendingBatch>,
        output: OutputHandle,
        shutdown: watch::Receiver<bool>,
    ) -> Result<IngestSummary, StoreError> {
        let mut acks: Vec<AckToken> = Vec::new();
        let mut opened: Option<Instant> = None;
        // Wake at least this often to notice shutdown.
        const TICK: Duration = Duration::from_millis(50);
        // During shutdown, the input counts as drained after this long without a message.
        const DRAIN_IDLE: Duration = Duration::from_millis(300);
        let mut draining_since: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if draining_since.is_none() && *shutdown.borrow() {
                info!("ingest: stopping; draining messages the broker already acknowledged");
                if !input.drain_on_shutdown() {
                    break;
                }
                draining_since = Some(now);
            }
            let wait = if draining_since.is_some() {
                DRAIN_IDLE
            } else {
                TICK
            };
            let mut deadline = now + wait;
            if let Some(o) = opened {
                deadline = deadline.min(o + self.batch.max_age);
            }
            match input.recv(deadline) {
                Ok(Some(msg)) => {
                    if let Some(ack) = msg.ack.clone() {
                        acks.push(ack);
                    }
                    self.handle(&msg, &output)?;
                    if opened.is_none() && (!self.builder.is_empty() || !acks.is_empty()) {
                        opened = Some(Instant::now());
                    }
                }
                Ok(None) => {
                    if draining_since.is_some() && Instant::now() >= deadline {
                        break;
                    }
                }
                Err(closed) => {
                    info!(reason = %closed, "ingest: input closed");
                    break;
                }
            }
            let full =
                self.builder.len() >= self.batch.max_rows || acks.len() >= self.max_pending_acks;
            let old = opened.is_some_and(|o| o.elapsed() >= self.batch.max_age);
            if full || old {
                self.flush(&commit, &mut acks)?;
                opened = None;
            }
        }
        self.flush(&commit, &mut acks)?;
        // A clean stop hands out no seq it did not use.
        self.store.reserve_seq(self.builder.next_seq())?;
        Ok(IngestSummary {
            next_seq: self.builder.next_seq(),
        })
    }

    fn flush(
        &mut self,
        commit: &flume::Sender<PendingBatch>,
        acks: &mut Vec<AckToken>,
    ) -> Result<(), StoreError> {
        if self.builder.is_empty() && acks.is_empty() {
            return Ok(());
        }
        let pending = PendingBatch {
            columns: self.builder.take(),
            acks: std::mem::take(acks),
        };
        // Blocks while the commit stage is behind: back-pressure, not loss.
        if commit.send(pending).is_err() {
            return Err(StoreError::Corrupt {
                key: "commit stage".into(),
                reason: "stopped before ingest".into(),
            });
        }
        Ok(())
    }

    /// Routes, decodes and checks one message.
    fn handle(&mut self, msg: &Incoming, output: &OutputHandle) -> Result<(), StoreError> {
        let Ok(topic) = std::str::from_utf8(&msg.topic) else {
            TopicUnrouted {
                topic: "<not UTF-8>",
            }
            .emit(&self.metrics);
            return Ok(());
        };
        if OWN_TOPIC_PREFIXES.iter().any(|p| topic.starts_with(p)) {
            return Ok(());
        }
        let received = now_micros();
        let dead_letters = DeadLetters {
            enabled: self.dead_letter,
            metrics: &self.metrics,
            output,
            topic,
            received,
        };
        let Some((route, resolved)) = self.routes.resolve(topic) else {
            TopicUnrouted { topic }.emit(&self.metrics);
            return Ok(());
        };
        self.route_counters[resolved.route].inc();
        let codec = &route.codec;
        if msg.payload.len() > self.max_payload {
            PayloadOversized {
                topic,
                size: msg.payload.len(),
                limit: self.max_payload,
            }
            .emit(&self.metrics);
            let err = DecodeError::new(
                Reason::Oversized,
                format!(
                    "{} bytes, above the limit of {}",
                    msg.payload.len(),
                    self.max_payload
                ),
            );
            // The payload itself is not republished: that would let one device double the load.
            dead_letters.send(codec.name(), &err, None);
            return Ok(());
        }
        let message = Message {
            topic,
            payload: &msg.payload,
            received,
            source: &resolved.source,
            subject: resolved.subject.as_deref(),
        };
        let mark = self.builder.len();
        if self.builder.next_seq() + 4096 >= self.seq_reserved {
            self.seq_reserved = self.builder.next_seq() + SEQ_BLOCK;
            self.store.reserve_seq(self.seq_reserved)?;
        }
        let result = decode_payload(
            codec.as_ref(),
            &message,
            &mut ReadingSink::new(&mut self.builder, &message).with_clock(self.clock),
        );
        if let Err(err) = result {
            self.builder.rollback(mark);
            DecodeFailed {
                topic,
                codec: codec.name(),
                error: &err,
            }
            .emit(&self.metrics);
            dead_letters.send(codec.name(), &err, Some(&msg.payload));
            return Ok(());
        }
        let added = self.builder.len() - mark;
        self.metrics.readings_decoded.inc_by(added as u64);
        self.metrics.next_seq.set(self.builder.next_seq() as i64);
        for i in mark..self.builder.len() {
            let row = self.builder.columns().row(i);
            for event in self.alarms.observe(&row) {
                AlarmChanged {
                    rule: &event.rule,
                    subject: &event.subject,
                    priority: event.priority.as_str(),
                    active: event.active,
                    seq: event.seq,
                }
                .emit(&self.metrics);
                output.send(Outgoing::Alarm(event));
            }
        }
        Ok(())
    }
}

/// Publishes a message's dead letter, when the pipeline wants them.
struct DeadLetters<'a> {
    enabled: bool,
    metrics: &'a Metrics,
    output: &'a OutputHandle,
    topic: &'a str,
    received: i64,
}

impl DeadLetters<'_> {
    fn send(&self, codec: &'static str, err: &DecodeError, payload: Option<&Bytes>) {
        if !self.enabled {
            return;
        }
        debug!(
            topic = self.topic,
            codec,
            reason = err.reason.as_str(),
            "dead letter"
        );
        self.metrics.dead_letters.inc();
        self.output.send(Outgoing::DeadLetter {
            topic: self.topic.to_owned(),
            codec,
            reason: err.reason.as_str(),
            detail: err.detail.clone(),
            payload: payload.cloned(),
            received: self.received,
        });
    }
}
