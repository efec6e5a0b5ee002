//! The ward dashboard, black box: the real binary on loopback port 0, read over HTTP and
//! server-sent events and in a real browser (headless chromium, `tests/common/browser.rs`):
//! the page, `/api/ward`, `/events` (a reading published over MQTT shows up; a stop is not held
//! up by an open stream), acknowledging (the write token, refusals), a token file others can
//! read refused at start (a listener off loopback without a token: tests/http_security.rs); the
//! demo ward on a full-HD screen with its alarm acknowledged from the page; 48 beds on one
//! screen; a lost link shown as stale until the page reconnects.

mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::browser::{artefact, Browser};
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const T0: i64 = 1_700_000_000;
const TOKEN: &str = "6f1c2a9e4b7d8c3e5a0f1b2c3d4e5f60";

/// One HTTP/1.0 exchange with extra header lines: status, headers (names lower-cased), body.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> (u16, String, String) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    write!(s, "{head}Content-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (h, b) = text.split_once("\r\n\r\n").unwrap();
    (
        h[9..12].parse().unwrap(),
        h.to_ascii_lowercase(),
        b.to_owned(),
    )
}

fn ward(edge: &Edge) -> Value {
    let (code, body) = edge.get("/api/ward");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Posts an acknowledgement; status and JSON answer.
fn ack(edge: &Edge, auth: Option<&str>, body: &str) -> (u16, String, Value) {
    let auth = auth.map(|t| format!("Authorization: Bearer {t}"));
    let mut headers = vec!["Content-Type: application/json"];
    headers.extend(auth.as_deref());
    let (code, head, body) = request(
        edge.endpoints.http,
        "POST",
        "/api/alarms/ack",
        &headers,
        body,
    );
    (
        code,
        head,
        serde_json::from_str(&body).unwrap_or(Value::Null),
    )
}

/// A token file with `mode`.
fn token_file(dir: &Path, mode: u32) -> PathBuf {
    let path = dir.join("http.token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn with_token(pipeline_text: &str, token: &Path) -> String {
    let listen = "[http]\nlisten = \"127.0.0.1:0\"\n";
    assert!(pipeline_text.contains(listen));
    pipeline_text.replace(
        listen,
        &format!("{listen}token_file = \"{}\"\n", token.display()),
    )
}

/// A server-sent event stream read over a raw connection.
struct Events {
    reader: BufReader<tokio::net::TcpStream>,
}

#[derive(Debug)]
struct Event {
    event: String,
    id: Option<String>,
    data: String,
}

impl Events {
    async fn open(addr: SocketAddr) -> Events {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        // HTTP/1.0: the body is the stream itself, not chunked.
        s.write_all(format!("GET /events HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut reader = BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line.to_ascii_lowercase());
        }
        assert!(
            head.starts_with("http/1.0 200") || head.starts_with("http/1.1 200"),
            "{head}"
        );
        assert!(head.contains("content-type: text/event-stream"), "{head}");
        Events { reader }
    }

    /// The next event, or None when the stream ended.
    async fn next(&mut self) -> Option<Event> {
        let mut e = Event {
            event: "message".into(),
            id: None,
            data: String::new(),
        };
        let mut any = false;
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(20), self.reader.read_line(&mut line))
                .await
                .expect("an event within 20 s")
                .unwrap();
            if n == 0 {
                return None;
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if any {
                    return Some(e);
                }
                continue;
            }
            any = true;
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => e.event = value.into(),
                "id" => e.id = Some(value.into()),
                "data" => {
                    if !e.data.is_empty() {
                        e.data.push('\n');
                    }
                    e.data.push_str(value)
                }
                _ => {}
            }
        }
    }

    /// The next event named `name` that satisfies `want`.
    async fn until(&mut self, name: &str, want: impl Fn(&Value) -> bool) -> (Event, Value) {
        loop {
            let e = self.next().await.expect("stream open");
            if e.event == name {
                let v: Value = serde_json::from_str(&e.data).unwrap();
                if want(&v) {
                    return (e, v);
                }
            }
        }
    }
}

