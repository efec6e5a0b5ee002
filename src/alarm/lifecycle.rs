//! The alarm lifecycle (IEC 60601-1-8 vocabulary): what happens to an alarm once a rule's
//! condition raised it.
//!
//! ```text
//!            condition clears (not latching)
//!   active ───────────────────────────────────────────────► cleared
//!     │ ▲  ack                       condition clears          ▲
//!     │ └─ silence ends,  ──► acknowledged ────────────────────┤
//!     │    condition holds                                     │
//!     └── ack with a silence ─► silenced ── ends, condition gone┘
//! ```
//!
//! A latched alarm stays active when its condition clears, until acknowledged. An active alarm
//! nobody acknowledges escalates after the rule's `escalate_after`, one priority step each time.
//! Every transition is returned for publishing, with the alarm's history. Time here is the
//! service clock (µs since the epoch), passed in: the stage owns the clock, tests drive it.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::news2::{Band, News2Update};
use super::{micros, AlarmEvent, Priority, RuleConfig, RuleKind};

/// Devices an alarm remembers as holding its condition: a subject has a few.
const MAX_HOLDING: usize = 16;

/// Entries an alarm's history keeps (the oldest go first).
pub const MAX_HISTORY: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlarmState {
    Active,
    Acknowledged,
    Silenced,
    Cleared,
}

