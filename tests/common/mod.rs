//! Test harness: runs the real `iomt-edge` binary on 127.0.0.1 port 0 in a temp dir and talks to
//! it over MQTT and HTTP, as a user would.

#![allow(dead_code)]

pub mod anvil;
pub mod browser;
pub mod formats;
pub mod load;
pub mod mosquitto;
pub mod proxy;
pub mod raw;
pub mod security;
pub mod tmpfs;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use iomt_edge::model::batch::{BatchBuilder, BatchView, Row};
use iomt_edge::model::reading::{Metric, Reading};
use iomt_edge::seal::keys::NodeKeys;
use iomt_edge::seal::{SealedBatch, Sealer};
use iomt_edge::store::{open_node_keys, KeyMode, SledStore, Store};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

pub const SITE: &str = "test-ward";

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A benchmark's size from the environment (`IOMT_BENCH_…`), or its default.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A pipeline with every listener on a free loopback port and short batch windows, anonymous
/// clients allowed.
pub fn pipeline(extra: &str) -> String {
    pipeline_with_broker("auth.allow_anonymous = true", extra)
}

/// [`pipeline`] with `broker` (TOML lines, dotted keys for sub-tables) in its `[broker]`
/// table instead of the anonymous default.
pub fn pipeline_with_broker(broker: &str, extra: &str) -> String {
    format!(
        r#"
site = "{SITE}"
[broker]
listen = "127.0.0.1:0"
listen_v5 = "127.0.0.1:0"
listen_ws = "127.0.0.1:0"
{broker}
[http]
listen = "127.0.0.1:0"
[ingest]
max_payload_bytes = 4096
# The tests' device clocks read November 2023: trust them.
clock_max_past = "100years"
[batch]
max_rows = 1000
max_age = "100ms"

[[route]]
topic = "ward/+/bed/+/vitals"
codec = "json"
source = "w{{2}}-b{{4}}-mon"
subject = "w{{2}}-b{{4}}"
[route.json]
ts = "/ts"
[[route.json.reading]]
value = "/hr"
metric = "heart_rate"
optional = true
[[route.json.reading]]
value = "/spo2"
metric = "spo2"
optional = true

[[route]]
topic = "ward/+/bed/+/senml"
codec = "senml-json"
source = "w{{2}}-b{{4}}-sensor"
subject = "w{{2}}-b{{4}}"

[[rule]]
name = "spo2-low"
metric = "spo2"
below = 92
for = "30s"
hysteresis = 2
priority = "high"
{extra}
"#
    )
}

/// A shipped pipeline file (site `site`) with its default listeners moved to free loopback
/// ports and the test site.
pub fn on_free_ports(text: &str, site: &str) -> String {
    [
        "127.0.0.1:1883",
        "127.0.0.1:1884",
        "127.0.0.1:8083",
        "127.0.0.1:9100",
    ]
    .iter()
    .fold(text.to_owned(), |t, a| t.replace(a, "127.0.0.1:0"))
    .replace(&format!("site = \"{site}\""), &format!("site = \"{SITE}\""))
}

#[derive(Debug, serde::Deserialize)]
pub struct Endpoints {
    pub mqtt: Option<SocketAddr>,
    pub http: SocketAddr,
}

/// A running service process.
pub struct Edge {
    pub child: Child,
    pub data: PathBuf,
    pub endpoints: Endpoints,
    pub stderr: PathBuf,
}

impl Edge {
    /// Starts the binary with `pipeline_text` on `data` and waits until /healthz says ok.
    pub fn start(pipeline_text: &str, data: &Path) -> Edge {
        Edge::start_with_env(pipeline_text, data, &[])
    }

    /// [`Edge::start`] with extra environment variables (FAILPOINTS, RUST_LOG).
    pub fn start_with_env(pipeline_text: &str, data: &Path, env: &[(&str, &str)]) -> Edge {
        let edge = Edge::spawn(pipeline_text, data, env);
        edge.wait_healthy();
        edge
    }

