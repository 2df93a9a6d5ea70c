//! A live query that crashes is restarted by its supervisor; its subscribers get a `reset` with a
//! fresh snapshot and keep receiving events. One that keeps crashing ends its subscriptions with
//! `subscription_failed`, which then no longer count against the connection's limit.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use common::{ALICE, TestServer, Ws};
use serde_json::json;
use vibe_actors::query::{QueryLimits, QueryRequest, QuerySpec};
use vibe_actors::realtime::RealtimeMsg;

#[tokio::test]
async fn crashed_live_query_resets_its_subscribers_and_continues() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let reply = ws.request(json!({"op": "read", "type": "posts"})).await;
    let sub = reply["sub"].clone();
    let w = ws
        .request(json!({"op": "write", "type": "posts", "doc": {"data": {"n": 1}}}))
        .await;
    assert_eq!(ws.event(&sub).await["event"], "add");

    let request: QueryRequest = serde_json::from_value(json!({"type": "posts"})).unwrap();
    let spec = QuerySpec::parse(&request, ALICE, QueryLimits::default()).unwrap();
    let realtime = s.server.as_ref().unwrap().app().realtime.clone();
    realtime.cast(RealtimeMsg::CrashQuery(spec)).unwrap();

    let reset = ws.event(&sub).await;
    assert_eq!(reset["event"], "reset", "{reset}");
    let docs = reset["docs"].as_array().unwrap();
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0]["id"], w["doc"]["id"]);

    // The restarted query goes on.
    let w2 = ws
        .request(json!({"op": "write", "type": "posts", "doc": {"data": {"n": 2}}}))
        .await;
    let e = ws.event(&sub).await;
    assert_eq!(
        (e["event"].as_str(), &e["doc"]["id"]),
        (Some("add"), &w2["doc"]["id"])
    );
    let (queries, subscribers) = ractor::call!(realtime, RealtimeMsg::Stats).unwrap();
    assert_eq!((queries, subscribers), (1, 1));
    ws.close().await;
    s.finish().await;
}

/// A subscription whose live query failed for good stops counting against
/// `ws.max_subscriptions` as soon as its `error` event is sent — every `read` of it (here two):
/// the client can `read` again at once, and its `unsub` of the ended id is still answered.
#[tokio::test]
async fn a_failed_subscription_frees_its_place() {
    let s = TestServer::start_with(&[("ws.max_subscriptions", "2")]).await;
    let alice = s.token(ALICE, &["*"]);
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let reply = ws.request(json!({"op": "read", "type": "posts"})).await;
    let sub = reply["sub"].clone();
    let again = ws.request(json!({"op": "read", "type": "posts"})).await;
    assert_eq!(again["sub"], sub, "{again}");
    common::crash_until_failed(&s, json!({"type": "posts"}), ALICE, &mut ws, &sub).await;
    let other = ws.request(json!({"op": "read", "type": "notes"})).await;
    assert_eq!(other["ok"], true, "{other}");
    // A narrower token ends what it may not read — not the failed one again: its `error` was
    // its last event, and its `unsub` still answers.
    let narrower = s.token(ALICE, &["read:notes"]);
    let reply = ws.request(json!({"op": "auth", "token": narrower})).await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(
        !ws.pending.iter().any(|f| f["sub"] == sub),
        "no second event: {:?}",
        ws.pending
    );
    let unsub = ws.request(json!({"op": "unsub", "sub": sub})).await;
    assert_eq!(unsub["ok"], true, "{unsub}");
    ws.close().await;
    s.finish().await;
}
