//! Transports: the embedded MQTT broker, the external broker's client and the HTTP endpoint
//! (with the ward dashboard).
//! Each implements the pipeline's seams ([`crate::pipeline`]) over a real protocol.

pub mod broker;
pub mod credentials;
pub mod dashboard;
pub mod external;
pub mod http;
pub mod read_access;
pub mod tls;
pub mod tls_client;
pub mod tls_listener;
pub mod ward_events;
pub mod wire;
pub mod write_access;

/// Waits until the flag turns true (forever if its sender is gone). Never holds the watch's
/// lock across an await, unlike a `wait_for` result kept in a `select!` (which would also make
/// the task's future not `Send`).
pub(crate) async fn raised(rx: &mut tokio::sync::watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}
