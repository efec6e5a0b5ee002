use serde_json::Value;

use super::pulse_oximetry::{device_status_flags, measurement_status_flags};
use super::*;
use crate::codec::decode_to_readings;
use crate::codec::test_util::{msg, RECEIVED};
use crate::model::reading::{flags, Reading};

fn vectors() -> Value {
    serde_json::from_str(include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/vectors/ble-gatt.json"
    )))
    .unwrap()
}

fn codec(c: Characteristic, opts: &str) -> BleCodec {
    toml::from_str::<BleOptions>(opts)
        .unwrap()
        .build(Some(c))
        .unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    let mut buf = [0u8; MAX_ATTRIBUTE];
    crate::codec::encoding::hex_to_bytes(s.as_bytes(), &mut buf)
        .unwrap()
        .to_vec()
}

fn one(r: &[Reading], m: Metric) -> &Reading {
    let found: Vec<_> = r.iter().filter(|x| x.metric == m).collect();
    assert_eq!(found.len(), 1, "{m} in {r:?}");
    found[0]
}

fn hex_u32(v: &Value) -> u32 {
    u32::from_str_radix(v.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
}

/// Every field the BLE vectors (tests/vectors/ble-gatt.json) state is checked against what the codec stores.
#[test]
fn gatt_vectors() {
    let mut checked = 0;
    for v in vectors()["vectors"].as_array().unwrap() {
        let c = Characteristic::parse(v["characteristic"].as_str().unwrap()).unwrap();
        let codec = codec(c, "[users]\n1 = \"user-one\"\n");
        let payload = hex(v["hex"].as_str().unwrap());
        let result = decode_to_readings(&codec, &msg(&payload));
        let expect = match &v["expect"] {
            Value::String(s) => {
                assert!(s.starts_with("invalid"), "{v}");
                let e = result.unwrap_err();
                assert_eq!(e.reason, Reason::Truncated, "{v}");
                checked += 1;
                continue;
            }
            e => e.as_object().unwrap().clone(),
        };
        let r = result.unwrap_or_else(|e| panic!("{v}: {e}"));
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        let mut quality = 0u16;
        for (key, want) in &expect {
            let metric = match key.as_str() {
                "heart_rate" => Some(Metric::HeartRate),
                "energy_expended_kJ" => Some(Metric::EnergyExpended),
                "body_temp_Cel" => Some(Metric::BodyTemp),
                "bp_systolic_mm[Hg]" => Some(Metric::BpSystolic),
                "bp_diastolic_mm[Hg]" => Some(Metric::BpDiastolic),
                "bp_mean_mm[Hg]" => Some(Metric::BpMean),
                "pulse_rate" => Some(Metric::PulseRate),
                "spo2" => Some(Metric::Spo2),
                "pulse_amplitude_index" => Some(Metric::PerfusionIndex),
                _ => None,
            };
            if let Some(m) = metric {
                let got = one(&r, m);
                assert!(
                    close(got.value.unwrap(), want.as_f64().unwrap()),
                    "{key}: {v}"
                );
                assert_eq!(got.unit, m.unit());
                continue;
            }
            match key.as_str() {
                "name" => {}
                "sensor_contact" => {
                    let hr = one(&r, Metric::HeartRate);
                    let no_contact = want == "supported, not detected";
                    assert_eq!(hr.flags & flags::NO_CONTACT != 0, no_contact, "{v}");
                }
                "rr_intervals_1_1024_s" => {
                    let rr: Vec<f64> = r
                        .iter()
                        .filter(|x| x.metric == Metric::RrInterval)
                        .map(|x| x.value.unwrap())
                        .collect();
                    let want: Vec<f64> = want
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() * 1000.0 / 1024.0)
                        .collect();
                    assert_eq!(rr, want);
                }
                "time" => {
                    let want = want.as_str().unwrap();
                    for x in &r {
                        if want.starts_with("year 0") {
                            assert_eq!(x.ts, RECEIVED);
                            assert_ne!(x.flags & flags::TIME_FROM_RECEIPT, 0);
                        } else {
                            let t =
                                chrono::NaiveDateTime::parse_from_str(want, "%Y-%m-%dT%H:%M:%S")
                                    .unwrap();
                            assert_eq!(x.ts, t.and_utc().timestamp_micros(), "{v}");
                            assert_eq!(x.flags & flags::TIME_FROM_RECEIPT, 0);
                            // The vectors' 2012 and 2024 clocks are far from RECEIVED (2023).
                            assert_ne!(x.flags & flags::CLOCK_SUSPECT, 0, "{v}");
                        }
                    }
                }
                "temperature_type" => {
                    let name = temperature::site_name(want.as_u64().unwrap() as u8).unwrap();
                    assert_eq!(one(&r, Metric::TempSite).text.as_deref(), Some(name));
                }
                "temperature_type_name" => {
                    assert_eq!(one(&r, Metric::TempSite).text.as_deref(), want.as_str());
                }
                "user_id" => {
                    assert_eq!(want, 1);
                    assert!(r.iter().all(|x| x.subject.as_deref() == Some("user-one")));
                }
                "status" => {
                    let bits = hex_u32(&Value::String(
                        want.as_str().unwrap().split(':').next().unwrap().into(),
                    ));
                    let (all, _) = blood_pressure::status_flags(bits as u16);
                    assert_eq!(all, flags::QUESTIONABLE | flags::IRREGULAR_PULSE);
                    quality |= all;
                }
                "measurement_status" => quality |= measurement_status_flags(hex_u32(want) as u16),
                "device_sensor_status" => quality |= device_status_flags(hex_u32(want)),
                other => panic!("vector field {other} not checked"),
            }
        }
        for x in &r {
            // What the edge adds itself (receipt time, plausibility, clock) is checked above.
            let edge_bits = flags::TIME_FROM_RECEIPT | flags::OUT_OF_RANGE | flags::CLOCK_SUSPECT;
            let device_bits = x.flags & !edge_bits;
            assert_eq!(device_bits & !flags::NO_CONTACT, quality, "{v}: {x:?}");
        }
        checked += 1;
    }
    assert_eq!(checked, vectors()["vectors"].as_array().unwrap().len());
}

