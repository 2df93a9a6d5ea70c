//! Accounts and what users and operators manage about identity over JSON:
//! `POST /v1/accounts` (sign-up), `POST /v1/sessions` (first-party login → token),
//! `GET /v1/me`, `GET /v1/me/apps` and `DELETE /v1/me/apps/{client}` (consents),
//! `POST /v1/me/key` (export the DID key after re-entering the password), and the admin API for
//! OAuth clients and ID-token signing keys.
//!
//! Invariant: consents and keys are managed with first-party tokens only (no `client`): an app
//! can neither read nor withdraw the user's other consents, nor export the user's key.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Request, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;

use super::oauth::account_error;
use super::{ApiError, HttpResponse, authorize_admin, json, read_json};
use crate::app::App;
use crate::auth::{Access, Claims, Scope};
use crate::identity::oauth::{Client, OAuthError};

const JSON: &[&str] = &["application/json"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    handle: String,
    password: String,
}

/// `POST /v1/accounts`: creates an account and its `did:key`.
pub(super) async fn sign_up(
    app: &App,
    from: IpAddr,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    if !app.config.identity.open_sign_up {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "sign_up_closed",
            "this server does not accept sign-ups",
        ));
    }
    let body: Credentials = read_json(app, req, JSON).await?;
    // Each sign-up costs a password hash: bounded per address like logins.
    app.identity
        .accounts
        .check_address(from)
        .map_err(account_error)?;
    let account = app
        .identity
        .accounts
        .sign_up(&body.handle, &body.password)
        .await
        .map_err(account_error)?;
    Ok(json(
        StatusCode::CREATED,
        &json!({"did": account.did, "handle": account.handle}),
    ))
}

/// `POST /v1/sessions`: a first-party token (scope `*`) for the account's own apps and tools.
pub(super) async fn sign_in(
    app: &App,
    from: IpAddr,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let body: Credentials = read_json(app, req, JSON).await?;
    let account = app
        .identity
        .accounts
        .login(&body.handle, &body.password, from)
        .await
        .map_err(account_error)?;
    // A token's expiry is whole seconds: the reply names the instant it really ends.
    let expires_at = SystemTime::UNIX_EPOCH
        + Duration::from_secs(
            (SystemTime::now() + app.config.identity.session_token_ttl)
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        );
    let token = app
        .tokens
        .mint_until(&account.did, &[Scope::All], expires_at)?;
    Ok(json(
        StatusCode::CREATED,
        &json!({
            "token": token,
            "did": account.did,
            "handle": account.handle,
            "expires_at": chrono::DateTime::<chrono::Utc>::from(expires_at),
        }),
    ))
}

/// `DELETE /v1/sessions`: signs out: the first-party token making the request stops working
/// on every node (and so do copies attenuated from it), and its live connections close. Only
/// the token itself, unattenuated, may end it: a holder of an attenuated copy (say, read-only,
/// handed to a tool) must not be able to end the token it was made from.
pub(super) async fn sign_out(app: &App, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let claims = first_party(app, &req)?;
    if app
        .tokens
        .is_attenuated(super::bearer_token(req.headers())?)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "token_restricted",
            "an attenuated token cannot end the session it was made from",
        ));
    }
    app.identity
        .oauth
        .revoke_access_token(
            &claims.token_id,
            chrono::DateTime::<chrono::Utc>::from(claims.expires_at),
            app.tokens.revocations(),
        )
        .await
        .map_err(oauth_error)?;
    Ok(super::empty(StatusCode::NO_CONTENT))
}

/// `GET /v1/me`: who the token speaks for, and for which app.
pub(super) async fn me(app: &App, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let claims = app.tokens.identify(super::bearer_token(req.headers())?)?;
    let handle = app
        .identity
        .accounts
        .by_did(&claims.subject)
        .await
        .ok()
        .map(|a| a.handle);
    Ok(json(
        StatusCode::OK,
        &json!({
            "did": claims.subject,
            "handle": handle,
            "client_id": claims.client,
            "scopes": claims.scopes.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "identity_scopes": claims.identity_scopes,
            "expires_at": chrono::DateTime::<chrono::Utc>::from(claims.expires_at),
        }),
    ))
}

