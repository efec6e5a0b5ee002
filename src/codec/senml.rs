//! `senml-json` and `senml-cbor`: SenML packs (RFC 8428), resolved per section 4: base fields persist until
//! another record sets them again; name = bn + n, value = bv + v, sum = bs + s, time = bt + t,
//! unit = u else bu; a resolved time below 2^28 is relative to the receive time; bver defaults to
//! 10 and a newer version is refused; an unknown label ending in `_` refuses the pack.
//!
//! ```toml
//! [route.senml]
//! unknown_names = "reject"           # or "ignore": records whose name maps to no metric
//! [route.senml.names]                # resolved name, or a suffix of it → catalogue metric
//! ":temp" = "body_temp"
//! "urn:dev:mac:0024befffe804ff1:hr" = "heart_rate"
//! ```
//! Without a mapping, a name whose last `:`/`/`-separated part is a catalogue metric name maps
//! to it (`urn:dev:ow:10e2:spo2` → spo2).
//!
//! JSON records are read with a hand-written serde visitor, not into `serde_json::Value`: it sees
//! each label once, borrows strings from the payload and rejects `_` labels on the way. CBOR
//! records (section 6: integer labels, bver -1 … vd 8) are read with minicbor's zero-copy
//! decoder into the same [`Record`], so both formats share one resolution.
//!
//! String values (`vs`) go to the `text` column of text metrics; booleans as `true`/`false` and
//! data values (`vd`) as base64url, the JSON form RFC 8428 gives them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::{Codec, DecodeError, Decoded, Message, RawValue, ReadingSink, Reason, UnknownNames};
use crate::model::reading::{flags, Metric};
use crate::model::units;

/// The SenML version this codec understands (RFC 8428).
pub const SENML_VERSION: i64 = 10;
/// Resolved times below this are relative to the receive time (RFC 8428 4.5.3).
const RELATIVE_TIME_LIMIT: f64 = 268_435_456.0;

/// `[route.senml]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SenmlOptions {
    #[serde(default)]
    pub names: BTreeMap<String, Metric>,
    #[serde(default)]
    pub unknown_names: UnknownNames,
}

impl SenmlOptions {
    pub fn build_json(self) -> Result<SenmlCodec, String> {
        self.build(Format::Json)
    }

    pub fn build_cbor(self) -> Result<SenmlCodec, String> {
        self.build(Format::Cbor)
    }

