//! Per-device credentials: a file of salted, slow-hashed passwords, one account a line, in
//! mosquitto's password-file format (`name:$7$<iterations>$<salt base64>$<hash base64>`,
//! PBKDF2-HMAC-SHA512), so that the one file serves the embedded broker and, in external mode, a
//! hospital's mosquitto (`password_file`). [`Credentials`] checks passwords; [`add`] and
//! [`remove`] edit the file for `iomt-edge credentials`, rewriting it atomically.
//!
//! Hand-written: mosquitto's format is a single line layout, and no crate reads it; the
//! hashing itself is ring's.

use std::collections::HashMap;
use std::io::Write;
use std::num::NonZeroU32;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::pbkdf2;
use ring::rand::{SecureRandom, SystemRandom};

/// PBKDF2-HMAC-SHA512 iterations for new entries: OWASP's figure for that hash (Password
/// Storage Cheat Sheet). Files may hold fewer (mosquitto_passwd's own default is 101): they
/// verify, and `credentials list` says which are below this.
pub const DEFAULT_ITERATIONS: u32 = 210_000;
/// Salt bytes, as mosquitto_passwd makes them.
const SALT_LEN: usize = 12;
/// SHA-512's output: the derived hash is that long.
const HASH_LEN: usize = 64;
/// The longest account name: names become identities matched against topic levels.
pub const MAX_NAME_LEN: usize = 128;
/// Random bytes of a generated password: 24 of them make 32 base64 characters.
const GENERATED_BYTES: usize = 24;
static ALGORITHM: pbkdf2::Algorithm = pbkdf2::PBKDF2_HMAC_SHA512;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: mode {mode:04o} lets other users read or change it: it must be 0600 or stricter (chmod 600 {file})")]
    TooOpen { file: String, mode: u32 },
    #[error("{file}: not a regular file")]
    NotAFile { file: String },
    /// Never carries the line's text: it holds a hash.
    #[error("{file}:{line}: {message}")]
    Malformed {
        file: String,
        line: usize,
        message: String,
    },
    #[error("{file}:{line}: `{name}` is already on line {first}")]
    Duplicate {
        file: String,
        line: usize,
        name: String,
        first: usize,
    },
    #[error("`{name}`: {message}")]
    BadName { name: String, message: String },
    #[error("{file}: no account `{name}`")]
    UnknownName { file: String, name: String },
    #[error("the password is empty")]
    EmptyPassword,
    #[error("{file}: cannot write it: {source}")]
    Write {
        file: String,
        source: std::io::Error,
    },
}

/// One account's stored hash.
#[derive(Clone)]
struct Entry {
    iterations: NonZeroU32,
    salt: Vec<u8>,
    hash: Vec<u8>,
}

/// The accounts of a credentials file, loaded and checked.
pub struct Credentials {
    entries: HashMap<String, Entry>,
    /// In the file's order, for `names`.
    order: Vec<String>,
    /// What an unknown name is checked against, so that it costs what a known one does.
    dummy: Entry,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: the hashes stay out of every log.
        f.debug_struct("Credentials")
            .field("names", &self.order)
            .finish()
    }
}

impl Credentials {
    /// Refuses a file readable or writable by group/others (mode must be 0600 or stricter),
    /// a malformed line (names the line number), a duplicate name.
    pub fn load(path: &Path) -> Result<Credentials, CredentialsError> {
        let text = read_private(path)?;
        Credentials::parse(&text, &path.display().to_string())
    }

