//! Certificates: signed claims one DID makes about another (`friend-of`, `member-of`), with an
//! optional expiry, revocable by their issuer. Stored as documents of the reserved type
//! [`CERTIFICATE_TYPE`] (owner = issuer, readable by the subject), so issue and revocation
//! travel through the change feed like every write and reach every node's realtime tree in
//! order. Each carries an Ed25519 signature by the issuer's `did:key` over its canonical form,
//! so it can be checked without trusting this server.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use uuid::Uuid;
use vibe_actors::acl::Acl;
pub use vibe_actors::certs::CERTIFICATE_TYPE;

/// The signed content, fields in a fixed order (its JSON is the signed message).
#[derive(Debug, Serialize)]
pub struct SignedClaim<'a> {
    pub id: Uuid,
    pub issuer: &'a str,
    pub subject: &'a str,
    #[serde(rename = "type")]
    pub cert_type: &'a str,
    pub issued_at: &'a str,
    pub expires_at: Option<&'a str>,
}

impl SignedClaim<'_> {
    /// The bytes signed: the claim's JSON, fields in declaration order, no whitespace.
    pub fn message(&self) -> Vec<u8> {
        // Serialising strings, an id and an option cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// RFC 3339 in UTC with millisecond precision: the one spelling signed and stored.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The certificate document's ACL: the subject may read it (the issuer owns it).
pub fn certificate_acl(subject: &str) -> Result<Acl, serde_json::Error> {
    serde_json::from_value(serde_json::json!({"read": {"allow": [subject]}}))
}

/// The document data of a signed certificate.
pub fn certificate_data(claim: &SignedClaim<'_>, signature: &[u8; 64]) -> serde_json::Value {
    serde_json::json!({
        "subject": claim.subject,
        "type": claim.cert_type,
        "issued_at": claim.issued_at,
        "expires_at": claim.expires_at,
        "proof": {
            "type": "Ed25519Signature",
            "verification_method": claim.issuer,
            "signature": URL_SAFE_NO_PAD.encode(signature),
        },
    })
}

/// Checks a certificate document's signature against the issuer's `did:key`.
pub fn verify(id: Uuid, issuer: &str, data: &serde_json::Value) -> bool {
    let text = |k: &str| data.get(k).and_then(|v| v.as_str());
    let (Some(subject), Some(cert_type), Some(issued_at)) =
        (text("subject"), text("type"), text("issued_at"))
    else {
        return false;
    };
    let claim = SignedClaim {
        id,
        issuer,
        subject,
        cert_type,
        issued_at,
        expires_at: text("expires_at"),
    };
    let Some(signature) = data
        .pointer("/proof/signature")
        .and_then(|v| v.as_str())
        .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
    else {
        return false;
    };
    let Some(key) = super::accounts::did_key_public(issuer) else {
        return false;
    };
    use ed25519_dalek::Verifier as _;
    key.verify(
        &claim.message(),
        &ed25519_dalek::Signature::from_bytes(&signature),
    )
    .is_ok()
}
