//! The OpenID Connect provider's endpoints: discovery, JWKS, the authorization endpoint with
//! its server-rendered login and consent pages, token (authorization code with PKCE, refresh
//! with rotation), userinfo, revocation (RFC 7009), introspection (RFC 7662), end-session and
//! dynamic client registration (RFC 7591).
//!
//! Follows the OAuth 2.0 Security BCP (RFC 9700): exact redirect URI matching, PKCE S256 (plain
//! refused; required for public clients), one-time short-lived codes, refresh token rotation with
//! replay detection, no implicit or hybrid flow, `iss` in authorization responses (RFC 9207).
//! Errors before the client and redirect URI are known are shown to the user, never redirected.
//! The pages work without JavaScript; their forms carry a CSRF token bound to a SameSite cookie.

use std::net::IpAddr;
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use cookie::{Cookie, SameSite};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq as _;
use uuid::Uuid;

use super::{ApiError, HttpResponse, read_body};
use crate::app::App;
use crate::auth::{Access, AuthError, Claims, Issued, Scope};
use crate::identity::accounts::AccountError;
use crate::identity::oauth::{
    AuthorizationRequest, Client, Grant, NewClient, OAuthError, Registered, Registrant,
    document_scopes, identity_scopes, redirect_uri_registered, requested_scopes,
};

const SESSION_COOKIE: &str = "vibe_session";
const INTERACTION_COOKIE: &str = "vibe_interaction";
const FORM: &[&str] = &["application/x-www-form-urlencoded"];

/// `GET /.well-known/openid-configuration`.
pub(super) fn discovery(app: &App) -> HttpResponse {
    let issuer = &app.identity.issuer;
    let scopes: Vec<&str> = crate::identity::oauth::IDENTITY_SCOPES.to_vec();
    super::json(
        StatusCode::OK,
        &json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/oauth/authorize"),
            "token_endpoint": format!("{issuer}/oauth/token"),
            "userinfo_endpoint": format!("{issuer}/oauth/userinfo"),
            "jwks_uri": format!("{issuer}/oauth/jwks"),
            "revocation_endpoint": format!("{issuer}/oauth/revoke"),
            "introspection_endpoint": format!("{issuer}/oauth/introspect"),
            "end_session_endpoint": format!("{issuer}/oauth/end-session"),
            "registration_endpoint": format!("{issuer}/oauth/register"),
            "scopes_supported": scopes,
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
            "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
            "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
            "code_challenge_methods_supported": ["S256"],
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "azp", "at_hash", "preferred_username"],
            "prompt_values_supported": ["none", "login", "consent"],
            "authorization_response_iss_parameter_supported": true,
            "request_parameter_supported": false,
            "request_uri_parameter_supported": false,
            "claims_parameter_supported": false,
        }),
    )
}

/// `GET /oauth/jwks`.
pub(super) async fn jwks(app: &App) -> Result<HttpResponse, ApiError> {
    app.identity
        .signing
        .ensure_key()
        .await
        .map_err(signing_error)?;
    let mut response = super::json(StatusCode::OK, &app.identity.signing.jwks());
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    Ok(response)
}

fn signing_error(e: crate::identity::signing::SigningError) -> ApiError {
    tracing::error!(error = %e, "ID token signing keys unavailable");
    ApiError::internal()
}

/// The authorization request parameters as sent (RFC 6749 §4.1.1, OIDC Core §3.1.2.1).
#[derive(Debug, Default, Deserialize)]
struct AuthorizeParams {
    client_id: Option<String>,
    redirect_uri: Option<String>,
    response_type: Option<String>,
    scope: Option<String>,
    state: Option<String>,
    nonce: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
    prompt: Option<String>,
    max_age: Option<String>,
    request: Option<String>,
    request_uri: Option<String>,
    response_mode: Option<String>,
}

