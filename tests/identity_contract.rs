//! Promises of docs/identity.md that no other test holds the server to: revocations reaching
//! every node, RFC 7009 revocation refusing another client's token, the admin API's client
//! deletion, per-address password limits (behind trusted proxies too), `prompt=login` and
//! `max_age`, userinfo by scope, the OAuth pages' cookies and headers, the secrets key's file
//! mode, certificate proofs checked without the server, closed sign-up, the certificates API's
//! errors and order, password lengths in bytes, `/v1/me`, the ID token's `azp`, `auth_time` and
//! `at_hash`, and expired login forms and browser sessions. Each test runs its own server on its
//! own database; expiries are set in SQL, nothing waits on a clock.

#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use common::oidc::{
    Browser, CHALLENGE, PASSWORD, Page, RegisteredClient, SCOPE, STATE, app_tokens,
    assert_api_error, assert_error_redirect, assert_oauth_error, authorize_url, call,
    call_with_headers, field, first_party_token, list_posts, post_as_client, refresh,
    register_client, sign_up,
};
use common::{TestServer, Ws};
use serde_json::{Value, json};

/// A valid authorization request for `client` (PKCE, state, nonce), with `changes` applied (a
/// value replaces or adds the parameter, None removes it).
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
        ("nonce", "n-42"),
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

#[track_caller]
fn assert_login_form(page: &Page) {
    assert_eq!(page.status, 200, "expected the login form: {page:?}");
    assert!(
        page.body.contains("action=\"/oauth/login\""),
        "expected the login form: {page:?}"
    );
}

/// A 303 back to the client's redirect URI carrying a code and the request's state.
#[track_caller]
fn assert_code_redirect(client: &RegisteredClient, page: &Page) {
    assert_eq!(
        page.status, 303,
        "expected a redirect with a code: {page:?}"
    );
    let location = page.location.as_deref().unwrap();
    assert!(
        location.starts_with(&format!("{}?", client.redirect_uri)),
        "{location}"
    );
    let params = page.redirect_params();
    assert!(params.contains_key("code"), "{location}");
    assert_eq!(params.get("state").map(String::as_str), Some(STATE));
}

/// The page a login or consent form gets once its interaction has expired: an error page, no
/// redirect.
#[track_caller]
fn assert_expired_page(page: &Page) {
    assert_eq!(page.status, 400, "{page:?}");
    assert_eq!(
        page.location, None,
        "an expired form redirects nowhere: {page:?}"
    );
    assert!(page.body.contains("Cannot continue"), "{page:?}");
    assert!(page.body.contains("has expired"), "{page:?}");
}

/// Posts the login form of `page` as `handle` with the right password.
async fn submit_login(
    server: &TestServer,
    browser: &mut Browser,
    page: &Page,
    handle: &str,
) -> Page {
    let interaction = page.hidden("interaction");
    let csrf = page.hidden("csrf");
    browser
        .post_form(
            &server.url("/oauth/login"),
            &[
                ("interaction", interaction.as_str()),
                ("csrf", csrf.as_str()),
                ("handle", handle),
                ("password", PASSWORD),
            ],
        )
        .await
}

fn timestamp(value: &Value) -> DateTime<Utc> {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a timestamp: {value}"))
        .parse()
        .unwrap_or_else(|e| panic!("not an RFC 3339 timestamp ({e}): {value}"))
}

/// The claims of a JWT, read without verifying it.
fn jwt_claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).expect("a JWT has a payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url payload"))
        .expect("a JSON payload")
}

/// OIDC Core §3.1.3.6: base64url of the left half of the access token's SHA-256.
fn expected_at_hash(access_token: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(access_token.as_bytes());
    URL_SAFE_NO_PAD.encode(&digest[..16])
}

/// A revocation made on one node is honoured by another within its
/// `identity.revocation_poll_interval`: a signed-out first-party token and an RFC 7009-revoked
/// app token get 401 `token_revoked` on node B too, and their WebSockets held on B close with
/// 4003, while the tokens not revoked keep working there.
#[tokio::test]
async fn a_revocation_on_one_node_is_honoured_on_every_node() {
    let a = TestServer::start().await;
    let b = a
        .another_node(&[("identity.revocation_poll_interval", "\"50ms\"")])
        .await;
    sign_up(&a, "ada").await;
    let first_party = first_party_token(&a, "ada").await;
    let client = register_client(&a, false, SCOPE).await;
    let tokens = app_tokens(&a, &mut Browser::new(), &client, SCOPE, "ada").await;
    let access = field(&tokens, "access_token");
    for token in [first_party.as_str(), access] {
        assert_eq!(
            list_posts(&b, token).await.0,
            200,
            "node B accepts the token before any revocation"
        );
    }
    let mut first_party_ws = Ws::connect(&b.base, Some(&first_party)).await;
    assert_eq!(
        first_party_ws.request(json!({"op": "ping"})).await["pong"],
        true
    );
    let mut app_ws = Ws::connect(&b.base, Some(access)).await;
    assert_eq!(app_ws.request(json!({"op": "ping"})).await["pong"], true);

    // Signed out on A: refused on A at once, on B after its next poll.
    let (status, body) = call(
        a.client
            .delete(a.url("/v1/sessions"))
            .bearer_auth(&first_party),
    )
    .await;
    assert_eq!((status, &body), (204, &Value::Null), "sign-out on node A");
    assert_api_error(&list_posts(&a, &first_party).await, 401, "token_revoked");
    common::until("node B refuses the signed-out token", || async {
        list_posts(&b, &first_party).await.0 != 200
    })
    .await;
    assert_api_error(&list_posts(&b, &first_party).await, 401, "token_revoked");
    assert_eq!(
        first_party_ws.closed_with().await,
        Some(vibe::ws::CLOSE_TOKEN_REVOKED),
        "the signed-out token's connection on node B closes"
    );
    // The app's token was not revoked: it still works on B, its connection still answers.
    assert_eq!(list_posts(&b, access).await.0, 200);
    assert_eq!(app_ws.request(json!({"op": "ping"})).await["pong"], true);

    // RFC 7009 revocation of the app's access token on A.
    let r = post_as_client(&a, &client, "/oauth/revoke", &[("token", access)]).await;
    assert_eq!(r, (200, json!({})), "revocation on node A");
    common::until("node B refuses the revoked access token", || async {
        list_posts(&b, access).await.0 != 200
    })
    .await;
    assert_api_error(&list_posts(&b, access).await, 401, "token_revoked");
    assert_eq!(
        app_ws.closed_with().await,
        Some(vibe::ws::CLOSE_TOKEN_REVOKED),
        "the revoked token's connection on node B closes"
    );
    b.finish().await;
    a.finish().await;
}

