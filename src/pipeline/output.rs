//! The output stage: publishes what the alarm stage says (alarms, NEWS2 scores, adaptive
//! commands, each with its topic and retain flag) and dead letters (`edge/deadletter/<topic>`)
//! through whichever [`Publisher`] the transport gives it, on a thread of its own. Its queue is
//! bounded in bytes: ingest waits when it is full (back-pressure), nothing is dropped.

use std::sync::{Arc, Condvar, Mutex};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use serde_json::json;
use tracing::{debug, error};

use super::Publisher;
use crate::model::reading::format_ts;
use crate::topic::dead_letter_topic;

/// Something to publish.
#[derive(Debug)]
pub enum Outgoing {
    /// A message made elsewhere (the alarm stage).
    Message {
        topic: String,
        payload: Bytes,
        retain: bool,
    },
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
            Outgoing::Message { topic, payload, .. } => topic.len() + payload.len(),
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
    publisher: Box<dyn Publisher>,
    rx: flume::Receiver<(Outgoing, usize)>,
    room: Arc<Room>,
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
                publisher,
                rx,
                room: room.clone(),
            },
            OutputHandle { tx, room },
            move || probe_room.used() as i64,
        )
    }

    /// Publishes until every handle is dropped and the queue is drained.
    pub fn run(mut self) {
        let _close = CloseOnDrop(self.room.clone());
        for (o, n) in self.rx.iter() {
            // Fault tests: `output-message=panic` fails the stage.
            #[cfg(feature = "failpoints")]
            fail::fail_point!("output-message");
            let (topic, payload, retain) = encode(&o);
            self.room.give(n);
            if let Err(e) = self.publisher.publish(topic.clone(), payload, retain) {
                // The topic names a subject: only at debug level.
                error!(error = %e, "could not publish an alarm or dead letter");
                debug!(topic, "the message that could not be published");
            }
        }
    }
}

/// The topic, payload and retain flag of an outgoing message.
pub fn encode(o: &Outgoing) -> (String, Bytes, bool) {
    match o {
        Outgoing::Message {
            topic,
            payload,
            retain,
        } => (topic.clone(), payload.clone(), *retain),
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
