//! A live query's window holds at most `query.max_window_bytes` of documents (its first one
//! regardless): a subscription whose first `limit` documents hold more gets fewer, a document
//! that grows or enters pushes others out with `remove`, and room freed brings them back.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use common::{ALICE, TestServer, Ws};
use serde_json::{Value, json};
use vibe_actors::wire::Document;

const BUDGET: usize = 6000;

/// The size the server counts for a document: its JSON encoding.
fn size(doc: &Value) -> usize {
    let doc: Document = serde_json::from_value(doc.clone()).unwrap();
    serde_json::to_string(&doc).unwrap().len()
}

/// The ids a window over `docs` (newest first) holds: a prefix within the budget, at least one.
fn fitting(docs: &[Value]) -> Vec<Value> {
    let mut bytes = 0;
    let mut ids = Vec::new();
    for doc in docs {
        bytes += size(doc);
        if !ids.is_empty() && bytes > BUDGET {
            break;
        }
        ids.push(doc["id"].clone());
    }
    ids
}

async fn write(ws: &mut Ws, doc: Value) -> Value {
    let r = ws
        .request(json!({"op": "write", "type": "posts", "doc": doc}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    r["doc"].clone()
}

#[tokio::test]
async fn a_window_holds_its_byte_budget_and_refills_when_room_frees() {
    let s = TestServer::start_with(&[("query.max_window_bytes", &BUDGET.to_string())]).await;
    let alice = s.token(ALICE, &["*"]);
    let mut writer = Ws::connect(&s.base, Some(&alice)).await;
    let mut written = Vec::new();
    for n in 0..10 {
        written.push(
            write(
                &mut writer,
                json!({"data": {"n": n, "pad": "x".repeat(1000)}}),
            )
            .await,
        );
    }
    written.reverse(); // newest first, the query's order

    let mut client = Ws::connect(&s.base, Some(&alice)).await;
    let reply = client
        .request(json!({"op": "read", "type": "posts", "limit": 10}))
        .await;
    let sub = reply["sub"].clone();
    let docs = reply["docs"].as_array().unwrap();
    let ids: Vec<Value> = docs.iter().map(|d| d["id"].clone()).collect();
    let expected = fitting(&written);
    assert!(
        expected.len() > 1 && expected.len() < 10,
        "the budget cuts the window: {}",
        expected.len()
    );
    assert_eq!(ids, expected, "the newest documents that fit");

    // A newer, larger document enters first; the oldest held ones no longer fit and leave.
    let big = write(
        &mut writer,
        json!({"data": {"n": 10, "pad": "y".repeat(2500)}}),
    )
    .await;
    let added = client.event(&sub).await;
    assert_eq!(
        (added["event"].as_str(), &added["doc"]["id"]),
        (Some("add"), &big["id"])
    );
    let mut window: Vec<Value> = std::iter::once(big.clone())
        .chain(written.iter().cloned())
        .collect();
    let after = fitting(&window);
    assert!(after.len() < ids.len(), "something was pushed out");
    // Dropped from the end: the oldest first.
    for gone in ids[after.len() - 1..].iter().rev() {
        let e = client.event(&sub).await;
        assert_eq!(
            (e["event"].as_str(), &e["id"]),
            (Some("remove"), gone),
            "{e}"
        );
    }

    // Deleting it frees the room: the window is read again and the others come back.
    let r = writer
        .request(json!({"op": "remove", "type": "posts", "docId": big["id"]}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let e = client.event(&sub).await;
    assert_eq!(
        (e["event"].as_str(), &e["id"]),
        (Some("remove"), &big["id"])
    );
    window.remove(0);
    for back in &ids[after.len() - 1..] {
        let e = client.event(&sub).await;
        assert_eq!(
            (e["event"].as_str(), &e["doc"]["id"]),
            (Some("add"), back),
            "{e}"
        );
    }

    // A fresh subscriber of the same query gets the same window.
    let mut other = Ws::connect(&s.base, Some(&alice)).await;
    let again = other
        .request(json!({"op": "read", "type": "posts", "limit": 10}))
        .await;
    let again: Vec<Value> = again["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].clone())
        .collect();
    assert_eq!(again, fitting(&window));
    s.finish().await;
}
