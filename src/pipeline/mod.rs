//! The pipeline stages (ingest → commit, output) and the seams they run through: where messages
//! come from ([`input`]), how they are acknowledged once stored ([`Acker`], [`AckToken`]), and
//! where alarms and dead letters go ([`Publisher`]). Transports implement these; stages never
//! name a transport. [`health`] is the state every stage reports into and `/healthz` reads.

pub mod alarms;
pub mod anchor;
pub mod commit;
pub mod disk;
pub mod health;
pub mod ingest;
pub mod input;
pub mod output;
pub mod routes;
pub mod ward;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;

/// Names one received message so that the transport it came from can acknowledge it once its
/// readings are stored. Only the transport that issued a token reads its fields: to the stages
/// it is an opaque, copyable value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AckToken {
    session: u64,
    packet_id: u16,
    qos: u8,
    /// 0, or the MQTT 5 reason code a refused message is acknowledged with: a refusal travels
    /// the same ordered path, so acknowledgements keep the order their messages came in.
    reason: u8,
}

impl AckToken {
    /// A token for packet `packet_id`, received at `qos` (1 or 2) in the transport's `session`.
    pub fn new(session: u64, packet_id: u16, qos: u8) -> Self {
        AckToken {
            session,
            packet_id,
            qos,
            reason: 0,
        }
    }

    /// A token that acknowledges with an MQTT 5 reason code instead of success.
    pub fn refusing(self, reason: u8) -> Self {
        AckToken { reason, ..self }
    }

    pub fn reason(&self) -> u8 {
        self.reason
    }

    pub fn session(&self) -> u64 {
        self.session
    }

    pub fn packet_id(&self) -> u16 {
        self.packet_id
    }

    pub fn qos(&self) -> u8 {
        self.qos
    }
}

/// MQTT 5 reason codes a refused message is acknowledged with.
pub const NOT_AUTHORIZED: u8 = 0x87;
pub const TOPIC_NAME_INVALID: u8 = 0x90;

/// Acknowledges messages to whoever sent them, once their readings are durably stored.
pub trait Acker: Send {
    /// Sends the acknowledgements; never blocks for long (the commit stage calls it). Tokens of
    /// a session that has ended since are dropped: the sender resends those messages.
    fn ack(&mut self, tokens: &[AckToken]);
}

/// Where the output stage publishes alarms and dead letters.
pub trait Publisher: Send {
    fn publish(&mut self, topic: String, payload: Bytes, retain: bool) -> Result<(), String>;
}

/// When a stage must give up waiting on something that may never come back (a failing store, a
/// broker that takes no alarms): unset while the service runs, set during a stop to a time
/// shortly before the stop deadline.
#[derive(Debug, Clone, Default)]
pub struct GiveUp(Arc<Mutex<Option<Instant>>>);

impl GiveUp {
    pub fn at(&self, deadline: Instant) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(deadline);
    }

    pub fn due(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|d| Instant::now() >= d)
    }
}
