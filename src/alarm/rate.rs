//! Rate-of-change rules: a metric falling (or rising) by more than a value within a window of
//! device time, e.g. systolic pressure down 40 mmHg in 10 minutes. The change is measured from
//! the highest (or lowest) reading of the window to the newest, kept in a monotonic queue so a
//! reading costs O(1) amortised.

use std::collections::VecDeque;

use super::breach::{Breach, Delay};
use super::{
    micros, reading_event, AlarmEvent, Change, PerSubject, Priority, Rule, RuleConfig, RuleKind,
    Subject,
};
use crate::model::batch::RowRef;
use crate::model::reading::Metric;

/// Readings a window keeps at most per subject: beyond, the oldest extreme is dropped (a
/// device reporting faster than this many per window is still judged, over a shorter window).
const MAX_WINDOW_READINGS: usize = 256;

#[derive(Debug, Default)]
struct State {
    breach: Breach,
    /// (device time, value), values monotonic: the extreme of the window first.
    window: VecDeque<(i64, f64)>,
}

#[derive(Debug)]
pub struct RateRule {
    name: String,
    metric: [Metric; 1],
    falling: bool,
    change: f64,
    within_us: i64,
    delay: Delay,
    hysteresis: f64,
    priority: Priority,
    subjects: PerSubject<State>,
}

impl RateRule {
    pub fn new(c: &RuleConfig) -> Self {
        let (falling, change) = match (c.fall, c.rise) {
            (Some(x), _) => (true, x),
            (None, Some(x)) => (false, x),
            (None, None) => unreachable!("checked: one of rise/fall is set"),
        };
        RateRule {
            name: c.name.get_ref().clone(),
            metric: [c.metric.expect("checked: a rate rule has a metric")],
            falling,
            change,
            within_us: micros(c.within.expect("checked: a rate rule has a window")),
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

impl Rule for RateRule {
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
        let (falling, within, delay) = (self.falling, self.within_us, self.delay);
        let state = self.subjects.get(subject.id);
        if !state.breach.in_order(r.ts) {
            return;
        }
        // Keep the window's extreme first: for a fall the highest value, for a rise the lowest.
        let dominated = |old: f64| if falling { old <= v } else { old >= v };
        while state.window.back().is_some_and(|&(_, old)| dominated(old)) {
            state.window.pop_back();
        }
        state.window.push_back((r.ts, v));
        let oldest = r.ts.saturating_sub(within);
        while state.window.front().is_some_and(|&(t, _)| t < oldest)
            || state.window.len() > MAX_WINDOW_READINGS
        {
            state.window.pop_front();
        }
        let extreme = state.window.front().map_or(v, |&(_, x)| x);
        let moved = if falling { extreme - v } else { v - extreme };
        let breached = moved >= self.change;
        let recovered = moved <= self.change - self.hysteresis;
        let step = state.breach.step(delay, r.ts, message, breached, recovered);
        let Some((active, since)) = step.change() else {
            return;
        };
        out.push(reading_event(
            &self.name,
            self.priority,
            RuleKind::Rate,
            subject,
            r,
            Change {
                active,
                since,
                value: Some(if falling { -moved } else { moved }),
                condition: if falling { "fall" } else { "rise" },
                threshold: self.change,
            },
        ));
    }

    fn restore(&mut self, subject: Subject<'_>, since: i64, last_ts: i64) {
        self.subjects.get(subject.id).breach.restore(since, last_ts);
    }
}

#[cfg(test)]
mod tests {
    use crate::alarm::testing::{engine, run};
    use crate::model::reading::Metric;

    const SYS_FALL: &str = r#"
[[rule]]
name = "sys-falling"
kind = "rate"
metric = "bp_systolic"
fall = 40
within = "10m"
hysteresis = 10
priority = "high"
"#;

    #[test]
    fn a_fall_within_the_window_raises_and_a_recovery_clears() {
        let mut e = engine(SYS_FALL);
        let got = run(
            &mut e,
            Metric::BpSystolic,
            &[
                (0, 130.0),
                (120, 125.0),
                (240, 110.0),
                (360, 95.0),
                (480, 89.0), // 41 below the 130 of 8 minutes ago
                (600, 88.0),
                (700, 100.0), // 30 below the window's 130 (still in it): past the hysteresis
            ],
        );
        assert_eq!(got, vec![(4, true), (6, false)]);
    }

    #[test]
    fn a_slow_fall_spread_beyond_the_window_does_not() {
        let mut e = engine(SYS_FALL);
        // 50 mmHg over 25 minutes: never 40 within 10.
        let readings: Vec<(i64, f64)> =
            (0..=25).map(|m| (m * 60, 130.0 - 2.0 * m as f64)).collect();
        assert!(run(&mut e, Metric::BpSystolic, &readings).is_empty());
    }

    #[test]
    fn a_rise_rule_watches_the_lowest_reading() {
        let mut e = engine(
            &SYS_FALL
                .replace("fall = 40", "rise = 30")
                .replace("bp_systolic", "heart_rate"),
        );
        let got = run(
            &mut e,
            Metric::HeartRate,
            &[(0, 80.0), (60, 70.0), (120, 95.0), (180, 101.0)],
        );
        assert_eq!(got, vec![(3, true)]);
    }
}