    /// Reads the text of a credentials file (`file` names it in errors).
    pub fn parse(text: &str, file: &str) -> Result<Credentials, CredentialsError> {
        let mut entries = HashMap::new();
        let mut order = Vec::new();
        let mut first_line = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            let number = number + 1;
            let Some((name, entry)) =
                parse_line(line).map_err(|message| CredentialsError::Malformed {
                    file: file.to_owned(),
                    line: number,
                    message,
                })?
            else {
                continue;
            };
            if let Some(&first) = first_line.get(name) {
                return Err(CredentialsError::Duplicate {
                    file: file.to_owned(),
                    line: number,
                    name: name.to_owned(),
                    first,
                });
            }
            first_line.insert(name, number);
            order.push(name.to_owned());
            entries.insert(name.to_owned(), entry);
        }
        let dummy = dummy_entry(entries.values());
        Ok(Credentials {
            entries,
            order,
            dummy,
        })
    }

    /// Slow (PBKDF2) and constant-time; an unknown name costs the same as a known one (a
    /// dummy hash), so timing does not tell which names exist. Blocking: callers run it on
    /// a blocking thread.
    pub fn verify(&self, name: &str, password: &[u8]) -> bool {
        let (entry, known) = match self.entries.get(name) {
            Some(e) => (e, true),
            None => (&self.dummy, false),
        };
        // ring compares in constant time.
        let matches = pbkdf2::verify(
            ALGORITHM,
            entry.iterations,
            &entry.salt,
            password,
            &entry.hash,
        )
        .is_ok();
        known && matches
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The account names, in the file's order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(String::as_str)
    }

    /// The stored hash of `name`'s entry: what a password verified against it was verified
    /// against. A new password (or a removed account) changes or ends it.
    pub fn stored_hash(&self, name: &str) -> Option<&[u8]> {
        self.entries.get(name).map(|e| e.hash.as_slice())
    }

    /// An account's PBKDF2 iteration count (for `credentials list`).
    pub fn iterations(&self, name: &str) -> Option<u32> {
        self.entries.get(name).map(|e| e.iterations.get())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The dummy hash for unknown names, at the iteration count most of the file's entries have
/// (so that it costs what a typical known name costs), or the default for an empty file.
fn dummy_entry<'a>(entries: impl Iterator<Item = &'a Entry>) -> Entry {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for e in entries {
        *counts.entry(e.iterations.get()).or_default() += 1;
    }
    let iterations = counts
        .into_iter()
        .max_by_key(|&(iterations, n)| (n, iterations))
        .map_or(DEFAULT_ITERATIONS, |(iterations, _)| iterations);
    let salt = vec![0u8; SALT_LEN];
    let mut hash = vec![0u8; HASH_LEN];
    let iterations = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
    // Derived from nothing anyone knows the password of: no password matches it but by chance.
    pbkdf2::derive(ALGORITHM, iterations, &salt, b"\0no account\0", &mut hash);
    Entry {
        iterations,
        salt,
        hash,
    }
}

/// One line: `Ok(None)` for a blank line or a `#` comment (mosquitto skips both). Errors never
/// quote the line: it holds a hash.
fn parse_line(line: &str) -> Result<Option<(&str, Entry)>, String> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.trim().is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let (name, hashed) = line
        .split_once(':')
        .ok_or("expected `name:$7$iterations$salt$hash`")?;
    check_name(name).map_err(|m| format!("the account name {m}"))?;
    let fields: Vec<&str> = hashed.split('$').collect();
    match fields.as_slice() {
        ["", "7", iterations, salt, hash] => {
            let iterations = iterations
                .parse::<u32>()
                .ok()
                .and_then(NonZeroU32::new)
                .ok_or_else(|| format!("`{name}`: the iteration count is not a number from 1"))?;
            let salt = B64
                .decode(salt)
                .map_err(|e| format!("`{name}`: the salt is not base64 ({e})"))?;
            if salt.is_empty() {
                return Err(format!("`{name}`: the salt is empty"));
            }
            let hash = B64
                .decode(hash)
                .map_err(|e| format!("`{name}`: the hash is not base64 ({e})"))?;
            if hash.len() != HASH_LEN {
                return Err(format!(
                    "`{name}`: the hash is {} bytes, not {HASH_LEN}",
                    hash.len()
                ));
            }
            Ok(Some((
                name,
                Entry {
                    iterations,
                    salt,
                    hash,
                },
            )))
        }
        ["", "6", ..] => Err(format!(
            "`{name}`: a `$6$` entry (mosquitto 1.6's single SHA-512 round) is too weak to keep: add the account again with `iomt-edge credentials add`"
        )),
        _ => Err(format!(
            "`{name}`: expected `$7$iterations$salt$hash` (PBKDF2-HMAC-SHA512, as mosquitto_passwd writes it)"
        )),
    }
}

