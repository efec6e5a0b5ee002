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
use crate::codec::ClockWindow;
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
    #[serde(default)]
    pub ledger: crate::ledger::LedgerOptions,
    #[serde(default)]
    pub news2: crate::alarm::news2::News2Options,
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
    #[serde(
        default = "BrokerConfig::default_listen",
        deserialize_with = "listen_addr::<_, 1883>"
    )]
    pub listen: SocketAddr,
    /// A second MQTT listener, for deployments that keep MQTT 5 clients on their own port.
    #[serde(
        default = "BrokerConfig::default_listen_v5",
        deserialize_with = "some_listen_addr::<_, 1884>"
    )]
    pub listen_v5: Option<SocketAddr>,
    /// MQTT over websockets.
    #[serde(
        default = "BrokerConfig::default_listen_ws",
        deserialize_with = "some_listen_addr::<_, 8083>"
    )]
    pub listen_ws: Option<SocketAddr>,
    /// `mqtt://host:port`, or `mqtts://host:port` for TLS (port 8883 when omitted): subscribe to
    /// this broker (MQTT 5) instead of running the embedded one.
    #[serde(default)]
    pub external: Option<String>,
    /// The account this node logs in to the external broker with (both its connections).
    /// Needs `external_password_file`.
    #[serde(default)]
    pub external_username: Option<String>,
    /// A file holding that account's password (one line; a trailing line break is not part of
    /// it): mode 0600 or stricter, read at start (a relative path from the working
    /// directory), never logged. Needs `external_username`.
    #[serde(default)]
    pub external_password_file: Option<PathBuf>,
    /// `mqtts://` only: a PEM file of the CA certificates the external broker's certificate
    /// must chain to (a hospital's own CA). Without it, the operating system's trust store.
    #[serde(default)]
    pub external_ca: Option<PathBuf>,
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
    /// What the embedded broker keeps for each subscription filter that a slow subscriber (a
    /// dashboard) has not read yet, before it drops the oldest. Device data never waits here:
    /// it goes straight to ingest.
    #[serde(default = "BrokerConfig::default_subscriber_backlog_bytes")]
    pub subscriber_backlog_bytes: usize,
    /// External broker: how many messages it may send before they are acknowledged (MQTT 5
    /// Receive Maximum). Acknowledgements follow storage, so this window must cover the
    /// messages of a commit cycle.
    #[serde(default = "BrokerConfig::default_inflight")]
    pub inflight: u16,
    /// Embedded broker: lets a listener that is not on loopback run without TLS (behind a
    /// network that encrypts, or for a bench). Anonymous clients are refused there even so.
    /// External mode: lets this node's password go to a broker on another machine over plain
    /// `mqtt://`.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// Embedded broker, per connection: QoS 1/2 publishes taken in and not yet acknowledged
    /// (announced to MQTT 5 clients as Receive Maximum). At the limit the broker stops reading
    /// the connection until acknowledgements go out.
    #[serde(default = "BrokerConfig::default_max_inflight")]
    pub max_inflight: u16,
    /// Embedded broker, per connection: publishes per second on average, and in a burst. A
    /// faster client is slowed (its socket is not read), never answered with a lost message.
    #[serde(default = "BrokerConfig::default_max_messages_per_second")]
    pub max_messages_per_second: u32,
    #[serde(default = "BrokerConfig::default_max_burst")]
    pub max_burst: u32,
    /// Web page origins (`https://dashboard.ward.example`) whose scripts may open MQTT
    /// websockets. A websocket upgrade with any other `Origin` header is refused (403): web
    /// pages the ward's browsers show must not speak MQTT for them. Devices send none.
    #[serde(default)]
    pub ws_allowed_origins: Vec<String>,
    /// TLS on every embedded-broker listener (MQTT and websockets): certificate, key, and a
    /// client CA for devices that log in with certificates.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Who may connect to the embedded broker, and as whom.
    #[serde(default)]
    pub auth: AuthConfig,
}

