//! Blood Pressure Measurement (0x2A35, Blood Pressure Service 1.0, section 3.1).

use super::ieee11073::Fields;
use super::{Context, MeasurementSink};
use crate::codec::DecodeError;
use crate::model::reading::{flags, Metric};

const KPA: u8 = 1 << 0;
const TIME_PRESENT: u8 = 1 << 1;
const PULSE_PRESENT: u8 = 1 << 2;
const USER_PRESENT: u8 = 1 << 3;
const STATUS_PRESENT: u8 = 1 << 4;

/// User ID 0xFF: the device does not know whose measurement it is.
pub const UNKNOWN_USER: u8 = 0xFF;

/// Measurement Status bits → quality flags for every reading of the measurement, and the extra
/// flags for the pulse rate (its bits 3-4 say whether the pulse was inside the device's range).
pub fn status_flags(status: u16) -> (u16, u16) {
    let mut all = 0;
    if status & (1 << 0) != 0 {
        all |= flags::QUESTIONABLE; // body movement during measurement
    }
    if status & (1 << 1) != 0 {
        all |= flags::QUESTIONABLE; // cuff fit too loose
    }
    if status & (1 << 2) != 0 {
        all |= flags::IRREGULAR_PULSE;
    }
    if status & (1 << 5) != 0 {
        all |= flags::QUESTIONABLE; // improper measurement position
    }
    let pulse = match (status >> 3) & 0b11 {
        0b01 | 0b10 => flags::OUT_OF_RANGE, // exceeds upper / below lower limit
        0b11 => flags::QUESTIONABLE,        // reserved
        _ => 0,
    };
    (all, pulse)
}

pub fn decode<'o>(
    bytes: &[u8],
    cx: &Context<'o>,
    out: &mut MeasurementSink<'o, '_>,
) -> Result<(), DecodeError> {
    let mut f = Fields::new(bytes);
    let bits = f.u8("flags")?;
    let systolic = f.sfloat("systolic")?;
    let diastolic = f.sfloat("diastolic")?;
    let mean = f.sfloat("mean arterial pressure")?;
    let ts = f
        .when(bits & TIME_PRESENT != 0, |f| f.date_time(cx.utc_offset_us))?
        .flatten();
    let pulse = f.when(bits & PULSE_PRESENT != 0, |f| f.sfloat("pulse rate"))?;
    let user = f.when(bits & USER_PRESENT != 0, |f| f.u8("user id"))?;
    let (all, pulse_flags) = f
        .when(bits & STATUS_PRESENT != 0, |f| f.u16("measurement status"))?
        .map_or((0, 0), status_flags);
    f.finish()?;
    let ts = ts.or(cx.gateway_ts);
    out.subject = user.and_then(|u| cx.user_subject(u));
    let unit = if bits & KPA != 0 { "kPa" } else { "mm[Hg]" };
    out.measurement(ts, Metric::BpSystolic, systolic, unit, all)?;
    out.measurement(ts, Metric::BpDiastolic, diastolic, unit, all)?;
    out.measurement(ts, Metric::BpMean, mean, unit, all)?;
    if let Some(p) = pulse {
        out.measurement(ts, Metric::PulseRate, p, "/min", all | pulse_flags)?;
    }
    Ok(())
}
