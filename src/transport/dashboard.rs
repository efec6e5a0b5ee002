//! The ward dashboard over HTTP: `GET /dashboard`, one self-contained page (`dashboard.html`:
//! no script, style, font or image from anywhere else); `GET /api/ward`, the ward now as JSON;
//! `GET /events`, the ward as server-sent events ([`ward_events`]); and
//! `POST /api/alarms/ack`, acknowledging or silencing an alarm, the one write action
//! ([`WriteAccess`] says who may).

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::{debug, info};

use crate::model::reading::now_micros;
use crate::pipeline::alarms::{AckError, AckRequest, AlarmControl};
use crate::pipeline::ward::WardHub;
use crate::transport::ward_events::{self, Message};
use crate::transport::write_access::WriteAccess;

const PAGE: &str = include_str!("dashboard.html");

/// Who acknowledged is kept in the alarm's history: a name or a badge id, not an essay.
pub const MAX_BY_CHARS: usize = 64;
/// An acknowledgement the alarm stage has not answered by then is reported as failed, so the
/// person at the dashboard is never left with a button that seems to do nothing.
const ACK_WAIT: Duration = Duration::from_secs(5);
/// How soon a dashboard's browser reconnects after the link broke.
const RECONNECT: Duration = Duration::from_secs(2);
/// Events queued for one dashboard before its feed waits (and, if it keeps not reading,
/// resynchronises it with a snapshot).
const FEED_QUEUE: usize = 16;

/// What the dashboard needs from the running service.
pub struct Dashboard {
    pub ward: Arc<WardHub>,
    pub alarms: AlarmControl,
    pub write: WriteAccess,
    /// Turns true when the service stops: open event streams end then.
    pub stop: watch::Receiver<bool>,
}

type Shared = Arc<Dashboard>;

pub fn router(dashboard: Dashboard) -> Router {
    Router::new()
        .route("/dashboard", get(page))
        .route("/api/ward", get(ward))
        .route("/events", get(events))
        .route(
            "/api/alarms/ack",
            post(ack).layer(DefaultBodyLimit::max(4096)),
        )
        .with_state(Arc::new(dashboard))
}

/// The page's one inline script and one inline style are allowed by their hashes, not by
/// `'unsafe-inline'`: should data ever slip into the page as markup, it could not run.
fn content_security_policy() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; \
             img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            inline_hash(PAGE, "script"),
            inline_hash(PAGE, "style"),
        )
    })
}

/// `'sha256-…'` of the text of the page's `<tag>` element.
fn inline_hash(page: &str, tag: &str) -> String {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let start = page.find(&open).expect("the page has the element") + open.len();
    let end = start + page[start..].find(&close).expect("and its end");
    let hash = ring::digest::digest(&ring::digest::SHA256, &page.as_bytes()[start..end]);
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(hash.as_ref())
    )
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, content_security_policy()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // Its buttons act on alarms: no other site may frame it and trick a click.
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

/// What the page needs to know besides the ward.
fn write_info(write: &WriteAccess) -> Value {
    json!({
        "write_needs_token": write.needs_token(),
        "write_allowed": write.allowed(),
    })
}

