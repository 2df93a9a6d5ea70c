//! A client that stops reading never slows the others: its bounded outbound queue overflows and
//! the server closes it (4008), while a healthy subscriber of the same live query gets every
//! event. Its own test binary: it reads the process-wide `vibe_ws_queue_overflows_total`.
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
    // This binary's only test: the process-wide counter is this one's alone.
    assert!(s.metric("vibe_ws_queue_overflows_total").await >= 1.0);
    healthy.close().await;
    writer.close().await;
    s.finish().await;
}
