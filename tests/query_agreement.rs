//! The query language's two evaluators agree. Random queries over a random set of documents
//! that has every edge the semantics name — missing fields, null, numbers and strings and
//! booleans mixed at one path, arrays (nested ones too), objects, equal timestamps, public and
//! denied documents — run through `POST /v1/query` (SQL on PostgreSQL) and through the
//! in-memory evaluator live queries use; both must pick the same documents in the same order,
//! and the keyset cursor must continue exactly where the first page ended. Queries the parser
//! rejects must be rejected over HTTP too. Deterministic: a fixed seed; failures shrink.

#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{Map, Value, json};
use sqlx::Row;
use uuid::Uuid;
use vibe::acl::Operation;
use vibe::wire::Document;
use vibe_actors::query::{QueryLimits, QueryRequest, QuerySpec, Scope};

use common::TestServer;

const ALICE: &str = "did:key:zAlice";
const OWNERS: [&str; 3] = [ALICE, "did:key:zBob", "did:key:zCarol"];
const DOCS: usize = 160;

fn base_time() -> DateTime<Utc> {
    DateTime::from_timestamp(1_790_000_000, 0).unwrap_or_default()
}

/// Few distinct instants, so that sorts meet ties and comparisons meet equality.
fn times() -> Vec<DateTime<Utc>> {
    let t = base_time();
    vec![
        t,
        t + Duration::microseconds(1),
        t + Duration::seconds(1),
        t + Duration::hours(1),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (-3i64..4).prop_map(Value::from),
        prop::sample::select(vec![-1.5, 0.5, 2.0, 2.5, 1000.0, 0.001]).prop_map(|f| json!(f)),
        prop::sample::select(vec!["", "a", "ab", "abc", "b", "B", "Z", "é", "2", "a b"])
            .prop_map(Value::from),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map(prop::sample::select(vec!["x", "y"]), inner, 0..3)
                .prop_map(|m| Value::Object(
                    m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                )),
        ]
    })
}

/// `data`: each of `a`, `b`, `o`, `tags` present or not, with any kind of value.
fn data() -> impl Strategy<Value = Value> {
    (
        proptest::option::of(value()),
        proptest::option::of(value()),
        proptest::option::of(value()),
        proptest::option::of(value()),
    )
        .prop_map(|(a, b, o, tags)| {
            let mut map = Map::new();
            for (k, v) in [("a", a), ("b", b), ("o", o), ("tags", tags)] {
                if let Some(v) = v {
                    map.insert(k.to_owned(), v);
                }
            }
            Value::Object(map)
        })
}

#[derive(Debug, Clone)]
struct NewDoc {
    owner: usize,
    /// 0: made under no document, else `PARENTS[parent - 1]`.
    parent: usize,
    created: usize,
    updated: usize,
    acl: usize,
    data: Value,
}

fn new_doc() -> impl Strategy<Value = NewDoc> {
    (
        0..3usize,
        0..4usize,
        0..4usize,
        0..4usize,
        0..3usize,
        data(),
    )
        .prop_map(|(owner, created, updated, acl, parent, data)| NewDoc {
            owner,
            parent,
            created,
            updated,
            acl,
            data,
        })
}

fn acl(kind: usize) -> Value {
    match kind {
        0 => json!({}),
        1 => json!({"read": {"allow": ["*"]}}),
        2 => json!({"read": {"allow": ["*"], "deny": [ALICE]}}),
        _ => json!({"read": {"allow": [ALICE]}}),
    }
}

/// Parents the documents are made under (the store does not require them to exist).
const PARENTS: [Uuid; 2] = [
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001),
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0002),
];

fn parent_of(d: &NewDoc) -> Option<Uuid> {
    d.parent.checked_sub(1).map(|i| PARENTS[i])
}

