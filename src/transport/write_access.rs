//! Who may act through HTTP. Reads (the dashboard, `/api/ward`, `/events`) are open; a write
//! action (acknowledging or silencing an alarm) needs `Authorization: Bearer <token>` with the
//! token of `http.token_file` when one is set. Without a token, writes are open only on a
//! loopback listener (whoever reaches it is on this machine), and refused on any other.
//!
//! The token is read once at start, from a file only its owner may read, and never logged.

use std::path::{Path, PathBuf};

use axum::http::{header, HeaderMap, StatusCode};
use base64::Engine as _;
use ring::hmac;
use ring::rand::SystemRandom;

use crate::config::HttpConfig;

/// Shorter tokens could be guessed over the network: a rate limit is no substitute.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("http.token_file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("http.token_file {}: not a regular file", .path.display())]
    NotAFile { path: PathBuf },
    #[error(
        "http.token_file {}: mode {mode:04o} lets others read the token; make it readable by \
         its owner only (chmod 600 {})",
        .path.display(), .path.display()
    )]
    Mode { path: PathBuf, mode: u32 },
    #[error("http.token_file {}: empty", .path.display())]
    Empty { path: PathBuf },
    #[error(
        "http.token_file {}: the token must be at least {MIN_TOKEN_LEN} visible ASCII characters \
         without spaces (e.g. `openssl rand -hex 32`)",
        .path.display()
    )]
    Weak { path: PathBuf },
}

/// The token, kept only as its HMAC under a key made at start, and the dashboard's session
/// value derived from it ([`Token::session`]). Its `Debug` shows neither.
#[derive(Clone)]
pub struct Token {
    key: hmac::Key,
    tag: hmac::Tag,
    session: String,
    session_tag: hmac::Tag,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// Reads a token file: a regular file, mode 0600 or stricter, holding one token (surrounding
    /// whitespace, such as the newline an editor adds, is not part of it).
    pub fn load(path: &Path) -> Result<Token, TokenFileError> {
        use std::os::unix::fs::PermissionsExt;
        let read = |source| TokenFileError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        if !meta.is_file() {
            return Err(TokenFileError::NotAFile {
                path: path.to_owned(),
            });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(TokenFileError::Mode {
                path: path.to_owned(),
                mode,
            });
        }
        let bytes = std::fs::read(path).map_err(read)?;
        let token = bytes.trim_ascii();
        if token.is_empty() {
            return Err(TokenFileError::Empty {
                path: path.to_owned(),
            });
        }
        // A browser can send only visible ASCII in a header; anything else is a mistake.
        if token.len() < MIN_TOKEN_LEN || !token.iter().all(|b| b.is_ascii_graphic()) {
            return Err(TokenFileError::Weak {
                path: path.to_owned(),
            });
        }
        Ok(Token::new(token))
    }

    fn new(token: &[u8]) -> Token {
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())
            .expect("the system's random source");
        let tag = hmac::sign(&key, token);
        // Derived from the token, not drawn at start: a dashboard left open keeps its session
        // across a restart of the service (its event stream reconnects by itself), and
        // changing the token ends every session. The cookie holding it never shows the token.
        let derived = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, token),
            b"iomt-edge dashboard session v1",
        );
        let session = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(derived.as_ref());
        let session_tag = hmac::sign(&key, session.as_bytes());
        Token {
            key,
            tag,
            session,
            session_tag,
        }
    }

    /// The value of the dashboard's session cookie: as good as the token for reading, never
    /// for a write action.
    pub fn session(&self) -> &str {
        &self.session
    }

    /// Whether `given` is the session value, in constant time (as [`Token::matches`]).
    pub fn matches_session(&self, given: &[u8]) -> bool {
        hmac::verify(&self.key, given, self.session_tag.as_ref()).is_ok()
    }

    /// In constant time: `hmac::verify` is ring's constant-time comparison (its
    /// `constant_time::verify_slices_are_equal` is deprecated, with no promise about side
    /// channels), and comparing HMACs leaks not even the token's length.
    pub fn matches(&self, given: &[u8]) -> bool {
        hmac::verify(&self.key, given, self.tag.as_ref()).is_ok()
    }
}

/// The rule for write actions, fixed at start.
#[derive(Debug, Clone)]
pub enum WriteAccess {
    /// A loopback listener without a token.
    Open,
    /// A bearer token is needed.
    Token(Box<Token>),
    /// A listener others can reach, without a token: no write action at all.
    Refused,
}

/// Why a write action was refused: a status and a message for the person at the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub status: StatusCode,
    pub message: &'static str,
}

impl WriteAccess {
    /// Reads `http.token_file` if set; otherwise writes are open on loopback only.
    pub fn from_config(http: &HttpConfig) -> Result<WriteAccess, TokenFileError> {
        Ok(match &http.token_file {
            Some(path) => WriteAccess::Token(Box::new(Token::load(path)?)),
            None if http.listen.ip().is_loopback() => WriteAccess::Open,
            None => WriteAccess::Refused,
        })
    }

    /// The token, when one is set.
    pub fn token(&self) -> Option<&Token> {
        match self {
            WriteAccess::Token(t) => Some(t),
            _ => None,
        }
    }

    pub fn needs_token(&self) -> bool {
        matches!(self, WriteAccess::Token(_))
    }

    pub fn allowed(&self) -> bool {
        !matches!(self, WriteAccess::Refused)
    }

