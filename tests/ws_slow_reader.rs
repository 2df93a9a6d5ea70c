//! A client that reads slowly is only slowed down itself: while its socket is full, its requests
//! are still read and run; and a reply larger than the outbound queue's byte bound closes the
//! connection. (Apart from tests/slow_client.rs: this pushes ~13 MB through loopback, which would
//! slow that test's healthy reader past its 16-frame queue.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use common::{ALICE, TestServer, Ws};
use serde_json::json;

/// A client whose socket is full still has its requests run: the server waits for the blocked
/// write beside the request, not instead of it. (Before, it wrote a whole batch before looking
/// at anything else, so a client that read slowly held up its own request — which may hold a row
/// lock and a database connection — for as long as the batch took.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_still_has_its_requests_run() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let mut stalled = Ws::connect(&s.base, Some(&alice)).await;
    let sub = stalled
        .request(json!({"op": "read", "type": "posts", "limit": 1000}))
        .await["sub"]
        .clone();

    // The stalled client reads nothing while ~13 MB of events (more than loopback's socket
    // buffers hold, less than its outbound queue) are sent to it.
    let writes = 400;
    let mut writer = Ws::connect(&s.base, Some(&alice)).await;
    writer.write_big_posts(writes, 32 * 1024).await;
    stalled
        .send(json!({"id": 99, "op": "write", "type": "posts", "doc": {"data": {"n": writes}}}))
        .await;
    let sql = s.sql().await;
    common::until("the stalled client's write committed", || {
        let sql = sql.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM documents WHERE (data->>'n')::int = $1",
            )
            .bind(writes)
            .fetch_one(&sql)
            .await
            .unwrap()
                == 1
        }
    })
    .await;

    // Nothing was lost: once it reads, every event arrives in order, and the reply.
    let mut added = Vec::new();
    let mut replied = false;
    while added.len() <= writes as usize || !replied {
        let frame = stalled.next().await;
        if frame["re"] == 99 {
            assert_eq!(frame["ok"], true, "{frame}");
            replied = true;
        } else {
            assert_eq!(
                (&frame["sub"], &frame["event"]),
                (&sub, &json!("add")),
                "{frame}"
            );
            added.push(frame["doc"]["data"]["n"].as_i64().unwrap());
        }
    }
    assert_eq!(added, (0..=writes).collect::<Vec<i64>>());
    stalled.close().await;
    writer.close().await;
    s.finish().await;
}

/// The queue is bounded in bytes as well as frames: a snapshot of a few large documents past
/// `ws.outbound_queue_bytes` closes the connection (4008) instead of being held in memory; a
/// smaller `limit` of the same query is served.
#[tokio::test]
async fn a_reply_past_the_queues_byte_limit_closes_the_connection() {
    let s = TestServer::start_with(&[
        ("http.max_body_bytes", "65536"),
        ("ws.outbound_queue_bytes", "65536"),
    ])
    .await;
    let alice = s.token(ALICE, &["*"]);
    let filler = "x".repeat(30_000);
    for _ in 0..3 {
        s.post(&alice, "posts", json!({"data": {"filler": filler}}))
            .await;
    }
    let mut small = Ws::connect(&s.base, Some(&alice)).await;
    let reply = small
        .request(json!({"op": "read", "type": "posts", "limit": 1}))
        .await;
    assert_eq!(reply["docs"].as_array().map(Vec::len), Some(1), "{reply}");
    let mut large = Ws::connect(&s.base, Some(&alice)).await;
    large
        .send(json!({"id": 1, "op": "read", "type": "posts", "limit": 3}))
        .await;
    assert_eq!(large.closed_with().await, Some(4008));
    s.finish().await;
}
