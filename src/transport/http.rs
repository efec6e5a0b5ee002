//! HTTP: `/metrics` (Prometheus text format) and `/healthz` (200 once broker, pipeline and store
//! are up, 503 before and after).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::watch;

use crate::model::metrics::Metrics;

/// What `/healthz` reports; each part sets its flag when it is up.
#[derive(Debug, Default)]
pub struct Health {
    pub broker: AtomicBool,
    pub pipeline: AtomicBool,
    pub store: AtomicBool,
}

impl Health {
    pub fn ok(&self) -> bool {
        self.broker.load(Ordering::Acquire)
            && self.pipeline.load(Ordering::Acquire)
            && self.store.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
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
    let h = &s.health;
    let body = json!({
        "status": if h.ok() { "ok" } else { "unavailable" },
        "broker": h.broker.load(Ordering::Acquire),
        "pipeline": h.pipeline.load(Ordering::Acquire),
        "store": h.store.load(Ordering::Acquire),
    });
    let code = if h.ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

pub fn router(metrics_: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(AppState {
            metrics: metrics_,
            health,
        })
}

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
}
