//! The receiving MQTT 5 session on the external broker, spoken over rumqttd's v5 codec.
//!
//! Hand-written rather than taken from rumqttc, whose event loop writes and flushes each
//! acknowledgement on its own: one TCP segment, and one read for the broker, per message. On the
//! 2-core reference machine that alone cut mosquitto's throughput by a quarter (62,000 → 47,000
//! messages/s in `cargo bench --bench e2e_load` with `IOMT_ACK_BATCH=1`), below what a ward's
//! broker must carry. Here a commit's acknowledgements go out in one write.
//!
//! Each connection has a reader and a writer that work apart, as the embedded broker's
//! connections do: the reader stops reading while ingest has no room (the broker keeps the
//! messages), while the writer goes on sending acknowledgements and pings, each write bounded by
//! [`WRITE_TIMEOUT`].

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    Connect, ConnectProperties, Disconnect, DisconnectReasonCode, Filter, Login, Packet, PingReq,
    PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, QoS, RetainForwardRule,
    SubAck, Subscribe, SubscribeReasonCode,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{InputSlot, Secret};
use crate::pipeline::health::{Health, Problem};
use crate::pipeline::input::Received;
use crate::pipeline::AckToken;
use crate::transport::raised;
use crate::transport::wire::{frame, publish_head, Proto, WireError};

/// Everything a session needs to connect.
#[derive(Clone)]
pub struct SessionConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub filters: Vec<String>,
    /// MQTT 5 Receive Maximum: messages the broker may send ahead of acknowledgements.
    pub window: u16,
    pub max_packet: usize,
    pub keep_alive: Duration,
    /// The account and password to log in with.
    pub login: Option<(String, Secret)>,
    /// TLS to the broker (`mqtts://`): the client config, and the name its certificate must
    /// carry.
    pub tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
}

/// A connection's halves: plain TCP's own, or TLS's (tokio's split of the TLS stream).
type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// How long connecting (TCP, then CONNACK) may take, and then the SUBACK.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one write may take before the connection counts as dead (the embedded broker's
/// connections use the same).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Control packets (PUBCOMPs) the reader may queue for the writer.
const CONTROL_QUEUE: usize = 1024;
/// Larger than any CONNACK a broker sends this client (its properties are a few short values).
const MAX_CONNACK: usize = 64 << 10;
/// A connection must have lasted this long for the back-off to start over, so that a broker
/// that accepts and then drops the session (or hands it to another client with the same id)
/// is not hammered.
const STABLE_AFTER: Duration = Duration::from_secs(10);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// MQTT 5 DISCONNECT reason 0x8E: another connection took the session over.
const SESSION_TAKEN_OVER: DisconnectReasonCode = DisconnectReasonCode::SessionTakenOver;

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("TLS with the broker failed: {0}")]
    Tls(std::io::Error),
    #[error("the broker refused the connection: {why} (reason code {0:#04x})", why = refusal(*.0))]
    Refused(u8),
    #[error("the broker did not answer in time")]
    Timeout,
    #[error("a write to the broker did not complete in {WRITE_TIMEOUT:?}")]
    WriteTimeout,
    #[error("the broker sent {0}")]
    Unexpected(&'static str),
    #[error("the broker disconnected: {0:?}")]
    Disconnected(DisconnectReasonCode),
    #[error("the broker closed the connection")]
    Closed,
}

