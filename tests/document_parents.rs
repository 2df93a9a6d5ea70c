//! Documents made under another one, and the ACL `create` rule that admits them: over REST and
//! the WebSocket the parent's owner and whom its rule allows (DID entries, certificate
//! predicates; a deny wins) may create there and nobody else; a parent that is missing, or that
//! the caller (or their token) may neither read nor create under, is `parent_not_found`; the
//! parent cannot be changed through the API, nor named by a writer who is not the owner; a create
//! and a change of the parent's rule (or a revocation of the certificate that admitted the
//! create) wait for each other; queries and live queries select by `parent`, through inserts,
//! updates, moves and deletes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use common::oidc::{first_party_token, sign_up};
use common::{ALICE, BOB, CAROL, TestServer, Ws, until};
use serde_json::{Value, json};
use uuid::Uuid;

const DAVE: &str = "did:key:zDave";

/// `METHOD /v1/docs/{path}` with `body`: the status and the JSON answer (null if none).
async fn send(
    s: &TestServer,
    method: reqwest::Method,
    token: &str,
    path: &str,
    body: &Value,
) -> (u16, Value) {
    let mut request = s
        .client
        .request(method, s.url(&format!("/v1/docs/{path}")))
        .bearer_auth(token);
    if !body.is_null() {
        request = request.json(body);
    }
    let r = request.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// The ids of a query answer's documents, in order.
fn ids(answer: &Value) -> Vec<&Value> {
    answer["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["id"])
        .collect()
}

/// A `msgs` document under `parent` created by the holder of `token`.
async fn create_under(s: &TestServer, token: &str, parent: &Value, n: i64) -> (u16, Value) {
    send(
        s,
        reqwest::Method::POST,
        token,
        "msgs",
        &json!({"parent": parent, "data": {"n": n}}),
    )
    .await
}

/// A create's answer as (status, error code).
fn refusal((status, answer): (u16, Value)) -> (u16, Option<String>) {
    (status, answer["error"]["code"].as_str().map(str::to_owned))
}

fn forbidden() -> (u16, Option<String>) {
    (403, Some("forbidden".into()))
}

fn parent_not_found() -> (u16, Option<String>) {
    (404, Some("parent_not_found".into()))
}

/// The id of a room of Alice's (`alice` is her token) that Bob may read and create under.
async fn room_open_to_bob(s: &TestServer, alice: &str) -> Value {
    let room = s
        .post(
            alice,
            "rooms",
            json!({"data": {}, "acl": {"read": {"allow": [BOB]}, "create": {"allow": [BOB]}}}),
        )
        .await;
    room["id"].clone()
}

/// Waits until `n` of the server's database sessions wait for a lock.
async fn lock_waiters(s: &TestServer, n: i64) {
    let sql = s.sql().await;
    until(&format!("{n} server sessions wait for a lock"), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'vibe' \
               AND wait_event_type = 'Lock'",
        )
        .fetch_one(&sql)
        .await
        .unwrap()
            == n
    })
    .await;
}

/// Holds a create of document `id` in flight: an uncommitted insert of that id makes the create's
/// own insert wait for this transaction's outcome (after the create has checked its rule).
async fn block_insert_of(s: &TestServer, id: Uuid) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = s.sql().await.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO documents (id, owner_did, type, data) VALUES ($1, 'did:key:zX', 'x', '{}')",
    )
    .bind(id)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx
}

/// Sends `request` from a task of its own (it may wait on a lock); the task answers its status.
fn spawned(request: reqwest::RequestBuilder) -> tokio::task::JoinHandle<u16> {
    tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
}

