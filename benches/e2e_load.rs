//! End-to-end load benchmark, every figure from one run on one machine:
//!
//! 1. **ceiling**: the embedded broker alone, with a consumer that only counts and acknowledges
//!    at once: this machine's MQTT ingest ceiling for this publisher;
//! 2. **service, JSON**: N single-reading JSON messages through the whole service (decode,
//!    alarms, Arrow, leaf hashes, AES-GCM, segment file and sled synced). A PUBACK means
//!    stored, so the run ends when the last PUBACK arrives; also receive→stored latency;
//! 3. **service, SenML packs**: the same with 10 readings a message, in readings/s;
//! 4. **external mode**: publishers offer a fixed rate (50,000 msg/s by default) to a mosquitto
//!    in its default configuration, the service consumes its MQTT 5 session; every message
//!    mosquitto acknowledged must be stored (at least once), and the run fails otherwise;
//! 5. **mosquitto pass-through**: the same publisher through mosquitto to one QoS 1 subscriber.
//!
//! `IOMT_BENCH_ONLY=alarm`: alarm latency, from the publish of a reading that crosses a
//! threshold to the alarm message at a subscriber, while publishers offer a background load
//! (50,000 messages/s by default, `IOMT_BENCH_ALARM_RATE`) that the service decodes, seals and
//! stores; p50, p99 and the worst of 20 probes a second for `IOMT_BENCH_ALARM_SECONDS` (20).
//!
//! ```sh
//! cargo bench --bench e2e_load
//! IOMT_BENCH_MESSAGES=200000 IOMT_BENCH_CONNECTIONS=2 IOMT_BENCH_EXTERNAL_RATE=60000 \
//!     IOMT_BENCH_EXTERNAL_SECONDS=10 cargo bench --bench e2e_load
//! ```
//!
//! Publishers speak MQTT 3.1.1 by hand (tests/common/raw.rs): client libraries cost more CPU per
//! message than the brokers under test.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iomt_edge::config::PipelineConfig;
use iomt_edge::model::metrics::Metrics;
use iomt_edge::pipeline::health::Health;
use iomt_edge::pipeline::input;
use iomt_edge::pipeline::Acker;
use iomt_edge::service::Service;
use iomt_edge::transport::broker::EmbeddedBroker;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use common::{env_or, mosquitto, raw};

const PIPELINE: &str = r#"
site = "bench"
[broker]
listen = "127.0.0.1:0"
listen_v5 = "127.0.0.1:0"
listen_ws = "127.0.0.1:0"
# A load generator is many devices in one connection: the per-device limits would measure
# themselves.
max_messages_per_second = 10000000
max_burst = 10000000
max_inflight = 65535
auth.allow_anonymous = true
[http]
listen = "127.0.0.1:0"
[ingest]
queue_bytes = 67108864
clock_max_past = "100years"
[batch]
max_rows = 16384
max_age = "200ms"
[[route]]
topic = "bench/+/hr"
codec = "json"
source = "dev-{2}"
subject = "bed-{2}"
[route.json]
ts = "/ts"
ts_format = "unix_ms"
[[route.json.reading]]
value = "/hr"
metric = "heart_rate"
[[route]]
topic = "bench/+/senml"
codec = "senml-json"
source = "dev-{2}"
subject = "bed-{2}"
"#;

/// Unacknowledged QoS 1 publishes per connection.
const WINDOW: usize = 400;

/// What a payload looks like.
#[derive(Clone, Copy)]
enum Payload {
    /// `{"ts":…,"hr":…}` on bench/<c>/hr: one reading.
    Json,
    /// A SenML pack of 10 heart-rate records on bench/<c>/senml.
    Senml10,
}

impl Payload {
    fn topic(self, c: usize) -> String {
        match self {
            Payload::Json => format!("bench/{c}/hr"),
            Payload::Senml10 => format!("bench/{c}/senml"),
        }
    }

