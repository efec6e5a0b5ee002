//! One client of the embedded broker, from CONNECT to close.
//!
//! A device's publish goes straight to ingest, carrying an ack token; its PUBACK (PUBREC for
//! QoS 2) is written only when the commit stage says its readings are stored. So every
//! acknowledgement a device holds stands for stored readings, whatever happens to this process
//! afterwards. A publish this broker refuses (an invalid topic name, a topic of this service's
//! own) takes the same path, with a reason code, so that acknowledgements keep the order of
//! their messages. Everything else (subscriptions, deliveries to subscribers and their acks,
//! retained messages) goes through rumqttd's router on the client's own link, and the router
//! also gets a device's publish when some subscription may want it or it is retained.
//!
//! Two tasks serve a connection: the reader parses what the client sends and may wait (for room
//! in ingest's queue, for intake to reopen, for its writer to catch up) without ever holding up
//! the writer, which sends acknowledgements, deliveries and pings back. A client that stops
//! reading is closed once a write has waited [`WRITE_TIMEOUT`].
//!
//! When the broker stops, readers stop reading at once (nothing new is taken), and writers keep
//! sending acknowledgements until the commit stage has stored what was taken; then they send
//! MQTT 5 clients a DISCONNECT (server shutting down) and close.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, LastWill,
    Packet, PingResp, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, Publish,
    PublishProperties, SubAck, Subscribe, SubscribeProperties, SubscribeReasonCode,
};
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::debug;

use super::auth::Verdict;
use super::limits::{Inflight, RateLimit};
use super::sessions::{Acks, Backlog};
use super::subscriptions::Refused;
use super::{Peer, Shared};
use crate::model::events::{
    ConnectionRefused, InternalEvent, PublishRefused, PublishesDelayed, TopicRefused,
};
use crate::pipeline::ingest::{is_alarm_ack, OWN_TOPIC_PREFIXES};
use crate::pipeline::input::{Identity, InputSender, Received};
use crate::pipeline::routes::Owners;
use crate::pipeline::{AckToken, NOT_AUTHORIZED, TOPIC_NAME_INVALID};
use crate::topic::check_topic_name;
use crate::transport::raised;
use crate::transport::wire::{frame, publish_head, Proto, PublishHead, WireError};

/// A write to a client that waits longer than this (the client does not read) closes it.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The last write of a stop waits at most this long.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the reader asks the writer to send.
#[derive(Debug)]
enum Control {
    Packet(Box<Packet>),
    /// The reader is done: flush and close.
    Close,
}

/// How a connection ended, for the will and the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client sent DISCONNECT: no will.
    Clean,
    /// The client sent DISCONNECT asking for its will (MQTT 5).
    CleanWithWill,
    /// The network failed, keep-alive expired, or the client broke the protocol: the will.
    Abnormal,
    /// The router closed the session (another connection took it over).
    TakenOver,
    /// The broker stopped.
    Stopped,
}

/// Whether rumqttd's router can take a topic: its topic matching slices the first byte, and
/// panics (killing the router thread) when that is not a whole character.
fn router_safe(topic: &[u8]) -> bool {
    topic.first().is_some_and(u8::is_ascii)
}

/// Topics this service publishes itself: a client may neither publish there nor leave a will
/// there, or it could plant or clear an alarm. Acknowledgements of alarms are the exception.
fn reserved(topic: &[u8]) -> bool {
    OWN_TOPIC_PREFIXES
        .iter()
        .any(|p| topic.starts_with(p.as_bytes()))
        && !is_alarm_ack(topic)
}

/// The largest CONNECT taken (its will included): a client not yet authenticated holds no
/// more of the broker's memory than this.
const MAX_CONNECT_BYTES: usize = 64 << 10;

