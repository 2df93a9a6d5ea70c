//! The connections that grouped creates and reads keep between statements (src/store/batch.rs),
//! against a real PostgreSQL: when the backend behind one is terminated, the request that finds
//! it dead is answered 503 and the next one runs on a new connection; and a server holding kept
//! connections still shuts down (closing a pool waits for every connection it lent).
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{ALICE, TestServer, until};
use reqwest::StatusCode;
use serde_json::json;

/// The backends of this test's database whose last statement is one of the grouped ones: a
/// lone read by id or a create (each runs only on a slot's kept connection).
const SLOT_BACKENDS: &str = "SELECT pid FROM pg_stat_activity \
     WHERE datname = current_database() AND pid <> pg_backend_pid() \
     AND (query LIKE 'SELECT id, owner_did, type, parent, created_at, updated_at, rev, acl, data \
          FROM documents WHERE id = $1%' OR query LIKE 'INSERT INTO documents %')";

#[tokio::test]
async fn a_kept_connection_whose_backend_dies_is_replaced() {
    let s = TestServer::start_with(&[("database.readers", "1"), ("database.create_writers", "1")])
        .await;
    let sql = s.sql().await;
    let alice = s.token(ALICE, &["*"]);
    let doc = s.post(&alice, "posts", json!({"data": {"n": 1}})).await;
    let item = s.url(&format!("/v1/docs/posts/{}", doc["id"].as_str().unwrap()));
    let get = async || {
        let r = s
            .client
            .get(&item)
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        r.status()
    };
    let create = async || {
        let r = s
            .client
            .post(s.url("/v1/docs/posts"))
            .bearer_auth(&alice)
            .json(&json!({"data": {"n": 2}}))
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<serde_json::Value>().await.unwrap())
    };
    for _ in 0..5 {
        assert_eq!(get().await, StatusCode::OK);
        assert_eq!(create().await.0, StatusCode::CREATED);
    }
    // One reader and one writer, each on the connection it kept.
    let before: Vec<i32> = sqlx::query_scalar(SLOT_BACKENDS)
        .fetch_all(&sql)
        .await
        .unwrap();
    assert_eq!(before.len(), 2, "one backend per slot: {before:?}");

    for pid in &before {
        // With a timeout it returns once the backend has exited, not when it was signalled:
        // the request below must find the connection dead.
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 10000)")
            .bind(pid)
            .fetch_one(&sql)
            .await
            .unwrap();
        assert!(killed);
    }
    // The request that finds its connection dead fails as "unavailable", not as a server error.
    assert_eq!(get().await, StatusCode::SERVICE_UNAVAILABLE);
    let (status, body) = create().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    // The next ones run on new connections.
    assert_eq!(get().await, StatusCode::OK);
    assert_eq!(create().await.0, StatusCode::CREATED);
    // (A terminated backend leaves pg_stat_activity as it exits, which may trail its last words.)
    until("the slots run on two new backends", || async {
        let after: Vec<i32> = sqlx::query_scalar(SLOT_BACKENDS)
            .fetch_all(&sql)
            .await
            .unwrap();
        after.len() == 2 && after.iter().all(|pid| !before.contains(pid))
    })
    .await;

    sql.close().await;
    tokio::time::timeout(Duration::from_secs(10), s.finish())
        .await
        .expect("the server shuts down with connections kept");
}
