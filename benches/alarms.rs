//! The rule engine and NEWS2 cost per reading on one core: `cargo bench --bench alarms`.
//!
//! 20 rules of every reading kind (threshold, rate of change, anomaly, flagged runs) over the
//! NEWS2 inputs, NEWS2 scoring on, and 1,000 subjects, each sending a monitor message of heart
//! rate, SpO2, respiration rate and systolic pressure every 10 s of device time, mostly normal,
//! with some subjects drifting out of range (so breaches start, hold and clear). Each pass moves
//! device time on, as a live ward does. The target (issue 9) is 5 M readings/s.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use iomt_edge::alarm::{AlarmEngine, RuleConfig};
use iomt_edge::model::batch::RowRef;
use iomt_edge::model::reading::Metric;

const SUBJECTS: usize = 1_000;
const ROUNDS: i64 = 30;

fn rules() -> Vec<RuleConfig> {
    #[derive(serde::Deserialize)]
    struct Rules {
        rule: Vec<RuleConfig>,
    }
    let mut text = String::new();
    let thresholds = [
        ("spo2", "below", 92.0),
        ("spo2", "below", 88.0),
        ("heart_rate", "above", 130.0),
        ("heart_rate", "below", 40.0),
        ("heart_rate", "above", 110.0),
        ("resp_rate", "above", 24.0),
        ("resp_rate", "below", 8.0),
        ("bp_systolic", "below", 90.0),
        ("bp_systolic", "above", 220.0),
        ("bp_systolic", "below", 100.0),
    ];
    for (i, (m, dir, v)) in thresholds.iter().enumerate() {
        text += &format!(
            "[[rule]]\nname = \"t{i}\"\nmetric = \"{m}\"\n{dir} = {v}\nfor = \"30s\"\nhysteresis = 2\npriority = \"high\"\n"
        );
    }
    for (i, (m, dir, v)) in [
        ("bp_systolic", "fall", 40.0),
        ("heart_rate", "rise", 30.0),
        ("spo2", "fall", 5.0),
        ("resp_rate", "rise", 10.0),
    ]
    .iter()
    .enumerate()
    {
        text += &format!(
            "[[rule]]\nname = \"r{i}\"\nkind = \"rate\"\nmetric = \"{m}\"\n{dir} = {v}\nwithin = \"10m\"\npriority = \"medium\"\n"
        );
    }
    for (i, m) in ["heart_rate", "spo2", "resp_rate", "bp_systolic"]
        .iter()
        .enumerate()
    {
        text += &format!(
            "[[rule]]\nname = \"a{i}\"\nkind = \"anomaly\"\nmetric = \"{m}\"\nmin_deviation = 5\nwarmup = 10\nfor = \"20s\"\npriority = \"low\"\n"
        );
    }
    for (i, m) in ["spo2", "heart_rate"].iter().enumerate() {
        text += &format!(
            "[[rule]]\nname = \"f{i}\"\nkind = \"flagged\"\nmetric = \"{m}\"\npriority = \"low\"\n"
        );
    }
    let rules = toml::from_str::<Rules>(&text).unwrap().rule;
    assert_eq!(rules.len(), 20);
    for r in &rules {
        r.check().unwrap();
    }
    rules
}

struct Row {
    subject: usize,
    metric: Metric,
    value: f64,
    ts: i64,
    message: u64,
}

fn readings(subjects: &[String]) -> Vec<Row> {
    let mut out = Vec::new();
    let mut message = 0;
    for round in 0..ROUNDS {
        for s in 0..subjects.len() {
            message += 1;
            // One in ten subjects deteriorates over the rounds.
            let drift = if s % 10 == 0 { round as f64 } else { 0.0 };
            let wobble = ((s as i64 * 7 + round * 3) % 5) as f64 - 2.0;
            for (metric, value) in [
                (Metric::HeartRate, 72.0 + wobble + 2.5 * drift),
                (Metric::Spo2, 97.0 - 0.4 * drift + wobble * 0.2),
                (Metric::RespRate, 16.0 + wobble * 0.5 + 0.5 * drift),
                (Metric::BpSystolic, 122.0 + wobble - 2.0 * drift),
            ] {
                out.push(Row {
                    subject: s,
                    metric,
                    value,
                    ts: 1_700_000_000_000_000 + round * 10_000_000 + s as i64 * 1_000,
                    message,
                });
            }
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let rules = rules();
    let subjects: Vec<String> = (0..SUBJECTS).map(|i| format!("w4-b{i}")).collect();
    let rows = readings(&subjects);
    let span = ROUNDS * 10_000_000;
    let mut group = c.benchmark_group("alarms");
    group.throughput(Throughput::Elements(rows.len() as u64));
    for news2 in [false, true] {
        let name = if news2 {
            "20-rules-news2-1000-subjects"
        } else {
            "20-rules-1000-subjects"
        };
        let options = iomt_edge::alarm::news2::News2Options::default();
        let mut engine =
            AlarmEngine::from_config(&rules).with_news2(if news2 { options.build() } else { None });
        let mut pass = 0i64;
        let mut raised = 0u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                let offset = pass * span;
                pass += 1;
                for r in &rows {
                    let row = RowRef {
                        seq: r.message,
                        ts: r.ts + offset,
                        received: r.ts + offset,
                        source: "mon",
                        subject: Some(&subjects[r.subject]),
                        metric: r.metric,
                        value: Some(r.value),
                        flags: 0,
                    };
                    raised += engine.observe(&row, r.message + offset as u64).count() as u64;
                    if news2 {
                        engine.observe_news2(&row, None);
                        // A monitor message carries four readings: scored once it is in.
                        if r.metric == Metric::BpSystolic {
                            raised += engine.score_news2().len() as u64;
                        }
                    }
                }
            })
        });
        // The rules did raise and clear: the bench times real work, not early exits.
        assert!(raised > 0, "{name}: no alarm changed");
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
