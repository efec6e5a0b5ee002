//! The embedded broker's live connections, by session number: where the commit stage's
//! acknowledgements go. Each connection registers a channel to its writer; [`SessionAcker`]
//! routes tokens to it, in the order commit sends them (which is the order the connection's
//! messages arrived: MQTT wants PUBACKs in that order).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::pipeline::{AckToken, Acker};

/// What a connection's writer receives from commit: (packet id, QoS) pairs to acknowledge.
pub type Acks = Vec<(u16, u8)>;

/// Live connections.
#[derive(Debug, Default)]
pub struct Sessions {
    next: AtomicU64,
    live: Mutex<HashMap<u64, mpsc::UnboundedSender<Acks>>>,
}

impl Sessions {
    /// Registers a connection; its number names it in ack tokens and is never reused.
    pub fn open(&self) -> (u64, mpsc::UnboundedReceiver<Acks>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        (id, rx)
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
            if let Some(tx) = live.get(&session) {
                let acks = tokens[start..end]
                    .iter()
                    .map(|t| (t.packet_id(), t.qos()))
                    .collect();
                // A writer that has just ended drops them: its client resends.
                let _ = tx.send(acks);
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
        let (a, mut rx_a) = sessions.open();
        let (b, mut rx_b) = sessions.open();
        assert_ne!(a, b);
        let mut acker = SessionAcker(sessions.clone());
        acker.ack(&[
            AckToken::new(a, 1, 1),
            AckToken::new(a, 2, 1),
            AckToken::new(b, 9, 2),
            AckToken::new(a, 3, 1),
        ]);
        assert_eq!(rx_a.try_recv().unwrap(), vec![(1, 1), (2, 1)]);
        assert_eq!(rx_a.try_recv().unwrap(), vec![(3, 1)]);
        assert_eq!(rx_b.try_recv().unwrap(), vec![(9, 2)]);
        sessions.close(a);
        acker.ack(&[AckToken::new(a, 4, 1)]);
        assert!(rx_a.try_recv().is_err());
        let (c, _) = sessions.open();
        assert!(c > b, "numbers are never reused");
    }
}
