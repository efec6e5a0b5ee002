//! Times as devices write them: RFC 3339, Unix numbers of several scales, strftime patterns in
//! a device's local clock, and the fixed UTC offsets of clocks that carry no zone.

use serde::Deserialize;
use serde_json::Value;

use super::{DecodeError, Reason};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TsFormat {
    /// Strings as RFC 3339; numbers as Unix seconds, milliseconds or microseconds by magnitude
    /// (below 10^11: s, below 10^14: ms, else µs). Only a guess: a millisecond time after the
    /// year 5138 reads as microseconds (9999 becomes 1978), one before March 1973 as seconds. A
    /// route should state its devices' unit; a misread time is at least flagged `clock_suspect`.
    #[default]
    Auto,
    Rfc3339,
    UnixS,
    UnixMs,
    UnixUs,
}

/// Parses RFC 3339 into µs since the epoch.
pub fn rfc3339_micros(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_micros())
}

/// µs since the epoch of a JSON time value.
pub fn json_time(v: &Value, format: TsFormat, at: &str) -> Result<i64, DecodeError> {
    let bad = |what: &str| DecodeError::new(Reason::BadTime, format!("{at}: {what}"));
    match (v, format) {
        (Value::String(s), TsFormat::Auto | TsFormat::Rfc3339) => {
            rfc3339_micros(s).ok_or_else(|| bad("not an RFC 3339 time"))
        }
        (Value::Number(n), f) if f != TsFormat::Rfc3339 => {
            let x = n.as_f64().ok_or_else(|| bad("not a number"))?;
            unix_micros(x, f).ok_or_else(|| bad("out of range"))
        }
        _ => Err(bad("wrong type for the time format")),
    }
}

/// `+hh:mm` / `-hh:mm` / `Z` → µs east of UTC.
pub fn parse_utc_offset(s: &str) -> Result<i64, String> {
    if s == "Z" || s == "UTC" {
        return Ok(0);
    }
    let bad = || format!("utc_offset `{s}` is not of the form +hh:mm or -hh:mm");
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(bad)?;
    let (h, m): (i64, i64) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 14 || m > 59 {
        return Err(bad());
    }
    Ok(sign * (h * 3600 + m * 60) * 1_000_000)
}

/// A time written with a strftime `pattern` in a clock `utc_offset_us` east of UTC.
pub fn pattern_micros(s: &str, pattern: &str, utc_offset_us: i64) -> Option<i64> {
    let t = chrono::NaiveDateTime::parse_from_str(s, pattern).ok()?;
    Some(t.and_utc().timestamp_micros() - utc_offset_us)
}

/// A number of seconds/milliseconds/microseconds since the epoch, by `format` (auto: by size).
pub fn unix_micros(x: f64, format: TsFormat) -> Option<i64> {
    let scale = match format {
        TsFormat::UnixS => 1e6,
        TsFormat::UnixMs => 1e3,
        TsFormat::UnixUs => 1.0,
        TsFormat::Rfc3339 => return None,
        TsFormat::Auto if x.abs() < 1e11 => 1e6,
        TsFormat::Auto if x.abs() < 1e14 => 1e3,
        TsFormat::Auto => 1.0,
    };
    let us = x * scale;
    (us.is_finite() && us.abs() < 9.0e18).then(|| us.round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_patterns_and_numbers() {
        assert_eq!(parse_utc_offset("+05:30").unwrap(), 19_800_000_000);
        assert_eq!(parse_utc_offset("-01:00").unwrap(), -3_600_000_000);
        assert!(parse_utc_offset("1h").is_err());
        assert!(parse_utc_offset("+15:00").is_err());
        assert_eq!(
            pattern_micros("05/12/2012 11:50:27", "%d/%m/%Y %H:%M:%S", 3_600_000_000),
            Some(1_354_708_227_000_000 - 3_600_000_000)
        );
        assert_eq!(pattern_micros("5 Dec", "%d/%m/%Y %H:%M:%S", 0), None);
        assert_eq!(
            unix_micros(1.7e9, TsFormat::Auto),
            Some(1_700_000_000_000_000)
        );
        assert_eq!(
            unix_micros(1.7e12, TsFormat::Auto),
            Some(1_700_000_000_000_000)
        );
        assert_eq!(unix_micros(1e300, TsFormat::UnixS), None);
    }
}