/// `GET|POST /oauth/authorize`.
pub(super) async fn authorize(app: &App, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let headers = req.headers().clone();
    let params: AuthorizeParams = match browser_params(app, req).await? {
        Ok(params) => params,
        Err(page) => return Ok(page),
    };
    // Until the client and its redirect URI are known, errors are shown, not redirected: an
    // unchecked redirect would make this an open redirector.
    let Some(client_id) = params.client_id.as_deref() else {
        return Ok(error_page(
            StatusCode::BAD_REQUEST,
            "The request names no client_id.",
        ));
    };
    let Some(client) = app
        .identity
        .oauth
        .client(client_id)
        .await
        .map_err(oauth_internal)?
    else {
        return Ok(error_page(
            StatusCode::BAD_REQUEST,
            "The app (client_id) is not registered here.",
        ));
    };
    let Some(redirect_uri) = params
        .redirect_uri
        .as_deref()
        .filter(|r| redirect_uri_registered(&client.redirect_uris, r))
    else {
        return Ok(error_page(
            StatusCode::BAD_REQUEST,
            "The redirect_uri is missing or not registered for this app.",
        ));
    };
    let issuer = &app.identity.issuer;
    // RFC 9700 §4.11.2: an error goes back to the app's redirect URI by itself only if that URI
    // is trusted — the operator registered the app, or this browser's user approved it. An app
    // anyone may register would otherwise make this endpoint a redirector to a URI of its
    // choosing; its errors are shown here instead.
    let trusted = !client.registered_openly || approved_here(app, &headers, &client).await?;
    let error_to_app = |pairs: &[(&str, &str)]| -> Result<HttpResponse, ApiError> {
        if trusted {
            Ok(redirect_with(redirect_uri, pairs, params.state.as_deref()))
        } else {
            Ok(error_page(
                StatusCode::BAD_REQUEST,
                "This sign-in request cannot be completed, and the app has not been approved \
                 here, so you are not sent back to it.",
            ))
        }
    };
    let fail = |e: OAuthError| {
        if trusted {
            Ok(redirect_with_error(
                redirect_uri,
                &e,
                params.state.as_deref(),
                issuer,
            ))
        } else {
            error_to_app(&[])
        }
    };
    if params.request.is_some() {
        return error_to_app(&[
            ("error", "request_not_supported"),
            (
                "error_description",
                "request objects are not supported: send the parameters in the query",
            ),
            ("iss", issuer),
        ]);
    }
    if params.request_uri.is_some() {
        return error_to_app(&[
            ("error", "request_uri_not_supported"),
            (
                "error_description",
                "request_uri is not supported: send the parameters in the query",
            ),
            ("iss", issuer),
        ]);
    }
    // A missing parameter is a malformed request (RFC 6749 §4.1.2.1); another value is one this
    // provider does not serve.
    if params.response_type.is_none() {
        return fail(OAuthError::InvalidRequest(
            "response_type is required (code)".into(),
        ));
    }
    if params.response_type.as_deref() != Some("code") {
        return error_to_app(&[
            ("error", "unsupported_response_type"),
            ("error_description", "only response_type=code is supported"),
            ("iss", issuer),
        ]);
    }
    if params
        .response_mode
        .as_deref()
        .is_some_and(|m| m != "query")
    {
        return fail(OAuthError::InvalidRequest(
            "only response_mode=query is supported".into(),
        ));
    }
    let mut scopes = match requested_scopes(params.scope.as_deref(), &client.scopes) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    // OIDC Core §11 lets the provider ignore `offline_access`; an app that did not register
    // the refresh_token grant would get no refresh token, so its user is not asked for one.
    if !client.may_refresh() {
        scopes.retain(|s| s != "offline_access");
    }
    match (
        params.code_challenge.as_deref(),
        params.code_challenge_method.as_deref(),
    ) {
        (Some(c), Some("S256")) if (43..=128).contains(&c.len()) => {}
        (Some(_), Some("S256")) => {
            return fail(OAuthError::InvalidRequest(
                "code_challenge must be 43 to 128 characters".into(),
            ));
        }
        (Some(_), _) => {
            return fail(OAuthError::InvalidRequest(
                "code_challenge_method must be S256".into(),
            ));
        }
        (None, Some(_)) => {
            return fail(OAuthError::InvalidRequest(
                "code_challenge_method without code_challenge".into(),
            ));
        }
        (None, None) if client.is_public() => {
            return fail(OAuthError::InvalidRequest(
                "PKCE (code_challenge with S256) is required for this app".into(),
            ));
        }
        (None, None) => {}
    }
    let prompt = params.prompt.clone();
    if prompt
        .as_deref()
        .is_some_and(|p| !matches!(p, "none" | "login" | "consent"))
    {
        return fail(OAuthError::InvalidRequest(
            "prompt is none, login or consent".into(),
        ));
    }
    let max_age = match params.max_age.as_deref().map(str::parse::<u64>) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => {
            return fail(OAuthError::InvalidRequest(
                "max_age is a number of seconds".into(),
            ));
        }
    };
    for value in [&params.state, &params.nonce].into_iter().flatten() {
        if value.len() > 512 {
            return fail(OAuthError::InvalidRequest(
                "state and nonce are at most 512 characters".into(),
            ));
        }
    }
    let request = AuthorizationRequest {
        client_id: client.client_id.clone(),
        redirect_uri: redirect_uri.to_owned(),
        scopes,
        state: params.state.clone(),
        nonce: params.nonce.clone(),
        code_challenge: params.code_challenge.clone(),
        prompt,
        max_age,
    };
    let session = match cookie_value(&headers, SESSION_COOKIE) {
        Some(id) => app
            .identity
            .oauth
            .session(&id)
            .await
            .map_err(oauth_internal)?,
        None => None,
    };
    let session = session.filter(|(_, auth_time)| {
        request.prompt.as_deref() != Some("login") && within_max_age(*auth_time, request.max_age)
    });
    match session {
        None if request.prompt.as_deref() == Some("none") => fail(OAuthError::LoginRequired),
        None => {
            let (id, csrf) = app
                .identity
                .oauth
                .create_interaction(&request)
                .await
                .map_err(oauth_internal)?;
            Ok(with_interaction_cookie(
                app,
                login_page(&client, id, &csrf, None),
                id,
            ))
        }
        Some((did, auth_time)) => {
            let covered = app
                .identity
                .oauth
                .consent_covers(&did, &client.client_id, &request.scopes)
                .await
                .map_err(oauth_internal)?;
            if covered && request.prompt.as_deref() != Some("consent") {
                return approve(app, &request, &did, auth_time).await;
            }
            if request.prompt.as_deref() == Some("none") {
                return fail(OAuthError::ConsentRequired);
            }
            let (id, csrf) = app
                .identity
                .oauth
                .create_interaction(&request)
                .await
                .map_err(oauth_internal)?;
            app.identity
                .oauth
                .set_interaction_user(id, &did, auth_time)
                .await
                .map_err(oauth_internal)?;
            let handle = handle_of(app, &did).await;
            Ok(with_interaction_cookie(
                app,
                consent_page(&client, &request, id, &csrf, &handle),
                id,
            ))
        }
    }
}

/// The handle the pages greet the signed-in user `did` by (empty if the account is gone).
async fn handle_of(app: &App, did: &str) -> String {
    app.identity
        .accounts
        .by_did(did)
        .await
        .map(|a| a.handle)
        .unwrap_or_default()
}

/// Whether the user signed in on this browser (its session cookie) has approved `client`.
async fn approved_here(app: &App, headers: &HeaderMap, client: &Client) -> Result<bool, ApiError> {
    let Some(id) = cookie_value(headers, SESSION_COOKIE) else {
        return Ok(false);
    };
    let Some((did, _)) = app
        .identity
        .oauth
        .session(&id)
        .await
        .map_err(oauth_internal)?
    else {
        return Ok(false);
    };
    approved_by(app, &did, client).await
}

/// Whether the user `did` has approved `client` (a consent to any of its scopes).
async fn approved_by(app: &App, did: &str, client: &Client) -> Result<bool, ApiError> {
    app.identity
        .oauth
        .consent_covers(did, &client.client_id, &[])
        .await
        .map_err(oauth_internal)
}

/// Whether a sign-in at `auth_time` is recent enough for the request's `max_age` (seconds).
/// Elapsed time is compared whole, not rounded down to seconds: `max_age=0` then always asks for
/// a login, as OpenID Connect Core 3.1.2.1 says it must (it is `prompt=login`).
fn within_max_age(auth_time: DateTime<Utc>, max_age: Option<u64>) -> bool {
    max_age.is_none_or(|m| {
        let limit = i64::try_from(m)
            .ok()
            .and_then(chrono::TimeDelta::try_seconds)
            .unwrap_or(chrono::TimeDelta::MAX);
        m > 0 && Utc::now() - auth_time <= limit
    })
}

/// Issues the code and sends the browser back to the app.
async fn approve(
    app: &App,
    request: &AuthorizationRequest,
    did: &str,
    auth_time: DateTime<Utc>,
) -> Result<HttpResponse, ApiError> {
    let code = match app.identity.oauth.issue_code(request, did, auth_time).await {
        Ok(code) => code,
        // The consent was withdrawn between the check and the grant.
        Err(e @ OAuthError::AccessDenied) => {
            return Ok(redirect_with_error(
                &request.redirect_uri,
                &e,
                request.state.as_deref(),
                &app.identity.issuer,
            ));
        }
        Err(e) => return Err(oauth_internal(e)),
    };
    Ok(redirect_with(
        &request.redirect_uri,
        &[("code", &code), ("iss", &app.identity.issuer)],
        request.state.as_deref(),
    ))
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    interaction: Uuid,
    csrf: String,
    handle: String,
    password: String,
}

