//! Threshold rules: a metric above or below a value for a while raises an alarm; coming back past
//! the threshold by the hysteresis clears it.

use std::collections::HashMap;

use super::{AlarmEvent, Priority, Rule, RuleConfig};
use crate::model::batch::RowRef;
use crate::model::reading::Metric;

#[derive(Debug, Default, Clone, Copy)]
struct SubjectState {
    /// Device time the condition first held in the current breach.
    breach_since: Option<i64>,
    active: bool,
}

#[derive(Debug)]
pub struct ThresholdRule {
    name: String,
    metric: [Metric; 1],
    above: bool,
    threshold: f64,
    for_us: i64,
    hysteresis: f64,
    priority: Priority,
    /// Only subjects in breach or alarm: at most [`MAX_SUBJECTS`].
    subjects: HashMap<Box<str>, SubjectState>,
    untracked: u64,
}

/// Subjects come from topics and payloads: a flood of new ones must not grow memory without
/// bound. A ward has tens of subjects; a depot hundreds.
pub const MAX_SUBJECTS: usize = 10_000;

impl ThresholdRule {
    pub fn new(c: &RuleConfig) -> Self {
        let (above, threshold) = match (c.above, c.below) {
            (Some(t), _) => (true, t),
            (None, Some(t)) => (false, t),
            (None, None) => unreachable!("validated: one of above/below is set"),
        };
        ThresholdRule {
            name: c.name.get_ref().clone(),
            metric: [c.metric],
            above,
            threshold,
            for_us: c.for_.as_micros().min(i64::MAX as u128) as i64,
            hysteresis: c.hysteresis,
            priority: c.priority,
            subjects: HashMap::new(),
            untracked: 0,
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

    fn event(&self, subject: &str, r: &RowRef<'_>, v: f64, active: bool, since: i64) -> AlarmEvent {
        AlarmEvent {
            rule: self.name.clone(),
            subject: subject.to_owned(),
            active,
            priority: self.priority,
            metric: self.metric[0].name(),
            value: v,
            condition: if self.above { "above" } else { "below" },
            threshold: self.threshold,
            seq: r.seq,
            ts: r.ts,
            since,
        }
    }
}

impl Rule for ThresholdRule {
    fn name(&self) -> &str {
        &self.name
    }

    fn subjects_untracked(&self) -> u64 {
        self.untracked
    }

    fn metrics(&self) -> &[Metric] {
        &self.metric
    }

    fn observe(&mut self, subject: &str, r: &RowRef<'_>, out: &mut Vec<AlarmEvent>) {
        let Some(v) = r.value else { return };
        let mut state = self.subjects.get(subject).copied().unwrap_or_default();
        let before = state;
        if state.active {
            if self.recovered(v) {
                out.push(self.event(subject, r, v, false, state.breach_since.unwrap_or(r.ts)));
                state = SubjectState::default();
            }
        } else if self.breached(v) {
            let since = *state.breach_since.get_or_insert(r.ts);
            if r.ts.saturating_sub(since) >= self.for_us {
                state.active = true;
                out.push(self.event(subject, r, v, true, since));
            }
        } else {
            state.breach_since = None;
        }
        if state.active != before.active || state.breach_since != before.breach_since {
            if state.active || state.breach_since.is_some() {
                if self.subjects.len() >= MAX_SUBJECTS && !self.subjects.contains_key(subject) {
                    self.untracked += 1;
                    // The event this reading produced (only a raise with a zero `for` can
                    // happen here) would have no clear: withdraw it.
                    out.retain(|e| e.subject != subject);
                    return;
                }
                self.subjects.insert(subject.into(), state);
            } else {
                self.subjects.remove(subject);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alarm::AlarmEngine;
    use crate::model::reading::flags;

    fn engine(rule: &str) -> AlarmEngine {
        #[derive(serde::Deserialize)]
        struct Rules {
            rule: Vec<RuleConfig>,
        }
        let c: Rules = toml::from_str(rule).unwrap();
        AlarmEngine::from_config(&c.rule)
    }

    fn reading(seq: u64, ts_s: i64, value: f64) -> RowRef<'static> {
        RowRef {
            seq,
            ts: ts_s * 1_000_000,
            received: 0,
            source: "dev",
            subject: Some("bed-1"),
            metric: Metric::Spo2,
            value: Some(value),
            flags: 0,
        }
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
        readings
            .iter()
            .enumerate()
            .flat_map(|(i, &(t, v))| {
                e.observe(&reading(i as u64, t, v))
                    .map(|ev| (ev.seq, ev.active))
                    .collect::<Vec<_>>()
            })
            .collect()
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
        for untrusted in [flags::NO_CONTACT, flags::CLOCK_SUSPECT, flags::OUT_OF_RANGE] {
            r.flags = untrusted;
            assert_eq!(e.observe(&r).count(), 0, "flags {untrusted:#x}");
        }
        r.flags = 0;
        let ev: Vec<_> = e.observe(&r).collect();
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
            assert_eq!(e.observe(&r).count(), 0, "the 30 s delay has not passed");
        }
        assert_eq!(e.subjects_untracked(), 5);
        // A tracked subject still raises its alarm.
        let r = RowRef {
            subject: Some("bed-3"),
            ..reading(1, 40, 80.0)
        };
        assert_eq!(e.observe(&r).count(), 1);
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
        assert_eq!(e.observe(&a).count(), 1);
        assert_eq!(e.observe(&b).count(), 0);
        assert_eq!(e.observe(&a).count(), 0, "already active");
    }
}
