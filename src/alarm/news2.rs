//! The National Early Warning Score 2 (Royal College of Physicians, 2017): the sub-score of each
//! of its seven parameters, the total and the clinical risk band. Pure functions of the values;
//! which reading feeds which parameter, staleness and publishing belong to the engine.
//!
//! The chart lists whole numbers (temperature to one decimal); devices report finer. A value
//! between two bands of the chart (91.5 % between 91 and 92, 38.05 °C between 38.0 and 38.1)
//! scores as the band further from normal: an early-warning score that under-calls a patient is
//! the failure that matters, and a device's extra precision is no reason to round a reading back
//! towards calm. Values are first rounded to 10^-6 so that a unit conversion's floating-point
//! residue (38.000000000001 °C from °F) is not taken for such a value.

use serde::Serialize;

/// A NEWS2 parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Param {
    RespRate,
    Spo2,
    AirOrOxygen,
    BpSystolic,
    Pulse,
    Consciousness,
    Temperature,
}

impl Param {
    pub const ALL: [Param; 7] = [
        Param::RespRate,
        Param::Spo2,
        Param::AirOrOxygen,
        Param::BpSystolic,
        Param::Pulse,
        Param::Consciousness,
        Param::Temperature,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Param::RespRate => "resp_rate",
            Param::Spo2 => "spo2",
            Param::AirOrOxygen => "air_or_oxygen",
            Param::BpSystolic => "bp_systolic",
            Param::Pulse => "pulse",
            Param::Consciousness => "consciousness",
            Param::Temperature => "temperature",
        }
    }
}

/// Which SpO2 scale applies: scale 2 only for patients with a prescribed 88–92 % target
/// (hypercapnic respiratory failure), as a clinician decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum Spo2Scale {
    #[default]
    One,
    Two,
}

/// ACVPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Consciousness {
    Alert,
    /// New confusion.
    Confusion,
    Voice,
    Pain,
    Unresponsive,
}

impl Consciousness {
    /// From the text of a `consciousness` reading: A, C, V, P or U (case-insensitive), or the
    /// words.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text.trim().to_ascii_uppercase().as_str() {
            "A" | "ALERT" => Consciousness::Alert,
            "C" | "CONFUSION" | "NEW CONFUSION" => Consciousness::Confusion,
            "V" | "VOICE" => Consciousness::Voice,
            "P" | "PAIN" => Consciousness::Pain,
            "U" | "UNRESPONSIVE" => Consciousness::Unresponsive,
            _ => return None,
        })
    }
}

/// The clinical risk band of a score, with the response the RCP ties to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Band {
    /// 0–4: ward-based response.
    #[serde(rename = "low")]
    Low,
    /// A score of 3 in any single parameter: urgent ward-based response.
    #[serde(rename = "low-medium")]
    LowMedium,
    /// 5–6: key threshold for urgent response.
    #[serde(rename = "medium")]
    Medium,
    /// 7 or more: urgent or emergency response.
    #[serde(rename = "high")]
    High,
}

impl Band {
    pub fn as_str(self) -> &'static str {
        match self {
            Band::Low => "low",
            Band::LowMedium => "low-medium",
            Band::Medium => "medium",
            Band::High => "high",
        }
    }
}

