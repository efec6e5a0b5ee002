//! The embedded MQTT broker: this service's own listeners (MQTT 3.1.1 and 5 on the same port,
//! told apart by each CONNECT; MQTT over websockets), its own connection handling, and
//! rumqttd's router for subscriptions and retained messages.
//!
//! Device data does not pass through rumqttd's in-memory logs: a connection hands each publish
//! to ingest and acknowledges it only once the commit stage has stored its readings (see
//! `connection.rs`). That is what makes every PUBACK a device holds mean "stored", even if this
//! process is killed the next instant; and it is what lets the broker stop taking messages (a
//! stop, a failing store, a full disk) without dropping any it acknowledged.
//!
//! The listeners are bound here, before the service reports ready: a port another process holds
//! is an error at start, not a silent split of the devices between two brokers.

mod auth;
mod connection;
mod limits;
mod retained;
mod router;
mod sessions;
mod subscriptions;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tracing::debug;

use crate::config::{BrokerConfig, RouteConfig};
use crate::model::events::{ConnectionRefused, InternalEvent};
use crate::model::metrics::Metrics;
use crate::pipeline::input::InputSender;
use crate::pipeline::routes::Owners;
pub use router::{LinkPublisher, Router};
pub use sessions::SessionAcker;
use sessions::Sessions;
use subscriptions::Subscriptions;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Router(String),
    #[error("broker.auth: {0}")]
    Auth(#[from] auth::AuthError),
    /// The pipeline file's broker or routes do not make a usable broker.
    #[error("{0}")]
    Config(String),
    #[error("broker.tls: {0}")]
    Tls(#[from] crate::transport::tls::TlsError),
}

/// The per-connection limits (`[broker]` max_inflight, max_messages_per_second, max_burst).
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_inflight: u16,
    max_messages_per_second: u32,
    max_burst: u32,
}

/// The TLS acceptors of `[broker.tls]`: MQTT's offers no ALPN protocol of its own (devices
/// rarely send one, and some send vendor names, which an offer list would refuse); the
/// websocket listener's speaks HTTP/1.1, as browsers ask.
struct ListenerTls {
    mqtt: tokio_rustls::TlsAcceptor,
    websocket: tokio_rustls::TlsAcceptor,
}

impl ListenerTls {
    fn new(c: &crate::config::TlsConfig) -> Result<Self, BrokerError> {
        use crate::transport::tls::server_config;
        Ok(ListenerTls {
            mqtt: server_config(c, &[])?.into(),
            websocket: server_config(c, &[b"http/1.1"])?.into(),
        })
    }
}

/// Who is on the other end of a connection, as far as the transport knows before CONNECT.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The account its verified TLS client certificate names.
    pub certificate: Option<String>,
    /// Connected from this machine: anonymous clients (where allowed) keep the staff rights
    /// only from here.
    pub loopback: bool,
}

impl Peer {
    fn new(addr: SocketAddr, certificate: Option<String>) -> Self {
        Peer {
            certificate,
            loopback: addr.ip().to_canonical().is_loopback(),
        }
    }
}

/// Where the embedded broker listens, ports resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listeners {
    pub mqtt: SocketAddr,
    pub mqtt_v5: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
}

