//! One reading is one measurement: the metric catalogue (name, canonical UCUM unit, LOINC,
//! plausible range), the quality flags, the Arrow schema of a batch, and the canonical JSON form
//! that `iomt-edge decode` prints.

use std::sync::{Arc, OnceLock};

use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::Serialize;

/// Whether a metric carries a number in `value` or a word in `text`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Numeric,
    Text,
}

/// One entry of the metric catalogue.
#[derive(Debug, Clone, Copy)]
pub struct MetricInfo {
    pub name: &'static str,
    /// UCUM code of the canonical unit every value is converted to.
    pub unit: &'static str,
    pub loinc: Option<&'static str>,
    pub kind: ValueKind,
    /// Values outside this closed range are stored with [`flags::OUT_OF_RANGE`] and never feed an
    /// alarm as if they were real.
    pub plausible: Option<(f64, f64)>,
}

macro_rules! catalogue {
    ($( $variant:ident => $name:literal, $unit:literal, $loinc:expr, $kind:ident, $range:expr; )*) => {
        /// A canonical metric. The discriminant is the index into [`CATALOGUE`] and the Arrow
        /// dictionary key of the `metric` column, so it must only ever be appended to.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum Metric { $( $variant, )* }

        pub const CATALOGUE: &[MetricInfo] = &[
            $( MetricInfo { name: $name, unit: $unit, loinc: $loinc, kind: ValueKind::$kind, plausible: $range }, )*
        ];

        impl Metric {
            pub const ALL: &[Metric] = &[ $( Metric::$variant, )* ];
        }
    };
}

catalogue! {
    HeartRate     => "heart_rate",    "/min",    Some("8867-4"),  Numeric, Some((0.0, 350.0));
    PulseRate     => "pulse_rate",    "/min",    Some("8889-8"),  Numeric, Some((0.0, 350.0));
    RespRate      => "resp_rate",     "/min",    Some("9279-1"),  Numeric, Some((0.0, 150.0));
    Spo2          => "spo2",          "%",       Some("59408-5"), Numeric, Some((0.0, 100.0));
    BodyTemp      => "body_temp",     "Cel",     Some("8310-5"),  Numeric, Some((25.0, 45.0));
    BpSystolic    => "bp_systolic",   "mm[Hg]",  Some("8480-6"),  Numeric, Some((20.0, 300.0));
    BpDiastolic   => "bp_diastolic",  "mm[Hg]",  Some("8462-4"),  Numeric, Some((10.0, 250.0));
    BpMean        => "bp_mean",       "mm[Hg]",  Some("8478-0"),  Numeric, Some((10.0, 280.0));
    RrInterval    => "rr_interval",   "ms",      None,            Numeric, Some((100.0, 5000.0));
    O2Flow        => "o2_flow",       "L/min",   Some("3151-8"),  Numeric, Some((0.0, 80.0));
    Consciousness => "consciousness", "{ACVPU}", Some("67775-7"), Text,    None;
    AmbientTemp   => "ambient_temp",  "Cel",     None,            Numeric, Some((-100.0, 100.0));
    Humidity      => "humidity",      "%RH",     None,            Numeric, Some((0.0, 100.0));
    Co2           => "co2",           "ppm",     None,            Numeric, Some((0.0, 100000.0));
    Occupancy     => "occupancy",     "{count}", None,            Numeric, Some((0.0, 100000.0));
    Latitude      => "latitude",      "deg",     None,            Numeric, Some((-90.0, 90.0));
    Longitude     => "longitude",     "deg",     None,            Numeric, Some((-180.0, 180.0));
    Rssi          => "rssi",          "dBm",     None,            Numeric, Some((-150.0, 30.0));
    EnergyExpended => "energy_expended", "kJ",   None,            Numeric, Some((0.0, 65535.0));
    TempSite      => "temp_site",     "{site}",  None,            Text,    None;
    Spo2Fast      => "spo2_fast",     "%",       None,            Numeric, Some((0.0, 100.0));
    Spo2Slow      => "spo2_slow",     "%",       None,            Numeric, Some((0.0, 100.0));
    PulseRateFast => "pulse_rate_fast", "/min",  None,            Numeric, Some((0.0, 350.0));
    PulseRateSlow => "pulse_rate_slow", "/min",  None,            Numeric, Some((0.0, 350.0));
    PerfusionIndex => "perfusion_index", "%",    None,            Numeric, Some((0.0, 100.0));
}

