//! The keys that sign ID tokens (RS256, the algorithm every OpenID relying party must accept):
//! created when first needed (RSA key generation costs a CPU-bound fraction of a second, which a
//! node that never signs should not pay at start), sealed in `oidc_signing_keys`, published as the JWKS, rotated on
//! demand. The newest unretired key signs; a retired key stays published for `publish_for` so
//! tokens it signed keep verifying at relying parties that cache the JWKS.
//!
//! Invariant: private keys leave this module only sealed; the JWKS holds public parts only.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rsa::RsaPrivateKey;
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use rsa::traits::PublicKeyParts;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::PgPool;

use super::secrets::{SecretBox, SecretsError};

/// Serialises key creation across nodes ("vibejwks").
const KEYS_LOCK: i64 = 0x7669_6265_6a77_6b73;
const RSA_BITS: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("signing key database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error("signing key {kid} is unusable: {reason}")]
    BadKey { kid: String, reason: String },
    #[error("no signing key is active")]
    NoKey,
    #[error("JWT error: {0}")]
    Jwt(#[from] jsonwebtoken::errors::Error),
    #[error("key generation failed: {0}")]
    Generate(String),
}

struct ActiveKey {
    kid: String,
    encoding: EncodingKey,
}

#[derive(Default)]
struct KeyRing {
    active: Option<ActiveKey>,
    /// Public JWKs of every published key, newest first.
    published: Vec<serde_json::Value>,
    decoding: Vec<(String, DecodingKey)>,
}

/// ID-token signing keys of this node (shared with the cluster through the database).
pub struct SigningKeys {
    pool: PgPool,
    secrets: Arc<SecretBox>,
    publish_for: Duration,
    ring: RwLock<Arc<KeyRing>>,
}

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeys")
            .field("publish_for", &self.publish_for)
            .finish_non_exhaustive()
    }
}

impl SigningKeys {
    /// Loads the published keys (there may be none yet: see [`SigningKeys::ensure_key`]).
    pub async fn load(
        pool: PgPool,
        secrets: Arc<SecretBox>,
        publish_for: Duration,
    ) -> Result<Self, SigningError> {
        let keys = Self {
            pool,
            secrets,
            publish_for,
            ring: RwLock::default(),
        };
        keys.reload().await?;
        Ok(keys)
    }

    /// Makes sure a signing key exists, creating the first one (once across all nodes).
    pub async fn ensure_key(&self) -> Result<(), SigningError> {
        if self.ring().active.is_some() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(KEYS_LOCK)
            .execute(&mut *tx)
            .await?;
        let active: Option<(String,)> =
            sqlx::query_as("SELECT kid FROM oidc_signing_keys WHERE retired_at IS NULL LIMIT 1")
                .fetch_optional(&mut *tx)
                .await?;
        if active.is_none() {
            let kid = self.insert_new_key(&mut tx).await?;
            tracing::info!(%kid, "created the first ID token signing key");
        }
        tx.commit().await?;
        self.reload().await
    }

    /// Makes a new key the signing key; the previous one stays published for `publish_for`.
    pub async fn rotate(&self) -> Result<String, SigningError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(KEYS_LOCK)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE oidc_signing_keys SET retired_at = now() WHERE retired_at IS NULL")
            .execute(&mut *tx)
            .await?;
        let kid = self.insert_new_key(&mut tx).await?;
        tx.commit().await?;
        self.reload().await?;
        tracing::info!(%kid, "rotated the ID token signing key");
        Ok(kid)
    }

    async fn insert_new_key(&self, tx: &mut sqlx::PgConnection) -> Result<String, SigningError> {
        // RSA key generation takes a CPU-bound fraction of a second.
        let private = tokio::task::spawn_blocking(|| {
            let mut rng = rsa::rand_core::OsRng;
            RsaPrivateKey::new(&mut rng, RSA_BITS)
        })
        .await
        .map_err(|e| SigningError::Generate(e.to_string()))?
        .map_err(|e| SigningError::Generate(e.to_string()))?;
        let kid = uuid::Uuid::now_v7().simple().to_string();
        let der = private
            .to_pkcs1_der()
            .map_err(|e| SigningError::Generate(e.to_string()))?;
        let jwk = serde_json::json!({
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": kid,
            "n": URL_SAFE_NO_PAD.encode(private.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(private.e().to_bytes_be()),
        });
        sqlx::query(
            "INSERT INTO oidc_signing_keys (kid, sealed_key, public_jwk) VALUES ($1, $2, $3)",
        )
        .bind(&kid)
        .bind(self.secrets.seal(der.as_bytes(), kid.as_bytes()))
        .bind(&jwk)
        .execute(tx)
        .await?;
        Ok(kid)
    }

    /// Re-reads the keys from the database (after a rotation by any node).
    pub async fn reload(&self) -> Result<(), SigningError> {
        let rows: Vec<(String, Vec<u8>, serde_json::Value, bool)> = sqlx::query_as(
            "SELECT kid, sealed_key, public_jwk, retired_at IS NULL FROM oidc_signing_keys \
             WHERE retired_at IS NULL OR retired_at > now() - make_interval(secs => $1) \
             ORDER BY created_at DESC",
        )
        .bind(self.publish_for.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        let mut ring = KeyRing::default();
        for (kid, sealed, jwk, active) in rows {
            let bad = |reason: &str| SigningError::BadKey {
                kid: kid.clone(),
                reason: reason.to_owned(),
            };
            let (Some(n), Some(e)) = (jwk["n"].as_str(), jwk["e"].as_str()) else {
                return Err(bad("its public JWK lacks n or e"));
            };
            ring.decoding
                .push((kid.clone(), DecodingKey::from_rsa_components(n, e)?));
            if active && ring.active.is_none() {
                let der = self.secrets.open(&sealed, kid.as_bytes())?;
                // Parsed here only to fail early on a corrupt key rather than at first use.
                RsaPrivateKey::from_pkcs1_der(&der).map_err(|e| bad(&e.to_string()))?;
                ring.active = Some(ActiveKey {
                    kid: kid.clone(),
                    encoding: EncodingKey::from_rsa_der(&der),
                });
            }
            ring.published.push(jwk);
        }
        *self
            .ring
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(ring);
        Ok(())
    }

    fn ring(&self) -> Arc<KeyRing> {
        self.ring
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The JSON Web Key Set: every published key, newest first.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": self.ring().published })
    }

    /// A JWT of `claims`, signed with the active key.
    pub fn sign(&self, claims: &impl Serialize) -> Result<String, SigningError> {
        let ring = self.ring();
        let key = ring.active.as_ref().ok_or(SigningError::NoKey)?;
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(key.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &key.encoding)?)
    }

    /// Claims of a JWT this provider signed for `issuer` (any published key), expiry ignored:
    /// an `id_token_hint` names a past login.
    pub fn verify_ignoring_expiry<T: DeserializeOwned>(
        &self,
        token: &str,
        issuer: &str,
    ) -> Result<T, SigningError> {
        let header = jsonwebtoken::decode_header(token)?;
        let ring = self.ring();
        let key = ring
            .decoding
            .iter()
            .find(|(kid, _)| Some(kid) == header.kid.as_ref())
            .map(|(_, k)| k)
            .ok_or(SigningError::NoKey)?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.validate_exp = false;
        validation.validate_aud = false;
        // `iss` is checked only when required; `exp` is not wanted here.
        validation.set_required_spec_claims(&["iss"]);
        validation.set_issuer(&[issuer]);
        Ok(jsonwebtoken::decode::<T>(token, key, &validation)?.claims)
    }
}
