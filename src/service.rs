//! The running service: builds every stage from the pipeline file, wires them with bounded
//! channels, and stops them in order on shutdown (ingest drains and seals its open batch, commit
//! stores what is queued, output publishes what is queued).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use serde::Serialize;
use tokio::sync::watch;
use tracing::info;

use crate::alarm::AlarmEngine;
use crate::config::PipelineConfig;
use crate::model::metrics::Metrics;
use crate::pipeline::commit::{Commit, CommitError, CommitSummary};
use crate::pipeline::ingest::{Ingest, IngestSummary, PendingBatch, Route, RouteTable};
use crate::pipeline::output;
use crate::pipeline::Input;
use crate::pipeline::{Acker, Publisher};
use crate::seal::keys::KeyError;
use crate::seal::Sealer;
use crate::store::{open_node_keys, DataDirLock, KeyMode, SledStore, Store, StoreError};
use crate::transport::embedded::LinkPublisher;
use crate::transport::embedded::{BrokerError, EmbeddedBroker};
use crate::transport::external::ClientPublisher;
use crate::transport::external::ExternalBroker;
use crate::transport::http::{self, Health};
use crate::transport::link::LinkInput;

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
    #[error("external broker: {0}")]
    External(String),
    #[error("pipeline: {0}")]
    Pipeline(String),
    #[error("http listener {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("commit: {0}")]
    Commit(#[from] CommitError),
    #[error("a stage thread failed: {0}")]
    Thread(String),
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

/// A started service. Stop it with [`Service::shutdown`], then [`Service::wait`].
pub struct Service {
    pub endpoints: Endpoints,
    pub metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    ingest: JoinHandle<Result<IngestSummary, StoreError>>,
    commit: JoinHandle<Result<CommitSummary, CommitError>>,
    output: JoinHandle<()>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    health: Arc<Health>,
    external: Option<rumqttc::Client>,
    /// Held while the service lives: one process per data directory.
    _data_dir_lock: DataDirLock,
}

#[derive(Debug)]
pub struct ServiceSummary {
    pub next_seq: u64,
    pub batches: u64,
    pub readings: u64,
}

fn join<T>(h: JoinHandle<T>, name: &str) -> Result<T, ServiceError> {
    h.join()
        .map_err(|_| ServiceError::Thread(format!("{name} panicked")))
}

impl Service {
    /// Starts every stage; returns once the service is ready.
    pub async fn start(config: PipelineConfig, data_dir: &Path) -> Result<Service, ServiceError> {
        std::fs::create_dir_all(data_dir).map_err(|source| ServiceError::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let data_dir_lock = DataDirLock::acquire(data_dir)?;
        let metrics = Metrics::new();
        let health = Arc::new(Health::default());
        let (shutdown, shutdown_rx) = watch::channel(false);

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
        let http = tokio::spawn(http::serve(
            http_listener,
            http::router(metrics.clone(), health.clone()),
            shutdown_rx.clone(),
        ));

        let store: Arc<dyn Store> = Arc::new(SledStore::open(&data_dir.join("store"))?);
        let keys = open_node_keys(
            store.as_ref(),
            &data_dir.join("keys"),
            &format!("iomt-edge/{}", config.site),
            KeyMode::CreateIfFresh,
        )?;
        health.store.store(true, Ordering::Release);

        let routes = config
            .routes
            .iter()
            .map(Route::build)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ServiceError::Pipeline)?;
        let filters: Vec<String> = routes.iter().map(|r| r.filter_text.clone()).collect();

        let BrokerSide {
            input,
            publisher,
            acker,
            endpoints,
            external,
        } = connect_broker(&config, filters, http_addr, metrics.clone()).await?;
        health.broker.store(true, Ordering::Release);

        let (output_handle, output_probe, output) =
            output::spawn(config.site.clone(), publisher)
                .map_err(|e| ServiceError::Thread(e.to_string()))?;
        metrics.probe_queue("output", move || output_probe.len() as i64);

        let (commit_tx, commit_rx) =
            flume::bounded::<PendingBatch>(config.ingest.queue_batches.max(1));
        let probe = commit_rx.clone();
        metrics.probe_queue("commit", move || probe.len() as i64);
        let commit_stage = Commit::new(
            Sealer::new(keys.master),
            store.clone(),
            metrics.clone(),
            acker,
        )?;
        let rx = shutdown_rx.clone();
        let commit = thread::Builder::new()
            .name("commit".into())
            .spawn(move || commit_stage.run(commit_rx, rx))
            .map_err(|e| ServiceError::Thread(e.to_string()))?;

        let max_pending_acks = if config.broker.external.is_some() {
            config.broker.inflight as usize
        } else {
            usize::MAX
        };
        let ingest_stage = Ingest::new(
            RouteTable::new(routes),
            AlarmEngine::from_config(&config.rules),
            &config.ingest,
            &config.batch,
            max_pending_acks,
            store.clone(),
            metrics.clone(),
        )?;
        let rx = shutdown_rx.clone();
        let ingest_health = health.clone();
        let ingest = thread::Builder::new()
            .name("ingest".into())
            .spawn(move || {
                let r = ingest_stage.run(input, commit_tx, output_handle, rx);
                ingest_health.pipeline.store(false, Ordering::Release);
                r
            })
            .map_err(|e| ServiceError::Thread(e.to_string()))?;
        health.pipeline.store(true, Ordering::Release);

        let text = serde_json::to_string_pretty(&endpoints).expect("endpoints serialise");
        let path = data_dir.join(ENDPOINTS_FILE);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|source| ServiceError::DataDir { path, source })?;
        info!(?endpoints, site = %config.site, "iomt-edge ready");
        Ok(Service {
            endpoints,
            metrics,
            shutdown,
            ingest,
            commit,
            output,
            http,
            health,
            external,
            _data_dir_lock: data_dir_lock,
        })
    }

    /// A sender that stops the service when set to true (for signal handlers).
    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }

    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits for every stage to finish after shutdown.
    pub async fn wait(self) -> Result<ServiceSummary, ServiceError> {
        let Service {
            ingest,
            commit,
            output,
            http,
            health,
            external,
            ..
        } = self;
        let (ingest, commit, output) = tokio::task::spawn_blocking(move || {
            let i = join(ingest, "ingest");
            let c = join(commit, "commit");
            let o = join(output, "output");
            (i, c, o)
        })
        .await
        .map_err(|e| ServiceError::Thread(e.to_string()))?;
        health.pipeline.store(false, Ordering::Release);
        if let Some(client) = external {
            let _ = client.disconnect();
        }
        let _ = http.await;
        output?;
        let ingest = ingest??;
        let commit = commit??;
        Ok(ServiceSummary {
            next_seq: ingest.next_seq,
            batches: commit.batches,
            readings: commit.readings,
        })
    }
}

