//! Device formats. Each codec turns one MQTT payload into readings and pushes them through a
//! [`ReadingSink`], which normalises them (canonical unit, plausibility and clock flags, receive
//! time where the device gave none) straight into the batch builder. A payload that fails half-way leaves
//! nothing behind: the caller rolls the builder back.

pub mod ble;
pub mod csv;
pub mod encoding;
pub mod fhir;
pub mod json;
pub mod omh;
pub mod senml;
pub mod time;

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::model::batch::{BatchBuilder, Row};
pub use crate::model::decode_error::{DecodeError, Reason};
use crate::model::reading::{flags, Metric, ValueKind};
use crate::model::units;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
/// What a codec does with an item no metric is mapped to: a SenML name, a FHIR code, an Open
/// mHealth schema.
pub enum UnknownNames {
    /// Such an item refuses the whole message (dead letter).
    #[default]
    Reject,
    /// Such items are skipped; the message's other items are kept.
    Ignore,
}

impl UnknownNames {
    /// `Ok` to skip the item; under `Reject`, the error that refuses the message (its detail
    /// built only then).
    pub fn skip(self, detail: impl FnOnce() -> String) -> Result<(), DecodeError> {
        match self {
            UnknownNames::Ignore => Ok(()),
            UnknownNames::Reject => Err(DecodeError::new(Reason::UnknownName, detail())),
        }
    }
}

/// One MQTT message as a codec sees it.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    /// Receive time, µs since the epoch.
    pub received: i64,
    /// Device id from the route's template.
    pub source: &'a str,
    /// Subject from the route's template.
    pub subject: Option<&'a str>,
}

/// A value as the device sent it.
#[derive(Debug, Clone, Copy)]
pub enum RawValue<'a> {
    /// A number and the unit the device gave it in ("" = the canonical unit).
    Number(f64, &'a str),
    Text(&'a str),
    /// The device says the value lies beyond what it can measure (IEEE 11073 ±INF): stored with
    /// a null value and [`flags::BEYOND_RANGE`], never as a number.
    BeyondRange,
}

/// A reading as a codec decoded it, before normalisation.
#[derive(Debug, Clone, Copy)]
pub struct Decoded<'a> {
    /// Device time, µs since the epoch; `None` when the payload has none.
    pub ts: Option<i64>,
    pub metric: Metric,
    pub value: RawValue<'a>,
    pub flags: u16,
    /// Overrides the route's source/subject when the payload names them.
    pub source: Option<&'a str>,
    pub subject: Option<&'a str>,
}

/// How far a device time may lie from the receive time before its reading is flagged
/// [`flags::CLOCK_SUSPECT`]: a device whose clock was never set reports 1970 or 2000, one whose
/// battery ran flat reports the day it stopped, and a millisecond time read as microseconds
/// lands in 1970.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockWindow {
    /// µs before the receive time.
    max_past: i64,
    /// µs after the receive time.
    max_future: i64,
}

impl ClockWindow {
    pub const DEFAULT_MAX_PAST: Duration = Duration::from_secs(24 * 3600);
    pub const DEFAULT_MAX_FUTURE: Duration = Duration::from_secs(5 * 60);

    pub fn new(max_past: Duration, max_future: Duration) -> Self {
        let micros = |d: Duration| d.as_micros().min(i64::MAX as u128) as i64;
        ClockWindow {
            max_past: micros(max_past),
            max_future: micros(max_future),
        }
    }

    /// Whether device time `ts` lies outside the window around `received` (both µs).
    pub fn suspect(&self, ts: i64, received: i64) -> bool {
        ts < received.saturating_sub(self.max_past) || ts > received.saturating_add(self.max_future)
    }
}

impl Default for ClockWindow {
    fn default() -> Self {
        ClockWindow::new(Self::DEFAULT_MAX_PAST, Self::DEFAULT_MAX_FUTURE)
    }
}

/// The longest source or subject, in bytes. Identifiers go into every batch's dictionaries, every
/// leaf hash and every alarm topic; one that long is a device or template fault, not a name.
pub const MAX_ID_BYTES: usize = 256;

