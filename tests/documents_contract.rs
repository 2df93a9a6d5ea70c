//! Promises of docs/protocol.md (and docs/queries.md) that no other test held the server to:
//! reserved types on every write path, one identity per WebSocket, ACLs for their owner only,
//! conditional WebSocket writes, the change feed judged by today's certificates and SQL moves,
//! ACL predicate bounds, the order of checks, `/v1/changes` parameters and retention, token
//! complexity, upgrade errors, request ids, page sizes, writers who are not owners, `/health`'s
//! version and ETags, and the ids of refused WebSocket frames.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use std::collections::{BTreeSet, HashSet};

use common::oidc::{assert_api_error, sign_up};
use common::{ALICE, BOB, CAROL, TestServer, Ws};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// The status and the JSON body of a response (null when it has none).
async fn answer(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// `GET /v1/changes?{query}` as the holder of `token`.
async fn changes(s: &TestServer, token: &str, query: &str) -> (u16, Value) {
    let r = s
        .client
        .get(s.url(&format!("/v1/changes?{query}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    answer(r).await
}

/// The entries of a `/v1/changes` answer about document `id`, in feed order.
fn entries_of<'a>(body: &'a Value, id: &str) -> Vec<&'a Value> {
    body["changes"]
        .as_array()
        .unwrap_or_else(|| panic!("no changes in {body}"))
        .iter()
        .filter(|c| c["id"] == id)
        .collect()
}

/// `(op, type)` of each entry of a `/v1/changes` answer about document `id`, in feed order.
fn ops_of(body: &Value, id: &str) -> Vec<(String, String)> {
    entries_of(body, id)
        .into_iter()
        .map(|c| {
            (
                c["op"].as_str().unwrap().to_owned(),
                c["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The document `id` among `docs` (a JSON list of documents); fails if it is not there.
fn find<'a>(docs: &'a Value, id: &str) -> &'a Value {
    docs.as_array()
        .unwrap_or_else(|| panic!("not a list of documents: {docs}"))
        .iter()
        .find(|d| d["id"] == id)
        .unwrap_or_else(|| panic!("{id} is not in {docs}"))
}

/// Every certificate row as stored: id, revision, issuer and data.
async fn certificate_rows(sql: &sqlx::PgPool) -> Vec<(String, i64, String, Value)> {
    sqlx::query_as(
        "SELECT id::text, rev, owner_did, data FROM documents \
         WHERE type = 'vibe.certificate' ORDER BY id",
    )
    .fetch_all(sql)
    .await
    .unwrap()
}

/// A request to `path` with what is given; its status and JSON body.
async fn call(
    s: &TestServer,
    method: Method,
    path: &str,
    token: Option<&str>,
    if_match: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut request = s.client.request(method, s.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(tag) = if_match {
        request = request.header("if-match", tag);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    answer(request.send().await.unwrap()).await
}

/// Inserts `n` empty `posts` documents of `owner` in SQL, in one statement; their ids.
async fn insert_posts(sql: &sqlx::PgPool, owner: &str, n: usize) -> Vec<uuid::Uuid> {
    let ids: Vec<uuid::Uuid> = (0..n).map(|_| uuid::Uuid::now_v7()).collect();
    sqlx::query(
        "INSERT INTO documents (id, owner_did, type, data) \
         SELECT t.id, $2, 'posts', '{}' FROM unnest($1::uuid[]) AS t(id)",
    )
    .bind(ids.clone())
    .bind(owner)
    .execute(sql)
    .await
    .unwrap();
    ids
}

/// Types starting with `vibe.` are written by the server only (protocol.md, ACL): the issuer of
/// a certificate, holding a `*` token (which may issue certificates), can neither forge a new
/// one nor alter or delete its own through the document API — a WebSocket `write` (create,
/// replace, conditional replace) or `remove`, a REST POST, PATCH, PUT or DELETE each answer
/// `reserved_type`, and the stored certificate stays exactly as signed. The server reads a
/// certificate's claims from the stored row, so this is the only guard against forged ones.
#[tokio::test]
async fn reserved_types_refuse_every_write_path_even_for_their_owner() {
    let s = TestServer::start().await;
    let alice_did = sign_up(&s, "alice").await;
    let bob_did = sign_up(&s, "bob").await;
    let carol_did = sign_up(&s, "carol").await;
    let alice = s.token(&alice_did, &["*"]);
    let (status, cert) = s
        .issue_certificate(&alice, json!({"subject": bob_did, "type": "friend-of"}))
        .await;
    assert_eq!(status, 201, "the `*` token may issue: {cert}");
    let cert_id = cert["id"].as_str().unwrap().to_owned();
    let sql = s.sql().await;
    let before = certificate_rows(&sql).await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0].3["subject"], bob_did.as_str(), "{before:?}");

    // The claims a forger would want stored: Carol certified instead of Bob.
    let forged = json!({"subject": carol_did, "type": "friend-of",
                        "issued_at": "2026-01-01T00:00:00.000Z"});
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    for request in [
        json!({"op": "write", "type": "vibe.certificate", "doc": {"id": cert_id, "data": forged}}),
        json!({"op": "write", "type": "vibe.certificate",
               "doc": {"id": cert_id, "data": forged}, "rev": 1}),
        json!({"op": "write", "type": "vibe.certificate", "doc": {"data": forged}}),
        json!({"op": "remove", "type": "vibe.certificate", "docId": cert_id}),
        json!({"op": "remove", "type": "vibe.certificate", "docId": cert_id, "rev": 1}),
    ] {
        let reply = ws.request(request.clone()).await;
        assert_eq!(
            reply["error"]["code"], "reserved_type",
            "{request} → {reply}"
        );
    }
    ws.close().await;

    let url = s.url(&format!("/v1/docs/vibe.certificate/{cert_id}"));
    let patch = s
        .client
        .patch(&url)
        .bearer_auth(&alice)
        .header("content-type", "application/merge-patch+json")
        .body(json!({"data": {"subject": carol_did}}).to_string())
        .send()
        .await
        .unwrap();
    let put = s
        .client
        .put(&url)
        .bearer_auth(&alice)
        .json(&json!({"data": forged}))
        .send()
        .await
        .unwrap();
    let put_if_match = s
        .client
        .put(&url)
        .bearer_auth(&alice)
        .header("if-match", "\"1\"")
        .json(&json!({"data": forged}))
        .send()
        .await
        .unwrap();
    let delete = s
        .client
        .delete(&url)
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    let create = s
        .client
        .post(s.url("/v1/docs/vibe.certificate"))
        .bearer_auth(&alice)
        .json(&json!({"data": forged}))
        .send()
        .await
        .unwrap();
    for (what, response) in [
        ("PATCH", patch),
        ("PUT", put),
        ("PUT with If-Match", put_if_match),
        ("DELETE", delete),
        ("POST", create),
    ] {
        let (status, body) = answer(response).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (403, Some("reserved_type")),
            "{what}: {body}"
        );
    }

    assert_eq!(
        certificate_rows(&sql).await,
        before,
        "a refused write changed, added or removed a certificate"
    );
    let (status, listed) = s.get_json(&alice, "/v1/certificates?role=issued").await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["certificates"][0]["subject"], bob_did.as_str());
    assert_eq!(listed["certificates"][0]["signature_valid"], true);
    sql.close().await;
    s.finish().await;
}

/// A WebSocket connection acts for one DID: `auth` with a token for another DID is refused
/// (`already_authenticated`), and the connection still reads and writes as the first one.
#[tokio::test]
async fn auth_for_another_did_is_refused_and_the_first_identity_stays() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let bob = s.token(BOB, &["*"]);
    let mine = s
        .post(&alice, "posts", json!({"data": {"who": "alice"}}))
        .await;
    s.post(&bob, "posts", json!({"data": {"who": "bob"}})).await;

    let mut ws = Ws::connect(&s.base, None).await;
    let r = ws.request(json!({"op": "auth", "token": alice})).await;
    assert_eq!(r["did"], ALICE, "{r}");
    let r = ws.request(json!({"op": "auth", "token": bob})).await;
    assert_eq!(r["error"]["code"], "already_authenticated", "{r}");

    let read = ws.request(json!({"op": "read", "type": "posts"})).await;
    assert_eq!(read["ok"], true, "{read}");
    let ids: Vec<&Value> = read["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["id"])
        .collect();
    assert_eq!(ids, vec![&mine["id"]], "still Alice's documents: {read}");
    let written = ws
        .request(json!({"op": "write", "type": "posts", "doc": {"data": {"after": true}}}))
        .await;
    assert_eq!(
        written["doc"]["owner"], ALICE,
        "still written as Alice: {written}"
    );
    ws.close().await;
    s.finish().await;
}

/// The ACL is sent to the document's owner only (protocol.md, Documents): a reader of Alice's
/// public document (with a deny list and a write grant) gets it without `acl` in a WebSocket
/// `read` snapshot, a `readOnce` page, an `expand`ed document and the reply to its own `write`;
/// Alice gets the ACL in each.
#[tokio::test]
async fn acls_reach_only_their_owner_over_the_websocket() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let bob = s.token(BOB, &["*"]);
    let written_acl = json!({"read": {"allow": ["*"], "deny": [CAROL]}, "write": {"allow": [BOB]}});
    let shared = s
        .post(
            &alice,
            "posts",
            json!({"acl": written_acl, "data": {"t": 1}}),
        )
        .await;
    // The ACL as the server spells it (empty lists included), which its owner gets everywhere.
    let acl = shared["acl"].clone();
    assert_eq!(
        (&acl["read"]["deny"], &acl["write"]["allow"]),
        (&json!([CAROL]), &json!([BOB])),
        "{shared}"
    );
    let id = shared["id"].as_str().unwrap().to_owned();
    s.post(&bob, "links", json!({"data": {"to": id}})).await;
    s.post(&alice, "links", json!({"data": {"to": id}})).await;
    let mut b = Ws::connect(&s.base, Some(&bob)).await;
    let mut a = Ws::connect(&s.base, Some(&alice)).await;

    let live = json!({"op": "read", "type": "posts", "global": true});
    let snapshot = b.request(live.clone()).await;
    assert_eq!(snapshot["ok"], true, "{snapshot}");
    let seen = find(&snapshot["docs"], &id);
    assert_eq!(seen["data"]["t"], 1, "{seen}");
    assert!(seen.get("acl").is_none(), "Bob's snapshot: {seen}");
    let snapshot = a.request(live).await;
    assert_eq!(find(&snapshot["docs"], &id)["acl"], acl, "{snapshot}");

    let once = json!({"op": "readOnce", "type": "posts", "global": true});
    let page = b.request(once.clone()).await;
    let seen = find(&page["docs"], &id);
    assert_eq!(seen["data"]["t"], 1, "{page}");
    assert!(seen.get("acl").is_none(), "Bob's readOnce: {seen}");
    let page = a.request(once).await;
    assert_eq!(find(&page["docs"], &id)["acl"], acl, "{page}");

    let expanding = json!({"op": "readOnce", "type": "links", "expand": ["data.to"]});
    let page = b.request(expanding.clone()).await;
    let expanded = &page["expanded"][id.as_str()];
    assert_eq!(expanded["data"]["t"], 1, "Bob may read it: {page}");
    assert!(expanded.get("acl").is_none(), "Bob's expansion: {page}");
    let page = a.request(expanding).await;
    assert_eq!(page["expanded"][id.as_str()]["acl"], acl, "{page}");

    let written = b
        .request(json!({"op": "write", "type": "posts", "doc": {"id": id, "data": {"t": 2}}}))
        .await;
    assert_eq!(
        written["doc"]["data"]["t"], 2,
        "Bob may write and read: {written}"
    );
    assert!(
        written["doc"].get("acl").is_none(),
        "the reply to Bob's write: {written}"
    );
    let written = a
        .request(json!({"op": "write", "type": "posts", "doc": {"id": id, "data": {"t": 3}}}))
        .await;
    assert_eq!(written["doc"]["acl"], acl, "the owner's reply: {written}");
    a.close().await;
    b.close().await;
    s.finish().await;
}

/// `write` and `remove` with `rev` are conditional (protocol.md, Operations): at a stale `rev`
/// both answer `rev_mismatch` and leave the document as it was; a `write` with `rev` of an id
/// that does not exist is `not_found`, not a create (without `rev` the same write creates).
#[tokio::test]
async fn websocket_writes_and_removes_with_rev_are_conditional() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let created = ws
        .request(json!({"op": "write", "type": "posts", "doc": {"data": {"v": 1}}}))
        .await;
    let id = created["doc"]["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/docs/posts/{id}");
    let r = ws
        .request(
            json!({"op": "write", "type": "posts", "doc": {"id": id, "data": {"v": 2}}, "rev": 1}),
        )
        .await;
    assert_eq!(r["doc"]["rev"], 2, "the current rev matches: {r}");

    let r = ws
        .request(
            json!({"op": "write", "type": "posts", "doc": {"id": id, "data": {"v": 3}}, "rev": 1}),
        )
        .await;
    assert_eq!(r["error"]["code"], "rev_mismatch", "{r}");
    let r = ws
        .request(json!({"op": "remove", "type": "posts", "docId": id, "rev": 1}))
        .await;
    assert_eq!(r["error"]["code"], "rev_mismatch", "{r}");
    let (status, now) = s.get_json(&alice, &path).await;
    assert_eq!(
        (status, &now["rev"], &now["data"]),
        (200, &json!(2), &json!({"v": 2})),
        "refused conditional writes changed nothing: {now}"
    );

    let unknown = uuid::Uuid::now_v7();
    let r = ws
        .request(json!({"op": "write", "type": "posts", "doc": {"id": unknown, "data": {"v": 1}}, "rev": 1}))
        .await;
    assert_eq!(r["error"]["code"], "not_found", "{r}");
    let (status, body) = s
        .get_json(&alice, &format!("/v1/docs/posts/{unknown}"))
        .await;
    assert_eq!(
        status, 404,
        "a conditional write created a document: {body}"
    );
    let r = ws
        .request(json!({"op": "write", "type": "posts", "doc": {"id": unknown, "data": {"v": 1}}}))
        .await;
    assert_eq!(
        (&r["doc"]["id"], &r["doc"]["rev"]),
        (&json!(unknown), &json!(1)),
        "without rev the same write creates: {r}"
    );

    let r = ws
        .request(json!({"op": "remove", "type": "posts", "docId": id, "rev": 2}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let (status, _) = s.get_json(&alice, &path).await;
    assert_eq!(status, 404, "the matching conditional remove deleted it");
    ws.close().await;
    s.finish().await;
}

/// `/v1/changes` judges each version by its stored ACL and the certificates the caller holds at
/// the request (protocol.md, Change feed): a document readable to Alice's friends is absent from
/// Bob's feed until Alice certifies him, then present with its `doc` (retained history included);
/// a public document that denies those Alice blocked is present until she blocks him, then gone.
#[tokio::test]
async fn the_changes_feed_judges_versions_by_the_certificates_held_now() {
    let s = TestServer::start().await;
    let alice_did = sign_up(&s, "alice").await;
    let bob_did = sign_up(&s, "bob").await;
    let alice = s.token(&alice_did, &["*"]);
    let bob = s.token(&bob_did, &["*"]);
    let friends_only = s
        .post(
            &alice,
            "posts",
            json!({"data": {"t": "friends"},
                   "acl": {"read": {"allow": [[{"issuer": alice_did, "type": "friend-of"}]]}}}),
        )
        .await;
    let unless_blocked = s
        .post(
            &alice,
            "posts",
            json!({"data": {"t": "public"},
                   "acl": {"read": {"allow": ["*"],
                                    "deny": [[{"issuer": alice_did, "type": "blocked"}]]}}}),
        )
        .await;
    let friends_id = friends_only["id"].as_str().unwrap();
    let open_id = unless_blocked["id"].as_str().unwrap();

    let (status, feed) = changes(&s, &bob, "global=true&since=0").await;
    assert_eq!(status, 200, "{feed}");
    assert!(
        entries_of(&feed, friends_id).is_empty(),
        "not a friend yet: {feed}"
    );
    let open = entries_of(&feed, open_id);
    assert_eq!(open.len(), 1, "{feed}");
    assert_eq!(
        (&open[0]["op"], &open[0]["doc"]["data"]["t"]),
        (&json!("insert"), &json!("public")),
        "{feed}"
    );

    let (status, cert) = s
        .issue_certificate(&alice, json!({"subject": bob_did, "type": "friend-of"}))
        .await;
    assert_eq!(status, 201, "{cert}");
    let (status, feed) = changes(&s, &bob, "global=true&since=0").await;
    assert_eq!(status, 200, "{feed}");
    let friends = entries_of(&feed, friends_id);
    assert_eq!(friends.len(), 1, "a friend now reads its history: {feed}");
    assert_eq!(friends[0]["op"], "insert", "{feed}");
    assert_eq!(friends[0]["doc"]["data"]["t"], "friends", "{feed}");
    assert!(friends[0]["doc"].get("acl").is_none(), "{feed}");

    let (status, cert) = s
        .issue_certificate(&alice, json!({"subject": bob_did, "type": "blocked"}))
        .await;
    assert_eq!(status, 201, "{cert}");
    let (status, feed) = changes(&s, &bob, "global=true&since=0").await;
    assert_eq!(status, 200, "{feed}");
    assert!(
        entries_of(&feed, open_id).is_empty(),
        "blocked now, the public document's history is hidden: {feed}"
    );
    assert_eq!(
        entries_of(&feed, friends_id).len(),
        1,
        "still a friend: {feed}"
    );
    s.finish().await;
}

/// A change of a document's type or owner made in SQL comes on `/v1/changes` as a `delete` of
/// the old version and an `insert` of the new one (protocol.md, Change feed; migration 0018):
/// the old owner's feed shows the delete, the new owner's the insert; a type change shows both,
/// delete first.
#[tokio::test]
async fn sql_moves_between_owners_and_types_are_a_delete_and_an_insert() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let bob = s.token(BOB, &["*"]);
    let moved = s.post(&alice, "posts", json!({"data": {"n": 1}})).await;
    let retyped = s.post(&alice, "posts", json!({"data": {"n": 2}})).await;
    let moved_id = moved["id"].as_str().unwrap();
    let retyped_id = retyped["id"].as_str().unwrap();
    let (status, alice_start) = changes(&s, &alice, "since=now").await;
    assert_eq!(status, 200, "{alice_start}");
    let (status, bob_start) = changes(&s, &bob, "since=now").await;
    assert_eq!(status, 200, "{bob_start}");
    let alice_cursor = alice_start["cursor"].as_str().unwrap();
    let bob_cursor = bob_start["cursor"].as_str().unwrap();

    let sql = s.sql().await;
    sqlx::query("UPDATE documents SET owner_did = $1 WHERE id = $2::uuid")
        .bind(BOB)
        .bind(moved_id)
        .execute(&sql)
        .await
        .unwrap();
    sqlx::query("UPDATE documents SET type = 'notes' WHERE id = $1::uuid")
        .bind(retyped_id)
        .execute(&sql)
        .await
        .unwrap();

    let (status, feed) = changes(&s, &alice, &format!("since={alice_cursor}")).await;
    assert_eq!(status, 200, "{feed}");
    let pair = |op: &str, t: &str| (op.to_owned(), t.to_owned());
    assert_eq!(
        ops_of(&feed, moved_id),
        vec![pair("delete", "posts")],
        "the old owner sees it go: {feed}"
    );
    assert_eq!(
        ops_of(&feed, retyped_id),
        vec![pair("delete", "posts"), pair("insert", "notes")],
        "{feed}"
    );
    let reinserted = entries_of(&feed, retyped_id)[1];
    assert_eq!(
        (&reinserted["doc"]["type"], &reinserted["doc"]["data"]["n"]),
        (&json!("notes"), &json!(2)),
        "{feed}"
    );

    let (status, feed) = changes(&s, &bob, &format!("since={bob_cursor}")).await;
    assert_eq!(status, 200, "{feed}");
    assert_eq!(
        ops_of(&feed, moved_id),
        vec![pair("insert", "posts")],
        "the new owner sees it come: {feed}"
    );
    let arrived = entries_of(&feed, moved_id)[0];
    assert_eq!(
        (&arrived["doc"]["owner"], &arrived["doc"]["data"]["n"]),
        (&json!(BOB), &json!(1)),
        "{feed}"
    );
    assert!(ops_of(&feed, retyped_id).is_empty(), "{feed}");
    sql.close().await;
    s.finish().await;
}

/// An ACL predicate list holds 1 to 8 predicates (protocol.md, ACL): 0 or 9 are 400
/// `invalid_body` and store nothing; 1 and 8 are taken.
#[tokio::test]
async fn a_predicate_list_holds_one_to_eight_predicates() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let predicates = |n: usize| -> Value {
        Value::Array(
            (0..n)
                .map(|i| json!({"issuer": BOB, "type": format!("t{i}")}))
                .collect(),
        )
    };
    let post = |acl: Value| {
        s.client
            .post(s.url("/v1/docs/posts"))
            .bearer_auth(&alice)
            .json(&json!({"acl": acl, "data": {}}))
            .send()
    };
    for (n, acl) in [
        (0, json!({"read": {"allow": [predicates(0)]}})),
        (9, json!({"read": {"allow": [predicates(9)]}})),
        (
            9,
            json!({"read": {"allow": ["*"], "deny": [predicates(9)]}}),
        ),
        (9, json!({"write": {"allow": [predicates(9)]}})),
    ] {
        let (status, body) = answer(post(acl.clone()).await.unwrap()).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_body")),
            "{n} predicates in {acl}: {body}"
        );
    }
    let sql = s.sql().await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM documents")
        .fetch_one(&sql)
        .await
        .unwrap();
    assert_eq!(stored, 0, "a refused ACL was stored");
    for n in [1, 8] {
        let acl = json!({"read": {"allow": [predicates(n)]}});
        let (status, body) = answer(post(acl).await.unwrap()).await;
        assert_eq!(status, 201, "{n} predicates: {body}");
        assert_eq!(body["acl"]["read"]["allow"][0], predicates(n), "{body}");
    }
    sql.close().await;
    s.finish().await;
}

