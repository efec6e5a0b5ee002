//! AES-256-GCM envelope encryption of batch bytes.
//!
//! Every batch gets a fresh random data key that encrypts it; the master key only ever encrypts
//! (wraps) data keys. Both nonces are random 96-bit values from the system RNG: a data key is used
//! exactly once, and the master key wraps one data key per batch, so at one batch a second it
//! would take centuries to approach the 2^32-messages bound NIST sets for random GCM nonces.
//! The associated data binds the ciphertext to the batch header, so a ciphertext moved under
//! another batch's header fails to open.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

pub const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// Length of a master key's check value.
pub const CHECK_LEN: usize = 16;
const CHECK_LABEL: &[u8] = b"iomt-edge master key check v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptError {
    #[error("the system random number generator failed")]
    Random,
    #[error("decryption failed: wrong key, or the ciphertext or its header was altered")]
    Open,
    #[error("the key has the wrong length")]
    KeyLength,
}

/// An encrypted payload with the data key that encrypted it, wrapped by the master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The data key encrypted under the master key, with its tag.
    pub wrapped_key: Vec<u8>,
    pub key_nonce: [u8; NONCE_LEN],
    pub nonce: [u8; NONCE_LEN],
    /// The payload encrypted under the data key, with its tag.
    pub ciphertext: Vec<u8>,
}

/// The master key: wraps and unwraps data keys. Never printed, never logged.
pub struct MasterKey {
    key: LessSafeKey,
    /// Kept from construction, as ring does not give the key bytes back.
    check: [u8; CHECK_LEN],
    rng: SystemRandom,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

fn aead_key(bytes: &[u8]) -> Result<LessSafeKey, CryptError> {
    UnboundKey::new(&AES_256_GCM, bytes)
        .map(LessSafeKey::new)
        .map_err(|_| CryptError::KeyLength)
}

impl MasterKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptError> {
        let key = aead_key(bytes)?;
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, bytes), CHECK_LABEL);
        let mut check = [0u8; CHECK_LEN];
        check.copy_from_slice(&tag.as_ref()[..CHECK_LEN]);
        Ok(MasterKey {
            key,
            check,
            rng: SystemRandom::new(),
        })
    }

    /// A value that identifies this key without revealing it: the first 16 bytes of
    /// HMAC-SHA-256(key, "iomt-edge master key check v1"). A store records it, so that it is
    /// never paired with another key.
    pub fn check_value(&self) -> [u8; CHECK_LEN] {
        self.check
    }

    fn random<const N: usize>(&self) -> Result<[u8; N], CryptError> {
        let mut out = [0u8; N];
        self.rng.fill(&mut out).map_err(|_| CryptError::Random)?;
        Ok(out)
    }

    /// Encrypts `plaintext` under a fresh data key. `aad` is authenticated, not encrypted.
    pub fn seal(&self, plaintext: Vec<u8>, aad: &[u8]) -> Result<Envelope, CryptError> {
        let data_key: [u8; KEY_LEN] = self.random()?;
        let nonce: [u8; NONCE_LEN] = self.random()?;
        let mut ciphertext = plaintext;
        aead_key(&data_key)?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut ciphertext,
            )
            .map_err(|_| CryptError::Open)?;

        let key_nonce: [u8; NONCE_LEN] = self.random()?;
        let mut wrapped_key = data_key.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(key_nonce),
                Aad::from(aad),
                &mut wrapped_key,
            )
            .map_err(|_| CryptError::Open)?;
        Ok(Envelope {
            wrapped_key,
            key_nonce,
            nonce,
            ciphertext,
        })
    }

    /// Decrypts an envelope; fails if anything in it or in `aad` was altered.
    pub fn open(&self, env: &Envelope, aad: &[u8]) -> Result<Vec<u8>, CryptError> {
        if env.wrapped_key.len() != KEY_LEN + TAG_LEN {
            return Err(CryptError::Open);
        }
        let mut data_key = env.wrapped_key.clone();
        let data_key = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(env.key_nonce),
                Aad::from(aad),
                &mut data_key,
            )
            .map_err(|_| CryptError::Open)?;
        let mut buf = env.ciphertext.clone();
        let len = aead_key(data_key)?
            .open_in_place(
                Nonce::assume_unique_for_key(env.nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| CryptError::Open)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MasterKey {
        MasterKey::from_bytes(&[7u8; KEY_LEN]).unwrap()
    }

    #[test]
    fn round_trips() {
        let k = key();
        let env = k.seal(b"arrow ipc bytes".to_vec(), b"header").unwrap();
        assert_ne!(&env.ciphertext[..15], b"arrow ipc bytes");
        assert_eq!(k.open(&env, b"header").unwrap(), b"arrow ipc bytes");
    }

    #[test]
    fn fresh_key_and_nonces_every_time() {
        let k = key();
        let a = k.seal(b"same".to_vec(), b"h").unwrap();
        let b = k.seal(b"same".to_vec(), b"h").unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.key_nonce, b.key_nonce);
        assert_ne!(a.wrapped_key, b.wrapped_key);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn tampering_fails_to_open() {
        let k = key();
        let env = k.seal(b"readings".to_vec(), b"header").unwrap();
        for i in 0..env.ciphertext.len() {
            let mut bad = env.clone();
            bad.ciphertext[i] ^= 1;
            assert_eq!(k.open(&bad, b"header"), Err(CryptError::Open), "byte {i}");
        }
        let mut bad = env.clone();
        bad.wrapped_key[0] ^= 1;
        assert_eq!(k.open(&bad, b"header"), Err(CryptError::Open));
        let mut bad = env.clone();
        bad.nonce[0] ^= 1;
        assert_eq!(k.open(&bad, b"header"), Err(CryptError::Open));
        assert_eq!(k.open(&env, b"other header"), Err(CryptError::Open));
        let other = MasterKey::from_bytes(&[8u8; KEY_LEN]).unwrap();
        assert_eq!(other.open(&env, b"header"), Err(CryptError::Open));
    }

    #[test]
    fn the_check_value_identifies_the_key() {
        let a = key();
        assert_eq!(a.check_value(), key().check_value());
        assert_ne!(
            a.check_value(),
            MasterKey::from_bytes(&[8u8; KEY_LEN])
                .unwrap()
                .check_value()
        );
        // Computed independently: Python's hmac.new(bytes([7] * 32),
        // b"iomt-edge master key check v1", hashlib.sha256).hexdigest()[:32].
        assert_eq!(
            crate::seal::merkle::to_hex(&a.check_value()),
            "6b927d7adb2e799424ceb96a4110511c"
        );
    }
}