    /// Starts the binary and waits until it is ready (endpoints written), not until healthy.
    pub fn spawn(pipeline_text: &str, data: &Path, env: &[(&str, &str)]) -> Edge {
        std::fs::create_dir_all(data).unwrap();
        let pipeline = data.with_extension("toml");
        std::fs::write(&pipeline, pipeline_text).unwrap();
        let endpoints_file = data.join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints_file);
        let stderr = data.with_extension("log");
        // Appended to, so a log survives the restarts of one data directory.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr)
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_iomt-edge"));
        for (k, v) in env {
            // An empty value removes the variable: the service runs with its default.
            if v.is_empty() {
                command.env_remove(k);
            } else {
                command.env(k, v);
            }
        }
        let child = command
            .arg("run")
            .arg("--pipeline")
            .arg(&pipeline)
            .arg("--data")
            .arg(data)
            // The log as a user's log file gets it, whatever the test runner's environment.
            .env_remove("NO_COLOR")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start iomt-edge");
        let deadline = Instant::now() + Duration::from_secs(30);
        let endpoints: Endpoints = loop {
            if let Ok(text) = std::fs::read_to_string(&endpoints_file) {
                break serde_json::from_str(&text).expect("endpoints.json");
            }
            assert!(
                Instant::now() < deadline,
                "service did not become ready: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Edge {
            child,
            data: data.to_owned(),
            endpoints,
            stderr,
        }
    }

    /// Waits until /healthz answers 200: ready is not yet healthy (an external broker may
    /// still be connecting).
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (code, body) = self.get("/healthz");
            if code == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not healthy: {body}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The current /healthz status code and body.
    pub fn health(&self) -> (u16, serde_json::Value) {
        let (code, body) = self.get("/healthz");
        (code, serde_json::from_str(&body).unwrap_or_default())
    }

    pub fn mqtt_port(&self) -> u16 {
        self.endpoints.mqtt.expect("embedded broker").port()
    }

