//! The change feed's ordering guarantees against the real PostgreSQL: every committed change is
//! read exactly once, in cursor order, whatever order concurrent transactions commit in; rolled
//! back changes never appear.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use sqlx::{Connection, PgPool};
use uuid::Uuid;
use vibe::feed::{Cursor, Feed, Filter, Op};

async fn migrated_pool() -> (String, PgPool) {
    let (name, url) = common::fresh_database().await;
    let pool = PgPool::connect(&url).await.unwrap();
    let store = vibe::store::Store::connect(
        url.parse().unwrap(),
        4,
        Duration::from_secs(5),
        vibe::store::Batching::default(),
        vibe::store::Batching::default(),
        vibe::store::QueryPool {
            connections: 1,
            statement_timeout: Duration::from_secs(10),
        },
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    store.close().await;
    (name, pool)
}

/// Ticks and reads everything after `cursor` the way the node's listener does: the tick brings a
/// first page (kept small here so that batches overflow it), the rest is read after.
async fn drain(feed: &Feed, cursor: &mut Cursor) -> Vec<vibe::feed::Change> {
    const FIRST: u32 = 7;
    let (_, first) = feed.tick_and_read(*cursor, FIRST).await.unwrap();
    let mut page = Some(first);
    let mut out = Vec::new();
    loop {
        let page = match page.take() {
            Some(page) => page,
            None => feed.read(*cursor, &Filter::default(), 50).await.unwrap(),
        };
        let full = page.full;
        out.extend(page.changes);
        if let Some(next) = page.next {
            assert!(next >= *cursor, "the cursor never moves back");
            *cursor = next;
        }
        if !full {
            return out;
        }
    }
}

const INSERT: &str =
    "INSERT INTO documents (id, owner_did, type, data) VALUES ($1, 'did:key:zA', 'posts', '{}')";

/// The interleaving from the BRIEF that a `seq > last` cursor (even with an `xid < xmin`
/// filter) gets wrong: T2 takes its xid first, T3 logs seq 1, T2 logs seq 2 and commits, the
/// feed is read, then T3 commits. Both changes must be delivered, each once.
#[tokio::test]
async fn late_committing_older_transaction_is_not_skipped() {
    let (name, pool) = migrated_pool().await;
    let url = pool.connect_options().clone();
    let feed = Feed::new(pool.clone());
    let mut cursor = feed.head().await.unwrap();

    let mut t2 = sqlx::PgConnection::connect_with(&url).await.unwrap();
    let mut t3 = sqlx::PgConnection::connect_with(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut t2).await.unwrap();
    sqlx::query("BEGIN").execute(&mut t3).await.unwrap();
    // T2 takes its xid first, writing elsewhere.
    let t2_xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut t2)
        .await
        .unwrap();
    let (d2, d3) = (Uuid::new_v4(), Uuid::new_v4());
    // T3 logs a change first (lower seq, higher xid).
    sqlx::query(INSERT).bind(d3).execute(&mut t3).await.unwrap();
    let t3_xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut t3)
        .await
        .unwrap();
    assert!(t2_xid.parse::<u64>().unwrap() < t3_xid.parse::<u64>().unwrap());
    // T2 logs (higher seq) and commits.
    sqlx::query(INSERT).bind(d2).execute(&mut t2).await.unwrap();
    sqlx::query("COMMIT").execute(&mut t2).await.unwrap();

    let first = drain(&feed, &mut cursor).await;
    assert_eq!(first.iter().map(|c| c.doc_id).collect::<Vec<_>>(), vec![d2]);

    sqlx::query("COMMIT").execute(&mut t3).await.unwrap();
    let second = drain(&feed, &mut cursor).await;
    assert_eq!(
        second.iter().map(|c| c.doc_id).collect::<Vec<_>>(),
        vec![d3],
        "T3's change was skipped"
    );
    assert!(first[0].cursor < second[0].cursor);
    assert!(
        drain(&feed, &mut cursor).await.is_empty(),
        "nothing is delivered twice"
    );

    pool.close().await;
    common::drop_database(&name).await;
}

