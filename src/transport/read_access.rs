//! Who may use the HTTP endpoint at all. On a loopback listener, whoever is on this machine, as
//! always. Off loopback (or with `http.require_token`), every path but `/healthz` needs the token
//! of `http.token_file`: as `Authorization: Bearer <token>` (Prometheus, scripts), or, for a
//! browser showing the dashboard, as a session cookie that `POST /login` sets once the token is
//! typed into a form.
//!
//! Why a cookie: the dashboard's live feed is an `EventSource`, which cannot send a header, and
//! a token in the URL's query would end up in proxies' and browsers' logs. The cookie is
//! `HttpOnly` (no script, injected or not, can read it), `Secure` (never sent over plain HTTP;
//! browsers make an exception for localhost only), and `SameSite=Strict` (no other site's page
//! can make the browser send it, so it cannot be used for cross-site requests). It holds a value
//! derived from the token ([`Token::session`]), never the token, and it is good for reading
//! only: write actions still need the bearer token ([`crate::transport::write_access`]).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Form, Router};
use serde::Deserialize;
use tracing::debug;

use crate::model::metrics::Metrics;
use crate::transport::write_access::{bearer, Token};

pub const SESSION_COOKIE: &str = "iomt_session";
/// Open to all: a health check (a container's, a load balancer's) has no token, and it tells
/// nothing about patients.
const OPEN_PATH: &str = "/healthz";
const LOGIN_PATH: &str = "/login";

/// The rule, fixed at start.
#[derive(Clone)]
pub struct ReadAccess {
    /// `None`: open (a loopback listener without `require_token`).
    token: Option<Arc<Token>>,
    metrics: Arc<Metrics>,
}

impl ReadAccess {
    pub fn open(metrics: Arc<Metrics>) -> ReadAccess {
        ReadAccess {
            token: None,
            metrics,
        }
    }

    pub fn token(token: Token, metrics: Arc<Metrics>) -> ReadAccess {
        ReadAccess {
            token: Some(Arc::new(token)),
            metrics,
        }
    }

    /// Wraps `router` in the rule, and adds the login form when a token is needed.
    pub fn protect(self, router: Router) -> Router {
        if self.token.is_none() {
            return router.layer(axum::middleware::from_fn(loopback_host_only));
        }
        let login = Router::new()
            .route(LOGIN_PATH, get(login_page).post(login))
            .with_state(self.clone());
        router
            .merge(login)
            .layer(axum::middleware::from_fn_with_state(self, gate))
    }
}

/// Open reading is for this machine: a request must also name it (`Host`). A web page whose
/// domain a rebinding DNS server points at 127.0.0.1 reaches the port, but names its own
/// domain, and must not read the ward.
async fn loopback_host_only(req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok());
    match host {
        Some(h) if crate::transport::write_access::is_loopback_host(h) => next.run(req).await,
        _ => (
            axum::http::StatusCode::MISDIRECTED_REQUEST,
            "this listener answers requests for localhost only\n",
        )
            .into_response(),
    }
}

async fn gate(State(a): State<ReadAccess>, req: Request, next: Next) -> Response {
    let Some(token) = &a.token else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if path == OPEN_PATH || path == LOGIN_PATH {
        return next.run(req).await;
    }
    let headers = req.headers();
    let by_bearer = bearer(headers).is_some_and(|t| token.matches(t.as_bytes()));
    if by_bearer || session(headers).is_some_and(|s| token.matches_session(s.as_bytes())) {
        return next.run(req).await;
    }
    a.metrics.http_unauthorized.inc();
    // The path only: never the header, which may hold a mistyped token.
    debug!(method = %req.method(), path, "HTTP request without the token refused");
    // A person opening the dashboard gets the login form; everything else a plain answer.
    let form = req.method() == Method::GET && path == "/dashboard";
    unauthorized(form)
}

fn unauthorized(form: bool) -> Response {
    let challenge = [(header::WWW_AUTHENTICATE, "Bearer realm=\"iomt-edge\"")];
    if form {
        return (StatusCode::UNAUTHORIZED, challenge, login_form()).into_response();
    }
    (
        StatusCode::UNAUTHORIZED,
        challenge,
        "this needs `Authorization: Bearer <token>` (the token of http.token_file)\n",
    )
        .into_response()
}

/// The value of the session cookie, if the request has one.
fn session(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value)
}

const LOGIN_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>iomt-edge: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><h1>Ward dashboard</h1>
<form method="post" action="/login">
<label>Token <input name="token" type="password" autocomplete="current-password" required autofocus></label>
<button type="submit">Open the dashboard</button>
</form>
<p>The token is the one in the service's <code>http.token_file</code>.</p>
</body></html>
"#;

fn login_form() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // No script, no style: the form may post only to this service.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        LOGIN_PAGE,
    )
        .into_response()
}

async fn login_page() -> Response {
    login_form()
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

async fn login(State(a): State<ReadAccess>, Form(form): Form<Login>) -> Response {
    let token = a
        .token
        .as_ref()
        .expect("the login route exists with a token");
    if !token.matches(form.token.trim().as_bytes()) {
        a.metrics.http_unauthorized.inc();
        debug!("a login with a wrong token refused");
        return unauthorized(true);
    }
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path=/; HttpOnly; Secure; SameSite=Strict",
        token.session()
    );
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, cookie),
            (header::LOCATION, "/dashboard".to_owned()),
            (header::CACHE_CONTROL, "no-store".to_owned()),
        ],
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            "a=1; iomt_session=abc; b=2".parse().unwrap(),
        );
        assert_eq!(session(&h), Some("abc"));
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "x=1".parse().unwrap());
        h.append(header::COOKIE, "iomt_session=def".parse().unwrap());
        assert_eq!(session(&h), Some("def"));
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "iomt_sessionx=abc".parse().unwrap());
        assert_eq!(session(&h), None);
        assert_eq!(session(&HeaderMap::new()), None);
    }
}
