//! A client that reconnects with its last cursor gets exactly the events it missed while they
//! are retained, and a fresh snapshot marked as such when they are not.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use common::{ALICE, BOB, TestServer, Ws};
use serde_json::{Value, json};

async fn write(ws: &mut Ws, n: i64) -> Value {
    let r = ws
        .request(json!({"op": "write", "type": "posts", "doc": {"acl": {"read": {"allow": ["*"]}}, "data": {"n": n}}}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    r["doc"].clone()
}

#[tokio::test]
async fn resume_gets_exactly_the_missed_events() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let bob = s.token(BOB, &["*"]);
    let query = json!({"op": "read", "type": "posts", "global": true});
    // Bob keeps the live query alive while Alice's client is away.
    let mut keeper = Ws::connect(&s.base, Some(&bob)).await;
    let sub = keeper.request(query.clone()).await["sub"].clone();

    let mut client = Ws::connect(&s.base, Some(&alice)).await;
    assert_eq!(client.request(query.clone()).await["sub"], sub);
    let mut writer = Ws::connect(&s.base, Some(&alice)).await;
    write(&mut writer, 1).await;
    let seen = client.event(&sub).await;
    let cursor = seen["cursor"].as_str().unwrap().to_owned();
    client.close().await;

    // Missed while away: two adds and an update.
    let d2 = write(&mut writer, 2).await;
    let d3 = write(&mut writer, 3).await;
    let r = writer
        .request(json!({"op": "write", "type": "posts", "doc": {"id": d2["id"], "acl": {"read": {"allow": ["*"]}}, "data": {"n": 22}}}))
        .await;
    assert_eq!(r["ok"], true);
    // The keeper has seen all three, so the live query has applied them.
    for _ in 0..3 {
        keeper.event(&sub).await;
    }

    let mut back = Ws::connect(&s.base, Some(&alice)).await;
    let mut resume = query.clone();
    resume["since"] = cursor.clone().into();
    let reply = back.request(resume).await;
    assert_eq!(
        (reply["ok"].as_bool(), reply["resumed"].as_bool()),
        (Some(true), Some(true)),
        "{reply}"
    );
    assert!(reply.get("docs").is_none(), "no snapshot when resuming");
    let missed: Vec<Value> = vec![
        back.event(&sub).await,
        back.event(&sub).await,
        back.event(&sub).await,
    ];
    let summary: Vec<(String, Value)> = missed
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_owned(),
                e["doc"]["id"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("add".to_owned(), d2["id"].clone()),
            ("add".to_owned(), d3["id"].clone()),
            ("change".to_owned(), d2["id"].clone())
        ]
    );
    assert!(missed.iter().all(|e| {
        e["cursor"]
            .as_str()
            .unwrap()
            .parse::<vibe::feed::Cursor>()
            .unwrap()
            > cursor.parse().unwrap()
    }));
    // And then live again, with nothing repeated.
    let d4 = write(&mut writer, 4).await;
    let next = back.event(&sub).await;
    assert_eq!(
        (next["event"].as_str(), &next["doc"]["id"]),
        (Some("add"), &d4["id"])
    );
    back.close().await;
    keeper.close().await;
    writer.close().await;
    s.finish().await;
}

#[tokio::test]
async fn a_cursor_past_retention_gets_a_reset_snapshot() {
    let s = TestServer::start_with(&[("ws.replay_buffer", "2")]).await;
    let alice = s.token(ALICE, &["*"]);
    let query = json!({"op": "read", "type": "posts"});
    let mut keeper = Ws::connect(&s.base, Some(&alice)).await;
    let first = keeper.request(query.clone()).await;
    let sub = first["sub"].clone();
    let old_cursor = first["cursor"].as_str().unwrap().to_owned();
    let mut writer = Ws::connect(&s.base, Some(&alice)).await;
    for n in 0..5 {
        write(&mut writer, n).await;
        keeper.event(&sub).await;
    }
    let mut back = Ws::connect(&s.base, Some(&alice)).await;
    let mut resume = query.clone();
    resume["since"] = old_cursor.into();
    let reply = back.request(resume).await;
    assert_eq!(reply["resumed"], false, "{reply}");
    assert_eq!(
        reply["docs"].as_array().unwrap().len(),
        5,
        "a full snapshot instead"
    );
    back.close().await;
    keeper.close().await;
    writer.close().await;
    s.finish().await;
}

