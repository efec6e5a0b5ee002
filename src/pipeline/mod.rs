//! The pipeline stages (ingest → commit, output) and the seams they run through: where messages
//! come from ([`Input`]), how they are acknowledged once stored ([`Acker`]), and where alarms and
//! dead letters go ([`Publisher`]). Transports implement these traits; stages never name a
//! transport.

use std::time::Instant;

use bytes::Bytes;

pub mod commit;
pub mod ingest;
pub mod output;
pub mod routes;

/// How a message is acknowledged to the broker it came from, once its readings are stored.
pub type AckToken = rumqttc::Publish;

/// One message from the broker.
#[derive(Debug)]
pub struct Incoming {
    pub topic: Bytes,
    pub payload: Bytes,
    pub ack: Option<AckToken>,
}

#[derive(Debug, thiserror::Error)]
#[error("the input closed: {0}")]
pub struct InputClosed(pub String);

/// Where messages come from.
pub trait Input: Send {
    /// The next message, waiting until `deadline`; `Ok(None)` when none came in time.
    fn recv(&mut self, deadline: Instant) -> Result<Option<Incoming>, InputClosed>;
    /// Whether messages already acknowledged to publishers may still be queued inside the
    /// input, so that shutdown must drain it (the embedded broker acknowledges on receipt).
    fn drain_on_shutdown(&self) -> bool;
}

/// Where the output stage publishes.
pub trait Publisher: Send {
    fn publish(&mut self, topic: String, payload: Bytes, retain: bool) -> Result<(), String>;
}

/// Acknowledges messages to the broker they came from.
pub trait Acker: Send {
    fn ack(&mut self, token: &crate::pipeline::AckToken) -> Result<(), String>;
}
