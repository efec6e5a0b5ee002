//! The alarm stage: owns every alarm's lifecycle (`alarm::lifecycle`), the silence rules, the
//! NEWS2 band rules and adaptive-monitoring commands; keeps their state in `<data>/alarms/`;
//! and publishes every transition, retained, with its history, on
//! `alarms/<site>/<subject>/<rule>` (escalations also on `alarms/<site>/escalated`).
//!
//! Ingest hands it what its rules judged in device time, the NEWS2 scores, whom it heard, and
//! the acknowledgements devices and nurses' stations publish on
//! `alarms/<site>/<subject>/<rule>/ack`; HTTP acknowledges through an [`AlarmControl`]. It runs
//! on a thread of its own until ingest is gone, then keeps what it knows and ends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{debug, warn};

use super::output::{Outgoing, OutputHandle};
use super::ward::WardHub;
pub use crate::alarm::lifecycle::AckError;
use crate::alarm::lifecycle::{AlarmRecord, Board, Transition};
use crate::alarm::news2::{AdaptiveOptions, Command, News2Update, SubjectState};
use crate::alarm::silence::SilenceWatch;
use crate::alarm::{AlarmEngine, AlarmEvent, RuleConfig};
use crate::model::events::{AlarmChanged, InternalEvent};
use crate::model::metrics::Metrics;
use crate::model::reading::{format_ts, now_micros};
use crate::store::alarm_db::{AlarmDb, AlarmDbError, WatchRecord};
use crate::store::Store;
use crate::topic::{alarm_topic, news2_topic};

/// An acknowledgement (or, with `silence`, a silencing: an acknowledgement with a deadline).
#[derive(Debug, Clone, PartialEq)]
pub struct AckRequest {
    pub subject: String,
    pub rule: String,
    /// Who acknowledged: a name or badge id, recorded in the alarm's history.
    pub by: String,
    pub silence: Option<Duration>,
    /// For a silence alarm: the device was taken away on purpose (a patient discharged, a
    /// sensor removed); the alarm ends and the device is not watched until heard again.
    pub device_removed: bool,
    /// When given, the seq of the reading the acknowledger saw on the alarm: an alarm raised
    /// again since (another episode, another seq) is not acknowledged by mistake.
    pub seq: Option<u64>,
}

/// Longest `by` accepted: a name or a badge id, not a document.
pub const MAX_BY_BYTES: usize = 64;
/// Longest silence accepted: an alarm silenced for longer is an alarm switched off.
pub const MAX_SILENCE: Duration = Duration::from_secs(60 * 60);

impl AckRequest {
    fn check(&self) -> Result<(), AckError> {
        if self.by.trim().is_empty()
            || self.by.len() > MAX_BY_BYTES
            || self.by.chars().any(char::is_control)
        {
            return Err(AckError::Invalid(format!(
                "`by` names who acknowledges: 1 to {MAX_BY_BYTES} bytes, no control characters"
            )));
        }
        if self.silence.is_some_and(|s| s.is_zero() || s > MAX_SILENCE) {
            return Err(AckError::Invalid(format!(
                "a silence lasts from 1 s to {} s",
                MAX_SILENCE.as_secs()
            )));
        }
        Ok(())
    }
}

/// What the alarm stage is asked to do from outside.
#[derive(Debug)]
pub enum AlarmCommand {
    Ack {
        request: AckRequest,
        /// The alarm's message after the acknowledgement.
        reply: tokio::sync::oneshot::Sender<Result<Value, AckError>>,
    },
}

/// A cheap handle to the alarm stage, for HTTP.
#[derive(Debug, Clone)]
pub struct AlarmControl {
    tx: flume::Sender<AlarmCommand>,
}

impl AlarmControl {
    pub fn new(tx: flume::Sender<AlarmCommand>) -> Self {
        AlarmControl { tx }
    }

    /// Acknowledges (or silences) an alarm; answers with the alarm's message afterwards.
    pub async fn ack(&self, request: AckRequest) -> Result<Value, AckError> {
        request.check()?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx
            .send_async(AlarmCommand::Ack { request, reply })
            .await
            .map_err(|_| AckError::Stopped)?;
        answer.await.map_err(|_| AckError::Stopped)?
    }
}