/// RFC 7009 revocation by a client of a token issued to another client (an access token or a
/// refresh token) is refused with 400 `unauthorized_client` and revokes nothing: the owner's
/// tokens keep working.
#[tokio::test]
async fn revoking_another_clients_token_is_refused_and_revokes_nothing() {
    let server = TestServer::start().await;
    sign_up(&server, "ada").await;
    let owner = register_client(&server, false, SCOPE).await;
    let confidential = register_client(&server, false, SCOPE).await;
    let public = register_client(&server, true, SCOPE).await;
    let tokens = app_tokens(&server, &mut Browser::new(), &owner, SCOPE, "ada").await;
    let access = field(&tokens, "access_token");
    let refresh_token = field(&tokens, "refresh_token");

    for other in [&confidential, &public] {
        for (token, hint) in [(access, "access_token"), (refresh_token, "refresh_token")] {
            let r = post_as_client(&server, other, "/oauth/revoke", &[("token", token)]).await;
            assert_oauth_error(&r, 400, "unauthorized_client");
            let r = post_as_client(
                &server,
                other,
                "/oauth/revoke",
                &[("token", token), ("token_type_hint", hint)],
            )
            .await;
            assert_oauth_error(&r, 400, "unauthorized_client");
        }
    }
    // Nothing was revoked: the access token opens documents, introspects as active to its
    // owner, and the refresh token rotates.
    assert_eq!(list_posts(&server, access).await.0, 200);
    let (status, body) =
        post_as_client(&server, &owner, "/oauth/introspect", &[("token", access)]).await;
    assert_eq!((status, &body["active"]), (200, &json!(true)), "{body}");
    let (status, refreshed) = refresh(&server, &owner, refresh_token).await;
    assert_eq!(
        status, 200,
        "the owner's refresh token still works: {refreshed}"
    );
    assert_eq!(
        list_posts(&server, field(&refreshed, "access_token"))
            .await
            .0,
        200
    );
    server.finish().await;
}

/// The accounts (rows of `users`) matching `condition`, a fixed SQL condition of the test's own.
async fn accounts(server: &TestServer, condition: &str) -> i64 {
    let pool = server.sql().await;
    let count = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM users WHERE {condition}"
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    count
}

