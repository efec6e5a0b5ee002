//! Writes fixtures/formats/*.jsonl: for each device format of pipelines/formats.toml, a
//! recorded-style stream of ten minutes from a few devices, with malformed messages mixed in.
//! Each line says what the edge should make of it (`expect`): the readings in canonical units,
//! worked out here from the specifications, or the dead-letter reason.
//!
//! ```sh
//! cargo run --example gen_format_fixtures -- fixtures/formats
//! ```

use std::fmt::Write as _;
use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// 2024-03-01T00:00:00Z
const T0: i64 = 1_709_251_200;
const MESSAGES: usize = 60;

enum Payload {
    Json(Value),
    Text(String),
    Bytes(Vec<u8>),
}

struct Stream {
    lines: String,
    t_ms: u64,
}

impl Stream {
    fn new() -> Self {
        Stream {
            lines: String::new(),
            t_ms: 0,
        }
    }

    fn push(&mut self, rng: &mut StdRng, topic: &str, payload: Payload, expect: Value) {
        self.t_ms += rng.random_range(2_000..18_000);
        let mut line = json!({"t_ms": self.t_ms, "topic": topic, "qos": 1, "expect": expect});
        match payload {
            Payload::Json(v) => line["payload"] = v,
            Payload::Text(s) => line["payload"] = Value::String(s),
            Payload::Bytes(b) => line["payload_b64"] = Value::String(B64.encode(b)),
        }
        writeln!(self.lines, "{line}").unwrap();
    }

    /// Device time of the next message, in seconds.
    fn now(&self) -> i64 {
        T0 + (self.t_ms / 1000) as i64
    }
}

fn readings(r: &[(&str, Value)]) -> Value {
    json!({ "readings": r.iter().map(|(m, v)| json!([m, v])).collect::<Vec<_>>() })
}

fn dead(reason: &str) -> Value {
    json!({ "dead_letter": reason })
}

fn f_to_c(f: f64) -> f64 {
    (f - 32.0) * 5.0 / 9.0
}

/// IEEE 11073 SFLOAT of mantissa × 10^exponent.
fn sfloat(mantissa: i16, exponent: i8) -> [u8; 2] {
    ((((exponent as u16) & 0xF) << 12) | ((mantissa as u16) & 0x0FFF)).to_le_bytes()
}

fn float(mantissa: i32, exponent: i8) -> [u8; 4] {
    ((((exponent as u32) & 0xFF) << 24) | ((mantissa as u32) & 0x00FF_FFFF)).to_le_bytes()
}

fn date_time(t: i64) -> Vec<u8> {
    use chrono::{Datelike, Timelike};
    let d = chrono::DateTime::from_timestamp(t, 0).unwrap();
    let mut b = (d.year() as u16).to_le_bytes().to_vec();
    b.extend([
        d.month() as u8,
        d.day() as u8,
        d.hour() as u8,
        d.minute() as u8,
        d.second() as u8,
    ]);
    b
}

/// Whether message `i` of a stream is one of its malformed ones, and which.
fn malformed(i: usize, kinds: usize) -> Option<usize> {
    (i % 7 == 3).then_some((i / 7) % kinds)
}