/// 8 writers, random delays inside their transactions, some rollbacks, 2,000+ writes (inserts,
/// and updates of older documents and of the writer's own fresh inserts), a reader ticking and
/// reading all along: each committed change exactly once, in cursor order, and each document's
/// revisions in order; a replay afterwards reads exactly what was read live.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_every_change_exactly_once_in_order() {
    let (name, pool) = migrated_pool().await;
    let feed = Feed::new(pool.clone());
    let start = feed.head().await.unwrap();
    let docs: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
    for id in &docs {
        sqlx::query(INSERT).bind(id).execute(&pool).await.unwrap();
    }
    let setup = drain(&feed, &mut start.clone()).await.len();
    assert_eq!(setup, docs.len());
    let mut cursor = feed.head().await.unwrap();

    let writers: Vec<_> = (0..8)
        .map(|w| {
            let pool = pool.clone();
            let docs = docs.clone();
            tokio::spawn(async move {
                let mut committed: Vec<(Uuid, Op)> = Vec::new();
                // This writer's committed inserts: updating one moves its insert from the row's
                // marks into the log while readers may be reading that insert's batch.
                let mut own: Vec<Uuid> = Vec::new();
                let mut rng = rand::rngs::StdRng::seed_from_u64(w);
                for i in 0..300 {
                    // Two writers updating the same two documents in opposite orders deadlock;
                    // PostgreSQL aborts one, whose writes then must not appear in the feed.
                    let attempt: Result<Option<Vec<(Uuid, Op)>>, sqlx::Error> = async {
                        let mut tx = pool.begin().await?;
                        let mut writes = Vec::new();
                        for _ in 0..rng.random_range(1..=2) {
                            if rng.random_bool(0.3) {
                                let id = Uuid::new_v4();
                                sqlx::query(INSERT).bind(id).execute(&mut *tx).await?;
                                writes.push((id, Op::Insert));
                            } else {
                                let id = if !own.is_empty() && rng.random_bool(0.3) {
                                    own[rng.random_range(0..own.len())]
                                } else {
                                    docs[rng.random_range(0..docs.len())]
                                };
                                sqlx::query(
                                    "UPDATE documents SET rev = rev + 1, data = $2 WHERE id = $1",
                                )
                                .bind(id)
                                .bind(serde_json::json!({"w": w, "i": i}))
                                .execute(&mut *tx)
                                .await?;
                                writes.push((id, Op::Update));
                            }
                            let pause = rng.random_range(0..3);
                            tokio::time::sleep(Duration::from_millis(pause)).await;
                        }
                        if rng.random_bool(0.1) {
                            tx.rollback().await?;
                            Ok(None)
                        } else {
                            tx.commit().await?;
                            Ok(Some(writes))
                        }
                    }
                    .await;
                    match attempt {
                        Ok(Some(writes)) => {
                            own.extend(
                                writes
                                    .iter()
                                    .filter(|(_, op)| *op == Op::Insert)
                                    .map(|(id, _)| *id),
                            );
                            committed.extend(writes);
                        }
                        Ok(None) => {}
                        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("40P01") => {}
                        Err(e) => panic!("writer {w}: {e}"),
                    }
                }
                committed
            })
        })
        .collect();

    let from = cursor;
    let mut received = Vec::new();
    let done = tokio::spawn(async move {
        let mut all = Vec::new();
        for w in writers {
            all.extend(w.await.unwrap());
        }
        all
    });
    while !done.is_finished() {
        received.extend(drain(&feed, &mut cursor).await);
    }
    let committed = done.await.unwrap();
    received.extend(drain(&feed, &mut cursor).await);

    assert!(committed.len() >= 2000, "only {} writes", committed.len());
    assert_eq!(
        received.len(),
        committed.len(),
        "lost or duplicated changes"
    );
    assert!(
        received.windows(2).all(|w| w[0].cursor < w[1].cursor),
        "out of cursor order"
    );
    let mut expected: HashMap<(Uuid, &str), usize> = HashMap::new();
    for (id, op) in &committed {
        *expected.entry((*id, op.as_str())).or_default() += 1;
    }
    let mut got: HashMap<(Uuid, &str), usize> = HashMap::new();
    for c in &received {
        *got.entry((c.doc_id, c.op.as_str())).or_default() += 1;
    }
    assert_eq!(got, expected);
    // Per document, revisions arrive in increasing order.
    let mut last_rev: HashMap<Uuid, i64> = HashMap::new();
    for c in &received {
        let prev = last_rev.insert(c.doc_id, c.rev);
        assert!(
            prev.is_none_or(|p| p < c.rev),
            "revisions of {} out of order",
            c.doc_id
        );
    }
    let ids: HashSet<_> = received.iter().map(|c| c.cursor).collect();
    assert_eq!(ids.len(), received.len());
    // Replayed afterwards (inserts since updated now come from the log): the same changes at
    // the same cursors, with the same images.
    let replayed = drain(&feed, &mut from.clone()).await;
    assert!(
        replayed == received,
        "a replay differs from what was read live"
    );

    pool.close().await;
    common::drop_database(&name).await;
}

