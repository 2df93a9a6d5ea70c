//! A client that stops reading never slows the others: its bounded outbound queue overflows and
//! the server closes it (4008), while a healthy subscriber of the same live query gets every
//! event.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use common::{ALICE, TestServer, Ws};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_is_cut_off_and_the_healthy_one_gets_everything() {
    let s = TestServer::start_with(&[("ws.outbound_queue", "16")]).await;
    let alice = s.token(ALICE, &["*"]);
    let query = json!({"op": "read", "type": "posts", "limit": 1000});
    let mut stalled = Ws::connect(&s.base, Some(&alice)).await;
    let sub = stalled.request(query.clone()).await["sub"].clone();
    let mut healthy = Ws::connect(&s.base, Some(&alice)).await;
    assert_eq!(healthy.request(query.clone()).await["sub"], sub);

    // The stalled client reads nothing from here on; big documents fill its socket buffers
    // quickly, then its queue.
    let mut writer = Ws::connect(&s.base, Some(&alice)).await;
    let writes = 300;
    let reader = tokio::spawn(async move {
        let mut got = 0;
        while got < writes {
            let e = healthy.event(&sub).await;
            assert_eq!(e["event"], "add", "{e}");
            got += 1;
        }
        healthy
    });
    writer.write_big_posts(writes, 32 * 1024).await;
    let healthy = reader.await.unwrap();

    // The stalled connection was closed for overflowing, after whatever fit in its buffers.
    assert_eq!(stalled.closed_with().await, Some(4008));
    let metrics = s.metrics_text().await;
    assert!(
        metrics.contains("vibe_ws_queue_overflows_total"),
        "{metrics}"
    );
    healthy.close().await;
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
