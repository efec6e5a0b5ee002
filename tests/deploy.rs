//! deploy/ against the real service: its live /metrics passes `promtool check metrics`, the
//! alerting rules pass `promtool check rules` and their unit tests, every metric the rules and
//! the Grafana dashboard name is one the service exports (so a dashboard cannot silently point
//! at nothing), the systemd unit passes `systemd-analyze verify`, the container's pipelines are
//! the ward pipeline with only their listeners changed, and the image's HEALTHCHECK command,
//! `iomt-edge healthcheck`, passes on 200 and on nothing else.
//!
//! promtool is Debian's `prometheus` package, and systemd-analyze its `systemd`: scripts/test.sh
//! installs them; without them these tests fail saying so. The image itself is tested by
//! scripts/image-test.sh (podman).

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::raw::{handshake, publish_packet};
use common::*;
use tokio::io::AsyncWriteExt;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A tool from PATH (or /usr/sbin), or a failure saying how to get it.
fn tool(name: &str, package: &str) -> PathBuf {
    let dirs = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found: run scripts/test.sh, which installs Debian's {package} package"
            )
        })
}

fn promtool() -> PathBuf {
    tool("promtool", "prometheus")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every `iomt_…` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("iomt_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        names.insert(name);
    }
    names
}

/// The names of the samples in a Prometheus text exposition (histograms' `_bucket`, `_sum`
/// and `_count` included, as queries name them).
fn exposed_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

/// A service that has done a bit of everything, so that every labelled metric has a child and
/// shows in /metrics: readings stored, an alarm raised, a decode failure, an unrouted message,
/// an oversized payload, a refused topic name, a checkpoint anchored.
async fn busy_service(dir: &Path) -> (Edge, String) {
    let edge = Edge::start(
        &pipeline("[ledger]\ncheckpoint_every = \"1s\"\n"),
        &dir.join("data"),
    );
    let port = edge.mqtt_port();
    let t0 = 1_700_000_000_000i64;
    let mut messages = vec![
        vitals(1, t0, 70.0, 85.0),
        ("ward/7/bed/1/vitals".to_owned(), b"{not json".to_vec()),
        ("somewhere/else".to_owned(), b"{}".to_vec()),
        ("ward/7/bed/1/vitals".to_owned(), vec![b' '; 8192]),
    ];
    publish_all(port, &messages).await;
    // spo2-low needs its 30 s of device time in a later message.
    messages = vec![vitals(1, t0 + 31_000, 70.0, 85.0)];
    publish_all(port, &messages).await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    handshake(&mut s, "deploy-raw", 5).await.unwrap();
    let mut p = Vec::new();
    publish_packet(b"ward/7/bed/\0/vitals", 0, 0, b"{}", 5, &mut p);
    s.write_all(&p).await.unwrap();
    edge.wait_metric("iomt_readings_stored_total", 4.0);
    edge.wait_metric("iomt_alarms_raised_total{priority=\"high\"}", 1.0);
    edge.wait_metric("iomt_topics_refused_total{reason=\"nul\"}", 1.0);
    edge.wait_metric("iomt_anchors_total{backend=\"local\",result=\"done\"}", 1.0);
    let metrics = edge.metrics();
    (edge, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_metrics_pass_promtool_and_name_everything_alerts_and_dashboard_use() {
    let promtool = promtool();
    let dir = tempfile::tempdir().unwrap();
    let (edge, metrics) = busy_service(dir.path()).await;

    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "promtool check metrics on the live /metrics: {}",
        text(&out)
    );

    let exposed = exposed_names(&metrics);
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/dashboards/iomt-edge.json",
    ] {
        let used = metric_names(&read(file));
        assert!(used.len() >= 8, "{file} names only {used:?}");
        let missing: Vec<_> = used.difference(&exposed).collect();
        assert!(
            missing.is_empty(),
            "{file} names metrics the service does not export: {missing:?}\nexported: {exposed:?}"
        );
    }
    assert!(edge.stop().success());
}

