//! `fhir`: HL7 FHIR R4 Observations, as a monitor's HL7 interface or an integration engine
//! publishes them: one Observation, or a Bundle whose entries include Observations.
//!
//! ```toml
//! [route.fhir]
//! unknown_codes = "reject"                  # or "ignore": Observations no code maps to a metric
//! [route.fhir.codes]                        # extra codings → metrics, as "system|code"
//! "urn:iso:std:iso:11073:10101|150456" = "spo2"
//! ```
//!
//! - The metric comes from the LOINC coding of `code` (catalogue codes and their site-specific
//!   aliases), or of each `component` (the blood-pressure panel 85354-9 carries 8480-6 and
//!   8462-4 as components).
//! - `valueQuantity` is converted from its UCUM `code` (else its `unit` text) to the canonical
//!   unit; a quantity without a unit is refused. A `comparator` (`<`, `>=` …) marks the reading
//!   questionable: the true value is not the number.
//! - Time: `effectiveDateTime`, `effectiveInstant` or `effectivePeriod.start` (else `.end`), to
//!   the second with a zone; a partial date is refused. No effective time: receive time.
//! - `subject.reference` and `device.reference` override the route's subject and source.
//! - status `entered-in-error` or `cancelled` refuses the message with reason `status`, and so
//!   does a `modifierExtension`, which by FHIR's rules may change the meaning of what it is on.
//! - A Bundle is decoded whole or refused whole; its non-Observation entries are skipped.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue as RawJson;

use super::time::rfc3339_micros;
use super::{Codec, DecodeError, Decoded, Message, RawValue, ReadingSink, Reason, UnknownNames};
use crate::model::reading::{flags, Metric};

pub const LOINC: &str = "http://loinc.org";
pub const UCUM: &str = "http://unitsofmeasure.org";

/// `[route.fhir]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FhirOptions {
    #[serde(default)]
    pub unknown_codes: UnknownNames,
    #[serde(default)]
    pub codes: BTreeMap<String, Metric>,
}

impl FhirOptions {
    pub fn build(&self) -> Result<FhirCodec, String> {
        let mut codes = Vec::new();
        for (key, metric) in &self.codes {
            let (system, code) = key
                .split_once('|')
                .filter(|(s, c)| !s.is_empty() && !c.is_empty())
                .ok_or_else(|| {
                    format!("[route.fhir.codes] `{key}` is not of the form \"system|code\"")
                })?;
            codes.push((system.to_owned(), code.to_owned(), *metric));
        }
        Ok(FhirCodec {
            unknown: self.unknown_codes,
            codes,
        })
    }
}

#[derive(Debug)]
pub struct FhirCodec {
    unknown: UnknownNames,
    codes: Vec<(String, String, Metric)>,
}

type Str<'a> = Cow<'a, str>;

#[derive(Deserialize)]
struct Coding<'a> {
    #[serde(borrow, default)]
    system: Option<Str<'a>>,
    #[serde(borrow, default)]
    code: Option<Str<'a>>,
}

#[derive(Deserialize)]
struct CodeableConcept<'a> {
    #[serde(borrow, default)]
    coding: Vec<Coding<'a>>,
    #[serde(borrow, default)]
    text: Option<Str<'a>>,
}

#[derive(Deserialize)]
struct Reference<'a> {
    #[serde(borrow, default)]
    reference: Option<Str<'a>>,
}

#[derive(Deserialize)]
struct Period<'a> {
    #[serde(borrow, default)]
    start: Option<Str<'a>>,
    #[serde(borrow, default)]
    end: Option<Str<'a>>,
}

#[derive(Deserialize)]
struct Quantity<'a> {
    #[serde(default)]
    value: Option<f64>,
    #[serde(borrow, default)]
    comparator: Option<Str<'a>>,
    #[serde(borrow, default)]
    unit: Option<Str<'a>>,
    #[serde(borrow, default)]
    system: Option<Str<'a>>,
    #[serde(borrow, default)]
    code: Option<Str<'a>>,
}

