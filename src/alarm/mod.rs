//! Clinical and operational alarms: the [`Rule`] trait, the engine that feeds readings to the
//! rules that watch their metric, and the alarm events they produce.
//!
//! Rules judge device time (`ts`), not arrival time, so a replayed recording raises the same
//! alarms at any replay speed. A reading flagged out of range or without sensor contact never
//! feeds a rule as if it were real.

pub mod news2;
pub mod threshold;

use serde::{Deserialize, Serialize};

use crate::model::batch::RowRef;
use std::time::Duration;

use crate::model::reading::{flags, Metric};
use toml::Spanned;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    Medium,
    Low,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Medium => "medium",
            Priority::Low => "low",
        }
    }
}

/// `[[rule]]`: a threshold alarm.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: Spanned<String>,
    pub metric: Metric,
    #[serde(default)]
    pub above: Option<f64>,
    #[serde(default)]
    pub below: Option<f64>,
    /// The condition must hold this long (device time) before the alarm is raised.
    #[serde(default, rename = "for", with = "humantime_serde")]
    pub for_: Duration,
    /// The value must come back this far past the threshold before the alarm clears.
    #[serde(default)]
    pub hysteresis: f64,
    pub priority: Priority,
}

/// A change of an alarm's state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlarmEvent {
    pub rule: String,
    pub subject: String,
    pub active: bool,
    pub priority: Priority,
    pub metric: &'static str,
    /// The value of the reading that changed the state.
    pub value: f64,
    /// `above` or `below`, and the threshold.
    pub condition: &'static str,
    pub threshold: f64,
    /// Seq of the reading that raised (or cleared) the alarm: its evidence in the store.
    pub seq: u64,
    /// Device time of that reading, µs.
    pub ts: i64,
    /// Device time the condition first held, µs.
    pub since: i64,
}

/// A rule watches readings of some metrics, keeps its own per-subject state, and reports when an
/// alarm becomes active or clears.
pub trait Rule: Send + std::fmt::Debug {
    fn name(&self) -> &str;
    /// The metrics whose readings this rule wants.
    fn metrics(&self) -> &[Metric];
    /// Looks at one trusted reading of a wanted metric; `subject` is the reading's subject, or
    /// its source when it has none.
    fn observe(&mut self, subject: &str, reading: &RowRef<'_>, out: &mut Vec<AlarmEvent>);
    /// Readings of subjects this rule could not start tracking because it tracks its maximum.
    fn subjects_untracked(&self) -> u64 {
        0
    }
}

/// Builds the rule a `[[rule]]` describes.
pub fn build(config: &RuleConfig) -> Box<dyn Rule> {
    Box::new(threshold::ThresholdRule::new(config))
}

/// Feeds each reading to the rules that watch its metric.
#[derive(Debug)]
pub struct AlarmEngine {
    rules: Vec<Box<dyn Rule>>,
    news2: Option<news2::News2Tracker>,
    /// Rule indices by metric index.
    by_metric: Vec<Vec<usize>>,
    events: Vec<AlarmEvent>,
}

impl AlarmEngine {
    pub fn new(rules: Vec<Box<dyn Rule>>) -> Self {
        let mut by_metric = vec![Vec::new(); Metric::ALL.len()];
        for (i, r) in rules.iter().enumerate() {
            for m in r.metrics() {
                by_metric[*m as usize].push(i);
            }
        }
        AlarmEngine {
            rules,
            news2: None,
            by_metric,
            events: Vec::new(),
        }
    }

    /// Scores NEWS2 too, with `tracker`.
    pub fn with_news2(mut self, tracker: Option<news2::News2Tracker>) -> Self {
        self.news2 = tracker;
        self
    }

    /// Feeds one reading (and its text, for consciousness) to the NEWS2 tracker: its subject's
    /// new score, when it changed.
    pub fn observe_news2(
        &mut self,
        r: &RowRef<'_>,
        text: Option<&str>,
    ) -> Option<news2::News2Update> {
        let tracker = self.news2.as_mut()?;
        tracker.observe(
            r.subject.unwrap_or(r.source),
            &news2::Observation {
                metric: r.metric,
                value: r.value,
                text,
                ts: r.ts,
                seq: r.seq,
                flags: r.flags,
            },
        )
    }

    pub fn from_config(rules: &[RuleConfig]) -> Self {
        Self::new(rules.iter().map(build).collect())
    }

    /// Readings whose subject some rule could not track (bounded state), in total.
    pub fn subjects_untracked(&self) -> u64 {
        self.rules
            .iter()
            .map(|r| r.subjects_untracked())
            .sum::<u64>()
            + self.news2.as_ref().map_or(0, |t| t.untracked())
    }

    /// Looks at one reading; returns the alarm changes it caused.
    pub fn observe(&mut self, r: &RowRef<'_>) -> std::vec::Drain<'_, AlarmEvent> {
        self.events.clear();
        let watchers = &self.by_metric[r.metric as usize];
        if !watchers.is_empty() && r.flags & flags::UNTRUSTED == 0 && r.value.is_some() {
            let subject = r.subject.unwrap_or(r.source);
            for &i in watchers {
                self.rules[i].observe(subject, r, &mut self.events);
            }
        }
        self.events.drain(..)
    }
}
