//! The live-query task driven directly: no sockets, no database (the snapshot comes from
//! memory), no sleeps — replies and events are read off the subscribers' outboxes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use std::sync::Arc;

use chrono::Utc;
use common::{delete, insert};
use serde_json::{Value, json};
use uuid::Uuid;
use vibe_actors::certs::{Certificate, CertificateBook};
use vibe_actors::change::{Change, Cursor, SnapshotView};
use vibe_actors::live_query::{
    BoxFuture, CredentialsMsg, LiveQueryArgs, LiveQueryMsg, LiveQueryRef, ReplayLimit, ResyncMsg,
    Snapshot, SnapshotSource, Subscriber,
};
use vibe_actors::outbox::{Gate, OutboxReceiver, QueueLimit, outbox};
use vibe_actors::query::{QueryLimits, QueryRequest, QuerySpec};
use vibe_actors::wire::Document;

const OWNER: &str = "did:key:zOwner";
const ALICE: &str = "did:key:zAlice";
const BOB: &str = "did:key:zBob";

/// A snapshot held in memory: these documents, as seen by a snapshot where xids below 100 are
/// committed.
#[derive(Debug)]
struct Memory(Vec<Document>, Cursor);

impl SnapshotSource for Memory {
    fn load(&self, _spec: Arc<QuerySpec>, _budget: usize) -> BoxFuture<Result<Snapshot, String>> {
        let (docs, settled) = (self.0.clone(), self.1);
        Box::pin(async move {
            Ok(Snapshot {
                docs,
                cut: false,
                view: SnapshotView::parse("100:100:").unwrap(),
                settled,
            })
        })
    }
}

fn doc(n: u128, acl: Value) -> Document {
    common::doc_by(OWNER, n, acl)
}

/// Asserts `frame` is a `reset` to a window of `docs` documents.
fn assert_reset_with(frame: &Value, docs: usize) {
    assert_eq!(
        (
            frame["event"].as_str(),
            frame["docs"].as_array().map(Vec::len)
        ),
        (Some("reset"), Some(docs)),
        "{frame}"
    );
}

fn next(rx: &mut OutboxReceiver) -> Value {
    serde_json::from_slice(&rx.try_recv().expect("a frame is queued")).unwrap()
}

/// A live query over `query` for `caller`, started at 2-0, whose loads return `docs` settled at
/// `settled`.
async fn start(query: Value, caller: &str, docs: Vec<Document>, settled: Cursor) -> LiveQueryRef {
    let replay = ReplayLimit {
        events: 16,
        bytes: 1 << 20,
    };
    start_with(query, caller, docs, settled, replay).await
}

/// [`start`] with its replay buffer limited to `replay`.
async fn start_with(
    query: Value,
    caller: &str,
    docs: Vec<Document>,
    settled: Cursor,
    replay: ReplayLimit,
) -> LiveQueryRef {
    let request: QueryRequest = serde_json::from_value(query).unwrap();
    let limits = QueryLimits {
        default_limit: 10,
        max_limit: 10,
        ..QueryLimits::default()
    };
    let spec = QuerySpec::parse(&request, caller, limits).unwrap();
    let args = LiveQueryArgs {
        spec: Arc::new(spec),
        sub_id: Arc::from("q1"),
        start: Cursor::new(2, 0),
        resync: Vec::new(),
        source: Arc::new(Memory(docs, settled)),
        replay,
        window_bytes: 1 << 20,
        live_bytes: Arc::default(),
        book: Default::default(),
    };
    vibe_actors::live_query::start(args, |_| {})
}

/// Subscribes connection `conn` as `caller` (request id = `conn`) and returns its outbox.
async fn subscribe(
    actor: &LiveQueryRef,
    conn: u64,
    caller: &str,
    since: Option<Cursor>,
    position: Cursor,
) -> OutboxReceiver {
    let (out, rx) = outbox(conn, QueueLimit::frames(16));
    let subscriber = Subscriber {
        outbox: out,
        caller: caller.into(),
        gate: Default::default(),
        seen_up_to: None,
    };
    let sub = actor
        .subscribe(Arc::new(subscriber), json!(conn), since, position)
        .await
        .unwrap();
    assert_eq!(&*sub, "q1");
    rx
}

