//! The anchor stage: cuts a signed checkpoint of the log of batches every
//! `ledger.checkpoint_every` when the log grew (and once more at a clean stop), queues it in the
//! durable outbox, and hands the outbox to the ledger backend, backing off while the ledger
//! fails. Nothing upstream waits on it: ingest and commit go on while a ledger is unreachable,
//! and the outbox keeps every checkpoint until its ledger confirms it, across restarts.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::ledger::outbox::{Outbox, Pending};
use crate::ledger::{self, Anchor, AnchorStatus, Ledger, LedgerError};
use crate::model::events::{AnchorDone, AnchorFailed, CheckpointCut, InternalEvent};
use crate::model::metrics::Metrics;
use crate::seal::checkpoint::{Checkpoint, NoteSigner};
use crate::store::Store;

/// Submissions handed to the ledger and not yet final, at most: a chain that takes longer to
/// confirm one than the checkpoint period does not fall behind.
const WINDOW: usize = 16;
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The anchor stage, built; [`Anchoring::run`] runs it.
pub struct Anchoring {
    store: Arc<dyn Store>,
    signer: Arc<NoteSigner>,
    outbox: Outbox,
    ledger: Arc<dyn Ledger>,
    metrics: Arc<Metrics>,
    every: Duration,
    /// How often submissions are looked at while some wait for their ledger.
    poll: Duration,
}

/// What the stage did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AnchorSummary {
    pub checkpoints: u64,
    pub anchored: u64,
    /// Checkpoints left in the outbox at the end, anchored after the next start.
    pub pending: u64,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LedgerError> + Send + 'static,
) -> Result<T, LedgerError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

impl Anchoring {
    pub fn new(
        store: Arc<dyn Store>,
        signer: Arc<NoteSigner>,
        outbox: Outbox,
        ledger: Arc<dyn Ledger>,
        metrics: Arc<Metrics>,
        every: Duration,
        poll: Duration,
    ) -> Self {
        Anchoring {
            store,
            signer,
            outbox,
            ledger,
            metrics,
            every,
            poll,
        }
    }

