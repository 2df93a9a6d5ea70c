//! The root's type actors driven directly: no sockets, no database (snapshots come from memory).
//! Any valid type name can be subscribed to, so a type actor must not outlive its last live
//! query — nor stop while a subscription is on its way to it. A live query that stops by `unsub`
//! does not linger, and one slow to handle its pages does not hold up the feed. Certificate
//! expiries are numbered in order, also with no change between them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use common::{delete, doc_by, insert};
use ractor::{Actor, ActorRef};
use serde_json::json;
use tokio::sync::Semaphore;
use vibe_actors::certs::{Certificate, CertificateBook};
use vibe_actors::change::{Change, Cursor, SnapshotView};
use vibe_actors::live_query::{BoxFuture, ReplayLimit, Snapshot, SnapshotSource, Subscriber};
use vibe_actors::outbox::{OutboxReceiver, QueueLimit, outbox};
use vibe_actors::query::{QueryLimits, QueryRequest, QuerySpec};
use vibe_actors::realtime::{InFlight, Realtime, RealtimeConfig, RealtimeMsg, SubscribeRequest};
use vibe_actors::wire::Document;

const ALICE: &str = "did:key:zAlice";
const BOB: &str = "did:key:zBob";

/// A whole snapshot of `docs`, read at a fixed point.
fn snapshot_of(docs: Vec<Document>) -> Snapshot {
    Snapshot {
        docs,
        cut: false,
        view: SnapshotView::parse("100:100:").unwrap(),
        settled: Cursor::new(1, 0),
    }
}

/// Every query's snapshot is `docs`.
#[derive(Debug)]
struct Fixed(Vec<Document>);

impl SnapshotSource for Fixed {
    fn load(&self, _spec: Arc<QuerySpec>, _budget: usize) -> BoxFuture<Result<Snapshot, String>> {
        let docs = self.0.clone();
        Box::pin(async move { Ok(snapshot_of(docs)) })
    }
}

async fn root(max_live_queries: usize) -> ActorRef<RealtimeMsg> {
    root_with(
        Arc::new(Fixed(Vec::new())),
        max_live_queries,
        Duration::ZERO,
    )
    .await
}

/// A root whose live queries load from `source` and, left without subscribers, linger for
/// `linger`.
async fn root_with(
    source: Arc<dyn SnapshotSource>,
    max_live_queries: usize,
    linger: Duration,
) -> ActorRef<RealtimeMsg> {
    root_holding(source, max_live_queries, linger, CertificateBook::default()).await
}

/// As [`root_with`], the certificates in `book` valid.
async fn root_holding(
    source: Arc<dyn SnapshotSource>,
    max_live_queries: usize,
    linger: Duration,
    book: CertificateBook,
) -> ActorRef<RealtimeMsg> {
    let config = config(source, max_live_queries, linger);
    let args = (config, Cursor::new(2, 0), book);
    Actor::spawn(None, Realtime, args).await.unwrap().0
}

/// The tree's settings of these tests.
fn config(
    source: Arc<dyn SnapshotSource>,
    max_live_queries: usize,
    linger: Duration,
) -> RealtimeConfig {
    RealtimeConfig {
        source,
        replay: ReplayLimit {
            events: 16,
            bytes: 1 << 20,
        },
        window_bytes: 1 << 20,
        linger,
        max_live_queries,
        live_queries: Arc::default(),
        max_live_bytes: usize::MAX,
        live_bytes: Arc::default(),
    }
}

fn spec(doc_type: &str) -> Arc<QuerySpec> {
    let request: QueryRequest = serde_json::from_value(json!({"type": doc_type})).unwrap();
    Arc::new(QuerySpec::parse(&request, ALICE, QueryLimits::default()).unwrap())
}

/// Subscribes connection `conn` to `spec` as Alice; the subscription id, or the refusal.
async fn subscribe(
    realtime: &ActorRef<RealtimeMsg>,
    spec: &Arc<QuerySpec>,
    conn: u64,
) -> (Result<Arc<str>, String>, OutboxReceiver) {
    subscribe_as(realtime, spec, conn, ALICE, None).await
}

