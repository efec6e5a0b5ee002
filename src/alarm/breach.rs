//! The condition delay every reading rule shares, hardened against device clocks.
//!
//! A condition must hold for the rule's `for` in device time, and that time must be backed by
//! readings actually received over it:
//! - a reading older than the latest one the rule took for the subject (out of order) never
//!   starts, extends or ends a breach; `clock_suspect` readings never reach a rule at all;
//! - no single reading, nor several readings of one message, satisfies a delay: the reading
//!   that completes it must come in another message than the one that started it;
//! - readings of a breach further apart than `max_gap` start it again, so one reading stamped
//!   1970 followed by a real one does not make a breach decades long.
//!
//! So a reading stamped 9999 cannot keep a breach from firing (it is flagged `clock_suspect`
//! by the ingest clock window, and a rule ignores it), and one stamped 1970 cannot fire it at
//! once.

use serde::{Deserialize, Serialize};

/// One subject's breach of one rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Breach {
    /// Device time of the latest reading the rule took, µs (`i64::MIN`: none yet).
    pub last_ts: i64,
    /// Device time the condition first held in the current breach, and the message that
    /// reading came in.
    pub since: Option<(i64, u64)>,
    /// Device time of the latest reading in breach.
    pub last_breach_ts: i64,
    /// The condition has held long enough: the alarm is raised.
    pub active: bool,
}

impl Default for Breach {
    fn default() -> Self {
        Breach {
            last_ts: i64::MIN,
            since: None,
            last_breach_ts: i64::MIN,
            active: false,
        }
    }
}

/// What a reading did to a breach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to report (including an out-of-order reading, ignored).
    Quiet,
    /// The condition has now held long enough: raise, since this device time.
    Raise { since: i64 },
    /// The raised condition no longer holds.
    Clear { since: i64 },
}

impl Step {
    /// `Some((active, since))` when the condition changed.
    pub fn change(self) -> Option<(bool, i64)> {
        match self {
            Step::Quiet => None,
            Step::Raise { since } => Some((true, since)),
            Step::Clear { since } => Some((false, since)),
        }
    }
}

/// A rule's delay settings.
#[derive(Debug, Clone, Copy)]
pub struct Delay {
    pub for_us: i64,
    pub max_gap_us: i64,
}

impl Breach {
    /// Whether a reading at `ts` comes in order (it may then change the breach).
    pub fn in_order(&self, ts: i64) -> bool {
        ts >= self.last_ts
    }

    /// Takes one in-order reading at device time `ts` of message `message`: `breached` if the
    /// condition holds for it, `recovered` if it is back past the hysteresis.
    pub fn step(
        &mut self,
        delay: Delay,
        ts: i64,
        message: u64,
        breached: bool,
        recovered: bool,
    ) -> Step {
        if ts < self.last_ts {
            return Step::Quiet;
        }
        self.last_ts = ts;
        if self.active {
            if recovered {
                let since = self.since.map_or(ts, |(s, _)| s);
                *self = Breach {
                    last_ts: ts,
                    ..Breach::default()
                };
                return Step::Clear { since };
            }
            if breached {
                self.last_breach_ts = ts;
            }
            return Step::Quiet;
        }
        if !breached {
            self.since = None;
            return Step::Quiet;
        }
        let gap = ts.saturating_sub(self.last_breach_ts);
        let (since, first_message) = match self.since {
            Some(s) if gap <= delay.max_gap_us => s,
            _ => {
                self.since = Some((ts, message));
                (ts, message)
            }
        };
        self.last_breach_ts = ts;
        let held = ts.saturating_sub(since) >= delay.for_us;
        let backed = delay.for_us == 0 || message != first_message;
        if held && backed {
            self.active = true;
            return Step::Raise { since };
        }
        Step::Quiet
    }

    /// After a restart: the condition held since `since` up to `last_ts`.
    pub fn restore(&mut self, since: i64, last_ts: i64) {
        *self = Breach {
            last_ts,
            since: Some((since, u64::MAX)),
            last_breach_ts: last_ts,
            active: true,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DELAY: Delay = Delay {
        for_us: 30_000_000,
        max_gap_us: 300_000_000,
    };
    const S: i64 = 1_000_000;

    #[test]
    fn a_delay_needs_two_messages_and_the_time_between_them() {
        let mut b = Breach::default();
        // One message carrying readings 0 s and 40 s apart: never enough on its own.
        assert_eq!(b.step(DELAY, 0, 1, true, false), Step::Quiet);
        assert_eq!(b.step(DELAY, 40 * S, 1, true, false), Step::Quiet);
        // The next message completes it.
        assert_eq!(
            b.step(DELAY, 41 * S, 2, true, false),
            Step::Raise { since: 0 }
        );
    }

    #[test]
    fn out_of_order_readings_neither_start_extend_nor_end_a_breach() {
        let mut b = Breach::default();
        b.step(DELAY, 100 * S, 1, false, true);
        // Older than the latest: does not start one.
        assert_eq!(b.step(DELAY, 50 * S, 2, true, false), Step::Quiet);
        assert_eq!(b.since, None);
        b.step(DELAY, 110 * S, 3, true, false);
        b.step(DELAY, 140 * S, 4, true, false);
        assert!(b.active);
        // An old normal reading does not end it.
        assert_eq!(b.step(DELAY, 120 * S, 5, false, true), Step::Quiet);
        assert!(b.active);
        assert_eq!(
            b.step(DELAY, 150 * S, 6, false, true),
            Step::Clear { since: 110 * S }
        );
    }

    #[test]
    fn a_gap_longer_than_max_gap_starts_the_breach_again() {
        let mut b = Breach::default();
        // "1970": one reading decades before the next.
        assert_eq!(b.step(DELAY, 0, 1, true, false), Step::Quiet);
        let now = 1_700_000_000 * S;
        assert_eq!(b.step(DELAY, now, 2, true, false), Step::Quiet);
        assert_eq!(b.since, Some((now, 2)));
        assert_eq!(
            b.step(DELAY, now + 30 * S, 3, true, false),
            Step::Raise { since: now }
        );
    }
}
