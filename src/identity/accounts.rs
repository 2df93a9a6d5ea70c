//! Accounts: sign-up, password login (argon2id, rate-limited), and each user's `did:key` — an
//! Ed25519 key the server holds sealed with the node's secrets key, exportable after the user
//! re-enters the password.
//!
//! Invariant: a password, its hash and a private key are never logged; a failed login takes the
//! same work whether or not the handle exists.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use governor::{DefaultKeyedRateLimiter, Quota};
use sqlx::PgPool;
use zeroize::Zeroizing;

use super::secrets::{SecretBox, SecretsError};

/// The multicodec prefix of an Ed25519 public key (varint of 0xed).
const ED25519_PUB_MULTICODEC: [u8; 2] = [0xed, 0x01];
pub const MIN_PASSWORD_BYTES: usize = 8;
pub const MAX_PASSWORD_BYTES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error(
        "a handle is 3 to 32 characters: lower-case letters, digits, `_`, `.` or `-`, starting \
         with a letter or digit"
    )]
    BadHandle,
    #[error("a password is {MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} bytes")]
    BadPassword,
    #[error("that handle is taken")]
    HandleTaken,
    /// Deliberately vague: does not tell which of handle and password was wrong.
    #[error("wrong handle or password")]
    InvalidCredentials,
    /// A re-entered password (the account is known: the caller's token names it).
    #[error("wrong password")]
    WrongPassword,
    #[error("too many login attempts; retry in {} s", .0.as_secs().max(1))]
    RateLimited(Duration),
    #[error("no such account")]
    NotFound,
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error("account database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Cost of the argon2id hash of new passwords (existing hashes keep the cost they were made with).
#[derive(Debug, Clone, Copy)]
pub struct HashCost {
    pub memory_kib: u32,
    pub iterations: u32,
}

/// Login attempts allowed per minute, per handle and per client address.
#[derive(Debug, Clone, Copy)]
pub struct LoginRates {
    pub per_handle: NonZeroU32,
    pub per_address: NonZeroU32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub did: String,
    pub handle: String,
}

/// A user's DID key as a private JWK (RFC 8037), with the DID it stands for.
#[derive(Debug, serde::Serialize)]
pub struct ExportedKey {
    pub did: String,
    pub jwk: serde_json::Value,
}

pub struct Accounts {
    pool: PgPool,
    secrets: Arc<SecretBox>,
    argon: Argon2<'static>,
    /// Verified against when the handle does not exist, so that case costs a full hash too.
    dummy_hash: String,
    by_handle: DefaultKeyedRateLimiter<String>,
    by_address: DefaultKeyedRateLimiter<IpAddr>,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts").finish_non_exhaustive()
    }
}

impl Accounts {
    pub fn new(
        pool: PgPool,
        secrets: Arc<SecretBox>,
        cost: HashCost,
        rates: LoginRates,
    ) -> Result<Self, AccountError> {
        let params = Params::new(cost.memory_kib, cost.iterations, 1, None)
            .map_err(|e| AccountError::Hash(e.to_string()))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let dummy_hash = hash_with(&argon, &hex::encode(rand::random::<[u8; 16]>()))?;
        Ok(Self {
            pool,
            secrets,
            argon,
            dummy_hash,
            by_handle: governor::RateLimiter::keyed(Quota::per_minute(rates.per_handle)),
            by_address: governor::RateLimiter::keyed(Quota::per_minute(rates.per_address)),
        })
    }