/// `POST /oauth/login`: the login form.
pub(super) async fn login(
    app: &App,
    from: IpAddr,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let headers = req.headers().clone();
    let form: LoginForm = match browser_params(app, req).await? {
        Ok(form) => form,
        Err(page) => return Ok(page),
    };
    let Some(interaction) = load_interaction(app, &headers, form.interaction, &form.csrf).await?
    else {
        return Ok(expired_page());
    };
    let Some(client) = app
        .identity
        .oauth
        .client(&interaction.request.client_id)
        .await
        .map_err(oauth_internal)?
    else {
        return Ok(expired_page());
    };
    let account = match app
        .identity
        .accounts
        .login(&form.handle, &form.password, from)
        .await
    {
        Ok(a) => a,
        Err(AccountError::InvalidCredentials) => {
            let page = login_page(
                &client,
                interaction.id,
                &form.csrf,
                Some("Wrong handle or password."),
            );
            return Ok(with_status(page, StatusCode::UNAUTHORIZED));
        }
        Err(AccountError::RateLimited(wait)) => {
            let msg = format!(
                "Too many attempts. Try again in {} seconds.",
                wait.as_secs().max(1)
            );
            let page = login_page(&client, interaction.id, &form.csrf, Some(&msg));
            return Ok(with_status(page, StatusCode::TOO_MANY_REQUESTS));
        }
        Err(e) => return Err(account_error(e)),
    };
    let (session, auth_time) = app
        .identity
        .oauth
        .create_session(&account.did)
        .await
        .map_err(oauth_internal)?;
    let session_cookie = session_cookie(app, &session);
    let request = interaction.request;
    let covered = app
        .identity
        .oauth
        .consent_covers(&account.did, &client.client_id, &request.scopes)
        .await
        .map_err(oauth_internal)?;
    let mut response = if covered && request.prompt.as_deref() != Some("consent") {
        let first = app
            .identity
            .oauth
            .finish_interaction(interaction.id)
            .await
            .map_err(oauth_internal)?;
        if !first {
            return Ok(expired_page());
        }
        approve(app, &request, &account.did, auth_time).await?
    } else {
        app.identity
            .oauth
            .set_interaction_user(interaction.id, &account.did, auth_time)
            .await
            .map_err(oauth_internal)?;
        consent_page(
            &client,
            &request,
            interaction.id,
            &form.csrf,
            &account.handle,
        )
    };
    append_cookie(&mut response, &session_cookie);
    Ok(response)
}

#[derive(Debug, Deserialize)]
struct ConsentForm {
    interaction: Uuid,
    csrf: String,
    decision: String,
}

/// `POST /oauth/consent`: the consent form.
pub(super) async fn consent(app: &App, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let headers = req.headers().clone();
    let form: ConsentForm = match browser_params(app, req).await? {
        Ok(form) => form,
        Err(page) => return Ok(page),
    };
    let Some(interaction) = load_interaction(app, &headers, form.interaction, &form.csrf).await?
    else {
        return Ok(expired_page());
    };
    let Some((did, auth_time)) = interaction.user else {
        return Ok(expired_page());
    };
    // Claimed before anything is decided: of two posts of the same form, one goes on.
    let first = app
        .identity
        .oauth
        .finish_interaction(interaction.id)
        .await
        .map_err(oauth_internal)?;
    if !first {
        return Ok(expired_page());
    }
    let request = interaction.request;
    if form.decision != "allow" {
        return Ok(redirect_with_error(
            &request.redirect_uri,
            &OAuthError::AccessDenied,
            request.state.as_deref(),
            &app.identity.issuer,
        ));
    }
    app.identity
        .oauth
        .save_consent(&did, &request.client_id, &request.scopes)
        .await
        .map_err(oauth_internal)?;
    approve(app, &request, &did, auth_time).await
}

/// The interaction, if the browser's cookie names it and the form's CSRF token is its own.
async fn load_interaction(
    app: &App,
    headers: &HeaderMap,
    id: Uuid,
    csrf: &str,
) -> Result<Option<crate::identity::oauth::Interaction>, ApiError> {
    if cookie_value(headers, INTERACTION_COOKIE).as_deref() != Some(id.to_string().as_str()) {
        return Ok(None);
    }
    match app.identity.oauth.interaction(id, csrf).await {
        Ok(i) => Ok(Some(i)),
        Err(OAuthError::InteractionExpired) => Ok(None),
        Err(e) => Err(oauth_internal(e)),
    }
}

#[derive(Debug, Default, Deserialize)]
struct TokenForm {
    grant_type: Option<String>,
    code: Option<String>,
    redirect_uri: Option<String>,
    code_verifier: Option<String>,
    refresh_token: Option<String>,
    scope: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

#[derive(Debug, Serialize)]
struct TokenResponse {
    access_token: String,
    token_type: &'static str,
    expires_in: u64,
    scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id_token: Option<String>,
}

/// `POST /oauth/token`.
pub(super) async fn token(app: &App, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let (form, client, headers) = match client_request::<TokenForm>(app, req).await {
        Ok(v) => v,
        Err(answer) => return Ok(answer),
    };
    let oauth = &app.identity.oauth;
    let revocations = app.tokens.revocations();
    // Before a code or refresh token is used up: a failure after that would look like a replay
    // when the client retries, and revoke the grant.
    app.identity
        .signing
        .ensure_key()
        .await
        .map_err(signing_error)?;
    let issued = match form.grant_type.as_deref() {
        Some("authorization_code") => {
            let Some(code) = form.code.as_deref() else {
                return Ok(oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "code is required",
                ));
            };
            oauth
                .redeem_code(
                    code,
                    &client,
                    form.redirect_uri.as_deref(),
                    form.code_verifier.as_deref(),
                    revocations,
                )
                .await
                .map(|(grant, refresh)| (grant, refresh, true))
        }
        Some("refresh_token") => {
            let Some(refresh) = form.refresh_token.as_deref() else {
                return Ok(oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "refresh_token is required",
                ));
            };
            // A refresh may narrow the scopes of the new access token (RFC 6749 §6), never
            // widen them.
            let narrow = |grant: &mut Grant| {
                let Some(scope) = form.scope.as_deref() else {
                    return Ok(());
                };
                match requested_scopes(Some(scope), &grant.scopes) {
                    Ok(narrowed) if narrowed.iter().all(|s| grant.scopes.contains(s)) => {
                        grant.scopes = narrowed;
                        Ok(())
                    }
                    _ => Err(OAuthError::InvalidScope(
                        "a refresh may only narrow the granted scopes".into(),
                    )),
                }
            };
            oauth
                .rotate_refresh(refresh, &client, revocations, narrow)
                .await
                .map(|(grant, next)| (grant, Some(next), false))
        }
        Some(other) => Err(OAuthError::UnsupportedGrantType(format!(
            "grant_type {other:?} is not supported"
        ))),
        None => Err(OAuthError::InvalidRequest("grant_type is required".into())),
    };
    let (grant, refresh_token, with_nonce) = match issued {
        Ok(v) => v,
        Err(e) => return Ok(oauth_failure(e, &headers)),
    };
    let response = issue_tokens(app, &grant, refresh_token, with_nonce)?;
    Ok(no_store(super::json(StatusCode::OK, &response)))
}

