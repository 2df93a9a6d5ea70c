//! One ACL semantics, three evaluators that must agree. Random users, certificates (valid,
//! expired, never-expiring) and documents with random read rules (`*`, DIDs, predicate lists, in
//! allow and deny) are evaluated
//! - in memory (`Acl::allows` with the caller's valid certificates: the model, and what realtime
//!   delivery uses),
//! - by PostgreSQL through the summary columns and `vibe_acl_preds_hold` (the full rule),
//! - by the server's paths: `GET /v1/docs/...` (credentials loaded from the database) and
//!   `POST /v1/query` with `global` and with `shared` (the SQL the query compiler emits).
//!
//! Every caller must get the same answer from each. Deterministic: a fixed seed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use std::collections::BTreeSet;

use chrono::{Duration, Utc};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{Value, json};
use uuid::Uuid;
use vibe::acl::{Acl, HeldCertificates, Operation};

use common::TestServer;

const USERS: [&str; 4] = [
    "did:key:zAda",
    "did:key:zBen",
    "did:key:zCyd",
    "did:key:zDot",
];
const TYPES: [&str; 3] = ["friend-of", "member-of", "blocked"];

#[derive(Debug, Clone)]
struct Cert {
    issuer: usize,
    subject: usize,
    cert_type: usize,
    /// None: never expires; Some(true): expired; Some(false): expires later.
    expired: Option<bool>,
}

#[derive(Debug, Clone)]
struct Doc {
    owner: usize,
    acl: Value,
}

fn entry() -> impl Strategy<Value = Value> {
    let predicate = (0..USERS.len(), 0..TYPES.len())
        .prop_map(|(i, t)| json!({"issuer": USERS[i], "type": TYPES[t]}));
    prop_oneof![
        1 => Just(json!("*")),
        2 => (0..USERS.len()).prop_map(|i| json!(USERS[i])),
        3 => prop::collection::vec(predicate, 1..3).prop_map(Value::Array),
    ]
}

fn acl() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(entry(), 0..3),
        prop::collection::vec(entry(), 0..3),
        any::<bool>(),
    )
        .prop_map(|(allow, deny, with_rule)| {
            if with_rule {
                json!({"read": {"allow": allow, "deny": deny}})
            } else {
                json!({})
            }
        })
}

fn cert() -> impl Strategy<Value = Cert> {
    (
        0..USERS.len(),
        0..USERS.len(),
        0..TYPES.len(),
        prop_oneof![Just(None), Just(Some(true)), Just(Some(false))],
    )
        .prop_map(|(issuer, subject, cert_type, expired)| Cert {
            issuer,
            subject,
            cert_type,
            expired,
        })
}

fn world() -> impl Strategy<Value = (Vec<Cert>, Vec<Doc>)> {
    (
        prop::collection::vec(cert(), 0..8),
        prop::collection::vec(
            (0..USERS.len(), acl()).prop_map(|(owner, acl)| Doc { owner, acl }),
            1..8,
        ),
    )
}

/// The full read rule in SQL, over the summary columns (what a "documents I may read" query
/// compiles to; global queries use the part after `read_public`).
const READABLE_SQL: &str = "SELECT id FROM documents WHERE type = 'items' AND (owner_did = $1 OR (\
    (read_public OR $1 = ANY(read_allow_dids) \
     OR (read_predicates AND vibe_acl_preds_hold(acl, 'read', 'allow', $1))) \
    AND NOT read_deny_public AND NOT ($1 = ANY(read_deny_dids)) \
    AND NOT (read_predicates AND vibe_acl_preds_hold(acl, 'read', 'deny', $1))))";

struct Case<'a> {
    s: &'a TestServer,
    pool: &'a sqlx::PgPool,
    tokens: &'a [String],
}

