//! Flagged-run rules: a technical alarm when a device keeps sending readings it flags as not
//! usable (no contact, out of range, invalid, questionable, test data, a suspect clock): a probe
//! off the finger, a cuff off the arm. Those readings never raise a clinical alarm; a run of
//! them means nobody is watching the patient through that sensor. Judged in arrival order: the
//! flagged readings' own times may be the problem.

use super::{
    reading_event, AlarmEvent, Change, PerSubject, Priority, Rule, RuleConfig, RuleKind, Subject,
};
use crate::model::batch::RowRef;
use crate::model::reading::{flags, Metric};

const DEFAULT_COUNT: u32 = 5;

#[derive(Debug, Default, Clone, Copy)]
struct State {
    run: u32,
    since: i64,
    active: bool,
}

#[derive(Debug)]
pub struct FlaggedRule {
    name: String,
    metric: Vec<Metric>,
    count: u32,
    priority: Priority,
    subjects: PerSubject<State>,
}

impl FlaggedRule {
    pub fn new(c: &RuleConfig) -> Self {
        FlaggedRule {
            name: c.name.get_ref().clone(),
            metric: c.metric.into_iter().collect(),
            count: c.count.unwrap_or(DEFAULT_COUNT),
            priority: c.priority,
            subjects: PerSubject::new(),
        }
    }
}

impl Rule for FlaggedRule {
    fn name(&self) -> &str {
        &self.name
    }

    fn metrics(&self) -> &[Metric] {
        &self.metric
    }

    fn wants_flagged(&self) -> bool {
        true
    }

    fn observe(
        &mut self,
        subject: Subject<'_>,
        _message: u64,
        r: &RowRef<'_>,
        out: &mut Vec<AlarmEvent>,
    ) {
        let flagged = r.flags & flags::NOT_CLINICAL != 0 || r.value.is_none();
        let count = self.count;
        let state = self.subjects.get(subject.id);
        let active = if flagged {
            if state.run == 0 {
                state.since = r.ts;
            }
            state.run = state.run.saturating_add(1);
            if state.active || state.run < count {
                return;
            }
            state.active = true;
            true
        } else {
            state.run = 0;
            if !state.active {
                return;
            }
            state.active = false;
            false
        };
        out.push(reading_event(
            &self.name,
            self.priority,
            RuleKind::Flagged,
            subject,
            r,
            Change {
                active,
                since: state.since,
                value: r.value,
                condition: "flagged",
                threshold: f64::from(count),
            },
        ));
    }

    fn restore(&mut self, subject: Subject<'_>, since: i64, _last_ts: i64) {
        *self.subjects.get(subject.id) = State {
            run: self.count,
            since,
            active: true,
        };
    }
}

#[cfg(test)]
mod tests {
    use crate::alarm::testing::{engine, reading};
    use crate::model::reading::{flags, Metric};

    #[test]
    fn a_run_of_flagged_readings_raises_a_technical_alarm_and_a_good_one_clears_it() {
        let mut e = engine(
            "[[rule]]\nname = \"probe-off\"\nkind = \"flagged\"\nmetric = \"spo2\"\ncount = 3\npriority = \"low\"\n\
             [[rule]]\nname = \"spo2-low\"\nmetric = \"spo2\"\nbelow = 92\npriority = \"high\"\n",
        );
        let mut events = Vec::new();
        for i in 0..4 {
            let mut r = reading(Metric::Spo2, i, i as i64, 0.0);
            r.flags = flags::NO_CONTACT;
            events.extend(e.observe(&r, i).map(|ev| (ev.rule, ev.active)));
        }
        // The no-contact zeros never raise spo2-low; the third raises probe-off once.
        assert_eq!(events, vec![("probe-off".to_owned(), true)]);
        let ok: Vec<_> = e
            .observe(&reading(Metric::Spo2, 9, 9, 97.0), 9)
            .map(|ev| (ev.rule, ev.active))
            .collect();
        assert_eq!(ok, vec![("probe-off".to_owned(), false)]);
    }
}