/// Refuses an identifier longer than [`MAX_ID_BYTES`], naming the field and where it came from,
/// never its text (it may name a patient).
fn check_id(field: &str, from: &str, id: &str) -> Result<(), DecodeError> {
    if id.len() > MAX_ID_BYTES {
        return Err(DecodeError::new(
            Reason::BadValue,
            format!(
                "{field} from the {from}: {} bytes, above the limit of {MAX_ID_BYTES}",
                id.len()
            ),
        ));
    }
    Ok(())
}

/// Where codecs put readings: normalises each one into the batch builder.
pub struct ReadingSink<'b> {
    builder: &'b mut BatchBuilder,
    received: i64,
    source: &'b str,
    subject: Option<&'b str>,
    clock: ClockWindow,
    /// The publisher is authenticated and may not name other devices or subjects in its
    /// payload than the topic's.
    bound_ids: bool,
}

impl<'b> ReadingSink<'b> {
    /// A sink for the readings of `msg`, judging device clocks by the default window (24 h
    /// before the receive time, 5 min after); [`ReadingSink::with_clock`] sets the pipeline's.
    pub fn new(builder: &'b mut BatchBuilder, msg: &Message<'b>) -> Self {
        ReadingSink {
            builder,
            received: msg.received,
            source: msg.source,
            subject: msg.subject,
            clock: ClockWindow::default(),
            bound_ids: false,
        }
    }

    /// Refuses readings whose payload names another device or subject than the topic's: the
    /// publisher was authenticated as the topic's account, and speaks for nobody else.
    pub fn with_bound_ids(mut self, bound: bool) -> Self {
        self.bound_ids = bound;
        self
    }

    /// Judges device clocks by `clock` (`ingest.clock_max_past` / `clock_max_future`).
    pub fn with_clock(mut self, clock: ClockWindow) -> Self {
        self.clock = clock;
        self
    }

    /// Normalises and appends one reading.
    pub fn push(&mut self, d: Decoded<'_>) -> Result<(), DecodeError> {
        let info = d.metric.info();
        let mut flags = d.flags;
        let (value, text) = match (d.value, info.kind) {
            (RawValue::Number(v, unit), ValueKind::Numeric) => {
                if !v.is_finite() {
                    return Err(DecodeError::new(
                        Reason::BadValue,
                        format!("{} is not a finite number", d.metric),
                    ));
                }
                let v = units::to_canonical(d.metric, unit, v)
                    .map_err(|e| DecodeError::new(Reason::BadUnit, e.to_string()))?;
                // A finite value can overflow in conversion (kcal × 4.184 near f64::MAX).
                if !v.is_finite() {
                    return Err(DecodeError::new(
                        Reason::BadValue,
                        format!("{} is out of range once converted to its unit", d.metric),
                    ));
                }
                if let Some((lo, hi)) = info.plausible {
                    if !(lo..=hi).contains(&v) {
                        flags |= flags::OUT_OF_RANGE;
                    }
                }
                (Some(v), None)
            }
            (RawValue::BeyondRange, ValueKind::Numeric) => {
                flags |= flags::BEYOND_RANGE;
                (None, None)
            }
            (RawValue::Text(t), ValueKind::Text) => (None, Some(t)),
            (RawValue::Number(..) | RawValue::BeyondRange, ValueKind::Text) => {
                return Err(DecodeError::new(
                    Reason::BadType,
                    format!("{} takes text, not a number", d.metric),
                ))
            }
            (RawValue::Text(_), ValueKind::Numeric) => {
                return Err(DecodeError::new(
                    Reason::BadType,
                    format!("{} takes a number, not text", d.metric),
                ))
            }
        };
        let ts = match d.ts {
            Some(ts) => ts,
            None => {
                flags |= flags::TIME_FROM_RECEIPT;
                self.received
            }
        };
        // The window applies to every time a reading ends up with: the receive time itself
        // always passes, but a SenML time relative to it can carry the receipt years away
        // (`"t": 268000000`), and rules must not take that for the device's present.
        if self.clock.suspect(ts, self.received) {
            flags |= flags::CLOCK_SUSPECT;
        }
        // An empty name from the payload is no name: the route's applies.
        if self.bound_ids {
            let other_source = d.source.is_some_and(|s| !s.is_empty() && s != self.source);
            let other_subject = d
                .subject
                .is_some_and(|s| !s.is_empty() && Some(s) != self.subject);
            if other_source || other_subject {
                return Err(DecodeError::new(
                    Reason::Identity,
                    format!(
                        "the payload names another {} than the topic's, and the route does not \
                         trust its publisher to (trust_payload_ids)",
                        if other_source { "device" } else { "subject" }
                    ),
                ));
            }
        }
        let source = match d.source.filter(|s| !s.is_empty()) {
            Some(s) => {
                check_id("source", "payload", s)?;
                s
            }
            None => {
                check_id("source", "topic", self.source)?;
                self.source
            }
        };
        let subject = match d.subject.filter(|s| !s.is_empty()) {
            Some(s) => {
                check_id("subject", "payload", s)?;
                Some(s)
            }
            None => {
                let s = self.subject.filter(|s| !s.is_empty());
                s.map(|s| check_id("subject", "topic", s)).transpose()?;
                s
            }
        };
        self.builder.push(Row {
            ts,
            received: self.received,
            source,
            subject,
            metric: d.metric,
            value,
            text,
            flags,
        });
        Ok(())
    }
}

