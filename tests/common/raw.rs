//! MQTT 3.1.1 and 5 spoken by hand, for tests and benchmarks that need what client libraries
//! will not do (publish to an invalid topic, send an oversized packet, watch each PUBACK) or
//! cost too much CPU per message (the load benchmark). Shared with benches/ through `#[path]`.

#![allow(dead_code)]

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

/// CONNECT with a clean session and a 60 s keep-alive; `version` 4 (MQTT 3.1.1) or 5.
pub fn connect_packet(client_id: &str, version: u8) -> Vec<u8> {
    connect_packet_with_login(client_id, version, None)
}

/// CONNECT as `connect_packet`, with a user name and password.
pub fn connect_packet_with_login(
    client_id: &str,
    version: u8,
    login: Option<(&str, &str)>,
) -> Vec<u8> {
    let flags = if login.is_some() { 0xC2 } else { 0x02 };
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', version, flags, 0, 60];
    if version == 5 {
        body.push(0); // no properties
    }
    let mut field = |s: &str| {
        body.extend_from_slice(&(s.len() as u16).to_be_bytes());
        body.extend_from_slice(s.as_bytes());
    };
    field(client_id);
    if let Some((user, password)) = login {
        field(user);
        field(password);
    }
    let mut p = vec![0x10];
    remaining_length(body.len(), &mut p);
    p.extend(body);
    p
}

/// PUBLISH at `qos` (0 ignores `pkid`), appended to `out`.
pub fn publish_packet(
    topic: &[u8],
    qos: u8,
    pkid: u16,
    payload: &[u8],
    version: u8,
    out: &mut Vec<u8>,
) {
    out.push(0x30 | (qos << 1));
    let props = usize::from(version == 5);
    let id = if qos > 0 { 2 } else { 0 };
    remaining_length(2 + topic.len() + id + props + payload.len(), out);
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic);
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    if props == 1 {
        out.push(0);
    }
    out.extend_from_slice(payload);
}

/// SUBSCRIBE to one filter at QoS 1 (MQTT 3.1.1).
pub fn subscribe_packet(filter: &str, pkid: u16) -> Vec<u8> {
    let mut p = vec![0x82];
    remaining_length(2 + 2 + filter.len() + 1, &mut p);
    p.extend_from_slice(&pkid.to_be_bytes());
    p.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    p.extend_from_slice(filter.as_bytes());
    p.push(1);
    p
}

/// PUBACK for `pkid` (MQTT 3.1.1 form, also valid in 5).
pub fn puback_packet(pkid: u16) -> [u8; 4] {
    let id = pkid.to_be_bytes();
    [0x40, 2, id[0], id[1]]
}

/// Reads one packet: its first byte (type and flags) and its body.
pub async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    body: &mut Vec<u8>,
) -> std::io::Result<u8> {
    let first = r.read_u8().await?;
    let (mut len, mut mult) = (0usize, 1usize);
    loop {
        let b = r.read_u8().await?;
        len += (b & 0x7f) as usize * mult;
        mult *= 128;
        if b & 0x80 == 0 {
            break;
        }
    }
    body.resize(len, 0);
    r.read_exact(body).await?;
    Ok(first)
}

/// Sends CONNECT and returns once the CONNACK accepted it.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    client_id: &str,
    version: u8,
) -> std::io::Result<()> {
    s.write_all(&connect_packet(client_id, version)).await?;
    let mut body = Vec::new();
    let t = read_packet(s, &mut body).await?;
    // CONNACK: flags, then the return (3.1.1) or reason (5) code.
    if t != 0x20 || body.get(1) != Some(&0) {
        return Err(std::io::Error::other(format!(
            "CONNACK refused: type {t:#x}, body {body:?}"
        )));
    }
    Ok(())
}

/// Reads PUBACKs until `count` have come or the connection ends, giving `window` a permit back
/// for each: a publisher's window of unacknowledged messages. Returns how many came.
#[allow(dead_code)] // Not every user of this module counts PUBACKs.
pub fn count_pubacks<R: AsyncRead + Unpin + Send + 'static>(
    mut rd: R,
    count: u64,
    window: std::sync::Arc<tokio::sync::Semaphore>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut body = Vec::new();
        let mut acked = 0u64;
        while acked < count {
            match read_packet(&mut rd, &mut body).await {
                Ok(t) if t >> 4 == 4 => {
                    acked += 1;
                    window.add_permits(1);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        acked
    })
}

/// The packet id of a PUBACK/PUBREC body.
pub fn ack_pkid(body: &[u8]) -> u16 {
    u16::from_be_bytes([body[0], body[1]])
}