/// The value[x] choices a vital sign can take, and the element's own must-understand marker.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Valued<'a> {
    #[serde(borrow, default)]
    code: Option<CodeableConcept<'a>>,
    #[serde(borrow, default)]
    value_quantity: Option<Quantity<'a>>,
    #[serde(borrow, default)]
    value_string: Option<Str<'a>>,
    #[serde(borrow, default)]
    value_codeable_concept: Option<CodeableConcept<'a>>,
    #[serde(borrow, default)]
    modifier_extension: Option<&'a RawJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Observation<'a> {
    #[serde(borrow)]
    resource_type: Str<'a>,
    #[serde(borrow, default)]
    status: Option<Str<'a>>,
    #[serde(borrow, default)]
    subject: Option<Reference<'a>>,
    #[serde(borrow, default)]
    device: Option<Reference<'a>>,
    #[serde(borrow, default)]
    effective_date_time: Option<Str<'a>>,
    #[serde(borrow, default)]
    effective_instant: Option<Str<'a>>,
    #[serde(borrow, default)]
    effective_period: Option<Period<'a>>,
    // The Observation's own code and value, as in `Valued` (serde's flatten would buffer the
    // whole resource and cannot borrow a RawValue).
    #[serde(borrow, default)]
    code: Option<CodeableConcept<'a>>,
    #[serde(borrow, default)]
    value_quantity: Option<Quantity<'a>>,
    #[serde(borrow, default)]
    value_string: Option<Str<'a>>,
    #[serde(borrow, default)]
    value_codeable_concept: Option<CodeableConcept<'a>>,
    #[serde(borrow, default)]
    modifier_extension: Option<&'a RawJson>,
    #[serde(borrow, default)]
    component: Vec<Valued<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Kind<'a> {
    #[serde(borrow)]
    resource_type: Str<'a>,
}

#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(borrow, default)]
    resource: Option<&'a RawJson>,
}

#[derive(Deserialize)]
struct Bundle<'a> {
    #[serde(borrow, default)]
    entry: Vec<Entry<'a>>,
}

fn err(at: &str, reason: Reason, what: impl std::fmt::Display) -> DecodeError {
    DecodeError::new(reason, format!("{at}: {what}"))
}

/// A FHIR dateTime/instant to µs: only full date-times with a zone name an instant.
fn fhir_time(s: &str, at: &str) -> Result<i64, DecodeError> {
    rfc3339_micros(s).ok_or_else(|| {
        let what = if s.len() <= 10 {
            "a partial date names no instant"
        } else {
            "not a FHIR dateTime with seconds and a zone"
        };
        err(at, Reason::BadTime, what)
    })
}

impl FhirCodec {
    fn metric_of(&self, concept: Option<&CodeableConcept<'_>>) -> Option<Metric> {
        let concept = concept?;
        concept.coding.iter().find_map(|c| {
            let (system, code) = (c.system.as_deref()?, c.code.as_deref()?);
            if system == LOINC {
                if let Some(m) = Metric::from_loinc(code) {
                    return Some(m);
                }
            }
            self.codes
                .iter()
                .find(|(s, k, _)| s == system && k == code)
                .map(|(_, _, m)| *m)
        })
    }

    /// Pushes the value of an Observation or a component; `Ok(false)` if it has none.
    fn push_value(
        &self,
        v: &Valued<'_>,
        metric: Metric,
        ts: Option<i64>,
        who: (Option<&str>, Option<&str>),
        at: &str,
        out: &mut ReadingSink<'_>,
    ) -> Result<bool, DecodeError> {
        let mut flags = 0;
        let value = if let Some(q) = &v.value_quantity {
            let Some(x) = q.value else {
                return Ok(false);
            };
            let unit = match (&q.system, &q.code, &q.unit) {
                (Some(s), Some(c), _) if s == UCUM => c,
                (_, _, Some(u)) => u,
                (None, Some(c), None) => c,
                _ => {
                    return Err(err(
                        at,
                        Reason::BadUnit,
                        "valueQuantity has no UCUM code and no unit",
                    ))
                }
            };
            if q.comparator.is_some() {
                flags |= flags::QUESTIONABLE;
            }
            RawValue::Number(x, unit)
        } else if let Some(s) = &v.value_string {
            RawValue::Text(s)
        } else if let Some(c) = &v.value_codeable_concept {
            match c
                .text
                .as_deref()
                .or_else(|| c.coding.iter().find_map(|x| x.code.as_deref()))
            {
                Some(t) => RawValue::Text(t),
                None => return Ok(false),
            }
        } else {
            return Ok(false);
        };
        out.push(Decoded {
            ts,
            metric,
            value,
            flags,
            source: who.0,
            subject: who.1,
        })
        .map_err(|e| err(at, e.reason, e.detail))?;
        Ok(true)
    }