/// The access token (a biscuit) and, with `openid`, the ID token for a grant.
fn issue_tokens(
    app: &App,
    grant: &Grant,
    refresh_token: Option<String>,
    with_nonce: bool,
) -> Result<TokenResponse, ApiError> {
    let config = &app.config.identity;
    let now = SystemTime::now();
    let expires_at = now + config.access_token_ttl;
    let identity = identity_scopes(&grant.scopes);
    let (access_token, _) = app.tokens.mint_issued(
        &grant.user_did,
        &document_scopes(&grant.scopes),
        expires_at,
        Some(&Issued {
            client: &grant.client_id,
            grant: grant.id,
            identity_scopes: &identity,
        }),
    )?;
    let id_token = if identity.iter().any(|s| s == "openid") {
        let iat = unix(now);
        let claims = IdTokenClaims {
            iss: app.identity.issuer.clone(),
            sub: grant.user_did.clone(),
            aud: grant.client_id.clone(),
            azp: grant.client_id.clone(),
            exp: iat + config.id_token_ttl.as_secs(),
            iat,
            auth_time: u64::try_from(grant.auth_time.timestamp()).unwrap_or(0),
            nonce: if with_nonce {
                grant.nonce.clone()
            } else {
                None
            },
            at_hash: Some(at_hash(&access_token)),
            preferred_username: None,
        };
        Some(app.identity.signing.sign(&claims).map_err(signing_error)?)
    } else {
        None
    };
    Ok(TokenResponse {
        access_token,
        token_type: "Bearer",
        expires_in: config.access_token_ttl.as_secs(),
        scope: grant.scopes.join(" "),
        refresh_token,
        id_token,
    })
}

/// ID token claims (OIDC Core §2).
#[derive(Debug, Serialize, Deserialize)]
struct IdTokenClaims {
    iss: String,
    sub: String,
    aud: String,
    azp: String,
    exp: u64,
    iat: u64,
    auth_time: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    nonce: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    at_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    preferred_username: Option<String>,
}

/// Left half of the access token's SHA-256, base64url (OIDC Core §3.1.3.6).
fn at_hash(access_token: &str) -> String {
    let digest = Sha256::digest(access_token.as_bytes());
    URL_SAFE_NO_PAD.encode(&digest[..16])
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `GET|POST /oauth/userinfo` with an access token carrying `openid`.
pub(super) async fn userinfo(app: &App, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    // The token's own checks run as for a read of no particular type: an attenuated copy
    // limited to writes, to one document type, or past its time limit, says nothing of its user.
    let claims = match super::bearer_token(req.headers())
        .map_err(|_| AuthError::Invalid)
        .and_then(|t| app.tokens.verify(t, Access::Read, None))
    {
        Ok(c) => c,
        Err(e @ AuthError::Restricted) => {
            return Ok(bearer_challenge(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                &e.to_string(),
            ));
        }
        Err(e) => {
            return Ok(bearer_challenge(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                &e.to_string(),
            ));
        }
    };
    if !claims.identity_scopes.iter().any(|s| s == "openid") {
        return Ok(bearer_challenge(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            "the token was not granted the openid scope",
        ));
    }
    let mut info = json!({"sub": claims.subject});
    if claims.identity_scopes.iter().any(|s| s == "profile")
        && let Ok(account) = app.identity.accounts.by_did(&claims.subject).await
    {
        info["preferred_username"] = json!(account.handle);
    }
    Ok(no_store(super::json(StatusCode::OK, &info)))
}

#[derive(Debug, Default, Deserialize)]
struct TokenParam {
    token: Option<String>,
    token_type_hint: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

/// `POST /oauth/introspect` (RFC 7662). A registered client may ask about the tokens issued to
/// it; any other token (another client's, a first-party one) is `{"active": false}` to it, so
/// holding a client id does not make one a judge of every user's tokens (§4).
pub(super) async fn introspect(
    app: &App,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let (form, client, _) = match client_request::<TokenParam>(app, req).await {
        Ok(v) => v,
        Err(answer) => return Ok(answer),
    };
    let Some(token) = form.token.as_deref() else {
        return Ok(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "token is required",
        ));
    };
    let inactive = || no_store(super::json(StatusCode::OK, &json!({"active": false})));
    let access = || match app.tokens.identify(token) {
        Ok(claims) if claims.client.as_deref() == Some(client.client_id.as_str()) => {
            access_introspection(
                &claims,
                &app.tokens.usable_scopes(token, &claims),
                &app.identity.issuer,
            )
        }
        _ => None,
    };
    let refresh_first = form.token_type_hint.as_deref() == Some("refresh_token");
    if !refresh_first && let Some(body) = access() {
        return Ok(no_store(super::json(StatusCode::OK, &body)));
    }
    if let Some(info) = app
        .identity
        .oauth
        .live_refresh(token)
        .await
        .map_err(oauth_internal)?
        .filter(|info| info.grant.client_id == client.client_id)
    {
        return Ok(no_store(super::json(
            StatusCode::OK,
            &json!({
                "active": true,
                "token_type": "refresh_token",
                "scope": info.grant.scopes.join(" "),
                "client_id": info.grant.client_id,
                "sub": info.grant.user_did,
                "iat": info.created_at.timestamp(),
                "exp": info.expires_at.timestamp(),
                "iss": app.identity.issuer,
            }),
        )));
    }
    if refresh_first && let Some(body) = access() {
        return Ok(no_store(super::json(StatusCode::OK, &body)));
    }
    Ok(inactive())
}

/// What introspection says of an access token whose document scopes usable now are `usable`
/// (None: inactive; its attenuations leave it none).
fn access_introspection(
    claims: &Claims,
    usable: &[Scope],
    issuer: &str,
) -> Option<serde_json::Value> {
    if usable.is_empty() && !claims.scopes.is_empty() {
        return None;
    }
    let mut scopes: Vec<String> = claims.identity_scopes.clone();
    scopes.extend(usable.iter().map(ToString::to_string));
    Some(json!({
        "active": true,
        "token_type": "Bearer",
        "scope": scopes.join(" "),
        "client_id": claims.client,
        "sub": claims.subject,
        "exp": unix(claims.expires_at),
        "iss": issuer,
    }))
}

/// `POST /oauth/revoke` (RFC 7009). A refresh token revokes its whole grant (its access tokens
/// included, §2.1); an access token revokes itself and its attenuations. An attenuated copy
/// revokes nothing (`unsupported_token_type`).
pub(super) async fn revoke(app: &App, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let (form, client, _) = match client_request::<TokenParam>(app, req).await {
        Ok(v) => v,
        Err(answer) => return Ok(answer),
    };
    let Some(token) = form.token.as_deref() else {
        return Ok(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "token is required",
        ));
    };
    let revocations = app.tokens.revocations();
    let oauth = &app.identity.oauth;
    if let Some(info) = oauth.live_refresh(token).await.map_err(oauth_internal)? {
        if info.grant.client_id != client.client_id {
            return Ok(oauth_error(
                StatusCode::BAD_REQUEST,
                "unauthorized_client",
                "the token was issued to another client",
            ));
        }
        oauth
            .revoke_grant(info.grant.id, revocations)
            .await
            .map_err(oauth_internal)?;
    } else if let Ok(claims) = app.tokens.identify(token) {
        if claims.client.as_deref() != Some(client.client_id.as_str()) {
            return Ok(oauth_error(
                StatusCode::BAD_REQUEST,
                "unauthorized_client",
                "the token was issued to another client",
            ));
        }
        // An attenuated copy carries the id of the token it was made from, and a revocation
        // names that id: revoking the copy would end the original and every copy, so anyone the
        // app handed a narrowed copy to (a public client's id is no secret) could end the app's
        // token (`DELETE /v1/sessions` refuses copies for the same reason). A copy cannot be
        // revoked alone; like another client's token, it is refused with an error rather than
        // a 200 that would tell the app the copy no longer works (RFC 7009 §2.2.1).
        if app.tokens.is_attenuated(token) {
            return Ok(oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_token_type",
                "an attenuated token cannot be revoked: revoke the token it was made from",
            ));
        }
        let until = DateTime::<Utc>::from(claims.expires_at);
        oauth
            .revoke_access_token(&claims.token_id, until, revocations)
            .await
            .map_err(oauth_internal)?;
    }
    // Unknown, expired or already revoked tokens: success all the same (RFC 7009 §2.2).
    Ok(no_store(super::json(StatusCode::OK, &json!({}))))
}