fn senml_json(rng: &mut StdRng) -> String {
    let mut s = Stream::new();
    for i in 0..MESSAGES {
        let dev = format!("thermo-{}", i % 3);
        let topic = format!("senml/{dev}");
        let bn = format!("urn:dev:mac:0024befffe80{:04x}:", i % 3);
        let hr = rng.random_range(55..110) as f64;
        let t = s.now();
        if let Some(k) = malformed(i, 6) {
            let (p, reason) = match k {
                0 => (
                    json!([{"bn": bn, "bt": t, "bver": 11, "n": "hr", "v": hr}]),
                    "version",
                ),
                1 => (
                    json!([{"bn": bn, "n": "hr", "v": hr, "crit_": 1}]),
                    "structure",
                ),
                2 => (json!([{"bn": bn, "n": "battery", "v": 80}]), "unknown_name"),
                3 => (json!([{"bn": bn, "n": "temp", "vb": true}]), "bad_type"),
                4 => (json!([]), "empty"),
                _ => {
                    let text = format!(r#"[{{"bn":"{bn}","n":"hr","v":{hr}"#);
                    s.push(rng, &topic, Payload::Text(text), dead("syntax"));
                    continue;
                }
            };
            s.push(rng, &topic, Payload::Json(p), dead(reason));
            continue;
        }
        let (temp, unit, want) = if i % 5 == 0 {
            let f = (rng.random_range(975..1030) as f64) / 10.0;
            (f, "[degF]", f_to_c(f))
        } else {
            let c = (rng.random_range(360..395) as f64) / 10.0;
            (c, "Cel", c)
        };
        let mut pack = vec![
            json!({"bn": bn, "bt": t, "n": "temp", "u": unit, "v": temp}),
            json!({"n": "hr", "u": "/min", "v": hr, "t": -1}),
        ];
        let mut expect = vec![("body_temp", json!(want)), ("heart_rate", json!(hr))];
        if i % 4 == 0 {
            pack.push(json!({"n": "avpu", "vs": "A"}));
            expect.push(("consciousness", json!("A")));
        }
        s.push(
            rng,
            &topic,
            Payload::Json(Value::Array(pack)),
            readings(&expect),
        );
    }
    s.lines
}

fn senml_cbor(rng: &mut StdRng) -> String {
    use minicbor::Encoder;
    let mut s = Stream::new();
    for i in 0..MESSAGES {
        let topic = format!("senml-cbor/coap-{}", i % 2);
        let t = s.now();
        let spo2 = rng.random_range(90..100) as f64;
        let temp = 36.5 + (i % 10) as f64 / 10.0;
        let mut e = Encoder::new(Vec::new());
        // [{-2: bn, -3: bt, 0: "spo2", 1: "%", 2: spo2 / 100}, {0: "temp", 1: "Cel", 2: temp}]:
        // SenML's `%` is the deprecated name of the ratio `/` (RFC 8428 section 12.1).
        e.array(2).unwrap();
        e.map(5).unwrap();
        e.i8(-2)
            .unwrap()
            .str(&format!("urn:dev:ow:10e2{i:04}:"))
            .unwrap();
        e.i8(-3).unwrap().i64(t).unwrap();
        e.u8(0).unwrap().str("spo2").unwrap();
        e.u8(1).unwrap().str("%").unwrap();
        e.u8(2).unwrap().f64(spo2 / 100.0).unwrap();
        e.map(3).unwrap();
        e.u8(0).unwrap().str("temp").unwrap();
        e.u8(1).unwrap().str("Cel").unwrap();
        e.u8(2).unwrap().f64(temp).unwrap();
        let good = e.into_writer();
        if let Some(k) = malformed(i, 4) {
            let (bytes, reason) = match k {
                0 => (good[..good.len() - 5].to_vec(), "truncated"),
                1 => ([good.clone(), vec![0x00]].concat(), "structure"),
                2 => {
                    let mut e = Encoder::new(Vec::new());
                    e.array(1).unwrap().map(3).unwrap();
                    e.u8(0).unwrap().str("spo2").unwrap();
                    e.u8(2).unwrap().u8(97).unwrap();
                    e.i8(-1).unwrap().u8(11).unwrap();
                    (e.into_writer(), "version")
                }
                _ => {
                    let mut e = Encoder::new(Vec::new());
                    e.array(1).unwrap().map(3).unwrap();
                    e.u8(0).unwrap().str("spo2").unwrap();
                    e.u8(2).unwrap().u8(97).unwrap();
                    e.str("alarm_").unwrap().bool(true).unwrap();
                    (e.into_writer(), "structure")
                }
            };
            s.push(rng, &topic, Payload::Bytes(bytes), dead(reason));
            continue;
        }
        s.push(
            rng,
            &topic,
            Payload::Bytes(good),
            readings(&[("spo2", json!(spo2)), ("body_temp", json!(temp))]),
        );
    }
    s.lines
}

fn ble_2a37(rng: &mut StdRng) -> String {
    let mut s = Stream::new();
    for i in 0..MESSAGES {
        let topic = format!("ble/strap-{}/2a37", i % 2);
        let hr: u16 = rng.random_range(50..190);
        if let Some(k) = malformed(i, 3) {
            let (bytes, reason) = match k {
                0 => (vec![0x01, hr as u8], "truncated"),
                1 => (vec![0x10, hr as u8, 0x21], "truncated"),
                _ => (vec![0x00, hr as u8, 0x00], "structure"),
            };
            s.push(rng, &topic, Payload::Bytes(bytes), dead(reason));
            continue;
        }
        let mut flags = 0x06u8; // sensor contact supported and detected
        let mut bytes = vec![];
        let mut expect = vec![("heart_rate", json!(hr))];
        if i % 6 == 5 {
            flags = 0x04; // supported, not detected
        }
        if hr > 150 {
            flags |= 0x01;
            bytes.extend(hr.to_le_bytes());
        } else {
            bytes.push(hr as u8);
        }
        if i % 5 == 0 {
            flags |= 0x08;
            let kj: u16 = 100 + i as u16;
            bytes.extend(kj.to_le_bytes());
            expect.push(("energy_expended", json!(kj)));
        }
        if i % 2 == 0 {
            flags |= 0x10;
            for _ in 0..rng.random_range(1..4) {
                let rr: u16 = (60_000 / hr as u32 * 1024 / 1000) as u16;
                bytes.extend(rr.to_le_bytes());
                expect.push(("rr_interval", json!(rr as f64 * 1000.0 / 1024.0)));
            }
        }
        bytes.insert(0, flags);
        s.push(rng, &topic, Payload::Bytes(bytes), readings(&expect));
    }
    s.lines
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

fn ble_2a1c(rng: &mut StdRng) -> String {
    let mut s = Stream::new();
    for i in 0..MESSAGES {
        let topic = format!("ble/thermo-{}/2a1c", i % 2);
        let t = s.now();
        let fahrenheit = i % 4 == 1;
        let (mantissa, want) = if fahrenheit {
            let m = rng.random_range(975..1035);
            (m, f_to_c(m as f64 / 10.0))
        } else {
            let m = rng.random_range(3600..3950);
            (m, m as f64 / 100.0)
        };
        let exp = if fahrenheit { -1 } else { -2 };
        let mut b = vec![0x06 | u8::from(fahrenheit)];
        b.extend(float(mantissa, exp));
        b.extend(date_time(t));
        b.push(if i % 2 == 0 { 6 } else { 1 }); // mouth / armpit
        if let Some(k) = malformed(i, 4) {
            let (text, reason) = match k {
                0 => (hex(&b[..b.len() - 1]), "truncated"),
                1 => {
                    let mut nan = b.clone();
                    nan[1..5].copy_from_slice(&float(0x7F_FFFF, 0));
                    (hex(&nan), "bad_value")
                }
                2 => {
                    let mut bad = b.clone();
                    bad[7] = 13; // month 13
                    (hex(&bad), "bad_time")
                }
                _ => (format!("{}Z", hex(&b)), "syntax"),
            };
            s.push(rng, &topic, Payload::Text(text), dead(reason));
            continue;
        }
        let site = if i % 2 == 0 { "mouth" } else { "armpit" };
        let text = if i % 3 == 0 {
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        } else {
            hex(&b)
        };
        s.push(
            rng,
            &topic,
            Payload::Text(text),
            readings(&[("body_temp", json!(want)), ("temp_site", json!(site))]),
        );
    }
    s.lines
}

fn ble_2a35(rng: &mut StdRng) -> String {
    let mut s = Stream::new();
    for i in 0..MESSAGES {
        let topic = format!("ble/cuff-{}/2a35", i % 2);
        let sys: i16 = rng.random_range(95..175);
        let dia: i16 = rng.random_range(55..100);
        let pulse: i16 = rng.random_range(50..120);
        let kpa = i % 5 == 2;
        let mut b = vec![0x1E | u8::from(kpa)]; // time, pulse, user, status
        let mut expect = vec![];
        if kpa {
            // 16.0 kPa is sent as 160 × 10^-1.
            let (sk, dk) = (sys * 2 / 15, dia * 2 / 15);
            b.extend(sfloat(sk * 10, -1));
            b.extend(sfloat(dk * 10, -1));
            expect.push(("bp_systolic", json!(sk as f64 * 7.50062)));
            expect.push(("bp_diastolic", json!(dk as f64 * 7.50062)));
        } else {
            b.extend(sfloat(sys, 0));
            b.extend(sfloat(dia, 0));
            expect.push(("bp_systolic", json!(sys)));
            expect.push(("bp_diastolic", json!(dia)));
        }
        if i % 3 == 0 {
            b.extend(sfloat(0x07FF, 0)); // mean not computed: NaN
        } else {
            let mean = (sys + 2 * dia) / 3;
            if kpa {
                let mk = mean * 2 / 15;
                b.extend(sfloat(mk * 10, -1));
                expect.push(("bp_mean", json!(mk as f64 * 7.50062)));
            } else {
                b.extend(sfloat(mean, 0));
                expect.push(("bp_mean", json!(mean)));
            }
        }
        b.extend(if i % 4 == 0 {
            vec![0, 0, 4, 17, 20, 41, 59] // year 0: the cuff does not know the date
        } else {
            date_time(s.now())
        });
        b.extend(sfloat(pulse, 0));
        expect.push(("pulse_rate", json!(pulse)));
        b.push((i % 3) as u8); // user 0 (unmapped), 1, 2
        b.extend(0x0004u16.to_le_bytes()); // irregular pulse
        if let Some(k) = malformed(i, 3) {
            let (text, reason) = match k {
                0 => (B64.encode(&b[..9]), "truncated"),
                1 => ("not*base64".to_owned(), "syntax"),
                _ => (B64.encode([&b[..], &[0u8][..]].concat()), "structure"),
            };
            s.push(rng, &topic, Payload::Text(text), dead(reason));
            continue;
        }
        s.push(
            rng,
            &topic,
            Payload::Text(B64.encode(&b)),
            readings(&expect),
        );
    }
    s.lines
}

fn ble_2a5e(rng: &mut StdRng) -> String {
    let mut s = Stream::new();
    for i in 0..MESSAGES {
        let topic = format!("ble/oxi-{}/2a5e", i % 2);
        let spo2: i16 = rng.random_range(880..1000);
        let pr: i16 = rng.random_range(55..130);
        let mut b = vec![0x0F]; // time, measurement status, device status, PAI
        b.extend(sfloat(spo2, -1));
        b.extend(sfloat(pr, 0));
        b.extend(date_time(s.now()));
        b.extend(0x0000u16.to_le_bytes());
        b.extend([0, 0, 0]);
        let pai: i16 = rng.random_range(20..120);
        b.extend(sfloat(pai, -1));
        if let Some(k) = malformed(i, 2) {
            let (bytes, reason) = match k {
                0 => (b[..b.len() - 1].to_vec(), "truncated"),
                _ => {
                    let mut nan = b.clone();
                    nan[1..3].copy_from_slice(&sfloat(0x07FF, 0));
                    nan[3..5].copy_from_slice(&sfloat(0x0800, 0));
                    nan[17..19].copy_from_slice(&sfloat(0x0801, 0));
                    (nan, "bad_value")
                }
            };
            s.push(rng, &topic, Payload::Bytes(bytes), dead(reason));
            continue;
        }
        s.push(
            rng,
            &topic,
            Payload::Bytes(b),
            readings(&[
                ("spo2", json!(spo2 as f64 / 10.0)),
                ("pulse_rate", json!(pr)),
                ("perfusion_index", json!(pai as f64 / 10.0)),
            ]),
        );
    }
    s.lines
}

fn ble_2a5f(rng: &mut StdRng) -> String {
    let mut s = Stream::new();
    for i in 0..MESSAGES {
        let topic = format!("ble/oxi-{}/2a5f", i % 3);
        let spo2: i16 = rng.random_range(88..100);
        let pr: i16 = rng.random_range(55..130);
        let mut b = vec![0x01]; // fast pair present
        let mut expect = vec![];
        if i % 9 == 8 {
            b.extend(sfloat(0x07FE, 0)); // +INF: beyond the oximeter's range
            expect.push(("spo2", Value::Null));
        } else {
            b.extend(sfloat(spo2, 0));
            expect.push(("spo2", json!(spo2)));
        }
        b.extend(sfloat(pr, 0));
        expect.push(("pulse_rate", json!(pr)));
        b.extend(sfloat(spo2, 0));
        b.extend(sfloat(pr + 1, 0));
        expect.push(("spo2_fast", json!(spo2)));
        expect.push(("pulse_rate_fast", json!(pr + 1)));
        if let Some(k) = malformed(i, 2) {
            let (bytes, reason) = match k {
                0 => (b[..6].to_vec(), "truncated"),
                _ => (
                    [[0x00].as_slice(), &sfloat(0x07FF, 0), &sfloat(0x07FF, 0)].concat(),
                    "bad_value",
                ),
            };
            s.push(rng, &topic, Payload::Bytes(bytes), dead(reason));
            continue;
        }
        s.push(rng, &topic, Payload::Bytes(b), readings(&expect));
    }
    s.lines
}

fn ble_gatt(rng: &mut StdRng) -> String {
    let mut s = Stream::new();
    for i in 0..MESSAGES {
        let topic = format!("gw/gw-{}/ble", i % 2);
        let mac = format!("C0:FF:EE:00:00:{:02X}", i % 4);
        let ts = chrono::DateTime::from_timestamp(s.now(), 0)
            .unwrap()
            .to_rfc3339();
        if let Some(k) = malformed(i, 3) {
            let (p, reason) = match k {
                0 => (
                    json!({"mac": mac, "uuid": "2a19", "value": "ZA==", "ts": ts}),
                    "unknown_name",
                ),
                1 => (
                    json!({"mac": mac, "uuid": "2a37", "ts": ts}),
                    "missing_field",
                ),
                _ => (
                    json!({"mac": mac, "uuid": "2a37", "value": "AFU=", "ts": "noon"}),
                    "bad_time",
                ),
            };
            s.push(rng, &topic, Payload::Json(p), dead(reason));
            continue;
        }
        let (uuid, bytes, expect) = if i % 2 == 0 {
            let hr: u8 = rng.random_range(50..120);
            (
                "00002a37-0000-1000-8000-00805f9b34fb",
                vec![0x06, hr],
                vec![("heart_rate", json!(hr))],
            )
        } else {
            let spo2: i16 = rng.random_range(90..100);
            let pr: i16 = rng.random_range(55..100);
            let b = [[0x00].as_slice(), &sfloat(spo2, 0), &sfloat(pr, 0)].concat();
            (
                "2A5F",
                b,
                vec![("spo2", json!(spo2)), ("pulse_rate", json!(pr))],
            )
        };
        let p =
            json!({"mac": mac, "uuid": uuid, "value": B64.encode(bytes), "ts": ts, "rssi": -60});
        s.push(rng, &topic, Payload::Json(p), readings(&expect));
    }
    s.lines
}

fn fhir_obs(loinc: (&str, &str), value: f64, ucum: &str, t: &str, patient: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": loinc.0, "code": loinc.1}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "effectiveDateTime": t,
        "valueQuantity": {"value": value, "unit": ucum, "system": "http://unitsofmeasure.org", "code": ucum}
    })
}

