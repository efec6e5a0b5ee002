//! Who a client of the embedded broker is, and what its account may do.
//!
//! A client is an account when its TLS client certificate (verified against
//! `broker.tls.client_ca`) names it, or when its CONNECT's user name and password match the
//! credentials file; otherwise it is anonymous, which the pipeline file must allow. An account
//! is a device (it publishes only as itself, and subscribes only to `device_subscribe`) unless
//! `broker.auth.operators` names it.
//!
//! Passwords are checked with a slow hash on a blocking thread, two at a time at most, so that a
//! flood of guesses cannot take the runtime's threads. A password that was right once is
//! remembered as an HMAC under a key made at start: a ward's devices reconnecting after a
//! network blip do not each cost a slow hash again. The credentials file is read again when it
//! changes (`iomt-edge credentials add` rewrites it atomically), so a password is rotated or an
//! account removed without a restart; connections already open stay open.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use ring::hmac;
use rumqttd::protocol::{ConnectReturnCode, Login};
use tracing::warn;

use crate::config::AuthConfig;
use crate::pipeline::input::Identity;
use crate::topic::TopicFilter;
use crate::transport::credentials::{Credentials, CredentialsError};

/// Passwords checked at once: the slow hash takes a core each.
const VERIFYING_AT_ONCE: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("the operating system gave no random bytes")]
    Random,
}

/// What a CONNECT is answered with.
#[derive(Debug)]
pub enum Verdict {
    /// Allowed without an account (`broker.auth.allow_anonymous`).
    Anonymous,
    Account(Arc<Identity>),
    /// Refused with this return code; `reason` labels the metric.
    Refused {
        code: ConnectReturnCode,
        reason: &'static str,
    },
}

/// The credentials file as last read, and how to tell it changed.
struct Loaded {
    credentials: Arc<Credentials>,
    stamp: Option<(SystemTime, u64, u64)>,
}

/// The broker's authentication: shared by every connection.
pub struct Auth {
    credentials_file: Option<PathBuf>,
    loaded: Mutex<Option<Loaded>>,
    allow_anonymous: bool,
    operators: HashSet<String>,
    device_subscribe: Vec<String>,
    /// Whether any client can be an account: session ids are then kept apart per account.
    accounts: bool,
    verifying: Arc<tokio::sync::Semaphore>,
    /// Accounts whose password was verified, with an HMAC of that password.
    remembered: Mutex<HashMap<String, hmac::Tag>>,
    remember_key: hmac::Key,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("credentials_file", &self.credentials_file)
            .field("allow_anonymous", &self.allow_anonymous)
            .finish_non_exhaustive()
    }
}

/// What tells that the file changed: an atomic rewrite is a new inode even within the file
/// system's timestamp granularity.
fn stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

impl Auth {
    /// Reads the credentials file (an error at start: a missing or too-open file is not
    /// something to find out when the first device connects). `client_certs`: TLS client
    /// certificates are verified, so a client may be an account without a password.
    pub fn load(c: &AuthConfig, client_certs: bool) -> Result<Self, AuthError> {
        let loaded = match &c.credentials {
            Some(path) => Some(Loaded {
                stamp: stamp(path),
                credentials: Arc::new(Credentials::load(path)?),
            }),
            None => None,
        };
        let rng = ring::rand::SystemRandom::new();
        let remember_key =
            hmac::Key::generate(hmac::HMAC_SHA256, &rng).map_err(|_| AuthError::Random)?;
        Ok(Auth {
            credentials_file: c.credentials.clone(),
            loaded: Mutex::new(loaded),
            allow_anonymous: c.allow_anonymous,
            operators: c.operators.iter().cloned().collect(),
            device_subscribe: c.device_subscribe.clone(),
            accounts: c.credentials.is_some() || client_certs,
            verifying: Arc::new(tokio::sync::Semaphore::new(VERIFYING_AT_ONCE)),
            remembered: Mutex::new(HashMap::new()),
            remember_key,
        })
    }

    /// The credentials as they are on disk now: read again if the file changed. A file that
    /// no longer reads keeps the last good one in force (and says so), rather than locking
    /// every device out over one bad edit.
    fn credentials(&self) -> Option<Arc<Credentials>> {
        let path = self.credentials_file.as_ref()?;
        let now = stamp(path);
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        let current = loaded.as_mut()?;
        if now.is_some() && now != current.stamp {
            current.stamp = now;
            match Credentials::load(path) {
                Ok(c) => current.credentials = Arc::new(c),
                Err(e) => {
                    warn!(error = %e, "the credentials file changed and does not read: the last good one stays in force")
                }
            }
        }
        Some(current.credentials.clone())
    }

