//! A node shutting down answers what holds a client waiting at once — a long-poll of
//! `/v1/changes` gets a 200 with its cursor, a WebSocket a 1001 close — however long
//! `http.shutdown_grace` is: neither is held until the grace period runs out and its connection
//! is cut; and an operator's second signal does not wait for in-flight requests at all. Its own
//! test binary: it reads the process-wide `vibe_changes_waiting` gauge.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{ALICE, TestServer, Ws};
use serde_json::{Value, json};

#[tokio::test]
async fn a_shutdown_answers_long_polls_and_closes_websockets_at_once() {
    let mut s = TestServer::start_with(&[("http.shutdown_grace", "\"60s\"")]).await;
    let alice = s.token(ALICE, &["*"]);
    let (status, head) = s.get_json(&alice, "/v1/changes?since=now").await;
    assert_eq!(status, 200, "{head}");
    let cursor = head["cursor"].as_str().unwrap().to_owned();

    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let reply = ws
        .request(json!({"op": "read", "type": "posts", "limit": 1}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");

    let poll = {
        let request = s
            .client
            .get(s.url(&format!("/v1/changes?since={cursor}&wait=120")))
            .bearer_auth(&alice);
        tokio::spawn(async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    common::until("the long-poll waits for a change", || async {
        s.metric("vibe_changes_waiting").await >= 1.0
    })
    .await;

    let shutdown = tokio::spawn(s.server.take().unwrap().shutdown());
    let answered = Duration::from_secs(20);
    let (status, body) = tokio::time::timeout(answered, poll)
        .await
        .expect("the long-poll is answered at once, not after the 60 s grace period")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["cursor"], cursor.as_str(), "{body}");
    assert_eq!(body["changes"], json!([]), "{body}");
    assert_eq!(
        tokio::time::timeout(answered, ws.closed_with())
            .await
            .expect("the WebSocket is closed at once"),
        Some(1001)
    );
    tokio::time::timeout(answered, shutdown)
        .await
        .expect("nothing holds the shutdown for its grace period")
        .unwrap()
        .unwrap();
    s.finish().await;
}

/// An operator's second signal (`hurry`) cuts the grace period short: a request still in flight
/// (blocked on a row lock here) no longer holds the shutdown for `http.shutdown_grace`.
#[tokio::test]
async fn a_hurried_shutdown_does_not_wait_for_in_flight_requests() {
    let mut s = TestServer::start_with(&[("http.shutdown_grace", "\"60s\"")]).await;
    let alice = s.token(ALICE, &["*"]);
    let doc = s.post(&alice, "posts", json!({"data": {"n": 0}})).await;
    let id = doc["id"].as_str().unwrap().to_owned();
    let sql = s.sql().await;
    let holder = common::lock_row(&sql, &id).await;
    let blocked = {
        let request = s
            .client
            .put(s.url(&format!("/v1/docs/posts/{id}")))
            .bearer_auth(&alice)
            .json(&json!({"data": {"n": 1}}));
        tokio::spawn(async move { request.send().await.map(|r| r.status().as_u16()) })
    };
    // The replacement waits on the row lock.
    common::until_waiting_on_locks(&sql, 1).await;
    let (hurry, hurried) = tokio::sync::oneshot::channel::<()>();
    let shutdown = tokio::spawn(s.server.take().unwrap().shutdown_unless(async {
        let _ = hurried.await;
    }));
    hurry.send(()).unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(20), shutdown)
        .await
        .expect("a hurried shutdown does not wait out the 60 s grace period")
        .unwrap();
    assert_eq!(
        stopped.unwrap(),
        vibe::server::Shutdown::CutShort,
        "it says it was cut short"
    );
    holder.rollback().await.unwrap();
    // The request either finished once the lock went or was cut off with the server.
    let _ = blocked.await.unwrap();
    sql.close().await;
    s.finish().await;
}