/// One request of the check-order matrix: what it tests, method, path, token, `If-Match`, body,
/// and the status and code expected.
type OrderCase<'a> = (
    String,
    Method,
    String,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    u16,
    &'a str,
);

/// Document routes check "type name, token, scope, id, If-Match, body, then the stored
/// document" (protocol.md, Errors): each request below is wrong in several ways and is answered
/// for the first of them in that order.
#[tokio::test]
async fn document_routes_check_in_the_documented_order() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let notes_only = s.token(ALICE, &["read:notes", "write:notes"]);
    let victim = s.post(&alice, "posts", json!({"data": {"n": 1}})).await;
    let victim_id = victim["id"].as_str().unwrap();
    let missing = uuid::Uuid::now_v7().to_string();
    let bad_tag = Some("\"x\"");
    let good_body = Some(r#"{"data": {"changed": true}}"#);
    let bad_body = Some(r#"{"data": 1}"#);
    let items = [Method::GET, Method::PUT, Method::PATCH, Method::DELETE];
    let has_body = |m: &Method| *m == Method::PUT || *m == Method::PATCH;
    let mut cases: Vec<OrderCase<'_>> = Vec::new();

    // The type name before everything: no token, a bad id, a bad If-Match, a bad body.
    for method in [Method::GET, Method::POST] {
        let body = (method == Method::POST).then_some("{not json");
        cases.push((
            "bad type, no token".into(),
            method,
            "/v1/docs/Bad%20Type".into(),
            None,
            None,
            body,
            400,
            "invalid_type",
        ));
    }
    for method in items.clone() {
        let body = if has_body(&method) {
            Some("{not json")
        } else {
            None
        };
        let tag = if method == Method::GET { None } else { bad_tag };
        cases.push((
            "bad type, no token, bad id".into(),
            method,
            "/v1/docs/Bad%20Type/not-a-uuid".into(),
            None,
            tag,
            body,
            400,
            "invalid_type",
        ));
    }
    for method in items.clone() {
        let body = if has_body(&method) { bad_body } else { None };
        let tag = if method == Method::GET { None } else { bad_tag };
        // The token before the scope and the id.
        cases.push((
            "bad token, bad id".into(),
            method.clone(),
            "/v1/docs/posts/not-a-uuid".into(),
            Some("garbage"),
            tag,
            body,
            401,
            "invalid_token",
        ));
        // The scope before the id, and before the document's existence.
        cases.push((
            "missing scope, bad id".into(),
            method.clone(),
            "/v1/docs/posts/not-a-uuid".into(),
            Some(notes_only.as_str()),
            tag,
            body,
            403,
            "missing_scope",
        ));
        cases.push((
            "missing scope, no such document".into(),
            method.clone(),
            format!("/v1/docs/posts/{missing}"),
            Some(notes_only.as_str()),
            None,
            if has_body(&method) { good_body } else { None },
            403,
            "missing_scope",
        ));
        // The id before If-Match and the body.
        cases.push((
            "bad id, bad If-Match".into(),
            method.clone(),
            "/v1/docs/posts/not-a-uuid".into(),
            Some(alice.as_str()),
            tag,
            body,
            400,
            "invalid_id",
        ));
    }
    for method in [Method::PUT, Method::PATCH, Method::DELETE] {
        let body = if has_body(&method) { bad_body } else { None };
        // If-Match before the body and the stored document.
        cases.push((
            "bad If-Match, bad body, no such document".into(),
            method.clone(),
            format!("/v1/docs/posts/{missing}"),
            Some(alice.as_str()),
            bad_tag,
            body,
            400,
            "bad_if_match",
        ));
    }
    for method in [Method::PUT, Method::PATCH] {
        // The body before the stored document (its existence, its revision).
        cases.push((
            "bad body, no such document".into(),
            method.clone(),
            format!("/v1/docs/posts/{missing}"),
            Some(alice.as_str()),
            None,
            bad_body,
            400,
            "invalid_body",
        ));
        cases.push((
            "bad body, stale If-Match".into(),
            method,
            format!("/v1/docs/posts/{victim_id}"),
            Some(alice.as_str()),
            Some("\"9\""),
            bad_body,
            400,
            "invalid_body",
        ));
    }

    for (name, method, path, token, tag, body, status, code) in cases {
        let (got, reply) = call(&s, method.clone(), &path, token, tag, body).await;
        assert_eq!(
            (got, reply["error"]["code"].as_str()),
            (status, Some(code)),
            "{name}: {method} {path}: {reply}"
        );
    }
    let (status, now) = s
        .get_json(&alice, &format!("/v1/docs/posts/{victim_id}"))
        .await;
    assert_eq!(
        (status, &now["rev"], &now["data"]),
        (200, &json!(1), &json!({"n": 1})),
        "a refused request changed the document: {now}"
    );
    s.finish().await;
}

/// `/v1/changes` parameters (protocol.md, Change feed): a negative or NaN `wait` and a `limit`
/// past 1000 are 400 `invalid_query`; without `limit` a page holds 100 changes, and the next
/// page goes on from its cursor.
#[tokio::test]
async fn changes_parameters_are_bounded_and_pages_default_to_100() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    for query in [
        "since=0&wait=-1",
        "since=0&wait=nan",
        "since=0&wait=NaN",
        "since=0&limit=1001",
    ] {
        let (status, body) = changes(&s, &alice, query).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_query")),
            "{query}: {body}"
        );
    }
    let sql = s.sql().await;
    let written: HashSet<String> = insert_posts(&sql, ALICE, 150)
        .await
        .iter()
        .map(|id| id.to_string())
        .collect();
    let ids = |body: &Value| -> Vec<String> {
        body["changes"]
            .as_array()
            .unwrap_or_else(|| panic!("{body}"))
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (status, all) = changes(&s, &alice, "since=0&limit=1000").await;
    assert_eq!(status, 200, "limit 1000 is allowed: {all}");
    assert_eq!(ids(&all).len(), 150, "{all}");
    // A longer wait than 60 s, infinity included, is served as 60 (answered at once here:
    // there are changes).
    for wait in ["1e9", "inf"] {
        let (status, body) = changes(&s, &alice, &format!("since=0&limit=1000&wait={wait}")).await;
        assert_eq!(status, 200, "wait={wait}: {body}");
        assert_eq!(ids(&body).len(), 150, "{body}");
    }

    let (status, first) = changes(&s, &alice, "since=0").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(ids(&first).len(), 100, "the default limit");
    let cursor = first["cursor"].as_str().unwrap();
    let (status, second) = changes(&s, &alice, &format!("since={cursor}")).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(ids(&second).len(), 50, "the rest");
    let seen: HashSet<String> = ids(&first).into_iter().chain(ids(&second)).collect();
    assert_eq!(seen, written, "two pages cover every change once");
    sql.close().await;
    s.finish().await;
}

