//! Generates `fixtures/ward-demo.jsonl`: a ward of bedside monitors (vendor JSON) and SenML
//! thermometers, one patient deteriorating so that every alarm of pipelines/ward.toml fires,
//! and one recovering (tests/replay.rs checks both).
//!
//! The monitors follow the service's adaptive-monitoring commands (pipelines/ward.toml,
//! `[news2.adaptive]`): they sample every 30 s while a patient is well and every 5 s once the
//! patient's NEWS2 band reaches medium, until it has stayed below for `relax_after`. The
//! generator scores NEWS2 with the service's own scoring (`iomt_edge::alarm::news2`) to know
//! when the service would ask, so the recording shows what the devices would have sent: the
//! deteriorating patient's monitor speeding up, the recovering patient's slowing down.
//!
//! ```sh
//! cargo run --example gen_ward_demo -- --beds 8 --minutes 12 --seed 7 > fixtures/ward-demo.jsonl
//! ```
//! Scale it with `--beds` and `--minutes`; the same arguments always give the same file.

use iomt_edge::alarm::news2::{score, Band, Observations};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// 2024-03-01T08:00:00Z: device clocks in the recording start here.
const START_S: i64 = 1_709_280_000;
/// A monitor's sampling period while its patient is well, and while the service asks it to
/// sample faster.
const MONITOR_SLOW_S: i64 = 30;
const MONITOR_FAST_S: i64 = 5;
const THERMOMETER_EVERY_S: i64 = 30;
/// `news2.adaptive.relax_after` of pipelines/ward.toml, in seconds.
const RELAX_AFTER_S: i64 = 180;

struct Args {
    beds: u32,
    minutes: i64,
    seed: u64,
    ward: u32,
    /// The deteriorating patient's bed.
    sick_bed: u32,
    /// The recovering patient's bed.
    recovering_bed: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        beds: 8,
        minutes: 12,
        seed: 7,
        ward: 4,
        sick_bed: 3,
        recovering_bed: 5,
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
            "--recovering-bed" => a.recovering_bed = n(&v)? as u32,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.beds < 2
        || a.minutes == 0
        || a.sick_bed >= a.beds
        || a.recovering_bed >= a.beds
        || a.sick_bed == a.recovering_bed
    {
        return Err(
            "need beds >= 2, minutes >= 1, and two different sick and recovering beds < beds"
                .into(),
        );
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

/// Where the recovering patient starts: NEWS2 medium (respiration 2, SpO2 1–2, pulse 1,
/// systolic 1, temperature 1) without crossing any threshold rule, noise included.
const UNWELL: Patient = Patient {
    hr: 105.0,
    spo2: 94.0,
    rr: 22.0,
    sys: 105.0,
    dia: 70.0,
    temp: 38.5,
};

/// How unwell the recovering patient still is at second `t`: 1 for the first sixth of the
/// recording, then falling to 0 at its middle.
fn recovery(t: i64, total: i64) -> f64 {
    let (a, b) = (total / 6, total / 2);
    1.0 - ((t - a) as f64 / (b - a) as f64).clamp(0.0, 1.0)
}

/// A monitor's pace, as the service's adaptive-monitoring commands set it.
struct Pace {
    fast: bool,
    calm_since: Option<i64>,
    /// The latest value of each NEWS2 input the service scores from this bed.
    latest: Observations,
}

impl Pace {
    /// The service's decision after a reading at second `t` (news2.rs, `adapt`).
    fn follow(&mut self, t: i64) {
        if score(&self.latest).band >= Band::Medium {
            self.fast = true;
            self.calm_since = None;
        } else if self.fast {
            let calm = *self.calm_since.get_or_insert(t);
            if t - calm >= RELAX_AFTER_S {
                self.fast = false;
                self.calm_since = None;
            }
        }
    }
}

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
    let mut paces: Vec<Pace> = (0..args.beds)
        .map(|bed| Pace {
            // The recovering patient is being watched closely when the recording starts.
            fast: bed == args.recovering_bed,
            calm_since: None,
            latest: Observations::default(),
        })
        .collect();
    let mut next_sample = vec![0i64; args.beds as usize];
    // The cuff measures once a minute, with the first monitor sample of each minute.
    let mut next_cuff = vec![0i64; args.beds as usize];
    let mut lines = Vec::new();
    for t in 0..total {
        for (bed, p) in patients.iter().enumerate() {
            let pace = &mut paces[bed];
            let bed = bed as u32;
            let (towards_patient, d) = if bed == args.sick_bed {
                (&SICK, deterioration(t, total))
            } else if bed == args.recovering_bed {
                (&UNWELL, recovery(t, total))
            } else {
                (&SICK, 0.0)
            };
            // Stagger devices so they do not all publish in the same millisecond.
            let offset_ms = (bed as i64 * 137) % 1000;
            let t_ms = t * 1000 + offset_ms;
            let ts_ms = (START_S + t) * 1000 + offset_ms;
            let to = towards_patient;
            if t >= next_sample[bed as usize] {
                let hr = towards(p.hr, to.hr, d) + rng.random_range(-2.0..2.0);
                let spo2 = (towards(p.spo2, to.spo2, d) + rng.random_range(-0.6..0.6)).min(100.0);
                let rr = towards(p.rr, to.rr, d) + rng.random_range(-1.0..1.0);
                let sys = towards(p.sys, to.sys, d) + rng.random_range(-3.0..3.0);
                let dia = towards(p.dia, to.dia, d) + rng.random_range(-2.0..2.0);
                pace.latest.pulse = Some(hr.round());
                pace.latest.spo2 = Some(spo2.round());
                pace.latest.resp_rate = Some(rr.round());
                let mut body = json!({
                    "ts": ts_ms,
                    "hr": hr.round(),
                    "spo2": spo2.round(),
                    "rr": rr.round(),
                });
                if t >= next_cuff[bed as usize] {
                    next_cuff[bed as usize] = (t / 60 + 1) * 60;
                    body["sys"] = json!(sys.round());
                    body["dia"] = json!(dia.round());
                    pace.latest.bp_systolic = Some(sys.round());
                }
                pace.follow(t);
                next_sample[bed as usize] = t + if pace.fast {
                    MONITOR_FAST_S
                } else {
                    MONITOR_SLOW_S
                };
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
                let temp = towards(p.temp, to.temp, d) + rng.random_range(-0.1..0.1);
                pace.latest.temperature = Some(round1(temp));
                pace.follow(t);
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