/// Hands the actor one page and waits until it was handled (its in-flight permit came back).
async fn feed_page(actor: &LiveQueryRef, changes: Vec<Change>, position: Cursor) {
    let budget = Arc::new(tokio::sync::Semaphore::new(1));
    let permit = budget.clone().acquire_owned().await.unwrap();
    let in_flight = vibe_actors::realtime::InFlight::new(permit);
    // The whole page: these tests exercise the live query, not the type actor's routing.
    let all = (0..changes.len() as u32).collect();
    actor
        .cast(LiveQueryMsg::changes(
            Arc::from(changes),
            all,
            position,
            in_flight,
        ))
        .unwrap();
    let _handled = budget.acquire().await.unwrap();
}

#[tokio::test]
async fn snapshot_events_acl_and_snapshot_skipping() {
    let public = json!({"read": {"allow": ["*"]}});
    let loaded = doc(1, public.clone());
    let query = json!({"type": "posts", "global": true, "limit": 10});
    let actor = start(query, ALICE, vec![loaded.clone()], Cursor::new(2, 0)).await;
    let mut alice = subscribe(&actor, 1, ALICE, None, Cursor::new(2, 0)).await;
    let mut bob = subscribe(&actor, 2, BOB, None, Cursor::new(2, 0)).await;
    let reply = next(&mut alice);
    assert_eq!(
        (reply["re"].clone(), reply["docs"][0]["id"].clone()),
        (json!(1), json!(loaded.id))
    );
    assert_eq!(next(&mut bob)["docs"].as_array().unwrap().len(), 1);

    // A change the snapshot already saw (xid 50 < xmin 100) is not applied twice; a document
    // denied to Bob reaches Alice only; a private one reaches nobody.
    let denied = doc(2, json!({"read": {"allow": ["*"], "deny": [BOB]}}));
    let open = doc(4, public.clone());
    let page = vec![
        insert(&doc(9, public.clone()), 50, 1),
        insert(&denied, 101, 2),
        insert(&doc(3, json!({})), 102, 3),
        insert(&open, 103, 4),
    ];
    feed_page(&actor, page, Cursor::new(3, 0)).await;

    let a1 = next(&mut alice);
    let a2 = next(&mut alice);
    assert_eq!(
        (a1["event"].clone(), a1["doc"]["id"].clone()),
        (json!("add"), json!(denied.id))
    );
    assert_eq!(
        (a2["event"].clone(), a2["doc"]["id"].clone()),
        (json!("add"), json!(open.id))
    );
    assert!(alice.try_recv().is_none(), "nothing else for Alice");
    let b1 = next(&mut bob);
    assert_eq!(b1["doc"]["id"], json!(open.id));
    assert!(
        bob.try_recv().is_none(),
        "Bob never sees the denied document"
    );
    // Encoded once: the same event reaches both as the same bytes.
    assert_eq!(a2, b1);
    actor.stop();
}

/// A freshly loaded live query cannot vouch for a cursor from before its snapshot settled: the
/// snapshot may have absorbed changes after it, which then produce no events.
#[tokio::test]
async fn a_resume_from_before_the_snapshot_settled_gets_a_fresh_snapshot() {
    let docs = vec![doc(1, json!({}))];
    let actor = start(json!({"type": "posts"}), OWNER, docs, Cursor::new(5, 0)).await;
    let mut outboxes = Vec::new();
    for (conn, since, resumed) in [(1, Cursor::new(3, 7), false), (2, Cursor::new(5, 0), true)] {
        let mut rx = subscribe(&actor, conn, OWNER, Some(since), Cursor::new(2, 0)).await;
        let reply = next(&mut rx);
        assert_eq!(reply["resumed"], json!(resumed), "since {since}: {reply}");
        outboxes.push(rx);
    }
    // A change after the live query's position that its snapshot did not see, at a cursor
    // before both clients' `since`: news to the one that got a fresh snapshot, already seen by
    // the one that resumed.
    let later = doc(2, json!({}));
    feed_page(&actor, vec![insert(&later, 150, 3)], Cursor::new(3, 0)).await;
    let event = next(&mut outboxes[0]);
    assert_eq!(
        (event["event"].as_str(), &event["doc"]["id"]),
        (Some("add"), &json!(later.id))
    );
    assert!(outboxes[1].try_recv().is_none());
    actor.stop();
}