/// Subscribes connection `conn` to `spec` as `caller`, resuming from `since`.
async fn subscribe_as(
    realtime: &ActorRef<RealtimeMsg>,
    spec: &Arc<QuerySpec>,
    conn: u64,
    caller: &str,
    since: Option<Cursor>,
) -> (Result<Arc<str>, String>, OutboxReceiver) {
    let (out, rx) = outbox(conn, QueueLimit::frames(16));
    let answer = ractor::call!(realtime, |reply| {
        RealtimeMsg::Subscribe(SubscribeRequest {
            spec: spec.clone(),
            subscriber: Subscriber {
                outbox: out,
                caller: caller.into(),
                gate: Default::default(),
                seen_up_to: None,
            },
            request_id: json!(conn),
            since,
            reply,
        })
    })
    .unwrap();
    (answer.map_err(|e| e.to_string()), rx)
}

/// Releases `conn`'s subscription `sub`: an `unsub`, or with `linger` the connection's end.
fn release(
    realtime: &ActorRef<RealtimeMsg>,
    spec: &Arc<QuerySpec>,
    sub: &Arc<str>,
    conn: u64,
    linger: bool,
) {
    realtime
        .cast(RealtimeMsg::Unsubscribe {
            spec: spec.clone(),
            sub: sub.clone(),
            conn_id: conn,
            linger,
        })
        .unwrap();
}

fn unsubscribe(realtime: &ActorRef<RealtimeMsg>, spec: &Arc<QuerySpec>, sub: &Arc<str>, conn: u64) {
    release(realtime, spec, sub, conn, false);
}

/// The next frame queued on `rx`.
async fn next_frame(rx: &mut OutboxReceiver) -> serde_json::Value {
    let mut batch = std::collections::VecDeque::new();
    rx.recv(&mut batch).await;
    assert_eq!(batch.len(), 1, "one frame at a time here: {batch:?}");
    serde_json::from_slice(&batch[0]).unwrap()
}

/// Waits until the root runs `n` type actors. An idle type actor's report to the root is a
/// message of its own, after the unsubscribe that emptied it: there is nothing to await but
/// the root's count.
async fn until_type_actors(realtime: &ActorRef<RealtimeMsg>, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let running = ractor::call!(realtime, RealtimeMsg::TypeActors).unwrap();
        if running == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{running} type actors, expected {n}"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_type_actor_stops_with_its_last_live_query() {
    let realtime = root(100).await;
    let types: Vec<_> = (0..20).map(|i| spec(&format!("t{i}"))).collect();
    let mut subs = Vec::new();
    for (conn, spec) in types.iter().enumerate() {
        let (answer, rx) = subscribe(&realtime, spec, conn as u64).await;
        subs.push((answer.unwrap(), rx));
    }
    until_type_actors(&realtime, 20).await;
    for (conn, (spec, (sub, _))) in types.iter().zip(&subs).enumerate() {
        unsubscribe(&realtime, spec, sub, conn as u64);
    }
    until_type_actors(&realtime, 0).await;
    assert_eq!(ractor::call!(realtime, RealtimeMsg::Stats).unwrap(), (0, 0));

    // A type comes back: a fresh actor serves it.
    let (answer, _rx) = subscribe(&realtime, &types[3], 99).await;
    answer.unwrap();
    until_type_actors(&realtime, 1).await;
    assert_eq!(ractor::call!(realtime, RealtimeMsg::Stats).unwrap(), (1, 1));
    realtime.stop(None);
}

/// A subscription the node refuses (too many live queries) leaves no type actor behind.
#[tokio::test]
async fn a_refused_subscription_leaves_no_type_actor() {
    let realtime = root(1).await;
    let (first, _rx) = subscribe(&realtime, &spec("kept"), 1).await;
    first.unwrap();
    for i in 0..10 {
        let (refused, _rx) = subscribe(&realtime, &spec(&format!("r{i}")), 2).await;
        assert!(refused.is_err());
    }
    until_type_actors(&realtime, 1).await;
    realtime.stop(None);
}

/// Subscriptions racing the last unsubscribe of their type are all answered: none is lost to
/// a type actor stopping under it.
#[tokio::test]
async fn subscriptions_racing_an_idle_type_are_all_answered() {
    let realtime = root(100).await;
    let posts = spec("posts");
    for round in 0..50u64 {
        let (answer, _rx) = subscribe(&realtime, &posts, round).await;
        unsubscribe(&realtime, &posts, &answer.unwrap(), round);
        // Sent right behind the unsubscribe: it may reach the type actor before or after the
        // actor reports itself idle.
        let (answer, _rx) = subscribe(&realtime, &posts, 1000 + round).await;
        unsubscribe(&realtime, &posts, &answer.unwrap(), 1000 + round);
    }
    until_type_actors(&realtime, 0).await;
    realtime.stop(None);
}