async fn ward(State(d): State<Shared>) -> Response {
    let (_, mut body) = d.ward.snapshot();
    if let (Some(body), Value::Object(info)) = (body.as_object_mut(), write_info(&d.write)) {
        body.extend(info);
        body.insert("now_us".into(), now_micros().into());
    }
    ([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

async fn events(State(d): State<Shared>) -> Response {
    let (tx, rx) = flume::bounded(FEED_QUEUE);
    tokio::spawn(ward_events::feed(
        d.ward.clone(),
        write_info(&d.write),
        d.stop.clone(),
        tx,
        to_event,
    ));
    (
        // Proxies that buffer responses would hold the stream back.
        [("x-accel-buffering", "no")],
        Sse::new(rx.into_stream()),
    )
        .into_response()
}

fn to_event(m: Message) -> Result<Event, Infallible> {
    let mut e = Event::default().event(m.event).data(m.data);
    if let Some(id) = m.id {
        e = e.id(id.to_string());
    }
    if m.event == "snapshot" {
        e = e.retry(RECONNECT);
    }
    Ok(e)
}

/// `POST /api/alarms/ack`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AckBody {
    subject: String,
    rule: String,
    by: String,
    /// Silence for this many seconds instead of a plain acknowledgement.
    #[serde(default)]
    silence_s: Option<u64>,
    /// For a silence alarm: the device was taken away on purpose.
    #[serde(default)]
    device_removed: bool,
    /// The evidence seq the acknowledger saw: refused if the alarm was raised again since.
    #[serde(default)]
    seq: Option<u64>,
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn parse_ack(body: &[u8]) -> Result<AckRequest, String> {
    let b: AckBody = serde_json::from_slice(body).map_err(|e| {
        format!(
            "the body is not an acknowledgement ({e}): expected JSON {{\"subject\": …, \
             \"rule\": …, \"by\": …, \"silence_s\": optional seconds}}"
        )
    })?;
    if b.subject.is_empty() || b.rule.is_empty() {
        return Err("`subject` and `rule` must not be empty".into());
    }
    let by = b.by.trim();
    if by.is_empty() {
        return Err("`by` (who acknowledges: a name or badge id) must not be empty".into());
    }
    if by.chars().count() > MAX_BY_CHARS {
        return Err(format!("`by` is longer than {MAX_BY_CHARS} characters"));
    }
    if by.chars().any(char::is_control) {
        return Err("`by` must not hold control characters".into());
    }
    if b.silence_s == Some(0) {
        return Err("`silence_s` must be at least 1 (or left out to acknowledge)".into());
    }
    Ok(AckRequest {
        subject: b.subject,
        rule: b.rule,
        by: by.to_owned(),
        silence: b.silence_s.map(Duration::from_secs),
        device_removed: b.device_removed,
        seq: b.seq,
    })
}

async fn ack(State(d): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(denied) = d.write.check(&headers) {
        let mut r = error(denied.status, denied.message);
        if denied.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        return r;
    }
    // Also keeps other sites' pages out: a cross-origin JSON post needs a preflight, which
    // this service never grants.
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the acknowledgement as JSON (Content-Type: application/json)",
        );
    }
    let request = match parse_ack(&body) {
        Ok(r) => r,
        Err(msg) => return error(StatusCode::BAD_REQUEST, &msg),
    };
    let (rule, by, silence) = (request.rule.clone(), request.by.clone(), request.silence);
    // The subject names a patient: only at debug level.
    debug!(subject = %request.subject, %rule, "acknowledgement over HTTP");
    match tokio::time::timeout(ACK_WAIT, d.alarms.ack(request)).await {
        Ok(Ok(alarm)) => {
            info!(%rule, %by, ?silence, "alarm acknowledged over HTTP");
            (StatusCode::OK, Json(alarm)).into_response()
        }
        Ok(Err(e)) => {
            let status = match e {
                AckError::NotFound { .. } => StatusCode::NOT_FOUND,
                AckError::Cleared => StatusCode::CONFLICT,
                AckError::Invalid(_) => StatusCode::BAD_REQUEST,
                AckError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            };
            error(status, &e.to_string())
        }
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the alarm stage did not answer in time; the alarm may not be acknowledged",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::reading::Metric;
    use crate::pipeline::alarms::AlarmCommand;
    use crate::pipeline::ward::VitalReading;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Stands in for the alarm stage: answers by rule name.
    fn fake_alarm_stage(rx: flume::Receiver<AlarmCommand>) {
        tokio::spawn(async move {
            while let Ok(AlarmCommand::Ack { request, reply }) = rx.recv_async().await {
                let answer = match request.rule.as_str() {
                    "spo2-low" => Ok(json!({
                        "subject": request.subject,
                        "rule": request.rule,
                        "state": if request.silence.is_some() { "silenced" } else { "acknowledged" },
                        "acknowledged": {"by": request.by},
                        "silence_s": request.silence.map(|d| d.as_secs()),
                    })),
                    "cleared" => Err(AckError::Cleared),
                    "odd" => Err(AckError::Invalid("not that way".into())),
                    rule => Err(AckError::NotFound { rule: rule.into() }),
                };
                let _ = reply.send(answer);
            }
        });
    }

    /// Serves a dashboard on a loopback port; returns its address and the stop switch.
    async fn serve(write: WriteAccess, stage: bool) -> (std::net::SocketAddr, watch::Sender<bool>) {
        let ward = Arc::new(WardHub::new("w"));
        ward.vitals(&[VitalReading {
            subject: "bed-1".into(),
            metric: Metric::Spo2,
            value: Some(88.0),
            text: None,
            ts: 1_700_000_000_000_000,
            received: 1_700_000_000_000_000,
        }]);
        let (tx, rx) = flume::bounded(64);
        if stage {
            fake_alarm_stage(rx);
        } else {
            drop(rx);
        }
        let (stop_tx, stop) = watch::channel(false);
        let app = router(Dashboard {
            ward,
            alarms: AlarmControl::new(tx),
            write,
            stop: stop.clone(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(crate::transport::http::serve(listener, app, None, stop));
        (addr, stop_tx)
    }

    /// One HTTP/1.0 exchange: status, headers (lower-case names) and body.
    async fn exchange(addr: std::net::SocketAddr, head: &str, body: &str) -> (u16, String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "{head}\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        let (h, b) = text.split_once("\r\n\r\n").unwrap();
        (
            h[9..12].parse().unwrap(),
            h.to_ascii_lowercase(),
            b.to_owned(),
        )
    }

    async fn post_ack(addr: std::net::SocketAddr, extra: &str, body: &str) -> (u16, Value) {
        let head =
            format!("POST /api/alarms/ack HTTP/1.0\r\nContent-Type: application/json{extra}");
        let (code, _, body) = exchange(addr, &head, body).await;
        (code, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    #[tokio::test]
    async fn acknowledgements_reach_the_alarm_stage_and_its_answer_comes_back() {
        let (addr, _stop) = serve(WriteAccess::Open, true).await;
        let (code, v) = post_ack(
            addr,
            "",
            r#"{"subject":"bed-1","rule":"spo2-low","by":" Nurse Ann "}"#,
        )
        .await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["state"], "acknowledged");
        assert_eq!(v["acknowledged"]["by"], "Nurse Ann");
        let (code, v) = post_ack(
            addr,
            "",
            r#"{"subject":"bed-1","rule":"spo2-low","by":"N1","silence_s":120}"#,
        )
        .await;
        assert_eq!(
            (code, &v["state"], &v["silence_s"]),
            (200, &json!("silenced"), &json!(120))
        );

        for (rule, want) in [("gone", 404), ("cleared", 409), ("odd", 400)] {
            let (code, v) = post_ack(
                addr,
                "",
                &format!(r#"{{"subject":"bed-1","rule":"{rule}","by":"N1"}}"#),
            )
            .await;
            assert_eq!(code, want, "{rule}: {v}");
            assert!(v["error"].is_string(), "{v}");
        }
    }

    #[tokio::test]
    async fn a_bad_acknowledgement_is_refused_saying_why() {
        let (addr, _stop) = serve(WriteAccess::Open, true).await;
        let long = "x".repeat(MAX_BY_CHARS + 1);
        for (body, says) in [
            ("{not json", "not an acknowledgement"),
            (
                r#"{"subject":"bed-1","rule":"spo2-low"}"#,
                "missing field `by`",
            ),
            (r#"{"subject":"bed-1","rule":"spo2-low","by":"  "}"#, "`by`"),
            (
                &format!(r#"{{"subject":"bed-1","rule":"spo2-low","by":"{long}"}}"#),
                "longer than 64",
            ),
            (
                r#"{"subject":"bed-1","rule":"spo2-low","by":"a","silence":120}"#,
                "unknown field `silence`",
            ),
            (
                r#"{"subject":"bed-1","rule":"spo2-low","by":"a","silence_s":0}"#,
                "at least 1",
            ),
            (
                r#"{"subject":"","rule":"spo2-low","by":"a"}"#,
                "must not be empty",
            ),
        ] {
            let (code, v) = post_ack(addr, "", body).await;
            assert_eq!(code, 400, "{body}: {v}");
            let msg = v["error"].as_str().unwrap();
            assert!(msg.contains(says), "{body}: {msg}");
        }
        let (code, _, _) = exchange(
            addr,
            "POST /api/alarms/ack HTTP/1.0\r\nContent-Type: text/plain",
            r#"{"subject":"bed-1","rule":"spo2-low","by":"a"}"#,
        )
        .await;
        assert_eq!(code, 415);
    }

    #[tokio::test]
    async fn without_an_alarm_stage_an_acknowledgement_says_so() {
        let (addr, _stop) = serve(WriteAccess::Open, false).await;
        let (code, v) = post_ack(
            addr,
            "",
            r#"{"subject":"bed-1","rule":"spo2-low","by":"a"}"#,
        )
        .await;
        assert_eq!(code, 503);
        assert_eq!(v["error"], "the alarm stage is not running");
    }

    #[tokio::test]
    async fn refused_writes_name_what_to_set_and_reads_stay_open() {
        let (addr, _stop) = serve(WriteAccess::Refused, true).await;
        let (code, v) = post_ack(
            addr,
            "",
            r#"{"subject":"bed-1","rule":"spo2-low","by":"a"}"#,
        )
        .await;
        assert_eq!(code, 403);
        assert!(v["error"].as_str().unwrap().contains("http.token_file"));
        let (code, _, body) = exchange(addr, "GET /api/ward HTTP/1.0", "").await;
        assert_eq!(code, 200);
        let w: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(w["beds"][0]["subject"], "bed-1");
        assert_eq!(
            (&w["write_allowed"], &w["write_needs_token"]),
            (&json!(false), &json!(false))
        );
    }

    #[tokio::test]
    async fn the_page_is_served_with_a_policy_that_allows_only_itself() {
        let (addr, _stop) = serve(WriteAccess::Open, true).await;
        let (code, head, body) = exchange(addr, "GET /dashboard HTTP/1.0", "").await;
        assert_eq!(code, 200);
        assert!(
            head.contains("content-type: text/html; charset=utf-8"),
            "{head}"
        );
        let csp = head
            .lines()
            .find_map(|l| l.strip_prefix("content-security-policy: "))
            .unwrap();
        assert!(
            csp.starts_with("default-src 'none'; script-src 'sha256-"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(body, PAGE);
        // One inline script and one inline style: the hashes cover all of them.
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        assert!(!PAGE.contains(" style=") && !PAGE.contains(".innerHTML"));
    }

    #[tokio::test]
    async fn an_open_event_stream_does_not_hold_up_a_stop() {
        let (addr, stop) = serve(WriteAccess::Open, true).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 65536];
        let mut got = String::new();
        while !got.contains("event: snapshot") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(got.contains("text/event-stream"), "{got}");
        stop.send_replace(true);
        let closed = tokio::time::timeout(Duration::from_secs(2), async {
            while s.read(&mut buf).await.unwrap() > 0 {}
        })
        .await;
        assert!(
            closed.is_ok(),
            "the stream ends and the connection closes at stop"
        );
    }
}
