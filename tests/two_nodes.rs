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
    let b = a.another_node(&[("feed.poll_interval", "\"1h\"")]).await;
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

/// A signing key rotated through one node reaches the other: both publish it at once (it leads
/// the JWKS), and it signs only once `identity.signing_key_lead` has passed — until then the key
/// it replaces signs on both, so no relying party meets a token signed by a key it has not seen;
/// `immediate` switches every node within a reload and withdraws the keys it replaces.
#[tokio::test]
async fn a_signing_key_rotated_on_one_node_is_published_before_it_signs() {
    let (name, url) = common::fresh_database().await;
    let a = TestServer::start_on(&url, &[("identity.signing_key_lead", "\"1h\"")]).await;
    // Nodes of a cluster share the secrets key the signing keys are sealed with.
    let b = a
        .another_node(&[("identity.signing_key_reload_interval", "\"50ms\"")])
        .await;
    let admin = a.token("did:key:zOperator", &["admin"]);
    let rotate = async |query: &str| -> (String, String) {
        let r = a
            .client
            .post(a.url(&format!("/v1/admin/signing-keys/rotate{query}")))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body = r.json::<serde_json::Value>().await.unwrap();
        (
            body["kid"].as_str().unwrap().to_owned(),
            body["signs_from"].as_str().unwrap().to_owned(),
        )
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
    // The kid of what a node signs now.
    let signer = |server: &TestServer| -> String {
        let signing = &server.server.as_ref().unwrap().app().identity.signing;
        let token = signing.sign(&json!({"sub": "x"})).unwrap();
        jsonwebtoken::decode_header(&token).unwrap().kid.unwrap()
    };

    // No key signs yet: the first one signs at once, however long the lead.
    let (first, _) = rotate("").await;
    common::until(
        "node B publishes and signs with the first key",
        async || kids_on_b().await.first() == Some(&first),
    )
    .await;
    assert_eq!(signer(&a), first);
    common::until("node B signs with the first key", async || {
        signer(&b) == first
    })
    .await;

    // A rotation with the lead: published on both at once, signing on neither yet.
    let (second, signs_from) = rotate("").await;
    let signs_from: chrono::DateTime<chrono::Utc> = signs_from.parse().unwrap();
    assert!(signs_from > chrono::Utc::now() + chrono::Duration::minutes(59));
    common::until(
        "node B leads its key set with the waiting key",
        async || kids_on_b().await.first() == Some(&second),
    )
    .await;
    assert!(
        kids_on_b().await.contains(&first),
        "the old key stays published"
    );
    assert_eq!(
        signer(&a),
        first,
        "the old key signs until the new one's time"
    );
    assert_eq!(signer(&b), first);

    // `immediate` (a compromised key) switches every node within a reload, and withdraws the
    // older keys from every node's key set.
    let (third, _) = rotate("?immediate=true").await;
    assert_eq!(signer(&a), third);
    common::until("node B signs with the immediate key", async || {
        signer(&b) == third
    })
    .await;
    common::until("node B publishes the immediate key alone", async || {
        kids_on_b().await == [third.clone()]
    })
    .await;
    a.finish().await;
    b.finish().await;
    common::drop_database(&name).await;
}

/// Every node of a cluster needs the same root and secrets keys: a node started on the
/// cluster's database with keys of its own is refused at start, naming the file to copy, instead
/// of splitting the cluster (its tokens refused by the others, its sealed secrets unreadable
/// there). With the cluster's keys copied in, it starts.
#[tokio::test]
async fn a_node_with_other_keys_is_refused_at_start() {
    use figment::providers::{Format, Serialized, Toml};
    let (name, url) = common::fresh_database().await;
    let a = TestServer::start_on(&url, &[]).await;
    let own_keys = tempfile::tempdir().unwrap();
    let config = |data_dir: &std::path::Path| {
        vibe::config::Config::from_figment(
            figment::Figment::new()
                .merge(Toml::string(vibe::config::DEFAULT_TOML))
                .merge(Serialized::default("listen", "127.0.0.1:0"))
                .merge(Serialized::default("database_url", &url))
                .merge(Serialized::default("database.max_connections", 4))
                .merge(Serialized::default(
                    "data_dir",
                    data_dir.to_string_lossy().to_string(),
                )),
        )
        .unwrap()
    };
    let refusal =
        |result: Result<vibe::server::RunningServer, vibe::server::ServerError>| match result {
            Ok(_) => panic!("a node with keys of its own started"),
            Err(e) => e.to_string(),
        };
    // Both keys of its own: the root key is compared first.
    let error = refusal(vibe::server::start(config(own_keys.path())).await);
    assert!(error.contains("keys/root.key"), "{error}");
    // The cluster's root key, a secrets key of its own.
    std::fs::copy(
        a.data_dir.path().join("keys/root.key"),
        own_keys.path().join("keys/root.key"),
    )
    .unwrap();
    let error = refusal(vibe::server::start(config(own_keys.path())).await);
    assert!(error.contains("keys/secrets.key"), "{error}");
    // Both of the cluster's.
    std::fs::copy(
        a.data_dir.path().join("keys/secrets.key"),
        own_keys.path().join("keys/secrets.key"),
    )
    .unwrap();
    let b = vibe::server::start(config(own_keys.path())).await.unwrap();
    b.shutdown().await.unwrap();
    a.finish().await;
    common::drop_database(&name).await;
}
