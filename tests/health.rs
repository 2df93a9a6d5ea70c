//! `GET /health` answers about the database, not the request pool: 200 while every pooled
//! connection is busy, and 200 on the first check after the pooled connections were broken (as a
//! database restart leaves them); 503 only when the database does not answer. And a request
//! that finds no pooled connection within `database.acquire_timeout` is 503 `unavailable`.
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

/// `/health` is 503 with `"database": "unavailable"` while the database refuses this server's
/// connections, and 200 again once it takes them.
#[tokio::test]
async fn health_is_503_while_the_database_refuses_connections() {
    let s = TestServer::start().await;
    let (status, _) = health(&s).await;
    assert_eq!(status, 200);
    let admin = sqlx::PgPool::connect(&common::admin_url()).await.unwrap();
    let allow = |allowed: bool| {
        // Identifiers cannot be bound; the name is the test's own.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE \"{}\" WITH ALLOW_CONNECTIONS {allowed}",
            s.db_name
        )))
    };
    allow(false).execute(&admin).await.unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE datname = $1")
        .bind(&s.db_name)
        .execute(&admin)
        .await
        .unwrap();
    let (status, body) = health(&s).await;
    assert_eq!(
        (status, body["database"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    allow(true).execute(&admin).await.unwrap();
    common::until("health is back", || async { health(&s).await.0 == 200 }).await;
    admin.close().await;
    s.finish().await;
}

/// A request that waits longer than `database.acquire_timeout` for a pooled connection gets 503
/// `unavailable` (protocol.md, Errors), and the others are served once the pool frees up.
#[tokio::test]
async fn a_request_that_finds_no_connection_in_time_is_503_unavailable() {
    let s = TestServer::start_with(&[("database.acquire_timeout", "\"300ms\"")]).await;
    let alice = s.token(ALICE, &["*"]);
    let doc = s.post(&alice, "posts", json!({"data": {"n": 0}})).await;
    let id = doc["id"].as_str().unwrap().to_owned();
    let sql = s.sql().await;
    let holder = common::lock_row(&sql, &id).await;
    // Four pooled connections, one already kept by the create writer: at most three
    // replacements get one and wait on the lock; the others wait for a connection in vain.
    let replacements: Vec<_> = (1..=5)
        .map(|n| {
            let request = s
                .client
                .put(s.url(&format!("/v1/docs/posts/{id}")))
                .bearer_auth(&alice)
                .json(&json!({"data": {"n": n}}))
                .send();
            tokio::spawn(async move {
                let r = request.await.unwrap();
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.unwrap_or(Value::Null))
            })
        })
        .collect();
    common::until("two replacements gave up on the pool", || async {
        replacements.iter().filter(|r| r.is_finished()).count() >= 2
    })
    .await;
    holder.rollback().await.unwrap();
    let mut unavailable = 0;
    for replacement in replacements {
        match replacement.await.unwrap() {
            (200, _) => {}
            (status, body) => {
                assert_eq!(
                    (status, body["error"]["code"].as_str()),
                    (503, Some("unavailable")),
                    "{body}"
                );
                unavailable += 1;
            }
        }
    }
    assert!(unavailable >= 2, "{unavailable}");
    sql.close().await;
    s.finish().await;
}
