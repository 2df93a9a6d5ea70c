//! This node's own unattenuated tokens, read without biscuit's generic machinery.
//!
//! Every token this node mints repeats its claims as JSON in the authority block's context
//! ([`MintedContext`], signed with the block), and takes its proof key from the root key
//! ([`ProofKey`]): the next key pair of the authority block is derived from a nonce in that
//! context, where biscuit would draw it at random. The token stays an ordinary biscuit — any
//! verifier with the public key checks it, and holders attenuate it offline — but a node that
//! holds the root key can verify a first sight of it with one Ed25519 signature check
//! ([`verify_first_sight`]): the proof is checked by recomputing the derived secret and
//! comparing it in constant time, instead of decompressing the next public key and deriving a
//! public key from the presented secret (a scalar multiplication), and the Datalog blocks are
//! never converted. Anything else — attenuated, sealed, or older tokens, a proof that is not the
//! derived one — is left to biscuit's full verification.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use biscuit_auth::format::schema;
use biscuit_auth::{KeyPair, PrivateKey};
use hmac::{Hmac, Mac as _};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::{AuthError, Claims};

/// Bytes of the nonce a minted token's context carries.
const NONCE_LEN: usize = 16;

/// Domain separation for the derived proof keys: the root key signs blocks too.
const PROOF_LABEL: &[u8] = b"vibe.token-proof.v1\0";

/// A minted token's claims as JSON in its authority block's context. Written by
/// [`super::TokenAuthority::mint_issued`] from the same values as the block's facts (unit tests
/// hold the two readings equal), and signed with them.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct MintedContext {
    /// The layout's version: a context of any other version or shape is not read.
    pub(super) v: u32,
    pub(super) sub: String,
    /// Unix seconds.
    pub(super) exp: u64,
    /// Sorted, without duplicates.
    pub(super) scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) client: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) grant: Option<uuid::Uuid>,
    /// Sorted, without duplicates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) identity_scopes: Vec<String>,
    /// The nonce the token's proof key is derived from (hex); absent in tokens minted before
    /// proofs were derived, which verify in full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) n: Option<String>,
}

impl MintedContext {
    pub(super) const VERSION: u32 = 1;

    /// The claims of a token whose signatures and proof were checked, as of `now`.
    pub(super) fn into_claims(
        self,
        token_id: String,
        now: SystemTime,
    ) -> Result<Claims, AuthError> {
        let expires_at = SystemTime::UNIX_EPOCH + Duration::from_secs(self.exp);
        if expires_at < now {
            return Err(AuthError::Expired);
        }
        let scopes = self
            .scopes
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| AuthError::Invalid)?;
        Ok(Claims {
            subject: self.sub,
            scopes,
            expires_at,
            client: self.client,
            grant: self.grant,
            identity_scopes: self.identity_scopes,
            token_id,
        })
    }

    /// Reads a context of this layout; None for any other text.
    pub(super) fn parse(context: &str) -> Option<Self> {
        let minted: Self = serde_json::from_str(context).ok()?;
        (minted.v == Self::VERSION).then_some(minted)
    }
}

/// Derives the next key pair of the tokens this node mints. A proof key is extracted from the
/// root private key once, HKDF-style (HMAC-SHA256 keyed with a label, over the root secret), so
/// the root secret itself never keys a MAC whose outputs holders see; HMAC-SHA256 with that key
/// over the token's nonce is the Ed25519 secret.
pub(super) struct ProofKey {
    mac: Hmac<Sha256>,
}

/// HMAC takes a key of any length.
fn hmac(key: &[u8]) -> Hmac<Sha256> {
    #[allow(clippy::expect_used)]
    Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length")
}

impl ProofKey {
    pub(super) fn new(root: &PrivateKey) -> Self {
        let mut extract = hmac(PROOF_LABEL);
        extract.update(&root.to_bytes());
        let key = extract.finalize().into_bytes();
        Self { mac: hmac(&key) }
    }

    /// A fresh nonce, as the context carries it.
    pub(super) fn nonce() -> String {
        hex::encode(rand::random::<[u8; NONCE_LEN]>())
    }

    fn keyed(&self, nonce: &str) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(nonce.as_bytes());
        mac
    }

    /// The key pair whose public half the authority block names as its next key.
    pub(super) fn next_key_pair(&self, nonce: &str) -> Result<KeyPair, AuthError> {
        let secret = self.keyed(nonce).finalize().into_bytes();
        KeyPair::from_bytes(&secret, schema::public_key::Algorithm::Ed25519)
            .map_err(|e| AuthError::Mint(e.into()))
    }

    /// Is `secret` the one derived from `nonce`? Constant time.
    fn proves(&self, nonce: &str, secret: &[u8]) -> bool {
        self.keyed(nonce).verify_slice(secret).is_ok()
    }
}