    fn observation(
        &self,
        mut obs: Observation<'_>,
        at: &str,
        out: &mut ReadingSink<'_>,
    ) -> Result<usize, DecodeError> {
        let own = Valued {
            code: obs.code.take(),
            value_quantity: obs.value_quantity.take(),
            value_string: obs.value_string.take(),
            value_codeable_concept: obs.value_codeable_concept.take(),
            modifier_extension: obs.modifier_extension.take(),
        };
        if obs.resource_type != "Observation" {
            return Err(err(
                at,
                Reason::Structure,
                "resourceType is neither Observation nor Bundle",
            ));
        }
        match obs.status.as_deref() {
            Some(s @ ("entered-in-error" | "cancelled")) => {
                return Err(err(
                    at,
                    Reason::Status,
                    format!("status {s}: the source withdrew this Observation"),
                ))
            }
            Some(_) => {}
            None => return Err(err(at, Reason::MissingField, "status is required")),
        }
        if own.modifier_extension.is_some()
            || obs.component.iter().any(|c| c.modifier_extension.is_some())
        {
            return Err(err(
                at,
                Reason::Structure,
                "modifierExtension present: it may change the meaning, and is not understood",
            ));
        }
        let ts = match (
            &obs.effective_date_time,
            &obs.effective_instant,
            &obs.effective_period,
        ) {
            (Some(t), _, _) => Some(fhir_time(t, at)?),
            (None, Some(t), _) => Some(fhir_time(t, at)?),
            (None, None, Some(p)) => match p.start.as_deref().or(p.end.as_deref()) {
                Some(t) => Some(fhir_time(t, at)?),
                None => None,
            },
            (None, None, None) => None,
        };
        let who = (
            obs.device.as_ref().and_then(|r| r.reference.as_deref()),
            obs.subject.as_ref().and_then(|r| r.reference.as_deref()),
        );
        let mut pushed = 0;
        let own_metric = self.metric_of(own.code.as_ref());
        if let Some(metric) = own_metric {
            pushed += usize::from(self.push_value(&own, metric, ts, who, at, out)?);
        }
        for (i, c) in obs.component.iter().enumerate() {
            let at = format!("{at} component {i}");
            match self.metric_of(c.code.as_ref()) {
                Some(metric) => {
                    pushed += usize::from(self.push_value(c, metric, ts, who, &at, out)?)
                }
                None => self.unknown(&at)?,
            }
        }
        if own_metric.is_none() && obs.component.is_empty() {
            self.unknown(at)?;
        }
        Ok(pushed)
    }

    fn unknown(&self, at: &str) -> Result<(), DecodeError> {
        self.unknown
            .skip(|| format!("{at}: no coding maps to a catalogue metric"))
    }
}

fn prefix(at: &str, e: DecodeError) -> DecodeError {
    err(at, e.reason, e.detail)
}