/// Concurrent callers of `tick` share ticks: with the tick lock held elsewhere, 40 writers each
/// commit a change and ask for a tick; once the lock is free, at most a few ticks run (not 40),
/// and every writer's change is in a batch when its own call returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_ticks_are_shared_and_each_covers_its_callers_writes() {
    const WRITERS: usize = 40;
    let (name, pool) = migrated_pool().await;
    let url = pool.connect_options().clone();
    let feed = Feed::new(pool.clone());
    let start = feed.head().await.unwrap();
    let started_before = feed.ticks_started();

    // Hold the cluster-wide tick lock so the first tick blocks in the database.
    let mut holder = sqlx::PgConnection::connect_with(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(x'766962657469636b'::bigint)")
        .execute(&mut holder)
        .await
        .unwrap();

    let called = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let (feed, pool, called) = (feed.clone(), pool.clone(), called.clone());
        writers.push(tokio::spawn(async move {
            let id = Uuid::now_v7();
            sqlx::query(INSERT).bind(id).execute(&pool).await.unwrap();
            called.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            feed.tick().await.unwrap();
            // Everything this writer committed before its tick call is readable now.
            let mut cursor = start;
            let mut seen = false;
            loop {
                let page = feed.read(cursor, &Filter::default(), 500).await.unwrap();
                seen |= page.changes.iter().any(|c| c.doc_id == id);
                cursor = page.next.unwrap_or(cursor);
                if !page.full {
                    break;
                }
            }
            assert!(seen, "a writer's own change is in a batch after its tick");
        }));
    }
    // Wait until every writer has called `tick` and one of them waits for the lock (in this
    // test's database: other tests' ticks take advisory locks too).
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting >= 1 && called.load(std::sync::atomic::Ordering::SeqCst) == WRITERS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let ran = feed.ticks_started() - started_before;
    // The blocked tick, then one for everyone who arrived while it ran (a writer counted just
    // before its call may be a third).
    assert!(ran <= 3, "{ran} ticks for {WRITERS} concurrent callers");
    pool.close().await;
    common::drop_database(&name).await;
}