#[derive(Debug, Default, Deserialize)]
struct EndSessionParams {
    id_token_hint: Option<String>,
    post_logout_redirect_uri: Option<String>,
    state: Option<String>,
    client_id: Option<String>,
    /// The confirmation form's token ([`end_session_csrf`]), posted when the user confirms.
    csrf: Option<String>,
}

/// `GET|POST /oauth/end-session` (OIDC RP-Initiated Logout): ends the browser's session and, if
/// the app registered the URI, returns the browser to it — an app anyone may register only when
/// the session's user is the one its ID token hint names or has approved the app. Unless the
/// request carries an ID token of the signed-in user (so the app that user signed in to asks),
/// the user confirms first: any page could otherwise sign a browser out (RP-Initiated Logout §2
/// requires asking).
pub(super) async fn end_session(
    app: &App,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let headers = req.headers().clone();
    let posted = req.method() == Method::POST;
    let params: EndSessionParams = match browser_params(app, req).await? {
        Ok(params) => params,
        Err(page) => return Ok(page),
    };
    // An expired hint is accepted (RP-Initiated Logout §2: ID tokens expire long before their
    // users sign out): it only names the app and a user, and counts for nothing unless that
    // user is the one signed in on this browser.
    let hinted: Option<IdTokenClaims> = params.id_token_hint.as_deref().and_then(|t| {
        app.identity
            .signing
            .verify_ignoring_expiry(t, &app.identity.issuer)
            .ok()
    });
    if params.id_token_hint.is_some() && hinted.is_none() {
        return Ok(error_page(
            StatusCode::BAD_REQUEST,
            "The id_token_hint was not issued by this provider.",
        ));
    }
    let client_id = hinted
        .as_ref()
        .map(|c| c.aud.clone())
        .or(params.client_id.clone());
    let client = match &client_id {
        Some(id) => app
            .identity
            .oauth
            .client(id)
            .await
            .map_err(oauth_internal)?,
        None => None,
    };
    let requested = match (&params.post_logout_redirect_uri, &client_id) {
        (None, _) => None,
        (Some(_), None) => {
            return Ok(error_page(
                StatusCode::BAD_REQUEST,
                "post_logout_redirect_uri needs an id_token_hint or client_id.",
            ));
        }
        (Some(uri), Some(_)) => {
            let Some(client) = client
                .as_ref()
                .filter(|c| redirect_uri_registered(&c.post_logout_redirect_uris, uri))
            else {
                return Ok(error_page(
                    StatusCode::BAD_REQUEST,
                    "The post_logout_redirect_uri is not registered for this app.",
                ));
            };
            Some((uri.as_str(), client))
        }
    };
    let session = cookie_value(&headers, SESSION_COOKIE);
    let signed_in = match &session {
        Some(id) => app
            .identity
            .oauth
            .session(id)
            .await
            .map_err(oauth_internal)?
            .map(|(did, _)| did),
        None => None,
    };
    let hinted_for_user = match (&hinted, &signed_in) {
        (Some(h), Some(did)) => h.sub == *did,
        _ => false,
    };
    if let (Some(session), Some(did)) = (&session, &signed_in) {
        let csrf = end_session_csrf(session);
        let confirmed = posted
            && params
                .csrf
                .as_deref()
                .is_some_and(|c| bool::from(c.as_bytes().ct_eq(csrf.as_bytes())));
        if !hinted_for_user && !confirmed {
            let handle = handle_of(app, did).await;
            return Ok(end_session_page(&params, client.as_ref(), &handle, &csrf));
        }
    }
    // RFC 9700 §4.11.2: an app anyone may register names its URIs itself, and anyone may sign
    // in to it and so hold an ID token it issued; neither proves that this browser's user
    // trusts the app, and a link carrying them would send anyone's browser where the
    // registrant likes. The browser goes there only if its signed-in user is the hint's, or
    // approved the app; otherwise (another user's hint, no session) it is signed out all the
    // same and shown a page.
    let target = match requested {
        None => None,
        Some((uri, c)) if !c.registered_openly => Some(uri),
        Some((uri, c)) => {
            let trusted = match signed_in.as_deref() {
                Some(did) => hinted_for_user || approved_by(app, did, c).await?,
                None => false,
            };
            trusted.then_some(uri)
        }
    };
    if let Some(session) = &session {
        app.identity
            .oauth
            .end_session(session)
            .await
            .map_err(oauth_internal)?;
    }
    let mut response = match target {
        Some(uri) => redirect_with(uri, &[], params.state.as_deref()),
        None => page(StatusCode::OK, "Signed out", "<p>You are signed out.</p>"),
    };
    let mut removal = Cookie::build((SESSION_COOKIE, ""))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Lax)
        .build();
    removal.make_removal();
    append_cookie(&mut response, &removal.to_string());
    Ok(response)
}

/// A form posted by a client to the token, revocation or introspection endpoint.
trait ClientForm: serde::de::DeserializeOwned {
    /// `client_id` and `client_secret` from the body, if sent there.
    fn credentials(&self) -> (Option<&str>, Option<&str>);
}

impl ClientForm for TokenForm {
    fn credentials(&self) -> (Option<&str>, Option<&str>) {
        (self.client_id.as_deref(), self.client_secret.as_deref())
    }
}

