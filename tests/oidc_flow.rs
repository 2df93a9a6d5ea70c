//! The whole OpenID Connect flow driven by an independent, certified relying party:
//! `openid-client` (npm, tests/oidc/rp.mjs) does discovery → authorize (login and consent forms
//! submitted over HTTP) → code with PKCE → tokens → userinfo → refresh rotation (and replay,
//! which revokes the family) → introspection → revocation → end-session, against a real server
//! on a real database, for an admin-registered confidential client, a public one, and one the
//! library registers itself (RFC 7591). Then this test checks what the library does not: the ID
//! token's signature against the JWKS, and that the revoked access token is refused by the
//! document API.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use common::TestServer;
use common::oidc::{RegisteredClient, register_client, sign_up};
use serde_json::Value;

const SCOPE: &str = "openid profile offline_access read:posts write:posts";

/// Runs tests/oidc/rp.mjs for `client` and returns its report.
async fn run_relying_party(server: &TestServer, client: &RegisteredClient, handle: &str) -> Value {
    let secret = client.secret.clone().unwrap_or_default();
    run_rp_script(
        server,
        handle,
        &[
            ("CLIENT_ID", &client.id),
            ("CLIENT_SECRET", &secret),
            ("REDIRECT_URI", &client.redirect_uri),
        ],
    )
    .await
}

/// Runs tests/oidc/rp.mjs with `vars` (besides issuer, user and scope); its JSON report.
async fn run_rp_script(server: &TestServer, handle: &str, vars: &[(&str, &str)]) -> Value {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oidc");
    assert!(
        std::path::Path::new(dir)
            .join("node_modules/openid-client")
            .exists(),
        "run `npm ci` in tests/oidc first (.ci/run does)"
    );
    let output = tokio::process::Command::new("node")
        .arg("rp.mjs")
        .current_dir(dir)
        .env("ISSUER", &server.base)
        .envs(vars.iter().copied())
        .env("HANDLE", handle)
        .env("PASSWORD", common::oidc::PASSWORD)
        .env("SCOPE", SCOPE)
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "relying party failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("one JSON report")
}

async fn check_report(server: &TestServer, client: &RegisteredClient, did: &str, report: &Value) {
    assert_eq!(report["discovery"]["issuer"], server.base);
    assert_eq!(report["discovery"]["supports_pkce_s256"], true);
    assert_eq!(report["code_grant"]["token_type"], "bearer");
    assert_eq!(report["code_grant"]["refresh_token_present"], true);
    assert_eq!(
        report["code_grant"]["scope"],
        "offline_access openid profile read:posts write:posts"
    );
    let claims = &report["id_token_claims"];
    assert_eq!(claims["sub"], did);
    assert_eq!(claims["aud"], client.id.as_str());
    assert_eq!(claims["iss"], server.base);
    assert_eq!(report["userinfo"]["sub"], did);
    assert_eq!(report["userinfo"]["preferred_username"], "ada");
    assert_eq!(report["refresh"]["rotated"], true);
    assert_eq!(report["refresh"]["reuse_error"]["failed"], true);
    assert_eq!(report["refresh"]["reuse_error"]["error"], "invalid_grant");
    // Replaying the first refresh token revoked the family: its successor is dead too.
    assert_eq!(
        report["refresh"]["family_revoked_error"]["error"],
        "invalid_grant"
    );
    // The second authorization reused the browser session and the stored consent.
    assert_eq!(report["introspection"]["access_active_before"], true);
    assert_eq!(report["introspection"]["before"]["sub"], did);
    assert_eq!(
        report["introspection"]["before"]["client_id"],
        client.id.as_str()
    );
    assert_eq!(report["introspection"]["refresh_active_after"], false);
    assert_eq!(report["introspection"]["access_active_after"], false);
    assert_eq!(report["end_session"]["status"], 303);
    assert_eq!(report["end_session"]["state_echoed"], true);

    // The ID token verifies with the published key.
    let jwks: Value = reqwest::get(server.url("/oauth/jwks"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id_token = report["tokens"]["id_token"].as_str().unwrap();
    let header = jsonwebtoken::decode_header(id_token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"].as_str() == header.kid.as_deref())
        .expect("the signing key is in the JWKS");
    let key = jsonwebtoken::DecodingKey::from_rsa_components(
        jwk["n"].as_str().unwrap(),
        jwk["e"].as_str().unwrap(),
    )
    .unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[&client.id]);
    validation.set_issuer(&[&server.base]);
    let verified = jsonwebtoken::decode::<Value>(id_token, &key, &validation).unwrap();
    assert_eq!(verified.claims["sub"], did);

    // The access token revoked through its refresh token no longer opens documents.
    let revoked = report["tokens"]["revoked_access_token"].as_str().unwrap();
    let r = server
        .client
        .get(server.url("/v1/docs/posts"))
        .bearer_auth(revoked)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "token_revoked");
}

#[tokio::test]
async fn certified_relying_party_completes_the_flow() {
    let server = TestServer::start().await;
    let did = sign_up(&server, "ada").await;
    let confidential = register_client(&server, false, SCOPE).await;
    let report = run_relying_party(&server, &confidential, "ada").await;
    check_report(&server, &confidential, &did, &report).await;

    // A public client (no secret: PKCE is what binds the code to it).
    let public = register_client(&server, true, SCOPE).await;
    assert!(public.secret.is_none());
    let report = run_relying_party(&server, &public, "ada").await;
    check_report(&server, &public, &did, &report).await;

    // A client the library registers itself (RFC 7591), with an initial access token, then
    // authenticating with the secret it was issued (client_secret_post).
    let admin = server.token("did:key:zOperator", &["admin"]);
    let redirect_uri = "http://127.0.0.1:9/dynamic".to_owned();
    let report = run_rp_script(
        &server,
        "ada",
        &[
            ("REGISTER", "1"),
            ("INITIAL_ACCESS_TOKEN", &admin),
            ("REDIRECT_URI", &redirect_uri),
        ],
    )
    .await;
    let registration = &report["registration"];
    assert_eq!(registration["client_secret_present"], true);
    assert_eq!(
        registration["token_endpoint_auth_method"],
        "client_secret_post"
    );
    let dynamic = RegisteredClient {
        id: registration["client_id"].as_str().unwrap().to_owned(),
        secret: None,
        redirect_uri,
    };
    check_report(&server, &dynamic, &did, &report).await;
    server.finish().await;
}
