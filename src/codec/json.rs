//! `json`: any vendor JSON, described in the pipeline file instead of code.
//!
//! ```toml
//! [route.json]
//! ts = "/time"              # JSON pointer to the device time (absent: receive time)
//! ts_format = "auto"        # rfc3339 | unix_s | unix_ms | unix_us | auto (a guess by size)
//! subject = "/patient/id"   # optional pointers overriding the topic templates
//! [[route.json.reading]]
//! value = "/hr"             # pointer to the value
//! metric = "heart_rate"     # a fixed metric …
//! unit = "/min"             # … and a fixed unit, or:
//! # metric_at = "/type"     # pointers to the metric name and unit in the payload
//! # unit_at = "/unit"
//! # optional = true         # a missing value is skipped instead of refusing the message
//! ```
//!
//! A message may carry many readings: a top-level JSON array is mapped element by element, and
//! `items = "/samples"` names an array inside the message whose elements are mapped the same
//! way. The pointers then apply to each element.

use serde::Deserialize;
use serde_json::Value;

use super::time::{json_time, TsFormat};
use super::{Codec, DecodeError, Decoded, Message, RawValue, ReadingSink, Reason};
use crate::model::reading::Metric;

/// `[route.json]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonMapping {
    /// Pointer to an array of elements, each mapped like a whole message.
    #[serde(default)]
    pub items: Option<String>,
    #[serde(default)]
    pub ts: Option<String>,
    #[serde(default)]
    pub ts_format: TsFormat,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(rename = "reading")]
    pub readings: Vec<FieldMapping>,
}

/// `[[route.json.reading]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMapping {
    pub value: String,
    #[serde(default)]
    pub metric: Option<Metric>,
    #[serde(default)]
    pub metric_at: Option<String>,
    #[serde(default)]
    pub unit: Option<String>,
    #[serde(default)]
    pub unit_at: Option<String>,
    #[serde(default)]
    pub optional: bool,
}

fn check_pointer(p: &str, key: &str) -> Result<(), String> {
    if p.is_empty() || p.starts_with('/') {
        Ok(())
    } else {
        Err(format!(
            "`{key}` = `{p}` is not a JSON pointer (it must start with /)"
        ))
    }
}

impl JsonMapping {
    pub fn build(&self) -> Result<JsonCodec, String> {
        if self.readings.is_empty() {
            return Err("[route.json] needs at least one [[route.json.reading]]".into());
        }
        for (k, p) in [
            ("items", &self.items),
            ("ts", &self.ts),
            ("source", &self.source),
            ("subject", &self.subject),
        ] {
            if let Some(p) = p {
                check_pointer(p, k)?;
            }
        }
        for f in &self.readings {
            check_pointer(&f.value, "value")?;
            match (&f.metric, &f.metric_at) {
                (Some(_), None) => {}
                (None, Some(p)) => check_pointer(p, "metric_at")?,
                _ => {
                    return Err(
                        "each [[route.json.reading]] sets exactly one of `metric` and `metric_at`"
                            .into(),
                    )
                }
            }
            if f.unit.is_some() && f.unit_at.is_some() {
                return Err("set at most one of `unit` and `unit_at`".into());
            }
            if let Some(p) = &f.unit_at {
                check_pointer(p, "unit_at")?;
            }
            if let (Some(m), Some(u)) = (f.metric, &f.unit) {
                crate::model::units::to_canonical(m, u, 0.0).map_err(|e| e.to_string())?;
            }
        }
        Ok(JsonCodec {
            mapping: self.clone(),
        })
    }
}

#[derive(Debug)]
pub struct JsonCodec {
    mapping: JsonMapping,
}

fn pointer<'v>(doc: &'v Value, p: &str) -> Option<&'v Value> {
    doc.pointer(p).filter(|v| !v.is_null())
}

fn str_at<'v>(doc: &'v Value, p: &str) -> Result<&'v str, DecodeError> {
    match pointer(doc, p) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(DecodeError::new(
            Reason::BadType,
            format!("{p}: expected a string"),
        )),
        None => Err(DecodeError::new(
            Reason::MissingField,
            format!("{p}: missing"),
        )),
    }
}

