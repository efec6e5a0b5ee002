//! Ingest: takes messages from the input queue, finds each topic's route, decodes the payload
//! into the open batch, feeds the new readings to the alarm engine, and hands batches to the
//! commit stage with the acknowledgements they release.
//!
//! It runs on its own thread (a plain loop is the fastest way through ~10^5 messages a second)
//! until every transport sender is gone and the queue is empty, then hands over its last batch:
//! stopping the transports is what stops ingest, so nothing taken in is left behind.
//!
//! Batches are cut when full (`batch.max_rows`, `batch.max_bytes`), when old (`batch.max_age`),
//! and, when they hold messages waiting for their acknowledgement, as soon as the input has been
//! quiet for `batch.linger`: a publisher whose window of unacknowledged messages is full sends
//! nothing more until it is acknowledged, so waiting for more would only stall it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::debug;

use super::health::{Health, Phase, Problem};
use super::input::{InputClosed, InputQueue};
use super::output::{Outgoing, OutputHandle};
use super::routes::{Route, RouteTable};
use super::ward::{VitalReading, WardHub};
use super::AckToken;
use crate::alarm::AlarmEngine;
use crate::codec::{decode_payload, ClockWindow, DecodeError, Message, ReadingSink, Reason};
use crate::config::{BatchConfig, IngestConfig};
use crate::model::batch::{BatchBuilder, Columns};
use crate::model::events::{
    AlarmChanged, DecodeFailed, InternalEvent, PayloadOversized, TopicUnrouted,
};
use crate::model::metrics::Metrics;
use crate::model::reading::{flags, now_micros};
use crate::store::{Store, StoreError};

/// Topics this service publishes on itself. Messages there are not readings: ingest only
/// carries their acknowledgement, in order with the others.
pub const OWN_TOPIC_PREFIXES: &[&str] = &["alarms/", "edge/", "news2/"];

/// Seqs are reserved durably in blocks of this many. A seq leaves ingest (in a batch, or named
/// by an alarm) only once it lies below the durable reservation, so no crash can hand it out
/// twice.
const SEQ_BLOCK: u64 = 1 << 20;

/// How long ingest waits for a message when it holds no open batch (only to be responsive).
const IDLE_WAIT: Duration = Duration::from_millis(250);

/// How often the ward view gets the vitals ingest gathered: a dashboard shows seconds.
const WARD_FEED_EVERY: Duration = Duration::from_millis(250);

/// A batch on its way to the commit stage, with the acknowledgements it releases.
#[derive(Debug)]
pub struct PendingBatch {
    pub columns: Columns,
    pub acks: Vec<AckToken>,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the commit stage stopped before ingest")]
    CommitStopped,
    #[error("reserving seqs: {0}")]
    Reserve(StoreError),
}

/// What an ingest run hands back when it stops.
#[derive(Debug)]
pub struct IngestSummary {
    /// The seq the next reading would have got: every seq below it may have been handed out.
    pub next_seq: u64,
    pub messages: u64,
}

/// The ingest stage, built and ready to run.
pub struct Ingest {
    routes: RouteTable,
    alarms: AlarmEngine,
    builder: BatchBuilder,
    batch: BatchConfig,
    ingest: IngestConfig,
    clock: ClockWindow,
    store: Arc<dyn Store>,
    health: Arc<Health>,
    /// The first seq no process has handed out: every seq below it is durably reserved.
    seq_reserved: u64,
    metrics: Arc<Metrics>,
    route_counters: Vec<prometheus::IntCounter>,
    alarm_subjects_untracked: u64,
    /// The ward view, and the vitals gathered for it since it was last fed.
    ward: Option<Arc<WardHub>>,
    ward_pending: Vec<VitalReading>,
    ward_fed: Instant,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest").finish_non_exhaustive()
    }
}

