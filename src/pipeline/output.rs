//! The output stage: publishes alarms (`alarms/<site>/<subject>/<rule>`, QoS 1, retained while
//! active, cleared by an empty retained message) and dead letters (`edge/deadletter/<topic>`)
//! through the embedded broker's link or the external broker's client, on a thread of its own.

use std::thread::{self, JoinHandle};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use serde_json::json;
use tracing::error;

use super::Publisher;
use crate::alarm::AlarmEvent;
use crate::model::reading::format_ts;

/// Something to publish.
#[derive(Debug)]
pub enum Outgoing {
    Alarm(AlarmEvent),
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

/// A cheap handle for queueing messages to publish. Sending blocks while the queue is full
/// (back-pressure); nothing is dropped.
#[derive(Debug, Clone)]
pub struct OutputHandle {
    tx: flume::Sender<Outgoing>,
}

impl OutputHandle {
    pub fn send(&self, o: Outgoing) {
        if self.tx.send(o).is_err() {
            error!("output stage has stopped; a message could not be published");
        }
    }
}

pub const QUEUE: usize = 4096;

pub fn alarm_topic(site: &str, subject: &str, rule: &str) -> String {
    // A subject is a topic level: characters MQTT gives a meaning are replaced.
    let subject: String = subject
        .chars()
        .map(|c| if matches!(c, '/' | '+' | '#') { '_' } else { c })
        .collect();
    format!("alarms/{site}/{subject}/{rule}")
}

pub fn dead_letter_topic(topic: &str) -> String {
    format!("edge/deadletter/{topic}")
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

/// Starts the output thread; it ends once every handle is dropped and the queue is empty.
pub fn spawn(
    site: String,
    mut publisher: Box<dyn Publisher>,
) -> std::io::Result<(OutputHandle, flume::Receiver<Outgoing>, JoinHandle<()>)> {
    let (tx, rx) = flume::bounded::<Outgoing>(QUEUE);
    let probe = rx.clone();
    let join = thread::Builder::new()
        .name("output".into())
        .spawn(move || {
            for o in rx.iter() {
                let (topic, payload, retain) = encode(&site, &o);
                if let Err(e) = publisher.publish(topic.clone(), payload, retain) {
                    error!(topic = %topic, error = %e, "could not publish");
                }
            }
        })?;
    Ok((OutputHandle { tx }, probe, join))
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
        assert_eq!(topic, "alarms/w/ward7_bed3/spo2-low");
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