    /// Whether a write request with these headers may go ahead.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Denied> {
        match self {
            WriteAccess::Refused => Err(Denied {
                status: StatusCode::FORBIDDEN,
                message: "write actions are refused: the HTTP listener is not on loopback and \
                          no token is configured; set http.token_file in the pipeline file",
            }),
            WriteAccess::Token(token) => match bearer(headers) {
                Some(t) if token.matches(t.as_bytes()) => Ok(()),
                Some(_) => Err(Denied {
                    status: StatusCode::UNAUTHORIZED,
                    message: "wrong token",
                }),
                None => Err(Denied {
                    status: StatusCode::UNAUTHORIZED,
                    message: "this action needs `Authorization: Bearer <token>` (the token \
                                  of http.token_file)",
                }),
            },
            // Without a token, a browser on this machine is the only gate: a page from
            // elsewhere must not make it act (a form posted across origins, or a name that
            // resolves to 127.0.0.1 to get around the same-origin rule).
            WriteAccess::Open => {
                let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
                if !host.is_some_and(is_loopback_host) {
                    return Err(Denied {
                        status: StatusCode::FORBIDDEN,
                        message: "without http.token_file, write actions are taken only from \
                                  a page opened as 127.0.0.1, [::1] or localhost",
                    });
                }
                let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
                if let (Some(origin), Some(host)) = (origin, host) {
                    if origin.strip_prefix("http://") != Some(host) {
                        return Err(Denied {
                            status: StatusCode::FORBIDDEN,
                            message: "a write action from another origin is refused",
                        });
                    }
                }
                Ok(())
            }
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header, if there is one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let path = dir.join("token");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_token_file_is_owner_only_and_holds_a_real_token() {
        let dir = tempfile::tempdir().unwrap();
        let token = "0123456789abcdef0123456789abcdef";
        let t = Token::load(&file(dir.path(), &format!("{token}\n"), 0o600)).unwrap();
        assert!(t.matches(token.as_bytes()));
        assert!(!t.matches(b"0123456789abcdef0123456789abcdee"));
        assert!(!t.matches(b""));
        assert_eq!(format!("{t:?}"), "Token(…)");
        assert!(Token::load(&file(dir.path(), token, 0o400)).is_ok());

        let path = file(dir.path(), token, 0o644);
        let msg = Token::load(&path).unwrap_err().to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("mode 0644"),
            "{msg}"
        );
        assert!(!msg.contains(token));
        assert!(matches!(
            Token::load(&file(dir.path(), token, 0o640)),
            Err(TokenFileError::Mode { mode: 0o640, .. })
        ));
        assert!(matches!(
            Token::load(&file(dir.path(), " \n", 0o600)),
            Err(TokenFileError::Empty { .. })
        ));
        for weak in ["short", "0123456789 abcdef0123"] {
            assert!(matches!(
                Token::load(&file(dir.path(), weak, 0o600)),
                Err(TokenFileError::Weak { .. })
            ));
        }
        assert!(matches!(
            Token::load(&dir.path().join("absent")),
            Err(TokenFileError::Read { .. })
        ));
        assert!(matches!(
            Token::load(dir.path()),
            Err(TokenFileError::NotAFile { .. })
        ));
    }

    #[test]
    fn writes_need_the_bearer_token_when_one_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let token = "0123456789abcdef0123456789abcdef";
        let access = WriteAccess::Token(Box::new(
            Token::load(&file(dir.path(), token, 0o600)).unwrap(),
        ));
        assert!(access.needs_token() && access.allowed());
        let auth = |v: &str| headers(&[(header::AUTHORIZATION, v)]);
        assert_eq!(access.check(&auth(&format!("Bearer {token}"))), Ok(()));
        assert_eq!(access.check(&auth(&format!("bearer  {token}"))), Ok(()));
        for bad in [
            "Bearer nope".to_owned(),
            format!("Basic {token}"),
            token.to_owned(),
        ] {
            assert_eq!(
                access.check(&auth(&bad)).unwrap_err().status,
                StatusCode::UNAUTHORIZED,
                "{bad}"
            );
        }
        assert_eq!(
            access.check(&HeaderMap::new()).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn without_a_token_writes_are_for_this_machine_only() {
        let listen = |addr: &str| HttpConfig {
            listen: addr.parse().unwrap(),
            ..HttpConfig::default()
        };
        assert!(matches!(
            WriteAccess::from_config(&listen("127.0.0.1:9100")).unwrap(),
            WriteAccess::Open
        ));
        let refused = WriteAccess::from_config(&listen("0.0.0.0:9100")).unwrap();
        assert!(!refused.allowed());
        let denied = refused
            .check(&headers(&[(header::HOST, "127.0.0.1:9100")]))
            .unwrap_err();
        assert_eq!(denied.status, StatusCode::FORBIDDEN);
        assert!(denied.message.contains("http.token_file"));

        let open = WriteAccess::Open;
        for host in [
            "127.0.0.1:9100",
            "localhost:9100",
            "[::1]:9100",
            "127.0.0.1",
        ] {
            assert_eq!(
                open.check(&headers(&[(header::HOST, host)])),
                Ok(()),
                "{host}"
            );
        }
        assert_eq!(
            open.check(&headers(&[
                (header::HOST, "127.0.0.1:9100"),
                (header::ORIGIN, "http://127.0.0.1:9100")
            ])),
            Ok(())
        );
        for bad in [
            headers(&[(header::HOST, "evil.example:9100")]),
            headers(&[]),
            headers(&[
                (header::HOST, "127.0.0.1:9100"),
                (header::ORIGIN, "http://evil.example"),
            ]),
            headers(&[(header::HOST, "127.0.0.1:9100"), (header::ORIGIN, "null")]),
        ] {
            assert_eq!(
                open.check(&bad).unwrap_err().status,
                StatusCode::FORBIDDEN,
                "{bad:?}"
            );
        }
    }
}