    fn write(self, i: u64, out: &mut String) {
        use std::fmt::Write;
        out.clear();
        let ms = 1_700_000_000_000u64 + i;
        match self {
            Payload::Json => {
                let _ = write!(out, r#"{{"ts":{ms},"hr":{}}}"#, 60 + i % 60);
            }
            Payload::Senml10 => {
                let _ = write!(
                    out,
                    r#"[{{"bn":"urn:dev:hr:","bt":{},"n":"heart_rate","u":"beat/min","v":{}}}"#,
                    ms as f64 / 1e3,
                    60 + i % 60
                );
                // Names and units do not carry over between records (RFC 8428 §4.5): each
                // record names its own.
                for k in 1..10 {
                    let _ = write!(
                        out,
                        r#",{{"n":"heart_rate","u":"beat/min","t":0.{k},"v":{}}}"#,
                        60 + (i + k) % 60
                    );
                }
                out.push(']');
            }
        }
    }
}

/// How fast a publisher sends: as its window allows, or at a fixed rate.
#[derive(Clone, Copy)]
enum Pace {
    Window,
    /// Messages per second, for this connection.
    Rate(f64),
}

/// Publishes `count` messages on one connection, at most WINDOW unacknowledged; returns the
/// number the broker acknowledged, once all are.
async fn publish(
    addr: SocketAddr,
    c: usize,
    count: usize,
    payload: Payload,
    pace: Pace,
    first_sent: Arc<AtomicU64>,
    t0: Instant,
) -> u64 {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).unwrap();
    raw::handshake(
        &mut stream,
        &format!("bench-pub-{c}-{}", rand::random::<u32>()),
        4,
    )
    .await
    .expect("CONNACK");
    let (rd, wr) = stream.into_split();
    let window = Arc::new(Semaphore::new(WINDOW));
    let acks = raw::count_pubacks(rd, count as u64, window.clone());
    let mut wr = BufWriter::with_capacity(64 << 10, wr);
    let topic = payload.topic(c);
    let mut packet = Vec::with_capacity(512);
    let mut text = String::with_capacity(512);
    let mut pkid: u16 = 0;
    let start = Instant::now();
    first_sent.fetch_min(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    for i in 0..count {
        if let Pace::Rate(r) = pace {
            let due = start + Duration::from_secs_f64(i as f64 / r);
            if due > Instant::now() + Duration::from_millis(1) {
                wr.flush().await.unwrap();
                tokio::time::sleep_until(due.into()).await;
            }
        }
        match window.try_acquire() {
            Ok(p) => p.forget(),
            Err(_) => {
                wr.flush().await.unwrap();
                window.acquire().await.unwrap().forget();
            }
        }
        pkid = pkid.checked_add(1).unwrap_or(1);
        packet.clear();
        payload.write((c * count + i) as u64, &mut text);
        raw::publish_packet(topic.as_bytes(), 1, pkid, text.as_bytes(), 4, &mut packet);
        wr.write_all(&packet).await.unwrap();
    }
    wr.flush().await.unwrap();
    acks.await.unwrap()
}

/// Publishes `total` messages over `connections`; returns (first publish since t0, acked).
async fn publish_all(
    addr: SocketAddr,
    total: usize,
    connections: usize,
    payload: Payload,
    pace: Pace,
    t0: Instant,
) -> (Duration, u64) {
    let first = Arc::new(AtomicU64::new(u64::MAX));
    let per = total / connections;
    let tasks: Vec<_> = (0..connections)
        .map(|c| tokio::spawn(publish(addr, c, per, payload, pace, first.clone(), t0)))
        .collect();
    let mut acked = 0;
    for t in tasks {
        acked += t.await.unwrap();
    }
    (Duration::from_nanos(first.load(Ordering::Relaxed)), acked)
}

fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A quantile from the Prometheus histogram text, interpolated within its bucket.
fn histogram_quantile(text: &str, name: &str, q: f64) -> f64 {
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{name}_bucket{{le=\"")))
        .filter_map(|rest| {
            let (le, v) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, v.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    let target = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= target {
            if le.is_infinite() {
                return lo;
            }
            let frac = if count > below {
                (target - below) / (count - below)
            } else {
                0.0
            };
            return lo + (le - lo) * frac;
        }
        lo = le;
        below = count;
    }
    lo
}

/// The ceiling: the embedded broker with a consumer that only counts, acknowledging each
/// message the moment it reaches the queue ingest would read.
async fn bench_ceiling(total: usize, connections: usize) -> f64 {
    let config = PipelineConfig::parse(PIPELINE, "bench pipeline").unwrap();
    let metrics = Metrics::new();
    let health = Health::new(metrics.clone());
    let (tx, rx) = input::queue(config.ingest.queue_bytes);
    let (mut broker, _publisher, mut acker) = EmbeddedBroker::start(
        &config.broker,
        &config.routes,
        config.ingest.max_payload_bytes,
        tx,
        health.intake(),
        metrics,
        Box::new(|why| panic!("{why}")),
    )
    .await
    .expect("broker starts");
    health.running();
    let addr = broker.listeners.mqtt;
    let counted = Arc::new(AtomicU64::new(0));
    let consumer = {
        let counted = counted.clone();
        std::thread::spawn(move || {
            let mut tokens = Vec::with_capacity(1024);
            loop {
                match rx.recv_deadline(Instant::now() + Duration::from_millis(1)) {
                    Ok(Some(m)) => {
                        counted.fetch_add(1, Ordering::Relaxed);
                        tokens.extend(m.ack);
                        if tokens.len() < 1024 {
                            continue;
                        }
                    }
                    Ok(None) => {}
                    Err(_) => return,
                }
                if !tokens.is_empty() {
                    acker.ack(&tokens);
                    tokens.clear();
                }
            }
        })
    };
    let t0 = Instant::now();
    let (first, acked) =
        publish_all(addr, total, connections, Payload::Json, Pace::Window, t0).await;
    let secs = (t0.elapsed() - first).as_secs_f64();
    broker.stop_accepting().await;
    broker.finish(Instant::now() + Duration::from_secs(5)).await;
    let _ = consumer.join();
    let rate = acked as f64 / secs;
    println!("1. ceiling: embedded broker, consumer that only counts and acknowledges");
    println!("   {acked} messages in {secs:.2} s  ->  {rate:.0} messages/s");
    rate
}

/// The whole service in this process (JSON or SenML packs). Returns (messages/s, readings/s, ok).
async fn bench_service(total: usize, connections: usize, payload: Payload) -> (f64, f64, bool) {
    bench_service_with(total, connections, payload, "").await
}

/// [`bench_service`] with `extra` appended to the pipeline file.
async fn bench_service_with(
    total: usize,
    connections: usize,
    payload: Payload,
    extra: &str,
) -> (f64, f64, bool) {
    let dir = tempfile::tempdir().unwrap();
    let config = PipelineConfig::parse(&format!("{PIPELINE}{extra}"), "bench pipeline").unwrap();
    let service = Service::start(config, dir.path())
        .await
        .expect("service starts");
    let addr = service.endpoints.mqtt.unwrap();
    let metrics = service.metrics.clone();
    let t0 = Instant::now();
    let (first, acked) = publish_all(addr, total, connections, payload, Pace::Window, t0).await;
    let secs = (t0.elapsed() - first).as_secs_f64();
    let stored = metrics.readings_stored.get();
    let text = metrics.render();
    let (rss, peak) = rss_mib();
    service.shutdown();
    let summary = service.wait().await.expect("clean stop");
    let per = match payload {
        Payload::Json => 1,
        Payload::Senml10 => 10,
    };
    let rate = acked as f64 / secs;
    let readings_rate = stored as f64 / secs;
    let name = "iomt_receive_to_stored_seconds";
    let label = match payload {
        Payload::Json => "2. service, JSON, 1 reading a message",
        Payload::Senml10 => "3. service, SenML packs of 10 readings",
    };
    println!("{label} (embedded broker, decode, alarms, Arrow, SHA-256 leaves, AES-256-GCM, segment file and sled synced; PUBACK once stored):");
    println!("   {acked} messages over {connections} connections, QoS 1, window {WINDOW}");
    println!(
        "   all acknowledged (= stored) in {secs:.2} s  ->  {rate:.0} messages/s, {readings_rate:.0} readings/s"
    );
    println!(
        "   receive->stored  p50 {:.1} ms, p99 {:.1} ms (histogram, interpolated)",
        histogram_quantile(&text, name, 0.5) * 1e3,
        histogram_quantile(&text, name, 0.99) * 1e3
    );
    println!(
        "   batches {}, RSS after the run {rss:.0} MiB, peak so far {peak:.0} MiB (whole bench process: publishers and earlier phases included)",
        summary.batches
    );
    println!(
        "   checkpoints cut {}, anchors done (local chain) {}",
        metrics.checkpoints_cut.get(),
        metrics.anchors.with_label_values(&["local", "done"]).get()
    );
    let ok = acked == total as u64 && stored == acked * per && summary.readings == stored;
    if !ok {
        println!("   FAILURE: published {total}, acknowledged {acked}, stored {stored}");
    }
    (rate, readings_rate, ok)
}

/// Alarm latency under a background load: see the module doc.
async fn bench_alarm_latency(rate: usize, seconds: usize, connections: usize) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let extra = r#"
[[route]]
topic = "probe/+/spo2"
codec = "json"
source = "probe-{2}"
subject = "probe-{2}"
[route.json]
ts = "/ts"
ts_format = "unix_ms"
[[route.json.reading]]
value = "/spo2"
metric = "spo2"
[[rule]]
name = "spo2-low"
metric = "spo2"
below = 92
priority = "high"
"#;
    let config = PipelineConfig::parse(&format!("{PIPELINE}{extra}"), "bench pipeline").unwrap();
    let service = Service::start(config, dir.path())
        .await
        .expect("service starts");
    let addr = service.endpoints.mqtt.unwrap();
    let metrics = service.metrics.clone();
    let t0 = Instant::now();
    let background = tokio::spawn(publish_all(
        addr,
        rate * seconds,
        connections,
        Payload::Json,
        Pace::Rate(rate as f64 / connections as f64),
        t0,
    ));
    let mut alarms = common::subscribe(addr.port(), "alarms/bench/probe-1/spo2-low").await;
    let (probe, mut probe_loop) = common::client(addr.port(), "bench-probe");
    tokio::spawn(async move { while probe_loop.poll().await.is_ok() {} });
    // Let the background load settle before measuring.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut latencies = Vec::new();
    let mut missed = 0;
    let probes = (seconds.saturating_sub(2)) * 20;
    for i in 0..probes {
        let low = i % 2 == 0;
        let payload = format!(
            r#"{{"ts":{},"spo2":{}}}"#,
            1_700_000_000_000u64 + i as u64 * 1000,
            if low { 85 } else { 97 }
        );
        let sent = Instant::now();
        probe
            .publish("probe/1/spo2", rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
        let want = if low { "active" } else { "cleared" };
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some((_, p, _)) = alarms.recv().await {
                let v: serde_json::Value = serde_json::from_slice(&p).unwrap_or_default();
                if v["state"] == want {
                    return true;
                }
            }
            false
        })
        .await;
        match got {
            Ok(true) => latencies.push(sent.elapsed()),
            _ => missed += 1,
        }
        tokio::time::sleep_until((sent + Duration::from_millis(50)).into()).await;
    }
    let background_acked = background.await.unwrap().1;
    let offered_secs = t0.elapsed().as_secs_f64();
    latencies.sort();
    let q = |f: f64| latencies[((latencies.len() - 1) as f64 * f).round() as usize];
    println!("alarm latency (publish of the crossing reading -> alarm message at a subscriber):");
    println!(
        "   background: {background_acked} messages acknowledged (= stored) in {offered_secs:.1} s, {:.0} msg/s offered over {connections} connections",
        rate
    );
    println!(
        "   {} probes: p50 {:.2} ms, p99 {:.2} ms, worst {:.2} ms, missed {missed}",
        latencies.len(),
        q(0.5).as_secs_f64() * 1e3,
        q(0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
    );
    println!(
        "   readings stored {}, batches sealed {}",
        metrics.readings_stored.get(),
        metrics.batches_sealed.get()
    );
    service.shutdown();
    service.wait().await.expect("clean stop");
    missed == 0 && background_acked == (rate * seconds / connections * connections) as u64
}

