//! `csv`: lines of delimited values from legacy devices and serial-to-MQTT bridges. The route
//! names the columns, since such lines rarely carry a header.
//!
//! ```toml
//! [route.csv]
//! columns = ["time", "bed", "hr", "spo2", "temp"]   # every line has exactly these columns
//! header = false              # true: each message starts with a header line equal to `columns`
//! delimiter = ","
//! ts = "time"                 # the time column (absent: receive time)
//! ts_format = "auto"          # rfc3339 | unix_s | unix_ms | unix_us | auto (a guess by size)
//! # ts_pattern = "%d/%m/%Y %H:%M:%S"  # or a strftime pattern in the device's clock …
//! # utc_offset = "+01:00"            # … which is this far east of UTC
//! subject = "bed"             # optional columns overriding the topic templates
//! # source = "serial"
//! require_line_end = true     # a line without its line break is taken as cut off and refused
//! [route.csv.readings]
//! hr = { metric = "heart_rate" }               # unit: the metric's canonical unit
//! temp = { metric = "body_temp", unit = "[degF]" }
//! ```
//!
//! An empty cell is a value the device did not measure and is skipped. A cell that is not a
//! number refuses the message, as does a line with the wrong number of columns: a legacy
//! device that changes its column order must not have its values stored under other names.
//! The line-end rule exists because a truncated line ("72" arriving as "7") would otherwise
//! still parse.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::time::{parse_utc_offset, pattern_micros, rfc3339_micros, unix_micros, TsFormat};
use super::{Codec, DecodeError, Decoded, Message, RawValue, ReadingSink, Reason};
use crate::model::reading::{Metric, ValueKind};

/// `[route.csv.readings.<column>]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvReading {
    pub metric: Metric,
    #[serde(default)]
    pub unit: Option<String>,
}

/// `[route.csv]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvOptions {
    pub columns: Vec<String>,
    #[serde(default)]
    pub header: bool,
    #[serde(default = "CsvOptions::default_delimiter")]
    pub delimiter: char,
    #[serde(default)]
    pub ts: Option<String>,
    #[serde(default)]
    pub ts_format: TsFormat,
    #[serde(default)]
    pub ts_pattern: Option<String>,
    #[serde(default)]
    pub utc_offset: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default = "CsvOptions::default_require_line_end")]
    pub require_line_end: bool,
    pub readings: BTreeMap<String, CsvReading>,
}

impl CsvOptions {
    const fn default_delimiter() -> char {
        ','
    }
    const fn default_require_line_end() -> bool {
        true
    }

    pub fn build(&self) -> Result<CsvCodec, String> {
        let index = |name: &str, key: &str| -> Result<usize, String> {
            self.columns
                .iter()
                .position(|c| c == name)
                .ok_or_else(|| format!("[route.csv] {key} `{name}` is not one of the columns"))
        };
        if self.columns.is_empty() {
            return Err("[route.csv] columns is empty".into());
        }
        for (i, c) in self.columns.iter().enumerate() {
            if c.is_empty() || self.columns[..i].contains(c) {
                return Err(format!("[route.csv] column `{c}` is empty or named twice"));
            }
        }
        if !self.delimiter.is_ascii() || "\"\r\n".contains(self.delimiter) {
            return Err("[route.csv] delimiter must be one ASCII character other than a quote or a line break".into());
        }
        if self.readings.is_empty() {
            return Err("[route.csv] needs at least one [route.csv.readings] column".into());
        }
        let mut readings = Vec::new();
        for (column, r) in &self.readings {
            let unit = r.unit.clone().unwrap_or_default();
            if r.metric.info().kind == ValueKind::Numeric {
                crate::model::units::to_canonical(r.metric, &unit, 0.0)
                    .map_err(|e| e.to_string())?;
            }
            readings.push((index(column, "reading")?, column.clone(), r.metric, unit));
        }
        readings.sort_by_key(|r| r.0);
        if self.ts_pattern.is_some() && self.ts_format != TsFormat::Auto {
            return Err("[route.csv] set ts_format or ts_pattern, not both".into());
        }
        if let Some(p) = &self.ts_pattern {
            // A pattern chrono cannot use would fail on every line: refuse it now.
            if chrono::format::StrftimeItems::new(p).parse().is_err() {
                return Err(format!(
                    "[route.csv] ts_pattern `{p}` is not a strftime pattern"
                ));
            }
        }
        Ok(CsvCodec {
            columns: self.columns.clone(),
            header: self.header,
            delimiter: self.delimiter as u8,
            ts: self.ts.as_deref().map(|c| index(c, "ts")).transpose()?,
            ts_format: self.ts_format,
            ts_pattern: self.ts_pattern.clone(),
            utc_offset_us: self
                .utc_offset
                .as_deref()
                .map(parse_utc_offset)
                .transpose()?
                .unwrap_or(0),
            source: self
                .source
                .as_deref()
                .map(|c| index(c, "source"))
                .transpose()?,
            subject: self
                .subject
                .as_deref()
                .map(|c| index(c, "subject"))
                .transpose()?,
            require_line_end: self.require_line_end,
            readings,
        })
    }
}

