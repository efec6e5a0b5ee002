//! Internal events: each is a typed struct that both counts its metric and logs, so the two can
//! never disagree. Logs carry topics, codecs, reasons and counts, never payload values or keys.
//! Per-message events are logged at most once a minute per kind, so a flood of bad payloads
//! cannot flood the log (the metric still counts every one).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::model::decode_error::DecodeError;
use crate::model::metrics::Metrics;

const LOG_EVERY: Duration = Duration::from_secs(60);

pub trait InternalEvent {
    fn emit(self, m: &Metrics);
}

static LAST_LOGGED: Mutex<Option<HashMap<String, Instant>>> = Mutex::new(None);

/// True when an event of this kind was not logged in the last minute.
fn log_due(kind: &str) -> bool {
    let mut guard = LAST_LOGGED.lock().unwrap_or_else(|e| e.into_inner());
    let map = guard.get_or_insert_with(HashMap::new);
    let now = Instant::now();
    match map.get(kind) {
        Some(t) if now.duration_since(*t) < LOG_EVERY => false,
        _ => {
            map.insert(kind.to_owned(), now);
            true
        }
    }
}

pub struct DecodeFailed<'a> {
    /// The route's topic filter, from the pipeline file: topics themselves may name patients.
    pub route: &'a str,
    pub codec: &'static str,
    pub error: &'a DecodeError,
}

impl InternalEvent for DecodeFailed<'_> {
    fn emit(self, m: &Metrics) {
        let reason = self.error.reason.as_str();
        m.decode_failures
            .with_label_values(&[self.codec, reason])
            .inc();
        if log_due(&format!("decode/{}/{reason}", self.codec)) {
            warn!(route = self.route, codec = self.codec, reason,
                "payload could not be decoded; sent to the dead-letter topic (logged once a minute per codec and reason; the detail at debug level)");
        }
        // Details name fields, but a field's name can be a device's (a SenML name, a topic
        // level): not at warn.
        debug!(route = self.route, codec = self.codec, reason, detail = %self.error.detail, "decode failed");
    }
}

pub struct PayloadOversized<'a> {
    /// The route's topic filter, or where the message was refused (`broker`).
    pub route: &'a str,
    pub size: usize,
    /// The setting it exceeds.
    pub limit: &'a str,
}

impl InternalEvent for PayloadOversized<'_> {
    fn emit(self, m: &Metrics) {
        m.payloads_oversized.inc();
        if log_due("oversized") {
            warn!(
                route = self.route,
                size = self.size,
                limit = self.limit,
                "payload refused before decoding: too large; dead-lettered without its bytes (logged once a minute)"
            );
        }
    }
}

pub struct TopicUnrouted<'a> {
    /// Logged at debug level only: topics may name patients.
    pub topic: &'a str,
}

impl InternalEvent for TopicUnrouted<'_> {
    fn emit(self, m: &Metrics) {
        m.messages_unrouted.inc();
        if log_due("unrouted") {
            info!("a message arrived on a topic no route matches (logged once a minute; the topic at debug level)");
        }
        debug!(topic = self.topic, "unrouted message");
    }
}

/// A client published to a topic name MQTT does not allow (wildcards, NUL, not UTF-8).
pub struct TopicRefused {
    pub reason: &'static str,
}

impl InternalEvent for TopicRefused {
    fn emit(self, m: &Metrics) {
        m.topics_refused.with_label_values(&[self.reason]).inc();
        if log_due("topic-refused") {
            warn!(
                reason = self.reason,
                "a client's publish, will or subscription was refused for its topic (logged once a minute)"
            );
        }
    }
}

pub struct BatchStored {
    pub id: u64,
    pub rows: usize,
    pub bytes: usize,
}

impl InternalEvent for BatchStored {
    fn emit(self, m: &Metrics) {
        m.batches_sealed.inc();
        m.readings_stored.inc_by(self.rows as u64);
        m.bytes_stored.inc_by(self.bytes as u64);
        debug!(
            batch = self.id,
            rows = self.rows,
            bytes = self.bytes,
            "batch sealed and stored"
        );
    }
}

pub struct BatchFailed<'a> {
    pub id: u64,
    pub rows: usize,
    pub error: &'a dyn std::error::Error,
}