#[test]
fn plx_status_bits_become_flags() {
    // The spot-check vector: questionable measurement + equipment malfunction, low perfusion.
    assert_eq!(measurement_status_flags(0x4020), flags::QUESTIONABLE);
    assert_eq!(
        device_status_flags(0x22),
        flags::INVALID | flags::QUESTIONABLE
    );
    assert_eq!(measurement_status_flags(1 << 9), flags::FROM_STORAGE);
    assert_eq!(device_status_flags(1 << 15), flags::NO_CONTACT);
}

#[test]
fn special_values_never_become_numbers() {
    let bp = codec(Characteristic::BloodPressure, "");
    // Systolic +INF, diastolic 88, mean NaN.
    let r = decode_to_readings(&bp, &msg(&hex("00 FE07 5800 FF07"))).unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].metric, Metric::BpSystolic);
    assert_eq!(r[0].value, None);
    assert_ne!(r[0].flags & flags::BEYOND_RANGE, 0);
    assert_eq!(r[1].value, Some(88.0));
    // Nothing usable at all: refused.
    let e = decode_to_readings(&bp, &msg(&hex("00 FF07 0008 0108"))).unwrap_err();
    assert_eq!(e.reason, Reason::BadValue);
    let t = codec(Characteristic::Temperature, "");
    let e = decode_to_readings(&t, &msg(&hex("04 FFFF7F00 02"))).unwrap_err();
    assert_eq!(e.reason, Reason::BadValue);
}

