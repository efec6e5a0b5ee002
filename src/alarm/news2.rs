//! The National Early Warning Score 2 (Royal College of Physicians, 2017): the sub-score of each
//! of its seven parameters, the total and the clinical risk band, and [`News2Tracker`], which
//! keeps each subject's latest trusted reading of every parameter (in device time, with a
//! staleness window) and says when a subject's score changes, and adaptive monitoring: a command
//! asking a subject's devices to sample faster when the band rises, and to relax once it has
//! stayed below for a while ([`AdaptiveOptions`]), judged in device time like the rules.
//!
//! The chart lists whole numbers (temperature to one decimal); devices report finer. A value
//! between two bands of the chart (91.5 % between 91 and 92, 38.05 °C between 38.0 and 38.1)
//! scores as the band further from normal: an early-warning score that under-calls a patient is
//! the failure that matters, and a device's extra precision is no reason to round a reading back
//! towards calm. Values are first rounded to 10^-6 so that a unit conversion's floating-point
//! residue (38.000000000001 °C from °F) is not taken for such a value.

use serde::{Deserialize, Serialize};

use crate::model::reading::Metric;

/// A NEWS2 parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Param {
    RespRate,
    Spo2,
    AirOrOxygen,
    BpSystolic,
    Pulse,
    Consciousness,
    Temperature,
}

impl Param {
    pub const ALL: [Param; 7] = [
        Param::RespRate,
        Param::Spo2,
        Param::AirOrOxygen,
        Param::BpSystolic,
        Param::Pulse,
        Param::Consciousness,
        Param::Temperature,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Param::RespRate => "resp_rate",
            Param::Spo2 => "spo2",
            Param::AirOrOxygen => "air_or_oxygen",
            Param::BpSystolic => "bp_systolic",
            Param::Pulse => "pulse",
            Param::Consciousness => "consciousness",
            Param::Temperature => "temperature",
        }
    }
}

/// Which SpO2 scale applies: scale 2 only for patients with a prescribed 88–92 % target
/// (hypercapnic respiratory failure), as a clinician decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Spo2Scale {
    #[default]
    One,
    Two,
}

/// ACVPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consciousness {
    Alert,
    /// New confusion.
    Confusion,
    Voice,
    Pain,
    Unresponsive,
}

impl Consciousness {
    /// From the text of a `consciousness` reading: A, C, V, P or U (case-insensitive), or the
    /// words.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text.trim().to_ascii_uppercase().as_str() {
            "A" | "ALERT" => Consciousness::Alert,
            "C" | "CONFUSION" | "NEW CONFUSION" => Consciousness::Confusion,
            "V" | "VOICE" => Consciousness::Voice,
            "P" | "PAIN" => Consciousness::Pain,
            "U" | "UNRESPONSIVE" => Consciousness::Unresponsive,
            _ => return None,
        })
    }
}

/// The clinical risk band of a score, with the response the RCP ties to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Band {
    /// 0–4: ward-based response.
    #[serde(rename = "low")]
    Low,
    /// A score of 3 in any single parameter: urgent ward-based response.
    #[serde(rename = "low-medium")]
    LowMedium,
    /// 5–6: key threshold for urgent response.
    #[serde(rename = "medium")]
    Medium,
    /// 7 or more: urgent or emergency response.
    #[serde(rename = "high")]
    High,
}

impl Band {
    pub fn as_str(self) -> &'static str {
        match self {
            Band::Low => "low",
            Band::LowMedium => "low-medium",
            Band::Medium => "medium",
            Band::High => "high",
        }
    }
}

