//! Clinical and technical alarms: the rules of the pipeline file (`[[rule]]`), the engine that
//! feeds readings to the rules that watch their metric, and the condition changes they report.
//! What happens to an alarm once raised (acknowledgement, latching, escalation) is
//! [`lifecycle`]'s job.
//!
//! Rules judge device time (`ts`), not arrival time, so a replayed recording raises the same
//! alarms at any replay speed. Device clocks are also the easiest thing to get wrong or forge,
//! so a condition's delay must be backed by readings actually received over it ([`breach`]).
//! A reading flagged out of range, without contact, invalid, questionable or as test data never
//! feeds a clinical rule; a run of them may raise a technical alarm ([`flagged`]).

pub mod anomaly;
pub mod breach;
pub mod flagged;
pub mod lifecycle;
pub mod news2;
pub mod rate;
pub mod silence;
pub mod threshold;

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::model::batch::RowRef;
use crate::model::reading::{flags, Metric, ValueKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    Medium,
    High,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Medium => "medium",
            Priority::Low => "low",
        }
    }

    /// One step up, as an escalation raises it.
    pub fn raised(self) -> Priority {
        match self {
            Priority::Low => Priority::Medium,
            _ => Priority::High,
        }
    }
}

/// What a rule watches for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    /// A metric above or below a value.
    #[default]
    Threshold,
    /// A metric rising or falling by more than a value within a window.
    Rate,
    /// A reading far from the subject's own baseline for that metric.
    Anomaly,
    /// A subject's NEWS2 band reaching a level.
    News2,
    /// A device or a subject's metric not heard from (technical, service clock).
    Silence,
    /// A run of flagged readings (technical).
    Flagged,
}

impl RuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Threshold => "threshold",
            RuleKind::Rate => "rate",
            RuleKind::Anomaly => "anomaly",
            RuleKind::News2 => "news2",
            RuleKind::Silence => "silence",
            RuleKind::Flagged => "flagged",
        }
    }

    /// Technical alarms are about the equipment, not the patient.
    pub fn technical(self) -> bool {
        matches!(self, RuleKind::Silence | RuleKind::Flagged)
    }
}

/// Whom a silence rule watches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SilenceScope {
    #[default]
    Subject,
    Source,
}

/// `[[rule]]`: one alarm rule. Which keys apply depends on `kind` (README, Alarms); a key of
/// another kind is refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: Spanned<String>,
    #[serde(default)]
    pub kind: RuleKind,
    pub priority: Priority,
    #[serde(default)]
    pub metric: Option<Metric>,
    /// threshold
    #[serde(default)]
    pub above: Option<f64>,
    #[serde(default)]
    pub below: Option<f64>,
    /// rate: a change of at least this much within `within`.
    #[serde(default)]
    pub rise: Option<f64>,
    #[serde(default)]
    pub fall: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    pub within: Option<Duration>,
    /// anomaly: how many standard deviations from the baseline is far.
    #[serde(default)]
    pub deviations: Option<f64>,
    /// anomaly: never call a distance below this far (units of the metric).
    #[serde(default)]
    pub min_deviation: Option<f64>,
    /// anomaly: readings that build the baseline before the rule may fire.
    #[serde(default)]
    pub warmup: Option<u32>,
    /// anomaly: weight of a new reading in the baseline (0–1).
    #[serde(default)]
    pub smoothing: Option<f64>,
    /// news2: the band that raises the alarm.
    #[serde(default)]
    pub band: Option<news2::Band>,
    /// silence: not heard from for this long.
    #[serde(default, with = "humantime_serde")]
    pub after: Option<Duration>,
    #[serde(default)]
    pub per: Option<SilenceScope>,
    /// flagged: this many flagged readings in a row.
    #[serde(default)]
    pub count: Option<u32>,
    /// The condition must hold this long (device time), backed by readings, before the alarm
    /// is raised.
    #[serde(default, rename = "for", with = "humantime_serde")]
    pub for_: Duration,
    /// Readings of a breach further apart than this (device time) start it again: a delay is
    /// only held over time the rule heard the subject.
    #[serde(default, with = "humantime_serde")]
    pub max_gap: Option<Duration>,
    /// The value must come back this far before the condition clears (for a news2 rule of band
    /// medium or high: the total must be this many points below the band's lowest total, 5 or
    /// 7).
    #[serde(default)]
    pub hysteresis: f64,
    /// A latched alarm stays active until acknowledged, even once its condition clears.
    #[serde(default)]
    pub latching: bool,
    /// An alarm nobody acknowledges within this time escalates (priority up, and a message on
    /// `alarms/<site>/escalated`), again after each such time.
    #[serde(default, with = "humantime_serde")]
    pub escalate_after: Option<Duration>,
}