impl Codec for FhirCodec {
    fn name(&self) -> &'static str {
        "fhir"
    }

    fn decode(&self, msg: &Message<'_>, out: &mut ReadingSink<'_>) -> Result<(), DecodeError> {
        let text = std::str::from_utf8(msg.payload)
            .map_err(|_| DecodeError::new(Reason::Syntax, "not UTF-8 JSON"))?;
        // Most messages are one Observation: read it as one, and only a Bundle a second time.
        // (A Bundle's own fields are none of an Observation's, so it reads as one too.)
        let top: Observation = serde_json::from_str(text).map_err(|e| super::json_error(&e))?;
        let pushed = match &*top.resource_type {
            "Bundle" => {
                let bundle: Bundle =
                    serde_json::from_str(text).map_err(|e| super::json_error(&e))?;
                let mut pushed = 0;
                for (i, e) in bundle.entry.iter().enumerate() {
                    let Some(resource) = e.resource else { continue };
                    let at = format!("entry {i}");
                    let kind: Kind = serde_json::from_str(resource.get())
                        .map_err(|e| prefix(&at, super::json_error(&e)))?;
                    // Other resources may use Observation's field names for other shapes.
                    if kind.resource_type == "Observation" {
                        let obs = serde_json::from_str(resource.get())
                            .map_err(|e| prefix(&at, super::json_error(&e)))?;
                        pushed += self.observation(obs, &at, out)?;
                    }
                }
                pushed
            }
            _ => self.observation(top, "Observation", out)?,
        };
        if pushed == 0 {
            return Err(DecodeError::new(
                Reason::Empty,
                "no Observation value maps to a metric",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::decode_to_readings;
    use crate::codec::test_util::{msg, RECEIVED};

    fn codec() -> FhirCodec {
        FhirOptions::default().build().unwrap()
    }

    /// The blood-pressure example of the FHIR R4 vital-signs profile, trimmed.
    const BP_PANEL: &str = r#"{
      "resourceType": "Observation", "id": "blood-pressure", "status": "final",
      "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
      "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure panel"}]},
      "subject": {"reference": "Patient/example"},
      "effectiveDateTime": "2012-09-17",
      "component": [
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
         "valueQuantity": {"value": 107, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
         "valueQuantity": {"value": 60, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}
      ]}"#;

    fn obs(loinc: &str, value: f64, code: &str, extra: &str) -> String {
        format!(
            r#"{{"resourceType":"Observation","status":"final",
                "code":{{"coding":[{{"system":"http://loinc.org","code":"{loinc}"}}]}},
                "effectiveDateTime":"2024-05-01T10:00:00+02:00",
                "valueQuantity":{{"value":{value},"system":"http://unitsofmeasure.org","code":"{code}"}}{extra}}}"#
        )
    }

    #[test]
    fn blood_pressure_panel_components() {
        let p = BP_PANEL.replace("\"2012-09-17\"", "\"2012-09-17T08:30:00Z\"");
        let r = decode_to_readings(&codec(), &msg(p.as_bytes())).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].metric, r[0].value), (Metric::BpSystolic, Some(107.0)));
        assert_eq!((r[1].metric, r[1].value), (Metric::BpDiastolic, Some(60.0)));
        assert_eq!(r[0].subject.as_deref(), Some("Patient/example"));
        assert_eq!(r[0].ts, 1_347_870_600_000_000);
        // The profile's own example has a date only: no instant, refused.
        let e = decode_to_readings(&codec(), &msg(BP_PANEL.as_bytes())).unwrap_err();
        assert_eq!(e.reason, Reason::BadTime);
    }

    #[test]
    fn ucum_codes_convert_to_canonical_units() {
        let cases = [
            ("8310-5", 98.6, "[degF]", Metric::BodyTemp, 37.0),
            ("8331-1", 37.2, "Cel", Metric::BodyTemp, 37.2),
            ("8480-6", 16.0, "kPa", Metric::BpSystolic, 16.0 * 7.50062),
            ("8867-4", 72.0, "/min", Metric::HeartRate, 72.0),
            ("59408-5", 97.0, "%", Metric::Spo2, 97.0),
            ("9279-1", 18.0, "/min", Metric::RespRate, 18.0),
        ];
        for (loinc, v, unit, metric, want) in cases {
            let p = obs(loinc, v, unit, "");
            let r = decode_to_readings(&codec(), &msg(p.as_bytes())).unwrap();
            assert_eq!(r[0].metric, metric);
            assert!((r[0].value.unwrap() - want).abs() < 1e-9, "{loinc}");
            assert_eq!(r[0].ts, 1_714_550_400_000_000);
        }
        let e = decode_to_readings(&codec(), &msg(obs("8310-5", 37.0, "mm[Hg]", "").as_bytes()))
            .unwrap_err();
        assert_eq!(e.reason, Reason::BadUnit);
    }

    #[test]
    fn bundles_periods_devices_and_comparators() {
        let hr = obs(
            "8867-4",
            72.0,
            "/min",
            r#","device":{"reference":"Device/monitor-7"}"#,
        );
        let spo2 = obs(
            "59408-5",
            90.0,
            "%",
            r#","valueQuantity":null,"effectivePeriod":{"start":"2024-05-01T08:00:00Z"}"#,
        );
        let spo2 = spo2.replace(r#","valueQuantity":null"#, "");
        let spo2 = spo2.replace(r#""effectiveDateTime":"2024-05-01T10:00:00+02:00","#, "");
        let low = obs("59408-5", 80.0, "%", r#""#)
            .replace(r#""code":"%"}"#, r#""code":"%","comparator":"<"}"#);
        let bundle = format!(
            r#"{{"resourceType":"Bundle","type":"collection","entry":[
                {{"resource":{hr}}},
                {{"resource":{{"resourceType":"Patient","id":"p1","name":[{{"family":"X"}}]}}}},
                {{"resource":{spo2}}},
                {{"resource":{low}}}]}}"#
        );
        let r = decode_to_readings(&codec(), &msg(bundle.as_bytes())).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].source, "Device/monitor-7");
        assert_eq!(r[1].source, "dev-1");
        assert_eq!(r[1].ts, 1_714_550_400_000_000);
        assert_eq!(r[2].flags & flags::QUESTIONABLE, flags::QUESTIONABLE);
        assert_eq!(r[0].flags & flags::QUESTIONABLE, 0);
    }

    #[test]
    fn withdrawn_unknown_and_malformed_observations_are_refused() {
        let withdrawn =
            obs("8867-4", 72.0, "/min", "").replace("\"final\"", "\"entered-in-error\"");
        let e = decode_to_readings(&codec(), &msg(withdrawn.as_bytes())).unwrap_err();
        assert_eq!(e.reason, Reason::Status);
        assert!(e.detail.contains("entered-in-error"), "{e}");
        // Inside a bundle it refuses the bundle, naming the entry.
        let bundle = format!(
            r#"{{"resourceType":"Bundle","entry":[{{"resource":{}}},{{"resource":{withdrawn}}}]}}"#,
            obs("8867-4", 72.0, "/min", "")
        );
        let e = decode_to_readings(&codec(), &msg(bundle.as_bytes())).unwrap_err();
        assert_eq!(e.reason, Reason::Status);
        assert!(e.detail.starts_with("entry 1"), "{e}");
        let cases: Vec<(String, Reason)> = vec![
            (obs("1234-5", 1.0, "/min", ""), Reason::UnknownName),
            (
                obs(
                    "8867-4",
                    72.0,
                    "/min",
                    r#","modifierExtension":[{"url":"x"}]"#,
                ),
                Reason::Structure,
            ),
            (
                obs("8867-4", 72.0, "/min", "").replace("2024-05-01T10:00:00+02:00", "2024-05"),
                Reason::BadTime,
            ),
            (
                obs("8867-4", 72.0, "/min", "").replace(r#""status":"final","#, ""),
                Reason::MissingField,
            ),
            (
                obs("8867-4", 72.0, "/min", "").replace("72", "\"72\""),
                Reason::Structure,
            ),
            (r#"{"resourceType":"Patient"}"#.into(), Reason::Structure),
            (r#"{"status":"final"}"#.into(), Reason::Structure),
            (
                r#"{"resourceType":"Bundle","entry":[]}"#.into(),
                Reason::Empty,
            ),
            (r#"{"resourceType":"Observation","#.into(), Reason::Syntax),
        ];
        for (p, reason) in cases {
            let e = decode_to_readings(&codec(), &msg(p.as_bytes())).unwrap_err();
            assert_eq!(e.reason, reason, "{p}: {e}");
        }
        let ignoring: FhirOptions = toml::from_str("unknown_codes = \"ignore\"").unwrap();
        let p = format!(
            r#"{{"resourceType":"Bundle","entry":[{{"resource":{}}},{{"resource":{}}}]}}"#,
            obs("1234-5", 1.0, "/min", ""),
            obs("8867-4", 72.0, "/min", "")
        );
        let r = decode_to_readings(&ignoring.build().unwrap(), &msg(p.as_bytes())).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].ts, 1_714_550_400_000_000);
        assert_ne!(r[0].received, 0);
        let _ = RECEIVED;
    }

    #[test]
    fn route_codes_map_other_code_systems() {
        let o: FhirOptions =
            toml::from_str("[codes]\n\"urn:iso:std:iso:11073:10101|150456\" = \"spo2\"\n").unwrap();
        let p = obs("x", 95.0, "%", "").replace(
            r#""system":"http://loinc.org","code":"x""#,
            r#""system":"urn:iso:std:iso:11073:10101","code":"150456""#,
        );
        let r = decode_to_readings(&o.build().unwrap(), &msg(p.as_bytes())).unwrap();
        assert_eq!(r[0].metric, Metric::Spo2);
        let bad: FhirOptions = toml::from_str("[codes]\n\"150456\" = \"spo2\"\n").unwrap();
        assert!(bad.build().is_err());
    }
}