/// An account name: 1–128 bytes of printable ASCII without `:`, `/`, `+`, `#` or whitespace,
/// since names become identities matched against topic levels and reading sources. The error
/// completes "the account name …".
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "is {} bytes long, more than {MAX_NAME_LEN}",
            name.len()
        ));
    }
    // A name stands in topics (`{identity}`): one starting with `$` would make a filter of
    // `$share/…` or `$SYS/…`.
    if name.starts_with('$') {
        return Err("starts with `$`, which topics keep for the broker".into());
    }
    if let Some(c) = name
        .chars()
        .find(|&c| !c.is_ascii_graphic() || matches!(c, ':' | '/' | '+' | '#'))
    {
        return Err(format!(
            "holds {c:?}: only printable ASCII without `:`, `/`, `+`, `#` or whitespace"
        ));
    }
    Ok(())
}

/// A new entry's line for `name`, hashing `password` with a fresh salt.
fn entry_line(name: &str, password: &[u8], iterations: NonZeroU32) -> String {
    let mut salt = [0u8; SALT_LEN];
    SystemRandom::new()
        .fill(&mut salt)
        .expect("the operating system's random number generator");
    let mut hash = [0u8; HASH_LEN];
    pbkdf2::derive(ALGORITHM, iterations, &salt, password, &mut hash);
    format!(
        "{name}:$7${iterations}${}${}",
        B64.encode(salt),
        B64.encode(hash)
    )
}

/// What [`add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    New,
    /// The name had an entry: its password was replaced (a rotation).
    Replaced,
}

