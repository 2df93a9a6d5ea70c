//! Group commit of creates (`database.create_writers`, `create_batch_rows`), over real HTTP
//! against a real PostgreSQL: creates that queue while the writer is busy share one statement
//! and one transaction, and each still gets the answer a lone create would have had.
//!
//! One test in its own binary: it reads the process-wide `vibe_store_creates_waiting` gauge,
//! which other tests' servers would move.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use common::{ALICE, TestServer, until};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::{PgPool, Postgres, Transaction};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

/// POSTs a `posts` document from a task of its own: the body sent, the status, the answer.
fn spawn_create(
    s: &TestServer,
    token: &str,
    body: Value,
) -> tokio::task::JoinHandle<(Value, StatusCode, Value)> {
    let (client, url, token) = (s.client.clone(), s.url("/v1/docs/posts"), token.to_owned());
    tokio::spawn(async move {
        let r = client
            .post(url)
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        (body, r.status(), r.json::<Value>().await.unwrap())
    })
}

async fn creates_waiting(s: &TestServer) -> f64 {
    s.metric("vibe_store_creates_waiting").await
}

/// Holds the server's only write slot: an uncommitted row with id `id` makes the create of the same
/// id wait on its unique-index entry. Returns once that create is waiting on the lock.
async fn hold_writer(
    s: &TestServer,
    sql: &PgPool,
    token: &str,
    id: Uuid,
) -> (
    Transaction<'static, Postgres>,
    tokio::task::JoinHandle<(Value, StatusCode, Value)>,
) {
    let mut blocker = sql.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO documents (id, owner_did, type, acl, data) VALUES ($1, $2, 'posts', '{}', '{}')",
    )
    .bind(id)
    .bind(ALICE)
    .execute(&mut *blocker)
    .await
    .unwrap();
    let held = spawn_create(s, token, json!({"id": id, "data": {"held": true}}));
    until("the held create waits on the uncommitted row", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'vibe' \
               AND wait_event_type = 'Lock'",
        )
        .fetch_one(sql)
        .await
        .unwrap()
            == 1
    })
    .await;
    (blocker, held)
}