/// A client that resumed from a cursor this node has not reached yet (it came from a node
/// further ahead) skips events up to it. A refill of a limited window at such a cursor may have
/// absorbed changes it has not seen: it gets a `reset` with the window, not a silent skip.
#[tokio::test]
async fn a_refill_resets_a_subscriber_resumed_from_further_ahead() {
    let (first, second) = (doc(1, json!({})), doc(2, json!({})));
    let query = json!({"type": "posts", "limit": 1});
    let actor = start(
        query,
        OWNER,
        vec![first.clone(), second.clone()],
        Cursor::new(2, 0),
    )
    .await;
    let mut here = subscribe(&actor, 1, OWNER, None, Cursor::new(2, 0)).await;
    let reply = next(&mut here);
    let shown = [&first, &second]
        .into_iter()
        .find(|d| reply["docs"][0]["id"] == json!(d.id))
        .expect("the window shows one of them");
    let mut ahead = subscribe(&actor, 2, OWNER, Some(Cursor::new(4, 0)), Cursor::new(2, 0)).await;
    assert_eq!(next(&mut ahead)["resumed"], true);
    // Both documents are deleted, the one known past the window first: the window is empty
    // and knows nothing past it, so it refills from a load.
    let other = if shown.id == first.id {
        &second
    } else {
        &first
    };
    feed_page(
        &actor,
        vec![delete(other, 149, 1), delete(shown, 150, 2)],
        Cursor::new(3, 0),
    )
    .await;
    let removed = next(&mut here);
    assert_eq!(removed["event"], "remove", "{removed}");
    assert_reset_with(&next(&mut ahead), 1);
    assert!(ahead.try_recv().is_none());
    // From then on it follows like any other subscriber: a newer document enters.
    let third = doc(3, json!({}));
    let mut entering = insert(&third, 151, 3);
    entering.cursor = Cursor::new(3, 2);
    feed_page(&actor, vec![entering], Cursor::new(4, 0)).await;
    let added = next(&mut ahead);
    assert_eq!(
        (added["event"].as_str(), &added["doc"]["id"]),
        (Some("add"), &json!(third.id))
    );
    actor.stop();
}

/// One change, two events (a document enters a full window and pushes another out): each has its
/// own position, and a client that got only the first resumes with exactly the second.
#[tokio::test]
async fn events_of_one_change_have_their_own_positions() {
    let older = doc(1, json!({}));
    let query = json!({"type": "posts", "limit": 1});
    let actor = start(query, OWNER, vec![older.clone()], Cursor::new(2, 0)).await;
    let mut first = subscribe(&actor, 1, OWNER, None, Cursor::new(2, 0)).await;
    next(&mut first);
    feed_page(
        &actor,
        vec![insert(&doc(2, json!({})), 101, 5)],
        Cursor::new(3, 0),
    )
    .await;
    let added = next(&mut first);
    let pushed_out = next(&mut first);
    assert_eq!(
        (added["event"].as_str(), added["cursor"].as_str()),
        (Some("add"), Some("2-5"))
    );
    assert_eq!(
        (pushed_out["event"].as_str(), pushed_out["cursor"].as_str()),
        (Some("remove"), Some("2-5.1"))
    );

    // Got the add, lost the remove: resuming from the add's cursor replays just the remove.
    let since = Some("2-5".parse().unwrap());
    let mut back = subscribe(&actor, 2, OWNER, since, Cursor::new(2, 0)).await;
    assert_eq!(next(&mut back)["resumed"], true);
    let replayed = next(&mut back);
    assert_eq!(
        (replayed["event"].as_str(), replayed["id"].clone()),
        (Some("remove"), json!(older.id))
    );
    assert!(back.try_recv().is_none());
    actor.stop();
}

