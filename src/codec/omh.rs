//! `omh`: Open mHealth data points, as phone apps and their aggregators upload them.
//!
//! Schemas `omh:heart-rate`, `omh:blood-pressure`, `omh:body-temperature`,
//! `omh:oxygen-saturation` (with its `supplemental_oxygen_flow_rate`) and
//! `omh:respiratory-rate`, either as a bare body or wrapped in a data point
//! (`{"header": {"schema_id": {"namespace": "omh", "name": "heart-rate", …}, …}, "body": {…}}`),
//! one per message or a JSON array of them. With a header the schema name decides which body
//! fields are read and the body must have them; a bare body is recognised by its fields.
//!
//! Time: `effective_time_frame.date_time`, else the `time_interval`'s `start_date_time`, else its
//! `end_date_time`; the offset is required and the time stored in UTC. No time frame: receive
//! time. A body temperature's `measurement_location` is stored as a `temp_site` reading.
//!
//! ```toml
//! [route.omh]
//! unknown_schemas = "reject"   # or "ignore": data points of other schemas (step-count, …)
//! ```

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

use super::time::rfc3339_micros;
use super::{Codec, DecodeError, Decoded, Message, RawValue, ReadingSink, Reason, UnknownNames};
use crate::model::reading::Metric;

/// `[route.omh]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OmhOptions {
    #[serde(default)]
    pub unknown_schemas: UnknownNames,
}

impl OmhOptions {
    pub fn build(&self) -> Result<OmhCodec, String> {
        Ok(OmhCodec {
            unknown: self.unknown_schemas,
        })
    }
}

#[derive(Debug)]
pub struct OmhCodec {
    unknown: UnknownNames,
}

/// The schemas this codec reads: name, and the body fields with their metric (the first is the
/// one the schema requires).
const SCHEMAS: &[(&str, &[(&str, Metric)])] = &[
    ("heart-rate", &[("heart_rate", Metric::HeartRate)]),
    (
        "blood-pressure",
        &[
            ("systolic_blood_pressure", Metric::BpSystolic),
            ("diastolic_blood_pressure", Metric::BpDiastolic),
        ],
    ),
    (
        "body-temperature",
        &[("body_temperature", Metric::BodyTemp)],
    ),
    (
        "oxygen-saturation",
        &[
            ("oxygen_saturation", Metric::Spo2),
            ("supplemental_oxygen_flow_rate", Metric::O2Flow),
        ],
    ),
    (
        "respiratory-rate",
        &[("respiratory_rate", Metric::RespRate)],
    ),
];

#[derive(Deserialize)]
struct UnitValue<'a> {
    value: f64,
    #[serde(borrow)]
    unit: Cow<'a, str>,
}

#[derive(Deserialize)]
struct Interval<'a> {
    #[serde(borrow, default)]
    start_date_time: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    end_date_time: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct TimeFrame<'a> {
    #[serde(borrow, default)]
    date_time: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    time_interval: Option<Interval<'a>>,
}

fn err(at: &str, reason: Reason, what: impl std::fmt::Display) -> DecodeError {
    DecodeError::new(reason, format!("{at}{what}"))
}

fn field<'v, T: Deserialize<'v>>(
    body: &'v Value,
    name: &str,
    at: &str,
) -> Result<Option<T>, DecodeError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => T::deserialize(v).map(Some).map_err(|e| {
            err(
                at,
                Reason::Structure,
                format!("{name}: {}", super::json_error(&e).detail),
            )
        }),
    }
}