fn quantised(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

/// Respiration rate, breaths per minute: ≤8 → 3, 9–11 → 1, 12–20 → 0, 21–24 → 2, ≥25 → 3.
pub fn resp_rate(v: f64) -> u8 {
    let v = quantised(v);
    if v < 9.0 {
        3
    } else if v < 12.0 {
        1
    } else if v <= 20.0 {
        0
    } else if v <= 24.0 {
        2
    } else {
        3
    }
}

/// SpO2 %, scale 1: ≤91 → 3, 92–93 → 2, 94–95 → 1, ≥96 → 0.
pub fn spo2_scale1(v: f64) -> u8 {
    let v = quantised(v);
    if v < 92.0 {
        3
    } else if v < 94.0 {
        2
    } else if v < 96.0 {
        1
    } else {
        0
    }
}

/// SpO2 %, scale 2: ≤83 → 3, 84–85 → 2, 86–87 → 1, 88–92 → 0 (and ≥93 on air → 0); on oxygen
/// 93–94 → 1, 95–96 → 2, ≥97 → 3. Unknown oxygen counts as air (the score is then partial).
pub fn spo2_scale2(v: f64, on_oxygen: bool) -> u8 {
    let v = quantised(v);
    if v < 84.0 {
        3
    } else if v < 86.0 {
        2
    } else if v < 88.0 {
        1
    } else if v <= 92.0 || !on_oxygen {
        0
    } else if v <= 94.0 {
        1
    } else if v <= 96.0 {
        2
    } else {
        3
    }
}

/// Air → 0, oxygen → 2.
pub fn air_or_oxygen(on_oxygen: bool) -> u8 {
    if on_oxygen {
        2
    } else {
        0
    }
}

/// Systolic blood pressure, mmHg: ≤90 → 3, 91–100 → 2, 101–110 → 1, 111–219 → 0, ≥220 → 3.
pub fn bp_systolic(v: f64) -> u8 {
    let v = quantised(v);
    if v < 91.0 {
        3
    } else if v < 101.0 {
        2
    } else if v < 111.0 {
        1
    } else if v <= 219.0 {
        0
    } else {
        3
    }
}

/// Pulse, per minute: ≤40 → 3, 41–50 → 1, 51–90 → 0, 91–110 → 1, 111–130 → 2, ≥131 → 3.
pub fn pulse(v: f64) -> u8 {
    let v = quantised(v);
    if v < 41.0 {
        3
    } else if v < 51.0 {
        1
    } else if v <= 90.0 {
        0
    } else if v <= 110.0 {
        1
    } else if v <= 130.0 {
        2
    } else {
        3
    }
}

/// Consciousness: alert → 0; new confusion, voice, pain, unresponsive → 3.
pub fn consciousness(c: Consciousness) -> u8 {
    match c {
        Consciousness::Alert => 0,
        _ => 3,
    }
}

/// Temperature, °C: ≤35.0 → 3, 35.1–36.0 → 1, 36.1–38.0 → 0, 38.1–39.0 → 1, ≥39.1 → 2.
pub fn temperature(v: f64) -> u8 {
    let v = quantised(v);
    if v < 35.1 {
        3
    } else if v < 36.1 {
        1
    } else if v <= 38.0 {
        0
    } else if v <= 39.0 {
        1
    } else {
        2
    }
}

/// The latest trusted value of each parameter, `None` when missing or stale.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observations {
    pub resp_rate: Option<f64>,
    pub spo2: Option<f64>,
    pub on_oxygen: Option<bool>,
    pub bp_systolic: Option<f64>,
    pub pulse: Option<f64>,
    pub consciousness: Option<Consciousness>,
    pub temperature: Option<f64>,
    pub scale: Spo2Scale,
}

/// A subject's score.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Score {
    pub total: u8,
    pub band: Band,
    /// Some parameter is missing or stale: the total counts only those present.
    pub partial: bool,
    /// Each parameter's sub-score, in [`Param::ALL`] order; `None` when missing.
    pub parameters: [Option<u8>; 7],
}

/// The band of a total, given whether any single parameter scored 3.
pub fn band(total: u8, any_three: bool) -> Band {
    if total >= 7 {
        Band::High
    } else if total >= 5 {
        Band::Medium
    } else if any_three {
        Band::LowMedium
    } else {
        Band::Low
    }
}

/// Scores `o`.
pub fn score(o: &Observations) -> Score {
    let spo2 = o.spo2.map(|v| match o.scale {
        Spo2Scale::One => spo2_scale1(v),
        Spo2Scale::Two => spo2_scale2(v, o.on_oxygen.unwrap_or(false)),
    });
    let parameters = [
        o.resp_rate.map(resp_rate),
        spo2,
        o.on_oxygen.map(air_or_oxygen),
        o.bp_systolic.map(bp_systolic),
        o.pulse.map(pulse),
        o.consciousness.map(consciousness),
        o.temperature.map(temperature),
    ];
    let total = parameters.iter().flatten().sum();
    let any_three = parameters.iter().flatten().any(|&s| s == 3);
    Score {
        total,
        band: band(total, any_three),
        partial: parameters.iter().any(Option::is_none),
        parameters,
    }
}

/// `[news2]` of the pipeline file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct News2Options {
    /// Score every subject and publish `news2/<site>/<subject>` (retained) when it changes.
    #[serde(default = "News2Options::default_enabled")]
    pub enabled: bool,
    /// A parameter's latest reading older than this (device time, against the subject's newest
    /// reading) no longer counts: the score is then partial.
    #[serde(default = "News2Options::default_staleness", with = "humantime_serde")]
    pub staleness: std::time::Duration,
    /// Subjects scored at most; readings of more are counted, not scored.
    #[serde(default = "News2Options::default_max_subjects")]
    pub max_subjects: usize,
    /// Subjects with a prescribed 88–92 % SpO2 target (scale 2), or on supplemental oxygen.
    #[serde(default, rename = "subject")]
    pub subjects: Vec<News2Subject>,
    /// Commands asking a subject's devices to sample faster while its band is raised.
    #[serde(default)]
    pub adaptive: Option<AdaptiveOptions>,
}

/// `[news2.adaptive]`: adaptive monitoring. When a subject's band reaches `raise_at`, the
/// service publishes `raise` on `topic` for each of the subject's devices; once the band has
/// stayed below `raise_at` for `relax_after` (device time), it publishes `relax`. The topic and
/// payloads are templates: `{site}`, `{subject}`, `{source}` (the device), `{band}`, `{total}`;
/// in the topic, subject and source are written as topic levels, in the payload as JSON string
/// contents.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveOptions {
    #[serde(default = "AdaptiveOptions::default_raise_at")]
    pub raise_at: Band,
    #[serde(
        default = "AdaptiveOptions::default_relax_after",
        with = "humantime_serde"
    )]
    pub relax_after: std::time::Duration,
    pub topic: String,
    pub raise: String,
    pub relax: String,
}

