//! The node's key files: created on first start with mode 0600 in a 0700 directory, refused when
//! anyone but the owner can read them. Their contents are never logged.
//!
//! [`NodeKeys::load`] only reads: commands that inspect a data directory, and a node whose store
//! already holds sealed batches, must never replace a lost key with a new one (the store's
//! `open_node_keys` decides which applies). [`NodeKeys::load_or_create`] is for a fresh node.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};

use super::checkpoint::NoteSigner;
use super::crypt::{MasterKey, KEY_LEN};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no such key file")]
    Missing { path: PathBuf },
    #[error("{path}: readable by others (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path}: not a valid key file: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("the system random number generator failed")]
    Random,
}

pub const MASTER_KEY_FILE: &str = "master.key";
pub const NODE_KEY_FILE: &str = "node.key";

/// The keys a node needs.
#[derive(Debug)]
pub struct NodeKeys {
    pub master: MasterKey,
    pub signer: NoteSigner,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

impl NodeKeys {
    /// Loads the keys in `dir`; a missing file is [`KeyError::Missing`]. Creates nothing.
    pub fn load(dir: &Path) -> Result<Self, KeyError> {
        let master_path = dir.join(MASTER_KEY_FILE);
        let node_path = dir.join(NODE_KEY_FILE);
        let master = read_key(&master_path)?.ok_or(KeyError::Missing { path: master_path })?;
        let node = read_key(&node_path)?.ok_or(KeyError::Missing { path: node_path })?;
        Self::parse(dir, &master, node)
    }

    /// Loads the keys in `dir`, creating any that do not exist yet.
    pub fn load_or_create(dir: &Path, node_name: &str) -> Result<Self, KeyError> {
        let dir_existed = dir.is_dir();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        let rng = SystemRandom::new();
        let mut created = false;

        let master_path = dir.join(MASTER_KEY_FILE);
        let master = match read_key(&master_path)? {
            Some(bytes) => bytes,
            None => {
                let mut k = [0u8; KEY_LEN];
                rng.fill(&mut k).map_err(|_| KeyError::Random)?;
                create_key(&master_path, &k)?;
                created = true;
                k.to_vec()
            }
        };

        let node_path = dir.join(NODE_KEY_FILE);
        let node = match read_key(&node_path)? {
            Some(bytes) => bytes,
            None => {
                let mut seed = [0u8; 32];
                rng.fill(&mut seed).map_err(|_| KeyError::Random)?;
                let signer =
                    NoteSigner::from_seed(node_name, &seed).map_err(|e| KeyError::Invalid {
                        path: node_path.clone(),
                        reason: e.to_string(),
                    })?;
                let text = format!("{}\n", signer.private_key(&seed)).into_bytes();
                create_key(&node_path, &text)?;
                created = true;
                text
            }
        };
        // A file's own fsync does not make its name durable: without the directory's, a crash
        // just after the first start could lose the key that sealed the first batches.
        if created {
            sync_dir(dir)?;
        }
        if !dir_existed {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        Self::parse(dir, &master, node)
    }

    fn parse(dir: &Path, master: &[u8], node: Vec<u8>) -> Result<Self, KeyError> {
        let master = MasterKey::from_bytes(master).map_err(|e| KeyError::Invalid {
            path: dir.join(MASTER_KEY_FILE),
            reason: e.to_string(),
        })?;
        let invalid = |reason: String| KeyError::Invalid {
            path: dir.join(NODE_KEY_FILE),
            reason,
        };
        let node = String::from_utf8(node).map_err(|_| invalid("not UTF-8".into()))?;
        let signer = NoteSigner::from_private_key(&node).map_err(|e| invalid(e.to_string()))?;
        Ok(NodeKeys { master, signer })
    }
}

/// The key file's bytes, `None` if there is no such file. Shared with the ledger's Ethereum key
/// (src/ledger/ethereum.rs), which follows the same rules.
pub(crate) fn read_key(path: &Path) -> Result<Option<Vec<u8>>, KeyError> {
    match fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyError::Permissions {
                    path: path.to_owned(),
                    mode,
                });
            }
            fs::read(path).map(Some).map_err(io(path))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

pub(crate) fn create_key(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    // create_new: two nodes started on one data dir must not overwrite each other's key.
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), KeyError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_owner_only_keys_and_reloads_them() {
        let dir = tempfile::tempdir().unwrap();
        let keys_dir = dir.path().join("keys");
        let a = NodeKeys::load_or_create(&keys_dir, "iomt-edge/test").unwrap();
        for f in [MASTER_KEY_FILE, NODE_KEY_FILE] {
            let mode = fs::metadata(keys_dir.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        let b = NodeKeys::load_or_create(&keys_dir, "iomt-edge/test").unwrap();
        assert_eq!(a.signer.verifier_key(), b.signer.verifier_key());
        let env = a.master.seal(b"x".to_vec(), b"").unwrap();
        assert_eq!(b.master.open(&env, b"").unwrap(), b"x");
    }

    #[test]
    fn load_only_reads() {
        let dir = tempfile::tempdir().unwrap();
        let keys_dir = dir.path().join("keys");
        let err = NodeKeys::load(&keys_dir).unwrap_err();
        assert!(
            matches!(&err, KeyError::Missing { path } if *path == keys_dir.join(MASTER_KEY_FILE)),
            "{err}"
        );
        assert!(!keys_dir.exists(), "load created the directory");

        let created = NodeKeys::load_or_create(&keys_dir, "n").unwrap();
        let loaded = NodeKeys::load(&keys_dir).unwrap();
        assert_eq!(created.master.check_value(), loaded.master.check_value());
        assert_eq!(created.signer.verifier_key(), loaded.signer.verifier_key());

        fs::remove_file(keys_dir.join(NODE_KEY_FILE)).unwrap();
        let err = NodeKeys::load(&keys_dir).unwrap_err();
        assert!(
            matches!(&err, KeyError::Missing { path } if *path == keys_dir.join(NODE_KEY_FILE)),
            "{err}"
        );
        assert!(!keys_dir.join(NODE_KEY_FILE).exists());
    }

    #[test]
    fn refuses_keys_others_can_read() {
        let dir = tempfile::tempdir().unwrap();
        NodeKeys::load_or_create(dir.path(), "n").unwrap();
        let path = dir.path().join(MASTER_KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = NodeKeys::load_or_create(dir.path(), "n").unwrap_err();
        assert!(matches!(err, KeyError::Permissions { .. }), "{err}");
    }
}
