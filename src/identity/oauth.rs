//! The OAuth 2.0 / OpenID Connect provider's state in PostgreSQL: clients (apps and their scope
//! manifests), browser sessions, pending authorization requests (interactions), consents,
//! grants with their one-time codes, and rotating refresh tokens. Pure rules (redirect URI
//! matching, PKCE, scope sets) sit beside the queries so the HTTP edge only sequences them.
//!
//! Invariants: codes, refresh tokens, session ids and client secrets are stored as SHA-256
//! only and compared in constant time; a code redeems once; a replayed code or refresh token
//! revokes its whole grant; every query binds its values.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::revocation::{Revocations, Revoked};
use crate::auth::Scope;

/// Scopes of OpenID Connect itself; they grant no document access.
pub const IDENTITY_SCOPES: [&str; 3] = ["openid", "profile", "offline_access"];

/// The columns [`client_from_row`] reads, spliced into static SQL text with `concat!`.
macro_rules! client_columns {
    () => {
        "id, name, secret_hash, redirect_uris, post_logout_redirect_uris, scopes, auth_method, \
         created_at, registered_openly, grant_types"
    };
}

/// OAuth error responses (RFC 6749 §5.2, OIDC Core §3.1.2.6); `code()` is the wire value.
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("client authentication failed")]
    InvalidClient,
    #[error("{0}")]
    InvalidGrant(String),
    #[error("{0}")]
    InvalidScope(String),
    #[error("{0}")]
    UnsupportedGrantType(String),
    /// The client did not register the grant type it uses.
    #[error("{0}")]
    UnauthorizedClient(String),
    #[error("the user denied the request")]
    AccessDenied,
    #[error("the user is not signed in")]
    LoginRequired,
    #[error("the user has not consented to this request")]
    ConsentRequired,
    #[error("{0}")]
    InvalidClientMetadata(String),
    #[error("{0}")]
    InvalidRedirectUri(String),
    /// An unknown client or a wrong registration access token: RFC 7592 answers both with the
    /// same 401, so they are one error.
    #[error("the registration access token is not valid for this client")]
    InvalidToken,
    #[error(
        "the sign-in form expired or was not started in this browser; start again from the app"
    )]
    InteractionExpired,
    #[error("OAuth database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl OAuthError {
    pub fn code(&self) -> &'static str {
        match self {
            OAuthError::InvalidRequest(_) | OAuthError::InteractionExpired => "invalid_request",
            OAuthError::InvalidClient => "invalid_client",
            OAuthError::InvalidGrant(_) => "invalid_grant",
            OAuthError::InvalidScope(_) => "invalid_scope",
            OAuthError::UnsupportedGrantType(_) => "unsupported_grant_type",
            OAuthError::UnauthorizedClient(_) => "unauthorized_client",
            OAuthError::AccessDenied => "access_denied",
            OAuthError::LoginRequired => "login_required",
            OAuthError::ConsentRequired => "consent_required",
            OAuthError::InvalidClientMetadata(_) => "invalid_client_metadata",
            OAuthError::InvalidRedirectUri(_) => "invalid_redirect_uri",
            OAuthError::InvalidToken => "invalid_token",
            OAuthError::Database(_) => "server_error",
        }
    }
}

/// A registered app.
#[derive(Debug, Clone, Serialize)]
pub struct Client {
    pub client_id: String,
    pub client_name: String,
    #[serde(skip)]
    pub secret_hash: Option<Vec<u8>>,
    pub redirect_uris: Vec<String>,
    pub post_logout_redirect_uris: Vec<String>,
    /// The manifest: scopes the app may request.
    pub scopes: Vec<String>,
    /// As registered: `client_secret_basic`, `client_secret_post` or `none` (public). A
    /// confidential client may use either secret method at the token endpoint.
    pub token_endpoint_auth_method: String,
    pub created_at: DateTime<Utc>,
    /// Anyone registered it ([`Registrant::Anyone`]): its redirect URIs are not trusted until
    /// a user approves the app.
    #[serde(skip)]
    pub registered_openly: bool,
    /// [`GRANT_TYPES`] it registered: always `authorization_code`, and `refresh_token` if it
    /// may hold refresh tokens.
    pub grant_types: Vec<String>,
}

/// Who registered a client, which decides how it manages itself and what it is trusted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registrant {
    /// The operator, through the admin API: no registration access token.
    Operator,
    /// Dynamic registration with the operator's token (an RFC 7591 initial access token): the
    /// client manages itself with a registration access token.
    OperatorToken,
    /// Open dynamic registration: anyone, rate-limited per address. Manages itself too.
    Anyone,
}

impl Client {
    pub fn is_public(&self) -> bool {
        self.secret_hash.is_none()
    }

    /// Whether the client registered the `refresh_token` grant: only then does `offline_access`
    /// give it refresh tokens, and only then may it use them.
    pub fn may_refresh(&self) -> bool {
        self.grant_types.iter().any(|g| g == "refresh_token")
    }
}

/// The grant types a client may register. Without `grant_types`, a client registers
/// `authorization_code` alone (RFC 7591 §2).
pub const GRANT_TYPES: [&str; 2] = ["authorization_code", "refresh_token"];

/// Client metadata for registration (the RFC 7591 names), defaults applied (the HTTP edge reads
/// the request and fills them in).
#[derive(Debug, Clone)]
pub struct NewClient {
    pub client_name: String,
    pub redirect_uris: Vec<String>,
    pub post_logout_redirect_uris: Vec<String>,
    /// Space-separated manifest, e.g. `"openid profile read:posts write:posts"`.
    pub scope: String,
    /// `client_secret_basic` (default), `client_secret_post` or `none` (a public client).
    pub token_endpoint_auth_method: Option<String>,
    /// [`GRANT_TYPES`]; `["authorization_code"]` when absent, as RFC 7591 §2 says. An app that
    /// wants refresh tokens (the `offline_access` scope) registers `refresh_token` too.
    pub grant_types: Option<Vec<String>>,
}