/// A token of more than 16 blocks is 401 `token_too_complex` on a REST read (protocol.md,
/// Errors), refused before its signatures are checked; one of 16 blocks is served.
#[tokio::test]
async fn a_token_of_too_many_blocks_is_too_complex() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let doc = s.post(&alice, "posts", json!({"data": {"n": 1}})).await;
    let path = format!("/v1/docs/posts/{}", doc["id"].as_str().unwrap());
    let with_blocks = |total: usize| -> String {
        let public = s.server.as_ref().unwrap().app().tokens.public_key();
        let mut biscuit = biscuit_auth::Biscuit::from_base64(&alice, public).unwrap();
        for _ in 1..total {
            biscuit = biscuit
                .append(
                    biscuit_auth::BlockBuilder::new()
                        .code("check if true")
                        .unwrap(),
                )
                .unwrap();
        }
        biscuit.to_base64().unwrap()
    };
    let sixteen = with_blocks(16);
    let (status, body) = s.get_json(&sixteen, &path).await;
    assert_eq!(status, 200, "16 blocks are within the bound: {body}");
    let seventeen = with_blocks(17);
    assert!(
        seventeen.len() < 16 * 1024,
        "the block count, not the size, is under test"
    );
    assert_api_error(
        &s.get_json(&seventeen, &path).await,
        401,
        "token_too_complex",
    );
    s.finish().await;
}