/// A live query that fails past its restart budget ends its subscription; the client subscribes
/// again and gets a new one. Its late `unsub` of the ended one must not release the new one.
#[tokio::test]
async fn unsubscribing_an_ended_subscription_leaves_its_successor_alone() {
    let realtime = root(100).await;
    let posts = spec("posts");
    let (ended, mut rx) = subscribe(&realtime, &posts, 1).await;
    let ended = ended.unwrap();
    assert_eq!(next_frame(&mut rx).await["re"], 1);
    loop {
        realtime
            .cast(RealtimeMsg::CrashQuery((*posts).clone()))
            .unwrap();
        let frame = next_frame(&mut rx).await;
        match frame["event"].as_str() {
            // Restarted: crash the new instance.
            Some("reset") => continue,
            Some("error") => {
                assert_eq!(frame["error"]["code"], "subscription_failed", "{frame}");
                break;
            }
            _ => panic!("unexpected frame {frame}"),
        }
    }
    let (again, _rx) = subscribe(&realtime, &posts, 1).await;
    let again = again.unwrap();
    assert_ne!(again, ended);
    unsubscribe(&realtime, &posts, &ended, 1);
    // Stats asks the type actor after the root forwarded the unsub to it: handled in order.
    assert_eq!(ractor::call!(realtime, RealtimeMsg::Stats).unwrap(), (1, 1));
    realtime.stop(None);
}

/// A live query its last subscriber left by `unsub` stops at once; one whose last subscriber's
/// connection ended lingers for a resume. So subscribing and unsubscribing in a loop does not
/// leave a lingering live query behind each time.
#[tokio::test]
async fn only_a_connection_that_ended_leaves_its_live_query_lingering() {
    let realtime = root_with(Arc::new(Fixed(Vec::new())), 100, Duration::from_secs(3600)).await;
    let (posts, notes) = (spec("posts"), spec("notes"));
    let (unsubscribed, _rx1) = subscribe(&realtime, &posts, 1).await;
    let (disconnected, _rx2) = subscribe(&realtime, &notes, 2).await;
    assert_eq!(ractor::call!(realtime, RealtimeMsg::Stats).unwrap(), (2, 2));
    unsubscribe(&realtime, &posts, &unsubscribed.unwrap(), 1);
    release(&realtime, &notes, &disconnected.unwrap(), 2, true);
    // Stats asks the type actors after the root forwarded the releases to them.
    assert_eq!(ractor::call!(realtime, RealtimeMsg::Stats).unwrap(), (1, 0));
    realtime.stop(None);
}

/// A node running half its `max_live_queries` or more lets no live query linger: queries kept
/// for clients that may come back never take the room of live ones.
#[tokio::test]
async fn a_node_half_full_of_live_queries_lets_none_linger() {
    let realtime = root_with(Arc::new(Fixed(Vec::new())), 4, Duration::from_secs(3600)).await;
    let (posts, notes) = (spec("posts"), spec("notes"));
    let (first, _rx1) = subscribe(&realtime, &posts, 1).await;
    let (second, _rx2) = subscribe(&realtime, &notes, 2).await;
    assert_eq!(ractor::call!(realtime, RealtimeMsg::Stats).unwrap(), (2, 2));
    release(&realtime, &posts, &first.unwrap(), 1, true);
    assert_eq!(ractor::call!(realtime, RealtimeMsg::Stats).unwrap(), (1, 1));
    // One live query of four: room for a lingering one again.
    release(&realtime, &notes, &second.unwrap(), 2, true);
    assert_eq!(ractor::call!(realtime, RealtimeMsg::Stats).unwrap(), (1, 0));
    realtime.stop(None);
}

/// Each query's first load answers at once with `docs`; every later one (a refill, a reload)
/// waits until the test opens `gate`.
#[derive(Debug)]
struct Gated {
    docs: Vec<Document>,
    loads: AtomicUsize,
    gate: Arc<Semaphore>,
}

impl SnapshotSource for Gated {
    fn load(&self, _spec: Arc<QuerySpec>, _budget: usize) -> BoxFuture<Result<Snapshot, String>> {
        let first = self.loads.fetch_add(1, Ordering::SeqCst) == 0;
        let (docs, gate) = (self.docs.clone(), self.gate.clone());
        Box::pin(async move {
            if !first {
                let _open = gate.acquire().await.unwrap();
            }
            Ok(snapshot_of(docs))
        })
    }
}

