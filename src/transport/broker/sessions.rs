//! The embedded broker's live connections, by session number: where the commit stage's
//! acknowledgements go. Each connection registers a channel to its writer; [`SessionAcker`]
//! routes tokens to it, in the order commit sends them (which is the order the connection's
//! messages arrived: MQTT wants PUBACKs in that order).
//!
//! Each connection also has a [`Backlog`]: packets queued for its writer and not yet written.
//! The reader stops reading while it is large, so a client that sends but never reads cannot
//! make the broker queue acknowledgements for it without end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Notify};

use crate::pipeline::{AckToken, Acker};

/// What a connection's writer receives from commit: (packet id, QoS, reason) to acknowledge.
pub type Acks = Vec<(u16, u8, u8)>;

/// Packets queued for a connection's writer and not yet written.
#[derive(Debug, Default)]
pub struct Backlog {
    items: AtomicUsize,
    drained: Notify,
}

/// A reader waits while its writer has more than this many packets to write.
pub const MAX_BACKLOG: usize = 65_536;

impl Backlog {
    pub fn add(&self, n: usize) {
        self.items.fetch_add(n, Ordering::AcqRel);
    }

    /// The writer wrote `n` of them.
    pub fn done(&self, n: usize) {
        let before = self.items.fetch_sub(n, Ordering::AcqRel);
        if before >= MAX_BACKLOG && before - n < MAX_BACKLOG {
            self.drained.notify_waiters();
        }
    }

    /// Waits until the backlog is below [`MAX_BACKLOG`].
    pub async fn room(&self) {
        loop {
            let drained = self.drained.notified();
            if self.items.load(Ordering::Acquire) < MAX_BACKLOG {
                return;
            }
            drained.await;
        }
    }
}

struct Live {
    acks: mpsc::UnboundedSender<Acks>,
    backlog: Arc<Backlog>,
}

/// Live connections.
#[derive(Default)]
pub struct Sessions {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Live>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("live", &self.count())
            .finish()
    }
}

impl Sessions {
    /// Registers a connection; its number names it in ack tokens and is never reused.
    pub fn open(&self) -> (u64, mpsc::UnboundedReceiver<Acks>, Arc<Backlog>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(Backlog::default());
        self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            Live {
                acks: tx,
                backlog: backlog.clone(),
            },
        );
        (id, rx, backlog)
    }

    /// The connection is gone: acknowledgements for it are dropped (its client resends).
    pub fn close(&self, id: u64) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    pub fn count(&self) -> usize {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The commit stage's [`Acker`] for the embedded broker.
#[derive(Debug, Clone)]
pub struct SessionAcker(pub Arc<Sessions>);

impl Acker for SessionAcker {
    fn ack(&mut self, tokens: &[AckToken]) {
        let live = self.0.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut start = 0;
        while start < tokens.len() {
            let session = tokens[start].session();
            let end = tokens[start..]
                .iter()
                .position(|t| t.session() != session)
                .map_or(tokens.len(), |n| start + n);
            if let Some(l) = live.get(&session) {
                let acks: Acks = tokens[start..end]
                    .iter()
                    .map(|t| (t.packet_id(), t.qos(), t.reason()))
                    .collect();
                l.backlog.add(acks.len());
                // A writer that has just ended drops them: its client resends.
                let _ = l.acks.send(acks);
            }
            start = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_reach_their_session_in_order_and_closed_sessions_drop_theirs() {
        let sessions = Arc::new(Sessions::default());
        let (a, mut rx_a, backlog_a) = sessions.open();
        let (b, mut rx_b, _) = sessions.open();
        assert_ne!(a, b);
        let mut acker = SessionAcker(sessions.clone());
        acker.ack(&[
            AckToken::new(a, 1, 1),
            AckToken::new(a, 2, 1),
            AckToken::new(b, 9, 2),
            AckToken::new(a, 3, 1).refusing(0x90),
        ]);
        assert_eq!(rx_a.try_recv().unwrap(), vec![(1, 1, 0), (2, 1, 0)]);
        assert_eq!(rx_a.try_recv().unwrap(), vec![(3, 1, 0x90)]);
        assert_eq!(rx_b.try_recv().unwrap(), vec![(9, 2, 0)]);
        assert_eq!(backlog_a.items.load(Ordering::Acquire), 3);
        sessions.close(a);
        acker.ack(&[AckToken::new(a, 4, 1)]);
        assert!(rx_a.try_recv().is_err());
        let (c, _, _) = sessions.open();
        assert!(c > b, "numbers are never reused");
    }

    #[tokio::test]
    async fn a_reader_waits_while_its_writer_is_behind() {
        let backlog = Arc::new(Backlog::default());
        backlog.add(MAX_BACKLOG + 10);
        let waiting = {
            let b = backlog.clone();
            tokio::spawn(async move { b.room().await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        backlog.done(20);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("room again")
            .unwrap();
    }
}
