//! MQTT on the wire, for the embedded broker's connections and the external session: which
//! protocol version a connection speaks (from its CONNECT), where each packet ends, and the
//! head of a PUBLISH (flags, packet id, topic), read straight from the bytes. rumqttd's codecs (`rumqttd::protocol::{v4, v5}`) parse and write whole packets; this
//! module adds what they do not give: the version before parsing, the head of a publish too large
//! to buffer, and its QoS and packet id (private fields of rumqttd's `Publish`).

use std::panic::{catch_unwind, AssertUnwindSafe};

use bytes::BytesMut;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{Packet, Protocol};

/// Why a connection's bytes are not MQTT this broker can read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("malformed remaining length")]
    RemainingLength,
    #[error("the first packet is not a CONNECT")]
    NotConnect,
    #[error("protocol level {0} is not supported (MQTT 3.1.1 is 4, MQTT 5 is 5)")]
    Level(u8),
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("a {kind} packet of {size} bytes is larger than the limit of {limit}")]
    TooLarge {
        kind: &'static str,
        size: usize,
        limit: usize,
    },
}

/// The MQTT version of one connection.
#[derive(Debug, Clone)]
pub enum Proto {
    V4(V4),
    V5(V5),
}

/// Where a packet starts and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// The first byte: packet type and flags.
    pub byte1: u8,
    /// Bytes of the fixed header (1 + the remaining-length varint).
    pub header_len: usize,
    pub remaining: usize,
}

impl Frame {
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.header_len + self.remaining
    }

    pub fn packet_type(&self) -> u8 {
        self.byte1 >> 4
    }

    pub fn is_publish(&self) -> bool {
        self.packet_type() == 3
    }
}

/// The fixed header at the start of `buf`: `Ok(None)` until enough bytes have arrived.
pub fn frame(buf: &[u8]) -> Result<Option<Frame>, WireError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some(Frame {
                byte1,
                header_len: 2 + i,
                remaining,
            }));
        }
    }
    Err(WireError::RemainingLength)
}

/// The head of a PUBLISH: enough to acknowledge and dead-letter it without its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishHead {
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
    pub topic: bytes::Bytes,
    /// 0 for QoS 0.
    pub packet_id: u16,
    /// Bytes of the frame before the (v5: properties and) payload.
    pub head_len: usize,
}

/// Reads the head of the publish framed by `f` at the start of `buf`; `Ok(None)` until enough
/// bytes have arrived.
pub fn publish_head(buf: &[u8], f: &Frame) -> Result<Option<PublishHead>, WireError> {
    let qos = (f.byte1 >> 1) & 3;
    if qos == 3 {
        return Err(WireError::Malformed("PUBLISH with QoS 3".into()));
    }
    let at = f.header_len;
    let Some(len) = buf.get(at..at + 2) else {
        return Ok(None);
    };
    let topic_len = u16::from_be_bytes([len[0], len[1]]) as usize;
    let mut end = at + 2 + topic_len;
    if qos > 0 {
        end += 2;
    }
    if end > f.len() {
        return Err(WireError::Malformed(
            "PUBLISH shorter than its topic".into(),
        ));
    }
    if buf.len() < end {
        return Ok(None);
    }
    let topic = bytes::Bytes::copy_from_slice(&buf[at + 2..at + 2 + topic_len]);
    let packet_id = if qos > 0 {
        u16::from_be_bytes([buf[end - 2], buf[end - 1]])
    } else {
        0
    };
    if qos > 0 && packet_id == 0 {
        return Err(WireError::Malformed("PUBLISH with packet id 0".into()));
    }
    Ok(Some(PublishHead {
        qos,
        dup: f.byte1 & 0b1000 != 0,
        retain: f.byte1 & 1 != 0,
        topic,
        packet_id,
        head_len: end,
    }))
}