/// Default for `max_gap`: a bedside monitor reports far more often; a spot-check device that
/// reports less often than this cannot hold a delay.
pub const DEFAULT_MAX_GAP: Duration = Duration::from_secs(5 * 60);

impl RuleConfig {
    /// What is wrong with this rule, as its key and a message.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let set: [(&'static str, bool); 16] = [
            ("metric", self.metric.is_some()),
            ("above", self.above.is_some()),
            ("below", self.below.is_some()),
            ("rise", self.rise.is_some()),
            ("fall", self.fall.is_some()),
            ("within", self.within.is_some()),
            ("deviations", self.deviations.is_some()),
            ("min_deviation", self.min_deviation.is_some()),
            ("warmup", self.warmup.is_some()),
            ("smoothing", self.smoothing.is_some()),
            ("band", self.band.is_some()),
            ("after", self.after.is_some()),
            ("per", self.per.is_some()),
            ("count", self.count.is_some()),
            ("for", !self.for_.is_zero() || self.max_gap.is_some()),
            ("hysteresis", self.hysteresis != 0.0),
        ];
        let allowed: &[&str] = match self.kind {
            RuleKind::Threshold => &["metric", "above", "below", "for", "hysteresis"],
            RuleKind::Rate => &["metric", "rise", "fall", "within", "for", "hysteresis"],
            RuleKind::Anomaly => &[
                "metric",
                "deviations",
                "min_deviation",
                "warmup",
                "smoothing",
                "for",
                "hysteresis",
            ],
            RuleKind::News2 => &["band", "hysteresis"],
            RuleKind::Silence => &["metric", "after", "per"],
            RuleKind::Flagged => &["metric", "count"],
        };
        let kind = self.kind.as_str();
        if let Some((key, _)) = set.iter().find(|(k, on)| *on && !allowed.contains(k)) {
            let key = if *key == "for" && self.for_.is_zero() {
                "max_gap"
            } else {
                key
            };
            return Err((key, format!("is not a key of a {kind} rule")));
        }
        let needs_metric = matches!(
            self.kind,
            RuleKind::Threshold | RuleKind::Rate | RuleKind::Anomaly
        );
        if needs_metric && self.metric.is_none() {
            return Err(("metric", format!("a {kind} rule needs a metric")));
        }
        if let Some(m) = self.metric {
            if self.kind != RuleKind::Silence
                && self.kind != RuleKind::Flagged
                && m.info().kind != ValueKind::Numeric
            {
                return Err(("metric", format!("{m} has no numeric value")));
            }
        }
        let finite = |key: &'static str, v: Option<f64>, positive: bool| match v {
            Some(x) if !x.is_finite() || (positive && x <= 0.0) => Err((
                key,
                if positive {
                    "must be a finite number above 0".to_owned()
                } else {
                    "must be a finite number".to_owned()
                },
            )),
            _ => Ok(()),
        };
        match self.kind {
            RuleKind::Threshold => {
                if self.above.is_some() == self.below.is_some() {
                    return Err(("above", "set exactly one of `above` and `below`".into()));
                }
                finite("above", self.above, false)?;
                finite("below", self.below, false)?;
            }
            RuleKind::Rate => {
                if self.rise.is_some() == self.fall.is_some() {
                    return Err(("rise", "set exactly one of `rise` and `fall`".into()));
                }
                finite("rise", self.rise, true)?;
                finite("fall", self.fall, true)?;
                if self.within.is_none_or(|w| w.is_zero()) {
                    return Err(("within", "a rate rule needs a window above zero".into()));
                }
            }
            RuleKind::Anomaly => {
                finite("deviations", self.deviations, true)?;
                finite("min_deviation", self.min_deviation, false)?;
                if self.min_deviation.is_some_and(|m| m < 0.0) {
                    return Err(("min_deviation", "must be >= 0".into()));
                }
                if self.smoothing.is_some_and(|s| !(s > 0.0 && s < 1.0)) {
                    return Err(("smoothing", "must lie between 0 and 1".into()));
                }
                if self.warmup.is_some_and(|w| w < 2) {
                    return Err(("warmup", "must be at least 2 readings".into()));
                }
            }
            RuleKind::News2 => match self.band {
                None => return Err(("band", "a news2 rule needs a band".into())),
                Some(news2::Band::Low) => {
                    return Err((
                        "band",
                        "`low` holds for every scored subject: use low-medium, medium or high"
                            .into(),
                    ))
                }
                _ => {}
            },
            RuleKind::Silence => {
                if self.after.is_none_or(|a| a.is_zero()) {
                    return Err(("after", "a silence rule needs a time above zero".into()));
                }
            }
            RuleKind::Flagged => {
                if self.count == Some(0) {
                    return Err(("count", "must be at least 1".into()));
                }
            }
        }
        if !(self.hysteresis >= 0.0 && self.hysteresis.is_finite()) {
            return Err(("hysteresis", "must be a finite number >= 0".into()));
        }
        if self.escalate_after.is_some_and(|d| d.is_zero()) {
            return Err(("escalate_after", "must be above zero".into()));
        }
        Ok(())
    }

    fn for_us(&self) -> i64 {
        micros(self.for_)
    }

    fn max_gap_us(&self) -> i64 {
        micros(self.max_gap.unwrap_or(DEFAULT_MAX_GAP))
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// The reading behind an alarm, whole: an alarm message stands alone with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvidenceReading {
    pub seq: u64,
    /// Device time, µs.
    pub ts: i64,
    /// Receive time, µs.
    pub received: i64,
    pub source: String,
    pub metric: String,
    pub value: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

impl EvidenceReading {
    pub fn of(r: &RowRef<'_>) -> Self {
        EvidenceReading {
            seq: r.seq,
            ts: r.ts,
            received: r.received,
            source: r.source.to_owned(),
            metric: r.metric.name().to_owned(),
            value: r.value,
            flags: flags::names(r.flags)
                .into_iter()
                .map(str::to_owned)
                .collect(),
        }
    }
}

/// A change of a rule's condition for one subject: it began to hold (and held for the rule's
/// delay), or it stopped holding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlarmEvent {
    pub rule: String,
    pub subject: String,
    /// The device whose readings changed the condition (none for NEWS2 and silence rules,
    /// which judge the subject, or a device, as a whole).
    #[serde(default)]
    pub source: Option<String>,
    pub active: bool,
    pub priority: Priority,
    pub kind: RuleKind,
    pub metric: Option<String>,
    /// The value that changed the condition (a reading's, a change's, a score's, or seconds of
    /// silence).
    pub value: Option<f64>,
    /// `above`, `below`, `rise`, `fall`, `anomaly`, `band`, `silent` or `flagged`.
    pub condition: String,
    pub threshold: f64,
    /// Seq of the reading that changed the condition: its evidence in the store.
    pub seq: Option<u64>,
    /// Device time of that reading (service time for a silence), µs.
    pub ts: i64,
    /// Device time the condition first held, µs.
    pub since: i64,
    pub evidence: Option<EvidenceReading>,
}

