//! Two nodes on one database: a write through one node reaches a subscriber on the other
//! through the doorbell NOTIFY alone (the second node's poll is set to an hour), in order.
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
