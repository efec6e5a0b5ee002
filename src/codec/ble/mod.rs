//! `ble-2a37`, `ble-2a1c`, `ble-2a35`, `ble-2a5e`, `ble-2a5f` and `ble-gatt`: the values of the
//! Bluetooth health characteristics (heart rate, thermometer, blood pressure, pulse oximeter) as
//! a gateway relays them, decoded exactly per the GATT specifications.
//!
//! ```toml
//! [[route]]
//! topic = "gw/+/ble/+/+"
//! codec = "ble-gatt"               # or a fixed ble-2a37 … ble-2a5f
//! [route.ble]
//! characteristic = "{5}"           # ble-gatt: the topic level holding the UUID (2a37, 0x2A37, …);
//!                                  # default: the last level
//! payload = "raw"                  # raw | hex | base64 | json
//! utc_offset = "+01:00"            # the device clock's offset (GATT Date Time has no zone)
//! [route.ble.users]                # Blood Pressure user ids → subjects
//! 1 = "patient-17"
//! [route.ble.json]                 # payload = "json": where the gateway put things
//! data = "/value"                  # the value bytes, as a string …
//! encoding = "base64"              # … in base64 or hex
//! ts = "/ts"                       # optional: the gateway's time of receipt
//! source = "/mac"                  # optional: the device id
//! characteristic = "/uuid"         # optional (ble-gatt): the characteristic
//! ```
//!
//! IEEE 11073 special values never become numbers: ±INF is stored with a null value and the
//! `beyond_range` flag, NaN/NRes/reserved leave that reading out, and a value with no usable
//! measurement at all is refused. A Date Time with year, month or day 0 means the device does
//! not know the date, so the reading takes the gateway's or the edge's receive time.

pub mod blood_pressure;
pub mod heart_rate;
pub mod ieee11073;
pub mod pulse_oximetry;
pub mod temperature;

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use self::ieee11073::MedFloat;
use super::encoding::{base64_to_bytes, hex_to_bytes};
use super::time::{json_time, parse_utc_offset, TsFormat};
use super::{Codec, DecodeError, Decoded, Message, RawValue, ReadingSink, Reason};
use crate::model::reading::Metric;
use crate::topic::Template;

/// The longest attribute value ATT allows (Core 5.x, Vol 3, Part F, 3.2.9).
pub const MAX_ATTRIBUTE: usize = 512;

/// The characteristics this codec decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Characteristic {
    /// 0x2A37 Heart Rate Measurement
    HeartRate,
    /// 0x2A1C Temperature Measurement
    Temperature,
    /// 0x2A35 Blood Pressure Measurement
    BloodPressure,
    /// 0x2A5E PLX Spot-check Measurement
    PlxSpotCheck,
    /// 0x2A5F PLX Continuous Measurement
    PlxContinuous,
}

impl Characteristic {
    pub const ALL: [Characteristic; 5] = [
        Characteristic::HeartRate,
        Characteristic::Temperature,
        Characteristic::BloodPressure,
        Characteristic::PlxSpotCheck,
        Characteristic::PlxContinuous,
    ];

    pub fn uuid16(self) -> &'static str {
        match self {
            Characteristic::HeartRate => "2a37",
            Characteristic::Temperature => "2a1c",
            Characteristic::BloodPressure => "2a35",
            Characteristic::PlxSpotCheck => "2a5e",
            Characteristic::PlxContinuous => "2a5f",
        }
    }

    pub fn codec_name(self) -> &'static str {
        match self {
            Characteristic::HeartRate => "ble-2a37",
            Characteristic::Temperature => "ble-2a1c",
            Characteristic::BloodPressure => "ble-2a35",
            Characteristic::PlxSpotCheck => "ble-2a5e",
            Characteristic::PlxContinuous => "ble-2a5f",
        }
    }

    /// `2a37`, `0x2A37`, or the full 128-bit form on the Bluetooth base UUID.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let short = if s.len() == 36 {
            let lower = s.to_ascii_lowercase();
            if !(lower.starts_with("0000") && lower.ends_with("-0000-1000-8000-00805f9b34fb")) {
                return None;
            }
            s.get(4..8)?
        } else {
            s.strip_prefix("0x")
                .or_else(|| s.strip_prefix("0X"))
                .unwrap_or(s)
        };
        Characteristic::ALL
            .into_iter()
            .find(|c| c.uuid16().eq_ignore_ascii_case(short))
    }

    fn decode<'o>(
        self,
        bytes: &[u8],
        cx: &Context<'o>,
        out: &mut MeasurementSink<'o, '_>,
    ) -> Result<(), DecodeError> {
        match self {
            Characteristic::HeartRate => heart_rate::decode(bytes, cx, out),
            Characteristic::Temperature => temperature::decode(bytes, cx, out),
            Characteristic::BloodPressure => blood_pressure::decode(bytes, cx, out),
            Characteristic::PlxSpotCheck => pulse_oximetry::decode_spot_check(bytes, cx, out),
            Characteristic::PlxContinuous => pulse_oximetry::decode_continuous(bytes, cx, out),
        }
    }
}