impl AdaptiveOptions {
    const fn default_raise_at() -> Band {
        Band::Medium
    }

    const fn default_relax_after() -> std::time::Duration {
        std::time::Duration::from_secs(10 * 60)
    }

    fn check(&self) -> Result<(), (String, String)> {
        if self.raise_at == Band::Low {
            return Err((
                "news2.adaptive.raise_at".into(),
                "`low` holds for every subject: use low-medium, medium or high".into(),
            ));
        }
        if self.relax_after.is_zero() {
            return Err((
                "news2.adaptive.relax_after".into(),
                "must be above zero".into(),
            ));
        }
        let topic = self.render_topic("s", "subject", "source");
        if crate::topic::check_topic_name(topic.as_bytes()).is_err() || topic.contains(['+', '#']) {
            return Err((
                "news2.adaptive.topic".into(),
                "must render to a topic name (levels, no wildcards)".into(),
            ));
        }
        for (key, t) in [("raise", &self.raise), ("relax", &self.relax)] {
            if t.is_empty() {
                return Err((format!("news2.adaptive.{key}"), "must not be empty".into()));
            }
        }
        Ok(())
    }

    /// The command topic for one device.
    pub fn render_topic(&self, site: &str, subject: &str, source: &str) -> String {
        self.topic
            .replace("{site}", site)
            .replace("{subject}", &crate::topic::level(subject))
            .replace("{source}", &crate::topic::level(source))
    }

    /// The command payload for one device.
    pub fn render_payload(&self, c: &Command, site: &str, source: &str) -> String {
        let json_text = |s: &str| {
            let quoted = serde_json::to_string(s).expect("a string serialises");
            quoted[1..quoted.len() - 1].to_owned()
        };
        let template = if c.raise { &self.raise } else { &self.relax };
        template
            .replace("{site}", &json_text(site))
            .replace("{subject}", &json_text(&c.subject))
            .replace("{source}", &json_text(source))
            .replace("{band}", c.band.as_str())
            .replace("{total}", &c.total.to_string())
    }
}

/// An adaptive-monitoring command for one subject's devices.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub subject: String,
    /// The devices heard for the subject (at most [`MAX_SOURCES`]).
    pub sources: Vec<String>,
    /// Raise the sampling rate (or relax it).
    pub raise: bool,
    pub band: Band,
    pub total: u8,
    /// Device time of the reading that decided it, µs.
    pub ts: i64,
}

/// Devices remembered per subject for its commands.
pub const MAX_SOURCES: usize = 8;

/// `[[news2.subject]]`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct News2Subject {
    pub name: String,
    #[serde(default)]
    pub spo2_scale: Option<u8>,
    #[serde(default)]
    pub on_oxygen: Option<bool>,
}

impl News2Options {
    const fn default_enabled() -> bool {
        true
    }

    const fn default_staleness() -> std::time::Duration {
        std::time::Duration::from_secs(15 * 60)
    }

    const fn default_max_subjects() -> usize {
        10_000
    }

    /// What is wrong with these options, as a key and a message.
    pub fn check(&self) -> Result<(), (String, String)> {
        if self.staleness.is_zero() {
            return Err(("news2.staleness".into(), "must be above zero".into()));
        }
        for (i, s) in self.subjects.iter().enumerate() {
            if !matches!(s.spo2_scale, None | Some(1) | Some(2)) {
                return Err((format!("news2.subject[{i}].spo2_scale"), "is 1 or 2".into()));
            }
        }
        if let Some(a) = &self.adaptive {
            a.check()?;
        }
        Ok(())
    }

    /// The tracker these options describe; `None` when scoring is off.
    pub fn build(&self) -> Option<News2Tracker> {
        if !self.enabled {
            return None;
        }
        let mut t = News2Tracker::new(self.staleness, self.max_subjects);
        t.adaptive = self.adaptive.as_ref().map(|a| Adaptive {
            raise_at: a.raise_at,
            relax_after_us: i64::try_from(a.relax_after.as_micros()).unwrap_or(i64::MAX),
        });
        for s in &self.subjects {
            let scale = s.spo2_scale.map(|n| match n {
                2 => Spo2Scale::Two,
                _ => Spo2Scale::One,
            });
            t.configure(&s.name, scale, s.on_oxygen);
        }
        Some(t)
    }
}

impl Default for News2Options {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// One reading as the tracker sees it.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub metric: Metric,
    pub value: Option<f64>,
    pub text: Option<&'a str>,
    /// Device time, µs.
    pub ts: i64,
    pub seq: u64,
    pub flags: u16,
}

/// The reading behind a parameter's sub-score: what a published score names as its evidence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evidence {
    pub score: u8,
    /// The value scored: a number, or the ACVPU letter, or "air"/"oxygen".
    pub value: serde_json::Value,
    pub seq: u64,
    /// Device time, µs.
    pub ts: i64,
}

