//! Conversion of a value in the unit a device sent to the canonical unit of its metric.
//!
//! One table serves every codec. A unit the table cannot convert is an error, never a silent
//! pass-through: a temperature in °F stored as Cel would be a clinical error. A spelling that
//! names one quantity (heart beats, breaths) converts only for the metrics of that quantity.

use crate::model::reading::Metric;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unit `{unit}` cannot be converted to {canonical} for {metric}")]
pub struct UnitError {
    pub metric: &'static str,
    pub unit: String,
    pub canonical: &'static str,
}

/// How a non-canonical unit becomes the canonical one: `canonical = value * scale + offset`.
struct Conversion {
    canonical: &'static str,
    from: &'static [&'static str],
    /// The metrics the spellings may describe, where they name one quantity (heart beats,
    /// breaths); empty: any metric of the canonical unit.
    only: &'static [Metric],
    scale: f64,
    offset: f64,
}

const HEART: &[Metric] = &[
    Metric::HeartRate,
    Metric::PulseRate,
    Metric::PulseRateFast,
    Metric::PulseRateSlow,
];

/// Aliases are the spellings devices really send next to the UCUM code, and the symbols of the
/// SenML units registry (RFC 8428 section 12.1, with the secondary units of RFC 8798) for the
/// quantities the catalogue has.
const CONVERSIONS: &[Conversion] = &[
    // Identity aliases of canonical units.
    Conversion {
        canonical: "/min",
        // SenML `1/min`: an event rate per minute.
        from: &["/min", "1/min"],
        only: &[],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "/min",
        // SenML `beat/min`: heart rate in beats per minute.
        from: &["beat/min", "{beats}/min", "{beat}/min", "bpm", "beats/min"],
        only: HEART,
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "/min",
        from: &["{breaths}/min", "{breath}/min", "breaths/min"],
        only: &[Metric::RespRate],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "/min",
        // SenML `1/s`: an event rate per second.
        from: &["1/s", "/s"],
        only: &[],
        scale: 60.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "%",
        // RFC 8798 `/100`: a percentage.
        from: &["%", "percent", "%{saturation}", "/100"],
        only: &[],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "%",
        // SenML `/`: a ratio (0.97, not 97).
        from: &["1", "/1", "{fraction}", "/"],
        only: &[],
        scale: 100.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "Cel",
        from: &["Cel", "°C", "degC", "C"],
        only: &[],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "Cel",
        from: &["[degF]", "°F", "degF", "F"],
        only: &[],
        scale: 5.0 / 9.0,
        offset: -32.0 * 5.0 / 9.0,
    },
    Conversion {
        canonical: "Cel",
        from: &["K"],
        only: &[],
        scale: 1.0,
        offset: -273.15,
    },
    Conversion {
        canonical: "mm[Hg]",
        from: &["mm[Hg]", "mmHg"],
        only: &[],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "mm[Hg]",
        from: &["kPa"],
        only: &[],
        scale: 7.50062,
        offset: 0.0,
    },
    Conversion {
        canonical: "mm[Hg]",
        // SenML `Pa`, and RFC 8798's `hPa`: the kPa factor, scaled.
        from: &["Pa"],
        only: &[],
        scale: 7.50062e-3,
        offset: 0.0,
    },
    Conversion {
        canonical: "mm[Hg]",
        from: &["hPa"],
        only: &[],
        scale: 7.50062e-1,
        offset: 0.0,
    },
    Conversion {
        canonical: "ms",
        from: &["ms"],
        only: &[],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "ms",
        from: &["s"],
        only: &[],
        scale: 1000.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "L/min",
        from: &["L/min", "l/min"],
        only: &[],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "L/min",
        // SenML `l/s`.
        from: &["l/s", "L/s"],
        only: &[],
        scale: 60.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "%RH",
        from: &["%RH", "%", "%{RH}"],
        only: &[],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "%RH",
        from: &["/"],
        only: &[],
        scale: 100.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "ppm",
        from: &["ppm", "[ppm]"],
        only: &[],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "{count}",
        from: &["{count}", "1", "count"],
        only: &[],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "deg",
        from: &["deg", "lat", "lon"],
        only: &[],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "kJ",
        from: &["kJ"],
        only: &[],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "kJ",
        // SenML `J`.
        from: &["J"],
        only: &[],
        scale: 1e-3,
        offset: 0.0,
    },
    Conversion {
        canonical: "kJ",
        from: &["kcal", "[Cal]", "kcal_th"],
        only: &[],
        scale: 4.184,
        offset: 0.0,
    },
    Conversion {
        canonical: "dBm",
        from: &["dBm", "dB[mW]"],
        only: &[],
        scale: 1.0,
        offset: 0.0,
    },
];

/// Converts `value` given in `unit` to the canonical unit of `metric`. An empty unit means the
/// device sent no unit and the route did not name one: the value is taken as canonical.
pub fn to_canonical(metric: Metric, unit: &str, value: f64) -> Result<f64, UnitError> {
    let canonical = metric.unit();
    if unit.is_empty() || unit == canonical {
        return Ok(value);
    }
    CONVERSIONS
        .iter()
        .find(|c| {
            c.canonical == canonical
                && (c.only.is_empty() || c.only.contains(&metric))
                && c.from.contains(&unit)
        })
        .map(|c| value * c.scale + c.offset)
        .ok_or_else(|| UnitError {
            metric: metric.name(),
            unit: unit.to_owned(),
            canonical,
        })
}

