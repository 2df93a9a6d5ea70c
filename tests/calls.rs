//! Calls end to end: real WebRTC peers (aiortc, tests/calls/peer.py; headless Chromium,
//! tests/browser/call.mjs) join rooms over the real WebSocket and exchange media over real UDP
//! on loopback through the SFU, or directly in peer-to-peer mode; and the signalling's bad
//! input, access checks, limits, departures and crash recovery over a plain WebSocket client.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{TestServer, Ws};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const SCOPES: &[&str] = &["read:call", "write:call"];

fn did(name: &str) -> String {
    format!("did:key:z{name}")
}

/// A `call` document owned by `owner` that `guests` may read (and so join).
async fn create_room(server: &TestServer, owner: &str, guests: &[&str], data: Value) -> String {
    let token = server.token(&did(owner), SCOPES);
    let allow: Vec<String> = guests.iter().map(|g| did(g)).collect();
    let doc = server
        .post(
            &token,
            "call",
            json!({"data": data, "acl": {"read": {"allow": allow}}}),
        )
        .await;
    doc["id"].as_str().unwrap().to_owned()
}

fn ws_url(server: &TestServer) -> String {
    format!("{}/v1/ws", server.base.replace("http://", "ws://"))
}

/// Starts an aiortc participant; it prints one JSON line when it has received media from
/// `expect` others, and keeps sending until its stdin closes.
fn spawn_peer(server: &TestServer, room: &str, name: &str, expect: usize, p2p: bool) -> Child {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/calls/peer.py");
    let mut command = Command::new("python3");
    command
        .arg(script)
        .args(["--ws", &ws_url(server)])
        .args(["--token", &server.token(&did(name), SCOPES)])
        .args(["--room", room, "--name", name])
        .args(["--expect-peers", &expect.to_string(), "--timeout", "60"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if p2p {
        command.arg("--p2p");
    }
    if std::env::var_os("VIBE_TEST_PEER_VERBOSE").is_some() {
        command.arg("-v");
    }
    command.spawn().expect("python3 runs tests/calls/peer.py")
}

/// The peer's result line (or a failure with its stderr).
async fn peer_result(child: &mut Child) -> Value {
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = lines.next_line().await.unwrap();
    match line.as_deref().map(serde_json::from_str::<Value>) {
        Some(Ok(result)) if result["ok"] == true => result,
        other => {
            let _ = child.start_kill();
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), err.read_to_string(&mut stderr))
                        .await;
            }
            panic!("peer failed: {other:?}\n{stderr}");
        }
    }
}

fn require_aiortc() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import aiortc, websockets"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "pip install -r tests/calls/requirements.txt first (.ci/run does)"
    );
}