/// A subject's score changed: what `news2/<site>/<subject>` carries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct News2Update {
    pub subject: String,
    pub total: u8,
    pub band: Band,
    pub partial: bool,
    pub scale: u8,
    /// Each parameter present: its sub-score and the reading behind it.
    pub parameters: std::collections::BTreeMap<&'static str, Evidence>,
    /// Parameters never seen for this subject, and those whose latest reading is older than the
    /// staleness window.
    pub missing: Vec<&'static str>,
    pub stale: Vec<&'static str>,
    /// Device time of the reading that changed the score, µs.
    pub ts: i64,
    /// The reading that changed the score, whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger: Option<super::EvidenceReading>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Latest {
    value: f64,
    consciousness: Option<Consciousness>,
    seq: u64,
    ts: i64,
}

/// Inputs, in the order of [`SubjectState::latest`].
const INPUTS: [Metric; 8] = [
    Metric::RespRate,
    Metric::Spo2,
    Metric::O2Flow,
    Metric::BpSystolic,
    Metric::HeartRate,
    Metric::PulseRate,
    Metric::Consciousness,
    Metric::BodyTemp,
];

/// A score and the readings behind each parameter (in [`Param::ALL`] order; for air or
/// oxygen, the flow reading if any).
struct Assessed {
    score: Score,
    behind: [Option<Latest>; 7],
    on_oxygen: Option<bool>,
}

/// A subject's whole NEWS2 state: what is kept across a restart.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SubjectState {
    latest: [Option<Latest>; 8],
    scale: Spo2Scale,
    /// A subject setting: on supplemental oxygen whatever the flow readings say.
    on_oxygen: Option<bool>,
    last: Option<(u8, Band, bool, [Option<u8>; 7])>,
    /// The devices heard for this subject, newest last.
    #[serde(default)]
    sources: Vec<String>,
    /// Adaptive monitoring: the devices were asked to sample faster.
    #[serde(default)]
    raised: bool,
    /// Device time the band went below `raise_at` while raised.
    #[serde(default)]
    calm_since: Option<i64>,
    /// Device time of the newest reading taken: the time a score is judged at.
    #[serde(default)]
    newest: i64,
}

#[derive(Debug, Clone, Copy)]
struct Adaptive {
    raise_at: Band,
    relax_after_us: i64,
}

/// Per-subject NEWS2 state: the latest trusted reading of each parameter, and the last score
/// published. Bounded: beyond `max_subjects` new subjects are not tracked (counted).
#[derive(Debug)]
pub struct News2Tracker {
    staleness_us: i64,
    max_subjects: usize,
    /// Subject → index into `states`; a slab, so that readings of the subject just seen (runs
    /// of one message) need no hashing at all.
    index: std::collections::HashMap<String, usize>,
    states: Vec<(String, SubjectState)>,
    last: Option<usize>,
    untracked: u64,
    adaptive: Option<Adaptive>,
    commands: Vec<Command>,
    /// Subjects (indices) recorded since the last [`Self::score_pending`].
    pending: Vec<usize>,
}

use crate::model::reading::flags::NOT_CLINICAL;

impl News2Tracker {
    pub fn new(staleness: std::time::Duration, max_subjects: usize) -> Self {
        News2Tracker {
            staleness_us: i64::try_from(staleness.as_micros()).unwrap_or(i64::MAX),
            max_subjects,
            index: std::collections::HashMap::new(),
            states: Vec::new(),
            last: None,
            untracked: 0,
            adaptive: None,
            commands: Vec::new(),
            pending: Vec::new(),
        }
    }

    /// The adaptive-monitoring commands decided since the last call.
    pub fn take_commands(&mut self) -> Vec<Command> {
        std::mem::take(&mut self.commands)
    }

    /// A subject's state, to keep across a restart.
    pub fn snapshot(&self, subject: &str) -> Option<&SubjectState> {
        self.index.get(subject).map(|&i| &self.states[i].1)
    }

    /// Every subject's state.
    pub fn snapshots(&self) -> impl Iterator<Item = (&String, &SubjectState)> {
        self.states.iter().map(|(s, st)| (s, st))
    }

    /// After a restart: a subject's state as it was. Settings the pipeline file gives win over
    /// the kept ones only where the kept ones are unset.
    pub fn restore(&mut self, subject: &str, state: SubjectState) {
        if let Some(s) = self.state(subject) {
            let (scale, on_oxygen) = (s.scale, s.on_oxygen);
            *s = state;
            if s.scale == Spo2Scale::One {
                s.scale = scale;
            }
            s.on_oxygen = s.on_oxygen.or(on_oxygen);
        }
    }

    /// Readings of subjects not tracked because `max_subjects` are.
    pub fn untracked(&self) -> u64 {
        self.untracked
    }

    /// A subject's settings: its SpO2 scale, and whether it is on supplemental oxygen.
    pub fn configure(&mut self, subject: &str, scale: Option<Spo2Scale>, on_oxygen: Option<bool>) {
        if let Some(state) = self.state(subject) {
            if let Some(s) = scale {
                state.scale = s;
            }
            state.on_oxygen = on_oxygen.or(state.on_oxygen);
        }
    }