/// What a reading rule says changed: everything of an [`AlarmEvent`] that differs by rule.
pub struct Change {
    pub active: bool,
    pub since: i64,
    pub value: Option<f64>,
    pub condition: &'static str,
    pub threshold: f64,
}

/// The event of a reading rule's condition change for `subject`, with reading `r`, of
/// `metric`, as its evidence.
pub fn reading_event(
    rule: &str,
    priority: Priority,
    kind: RuleKind,
    subject: Subject<'_>,
    r: &RowRef<'_>,
    c: Change,
) -> AlarmEvent {
    AlarmEvent {
        rule: rule.to_owned(),
        subject: subject.name.to_owned(),
        source: Some(r.source.to_owned()),
        active: c.active,
        priority,
        kind,
        metric: Some(r.metric.name().to_owned()),
        value: c.value,
        condition: c.condition.to_owned(),
        threshold: c.threshold,
        seq: Some(r.seq),
        ts: r.ts,
        since: c.since,
        evidence: Some(EvidenceReading::of(r)),
    }
}

/// The latest reading NEWS2 took for one subject of the current message.
#[derive(Debug, Clone)]
struct Trigger {
    index: usize,
    seq: u64,
    ts: i64,
    received: i64,
    source: String,
    metric: Metric,
    value: Option<f64>,
    flags: u16,
}

impl Default for Trigger {
    fn default() -> Self {
        Trigger {
            index: 0,
            seq: 0,
            ts: 0,
            received: 0,
            source: String::new(),
            metric: Metric::HeartRate,
            value: None,
            flags: 0,
        }
    }
}