/// What ingest hands the alarm stage.
#[derive(Debug)]
pub enum AlarmInput {
    /// A reading rule's condition changed.
    Condition(Box<AlarmEvent>),
    /// A subject's NEWS2 score changed; its whole state, to keep.
    News2 {
        update: Box<News2Update>,
        state: Box<SubjectState>,
    },
    /// A subject's NEWS2 state to keep (a setting changed, or ingest is stopping).
    Subject {
        subject: String,
        state: Box<SubjectState>,
    },
    /// Whom each silence rule heard since the last report (ingest reports a few times a
    /// second; the stage stamps it with its own clock).
    Heard { heard: Vec<Vec<String>> },
    /// An adaptive-monitoring command to publish.
    Command(Command),
    /// A message on `alarms/<site>/<subject>/<rule>/ack`.
    Ack { topic: String, payload: Bytes },
}

/// The body of an MQTT acknowledgement: `{"by": "...", "silence_s": 120}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AckMessage {
    by: String,
    #[serde(default)]
    silence_s: Option<u64>,
    #[serde(default)]
    device_removed: bool,
    #[serde(default)]
    seq: Option<u64>,
}

/// What a previous run left in `<data>/alarms/`, read before the stages start.
#[derive(Debug, Default)]
pub struct Kept {
    pub alarms: Vec<AlarmRecord>,
    pub subjects: Vec<(String, SubjectState)>,
    pub watches: Vec<WatchRecord>,
}

impl Kept {
    pub fn load(db: &AlarmDb) -> Result<Kept, AlarmDbError> {
        Ok(Kept {
            alarms: db.alarms()?,
            subjects: db.subjects()?,
            watches: db.watches()?,
        })
    }

    /// Puts the rules and the NEWS2 tracker back where the previous run left them.
    pub fn restore_engine(&self, engine: &mut AlarmEngine) {
        for r in &self.alarms {
            if r.condition {
                for source in &r.holding {
                    engine.restore(r.rule(), r.subject(), source, r.event.since, r.event.ts);
                }
            }
        }
        if let Some(t) = engine.news2_mut() {
            for (subject, s) in &self.subjects {
                t.restore(subject, s.clone());
            }
        }
    }
}

/// The service clock, µs since the epoch, read through tokio's clock: monotonic from the
/// wall-clock time the stage started, and paused with tokio's time in tests.
struct Clock {
    wall: i64,
    at: tokio::time::Instant,
}

impl Clock {
    fn start() -> Self {
        Clock {
            wall: now_micros(),
            at: tokio::time::Instant::now(),
        }
    }

    fn now(&self) -> i64 {
        let elapsed = i64::try_from(self.at.elapsed().as_micros()).unwrap_or(i64::MAX);
        self.wall.saturating_add(elapsed)
    }
}

/// How often NEWS2 states alone are made durable.
const SUBJECTS_EVERY: Duration = Duration::from_secs(1);

/// Longest the stage sleeps without looking at its timers.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// The alarm stage, built and ready to run on a thread of its own.
pub struct AlarmStage {
    site: String,
    board: Board,
    silence: SilenceWatch,
    adaptive: Option<AdaptiveOptions>,
    db: AlarmDb,
    output: OutputHandle,
    ward: Arc<WardHub>,
    metrics: Arc<Metrics>,
    /// Set when the database has changes not yet made durable.
    dirty: bool,
    /// Subjects' NEWS2 states to keep at the end of this round: a subject whose score changes
    /// with every message is written once a round, not once a message.
    subjects_to_keep: std::collections::HashMap<String, SubjectState>,
    /// Alarms changed this round, to keep (the latest state of each).
    alarms_to_keep: std::collections::HashMap<(String, String), AlarmRecord>,
    /// The silence watch's generation last written.
    watches_kept: u64,
    /// When NEWS2 states were last written.
    subjects_kept_at: std::time::Instant,
}

impl std::fmt::Debug for AlarmStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlarmStage").finish_non_exhaustive()
    }
}

