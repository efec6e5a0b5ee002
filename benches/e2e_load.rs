//! End-to-end load benchmark: N single-reading JSON messages published at QoS 1 over several
//! MQTT connections to the running service (embedded broker, sealing and storage on). Reports
//! messages/s from first publish to last reading stored, receive→stored latency p50/p99, peak
//! RSS, and fails unless every message was stored. When `mosquitto` is installed, the same
//! messages from the same publisher go through mosquitto to one subscriber: that pass-through
//! rate is the ceiling of this machine.
//!
//! ```sh
//! cargo bench --bench e2e_load                       # 1,000,000 messages, 4 connections
//! IOMT_BENCH_MESSAGES=200000 IOMT_BENCH_CONNECTIONS=2 cargo bench --bench e2e_load
//! ```
//!
//! The publisher and subscriber speak MQTT 3.1.1 by hand: client libraries cost more CPU per
//! message than the brokers under test (rumqttc, paho), and `mosquitto_pub -l` stops at 65,535
//! messages.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iomt_edge::config::PipelineConfig;
use iomt_edge::service::Service;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

const PIPELINE: &str = r#"
site = "bench"
[broker]
listen = "127.0.0.1:0"
listen_v5 = "127.0.0.1:0"
listen_ws = "127.0.0.1:0"
subscriber_backlog_bytes = 8388608
[http]
listen = "127.0.0.1:0"
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
[[route.json.reading]]
value = "/hr"
metric = "heart_rate"
"#;

/// Unacknowledged QoS 1 publishes per connection.
const WINDOW: usize = 400;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut p = vec![0x10];
    remaining_length(body.len(), &mut p);
    p.extend(body);
    p
}

fn publish_packet(topic: &str, pkid: u16, payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x32); // PUBLISH, QoS 1
    remaining_length(2 + topic.len() + 2 + payload.len(), out);
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&pkid.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Reads one MQTT packet: (first byte, body).
async fn read_packet<R: AsyncReadExt + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<u8> {
    let first = r.read_u8().await?;
    let (mut len, mut mult) = (0usize, 1usize);
    loop {
        let b = r.read_u8().await?;
        len += (b & 0x7f) as usize * mult;
        mult *= 128;
        if b & 0x80 == 0 {
            break;
        }
    }
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    Ok(first)
}

async fn connect(addr: SocketAddr, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).unwrap();
    s.write_all(&connect_packet(id)).await.unwrap();
    let mut buf = Vec::new();
    let t = read_packet(&mut s, &mut buf).await.unwrap();
    assert_eq!((t, buf.get(1)), (0x20, Some(&0)), "CONNACK refused");
    s
}

/// Publishes `count` messages on one connection, at most WINDOW unacknowledged; returns when the
/// broker has acknowledged them all.
async fn publish(
    addr: SocketAddr,
    conn: usize,
    count: usize,
    first_sent: Arc<AtomicU64>,
    t0: Instant,
) {
    let stream = connect(addr, &format!("bench-pub-{conn}")).await;
    let (mut rd, wr) = stream.into_split();
    let window = Arc::new(Semaphore::new(WINDOW));
    let acks = {
        let window = window.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut acked = 0;
            while acked < count {
                let t = read_packet(&mut rd, &mut buf).await.expect("puback");
                if t >> 4 == 4 {
                    acked += 1;
                    window.add_permits(1);
                }
            }
        })
    };
    let mut wr = BufWriter::with_capacity(64 << 10, wr);
    let topic = format!("bench/{conn}/hr");
    let mut packet = Vec::with_capacity(128);
    let mut pkid: u16 = 0;
    first_sent.fetch_min(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    for i in 0..count {
        match window.try_acquire() {
            Ok(p) => p.forget(),
            Err(_) => {
                wr.flush().await.unwrap();
                window.acquire().await.unwrap().forget();
            }
        }
        pkid = pkid.checked_add(1).unwrap_or(1);
        packet.clear();
        let payload = format!(
            r#"{{"ts":{},"hr":{}}}"#,
            1_700_000_000_000i64 + i as i64,
            60 + i % 60
        );
        publish_packet(&topic, pkid, payload.as_bytes(), &mut packet);
        wr.write_all(&packet).await.unwrap();
    }
    wr.flush().await.unwrap();
    acks.await.unwrap();
}