/// A new registration and what it shows once: the client secret (a confidential client) and
/// the registration access token (a self-registered client, RFC 7592).
#[derive(Debug)]
pub struct Registered {
    pub client: Client,
    pub secret: Option<String>,
    pub registration_token: Option<String>,
}

/// Client metadata as checked for a registration or an update.
struct CheckedClient {
    name: String,
    scopes: Vec<String>,
    auth_method: String,
    public: bool,
    grant_types: Vec<String>,
}

fn check_client(new: &NewClient) -> Result<CheckedClient, OAuthError> {
    let name = new.client_name.trim();
    if name.is_empty() || name.len() > 128 {
        return Err(OAuthError::InvalidClientMetadata(
            "client_name is 1 to 128 characters".into(),
        ));
    }
    if new.redirect_uris.is_empty() || new.redirect_uris.len() > 16 {
        return Err(OAuthError::InvalidRedirectUri(
            "redirect_uris lists 1 to 16 URIs".into(),
        ));
    }
    for uri in new
        .redirect_uris
        .iter()
        .chain(&new.post_logout_redirect_uris)
    {
        if uri.len() > 2048 || !valid_redirect_uri(uri) {
            return Err(OAuthError::InvalidRedirectUri(format!(
                "{uri:?} is not an acceptable redirect URI (absolute, no fragment; http only to \
                 loopback)"
            )));
        }
    }
    let scopes = validate_manifest(&new.scope)?;
    let auth_method = new
        .token_endpoint_auth_method
        .as_deref()
        .unwrap_or("client_secret_basic");
    let public = match auth_method {
        "client_secret_basic" | "client_secret_post" => false,
        "none" => true,
        other => {
            return Err(OAuthError::InvalidClientMetadata(format!(
                "token_endpoint_auth_method {other:?} is not supported"
            )));
        }
    };
    let grant_types = match &new.grant_types {
        None => vec![GRANT_TYPES[0].to_owned()],
        Some(listed) => {
            if let Some(unknown) = listed.iter().find(|g| !GRANT_TYPES.contains(&g.as_str())) {
                return Err(OAuthError::InvalidClientMetadata(format!(
                    "grant_types {unknown:?} is not supported (supported: {})",
                    GRANT_TYPES.join(", ")
                )));
            }
            // Codes are the only way to a first token here, and response_types is `code`
            // (RFC 7591 §2.1: the two must agree).
            if !listed.iter().any(|g| g == GRANT_TYPES[0]) {
                return Err(OAuthError::InvalidClientMetadata(
                    "grant_types must include authorization_code".into(),
                ));
            }
            let mut listed = listed.clone();
            listed.sort();
            listed.dedup();
            listed
        }
    };
    Ok(CheckedClient {
        name: name.to_owned(),
        scopes,
        auth_method: auth_method.to_owned(),
        public,
        grant_types,
    })
}

/// An authorization request, validated, waiting for login and consent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthorizationRequest {
    pub client_id: String,
    pub redirect_uri: String,
    pub scopes: Vec<String>,
    pub state: Option<String>,
    pub nonce: Option<String>,
    pub code_challenge: Option<String>,
    /// `login`, `consent` or `none` (OIDC `prompt`).
    pub prompt: Option<String>,
    pub max_age: Option<u64>,
}

/// One pending interaction, loaded with its CSRF token checked.
#[derive(Debug, Clone)]
pub struct Interaction {
    pub id: Uuid,
    pub request: AuthorizationRequest,
    /// Set once the user logged in within this interaction.
    pub user: Option<(String, DateTime<Utc>)>,
}

/// A redeemed or refreshed grant: what the tokens to issue carry.
#[derive(Debug, Clone)]
pub struct Grant {
    pub id: Uuid,
    pub user_did: String,
    pub client_id: String,
    pub scopes: Vec<String>,
    pub nonce: Option<String>,
    pub auth_time: DateTime<Utc>,
}

