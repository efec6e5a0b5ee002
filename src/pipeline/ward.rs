//! The ward view: what a ward dashboard shows of every bed (latest vitals with their trend, the
//! NEWS2 score, the alarms), kept up to date by the stages and read by HTTP (`/dashboard`,
//! `/events`). A reader gets a snapshot and then every change, in order, each with an id; a
//! reader that falls behind gets a fresh snapshot instead of a gap.
//!
//! Bounded: at most [`MAX_BEDS`] subjects, [`TREND_POINTS`] trend points per vital.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::model::reading::{format_ts, Metric};

/// The vitals a bed shows, in display order.
pub const VITALS: [Metric; 9] = [
    Metric::HeartRate,
    Metric::PulseRate,
    Metric::Spo2,
    Metric::RespRate,
    Metric::BpSystolic,
    Metric::BpDiastolic,
    Metric::BodyTemp,
    Metric::O2Flow,
    Metric::Consciousness,
];

/// A ward has tens of beds; a depot's view would be useless beyond this.
pub const MAX_BEDS: usize = 256;
/// Trend points are 30-second buckets of device time: 15 minutes of them.
pub const TREND_BUCKET_US: i64 = 30_000_000;
pub const TREND_POINTS: usize = 30;
/// Events a slow reader may lag before it is resynchronised with a snapshot.
const EVENT_BUFFER: usize = 4096;

/// The latest reading of one vital, as a dashboard shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Vital {
    pub value: Option<f64>,
    pub text: Option<String>,
    pub unit: &'static str,
    /// Device time, RFC 3339.
    pub ts: String,
    /// Receive time (service clock), µs since the epoch: the age shown is measured from it.
    pub received_us: i64,
    /// `[device time µs of the bucket, mean value]`, oldest first, over the last 15 minutes of
    /// device time.
    pub trend: Vec<(i64, f64)>,
    #[serde(skip)]
    ts_us: i64,
    #[serde(skip)]
    buckets: VecDeque<(i64, f64, u32)>,
}

/// One bed: a subject's vitals, score and alarms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Bed {
    pub subject: String,
    pub vitals: BTreeMap<&'static str, Vital>,
    /// The last `news2/<site>/<subject>` message's body, if any.
    pub news2: Option<Value>,
    /// The alarm messages of this bed that are not cleared, by rule.
    pub alarms: BTreeMap<String, Value>,
}

/// One reading for the ward view.
#[derive(Debug, Clone)]
pub struct VitalReading {
    pub subject: String,
    pub metric: Metric,
    pub value: Option<f64>,
    pub text: Option<String>,
    pub ts: i64,
    pub received: i64,
}

/// A change, as `/events` sends it: `event: <kind>`, `id: <id>`, `data: <data>`.
#[derive(Debug, Clone)]
pub struct WardEvent {
    pub id: u64,
    /// `bed` (a bed's whole state after the change).
    pub kind: &'static str,
    pub data: Value,
}

#[derive(Debug, Default)]
struct WardState {
    beds: BTreeMap<String, Bed>,
    /// Id of the last event sent.
    last_id: u64,
    untracked: u64,
}

/// Shared by the stages that feed it and the HTTP readers.
#[derive(Debug)]
pub struct WardHub {
    site: String,
    state: Mutex<WardState>,
    events: broadcast::Sender<WardEvent>,
}

