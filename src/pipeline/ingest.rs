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

use super::alarms::AlarmInput;
use super::health::{Health, Phase, Problem};
use super::input::{Identity, InputClosed, InputQueue};
use super::output::{Outgoing, OutputHandle};
use super::routes::{Route, RouteTable};
use super::ward::{VitalReading, WardHub};
use super::{AckToken, NOT_AUTHORIZED};
use crate::alarm::news2::{Spo2Scale, SubjectState};
use crate::alarm::silence::Ears;
use crate::alarm::AlarmEngine;
use crate::codec::{decode_payload, ClockWindow, DecodeError, Message, ReadingSink, Reason};
use crate::config::{BatchConfig, IngestConfig};
use crate::model::batch::{BatchBuilder, Columns};
use crate::model::events::{
    DecodeFailed, InternalEvent, PayloadOversized, PublishRefused, TopicUnrouted,
};
use crate::model::metrics::Metrics;
use crate::model::reading::{flags, now_micros};
use crate::store::{Store, StoreError};

/// Topics this service publishes on itself. Messages there are not readings: ingest only
/// carries their acknowledgement, in order with the others.
pub const OWN_TOPIC_PREFIXES: &[&str] = &["alarms/", "edge/", "news2/"];

/// Whether a topic is an alarm's acknowledgement topic, `alarms/<site>/<subject>/<rule>/ack`:
/// the one place under `alarms/` clients may publish.
pub fn is_alarm_ack(topic: &[u8]) -> bool {
    topic.starts_with(b"alarms/")
        && topic.ends_with(b"/ack")
        && topic.iter().filter(|&&b| b == b'/').count() == 4
}

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
    /// The alarm stage, and whom the silence rules heard since it was last told.
    alarm_stage: Option<flume::Sender<AlarmInput>>,
    ears: Ears,
    site: String,
    /// Messages handled: tells the readings of one message apart from another's.
    message_no: u64,
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
            alarm_stage: None,
            ears: Ears::default(),
            site: String::new(),
            message_no: 0,
        })
    }

    /// Hands conditions, scores, acknowledgements and whom it heard to the alarm stage of
    /// `site`.
    pub fn with_alarm_stage(
        mut self,
        site: &str,
        tx: flume::Sender<AlarmInput>,
        ears: Ears,
    ) -> Self {
        self.site = site.to_owned();
        self.alarm_stage = Some(tx);
        self.ears = ears;
        self
    }

    /// Sends to the alarm stage. Blocks while it is behind (back-pressure); a stage that has
    /// ended reports its own failure, so a send to it is dropped here.
    fn to_alarms(&self, m: AlarmInput) {
        if let Some(tx) = &self.alarm_stage {
            let _ = tx.send(m);
        }
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

    /// Tells the alarm stage whom the silence rules heard, at most every [`WARD_FEED_EVERY`].
    fn report_heard(&mut self, force: bool) {
        if self.ears.is_empty() || !self.ears.anything() {
            return;
        }
        if force || self.ward_fed.elapsed() >= WARD_FEED_EVERY {
            let heard = self.ears.take();
            self.to_alarms(AlarmInput::Heard { heard });
        }
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
                    let refusal = match msg.refused {
                        false => self.handle(
                            &msg.topic,
                            &msg.payload,
                            msg.payload_size,
                            msg.sender.as_deref(),
                            &output,
                        )?,
                        true => None,
                    };
                    if let Some(ack) = msg.ack {
                        acks.push(refusal.map_or(ack, |r| ack.refusing(r)));
                    }
                    if opened.is_none() && (!self.builder.is_empty() || !acks.is_empty()) {
                        opened = Some(last_message);
                    }
                }
                Ok(None) => {}
                Err(InputClosed) => break,
            }
            self.report_heard(false);
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
        self.report_heard(true);
        self.feed_ward(true);
        // Keep every subject's NEWS2 state as it is now, not only as of its last change.
        if let Some(t) = self.alarms.news2_mut() {
            let states: Vec<AlarmInput> = t
                .snapshots()
                .map(|(subject, state)| AlarmInput::Subject {
                    subject: subject.clone(),
                    state: Box::new(state.clone()),
                })
                .collect();
            for m in states {
                self.to_alarms(m);
            }
        }
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

    /// Routes, decodes and checks one message. `Ok(Some(reason))`: the message is refused, and
    /// acknowledged with that MQTT 5 reason code.
    fn handle(
        &mut self,
        topic: &Bytes,
        payload: &Bytes,
        payload_size: usize,
        sender: Option<&Identity>,
        output: &OutputHandle,
    ) -> Result<Option<u8>, IngestError> {
        // Fault tests: `ingest-message=100*off->panic` fails the stage.
        #[cfg(feature = "failpoints")]
        fail::fail_point!("ingest-message");
        let Ok(topic) = std::str::from_utf8(topic) else {
            // Transports refuse such names; a message that slips through is not a reading.
            TopicUnrouted { topic: "" }.emit(&self.metrics);
            return Ok(None);
        };
        if is_alarm_ack(topic.as_bytes()) {
            self.to_alarms(AlarmInput::Ack {
                topic: topic.to_owned(),
                payload: payload.clone(),
            });
            return Ok(None);
        }
        if OWN_TOPIC_PREFIXES.iter().any(|p| topic.starts_with(p)) {
            return Ok(None);
        }
        if let Some(subject) = topic
            .strip_prefix("config/")
            .and_then(|t| t.strip_prefix(self.site.as_str()))
            .and_then(|t| t.strip_prefix('/'))
        {
            self.subject_settings(topic, subject, payload, output);
            return Ok(None);
        }
        let received = now_micros();
        let Some((route, resolved)) = self.routes.resolve(topic) else {
            TopicUnrouted { topic }.emit(&self.metrics);
            return Ok(None);
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
            return Ok(None);
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
            &mut ReadingSink::new(&mut self.builder, &message)
                .with_clock(self.clock)
                .with_bound_ids(sender.is_some() && !route.trust_payload_ids),
        );
        if let Err(err) = result {
            self.builder.rollback(mark);
            if let (Reason::Identity, Some(id)) = (err.reason, sender) {
                // Not dead-lettered: that would republish an impostor's payload.
                PublishRefused {
                    reason: "impostor",
                    account: &id.name,
                }
                .emit(&self.metrics);
                return Ok(Some(NOT_AUTHORIZED));
            }
            DecodeFailed {
                route: &route.filter_text,
                codec: codec.name(),
                error: &err,
            }
            .emit(&self.metrics);
            dead_letters.send(&err, Some(payload));
            return Ok(None);
        }
        let added = self.builder.len() - mark;
        self.metrics.readings_decoded.inc_by(added as u64);
        self.metrics.next_seq.set(self.builder.next_seq() as i64);
        // Alarms name their readings' seqs: those must be reserved first.
        self.reserve_seqs()?;
        self.message_no += 1;
        for i in mark..self.builder.len() {
            let row = self.builder.columns().row(i);
            if !self.ears.is_empty() {
                self.ears.note(&row);
            }
            for event in self.alarms.observe(&row, self.message_no) {
                if let Some(tx) = &self.alarm_stage {
                    let _ = tx.send(AlarmInput::Condition(Box::new(event)));
                }
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
            self.alarms.observe_news2(&row, text);
        }
        // The message's readings are in: its subjects' NEWS2 scores, once each.
        for update in self.alarms.score_news2() {
            let state = self.news2_state(&update.subject.clone());
            self.to_alarms(AlarmInput::News2 {
                update: Box::new(update),
                state: Box::new(state),
            });
        }
        let commands = self
            .alarms
            .news2_mut()
            .map(|t| t.take_commands())
            .unwrap_or_default();
        for c in commands {
            let state = self.news2_state(&c.subject);
            self.to_alarms(AlarmInput::Subject {
                subject: c.subject.clone(),
                state: Box::new(state),
            });
            self.to_alarms(AlarmInput::Command(c));
        }
        let untracked = self.alarms.subjects_untracked();
        if untracked > self.alarm_subjects_untracked {
            self.metrics
                .alarm_subjects_untracked
                .inc_by(untracked - self.alarm_subjects_untracked);
            self.alarm_subjects_untracked = untracked;
        }
        Ok(None)
    }
}