#[test]
fn the_page_is_one_document_that_loads_nothing_from_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&pipeline(""), &dir.path().join("data"));
    let (code, head, page) = request(edge.endpoints.http, "GET", "/dashboard", &[], "");
    assert_eq!(code, 200);
    assert!(head.contains("content-type: text/html"), "{head}");
    let csp = head
        .lines()
        .find_map(|l| l.strip_prefix("content-security-policy: "))
        .expect("a content security policy");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let lower = page.to_ascii_lowercase();
    for attr in ["src", "href", "action", "url(", "@import"] {
        for quote in ["", "\"", "'"] {
            for scheme in ["http:", "https:", "//"] {
                let bad = if attr.ends_with('(') || attr.starts_with('@') {
                    format!("{attr}{quote}{scheme}")
                } else {
                    format!("{attr}={quote}{scheme}")
                };
                assert!(!lower.contains(&bad), "the page loads `{bad}…`");
            }
        }
    }
    assert!(!lower.contains("<script src") && !lower.contains("<link rel=\"stylesheet"));
    assert!(edge.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ward_streams_to_a_dashboard_and_a_stop_ends_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&pipeline(""), &dir.path().join("data"));
    let mut events = Events::open(edge.endpoints.http).await;
    let (first, snap) = events.until("snapshot", |_| true).await;
    assert_eq!(snap["site"], SITE);
    assert_eq!(snap["beds"], json!([]));
    assert_eq!(snap["write_needs_token"], false);
    assert_eq!(snap["write_allowed"], true);
    assert_eq!(first.id.as_deref(), Some("0"));

    publish_all(edge.mqtt_port(), &[vitals(3, T0 * 1000, 72.0, 97.0)]).await;
    let (bed_event, bed) = events
        .until("bed", |b| b["vitals"]["heart_rate"]["value"] == 72.0)
        .await;
    assert_eq!(bed["subject"], "w7-b3");
    assert!(bed_event.id.unwrap().parse::<u64>().unwrap() > 0);
    assert_eq!(bed["vitals"]["spo2"]["unit"], "%");
    assert_eq!(
        bed["vitals"]["spo2"]["trend"],
        json!([[T0 / 30 * 30 * 1_000_000, 97.0]])
    );

    let w = ward(&edge);
    assert_eq!(w["beds"][0]["subject"], "w7-b3");
    assert_eq!(w["beds"][0]["vitals"]["heart_rate"]["value"], 72.0);
    assert!(w["now_us"].is_i64());

    // A quiet ward still says it is there.
    let t = Instant::now();
    let (_, beat) = events.until("heartbeat", |_| true).await;
    assert!(beat["now_us"].is_i64());
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());

    // A stop with the dashboard still connected ends the stream and finishes promptly.
    let (status, took) = edge.stop_timed();
    assert!(status.success());
    assert!(took < Duration::from_secs(3), "the stop took {took:?}");
    let mut rest = Vec::new();
    let end =
        tokio::time::timeout(Duration::from_secs(2), events.reader.read_to_end(&mut rest)).await;
    assert!(end.is_ok(), "the stream ended with the service");
}