impl ClientForm for TokenParam {
    fn credentials(&self) -> (Option<&str>, Option<&str>) {
        (self.client_id.as_deref(), self.client_secret.as_deref())
    }
}

/// Reads a client's form and authenticates the client; on failure, the OAuth error answer.
async fn client_request<F: ClientForm>(
    app: &App,
    req: Request<Incoming>,
) -> Result<(F, Client, HeaderMap), HttpResponse> {
    let headers = req.headers().clone();
    let form: F = read_body(app, req, FORM)
        .await
        .and_then(|b| parse_form(&b))
        .map_err(|e| oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &e.message))?;
    let (id, secret) = form.credentials();
    let client = authenticate_client(app, &headers, id, secret)
        .await
        .map_err(|e| oauth_failure(e, &headers))?;
    Ok((form, client, headers))
}

/// The client authenticating this request: HTTP Basic (client_secret_basic, RFC 6749 §2.3.1,
/// form-urlencoded id and secret), body credentials (client_secret_post), or a public client's
/// bare `client_id`.
async fn authenticate_client(
    app: &App,
    headers: &HeaderMap,
    body_id: Option<&str>,
    body_secret: Option<&str>,
) -> Result<Client, OAuthError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let basic = authorization.and_then(|v| super::credentials(v, "Basic"));
    // `Basic` with nothing after it is a failed authentication, not an absent one.
    if basic.is_none()
        && authorization.is_some_and(|v| {
            v.split_whitespace()
                .next()
                .is_some_and(|scheme| scheme.eq_ignore_ascii_case("basic"))
        })
    {
        return Err(OAuthError::InvalidClient);
    }
    let (id, secret) = match basic {
        Some(encoded) => {
            let decoded = STANDARD
                .decode(encoded.trim())
                .map_err(|_| OAuthError::InvalidClient)?;
            let decoded = String::from_utf8(decoded).map_err(|_| OAuthError::InvalidClient)?;
            let (id, secret) = decoded.split_once(':').ok_or(OAuthError::InvalidClient)?;
            let id = form_decode(id)?;
            let secret = form_decode(secret)?;
            if body_id.is_some_and(|b| b != id) || body_secret.is_some() {
                return Err(OAuthError::InvalidRequest(
                    "use one client authentication method".into(),
                ));
            }
            (id, Some(secret))
        }
        None => (
            body_id.ok_or(OAuthError::InvalidClient)?.to_owned(),
            body_secret.map(str::to_owned),
        ),
    };
    app.identity
        .oauth
        .authenticate_client(&id, secret.as_deref())
        .await
}

fn form_decode(s: &str) -> Result<String, OAuthError> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(&format!("v={s}")).map_err(|_| OAuthError::InvalidClient)?;
    pairs
        .into_iter()
        .next()
        .map(|(_, v)| v)
        .ok_or(OAuthError::InvalidClient)
}

/// The parameters of a browser's request: a POST's form, else the query. Malformed ones are
/// answered with an error page, as a browser shows it, not JSON.
async fn browser_params<T: serde::de::DeserializeOwned>(
    app: &App,
    req: Request<Incoming>,
) -> Result<Result<T, HttpResponse>, ApiError> {
    let parsed = if req.method() == Method::POST {
        parse_form(&read_body(app, req, FORM).await?)
    } else {
        super::query_params(req.uri(), "invalid_request")
    };
    Ok(parsed.map_err(|e| error_page(StatusCode::BAD_REQUEST, &e.message)))
}

fn parse_form<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    super::form_params(body, "invalid_request")
}

/// `POST /oauth/register`: dynamic client registration (RFC 7591). Needs an initial access token
/// (a bearer token with the `admin` scope) unless `identity.open_registration` is on, in which
/// case registrations without one are rate-limited per client address. Metadata this server does
/// not know is ignored (§2); what it cannot honour is refused with `invalid_client_metadata` or
/// `invalid_redirect_uri` (§3.2.2).
pub(super) async fn register(
    app: &App,
    from: IpAddr,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let with_token = req.headers().contains_key(header::AUTHORIZATION);
    if with_token || !app.config.identity.open_registration {
        if let Err(e) = super::authorize_admin(app, req.headers()) {
            // RFC 6750 §3.1: a missing or bad token is `invalid_token`, a weak one
            // `insufficient_scope`.
            let (status, code) = if e.status == StatusCode::FORBIDDEN {
                (StatusCode::FORBIDDEN, "insufficient_scope")
            } else {
                (StatusCode::UNAUTHORIZED, "invalid_token")
            };
            let mut r = oauth_error(status, code, &e.message);
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"vibe\""),
            );
            return Ok(r);
        }
    } else if app
        .identity
        .registrations
        .check_key(&crate::identity::rate_limit_key(from))
        .is_err()
    {
        let mut r = oauth_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            "too many registrations from this address; try again later",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("3600"));
        return Ok(r);
    }
    let request: RegistrationRequest = match super::read_json(app, req, &["application/json"]).await
    {
        Ok(r) => r,
        Err(e) => return Ok(oauth_error(e.status, "invalid_client_metadata", &e.message)),
    };
    let registered = match request.into_new_client() {
        Ok(new) => {
            let registrant = if with_token {
                Registrant::OperatorToken
            } else {
                Registrant::Anyone
            };
            app.identity.oauth.register_client(new, registrant).await
        }
        Err(e) => Err(e),
    };
    match registered {
        Ok(Registered {
            client,
            secret,
            registration_token,
        }) => {
            let mut body = super::account::registration(&client, secret);
            if let Some(token) = registration_token {
                managed_by(app, &mut body, &client.client_id, token);
            }
            Ok(no_store(super::json(StatusCode::CREATED, &body)))
        }
        Err(e) => Ok(registration_failure(e)),
    }
}

/// `GET`, `PUT`, `DELETE /oauth/register/{client}`: the client configuration endpoint of RFC
/// 7592, where a self-registered client reads, replaces and deletes its registration with its
/// registration access token. Every answer that carries the registration carries a new token,
/// which replaces the one used (only its hash is kept, so the old one cannot be shown again).
pub(super) async fn client_configuration(
    app: &App,
    client_id: &str,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let method = req.method().clone();
    let Ok(token) = super::bearer_token(req.headers()).map(str::to_owned) else {
        return Ok(bearer_challenge(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "send the registration access token as `Authorization: Bearer <token>`",
        ));
    };
    let oauth = &app.identity.oauth;
    let outcome = match method {
        Method::GET => oauth.read_registration(client_id, &token).await.map(Some),
        Method::PUT => {
            let request: RegistrationRequest =
                match super::read_json(app, req, &["application/json"]).await {
                    Ok(r) => r,
                    Err(e) => {
                        return Ok(oauth_error(e.status, "invalid_client_metadata", &e.message));
                    }
                };
            // §2.2: the request names the client it replaces.
            if request.client_id.as_deref() != Some(client_id) {
                return Ok(oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_client_metadata",
                    "client_id must be present and name this client",
                ));
            }
            let secret = request.client_secret.clone();
            match request.into_new_client() {
                Ok(new) => oauth
                    .update_registration(
                        client_id,
                        &token,
                        secret.as_deref(),
                        new,
                        app.tokens.revocations(),
                    )
                    .await
                    .map(Some),
                Err(e) => Err(e),
            }
        }
        _ => match oauth
            .delete_client(client_id, Some(&token), app.tokens.revocations())
            .await
        {
            Ok(true) => Ok(None),
            Ok(false) => Err(OAuthError::InvalidToken),
            Err(e) => Err(e),
        },
    };
    match outcome {
        Ok(Some((client, next))) => {
            let mut body = super::account::registration(&client, None);
            managed_by(app, &mut body, &client.client_id, next);
            Ok(no_store(super::json(StatusCode::OK, &body)))
        }
        Ok(None) => Ok(super::empty(StatusCode::NO_CONTENT)),
        // §2.1: an unknown client and a wrong token alike are a 401 with a Bearer challenge.
        Err(OAuthError::InvalidToken) => Ok(bearer_challenge(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            &OAuthError::InvalidToken.to_string(),
        )),
        Err(e) => Ok(registration_failure(e)),
    }
}