/// A subject as the engine hands it to rules: its name, and a small dense id, one per subject
/// and device, that rules index their state by (one hash lookup per reading in the engine,
/// none in the rules).
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub id: usize,
    pub name: &'a str,
}

/// A rule that judges readings as they arrive, in device time, keeping per-subject state.
pub trait Rule: Send + std::fmt::Debug {
    fn name(&self) -> &str;
    /// The metrics whose readings this rule wants; empty for every metric.
    fn metrics(&self) -> &[Metric];
    /// Whether flagged readings reach this rule (technical rules only).
    fn wants_flagged(&self) -> bool {
        false
    }
    /// Looks at one reading of a wanted metric (trusted, unless the rule wants flagged ones);
    /// `message` tells readings of one message apart from those of others.
    fn observe(
        &mut self,
        subject: Subject<'_>,
        message: u64,
        reading: &RowRef<'_>,
        out: &mut Vec<AlarmEvent>,
    );
    /// After a restart: the condition held for this subject when the service stopped, since
    /// `since` (device time), up to the reading at `last_ts`.
    fn restore(&mut self, subject: Subject<'_>, since: i64, last_ts: i64);
}

/// Builds the reading rule a `[[rule]]` describes; `None` for the kinds judged elsewhere
/// (NEWS2 bands and silences: [`lifecycle`]).
pub fn build(config: &RuleConfig) -> Option<Box<dyn Rule>> {
    Some(match config.kind {
        RuleKind::Threshold => Box::new(threshold::ThresholdRule::new(config)),
        RuleKind::Rate => Box::new(rate::RateRule::new(config)),
        RuleKind::Anomaly => Box::new(anomaly::AnomalyRule::new(config)),
        RuleKind::Flagged => Box::new(flagged::FlaggedRule::new(config)),
        RuleKind::News2 | RuleKind::Silence => return None,
    })
}

/// Subjects come from topics and payloads: a flood of new ones must not grow memory without
/// bound. A ward has tens of subjects; a depot hundreds.
pub const MAX_SUBJECTS: usize = 10_000;

/// Feeds each reading to the rules that watch its metric.
#[derive(Debug)]
pub struct AlarmEngine {
    rules: Vec<Box<dyn Rule>>,
    news2: Option<news2::News2Tracker>,
    /// Rule indices by metric index (rules for every metric included).
    by_metric: Vec<Vec<usize>>,
    /// `subject NUL source` → dense id.
    subjects: HashMap<Box<str>, usize>,
    /// The last key looked up: readings come in runs of one subject and device.
    last_subject: Option<(Box<str>, usize)>,
    key: String,
    untracked: u64,
    events: Vec<AlarmEvent>,
    /// Per subject (tracker index) of the current message: the latest reading NEWS2 took.
    /// The first `news2_triggers_len` are this message's; the rest keep their allocations.
    news2_triggers: Vec<Trigger>,
    news2_triggers_len: usize,
}

impl AlarmEngine {
    pub fn new(rules: Vec<Box<dyn Rule>>) -> Self {
        let mut by_metric = vec![Vec::new(); Metric::ALL.len()];
        for (i, r) in rules.iter().enumerate() {
            if r.metrics().is_empty() {
                by_metric.iter_mut().for_each(|v| v.push(i));
            }
            for m in r.metrics() {
                by_metric[*m as usize].push(i);
            }
        }
        AlarmEngine {
            rules,
            news2: None,
            by_metric,
            subjects: HashMap::new(),
            last_subject: None,
            key: String::new(),
            untracked: 0,
            events: Vec::new(),
            news2_triggers: Vec::new(),
            news2_triggers_len: 0,
        }
    }

    pub fn from_config(rules: &[RuleConfig]) -> Self {
        Self::new(rules.iter().filter_map(build).collect())
    }

    /// Scores NEWS2 too, with `tracker`.
    pub fn with_news2(mut self, tracker: Option<news2::News2Tracker>) -> Self {
        self.news2 = tracker;
        self
    }

    pub fn news2_mut(&mut self) -> Option<&mut news2::News2Tracker> {
        self.news2.as_mut()
    }