impl OmhCodec {
    fn data_point(
        &self,
        point: &Value,
        at: &str,
        out: &mut ReadingSink<'_>,
    ) -> Result<usize, DecodeError> {
        if !point.is_object() {
            return Err(err(at, Reason::Structure, "a data point is a JSON object"));
        }
        let (schema, body) = match (point.get("header"), point.get("body")) {
            (Some(header), Some(body)) => {
                let name = header
                    .pointer("/schema_id/name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| err(at, Reason::MissingField, "header.schema_id.name"))?;
                let namespace = header
                    .pointer("/schema_id/namespace")
                    .and_then(Value::as_str);
                let known = SCHEMAS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .filter(|_| namespace.is_none_or(|ns| ns == "omh"));
                match known {
                    Some(s) => {
                        if body.get(s.1[0].0).is_none() {
                            return Err(err(
                                at,
                                Reason::MissingField,
                                format!("a {name} body needs {}", s.1[0].0),
                            ));
                        }
                        (s, body)
                    }
                    None => {
                        self.unknown.skip(|| format!("{at}schema is not one of omh heart-rate, blood-pressure, body-temperature, oxygen-saturation, respiratory-rate"))?;
                        return Ok(0);
                    }
                }
            }
            (None, None) => match SCHEMAS.iter().find(|(_, f)| point.get(f[0].0).is_some()) {
                Some(s) => (s, point),
                None => {
                    self.unknown
                        .skip(|| format!("{at}not a body of a schema this codec reads"))?;
                    return Ok(0);
                }
            },
            _ => {
                return Err(err(
                    at,
                    Reason::Structure,
                    "a data point has both header and body",
                ))
            }
        };
        let ts = match field::<TimeFrame>(body, "effective_time_frame", at)? {
            None => None,
            Some(tf) => {
                let t = tf.date_time.or_else(|| {
                    tf.time_interval
                        .and_then(|i| i.start_date_time.or(i.end_date_time))
                });
                let t = t.ok_or_else(|| {
                    err(
                        at,
                        Reason::MissingField,
                        "effective_time_frame has neither date_time nor a time_interval start or end",
                    )
                })?;
                Some(rfc3339_micros(&t).ok_or_else(|| {
                    err(
                        at,
                        Reason::BadTime,
                        "effective_time_frame: not a date-time with an offset",
                    )
                })?)
            }
        };
        let mut pushed = 0;
        for (name, metric) in schema.1.iter() {
            let Some(v) = field::<UnitValue>(body, name, at)? else {
                continue;
            };
            out.push(Decoded {
                ts,
                metric: *metric,
                value: RawValue::Number(v.value, &v.unit),
                flags: 0,
                source: None,
                subject: None,
            })
            .map_err(|e| err(at, e.reason, format!("{name}: {}", e.detail)))?;
            pushed += 1;
        }
        if schema.1[0].1 == Metric::BodyTemp {
            if let Some(site) = field::<Cow<str>>(body, "measurement_location", at)? {
                out.push(Decoded {
                    ts,
                    metric: Metric::TempSite,
                    value: RawValue::Text(&site),
                    flags: 0,
                    source: None,
                    subject: None,
                })?;
            }
        }
        Ok(pushed)
    }
}

impl Codec for OmhCodec {
    fn name(&self) -> &'static str {
        "omh"
    }