/// How the gateway put the value bytes into the MQTT payload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relay {
    #[default]
    Raw,
    Hex,
    Base64,
    Json,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextEncoding {
    #[default]
    Base64,
    Hex,
}

/// `[route.ble.json]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BleJsonOptions {
    pub data: String,
    #[serde(default)]
    pub encoding: TextEncoding,
    #[serde(default)]
    pub ts: Option<String>,
    #[serde(default)]
    pub ts_format: TsFormat,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub characteristic: Option<String>,
}

/// `[route.ble]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BleOptions {
    #[serde(default)]
    pub payload: Relay,
    #[serde(default)]
    pub characteristic: Option<String>,
    #[serde(default)]
    pub utc_offset: Option<String>,
    #[serde(default)]
    pub users: BTreeMap<String, String>,
    #[serde(default)]
    pub json: Option<BleJsonOptions>,
}

impl BleOptions {
    /// `fixed` is the characteristic a `ble-2aXX` codec name gives; `None` for `ble-gatt`.
    pub fn build(&self, fixed: Option<Characteristic>) -> Result<BleCodec, String> {
        let pointer = |p: &str, key: &str| -> Result<(), String> {
            if p.starts_with('/') {
                Ok(())
            } else {
                Err(format!(
                    "[route.ble.json] `{key}` = `{p}` is not a JSON pointer"
                ))
            }
        };
        let json = match (self.payload, &self.json) {
            (Relay::Json, Some(j)) => {
                pointer(&j.data, "data")?;
                for (k, p) in [
                    ("ts", &j.ts),
                    ("source", &j.source),
                    ("characteristic", &j.characteristic),
                ] {
                    if let Some(p) = p {
                        pointer(p, k)?;
                    }
                }
                Some(j.clone())
            }
            (Relay::Json, None) => {
                return Err("payload = \"json\" needs [route.ble.json] with `data`".into())
            }
            (_, Some(_)) => {
                return Err("[route.ble.json] is only read with payload = \"json\"".into())
            }
            (_, None) => None,
        };
        let template = self
            .characteristic
            .as_deref()
            .map(Template::parse)
            .transpose()?;
        let from_json = json.as_ref().is_some_and(|j| j.characteristic.is_some());
        if let (Some(c), true) = (fixed, template.is_some() || from_json) {
            return Err(format!(
                "codec `{}` fixes the characteristic; use `ble-gatt` to take it from the message",
                c.codec_name()
            ));
        }
        let mut users = Vec::new();
        for (id, subject) in &self.users {
            let id: u8 = id
                .parse()
                .ok()
                .filter(|u| *u != blood_pressure::UNKNOWN_USER)
                .ok_or_else(|| format!("[route.ble.users] `{id}` is not a user id (0 to 254)"))?;
            users.push((id, subject.clone()));
        }
        Ok(BleCodec {
            fixed,
            template,
            relay: self.payload,
            json,
            utc_offset_us: self
                .utc_offset
                .as_deref()
                .map(parse_utc_offset)
                .transpose()?
                .unwrap_or(0),
            users,
        })
    }
}

#[derive(Debug)]
pub struct BleCodec {
    fixed: Option<Characteristic>,
    template: Option<Template>,
    relay: Relay,
    json: Option<BleJsonOptions>,
    utc_offset_us: i64,
    users: Vec<(u8, String)>,
}

/// What the characteristic decoders need besides the value bytes.
pub struct Context<'c> {
    /// The gateway's receive time, for readings whose value carries no time stamp.
    pub gateway_ts: Option<i64>,
    pub utc_offset_us: i64,
    users: &'c [(u8, String)],
}

impl<'c> Context<'c> {
    pub fn user_subject(&self, user: u8) -> Option<&'c str> {
        self.users
            .iter()
            .find(|(u, _)| *u == user)
            .map(|(_, s)| s.as_str())
    }
}

/// Pushes the measurements of one characteristic value, turning IEEE 11073 special values into
/// flags or leaving them out, and counting what was stored.
pub struct MeasurementSink<'o, 'b> {
    out: &'o mut ReadingSink<'b>,
    pub subject: Option<&'o str>,
    pub source: Option<&'o str>,
    stored: usize,
    without_value: usize,
}

impl<'o, 'b> MeasurementSink<'o, 'b> {
    fn push(
        &mut self,
        ts: Option<i64>,
        metric: Metric,
        value: RawValue<'_>,
        flags: u16,
    ) -> Result<(), DecodeError> {
        self.out.push(Decoded {
            ts,
            metric,
            value,
            flags,
            source: self.source,
            subject: self.subject,
        })?;
        self.stored += 1;
        Ok(())
    }

    pub fn number(
        &mut self,
        ts: Option<i64>,
        metric: Metric,
        value: f64,
        unit: &str,
        flags: u16,
    ) -> Result<(), DecodeError> {
        self.push(ts, metric, RawValue::Number(value, unit), flags)
    }

    pub fn text(
        &mut self,
        ts: Option<i64>,
        metric: Metric,
        text: &str,
        flags: u16,
    ) -> Result<(), DecodeError> {
        self.push(ts, metric, RawValue::Text(text), flags)
    }