impl Ingest {
    fn news2_state(&mut self, subject: &str) -> SubjectState {
        self.alarms
            .news2_mut()
            .and_then(|t| t.snapshot(subject).cloned())
            .unwrap_or_default()
    }

    /// `config/<site>/<subject>`: a subject's NEWS2 settings, `{"spo2_scale": 1 or 2,
    /// "on_oxygen": bool}` (either may be left out); an empty payload (a retained message
    /// deleted) resets them. A payload that is neither is dead-lettered.
    fn subject_settings(
        &mut self,
        topic: &str,
        level: &str,
        payload: &Bytes,
        output: &OutputHandle,
    ) {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Settings {
            #[serde(default)]
            spo2_scale: Option<u8>,
            #[serde(default)]
            on_oxygen: Option<bool>,
        }
        let parsed = match crate::topic::unlevel(level) {
            None => Err(
                "the subject level is not one this service writes (see README, Topics)".to_owned(),
            ),
            Some(_) if payload.is_empty() => Ok(Settings {
                spo2_scale: Some(1),
                on_oxygen: None,
            }),
            Some(_) => serde_json::from_slice::<Settings>(payload)
                .map_err(|e| e.to_string())
                .and_then(|s| match s.spo2_scale {
                    None | Some(1) | Some(2) => Ok(s),
                    Some(n) => Err(format!("spo2_scale is 1 or 2, not {n}")),
                }),
        };
        let settings = parsed.and_then(|s| {
            crate::topic::unlevel(level)
                .map(|subject| (subject, s))
                .ok_or_else(|| "the subject level does not decode".to_owned())
        });
        match settings {
            Ok((subject, s)) => {
                let Some(t) = self.alarms.news2_mut() else {
                    return;
                };
                let scale = match s.spo2_scale {
                    Some(2) => Spo2Scale::Two,
                    _ => Spo2Scale::One,
                };
                t.set_settings(&subject, scale, s.on_oxygen);
                let state = self.news2_state(&subject);
                self.to_alarms(AlarmInput::Subject {
                    subject,
                    state: Box::new(state),
                });
            }
            Err(detail) => {
                self.metrics.dead_letters.inc();
                debug!(topic, detail, "subject settings refused");
                if self.ingest.dead_letter {
                    output.send(Outgoing::DeadLetter {
                        topic: topic.to_owned(),
                        codec: "subject-settings",
                        reason: Reason::Structure.as_str(),
                        detail,
                        payload: Some(payload.clone()),
                        received: now_micros(),
                    });
                }
            }
        }
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
    use super::*;
    use crate::config::PipelineConfig;
    use crate::pipeline::input::{queue, Received};
    use crate::pipeline::output::Output;
    use crate::pipeline::Publisher;
    use crate::store::SledStore;

    struct Discard;

    impl Publisher for Discard {
        fn publish(&mut self, _: String, _: Bytes, _: bool) -> Result<(), String> {
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
        // Records, for each alarm condition ingest hands on, its seq and the store's
        // reservation at that moment.
        let (alarm_tx, alarm_rx) = flume::bounded::<AlarmInput>(16);
        let ingest = ingest.with_alarm_stage("w", alarm_tx, Ears::default());
        let alarm_store = store.clone();
        let alarm_thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for m in alarm_rx.iter() {
                if let AlarmInput::Condition(ev) = m {
                    seen.push((ev.seq.unwrap(), alarm_store.seq_reserved().unwrap()));
                }
            }
            seen
        });
        let (output_stage, output, _probe) = Output::new(Box::new(Discard), 1 << 20);
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
        let seen = alarm_thread.join().unwrap();
        assert!(!seen.is_empty(), "the rule raised alarms");
        for &(seq, reserved) in seen.iter() {
            assert!(
                seq < reserved,
                "alarm names seq {seq}, reserved only below {reserved}"
            );
        }
    }
}