impl AlarmState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmState::Active => "active",
            AlarmState::Acknowledged => "acknowledged",
            AlarmState::Silenced => "silenced",
            AlarmState::Cleared => "cleared",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Acknowledgement {
    pub by: String,
    /// Service time, µs.
    pub at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Service time, µs.
    pub at: i64,
    /// raised, condition-cleared, condition-returned, acknowledged, silenced, silence-ended,
    /// escalated, cleared, restored, evidence-lost.
    pub what: String,
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One alarm: what raised it, where it stands, and how it got there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlarmRecord {
    pub state: AlarmState,
    /// Now, after escalations.
    pub priority: Priority,
    /// Whether the rule's condition holds now: for some device, in `holding`.
    pub condition: bool,
    /// The devices whose readings hold the condition (`""` for rules that judge the subject as
    /// a whole): it stops holding once none does.
    #[serde(default)]
    pub holding: Vec<String>,
    pub latching: bool,
    /// Service time the alarm was raised (or last re-announced after a silence), µs.
    pub raised_at: i64,
    pub escalated_at: Option<i64>,
    pub escalations: u32,
    pub acknowledged: Option<Acknowledgement>,
    pub silenced_until: Option<i64>,
    /// The condition change that raised it, with its evidence reading.
    pub event: AlarmEvent,
    /// Whether the evidence was checked against the store after a restart.
    #[serde(default)]
    pub evidence_checked: bool,
    pub history: Vec<HistoryEntry>,
}

impl AlarmRecord {
    fn note(&mut self, at: i64, what: &str, by: Option<&str>, seq: Option<u64>) {
        if self.history.len() >= MAX_HISTORY {
            self.history.remove(0);
        }
        self.history.push(HistoryEntry {
            at,
            what: what.to_owned(),
            priority: self.priority,
            by: by.map(str::to_owned),
            seq,
            note: None,
        });
    }

    /// Records something said about the alarm from outside the lifecycle (a restart, lost
    /// evidence).
    pub fn remark(&mut self, at: i64, what: &str, note: String) {
        self.note(at, what, None, None);
        if let Some(last) = self.history.last_mut() {
            last.note = Some(note);
        }
    }

    pub fn subject(&self) -> &str {
        &self.event.subject
    }

    pub fn rule(&self) -> &str {
        &self.event.rule
    }
}

/// A transition to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub record: AlarmRecord,
    /// This transition is an escalation: also published on the escalation topic.
    pub escalated: bool,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AckError {
    #[error("no alarm `{rule}` for that subject")]
    NotFound { rule: String },
    #[error("that alarm is cleared")]
    Cleared,
    #[error("{0}")]
    Invalid(String),
    #[error("the alarm stage is not running")]
    Stopped,
}

#[derive(Debug, Clone)]
struct RuleMeta {
    latching: bool,
    escalate_after_us: Option<i64>,
    kind: RuleKind,
    priority: Priority,
    band: Option<Band>,
    hysteresis: f64,
}

/// Every alarm that is not cleared, by (subject, rule).
#[derive(Debug)]
pub struct Board {
    rules: HashMap<String, RuleMeta>,
    alarms: BTreeMap<(String, String), AlarmRecord>,
}

impl Board {
    pub fn new(rules: &[RuleConfig]) -> Self {
        Board {
            rules: rules
                .iter()
                .map(|r| {
                    (
                        r.name.get_ref().clone(),
                        RuleMeta {
                            latching: r.latching,
                            escalate_after_us: r.escalate_after.map(micros),
                            kind: r.kind,
                            priority: r.priority,
                            band: r.band,
                            hysteresis: r.hysteresis,
                        },
                    )
                })
                .collect(),
            alarms: BTreeMap::new(),
        }
    }

    /// Takes back the alarms a previous run left (persisted): those kept, and those of rules
    /// the pipeline file no longer has, cleared (to publish, so that no retained message says
    /// they are still active).
    pub fn restore(
        &mut self,
        records: Vec<AlarmRecord>,
        now: i64,
    ) -> (Vec<AlarmRecord>, Vec<AlarmRecord>) {
        let mut kept = Vec::new();
        let mut dropped = Vec::new();
        for mut r in records {
            let Some(meta) = self.rules.get(r.rule()) else {
                r.state = AlarmState::Cleared;
                r.remark(
                    now,
                    "cleared",
                    "the rule is no longer in the pipeline file".into(),
                );
                dropped.push(r);
                continue;
            };
            r.latching = meta.latching;
            r.remark(now, "restored", "the service restarted".into());
            kept.push(r.clone());
            self.alarms
                .insert((r.subject().to_owned(), r.rule().to_owned()), r);
        }
        (kept, dropped)
    }

    /// Ends an alarm from outside its condition (a silence watch given up), saying why.
    pub fn dismiss(
        &mut self,
        subject: &str,
        rule: &str,
        now: i64,
        why: &str,
    ) -> Option<Transition> {
        let key = (subject.to_owned(), rule.to_owned());
        self.alarms
            .get_mut(&key)?
            .remark(now, "dismissed", why.to_owned());
        Some(self.clear(&key, now))
    }

    pub fn get(&self, subject: &str, rule: &str) -> Option<&AlarmRecord> {
        self.alarms.get(&(subject.to_owned(), rule.to_owned()))
    }

    pub fn get_mut(&mut self, subject: &str, rule: &str) -> Option<&mut AlarmRecord> {
        self.alarms.get_mut(&(subject.to_owned(), rule.to_owned()))
    }

    pub fn records(&self) -> impl Iterator<Item = &AlarmRecord> {
        self.alarms.values()
    }

    pub fn len(&self) -> usize {
        self.alarms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.alarms.is_empty()
    }

    /// A rule's condition changed for a subject.
    pub fn condition(&mut self, ev: AlarmEvent, now: i64) -> Option<Transition> {
        let meta = self.rules.get(&ev.rule)?.clone();
        let key = (ev.subject.clone(), ev.rule.clone());
        let seq = ev.seq;
        let source = ev.source.clone().unwrap_or_default();
        match (self.alarms.get_mut(&key), ev.active) {
            (None, true) => {
                let mut r = AlarmRecord {
                    state: AlarmState::Active,
                    priority: ev.priority,
                    condition: true,
                    holding: vec![source],
                    latching: meta.latching,
                    raised_at: now,
                    escalated_at: None,
                    escalations: 0,
                    acknowledged: None,
                    silenced_until: None,
                    event: ev,
                    evidence_checked: false,
                    history: Vec::new(),
                };
                r.note(now, "raised", None, seq);
                self.alarms.insert(key, r.clone());
                Some(Transition {
                    record: r,
                    escalated: false,
                })
            }
            (None, false) => None,
            (Some(r), true) => {
                if !r.holding.contains(&source) && r.holding.len() < MAX_HOLDING {
                    r.holding.push(source);
                }
                if r.condition {
                    return None;
                }
                r.condition = true;
                r.note(now, "condition-returned", None, seq);
                Some(Transition {
                    record: r.clone(),
                    escalated: false,
                })
            }
            (Some(r), false) => {
                r.holding.retain(|s| *s != source);
                if !r.condition || !r.holding.is_empty() {
                    // Another device still holds it.
                    return None;
                }
                r.condition = false;
                r.note(now, "condition-cleared", None, seq);
                if r.state == AlarmState::Active && r.latching {
                    return Some(Transition {
                        record: r.clone(),
                        escalated: false,
                    });
                }
                Some(self.clear(&key, now))
            }
        }
    }

    fn clear(&mut self, key: &(String, String), now: i64) -> Transition {
        let mut r = self.alarms.remove(key).expect("the caller found it");
        r.state = AlarmState::Cleared;
        r.silenced_until = None;
        r.note(now, "cleared", None, None);
        Transition {
            record: r,
            escalated: false,
        }
    }

    /// An acknowledgement by `by`, or with `silence_us` a silencing until `now + silence_us`.
    pub fn ack(
        &mut self,
        subject: &str,
        rule: &str,
        by: &str,
        silence_us: Option<i64>,
        now: i64,
    ) -> Result<Transition, AckError> {
        let key = (subject.to_owned(), rule.to_owned());
        let Some(r) = self.alarms.get_mut(&key) else {
            return Err(AckError::NotFound {
                rule: rule.to_owned(),
            });
        };
        r.acknowledged = Some(Acknowledgement {
            by: by.to_owned(),
            at: now,
        });
        match silence_us {
            Some(d) => {
                r.state = AlarmState::Silenced;
                r.silenced_until = Some(now.saturating_add(d));
                r.note(now, "silenced", Some(by), None);
            }
            None => {
                r.state = AlarmState::Acknowledged;
                r.silenced_until = None;
                r.note(now, "acknowledged", Some(by), None);
            }
        }
        if !r.condition {
            // A latched alarm whose condition is gone: the acknowledgement ends it.
            return Ok(self.clear(&key, now));
        }
        Ok(Transition {
            record: r.clone(),
            escalated: false,
        })
    }

    /// When [`Self::tick`] next has something to do.
    pub fn next_due(&self) -> Option<i64> {
        self.alarms.values().filter_map(|r| self.due(r)).min()
    }

    fn due(&self, r: &AlarmRecord) -> Option<i64> {
        match r.state {
            AlarmState::Silenced => r.silenced_until,
            AlarmState::Active => {
                let after = self.rules.get(r.rule())?.escalate_after_us?;
                Some(r.escalated_at.unwrap_or(r.raised_at).saturating_add(after))
            }
            _ => None,
        }
    }

    /// Escalations and ends of silences due by `now`.
    pub fn tick(&mut self, now: i64) -> Vec<Transition> {
        let due: Vec<(String, String)> = self
            .alarms
            .iter()
            .filter(|(_, r)| self.due(r).is_some_and(|d| d <= now))
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for key in due {
            let r = self.alarms.get_mut(&key).expect("listed above");
            match r.state {
                AlarmState::Silenced if r.condition => {
                    r.state = AlarmState::Active;
                    r.silenced_until = None;
                    r.raised_at = now;
                    r.escalated_at = None;
                    r.note(now, "silence-ended", None, None);
                    out.push(Transition {
                        record: r.clone(),
                        escalated: false,
                    });
                }
                AlarmState::Silenced => out.push(self.clear(&key, now)),
                _ => {
                    r.priority = r.priority.raised();
                    r.escalations += 1;
                    r.escalated_at = Some(now);
                    r.note(now, "escalated", None, None);
                    out.push(Transition {
                        record: r.clone(),
                        escalated: true,
                    });
                }
            }
        }
        out
    }

    /// A subject's NEWS2 score changed: the NEWS2 band rules' conditions for it.
    pub fn news2(&mut self, u: &News2Update, now: i64) -> Vec<Transition> {
        let band_rules: Vec<(String, RuleMeta)> = self
            .rules
            .iter()
            .filter(|(_, m)| m.kind == RuleKind::News2)
            .map(|(n, m)| (n.clone(), m.clone()))
            .collect();
        let mut out = Vec::new();
        for (name, meta) in band_rules {
            let level = meta.band.expect("checked: a news2 rule has a band");
            let reached = u.band >= level;
            let holds = self.get(&u.subject, &name).is_some_and(|r| r.condition);
            // Clearing waits for the total to be `hysteresis` points below the band's lowest
            // total (a score wavering between 4 and 5 is one alarm, not one a minute), and for
            // a score with no stale parameter: a total that fell only because a reading aged
            // out (a consciousness assessed by hand) is not a patient getting better.
            let lowest = match level {
                Band::High => Some(7.0),
                Band::Medium => Some(5.0),
                // Low-medium is a single parameter scoring 3, not a total.
                _ => None,
            };
            let below = match lowest {
                Some(l) if meta.hysteresis > 0.0 => f64::from(u.total) <= l - meta.hysteresis,
                _ => true,
            };
            let recovered = !reached && below && u.stale.is_empty();
            if reached == holds || (holds && !recovered) {
                continue;
            }
            let ev = AlarmEvent {
                rule: name,
                subject: u.subject.clone(),
                source: None,
                active: reached,
                priority: meta.priority,
                kind: RuleKind::News2,
                metric: None,
                value: Some(f64::from(u.total)),
                condition: format!("band {}", u.band.as_str()),
                // The band's lowest total (low-medium: a single parameter's 3).
                threshold: lowest.unwrap_or(3.0),
                seq: u.trigger.as_ref().map(|t| t.seq),
                ts: u.ts,
                since: u.ts,
                evidence: u.trigger.clone(),
            };
            out.extend(self.condition(ev, now));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    fn board(extra: &str) -> Board {
        #[derive(Deserialize)]
        struct Rules {
            rule: Vec<RuleConfig>,
        }
        let text = format!(
            "[[rule]]\nname = \"spo2-low\"\nmetric = \"spo2\"\nbelow = 92\npriority = \"medium\"\n{extra}"
        );
        Board::new(&toml::from_str::<Rules>(&text).unwrap().rule)
    }

    fn event(active: bool, seq: u64) -> AlarmEvent {
        AlarmEvent {
            rule: "spo2-low".into(),
            subject: "bed-1".into(),
            source: None,
            active,
            priority: Priority::Medium,
            kind: RuleKind::Threshold,
            metric: Some("spo2".into()),
            value: Some(88.0),
            condition: "below".into(),
            threshold: 92.0,
            seq: Some(seq),
            ts: 0,
            since: 0,
            evidence: None,
        }
    }

    fn states(ts: &[Transition]) -> Vec<&'static str> {
        ts.iter().map(|t| t.record.state.as_str()).collect()
    }

    #[test]
    fn active_acknowledged_cleared() {
        let mut b = board("");
        let t = b.condition(event(true, 1), 0).unwrap();
        assert_eq!(t.record.state, AlarmState::Active);
        assert!(b.condition(event(true, 2), S).is_none(), "raised once");
        let t = b.ack("bed-1", "spo2-low", "nurse-jo", None, 5 * S).unwrap();
        assert_eq!(t.record.state, AlarmState::Acknowledged);
        assert_eq!(t.record.acknowledged.as_ref().unwrap().by, "nurse-jo");
        let t = b.condition(event(false, 3), 9 * S).unwrap();
        assert_eq!(t.record.state, AlarmState::Cleared);
        let what: Vec<&str> = t.record.history.iter().map(|h| h.what.as_str()).collect();
        assert_eq!(
            what,
            ["raised", "acknowledged", "condition-cleared", "cleared"]
        );
        assert!(b.is_empty());
        assert_eq!(
            b.ack("bed-1", "spo2-low", "x", None, 10 * S),
            Err(AckError::NotFound {
                rule: "spo2-low".into()
            })
        );
    }

    #[test]
    fn a_latched_alarm_stays_until_acknowledged() {
        let mut b = board("latching = true\n");
        b.condition(event(true, 1), 0);
        let t = b.condition(event(false, 2), S).unwrap();
        assert_eq!(t.record.state, AlarmState::Active, "latched");
        assert!(!t.record.condition);
        let t = b.ack("bed-1", "spo2-low", "nurse-jo", None, 2 * S).unwrap();
        assert_eq!(t.record.state, AlarmState::Cleared);
        // Unlatched, the same clear ends it at once.
        let mut b = board("");
        b.condition(event(true, 1), 0);
        assert_eq!(
            b.condition(event(false, 2), S).unwrap().record.state,
            AlarmState::Cleared
        );
    }

    #[test]
    fn escalation_raises_the_priority_each_time_nobody_acknowledges() {
        let mut b = board("escalate_after = \"2m\"\n");
        b.condition(event(true, 1), 0);
        assert_eq!(b.next_due(), Some(120 * S));
        assert!(b.tick(119 * S).is_empty());
        let t = b.tick(120 * S);
        assert_eq!(t.len(), 1);
        assert!(t[0].escalated);
        assert_eq!(t[0].record.priority, Priority::High);
        assert!(b.tick(200 * S).is_empty());
        let t = b.tick(240 * S);
        assert_eq!(t[0].record.escalations, 2);
        // Acknowledged alarms do not escalate.
        b.ack("bed-1", "spo2-low", "jo", None, 250 * S).unwrap();
        assert_eq!(b.next_due(), None);
    }

    #[test]
    fn a_silence_is_an_acknowledgement_with_a_deadline() {
        let mut b = board("escalate_after = \"10m\"\n");
        b.condition(event(true, 1), 0);
        let t = b
            .ack("bed-1", "spo2-low", "jo", Some(120 * S), 10 * S)
            .unwrap();
        assert_eq!(t.record.state, AlarmState::Silenced);
        assert_eq!(b.next_due(), Some(130 * S));
        // The condition still holds when the silence ends: active again, announced again.
        assert_eq!(states(&b.tick(130 * S)), ["active"]);
        // Silenced again, and the condition goes meanwhile: a silence is an acknowledgement, so the
        // alarm clears at once.
        b.ack("bed-1", "spo2-low", "jo", Some(60 * S), 140 * S)
            .unwrap();
        let t = b.condition(event(false, 2), 150 * S).unwrap();
        assert_eq!(t.record.state, AlarmState::Cleared);
    }

    fn score(total: u8, band: Band, stale: &[&'static str]) -> News2Update {
        News2Update {
            subject: "bed-1".into(),
            total,
            band,
            partial: !stale.is_empty(),
            scale: 1,
            parameters: Default::default(),
            missing: Vec::new(),
            stale: stale.to_vec(),
            ts: 0,
            trigger: None,
        }
    }

    fn news2_board(band: &str, hysteresis: u8) -> Board {
        #[derive(Deserialize)]
        struct Rules {
            rule: Vec<RuleConfig>,
        }
        let text = format!(
            "[[rule]]\nname = \"news2\"\nkind = \"news2\"\nband = \"{band}\"\nhysteresis = {hysteresis}\npriority = \"medium\"\n"
        );
        Board::new(&toml::from_str::<Rules>(&text).unwrap().rule)
    }

    fn run_scores(b: &mut Board, scores: &[News2Update]) -> Vec<&'static str> {
        scores
            .iter()
            .flat_map(|u| b.news2(u, 0))
            .map(|t| t.record.state.as_str())
            .collect()
    }

    #[test]
    fn a_news2_alarm_clears_past_its_hysteresis_on_a_fresh_score() {
        let mut b = news2_board("medium", 2);
        let got = run_scores(
            &mut b,
            &[
                score(4, Band::Low, &[]),
                score(5, Band::Medium, &[]),
                score(4, Band::Low, &[]), // 4: not 2 points below 5
                score(6, Band::Medium, &[]),
                score(2, Band::Low, &["consciousness"]), // fell because a reading aged out
                score(3, Band::Low, &[]),                // 3 = 5 - 2, every parameter fresh
            ],
        );
        assert_eq!(got, ["active", "cleared"]);
        // Without hysteresis: below the band clears.
        let mut b = news2_board("high", 0);
        let got = run_scores(
            &mut b,
            &[score(7, Band::High, &[]), score(6, Band::Medium, &[])],
        );
        assert_eq!(got, ["active", "cleared"]);
        // Low-medium is one parameter at 3, not a total: it clears when the band falls below.
        let mut b = news2_board("low-medium", 2);
        let got = run_scores(
            &mut b,
            &[score(3, Band::LowMedium, &[]), score(2, Band::Low, &[])],
        );
        assert_eq!(got, ["active", "cleared"]);
    }
}