/// The only subscriber leaves; its live query lingers (`ws.linger`), keeps applying changes, and
/// the client that comes back within it gets exactly what it missed. With no linger it gets a
/// fresh snapshot instead.
#[tokio::test]
async fn a_lingering_live_query_resumes_its_last_subscriber_exactly() {
    for (linger, resumed) in [("\"30s\"", true), ("\"0s\"", false)] {
        let s = TestServer::start_with(&[("ws.linger", linger)]).await;
        let alice = s.token(ALICE, &["*"]);
        let query = json!({"op": "read", "type": "posts"});
        let mut client = Ws::connect(&s.base, Some(&alice)).await;
        let sub = client.request(query.clone()).await["sub"].clone();
        let first = s.post(&alice, "posts", json!({"data": {"n": 1}})).await;
        let seen = client.event(&sub).await;
        assert_eq!(seen["doc"]["id"], first["id"]);
        let cursor = seen["cursor"].as_str().unwrap().to_owned();
        client.close().await;
        // The server notices the close on its own time; nothing signals it, so watch for it.
        let realtime = s.server.as_ref().unwrap().app().realtime.clone();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ractor::call!(realtime, vibe_actors::realtime::RealtimeMsg::Stats)
            .unwrap()
            .1
            > 0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the subscription was never released"
            );
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }

        let missed = s.post(&alice, "posts", json!({"data": {"n": 2}})).await;
        let mut back = Ws::connect(&s.base, Some(&alice)).await;
        let mut resume = query.clone();
        resume["since"] = cursor.into();
        let reply = back.request(resume).await;
        assert_eq!(reply["resumed"], resumed, "linger {linger}: {reply}");
        if resumed {
            let e = back.event(&reply["sub"]).await;
            assert_eq!(
                (e["event"].as_str(), &e["doc"]["id"]),
                (Some("add"), &missed["id"])
            );
        } else {
            assert_eq!(
                reply["docs"].as_array().unwrap().len(),
                2,
                "a fresh snapshot"
            );
        }
        back.close().await;
        s.finish().await;
    }
}

#[tokio::test]
async fn an_expired_token_ends_the_connection_and_a_fresh_one_resumes() {
    let s = TestServer::start().await;
    // Long enough for the connection and its `read` to come first on a loaded machine (biscuit
    // dates are whole seconds, so up to one of it is lost).
    let until = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    let short = s.token_until(ALICE, &["*"], until);
    let query = json!({"op": "read", "type": "posts", "global": true});
    let mut client = Ws::connect(&s.base, Some(&short)).await;
    let reply = client.request(query.clone()).await;
    let (sub, cursor) = (
        reply["sub"].clone(),
        reply["cursor"].as_str().unwrap().to_owned(),
    );
    // Subscriptions do not outlive the token: the server closes the connection when it expires.
    assert_eq!(client.closed_with().await, Some(4002));
    // Not before the expiry (tokens carry it to the second).
    assert!(std::time::SystemTime::now() + std::time::Duration::from_secs(1) >= until);

    // Written while the client was away; a fresh token resumes exactly after its cursor.
    let fresh = s.token(ALICE, &["*"]);
    let mut writer = Ws::connect(&s.base, Some(&fresh)).await;
    let doc = write(&mut writer, 7).await;
    let mut back = Ws::connect(&s.base, Some(&fresh)).await;
    let mut resume = query;
    resume["since"] = cursor.into();
    let reply = back.request(resume).await;
    assert_eq!(reply["sub"], sub, "{reply}");
    let event = back.event(&sub).await;
    assert_eq!(
        (event["event"].as_str(), &event["doc"]["id"]),
        (Some("add"), &doc["id"])
    );
    s.finish().await;
}

#[tokio::test]
async fn a_fresh_auth_of_the_same_did_extends_the_connection() {
    let s = TestServer::start().await;
    let expiry = std::time::Duration::from_secs(2);
    let short = s.token_until(ALICE, &["*"], std::time::SystemTime::now() + expiry);
    let started = tokio::time::Instant::now();
    let mut client = Ws::connect(&s.base, Some(&short)).await;
    let fresh = s.token(ALICE, &["*"]);
    let reply = client.request(json!({"op": "auth", "token": fresh})).await;
    assert_eq!(reply["did"], ALICE, "{reply}");
    // Past the first token's expiry the connection still answers. (Waiting out a deadline is
    // what this checks: nothing happens at it.)
    tokio::time::sleep_until(started + expiry + std::time::Duration::from_millis(1500)).await;
    let pong = client.request(json!({"op": "ping"})).await;
    assert_eq!(pong["pong"], true, "{pong}");
    s.finish().await;
}