impl Case<'_> {
    async fn check(&self, certs: &[Cert], docs: &[Doc]) -> Result<(), String> {
        sqlx::query("DELETE FROM documents")
            .execute(self.pool)
            .await
            .map_err(|e| e.to_string())?;
        let now = Utc::now();
        for c in certs {
            let expires = c.expired.map(|past| {
                if past {
                    now - Duration::hours(1)
                } else {
                    now + Duration::hours(1)
                }
            });
            sqlx::query(
                "INSERT INTO documents (id, owner_did, type, acl, data) \
                 VALUES ($1, $2, 'vibe.certificate', $3, $4)",
            )
            .bind(Uuid::now_v7())
            .bind(USERS[c.issuer])
            .bind(json!({"read": {"allow": [USERS[c.subject]]}}))
            .bind(json!({"subject": USERS[c.subject], "type": TYPES[c.cert_type], "expires_at": expires}))
            .execute(self.pool)
            .await
            .map_err(|e| e.to_string())?;
        }
        let mut ids = Vec::new();
        for d in docs {
            let id = Uuid::now_v7();
            sqlx::query(
                "INSERT INTO documents (id, owner_did, type, acl, data) VALUES ($1, $2, 'items', $3, '{}')",
            )
            .bind(id)
            .bind(USERS[d.owner])
            .bind(&d.acl)
            .execute(self.pool)
            .await
            .map_err(|e| e.to_string())?;
            ids.push(id);
        }
        for (u, caller) in USERS.iter().enumerate() {
            let held = HeldCertificates(
                certs
                    .iter()
                    .filter(|c| c.subject == u && c.expired != Some(true))
                    .map(|c| (USERS[c.issuer].to_owned(), TYPES[c.cert_type].to_owned()))
                    .collect(),
            );
            let mut model = BTreeSet::new();
            let mut public_model = BTreeSet::new();
            let mut shared_model = BTreeSet::new();
            for (d, id) in docs.iter().zip(&ids) {
                let acl: Acl = serde_json::from_value(d.acl.clone()).map_err(|e| e.to_string())?;
                if acl.allows(Operation::Read, Some(caller), USERS[d.owner], &held) {
                    model.insert(*id);
                    if acl.is_public() {
                        public_model.insert(*id);
                    } else if d.owner != u {
                        shared_model.insert(*id);
                    }
                }
            }
            let sql: BTreeSet<Uuid> = sqlx::query_scalar(READABLE_SQL)
                .bind(caller)
                .fetch_all(self.pool)
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .collect();
            if sql != model {
                return Err(format!("{caller}: SQL rule {sql:?} != in-memory {model:?}"));
            }
            let token = &self.tokens[u];
            let mut rest = BTreeSet::new();
            for id in &ids {
                let status = self
                    .s
                    .client
                    .get(self.s.url(&format!("/v1/docs/items/{id}")))
                    .bearer_auth(token)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .status()
                    .as_u16();
                match status {
                    200 => {
                        rest.insert(*id);
                    }
                    403 => {}
                    other => return Err(format!("GET answered {other}")),
                }
            }
            if rest != model {
                return Err(format!("{caller}: REST {rest:?} != in-memory {model:?}"));
            }
            for (scope, expected) in [("global", &public_model), ("shared", &shared_model)] {
                let page: Value = self
                    .s
                    .client
                    .post(self.s.url("/v1/query"))
                    .bearer_auth(token)
                    .json(&json!({"type": "items", scope: true, "limit": 100}))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .json()
                    .await
                    .map_err(|e| e.to_string())?;
                let got: BTreeSet<Uuid> = page["docs"]
                    .as_array()
                    .ok_or_else(|| format!("no docs in {page}"))?
                    .iter()
                    .map(|d| d["id"].as_str().unwrap().parse().unwrap())
                    .collect();
                if &got != expected {
                    return Err(format!(
                        "{caller}: {scope} query {got:?} != in-memory {expected:?}"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[test]
fn memory_sql_and_rest_agree_on_random_acls_and_certificates() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(TestServer::start());
    let pool = rt.block_on(s.sql());
    let tokens: Vec<String> = USERS.iter().map(|u| s.token(u, &["read:items"])).collect();
    let case = Case {
        s: &s,
        pool: &pool,
        tokens: &tokens,
    };
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 120,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let result = runner.run(&world(), |(certs, docs)| {
        rt.block_on(case.check(&certs, &docs))
            .map_err(|e| TestCaseError::fail(format!("certs {certs:?}\ndocs {docs:?}\n{e}")))
    });
    rt.block_on(pool.close());
    rt.block_on(s.finish());
    if let Err(e) = result {
        panic!("{e}");
    }
}