#[test]
fn units_flags_and_fields() {
    // 2A1C in °F (flags bit 0): 98.6 °F = 0xFF0003DA → 37 Cel.
    let t = codec(Characteristic::Temperature, "");
    let r = decode_to_readings(&t, &msg(&hex("01 DA0300FF"))).unwrap();
    assert!((r[0].value.unwrap() - 37.0).abs() < 1e-9);
    assert_ne!(r[0].flags & flags::TIME_FROM_RECEIPT, 0);
    // 2A35 in kPa: 16.0 kPa systolic (0xF0A0 = 160 e-1), 10.7 diastolic, 13.3 mean.
    let bp = codec(Characteristic::BloodPressure, "");
    let r = decode_to_readings(&bp, &msg(&hex("01 A0F0 6BF0 85F0"))).unwrap();
    assert!((r[0].value.unwrap() - 16.0 * 7.50062).abs() < 1e-9);
    assert_eq!(r[0].unit, "mm[Hg]");
    // 2A37 with a uint16 heart rate and contact detected: no flag.
    let hr = codec(Characteristic::HeartRate, "");
    let r = decode_to_readings(&hr, &msg(&hex("07 2C01"))).unwrap();
    assert_eq!(r[0].value, Some(300.0));
    assert_eq!(r[0].flags & flags::NO_CONTACT, 0);
    // A heart rate outside the plausible range is kept and flagged.
    let r = decode_to_readings(&hr, &msg(&hex("01 F401"))).unwrap();
    assert_eq!(r[0].value, Some(500.0));
    assert_ne!(r[0].flags & flags::OUT_OF_RANGE, 0);
    // Pulse rate out of the cuff's range (status bits 3-4 = 01).
    let r = decode_to_readings(&bp, &msg(&hex("14 7800 5000 5A00 B400 0800"))).unwrap();
    let pulse = one(&r, Metric::PulseRate);
    assert_ne!(pulse.flags & flags::OUT_OF_RANGE, 0);
    assert_eq!(one(&r, Metric::BpSystolic).flags & flags::OUT_OF_RANGE, 0);
    // PLX continuous with fast and slow pairs.
    let c = codec(Characteristic::PlxContinuous, "");
    let r = decode_to_readings(&c, &msg(&hex("03 6100 4800 6200 4900 6000 4700"))).unwrap();
    let got: Vec<(Metric, f64)> = r.iter().map(|x| (x.metric, x.value.unwrap())).collect();
    assert_eq!(
        got,
        [
            (Metric::Spo2, 97.0),
            (Metric::PulseRate, 72.0),
            (Metric::Spo2Fast, 98.0),
            (Metric::PulseRateFast, 73.0),
            (Metric::Spo2Slow, 96.0),
            (Metric::PulseRateSlow, 71.0),
        ]
    );
    // PLX spot-check whose device clock is not set: the time stamp is not used.
    let s = codec(Characteristic::PlxSpotCheck, "");
    let r = decode_to_readings(&s, &msg(&hex("11 6100 4800 E8070B1D170839"))).unwrap();
    assert_eq!(r[0].ts, RECEIVED);
}

#[test]
fn malformed_values_are_refused_with_a_reason() {
    let cases: &[(Characteristic, &str, Reason)] = &[
        // Empty everywhere is `empty` (codec::decode_payload), before the codec sees it.
        (Characteristic::HeartRate, "", Reason::Empty),
        (Characteristic::HeartRate, "00", Reason::Truncated),
        (Characteristic::HeartRate, "01 55", Reason::Truncated),
        (Characteristic::HeartRate, "10 55", Reason::Truncated),
        (Characteristic::HeartRate, "10 55 21", Reason::Truncated),
        (Characteristic::HeartRate, "00 55 00", Reason::Structure),
        (
            Characteristic::Temperature,
            "02 B00E00FE DC07",
            Reason::Truncated,
        ),
        (
            Characteristic::Temperature,
            "02 B00E00FE DC07 0D 05 0B 32 1B",
            Reason::BadTime,
        ),
        (
            Characteristic::BloodPressure,
            "00 8A00 5800",
            Reason::Truncated,
        ),
        (
            Characteristic::PlxSpotCheck,
            "08 6100 4800",
            Reason::Truncated,
        ),
        (
            Characteristic::PlxContinuous,
            "04 6100 4800 20",
            Reason::Truncated,
        ),
    ];
    for (c, h, reason) in cases {
        let e = decode_to_readings(&codec(*c, ""), &msg(&hex(h))).unwrap_err();
        assert_eq!(e.reason, *reason, "{c:?} {h}: {e}");
    }
}

