//! The receiving MQTT 5 session on the external broker, spoken over rumqttd's v5 codec.
//!
//! Hand-written rather than taken from rumqttc, whose event loop writes and flushes each
//! acknowledgement on its own: one TCP segment, and one read for the broker, per message. On the
//! 2-core reference machine that alone cut mosquitto's throughput by a quarter (62,000 → 47,000
//! messages/s in `cargo bench --bench e2e_load` with `IOMT_ACK_BATCH=1`), below what a ward's
//! broker must carry. Here a commit's acknowledgements go out in one write. The reading and the
//! writing halves also work apart: reading stops while ingest has no room (the broker keeps the
//! messages), acknowledgements and pings still go out.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    Connect, ConnectProperties, Disconnect, DisconnectReasonCode, Filter, Packet, PingReq, PubAck,
    PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, QoS, RetainForwardRule, Subscribe,
    SubscribeReasonCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::pipeline::health::{Health, Problem};
use crate::pipeline::input::{InputSender, Received};
use crate::pipeline::AckToken;
use crate::transport::raised;
use crate::transport::wire::{frame, publish_head, Proto, WireError};

/// Everything a session needs to connect.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub filters: Vec<String>,
    /// MQTT 5 Receive Maximum: messages the broker may send ahead of acknowledgements.
    pub window: u16,
    pub max_packet: usize,
    pub keep_alive: Duration,
}

/// How long connecting (TCP, then CONNACK, then SUBACK) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("the broker refused the connection (reason code {0:#04x})")]
    Refused(u8),
    #[error("the broker did not answer in time")]
    Timeout,
    #[error("the broker sent {0}")]
    Unexpected(&'static str),
    #[error("the broker disconnected: {0:?}")]
    Disconnected(DisconnectReasonCode),
    #[error("the broker closed the connection")]
    Closed,
}

/// Runs the session until `finish`: connects, subscribes, hands messages to ingest (until
/// `stopping`), writes the acknowledgements it gets, and reconnects with back-off when the
/// connection breaks. `epoch` numbers the connections: acknowledgements carry the number of the
/// connection their message came on, and only the current connection's are written.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    cfg: SessionConfig,
    input: InputSender,
    health: Arc<Health>,
    mut acks: mpsc::UnboundedReceiver<Vec<AckToken>>,
    epoch: Arc<AtomicU64>,
    mut stopping: watch::Receiver<bool>,
    mut finish: watch::Receiver<bool>,
) {
    let mut input = Some(input);
    let mut backoff = Duration::from_millis(100);
    loop {
        if *finish.borrow() {
            return;
        }
        if *stopping.borrow() {
            // Ingest drains once its last sender is gone.
            input = None;
        }
        let connected = tokio::select! {
            c = tokio::time::timeout(CONNECT_TIMEOUT, connect(&cfg)) => c,
            _ = raised(&mut stopping), if input.is_some() => continue,
            _ = raised(&mut finish) => return,
        };
        let failed = match connected {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SessionError::Timeout),
        };
        let (stream, session_present) = match failed {
            Ok(c) => c,
            Err(e) => {
                fail(&health, &e, backoff);
                if pause(backoff, &mut finish, &mut stopping, input.is_some()).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let number = epoch.fetch_add(1, Ordering::AcqRel) + 1;
        info!(session_present, "connected to the external broker");
        backoff = Duration::from_millis(100);
        let end = serve(
            stream,
            &cfg,
            &mut input,
            &health,
            &mut acks,
            number,
            stopping.clone(),
            finish.clone(),
        )
        .await;
        // Acknowledgements made from now on name messages of the broken connection: the
        // broker resends those when the session resumes.
        epoch.fetch_add(1, Ordering::AcqRel);
        match end {
            Ok(()) => return,
            Err(e) => {
                if *finish.borrow() {
                    return;
                }
                fail(&health, &e, backoff);
                if pause(backoff, &mut finish, &mut stopping, input.is_some()).await {
                    return;
                }
            }
        }
    }
}

fn fail(health: &Health, e: &SessionError, retry_in: Duration) {
    health.problem(Problem::Broker, &format!("external broker: {e}"));
    warn!(error = %e, ?retry_in, "external broker connection failed");
}

/// Sleeps, unless `finish` comes first (then true) or, while ingest still has its input, a
/// stop (which the caller acts on at once).
async fn pause(
    d: Duration,
    finish: &mut watch::Receiver<bool>,
    stopping: &mut watch::Receiver<bool>,
    accepting: bool,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = raised(stopping), if accepting => false,
        _ = raised(finish) => true,
    }
}

