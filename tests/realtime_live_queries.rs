//! Live queries over a real WebSocket against the real database: events as documents enter,
//! change in and leave a result; shared live queries; ACLs per subscriber; SQL-made writes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use common::{ALICE, BOB, CAROL, TestServer, Ws};
use serde_json::{Value, json};

#[tokio::test]
async fn events_follow_documents_into_and_out_of_the_result() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let existing = s
        .post(&alice, "posts", json!({"data": {"status": "open", "n": 0}}))
        .await;
    s.post(&alice, "posts", json!({"data": {"status": "closed"}}))
        .await;

    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let reply = ws
        .request(json!({"op": "read", "type": "posts", "where": {"data.status": "open"}}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let sub = reply["sub"].clone();
    assert_eq!(reply["docs"].as_array().unwrap().len(), 1);
    assert_eq!(reply["docs"][0]["id"], existing["id"]);
    let mut last_cursor: vibe::feed::Cursor = reply["cursor"].as_str().unwrap().parse().unwrap();
    let mut check_cursor = |event: &Value| {
        let c: vibe::feed::Cursor = event["cursor"].as_str().unwrap().parse().unwrap();
        assert!(c > last_cursor, "cursors grow: {c} after {last_cursor}");
        last_cursor = c;
    };

    // A write over REST that matches: add.
    let created = s
        .post(&alice, "posts", json!({"data": {"status": "open", "n": 1}}))
        .await;
    let event = ws.event(&sub).await;
    assert_eq!(
        (event["event"].as_str(), &event["doc"]["id"]),
        (Some("add"), &created["id"])
    );
    check_cursor(&event);

    // A write over the WebSocket that matches: add, with the write's own reply.
    let written = ws
        .request(
            json!({"op": "write", "type": "posts", "doc": {"data": {"status": "open", "n": 2}}}),
        )
        .await;
    assert_eq!(written["ok"], true, "{written}");
    let event = ws.event(&sub).await;
    assert_eq!(
        (event["event"].as_str(), &event["doc"]["id"]),
        (Some("add"), &written["doc"]["id"])
    );
    check_cursor(&event);

    // Still matching after an update: change. No longer matching: remove. Deleted: remove.
    let id = created["id"].as_str().unwrap();
    let r = s
        .client
        .patch(s.url(&format!("/v1/docs/posts/{id}")))
        .bearer_auth(&alice)
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"data": {"n": 10}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let event = ws.event(&sub).await;
    assert_eq!(
        (event["event"].as_str(), &event["doc"]["data"]["n"]),
        (Some("change"), &json!(10))
    );
    check_cursor(&event);
    let r = s
        .client
        .patch(s.url(&format!("/v1/docs/posts/{id}")))
        .bearer_auth(&alice)
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"data": {"status": "closed"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let event = ws.event(&sub).await;
    assert_eq!(
        (event["event"].as_str(), event["id"].as_str()),
        (Some("remove"), Some(id))
    );
    check_cursor(&event);
    let removed = ws
        .request(json!({"op": "remove", "type": "posts", "docId": written["doc"]["id"]}))
        .await;
    assert_eq!(removed["ok"], true, "{removed}");
    let event = ws.event(&sub).await;
    assert_eq!(
        (event["event"].as_str(), &event["id"]),
        (Some("remove"), &written["doc"]["id"])
    );
    check_cursor(&event);

    // A non-matching write produces nothing: the next event is for the next matching one.
    s.post(&alice, "posts", json!({"data": {"status": "closed"}}))
        .await;
    let last = s
        .post(&alice, "posts", json!({"data": {"status": "open", "n": 3}}))
        .await;
    let event = ws.event(&sub).await;
    assert_eq!(event["doc"]["id"], last["id"]);

    // After unsub, nothing more arrives for it. Another connection's subscription to the same
    // query shares its live query, which queues a change's frames for all its subscribers in
    // one pass: once the witness has its event, a frame leaked to this connection is queued
    // already, ahead of the pong asked for after it.
    let mut witness = Ws::connect(&s.base, Some(&alice)).await;
    let watching = witness
        .request(json!({"op": "read", "type": "posts", "where": {"data.status": "open"}}))
        .await;
    assert_eq!(watching["ok"], true, "{watching}");
    let r = ws.request(json!({"op": "unsub", "sub": sub})).await;
    assert_eq!(r["ok"], true);
    let after = s
        .post(&alice, "posts", json!({"data": {"status": "open"}}))
        .await;
    let event = witness.event(&watching["sub"]).await;
    assert_eq!(event["doc"]["id"], after["id"], "{event}");
    witness.close().await;
    let pong = ws.request(json!({"op": "ping"})).await;
    assert_eq!(pong["pong"], true);
    assert!(
        ws.pending.iter().all(|f| f["sub"] != sub),
        "{:?}",
        ws.pending
    );
    ws.close().await;
    s.finish().await;
}

#[tokio::test]
async fn identical_queries_share_one_live_query() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let bob = s.token(BOB, &["*"]);
    let carol = s.token(CAROL, &["*"]);
    let query =
        json!({"op": "read", "type": "posts", "global": true, "sort": "-createdAt", "limit": 10});
    // Two readers who do not own the document: they get the same bytes (an owner's frame also
    // carries the ACL).
    let mut a = Ws::connect(&s.base, Some(&bob)).await;
    let mut b = Ws::connect(&s.base, Some(&carol)).await;
    let ra = a.request(query.clone()).await;
    let rb = b.request(query.clone()).await;
    assert_eq!(ra["sub"], rb["sub"], "one live query, one subscription id");
    let (queries, subscribers) = ractor::call!(
        s.server.as_ref().unwrap().app().realtime,
        vibe_actors::realtime::RealtimeMsg::Stats
    )
    .unwrap();
    assert_eq!((queries, subscribers), (1, 2));

    let doc = s
        .post(
            &alice,
            "posts",
            json!({"acl": {"read": {"allow": ["*"]}}, "data": {"hello": 1}}),
        )
        .await;
    let ea = a.event(&ra["sub"]).await;
    let eb = b.event(&rb["sub"]).await;
    assert_eq!(ea, eb, "the same event, encoded once");
    assert_eq!(ea["doc"]["id"], doc["id"]);
    assert!(
        ea["doc"].get("acl").is_none(),
        "readers do not get the ACL: {ea}"
    );
    a.close().await;
    b.close().await;
    s.finish().await;
}

/// A public document denied to everyone ("*") is in a global live query's window like any other
/// public document, and hidden per subscriber: its owner sees it, others do not, whether the
/// window was built by changes or loaded afresh (a window that held it by changes and left it out
/// when loaded would tell a subscriber arriving later a different story).
#[tokio::test]
async fn a_public_document_denied_to_everyone_is_its_owners_alone_in_global_windows() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let bob = s.token(BOB, &["*"]);
    let query = json!({"op": "read", "type": "posts", "global": true, "limit": 2});
    let mut a = Ws::connect(&s.base, Some(&alice)).await;
    let mut b = Ws::connect(&s.base, Some(&bob)).await;
    let sub = a.request(query.clone()).await["sub"].clone();
    b.request(query.clone()).await;
    let open = s
        .post(
            &bob,
            "posts",
            json!({"acl": {"read": {"allow": ["*"]}}, "data": {"n": 1}}),
        )
        .await;
    let hidden = s
        .post(
            &alice,
            "posts",
            json!({"acl": {"read": {"allow": ["*"], "deny": ["*"]}}, "data": {"n": 2}}),
        )
        .await;
    let ids = |events: [Value; 2]| events.map(|e| e["doc"]["id"].clone());
    assert_eq!(
        ids([a.event(&sub).await, a.event(&sub).await]),
        [open["id"].clone(), hidden["id"].clone()]
    );
    // Loaded afresh (a live query of its own: another limit), the window holds it too.
    let mut fresh = query.clone();
    fresh["limit"] = json!(3);
    let held = |snapshot: &Value| -> Vec<Value> {
        let docs = snapshot["docs"].as_array().unwrap();
        docs.iter().map(|d| d["id"].clone()).collect()
    };
    let snapshot = a.request(fresh.clone()).await;
    assert_eq!(
        held(&snapshot),
        [hidden["id"].clone(), open["id"].clone()],
        "{snapshot}"
    );
    let snapshot = b.request(fresh).await;
    assert_eq!(held(&snapshot), [open["id"].clone()], "{snapshot}");
    a.close().await;
    b.close().await;
    s.finish().await;
}