/// An app a user consented to.
#[derive(Debug, Clone, Serialize)]
pub struct Consent {
    pub client_id: String,
    pub client_name: String,
    pub scopes: Vec<String>,
    pub granted_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What introspection learns of a refresh token.
#[derive(Debug, Clone)]
pub struct RefreshInfo {
    pub grant: Grant,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// Lifetimes of the provider's artefacts.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    pub code: Duration,
    pub interaction: Duration,
    pub session: Duration,
    /// A refresh token's lifetime: each rotation's successor gets it afresh...
    pub refresh_token: Duration,
    /// ...but never beyond this from the grant's authorization.
    pub refresh_token_absolute: Duration,
    pub access_token: Duration,
}

pub fn sha256(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// 32 random bytes, base64url: codes, refresh tokens, session ids, CSRF tokens, secrets.
pub fn random_secret() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

/// Does `verifier` (RFC 7636 S256) produce `challenge`?
pub fn pkce_matches(verifier: &str, challenge: &str) -> bool {
    let well_formed = (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
    let computed = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    well_formed && bool::from(computed.as_bytes().ct_eq(challenge.as_bytes()))
}

/// A redirect URI a client may register: absolute, no fragment; `http` only to loopback
/// (native apps, RFC 8252), otherwise `https` or a private-use scheme.
pub fn valid_redirect_uri(uri: &str) -> bool {
    let Ok(parsed) = url::Url::parse(uri) else {
        return false;
    };
    if parsed.fragment().is_some() || !parsed.username().is_empty() || parsed.password().is_some() {
        return false;
    }
    match parsed.scheme() {
        "https" => parsed.host().is_some(),
        "http" => matches!(parsed.host_str(), Some("127.0.0.1" | "[::1]" | "localhost")),
        // Private-use schemes are reverse domain names (RFC 8252 §7.1).
        scheme => scheme.contains('.'),
    }
}

/// Is `requested` one of the `registered` redirect URIs? Exactly, except that a loopback IP
/// redirect URI (`http://127.0.0.1` or `http://[::1]`) matches whatever port the request names:
/// a native app listens on a port the OS picks when it starts the sign-in (RFC 8252 §7.3). The
/// scheme, host, path and query still have to match; `localhost` gets no such leeway, as RFC
/// 8252 §8.3 advises against it (a name can resolve elsewhere).
pub fn redirect_uri_registered(registered: &[String], requested: &str) -> bool {
    if registered.iter().any(|uri| uri == requested) {
        return true;
    }
    let Some(requested) = loopback_ip_without_port(requested) else {
        return false;
    };
    registered
        .iter()
        .filter_map(|uri| loopback_ip_without_port(uri))
        .any(|uri| uri == requested)
}

/// A loopback IP `http` redirect URI with its port taken out, or None for any other URI.
fn loopback_ip_without_port(uri: &str) -> Option<url::Url> {
    let mut parsed = url::Url::parse(uri).ok()?;
    let loopback = match parsed.host()? {
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
        url::Host::Domain(_) => false,
    };
    if parsed.scheme() != "http" || !loopback || parsed.fragment().is_some() {
        return None;
    }
    // Cannot fail: an http URL with a host has a port to change.
    parsed.set_port(None).ok()?;
    Some(parsed)
}

/// Most scopes a client's manifest, or one request, may name: an app asks for its few types,
/// and every check of a request walks them.
pub const MAX_SCOPES: usize = 64;

/// Splits and checks a requested scope string against a manifest. Document scopes must be in
/// the manifest; identity scopes are always allowed.
pub fn requested_scopes(
    scope: Option<&str>,
    manifest: &[String],
) -> Result<Vec<String>, OAuthError> {
    let Some(scope) = scope.filter(|s| !s.trim().is_empty()) else {
        return Ok(manifest.to_vec());
    };
    let mut scopes: Vec<String> = Vec::new();
    for (i, s) in scope.split(' ').filter(|s| !s.is_empty()).enumerate() {
        if i >= MAX_SCOPES {
            return Err(OAuthError::InvalidScope(format!(
                "a request names at most {MAX_SCOPES} scopes"
            )));
        }
        if !IDENTITY_SCOPES.contains(&s) && !manifest.iter().any(|m| m == s) {
            return Err(OAuthError::InvalidScope(format!(
                "scope {s:?} is not in this app's manifest"
            )));
        }
        if !scopes.iter().any(|x| x == s) {
            scopes.push(s.to_owned());
        }
    }
    scopes.sort();
    Ok(scopes)
}

/// The document scopes among `scopes` (identity scopes left out).
pub fn document_scopes(scopes: &[String]) -> Vec<Scope> {
    scopes
        .iter()
        .filter(|s| !IDENTITY_SCOPES.contains(&s.as_str()))
        .filter_map(|s| s.parse().ok())
        .collect()
}

pub fn identity_scopes(scopes: &[String]) -> Vec<String> {
    scopes
        .iter()
        .filter(|s| IDENTITY_SCOPES.contains(&s.as_str()))
        .cloned()
        .collect()
}

fn validate_manifest(scope: &str) -> Result<Vec<String>, OAuthError> {
    let mut scopes = Vec::new();
    for (i, s) in scope.split(' ').filter(|s| !s.is_empty()).enumerate() {
        if i >= MAX_SCOPES {
            return Err(OAuthError::InvalidClientMetadata(format!(
                "a client names at most {MAX_SCOPES} scopes"
            )));
        }
        if IDENTITY_SCOPES.contains(&s) {
            scopes.push(s.to_owned());
            continue;
        }
        match s.parse::<Scope>() {
            // An app may ask for any type, but never for everything at once or administration.
            Ok(Scope::Read(_) | Scope::Write(_)) => scopes.push(s.to_owned()),
            _ => {
                return Err(OAuthError::InvalidClientMetadata(format!(
                    "scope {s:?} is not `read:<type>`, `write:<type>` or an OpenID scope"
                )));
            }
        }
    }
    scopes.sort();
    scopes.dedup();
    Ok(scopes)
}

fn as_ts(d: Duration) -> DateTime<Utc> {
    Utc::now() + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::days(3650))
}

/// Queries over the provider's tables.
#[derive(Debug, Clone)]
pub struct OAuthStore {
    pool: PgPool,
    pub lifetimes: Lifetimes,
}

impl OAuthStore {
    pub fn new(pool: PgPool, lifetimes: Lifetimes) -> Self {
        Self { pool, lifetimes }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Registers an app. `self_managed`: registered by the app itself (RFC 7591), which gets a
    /// registration access token to manage it (RFC 7592).
    pub async fn register_client(
        &self,
        new: NewClient,
        registrant: Registrant,
    ) -> Result<Registered, OAuthError> {
        let checked = check_client(&new)?;
        let secret = (!checked.public).then(random_secret);
        let registration_token = (registrant != Registrant::Operator).then(random_secret);
        let registered_openly = registrant == Registrant::Anyone;
        let id = Uuid::now_v7().simple().to_string();
        let row = sqlx::query(
            "INSERT INTO oauth_clients (id, name, secret_hash, redirect_uris, \
             post_logout_redirect_uris, scopes, auth_method, registration_token_hash, \
             registered_openly, grant_types) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING created_at",
        )
        .bind(&id)
        .bind(&checked.name)
        .bind(secret.as_deref().map(sha256))
        .bind(&new.redirect_uris)
        .bind(&new.post_logout_redirect_uris)
        .bind(&checked.scopes)
        .bind(&checked.auth_method)
        .bind(registration_token.as_deref().map(sha256))
        .bind(registered_openly)
        .bind(&checked.grant_types)
        .fetch_one(&self.pool)
        .await?;
        let client = Client {
            client_id: id,
            client_name: checked.name,
            secret_hash: secret.as_deref().map(sha256),
            redirect_uris: new.redirect_uris,
            post_logout_redirect_uris: new.post_logout_redirect_uris,
            scopes: checked.scopes,
            token_endpoint_auth_method: checked.auth_method,
            created_at: row.try_get("created_at")?,
            registered_openly,
            grant_types: checked.grant_types,
        };
        Ok(Registered {
            client,
            secret,
            registration_token,
        })
    }

    /// The self-registered client `id`, if `token` is its registration access token, with a new
    /// token that replaces it (RFC 7592 §2.1). The swap is one statement, so of two reads with
    /// the same token one succeeds.
    pub async fn read_registration(
        &self,
        id: &str,
        token: &str,
    ) -> Result<(Client, String), OAuthError> {
        let next = random_secret();
        let row = sqlx::query(concat!(
            "UPDATE oauth_clients SET registration_token_hash = $3 \
             WHERE id = $1 AND registration_token_hash = $2 RETURNING ",
            client_columns!()
        ))
        .bind(id)
        .bind(sha256(token))
        .bind(sha256(&next))
        .fetch_optional(&self.pool)
        .await?
        .ok_or(OAuthError::InvalidToken)?;
        Ok((client_from_row(&row)?, next))
    }

    /// Replaces the metadata of the self-registered client `id` (RFC 7592 §2.2) and its
    /// registration access token. `secret`, if the request carried one, must be the client's.
    /// A client cannot turn public or confidential (its secret would appear or vanish); a
    /// manifest that no longer covers the old one ends the app's grants, so no token outlives
    /// the scopes the app may ask for.
    pub async fn update_registration(
        &self,
        id: &str,
        token: &str,
        secret: Option<&str>,
        new: NewClient,
        revocations: &Revocations,
    ) -> Result<(Client, String), OAuthError> {
        let checked = check_client(&new)?;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(concat!(
            "SELECT ",
            client_columns!(),
            " FROM oauth_clients WHERE id = $1 AND registration_token_hash = $2 FOR UPDATE"
        ))
        .bind(id)
        .bind(sha256(token))
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(OAuthError::InvalidToken)?;
        let current = client_from_row(&row)?;
        if let Some(given) = secret {
            let matches = current
                .secret_hash
                .as_ref()
                .is_some_and(|stored| bool::from(stored.ct_eq(&sha256(given))));
            if !matches {
                return Err(OAuthError::InvalidClientMetadata(
                    "client_secret is not this client's secret".into(),
                ));
            }
        }
        if current.is_public() != checked.public {
            return Err(OAuthError::InvalidClientMetadata(
                "token_endpoint_auth_method cannot turn a public client confidential or the \
                 other way round; register a new client"
                    .into(),
            ));
        }
        let narrowed = !current.scopes.iter().all(|s| checked.scopes.contains(s));
        if narrowed {
            self.revoke_grants_of(&mut tx, id).await?;
        }
        let next = random_secret();
        sqlx::query(
            "UPDATE oauth_clients SET name = $2, redirect_uris = $3, \
             post_logout_redirect_uris = $4, scopes = $5, auth_method = $6, \
             registration_token_hash = $7, grant_types = $8 WHERE id = $1",
        )
        .bind(id)
        .bind(&checked.name)
        .bind(&new.redirect_uris)
        .bind(&new.post_logout_redirect_uris)
        .bind(&checked.scopes)
        .bind(&checked.auth_method)
        .bind(sha256(&next))
        .bind(&checked.grant_types)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if narrowed {
            revocations.sync(&self.pool).await?;
        }
        let client = Client {
            client_name: checked.name,
            redirect_uris: new.redirect_uris,
            post_logout_redirect_uris: new.post_logout_redirect_uris,
            scopes: checked.scopes,
            token_endpoint_auth_method: checked.auth_method,
            grant_types: checked.grant_types,
            ..current
        };
        Ok((client, next))
    }

    pub async fn client(&self, id: &str) -> Result<Option<Client>, OAuthError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            client_columns!(),
            " FROM oauth_clients WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| client_from_row(&r)).transpose()
    }

    pub async fn clients(&self) -> Result<Vec<Client>, OAuthError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            client_columns!(),
            " FROM oauth_clients ORDER BY created_at"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(client_from_row).collect()
    }

    /// Deletes an app with its consents and grants, revoking every token issued to it.
    /// `registration_token`: the self-registered client's own request (RFC 7592 §2.3), which
    /// must carry its registration access token; `None`: an operator's.
    pub async fn delete_client(
        &self,
        id: &str,
        registration_token: Option<&str>,
        revocations: &Revocations,
    ) -> Result<bool, OAuthError> {
        let mut tx = self.pool.begin().await?;
        // Locks the row first, so grants issued meanwhile wait and then find no client.
        let found: Option<(String,)> = sqlx::query_as(
            "SELECT id FROM oauth_clients \
             WHERE id = $1 AND ($2::bytea IS NULL OR registration_token_hash = $2) FOR UPDATE",
        )
        .bind(id)
        .bind(registration_token.map(sha256))
        .fetch_optional(&mut *tx)
        .await?;
        if found.is_none() {
            return Ok(false);
        }
        self.revoke_grants_of(&mut tx, id).await?;
        sqlx::query("DELETE FROM oauth_clients WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        revocations.sync(&self.pool).await?;
        Ok(true)
    }

    /// Revokes every live grant of client `id`, and so every token issued from them; the caller
    /// commits and then syncs the node's revocation list.
    async fn revoke_grants_of(
        &self,
        tx: &mut sqlx::PgConnection,
        id: &str,
    ) -> Result<(), OAuthError> {
        let grants: Vec<(Uuid, Option<DateTime<Utc>>)> = sqlx::query_as(
            "UPDATE oauth_grants SET revoked_at = now() \
             WHERE client_id = $1 AND revoked_at IS NULL RETURNING id, access_expires_at",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        let horizon = self.revocation_horizon(&grants);
        let revoked: Vec<Revoked> = grants.into_iter().map(|(g, _)| Revoked::Grant(g)).collect();
        Revocations::record(tx, &revoked, horizon).await?;
        Ok(())
    }

    /// The client whose credentials these are. A public client presents none; a confidential
    /// one must present its secret.
    pub async fn authenticate_client(
        &self,
        id: &str,
        secret: Option<&str>,
    ) -> Result<Client, OAuthError> {
        let client = self.client(id).await?.ok_or(OAuthError::InvalidClient)?;
        match (&client.secret_hash, secret) {
            (None, None) => Ok(client),
            (Some(stored), Some(given)) if bool::from(stored.ct_eq(&sha256(given))) => Ok(client),
            _ => Err(OAuthError::InvalidClient),
        }
    }

    /// Stores a validated request; returns its id and the CSRF token its forms carry.
    pub async fn create_interaction(
        &self,
        request: &AuthorizationRequest,
    ) -> Result<(Uuid, String), OAuthError> {
        let id = Uuid::new_v4();
        let csrf = random_secret();
        sqlx::query(
            "INSERT INTO oauth_interactions (id, csrf_hash, client_id, request, expires_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(sha256(&csrf))
        .bind(&request.client_id)
        .bind(sqlx::types::Json(request))
        .bind(as_ts(self.lifetimes.interaction))
        .execute(&self.pool)
        .await?;
        // Expired ones go with each new one: no separate sweeper needed.
        sqlx::query("DELETE FROM oauth_interactions WHERE expires_at < now()")
            .execute(&self.pool)
            .await?;
        Ok((id, csrf))
    }

    /// The interaction `id`, if unexpired and `csrf` is its token.
    pub async fn interaction(&self, id: Uuid, csrf: &str) -> Result<Interaction, OAuthError> {
        let row = sqlx::query(
            "SELECT csrf_hash, request, user_did, auth_time FROM oauth_interactions \
             WHERE id = $1 AND expires_at > now()",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(OAuthError::InteractionExpired)?;
        let stored: Vec<u8> = row.try_get("csrf_hash")?;
        if !bool::from(stored.ct_eq(&sha256(csrf))) {
            return Err(OAuthError::InteractionExpired);
        }
        let sqlx::types::Json(request): sqlx::types::Json<AuthorizationRequest> =
            row.try_get("request")?;
        let user: Option<String> = row.try_get("user_did")?;
        let auth_time: Option<DateTime<Utc>> = row.try_get("auth_time")?;
        Ok(Interaction {
            id,
            request,
            user: user.zip(auth_time),
        })
    }

    pub async fn set_interaction_user(
        &self,
        id: Uuid,
        did: &str,
        auth_time: DateTime<Utc>,
    ) -> Result<(), OAuthError> {
        sqlx::query("UPDATE oauth_interactions SET user_did = $2, auth_time = $3 WHERE id = $1")
            .bind(id)
            .bind(did)
            .bind(auth_time)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Ends an interaction; false if it had already ended (a form posted twice, at once or
    /// again): only the first may go on to issue a code.
    pub async fn finish_interaction(&self, id: Uuid) -> Result<bool, OAuthError> {
        let deleted = sqlx::query("DELETE FROM oauth_interactions WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(deleted.rows_affected() == 1)
    }

    /// Starts a browser session; returns the cookie value.
    pub async fn create_session(&self, did: &str) -> Result<(String, DateTime<Utc>), OAuthError> {
        let id = random_secret();
        let row = sqlx::query(
            "INSERT INTO user_sessions (id_hash, user_did, expires_at) VALUES ($1, $2, $3) \
             RETURNING auth_time",
        )
        .bind(sha256(&id))
        .bind(did)
        .bind(as_ts(self.lifetimes.session))
        .fetch_one(&self.pool)
        .await?;
        sqlx::query("DELETE FROM user_sessions WHERE expires_at < now()")
            .execute(&self.pool)
            .await?;
        Ok((id, row.try_get("auth_time")?))
    }

    /// The signed-in user and their login time, for a session cookie value.
    pub async fn session(&self, id: &str) -> Result<Option<(String, DateTime<Utc>)>, OAuthError> {
        Ok(sqlx::query_as(
            "SELECT user_did, auth_time FROM user_sessions WHERE id_hash = $1 AND expires_at > now()",
        )
        .bind(sha256(id))
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn end_session(&self, id: &str) -> Result<(), OAuthError> {
        sqlx::query("DELETE FROM user_sessions WHERE id_hash = $1")
            .bind(sha256(id))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Has the user already consented to every scope in `scopes` for this app?
    pub async fn consent_covers(
        &self,
        did: &str,
        client_id: &str,
        scopes: &[String],
    ) -> Result<bool, OAuthError> {
        let granted: Option<(Vec<String>,)> =
            sqlx::query_as("SELECT scopes FROM consents WHERE user_did = $1 AND client_id = $2")
                .bind(did)
                .bind(client_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(granted.is_some_and(|(g,)| scopes.iter().all(|s| g.contains(s))))
    }

    /// Records consent to `scopes` (added to what was consented before).
    pub async fn save_consent(
        &self,
        did: &str,
        client_id: &str,
        scopes: &[String],
    ) -> Result<(), OAuthError> {
        sqlx::query(
            "INSERT INTO consents (user_did, client_id, scopes) VALUES ($1, $2, $3) \
             ON CONFLICT (user_did, client_id) DO UPDATE SET \
               scopes = ARRAY(SELECT DISTINCT unnest(consents.scopes || EXCLUDED.scopes) ORDER BY 1), \
               updated_at = now()",
        )
        .bind(did)
        .bind(client_id)
        .bind(scopes)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn consents(&self, did: &str) -> Result<Vec<Consent>, OAuthError> {
        let rows = sqlx::query(
            "SELECT c.client_id, o.name, c.scopes, c.created_at, c.updated_at \
             FROM consents c JOIN oauth_clients o ON o.id = c.client_id \
             WHERE c.user_did = $1 ORDER BY c.created_at",
        )
        .bind(did)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Consent {
                    client_id: r.try_get("client_id")?,
                    client_name: r.try_get("name")?,
                    scopes: r.try_get("scopes")?,
                    granted_at: r.try_get("created_at")?,
                    updated_at: r.try_get("updated_at")?,
                })
            })
            .collect()
    }

    /// Withdraws consent: deletes it and revokes every grant of the app for the user (their
    /// access tokens stop verifying on every node, their refresh tokens stop refreshing).
    pub async fn revoke_consent(
        &self,
        did: &str,
        client_id: &str,
        revocations: &Revocations,
    ) -> Result<bool, OAuthError> {
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query("DELETE FROM consents WHERE user_did = $1 AND client_id = $2")
            .bind(did)
            .bind(client_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let grants: Vec<(Uuid, Option<DateTime<Utc>>)> = sqlx::query_as(
            "UPDATE oauth_grants SET revoked_at = now() \
             WHERE user_did = $1 AND client_id = $2 AND revoked_at IS NULL \
             RETURNING id, access_expires_at",
        )
        .bind(did)
        .bind(client_id)
        .fetch_all(&mut *tx)
        .await?;
        let horizon = self.revocation_horizon(&grants);
        let revoked: Vec<Revoked> = grants.into_iter().map(|(g, _)| Revoked::Grant(g)).collect();
        Revocations::record(&mut tx, &revoked, horizon).await?;
        tx.commit().await?;
        revocations.sync(&self.pool).await?;
        Ok(deleted > 0 || !revoked.is_empty())
    }

    /// Creates the grant for an approved request; returns its one-time code. The grant is only
    /// written while the user's consent covers its scopes, in one statement that locks that
    /// consent (`FOR SHARE`): a withdrawal running at the same time either commits first (no
    /// grant is written: `AccessDenied`) or waits for this grant, then revokes it with the
    /// others. A check made earlier and a plain insert would let a silent sign-in
    /// (`prompt=none`) create a grant the withdrawal never saw. The app's manifest is checked
    /// the same way: a request checked against it when the login page opened may have outlived
    /// a narrowing of it (which revokes grants under the client's row lock).
    pub async fn issue_code(
        &self,
        request: &AuthorizationRequest,
        did: &str,
        auth_time: DateTime<Utc>,
    ) -> Result<String, OAuthError> {
        let code = random_secret();
        let document_scopes: Vec<&str> = request
            .scopes
            .iter()
            .map(String::as_str)
            .filter(|s| !IDENTITY_SCOPES.contains(s))
            .collect();
        let written = sqlx::query(
            "INSERT INTO oauth_grants (id, user_did, client_id, scopes, nonce, auth_time, \
             code_hash, code_challenge, redirect_uri, code_expires_at) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 \
             WHERE EXISTS (SELECT 1 FROM consents \
               WHERE user_did = $2 AND client_id = $3 AND scopes @> $4::text[] FOR SHARE) \
             AND EXISTS (SELECT 1 FROM oauth_clients \
               WHERE id = $3 AND scopes @> $11::text[] FOR SHARE)",
        )
        .bind(Uuid::now_v7())
        .bind(did)
        .bind(&request.client_id)
        .bind(&request.scopes)
        .bind(&request.nonce)
        .bind(auth_time)
        .bind(sha256(&code))
        .bind(&request.code_challenge)
        .bind(&request.redirect_uri)
        .bind(as_ts(self.lifetimes.code))
        .bind(&document_scopes)
        .execute(&self.pool)
        .await?;
        if written.rows_affected() == 0 {
            return Err(OAuthError::AccessDenied);
        }
        Ok(code)
    }

    /// Redeems a code once (RFC 6749 §4.1.3 with PKCE, RFC 7636 §4.6). A second redemption is
    /// a replay: the grant and every token issued from it are revoked (RFC 6749 §4.1.2).
    /// Returns the grant and, when `offline_access` was granted to a client that registered
    /// `refresh_token`, a first refresh token.
    pub async fn redeem_code(
        &self,
        code: &str,
        client: &Client,
        redirect_uri: Option<&str>,
        verifier: Option<&str>,
        revocations: &Revocations,
    ) -> Result<(Grant, Option<String>), OAuthError> {
        let invalid = |m: &str| OAuthError::InvalidGrant(m.to_owned());
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT id, user_did, client_id, scopes, nonce, auth_time, code_challenge, \
             redirect_uri, code_expires_at < now() AS expired, code_used_at IS NOT NULL AS used, \
             revoked_at IS NOT NULL AS revoked \
             FROM oauth_grants WHERE code_hash = $1 FOR UPDATE",
        )
        .bind(sha256(code))
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| invalid("the code is unknown"))?;
        let grant = grant_from_row(&row)?;
        if grant.client_id != client.client_id {
            return Err(invalid("the code was issued to another client"));
        }
        if row.try_get::<bool, _>("used")? {
            if !row.try_get::<bool, _>("revoked")? {
                self.revoke_grant_in(&mut tx, grant.id).await?;
                tx.commit().await?;
                revocations.sync(&self.pool).await?;
                tracing::warn!(client = %client.client_id, grant = %grant.id,
                    "authorization code replayed; its grant is revoked");
            }
            return Err(invalid("the code was already used"));
        }
        // Consent withdrawn (or the grant otherwise revoked) between issue and redemption.
        if row.try_get::<bool, _>("revoked")? {
            return Err(invalid("the grant has been revoked"));
        }
        if row.try_get::<bool, _>("expired")? {
            return Err(invalid("the code has expired"));
        }
        let registered: String = row.try_get("redirect_uri")?;
        if redirect_uri != Some(registered.as_str()) {
            return Err(invalid(
                "redirect_uri differs from the one in the authorization request",
            ));
        }
        let challenge: Option<String> = row.try_get("code_challenge")?;
        match (challenge.as_deref(), verifier) {
            (Some(c), Some(v)) if pkce_matches(v, c) => {}
            (Some(_), _) => return Err(invalid("code_verifier does not match code_challenge")),
            (None, Some(_)) => {
                return Err(invalid(
                    "code_verifier sent, but the authorization request had no code_challenge",
                ));
            }
            (None, None) if client.is_public() => {
                return Err(invalid("a public client must use PKCE"));
            }
            (None, None) => {}
        }
        sqlx::query("UPDATE oauth_grants SET code_used_at = now() WHERE id = $1")
            .bind(grant.id)
            .execute(&mut *tx)
            .await?;
        self.note_access_token(&mut tx, grant.id).await?;
        // The client is read at redemption, so a registration that dropped `refresh_token`
        // since the authorization request is honoured.
        let refresh = if client.may_refresh() && grant.scopes.iter().any(|s| s == "offline_access")
        {
            Some(self.insert_refresh(&mut tx, grant.id).await?)
        } else {
            None
        };
        tx.commit().await?;
        Ok((grant, refresh))
    }

    async fn insert_refresh(
        &self,
        tx: &mut sqlx::PgConnection,
        grant: Uuid,
    ) -> Result<String, OAuthError> {
        let token = random_secret();
        sqlx::query(
            "INSERT INTO oauth_refresh_tokens (token_hash, grant_id, expires_at) \
             SELECT $1, id, LEAST($3, created_at + make_interval(secs => $4)) \
             FROM oauth_grants WHERE id = $2",
        )
        .bind(sha256(&token))
        .bind(grant)
        .bind(as_ts(self.lifetimes.refresh_token))
        .bind(self.lifetimes.refresh_token_absolute.as_secs_f64())
        .execute(tx)
        .await?;
        Ok(token)
    }

    /// Exchanges a refresh token for its successor (rotation). Presenting a used one again is
    /// a replay: the whole grant is revoked (RFC 9700 §4.14.2).
    pub async fn rotate_refresh(
        &self,
        token: &str,
        client: &Client,
        revocations: &Revocations,
        narrow: impl FnOnce(&mut Grant) -> Result<(), OAuthError>,
    ) -> Result<(Grant, String), OAuthError> {
        // A client whose registration no longer lists the grant keeps no way to use the refresh
        // tokens it still holds (RFC 6749 §5.2).
        if !client.may_refresh() {
            return Err(OAuthError::UnauthorizedClient(
                "this client did not register the refresh_token grant".into(),
            ));
        }
        let invalid = |m: &str| OAuthError::InvalidGrant(m.to_owned());
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT g.id, g.user_did, g.client_id, g.scopes, g.nonce, g.auth_time, \
             r.used_at IS NOT NULL AS used, r.expires_at < now() AS expired, \
             g.revoked_at IS NOT NULL AS revoked \
             FROM oauth_refresh_tokens r JOIN oauth_grants g ON g.id = r.grant_id \
             WHERE r.token_hash = $1 FOR UPDATE OF r, g",
        )
        .bind(sha256(token))
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| invalid("the refresh token is unknown"))?;
        let mut grant = grant_from_row(&row)?;
        if grant.client_id != client.client_id {
            return Err(invalid("the refresh token was issued to another client"));
        }
        if row.try_get::<bool, _>("revoked")? {
            return Err(invalid("the refresh token has been revoked"));
        }
        if row.try_get::<bool, _>("used")? {
            self.revoke_grant_in(&mut tx, grant.id).await?;
            tx.commit().await?;
            revocations.sync(&self.pool).await?;
            tracing::warn!(client = %client.client_id, grant = %grant.id,
                "refresh token replayed; its grant is revoked");
            return Err(invalid(
                "the refresh token was already used; its grant is revoked",
            ));
        }
        if row.try_get::<bool, _>("expired")? {
            return Err(invalid("the refresh token has expired"));
        }
        // Before the token is used up: a request refused here leaves it as it was (a client
        // that retried with it would otherwise look like a replay and lose the grant).
        narrow(&mut grant)?;
        sqlx::query("UPDATE oauth_refresh_tokens SET used_at = now() WHERE token_hash = $1")
            .bind(sha256(token))
            .execute(&mut *tx)
            .await?;
        let next = self.insert_refresh(&mut tx, grant.id).await?;
        self.note_access_token(&mut tx, grant.id).await?;
        tx.commit().await?;
        Ok((grant, next))
    }

    /// A refresh token's grant, if the token is live (unused, unexpired, grant not revoked).
    pub async fn live_refresh(&self, token: &str) -> Result<Option<RefreshInfo>, OAuthError> {
        let row = sqlx::query(
            "SELECT g.id, g.user_did, g.client_id, g.scopes, g.nonce, g.auth_time, \
             r.created_at AS issued, r.expires_at \
             FROM oauth_refresh_tokens r JOIN oauth_grants g ON g.id = r.grant_id \
             WHERE r.token_hash = $1 AND r.used_at IS NULL AND r.expires_at > now() \
             AND g.revoked_at IS NULL",
        )
        .bind(sha256(token))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(RefreshInfo {
                grant: grant_from_row(&r)?,
                expires_at: r.try_get("expires_at")?,
                created_at: r.try_get("issued")?,
            })
        })
        .transpose()
    }

    /// Revokes a grant (every access and refresh token of it).
    pub async fn revoke_grant(
        &self,
        grant: Uuid,
        revocations: &Revocations,
    ) -> Result<(), OAuthError> {
        let mut tx = self.pool.begin().await?;
        self.revoke_grant_in(&mut tx, grant).await?;
        tx.commit().await?;
        revocations.sync(&self.pool).await?;
        Ok(())
    }

    /// Revokes one access token (and its attenuations) until it would expire anyway.
    pub async fn revoke_access_token(
        &self,
        token_id: &str,
        expires_at: DateTime<Utc>,
        revocations: &Revocations,
    ) -> Result<(), OAuthError> {
        // Past its expiry by a margin: a node whose clock is behind the database's still
        // accepts it a little longer, and the list is read by the database's clock.
        let kept_until = expires_at + chrono::Duration::seconds(60);
        let mut tx = self.pool.begin().await?;
        Revocations::record(&mut tx, &[Revoked::Token(token_id.to_owned())], kept_until).await?;
        tx.commit().await?;
        revocations.sync(&self.pool).await?;
        Ok(())
    }

    async fn revoke_grant_in(
        &self,
        tx: &mut sqlx::PgConnection,
        grant: Uuid,
    ) -> Result<(), OAuthError> {
        // Its latest access expiry whether or not it was revoked already (a second revocation
        // keeps the list's entry as long as the first).
        let expires: Option<Option<DateTime<Utc>>> = sqlx::query_scalar(
            "UPDATE oauth_grants SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 \
             RETURNING access_expires_at",
        )
        .bind(grant)
        .fetch_optional(&mut *tx)
        .await?;
        let horizon = self.revocation_horizon(&[(grant, expires.flatten())]);
        Revocations::record(tx, &[Revoked::Grant(grant)], horizon).await?;
        Ok(())
    }

    /// Records, in the transaction that redeems a code or rotates a refresh token of `grant`
    /// (its row locked, not revoked), that an access token of this node's lifetime is about to
    /// be handed out: a revocation of the grant is kept until the latest such expiry on every
    /// node, whatever lifetime the node minting it has. In that transaction, not after it: a
    /// failure here must leave the code or refresh token unused (a retry would look like a
    /// replay and cost the grant).
    async fn note_access_token(
        &self,
        tx: &mut sqlx::PgConnection,
        grant: Uuid,
    ) -> Result<(), OAuthError> {
        sqlx::query(
            "UPDATE oauth_grants \
             SET access_expires_at = greatest(coalesce(access_expires_at, $2), $2) \
             WHERE id = $1",
        )
        .bind(grant)
        .bind(as_ts(self.lifetimes.access_token))
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Until when the revocation of `grants` (with their latest access-token expiries) must be
    /// kept: past the last expiry of any of their access tokens, with a margin for the clocks
    /// of the nodes checking them (refresh tokens stop with the grant's `revoked_at` in the
    /// database). A grant with no expiry recorded (its tokens came before the record existed)
    /// is assumed to have tokens of this node's lifetime, issued now — as is every grant, at
    /// least.
    fn revocation_horizon(&self, grants: &[(Uuid, Option<DateTime<Utc>>)]) -> DateTime<Utc> {
        const CLOCK_MARGIN: chrono::Duration = chrono::Duration::seconds(60);
        // Never less than this node's own lifetime from now: a node of the previous version
        // (during a rolling upgrade) mints without recording.
        let assumed = as_ts(self.lifetimes.access_token);
        let latest = grants
            .iter()
            .filter_map(|(_, expires)| *expires)
            .max()
            .map_or(assumed, |recorded| recorded.max(assumed));
        latest + CLOCK_MARGIN
    }
}

fn client_from_row(r: &sqlx::postgres::PgRow) -> Result<Client, OAuthError> {
    Ok(Client {
        client_id: r.try_get("id")?,
        client_name: r.try_get("name")?,
        secret_hash: r.try_get("secret_hash")?,
        redirect_uris: r.try_get("redirect_uris")?,
        post_logout_redirect_uris: r.try_get("post_logout_redirect_uris")?,
        scopes: r.try_get("scopes")?,
        token_endpoint_auth_method: r.try_get("auth_method")?,
        created_at: r.try_get("created_at")?,
        registered_openly: r.try_get("registered_openly")?,
        grant_types: r.try_get("grant_types")?,
    })
}

fn grant_from_row(r: &sqlx::postgres::PgRow) -> Result<Grant, OAuthError> {
    Ok(Grant {
        id: r.try_get("id")?,
        user_did: r.try_get("user_did")?,
        client_id: r.try_get("client_id")?,
        scopes: r.try_get("scopes")?,
        nonce: r.try_get("nonce")?,
        auth_time: r.try_get("auth_time")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_vector() {
        // RFC 7636 appendix B.
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        assert!(pkce_matches(verifier, challenge));
        assert!(!pkce_matches(
            verifier,
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cN"
        ));
        assert!(!pkce_matches("short", challenge));
    }

    #[test]
    fn redirect_uris() {
        for ok in [
            "https://app.example/cb",
            "http://127.0.0.1:8080/cb",
            "http://localhost/cb",
            "com.example.app:/cb",
        ] {
            assert!(valid_redirect_uri(ok), "{ok}");
        }
        for bad in [
            "http://app.example/cb",
            "https://app.example/cb#frag",
            "/relative",
            "javascript:alert(1)",
            "",
        ] {
            assert!(!valid_redirect_uri(bad), "{bad}");
        }
    }

    #[test]
    fn loopback_redirect_uris_match_any_port() {
        let registered = vec![
            "http://127.0.0.1:9/cb".to_owned(),
            "http://[::1]/native?app=1".to_owned(),
            "http://localhost:9/cb".to_owned(),
            "https://app.example/cb".to_owned(),
        ];
        for ok in [
            "http://127.0.0.1:9/cb",
            "http://127.0.0.1:51234/cb",
            "http://127.0.0.1/cb",
            "http://[::1]:4000/native?app=1",
            "http://localhost:9/cb",
            "https://app.example/cb",
        ] {
            assert!(redirect_uri_registered(&registered, ok), "{ok}");
        }
        for bad in [
            "http://127.0.0.1:51234/cb/other",
            "http://127.0.0.1:51234/cb?x=1",
            "http://127.0.0.2:9/cb",
            "http://[::1]:4000/native",
            "http://localhost:51234/cb",
            "https://127.0.0.1:9/cb",
            "https://app.example:8443/cb",
            "http://127.0.0.1:51234/cb#x",
        ] {
            assert!(!redirect_uri_registered(&registered, bad), "{bad}");
        }
    }

    #[test]
    fn scopes_against_a_manifest() {
        let manifest = vec!["read:posts".to_owned(), "write:posts".to_owned()];
        assert_eq!(
            requested_scopes(Some("openid read:posts read:posts"), &manifest).unwrap(),
            vec!["openid", "read:posts"]
        );
        assert_eq!(requested_scopes(None, &manifest).unwrap(), manifest);
        assert!(requested_scopes(Some("read:notes"), &manifest).is_err());
        assert!(validate_manifest("openid read:posts").is_ok());
        assert!(validate_manifest("*").is_err());
        assert!(validate_manifest("admin").is_err());
        // At most MAX_SCOPES names, in a manifest and in a request.
        let names = |n: usize| {
            (0..n)
                .map(|i| format!("read:t{i}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            validate_manifest(&names(MAX_SCOPES)).unwrap().len(),
            MAX_SCOPES
        );
        assert!(validate_manifest(&names(MAX_SCOPES + 1)).is_err());
        let wide = validate_manifest(&names(MAX_SCOPES)).unwrap();
        assert!(requested_scopes(Some(&names(MAX_SCOPES)), &wide).is_ok());
        let repeated = vec!["read:t0"; MAX_SCOPES + 1].join(" ");
        assert!(requested_scopes(Some(&repeated), &wide).is_err());
    }
}
