//! The alarm stage: owns every alarm's lifecycle (active → acknowledged or silenced → cleared,
//! latching, escalation), persists it, and publishes every transition. Ingest hands it the
//! conditions its rules judge in device time; acknowledgements come from MQTT
//! (`alarms/<site>/<subject>/<rule>/ack`) and from HTTP through an [`AlarmControl`].

use std::time::Duration;

use serde_json::Value;

/// An acknowledgement (or, with `silence`, a silencing: an acknowledgement with a deadline).
#[derive(Debug, Clone, PartialEq)]
pub struct AckRequest {
    pub subject: String,
    pub rule: String,
    /// Who acknowledged: a name or badge id, recorded in the alarm's history.
    pub by: String,
    pub silence: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AckError {
    #[error("no alarm `{rule}` for that subject")]
    NotFound { rule: String },
    #[error("that alarm is cleared")]
    Cleared,
    #[error("{0}")]
    Invalid(String),
    #[error("the alarm stage is not running")]
    Stopped,
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
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx
            .send_async(AlarmCommand::Ack { request, reply })
            .await
            .map_err(|_| AckError::Stopped)?;
        answer.await.map_err(|_| AckError::Stopped)?
    }
}
