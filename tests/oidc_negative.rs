//! The OpenID Connect provider refusing what it must: malformed authorization requests (shown,
//! or redirected only to a registered URI), bad code and refresh token redemptions (replays
//! revoking their whole grant), tampered, narrowed and attenuated access tokens, withdrawn
//! consent (tokens refused, live connections closed), forged login forms, login rate limits,
//! account errors and key export, end-session (no redirector for apps anyone registers),
//! introspection and revocation (not by an attenuated copy). Each test runs its own server on
//! its own database; nothing waits on a clock except a code's expiry, which is set in SQL.

#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use common::oidc::{
    AuthRequest, Browser, CHALLENGE, PASSWORD, Page, RegisteredClient, SCOPE, STATE, app_tokens,
    assert_api_error, assert_error_redirect, assert_oauth_error, authorize, authorize_url, call,
    call_with_headers, field, first_party_token, list_posts, pkce, post_as_client, redeem_code,
    refresh, register_client, sign_up, token_request,
};
use common::{TestServer, Ws};
use serde_json::{Value, json};

/// Not a registered redirect URI of any client here.
const EVIL_URI: &str = "https://evil.example/cb";

/// Creates a post (needs `write:posts`).
async fn create_post(server: &TestServer, token: &str) -> (u16, Value) {
    call(
        server
            .client
            .post(server.url("/v1/docs/posts"))
            .bearer_auth(token)
            .json(&json!({"data": {"status": "open"}})),
    )
    .await
}

/// The provider's HTML error page: 400, and no redirect anywhere.
#[track_caller]
fn assert_error_page(page: &Page) {
    assert_eq!(page.status, 400, "{page:?}");
    assert_eq!(
        page.location, None,
        "an error page never redirects: {page:?}"
    );
    assert!(page.body.starts_with("<!doctype html>"), "{page:?}");
    assert!(page.body.contains("Cannot continue"), "{page:?}");
}

/// A valid authorization request's parameters for `client`, with `changes` applied (a value
/// replaces or adds the parameter, None removes it).
fn auth_url(
    server: &TestServer,
    client: &RegisteredClient,
    changes: &[(&str, Option<&str>)],
) -> String {
    let mut params: Vec<(&str, &str)> = vec![
        ("response_type", "code"),
        ("client_id", client.id.as_str()),
        ("redirect_uri", client.redirect_uri.as_str()),
        ("scope", SCOPE),
        ("state", STATE),
        ("code_challenge", CHALLENGE),
        ("code_challenge_method", "S256"),
    ];
    for &(key, value) in changes {
        params.retain(|(k, _)| *k != key);
        if let Some(v) = value {
            params.push((key, v));
        }
    }
    authorize_url(server, &params)
}

/// A fresh code for `client` with PKCE (login and consent as needed); returns it and its verifier.
async fn fresh_code(
    server: &TestServer,
    browser: &mut Browser,
    client: &RegisteredClient,
) -> (String, String) {
    let (verifier, challenge) = pkce();
    let request = AuthRequest {
        client,
        scope: SCOPE,
        challenge: Some(&challenge),
        state: STATE,
    };
    (authorize(server, browser, &request, "ada").await, verifier)
}

/// A client, changes to a valid authorization request for it, and the error they must produce.
type Case<'a> = (
    &'a RegisteredClient,
    &'a [(&'a str, Option<&'a str>)],
    &'a str,
);

/// Registers `metadata` at `/oauth/register` with the operator's `admin` token as initial access
/// token (RFC 7591).
async fn register_dynamically(server: &TestServer, admin: &str, metadata: &Value) -> (u16, Value) {
    call(
        server
            .client
            .post(server.url("/oauth/register"))
            .bearer_auth(admin)
            .json(metadata),
    )
    .await
}

/// A server with Ada signed up, an app registered through the admin API (public or
/// confidential), and the tokens Ada's sign-in to it gave the app.
async fn ada_with_app_tokens(public: bool) -> (TestServer, RegisteredClient, Value) {
    let server = TestServer::start().await;
    sign_up(&server, "ada").await;
    let client = register_client(&server, public, SCOPE).await;
    let tokens = app_tokens(&server, &mut Browser::new(), &client, SCOPE, "ada").await;
    (server, client, tokens)
}

/// The confidential client a registration answer describes, at the tests' redirect URI.
fn client_of(registered: &Value) -> RegisteredClient {
    RegisteredClient {
        id: field(registered, "client_id").to_owned(),
        secret: Some(field(registered, "client_secret").to_owned()),
        redirect_uri: "http://127.0.0.1:9/cb".to_owned(),
    }
}

/// Replaces a registration (RFC 7592 §2.2) with the registration access token `registered`
/// (the answer to the registration) carries.
async fn update_registration(
    server: &TestServer,
    registered: &Value,
    metadata: &Value,
) -> (u16, Value) {
    call(
        server
            .client
            .put(field(registered, "registration_client_uri"))
            .bearer_auth(field(registered, "registration_access_token"))
            .json(metadata),
    )
    .await
}

#[tokio::test]
async fn authorize_errors_are_shown_or_redirected_to_the_registered_uri_only() {
    let server = TestServer::start().await;
    let client = register_client(&server, false, SCOPE).await;
    let public = register_client(&server, true, SCOPE).await;
    let mut browser = Browser::new();

    // Until client and redirect URI are known, the error is a page, never a redirect.
    let unknown = RegisteredClient {
        id: "no-such-client".to_owned(),
        secret: None,
        redirect_uri: client.redirect_uri.clone(),
    };
    assert_error_page(&browser.get(&auth_url(&server, &unknown, &[])).await);
    assert_error_page(
        &browser
            .get(&auth_url(&server, &client, &[("client_id", None)]))
            .await,
    );
    for bad in [
        Some(EVIL_URI),
        Some("http://127.0.0.1:9/cb/other"),
        Some("http://127.0.0.1:9/cb?x=1"),
        None,
    ] {
        let page = browser
            .get(&auth_url(&server, &client, &[("redirect_uri", bad)]))
            .await;
        assert_error_page(&page);
        // Even an error the client could be told about is not redirected to an unchecked URI.
        let page = browser
            .get(&auth_url(
                &server,
                &client,
                &[("redirect_uri", bad), ("response_type", Some("token"))],
            ))
            .await;
        assert_error_page(&page);
    }

    // Once both are known, errors go back to the app, with state and iss.
    let cases: [Case<'_>; 8] = [
        (
            &client,
            &[("response_type", Some("token"))],
            "unsupported_response_type",
        ),
        // Missing, it is a malformed request (RFC 6749 §4.1.2.1).
        (&client, &[("response_type", None)], "invalid_request"),
        (
            &client,
            &[("response_type", Some("code id_token"))],
            "unsupported_response_type",
        ),
        (
            &client,
            &[("code_challenge_method", Some("plain"))],
            "invalid_request",
        ),
        (
            &client,
            &[("code_challenge_method", None)],
            "invalid_request",
        ),
        (
            &public,
            &[("code_challenge", None), ("code_challenge_method", None)],
            "invalid_request",
        ),
        (
            &client,
            &[("scope", Some("openid read:posts read:notes"))],
            "invalid_scope",
        ),
        (&client, &[("prompt", Some("none"))], "login_required"),
    ];
    for (c, changes, error) in cases {
        let page = browser.get(&auth_url(&server, c, changes)).await;
        assert_error_redirect(&server, c, &page, error);
    }
    // Nothing above started a sign-in.
    assert!(browser.cookies.is_empty(), "{:?}", browser.cookies);
    // The same request without the fault shows the login form.
    let page = browser.get(&auth_url(&server, &public, &[])).await;
    assert_eq!(page.status, 200, "{page:?}");
    assert!(page.body.contains("action=\"/oauth/login\""), "{page:?}");
    server.finish().await;
}

/// A native app registers a loopback redirect URI and listens on whatever port the OS gives it
/// (RFC 8252 §7.3): any port is accepted, nothing else about the URI may change, and the code is
/// bound to the port the request named.
#[tokio::test]
async fn a_loopback_redirect_uri_may_name_any_port() {
    let server = TestServer::start().await;
    sign_up(&server, "ada").await;
    let registered = register_client(&server, true, SCOPE).await;
    assert_eq!(registered.redirect_uri, "http://127.0.0.1:9/cb");
    let at = |redirect_uri: &str| RegisteredClient {
        id: registered.id.clone(),
        secret: registered.secret.clone(),
        redirect_uri: redirect_uri.to_owned(),
    };
    let native = at("http://127.0.0.1:51234/cb");
    let mut browser = Browser::new();
    let (code, verifier) = fresh_code(&server, &mut browser, &native).await;
    let (status, body) = redeem_code(&server, &registered, &code, Some(&verifier)).await;
    assert_oauth_error(&(status, body), 400, "invalid_grant");
    let (status, body) = redeem_code(&server, &native, &code, Some(&verifier)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["access_token"].is_string(), "{body}");

    for other in [
        "http://127.0.0.1:51234/cb/other",
        "http://localhost:51234/cb",
        "http://127.0.0.2:9/cb",
        "https://127.0.0.1:9/cb",
    ] {
        assert_error_page(&browser.get(&auth_url(&server, &at(other), &[])).await);
    }
    server.finish().await;
}