    /// Feeds one reading (and its text, for consciousness) to the NEWS2 tracker. Scores are
    /// judged once the message's readings are all in: [`Self::score_news2`].
    pub fn observe_news2(&mut self, r: &RowRef<'_>, text: Option<&str>) {
        let Some(tracker) = self.news2.as_mut() else {
            return;
        };
        let subject = r.subject.unwrap_or(r.source);
        let Some(index) = tracker.record_at(
            subject,
            r.source,
            &news2::Observation {
                metric: r.metric,
                value: r.value,
                text,
                ts: r.ts,
                seq: r.seq,
                flags: r.flags,
            },
        ) else {
            return;
        };
        // The latest reading of each subject scored: what a changed score names as its trigger,
        // made into an evidence reading only for a score that changed. Kept in place, the
        // source's allocation too, from one message to the next.
        let active = &self.news2_triggers[..self.news2_triggers_len];
        let slot = match active.iter().position(|t| t.index == index) {
            Some(slot) => slot,
            None => {
                let slot = self.news2_triggers_len;
                self.news2_triggers_len += 1;
                if slot == self.news2_triggers.len() {
                    self.news2_triggers.push(Trigger::default());
                }
                self.news2_triggers[slot].index = index;
                slot
            }
        };
        let t = &mut self.news2_triggers[slot];
        t.seq = r.seq;
        t.ts = r.ts;
        t.received = r.received;
        t.value = r.value;
        t.metric = r.metric;
        t.flags = r.flags;
        if t.source != r.source {
            r.source.clone_into(&mut t.source);
        }
    }

    /// The NEWS2 scores that changed with the readings observed since the last call (one
    /// message's), each naming the reading that changed it.
    pub fn score_news2(&mut self) -> Vec<news2::News2Update> {
        let Some(tracker) = self.news2.as_mut() else {
            return Vec::new();
        };
        let mut updates = tracker.score_pending();
        for u in &mut updates {
            u.trigger = self.news2_triggers[..self.news2_triggers_len]
                .iter()
                .find(|t| tracker.subject_at(t.index) == u.subject)
                .map(|t| EvidenceReading {
                    seq: t.seq,
                    ts: t.ts,
                    received: t.received,
                    source: t.source.clone(),
                    metric: t.metric.name().to_owned(),
                    value: t.value,
                    flags: flags::names(t.flags)
                        .into_iter()
                        .map(str::to_owned)
                        .collect(),
                });
        }
        self.news2_triggers_len = 0;
        updates
    }

    /// Readings whose subject some rule could not track (bounded state), in total.
    pub fn subjects_untracked(&self) -> u64 {
        self.untracked + self.news2.as_ref().map_or(0, |t| t.untracked())
    }

    /// The dense id of a subject as one device reports it. Rules keep their state per subject
    /// *and device*: each device's readings are in order on their own (a patch stamped with the
    /// receive time runs ahead of a monitor's own clock), and one device's readings must not
    /// make another's look out of order, nor mix into its window or baseline.
    fn subject_id(&mut self, name: &str, source: &str) -> Option<usize> {
        if let Some((last, id)) = &self.last_subject {
            if last.len() == name.len() + 1 + source.len()
                && last.starts_with(name)
                && last.ends_with(source)
                && last.as_bytes()[name.len()] == 0
            {
                return Some(*id);
            }
        }
        self.key.clear();
        self.key.push_str(name);
        self.key.push('\0');
        self.key.push_str(source);
        let id = match self.subjects.get(self.key.as_str()) {
            Some(&id) => id,
            None if self.subjects.len() >= MAX_SUBJECTS => {
                self.untracked += 1;
                return None;
            }
            None => {
                let id = self.subjects.len();
                self.subjects.insert(self.key.as_str().into(), id);
                id
            }
        };
        self.last_subject = Some((self.key.as_str().into(), id));
        Some(id)
    }

    /// Tells rule `rule` that its condition held for `subject`, as `source` reported it, when
    /// the service stopped.
    pub fn restore(&mut self, rule: &str, subject: &str, source: &str, since: i64, last_ts: i64) {
        let Some(id) = self.subject_id(subject, source) else {
            return;
        };
        if let Some(r) = self.rules.iter_mut().find(|r| r.name() == rule) {
            r.restore(Subject { id, name: subject }, since, last_ts);
        }
    }