    fn decode(&self, msg: &Message<'_>, out: &mut ReadingSink<'_>) -> Result<(), DecodeError> {
        let doc: Value = serde_json::from_slice(msg.payload).map_err(|e| super::json_error(&e))?;
        let pushed = match &doc {
            Value::Array(points) => {
                let mut n = 0;
                for (i, p) in points.iter().enumerate() {
                    n += self.data_point(p, &format!("data point {i}: "), out)?;
                }
                n
            }
            one => self.data_point(one, "", out)?,
        };
        if pushed == 0 {
            return Err(DecodeError::new(
                Reason::Empty,
                "no data point of a schema this codec reads",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::decode_to_readings;
    use crate::codec::test_util::msg;

    fn codec() -> OmhCodec {
        OmhOptions::default().build().unwrap()
    }

    fn decode(p: &str) -> Result<Vec<crate::model::reading::Reading>, DecodeError> {
        decode_to_readings(&codec(), &msg(p.as_bytes()))
    }

    #[test]
    fn the_five_schemas_bare_and_wrapped() {
        // The examples of the omh schema library, each with an offset.
        let hr = r#"{"heart_rate":{"value":50,"unit":"beats/min"},
            "effective_time_frame":{"date_time":"2013-02-05T07:25:00-08:00"},
            "temporal_relationship_to_physical_activity":"at rest"}"#;
        let r = decode(hr).unwrap();
        assert_eq!((r[0].metric, r[0].value), (Metric::HeartRate, Some(50.0)));
        assert_eq!(r[0].ts, 1_360_077_900_000_000);
        let bp = r#"{"header":{"id":"x","creation_date_time":"2013-02-05T07:25:00Z",
              "schema_id":{"namespace":"omh","name":"blood-pressure","version":"1.0"}},
            "body":{"systolic_blood_pressure":{"value":160,"unit":"mmHg"},
              "diastolic_blood_pressure":{"value":60,"unit":"mmHg"},
              "effective_time_frame":{"time_interval":{"start_date_time":"2013-02-05T07:25:00Z",
                "duration":{"value":1,"unit":"min"}}},
              "position_during_measurement":"sitting"}}"#;
        let r = decode(bp).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[1].metric, r[1].value), (Metric::BpDiastolic, Some(60.0)));
        let temp = r#"{"body_temperature":{"value":99.5,"unit":"F"},
            "effective_time_frame":{"date_time":"2013-02-05T07:25:00Z"},
            "measurement_location":"oral"}"#;
        let r = decode(temp).unwrap();
        assert!((r[0].value.unwrap() - 37.5).abs() < 1e-9);
        assert_eq!(r[1].text.as_deref(), Some("oral"));
        let spo2 = r#"{"oxygen_saturation":{"value":96.5,"unit":"%"},
            "supplemental_oxygen_flow_rate":{"value":2,"unit":"L/min"},
            "system":"peripheral capillary","measurement_method":"pulse oximetry"}"#;
        let r = decode(spo2).unwrap();
        assert_eq!((r[0].metric, r[0].value), (Metric::Spo2, Some(96.5)));
        assert_eq!((r[1].metric, r[1].value), (Metric::O2Flow, Some(2.0)));
        let rr = format!(
            "[{},{}]",
            r#"{"respiratory_rate":{"value":16,"unit":"breaths/min"}}"#, hr
        );
        let r = decode(&rr).unwrap();
        assert_eq!(r[0].metric, Metric::RespRate);
        assert_eq!(r[1].metric, Metric::HeartRate);
    }

    #[test]
    fn bad_data_points_are_refused() {
        let cases = [
            (r#"{"heart_rate":{"value":50}}"#, Reason::Structure),
            (
                r#"{"heart_rate":{"value":"50","unit":"beats/min"}}"#,
                Reason::Structure,
            ),
            (
                r#"{"heart_rate":{"value":50,"unit":"mmHg"}}"#,
                Reason::BadUnit,
            ),
            (
                r#"{"heart_rate":{"value":50,"unit":"beats/min"},"effective_time_frame":{"date_time":"2013-02-05T07:25:00"}}"#,
                Reason::BadTime,
            ),
            (
                r#"{"header":{"schema_id":{"namespace":"omh","name":"heart-rate"}},"body":{"respiratory_rate":{"value":16,"unit":"breaths/min"}}}"#,
                Reason::MissingField,
            ),
            (
                r#"{"header":{"schema_id":{"namespace":"omh","name":"step-count"}},"body":{"step_count":100}}"#,
                Reason::UnknownName,
            ),
            (r#"{"body":{}}"#, Reason::Structure),
            (r#"{"step_count":100}"#, Reason::UnknownName),
            (r#"[]"#, Reason::Empty),
            (r#"7"#, Reason::Structure),
            (r#"{"heart_rate":"#, Reason::Syntax),
        ];
        for (p, reason) in cases {
            let e = decode(p).unwrap_err();
            assert_eq!(e.reason, reason, "{p}: {e}");
        }
    }
}