/// Adds what RFC 7592 §3 requires of a self-registered client's registration: where to manage
/// it and the token to do so with.
fn managed_by(app: &App, body: &mut serde_json::Value, client_id: &str, token: String) {
    let uri = format!("{}/oauth/register/{client_id}", app.identity.issuer);
    body["registration_client_uri"] = json!(uri);
    body["registration_access_token"] = json!(token);
}

/// A refused registration or update, as RFC 7591 §3.2.2 answers it.
fn registration_failure(e: OAuthError) -> HttpResponse {
    match e {
        OAuthError::Database(e) => {
            tracing::error!(error = %e, "client registration failed");
            oauth_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "an internal error occurred",
            )
        }
        e => oauth_error(StatusCode::BAD_REQUEST, e.code(), &e.to_string()),
    }
}

/// RFC 7591 client metadata. Unknown fields are ignored (§2), so no `deny_unknown_fields`.
/// `client_id` and `client_secret` are read only by an update (RFC 7592 §2.2).
#[derive(Debug, Deserialize)]
pub(super) struct RegistrationRequest {
    client_id: Option<String>,
    client_secret: Option<String>,
    // Missing is "none": refused as `invalid_redirect_uri` with the other redirect URI faults.
    #[serde(default)]
    redirect_uris: Vec<String>,
    client_name: Option<String>,
    scope: Option<String>,
    token_endpoint_auth_method: Option<String>,
    #[serde(default)]
    post_logout_redirect_uris: Vec<String>,
    grant_types: Option<Vec<String>>,
    response_types: Option<Vec<String>>,
}

impl RegistrationRequest {
    pub(super) fn into_new_client(self) -> Result<NewClient, OAuthError> {
        let unsupported = |field: &str, values: &[String], supported: &[&str]| match values
            .iter()
            .find(|v| !supported.contains(&v.as_str()))
        {
            Some(v) => Err(OAuthError::InvalidClientMetadata(format!(
                "{field} {v:?} is not supported (supported: {})",
                supported.join(", ")
            ))),
            None => Ok(()),
        };
        if let Some(types) = &self.response_types {
            unsupported("response_types", types, &["code"])?;
        }
        // The consent page names the app; without a name, the redirect's host says who it is.
        let client_name = match self.client_name {
            Some(name) => name,
            None => self
                .redirect_uris
                .first()
                .and_then(|u| url::Url::parse(u).ok())
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_else(|| "unnamed app".to_owned()),
        };
        Ok(NewClient {
            client_name,
            redirect_uris: self.redirect_uris,
            post_logout_redirect_uris: self.post_logout_redirect_uris,
            scope: self.scope.unwrap_or_else(|| "openid".to_owned()),
            token_endpoint_auth_method: self.token_endpoint_auth_method,
            grant_types: self.grant_types,
        })
    }
}

/// An OAuth error body (RFC 6749 §5.2).
fn oauth_error(status: StatusCode, code: &str, description: &str) -> HttpResponse {
    no_store(super::json(
        status,
        &json!({"error": code, "error_description": description}),
    ))
}

fn oauth_failure(e: OAuthError, headers: &HeaderMap) -> HttpResponse {
    match e {
        OAuthError::InvalidClient => {
            let mut r = oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "client authentication failed",
            );
            if headers.contains_key(header::AUTHORIZATION) {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"vibe\""),
                );
            }
            r
        }
        OAuthError::Database(e) => {
            tracing::error!(error = %e, "OAuth request failed");
            oauth_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "an internal error occurred",
            )
        }
        e => oauth_error(StatusCode::BAD_REQUEST, e.code(), &e.to_string()),
    }
}

fn bearer_challenge(status: StatusCode, code: &str, description: &str) -> HttpResponse {
    let mut r = oauth_error(status, code, description);
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer error=\"{code}\"")) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

fn oauth_internal(e: OAuthError) -> ApiError {
    tracing::error!(error = %e, "OAuth provider failure");
    ApiError::internal()
}

pub(super) fn account_error(e: AccountError) -> ApiError {
    match e {
        AccountError::BadHandle | AccountError::BadPassword => {
            ApiError::bad_request("invalid_body", e.to_string())
        }
        AccountError::HandleTaken => {
            ApiError::new(StatusCode::CONFLICT, "handle_taken", e.to_string())
        }
        AccountError::InvalidCredentials | AccountError::WrongPassword => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            e.to_string(),
        ),
        AccountError::RateLimited(_) => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", e.to_string())
        }
        AccountError::NotFound => ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
        e => {
            tracing::error!(error = %e, "account operation failed");
            ApiError::internal()
        }
    }
}

fn no_store(mut r: HttpResponse) -> HttpResponse {
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut()
        .insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

fn with_status(mut r: HttpResponse, status: StatusCode) -> HttpResponse {
    *r.status_mut() = status;
    r
}

/// `uri` with `params` (and `state`) added to its query; a 303 to it.
fn redirect_with(uri: &str, params: &[(&str, &str)], state: Option<&str>) -> HttpResponse {
    let mut all: Vec<(&str, &str)> = params.to_vec();
    if let Some(s) = state {
        all.push(("state", s));
    }
    let query = serde_urlencoded::to_string(&all).unwrap_or_default();
    let location = if query.is_empty() {
        uri.to_owned()
    } else if uri.contains('?') {
        format!("{uri}&{query}")
    } else {
        format!("{uri}?{query}")
    };
    let mut r = http::Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SEE_OTHER;
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            r.headers_mut().insert(header::LOCATION, v);
            no_store(r)
        }
        Err(_) => error_page(
            StatusCode::BAD_REQUEST,
            "The redirect target is not a valid URI.",
        ),
    }
}