    fn build(self, format: Format) -> Result<SenmlCodec, String> {
        if self.names.keys().any(|k| k.is_empty()) {
            return Err("[route.senml.names] has an empty name".into());
        }
        // Longest first, so the most specific suffix wins.
        let mut names: Vec<(String, Metric)> = self.names.into_iter().collect();
        names.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        Ok(SenmlCodec {
            format,
            names,
            unknown: self.unknown_names,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Cbor,
}

#[derive(Debug)]
pub struct SenmlCodec {
    format: Format,
    names: Vec<(String, Metric)>,
    unknown: UnknownNames,
}

/// The value fields of one record.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Record<'a> {
    pub bn: Option<Cow<'a, str>>,
    pub bt: Option<f64>,
    pub bu: Option<Cow<'a, str>>,
    pub bv: Option<f64>,
    pub bs: Option<f64>,
    pub bver: Option<i64>,
    pub n: Option<Cow<'a, str>>,
    pub u: Option<Cow<'a, str>>,
    pub v: Option<f64>,
    pub vs: Option<Cow<'a, str>>,
    pub vb: Option<bool>,
    pub vd: Option<Cow<'a, str>>,
    pub s: Option<f64>,
    pub t: Option<f64>,
    pub ut: Option<f64>,
}

/// A resolved value (RFC 8428 4.6).
#[derive(Debug, Clone, PartialEq)]
pub enum ResolvedValue {
    Number(f64),
    Text(String),
    Bool(bool),
    Data(String),
    /// Only a sum.
    Sum(f64),
}

/// A record after base-field resolution.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub name: String,
    pub unit: String,
    /// Seconds since the epoch (relative times already added to the receive time).
    pub time: f64,
    /// The time was relative (RFC 8428 4.5.3), so it is anchored on the receive time.
    pub relative: bool,
    pub value: ResolvedValue,
}

struct Cowed<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Cowed<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Cowed<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cowed(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cowed(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Cowed(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Record<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Record<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a SenML record (a JSON object)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Record<'de>, A::Error> {
                let mut r = Record::default();
                fn set<T, E: de::Error>(slot: &mut Option<T>, v: T, label: &str) -> Result<(), E> {
                    set_once(slot, v, label).map_err(E::custom)
                }
                while let Some(Cowed(label)) = map.next_key::<Cowed>()? {
                    match &*label {
                        "bn" => set(&mut r.bn, map.next_value::<Cowed>()?.0, "bn")?,
                        "bt" => set(&mut r.bt, map.next_value()?, "bt")?,
                        "bu" => set(&mut r.bu, map.next_value::<Cowed>()?.0, "bu")?,
                        "bv" => set(&mut r.bv, map.next_value()?, "bv")?,
                        "bs" => set(&mut r.bs, map.next_value()?, "bs")?,
                        "bver" => set(&mut r.bver, map.next_value()?, "bver")?,
                        "n" => set(&mut r.n, map.next_value::<Cowed>()?.0, "n")?,
                        "u" => set(&mut r.u, map.next_value::<Cowed>()?.0, "u")?,
                        "v" => set(&mut r.v, map.next_value()?, "v")?,
                        "vs" => set(&mut r.vs, map.next_value::<Cowed>()?.0, "vs")?,
                        "vb" => set(&mut r.vb, map.next_value()?, "vb")?,
                        "vd" => set(&mut r.vd, map.next_value::<Cowed>()?.0, "vd")?,
                        "s" => set(&mut r.s, map.next_value()?, "s")?,
                        "t" => set(&mut r.t, map.next_value()?, "t")?,
                        "ut" => set(&mut r.ut, map.next_value()?, "ut")?,
                        l if l.ends_with('_') => return Err(de::Error::custom(must_understand(l))),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(r)
            }
        }
        d.deserialize_map(V)
    }
}

fn set_once<T>(slot: &mut Option<T>, v: T, label: &str) -> Result<(), String> {
    if slot.replace(v).is_some() {
        return Err(format!("label `{label}` appears twice"));
    }
    Ok(())
}

fn must_understand(label: &str) -> String {
    format!("label `{label}` must be understood (it ends in _) and is not")
}

/// Parses a SenML JSON pack: a JSON array of records.
pub fn parse_pack(payload: &[u8]) -> Result<Vec<Record<'_>>, DecodeError> {
    struct Pack<'a>(Vec<Record<'a>>);
    impl<'de> Deserialize<'de> for Pack<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Pack<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a SenML pack (a JSON array of records)")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Pack<'de>, A::Error> {
                    let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(4));
                    while let Some(r) = seq.next_element()? {
                        v.push(r);
                    }
                    Ok(Pack(v))
                }
            }
            d.deserialize_seq(V)
        }
    }
    let pack: Pack = serde_json::from_slice(payload).map_err(|e| super::json_error(&e))?;
    if pack.0.is_empty() {
        return Err(DecodeError::new(Reason::Empty, "the pack has no records"));
    }
    Ok(pack.0)
}

/// Describes a minicbor error by position and kind, without the payload's values.
fn cbor_error(e: &minicbor::decode::Error) -> DecodeError {
    let at = e
        .position()
        .map(|p| format!("at byte {p}: "))
        .unwrap_or_default();
    if e.is_end_of_input() {
        DecodeError::new(Reason::Truncated, format!("{at}unexpected end of input"))
    } else if e.is_type_mismatch() {
        DecodeError::new(Reason::Structure, format!("{at}unexpected CBOR type"))
    } else {
        DecodeError::new(Reason::Syntax, format!("{at}invalid CBOR"))
    }
}

fn cbor_number(d: &mut minicbor::Decoder<'_>) -> Result<f64, DecodeError> {
    use minicbor::data::Type;
    let at = d.position();
    let v = match d.datatype().map_err(|e| cbor_error(&e))? {
        Type::U8 | Type::U16 | Type::U32 | Type::U64 => d.u64().map(|x| x as f64),
        Type::I8 | Type::I16 | Type::I32 | Type::I64 => d.i64().map(|x| x as f64),
        Type::F16 | Type::F32 | Type::F64 => d.f64(),
        _ => {
            return Err(DecodeError::new(
                Reason::Structure,
                format!("at byte {at}: expected a number"),
            ))
        }
    };
    v.map_err(|e| cbor_error(&e))
}

fn cbor_text<'b>(d: &mut minicbor::Decoder<'b>) -> Result<Cow<'b, str>, DecodeError> {
    use minicbor::data::Type;
    let at = d.position();
    match d.datatype().map_err(|e| cbor_error(&e))? {
        Type::String => d.str().map(Cow::Borrowed).map_err(|e| cbor_error(&e)),
        Type::StringIndef => {
            let mut s = String::new();
            for part in d.str_iter().map_err(|e| cbor_error(&e))? {
                s.push_str(part.map_err(|e| cbor_error(&e))?);
            }
            Ok(Cow::Owned(s))
        }
        _ => Err(DecodeError::new(
            Reason::Structure,
            format!("at byte {at}: expected a text string"),
        )),
    }
}

