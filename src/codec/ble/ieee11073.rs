//! The field types of the Bluetooth health characteristics: IEEE 11073-20601 SFLOAT (16 bit)
//! and FLOAT (32 bit) with their special values, the GATT Date Time, and a little-endian field
//! reader whose every error names the field that was cut off.
//!
//! Hand-written: these are a few lines of bit layout each, and the crates that cover them come
//! with a whole BLE stack attached.

use super::super::{DecodeError, Reason};

/// A decoded SFLOAT or FLOAT. Only `Value` is a number; the others must never become one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MedFloat {
    Value(f64),
    /// Not a Number: the device has no value.
    NaN,
    /// Not at this Resolution: the value cannot be represented.
    NRes,
    PositiveInfinity,
    NegativeInfinity,
    /// A mantissa the standard reserves for future use.
    Reserved,
}

/// Powers of ten that f64 holds exactly, so `mantissa / 10^k` is correctly rounded (37.6 stays
/// 37.6, where `3760 * 0.01` would not).
const EXACT_POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

fn scale(mantissa: i32, exponent: i32) -> f64 {
    let m = f64::from(mantissa);
    let k = exponent.unsigned_abs() as usize;
    let p = EXACT_POW10
        .get(k)
        .copied()
        .unwrap_or_else(|| 10f64.powi(k as i32));
    if exponent >= 0 {
        m * p
    } else {
        m / p
    }
}

/// SFLOAT: 4-bit signed exponent (base 10), 12-bit signed mantissa. The special values are
/// reserved mantissas, whatever the exponent.
pub fn sfloat(raw: u16) -> MedFloat {
    match raw & 0x0FFF {
        0x07FF => MedFloat::NaN,
        0x0800 => MedFloat::NRes,
        0x07FE => MedFloat::PositiveInfinity,
        0x0802 => MedFloat::NegativeInfinity,
        0x0801 => MedFloat::Reserved,
        m => {
            let mantissa = i32::from(((m << 4) as i16) >> 4);
            let exponent = i32::from((raw as i16) >> 12);
            MedFloat::Value(scale(mantissa, exponent))
        }
    }
}

/// FLOAT: 8-bit signed exponent, 24-bit signed mantissa.
pub fn float(raw: u32) -> MedFloat {
    match raw & 0x00FF_FFFF {
        0x007F_FFFF => MedFloat::NaN,
        0x0080_0000 => MedFloat::NRes,
        0x007F_FFFE => MedFloat::PositiveInfinity,
        0x0080_0002 => MedFloat::NegativeInfinity,
        0x0080_0001 => MedFloat::Reserved,
        m => {
            let mantissa = ((m << 8) as i32) >> 8;
            let exponent = (raw as i32) >> 24;
            MedFloat::Value(scale(mantissa, exponent))
        }
    }
}

/// A GATT Date Time (year u16, month, day, hours, minutes, seconds) in the device's clock, as
/// µs since the epoch once `utc_offset_us` is taken off. Year, month or day 0 means the device
/// does not know the date: `Ok(None)`, so the reading takes the receive time.
pub fn date_time(b: [u8; 7], utc_offset_us: i64) -> Result<Option<i64>, DecodeError> {
    let year = u16::from_le_bytes([b[0], b[1]]);
    let [month, day, hour, minute, second] = [b[2], b[3], b[4], b[5], b[6]];
    if year == 0 || month == 0 || day == 0 {
        return Ok(None);
    }
    let bad = || {
        DecodeError::new(
            Reason::BadTime,
            "the Date Time is not a valid date and time",
        )
    };
    if !(1582..=9999).contains(&year) {
        return Err(bad());
    }
    let date =
        chrono::NaiveDate::from_ymd_opt(year.into(), month.into(), day.into()).ok_or_else(bad)?;
    let time = date
        .and_hms_opt(hour.into(), minute.into(), second.into())
        .ok_or_else(bad)?;
    Ok(Some(time.and_utc().timestamp_micros() - utc_offset_us))
}

