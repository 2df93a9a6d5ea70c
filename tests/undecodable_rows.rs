//! A document written straight in SQL that JSON here cannot hold (`jsonb` keeps a number past a
//! double): reading it fails on its own, never the reads grouped with it into one statement.
//! Its own binary: it watches the process-wide gauge of reads waiting for the statement slot.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use common::{ALICE, TestServer, until};
use serde_json::json;
use uuid::Uuid;

#[tokio::test]
async fn an_undecodable_row_fails_only_its_own_reads_in_a_shared_statement() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let good = s.post(&alice, "posts", json!({"data": {"n": 1}})).await;
    let good = good["id"].as_str().unwrap().to_owned();
    let odd = Uuid::now_v7();
    let sql = s.sql().await;
    sqlx::query(
        "INSERT INTO documents (id, owner_did, type, data) VALUES ($1, $2, 'posts', '{\"n\": 1e400}')",
    )
    .bind(odd)
    .bind(ALICE)
    .execute(&sql)
    .await
    .unwrap();
    let get = |id: String| {
        let request = s
            .client
            .get(s.url(&format!("/v1/docs/posts/{id}")))
            .bearer_auth(&alice);
        tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
    };

    // Hold the one read slot in a statement that waits on a table lock, so the next reads queue
    // and then run together in one statement.
    let mut lock = sql.begin().await.unwrap();
    sqlx::query("LOCK TABLE documents IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let first = get(good.clone());
    // (The feed's reader may wait on the lock too: the read is told by its statement.)
    until("the first read waits on the lock", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' \
               AND strpos(query, 'FROM documents WHERE id = $1') > 0",
        )
        .fetch_one(&sql)
        .await
        .unwrap()
            == 1
    })
    .await;
    let queued = [get(odd.to_string()), get(good.clone()), get(good.clone())];
    until("three reads wait for the slot", || async {
        s.metric("vibe_store_reads_waiting").await == 3.0
    })
    .await;
    lock.commit().await.unwrap();

    assert_eq!(first.await.unwrap(), 200);
    let [odd_read, good_read, again] = queued;
    assert_eq!(odd_read.await.unwrap(), 500, "the row it cannot read");
    assert_eq!(
        good_read.await.unwrap(),
        200,
        "a read that shared its statement"
    );
    assert_eq!(again.await.unwrap(), 200);
    sql.close().await;
    s.finish().await;
}