impl AlarmStage {
    /// Builds the stage with what the previous run kept; checks each kept alarm's evidence
    /// against the store (a crash can lose a batch whose readings raised an alarm); publishes
    /// the kept alarms again (an embedded broker's retained messages do not outlive it).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        site: &str,
        rules: &[RuleConfig],
        adaptive: Option<AdaptiveOptions>,
        db: AlarmDb,
        kept: Kept,
        store: &dyn Store,
        output: OutputHandle,
        ward: Arc<WardHub>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let now = now_micros();
        let mut board = Board::new(rules);
        let mut silence = SilenceWatch::new(rules);
        for w in &kept.watches {
            silence.restore(&w.rule, &w.who, w.raised, now);
        }
        let (mut records, dropped) = board.restore(kept.alarms, now);
        // A raised silence whose watch a crash lost: watched again, raised, so that hearing
        // the device clears it.
        for r in &records {
            if r.event.kind == crate::alarm::RuleKind::Silence && r.condition {
                silence.restore(r.rule(), r.subject(), true, now);
            }
        }
        let unchecked: Vec<u64> = records
            .iter()
            .filter(|r| !r.evidence_checked)
            .filter_map(|r| r.event.seq)
            .collect();
        let stored = evidence_stored(store, &unchecked);
        for r in &mut records {
            let Some(seq) = r.event.seq.filter(|_| !r.evidence_checked) else {
                continue;
            };
            let live = board
                .get_mut(r.subject(), r.rule())
                .expect("restored above");
            live.evidence_checked = true;
            if !stored.contains(&seq) {
                live.remark(
                    now,
                    "evidence-lost",
                    format!(
                        "the reading with seq {seq} is not in the store: the service stopped \
                         before its batch was stored"
                    ),
                );
            }
            *r = live.clone();
        }
        let mut stage = AlarmStage {
            site: site.to_owned(),
            board,
            silence,
            adaptive,
            db,
            output,
            ward,
            metrics,
            dirty: false,
            subjects_to_keep: std::collections::HashMap::new(),
            alarms_to_keep: std::collections::HashMap::new(),
            watches_kept: 0,
            subjects_kept_at: std::time::Instant::now(),
        };
        stage.watches_kept = stage.silence.generation();
        for r in records.into_iter().chain(dropped) {
            stage.publish(Transition {
                record: r,
                escalated: false,
            });
        }
        stage.metrics.alarms_active.set(stage.board.len() as i64);
        stage
    }

    /// Runs until ingest has gone and everything it sent is handled. Async only for its
    /// timers: the service runs it on a thread of its own, on a current-thread runtime (its
    /// writes block that thread only), and tests run it with tokio's time paused.
    pub async fn run(
        mut self,
        input: flume::Receiver<AlarmInput>,
        commands: flume::Receiver<AlarmCommand>,
    ) -> Result<(), AlarmDbError> {
        let clock = Clock::start();
        let mut commands_open = true;
        loop {
            let now = clock.now();
            let due = [self.board.next_due(), self.silence.next_due()]
                .into_iter()
                .flatten()
                .min();
            let wait = due.map_or(MAX_WAIT, |d| {
                Duration::from_micros(d.saturating_sub(now).max(0) as u64).min(MAX_WAIT)
            });
            let deadline = tokio::time::Instant::now() + wait;
            tokio::select! {
                biased;
                m = input.recv_async() => match m {
                    Ok(m) => {
                        self.handle(m, clock.now());
                        // Take what else is waiting before making it durable once.
                        for m in input.try_iter().take(1024) {
                            self.handle(m, clock.now());
                        }
                    }
                    Err(_) => break,
                },
                c = commands.recv_async(), if commands_open => match c {
                    Ok(c) => self.command(c, clock.now()),
                    // HTTP has gone: nothing more comes from there.
                    Err(_) => commands_open = false,
                },
                _ = tokio::time::sleep_until(deadline) => {}
            }
            self.tick(clock.now());
            if let Err(e) = self.persist() {
                // Kept for the next round: a full disk or a failing device must not take the
                // alarms down with it; the stop reports what could not be made durable.
                self.metrics.store_errors.inc();
                warn!(error = %e, "could not make the alarm state durable; retrying");
            }
        }
        self.finish()
    }

    /// Keeps what the silence rules watch, and makes everything durable.
    fn finish(mut self) -> Result<(), AlarmDbError> {
        self.persist_now()
    }

    /// Writes what changed this round and makes it durable: at once when an alarm or a silence
    /// watch changed, at most once a second when only NEWS2 states did (a subject's score can
    /// change with every message, and a write that waits for the disk each time would delay
    /// the next alarm behind it). An entry leaves the to-keep maps only once written: after a
    /// failure, the rest are still there for the next round.
    fn persist(&mut self) -> Result<(), AlarmDbError> {
        let urgent = !self.alarms_to_keep.is_empty()
            || self.silence.generation() != self.watches_kept
            || self.dirty;
        if !urgent && self.subjects_kept_at.elapsed() < SUBJECTS_EVERY {
            return Ok(());
        }
        self.persist_now()
    }

    fn persist_now(&mut self) -> Result<(), AlarmDbError> {
        let keys: Vec<(String, String)> = self.alarms_to_keep.keys().cloned().collect();
        for key in keys {
            self.db.put_alarm(&self.alarms_to_keep[&key])?;
            self.alarms_to_keep.remove(&key);
            self.dirty = true;
        }
        let subjects: Vec<String> = self.subjects_to_keep.keys().cloned().collect();
        for subject in subjects {
            self.db
                .put_subject(&subject, &self.subjects_to_keep[&subject])?;
            self.subjects_to_keep.remove(&subject);
            self.dirty = true;
        }
        self.subjects_kept_at = std::time::Instant::now();
        // Whom the silence rules watch, when that changed: a crash must not forget a device
        // whose silence is raised, nor bring back one acknowledged as taken away.
        if self.silence.generation() != self.watches_kept {
            let watches: Vec<WatchRecord> = self
                .silence
                .watched()
                .into_iter()
                .map(|(rule, who, _, raised)| WatchRecord { rule, who, raised })
                .collect();
            self.db.put_watches(&watches)?;
            self.watches_kept = self.silence.generation();
            self.dirty = true;
        }
        if self.dirty {
            self.db.flush()?;
            self.dirty = false;
        }
        Ok(())
    }

    fn tick(&mut self, now: i64) {
        for t in self.board.tick(now) {
            self.publish(t);
        }
        let mut events = Vec::new();
        self.silence.tick(now, &mut events);
        for ev in events {
            self.condition(ev, now);
        }
    }

    fn condition(&mut self, ev: AlarmEvent, now: i64) {
        if let Some(t) = self.board.condition(ev, now) {
            self.publish(t);
        }
    }

    fn handle(&mut self, m: AlarmInput, now: i64) {
        match m {
            AlarmInput::Condition(ev) => self.condition(*ev, now),
            AlarmInput::News2 { update, state } => {
                self.keep_subject(&update.subject, *state);
                let mut body = serde_json::to_value(update.as_ref()).expect("a score serialises");
                body["site"] = self.site.clone().into();
                body["time"] = format_ts(update.ts).into();
                self.ward.news2(&update.subject, body.clone());
                self.output.send(Outgoing::Message {
                    topic: news2_topic(&self.site, &update.subject),
                    payload: Bytes::from(body.to_string()),
                    retain: true,
                });
                for t in self.board.news2(&update, now) {
                    self.publish(t);
                }
            }
            AlarmInput::Subject { subject, state } => self.keep_subject(&subject, *state),
            AlarmInput::Heard { heard } => {
                let mut events = Vec::new();
                self.silence.heard(heard, now, &mut events);
                for ev in events {
                    self.condition(ev, now);
                }
            }
            AlarmInput::Command(c) => self.adapt(&c),
            AlarmInput::Ack { topic, payload } => self.mqtt_ack(&topic, &payload, now),
        }
    }

    fn keep_subject(&mut self, subject: &str, state: SubjectState) {
        self.subjects_to_keep.insert(subject.to_owned(), state);
    }

    fn adapt(&mut self, c: &Command) {
        let Some(a) = &self.adaptive else { return };
        let sources: Vec<&str> = if a.topic.contains("{source}") {
            c.sources.iter().map(String::as_str).collect()
        } else {
            vec![c.sources.last().map_or("", String::as_str)]
        };
        for source in sources {
            self.metrics
                .adaptive_commands
                .with_label_values(&[if c.raise { "raise" } else { "relax" }])
                .inc();
            self.output.send(Outgoing::Message {
                topic: a.render_topic(&self.site, &c.subject, source),
                payload: Bytes::from(a.render_payload(c, &self.site, source)),
                retain: false,
            });
        }
    }

    /// `alarms/<site>/<subject>/<rule>/ack`: the alarm whose topic this is, acknowledged by
    /// the body's `by`.
    fn mqtt_ack(&mut self, topic: &str, payload: &[u8], now: i64) {
        let Some(alarm) = topic.strip_suffix("/ack") else {
            return;
        };
        let found = self
            .board
            .records()
            .find(|r| alarm_topic(&self.site, r.subject(), r.rule()) == alarm)
            .map(|r| (r.subject().to_owned(), r.rule().to_owned()));
        let parsed = serde_json::from_slice::<AckMessage>(payload).map_err(|e| {
            AckError::Invalid(format!(
                "an acknowledgement is {{\"by\": ..., \"silence_s\": ...}}: {e}"
            ))
        });
        let result = match (found, parsed) {
            (None, _) => Err(AckError::NotFound {
                rule: alarm.rsplit('/').next().unwrap_or("").to_owned(),
            }),
            (_, Err(e)) => Err(e),
            (Some((subject, rule)), Ok(m)) => {
                let request = AckRequest {
                    subject,
                    rule,
                    by: m.by,
                    silence: m.silence_s.map(Duration::from_secs),
                    device_removed: m.device_removed,
                    seq: m.seq,
                };
                self.ack(&request, now)
            }
        };
        if let Err(e) = result {
            self.metrics.alarm_acks_refused.inc();
            debug!(topic, error = %e, "an acknowledgement was refused");
        }
    }

    fn ack(&mut self, request: &AckRequest, now: i64) -> Result<Value, AckError> {
        request.check()?;
        if let (Some(want), Some(r)) =
            (request.seq, self.board.get(&request.subject, &request.rule))
        {
            if r.event.seq != Some(want) {
                return Err(AckError::Invalid(format!(
                    "the alarm was raised again since (seq {want} is not its evidence): look again"
                )));
            }
        }
        if request.device_removed
            && self
                .board
                .get(&request.subject, &request.rule)
                .is_some_and(|r| r.event.kind != crate::alarm::RuleKind::Silence)
        {
            return Err(AckError::Invalid(
                "device_removed answers a silence alarm only".into(),
            ));
        }
        if request.device_removed && request.silence.is_some() {
            return Err(AckError::Invalid(
                "a removed device is not silenced: give one of silence_s and device_removed".into(),
            ));
        }
        let silence = request
            .silence
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let t = self.board.ack(
            &request.subject,
            &request.rule,
            request.by.trim(),
            silence,
            now,
        )?;
        let mut body = self.message(&t.record);
        let silence_acknowledged = request.device_removed
            && t.record.event.kind == crate::alarm::RuleKind::Silence
            && t.record.state == crate::alarm::lifecycle::AlarmState::Acknowledged;
        self.publish(t);
        if silence_acknowledged {
            // A device acknowledged as silent was taken away on purpose (a patient discharged,
            // a sensor removed): stop watching it until it is heard again, rather than keep an
            // alarm about it for ever.
            self.silence.forget(&request.rule, &request.subject);
            let why = "no longer watched until it is heard again";
            if let Some(t) = self
                .board
                .dismiss(&request.subject, &request.rule, now, why)
            {
                body = self.message(&t.record);
                self.publish(t);
            }
        }
        Ok(body)
    }

    fn command(&mut self, c: AlarmCommand, now: i64) {
        match c {
            AlarmCommand::Ack { request, reply } => {
                let result = self.ack(&request, now);
                if result.is_err() {
                    self.metrics.alarm_acks_refused.inc();
                }
                let _ = reply.send(result);
            }
        }
    }

    /// Publishes a transition, shows it on the ward view, and keeps it.
    fn publish(&mut self, t: Transition) {
        let r = &t.record;
        AlarmChanged {
            rule: r.rule(),
            subject: r.subject(),
            priority: r.priority.as_str(),
            what: r.history.last().map_or("", |h| h.what.as_str()),
            seq: r.event.seq,
            active: self.board.len(),
        }
        .emit(&self.metrics);
        let body = self.message(r);
        let cleared = r.state == crate::alarm::lifecycle::AlarmState::Cleared;
        self.ward
            .alarm(r.subject(), r.rule(), body.clone(), cleared);
        let payload = Bytes::from(body.to_string());
        if t.escalated {
            self.output.send(Outgoing::Message {
                topic: format!("alarms/{}/escalated", self.site),
                payload: payload.clone(),
                retain: false,
            });
        }
        self.output.send(Outgoing::Message {
            topic: alarm_topic(&self.site, r.subject(), r.rule()),
            payload,
            retain: true,
        });
        self.alarms_to_keep
            .insert((r.subject().to_owned(), r.rule().to_owned()), r.clone());
    }

    /// An alarm's message: the alarm, where it stands, its evidence and its history.
    fn message(&self, r: &AlarmRecord) -> Value {
        alarm_message(&self.site, r)
    }
}