const FIELDS: [&str; 12] = [
    "data.a",
    "data.b",
    "data.o",
    "data.o.x",
    "data.o.y",
    "data.tags",
    "data.missing",
    "owner",
    "createdAt",
    "updatedAt",
    "id",
    "parent",
];
const OPERATORS: [&str; 11] = [
    "eq",
    "ne",
    "gt",
    "gte",
    "lt",
    "lte",
    "in",
    "nin",
    "exists",
    "contains",
    "startsWith",
];

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// One `field: {op: operand}` condition; the operand is drawn to suit the field, mostly.
fn condition(ids: Vec<Uuid>) -> impl Strategy<Value = Map<String, Value>> {
    (
        prop::sample::select(FIELDS.to_vec()),
        prop::sample::select(OPERATORS.to_vec()),
        value(),
        prop::collection::vec(value(), 1..4),
        prop::sample::select(vec!["", "a", "ab", "B", "é", "did:key:z", "did:key:zB"]),
        0..5usize,
        prop::sample::select(ids),
        any::<bool>(),
        prop_oneof![
            (-3i64..4).prop_map(Value::from),
            prop::sample::select(vec!["", "a", "ab", "b", "B", "Z", "é", "2"])
                .prop_map(Value::from),
            leaf(),
        ],
    )
        .prop_map(
            |(field, op, v, list, prefix, pick, id, shorthand, ordered)| {
                let times: Vec<String> = times().into_iter().map(rfc3339).collect();
                // Sub-microsecond digits are cut, as the database cuts them.
                let nanos = rfc3339(base_time() + Duration::nanoseconds(1500));
                let core = |pick: usize| -> Value {
                    match field {
                        "owner" => json!(OWNERS[pick % 3]),
                        "createdAt" | "updatedAt" => {
                            json!(times.get(pick).cloned().unwrap_or_else(|| nanos.clone()))
                        }
                        "id" => json!(id),
                        // Both parents and, now and then, a document id no one was made under.
                        "parent" => match pick % 3 {
                            2 => json!(id),
                            k => json!(PARENTS[k]),
                        },
                        _ => Value::Null,
                    }
                };
                let is_core = !field.starts_with("data.");
                let operand = match op {
                    "in" | "nin" if is_core => {
                        json!((0..list.len()).map(|i| core(pick + i)).collect::<Vec<_>>())
                    }
                    "in" | "nin" => Value::Array(list),
                    "exists" => Value::Bool(shorthand),
                    "startsWith" => json!(prefix),
                    "gt" | "gte" | "lt" | "lte" if !is_core => ordered,
                    _ if is_core => core(pick),
                    _ => v,
                };
                let mut map = Map::new();
                let condition = if op == "eq" && shorthand && !operand.is_object() {
                    operand
                } else {
                    json!({ op: operand })
                };
                map.insert(field.to_owned(), condition);
                map
            },
        )
}

fn filter(ids: Vec<Uuid>) -> impl Strategy<Value = Map<String, Value>> {
    condition(ids).prop_recursive(3, 12, 3, |inner| {
        let wrap = |key: &'static str, v: Value| {
            let mut map = Map::new();
            map.insert(key.to_owned(), v);
            map
        };
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..3).prop_map(move |v| wrap("and", json!(v))),
            prop::collection::vec(inner.clone(), 1..3).prop_map(move |v| wrap("or", json!(v))),
            inner
                .clone()
                .prop_map(move |m| wrap("not", Value::Object(m))),
            prop::collection::vec(inner, 2..3).prop_map(|maps| {
                maps.into_iter().fold(Map::new(), |mut all, m| {
                    all.extend(m);
                    all
                })
            }),
        ]
    })
}

fn query(ids: Vec<Uuid>) -> impl Strategy<Value = Value> {
    let sort_key = (
        prop::sample::select(vec![
            "createdAt",
            "updatedAt",
            "data.a",
            "data.b",
            "data.o",
            "data.o.x",
            "owner",
            "id",
        ]),
        any::<bool>(),
    )
        .prop_map(|(k, desc)| if desc { format!("-{k}") } else { k.to_owned() });
    (
        proptest::option::of(filter(ids)),
        prop::collection::vec(sort_key, 0..3),
        proptest::option::of(1u32..25),
        prop::bool::weighted(0.25),
    )
        .prop_map(|(filter, sort, limit, global)| {
            let mut q = json!({"type": "items"});
            if let Some(f) = filter {
                q["where"] = Value::Object(f);
            }
            if !sort.is_empty() {
                q["sort"] = json!(sort);
            }
            if let Some(limit) = limit {
                q["limit"] = json!(limit);
            }
            if global {
                q["global"] = json!(true);
            }
            q
        })
}

