//! Faults under the feed lose nothing: the listener's LISTEN backend is terminated, then the
//! PostgreSQL server (a private one this test owns) restarts, while writes go on; the subscriber
//! still receives every committed write exactly once. (The backlog after the restart may leave
//! its live query — a window of thousands of documents, slow in a debug build — more pages
//! behind the feed than it may hold: it then skips them and sends a `reset`, which a client
//! applies by replacing its result; the writes after it come as events, once.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{ALICE, Ws};
use serde_json::json;
use sqlx::Connection;
use uuid::Uuid;
use vibe::embedded_db::EmbeddedPostgres;

/// Inserts documents one by one, one per 2 ms at most, until told to stop, retrying through
/// outages. Paced: unpaced it wrote thousands a second, and the subscriber's live query (one
/// window over every document, each change a shift of it, in a debug build) fell so far behind
/// that catching up outlasted the client's wait for a frame.
fn writer(
    url: String,
    stop: Arc<AtomicBool>,
    phase: Arc<std::sync::atomic::AtomicU32>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut attempts = 0;
        let mut conn: Option<sqlx::PgConnection> = None;
        let mut pace = tokio::time::interval(std::time::Duration::from_millis(2));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(Ordering::Relaxed) {
            pace.tick().await;
            if conn.is_none() {
                conn = sqlx::PgConnection::connect(&url).await.ok();
                if conn.is_none() {
                    tokio::task::yield_now().await;
                    continue;
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            let r = sqlx::query(
                "INSERT INTO documents (id, owner_did, type, data) VALUES ($1, $2, 'posts', $3)",
            )
            .bind(Uuid::new_v4())
            .bind(ALICE)
            .bind(json!({"run": "faults", "phase": phase.load(Ordering::Relaxed)}))
            .execute(&mut *c)
            .await;
            attempts += 1;
            if r.is_err() {
                conn = None;
            }
        }
        attempts
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_listener_and_restarted_postgres_lose_nothing() {
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let pg = EmbeddedPostgres::start(&root.path().join("pg"), false)
        .await
        .unwrap();
    let url = pg.url();
    let s = common::TestServer::start_on(
        &url,
        &[
            ("feed.poll_interval", "\"20ms\""),
            ("query.max_limit", "100000"),
            ("ws.outbound_queue", "1000000"),
        ],
    )
    .await;
    let alice = s.token(ALICE, &["*"]);
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let sub = ws
        .request(json!({"op": "read", "type": "posts", "limit": 100000}))
        .await["sub"]
        .clone();

    let stop = Arc::new(AtomicBool::new(false));
    let phase = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let writing = writer(url.clone(), stop.clone(), phase.clone());
    let mut received: Vec<Uuid> = Vec::new();
    // The next `add`, into `received`; a `reset` replaces `received` with its documents.
    let next_event = async |ws: &mut Ws, received: &mut Vec<Uuid>| loop {
        let e = ws.event(&sub).await;
        let id = |doc: &serde_json::Value| doc["id"].as_str().unwrap().parse::<Uuid>().unwrap();
        match e["event"].as_str() {
            Some("add") => {
                received.push(id(&e["doc"]));
                return;
            }
            Some("reset") => *received = e["docs"].as_array().unwrap().iter().map(id).collect(),
            _ => panic!("unexpected event {e}"),
        }
    };
    for _ in 0..20 {
        next_event(&mut ws, &mut received).await;
    }

    // 1. Cut the listener's LISTEN connection: notifications sent meanwhile are lost to it.
    phase.store(1, Ordering::Relaxed);
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'vibe-feed'",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(killed, vec![true], "exactly one LISTEN backend");
    admin.close().await.unwrap();
    for _ in 0..20 {
        next_event(&mut ws, &mut received).await;
    }

    // 2. Restart PostgreSQL under everything.
    phase.store(2, Ordering::Relaxed);
    pg.restart().await.unwrap();
    for _ in 0..20 {
        next_event(&mut ws, &mut received).await;
    }
    stop.store(true, Ordering::Relaxed);
    writing.await.unwrap();

    // Everything committed arrives, once.
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    let committed: HashSet<Uuid> =
        sqlx::query_scalar("SELECT id FROM documents WHERE data->>'run' = 'faults'")
            .fetch_all(&mut admin)
            .await
            .unwrap()
            .into_iter()
            .collect();
    // A document written after the workload: once it is in, every earlier event is too (one
    // live query delivers in feed order), duplicates included.
    let sentinel = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO documents (id, owner_did, type, data) VALUES ($1, $2, 'posts', '{\"run\": \"end\"}')",
    )
    .bind(sentinel)
    .bind(ALICE)
    .execute(&mut admin)
    .await
    .unwrap();
    admin.close().await.unwrap();
    while !received.contains(&sentinel) {
        next_event(&mut ws, &mut received).await;
    }
    received.retain(|id| *id != sentinel);
    let unique: HashSet<Uuid> = received.iter().copied().collect();
    assert_eq!(unique.len(), received.len(), "a change was delivered twice");
    assert_eq!(unique, committed);
    ws.close().await;
    if let Some(server) = s.server {
        server.shutdown().await.unwrap();
    }
    pg.stop().await.unwrap();
}