/// Runs the session until `finish`: connects, subscribes, hands messages to ingest (while the
/// input slot holds ingest's input), writes the acknowledgements it gets, and reconnects with
/// back-off when the connection breaks. `epoch` numbers the connections: acknowledgements carry
/// the number of the connection their message came on, and only the current connection's are
/// written (packet ids are the connection's own).
pub async fn run(
    cfg: SessionConfig,
    input: InputSlot,
    health: Arc<Health>,
    mut acks: mpsc::UnboundedReceiver<Vec<AckToken>>,
    epoch: Arc<AtomicU64>,
    stopping: watch::Receiver<bool>,
    mut finish: watch::Receiver<bool>,
) {
    let mut backoff = MIN_BACKOFF;
    let mut connected_before = false;
    loop {
        if *finish.borrow() {
            return;
        }
        let attempt = tokio::select! {
            c = tokio::time::timeout(CONNECT_TIMEOUT, connect(&cfg)) => {
                c.unwrap_or(Err(SessionError::Timeout))
            }
            _ = raised(&mut finish) => return,
        };
        let end = match attempt {
            Ok(conn) => {
                let number = epoch.fetch_add(1, Ordering::AcqRel) + 1;
                let session_present = conn.session_present;
                if connected_before && !session_present {
                    // The broker lost this node's session (a restart without persistence):
                    // what it held for the node, unacknowledged, is gone with it.
                    warn!("the external broker did not resume this node's session: messages it held for it may be lost");
                } else {
                    info!(session_present, "connected to the external broker");
                }
                connected_before = true;
                let began = Instant::now();
                let end = serve(
                    conn,
                    &cfg,
                    &input,
                    &health,
                    &mut acks,
                    number,
                    stopping.clone(),
                    finish.clone(),
                )
                .await;
                // Acknowledgements made from now on name messages of the broken connection:
                // the broker resends those when the session resumes.
                epoch.fetch_add(1, Ordering::AcqRel);
                if began.elapsed() >= STABLE_AFTER {
                    backoff = MIN_BACKOFF;
                }
                end
            }
            Err(e) => Err(e),
        };
        match end {
            Ok(()) => return,
            Err(e) => {
                if *finish.borrow() {
                    return;
                }
                if matches!(e, SessionError::Disconnected(SESSION_TAKEN_OVER)) {
                    health.problem(
                        Problem::Broker,
                        "another client took over this node's session: is a second node using the same broker.client_id?",
                    );
                    warn!(retry_in = ?MAX_BACKOFF, "another client took over this node's session on the external broker");
                    backoff = MAX_BACKOFF;
                } else {
                    health.problem(Problem::Broker, &format!("external broker: {e}"));
                    warn!(error = %e, retry_in = ?backoff, "external broker connection failed");
                }
                let pause = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = raised(&mut finish) => return,
                }
            }
        }
    }
}

/// What an MQTT 5 CONNACK's refusal code means to the one who must fix it.
fn refusal(code: u8) -> &'static str {
    match code {
        0x84 => "unsupported protocol version (the broker does not speak MQTT 5)",
        0x85 => "client identifier not valid (broker.client_id)",
        0x86 => "bad user name or password (broker.external_username, external_password_file)",
        0x87 => "not authorized (check the account and its password: broker.external_username, external_password_file)",
        0x88 => "server unavailable",
        0x89 => "server busy",
        0x8A => "banned",
        0x8C => "bad authentication method",
        _ => "refused",
    }
}

/// A connection whose CONNACK accepted it.
struct Connection {
    rd: ReadHalf,
    wr: WriteHalf,
    /// Whatever came after the CONNACK in the same reads: the broker sends a resumed session's
    /// messages straight after it.
    leftover: BytesMut,
    session_present: bool,
    /// The broker's Server Keep Alive, which MQTT 5 says the client must use instead of its own.
    keep_alive: Option<Duration>,
}

/// TCP, TLS when configured, CONNECT, CONNACK.
async fn connect(cfg: &SessionConfig) -> Result<Connection, SessionError> {
    let tcp = TcpStream::connect((cfg.host.as_str(), cfg.port)).await?;
    let _ = tcp.set_nodelay(true);
    match &cfg.tls {
        None => {
            let mut tcp = tcp;
            let (leftover, ack) = handshake(&mut tcp, cfg).await?;
            let (rd, wr) = tcp.into_split();
            Ok(Connection::new(Box::new(rd), Box::new(wr), leftover, ack))
        }
        Some((connector, name)) => {
            let mut tls = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(SessionError::Tls)?;
            let (leftover, ack) = handshake(&mut tls, cfg).await?;
            let (rd, wr) = tokio::io::split(tls);
            Ok(Connection::new(Box::new(rd), Box::new(wr), leftover, ack))
        }
    }
}

impl Connection {
    fn new(rd: ReadHalf, wr: WriteHalf, leftover: BytesMut, ack: ConnAck) -> Connection {
        Connection {
            rd,
            wr,
            leftover,
            session_present: ack.session_present,
            keep_alive: ack.server_keep_alive.map(|s| Duration::from_secs(s.into())),
        }
    }
}