/// Transaction ids that went backwards (a restore into a new cluster) would hide every new change
/// from the snapshot comparisons; the feed drops its history instead, and new changes flow.
#[tokio::test]
async fn a_feed_recovers_from_transaction_ids_going_backwards() {
    let (name, pool) = migrated_pool().await;
    let feed = Feed::new(pool.clone());
    assert!(
        !feed.recover_from_xid_reset().await.unwrap(),
        "nothing to recover from"
    );
    let old = feed.head().await.unwrap();
    // A tick from the "old cluster", far ahead of this one's transaction ids.
    sqlx::query("INSERT INTO feed_ticks (snapshot) VALUES ('9000000000:9000000000:'::pg_snapshot)")
        .execute(&pool)
        .await
        .unwrap();
    let mut cursor = feed.head().await.unwrap();
    sqlx::query(INSERT)
        .bind(Uuid::now_v7())
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        drain(&feed, &mut cursor).await.is_empty(),
        "the jump hides new changes (what recovery is for)"
    );

    assert!(feed.recover_from_xid_reset().await.unwrap());
    assert!(
        !feed.recover_from_xid_reset().await.unwrap(),
        "once is enough"
    );
    assert!(
        matches!(
            feed.read(old, &Filter::default(), 10).await,
            Err(vibe::feed::FeedError::CursorExpired)
        ),
        "cursors from before are expired"
    );
    let mut cursor = feed.head().await.unwrap();
    let id = Uuid::now_v7();
    sqlx::query(INSERT).bind(id).execute(&pool).await.unwrap();
    let got = drain(&feed, &mut cursor).await;
    assert_eq!(got.iter().map(|c| c.doc_id).collect::<Vec<_>>(), vec![id]);

    // A restored document whose insert mark carries the old cluster's id (ahead of this one's)
    // is found on its own, and unmarked without being logged as a write.
    let restored = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO documents (id, owner_did, type, data, log_xid) \
         VALUES ($1, 'did:key:zA', 'posts', '{}', 9000000001)",
    )
    .bind(restored)
    .execute(&pool)
    .await
    .unwrap();
    assert!(feed.recover_from_xid_reset().await.unwrap());
    let mark: Option<i64> = sqlx::query_scalar("SELECT log_xid FROM documents WHERE id = $1")
        .bind(restored)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mark, None, "the future mark is cleared");
    let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM changes")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(logged, 0, "unmarking is not a change");
    assert!(!feed.recover_from_xid_reset().await.unwrap());
    pool.close().await;
    common::drop_database(&name).await;
}

/// A connection listening on the feed's doorbell channel, as a node's listener has.
async fn doorbell_listener(pool: &PgPool) -> sqlx::postgres::PgListener {
    let mut listener = sqlx::postgres::PgListener::connect_with(pool)
        .await
        .unwrap();
    listener.listen(vibe::feed::DOORBELL_CHANNEL).await.unwrap();
    listener
}

