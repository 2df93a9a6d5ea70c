//! Bad input over the WebSocket: each gets a structured error with a stable code, and the
//! connection stays usable afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use common::{ALICE, FRAME_WAIT, TestServer, Ws};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

async fn expect_error(ws: &mut Ws, code: &str, re: Value) {
    let frame = ws.next().await;
    assert_eq!(frame["error"]["code"], code, "{frame}");
    assert_eq!(frame["re"], re, "{frame}");
    assert!(
        frame["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    // Still usable.
    assert_eq!(ws.request(json!({"op": "ping"})).await["pong"], true);
}

#[tokio::test]
async fn bad_requests_get_errors_and_the_connection_lives_on() {
    let s = TestServer::start_with(&[
        ("ws.max_frame_bytes", "2048"),
        ("query.max_limit", "50"),
        ("query.default_limit", "20"),
    ])
    .await;
    let alice = s.token(ALICE, &["*"]);
    let notes_only = s.token(ALICE, &["read:notes"]);
    let mut ws = Ws::connect(&s.base, None).await;

    // Before auth: reads are refused, ping works.
    let r = ws.request(json!({"op": "read", "type": "posts"})).await;
    assert_eq!(r["error"]["code"], "unauthenticated");
    let r = ws.request(json!({"op": "auth", "token": "garbage"})).await;
    assert_eq!(r["error"]["code"], "invalid_token");
    let r = ws.request(json!({"op": "auth", "token": notes_only})).await;
    assert_eq!(r["did"], ALICE);

    // A type without scope.
    let r = ws.request(json!({"op": "read", "type": "posts"})).await;
    assert_eq!(r["error"]["code"], "missing_scope");
    let r = ws
        .request(json!({"op": "write", "type": "notes", "doc": {"data": {}}}))
        .await;
    assert_eq!(r["error"]["code"], "missing_scope");
    let r = ws.request(json!({"op": "auth", "token": alice})).await;
    assert_eq!(r["ok"], true);

    ws.send_raw(Message::text("{not json")).await;
    expect_error(&mut ws, "bad_json", Value::Null).await;
    ws.send_raw(Message::text("[1, 2]")).await;
    expect_error(&mut ws, "invalid_request", Value::Null).await;
    ws.send(json!({"op": "ping"})).await;
    expect_error(&mut ws, "missing_id", Value::Null).await;
    ws.send(json!({"id": {"x": 1}, "op": "ping"})).await;
    expect_error(&mut ws, "invalid_request", Value::Null).await;
    ws.send(json!({"id": 7})).await;
    expect_error(&mut ws, "missing_op", json!(7)).await;
    ws.send(json!({"id": 8, "op": "teleport"})).await;
    expect_error(&mut ws, "unknown_op", json!(8)).await;
    // An op that is not a string is present, not missing: no op has that name.
    ws.send(json!({"id": 81, "op": 5})).await;
    expect_error(&mut ws, "unknown_op", json!(81)).await;
    ws.send(json!({"id": "s", "op": "read"})).await;
    expect_error(&mut ws, "invalid_request", json!("s")).await;
    ws.send(json!({"id": 9, "op": "ping", "extra": true})).await;
    expect_error(&mut ws, "invalid_request", json!(9)).await;
    ws.send(json!({"id": 10, "op": "read", "type": "Bad Type"}))
        .await;
    expect_error(&mut ws, "invalid_type", json!(10)).await;
    ws.send(json!({"id": 11, "op": "read", "type": "posts", "where": {"title": 1}}))
        .await;
    expect_error(&mut ws, "invalid_query", json!(11)).await;
    ws.send(json!({"id": 12, "op": "read", "type": "posts", "limit": 51}))
        .await;
    expect_error(&mut ws, "invalid_query", json!(12)).await;
    ws.send(json!({"id": 13, "op": "read", "type": "posts", "since": "yesterday"}))
        .await;
    expect_error(&mut ws, "invalid_cursor", json!(13)).await;
    // A cursor far past the feed's head was never issued: resuming from it would skip events.
    ws.send(json!({"id": 13, "op": "read", "type": "posts", "since": "999999999-0"}))
        .await;
    expect_error(&mut ws, "invalid_cursor", json!(13)).await;
    ws.send(json!({"id": 14, "op": "unsub", "sub": "q999"}))
        .await;
    expect_error(&mut ws, "unknown_subscription", json!(14)).await;
    ws.send(json!({"id": 15, "op": "write", "type": "posts", "doc": {"data": [1]}}))
        .await;
    expect_error(&mut ws, "invalid_request", json!(15)).await;
    ws.send(json!({"id": 16, "op": "remove", "type": "posts", "docId": uuid::Uuid::new_v4()}))
        .await;
    expect_error(&mut ws, "not_found", json!(16)).await;
    ws.send(json!({"id": 17, "op": "write", "type": "posts", "doc": {"data": {}, "acl": {"read": {"allow": ["nobody"]}}}})).await;
    expect_error(&mut ws, "invalid_request", json!(17)).await;
    ws.send_raw(Message::binary(vec![1u8, 2, 3])).await;
    expect_error(&mut ws, "binary_not_supported", Value::Null).await;
    ws.send_raw(Message::text(format!(
        r#"{{"id": 1, "op": "ping", "pad": "{}"}}"#,
        "x".repeat(3000)
    )))
    .await;
    expect_error(&mut ws, "frame_too_large", json!(1)).await;

    // After all that, the session still reads and writes.
    let r = ws.request(json!({"op": "read", "type": "posts"})).await;
    assert_eq!(r["ok"], true);
    let w = ws
        .request(json!({"op": "write", "type": "posts", "doc": {"data": {"fine": true}}}))
        .await;
    assert_eq!(w["ok"], true);
    let e = ws.event(&r["sub"]).await;
    assert_eq!(e["event"], "add");
    ws.close().await;
    s.finish().await;
}

#[tokio::test]
async fn upgrade_rejects_bad_tokens_and_protocols() {
    let s = TestServer::start().await;
    // A bad token offered with the upgrade: a plain 401 before upgrading.
    let r = s
        .client
        .get(s.url("/v1/ws"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-protocol", "vibe.v1, garbage")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .client
        .get(s.url("/v1/ws"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-protocol", "chat.v2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unsupported_protocol");
    // Not an upgrade at all.
    let r = s.client.get(s.url("/v1/ws")).send().await.unwrap();
    assert_eq!(r.status(), 426);
    s.finish().await;
}

#[tokio::test]
async fn limits_on_rate_subscriptions_and_auth_time() {
    let s = TestServer::start_with(&[
        ("ws.requests_per_second", "5"),
        ("ws.max_subscriptions", "2"),
        ("ws.auth_timeout", "\"300ms\""),
    ])
    .await;
    let alice = s.token(ALICE, &["*"]);
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let a = ws.request(json!({"op": "read", "type": "posts"})).await;
    let b = ws.request(json!({"op": "read", "type": "notes"})).await;
    assert_eq!(
        (a["ok"].as_bool(), b["ok"].as_bool()),
        (Some(true), Some(true))
    );
    let c = ws.request(json!({"op": "read", "type": "other"})).await;
    assert_eq!(c["error"]["code"], "too_many_subscriptions");
    // Burst past the rate: some requests are refused with `rate_limited`, each reply naming its
    // request, so every request is settled once.
    for i in 0..10 {
        ws.send(json!({"id": 100 + i, "op": "ping"})).await;
    }
    let mut limited = std::collections::BTreeSet::new();
    let mut answered = std::collections::BTreeSet::new();
    while answered.len() + limited.len() < 10 {
        let f = ws.next().await;
        let re = f["re"].as_u64().unwrap_or_else(|| panic!("no id in {f}"));
        if f["error"]["code"] == "rate_limited" {
            assert!(limited.insert(re), "{f}");
        } else if f["pong"] == true {
            assert!(answered.insert(re), "{f}");
        }
    }
    assert!(!limited.is_empty(), "the burst was not limited");
    let settled: Vec<u64> = answered.union(&limited).copied().collect();
    assert_eq!(settled, (100..110).collect::<Vec<u64>>());
    ws.close().await;

    // A connection that never authenticates is closed after the auth timeout.
    let mut idle = Ws::connect(&s.base, None).await;
    assert_eq!(idle.closed_with().await, Some(4001));
    s.finish().await;
}

/// Fragmented messages are reassembled, and their total size is capped like a frame's.
#[tokio::test]
async fn fragmented_messages_are_reassembled_and_capped() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let s = TestServer::start_with(&[("ws.max_frame_bytes", "16384")]).await;
    let alice = s.token(ALICE, &["*"]);
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let ping = br#"{"id": 1, "op": "ping"}"#;
    let (head, tail) = ping.split_at(10);
    ws.send_raw(Message::Frame(Frame::message(
        head.to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    ws.send_raw(Message::Frame(Frame::message(
        tail.to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await;
    assert_eq!(ws.next().await["pong"], true, "two fragments, one request");

    // Fragments past 4x the limit in total: the connection is closed (1009), not buffered on.
    let chunk = vec![b' '; 16 * 1024];
    ws.send_raw(Message::Frame(Frame::message(
        chunk.clone(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    for _ in 0..4 {
        ws.send_raw(Message::Frame(Frame::message(
            chunk.clone(),
            OpCode::Data(Data::Continue),
            false,
        )))
        .await;
    }
    assert_eq!(ws.closed_with().await, Some(1009));
    s.finish().await;
}

/// Control frames: a ping is answered with its payload, a client's close is echoed with its code,
/// and a frame that breaks RFC 6455 (unmasked, from a raw socket) closes with 1002.
#[tokio::test]
async fn pings_closes_and_protocol_errors() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    ws.send_raw(Message::Ping(b"are you there".to_vec().into()))
        .await;
    assert_eq!(ws.next_pong().await, b"are you there");
    // The connection still serves requests after control frames.
    assert_eq!(ws.request(json!({"op": "ping"})).await["pong"], true);
    ws.send_raw(Message::Close(Some(CloseFrame {
        code: CloseCode::from(4321),
        reason: "done".into(),
    })))
    .await;
    assert_eq!(
        ws.closed_with().await,
        Some(4321),
        "the close code is echoed"
    );

    // A raw client that upgrades properly, then sends an unmasked text frame.
    let addr = s.base.trim_start_matches("http://");
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(
        format!(
            "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: vibe.v1\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        raw.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    raw.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    let mut close = [0u8; 4];
    tokio::time::timeout(FRAME_WAIT, raw.read_exact(&mut close))
        .await
        .expect("a close frame within the wait")
        .unwrap();
    assert_eq!(close[0], 0x88, "a close frame");
    assert_eq!(u16::from_be_bytes([close[2], close[3]]), 1002);
    s.finish().await;
}