    /// A subject's settings, exactly: its SpO2 scale, and whether it is on oxygen (`None`: as
    /// its flow readings say).
    pub fn set_settings(&mut self, subject: &str, scale: Spo2Scale, on_oxygen: Option<bool>) {
        if let Some(state) = self.state(subject) {
            state.scale = scale;
            state.on_oxygen = on_oxygen;
            // The next reading publishes the score on the new settings.
            state.last = None;
        }
    }

    fn state(&mut self, subject: &str) -> Option<&mut SubjectState> {
        let i = self.slot_of(subject)?;
        Some(&mut self.states[i].1)
    }

    fn slot_of(&mut self, subject: &str) -> Option<usize> {
        if let Some(i) = self.last {
            if self.states[i].0 == subject {
                return Some(i);
            }
        }
        let i = match self.index.get(subject) {
            Some(&i) => i,
            None if self.states.len() >= self.max_subjects => {
                self.untracked += 1;
                return None;
            }
            None => {
                let i = self.states.len();
                self.index.insert(subject.to_owned(), i);
                self.states
                    .push((subject.to_owned(), SubjectState::default()));
                i
            }
        };
        self.last = Some(i);
        Some(i)
    }

    /// Takes one reading and scores its subject at once: its new score when it changed. For
    /// readings that arrive together, [`Self::record`] each, then [`Self::score_pending`].
    pub fn observe(
        &mut self,
        subject: &str,
        source: &str,
        o: &Observation<'_>,
    ) -> Option<News2Update> {
        if !self.record(subject, source, o) {
            return None;
        }
        self.score_pending().pop()
    }

    /// Takes one reading into its subject's state without scoring it; true when it counted.
    /// A reading older than the one a parameter holds (out of order) changes nothing; flagged
    /// readings are ignored.
    pub fn record(&mut self, subject: &str, source: &str, o: &Observation<'_>) -> bool {
        self.record_at(subject, source, o).is_some()
    }

    /// [`Self::record`], answering with the subject's index when the reading counted.
    pub fn record_at(&mut self, subject: &str, source: &str, o: &Observation<'_>) -> Option<usize> {
        let slot = INPUTS.iter().position(|m| *m == o.metric)?;
        if o.flags & NOT_CLINICAL != 0 {
            return None;
        }
        let latest = match o.metric {
            Metric::Consciousness => Latest {
                value: 0.0,
                consciousness: Some(o.text.and_then(Consciousness::parse)?),
                seq: o.seq,
                ts: o.ts,
            },
            _ => Latest {
                value: o.value.filter(|v| v.is_finite())?,
                consciousness: None,
                seq: o.seq,
                ts: o.ts,
            },
        };
        let index = self.slot_of(subject)?;
        let state = &mut self.states[index].1;
        if state.latest[slot].is_some_and(|l| l.ts > o.ts) {
            return None;
        }
        if !state.sources.iter().any(|s| s == source) {
            if state.sources.len() >= MAX_SOURCES {
                state.sources.remove(0);
            }
            state.sources.push(source.to_owned());
        }
        state.latest[slot] = Some(latest);
        state.newest = state.newest.max(o.ts);
        if !self.pending.contains(&index) {
            self.pending.push(index);
        }
        Some(index)
    }

    /// The name of the subject at `index` (from [`Self::record_at`]).
    pub fn subject_at(&self, index: usize) -> &str {
        &self.states[index].0
    }

    /// Scores every subject [`Self::record`] took readings of since the last call, once each
    /// (readings of one message are one observation: scoring them one by one would mix a new
    /// heart rate with the previous respiration rate); returns the scores that changed.
    pub fn score_pending(&mut self) -> Vec<News2Update> {
        let mut out = Vec::new();
        let (staleness, adaptive) = (self.staleness_us, self.adaptive);
        let mut pending = std::mem::take(&mut self.pending);
        for &index in &pending {
            let (subject, state) = &mut self.states[index];
            let subject = subject.as_str();
            let now = state.newest;
            let assessed = Self::assess(state, now, staleness);
            if let Some(a) = adaptive {
                if let Some(c) = Self::adapt(a, subject, state, &assessed.score, now) {
                    self.commands.push(c);
                }
            }
            let key = (
                assessed.score.total,
                assessed.score.band,
                assessed.score.partial,
                assessed.score.parameters,
            );
            if state.last == Some(key) {
                continue;
            }
            state.last = Some(key);
            out.push(Self::evaluate(subject, state, &assessed, now));
        }
        // Kept for its allocation: the next message reuses it.
        pending.clear();
        self.pending = pending;
        out
    }

    /// Adaptive monitoring: whether this score asks the subject's devices to change pace.
    fn adapt(
        a: Adaptive,
        subject: &str,
        state: &mut SubjectState,
        score: &Score,
        now: i64,
    ) -> Option<Command> {
        let command = |raise| Command {
            subject: subject.to_owned(),
            sources: state.sources.clone(),
            raise,
            band: score.band,
            total: score.total,
            ts: now,
        };
        if score.band >= a.raise_at {
            state.calm_since = None;
            if state.raised {
                return None;
            }
            state.raised = true;
            return Some(command(true));
        }
        if !state.raised {
            return None;
        }
        let calm = *state.calm_since.get_or_insert(now);
        if now.saturating_sub(calm) < a.relax_after_us {
            return None;
        }
        state.raised = false;
        state.calm_since = None;
        Some(command(false))
    }

