//! C2SP signed notes and tlog checkpoints, signed with the node's Ed25519 key.
//!
//! Hand-written because no well-kept Rust crate implements C2SP notes on ring. Key strings use
//! the Go `golang.org/x/mod/sumdb/note` formats, so Go tooling can read and verify them:
//! private `PRIVATE+KEY+<name>+<key id>+base64(0x01 ‖ seed)`, verifier
//! `<name>+<key id>+base64(0x01 ‖ public key)`, key id = SHA-256(name ‖ 0x0A ‖ 0x01 ‖ public
//! key)[..4].

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::digest::{digest, SHA256};
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

const ALG_ED25519: u8 = 0x01;
const SIG_PREFIX: &str = "\u{2014} ";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NoteError {
    #[error("malformed key string: {0}")]
    Key(&'static str),
    #[error("malformed note: {0}")]
    Malformed(&'static str),
    #[error("no valid signature by {0}")]
    Unverified(String),
    #[error("malformed checkpoint: {0}")]
    Checkpoint(&'static str),
}

fn key_id(name: &str, public: &[u8]) -> [u8; 4] {
    let mut buf = Vec::with_capacity(name.len() + 2 + public.len());
    buf.extend_from_slice(name.as_bytes());
    buf.push(b'\n');
    buf.push(ALG_ED25519);
    buf.extend_from_slice(public);
    let h = digest(&SHA256, &buf);
    h.as_ref()[..4].try_into().expect("4 bytes")
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['+', ' ', '\n']) && name.chars().all(|c| !c.is_control())
}

/// The node's signing key. Never printed, never logged.
pub struct NoteSigner {
    name: String,
    id: [u8; 4],
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoteSigner")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl NoteSigner {
    pub fn from_seed(name: &str, seed: &[u8]) -> Result<Self, NoteError> {
        if !valid_name(name) {
            return Err(NoteError::Key("key name"));
        }
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| NoteError::Key("seed"))?;
        let id = key_id(name, pair.public_key().as_ref());
        Ok(NoteSigner {
            name: name.to_owned(),
            id,
            pair,
        })
    }

    /// Parses `PRIVATE+KEY+<name>+<id>+<base64>`.
    pub fn from_private_key(s: &str) -> Result<Self, NoteError> {
        let rest = s
            .trim()
            .strip_prefix("PRIVATE+KEY+")
            .ok_or(NoteError::Key("missing PRIVATE+KEY+ prefix"))?;
        let mut parts = rest.splitn(3, '+');
        let (Some(name), Some(id_hex), Some(key)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(NoteError::Key("expected name+id+key"));
        };
        let key = B64.decode(key).map_err(|_| NoteError::Key("base64"))?;
        if key.len() != 33 || key[0] != ALG_ED25519 {
            return Err(NoteError::Key("not an Ed25519 key"));
        }
        let signer = Self::from_seed(name, &key[1..])?;
        if id_hex != hex8(&signer.id) {
            return Err(NoteError::Key("key id does not match the key"));
        }
        Ok(signer)
    }

    pub fn private_key(&self, seed: &[u8]) -> String {
        let mut k = vec![ALG_ED25519];
        k.extend_from_slice(seed);
        format!(
            "PRIVATE+KEY+{}+{}+{}",
            self.name,
            hex8(&self.id),
            B64.encode(k)
        )
    }

    pub fn verifier_key(&self) -> String {
        let mut k = vec![ALG_ED25519];
        k.extend_from_slice(self.pair.public_key().as_ref());
        format!("{}+{}+{}", self.name, hex8(&self.id), B64.encode(k))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Signs `text` (which must end in a newline) into a signed note.
    pub fn sign(&self, text: &str) -> Result<String, NoteError> {
        if !text.ends_with('\n') {
            return Err(NoteError::Malformed("text must end with a newline"));
        }
        let sig = self.pair.sign(text.as_bytes());
        let mut blob = self.id.to_vec();
        blob.extend_from_slice(sig.as_ref());
        Ok(format!(
            "{text}\n{SIG_PREFIX}{} {}\n",
            self.name,
            B64.encode(blob)
        ))
    }
}

fn hex8(id: &[u8; 4]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// A verifier key: checks notes signed by one named key.
#[derive(Debug, Clone)]
pub struct NoteVerifier {
    name: String,
    id: [u8; 4],
    public: Vec<u8>,
}

impl NoteVerifier {
    pub fn parse(s: &str) -> Result<Self, NoteError> {
        let mut parts = s.trim().splitn(3, '+');
        let (Some(name), Some(id_hex), Some(key)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(NoteError::Key("expected name+id+key"));
        };
        let key = B64.decode(key).map_err(|_| NoteError::Key("base64"))?;
        if key.len() != 33 || key[0] != ALG_ED25519 || !valid_name(name) {
            return Err(NoteError::Key("not an Ed25519 verifier key"));
        }
        let public = key[1..].to_vec();
        let id = key_id(name, &public);
        if id_hex != hex8(&id) {
            return Err(NoteError::Key("key id does not match the key"));
        }
        Ok(NoteVerifier {
            name: name.to_owned(),
            id,
            public,
        })
    }

    /// Checks a signed note and returns its text.
    pub fn verify<'a>(&self, note: &'a str) -> Result<&'a str, NoteError> {
        let split = note
            .rfind("\n\n")
            .ok_or(NoteError::Malformed("no blank line before the signatures"))?;
        let (text, sigs) = (&note[..split + 1], &note[split + 2..]);
        if !note.ends_with('\n') {
            return Err(NoteError::Malformed("signatures must end with a newline"));
        }
        for line in sigs.lines() {
            let rest = line
                .strip_prefix(SIG_PREFIX)
                .ok_or(NoteError::Malformed("signature line without the em dash"))?;
            let (name, blob) = rest
                .split_once(' ')
                .ok_or(NoteError::Malformed("signature line without a key name"))?;
            let blob = B64
                .decode(blob)
                .map_err(|_| NoteError::Malformed("signature base64"))?;
            if name != self.name || blob.len() < 4 || blob[..4] != self.id {
                continue;
            }
            if UnparsedPublicKey::new(&ED25519, &self.public)
                .verify(text.as_bytes(), &blob[4..])
                .is_ok()
            {
                return Ok(text);
            }
        }
        Err(NoteError::Unverified(self.name.clone()))
    }
}

/// A tlog checkpoint: origin, tree size and root of the node's log of batch roots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: [u8; 32],
}

