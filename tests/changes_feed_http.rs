//! `GET /v1/changes`: the change feed over HTTP, filtered by scope and ACL, paged by cursor,
//! long-polled, and honest about expired cursors.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{ALICE, BOB, TestServer, Ws};
use serde_json::{Value, json};

async fn changes(s: &TestServer, token: &str, query: &str) -> (u16, Value) {
    let r = s
        .client
        .get(s.url(&format!("/v1/changes?{query}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn ids(body: &Value) -> Vec<String> {
    body["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_feed_shows_what_the_caller_may_read() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let bob = s.token(BOB, &["*"]);
    let a1 = s.post(&alice, "posts", json!({"data": {"n": 1}})).await;
    let b_public = s
        .post(
            &bob,
            "posts",
            json!({"acl": {"read": {"allow": ["*"]}}, "data": {}}),
        )
        .await;
    s.post(&bob, "posts", json!({"data": {"private": true}}))
        .await;
    let a_note = s.post(&alice, "notes", json!({"data": {}})).await;

    // Own documents by default, from the start of retention.
    let (status, own) = changes(&s, &alice, "since=0").await;
    assert_eq!(status, 200);
    assert_eq!(
        ids(&own),
        vec![a1["id"].as_str().unwrap(), a_note["id"].as_str().unwrap()]
    );
    assert_eq!(own["changes"][0]["op"], "insert");
    assert_eq!(own["changes"][0]["doc"]["data"]["n"], 1);
    // Global: plus what others made readable, never their private documents.
    let (_, global) = changes(&s, &alice, "since=0&global=true").await;
    assert_eq!(ids(&global).len(), 3);
    assert!(ids(&global).contains(&b_public["id"].as_str().unwrap().to_owned()));
    // Type filter, and scope: a posts-only token sees no notes and may not ask for them.
    let posts_only = s.token(ALICE, &["read:posts"]);
    let (_, only_posts) = changes(&s, &posts_only, "since=0").await;
    assert_eq!(ids(&only_posts), vec![a1["id"].as_str().unwrap()]);
    let (status, denied) = changes(&s, &posts_only, "since=0&types=notes").await;
    assert_eq!(
        (status, denied["error"]["code"].as_str()),
        (403, Some("missing_scope"))
    );

    // An attenuated token (posts only) sees no notes either, even without naming types.
    let attenuated = {
        use biscuit_auth::{Biscuit, macros::block};
        let public = s.server.as_ref().unwrap().app().tokens.public_key();
        Biscuit::from_base64(&alice, public)
            .unwrap()
            .append(block!(r#"check if doc_type("posts");"#))
            .unwrap()
            .to_base64()
            .unwrap()
    };
    let (status, narrowed) = changes(&s, &attenuated, "since=0").await;
    assert_eq!(status, 200);
    assert_eq!(ids(&narrowed), vec![a1["id"].as_str().unwrap()]);

    // Losing access shows up as `remove`; deletes as `delete`.
    let cursor = global["cursor"].as_str().unwrap().to_owned();
    let id = b_public["id"].as_str().unwrap();
    s.client
        .put(s.url(&format!("/v1/docs/posts/{id}")))
        .bearer_auth(&bob)
        .json(&json!({"acl": {}, "data": {}}))
        .send()
        .await
        .unwrap();
    s.client
        .delete(s.url(&format!("/v1/docs/posts/{}", a1["id"].as_str().unwrap())))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    let (_, later) = changes(&s, &alice, &format!("since={cursor}&global=true")).await;
    let ops: Vec<&str> = later["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["op"].as_str().unwrap())
        .collect();
    assert_eq!(ops, vec!["remove", "delete"]);
    assert!(later["changes"][0].get("doc").is_none());
    s.finish().await;
}

#[tokio::test]
async fn pages_cover_everything_once() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let mut written = HashSet::new();
    for n in 0..7 {
        written.insert(
            s.post(&alice, "posts", json!({"data": {"n": n}})).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let mut seen = Vec::new();
    let mut cursor = "0".to_owned();
    loop {
        let (_, page) = changes(&s, &alice, &format!("since={cursor}&limit=2")).await;
        cursor = page["cursor"].as_str().unwrap().to_owned();
        if page["changes"].as_array().unwrap().is_empty() {
            break;
        }
        seen.extend(ids(&page));
    }
    assert_eq!(seen.len(), 7, "{seen:?}");
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), written);

    s.finish().await;
}

/// A page ends once its changes pass `http.max_page_bytes` (each change holds whole document
/// images), and its cursor goes on from there: every change arrives once, in order.
#[tokio::test]
async fn pages_are_bounded_in_bytes_and_lose_nothing() {
    let s = TestServer::start_with(&[("http.max_page_bytes", "20000")]).await;
    let alice = s.token(ALICE, &["*"]);
    let mut written = Vec::new();
    for n in 0..12 {
        let doc = s
            .post(
                &alice,
                "posts",
                json!({"data": {"n": n, "pad": "x".repeat(4_000)}}),
            )
            .await;
        written.push(doc["id"].as_str().unwrap().to_owned());
    }
    let mut seen = Vec::new();
    let mut cursor = "0".to_owned();
    let mut pages = 0;
    loop {
        let (status, page) = changes(&s, &alice, &format!("since={cursor}&limit=1000")).await;
        assert_eq!(status, 200, "{page}");
        let got = ids(&page);
        if got.is_empty() {
            break;
        }
        assert!(
            got.len() < written.len(),
            "a page holds at most ~20 kB: {}",
            got.len()
        );
        seen.extend(got);
        cursor = page["cursor"].as_str().unwrap().to_owned();
        pages += 1;
    }
    assert!(pages >= 3, "{pages} pages");
    assert_eq!(seen, written);
    s.finish().await;
}

#[tokio::test]
async fn type_lists_are_deduplicated_and_capped() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let doc = s.post(&alice, "posts", json!({"data": {}})).await;
    let (status, body) = changes(&s, &alice, "since=0&types=posts,posts,posts").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ids(&body), vec![doc["id"].as_str().unwrap()]);
    let many: Vec<String> = (0..65).map(|n| format!("t{n}")).collect();
    let (status, body) = changes(&s, &alice, &format!("since=0&types={}", many.join(","))).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("invalid_query"))
    );
    s.finish().await;
}

#[tokio::test]
async fn bad_and_expired_cursors() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let (status, body) = changes(&s, &alice, "since=yesterday").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_cursor"))
    );
    let (status, body) = changes(&s, &alice, "since=999999-0").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_cursor")),
        "a cursor ahead of the feed was never issued: {body}"
    );
    // A wait far past the longest one is clamped (it answers at once: a change is there).
    s.post(&alice, "posts", json!({"data": {}})).await;
    let (status, body) = changes(&s, &alice, "since=0&wait=1e20").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["changes"].as_array().unwrap().len(), 1, "{body}");
    let (status, body) = changes(&s, &alice, "since=0&limit=0").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_query"))
    );
    let (_, start) = changes(&s, &alice, "since=now").await;
    let old = start["cursor"].as_str().unwrap().to_owned();
    s.post(&alice, "posts", json!({"data": {}})).await;
    // Make sure a newer tick exists, then prune everything but it.
    let (_, after) = changes(&s, &alice, &format!("since={old}&wait=10")).await;
    assert_eq!(after["changes"].as_array().unwrap().len(), 1);
    let app = s.server.as_ref().unwrap().app().clone();
    s.post(&alice, "posts", json!({"data": {}})).await;
    let (_, _) = changes(
        &s,
        &alice,
        &format!("since={}&wait=10", after["cursor"].as_str().unwrap()),
    )
    .await;
    app.feed.prune(Duration::ZERO).await.unwrap();
    let (status, body) = changes(&s, &alice, &format!("since={old}")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (410, Some("cursor_expired")),
        "{body}"
    );
    s.finish().await;
}

