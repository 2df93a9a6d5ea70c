//! The keys that sign ID tokens (RS256, the algorithm every OpenID relying party must accept):
//! created when first needed (RSA key generation costs CPU-bound milliseconds, which a node that
//! never signs should not pay at start), sealed in `oidc_signing_keys`, published as the JWKS,
//! rotated on demand. Private-key operations are aws-lc-rs's (constant-time); keys are stored as
//! PKCS#8 DER, and keys stored before as PKCS#1 DER still load. The newest key whose
//! `signs_from` has come and that is not retired signs. A rotated key is published `lead` before
//! it signs (every node reloads within that, and relying parties' cached key sets expire), and
//! the key it replaces signs until then; a retired key stays published for `publish_for` so
//! tokens it signed keep verifying at relying parties that cache the JWKS. Every node reads the
//! keys again periodically, so a rotation on one node moves every node to the new key.
//!
//! Invariant: private keys leave this module only sealed; the JWKS holds public parts only.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::PgPool;

use super::secrets::{SecretBox, SecretsError};

/// Serialises key creation across nodes ("vibejwks").
const KEYS_LOCK: i64 = 0x7669_6265_6a77_6b73;

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
    #[error("cannot encode the token: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("RSA signing failed")]
    Sign,
}

struct ActiveKey {
    kid: String,
    key: KeyPair,
}