/// `[broker.auth]`: how devices and staff authenticate to the embedded broker, and what an
/// authenticated account may do.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Per-account passwords (`iomt-edge credentials add`): a CONNECT's user name and password
    /// are checked against it; the user name is then the client's identity.
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// Lets clients connect without a user name (or client certificate). Refused at start for
    /// a listener off loopback without TLS.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// Accounts that may acknowledge alarms (`alarms/<site>/…/ack`), set subjects' settings
    /// (`config/<site>/…`) and subscribe to any topic. Every other account is a device: it
    /// may publish only as itself, and subscribe only to `device_subscribe`.
    #[serde(default)]
    pub operators: Vec<String>,
    /// Topic filters a device account may subscribe to (or within), `{identity}` standing for
    /// its own name, e.g. `ward/cmd/{identity}/#` for the adaptive monitoring commands.
    #[serde(default)]
    pub device_subscribe: Vec<String>,
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
        2 << 20
    }
    const fn default_inflight() -> u16 {
        u16::MAX
    }
    const fn default_max_inflight() -> u16 {
        1000
    }
    const fn default_max_messages_per_second() -> u32 {
        1000
    }
    const fn default_max_burst() -> u32 {
        2000
    }

    /// The embedded broker's listeners.
    pub fn listeners(&self) -> impl Iterator<Item = (&'static str, SocketAddr)> + '_ {
        [
            ("broker.listen", Some(self.listen)),
            ("broker.listen_v5", self.listen_v5),
            ("broker.listen_ws", self.listen_ws),
        ]
        .into_iter()
        .filter_map(|(k, a)| a.map(|a| (k, a)))
    }

    /// The rules that keep the embedded broker safe to open to a ward network: a listener off
    /// loopback is encrypted (or its plaintext is a stated choice), never anonymous without
    /// TLS, and someone must be able to connect at all. `Err((key, why))`.
    fn check_security(&self) -> Result<(), (String, String)> {
        if self.external.is_some() {
            return Ok(());
        }
        let tls = self.tls.is_some();
        for (key, addr) in self.listeners() {
            if addr.ip().is_loopback() || tls {
                continue;
            }
            if self.auth.allow_anonymous {
                return Err((
                    key.into(),
                    format!(
                        "{addr} is not on loopback and has no TLS: anonymous clients would be \
                         let in from the network in plain text. Set [broker.tls], or leave \
                         broker.auth.allow_anonymous off"
                    ),
                ));
            }
            if !self.allow_plaintext {
                return Err((
                    key.into(),
                    format!(
                        "{addr} is not on loopback: devices' passwords and readings would cross \
                         the network in plain text. Set [broker.tls] (cert, key), or \
                         broker.allow_plaintext = true if the network itself is encrypted"
                    ),
                ));
            }
        }
        for (i, name) in self.auth.operators.iter().enumerate() {
            if name.is_empty() || name.contains([':', '/', '+', '#']) {
                return Err((
                    format!("broker.auth.operators[{i}]"),
                    format!("`{name}` is not an account name"),
                ));
            }
        }
        for (i, f) in self.auth.device_subscribe.iter().enumerate() {
            let rendered = f.replace("{identity}", "x");
            crate::topic::TopicFilter::parse(&rendered)
                .map_err(|m| (format!("broker.auth.device_subscribe[{i}]"), m))?;
        }
        if self.max_inflight == 0 || self.max_messages_per_second == 0 || self.max_burst == 0 {
            return Err((
                "broker".into(),
                "max_inflight, max_messages_per_second and max_burst must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The embedded broker needs a way in: credentials, client certificates, or anonymous
    /// clients allowed. Checked when it starts (a pipeline file read only to decode or verify
    /// needs none).
    pub fn check_can_connect(&self) -> Result<(), String> {
        if self.auth.allow_anonymous || self.auth.credentials.is_some() || self.client_certs() {
            return Ok(());
        }
        Err(
            "no client could connect: set broker.auth.credentials (a file made with \
             `iomt-edge credentials add`), broker.tls.client_ca (client certificates), or \
             broker.auth.allow_anonymous = true (loopback or TLS only)"
                .into(),
        )
    }

    /// Whether devices may log in with client certificates (`[broker.tls] client_ca`).
    pub fn client_certs(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.client_ca.is_some())
    }
}

/// `localhost` or a loopback address: a connection that stays on this machine.
fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

impl BrokerConfig {
    /// The external broker's keys agree: a URL that parses, a username and its password file
    /// together, a CA only for TLS, and none of them without `external`.
    fn check_external(&self) -> Result<(), (&'static str, String)> {
        let Some(ext) = &self.external else {
            for (key, set) in [
                ("external_username", self.external_username.is_some()),
                (
                    "external_password_file",
                    self.external_password_file.is_some(),
                ),
                ("external_ca", self.external_ca.is_some()),
            ] {
                if set {
                    return Err((key, "is for an external broker: set `external` too".into()));
                }
            }
            return Ok(());
        };
        let url = BrokerUrl::parse(ext).map_err(|m| ("external", m))?;
        match (&self.external_username, &self.external_password_file) {
            (Some(name), Some(_)) if name.is_empty() => {
                Err(("external_username", "is empty".into()))
            }
            (Some(_), None) => Err((
                "external_password_file",
                "is needed with `external_username`: the file holding its password".into(),
            )),
            (None, Some(_)) => Err((
                "external_username",
                "is needed with `external_password_file`: the account that password is for".into(),
            )),
            _ if self.external_ca.is_some() && !url.tls => Err((
                "external_ca",
                "is for a TLS broker: write `external = \"mqtts://…\"`".into(),
            )),
            (Some(_), Some(_))
                if !url.tls && !is_loopback_host(&url.host) && !self.allow_plaintext =>
            {
                Err((
                    "external",
                    format!(
                        "`{ext}` is plain MQTT to another machine: this node's password would \
                         cross the network in clear text. Write `mqtts://…`, or \
                         broker.allow_plaintext = true if the network itself is encrypted"
                    ),
                ))
            }
            _ => Ok(()),
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// `[http]`: metrics, health, the log of batches, the ward dashboard.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(
        default = "HttpConfig::default_listen",
        deserialize_with = "listen_addr::<_, 9100>"
    )]
    pub listen: SocketAddr,
    /// A file holding the bearer token: mode 0600 or stricter, at least 16 visible ASCII
    /// characters, read at start (a relative path from the working directory). Write actions
    /// (acknowledging an alarm from the dashboard) need it whenever it is set; everything but
    /// `/healthz` needs it off loopback or with `require_token`, where it must be set. Without
    /// it, write actions are taken only on a loopback listener.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// HTTPS on the listener.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Off loopback, plain HTTP is refused unless this says a TLS-terminating proxy in front
    /// of the service encrypts the traffic instead.
    #[serde(default = "HttpConfig::default_allow_plaintext")]
    pub allow_plaintext: bool,
    /// Every path but `/healthz` needs the token even on loopback (as it always does off
    /// loopback): for a machine whose other users must not read the ward.
    #[serde(default = "HttpConfig::default_require_token")]
    pub require_token: bool,
}

impl HttpConfig {
    fn default_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9100))
    }
    const fn default_allow_plaintext() -> bool {
        false
    }
    const fn default_require_token() -> bool {
        false
    }

    /// Whether every path but `/healthz` needs the token: anyone who can reach a listener off
    /// loopback could otherwise read the ward, or the log of batches.
    pub fn requires_token(&self) -> bool {
        self.require_token || !self.listen.ip().is_loopback()
    }

    /// The rules of a listener others can reach, as a key to set and why.
    fn check(&self) -> Result<(), (&'static str, String)> {
        let listen = self.listen;
        let loopback = listen.ip().is_loopback();
        if !loopback && self.tls.is_none() && !self.allow_plaintext {
            return Err((
                "http.tls",
                format!(
                    "the HTTP listener {listen} is not on loopback: set [http.tls] (cert, key) so \
                     that the token and the ward's data do not cross the network in clear \
                     text, or `allow_plaintext = true` if a TLS-terminating proxy in front of \
                     the service does that"
                ),
            ));
        }
        if self.requires_token() && self.token_file.is_none() {
            let why = if loopback {
                "require_token is set".to_owned()
            } else {
                format!("the HTTP listener {listen} is not on loopback")
            };
            return Err((
                "http.token_file",
                format!(
                    "{why}: everything but /healthz needs a bearer token; set token_file to a \
                     file readable by its owner only (mode 0600) holding at least 16 characters \
                     (e.g. `openssl rand -hex 32`)"
                ),
            ));
        }
        Ok(())
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// `[broker.tls]` / `[http.tls]`: TLS on a listener. Relative paths are read from the working
/// directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, the listener's own certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1), mode 0600 or stricter.
    pub key: PathBuf,
    /// PEM CA certificate(s): when set, clients must present a certificate one of them signed
    /// (mutual TLS), and its CommonName is the client's identity.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
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
    /// A device time further than this before the receive time is stored `clock_suspect`.
    #[serde(
        default = "IngestConfig::default_clock_max_past",
        with = "humantime_serde"
    )]
    pub clock_max_past: Duration,
    /// A device time further than this after the receive time is stored `clock_suspect`.
    #[serde(
        default = "IngestConfig::default_clock_max_future",
        with = "humantime_serde"
    )]
    pub clock_max_future: Duration,
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
    const fn default_clock_max_past() -> Duration {
        ClockWindow::DEFAULT_MAX_PAST
    }
    const fn default_clock_max_future() -> Duration {
        ClockWindow::DEFAULT_MAX_FUTURE
    }

    /// The window device times are judged by.
    pub fn clock_window(&self) -> ClockWindow {
        ClockWindow::new(self.clock_max_past, self.clock_max_future)
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
    /// A batch is also cut once this many of its messages wait for their acknowledgement: a
    /// publisher's window of unacknowledged messages (and an external broker's receive window)
    /// must never fill while a batch is still open. In external mode, a quarter of
    /// `broker.inflight` if that is less.
    #[serde(default = "BatchConfig::default_max_unacked")]
    pub max_unacked: usize,
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
    const fn default_max_unacked() -> usize {
        2048
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
    /// Template of the account that may publish here (embedded broker with authentication):
    /// a message from any other account is refused as an impostor. Defaults to `source`, so
    /// that a device can only publish as itself; a gateway's route names the gateway's level.
    #[serde(default)]
    pub identity: Option<String>,
    /// Whether device and subject names read from the payload (SenML `bn`, a FHIR subject, a
    /// gateway's device address) are taken from an authenticated account when they differ from
    /// the topic's. Off: such a message is refused as an impostor. On: the account (a gateway,
    /// an HL7 interface) is trusted to name the devices and patients behind it.
    #[serde(default)]
    pub trust_payload_ids: bool,
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
        if let Err((key, message)) = self.ledger.check() {
            return Err(invalid(0..0, key.into(), message));
        }
        if let Err((key, message)) = self.news2.check() {
            return Err(invalid(0..0, key, message));
        }
        if let Err((key, message)) = self.http.check() {
            let at = HttpListenSpan::find(text).unwrap_or(0..0);
            return Err(invalid(at, key.into(), message));
        }
        if let Err((key, message)) = self.broker.check_security() {
            return Err(invalid(0..0, key, message));
        }
        if let Err((key, message)) = self.broker.check_external() {
            return Err(invalid(0..0, format!("broker.{key}"), message));
        }
        let key_spans = std::cell::OnceCell::new();
        for (i, r) in self.routes.iter().enumerate() {
            let span = r.topic.span();
            let key = |k: &str| format!("route[{i}].{k}");
            let filter = crate::topic::TopicFilter::parse(r.topic.get_ref())
                .map_err(|m| invalid(span.clone(), key("topic"), m))?;
            let characteristic = r.ble.as_ref().and_then(|b| b.characteristic.as_ref());
            for (k, t) in [
                ("source", Some(&r.source)),
                ("subject", r.subject.as_ref()),
                ("identity", r.identity.as_ref()),
                ("ble.characteristic", characteristic),
            ] {
                if let Some(t) = t {
                    let at = || {
                        key_spans
                            .get_or_init(|| RouteKeySpans::find(text))
                            .span(i, k)
                            .unwrap_or_else(|| span.clone())
                    };
                    let template =
                        crate::topic::Template::parse(t).map_err(|m| invalid(at(), key(k), m))?;
                    filter
                        .check_template(&template)
                        .map_err(|m| invalid(at(), key(k), m))?;
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
            r.check()
                .map_err(|(k, m)| invalid(span.clone(), key(k), m))?;
        }
        Ok(())
    }
}

/// Where each route's `source` and `subject` keys are in the file, so that an error in a template
/// names the template's own line. Read again from the text only when a template is wrong: the
/// route structs keep plain strings for the stages that use them.
#[derive(Debug, Default, Deserialize)]
struct RouteKeySpans {
    #[serde(default, rename = "route")]
    routes: Vec<RouteKeySpan>,
}

#[derive(Debug, Deserialize)]
struct RouteKeySpan {
    #[serde(default)]
    source: Option<Spanned<String>>,
    #[serde(default)]
    subject: Option<Spanned<String>>,
    #[serde(default)]
    identity: Option<Spanned<String>>,
}

impl RouteKeySpans {
    fn find(text: &str) -> Self {
        toml::from_str(text).unwrap_or_default()
    }

    fn span(&self, route: usize, key: &str) -> Option<std::ops::Range<usize>> {
        let r = self.routes.get(route)?;
        let value = match key {
            "source" => r.source.as_ref(),
            "subject" => r.subject.as_ref(),
            "identity" => r.identity.as_ref(),
            _ => None,
        };
        value.map(Spanned::span)
    }
}

/// Where `[http] listen` is in the file, so that an error about the HTTP listener names its
/// line.
#[derive(Debug, Deserialize)]
struct HttpListenSpan {
    http: Option<HttpListenSpanTable>,
}

#[derive(Debug, Deserialize)]
struct HttpListenSpanTable {
    listen: Option<Spanned<String>>,
}

impl HttpListenSpan {
    fn find(text: &str) -> Option<std::ops::Range<usize>> {
        let spans: HttpListenSpan = toml::from_str(text).ok()?;
        Some(spans.http?.listen?.span())
    }
}

/// A listener's address: an IP and a port, since a listener binds an interface, not a name.
/// serde's own error for `localhost:1883` says only "invalid socket address syntax"; this one
/// says what to write instead, with the port given (or the listener's usual one, `PORT`).
fn listen_addr<'de, D: serde::Deserializer<'de>, const PORT: u16>(
    d: D,
) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        let port = text
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .unwrap_or(PORT);
        serde::de::Error::custom(format!(
            "`{text}` is not an IP address and port: listeners bind an IP (e.g. 127.0.0.1:{port} \
             for this machine only, 0.0.0.0:{port} for every interface)"
        ))
    })
}

