//! The node's health: which phase the service is in (starting, running, stopping, failed) and
//! which problems hold right now (the store failing, the disk nearly full, the external broker
//! unreachable). Stages report into it; `/healthz` reads it; transports watch [`Health::intake`]
//! to stop taking messages in while they could not be stored.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::model::metrics::Metrics;

/// Where the service is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "phase", content = "reason")]
pub enum Phase {
    Starting,
    Running,
    /// A clean stop: no new messages, draining what was taken in.
    Stopping,
    /// A stage failed: the service stops and exits non-zero with this reason.
    Failed(String),
}

/// A condition that makes the node unhealthy while it lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Problem {
    /// Batches cannot be written: intake pauses until a write succeeds.
    Store,
    /// The data directory's filesystem is nearly full: intake pauses until space returns.
    Disk,
    /// The external broker is not connected, or refused a subscription.
    Broker,
    /// Alarms and dead letters cannot be published (external mode's publishing connection is
    /// down): output waits, and ingest behind it, so the broker keeps the readings meanwhile.
    Publishing,
}

impl Problem {
    /// Whether this problem stops intake: taking in messages that cannot be stored would only
    /// grow memory and keep devices from resending.
    fn stops_intake(self) -> bool {
        matches!(self, Problem::Store | Problem::Disk)
    }
}

#[derive(Debug)]
struct State {
    phase: Phase,
    problems: BTreeMap<Problem, String>,
}

/// Shared by every stage; cheap to read.
#[derive(Debug)]
pub struct Health {
    state: Mutex<State>,
    intake: watch::Sender<bool>,
    metrics: Arc<Metrics>,
}

/// What `/healthz` says.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub status: &'static str,
    #[serde(flatten)]
    pub phase: Phase,
    /// Whether messages are being taken in.
    pub intake: bool,
    pub problems: BTreeMap<Problem, String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.status == "ok"
    }
}

impl Health {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        let (intake, _) = watch::channel(false);
        Arc::new(Health {
            state: Mutex::new(State {
                phase: Phase::Starting,
                problems: BTreeMap::new(),
            }),
            intake,
            metrics,
        })
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
        let open = s.phase == Phase::Running && !s.problems.keys().any(|p| p.stops_intake());
        let healthy = s.phase == Phase::Running && s.problems.is_empty();
        self.metrics.healthy.set(i64::from(healthy));
        self.metrics.intake_open.set(i64::from(open));
        self.intake
            .send_if_modified(|v| std::mem::replace(v, open) != open);
    }

    /// Every stage is up: take messages in.
    pub fn running(&self) {
        self.update(|s| {
            if s.phase == Phase::Starting {
                s.phase = Phase::Running;
            }
        });
    }

    /// A clean stop has begun.
    pub fn stopping(&self) {
        self.update(|s| {
            if s.phase == Phase::Running || s.phase == Phase::Starting {
                s.phase = Phase::Stopping;
            }
        });
    }

    /// A stage failed; the first reason is the one the service exits with.
    pub fn fail(&self, reason: &str) {
        self.update(|s| {
            if !matches!(s.phase, Phase::Failed(_)) {
                error!(reason, "a stage failed: stopping");
                s.phase = Phase::Failed(reason.to_owned());
            }
        });
    }

    /// The reason of a failure, if the service failed.
    pub fn failure(&self) -> Option<String> {
        match &self.state.lock().unwrap_or_else(|e| e.into_inner()).phase {
            Phase::Failed(r) => Some(r.clone()),
            _ => None,
        }
    }

    /// `problem` holds, for `reason` (logged when it first appears or changes).
    pub fn problem(&self, problem: Problem, reason: &str) {
        self.update(|s| {
            if s.problems.get(&problem).map(String::as_str) != Some(reason) {
                if problem.stops_intake() {
                    error!(
                        ?problem,
                        reason, "unhealthy: intake paused until this clears"
                    );
                } else {
                    warn!(?problem, reason, "unhealthy");
                }
                s.problems.insert(problem, reason.to_owned());
            }
        });
    }

    /// `problem` no longer holds.
    pub fn clear(&self, problem: Problem) {
        self.update(|s| {
            if s.problems.remove(&problem).is_some() {
                info!(?problem, "recovered");
            }
        });
    }

    /// Whether `problem` holds now.
    pub fn has(&self, problem: Problem) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .problems
            .contains_key(&problem)
    }

    /// Turns true while messages may be taken in, false while they could not be stored (or the
    /// service is not running).
    pub fn intake(&self) -> watch::Receiver<bool> {
        self.intake.subscribe()
    }

    pub fn report(&self) -> Report {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let ok = s.phase == Phase::Running && s.problems.is_empty();
        Report {
            status: if ok { "ok" } else { "unavailable" },
            phase: s.phase.clone(),
            intake: *self.intake.borrow(),
            problems: s.problems.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intake_opens_when_running_and_closes_on_store_and_disk_problems() {
        let h = Health::new(Metrics::new());
        let intake = h.intake();
        assert!(!*intake.borrow());
        assert!(!h.report().ok());
        h.running();
        assert!(*intake.borrow());
        assert!(h.report().ok());
        h.problem(Problem::Broker, "connection refused");
        assert!(*intake.borrow(), "a broker problem does not stop intake");
        assert!(!h.report().ok());
        h.clear(Problem::Broker);
        h.problem(Problem::Disk, "12 MiB free");
        assert!(!*intake.borrow());
        h.problem(Problem::Store, "No space left on device");
        h.clear(Problem::Disk);
        assert!(!*intake.borrow(), "still the store");
        h.clear(Problem::Store);
        assert!(*intake.borrow());
        h.stopping();
        assert!(!*intake.borrow());
        assert_eq!(h.report().status, "unavailable");
    }

    #[test]
    fn the_first_failure_is_kept() {
        let h = Health::new(Metrics::new());
        h.running();
        h.fail("commit: seal error");
        h.fail("ingest: input closed");
        assert_eq!(h.failure().as_deref(), Some("commit: seal error"));
        let json = serde_json::to_value(h.report()).unwrap();
        assert_eq!(json["phase"], "failed");
        assert_eq!(json["reason"], "commit: seal error");
        assert_eq!(json["status"], "unavailable");
    }
}