/// Reads the little-endian fields of a characteristic value in order.
pub struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Fields { buf, pos: 0 }
    }

    fn take<const N: usize>(&mut self, field: &str) -> Result<[u8; N], DecodeError> {
        match self.buf.get(self.pos..self.pos + N) {
            Some(b) => {
                self.pos += N;
                Ok(b.try_into().expect("slice of length N"))
            }
            None => Err(DecodeError::new(
                Reason::Truncated,
                format!(
                    "{field}: a {N}-byte field at offset {}, but the value is {} bytes",
                    self.pos,
                    self.buf.len()
                ),
            )),
        }
    }

    pub fn u8(&mut self, field: &str) -> Result<u8, DecodeError> {
        Ok(self.take::<1>(field)?[0])
    }

    pub fn u16(&mut self, field: &str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(field)?))
    }

    pub fn u24(&mut self, field: &str) -> Result<u32, DecodeError> {
        let [a, b, c] = self.take(field)?;
        Ok(u32::from_le_bytes([a, b, c, 0]))
    }

    pub fn sfloat(&mut self, field: &str) -> Result<MedFloat, DecodeError> {
        Ok(sfloat(self.u16(field)?))
    }

    pub fn float(&mut self, field: &str) -> Result<MedFloat, DecodeError> {
        Ok(float(u32::from_le_bytes(self.take(field)?)))
    }

    pub fn date_time(&mut self, utc_offset_us: i64) -> Result<Option<i64>, DecodeError> {
        date_time(self.take("time stamp")?, utc_offset_us)
    }

    /// Reads a field its flag says is present; `None` when it is not.
    pub fn when<T>(
        &mut self,
        present: bool,
        read: impl FnOnce(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, DecodeError> {
        present.then(|| read(self)).transpose()
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Bytes past the last field the flags announce: refused, because they mean the flags and
    /// the value disagree (a misread flag would shift every field after it).
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::new(
                Reason::Structure,
                format!(
                    "{n} bytes after the last field the flags announce (offset {})",
                    self.pos
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors() -> Value {
        serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/ble-gatt.json"
        )))
        .unwrap()
    }

    #[test]
    fn sfloat_vectors() {
        for v in vectors()["sfloat"].as_array().unwrap() {
            let raw = u16::from_str_radix(v["raw"].as_str().unwrap().trim_start_matches("0x"), 16)
                .unwrap();
            let got = sfloat(raw);
            match &v["value"] {
                Value::Number(n) => assert_eq!(got, MedFloat::Value(n.as_f64().unwrap()), "{v}"),
                Value::String(s) if s == "NaN" => assert_eq!(got, MedFloat::NaN),
                Value::String(s) if s == "+INF" => assert_eq!(got, MedFloat::PositiveInfinity),
                Value::String(s) if s == "-INF" => assert_eq!(got, MedFloat::NegativeInfinity),
                Value::String(s) if s.starts_with("NRes") => assert_eq!(got, MedFloat::NRes),
                other => panic!("unexpected vector {other}"),
            }
        }
        assert_eq!(sfloat(0x0801), MedFloat::Reserved);
        // Reserved mantissas stay special under any exponent.
        assert_eq!(sfloat(0xF7FF), MedFloat::NaN);
    }

    #[test]
    fn float_layout_and_special_values() {
        assert_eq!(float(0xFE00_0EB0), MedFloat::Value(37.6));
        assert_eq!(float(0x00FF_FFFF), MedFloat::Value(-1.0));
        assert_eq!(float(0x0200_0001), MedFloat::Value(100.0));
        assert_eq!(float(0x007F_FFFF), MedFloat::NaN);
        assert_eq!(float(0x0080_0000), MedFloat::NRes);
        assert_eq!(float(0x007F_FFFE), MedFloat::PositiveInfinity);
        assert_eq!(float(0x0080_0002), MedFloat::NegativeInfinity);
        assert_eq!(float(0x0080_0001), MedFloat::Reserved);
        assert!(matches!(float(0x8000_0001), MedFloat::Value(v) if v > 0.0 && v < 1e-120));
    }

    #[test]
    fn date_time_unknown_and_invalid() {
        let t = date_time([0xDC, 0x07, 12, 5, 11, 50, 27], 0).unwrap();
        assert_eq!(t, Some(1_354_708_227_000_000));
        let one_hour = 3_600_000_000;
        assert_eq!(
            date_time([0xDC, 0x07, 12, 5, 11, 50, 27], one_hour).unwrap(),
            Some(1_354_708_227_000_000 - one_hour)
        );
        assert_eq!(date_time([0, 0, 4, 17, 20, 41, 59], 0).unwrap(), None);
        assert_eq!(date_time([0xDC, 0x07, 0, 5, 11, 50, 27], 0).unwrap(), None);
        for bad in [
            [0xDC, 0x07, 13, 5, 11, 50, 27],
            [0xDC, 0x07, 2, 30, 11, 50, 27],
            [0xDC, 0x07, 12, 5, 24, 50, 27],
            [0xDC, 0x07, 12, 5, 11, 60, 27],
            [0x01, 0x00, 12, 5, 11, 50, 27],
        ] {
            assert_eq!(date_time(bad, 0).unwrap_err().reason, Reason::BadTime);
        }
    }

    #[test]
    fn fields_name_what_was_cut_off() {
        let mut f = Fields::new(&[1, 2, 3]);
        assert_eq!(f.u16("a").unwrap(), 0x0201);
        let e = f.u16("pulse rate").unwrap_err();
        assert_eq!(e.reason, Reason::Truncated);
        assert!(e.detail.starts_with("pulse rate"), "{e}");
        let f = Fields::new(&[1]);
        assert_eq!(f.finish().unwrap_err().reason, Reason::Structure);
    }
}
