//! HTTP: `/metrics` (Prometheus text format), `/healthz` (200 with `"status":"ok"` while the
//! service runs with no problem; 503 with the phase and the problems otherwise), and the log of
//! batches served read-only the way transparency logs are (c2sp.org/tlog-tiles under `/log/`):
//! `/log/checkpoint`, the latest signed checkpoint; `/log/tile/<L>/<N>[.p/<W>]`, hashes;
//! `/log/tile/entries/<N>[.p/<W>]`, the batch headers' canonical bytes; `/proof/<seq>`, the
//! proof of one reading (docs/proof-format.md), since the store is locked while the node runs;
//! and the ward dashboard (`/dashboard`, `/api/ward`, `/events`, `/api/alarms/ack`: see
//! [`dashboard`]).
//!
//! On a loopback listener all of it is open to this machine; off loopback it needs the token
//! ([`ReadAccess`]) and TLS or an explicit opt-out (`[http.tls]`, `allow_plaintext`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;

use crate::ledger::log::{BatchLog, TILE_WIDTH};
use crate::ledger::outbox::Outbox;
use crate::ledger::proof::{ProofError, Prover};
use crate::model::metrics::Metrics;
use crate::pipeline::health::Health;
use crate::seal::Sealer;
use crate::store::Store;
use crate::transport::dashboard;
pub use crate::transport::dashboard::Dashboard;
use crate::transport::read_access::ReadAccess;
use crate::transport::tls_listener::TlsListener;

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    store: Arc<dyn Store>,
    proofs: Arc<Proofs>,
}

/// What `/proof/<seq>` needs besides the store.
pub struct Proofs {
    pub sealer: Arc<Sealer>,
    pub verifier_key: String,
    pub outbox: Outbox,
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    let report = s.health.report();
    let code = if report.ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(report))
}

/// A tile or entry bundle asked for by its tlog-tiles path (the part after `tile/`).
#[derive(Debug, PartialEq, Eq)]
struct TileRequest {
    /// `None` for an entry bundle.
    level: Option<u8>,
    index: u64,
    width: u64,
}

/// Parses `<L>/<N>[.p/<W>]` or `entries/<N>[.p/<W>]`, where `<N>` is the index in groups of
/// three digits, all but the last prefixed with `x` (`x001/x234/067` is 1234067).
fn parse_tile_path(path: &str) -> Option<TileRequest> {
    let mut parts: Vec<&str> = path.split('/').collect();
    let level = match parts.first()? {
        &"entries" => None,
        l if !l.is_empty() && l.len() <= 2 && l.bytes().all(|b| b.is_ascii_digit()) => {
            Some(l.parse::<u8>().ok().filter(|&l| l <= 7)?)
        }
        _ => return None,
    };
    parts.remove(0);
    let mut width = TILE_WIDTH;
    if parts.len() >= 2 && parts[parts.len() - 2].ends_with(".p") {
        let w = parts.pop()?;
        if w.is_empty() || w.len() > 3 || !w.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        width = w.parse().ok().filter(|w| (1..TILE_WIDTH).contains(w))?;
        let last = parts.last_mut()?;
        *last = last.strip_suffix(".p")?;
    }
    let (last, groups) = parts.split_last()?;
    let mut index: u64 = 0;
    for (i, g) in groups
        .iter()
        .map(|g| g.strip_prefix('x'))
        .chain([Some(*last)])
        .enumerate()
    {
        let g = g?;
        if g.len() != 3 || !g.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // No leading zero groups: each index has one path.
        if i == 0 && g == "000" && !groups.is_empty() {
            return None;
        }
        index = index.checked_mul(1000)?.checked_add(g.parse().ok()?)?;
    }
    Some(TileRequest {
        level,
        index,
        width,
    })
}

fn not_found(what: &str) -> axum::response::Response {
    (StatusCode::NOT_FOUND, format!("{what}\n")).into_response()
}

fn unavailable(e: impl std::fmt::Display) -> axum::response::Response {
    tracing::warn!(error = %e, "reading the log of batches failed");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "the log of batches could not be read\n",
    )
        .into_response()
}

async fn checkpoint(State(s): State<AppState>) -> axum::response::Response {
    let store = s.store.clone();
    match tokio::task::spawn_blocking(move || store.latest_checkpoint()).await {
        Ok(Ok(Some((_, note)))) => (
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            note,
        )
            .into_response(),
        Ok(Ok(None)) => not_found("no checkpoint yet"),
        Ok(Err(e)) => unavailable(e),
        Err(e) => unavailable(e),
    }
}

