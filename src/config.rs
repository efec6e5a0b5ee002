//! The pipeline file: one TOML document that says where the broker listens, which topics carry
//! which device format, how batches are cut and which rules raise alarms.
//!
//! Every table denies unknown keys, so a typo is an error, not a silently ignored setting. Errors
//! name the file, the line and the key.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

pub use crate::alarm::RuleConfig;
use crate::codec::ble::BleOptions;
use crate::codec::csv::CsvOptions;
use crate::codec::fhir::FhirOptions;
use crate::codec::json::JsonMapping;
use crate::codec::omh::OmhOptions;
use crate::codec::senml::SenmlOptions;
pub use crate::codec::CodecName;

/// The pipeline the binary runs when no `--pipeline` is given.
pub const DEFAULT_PIPELINE: &str = include_str!("../pipelines/ward.toml");
pub const DEFAULT_PIPELINE_NAME: &str = "pipelines/ward.toml (embedded)";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {message}")]
    Parse {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}:{line}: {key}: {message}")]
    Invalid {
        file: String,
        line: usize,
        key: String,
        message: String,
    },
}

const fn default_true() -> bool {
    true
}

fn default_site() -> String {
    "ward".to_owned()
}

const fn default_stop_timeout() -> Duration {
    Duration::from_secs(15)
}

/// The whole pipeline file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Names this base station in alarm topics (`alarms/<site>/…`) and in its log's origin.
    #[serde(default = "default_site")]
    pub site: String,
    #[serde(default)]
    pub broker: BrokerConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub store: StoreConfig,
    /// A stop (SIGTERM, SIGINT, or a stage failing) ends within this long: past it, whatever
    /// is left unstored is abandoned (it was never acknowledged) and the process exits non-zero.
    #[serde(default = "default_stop_timeout", with = "humantime_serde")]
    pub stop_timeout: Duration,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
}

/// `[broker]`: the embedded broker's listeners, or the external broker to subscribe to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// MQTT listener (3.1.1 and 5, told apart by the CONNECT packet).
    #[serde(default = "BrokerConfig::default_listen")]
    pub listen: SocketAddr,
    /// A second MQTT listener, for deployments that keep MQTT 5 clients on their own port.
    #[serde(default = "BrokerConfig::default_listen_v5")]
    pub listen_v5: Option<SocketAddr>,
    /// MQTT over websockets.
    #[serde(default = "BrokerConfig::default_listen_ws")]
    pub listen_ws: Option<SocketAddr>,
    /// `mqtt://host:port`: subscribe to this broker (MQTT 5) instead of running the embedded
    /// one.
    #[serde(default)]
    pub external: Option<String>,
    /// Client id of the persistent session on the external broker.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default = "BrokerConfig::default_max_connections")]
    pub max_connections: usize,
    /// The largest MQTT packet taken. A bigger publish is counted, dead-lettered without its
    /// bytes and acknowledged (embedded broker), or withheld by the external broker (the
    /// limit is announced to it as MQTT 5's Maximum Packet Size).
    #[serde(default = "BrokerConfig::default_max_packet_bytes")]
    pub max_packet_bytes: usize,
    /// What the embedded broker keeps for each subscription of a slow subscriber (a dashboard)
    /// before it drops the oldest (counted in `iomt_subscriber_messages_lost_total`). Device
    /// data never waits here: it goes straight to ingest.
    #[serde(default = "BrokerConfig::default_subscriber_backlog_bytes")]
    pub subscriber_backlog_bytes: usize,
    /// External broker: how many messages it may send before they are acknowledged (MQTT 5
    /// Receive Maximum). Acknowledgements follow storage, so this window must cover the
    /// messages of a commit cycle.
    #[serde(default = "BrokerConfig::default_inflight")]
    pub inflight: u16,
}

impl BrokerConfig {
    fn default_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1883))
    }
    fn default_listen_v5() -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], 1884)))
    }
    fn default_listen_ws() -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], 8083)))
    }
    const fn default_max_connections() -> usize {
        10_000
    }
    const fn default_max_packet_bytes() -> usize {
        1 << 20
    }
    const fn default_subscriber_backlog_bytes() -> usize {
        8 << 20
    }
    const fn default_inflight() -> u16 {
        8192
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// `[http]`: metrics and health.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(default = "HttpConfig::default_listen")]
    pub listen: SocketAddr,
}

impl HttpConfig {
    fn default_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9100))
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// `[ingest]`: limits on what devices send, and the queues in front of the stages.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Payloads above this are refused before decoding, counted and dead-lettered.
    #[serde(default = "IngestConfig::default_max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// Publish undecodable payloads on `edge/deadletter/<topic>`.
    #[serde(default = "default_true")]
    pub dead_letter: bool,
    /// Messages received and not yet decoded, in bytes. When full, the broker stops reading
    /// from publishers (TCP back-pressure) until ingest catches up.
    #[serde(default = "IngestConfig::default_queue_bytes")]
    pub queue_bytes: usize,
    /// Batches waiting to be sealed and stored.
    #[serde(default = "IngestConfig::default_queue_batches")]
    pub queue_batches: usize,
    /// Alarms and dead letters waiting to be published, in bytes.
    #[serde(default = "IngestConfig::default_output_queue_bytes")]
    pub output_queue_bytes: usize,
}