/// WebSocket upgrade errors (protocol.md, Errors): an upgrade request with the subprotocol but no
/// `sec-websocket-key`, or a wrong version, is 400 `bad_upgrade`; a plain GET of `/v1/ws` is
/// 426 `upgrade_required`.
#[tokio::test]
async fn websocket_upgrade_errors_have_their_codes() {
    let s = TestServer::start().await;
    assert_api_error(
        &answer(s.client.get(s.url("/v1/ws")).send().await.unwrap()).await,
        426,
        "upgrade_required",
    );
    for (what, key, version) in [
        ("no key", None, "13"),
        ("wrong version", Some("dGhlIHNhbXBsZSBub25jZQ=="), "8"),
    ] {
        let mut request = s
            .client
            .get(s.url("/v1/ws"))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", version)
            .header("sec-websocket-protocol", "vibe.v1");
        if let Some(key) = key {
            request = request.header("sec-websocket-key", key);
        }
        let (status, body) = answer(request.send().await.unwrap()).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("bad_upgrade")),
            "{what}: {body}"
        );
    }
    // A proper upgrade still works.
    let mut ws = Ws::connect(&s.base, None).await;
    assert_eq!(ws.request(json!({"op": "ping"})).await["pong"], true);
    ws.close().await;
    s.finish().await;
}

