//! Seeded property tests of every codec, with the options of pipelines/formats.toml: arbitrary
//! bytes and mutated payloads never panic, and a truncated payload is an error, never a wrong
//! reading. (A cut that falls exactly between two complete items, such as CSV lines or BLE
//! RR-intervals, leaves a valid shorter message: its readings must then be the first readings
//! of the whole, unchanged.) The long runs are the cargo-fuzz targets under fuzz/.

mod common;

use common::formats::*;
use iomt_edge::codec::{decode_to_readings, Codec, CodecName, DecodeError, Message, Reason};
use iomt_edge::model::reading::Reading;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const RECEIVED: i64 = 1_709_251_200_000_000;

fn decode(codec: &dyn Codec, topic: &str, payload: &[u8]) -> Result<Vec<Reading>, DecodeError> {
    let msg = Message {
        topic,
        payload,
        received: RECEIVED,
        source: "dev",
        subject: None,
    };
    decode_to_readings(codec, &msg)
}

/// Good payloads of one format, with the topic each arrived on.
fn corpus(name: &str) -> Vec<(String, Vec<u8>)> {
    lines(name)
        .into_iter()
        .filter(|l| matches!(l.expect, Expect::Readings(_)))
        .map(|l| (l.topic, l.payload))
        .collect()
}

fn mutate(rng: &mut StdRng, p: &[u8]) -> Vec<u8> {
    let mut m = p.to_vec();
    for _ in 0..rng.random_range(1..4) {
        let at = rng.random_range(0..=m.len());
        match rng.random_range(0..5) {
            0 if !m.is_empty() => {
                let i = at.min(m.len() - 1);
                m[i] ^= 1 << rng.random_range(0..8);
            }
            1 => m.insert(at, rng.random()),
            2 if at < m.len() => {
                m.remove(at);
            }
            3 if !m.is_empty() => {
                // Structural characters and boundary bytes that parsers branch on.
                const INTERESTING: &[u8] = b"{}[]\",:\n\\0-+.eE\x00\x7f\x80\xff\x9f\xbf\xf9\xfb";
                let i = at.min(m.len() - 1);
                m[i] = INTERESTING[rng.random_range(0..INTERESTING.len())];
            }
            _ => {
                let i = rng.random_range(0..=m.len());
                let j = rng.random_range(i..=m.len());
                let slice = m[i..j].to_vec();
                m.splice(at.min(m.len())..at.min(m.len()), slice);
            }
        }
    }
    m
}

#[test]
fn arbitrary_and_mutated_payloads_never_panic() {
    let mut table = route_table();
    for (n, name) in formats().into_iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(0x5eed + n as u64);
        let corpus = corpus(name);
        let topic = corpus[0].0.clone();
        let codec = table.resolve(&topic).unwrap().0.codec.clone();
        for _ in 0..300 {
            let len = rng.random_range(0..200);
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let _ = decode(codec.as_ref(), &topic, &bytes);
        }
        for (topic, payload) in &corpus {
            for _ in 0..40 {
                let _ = decode(codec.as_ref(), topic, &mutate(&mut rng, payload));
            }
        }
    }
}

#[test]
fn a_truncated_payload_is_an_error_not_a_wrong_reading() {
    let mut table = route_table();
    let mut errors = 0;
    for name in formats() {
        let corpus = corpus(name);
        let codec = table.resolve(&corpus[0].0).unwrap().0.codec.clone();
        for (topic, payload) in &corpus {
            let whole = decode(codec.as_ref(), topic, payload).unwrap();
            for cut in 0..payload.len() {
                match decode(codec.as_ref(), topic, &payload[..cut]) {
                    Err(_) => errors += 1,
                    Ok(part) => {
                        // Text encodings may end in whitespace or base64 padding, which carry
                        // nothing.
                        let rest = &payload[cut..];
                        let only_space = rest.iter().all(|c| c.is_ascii_whitespace() || *c == b'=');
                        assert!(
                            only_space || part.len() < whole.len(),
                            "{name}: cut at {cut} of {} decoded as the whole",
                            payload.len()
                        );
                        assert_eq!(
                            part[..],
                            whole[..part.len()],
                            "{name}: cut at {cut} changed a reading"
                        );
                    }
                }
            }
        }
    }
    assert!(errors > 10_000, "{errors}");
}

#[test]
fn every_codec_refuses_an_empty_payload_as_empty() {
    let mut table = route_table();
    let mut codecs = Vec::new();
    for name in formats() {
        let topic = corpus(name)[0].0.clone();
        let codec = table.resolve(&topic).unwrap().0.codec.clone();
        let e = decode(codec.as_ref(), &topic, b"").unwrap_err();
        assert_eq!(e.reason, Reason::Empty, "{name}: {e}");
        codecs.push(codec.name());
    }
    let all: Vec<&str> = CodecName::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(codecs, all, "every codec was tried");
}