impl Proto {
    /// The version a CONNECT announces: `Ok(None)` until enough bytes have arrived.
    pub fn detect(buf: &[u8]) -> Result<Option<Proto>, WireError> {
        let Some(f) = frame(buf)? else {
            return Ok(None);
        };
        if f.packet_type() != 1 {
            return Err(WireError::NotConnect);
        }
        // Protocol name ("MQTT", 2 + 4 bytes), then the level.
        let Some(&level) = buf.get(f.header_len + 6) else {
            return Ok(None);
        };
        match level {
            4 => Ok(Some(Proto::V4(V4))),
            5 => Ok(Some(Proto::V5(V5))),
            other => Err(WireError::Level(other)),
        }
    }

    pub fn is_v5(&self) -> bool {
        matches!(self, Proto::V5(_))
    }

    /// Parses the whole packet framed at the start of `buf` (which holds all of it) and takes
    /// it out of `buf`. rumqttd's parsers are guarded: a panic on hostile input is an error
    /// here, never a crash.
    pub fn read(&mut self, buf: &mut BytesMut, max: usize) -> Result<Packet, WireError> {
        let result = catch_unwind(AssertUnwindSafe(|| match self {
            Proto::V4(p) => p.read_mut(buf, max),
            Proto::V5(p) => p.read_mut(buf, max),
        }));
        match result {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(WireError::Malformed(e.to_string())),
            Err(_) => Err(WireError::Malformed("unparsable packet".into())),
        }
    }

    /// Appends `packet` to `out` (guarded like [`Proto::read`]: rumqttd's v4 writer panics on
    /// MQTT 5-only codes).
    pub fn write(&self, packet: Packet, out: &mut BytesMut) -> Result<(), WireError> {
        let result = catch_unwind(AssertUnwindSafe(|| match self {
            Proto::V4(p) => p.write(packet, out),
            Proto::V5(p) => p.write(packet, out),
        }));
        match result {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(WireError::Malformed(e.to_string())),
            Err(_) => Err(WireError::Malformed("unwritable packet".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_publish_heads() {
        // PUBLISH QoS 1, retain, topic "a/b", packet id 7, payload "xy".
        let p = [0x33, 9, 0, 3, b'a', b'/', b'b', 0, 7, b'x', b'y'];
        let f = frame(&p).unwrap().unwrap();
        assert_eq!((f.header_len, f.remaining, f.len()), (2, 9, 11));
        assert!(f.is_publish());
        let head = publish_head(&p, &f).unwrap().unwrap();
        assert_eq!(head.qos, 1);
        assert!(head.retain && !head.dup);
        assert_eq!(&head.topic[..], b"a/b");
        assert_eq!(head.packet_id, 7);
        assert_eq!(head.head_len, 9);
        // Partial input asks for more instead of failing.
        for cut in 0..9 {
            let f = frame(&p[..cut]).unwrap();
            if let Some(f) = f {
                assert_eq!(publish_head(&p[..cut], &f).unwrap(), None, "cut {cut}");
            }
        }
        // A 300-byte remaining length takes two bytes of varint.
        assert_eq!(
            frame(&[0x30, 0xAC, 0x02]).unwrap(),
            Some(Frame {
                byte1: 0x30,
                header_len: 3,
                remaining: 300
            })
        );
        assert!(frame(&[0x30, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(publish_head(&[0x36, 2, 0, 0], &frame(&[0x36, 2]).unwrap().unwrap()).is_err());
    }

    #[test]
    fn versions_come_from_the_connect() {
        let v4 = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0];
        assert!(matches!(Proto::detect(&v4), Ok(Some(Proto::V4(_)))));
        let mut v5 = v4;
        v5[8] = 5;
        assert!(Proto::detect(&v5).unwrap().unwrap().is_v5());
        let mut v3 = v4;
        v3[8] = 3;
        assert!(matches!(Proto::detect(&v3), Err(WireError::Level(3))));
        assert!(matches!(Proto::detect(&v4[..8]), Ok(None)));
        assert!(matches!(
            Proto::detect(&[0x30, 0]),
            Err(WireError::NotConnect)
        ));
    }
}
