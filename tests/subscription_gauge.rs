//! `vibe_ws_subscriptions` counts what connections hold: failed subscriptions dropped to make
//! room for a new `read` leave it, and a closed connection leaves nothing behind. Its own test
//! binary: the gauge is process-wide.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use common::{ALICE, TestServer, Ws};
use serde_json::json;

#[tokio::test]
async fn failed_subscriptions_dropped_for_room_leave_the_gauge() {
    let s = TestServer::start_with(&[("ws.max_subscriptions", "1")]).await;
    let alice = s.token(ALICE, &["*"]);
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let sub = ws.request(json!({"op": "read", "type": "posts"})).await["sub"].clone();
    assert_eq!(s.metric("vibe_ws_subscriptions").await, 1.0);

    // The live query crashes until its supervisor gives up: the subscription failed.
    common::crash_until_failed(&s, json!({"type": "posts"}), ALICE, &mut ws, &sub).await;
    // A new `read` drops the failed one (the connection holds at most one failed one).
    let other = ws.request(json!({"op": "read", "type": "notes"})).await;
    assert_eq!(other["ok"], true, "{other}");
    assert_eq!(
        s.metric("vibe_ws_subscriptions").await,
        1.0,
        "only the new one"
    );
    ws.close().await;
    common::until("the closed connection's subscriptions are gone", || async {
        s.metric("vibe_ws_subscriptions").await == 0.0
    })
    .await;
    s.finish().await;
}