async fn tile(
    State(s): State<AppState>,
    axum::extract::Path(path): axum::extract::Path<String>,
) -> axum::response::Response {
    let Some(req) = parse_tile_path(&path) else {
        return not_found("not a tile path (c2sp.org/tlog-tiles)");
    };
    let store = s.store.clone();
    let read = tokio::task::spawn_blocking(move || {
        let log = BatchLog::new(store.as_ref());
        match req.level {
            Some(level) => log.tile(level, req.index, req.width),
            None => log.entries(req.index, req.width),
        }
    });
    match read.await {
        Ok(Ok(Some(bytes))) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                // A tile never changes once the log holds it: the log only grows.
                (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
            ],
            bytes,
        )
            .into_response(),
        Ok(Ok(None)) => not_found("the log does not hold that tile"),
        Ok(Err(e)) => unavailable(e),
        Err(e) => unavailable(e),
    }
}

async fn proof(
    State(s): State<AppState>,
    axum::extract::Path(seq): axum::extract::Path<String>,
) -> axum::response::Response {
    let Ok(seq) = seq.parse::<u64>() else {
        return (StatusCode::BAD_REQUEST, "a seq is a decimal number\n").into_response();
    };
    let (store, proofs) = (s.store.clone(), s.proofs.clone());
    let made = tokio::task::spawn_blocking(move || {
        Prover {
            store: store.as_ref(),
            sealer: &proofs.sealer,
            verifier_key: &proofs.verifier_key,
            outbox: Some(&proofs.outbox),
        }
        .seq(seq)
    });
    match made.await {
        Ok(Ok(p)) => Json(p).into_response(),
        Ok(Err(e @ (ProofError::NoSuchSeq(_) | ProofError::NotCheckpointed(_)))) => {
            (StatusCode::NOT_FOUND, format!("{e}\n")).into_response()
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "a proof could not be made");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the proof could not be made: {e}\n"),
            )
                .into_response()
        }
        Err(e) => unavailable(e),
    }
}

/// Every route, behind `access` (who may use them at all: [`ReadAccess`]).
pub fn router(
    metrics_: Arc<Metrics>,
    health: Arc<Health>,
    store: Arc<dyn Store>,
    proofs: Proofs,
    ward: Dashboard,
    access: ReadAccess,
) -> Router {
    let routes = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/log/checkpoint", get(checkpoint))
        .route("/log/tile/{*path}", get(tile))
        .route("/proof/{seq}", get(proof))
        .with_state(AppState {
            metrics: metrics_,
            health,
            store,
            proofs: Arc::new(proofs),
        })
        .merge(dashboard::router(ward));
    access.protect(routes)
}

/// Serves until `shutdown` turns true, over HTTPS with `tls`. Open responses must end by then
/// for this to return: the dashboard's event streams end on the same signal
/// (`Dashboard::stop`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    match tls {
        None => {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop)
                .await
        }
        Some(tls) => {
            axum::serve(TlsListener::new(listener, tls)?, router)
                .with_graceful_shutdown(stop)
                .await
        }
    }
}

/// The ALPN the HTTPS listener offers: axum's server here speaks HTTP/1.1 only.
pub const ALPN: &[&[u8]] = &[b"http/1.1"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_paths_are_read_as_tlog_tiles_writes_them() {
        let t = |level, index, width| {
            Some(TileRequest {
                level,
                index,
                width,
            })
        };
        assert_eq!(parse_tile_path("0/000"), t(Some(0), 0, 256));
        assert_eq!(
            parse_tile_path("1/x001/x234/067"),
            t(Some(1), 1_234_067, 256)
        );
        assert_eq!(parse_tile_path("0/005.p/44"), t(Some(0), 5, 44));
        assert_eq!(parse_tile_path("entries/x001/002.p/7"), t(None, 1002, 7));
        assert_eq!(parse_tile_path("entries/000"), t(None, 0, 256));
        for bad in [
            "",
            "0",
            "0/5",
            "0/0005",
            "0/x000/005",
            "0/005.p/256",
            "0/005.p/0",
            "0/005.p/",
            "8/000",
            "a/000",
            "0/x001",
            "0/001/x002",
            "entries/000.p/4/1",
            "0/../000",
            "0/x99999999/000/000/000/000/000/000",
        ] {
            assert_eq!(parse_tile_path(bad), None, "{bad}");
        }
    }
}