/// Serves one accepted connection until it ends.
pub async fn serve<S>(stream: S, shared: Arc<Shared>, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    // Small to start with (a device's messages are a few hundred bytes; the buffer grows for
    // larger ones): a ward has a thousand connections, each holding one.
    let mut buf = BytesMut::with_capacity(1024);
    // A stop does not wait for a client that has not even sent its CONNECT.
    let mut stopping = shared.stopping.clone();
    let connect = tokio::select! {
        c = tokio::time::timeout(
            shared.connect_timeout,
            read_connect(&mut rd, &mut buf, shared.max_packet.min(MAX_CONNECT_BYTES)),
        ) => c,
        _ = raised(&mut stopping) => return,
    };
    let (proto, packet) = match connect {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(error = %e, "connection refused before CONNECT");
            if let WireError::Level(_) = e {
                let _ = refuse(
                    &mut wr,
                    &Proto::V4(rumqttd::protocol::v4::V4),
                    ConnectReturnCode::RefusedProtocolVersion,
                )
                .await;
            }
            return;
        }
        Err(_) => {
            debug!("no CONNECT within the connection timeout");
            return;
        }
    };
    let Packet::Connect(connect, _props, will, _will_props, login) = packet else {
        return;
    };
    // Password checks wait their turn (two at once): a client does not wait for it longer
    // than for its CONNECT, so a queue of guessers cannot hold connection slots for long.
    let loopback = peer.loopback;
    let verdict = tokio::select! {
        v = tokio::time::timeout(shared.connect_timeout, shared.auth.check(login, peer.certificate)) => {
            v.unwrap_or(Verdict::Refused {
                code: ConnectReturnCode::ServiceUnavailable,
                reason: "busy",
            })
        }
        _ = raised(&mut stopping) => return,
    };
    let sender = match verdict {
        Verdict::Anonymous => None,
        Verdict::Account(id) => Some(id),
        Verdict::Refused { code, reason } => {
            ConnectionRefused { reason }.emit(&shared.metrics);
            let _ = refuse(&mut wr, &proto, code).await;
            return;
        }
    };
    // A will is a publish made later in the client's name: held to the same topics.
    if let Some(w) = &will {
        if let Some(reason) = not_its_own(&shared.owners, sender.as_deref(), loopback, &w.topic) {
            PublishRefused {
                reason,
                account: sender.as_ref().map_or("(anonymous)", |id| &id.name),
            }
            .emit(&shared.metrics);
            let _ = refuse(&mut wr, &proto, ConnectReturnCode::NotAuthorized).await;
            return;
        }
    }
    let mut client_id = connect.client_id.clone();
    let mut assigned = None;
    if client_id.is_empty() {
        if !connect.clean_session {
            let _ = refuse(&mut wr, &proto, ConnectReturnCode::ClientIdentifierNotValid).await;
            return;
        }
        client_id = format!("iomt-auto-{}", shared.next_auto_id());
        assigned = Some(client_id.clone());
    }
    // rumqttd refuses these (silently); say why.
    if client_id.contains(['+', '#', '/', '$']) {
        let _ = refuse(&mut wr, &proto, ConnectReturnCode::ClientIdentifierNotValid).await;
        return;
    }
    if let Some(w) = &will {
        let ok = check_topic_name(&w.topic).is_ok() && router_safe(&w.topic) && !reserved(&w.topic);
        if !ok {
            TopicRefused { reason: "will" }.emit(&shared.metrics);
            let _ = refuse(&mut wr, &proto, ConnectReturnCode::NotAuthorized).await;
            return;
        }
    }
    // A stopping broker takes no new clients.
    let Some(input) = shared.input() else {
        let _ = refuse(&mut wr, &proto, ConnectReturnCode::ServiceUnavailable).await;
        return;
    };
    // From here on the client is known by its session id, which keeps accounts apart.
    let client_id = shared.auth.session_id(sender.as_deref(), &client_id);
    let router = shared.router.clone();
    let (id, clean) = (client_id.clone(), connect.clean_session);
    let link = tokio::task::spawn_blocking(move || router.link(&id, clean)).await;
    let (link_tx, link_rx, connack) = match link {
        Ok(Ok(l)) => l,
        _ => {
            let _ = refuse(&mut wr, &proto, ConnectReturnCode::ServiceUnavailable).await;
            return;
        }
    };
    let Some(Packet::ConnAck(ack, _)) = Option::<Packet>::from(connack) else {
        let _ = refuse(&mut wr, &proto, ConnectReturnCode::ServiceUnavailable).await;
        return;
    };
    if ack.code != ConnectReturnCode::Success {
        let code = ack.code;
        let _ = refuse(&mut wr, &proto, code).await;
        disconnect_router(link_tx).await;
        return;
    }
    let (session, acks_rx, backlog) = shared.sessions.open();
    shared
        .subscriptions
        .connect(&client_id, session, connect.clean_session);
    let props = proto.is_v5().then(|| ConnAckProperties {
        receive_max: Some(shared.limits.max_inflight),
        max_packet_size: Some(shared.max_packet.min(u32::MAX as usize) as u32),
        assigned_client_identifier: assigned,
        // Aliases would have to be resolved before routing; clients must send full topics.
        topic_alias_max: Some(0),
        ..ConnAckProperties::default()
    });
    let mut out = BytesMut::new();
    let written = proto.write(Packet::ConnAck(ack, props), &mut out).is_ok()
        && matches!(
            tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&out)).await,
            Ok(Ok(()))
        );
    if !written {
        shared.sessions.close(session);
        shared
            .subscriptions
            .disconnect(&client_id, session, connect.clean_session);
        disconnect_router(link_tx).await;
        return;
    }
    let keep_alive = Duration::from_secs(u64::from(connect.keep_alive));

    shared.metrics.connections.inc();
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (writer_done_tx, writer_done) = watch::channel(None::<End>);
    let inflight = Arc::new(Inflight::default());
    let writer = tokio::spawn(write_loop(
        wr,
        proto.clone(),
        link_rx,
        acks_rx,
        control_rx,
        backlog.clone(),
        inflight.clone(),
        shared.finish.clone(),
        writer_done_tx,
    ));
    let mut reader = Reader {
        rd,
        buf,
        proto,
        shared: shared.clone(),
        input: Some(input),
        link_tx,
        control: control_tx,
        backlog,
        session,
        client_id: client_id.clone(),
        clean_session: connect.clean_session,
        keep_alive,
        qos2_pending: HashSet::new(),
        skip: 0,
        sender,
        loopback,
        rate: RateLimit::new(
            shared.limits.max_messages_per_second,
            shared.limits.max_burst,
        ),
        inflight,
    };
    let end = reader.run(writer_done.clone()).await;
    let Reader {
        mut link_tx,
        control,
        ..
    } = reader;
    if matches!(end, End::Abnormal | End::CleanWithWill) {
        if let Some(will) = will {
            publish_will(&mut link_tx, will, &shared).await;
        }
    }
    // A session the router took over is already gone from it (and its connection number may
    // already name the new one).
    if end != End::TakenOver {
        disconnect_router(link_tx).await;
    }
    let _ = control.send(Control::Close);
    let _ = writer.await;
    shared.sessions.close(session);
    shared.metrics.connections.dec();
    shared
        .subscriptions
        .disconnect(&client_id, session, connect.clean_session);
    debug!(session, ?end, "connection closed");
}

