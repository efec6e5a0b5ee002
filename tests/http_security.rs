//! HTTP that is safe off loopback, black box: the real binary, real HTTPS clients (reqwest on
//! rustls with ring), certificates made for each test by rcgen.
//!
//! Servers started by tests bind to loopback only, so a running service with the off-loopback
//! rules is tested through `[http] require_token = true` on 127.0.0.1: the rule "everything but
//! /healthz needs the token" is one code path (`HttpConfig::requires_token`), taken for a
//! listener off loopback and for one with `require_token` alike. The refusals at start use
//! `listen = "0.0.0.0:0"`: the service refuses before it binds anything.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::security::*;
use common::*;
use rcgen::{CertificateParams, KeyPair};

const TOKEN: &str = "b7e2c41f9a0d3e6f58a1c2d4e6f80912";

/// The service's certificate (for `localhost`) and key, signed by a CA of its own; returns
/// the CA's PEM, the `[http.tls]` table and the token file.
fn tls_files(dir: &Path) -> (String, String, PathBuf) {
    let (ca_pem, issuer) = ca("ward CA");
    let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let cert = write_file(&dir.join("http.crt"), &cert.pem(), 0o644);
    let key = write_file(&dir.join("http.key"), &key.serialize_pem(), 0o600);
    let token = write_file(&dir.join("http-token"), &format!("{TOKEN}\n"), 0o600);
    let table = format!(
        "[http.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    (ca_pem, table, token)
}

/// `pipeline()` with its `[http]` table replaced by `http` (a `[http]` header and keys, and
/// any subtables).
fn with_http(http: &str) -> String {
    let text = pipeline("");
    let old = "[http]\nlisten = \"127.0.0.1:0\"\n";
    assert!(text.contains(old));
    text.replace(old, http)
}

#[tokio::test]
async fn https_with_the_token_for_everything_but_healthz() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, tls_table, token) = tls_files(dir.path());
    let text = with_http(&format!(
        "[http]\nlisten = \"127.0.0.1:0\"\nrequire_token = true\ntoken_file = \"{}\"\n{tls_table}",
        token.display()
    ));
    let edge = Edge::spawn(&text, &dir.path().join("data"), &[]);
    let base = format!("https://localhost:{}", edge.endpoints.http.port());
    let https = https_client(&ca_pem);

    // /healthz needs no token (a container's health check has none).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = https.get(format!("{base}/healthz")).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "not healthy: {}", edge.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A client that does not trust the service's CA does not get through the handshake.
    let (other_ca, _) = ca("ward CA");
    let err = https_client(&other_ca)
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    // Plain HTTP on the HTTPS port gets no HTTP answer.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(edge.endpoints.http).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");
    }

    // Without the token, or with a wrong one: 401 with a Bearer challenge, counted.
    let metrics = |auth: Option<&str>| {
        let mut req = https.get(format!("{base}/metrics"));
        if let Some(t) = auth {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let r = metrics(None).await.unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    let r = metrics(Some("b7e2c41f9a0d3e6f58a1c2d4e6f80913"))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    for path in [
        "/api/ward",
        "/dashboard",
        "/log/checkpoint",
        "/proof/0",
        "/nowhere",
    ] {
        let r = https.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    // With it: 200, and the refusals were counted.
    let r = metrics(Some(TOKEN)).await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert_eq!(metric_value(&text, "iomt_http_unauthorized_total"), 7.0);
    let r = https
        .get(format!("{base}/api/ward"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Nothing logged the token (the service logs at its default level).
    assert!(!edge.log().contains(TOKEN));
    assert!(edge.stop().success());
}

#[tokio::test]
async fn a_browser_signs_in_once_and_its_cookie_opens_the_dashboard_and_its_event_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, tls_table, token) = tls_files(dir.path());
    let text = with_http(&format!(
        "[http]\nlisten = \"127.0.0.1:0\"\nrequire_token = true\ntoken_file = \"{}\"\n{tls_table}",
        token.display()
    ));
    let edge = Edge::spawn(&text, &dir.path().join("data"), &[]);
    let base = format!("https://localhost:{}", edge.endpoints.http.port());
    let https = https_client(&ca_pem);

    // The dashboard without a session: the sign-in form, still a 401.
    let r = https.get(format!("{base}/dashboard")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let page = r.text().await.unwrap();
    assert!(
        page.contains("<form method=\"post\" action=\"/login\">"),
        "{page}"
    );

    let login = |token: &str| {
        https
            .post(format!("{base}/login"))
            // (Tokens here need no URL-encoding.)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={token}"))
            .send()
    };
    let r = login("not-the-token-at-all-1234").await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());

    let r = login(TOKEN).await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/dashboard");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(!cookie.contains(TOKEN), "{cookie}");
    let session = cookie.split(';').next().unwrap().to_owned();
    assert!(session.starts_with("iomt_session="), "{session}");

    // The cookie opens the page, the ward and the event stream, which an EventSource could
    // not have sent a header for.
    for path in ["/dashboard", "/api/ward"] {
        let r = https
            .get(format!("{base}{path}"))
            .header("cookie", &session)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let mut events = https
        .get(format!("{base}/events"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    assert!(events.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut seen = String::new();
    while !seen.contains("event: snapshot") {
        let chunk = events.chunk().await.unwrap().expect("the stream goes on");
        seen.push_str(&String::from_utf8_lossy(&chunk));
        assert!(seen.len() < 1 << 20, "{seen}");
    }

    // A forged or stale cookie opens nothing; nor does the cookie make a write action.
    let r = https
        .get(format!("{base}/api/ward"))
        .header(
            "cookie",
            "iomt_session=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = https
        .post(format!("{base}/api/alarms/ack"))
        .header("cookie", &session)
        .header("content-type", "application/json")
        .body(r#"{"subject":"w7-b3","rule":"spo2-low","by":"N"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "writes need the bearer token");

    // A stop is not held up by the open event stream over TLS.
    let (status, _) = edge.stop_timed();
    assert!(status.success());
    drop(events);
}

#[test]
fn a_listener_off_loopback_without_tls_or_the_opt_out_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let token = write_file(&dir.path().join("t"), TOKEN, 0o600);
    let err = refused_at_start(
        dir.path(),
        &with_http(&format!(
            "[http]\nlisten = \"0.0.0.0:0\"\ntoken_file = \"{}\"\n",
            token.display()
        )),
    );
    assert!(err.contains("http.tls"), "{err}");
    assert!(err.contains("0.0.0.0:0 is not on loopback"), "{err}");
    assert!(err.contains("allow_plaintext = true"), "{err}");
    // The error names the listen line of the file.
    let line = pipeline("").lines().position(|l| l == "[http]").unwrap() + 2;
    assert!(err.contains(&format!("p.toml:{line}: http.tls:")), "{err}");
}

#[test]
fn a_listener_off_loopback_without_a_token_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    // Neither with the plain-text opt-out …
    let err = refused_at_start(
        dir.path(),
        &with_http("[http]\nlisten = \"0.0.0.0:0\"\nallow_plaintext = true\n"),
    );
    assert!(err.contains("http.token_file"), "{err}");
    assert!(err.contains("not on loopback"), "{err}");
    // … nor with TLS.
    let (_, tls_table, _) = tls_files(dir.path());
    let err = refused_at_start(
        dir.path(),
        &with_http(&format!("[http]\nlisten = \"0.0.0.0:0\"\n{tls_table}")),
    );
    assert!(err.contains("http.token_file"), "{err}");
    // require_token on loopback needs one as well.
    let err = refused_at_start(
        dir.path(),
        &with_http("[http]\nlisten = \"127.0.0.1:0\"\nrequire_token = true\n"),
    );
    assert!(
        err.contains("http.token_file") && err.contains("require_token"),
        "{err}"
    );
}

#[test]
fn a_tls_key_others_can_read_stops_the_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_, tls_table, token) = tls_files(dir.path());
    let key = dir.path().join("http.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = refused_at_start(
        dir.path(),
        &with_http(&format!(
            "[http]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n{tls_table}",
            token.display()
        )),
    );
    assert!(
        err.contains(&format!("http.tls: TLS key {}: mode 0644", key.display())),
        "{err}"
    );
    let key_text = std::fs::read_to_string(&key).unwrap();
    assert!(!err.contains(key_text.lines().nth(1).unwrap()), "{err}");
}

#[test]
fn on_loopback_without_require_token_everything_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let token = write_file(&dir.path().join("t"), TOKEN, 0o600);
    let text = with_http(&format!(
        "[http]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
        token.display()
    ));
    let edge = Edge::start(&text, &dir.path().join("data"));
    for path in ["/metrics", "/api/ward", "/dashboard"] {
        assert_eq!(edge.get(path).0, 200, "{path}");
    }
    assert_eq!(edge.metric("iomt_http_unauthorized_total"), 0.0);
    assert!(edge.stop().success());
}

#[test]
fn open_reading_answers_requests_for_this_machine_only() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(&pipeline(""), &dir.path().join("data"));
    let addr = edge.endpoints.http;
    let status = |host: &str| {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET /api/ward HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text[9..12].parse::<u16>().unwrap()
    };
    // A page on a rebinding domain reaches 127.0.0.1, but names its own domain.
    assert_eq!(status("ward-data.evil.example"), 421);
    assert_eq!(
        status(&format!("ward-data.evil.example:{}", addr.port())),
        421
    );
    for host in [
        addr.to_string(),
        format!("localhost:{}", addr.port()),
        "[::1]".into(),
    ] {
        assert_eq!(status(&host), 200, "{host}");
    }
    assert!(edge.stop().success());
}