/// A fresh `auth` replaces the token the connection's subscriptions live under: one the new
/// token does not let the caller read ends with an `error` event, the others go on.
#[tokio::test]
async fn a_narrower_auth_ends_the_subscriptions_it_does_not_cover() {
    let s = TestServer::start().await;
    let both = s.token(
        ALICE,
        &["read:posts", "read:notes", "write:posts", "write:notes"],
    );
    let notes_only = s.token(ALICE, &["read:notes"]);
    let mut client = Ws::connect(&s.base, Some(&both)).await;
    let posts = client.request(json!({"op": "read", "type": "posts"})).await["sub"].clone();
    let notes = client.request(json!({"op": "read", "type": "notes"})).await["sub"].clone();
    let reply = client
        .request(json!({"op": "auth", "token": notes_only}))
        .await;
    assert_eq!(reply["did"], ALICE, "{reply}");
    let ended = client.event(&posts).await;
    assert_eq!(
        (ended["event"].as_str(), ended["error"]["code"].as_str()),
        (Some("error"), Some("missing_scope")),
        "{ended}"
    );
    let unsub = client.request(json!({"op": "unsub", "sub": posts})).await;
    assert_eq!(unsub["error"]["code"], "unknown_subscription", "{unsub}");

    let writer = s.token(ALICE, &["*"]);
    s.post(&writer, "posts", json!({"data": {"n": 1}})).await;
    let note = s.post(&writer, "notes", json!({"data": {"n": 2}})).await;
    let e = client.event(&notes).await;
    assert_eq!(e["doc"]["id"], note["id"], "{e}");
    // The post's event, had it been sent, would have come before the note's.
    assert!(
        client.pending.iter().all(|f| f["sub"] != posts),
        "{:?}",
        client.pending
    );
    let realtime = s.server.as_ref().unwrap().app().realtime.clone();
    let (_, subscribers) =
        ractor::call!(realtime, vibe_actors::realtime::RealtimeMsg::Stats).unwrap();
    assert_eq!(subscribers, 1);
    client.close().await;
    s.finish().await;
}

/// A token attenuated with a time limit stops passing its checks before the token expires: the
/// subscriptions it holds end then (the connection re-checks them every
/// `ws.attenuation_recheck`), instead of streaming until the token's own expiry.
#[tokio::test]
async fn a_time_limited_attenuation_ends_its_subscriptions_when_it_lapses() {
    let s = TestServer::start_with(&[("ws.attenuation_recheck", "\"200ms\"")]).await;
    let alice = s.token(ALICE, &["*"]);
    // Long enough for the connection and its `read` to come first on a loaded machine (biscuit
    // dates are whole seconds, so up to one of it is lost).
    let until = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    let limited = {
        use biscuit_auth::{Biscuit, builder_ext::BuilderExt};
        let public = s.server.as_ref().unwrap().app().tokens.public_key();
        Biscuit::from_base64(&alice, public)
            .unwrap()
            .append(biscuit_auth::BlockBuilder::new().check_expiration_date(until))
            .unwrap()
            .to_base64()
            .unwrap()
    };
    let mut client = Ws::connect(&s.base, Some(&limited)).await;
    let sub = client.request(json!({"op": "read", "type": "posts"})).await["sub"].clone();
    assert!(sub.is_string(), "{sub}");
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), client.event(&sub))
        .await
        .expect("the subscription outlived its attenuation");
    assert_eq!(
        (ended["event"].as_str(), ended["error"]["code"].as_str()),
        (Some("error"), Some("token_restricted")),
        "{ended}"
    );
    // Biscuit dates have one-second resolution.
    assert!(std::time::SystemTime::now() + std::time::Duration::from_secs(1) >= until);
    // The connection itself lives on (its token has not expired); requests now fail the check.
    let again = client.request(json!({"op": "read", "type": "posts"})).await;
    assert_eq!(again["error"]["code"], "token_restricted", "{again}");
    s.finish().await;
}

/// Events a certificate expiry causes at a quiet feed's head are numbered after it
/// (`<head>.4294967296`): a client resuming from such a cursor is not told it is ahead of the
/// feed.
#[tokio::test]
async fn a_cursor_numbered_after_the_heads_events_resumes() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let (status, changes) = s.get_json(&alice, "/v1/changes?since=now").await;
    assert_eq!(status, 200, "{changes}");
    let head = changes["cursor"].as_str().unwrap().to_owned();
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let reply = ws
        .request(json!({"op": "read", "type": "posts", "since": format!("{head}.4294967296")}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let ahead = ws
        .request(json!({"op": "read", "type": "notes", "since": "999999-1"}))
        .await;
    assert_eq!(ahead["error"]["code"], "invalid_cursor", "{ahead}");
    ws.close().await;
    s.finish().await;
}