    /// Stores an SFLOAT/FLOAT measurement; `Ok(false)` if it had no value to store.
    pub fn measurement(
        &mut self,
        ts: Option<i64>,
        metric: Metric,
        value: MedFloat,
        unit: &str,
        flags: u16,
    ) -> Result<bool, DecodeError> {
        match value {
            MedFloat::Value(v) => self.number(ts, metric, v, unit, flags)?,
            MedFloat::PositiveInfinity | MedFloat::NegativeInfinity => {
                self.push(ts, metric, RawValue::BeyondRange, flags)?
            }
            MedFloat::NaN | MedFloat::NRes | MedFloat::Reserved => {
                self.without_value += 1;
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl BleCodec {
    fn characteristic_from(
        &self,
        topic: &str,
        named: Option<&str>,
    ) -> Result<Characteristic, DecodeError> {
        if let Some(c) = self.fixed {
            return Ok(c);
        }
        let name = match (named, &self.template) {
            (Some(n), _) => n.to_owned(),
            (None, Some(t)) => t.render(topic).ok_or_else(|| {
                DecodeError::new(
                    Reason::Structure,
                    "the topic lacks the level naming the characteristic",
                )
            })?,
            // By default the last topic level names it: `…/ble/2a37`.
            (None, None) => topic.rsplit('/').next().unwrap_or_default().to_owned(),
        };
        Characteristic::parse(&name).ok_or_else(|| {
            DecodeError::new(
                Reason::UnknownName,
                format!("characteristic `{name}` is not one this codec decodes (2a37, 2a1c, 2a35, 2a5e, 2a5f)"),
            )
        })
    }

    fn decode_value(
        &self,
        characteristic: Characteristic,
        bytes: &[u8],
        cx: &Context<'_>,
        source: Option<&str>,
        out: &mut ReadingSink<'_>,
    ) -> Result<(), DecodeError> {
        if bytes.len() > MAX_ATTRIBUTE {
            return Err(DecodeError::new(
                Reason::Structure,
                "longer than a GATT attribute value (512 bytes)",
            ));
        }
        let mut m = MeasurementSink {
            out,
            subject: None,
            source,
            stored: 0,
            without_value: 0,
        };
        characteristic.decode(bytes, cx, &mut m)?;
        if m.stored == 0 {
            return Err(DecodeError::new(
                Reason::BadValue,
                format!(
                    "no usable value: {} measurement(s) are NaN, NRes or reserved",
                    m.without_value
                ),
            ));
        }
        Ok(())
    }
}

impl Codec for BleCodec {
    fn name(&self) -> &'static str {
        self.fixed.map_or("ble-gatt", Characteristic::codec_name)
    }

    fn decode(&self, msg: &Message<'_>, out: &mut ReadingSink<'_>) -> Result<(), DecodeError> {
        let mut cx = Context {
            gateway_ts: None,
            utc_offset_us: self.utc_offset_us,
            users: &self.users,
        };
        let mut buf = [0u8; MAX_ATTRIBUTE];
        let bytes = match self.relay {
            Relay::Raw => msg.payload,
            Relay::Hex => hex_to_bytes(msg.payload, &mut buf)?,
            Relay::Base64 => base64_to_bytes(msg.payload, &mut buf)?,
            Relay::Json => {
                let j = self.json.as_ref().expect("checked when built");
                let doc: Value =
                    serde_json::from_slice(msg.payload).map_err(|e| super::json_error(&e))?;
                let string_at = |p: &str| -> Result<Option<&str>, DecodeError> {
                    match doc.pointer(p) {
                        None | Some(Value::Null) => Ok(None),
                        Some(Value::String(s)) => Ok(Some(s)),
                        Some(_) => Err(DecodeError::new(
                            Reason::BadType,
                            format!("{p}: expected a string"),
                        )),
                    }
                };
                let text = string_at(&j.data)?.ok_or_else(|| {
                    DecodeError::new(Reason::MissingField, format!("{}: missing", j.data))
                })?;
                let bytes = match j.encoding {
                    TextEncoding::Base64 => base64_to_bytes(text.as_bytes(), &mut buf)?,
                    TextEncoding::Hex => hex_to_bytes(text.as_bytes(), &mut buf)?,
                };
                if let Some(p) = &j.ts {
                    cx.gateway_ts = match doc.pointer(p) {
                        None | Some(Value::Null) => None,
                        Some(v) => Some(json_time(v, j.ts_format, p)?),
                    };
                }
                let source = j.source.as_deref().map(string_at).transpose()?.flatten();
                let named = j
                    .characteristic
                    .as_deref()
                    .map(string_at)
                    .transpose()?
                    .flatten();
                let c = self.characteristic_from(msg.topic, named)?;
                return self.decode_value(c, bytes, &cx, source, out);
            }
        };
        let c = self.characteristic_from(msg.topic, None)?;
        self.decode_value(c, bytes, &cx, None, out)
    }
}

#[cfg(test)]
mod tests;
