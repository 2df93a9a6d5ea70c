//! The calls supervisor checks a joiner's access to the room once more after listing it: a
//! change of the room's document handled between the connection's check and the join re-checked
//! only the members listed then. Driven directly, with an access rule in memory.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use ractor::Actor;
use serde_json::{Value, json};
use vibe_actors::call::actor::{
    Calls, CallsConfig, CallsMsg, Member, RoomAccess, RoomSettings, install_crypto,
};
use vibe_actors::live_query::BoxFuture;
use vibe_actors::outbox::{QueueLimit, outbox};

/// Nobody may join any more (the room's document changed since the joiner's check).
#[derive(Debug)]
struct NoLonger;

impl RoomAccess for NoLonger {
    fn may_join(&self, _did: String, _room: String) -> BoxFuture<bool> {
        Box::pin(async { false })
    }
}

#[tokio::test]
async fn a_joiner_who_lost_access_meanwhile_is_removed() {
    install_crypto();
    let (calls, _) = Actor::spawn(None, Calls, (CallsConfig::default(), Arc::new(NoLonger)))
        .await
        .unwrap();
    let (out, mut rx) = outbox(1, QueueLimit::frames(16));
    let joined = ractor::call!(calls, |reply| CallsMsg::Join {
        room: "room-1".into(),
        settings: RoomSettings::default(),
        member: Member {
            did: "did:key:zAlice".into(),
            outbox: out,
        },
        offer: None,
        request: json!(1),
        reply,
    })
    .unwrap();
    assert!(joined.is_ok(), "{joined:?}");
    let left = tokio::time::timeout(Duration::from_secs(5), async {
        let mut batch = VecDeque::new();
        loop {
            rx.recv(&mut batch).await;
            for frame in batch.drain(..) {
                let frame: Value = serde_json::from_slice(&frame).unwrap();
                if frame["event"] == "left" {
                    return frame;
                }
            }
        }
    })
    .await
    .expect("the joiner is removed");
    assert_eq!(left["reason"], "removed", "{left}");
    // The room reports the departure after it told the member: wait for the report.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while ractor::call!(calls, CallsMsg::Stats).unwrap() != (0, 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the room stops with its last member"
        );
        tokio::task::yield_now().await;
    }
    calls.stop(None);
}
