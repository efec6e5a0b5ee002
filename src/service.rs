//! The running node: builds every stage from the pipeline file, wires them with bounded queues,
//! supervises them, and stops them in order.
//!
//! Every stage is owned and joined. A stop, whether asked for (SIGTERM, SIGINT) or caused by a
//! stage that ended, goes the same way: intake stops (health 503), the transport stops reading,
//! ingest drains what was taken in and hands over its last batch, commit stores what is queued
//! (retrying a failing store until shortly before the stop deadline), the transport sends the
//! last acknowledgements and closes, output publishes what is queued. All of it within
//! `stop_timeout`; whatever is left then was never acknowledged, and the stop reports it. A
//! stop caused by a failure returns the failure, so the process exits non-zero with the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::alarm::silence::SilenceWatch;
use crate::alarm::AlarmEngine;
use crate::config::PipelineConfig;
use crate::ledger::db::LedgerDb;
use crate::ledger::local::LocalChain;
use crate::ledger::outbox::Outbox;
use crate::ledger::{Backend, Ledger, LedgerError};
use crate::model::metrics::Metrics;
use crate::pipeline::alarms::{AlarmCommand, AlarmControl, AlarmInput, AlarmStage, Kept};
use crate::pipeline::anchor::{AnchorSummary, Anchoring};
use crate::pipeline::commit::{Commit, CommitError, CommitSummary, WriteWatch};
use crate::pipeline::health::Health;
use crate::pipeline::ingest::{Ingest, IngestError, IngestSummary, PendingBatch};
use crate::pipeline::input;
use crate::pipeline::output::Output;
use crate::pipeline::routes::{Route, RouteTable};
use crate::pipeline::ward::WardHub;
use crate::store::alarm_db::{AlarmDb, AlarmDbError};

/// Inputs queued for the alarm stage: conditions are rare, scores a few a second per bed.
const ALARM_QUEUE: usize = 4096;
use crate::pipeline::{disk, Acker, GiveUp, Publisher};
use crate::seal::keys::KeyError;
use crate::seal::Sealer;
use crate::store::{open_node_keys, DataDirLock, KeyMode, SledStore, Store, StoreError};
use crate::transport::broker::{BrokerError, EmbeddedBroker};
use crate::transport::external::ExternalBroker;
use crate::transport::http;
use crate::transport::read_access::ReadAccess;
use crate::transport::tls;
use crate::transport::write_access::WriteAccess;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("keys: {0}")]
    Keys(#[from] KeyError),
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("ledger: {0}")]
    Ethereum(#[from] crate::ledger::ethereum::EthereumError),
    #[error("external broker: {0}")]
    External(String),
    #[error("pipeline: {0}")]
    Pipeline(String),
    #[error("http listener {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("starting a stage: {0}")]
    Spawn(std::io::Error),
    #[error("{0}")]
    AlarmDb(#[from] crate::store::alarm_db::AlarmDbError),
    /// The service stopped because of a failure, or could not stop cleanly.
    #[error("{}", .0.join("; "))]
    Stopped(Vec<String>),
}

/// Where the running service can be reached, ports resolved. Written to
/// `<data>/endpoints.json` once the service is ready.
#[derive(Debug, Clone, Serialize)]
pub struct Endpoints {
    pub mqtt: Option<SocketAddr>,
    pub mqtt_v5: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub external: Option<String>,
    pub http: SocketAddr,
}

pub const ENDPOINTS_FILE: &str = "endpoints.json";

/// The broker side of the node.
enum Transport {
    Embedded(EmbeddedBroker),
    External(ExternalBroker),
}

impl Transport {
    async fn stop_accepting(&mut self) {
        match self {
            Transport::Embedded(b) => b.stop_accepting().await,
            Transport::External(b) => b.stop_accepting().await,
        }
    }

    /// Sends the last acknowledgements and closes; false if it ran out of time.
    async fn finish(self, deadline: Instant) -> bool {
        match self {
            Transport::Embedded(b) => b.finish(deadline).await == 0,
            Transport::External(b) => b.finish(deadline).await,
        }
    }
}

/// A stage that ended, and how.
type Ended = (&'static str, String);

/// A stage thread: joined at stop; reports its end to the supervisor as soon as it happens
/// (a panic included), so that a stage that dies early stops the service instead of leaving
/// it half alive.
struct Stage<T> {
    name: &'static str,
    join: JoinHandle<T>,
}

fn spawn_stage<T: Send + 'static>(
    name: &'static str,
    ended: &mpsc::UnboundedSender<Ended>,
    describe: fn(&T) -> String,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<Stage<T>, ServiceError> {
    struct Report(&'static str, mpsc::UnboundedSender<Ended>, Option<String>);
    impl Drop for Report {
        fn drop(&mut self) {
            let why = self.2.take().unwrap_or_else(|| "panicked".into());
            let _ = self.1.send((self.0, why));
        }
    }
    let ended = ended.clone();
    let join = thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut report = Report(name, ended, None);
            let out = f();
            report.2 = Some(describe(&out));
            out
        })
        .map_err(ServiceError::Spawn)?;
    Ok(Stage { name, join })
}

impl<T: Send + 'static> Stage<T> {
    /// Joins the thread, giving up at `deadline`.
    async fn join(self, deadline: Instant) -> Result<T, String> {
        let name = self.name;
        let handle = tokio::task::spawn_blocking(move || self.join.join());
        match tokio::time::timeout_at(deadline.into(), handle).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(_))) => Err(format!("{name} panicked")),
            Ok(Err(e)) => Err(format!("{name}: {e}")),
            Err(_) => Err(format!("{name} did not stop in time")),
        }
    }
}