/// Reads until a whole CONNECT is buffered; returns the protocol it announces and the packet.
async fn read_connect<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<(Proto, Packet), WireError> {
    loop {
        if let Some(mut proto) = Proto::detect(buf)? {
            if let Some(f) = frame(buf)? {
                if f.len() > max {
                    return Err(WireError::TooLarge {
                        kind: "CONNECT",
                        size: f.len(),
                        limit: max,
                    });
                }
                if buf.len() >= f.len() {
                    let packet = proto.read(buf, max)?;
                    return Ok((proto, packet));
                }
            }
        }
        let n = rd
            .read_buf(buf)
            .await
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        if n == 0 {
            return Err(WireError::Malformed("closed before CONNECT".into()));
        }
    }
}

/// A CONNACK refusing the connection, in a form the client's version understands.
async fn refuse<W: AsyncWrite + Unpin>(
    wr: &mut W,
    proto: &Proto,
    code: ConnectReturnCode,
) -> std::io::Result<()> {
    use ConnectReturnCode as C;
    // MQTT 3.1.1 has six return codes; rumqttd's writer panics on the others.
    let code = match (proto.is_v5(), code) {
        (true, c) => c,
        (
            false,
            c @ (C::Success
            | C::RefusedProtocolVersion
            | C::ClientIdentifierNotValid
            | C::ServiceUnavailable
            | C::BadUserNamePassword
            | C::NotAuthorized),
        ) => c,
        (false, _) => C::ServiceUnavailable,
    };
    let mut out = BytesMut::new();
    let ack = ConnAck {
        session_present: false,
        code,
    };
    if proto.write(Packet::ConnAck(ack, None), &mut out).is_ok() {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&out)).await;
    }
    wr.shutdown().await
}

/// Tells the router the client is gone, so it drops the link (a dropped link alone stays
/// registered in rumqttd).
async fn disconnect_router(mut link_tx: LinkTx) {
    let d = Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
    };
    let _ = link_tx.send(Packet::Disconnect(d, None)).await;
}

/// Publishes the client's will (at QoS 0: the router delivers it at each subscription's QoS).
/// MQTT 5's will delay is not honoured: the will goes out when the connection ends. Its topic
/// was checked at CONNECT.
async fn publish_will(link_tx: &mut LinkTx, will: LastWill, shared: &Shared) {
    // Retained like any publish only within the retained messages' bounds: a client
    // reconnecting with ever new retained wills must not grow the router's memory.
    let retain = will.retain && shared.retained.admit(&will.topic, will.message.len());
    let p = Publish::new(will.topic, will.message, retain);
    let _ = link_tx.send(Packet::Publish(p, None)).await;
}

struct Reader<R> {
    rd: R,
    buf: BytesMut,
    proto: Proto,
    shared: Arc<Shared>,
    /// `None` once the broker stops: nothing more goes to ingest.
    input: Option<InputSender>,
    link_tx: LinkTx,
    control: mpsc::UnboundedSender<Control>,
    /// Packets queued for the writer and not yet written.
    backlog: Arc<Backlog>,
    session: u64,
    client_id: String,
    clean_session: bool,
    keep_alive: Duration,
    /// QoS 2 packet ids taken in and not yet released: a duplicate is not taken twice.
    qos2_pending: HashSet<u16>,
    /// Bytes of an oversized publish still to be thrown away as they arrive.
    skip: usize,
    /// The account the client authenticated as; `None` when anonymous.
    sender: Option<Arc<Identity>>,
    /// Connected from this machine (see `not_its_own`).
    loopback: bool,
    rate: RateLimit,
    inflight: Arc<Inflight>,
}