/// The replay buffer is bounded in bytes as well as in events: an event of a large document
/// that does not fit is not kept, so a resume from before it gets a fresh snapshot, while small
/// events after it are replayed.
#[tokio::test]
async fn the_replay_buffer_keeps_no_more_bytes_than_its_limit() {
    let replay = ReplayLimit {
        events: 16,
        bytes: 2_000,
    };
    let query = json!({"type": "posts"});
    let actor = start_with(query, OWNER, Vec::new(), Cursor::new(2, 0), replay).await;
    let mut large = doc(1, json!({}));
    large.data = json!({"text": "x".repeat(3_000)});
    feed_page(&actor, vec![insert(&large, 101, 1)], Cursor::new(2, 1)).await;
    let mut before = subscribe(&actor, 1, OWNER, Some(Cursor::new(2, 0)), Cursor::new(2, 1)).await;
    let reply = next(&mut before);
    assert_eq!(reply["resumed"], false, "{reply}");
    assert_eq!(reply["docs"].as_array().map(Vec::len), Some(1), "{reply}");

    let small = doc(2, json!({}));
    feed_page(&actor, vec![insert(&small, 102, 2)], Cursor::new(2, 2)).await;
    let mut after = subscribe(&actor, 2, OWNER, Some(Cursor::new(2, 1)), Cursor::new(2, 2)).await;
    assert_eq!(next(&mut after)["resumed"], true);
    let replayed = next(&mut after);
    assert_eq!(
        (replayed["event"].as_str(), &replayed["doc"]["id"]),
        (Some("add"), &json!(small.id))
    );
    actor.stop();
}

/// A page of the feed that ends at a change which made two events: a subscriber that arrives
/// then is replied at the second, so resuming from its reply replays nothing of that change.
#[tokio::test]
async fn a_reply_after_a_two_event_change_is_positioned_after_both() {
    let query = json!({"type": "posts", "limit": 1});
    let actor = start(query, OWNER, vec![doc(1, json!({}))], Cursor::new(2, 0)).await;
    let mut first = subscribe(&actor, 1, OWNER, None, Cursor::new(2, 0)).await;
    next(&mut first);
    feed_page(
        &actor,
        vec![insert(&doc(2, json!({})), 101, 5)],
        Cursor::new(2, 5),
    )
    .await;
    let mut late = subscribe(&actor, 2, OWNER, None, Cursor::new(2, 5)).await;
    let reply = next(&mut late);
    assert_eq!(reply["cursor"], "2-5.1", "{reply}");
    let since = Some(reply["cursor"].as_str().unwrap().parse().unwrap());
    let mut back = subscribe(&actor, 3, OWNER, since, Cursor::new(2, 5)).await;
    assert_eq!(next(&mut back)["resumed"], true);
    assert!(back.try_recv().is_none(), "nothing of the change again");
    actor.stop();
}

/// After the feed skipped ahead (this node fell behind retention), a resync reloads the window
/// and every subscriber gets a `reset` at the new position.
#[tokio::test]
async fn a_resync_reloads_and_resets_every_subscriber() {
    let docs = vec![doc(1, json!({}))];
    let actor = start(json!({"type": "posts"}), OWNER, docs, Cursor::new(2, 0)).await;
    let mut rx = subscribe(&actor, 1, OWNER, None, Cursor::new(2, 0)).await;
    next(&mut rx);
    actor
        .cast(LiveQueryMsg::Resync(Box::new(ResyncMsg {
            position: Cursor::new(9, 0),
            book: Default::default(),
        })))
        .unwrap();
    // Messages are handled in order: once this subscribe returns, the resync has been handled.
    let _later = subscribe(&actor, 2, OWNER, None, Cursor::new(9, 0)).await;
    let reset = next(&mut rx);
    assert_eq!(
        (reset["event"].as_str(), reset["cursor"].as_str()),
        (Some("reset"), Some("9-0"))
    );
    assert_eq!(reset["docs"].as_array().unwrap().len(), 1);
    actor.stop();
}

/// The changes a resync skipped may have issued or revoked certificates: the reset shows each
/// subscriber what the book read again lets it see, not what the old one did.
#[tokio::test]
async fn a_resync_applies_the_certificates_read_again() {
    let friends_only = json!({"read": {"allow": [[{"issuer": OWNER, "type": "friend-of"}]]}});
    let docs = vec![doc(1, friends_only)];
    let query = json!({"type": "posts", "global": true});
    let actor = start(query, BOB, docs, Cursor::new(2, 0)).await;
    let mut rx = subscribe(&actor, 1, BOB, None, Cursor::new(2, 0)).await;
    assert_eq!(next(&mut rx)["docs"], json!([]));
    let issued = vibe_actors::certs::Certificate {
        id: Uuid::from_u128(77),
        issuer: OWNER.into(),
        subject: BOB.into(),
        cert_type: "friend-of".into(),
        expires_at: None,
    };
    let book = vibe_actors::certs::CertificateBook::new([issued], Utc::now());
    actor
        .cast(LiveQueryMsg::Resync(Box::new(ResyncMsg {
            position: Cursor::new(9, 0),
            book,
        })))
        .unwrap();
    let _later = subscribe(&actor, 2, BOB, None, Cursor::new(9, 0)).await;
    assert_reset_with(&next(&mut rx), 1);
    actor.stop();
}