/// A tick that cuts a batch rings the doorbell itself (its node's id as payload) and brings the
/// batch's first page; the rest follows with plain reads, in order; a tick with nothing new cuts
/// nothing; a tick after a pruned cursor still answers `CursorExpired`.
#[tokio::test]
async fn a_tick_rings_the_doorbell_and_brings_the_first_page() {
    let (name, pool) = migrated_pool().await;
    let feed = Feed::new(pool.clone());
    let start = feed.head().await.unwrap();
    let mut listener = doorbell_listener(&pool).await;

    sqlx::query(
        "INSERT INTO documents (id, owner_did, type, data) \
         SELECT gen_random_uuid(), 'did:key:zA', 'posts', jsonb_build_object('i', i) \
         FROM generate_series(1, 10) i",
    )
    .execute(&pool)
    .await
    .unwrap();
    let numbers = |changes: &[vibe::feed::Change]| -> Vec<i64> {
        changes
            .iter()
            .map(|c| c.new.as_ref().unwrap().data["i"].as_i64().unwrap())
            .collect()
    };

    let (made, first) = feed.tick_and_read(start, 4).await.unwrap();
    let made = made.expect("the insert is visible: a tick is cut");
    assert_eq!(numbers(&first.changes), vec![1, 2, 3, 4]);
    assert!(first.full);
    assert!(first.changes.iter().all(|c| c.cursor.tick == made));
    let bell = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("the tick rang the doorbell")
        .unwrap();
    assert_eq!(bell.payload(), feed.node());

    let rest = feed
        .read(first.next.unwrap(), &Filter::default(), 50)
        .await
        .unwrap();
    assert_eq!(numbers(&rest.changes), vec![5, 6, 7, 8, 9, 10]);
    assert!(!rest.full);
    let head = rest.next.unwrap();
    assert_eq!(head, feed.head().await.unwrap());

    let (again, empty) = feed.tick_and_read(head, 4).await.unwrap();
    assert_eq!(again, None, "nothing new: no tick");
    assert!(empty.changes.is_empty());

    // Prune every tick but the newest: `start` loses the tick that cuts its batch.
    sqlx::query("DELETE FROM feed_ticks WHERE tick < (SELECT max(tick) FROM feed_ticks)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(INSERT)
        .bind(Uuid::now_v7())
        .execute(&pool)
        .await
        .unwrap();
    assert!(matches!(
        feed.tick_and_read(start, 4).await,
        Err(vibe::feed::FeedError::CursorExpired)
    ));
    let (_, after_prune) = feed.tick_and_read(head, 4).await.unwrap();
    assert_eq!(
        after_prune.changes.len(),
        1,
        "the tick above was cut and is read"
    );

    drop(listener); // it holds a pool connection that `close` would wait for
    pool.close().await;
    common::drop_database(&name).await;
}

/// Retention keeps the base of the first fresh batch: after a quiet spell longer than retention,
/// a reader that was caught up before it still reads the first change after it (the old tick
/// its batch is cut against was pruned once, and the change was then out of every reader's
/// reach); the batches before it are gone.
#[tokio::test]
async fn a_prune_after_a_quiet_spell_keeps_the_next_batch_readable() {
    let (name, pool) = migrated_pool().await;
    let feed = Feed::new(pool.clone());
    let start = feed.head().await.unwrap();
    let insert = || sqlx::query(INSERT).bind(Uuid::now_v7()).execute(&pool);
    insert().await.unwrap();
    let (_, first) = feed.tick_and_read(start, 10).await.unwrap();
    assert_eq!(first.changes.len(), 1);
    let caught_up = first.next.unwrap();

    // Two hours without a write, then one.
    sqlx::query("UPDATE feed_ticks SET created_at = created_at - interval '2 hours'")
        .execute(&pool)
        .await
        .unwrap();
    insert().await.unwrap();
    let fresh = feed.tick().await.unwrap().expect("the write cuts a tick");
    feed.prune(Duration::from_secs(3600)).await.unwrap();

    let after = feed.read(caught_up, &Filter::default(), 10).await.unwrap();
    assert_eq!(after.changes.len(), 1, "the change after the quiet spell");
    assert_eq!(after.changes[0].cursor.tick, fresh);
    assert!(matches!(
        feed.read(start, &Filter::default(), 10).await,
        Err(vibe::feed::FeedError::CursorExpired)
    ));
    pool.close().await;
    common::drop_database(&name).await;
}

/// A document version written in SQL that JSON here cannot hold (`jsonb` keeps a number past an
/// f64) passes through the feed as unreadable, and the feed goes on past it: one such row would
/// otherwise fail every read of its page, on every node, for good.
#[tokio::test]
async fn an_undecodable_document_version_does_not_stop_the_feed() {
    let (name, pool) = migrated_pool().await;
    let feed = Feed::new(pool.clone());
    let start = feed.head().await.unwrap();
    let odd = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO documents (id, owner_did, type, data) \
         VALUES ($1, 'did:key:zA', 'posts', '{\"n\": 1e400}')",
    )
    .bind(odd)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(INSERT)
        .bind(Uuid::now_v7())
        .execute(&pool)
        .await
        .unwrap();
    let (_, page) = feed.tick_and_read(start, 10).await.unwrap();
    assert_eq!(page.changes.len(), 2, "both changes, in order");
    assert_eq!(page.changes[0].doc_id, odd);
    assert!(
        page.changes[0].new.is_none(),
        "the odd version passes unread"
    );
    assert!(page.changes[1].new.is_some());
    pool.close().await;
    common::drop_database(&name).await;
}