    /// Creates an account with a fresh `did:key`.
    pub async fn sign_up(&self, handle: &str, password: &str) -> Result<Account, AccountError> {
        validate_handle(handle)?;
        validate_password(password)?;
        let hash = self.hash(password).await?;
        let secret = Zeroizing::new(rand::random::<[u8; 32]>());
        let signing = ed25519_dalek::SigningKey::from_bytes(&secret);
        let did = did_key(&signing.verifying_key().to_bytes());
        let sealed = self.secrets.seal(secret.as_slice(), did.as_bytes());
        let inserted = sqlx::query(
            "INSERT INTO users (did, handle, password_hash, sealed_key) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (handle) DO NOTHING",
        )
        .bind(&did)
        .bind(handle)
        .bind(&hash)
        .bind(&sealed)
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(AccountError::HandleTaken);
        }
        Ok(Account {
            did,
            handle: handle.to_owned(),
        })
    }

    /// Counts one password attempt (login or sign-up) from `from` against its rate limit.
    pub fn check_address(&self, from: IpAddr) -> Result<(), AccountError> {
        use governor::clock::Clock as _;
        self.by_address
            .check_key(&super::rate_limit_key(from))
            .map_err(|not_until| {
                AccountError::RateLimited(
                    not_until.wait_time_from(governor::clock::DefaultClock::default().now()),
                )
            })
    }

    /// Counts one password attempt on the account `key` (a login's handle, a re-entry's DID)
    /// against its rate limit, and lets both limiters forget keys that have gone quiet.
    fn check_account(&self, key: &str) -> Result<(), AccountError> {
        use governor::clock::Clock as _;
        let counted = self
            .by_handle
            .check_key(&key.to_owned())
            .map_err(|not_until| {
                AccountError::RateLimited(
                    not_until.wait_time_from(governor::clock::DefaultClock::default().now()),
                )
            });
        self.by_address.retain_recent();
        self.by_handle.retain_recent();
        counted
    }

    /// The account whose password this is, within the login rate limits of `handle` and `from`.
    pub async fn login(
        &self,
        handle: &str,
        password: &str,
        from: IpAddr,
    ) -> Result<Account, AccountError> {
        self.check_address(from)?;
        let key = handle.to_ascii_lowercase();
        self.check_account(&key)?;
        let row: Option<(String, String, Option<String>)> =
            sqlx::query_as("SELECT did, handle, password_hash FROM users WHERE handle = $1")
                .bind(&key)
                .fetch_optional(&self.pool)
                .await?;
        let (account, hash) = match row {
            Some((did, handle, Some(hash))) => (Some(Account { did, handle }), hash),
            _ => (None, self.dummy_hash.clone()),
        };
        let matches = self.verify(password, hash).await?;
        match account {
            Some(account) if matches => Ok(account),
            _ => Err(AccountError::InvalidCredentials),
        }
    }

    /// Re-checks the password of the account `did` (re-authentication before a sensitive act),
    /// within the same rate limits as a login: per address, and per account (its DID counts
    /// where a login counts the handle). Whoever holds a stolen session token could otherwise
    /// guess the password at the speed of argon2.
    pub async fn confirm_password(
        &self,
        did: &str,
        password: &str,
        from: IpAddr,
    ) -> Result<(), AccountError> {
        self.check_address(from)?;
        self.check_account(did)?;
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT password_hash FROM users WHERE did = $1")
                .bind(did)
                .fetch_optional(&self.pool)
                .await?;
        // The caller's own token names the DID: saying it has no account here tells it nothing
        // about anyone else (an operator's minted token for a bare DID, say).
        let Some((hash,)) = row else {
            return Err(AccountError::NotFound);
        };
        let hash = hash.unwrap_or_else(|| self.dummy_hash.clone());
        if self.verify(password, hash).await? {
            Ok(())
        } else {
            Err(AccountError::WrongPassword)
        }
    }

    pub async fn by_did(&self, did: &str) -> Result<Account, AccountError> {
        let row: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT did, handle FROM users WHERE did = $1")
                .bind(did)
                .fetch_optional(&self.pool)
                .await?;
        match row {
            Some((did, Some(handle))) => Ok(Account { did, handle }),
            _ => Err(AccountError::NotFound),
        }
    }

    /// Signs `message` with the account's DID key (NotFound: the DID has no key here).
    pub async fn sign(&self, did: &str, message: &[u8]) -> Result<[u8; 64], AccountError> {
        let secret = self.secret_key(did).await?;
        use ed25519_dalek::Signer as _;
        Ok(ed25519_dalek::SigningKey::from_bytes(&secret)
            .sign(message)
            .to_bytes())
    }

    async fn secret_key(&self, did: &str) -> Result<Zeroizing<[u8; 32]>, AccountError> {
        let sealed: Option<(Option<Vec<u8>>,)> =
            sqlx::query_as("SELECT sealed_key FROM users WHERE did = $1")
                .bind(did)
                .fetch_optional(&self.pool)
                .await?;
        let Some((Some(sealed),)) = sealed else {
            return Err(AccountError::NotFound);
        };
        let secret = self.secrets.open(&sealed, did.as_bytes())?;
        Ok(Zeroizing::new(
            secret
                .as_slice()
                .try_into()
                .map_err(|_| SecretsError::Unseal)?,
        ))
    }

    /// The user's DID key, after the password is confirmed.
    pub async fn export_key(
        &self,
        did: &str,
        password: &str,
        from: IpAddr,
    ) -> Result<ExportedKey, AccountError> {
        self.confirm_password(did, password, from).await?;
        let secret = self.secret_key(did).await?;
        let public = ed25519_dalek::SigningKey::from_bytes(&secret)
            .verifying_key()
            .to_bytes();
        Ok(ExportedKey {
            did: did.to_owned(),
            jwk: serde_json::json!({
                "kty": "OKP",
                "crv": "Ed25519",
                "x": URL_SAFE_NO_PAD.encode(public),
                "d": URL_SAFE_NO_PAD.encode(secret.as_slice()),
            }),
        })
    }

    async fn hash(&self, password: &str) -> Result<String, AccountError> {
        let argon = self.argon.clone();
        let password = Zeroizing::new(password.to_owned());
        // Argon2 is tens of milliseconds of CPU by design: keep it off the async workers.
        tokio::task::spawn_blocking(move || hash_with(&argon, &password))
            .await
            .map_err(|e| AccountError::Hash(e.to_string()))?
    }

    async fn verify(&self, password: &str, hash: String) -> Result<bool, AccountError> {
        let argon = self.argon.clone();
        let password = Zeroizing::new(password.to_owned());
        tokio::task::spawn_blocking(move || {
            let parsed = PasswordHash::new(&hash).map_err(|e| AccountError::Hash(e.to_string()))?;
            // The comparison inside is constant-time.
            Ok(argon.verify_password(password.as_bytes(), &parsed).is_ok())
        })
        .await
        .map_err(|e| AccountError::Hash(e.to_string()))?
    }
}

