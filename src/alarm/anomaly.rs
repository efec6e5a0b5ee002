//! Anomaly rules: a reading far from the subject's own baseline for that metric, so a patient
//! whose normal heart rate is 48 is judged against 48, not against a ward-wide number.
//!
//! The baseline is an exponentially weighted mean and variance (West's incremental form), after
//! a warm-up of plain running mean and variance over the first readings; the rule cannot fire
//! before the warm-up is over. Far is `deviations` standard deviations, and never less than
//! `min_deviation` (a baseline that barely varies would otherwise call every wobble an
//! anomaly). The baseline does not learn from readings in breach or while the alarm is raised:
//! a patient drifting into trouble must not become the new normal.

use super::breach::{Breach, Delay};
use super::{
    reading_event, AlarmEvent, Change, PerSubject, Priority, Rule, RuleConfig, RuleKind, Subject,
};
use crate::model::batch::RowRef;
use crate::model::reading::Metric;

const DEFAULT_DEVIATIONS: f64 = 4.0;
const DEFAULT_WARMUP: u32 = 30;
const DEFAULT_SMOOTHING: f64 = 0.05;

#[derive(Debug, Default)]
struct State {
    breach: Breach,
    n: u32,
    mean: f64,
    /// Variance (after the warm-up), or the running sum of squared deviations (during it).
    var: f64,
}

#[derive(Debug)]
pub struct AnomalyRule {
    name: String,
    metric: [Metric; 1],
    deviations: f64,
    min_deviation: f64,
    warmup: u32,
    alpha: f64,
    delay: Delay,
    hysteresis: f64,
    priority: Priority,
    subjects: PerSubject<State>,
}

impl AnomalyRule {
    pub fn new(c: &RuleConfig) -> Self {
        AnomalyRule {
            name: c.name.get_ref().clone(),
            metric: [c.metric.expect("checked: an anomaly rule has a metric")],
            deviations: c.deviations.unwrap_or(DEFAULT_DEVIATIONS),
            min_deviation: c.min_deviation.unwrap_or(0.0),
            warmup: c.warmup.unwrap_or(DEFAULT_WARMUP),
            alpha: c.smoothing.unwrap_or(DEFAULT_SMOOTHING),
            delay: Delay {
                for_us: c.for_us(),
                max_gap_us: c.max_gap_us(),
            },
            hysteresis: c.hysteresis,
            priority: c.priority,
            subjects: PerSubject::new(),
        }
    }
}

fn learn(s: &mut State, v: f64, warmup: u32, alpha: f64) {
    if s.n < warmup {
        // Welford: exact mean and sum of squares over the warm-up.
        s.n += 1;
        let d = v - s.mean;
        s.mean += d / f64::from(s.n);
        s.var += d * (v - s.mean);
        if s.n == warmup {
            s.var /= f64::from(s.n - 1);
        }
    } else {
        let d = v - s.mean;
        s.mean += alpha * d;
        s.var = (1.0 - alpha) * (s.var + alpha * d * d);
    }
}

impl Rule for AnomalyRule {
    fn name(&self) -> &str {
        &self.name
    }

    fn metrics(&self) -> &[Metric] {
        &self.metric
    }

    fn observe(
        &mut self,
        subject: Subject<'_>,
        message: u64,
        r: &RowRef<'_>,
        out: &mut Vec<AlarmEvent>,
    ) {
        let Some(v) = r.value.filter(|v| v.is_finite()) else {
            return;
        };
        let (warmup, alpha, delay) = (self.warmup, self.alpha, self.delay);
        let (deviations, min_deviation, hysteresis) =
            (self.deviations, self.min_deviation, self.hysteresis);
        let state = self.subjects.get(subject.id);
        if !state.breach.in_order(r.ts) {
            return;
        }
        if state.n < warmup {
            state.breach.last_ts = r.ts;
            learn(state, v, warmup, alpha);
            return;
        }
        let limit = (deviations * state.var.sqrt()).max(min_deviation);
        let distance = (v - state.mean).abs();
        let breached = distance > limit;
        let recovered = distance <= limit - hysteresis;
        let mean = state.mean;
        let step = state.breach.step(delay, r.ts, message, breached, recovered);
        if !breached && !state.breach.active && state.breach.since.is_none() {
            learn(state, v, warmup, alpha);
        }
        let Some((active, since)) = step.change() else {
            return;
        };
        out.push(reading_event(
            &self.name,
            self.priority,
            RuleKind::Anomaly,
            subject,
            r,
            Change {
                active,
                since,
                value: Some(v),
                condition: "anomaly",
                // The baseline the reading was judged against.
                threshold: mean,
            },
        ));
    }

    fn restore(&mut self, subject: Subject<'_>, since: i64, last_ts: i64) {
        // The baseline is not kept across a restart: the rule warms up again, and meanwhile a
        // restored alarm can only be cleared by its acknowledgement or by a reading in range.
        self.subjects.get(subject.id).breach.restore(since, last_ts);
    }
}

#[cfg(test)]
mod tests {
    use crate::alarm::testing::{engine, run};
    use crate::model::reading::Metric;

    const HR_ANOMALY: &str = r#"
[[rule]]
name = "hr-anomaly"
kind = "anomaly"
metric = "heart_rate"
deviations = 4
min_deviation = 10
warmup = 20
for = "30s"
hysteresis = 2
priority = "medium"
"#;

    /// A baseline around `base` (±2) for 20 readings, then `then`.
    fn patient(base: f64, then: &[f64]) -> Vec<(i64, f64)> {
        let mut r: Vec<(i64, f64)> = (0..20)
            .map(|i| (i * 10, base + [-2.0, 0.0, 2.0, 1.0, -1.0][i as usize % 5]))
            .collect();
        r.extend(
            then.iter()
                .enumerate()
                .map(|(i, &v)| (200 + i as i64 * 10, v)),
        );
        r
    }

    #[test]
    fn a_reading_far_from_the_subjects_own_baseline_is_an_anomaly() {
        // 48 is normal for this patient; 70 is not.
        let mut e = engine(HR_ANOMALY);
        let got = run(
            &mut e,
            Metric::HeartRate,
            &patient(48.0, &[49.0, 70.0, 72.0, 71.0, 73.0, 50.0]),
        );
        assert_eq!(got, vec![(24, true), (25, false)], "raised once held 30 s");
        // For a patient whose normal is 90, 70 is just as far: the same rule, the same verdict,
        // about the other baseline.
        let mut e = engine(HR_ANOMALY);
        let got = run(
            &mut e,
            Metric::HeartRate,
            &patient(90.0, &[89.0, 91.0, 92.0, 90.0]),
        );
        assert!(got.is_empty(), "90 is this patient's normal");
    }

    #[test]
    fn nothing_fires_during_the_warm_up() {
        let mut e = engine(HR_ANOMALY);
        let readings: Vec<(i64, f64)> = (0..19)
            .map(|i| (i * 10, if i % 2 == 0 { 40.0 } else { 140.0 }))
            .collect();
        assert!(run(&mut e, Metric::HeartRate, &readings).is_empty());
    }
}