/// Adds `name` with `password` to the file at `path` (created if missing), or replaces its
/// entry. The file is checked first (mode, every line), so bad input leaves it unchanged.
pub fn add(
    path: &Path,
    name: &str,
    password: &[u8],
    iterations: NonZeroU32,
) -> Result<Added, CredentialsError> {
    check_name(name).map_err(|message| CredentialsError::BadName {
        name: name.to_owned(),
        message: format!("the account name {message}"),
    })?;
    if password.is_empty() {
        return Err(CredentialsError::EmptyPassword);
    }
    let text = match read_private(path) {
        Ok(t) => t,
        Err(CredentialsError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            String::new()
        }
        Err(e) => return Err(e),
    };
    let file = path.display().to_string();
    Credentials::parse(&text, &file)?;
    let new_line = entry_line(name, password, iterations);
    let mut out = String::with_capacity(text.len() + new_line.len() + 1);
    let mut added = Added::New;
    for line in text.lines() {
        if entry_name(line) == Some(name) {
            out.push_str(&new_line);
            added = Added::Replaced;
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    if added == Added::New {
        out.push_str(&new_line);
        out.push('\n');
    }
    write_atomically(path, out.as_bytes())?;
    Ok(added)
}

/// Removes `name`'s entry from the file at `path`; an unknown name is an error and leaves the
/// file unchanged.
pub fn remove(path: &Path, name: &str) -> Result<(), CredentialsError> {
    let text = read_private(path)?;
    let file = path.display().to_string();
    if !Credentials::parse(&text, &file)?.contains(name) {
        return Err(CredentialsError::UnknownName {
            file,
            name: name.to_owned(),
        });
    }
    let out: String = text
        .lines()
        .filter(|l| entry_name(l) != Some(name))
        .flat_map(|l| [l, "\n"])
        .collect();
    write_atomically(path, out.as_bytes())
}

/// The account name of an entry line (none for blank lines and comments).
fn entry_name(line: &str) -> Option<&str> {
    if line.starts_with('#') {
        return None;
    }
    line.split_once(':').map(|(n, _)| n)
}

/// A random password of 32 characters (24 bytes from the operating system's generator, base64
/// without padding and with `-` and `_`, so it survives a shell and a config file unquoted).
pub fn generate_password() -> String {
    let mut bytes = [0u8; GENERATED_BYTES];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the operating system's random number generator");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Reads a file that must be private to its owner (a credentials or password file): refuses it
/// when group or others may read or write it.
fn read_private(path: &Path) -> Result<String, CredentialsError> {
    let file = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| CredentialsError::Read {
        file: file.clone(),
        source,
    })?;
    if !meta.is_file() {
        return Err(CredentialsError::NotAFile { file });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CredentialsError::TooOpen { file, mode });
    }
    std::fs::read_to_string(path).map_err(|source| CredentialsError::Read { file, source })
}

/// Reads a password file (mode 0600 or stricter): its text without one trailing line break,
/// so that a file written by `echo` holds the password typed. An empty password is an error.
pub fn read_password_file(path: &Path) -> Result<String, CredentialsError> {
    let text = read_private(path)?;
    let password = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if password.is_empty() {
        return Err(CredentialsError::EmptyPassword);
    }
    Ok(password.to_owned())
}

/// Replaces the file at `path` with `bytes`: a temporary file in the same directory, mode 0600
/// from its creation, written and synced, renamed over it, and the directory synced, so that a
/// crash leaves the old file or the new one, never a mix, and the hashes are never readable by
/// others, even for a moment.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CredentialsError> {
    let file = path.display().to_string();
    let failed = |source| CredentialsError::Write {
        file: file.clone(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| failed(std::io::Error::other("the path names no file")))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // The file keeps its owner: root editing the service's file (a systemd state
        // directory owned by the service's user) must not leave it unreadable to the service.
        if let Ok(old) = std::fs::metadata(path) {
            use std::os::unix::fs::MetadataExt;
            let new = f.metadata()?;
            if (new.uid(), new.gid()) != (old.uid(), old.gid()) {
                std::os::unix::fs::fchown(&f, Some(old.uid()), Some(old.gid()))?;
            }
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iterations(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn an_entry_verifies_its_password_only() {
        let line = entry_line("bed-3", b"s3cret", iterations(1000));
        let c = Credentials::parse(&line, "f").unwrap();
        assert!(c.verify("bed-3", b"s3cret"));
        assert!(!c.verify("bed-3", b"s3cres"));
        assert!(!c.verify("bed-4", b"s3cret"));
        assert_eq!(c.iterations("bed-3"), Some(1000));
        assert_eq!(c.names().collect::<Vec<_>>(), ["bed-3"]);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn bad_lines_are_named_without_their_hash() {
        let good = entry_line("a", b"p", iterations(1));
        let hash = good.rsplit('$').next().unwrap().to_owned();
        for (text, want) in [
            (format!("{good}\nb\n"), "f:2: expected `name:"),
            (
                format!("# c\n\n{good}\n{good}\n"),
                "f:4: `a` is already on line 3",
            ),
            (
                good.replace("$7$1$", "$7$0$"),
                "f:1: `a`: the iteration count",
            ),
            (good.replace("$7$", "$8$"), "f:1: `a`: expected `$7$"),
            ("a:$6$abc$def\n".into(), "f:1: `a`: a `$6$` entry"),
            (
                good.replace("a:", "a b:"),
                "f:1: the account name holds ' '",
            ),
            (
                format!("{}==", &good[..good.len() - 4]),
                "f:1: `a`: the hash",
            ),
        ] {
            let e = Credentials::parse(&text, "f").unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
            assert!(!e.contains(&hash[..20]), "{e}");
        }
    }

    #[test]
    fn names_that_could_pose_as_topic_levels_are_refused() {
        for name in [
            "",
            "a/b",
            "a+",
            "#",
            "$share",
            "a:b",
            "a b",
            "a\tb",
            "é",
            "x".repeat(129).as_str(),
        ] {
            assert!(check_name(name).is_err(), "{name:?}");
        }
        for name in ["ward7-bed3-monitor", "A.b_c~!", "x".repeat(128).as_str()] {
            assert!(check_name(name).is_ok(), "{name:?}");
        }
    }

    #[test]
    fn generated_passwords_are_long_and_differ() {
        let (a, b) = (generate_password(), generate_password());
        assert!(a.len() >= 24 && a != b);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }

    #[test]
    fn a_rewritten_file_keeps_its_owner() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("credentials");
        add(&file, "a", b"pw", iterations(1000)).unwrap();
        // The service's user owns it (run as root, as CI does; elsewhere the owner is the
        // caller and stays so, which the asserts below check too).
        let owner = match std::os::unix::fs::chown(&file, Some(10001), Some(10001)) {
            Ok(()) => 10001,
            Err(_) => std::fs::metadata(&file).unwrap().uid(),
        };
        add(&file, "b", b"pw", iterations(1000)).unwrap();
        remove(&file, "a").unwrap();
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (owner, 0o600));
        assert_eq!(Credentials::load(&file).unwrap().names().count(), 1);
    }
}