#[tokio::test]
async fn global_queries_respect_each_subscribers_access() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let bob = s.token(BOB, &["*"]);
    let carol = s.token(CAROL, &["*"]);
    let query = json!({"op": "read", "type": "posts", "global": true});
    let mut b = Ws::connect(&s.base, Some(&bob)).await;
    let mut c = Ws::connect(&s.base, Some(&carol)).await;
    let sub = b.request(query.clone()).await["sub"].clone();
    assert_eq!(c.request(query.clone()).await["sub"], sub);

    // Public but denied to Carol: Bob gets it, Carol does not.
    let denied = s
        .post(
            &alice,
            "posts",
            json!({"acl": {"read": {"allow": ["*"], "deny": [CAROL]}}, "data": {"n": 1}}),
        )
        .await;
    // Private: nobody subscribed sees it.
    s.post(&alice, "posts", json!({"data": {"n": 2}})).await;
    let open = s
        .post(
            &alice,
            "posts",
            json!({"acl": {"read": {"allow": ["*"]}}, "data": {"n": 3}}),
        )
        .await;
    let e = b.event(&sub).await;
    assert_eq!(
        (e["event"].as_str(), &e["doc"]["id"]),
        (Some("add"), &denied["id"])
    );
    let e = b.event(&sub).await;
    assert_eq!(e["doc"]["id"], open["id"]);
    let e = c.event(&sub).await;
    assert_eq!(
        e["doc"]["id"], open["id"],
        "Carol's first event skips the denied document"
    );

    // Lifting the deny: Carol gets an add, Bob a change.
    let id = denied["id"].as_str().unwrap();
    let r = s
        .client
        .put(s.url(&format!("/v1/docs/posts/{id}")))
        .bearer_auth(&alice)
        .json(&json!({"acl": {"read": {"allow": ["*"]}}, "data": {"n": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(c.event(&sub).await["event"], "add");
    assert_eq!(b.event(&sub).await["event"], "change");
    // Making it private: both get a remove.
    let r = s
        .client
        .put(s.url(&format!("/v1/docs/posts/{id}")))
        .bearer_auth(&alice)
        .json(&json!({"acl": {}, "data": {"n": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(b.event(&sub).await["event"], "remove");
    assert_eq!(c.event(&sub).await["event"], "remove");
    b.close().await;
    c.close().await;
    s.finish().await;
}

/// Writes made straight in SQL (no Vibe node woken) are found by the poll.
#[tokio::test]
async fn writes_made_in_sql_are_delivered() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let sub = ws.request(json!({"op": "read", "type": "posts"})).await["sub"].clone();
    let pool = s.sql().await;
    let id = uuid::Uuid::new_v4();
    sqlx::query("INSERT INTO documents (id, owner_did, type, data) VALUES ($1, $2, 'posts', '{\"by\": \"sql\"}')")
        .bind(id)
        .bind(ALICE)
        .execute(&pool)
        .await
        .unwrap();
    let e = ws.event(&sub).await;
    assert_eq!(
        (e["event"].as_str(), e["doc"]["id"].as_str()),
        (Some("add"), Some(id.to_string().as_str()))
    );

    // Changing when it was made moves it out of a `createdAt` range: a `remove` there (judged
    // by its old time, not its new one).
    let recent = ws
        .request(json!({"op": "read", "type": "posts",
                        "where": {"createdAt": {"gte": "2020-01-01T00:00:00Z"}}}))
        .await;
    assert_eq!(recent["docs"].as_array().map(Vec::len), Some(1), "{recent}");
    let recent = recent["sub"].clone();
    sqlx::query("UPDATE documents SET created_at = '2010-01-01T00:00:00Z' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let e = ws.event(&recent).await;
    assert_eq!(
        (e["event"].as_str(), e["id"].as_str()),
        (Some("remove"), Some(id.to_string().as_str())),
        "{e}"
    );

    // The query over all posts saw a delete and an insert: `remove`, then `add` with the new
    // time.
    let mut next = async || {
        let e = ws.event(&sub).await;
        let who = e["id"]
            .as_str()
            .or(e["doc"]["id"].as_str())
            .unwrap()
            .to_owned();
        (e["event"].as_str().unwrap().to_owned(), who)
    };
    assert_eq!(next().await, ("remove".to_owned(), id.to_string()));
    assert_eq!(next().await, ("add".to_owned(), id.to_string()));

    // A new id in SQL: the old one leaves every window, the new one enters.
    let renamed = uuid::Uuid::new_v4();
    sqlx::query("UPDATE documents SET id = $2 WHERE id = $1")
        .bind(id)
        .bind(renamed)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(next().await, ("remove".to_owned(), id.to_string()));
    assert_eq!(next().await, ("add".to_owned(), renamed.to_string()));
    pool.close().await;
    ws.close().await;
    s.finish().await;
}

#[tokio::test]
async fn distinct_live_queries_are_capped_per_node() {
    let s =
        TestServer::start_with(&[("query.max_live_queries", "2"), ("ws.linger", "\"0s\"")]).await;
    let alice = s.token(ALICE, &["*"]);
    let bob = s.token(BOB, &["*"]);
    let mut a = Ws::connect(&s.base, Some(&alice)).await;
    let mut b = Ws::connect(&s.base, Some(&bob)).await;
    let read =
        |n: i64| json!({"op": "read", "type": "posts", "where": {"data.n": n}, "global": true});

    let first = a.request(read(1)).await;
    assert_eq!(first["ok"], true, "{first}");
    let second = a.request(read(2)).await;
    assert_eq!(second["ok"], true, "{second}");
    let third = b.request(read(3)).await;
    assert_eq!(third["error"]["code"], "too_many_live_queries", "{third}");
    // The same query as a running one shares it: no new live query, so no limit.
    let shared = b.request(read(1)).await;
    assert_eq!(shared["sub"], first["sub"], "{shared}");
    // The connection still works after the refusal, and a freed slot is reusable.
    let unsub = a
        .request(json!({"op": "unsub", "sub": second["sub"]}))
        .await;
    assert_eq!(unsub["ok"], true, "{unsub}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        // The slot frees once the type actor has handled the unsubscribe.
        let again = b.request(read(3)).await;
        if again["ok"] == true {
            break;
        }
        assert_eq!(again["error"]["code"], "too_many_live_queries", "{again}");
        assert!(std::time::Instant::now() < deadline, "the slot never freed");
        let pong = b.request(json!({"op": "ping"})).await;
        assert_eq!(pong["pong"], true);
    }
    a.close().await;
    b.close().await;
    s.finish().await;
}
