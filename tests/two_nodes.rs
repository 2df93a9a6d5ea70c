//! Two nodes on one database: a write through one node reaches a subscriber on the other
//! through the doorbell NOTIFY alone (the second node's poll is set to an hour), in order; a
//! signing key rotated through one node reaches the other.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use common::{ALICE, TestServer, Ws};
use serde_json::json;

#[tokio::test]
async fn a_write_on_one_node_reaches_subscribers_on_another() {
    let (name, url) = common::fresh_database().await;
    let a = TestServer::start_on(&url, &[]).await;
    let b = TestServer::start_on(&url, &[("feed.poll_interval", "\"1h\"")]).await;
    let on_a = a.token(ALICE, &["*"]);
    let on_b = b.token(ALICE, &["*"]);
    let mut ws = Ws::connect(&b.base, Some(&on_b)).await;
    let sub = ws.request(json!({"op": "read", "type": "posts"})).await["sub"].clone();
    let mut last: Option<vibe::feed::Cursor> = None;
    for n in 0..5 {
        let doc = a.post(&on_a, "posts", json!({"data": {"n": n}})).await;
        let e = ws.event(&sub).await;
        assert_eq!(
            (e["event"].as_str(), &e["doc"]["id"]),
            (Some("add"), &doc["id"])
        );
        let cursor: vibe::feed::Cursor = e["cursor"].as_str().unwrap().parse().unwrap();
        assert!(last.is_none_or(|l| l < cursor));
        last = Some(cursor);
    }
    ws.close().await;
    a.finish().await;
    b.finish().await;
    common::drop_database(&name).await;
}

/// A signing key rotated through one node reaches the other: its JWKS leads with the new key
/// (the one it signs with) and keeps the old one for the overlap.
#[tokio::test]
async fn a_signing_key_rotated_on_one_node_reaches_the_other() {
    let (name, url) = common::fresh_database().await;
    let a = TestServer::start_on(&url, &[]).await;
    // Nodes of a cluster share the secrets key the signing keys are sealed with: B uses A's
    // data directory.
    let shared_dir = serde_json::to_string(&a.data_dir.path()).unwrap();
    let b = TestServer::start_on(
        &url,
        &[
            ("data_dir", &shared_dir),
            ("identity.signing_key_reload_interval", "\"50ms\""),
        ],
    )
    .await;
    let admin = a.token("did:key:zOperator", &["admin"]);
    let rotate = async || -> String {
        let r = a
            .client
            .post(a.url("/v1/admin/signing-keys/rotate"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<serde_json::Value>().await.unwrap()["kid"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // (The key set needs no token; one does no harm.)
    let anyone = b.token(ALICE, &["read:posts"]);
    let kids_on_b = async || -> Vec<String> {
        let (status, jwks) = b.get_json(&anyone, "/oauth/jwks").await;
        assert_eq!(status, 200, "{jwks}");
        jwks["keys"]
            .as_array()
            .unwrap_or_else(|| panic!("a key set: {jwks}"))
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    };
    let first = rotate().await;
    common::until("node B publishes the first key", async || {
        kids_on_b().await.first() == Some(&first)
    })
    .await;
    let second = rotate().await;
    common::until("node B leads with the rotated key", async || {
        kids_on_b().await.first() == Some(&second)
    })
    .await;
    assert!(
        kids_on_b().await.contains(&first),
        "the old key stays published"
    );
    a.finish().await;
    b.finish().await;
    common::drop_database(&name).await;
}