/// The retained message of an alarm on `alarms/<site>/<subject>/<rule>`.
pub fn alarm_message(site: &str, r: &AlarmRecord) -> Value {
    let e = &r.event;
    let evidence = e.evidence.as_ref().map(|ev| {
        json!({
            "seq": ev.seq,
            "ts": format_ts(ev.ts),
            "received": format_ts(ev.received),
            "source": ev.source,
            "metric": ev.metric,
            "value": ev.value,
            "flags": ev.flags,
        })
    });
    let history: Vec<Value> = r
        .history
        .iter()
        .map(|h| {
            let mut v = json!({
                "at": format_ts(h.at),
                "what": h.what,
                "priority": h.priority.as_str(),
            });
            if let Some(by) = &h.by {
                v["by"] = by.clone().into();
            }
            if let Some(seq) = h.seq {
                v["seq"] = seq.into();
            }
            if let Some(note) = &h.note {
                v["note"] = note.clone().into();
            }
            v
        })
        .collect();
    json!({
        "site": site,
        "subject": e.subject,
        "rule": e.rule,
        "kind": if e.kind.technical() { "technical" } else { "clinical" },
        "type": e.kind.as_str(),
        "state": r.state.as_str(),
        "priority": r.priority.as_str(),
        "condition_holds": r.condition,
        "latching": r.latching,
        "metric": e.metric,
        "value": e.value,
        "condition": e.condition,
        "threshold": e.threshold,
        "seq": e.seq,
        "ts": format_ts(e.ts),
        "since": format_ts(e.since),
        "raised_at": format_ts(r.raised_at),
        "escalations": r.escalations,
        "acknowledged": r.acknowledged.as_ref().map(|a| json!({"by": a.by, "at": format_ts(a.at)})),
        "silenced_until": r.silenced_until.map(format_ts),
        "evidence": evidence,
        "history": history,
    })
}