/// How many documents name `parent`.
async fn children(s: &TestServer, parent: &Value) -> i64 {
    let parent: Uuid = parent.as_str().unwrap().parse().unwrap();
    sqlx::query_scalar("SELECT count(*) FROM documents WHERE parent = $1")
        .bind(parent)
        .fetch_one(&s.sql().await)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_create_rule_admits_children_and_deny_wins() {
    let s = TestServer::start().await;
    let [alice, bob, carol, dave] = [ALICE, BOB, CAROL, DAVE].map(|who| s.token(who, &["*"]));
    let room = s
        .post(
            &alice,
            "rooms",
            json!({"data": {}, "acl": {"read": {"allow": ["*"]},
                   "create": {"allow": [BOB, CAROL], "deny": [CAROL]}}}),
        )
        .await;
    let room_id = room["id"].clone();
    assert!(room.get("parent").is_none(), "{room}");

    // The owner, and Bob by a DID entry.
    for (who, token) in [("alice", &alice), ("bob", &bob)] {
        let (status, child) = create_under(&s, token, &room_id, 1).await;
        assert_eq!(status, 201, "{who}: {child}");
        assert_eq!(child["parent"], room_id, "{who}: {child}");
        let (status, read) = s
            .get_json(
                token,
                &format!("/v1/docs/msgs/{}", child["id"].as_str().unwrap()),
            )
            .await;
        assert_eq!((status, &read["parent"]), (200, &room_id), "{read}");
    }
    // Carol is allowed and denied: the deny wins. Dave is not listed.
    for token in [&carol, &dave] {
        let (status, answer) = create_under(&s, token, &room_id, 2).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (403, Some("forbidden")),
            "{answer}"
        );
    }
    assert_eq!(
        children(&s, &room_id).await,
        2,
        "refused creates wrote nothing"
    );

    // A parent Dave may read but not create under: 403. One he may not even read: as if it did
    // not exist, so the create route tells nobody which documents exist.
    let readable = s
        .post(
            &bob,
            "rooms",
            json!({"data": {}, "acl": {"read": {"allow": [DAVE]}}}),
        )
        .await["id"]
        .clone();
    let private = s.post(&bob, "rooms", json!({"data": {}})).await["id"].clone();
    assert_eq!(
        refusal(create_under(&s, &dave, &readable, 2).await),
        forbidden()
    );
    assert_eq!(
        refusal(create_under(&s, &dave, &private, 2).await),
        parent_not_found()
    );
    assert_eq!(
        children(&s, &readable).await + children(&s, &private).await,
        0
    );
    // The same over the WebSocket.
    let mut ws = Ws::connect(&s.base, Some(&dave)).await;
    let refused = ws
        .request(json!({"op": "write", "type": "msgs", "doc": {"parent": room_id, "data": {}}}))
        .await;
    assert_eq!(refused["error"]["code"], "forbidden", "{refused}");
    ws.close().await;
    // A token that may not read rooms learns no more than a user who may not read this one:
    // Dave's app with `write:msgs` alone is told the room he may read is not found.
    let writes_only = s.token(DAVE, &["write:msgs"]);
    assert_eq!(
        refusal(create_under(&s, &writes_only, &readable, 2).await),
        parent_not_found()
    );
    let mut ws = Ws::connect(&s.base, Some(&writes_only)).await;
    let refused = ws
        .request(json!({"op": "write", "type": "msgs", "doc": {"parent": readable, "data": {}}}))
        .await;
    assert_eq!(refused["error"]["code"], "parent_not_found", "{refused}");
    ws.close().await;

    // A parent that does not exist.
    let (status, answer) = create_under(&s, &alice, &json!(Uuid::now_v7()), 3).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (404, Some("parent_not_found")),
        "{answer}"
    );

    // The parent is set at creation: neither PUT nor PATCH takes it.
    let child = create_under(&s, &bob, &room_id, 4).await.1;
    let path = format!("msgs/{}", child["id"].as_str().unwrap());
    let other = s.post(&bob, "rooms", json!({"data": {}})).await["id"].clone();
    let (status, answer) = send(
        &s,
        reqwest::Method::PUT,
        &bob,
        &path,
        &json!({"parent": other, "data": {}}),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );
    let (status, answer) = send(
        &s,
        reqwest::Method::PATCH,
        &bob,
        &path,
        &json!({"parent": other}),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("read_only_field"))
    );
    assert_eq!(
        s.get_json(&bob, &format!("/v1/docs/{path}")).await.1["parent"],
        room_id
    );

    // The owner withdraws Bob's right and lifts Carol's deny (a merge patch): Bob's next create
    // is refused, Carol's admitted.
    let (status, _) = send(
        &s,
        reqwest::Method::PATCH,
        &alice,
        &format!("rooms/{}", room_id.as_str().unwrap()),
        &json!({"acl": {"create": {"allow": [CAROL], "deny": null}}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        refusal(create_under(&s, &bob, &room_id, 5).await),
        forbidden()
    );
    assert_eq!(create_under(&s, &carol, &room_id, 5).await.0, 201);

    // A deleted parent admits no more children; the ones made stay.
    let (status, _) = send(
        &s,
        reqwest::Method::DELETE,
        &alice,
        &format!("rooms/{}", room_id.as_str().unwrap()),
        &Value::Null,
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(
        refusal(create_under(&s, &alice, &room_id, 6).await),
        parent_not_found()
    );
    assert_eq!(s.get_json(&bob, &format!("/v1/docs/{path}")).await.0, 200);
    assert_eq!(children(&s, &room_id).await, 4);
    s.finish().await;
}

#[tokio::test]
async fn certificate_predicates_in_the_create_rule() {
    let s = TestServer::start().await;
    let alice_did = sign_up(&s, "alice").await;
    let bob_did = sign_up(&s, "bob").await;
    let alice = first_party_token(&s, "alice").await;
    let bob = first_party_token(&s, "bob").await;
    let room = s
        .post(
            &alice,
            "rooms",
            json!({"data": {}, "acl": {"read": {"allow": ["*"]},
                   "create": {"allow": [[{"issuer": alice_did, "type": "member-of"}]]}}}),
        )
        .await;
    let room_id = room["id"].clone();
    assert_eq!(
        refusal(create_under(&s, &bob, &room_id, 1).await),
        forbidden()
    );

    let (status, cert) = s
        .issue_certificate(&alice, json!({"subject": bob_did, "type": "member-of"}))
        .await;
    assert_eq!(status, 201, "{cert}");
    let (status, child) = create_under(&s, &bob, &room_id, 2).await;
    assert_eq!(status, 201, "the certificate admits Bob: {child}");
    assert_eq!(child["owner"], bob_did, "the creator owns the child");

    // A revocation waits for a create the certificate admitted and that is still in flight.
    let in_flight = Uuid::now_v7();
    let blocker = block_insert_of(&s, in_flight).await;
    let create = spawned(
        s.client
            .post(s.url("/v1/docs/msgs"))
            .bearer_auth(&bob)
            .json(&json!({"id": in_flight, "parent": room_id, "data": {}})),
    );
    lock_waiters(&s, 1).await;
    let revoke = spawned(
        s.client
            .delete(s.url(&format!(
                "/v1/certificates/{}",
                cert["id"].as_str().unwrap()
            )))
            .bearer_auth(&alice),
    );
    lock_waiters(&s, 2).await;
    blocker.rollback().await.unwrap();
    assert_eq!(create.await.unwrap(), 201, "admitted before the revocation");
    assert_eq!(revoke.await.unwrap(), 204);
    assert_eq!(
        refusal(create_under(&s, &bob, &room_id, 3).await),
        forbidden()
    );
    assert_eq!(children(&s, &room_id).await, 2);

    // A deny predicate: everyone but those Alice banned.
    let open_room = s
        .post(
            &alice,
            "rooms",
            json!({"data": {}, "acl": {"read": {"allow": ["*"]}, "create": {"allow": ["*"],
                   "deny": [[{"issuer": alice_did, "type": "banned"}]]}}}),
        )
        .await["id"]
        .clone();
    assert_eq!(create_under(&s, &bob, &open_room, 4).await.0, 201);
    let (status, _) = s
        .issue_certificate(&alice, json!({"subject": bob_did, "type": "banned"}))
        .await;
    assert_eq!(status, 201);
    assert_eq!(
        refusal(create_under(&s, &bob, &open_room, 5).await),
        forbidden()
    );
    s.finish().await;
}

/// A create under a parent whose ACL is being changed waits for that change and obeys it; a
/// change of the ACL waits for a create in flight.
#[tokio::test]
async fn a_create_and_a_change_of_the_rule_wait_for_each_other() {
    let s = TestServer::start().await;
    let [alice, bob] = [ALICE, BOB].map(|who| s.token(who, &["*"]));
    let room_id = room_open_to_bob(&s, &alice).await;
    let id: Uuid = room_id.as_str().unwrap().parse().unwrap();
    let post = |body: Value| {
        spawned(
            s.client
                .post(s.url("/v1/docs/msgs"))
                .bearer_auth(&bob)
                .json(&body),
        )
    };

    // The owner's change, not yet committed, holds the parent's row.
    let sql = s.sql().await;
    let mut change = sql.begin().await.unwrap();
    sqlx::query(
        r#"UPDATE documents SET acl = '{"read": {"allow": ["did:key:zBob"]}}' WHERE id = $1"#,
    )
    .bind(id)
    .execute(&mut *change)
    .await
    .unwrap();
    let create = post(json!({"parent": room_id, "data": {}}));
    lock_waiters(&s, 1).await;
    change.commit().await.unwrap();
    assert_eq!(create.await.unwrap(), 403, "the create read the new rule");
    assert_eq!(children(&s, &room_id).await, 0);

    // The other way round: Bob's create is in flight (its insert waits on another transaction)
    // when Alice withdraws his right again; her change waits until his create has committed.
    let (status, _) = send(
        &s,
        reqwest::Method::PATCH,
        &alice,
        &format!("rooms/{room_id}", room_id = room_id.as_str().unwrap()),
        &json!({"acl": {"create": {"allow": [BOB]}}}),
    )
    .await;
    assert_eq!(status, 200);
    let in_flight = Uuid::now_v7();
    let blocker = block_insert_of(&s, in_flight).await;
    let create = post(json!({"id": in_flight, "parent": room_id, "data": {}}));
    lock_waiters(&s, 1).await;
    let withdraw = spawned(
        s.client
            .patch(s.url(&format!("/v1/docs/rooms/{}", room_id.as_str().unwrap())))
            .bearer_auth(&alice)
            .json(&json!({"acl": {"create": null}})),
    );
    lock_waiters(&s, 2).await;
    blocker.rollback().await.unwrap();
    assert_eq!(create.await.unwrap(), 201, "admitted before the change");
    assert_eq!(withdraw.await.unwrap(), 200);
    assert_eq!(
        post(json!({"parent": room_id, "data": {}})).await.unwrap(),
        403
    );
    assert_eq!(children(&s, &room_id).await, 1);
    s.finish().await;
}

/// A create under someone else's parent that waited for the parent's lock is dated when it is
/// written, not when it began to wait: it lists newer than a create that committed meanwhile, so
/// a client paging newest-first from the head, or polling for what is newer than the head, does
/// not pass over it.
#[tokio::test]
async fn a_create_that_waited_for_its_parent_is_dated_when_written() {
    let s = TestServer::start().await;
    let [alice, bob] = [ALICE, BOB].map(|who| s.token(who, &["*"]));
    let room_id = room_open_to_bob(&s, &alice).await;
    let sql = s.sql().await;
    let mut hold = sql.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM documents WHERE id = $1 FOR UPDATE")
        .bind(room_id.as_str().unwrap().parse::<Uuid>().unwrap())
        .execute(&mut *hold)
        .await
        .unwrap();
    let waiting = spawned(
        s.client
            .post(s.url("/v1/docs/msgs"))
            .bearer_auth(&bob)
            .json(&json!({"parent": room_id, "data": {"n": 1}})),
    );
    lock_waiters(&s, 1).await;
    let (status, _) = send(
        &s,
        reqwest::Method::POST,
        &bob,
        "msgs",
        &json!({"data": {"n": 2}}),
    )
    .await;
    assert_eq!(status, 201);
    hold.commit().await.unwrap();
    assert_eq!(waiting.await.unwrap(), 201);

    let (status, listed) = send(&s, reqwest::Method::GET, &bob, "msgs", &Value::Null).await;
    assert_eq!(status, 200, "{listed}");
    let newest_first: Vec<&Value> = listed["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["data"]["n"])
        .collect();
    assert_eq!(newest_first, [&json!(1), &json!(2)], "{listed}");
    s.finish().await;
}

#[tokio::test]
async fn queries_and_live_queries_select_by_parent() {
    let s = TestServer::start().await;
    let [alice, bob] = [ALICE, BOB].map(|who| s.token(who, &["*"]));
    let open = json!({"data": {}, "acl": {"create": {"allow": ["*"]}}});
    let room = s.post(&alice, "rooms", open.clone()).await["id"].clone();
    let elsewhere = s.post(&alice, "rooms", open).await["id"].clone();

    // Alice follows what others write in her room and may read.
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let reply = ws
        .request(json!({"op": "read", "type": "msgs", "shared": true, "where": {"parent": room}}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let sub = reply["sub"].clone();

    let readable = json!({"read": {"allow": [ALICE]}});
    let mut in_room = Vec::new();
    let mut bobs = Vec::new();
    for (parent, n) in [(&room, 1), (&elsewhere, 2), (&room, 3)] {
        let (status, child) = send(
            &s,
            reqwest::Method::POST,
            &bob,
            "msgs",
            &json!({"parent": parent, "acl": readable, "data": {"n": n}}),
        )
        .await;
        assert_eq!(status, 201, "{child}");
        bobs.push(child["id"].clone());
        if parent == &room {
            in_room.push(child["id"].clone());
        }
    }
    for expected in &in_room {
        let event = ws.event(&sub).await;
        assert_eq!(
            (
                event["event"].as_str(),
                &event["doc"]["id"],
                &event["doc"]["parent"]
            ),
            (Some("add"), expected, &room),
            "{event}"
        );
    }

    // A write over the WebSocket makes a child too, and cannot move one.
    let written = ws
        .request(json!({"op": "write", "type": "msgs", "doc": {"parent": room, "data": {"n": 4}}}))
        .await;
    assert_eq!(written["doc"]["parent"], room, "{written}");
    let moved = ws
        .request(json!({"op": "write", "type": "msgs",
                        "doc": {"id": written["doc"]["id"], "parent": elsewhere, "data": {}}}))
        .await;
    assert_eq!(moved["error"]["code"], "read_only_field", "{moved}");
    let same = ws
        .request(json!({"op": "write", "type": "msgs",
                        "doc": {"id": written["doc"]["id"], "parent": room, "data": {"n": 5}}}))
        .await;
    assert_eq!(
        same["doc"]["rev"], 2,
        "repeating the parent is a write: {same}"
    );
    // A writer who is not the owner may not name the parent at all (were the right one
    // accepted, a writer who cannot read the document could find it by trying candidates).
    let shared = ws
        .request(json!({"op": "write", "type": "msgs",
                        "doc": {"parent": room, "acl": {"write": {"allow": [BOB]}}, "data": {}}}))
        .await;
    let mut bob_ws = Ws::connect(&s.base, Some(&bob)).await;
    let guessed = bob_ws
        .request(json!({"op": "write", "type": "msgs",
                        "doc": {"id": shared["doc"]["id"], "parent": room, "data": {"n": 7}}}))
        .await;
    assert_eq!(guessed["error"]["code"], "read_only_field", "{guessed}");
    let plain = bob_ws
        .request(json!({"op": "write", "type": "msgs",
                        "doc": {"id": shared["doc"]["id"], "data": {"n": 7}}}))
        .await;
    assert_eq!(plain["rev"], 2, "{plain}");
    bob_ws.close().await;

    // The same selection once, over HTTP: Bob's two in the room, not the one elsewhere.
    let (status, answer) = s.query(&alice,
        &json!({"type": "msgs", "shared": true, "where": {"parent": room}, "sort": "createdAt"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(ids(&answer), in_room.iter().collect::<Vec<_>>(), "{answer}");

    // Documents under no parent are missing there: `ne` matches them, `eq` does not.
    s.post(&alice, "msgs", json!({"data": {"n": 6}})).await;
    let (_, answer) = s
        .query(
            &alice,
            &json!({"type": "msgs", "where": {"parent": {"ne": room}}}),
        )
        .await;
    assert_eq!(answer["docs"].as_array().map(Vec::len), Some(1), "{answer}");
    assert!(answer["docs"][0].get("parent").is_none(), "{answer}");
    let top_level = answer["docs"][0]["id"].clone();
    // `exists` tells them apart: Alice's own under no parent, and what Bob made under any.
    for (exists, want) in [(false, vec![&top_level]), (true, bobs.iter().collect())] {
        let (_, answer) = s
            .query(
                &alice,
                &json!({"type": "msgs", "shared": exists, "sort": "createdAt",
                    "where": {"parent": {"exists": exists}}}),
            )
            .await;
        assert_eq!(ids(&answer), want, "exists {exists}: {answer}");
    }

    // Updates and deletes of children reach the subscription through the change log.
    let uuid = |v: &Value| -> Uuid { v.as_str().unwrap().parse().unwrap() };
    let first = in_room[0].as_str().unwrap();
    let (status, _) = send(
        &s,
        reqwest::Method::PATCH,
        &bob,
        &format!("msgs/{first}"),
        &json!({"data": {"n": 10}}),
    )
    .await;
    assert_eq!(status, 200);
    let event = ws.event(&sub).await;
    assert_eq!(
        (
            event["event"].as_str(),
            &event["doc"]["id"],
            &event["doc"]["data"]["n"],
            &event["doc"]["parent"]
        ),
        (Some("change"), &in_room[0], &json!(10), &room),
        "{event}"
    );
    // Moved under another parent in SQL (the API never does that): it leaves the room's query.
    sqlx::query("UPDATE documents SET parent = $1 WHERE id = $2")
        .bind(uuid(&elsewhere))
        .bind(uuid(&in_room[1]))
        .execute(&s.sql().await)
        .await
        .unwrap();
    let event = ws.event(&sub).await;
    assert_eq!(
        (event["event"].as_str(), &event["id"]),
        (Some("remove"), &in_room[1]),
        "{event}"
    );
    let (status, _) = send(
        &s,
        reqwest::Method::DELETE,
        &bob,
        &format!("msgs/{first}"),
        &Value::Null,
    )
    .await;
    assert_eq!(status, 204);
    let event = ws.event(&sub).await;
    assert_eq!(
        (event["event"].as_str(), &event["id"]),
        (Some("remove"), &in_room[0]),
        "{event}"
    );

    for bad in [
        json!({"type": "msgs", "where": {"parent": "not-a-uuid"}}),
        json!({"type": "msgs", "where": {"parent": {"startsWith": "01"}}}),
        json!({"type": "msgs", "sort": "parent"}),
    ] {
        let (status, answer) = s.query(&alice, &bad).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(answer["error"]["code"], "invalid_query", "{bad} → {answer}");
    }
    ws.close().await;
    s.finish().await;
}