/// A started service. Stop it with [`Service::shutdown`] (or a stage failing), then
/// [`Service::wait`].
pub struct Service {
    pub endpoints: Endpoints,
    pub metrics: Arc<Metrics>,
    health: Arc<Health>,
    store: Arc<dyn Store>,
    transport: Transport,
    ingest: Stage<Result<IngestSummary, IngestError>>,
    alarms: Stage<Result<(), AlarmDbError>>,
    commit: Stage<Result<CommitSummary, CommitError>>,
    output: Stage<()>,
    ended: mpsc::UnboundedReceiver<Ended>,
    give_up: GiveUp,
    stop: watch::Sender<bool>,
    http: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    http_stop: watch::Sender<bool>,
    disk: tokio::task::JoinHandle<()>,
    anchor: tokio::task::JoinHandle<AnchorSummary>,
    anchor_stop: watch::Sender<bool>,
    stop_timeout: Duration,
    /// Held until the stop is over: one process per data directory.
    data_dir_lock: DataDirLock,
}

#[derive(Debug)]
pub struct ServiceSummary {
    pub next_seq: u64,
    pub batches: u64,
    pub readings: u64,
    pub messages: u64,
}

impl Service {
    /// Starts every stage; returns once the service is ready (the external broker may still
    /// be connecting: `/healthz` says so).
    pub async fn start(config: PipelineConfig, data_dir: &Path) -> Result<Service, ServiceError> {
        // First: a token file others can read, or TLS files that do not hold a usable
        // certificate and key, stop the start before anything is opened.
        let write_access = WriteAccess::from_config(&config.http)
            .map_err(|e| ServiceError::Pipeline(e.to_string()))?;
        let http_tls = config
            .http
            .tls
            .as_ref()
            .map(|c| tls::server_config(c, http::ALPN))
            .transpose()
            .map_err(|e| ServiceError::Pipeline(format!("http.tls: {e}")))?;
        std::fs::create_dir_all(data_dir).map_err(|source| ServiceError::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let data_dir_lock = DataDirLock::acquire(data_dir)?;
        let metrics = Metrics::new();
        let health = Health::new(metrics.clone());
        // The pipeline's validation says the same: never open where a token is needed.
        let read_access = if config.http.requires_token() {
            let token = write_access.token().ok_or_else(|| {
                ServiceError::Pipeline(
                    "http.token_file: the HTTP listener needs a token and none is set".into(),
                )
            })?;
            ReadAccess::token(token.clone(), metrics.clone())
        } else {
            ReadAccess::open(metrics.clone())
        };

        let http_listener = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .map_err(|source| ServiceError::Http {
                addr: config.http.listen,
                source,
            })?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|source| ServiceError::Http {
                addr: config.http.listen,
                source,
            })?;

        let sled_store = SledStore::open(&data_dir.join("store"))?;
        let built = sled_store.build_log()?;
        if built > 0 {
            info!(
                batches = built,
                "built the log of batches of a store written before it existed"
            );
        }
        let store: Arc<dyn Store> = Arc::new(sled_store);
        let keys = open_node_keys(
            store.as_ref(),
            &data_dir.join("keys"),
            &format!("iomt-edge/{}", config.site),
            KeyMode::CreateIfFresh,
        )?;

        let (sealer, signer) = (Arc::new(Sealer::new(keys.master)), Arc::new(keys.signer));

        // Before any listener: a ledger that cannot be opened or configured stops the start
        // before a device is acknowledged.
        let ledger_dir = data_dir.join("ledger");
        if store.latest_checkpoint()?.is_some() && !ledger_dir.join("db").is_file() {
            return Err(ServiceError::Ledger(LedgerError::Db {
                path: ledger_dir,
                reason: "missing, while the store holds checkpoints it anchored: restore it \
                         from a backup (a new one would start the chain over)"
                    .into(),
            }));
        }
        let ledger_db = Arc::new(LedgerDb::open(&data_dir.join("ledger"))?);
        // Alarms, acknowledgements and NEWS2 states of the previous run: read before any
        // listener, so that no alarm of it is raised a second time.
        let alarm_db = AlarmDb::open(&data_dir.join("alarms"))?;
        let kept = Kept::load(&alarm_db)?;
        let (ledger, poll): (Arc<dyn Ledger>, Duration) =
            match (config.ledger.backend, &config.ledger.ethereum) {
                (Backend::Ethereum, Some(options)) => (
                    Arc::new(options.build(&data_dir.join("keys"))?),
                    options.poll_every,
                ),
                (Backend::Ethereum, None) => {
                    return Err(ServiceError::Pipeline(
                        "ledger.backend = \"ethereum\" needs [ledger.ethereum]".into(),
                    ))
                }
                (Backend::Local, _) => (
                    Arc::new(LocalChain::new(ledger_db.clone())),
                    Duration::from_secs(1),
                ),
            };

        let routes = config
            .routes
            .iter()
            .map(Route::build)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ServiceError::Pipeline)?;
        let mut filters: Vec<String> = routes.iter().map(|r| r.filter_text.clone()).collect();
        // Besides the devices' topics: alarm acknowledgements and subject settings, which the
        // embedded broker hands ingest as it hands it everything.
        filters.push(format!("alarms/{}/+/+/ack", config.site));
        filters.push(format!("config/{}/+", config.site));