    /// Runs until `stop` turns true, then cuts the last checkpoint and hands what the outbox
    /// holds to the ledger once. The caller bounds that last round with its stop deadline.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> AnchorSummary {
        let mut summary = AnchorSummary::default();
        // A checkpoint stored by a run that crashed before queueing it.
        if let Err(e) = self.requeue().await {
            self.failed(0, &e);
        }
        let mut next_cut = Instant::now() + self.every;
        let mut next_round = Instant::now();
        let mut backoff = BACKOFF_MIN;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep_until(next_cut.min(next_round)) => {}
            }
            let now = Instant::now();
            if now >= next_cut {
                next_cut = now + self.every;
                match self.cut().await {
                    Ok(cut) => {
                        if cut {
                            summary.checkpoints += 1;
                            next_round = now;
                        }
                    }
                    Err(e) => self.failed(0, &e),
                }
            }
            if now >= next_round {
                // A stop does not wait for a slow ledger: what the round did not finish, the
                // outbox keeps.
                let round = tokio::select! {
                    r = self.round(&mut summary) => r,
                    _ = stop.wait_for(|s| *s) => break,
                };
                match round {
                    Ok(waiting) => {
                        backoff = BACKOFF_MIN;
                        next_round = now + if waiting { self.poll } else { self.every };
                    }
                    Err(()) => {
                        next_round = now + backoff;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
            self.gauges().await;
        }
        match self.cut().await {
            Ok(cut) => summary.checkpoints += u64::from(cut),
            Err(e) => self.failed(0, &e),
        }
        let _ = self.round(&mut summary).await;
        self.gauges().await;
        summary.pending = self.metrics.outbox_depth.get().max(0) as u64;
        summary
    }

    fn failed(&self, size: u64, e: &LedgerError) {
        AnchorFailed {
            backend: self.ledger.name(),
            size,
            error: e,
        }
        .emit(&self.metrics);
    }

    async fn gauges(&self) {
        let outbox = self.outbox.clone();
        if let Ok((depth, age)) = blocking(move || outbox.depth()).await {
            self.metrics.outbox_depth.set(depth as i64);
            self.metrics.outbox_oldest_seconds.set(age as i64);
        }
    }

    /// Queues the stored checkpoints newer than any the outbox has seen.
    async fn requeue(&self) -> Result<(), LedgerError> {
        let (store, outbox) = (self.store.clone(), self.outbox.clone());
        blocking(move || {
            let mut from = outbox.newest()?.map_or(0, |n| n + 1);
            while let Some((size, note)) = store.checkpoint_from(from)? {
                outbox.enqueue(size, &note)?;
                from = size + 1;
            }
            Ok(())
        })
        .await
    }

    /// Cuts, stores and queues a checkpoint if the log grew since the last one.
    async fn cut(&self) -> Result<bool, LedgerError> {
        let (store, signer, outbox) =
            (self.store.clone(), self.signer.clone(), self.outbox.clone());
        let cut = blocking(move || {
            let latest = store.latest_checkpoint()?;
            // Stored by a cut whose queueing failed: queued now (a no-op when it was).
            if let Some((size, note)) = &latest {
                outbox.enqueue(*size, note)?;
            }
            let last = latest.map_or(0, |(size, _)| size);
            if store.log_size()? <= last {
                return Ok(None);
            }
            let (c, note) = ledger::checkpoint(store.as_ref(), &signer)?;
            store.put_checkpoint(c.size, &note)?;
            outbox.enqueue(c.size, &note)?;
            Ok(Some(c.size))
        })
        .await?;
        if let Some(size) = cut {
            CheckpointCut { size }.emit(&self.metrics);
        }
        Ok(cut.is_some())
    }

    /// Hands the oldest pending anchors to the ledger. `Ok(true)` while some wait for their
    /// ledger; `Err` after a failure (already counted and logged): back off.
    async fn round(&self, summary: &mut AnchorSummary) -> Result<bool, ()> {
        let outbox = self.outbox.clone();
        let pending = blocking(move || outbox.pending(WINDOW))
            .await
            .map_err(|e| self.failed(0, &e))?;
        let waiting = pending.iter().any(|p| p.refused.is_none());
        let mut failed = false;
        for p in pending.into_iter().filter(|p| p.refused.is_none()) {
            match self.advance(p, summary).await {
                Ok(()) => {}
                // The ledger is down: the next entries would fail alike.
                Err((size, e @ LedgerError::Unavailable { .. })) => {
                    self.failed(size, &e);
                    return Err(());
                }
                // One entry refused: the later ones are not held up behind it.
                Err((size, e)) => {
                    self.failed(size, &e);
                    failed = true;
                }
            }
        }
        if failed {
            return Err(());
        }
        Ok(waiting)
    }

    async fn advance(
        &self,
        mut p: Pending,
        summary: &mut AnchorSummary,
    ) -> Result<(), (u64, LedgerError)> {
        let size = p.size;
        let checkpoint = Checkpoint::parse(&p.note).map_err(|e| (size, e.into()))?;
        let anchor = Anchor {
            checkpoint,
            note: p.note.clone(),
        };
        let result = match &p.submission {
            None => self.ledger.submit(&anchor).await.map(|s| {
                p.submission = Some(s);
                p.attempts += 1;
                None
            }),
            Some(s) => match self.ledger.status(&anchor, s).await {
                Ok(AnchorStatus::Confirmed(receipt)) => Ok(Some(receipt)),
                Ok(AnchorStatus::Pending { .. }) => return Ok(()),
                Ok(AnchorStatus::Dropped) => {
                    // Submitted again at the next round.
                    p.submission = None;
                    Ok(None)
                }
                // A transaction the chain mined and refused (reverted, or no event): sending it
                // again would fail alike and pay again. Set aside, named in the outbox and
                // counted; later checkpoints, consistent with it, go on being anchored.
                Err(e @ LedgerError::Refused { .. }) => {
                    p.refused = Some(e.to_string());
                    Err(e)
                }
                Err(e) => Err(e),
            },
        };
        let outbox = self.outbox.clone();
        match result {
            Ok(Some(receipt)) => {
                blocking(move || outbox.complete(size, &receipt))
                    .await
                    .map_err(|e| (size, e))?;
                summary.anchored += 1;
                AnchorDone {
                    backend: self.ledger.name(),
                    size,
                }
                .emit(&self.metrics);
                Ok(())
            }
            Ok(None) => {
                p.last_error = None;
                blocking(move || outbox.update(&p))
                    .await
                    .map_err(|e| (size, e))
            }
            Err(e) => {
                p.attempts += 1;
                p.last_error = Some(e.to_string());
                let _ = blocking(move || outbox.update(&p)).await;
                Err((size, e))
            }
        }
    }
}
