//! A client that reads slowly is only slowed down itself: while its socket is full, its requests
//! are still read and run. (Its own test binary: it pushes ~13 MB through loopback, and beside the
//! tests of tests/slow_client.rs it would slow their healthy reader past its 16-frame queue.)
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