#[test]
fn the_names_check_sees_a_metric_that_does_not_exist() {
    let exposed = exposed_names("# HELP iomt_a x\niomt_a 1\niomt_b_bucket{le=\"1\"} 2\n");
    let used = metric_names("rate(iomt_a[5m]) / rate(iomt_b_bucket[5m]) > iomt_c");
    let missing: Vec<_> = used.difference(&exposed).collect();
    assert_eq!(missing, [&"iomt_c".to_owned()]);
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let promtool = promtool();
    let out = run(Command::new(&promtool)
        .args(["check", "rules"])
        .arg(repo("deploy/prometheus/alerts.yml")));
    assert!(out.status.success(), "promtool check rules: {}", text(&out));
    let out = run(Command::new(&promtool)
        .args(["test", "rules"])
        .arg(repo("deploy/prometheus/alerts_test.yml")));
    assert!(out.status.success(), "promtool test rules: {}", text(&out));
    let out = run(Command::new(&promtool)
        .args(["check", "config"])
        .arg(repo("deploy/prometheus/prometheus.yml")));
    assert!(
        out.status.success(),
        "promtool check config: {}",
        text(&out)
    );
    // Every alert has its unit test.
    let tests = read("deploy/prometheus/alerts_test.yml");
    for line in read("deploy/prometheus/alerts.yml").lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            assert!(
                tests.contains(&format!("alertname: {name}")),
                "alerts_test.yml does not test {name}"
            );
        }
    }
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let analyze = tool("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart's binary exists: point it at the one under test.
    let unit = read("deploy/iomt-edge.service").replace(
        "ExecStart=/usr/local/bin/iomt-edge",
        &format!("ExecStart={}", env!("CARGO_BIN_EXE_iomt-edge")),
    );
    let verify = |text: &str| {
        let path = dir.path().join("iomt-edge.service");
        std::fs::write(&path, text).unwrap();
        run(Command::new(&analyze).arg("verify").arg(&path))
    };
    let out = verify(&unit);
    // It exits 0 on most complaints, which it prints.
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "systemd-analyze verify: {}",
        text(&out)
    );
    // Its exposure as systemd rates it (0 best, 10 worst; README: 1.2): hardening that goes
    // missing shows here.
    let out = run(Command::new(&analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(dir.path().join("iomt-edge.service")));
    let rating = text(&out);
    let exposure: f64 = rating
        .split("Overall exposure level for iomt-edge.service: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("systemd-analyze security: {rating}"));
    assert!(exposure <= 2.0, "exposure {exposure}: {rating}");
    let broken = unit.replace("ProtectSystem=strict", "ProtectSystem=sideways");
    assert!(
        !text(&verify(&broken)).trim().is_empty(),
        "systemd-analyze verify took a bad value without a word"
    );
    for key in [
        "DynamicUser=yes",
        "StateDirectory=iomt-edge",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "CapabilityBoundingSet=\n",
        "SystemCallFilter=@system-service",
        "KillSignal=SIGTERM",
    ] {
        assert!(unit.contains(key), "the unit has no {key}");
    }
    // The stop must have the time the service's own stop_timeout (15 s) gives it.
    let stop = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec");
    let secs: u64 = stop.trim_end_matches('s').parse().unwrap();
    assert!(
        secs > 15,
        "TimeoutStopSec={stop} is not beyond stop_timeout"
    );
}

/// A pipeline file's settings: its lines without comments and blank lines.
fn settings(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split(" #").next().unwrap().trim_end())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_container_pipelines_are_the_ward_pipeline_with_other_listeners() {
    let ward = read("pipelines/ward.toml");
    let container = read("deploy/pipeline.toml");
    // On every interface: the container's loopback is its own.
    let expected = settings(&ward.replace("\"127.0.0.1:", "\"0.0.0.0:"));
    assert_ne!(expected, settings(&ward));
    assert_eq!(settings(&container), expected);
    iomt_edge::config::PipelineConfig::parse(&container, "deploy/pipeline.toml").unwrap();

    // External mode: the same but for the [broker] table.
    let external = read("deploy/pipeline-external.toml");
    let config =
        iomt_edge::config::PipelineConfig::parse(&external, "deploy/pipeline-external.toml")
            .unwrap();
    assert_eq!(
        config.broker.external.as_deref(),
        Some("mqtt://hospital-broker:1883")
    );
    let without_broker = |t: &str| {
        let s = settings(t);
        let start = s.iter().position(|l| l == "[broker]").unwrap();
        let end = s.iter().position(|l| l == "[http]").unwrap();
        [&s[..start], &s[end..]].concat()
    };
    assert_eq!(without_broker(&external), without_broker(&container));
}

fn healthcheck(url: &str) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_iomt-edge")).args(["healthcheck", "--url", url]))
}

#[test]
fn healthcheck_passes_on_200_only() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&pipeline(""), &dir.path().join("data"));
    let http = edge.endpoints.http;
    let ok = healthcheck(&format!("http://{http}/healthz"));
    assert!(ok.status.success(), "{}", text(&ok));

    let missing = healthcheck(&format!("http://{http}/no-such-page"));
    assert!(!missing.status.success());
    assert!(text(&missing).contains("404"), "{}", text(&missing));

    let port = edge.endpoints.http.port();
    assert!(edge.stop().success());
    let gone = healthcheck(&format!("http://127.0.0.1:{port}/healthz"));
    assert!(!gone.status.success());
    assert!(text(&gone).contains("no answer"), "{}", text(&gone));

    let bad = healthcheck("ftp://127.0.0.1/healthz");
    assert!(!bad.status.success());
    assert!(
        text(&bad).contains("only http:// and https://"),
        "{}",
        text(&bad)
    );
}