impl Ingest {
    pub fn new(
        routes: RouteTable,
        alarms: AlarmEngine,
        ingest: &IngestConfig,
        batch: &BatchConfig,
        store: Arc<dyn Store>,
        health: Arc<Health>,
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
            ingest: ingest.clone(),
            clock: ingest.clock_window(),
            seq_reserved: next_seq,
            store,
            health,
            metrics,
            route_counters,
            alarm_subjects_untracked: 0,
            ward: None,
            ward_pending: Vec::new(),
            ward_fed: Instant::now(),
        })
    }

    /// Feeds the ward view with the vitals it shows.
    pub fn with_ward(mut self, ward: Arc<WardHub>) -> Self {
        self.ward = Some(ward);
        self
    }

    /// Hands the gathered vitals to the ward view: at most every [`WARD_FEED_EVERY`], so that
    /// its lock is not taken per reading.
    fn feed_ward(&mut self, force: bool) {
        let Some(ward) = &self.ward else { return };
        if self.ward_pending.is_empty()
            || !(force
                || self.ward_fed.elapsed() >= WARD_FEED_EVERY
                || self.ward_pending.len() >= 4096)
        {
            return;
        }
        ward.vitals(&self.ward_pending);
        self.ward_pending.clear();
        self.ward_fed = Instant::now();
    }

    /// Runs until the input closes (every transport sender gone, the queue drained), then
    /// hands the open batch to commit and returns. Dropping `commit` and `output` on return
    /// lets those stages finish.
    pub fn run(
        mut self,
        input: InputQueue,
        commit: flume::Sender<PendingBatch>,
        output: OutputHandle,
    ) -> Result<IngestSummary, IngestError> {
        let mut acks: Vec<AckToken> = Vec::new();
        let mut opened: Option<Instant> = None;
        let mut last_message = Instant::now();
        let mut messages = 0u64;
        loop {
            let deadline = match opened {
                None => Instant::now() + IDLE_WAIT,
                Some(o) if acks.is_empty() => o + self.batch.max_age,
                Some(o) => (o + self.batch.max_age).min(last_message + self.batch.linger),
            };
            match input.recv_deadline(deadline) {
                Ok(Some(msg)) => {
                    messages += 1;
                    last_message = Instant::now();
                    if !msg.refused {
                        self.handle(&msg.topic, &msg.payload, msg.payload_size, &output)?;
                    }
                    if let Some(ack) = msg.ack {
                        acks.push(ack);
                    }
                    if opened.is_none() && (!self.builder.is_empty() || !acks.is_empty()) {
                        opened = Some(last_message);
                    }
                }
                Ok(None) => {}
                Err(InputClosed) => break,
            }
            self.feed_ward(false);
            let Some(o) = opened else { continue };
            let now = Instant::now();
            let full = self.builder.len() >= self.batch.max_rows
                || acks.len() >= self.batch.max_unacked
                || self.builder.columns().approx_bytes() >= self.batch.max_bytes;
            let old = now >= o + self.batch.max_age;
            let lingered = !acks.is_empty() && now >= last_message + self.batch.linger;
            if full || old || lingered {
                self.flush(&commit, &mut acks)?;
                opened = None;
            }
        }
        self.flush(&commit, &mut acks)?;
        self.feed_ward(true);
        Ok(IngestSummary {
            next_seq: self.builder.next_seq(),
            messages,
        })
    }

    fn flush(
        &mut self,
        commit: &flume::Sender<PendingBatch>,
        acks: &mut Vec<AckToken>,
    ) -> Result<(), IngestError> {
        if self.builder.is_empty() && acks.is_empty() {
            return Ok(());
        }
        let pending = PendingBatch {
            columns: self.builder.take(),
            acks: std::mem::take(acks),
        };
        // Blocks while the commit stage is behind: back-pressure, not loss.
        commit.send(pending).map_err(|_| IngestError::CommitStopped)
    }

    /// Makes sure every seq handed out so far lies below the durable reservation, before any of
    /// them leaves ingest. A store that cannot write is retried while the service runs (intake
    /// is paused meanwhile, by the health problem); once it stops, ingest gives up: the readings
    /// of the open batch were never acknowledged, so their publishers still hold them.
    fn reserve_seqs(&mut self) -> Result<(), IngestError> {
        if self.builder.next_seq() <= self.seq_reserved {
            return Ok(());
        }
        let want = self.builder.next_seq() + SEQ_BLOCK;
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.store.reserve_seq(want) {
                Ok(()) => {
                    self.seq_reserved = want;
                    return Ok(());
                }
                Err(e) => {
                    self.metrics.store_errors.inc();
                    self.health.problem(Problem::Store, &e.to_string());
                    if self.health.report().phase != Phase::Running {
                        return Err(IngestError::Reserve(e));
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Routes, decodes and checks one message.
    fn handle(
        &mut self,
        topic: &Bytes,
        payload: &Bytes,
        payload_size: usize,
        output: &OutputHandle,
    ) -> Result<(), IngestError> {
        // Fault tests: `ingest-message=100*off->panic` fails the stage.
        #[cfg(feature = "failpoints")]
        fail::fail_point!("ingest-message");
        let Ok(topic) = std::str::from_utf8(topic) else {
            // Transports refuse such names; a message that slips through is not a reading.
            TopicUnrouted { topic: "" }.emit(&self.metrics);
            return Ok(());
        };
        if OWN_TOPIC_PREFIXES.iter().any(|p| topic.starts_with(p)) {
            return Ok(());
        }
        let received = now_micros();
        let Some((route, resolved)) = self.routes.resolve(topic) else {
            TopicUnrouted { topic }.emit(&self.metrics);
            return Ok(());
        };
        self.route_counters[resolved.route].inc();
        let dead_letters = DeadLetters {
            enabled: self.ingest.dead_letter,
            metrics: &self.metrics,
            output,
            topic,
            route,
            received,
        };
        // A transport that threw a payload away for its size hands over its size only.
        let dropped = payload_size > payload.len();
        let max_payload = self.ingest.max_payload_bytes;
        if dropped || payload_size > max_payload {
            let limit = if dropped {
                "broker.max_packet_bytes".to_owned()
            } else {
                format!("ingest.max_payload_bytes = {max_payload}")
            };
            PayloadOversized {
                route: &route.filter_text,
                size: payload_size,
                limit: &limit,
            }
            .emit(&self.metrics);
            let err = DecodeError::new(
                Reason::Oversized,
                format!("{payload_size} bytes, above {limit}"),
            );
            // The payload itself is not republished: that would let one device double the load.
            dead_letters.send(&err, None);
            return Ok(());
        }
        let message = Message {
            topic,
            payload,
            received,
            source: &resolved.source,
            subject: resolved.subject.as_deref(),
        };
        let mark = self.builder.len();
        let codec = route.codec.clone();
        let result = decode_payload(
            codec.as_ref(),
            &message,
            &mut ReadingSink::new(&mut self.builder, &message).with_clock(self.clock),
        );
        if let Err(err) = result {
            self.builder.rollback(mark);
            DecodeFailed {
                route: &route.filter_text,
                codec: codec.name(),
                error: &err,
            }
            .emit(&self.metrics);
            dead_letters.send(&err, Some(payload));
            return Ok(());
        }
        let added = self.builder.len() - mark;
        self.metrics.readings_decoded.inc_by(added as u64);
        self.metrics.next_seq.set(self.builder.next_seq() as i64);
        // Alarms name their readings' seqs: those must be reserved first.
        self.reserve_seqs()?;
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
            let text = self.builder.columns().text(i);
            if self.ward.is_some()
                && WardHub::shows(row.metric)
                && row.flags & flags::UNTRUSTED == 0
            {
                self.ward_pending.push(VitalReading {
                    subject: row.subject.unwrap_or(row.source).to_owned(),
                    metric: row.metric,
                    value: row.value,
                    text: text.map(str::to_owned),
                    ts: row.ts,
                    received: row.received,
                });
            }
            if let Some(update) = self.alarms.observe_news2(&row, text) {
                output.send(Outgoing::News2(Box::new(update)));
            }
        }
        let untracked = self.alarms.subjects_untracked();
        if untracked > self.alarm_subjects_untracked {
            self.metrics
                .alarm_subjects_untracked
                .inc_by(untracked - self.alarm_subjects_untracked);
            self.alarm_subjects_untracked = untracked;
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
    route: &'a Route,
    received: i64,
}

impl DeadLetters<'_> {
    fn send(&self, err: &DecodeError, payload: Option<&Bytes>) {
        if !self.enabled {
            return;
        }
        debug!(
            topic = self.topic,
            codec = self.route.codec.name(),
            reason = err.reason.as_str(),
            "dead letter"
        );
        self.metrics.dead_letters.inc();
        self.output.send(Outgoing::DeadLetter {
            topic: self.topic.to_owned(),
            codec: self.route.codec.name(),
            reason: err.reason.as_str(),
            detail: err.detail.clone(),
            payload: payload.cloned(),
            received: self.received,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::config::PipelineConfig;
    use crate::pipeline::input::{queue, Received};
    use crate::pipeline::output::Output;
    use crate::pipeline::Publisher;
    use crate::store::SledStore;

    /// Records, for each alarm published, its seq and the store's reservation at that moment.
    struct Witness {
        store: Arc<dyn Store>,
        seen: Arc<Mutex<Vec<(u64, u64)>>>,
    }

    impl Publisher for Witness {
        fn publish(&mut self, _topic: String, payload: Bytes, _retain: bool) -> Result<(), String> {
            let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            let reserved = self.store.seq_reserved().unwrap();
            self.seen
                .lock()
                .unwrap()
                .push((v["seq"].as_u64().unwrap(), reserved));
            Ok(())
        }
    }

    /// One message can carry tens of thousands of readings: whatever it carries, no seq
    /// leaves ingest (in a batch, or named by an alarm) before the store durably reserves it.
    #[test]
    fn no_seq_leaves_ingest_before_it_is_durably_reserved() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("store")).unwrap());
        // Start just below a reservation boundary, as a restarted node would.
        store.reserve_seq(1_000).unwrap();
        let config = PipelineConfig::parse(
            r#"
[ingest]
max_payload_bytes = 4194304
clock_max_past = "100years"
[[route]]
topic = "pack/+"
codec = "senml-json"
source = "dev-{2}"
[[rule]]
name = "hr-any"
metric = "heart_rate"
above = 0
priority = "low"
"#,
            "t.toml",
        )
        .unwrap();
        let routes = config
            .routes
            .iter()
            .map(|r| Route::build(r).unwrap())
            .collect();
        let metrics = Metrics::new();
        let health = Health::new(metrics.clone());
        health.running();
        let ingest = Ingest::new(
            RouteTable::new(routes),
            AlarmEngine::from_config(&config.rules),
            &config.ingest,
            &config.batch,
            store.clone(),
            health,
            metrics,
        )
        .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (output_stage, output, _probe) = Output::new(
            "w".into(),
            Box::new(Witness {
                store: store.clone(),
                seen: seen.clone(),
            }),
            1 << 20,
        );
        let output_thread = std::thread::spawn(move || output_stage.run());
        let (tx, rx) = queue(16 << 20);
        let (commit_tx, commit_rx) = flume::bounded::<PendingBatch>(64);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // Two packs of 30,000 readings, each far above any fixed margin.
        for p in 0..2 {
            let mut pack = String::from("[");
            for i in 0..30_000 {
                if i > 0 {
                    pack.push(',');
                }
                pack.push_str(&format!(
                    r#"{{"n":"heart_rate","u":"/min","v":{},"t":{}}}"#,
                    60 + i % 40,
                    1_700_000_000 + p * 100_000 + i
                ));
            }
            pack.push(']');
            runtime
                .block_on(tx.send(Received::new(
                    Bytes::from(format!("pack/{p}")),
                    Bytes::from(pack),
                    None,
                )))
                .unwrap();
        }
        drop(tx);
        let witness_store = store.clone();
        let batches = std::thread::spawn(move || {
            let mut checked = 0;
            for b in commit_rx.iter() {
                if let Some(&last) = b.columns.seq.last() {
                    assert!(
                        witness_store.seq_reserved().unwrap() > last,
                        "batch up to seq {last} left before its reservation"
                    );
                    checked += b.columns.len();
                }
            }
            checked
        });
        let summary = ingest.run(rx, commit_tx, output).unwrap();
        assert_eq!(batches.join().unwrap(), 60_000);
        output_thread.join().unwrap();
        assert_eq!(summary.next_seq, 61_000);
        let seen = seen.lock().unwrap();
        assert!(!seen.is_empty(), "the rule raised alarms");
        for &(seq, reserved) in seen.iter() {
            assert!(
                seq < reserved,
                "alarm names seq {seq}, reserved only below {reserved}"
            );
        }
    }
}
