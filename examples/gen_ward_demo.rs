//! Generates `fixtures/ward-demo.jsonl`: a ward of bedside monitors (vendor JSON) and SenML
//! thermometers, one patient deteriorating so that every alarm of pipelines/ward.toml fires
//! (tests/replay.rs checks that they do).
//!
//! ```sh
//! cargo run --example gen_ward_demo -- --beds 8 --minutes 12 --seed 7 > fixtures/ward-demo.jsonl
//! ```
//! Scale it with `--beds` and `--minutes`; the same arguments always give the same file.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// 2024-03-01T08:00:00Z: device clocks in the recording start here.
const START_S: i64 = 1_709_280_000;
const MONITOR_EVERY_S: i64 = 5;
const THERMOMETER_EVERY_S: i64 = 30;

struct Args {
    beds: u32,
    minutes: i64,
    seed: u64,
    ward: u32,
    /// The deteriorating patient's bed.
    sick_bed: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        beds: 8,
        minutes: 12,
        seed: 7,
        ward: 4,
        sick_bed: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        let n = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: `{v}` is not a number"))
        };
        match flag.as_str() {
            "--beds" => a.beds = n(&v)? as u32,
            "--minutes" => a.minutes = n(&v)? as i64,
            "--seed" => a.seed = n(&v)?,
            "--ward" => a.ward = n(&v)? as u32,
            "--sick-bed" => a.sick_bed = n(&v)? as u32,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.beds == 0 || a.minutes == 0 || a.sick_bed >= a.beds {
        return Err("need beds >= 1, minutes >= 1 and sick-bed < beds".into());
    }
    Ok(a)
}

/// Baseline vitals of one patient.
struct Patient {
    hr: f64,
    spo2: f64,
    rr: f64,
    sys: f64,
    dia: f64,
    temp: f64,
}

/// Where the sick patient's vitals end up, past every threshold of pipelines/ward.toml's rules
/// (spo2-low < 92, hr-high > 130, rr-high > 24, sys-low < 90, temp-high > 39.0) by more than the
/// noise, so that each alarm fires whatever the seed gives as the patient's baseline.
const SICK: Patient = Patient {
    hr: 140.0,
    spo2: 87.0,
    rr: 28.0,
    sys: 84.0,
    dia: 55.0,
    temp: 39.5,
};

/// How far the sick patient has deteriorated at second `t`: 0 until a third of the recording,
/// then rising to 1 at two thirds, and staying there.
fn deterioration(t: i64, total: i64) -> f64 {
    let (a, b) = (total / 3, 2 * total / 3);
    ((t - a) as f64 / (b - a) as f64).clamp(0.0, 1.0)
}

/// A baseline `from` moved a fraction `d` of the way to `to`.
fn towards(from: f64, to: f64, d: f64) -> f64 {
    from + (to - from) * d
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gen_ward_demo: {e}");
            std::process::exit(2);
        }
    };
    let mut rng = StdRng::seed_from_u64(args.seed);
    let patients: Vec<Patient> = (0..args.beds)
        .map(|_| Patient {
            hr: rng.random_range(62.0..88.0),
            spo2: rng.random_range(95.0..99.0),
            rr: rng.random_range(12.0..18.0),
            sys: rng.random_range(110.0..135.0),
            dia: rng.random_range(65.0..85.0),
            temp: rng.random_range(36.4..37.2),
        })
        .collect();
    let total = args.minutes * 60;
    let mut lines = Vec::new();
    for t in 0..total {
        for (bed, p) in patients.iter().enumerate() {
            let bed = bed as u32;
            let d = if bed == args.sick_bed {
                deterioration(t, total)
            } else {
                0.0
            };
            // Stagger devices so they do not all publish in the same millisecond.
            let offset_ms = (bed as i64 * 137) % 1000;
            let t_ms = t * 1000 + offset_ms;
            let ts_ms = (START_S + t) * 1000 + offset_ms;
            if t % MONITOR_EVERY_S == 0 {
                let hr = towards(p.hr, SICK.hr, d) + rng.random_range(-2.0..2.0);
                let spo2 = (towards(p.spo2, SICK.spo2, d) + rng.random_range(-0.6..0.6)).min(100.0);
                let rr = towards(p.rr, SICK.rr, d) + rng.random_range(-1.0..1.0);
                let sys = towards(p.sys, SICK.sys, d) + rng.random_range(-3.0..3.0);
                let dia = towards(p.dia, SICK.dia, d) + rng.random_range(-2.0..2.0);
                let mut body = json!({
                    "ts": ts_ms,
                    "hr": hr.round(),
                    "spo2": spo2.round(),
                    "rr": rr.round(),
                });
                // The cuff measures every minute.
                if t % 60 == 0 {
                    body["sys"] = json!(sys.round());
                    body["dia"] = json!(dia.round());
                }
                lines.push((
                    t_ms,
                    json!({
                        "t_ms": t_ms,
                        "topic": format!("ward/{}/bed/{bed}/vitals", args.ward),
                        "payload": body,
                        "qos": 1,
                    }),
                ));
            }
            if t % THERMOMETER_EVERY_S == 0 {
                let temp = towards(p.temp, SICK.temp, d) + rng.random_range(-0.1..0.1);
                let pack = json!([{
                    "bn": format!("urn:dev:mac:0024befffe80{bed:04x}:"),
                    "bt": (ts_ms as f64) / 1000.0,
                    "n": "temp",
                    "u": "Cel",
                    "v": round1(temp),
                }]);
                lines.push((
                    t_ms,
                    json!({
                        "t_ms": t_ms,
                        "topic": format!("ward/{}/bed/{bed}/senml", args.ward),
                        "payload": pack,
                        "qos": 1,
                    }),
                ));
            }
        }
    }
    lines.sort_by_key(|(t, _)| *t);
    for (_, l) in lines {
        println!("{l}");
    }
}
