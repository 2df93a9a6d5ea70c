//! Document CRUD over real HTTP against a real PostgreSQL: round trips, optimistic concurrency,
//! merge-patch semantics, ACL enforcement, the global index, and keyset pagination.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use std::collections::HashSet;

use common::{ALICE, BOB, CAROL, TestServer, Ws};
use reqwest::StatusCode;
use serde_json::{Value, json};
use vibe::wire::{Document, DocumentPage};

/// GET a document URL, expecting it to parse as a document.
async fn fetch(s: &TestServer, token: &str, url: &str) -> Document {
    let r = s.client.get(url).bearer_auth(token).send().await.unwrap();
    r.json().await.unwrap()
}

async fn create(s: &TestServer, token: &str, body: Value) -> Document {
    serde_json::from_value(s.post(token, "posts", body).await).unwrap()
}

/// An empty merge patch of the document at `url`: a write that changes nothing but the revision.
async fn empty_patch(s: &TestServer, url: &str, token: &str) -> reqwest::Response {
    s.client
        .patch(url)
        .bearer_auth(token)
        .header("content-type", "application/merge-patch+json")
        .body("{}")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn create_get_round_trip() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let r = s
        .client
        .post(s.url("/v1/docs/posts"))
        .bearer_auth(&alice)
        .json(&json!({"data": {"title": "hello", "tags": ["a", "b"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["etag"], "\"1\"");
    assert!(r.headers().contains_key("x-request-id"));
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let created: Document = r.json().await.unwrap();
    assert_eq!(location, format!("/v1/docs/posts/{}", created.id));
    assert_eq!(created.id.get_version_num(), 7, "server ids are UUIDv7");
    assert_eq!(
        (
            created.rev,
            created.owner.as_str(),
            created.doc_type.as_str()
        ),
        (1, ALICE, "posts")
    );
    assert_eq!(created.created_at, created.updated_at);

    let fetched: Document = s
        .client
        .get(s.url(&location))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fetched, created);

    // A client-chosen id is kept; reusing it conflicts.
    let id = uuid::Uuid::new_v4();
    let doc = create(&s, &alice, json!({"id": id, "data": {"n": 1}})).await;
    assert_eq!(doc.id, id);
    let r = s
        .client
        .post(s.url("/v1/docs/posts"))
        .bearer_auth(&alice)
        .json(&json!({"id": id, "data": {"n": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "already_exists");

    // The same id under another type is not found.
    let r = s
        .client
        .get(s.url(&format!("/v1/docs/notes/{id}")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    s.finish().await;
}

#[tokio::test]
async fn replace_with_if_match() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let doc = create(&s, &alice, json!({"data": {"v": 1}})).await;
    let url = s.url(&format!("/v1/docs/posts/{}", doc.id));

    let put = |rev: Option<&str>, v: i64| {
        let mut b = s
            .client
            .put(&url)
            .bearer_auth(&alice)
            .json(&json!({"data": {"v": v}}));
        if let Some(rev) = rev {
            b = b.header("if-match", rev);
        }
        b.send()
    };
    let r = put(Some("\"1\""), 2).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["etag"], "\"2\"");
    let updated: Document = r.json().await.unwrap();
    assert_eq!((updated.rev, &updated.data), (2, &json!({"v": 2})));
    assert!(updated.updated_at >= doc.updated_at);
    assert_eq!(updated.created_at, doc.created_at);

    // A stale revision is refused and changes nothing.
    let r = put(Some("1"), 3).await.unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "rev_mismatch"
    );
    let now = fetch(&s, &alice, &url).await;
    assert_eq!((now.rev, &now.data), (2, &json!({"v": 2})));

    // No If-Match (or `*`): last writer wins.
    assert_eq!(put(None, 4).await.unwrap().status(), StatusCode::OK);
    assert_eq!(put(Some("*"), 5).await.unwrap().status(), StatusCode::OK);
    let now = fetch(&s, &alice, &url).await;
    assert_eq!((now.rev, &now.data), (4, &json!({"v": 5})));

    // RFC 9110 §13.1.1: a list matches if any of its tags does; a weak tag never matches (a
    // proxy that compresses responses weakens the ETag it passes on).
    let r = put(Some("W/\"4\""), 6).await.unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let r = put(Some("\"9\", W/\"4\""), 6).await.unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let r = put(Some("\"9\", \"4\""), 6).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = put(Some("\"5\", *"), 7).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "`*` stands alone");
    let now = fetch(&s, &alice, &url).await;
    assert_eq!((now.rev, &now.data), (5, &json!({"v": 6})));

    // The Authorization scheme is case-insensitive (RFC 9110 §11.1).
    for scheme in ["bearer", "BEARER"] {
        let r = s
            .client
            .get(&url)
            .header("authorization", format!("{scheme} {alice}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{scheme}");
    }
    s.finish().await;
}

#[tokio::test]
async fn concurrent_writers_at_the_same_revision_one_wins() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let doc = create(&s, &alice, json!({"data": {"v": 0}})).await;
    let url = s.url(&format!("/v1/docs/posts/{}", doc.id));
    let mut attempts = tokio::task::JoinSet::new();
    for i in 1..=12 {
        let request = s
            .client
            .put(&url)
            .bearer_auth(&alice)
            .header("if-match", "\"1\"")
            .json(&json!({"data": {"v": i}}));
        attempts.spawn(async move { request.send().await.unwrap().status() });
    }
    let statuses = attempts.join_all().await;
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::PRECONDITION_FAILED)
            .count(),
        11
    );
    let now = fetch(&s, &alice, &url).await;
    assert_eq!(now.rev, 2);
    s.finish().await;
}

#[tokio::test]
async fn merge_patch_follows_rfc_7396() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let doc = create(
        &s,
        &alice,
        json!({"data": {"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2], "f": "keep"}}),
    )
    .await;
    let url = s.url(&format!("/v1/docs/posts/{}", doc.id));
    let r = s
        .client
        .patch(&url)
        .bearer_auth(&alice)
        .header("content-type", "application/merge-patch+json")
        .header("if-match", "\"1\"")
        .body(r#"{"data": {"a": null, "b": {"c": null, "x": 5}, "e": [3], "g": {"h": null}}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let patched: Document = r.json().await.unwrap();
    assert_eq!(
        patched.data,
        json!({"b": {"d": 3, "x": 5}, "e": [3], "f": "keep", "g": {}})
    );
    assert_eq!(patched.rev, 2);

    // The ACL can be patched too (by the owner); `acl: null` restores owner-only.
    let r = s
        .client
        .patch(&url)
        .bearer_auth(&alice)
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"acl": {"read": {"allow": ["*"]}}}"#)
        .send()
        .await
        .unwrap();
    let patched: Document = r.json().await.unwrap();
    assert!(patched.acl.is_public());
    assert_eq!(patched.data["f"], "keep");
    let r = s
        .client
        .patch(&url)
        .bearer_auth(&alice)
        .header("content-type", "application/json")
        .body(r#"{"acl": null}"#)
        .send()
        .await
        .unwrap();
    let patched: Document = r.json().await.unwrap();
    assert_eq!(patched.acl, vibe::acl::Acl::default());
    assert_eq!(patched.rev, 4);
    s.finish().await;
}

/// A merge patch is bounded by the body limit and so is the document it makes: patches adding a
/// body's worth each (to its data or its ACL) cannot grow a document past `http.max_body_bytes`
/// (every event and page carrying it is sized on that bound).
#[tokio::test]
async fn a_patch_cannot_grow_a_document_past_the_body_limit() {
    let s = TestServer::start_with(&[("http.max_body_bytes", "2000")]).await;
    let alice = s.token(ALICE, &["*"]);
    let doc = create(&s, &alice, json!({"data": {"a": "x".repeat(1200)}})).await;
    let url = s.url(&format!("/v1/docs/posts/{}", doc.id));
    let patch = |body: Value| {
        s.client
            .patch(&url)
            .bearer_auth(&alice)
            .header("content-type", "application/merge-patch+json")
            .body(body.to_string())
            .send()
    };
    let r = patch(json!({"data": {"b": "y".repeat(1200)}}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let refused: Value = r.json().await.unwrap();
    assert_eq!(refused["error"]["code"], "body_too_large", "{refused}");
    let kept = fetch(&s, &alice, &url).await;
    assert_eq!(
        (kept.rev, kept.data.get("b")),
        (1, None),
        "nothing was written"
    );
    // The ACL counts too: its lists grow by a patch's worth each just as well.
    let readers: Vec<String> = (0..30).map(|i| format!("did:key:zReader{i:012}")).collect();
    let r = patch(json!({"acl": {"read": {"allow": readers}}}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let kept = fetch(&s, &alice, &url).await;
    assert_eq!(
        (kept.rev, kept.acl.read.is_none()),
        (1, true),
        "nothing was written"
    );
    // A patch that keeps it within the bound goes through.
    let r = patch(json!({"data": {"a": null, "b": "y".repeat(1200)}}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    s.finish().await;
}

/// A data-only write leaves the stored ACL as it is — also one this version cannot parse (written
/// in SQL, or by a newer node), which it reads as owner-only and must not write back as such.
#[tokio::test]
async fn a_data_only_write_leaves_the_stored_acl_alone() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let doc = create(&s, &alice, json!({"data": {"n": 1}})).await;
    let sql = s.sql().await;
    sqlx::query(
        "UPDATE documents SET acl = '{\"read\": {\"allow\": [\"*\"]}, \"x\": 1}' WHERE id = $1",
    )
    .bind(doc.id)
    .execute(&sql)
    .await
    .unwrap();
    let r = s
        .client
        .put(s.url(&format!("/v1/docs/posts/{}", doc.id)))
        .bearer_auth(&alice)
        .json(&json!({"data": {"n": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let stored: Value = sqlx::query_scalar("SELECT acl FROM documents WHERE id = $1")
        .bind(doc.id)
        .fetch_one(&sql)
        .await
        .unwrap();
    assert_eq!(stored, json!({"read": {"allow": ["*"]}, "x": 1}));
    sql.close().await;
    s.finish().await;
}

#[tokio::test]
async fn delete_removes_and_respects_if_match() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let doc = create(&s, &alice, json!({"data": {}})).await;
    let url = s.url(&format!("/v1/docs/posts/{}", doc.id));
    let r = s
        .client
        .delete(&url)
        .bearer_auth(&alice)
        .header("if-match", "\"7\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let r = s
        .client
        .delete(&url)
        .bearer_auth(&alice)
        .header("if-match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = s.client.get(&url).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = s
        .client
        .delete(&url)
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    s.finish().await;
}

#[tokio::test]
async fn acl_governs_other_users_and_the_global_index() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let bob = s.token(BOB, &["*"]);
    let carol = s.token(CAROL, &["*"]);
    let private = create(&s, &alice, json!({"data": {"secret": true}})).await;
    let shared = create(
        &s,
        &alice,
        json!({"acl": {"read": {"allow": ["*"], "deny": [CAROL]}, "write": {"allow": [BOB]}},
               "data": {"title": "public"}}),
    )
    .await;
    let get = |id: uuid::Uuid, token: &str| {
        s.client
            .get(s.url(&format!("/v1/docs/posts/{id}")))
            .bearer_auth(token.to_owned())
            .send()
    };
    assert_eq!(
        get(private.id, &bob).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(get(shared.id, &bob).await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        get(shared.id, &carol).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );

    // Bob may write the shared document but not change its ACL.
    let url = s.url(&format!("/v1/docs/posts/{}", shared.id));
    let r = s
        .client
        .put(&url)
        .bearer_auth(&bob)
        .json(&json!({"data": {"title": "edited"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = s
        .client
        .put(&url)
        .bearer_auth(&bob)
        .json(&json!({"data": {"title": "edited"}, "acl": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "acl_owner_only"
    );
    // Even the ACL the document has: accepting that would let a writer probe the owner's ACL.
    let r = s
        .client
        .put(&url)
        .bearer_auth(&bob)
        .json(&json!({"data": {"title": "edited"},
                      "acl": {"read": {"allow": ["*"], "deny": [CAROL]}, "write": {"allow": [BOB]}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = s
        .client
        .delete(s.url(&format!("/v1/docs/posts/{}", private.id)))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // Write access alone does not reveal content: a write-only caller gets no body back.
    let write_only = create(
        &s,
        &alice,
        json!({"acl": {"write": {"allow": [BOB]}}, "data": {"secret": 1}}),
    )
    .await;
    let r = empty_patch(
        &s,
        &s.url(&format!("/v1/docs/posts/{}", write_only.id)),
        &bob,
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(r.headers()["etag"], "\"2\"");
    assert!(r.text().await.unwrap().is_empty());

    // The global index lists exactly the public document, and follows ACL changes.
    let pool = s.sql().await;
    let refs: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT doc_id, ref FROM doc_refs ORDER BY doc_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        refs,
        vec![(shared.id, format!("{ALICE}/posts/{}", shared.id))]
    );
    let summary: (bool, Vec<String>, Vec<String>) = sqlx::query_as(
        "SELECT read_public, read_allow_dids, read_deny_dids FROM documents WHERE id = $1",
    )
    .bind(shared.id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(summary, (true, vec![], vec![CAROL.to_owned()]));
    let r = s
        .client
        .put(&url)
        .bearer_auth(&alice)
        .json(&json!({"data": {}, "acl": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM doc_refs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 0);
    assert_eq!(
        get(shared.id, &bob).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    pool.close().await;
    s.finish().await;
}

/// A token that may write a type but not read it gets only the new revision back from a write,
/// over REST and over the WebSocket, even for the caller's own documents: the reply would
/// otherwise read the document for it.
#[tokio::test]
async fn a_write_only_token_gets_no_content_back_from_writes() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let write_only = s.token(ALICE, &["write:posts"]);
    let doc = create(&s, &alice, json!({"data": {"secret": 1}})).await;
    let url = s.url(&format!("/v1/docs/posts/{}", doc.id));

    let r = empty_patch(&s, &url, &write_only).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(r.headers()["etag"], "\"2\"");
    assert!(r.text().await.unwrap().is_empty());
    let r = s
        .client
        .put(&url)
        .bearer_auth(&write_only)
        .json(&json!({"data": {"secret": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(r.headers()["etag"], "\"3\"");

    let mut ws = Ws::connect(&s.base, Some(&write_only)).await;
    let r = ws
        .request(
            json!({"op": "write", "type": "posts", "doc": {"id": doc.id, "data": {"secret": 3}}}),
        )
        .await;
    assert_eq!(r["rev"], 4, "{r}");
    assert!(r.get("doc").is_none(), "{r}");
    ws.close().await;

    // A token that also reads gets the document, and the writes above all landed.
    let r = empty_patch(&s, &url, &alice).await;
    assert_eq!(r.status(), StatusCode::OK);
    let back: Document = r.json().await.unwrap();
    assert_eq!((back.rev, &back.data), (5, &json!({"secret": 3})));
    s.finish().await;
}

#[tokio::test]
async fn pagination_has_no_duplicates_or_gaps_under_concurrent_inserts() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let bob = s.token(BOB, &["*"]);
    let mut existing = HashSet::new();
    for i in 0..120 {
        existing.insert(create(&s, &alice, json!({"data": {"i": i}})).await.id);
    }
    create(&s, &bob, json!({"data": {"other": true}})).await;

    // Inserts keep arriving while the pages are read (and one is made between any two pages).
    let writer = {
        let client = s.client.clone();
        let url = s.url("/v1/docs/posts");
        let alice = alice.clone();
        tokio::spawn(async move {
            for i in 0..60 {
                let r = client
                    .post(&url)
                    .bearer_auth(&alice)
                    .json(&json!({"data": {"late": i}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::CREATED);
            }
        })
    };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = s.url("/v1/docs/posts?limit=25");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: DocumentPage = s
            .client
            .get(&url)
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(page.docs.len() <= 25);
        seen.extend(page.docs);
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
        // At least one insert lands between every two pages, whatever the writer's pace.
        create(&s, &alice, json!({"data": {"between": seen.len()}})).await;
    }
    writer.await.unwrap();
    let ids: Vec<_> = seen.iter().map(|d| d.id).collect();
    let unique: HashSet<_> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "a document appeared twice");
    assert!(
        existing.is_subset(&unique),
        "a document that existed before paging was skipped"
    );
    assert!(
        seen.iter().all(|d| d.owner == ALICE),
        "only the caller's documents are listed"
    );
    assert!(
        seen.windows(2)
            .all(|w| (w[0].created_at, w[0].id) > (w[1].created_at, w[1].id)),
        "newest first, strictly"
    );
    s.finish().await;
}
