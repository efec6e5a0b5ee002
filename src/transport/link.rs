//! Input from the embedded broker through its in-process link (no TCP).
//!
//! After 200 queued notifications the router sends `Unschedule` and stops delivering to the
//! link until it is told the consumer is ready again; without that call delivery stops for good.

use std::time::Instant;

use rumqttd::local::LinkError;
use rumqttd::Notification;

use crate::pipeline::{Incoming, Input, InputClosed};
use crate::transport::embedded::{Link, INGEST_FILTER};

pub struct LinkInput {
    link: Link,
}

impl LinkInput {
    /// Subscribes the link to every topic.
    pub fn new(mut link: Link) -> Result<Self, InputClosed> {
        link.tx
            .subscribe(INGEST_FILTER)
            .map_err(|e| InputClosed(e.to_string()))?;
        Ok(LinkInput { link })
    }
}

impl Input for LinkInput {
    fn recv(&mut self, deadline: Instant) -> Result<Option<Incoming>, InputClosed> {
        loop {
            match self.link.rx.recv_deadline(deadline) {
                Ok(Some(Notification::Forward(f))) => {
                    return Ok(Some(Incoming {
                        topic: f.publish.topic,
                        payload: f.publish.payload,
                        ack: None,
                    }))
                }
                Ok(Some(Notification::Unschedule)) => {
                    self.link
                        .rx
                        .ready()
                        .map_err(|e| InputClosed(e.to_string()))?;
                }
                // Acks of the subscription and the like.
                Ok(Some(_)) => {}
                Ok(None) => {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                }
                Err(LinkError::RecvTimeout(flume::RecvTimeoutError::Timeout)) => return Ok(None),
                Err(e) => return Err(InputClosed(e.to_string())),
            }
        }
    }

    fn drain_on_shutdown(&self) -> bool {
        true
    }
}