/// Every response carries `x-request-id`: the client's own when it is printable and at most 128
/// bytes (also on an error), another when it is longer (protocol.md, Routes).
#[tokio::test]
async fn request_ids_are_echoed_up_to_128_printable_bytes() {
    let s = TestServer::start().await;
    let printable = |n: usize| -> String {
        (0..n)
            .map(|i| char::from(b'!' + u8::try_from(i % 94).unwrap()))
            .collect()
    };
    let id_of = |r: &reqwest::Response| -> String {
        r.headers()
            .get("x-request-id")
            .expect("every response carries x-request-id")
            .to_str()
            .unwrap()
            .to_owned()
    };
    let longest = printable(128);
    let r = s
        .client
        .get(s.url("/health"))
        .header("x-request-id", &longest)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(id_of(&r), longest, "a printable id of 128 bytes is kept");
    let r = s
        .client
        .get(s.url("/v1/docs/posts"))
        .header("x-request-id", &longest)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(id_of(&r), longest, "kept on an error too");

    let too_long = printable(129);
    let r = s
        .client
        .get(s.url("/health"))
        .header("x-request-id", &too_long)
        .send()
        .await
        .unwrap();
    let replaced = id_of(&r);
    assert!(!replaced.is_empty(), "an id is still given");
    assert!(
        !too_long.starts_with(&replaced),
        "a 129-byte id is replaced, not kept or cut: {replaced}"
    );
    s.finish().await;
}