impl IngestConfig {
    const fn default_max_payload_bytes() -> usize {
        64 << 10
    }
    const fn default_queue_bytes() -> usize {
        16 << 20
    }
    const fn default_queue_batches() -> usize {
        4
    }
    const fn default_output_queue_bytes() -> usize {
        4 << 20
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// `[batch]`: when an open batch is sealed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    #[serde(default = "BatchConfig::default_max_rows")]
    pub max_rows: usize,
    /// A batch is also cut at about this many bytes of readings.
    #[serde(default = "BatchConfig::default_max_bytes")]
    pub max_bytes: usize,
    /// The longest a reading waits in an open batch. Messages are acknowledged only once their
    /// batch is stored, so this also bounds how long a publisher waits for its PUBACK.
    #[serde(default = "BatchConfig::default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// A batch holding messages that wait for their acknowledgement is cut once no message has
    /// arrived for this long: their publishers may be waiting for those acknowledgements.
    #[serde(default = "BatchConfig::default_linger", with = "humantime_serde")]
    pub linger: Duration,
}

impl BatchConfig {
    const fn default_max_rows() -> usize {
        16_384
    }
    const fn default_max_bytes() -> usize {
        8 << 20
    }
    const fn default_max_age() -> Duration {
        Duration::from_millis(200)
    }
    const fn default_linger() -> Duration {
        Duration::from_millis(5)
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// `[store]`: the data directory's disk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Intake pauses while the data directory's filesystem has less free space than this, so
    /// the store never runs out of room in the middle of a write; it resumes once a quarter
    /// more is free again. 0 turns the check off.
    #[serde(default = "StoreConfig::default_min_free_bytes")]
    pub min_free_bytes: u64,
}

impl StoreConfig {
    const fn default_min_free_bytes() -> u64 {
        128 << 20
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// `[[route]]`: a topic filter and the format of what is published there.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub topic: Spanned<String>,
    pub codec: CodecName,
    /// Template of the device id: `{n}` is topic level n (from 1), `{topic}` the whole topic.
    #[serde(default = "RouteConfig::default_source")]
    pub source: String,
    /// Template of the patient/bed/asset the device is attached to.
    #[serde(default)]
    pub subject: Option<String>,
    /// Mapping of the `json` codec.
    #[serde(default)]
    pub json: Option<JsonMapping>,
    /// Options of the `senml-json` and `senml-cbor` codecs.
    #[serde(default)]
    pub senml: Option<SenmlOptions>,
    /// Options of the `ble-*` codecs.
    #[serde(default)]
    pub ble: Option<BleOptions>,
    /// Options of the `fhir` codec.
    #[serde(default)]
    pub fhir: Option<FhirOptions>,
    /// Options of the `omh` codec.
    #[serde(default)]
    pub omh: Option<OmhOptions>,
    /// Columns of the `csv` codec.
    #[serde(default)]
    pub csv: Option<CsvOptions>,
}

impl RouteConfig {
    fn default_source() -> String {
        "{topic}".to_owned()
    }

    /// This route's codec, built with its options table.
    pub fn build_codec(&self) -> Result<std::sync::Arc<dyn crate::codec::Codec>, String> {
        crate::codec::build(
            self.codec,
            &crate::codec::CodecOptions {
                json: self.json.as_ref(),
                senml: self.senml.as_ref(),
                ble: self.ble.as_ref(),
                fhir: self.fhir.as_ref(),
                omh: self.omh.as_ref(),
                csv: self.csv.as_ref(),
            },
        )
    }
}

impl PipelineConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&text, &file)
    }