#[test]
fn relays_raw_hex_base64_and_json() {
    let raw = hex("1E5532002100");
    let want = decode_to_readings(&codec(Characteristic::HeartRate, ""), &msg(&raw)).unwrap();
    let as_hex = b"0x1e:55:32:00:21:00";
    let r = decode_to_readings(
        &codec(Characteristic::HeartRate, "payload = \"hex\""),
        &msg(as_hex),
    )
    .unwrap();
    assert_eq!(r, want);
    let r = decode_to_readings(
        &codec(Characteristic::HeartRate, "payload = \"base64\""),
        &msg(b"HlUyACEA"),
    )
    .unwrap();
    assert_eq!(r, want);
    let gatt: BleOptions = toml::from_str(
        "payload = \"json\"\n[json]\ndata = \"/v\"\nts = \"/ts\"\nsource = \"/mac\"\ncharacteristic = \"/uuid\"\n",
    )
    .unwrap();
    let gatt = gatt.build(None).unwrap();
    assert_eq!(gatt.name(), "ble-gatt");
    let p = br#"{"mac":"C0:FF:EE:00:00:01","uuid":"00002a37-0000-1000-8000-00805f9b34fb","v":"HlUyACEA","ts":"2024-05-01T10:00:00Z"}"#;
    let r = decode_to_readings(&gatt, &msg(p)).unwrap();
    assert_eq!(r.len(), want.len());
    assert_eq!(r[0].source, "C0:FF:EE:00:00:01");
    assert_eq!(r[0].ts, 1_714_557_600_000_000);
    let e = decode_to_readings(&gatt, &msg(br#"{"uuid":"2a19","v":"ZA=="}"#)).unwrap_err();
    assert_eq!(e.reason, Reason::UnknownName);
    let e = decode_to_readings(&gatt, &msg(br#"{"uuid":"2a37","v":"***"}"#)).unwrap_err();
    assert_eq!(e.reason, Reason::Syntax);
    let e = decode_to_readings(
        &codec(Characteristic::HeartRate, "payload = \"hex\""),
        &msg(b"1e5"),
    )
    .unwrap_err();
    assert_eq!(e.reason, Reason::Syntax);
}

#[test]
fn characteristic_from_a_topic_level() {
    let o: BleOptions = toml::from_str("characteristic = \"{3}\"\n").unwrap();
    let c = o.build(None).unwrap();
    let payload = hex("0055");
    let m = Message {
        topic: "gw/1/2A37",
        ..msg(&payload)
    };
    assert_eq!(decode_to_readings(&c, &m).unwrap()[0].value, Some(85.0));
    let m = Message {
        topic: "gw/1",
        ..msg(&payload)
    };
    assert_eq!(
        decode_to_readings(&c, &m).unwrap_err().reason,
        Reason::Structure
    );
}

#[test]
fn options_are_checked_when_built() {
    let bad: &[(&str, Option<Characteristic>)] = &[
        ("characteristic = \"{3}\"", Some(Characteristic::HeartRate)),
        ("payload = \"json\"", Some(Characteristic::HeartRate)),
        ("[json]\ndata = \"/v\"", Some(Characteristic::HeartRate)),
        (
            "payload = \"json\"\n[json]\ndata = \"v\"",
            Some(Characteristic::HeartRate),
        ),
        ("utc_offset = \"1h\"", Some(Characteristic::HeartRate)),
        ("[users]\n255 = \"x\"", Some(Characteristic::HeartRate)),
    ];
    for (t, c) in bad {
        let o: BleOptions = toml::from_str(t).unwrap();
        assert!(o.build(*c).is_err(), "{t}");
    }
}