/// Ingest's input, output's publisher and commit's acker, from one broker or the other.
struct BrokerSide {
    input: Box<dyn Input>,
    publisher: Box<dyn Publisher>,
    acker: Option<Box<dyn Acker>>,
    endpoints: Endpoints,
    /// The external broker's client, disconnected at shutdown.
    external: Option<rumqttc::Client>,
}

async fn connect_broker(
    config: &PipelineConfig,
    filters: Vec<String>,
    http_addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> Result<BrokerSide, ServiceError> {
    Ok(match &config.broker.external {
        Some(url) => {
            let client_id = config
                .broker
                .client_id
                .clone()
                .unwrap_or_else(|| format!("iomt-edge-{}", config.site));
            let ext = ExternalBroker::connect(
                url,
                &client_id,
                filters,
                config.broker.inflight,
                config.broker.max_packet_bytes,
            )
            .map_err(ServiceError::External)?;
            let endpoints = Endpoints {
                mqtt: None,
                mqtt_v5: None,
                ws: None,
                external: Some(url.clone()),
                http: http_addr,
            };
            BrokerSide {
                input: Box::new(ext.input),
                publisher: Box::new(ClientPublisher(ext.client.clone())),
                acker: Some(Box::new(ext.client.clone())),
                endpoints,
                external: Some(ext.client),
            }
        }
        None => {
            let broker_config = config.broker.clone();
            let m = metrics;
            let mut broker =
                tokio::task::spawn_blocking(move || EmbeddedBroker::start(&broker_config, m))
                    .await
                    .map_err(|e| ServiceError::Thread(e.to_string()))??;
            let input = LinkInput::new(broker.ingest.take().expect("ingest link"))
                .map_err(|e| ServiceError::Pipeline(e.to_string()))?;
            let publisher = LinkPublisher::new(broker.output.take().expect("output link"))
                .map_err(|e| ServiceError::Thread(e.to_string()))?;
            let l = broker.listeners;
            let endpoints = Endpoints {
                mqtt: Some(l.mqtt),
                mqtt_v5: l.mqtt_v5,
                ws: l.ws,
                external: None,
                http: http_addr,
            };
            BrokerSide {
                input: Box::new(input),
                publisher: Box::new(publisher),
                acker: None,
                endpoints,
                external: None,
            }
        }
    })
}