/// A tick cut for a request on this node (here `/v1/changes`) wakes this node's own feed reader
/// too: a change written straight in SQL, which rings nothing itself, reaches a live query on the
/// node at once — here the poll, the only other way it would, is an hour apart.
#[tokio::test]
async fn a_tick_cut_for_a_request_wakes_its_own_nodes_feed_reader() {
    let s = TestServer::start_with(&[("feed.poll_interval", "\"1h\"")]).await;
    let alice = s.token(ALICE, &["*"]);
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let reply = ws.request(json!({"op": "read", "type": "posts"})).await;
    assert_eq!(reply["docs"], json!([]), "{reply}");
    let id = uuid::Uuid::now_v7();
    sqlx::query("INSERT INTO documents (id, owner_did, type, data) VALUES ($1, $2, 'posts', '{}')")
        .bind(id)
        .bind(ALICE)
        .execute(&s.sql().await)
        .await
        .unwrap();
    let (status, body) = changes(&s, &alice, "since=0").await;
    assert_eq!((status, ids(&body)), (200, vec![id.to_string()]), "{body}");
    let added = ws.event(&reply["sub"]).await;
    assert_eq!(
        (&added["event"], &added["doc"]["id"]),
        (&json!("add"), &json!(id)),
        "{added}"
    );
    ws.close().await;
    s.finish().await;
}