#[tokio::test]
async fn token_endpoint_refuses_bad_redemptions() {
    let server = TestServer::start().await;
    sign_up(&server, "ada").await;
    let a = register_client(&server, false, SCOPE).await;
    let b = register_client(&server, false, SCOPE).await;
    let mut browser = Browser::new();

    // redirect_uri differing from the authorization request's.
    let (code, verifier) = fresh_code(&server, &mut browser, &a).await;
    let r = token_request(
        &server,
        &a,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", "http://127.0.0.1:9/cb/other"),
            ("code_verifier", &verifier),
        ],
    )
    .await;
    assert_oauth_error(&r, 400, "invalid_grant");
    let r = token_request(
        &server,
        &a,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("code_verifier", &verifier),
        ],
    )
    .await;
    assert_oauth_error(&r, 400, "invalid_grant");

    // PKCE: another verifier, or none although a challenge was sent.
    let (code, _) = fresh_code(&server, &mut browser, &a).await;
    let (other_verifier, _) = pkce();
    let r = redeem_code(&server, &a, &code, Some(other_verifier.as_str())).await;
    assert_oauth_error(&r, 400, "invalid_grant");
    let (code, _) = fresh_code(&server, &mut browser, &a).await;
    let r = redeem_code(&server, &a, &code, None).await;
    assert_oauth_error(&r, 400, "invalid_grant");

    // An expired code.
    let (code, verifier) = fresh_code(&server, &mut browser, &a).await;
    let pool = server.sql().await;
    let expired = sqlx::query(
        "UPDATE oauth_grants SET code_expires_at = now() - interval '1 second' \
         WHERE code_hash = sha256(convert_to($1, 'UTF8'))",
    )
    .bind(&code)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(expired.rows_affected(), 1);
    let r = redeem_code(&server, &a, &code, Some(verifier.as_str())).await;
    assert_oauth_error(&r, 400, "invalid_grant");

    // A wrong client secret, over Basic and in the body.
    let (code, verifier) = fresh_code(&server, &mut browser, &a).await;
    let forged = RegisteredClient {
        id: a.id.clone(),
        secret: Some("not-the-secret".to_owned()),
        redirect_uri: a.redirect_uri.clone(),
    };
    let r = redeem_code(&server, &forged, &code, Some(verifier.as_str())).await;
    assert_oauth_error(&r, 401, "invalid_client");
    let r = call(
        server
            .client
            .post(server.url("/oauth/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(
                serde_urlencoded::to_string([
                    ("grant_type", "authorization_code"),
                    ("code", code.as_str()),
                    ("redirect_uri", a.redirect_uri.as_str()),
                    ("code_verifier", verifier.as_str()),
                    ("client_id", a.id.as_str()),
                    ("client_secret", "not-the-secret"),
                ])
                .unwrap(),
            ),
    )
    .await;
    assert_oauth_error(&r, 401, "invalid_client");

    // A's code presented by B (with B's own valid credentials).
    let r = redeem_code(&server, &b, &code, Some(verifier.as_str())).await;
    assert_oauth_error(&r, 400, "invalid_grant");

    // Grant types the provider does not offer.
    for grant_type in ["password", "client_credentials", "implicit"] {
        let r = token_request(
            &server,
            &a,
            &[
                ("grant_type", grant_type),
                ("username", "ada"),
                ("password", PASSWORD),
            ],
        )
        .await;
        assert_oauth_error(&r, 400, "unsupported_grant_type");
    }

    // A code redeemed twice: the second is refused and revokes what the first issued.
    let (code, verifier) = fresh_code(&server, &mut browser, &a).await;
    let (status, tokens) = redeem_code(&server, &a, &code, Some(verifier.as_str())).await;
    assert_eq!(status, 200, "{tokens}");
    let access = field(&tokens, "access_token");
    let refresh_token = field(&tokens, "refresh_token");
    assert_eq!(list_posts(&server, access).await.0, 200);
    let r = redeem_code(&server, &a, &code, Some(verifier.as_str())).await;
    assert_oauth_error(&r, 400, "invalid_grant");
    assert_api_error(&list_posts(&server, access).await, 401, "token_revoked");
    assert_oauth_error(
        &refresh(&server, &a, refresh_token).await,
        400,
        "invalid_grant",
    );
    server.finish().await;
}

/// Ada's first tokens from `client`, and the response to refreshing them once.
async fn tokens_refreshed_once(server: &TestServer, client: &RegisteredClient) -> (Value, Value) {
    let mut browser = Browser::new();
    let first = app_tokens(server, &mut browser, client, SCOPE, "ada").await;
    let (status, second) = refresh(server, client, field(&first, "refresh_token")).await;
    assert_eq!(status, 200, "{second}");
    (first, second)
}

#[tokio::test]
async fn refresh_token_replay_revokes_the_whole_family() {
    let server = TestServer::start().await;
    sign_up(&server, "ada").await;
    let client = register_client(&server, false, SCOPE).await;
    let (first, second) = tokens_refreshed_once(&server, &client).await;
    let (access1, refresh1) = (
        field(&first, "access_token"),
        field(&first, "refresh_token"),
    );
    let (access2, refresh2) = (
        field(&second, "access_token"),
        field(&second, "refresh_token"),
    );
    assert_ne!(refresh1, refresh2, "refresh tokens rotate");
    assert_eq!(list_posts(&server, access1).await.0, 200);
    assert_eq!(list_posts(&server, access2).await.0, 200);

    // The rotated-out token comes back: refused, and the family dies with it.
    assert_oauth_error(
        &refresh(&server, &client, refresh1).await,
        400,
        "invalid_grant",
    );
    assert_oauth_error(
        &refresh(&server, &client, refresh2).await,
        400,
        "invalid_grant",
    );
    for access in [access1, access2] {
        assert_api_error(&list_posts(&server, access).await, 401, "token_revoked");
    }
    server.finish().await;
}

/// Each rotation gives the successor a fresh `identity.refresh_token_ttl`, but no refresh token
/// outlives `identity.refresh_token_absolute_ttl` from the authorization: rotating does not
/// push that end back.
#[tokio::test]
async fn refresh_tokens_rotate_within_an_absolute_lifetime() {
    let server = TestServer::start_with(&[("identity.refresh_token_absolute_ttl", "\"1h\"")]).await;
    sign_up(&server, "ada").await;
    let client = register_client(&server, false, SCOPE).await;
    let expiry = |token: String| {
        let (server, client) = (&server, &client);
        async move {
            let (status, body) =
                post_as_client(server, client, "/oauth/introspect", &[("token", &token)]).await;
            assert_eq!((status, &body["active"]), (200, &json!(true)), "{body}");
            body["exp"].as_i64().unwrap()
        }
    };
    let mut browser = Browser::new();
    let before = chrono::Utc::now().timestamp();
    let first = app_tokens(&server, &mut browser, &client, SCOPE, "ada").await;
    let first_expiry = expiry(field(&first, "refresh_token").to_owned()).await;
    assert!(
        (before + 3600..=chrono::Utc::now().timestamp() + 3600).contains(&first_expiry),
        "the first refresh token ends an hour after the authorization, not {first_expiry}"
    );
    let (status, second) = refresh(&server, &client, field(&first, "refresh_token")).await;
    assert_eq!(status, 200, "{second}");
    let second_expiry = expiry(field(&second, "refresh_token").to_owned()).await;
    assert_eq!(
        second_expiry, first_expiry,
        "rotating does not extend the end"
    );
    server.finish().await;
}

/// A refresh that asks for more than the grant is refused before the refresh token is used up:
/// the client still holds a working token (were it consumed, its next try would look like a
/// replay and revoke the grant). A narrower one is honoured.
#[tokio::test]
async fn a_refused_refresh_leaves_the_refresh_token_usable() {
    let (server, client, tokens) = ada_with_app_tokens(false).await;
    let refresh_token = field(&tokens, "refresh_token");
    let wider = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token),
        ("scope", "read:posts write:notes"),
    ];
    assert_oauth_error(
        &token_request(&server, &client, &wider).await,
        400,
        "invalid_scope",
    );
    let narrower = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token),
        ("scope", "read:posts"),
    ];
    let (status, narrowed) = token_request(&server, &client, &narrower).await;
    assert_eq!(status, 200, "{narrowed}");
    assert_eq!(narrowed["scope"], "read:posts", "{narrowed}");
    let access = field(&narrowed, "access_token");
    assert_eq!(list_posts(&server, access).await.0, 200);
    assert_api_error(&create_post(&server, access).await, 403, "missing_scope");
    server.finish().await;
}

/// RFC 7009 revocation of one access token closes the connections that use it and no other:
/// not one on a sibling access token of the same grant, not the user's first-party one.
#[tokio::test]
async fn a_revoked_access_token_closes_only_its_own_connections() {
    let server = TestServer::start().await;
    sign_up(&server, "ada").await;
    let first_party = first_party_token(&server, "ada").await;
    let client = register_client(&server, false, SCOPE).await;
    let (first, second) = tokens_refreshed_once(&server, &client).await;
    let (access1, access2) = (
        field(&first, "access_token"),
        field(&second, "access_token"),
    );

    let query = json!({"op": "read", "type": "posts", "where": {"data.status": "open"}});
    let mut connections = Vec::new();
    for token in [access1, access2, first_party.as_str()] {
        let mut ws = Ws::connect(&server.base, Some(token)).await;
        let reply = ws.request(query.clone()).await;
        assert_eq!(reply["ok"], true, "{reply}");
        let sub = reply["sub"].clone();
        connections.push((ws, sub));
    }
    let r = post_as_client(&server, &client, "/oauth/revoke", &[("token", access1)]).await;
    assert_eq!(r, (200, json!({})));
    let (mut revoked, _) = connections.remove(0);
    assert_eq!(
        revoked.closed_with().await,
        Some(vibe::ws::CLOSE_TOKEN_REVOKED)
    );
    // The others are open and receive what is written after the revocation.
    let post = server
        .post(&first_party, "posts", json!({"data": {"status": "open"}}))
        .await;
    for (ws, sub) in &mut connections {
        let event = ws.event(sub).await;
        assert_eq!(
            (event["event"].as_str(), &event["doc"]["id"]),
            (Some("add"), &post["id"])
        );
    }
    assert_api_error(&list_posts(&server, access1).await, 401, "token_revoked");
    assert_eq!(list_posts(&server, access2).await.0, 200);
    server.finish().await;
}

