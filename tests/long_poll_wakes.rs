//! A long-poll of `/v1/changes` that is waiting (counted by the `vibe_changes_waiting` gauge)
//! returns as soon as a write lands, long before its wait runs out. Its own test binary: the
//! gauge is process-wide.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{ALICE, TestServer};
use serde_json::{Value, json};

#[tokio::test]
async fn a_waiting_long_poll_wakes_on_a_write() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let (status, head) = s.get_json(&alice, "/v1/changes?since=now").await;
    assert_eq!(status, 200, "{head}");
    let cursor = head["cursor"].as_str().unwrap().to_owned();
    let poll = {
        let request = s
            .client
            .get(s.url(&format!("/v1/changes?since={cursor}&wait=30")))
            .bearer_auth(&alice);
        tokio::spawn(async move {
            let started = Instant::now();
            let body: Value = request.send().await.unwrap().json().await.unwrap();
            (body, started.elapsed())
        })
    };
    // Waiting, not still on its first read (which would find the write without any wake-up).
    common::until("the long-poll waits for a change", || async {
        s.metric("vibe_changes_waiting").await >= 1.0
    })
    .await;
    let late = s
        .post(&alice, "posts", json!({"data": {"late": true}}))
        .await;
    let (body, took) = poll.await.unwrap();
    let ids: Vec<&str> = body["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [late["id"].as_str().unwrap()], "{body}");
    assert!(
        took < Duration::from_secs(30),
        "woken, not timed out: {took:?}"
    );
    s.finish().await;
}