/// The UCUM-table spelling of a SenML unit symbol. The SenML registry (RFC 8428 section 12.1)
/// keeps `%` only as a deprecated name of `/`, a ratio, and says outright that it is not a
/// percentage: a SenML 0.97 `%` is 97 %, where UCUM's `%` (FHIR, Open mHealth, vendor JSON)
/// would read 0.97 %. Every other registry symbol the catalogue uses means what the table says.
pub fn from_senml(symbol: &str) -> &str {
    match symbol {
        "%" => "/",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_to_canonical_units() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(
            to_canonical(Metric::BodyTemp, "[degF]", 98.6).unwrap(),
            37.0
        ));
        assert!(close(
            to_canonical(Metric::BodyTemp, "K", 310.15).unwrap(),
            37.0
        ));
        assert!(close(
            to_canonical(Metric::BpSystolic, "kPa", 16.0).unwrap(),
            120.00992
        ));
        assert!(close(to_canonical(Metric::Spo2, "1", 0.97).unwrap(), 97.0));
        assert!(close(
            to_canonical(Metric::RrInterval, "s", 0.8).unwrap(),
            800.0
        ));
        assert_eq!(to_canonical(Metric::HeartRate, "bpm", 72.0).unwrap(), 72.0);
        assert_eq!(to_canonical(Metric::HeartRate, "", 72.0).unwrap(), 72.0);
    }

    #[test]
    fn takes_the_senml_registry_names_of_catalogue_units() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        // RFC 8428 section 12.1: beat/min is a heart rate, 1/min and 1/s event rates.
        for m in [Metric::HeartRate, Metric::PulseRate, Metric::PulseRateFast] {
            assert_eq!(to_canonical(m, "beat/min", 72.0).unwrap(), 72.0);
        }
        assert_eq!(to_canonical(Metric::RespRate, "1/min", 16.0).unwrap(), 16.0);
        assert!(close(
            to_canonical(Metric::HeartRate, "1/s", 1.2).unwrap(),
            72.0
        ));
        // `/` is a ratio; `%RH` is relative humidity; `Cel` and `K` temperatures.
        assert!(close(to_canonical(Metric::Spo2, "/", 0.97).unwrap(), 97.0));
        assert!(close(
            to_canonical(Metric::Humidity, "/", 0.45).unwrap(),
            45.0
        ));
        assert_eq!(to_canonical(Metric::Humidity, "%RH", 45.0).unwrap(), 45.0);
        assert_eq!(to_canonical(Metric::BodyTemp, "Cel", 37.0).unwrap(), 37.0);
        assert!(close(
            to_canonical(Metric::BodyTemp, "K", 310.15).unwrap(),
            37.0
        ));
        // Pa and hPa agree with the kPa factor: 16 kPa is 120.00992 mm[Hg].
        assert!(close(
            to_canonical(Metric::BpSystolic, "Pa", 16_000.0).unwrap(),
            120.00992
        ));
        assert!(close(
            to_canonical(Metric::BpSystolic, "hPa", 160.0).unwrap(),
            120.00992
        ));
        assert!(close(
            to_canonical(Metric::O2Flow, "l/s", 0.05).unwrap(),
            3.0
        ));
        assert!(close(
            to_canonical(Metric::EnergyExpended, "J", 50_000.0).unwrap(),
            50.0
        ));
        // RFC 8798's secondary units: `/100` is a percentage, `ms`, `ppm`, `dBm` as UCUM.
        assert_eq!(to_canonical(Metric::Spo2, "/100", 97.0).unwrap(), 97.0);
        assert_eq!(to_canonical(Metric::Co2, "ppm", 800.0).unwrap(), 800.0);
        assert_eq!(to_canonical(Metric::Rssi, "dBm", -60.0).unwrap(), -60.0);
        assert_eq!(
            to_canonical(Metric::RrInterval, "ms", 800.0).unwrap(),
            800.0
        );
    }

    #[test]
    fn a_unit_naming_another_quantity_is_refused() {
        // Heart beats are not breaths: such a unit means the route maps the wrong field.
        for u in ["beat/min", "bpm", "beats/min"] {
            assert!(to_canonical(Metric::RespRate, u, 16.0).is_err(), "{u}");
        }
        assert!(to_canonical(Metric::HeartRate, "breaths/min", 72.0).is_err());
        assert!(to_canonical(Metric::Spo2, "%RH", 97.0).is_err());
    }

    #[test]
    fn senml_percent_is_the_registry_ratio() {
        assert_eq!(from_senml("%"), "/");
        assert!((to_canonical(Metric::Spo2, from_senml("%"), 0.97).unwrap() - 97.0).abs() < 1e-9);
        for u in ["beat/min", "%RH", "Cel", "K", "/", "Pa"] {
            assert_eq!(from_senml(u), u);
        }
    }

    #[test]
    fn refuses_units_it_cannot_convert() {
        let err = to_canonical(Metric::BodyTemp, "mm[Hg]", 37.0).unwrap_err();
        assert_eq!(err.unit, "mm[Hg]");
        assert!(to_canonical(Metric::HeartRate, "%", 70.0).is_err());
    }
}