fn redirect_with_error(
    uri: &str,
    e: &OAuthError,
    state: Option<&str>,
    issuer: &str,
) -> HttpResponse {
    let description = e.to_string();
    redirect_with(
        uri,
        &[
            ("error", e.code()),
            ("error_description", &description),
            ("iss", issuer),
        ],
        state,
    )
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_owned())
}

fn secure_cookies(app: &App) -> bool {
    app.identity.issuer.starts_with("https://")
}

fn session_cookie(app: &App, id: &str) -> String {
    Cookie::build((SESSION_COOKIE, id.to_owned()))
        .path("/")
        .http_only(true)
        .secure(secure_cookies(app))
        .same_site(SameSite::Lax)
        .max_age(cookie::time::Duration::seconds(
            i64::try_from(app.config.identity.session_ttl.as_secs()).unwrap_or(i64::MAX),
        ))
        .build()
        .to_string()
}

fn with_interaction_cookie(app: &App, mut response: HttpResponse, id: Uuid) -> HttpResponse {
    let cookie = Cookie::build((INTERACTION_COOKIE, id.to_string()))
        .path("/oauth")
        .http_only(true)
        .secure(secure_cookies(app))
        // Strict: the login and consent forms post from this origin only.
        .same_site(SameSite::Strict)
        .max_age(cookie::time::Duration::seconds(
            i64::try_from(app.config.identity.interaction_ttl.as_secs()).unwrap_or(i64::MAX),
        ))
        .build()
        .to_string();
    append_cookie(&mut response, &cookie);
    response
}

fn append_cookie(response: &mut HttpResponse, cookie: &str) {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
}

fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    html_escape::encode_safe(s)
}

/// A complete HTML page with the headers that keep it out of frames and caches.
fn page(status: StatusCode, title: &str, body: &str) -> HttpResponse {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · Vibe</title><style>{STYLE}</style></head>\
         <body><main><h1>{title}</h1>{body}</main></body></html>",
        title = esc(title),
    );
    let mut r = http::Response::new(Full::new(Bytes::from(html)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    no_store(r)
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;background:#f6f6f8;margin:0}\
main{max-width:26rem;margin:4rem auto;background:#fff;padding:2rem;border-radius:.5rem;\
box-shadow:0 1px 4px #0002}label{display:block;margin:.8rem 0 .2rem}input[type=text],\
input[type=password]{width:100%;padding:.5rem;box-sizing:border-box}button{margin:1rem .5rem 0 0;\
padding:.5rem 1rem}.error{color:#b00020}li{margin:.2rem 0}";

fn error_page(status: StatusCode, message: &str) -> HttpResponse {
    page(
        status,
        "Cannot continue",
        &format!("<p class=\"error\">{}</p>", esc(message)),
    )
}

fn expired_page() -> HttpResponse {
    error_page(
        StatusCode::BAD_REQUEST,
        "This sign-in form has expired or was opened in another browser. Go back to the app and start again.",
    )
}

fn login_page(client: &Client, interaction: Uuid, csrf: &str, error: Option<&str>) -> HttpResponse {
    let error = error
        .map(|e| format!("<p class=\"error\">{}</p>", esc(e)))
        .unwrap_or_default();
    page(
        StatusCode::OK,
        "Sign in",
        &format!(
            "<p><strong>{app_name}</strong> asks you to sign in with your Vibe account.</p>{error}\
             <form method=\"post\" action=\"/oauth/login\">\
             <input type=\"hidden\" name=\"interaction\" value=\"{interaction}\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <label for=\"handle\">Handle</label>\
             <input type=\"text\" id=\"handle\" name=\"handle\" autocomplete=\"username\" required>\
             <label for=\"password\">Password</label>\
             <input type=\"password\" id=\"password\" name=\"password\" autocomplete=\"current-password\" required>\
             <button type=\"submit\">Sign in</button></form>",
            app_name = esc(&client.client_name),
            csrf = esc(csrf),
        ),
    )
}

fn consent_page(
    client: &Client,
    request: &AuthorizationRequest,
    interaction: Uuid,
    csrf: &str,
    handle: &str,
) -> HttpResponse {
    let items: String = request
        .scopes
        .iter()
        .map(|s| format!("<li>{}</li>", esc(&describe_scope(s))))
        .collect();
    page(
        StatusCode::OK,
        "Allow access?",
        &format!(
            "<p>Signed in as <strong>{handle}</strong>.</p>\
             <p><strong>{app_name}</strong> would like to:</p><ul>{items}</ul>\
             <form method=\"post\" action=\"/oauth/consent\">\
             <input type=\"hidden\" name=\"interaction\" value=\"{interaction}\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <button type=\"submit\" name=\"decision\" value=\"allow\">Allow</button>\
             <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></form>",
            handle = esc(handle),
            app_name = esc(&client.client_name),
            csrf = esc(csrf),
        ),
    )
}

/// The confirmation form's token for the session `session`: derived from the session id,
/// which only the browser holds, so another site can neither read nor compute it.
fn end_session_csrf(session: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(format!("vibe end-session {session}")))
}

/// "Sign out?": the request's parameters carried through a form that posts them back with
/// the confirmation token.
fn end_session_page(
    params: &EndSessionParams,
    client: Option<&Client>,
    handle: &str,
    csrf: &str,
) -> HttpResponse {
    let asker = match client {
        Some(c) => format!("<strong>{}</strong> asks", esc(&c.client_name)),
        None => "A page asks".to_owned(),
    };
    let carried: String = [
        ("id_token_hint", &params.id_token_hint),
        ("post_logout_redirect_uri", &params.post_logout_redirect_uri),
        ("state", &params.state),
        ("client_id", &params.client_id),
    ]
    .into_iter()
    .filter_map(|(name, value)| {
        value.as_deref().map(|v| {
            format!(
                "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
                esc(v)
            )
        })
    })
    .collect();
    page(
        StatusCode::OK,
        "Sign out?",
        &format!(
            "<p>{asker} to sign you out of Vibe. You are signed in as <strong>{handle}</strong>.</p>\
             <form method=\"post\" action=\"/oauth/end-session\">{carried}\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <button type=\"submit\">Sign out</button></form>\
             <p>To stay signed in, close this page.</p>",
            handle = esc(handle),
            csrf = esc(csrf),
        ),
    )
}

fn describe_scope(scope: &str) -> String {
    match scope {
        "openid" => "know who you are (your DID)".to_owned(),
        "profile" => "see your handle".to_owned(),
        "offline_access" => "stay signed in while you are away".to_owned(),
        s => match s.split_once(':') {
            Some(("read", "*")) => "read your documents of every type".to_owned(),
            Some(("write", "*")) => "create and change your documents of every type".to_owned(),
            Some(("write", "vibe.certificate")) => {
                "issue and revoke certificates in your name (who may see what you share)".to_owned()
            }
            Some(("read", t)) => format!("read your “{t}” documents"),
            Some(("write", t)) => format!("create and change your “{t}” documents"),
            _ => s.to_owned(),
        },
    }
}
