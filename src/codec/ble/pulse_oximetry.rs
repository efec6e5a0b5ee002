//! PLX Spot-check Measurement (0x2A5E) and PLX Continuous Measurement (0x2A5F), Pulse Oximeter
//! Service 1.0, sections 3.1 and 3.2.

use super::ieee11073::{Fields, MedFloat};
use super::{Context, MeasurementSink};
use crate::codec::DecodeError;
use crate::model::reading::{flags, Metric};

/// Measurement Status (16 bit) → quality flags.
pub fn measurement_status_flags(status: u16) -> u16 {
    const MAP: &[(u16, u16)] = &[
        (1 << 6, flags::CALIBRATING),   // early estimated data
        (1 << 9, flags::FROM_STORAGE),  // data from measurement storage
        (1 << 10, flags::TEST_DATA),    // data for demonstration
        (1 << 11, flags::TEST_DATA),    // data for testing
        (1 << 12, flags::CALIBRATING),  // calibration ongoing
        (1 << 13, flags::INVALID),      // measurement unavailable
        (1 << 14, flags::QUESTIONABLE), // questionable measurement detected
        (1 << 15, flags::INVALID),      // invalid measurement detected
    ];
    MAP.iter()
        .filter(|(bit, _)| status & bit != 0)
        .fold(0, |acc, (_, f)| acc | f)
}

/// Device and Sensor Status (24 bit) → quality flags.
pub fn device_status_flags(status: u32) -> u16 {
    const MAP: &[(u32, u16)] = &[
        (1 << 1, flags::INVALID),       // equipment malfunction detected
        (1 << 2, flags::QUESTIONABLE),  // signal processing irregularity
        (1 << 3, flags::QUESTIONABLE),  // inadequate signal
        (1 << 4, flags::QUESTIONABLE),  // poor signal
        (1 << 5, flags::QUESTIONABLE),  // low perfusion
        (1 << 6, flags::QUESTIONABLE),  // erratic signal
        (1 << 7, flags::QUESTIONABLE),  // non-pulsatile signal
        (1 << 8, flags::QUESTIONABLE),  // questionable pulse
        (1 << 9, flags::CALIBRATING),   // signal analysis ongoing
        (1 << 10, flags::QUESTIONABLE), // sensor interference
        (1 << 11, flags::NO_CONTACT),   // sensor unconnected to user
        (1 << 12, flags::QUESTIONABLE), // unknown sensor connected
        (1 << 13, flags::NO_CONTACT),   // sensor displaced
        (1 << 14, flags::INVALID),      // sensor malfunctioning
        (1 << 15, flags::NO_CONTACT),   // sensor disconnected
    ];
    MAP.iter()
        .filter(|(bit, _)| status & bit != 0)
        .fold(0, |acc, (_, f)| acc | f)
}

fn statuses(
    f: &mut Fields<'_>,
    bits: u8,
    status_bit: u8,
    device_bit: u8,
) -> Result<u16, DecodeError> {
    let measurement = f.when(bits & status_bit != 0, |f| f.u16("measurement status"))?;
    let device = f.when(bits & device_bit != 0, |f| {
        f.u24("device and sensor status")
    })?;
    Ok(measurement.map_or(0, measurement_status_flags) | device.map_or(0, device_status_flags))
}

/// The pulse amplitude index, in %, and the quality flags of the readings around it.
fn push_common(
    out: &mut MeasurementSink<'_, '_>,
    ts: Option<i64>,
    pair: (MedFloat, MedFloat),
    pai: Option<MedFloat>,
    q: u16,
) -> Result<(), DecodeError> {
    out.measurement(ts, Metric::Spo2, pair.0, "%", q)?;
    out.measurement(ts, Metric::PulseRate, pair.1, "/min", q)?;
    if let Some(p) = pai {
        out.measurement(ts, Metric::PerfusionIndex, p, "%", q)?;
    }
    Ok(())
}

pub fn decode_spot_check<'o>(
    bytes: &[u8],
    cx: &Context<'o>,
    out: &mut MeasurementSink<'o, '_>,
) -> Result<(), DecodeError> {
    const TIME_PRESENT: u8 = 1 << 0;
    const STATUS_PRESENT: u8 = 1 << 1;
    const DEVICE_STATUS_PRESENT: u8 = 1 << 2;
    const PAI_PRESENT: u8 = 1 << 3;
    const CLOCK_NOT_SET: u8 = 1 << 4;
    let mut f = Fields::new(bytes);
    let bits = f.u8("flags")?;
    let pair = (f.sfloat("SpO2")?, f.sfloat("pulse rate")?);
    let mut ts = f
        .when(bits & TIME_PRESENT != 0, |f| f.date_time(cx.utc_offset_us))?
        .flatten();
    if bits & CLOCK_NOT_SET != 0 {
        // The device says its own clock is wrong: its time stamp is not a time.
        ts = None;
    }
    let q = statuses(&mut f, bits, STATUS_PRESENT, DEVICE_STATUS_PRESENT)?;
    let pai = f.when(bits & PAI_PRESENT != 0, |f| {
        f.sfloat("pulse amplitude index")
    })?;
    f.finish()?;
    push_common(out, ts.or(cx.gateway_ts), pair, pai, q)
}

pub fn decode_continuous<'o>(
    bytes: &[u8],
    cx: &Context<'o>,
    out: &mut MeasurementSink<'o, '_>,
) -> Result<(), DecodeError> {
    const FAST_PRESENT: u8 = 1 << 0;
    const SLOW_PRESENT: u8 = 1 << 1;
    const STATUS_PRESENT: u8 = 1 << 2;
    const DEVICE_STATUS_PRESENT: u8 = 1 << 3;
    const PAI_PRESENT: u8 = 1 << 4;
    let mut f = Fields::new(bytes);
    let bits = f.u8("flags")?;
    let normal = (f.sfloat("SpO2")?, f.sfloat("pulse rate")?);
    let fast = f.when(bits & FAST_PRESENT != 0, |f| {
        Ok((f.sfloat("SpO2 fast")?, f.sfloat("pulse rate fast")?))
    })?;
    let slow = f.when(bits & SLOW_PRESENT != 0, |f| {
        Ok((f.sfloat("SpO2 slow")?, f.sfloat("pulse rate slow")?))
    })?;
    let q = statuses(&mut f, bits, STATUS_PRESENT, DEVICE_STATUS_PRESENT)?;
    let pai = f.when(bits & PAI_PRESENT != 0, |f| {
        f.sfloat("pulse amplitude index")
    })?;
    f.finish()?;
    let ts = cx.gateway_ts;
    push_common(out, ts, normal, pai, q)?;
    if let Some((spo2, pr)) = fast {
        out.measurement(ts, Metric::Spo2Fast, spo2, "%", q)?;
        out.measurement(ts, Metric::PulseRateFast, pr, "/min", q)?;
    }
    if let Some((spo2, pr)) = slow {
        out.measurement(ts, Metric::Spo2Slow, spo2, "%", q)?;
        out.measurement(ts, Metric::PulseRateSlow, pr, "/min", q)?;
    }
    Ok(())
}