fn quantised(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

/// Respiration rate, breaths per minute: ≤8 → 3, 9–11 → 1, 12–20 → 0, 21–24 → 2, ≥25 → 3.
pub fn resp_rate(v: f64) -> u8 {
    let v = quantised(v);
    if v < 9.0 {
        3
    } else if v < 12.0 {
        1
    } else if v <= 20.0 {
        0
    } else if v <= 24.0 {
        2
    } else {
        3
    }
}

/// SpO2 %, scale 1: ≤91 → 3, 92–93 → 2, 94–95 → 1, ≥96 → 0.
pub fn spo2_scale1(v: f64) -> u8 {
    let v = quantised(v);
    if v < 92.0 {
        3
    } else if v < 94.0 {
        2
    } else if v < 96.0 {
        1
    } else {
        0
    }
}

/// SpO2 %, scale 2: ≤83 → 3, 84–85 → 2, 86–87 → 1, 88–92 → 0 (and ≥93 on air → 0); on oxygen
/// 93–94 → 1, 95–96 → 2, ≥97 → 3. Unknown oxygen counts as air (the score is then partial).
pub fn spo2_scale2(v: f64, on_oxygen: bool) -> u8 {
    let v = quantised(v);
    if v < 84.0 {
        3
    } else if v < 86.0 {
        2
    } else if v < 88.0 {
        1
    } else if v <= 92.0 || !on_oxygen {
        0
    } else if v <= 94.0 {
        1
    } else if v <= 96.0 {
        2
    } else {
        3
    }
}

/// Air → 0, oxygen → 2.
pub fn air_or_oxygen(on_oxygen: bool) -> u8 {
    if on_oxygen {
        2
    } else {
        0
    }
}

/// Systolic blood pressure, mmHg: ≤90 → 3, 91–100 → 2, 101–110 → 1, 111–219 → 0, ≥220 → 3.
pub fn bp_systolic(v: f64) -> u8 {
    let v = quantised(v);
    if v < 91.0 {
        3
    } else if v < 101.0 {
        2
    } else if v < 111.0 {
        1
    } else if v <= 219.0 {
        0
    } else {
        3
    }
}

/// Pulse, per minute: ≤40 → 3, 41–50 → 1, 51–90 → 0, 91–110 → 1, 111–130 → 2, ≥131 → 3.
pub fn pulse(v: f64) -> u8 {
    let v = quantised(v);
    if v < 41.0 {
        3
    } else if v < 51.0 {
        1
    } else if v <= 90.0 {
        0
    } else if v <= 110.0 {
        1
    } else if v <= 130.0 {
        2
    } else {
        3
    }
}

/// Consciousness: alert → 0; new confusion, voice, pain, unresponsive → 3.
pub fn consciousness(c: Consciousness) -> u8 {
    match c {
        Consciousness::Alert => 0,
        _ => 3,
    }
}

/// Temperature, °C: ≤35.0 → 3, 35.1–36.0 → 1, 36.1–38.0 → 0, 38.1–39.0 → 1, ≥39.1 → 2.
pub fn temperature(v: f64) -> u8 {
    let v = quantised(v);
    if v < 35.1 {
        3
    } else if v < 36.1 {
        1
    } else if v <= 38.0 {
        0
    } else if v <= 39.0 {
        1
    } else {
        2
    }
}

/// The latest trusted value of each parameter, `None` when missing or stale.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observations {
    pub resp_rate: Option<f64>,
    pub spo2: Option<f64>,
    pub on_oxygen: Option<bool>,
    pub bp_systolic: Option<f64>,
    pub pulse: Option<f64>,
    pub consciousness: Option<Consciousness>,
    pub temperature: Option<f64>,
    pub scale: Spo2Scale,
}

/// A subject's score.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Score {
    pub total: u8,
    pub band: Band,
    /// Some parameter is missing or stale: the total counts only those present.
    pub partial: bool,
    /// Each parameter's sub-score, in [`Param::ALL`] order; `None` when missing.
    pub parameters: [Option<u8>; 7],
}

/// The band of a total, given whether any single parameter scored 3.
pub fn band(total: u8, any_three: bool) -> Band {
    if total >= 7 {
        Band::High
    } else if total >= 5 {
        Band::Medium
    } else if any_three {
        Band::LowMedium
    } else {
        Band::Low
    }
}

