//! The node's secrets key (`<data dir>/keys/secrets.key`) and the sealing of small secrets kept
//! in the database: users' DID keys and ID-token signing keys. XChaCha20-Poly1305 with a random
//! nonce per seal; the row's identity (a DID, a key id) is bound as associated data, so a sealed
//! value copied into another row does not open.
//!
//! Invariant: the key and opened secrets are never logged (no `Debug` shows them).

use std::fmt;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

/// Where the secrets key lives, relative to the data dir. Nodes of one cluster share it (like
/// the token root key): each must open what another sealed.
const SECRETS_KEY_FILE: &str = "keys/secrets.key";
const NONCE_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot read or create the secrets key at {path}: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
    #[error("the secrets key file {0} is not 64 hex digits")]
    BadKeyFile(String),
    /// Tampered, truncated, sealed under another key, or moved to another row.
    #[error("a sealed secret does not open with this node's secrets key")]
    Unseal,
}

/// Seals and opens secrets with the node's key.
pub struct SecretBox {
    cipher: XChaCha20Poly1305,
    fingerprint: String,
}

impl fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

impl SecretBox {
    /// Loads the key, creating it (mode 0600 in a 0700 folder) on first run.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, SecretsError> {
        let path = data_dir.join(SECRETS_KEY_FILE);
        let io_err = |source| SecretsError::KeyFile {
            path: path.display().to_string(),
            source,
        };
        let key: Zeroizing<[u8; 32]> = match crate::auth::read_secret(&path) {
            Ok(text) => {
                let mut key = Zeroizing::new([0u8; 32]);
                hex::decode_to_slice(text.trim(), key.as_mut_slice())
                    .map_err(|_| SecretsError::BadKeyFile(path.display().to_string()))?;
                key
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Zeroizing::new(rand::random::<[u8; 32]>());
                let text = Zeroizing::new(hex::encode(key.as_slice()));
                crate::auth::write_secret(&path, text.as_bytes()).map_err(io_err)?;
                tracing::info!(path = %path.display(), "created secrets key");
                key
            }
            Err(e) => return Err(io_err(e)),
        };
        Ok(Self::from_key(&key))
    }

    pub fn from_key(key: &[u8; 32]) -> Self {
        use sha2::Digest as _;
        // One-way (the key is 256 random bits) and apart from any other use of the key.
        let fingerprint = sha2::Sha256::new()
            .chain_update(b"vibe secrets key fingerprint\0")
            .chain_update(key)
            .finalize();
        Self {
            cipher: XChaCha20Poly1305::new(key.into()),
            fingerprint: hex::encode(fingerprint),
        }
    }

    /// Tells this key from another without revealing it: nodes of a cluster compare it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// `nonce || ciphertext` of `secret`, bound to `context`.
    pub fn seal(&self, secret: &[u8], context: &[u8]) -> Vec<u8> {
        let nonce_bytes = rand::random::<[u8; NONCE_LEN]>();
        let nonce = XNonce::from(nonce_bytes);
        // Encryption fails only for plaintexts beyond 256 GiB; these are keys of a few bytes.
        #[allow(clippy::expect_used)]
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: secret,
                    aad: context,
                },
            )
            .expect("XChaCha20-Poly1305 seals any small secret");
        let mut out = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// The secret sealed by [`SecretBox::seal`] with the same `context`.
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Zeroizing<Vec<u8>>, SecretsError> {
        if sealed.len() < NONCE_LEN {
            return Err(SecretsError::Unseal);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| SecretsError::Unseal)?;
        self.cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| SecretsError::Unseal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_open_only_with_the_same_key_and_context() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = SecretBox::load_or_create(dir.path()).unwrap();
        let sealed = secrets.seal(b"hunter2", b"did:key:zA");
        assert_eq!(&*secrets.open(&sealed, b"did:key:zA").unwrap(), b"hunter2");
        assert!(secrets.open(&sealed, b"did:key:zB").is_err());
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(secrets.open(&tampered, b"did:key:zA").is_err());
        // Reloaded from the file: the same key.
        let again = SecretBox::load_or_create(dir.path()).unwrap();
        assert!(again.open(&sealed, b"did:key:zA").is_ok());
        let other = SecretBox::from_key(&[7; 32]);
        assert!(other.open(&sealed, b"did:key:zA").is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(SECRETS_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