fn hash_with(argon: &Argon2<'_>, password: &str) -> Result<String, AccountError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| AccountError::Hash(e.to_string()))?;
    argon
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AccountError::Hash(e.to_string()))
}

/// `did:key:z…` of an Ed25519 public key: base58btc of the multicodec-prefixed key.
pub fn did_key(public: &[u8; 32]) -> String {
    let mut bytes = Vec::with_capacity(34);
    bytes.extend_from_slice(&ED25519_PUB_MULTICODEC);
    bytes.extend_from_slice(public);
    format!("did:key:z{}", bs58::encode(bytes).into_string())
}

/// The Ed25519 public key a `did:key` names, if it is one.
pub fn did_key_public(did: &str) -> Option<ed25519_dalek::VerifyingKey> {
    let encoded = did.strip_prefix("did:key:z")?;
    let bytes = bs58::decode(encoded).into_vec().ok()?;
    let key = bytes.strip_prefix(&ED25519_PUB_MULTICODEC)?;
    ed25519_dalek::VerifyingKey::from_bytes(&<[u8; 32]>::try_from(key).ok()?).ok()
}

pub fn validate_handle(handle: &str) -> Result<(), AccountError> {
    let bytes = handle.as_bytes();
    let ok = (3..=32).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase() | bytes[0].is_ascii_digit()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(b));
    if ok {
        Ok(())
    } else {
        Err(AccountError::BadHandle)
    }
}

fn validate_password(password: &str) -> Result<(), AccountError> {
    if (MIN_PASSWORD_BYTES..=MAX_PASSWORD_BYTES).contains(&password.len()) {
        Ok(())
    } else {
        Err(AccountError::BadPassword)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_key_matches_the_spec_vectors() {
        // w3c-ccg/did-method-key test-vectors/ed25519-x25519.json: seeds 0x00..00 and 0x00..01.
        let key = |last: u8| {
            let mut seed = [0u8; 32];
            seed[31] = last;
            did_key(
                &ed25519_dalek::SigningKey::from_bytes(&seed)
                    .verifying_key()
                    .to_bytes(),
            )
        };
        assert_eq!(
            key(0),
            "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp"
        );
        assert_eq!(
            key(1),
            "did:key:z6MkjchhfUsD6mmvni8mCdXHw216Xrm9bQe2mBH1P5RDjVJG"
        );
        assert!(crate::acl::is_did(&key(0)));
        let public = did_key_public(&key(1)).unwrap();
        assert_eq!(did_key(public.as_bytes()), key(1));
        assert!(did_key_public("did:key:zNotBase58!").is_none());
        assert!(did_key_public("did:web:example.com").is_none());
    }

    #[test]
    fn handles() {
        for ok in ["ana", "bob.smith", "x-1_2", "123"] {
            assert!(validate_handle(ok).is_ok(), "{ok}");
        }
        for bad in ["", "ab", "Ana", "_ana", "a b", "ana!", &"a".repeat(33)] {
            assert!(validate_handle(bad).is_err(), "{bad}");
        }
    }
}