/// The device formats a route can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
pub enum CodecName {
    #[serde(rename = "json")]
    #[value(name = "json")]
    Json,
    #[serde(rename = "senml-json")]
    #[value(name = "senml-json")]
    SenmlJson,
    #[serde(rename = "senml-cbor")]
    #[value(name = "senml-cbor")]
    SenmlCbor,
    #[serde(rename = "ble-gatt")]
    #[value(name = "ble-gatt")]
    BleGatt,
    #[serde(rename = "ble-2a37")]
    #[value(name = "ble-2a37")]
    Ble2a37,
    #[serde(rename = "ble-2a1c")]
    #[value(name = "ble-2a1c")]
    Ble2a1c,
    #[serde(rename = "ble-2a35")]
    #[value(name = "ble-2a35")]
    Ble2a35,
    #[serde(rename = "ble-2a5e")]
    #[value(name = "ble-2a5e")]
    Ble2a5e,
    #[serde(rename = "ble-2a5f")]
    #[value(name = "ble-2a5f")]
    Ble2a5f,
    #[serde(rename = "fhir")]
    #[value(name = "fhir")]
    Fhir,
    #[serde(rename = "omh")]
    #[value(name = "omh")]
    Omh,
    #[serde(rename = "csv")]
    #[value(name = "csv")]
    Csv,
}

impl CodecName {
    pub const ALL: [CodecName; 12] = [
        CodecName::Json,
        CodecName::SenmlJson,
        CodecName::SenmlCbor,
        CodecName::BleGatt,
        CodecName::Ble2a37,
        CodecName::Ble2a1c,
        CodecName::Ble2a35,
        CodecName::Ble2a5e,
        CodecName::Ble2a5f,
        CodecName::Fhir,
        CodecName::Omh,
        CodecName::Csv,
    ];

    /// The `[route.<table>]` of options this codec reads.
    pub fn options_table(self) -> &'static str {
        match self {
            CodecName::Json => "json",
            CodecName::SenmlJson | CodecName::SenmlCbor => "senml",
            CodecName::BleGatt
            | CodecName::Ble2a37
            | CodecName::Ble2a1c
            | CodecName::Ble2a35
            | CodecName::Ble2a5e
            | CodecName::Ble2a5f => "ble",
            CodecName::Fhir => "fhir",
            CodecName::Omh => "omh",
            CodecName::Csv => "csv",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CodecName::Json => "json",
            CodecName::SenmlJson => "senml-json",
            CodecName::SenmlCbor => "senml-cbor",
            CodecName::BleGatt => "ble-gatt",
            CodecName::Ble2a37 => "ble-2a37",
            CodecName::Ble2a1c => "ble-2a1c",
            CodecName::Ble2a35 => "ble-2a35",
            CodecName::Ble2a5e => "ble-2a5e",
            CodecName::Ble2a5f => "ble-2a5f",
            CodecName::Fhir => "fhir",
            CodecName::Omh => "omh",
            CodecName::Csv => "csv",
        }
    }
}