/// The claims of a first-party token whose own checks allow managing the account (an
/// attenuated copy limited to some operations does not).
fn first_party(app: &App, req: &Request<Incoming>) -> Result<Arc<Claims>, ApiError> {
    let claims = app
        .tokens
        .verify(super::bearer_token(req.headers())?, Access::Account, None)?;
    if claims.client.is_some() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "first_party_only",
            "this needs a first-party token (POST /v1/sessions), not an app's token",
        ));
    }
    Ok(claims)
}

/// [`first_party`] with the scope `*`, as `POST /v1/sessions` gives: one the operator minted for
/// a tool with narrower scopes may not list or withdraw the user's consents, nor export the key
/// (it may still end itself, `DELETE /v1/sessions`).
fn account_owner(app: &App, req: &Request<Incoming>) -> Result<Arc<Claims>, ApiError> {
    let claims = first_party(app, req)?;
    if !claims.scopes.contains(&Scope::All) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "missing_scope",
            "managing the account needs a first-party token with the scope *",
        ));
    }
    Ok(claims)
}

/// `GET /v1/me/apps`: the apps the user consented to.
pub(super) async fn apps(app: &App, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let claims = account_owner(app, &req)?;
    let consents = app
        .identity
        .oauth
        .consents(&claims.subject)
        .await
        .map_err(oauth_error)?;
    Ok(json(StatusCode::OK, &json!({"apps": consents})))
}

/// `DELETE /v1/me/apps/{client}`: withdraws consent; the app's tokens stop working on every
/// node and its live connections for the user close.
pub(super) async fn revoke_app(
    app: &App,
    client_id: &str,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let claims = account_owner(app, &req)?;
    let revoked = app
        .identity
        .oauth
        .revoke_consent(&claims.subject, client_id, app.tokens.revocations())
        .await
        .map_err(oauth_error)?;
    if !revoked {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no consent for that app",
        ));
    }
    Ok(super::empty(StatusCode::NO_CONTENT))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Reauthentication {
    password: String,
}

/// `POST /v1/me/key`: the user's DID private key as a JWK, after the password is re-entered.
pub(super) async fn export_key(
    app: &App,
    from: IpAddr,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let claims = account_owner(app, &req)?;
    let body: Reauthentication = read_json(app, req, JSON).await?;
    let key = app
        .identity
        .accounts
        .export_key(&claims.subject, &body.password, from)
        .await
        .map_err(account_error)?;
    let mut response = json(StatusCode::OK, &key);
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    Ok(response)
}

/// `POST /v1/admin/clients`: registers an app (RFC 7591 metadata names); the secret is shown
/// once.
pub(super) async fn register_client(
    app: &App,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(app, req.headers())?;
    // The metadata, defaults and answer of `/oauth/register` (RFC 7591). Unlike that endpoint,
    // which must ignore metadata it does not know (§2), the operator's is strict: a mistyped
    // key (`scopes`) would otherwise register an app without what it meant to ask for, and ids
    // and secrets are the server's to assign.
    let body: serde_json::Map<String, serde_json::Value> = read_json(app, req, JSON).await?;
    // `client_name#fr` and the like: a language-tagged value of a listed name (RFC 7591 §2.2).
    let untagged = |key: &str| key.split_once('#').map_or(key, |(name, _)| name).to_owned();
    if let Some(key) = body
        .keys()
        .find(|k| !CLIENT_METADATA.contains(&untagged(k).as_str()))
    {
        return Err(ApiError::bad_request(
            "invalid_client_metadata",
            format!("`{key}` is not client metadata this server takes (RFC 7591 §2)"),
        ));
    }
    let body: super::oauth::RegistrationRequest =
        serde_path_to_error::deserialize(serde_json::Value::Object(body))
            .map_err(|e| ApiError::bad_request("invalid_body", super::at_path(&e)))?;
    let new = body.into_new_client().map_err(oauth_error)?;
    let registered = app
        .identity
        .oauth
        .register_client(new, crate::identity::oauth::Registrant::Operator)
        .await
        .map_err(oauth_error)?;
    Ok(json(
        StatusCode::CREATED,
        &registration(&registered.client, registered.secret),
    ))
}