/// CONNECT and its CONNACK: what came after the CONNACK, and the CONNACK.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    cfg: &SessionConfig,
) -> Result<(BytesMut, ConnAck), SessionError> {
    let props = ConnectProperties {
        // The session outlives any disconnection: the broker keeps what is not acknowledged.
        session_expiry_interval: Some(u32::MAX),
        receive_maximum: Some(cfg.window),
        max_packet_size: Some(cfg.max_packet.min(u32::MAX as usize) as u32),
        topic_alias_max: Some(0),
        request_response_info: None,
        request_problem_info: None,
        user_properties: Vec::new(),
        authentication_method: None,
        authentication_data: None,
    };
    let connect = Connect {
        keep_alive: cfg.keep_alive.as_secs().min(u64::from(u16::MAX)) as u16,
        client_id: cfg.client_id.clone(),
        clean_session: false,
    };
    let login = cfg.login.as_ref().map(|(username, password)| Login {
        username: username.clone(),
        password: password.0.clone(),
    });
    let mut out = BytesMut::new();
    Proto::V5(V5).write(
        Packet::Connect(connect, Some(props), None, None, login),
        &mut out,
    )?;
    stream.write_all(&out).await?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if let Some(f) = frame(&buf)? {
            if f.packet_type() != 2 {
                return Err(SessionError::Unexpected("a packet other than CONNACK"));
            }
            if f.len() > MAX_CONNACK {
                return Err(WireError::TooLarge {
                    kind: "CONNACK",
                    size: f.len(),
                    limit: MAX_CONNACK,
                }
                .into());
            }
            if buf.len() >= f.len() {
                let packet = buf.split_to(f.len());
                let ack = parse_connack(&packet[f.header_len..])?;
                if ack.reason != 0 {
                    return Err(SessionError::Refused(ack.reason));
                }
                return Ok((buf, ack));
            }
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(SessionError::Closed);
        }
    }
}

/// What a CONNACK says that this client acts on.
#[derive(Debug, PartialEq, Eq)]
struct ConnAck {
    session_present: bool,
    reason: u8,
    server_keep_alive: Option<u16>,
}

/// Reads a CONNACK's variable header (MQTT 5 §3.2.2): acknowledge flags, reason code, then
/// properties. Hand-written because rumqttd's codec, a broker's, reads no CONNACKs.
fn parse_connack(mut b: &[u8]) -> Result<ConnAck, SessionError> {
    let malformed = || SessionError::Unexpected("a malformed CONNACK");
    if b.len() < 2 {
        return Err(malformed());
    }
    let session_present = b[0] & 1 == 1;
    let reason = b[1];
    b = &b[2..];
    let mut server_keep_alive = None;
    // A refusal may come without properties.
    if b.is_empty() {
        return Ok(ConnAck {
            session_present,
            reason,
            server_keep_alive,
        });
    }
    let len = variable_int(&mut b).ok_or_else(malformed)?;
    if len > b.len() {
        return Err(malformed());
    }
    let mut props = &b[..len];
    while let Some((&id, rest)) = props.split_first() {
        props = rest;
        let skip = match id {
            // Server Keep Alive.
            0x13 => {
                let v = props.get(..2).ok_or_else(malformed)?;
                server_keep_alive = Some(u16::from_be_bytes([v[0], v[1]]));
                2
            }
            // Bytes: Maximum QoS, Retain / Wildcard / Subscription Id / Shared Available.
            0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            // Two-byte integers: Receive Maximum, Topic Alias Maximum.
            0x21 | 0x22 => 2,
            // Four-byte integers: Session Expiry Interval, Maximum Packet Size.
            0x11 | 0x27 => 4,
            // Strings and binary data: Assigned Client Identifier, Reason String, Response
            // Information, Server Reference, Authentication Method and Data.
            0x12 | 0x1F | 0x1A | 0x1C | 0x15 | 0x16 => 2 + prefixed_len(props)?,
            // User Property: a string pair.
            0x26 => {
                let k = 2 + prefixed_len(props)?;
                let v = props.get(k..).map(prefixed_len).ok_or_else(malformed)??;
                k + 2 + v
            }
            _ => {
                return Err(SessionError::Unexpected(
                    "a CONNACK with an unknown property",
                ))
            }
        };
        props = props.get(skip..).ok_or_else(malformed)?;
    }
    Ok(ConnAck {
        session_present,
        reason,
        server_keep_alive,
    })
}

/// The length in front of an MQTT string or binary field.
fn prefixed_len(b: &[u8]) -> Result<usize, SessionError> {
    match b.get(..2) {
        Some(v) => Ok(usize::from(u16::from_be_bytes([v[0], v[1]]))),
        None => Err(SessionError::Unexpected("a malformed CONNACK")),
    }
}