/// `subject`'s certificates changed to `held` (issued by OWNER), re-evaluated after the events of
/// the change at `at`.
fn credentials(subject: &str, held: &[&str], at: Cursor) -> LiveQueryMsg {
    let certificates = held
        .iter()
        .zip(100u128..)
        .map(|(cert_type, n)| Certificate {
            id: Uuid::from_u128(n),
            issuer: OWNER.into(),
            subject: subject.into(),
            cert_type: (*cert_type).into(),
            expires_at: None,
        });
    LiveQueryMsg::Credentials(Arc::new(CredentialsMsg {
        book: CertificateBook::new(certificates, Utc::now()),
        before: CertificateBook::default(),
        subjects: vec![subject.into()],
        cursor: at.after_events(),
    }))
}

/// Replayed events are judged by the certificates held at the resume, not at the event: once
/// certificates change, a resume from before that gets a fresh snapshot if a kept event's ACL
/// tests certificates — here a `remove` that Bob, blocked since, would otherwise never get.
#[tokio::test]
async fn a_certificate_change_ends_the_replay_of_events_whose_acl_tests_certificates() {
    let unless_blocked =
        json!({"read": {"allow": ["*"], "deny": [[{"issuer": OWNER, "type": "blocked"}]]}});
    let gone = doc(1, unless_blocked);
    let query = json!({"type": "posts", "global": true});
    let actor = start(query, BOB, vec![gone.clone()], Cursor::new(2, 0)).await;
    let mut first = subscribe(&actor, 1, BOB, None, Cursor::new(2, 0)).await;
    assert_eq!(next(&mut first)["docs"][0]["id"], json!(gone.id));
    feed_page(&actor, vec![delete(&gone, 150, 1)], Cursor::new(3, 0)).await;
    assert_eq!(next(&mut first)["event"], "remove");
    actor
        .cast(credentials(BOB, &["blocked"], Cursor::new(3, 0)))
        .unwrap();
    // Bob's other connection missed the delete and resumes from before it.
    let mut second = subscribe(&actor, 2, BOB, Some(Cursor::new(2, 0)), Cursor::new(3, 0)).await;
    let reply = next(&mut second);
    assert_eq!(
        (&reply["resumed"], &reply["docs"]),
        (&json!(false), &json!([])),
        "{reply}"
    );
    actor.stop();
}

/// A shared query reloads when its caller's certificates change: the others get the difference
/// after the change's own events, and a subscriber that resumed from further ahead than the
/// reload a `reset`, as after a refill (the load may hold changes it has not seen).
#[tokio::test]
async fn a_shared_reload_resets_a_subscriber_resumed_from_further_ahead() {
    let for_bob = doc(1, json!({"read": {"allow": [BOB]}}));
    let query = json!({"type": "posts", "shared": true});
    let actor = start(query, BOB, vec![for_bob.clone()], Cursor::new(2, 0)).await;
    let mut here = subscribe(&actor, 1, BOB, None, Cursor::new(2, 0)).await;
    assert_eq!(next(&mut here)["docs"][0]["id"], json!(for_bob.id));
    let mut ahead = subscribe(&actor, 2, BOB, Some(Cursor::new(4, 0)), Cursor::new(2, 0)).await;
    assert_eq!(next(&mut ahead)["resumed"], true);
    // Deleted; then a certificate change, whose reload (the source still holds the document)
    // brings it back.
    feed_page(&actor, vec![delete(&for_bob, 150, 1)], Cursor::new(3, 0)).await;
    let removed = next(&mut here);
    assert_eq!(removed["event"], "remove", "{removed}");
    actor
        .cast(credentials(BOB, &["friend-of"], Cursor::new(2, 1)))
        .unwrap();
    let _after = subscribe(&actor, 3, BOB, None, Cursor::new(3, 0)).await;
    let added = next(&mut here);
    assert_eq!(added["event"], "add", "{added}");
    let cursor = |frame: &Value| frame["cursor"].as_str().unwrap().parse::<Cursor>().unwrap();
    assert!(
        cursor(&added) > cursor(&removed),
        "the reload's events follow the change's own: {added}"
    );
    assert_reset_with(&next(&mut ahead), 1);
    actor.stop();
}