/// Scores `o`.
pub fn score(o: &Observations) -> Score {
    let spo2 = o.spo2.map(|v| match o.scale {
        Spo2Scale::One => spo2_scale1(v),
        Spo2Scale::Two => spo2_scale2(v, o.on_oxygen.unwrap_or(false)),
    });
    let parameters = [
        o.resp_rate.map(resp_rate),
        spo2,
        o.on_oxygen.map(air_or_oxygen),
        o.bp_systolic.map(bp_systolic),
        o.pulse.map(pulse),
        o.consciousness.map(consciousness),
        o.temperature.map(temperature),
    ];
    let total = parameters.iter().flatten().sum();
    let any_three = parameters.iter().flatten().any(|&s| s == 3);
    Score {
        total,
        band: band(total, any_three),
        partial: parameters.iter().any(Option::is_none),
        parameters,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors() -> Value {
        serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/news2-rcp2017.json"
        )))
        .unwrap()
    }

    /// Every band edge of the RCP chart, both sides, for each numeric parameter.
    #[test]
    fn every_band_boundary_of_the_chart_scores_as_the_chart_says() {
        let v = vectors();
        let cases: [(&str, &dyn Fn(f64) -> u8); 7] = [
            ("resp_rate", &resp_rate),
            ("spo2_scale1", &spo2_scale1),
            ("spo2_scale2_air", &|x| spo2_scale2(x, false)),
            ("spo2_scale2_oxygen", &|x| spo2_scale2(x, true)),
            ("bp_systolic", &bp_systolic),
            ("pulse", &pulse),
            ("temperature", &temperature),
        ];
        for (name, f) in cases {
            let rows = v["parameters"][name]
                .as_array()
                .unwrap_or_else(|| panic!("{name}"));
            assert!(!rows.is_empty());
            for row in rows {
                let (x, want) = (row[0].as_f64().unwrap(), row[1].as_u64().unwrap() as u8);
                assert_eq!(f(x), want, "{name} {x}");
            }
        }
    }

    #[test]
    fn values_between_bands_score_as_the_band_further_from_normal() {
        assert_eq!(spo2_scale1(91.5), 3);
        assert_eq!(temperature(38.05), 1);
        assert_eq!(temperature(35.05), 3);
        assert_eq!(resp_rate(20.5), 2);
        assert_eq!(resp_rate(11.5), 1);
        assert_eq!(bp_systolic(219.5), 3);
        assert_eq!(pulse(90.5), 1);
        assert_eq!(spo2_scale2(92.5, true), 1);
        assert_eq!(spo2_scale2(92.5, false), 0);
        // A conversion's residue is not a value between bands.
        assert_eq!(temperature((100.4 - 32.0) * 5.0 / 9.0), 0);
        assert_eq!(temperature(38.000_000_000_001), 0);
    }

    #[test]
    fn consciousness_and_oxygen() {
        assert_eq!(consciousness(Consciousness::Alert), 0);
        for c in ["C", "v", "P", "U", "new confusion"] {
            assert_eq!(consciousness(Consciousness::parse(c).unwrap()), 3, "{c}");
        }
        assert_eq!(Consciousness::parse("X"), None);
        assert_eq!((air_or_oxygen(false), air_or_oxygen(true)), (0, 2));
    }

    /// Whole patients from the vectors: total, band and partial.
    #[test]
    fn whole_patients_score_and_band_as_the_rcp_says() {
        let v = vectors();
        for p in v["patients"].as_array().unwrap() {
            let num = |k: &str| p[k].as_f64();
            let o = Observations {
                resp_rate: num("resp_rate"),
                spo2: num("spo2"),
                on_oxygen: p["on_oxygen"].as_bool(),
                bp_systolic: num("bp_systolic"),
                pulse: num("pulse"),
                consciousness: p["consciousness"].as_str().and_then(Consciousness::parse),
                temperature: num("temperature"),
                scale: if p["scale"].as_u64() == Some(2) {
                    Spo2Scale::Two
                } else {
                    Spo2Scale::One
                },
            };
            let s = score(&o);
            let name = p["name"].as_str().unwrap();
            assert_eq!(u64::from(s.total), p["total"].as_u64().unwrap(), "{name}");
            assert_eq!(s.band.as_str(), p["band"].as_str().unwrap(), "{name}");
            assert_eq!(s.partial, p["partial"].as_bool().unwrap(), "{name}");
        }
    }
}
