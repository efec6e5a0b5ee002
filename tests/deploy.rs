//! deploy/ against the real service: its live /metrics passes `promtool check metrics`, the
//! alerting rules pass `promtool check rules` and their unit tests, every metric the rules and
//! the Grafana dashboard name is one the service exports (and every label value an alert selects
//! is there before the first event, so the alert sees it), Prometheus's scrape config passes
//! `promtool check config` with the files it reads, the systemd unit passes `systemd-analyze
//! verify`, the container's pipelines are the ward pipeline with only their listeners and
//! security settings changed, the baked pipeline runs with its keys (TLS, accounts, token) and
//! the image's HEALTHCHECK command passes against it, the external-mode pipeline runs against a
//! mosquitto configured by deploy/mosquitto/, and `iomt-edge healthcheck` passes on 200 and on
//! nothing else.
//!
//! promtool is Debian's `prometheus` package, systemd-analyze its `systemd`, mosquitto and
//! mosquitto_sub its `mosquitto` and `mosquitto-clients`: scripts/test.sh installs them; without
//! them these tests fail saying so. The image itself is tested by scripts/image-test.sh (podman).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::mosquitto::Mosquitto;
use common::raw::{handshake, publish_packet};
use common::security::*;
use common::*;
use tokio::io::AsyncWriteExt;

/// Where the container's pipelines read their keys: the directory mounted into the container
/// (deploy/Dockerfile, deploy/compose.yaml).
const KEYS: &str = "/etc/iomt-edge/keys/";

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

/// Each `iomt_…` name in `text`, with the text after it.
fn mentions(text: &str) -> impl Iterator<Item = (String, &str)> {
    let mut rest = text;
    std::iter::from_fn(move || {
        let i = rest.find("iomt_")?;
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        Some((name, rest))
    })
}

/// Every `iomt_…` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    mentions(text).map(|(name, _)| name).collect()
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

/// The label values the alerts' expressions select with `name{label="v"}` or
/// `name{label=~"v|w"}`: (name, label, value), for the labels the service itself sets (not
/// Prometheus's `job` and `instance`). Descriptions and comments are not expressions.
fn selected_label_values(alerts: &str) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for line in alerts.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with("summary:") || line.starts_with("description:")
        {
            continue;
        }
        for (name, rest) in mentions(line) {
            let Some(matchers) = rest.strip_prefix('{').and_then(|r| r.split_once('}')) else {
                continue;
            };
            for m in matchers.0.split(',') {
                let Some((label, value)) = m.split_once("=~").or_else(|| m.split_once('=')) else {
                    continue;
                };
                let (label, value) = (label.trim(), value.trim().trim_matches('"'));
                // Negative matchers (`!=`, `!~`) select nothing to look for.
                if ["job", "instance"].contains(&label) || label.ends_with('!') {
                    continue;
                }
                for v in value.split('|') {
                    out.insert((name.clone(), label.to_owned(), v.to_owned()));
                }
            }
        }
    }
    out
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

    let out = output_with_stdin(
        Command::new(&promtool).args(["check", "metrics"]),
        metrics.as_bytes(),
    );
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
    // The refusals the security alerts watch never happened to this service, yet their series
    // are there, at 0: an alert on `increase()` needs the series before the first refusal.
    let selected = selected_label_values(&read("deploy/prometheus/alerts.yml"));
    assert!(
        selected.contains(&(
            "iomt_publishes_refused_total".into(),
            "reason".into(),
            "impostor".into()
        )),
        "{selected:?}"
    );
    for (name, label, value) in &selected {
        let shown = metrics.lines().any(|l| {
            l.strip_prefix(&format!("{name}{{"))
                .and_then(|r| r.split_once('}'))
                .is_some_and(|(labels, _)| {
                    labels
                        .split(',')
                        .any(|m| m == format!("{label}=\"{value}\""))
                })
        });
        assert!(
            shown,
            "alerts.yml selects {name}{{{label}=\"{value}\"}}, which /metrics does not show"
        );
    }
    assert!(edge.stop().success());
}