/// What woke the reader.
enum Wake {
    /// Bytes read; 0 at end of stream or on an error.
    Read(usize),
    Expired,
    Stopping,
    WriterDone(End),
}

impl<R: AsyncRead + Unpin> Reader<R> {
    async fn run(&mut self, mut writer_done: watch::Receiver<Option<End>>) -> End {
        let mut stopping = self.shared.stopping.clone();
        let mut last_packet = Instant::now();
        loop {
            match self.drain_buffer(&mut stopping, &mut writer_done).await {
                Ok(true) => last_packet = Instant::now(),
                Ok(false) => {}
                Err(end) => return self.finish(end, &mut writer_done).await,
            }
            if *stopping.borrow() {
                return self.finish(End::Stopped, &mut writer_done).await;
            }
            // A client whose writer is far behind (it does not read) is not read either.
            tokio::select! {
                _ = self.backlog.room() => {}
                _ = raised(&mut stopping) => return self.finish(End::Stopped, &mut writer_done).await,
                end = ended(&mut writer_done) => return end,
            }
            // MQTT: the server closes a client silent for 1.5 keep-alive periods (0: never).
            let expiry = (!self.keep_alive.is_zero())
                .then(|| last_packet + self.keep_alive + self.keep_alive / 2);
            let wake = tokio::select! {
                n = self.rd.read_buf(&mut self.buf) => Wake::Read(n.unwrap_or(0)),
                _ = sleep_until_opt(expiry) => Wake::Expired,
                _ = raised(&mut stopping) => Wake::Stopping,
                end = ended(&mut writer_done) => Wake::WriterDone(end),
            };
            match wake {
                Wake::Read(0) => return self.finish(End::Abnormal, &mut writer_done).await,
                Wake::Read(_) => {
                    if self.skip > 0 {
                        let n = self.skip.min(self.buf.len());
                        self.buf.advance(n);
                        self.skip -= n;
                        last_packet = Instant::now();
                    }
                }
                Wake::Expired => {
                    debug!(session = self.session, "keep-alive expired");
                    return self.finish(End::Abnormal, &mut writer_done).await;
                }
                Wake::Stopping => return self.finish(End::Stopped, &mut writer_done).await,
                Wake::WriterDone(end) => return end,
            }
        }
    }

    /// On a stop, waits (without reading) until the writer has sent the last
    /// acknowledgements and closed.
    async fn finish(&mut self, end: End, writer_done: &mut watch::Receiver<Option<End>>) -> End {
        self.input = None;
        if end == End::Stopped {
            ended(writer_done).await;
        }
        end
    }

