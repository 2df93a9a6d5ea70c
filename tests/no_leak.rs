//! No leaks, no losses: users with live subscriptions (a global one and their own) while a
//! seeded random workload creates, rewrites and deletes documents, changes their ACLs (`*`,
//! DIDs and certificate predicates in allow and deny) and issues and revokes certificates.
//! Against a model of the same workload:
//! - every document revision a subscriber receives is one the model let that subscriber see at
//!   some moment (nothing is ever revealed that the ACL did not allow);
//! - every revision the model made visible to a subscriber when it was written is delivered;
//! - at the end each subscriber's view (snapshot plus events) equals what it may see.
//!
//! Three subscriptions per user: global (public documents, per-subscriber denies), shared
//! (others' documents allowed to the user by DID or certificate) and own.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use std::collections::{BTreeMap, BTreeSet};

use chrono::{Duration, Utc};
use common::{TestServer, Ws};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use uuid::Uuid;
use vibe::acl::{Acl, HeldCertificates, Operation};

const USERS: [&str; 5] = [
    "did:key:zNia",
    "did:key:zOla",
    "did:key:zPim",
    "did:key:zQuy",
    "did:key:zRex",
];
const TYPES: [&str; 2] = ["friend-of", "blocked"];
const OPS: usize = 2000;

struct Model {
    /// id → (owner, acl, rev)
    docs: BTreeMap<Uuid, (usize, Acl, i64)>,
    /// certificate id → (issuer, subject, type)
    certs: BTreeMap<Uuid, (usize, usize, usize)>,
}

impl Model {
    fn held(&self, user: usize) -> HeldCertificates {
        HeldCertificates(
            self.certs
                .values()
                .filter(|(_, s, _)| *s == user)
                .map(|(i, _, t)| (USERS[*i].to_owned(), TYPES[*t].to_owned()))
                .collect(),
        )
    }

    /// What `user`'s global subscription may hold now: public documents not denied to them.
    fn global_view(&self, user: usize) -> BTreeSet<(Uuid, i64)> {
        let held = self.held(user);
        self.docs
            .iter()
            .filter(|(_, (owner, acl, _))| {
                acl.is_public()
                    && acl.allows(Operation::Read, Some(USERS[user]), USERS[*owner], &held)
            })
            .map(|(id, (_, _, rev))| (*id, *rev))
            .collect()
    }

    /// What `user`'s shared subscription may hold now: others' non-public documents it may read.
    fn shared_view(&self, user: usize) -> BTreeSet<(Uuid, i64)> {
        let held = self.held(user);
        self.docs
            .iter()
            .filter(|(_, (owner, acl, _))| {
                *owner != user
                    && !acl.is_public()
                    && acl.allows(Operation::Read, Some(USERS[user]), USERS[*owner], &held)
            })
            .map(|(id, (_, _, rev))| (*id, *rev))
            .collect()
    }

    fn own_view(&self, user: usize) -> BTreeSet<(Uuid, i64)> {
        self.docs
            .iter()
            .filter(|(_, (owner, _, _))| *owner == user)
            .map(|(id, (_, _, rev))| (*id, *rev))
            .collect()
    }
}

fn random_entry(rng: &mut StdRng) -> Value {
    match rng.random_range(0..3) {
        0 => json!(USERS[rng.random_range(0..USERS.len())]),
        _ => {
            json!([{"issuer": USERS[rng.random_range(0..USERS.len())], "type": TYPES[rng.random_range(0..TYPES.len())]}])
        }
    }
}

fn random_acl(rng: &mut StdRng) -> Value {
    let mut allow: Vec<Value> = Vec::new();
    if rng.random_bool(0.6) {
        allow.push(json!("*"));
    }
    for _ in 0..rng.random_range(0..3) {
        allow.push(random_entry(rng));
    }
    let deny: Vec<Value> = (0..rng.random_range(0..3))
        .map(|_| random_entry(rng))
        .collect();
    json!({"read": {"allow": allow, "deny": deny}})
}

/// A subscriber's state: its view and every (id, rev) it received in an add or change.
#[derive(Default)]
struct Seen {
    view: BTreeMap<Uuid, i64>,
    received: BTreeSet<(Uuid, i64)>,
}