/// The options tables of a `[[route]]`, as the pipeline file gives them: each codec reads one.
#[derive(Debug, Clone, Copy, Default)]
pub struct CodecOptions<'a> {
    pub json: Option<&'a json::JsonMapping>,
    pub senml: Option<&'a senml::SenmlOptions>,
    pub ble: Option<&'a ble::BleOptions>,
    pub fhir: Option<&'a fhir::FhirOptions>,
    pub omh: Option<&'a omh::OmhOptions>,
    pub csv: Option<&'a csv::CsvOptions>,
}

/// A device format.
pub trait Codec: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    /// Decodes one payload into `out`. On error the caller discards whatever was pushed. Call
    /// it through [`decode_payload`], which checks what every format shares.
    fn decode(&self, msg: &Message<'_>, out: &mut ReadingSink<'_>) -> Result<(), DecodeError>;
}

/// Builds the codec a route names, with its options. The error says what is missing or wrong.
pub fn build(name: CodecName, route: &CodecOptions<'_>) -> Result<Arc<dyn Codec>, String> {
    use ble::Characteristic as C;
    // An options table another codec reads is a mistake in the pipeline file (a codec changed
    // and its mapping left behind), not something to ignore.
    let tables = [
        ("json", route.json.is_some()),
        ("senml", route.senml.is_some()),
        ("ble", route.ble.is_some()),
        ("fhir", route.fhir.is_some()),
        ("omh", route.omh.is_some()),
        ("csv", route.csv.is_some()),
    ];
    for (table, present) in tables {
        if present && name.options_table() != table {
            return Err(format!(
                "[route.{table}] is not read by codec `{}`",
                name.as_str()
            ));
        }
    }
    let ble = |c: Option<C>| -> Result<Arc<dyn Codec>, String> {
        Ok(Arc::new(route.ble.cloned().unwrap_or_default().build(c)?))
    };
    match name {
        CodecName::Json => {
            let mapping = route
                .json
                .ok_or("codec `json` needs a [route.json] mapping")?;
            Ok(Arc::new(mapping.build()?))
        }
        CodecName::SenmlJson => Ok(Arc::new(
            route.senml.cloned().unwrap_or_default().build_json()?,
        )),
        CodecName::SenmlCbor => Ok(Arc::new(
            route.senml.cloned().unwrap_or_default().build_cbor()?,
        )),
        CodecName::BleGatt => ble(None),
        CodecName::Ble2a37 => ble(Some(C::HeartRate)),
        CodecName::Ble2a1c => ble(Some(C::Temperature)),
        CodecName::Ble2a35 => ble(Some(C::BloodPressure)),
        CodecName::Ble2a5e => ble(Some(C::PlxSpotCheck)),
        CodecName::Ble2a5f => ble(Some(C::PlxContinuous)),
        CodecName::Fhir => Ok(Arc::new(route.fhir.cloned().unwrap_or_default().build()?)),
        CodecName::Omh => Ok(Arc::new(route.omh.cloned().unwrap_or_default().build()?)),
        CodecName::Csv => {
            let columns = route
                .csv
                .ok_or("codec `csv` needs [route.csv] naming the columns")?;
            Ok(Arc::new(columns.build()?))
        }
    }
}

/// Describes a serde_json error by position and kind without quoting the payload: serde_json's
/// own messages quote the offending value ("invalid type: string \"97\""), which may be a patient
/// value and must not reach a log or the dead-letter reason.
pub fn json_error(e: &serde_json::Error) -> DecodeError {
    use serde_json::error::Category;
    let at = format!("line {} column {}", e.line(), e.column());
    match e.classify() {
        Category::Eof => DecodeError::new(Reason::Syntax, format!("{at}: unexpected end of input")),
        Category::Syntax | Category::Io => {
            DecodeError::new(Reason::Syntax, format!("{at}: invalid JSON"))
        }
        Category::Data => {
            let text = e.to_string();
            let text = text.split(" at line ").next().unwrap_or_default();
            let detail = if text.starts_with("invalid type") || text.starts_with("invalid value") {
                let kind = text.split(':').next().unwrap_or_default();
                match text.rsplit_once(", expected ") {
                    Some((_, expected)) => format!("{kind}, expected {expected}"),
                    None => kind.to_owned(),
                }
            } else {
                // Messages of this crate's own visitors, which name labels, not values.
                text.to_owned()
            };
            DecodeError::new(Reason::Structure, format!("{at}: {detail}"))
        }
    }
}