    fn identity(&self, name: String) -> Arc<Identity> {
        let operator = self.operators.contains(&name);
        Arc::new(Identity {
            name: name.into(),
            operator,
        })
    }

    /// Who the client is. `certificate`: the name a verified TLS client certificate gives.
    pub async fn check(
        self: &Arc<Self>,
        login: Option<Login>,
        certificate: Option<String>,
    ) -> Verdict {
        let refused = |code, reason| Verdict::Refused { code, reason };
        if let Some(name) = certificate {
            // Its name becomes a session id's prefix and a topic's owner: `:`, `/`, `+`, `#`
            // would let one certificate's name pass for another account's.
            if crate::transport::credentials::check_name(&name).is_err() {
                return refused(ConnectReturnCode::NotAuthorized, "certificate");
            }
            // A certificate is the stronger proof; a user name beside it must not claim
            // another account.
            if login.as_ref().is_some_and(|l| l.username != name) {
                return refused(ConnectReturnCode::BadUserNamePassword, "credentials");
            }
            return Verdict::Account(self.identity(name));
        }
        let Some(login) = login else {
            return match self.allow_anonymous {
                true => Verdict::Anonymous,
                false => refused(ConnectReturnCode::NotAuthorized, "anonymous"),
            };
        };
        // A password verified before is remembered as an HMAC of the name, the password and
        // the stored hash it matched: a new password or a removed account (a new file) makes
        // the remembered one worthless by itself, without forgetting everyone else's.
        let tag_input = |hash: &[u8]| {
            [
                login.username.as_bytes(),
                b"\0",
                login.password.as_bytes(),
                b"\0",
                hash,
            ]
            .concat()
        };
        let Some(credentials) = self.current_credentials().await else {
            return refused(ConnectReturnCode::NotAuthorized, "credentials");
        };
        if let Some(hash) = credentials.stored_hash(&login.username) {
            let remembered = self
                .remembered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&login.username)
                .is_some_and(|t| {
                    hmac::verify(&self.remember_key, &tag_input(hash), t.as_ref()).is_ok()
                });
            if remembered {
                return Verdict::Account(self.identity(login.username));
            }
        }
        let Ok(permit) = self.verifying.clone().acquire_owned().await else {
            return refused(ConnectReturnCode::ServiceUnavailable, "credentials");
        };
        // The permit goes with the hash into its thread: a login given up on (its CONNECT's
        // deadline passed) cannot free a slot while its hash still runs, so no more than
        // VERIFYING_AT_ONCE hashes ever run. The file is read as it is after the wait, and
        // again after the hash: a password changed meanwhile (or during it) is not let in.
        let this = self.clone();
        let name = login.username.clone();
        let password = login.password.clone();
        let verified = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let before = this.credentials()?;
            if !before.verify(&name, password.as_bytes()) {
                return None;
            }
            let after = this.credentials()?;
            let hash = before.stored_hash(&name)?;
            (after.stored_hash(&name) == Some(hash)).then(|| (after.len(), hash.to_vec()))
        })
        .await;
        match verified {
            Ok(Some((accounts, hash))) => {
                let tag = hmac::sign(&self.remember_key, &tag_input(&hash));
                let mut remembered = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
                // One entry an account that ever logged in, bounded by the file's accounts.
                if remembered.len() >= accounts.max(1) * 2 {
                    remembered.clear();
                }
                remembered.insert(login.username.clone(), tag);
                drop(remembered);
                Verdict::Account(self.identity(login.username))
            }
            _ => refused(ConnectReturnCode::BadUserNamePassword, "credentials"),
        }
    }

    /// `credentials()` off the async threads: reading the file again (when it changed) is
    /// disk I/O.
    async fn current_credentials(self: &Arc<Self>) -> Option<Arc<Credentials>> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.credentials())
            .await
            .ok()
            .flatten()
    }

    /// The session id the router knows a client by. Accounts' sessions are kept apart (an
    /// account cannot take over another's session by using its client id): `<account>:<id>`,
    /// since account names hold no `:`; anonymous clients' as `:<id>` when accounts exist.
    pub fn session_id(&self, who: Option<&Identity>, client_id: &str) -> String {
        match (who, self.accounts) {
            (Some(id), _) => format!("{}:{client_id}", id.name),
            (None, true) => format!(":{client_id}"),
            (None, false) => client_id.to_owned(),
        }
    }

    /// Whether `who` may subscribe to `filter`: operators and anonymous clients (where allowed)
    /// anywhere; a device only within one of `device_subscribe`, its name put in.
    pub fn may_subscribe(&self, who: Option<&Identity>, filter: &str) -> bool {
        let Some(id) = who else { return true };
        if id.operator {
            return true;
        }
        // A shared subscription's messages are those of the filter after its group.
        let filter = match filter.strip_prefix("$share/") {
            Some(rest) => match rest.split_once('/') {
                Some((_, f)) => f,
                None => return false,
            },
            None => filter,
        };
        self.device_subscribe.iter().any(|p| {
            let allowed = p.replace("{identity}", &id.name);
            TopicFilter::parse(&allowed).is_ok() && filter_within(filter, &allowed)
        })
    }
}