        let (input_tx, input_rx) = input::queue(config.ingest.queue_bytes);
        metrics.probe_queue_bytes("ingest", input_rx.probe());
        // Set once the service stops: what still retries (commit on a failing store, alarms for
        // a broker that takes none) gives up shortly before the stop deadline.
        let give_up = GiveUp::default();
        // Stages report here when they end; so do parts of the transports that must not.
        let (ended_tx, ended) = mpsc::unbounded_channel::<Ended>();
        let (transport, publisher, acker, endpoints): (
            Transport,
            Box<dyn Publisher>,
            Box<dyn Acker>,
            Endpoints,
        ) = match &config.broker.external {
            Some(url) => {
                let client_id = config
                    .broker
                    .client_id
                    .clone()
                    .unwrap_or_else(|| format!("iomt-edge-{}", config.site));
                let tx = ended_tx.clone();
                let (b, publisher, acker) = ExternalBroker::start(
                    url,
                    &client_id,
                    filters,
                    &config.broker,
                    input_tx,
                    health.clone(),
                    give_up.clone(),
                    Arc::new(move |why| {
                        let _ = tx.send(("transport", why));
                    }),
                )
                .map_err(ServiceError::External)?;
                let endpoints = Endpoints {
                    mqtt: None,
                    mqtt_v5: None,
                    ws: None,
                    external: Some(url.clone()),
                    http: http_addr,
                };
                (
                    Transport::External(b),
                    Box::new(publisher),
                    Box::new(acker),
                    endpoints,
                )
            }
            None => {
                let tx = ended_tx.clone();
                let (b, publisher, acker) = EmbeddedBroker::start(
                    &config.broker,
                    &config.routes,
                    config.ingest.max_payload_bytes,
                    input_tx,
                    health.intake(),
                    metrics.clone(),
                    Box::new(move |why| {
                        let _ = tx.send(("transport", why));
                    }),
                )
                .await?;
                let l = b.listeners;
                let endpoints = Endpoints {
                    mqtt: Some(l.mqtt),
                    mqtt_v5: l.mqtt_v5,
                    ws: l.ws,
                    external: None,
                    http: http_addr,
                };
                (
                    Transport::Embedded(b),
                    Box::new(publisher),
                    Box::new(acker),
                    endpoints,
                )
            }
        };

