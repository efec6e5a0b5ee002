//! The output stage: publishes alarms (`alarms/<site>/<subject>/<rule>`, QoS 1, retained while
//! active, cleared by an empty retained message) and dead letters (`edge/deadletter/<topic>`)
//! through whichever [`Publisher`] the transport gives it, on a thread of its own. Its queue is
//! bounded in bytes: ingest waits when it is full (back-pressure), nothing is dropped.

use std::sync::{Arc, Condvar, Mutex};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use serde_json::json;
use tracing::{debug, error};

use super::ward::WardHub;
use super::Publisher;
use crate::alarm::news2::News2Update;
use crate::alarm::AlarmEvent;
use crate::model::reading::format_ts;
use crate::topic::{alarm_topic, dead_letter_topic, news2_topic};

/// Something to publish.
#[derive(Debug)]
pub enum Outgoing {
    Alarm(AlarmEvent),
    /// A subject's NEWS2 score changed.
    News2(Box<News2Update>),
    DeadLetter {
        topic: String,
        codec: &'static str,
        reason: &'static str,
        detail: String,
        /// `None` for payloads refused for their size.
        payload: Option<Bytes>,
        received: i64,
    },
}

impl Outgoing {
    /// Roughly the bytes this message holds while queued.
    fn bytes(&self) -> usize {
        128 + match self {
            Outgoing::Alarm(e) => e.rule.len() + e.subject.len(),
            Outgoing::News2(u) => u.subject.len() + 1024,
            Outgoing::DeadLetter {
                topic,
                detail,
                payload,
                ..
            } => topic.len() + detail.len() + payload.as_ref().map_or(0, Bytes::len),
        }
    }
}

/// Bytes queued, and a condition to wait on for room.
#[derive(Debug)]
struct Room {
    state: Mutex<RoomState>,
    freed: Condvar,
    capacity: usize,
}

#[derive(Debug, Default)]
struct RoomState {
    used: usize,
    /// The stage has ended: nobody frees room any more, so nobody may wait for it.
    closed: bool,
}

impl Room {
    /// Waits until `n` more bytes fit (or the queue is empty: one message larger than the
    /// whole queue still passes, alone). False once the stage has ended.
    fn take(&self, n: usize) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while !s.closed && s.used > 0 && s.used + n > self.capacity {
            s = self.freed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.closed {
            return false;
        }
        s.used += n;
        true
    }

    fn give(&self, n: usize) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.used = s.used.saturating_sub(n);
        self.freed.notify_all();
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.freed.notify_all();
    }

    fn used(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).used
    }
}

/// A cheap handle for queueing messages to publish. Sending waits while the queue is full.
#[derive(Debug, Clone)]
pub struct OutputHandle {
    tx: flume::Sender<(Outgoing, usize)>,
    room: Arc<Room>,
}

impl OutputHandle {
    pub fn send(&self, o: Outgoing) {
        let n = o.bytes();
        if !self.room.take(n) || self.tx.send((o, n)).is_err() {
            self.room.give(n);
            error!("the output stage has stopped; an alarm or dead letter could not be published");
        }
    }
}

/// The output stage, built and ready to run on a thread of its own.
pub struct Output {
    site: String,
    publisher: Box<dyn Publisher>,
    rx: flume::Receiver<(Outgoing, usize)>,
    room: Arc<Room>,
    ward: Option<Arc<WardHub>>,
}