/// Whether every topic `filter` matches is matched by `allowed` too (so a subscription to
/// `filter` can deliver nothing outside `allowed`).
fn filter_within(filter: &str, allowed: &str) -> bool {
    let mut f = filter.split('/');
    let mut a = allowed.split('/');
    loop {
        match (f.next(), a.next()) {
            (_, Some("#")) => return true,
            (None, None) => return true,
            (Some("#"), _) | (None, Some(_)) | (Some(_), None) => return false,
            (Some(_), Some("+")) => {}
            (Some(x), Some(y)) => {
                if x != y || x == "+" {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::credentials;

    #[test]
    fn a_filter_is_within_another_only_if_it_can_match_nothing_more() {
        let yes = [
            ("ward/cmd/d1/sampling", "ward/cmd/d1/#"),
            ("ward/cmd/d1/#", "ward/cmd/d1/#"),
            ("ward/cmd/d1", "ward/cmd/d1/#"),
            ("ward/cmd/d1/+", "ward/cmd/d1/#"),
            ("ward/cmd/d1/x", "ward/+/d1/x"),
            ("ward/+/d1/x", "ward/+/d1/x"),
        ];
        for (f, a) in yes {
            assert!(filter_within(f, a), "{f} within {a}");
        }
        let no = [
            ("ward/cmd/#", "ward/cmd/d1/#"),
            ("ward/cmd/+/sampling", "ward/cmd/d1/#"),
            ("#", "ward/cmd/d1/#"),
            ("ward/cmd/d2/sampling", "ward/cmd/d1/#"),
            ("ward/cmd/d1/x/y", "ward/+/d1/x"),
            ("ward/cmd/d1", "ward/+/d1/x"),
            ("ward/+/d1/x", "ward/cmd/d1/x"),
        ];
        for (f, a) in no {
            assert!(!filter_within(f, a), "{f} not within {a}");
        }
    }

    fn device(name: &str) -> Identity {
        Identity {
            name: name.into(),
            operator: false,
        }
    }

    #[test]
    fn a_shared_subscription_is_judged_by_the_filter_after_its_group() {
        let c: AuthConfig = toml::from_str("device_subscribe = [\"+/{identity}/#\"]").unwrap();
        let auth = Auth::load(&c, false).unwrap();
        let d = device("d1");
        assert!(auth.may_subscribe(Some(&d), "cmd/d1/x"));
        assert!(auth.may_subscribe(Some(&d), "$share/g/cmd/d1/x"));
        // `$share/d1/#` reads like `+/{identity}/#` level by level, and is `#`.
        assert!(!auth.may_subscribe(Some(&d), "$share/d1/#"));
        assert!(!auth.may_subscribe(Some(&d), "$share/g"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_remembered_password_opens_nothing_once_it_is_changed_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("credentials");
        let n = std::num::NonZeroU32::new(1000).unwrap();
        credentials::add(&file, "d1", b"first", n).unwrap();
        let c = AuthConfig {
            credentials: Some(file.clone()),
            ..AuthConfig::default()
        };
        let auth = Arc::new(Auth::load(&c, false).unwrap());
        let login = |p: &str| {
            Some(Login {
                username: "d1".into(),
                password: p.into(),
            })
        };
        let ok = |v: &Verdict| matches!(v, Verdict::Account(id) if &*id.name == "d1");
        assert!(ok(&auth.check(login("first"), None).await));
        // Remembered now; still right.
        assert!(ok(&auth.check(login("first"), None).await));
        credentials::add(&file, "d1", b"second", n).unwrap();
        assert!(!ok(&auth.check(login("first"), None).await));
        assert!(ok(&auth.check(login("second"), None).await));
        credentials::add(&file, "d2", b"other", n).unwrap();
        // Another account's change leaves d1's remembered password good.
        assert!(ok(&auth.check(login("second"), None).await));
        credentials::remove(&file, "d1").unwrap();
        assert!(!ok(&auth.check(login("second"), None).await));
    }
}