/// The listener's way: ticks and reads on its LISTEN connection. The tick's own ring is already
/// in hand when the reply is (it came on the same connection, so no other backend woke for it),
/// reads on that connection page on like pooled ones, and a connection that dies under a tick
/// fails that tick instead of losing changes: the next one finds them.
#[tokio::test]
async fn ticks_on_the_listen_connection_get_their_own_ring_with_the_reply() {
    let (name, pool) = migrated_pool().await;
    let feed = Feed::new(pool.clone());
    let start = feed.head().await.unwrap();
    let mut listener = doorbell_listener(&pool).await;
    for _ in 0..3 {
        sqlx::query(INSERT)
            .bind(Uuid::now_v7())
            .execute(&pool)
            .await
            .unwrap();
    }

    let conn = sqlx::Acquire::acquire(&mut listener).await.unwrap();
    let (made, first) = feed.tick_and_read_on(Some(conn), start, 2).await.unwrap();
    assert!(made.is_some(), "three inserts: a tick is cut");
    assert_eq!(first.changes.len(), 2);
    let bell = listener
        .next_buffered()
        .expect("the ring came back with the tick's reply");
    assert_eq!(bell.payload(), feed.node());
    assert!(listener.next_buffered().is_none(), "one ring per tick");

    let conn = sqlx::Acquire::acquire(&mut listener).await.unwrap();
    let rest = feed
        .read_on(Some(conn), first.next.unwrap(), &Filter::default(), 10)
        .await
        .unwrap();
    assert_eq!(rest.changes.len(), 1);
    let head = rest.next.unwrap();
    assert_eq!(head, feed.head().await.unwrap());

    // Kill the LISTEN backend; a write commits meanwhile.
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut listener)
        .await
        .unwrap();
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 10000)")
        .bind(pid)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(killed);
    sqlx::query(INSERT)
        .bind(Uuid::now_v7())
        .execute(&pool)
        .await
        .unwrap();
    // The dead connection fails the tick (or, if sqlx already noticed, it has reconnected and
    // the tick succeeds); either way the change is there for the next tick.
    let conn = sqlx::Acquire::acquire(&mut listener).await;
    let on_dead = match conn {
        Ok(conn) => feed.tick_and_read_on(Some(conn), head, 10).await,
        Err(e) => Err(e.into()),
    };
    let page = match on_dead {
        Ok((_, page)) => page,
        Err(_) => feed.tick_and_read_on(None, head, 10).await.unwrap().1,
    };
    assert_eq!(page.changes.len(), 1, "the write made meanwhile is read");

    drop(listener);
    pool.close().await;
    common::drop_database(&name).await;
}

/// A change as the test below compares it: document, operation, rev, and `data.n` of the new and
/// old images.
type Written = (Uuid, Op, i64, Option<i64>, Option<i64>);