/// TCP, CONNECT, CONNACK. Returns the stream and whether the broker resumed the session.
async fn connect(cfg: &SessionConfig) -> Result<(TcpStream, bool), SessionError> {
    let mut stream = TcpStream::connect((cfg.host.as_str(), cfg.port)).await?;
    let _ = stream.set_nodelay(true);
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
    let proto = Proto::V5(V5);
    let mut out = BytesMut::new();
    proto.write(
        Packet::Connect(connect, Some(props), None, None, None),
        &mut out,
    )?;
    stream.write_all(&out).await?;
    // rumqttd's codec, a broker's, does not read CONNACKs: its two leading bytes are all this
    // needs (MQTT 5 §3.2: acknowledge flags, reason code, then properties).
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if let Some(f) = frame(&buf)? {
            if buf.len() >= f.len() {
                if f.packet_type() != 2 || f.remaining < 2 {
                    return Err(SessionError::Unexpected("a packet other than CONNACK"));
                }
                let session_present = buf[f.header_len] & 1 == 1;
                let reason = buf[f.header_len + 1];
                if reason != 0 {
                    return Err(SessionError::Refused(reason));
                }
                return Ok((stream, session_present));
            }
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(SessionError::Closed);
        }
    }
}

/// What the reader asks the writer to send.
enum Control {
    Packet(Box<Packet>),
}