#[test]
fn the_label_check_reads_matchers_and_skips_descriptions() {
    let selected = selected_label_values(
        "expr: increase(iomt_a_total{job=\"x\",reason=~\"b|c\"}[5m]) > 0 or iomt_d{e=\"f\"}\n\
         description: \"see iomt_g{h=\\\"i\\\"}\"\n",
    );
    let want: BTreeSet<_> = [
        ("iomt_a_total", "reason", "b"),
        ("iomt_a_total", "reason", "c"),
        ("iomt_d", "e", "f"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(selected, want);
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
    // The scrape reads the base station's CA and a copy of its token beside the config
    // (compose mounts them there), and promtool checks that both files are there: in a
    // directory of its own, with and without them.
    let dir = tempfile::tempdir().unwrap();
    for file in ["prometheus.yml", "alerts.yml"] {
        std::fs::copy(
            repo(&format!("deploy/prometheus/{file}")),
            dir.path().join(file),
        )
        .unwrap();
    }
    let check_config = || {
        run(Command::new(&promtool)
            .args(["check", "config"])
            .arg(dir.path().join("prometheus.yml")))
    };
    std::fs::create_dir(dir.path().join("iomt-edge")).unwrap();
    std::fs::write(dir.path().join("iomt-edge/ca.pem"), "").unwrap();
    let out = check_config();
    assert!(
        !out.status.success() && text(&out).contains("iomt-edge/http-token"),
        "promtool check config without the token file: {}",
        text(&out)
    );
    std::fs::write(dir.path().join("iomt-edge/http-token"), "x").unwrap();
    let out = check_config();
    assert!(
        out.status.success(),
        "promtool check config: {}",
        text(&out)
    );
    let config = read("deploy/prometheus/prometheus.yml");
    for line in [
        "scheme: https",
        "ca_file: iomt-edge/ca.pem",
        "type: Bearer",
        "credentials_file: iomt-edge/http-token",
    ] {
        assert!(config.contains(line), "prometheus.yml has no `{line}`");
    }
    let compose = read("deploy/compose.yaml");
    for mount in [
        "/ca.pem:/etc/prometheus/iomt-edge/ca.pem:ro",
        "/prometheus/http-token:/etc/prometheus/iomt-edge/http-token:ro",
    ] {
        assert!(
            compose.contains(mount),
            "compose.yaml does not mount {mount}"
        );
    }
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

/// A pipeline file's settings as TOML.
fn toml_of(text: &str) -> toml::Table {
    text.parse().unwrap_or_else(|e| panic!("{e}"))
}

/// The settings a container pipeline may set otherwise than the ward pipeline: the security
/// tables and keys, `table.key` (a whole table when it has no key).
const SECURITY: &[(&str, Option<&str>)] = &[
    ("broker", Some("tls")),
    ("broker", Some("auth")),
    ("broker", Some("allow_plaintext")),
    ("http", Some("tls")),
    ("http", Some("token_file")),
    ("http", Some("allow_plaintext")),
    ("http", Some("require_token")),
];

/// What differs between two pipelines' settings, by key path: none when equal.
fn differences(a: &toml::Value, b: &toml::Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (toml::Value::Table(a), toml::Value::Table(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let p = format!("{path}.{k}");
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => differences(x, y, &p, out),
                    (x, _) => out.push(format!(
                        "{p}: only in the {}",
                        if x.is_some() { "first" } else { "second" }
                    )),
                }
            }
        }
        (toml::Value::Array(x), toml::Value::Array(y)) if x.len() == y.len() => {
            for (i, (x, y)) in x.iter().zip(y).enumerate() {
                differences(x, y, &format!("{path}[{i}]"), out);
            }
        }
        _ if a == b => {}
        _ => out.push(format!("{path}: {a} / {b}")),
    }
}

/// Where a container pipeline differs from the ward pipeline in anything but its listeners
/// (the ward's, on 0.0.0.0: inside a container loopback is the container's own) and its
/// security settings.
fn container_rule_breaches(ward: &str, container: &str) -> Vec<String> {
    let mut expected = toml_of(ward);
    let mut container = toml_of(container);
    for (table, key) in [
        ("broker", "listen"),
        ("broker", "listen_v5"),
        ("broker", "listen_ws"),
        ("http", "listen"),
    ] {
        if let Some(toml::Value::String(addr)) = expected
            .get_mut(table)
            .and_then(|t| t.as_table_mut())
            .and_then(|t| t.get_mut(key))
        {
            *addr = addr.replace("127.0.0.1:", "0.0.0.0:");
        }
    }
    for t in [&mut expected, &mut container] {
        for (table, key) in SECURITY {
            if let Some(toml::Value::Table(t)) = t.get_mut(*table) {
                t.remove(key.unwrap());
            }
        }
    }
    let mut out = Vec::new();
    differences(
        &toml::Value::Table(expected),
        &toml::Value::Table(container),
        "",
        &mut out,
    );
    out
}

/// Every file path a pipeline's security settings name.
fn key_paths(config: &toml::Table) -> Vec<String> {
    let mut out = Vec::new();
    let mut take = |v: Option<&toml::Value>| {
        if let Some(toml::Value::String(p)) = v {
            out.push(p.clone());
        }
    };
    for table in ["broker", "http"] {
        let t = &config[table];
        take(t.get("token_file"));
        take(t.get("external_password_file"));
        take(t.get("external_ca"));
        if let Some(tls) = t.get("tls") {
            take(tls.get("cert"));
            take(tls.get("key"));
            take(tls.get("client_ca"));
        }
        if let Some(auth) = t.get("auth") {
            take(auth.get("credentials"));
        }
    }
    out
}

#[test]
fn the_container_pipelines_are_the_ward_pipeline_with_listeners_and_security_only() {
    let ward = read("pipelines/ward.toml");
    let text = read("deploy/pipeline.toml");
    let breaches = container_rule_breaches(&ward, &text);
    assert!(
        breaches.is_empty(),
        "deploy/pipeline.toml differs from pipelines/ward.toml in more than its listeners and \
         security settings:\n  {}",
        breaches.join("\n  ")
    );
    // It passes the service's own checks (a listener off loopback needs TLS, an account, a
    // token: it would not start otherwise) ...
    let config = iomt_edge::config::PipelineConfig::parse(&text, "deploy/pipeline.toml").unwrap();
    config.broker.check_can_connect().unwrap();
    // ... and is secured as the README says: every listener on 0.0.0.0 with TLS, an account
    // per device and no anonymous client, the nurses' station an operator, devices reading
    // their own commands only, HTTPS with a token, no plaintext opt-out.
    assert!(config
        .broker
        .listeners()
        .all(|(_, a)| a.ip().is_unspecified()));
    assert!(config.http.listen.ip().is_unspecified());
    assert!(config.broker.tls.is_some() && config.http.tls.is_some());
    assert!(config.broker.auth.credentials.is_some() && !config.broker.auth.allow_anonymous);
    assert_eq!(config.broker.auth.operators, ["nurses-station"]);
    let ward_config = iomt_edge::config::PipelineConfig::parse(&ward, "ward.toml").unwrap();
    assert_eq!(
        config.broker.auth.device_subscribe,
        ward_config.broker.auth.device_subscribe
    );
    assert!(!config.broker.allow_plaintext && !config.http.allow_plaintext);
    assert!(config.http.token_file.is_some());
    // Every key file is in the keys directory the image and compose mount, and nowhere else.
    let table = toml_of(&text);
    let paths = key_paths(&table);
    assert_eq!(paths.len(), 6, "{paths:?}");
    assert!(paths.iter().all(|p| p.starts_with(KEYS)), "{paths:?}");
    assert!(read("deploy/compose.yaml").contains(":/etc/iomt-edge/keys:ro"));
    assert!(read("deploy/Dockerfile").contains("/etc/iomt-edge/keys"));

    // External mode: the same but for the [broker] table, whose hospital broker authenticates
    // this node and speaks TLS.
    let external = read("deploy/pipeline-external.toml");
    let config =
        iomt_edge::config::PipelineConfig::parse(&external, "deploy/pipeline-external.toml")
            .unwrap();
    let b = &config.broker;
    assert_eq!(b.external.as_deref(), Some("mqtts://hospital-broker:8883"));
    assert_eq!(b.external_username.as_deref(), Some("iomt-edge-ward"));
    assert!(b.external_password_file.is_some() && b.external_ca.is_some());
    let mut external_table = toml_of(&external);
    let external_paths = key_paths(&external_table);
    assert!(
        external_paths.iter().all(|p| p.starts_with(KEYS)),
        "{external_paths:?}"
    );
    let mut container_table = table;
    external_table.remove("broker");
    container_table.remove("broker");
    let mut out = Vec::new();
    differences(
        &toml::Value::Table(container_table),
        &toml::Value::Table(external_table),
        "",
        &mut out,
    );
    assert!(
        out.is_empty(),
        "pipeline-external.toml differs from pipeline.toml outside [broker]:\n  {}",
        out.join("\n  ")
    );
}

#[test]
fn the_container_rule_sees_any_other_change() {
    let ward = read("pipelines/ward.toml");
    let container = read("deploy/pipeline.toml");
    assert!(container_rule_breaches(&ward, &container).is_empty());
    for (from, to, breach) in [
        ("below = 92", "below = 93", ".rule[0].below: 92 / 93"),
        ("\"0.0.0.0:1884\"", "\"0.0.0.0:1885\"", ".broker.listen_v5"),
        ("max_burst = 2000", "max_burst = 20", ".broker.max_burst"),
        (
            "[http]\n",
            "[http]\nmax_body = 1\n",
            ".http.max_body: only in the second",
        ),
        (
            "max_rows = 16384\n",
            "",
            ".batch.max_rows: only in the first",
        ),
    ] {
        assert!(container.contains(from), "{from}");
        let breaches = container_rule_breaches(&ward, &container.replacen(from, to, 1));
        assert!(
            breaches.len() == 1 && breaches[0].starts_with(breach),
            "{from} -> {to}: {breaches:?}"
        );
    }
    // The security settings may differ: that is the point of the container's pipeline.
    let open = container.replace("allow_anonymous = false", "allow_anonymous = true");
    assert!(container_rule_breaches(&ward, &open).is_empty());
}

/// A CA and a certificate it signed for `names`, as PEM: (CA, certificate, key).
fn certificates(names: &[&str]) -> (String, String, String) {
    let (ca_pem, issuer) = ca("deploy test CA");
    let (cert, key) = signed(&issuer, names, None);
    (ca_pem, cert, key)
}

/// A shipped file with its `from`s replaced, each of which must be there.
fn rewritten(text: &str, replacements: &[(&str, &str)]) -> String {
    replacements.iter().fold(text.to_owned(), |t, (from, to)| {
        assert!(t.contains(from), "no `{from}` in:\n{t}");
        t.replace(from, to)
    })
}

/// GET over HTTPS, with the token when given: status and body.
async fn https_get(client: &reqwest::Client, url: &str, token: Option<&str>) -> (u16, String) {
    let mut req = client.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{url}: {e:?}"));
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// The image's HEALTHCHECK command line, from deploy/Dockerfile.
fn dockerfile_healthcheck() -> Vec<String> {
    let dockerfile = read("deploy/Dockerfile").replace("\\\n", " ");
    let line = dockerfile
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK "))
        .expect("a HEALTHCHECK");
    let json = &line[line.find("CMD [").expect("CMD in exec form") + 4..];
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"))
}

/// Runs `argv` (the HEALTHCHECK's, its program the binary under test) until it passes or
/// `within` is over: its last output.
fn healthcheck_until_ok(argv: &[String], within: Duration) -> Output {
    let deadline = Instant::now() + within;
    loop {
        let out = run(Command::new(env!("CARGO_BIN_EXE_iomt-edge")).args(&argv[1..]));
        if out.status.success() || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

const TOKEN: &str = "0f4c7b2e9a61d8355e0b7c4a9f2d1e63";
const NURSE_PASSWORD: &str = "nurses-station-password";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_baked_pipeline_runs_with_its_keys_and_the_healthcheck_passes_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let (ca, cert, key) = certificates(&["127.0.0.1", "localhost"]);
    let ca_file = write_file(&keys.join("ca.pem"), &ca, 0o644);
    write_file(&keys.join("server.pem"), &cert, 0o644);
    write_file(&keys.join("server.key"), &key, 0o600);
    write_file(&keys.join("http-token"), &format!("{TOKEN}\n"), 0o600);
    let credentials = keys.join("credentials");
    add_account(&credentials, "ward7-bed3-monitor", "bed3-monitor-password");
    add_account(&credentials, "nurses-station", NURSE_PASSWORD);
    // Its listeners on loopback ports of the test's choosing; nothing else changed.
    let pipeline_text = rewritten(
        &read("deploy/pipeline.toml"),
        &[
            (KEYS, &format!("{}/", keys.display())),
            ("\"0.0.0.0:1883\"", "\"127.0.0.1:0\""),
            ("\"0.0.0.0:1884\"", "\"127.0.0.1:0\""),
            ("\"0.0.0.0:8083\"", "\"127.0.0.1:0\""),
            ("\"0.0.0.0:9100\"", "\"127.0.0.1:0\""),
        ],
    );
    let edge = Edge::spawn(&pipeline_text, &dir.path().join("data"), &[]);
    let http = edge.endpoints.http;

    // The image's own HEALTHCHECK, its port the one the test got and its CA this test's.
    let mut argv = dockerfile_healthcheck();
    assert_eq!(
        argv[1..4],
        ["healthcheck", "--url", "https://127.0.0.1:9100/healthz"]
    );
    let ca_at = argv.iter().position(|a| a == "--ca").expect("--ca") + 1;
    assert_eq!(argv[ca_at], format!("{KEYS}ca.pem"));
    argv[3] = format!("https://127.0.0.1:{}/healthz", http.port());
    argv[ca_at] = ca_file.display().to_string();
    let out = healthcheck_until_ok(&argv, Duration::from_secs(30));
    assert!(out.status.success(), "{}\n{}", text(&out), edge.log());
    // Without the CA the service's certificate is not trusted.
    let out = healthcheck(&format!("https://127.0.0.1:{}/healthz", http.port()));
    assert!(!out.status.success(), "{}", text(&out));

    // Plain MQTT to a TLS listener: no CONNACK.
    let port = edge.mqtt_port();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let plain = tokio::time::timeout(Duration::from_secs(10), handshake(&mut s, "plain", 4)).await;
    assert!(matches!(plain, Ok(Err(_))), "{plain:?}");
    // Over TLS: no account, a wrong password, refused; the device's own account publishes.
    let fixture = write_file(
        &dir.path().join("bed3.jsonl"),
        &format!(
            "{{\"t_ms\":0,\"topic\":\"ward/7/bed/3/vitals\",\"payload\":{{\"ts\":{},\"hr\":71,\"spo2\":97}}}}\n",
            chrono::Utc::now().timestamp_millis()
        ),
        0o644,
    );
    let replay = |login: Option<(&str, &str)>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_iomt-edge"));
        cmd.arg("replay")
            .arg(&fixture)
            .args([
                "--broker",
                &format!("mqtts://127.0.0.1:{port}"),
                "--speed",
                "max",
            ])
            .arg("--ca")
            .arg(&ca_file);
        if let Some((user, password)) = login {
            let pw = write_file(&dir.path().join("pw"), &format!("{password}\n"), 0o600);
            cmd.args(["--username", user])
                .arg("--password-file")
                .arg(pw);
        }
        run(&mut cmd)
    };
    assert!(!replay(None).status.success());
    assert!(!replay(Some(("ward7-bed3-monitor", "not-its-password")))
        .status
        .success());
    let out = replay(Some(("ward7-bed3-monitor", "bed3-monitor-password")));
    assert!(out.status.success(), "{}", text(&out));

    // /metrics over HTTPS: the refusals counted by reason.
    let client = https_client(&ca);
    let url = format!("https://127.0.0.1:{}/metrics", http.port());
    let (code, metrics) = https_get(&client, &url, Some(TOKEN)).await;
    assert_eq!(code, 200, "{metrics}");
    assert!(
        metric_value(&metrics, "iomt_readings_stored_total") >= 2.0,
        "{metrics}"
    );
    for reason in ["tls", "anonymous", "credentials"] {
        let sample = format!("iomt_connections_refused_total{{reason=\"{reason}\"}}");
        assert!(
            metric_value(&metrics, &sample) >= 1.0,
            "{sample}: {metrics}"
        );
    }
    assert!(edge.stop().success());
}

/// The external-mode pipeline, its hospital broker a mosquitto on deploy/mosquitto/'s
/// configuration and ACL (paths moved into a temporary directory): the service logs in with
/// its account over TLS and takes a device's readings (the device logged in with its own
/// account); the nurses' station reads the alarm; a device cannot read the alarms, nor publish
/// as another device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_external_pipeline_runs_against_the_compose_stacks_mosquitto() {
    let mosquitto_sub = tool("mosquitto_sub", "mosquitto-clients");
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let broker_keys = dir.path().join("hospital-broker");
    // The hospital's CA signed the broker's certificate; the base station's HTTPS has its own.
    let (hospital_ca, broker_cert, broker_key) =
        certificates(&["hospital-broker", "127.0.0.1", "localhost"]);
    let hospital_ca_file = write_file(&keys.join("hospital-ca.pem"), &hospital_ca, 0o644);
    write_file(&broker_keys.join("server.pem"), &broker_cert, 0o644);
    write_file(&broker_keys.join("server.key"), &broker_key, 0o600);
    let (ca, cert, key) = certificates(&["127.0.0.1"]);
    write_file(&keys.join("ca.pem"), &ca, 0o644);
    write_file(&keys.join("server.pem"), &cert, 0o644);
    write_file(&keys.join("server.key"), &key, 0o600);
    write_file(&keys.join("http-token"), &format!("{TOKEN}\n"), 0o600);
    write_file(
        &keys.join("hospital-broker.password"),
        "edge-account-password\n",
        0o600,
    );
    // The broker's accounts: the base station's, the nurses' station's and bed 3's monitor's,
    // as deploy/mosquitto/acl names them.
    let passwd = broker_keys.join("credentials");
    add_account(&passwd, "iomt-edge-ward", "edge-account-password");
    add_account(&passwd, "nurses-station", NURSE_PASSWORD);
    add_account(&passwd, "ward4-bed3-monitor", "bed3-monitor-password");

    let port = free_port();
    let conf = rewritten(
        &read("deploy/mosquitto/mosquitto.conf"),
        &[
            (
                "listener 8883 0.0.0.0",
                &format!("listener {port} 127.0.0.1"),
            ),
            (
                "/mosquitto/config/keys/",
                &format!("{}/", broker_keys.display()),
            ),
            (
                "/mosquitto/config/acl",
                &repo("deploy/mosquitto/acl").display().to_string(),
            ),
            (
                "/mosquitto/data/",
                &format!("{}/", dir.path().join("broker-data").display()),
            ),
        ],
    );
    std::fs::create_dir(dir.path().join("broker-data")).unwrap();
    // As root, mosquitto would switch to its own user, who cannot read these 0600 files.
    let conf = write_file(
        &dir.path().join("mosquitto.conf"),
        &format!("user root\n{conf}"),
        0o644,
    );
    let _broker = Mosquitto::with_config(&conf, port);

    let pipeline_text = rewritten(
        &read("deploy/pipeline-external.toml"),
        &[
            (KEYS, &format!("{}/", keys.display())),
            (
                "mqtts://hospital-broker:8883",
                &format!("mqtts://127.0.0.1:{port}"),
            ),
            ("\"0.0.0.0:9100\"", "\"127.0.0.1:0\""),
        ],
    );
    // The shipped pipeline judges device clocks: readings of now.
    let now = chrono::Utc::now().timestamp_millis();
    let edge = Edge::spawn(&pipeline_text, &dir.path().join("data"), &[]);
    let client = https_client(&ca);
    let base = format!("https://127.0.0.1:{}", edge.endpoints.http.port());
    // Healthy: logged in, and every subscription granted by the ACL.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = https_get(&client, &format!("{base}/healthz"), None).await;
        if code == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not healthy: {body}\n{}",
            edge.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Bed 3's monitor: SpO2 85 % for 31 s (spo2-low needs 30), and a message posing as bed 4's
    // monitor, which the ACL drops.
    let line = |t: i64, bed: u32, spo2: u32| {
        format!(
            "{{\"t_ms\":0,\"topic\":\"ward/4/bed/{bed}/vitals\",\"payload\":{{\"ts\":{},\"hr\":80,\"spo2\":{spo2}}}}}\n",
            now + t
        )
    };
    let fixture = write_file(
        &dir.path().join("bed3.jsonl"),
        &[line(0, 3, 85), line(1_000, 4, 99), line(31_000, 3, 85)].concat(),
        0o644,
    );
    let pw = write_file(
        &dir.path().join("bed3.pw"),
        "bed3-monitor-password\n",
        0o600,
    );
    let out = run(Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
        .arg("replay")
        .arg(&fixture)
        .args([
            "--broker",
            &format!("mqtts://127.0.0.1:{port}"),
            "--speed",
            "max",
        ])
        .args(["--username", "ward4-bed3-monitor", "--password-file"])
        .arg(&pw)
        .arg("--ca")
        .arg(&hospital_ca_file));
    assert!(out.status.success(), "{}", text(&out));

    let metrics_url = format!("{base}/metrics");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, m) = https_get(&client, &metrics_url, Some(TOKEN)).await;
        if metric_value(&m, "iomt_alarms_raised_total{priority=\"high\"}") >= 1.0 {
            // Bed 3's two messages, two readings each; nothing of bed 4's.
            assert_eq!(metric_value(&m, "iomt_readings_decoded_total"), 4.0, "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "no alarm: {m}\n{}", edge.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The alarm, retained on the hospital broker: the nurses' station reads it, bed 3's monitor
    // may not.
    let sub = |user: &str, password: &str| {
        run(Command::new(&mosquitto_sub)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--cafile"])
            .arg(&hospital_ca_file)
            .args(["-u", user, "-P", password, "-t", "alarms/ward/#", "-v"])
            .args(["--retained-only", "-W", "3"]))
    };
    let seen = text(&sub("nurses-station", NURSE_PASSWORD));
    assert!(
        seen.contains("alarms/ward/ward4-bed3/spo2-low ") && seen.contains("\"state\":\"active\""),
        "{seen}"
    );
    let seen = text(&sub("ward4-bed3-monitor", "bed3-monitor-password"));
    assert!(
        !seen.contains("spo2-low"),
        "a device read the alarms: {seen}"
    );
    assert!(edge.stop().success());
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