async fn insert(s: &TestServer, docs: &[NewDoc]) -> Vec<Document> {
    let pool = s.sql().await;
    let times = times();
    for (i, d) in docs.iter().enumerate() {
        sqlx::query(
            "INSERT INTO documents (id, owner_did, type, created_at, updated_at, acl, data, \
             parent) VALUES ($1, $2, 'items', $3, $4, $5, $6, $7)",
        )
        .bind(Uuid::from_u128(
            0x0190_0000_0000_7000_8000_0000_0000_0000 + i as u128 * 7919,
        ))
        .bind(OWNERS[d.owner])
        .bind(times[d.created])
        .bind(times[d.updated])
        .bind(acl(d.acl))
        .bind(&d.data)
        .bind(parent_of(d))
        .execute(&pool)
        .await
        .unwrap();
    }
    let rows = sqlx::query(
        "SELECT id, owner_did, type, parent, created_at, updated_at, rev, acl, data FROM documents",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    rows.iter()
        .map(|r| Document {
            id: r.get("id"),
            doc_type: r.get("type"),
            owner: r.get("owner_did"),
            parent: r.get("parent"),
            rev: r.get("rev"),
            created_at: r.get("created_at"),
            updated_at: r.get("updated_at"),
            acl: serde_json::from_value(r.get("acl")).unwrap(),
            data: r.get("data"),
        })
        .collect()
}

struct Case<'a> {
    s: &'a TestServer,
    token: &'a str,
    docs: &'a [Document],
}

impl Case<'_> {
    async fn post(&self, body: &Value) -> (u16, Value) {
        let r = self
            .s
            .client
            .post(self.s.url("/v1/query"))
            .bearer_auth(self.token)
            .json(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn check(&self, query: Value) -> Result<(), String> {
        let request: QueryRequest =
            serde_json::from_value(query.clone()).map_err(|e| e.to_string())?;
        let (status, body) = self.post(&query).await;
        let spec = match QuerySpec::parse(&request, ALICE, QueryLimits::default()) {
            Ok(spec) => spec,
            Err(e) => {
                return if status == 400 && body["error"]["code"] == "invalid_query" {
                    Ok(())
                } else {
                    Err(format!(
                        "parser rejects ({e}) but the server answered {status} {body}"
                    ))
                };
            }
        };
        if status != 200 {
            return Err(format!("{status} {body}"));
        }
        let own = matches!(spec.scope, Scope::Own(_));
        let mut expected: Vec<&Document> = self
            .docs
            .iter()
            .filter(|d| {
                spec.matches(d)
                    && (own
                        || d.acl.allows(
                            Operation::Read,
                            Some(ALICE),
                            &d.owner,
                            &vibe::acl::NoCredentials,
                        ))
            })
            .collect();
        expected.sort_by(|a, b| spec.order(a, b));
        let expected: Vec<Uuid> = expected.iter().map(|d| d.id).collect();
        let limit = spec.limit as usize;
        let ids = |body: &Value| -> Vec<Uuid> {
            body["docs"]
                .as_array()
                .map(|docs| {
                    docs.iter()
                        .filter_map(|d| d["id"].as_str().and_then(|s| s.parse().ok()))
                        .collect()
                })
                .unwrap_or_default()
        };
        let first: Vec<Uuid> = expected.iter().take(limit).copied().collect();
        if ids(&body) != first {
            return Err(format!(
                "first page differs\n  sql:    {:?}\n  memory: {first:?}",
                ids(&body)
            ));
        }
        match body.get("next").and_then(Value::as_str) {
            None if expected.len() > limit => Err("no `next` though more documents match".into()),
            Some(_) if expected.len() <= limit => Err("`next` on the last page".into()),
            None => Ok(()),
            Some(cursor) => {
                let mut again = query.clone();
                again["cursor"] = json!(cursor);
                let (status, body) = self.post(&again).await;
                let second: Vec<Uuid> = expected.iter().skip(limit).take(limit).copied().collect();
                if status != 200 || ids(&body) != second {
                    return Err(format!(
                        "second page differs ({status})\n  sql:    {:?}\n  memory: {second:?}",
                        ids(&body)
                    ));
                }
                Ok(())
            }
        }
    }
}

#[test]
fn sql_and_memory_evaluators_agree() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(TestServer::start());
    let token = s.token(ALICE, &["read:items"]);
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 1500,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let new_docs = prop::collection::vec(new_doc(), DOCS)
        .new_tree(&mut runner)
        .unwrap()
        .current();
    let docs = rt.block_on(insert(&s, &new_docs));
    let ids: Vec<Uuid> = docs.iter().map(|d| d.id).collect();
    let case = Case {
        s: &s,
        token: &token,
        docs: &docs,
    };
    let result = runner.run(&query(ids), |q| {
        rt.block_on(case.check(q.clone()))
            .map_err(|e| TestCaseError::fail(format!("{q}\n{e}")))
    });
    rt.block_on(s.finish());
    if let Err(e) = result {
        panic!("{e}");
    }
}