/// Decodes one payload with `codec` into `sink`: how ingest, `decode` and the tests reach every
/// codec, so that what holds for every format is checked once, here. An empty payload is
/// refused as `empty` before a codec sees it (a JSON parser would call it a syntax error, a
/// binary decoder a truncation).
pub fn decode_payload(
    codec: &dyn Codec,
    msg: &Message<'_>,
    sink: &mut ReadingSink<'_>,
) -> Result<(), DecodeError> {
    if msg.payload.is_empty() {
        return Err(DecodeError::new(Reason::Empty, "the payload is empty"));
    }
    codec.decode(msg, sink)
}

/// Decodes one payload on its own into owned readings, judging device clocks by the default
/// window (tests, fuzzing).
pub fn decode_to_readings(
    codec: &dyn Codec,
    msg: &Message<'_>,
) -> Result<Vec<crate::model::reading::Reading>, DecodeError> {
    decode_to_readings_with_clock(codec, msg, ClockWindow::default())
}

/// Decodes one payload on its own into owned readings, judging device clocks by `clock`
/// (`iomt-edge decode`, with the pipeline's window).
pub fn decode_to_readings_with_clock(
    codec: &dyn Codec,
    msg: &Message<'_>,
    clock: ClockWindow,
) -> Result<Vec<crate::model::reading::Reading>, DecodeError> {
    let mut builder = BatchBuilder::new(0, 16);
    decode_payload(
        codec,
        msg,
        &mut ReadingSink::new(&mut builder, msg).with_clock(clock),
    )?;
    let batch = builder
        .take()
        .into_record_batch()
        .map_err(|e| DecodeError::new(Reason::Structure, e.to_string()))?;
    crate::model::batch::BatchView::new(&batch)
        .and_then(|v| v.readings())
        .map_err(|e| DecodeError::new(Reason::Structure, e.to_string()))
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    pub const RECEIVED: i64 = 1_700_000_000_000_000;

    pub fn msg(payload: &[u8]) -> Message<'_> {
        Message {
            topic: "t/dev-1",
            payload,
            received: RECEIVED,
            source: "dev-1",
            subject: Some("bed-1"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::{msg, RECEIVED};
    use super::*;
    use crate::model::reading::Reading;

    const HOUR: i64 = 3_600_000_000;
    const MINUTE: i64 = 60_000_000;

    /// A heart rate of 72 at `ts`, naming no source or subject of its own.
    fn heart_rate(ts: Option<i64>, flags: u16) -> Decoded<'static> {
        Decoded {
            ts,
            metric: Metric::HeartRate,
            value: RawValue::Number(72.0, ""),
            flags,
            source: None,
            subject: None,
        }
    }

    /// Pushes `d` through a sink for message `m` with `clock`: the stored reading, or why not.
    fn push_to(
        m: &Message<'_>,
        d: Decoded<'_>,
        clock: ClockWindow,
    ) -> Result<Reading, DecodeError> {
        let mut builder = BatchBuilder::new(0, 4);
        ReadingSink::new(&mut builder, m)
            .with_clock(clock)
            .push(d)?;
        let batch = builder.take().into_record_batch().unwrap();
        let mut r = crate::model::batch::BatchView::new(&batch)
            .unwrap()
            .readings()
            .unwrap();
        Ok(r.remove(0))
    }

    /// Pushes one heart rate at device time `ts` through a sink with `clock`.
    fn push(ts: Option<i64>, reading_flags: u16, clock: ClockWindow) -> Reading {
        push_to(&msg(b"x"), heart_rate(ts, reading_flags), clock).unwrap()
    }

    fn suspect(r: &Reading) -> bool {
        r.flags & flags::CLOCK_SUSPECT != 0
    }

    #[test]
    fn device_times_outside_the_window_are_clock_suspect() {
        let default = ClockWindow::default();
        for (offset, want) in [
            (0, false),
            (-24 * HOUR, false),
            (-24 * HOUR - 1, true),
            (5 * MINUTE, false),
            (5 * MINUTE + 1, true),
            // 1970 and 9999.
            (-RECEIVED, true),
            (253_402_300_799_000_000 - RECEIVED, true),
        ] {
            let r = push(Some(RECEIVED + offset), 0, default);
            assert_eq!(suspect(&r), want, "offset {offset} µs");
            assert_eq!(r.ts, RECEIVED + offset, "the device time is kept");
        }
        let week = ClockWindow::new(Duration::from_secs(7 * 86_400), Duration::ZERO);
        assert!(!suspect(&push(Some(RECEIVED - 6 * 24 * HOUR), 0, week)));
        assert!(suspect(&push(Some(RECEIVED + 1), 0, week)));
    }

    #[test]
    fn the_receive_time_is_never_suspect_and_an_offset_from_it_is_judged() {
        let r = push(None, 0, ClockWindow::default());
        assert_eq!(r.ts, RECEIVED);
        assert_eq!(r.flags, flags::TIME_FROM_RECEIPT);
        // A SenML relative time is the receive time plus an offset: a few seconds of a
        // device's buffer pass; an offset that carries it out of the window does not.
        let near = push(
            Some(RECEIVED - 5_000_000),
            flags::TIME_FROM_RECEIPT,
            ClockWindow::default(),
        );
        assert!(!suspect(&near));
        let far = push(
            Some(RECEIVED - 48 * HOUR),
            flags::TIME_FROM_RECEIPT,
            ClockWindow::default(),
        );
        assert!(suspect(&far));
    }

    #[test]
    fn identifiers_longer_than_256_bytes_refuse_the_message() {
        let long = "p".repeat(MAX_ID_BYTES + 1);
        let ok = "p".repeat(MAX_ID_BYTES);
        let window = ClockWindow::default();
        for (field, from, decoded, route_source, route_subject) in [
            (
                "source",
                "payload",
                Decoded {
                    source: Some(&long),
                    ..heart_rate(None, 0)
                },
                "dev-1",
                None,
            ),
            (
                "subject",
                "payload",
                Decoded {
                    subject: Some(&long),
                    ..heart_rate(None, 0)
                },
                "dev-1",
                None,
            ),
            ("source", "topic", heart_rate(None, 0), long.as_str(), None),
            (
                "subject",
                "topic",
                heart_rate(None, 0),
                "dev-1",
                Some(long.as_str()),
            ),
        ] {
            let m = Message {
                source: route_source,
                subject: route_subject,
                ..msg(b"x")
            };
            let e = push_to(&m, decoded, window).unwrap_err();
            assert_eq!(e.reason, Reason::BadValue);
            assert_eq!(
                e.detail,
                format!("{field} from the {from}: 257 bytes, above the limit of 256")
            );
        }
        let r = push_to(
            &msg(b"x"),
            Decoded {
                source: Some(&ok),
                subject: Some(&ok),
                ..heart_rate(None, 0)
            },
            window,
        )
        .unwrap();
        assert_eq!((r.source.len(), r.subject.unwrap().len()), (256, 256));
    }

    #[test]
    fn an_empty_name_from_the_payload_is_no_name() {
        let window = ClockWindow::default();
        // test_util::msg's route names source dev-1 and subject bed-1.
        let r = push_to(
            &msg(b"x"),
            Decoded {
                source: Some(""),
                subject: Some(""),
                ..heart_rate(None, 0)
            },
            window,
        )
        .unwrap();
        assert_eq!(
            (r.source.as_str(), r.subject.as_deref()),
            ("dev-1", Some("bed-1"))
        );
        let m = Message {
            subject: None,
            ..msg(b"x")
        };
        let r = push_to(
            &m,
            Decoded {
                subject: Some(""),
                ..heart_rate(None, 0)
            },
            window,
        )
        .unwrap();
        assert_eq!(r.subject, None);
    }
}
