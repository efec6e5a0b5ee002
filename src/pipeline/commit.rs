//! The commit stage: seals batches, stores them durably, and only then acknowledges their
//! messages to whoever sent them, and records how long their readings took from receipt to disk.
//!
//! Batches that queue up while the store is writing are committed together: one store
//! transaction and one flush for the group (group commit), so a burst of small batches costs one
//! disk sync, not one each.
//!
//! A store that fails (disk full, I/O error) is retried with back-off, never skipped: the health
//! problem it raises pauses intake, the queue in front fills, ingest waits, and no message is
//! acknowledged that is not stored. Once the service is stopping, retries end at the stop
//! deadline: the batches left unstored were never acknowledged, so their senders still hold
//! them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::health::{Health, Problem};
use super::ingest::PendingBatch;
use super::{Acker, GiveUp};
use crate::model::events::{BatchFailed, BatchStored, InternalEvent};
use crate::model::metrics::Metrics;
use crate::model::reading::now_micros;
use crate::seal::{SealError, SealedBatch, Sealer};
use crate::store::{Store, StoreError};

/// At most this many batches go into one group commit …
const MAX_GROUP_BATCHES: usize = 64;
/// … and at most about this many bytes of readings.
const MAX_GROUP_BYTES: usize = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("sealing batch {id}: {source}")]
    Seal { id: u64, source: SealError },
    #[error("{batches} batches ({readings} readings) could not be stored before the stop deadline; their messages were not acknowledged: {source}")]
    Store {
        batches: usize,
        readings: usize,
        source: StoreError,
    },
}

/// The store write in progress, if any, and when it began: a write that never returns (a disk
/// that hangs rather than fails) must show as a problem, not as silence.
#[derive(Debug, Default)]
pub struct WriteWatch(Mutex<Option<Instant>>);

impl WriteWatch {
    fn begin(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    fn end(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// How long the write in progress has been waiting.
    pub fn waiting(&self) -> Option<std::time::Duration> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed())
    }
}

/// The commit stage, built and ready to run.
pub struct Commit {
    sealer: Arc<Sealer>,
    store: Arc<dyn Store>,
    next_id: u64,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    acker: Box<dyn Acker>,
    give_up: GiveUp,
    writes: Arc<WriteWatch>,
}

#[derive(Debug, Default)]
pub struct CommitSummary {
    pub batches: u64,
    pub readings: u64,
}

impl Commit {
    pub fn new(
        sealer: Arc<Sealer>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        acker: Box<dyn Acker>,
        give_up: GiveUp,
        writes: Arc<WriteWatch>,
    ) -> Result<Self, StoreError> {
        let next_id = store.last_header()?.map_or(0, |h| h.id + 1);
        Ok(Commit {
            sealer,
            store,
            next_id,
            metrics,
            health,
            acker,
            give_up,
            writes,
        })
    }

    /// Commits batches until ingest drops its sender and the queue is empty.
    pub fn run(mut self, rx: flume::Receiver<PendingBatch>) -> Result<CommitSummary, CommitError> {
        let mut summary = CommitSummary::default();
        while let Ok(first) = rx.recv() {
            // Fault tests: `commit-group=3*off->panic` fails the stage, `sleep(N)` slows it.
            #[cfg(feature = "failpoints")]
            fail::fail_point!("commit-group");
            let mut bytes = first.columns.approx_bytes();
            let mut group = vec![first];
            while group.len() < MAX_GROUP_BATCHES && bytes < MAX_GROUP_BYTES {
                match rx.try_recv() {
                    Ok(p) => {
                        bytes += p.columns.approx_bytes();
                        group.push(p);
                    }
                    Err(_) => break,
                }
            }
            let mut sealed = Vec::with_capacity(group.len());
            let mut received = Vec::new();
            let mut acks = Vec::new();
            for pending in group {
                acks.extend_from_slice(&pending.acks);
                if pending.columns.is_empty() {
                    continue;
                }
                received.extend_from_slice(&pending.columns.received);
                let id = self.next_id + sealed.len() as u64;
                sealed.push(
                    self.sealer
                        .seal(id, pending.columns)
                        .map_err(|source| CommitError::Seal { id, source })?,
                );
            }
            if !sealed.is_empty() {
                self.store_with_retry(&sealed)?;
                self.next_id += sealed.len() as u64;
                self.stored(&sealed, &received, &mut summary);
            }
            if !acks.is_empty() {
                self.acker.ack(&acks);
                self.metrics.acks_sent.inc_by(acks.len() as u64);
            }
            if !sealed.is_empty() {
                // After the acknowledgements: it lists directories.
                self.metrics
                    .store_size_bytes
                    .set(self.store.size_on_disk() as i64);
            }
        }
        Ok(summary)
    }

    fn stored(&self, sealed: &[SealedBatch], received: &[i64], summary: &mut CommitSummary) {
        let now = now_micros();
        let latency = self.metrics.stored_latency.local();
        for r in received {
            latency.observe((now - r).max(0) as f64 / 1e6);
        }
        latency.flush();
        for b in sealed {
            BatchStored {
                id: b.header.id,
                rows: b.header.rows as usize,
                bytes: b.envelope.ciphertext.len(),
            }
            .emit(&self.metrics);
            summary.batches += 1;
            summary.readings += u64::from(b.header.rows);
        }
    }

    fn put(&self, sealed: &[SealedBatch]) -> Result<(), StoreError> {
        // Fault tests: `store-put=return` makes every write fail, as a broken disk would.
        #[cfg(feature = "failpoints")]
        fail::fail_point!("store-put", |_| Err(StoreError::Corrupt {
            key: "store-put".into(),
            reason: "injected write failure".into(),
        }));
        self.writes.begin();
        let r = self.store.put_batches(sealed);
        self.writes.end();
        r
    }

    fn store_with_retry(&self, sealed: &[SealedBatch]) -> Result<(), CommitError> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.put(sealed) {
                Ok(()) => {
                    self.health.clear(Problem::Store);
                    return Ok(());
                }
                Err(source) => {
                    let rows = sealed.iter().map(|b| b.header.rows as usize).sum();
                    BatchFailed {
                        id: sealed[0].header.id,
                        rows,
                        error: &source,
                    }
                    .emit(&self.metrics);
                    self.health.problem(Problem::Store, &source.to_string());
                    if self.give_up.due() {
                        return Err(CommitError::Store {
                            batches: sealed.len(),
                            readings: rows,
                            source,
                        });
                    }
                    // Sleep in short steps so that a stop deadline is noticed promptly.
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && !self.give_up.due() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}