fn cbor_bytes(d: &mut minicbor::Decoder<'_>) -> Result<Vec<u8>, DecodeError> {
    use minicbor::data::Type;
    let at = d.position();
    match d.datatype().map_err(|e| cbor_error(&e))? {
        Type::Bytes => d.bytes().map(<[u8]>::to_vec).map_err(|e| cbor_error(&e)),
        Type::BytesIndef => {
            let mut v = Vec::new();
            for part in d.bytes_iter().map_err(|e| cbor_error(&e))? {
                v.extend_from_slice(part.map_err(|e| cbor_error(&e))?);
            }
            Ok(v)
        }
        _ => Err(DecodeError::new(
            Reason::Structure,
            format!("at byte {at}: expected a byte string"),
        )),
    }
}

/// Length of a CBOR array or map: `None` for indefinite length (ends at a break).
fn cbor_remaining(
    d: &mut minicbor::Decoder<'_>,
    left: &mut Option<u64>,
) -> Result<bool, DecodeError> {
    use minicbor::data::Type;
    match left {
        Some(0) => Ok(false),
        Some(n) => {
            *n -= 1;
            Ok(true)
        }
        None => {
            if d.datatype().map_err(|e| cbor_error(&e))? == Type::Break {
                d.skip().map_err(|e| cbor_error(&e))?;
                Ok(false)
            } else {
                Ok(true)
            }
        }
    }
}

fn cbor_record<'b>(d: &mut minicbor::Decoder<'b>, i: usize) -> Result<Record<'b>, DecodeError> {
    use minicbor::data::Type;
    let at = d.position();
    let mut left = match d.datatype().map_err(|e| cbor_error(&e))? {
        Type::Map | Type::MapIndef => d.map().map_err(|e| cbor_error(&e))?,
        _ => {
            return Err(DecodeError::new(
                Reason::Structure,
                format!("record {i} (byte {at}): expected a CBOR map"),
            ))
        }
    };
    let mut r = Record::default();
    let dup = |m: String| DecodeError::new(Reason::Structure, format!("record {i}: {m}"));
    while cbor_remaining(d, &mut left)? {
        let at = d.position();
        let label = match d.datatype().map_err(|e| cbor_error(&e))? {
            Type::U8
            | Type::U16
            | Type::U32
            | Type::U64
            | Type::I8
            | Type::I16
            | Type::I32
            | Type::I64 => d.i64().map_err(|e| cbor_error(&e))?,
            Type::String | Type::StringIndef => {
                let l = cbor_text(d)?;
                if l.ends_with('_') {
                    return Err(dup(must_understand(&l)));
                }
                // Extension labels are text in CBOR too; one not ending in _ is ignored.
                d.skip().map_err(|e| cbor_error(&e))?;
                continue;
            }
            _ => {
                return Err(DecodeError::new(
                    Reason::Structure,
                    format!("record {i} (byte {at}): a label must be an integer or text"),
                ))
            }
        };
        // RFC 8428 Table 4.
        match label {
            -1 => {
                let v = cbor_number(d)?;
                if v.fract() != 0.0 {
                    return Err(dup("bver is not an integer".into()));
                }
                set_once(&mut r.bver, v as i64, "bver").map_err(dup)?
            }
            -2 => set_once(&mut r.bn, cbor_text(d)?, "bn").map_err(dup)?,
            -3 => set_once(&mut r.bt, cbor_number(d)?, "bt").map_err(dup)?,
            -4 => set_once(&mut r.bu, cbor_text(d)?, "bu").map_err(dup)?,
            -5 => set_once(&mut r.bv, cbor_number(d)?, "bv").map_err(dup)?,
            -6 => set_once(&mut r.bs, cbor_number(d)?, "bs").map_err(dup)?,
            0 => set_once(&mut r.n, cbor_text(d)?, "n").map_err(dup)?,
            1 => set_once(&mut r.u, cbor_text(d)?, "u").map_err(dup)?,
            2 => set_once(&mut r.v, cbor_number(d)?, "v").map_err(dup)?,
            3 => set_once(&mut r.vs, cbor_text(d)?, "vs").map_err(dup)?,
            4 => {
                let b = d.bool().map_err(|e| cbor_error(&e))?;
                set_once(&mut r.vb, b, "vb").map_err(dup)?
            }
            5 => set_once(&mut r.s, cbor_number(d)?, "s").map_err(dup)?,
            6 => set_once(&mut r.t, cbor_number(d)?, "t").map_err(dup)?,
            7 => set_once(&mut r.ut, cbor_number(d)?, "ut").map_err(dup)?,
            8 => {
                use base64::Engine as _;
                let data = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(cbor_bytes(d)?);
                set_once(&mut r.vd, Cow::Owned(data), "vd").map_err(dup)?
            }
            _ => d.skip().map_err(|e| cbor_error(&e))?,
        }
    }
    Ok(r)
}