        let ward = Arc::new(WardHub::new(&config.site));
        let (output_stage, output_handle, output_probe) =
            Output::new(publisher, config.ingest.output_queue_bytes);
        metrics.probe_queue_bytes("output", output_probe);
        // Ends once ingest drops the last handle.
        let output = spawn_stage(
            "output",
            &ended_tx,
            |_: &()| "stopped".into(),
            move || output_stage.run(),
        )?;

        let (commit_tx, commit_rx) =
            flume::bounded::<PendingBatch>(config.ingest.queue_batches.max(1));
        let probe = commit_rx.clone();
        metrics.probe_queue("commit", move || probe.len() as i64);
        let writes = Arc::new(WriteWatch::default());
        let commit_stage = Commit::new(
            sealer.clone(),
            store.clone(),
            metrics.clone(),
            health.clone(),
            acker,
            give_up.clone(),
            writes.clone(),
        )?;
        let commit = spawn_stage(
            "commit",
            &ended_tx,
            |r: &Result<CommitSummary, CommitError>| match r {
                Ok(_) => "stopped".into(),
                Err(e) => e.to_string(),
            },
            move || commit_stage.run(commit_rx),
        )?;

        let mut batch = config.batch.clone();
        if config.broker.external.is_some() {
            // The broker stops sending once its window is unacknowledged: batches are cut well
            // before, so acknowledgements flow while messages still arrive.
            batch.max_unacked = batch
                .max_unacked
                .min(usize::from(config.broker.inflight / 4).max(1));
        }
        let mut engine = AlarmEngine::from_config(&config.rules).with_news2(config.news2.build());
        kept.restore_engine(&mut engine);
        let (alarm_tx, alarm_rx) = flume::bounded::<AlarmInput>(ALARM_QUEUE);
        let (alarm_command_tx, alarm_commands) = flume::bounded::<AlarmCommand>(64);
        let alarm_control = AlarmControl::new(alarm_command_tx);
        let probe = alarm_rx.clone();
        metrics.probe_queue("alarms", move || probe.len() as i64);
        let alarm_stage = AlarmStage::new(
            &config.site,
            &config.rules,
            config.news2.adaptive.clone(),
            alarm_db,
            kept,
            store.as_ref(),
            output_handle.clone(),
            ward.clone(),
            metrics.clone(),
        );
        // Ends once ingest has (it holds the other end of the input).
        let alarms = spawn_stage(
            "alarms",
            &ended_tx,
            |r: &Result<(), AlarmDbError>| match r {
                Ok(()) => "stopped".into(),
                Err(e) => e.to_string(),
            },
            move || {
                // Its own runtime, for its timers: its writes then block this thread only.
                tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .map_err(|e| crate::store::alarm_db::AlarmDbError {
                        path: "alarm stage".into(),
                        reason: format!("starting its runtime: {e}"),
                    })?
                    .block_on(alarm_stage.run(alarm_rx, alarm_commands))
            },
        )?;
        let ingest_stage = Ingest::new(
            RouteTable::new(routes),
            engine,
            &config.ingest,
            &batch,
            store.clone(),
            health.clone(),
            metrics.clone(),
        )?
        .with_ward(ward.clone())
        .with_alarm_stage(&config.site, alarm_tx, SilenceWatch::ears(&config.rules));
        let ingest = spawn_stage(
            "ingest",
            &ended_tx,
            |r: &Result<IngestSummary, IngestError>| match r {
                Ok(_) => "stopped".into(),
                Err(e) => e.to_string(),
            },
            move || ingest_stage.run(input_rx, commit_tx, output_handle),
        )?;