/// `DELETE /v1/admin/clients/{id}` (a token with the `admin` scope) removes the app and revokes
/// every token issued to it — its access token gets 401 `token_revoked`, its WebSocket closes
/// with 4003, its refresh token is refused — and nothing else: another app's tokens and the
/// user's own keep working. An unknown id is 404 `not_found`; a token with `*` but not `admin`
/// is 403 `missing_scope`.
#[tokio::test]
async fn deleting_a_client_through_the_admin_api_revokes_its_tokens() {
    let server = TestServer::start().await;
    sign_up(&server, "ada").await;
    let first_party = first_party_token(&server, "ada").await;
    let admin = server.token("did:key:zOperator", &["admin"]);
    let everything_but_admin = server.token("did:key:zOperator", &["*"]);
    let client = register_client(&server, false, SCOPE).await;
    let other = register_client(&server, false, SCOPE).await;
    let mut browser = Browser::new();
    let tokens = app_tokens(&server, &mut browser, &client, SCOPE, "ada").await;
    let others = app_tokens(&server, &mut browser, &other, SCOPE, "ada").await;
    let access = field(&tokens, "access_token");
    let delete = |token: &str, id: &str| {
        call(
            server
                .client
                .delete(server.url(&format!("/v1/admin/clients/{id}")))
                .bearer_auth(token),
        )
    };

    // Neither a `*` token nor a first-party one may remove apps.
    for token in [everything_but_admin.as_str(), first_party.as_str()] {
        assert_api_error(&delete(token, &client.id).await, 403, "missing_scope");
    }
    assert_eq!(
        list_posts(&server, access).await.0,
        200,
        "nothing was deleted"
    );
    assert_api_error(&delete(&admin, "no-such-client").await, 404, "not_found");

    let mut ws = Ws::connect(&server.base, Some(access)).await;
    assert_eq!(ws.request(json!({"op": "ping"})).await["pong"], true);
    assert_eq!(delete(&admin, &client.id).await, (204, Value::Null));
    assert_eq!(
        ws.closed_with().await,
        Some(vibe::ws::CLOSE_TOKEN_REVOKED),
        "the app's connection closes"
    );
    assert_api_error(&list_posts(&server, access).await, 401, "token_revoked");
    // The app is gone, so its refresh token finds no client to be presented by.
    let r = refresh(&server, &client, field(&tokens, "refresh_token")).await;
    assert_oauth_error(&r, 401, "invalid_client");
    assert_api_error(&delete(&admin, &client.id).await, 404, "not_found");
    let (status, listed) = call(
        server
            .client
            .get(server.url("/v1/admin/clients"))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!(status, 200, "{listed}");
    let ids: Vec<&str> = listed["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [other.id.as_str()], "{listed}");
    // Its consent went with it.
    let (status, apps) = call(
        server
            .client
            .get(server.url("/v1/me/apps"))
            .bearer_auth(&first_party),
    )
    .await;
    assert_eq!(status, 200, "{apps}");
    let consented: Vec<&str> = apps["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["client_id"].as_str().unwrap())
        .collect();
    assert_eq!(consented, [other.id.as_str()], "{apps}");

    // Nothing else was revoked.
    assert_eq!(
        list_posts(&server, field(&others, "access_token")).await.0,
        200
    );
    let (status, body) = refresh(&server, &other, field(&others, "refresh_token")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(list_posts(&server, &first_party).await.0, 200);
    server.finish().await;
}

/// A password attempt (`POST /v1/sessions`, `POST /v1/accounts`) as the peer at `forwarded_for`
/// claims to be, if given: status and JSON body.
async fn attempt(
    server: &TestServer,
    path: &str,
    handle: &str,
    password: &str,
    forwarded_for: Option<&str>,
) -> (u16, Value) {
    let mut request = server
        .client
        .post(server.url(path))
        .json(&json!({"handle": handle, "password": password}));
    if let Some(f) = forwarded_for {
        request = request.header("x-forwarded-for", f);
    }
    call(request).await
}

/// `identity.login_attempts_per_minute_per_address` bounds the password attempts of one client
/// address whatever the handles they name: logins naming four different handles, and four
/// sign-ups, get 429 `rate_limited` on the fourth with a limit of 3, however high the
/// per-account limit. Without `http.trusted_proxies`, `X-Forwarded-For` changes nothing.
#[tokio::test]
async fn password_attempts_are_limited_per_address() {
    let limits = [
        ("identity.login_attempts_per_minute", "1000"),
        ("identity.login_attempts_per_minute_per_address", "3"),
    ];
    let server = TestServer::start_with(&limits).await;
    for handle in ["nobody1", "nobody2", "nobody3"] {
        let r = attempt(&server, "/v1/sessions", handle, "not the password", None).await;
        assert_api_error(&r, 401, "invalid_credentials");
    }
    let r = attempt(&server, "/v1/sessions", "nobody4", "not the password", None).await;
    assert_api_error(&r, 429, "rate_limited");
    // The header is not believed from a peer that is not a listed proxy.
    let r = attempt(
        &server,
        "/v1/sessions",
        "nobody5",
        "not the password",
        Some("203.0.113.9"),
    )
    .await;
    assert_api_error(&r, 429, "rate_limited");
    server.finish().await;

    let server = TestServer::start_with(&limits).await;
    for handle in ["user1", "user2", "user3"] {
        let (status, body) = attempt(&server, "/v1/accounts", handle, PASSWORD, None).await;
        assert_eq!(status, 201, "sign-up of {handle}: {body}");
    }
    let r = attempt(&server, "/v1/accounts", "user4", PASSWORD, None).await;
    assert_api_error(&r, 429, "rate_limited");
    assert_eq!(
        accounts(&server, "handle = 'user4'").await,
        0,
        "a refused sign-up creates no account"
    );
    server.finish().await;
}

/// Behind a proxy listed in `http.trusted_proxies`, the per-address password limit counts the
/// address the proxy recorded: each forwarded client has a budget of its own, and an entry the
/// client prepended itself (`198.51.100.9, 203.0.113.1`) still counts against 203.0.113.1.
#[tokio::test]
async fn per_address_password_limits_count_the_address_a_trusted_proxy_forwarded() {
    let server = TestServer::start_with(&[
        ("identity.login_attempts_per_minute", "1000"),
        ("identity.login_attempts_per_minute_per_address", "3"),
        ("http.trusted_proxies", r#"["127.0.0.1"]"#),
    ])
    .await;
    let login = |handle: &'static str, forwarded_for: Option<&'static str>| {
        attempt(
            &server,
            "/v1/sessions",
            handle,
            "not the password",
            forwarded_for,
        )
    };
    for handle in ["nobody1", "nobody2", "nobody3"] {
        assert_api_error(
            &login(handle, Some("203.0.113.1")).await,
            401,
            "invalid_credentials",
        );
    }
    assert_api_error(
        &login("nobody4", Some("203.0.113.1")).await,
        429,
        "rate_limited",
    );
    // A client claiming another address left of what the proxy saw is still 203.0.113.1.
    assert_api_error(
        &login("nobody5", Some("198.51.100.9, 203.0.113.1")).await,
        429,
        "rate_limited",
    );
    // Other clients behind the proxy, and the proxy's own requests, have budgets of their own.
    for forwarded_for in [Some("203.0.113.2"), Some("198.51.100.9"), None] {
        assert_api_error(
            &login("nobody6", forwarded_for).await,
            401,
            "invalid_credentials",
        );
    }

    // Sign-ups are counted by the forwarded address too.
    for handle in ["user1", "user2", "user3"] {
        let (status, body) = attempt(
            &server,
            "/v1/accounts",
            handle,
            PASSWORD,
            Some("203.0.113.4"),
        )
        .await;
        assert_eq!(status, 201, "sign-up of {handle}: {body}");
    }
    let r = attempt(
        &server,
        "/v1/accounts",
        "user4",
        PASSWORD,
        Some("198.51.100.10, 203.0.113.4"),
    )
    .await;
    assert_api_error(&r, 429, "rate_limited");
    let (status, body) = attempt(
        &server,
        "/v1/accounts",
        "user5",
        PASSWORD,
        Some("203.0.113.5"),
    )
    .await;
    assert_eq!(status, 201, "another forwarded client signs up: {body}");
    server.finish().await;
}

/// `prompt=login` shows the login form to a browser already signed in (and consented), and
/// signing in again goes on to the app; `max_age` asks for a login when the session's sign-in is
/// older than that many seconds (`max_age=0` always, as `prompt=login`), not when it is recent
/// enough.
#[tokio::test]
async fn prompt_login_and_max_age_force_a_fresh_login() {
    let server = TestServer::start().await;
    sign_up(&server, "ada").await;
    let client = register_client(&server, false, SCOPE).await;
    let mut browser = Browser::new();
    app_tokens(&server, &mut browser, &client, SCOPE, "ada").await;
    let session = browser.cookies["vibe_session"].clone();

    // Signed in and consented: straight back to the app, silently or not.
    let page = browser
        .get(&auth_url(&server, &client, &[("prompt", Some("none"))]))
        .await;
    assert_code_redirect(&client, &page);
    assert_code_redirect(
        &client,
        &browser.get(&auth_url(&server, &client, &[])).await,
    );

    let page = browser
        .get(&auth_url(&server, &client, &[("prompt", Some("login"))]))
        .await;
    assert_login_form(&page);
    let page = submit_login(&server, &mut browser, &page, "ada").await;
    assert_code_redirect(&client, &page);
    assert_ne!(
        browser.cookies["vibe_session"], session,
        "the new login started a new session"
    );
    // max_age=0 is prompt=login (OpenID Connect Core 3.1.2.1), within the second of a sign-in too.
    let page = browser
        .get(&auth_url(&server, &client, &[("max_age", Some("0"))]))
        .await;
    assert_login_form(&page);

    // The session's sign-in a minute ago: recent enough for an hour, not for 30 s or 0 s.
    let pool = server.sql().await;
    let backdated =
        sqlx::query("UPDATE user_sessions SET auth_time = auth_time - interval '1 minute'")
            .execute(&pool)
            .await
            .unwrap();
    assert!(backdated.rows_affected() >= 1);
    pool.close().await;
    let page = browser
        .get(&auth_url(&server, &client, &[("max_age", Some("3600"))]))
        .await;
    assert_code_redirect(&client, &page);
    for max_age in ["30", "0"] {
        let page = browser
            .get(&auth_url(&server, &client, &[("max_age", Some(max_age))]))
            .await;
        assert_login_form(&page);
    }
    // max_age=0 with prompt=none cannot show the form: login_required.
    let page = browser
        .get(&auth_url(
            &server,
            &client,
            &[("max_age", Some("0")), ("prompt", Some("none"))],
        ))
        .await;
    assert_error_redirect(&server, &client, &page, "login_required");
    let page = browser
        .get(&auth_url(&server, &client, &[("max_age", Some("0"))]))
        .await;
    let page = submit_login(&server, &mut browser, &page, "ada").await;
    assert_code_redirect(&client, &page);
    server.finish().await;
}

/// `/oauth/userinfo` (GET and POST) needs an access token with `openid`: without it (an app token
/// granted only document scopes, a first-party token) 403 `insufficient_scope` with a Bearer
/// challenge; with `openid` it answers `sub`, and the handle as `preferred_username` only with
/// `profile`.
#[tokio::test]
async fn userinfo_answers_by_the_openid_and_profile_scopes() {
    let server = TestServer::start().await;
    let did = sign_up(&server, "ada").await;
    let client = register_client(&server, false, SCOPE).await;
    let first_party = first_party_token(&server, "ada").await;
    let mut browser = Browser::new();
    let token_for = async |browser: &mut Browser, scope: &str| {
        let tokens = app_tokens(&server, browser, &client, scope, "ada").await;
        field(&tokens, "access_token").to_owned()
    };
    let no_openid = token_for(&mut browser, "read:posts").await;
    let openid_only = token_for(&mut browser, "openid read:posts").await;
    let with_profile = token_for(&mut browser, "openid profile read:posts").await;
    let userinfo_get = |token: &str| {
        call_with_headers(
            server
                .client
                .get(server.url("/oauth/userinfo"))
                .bearer_auth(token),
        )
    };
    let userinfo_post = |token: &str| {
        call_with_headers(
            server
                .client
                .post(server.url("/oauth/userinfo"))
                .bearer_auth(token),
        )
    };

    for token in [no_openid.as_str(), first_party.as_str()] {
        for (status, headers, body) in [userinfo_get(token).await, userinfo_post(token).await] {
            assert_eq!(
                (status, body["error"].as_str()),
                (403, Some("insufficient_scope")),
                "{body}"
            );
            assert_eq!(
                headers[reqwest::header::WWW_AUTHENTICATE],
                "Bearer error=\"insufficient_scope\""
            );
        }
    }
    // The token without openid is otherwise good.
    assert_eq!(list_posts(&server, &no_openid).await.0, 200);

    for (status, _, info) in [
        userinfo_get(&openid_only).await,
        userinfo_post(&openid_only).await,
    ] {
        assert_eq!(status, 200, "{info}");
        assert_eq!(info["sub"], did.as_str(), "{info}");
        assert!(
            info.get("preferred_username").is_none(),
            "the handle needs profile: {info}"
        );
    }
    for (status, _, info) in [
        userinfo_get(&with_profile).await,
        userinfo_post(&with_profile).await,
    ] {
        assert_eq!(status, 200, "{info}");
        assert_eq!(info["sub"], did.as_str(), "{info}");
        assert_eq!(info["preferred_username"], "ada", "{info}");
    }
    let (status, _, body) = userinfo_get("not-a-token").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );
    server.finish().await;
}

/// The `Set-Cookie` line named `name` among `headers`, parsed.
fn set_cookie(headers: &reqwest::header::HeaderMap, name: &str) -> cookie::Cookie<'static> {
    headers
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .map(|v| cookie::Cookie::parse(v.to_str().unwrap().to_owned()).unwrap())
        .find(|c| c.name() == name)
        .unwrap_or_else(|| panic!("no {name} cookie set: {headers:?}"))
}

/// The headers every provider page carries: no framing, no caching.
#[track_caller]
fn assert_page_headers(headers: &reqwest::header::HeaderMap, what: &str) {
    let csp = headers
        .get(reqwest::header::CONTENT_SECURITY_POLICY)
        .unwrap_or_else(|| panic!("{what}: no Content-Security-Policy"))
        .to_str()
        .unwrap();
    assert!(
        csp.contains("frame-ancestors 'none'"),
        "{what}: the page may be framed: {csp}"
    );
    assert_eq!(
        headers[reqwest::header::CACHE_CONTROL],
        "no-store",
        "{what}: the page may be cached"
    );
    assert!(
        headers[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html"),
        "{what}"
    );
}

/// The OAuth pages' cookies and headers: the interaction (CSRF) cookie is `SameSite=Strict`,
/// scoped to `/oauth`; the session cookie is `HttpOnly`, `SameSite=Lax`, and `Secure` exactly
/// when `identity.issuer` is https; the login, consent and error pages forbid framing
/// (`frame-ancestors 'none'`) and caching (`Cache-Control: no-store`).
#[tokio::test]
async fn oauth_pages_set_strict_cookies_and_forbid_framing_and_caching() {
    for issuer in [Some("https://id.example.test"), None] {
        let secure = issuer.is_some();
        let quoted = issuer.map(|i| format!("\"{i}\""));
        let overrides: Vec<(&str, &str)> = quoted
            .iter()
            .map(|q| ("identity.issuer", q.as_str()))
            .collect();
        let server = TestServer::start_with(&overrides).await;
        sign_up(&server, "ada").await;
        let client = register_client(&server, false, SCOPE).await;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();

        let r = http
            .get(auth_url(&server, &client, &[]))
            .send()
            .await
            .unwrap();
        let headers = r.headers().clone();
        let page = Page {
            status: r.status().as_u16(),
            location: None,
            body: r.text().await.unwrap(),
        };
        assert_login_form(&page);
        assert_page_headers(&headers, "the login page");
        let interaction = set_cookie(&headers, "vibe_interaction");
        assert_eq!(
            interaction.same_site(),
            Some(cookie::SameSite::Strict),
            "{interaction}"
        );
        assert_eq!(interaction.path(), Some("/oauth"), "{interaction}");
        assert_eq!(interaction.value(), page.hidden("interaction"));

        let form = serde_urlencoded::to_string([
            ("interaction", page.hidden("interaction")),
            ("csrf", page.hidden("csrf")),
            ("handle", "ada".to_owned()),
            ("password", PASSWORD.to_owned()),
        ])
        .unwrap();
        let r = http
            .post(server.url("/oauth/login"))
            .header(
                "cookie",
                format!("vibe_interaction={}", interaction.value()),
            )
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .unwrap();
        let headers = r.headers().clone();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("action=\"/oauth/consent\""), "{body}");
        assert_page_headers(&headers, "the consent page");
        let session = set_cookie(&headers, "vibe_session");
        assert_eq!(session.http_only(), Some(true), "{session}");
        assert_eq!(
            session.same_site(),
            Some(cookie::SameSite::Lax),
            "{session}"
        );
        assert_eq!(
            session.secure().unwrap_or(false),
            secure,
            "issuer {issuer:?}: {session}"
        );

        let r = http
            .get(server.url("/oauth/authorize?client_id=no-such-client"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        assert_page_headers(r.headers(), "the error page");
        server.finish().await;
    }
}

/// A config for a node on `server`'s database and data directory (its keys), as
/// [`TestServer::another_node`] builds one, for a start that is expected to fail.
fn node_config(server: &TestServer) -> vibe::config::Config {
    use figment::providers::{Format, Serialized, Toml};
    let figment = figment::Figment::new()
        .merge(Toml::string(vibe::config::DEFAULT_TOML))
        .merge(Serialized::default("listen", "127.0.0.1:0"))
        .merge(Serialized::default("database_url", &server.db_url))
        .merge(Serialized::default("database.max_connections", 4))
        .merge(Serialized::default(
            "data_dir",
            server.data_dir.path().to_string_lossy().to_string(),
        ));
    vibe::config::Config::from_figment(figment).expect("node config")
}

/// The secrets key (`<data dir>/keys/secrets.key`) is created with mode 0600, and a node whose
/// key file its group or others may read or write refuses to start, naming the file and its
/// mode; with the mode put right, it starts.
#[tokio::test]
async fn a_secrets_key_that_others_may_read_or_write_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;

    let server = TestServer::start().await;
    let key = server.data_dir.path().join("keys/secrets.key");
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode(&key),
        0o600,
        "the key is created readable by its owner only"
    );
    for loose in [0o640, 0o604, 0o620, 0o602] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(loose)).unwrap();
        let error = match vibe::server::start(node_config(&server)).await {
            Ok(running) => {
                let _ = running.shutdown().await;
                panic!("a node started with its secrets key at mode {loose:04o}");
            }
            Err(e) => e.to_string(),
        };
        assert!(
            error.contains(&key.display().to_string()),
            "the error names the file: {error}"
        );
        assert!(
            error.contains(&format!("{loose:04o}")),
            "the error names the mode {loose:04o}: {error}"
        );
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let node = server.another_node(&[]).await;
    assert_eq!(
        node.client
            .get(node.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    node.finish().await;
    server.finish().await;
}

/// The message a certificate's proof signs, built from its JSON as docs/identity.md describes
/// it: `{"id","issuer","subject","type","issued_at","expires_at"}` in that order, no whitespace.
fn signed_message(cert: &Value) -> String {
    for name in ["id", "issuer", "subject", "type", "issued_at"] {
        assert!(cert[name].is_string(), "{name} in {cert}");
    }
    let part = |name: &str| serde_json::to_string(&cert[name]).unwrap();
    format!(
        "{{\"id\":{},\"issuer\":{},\"subject\":{},\"type\":{},\"issued_at\":{},\"expires_at\":{}}}",
        part("id"),
        part("issuer"),
        part("subject"),
        part("type"),
        part("issued_at"),
        part("expires_at"),
    )
}

/// The Ed25519 public key of a `did:key` (multibase base58btc, multicodec 0xed01).
fn did_key_public(did: &str) -> ed25519_dalek::VerifyingKey {
    let encoded = did
        .strip_prefix("did:key:z")
        .unwrap_or_else(|| panic!("not a base58btc did:key: {did}"));
    let bytes = bs58::decode(encoded).into_vec().unwrap();
    assert_eq!(&bytes[..2], &[0xed, 0x01], "not an Ed25519 did:key: {did}");
    let public: [u8; 32] = bytes[2..].try_into().expect("a 32-byte key");
    ed25519_dalek::VerifyingKey::from_bytes(&public).unwrap()
}

/// Verifies `message` against `cert`'s proof with its issuer's did:key alone.
fn proof_holds(cert: &Value, message: &str) -> bool {
    use ed25519_dalek::Verifier as _;
    let signature: [u8; 64] = URL_SAFE_NO_PAD
        .decode(field(&cert["proof"], "signature"))
        .unwrap()
        .try_into()
        .expect("a 64-byte signature");
    did_key_public(field(cert, "issuer"))
        .verify(
            message.as_bytes(),
            &ed25519_dalek::Signature::from_bytes(&signature),
        )
        .is_ok()
}

/// A certificate's proof verifies without trusting the server: Ed25519 by the issuer's did:key
/// over the compact JSON of its fields in the documented order (with `expires_at` null or a
/// time), and does not verify for changed content.
#[tokio::test]
async fn a_certificates_proof_verifies_with_the_issuers_did_key_alone() {
    let server = TestServer::start().await;
    let ada_did = sign_up(&server, "ada").await;
    let bob_did = sign_up(&server, "bob").await;
    let ada = first_party_token(&server, "ada").await;
    let expires = (Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    for body in [
        json!({"subject": bob_did, "type": "friend-of"}),
        json!({"subject": bob_did, "type": "member-of", "expires_at": expires}),
    ] {
        let (status, cert) = server.issue_certificate(&ada, body.clone()).await;
        assert_eq!(status, 201, "{cert}");
        assert_eq!(cert["issuer"], ada_did.as_str());
        assert_eq!(cert["proof"]["type"], "Ed25519Signature", "{cert}");
        assert_eq!(
            cert["proof"]["verification_method"],
            ada_did.as_str(),
            "{cert}"
        );
        assert_eq!(
            cert["expires_at"].is_null(),
            body.get("expires_at").is_none()
        );
        let message = signed_message(&cert);
        assert!(
            proof_holds(&cert, &message),
            "the proof does not verify over {message}"
        );
        // Another type, another subject: the proof does not cover them.
        let mut changed = cert.clone();
        changed["type"] = json!("enemy-of");
        assert!(!proof_holds(&cert, &signed_message(&changed)));
        changed = cert.clone();
        changed["subject"] = json!(ada_did);
        assert!(!proof_holds(&cert, &signed_message(&changed)));
    }
    server.finish().await;
}

/// With `identity.open_sign_up = false`, `POST /v1/accounts` is 403 `sign_up_closed` and
/// creates nothing.
#[tokio::test]
async fn closed_sign_up_refuses_new_accounts() {
    let server = TestServer::start_with(&[("identity.open_sign_up", "false")]).await;
    let r = attempt(&server, "/v1/accounts", "ada", PASSWORD, None).await;
    assert_api_error(&r, 403, "sign_up_closed");
    let r = attempt(&server, "/v1/sessions", "ada", PASSWORD, None).await;
    assert_api_error(&r, 401, "invalid_credentials");
    assert_eq!(
        accounts(&server, "handle IS NOT NULL").await,
        0,
        "no account was created"
    );
    server.finish().await;
}

/// The certificates API: revoking needs `write:vibe.certificate` (403 `missing_scope`, `write:*`
/// is not enough) and an id that names a certificate (404 `not_found`); listing needs
/// `read:vibe.certificate`, lists newest first for either role (received by default), and
/// refuses an unknown role with 400 `invalid_query`.
#[tokio::test]
async fn the_certificates_api_checks_scopes_ids_and_roles_and_lists_newest_first() {
    let server = TestServer::start().await;
    let ada_did = sign_up(&server, "ada").await;
    let bob_did = sign_up(&server, "bob").await;
    let carol_did = sign_up(&server, "carol").await;
    let ada = first_party_token(&server, "ada").await;
    let bob = first_party_token(&server, "bob").await;
    let mut issued = Vec::new();
    for (subject, cert_type) in [
        (&bob_did, "friend-of"),
        (&carol_did, "friend-of"),
        (&bob_did, "colleague-of"),
    ] {
        let (status, cert) = server
            .issue_certificate(&ada, json!({"subject": subject, "type": cert_type}))
            .await;
        assert_eq!(status, 201, "{cert}");
        issued.push(field(&cert, "id").to_owned());
    }
    let list = |token: &str, query: &str| {
        call(
            server
                .client
                .get(server.url(&format!("/v1/certificates{query}")))
                .bearer_auth(token),
        )
    };
    let ids = |body: &Value| -> Vec<String> {
        body["certificates"]
            .as_array()
            .unwrap_or_else(|| panic!("no certificates in {body}"))
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect()
    };

    let (status, body) = list(&ada, "?role=issued").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        ids(&body),
        [issued[2].as_str(), issued[1].as_str(), issued[0].as_str()],
        "issued, newest first"
    );
    for query in ["?role=received", ""] {
        let (status, body) = list(&bob, query).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            ids(&body),
            [issued[2].as_str(), issued[0].as_str()],
            "received ({query:?}), newest first"
        );
    }
    let (status, body) = list(&bob, "?role=issued").await;
    assert_eq!((status, ids(&body).len()), (200, 0), "{body}");
    for query in ["?role=bogus", "?sort=oldest"] {
        assert_api_error(&list(&ada, query).await, 400, "invalid_query");
    }

    let delete = |token: &str, id: &str| {
        call(
            server
                .client
                .delete(server.url(&format!("/v1/certificates/{id}")))
                .bearer_auth(token),
        )
    };
    // Ada's tokens without the certificate write scope, `write:*` among them.
    let read_only = server.token(&ada_did, &["read:vibe.certificate", "write:*"]);
    assert_api_error(&delete(&read_only, &issued[0]).await, 403, "missing_scope");
    let (status, body) = server
        .issue_certificate(&read_only, json!({"subject": bob_did, "type": "x"}))
        .await;
    assert_api_error(&(status, body), 403, "missing_scope");
    let (status, body) = list(&read_only, "?role=issued").await;
    assert_eq!(
        (status, ids(&body).len()),
        (200, 3),
        "nothing was revoked: {body}"
    );
    // And one without the read scope.
    let write_only = server.token(&ada_did, &["write:vibe.certificate"]);
    assert_api_error(
        &list(&write_only, "?role=issued").await,
        403,
        "missing_scope",
    );

    let unknown = uuid::Uuid::now_v7().to_string();
    assert_api_error(&delete(&ada, &unknown).await, 404, "not_found");
    assert_api_error(&delete(&write_only, &unknown).await, 404, "not_found");
    assert_eq!(delete(&write_only, &issued[1]).await, (204, Value::Null));
    assert_api_error(&delete(&ada, &issued[1]).await, 404, "not_found");
    let (_, body) = list(&ada, "?role=issued").await;
    assert_eq!(
        ids(&body),
        [issued[2].as_str(), issued[0].as_str()],
        "the revoked one is gone"
    );
    server.finish().await;
}

/// Passwords are 8 to 256 bytes — bytes, not characters: 7 and 257 bytes (and 6 or 258 bytes
/// of two-byte characters) are 400 `invalid_body` at sign-up and create nothing; 8 and 256 bytes
/// are accepted, and a 256-byte password is kept whole.
#[tokio::test]
async fn passwords_are_eight_to_256_bytes() {
    let server = TestServer::start().await;
    for (handle, refused) in [
        ("short", "a".repeat(7)),
        ("long", "a".repeat(257)),
        ("shortchars", "é".repeat(3)),
        ("longchars", "é".repeat(129)),
    ] {
        let r = attempt(&server, "/v1/accounts", handle, &refused, None).await;
        assert_api_error(&r, 400, "invalid_body");
        // Nothing was created under the handle: it is still free.
        let (status, body) = attempt(&server, "/v1/accounts", handle, PASSWORD, None).await;
        assert_eq!(
            status,
            201,
            "{handle} after a {}-byte password: {body}",
            refused.len()
        );
    }
    for (handle, accepted) in [
        ("eight", "a".repeat(8)),
        ("eightbytes", "é".repeat(4)),
        ("maximal", "a".repeat(256)),
        ("maximalchars", "é".repeat(128)),
    ] {
        let (status, body) = attempt(&server, "/v1/accounts", handle, &accepted, None).await;
        assert_eq!(status, 201, "{handle}, {} bytes: {body}", accepted.len());
    }
    let r = attempt(&server, "/v1/sessions", "maximal", &"a".repeat(255), None).await;
    assert_api_error(&r, 401, "invalid_credentials");
    let (status, body) = attempt(&server, "/v1/sessions", "maximal", &"a".repeat(256), None).await;
    assert_eq!(status, 201, "the whole 256-byte password signs in: {body}");
    let (status, body) = attempt(
        &server,
        "/v1/sessions",
        "maximalchars",
        &"é".repeat(128),
        None,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    server.finish().await;
}

/// `POST /v1/sessions` answers `token`, `did`, `handle` and `expires_at` about
/// `identity.session_token_ttl` from now; `GET /v1/me` describes a first-party token (no
/// `client_id`, scope `*`, no identity scopes) and an app's access token (its client, document
/// scopes, identity scopes, expiry `identity.access_token_ttl` from issue).
#[tokio::test]
async fn sessions_and_me_describe_the_token() {
    let server = TestServer::start_with(&[("identity.session_token_ttl", "\"2h\"")]).await;
    let did = sign_up(&server, "ada").await;
    let before = Utc::now();
    let (status, session) = attempt(&server, "/v1/sessions", "ada", PASSWORD, None).await;
    let after = Utc::now();
    assert_eq!(status, 201, "{session}");
    assert_eq!(session["did"], did.as_str());
    assert_eq!(session["handle"], "ada");
    let session_token = field(&session, "token");
    let session_expiry = timestamp(&session["expires_at"]);
    let two_hours = chrono::Duration::hours(2);
    let slack = chrono::Duration::seconds(60);
    assert!(
        before + two_hours - slack <= session_expiry && session_expiry <= after + two_hours + slack,
        "expires_at {session_expiry} is not two hours after {before}"
    );

    let me = |token: &str| call(server.client.get(server.url("/v1/me")).bearer_auth(token));
    let (status, body) = me(session_token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["did"], did.as_str(), "{body}");
    assert_eq!(body["handle"], "ada", "{body}");
    assert!(body["client_id"].is_null(), "{body}");
    assert_eq!(body["scopes"], json!(["*"]), "{body}");
    assert_eq!(body["identity_scopes"], json!([]), "{body}");
    let token_expiry = timestamp(&body["expires_at"]);
    assert!(
        session_expiry == token_expiry,
        "the token expires at {token_expiry}, the session answer said {session_expiry}"
    );

    let client = register_client(&server, false, SCOPE).await;
    let before = Utc::now();
    let tokens = app_tokens(&server, &mut Browser::new(), &client, SCOPE, "ada").await;
    let after = Utc::now();
    assert_eq!(tokens["expires_in"], 900, "{tokens}");
    let (status, body) = me(field(&tokens, "access_token")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["did"], did.as_str(), "{body}");
    assert_eq!(body["handle"], "ada", "{body}");
    assert_eq!(body["client_id"], client.id.as_str(), "{body}");
    assert_eq!(
        body["scopes"],
        json!(["read:posts", "write:posts"]),
        "{body}"
    );
    assert_eq!(
        body["identity_scopes"],
        json!(["offline_access", "openid", "profile"]),
        "{body}"
    );
    let expiry = timestamp(&body["expires_at"]);
    let ttl = chrono::Duration::seconds(900);
    let second = chrono::Duration::seconds(1);
    assert!(
        before + ttl - second <= expiry && expiry <= after + ttl + second,
        "the access token expires at {expiry}, not 15 minutes after {before}"
    );
    server.finish().await;
}

/// The ID token carries `azp` (the client), `auth_time` (the login) and `at_hash`: base64url of
/// the left half of the SHA-256 of the access token it came with — also after a refresh, which
/// keeps the original `auth_time`.
#[tokio::test]
async fn the_id_token_carries_azp_auth_time_and_at_hash() {
    let server = TestServer::start().await;
    let did = sign_up(&server, "ada").await;
    let client = register_client(&server, false, SCOPE).await;
    let before = Utc::now().timestamp();
    let tokens = app_tokens(&server, &mut Browser::new(), &client, SCOPE, "ada").await;
    let after = Utc::now().timestamp();
    let claims = jwt_claims(field(&tokens, "id_token"));
    assert_eq!(claims["sub"], did.as_str(), "{claims}");
    assert_eq!(claims["aud"], client.id.as_str(), "{claims}");
    assert_eq!(claims["azp"], client.id.as_str(), "{claims}");
    assert_eq!(claims["iss"], server.base.as_str(), "{claims}");
    assert_eq!(claims["nonce"], "n-0S6_WzA2Mj", "{claims}");
    let auth_time = claims["auth_time"]
        .as_i64()
        .unwrap_or_else(|| panic!("auth_time is a number of seconds: {claims}"));
    let iat = claims["iat"].as_i64().unwrap();
    assert!(
        (before - 1..=after + 1).contains(&auth_time),
        "auth_time {auth_time} is not the login, between {before} and {after}"
    );
    assert!(auth_time <= iat, "{claims}");
    assert_eq!(
        claims["at_hash"],
        expected_at_hash(field(&tokens, "access_token")),
        "{claims}"
    );

    let (status, refreshed) = refresh(&server, &client, field(&tokens, "refresh_token")).await;
    assert_eq!(status, 200, "{refreshed}");
    let claims = jwt_claims(field(&refreshed, "id_token"));
    assert_eq!(claims["azp"], client.id.as_str(), "{claims}");
    assert_eq!(
        claims["auth_time"], auth_time,
        "the login is still the same one: {claims}"
    );
    assert_eq!(
        claims["at_hash"],
        expected_at_hash(field(&refreshed, "access_token")),
        "{claims}"
    );
    assert_ne!(
        claims["at_hash"],
        expected_at_hash(field(&tokens, "access_token")),
        "at_hash names the new access token"
    );
    server.finish().await;
}

/// A login or consent form past its interaction's expiry gets the expired page and signs no one
/// in, records no consent; a browser session past its expiry no longer signs the user in:
/// `prompt=none` answers `login_required`, and without it the login form is shown.
#[tokio::test]
async fn expired_forms_and_browser_sessions_sign_no_one_in() {
    let server = TestServer::start().await;
    let did = sign_up(&server, "ada").await;
    let client = register_client(&server, false, SCOPE).await;
    let pool = server.sql().await;
    let expire_interaction = async |page: &Page| {
        let interaction = page.hidden("interaction");
        let expired = sqlx::query(
            "UPDATE oauth_interactions SET expires_at = now() - interval '1 second' \
             WHERE id = $1::uuid",
        )
        .bind(&interaction)
        .execute(&pool)
        .await
        .unwrap();
        assert_eq!(expired.rows_affected(), 1, "interaction {interaction}");
    };
    let count = async |sql: &'static str| -> i64 {
        sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap()
    };

    // The login form.
    let mut browser = Browser::new();
    let page = browser.get(&auth_url(&server, &client, &[])).await;
    assert_login_form(&page);
    expire_interaction(&page).await;
    let page = submit_login(&server, &mut browser, &page, "ada").await;
    assert_expired_page(&page);
    assert!(
        !browser.cookies.contains_key("vibe_session"),
        "{:?}",
        browser.cookies
    );
    assert_eq!(
        count("SELECT count(*) FROM user_sessions").await,
        0,
        "no session was created"
    );

    // The consent form.
    let page = browser.get(&auth_url(&server, &client, &[])).await;
    let page = submit_login(&server, &mut browser, &page, "ada").await;
    assert_eq!(page.status, 200, "{page:?}");
    assert!(page.body.contains("action=\"/oauth/consent\""), "{page:?}");
    expire_interaction(&page).await;
    let interaction = page.hidden("interaction");
    let csrf = page.hidden("csrf");
    let page = browser
        .post_form(
            &server.url("/oauth/consent"),
            &[
                ("interaction", interaction.as_str()),
                ("csrf", csrf.as_str()),
                ("decision", "allow"),
            ],
        )
        .await;
    assert_expired_page(&page);
    assert_eq!(
        count("SELECT count(*) FROM consents").await,
        0,
        "no consent was recorded"
    );
    assert_eq!(
        count("SELECT count(*) FROM oauth_grants").await,
        0,
        "no code was issued"
    );

    // The browser session.
    let mut browser = Browser::new();
    app_tokens(&server, &mut browser, &client, SCOPE, "ada").await;
    let silent = auth_url(&server, &client, &[("prompt", Some("none"))]);
    assert_code_redirect(&client, &browser.get(&silent).await);
    let expired = sqlx::query(
        "UPDATE user_sessions SET expires_at = now() - interval '1 second' WHERE user_did = $1",
    )
    .bind(&did)
    .execute(&pool)
    .await
    .unwrap();
    assert!(expired.rows_affected() >= 1);
    assert!(
        browser.cookies.contains_key("vibe_session"),
        "the browser still holds the cookie"
    );
    let page = browser.get(&silent).await;
    assert_error_redirect(&server, &client, &page, "login_required");
    assert_login_form(&browser.get(&auth_url(&server, &client, &[])).await);
    pool.close().await;
    server.finish().await;
}

/// Client authentication's `Basic` scheme is matched without regard to case (RFC 9110 §11.1), as
/// `Bearer` is: `basic` and `BASIC` authenticate the client; a wrong secret under either does not.
#[tokio::test]
async fn the_basic_scheme_of_client_authentication_ignores_case() {
    use base64::engine::general_purpose::STANDARD;
    let server = TestServer::start().await;
    sign_up(&server, "ada").await;
    let client = register_client(&server, false, SCOPE).await;
    let mut browser = Browser::new();
    let tokens = app_tokens(&server, &mut browser, &client, SCOPE, "ada").await;
    let access = tokens["access_token"].as_str().unwrap();
    let secret = client.secret.as_deref().unwrap();
    let introspect = |scheme: &str, secret: &str| {
        let credentials = STANDARD.encode(format!("{}:{secret}", client.id));
        server
            .client
            .post(server.url("/oauth/introspect"))
            .header("authorization", format!("{scheme} {credentials}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(serde_urlencoded::to_string([("token", access)]).unwrap())
    };
    // The scheme with no credentials is a failed authentication, not an absent one.
    for empty in ["Basic", "basic   "] {
        let (status, body) = call(
            server
                .client
                .post(server.url("/oauth/introspect"))
                .header("authorization", empty)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(
                    serde_urlencoded::to_string([("token", access), ("client_id", &client.id)])
                        .unwrap(),
                ),
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_client")),
            "{empty:?}: {body}"
        );
    }
    for scheme in ["Basic", "basic", "BASIC"] {
        let (status, body) = call(introspect(scheme, secret)).await;
        assert_eq!(status, 200, "{scheme}: {body}");
        assert_eq!(body["active"], true, "{scheme}: {body}");
        assert_eq!(body["iss"], server.base.as_str(), "{scheme}: {body}");
        let (status, body) = call(introspect(scheme, "not-the-secret")).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_client")),
            "{scheme} with a wrong secret: {body}"
        );
    }
    server.finish().await;
}

/// The browser's endpoints answer a malformed form or query with an error page naming what is
/// wrong, as a browser shows it, not with JSON.
#[tokio::test]
async fn malformed_browser_requests_get_an_error_page() {
    let server = TestServer::start().await;
    let form = |path: &str, body: &str| {
        server
            .client
            .post(server.url(path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_owned())
    };
    for (request, wanted) in [
        (form("/oauth/login", "x=1"), "interaction"),
        (form("/oauth/consent", "x=1"), "interaction"),
        (
            server
                .client
                .get(server.url("/oauth/authorize?max_age=1&max_age=2")),
            "max_age",
        ),
    ] {
        let r = request.send().await.unwrap();
        let status = r.status().as_u16();
        let content_type = r.headers()["content-type"].to_str().unwrap().to_owned();
        let body = r.text().await.unwrap();
        assert_eq!(status, 400, "{body}");
        assert!(
            content_type.starts_with("text/html"),
            "{content_type}: {body}"
        );
        assert!(body.contains(wanted), "the page names `{wanted}`: {body}");
    }
    server.finish().await;
}

/// `POST /v1/admin/clients` reads RFC 7591 metadata as `/oauth/register` does (its defaults, and
/// the answer's shape: no `client_secret` for a public client), but refuses keys that are not
/// client metadata — a typo would register an app without what it meant to ask for — and ids or
/// secrets, which the server assigns. `GET /v1/admin/clients` lists in the answer's shape.
#[tokio::test]
async fn the_admin_registration_takes_client_metadata_strictly() {
    let server = TestServer::start().await;
    let admin = server.token("did:key:zOperator", &["admin"]);
    let register = |body: Value| {
        call(
            server
                .client
                .post(server.url("/v1/admin/clients"))
                .bearer_auth(&admin)
                .json(&body),
        )
    };
    let uris = json!(["https://notes.example/cb"]);
    for body in [
        json!({"redirect_uris": uris, "scopes": "openid read:notes"}),
        json!({"redirect_uris": uris, "client_id": "mine"}),
        json!({"redirect_uris": uris, "client_secret": "mine"}),
    ] {
        let (status, answer) = register(body.clone()).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (400, Some("invalid_client_metadata")),
            "{body}: {answer}"
        );
    }
    let (status, answer) = register(json!({"redirect_uris": []})).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_redirect_uri")),
        "{answer}"
    );
    // The defaults of /oauth/register; registered metadata it does not use is taken and ignored.
    let (status, public) = register(json!({
        "redirect_uris": uris,
        "token_endpoint_auth_method": "none",
        "response_types": ["code"],
        "logo_uri": "https://notes.example/logo.png",
        "client_name#fr": "Notes en français",
    }))
    .await;
    assert_eq!(
        status, 201,
        "a language-tagged name is metadata too: {public}"
    );
    assert_eq!(public["client_name"], "notes.example", "{public}");
    assert_eq!(public["scope"], "openid", "{public}");
    assert!(public.get("client_secret").is_none(), "{public}");
    let (status, listed) = call(
        server
            .client
            .get(server.url("/v1/admin/clients"))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!(status, 200, "{listed}");
    let listed = &listed["clients"][0];
    for key in [
        "client_id",
        "client_name",
        "redirect_uris",
        "scope",
        "grant_types",
    ] {
        assert_eq!(listed[key], public[key], "{key}: {listed}");
    }
    assert!(listed.get("client_secret").is_none(), "{listed}");
    server.finish().await;
}