/// A list without `limit` returns `http.default_page_size` (50) documents and a `next` cursor;
/// the last page has none (protocol.md, Routes).
#[tokio::test]
async fn lists_default_to_fifty_documents_a_page() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let sql = s.sql().await;
    let written: HashSet<String> = insert_posts(&sql, ALICE, 60)
        .await
        .iter()
        .map(|id| id.to_string())
        .collect();
    let ids = |page: &Value| -> Vec<String> {
        page["docs"]
            .as_array()
            .unwrap_or_else(|| panic!("{page}"))
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (status, first) = s.get_json(&alice, "/v1/docs/posts").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(ids(&first).len(), 50, "the default page size");
    let next = first["next"]
        .as_str()
        .unwrap_or_else(|| panic!("a next cursor: {first}"));
    let (status, second) = s
        .get_json(&alice, &format!("/v1/docs/posts?cursor={next}"))
        .await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(ids(&second).len(), 10, "{second}");
    assert!(second.get("next").is_none(), "the last page: {second}");
    let seen: HashSet<String> = ids(&first).into_iter().chain(ids(&second)).collect();
    assert_eq!(seen, written);
    sql.close().await;
    s.finish().await;
}

/// A writer who is not the owner (protocol.md, Routes and ACL): a PUT with `"acl": null` is
/// accepted and changes no ACL ("`null` in a `PUT` changes nothing"), and a DELETE by a grantee
/// of the ACL's `write` rule is 204 ("write access covers replace, patch and delete").
#[tokio::test]
async fn a_write_grantee_replaces_with_a_null_acl_and_deletes() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let bob = s.token(BOB, &["*"]);
    let acl = json!({"read": {"allow": [BOB]}, "write": {"allow": [BOB]}});
    let doc = s
        .post(&alice, "posts", json!({"acl": acl, "data": {"v": 1}}))
        .await;
    let path = format!("/v1/docs/posts/{}", doc["id"].as_str().unwrap());
    let before = doc["acl"].clone();
    assert_eq!(before["write"]["allow"], json!([BOB]), "{doc}");
    let r = s
        .client
        .put(s.url(&path))
        .bearer_auth(&bob)
        .json(&json!({"data": {"v": 2}, "acl": null}))
        .send()
        .await
        .unwrap();
    let (status, body) = answer(r).await;
    assert_eq!(status, 200, "`acl: null` from a writer is accepted: {body}");
    assert_eq!(
        (&body["rev"], &body["data"]),
        (&json!(2), &json!({"v": 2})),
        "{body}"
    );
    assert!(body.get("acl").is_none(), "Bob is no owner: {body}");
    let (status, now) = s.get_json(&alice, &path).await;
    assert_eq!(status, 200);
    assert_eq!(now["acl"], before, "the ACL is unchanged: {now}");
    assert_eq!(now["data"], json!({"v": 2}), "{now}");

    let r = s
        .client
        .delete(s.url(&path))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "a write grantee may delete");
    let (status, body) = s.get_json(&alice, &path).await;
    assert_eq!(status, 404, "deleted: {body}");
    s.finish().await;
}