impl Seen {
    fn apply(&mut self, event: &Value) {
        match event["event"].as_str().unwrap() {
            "add" | "change" => {
                let id = event["doc"]["id"].as_str().unwrap().parse().unwrap();
                let rev = event["doc"]["rev"].as_i64().unwrap();
                self.view.insert(id, rev);
                self.received.insert((id, rev));
            }
            "remove" => {
                self.view
                    .remove(&event["id"].as_str().unwrap().parse().unwrap());
            }
            other => panic!("unexpected event {other}: {event}"),
        }
    }
}

#[tokio::test]
async fn subscribers_see_exactly_what_they_may_read() {
    let s = TestServer::start_with(&[("ws.outbound_queue", "100000")]).await;
    let pool = s.sql().await;
    let tokens: Vec<String> = USERS
        .iter()
        .map(|u| s.token(u, &["read:notes", "write:notes"]))
        .collect();
    let mut sockets = Vec::new();
    let mut subs = Vec::new();
    for t in &tokens {
        let mut ws = Ws::connect(&s.base, Some(t)).await;
        let global = ws
            .request(json!({"op": "read", "type": "notes", "global": true, "limit": 1000}))
            .await;
        assert_eq!(global["ok"], true, "{global}");
        let own = ws
            .request(json!({"op": "read", "type": "notes", "limit": 1000}))
            .await;
        let shared = ws
            .request(json!({"op": "read", "type": "notes", "shared": true, "limit": 1000}))
            .await;
        assert_eq!(shared["ok"], true, "{shared}");
        subs.push((
            global["sub"].clone(),
            own["sub"].clone(),
            shared["sub"].clone(),
        ));
        sockets.push(ws);
    }

    let mut rng = StdRng::seed_from_u64(0x05ee_dac1);
    let mut model = Model {
        docs: BTreeMap::new(),
        certs: BTreeMap::new(),
    };
    // (user, id, rev) the model made visible when the revision was written (or granted).
    let mut ever_global: Vec<BTreeSet<(Uuid, i64)>> = vec![BTreeSet::new(); USERS.len()];
    let mut must_deliver: Vec<BTreeSet<(Uuid, i64)>> = vec![BTreeSet::new(); USERS.len()];
    let mut ever_shared: Vec<BTreeSet<(Uuid, i64)>> = vec![BTreeSet::new(); USERS.len()];
    let mut must_deliver_shared: Vec<BTreeSet<(Uuid, i64)>> = vec![BTreeSet::new(); USERS.len()];
    let mut history: Vec<String> = Vec::new();
    for _ in 0..OPS {
        let roll = rng.random_range(0..100);
        let mut written: Option<(Uuid, i64)> = None;
        if roll < 30 || model.docs.is_empty() {
            let owner = rng.random_range(0..USERS.len());
            let acl = random_acl(&mut rng);
            let doc = s
                .post(
                    &tokens[owner],
                    "notes",
                    json!({"data": {"n": rng.random::<u32>()}, "acl": acl}),
                )
                .await;
            let id: Uuid = doc["id"].as_str().unwrap().parse().unwrap();
            let rev = doc["rev"].as_i64().unwrap();
            history.push(format!("create {id} rev {rev} owner {owner} acl {acl}"));
            model
                .docs
                .insert(id, (owner, serde_json::from_value(acl).unwrap(), rev));
            written = Some((id, rev));
        } else if roll < 75 {
            let ids: Vec<Uuid> = model.docs.keys().copied().collect();
            let id = ids[rng.random_range(0..ids.len())];
            let (owner, acl, _) = model.docs[&id].clone();
            let acl = if rng.random_bool(0.5) {
                random_acl(&mut rng)
            } else {
                serde_json::to_value(&acl).unwrap()
            };
            let r = s
                .client
                .put(s.url(&format!("/v1/docs/notes/{id}")))
                .bearer_auth(&tokens[owner])
                .json(&json!({"data": {"n": rng.random::<u32>()}, "acl": acl}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let rev = r.json::<Value>().await.unwrap()["rev"].as_i64().unwrap();
            history.push(format!("update {id} rev {rev} owner {owner} acl {acl}"));
            model
                .docs
                .insert(id, (owner, serde_json::from_value(acl).unwrap(), rev));
            written = Some((id, rev));
        } else if roll < 82 {
            let ids: Vec<Uuid> = model.docs.keys().copied().collect();
            let id = ids[rng.random_range(0..ids.len())];
            let owner = model.docs[&id].0;
            let r = s
                .client
                .delete(s.url(&format!("/v1/docs/notes/{id}")))
                .bearer_auth(&tokens[owner])
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 204);
            model.docs.remove(&id);
        } else if roll < 93 || model.certs.is_empty() {
            // Certificates go in as the server stores them; the realtime tree reads them from
            // the feed like any write.
            let (issuer, subject, t) = (
                rng.random_range(0..USERS.len()),
                rng.random_range(0..USERS.len()),
                rng.random_range(0..TYPES.len()),
            );
            let id = Uuid::now_v7();
            sqlx::query(
                "INSERT INTO documents (id, owner_did, type, acl, data) VALUES ($1, $2, 'vibe.certificate', $3, $4)",
            )
            .bind(id)
            .bind(USERS[issuer])
            .bind(json!({"read": {"allow": [USERS[subject]]}}))
            .bind(json!({"subject": USERS[subject], "type": TYPES[t], "expires_at": Utc::now() + Duration::days(1)}))
            .execute(&pool)
            .await
            .unwrap();
            history.push(format!("cert {id} {issuer} -> {subject} {}", TYPES[t]));
            model.certs.insert(id, (issuer, subject, t));
        } else {
            let ids: Vec<Uuid> = model.certs.keys().copied().collect();
            let id = ids[rng.random_range(0..ids.len())];
            sqlx::query("DELETE FROM documents WHERE id = $1")
                .bind(id)
                .execute(&pool)
                .await
                .unwrap();
            history.push(format!("uncert {id}"));
            model.certs.remove(&id);
        }
        for u in 0..USERS.len() {
            let after = model.global_view(u);
            if let Some(w) = written
                && after.contains(&w)
            {
                must_deliver[u].insert(w);
            }
            // Access gained without a write (an ACL or certificate change) is delivered as an
            // add of the current revision: allowed, not required beyond the final view.
            ever_global[u].extend(after);
            let shared = model.shared_view(u);
            if let Some(w) = written
                && shared.contains(&w)
            {
                must_deliver_shared[u].insert(w);
            }
            ever_shared[u].extend(shared);
        }
    }

    // A public sentinel written last: once a subscriber has it, every earlier event is in.
    let sentinel = s
        .post(
            &tokens[0],
            "notes",
            json!({"data": {"sentinel": true}, "acl": {"read": {"allow": ["*"]}}}),
        )
        .await;
    let sentinel_id: Uuid = sentinel["id"].as_str().unwrap().parse().unwrap();
    let sentinel_rev = sentinel["rev"].as_i64().unwrap();
    let public: Acl = serde_json::from_value(json!({"read": {"allow": ["*"]}})).unwrap();
    model.docs.insert(sentinel_id, (0, public, sentinel_rev));
    for u in 0..USERS.len() {
        ever_global[u].insert((sentinel_id, sentinel_rev));
        must_deliver[u].insert((sentinel_id, sentinel_rev));
    }

    // Then one sentinel per user for each of the other two subscriptions: a document another
    // user shares with the user by DID (only the user's shared subscription gets it), and one of
    // the user's own, written after every shared one (only the user's own subscription gets it;
    // the shared ones a user wrote are in their own view by then). Once a subscription has its
    // sentinel, every earlier event of it is in.
    let mut shared_sentinels = Vec::new();
    for u in 0..USERS.len() {
        let author = (u + 1) % USERS.len();
        let acl = json!({"read": {"allow": [USERS[u]]}});
        let doc = s
            .post(
                &tokens[author],
                "notes",
                json!({"data": {"sentinel": "shared"}, "acl": acl}),
            )
            .await;
        let id: Uuid = doc["id"].as_str().unwrap().parse().unwrap();
        let rev = doc["rev"].as_i64().unwrap();
        model
            .docs
            .insert(id, (author, serde_json::from_value(acl).unwrap(), rev));
        ever_shared[u].insert((id, rev));
        must_deliver_shared[u].insert((id, rev));
        shared_sentinels.push(id);
    }
    let mut own_sentinels = Vec::new();
    for (u, token) in tokens.iter().enumerate() {
        let doc = s
            .post(token, "notes", json!({"data": {"sentinel": "own"}}))
            .await;
        let id: Uuid = doc["id"].as_str().unwrap().parse().unwrap();
        let rev = doc["rev"].as_i64().unwrap();
        model.docs.insert(id, (u, Acl::default(), rev));
        own_sentinels.push(id);
    }

    let mut total_events = 0usize;
    for (u, ws) in sockets.iter_mut().enumerate() {
        let (global_sub, own_sub, shared_sub) = &subs[u];
        let mut global = Seen::default();
        let mut events = Vec::new();
        loop {
            let event = ws.event(global_sub).await;
            events.push(event.clone());
            total_events += 1;
            global.apply(&event);
            if event["doc"]["id"].as_str() == Some(sentinel_id.to_string().as_str()) {
                break;
            }
        }
        let leaked: Vec<_> = global.received.difference(&ever_global[u]).collect();
        // On failure: the workload's story of the first leaked document, for the report.
        if let Some((id, _)) = leaked.first() {
            let id = id.to_string();
            for h in history
                .iter()
                .filter(|h| h.contains(&id) || h.contains("cert"))
            {
                eprintln!("{h}");
            }
            for e in events.iter().filter(|e| e.to_string().contains(&id)) {
                eprintln!("event {e}");
            }
        }
        assert!(
            leaked.is_empty(),
            "{}: received {} revisions it could never read, e.g. {:?}",
            USERS[u],
            leaked.len(),
            &leaked[..leaked.len().min(5)]
        );
        let lost: Vec<_> = must_deliver[u].difference(&global.received).collect();
        assert!(
            lost.is_empty(),
            "{}: readable revisions not delivered: {lost:?}",
            USERS[u]
        );
        let view: BTreeSet<(Uuid, i64)> = global.view.into_iter().collect();
        assert_eq!(
            view,
            model.global_view(u),
            "{}: final global view",
            USERS[u]
        );

        // The shared subscription: what others shared with the user, by DID or certificate,
        // read up to its sentinel (every event checked on the way), then the view it made.
        let mut shared = Seen::default();
        loop {
            let event = ws.event(shared_sub).await;
            total_events += 1;
            shared.apply(&event);
            let leaked: Vec<_> = shared.received.difference(&ever_shared[u]).collect();
            assert!(leaked.is_empty(), "{}: shared leak {leaked:?}", USERS[u]);
            if event["doc"]["id"].as_str() == Some(shared_sentinels[u].to_string().as_str()) {
                break;
            }
        }
        assert_eq!(
            shared
                .view
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect::<BTreeSet<_>>(),
            model.shared_view(u),
            "{}: final shared view",
            USERS[u]
        );
        let lost: Vec<_> = must_deliver_shared[u]
            .difference(&shared.received)
            .collect();
        assert!(
            lost.is_empty(),
            "{}: shared revisions not delivered: {lost:?}",
            USERS[u]
        );

        // The own subscription reaches exactly the user's documents, read up to its sentinel;
        // only their own documents ever appear.
        let mut own = Seen::default();
        loop {
            let event = ws.event(own_sub).await;
            total_events += 1;
            own.apply(&event);
            assert!(
                own.received
                    .iter()
                    .all(|(id, _)| model.docs.get(id).is_none_or(|d| d.0 == u)),
                "{}: another user's document in the own subscription",
                USERS[u]
            );
            if event["doc"]["id"].as_str() == Some(own_sentinels[u].to_string().as_str()) {
                break;
            }
        }
        assert_eq!(
            own.view
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect::<BTreeSet<_>>(),
            model.own_view(u),
            "{}: final own view",
            USERS[u]
        );
    }
    assert!(
        total_events > OPS,
        "the workload produced {total_events} events"
    );
    for ws in sockets {
        ws.close().await;
    }
    pool.close().await;
    s.finish().await;
}