/// Closes the queue's room when the stage ends, a panic included, so that no sender waits for
/// room nobody will free.
struct CloseOnDrop(Arc<Room>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl Output {
    /// The stage, the handle ingest queues messages with, and a probe of the queued bytes.
    pub fn new(
        site: String,
        publisher: Box<dyn Publisher>,
        max_bytes: usize,
    ) -> (Self, OutputHandle, impl Fn() -> i64 + Send + Sync) {
        let (tx, rx) = flume::unbounded::<(Outgoing, usize)>();
        let room = Arc::new(Room {
            state: Mutex::new(RoomState::default()),
            freed: Condvar::new(),
            capacity: max_bytes.max(1),
        });
        let probe_room = room.clone();
        (
            Output {
                site,
                publisher,
                rx,
                room: room.clone(),
                ward: None,
            },
            OutputHandle { tx, room },
            move || probe_room.used() as i64,
        )
    }

    /// Shows alarms and scores on the ward view too.
    pub fn with_ward(mut self, ward: Arc<WardHub>) -> Self {
        self.ward = Some(ward);
        self
    }

    /// Publishes until every handle is dropped and the queue is drained.
    pub fn run(mut self) {
        let _close = CloseOnDrop(self.room.clone());
        for (o, n) in self.rx.iter() {
            // Fault tests: `output-message=panic` fails the stage.
            #[cfg(feature = "failpoints")]
            fail::fail_point!("output-message");
            let (topic, payload, retain) = encode(&self.site, &o);
            self.room.give(n);
            if let Some(ward) = &self.ward {
                show(ward, &o, &payload);
            }
            if let Err(e) = self.publisher.publish(topic.clone(), payload, retain) {
                // The topic names a subject: only at debug level.
                error!(error = %e, "could not publish an alarm or dead letter");
                debug!(topic, "the message that could not be published");
            }
        }
    }
}

/// Shows an alarm or a score on the ward view.
fn show(ward: &WardHub, o: &Outgoing, payload: &Bytes) {
    let body = || serde_json::from_slice(payload).unwrap_or(serde_json::Value::Null);
    match o {
        Outgoing::Alarm(e) => ward.alarm(&e.subject, &e.rule, body(), !e.active),
        Outgoing::News2(u) => ward.news2(&u.subject, body()),
        Outgoing::DeadLetter { .. } => {}
    }
}

/// The topic, payload and retain flag of an outgoing message.
pub fn encode(site: &str, o: &Outgoing) -> (String, Bytes, bool) {
    match o {
        Outgoing::Alarm(e) => {
            let topic = alarm_topic(site, &e.subject, &e.rule);
            if !e.active {
                return (topic, Bytes::new(), true);
            }
            let body = json!({
                "site": site,
                "subject": e.subject,
                "rule": e.rule,
                "state": "active",
                "priority": e.priority.as_str(),
                "metric": e.metric,
                "value": e.value,
                "condition": e.condition,
                "threshold": e.threshold,
                "seq": e.seq,
                "ts": format_ts(e.ts),
                "since": format_ts(e.since),
            });
            (topic, Bytes::from(body.to_string()), true)
        }
        Outgoing::News2(u) => {
            let mut body = serde_json::to_value(u.as_ref()).expect("a score serialises");
            body["site"] = site.into();
            body["time"] = format_ts(u.ts).into();
            (
                news2_topic(site, &u.subject),
                Bytes::from(body.to_string()),
                true,
            )
        }
        Outgoing::DeadLetter {
            topic,
            codec,
            reason,
            detail,
            payload,
            received,
        } => {
            let body = json!({
                "topic": topic,
                "codec": codec,
                "reason": reason,
                "detail": detail,
                "received": format_ts(*received),
                "payload_b64": payload.as_ref().map(|p| B64.encode(p)),
            });
            (
                dead_letter_topic(topic),
                Bytes::from(body.to_string()),
                false,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alarm::Priority;

    #[test]
    fn alarm_messages() {
        let mut e = AlarmEvent {
            rule: "spo2-low".into(),
            subject: "ward7/bed3".into(),
            active: true,
            priority: Priority::High,
            metric: "spo2",
            value: 88.0,
            condition: "below",
            threshold: 92.0,
            seq: 42,
            ts: 1_700_000_000_000_000,
            since: 1_700_000_000_000_000,
        };
        let (topic, payload, retain) = encode("w", &Outgoing::Alarm(e.clone()));
        assert_eq!(topic, "alarms/w/ward7%2Fbed3/spo2-low");
        assert!(retain);
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(v["seq"], 42);
        assert_eq!(v["priority"], "high");
        assert_eq!(v["ts"], "2023-11-14T22:13:20Z");
        e.active = false;
        let (_, payload, retain) = encode("w", &Outgoing::Alarm(e));
        assert!(payload.is_empty() && retain);
    }
}