/// The participants a peer decoded media from (the server's echo of the peer's own m-lines
/// carries no media and is left out).
fn senders(result: &Value) -> Vec<String> {
    let mut keys: Vec<String> = result["received"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, n)| n["video"].as_u64() > Some(0) || n["audio"].as_u64() > Some(0))
        .map(|(k, _)| k.clone())
        .collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_aiortc_peers_hold_a_call_through_the_sfu() {
    require_aiortc();
    let server = TestServer::start().await;
    let room = create_room(&server, "alice", &["bob", "carol"], json!({})).await;
    let mut peers = Vec::new();
    for name in ["alice", "bob", "carol"] {
        peers.push(spawn_peer(&server, &room, name, 2, false));
    }
    let mut results = Vec::new();
    for peer in &mut peers {
        results.push(peer_result(peer).await);
    }
    // Each decoded audio and video from the two others, told apart by participant id.
    let ids: Vec<String> = results
        .iter()
        .map(|r| r["participant"].as_str().unwrap().to_owned())
        .collect();
    for (i, result) in results.iter().enumerate() {
        let mut others: Vec<String> = ids
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, id)| id.clone())
            .collect();
        others.sort();
        assert_eq!(senders(result), others, "{result}");
        for id in &others {
            assert!(result["received"][id]["video"].as_u64().unwrap() >= 10);
            assert!(result["received"][id]["audio"].as_u64().unwrap() >= 10);
        }
    }
    drop(peers);
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_aiortc_peers_connect_directly_in_a_peer_to_peer_room() {
    require_aiortc();
    let server = TestServer::start().await;
    let room = create_room(&server, "alice", &["bob"], json!({"mode": "p2p"})).await;
    let mut alice = spawn_peer(&server, &room, "alice", 1, true);
    let mut bob = spawn_peer(&server, &room, "bob", 1, true);
    let a = peer_result(&mut alice).await;
    let b = peer_result(&mut bob).await;
    assert_eq!(
        senders(&a),
        vec![b["participant"].as_str().unwrap().to_owned()]
    );
    assert_eq!(
        senders(&b),
        vec![a["participant"].as_str().unwrap().to_owned()]
    );
    // In --p2p mode a peer opens no connection to the server: what it decoded came directly
    // from the other peer.
    drop((alice, bob));
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_aiortc_peer_moves_a_peer_to_peer_room_to_the_sfu() {
    require_aiortc();
    let server = TestServer::start().await;
    let room = create_room(&server, "alice", &["bob", "carol"], json!({"mode": "p2p"})).await;
    let mut alice = spawn_peer(&server, &room, "alice", 1, true);
    let mut bob = spawn_peer(&server, &room, "bob", 1, true);
    let a = peer_result(&mut alice).await;
    let b = peer_result(&mut bob).await;
    assert_eq!(
        senders(&a),
        vec![b["participant"].as_str().unwrap().to_owned()]
    );
    // Carol's join switches the room: all three then receive both others through the SFU.
    let mut carol = spawn_peer(&server, &room, "carol", 2, true);
    let c = peer_result(&mut carol).await;
    let mut others = vec![
        a["participant"].as_str().unwrap().to_owned(),
        b["participant"].as_str().unwrap().to_owned(),
    ];
    others.sort();
    assert_eq!(senders(&c), others, "{c}");
    drop((alice, bob, carol));
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_chromium_pages_decode_each_others_video() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    assert!(
        std::path::Path::new(dir)
            .join("node_modules/playwright-core")
            .exists()
            && std::path::Path::new("/usr/bin/chromium").exists(),
        "install Debian chromium and run `npm ci` in tests/browser first (.ci/run does)"
    );
    let server = TestServer::start().await;
    let room = create_room(&server, "alice", &["bob"], json!({})).await;
    let output = Command::new("node")
        .arg("call.mjs")
        .current_dir(dir)
        .args(["--ws", &ws_url(&server), "--room", &room])
        .args(["--token", &server.token(&did("alice"), SCOPES)])
        .args(["--token", &server.token(&did("bob"), SCOPES)])
        .args(["--timeout", "60"])
        .kill_on_drop(true)
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "browser call failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
    let pages = report["pages"].as_array().unwrap();
    assert_eq!(pages.len(), 2, "both pages report: {report}");
    for page in pages {
        let frames = page["framesDecoded"].as_array().unwrap();
        assert!(frames[1].as_u64() > frames[0].as_u64(), "{report}");
        assert!(page["audioPackets"].as_u64().unwrap() > 0, "{report}");
    }
    server.finish().await;
}

/// The next call event of `room` (other frames stay pending).
async fn call_event(ws: &mut Ws, room: &str) -> Value {
    if let Some(i) = ws.pending.iter().position(|f| f["call"] == room) {
        return ws.pending.remove(i).unwrap();
    }
    loop {
        let frame = ws.next_from_socket().await.expect("the connection closed");
        if frame["call"] == room {
            return frame;
        }
        ws.pending.push_back(frame);
    }
}

/// The next `left` event of `room`, skipping the room's other events.
async fn left_event(ws: &mut Ws, room: &str) -> Value {
    loop {
        let e = call_event(ws, room).await;
        if e["event"] == "left" {
            return e;
        }
    }
}

fn error_code(reply: &Value) -> &str {
    reply["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn signalling_refuses_bad_input_and_the_room_keeps_working() {
    let server = TestServer::start_with(&[("calls.max_rooms", "2")]).await;
    let room = create_room(&server, "alice", &["bob"], json!({"maxParticipants": 2})).await;
    let alice_token = server.token(&did("alice"), SCOPES);
    let mut alice = Ws::connect(&server.base, Some(&alice_token)).await;

    // Ops before joining, and malformed requests.
    let r = alice
        .request(json!({"op": "call.ice", "room": room, "candidate": ""}))
        .await;
    assert_eq!(error_code(&r), "not_in_call", "{r}");
    let r = alice
        .request(json!({"op": "call.join", "room": "nope"}))
        .await;
    assert_eq!(error_code(&r), "invalid_request", "{r}");
    let r = alice
        .request(json!({"op": "call.join", "room": room, "sdp": "v=0\r\nthis is not sdp"}))
        .await;
    assert_eq!(error_code(&r), "invalid_sdp", "{r}");

    // Alice joins without an offer (she will receive only).
    let r = alice
        .request(json!({"op": "call.join", "room": room}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["mode"], "sfu");
    assert_eq!(r["participants"], json!([]));
    let alice_id = r["participant"].as_str().unwrap().to_owned();
    let r = alice
        .request(json!({"op": "call.join", "room": room}))
        .await;
    assert_eq!(error_code(&r), "already_in_call", "{r}");
    for (op, code) in [
        (
            json!({"op": "call.sdp", "room": room, "type": "offer", "sdp": "garbage"}),
            "invalid_sdp",
        ),
        (
            json!({"op": "call.sdp", "room": room, "type": "answer", "sdp": "v=0"}),
            "negotiation_conflict",
        ),
        (
            json!({"op": "call.sdp", "room": room, "type": "pranswer", "sdp": "v=0"}),
            "invalid_request",
        ),
        (
            json!({"op": "call.ice", "room": room, "candidate": "candidate:garbage"}),
            "invalid_candidate",
        ),
        (
            json!({"op": "call.ice", "room": room, "candidate": "", "to": "p99"}),
            "not_peer_to_peer",
        ),
        (
            json!({"op": "call.ice", "room": room, "candidate": "", "to": "someone"}),
            "unknown_participant",
        ),
        (
            json!({"op": "call.mute", "room": room, "kind": "smell", "muted": true}),
            "invalid_request",
        ),
    ] {
        let r = alice.request(op.clone()).await;
        assert_eq!(error_code(&r), code, "{op} → {r}");
    }
    let r = alice
        .request(json!({"op": "call.quality", "room": room, "layer": "l"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");

    // Access: a stranger may not join; an unknown room is not found.
    let eve_token = server.token(&did("eve"), SCOPES);
    let mut eve = Ws::connect(&server.base, Some(&eve_token)).await;
    let r = eve.request(json!({"op": "call.join", "room": room})).await;
    assert_eq!(error_code(&r), "forbidden", "{r}");
    let unknown = uuid::Uuid::now_v7().to_string();
    let r = eve
        .request(json!({"op": "call.join", "room": unknown}))
        .await;
    assert_eq!(error_code(&r), "not_found", "{r}");
    let no_scope = server.token(&did("bob"), &["read:posts"]);
    let mut bob_unscoped = Ws::connect(&server.base, Some(&no_scope)).await;
    let r = bob_unscoped
        .request(json!({"op": "call.join", "room": room}))
        .await;
    assert_eq!(error_code(&r), "missing_scope", "{r}");

    // Bob joins; Alice hears of it; the room is then full.
    let bob_token = server.token(&did("bob"), SCOPES);
    let mut bob = Ws::connect(&server.base, Some(&bob_token)).await;
    let r = bob.request(json!({"op": "call.join", "room": room})).await;
    assert_eq!(r["ok"], true, "{r}");
    let bob_id = r["participant"].as_str().unwrap().to_owned();
    assert_eq!(r["participants"][0]["participant"], alice_id.as_str());
    assert_eq!(r["participants"][0]["did"], did("alice"));
    let e = call_event(&mut alice, &room).await;
    assert_eq!(
        e,
        json!({"call": room, "event": "joined", "participant": bob_id, "did": did("bob")})
    );
    let mut bob2 = Ws::connect(&server.base, Some(&bob_token)).await;
    let r = bob2.request(json!({"op": "call.join", "room": room})).await;
    assert_eq!(error_code(&r), "room_full", "{r}");

    // Mute reaches the others.
    let r = bob
        .request(json!({"op": "call.mute", "room": room, "kind": "video", "muted": true}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let e = call_event(&mut alice, &room).await;
    assert_eq!(e["event"], "mute");
    assert_eq!(e["participant"], bob_id.as_str());
    assert_eq!(e["muted"], true);

    // The node's room limit: two rooms run, a third is refused.
    let other = create_room(&server, "eve", &[], json!({})).await;
    let r = eve.request(json!({"op": "call.join", "room": other})).await;
    assert_eq!(r["ok"], true, "{r}");
    let third = create_room(&server, "eve", &[], json!({})).await;
    let r = eve.request(json!({"op": "call.join", "room": third})).await;
    assert_eq!(error_code(&r), "too_many_rooms", "{r}");
    let r = eve
        .request(json!({"op": "call.leave", "room": other}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let stats = ractor::call!(server.server.as_ref().unwrap().app().calls, |reply| {
        vibe_actors::call::actor::CallsMsg::Stats(reply)
    })
    .unwrap();
    assert_eq!(stats, (1, 2), "the emptied room stopped");
    let r = eve.request(json!({"op": "call.join", "room": third})).await;
    assert_eq!(r["ok"], true, "a room freed its place: {r}");

    // Bob's connection closes: Alice is told, and the connections still work.
    bob.close().await;
    let e = call_event(&mut alice, &room).await;
    assert_eq!(
        e,
        json!({"call": room, "event": "left", "participant": bob_id, "reason": "disconnected"})
    );
    let r = alice.request(json!({"op": "ping"})).await;
    assert_eq!(r["pong"], true);
    server.finish().await;
}

/// The wire codes of room bounds and modes: an offer to a peer-to-peer room is `peer_to_peer`
/// whatever its text; a room document's `maxParticipants` is capped by `calls.max_participants`;
/// remote candidates past `calls.max_candidates` are `too_many_candidates`.
#[tokio::test]
async fn room_bounds_and_modes_have_their_wire_codes() {
    let server = TestServer::start_with(&[
        ("calls.max_participants", "2"),
        ("calls.max_candidates", "2"),
    ])
    .await;
    let p2p = create_room(&server, "alice", &[], json!({"mode": "p2p"})).await;
    let alice_token = server.token(&did("alice"), SCOPES);
    let mut alice = Ws::connect(&server.base, Some(&alice_token)).await;
    for sdp in ["v=0\r\n", "not sdp at all"] {
        let r = alice
            .request(json!({"op": "call.join", "room": p2p, "sdp": sdp}))
            .await;
        assert_eq!(error_code(&r), "peer_to_peer", "{sdp:?} → {r}");
    }

    let room = create_room(
        &server,
        "alice",
        &["bob", "carol"],
        json!({"maxParticipants": 100}),
    )
    .await;
    let mut joined = Vec::new();
    for name in ["alice", "bob"] {
        let token = server.token(&did(name), SCOPES);
        let mut ws = Ws::connect(&server.base, Some(&token)).await;
        let r = ws.request(json!({"op": "call.join", "room": room})).await;
        assert_eq!(r["ok"], true, "{name}: {r}");
        joined.push(ws);
    }
    let carol_token = server.token(&did("carol"), SCOPES);
    let mut carol = Ws::connect(&server.base, Some(&carol_token)).await;
    let r = carol
        .request(json!({"op": "call.join", "room": room}))
        .await;
    assert_eq!(error_code(&r), "room_full", "capped at 2, not 100: {r}");

    let member = &mut joined[0];
    for n in 1..=3 {
        let candidate = format!("candidate:{n} 1 udp 2122260223 192.0.2.{n} 5000 typ host");
        let r = member
            .request(json!({"op": "call.ice", "room": room, "candidate": candidate}))
            .await;
        if n <= 2 {
            assert_eq!(r["ok"], true, "candidate {n}: {r}");
        } else {
            assert_eq!(error_code(&r), "too_many_candidates", "candidate {n}: {r}");
        }
    }
    server.finish().await;
}

/// A UDP port free for this node's rooms alone: below the ephemeral range, which rooms bound to
/// "any free port" (the other tests') are given from.
fn port_of_our_own() -> u16 {
    let start = 20_000 + (std::process::id() % 5_000) as u16 * 2;
    (start..32_000)
        .find(|port| std::net::UdpSocket::bind(("127.0.0.1", *port)).is_ok())
        .expect("a free UDP port below the ephemeral range")
}

/// A crashed room's members are told to rejoin, and the next join starts a fresh room — on the
/// crashed one's port: with a one-port range, a socket the crash left open would refuse it.
#[tokio::test]
async fn a_crashed_room_tells_its_members_to_rejoin_and_starts_afresh() {
    let port = port_of_our_own().to_string();
    let server =
        TestServer::start_with(&[("calls.port_min", &port), ("calls.port_max", &port)]).await;
    let room = create_room(&server, "alice", &[], json!({})).await;
    let token = server.token(&did("alice"), SCOPES);
    let mut alice = Ws::connect(&server.base, Some(&token)).await;
    let r = alice
        .request(json!({"op": "call.join", "room": room}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let calls = server.server.as_ref().unwrap().app().calls.clone();
    calls
        .cast(vibe_actors::call::actor::CallsMsg::CrashRoom(room.clone()))
        .unwrap();
    let e = call_event(&mut alice, &room).await;
    assert_eq!(
        e,
        json!({"call": room, "event": "ended", "reason": "restart", "rejoin": true})
    );
    // The old membership is gone; joining again starts a fresh room.
    let r = alice
        .request(json!({"op": "call.mute", "room": room, "kind": "audio", "muted": true}))
        .await;
    assert_eq!(error_code(&r), "not_in_call", "{r}");
    // The crashed room's tasks end as its state drops, which the `ended` event need not follow.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let r = loop {
        let r = alice
            .request(json!({"op": "call.join", "room": room}))
            .await;
        if r["ok"] == true || std::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(r["ok"], true, "the crashed room's port is free again: {r}");
    assert_eq!(r["participant"], "p1", "a fresh room numbers from 1");
    server.finish().await;
}

#[tokio::test]
async fn members_who_lose_access_to_the_room_document_are_removed() {
    let server = TestServer::start().await;
    let room = create_room(&server, "alice", &["bob", "carol"], json!({})).await;
    let mut alice = Ws::connect(&server.base, Some(&server.token(&did("alice"), SCOPES))).await;
    let mut bob = Ws::connect(&server.base, Some(&server.token(&did("bob"), SCOPES))).await;
    let mut carol = Ws::connect(&server.base, Some(&server.token(&did("carol"), SCOPES))).await;
    let mut ids = Vec::new();
    for ws in [&mut alice, &mut bob, &mut carol] {
        let r = ws.request(json!({"op": "call.join", "room": room})).await;
        assert_eq!(r["ok"], true, "{r}");
        ids.push(r["participant"].as_str().unwrap().to_owned());
    }
    // Alice narrows the room's ACL to Carol: Bob is removed and told, and so are the others.
    let r = alice
        .request(json!({"op": "write", "type": "call",
                        "doc": {"id": room, "data": {}, "acl": {"read": {"allow": [did("carol")]}}}}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let removed =
        json!({"call": room, "event": "left", "participant": ids[1], "reason": "removed"});
    for ws in [&mut bob, &mut alice, &mut carol] {
        assert_eq!(left_event(ws, &room).await, removed);
    }
    let r = bob
        .request(json!({"op": "call.mute", "room": room, "kind": "audio", "muted": true}))
        .await;
    assert_eq!(error_code(&r), "not_in_call", "{r}");
    // Deleting the room's document removes everyone.
    let r = alice
        .request(json!({"op": "remove", "type": "call", "docId": room}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let e = call_event(&mut carol, &room).await;
    assert_eq!(e["event"], "left");
    assert_eq!(e["reason"], "removed");
    server.finish().await;
}

#[tokio::test]
async fn a_connection_is_in_a_bounded_number_of_calls_and_leaves_those_its_token_stops_allowing() {
    let server = TestServer::start_with(&[("ws.max_calls", "2")]).await;
    let mut rooms = Vec::new();
    for _ in 0..3 {
        rooms.push(create_room(&server, "alice", &[], json!({})).await);
    }
    let mut alice = Ws::connect(&server.base, Some(&server.token(&did("alice"), SCOPES))).await;
    let mut ids = Vec::new();
    for room in &rooms[..2] {
        let r = alice
            .request(json!({"op": "call.join", "room": room}))
            .await;
        assert_eq!(r["ok"], true, "{r}");
        ids.push(r["participant"].as_str().unwrap().to_owned());
    }
    let r = alice
        .request(json!({"op": "call.join", "room": rooms[2]}))
        .await;
    assert_eq!(error_code(&r), "too_many_calls", "{r}");
    // Joining a room it is in is not one more (the room answers as before).
    let r = alice
        .request(json!({"op": "call.join", "room": rooms[1]}))
        .await;
    assert_eq!(error_code(&r), "already_in_call", "{r}");
    let r = alice
        .request(json!({"op": "call.leave", "room": rooms[0]}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let r = alice
        .request(json!({"op": "call.join", "room": rooms[2]}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    ids[0] = r["participant"].as_str().unwrap().to_owned();

    // A call that ended for her without her leaving (its document deleted) counts no more.
    let owner = server.token(&did("alice"), SCOPES);
    let deleted = server
        .client
        .delete(server.url(&format!("/v1/docs/call/{}", rooms[1])))
        .bearer_auth(&owner)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(left_event(&mut alice, &rooms[1]).await["reason"], "removed");
    let r = alice
        .request(json!({"op": "call.join", "room": rooms[0]}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    ids[1] = r["participant"].as_str().unwrap().to_owned();

    // A token for the same DID without `read:call`: she leaves both calls, and is told.
    let narrower = server.token(&did("alice"), &["read:posts"]);
    let r = alice
        .request(json!({"op": "auth", "token": narrower}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    for (room, id) in [(&rooms[0], &ids[1]), (&rooms[2], &ids[0])] {
        assert_eq!(
            left_event(&mut alice, room).await,
            json!({"call": room, "event": "left", "participant": id, "reason": "removed"})
        );
        let r = alice
            .request(json!({"op": "call.mute", "room": room, "kind": "audio", "muted": true}))
            .await;
        assert_eq!(error_code(&r), "not_in_call", "{r}");
    }
    server.finish().await;
}