    /// A subject's score now, and the readings behind it: no allocation, since it runs for
    /// every message that carries a NEWS2 input.
    fn assess(s: &SubjectState, now: i64, staleness: i64) -> Assessed {
        let fresh = |slot: usize| s.latest[slot].filter(|l| now.saturating_sub(l.ts) <= staleness);
        // Oxygen: a setting, or the latest flow reading.
        let flow = fresh(2);
        let on_oxygen = match (s.on_oxygen, flow) {
            (Some(true), _) => Some(true),
            (_, Some(f)) => Some(f.value > 0.0),
            (setting, None) => setting,
        };
        // Pulse: heart rate or pulse rate, whichever is newer.
        let pulse = match (fresh(4), fresh(5)) {
            (Some(a), Some(b)) => Some(if b.ts > a.ts { b } else { a }),
            (a, b) => a.or(b),
        };
        let behind = [
            fresh(0),
            fresh(1),
            flow,
            fresh(3),
            pulse,
            fresh(6),
            fresh(7),
        ];
        let obs = Observations {
            scale: s.scale,
            on_oxygen,
            resp_rate: behind[0].map(|l| l.value),
            spo2: behind[1].map(|l| l.value),
            bp_systolic: behind[3].map(|l| l.value),
            pulse: behind[4].map(|l| l.value),
            consciousness: behind[5].and_then(|l| l.consciousness),
            temperature: behind[6].map(|l| l.value),
        };
        Assessed {
            score: score(&obs),
            behind,
            on_oxygen,
        }
    }