fn fhir(rng: &mut StdRng) -> String {
    const LOINC: &str = "http://loinc.org";
    let mut s = Stream::new();
    for i in 0..MESSAGES {
        let topic = format!("fhir/monitor-{}", i % 2);
        let t = chrono::DateTime::from_timestamp(s.now(), 0)
            .unwrap()
            .with_timezone(&chrono::FixedOffset::east_opt(3600).unwrap())
            .to_rfc3339();
        let patient = format!("p{}", i % 4);
        let hr = rng.random_range(50..130) as f64;
        if let Some(k) = malformed(i, 4) {
            let mut o = fhir_obs((LOINC, "8867-4"), hr, "/min", &t, &patient);
            let reason = match k {
                0 => {
                    o["status"] = json!("entered-in-error");
                    "status"
                }
                1 => {
                    o["effectiveDateTime"] = json!("2024-03");
                    "bad_time"
                }
                2 => {
                    o["code"]["coding"][0]["code"] = json!("29463-7"); // body weight
                    "unknown_name"
                }
                _ => {
                    o["valueQuantity"]["code"] = json!("kg");
                    o["valueQuantity"]["unit"] = json!("kg");
                    "bad_unit"
                }
            };
            s.push(rng, &topic, Payload::Json(o), dead(reason));
            continue;
        }
        let (p, expect) = match i % 4 {
            0 => (
                fhir_obs((LOINC, "8867-4"), hr, "/min", &t, &patient),
                vec![("heart_rate", json!(hr))],
            ),
            1 => {
                let f = rng.random_range(970..1020) as f64 / 10.0;
                (
                    fhir_obs((LOINC, "8331-1"), f, "[degF]", &t, &patient),
                    vec![("body_temp", json!(f_to_c(f)))],
                )
            }
            2 => {
                let (sys, dia) = (
                    rng.random_range(100..160) as f64,
                    rng.random_range(60..95) as f64,
                );
                let panel = json!({
                "resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
                "subject": {"reference": format!("Patient/{patient}")},
                "effectivePeriod": {"start": t},
                "component": [
                    {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                     "valueQuantity": {"value": sys, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
                    {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                     "valueQuantity": {"value": dia, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}
                ]});
                (
                    panel,
                    vec![("bp_systolic", json!(sys)), ("bp_diastolic", json!(dia))],
                )
            }
            _ => {
                let spo2 = rng.random_range(90..100) as f64;
                let bundle = json!({
                "resourceType": "Bundle", "type": "collection",
                "entry": [
                    {"resource": {"resourceType": "Patient", "id": patient}},
                    {"resource": fhir_obs(("urn:iso:std:iso:11073:10101", "150456"), spo2, "%", &t, &patient)},
                    {"resource": fhir_obs((LOINC, "8867-4"), hr, "/min", &t, &patient)}
                ]});
                (
                    bundle,
                    vec![("spo2", json!(spo2)), ("heart_rate", json!(hr))],
                )
            }
        };
        s.push(rng, &topic, Payload::Json(p), readings(&expect));
    }
    s.lines
}

fn omh(rng: &mut StdRng) -> String {
    let mut s = Stream::new();
    for i in 0..MESSAGES {
        let topic = format!("omh/phone-{}", i % 2);
        let t = chrono::DateTime::from_timestamp(s.now(), 0)
            .unwrap()
            .with_timezone(&chrono::FixedOffset::west_opt(5 * 3600).unwrap())
            .to_rfc3339();
        let frame = json!({"date_time": t});
        if let Some(k) = malformed(i, 3) {
            let (p, reason) = match k {
                0 => (
                    json!({"heart_rate": {"value": 70}, "effective_time_frame": frame}),
                    "structure",
                ),
                1 => (
                    json!({"heart_rate": {"value": 70, "unit": "mmHg"}, "effective_time_frame": frame}),
                    "bad_unit",
                ),
                _ => (
                    json!({"header": {"schema_id": {"namespace": "omh", "name": "step-count", "version": "2.0"}},
                           "body": {"step_count": {"value": 1200, "unit": "steps"}}}),
                    "unknown_name",
                ),
            };
            s.push(rng, &topic, Payload::Json(p), dead(reason));
            continue;
        }
        let (p, expect) = match i % 3 {
            0 => {
                let hr = rng.random_range(50..120) as f64;
                (
                    json!({"header": {"id": format!("dp-{i}"), "creation_date_time": t,
                                      "schema_id": {"namespace": "omh", "name": "heart-rate", "version": "1.1"}},
                           "body": {"heart_rate": {"value": hr, "unit": "beats/min"}, "effective_time_frame": frame}}),
                    vec![("heart_rate", json!(hr))],
                )
            }
            1 => {
                let f = rng.random_range(970..1020) as f64 / 10.0;
                (
                    json!({"body_temperature": {"value": f, "unit": "F"}, "effective_time_frame": frame,
                           "measurement_location": "oral"}),
                    vec![
                        ("body_temp", json!(f_to_c(f))),
                        ("temp_site", json!("oral")),
                    ],
                )
            }
            _ => {
                let spo2 = rng.random_range(90..100) as f64;
                let rr = rng.random_range(10..24) as f64;
                (
                    json!([
                        {"oxygen_saturation": {"value": spo2, "unit": "%"}, "effective_time_frame": frame},
                        {"respiratory_rate": {"value": rr, "unit": "breaths/min"}, "effective_time_frame": frame}
                    ]),
                    vec![("spo2", json!(spo2)), ("resp_rate", json!(rr))],
                )
            }
        };
        s.push(rng, &topic, Payload::Json(p), readings(&expect));
    }
    s.lines
}

fn csv(rng: &mut StdRng) -> String {
    let mut s = Stream::new();
    for i in 0..MESSAGES {
        let topic = format!("csv/serial-{}", i % 2);
        let mut text = String::new();
        let mut expect = vec![];
        for line in 0..(1 + i % 2) {
            let t = chrono::DateTime::from_timestamp(s.now() + line as i64, 0)
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let hr = rng.random_range(50..130);
            let spo2 = rng.random_range(90..100);
            let f = rng.random_range(970..1020) as f64 / 10.0;
            let avpu = if i % 5 == 0 { "A" } else { "" };
            writeln!(text, "{t},bed-{},{hr},{spo2},{f:.1},{avpu}", i % 4).unwrap();
            expect.push(("heart_rate", json!(hr)));
            expect.push(("spo2", json!(spo2)));
            expect.push(("body_temp", json!(f_to_c(f))));
            if !avpu.is_empty() {
                expect.push(("consciousness", json!(avpu)));
            }
        }
        if let Some(k) = malformed(i, 3) {
            let (bad, reason) = match k {
                0 => (text.trim_end().to_owned(), "truncated"),
                1 => (text.replacen(",bed-", ",bed,", 1), "structure"),
                _ => {
                    // The heart-rate cell of the first line garbled by the serial link.
                    let mut cells: Vec<&str> = text.split(',').collect();
                    cells[2] = "7?";
                    (cells.join(","), "bad_value")
                }
            };
            s.push(rng, &topic, Payload::Text(bad), dead(reason));
            continue;
        }
        s.push(rng, &topic, Payload::Text(text), readings(&expect));
    }
    s.lines
}

fn vendor_json(rng: &mut StdRng) -> String {
    let mut s = Stream::new();
    for i in 0..MESSAGES {
        let topic = format!("json/wearable-{}", i % 3);
        let n = 1 + i % 4;
        let mut samples = vec![];
        let mut expect = vec![];
        for k in 0..n {
            let t = (s.now() * 1000) + k as i64 * 250;
            let hr = rng.random_range(50..130);
            let mut sample = json!({"t": t, "hr": hr});
            expect.push(("heart_rate", json!(hr)));
            if k == 0 {
                let rr = rng.random_range(10..24);
                sample["rr"] = json!(rr);
                expect.push(("resp_rate", json!(rr)));
            }
            samples.push(sample);
        }
        if let Some(k) = malformed(i, 3) {
            let (p, reason) = match k {
                0 => (
                    Payload::Json(json!({"samples": {"t": 1, "hr": 70}})),
                    "bad_type",
                ),
                1 => (
                    Payload::Json(json!({"samples": [{"t": 1709251200000i64, "hr": "seventy"}]})),
                    "bad_type",
                ),
                _ => (
                    Payload::Text(r#"{"samples":[{"t":1709251200000,"hr":70}"#.into()),
                    "syntax",
                ),
            };
            s.push(rng, &topic, p, dead(reason));
            continue;
        }
        s.push(
            rng,
            &topic,
            Payload::Json(json!({"device": "wb", "samples": samples})),
            readings(&expect),
        );
    }
    s.lines
}

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fixtures/formats".into()),
    );
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    type Generator = fn(&mut StdRng) -> String;
    let formats: [(&str, Generator); 12] = [
        ("senml-json", senml_json),
        ("senml-cbor", senml_cbor),
        ("ble-2a37", ble_2a37),
        ("ble-2a1c", ble_2a1c),
        ("ble-2a35", ble_2a35),
        ("ble-2a5e", ble_2a5e),
        ("ble-2a5f", ble_2a5f),
        ("ble-gatt", ble_gatt),
        ("fhir", fhir),
        ("omh", omh),
        ("csv", csv),
        ("json", vendor_json),
    ];
    for (name, generate) in formats {
        let path = dir.join(format!("{name}.jsonl"));
        std::fs::write(&path, generate(&mut rng)).unwrap();
        eprintln!("wrote {}", path.display());
    }
}