/// LOINC codes that name a catalogue metric besides its own code: the site-specific body
/// temperatures and the arterial saturation code that monitors send for pulse oximetry.
const LOINC_ALIASES: &[(&str, Metric)] = &[
    ("8331-1", Metric::BodyTemp), // oral temperature
    ("8328-7", Metric::BodyTemp), // axillary temperature
    ("8332-9", Metric::BodyTemp), // rectal temperature
    ("8333-7", Metric::BodyTemp), // tympanic membrane temperature
    ("2708-6", Metric::Spo2),     // oxygen saturation in arterial blood
    ("20564-1", Metric::Spo2),    // oxygen saturation in blood
];

impl Metric {
    pub fn info(self) -> &'static MetricInfo {
        &CATALOGUE[self as usize]
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    pub fn unit(self) -> &'static str {
        self.info().unit
    }

    pub fn from_name(name: &str) -> Option<Metric> {
        Metric::ALL.iter().copied().find(|m| m.name() == name)
    }

    pub fn from_index(index: usize) -> Option<Metric> {
        Metric::ALL.get(index).copied()
    }

    pub fn from_loinc(code: &str) -> Option<Metric> {
        Metric::ALL
            .iter()
            .copied()
            .find(|m| m.info().loinc == Some(code))
            .or_else(|| {
                LOINC_ALIASES
                    .iter()
                    .find(|(c, _)| *c == code)
                    .map(|(_, m)| *m)
            })
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Metric {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Metric::from_name(&name).ok_or_else(|| {
            let known: Vec<&str> = CATALOGUE.iter().map(|m| m.name).collect();
            serde::de::Error::custom(format!(
                "unknown metric `{name}`, expected one of: {}",
                known.join(", ")
            ))
        })
    }
}

/// Quality bits of the `flags` column. Bits are only ever added, never renumbered, because
/// stored batches and their leaf hashes carry them.
pub mod flags {
    /// The value lies outside the metric's plausible range.
    pub const OUT_OF_RANGE: u16 = 1 << 0;
    /// The device reports no skin/sensor contact.
    pub const NO_CONTACT: u16 = 1 << 1;
    /// The device marks the measurement as questionable (movement, weak signal, …).
    pub const QUESTIONABLE: u16 = 1 << 2;
    /// The device sent it from its own memory, not live.
    pub const FROM_STORAGE: u16 = 1 << 3;
    /// The payload had no usable device time: `ts` is the receive time.
    pub const TIME_FROM_RECEIPT: u16 = 1 << 4;
    /// The device reports an early estimate or calibration in progress.
    pub const CALIBRATING: u16 = 1 << 5;
    /// The device reports the measurement invalid, unavailable, or itself malfunctioning.
    pub const INVALID: u16 = 1 << 6;
    /// The device marks the data as demonstration or test data, not a patient's.
    pub const TEST_DATA: u16 = 1 << 7;
    /// The device detected an irregular pulse during the measurement.
    pub const IRREGULAR_PULSE: u16 = 1 << 8;
    /// The device reported a value beyond its measuring range (IEEE 11073 ±INF): `value` is null.
    pub const BEYOND_RANGE: u16 = 1 << 9;
    /// The device time lies further from the receive time than the pipeline allows
    /// (`ingest.clock_max_past` before it, `ingest.clock_max_future` after it): an unset or
    /// drifted clock, or a time read in the wrong unit. Never set when `ts` is the receive time.
    pub const CLOCK_SUSPECT: u16 = 1 << 10;

    pub const NAMES: &[(u16, &str)] = &[
        (OUT_OF_RANGE, "out_of_range"),
        (NO_CONTACT, "no_contact"),
        (QUESTIONABLE, "questionable"),
        (FROM_STORAGE, "from_storage"),
        (TIME_FROM_RECEIPT, "time_from_receipt"),
        (CALIBRATING, "calibrating"),
        (INVALID, "invalid"),
        (TEST_DATA, "test_data"),
        (IRREGULAR_PULSE, "irregular_pulse"),
        (BEYOND_RANGE, "beyond_range"),
        (CLOCK_SUSPECT, "clock_suspect"),
    ];

    pub fn names(bits: u16) -> Vec<&'static str> {
        NAMES
            .iter()
            .filter(|(bit, _)| bits & bit != 0)
            .map(|(_, name)| *name)
            .collect()
    }

    /// Flags that mean a value must not be trusted for clinical decisions. A suspect clock is
    /// among them: rules judge device time, so a reading from the wrong day would hold a
    /// condition for a time it never held.
    pub const UNTRUSTED: u16 =
        OUT_OF_RANGE | NO_CONTACT | INVALID | TEST_DATA | BEYOND_RANGE | CLOCK_SUSPECT;

    /// Flags that keep a reading out of every clinical judgement (alarms, NEWS2): the untrusted
    /// ones and `questionable`.
    pub const NOT_CLINICAL: u16 = UNTRUSTED | QUESTIONABLE;
}