/// A client has this long to send its CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection of the broker shares.
pub struct Shared {
    router: Router,
    sessions: Arc<Sessions>,
    subscriptions: Subscriptions,
    retained: retained::Retained,
    /// Ingest's queue; taken away when the broker stops, so new and stopping connections
    /// cannot hand anything more in.
    input: Mutex<Option<InputSender>>,
    max_packet: usize,
    /// Payloads above this are not buffered (ingest would refuse them anyway).
    max_payload: usize,
    connect_timeout: Duration,
    metrics: Arc<Metrics>,
    /// True while messages may be taken in.
    intake: watch::Receiver<bool>,
    /// Turns true when the broker stops: readers stop reading, listeners close.
    stopping: watch::Receiver<bool>,
    /// Turns true once the last acknowledgements are queued: writers send them and close.
    finish: watch::Receiver<bool>,
    next_auto_id: AtomicU64,
    auth: Arc<auth::Auth>,
    /// Which account owns which topic.
    owners: Owners,
    limits: Limits,
    /// TLS on the MQTT listeners and on the websocket listener (their ALPN differ).
    tls: Option<ListenerTls>,
    /// Web page origins that may open MQTT websockets (`broker.ws_allowed_origins`).
    ws_allowed_origins: Vec<String>,
    /// Connections served at once, CONNECT pending or not: past `max_connections` (and a few
    /// for the CONNACK that says so), a new one is closed at once.
    slots: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    fn input(&self) -> Option<InputSender> {
        self.input.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn next_auto_id(&self) -> u64 {
        self.next_auto_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Counts running connection tasks, so that a stop can wait for the last one.
#[derive(Debug, Default)]
struct Tracker {
    running: AtomicUsize,
    idle: Notify,
}

struct Tracked(Arc<Tracker>);

impl Tracker {
    fn track(self: &Arc<Self>) -> Tracked {
        self.running.fetch_add(1, Ordering::AcqRel);
        Tracked(self.clone())
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.running.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The running broker.
pub struct EmbeddedBroker {
    pub listeners: Listeners,
    shared: Arc<Shared>,
    stopping: watch::Sender<bool>,
    finish: watch::Sender<bool>,
    tracker: Arc<Tracker>,
    accept_loops: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), BrokerError> {
    let bind_err = |source| BrokerError::Bind { addr, source };
    let l = TcpListener::bind(addr).await.map_err(bind_err)?;
    let local = l.local_addr().map_err(bind_err)?;
    Ok((l, local))
}

impl EmbeddedBroker {
    /// Binds the listeners and starts the router. Connections are served from now on, but
    /// nothing is taken in until `intake` turns true.
    /// `router_ended` is called if rumqttd's router thread ever ends: the broker is then dead
    /// for subscribers, and the service must fail rather than pretend.
    pub async fn start(
        c: &BrokerConfig,
        routes: &[RouteConfig],
        max_payload: usize,
        input: InputSender,
        intake: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
        router_ended: Box<dyn FnOnce(String) + Send>,
    ) -> Result<(Self, LinkPublisher, SessionAcker), BrokerError> {
        c.check_can_connect().map_err(BrokerError::Config)?;
        let auth = Arc::new(auth::Auth::load(&c.auth, c.client_certs())?);
        let tls = c.tls.as_ref().map(ListenerTls::new).transpose()?;
        let owners = Owners::new(routes).map_err(BrokerError::Config)?;
        let (mqtt, mqtt_addr) = bind(c.listen).await?;
        let v5 = match c.listen_v5 {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let ws = match c.listen_ws {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let router = Router::start(c).map_err(BrokerError::Router)?;
        let publisher = LinkPublisher::new(&router, router_ended).map_err(BrokerError::Router)?;
        let (stopping_tx, stopping) = watch::channel(false);
        let (finish_tx, finish) = watch::channel(false);
        let sessions = Arc::new(Sessions::default());
        let shared = Arc::new(Shared {
            router,
            sessions: sessions.clone(),
            subscriptions: Subscriptions::default(),
            retained: retained::Retained::default(),
            input: Mutex::new(Some(input)),
            max_packet: c.max_packet_bytes,
            max_payload,
            connect_timeout: CONNECT_TIMEOUT,
            metrics,
            intake,
            stopping,
            finish,
            next_auto_id: AtomicU64::new(0),
            auth,
            owners,
            tls,
            ws_allowed_origins: c.ws_allowed_origins.clone(),
            limits: Limits {
                max_inflight: c.max_inflight,
                max_messages_per_second: c.max_messages_per_second,
                max_burst: c.max_burst,
            },
            slots: Arc::new(tokio::sync::Semaphore::new(c.max_connections + 16)),
        });
        let tracker = Arc::new(Tracker::default());
        let listeners = Listeners {
            mqtt: mqtt_addr,
            mqtt_v5: v5.as_ref().map(|(_, a)| *a),
            ws: ws.as_ref().map(|(_, a)| *a),
        };
        let mut accept_loops = vec![tokio::spawn(accept_loop(
            mqtt,
            false,
            shared.clone(),
            tracker.clone(),
        ))];
        if let Some((l, _)) = v5 {
            accept_loops.push(tokio::spawn(accept_loop(
                l,
                false,
                shared.clone(),
                tracker.clone(),
            )));
        }
        if let Some((l, _)) = ws {
            accept_loops.push(tokio::spawn(accept_loop(
                l,
                true,
                shared.clone(),
                tracker.clone(),
            )));
        }
        Ok((
            EmbeddedBroker {
                listeners,
                shared,
                stopping: stopping_tx,
                finish: finish_tx,
                tracker,
                accept_loops,
            },
            publisher,
            SessionAcker(sessions),
        ))
    }

    /// Stops taking anything in: the listeners close and every connection stops reading. Once
    /// the connections have let go of it, ingest's queue closes (ingest then drains it).
    pub async fn stop_accepting(&mut self) {
        self.stopping.send_replace(true);
        self.shared
            .input
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        for l in self.accept_loops.drain(..) {
            let _ = l.await;
        }
    }

    /// Every acknowledgement is queued (the commit stage has finished): connections send them,
    /// close, and are waited for until `deadline`. Returns how many were still open then.
    pub async fn finish(self, deadline: Instant) -> usize {
        self.finish.send_replace(true);
        let wait = self.tracker.wait_idle();
        let left = tokio::time::timeout_at(deadline.into(), wait).await;
        match left {
            Ok(()) => 0,
            Err(_) => self.tracker.running.load(Ordering::Acquire),
        }
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.shared.sessions.count()
    }
}

async fn accept_loop(
    listener: TcpListener,
    websocket: bool,
    shared: Arc<Shared>,
    tracker: Arc<Tracker>,
) {
    let mut stopping = shared.stopping.clone();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::transport::raised(&mut stopping) => return,
        };
        let Ok(slot) = shared.slots.clone().try_acquire_owned() else {
            ConnectionRefused { reason: "limit" }.emit(&shared.metrics);
            debug!(%peer, "refused: as many connections as allowed");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        debug!(%peer, websocket, "accepted");
        let guard = tracker.track();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let _slot = slot;
            let acceptor = shared.tls.as_ref().map(|t| match websocket {
                true => t.websocket.clone(),
                false => t.mqtt.clone(),
            });
            let Some(acceptor) = acceptor else {
                return serve_stream(stream, websocket, shared, Peer::new(peer, None)).await;
            };
            let mut stopping = shared.stopping.clone();
            let handshake = tokio::select! {
                h = tokio::time::timeout(shared.connect_timeout, acceptor.accept(stream)) => h,
                _ = crate::transport::raised(&mut stopping) => return,
            };
            match handshake {
                Ok(Ok(tls)) => {
                    let certificate = crate::transport::tls::client_identity(tls.get_ref().1);
                    serve_stream(tls, websocket, shared, Peer::new(peer, certificate)).await
                }
                Ok(Err(e)) => {
                    // A wrong CA, no client certificate, a plain-text client: all land here.
                    ConnectionRefused { reason: "tls" }.emit(&shared.metrics);
                    debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    ConnectionRefused { reason: "tls" }.emit(&shared.metrics);
                    debug!(%peer, "TLS handshake timed out");
                }
            }
        });
    }
}

/// One accepted connection, its TLS (if any) done: MQTT straight away, or inside websockets.
/// `peer`: where it comes from, and the identity its verified client certificate names.
async fn serve_stream<S>(stream: S, websocket: bool, shared: Arc<Shared>, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if websocket {
        // Boxed: its state is as large as a plain connection's again, and every connection's
        // task would otherwise carry room for both.
        Box::pin(serve_websocket(stream, shared, peer)).await;
    } else {
        connection::serve(stream, shared, peer).await;
    }
}

/// MQTT over websockets: the upgrade answers with the `mqtt` subprotocol, then the byte stream
/// inside is served like any other connection.
// The handshake callback's error type is tungstenite's HTTP response.
#[allow(clippy::result_large_err)]
async fn serve_websocket<S>(stream: S, shared: Arc<Shared>, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use async_tungstenite::tungstenite::handshake::server::{Request, Response};
    use async_tungstenite::tungstenite::http::HeaderValue;
    // A browser says which page opened the socket; devices send no Origin. Any web page a
    // browser on this machine (or a ward PC) shows could otherwise speak MQTT to the broker
    // (anonymous clients on loopback may acknowledge alarms), so a page needs its origin
    // listed in `broker.ws_allowed_origins`.
    let refused_origin = std::sync::atomic::AtomicBool::new(false);
    let callback = |req: &Request, mut resp: Response| {
        if let Some(origin) = req.headers().get("origin") {
            let allowed = origin
                .to_str()
                .is_ok_and(|o| shared.ws_allowed_origins.iter().any(|a| a == o));
            if !allowed {
                refused_origin.store(true, Ordering::Relaxed);
                let mut refusal =
                    async_tungstenite::tungstenite::handshake::server::ErrorResponse::new(Some(
                        "this origin may not open MQTT websockets here".into(),
                    ));
                *refusal.status_mut() = async_tungstenite::tungstenite::http::StatusCode::FORBIDDEN;
                return Err(refusal);
            }
        }
        resp.headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
        Ok(resp)
    };
    // Messages and frames no larger than an MQTT packet may be (tungstenite's defaults allow
    // 64 MiB).
    let config = async_tungstenite::tungstenite::protocol::WebSocketConfig {
        max_message_size: Some(shared.max_packet + 1024),
        max_frame_size: Some(shared.max_packet + 1024),
        ..Default::default()
    };
    let mut stopping = shared.stopping.clone();
    let upgrade = tokio::select! {
        u = tokio::time::timeout(
            shared.connect_timeout,
            async_tungstenite::tokio::accept_hdr_async_with_config(stream, callback, Some(config)),
        ) => u,
        _ = crate::transport::raised(&mut stopping) => return,
    };
    match upgrade {
        Ok(Ok(ws)) => {
            connection::serve(ws_stream_tungstenite::WsStream::new(ws), shared, peer).await
        }
        Ok(Err(_)) if refused_origin.load(Ordering::Relaxed) => {
            ConnectionRefused { reason: "origin" }.emit(&shared.metrics);
            debug!("websocket from a web page whose origin is not allowed: refused");
        }
        Ok(Err(e)) => debug!(error = %e, "websocket handshake failed"),
        Err(_) => debug!("websocket handshake timed out"),
    }
}