    /// Handles every whole packet in the buffer. `Ok(true)` if it handled at least one.
    async fn drain_buffer(
        &mut self,
        stopping: &mut watch::Receiver<bool>,
        writer_done: &mut watch::Receiver<Option<End>>,
    ) -> Result<bool, End> {
        let max = self.shared.max_packet;
        let mut handled = false;
        while self.skip == 0 {
            let f = match frame(&self.buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(self.protocol_error(&e)),
            };
            let head = if f.is_publish() {
                let head = match publish_head(&self.buf, &f) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(e) => return Err(self.protocol_error(&e)),
                };
                // A payload ingest would refuse for its size is never buffered: it is thrown
                // away as it arrives, and only its size is handed over (to be counted,
                // dead-lettered and acknowledged in order).
                let size = f.len() - head.head_len;
                if size > self.shared.max_payload || f.len() > max {
                    let have = self.buf.len().min(f.len());
                    self.buf.advance(have);
                    self.skip = f.len() - have;
                    handled = true;
                    self.publish(head, Bytes::new(), size, None, stopping, writer_done)
                        .await?;
                    continue;
                }
                Some(head)
            } else {
                if f.len() > max {
                    return Err(self.protocol_error(&WireError::TooLarge {
                        kind: "non-PUBLISH",
                        size: f.len(),
                        limit: max,
                    }));
                }
                None
            };
            if self.buf.len() < f.len() {
                self.buf.reserve(f.len() - self.buf.len());
                break;
            }
            let packet = match self.proto.read(&mut self.buf, max) {
                Ok(p) => p,
                Err(e) => return Err(self.protocol_error(&e)),
            };
            handled = true;
            self.handle(packet, head, stopping, writer_done).await?;
        }
        Ok(handled)
    }

    fn protocol_error(&self, e: &WireError) -> End {
        debug!(session = self.session, error = %e, "protocol error: closing the connection");
        let code = match e {
            WireError::TooLarge { .. } => DisconnectReasonCode::PacketTooLarge,
            _ => DisconnectReasonCode::ProtocolError,
        };
        self.send_disconnect(code);
        End::Abnormal
    }

    fn send_control(&self, p: Packet) {
        self.backlog.add(1);
        let _ = self.control.send(Control::Packet(Box::new(p)));
    }

    /// MQTT 5 clients are told why the server closes.
    fn send_disconnect(&self, reason_code: DisconnectReasonCode) {
        if self.proto.is_v5() {
            self.send_control(Packet::Disconnect(Disconnect { reason_code }, None));
        }
    }

    async fn handle(
        &mut self,
        packet: Packet,
        head: Option<PublishHead>,
        stopping: &mut watch::Receiver<bool>,
        writer_done: &mut watch::Receiver<Option<End>>,
    ) -> Result<(), End> {
        match packet {
            Packet::Publish(publish, props) => {
                let Some(head) = head else {
                    return Err(self.protocol_error(&WireError::Malformed("publish".into())));
                };
                let size = publish.payload.len();
                self.publish(head, publish.payload, size, props, stopping, writer_done)
                    .await
            }
            p @ (Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..)) => {
                // Acknowledgements of the router's deliveries to this client.
                let _ = self.link_tx.send(p).await;
                Ok(())
            }
            Packet::PubRel(rel, _) => {
                let reason = if self.qos2_pending.remove(&rel.pkid) {
                    PubCompReason::Success
                } else {
                    PubCompReason::PacketIdentifierNotFound
                };
                self.send_control(Packet::PubComp(
                    PubComp {
                        pkid: rel.pkid,
                        reason,
                    },
                    None,
                ));
                Ok(())
            }
            Packet::Subscribe(sub, props) => {
                // Subscriptions go to the one router thread that delivers alarms too: paced
                // like publishes.
                self.pace(stopping, writer_done).await?;
                self.subscribe(sub, props).await;
                Ok(())
            }
            Packet::Unsubscribe(unsub, props) => {
                self.pace(stopping, writer_done).await?;
                for f in &unsub.filters {
                    self.shared.subscriptions.unsubscribe(&self.client_id, f);
                }
                let _ = self.link_tx.send(Packet::Unsubscribe(unsub, props)).await;
                Ok(())
            }
            Packet::PingReq(_) => {
                self.send_control(Packet::PingResp(PingResp));
                Ok(())
            }
            Packet::Disconnect(d, _) => Err(
                if d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage {
                    End::CleanWithWill
                } else {
                    End::Clean
                },
            ),
            _ => Err(self.protocol_error(&WireError::Malformed(
                "a packet a client does not send".into(),
            ))),
        }
    }

    /// A SUBSCRIBE goes to the router whole, or is refused whole (with a SUBACK of failures):
    /// for an invalid filter, past the filter quotas, or a shared subscription in a persistent
    /// session (rumqttd's router panics on those when the session ends with deliveries due).
    async fn subscribe(&mut self, sub: Subscribe, props: Option<SubscribeProperties>) {
        let mut refused = None;
        for f in &sub.filters {
            if !self
                .shared
                .auth
                .may_subscribe(self.sender.as_deref(), &f.path)
            {
                TopicRefused {
                    reason: "subscribe_not_authorized",
                }
                .emit(&self.shared.metrics);
                refused = Some(SubscribeReasonCode::NotAuthorized);
            } else if !self.clean_session && f.path.starts_with("$share/") {
                refused = Some(SubscribeReasonCode::SharedSubscriptionsNotSupported);
            } else {
                match self.shared.subscriptions.check(&self.client_id, &f.path) {
                    Ok(()) => {}
                    Err(Refused::Invalid) => {
                        refused = Some(SubscribeReasonCode::TopicFilterInvalid)
                    }
                    Err(Refused::Quota) => refused = Some(SubscribeReasonCode::QuotaExceeded),
                }
            }
        }
        if let Some(code) = refused {
            let code = if self.proto.is_v5() {
                code
            } else {
                SubscribeReasonCode::Failure
            };
            self.send_control(Packet::SubAck(
                SubAck {
                    pkid: sub.pkid,
                    return_codes: vec![code; sub.filters.len()],
                },
                None,
            ));
            return;
        }
        for f in &sub.filters {
            self.shared
                .subscriptions
                .subscribe(&self.client_id, self.session, &f.path);
        }
        let _ = self.link_tx.send(Packet::Subscribe(sub, props)).await;
    }

    /// Waits for the connection's rate limit (`max_messages_per_second`, `max_burst`) to allow
    /// one more packet: the connection is not read meanwhile.
    async fn pace(
        &mut self,
        stopping: &mut watch::Receiver<bool>,
        writer_done: &mut watch::Receiver<Option<End>>,
    ) -> Result<(), End> {
        while let Some(wait) = self.rate.take() {
            PublishesDelayed { limit: "rate" }.emit(&self.shared.metrics);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = raised(stopping) => return Err(End::Stopped),
                end = ended(writer_done) => return Err(end),
            }
        }
        Ok(())
    }

    /// A device's publish: checked, offered to the router if anyone may want it, and queued
    /// for ingest with its ack token (once intake is open and ingest's queue has room).
    async fn publish(
        &mut self,
        head: PublishHead,
        payload: Bytes,
        size: usize,
        props: Option<PublishProperties>,
        stopping: &mut watch::Receiver<bool>,
        writer_done: &mut watch::Receiver<Option<End>>,
    ) -> Result<(), End> {
        self.pace(stopping, writer_done).await?;
        let token = (head.qos > 0).then(|| AckToken::new(self.session, head.packet_id, head.qos));
        if let Err(e) = check_topic_name(&head.topic) {
            TopicRefused { reason: e.as_str() }.emit(&self.shared.metrics);
            if !self.proto.is_v5() {
                // MQTT 3.1.1 §4.7.3: the server closes the connection.
                return Err(self.protocol_error(&WireError::Malformed(e.to_string())));
            }
            // MQTT 5 can refuse one message and keep the connection.
            return match token {
                Some(t) => {
                    let refused = Received::refused(t.refusing(TOPIC_NAME_INVALID));
                    self.hand_over(refused, stopping, writer_done).await
                }
                None => Ok(()),
            };
        }
        if reserved(&head.topic) {
            // Acknowledged (MQTT 5: as not authorized; 3.1.1 has no refusal but closing, and a
            // closed device would only resend) and dropped.
            TopicRefused { reason: "reserved" }.emit(&self.shared.metrics);
            return match token {
                Some(t) => {
                    let refused = Received::refused(t.refusing(NOT_AUTHORIZED));
                    self.hand_over(refused, stopping, writer_done).await
                }
                None => Ok(()),
            };
        }
        if let Some(reason) = not_its_own(
            &self.shared.owners,
            self.sender.as_deref(),
            self.loopback,
            &head.topic,
        ) {
            // MQTT 5: refused as not authorized; 3.1.1 has no refusal but closing, and a closed
            // device would only resend. Nothing of it goes on: no subscriber sees it, nothing is
            // stored.
            PublishRefused {
                reason,
                account: self.sender.as_ref().map_or("(anonymous)", |id| &id.name),
            }
            .emit(&self.shared.metrics);
            return match token {
                Some(t) => {
                    let refused = Received::refused(t.refusing(NOT_AUTHORIZED));
                    self.hand_over(refused, stopping, writer_done).await
                }
                None => Ok(()),
            };
        }
        if props.as_ref().is_some_and(|p| p.topic_alias.is_some()) {
            self.send_disconnect(DisconnectReasonCode::TopicAliasInvalid);
            return Err(End::Abnormal);
        }
        if head.qos == 2 && !self.qos2_pending.insert(head.packet_id) {
            // A duplicate of a message already taken in: its PUBREC comes when it is stored.
            return Ok(());
        }
        let whole = size == payload.len();
        if whole && router_safe(&head.topic) {
            // Checked UTF-8 above.
            let name = std::str::from_utf8(&head.topic).unwrap_or_default();
            let wanted = self.shared.subscriptions.wanted(name);
            let retain = head.retain && self.shared.retained.admit(&head.topic, payload.len());
            if retain || wanted {
                let p = Publish::new(head.topic.clone(), payload.clone(), retain);
                let props = props.map(|mut p| {
                    p.topic_alias = None;
                    p.subscription_identifiers.clear();
                    p
                });
                let _ = self.link_tx.send(Packet::Publish(p, props)).await;
            }
        }
        // Exact copies: a slice would keep the connection's whole read buffer alive while the
        // message waits, and the queue counts only the message's own bytes.
        let received = Received {
            topic: Bytes::copy_from_slice(&head.topic),
            payload: Bytes::copy_from_slice(&payload),
            payload_size: size,
            ack: token,
            refused: false,
            sender: self.sender.clone(),
        };
        self.hand_over(received, stopping, writer_done).await
    }

    /// Queues a message for ingest once intake is open (store healthy, disk not full) and
    /// ingest's queue has room, without reading on meanwhile: the client's further packets
    /// wait in TCP.
    async fn hand_over(
        &mut self,
        received: Received,
        stopping: &mut watch::Receiver<bool>,
        writer_done: &mut watch::Receiver<Option<End>>,
    ) -> Result<(), End> {
        if received.ack.is_some() {
            let max = usize::from(self.shared.limits.max_inflight);
            if self.inflight.count() >= max {
                PublishesDelayed { limit: "inflight" }.emit(&self.shared.metrics);
                tokio::select! {
                    _ = self.inflight.room(max) => {}
                    _ = raised(stopping) => return Err(End::Stopped),
                    end = ended(writer_done) => return Err(end),
                }
            }
            self.inflight.add();
        }
        let mut intake = self.shared.intake.clone();
        let Some(input) = self.input.as_ref() else {
            return Err(End::Stopped);
        };
        tokio::select! {
            r = async {
                raised(&mut intake).await;
                input.send(received).await
            } => match r {
                Ok(()) => Ok(()),
                Err(_) => Err(End::Stopped),
            },
            _ = raised(stopping) => Err(End::Stopped),
            end = ended(writer_done) => Err(end),
        }
    }
}