/// `token` with the block `check` appended offline, as an app holding the server's public key
/// would attenuate it.
fn attenuated_copy(server: &TestServer, token: &str, check: biscuit_auth::BlockBuilder) -> String {
    let public_key = server.server.as_ref().unwrap().app().tokens.public_key();
    biscuit_auth::Biscuit::from_base64(token, public_key)
        .unwrap()
        .append(check)
        .unwrap()
        .to_base64()
        .unwrap()
}

/// `token` attenuated offline to reads only.
fn read_only_copy(server: &TestServer, token: &str) -> String {
    attenuated_copy(
        server,
        token,
        biscuit_auth::macros::block!(r#"check if operation("read");"#),
    )
}

/// `/oauth/userinfo` runs an attenuated token's checks as for a read: a read-only copy still
/// gets the user's claims, a copy limited to writes or past its time limit gets 403.
#[tokio::test]
async fn userinfo_honours_the_checks_of_an_attenuated_token() {
    use biscuit_auth::macros::block;

    let (server, _, tokens) = ada_with_app_tokens(false).await;
    let access = field(&tokens, "access_token");
    let userinfo = |token: String| {
        call_with_headers(
            server
                .client
                .get(server.url("/oauth/userinfo"))
                .bearer_auth(token),
        )
    };
    let (status, _, info) = userinfo(read_only_copy(&server, access)).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["preferred_username"], "ada");

    let attenuate = |check| attenuated_copy(&server, access, check);
    for copy in [
        attenuate(block!(r#"check if operation("write");"#)),
        attenuate(block!(r#"check if time($t), $t < 2020-01-01T00:00:00Z;"#)),
    ] {
        let (status, headers, body) = userinfo(copy).await;
        assert_eq!(
            (status, &body["error"]),
            (403, &json!("insufficient_scope"))
        );
        assert_eq!(
            headers[reqwest::header::WWW_AUTHENTICATE],
            "Bearer error=\"insufficient_scope\""
        );
    }
    server.finish().await;
}

/// Signing out ends the first-party token on every path (REST, its attenuated copies, its live
/// connection), and only that token; an attenuated copy or an app's token cannot do it.
#[tokio::test]
async fn signing_out_ends_the_first_party_token_and_nothing_else() {
    let server = TestServer::start().await;
    sign_up(&server, "ada").await;
    let session = first_party_token(&server, "ada").await;
    let other_session = first_party_token(&server, "ada").await;
    let client = register_client(&server, false, SCOPE).await;
    let app = app_tokens(&server, &mut Browser::new(), &client, SCOPE, "ada").await;
    let read_only = read_only_copy(&server, &session);
    let sign_out = |token: &str| {
        call(
            server
                .client
                .delete(server.url("/v1/sessions"))
                .bearer_auth(token),
        )
    };
    assert_api_error(&sign_out(&read_only).await, 403, "token_restricted");
    assert_api_error(
        &sign_out(field(&app, "access_token")).await,
        403,
        "first_party_only",
    );
    assert_eq!(list_posts(&server, &session).await.0, 200);

    let mut ws = Ws::connect(&server.base, Some(&session)).await;
    assert_eq!(ws.request(json!({"op": "ping"})).await["pong"], true);
    assert_eq!(sign_out(&session).await.0, 204);
    assert_eq!(ws.closed_with().await, Some(vibe::ws::CLOSE_TOKEN_REVOKED));
    for token in [&session, &read_only] {
        assert_api_error(&list_posts(&server, token).await, 401, "token_revoked");
    }
    assert_eq!(list_posts(&server, &other_session).await.0, 200);
    assert_eq!(
        list_posts(&server, field(&app, "access_token")).await.0,
        200
    );
    server.finish().await;
}

#[tokio::test]
async fn tampered_narrow_and_attenuated_tokens_are_refused() {
    let server = TestServer::start().await;
    sign_up(&server, "ada").await;
    let client = register_client(&server, false, SCOPE).await;
    let mut browser = Browser::new();
    let full = app_tokens(&server, &mut browser, &client, SCOPE, "ada").await;
    let access = field(&full, "access_token");
    assert_eq!(create_post(&server, access).await.0, 201);

    // One character changed.
    let mut tampered = access.as_bytes().to_vec();
    let middle = tampered.len() / 2;
    tampered[middle] = if tampered[middle] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    assert_api_error(&list_posts(&server, &tampered).await, 401, "invalid_token");

    // Granted read:posts only (within the consent given above: no new consent page).
    let narrow = app_tokens(&server, &mut browser, &client, "openid read:posts", "ada").await;
    assert_eq!(narrow["scope"], "openid read:posts");
    let narrow = field(&narrow, "access_token");
    assert_eq!(list_posts(&server, narrow).await.0, 200);
    assert_api_error(&create_post(&server, narrow).await, 403, "missing_scope");

    // The app attenuates its write:posts token to reads, offline, with the server's public key.
    let attenuated = read_only_copy(&server, access);
    assert_api_error(
        &create_post(&server, &attenuated).await,
        403,
        "token_restricted",
    );
    let (status, listed) = list_posts(&server, &attenuated).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["docs"].as_array().unwrap().len(), 1);

    // A first-party token attenuated to reads cannot manage the account: no consent listing or
    // withdrawal, no key export.
    let first_party = first_party_token(&server, "ada").await;
    let read_only = read_only_copy(&server, &first_party);
    let (status, _) = call(
        server
            .client
            .get(server.url("/v1/me/apps"))
            .bearer_auth(&first_party),
    )
    .await;
    assert_eq!(status, 200);
    let listed = call(
        server
            .client
            .get(server.url("/v1/me/apps"))
            .bearer_auth(&read_only),
    )
    .await;
    assert_api_error(&listed, 403, "token_restricted");
    let withdrawn = call(
        server
            .client
            .delete(server.url(&format!("/v1/me/apps/{}", client.id)))
            .bearer_auth(&read_only),
    )
    .await;
    assert_api_error(&withdrawn, 403, "token_restricted");
    let exported = call(
        server
            .client
            .post(server.url("/v1/me/key"))
            .bearer_auth(&read_only)
            .json(&serde_json::json!({"password": common::oidc::PASSWORD})),
    )
    .await;
    assert_api_error(&exported, 403, "token_restricted");
    server.finish().await;
}

#[tokio::test]
async fn withdrawn_consent_revokes_the_apps_tokens_and_connections() {
    let server = TestServer::start().await;
    let did = sign_up(&server, "ada").await;
    let first_party = first_party_token(&server, "ada").await;
    let client = register_client(&server, false, SCOPE).await;
    let mut browser = Browser::new();
    let tokens = app_tokens(&server, &mut browser, &client, SCOPE, "ada").await;
    let access = field(&tokens, "access_token");
    let refresh_token = field(&tokens, "refresh_token");
    let apps = |token: &str| {
        call(
            server
                .client
                .get(server.url("/v1/me/apps"))
                .bearer_auth(token),
        )
    };
    let withdraw = |token: &str| {
        call(
            server
                .client
                .delete(server.url(&format!("/v1/me/apps/{}", client.id)))
                .bearer_auth(token),
        )
    };

    let (status, body) = apps(&first_party).await;
    assert_eq!(status, 200, "{body}");
    let listed = body["apps"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{body}");
    assert_eq!(listed[0]["client_id"], client.id.as_str());
    assert_eq!(listed[0]["client_name"], "Test App <&>");
    assert_eq!(
        listed[0]["scopes"],
        json!([
            "offline_access",
            "openid",
            "profile",
            "read:posts",
            "write:posts"
        ])
    );
    // The app can neither see the user's consents nor withdraw them.
    assert_api_error(&apps(access).await, 403, "first_party_only");
    assert_api_error(&withdraw(access).await, 403, "first_party_only");
    // Nor can a token the operator minted for a tool with narrower scopes.
    let narrow = server.token(&did, &["read:posts"]);
    assert_api_error(&apps(&narrow).await, 403, "missing_scope");
    assert_api_error(&withdraw(&narrow).await, 403, "missing_scope");

    // A live connection of the app, with a subscription that is receiving events.
    let mut ws = Ws::connect(&server.base, Some(access)).await;
    let reply = ws
        .request(json!({"op": "read", "type": "posts", "where": {"data.status": "open"}}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let sub = reply["sub"].clone();
    let post = server
        .post(&first_party, "posts", json!({"data": {"status": "open"}}))
        .await;
    assert_eq!(post["owner"], did.as_str(), "{post}");
    let event = ws.event(&sub).await;
    assert_eq!(
        (event["event"].as_str(), &event["doc"]["id"]),
        (Some("add"), &post["id"])
    );
    // A code issued before the withdrawal and not yet redeemed.
    let (pending_code, pending_verifier) = fresh_code(&server, &mut browser, &client).await;

    let (status, body) = withdraw(&first_party).await;
    assert_eq!((status, &body), (204, &Value::Null));
    assert_eq!(
        ws.closed_with().await,
        Some(vibe::ws::CLOSE_TOKEN_REVOKED),
        "the app's connection closes"
    );
    assert_api_error(&list_posts(&server, access).await, 401, "token_revoked");
    assert_oauth_error(
        &refresh(&server, &client, refresh_token).await,
        400,
        "invalid_grant",
    );
    assert_oauth_error(
        &redeem_code(
            &server,
            &client,
            &pending_code,
            Some(pending_verifier.as_str()),
        )
        .await,
        400,
        "invalid_grant",
    );
    // The user's own token is unaffected.
    assert_eq!(list_posts(&server, &first_party).await.0, 200);

    assert_api_error(&withdraw(&first_party).await, 404, "not_found");
    let (status, body) = apps(&first_party).await;
    assert_eq!((status, &body["apps"]), (200, &json!([])), "{body}");

    // Consent is no longer remembered: the signed-in browser is asked again, and prompt=none
    // is told so.
    let page = browser.get(&auth_url(&server, &client, &[])).await;
    assert_eq!(page.status, 200, "{page:?}");
    assert!(page.body.contains("action=\"/oauth/consent\""), "{page:?}");
    let page = browser
        .get(&auth_url(&server, &client, &[("prompt", Some("none"))]))
        .await;
    assert_error_redirect(&server, &client, &page, "consent_required");
    server.finish().await;
}

#[tokio::test]
async fn login_and_consent_forms_need_their_csrf_token_and_interaction_cookie() {
    let server = TestServer::start().await;
    sign_up(&server, "ada").await;
    let client = register_client(&server, false, SCOPE).await;
    let mut browser = Browser::new();
    let page = browser.get(&auth_url(&server, &client, &[])).await;
    assert_eq!(page.status, 200, "{page:?}");
    let interaction = page.hidden("interaction");
    let csrf = page.hidden("csrf");
    assert!(browser.cookies.contains_key("vibe_interaction"));
    let login = |csrf: &str| {
        [
            ("interaction", interaction.clone()),
            ("csrf", csrf.to_owned()),
            ("handle", "ada".to_owned()),
            ("password", PASSWORD.to_owned()),
        ]
    };
    let post = async |browser: &mut Browser, path: &str, fields: &[(&str, String)]| {
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        browser.post_form(&server.url(path), &fields).await
    };

    // The right interaction cookie, a wrong CSRF token.
    let page = post(&mut browser, "/oauth/login", &login("forged-csrf")).await;
    assert_error_page(&page);
    assert!(!browser.cookies.contains_key("vibe_session"));
    // The right CSRF token, but from a browser that did not start the interaction.
    let mut other = Browser::new();
    let page = post(&mut other, "/oauth/login", &login(&csrf)).await;
    assert_error_page(&page);
    assert!(other.cookies.is_empty(), "{:?}", other.cookies);
    let pool = server.sql().await;
    let (sessions,): (i64,) = sqlx::query_as("SELECT count(*) FROM user_sessions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(sessions, 0, "no session was created");

    // Both together: signed in, on to consent; the consent form has the same protections.
    let page = post(&mut browser, "/oauth/login", &login(&csrf)).await;
    assert_eq!(page.status, 200, "{page:?}");
    assert!(page.body.contains("action=\"/oauth/consent\""), "{page:?}");
    assert!(browser.cookies.contains_key("vibe_session"));
    let interaction = page.hidden("interaction");
    let csrf = page.hidden("csrf");
    let consent = |csrf: &str| {
        [
            ("interaction", interaction.clone()),
            ("csrf", csrf.to_owned()),
            ("decision", "allow".to_owned()),
        ]
    };
    assert_error_page(&post(&mut browser, "/oauth/consent", &consent("forged-csrf")).await);
    assert_error_page(&post(&mut Browser::new(), "/oauth/consent", &consent(&csrf)).await);
    let (consents,): (i64,) = sqlx::query_as("SELECT count(*) FROM consents")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(consents, 0, "no consent was recorded");
    let page = post(&mut browser, "/oauth/consent", &consent(&csrf)).await;
    assert_eq!(page.status, 303, "{page:?}");
    assert!(page.redirect_params().contains_key("code"), "{page:?}");
    server.finish().await;
}

/// A client gets refresh tokens only if it registered the `refresh_token` grant (without
/// `grant_types`, RFC 7591 registers `authorization_code` alone), and a client that drops the
/// grant can no longer use the refresh tokens it holds.
#[tokio::test]
async fn refresh_tokens_only_for_clients_that_registered_the_grant() {
    let server = TestServer::start().await;
    sign_up(&server, "ada").await;
    let admin = server.token("did:key:zOperator", &["admin"]);
    let register = async |metadata: &Value| {
        let (status, registered) = register_dynamically(&server, &admin, metadata).await;
        assert_eq!(status, 201, "{registered}");
        let client = client_of(&registered);
        (registered, client)
    };
    let metadata = json!({
        "redirect_uris": ["http://127.0.0.1:9/cb"], "client_name": "Codes only",
        "scope": SCOPE, "token_endpoint_auth_method": "client_secret_post",
    });
    let (registered, codes_only) = register(&metadata).await;
    assert_eq!(registered["grant_types"], json!(["authorization_code"]));
    let mut browser = Browser::new();
    let tokens = app_tokens(&server, &mut browser, &codes_only, SCOPE, "ada").await;
    assert!(tokens["refresh_token"].is_null(), "{tokens}");
    assert_eq!(tokens["scope"], "openid profile read:posts write:posts");

    let mut with_refresh = metadata.clone();
    with_refresh["grant_types"] = json!(["refresh_token", "authorization_code", "refresh_token"]);
    let (registered, client) = register(&with_refresh).await;
    assert_eq!(
        registered["grant_types"],
        json!(["authorization_code", "refresh_token"])
    );
    let tokens = app_tokens(&server, &mut browser, &client, SCOPE, "ada").await;
    let (status, refreshed) = refresh(&server, &client, field(&tokens, "refresh_token")).await;
    assert_eq!(status, 200, "{refreshed}");

    // The app updates its registration without the grant: its refresh token stops working.
    let mut dropped = metadata.clone();
    dropped["client_id"] = json!(client.id);
    dropped["client_secret"] = json!(client.secret);
    let (status, updated) = update_registration(&server, &registered, &dropped).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["grant_types"], json!(["authorization_code"]));
    let (status, body) = refresh(&server, &client, field(&refreshed, "refresh_token")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unauthorized_client")),
        "{body}"
    );

    // Refresh tokens without codes would be a client with no way to its first token.
    let mut refresh_alone = metadata.clone();
    refresh_alone["grant_types"] = json!(["refresh_token"]);
    let (status, body) = register_dynamically(&server, &admin, &refresh_alone).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_client_metadata")),
        "{body}"
    );
    server.finish().await;
}

/// A consent form posted twice at once issues one code, and a consent given after the app's
/// manifest narrowed (the page was opened before) issues none for the scopes it dropped.
#[tokio::test]
async fn a_consent_issues_one_code_and_only_within_the_current_manifest() {
    let server = TestServer::start().await;
    sign_up(&server, "ada").await;
    let admin = server.token("did:key:zOperator", &["admin"]);
    let metadata = json!({
        "redirect_uris": ["http://127.0.0.1:9/cb"], "client_name": "Narrowing",
        "scope": SCOPE, "token_endpoint_auth_method": "client_secret_post",
    });
    let (status, registered) = register_dynamically(&server, &admin, &metadata).await;
    assert_eq!(status, 201, "{registered}");
    let client = client_of(&registered);
    let post = async |browser: &mut Browser, path: &str, fields: &[(&str, &str)]| {
        browser.post_form(&server.url(path), fields).await
    };
    let mut browser = Browser::new();
    let page = browser.get(&auth_url(&server, &client, &[])).await;
    let (interaction, csrf) = (page.hidden("interaction"), page.hidden("csrf"));
    let login = [
        ("interaction", interaction.as_str()),
        ("csrf", csrf.as_str()),
        ("handle", "ada"),
        ("password", PASSWORD),
    ];
    let page = post(&mut browser, "/oauth/login", &login).await;
    assert!(page.body.contains("action=\"/oauth/consent\""), "{page:?}");
    let (interaction, csrf) = (page.hidden("interaction"), page.hidden("csrf"));
    let consent = [
        ("interaction", interaction.as_str()),
        ("csrf", csrf.as_str()),
        ("decision", "allow"),
    ];
    let mut twin = Browser::new();
    twin.cookies = browser.cookies.clone();
    let (one, two) = tokio::join!(
        post(&mut browser, "/oauth/consent", &consent),
        post(&mut twin, "/oauth/consent", &consent)
    );
    let codes = [&one, &two]
        .iter()
        .filter(|page| page.status == 303 && page.redirect_params().contains_key("code"))
        .count();
    assert_eq!(codes, 1, "{one:?} {two:?}");
    let pool = server.sql().await;
    let grants = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM oauth_grants")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_eq!(grants().await, 1);

    // A consent page opened for write:posts; meanwhile the app drops write:posts.
    let page = browser
        .get(&auth_url(&server, &client, &[("prompt", Some("consent"))]))
        .await;
    assert!(page.body.contains("action=\"/oauth/consent\""), "{page:?}");
    let (interaction, csrf) = (page.hidden("interaction"), page.hidden("csrf"));
    let mut narrowed = metadata.clone();
    narrowed["client_id"] = json!(client.id);
    narrowed["client_secret"] = json!(client.secret);
    narrowed["scope"] = json!("openid profile offline_access read:posts");
    let (status, body) = update_registration(&server, &registered, &narrowed).await;
    assert_eq!(status, 200, "{body}");
    let page = post(
        &mut browser,
        "/oauth/consent",
        &[
            ("interaction", interaction.as_str()),
            ("csrf", csrf.as_str()),
            ("decision", "allow"),
        ],
    )
    .await;
    assert_eq!(page.status, 303, "{page:?}");
    assert_eq!(
        page.redirect_params().get("error").map(String::as_str),
        Some("access_denied"),
        "{page:?}"
    );
    assert_eq!(grants().await, 1, "no grant for the dropped scope");
    pool.close().await;
    server.finish().await;
}

#[tokio::test]
async fn password_attempts_are_rate_limited_and_errors_reveal_nothing() {
    let server = TestServer::start_with(&[("identity.login_attempts_per_minute", "3")]).await;
    sign_up(&server, "ada").await;
    let attempt = |handle: &str, password: &str| {
        call(
            server
                .client
                .post(server.url("/v1/sessions"))
                .json(&json!({"handle": handle, "password": password})),
        )
    };
    let mut messages = Vec::new();
    for _ in 0..3 {
        let r = attempt("ada", "not the password").await;
        assert_api_error(&r, 401, "invalid_credentials");
        messages.push(r.1["error"]["message"].clone());
    }
    // An unknown handle fails exactly like a wrong password.
    let r = attempt("nobody", "not the password").await;
    assert_api_error(&r, 401, "invalid_credentials");
    messages.push(r.1["error"]["message"].clone());
    assert!(messages.iter().all(|m| *m == messages[0]), "{messages:?}");

    // The fourth attempt on the handle within the minute, then even the right password.
    assert_api_error(
        &attempt("ada", "not the password").await,
        429,
        "rate_limited",
    );
    assert_api_error(&attempt("ada", PASSWORD).await, 429, "rate_limited");
    // The limit is per handle, whatever its case.
    assert_api_error(&attempt("ADA", PASSWORD).await, 429, "rate_limited");
    server.finish().await;
}

/// Re-entering the password to export the key counts against the same limits as a login, so a
/// stolen session token does not buy unlimited guesses.
#[tokio::test]
async fn key_export_attempts_are_rate_limited() {
    let server = TestServer::start_with(&[("identity.login_attempts_per_minute", "3")]).await;
    sign_up(&server, "ada").await;
    let first_party = first_party_token(&server, "ada").await;
    let export = |password: &str| {
        call(
            server
                .client
                .post(server.url("/v1/me/key"))
                .bearer_auth(&first_party)
                .json(&json!({"password": password})),
        )
    };
    for _ in 0..3 {
        assert_api_error(
            &export("not the password").await,
            401,
            "invalid_credentials",
        );
    }
    assert_api_error(&export(PASSWORD).await, 429, "rate_limited");
    server.finish().await;
}

#[tokio::test]
async fn account_errors_and_the_exported_key_is_the_dids() {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    let server = TestServer::start().await;
    let did = sign_up(&server, "ada").await;
    let create = |handle: &str, password: &str| {
        call(
            server
                .client
                .post(server.url("/v1/accounts"))
                .json(&json!({"handle": handle, "password": password})),
        )
    };
    assert_api_error(&create("ada", PASSWORD).await, 409, "handle_taken");
    for bad in ["Ada", "a", "_ada", "ada smith", "ada!"] {
        assert_api_error(&create(bad, PASSWORD).await, 400, "invalid_body");
    }
    assert_api_error(&create("bea", "short").await, 400, "invalid_body");

    let first_party = first_party_token(&server, "ada").await;
    let export = |token: &str, password: &str| {
        call(
            server
                .client
                .post(server.url("/v1/me/key"))
                .bearer_auth(token)
                .json(&json!({"password": password})),
        )
    };
    let (status, wrong) = export(&first_party, "not the password").await;
    assert_eq!(
        (
            status,
            wrong["error"]["code"].as_str(),
            wrong["error"]["message"].as_str()
        ),
        (401, Some("invalid_credentials"), Some("wrong password")),
        "the token names the account: only the password can be wrong"
    );
    // An operator's token for a DID that has no account here.
    let bare = server.token("did:key:zNoAccount", &["*"]);
    assert_api_error(&export(&bare, PASSWORD).await, 404, "not_found");
    let r = server
        .client
        .post(server.url("/v1/me/key"))
        .bearer_auth(&first_party)
        .json(&json!({"password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let key: Value = r.json().await.unwrap();
    assert_eq!(key["did"], did.as_str());
    let jwk = &key["jwk"];
    assert_eq!(
        (jwk["kty"].as_str(), jwk["crv"].as_str()),
        (Some("OKP"), Some("Ed25519"))
    );
    let x: [u8; 32] = URL_SAFE_NO_PAD
        .decode(field(jwk, "x"))
        .unwrap()
        .try_into()
        .unwrap();
    let mut multicodec = vec![0xed, 0x01];
    multicodec.extend_from_slice(&x);
    assert_eq!(
        format!("did:key:z{}", bs58::encode(multicodec).into_string()),
        did
    );
    // The private half is the one of that public key.
    let d: [u8; 32] = URL_SAFE_NO_PAD
        .decode(field(jwk, "d"))
        .unwrap()
        .try_into()
        .unwrap();
    assert_eq!(
        ed25519_dalek::SigningKey::from_bytes(&d)
            .verifying_key()
            .to_bytes(),
        x
    );

    // An app the user signed in to cannot export the key, even knowing the password.
    let client = register_client(&server, false, SCOPE).await;
    let tokens = app_tokens(&server, &mut Browser::new(), &client, SCOPE, "ada").await;
    assert_api_error(
        &export(field(&tokens, "access_token"), PASSWORD).await,
        403,
        "first_party_only",
    );
    server.finish().await;
}

#[tokio::test]
async fn end_session_redirects_only_to_registered_uris() {
    let server = TestServer::start().await;
    sign_up(&server, "ada").await;
    let client = register_client(&server, false, SCOPE).await;
    let mut browser = Browser::new();
    app_tokens(&server, &mut browser, &client, SCOPE, "ada").await;
    let session = browser.cookies["vibe_session"].clone();
    let end_session = |uri: &str| {
        server.url(&format!(
            "/oauth/end-session?{}",
            serde_urlencoded::to_string([
                ("client_id", client.id.as_str()),
                ("post_logout_redirect_uri", uri),
                ("state", "bye"),
            ])
            .unwrap()
        ))
    };
    let silent = auth_url(&server, &client, &[("prompt", Some("none"))]);

    for bad in [EVIL_URI, client.redirect_uri.as_str()] {
        let page = browser.get(&end_session(bad)).await;
        assert_error_page(&page);
    }
    // Refused: the session is untouched and still signs the user in silently.
    assert_eq!(browser.cookies.get("vibe_session"), Some(&session));
    let page = browser.get(&silent).await;
    assert_eq!(page.status, 303, "{page:?}");
    assert!(page.redirect_params().contains_key("code"), "{page:?}");

    let logged_out = format!("{}/logged-out", client.redirect_uri);
    // Without an ID token of the signed-in user, the user is asked first: a link or a form on
    // any page, without the confirmation's token, leaves the session as it is.
    let page = browser.get(&end_session(&logged_out)).await;
    assert_eq!(page.status, 200, "{page:?}");
    assert!(page.body.contains("Sign out?"), "{page:?}");
    let confirmation: Vec<(&str, String)> =
        ["client_id", "post_logout_redirect_uri", "state", "csrf"]
            .into_iter()
            .map(|name| (name, page.hidden(name)))
            .collect();
    let end_session_url = server.url("/oauth/end-session");
    let forged = [
        vec![("client_id", client.id.clone())],
        vec![
            ("client_id", client.id.clone()),
            ("csrf", "guess".to_owned()),
        ],
    ];
    for fields in forged {
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let page = browser.post_form(&end_session_url, &fields).await;
        assert!(page.body.contains("Sign out?"), "{page:?}");
    }
    // Nor does an ID token the app was issued for someone else.
    sign_up(&server, "bob").await;
    let bobs = app_tokens(&server, &mut Browser::new(), &client, SCOPE, "bob").await;
    let page = browser
        .get(&server.url(&format!(
            "/oauth/end-session?{}",
            serde_urlencoded::to_string([("id_token_hint", field(&bobs, "id_token"))]).unwrap()
        )))
        .await;
    assert!(page.body.contains("Sign out?"), "{page:?}");
    assert_eq!(browser.cookies.get("vibe_session"), Some(&session));
    let page = browser.get(&silent).await;
    assert!(page.redirect_params().contains_key("code"), "{page:?}");

    let fields: Vec<(&str, &str)> = confirmation.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let page = browser.post_form(&end_session_url, &fields).await;
    assert_eq!(page.status, 303, "{page:?}");
    assert_eq!(
        page.location.as_deref(),
        Some(format!("{logged_out}?state=bye").as_str())
    );
    assert!(
        !browser.cookies.contains_key("vibe_session"),
        "the session cookie is cleared"
    );
    let page = browser.get(&silent).await;
    assert_error_redirect(&server, &client, &page, "login_required");
    // And the session is over on the server, not just forgotten by the browser.
    let mut replay = Browser::new();
    replay.cookies.insert("vibe_session".to_owned(), session);
    let page = replay.get(&silent).await;
    assert_error_redirect(&server, &client, &page, "login_required");
    server.finish().await;
}

#[tokio::test]
async fn introspection_and_revocation_check_the_client() {
    let server = TestServer::start().await;
    let client = register_client(&server, false, SCOPE).await;
    let public = register_client(&server, true, SCOPE).await;
    for c in [&client, &public] {
        let r = post_as_client(&server, c, "/oauth/introspect", &[("token", "not-a-token")]).await;
        assert_eq!(r, (200, json!({"active": false})));
    }
    let forged = RegisteredClient {
        id: client.id.clone(),
        secret: Some("not-the-secret".to_owned()),
        redirect_uri: client.redirect_uri.clone(),
    };
    let unknown = RegisteredClient {
        id: "no-such-client".to_owned(),
        secret: None,
        redirect_uri: client.redirect_uri.clone(),
    };
    // A confidential client that leaves its secret out.
    let secretless = RegisteredClient {
        id: client.id.clone(),
        secret: None,
        redirect_uri: client.redirect_uri.clone(),
    };
    for c in [&forged, &unknown, &secretless] {
        for path in ["/oauth/introspect", "/oauth/revoke"] {
            let r = post_as_client(&server, c, path, &[("token", "not-a-token")]).await;
            assert_oauth_error(&r, 401, "invalid_client");
        }
    }
    server.finish().await;
}

/// An attenuated copy of an app's access token revokes nothing (400 `unsupported_token_type`,
/// RFC 7009 §2.2.1): it carries the id of the token it was made from, and a public client's id
/// is no secret, so anyone the app handed a read-only copy to could otherwise end the app's
/// token and every copy.
#[tokio::test]
async fn an_attenuated_copy_cannot_revoke_the_token_it_was_made_from() {
    let (server, client, tokens) = ada_with_app_tokens(true).await;
    let access = field(&tokens, "access_token");
    let read_only = read_only_copy(&server, access);
    for hint in [None, Some("access_token")] {
        let mut fields = vec![("token", read_only.as_str())];
        fields.extend(hint.map(|h| ("token_type_hint", h)));
        let r = post_as_client(&server, &client, "/oauth/revoke", &fields).await;
        assert_oauth_error(&r, 400, "unsupported_token_type");
    }
    for token in [access, read_only.as_str()] {
        assert_eq!(list_posts(&server, token).await.0, 200);
    }
    // The token itself still revokes itself and its copies.
    let r = post_as_client(&server, &client, "/oauth/revoke", &[("token", access)]).await;
    assert_eq!(r, (200, json!({})));
    for token in [access, read_only.as_str()] {
        assert_api_error(&list_posts(&server, token).await, 401, "token_revoked");
    }
    server.finish().await;
}

/// Introspection answers a client about its own tokens only, and describes an attenuated token
/// by what its checks let it do now, not by the scopes it was issued with.
#[tokio::test]
async fn introspection_tells_a_client_about_its_own_tokens_as_they_can_be_used() {
    use biscuit_auth::macros::block;

    let server = TestServer::start().await;
    sign_up(&server, "ada").await;
    let client = register_client(&server, false, SCOPE).await;
    let other = register_client(&server, true, SCOPE).await;
    let mut browser = Browser::new();
    let tokens = app_tokens(&server, &mut browser, &client, SCOPE, "ada").await;
    let (access, refresh_token) = (
        field(&tokens, "access_token"),
        field(&tokens, "refresh_token"),
    );
    async fn introspect(server: &TestServer, c: &RegisteredClient, token: &str) -> (u16, Value) {
        post_as_client(server, c, "/oauth/introspect", &[("token", token)]).await
    }
    for token in [access, refresh_token] {
        let (status, own) = introspect(&server, &client, token).await;
        assert_eq!((status, &own["active"]), (200, &json!(true)), "{own}");
        assert_eq!(own["client_id"], client.id.as_str());
        assert_eq!(
            introspect(&server, &other, token).await,
            (200, json!({"active": false})),
            "another client learns nothing of the token"
        );
    }
    let first_party = first_party_token(&server, "ada").await;
    assert_eq!(
        introspect(&server, &client, &first_party).await,
        (200, json!({"active": false}))
    );

    let attenuate = |check| attenuated_copy(&server, access, check);
    let read_only = attenuate(block!(r#"check if operation("read");"#));
    let (_, narrowed) = introspect(&server, &client, &read_only).await;
    assert_eq!(narrowed["active"], true, "{narrowed}");
    assert_eq!(
        narrowed["scope"],
        "offline_access openid profile read:posts"
    );
    let lapsed = attenuate(block!(r#"check if time($t), $t < 2020-01-01T00:00:00Z;"#));
    assert_eq!(
        introspect(&server, &client, &lapsed).await,
        (200, json!({"active": false})),
        "a token whose time limit passed is not active"
    );
    server.finish().await;
}

#[tokio::test]
async fn dynamic_registration_needs_its_token_and_refuses_what_it_cannot_honour() {
    let server = TestServer::start().await;
    let register = server.url("/oauth/register");
    let admin = server.token("did:key:zOperator", &["admin"]);
    let user = server.token("did:key:zUser", &["*"]);
    let good = json!({"redirect_uris": ["http://127.0.0.1:9/cb"]});

    // Closed registration: no token, a bad one, a token without the admin scope.
    let (status, headers, body) =
        call_with_headers(server.client.post(&register).json(&good)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );
    assert!(
        headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    let (status, body) = call(
        server
            .client
            .post(&register)
            .bearer_auth("nope")
            .json(&good),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );
    let (status, body) = call(server.client.post(&register).bearer_auth(&user).json(&good)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("insufficient_scope"))
    );

    // Metadata it cannot honour, each with the RFC 7591 error code.
    let refused = [
        (
            json!({"redirect_uris": ["http://127.0.0.1:9/cb#frag"]}),
            "invalid_redirect_uri",
        ),
        (json!({"redirect_uris": []}), "invalid_redirect_uri"),
        (json!({"client_name": "No URIs"}), "invalid_redirect_uri"),
        (
            json!({"redirect_uris": ["http://127.0.0.1:9/cb"], "post_logout_redirect_uris": ["http://evil.example/x"]}),
            "invalid_redirect_uri",
        ),
        (
            json!({"redirect_uris": ["http://127.0.0.1:9/cb"], "grant_types": ["implicit"]}),
            "invalid_client_metadata",
        ),
        (
            json!({"redirect_uris": ["http://127.0.0.1:9/cb"], "response_types": ["token"]}),
            "invalid_client_metadata",
        ),
        (
            json!({"redirect_uris": ["http://127.0.0.1:9/cb"], "token_endpoint_auth_method": "private_key_jwt"}),
            "invalid_client_metadata",
        ),
        (
            json!({"redirect_uris": ["http://127.0.0.1:9/cb"], "scope": "openid *"}),
            "invalid_client_metadata",
        ),
    ];
    for (metadata, code) in refused {
        let (status, body) = call(
            server
                .client
                .post(&register)
                .bearer_auth(&admin)
                .json(&metadata),
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some(code)),
            "{metadata}"
        );
        assert!(body["error_description"].is_string());
    }
    let (status, body) = call(
        server
            .client
            .post(&register)
            .bearer_auth(&admin)
            .header("content-type", "application/json")
            .body("{not json"),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_client_metadata"))
    );

    // Minimal metadata plus fields it does not know (ignored): defaults filled in.
    let r = server
        .client
        .post(&register)
        .bearer_auth(&admin)
        .json(&json!({
            "redirect_uris": ["http://127.0.0.1:9/cb"],
            "logo_uri": "https://rp.example/logo.png",
            "contacts": ["ops@rp.example"],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let registered: Value = r.json().await.unwrap();
    assert_eq!(registered["client_name"], "127.0.0.1");
    assert_eq!(registered["scope"], "openid");
    assert_eq!(registered["grant_types"], json!(["authorization_code"]));
    assert_eq!(
        registered["token_endpoint_auth_method"],
        "client_secret_basic"
    );
    assert!(
        registered["client_secret"]
            .as_str()
            .is_some_and(|s| s.len() >= 32)
    );
    assert!(registered.get("logo_uri").is_none());

    // Only that one was stored.
    let (status, listed) = call(
        server
            .client
            .get(server.url("/v1/admin/clients"))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!(status, 200);
    let ids: Vec<&Value> = listed["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["client_id"])
        .collect();
    assert_eq!(ids, [&registered["client_id"]]);
    server.finish().await;
}

#[tokio::test]
async fn a_registration_is_managed_with_its_own_rotating_token() {
    let server = TestServer::start().await;
    sign_up(&server, "ada").await;
    let admin = server.token("did:key:zOperator", &["admin"]);
    let register = |metadata: Value| {
        let request = server
            .client
            .post(server.url("/oauth/register"))
            .bearer_auth(&admin)
            .json(&metadata);
        async move {
            let (status, body) = call(request).await;
            assert_eq!(status, 201, "{body}");
            body
        }
    };
    let metadata = json!({
        "redirect_uris": ["http://127.0.0.1:9/cb"], "client_name": "Managed",
        "scope": SCOPE, "token_endpoint_auth_method": "client_secret_post",
        "grant_types": ["authorization_code", "refresh_token"],
    });
    let registered = register(metadata.clone()).await;
    let other = register(metadata.clone()).await;
    let id = field(&registered, "client_id").to_owned();
    let uri = field(&registered, "registration_client_uri").to_owned();
    let issuer = call(
        server
            .client
            .get(server.url("/.well-known/openid-configuration")),
    )
    .await
    .1;
    assert_eq!(
        uri,
        format!("{}/oauth/register/{id}", field(&issuer, "issuer"))
    );
    let first = field(&registered, "registration_access_token").to_owned();
    let client = RegisteredClient {
        id: id.clone(),
        secret: Some(field(&registered, "client_secret").to_owned()),
        redirect_uri: "http://127.0.0.1:9/cb".to_owned(),
    };
    let read = |token: &str| call_with_headers(server.client.get(&uri).bearer_auth(token));

    // A read hands out a new registration token in its body: HEAD, which would drop the body,
    // is refused and leaves the token as it was.
    let head = server
        .client
        .head(&uri)
        .bearer_auth(&first)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 405);
    assert_eq!(head.headers()["allow"], "GET, PUT, DELETE");

    // No token, a made-up one, another client's: all the same 401 with a Bearer challenge.
    for token in [
        None,
        Some("made-up"),
        other["registration_access_token"].as_str(),
    ] {
        let request = server.client.get(&uri);
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let (status, headers, body) = call_with_headers(request).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_token")),
            "{token:?}"
        );
        assert!(
            headers["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
    }
    // An operator's client has no registration token: nothing opens its configuration.
    let operators = register_client(&server, false, SCOPE).await;
    let (status, _) = call(
        server
            .client
            .get(server.url(&format!("/oauth/register/{}", operators.id)))
            .bearer_auth(&first),
    )
    .await;
    assert_eq!(status, 401);

    // Read: the registration as stored, never the secret, and a new token replacing the old.
    let (status, headers, body) = read(&first).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(body["client_id"], registered["client_id"]);
    assert_eq!(body["client_name"], "Managed");
    assert_eq!(body["scope"], registered["scope"]);
    assert_eq!(body["token_endpoint_auth_method"], "client_secret_post");
    assert_eq!(body["registration_client_uri"], uri);
    assert!(body["client_secret"].is_null());
    let second = field(&body, "registration_access_token").to_owned();
    assert_ne!(second, first);
    assert_eq!(read(&first).await.0, 401, "the used token is replaced");

    // The app's tokens, to see which updates end them.
    let mut browser = Browser::new();
    let tokens = app_tokens(&server, &mut browser, &client, SCOPE, "ada").await;
    let access = field(&tokens, "access_token");
    assert_eq!(list_posts(&server, access).await.0, 200);

    // Updates it cannot honour change nothing, and leave the token valid.
    let put =
        |token: &str, body: Value| call(server.client.put(&uri).bearer_auth(token).json(&body));
    let mut update = metadata.clone();
    update["client_id"] = json!(id);
    update["client_name"] = json!("Managed, renamed");
    update["redirect_uris"] = json!(["http://127.0.0.1:9/cb", "http://127.0.0.1:9/cb2"]);
    update["client_secret"] = json!(client.secret);
    let refusals = [
        ("client_id", json!(null), "invalid_client_metadata"),
        (
            "client_id",
            json!(other["client_id"]),
            "invalid_client_metadata",
        ),
        (
            "client_secret",
            json!("not-the-secret"),
            "invalid_client_metadata",
        ),
        (
            "token_endpoint_auth_method",
            json!("none"),
            "invalid_client_metadata",
        ),
        (
            "redirect_uris",
            json!(["http://evil.example/cb"]),
            "invalid_redirect_uri",
        ),
        ("scope", json!("openid *"), "invalid_client_metadata"),
    ];
    for (key, value, code) in refusals {
        let mut bad = update.clone();
        bad[key] = value;
        assert_oauth_error(&put(&second, bad).await, 400, code);
    }
    let (status, _, unchanged) = read(&second).await;
    assert_eq!(status, 200);
    assert_eq!(unchanged["client_name"], "Managed");
    let third = field(&unchanged, "registration_access_token").to_owned();

    // A valid update: replaced metadata, a new token; the same scopes keep the app's tokens.
    let (status, updated) = put(&third, update.clone()).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["client_name"], "Managed, renamed");
    assert_eq!(updated["redirect_uris"], update["redirect_uris"]);
    let fourth = field(&updated, "registration_access_token").to_owned();
    assert_ne!(fourth, third);
    assert_eq!(read(&third).await.0, 401);
    assert_eq!(list_posts(&server, access).await.0, 200);

    // A narrower manifest ends the app's grants: its tokens no longer work.
    update["scope"] = json!("openid read:posts");
    let (status, narrowed) = put(&fourth, update.clone()).await;
    assert_eq!(status, 200, "{narrowed}");
    assert_eq!(narrowed["scope"], "openid read:posts");
    assert_api_error(&list_posts(&server, access).await, 401, "token_revoked");
    assert_oauth_error(
        &refresh(&server, &client, field(&tokens, "refresh_token")).await,
        400,
        "invalid_grant",
    );

    // Delete: only with the current token; then the client is gone for good.
    let fifth = field(&narrowed, "registration_access_token").to_owned();
    let delete = |token: &str| call(server.client.delete(&uri).bearer_auth(token));
    assert_eq!(delete(&fourth).await.0, 401);
    assert_eq!(delete(&fifth).await, (204, Value::Null));
    assert_eq!(read(&fifth).await.0, 401);
    assert_oauth_error(
        &post_as_client(&server, &client, "/oauth/introspect", &[("token", access)]).await,
        401,
        "invalid_client",
    );
    let (status, _) = call(server.client.post(&uri).bearer_auth(&fifth)).await;
    assert_eq!(status, 405);
    server.finish().await;
}

#[tokio::test]
async fn open_registration_is_limited_per_address() {
    let server = TestServer::start_with(&[
        ("identity.open_registration", "true"),
        ("identity.registrations_per_hour_per_address", "2"),
    ])
    .await;
    let register = server.url("/oauth/register");
    let metadata = json!({
        "redirect_uris": ["http://127.0.0.1:9/cb"],
        "client_name": "Open App",
        "token_endpoint_auth_method": "none",
        "scope": "openid read:posts",
    });
    for _ in 0..2 {
        let (status, body) = call(server.client.post(&register).json(&metadata)).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["token_endpoint_auth_method"], "none");
        assert!(body["client_secret"].is_null());
    }
    let (status, headers, body) =
        call_with_headers(server.client.post(&register).json(&metadata)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_requests"))
    );
    assert!(headers.contains_key("retry-after"));
    // An initial access token is not limited.
    let admin = server.token("did:key:zOperator", &["admin"]);
    let (status, _) = call(
        server
            .client
            .post(&register)
            .bearer_auth(&admin)
            .json(&metadata),
    )
    .await;
    assert_eq!(status, 201);
    server.finish().await;
}

/// Behind a reverse proxy listed in `http.trusted_proxies`, each client is limited by the
/// address the proxy recorded, not the proxy's own: entries the client wrote itself (left of the
/// proxy's) change nothing, and from a peer that is not listed the header is ignored.
#[tokio::test]
async fn per_address_limits_count_the_address_a_trusted_proxy_forwarded() {
    let metadata = json!({
        "redirect_uris": ["http://127.0.0.1:9/cb"],
        "token_endpoint_auth_method": "none",
        "scope": "openid read:posts",
    });
    let register = |server: &TestServer, forwarded_for: &str| {
        server
            .client
            .post(server.url("/oauth/register"))
            .header("x-forwarded-for", forwarded_for)
            .json(&metadata)
    };
    let limits = [
        ("identity.open_registration", "true"),
        ("identity.registrations_per_hour_per_address", "2"),
    ];
    let mut behind_proxy = limits.to_vec();
    behind_proxy.push(("http.trusted_proxies", r#"["10.0.0.0/8", "127.0.0.1"]"#));
    let server = TestServer::start_with(&behind_proxy).await;
    for forwarded_for in ["203.0.113.1", "198.51.100.7, 203.0.113.1, 10.0.0.2"] {
        let (status, body) = call(register(&server, forwarded_for)).await;
        assert_eq!(status, 201, "{body}");
    }
    // The client's own claim (198.51.100.8, left of what the proxy saw) does not help it.
    let (status, body) = call(register(&server, "198.51.100.8, 203.0.113.1")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_requests"))
    );
    // Another client behind the same proxy has a budget of its own.
    let (status, body) = call(register(&server, "203.0.113.2")).await;
    assert_eq!(status, 201, "{body}");
    server.finish().await;

    // Without trusted proxies every request counts against the connection's address.
    let server = TestServer::start_with(&limits).await;
    for forwarded_for in ["203.0.113.1", "203.0.113.2"] {
        let (status, body) = call(register(&server, forwarded_for)).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = call(register(&server, "203.0.113.3")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_requests"))
    );
    server.finish().await;
}

/// An app anyone registered does not get errors redirected to its URI before this browser's
/// user approved it (RFC 9700 §4.11.2: the endpoint must not be an open redirector); once
/// approved, or for an app the operator registered, errors go back to the app as usual. Its
/// post-logout URI is only used with an ID token it was issued.
#[tokio::test]
async fn an_openly_registered_app_gets_no_error_redirects_until_approved() {
    let server = TestServer::start_with(&[("identity.open_registration", "true")]).await;
    sign_up(&server, "ada").await;
    let metadata = json!({
        "redirect_uris": ["http://127.0.0.1:9/cb"],
        "post_logout_redirect_uris": ["http://127.0.0.1:9/bye"],
        "token_endpoint_auth_method": "none",
        "scope": SCOPE,
    });
    let (status, body) = call(
        server
            .client
            .post(server.url("/oauth/register"))
            .json(&metadata),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let open = RegisteredClient {
        id: field(&body, "client_id").to_owned(),
        secret: None,
        redirect_uri: "http://127.0.0.1:9/cb".to_owned(),
    };
    let operators = register_client(&server, true, SCOPE).await;
    let bad_requests: [&[(&str, Option<&str>)]; 3] = [
        &[("response_type", Some("token"))],
        &[("prompt", Some("none"))],
        &[("code_challenge_method", Some("plain"))],
    ];
    let mut browser = Browser::new();
    for changes in bad_requests {
        let page = browser.get(&auth_url(&server, &open, changes)).await;
        assert_error_page(&page);
        let page = browser.get(&auth_url(&server, &operators, changes)).await;
        assert_eq!(page.status, 303, "{changes:?}: {page:?}");
    }
    // Logging out through the app's registered URI needs an ID token the app was issued.
    let end_session = |hint: Option<&str>| {
        let mut params = vec![
            ("client_id", open.id.as_str()),
            ("post_logout_redirect_uri", "http://127.0.0.1:9/bye"),
        ];
        params.extend(hint.map(|h| ("id_token_hint", h)));
        format!(
            "{}?{}",
            server.url("/oauth/end-session"),
            serde_urlencoded::to_string(params).unwrap()
        )
    };
    let page = Browser::new().get(&end_session(None)).await;
    assert_eq!((page.status, &page.location), (200, &None), "{page:?}");

    // Ada approves the app in this browser: now its errors go back to it.
    let tokens = app_tokens(&server, &mut browser, &open, SCOPE, "ada").await;
    let page = browser
        .get(&auth_url(
            &server,
            &open,
            &[("response_type", Some("token"))],
        ))
        .await;
    assert_eq!(page.status, 303, "{page:?}");
    assert_eq!(
        page.redirect_params().get("error").map(String::as_str),
        Some("unsupported_response_type")
    );
    // Another browser, not signed in, is not sent there.
    assert_error_page(
        &Browser::new()
            .get(&auth_url(
                &server,
                &open,
                &[("response_type", Some("token"))],
            ))
            .await,
    );
    let page = browser
        .get(&end_session(Some(field(&tokens, "id_token"))))
        .await;
    assert_eq!(page.status, 303, "{page:?}");
    server.finish().await;
}

/// The end-session page of a browser that is not sent back to the app.
#[track_caller]
fn assert_signed_out_here(page: &Page) {
    assert_eq!((page.status, &page.location), (200, &None), "{page:?}");
    assert!(page.body.contains("You are signed out."), "{page:?}");
}

/// Follows the end-session `link` (with an ID token hint, a post-logout URI and state) in
/// `browser`, whose user is asked first, and confirms; returns the answer to the confirmation.
async fn end_session_confirmed(server: &TestServer, browser: &mut Browser, link: &str) -> Page {
    let page = browser.get(link).await;
    assert_eq!((page.status, &page.location), (200, &None), "{page:?}");
    assert!(page.body.contains("Sign out?"), "{page:?}");
    let carried: Vec<(&str, String)> =
        ["id_token_hint", "post_logout_redirect_uri", "state", "csrf"]
            .into_iter()
            .map(|name| (name, page.hidden(name)))
            .collect();
    let fields: Vec<(&str, &str)> = carried.iter().map(|(k, v)| (*k, v.as_str())).collect();
    browser
        .post_form(&server.url("/oauth/end-session"), &fields)
        .await
}

/// Anyone may register an app with a post-logout URI of their choosing and sign in to it for an
/// ID token, so a link to end-session carrying that token must send no one else's browser there
/// (RFC 9700 §4.11.2): not a browser no one is signed in on, not one whose user has not approved
/// the app. Those are signed out (once confirmed) and shown a page; the browser of the hint's
/// user, or of a user who approved the app, goes back to it.
#[tokio::test]
async fn end_session_sends_no_one_elses_browser_to_an_openly_registered_app() {
    let server = TestServer::start_with(&[("identity.open_registration", "true")]).await;
    sign_up(&server, "mallory").await;
    sign_up(&server, "ada").await;
    let evil = "https://evil.example/bye";
    let (status, body) = call(
        server
            .client
            .post(server.url("/oauth/register"))
            .json(&json!({
                "redirect_uris": ["http://127.0.0.1:9/cb"],
                "post_logout_redirect_uris": [evil],
                "token_endpoint_auth_method": "none",
                "scope": SCOPE,
            })),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let open = RegisteredClient {
        id: field(&body, "client_id").to_owned(),
        secret: None,
        redirect_uri: "http://127.0.0.1:9/cb".to_owned(),
    };
    let mut mallorys = Browser::new();
    let tokens = app_tokens(&server, &mut mallorys, &open, SCOPE, "mallory").await;
    let link = server.url(&format!(
        "/oauth/end-session?{}",
        serde_urlencoded::to_string([
            ("id_token_hint", field(&tokens, "id_token")),
            ("post_logout_redirect_uri", evil),
            ("state", "bye"),
        ])
        .unwrap()
    ));

    assert_signed_out_here(&Browser::new().get(&link).await);

    // Ada, signed in through an app the operator registered, has not approved Mallory's.
    let operators = register_client(&server, true, SCOPE).await;
    let mut adas = Browser::new();
    app_tokens(&server, &mut adas, &operators, SCOPE, "ada").await;
    assert_signed_out_here(&end_session_confirmed(&server, &mut adas, &link).await);
    assert!(
        !adas.cookies.contains_key("vibe_session"),
        "signed out all the same"
    );

    // Once she has approved it, she trusts its URIs.
    let mut approving = Browser::new();
    app_tokens(&server, &mut approving, &open, SCOPE, "ada").await;
    let page = end_session_confirmed(&server, &mut approving, &link).await;
    assert_eq!(page.status, 303, "{page:?}");
    assert_eq!(
        page.location.as_deref(),
        Some(format!("{evil}?state=bye").as_str())
    );

    // Mallory's own browser: her session, her hint, back to her app without being asked.
    let page = mallorys.get(&link).await;
    assert_eq!(page.status, 303, "{page:?}");
    assert_eq!(
        page.location.as_deref(),
        Some(format!("{evil}?state=bye").as_str())
    );
    assert!(!mallorys.cookies.contains_key("vibe_session"));
    server.finish().await;
}

/// A grant is only written while the user's consent covers it, and a withdrawal racing a
/// silent sign-in never leaves a grant it did not revoke.
#[tokio::test]
async fn grants_need_a_covering_consent_even_against_a_racing_withdrawal() {
    use vibe::identity::oauth::{AuthorizationRequest, OAuthError};

    let server = TestServer::start().await;
    let did = sign_up(&server, "ada").await;
    let client = register_client(&server, true, SCOPE).await;
    let app = server.server.as_ref().unwrap().app().clone();
    let oauth = &app.identity.oauth;
    let request = |scopes: &[&str]| AuthorizationRequest {
        client_id: client.id.clone(),
        redirect_uri: client.redirect_uri.clone(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        state: None,
        nonce: None,
        code_challenge: None,
        prompt: Some("none".into()),
        max_age: None,
    };
    let now = chrono::Utc::now();
    let narrow = request(&["openid", "read:posts"]);
    assert!(matches!(
        oauth.issue_code(&narrow, &did, now).await,
        Err(OAuthError::AccessDenied)
    ));
    oauth
        .save_consent(&did, &client.id, &narrow.scopes)
        .await
        .unwrap();
    oauth.issue_code(&narrow, &did, now).await.unwrap();
    let wider = request(&["openid", "read:posts", "write:posts"]);
    assert!(matches!(
        oauth.issue_code(&wider, &did, now).await,
        Err(OAuthError::AccessDenied)
    ));

    let revocations = app.tokens.revocations().clone();
    for _ in 0..20 {
        oauth
            .save_consent(&did, &client.id, &narrow.scopes)
            .await
            .unwrap();
        let (issued, withdrawn) = tokio::join!(
            oauth.issue_code(&narrow, &did, now),
            oauth.revoke_consent(&did, &client.id, &revocations),
        );
        withdrawn.unwrap();
        assert!(matches!(issued, Ok(_) | Err(OAuthError::AccessDenied)));
        let pool = server.sql().await;
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM oauth_grants \
             WHERE user_did = $1 AND client_id = $2 AND revoked_at IS NULL",
        )
        .bind(&did)
        .bind(&client.id)
        .fetch_one(&pool)
        .await
        .unwrap();
        pool.close().await;
        assert_eq!(live, 0, "a grant outlived the consent's withdrawal");
    }
    server.finish().await;
}

/// A grant revoked on a node whose access tokens live 15 minutes stays revoked, on every node,
/// as long as the 2-hour token another node minted from it: the revocation is kept past the
/// grant's latest recorded access-token expiry, not the revoking node's lifetime (the token
/// verified again everywhere once the entry was pruned).
#[tokio::test]
async fn a_revoked_grant_outlives_its_longest_lived_access_token() {
    let (name, url) = common::fresh_database().await;
    let long = TestServer::start_on(&url, &[("identity.access_token_ttl", "\"2h\"")]).await;
    let short = long
        .another_node(&[("identity.access_token_ttl", "\"15m\"")])
        .await;
    sign_up(&long, "ada").await;
    let first_party = first_party_token(&long, "ada").await;
    let client = register_client(&long, false, SCOPE).await;
    let mut browser = Browser::new();
    let tokens = app_tokens(&long, &mut browser, &client, SCOPE, "ada").await;
    assert_eq!(tokens["expires_in"], 7200, "{tokens}");
    let minted = chrono::Utc::now();

    let (status, body) = call(
        short
            .client
            .delete(short.url(&format!("/v1/me/apps/{}", client.id)))
            .bearer_auth(&first_party),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let sql = long.sql().await;
    let kept_until: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "SELECT max(expires_at) FROM token_revocations WHERE revoked LIKE 'grant:%'",
    )
    .fetch_one(&sql)
    .await
    .unwrap();
    assert!(
        kept_until >= minted + chrono::Duration::hours(2),
        "kept until {kept_until}, the token lives until {}",
        minted + chrono::Duration::hours(2)
    );
    // And a refresh of the revoked grant mints nothing more.
    let (status, body) = refresh(&short, &client, field(&tokens, "refresh_token")).await;
    assert_eq!(status, 400, "{body}");
    sql.close().await;
    long.finish().await;
    short.finish().await;
    common::drop_database(&name).await;
}