#[derive(Debug)]
pub struct CsvCodec {
    columns: Vec<String>,
    header: bool,
    delimiter: u8,
    ts: Option<usize>,
    ts_format: TsFormat,
    ts_pattern: Option<String>,
    utc_offset_us: i64,
    source: Option<usize>,
    subject: Option<usize>,
    require_line_end: bool,
    /// (column index, column name, metric, unit), in column order.
    readings: Vec<(usize, String, Metric, String)>,
}

impl CsvCodec {
    fn time(&self, cell: &str, at: &str) -> Result<i64, DecodeError> {
        let t = match &self.ts_pattern {
            Some(p) => pattern_micros(cell, p, self.utc_offset_us),
            None => match cell.parse::<f64>() {
                Ok(x) if self.ts_format != TsFormat::Rfc3339 => unix_micros(x, self.ts_format),
                _ if matches!(self.ts_format, TsFormat::Auto | TsFormat::Rfc3339) => {
                    rfc3339_micros(cell)
                }
                _ => None,
            },
        };
        t.ok_or_else(|| {
            DecodeError::new(
                Reason::BadTime,
                format!("{at}: not a time in the route's format"),
            )
        })
    }
}

impl Codec for CsvCodec {
    fn name(&self) -> &'static str {
        "csv"
    }

    fn decode(&self, msg: &Message<'_>, out: &mut ReadingSink<'_>) -> Result<(), DecodeError> {
        if self.require_line_end && !msg.payload.ends_with(b"\n") {
            return Err(DecodeError::new(
                Reason::Truncated,
                "the last line has no line break: taken as cut off",
            ));
        }
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .delimiter(self.delimiter)
            .flexible(true)
            .from_reader(msg.payload);
        let mut record = csv::StringRecord::new();
        let mut line = 0;
        let mut pushed = 0;
        loop {
            match reader.read_record(&mut record) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    let reason = match e.kind() {
                        csv::ErrorKind::Utf8 { .. } => Reason::Syntax,
                        _ => Reason::Structure,
                    };
                    let at = e.position().map_or(0, |p| p.line());
                    return Err(DecodeError::new(
                        reason,
                        format!("line {at}: not valid CSV"),
                    ));
                }
            }
            line += 1;
            if record.len() != self.columns.len() {
                return Err(DecodeError::new(
                    Reason::Structure,
                    format!(
                        "line {line}: {} columns where the route names {}",
                        record.len(),
                        self.columns.len()
                    ),
                ));
            }
            if line == 1 && self.header {
                if record
                    .iter()
                    .map(str::trim)
                    .ne(self.columns.iter().map(String::as_str))
                {
                    return Err(DecodeError::new(
                        Reason::Structure,
                        "line 1: the header does not name the route's columns in order",
                    ));
                }
                continue;
            }
            let cell = |i: usize| record.get(i).map(str::trim).filter(|c| !c.is_empty());
            let ts = match self.ts {
                Some(i) => match cell(i) {
                    Some(c) => {
                        Some(self.time(c, &format!("line {line}, column {}", self.columns[i]))?)
                    }
                    None => {
                        return Err(DecodeError::new(
                            Reason::MissingField,
                            format!("line {line}: the time column is empty"),
                        ))
                    }
                },
                None => None,
            };
            let source = self.source.and_then(cell);
            let subject = self.subject.and_then(cell);
            for (i, column, metric, unit) in &self.readings {
                let Some(c) = cell(*i) else { continue };
                let at = || format!("line {line}, column {column}");
                let value = match metric.info().kind {
                    ValueKind::Text => RawValue::Text(c),
                    ValueKind::Numeric => match c.parse::<f64>() {
                        Ok(v) if v.is_finite() => RawValue::Number(v, unit),
                        _ => {
                            return Err(DecodeError::new(
                                Reason::BadValue,
                                format!("{}: not a number", at()),
                            ))
                        }
                    },
                };
                out.push(Decoded {
                    ts,
                    metric: *metric,
                    value,
                    flags: 0,
                    source,
                    subject,
                })
                .map_err(|e| DecodeError::new(e.reason, format!("{}: {}", at(), e.detail)))?;
                pushed += 1;
            }
        }
        if pushed == 0 {
            return Err(DecodeError::new(Reason::Empty, "no value in any line"));
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

    const OPTS: &str = r#"
columns = ["time", "bed", "hr", "spo2", "temp"]
ts = "time"
subject = "bed"
[readings]
hr = { metric = "heart_rate" }
spo2 = { metric = "spo2", unit = "%" }
temp = { metric = "body_temp", unit = "[degF]" }
"#;

    fn codec(extra: &str) -> CsvCodec {
        let o: CsvOptions = toml::from_str(&format!("{extra}\n{OPTS}")).unwrap();
        o.build().unwrap()
    }

    #[test]
    fn lines_become_readings_by_column() {
        let c = codec("");
        let p = b"2024-05-01T10:00:00Z,bed-3,72,97,98.6\n1714557660,bed-3,75,,\n";
        let r = decode_to_readings(&c, &msg(p)).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!((r[0].metric, r[0].value), (Metric::HeartRate, Some(72.0)));
        assert_eq!(r[0].subject.as_deref(), Some("bed-3"));
        assert_eq!(r[0].ts, 1_714_557_600_000_000);
        assert!((r[2].value.unwrap() - 37.0).abs() < 1e-9);
        assert_eq!(r[3].ts, 1_714_557_660_000_000);
        assert_eq!(r[3].value, Some(75.0));
    }

    #[test]
    fn headers_patterns_and_delimiters() {
        let c = codec(
            "header = true\ndelimiter = \";\"\nts_pattern = \"%d/%m/%Y %H:%M:%S\"\nutc_offset = \"+02:00\"\nrequire_line_end = false",
        );
        let p = b"time;bed;hr;spo2;temp\r\n01/05/2024 12:00:00;bed-1;60;95;97.0";
        let r = decode_to_readings(&c, &msg(p)).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].ts, 1_714_557_600_000_000);
        let e = decode_to_readings(
            &c,
            &msg(b"time;bed;spo2;hr;temp\n01/05/2024 12:00:00;b;1;2;3"),
        )
        .unwrap_err();
        assert_eq!(e.reason, Reason::Structure);
        // Without a time column the receive time is used.
        let o: CsvOptions =
            toml::from_str("columns = [\"hr\"]\n[readings]\nhr = { metric = \"heart_rate\" }")
                .unwrap();
        let r = decode_to_readings(&o.build().unwrap(), &msg(b"400\n")).unwrap();
        assert_eq!(r[0].ts, RECEIVED);
        assert_ne!(r[0].flags & flags::OUT_OF_RANGE, 0);
    }

    #[test]
    fn bad_lines_are_refused() {
        let c = codec("");
        let cases: &[(&[u8], Reason)] = &[
            (b"2024-05-01T10:00:00Z,bed-3,72,97,98.6", Reason::Truncated),
            (b"2024-05-01T10:00:00Z,bed-3,72,97\n", Reason::Structure),
            (
                b"2024-05-01T10:00:00Z,bed-3,fast,97,98.6\n",
                Reason::BadValue,
            ),
            (
                b"2024-05-01T10:00:00Z,bed-3,NaN,97,98.6\n",
                Reason::BadValue,
            ),
            (b"yesterday,bed-3,72,97,98.6\n", Reason::BadTime),
            (b",bed-3,72,97,98.6\n", Reason::MissingField),
            (b"2024-05-01T10:00:00Z,bed-3,,,\n", Reason::Empty),
            (b"\n", Reason::Empty),
            (b"2024-05-01T10:00:00Z,\xff,72,97,98.6\n", Reason::Syntax),
        ];
        for (p, reason) in cases {
            let e = decode_to_readings(&c, &msg(p)).unwrap_err();
            assert_eq!(e.reason, *reason, "{}: {e}", String::from_utf8_lossy(p));
        }
    }

    #[test]
    fn options_are_checked_when_built() {
        let bad = [
            "columns = []\n[readings]\nhr = { metric = \"heart_rate\" }",
            "columns = [\"a\", \"a\"]\n[readings]\na = { metric = \"heart_rate\" }",
            "columns = [\"a\"]\n[readings]\nb = { metric = \"heart_rate\" }",
            "columns = [\"a\"]\nts = \"t\"\n[readings]\na = { metric = \"heart_rate\" }",
            "columns = [\"a\"]\n[readings]\na = { metric = \"heart_rate\", unit = \"kPa\" }",
            "columns = [\"a\"]\ndelimiter = \"\\\"\"\n[readings]\na = { metric = \"heart_rate\" }",
            "columns = [\"a\"]\nts_pattern = \"%Q\"\n[readings]\na = { metric = \"heart_rate\" }",
        ];
        for t in bad {
            let o: CsvOptions = toml::from_str(t).unwrap();
            assert!(o.build().is_err(), "{t}");
        }
    }
}