/// External mode through a mosquitto in its default configuration, at an offered rate.
async fn bench_external(rate: usize, seconds: usize, connections: usize) -> Option<(f64, bool)> {
    if !mosquitto::installed() {
        println!("4. external mode: mosquitto not installed, skipped");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = mosquitto::Mosquitto::start(dir.path(), "");
    let text = PIPELINE.replace(
        "[broker]\n",
        &format!(
            "[broker]\nexternal = \"mqtt://127.0.0.1:{}\"\nclient_id = \"bench-edge\"\n",
            broker.port
        ),
    );
    let config = PipelineConfig::parse(&text, "bench pipeline").unwrap();
    let data = dir.path().join("data");
    let service = Service::start(config, &data).await.expect("service starts");
    let health = service.health();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !health.report().ok() {
        assert!(Instant::now() < deadline, "external broker not connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let metrics = service.metrics.clone();
    let total = rate * seconds;
    let addr: SocketAddr = format!("127.0.0.1:{}", broker.port).parse().unwrap();
    let t0 = Instant::now();
    let per_connection = rate as f64 / connections as f64;
    let (first, acked) = publish_all(
        addr,
        total,
        connections,
        Payload::Json,
        Pace::Rate(per_connection),
        t0,
    )
    .await;
    let published = (t0.elapsed() - first).as_secs_f64();
    // Every message mosquitto acknowledged must reach the store.
    let wait = Instant::now() + Duration::from_secs(60);
    let mut last = 0;
    while (metrics.readings_stored.get()) < acked && Instant::now() < wait {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let stored = metrics.readings_stored.get();
        if std::env::var("IOMT_BENCH_TRACE").is_ok() && stored / 10_000 != last / 10_000 {
            println!(
                "   ... {:.2} s: {stored} stored",
                t0.elapsed().as_secs_f64()
            );
        }
        last = stored;
    }
    if metrics.readings_stored.get() < acked {
        println!(
            "   stalled: {} stored, health {:?}",
            metrics.readings_stored.get(),
            health.report()
        );
    }
    let stored_at = (t0.elapsed() - first).as_secs_f64();
    service.shutdown();
    let summary = service.wait().await.expect("clean stop");
    drop(broker);
    // Count distinct messages in the store: at-least-once may store a message twice.
    let unique = stored_unique(&data, "bench");
    let achieved = acked as f64 / stored_at;
    println!("4. external mode: publishers -> mosquitto 2 (default configuration) -> iomt-edge (MQTT 5 session, default receive window 65,535):");
    println!(
        "   offered {rate} messages/s for {seconds} s over {connections} connections: {acked} acknowledged by mosquitto in {published:.2} s"
    );
    println!(
        "   stored {} readings ({unique} distinct messages) {stored_at:.2} s after the first publish  ->  {achieved:.0} messages/s end to end",
        summary.readings
    );
    let ok = unique as u64 >= acked && acked == total as u64;
    if !ok {
        println!(
            "   FAILURE: {} messages mosquitto acknowledged are not stored",
            acked.saturating_sub(unique as u64)
        );
    } else {
        println!("   lost: 0");
    }
    Some((achieved, ok))
}

/// How fast the service drains a backlog mosquitto holds for its session (publishers done).
async fn bench_drain(total: usize, connections: usize) {
    let dir = tempfile::tempdir().unwrap();
    let broker = mosquitto::Mosquitto::start(dir.path(), "max_queued_messages 0");
    let text = PIPELINE.replace(
        "[broker]\n",
        &format!(
            "[broker]\nexternal = \"mqtt://127.0.0.1:{}\"\nclient_id = \"bench-edge\"\n",
            broker.port
        ),
    );
    let data = dir.path().join("data");
    let start = || async {
        let config = PipelineConfig::parse(&text, "bench pipeline").unwrap();
        let service = Service::start(config, &data).await.expect("service starts");
        let health = service.health();
        while !health.report().ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        service
    };
    let service = start().await;
    service.shutdown();
    service.wait().await.unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", broker.port).parse().unwrap();
    let t0 = Instant::now();
    publish_all(addr, total, connections, Payload::Json, Pace::Window, t0).await;
    println!(
        "queued {total} in mosquitto in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let t0 = Instant::now();
    let service = start().await;
    let metrics = service.metrics.clone();
    while (metrics.readings_stored.get() as usize) < total {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "drained {total} in {secs:.2} s -> {:.0} messages/s",
        total as f64 / secs
    );
    service.shutdown();
    service.wait().await.unwrap();
}

/// Distinct message ids (device times) in a stopped service's store.
fn stored_unique(data: &std::path::Path, site: &str) -> usize {
    use iomt_edge::model::batch::BatchView;
    use iomt_edge::seal::Sealer;
    use iomt_edge::store::{open_node_keys, KeyMode, SledStore, Store};
    let store = SledStore::open(&data.join("store")).unwrap();
    let keys = open_node_keys(
        &store,
        &data.join("keys"),
        &format!("iomt-edge/{site}"),
        KeyMode::ReadOnly,
    )
    .unwrap();
    let sealer = Sealer::new(keys.master);
    let mut ts = HashSet::new();
    for h in store.headers().unwrap() {
        let batch = sealer
            .open(&store.batch(h.id).unwrap().unwrap())
            .unwrap()
            .batch;
        let view = BatchView::new(&batch).unwrap();
        ts.extend((0..view.len()).map(|i| view.row(i).ts));
    }
    ts.len()
}

/// mosquitto pass-through: the same publisher, one QoS 1 subscriber.
async fn bench_mosquitto(total: usize, connections: usize) -> Option<f64> {
    if !mosquitto::installed() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = mosquitto::Mosquitto::start(
        dir.path(),
        "max_inflight_messages 1000\nmax_queued_messages 10000000",
    );
    let addr: SocketAddr = format!("127.0.0.1:{}", broker.port).parse().unwrap();
    let mut sub = TcpStream::connect(addr).await.unwrap();
    raw::handshake(&mut sub, "bench-sub", 4).await.unwrap();
    sub.write_all(&raw::subscribe_packet("bench/+/hr", 1))
        .await
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(raw::read_packet(&mut sub, &mut buf).await.unwrap(), 0x90);
    let (mut rd, mut wr) = sub.into_split();
    let t0 = Instant::now();
    let received = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut n = 0;
        let mut acks = Vec::with_capacity(4096);
        while n < total {
            let t = raw::read_packet(&mut rd, &mut buf).await.expect("publish");
            if t >> 4 == 3 {
                n += 1;
                if (t >> 1) & 3 == 1 {
                    let tlen = u16::from_be_bytes([buf[0], buf[1]]) as usize;
                    let pkid = u16::from_be_bytes([buf[2 + tlen], buf[3 + tlen]]);
                    acks.extend_from_slice(&raw::puback_packet(pkid));
                    if acks.len()
                        >= 4 * std::env::var("IOMT_ACK_BATCH")
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(256)
                    {
                        wr.write_all(&acks).await.unwrap();
                        acks.clear();
                    }
                }
            }
        }
        t0.elapsed()
    });
    let (first, _) = publish_all(addr, total, connections, Payload::Json, Pace::Window, t0).await;
    let done = received.await.unwrap();
    let secs = (done - first).as_secs_f64();
    let rate = total as f64 / secs;
    println!("5. mosquitto pass-through (same publisher, one QoS 1 subscriber):");
    println!("   all received in {secs:.2} s  ->  {rate:.0} messages/s");
    Some(rate)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing and expects speed.
    if !std::env::args().any(|a| a == "--bench") {
        println!("e2e_load: run with `cargo bench --bench e2e_load`");
        return;
    }
    let total = env_or("IOMT_BENCH_MESSAGES", 1_000_000);
    let connections = env_or("IOMT_BENCH_CONNECTIONS", 4);
    let ext_rate = env_or("IOMT_BENCH_EXTERNAL_RATE", 50_000);
    let ext_seconds = env_or("IOMT_BENCH_EXTERNAL_SECONDS", 20);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    if std::env::var("IOMT_BENCH_ONLY").is_ok_and(|o| o == "mosquitto") {
        runtime.block_on(bench_mosquitto(total, connections));
        return;
    }
    if std::env::var("IOMT_BENCH_ONLY").is_ok_and(|o| o == "drain") {
        runtime.block_on(bench_drain(total, connections));
        return;
    }
    if std::env::var("IOMT_BENCH_ONLY").is_ok_and(|o| o == "ledger") {
        // Checkpoints (signed, stored, anchored in the local chain) every second, against none
        // during the run; alternated, so drift in the machine's load hits both alike.
        let mut on = Vec::new();
        let mut off = Vec::new();
        for _ in 0..3 {
            for (every, out) in [("1s", &mut on), ("1h", &mut off)] {
                println!("ledger checkpoint_every = {every}:");
                let extra = format!("[ledger]\ncheckpoint_every = \"{every}\"\n");
                let (rate, _, ok) = runtime.block_on(bench_service_with(
                    total,
                    connections,
                    Payload::Json,
                    &extra,
                ));
                assert!(ok, "the run lost messages");
                out.push(rate);
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (on, off) = (median(&mut on), median(&mut off));
        println!(
            "ledger: median {on:.0} msg/s with a checkpoint every second, {off:.0} without; ratio {:.3}",
            on / off
        );
        return;
    }
    if std::env::var("IOMT_BENCH_ONLY").is_ok_and(|o| o == "alarm") {
        let rate = env_or("IOMT_BENCH_ALARM_RATE", 50_000);
        let seconds = env_or("IOMT_BENCH_ALARM_SECONDS", 20);
        if !runtime.block_on(bench_alarm_latency(rate, seconds, connections)) {
            std::process::exit(1);
        }
        return;
    }
    if std::env::var("IOMT_BENCH_ONLY").is_ok_and(|o| o == "external") {
        let ok = runtime.block_on(bench_external(ext_rate, ext_seconds, connections));
        if !ok.is_none_or(|(_, ok)| ok) {
            std::process::exit(1);
        }
        return;
    }
    let ceiling = runtime.block_on(bench_ceiling(total, connections));
    let (json, _, ok_json) = runtime.block_on(bench_service(total, connections, Payload::Json));
    let (_, senml_readings, ok_senml) =
        runtime.block_on(bench_service(total / 10, connections, Payload::Senml10));
    let external = runtime.block_on(bench_external(ext_rate, ext_seconds, connections));
    let mosquitto = runtime.block_on(bench_mosquitto(total, connections));
    println!("ratios (same run):");
    println!(
        "   service JSON / ceiling           = {:.2}",
        json / ceiling
    );
    println!(
        "   SenML readings/s / ceiling msg/s = {:.2}",
        senml_readings / ceiling
    );
    if let Some(m) = mosquitto {
        println!("   service JSON / mosquitto         = {:.2}", json / m);
    }
    let ok_external = external.is_none_or(|(_, ok)| ok);
    if !(ok_json && ok_senml && ok_external) {
        std::process::exit(1);
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
