//! Threshold rules: a metric above or below a value for a while raises an alarm; coming back past
//! the threshold by the hysteresis clears it.

use super::breach::{Breach, Delay};
use super::{
    reading_event, AlarmEvent, Change, PerSubject, Priority, Rule, RuleConfig, RuleKind, Subject,
};
use crate::model::batch::RowRef;
use crate::model::reading::Metric;

#[derive(Debug)]
pub struct ThresholdRule {
    name: String,
    metric: [Metric; 1],
    above: bool,
    threshold: f64,
    delay: Delay,
    hysteresis: f64,
    priority: Priority,
    subjects: PerSubject<Breach>,
}

impl ThresholdRule {
    pub fn new(c: &RuleConfig) -> Self {
        let (above, threshold) = match (c.above, c.below) {
            (Some(t), _) => (true, t),
            (None, Some(t)) => (false, t),
            (None, None) => unreachable!("checked: one of above/below is set"),
        };
        ThresholdRule {
            name: c.name.get_ref().clone(),
            metric: [c.metric.expect("checked: a threshold rule has a metric")],
            above,
            threshold,
            delay: Delay {
                for_us: c.for_us(),
                max_gap_us: c.max_gap_us(),
            },
            hysteresis: c.hysteresis,
            priority: c.priority,
            subjects: PerSubject::new(),
        }
    }

    fn breached(&self, v: f64) -> bool {
        if self.above {
            v > self.threshold
        } else {
            v < self.threshold
        }
    }

    fn recovered(&self, v: f64) -> bool {
        if self.above {
            v <= self.threshold - self.hysteresis
        } else {
            v >= self.threshold + self.hysteresis
        }
    }
}

impl Rule for ThresholdRule {
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
        let Some(v) = r.value else { return };
        let (breached, recovered) = (self.breached(v), self.recovered(v));
        let delay = self.delay;
        let step = self
            .subjects
            .get(subject.id)
            .step(delay, r.ts, message, breached, recovered);
        let Some((active, since)) = step.change() else {
            return;
        };
        out.push(reading_event(
            &self.name,
            self.priority,
            RuleKind::Threshold,
            subject,
            r,
            Change {
                active,
                since,
                value: Some(v),
                condition: if self.above { "above" } else { "below" },
                threshold: self.threshold,
            },
        ));
    }

    fn restore(&mut self, subject: Subject<'_>, since: i64, last_ts: i64) {
        self.subjects.get(subject.id).restore(since, last_ts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alarm::testing::engine;
    use crate::alarm::{AlarmEngine, MAX_SUBJECTS};
    use crate::model::reading::flags;

    fn reading(seq: u64, ts_s: i64, value: f64) -> RowRef<'static> {
        crate::alarm::testing::reading(Metric::Spo2, seq, ts_s, value)
    }

    const SPO2_LOW: &str = r#"
[[rule]]
name = "spo2-low"
metric = "spo2"
below = 92
for = "30s"
hysteresis = 2
priority = "high"
"#;

    fn run(e: &mut AlarmEngine, readings: &[(i64, f64)]) -> Vec<(u64, bool)> {
        crate::alarm::testing::run(e, Metric::Spo2, readings)
    }

    #[test]
    fn raises_after_the_delay_and_clears_past_the_hysteresis() {
        let mut e = engine(SPO2_LOW);
        let got = run(
            &mut e,
            &[
                (0, 95.0),
                (10, 91.0),
                (20, 90.0),
                (39, 90.0),
                (40, 89.0),
                (50, 92.5),
                (60, 94.0),
                (70, 95.0),
            ],
        );
        // Breach starts at t=10; raised by the reading at t=40 (seq 4); 92.5 is inside the
        // hysteresis band; 94 clears (seq 6).
        assert_eq!(got, vec![(4, true), (6, false)]);
    }

    #[test]
    fn a_breach_that_ends_early_raises_nothing() {
        let mut e = engine(SPO2_LOW);
        assert!(run(
            &mut e,
            &[(0, 90.0), (20, 90.0), (25, 93.0), (40, 90.0), (60, 90.0)]
        )
        .is_empty());
    }

    #[test]
    fn untrusted_readings_never_feed_a_rule() {
        let mut e = engine(SPO2_LOW.replace("30s", "0s").as_str());
        let mut r = reading(1, 0, 50.0);
        for untrusted in [
            flags::NO_CONTACT,
            flags::CLOCK_SUSPECT,
            flags::OUT_OF_RANGE,
            flags::QUESTIONABLE,
            flags::INVALID,
            flags::TEST_DATA,
        ] {
            r.flags = untrusted;
            assert_eq!(e.observe(&r, 1).count(), 0, "flags {untrusted:#x}");
        }
        r.flags = 0;
        let ev: Vec<_> = e.observe(&r, 1).collect();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].subject, "bed-1");
        assert_eq!(ev[0].priority, Priority::High);
        assert_eq!(ev[0].condition, "below");
    }

    #[test]
    fn the_subjects_a_rule_tracks_are_bounded() {
        let mut e = engine(SPO2_LOW);
        for i in 0..MAX_SUBJECTS + 5 {
            let subject = format!("bed-{i}");
            let r = RowRef {
                subject: Some(&subject),
                ..reading(i as u64, 0, 80.0)
            };
            assert_eq!(
                e.observe(&r, i as u64).count(),
                0,
                "the 30 s delay has not passed"
            );
        }
        assert_eq!(e.subjects_untracked(), 5);
        // A tracked subject still raises its alarm.
        let r = RowRef {
            subject: Some("bed-3"),
            ..reading(1, 40, 80.0)
        };
        assert_eq!(e.observe(&r, 1 << 40).count(), 1);
    }

    #[test]
    fn subjects_are_independent() {
        let mut e = engine(SPO2_LOW.replace("30s", "0s").as_str());
        let a = reading(1, 0, 80.0);
        let b = RowRef {
            subject: Some("bed-2"),
            seq: 2,
            ..reading(2, 0, 99.0)
        };
        assert_eq!(e.observe(&a, 1).count(), 1);
        assert_eq!(e.observe(&b, 2).count(), 0);
        assert_eq!(e.observe(&a, 3).count(), 0, "already active");
    }
}