/// What a first sight of a token found.
pub(super) enum FirstSight {
    /// One of this node's unattenuated tokens, its signature and proof checked: its claims, or
    /// why they do not hold now.
    Minted(Result<Claims, AuthError>),
    /// Any other token, or one this path does not decide: biscuit verifies it in full.
    Other,
}

/// Verifies a token minted by this node's root key with a derived proof, with one signature
/// check; see the module docs.
pub(super) fn verify_first_sight(
    token: &str,
    root: &ed25519_dalek::VerifyingKey,
    proofs: &ProofKey,
    now: SystemTime,
) -> FirstSight {
    let Some(checked) = Unattenuated::parse(token) else {
        return FirstSight::Other;
    };
    let Some(nonce) = checked.context.n.as_deref() else {
        return FirstSight::Other;
    };
    // The context, the nonce and the next key are trusted only once the root key's signature
    // over them holds; the full verification checks the same signature over the same bytes.
    if !checked.signature_holds(root) {
        return FirstSight::Minted(Err(AuthError::Invalid));
    }
    // The root key signed a next key derived from this nonce: holding its secret is holding
    // the derived one. Any other secret is left to biscuit, which rejects it unless it is a
    // valid proof after all.
    if !proofs.proves(nonce, &checked.proof) {
        return FirstSight::Other;
    }
    let token_id = hex::encode(&checked.signed.signature);
    FirstSight::Minted(checked.context.into_claims(token_id, now))
}

/// A token of one signed block with a secret proof, decoded but not yet verified.
struct Unattenuated {
    signed: schema::SignedBlock,
    proof: Vec<u8>,
    context: MintedContext,
}

/// Biscuit encodes tokens as padded URL-safe base64. Other spellings of the same bytes (which
/// biscuit's decoder may take) go to biscuit.
const TOKEN_BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE;

impl Unattenuated {
    /// None for anything but one block signed with a version this path knows, an Ed25519 next
    /// key, a secret proof and a readable context.
    fn parse(token: &str) -> Option<Self> {
        let bytes = TOKEN_BASE64.decode(token).ok()?;
        let decoded = schema::Biscuit::decode(bytes.as_slice()).ok()?;
        // Bytes that re-encode to another length (unknown or repeated fields) spell a token in
        // a way biscuit never writes: left to biscuit.
        let plain = decoded.encoded_len() == bytes.len()
            && decoded.root_key_id.is_none()
            && decoded.blocks.is_empty()
            && decoded.authority.external_signature.is_none()
            && matches!(decoded.authority.version, None | Some(0 | 1))
            && decoded.authority.next_key.algorithm
                == schema::public_key::Algorithm::Ed25519 as i32
            && decoded.authority.next_key.key.len() == 32
            && decoded.authority.signature.len() == 64;
        if !plain {
            return None;
        }
        let signed = decoded.authority;
        let Some(schema::proof::Content::NextSecret(proof)) = decoded.proof.content else {
            return None;
        };
        let block = schema::Block::decode(signed.block.as_slice()).ok()?;
        let context = MintedContext::parse(block.context.as_deref()?)?;
        Some(Self {
            signed,
            proof,
            context,
        })
    }

    /// Checks the authority block's signature by the root key, over biscuit's signed payload
    /// for the block's version (`generate_authority_block_signature_payload_v0` / `_v1` in
    /// biscuit-auth 6).
    ///
    /// Biscuit checks with `verify_strict`, which also refuses a weak (small-order) public key
    /// and a small-order `R`. The root key is checked not to be weak once, when it is loaded, and
    /// then the two accept the same signatures: `[s]B = R + [k]A` puts `R` in the prime-order
    /// subgroup, whose only small-order point is the identity, and `R = 0` needs `s = k·a`, the
    /// root secret itself. `verify` skips the decompression of `R` (5.5 µs of ~41 µs here).
    fn signature_holds(&self, root: &ed25519_dalek::VerifyingKey) -> bool {
        let Ok(signature) = ed25519_dalek::Signature::from_slice(&self.signed.signature) else {
            return false;
        };
        let algorithm = self.signed.next_key.algorithm.to_le_bytes();
        let next_key = &self.signed.next_key.key;
        let data = &self.signed.block;
        let mut payload = Vec::with_capacity(data.len() + 80);
        match self.signed.version.unwrap_or(0) {
            0 => {
                payload.extend_from_slice(data);
                payload.extend_from_slice(&algorithm);
                payload.extend_from_slice(next_key);
            }
            version => {
                payload.extend_from_slice(b"\0BLOCK\0\0VERSION\0");
                payload.extend_from_slice(&version.to_le_bytes());
                payload.extend_from_slice(b"\0PAYLOAD\0");
                payload.extend_from_slice(data);
                payload.extend_from_slice(b"\0ALGORITHM\0");
                payload.extend_from_slice(&algorithm);
                payload.extend_from_slice(b"\0NEXTKEY\0");
                payload.extend_from_slice(next_key);
            }
        }
        ed25519_dalek::Verifier::verify(root, &payload, &signature).is_ok()
    }
}
