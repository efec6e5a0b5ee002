//! The node's key files: created on first start with mode 0600 in a 0700 directory, refused when
//! anyone but the owner can read them. Their contents are never logged.

use std::fs::{self, OpenOptions};
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

impl NodeKeys {
    /// Loads the keys in `dir`, creating any that do not exist yet.
    pub fn load_or_create(dir: &Path, node_name: &str) -> Result<Self, KeyError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| KeyError::Io { path, source }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        let rng = SystemRandom::new();

        let master_path = dir.join(MASTER_KEY_FILE);
        let master = read_or_create(&master_path, || {
            let mut k = [0u8; KEY_LEN];
            rng.fill(&mut k).map_err(|_| KeyError::Random)?;
            Ok(k.to_vec())
        })?;
        let master = MasterKey::from_bytes(&master).map_err(|e| KeyError::Invalid {
            path: master_path.clone(),
            reason: e.to_string(),
        })?;

        let node_path = dir.join(NODE_KEY_FILE);
        let node = read_or_create(&node_path, || {
            let mut seed = [0u8; 32];
            rng.fill(&mut seed).map_err(|_| KeyError::Random)?;
            let signer =
                NoteSigner::from_seed(node_name, &seed).map_err(|e| KeyError::Invalid {
                    path: node_path.clone(),
                    reason: e.to_string(),
                })?;
            Ok(format!("{}\n", signer.private_key(&seed)).into_bytes())
        })?;
        let invalid = |reason: String| KeyError::Invalid {
            path: node_path.clone(),
            reason,
        };
        let node = String::from_utf8(node).map_err(|_| invalid("not UTF-8".into()))?;
        let signer = NoteSigner::from_private_key(&node).map_err(|e| invalid(e.to_string()))?;
        Ok(NodeKeys { master, signer })
    }
}

fn read_or_create(
    path: &Path,
    make: impl FnOnce() -> Result<Vec<u8>, KeyError>,
) -> Result<Vec<u8>, KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    match fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyError::Permissions {
                    path: path.to_owned(),
                    mode,
                });
            }
            fs::read(path).map_err(io)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes = make()?;
            // create_new: two nodes started on one data dir must not overwrite each other's key.
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok(bytes)
        }
        Err(e) => Err(io(e)),
    }
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
    fn refuses_keys_others_can_read() {
        let dir = tempfile::tempdir().unwrap();
        NodeKeys::load_or_create(dir.path(), "n").unwrap();
        let path = dir.path().join(MASTER_KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = NodeKeys::load_or_create(dir.path(), "n").unwrap_err();
        assert!(matches!(err, KeyError::Permissions { .. }), "{err}");
    }
}
