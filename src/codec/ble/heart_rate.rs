//! Heart Rate Measurement (0x2A37, Heart Rate Service 1.0, section 3.1).

use super::ieee11073::Fields;
use super::{Context, MeasurementSink};
use crate::codec::DecodeError;
use crate::model::reading::{flags, Metric};

const HR_UINT16: u8 = 1 << 0;
/// Bits 1-2: 0b10 = contact supported but not detected; 0b11 = detected; 0b0x = not supported.
const CONTACT_SHIFT: u8 = 1;
const ENERGY_PRESENT: u8 = 1 << 3;
const RR_PRESENT: u8 = 1 << 4;

pub fn decode<'o>(
    bytes: &[u8],
    cx: &Context<'o>,
    out: &mut MeasurementSink<'o, '_>,
) -> Result<(), DecodeError> {
    let mut f = Fields::new(bytes);
    let bits = f.u8("flags")?;
    let hr = if bits & HR_UINT16 != 0 {
        f.u16("heart rate (uint16)")?
    } else {
        u16::from(f.u8("heart rate (uint8)")?)
    };
    let contact = if (bits >> CONTACT_SHIFT) & 0b11 == 0b10 {
        flags::NO_CONTACT
    } else {
        0
    };
    let energy = f.when(bits & ENERGY_PRESENT != 0, |f| f.u16("energy expended"))?;
    let ts = cx.gateway_ts;
    out.number(ts, Metric::HeartRate, f64::from(hr), "/min", contact)?;
    if let Some(kj) = energy {
        out.number(ts, Metric::EnergyExpended, f64::from(kj), "kJ", 0)?;
    }
    if bits & RR_PRESENT != 0 {
        if f.remaining() == 0 {
            f.u16("RR-interval")?;
        }
        // The RR-intervals fill the rest of the value, oldest first, in units of 1/1024 s.
        while f.remaining() > 0 {
            let rr = f.u16("RR-interval")?;
            out.number(ts, Metric::RrInterval, f64::from(rr) / 1024.0, "s", contact)?;
        }
    }
    f.finish()
}