impl Checkpoint {
    pub fn to_text(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        )
    }

    pub fn parse(text: &str) -> Result<Self, NoteError> {
        let mut lines = text.lines();
        let origin = lines
            .next()
            .filter(|o| !o.is_empty())
            .ok_or(NoteError::Checkpoint("origin"))?;
        let size = lines
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or(NoteError::Checkpoint("tree size"))?;
        let root = lines
            .next()
            .and_then(|r| B64.decode(r).ok())
            .and_then(|r| <[u8; 32]>::try_from(r).ok())
            .ok_or(NoteError::Checkpoint("root hash"))?;
        Ok(Checkpoint {
            origin: origin.to_owned(),
            size,
            root,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vector() -> Value {
        serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/signed-note.json"
        )))
        .unwrap()
    }

    #[test]
    fn signs_exactly_like_the_c2sp_example() {
        let v = &vector()["example"];
        let signer = NoteSigner::from_private_key(v["private_key"].as_str().unwrap()).unwrap();
        assert_eq!(signer.verifier_key(), v["verifier_key"].as_str().unwrap());
        let text = v["text"].as_str().unwrap();
        let note = signer.sign(text).unwrap();
        // Ed25519 is deterministic, so the signature line is the vector's exactly.
        assert_eq!(
            note,
            format!("{text}\n{}\n", v["signature_line"].as_str().unwrap())
        );
        let verifier = NoteVerifier::parse(v["verifier_key"].as_str().unwrap()).unwrap();
        assert_eq!(verifier.verify(&note).unwrap(), text);
    }

    #[test]
    fn altered_notes_fail() {
        let v = &vector()["example"];
        let signer = NoteSigner::from_private_key(v["private_key"].as_str().unwrap()).unwrap();
        let verifier = NoteVerifier::parse(v["verifier_key"].as_str().unwrap()).unwrap();
        let note = signer.sign("origin\n5\nAAAA\n").unwrap();
        assert!(verifier.verify(&note.replace('5', "6")).is_err());
        assert!(verifier.verify("origin\n5\n").is_err());
        let other = NoteSigner::from_seed("PeterNeumann", &[9u8; 32]).unwrap();
        assert!(verifier
            .verify(&other.sign("origin\n5\nAAAA\n").unwrap())
            .is_err());
        assert!(NoteVerifier::parse(
            "PeterNeumann+00000000+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
        )
        .is_err());
    }

    #[test]
    fn checkpoint_text_round_trips() {
        let c = Checkpoint {
            origin: "iomt-edge/ward-7".into(),
            size: 42,
            root: [3u8; 32],
        };
        assert_eq!(Checkpoint::parse(&c.to_text()).unwrap(), c);
        assert!(Checkpoint::parse("o\nx\n").is_err());
    }
}