#[test]
fn acknowledging_needs_the_token_when_one_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), 0o600);
    let edge = Edge::start(&with_token(&pipeline(""), &token), &dir.path().join("data"));
    let w = ward(&edge);
    assert_eq!(
        (&w["write_needs_token"], &w["write_allowed"]),
        (&json!(true), &json!(true))
    );
    let body = r#"{"subject":"w7-b3","rule":"spo2-low","by":"Nurse Test"}"#;

    let (code, head, v) = ack(&edge, None, body);
    assert_eq!(code, 401, "{v}");
    assert!(head.contains("www-authenticate: bearer"), "{head}");
    assert!(v["error"].as_str().unwrap().contains("Bearer"), "{v}");
    let (code, _, v) = ack(&edge, Some("not-the-token-at-all"), body);
    assert_eq!(code, 401, "{v}");
    assert_eq!(v["error"], "wrong token");

    // With the token the request gets past the gate: a bad body is a 400 saying why.
    let (code, _, v) = ack(&edge, Some(TOKEN), "{\"subject\": \"w7-b3\"");
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("expected JSON"),
        "{v}"
    );
    let (code, _, v) = ack(
        &edge,
        Some(TOKEN),
        r#"{"subject":"w7-b3","rule":"spo2-low","by":""}"#,
    );
    assert_eq!(code, 400, "{v}");
    let (code, _, v) = ack(&edge, Some(TOKEN), body);
    assert!(code != 401 && code != 403, "{code} {v}");

    // Reads stay open, and the token is never logged.
    assert_eq!(edge.get("/dashboard").0, 200);
    assert!(edge.stop().success());
    assert!(!std::fs::read_to_string(dir.path().join("data.log"))
        .unwrap()
        .contains(TOKEN));
}

/// Needs the alarm stage (which consumes the acknowledgements `AlarmControl` sends): until it
/// is wired, the service answers 503 "the alarm stage is not running".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alarm_raised_by_readings_is_acknowledged_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), 0o600);
    let edge = Edge::start(&with_token(&pipeline(""), &token), &dir.path().join("data"));
    // SpO2 below 92 for more than the rule's 30 s of device time.
    publish_all(
        edge.mqtt_port(),
        &[
            vitals(3, T0 * 1000, 80.0, 88.0),
            vitals(3, (T0 + 31) * 1000, 80.0, 87.0),
        ],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while ward(&edge)["beds"][0]["alarms"]["spo2-low"].is_null() {
        assert!(
            Instant::now() < deadline,
            "no alarm in the ward view: {}",
            ward(&edge)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _, v) = ack(
        &edge,
        Some(TOKEN),
        r#"{"subject":"w7-b3","rule":"hr-high","by":"Nurse Test"}"#,
    );
    assert_eq!(code, 404, "an alarm that is not there: {v}");
    let (code, _, v) = ack(
        &edge,
        Some(TOKEN),
        r#"{"subject":"w7-b3","rule":"spo2-low","by":"Nurse Test"}"#,
    );
    assert_eq!(code, 200, "acknowledged (needs the alarm stage): {v}");
    assert_eq!(v["state"], "acknowledged");
    assert_eq!(v["acknowledged"]["by"], "Nurse Test");
    let deadline = Instant::now() + Duration::from_secs(10);
    while ward(&edge)["beds"][0]["alarms"]["spo2-low"]["state"] != "acknowledged" {
        assert!(Instant::now() < deadline, "the ward view: {}", ward(&edge));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(edge.stop().success());
}

#[test]
fn a_token_file_others_can_read_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), 0o644);
    let pipeline_path = dir.path().join("p.toml");
    std::fs::write(&pipeline_path, with_token(&pipeline(""), &token)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
        .arg("run")
        .arg("--pipeline")
        .arg(&pipeline_path)
        .arg("--data")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("http.token_file {}: mode 0644", token.display())),
        "{err}"
    );
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!err.contains(TOKEN), "{err}");
    assert!(!dir.path().join("data/endpoints.json").exists());
}

/// The shipped demo pipeline on free ports.
fn demo_pipeline() -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/pipelines/ward-demo.toml"
    ))
    .unwrap();
    on_free_ports(&text, "ward")
}