/// A shared window holds what its caller may read by the node's certificates, not only by the
/// load's SQL: when the node drops a certificate as expired while the database's clock is behind
/// its own, the reload still returns the documents that certificate admitted — they must leave,
/// as nothing later judges them again. The source here is that database: it counts Bob's
/// `friend-of` certificate throughout.
#[tokio::test]
async fn a_shared_load_keeps_only_what_the_nodes_certificates_admit() {
    let friends_only = doc(
        1,
        json!({"read": {"allow": [[{"issuer": OWNER, "type": "friend-of"}]]}}),
    );
    let query = json!({"type": "posts", "shared": true});
    let actor = start(query, BOB, vec![friends_only.clone()], Cursor::new(2, 0)).await;
    let mut rx = subscribe(&actor, 1, BOB, None, Cursor::new(2, 0)).await;
    assert_eq!(
        next(&mut rx)["docs"],
        json!([]),
        "the node's book holds no certificate of Bob's yet"
    );
    actor
        .cast(credentials(BOB, &["friend-of"], Cursor::new(2, 1)))
        .unwrap();
    // Handled once a later subscription is answered (one mailbox, in order).
    let _handled = subscribe(&actor, 2, BOB, None, Cursor::new(2, 0)).await;
    let added = next(&mut rx);
    assert_eq!(
        (added["event"].as_str(), &added["doc"]["id"]),
        (Some("add"), &json!(friends_only.id)),
        "{added}"
    );
    // The node's clock passed the certificate's expiry; the database's has not.
    actor
        .cast(credentials(BOB, &[], Cursor::new(2, 2)))
        .unwrap();
    let _handled = subscribe(&actor, 3, BOB, None, Cursor::new(2, 0)).await;
    let removed = next(&mut rx);
    assert_eq!(
        (removed["event"].as_str(), &removed["id"]),
        (Some("remove"), &json!(friends_only.id)),
        "{removed}"
    );
    actor.stop();
}

/// Once the connection closes a subscription's gate (`unsub`, a lost permission), nothing more
/// of the live query reaches its queue: what it sent before stays ahead of the connection's own
/// next frame (the reply), and nothing comes after, however late the query learns of the end.
#[tokio::test]
async fn nothing_passes_a_closed_gate() {
    let actor = start(
        json!({"type": "posts"}),
        OWNER,
        Vec::new(),
        Cursor::new(2, 0),
    )
    .await;
    let (out, mut rx) = outbox(1, QueueLimit::frames(16));
    let gate = Gate::default();
    let subscriber = Subscriber {
        outbox: out.clone(),
        gate: gate.clone(),
        caller: OWNER.into(),
        seen_up_to: None,
    };
    actor
        .subscribe(Arc::new(subscriber), json!(1), None, Cursor::new(2, 0))
        .await
        .unwrap();
    assert_eq!(next(&mut rx)["re"], 1);
    let (before, after) = (doc(1, json!({})), doc(2, json!({})));
    feed_page(&actor, vec![insert(&before, 150, 1)], Cursor::new(3, 0)).await;
    out.close_gate(&gate);
    out.send(bytes::Bytes::from_static(br#"{"re":2,"ok":true}"#))
        .unwrap();
    let mut late = insert(&after, 151, 1);
    late.cursor = Cursor::new(3, 1);
    feed_page(&actor, vec![late], Cursor::new(4, 0)).await;
    let added = next(&mut rx);
    assert_eq!(
        (added["event"].as_str(), &added["doc"]["id"]),
        (Some("add"), &json!(before.id))
    );
    assert_eq!(next(&mut rx)["re"], 2);
    assert!(rx.try_recv().is_none(), "nothing after the reply");
    actor.stop();
}