/// An insert is logged in its document's row until the row first changes; then it moves to the
/// log with the image it was inserted with, at the same place in the same batch. Read live or
/// replayed from before it, every write is one change, in order, with the images of its time —
/// also when the update or delete comes in the insert's own transaction.
#[tokio::test]
async fn an_insert_keeps_its_image_and_place_after_its_row_changes() {
    let (name, pool) = migrated_pool().await;
    let feed = Feed::new(pool.clone());
    let start = feed.head().await.unwrap();
    let mut live = start;
    let summary = |changes: &[vibe::feed::Change]| -> Vec<Written> {
        let n =
            |image: &Option<vibe::feed::Image>| image.as_ref().and_then(|i| i.data["n"].as_i64());
        changes
            .iter()
            .map(|c| (c.doc_id, c.op, c.rev, n(&c.new), n(&c.old)))
            .collect()
    };
    const INSERT_N: &str = "INSERT INTO documents (id, owner_did, type, data) \
                            VALUES ($1, 'did:key:zA', 'posts', jsonb_build_object('n', $2::int))";
    const UPDATE_N: &str =
        "UPDATE documents SET data = jsonb_build_object('n', $2::int), rev = rev + 1 WHERE id = $1";

    // Read live: the insert from its row, then its update and delete from the log.
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    sqlx::query(INSERT_N)
        .bind(a)
        .bind(1)
        .execute(&pool)
        .await
        .unwrap();
    let first = summary(&drain(&feed, &mut live).await);
    assert_eq!(first, vec![(a, Op::Insert, 1, Some(1), None)]);
    sqlx::query(UPDATE_N)
        .bind(a)
        .bind(2)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM documents WHERE id = $1")
        .bind(a)
        .execute(&pool)
        .await
        .unwrap();
    let second = summary(&drain(&feed, &mut live).await);
    assert_eq!(
        second,
        vec![
            (a, Op::Update, 2, Some(2), Some(1)),
            (a, Op::Delete, 2, None, Some(2))
        ],
        "read once, the insert is not delivered again when its row changes"
    );

    // Written before anyone reads: b changed twice after its insert, c inserted and updated in
    // one transaction, then deleted.
    sqlx::query(INSERT_N)
        .bind(b)
        .bind(10)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(UPDATE_N)
        .bind(b)
        .bind(11)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(UPDATE_N)
        .bind(b)
        .bind(12)
        .execute(&pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(INSERT_N)
        .bind(c)
        .bind(20)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(UPDATE_N)
        .bind(c)
        .bind(21)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    sqlx::query("DELETE FROM documents WHERE id = $1")
        .bind(c)
        .execute(&pool)
        .await
        .unwrap();
    let later = vec![
        (b, Op::Insert, 1, Some(10), None),
        (b, Op::Update, 2, Some(11), Some(10)),
        (b, Op::Update, 3, Some(12), Some(11)),
        (c, Op::Insert, 1, Some(20), None),
        (c, Op::Update, 2, Some(21), Some(20)),
        (c, Op::Delete, 2, None, Some(21)),
    ];
    assert_eq!(summary(&drain(&feed, &mut live).await), later);

    // Replayed from the start: every write once, in order, each with the images of its time.
    let mut replay = start;
    let all: Vec<_> = first.into_iter().chain(second).chain(later).collect();
    assert_eq!(summary(&drain(&feed, &mut replay).await), all);
    assert_eq!(replay, live, "both readers end at the same place");
    pool.close().await;
    common::drop_database(&name).await;
}

/// The tick's page read runs on a cached generic plan (migrations/0014, kept by 0017's
/// `vibe_feed_tick_read`): with the default plan cache mode PL/pgSQL planned it afresh on every
/// tick, most of a tick's database time. A later `CREATE OR REPLACE FUNCTION` without the SET
/// clause would silently drop the setting; this catches that.
#[tokio::test]
async fn the_tick_keeps_its_generic_plan_setting() {
    let (name, pool) = migrated_pool().await;
    let config: Vec<Option<Vec<String>>> =
        sqlx::query_scalar("SELECT proconfig FROM pg_proc WHERE proname = 'vibe_feed_tick_read'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        config,
        vec![Some(vec!["plan_cache_mode=force_generic_plan".to_owned()])],
        "exactly one vibe_feed_tick_read, planned generically"
    );
    // Under that setting a tick still reads from any cursor: the start, and one past a batch.
    let feed = Feed::new(pool.clone());
    let start = feed.head().await.unwrap();
    for _ in 0..3 {
        sqlx::query(INSERT)
            .bind(Uuid::now_v7())
            .execute(&pool)
            .await
            .unwrap();
    }
    let mut cursor = start;
    assert_eq!(drain(&feed, &mut cursor).await.len(), 3);
    sqlx::query(INSERT)
        .bind(Uuid::now_v7())
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(drain(&feed, &mut cursor).await.len(), 1, "only the new one");
    let mut from_start = start;
    assert_eq!(drain(&feed, &mut from_start).await.len(), 4);
    assert_eq!(from_start, cursor, "both readers end at the same place");
    pool.close().await;
    common::drop_database(&name).await;
}

/// What the resync test's sink saw, in order.
#[derive(Debug, PartialEq)]
enum SinkEvent {
    Resync { position: Cursor, succeeded: bool },
    Publish { changes: usize },
}

/// A sink whose first `failures` resyncs fail, as a certificate read during an outage would.
struct FailingResyncs {
    failures: usize,
    events: tokio::sync::mpsc::UnboundedSender<SinkEvent>,
}

impl vibe::feed::listener::ChangeSink for FailingResyncs {
    type ResyncError = &'static str;

    async fn publish(&mut self, changes: Vec<vibe::feed::Change>, _position: Cursor) {
        let _ = self.events.send(SinkEvent::Publish {
            changes: changes.len(),
        });
    }

    async fn resync(&mut self, position: Cursor) -> Result<(), &'static str> {
        let succeeded = self.failures == 0;
        self.failures = self.failures.saturating_sub(1);
        let _ = self.events.send(SinkEvent::Resync {
            position,
            succeeded,
        });
        if succeeded {
            Ok(())
        } else {
            Err("the certificates could not be read")
        }
    }
}