/// `/health` carries the server's `version`, and a GET of a document carries an `ETag` equal to
/// its revision in quotes (protocol.md, Routes and Documents).
#[tokio::test]
async fn health_has_a_version_and_reads_have_an_etag() {
    let s = TestServer::start().await;
    let (status, health) = answer(s.client.get(s.url("/health")).send().await.unwrap()).await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"), "{health}");

    let alice = s.token(ALICE, &["*"]);
    let doc = s.post(&alice, "posts", json!({"data": {"n": 1}})).await;
    let url = s.url(&format!("/v1/docs/posts/{}", doc["id"].as_str().unwrap()));
    let r = s
        .client
        .patch(&url)
        .bearer_auth(&alice)
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"data": {"n": 2}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s.client.get(&url).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let etag = r
        .headers()
        .get("etag")
        .expect("a read carries an ETag")
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["rev"], 2, "{body}");
    assert_eq!(etag, format!("\"{}\"", body["rev"]), "the quoted revision");
    s.finish().await;
}

/// A refused `frame_too_large` request names its `id` in `re` only when the frame is at most
/// 64 KiB; a larger one is answered with `re: null` (protocol.md, WebSocket error codes), and the
/// connection goes on.
#[tokio::test]
async fn a_refused_oversized_frame_past_64_kib_is_answered_with_a_null_re() {
    let s = TestServer::start_with(&[("ws.max_frame_bytes", "32768")]).await;
    let alice = s.token(ALICE, &["*"]);
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let padded = |id: u64, pad: usize| {
        Message::text(format!(
            r#"{{"id": {id}, "op": "ping", "pad": "{}"}}"#,
            "x".repeat(pad)
        ))
    };
    ws.send_raw(padded(1, 40 * 1024)).await;
    let f = ws.next().await;
    assert_eq!(f["error"]["code"], "frame_too_large", "{f}");
    assert_eq!(f["re"], 1, "at most 64 KiB: its id is named: {f}");
    ws.send_raw(padded(2, 70 * 1024)).await;
    let f = ws.next().await;
    assert_eq!(f["error"]["code"], "frame_too_large", "{f}");
    assert_eq!(
        f["re"],
        Value::Null,
        "past 64 KiB the id is not looked for: {f}"
    );
    assert_eq!(ws.request(json!({"op": "ping"})).await["pong"], true);
    ws.close().await;
    s.finish().await;
}

/// A `rate_limited` refusal of a frame past 64 KiB answers `re: null` (protocol.md, WebSocket
/// error codes), while an admitted one is answered naming its id.
#[tokio::test]
async fn a_rate_limited_frame_past_64_kib_is_answered_with_a_null_re() {
    let s = TestServer::start_with(&[("ws.requests_per_second", "1")]).await;
    let alice = s.token(ALICE, &["*"]);
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    // Takes the bucket's one token: what follows within the second is over the rate.
    assert_eq!(ws.request(json!({"op": "ping"})).await["pong"], true);
    let pad = "x".repeat(70 * 1024);
    let sent: Vec<u64> = (100..105).collect();
    for id in &sent {
        ws.send_raw(Message::text(format!(
            r#"{{"id": {id}, "op": "ping", "pad": "{pad}"}}"#
        )))
        .await;
    }
    let mut limited = 0;
    let mut admitted = BTreeSet::new();
    for _ in &sent {
        let f = ws.next().await;
        if f["error"]["code"] == "rate_limited" {
            assert_eq!(f["re"], Value::Null, "past 64 KiB: {f}");
            limited += 1;
        } else {
            // Admitted: a ping with an unknown field, answered naming its id.
            assert_eq!(f["error"]["code"], "invalid_request", "{f}");
            let re = f["re"].as_u64().unwrap_or_else(|| panic!("no id in {f}"));
            assert!(sent.contains(&re) && admitted.insert(re), "{f}");
        }
    }
    assert!(
        limited >= 1,
        "five frames within seconds at one a second: some were limited"
    );
    ws.close().await;
    s.finish().await;
}

/// A `/v1/changes` cursor older than `feed.retention` answers 410 `cursor_expired` once the
/// periodic prune (`feed.prune_interval`) has removed what it pointed into (protocol.md, Change
/// feed); it is good while within retention.
#[tokio::test]
async fn an_old_changes_cursor_expires_after_retention() {
    // The shortest prune interval the configuration accepts; a retention long enough that the
    // first read below is within it on a loaded machine.
    let s = TestServer::start_with(&[
        ("feed.retention", "\"5s\""),
        ("feed.prune_interval", "\"1s\""),
    ])
    .await;
    let alice = s.token(ALICE, &["*"]);
    s.post(&alice, "posts", json!({"data": {"n": 0}})).await;
    let (status, start) = changes(&s, &alice, "since=now").await;
    assert_eq!(status, 200, "{start}");
    let old = start["cursor"].as_str().unwrap().to_owned();
    // A newer batch: the old cursor is not caught up, so retention applies to it.
    s.post(&alice, "posts", json!({"data": {"n": 1}})).await;
    let (status, fresh) = changes(&s, &alice, &format!("since={old}")).await;
    assert_eq!(status, 200, "within retention the cursor is good: {fresh}");
    assert_eq!(
        fresh["changes"].as_array().map(Vec::len),
        Some(1),
        "{fresh}"
    );

    common::until("the old cursor is past retention", || async {
        changes(&s, &alice, &format!("since={old}")).await.0 == 410
    })
    .await;
    assert_api_error(
        &changes(&s, &alice, &format!("since={old}")).await,
        410,
        "cursor_expired",
    );
    s.finish().await;
}