/// One stored reading, owned. The hot path never builds these: codecs push straight into the
/// batch builder; this is the form tests, the decode command and the alarm payloads use.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub seq: u64,
    /// Microseconds since the Unix epoch, UTC.
    pub ts: i64,
    pub received: i64,
    pub source: String,
    pub subject: Option<String>,
    pub metric: Metric,
    pub value: Option<f64>,
    pub text: Option<String>,
    pub unit: String,
    pub flags: u16,
}

/// The canonical JSON form of a reading (docs/architecture.md, Readings): one line per reading in `decode`.
#[derive(Debug, Serialize)]
pub struct CanonicalJson<'a> {
    pub ts: String,
    pub source: &'a str,
    pub subject: Option<&'a str>,
    pub metric: &'static str,
    pub value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<&'a str>,
    pub unit: &'a str,
    pub flags: Vec<&'static str>,
}

impl Reading {
    pub fn canonical_json(&self) -> CanonicalJson<'_> {
        CanonicalJson {
            ts: format_ts(self.ts),
            source: &self.source,
            subject: self.subject.as_deref(),
            metric: self.metric.name(),
            value: self.value,
            text: self.text.as_deref(),
            unit: &self.unit,
            flags: flags::names(self.flags),
        }
    }
}

/// RFC 3339 in UTC with only as many fractional digits as the time needs.
pub fn format_ts(micros: i64) -> String {
    use chrono::{DateTime, SecondsFormat};
    match DateTime::from_timestamp_micros(micros) {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        None => micros.to_string(),
    }
}

pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn dict_utf8(name: &str, nullable: bool) -> Field {
    Field::new(
        name,
        DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
        nullable,
    )
}

/// The Arrow schema of every batch (docs/architecture.md, Readings).
pub fn schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
            Arc::new(Schema::new(vec![
                Field::new("seq", DataType::UInt64, false),
                Field::new("ts", ts.clone(), false),
                Field::new("received", ts, false),
                dict_utf8("source", false),
                dict_utf8("subject", true),
                dict_utf8("metric", false),
                Field::new("value", DataType::Float64, true),
                Field::new("text", DataType::Utf8, true),
                dict_utf8("unit", false),
                Field::new("flags", DataType::UInt16, false),
            ]))
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_indices_match_variants() {
        for (i, m) in Metric::ALL.iter().enumerate() {
            assert_eq!(*m as usize, i);
            assert_eq!(Metric::from_name(m.name()), Some(*m));
        }
        assert_eq!(Metric::from_loinc("8310-5"), Some(Metric::BodyTemp));
        assert_eq!(Metric::from_name("nope"), None);
    }

    #[test]
    fn flag_bits_keep_their_numbers() {
        // Stored batches and their leaf hashes carry these bits: a renumbering would change
        // what every stored reading means.
        let bits: Vec<(u16, &str)> = flags::NAMES.to_vec();
        assert_eq!(
            bits,
            [
                (1 << 0, "out_of_range"),
                (1 << 1, "no_contact"),
                (1 << 2, "questionable"),
                (1 << 3, "from_storage"),
                (1 << 4, "time_from_receipt"),
                (1 << 5, "calibrating"),
                (1 << 6, "invalid"),
                (1 << 7, "test_data"),
                (1 << 8, "irregular_pulse"),
                (1 << 9, "beyond_range"),
                (1 << 10, "clock_suspect"),
            ]
        );
        assert_eq!(
            flags::names(flags::CLOCK_SUSPECT | flags::OUT_OF_RANGE),
            ["out_of_range", "clock_suspect"]
        );
    }

    #[test]
    fn canonical_json_matches_design_form() {
        let r = Reading {
            seq: 1,
            ts: 1_354_708_227_000_000,
            received: 0,
            source: "dev".into(),
            subject: None,
            metric: Metric::BodyTemp,
            value: Some(37.6),
            text: None,
            unit: "Cel".into(),
            flags: 0,
        };
        assert_eq!(
            serde_json::to_string(&r.canonical_json()).unwrap(),
            r#"{"ts":"2012-12-05T11:50:27Z","source":"dev","subject":null,"metric":"body_temp","value":37.6,"unit":"Cel","flags":[]}"#
        );
    }
}
