//! Conversion of a value in the unit a device sent to the canonical unit of its metric.
//!
//! One table serves every codec. A unit the table cannot convert is an error, never a silent
//! pass-through: a temperature in °F stored as Cel would be a clinical error.

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
    scale: f64,
    offset: f64,
}

/// Aliases are the spellings devices really send next to the UCUM code.
const CONVERSIONS: &[Conversion] = &[
    // Identity aliases of canonical units.
    Conversion {
        canonical: "/min",
        from: &[
            "/min",
            "1/min",
            "{beats}/min",
            "{breaths}/min",
            "bpm",
            "beats/min",
            "breaths/min",
        ],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "%",
        from: &["%", "percent", "%{saturation}"],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "%",
        from: &["1", "/1", "{fraction}"],
        scale: 100.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "Cel",
        from: &["Cel", "°C", "degC", "C"],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "Cel",
        from: &["[degF]", "°F", "degF", "F"],
        scale: 5.0 / 9.0,
        offset: -32.0 * 5.0 / 9.0,
    },
    Conversion {
        canonical: "Cel",
        from: &["K"],
        scale: 1.0,
        offset: -273.15,
    },
    Conversion {
        canonical: "mm[Hg]",
        from: &["mm[Hg]", "mmHg"],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "mm[Hg]",
        from: &["kPa"],
        scale: 7.50062,
        offset: 0.0,
    },
    Conversion {
        canonical: "ms",
        from: &["ms"],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "ms",
        from: &["s"],
        scale: 1000.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "L/min",
        from: &["L/min", "l/min"],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "%RH",
        from: &["%RH", "%", "%{RH}"],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "ppm",
        from: &["ppm", "[ppm]"],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "{count}",
        from: &["{count}", "1", "count"],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "deg",
        from: &["deg", "lat", "lon"],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "kJ",
        from: &["kJ"],
        scale: 1.0,
        offset: 0.0,
    },
    Conversion {
        canonical: "kJ",
        from: &["kcal", "[Cal]", "kcal_th"],
        scale: 4.184,
        offset: 0.0,
    },
    Conversion {
        canonical: "dBm",
        from: &["dBm", "dB[mW]"],
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
        .find(|c| c.canonical == canonical && c.from.contains(&unit))
        .map(|c| value * c.scale + c.offset)
        .ok_or_else(|| UnitError {
            metric: metric.name(),
            unit: unit.to_owned(),
            canonical,
        })
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
    fn refuses_units_it_cannot_convert() {
        let err = to_canonical(Metric::BodyTemp, "mm[Hg]", 37.0).unwrap_err();
        assert_eq!(err.unit, "mm[Hg]");
        assert!(to_canonical(Metric::HeartRate, "%", 70.0).is_err());
    }
}