impl Codec for JsonCodec {
    fn name(&self) -> &'static str {
        "json"
    }

    fn decode(&self, msg: &Message<'_>, out: &mut ReadingSink<'_>) -> Result<(), DecodeError> {
        let doc: Value = serde_json::from_slice(msg.payload).map_err(|e| super::json_error(&e))?;
        let items = match &self.mapping.items {
            Some(p) => match pointer(&doc, p) {
                Some(Value::Array(a)) => a.as_slice(),
                Some(_) => {
                    return Err(DecodeError::new(
                        Reason::BadType,
                        format!("{p}: expected an array"),
                    ))
                }
                None => {
                    return Err(DecodeError::new(
                        Reason::MissingField,
                        format!("{p}: missing"),
                    ))
                }
            },
            None => match &doc {
                Value::Array(a) => a.as_slice(),
                one => std::slice::from_ref(one),
            },
        };
        if items.is_empty() {
            return Err(DecodeError::new(Reason::Empty, "no elements to map"));
        }
        for (i, item) in items.iter().enumerate() {
            self.decode_one(item, out).map_err(|e| {
                if items.len() == 1 {
                    e
                } else {
                    DecodeError::new(e.reason, format!("element {i}: {}", e.detail))
                }
            })?;
        }
        Ok(())
    }
}