impl InternalEvent for BatchFailed<'_> {
    fn emit(self, m: &Metrics) {
        m.store_errors.inc();
        tracing::error!(batch = self.id, rows = self.rows, error = %self.error, "batch could not be sealed or stored");
    }
}

pub struct CheckpointCut {
    pub size: u64,
}

impl InternalEvent for CheckpointCut {
    fn emit(self, m: &Metrics) {
        m.checkpoints_cut.inc();
        debug!(size = self.size, "checkpoint cut");
    }
}

pub struct AnchorDone<'a> {
    pub backend: &'a str,
    pub size: u64,
}

impl InternalEvent for AnchorDone<'_> {
    fn emit(self, m: &Metrics) {
        m.anchors.with_label_values(&[self.backend, "done"]).inc();
        debug!(
            backend = self.backend,
            size = self.size,
            "checkpoint anchored"
        );
    }
}

pub struct AnchorFailed<'a> {
    pub backend: &'a str,
    pub size: u64,
    pub error: &'a dyn std::error::Error,
}

impl InternalEvent for AnchorFailed<'_> {
    fn emit(self, m: &Metrics) {
        m.anchors.with_label_values(&[self.backend, "failed"]).inc();
        if log_due(&format!("anchor/{}", self.backend)) {
            warn!(backend = self.backend, size = self.size, error = %self.error,
                "anchoring a checkpoint failed; it stays in the outbox and is retried (logged once a minute per backend)");
        }
    }
}

/// An alarm changed state (raised, acknowledged, silenced, escalated, cleared, ...).
pub struct AlarmChanged<'a> {
    pub rule: &'a str,
    /// Identifies a patient or bed: logged at debug level only.
    pub subject: &'a str,
    pub priority: &'static str,
    /// What happened: the last entry of the alarm's history.
    pub what: &'a str,
    /// The reading behind the alarm, if any.
    pub seq: Option<u64>,
    /// Alarms not cleared, after the change.
    pub active: usize,
}

impl InternalEvent for AlarmChanged<'_> {
    fn emit(self, m: &Metrics) {
        m.alarms_active.set(self.active as i64);
        m.alarm_transitions.with_label_values(&[self.what]).inc();
        match self.what {
            "raised" => m.alarms_raised.with_label_values(&[self.priority]).inc(),
            "cleared" => m.alarms_cleared.inc(),
            _ => {}
        }
        info!(
            rule = self.rule,
            priority = self.priority,
            what = self.what,
            seq = self.seq,
            "alarm changed"
        );
        debug!(
            rule = self.rule,
            subject = self.subject,
            what = self.what,
            "alarm changed (subject)"
        );
    }
}

/// The broker refused a connection: too many, a failed TLS handshake, bad credentials, an
/// anonymous client where none are allowed. Logged without the user name a client offered
/// (it may be a mistyped password).
pub struct ConnectionRefused {
    pub reason: &'static str,
}

impl InternalEvent for ConnectionRefused {
    fn emit(self, m: &Metrics) {
        m.connections_refused
            .with_label_values(&[self.reason])
            .inc();
        if log_due(&format!("connection-refused-{}", self.reason)) {
            warn!(
                reason = self.reason,
                "a client's connection was refused (logged once a minute per reason)"
            );
        }
    }
}

/// An authenticated client published what its account may not: readings as another device or
/// subject (an impostor), or an alarm acknowledgement or setting from a device account. The
/// account is named (it is a device's name, not a patient's); the topic is not.
pub struct PublishRefused<'a> {
    pub reason: &'static str,
    pub account: &'a str,
}

impl InternalEvent for PublishRefused<'_> {
    fn emit(self, m: &Metrics) {
        m.publishes_refused.with_label_values(&[self.reason]).inc();
        if log_due(&format!("publish-refused-{}", self.reason)) {
            warn!(
                reason = self.reason,
                account = self.account,
                "a publish was refused (logged once a minute per reason)"
            );
        }
    }
}

/// A connection went past its rate or in-flight limit and is not read until it is back
/// within it.
pub struct PublishesDelayed {
    pub limit: &'static str,
}

impl InternalEvent for PublishesDelayed {
    fn emit(self, m: &Metrics) {
        m.publishes_delayed.with_label_values(&[self.limit]).inc();
        if log_due(&format!("publishes-delayed-{}", self.limit)) {
            info!(
                limit = self.limit,
                "a client publishes faster than its limit allows: slowed (logged once a minute)"
            );
        }
    }
}
