//! `GET /health` answers about the database, not the request pool: 200 while every pooled
//! connection is busy, and 200 on the first check after the pooled connections were broken (as a
//! database restart leaves them); 503 only when the database does not answer.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{ALICE, TestServer};
use serde_json::{Value, json};

async fn health(s: &TestServer) -> (u16, Value) {
    let r = s.client.get(s.url("/health")).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn health_answers_for_the_database_while_the_pool_is_busy() {
    // Four pooled connections, one kept by the create writer and one by the reader: two for the
    // rest, which two replacements blocked on a row lock take.
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let doc = s.post(&alice, "posts", json!({"data": {"n": 0}})).await;
    let id = doc["id"].as_str().unwrap().to_owned();
    let sql = s.sql().await;
    let holder = common::lock_row(&sql, &id).await;
    let blocked: Vec<_> = (0..4)
        .map(|n| {
            let request = s
                .client
                .put(s.url(&format!("/v1/docs/posts/{id}")))
                .bearer_auth(&alice)
                .json(&json!({"data": {"n": n}}));
            tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
        })
        .collect();
    // Two replacements hold the pool's free connections.
    common::until_waiting_on_locks(&sql, 2).await;
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), health(&s))
        .await
        .unwrap();
    assert_eq!(
        (status, body["database"].as_str()),
        (200, Some("ok")),
        "{body}"
    );
    holder.rollback().await.unwrap();
    for request in blocked {
        assert_eq!(request.await.unwrap(), 200);
    }

    // Every pooled connection broken, as a database restart leaves them: the first check
    // already answers for the database.
    let broken: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() \
         AND application_name <> 'vibe-feed') t",
    )
    .fetch_one(&sql)
    .await
    .unwrap();
    assert!(broken >= 1, "the pool had connections to break");
    let (status, body) = health(&s).await;
    assert_eq!(
        (status, body["database"].as_str()),
        (200, Some("ok")),
        "{body}"
    );
    sql.close().await;
    s.finish().await;
}