/// A listener that fell behind retention resyncs before it publishes anything past the new
/// position, and a failed resync is made again at that position (it was given up once: the
/// node then judged changes with a certificate book missing the skipped range's revocations).
#[tokio::test]
async fn a_failed_resync_is_retried_before_anything_past_it_is_published() {
    use vibe::feed::listener::{FeedListener, FeedWaker, ListenerSettings};
    let (name, pool) = migrated_pool().await;
    let feed = Feed::new(pool.clone());
    let start = feed.head().await.unwrap();
    let insert = async || {
        sqlx::query(INSERT)
            .bind(Uuid::now_v7())
            .execute(&pool)
            .await
            .unwrap();
    };
    for _ in 0..3 {
        insert().await;
    }
    let mut cursor = start;
    assert_eq!(drain(&feed, &mut cursor).await.len(), 3);
    // `start` loses the tick that cuts its batch: a reader there fell behind retention.
    sqlx::query("DELETE FROM feed_ticks WHERE tick < (SELECT max(tick) FROM feed_ticks)")
        .execute(&pool)
        .await
        .unwrap();
    insert().await;

    let (events, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (head, _) = tokio::sync::watch::channel(start);
    let listener = FeedListener {
        feed: Feed::new(pool.clone()),
        listen_pool: pool.clone(),
        waker: FeedWaker::default(),
        settings: ListenerSettings {
            poll_interval: Duration::from_millis(50),
            min_tick_interval: Duration::ZERO,
            tick_burst: 1,
        },
        position: start,
        head,
    };
    let sink = FailingResyncs {
        failures: 2,
        events,
    };
    let task = tokio::spawn(listener.run(sink, async {
        let _ = stopped.await;
    }));
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(30), seen.recv())
            .await
            .expect("the listener goes on")
            .expect("the listener holds the sink")
    };
    let first = next().await;
    let SinkEvent::Resync {
        position,
        succeeded: false,
    } = first
    else {
        panic!("the first thing the listener does is a (failing) resync: {first:?}");
    };
    assert!(position > start, "it skips ahead: {position} after {start}");
    for succeeded in [false, true] {
        assert_eq!(
            next().await,
            SinkEvent::Resync {
                position,
                succeeded
            },
            "nothing is published until a resync at the same position succeeds"
        );
    }
    // Reading goes on from there: the insert after the prune (not yet ticked at the head read)
    // and a new one arrive.
    insert().await;
    let mut published = 0;
    while published < 1 {
        match next().await {
            SinkEvent::Publish { changes } => published += changes,
            other => panic!("one resync is enough: {other:?}"),
        }
    }
    let _ = stop.send(());
    task.await.unwrap();
    pool.close().await;
    common::drop_database(&name).await;
}