/// Waits until the writer reports how it ended.
async fn ended(rx: &mut watch::Receiver<Option<End>>) -> End {
    match rx.wait_for(Option::is_some).await {
        Ok(v) => v.unwrap_or(End::Abnormal),
        Err(_) => End::Abnormal,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes everything the client gets: acknowledgements from commit, the router's deliveries and
/// acks, the reader's pings and refusals. Ends when the reader closes, the router closes the
/// session, the socket fails or stalls, or, when the broker stops, once the last
/// acknowledgements are out.
#[allow(clippy::too_many_arguments)]
async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    proto: Proto,
    mut link_rx: LinkRx,
    mut acks: mpsc::UnboundedReceiver<Acks>,
    mut control: mpsc::UnboundedReceiver<Control>,
    backlog: Arc<Backlog>,
    inflight: Arc<Inflight>,
    mut finish: watch::Receiver<bool>,
    done: watch::Sender<Option<End>>,
) {
    // Grows to what a round of writes needs, and keeps that.
    let mut out = BytesMut::new();
    let end = loop {
        let mut closing = None;
        // Items counted in the backlog that this round writes.
        let mut written = 0;
        let mut acked = 0;
        tokio::select! {
            biased;
            c = control.recv() => match c {
                Some(Control::Packet(p)) => {
                    encode(&proto, *p, &mut out);
                    written += 1;
                }
                Some(Control::Close) | None => closing = Some(End::Clean),
            },
            a = acks.recv() => {
                if let Some(a) = a {
                    written += a.len();
                    acked += a.len();
                    encode_acks(&proto, a, &mut out);
                }
            }
            n = link_rx.next() => match n {
                Ok(Some(Notification::Unschedule)) => {
                    // The router paused deliveries until this client catches up: it has.
                    if link_rx.wake().await.is_err() {
                        closing = Some(End::Abnormal);
                    }
                }
                Ok(Some(Notification::Disconnect(d, props))) => {
                    if proto.is_v5() {
                        encode(&proto, Packet::Disconnect(d, props), &mut out);
                    }
                    closing = Some(End::TakenOver);
                }
                Ok(Some(n)) => {
                    if let Some(p) = Option::<Packet>::from(n) {
                        encode(&proto, p, &mut out);
                    }
                }
                Ok(None) => {}
                Err(_) => closing = Some(End::TakenOver),
            },
            _ = raised(&mut finish) => {
                while let Ok(a) = acks.try_recv() {
                    written += a.len();
                    acked += a.len();
                    encode_acks(&proto, a, &mut out);
                }
                if proto.is_v5() {
                    let d = Disconnect { reason_code: DisconnectReasonCode::ServerShuttingDown };
                    encode(&proto, Packet::Disconnect(d, None), &mut out);
                }
                closing = Some(End::Stopped);
            }
        }
        // Take whatever else is ready, so one write carries many packets.
        if closing.is_none() {
            while let Ok(a) = acks.try_recv() {
                written += a.len();
                acked += a.len();
                encode_acks(&proto, a, &mut out);
            }
            while let Ok(c) = control.try_recv() {
                match c {
                    Control::Packet(p) => {
                        encode(&proto, *p, &mut out);
                        written += 1;
                    }
                    Control::Close => {
                        closing = Some(End::Clean);
                        break;
                    }
                }
            }
        }
        if !out.is_empty() {
            let limit = if closing == Some(End::Stopped) {
                FINAL_WRITE_TIMEOUT
            } else {
                WRITE_TIMEOUT
            };
            // A client that does not read would hold this write, and with it the writer, for
            // ever: it is closed instead.
            match tokio::time::timeout(limit, wr.write_all(&out)).await {
                Ok(Ok(())) => {}
                _ => break End::Abnormal,
            }
            out.clear();
        }
        backlog.done(written);
        inflight.done(acked);
        if let Some(end) = closing {
            break end;
        }
    };
    let _ = tokio::time::timeout(FINAL_WRITE_TIMEOUT, wr.shutdown()).await;
    let _ = done.send(Some(end));
}

/// MQTT 3.1.1 has no properties: rumqttd's v4 writer panics on a packet that carries them (a
/// delivery of an MQTT 5 publisher's message, for one), so they are dropped first.
fn without_properties(p: Packet) -> Packet {
    match p {
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::SubAck(p, _) => Packet::SubAck(p, None),
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::ConnAck(p, _) => Packet::ConnAck(p, None),
        Packet::Disconnect(p, _) => Packet::Disconnect(p, None),
        other => other,
    }
}

fn encode(proto: &Proto, p: Packet, out: &mut BytesMut) {
    let p = if proto.is_v5() {
        p
    } else {
        without_properties(p)
    };
    if let Err(e) = proto.write(p, out) {
        debug!(error = %e, "a packet could not be encoded");
    }
}

fn encode_acks(proto: &Proto, acks: Acks, out: &mut BytesMut) {
    for (pkid, qos, reason) in acks {
        let p = if qos == 2 {
            let reason = match reason {
                0 => PubRecReason::Success,
                NOT_AUTHORIZED => PubRecReason::NotAuthorized,
                TOPIC_NAME_INVALID => PubRecReason::TopicNameInvalid,
                _ => PubRecReason::UnspecifiedError,
            };
            Packet::PubRec(PubRec { pkid, reason }, None)
        } else {
            let reason = match reason {
                0 => PubAckReason::Success,
                NOT_AUTHORIZED => PubAckReason::NotAuthorized,
                TOPIC_NAME_INVALID => PubAckReason::TopicNameInvalid,
                _ => PubAckReason::UnspecifiedError,
            };
            Packet::PubAck(PubAck { pkid, reason }, None)
        };
        encode(proto, p, out);
    }
}

/// Why `sender`'s account may not publish on `topic` (a device account publishes only on the
/// topics whose route names it as their identity; alarm acknowledgements and subjects'
/// settings are operators' only), or `None` when it may. Anonymous clients (where allowed) are
/// not held to device topics, but acknowledge alarms and change settings only from this
/// machine (`loopback`): off it, anyone on the network could.
fn not_its_own(
    owners: &Owners,
    sender: Option<&Identity>,
    loopback: bool,
    topic: &[u8],
) -> Option<&'static str> {
    let Ok(topic) = std::str::from_utf8(topic) else {
        return sender.map(|_| "impostor");
    };
    let staff_topic = is_alarm_ack(topic.as_bytes()) || topic.starts_with("config/");
    let Some(id) = sender else {
        return (staff_topic && !loopback).then_some("not_operator");
    };
    match (staff_topic, id.operator) {
        (true, true) => None,
        (true, false) => Some("not_operator"),
        (false, _) => (!owners.owned_by(topic, &id.name)).then_some("impostor"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners() -> Owners {
        let c = crate::config::PipelineConfig::parse(
            "[[route]]\ntopic = \"ward/+/bed/+/vitals\"\ncodec = \"senml-json\"\nsource = \"w{2}-b{4}-mon\"\n",
            "t.toml",
        )
        .unwrap();
        Owners::new(&c.routes).unwrap()
    }

    #[test]
    fn each_kind_of_client_publishes_where_it_may() {
        let o = owners();
        let device = Identity {
            name: "w7-b3-mon".into(),
            operator: false,
        };
        let nurse = Identity {
            name: "nurse".into(),
            operator: true,
        };
        let ack = b"alarms/ward/w7-b3/spo2-low/ack".as_slice();
        let config = b"config/ward/w7-b3".as_slice();
        let own = b"ward/7/bed/3/vitals".as_slice();
        let other = b"ward/7/bed/4/vitals".as_slice();
        for loopback in [true, false] {
            assert_eq!(not_its_own(&o, Some(&device), loopback, own), None);
            assert_eq!(
                not_its_own(&o, Some(&device), loopback, other),
                Some("impostor")
            );
            assert_eq!(
                not_its_own(&o, Some(&device), loopback, ack),
                Some("not_operator")
            );
            assert_eq!(
                not_its_own(&o, Some(&device), loopback, config),
                Some("not_operator")
            );
            assert_eq!(
                not_its_own(&o, Some(&device), loopback, b"\xff"),
                Some("impostor")
            );
            assert_eq!(not_its_own(&o, Some(&nurse), loopback, ack), None);
            assert_eq!(not_its_own(&o, Some(&nurse), loopback, config), None);
            // An operator is no device: its name owns no device topic.
            assert_eq!(
                not_its_own(&o, Some(&nurse), loopback, own),
                Some("impostor")
            );
            // Anonymous clients (where allowed) publish readings anywhere...
            assert_eq!(not_its_own(&o, None, loopback, other), None);
        }
        // ... but acknowledge alarms and change settings only from this machine.
        assert_eq!(not_its_own(&o, None, true, ack), None);
        assert_eq!(not_its_own(&o, None, true, config), None);
        assert_eq!(not_its_own(&o, None, false, ack), Some("not_operator"));
        assert_eq!(not_its_own(&o, None, false, config), Some("not_operator"));
    }
}
