//! The commit stage: seals each batch, stores it durably, and only then acknowledges its messages
//! to the external broker and records how long its readings took from receipt to disk.
//!
//! A store that fails (disk full, I/O error) is retried with back-off rather than skipped: the
//! queue in front fills and ingest waits, so no batch is ever dropped.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info};

use super::Acker;
use crate::model::events::{BatchFailed, BatchStored, InternalEvent};
use crate::model::metrics::Metrics;
use crate::model::reading::now_micros;
use crate::pipeline::ingest::PendingBatch;
use crate::seal::{SealError, Sealer};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("batch {id}: {source}")]
    Seal { id: u64, source: SealError },
    #[error("batch {id} could not be stored before shutdown: {source}")]
    Store { id: u64, source: StoreError },
}

pub struct Commit {
    sealer: Sealer,
    store: Arc<dyn Store>,
    next_id: u64,
    metrics: Arc<Metrics>,
    acker: Option<Box<dyn Acker>>,
}

#[derive(Debug, Default)]
pub struct CommitSummary {
    pub batches: u64,
    pub readings: u64,
}

impl Commit {
    pub fn new(
        sealer: Sealer,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        acker: Option<Box<dyn Acker>>,
    ) -> Result<Self, StoreError> {
        let next_id = store.last_header()?.map_or(0, |h| h.id + 1);
        Ok(Commit {
            sealer,
            store,
            next_id,
            metrics,
            acker,
        })
    }

    /// Commits batches until ingest drops its sender. `shutdown` only limits how long a failing
    /// store is retried once the service is stopping.
    pub fn run(
        mut self,
        rx: flume::Receiver<PendingBatch>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<CommitSummary, CommitError> {
        let mut summary = CommitSummary::default();
        for pending in rx.iter() {
            if !pending.columns.is_empty() {
                let rows = pending.columns.len();
                let received = pending.columns.received.clone();
                let id = self.next_id;
                let sealed = self
                    .sealer
                    .seal(id, pending.columns)
                    .map_err(|source| CommitError::Seal { id, source })?;
                self.store_with_retry(&sealed, &shutdown)?;
                self.next_id += 1;
                let now = now_micros();
                let latency = self.metrics.stored_latency.local();
                for r in received {
                    latency.observe((now - r).max(0) as f64 / 1e6);
                }
                latency.flush();
                BatchStored {
                    id,
                    rows,
                    bytes: sealed.envelope.ciphertext.len(),
                }
                .emit(&self.metrics);
                self.metrics
                    .store_size_bytes
                    .set(self.store.size_on_disk() as i64);
                summary.batches += 1;
                summary.readings += rows as u64;
            }
            if let Some(acker) = self.acker.as_mut() {
                for token in &pending.acks {
                    if let Err(e) = acker.ack(token) {
                        // The broker resends it next session; nothing is lost.
                        error!(error = %e, "could not acknowledge a stored message");
                    }
                }
                self.metrics.acks_sent.inc_by(pending.acks.len() as u64);
            }
        }
        info!(
            batches = summary.batches,
            readings = summary.readings,
            "commit stage stopped"
        );
        Ok(summary)
    }

    fn store_with_retry(
        &self,
        sealed: &crate::seal::SealedBatch,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<(), CommitError> {
        let mut backoff = Duration::from_millis(50);
        let mut attempts_after_shutdown = 0;
        loop {
            match self.store.put_batch(sealed) {
                Ok(()) => return Ok(()),
                Err(source) => {
                    BatchFailed {
                        id: sealed.header.id,
                        rows: sealed.header.rows as usize,
                        error: &source,
                    }
                    .emit(&self.metrics);
                    if *shutdown.borrow() {
                        attempts_after_shutdown += 1;
                        if attempts_after_shutdown >= 5 {
                            return Err(CommitError::Store {
                                id: sealed.header.id,
                                source,
                            });
                        }
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