/// A live query whose refill waits on a slow load holds only a few of the tree's pages in
/// flight, so the feed goes on (here: a budget of 64 pages never runs out over 100 pages);
/// once the load returns, the query reloads and resets its subscriber, as it skipped pages.
#[tokio::test]
async fn a_slow_live_query_does_not_hold_up_the_feed() {
    let (first, second) = (doc_by(ALICE, 1, json!({})), doc_by(ALICE, 2, json!({})));
    let gate = Arc::new(Semaphore::new(0));
    let source = Gated {
        docs: vec![first.clone(), second.clone()],
        loads: AtomicUsize::new(0),
        gate: gate.clone(),
    };
    let realtime = root_with(Arc::new(source), 100, Duration::ZERO).await;
    let request: QueryRequest =
        serde_json::from_value(json!({"type": "posts", "limit": 1})).unwrap();
    let limited = Arc::new(QuerySpec::parse(&request, ALICE, QueryLimits::default()).unwrap());
    let (sub, mut rx) = subscribe(&realtime, &limited, 1).await;
    sub.unwrap();
    let reply = next_frame(&mut rx).await;
    assert_eq!(reply["re"], 1, "{reply}");

    let budget = Arc::new(Semaphore::new(64));
    // Both deleted, the one past the window first: the window is empty and knows nothing past
    // it, so it refills from a load, which waits.
    let shown = reply["docs"][0]["id"].clone();
    let (other, shown) = if shown == json!(first.id) {
        (&second, &first)
    } else {
        (&first, &second)
    };
    let deletes = vec![delete(other, 150, 1), delete(shown, 151, 2)];
    route(&realtime, &budget, deletes, Cursor::new(3, 0)).await;
    for n in 0..100 {
        let mut entering = insert(&doc_by(ALICE, 10 + n, json!({})), 152 + n as u64, 1);
        entering.cursor = Cursor::new(3 + n as i64, 1);
        route(
            &realtime,
            &budget,
            vec![entering],
            Cursor::new(4 + n as i64, 0),
        )
        .await;
    }
    gate.add_permits(1);
    let reset = tokio::time::timeout(Duration::from_secs(10), async {
        let mut batch = std::collections::VecDeque::new();
        loop {
            rx.recv(&mut batch).await;
            for frame in batch.drain(..) {
                let frame: serde_json::Value = serde_json::from_slice(&frame).unwrap();
                if frame["event"] == "reset" {
                    return frame;
                }
            }
        }
    })
    .await
    .expect("the lagging query reloads and resets its subscriber");
    assert_eq!(reset["docs"].as_array().map(Vec::len), Some(1), "{reset}");
    realtime.stop(None);
}

/// Two certificates that expire with no change routed between them: the second expiry's events
/// are numbered after the first's, so a client that resumed from the first one's event still
/// gets the second's (with one shared position, it counted them as seen and never learnt).
#[tokio::test]
async fn a_second_expiry_with_no_change_between_reaches_a_client_resumed_after_the_first() {
    let holders_of =
        |cert_type: &str| json!({"read": {"allow": [[{"issuer": ALICE, "type": cert_type}]]}});
    let (first, second) = (
        doc_by(ALICE, 1, holders_of("a")),
        doc_by(ALICE, 2, holders_of("b")),
    );
    let now = Utc::now();
    let held = |n: u128, cert_type: &str, ms: i64| Certificate {
        id: uuid::Uuid::from_u128(n),
        issuer: ALICE.into(),
        subject: BOB.into(),
        cert_type: cert_type.into(),
        expires_at: Some(now + chrono::Duration::milliseconds(ms)),
    };
    // The second expiry comes well after the first, so the resume below falls between them.
    let book = CertificateBook::new([held(90, "a", 1_000), held(91, "b", 4_000)], now);
    let source = Fixed(vec![first.clone(), second.clone()]);
    let realtime = root_holding(Arc::new(source), 100, Duration::ZERO, book).await;
    let request: QueryRequest =
        serde_json::from_value(json!({"type": "posts", "global": true})).unwrap();
    let global = Arc::new(QuerySpec::parse(&request, BOB, QueryLimits::default()).unwrap());
    let (sub, mut watching) = subscribe_as(&realtime, &global, 1, BOB, None).await;
    sub.unwrap();
    let reply = next_frame(&mut watching).await;
    assert_eq!(reply["docs"].as_array().map(Vec::len), Some(2), "{reply}");

    let expired = next_frame(&mut watching).await;
    assert_eq!(
        (&expired["event"], &expired["id"]),
        (&json!("remove"), &json!(first.id)),
        "{expired}"
    );
    let since: Cursor = expired["cursor"].as_str().unwrap().parse().unwrap();
    let (sub, mut resumed) = subscribe_as(&realtime, &global, 2, BOB, Some(since)).await;
    sub.unwrap();
    let reply = next_frame(&mut resumed).await;
    assert_eq!(
        reply["resumed"], true,
        "the resume came before the second expiry: {reply}"
    );

    let expired = next_frame(&mut watching).await;
    assert_eq!(
        (&expired["event"], &expired["id"]),
        (&json!("remove"), &json!(second.id)),
        "{expired}"
    );
    let later: Cursor = expired["cursor"].as_str().unwrap().parse().unwrap();
    assert!(later > since, "{later} after {since}");
    // Both frames are queued in the same turn of the live query: the first one's arrival means
    // the resumed connection's is queued already, if it was sent at all.
    let missed = tokio::time::timeout(Duration::from_secs(5), next_frame(&mut resumed))
        .await
        .expect("the resumed client gets the second expiry's remove");
    assert_eq!(missed, expired);
    realtime.stop(None);
}