/// Parses a SenML CBOR pack: a CBOR array of maps with integer labels (RFC 8428 section 6).
pub fn parse_cbor_pack(payload: &[u8]) -> Result<Vec<Record<'_>>, DecodeError> {
    use minicbor::data::Type;
    /// The self-described CBOR tag (RFC 8949 3.4.6) may precede any CBOR item.
    const SELF_DESCRIBED: u64 = 55799;
    let mut d = minicbor::Decoder::new(payload);
    if d.datatype().map_err(|e| cbor_error(&e))? == Type::Tag {
        let tag = d.tag().map_err(|e| cbor_error(&e))?;
        if u64::from(tag) != SELF_DESCRIBED {
            return Err(DecodeError::new(
                Reason::Structure,
                "a SenML pack is an untagged CBOR array",
            ));
        }
    }
    let mut left = match d.datatype().map_err(|e| cbor_error(&e))? {
        Type::Array | Type::ArrayIndef => d.array().map_err(|e| cbor_error(&e))?,
        _ => {
            return Err(DecodeError::new(
                Reason::Structure,
                "expected a SenML pack (a CBOR array of records)",
            ))
        }
    };
    let mut records = Vec::with_capacity(left.unwrap_or(4).min(64) as usize);
    while cbor_remaining(&mut d, &mut left)? {
        records.push(cbor_record(&mut d, records.len())?);
    }
    if d.position() != payload.len() {
        return Err(DecodeError::new(
            Reason::Structure,
            format!("{} bytes after the pack", payload.len() - d.position()),
        ));
    }
    if records.is_empty() {
        return Err(DecodeError::new(Reason::Empty, "the pack has no records"));
    }
    Ok(records)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-:./_".contains(c))
}

