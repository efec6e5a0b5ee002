//! The queue from a transport to ingest, bounded in bytes: a transport waits for room before it
//! hands over a message (so a slow store slows the transport's reading, which slows the
//! publishers through TCP, instead of growing memory), and the room comes back when ingest drops
//! the message.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::AckToken;

/// What one queued message costs beyond its topic and payload (the struct, the channel slot).
const OVERHEAD: usize = 96;

/// Who published a message, as the transport authenticated them (a password or a client
/// certificate). The broker has held it to its own topics already (the route's `identity`);
/// ingest holds the names a payload gives to the topic's, unless the route trusts the payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: Box<str>,
    /// May acknowledge alarms, set subjects' settings and subscribe anywhere
    /// (`broker.auth.operators`).
    pub operator: bool,
}

/// One message as a transport received it.
#[derive(Debug)]
pub struct Received {
    pub topic: Bytes,
    pub payload: Bytes,
    /// The payload's size as sent. Larger than `payload` when the transport threw away a
    /// payload too large to take (it is then empty): ingest dead-letters it as oversized.
    pub payload_size: usize,
    /// `None` for QoS 0: nothing to acknowledge.
    pub ack: Option<AckToken>,
    /// The transport refused the message (its token says why): ingest only carries the
    /// acknowledgement, in order with the others.
    pub refused: bool,
    /// The authenticated publisher; `None` for an anonymous one (allowed by the pipeline file)
    /// or a message from an external broker (whose own ACL holds its clients to their topics).
    pub sender: Option<Arc<Identity>>,
}

impl Received {
    /// A message whose whole payload arrived.
    pub fn new(topic: Bytes, payload: Bytes, ack: Option<AckToken>) -> Self {
        Received {
            payload_size: payload.len(),
            topic,
            payload,
            ack,
            refused: false,
            sender: None,
        }
    }

    /// A refused message: nothing but its acknowledgement (carrying the reason) goes on.
    pub fn refused(ack: AckToken) -> Self {
        Received {
            topic: Bytes::new(),
            payload: Bytes::new(),
            payload_size: 0,
            ack: Some(ack),
            refused: true,
            sender: None,
        }
    }
}

/// One message in ingest's hands.
#[derive(Debug)]
pub struct Incoming {
    pub topic: Bytes,
    pub payload: Bytes,
    pub payload_size: usize,
    pub ack: Option<AckToken>,
    pub refused: bool,
    pub sender: Option<Arc<Identity>>,
    /// This message's share of the queue's bytes, given back when the message is dropped.
    _room: OwnedSemaphorePermit,
}

/// The input queue closed: every transport sender is gone.
#[derive(Debug, thiserror::Error)]
#[error("the input closed")]
pub struct InputClosed;

/// A transport's end of the queue. Cheap to clone: one per connection.
#[derive(Debug, Clone)]
pub struct InputSender {
    tx: flume::Sender<Incoming>,
    room: Arc<Semaphore>,
    capacity: u32,
}

/// Ingest's end of the queue.
#[derive(Debug)]
pub struct InputQueue {
    rx: flume::Receiver<Incoming>,
    room: Arc<Semaphore>,
    capacity: u32,
}

/// A queue that holds at most `max_bytes` of messages (a single larger message still passes,
/// alone).
pub fn queue(max_bytes: usize) -> (InputSender, InputQueue) {
    let capacity = max_bytes.clamp(OVERHEAD, u32::MAX as usize) as u32;
    let room = Arc::new(Semaphore::new(capacity as usize));
    let (tx, rx) = flume::unbounded();
    (
        InputSender {
            tx,
            room: room.clone(),
            capacity,
        },
        InputQueue { rx, room, capacity },
    )
}

fn cost(topic: &Bytes, payload: &Bytes, capacity: u32) -> u32 {
    (topic.len() + payload.len() + OVERHEAD).min(capacity as usize) as u32
}

impl InputSender {
    /// Queues a message once there is room for it; `Err` once ingest has stopped.
    pub async fn send(&self, m: Received) -> Result<(), InputClosed> {
        let n = cost(&m.topic, &m.payload, self.capacity);
        let room = self
            .room
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| InputClosed)?;
        self.tx
            .send(Incoming {
                topic: m.topic,
                payload: m.payload,
                payload_size: m.payload_size,
                ack: m.ack,
                refused: m.refused,
                sender: m.sender,
                _room: room,
            })
            .map_err(|_| InputClosed)
    }
}

impl InputQueue {
    /// The next message, waiting until `deadline`; `Ok(None)` when none came in time, `Err`
    /// once every sender is gone and the queue is empty.
    pub fn recv_deadline(&self, deadline: Instant) -> Result<Option<Incoming>, InputClosed> {
        match self.rx.recv_deadline(deadline) {
            Ok(m) => Ok(Some(m)),
            Err(flume::RecvTimeoutError::Timeout) => Ok(None),
            Err(flume::RecvTimeoutError::Disconnected) => Err(InputClosed),
        }
    }

    /// A message if one is queued now.
    pub fn try_recv(&self) -> Result<Option<Incoming>, InputClosed> {
        match self.rx.try_recv() {
            Ok(m) => Ok(Some(m)),
            Err(flume::TryRecvError::Empty) => Ok(None),
            Err(flume::TryRecvError::Disconnected) => Err(InputClosed),
        }
    }

    /// Bytes queued now (for the queue-depth metric).
    pub fn queued_bytes(&self) -> usize {
        (self.capacity as usize).saturating_sub(self.room.available_permits())
    }

    /// A probe of the queued bytes, for metrics.
    pub fn probe(&self) -> impl Fn() -> i64 + Send + Sync + 'static {
        let room = self.room.clone();
        let capacity = self.capacity as usize;
        move || capacity.saturating_sub(room.available_permits()) as i64
    }

    /// Stops the senders: any waiting for room or sending later gets `InputClosed`. What is
    /// already queued can still be received.
    pub fn close(&self) {
        self.room.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn b(n: usize) -> Bytes {
        Bytes::from(vec![0u8; n])
    }

    fn m(topic: usize, payload: usize) -> Received {
        Received::new(b(topic), b(payload), None)
    }

    #[tokio::test]
    async fn senders_wait_for_room_and_get_it_back_when_ingest_drops_messages() {
        let (tx, rx) = queue(1000);
        tx.send(m(10, 500)).await.unwrap();
        assert_eq!(rx.queued_bytes(), 10 + 500 + OVERHEAD);
        // The second message waits until the first is dropped.
        let tx2 = tx.clone();
        let second = tokio::spawn(async move { tx2.send(m(10, 500)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "waits for room");
        let first = rx.try_recv().unwrap().unwrap();
        assert_eq!(first.payload.len(), 500);
        drop(first);
        second.await.unwrap().unwrap();
        assert!(rx.try_recv().unwrap().is_some());
    }

    #[tokio::test]
    async fn a_message_larger_than_the_queue_still_passes_alone() {
        let (tx, rx) = queue(200);
        tx.send(m(1, 10_000)).await.unwrap();
        assert_eq!(rx.try_recv().unwrap().unwrap().payload.len(), 10_000);
    }

    #[tokio::test]
    async fn closing_refuses_senders_but_keeps_what_is_queued() {
        let (tx, rx) = queue(1000);
        tx.send(m(1, 1)).await.unwrap();
        rx.close();
        assert!(tx.send(m(1, 1)).await.is_err());
        assert!(rx.try_recv().unwrap().is_some());
        drop(tx);
        assert!(rx.try_recv().is_err(), "closed and empty");
    }
}