/// An MQTT variable byte integer, taken off the front of `b`.
fn variable_int(b: &mut &[u8]) -> Option<usize> {
    let mut value = 0usize;
    for i in 0..4 {
        let byte = *b.get(i)?;
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *b = &b[i + 1..];
            return Some(value);
        }
    }
    None
}

/// One connection: subscribes, then reads and writes until it breaks (`Err`) or the session
/// finishes (`Ok`, once the writer has sent the last acknowledgements and a DISCONNECT).
#[allow(clippy::too_many_arguments)]
async fn serve(
    conn: Connection,
    cfg: &SessionConfig,
    input: &InputSlot,
    health: &Health,
    acks: &mut mpsc::UnboundedReceiver<Vec<AckToken>>,
    number: u64,
    stopping: watch::Receiver<bool>,
    finish: watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let keep_alive = conn.keep_alive.unwrap_or(cfg.keep_alive);
    let (rd, wr) = (conn.rd, conn.wr);
    let mut writer = Writer {
        wr,
        proto: Proto::V5(V5),
        out: BytesMut::new(),
        number,
        last_out: Instant::now(),
    };
    let filters = cfg
        .filters
        .iter()
        .map(|f| Filter {
            path: f.clone(),
            qos: QoS::AtLeastOnce,
            nolocal: false,
            preserve_retain: false,
            // Retained messages once, when a filter is new to the session: not again (stored
            // again) on every reconnect.
            retain_forward_rule: RetainForwardRule::OnNewSubscribe,
        })
        .collect::<Vec<_>>();
    if filters.is_empty() {
        health.clear(Problem::Broker);
    } else {
        writer.packet(Packet::Subscribe(Subscribe { pkid: 1, filters }, None))?;
        writer.flush().await?;
    }
    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let reader = Reader {
        rd,
        buf: conn.leftover,
        proto: Proto::V5(V5),
        max_packet: cfg.max_packet,
        keep_alive,
        number,
        input,
        health,
        filters: cfg.filters.len(),
        suback_due: (!cfg.filters.is_empty()).then(|| Instant::now() + CONNECT_TIMEOUT),
        qos2_pending: HashSet::new(),
        control: control_tx,
        intake: health.intake(),
        stopping,
    };
    let reading = reader.run();
    let writing = writer.run(acks, control_rx, keep_alive, finish);
    tokio::pin!(reading, writing);
    tokio::select! {
        r = &mut reading => r,
        w = &mut writing => w,
    }
}

/// The reading half: parses what the broker sends and hands publishes to ingest.
struct Reader<'a> {
    rd: ReadHalf,
    buf: BytesMut,
    proto: Proto,
    max_packet: usize,
    keep_alive: Duration,
    number: u64,
    input: &'a InputSlot,
    health: &'a Health,
    /// How many filters the SUBSCRIBE named (the SUBACK must answer each).
    filters: usize,
    suback_due: Option<Instant>,
    /// QoS 2 packet ids received and not yet released (PUBREL): a resent one is not stored again.
    qos2_pending: HashSet<u16>,
    control: mpsc::Sender<Packet>,
    intake: watch::Receiver<bool>,
    stopping: watch::Receiver<bool>,
}

