//! No loss, no duplicate, no reorder, end to end: 8 writers with random delays inside their
//! transactions (some roll back), 2,000+ committed writes made straight in SQL, several WebSocket
//! subscribers; each receives every committed change exactly once, in cursor order.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{ALICE, TestServer, Ws};
use rand::{Rng, SeedableRng};
use serde_json::json;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscriber_gets_every_committed_change_once_in_order() {
    let s = TestServer::start_with(&[
        ("query.max_limit", "5000"),
        ("ws.outbound_queue", "100000"),
        ("feed.poll_interval", "\"5ms\""),
    ])
    .await;
    let alice = s.token(ALICE, &["*"]);
    let query = json!({"op": "read", "type": "posts", "limit": 5000});
    let mut subscribers = Vec::new();
    for _ in 0..3 {
        let mut ws = Ws::connect(&s.base, Some(&alice)).await;
        let reply = ws.request(query.clone()).await;
        assert_eq!(reply["docs"].as_array().unwrap().len(), 0);
        subscribers.push((ws, reply["sub"].clone()));
    }

    let pool = s.sql().await;
    let seed_ids: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let pool = pool.clone();
            let seed_ids = seed_ids.clone();
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(w);
                let mut committed = 0usize;
                // Each writer first creates its share of the documents others will update.
                for id in seed_ids.iter().skip(w as usize * 5).take(5) {
                    sqlx::query("INSERT INTO documents (id, owner_did, type, data) VALUES ($1, $2, 'posts', '{}')")
                        .bind(id)
                        .bind(ALICE)
                        .execute(&pool)
                        .await
                        .unwrap();
                    committed += 1;
                }
                while committed < 270 {
                    let attempt: Result<usize, sqlx::Error> = async {
                        let mut tx = pool.begin().await?;
                        let mut n = 0;
                        for _ in 0..rng.random_range(1..=2) {
                            let written = if rng.random_bool(0.4) {
                                sqlx::query("INSERT INTO documents (id, owner_did, type, data) VALUES ($1, $2, 'posts', '{}')")
                                    .bind(Uuid::new_v4())
                                    .bind(ALICE)
                                    .execute(&mut *tx)
                                    .await?
                            } else {
                                // May find no row yet if its creator has not committed it.
                                let id = seed_ids[rng.random_range(0..seed_ids.len())];
                                sqlx::query("UPDATE documents SET rev = rev + 1, updated_at = now(), data = $2 WHERE id = $1")
                                    .bind(id)
                                    .bind(json!({"by": w}))
                                    .execute(&mut *tx)
                                    .await?
                            };
                            n += written.rows_affected() as usize;
                            tokio::time::sleep(Duration::from_millis(rng.random_range(0..3))).await;
                        }
                        if rng.random_bool(0.1) {
                            tx.rollback().await?;
                            Ok(0)
                        } else {
                            tx.commit().await?;
                            Ok(n)
                        }
                    }
                    .await;
                    match attempt {
                        Ok(n) => committed += n,
                        // Opposite-order updates deadlock; the aborted side wrote nothing.
                        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("40P01") => {}
                        Err(e) => panic!("writer {w}: {e}"),
                    }
                }
                committed
            })
        })
        .collect();
    let mut total = 0;
    for w in writers {
        total += w.await.unwrap();
    }
    assert!(total >= 2000, "only {total} writes");
    // What the database ended with: each document's final revision.
    let finals: HashMap<Uuid, i64> =
        sqlx::query_as::<_, (Uuid, i64)>("SELECT id, rev FROM documents")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let expected_events: i64 = finals.values().sum();
    assert_eq!(
        expected_events as usize, total,
        "every committed write is one revision"
    );

    // Written after every writer is done: each subscriber's event after the workload's is this
    // one's, so a duplicate or stray event of the workload would show before it.
    let sentinel = Uuid::new_v4();
    sqlx::query("INSERT INTO documents (id, owner_did, type, data) VALUES ($1, $2, 'posts', '{}')")
        .bind(sentinel)
        .bind(ALICE)
        .execute(&pool)
        .await
        .unwrap();

    for (ws, sub) in &mut subscribers {
        let mut revs: HashMap<Uuid, Vec<i64>> = HashMap::new();
        let mut last: Option<vibe::feed::Cursor> = None;
        for _ in 0..total {
            let e = ws.event(sub).await;
            let kind = e["event"].as_str().unwrap();
            assert!(kind == "add" || kind == "change", "{e}");
            let cursor: vibe::feed::Cursor = e["cursor"].as_str().unwrap().parse().unwrap();
            assert!(
                last.is_none_or(|l| l < cursor),
                "out of order: {cursor} after {last:?}"
            );
            last = Some(cursor);
            let id: Uuid = e["doc"]["id"].as_str().unwrap().parse().unwrap();
            revs.entry(id)
                .or_default()
                .push(e["doc"]["rev"].as_i64().unwrap());
        }
        // Exactly revisions 1..=final of every document, each once, in order.
        assert_eq!(revs.len(), finals.len());
        for (id, seen) in &revs {
            let expected: Vec<i64> = (1..=finals[id]).collect();
            assert_eq!(seen, &expected, "document {id}");
        }
        let next = ws.event(sub).await;
        assert_eq!(
            (next["event"].as_str(), next["doc"]["id"].as_str()),
            (Some("add"), Some(sentinel.to_string().as_str())),
            "an extra event arrived before the sentinel"
        );
    }
    pool.close().await;
    for (ws, _) in subscribers {
        ws.close().await;
    }
    s.finish().await;
}
