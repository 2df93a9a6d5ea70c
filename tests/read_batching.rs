//! Grouped reads by id (`database.readers`, `read_batch_rows`), over real HTTP against a real
//! PostgreSQL: GETs that queue while the reader is busy share one statement, each still gets the
//! answer a lone GET would have had (its own document, 404 for a missing id or another type, 403
//! where the ACL refuses), and a grouped read sees what committed while it waited.
//!
//! One test in its own binary: it reads the process-wide `vibe_store_reads_waiting` gauge and
//! the `vibe_store_read_batch_rows` histogram, which other tests' servers would move.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use common::{ALICE, BOB, TestServer, until};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

/// GETs `/v1/docs/{doc_type}/{id}` from a task of its own: the status and the answer.
fn spawn_get(
    s: &TestServer,
    token: &str,
    doc_type: &str,
    id: Uuid,
) -> tokio::task::JoinHandle<(StatusCode, Value)> {
    let (client, token) = (s.client.clone(), token.to_owned());
    let url = s.url(&format!("/v1/docs/{doc_type}/{id}"));
    tokio::spawn(async move {
        let r = client.get(url).bearer_auth(token).send().await.unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    })
}

fn id_of(doc: &Value) -> Uuid {
    doc["id"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn queued_reads_share_a_statement_and_keep_their_own_answers() {
    let s = TestServer::start_with(&[("database.readers", "1")]).await;
    let sql = s.sql().await;
    let alice = s.token(ALICE, &["*"]);
    let bob = s.token(BOB, &["*"]);
    let first = s.post(&alice, "posts", json!({"data": {"n": 1}})).await;
    let second = s.post(&alice, "posts", json!({"data": {"n": 2}})).await;
    let note = s
        .post(&alice, "notes", json!({"data": {"note": true}}))
        .await;
    let private = s
        .post(&bob, "posts", json!({"data": {"bob": "private"}}))
        .await;
    let public = s
        .post(
            &bob,
            "posts",
            json!({"data": {"bob": "public"}, "acl": {"read": {"allow": ["*"]}}}),
        )
        .await;
    let fresh = Uuid::new_v4();

    // Hold the server's only reader: a GET waits behind an exclusive lock on the table.
    let mut blocker = sql.begin().await.unwrap();
    sqlx::query("LOCK TABLE documents IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let held = spawn_get(&s, &alice, "posts", id_of(&first));
    until("the held read waits on the table lock", || async {
        sqlx::query_scalar::<_, i64>(
            // The feed's ticks read the table too (for inserts marked in their rows) and wait
            // behind the same lock: only the read counts here.
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'vibe' \
               AND wait_event_type = 'Lock' AND query NOT LIKE '%vibe\\_tick%'",
        )
        .fetch_one(&sql)
        .await
        .unwrap()
            == 1
    })
    .await;

    // Reads that queue behind it: (what is read, the status and data a lone GET gives).
    let cases: Vec<(&str, Uuid, StatusCode, Option<Value>)> = vec![
        (
            "posts",
            id_of(&first),
            StatusCode::OK,
            Some(first["data"].clone()),
        ),
        (
            "posts",
            id_of(&first),
            StatusCode::OK,
            Some(first["data"].clone()),
        ),
        (
            "posts",
            id_of(&second),
            StatusCode::OK,
            Some(second["data"].clone()),
        ),
        (
            "notes",
            id_of(&note),
            StatusCode::OK,
            Some(note["data"].clone()),
        ),
        ("posts", id_of(&note), StatusCode::NOT_FOUND, None),
        ("posts", id_of(&private), StatusCode::FORBIDDEN, None),
        (
            "posts",
            id_of(&public),
            StatusCode::OK,
            Some(public["data"].clone()),
        ),
        ("posts", Uuid::new_v4(), StatusCode::NOT_FOUND, None),
        ("posts", fresh, StatusCode::OK, Some(json!({"fresh": true}))),
    ];
    let tasks: Vec<_> = cases
        .iter()
        .map(|(doc_type, id, ..)| spawn_get(&s, &alice, doc_type, *id))
        .collect();
    until("every read is queued", || async {
        s.metric("vibe_store_reads_waiting").await == cases.len() as f64
    })
    .await;

    // A document committed while the reads wait is seen by them: their statement starts after.
    sqlx::query(
        "INSERT INTO documents (id, owner_did, type, acl, data) \
         VALUES ($1, $2, 'posts', '{}', '{\"fresh\": true}')",
    )
    .bind(fresh)
    .bind(ALICE)
    .execute(&mut *blocker)
    .await
    .unwrap();
    blocker.commit().await.unwrap();

    let (status, held_doc) = held.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{held_doc}");
    assert_eq!(held_doc["data"], first["data"]);
    for ((doc_type, id, want_status, want_data), task) in cases.iter().zip(tasks) {
        let (status, answer) = task.await.unwrap();
        assert_eq!(status, *want_status, "{doc_type}/{id}: {answer}");
        match want_data {
            Some(data) => {
                assert_eq!(&answer["data"], data, "{doc_type}/{id}");
                assert_eq!(id_of(&answer), *id);
                assert_eq!(answer["type"], *doc_type);
            }
            None => {
                let code = if *want_status == StatusCode::FORBIDDEN {
                    "forbidden"
                } else {
                    "not_found"
                };
                assert_eq!(answer["error"]["code"], code, "{doc_type}/{id}");
            }
        }
    }

    // The held read was one statement, the queued ones together another.
    assert_eq!(s.metric("vibe_store_read_batch_rows_count").await, 2.0);
    assert_eq!(
        s.metric("vibe_store_read_batch_rows_sum").await,
        1.0 + cases.len() as f64
    );
    assert_eq!(s.metric("vibe_store_reads_waiting").await, 0.0);

    sql.close().await;
    s.finish().await;
}
