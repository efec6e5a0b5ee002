//! Memory benchmark: the release binary, 1,000 devices each publishing a vitals message (QoS 1)
//! once a second for 10 minutes, its RSS sampled every 10 s; then a burst of messages as fast
//! as 4 connections go, and the RSS during and after it. The target is at most 100 MB for the
//! device phase; every acknowledged message must be stored.
//!
//! ```sh
//! cargo bench --bench rss
//! IOMT_BENCH_DEVICES=1000 IOMT_BENCH_SECONDS=60 IOMT_BENCH_BURST=200000 cargo bench --bench rss
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{env_or, free_port, raw};

const LIMIT_MIB: f64 = 100.0;

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn metric(http: SocketAddr, name: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(http) else {
        return -1.0;
    };
    let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// File descriptors for a thousand connections on both ends.
fn raise_fd_limit() {
    // SAFETY: plain get/setrlimit on this process's RLIMIT_NOFILE.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// One device: connects, then publishes one QoS 1 vitals message a second until stopped,
/// counting PUBACKs.
async fn device(port: u16, id: usize, stop: Arc<AtomicBool>, acked: Arc<AtomicU64>) {
    let mut s = loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await {
            if raw::handshake(&mut s, &format!("device-{id}"), 4)
                .await
                .is_ok()
            {
                break s;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (mut rd, mut wr) = s.split();
    let topic = format!("ward/{}/bed/{}/vitals", id / 50, id % 50);
    // Spread the devices over the second.
    let phase = Duration::from_millis((id as u64 * 997) % 1000);
    tokio::time::sleep(phase).await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut pkid: u16 = 0;
    let mut packet = Vec::with_capacity(128);
    let mut buf = [0u8; 64];
    // PUBACKs are 4 bytes each (nothing else comes to a device here): count them by bytes.
    let mut bytes = 0usize;
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            _ = tick.tick() => {
                pkid = pkid.checked_add(1).unwrap_or(1);
                let ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis();
                let payload = format!(
                    r#"{{"ts":{ms},"hr":{},"spo2":{},"rr":16}}"#,
                    60 + id % 40,
                    95 + id % 5
                );
                packet.clear();
                raw::publish_packet(topic.as_bytes(), 1, pkid, payload.as_bytes(), 4, &mut packet);
                if wr.write_all(&packet).await.is_err() {
                    return;
                }
            }
            n = rd.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    bytes += n;
                    acked.fetch_add((bytes / 4) as u64, Ordering::Relaxed);
                    bytes %= 4;
                }
            },
        }
    }
    let _ = wr.write_all(&[0xE0, 0]).await;
}

/// A burst from 4 connections as fast as their windows allow; returns PUBACKs received.
async fn burst(port: u16, total: usize) -> u64 {
    let tasks: Vec<_> = (0..4)
        .map(|c| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                raw::handshake(&mut s, &format!("burst-{c}"), 4)
                    .await
                    .unwrap();
                let (rd, mut wr) = s.into_split();
                let n = total / 4;
                let window = Arc::new(tokio::sync::Semaphore::new(400));
                let reader = raw::count_pubacks(rd, n as u64, window.clone());
                let mut packet = Vec::new();
                let topic = format!("ward/99/bed/{c}/vitals");
                let mut pkid: u16 = 0;
                for i in 0..n {
                    window.acquire().await.unwrap().forget();
                    pkid = pkid.checked_add(1).unwrap_or(1);
                    let ms = 1_700_000_000_000u64 + i as u64;
                    let payload = format!(r#"{{"ts":{ms},"hr":{}}}"#, 60 + i % 60);
                    packet.clear();
                    raw::publish_packet(
                        topic.as_bytes(),
                        1,
                        pkid,
                        payload.as_bytes(),
                        4,
                        &mut packet,
                    );
                    wr.write_all(&packet).await.unwrap();
                }
                reader.await.unwrap()
            })
        })
        .collect();
    let mut acked = 0;
    for t in tasks {
        acked += t.await.unwrap();
    }
    acked
}

struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("rss: run with `cargo bench --bench rss`");
        return;
    }
    raise_fd_limit();
    let devices = env_or("IOMT_BENCH_DEVICES", 1_000);
    let seconds = env_or("IOMT_BENCH_SECONDS", 600);
    let burst_messages = env_or("IOMT_BENCH_BURST", 560_000);
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, http) = (free_port(), free_port());
    // The shipped default pipeline, on free ports.
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/ward.toml"))
        .unwrap()
        .replace("127.0.0.1:1883", &format!("127.0.0.1:{mqtt}"))
        .replace("127.0.0.1:1884", "127.0.0.1:0")
        .replace("127.0.0.1:8083", "127.0.0.1:0")
        .replace("127.0.0.1:9100", &format!("127.0.0.1:{http}"))
        // The burst carries 2023 device times.
        .replacen(
            "clock_max_past = \"24h\"",
            "clock_max_past = \"100years\"",
            1,
        );
    assert!(
        text.contains("100years"),
        "pipelines/ward.toml sets clock_max_past"
    );
    let pipeline = dir.path().join("p.toml");
    std::fs::write(&pipeline, text).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
        .args(["run", "--pipeline"])
        .arg(&pipeline)
        .arg("--data")
        .arg(dir.path().join("data"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("service.log")).unwrap())
        .spawn()
        .expect("start iomt-edge");
    let service = Service(child);
    let pid = service.0.id();
    let http_addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(http_addr, "iomt_healthy") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "service did not become healthy: {}",
            std::fs::read_to_string(dir.path().join("service.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "machine: {} cores; iomt-edge (release), pipelines/ward.toml, {devices} devices at 1 message/s (QoS 1), {seconds} s",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("RSS at start: {:.1} MiB", rss_mib(pid));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..devices)
        .map(|id| runtime.spawn(device(mqtt, id, stop.clone(), acked.clone())))
        .collect();
    let start = Instant::now();
    let mut peak: f64 = 0.0;
    println!(
        "{:>6}  {:>9}  {:>14}  {:>14}",
        "t (s)", "RSS (MiB)", "acknowledged", "stored"
    );
    while start.elapsed() < Duration::from_secs(seconds as u64) {
        std::thread::sleep(Duration::from_secs(10).min(Duration::from_secs(seconds as u64)));
        let rss = rss_mib(pid);
        peak = peak.max(rss);
        println!(
            "{:>6}  {:>9.1}  {:>14}  {:>14}",
            start.elapsed().as_secs(),
            rss,
            acked.load(Ordering::Relaxed),
            metric(http_addr, "iomt_readings_stored_total")
        );
    }
    stop.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    });
    let device_acks = acked.load(Ordering::Relaxed);
    println!("devices: peak RSS {peak:.1} MiB (limit {LIMIT_MIB} MiB), {device_acks} messages acknowledged");

    // The burst, sampled while it runs and after.
    let sampler_stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = sampler_stop.clone();
        std::thread::spawn(move || {
            let mut peak: f64 = 0.0;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(rss_mib(pid));
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        })
    };
    let t = Instant::now();
    let burst_acked = runtime.block_on(burst(mqtt, burst_messages));
    let burst_secs = t.elapsed().as_secs_f64();
    sampler_stop.store(true, Ordering::Relaxed);
    let burst_peak = sampler.join().unwrap();
    std::thread::sleep(Duration::from_secs(10));
    let after = rss_mib(pid);
    println!(
        "burst: {burst_acked} messages acknowledged (= stored) in {burst_secs:.1} s, peak RSS {burst_peak:.1} MiB, 10 s later {after:.1} MiB"
    );
    let stored = metric(http_addr, "iomt_readings_stored_total");
    let acks_sent = metric(http_addr, "iomt_acks_sent_total");
    let received = (device_acks + burst_acked) as f64;
    println!("service: {acks_sent} acknowledgements sent, {received} received by the publishers, {stored} readings stored");
    drop(service);
    let ok = peak <= LIMIT_MIB && acks_sent >= received;
    println!("{}", if ok { "PASS" } else { "FAIL" });
    if !ok {
        std::process::exit(1);
    }
}