/// The windows of a node's live queries keep a bounded number of bytes together: past it a new
/// distinct query is refused (each would keep a copy of its documents: one client's many
/// distinct queries could hold gigabytes), while subscribing to a running one goes on; once a
/// query stops, its bytes are given back.
#[tokio::test]
async fn live_queries_keep_a_bounded_number_of_bytes_together() {
    let docs: Vec<Document> = (1..=3).map(|n| doc_by(ALICE, n, json!({}))).collect();
    let mut config = config(Arc::new(Fixed(docs)), 100, Duration::ZERO);
    config.max_live_bytes = 1;
    let live_bytes = config.live_bytes.clone();
    let realtime = Actor::spawn(
        None,
        Realtime,
        (config, Cursor::new(2, 0), Default::default()),
    )
    .await
    .unwrap()
    .0;
    let posts = spec("posts");
    let (first, mut rx) = subscribe(&realtime, &posts, 1).await;
    let first = first.unwrap();
    assert_eq!(
        next_frame(&mut rx).await["docs"].as_array().map(Vec::len),
        Some(3)
    );
    assert!(
        live_bytes.load(Ordering::Relaxed) > 0,
        "the window's bytes are counted"
    );

    let (refused, _) = subscribe(&realtime, &spec("notes"), 2).await;
    let refused = refused.unwrap_err();
    assert!(refused.contains("bytes"), "{refused}");
    let (shared, _) = subscribe(&realtime, &posts, 3).await;
    let shared = shared.unwrap();
    assert_eq!(shared, first, "a running query is shared, not refused");

    unsubscribe(&realtime, &posts, &first, 1);
    unsubscribe(&realtime, &posts, &shared, 3);
    until_type_actors(&realtime, 0).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while live_bytes.load(Ordering::Relaxed) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stopped query's bytes are given back"
        );
        tokio::task::yield_now().await;
    }
    let (admitted, _) = subscribe(&realtime, &spec("notes"), 4).await;
    admitted.unwrap();
    realtime.stop(None);
}

/// Routes one page as the feed reader does, with a permit of `budget`: the test fails if none is
/// free.
async fn route(
    realtime: &ActorRef<RealtimeMsg>,
    budget: &Arc<Semaphore>,
    changes: Vec<Change>,
    position: Cursor,
) {
    let permit = budget
        .clone()
        .try_acquire_owned()
        .expect("the feed has a page permit free");
    ractor::call!(realtime, |done| RealtimeMsg::Changes(
        changes,
        position,
        InFlight::new(permit),
        done
    ))
    .unwrap();
}

/// A document-type actor that fails takes its live queries down with it: their subscribers get
/// `subscription_failed`, and their places in `query.max_live_queries` come back (before, the
/// node refused every new distinct query once as many had been lost so).
#[tokio::test]
async fn a_failed_type_actor_gives_back_its_queries_places() {
    let realtime = root(1).await;
    let (first, mut rx) = subscribe(&realtime, &spec("posts"), 1).await;
    first.unwrap();
    assert_eq!(next_frame(&mut rx).await["docs"], json!([]));
    realtime
        .cast(RealtimeMsg::CrashType("posts".into()))
        .unwrap();
    let ended = next_frame(&mut rx).await;
    assert_eq!(ended["error"]["code"], "subscription_failed", "{ended}");
    until_type_actors(&realtime, 0).await;
    let (second, _rx) = subscribe(&realtime, &spec("notes"), 2).await;
    assert!(second.is_ok(), "the place came back: {second:?}");
    realtime.stop(None);
}