        let anchoring = Anchoring::new(
            store.clone(),
            signer.clone(),
            Outbox::new(ledger_db.clone()),
            ledger,
            metrics.clone(),
            config.ledger.checkpoint_every,
            poll,
        );
        let (anchor_stop, anchor_stop_rx) = watch::channel(false);
        let anchor = {
            // Reports its end like a stage thread does, a panic included.
            struct Report(mpsc::UnboundedSender<Ended>, &'static str);
            impl Drop for Report {
                fn drop(&mut self) {
                    let _ = self.0.send(("anchor", self.1.into()));
                }
            }
            let report = Report(ended_tx.clone(), "panicked");
            tokio::spawn(async move {
                let mut report = report;
                let summary = anchoring.run(anchor_stop_rx).await;
                report.1 = "stopped";
                summary
            })
        };

        let disk = tokio::spawn(disk::watch(
            data_dir.to_owned(),
            config.store.min_free_bytes,
            health.clone(),
            metrics.clone(),
            writes,
        ));

        let (http_stop, http_stop_rx) = watch::channel(false);
        let http = tokio::spawn(http::serve(
            http_listener,
            http::router(
                metrics.clone(),
                health.clone(),
                store.clone(),
                http::Proofs {
                    verifier_key: signer.verifier_key(),
                    sealer,
                    outbox: Outbox::new(ledger_db),
                },
                http::Dashboard {
                    ward: ward.clone(),
                    alarms: alarm_control,
                    write: write_access,
                    stop: http_stop_rx.clone(),
                },
                read_access,
            ),
            http_tls,
            http_stop_rx,
        ));

        let text = serde_json::to_string_pretty(&endpoints).expect("endpoints serialise");
        let path = data_dir.join(ENDPOINTS_FILE);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|source| ServiceError::DataDir { path, source })?;
        health.running();
        info!(?endpoints, site = %config.site, "iomt-edge ready");
        let (stop, _) = watch::channel(false);
        Ok(Service {
            endpoints,
            metrics,
            health,
            store,
            transport,
            ingest,
            alarms,
            commit,
            output,
            ended,
            give_up,
            stop,
            http: Some(http),
            http_stop,
            disk,
            anchor,
            anchor_stop,
            stop_timeout: config.stop_timeout,
            data_dir_lock,
        })
    }

    /// A sender that stops the service when set to true (for signal handlers).
    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }

    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Runs until asked to stop or until a stage ends on its own (a failure), then stops
    /// every stage in order. `Err` names the failure, or what could not be stopped cleanly.
    pub async fn wait(mut self) -> Result<ServiceSummary, ServiceError> {
        let mut stop = self.stop.subscribe();
        let mut http = self.http.take().expect("wait runs once");
        let failure = tokio::select! {
            _ = stop.wait_for(|s| *s) => None,
            Some(first) = self.ended.recv() => Some(self.failure_reason(first).await),
            r = &mut http => {
                self.http = None;
                Some(format!("the HTTP listener ended: {}", match r {
                    Ok(Ok(())) => "stopped".to_owned(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                }))
            }
        };
        if failure.is_none() || !http.is_finished() {
            self.http = Some(http);
        }
        match &failure {
            Some(f) => self.health.fail(f),
            None => {
                info!("stopping: no new messages; draining what was taken in");
                self.health.stopping();
            }
        }
        self.stop_stages(failure).await
    }

    /// Names the failure behind a stage ending. A stage whose input ended stops cleanly, and
    /// may report before the stage upstream that failed does: the reports of the next moments
    /// are gathered and a real failure named first.
    async fn failure_reason(&mut self, first: Ended) -> String {
        let mut ended = vec![first];
        let grace = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(Some(e)) = tokio::time::timeout_at(grace, self.ended.recv()).await {
            ended.push(e);
        }
        ended.sort_by_key(|(_, why)| why == "stopped");
        ended
            .iter()
            .map(|(stage, why)| format!("stage {stage} ended: {why}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn stop_stages(self, failure: Option<String>) -> Result<ServiceSummary, ServiceError> {
        let Service {
            health,
            store,
            mut transport,
            ingest,
            alarms,
            commit,
            output,
            give_up,
            http,
            http_stop,
            disk,
            anchor,
            anchor_stop,
            stop_timeout,
            data_dir_lock,
            ..
        } = self;
        let started = Instant::now();
        let deadline = started + stop_timeout;
        // Commit gives up on a failing store early enough for the last acknowledgements of
        // what it did store to go out before the deadline.
        give_up.at(deadline - (stop_timeout / 4).min(Duration::from_secs(2)));
        let mut problems: Vec<String> = failure.into_iter().collect();

        transport.stop_accepting().await;
        let ingest = ingest.join(deadline).await;
        // After ingest, which feeds it; before output, which publishes its last transitions.
        match alarms.join(deadline).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => problems.push(format!("alarms: {e}")),
            Err(e) => problems.push(e),
        }
        let commit = commit.join(deadline).await;
        // Output ends once ingest has: its last alarms reach the transport before it closes.
        if let Err(e) = output.join(deadline).await {
            problems.push(e);
        }
        if !transport.finish(deadline).await {
            problems.push("the last acknowledgements could not all be sent in time".into());
        }
        disk.abort();
        // After commit: the last checkpoint covers every batch stored.
        anchor_stop.send_replace(true);
        let mut anchor = anchor;
        match tokio::time::timeout_at(deadline.into(), &mut anchor).await {
            Ok(Ok(a)) => info!(
                checkpoints = a.checkpoints,
                anchored = a.anchored,
                pending = a.pending,
                "anchoring stopped"
            ),
            Ok(Err(e)) => problems.push(format!("anchor: {e}")),
            // Nothing is lost: the outbox keeps what was not anchored for the next start.
            Err(_) => {
                anchor.abort();
                warn!("anchoring did not finish in time; the outbox keeps what is pending")
            }
        }

        let mut summary = ServiceSummary {
            next_seq: 0,
            batches: 0,
            readings: 0,
            messages: 0,
        };
        match (&ingest, &commit) {
            (Ok(Ok(i)), Ok(Ok(c))) => {
                // Everything handed out is stored: the next run starts at the exact next seq.
                // (After anything less, the reservation stays above every seq handed out.)
                let (store, next) = (store.clone(), i.next_seq);
                let recorded = tokio::task::spawn_blocking(move || store.reserve_seq(next));
                match tokio::time::timeout_at(deadline.into(), recorded).await {
                    Ok(Ok(Ok(()))) => {}
                    _ => warn!("could not record the next seq; the reservation stands"),
                }
                summary = ServiceSummary {
                    next_seq: i.next_seq,
                    batches: c.batches,
                    readings: c.readings,
                    messages: i.messages,
                };
            }
            _ => {
                for r in [
                    ingest.as_ref().err().cloned(),
                    ingest
                        .as_ref()
                        .ok()
                        .and_then(|r| r.as_ref().err())
                        .map(|e| format!("ingest: {e}")),
                    commit.as_ref().err().cloned(),
                    commit
                        .as_ref()
                        .ok()
                        .and_then(|r| r.as_ref().err())
                        .map(|e| format!("commit: {e}")),
                ]
                .into_iter()
                .flatten()
                {
                    if !problems.contains(&r) {
                        problems.push(r);
                    }
                }
            }
        }
        http_stop.send_replace(true);
        if let Some(http) = http {
            let _ = tokio::time::timeout_at(deadline.into(), http).await;
        }
        info!(elapsed = ?started.elapsed(), "stopped");
        drop(data_dir_lock);
        if problems.is_empty() && health.failure().is_none() {
            Ok(summary)
        } else {
            Err(ServiceError::Stopped(problems))
        }
    }
}