impl JsonCodec {
    fn decode_one(&self, doc: &Value, out: &mut ReadingSink<'_>) -> Result<(), DecodeError> {
        if !doc.is_object() {
            return Err(DecodeError::new(
                Reason::Structure,
                "expected a JSON object",
            ));
        }
        let m = &self.mapping;
        let ts = match &m.ts {
            Some(p) => match pointer(doc, p) {
                Some(v) => Some(json_time(v, m.ts_format, p)?),
                None => {
                    return Err(DecodeError::new(
                        Reason::MissingField,
                        format!("{p}: missing"),
                    ))
                }
            },
            None => None,
        };
        let source = m.source.as_deref().map(|p| str_at(doc, p)).transpose()?;
        let subject = m.subject.as_deref().map(|p| str_at(doc, p)).transpose()?;
        let mut pushed = 0;
        for f in &m.readings {
            let value = match pointer(doc, &f.value) {
                Some(v) => v,
                None if f.optional => continue,
                None => {
                    return Err(DecodeError::new(
                        Reason::MissingField,
                        format!("{}: missing", f.value),
                    ))
                }
            };
            let metric = match (f.metric, &f.metric_at) {
                (Some(m), _) => m,
                (None, Some(p)) => {
                    let name = str_at(doc, p)?;
                    Metric::from_name(name).ok_or_else(|| {
                        DecodeError::new(
                            Reason::UnknownName,
                            format!("{p}: not a catalogue metric"),
                        )
                    })?
                }
                (None, None) => unreachable!("checked when the mapping was built"),
            };
            let unit = match (&f.unit, &f.unit_at) {
                (Some(u), _) => u.as_str(),
                (None, Some(p)) => str_at(doc, p)?,
                (None, None) => "",
            };
            let raw = match value {
                Value::Number(n) => RawValue::Number(n.as_f64().unwrap_or(f64::NAN), unit),
                Value::String(s) => RawValue::Text(s),
                _ => {
                    return Err(DecodeError::new(
                        Reason::BadType,
                        format!("{}: expected a number or a string", f.value),
                    ))
                }
            };
            out.push(Decoded {
                ts,
                metric,
                value: raw,
                flags: 0,
                source,
                subject,
            })
            .map_err(|e| DecodeError::new(e.reason, format!("{}: {}", f.value, e.detail)))?;
            pushed += 1;
        }
        if pushed == 0 {
            return Err(DecodeError::new(Reason::Empty, "no mapped value present"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::decode_to_readings;
    use crate::codec::test_util::{msg, RECEIVED};
    use crate::model::reading::flags;

    fn codec(toml_text: &str) -> JsonCodec {
        let m: JsonMapping = toml::from_str(toml_text).unwrap();
        m.build().unwrap()
    }

    const VITALS: &str = r#"
ts = "/ts"
subject = "/patient"
[[reading]]
value = "/hr"
metric = "heart_rate"
unit = "/min"
[[reading]]
value = "/temp_f"
metric = "body_temp"
unit = "[degF]"
optional = true
[[reading]]
value = "/avpu"
metric = "consciousness"
optional = true
"#;

    #[test]
    fn maps_fields_by_pointer() {
        let c = codec(VITALS);
        let p = br#"{"ts":"2024-05-01T10:00:00+02:00","patient":"p-17","hr":72,"temp_f":100.4,"avpu":"A"}"#;
        let r = decode_to_readings(&c, &msg(p)).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].metric, Metric::HeartRate);
        assert_eq!(r[0].value, Some(72.0));
        assert_eq!(r[0].ts, 1_714_550_400_000_000);
        assert_eq!(r[0].subject.as_deref(), Some("p-17"));
        assert_eq!(r[0].source, "dev-1");
        assert!((r[1].value.unwrap() - 38.0).abs() < 1e-9);
        assert_eq!(r[1].unit, "Cel");
        assert_eq!(r[2].text.as_deref(), Some("A"));
        assert_eq!(r[2].value, None);
        assert_eq!(r[0].received, RECEIVED);
    }

    #[test]
    fn optional_values_may_be_missing_required_ones_may_not() {
        let c = codec(VITALS);
        let r =
            decode_to_readings(&c, &msg(br#"{"ts":1714550400,"patient":"p","hr":72}"#)).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].ts, 1_714_550_400_000_000);
        let e = decode_to_readings(&c, &msg(br#"{"ts":1714550400,"patient":"p"}"#)).unwrap_err();
        assert_eq!(e.reason, Reason::MissingField);
        assert!(e.detail.contains("/hr"), "{e}");
    }

    #[test]
    fn metric_and_unit_from_the_payload() {
        let c = codec("[[reading]]\nvalue = \"/v\"\nmetric_at = \"/type\"\nunit_at = \"/u\"\n");
        let r = decode_to_readings(&c, &msg(br#"{"type":"spo2","v":0.96,"u":"1"}"#)).unwrap();
        assert_eq!((r[0].metric, r[0].value), (Metric::Spo2, Some(96.0)));
        assert_ne!(r[0].flags & flags::TIME_FROM_RECEIPT, 0);
        assert_eq!(r[0].ts, RECEIVED);
        let e = decode_to_readings(&c, &msg(br#"{"type":"mood","v":1,"u":"1"}"#)).unwrap_err();
        assert_eq!(e.reason, Reason::UnknownName);
        let e =
            decode_to_readings(&c, &msg(br#"{"type":"spo2","v":96,"u":"mm[Hg]"}"#)).unwrap_err();
        assert_eq!(e.reason, Reason::BadUnit);
    }

    #[test]
    fn implausible_values_are_flagged_not_dropped() {
        let c = codec("[[reading]]\nvalue = \"/hr\"\nmetric = \"heart_rate\"\n");
        let r = decode_to_readings(&c, &msg(br#"{"hr":900}"#)).unwrap();
        assert_eq!(r[0].value, Some(900.0));
        assert_eq!(r[0].flags & flags::OUT_OF_RANGE, flags::OUT_OF_RANGE);
    }

    #[test]
    fn bad_payloads_are_errors_with_reasons() {
        let c = codec(VITALS);
        let cases: &[(&[u8], Reason)] = &[
            (b"{\"ts\":1,", Reason::Syntax),
            (b"\xff\xfe", Reason::Syntax),
            (b"42", Reason::Structure),
            (
                br#"{"ts":"yesterday","patient":"p","hr":1}"#,
                Reason::BadTime,
            ),
            (br#"{"ts":1,"patient":7,"hr":1}"#, Reason::BadType),
            (br#"{"ts":1,"patient":"p","hr":true}"#, Reason::BadType),
            (br#"{"ts":1,"patient":"p","hr":"fast"}"#, Reason::BadType),
        ];
        for (p, reason) in cases {
            let e = decode_to_readings(&c, &msg(p)).unwrap_err();
            assert_eq!(e.reason, *reason, "{}", String::from_utf8_lossy(p));
        }
    }

    #[test]
    fn a_patient_id_is_bounded_and_an_empty_one_is_none() {
        let c = codec(VITALS);
        let long = "7".repeat(300);
        let p = format!(r#"{{"ts":1700000000,"patient":"{long}","hr":72}}"#);
        let e = decode_to_readings(&c, &msg(p.as_bytes())).unwrap_err();
        assert_eq!(e.reason, Reason::BadValue);
        assert_eq!(
            e.detail,
            "/hr: subject from the payload: 300 bytes, above the limit of 256"
        );
        // The route's subject (test_util: bed-1) stands when the payload's is empty.
        let r = decode_to_readings(&c, &msg(br#"{"ts":1700000000,"patient":"","hr":72}"#)).unwrap();
        assert_eq!(r[0].subject.as_deref(), Some("bed-1"));
    }

    #[test]
    fn a_misread_time_unit_is_flagged_clock_suspect() {
        let auto = codec("ts = \"/t\"\n[[reading]]\nvalue = \"/hr\"\nmetric = \"heart_rate\"\n");
        let ms = codec(
            "ts = \"/t\"\nts_format = \"unix_ms\"\n[[reading]]\nvalue = \"/hr\"\nmetric = \"heart_rate\"\n",
        );
        // 9999-12-31T23:59:59Z in ms is above 10^14, so `auto` guesses µs: 1978.
        let p = br#"{"t":253402300799000,"hr":72}"#;
        let r = decode_to_readings(&auto, &msg(p)).unwrap();
        assert_eq!(r[0].ts, 253_402_300_799_000);
        assert_ne!(r[0].flags & flags::CLOCK_SUSPECT, 0);
        // Read as stated, it is 9999: far in the future, and flagged too.
        let r = decode_to_readings(&ms, &msg(p)).unwrap();
        assert_eq!(r[0].ts, 253_402_300_799_000_000);
        assert_ne!(r[0].flags & flags::CLOCK_SUSPECT, 0);
        // A clock reading the receive time's own day is trusted.
        let now_ms = RECEIVED / 1000;
        let p = format!(r#"{{"t":{now_ms},"hr":72}}"#);
        let r = decode_to_readings(&ms, &msg(p.as_bytes())).unwrap();
        assert_eq!((r[0].ts, r[0].flags), (RECEIVED, 0));
    }

    #[test]
    fn arrays_of_readings_in_one_message() {
        let c = codec(VITALS);
        let p = br#"[{"ts":1714550400,"patient":"p","hr":72},{"ts":1714550460,"patient":"p","hr":74,"avpu":"A"}]"#;
        let r = decode_to_readings(&c, &msg(p)).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!((r[1].value, r[1].ts), (Some(74.0), 1_714_550_460_000_000));
        let e = decode_to_readings(
            &c,
            &msg(br#"[{"ts":1,"patient":"p","hr":72},{"ts":1,"patient":"p"}]"#),
        )
        .unwrap_err();
        assert_eq!(e.reason, Reason::MissingField);
        assert!(e.detail.starts_with("element 1"), "{e}");
        let c = codec(&format!("items = \"/samples\"\n{VITALS}"));
        let p = br#"{"device":"x","samples":[{"ts":1714550400,"patient":"p","hr":72},{"ts":1714550460,"patient":"q","hr":80}]}"#;
        let r = decode_to_readings(&c, &msg(p)).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].subject.as_deref(), Some("q"));
        for (p, reason) in [
            (&br#"{"samples":7}"#[..], Reason::BadType),
            (br#"{"other":[]}"#, Reason::MissingField),
            (br#"{"samples":[]}"#, Reason::Empty),
            (br#"{"samples":[7]}"#, Reason::Structure),
        ] {
            assert_eq!(decode_to_readings(&c, &msg(p)).unwrap_err().reason, reason);
        }
    }

    #[test]
    fn mappings_are_checked_when_built() {
        let bad = [
            "[[reading]]\nvalue = \"hr\"\nmetric = \"heart_rate\"\n",
            "[[reading]]\nvalue = \"/hr\"\n",
            "[[reading]]\nvalue = \"/hr\"\nmetric = \"heart_rate\"\nunit = \"kPa\"\n",
            "reading = []\n",
        ];
        for t in bad {
            let m: JsonMapping = toml::from_str(t).unwrap();
            assert!(m.build().is_err(), "{t}");
        }
    }
}