impl Reader<'_> {
    /// Returns only with the error that ended the connection.
    async fn run(mut self) -> Result<(), SessionError> {
        // The broker must be heard from within 1.5 keep-alive periods while we read (it
        // answers the writer's pings); the clock starts over after each wait for ingest, since
        // nothing is read meanwhile.
        let mut last_in = Instant::now();
        loop {
            while let Some(f) = frame(&self.buf)? {
                if f.len() > self.max_packet {
                    // Larger than the Maximum Packet Size this client announced.
                    return Err(WireError::TooLarge {
                        kind: "packet",
                        size: f.len(),
                        limit: self.max_packet,
                    }
                    .into());
                }
                if self.buf.len() < f.len() {
                    self.buf.reserve(f.len() - self.buf.len());
                    break;
                }
                let head = if f.is_publish() {
                    publish_head(&self.buf, &f)?
                } else {
                    None
                };
                let packet = self.proto.read(&mut self.buf, self.max_packet)?;
                self.packet(packet, head).await?;
                last_in = Instant::now();
            }
            let silent_until = last_in + self.keep_alive + self.keep_alive / 2;
            let due = match self.suback_due {
                Some(at) => at.min(silent_until),
                None => silent_until,
            };
            match tokio::time::timeout_at(due, self.rd.read_buf(&mut self.buf)).await {
                Ok(n) => {
                    if n? == 0 {
                        return Err(SessionError::Closed);
                    }
                    last_in = Instant::now();
                }
                Err(_) => return Err(SessionError::Timeout),
            }
        }
    }

    async fn packet(
        &mut self,
        packet: Packet,
        head: Option<crate::transport::wire::PublishHead>,
    ) -> Result<(), SessionError> {
        match packet {
            Packet::Publish(p, _) => {
                let Some(head) = head else {
                    return Err(SessionError::Unexpected("a malformed PUBLISH"));
                };
                if head.qos == 2 && !self.qos2_pending.insert(head.packet_id) {
                    return Ok(()); // A resend: its PUBREC comes when the first is stored.
                }
                let ack =
                    (head.qos > 0).then(|| AckToken::new(self.number, head.packet_id, head.qos));
                // Copies, so that a queued message holds its own bytes, not the read buffer's.
                let received = Received::new(
                    Bytes::copy_from_slice(&head.topic),
                    Bytes::copy_from_slice(&p.payload),
                    ack,
                );
                self.hand_over(received).await;
            }
            Packet::PubRel(rel, _) => {
                let reason = if self.qos2_pending.remove(&rel.pkid) {
                    PubCompReason::Success
                } else {
                    PubCompReason::PacketIdentifierNotFound
                };
                let comp = PubComp {
                    pkid: rel.pkid,
                    reason,
                };
                if self
                    .control
                    .send(Packet::PubComp(comp, None))
                    .await
                    .is_err()
                {
                    return Err(SessionError::Closed);
                }
            }
            Packet::SubAck(ack, _) => self.suback(ack)?,
            Packet::PingResp(_) => {}
            Packet::Disconnect(Disconnect { reason_code }, _) => {
                return Err(SessionError::Disconnected(reason_code));
            }
            _ => return Err(SessionError::Unexpected("a packet a server does not send")),
        }
        Ok(())
    }

    /// The session is up once every filter is granted at QoS 1 or 2: at QoS 0 the broker
    /// would neither keep nor resend its messages.
    fn suback(&mut self, ack: SubAck) -> Result<(), SessionError> {
        if ack.pkid != 1 || self.suback_due.is_none() {
            return Err(SessionError::Unexpected(
                "a SUBACK for no SUBSCRIBE of this client",
            ));
        }
        if ack.return_codes.len() != self.filters {
            return Err(SessionError::Unexpected(
                "a SUBACK that does not answer every filter",
            ));
        }
        self.suback_due = None;
        let granted = ack.return_codes.iter().all(|c| {
            matches!(
                c,
                SubscribeReasonCode::QoS1
                    | SubscribeReasonCode::QoS2
                    | SubscribeReasonCode::Success(QoS::AtLeastOnce | QoS::ExactlyOnce)
            )
        });
        if granted {
            self.health.clear(Problem::Broker);
        } else {
            self.health.problem(
                Problem::Broker,
                "the external broker refused a subscription or granted it below QoS 1 (check its ACL and maximum QoS for this client)",
            );
        }
        Ok(())
    }

    /// Hands a message to ingest once intake is open and there is room; nothing more is read
    /// meanwhile (the broker keeps what it has not sent). Once the service stops accepting the
    /// message is left unacknowledged: the broker sends it again next session.
    async fn hand_over(&mut self, received: Received) {
        let sender = self.input.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(sender) = sender else {
            return;
        };
        let intake = &mut self.intake;
        let send = async {
            let _ = intake.wait_for(|open| *open).await;
            // Ingest gone: the service is failing, and the message stays unacknowledged.
            let _ = sender.send(received).await;
        };
        tokio::select! {
            // A stop wins over room that came at the same time.
            biased;
            // Drops this clone of ingest's input, so ingest can end.
            _ = raised(&mut self.stopping) => {}
            _ = send => {}
        }
    }
}

/// The writing half: acknowledgements (a commit's worth, or more, in one write), PUBCOMPs,
/// pings, and the DISCONNECT of a finished session.
struct Writer {
    wr: WriteHalf,
    proto: Proto,
    out: BytesMut,
    number: u64,
    last_out: Instant,
}

