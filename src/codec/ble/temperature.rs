//! Temperature Measurement (0x2A1C, Health Thermometer Service 1.0, section 3.1).

use super::ieee11073::Fields;
use super::{Context, MeasurementSink};
use crate::codec::DecodeError;
use crate::model::reading::Metric;

const FAHRENHEIT: u8 = 1 << 0;
const TIME_PRESENT: u8 = 1 << 1;
const TYPE_PRESENT: u8 = 1 << 2;

/// Temperature Type (0x2A1D) values 1..=9; 0 and 10..=255 are reserved.
const SITES: [&str; 9] = [
    "armpit",
    "body",
    "ear",
    "finger",
    "gastrointestinal_tract",
    "mouth",
    "rectum",
    "toe",
    "tympanum",
];

pub fn site_name(code: u8) -> Option<&'static str> {
    SITES.get(usize::from(code).wrapping_sub(1)).copied()
}

pub fn decode<'o>(
    bytes: &[u8],
    cx: &Context<'o>,
    out: &mut MeasurementSink<'o, '_>,
) -> Result<(), DecodeError> {
    let mut f = Fields::new(bytes);
    let bits = f.u8("flags")?;
    let temp = f.float("temperature")?;
    let ts = f
        .when(bits & TIME_PRESENT != 0, |f| f.date_time(cx.utc_offset_us))?
        .flatten();
    let site = f.when(bits & TYPE_PRESENT != 0, |f| f.u8("temperature type"))?;
    f.finish()?;
    let ts = ts.or(cx.gateway_ts);
    let unit = if bits & FAHRENHEIT != 0 {
        "[degF]"
    } else {
        "Cel"
    };
    if out.measurement(ts, Metric::BodyTemp, temp, unit, 0)? {
        // The site only qualifies a temperature: without one it is not a reading.
        if let Some(name) = site.and_then(site_name) {
            out.text(ts, Metric::TempSite, name, 0)?;
        }
    }
    Ok(())
}
