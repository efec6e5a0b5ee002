//! Silence rules: a technical alarm when a device, or a subject's metric, has not been heard
//! from for a while (sensor off, battery flat, out of range). Judged on the service clock: a
//! silent device sends no device time. Ingest notes who it heard ([`Ears`]); the alarm stage
//! keeps when each was last heard ([`SilenceWatch`]) and raises or clears.

use std::collections::{HashMap, HashSet};

use super::{micros, AlarmEvent, Priority, RuleConfig, RuleKind, SilenceScope, MAX_SUBJECTS};
use crate::model::batch::RowRef;
use crate::model::reading::Metric;

#[derive(Debug, Clone)]
struct Watch {
    metric: Option<Metric>,
    per: SilenceScope,
}

/// What ingest gathers between two reports: for each silence rule, whom it heard.
#[derive(Debug, Clone, Default)]
pub struct Ears {
    watches: Vec<Watch>,
    heard: Vec<HashSet<String>>,
}

impl Ears {
    pub fn is_empty(&self) -> bool {
        self.watches.is_empty()
    }

    /// Notes one reading (any reading, flagged ones too: the device is there).
    pub fn note(&mut self, r: &RowRef<'_>) {
        for (i, w) in self.watches.iter().enumerate() {
            if w.metric.is_some_and(|m| m != r.metric) {
                continue;
            }
            let who = match w.per {
                SilenceScope::Subject => r.subject.unwrap_or(r.source),
                SilenceScope::Source => r.source,
            };
            let set = &mut self.heard[i];
            if set.len() < MAX_SUBJECTS && !set.contains(who) {
                set.insert(who.to_owned());
            }
        }
    }

    /// Whom each rule heard since the last call, by rule index.
    pub fn take(&mut self) -> Vec<Vec<String>> {
        self.heard.iter_mut().map(|s| s.drain().collect()).collect()
    }

    pub fn anything(&self) -> bool {
        self.heard.iter().any(|s| !s.is_empty())
    }
}

#[derive(Debug, Clone, Copy)]
struct Heard {
    last: i64,
    raised: bool,
}

#[derive(Debug)]
struct SilenceRule {
    name: String,
    after_us: i64,
    priority: Priority,
    metric: Option<Metric>,
    heard: HashMap<String, Heard>,
}

/// The silence rules' state: when each watched device or subject was last heard.
#[derive(Debug, Default)]
pub struct SilenceWatch {
    rules: Vec<SilenceRule>,
    /// Counts changes of whom is watched and what is raised: what to keep across a restart.
    generation: u64,
}

impl SilenceWatch {
    pub fn new(rules: &[RuleConfig]) -> Self {
        SilenceWatch {
            rules: rules
                .iter()
                .filter(|r| r.kind == RuleKind::Silence)
                .map(|r| SilenceRule {
                    name: r.name.get_ref().clone(),
                    after_us: micros(r.after.expect("checked: a silence rule has `after`")),
                    priority: r.priority,
                    metric: r.metric,
                    heard: HashMap::new(),
                })
                .collect(),
            generation: 0,
        }
    }

    /// Changes whenever whom is watched, or whose silence is raised, changes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The ears ingest gathers with, one per rule in this watch's order.
    pub fn ears(rules: &[RuleConfig]) -> Ears {
        let watches: Vec<Watch> = rules
            .iter()
            .filter(|r| r.kind == RuleKind::Silence)
            .map(|r| Watch {
                metric: r.metric,
                per: r.per.unwrap_or_default(),
            })
            .collect();
        Ears {
            heard: vec![HashSet::new(); watches.len()],
            watches,
        }
    }

    /// Whom each rule heard (as [`Ears::take`] gives it) at service time `at`; clears the
    /// silences that ended.
    pub fn heard(&mut self, heard: Vec<Vec<String>>, at: i64, out: &mut Vec<AlarmEvent>) {
        for (rule, whom) in self.rules.iter_mut().zip(heard) {
            for who in whom {
                let len = rule.heard.len();
                match rule.heard.get_mut(&who) {
                    Some(h) => {
                        h.last = h.last.max(at);
                        if h.raised {
                            h.raised = false;
                            self.generation += 1;
                            out.push(rule.event(&who, false, at, at));
                        }
                    }
                    None if len < MAX_SUBJECTS => {
                        self.generation += 1;
                        rule.heard.insert(
                            who,
                            Heard {
                                last: at,
                                raised: false,
                            },
                        );
                    }
                    None => {}
                }
            }
        }
    }