async fn publish_all(
    addr: SocketAddr,
    total: usize,
    connections: usize,
    t0: Instant,
) -> Arc<AtomicU64> {
    let first = Arc::new(AtomicU64::new(u64::MAX));
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let n = total / connections + usize::from(c < total % connections);
            tokio::spawn(publish(addr, c, n, first.clone(), t0))
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    first
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
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

async fn bench_service(total: usize, connections: usize) -> (f64, bool) {
    let dir = tempfile::tempdir().unwrap();
    let config = PipelineConfig::parse(PIPELINE, "bench pipeline").unwrap();
    let service = Service::start(config, dir.path())
        .await
        .expect("service starts");
    let addr = service.endpoints.mqtt.unwrap();
    let metrics = service.metrics.clone();
    let t0 = Instant::now();
    let first = publish_all(addr, total, connections, t0).await;
    let published = t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while (metrics.readings_stored.get() as usize) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let stored_at = t0.elapsed();
    let stored = metrics.readings_stored.get() as usize;
    let lost = 0u64;
    let text = metrics.render();
    service.shutdown();
    let summary = service.wait().await.expect("clean stop");
    let start = Duration::from_nanos(first.load(Ordering::Relaxed));
    let secs = (stored_at - start).as_secs_f64();
    let rate = total as f64 / secs;
    let name = "iomt_receive_to_stored_seconds";
    println!("iomt-edge (embedded broker, JSON decode, alarms, Arrow, SHA-256 leaves, AES-256-GCM, sled flush):");
    println!("  messages            {total} over {connections} connections, QoS 1");
    println!(
        "  all acknowledged in {:.2} s",
        (published - start).as_secs_f64()
    );
    println!("  all stored in       {secs:.2} s  ->  {rate:.0} messages/s stored");
    println!(
        "  receive->stored     p50 {:.1} ms, p99 {:.1} ms (histogram, interpolated)",
        histogram_quantile(&text, name, 0.5) * 1e3,
        histogram_quantile(&text, name, 0.99) * 1e3
    );
    println!("  batches             {}", summary.batches);
    println!(
        "  peak RSS            {:.0} MiB (whole process, publisher included)",
        peak_rss_mib()
    );
    let ok = stored == total && summary.readings as usize == total && lost == 0;
    if !ok {
        println!("  FAILURE: published {total}, stored {stored}, broker drops {lost}");
    }
    (rate, ok)
}

async fn bench_mosquitto(total: usize, connections: usize) -> Option<f64> {
    let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.path().join("m.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 1000\nmax_queued_messages 10000000\npersistence false\n"),
    )
    .unwrap();
    let mut child = Command::new(exe)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut sub = loop {
        if let Ok(s) = TcpStream::connect(addr).await {
            drop(s);
            break connect(addr, "bench-sub").await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // SUBSCRIBE bench/+/hr at QoS 1.
    let filter = b"bench/+/hr";
    let mut p = vec![0x82];
    remaining_length(2 + 2 + filter.len() + 1, &mut p);
    p.extend_from_slice(&1u16.to_be_bytes());
    p.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    p.extend_from_slice(filter);
    p.push(1);
    sub.write_all(&p).await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(
        read_packet(&mut sub, &mut buf).await.unwrap(),
        0x90,
        "SUBACK"
    );
    let (mut rd, mut wr) = sub.into_split();
    let t0 = Instant::now();
    let received = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut n = 0;
        let mut acks = Vec::with_capacity(4096);
        while n < total {
            let t = read_packet(&mut rd, &mut buf).await.expect("publish");
            if t >> 4 == 3 {
                n += 1;
                if (t >> 1) & 3 == 1 {
                    let tlen = u16::from_be_bytes([buf[0], buf[1]]) as usize;
                    acks.extend_from_slice(&[0x40, 2, buf[2 + tlen], buf[3 + tlen]]);
                    if acks.len() >= 4 * 256 {
                        wr.write_all(&acks).await.unwrap();
                        acks.clear();
                    }
                }
            }
        }
        t0.elapsed()
    });
    let first = publish_all(addr, total, connections, t0).await;
    let done = received.await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let secs = (done - Duration::from_nanos(first.load(Ordering::Relaxed))).as_secs_f64();
    let rate = total as f64 / secs;
    println!("mosquitto pass-through (same publisher, one QoS 1 subscriber):");
    println!("  all received in     {secs:.2} s  ->  {rate:.0} messages/s");
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
    let (ours, ok) = runtime.block_on(bench_service(total, connections));
    let ceiling = runtime.block_on(bench_mosquitto(total, connections));
    match ceiling {
        Some(m) => println!(
            "ratio: iomt-edge stored / mosquitto pass-through = {:.2}",
            ours / m
        ),
        None => println!("mosquitto not installed: no pass-through ceiling measured"),
    }
    if !ok {
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