    /// The whole update for a score [`Self::assess`] found changed.
    fn evaluate(subject: &str, s: &SubjectState, a: &Assessed, now: i64) -> News2Update {
        let seen = |slot: usize| s.latest[slot].is_some();
        let mut parameters = std::collections::BTreeMap::new();
        let mut missing = Vec::new();
        let mut stale = Vec::new();
        let mut note = |p: Param, slots: &[usize]| {
            if slots.iter().any(|&i| seen(i)) {
                stale.push(p.as_str());
            } else {
                missing.push(p.as_str());
            }
        };
        let on_oxygen = a.on_oxygen;
        let flow = a.behind[2];
        let numeric = |i: usize| a.behind[i].map(|l| (l.value, l));
        let (rr, spo2, sbp, pulse, avpu, temp) = (
            numeric(0),
            numeric(1),
            numeric(3),
            numeric(4),
            a.behind[5],
            numeric(6),
        );
        let score = a.score.clone();
        let number = |v: f64| serde_json::json!(v);
        let evidence = [
            rr.map(|(v, l)| (number(v), l)),
            spo2.map(|(v, l)| (number(v), l)),
            None,
            sbp.map(|(v, l)| (number(v), l)),
            pulse.map(|(v, l)| (number(v), l)),
            avpu.map(|l| {
                let letter = match l.consciousness {
                    Some(Consciousness::Alert) => "A",
                    Some(Consciousness::Confusion) => "C",
                    Some(Consciousness::Voice) => "V",
                    Some(Consciousness::Pain) => "P",
                    _ => "U",
                };
                (serde_json::json!(letter), l)
            }),
            temp.map(|(v, l)| (number(v), l)),
        ];
        let slots: [&[usize]; 7] = [&[0], &[1], &[2], &[3], &[4, 5], &[6], &[7]];
        for (i, p) in Param::ALL.into_iter().enumerate() {
            let Some(sub) = score.parameters[i] else {
                note(p, slots[i]);
                continue;
            };
            let (value, seq, ts) = match &evidence[i] {
                Some((v, l)) => (v.clone(), l.seq, l.ts),
                // Air or oxygen: the flow reading behind it, or the setting (no reading).
                None => (
                    serde_json::json!(if on_oxygen == Some(true) {
                        "oxygen"
                    } else {
                        "air"
                    }),
                    flow.map_or(0, |l| l.seq),
                    flow.map_or(0, |l| l.ts),
                ),
            };
            parameters.insert(
                p.as_str(),
                Evidence {
                    score: sub,
                    value,
                    seq,
                    ts,
                },
            );
        }
        News2Update {
            subject: subject.to_owned(),
            total: score.total,
            band: score.band,
            partial: score.partial,
            scale: match s.scale {
                Spo2Scale::One => 1,
                Spo2Scale::Two => 2,
            },
            parameters,
            missing,
            stale,
            ts: now,
            trigger: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors() -> Value {
        serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/news2-rcp2017.json"
        )))
        .unwrap()
    }

    /// Every band edge of the RCP chart, both sides, for each numeric parameter.
    #[test]
    fn every_band_boundary_of_the_chart_scores_as_the_chart_says() {
        let v = vectors();
        let cases: [(&str, &dyn Fn(f64) -> u8); 7] = [
            ("resp_rate", &resp_rate),
            ("spo2_scale1", &spo2_scale1),
            ("spo2_scale2_air", &|x| spo2_scale2(x, false)),
            ("spo2_scale2_oxygen", &|x| spo2_scale2(x, true)),
            ("bp_systolic", &bp_systolic),
            ("pulse", &pulse),
            ("temperature", &temperature),
        ];
        for (name, f) in cases {
            let rows = v["parameters"][name]
                .as_array()
                .unwrap_or_else(|| panic!("{name}"));
            assert!(!rows.is_empty());
            for row in rows {
                let (x, want) = (row[0].as_f64().unwrap(), row[1].as_u64().unwrap() as u8);
                assert_eq!(f(x), want, "{name} {x}");
            }
        }
    }

    #[test]
    fn values_between_bands_score_as_the_band_further_from_normal() {
        assert_eq!(spo2_scale1(91.5), 3);
        assert_eq!(temperature(38.05), 1);
        assert_eq!(temperature(35.05), 3);
        assert_eq!(resp_rate(20.5), 2);
        assert_eq!(resp_rate(11.5), 1);
        assert_eq!(bp_systolic(219.5), 3);
        assert_eq!(pulse(90.5), 1);
        assert_eq!(spo2_scale2(92.5, true), 1);
        assert_eq!(spo2_scale2(92.5, false), 0);
        // A conversion's residue is not a value between bands.
        assert_eq!(temperature((100.4 - 32.0) * 5.0 / 9.0), 0);
        assert_eq!(temperature(38.000_000_000_001), 0);
    }

    #[test]
    fn consciousness_and_oxygen() {
        assert_eq!(consciousness(Consciousness::Alert), 0);
        for c in ["C", "v", "P", "U", "new confusion"] {
            assert_eq!(consciousness(Consciousness::parse(c).unwrap()), 3, "{c}");
        }
        assert_eq!(Consciousness::parse("X"), None);
        assert_eq!((air_or_oxygen(false), air_or_oxygen(true)), (0, 2));
    }

    /// Whole patients from the vectors: total, band and partial.
    #[test]
    fn whole_patients_score_and_band_as_the_rcp_says() {
        let v = vectors();
        for p in v["patients"].as_array().unwrap() {
            let num = |k: &str| p[k].as_f64();
            let o = Observations {
                resp_rate: num("resp_rate"),
                spo2: num("spo2"),
                on_oxygen: p["on_oxygen"].as_bool(),
                bp_systolic: num("bp_systolic"),
                pulse: num("pulse"),
                consciousness: p["consciousness"].as_str().and_then(Consciousness::parse),
                temperature: num("temperature"),
                scale: if p["scale"].as_u64() == Some(2) {
                    Spo2Scale::Two
                } else {
                    Spo2Scale::One
                },
            };
            let s = score(&o);
            let name = p["name"].as_str().unwrap();
            assert_eq!(u64::from(s.total), p["total"].as_u64().unwrap(), "{name}");
            assert_eq!(s.band.as_str(), p["band"].as_str().unwrap(), "{name}");
            assert_eq!(s.partial, p["partial"].as_bool().unwrap(), "{name}");
        }
    }

    fn obs(metric: Metric, value: f64, ts_s: i64, seq: u64) -> Observation<'static> {
        Observation {
            metric,
            value: Some(value),
            text: None,
            ts: ts_s * 1_000_000,
            seq,
            flags: 0,
        }
    }

    #[test]
    fn the_tracker_scores_the_latest_fresh_reading_of_each_parameter() {
        let mut t = News2Tracker::new(std::time::Duration::from_secs(15 * 60), 10);
        let u = t
            .observe("bed-3", "dev", &obs(Metric::RespRate, 22.0, 0, 1))
            .unwrap();
        assert_eq!((u.total, u.band, u.partial), (2, Band::Low, true));
        assert_eq!(u.parameters["resp_rate"].seq, 1);
        assert!(u.missing.contains(&"spo2") && u.stale.is_empty());
        // The same sub-score again: no update.
        assert!(t
            .observe("bed-3", "dev", &obs(Metric::RespRate, 23.0, 10, 2))
            .is_none());
        let u = t
            .observe("bed-3", "dev", &obs(Metric::Spo2, 91.0, 20, 3))
            .unwrap();
        assert_eq!((u.total, u.band), (5, Band::Medium));
        // Pulse is the newer of heart rate and pulse rate.
        t.observe("bed-3", "dev", &obs(Metric::HeartRate, 120.0, 30, 4));
        let u = t
            .observe("bed-3", "dev", &obs(Metric::PulseRate, 70.0, 40, 5))
            .unwrap();
        assert_eq!(u.parameters["pulse"].seq, 5);
        // Oxygen from a flow reading.
        let u = t
            .observe("bed-3", "dev", &obs(Metric::O2Flow, 2.0, 50, 6))
            .unwrap();
        assert_eq!(u.parameters["air_or_oxygen"].score, 2);
        assert_eq!(u.parameters["air_or_oxygen"].seq, 6);
        // An out-of-order reading changes nothing; a flagged one is ignored.
        assert!(t
            .observe("bed-3", "dev", &obs(Metric::Spo2, 99.0, 5, 7))
            .is_none());
        let mut flagged = obs(Metric::Spo2, 99.0, 60, 8);
        flagged.flags = crate::model::reading::flags::NO_CONTACT;
        assert!(t.observe("bed-3", "dev", &flagged).is_none());
        // Sixteen minutes on, the earlier parameters are stale.
        let u = t
            .observe(
                "bed-3",
                "dev",
                &obs(Metric::BodyTemp, 37.0, 20 + 16 * 60, 9),
            )
            .unwrap();
        assert!(
            u.stale.contains(&"resp_rate") && u.stale.contains(&"spo2"),
            "{u:?}"
        );
        assert_eq!((u.total, u.partial), (0, true));
    }

    #[test]
    fn consciousness_scale_two_and_bounded_subjects() {
        let mut t = News2Tracker::new(std::time::Duration::from_secs(900), 1);
        let avpu = Observation {
            metric: Metric::Consciousness,
            value: None,
            text: Some("V"),
            ts: 0,
            seq: 1,
            flags: 0,
        };
        let u = t.observe("a", "dev", &avpu).unwrap();
        assert_eq!((u.total, u.band), (3, Band::LowMedium));
        assert_eq!(u.parameters["consciousness"].value, serde_json::json!("V"));
        t.configure("a", Some(Spo2Scale::Two), Some(true));
        let u = t
            .observe("a", "dev", &obs(Metric::Spo2, 95.0, 1, 2))
            .unwrap();
        assert_eq!((u.scale, u.parameters["spo2"].score), (2, 2));
        assert_eq!(
            u.parameters["air_or_oxygen"].value,
            serde_json::json!("oxygen")
        );
        assert!(t
            .observe("b", "dev", &obs(Metric::Spo2, 95.0, 1, 3))
            .is_none());
        assert_eq!(t.untracked(), 1);
    }

    #[test]
    fn adaptive_monitoring_raises_with_the_band_and_relaxes_after_a_calm_while() {
        let o: News2Options = toml::from_str(
            "[adaptive]\nraise_at = \"medium\"\nrelax_after = \"10m\"\n\
             topic = \"devices/{source}/sampling\"\nraise = '{\"interval_s\": 5, \"why\": \"{band} {total} {subject}\"}'\n\
             relax = '{\"interval_s\": 300}'\n",
        )
        .unwrap();
        o.check().unwrap();
        let a = o.adaptive.clone().unwrap();
        let mut t = o.build().unwrap();
        let at = |t: &mut News2Tracker, m: Metric, v: f64, s: i64| {
            t.observe("bed \"7\"", "mon-1", &obs(m, v, s, s as u64));
            t.take_commands()
        };
        // Well: RR 16, SpO2 97, HR 70 — nothing to say.
        assert!(at(&mut t, Metric::RespRate, 16.0, 0).is_empty());
        assert!(at(&mut t, Metric::Spo2, 97.0, 1).is_empty());
        // RR 26 (3) + SpO2 93 (2): medium. One raise, not one per reading.
        assert!(
            at(&mut t, Metric::RespRate, 26.0, 60).is_empty(),
            "3 alone: low-medium"
        );
        let c = at(&mut t, Metric::Spo2, 93.0, 61);
        assert_eq!(c.len(), 1);
        assert!(c[0].raise);
        assert_eq!(c[0].sources, ["mon-1"]);
        assert_eq!(
            a.render_topic("w", &c[0].subject, "mon-1"),
            "devices/mon-1/sampling"
        );
        let payload: serde_json::Value =
            serde_json::from_str(&a.render_payload(&c[0], "w", "mon-1")).unwrap();
        assert_eq!(
            payload["why"], "medium 5 bed \"7\"",
            "subject escaped into JSON"
        );
        assert!(
            at(&mut t, Metric::Spo2, 92.0, 62).is_empty(),
            "already raised"
        );
        // Better at 100 s; relaxed only once it has stayed below medium for 10 minutes.
        assert!(at(&mut t, Metric::RespRate, 16.0, 100).is_empty());
        assert!(at(&mut t, Metric::Spo2, 97.0, 101).is_empty());
        assert!(at(&mut t, Metric::Spo2, 97.0, 100 + 599).is_empty());
        let c = at(&mut t, Metric::Spo2, 97.0, 100 + 600);
        assert_eq!(c.len(), 1);
        assert!(!c[0].raise);
    }

    #[test]
    fn options_are_checked_and_configure_subjects() {
        let bad: News2Options =
            toml::from_str("[[subject]]\nname = \"a\"\nspo2_scale = 3\n").unwrap();
        assert_eq!(bad.check().unwrap_err().0, "news2.subject[0].spo2_scale");
        assert!(toml::from_str::<News2Options>("colour = 1").is_err());
        let off: News2Options = toml::from_str("enabled = false").unwrap();
        assert!(off.build().is_none());
        let o: News2Options =
            toml::from_str("[[subject]]\nname = \"a\"\nspo2_scale = 2\non_oxygen = true\n")
                .unwrap();
        o.check().unwrap();
        let mut t = o.build().unwrap();
        let u = t
            .observe("a", "dev", &obs(Metric::Spo2, 95.0, 0, 1))
            .unwrap();
        assert_eq!((u.scale, u.parameters["spo2"].score), (2, 2));
    }
}