fn some_listen_addr<'de, D: serde::Deserializer<'de>, const PORT: u16>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    listen_addr::<D, PORT>(d).map(Some)
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

/// A broker address: `mqtt://host[:port]` (plain, 1883) or `mqtts://host[:port]` (TLS, 8883).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerUrl {
    pub fn parse(url: &str) -> Result<BrokerUrl, String> {
        let (rest, tls) = if let Some(r) = url.strip_prefix("mqtts://") {
            (r, true)
        } else if let Some(r) = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
        {
            (r, false)
        } else {
            return Err(format!(
                "`{url}`: expected mqtt://host:port or mqtts://host:port"
            ));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("`{url}`: `{p}` is not a port"))?,
            ),
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("`{url}`: no host"));
        }
        Ok(BrokerUrl {
            host: host.to_owned(),
            port,
            tls,
        })
    }
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
    fn a_template_naming_a_level_the_filter_lacks_is_refused() {
        let text = "[[route]]\ntopic = \"ward/+/bed/+/vitals\"\ncodec = \"senml-json\"\nsource = \"{9}\"\n";
        let msg = PipelineConfig::parse(text, "p.toml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "p.toml:4: route[0].source: {9} names topic level 9, but the filter ward/+/bed/+/vitals has 5 levels"
        );
        let text = "[[route]]\ntopic = \"a/+\"\ncodec = \"senml-json\"\n\n[[route]]\ntopic = \"b/+\"\nsubject = \"bed-{3}\"\ncodec = \"senml-json\"\n";
        let msg = PipelineConfig::parse(text, "p.toml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "p.toml:7: route[1].subject: {3} names topic level 3, but the filter b/+ has 2 levels"
        );
        let text = "[[route]]\ntopic = \"ble/+\"\ncodec = \"ble-gatt\"\n[route.ble]\ncharacteristic = \"{3}\"\n";
        let msg = PipelineConfig::parse(text, "p.toml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "p.toml:2: route[0].ble.characteristic: {3} names topic level 3, but the filter ble/+ has 2 levels"
        );
        // Levels past a trailing `#` may exist.
        let text = "[[route]]\ntopic = \"gw/#\"\ncodec = \"senml-json\"\nsource = \"{5}\"\n";
        assert!(PipelineConfig::parse(text, "p.toml").is_ok());
    }

    #[test]
    fn a_host_name_in_a_listen_address_says_what_to_write_instead() {
        let msg = PipelineConfig::parse("[broker]\nlisten = \"localhost:1883\"\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "p.toml:2:10: `localhost:1883` is not an IP address and port: listeners bind an IP \
             (e.g. 127.0.0.1:1883 for this machine only, 0.0.0.0:1883 for every interface)"
        );
        for (text, line, port) in [
            ("[broker]\nlisten_v5 = \"edge.local:1884\"\n", 2, 1884),
            ("site = \"w\"\n[broker]\nlisten_ws = \"ws-host\"\n", 3, 8083),
            ("[http]\nlisten = \"localhost\"\n", 2, 9100),
        ] {
            let msg = PipelineConfig::parse(text, "p.toml")
                .unwrap_err()
                .to_string();
            assert!(msg.starts_with(&format!("p.toml:{line}:")), "{msg}");
            assert!(
                msg.ends_with(&format!(
                    "is not an IP address and port: listeners bind an IP (e.g. 127.0.0.1:{port} \
                     for this machine only, 0.0.0.0:{port} for every interface)"
                )),
                "{msg}"
            );
        }
        let c = PipelineConfig::parse(
            "[broker]\nlisten = \"0.0.0.0:1883\"\nlisten_v5 = \"[::1]:0\"\nallow_plaintext = true\n\
             [http]\nlisten = \"10.0.0.5:9100\"\nallow_plaintext = true\ntoken_file = \"/t\"\n",
            "p.toml",
        )
        .unwrap();
        assert_eq!(c.broker.listen, "0.0.0.0:1883".parse().unwrap());
        assert_eq!(c.broker.listen_v5, Some("[::1]:0".parse().unwrap()));
        assert_eq!(c.broker.listen_ws, BrokerConfig::default_listen_ws());
        assert_eq!(c.http.listen, "10.0.0.5:9100".parse().unwrap());
    }

    #[test]
    fn a_listener_off_loopback_needs_tls_or_a_stated_choice_and_never_lets_anonymous_in() {
        let err = |text: &str| {
            PipelineConfig::parse(text, "p.toml")
                .unwrap_err()
                .to_string()
        };
        let msg = err("[broker]\nlisten = \"0.0.0.0:1883\"\n");
        assert!(
            msg.contains("broker.listen: 0.0.0.0:1883 is not on loopback")
                && msg.contains("[broker.tls]")
                && msg.contains("allow_plaintext"),
            "{msg}"
        );
        let msg = err("[broker]\nlisten_ws = \"192.168.1.5:8083\"\n");
        assert!(msg.contains("broker.listen_ws: 192.168.1.5:8083"), "{msg}");
        // The opt-out covers plaintext, not anonymous clients.
        let msg = err(
            "[broker]\nlisten = \"0.0.0.0:1883\"\nallow_plaintext = true\n\
             [broker.auth]\nallow_anonymous = true\n",
        );
        assert!(msg.contains("anonymous clients would be let in"), "{msg}");
        PipelineConfig::parse(
            "[broker]\nlisten = \"0.0.0.0:1883\"\nallow_plaintext = true\n\
             [broker.auth]\ncredentials = \"creds\"\n",
            "p.toml",
        )
        .unwrap();
        // Loopback and anonymous: the developer's default.
        let c = PipelineConfig::parse("[broker.auth]\nallow_anonymous = true\n", "p.toml").unwrap();
        c.broker.check_can_connect().unwrap();
        // Nobody could connect: refused when the broker starts.
        let c = PipelineConfig::parse("", "p.toml").unwrap();
        assert!(c
            .broker
            .check_can_connect()
            .unwrap_err()
            .contains("no client could connect"));
        // External mode: the hospital broker's own rules apply.
        PipelineConfig::parse(
            "[broker]\nlisten = \"0.0.0.0:1883\"\nexternal = \"mqtt://10.0.0.2:1883\"\n",
            "p.toml",
        )
        .unwrap();
        let msg = err("[broker.auth]\noperators = [\"a:b\"]\n");
        assert!(msg.contains("broker.auth.operators[0]"), "{msg}");
        let msg = err("[broker.auth]\ndevice_subscribe = [\"a/#/b\"]\n");
        assert!(msg.contains("broker.auth.device_subscribe[0]"), "{msg}");
    }

    #[test]
    fn the_http_token_file_is_optional() {
        let c = PipelineConfig::parse("", "p.toml").unwrap();
        assert_eq!(c.http.token_file, None);
        let c =
            PipelineConfig::parse("[http]\ntoken_file = \"/etc/iomt/token\"\n", "p.toml").unwrap();
        assert_eq!(c.http.token_file, Some(PathBuf::from("/etc/iomt/token")));
        let msg = PipelineConfig::parse("[http]\ntoken = \"x\"\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("p.toml:2:") && msg.contains("token"),
            "{msg}"
        );
    }

    #[test]
    fn an_http_listener_off_loopback_needs_tls_or_the_opt_out_and_a_token() {
        let parse = |text: &str| PipelineConfig::parse(text, "p.toml");
        let msg = parse("site = \"w\"\n[http]\nlisten = \"0.0.0.0:9100\"\ntoken_file = \"/t\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with(
                "p.toml:3: http.tls: the HTTP listener 0.0.0.0:9100 is not on loopback: set \
                 [http.tls]"
            ),
            "{msg}"
        );
        assert!(msg.contains("allow_plaintext = true"), "{msg}");

        let c = parse(
            "[http]\nlisten = \"10.0.0.5:9100\"\ntoken_file = \"/t\"\nallow_plaintext = true\n",
        )
        .unwrap();
        assert!(c.http.requires_token() && c.http.tls.is_none());
        let c = parse(
            "[http]\nlisten = \"[::]:9100\"\ntoken_file = \"/t\"\n[http.tls]\ncert = \"/c\"\n\
             key = \"/k\"\n",
        )
        .unwrap();
        let tls = c.http.tls.as_ref().unwrap();
        assert_eq!(
            (tls.cert.to_str(), tls.key.to_str()),
            (Some("/c"), Some("/k"))
        );
        assert_eq!(tls.client_ca, None);
        assert!(c.http.requires_token());

        for text in [
            "[http]\nlisten = \"0.0.0.0:9100\"\nallow_plaintext = true\n",
            "[http]\nlisten = \"10.1.2.3:9100\"\n[http.tls]\ncert = \"/c\"\nkey = \"/k\"\n",
        ] {
            let msg = parse(text).unwrap_err().to_string();
            assert!(
                msg.starts_with("p.toml:2: http.token_file: the HTTP listener")
                    && msg.contains("is not on loopback: everything but /healthz needs a bearer"),
                "{msg}"
            );
        }
        let msg = parse("[http]\nrequire_token = true\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("http.token_file: require_token is set"),
            "{msg}"
        );

        // On loopback, as before: open, no TLS needed.
        let c = parse("[http]\nlisten = \"127.0.0.1:9100\"\n").unwrap();
        assert!(!c.http.requires_token() && !c.http.allow_plaintext);
        let c = parse("[http]\nrequire_token = true\ntoken_file = \"/t\"\n").unwrap();
        assert!(c.http.requires_token());

        let msg = parse("[http.tls]\ncert = \"/c\"\nkey = \"/k\"\nca = \"/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("p.toml:4:") && msg.contains("`ca`"),
            "{msg}"
        );
        let msg = parse("[http.tls]\ncert = \"/c\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("missing field `key`"), "{msg}");
    }

    #[test]
    fn the_clock_window_is_read_from_ingest() {
        let c = PipelineConfig::parse("", "p.toml").unwrap();
        assert_eq!(c.ingest.clock_max_past, Duration::from_secs(86_400));
        assert_eq!(c.ingest.clock_max_future, Duration::from_secs(300));
        assert_eq!(c.ingest.clock_window(), ClockWindow::default());
        let c = PipelineConfig::parse(
            "[ingest]\nclock_max_past = \"7days\"\nclock_max_future = \"30s\"\n",
            "p.toml",
        )
        .unwrap();
        assert_eq!(
            c.ingest.clock_window(),
            ClockWindow::new(Duration::from_secs(7 * 86_400), Duration::from_secs(30))
        );
        let msg = PipelineConfig::parse("[ingest]\nclock_max_past = \"soon\"\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("p.toml:2:"), "{msg}");
        let msg = PipelineConfig::parse("[ingest]\nclock_max_pasts = \"1h\"\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("clock_max_pasts"), "{msg}");
    }

    #[test]
    fn shipped_pipelines_state_their_time_formats() {
        use crate::codec::time::TsFormat;
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let c = PipelineConfig::load(&path).unwrap();
            for (i, r) in c.routes.iter().enumerate() {
                // (reads a device time, its format, or a strftime pattern instead)
                let times = [
                    r.json
                        .as_ref()
                        .map(|j| (j.ts.is_some(), j.ts_format, false)),
                    r.csv
                        .as_ref()
                        .map(|c| (c.ts.is_some(), c.ts_format, c.ts_pattern.is_some())),
                    r.ble
                        .as_ref()
                        .and_then(|b| b.json.as_ref())
                        .map(|j| (j.ts.is_some(), j.ts_format, false)),
                ];
                for (has_ts, format, pattern) in times.into_iter().flatten() {
                    if has_ts && !pattern {
                        assert_ne!(
                            format,
                            TsFormat::Auto,
                            "{}: route[{i}] leaves its time format to a guess",
                            path.display()
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked >= 4, "{checked} routes with device times");
    }

    #[test]
    fn mqtt_urls() {
        let u = |s| BrokerUrl::parse(s).map(|u| (u.host, u.port, u.tls));
        assert_eq!(
            u("mqtt://10.0.0.5:1884"),
            Ok(("10.0.0.5".into(), 1884, false))
        );
        assert_eq!(u("mqtt://broker"), Ok(("broker".into(), 1883, false)));
        assert_eq!(u("mqtts://broker"), Ok(("broker".into(), 8883, true)));
        assert!(u("http://x").is_err());
        assert!(u("mqtt://x:notaport").is_err());
    }

    #[test]
    fn external_broker_credentials_and_ca_keys_agree() {
        let c = PipelineConfig::parse(
            "[broker]\nexternal = \"mqtts://b.example\"\nexternal_username = \"edge\"\nexternal_password_file = \"/etc/iomt/pw\"\nexternal_ca = \"ca.pem\"\n",
            "p.toml",
        )
        .unwrap();
        assert_eq!(c.broker.external_username.as_deref(), Some("edge"));
        assert_eq!(c.broker.external_ca, Some(PathBuf::from("ca.pem")));
        // A password in plain text stays on this machine, or says the network is encrypted.
        for ok in [
            "external = \"mqtt://127.0.0.1:1883\"\n",
            "external = \"mqtt://localhost\"\n",
            "external = \"mqtt://10.1.2.3\"\nallow_plaintext = true\n",
        ] {
            let text = format!(
                "[broker]\n{ok}external_username = \"edge\"\nexternal_password_file = \"pw\"\n"
            );
            PipelineConfig::parse(&text, "p.toml").unwrap();
        }
        for (text, want) in [
            (
                "external = \"mqtt://b\"\nexternal_username = \"edge\"\n",
                "broker.external_password_file: is needed with `external_username`",
            ),
            (
                "external = \"mqtt://b\"\nexternal_password_file = \"pw\"\n",
                "broker.external_username: is needed",
            ),
            (
                "external = \"mqtt://b\"\nexternal_ca = \"ca.pem\"\n",
                "broker.external_ca: is for a TLS broker",
            ),
            (
                "external_username = \"edge\"\n",
                "broker.external_username: is for an external broker",
            ),
            ("external = \"https://b\"\n", "broker.external: `https://b`"),
            (
                "external = \"mqtt://10.1.2.3\"\nexternal_username = \"edge\"\nexternal_password_file = \"pw\"\n",
                "broker.external: `mqtt://10.1.2.3` is plain MQTT to another machine",
            ),
            ("external_user = \"edge\"\n", "external_user"),
        ] {
            let e = PipelineConfig::parse(&format!("[broker]\n{text}"), "p.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