#[tokio::test]
async fn queued_creates_share_a_statement_and_keep_their_own_answers() {
    let s = TestServer::start_with(&[("database.create_writers", "1")]).await;
    let sql = s.sql().await;
    let alice = s.token(ALICE, &["*"]);
    let taken = Uuid::new_v4();
    let first = spawn_create(&s, &alice, json!({"id": taken, "data": {}}));
    assert_eq!(first.await.unwrap().1, 201);

    // Phase 1: eight creates queue behind the held write slot, then go in together.
    let (blocker, held) = hold_writer(&s, &sql, &alice, Uuid::new_v4()).await;
    let twice = Uuid::new_v4();
    let mut bodies: Vec<Value> = (0..5).map(|n| json!({"data": {"n": n}})).collect();
    bodies.push(json!({"id": twice, "data": {"twice": 1}}));
    bodies.push(json!({"id": twice, "data": {"twice": 2}}));
    bodies.push(json!({"id": taken, "data": {"again": true}}));
    // Under a parent of the same owner: no rule to check, so it queues like the others (it comes
    // last, after reading the parent; every statement that leaves the queue here holds two or
    // more creates, as the duplicates cut it in two).
    bodies.push(json!({"parent": taken, "data": {"child": true}}));
    let queued = bodies.len();
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|body| spawn_create(&s, &alice, body))
        .collect();
    until("every create is queued", || async {
        creates_waiting(&s).await == queued as f64
    })
    .await;
    blocker.rollback().await.unwrap();
    let (_, status, held_doc) = held.await.unwrap();
    assert_eq!(status, 201, "{held_doc}");

    let mut created = Vec::new();
    let mut twice_statuses = Vec::new();
    for task in tasks {
        let (body, status, answer) = task.await.unwrap();
        if body["id"] == json!(taken) {
            assert_eq!(status, 409, "{answer}");
            assert_eq!(answer["error"]["code"], "already_exists");
        } else if body["id"] == json!(twice) {
            twice_statuses.push(status);
            if status == 201 {
                assert_eq!(answer["data"], body["data"]);
                created.push(answer);
            } else {
                assert_eq!(status, 409, "{answer}");
            }
        } else {
            assert_eq!(status, 201, "{answer}");
            assert_eq!(
                answer["data"], body["data"],
                "each create gets its own document"
            );
            assert_eq!(answer["owner"], ALICE);
            assert_eq!(answer["rev"], 1);
            if body.get("parent").is_some() {
                assert_eq!(answer["parent"], json!(taken), "{answer}");
                let stored: Option<Uuid> =
                    sqlx::query_scalar("SELECT parent FROM documents WHERE id = $1")
                        .bind(answer["id"].as_str().unwrap().parse::<Uuid>().unwrap())
                        .fetch_one(&sql)
                        .await
                        .unwrap();
                assert_eq!(stored, Some(taken), "the grouped insert stored the parent");
                continue;
            }
            assert!(answer.get("parent").is_none(), "{answer}");
            created.push(answer);
        }
    }
    twice_statuses.sort();
    assert_eq!(twice_statuses, [StatusCode::CREATED, StatusCode::CONFLICT]);
    assert_eq!(created.len(), 6);

    // The six created documents were written by one transaction (one statement), the held
    // create by another; nothing else was logged. (An insert is logged in its own row.)
    let logged: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT id, log_xid FROM documents WHERE log_xid IS NOT NULL")
            .fetch_all(&sql)
            .await
            .unwrap();
    let log_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM changes")
        .fetch_one(&sql)
        .await
        .unwrap();
    assert_eq!(log_rows, 0, "inserts add no rows to the change log");
    let xid_of: HashMap<Uuid, i64> = logged.iter().copied().collect();
    let batch_xids: HashSet<i64> = created
        .iter()
        .map(|d| xid_of[&d["id"].as_str().unwrap().parse::<Uuid>().unwrap()])
        .collect();
    assert_eq!(
        batch_xids.len(),
        1,
        "the queued creates shared a transaction"
    );
    let held_id: Uuid = held_doc["id"].as_str().unwrap().parse().unwrap();
    assert!(!batch_xids.contains(&xid_of[&held_id]));
    assert_eq!(
        logged.len(),
        1 + 1 + 6 + 1,
        "the first create, the held one, the batch, the child"
    );
    let twice_data: Value = sqlx::query_scalar("SELECT data FROM documents WHERE id = $1")
        .bind(twice)
        .fetch_one(&sql)
        .await
        .unwrap();
    assert!(created.iter().any(|d| d["data"] == twice_data));

    // Phase 2: one queued create that PostgreSQL refuses (jsonb cannot hold \u0000) fails
    // alone; its neighbours are written.
    let (blocker, held) = hold_writer(&s, &sql, &alice, Uuid::new_v4()).await;
    let bad = Uuid::new_v4();
    let mut bodies: Vec<Value> = (0..3)
        .map(|n| json!({"id": Uuid::new_v4(), "data": {"m": n}}))
        .collect();
    bodies.push(json!({"id": bad, "data": {"text": "nul \u{0} inside"}}));
    let tasks: Vec<_> = bodies
        .iter()
        .cloned()
        .map(|body| spawn_create(&s, &alice, body))
        .collect();
    until("every create is queued", || async {
        creates_waiting(&s).await == bodies.len() as f64
    })
    .await;
    blocker.rollback().await.unwrap();
    assert_eq!(held.await.unwrap().1, 201);
    for task in tasks {
        let (body, status, answer) = task.await.unwrap();
        if body["id"] == json!(bad) {
            assert_eq!(status, 400, "{answer}");
            assert_eq!(answer["error"]["code"], "invalid_body");
        } else {
            assert_eq!(status, 201, "{answer}");
        }
    }
    let stored: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM documents WHERE id = ANY($1)")
        .bind(
            bodies
                .iter()
                .map(|b| b["id"].as_str().unwrap().parse::<Uuid>().unwrap())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&sql)
        .await
        .unwrap();
    assert_eq!(stored.len(), 3);
    assert!(!stored.contains(&bad));
    assert_eq!(creates_waiting(&s).await, 0.0);

    sql.close().await;
    s.finish().await;
}