fn replay_demo(mqtt_port: u16) {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/ward-demo.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
        .args(["replay", fixture, "--speed", "max", "--broker"])
        .arg(format!("mqtt://127.0.0.1:{mqtt_port}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the page shows of one tile, read in the browser.
const TILE_JS: &str = r#"(subject) => {
  const t = [...document.querySelectorAll('.tile')].find((t) => t.dataset.subject === subject);
  if (!t) return null;
  return {
    news2: t.querySelector('.news2').textContent,
    band: t.querySelector('.news2').className,
    alarms: [...t.querySelectorAll('.alarm')].map((a) => ({
      rule: a.dataset.rule, priority: a.dataset.priority, state: a.dataset.state,
      text: a.textContent, background: getComputedStyle(a).backgroundColor,
      cut: a.querySelector('.what').scrollWidth > a.querySelector('.what').clientWidth,
      buttons: [...a.querySelectorAll('button')].map((b) => b.dataset.action),
    })),
    vitals: [...t.querySelectorAll('.vital')].map((v) => [...v.children].map((c) => c.textContent)),
    sparks: t.querySelectorAll('.spark polyline').length,
    border: getComputedStyle(t).borderTopColor,
    cls: t.className,
  };
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_ward_in_a_browser_with_its_alarm_acknowledged_from_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&demo_pipeline(), &dir.path().join("data"));
    replay_demo(edge.mqtt_port());
    let bed3 = "ward4-bed3";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let w = ward(&edge);
        let beds = w["beds"].as_array().unwrap();
        let bed = beds.iter().find(|b| b["subject"] == bed3);
        if beds.len() == 8 && bed.is_some_and(|b| !b["alarms"]["spo2-low"].is_null()) {
            break;
        }
        assert!(Instant::now() < deadline, "the ward view: {w}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut browser = Browser::launch(1920, 1080).await;
    let url = format!("http://{}/dashboard", edge.endpoints.http);
    browser.navigate(&url).await;
    browser
        .wait_for(
            "document.body.dataset.link === 'live' && document.querySelectorAll('.tile').length === 8",
            Duration::from_secs(20),
            "eight beds, live",
        )
        .await;
    let subjects = browser
        .eval("[...document.querySelectorAll('.tile')].map((t) => t.dataset.subject)")
        .await;
    let want: Vec<String> = (0..8).map(|i| format!("ward4-bed{i}")).collect();
    assert_eq!(subjects, json!(want));
    assert_eq!(
        browser.eval("document.title").await,
        json!(format!("{SITE} – ward dashboard"))
    );

    let tile = browser.eval(&format!("({TILE_JS})('{bed3}')")).await;
    let spo2 = tile["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["rule"] == "spo2-low")
        .unwrap_or_else(|| panic!("no spo2-low alarm on the page: {tile}"));
    assert_eq!(spo2["priority"], "high");
    // IEC 60601-1-8: high priority is red.
    assert_eq!(spo2["background"], "rgb(224, 0, 0)", "{spo2}");
    assert!(
        spo2["text"].as_str().unwrap().starts_with("!!! spo2-low"),
        "{spo2}"
    );
    assert_eq!(spo2["buttons"], json!(["ack", "silence"]));
    for a in tile["alarms"].as_array().unwrap() {
        assert_eq!(a["cut"], false, "alarm text cut off: {a}");
    }
    assert!(
        tile["cls"].as_str().unwrap().contains("alarm-high"),
        "{tile}"
    );
    // Medium priority is yellow.
    if let Some(hr) = tile["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["rule"] == "hr-high")
    {
        assert_eq!(hr["background"], "rgb(255, 212, 0)", "{hr}");
    }
    assert!(
        tile["news2"].as_str().unwrap().starts_with("NEWS2 "),
        "{tile}"
    );
    assert!(tile["band"].as_str().unwrap().contains("band-"), "{tile}");
    // Vitals with their units and ages, and a trend line each.
    let vitals = tile["vitals"].as_array().unwrap();
    let row = |label: &str| {
        vitals
            .iter()
            .find(|v| v[0] == label)
            .unwrap_or_else(|| panic!("no {label} on the tile: {tile}"))
            .clone()
    };
    assert_eq!(row("SpO₂")[2], "%");
    assert_eq!(row("Temp")[2], "°C");
    assert_eq!(row("Sys")[2], "mmHg");
    assert!(row("HR")[4].as_str().unwrap().ends_with('s'), "age {tile}");
    assert_eq!(tile["sparks"], json!(vitals.len()));

    let shot = artefact("dashboard.png");
    browser.screenshot(&shot).await;
    println!(
        "screenshot of the demo ward at 1920x1080: {}",
        shot.display()
    );

    // Acknowledge from the page, as a nurse would: name, then the button.
    browser
        .eval(
            "(() => { const by = document.getElementById('by'); by.value = 'Nurse Test'; \
             by.dispatchEvent(new Event('input')); })()",
        )
        .await;
    let clicked = browser
        .eval(&format!(
            "(() => {{ const t = [...document.querySelectorAll('.tile')].find((t) => t.dataset.subject === '{bed3}'); \
             const a = [...t.querySelectorAll('.alarm')].find((a) => a.dataset.rule === 'spo2-low'); \
             const b = a.querySelector('button[data-action=ack]'); b.click(); return !!b; }})()"
        ))
        .await;
    assert_eq!(clicked, json!(true));
    // The page reports the outcome: acknowledged, or why not.
    let said = browser
        .wait_for(
            "document.getElementById('msg').textContent",
            Duration::from_secs(10),
            "the page reports the acknowledgement",
        )
        .await;
    browser.close().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let w = ward(&edge);
        let state = w["beds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["subject"] == bed3)
            .map(|b| b["alarms"]["spo2-low"]["state"].clone())
            .unwrap_or_default();
        if state == "acknowledged" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spo2-low of {bed3} not acknowledged (state {state}); the page said: {said}. \
             Acknowledging needs the alarm stage, which consumes AlarmControl's commands"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(edge.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_eight_beds_fit_one_full_hd_screen_and_a_lost_link_shows_stale_until_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), 0o600);
    // A fixed HTTP port: the page reconnects to the service started again on it.
    let text = with_token(&demo_pipeline(), &token).replace(
        "[http]\nlisten = \"127.0.0.1:0\"",
        &format!("[http]\nlisten = \"127.0.0.1:{}\"", free_port()),
    );
    let data = dir.path().join("data");
    let edge = Edge::start(&text, &data);
    // One vitals message a bed (a second one 31 s later, below the SpO2 limit, on a few beds:
    // alarms on the screen too).
    let mut messages = Vec::new();
    for bed in 1..=48u32 {
        let low = bed % 12 == 5;
        let spo2 = if low { 88 } else { 95 + bed % 4 };
        let msg = |ts: i64| {
            (
                format!("ward/7/bed/{bed}/vitals"),
                format!(
                    r#"{{"ts":{ts},"hr":{},"spo2":{spo2},"rr":{},"sys":{},"dia":{}}}"#,
                    60 + bed,
                    12 + bed % 8,
                    110 + bed,
                    70 + bed % 10
                )
                .into_bytes(),
            )
        };
        messages.push(msg(T0 * 1000));
        if low {
            messages.push(msg((T0 + 31) * 1000));
        }
    }
    publish_all(edge.mqtt_port(), &messages).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while ward(&edge)["beds"].as_array().unwrap().len() < 48 {
        assert!(Instant::now() < deadline, "48 beds: {}", ward(&edge));
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut browser = Browser::launch(1920, 1080).await;
    browser
        .navigate(&format!("http://{}/dashboard", edge.endpoints.http))
        .await;
    browser
        .wait_for(
            "document.body.dataset.link === 'live' && document.querySelectorAll('.tile').length === 48 \
             && document.querySelectorAll('.alarm').length >= 4",
            Duration::from_secs(20),
            "48 beds with their alarms",
        )
        .await;
    let fit = browser
        .eval(
            r#"(() => {
  const out = [], small = [];
  for (const t of document.querySelectorAll('.tile')) {
    const r = t.getBoundingClientRect();
    if (r.left < 0 || r.top < 0 || r.right > 1920 || r.bottom > 1080) out.push([t.dataset.subject, r.left, r.top, r.right, r.bottom]);
  }
  for (const e of document.querySelectorAll('#grid *')) {
    const own = [...e.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim() !== '');
    const size = parseFloat(getComputedStyle(e).fontSize);
    if (own && size < 11) small.push([e.className, size]);
  }
  // An alarm's value must show: its text is never cut off.
  const cut = [...document.querySelectorAll('.alarm .what')].filter((w) => w.scrollWidth > w.clientWidth)
    .map((w) => w.textContent);
  return {out, small, cut, fontSize: getComputedStyle(document.querySelector('.v-label')).fontSize,
    scroll: document.documentElement.scrollHeight, height: window.innerHeight,
    order: [...document.querySelectorAll('.tile')].map((t) => t.dataset.subject),
    token: !document.getElementById('token-field').hidden};
})()"#,
        )
        .await;
    assert_eq!(fit["out"], json!([]), "tiles off the screen: {fit}");
    assert_eq!(fit["small"], json!([]), "text below 11 px: {fit}");
    assert_eq!(fit["cut"], json!([]), "alarm texts cut off: {fit}");
    assert!(fit["scroll"].as_f64() <= fit["height"].as_f64(), "{fit}");
    let want: Vec<String> = (1..=48).map(|i| format!("ward7-bed{i}")).collect();
    assert_eq!(fit["order"], json!(want), "beds sorted naturally");
    assert_eq!(
        fit["token"], true,
        "the page asks for the token the service needs"
    );
    let shot = artefact("dashboard-48.png");
    browser.screenshot(&shot).await;
    println!("screenshot of 48 beds at 1920x1080: {}", shot.display());

    // The service goes away: the page says so plainly, and greys out what it shows.
    assert!(edge.stop().success());
    let stale = browser
        .wait_for(
            "document.body.dataset.link === 'stale' && !document.getElementById('stale').hidden \
             && document.getElementById('stale').textContent",
            Duration::from_secs(15),
            "the stale banner",
        )
        .await;
    assert!(
        stale
            .as_str()
            .unwrap()
            .starts_with("STALE — connection lost since "),
        "{stale}"
    );
    let filter = browser
        .eval("getComputedStyle(document.getElementById('grid')).filter")
        .await;
    assert!(filter.as_str().unwrap().contains("grayscale"), "{filter}");
    let shot = artefact("dashboard-stale.png");
    browser.screenshot(&shot).await;
    println!("screenshot of the stale state: {}", shot.display());

    // Back again: the page reconnects by itself and the new snapshot (after a restart the
    // view holds only the beds whose alarms were kept, not the 48 beds' vitals) replaces what
    // it showed, without a reload.
    browser
        .eval("document.body.dataset.marker = 'same page'")
        .await;
    let edge = Edge::start(&text, &data);
    browser
        .wait_for(
            "document.body.dataset.link === 'live' && document.getElementById('stale').hidden \
             && document.body.dataset.marker === 'same page' \
             && document.querySelectorAll('.tile').length < 48",
            Duration::from_secs(20),
            "live again, with the new snapshot",
        )
        .await;
    publish_all(
        edge.mqtt_port(),
        &[(
            "ward/7/bed/9/vitals".to_owned(),
            format!(r#"{{"ts":{},"hr":71}}"#, T0 * 1000).into_bytes(),
        )],
    )
    .await;
    browser
        .wait_for(
            "[...document.querySelectorAll('.tile')].some((t) => t.dataset.subject === 'ward7-bed9')",
            Duration::from_secs(20),
            "the bed that reported since",
        )
        .await;
    assert_eq!(
        browser.eval("document.body.dataset.marker").await,
        "same page"
    );
    let filter = browser
        .eval("getComputedStyle(document.getElementById('grid')).filter")
        .await;
    assert_eq!(filter, "none", "no longer greyed out");
    browser.close().await;
    assert!(edge.stop().success());
}