/// Which of `seqs` lie in a stored batch.
fn evidence_stored(store: &dyn Store, seqs: &[u64]) -> Vec<u64> {
    if seqs.is_empty() {
        return Vec::new();
    }
    let headers = match store.headers() {
        Ok(h) => h,
        Err(e) => {
            // Not knowing is not losing: say nothing rather than call evidence lost.
            warn!(error = %e, "could not read the batch headers to check alarms' evidence");
            return seqs.to_vec();
        }
    };
    let ranges: BTreeMap<u64, u64> = headers.iter().map(|h| (h.seq_first, h.seq_last)).collect();
    seqs.iter()
        .copied()
        .filter(|&s| {
            ranges
                .range(..=s)
                .next_back()
                .is_some_and(|(_, &max)| s <= max)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    //! The stage driven in-process with an explicit service clock: every delay, silence and
    //! escalation at exactly its time, no sleeping.
    use std::sync::Mutex;

    use super::*;
    use crate::alarm::{Priority, RuleKind};
    use crate::pipeline::output::Output;
    use crate::pipeline::Publisher;
    use crate::store::SledStore;

    const S: i64 = 1_000_000;
    const T0: i64 = 1_700_000_000 * S;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<(String, Value)>>>);

    impl Publisher for Capture {
        fn publish(&mut self, topic: String, payload: Bytes, _: bool) -> Result<(), String> {
            let v = serde_json::from_slice(&payload).unwrap_or(Value::Null);
            self.0.lock().unwrap().push((topic, v));
            Ok(())
        }
    }

    fn rules() -> Vec<RuleConfig> {
        #[derive(Deserialize)]
        struct Rules {
            rule: Vec<RuleConfig>,
        }
        toml::from_str::<Rules>(
            r#"
[[rule]]
name = "spo2-low"
metric = "spo2"
below = 92
latching = true
escalate_after = "2m"
priority = "medium"
[[rule]]
name = "monitor-silent"
kind = "silence"
per = "source"
after = "1m"
priority = "low"
"#,
        )
        .unwrap()
        .rule
    }

    fn raise(seq: u64, active: bool) -> AlarmInput {
        AlarmInput::Condition(Box::new(AlarmEvent {
            rule: "spo2-low".into(),
            subject: "bed-1".into(),
            source: None,
            active,
            priority: Priority::Medium,
            kind: RuleKind::Threshold,
            metric: Some("spo2".into()),
            value: Some(85.0),
            condition: "below".into(),
            threshold: 92.0,
            seq: Some(seq),
            ts: T0,
            since: T0,
            evidence: None,
        }))
    }

    /// Runs `f` on a stage over the data directory `dir`, then ends it; what it published.
    fn with_stage(dir: &std::path::Path, f: impl FnOnce(&mut AlarmStage)) -> Vec<(String, Value)> {
        let capture = Capture::default();
        let (output, handle, _) = Output::new(Box::new(capture.clone()), 1 << 20);
        let out = std::thread::spawn(move || output.run());
        let store = SledStore::open(&dir.join("store")).unwrap();
        let db = AlarmDb::open(&dir.join("alarms")).unwrap();
        let kept = Kept::load(&db).unwrap();
        let metrics = Metrics::new();
        let mut stage = AlarmStage::new(
            "w",
            &rules(),
            None,
            db,
            kept,
            &store,
            handle,
            Arc::new(WardHub::new("w")),
            metrics,
        );
        f(&mut stage);
        stage.finish().unwrap();
        out.join().unwrap();
        let published = capture.0.lock().unwrap().clone();
        published
    }

    fn states(published: &[(String, Value)], topic: &str) -> Vec<String> {
        published
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, v)| {
                format!(
                    "{} {}",
                    v["state"].as_str().unwrap(),
                    v["priority"].as_str().unwrap()
                )
            })
            .collect()
    }

    #[test]
    fn latching_silence_escalation_and_a_restart_at_their_exact_times() {
        let dir = tempfile::tempdir().unwrap();
        let alarm = "alarms/w/bed-1/spo2-low";
        let published = with_stage(dir.path(), |stage| {
            stage.handle(raise(7, true), T0);
            // Silenced for 60 s over MQTT at T0 + 10 s, while the condition holds.
            stage.handle(
                AlarmInput::Ack {
                    topic: format!("{alarm}/ack"),
                    payload: Bytes::from_static(br#"{"by": "nurse-jo", "silence_s": 60}"#),
                },
                T0 + 10 * S,
            );
            stage.tick(T0 + 69 * S);
            stage.tick(T0 + 70 * S); // silence over, condition holds: active, announced again
                                     // Latching: the condition clearing leaves it active.
            stage.handle(raise(8, false), T0 + 80 * S);
            stage.tick(T0 + 189 * S);
            stage.tick(T0 + 190 * S); // 2 minutes unacknowledged since T0 + 70: escalated
                                      // A monitor heard at T0, then not for a minute: a technical alarm.
            stage.handle(
                AlarmInput::Heard {
                    heard: vec![vec!["mon-1".into()]],
                },
                T0,
            );
            stage.tick(T0 + 59 * S);
            stage.tick(T0 + 60 * S);
            // The monitor was taken away on purpose: acknowledging its silence ends the watch.
            let request = AckRequest {
                subject: "mon-1".into(),
                rule: "monitor-silent".into(),
                by: "nurse-jo".into(),
                silence: None,
                device_removed: false,
                seq: None,
            };
            let body = stage.ack(&request, T0 + 61 * S).unwrap();
            assert_eq!(
                body["state"], "acknowledged",
                "a plain acknowledgement keeps watching"
            );
            let removed = AckRequest {
                device_removed: true,
                ..request
            };
            let body = stage.ack(&removed, T0 + 62 * S).unwrap();
            assert_eq!(body["state"], "cleared");
            // Another monitor, heard and still watched when the stage ends.
            stage.handle(
                AlarmInput::Heard {
                    heard: vec![vec!["mon-2".into()]],
                },
                T0 + 3000 * S,
            );
            stage.tick(T0 + 3600 * S);
        });
        assert_eq!(
            states(&published, alarm),
            [
                "active medium",
                "silenced medium",
                "active medium",
                "active medium",
                "active high",
                // Still nobody acknowledges: announced again at high on the next tick.
                "active high"
            ]
        );
        let escalations: Vec<_> = published
            .iter()
            .filter(|(t, _)| t == "alarms/w/escalated")
            .collect();
        assert_eq!(escalations.len(), 2);
        assert_eq!(
            states(&published, "alarms/w/mon-1/monitor-silent"),
            [
                "active low",
                "acknowledged low",
                "acknowledged low",
                "cleared low"
            ],
            "and not raised again an hour later"
        );

        // A restart: the same alarm, its history, published again; nothing raised anew; the
        // silence watch kept (counted from the restart).
        let published = with_stage(dir.path(), |stage| {
            assert_eq!(stage.board.len(), 2, "spo2-low, and mon-2's silence");
            let watched: Vec<String> = stage.silence.watched().into_iter().map(|w| w.1).collect();
            assert_eq!(
                watched,
                ["mon-2"],
                "mon-1 was taken away; mon-2 is still watched"
            );
        });
        let (_, v) = published.iter().find(|(t, _)| t == alarm).unwrap();
        let history: Vec<&str> = v["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["what"].as_str().unwrap())
            .collect();
        assert_eq!(
            history,
            [
                "raised",
                "silenced",
                "silence-ended",
                "condition-cleared",
                "escalated",
                "escalated",
                "restored",
                "evidence-lost"
            ],
            "seq 7 was never stored: this store is empty"
        );
        assert_eq!(
            states(&published, alarm),
            ["active high"],
            "not raised again"
        );
    }

    /// Polls (in real time, briefly) until the output thread has published what `done` wants.
    fn wait_published(capture: &Capture, done: impl Fn(&[(String, Value)]) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done(&capture.0.lock().unwrap()) {
            assert!(std::time::Instant::now() < deadline, "not published");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// The stage's own loop, with tokio's time paused: an escalation after two minutes and a
    /// silence after one come at their virtual times, an acknowledgement through the HTTP
    /// handle is answered, and the stage ends when ingest goes.
    #[tokio::test(start_paused = true)]
    async fn the_stage_loop_runs_its_timers_on_paused_time() {
        let dir = tempfile::tempdir().unwrap();
        let capture = Capture::default();
        let (output, handle, _) = Output::new(Box::new(capture.clone()), 1 << 20);
        let out = std::thread::spawn(move || output.run());
        let store = SledStore::open(&dir.path().join("store")).unwrap();
        let db = AlarmDb::open(&dir.path().join("alarms")).unwrap();
        let stage = AlarmStage::new(
            "w",
            &rules(),
            None,
            db,
            Kept::default(),
            &store,
            handle,
            Arc::new(WardHub::new("w")),
            Metrics::new(),
        );
        let (tx, rx) = flume::bounded(16);
        let (control_tx, control_rx) = flume::bounded(4);
        let control = AlarmControl::new(control_tx);
        let running = tokio::spawn(stage.run(rx, control_rx));
        let alarm = "alarms/w/bed-1/spo2-low";
        let silent = "alarms/w/mon-1/monitor-silent";
        let count =
            |p: &[(String, Value)], topic: &str| p.iter().filter(|(t, _)| t == topic).count();

        tx.send_async(raise(7, true)).await.unwrap();
        tx.send_async(AlarmInput::Heard {
            heard: vec![vec!["mon-1".into()]],
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        wait_published(&capture, |p| count(p, alarm) == 1);
        // A minute of silence from mon-1 (virtual time): its technical alarm.
        tokio::time::sleep(Duration::from_secs(60)).await;
        wait_published(&capture, |p| count(p, silent) == 1);
        // Two minutes unacknowledged: spo2-low escalates to high.
        tokio::time::sleep(Duration::from_secs(60)).await;
        wait_published(&capture, |p| {
            p.iter()
                .any(|(t, v)| t == "alarms/w/escalated" && v["priority"] == "high")
        });
        // Acknowledged through the handle HTTP uses; a wrong seq is refused first.
        let mut request = AckRequest {
            subject: "bed-1".into(),
            rule: "spo2-low".into(),
            by: "nurse-jo".into(),
            silence: None,
            device_removed: false,
            seq: Some(6),
        };
        assert!(matches!(
            control.ack(request.clone()).await,
            Err(AckError::Invalid(_))
        ));
        request.seq = Some(7);
        let body = control.ack(request).await.unwrap();
        assert_eq!(body["state"], "acknowledged");
        // No more escalation once acknowledged, however long.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(tx);
        running.await.unwrap().unwrap();
        out.join().unwrap();
        let published = capture.0.lock().unwrap();
        assert_eq!(
            published
                .iter()
                .filter(|(t, _)| t == "alarms/w/escalated")
                .count(),
            1
        );
    }
}