/// The client metadata names of RFC 7591 §2, OpenID Connect Dynamic Client Registration §2 and
/// RP-Initiated Logout: what `POST /v1/admin/clients` takes (those this server does not use are
/// ignored, as at `/oauth/register`).
const CLIENT_METADATA: &[&str] = &[
    "redirect_uris",
    "token_endpoint_auth_method",
    "grant_types",
    "response_types",
    "client_name",
    "client_uri",
    "logo_uri",
    "scope",
    "contacts",
    "tos_uri",
    "policy_uri",
    "jwks_uri",
    "jwks",
    "software_id",
    "software_version",
    "software_statement",
    "application_type",
    "sector_identifier_uri",
    "subject_type",
    "id_token_signed_response_alg",
    "id_token_encrypted_response_alg",
    "id_token_encrypted_response_enc",
    "userinfo_signed_response_alg",
    "userinfo_encrypted_response_alg",
    "userinfo_encrypted_response_enc",
    "request_object_signing_alg",
    "request_object_encryption_alg",
    "request_object_encryption_enc",
    "token_endpoint_auth_signing_alg",
    "default_max_age",
    "require_auth_time",
    "default_acr_values",
    "initiate_login_uri",
    "request_uris",
    "post_logout_redirect_uris",
    "frontchannel_logout_uri",
    "frontchannel_logout_session_required",
    "backchannel_logout_uri",
    "backchannel_logout_session_required",
];

/// A registered client as RFC 7591 §3.2.1 answers it; the secret appears only here, and only
/// for a confidential client (a public one's answer has no `client_secret` members).
pub(super) fn registration(client: &Client, secret: Option<String>) -> serde_json::Value {
    let mut answer = json!({
        "client_id": client.client_id,
        "client_id_issued_at": client.created_at.timestamp(),
        "client_name": client.client_name,
        "redirect_uris": client.redirect_uris,
        "post_logout_redirect_uris": client.post_logout_redirect_uris,
        "scope": client.scopes.join(" "),
        "token_endpoint_auth_method": client.token_endpoint_auth_method,
        "grant_types": client.grant_types,
        "response_types": ["code"],
    });
    if let Some(secret) = secret {
        answer["client_secret"] = json!(secret);
        answer["client_secret_expires_at"] = json!(0);
    }
    answer
}

/// `GET /v1/admin/clients`.
pub(super) async fn list_clients(
    app: &App,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(app, req.headers())?;
    let clients = app.identity.oauth.clients().await.map_err(oauth_error)?;
    // Each in the shape registration answers it (without secrets, which are kept hashed).
    let clients: Vec<_> = clients.iter().map(|c| registration(c, None)).collect();
    Ok(json(StatusCode::OK, &json!({"clients": clients})))
}

/// `DELETE /v1/admin/clients/{client}`: removes an app and revokes every token issued to it.
pub(super) async fn delete_client(
    app: &App,
    client_id: &str,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(app, req.headers())?;
    let deleted = app
        .identity
        .oauth
        .delete_client(client_id, None, app.tokens.revocations())
        .await
        .map_err(oauth_error)?;
    if !deleted {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such client",
        ));
    }
    Ok(super::empty(StatusCode::NO_CONTENT))
}

/// `POST /v1/admin/signing-keys/rotate[?immediate=true]`: a new ID-token signing key, published
/// at once and signing after `identity.signing_key_lead` (or at once with `immediate`); the old
/// one signs until then and stays in the JWKS for `identity.signing_key_overlap` after.
pub(super) async fn rotate_signing_key(
    app: &App,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(app, req.headers())?;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Params {
        #[serde(default)]
        immediate: bool,
    }
    let params: Params = super::query_params(req.uri(), "invalid_query")?;
    let lead = if params.immediate {
        std::time::Duration::ZERO
    } else {
        app.config.identity.signing_key_lead
    };
    let rotated = app.identity.signing.rotate(lead, params.immediate).await;
    let (kid, signs_from) = rotated.map_err(|e| {
        tracing::error!(error = %e, "signing key rotation failed");
        ApiError::internal()
    })?;
    Ok(json(
        StatusCode::OK,
        &json!({"kid": kid, "signs_from": signs_from}),
    ))
}

fn oauth_error(e: OAuthError) -> ApiError {
    match e {
        OAuthError::Database(e) => {
            tracing::error!(error = %e, "identity database error");
            ApiError::internal()
        }
        e => ApiError::bad_request(e.code(), e.to_string()),
    }
}