/// HEAD is answered as GET without the body (RFC 9110 §9.3.2): the same status, headers and
/// `Content-Length`, so a load balancer can probe `/health` with it. The WebSocket route, whose GET
/// is a handshake, does not take it.
#[tokio::test]
async fn head_answers_as_get_without_the_body() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let doc = s.post(&alice, "posts", json!({"data": {"n": 1}})).await;
    let item = s.url(&format!("/v1/docs/posts/{}", doc["id"].as_str().unwrap()));
    for (url, token) in [
        (s.url("/health"), None),
        (s.url("/metrics"), None),
        (item.clone(), Some(alice.as_str())),
        (item.clone(), None),
    ] {
        let with_token = |request: reqwest::RequestBuilder| match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let get = with_token(s.client.get(&url)).send().await.unwrap();
        let (get_status, get_etag) = (get.status(), get.headers().get("etag").cloned());
        let get_body = get.bytes().await.unwrap();
        let head = with_token(s.client.head(&url)).send().await.unwrap();
        assert_eq!(head.status(), get_status, "HEAD {url}");
        assert_eq!(head.headers().get("etag").cloned(), get_etag, "HEAD {url}");
        if !url.ends_with("/metrics") {
            // The metrics text moves between the two requests (they are counted).
            assert_eq!(
                head.headers()
                    .get("content-length")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<usize>().ok()),
                Some(get_body.len()),
                "HEAD {url}"
            );
        }
        assert!(
            head.bytes().await.unwrap().is_empty(),
            "HEAD {url} has no body"
        );
    }
    let ws = s.client.head(s.url("/v1/ws")).send().await.unwrap();
    assert_eq!(ws.status(), 405);
    assert_eq!(ws.headers().get("allow").unwrap(), "GET");
    let post_only = s.client.get(s.url("/v1/query")).send().await.unwrap();
    assert_eq!(post_only.status(), 405);
    s.finish().await;
}

/// Every counter and gauge README.md and docs/calls.md name is exported from the start, before
/// anything moved it: a series that first appears at its first increment shows no `increase()`
/// for it, so an alert on the first resync or revocation sync failure would never fire.
#[tokio::test]
async fn documented_counters_and_gauges_are_exported_from_the_start() {
    // Histograms appear with their first observation; these gauges are set by a first reading.
    const OBSERVED_LATER: &[&str] = &[
        "vibe_http_request_duration_seconds",
        "vibe_feed_lag_seconds",
        "vibe_feed_tick_seconds",
        "vibe_live_query_match_seconds",
        "vibe_live_query_fanout_seconds",
        "vibe_store_create_batch_rows",
        "vibe_store_read_batch_rows",
        "vibe_call_forward_latency_seconds",
        "vibe_feed_oldest_xact_age_seconds",
        "vibe_revocations_synced_timestamp_seconds",
    ];
    let docs = [
        include_str!("../README.md"),
        include_str!("../docs/calls.md"),
    ];
    let documented: BTreeSet<&str> = docs
        .iter()
        .flat_map(|text| text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|word| word.starts_with("vibe_") && !OBSERVED_LATER.contains(word))
        .collect();
    assert!(documented.len() > 20, "{documented:?}");
    let s = TestServer::start().await;
    // The request counter is labelled by route: it exists once a request was counted.
    let health = s.client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let exported = s.metrics_text().await;
    let missing: Vec<&&str> = documented
        .iter()
        .filter(|name| {
            !exported.lines().any(|line| {
                line.starts_with(&format!("{name} ")) || line.starts_with(&format!("{name}{{"))
            })
        })
        .collect();
    assert!(missing.is_empty(), "not exported yet: {missing:?}");
    // Each says what it counts, the request counter (labelled by route) aside.
    let undescribed: Vec<&&str> = documented
        .iter()
        .filter(|name| **name != "vibe_http_requests_total")
        .filter(|name| !exported.contains(&format!("# HELP {name} ")))
        .collect();
    assert!(undescribed.is_empty(), "no # HELP: {undescribed:?}");
    s.finish().await;
}

/// A value of the wrong shape is refused with a message that starts with where it sits — the
/// query parameter, the body's field path, the WebSocket request's field — and names what is
/// wanted in the API's terms, not a Rust type's.
#[tokio::test]
async fn refusals_of_a_bad_value_name_the_field() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let message_of = |body: &Value| body["error"]["message"].as_str().unwrap_or("").to_owned();

    let r = s
        .client
        .get(s.url("/v1/docs/posts?limit=abc"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    let (status, body) = answer(r).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_query"))
    );
    assert!(message_of(&body).starts_with("limit: "), "{body}");

    let (status, body) = s.query(&alice, &json!({"type": "posts", "sort": 5})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );
    let message = message_of(&body);
    assert!(message.starts_with("sort: "), "{body}");
    assert!(
        message.contains("a sort key or a list of sort keys"),
        "{body}"
    );
    assert!(!message.contains("SortRequest"), "{body}");

    let r = s
        .client
        .post(s.url("/v1/docs/posts"))
        .bearer_auth(&alice)
        .json(&json!({"data": {}, "acl": {"read": ["*"]}}))
        .send()
        .await
        .unwrap();
    let (status, body) = answer(r).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );
    assert!(message_of(&body).starts_with("acl.read"), "{body}");

    // Bytes after the body's JSON value make it not JSON, whatever they are.
    for body in [
        r#"{"data": {}} garbage"#,
        r#"{"data": {}}{"data": {"x": 2}}"#,
    ] {
        let r = s
            .client
            .post(s.url("/v1/docs/posts"))
            .bearer_auth(&alice)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, answer_body) = answer(r).await;
        assert_eq!(
            (status, answer_body["error"]["code"].as_str()),
            (400, Some("bad_json")),
            "{body}: {answer_body}"
        );
    }
    let (status, listed) = s.get_json(&alice, "/v1/docs/posts").await;
    assert_eq!(status, 200);
    assert_eq!(listed["docs"], json!([]), "nothing was stored: {listed}");

    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let reply = ws
        .request(json!({"op": "read", "type": "posts", "limit": "ten"}))
        .await;
    assert_eq!(reply["error"]["code"], "invalid_request", "{reply}");
    assert!(message_of(&reply).starts_with("limit: "), "{reply}");
    ws.close().await;
    s.finish().await;
}