    /// Loads `path`, or the embedded default pipeline when there is none.
    pub fn load_or_default(path: Option<&PathBuf>) -> Result<Self, ConfigError> {
        match path {
            Some(p) => Self::load(p),
            None => Self::parse(DEFAULT_PIPELINE, DEFAULT_PIPELINE_NAME),
        }
    }

    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let config: PipelineConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
            ConfigError::Parse {
                file: file.to_owned(),
                line,
                column,
                message: e.message().to_owned(),
            }
        })?;
        config.validate(text, file)?;
        Ok(config)
    }

    fn validate(&self, text: &str, file: &str) -> Result<(), ConfigError> {
        let invalid =
            |span: std::ops::Range<usize>, key: String, message: String| ConfigError::Invalid {
                file: file.to_owned(),
                line: line_col(text, span.start).0,
                key,
                message,
            };
        if !valid_topic_level(&self.site) {
            return Err(invalid(0..0, "site".into(), PLAIN_LEVEL.into()));
        }
        if self.batch.max_rows == 0 {
            return Err(invalid(
                0..0,
                "batch.max_rows".into(),
                "must be at least 1".into(),
            ));
        }
        if self.batch.max_age.is_zero() {
            return Err(invalid(
                0..0,
                "batch.max_age".into(),
                "must be above zero".into(),
            ));
        }
        if let Some(ext) = &self.broker.external {
            if let Err(m) = parse_mqtt_url(ext) {
                return Err(invalid(0..0, "broker.external".into(), m));
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            let span = r.topic.span();
            let key = |k: &str| format!("route[{i}].{k}");
            crate::topic::TopicFilter::parse(r.topic.get_ref())
                .map_err(|m| invalid(span.clone(), key("topic"), m))?;
            for (k, t) in [("source", Some(&r.source)), ("subject", r.subject.as_ref())] {
                if let Some(t) = t {
                    crate::topic::Template::parse(t)
                        .map_err(|m| invalid(span.clone(), key(k), m))?;
                }
            }
            r.build_codec()
                .map_err(|m| invalid(span.clone(), key("codec"), m))?;
        }
        let mut names = HashSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            let span = r.name.span();
            let key = |k: &str| format!("rule[{i}].{k}");
            let name = r.name.get_ref();
            if !valid_topic_level(name) {
                return Err(invalid(span, key("name"), PLAIN_LEVEL.into()));
            }
            if !names.insert(name) {
                return Err(invalid(
                    span,
                    key("name"),
                    format!("`{name}` is used by another rule"),
                ));
            }
            match (r.above, r.below) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => {
                    return Err(invalid(
                        span,
                        key("above"),
                        "set exactly one of `above` and `below`".into(),
                    ))
                }
            }
            if r.metric.info().kind != crate::model::reading::ValueKind::Numeric {
                return Err(invalid(
                    span,
                    key("metric"),
                    format!("{} has no numeric value", r.metric),
                ));
            }
            if !(r.hysteresis >= 0.0 && r.hysteresis.is_finite()) {
                return Err(invalid(
                    span,
                    key("hysteresis"),
                    "must be a finite number >= 0".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Sites and rule names stand as topic levels of every alarm as they are.
fn valid_topic_level(s: &str) -> bool {
    crate::topic::is_plain_level(s)
}

const PLAIN_LEVEL: &str =
    "must be one topic level of letters, digits, `-`, `_` and `.` (at most 128 bytes)";

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |p| p + 1) + 1;
    (line, column)
}

/// Splits `mqtt://host:port` into host and port (1883 when omitted).
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .ok_or_else(|| format!("`{url}`: expected mqtt://host:port"))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("`{url}`: `{p}` is not a port"))?,
        ),
        _ => (rest, 1883),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("`{url}`: no host"));
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_pipeline_parses() {
        let c = PipelineConfig::load_or_default(None).unwrap();
        assert!(!c.routes.is_empty());
        assert!(!c.rules.is_empty());
        assert!(c.broker.listen.ip().is_loopback());
        assert!(c.http.listen.ip().is_loopback());
        assert!(c.broker.external.is_none());
    }

    #[test]
    fn unknown_keys_name_file_line_and_key() {
        let err =
            PipelineConfig::parse("site = \"w\"\n[batch]\nmax_rowz = 3\n", "p.toml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("p.toml:3:"), "{msg}");
        assert!(msg.contains("max_rowz"), "{msg}");
    }

    #[test]
    fn semantic_errors_name_the_entry() {
        let text = r#"
[[rule]]
name = "hr-high"
metric = "heart_rate"
above = 120
below = 40
priority = "high"
"#;
        let msg = PipelineConfig::parse(text, "p.toml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "p.toml:3: rule[0].above: set exactly one of `above` and `below`"
        );

        let text = "[[route]]\ntopic = \"a/#/b\"\ncodec = \"json\"\n";
        let msg = PipelineConfig::parse(text, "p.toml")
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("p.toml:2: route[0].topic:"), "{msg}");

        let text = "[[route]]\ntopic = \"a/b\"\ncodec = \"json\"\n";
        let msg = PipelineConfig::parse(text, "p.toml")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("route[0].codec") && msg.contains("[route.json]"),
            "{msg}"
        );

        let text =
            "[[rule]]\nname = \"x\"\nmetric = \"heart_rat\"\nabove = 1\npriority = \"high\"\n";
        let msg = PipelineConfig::parse(text, "p.toml")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("unknown metric `heart_rat`"), "{msg}");
    }

    #[test]
    fn mqtt_urls() {
        assert_eq!(
            parse_mqtt_url("mqtt://10.0.0.5:1884").unwrap(),
            ("10.0.0.5".into(), 1884)
        );
        assert_eq!(
            parse_mqtt_url("mqtt://broker").unwrap(),
            ("broker".into(), 1883)
        );
        assert!(parse_mqtt_url("http://x").is_err());
        assert!(parse_mqtt_url("mqtt://x:notaport").is_err());
    }
}