impl WardHub {
    pub fn new(site: &str) -> Self {
        WardHub {
            site: site.to_owned(),
            state: Mutex::new(WardState::default()),
            events: broadcast::channel(EVENT_BUFFER).0,
        }
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    /// Whether the ward view shows this metric.
    pub fn shows(metric: Metric) -> bool {
        VITALS.contains(&metric)
    }

    /// The whole ward now, and the id of the last event it includes: a reader then takes the
    /// events after that id from [`Self::subscribe`]'s receiver (made before this call).
    pub fn snapshot(&self) -> (u64, Value) {
        let s = self.lock();
        let beds: Vec<&Bed> = s.beds.values().collect();
        (
            s.last_id,
            json!({
                "site": self.site,
                "id": s.last_id,
                "beds": beds,
                "untracked": s.untracked,
            }),
        )
    }

    pub fn subscribe(&self) -> broadcast::Receiver<WardEvent> {
        self.events.subscribe()
    }

    /// Takes readings of vitals (a batch of them: callers gather them rather than lock per
    /// reading).
    pub fn vitals(&self, readings: &[VitalReading]) {
        let mut s = self.lock();
        let mut changed: Vec<&str> = Vec::new();
        for r in readings {
            let Some(bed) = Self::bed(&mut s, &r.subject) else {
                continue;
            };
            let vital = bed.vitals.entry(r.metric.name()).or_insert_with(|| Vital {
                value: None,
                text: None,
                unit: r.metric.unit(),
                ts: String::new(),
                received_us: 0,
                trend: Vec::new(),
                ts_us: i64::MIN,
                buckets: VecDeque::new(),
            });
            if r.ts < vital.ts_us {
                continue;
            }
            vital.value = r.value;
            vital.text = r.text.clone();
            vital.ts = format_ts(r.ts);
            vital.ts_us = r.ts;
            vital.received_us = r.received;
            if let Some(v) = r.value.filter(|v| v.is_finite()) {
                let bucket = r.ts.div_euclid(TREND_BUCKET_US) * TREND_BUCKET_US;
                match vital.buckets.back_mut() {
                    Some((b, sum, n)) if *b == bucket => {
                        *sum += v;
                        *n += 1;
                    }
                    _ => vital.buckets.push_back((bucket, v, 1)),
                }
                let oldest = bucket - (TREND_POINTS as i64 - 1) * TREND_BUCKET_US;
                while vital.buckets.front().is_some_and(|(b, ..)| *b < oldest)
                    || vital.buckets.len() > TREND_POINTS
                {
                    vital.buckets.pop_front();
                }
                vital.trend = vital
                    .buckets
                    .iter()
                    .map(|&(b, sum, n)| (b, sum / f64::from(n)))
                    .collect();
            }
            if !changed.contains(&r.subject.as_str()) {
                changed.push(&r.subject);
            }
        }
        for subject in changed {
            self.send_bed(&mut s, subject);
        }
    }

    /// A subject's new NEWS2 message body.
    pub fn news2(&self, subject: &str, body: Value) {
        let mut s = self.lock();
        let Some(bed) = Self::bed(&mut s, subject) else {
            return;
        };
        bed.news2 = Some(body);
        self.send_bed(&mut s, subject);
    }

    /// An alarm's new state (its message body); `cleared` removes it from the bed.
    pub fn alarm(&self, subject: &str, rule: &str, body: Value, cleared: bool) {
        let mut s = self.lock();
        let Some(bed) = Self::bed(&mut s, subject) else {
            return;
        };
        if cleared {
            bed.alarms.remove(rule);
        } else {
            bed.alarms.insert(rule.to_owned(), body);
        }
        self.send_bed(&mut s, subject);
    }

    /// Sends a heartbeat event, so that readers can tell a quiet ward from a dead connection.
    pub fn heartbeat(&self) {
        let mut s = self.lock();
        s.last_id += 1;
        let _ = self.events.send(WardEvent {
            id: s.last_id,
            kind: "heartbeat",
            data: json!({"now": format_ts(crate::model::reading::now_micros())}),
        });
    }

    fn bed<'a>(s: &'a mut WardState, subject: &str) -> Option<&'a mut Bed> {
        if !s.beds.contains_key(subject) {
            if s.beds.len() >= MAX_BEDS {
                s.untracked += 1;
                return None;
            }
            s.beds.insert(
                subject.to_owned(),
                Bed {
                    subject: subject.to_owned(),
                    ..Bed::default()
                },
            );
        }
        s.beds.get_mut(subject)
    }

    fn send_bed(&self, s: &mut WardState, subject: &str) {
        let Some(bed) = s.beds.get(subject) else {
            return;
        };
        let data = serde_json::to_value(bed).expect("a bed serialises");
        s.last_id += 1;
        // No receiver is not an error: nobody is watching.
        let _ = self.events.send(WardEvent {
            id: s.last_id,
            kind: "bed",
            data,
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WardState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(subject: &str, metric: Metric, v: f64, ts_s: i64) -> VitalReading {
        VitalReading {
            subject: subject.into(),
            metric,
            value: Some(v),
            text: None,
            ts: ts_s * 1_000_000,
            received: ts_s * 1_000_000,
        }
    }

    #[test]
    fn a_bed_keeps_its_latest_vitals_and_fifteen_minutes_of_trend() {
        let hub = WardHub::new("w");
        let mut rx = hub.subscribe();
        let readings: Vec<_> = (0..60)
            .map(|i| reading("bed-1", Metric::HeartRate, 60.0 + i as f64, i * 30))
            .collect();
        hub.vitals(&readings);
        // An older reading arriving late changes nothing.
        hub.vitals(&[reading("bed-1", Metric::HeartRate, 10.0, 0)]);
        let (id, snap) = hub.snapshot();
        assert_eq!(id, 1, "one event for one batch of one bed");
        let hr = &snap["beds"][0]["vitals"]["heart_rate"];
        assert_eq!(hr["value"], 119.0);
        assert_eq!(hr["unit"], "/min");
        let trend = hr["trend"].as_array().unwrap();
        assert_eq!(trend.len(), TREND_POINTS);
        assert_eq!(trend.last().unwrap()[1], 119.0);
        assert_eq!(trend[0][1], 90.0);
        let ev = rx.try_recv().unwrap();
        assert_eq!((ev.id, ev.kind), (1, "bed"));
        assert_eq!(ev.data["subject"], "bed-1");
    }

    #[test]
    fn alarms_come_and_go_and_beds_are_bounded() {
        let hub = WardHub::new("w");
        hub.alarm("bed-1", "spo2-low", json!({"state": "active"}), false);
        assert_eq!(
            hub.snapshot().1["beds"][0]["alarms"]["spo2-low"]["state"],
            "active"
        );
        hub.alarm("bed-1", "spo2-low", json!({"state": "cleared"}), true);
        assert!(hub.snapshot().1["beds"][0]["alarms"]
            .as_object()
            .unwrap()
            .is_empty());
        for i in 0..MAX_BEDS + 3 {
            hub.news2(&format!("bed-{i}"), json!({"total": 0}));
        }
        let (_, snap) = hub.snapshot();
        assert_eq!(snap["beds"].as_array().unwrap().len(), MAX_BEDS);
        assert_eq!(snap["untracked"], 3, "bed-1 was already there");
    }
}