    /// Looks at one reading of message number `message`; returns the condition changes it
    /// caused.
    pub fn observe(&mut self, r: &RowRef<'_>, message: u64) -> std::vec::Drain<'_, AlarmEvent> {
        self.events.clear();
        if !self.by_metric[r.metric as usize].is_empty() {
            self.feed(r, message);
        }
        self.events.drain(..)
    }

    fn feed(&mut self, r: &RowRef<'_>, message: u64) {
        let trusted = r.flags & flags::NOT_CLINICAL == 0 && r.value.is_some();
        let name = r.subject.unwrap_or(r.source);
        let Some(id) = self.subject_id(name, r.source) else {
            return;
        };
        let subject = Subject { id, name };
        for &i in &self.by_metric[r.metric as usize] {
            let rule = &mut self.rules[i];
            if trusted || rule.wants_flagged() {
                rule.observe(subject, message, r, &mut self.events);
            }
        }
    }
}

/// Per-subject state of a rule, indexed by [`Subject::id`].
#[derive(Debug)]
pub struct PerSubject<S> {
    states: Vec<S>,
}

impl<S: Default> PerSubject<S> {
    pub fn new() -> Self {
        PerSubject { states: Vec::new() }
    }

    pub fn get(&mut self, id: usize) -> &mut S {
        if id >= self.states.len() {
            self.states.resize_with(id + 1, S::default);
        }
        &mut self.states[id]
    }
}

impl<S: Default> Default for PerSubject<S> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for the rules' tests.
    use super::*;

    pub fn engine(rules: &str) -> AlarmEngine {
        #[derive(serde::Deserialize)]
        struct Rules {
            rule: Vec<RuleConfig>,
        }
        let c: Rules = toml::from_str(rules).unwrap();
        for r in &c.rule {
            r.check().unwrap();
        }
        AlarmEngine::from_config(&c.rule)
    }

    pub fn reading(metric: Metric, seq: u64, ts_s: i64, value: f64) -> RowRef<'static> {
        RowRef {
            seq,
            ts: ts_s * 1_000_000,
            received: 0,
            source: "dev",
            subject: Some("bed-1"),
            metric,
            value: Some(value),
            flags: 0,
        }
    }

    /// Feeds `(device time s, value)` readings, one message each; the (seq, active) of every
    /// change.
    pub fn run(e: &mut AlarmEngine, metric: Metric, readings: &[(i64, f64)]) -> Vec<(u64, bool)> {
        readings
            .iter()
            .enumerate()
            .flat_map(|(i, &(t, v))| {
                e.observe(&reading(metric, i as u64, t, v), i as u64)
                    .map(|ev| (ev.seq.unwrap(), ev.active))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(rule: &str) -> Result<(), (&'static str, String)> {
        let c: RuleConfig = toml::from_str(rule).unwrap();
        c.check()
    }

    #[test]
    fn each_kind_takes_its_own_keys_only() {
        assert!(parse("name='a'\npriority='high'\nmetric='spo2'\nbelow=92\nfor='30s'").is_ok());
        assert_eq!(
            parse("name='a'\npriority='high'\nmetric='spo2'\nbelow=92\nwithin='1m'")
                .unwrap_err()
                .0,
            "within"
        );
        assert_eq!(
            parse("name='a'\nkind='rate'\npriority='high'\nmetric='bp_systolic'\nfall=40")
                .unwrap_err()
                .0,
            "within"
        );
        assert!(parse(
            "name='a'\nkind='rate'\npriority='high'\nmetric='bp_systolic'\nfall=40\nwithin='10m'"
        )
        .is_ok());
        assert_eq!(
            parse("name='a'\nkind='news2'\npriority='high'\nband='low'")
                .unwrap_err()
                .0,
            "band"
        );
        assert!(parse("name='a'\nkind='news2'\npriority='high'\nband='medium'").is_ok());
        assert_eq!(
            parse("name='a'\nkind='silence'\npriority='low'")
                .unwrap_err()
                .0,
            "after"
        );
        assert!(
            parse("name='a'\nkind='silence'\npriority='low'\nafter='2m'\nper='source'").is_ok()
        );
        assert_eq!(
            parse("name='a'\nkind='flagged'\npriority='low'\nfor='1m'")
                .unwrap_err()
                .0,
            "for"
        );
        assert_eq!(
            parse("name='a'\nkind='anomaly'\npriority='low'\nmetric='heart_rate'\nsmoothing=2")
                .unwrap_err()
                .0,
            "smoothing"
        );
    }

    #[test]
    fn priorities_escalate_one_step_up_to_high() {
        assert_eq!(Priority::Low.raised(), Priority::Medium);
        assert_eq!(Priority::Medium.raised(), Priority::High);
        assert_eq!(Priority::High.raised(), Priority::High);
    }
}