/// Resolves a pack (RFC 8428 section 4), `received` in seconds since the epoch.
pub fn resolve(records: &[Record<'_>], received: f64) -> Result<Vec<Resolved>, DecodeError> {
    let err = |i: usize, reason: Reason, what: &str| {
        DecodeError::new(reason, format!("record {i}: {what}"))
    };
    let mut bn: &str = "";
    let (mut bt, mut bv, mut bs) = (0.0, 0.0, 0.0);
    let mut bu: &str = "";
    let mut out = Vec::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        if let Some(ver) = r.bver {
            if ver > SENML_VERSION {
                return Err(err(
                    i,
                    Reason::Version,
                    &format!("bver {ver} is newer than {SENML_VERSION}"),
                ));
            }
            if ver < 1 {
                return Err(err(i, Reason::Version, "bver must be positive"));
            }
        }
        if let Some(x) = &r.bn {
            bn = x;
        }
        if let Some(x) = r.bt {
            bt = x;
        }
        if let Some(x) = &r.bu {
            bu = x;
        }
        if let Some(x) = r.bv {
            bv = x;
        }
        if let Some(x) = r.bs {
            bs = x;
        }
        let name = format!("{bn}{}", r.n.as_deref().unwrap_or(""));
        if name.is_empty() {
            return Err(err(i, Reason::MissingField, "no name (neither bn nor n)"));
        }
        if !valid_name(&name) {
            return Err(err(
                i,
                Reason::Structure,
                "the name has characters SenML does not allow",
            ));
        }
        let values = [
            r.v.is_some(),
            r.vs.is_some(),
            r.vb.is_some(),
            r.vd.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        let value = match (values, r.s) {
            (0, Some(s)) => ResolvedValue::Sum(bs + s),
            (1, _) => {
                if let Some(v) = r.v {
                    ResolvedValue::Number(bv + v)
                } else if let Some(vs) = &r.vs {
                    ResolvedValue::Text(vs.to_string())
                } else if let Some(vb) = r.vb {
                    ResolvedValue::Bool(vb)
                } else {
                    ResolvedValue::Data(r.vd.as_deref().unwrap_or_default().to_owned())
                }
            }
            (0, None) => {
                return Err(err(
                    i,
                    Reason::MissingField,
                    "no value (v, vs, vb, vd or s)",
                ))
            }
            _ => return Err(err(i, Reason::Structure, "more than one of v, vs, vb, vd")),
        };
        let mut time = bt + r.t.unwrap_or(0.0);
        if !time.is_finite() {
            return Err(err(i, Reason::BadTime, "time is not finite"));
        }
        let relative = time < RELATIVE_TIME_LIMIT;
        if relative {
            time += received;
        }
        let unit = r.u.as_deref().unwrap_or(bu).to_owned();
        out.push(Resolved {
            name,
            unit,
            time,
            relative,
            value,
        });
    }
    Ok(out)
}

impl SenmlCodec {
    fn metric_for(&self, name: &str) -> Option<Metric> {
        if let Some((_, m)) = self.names.iter().find(|(k, _)| name.ends_with(k.as_str())) {
            return Some(*m);
        }
        let last = name.rsplit([':', '/']).next().unwrap_or(name);
        Metric::from_name(last)
    }
}

impl Codec for SenmlCodec {
    fn name(&self) -> &'static str {
        match self.format {
            Format::Json => "senml-json",
            Format::Cbor => "senml-cbor",
        }
    }

    fn decode(&self, msg: &Message<'_>, out: &mut ReadingSink<'_>) -> Result<(), DecodeError> {
        let records = match self.format {
            Format::Json => parse_pack(msg.payload)?,
            Format::Cbor => parse_cbor_pack(msg.payload)?,
        };
        let resolved = resolve(&records, msg.received as f64 / 1e6)?;
        let mut pushed = 0;
        for (i, r) in resolved.iter().enumerate() {
            let Some(metric) = self.metric_for(&r.name) else {
                self.unknown
                    .skip(|| format!("record {i}: name `{}` maps to no metric", r.name))?;
                continue;
            };
            let value = match &r.value {
                ResolvedValue::Number(v) | ResolvedValue::Sum(v) => {
                    RawValue::Number(*v, units::from_senml(&r.unit))
                }
                ResolvedValue::Text(s) | ResolvedValue::Data(s) => RawValue::Text(s),
                ResolvedValue::Bool(b) => RawValue::Text(if *b { "true" } else { "false" }),
            };
            let ts = (r.time * 1e6).round();
            if ts.abs() >= 9.0e18 {
                return Err(DecodeError::new(
                    Reason::BadTime,
                    format!("record {i}: time out of range"),
                ));
            }
            out.push(Decoded {
                ts: Some(ts as i64),
                metric,
                value,
                flags: if r.relative {
                    flags::TIME_FROM_RECEIPT
                } else {
                    0
                },
                source: None,
                subject: None,
            })
            .map_err(|e| {
                let note = if e.reason == Reason::BadUnit && r.unit == "%" {
                    " (SenML `%` is the ratio `/`, RFC 8428 section 12.1)"
                } else {
                    ""
                };
                DecodeError::new(e.reason, format!("record {i}: {}{note}", e.detail))
            })?;
            pushed += 1;
        }
        if pushed == 0 {
            return Err(DecodeError::new(
                Reason::Empty,
                "no record maps to a metric",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::decode_to_readings;
    use crate::codec::test_util::{msg, RECEIVED};
    use serde_json::Value;

    fn vectors() -> Value {
        serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/senml-rfc8428.json"
        )))
        .unwrap()
    }

    #[test]
    fn resolves_the_rfc_examples() {
        let received = RECEIVED as f64 / 1e6;
        for ex in vectors()["examples"].as_array().unwrap() {
            let pack = serde_json::to_vec(&ex["pack_json"]).unwrap();
            let got = resolve(&parse_pack(&pack).unwrap(), received).unwrap();
            let want = ex["resolved"].as_array().unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                assert_eq!(g.name, w["n"].as_str().unwrap());
                assert_eq!(g.unit, w["u"].as_str().unwrap());
                assert_eq!(g.value, ResolvedValue::Number(w["v"].as_f64().unwrap()));
                match &w["t"] {
                    Value::String(s) => {
                        assert_eq!(s, "receive time");
                        assert_eq!(g.time, received);
                    }
                    t => assert!(
                        (g.time - t.as_f64().unwrap()).abs() < 1e-6,
                        "{} vs {t}",
                        g.time
                    ),
                }
            }
        }
    }

    #[test]
    fn relative_times_and_base_values() {
        let p = br#"[{"bn":"dev:","bt":-10,"bv":90,"n":"spo2","v":5,"u":"%"},{"n":"spo2","t":5,"v":6}]"#;
        let r = resolve(&parse_pack(p).unwrap(), 1000.0).unwrap();
        assert_eq!(r[0].time, 990.0);
        assert_eq!(r[1].time, 995.0);
        assert_eq!(r[1].value, ResolvedValue::Number(96.0));
        assert_eq!(r[1].unit, "");
    }

    #[test]
    fn a_relative_time_that_carries_the_receipt_out_of_the_clock_window_is_suspect() {
        let c = SenmlOptions::default().build_json().unwrap();
        // 268,000,000 s is a relative time (below 2^28): 8.5 years after the receipt.
        let far = br#"[{"n":"spo2","u":"%","v":97,"t":268000000}]"#;
        let r = decode_to_readings(&c, &msg(far)).unwrap();
        assert_ne!(r[0].flags & flags::CLOCK_SUSPECT, 0);
        // A few seconds before the receipt is a device's buffer, not a suspect clock.
        let near = br#"[{"n":"spo2","u":"%","v":97,"t":-5}]"#;
        let r = decode_to_readings(&c, &msg(near)).unwrap();
        assert_eq!(r[0].flags & flags::CLOCK_SUSPECT, 0);
        assert_ne!(r[0].flags & flags::TIME_FROM_RECEIPT, 0);
    }

    #[test]
    fn decodes_into_catalogue_readings() {
        let c = SenmlOptions::default().build_json().unwrap();
        let p = br#"[{"bn":"urn:dev:mac:0024:","bt":1.7e9,"n":"heart_rate","u":"/min","v":72},
                     {"n":"body_temp","u":"[degF]","v":98.6,"t":1},
                     {"n":"consciousness","vs":"V"}]"#;
        let r = decode_to_readings(&c, &msg(p)).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].metric, r[0].value), (Metric::HeartRate, Some(72.0)));
        assert_eq!(r[0].ts, 1_700_000_000_000_000);
        assert!((r[1].value.unwrap() - 37.0).abs() < 1e-9);
        assert_eq!(r[1].ts, 1_700_000_001_000_000);
        assert_eq!(r[2].text.as_deref(), Some("V"));
    }

    #[test]
    fn units_of_the_senml_registry() {
        let c = SenmlOptions::default().build_json().unwrap();
        // RFC 8428 section 12.1: `beat/min` for heart rate, `/` and (deprecated) `%` for a ratio,
        // `%RH`, `Cel`, `K`, `Pa`.
        let p = br#"[{"bn":"urn:dev:ow:10e2073a01080063:","n":"heart_rate","u":"beat/min","v":72},
                     {"n":"spo2","u":"/","v":0.97},
                     {"n":"perfusion_index","u":"%","v":0.05},
                     {"n":"humidity","u":"%RH","v":45},
                     {"n":"ambient_temp","u":"K","v":293.15},
                     {"n":"bp_systolic","u":"Pa","v":16000}]"#;
        let r = decode_to_readings(&c, &msg(p)).unwrap();
        let got: Vec<(Metric, f64)> = r.iter().map(|r| (r.metric, r.value.unwrap())).collect();
        let want = [
            (Metric::HeartRate, 72.0),
            (Metric::Spo2, 97.0),
            (Metric::PerfusionIndex, 5.0),
            (Metric::Humidity, 45.0),
            (Metric::AmbientTemp, 20.0),
            (Metric::BpSystolic, 120.00992),
        ];
        for ((m, v), (wm, wv)) in got.iter().zip(want) {
            assert_eq!(*m, wm);
            assert!((v - wv).abs() < 1e-9, "{m}: {v} vs {wv}");
        }
        assert_eq!(got.len(), want.len());
        let e = decode_to_readings(&c, &msg(br#"[{"n":"body_temp","u":"%","v":37}]"#)).unwrap_err();
        assert_eq!(e.reason, Reason::BadUnit);
        assert!(e.detail.contains("SenML `%` is the ratio"), "{e}");
        let e = decode_to_readings(&c, &msg(br#"[{"n":"resp_rate","u":"beat/min","v":16}]"#))
            .unwrap_err();
        assert_eq!(e.reason, Reason::BadUnit);
    }

    #[test]
    fn names_map_by_suffix_and_unknown_names_are_rejected_or_ignored() {
        let opts: SenmlOptions =
            toml::from_str("[names]\n\":t\" = \"body_temp\"\n\"x:t\" = \"ambient_temp\"\n")
                .unwrap();
        let c = opts.build_json().unwrap();
        let r =
            decode_to_readings(&c, &msg(br#"[{"n":"a:t","v":37},{"n":"box:t","v":4}]"#)).unwrap();
        assert_eq!(r[0].metric, Metric::BodyTemp);
        assert_eq!(r[1].metric, Metric::AmbientTemp);
        let e = decode_to_readings(&c, &msg(br#"[{"n":"a:t","v":37},{"n":"battery","v":4}]"#))
            .unwrap_err();
        assert_eq!(e.reason, Reason::UnknownName);
        let c = SenmlOptions {
            unknown_names: UnknownNames::Ignore,
            ..Default::default()
        }
        .build_json()
        .unwrap();
        let r = decode_to_readings(&c, &msg(br#"[{"n":"spo2","v":97},{"n":"battery","v":4}]"#))
            .unwrap();
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn rfc_rules_refuse_bad_packs() {
        let c = SenmlOptions::default().build_json().unwrap();
        let cases: &[(&[u8], Reason)] = &[
            (br#"[{"n":"spo2","v":97,"bver":11}]"#, Reason::Version),
            (br#"[{"n":"spo2","v":97,"crit_":1}]"#, Reason::Structure),
            (br#"[{"n":"spo2","v":97,"vs":"x"}]"#, Reason::Structure),
            (br#"[{"n":"spo2"}]"#, Reason::MissingField),
            (br#"[{"v":97}]"#, Reason::MissingField),
            (br#"[{"n":"-spo2","v":97}]"#, Reason::Structure),
            (br#"[{"n":"spo2","v":"97"}]"#, Reason::Structure),
            (br#"[{"n":"spo2","v":97,"v":98}]"#, Reason::Structure),
            (br#"[]"#, Reason::Empty),
            (br#"{"n":"spo2","v":97}"#, Reason::Structure),
            (br#"[{"n":"spo2","v":97}"#, Reason::Syntax),
            (br#"[{"n":"spo2","vb":true}]"#, Reason::BadType),
            (br#"[{"n":"spo2","vs":"97"}]"#, Reason::BadType),
        ];
        for (p, reason) in cases {
            let e = decode_to_readings(&c, &msg(p)).unwrap_err();
            assert_eq!(e.reason, *reason, "{} → {e}", String::from_utf8_lossy(p));
        }
        // An unknown label without the underscore is ignored.
        assert!(decode_to_readings(&c, &msg(br#"[{"n":"spo2","v":97,"foo":{"a":[1]}}]"#)).is_ok());
    }
}

#[cfg(test)]
mod cbor_tests {
    use super::*;
    use crate::codec::decode_to_readings;
    use crate::codec::test_util::{msg, RECEIVED};
    use minicbor::Encoder;
    use serde_json::Value;

    /// Encodes a JSON pack as SenML CBOR with the integer labels of RFC 8428 Table 4, integers
    /// as CBOR integers and other numbers as the shortest float that holds them, as encoders do.
    fn to_cbor(pack: &Value) -> Vec<u8> {
        let mut e = Encoder::new(Vec::new());
        let records = pack.as_array().unwrap();
        e.array(records.len() as u64).unwrap();
        for r in records {
            let r = r.as_object().unwrap();
            e.map(r.len() as u64).unwrap();
            for (k, v) in r {
                let label: i64 = match k.as_str() {
                    "bver" => -1,
                    "bn" => -2,
                    "bt" => -3,
                    "bu" => -4,
                    "bv" => -5,
                    "bs" => -6,
                    "n" => 0,
                    "u" => 1,
                    "v" => 2,
                    "vs" => 3,
                    "vb" => 4,
                    "s" => 5,
                    "t" => 6,
                    "ut" => 7,
                    "vd" => 8,
                    other => {
                        e.str(other).unwrap();
                        e.str("?").unwrap();
                        continue;
                    }
                };
                e.i64(label).unwrap();
                match v {
                    Value::String(s) if label == 8 => {
                        use base64::Engine as _;
                        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
                            .decode(s)
                            .unwrap();
                        e.bytes(&b).unwrap();
                    }
                    Value::String(s) => {
                        e.str(s).unwrap();
                    }
                    Value::Bool(b) => {
                        e.bool(*b).unwrap();
                    }
                    Value::Number(n) => {
                        if let Some(i) = n.as_i64() {
                            e.i64(i).unwrap();
                        } else {
                            let f = n.as_f64().unwrap();
                            if f64::from(f as f32) == f {
                                e.f32(f as f32).unwrap();
                            } else {
                                e.f64(f).unwrap();
                            }
                        }
                    }
                    other => panic!("unexpected {other}"),
                }
            }
        }
        e.into_writer()
    }

    #[test]
    fn cbor_packs_resolve_like_the_rfc_examples() {
        let vectors: Value = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/senml-rfc8428.json"
        )))
        .unwrap();
        let received = RECEIVED as f64 / 1e6;
        for ex in vectors["examples"].as_array().unwrap() {
            let json = serde_json::to_vec(&ex["pack_json"]).unwrap();
            let cbor = to_cbor(&ex["pack_json"]);
            let from_json = resolve(&parse_pack(&json).unwrap(), received).unwrap();
            let from_cbor = resolve(&parse_cbor_pack(&cbor).unwrap(), received).unwrap();
            assert_eq!(from_cbor, from_json);
            assert_eq!(from_cbor.len(), ex["resolved"].as_array().unwrap().len());
        }
    }

    #[test]
    fn cbor_values_of_every_kind() {
        let c = SenmlOptions::default().build_cbor().unwrap();
        assert_eq!(c.name(), "senml-cbor");
        let pack = serde_json::json!([
            {"bn": "urn:dev:ow:10e2:", "bt": 1.7e9, "n": "heart_rate", "u": "/min", "v": 72},
            {"n": "body_temp", "u": "Cel", "v": 37.25, "t": 1},
            {"n": "consciousness", "vs": "A"},
            {"n": "spo2", "u": "/", "s": 0.97}
        ]);
        let r = decode_to_readings(&c, &msg(&to_cbor(&pack))).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!((r[0].metric, r[0].value), (Metric::HeartRate, Some(72.0)));
        assert_eq!(r[0].ts, 1_700_000_000_000_000);
        assert_eq!(r[1].value, Some(37.25));
        assert_eq!(r[1].ts, 1_700_000_001_000_000);
        assert_eq!(r[2].text.as_deref(), Some("A"));
        assert!((r[3].value.unwrap() - 97.0).abs() < 1e-9);
        // Half-precision floats, indefinite-length arrays, maps and strings decode too:
        // [_ {0: (_ "sp", "o2"), 2: 97.0 as f16}]
        let indefinite = [
            0x9f, 0xbf, 0x00, 0x7f, 0x62, b's', b'p', 0x62, b'o', b'2', 0xff, 0x02, 0xf9, 0x56,
            0x10, 0xff, 0xff,
        ];
        let r = decode_to_readings(&c, &msg(&indefinite)).unwrap();
        assert_eq!((r[0].metric, r[0].value), (Metric::Spo2, Some(97.0)));
    }

    #[test]
    fn cbor_rules_refuse_bad_packs() {
        let c = SenmlOptions::default().build_cbor().unwrap();
        let cases: Vec<(Vec<u8>, Reason)> = vec![
            (
                to_cbor(&serde_json::json!([{"n": "spo2", "v": 97, "bver": 11}])),
                Reason::Version,
            ),
            (
                to_cbor(&serde_json::json!([{"n": "spo2", "v": 97, "crit_": 1}])),
                Reason::Structure,
            ),
            (
                to_cbor(&serde_json::json!([{"n": "spo2"}])),
                Reason::MissingField,
            ),
            (to_cbor(&serde_json::json!([])), Reason::Empty),
            // {0: "spo2", 2: 97, 2: 98}: a label twice
            (
                vec![
                    0x81, 0xa3, 0x00, 0x64, b's', b'p', b'o', b'2', 0x02, 0x18, 0x61, 0x02, 0x18,
                    0x62,
                ],
                Reason::Structure,
            ),
            // v as text
            (
                vec![
                    0x81, 0xa2, 0x00, 0x64, b's', b'p', b'o', b'2', 0x02, 0x62, b'9', b'7',
                ],
                Reason::Structure,
            ),
            // a map at the top
            (vec![0xa1, 0x00, 0x61, b'x'], Reason::Structure),
            // cut off inside the name
            (vec![0x81, 0xa2, 0x00, 0x64, b's', b'p'], Reason::Truncated),
            // a byte after the pack
            (
                vec![
                    0x81, 0xa2, 0x00, 0x64, b's', b'p', b'o', b'2', 0x02, 0x18, 0x61, 0x00,
                ],
                Reason::Structure,
            ),
            // a map label that is neither integer nor text
            (vec![0x81, 0xa1, 0xf5, 0x00], Reason::Structure),
        ];
        for (p, reason) in cases {
            let e = decode_to_readings(&c, &msg(&p)).unwrap_err();
            assert_eq!(e.reason, reason, "{p:02x?}: {e}");
        }
    }
}