impl Writer {
    async fn run(
        mut self,
        acks: &mut mpsc::UnboundedReceiver<Vec<AckToken>>,
        mut control: mpsc::Receiver<Packet>,
        keep_alive: Duration,
        mut finish: watch::Receiver<bool>,
    ) -> Result<(), SessionError> {
        let mut acks_open = true;
        loop {
            tokio::select! {
                biased;
                _ = raised(&mut finish) => {
                    // Commit has ended: every acknowledgement is queued. Out with them, then
                    // DISCONNECT (the session stays, with its expiry).
                    self.queued(acks, &mut control)?;
                    let d = Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection };
                    self.packet(Packet::Disconnect(d, None))?;
                    self.flush().await?;
                    let _ = tokio::time::timeout(WRITE_TIMEOUT, self.wr.shutdown()).await;
                    return Ok(());
                }
                a = acks.recv(), if acks_open => match a {
                    Some(a) => {
                        self.acks(a)?;
                        self.queued(acks, &mut control)?;
                        self.flush().await?;
                    }
                    // Commit has ended; `finish` follows.
                    None => acks_open = false,
                },
                p = control.recv() => match p {
                    Some(p) => {
                        self.packet(p)?;
                        self.queued(acks, &mut control)?;
                        self.flush().await?;
                    }
                    // The reader has ended, and with it this connection.
                    None => return Err(SessionError::Closed),
                },
                _ = tokio::time::sleep_until(self.last_out + keep_alive / 2) => {
                    self.packet(Packet::PingReq(PingReq))?;
                    self.flush().await?;
                }
            }
        }
    }

    fn packet(&mut self, p: Packet) -> Result<(), SessionError> {
        Ok(self.proto.write(p, &mut self.out)?)
    }

    /// Encodes the acknowledgements of this connection (older ones are dropped: their messages
    /// come again).
    fn acks(&mut self, tokens: Vec<AckToken>) -> Result<(), SessionError> {
        let number = self.number;
        for t in tokens.into_iter().filter(|t| t.session() == number) {
            let p = if t.qos() == 2 {
                let reason = PubRecReason::Success;
                Packet::PubRec(
                    PubRec {
                        pkid: t.packet_id(),
                        reason,
                    },
                    None,
                )
            } else {
                let reason = PubAckReason::Success;
                Packet::PubAck(
                    PubAck {
                        pkid: t.packet_id(),
                        reason,
                    },
                    None,
                )
            };
            self.packet(p)?;
        }
        Ok(())
    }

    /// Encodes everything queued behind what is already encoded, for one write.
    fn queued(
        &mut self,
        acks: &mut mpsc::UnboundedReceiver<Vec<AckToken>>,
        control: &mut mpsc::Receiver<Packet>,
    ) -> Result<(), SessionError> {
        while let Ok(a) = acks.try_recv() {
            self.acks(a)?;
        }
        while let Ok(p) = control.try_recv() {
            self.packet(p)?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SessionError> {
        if self.out.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(WRITE_TIMEOUT, self.wr.write_all(&self.out)).await {
            Ok(r) => r?,
            Err(_) => return Err(SessionError::WriteTimeout),
        }
        self.out.clear();
        self.last_out = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::model::metrics::Metrics;
    use crate::pipeline::input::{self, InputQueue};
    use std::sync::Mutex;
    use tokio::net::TcpListener;

    /// One side of a scripted broker: the bytes of MQTT 5 server packets, as §3 lays them out.
    fn connack(session_present: bool) -> Vec<u8> {
        vec![0x20, 3, u8::from(session_present), 0, 0]
    }

    fn suback(pkid: u16, codes: &[u8]) -> Vec<u8> {
        let mut p = vec![0x90, (3 + codes.len()) as u8];
        p.extend_from_slice(&pkid.to_be_bytes());
        p.push(0);
        p.extend_from_slice(codes);
        p
    }

    fn publish_qos1(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&pkid.to_be_bytes());
        body.push(0);
        body.extend_from_slice(payload);
        let mut p = vec![0x32, body.len() as u8];
        p.extend(body);
        p
    }

    /// Reads one packet the client sent: (first byte, body).
    async fn client_packet(s: &mut TcpStream, buf: &mut BytesMut) -> (u8, Vec<u8>) {
        loop {
            if let Some(f) = frame(buf).unwrap() {
                if buf.len() >= f.len() {
                    let p = buf.split_to(f.len());
                    return (f.byte1, p[f.header_len..].to_vec());
                }
            }
            assert!(s.read_buf(buf).await.unwrap() > 0, "client closed");
        }
    }

    /// Accepts the client, reads its CONNECT and SUBSCRIBE, writes `after_connect` in one write
    /// with the CONNACK, then the SUBACK granting QoS `grant`.
    async fn accept(l: &TcpListener, after_connect: &[u8], grant: u8) -> (TcpStream, BytesMut) {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = BytesMut::new();
        assert_eq!(client_packet(&mut s, &mut buf).await.0 >> 4, 1, "CONNECT");
        let mut first = connack(true);
        first.extend_from_slice(after_connect);
        s.write_all(&first).await.unwrap();
        assert_eq!(client_packet(&mut s, &mut buf).await.0 >> 4, 8, "SUBSCRIBE");
        s.write_all(&suback(1, &[grant])).await.unwrap();
        (s, buf)
    }

    struct Harness {
        listener: TcpListener,
        input: InputSlot,
        queue: InputQueue,
        health: Arc<Health>,
        acks: mpsc::UnboundedSender<Vec<AckToken>>,
        stopping: watch::Sender<bool>,
        finish: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn harness(queue_bytes: usize, keep_alive: Duration) -> Harness {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg = SessionConfig {
            host: "127.0.0.1".into(),
            port: listener.local_addr().unwrap().port(),
            client_id: "edge-test".into(),
            filters: vec!["ward/#".into()],
            window: 100,
            max_packet: 1 << 20,
            keep_alive,
            login: None,
            tls: None,
        };
        let (tx, queue) = input::queue(queue_bytes);
        let input: InputSlot = Arc::new(Mutex::new(Some(tx)));
        let health = Health::new(Metrics::new());
        health.running();
        let (acks, ack_rx) = mpsc::unbounded_channel();
        let (stopping, stopping_rx) = watch::channel(false);
        let (finish, finish_rx) = watch::channel(false);
        let task = tokio::spawn(run(
            cfg,
            input.clone(),
            health.clone(),
            ack_rx,
            Arc::new(AtomicU64::new(0)),
            stopping_rx,
            finish_rx,
        ));
        Harness {
            listener,
            input,
            queue,
            health,
            acks,
            stopping,
            finish,
            task,
        }
    }

    fn next(queue: &InputQueue) -> Result<Option<input::Incoming>, input::InputClosed> {
        queue.recv_deadline(std::time::Instant::now() + Duration::from_secs(10))
    }

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "waited 10 s for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn messages_in_the_connacks_read_are_taken_and_acknowledged_once_stored() {
        let h = harness(1 << 20, Duration::from_secs(15)).await;
        // A resumed session: the broker sends its unacknowledged message straight after the
        // CONNACK, in the same segment.
        let (mut s, mut buf) = accept(
            &h.listener,
            &publish_qos1("ward/1/bed/2/vitals", 7, b"{}"),
            1,
        )
        .await;
        let m = tokio::task::block_in_place(|| next(&h.queue))
            .unwrap()
            .unwrap();
        assert_eq!(&m.topic[..], b"ward/1/bed/2/vitals");
        assert_eq!(&m.payload[..], b"{}");
        wait_for("the SUBACK to clear the problem", || {
            !h.health.has(Problem::Broker)
        })
        .await;
        // Stored: the PUBACK goes out.
        h.acks.send(vec![m.ack.unwrap()]).unwrap();
        let (b1, body) = client_packet(&mut s, &mut buf).await;
        assert_eq!((b1 >> 4, &body[..2]), (4, &7u16.to_be_bytes()[..]));
        h.finish.send_replace(true);
        h.task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscription_granted_at_qos0_is_a_broker_problem() {
        let h = harness(1 << 20, Duration::from_secs(15)).await;
        let (_s, _) = accept(&h.listener, &[], 0).await;
        wait_for("the problem", || {
            h.health
                .report()
                .problems
                .get(&Problem::Broker)
                .is_some_and(|r| r.contains("below QoS 1"))
        })
        .await;
        h.finish.send_replace(true);
        h.task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_taken_over_says_so() {
        let h = harness(1 << 20, Duration::from_secs(15)).await;
        let (mut s, _) = accept(&h.listener, &[], 1).await;
        s.write_all(&[0xE0, 2, 0x8E, 0]).await.unwrap();
        wait_for("the problem", || {
            h.health
                .report()
                .problems
                .get(&Problem::Broker)
                .is_some_and(|r| r.contains("client_id"))
        })
        .await;
        h.finish.send_replace(true);
        h.task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_broker_is_noticed_within_one_and_a_half_keep_alives() {
        let h = harness(1 << 20, Duration::from_secs(1)).await;
        let (_s, _) = accept(&h.listener, &[], 1).await;
        wait_for("the SUBACK", || !h.health.has(Problem::Broker)).await;
        // Pings go unanswered from here.
        wait_for("the timeout", || {
            h.health
                .report()
                .problems
                .get(&Problem::Broker)
                .is_some_and(|r| r.contains("in time"))
        })
        .await;
        h.finish.send_replace(true);
        h.task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledgements_of_a_broken_connection_are_never_written_on_the_next() {
        let h = harness(1 << 20, Duration::from_secs(15)).await;
        let (s, _) = accept(&h.listener, &publish_qos1("ward/1", 7, b"a"), 1).await;
        let old = tokio::task::block_in_place(|| next(&h.queue))
            .unwrap()
            .unwrap();
        drop(s);
        let (mut s, mut buf) = accept(&h.listener, &publish_qos1("ward/1", 9, b"b"), 1).await;
        let new = tokio::task::block_in_place(|| next(&h.queue))
            .unwrap()
            .unwrap();
        // Packet id 7 means nothing on this connection: only 9 is acknowledged.
        h.acks.send(vec![old.ack.unwrap()]).unwrap();
        h.acks.send(vec![new.ack.unwrap()]).unwrap();
        let (b1, body) = client_packet(&mut s, &mut buf).await;
        assert_eq!((b1 >> 4, &body[..2]), (4, &9u16.to_be_bytes()[..]));
        h.finish.send_replace(true);
        h.task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_ends_ingests_input_while_the_session_waits_for_room() {
        // Room for one message: the second waits in the session.
        let h = harness(200, Duration::from_secs(15)).await;
        let mut backlog = publish_qos1("ward/1", 1, &[0; 50]);
        backlog.extend(publish_qos1("ward/1", 2, &[0; 50]));
        let (_s, _) = accept(&h.listener, &backlog, 1).await;
        wait_for("the first message", || h.queue.queued_bytes() > 0).await;
        // What ExternalBroker::stop_accepting does.
        h.input.lock().unwrap().take();
        h.stopping.send_replace(true);
        let first = tokio::task::block_in_place(|| next(&h.queue))
            .unwrap()
            .unwrap();
        assert_eq!(first.ack.unwrap().packet_id(), 1);
        drop(first);
        // The waiting message is left to the broker, and ingest's input ends.
        assert!(tokio::task::block_in_place(|| next(&h.queue)).is_err());
        h.finish.send_replace(true);
        h.task.await.unwrap();
    }

    #[test]
    fn connacks_are_read_as_mqtt5_lays_them_out() {
        // Session present, success, properties: Receive Maximum 20, Server Keep Alive 30,
        // Assigned Client Identifier "ab", User Property ("k", "v"), Maximum QoS 1.
        let body = [
            1, 0, 18, 0x21, 0, 20, 0x13, 0, 30, 0x12, 0, 2, b'a', b'b', 0x26, 0, 1, b'k', 0, 1,
            b'v', 0x24, 1,
        ];
        assert_eq!(
            parse_connack(&body).unwrap(),
            ConnAck {
                session_present: true,
                reason: 0,
                server_keep_alive: Some(30)
            }
        );
        // A refusal (0x87 Not authorized) with no properties at all.
        let refused = parse_connack(&[0, 0x87]).unwrap();
        assert_eq!((refused.session_present, refused.reason), (false, 0x87));
        // Empty properties.
        assert_eq!(parse_connack(&[0, 0, 0]).unwrap().server_keep_alive, None);
    }

    #[test]
    fn malformed_connacks_are_errors_not_panics() {
        for body in [
            &[][..],
            &[0],
            &[0, 0, 5, 0x13, 0],    // properties longer than the packet
            &[0, 0, 2, 0x13, 0],    // a property cut short
            &[0, 0, 3, 0x12, 0, 9], // a string longer than its properties
            &[0, 0, 1, 0x7f],       // an unknown property
            &[0, 0, 0x80, 0x80, 0x80, 0x80, 0x01], // a length of five bytes
        ] {
            assert!(parse_connack(body).is_err(), "{body:?}");
        }
    }
}