    /// Raises the silences due by `now`.
    pub fn tick(&mut self, now: i64, out: &mut Vec<AlarmEvent>) {
        for rule in &mut self.rules {
            let mut due = Vec::new();
            for (who, h) in rule.heard.iter_mut() {
                if !h.raised && now.saturating_sub(h.last) >= rule.after_us {
                    h.raised = true;
                    due.push((who.clone(), h.last));
                }
            }
            for (who, last) in due {
                self.generation += 1;
                out.push(rule.event(&who, true, now, last));
            }
        }
    }

    /// When [`Self::tick`] next has something to do.
    pub fn next_due(&self) -> Option<i64> {
        self.rules
            .iter()
            .flat_map(|r| {
                r.heard
                    .values()
                    .filter(|h| !h.raised)
                    .map(|h| h.last.saturating_add(r.after_us))
            })
            .min()
    }

    /// Stops watching `who` for `rule` until it is heard again (a device taken away on
    /// purpose: its silence acknowledged).
    pub fn forget(&mut self, rule: &str, who: &str) {
        if let Some(r) = self.rules.iter_mut().find(|r| r.name == rule) {
            if r.heard.remove(who).is_some() {
                self.generation += 1;
            }
        }
    }

    /// Everyone watched, as `(rule, who, last heard)`: kept across a restart.
    pub fn watched(&self) -> Vec<(String, String, i64, bool)> {
        self.rules
            .iter()
            .flat_map(|r| {
                r.heard
                    .iter()
                    .map(|(w, h)| (r.name.clone(), w.clone(), h.last, h.raised))
            })
            .collect()
    }

    /// After a restart: `who` was watched by `rule`. The service itself was not listening
    /// while it was down, so the silence is counted from `now` unless it was already raised.
    pub fn restore(&mut self, rule: &str, who: &str, raised: bool, now: i64) {
        if let Some(r) = self.rules.iter_mut().find(|r| r.name == rule) {
            if r.heard.len() < MAX_SUBJECTS {
                r.heard.insert(who.to_owned(), Heard { last: now, raised });
            }
        }
    }
}

impl SilenceRule {
    fn event(&self, who: &str, active: bool, now: i64, last: i64) -> AlarmEvent {
        AlarmEvent {
            rule: self.name.clone(),
            subject: who.to_owned(),
            source: None,
            active,
            priority: self.priority,
            kind: RuleKind::Silence,
            metric: self.metric.map(|m| m.name().to_owned()),
            value: Some(now.saturating_sub(last) as f64 / 1e6),
            condition: "silent".into(),
            threshold: self.after_us as f64 / 1e6,
            seq: None,
            ts: now,
            since: last,
            evidence: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alarm::testing::reading;

    const S: i64 = 1_000_000;

    fn rules() -> Vec<RuleConfig> {
        #[derive(serde::Deserialize)]
        struct Rules {
            rule: Vec<RuleConfig>,
        }
        toml::from_str::<Rules>(
            "[[rule]]\nname = \"spo2-silent\"\nkind = \"silence\"\nmetric = \"spo2\"\nafter = \"2m\"\npriority = \"low\"\n",
        )
        .unwrap()
        .rule
    }

    #[test]
    fn not_heard_for_the_time_raises_and_hearing_again_clears() {
        let rules = rules();
        let mut ears = SilenceWatch::ears(&rules);
        let mut watch = SilenceWatch::new(&rules);
        ears.note(&reading(Metric::Spo2, 1, 0, 97.0));
        ears.note(&reading(Metric::HeartRate, 2, 0, 70.0));
        let mut out = Vec::new();
        watch.heard(ears.take(), 0, &mut out);
        assert_eq!(watch.next_due(), Some(120 * S));
        watch.tick(119 * S, &mut out);
        assert!(out.is_empty());
        watch.tick(120 * S, &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].active && out[0].kind.technical());
        assert_eq!(out[0].subject, "bed-1");
        watch.tick(300 * S, &mut out);
        assert_eq!(out.len(), 1, "raised once");
        ears.note(&reading(Metric::Spo2, 3, 301, 97.0));
        watch.heard(ears.take(), 301 * S, &mut out);
        assert_eq!(out.len(), 2);
        assert!(!out[1].active);
    }
}
