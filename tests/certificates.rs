//! Certificates and ACL predicates on every path: issue (signed with the issuer's did:key), list
//! and revoke over REST; REST reads and SQL queries honour predicate entries; a global live
//! subscription gets `remove` when a certificate that a deny predicate tests is issued to the
//! subscriber, and `add` when it is revoked or expires; the reserved type cannot be written
//! through the document API.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use common::oidc::{first_party_token, sign_up};
use common::{TestServer, Ws};
use serde_json::{Value, json};

async fn revoke(s: &TestServer, token: &str, id: &str) -> u16 {
    s.client
        .delete(s.url(&format!("/v1/certificates/{id}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn get_status(s: &TestServer, token: &str, path: &str) -> u16 {
    s.client
        .get(s.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn certificates_are_signed_listed_and_revocable_and_predicates_grant_reads() {
    let s = TestServer::start().await;
    let alice_did = sign_up(&s, "alice").await;
    let bob_did = sign_up(&s, "bob").await;
    let carol_did = sign_up(&s, "carol").await;
    let alice = first_party_token(&s, "alice").await;
    let bob = first_party_token(&s, "bob").await;
    let carol = first_party_token(&s, "carol").await;

    // A document only friends of Alice may read.
    let doc = s
        .post(
            &alice,
            "posts",
            json!({"data": {"t": "friends only"}, "acl": {"read": {"allow": [[{"issuer": alice_did, "type": "friend-of"}]]}}}),
        )
        .await;
    let path = format!("/v1/docs/posts/{}", doc["id"].as_str().unwrap());
    assert_eq!(get_status(&s, &bob, &path).await, 403);

    let (status, cert) = s
        .issue_certificate(&alice, json!({"subject": bob_did, "type": "friend-of"}))
        .await;
    assert_eq!(status, 201, "{cert}");
    assert_eq!(cert["issuer"], alice_did);
    assert_eq!(cert["signature_valid"], true);
    assert_eq!(cert["valid"], true);
    let cert_id = cert["id"].as_str().unwrap().to_owned();
    assert_eq!(
        get_status(&s, &bob, &path).await,
        200,
        "the certificate grants the read"
    );
    assert_eq!(get_status(&s, &carol, &path).await, 403);

    // Listed for both sides; only the issuer may revoke.
    let listed: Value = s
        .client
        .get(s.url("/v1/certificates?role=received"))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["certificates"][0]["id"], cert_id.as_str());
    assert_eq!(listed["certificates"][0]["subject"], bob_did);
    assert_eq!(revoke(&s, &bob, &cert_id).await, 403);
    assert_eq!(revoke(&s, &carol, &cert_id).await, 403);

    // The reserved type is not writable through the document API, not even by its "owner".
    let forged = s
        .client
        .post(s.url("/v1/docs/vibe.certificate"))
        .bearer_auth(&carol)
        .json(&json!({"data": {"subject": carol_did, "type": "friend-of"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    let body: Value = forged.json().await.unwrap();
    assert_eq!(body["error"]["code"], "reserved_type");

    // Bad input.
    for bad in [
        json!({"subject": "bob", "type": "friend-of"}),
        json!({"subject": alice_did, "type": "friend-of"}),
        json!({"subject": bob_did, "type": "Friend Of"}),
        json!({"subject": bob_did, "type": "x", "expires_at": "2001-01-01T00:00:00Z"}),
    ] {
        let (status, body) = s.issue_certificate(&alice, bad.clone()).await;
        assert_eq!(status, 400, "{bad} → {body}");
    }
    // An operator-minted DID has no key on this server: it cannot sign.
    let keyless = s.token("did:key:zNoAccount", &["*"]);
    let (status, body) = s
        .issue_certificate(&keyless, json!({"subject": bob_did, "type": "x"}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("no_signing_key"))
    );

    assert_eq!(revoke(&s, &alice, &cert_id).await, 204);
    assert_eq!(
        get_status(&s, &bob, &path).await,
        403,
        "revoked: the read is gone"
    );
    s.finish().await;
}

#[tokio::test]
async fn deny_predicates_act_live_on_global_subscriptions_and_queries() {
    let s = TestServer::start().await;
    let alice_did = sign_up(&s, "alice").await;
    let carol_did = sign_up(&s, "carol").await;
    let alice = first_party_token(&s, "alice").await;
    let carol = first_party_token(&s, "carol").await;

    // Public, except to whoever Alice certifies as blocked.
    let doc = s
        .post(
            &alice,
            "posts",
            json!({"data": {"t": "hello"}, "acl": {"read": {"allow": ["*"], "deny": [[{"issuer": alice_did, "type": "blocked"}]]}}}),
        )
        .await;
    let doc_id = doc["id"].clone();
    let mut ws = Ws::connect(&s.base, Some(&carol)).await;
    let reply = ws
        .request(json!({"op": "read", "type": "posts", "global": true}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["docs"][0]["id"], doc_id);
    let sub = reply["sub"].clone();

    let query = || async {
        let r: Value = s
            .client
            .post(s.url("/v1/query"))
            .bearer_auth(&carol)
            .json(&json!({"type": "posts", "global": true}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["docs"].as_array().unwrap().len()
    };
    assert_eq!(query().await, 1);

    // Blocked: the subscription loses the document at once, the query no longer returns it.
    let (status, cert) = s
        .issue_certificate(&alice, json!({"subject": carol_did, "type": "blocked"}))
        .await;
    assert_eq!(status, 201);
    let event = ws.event(&sub).await;
    assert_eq!(event["event"], "remove", "{event}");
    assert_eq!(event["id"], doc_id);
    assert_eq!(query().await, 0);
    // A change to the document while blocked is not delivered; the unblock below is the next
    // event this subscription sees.
    let r = s
        .client
        .patch(s.url(&format!("/v1/docs/posts/{}", doc_id.as_str().unwrap())))
        .bearer_auth(&alice)
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"data": {"t": "while blocked"}}"#)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());

    assert_eq!(revoke(&s, &alice, cert["id"].as_str().unwrap()).await, 204);
    let event = ws.event(&sub).await;
    assert_eq!(event["event"], "add", "{event}");
    assert_eq!(event["doc"]["data"]["t"], "while blocked");
    assert_eq!(query().await, 1);

    // A certificate that expires: removed when issued, added back when it expires.
    let expires = chrono::Utc::now() + chrono::Duration::seconds(2);
    let (status, _) = s
        .issue_certificate(
            &alice,
            json!({"subject": carol_did, "type": "blocked", "expires_at": expires}),
        )
        .await;
    assert_eq!(status, 201);
    let event = ws.event(&sub).await;
    assert_eq!(event["event"], "remove", "{event}");
    // Awaited, not slept: the server's expiry timer produces the event.
    let event = ws.event(&sub).await;
    assert_eq!(event["event"], "add", "{event}");
    assert!(chrono::Utc::now() >= expires - chrono::Duration::milliseconds(50));
    assert_eq!(query().await, 1);
    ws.close().await;
    s.finish().await;
}

#[tokio::test]
async fn acls_reach_their_owner_only() {
    let s = TestServer::start().await;
    let alice = s.token(common::ALICE, &["*"]);
    let bob = s.token(common::BOB, &["*"]);
    let acl = json!({"read": {"allow": ["*"], "deny": [common::CAROL]}});
    let mut ws = Ws::connect(&s.base, Some(&bob)).await;
    let sub = ws
        .request(json!({"op": "read", "type": "posts", "global": true}))
        .await["sub"]
        .clone();
    let mut own = Ws::connect(&s.base, Some(&alice)).await;
    let own_sub = own
        .request(json!({"op": "read", "type": "posts", "global": true}))
        .await["sub"]
        .clone();
    let created = s
        .post(&alice, "posts", json!({"data": {"t": 1}, "acl": acl}))
        .await;
    assert_eq!(created["acl"], acl, "the owner sees the ACL it wrote");
    let id = created["id"].as_str().unwrap();

    // Bob reads the public document over every path, and never sees whom it denies.
    let event = ws.event(&sub).await;
    assert_eq!(event["event"], "add");
    assert!(event["doc"].get("acl").is_none(), "{event}");
    let owner_event = own.event(&own_sub).await;
    assert_eq!(
        owner_event["doc"]["acl"], acl,
        "the owner's event carries it"
    );
    let got: Value = s
        .client
        .get(s.url(&format!("/v1/docs/posts/{id}")))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["data"]["t"], 1);
    assert!(got.get("acl").is_none(), "{got}");
    let page: Value = s
        .client
        .post(s.url("/v1/query"))
        .bearer_auth(&bob)
        .json(&json!({"type": "posts", "global": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["docs"][0]["id"], id);
    assert!(page["docs"][0].get("acl").is_none(), "{page}");
    let changes: Value = s
        .client
        .get(s.url("/v1/changes?types=posts&global=true"))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entry = changes["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("{changes}"));
    assert!(entry["doc"].get("acl").is_none(), "{entry}");
    ws.close().await;
    own.close().await;
    s.finish().await;
}

/// One account's unexpired certificates are bounded (`identity.max_certificates_per_issuer`):
/// past it an issue answers 409 `too_many_certificates`; revoking one, or one expiring, makes
/// room. Others' certificates do not count against it.
#[tokio::test]
async fn an_issuer_has_at_most_the_configured_number_of_unexpired_certificates() {
    let s = TestServer::start_with(&[("identity.max_certificates_per_issuer", "2")]).await;
    let alice_did = sign_up(&s, "alice").await;
    let bob_did = sign_up(&s, "bob").await;
    let alice = first_party_token(&s, "alice").await;
    let bob = first_party_token(&s, "bob").await;
    let issue = async |token: &str, subject: &str, cert_type: &str, expires_at: Option<String>| {
        let mut body = json!({"subject": subject, "type": cert_type});
        if let Some(at) = expires_at {
            body["expires_at"] = json!(at);
        }
        s.issue_certificate(token, body).await
    };
    // Two for good: the limit is reached.
    let (status, kept) = issue(&alice, &bob_did, "friend-of", None).await;
    assert_eq!(status, 201, "{kept}");
    let (status, other) = issue(&alice, &bob_did, "guest-of", None).await;
    assert_eq!(status, 201, "{other}");
    let (status, refused) = issue(&alice, &bob_did, "member-of", None).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (409, Some("too_many_certificates")),
        "{refused}"
    );
    // Bob's own certificates are his account's, not Alice's.
    let (status, answer) = issue(&bob, &alice_did, "friend-of", None).await;
    assert_eq!(status, 201, "{answer}");
    // A revocation makes room, here for one that expires in a moment...
    assert_eq!(revoke(&s, &alice, kept["id"].as_str().unwrap()).await, 204);
    let soon = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339();
    let (status, answer) = issue(&alice, &bob_did, "member-of", Some(soon)).await;
    assert_eq!(status, 201, "{answer}");
    // ...and its expiry makes room again (counted, it would refuse this for good).
    common::until("an expired certificate no longer counts", || async {
        issue(&alice, &bob_did, "colleague-of", None).await.0 == 201
    })
    .await;
    s.finish().await;
}