    /// A plain HTTP/1.0 GET: status code and body.
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.endpoints.http, path)
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics").1
    }

    /// The value of one sample in /metrics (`name{labels}` exactly as exposed), or 0.
    pub fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics(), sample)
    }

    /// Waits until a metric sample reaches `at_least`.
    pub fn wait_metric(&self, sample: &str, at_least: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.metric(sample);
            if v >= at_least {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{sample} = {v}, waited for {at_least}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and the exit status.
    pub fn stop(mut self) -> ExitStatus {
        signal(&self.child, "TERM");
        let status = self.wait_exit();
        if !status.success() {
            // Shown with the failing test's output, so a failed stop says why.
            eprintln!("service exited with {status}; its log:\n{}", self.log());
        }
        status
    }

    /// SIGTERM, and the exit status with how long the process took to exit.
    pub fn stop_timed(mut self) -> (ExitStatus, Duration) {
        let t = Instant::now();
        signal(&self.child, "TERM");
        let status = self.wait_exit();
        (status, t.elapsed())
    }

    /// Waits for the process to exit on its own (a stage failure), for up to 30 s; returns
    /// its status and its log.
    pub fn wait_for_exit_keeping_log(mut self) -> (ExitStatus, String) {
        let status = self.wait_exit();
        (status, self.log())
    }

    /// SIGKILL: a crash.
    pub fn crash(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "service did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

/// Runs `cmd` with `input` on its standard input: its status and what it printed.
pub fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// Every stored reading, decrypted, in seq order. The service must be stopped.
pub fn stored_readings(data: &Path) -> Vec<Reading> {
    let store = SledStore::open(&data.join("store")).unwrap();
    let keys = open_node_keys(
        &store,
        &data.join("keys"),
        &format!("iomt-edge/{SITE}"),
        KeyMode::ReadOnly,
    )
    .unwrap();
    let sealer = Sealer::new(keys.master);
    let mut out = Vec::new();
    for h in store.headers().unwrap() {
        let batch = sealer
            .open(&store.batch(h.id).unwrap().unwrap())
            .unwrap()
            .batch;
        out.extend(BatchView::new(&batch).unwrap().readings().unwrap());
    }
    drop(store);
    wait_sled_released(&data.join("store"));
    out
}

/// Batch `id`: `rows` heart rates of bed w7-b1, seqs from `id * rows`, one a second from
/// 2023-11-14T22:13:20Z, values 60 + id + row / 100.
pub fn seal_batch(sealer: &Sealer, id: u64, rows: usize) -> SealedBatch {
    let first_seq = id * rows as u64;
    let mut b = BatchBuilder::new(first_seq, rows);
    for i in 0..rows as u64 {
        let ts = 1_700_000_000_000_000 + (first_seq + i) as i64 * 1_000_000;
        b.push(Row {
            ts,
            received: ts + 500,
            source: "w7-b1-mon",
            subject: Some("w7-b1"),
            metric: Metric::HeartRate,
            value: Some(60.0 + id as f64 + i as f64 / 100.0),
            text: None,
            flags: 0,
        });
    }
    sealer.seal(id, b.take()).unwrap()
}

/// A data directory with `n` batches of `rows` readings ([`seal_batch`]) written through the
/// library, keys created under the test site. With `record_check`, as the service does; without,
/// as a version that did not record the master key's check value yet.
pub fn write_store(data: &Path, n: u64, rows: usize, record_check: bool) {
    let store = SledStore::open(&data.join("store")).unwrap();
    let keys_dir = data.join("keys");
    let name = format!("iomt-edge/{SITE}");
    let keys = if record_check {
        open_node_keys(&store, &keys_dir, &name, KeyMode::CreateIfFresh).unwrap()
    } else {
        NodeKeys::load_or_create(&keys_dir, &name).unwrap()
    };
    let sealer = Sealer::new(keys.master);
    let batches: Vec<_> = (0..n).map(|id| seal_batch(&sealer, id, rows)).collect();
    store.put_batches(&batches).unwrap();
    drop(store);
    wait_sled_released(&data.join("store"));
}

/// Waits until no handle of this process holds the sled database in `dir` any more: sled's
/// background threads may keep its lock for a moment after the last `Db` is dropped, and a
/// process started next (the service, `dump`, `verify`) would find it taken.
pub fn wait_sled_released(dir: &Path) {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::File::open(dir.join("db")) else {
        return;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}: sled's lock still held",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An MQTT client connected to `port`, with its event loop.
pub fn client(port: u16, id: &str) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(200)
        .set_max_packet_size(4 << 20, 4 << 20);
    AsyncClient::new(opts, 1000)
}

/// Publishes every message at QoS 1 and returns once the broker acknowledged them all.
pub async fn publish_all(port: u16, messages: &[(String, Vec<u8>)]) {
    let (client, mut ev) = client(port, &format!("pub-{}", rand::random::<u32>()));
    let n = messages.len();
    let poll = tokio::spawn(async move {
        let mut acked = 0;
        while acked < n {
            if let Event::Incoming(Packet::PubAck(_)) =
                ev.poll().await.expect("publisher connection")
            {
                acked += 1;
            }
        }
    });
    for (topic, payload) in messages {
        client
            .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), poll)
        .await
        .expect("all acknowledged")
        .unwrap();
    let _ = client.disconnect().await;
}

/// Publishes every message at QoS 0, then disconnects cleanly (so all of them were sent).
pub async fn publish_all_qos0(port: u16, messages: &[(String, Vec<u8>)]) {
    let (client, mut ev) = client(port, &format!("pub0-{}", rand::random::<u32>()));
    let poll = tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    for (topic, payload) in messages {
        client
            .publish(topic.clone(), QoS::AtMostOnce, false, payload.clone())
            .await
            .unwrap();
    }
    client.disconnect().await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), poll)
        .await
        .expect("all sent")
        .unwrap();
}

/// Subscribes to `filter` and returns a receiver of (topic, payload, retain).
pub async fn subscribe(
    port: u16,
    filter: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>, bool)> {
    let (client, mut ev) = client(port, &format!("sub-{}", rand::random::<u32>()));
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _client = client;
        let mut subscribed = Some(subscribed_tx);
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(s) = subscribed.take() {
                        let _ = s.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx
                        .send((p.topic.clone(), p.payload.to_vec(), p.retain))
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
        .await
        .unwrap()
        .unwrap();
    rx
}

/// The next message on `rx` whose topic satisfies `want`, within 20 s.
pub async fn next_matching(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>, bool)>,
    want: impl Fn(&str, &[u8]) -> bool,
) -> (String, Vec<u8>, bool) {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let m = rx.recv().await.expect("subscription open");
            if want(&m.0, &m.1) {
                return m;
            }
        }
    })
    .await
    .expect("expected message did not arrive")
}

/// A JSON vitals message for bed `bed`.
pub fn vitals(bed: u32, ts: i64, hr: f64, spo2: f64) -> (String, Vec<u8>) {
    (
        format!("ward/7/bed/{bed}/vitals"),
        format!(r#"{{"ts":{ts},"hr":{hr},"spo2":{spo2}}}"#).into_bytes(),
    )
}