#[derive(Default)]
struct KeyRing {
    active: Option<ActiveKey>,
    /// Public JWKs of every published key, newest first.
    published: Vec<serde_json::Value>,
    decoding: Vec<(String, DecodingKey)>,
    /// The key ids read, newest first, each with whether it signs: a reload that reads the same
    /// keeps the ring (no private key opened again).
    listed: Vec<(String, bool)>,
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
        let active: Option<(String,)> = sqlx::query_as(
            "SELECT kid FROM oidc_signing_keys \
                 WHERE retired_at IS NULL OR retired_at > now() LIMIT 1",
        )
        .fetch_optional(&mut *tx)
        .await?;
        if active.is_none() {
            // Signing from the database's now: the node's clock may be ahead of it.
            let kid = self.insert_new_key(&mut tx, None).await?;
            tracing::info!(%kid, "created the first ID token signing key");
        }
        tx.commit().await?;
        self.reload().await?;
        if self.ring().active.is_none() {
            return Err(SigningError::NoKey);
        }
        Ok(())
    }

    /// Makes a new key, published at once and signing `lead` from now, when the keys signing
    /// now are retired (they stay published for `publish_for` after that). Returns its id and
    /// when it signs from. A `lead` of zero switches at once: relying parties that cached the key
    /// set reject its tokens until they fetch it again. `withdraw` (a compromised key) also takes
    /// every older key out of the key set at once, so tokens they signed stop verifying as soon
    /// as relying parties fetch it again.
    pub async fn rotate(
        &self,
        lead: Duration,
        withdraw: bool,
    ) -> Result<(String, chrono::DateTime<chrono::Utc>), SigningError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(KEYS_LOCK)
            .execute(&mut *tx)
            .await?;
        // With no key signing yet (none made, or all retired), there is nothing to wait for.
        let signs_from: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM oidc_signing_keys \
                                      WHERE signs_from <= now() \
                                        AND (retired_at IS NULL OR retired_at > now())) \
                         THEN now() + make_interval(secs => $1) ELSE now() END",
        )
        .bind(lead.as_secs_f64())
        .fetch_one(&mut *tx)
        .await?;
        // Keys already waiting to sign are passed over too: the newest rotation wins. A withdrawn
        // key retired at -infinity is past every node's publication window.
        if withdraw {
            // Only keys still published: older ones keep the time they were retired.
            sqlx::query(
                "UPDATE oidc_signing_keys SET retired_at = '-infinity' \
                 WHERE retired_at IS NULL OR retired_at > now() - make_interval(secs => $1)",
            )
            .bind(self.publish_for.as_secs_f64())
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query(
                "UPDATE oidc_signing_keys SET retired_at = $1 \
                 WHERE retired_at IS NULL OR retired_at > $1",
            )
            .bind(signs_from)
            .execute(&mut *tx)
            .await?;
        }
        let kid = self.insert_new_key(&mut tx, Some(signs_from)).await?;
        tx.commit().await?;
        self.reload().await?;
        tracing::info!(%kid, %signs_from, "rotated the ID token signing key");
        Ok((kid, signs_from))
    }

    /// Inserts a new key that signs from `signs_from` (None: the database's now).
    async fn insert_new_key(
        &self,
        tx: &mut sqlx::PgConnection,
        signs_from: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<String, SigningError> {
        let private = tokio::task::spawn_blocking(|| KeyPair::generate(KeySize::Rsa2048))
            .await
            .map_err(|e| SigningError::Generate(e.to_string()))?
            .map_err(|e| SigningError::Generate(e.to_string()))?;
        let kid = uuid::Uuid::now_v7().simple().to_string();
        let der = private
            .as_der()
            .map_err(|e| SigningError::Generate(e.to_string()))?;
        let jwk = public_jwk(&kid, &private);
        sqlx::query(
            "INSERT INTO oidc_signing_keys (kid, sealed_key, public_jwk, signs_from) \
             VALUES ($1, $2, $3, coalesce($4, now()))",
        )
        .bind(&kid)
        .bind(self.secrets.seal(der.as_ref(), kid.as_bytes()))
        .bind(&jwk)
        .bind(signs_from)
        .execute(tx)
        .await?;
        Ok(kid)
    }

    /// Re-reads the keys from the database (after a rotation by any node).
    pub async fn reload(&self) -> Result<(), SigningError> {
        // Newest first: a key waiting to sign leads the key set, and the first key that signs
        // now is the active one.
        let rows: Vec<(String, Vec<u8>, serde_json::Value, bool)> = sqlx::query_as(
            "SELECT kid, sealed_key, public_jwk, \
                    signs_from <= now() AND (retired_at IS NULL OR retired_at > now()) \
             FROM oidc_signing_keys \
             WHERE retired_at IS NULL OR retired_at > now() - make_interval(secs => $1) \
             ORDER BY created_at DESC",
        )
        .bind(self.publish_for.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        let listed: Vec<(String, bool)> = rows
            .iter()
            .map(|(kid, _, _, active)| (kid.clone(), *active))
            .collect();
        if listed == self.ring().listed {
            return Ok(());
        }
        let mut ring = KeyRing {
            listed,
            ..KeyRing::default()
        };
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
                ring.active = Some(ActiveKey {
                    kid: kid.clone(),
                    key: private_key(&der).map_err(|e| bad(&e))?,
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

    /// Reloads the keys every `interval` until `stop` resolves: a rotation on another node
    /// reaches this one (its new key signs here too, and is in this node's JWKS), and a retired
    /// key leaves the JWKS once its overlap has passed.
    pub async fn run(&self, interval: Duration, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticker.tick() => {}
            }
            if let Err(e) = self.reload().await {
                tracing::warn!(error = %e, "reloading the ID token signing keys failed; retrying");
            }
        }
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
        let active = ring.active.as_ref().ok_or(SigningError::NoKey)?;
        sign_jwt(&active.kid, &active.key, claims)
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

/// A stored private key: PKCS#8 DER (what this module writes), or PKCS#1 DER (what it wrote
/// before it used aws-lc-rs).
fn private_key(der: &[u8]) -> Result<KeyPair, String> {
    KeyPair::from_pkcs8(der)
        .or_else(|_| KeyPair::from_der(der))
        .map_err(|e| e.to_string())
}

/// The public JWK of `key`, as published in the JWKS.
fn public_jwk(kid: &str, key: &KeyPair) -> serde_json::Value {
    let public = key.public_key();
    serde_json::json!({
        "kty": "RSA",
        "use": "sig",
        "alg": "RS256",
        "kid": kid,
        "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
        "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
    })
}

/// The compact JWS (RFC 7515) of `claims`: RS256 (RSASSA-PKCS1-v1_5 with SHA-256) under `key`,
/// its header naming `kid`.
fn sign_jwt(kid: &str, key: &KeyPair, claims: &impl Serialize) -> Result<String, SigningError> {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    let mut jwt = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?);
    jwt.push('.');
    jwt.push_str(&URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?));
    let mut signature = vec![0; key.public_modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        jwt.as_bytes(),
        &mut signature,
    )
    .map_err(|_| SigningError::Sign)?;
    jwt.push('.');
    jwt.push_str(&URL_SAFE_NO_PAD.encode(signature));
    Ok(jwt)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The claims of `jwt` if its RS256 signature verifies under `jwk` (no claim is required).
    fn decode(
        jwt: &str,
        jwk: &serde_json::Value,
    ) -> Result<serde_json::Value, jsonwebtoken::errors::Error> {
        let key = DecodingKey::from_rsa_components(
            jwk["n"].as_str().unwrap_or_default(),
            jwk["e"].as_str().unwrap_or_default(),
        )?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.set_required_spec_claims::<&str>(&[]);
        Ok(jsonwebtoken::decode::<serde_json::Value>(jwt, &key, &validation)?.claims)
    }

    fn verify(jwt: &str, jwk: &serde_json::Value) -> serde_json::Value {
        decode(jwt, jwk).unwrap_or_else(|e| panic!("{jwt} does not verify: {e}"))
    }

    #[test]
    fn a_signed_token_verifies_with_the_published_key_and_a_forged_one_does_not() {
        let key = KeyPair::generate(KeySize::Rsa2048).unwrap_or_else(|e| panic!("{e}"));
        let jwk = public_jwk("k1", &key);
        let claims = serde_json::json!({"sub": "did:key:zA", "n": 1});
        let jwt = sign_jwt("k1", &key, &claims).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(verify(&jwt, &jwk), claims);
        let header = jsonwebtoken::decode_header(&jwt).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (header.alg, header.kid.as_deref()),
            (Algorithm::RS256, Some("k1"))
        );

        // Claims swapped under the same signature; and a token of another key.
        let (head, rest) = jwt.split_once('.').unwrap_or_default();
        let (_, signature) = rest.split_once('.').unwrap_or_default();
        let forged_claims = URL_SAFE_NO_PAD.encode(br#"{"sub":"did:key:zB","n":1}"#);
        let forged = format!("{head}.{forged_claims}.{signature}");
        let other = KeyPair::generate(KeySize::Rsa2048).unwrap_or_else(|e| panic!("{e}"));
        let foreign = sign_jwt("k1", &other, &claims).unwrap_or_else(|e| panic!("{e}"));
        for bad in [forged, foreign] {
            assert!(decode(&bad, &jwk).is_err());
        }
    }

    #[test]
    fn keys_stored_as_pkcs8_and_as_pkcs1_both_load() {
        let key = KeyPair::generate(KeySize::Rsa2048).unwrap_or_else(|e| panic!("{e}"));
        let pkcs8 = key.as_der().unwrap_or_else(|e| panic!("{e}"));
        let pkcs8 = pkcs8.as_ref();
        // PKCS#8 PrivateKeyInfo = SEQUENCE { version 0, AlgorithmIdentifier rsaEncryption,
        // OCTET STRING { RSAPrivateKey (PKCS#1) } }: for a 2048-bit key a 26-byte prefix with
        // two-byte lengths, the PKCS#1 key after it (how keys were stored before).
        let prefix = [
            0x02, 0x01, 0x00, 0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01,
            0x01, 0x01, 0x05, 0x00, 0x04, 0x82,
        ];
        assert_eq!(
            &pkcs8[4..24],
            &prefix,
            "the PKCS#8 layout this test assumes"
        );
        let pkcs1 = &pkcs8[26..];
        assert_eq!(
            usize::from(u16::from_be_bytes([pkcs8[24], pkcs8[25]])),
            pkcs1.len()
        );

        let claims = serde_json::json!({"sub": "did:key:zA"});
        for der in [pkcs8, pkcs1] {
            let loaded = private_key(der).unwrap_or_else(|e| panic!("{e}"));
            let jwt = sign_jwt("k", &loaded, &claims).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(verify(&jwt, &public_jwk("k", &key)), claims);
        }
        assert!(
            private_key(&pkcs1[1..]).is_err(),
            "a corrupt key is refused"
        );
    }
}