/// One connection: subscribes, then reads and writes until it breaks (`Err`) or the session
/// finishes (`Ok`).
#[allow(clippy::too_many_arguments)]
async fn serve(
    stream: TcpStream,
    cfg: &SessionConfig,
    input: &mut Option<InputSender>,
    health: &Health,
    acks: &mut mpsc::UnboundedReceiver<Vec<AckToken>>,
    number: u64,
    mut stopping: watch::Receiver<bool>,
    mut finish: watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let (mut rd, mut wr) = stream.into_split();
    let proto = Proto::V5(V5);
    let mut out = BytesMut::new();
    let filters = cfg
        .filters
        .iter()
        .map(|f| Filter {
            path: f.clone(),
            qos: QoS::AtLeastOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        })
        .collect::<Vec<_>>();
    let subscribed = !filters.is_empty();
    if subscribed {
        proto.write(
            Packet::Subscribe(Subscribe { pkid: 1, filters }, None),
            &mut out,
        )?;
        wr.write_all(&out).await?;
        out.clear();
    } else {
        health.clear(Problem::Broker);
    }
    let (control_tx, mut control_rx) = mpsc::unbounded_channel::<Control>();
    let mut intake = health.intake();
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut reader_proto = Proto::V5(V5);
    let mut qos2_pending: HashSet<u16> = HashSet::new();
    let mut last_in = Instant::now();
    let mut last_out = Instant::now();
    let keep_alive = cfg.keep_alive;
    let mut suback_due = subscribed.then(|| Instant::now() + CONNECT_TIMEOUT);
    let mut acks_open = true;
    loop {
        // Parse everything buffered; hand publishes to ingest (waiting for room, which stops
        // this loop from reading on, but not the writing below: see `hand_over`).
        while let Some(f) = frame(&buf)? {
            if buf.len() < f.len() {
                buf.reserve(f.len() - buf.len());
                break;
            }
            let head = if f.is_publish() {
                publish_head(&buf, &f)?
            } else {
                None
            };
            let packet = reader_proto.read(&mut buf, cfg.max_packet)?;
            last_in = Instant::now();
            match packet {
                Packet::Publish(p, _) => {
                    let Some(head) = head else {
                        return Err(SessionError::Unexpected("a malformed PUBLISH"));
                    };
                    if head.qos == 2 && !qos2_pending.insert(head.packet_id) {
                        continue; // A duplicate: its PUBREC comes when the first is stored.
                    }
                    let ack =
                        (head.qos > 0).then(|| AckToken::new(number, head.packet_id, head.qos));
                    let received = Received::new(
                        Bytes::copy_from_slice(&head.topic),
                        Bytes::copy_from_slice(&p.payload),
                        ack,
                    );
                    if *stopping.borrow() {
                        *input = None;
                    }
                    if input.is_some() {
                        let handed = hand_over(
                            received,
                            input,
                            &mut intake,
                            &mut stopping,
                            &mut finish,
                            acks,
                            &mut control_rx,
                            &proto,
                            &mut wr,
                            &mut out,
                            number,
                            &mut last_out,
                        )
                        .await?;
                        if !handed {
                            *input = None;
                        }
                    }
                    // Stopping: left unacknowledged, resent next session.
                }
                Packet::PubRel(rel, _) => {
                    let reason = if qos2_pending.remove(&rel.pkid) {
                        PubCompReason::Success
                    } else {
                        PubCompReason::PacketIdentifierNotFound
                    };
                    let _ = control_tx.send(Control::Packet(Box::new(Packet::PubComp(
                        PubComp {
                            pkid: rel.pkid,
                            reason,
                        },
                        None,
                    ))));
                }
                Packet::SubAck(ack, _) => {
                    suback_due = None;
                    let refused = ack.return_codes.iter().any(|c| {
                        !matches!(
                            c,
                            SubscribeReasonCode::Success(_)
                                | SubscribeReasonCode::QoS0
                                | SubscribeReasonCode::QoS1
                                | SubscribeReasonCode::QoS2
                        )
                    });
                    if refused {
                        health.problem(
                            Problem::Broker,
                            "the external broker refused a subscription (check its ACL for this client)",
                        );
                    } else {
                        health.clear(Problem::Broker);
                    }
                }
                Packet::PingResp(_) => {}
                Packet::Disconnect(Disconnect { reason_code }, _) => {
                    return Err(SessionError::Disconnected(reason_code));
                }
                _ => return Err(SessionError::Unexpected("a packet a server does not send")),
            }
        }
        // The broker must be heard from within 1.5 keep-alive periods (it answers our pings).
        let silent_until = last_in + keep_alive + keep_alive / 2;
        let ping_at = last_out + keep_alive / 2;
        tokio::select! {
            n = rd.read_buf(&mut buf) => {
                if n? == 0 {
                    return Err(SessionError::Closed);
                }
            }
            a = acks.recv(), if acks_open => match a {
                Some(a) => {
                    write_acks(a, acks, &mut control_rx, &proto, &mut wr, &mut out, number).await?;
                    last_out = Instant::now();
                }
                // Commit has ended; `finish` follows.
                None => acks_open = false,
            },
            _ = raised(&mut stopping), if input.is_some() => *input = None,
            Some(Control::Packet(p)) = control_rx.recv() => {
                proto.write(*p, &mut out)?;
                wr.write_all(&out).await?;
                out.clear();
                last_out = Instant::now();
            }
            _ = tokio::time::sleep_until(ping_at) => {
                proto.write(Packet::PingReq(PingReq), &mut out)?;
                wr.write_all(&out).await?;
                out.clear();
                last_out = Instant::now();
            }
            _ = tokio::time::sleep_until(silent_until) => return Err(SessionError::Timeout),
            _ = sleep_until_opt(suback_due) => return Err(SessionError::Timeout),
            _ = raised(&mut finish) => {
                // Commit has ended: every acknowledgement is queued. Out with them, then
                // DISCONNECT (the session stays, with its expiry).
                while let Ok(a) = acks.try_recv() {
                    encode_acks(a, &proto, &mut out, number)?;
                }
                let d = Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection };
                proto.write(Packet::Disconnect(d, None), &mut out)?;
                wr.write_all(&out).await?;
                let _ = wr.shutdown().await;
                return Ok(());
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Encodes the acknowledgements of the current connection (older ones are dropped: their
/// messages come again).
fn encode_acks(
    acks: Vec<AckToken>,
    proto: &Proto,
    out: &mut BytesMut,
    number: u64,
) -> Result<(), SessionError> {
    for t in acks.into_iter().filter(|t| t.session() == number) {
        let p = if t.qos() == 2 {
            Packet::PubRec(
                PubRec {
                    pkid: t.packet_id(),
                    reason: PubRecReason::Success,
                },
                None,
            )
        } else {
            Packet::PubAck(
                PubAck {
                    pkid: t.packet_id(),
                    reason: PubAckReason::Success,
                },
                None,
            )
        };
        proto.write(p, out)?;
    }
    Ok(())
}

/// Writes `first` and every acknowledgement and control packet queued behind it, in one write.
async fn write_acks(
    first: Vec<AckToken>,
    acks: &mut mpsc::UnboundedReceiver<Vec<AckToken>>,
    control: &mut mpsc::UnboundedReceiver<Control>,
    proto: &Proto,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    out: &mut BytesMut,
    number: u64,
) -> Result<(), SessionError> {
    encode_acks(first, proto, out, number)?;
    while let Ok(a) = acks.try_recv() {
        encode_acks(a, proto, out, number)?;
    }
    while let Ok(Control::Packet(p)) = control.try_recv() {
        proto.write(*p, out)?;
    }
    if !out.is_empty() {
        wr.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// Hands a message to ingest once intake is open and there is room. Meanwhile nothing more is
/// read (the broker keeps what it has not sent), but acknowledgements keep going out: without
/// them the broker's window would close for good. False if ingest is gone or the service stops.
#[allow(clippy::too_many_arguments)]
async fn hand_over(
    received: Received,
    input: &Option<InputSender>,
    intake: &mut watch::Receiver<bool>,
    stopping: &mut watch::Receiver<bool>,
    finish: &mut watch::Receiver<bool>,
    acks: &mut mpsc::UnboundedReceiver<Vec<AckToken>>,
    control: &mut mpsc::UnboundedReceiver<Control>,
    proto: &Proto,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    out: &mut BytesMut,
    number: u64,
    last_out: &mut Instant,
) -> Result<bool, SessionError> {
    let Some(sender) = input.as_ref() else {
        return Ok(false);
    };
    let send = async {
        let _ = intake.wait_for(|open| *open).await;
        sender.send(received).await
    };
    tokio::pin!(send);
    let mut acks_open = true;
    loop {
        tokio::select! {
            r = &mut send => return Ok(r.is_ok()),
            _ = raised(stopping) => return Ok(false),
            _ = raised(finish) => return Ok(false),
            a = acks.recv(), if acks_open => match a {
                Some(a) => {
                    write_acks(a, acks, control, proto, wr, out, number).await?;
                    *last_out = Instant::now();
                }
                None => acks_open = false,
            },
        }
    }
}
