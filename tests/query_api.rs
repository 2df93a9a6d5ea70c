//! The query API end to end: `POST /v1/query` authentication, scope checks and error answers
//! (each `invalid_query` message names the offending part, bad cursors are `invalid_cursor`);
//! keyset paging that visits every match once, in order — across every kind of sort value, in
//! pages down to one document, and with documents written between pages; `expand` limited to the
//! referenced documents the caller may read by ACL, by token scope and by token attenuation;
//! `global` queries that never return a document denied to the caller (REST and `readOnce`); and
//! live `read`s with the new operators, whose `add` / `change` / `remove` events follow documents
//! into, within and out of a limited window — while `cursor` and `expand` are refused there.

#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashSet};

use common::{ALICE, BOB, CAROL, TestServer, Ws};
use serde_json::{Value, json};
use uuid::Uuid;

/// `POST /v1/query` expecting 200.
async fn query_ok(s: &TestServer, token: &str, body: &Value) -> Value {
    let (status, answer) = s.query(token, body).await;
    assert_eq!(status, 200, "{body} → {answer}");
    answer
}

/// Asserts an error answer: status, code, and (if given) the part the message starts with.
fn assert_error(status: u16, answer: &Value, want: (u16, &str, Option<&str>), query: &Value) {
    let (want_status, code, part) = want;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (want_status, Some(code)),
        "{query} → {answer}"
    );
    if let Some(part) = part {
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("{part}: ")),
            "{query}: the message should start with `{part}: `, got {message:?}"
        );
    }
}

fn ids(docs: &Value) -> Vec<String> {
    docs.as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect()
}

fn id_of(doc: &Value) -> String {
    doc["id"].as_str().unwrap().to_owned()
}

async fn patch_data(s: &TestServer, token: &str, doc_type: &str, id: &str, data: Value) {
    let r = s
        .client
        .patch(s.url(&format!("/v1/docs/{doc_type}/{id}")))
        .bearer_auth(token)
        .header("content-type", "application/merge-patch+json")
        .body(json!({ "data": data }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "patch {id}");
}

async fn delete(s: &TestServer, token: &str, doc_type: &str, id: &str) {
    let r = s
        .client
        .delete(s.url(&format!("/v1/docs/{doc_type}/{id}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "delete {id}");
}

#[tokio::test]
async fn query_requires_a_token_and_the_read_scope() {
    let s = TestServer::start().await;
    let body = json!({"type": "posts"});

    // No token: 401, whatever the body (an unauthenticated caller learns nothing about it).
    for raw in [body.to_string(), "{not json".to_owned()] {
        let r = s
            .client
            .post(s.url("/v1/query"))
            .header("content-type", "application/json")
            .body(raw.clone())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let answer: Value = r.json().await.unwrap();
        assert_error(status, &answer, (401, "unauthenticated", None), &json!(raw));
    }
    // A token that is not one.
    let (status, answer) = s.query("garbage", &body).await;
    assert_error(status, &answer, (401, "invalid_token", None), &body);

    // Tokens without `read:posts`: other types, or write only.
    for scopes in [&["read:profiles"][..], &["write:posts"], &["write:*"]] {
        let token = s.token(ALICE, scopes);
        let (status, answer) = s.query(&token, &body).await;
        assert_error(status, &answer, (403, "missing_scope", None), &body);
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("read:posts"),
            "{answer}"
        );
    }
    // With it (exactly, by wildcard, or all): 200 and an empty page.
    for scopes in [&["read:posts"][..], &["read:*"], &["*"]] {
        let token = s.token(ALICE, scopes);
        let answer = query_ok(&s, &token, &body).await;
        assert_eq!(answer["docs"], json!([]), "{scopes:?}");
        assert!(answer.get("next").is_none(), "{answer}");
        assert!(answer.get("expanded").is_none(), "{answer}");
    }

    // Only POST.
    let token = s.token(ALICE, &["*"]);
    for method in [
        reqwest::Method::GET,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        let r = s
            .client
            .request(method.clone(), s.url("/v1/query"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method}");
        assert_eq!(r.headers()["allow"], "POST");
        let answer: Value = r.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "method_not_allowed");
    }
    s.finish().await;
}

#[tokio::test]
async fn malformed_bodies_are_bad_requests() {
    let s = TestServer::start().await;
    let token = s.token(ALICE, &["*"]);
    let send = |body: &'static str| {
        s.client
            .post(s.url("/v1/query"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // Not JSON at all.
    for raw in ["{\"type\": \"posts\",", "", "type=posts"] {
        let r = send(raw).await.unwrap();
        assert_eq!(r.status(), 400, "{raw:?}");
        let answer: Value = r.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "bad_json", "{raw:?}: {answer}");
    }
    // JSON, but not a query's shape: refused like any body of the wrong shape.
    for raw in [
        "[1, 2]",
        "{}",
        r#"{"type": "posts", "filter": {}}"#,
        r#"{"type": "posts", "where": []}"#,
        r#"{"type": "posts", "limit": "ten"}"#,
        r#"{"type": "posts", "limit": -1}"#,
        r#"{"type": "posts", "sort": 5}"#,
        r#"{"type": "posts", "global": "yes"}"#,
        r#"{"type": "posts", "expand": "data.author"}"#,
    ] {
        let r = send(raw).await.unwrap();
        assert_eq!(r.status(), 400, "{raw}");
        let answer: Value = r.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "invalid_body", "{raw}: {answer}");
    }
    // Not sent as JSON.
    let r = s
        .client
        .post(s.url("/v1/query"))
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body(r#"{"type": "posts"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    s.finish().await;
}

#[tokio::test]
async fn invalid_queries_name_the_offending_part() {
    let s = TestServer::start().await;
    let token = s.token(ALICE, &["*"]);
    let nested = |n: usize| {
        let mut w = json!({"data.n": 1});
        for _ in 0..n {
            w = json!({ "not": w });
        }
        w
    };
    let conditions = |n: usize| {
        let list: Vec<Value> = (0..n).map(|i| json!({ "data.k": i })).collect();
        json!({ "and": list })
    };
    let cases: Vec<(Value, &str)> = vec![
        // Operators: unknown ones next to known ones, and operands of the wrong kind.
        (
            json!({"where": {"data.n": {"gt": 1, "regex": "x"}}}),
            "where.data.n",
        ),
        (
            json!({"where": {"data.n": {"gt": true}}}),
            "where.data.n.gt",
        ),
        (
            json!({"where": {"data.n": {"lte": [1]}}}),
            "where.data.n.lte",
        ),
        (
            json!({"where": {"data.n": {"gte": {"a": 1}}}}),
            "where.data.n.gte",
        ),
        (
            json!({"where": {"data.n": {"lt": null}}}),
            "where.data.n.lt",
        ),
        (json!({"where": {"data.n": {"in": 5}}}), "where.data.n.in"),
        (
            json!({"where": {"data.n": {"nin": []}}}),
            "where.data.n.nin",
        ),
        (
            json!({"where": {"data.n": {"exists": "yes"}}}),
            "where.data.n.exists",
        ),
        (
            json!({"where": {"data.t": {"startsWith": 1}}}),
            "where.data.t.startsWith",
        ),
        (
            json!({"where": {"owner": {"exists": true}}}),
            "where.owner.exists",
        ),
        (
            json!({"where": {"owner": {"contains": "did"}}}),
            "where.owner.contains",
        ),
        (
            json!({"where": {"createdAt": {"startsWith": "2026"}}}),
            "where.createdAt.startsWith",
        ),
        (
            json!({"where": {"createdAt": {"gte": "yesterday"}}}),
            "where.createdAt.gte",
        ),
        (json!({"where": {"updatedAt": 5}}), "where.updatedAt"),
        (json!({"where": {"id": "not-a-uuid"}}), "where.id"),
        (
            json!({"where": {"id": {"in": [Uuid::nil(), "x"]}}}),
            "where.id.in",
        ),
        (json!({"where": {"owner": 5}}), "where.owner"),
        (json!({"where": {"type": {"ne": true}}}), "where.type.ne"),
        // Paths.
        (json!({"where": {"title": "x"}}), "where.title"),
        (json!({"where": {"data": 1}}), "where.data"),
        (json!({"where": {"data.": 1}}), "where.data."),
        (json!({"where": {"data.a..b": 1}}), "where.data.a..b"),
        (json!({"where": {"data.items.0": 1}}), "where.data.items.0"),
        (json!({"where": {"data.a'b": 1}}), "where.data.a'b"),
        (
            json!({"where": {"data.a.b.c.d.e.f.g.h.i": 1}}),
            "where.data.a.b.c.d.e.f.g.h.i",
        ),
        // Combinators.
        (json!({"where": {"or": []}}), "where.or"),
        (json!({"where": {"and": {"data.a": 1}}}), "where.and"),
        (json!({"where": {"or": [{"data.a": 1}, 2]}}), "where.or[1]"),
        (json!({"where": {"not": [{"data.a": 1}]}}), "where.not"),
        (
            json!({"where": {"or": [{"data.a": 1}, {"and": [{"data.b": {"lt": null}}]}]}}),
            "where.or[1].and[0].data.b.lt",
        ),
        (json!({"where": {"not": {"bad": 1}}}), "where.not.bad"),
        // Nesting beyond 6 (the top level is depth 1) and more than 64 conditions.
        (
            json!({ "where": nested(6) }),
            "where.not.not.not.not.not.not",
        ),
        // Each condition object inside `and` counts, and so does its condition: 33 of them are
        // 66 against the limit of 64, refused at the 33rd object.
        (json!({ "where": conditions(33) }), "where.and[32]"),
        (
            json!({"where": {"data.n": {"in": (0..65).collect::<Vec<_>>()}}}),
            "where.data.n.in",
        ),
        // Sort, limit, expand, type.
        (json!({"sort": ["-data.score", "title"]}), "sort[1]"),
        (json!({"sort": "data."}), "sort"),
        (json!({"sort": "--createdAt"}), "sort"),
        (json!({"sort": ["createdAt", "-createdAt"]}), "sort[1]"),
        (json!({"sort": []}), "sort"),
        (
            json!({"sort": ["id", "owner", "type", "createdAt", "updatedAt"]}),
            "sort",
        ),
        (json!({"limit": 0}), "limit"),
        (json!({"limit": 1001}), "limit"),
        (json!({"expand": ["owner"]}), "expand[0]"),
        (json!({"expand": ["data.a", "data.b.0"]}), "expand[1]"),
        (
            json!({"expand": ["data.a", "data.b", "data.c", "data.d", "data.e"]}),
            "expand",
        ),
    ];
    for (mut q, part) in cases {
        if q.get("type").is_none() {
            q["type"] = json!("posts");
        }
        let (status, answer) = s.query(&token, &q).await;
        assert_error(status, &answer, (400, "invalid_query", Some(part)), &q);
    }
    // A bad type name gets the code it gets on every other route.
    for q in [json!({"type": "Posts"}), json!({"type": ""})] {
        let (status, answer) = s.query(&token, &q).await;
        assert_error(status, &answer, (400, "invalid_type", None), &q);
    }

    // Just inside the limits: accepted.
    for q in [
        json!({"type": "posts", "where": nested(5)}),
        json!({"type": "posts", "where": conditions(32)}),
        json!({"type": "posts", "where": {"data.n": {"in": (0..64).collect::<Vec<_>>()}}}),
        json!({"type": "posts", "where": {"data.a.b.c.d.e.f.g.h": 1}}),
        json!({"type": "posts", "limit": 1000, "sort": ["id", "owner", "type", "-createdAt"]}),
        json!({"type": "posts", "expand": ["data.a", "data.b", "data.c", "data.d"]}),
        // An object without operator keys is an equality with that object.
        json!({"type": "posts", "where": {"data.n": {"regex": "x"}}}),
    ] {
        query_ok(&s, &token, &q).await;
    }
    s.finish().await;
}

#[tokio::test]
async fn cursors_that_are_not_this_querys_are_invalid_cursor() {
    let s = TestServer::start().await;
    let token = s.token(ALICE, &["*"]);
    for n in 0..3 {
        s.post(&token, "scores", json!({"data": {"score": n}}))
            .await;
    }
    let by_score = json!({"type": "scores", "sort": ["-data.score"], "limit": 1});
    let first = query_ok(&s, &token, &by_score).await;
    let next = first["next"].as_str().unwrap().to_owned();
    // The cursor works with its own query.
    let mut again = by_score.clone();
    again["cursor"] = json!(next);
    let second = query_ok(&s, &token, &again).await;
    assert_eq!(second["docs"][0]["data"]["score"], 1);

    use base64::Engine as _;
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let garbage = [
        "garbage!".to_owned(),
        String::new(),
        "x".repeat(5000),
        b64(json!({"a": 1})),
        b64(json!([])),
        b64(json!([[3, "NaN", ""], Uuid::nil()])),
        b64(json!([[9, "1", ""], Uuid::nil()])),
        b64(json!([[3, "1", ""], "not-a-uuid"])),
        b64(json!([[3, "1; DROP TABLE documents", ""], Uuid::nil()])),
    ];
    for cursor in garbage {
        let mut q = by_score.clone();
        q["cursor"] = json!(cursor);
        let (status, answer) = s.query(&token, &q).await;
        assert_error(status, &answer, (400, "invalid_cursor", Some("cursor")), &q);
    }
    // A real cursor of a query sorted otherwise.
    let by_two = json!({"type": "scores", "sort": ["-data.score", "createdAt"], "cursor": next});
    let (status, answer) = s.query(&token, &by_two).await;
    assert_error(
        status,
        &answer,
        (400, "invalid_cursor", Some("cursor")),
        &by_two,
    );
    let by_time = json!({"type": "scores", "sort": "createdAt", "cursor": next});
    let (status, answer) = s.query(&token, &by_time).await;
    assert_error(
        status,
        &answer,
        (400, "invalid_cursor", Some("cursor")),
        &by_time,
    );
    // Sorts whose values are of the same kinds: the cursor's values would decode for them, and
    // taking it would start the page at an arbitrary place.
    for other in [
        json!({"type": "scores", "sort": "data.score", "cursor": next}),
        json!({"type": "scores", "sort": "-data.rank", "cursor": next}),
        json!({"type": "tallies", "sort": "-data.score", "cursor": next}),
        json!({"type": "scores", "sort": "-data.score", "global": true, "cursor": next}),
    ] {
        let (status, answer) = s.query(&token, &other).await;
        assert_error(
            status,
            &answer,
            (400, "invalid_cursor", Some("cursor")),
            &other,
        );
    }
    // The same order with another filter and page size goes on from the cursor's position.
    let narrowed = json!({"type": "scores", "sort": "-data.score", "limit": 5,
                          "where": {"data.score": {"lt": 2}}, "cursor": next});
    let rest = query_ok(&s, &token, &narrowed).await;
    let scores: Vec<&Value> = rest["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["data"]["score"])
        .collect();
    assert_eq!(scores, [&json!(1), &json!(0)], "{rest}");
    s.finish().await;
}

/// A data value's sort key: kind (missing, null, booleans, numbers, strings, containers), then
/// number, then string (code point order).
fn sort_key(value: Option<&Value>) -> (u8, f64, String) {
    match value {
        None => (0, 0.0, String::new()),
        Some(Value::Null) => (1, 0.0, String::new()),
        Some(Value::Bool(b)) => (2, f64::from(u8::from(*b)), String::new()),
        Some(Value::Number(n)) => (3, n.as_f64().unwrap(), String::new()),
        Some(Value::String(s)) => (4, 0.0, s.clone()),
        Some(_) => (5, 0.0, String::new()),
    }
}

/// The order of `sort` over top-level data keys (`(key, descending)`), as the query language
/// defines it: the id breaks ties in the direction of the last key.
fn order_by(sort: &[(&str, bool)], a: &Value, b: &Value) -> Ordering {
    for (key, descending) in sort {
        let (ka, kb) = (sort_key(a["data"].get(*key)), sort_key(b["data"].get(*key)));
        let ord =
            ka.0.cmp(&kb.0)
                .then(ka.1.partial_cmp(&kb.1).unwrap())
                .then(ka.2.cmp(&kb.2));
        let ord = if *descending { ord.reverse() } else { ord };
        if ord.is_ne() {
            return ord;
        }
    }
    let id = |d: &Value| d["id"].as_str().unwrap().parse::<Uuid>().unwrap();
    let ord = id(a).cmp(&id(b));
    if sort.last().is_some_and(|(_, descending)| *descending) {
        ord.reverse()
    } else {
        ord
    }
}

/// `sort: ["-data.score"]`.
fn by_score_descending(a: &Value, b: &Value) -> Ordering {
    order_by(&[("score", true)], a, b)
}

const SCORES: [f64; 25] = [
    5.0, 3.0, 9.0, 3.0, 7.0, 7.0, 1.0, 0.0, -2.0, 9.0, 4.0, 4.0, 4.0, 2.5, 8.0, 6.0, 6.0, 10.0,
    3.0, 5.0, 5.0, 2.0, 11.0, 12.0, 12.0,
];

/// The matching documents of the paging tests: 25 scores (many equal) and one score of each
/// other kind; and documents of another game that must not appear.
async fn create_scores(s: &TestServer, token: &str) -> Vec<Value> {
    let mut matching = Vec::new();
    for score in SCORES {
        let score = if score.fract() == 0.0 {
            json!(score as i64)
        } else {
            json!(score)
        };
        matching.push(
            s.post(
                token,
                "scores",
                json!({"data": {"game": "chess", "score": score}}),
            )
            .await,
        );
    }
    for data in [
        json!({"game": "chess", "score": "top"}),
        json!({"game": "chess", "score": null}),
        json!({"game": "chess", "score": true}),
        json!({"game": "chess"}),
        json!({"game": "chess", "score": 7.0}),
    ] {
        matching.push(s.post(token, "scores", json!({ "data": data })).await);
    }
    for score in [100, 5, -1] {
        s.post(
            token,
            "scores",
            json!({"data": {"game": "go", "score": score}}),
        )
        .await;
    }
    matching
}

fn chess_query() -> Value {
    json!({"type": "scores", "where": {"data.game": "chess"}, "sort": ["-data.score"], "limit": 10})
}

#[tokio::test]
async fn paging_visits_every_match_once_in_order() {
    let s = TestServer::start().await;
    let token = s.token(ALICE, &["*"]);
    let mut expected = create_scores(&s, &token).await;
    expected.sort_by(by_score_descending);

    let mut seen: Vec<Value> = Vec::new();
    let mut q = chess_query();
    let mut pages = 0;
    loop {
        let page = query_ok(&s, &token, &q).await;
        pages += 1;
        let docs = page["docs"].as_array().unwrap();
        seen.extend(docs.iter().cloned());
        assert!(pages < 10, "paging does not end");
        match page.get("next") {
            Some(next) => {
                assert_eq!(docs.len(), 10, "a page with `next` is full");
                q["cursor"] = next.clone();
            }
            None => break,
        }
    }
    assert_eq!(pages, 3, "30 matches in pages of 10");
    let expected_ids: Vec<String> = expected.iter().map(id_of).collect();
    let seen_ids: Vec<String> = seen.iter().map(id_of).collect();
    assert_eq!(seen_ids, expected_ids);
    assert_eq!(seen, expected, "whole documents, as created");

    // The same pages over the WebSocket's `readOnce`.
    let mut ws = Ws::connect(&s.base, Some(&token)).await;
    let mut q = chess_query();
    q["op"] = json!("readOnce");
    let mut over_ws = Vec::new();
    loop {
        let reply = ws.request(q.clone()).await;
        assert_eq!(reply["ok"], true, "{reply}");
        over_ws.extend(ids(&reply["docs"]));
        match reply.get("next") {
            Some(next) => q["cursor"] = next.clone(),
            None => break,
        }
    }
    assert_eq!(over_ws, expected_ids);
    ws.close().await;
    s.finish().await;
}

#[tokio::test]
async fn paging_keeps_its_place_when_documents_are_written_between_pages() {
    let s = TestServer::start().await;
    let token = s.token(ALICE, &["*"]);
    let mut all = create_scores(&s, &token).await;

    let mut q = chess_query();
    let first = query_ok(&s, &token, &q).await;
    let first_docs = first["docs"].as_array().unwrap().clone();
    let boundary = first_docs.last().unwrap().clone();
    q["cursor"] = first["next"].clone();

    // Between pages: new documents before the cursor (never seen), at its score (the id
    // decides), after it (seen exactly once); a deletion after it (never seen).
    let boundary_score = boundary["data"]["score"].clone();
    for score in [
        json!(1000),
        boundary_score,
        json!(6),
        json!(-100),
        json!("zzz"),
    ] {
        all.push(
            s.post(
                &token,
                "scores",
                json!({"data": {"game": "chess", "score": score}}),
            )
            .await,
        );
    }
    let mut sorted = all.clone();
    sorted.sort_by(by_score_descending);
    let doomed = id_of(&sorted[sorted.len() - 3]);
    delete(&s, &token, "scores", &doomed).await;
    let originals: HashSet<String> = all[..all.len() - 5].iter().map(id_of).collect();

    let mut seen: Vec<String> = ids(&first["docs"]);
    let mut pages = 1;
    loop {
        let page = query_ok(&s, &token, &q).await;
        seen.extend(ids(&page["docs"]));
        pages += 1;
        assert!(pages < 10, "paging does not end");
        match page.get("next") {
            Some(next) => q["cursor"] = next.clone(),
            None => break,
        }
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no document twice: {seen:?}");
    let expected: Vec<String> = sorted
        .iter()
        .filter(|d| id_of(d) != doomed)
        .filter(|d| {
            originals.contains(&id_of(d)) || by_score_descending(d, &boundary) == Ordering::Greater
        })
        .map(id_of)
        .collect();
    assert_eq!(seen, expected);
    // The new documents placed after the cursor are there, the ones before it are not.
    let score_of = |score: Value| {
        all.iter()
            .rev()
            .find(|d| d["data"]["score"] == score)
            .map(id_of)
            .unwrap()
    };
    assert!(seen.contains(&score_of(json!(6))));
    assert!(seen.contains(&score_of(json!(-100))));
    assert!(!seen.contains(&score_of(json!(1000))));
    assert!(!seen.contains(&score_of(json!("zzz"))));
    assert!(!seen.contains(&doomed));
    s.finish().await;
}

/// Follows `next` from `query` to the end; every page but the last is full.
async fn all_pages(s: &TestServer, token: &str, query: &Value) -> Vec<String> {
    let limit = query["limit"].as_u64().unwrap() as usize;
    let mut q = query.clone();
    let mut seen = Vec::new();
    for _ in 0..200 {
        let page = query_ok(s, token, &q).await;
        let docs = ids(&page["docs"]);
        match page.get("next") {
            Some(next) => {
                assert_eq!(docs.len(), limit, "{q} → {page}");
                q["cursor"] = next.clone();
                seen.extend(docs);
            }
            None => {
                seen.extend(docs);
                return seen;
            }
        }
    }
    panic!("paging does not end: {query}");
}

/// Pages as small as one document, over a sort key holding every kind of value (strings that
/// order differently by code point than by a locale, equal numbers written differently, big and
/// tiny numbers, containers that tie), in both directions and mixed with a second key.
#[tokio::test]
async fn paging_crosses_every_kind_of_sort_value() {
    let s = TestServer::start().await;
    let token = s.token(ALICE, &["*"]);
    let values = [
        json!("a"),
        json!("B"),
        json!("é"),
        json!("Z"),
        json!(""),
        json!("a b"),
        json!("ab"),
        json!("ä"),
        json!("日本"),
        json!("10"),
        json!("9"),
        json!(1e20),
        json!(-0.5),
        json!(1.0),
        json!(1),
        json!(0.1),
        json!(1e-7),
        json!(-3),
        json!(9_007_199_254_740_993_u64),
        json!(12.5),
        json!(true),
        json!(false),
        Value::Null,
        json!([1]),
        json!({"x": 1}),
        json!([]),
        json!({}),
    ];
    let groups = ["g1", "g2", "g3"];
    let mut docs = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let data = json!({"v": v, "group": groups[i % 3]});
        docs.push(s.post(&token, "vals", json!({ "data": data })).await);
    }
    for group in groups {
        // Two with no `v` at all per group.
        for _ in 0..2 {
            docs.push(
                s.post(&token, "vals", json!({"data": {"group": group}}))
                    .await,
            );
        }
    }
    for (sort, limit) in [
        (vec![("v", false)], 1),
        (vec![("v", true)], 1),
        (vec![("group", false), ("v", true)], 2),
        (vec![("group", true), ("v", false)], 3),
        (vec![("v", true), ("group", false)], 4),
    ] {
        let keys: Vec<String> = sort
            .iter()
            .map(|(k, desc)| format!("{}data.{k}", if *desc { "-" } else { "" }))
            .collect();
        let q = json!({"type": "vals", "sort": keys, "limit": limit});
        let mut expected = docs.clone();
        expected.sort_by(|a, b| order_by(&sort, a, b));
        let expected: Vec<String> = expected.iter().map(id_of).collect();
        assert_eq!(all_pages(&s, &token, &q).await, expected, "{q}");
        // One page with everything agrees too.
        let mut whole = q.clone();
        whole["limit"] = json!(100);
        assert_eq!(
            ids(&query_ok(&s, &token, &whole).await["docs"]),
            expected,
            "{whole}"
        );
    }
    s.finish().await;
}

#[tokio::test]
async fn expand_returns_only_the_referenced_documents_the_caller_may_read() {
    let s = TestServer::start().await;
    let alice_all = s.token(ALICE, &["*"]);
    let bob_all = s.token(BOB, &["*"]);

    let p1 = s
        .post(
            &bob_all,
            "profiles",
            json!({"acl": {"read": {"allow": ["*"]}}, "data": {"name": "bob in public"}}),
        )
        .await;
    let p2 = s
        .post(
            &bob_all,
            "profiles",
            json!({"data": {"name": "bob in private"}}),
        )
        .await;
    // Readable by ACL, but of a type the read:posts + read:profiles token does not cover.
    let note = s
        .post(
            &bob_all,
            "notes",
            json!({"acl": {"read": {"allow": ["*"]}}, "data": {"text": "public note"}}),
        )
        .await;
    // Public, but denied to Alice by name.
    let p4 = s
        .post(
            &bob_all,
            "profiles",
            json!({"acl": {"read": {"allow": ["*"], "deny": [ALICE]}}, "data": {"name": "not for alice"}}),
        )
        .await;
    let (p1_id, p2_id, note_id, p4_id) = (id_of(&p1), id_of(&p2), id_of(&note), id_of(&p4));

    let a = s
        .post(
            &alice_all,
            "posts",
            json!({"data": {"n": 1, "author": p1_id}}),
        )
        .await;
    let b = s
        .post(
            &alice_all,
            "posts",
            json!({"data": {"n": 2, "author": p2_id}}),
        )
        .await;
    let c = s
        .post(
            &alice_all,
            "posts",
            json!({"data": {"n": 3, "author": [p1_id, p2_id]}}),
        )
        .await;
    // References that lead nowhere: not an id, an id of nothing, an id in an object.
    s.post(
        &alice_all,
        "posts",
        json!({"data": {"n": 4, "author": ["nobody", Uuid::new_v4(), {"id": p1_id}]}}),
    )
    .await;
    s.post(
        &alice_all,
        "posts",
        json!({"data": {"n": 5, "author": note_id}}),
    )
    .await;
    s.post(
        &alice_all,
        "posts",
        json!({"data": {"n": 6, "author": p4_id}}),
    )
    .await;

    let all_posts = json!({"type": "posts", "sort": "data.n", "expand": ["data.author"]});
    let expanded_ids = |answer: &Value| -> BTreeSet<String> {
        answer["expanded"]
            .as_object()
            .unwrap_or_else(|| panic!("`expanded` is an object: {answer}"))
            .keys()
            .cloned()
            .collect()
    };

    let reader = s.token(ALICE, &["read:posts", "read:profiles"]);
    let answer = query_ok(&s, &reader, &all_posts).await;
    assert_eq!(answer["docs"].as_array().unwrap().len(), 6, "{answer}");
    assert_eq!(
        expanded_ids(&answer),
        BTreeSet::from([p1_id.clone()]),
        "the public profile only (not the private one, nor the one denied to Alice): {answer}"
    );
    // The whole document as a reader gets it: everything but the ACL, which only its owner sees.
    let mut p1_as_read = p1.clone();
    p1_as_read.as_object_mut().unwrap().remove("acl");
    assert_eq!(answer["expanded"][&p1_id], p1_as_read, "the whole document");

    // Each post alone: A and C reach P1; B reaches nothing Alice may read.
    for (post, want) in [
        (&a, BTreeSet::from([p1_id.clone()])),
        (&b, BTreeSet::new()),
        (&c, BTreeSet::from([p1_id.clone()])),
    ] {
        let q = json!({"type": "posts", "where": {"id": post["id"]}, "expand": ["data.author"]});
        let answer = query_ok(&s, &reader, &q).await;
        assert_eq!(ids(&answer["docs"]), vec![id_of(post)]);
        assert_eq!(expanded_ids(&answer), want, "{post}: {answer}");
    }
    // Only what this page refers to: the first page (A) holds P1 only.
    let first = query_ok(
        &s,
        &reader,
        &json!({"type": "posts", "sort": "data.n", "limit": 1, "expand": ["data.author"]}),
    )
    .await;
    assert_eq!(ids(&first["docs"]), vec![id_of(&a)]);
    assert_eq!(expanded_ids(&first), BTreeSet::from([p1_id.clone()]));

    // Without read:profiles the token may not see profiles, whatever their ACL.
    let posts_only = s.token(ALICE, &["read:posts"]);
    let answer = query_ok(&s, &posts_only, &all_posts).await;
    assert_eq!(answer["docs"].as_array().unwrap().len(), 6);
    assert_eq!(answer["expanded"], json!({}), "{answer}");

    // With read:notes too, the public note joins.
    let wider = s.token(ALICE, &["read:posts", "read:profiles", "read:notes"]);
    let answer = query_ok(&s, &wider, &all_posts).await;
    assert_eq!(
        expanded_ids(&answer),
        BTreeSet::from([p1_id.clone(), note_id.clone()])
    );

    // `readOnce` answers the same.
    let mut ws = Ws::connect(&s.base, Some(&reader)).await;
    let mut q = all_posts.clone();
    q["op"] = json!("readOnce");
    let reply = ws.request(q).await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(expanded_ids(&reply), BTreeSet::from([p1_id.clone()]));
    ws.close().await;
    let mut ws = Ws::connect(&s.base, Some(&posts_only)).await;
    let mut q = all_posts.clone();
    q["op"] = json!("readOnce");
    let reply = ws.request(q).await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["expanded"], json!({}), "{reply}");
    ws.close().await;
    s.finish().await;
}

/// A token attenuated to one type (`check if doc_type("posts")`) may query that type, but
/// `expand` must not hand out documents of types the attenuation excludes — as the change feed
/// (`GET /v1/changes`) already refuses them to such a token.
#[tokio::test]
async fn expand_honours_token_attenuations() {
    let s = TestServer::start().await;
    let alice_all = s.token(ALICE, &["*"]);
    let bob_all = s.token(BOB, &["*"]);
    let profile = s
        .post(
            &bob_all,
            "profiles",
            json!({"acl": {"read": {"allow": ["*"]}}, "data": {"name": "bob"}}),
        )
        .await;
    let own_profile = s
        .post(&alice_all, "profiles", json!({"data": {"name": "alice"}}))
        .await;
    s.post(
        &alice_all,
        "posts",
        json!({"data": {"author": [profile["id"], own_profile["id"]]}}),
    )
    .await;

    let reader = s.token(ALICE, &["read:posts", "read:profiles"]);
    let attenuated = {
        use biscuit_auth::{Biscuit, macros::block};
        let public = s.server.as_ref().unwrap().app().tokens.public_key();
        Biscuit::from_base64(&reader, public)
            .unwrap()
            .append(block!(r#"check if doc_type("posts");"#))
            .unwrap()
            .to_base64()
            .unwrap()
    };
    let q = json!({"type": "posts", "expand": ["data.author"]});
    // Unattenuated, both profiles come along.
    let answer = query_ok(&s, &reader, &q).await;
    assert_eq!(answer["expanded"].as_object().unwrap().len(), 2, "{answer}");
    // The attenuated token cannot read profiles directly…
    let (status, answer) = s.query(&attenuated, &json!({"type": "profiles"})).await;
    assert_error(
        status,
        &answer,
        (403, "token_restricted", None),
        &json!("profiles"),
    );
    // …so not through `expand` either, over REST or `readOnce`.
    let answer = query_ok(&s, &attenuated, &q).await;
    assert_eq!(answer["docs"].as_array().unwrap().len(), 1, "{answer}");
    let mut ws = Ws::connect(&s.base, Some(&attenuated)).await;
    let mut once = q.clone();
    once["op"] = json!("readOnce");
    let reply = ws.request(once).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let leaked = |expanded: &Value| -> Vec<String> {
        expanded
            .as_object()
            .unwrap()
            .values()
            .map(|d| {
                format!(
                    "{} of {}",
                    d["type"].as_str().unwrap(),
                    d["owner"].as_str().unwrap()
                )
            })
            .collect()
    };
    assert_eq!(
        (leaked(&answer["expanded"]), leaked(&reply["expanded"])),
        (vec![], vec![]),
        "(POST /v1/query, readOnce): expand returned profiles to a token attenuated to posts"
    );
    ws.close().await;
    s.finish().await;
}

#[tokio::test]
async fn global_queries_never_return_documents_denied_to_the_caller() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let bob = s.token(BOB, &["*"]);
    let carol = s.token(CAROL, &["*"]);
    let public = json!({"read": {"allow": ["*"]}});
    let b1 = s
        .post(&bob, "notices", json!({"acl": public, "data": {"n": 1}}))
        .await;
    let denied = s
        .post(
            &bob,
            "notices",
            json!({"acl": {"read": {"allow": ["*"], "deny": [ALICE]}}, "data": {"n": 2}}),
        )
        .await;
    let c3 = s
        .post(
            &carol,
            "notices",
            json!({"acl": {"read": {"allow": ["*"], "deny": [BOB]}}, "data": {"n": 3}}),
        )
        .await;
    let denied_too = s
        .post(
            &carol,
            "notices",
            json!({"acl": {"read": {"allow": ["*"], "deny": [BOB, ALICE]}}, "data": {"n": 4}}),
        )
        .await;
    // Not public: private, or shared with Alice by name (a global query is over public ones).
    s.post(&carol, "notices", json!({"data": {"n": 5}})).await;
    s.post(
        &bob,
        "notices",
        json!({"acl": {"read": {"allow": [ALICE]}}, "data": {"n": 6}}),
    )
    .await;
    let a7 = s
        .post(&alice, "notices", json!({"acl": public, "data": {"n": 7}}))
        .await;
    let c8 = s
        .post(&carol, "notices", json!({"acl": public, "data": {"n": 8}}))
        .await;
    // Public in name, denied to everyone but its owner.
    let denied_all = s
        .post(
            &carol,
            "notices",
            json!({"acl": {"read": {"allow": ["*"], "deny": ["*"]}}, "data": {"n": 9}}),
        )
        .await;
    let wanted: Vec<String> = [&b1, &c3, &a7, &c8].into_iter().map(id_of).collect();

    // In pages of every size the denied documents never show, and paging goes on past them.
    for limit in [1, 2, 3, 100] {
        let mut q = json!({"type": "notices", "global": true, "sort": "data.n", "limit": limit});
        let mut seen = Vec::new();
        for _ in 0..20 {
            let page = query_ok(&s, &alice, &q).await;
            seen.extend(ids(&page["docs"]));
            match page.get("next") {
                Some(next) => q["cursor"] = next.clone(),
                None => break,
            }
        }
        assert_eq!(seen, wanted, "limit {limit}");
    }
    // Filters that would pick exactly the denied ones find nothing.
    for filter in [
        json!({"id": denied["id"]}),
        json!({"owner": BOB, "data.n": {"gte": 2}}),
        json!({"data.n": {"in": [2, 4, 9]}}),
        json!({"or": [{"data.n": 2}, {"data.n": 4}, {"data.n": {"gte": 9}}]}),
    ] {
        let q = json!({"type": "notices", "global": true, "where": filter});
        let answer = query_ok(&s, &alice, &q).await;
        assert_eq!(answer["docs"], json!([]), "{q} → {answer}");
    }

    // The same over `readOnce`.
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let reply = ws
        .request(json!({"op": "readOnce", "type": "notices", "global": true, "sort": "data.n"}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(ids(&reply["docs"]), wanted);
    let reply = ws
        .request(json!({"op": "readOnce", "type": "notices", "global": true,
                        "where": {"id": {"in": [denied["id"], denied_too["id"], denied_all["id"]]}}}))
        .await;
    assert_eq!(reply["docs"], json!([]), "{reply}");
    ws.close().await;

    // Denies are per caller: Bob sees what Alice may not, and not what he is denied.
    let answer = query_ok(
        &s,
        &bob,
        &json!({"type": "notices", "global": true, "sort": "data.n"}),
    )
    .await;
    let bobs: Vec<String> = [&b1, &denied, &a7, &c8].into_iter().map(id_of).collect();
    assert_eq!(ids(&answer["docs"]), bobs);
    s.finish().await;
}

/// Reads the next events of `sub` and checks their kinds and document ids, in order.
async fn expect_events(ws: &mut Ws, sub: &Value, expected: &[(&str, &Value)]) -> Vec<Value> {
    let mut events = Vec::new();
    for (kind, id) in expected {
        let e = ws.event(sub).await;
        let got = if e["event"] == "remove" {
            &e["id"]
        } else {
            &e["doc"]["id"]
        };
        assert_eq!(
            (e["event"].as_str(), got),
            (Some(*kind), *id),
            "expected {kind} of {id}, got {e}"
        );
        events.push(e);
    }
    events
}

#[tokio::test]
async fn live_query_with_new_operators_follows_its_window() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let bob = s.token(BOB, &["*"]);
    let post = |data: Value| s.post(&alice, "items", json!({ "data": data }));
    let a = post(json!({"n": 10, "tag": "x"})).await;
    let b = post(json!({"n": 8, "tag": "yes"})).await;
    let c = post(json!({"n": 6, "tag": "x"})).await;
    let d = post(json!({"n": 5, "tag": "yy"})).await; // on the `gte` bound: matches, 4th
    let e = post(json!({"n": 9, "tag": "z"})).await;
    post(json!({"n": 3, "tag": "x"})).await; // below the bound
    let h = post(json!({"n": 20, "tag": "Yes"})).await; // prefixes are case-sensitive
    post(json!({"n": "7", "tag": "x"})).await; // a string never compares with a number
    post(json!({"n": 12})).await; // no tag
    s.post(&bob, "items", json!({"data": {"n": 50, "tag": "x"}}))
        .await; // not Alice's
    let id = |doc: &Value| doc["id"].clone();
    let (a, b, c, d, e, h) = (id(&a), id(&b), id(&c), id(&d), id(&e), id(&h));

    let live = json!({
        "op": "read",
        "type": "items",
        "where": {"data.n": {"gte": 5}, "or": [{"data.tag": "x"}, {"data.tag": {"startsWith": "y"}}]},
        "sort": ["-data.n"],
        "limit": 3,
    });
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let reply = ws.request(live.clone()).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let sub = reply["sub"].clone();
    assert_eq!(
        ids(&reply["docs"]),
        [&a, &b, &c].map(|v| v.as_str().unwrap().to_owned()),
        "the window: 10, 8, 6"
    );

    // A new match inside the window (over the WebSocket) pushes the last one out.
    let g = ws
        .request(json!({"op": "write", "type": "items", "doc": {"data": {"n": 7, "tag": "ya"}}}))
        .await;
    assert_eq!(g["ok"], true, "{g}");
    let g = g["doc"]["id"].clone();
    let events = expect_events(&mut ws, &sub, &[("add", &g), ("remove", &c)]).await;
    // Window: a 10, b 8, g 7.

    // Moving within the window: a change carrying the new value.
    patch_data(&s, &alice, "items", b.as_str().unwrap(), json!({"n": 11})).await;
    let moved = expect_events(&mut ws, &sub, &[("change", &b)]).await;
    assert_eq!(moved[0]["doc"]["data"], json!({"n": 11, "tag": "yes"}));
    // Window: b 11, a 10, g 7.

    // Writes that do not match produce nothing: the next event is the next match's.
    patch_data(&s, &alice, "items", h.as_str().unwrap(), json!({"n": 21})).await;
    let r = ws
        .request(json!({"op": "write", "type": "items", "doc": {"data": {"n": 4, "tag": "x"}}}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    s.post(&bob, "items", json!({"data": {"n": 99, "tag": "yup"}}))
        .await;
    // A non-match made to match, entering the full window.
    patch_data(
        &s,
        &alice,
        "items",
        e.as_str().unwrap(),
        json!({"tag": "x"}),
    )
    .await;
    expect_events(&mut ws, &sub, &[("add", &e), ("remove", &g)]).await;
    // Window: b 11, a 10, e 9.

    // Leaving the window (no longer matching): the next match refills it.
    patch_data(
        &s,
        &alice,
        "items",
        a.as_str().unwrap(),
        json!({"tag": "q"}),
    )
    .await;
    expect_events(&mut ws, &sub, &[("remove", &a), ("add", &g)]).await;
    // Window: b 11, e 9, g 7.

    // Deleted over the WebSocket: removed, and refilled.
    let r = ws
        .request(json!({"op": "remove", "type": "items", "docId": b}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    expect_events(&mut ws, &sub, &[("remove", &b), ("add", &c)]).await;
    // Window: e 9, g 7, c 6.

    // The 4th match moves up into the window.
    patch_data(&s, &alice, "items", d.as_str().unwrap(), json!({"n": 8})).await;
    expect_events(&mut ws, &sub, &[("add", &d), ("remove", &c)]).await;
    // Window: e 9, d 8, g 7.

    // Below the `gte` bound: out, refilled.
    patch_data(&s, &alice, "items", e.as_str().unwrap(), json!({"n": 4})).await;
    expect_events(&mut ws, &sub, &[("remove", &e), ("add", &c)]).await;
    // Window: d 8, g 7, c 6.

    // Another prefix still matching: a change in place.
    patch_data(
        &s,
        &alice,
        "items",
        g.as_str().unwrap(),
        json!({"tag": "yz"}),
    )
    .await;
    let changed = expect_events(&mut ws, &sub, &[("change", &g)]).await;
    assert_eq!(changed[0]["doc"]["data"]["tag"], "yz");

    // The tag removed: out; nothing else matches, so the window is now every match.
    patch_data(
        &s,
        &alice,
        "items",
        g.as_str().unwrap(),
        json!({"tag": null}),
    )
    .await;
    expect_events(&mut ws, &sub, &[("remove", &g)]).await;
    // Window: d 8, c 6 (complete). A new match enters without pushing anything out.
    let z = s
        .post(&alice, "items", json!({"data": {"n": 30, "tag": "x"}}))
        .await;
    let z = id(&z);
    expect_events(&mut ws, &sub, &[("add", &z)]).await;

    // The events of one change carry distinct, growing cursors.
    let cursor =
        |e: &Value| -> vibe::feed::Cursor { e["cursor"].as_str().unwrap().parse().unwrap() };
    assert!(cursor(&events[0]) < cursor(&events[1]), "{events:?}");

    // The live window agrees with a one-shot read of the same query.
    let mut once = live.clone();
    once["op"] = json!("readOnce");
    let reply = ws.request(once).await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(
        ids(&reply["docs"]),
        [&z, &d, &c].map(|v| v.as_str().unwrap().to_owned())
    );
    let pong = ws.request(json!({"op": "ping"})).await;
    assert_eq!(pong["pong"], true);
    assert!(
        ws.pending.iter().all(|f| f["sub"] != sub),
        "no stray events: {:?}",
        ws.pending
    );
    ws.close().await;
    s.finish().await;
}

/// `exists` (a `null` value exists, a removed key does not), `not` and `contains` in a live
/// query, whose initial result comes from SQL and whose events from the in-memory evaluator;
/// and the same query written differently shares one live query.
#[tokio::test]
async fn live_query_with_exists_not_and_contains() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let post = |data: Value| s.post(&alice, "tasks", json!({ "data": data }));
    let t1 = post(json!({"title": "b", "labels": ["red", "blue"]})).await;
    let t2 = post(json!({"title": "a", "labels": ["blue"]})).await;
    let t3 = post(json!({"title": "c", "labels": "red"})).await; // a scalar contains itself
    post(json!({"title": "d", "labels": ["red"], "archived": null})).await; // archived exists
    post(json!({"title": "e", "labels": [["red"]]})).await; // nested arrays do not flatten
    post(json!({"title": "f", "labels": {"red": true}})).await;
    let id = |doc: &Value| doc["id"].clone();
    let (t1, t2, t3) = (id(&t1), id(&t2), id(&t3));

    let live = json!({
        "op": "read",
        "type": "tasks",
        "where": {"not": {"data.archived": {"exists": true}}, "data.labels": {"contains": "red"}},
        "sort": "data.title",
    });
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let reply = ws.request(live.clone()).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let sub = reply["sub"].clone();
    assert_eq!(
        ids(&reply["docs"]),
        [&t1, &t3].map(|v| v.as_str().unwrap().to_owned())
    );
    // Written otherwise — `exists: false`, keys reordered, a redundant `and` — it is the same
    // query, on another connection too.
    let mut ws2 = Ws::connect(&s.base, Some(&alice)).await;
    let same = ws2
        .request(json!({
            "op": "read",
            "type": "tasks",
            "where": {
                "data.labels": {"contains": "red"},
                "and": [{"data.archived": {"exists": false}}, {"data.labels": {"contains": "red"}}],
            },
            "sort": ["data.title"],
        }))
        .await;
    assert_eq!(same["sub"], sub, "{same}");
    assert_eq!(same["docs"], reply["docs"]);

    // Gaining the label: add.
    patch_data(
        &s,
        &alice,
        "tasks",
        t2.as_str().unwrap(),
        json!({"labels": ["blue", "red"]}),
    )
    .await;
    expect_events(&mut ws, &sub, &[("add", &t2)]).await;
    // `archived: null` (a whole replacement, to store the null): it exists, so out.
    let r = s
        .client
        .put(s.url(&format!("/v1/docs/tasks/{}", t1.as_str().unwrap())))
        .bearer_auth(&alice)
        .json(&json!({"data": {"title": "b", "labels": ["red", "blue"], "archived": null}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    expect_events(&mut ws, &sub, &[("remove", &t1)]).await;
    // A merge patch's null removes the key: in again.
    patch_data(
        &s,
        &alice,
        "tasks",
        t1.as_str().unwrap(),
        json!({"archived": null}),
    )
    .await;
    let back = expect_events(&mut ws, &sub, &[("add", &t1)]).await;
    assert!(
        back[0]["doc"]["data"].get("archived").is_none(),
        "{}",
        back[0]
    );
    // The scalar label changed: out.
    patch_data(
        &s,
        &alice,
        "tasks",
        t3.as_str().unwrap(),
        json!({"labels": "blue"}),
    )
    .await;
    expect_events(&mut ws, &sub, &[("remove", &t3)]).await;
    // Unrelated documents and ones that stay out: nothing; then a new match.
    post(json!({"title": "g", "labels": ["reddish"]})).await;
    post(json!({"title": "h", "labels": ["red"], "archived": false})).await;
    let t9 = id(&post(json!({"title": "z", "labels": ["green", "red"]})).await);
    expect_events(&mut ws, &sub, &[("add", &t9)]).await;

    // The second connection saw the same events.
    for (kind, doc) in [
        ("add", &t2),
        ("remove", &t1),
        ("add", &t1),
        ("remove", &t3),
        ("add", &t9),
    ] {
        expect_events(&mut ws2, &sub, &[(kind, doc)]).await;
    }
    let mut once = live.clone();
    once["op"] = json!("readOnce");
    let reply = ws.request(once).await;
    assert_eq!(
        ids(&reply["docs"]),
        [&t2, &t1, &t9].map(|v| v.as_str().unwrap().to_owned()),
        "{reply}"
    );
    ws.close().await;
    ws2.close().await;
    s.finish().await;
}

#[tokio::test]
async fn live_reads_refuse_cursor_and_expand() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    for n in 0..3 {
        s.post(&alice, "items", json!({"data": {"n": n}})).await;
    }
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let base = json!({"type": "items", "sort": "data.n", "limit": 1});
    let mut once = base.clone();
    once["op"] = json!("readOnce");
    let page = ws.request(once.clone()).await;
    assert_eq!(page["ok"], true, "{page}");
    let next = page["next"].clone();
    assert!(next.is_string(), "{page}");

    let mut refused = Vec::new();
    for (key, value) in [
        ("cursor", next.clone()),
        ("cursor", json!("garbage")),
        ("expand", json!(["data.author"])),
    ] {
        let mut read = base.clone();
        read["op"] = json!("read");
        read[key] = value;
        refused.push(read);
    }
    let mut both = base.clone();
    both["op"] = json!("read");
    both["cursor"] = next.clone();
    both["expand"] = json!(["data.author"]);
    refused.push(both);
    for read in refused {
        let reply = ws.request(read.clone()).await;
        assert_eq!(reply["error"]["code"], "invalid_query", "{read} → {reply}");
        assert!(reply.get("sub").is_none(), "{reply}");
    }
    // Invalid queries over `read` and `readOnce` name their part like the REST API.
    for op in ["read", "readOnce"] {
        let reply = ws
            .request(json!({"op": op, "type": "items", "where": {"data.n": {"gte": true}}}))
            .await;
        assert_eq!(reply["error"]["code"], "invalid_query", "{reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("where.data.n.gte: "), "{op}: {message}");
        let reply = ws
            .request(json!({"op": op, "type": "items", "sort": ["-data.n", "data.n"]}))
            .await;
        assert_eq!(reply["error"]["code"], "invalid_query", "{reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("sort[1]: "), "{op}: {message}");
    }
    // `readOnce` takes both, and a garbage cursor is `invalid_cursor` there.
    let mut with_both = once.clone();
    with_both["cursor"] = next.clone();
    with_both["expand"] = json!(["data.author"]);
    let reply = ws.request(with_both).await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["docs"][0]["data"]["n"], 1);
    assert_eq!(reply["expanded"], json!({}));
    let mut garbage = once.clone();
    garbage["cursor"] = json!("garbage");
    let reply = ws.request(garbage).await;
    assert_eq!(reply["error"]["code"], "invalid_cursor", "{reply}");

    // The refusals left no subscription behind; the same query without them is live.
    let mut read = base.clone();
    read["op"] = json!("read");
    let reply = ws.request(read).await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["docs"][0]["data"]["n"], 0);
    let (queries, subscribers) = ractor::call!(
        s.server.as_ref().unwrap().app().realtime,
        vibe_actors::realtime::RealtimeMsg::Stats
    )
    .unwrap();
    assert_eq!((queries, subscribers), (1, 1));
    ws.close().await;
    s.finish().await;
}

/// A page also ends once its documents pass `http.max_page_bytes` (a limit counts documents,
/// each as large as a body): the list and the query say where to go on, and the pages still
/// cover everything once; expansions past it are refused (counting only what the caller and the
/// token may read).
#[tokio::test]
async fn pages_are_bounded_in_bytes_too() {
    let s = TestServer::start_with(&[("http.max_page_bytes", "50000")]).await;
    let alice = s.token(ALICE, &["*"]);
    let filler = "x".repeat(30_000);
    let mut written = BTreeSet::new();
    for n in 0..3 {
        let doc = s
            .post(&alice, "posts", json!({"data": {"n": n, "filler": filler}}))
            .await;
        written.insert(doc["id"].as_str().unwrap().to_owned());
    }

    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/docs/posts?limit=100&cursor={c}"),
            None => "/v1/docs/posts?limit=100".to_owned(),
        };
        let (status, page) = s.get_json(&alice, &path).await;
        assert_eq!(status, 200, "{page}");
        let docs = page["docs"].as_array().unwrap();
        assert!(
            docs.len() <= 2,
            "a page stops at the document that passes the budget"
        );
        listed.extend(docs.iter().map(|d| d["id"].as_str().unwrap().to_owned()));
        pages += 1;
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert!(pages >= 2);
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert_eq!(listed.iter().cloned().collect::<BTreeSet<_>>(), written);

    let first = query_ok(&s, &alice, &json!({"type": "posts", "limit": 100})).await;
    assert_eq!(
        first["docs"].as_array().unwrap().len(),
        2,
        "{}",
        first["next"]
    );
    let rest = query_ok(
        &s,
        &alice,
        &json!({"type": "posts", "limit": 100, "cursor": first["next"]}),
    )
    .await;
    assert_eq!(rest["docs"].as_array().unwrap().len(), 1);

    // Three large documents named by one small one: their expansion would pass the budget.
    let ids: Vec<&String> = written.iter().collect();
    s.post(&alice, "links", json!({"data": {"to": ids}})).await;
    let (status, body) = s
        .query(&alice, &json!({"type": "links", "expand": ["data.to"]}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("page_too_large")),
        "{body}"
    );
    // Nor do documents of a type the token may not read count: a token for links alone gets the
    // link and no expansion, where the posts' size would refuse the page.
    let links_only = s.token(ALICE, &["read:links"]);
    let page = query_ok(
        &s,
        &links_only,
        &json!({"type": "links", "expand": ["data.to"]}),
    )
    .await;
    assert_eq!(
        (page["docs"].as_array().map(Vec::len), &page["expanded"]),
        (Some(1), &json!({})),
        "{page}"
    );

    // Only what the caller may read counts: Bob's large private documents, named by Alice's
    // link, neither pass the budget nor come back (so their size tells her nothing).
    let bob = s.token(BOB, &["*"]);
    let mut named = Vec::new();
    for _ in 0..2 {
        let private = s
            .post(&bob, "posts", json!({"data": {"filler": filler}}))
            .await;
        named.push(private["id"].clone());
    }
    let public = s
        .post(
            &bob,
            "posts",
            json!({"acl": {"read": {"allow": ["*"]}}, "data": {"n": "public"}}),
        )
        .await;
    named.push(public["id"].clone());
    s.post(&alice, "refs", json!({"data": {"to": named}})).await;
    let page = query_ok(&s, &alice, &json!({"type": "refs", "expand": ["data.to"]})).await;
    let expanded: Vec<&String> = page["expanded"]
        .as_object()
        .unwrap_or_else(|| panic!("`expanded` is an object: {page}"))
        .keys()
        .collect();
    assert_eq!(expanded, [public["id"].as_str().unwrap()], "{page}");
    s.finish().await;
}

/// A one-shot query that runs past `query.statement_timeout` is cancelled by PostgreSQL and
/// answered `query_timeout` (503 over REST, and over `readOnce`); the documents API goes on, its
/// writes and reads by id on a pool of their own.
#[tokio::test]
async fn a_query_past_its_statement_timeout_is_cancelled() {
    let s = TestServer::start_with(&[("query.statement_timeout", "\"1ms\"")]).await;
    let alice = s.token(ALICE, &["*"]);
    // Enough rows that an unindexed scan and sort takes well past a millisecond.
    let pool = sqlx::PgPool::connect(&s.db_url).await.unwrap();
    sqlx::query(
        "INSERT INTO documents (id, owner_did, type, data) \
         SELECT gen_random_uuid(), $1, 'posts', jsonb_build_object('n', g, 'pad', repeat('x', 100)) \
         FROM generate_series(1, 50000) g",
    )
    .bind(ALICE)
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let slow =
        json!({"type": "posts", "where": {"data.pad": {"startsWith": "y"}}, "sort": ["data.n"]});

    let (status, answer) = s.query(&alice, &slow).await;
    assert_error(status, &answer, (503, "query_timeout", None), &slow);
    let mut ws = Ws::connect(&s.base, Some(&alice)).await;
    let mut once = slow.clone();
    once["op"] = json!("readOnce");
    let reply = ws.request(once).await;
    assert_eq!(reply["error"]["code"], "query_timeout", "{reply}");
    let pong = ws.request(json!({"op": "ping"})).await;
    assert_eq!(pong["pong"], true, "the connection lives on: {pong}");
    ws.close().await;

    let created = s.post(&alice, "posts", json!({"data": {"n": 0}})).await;
    let id = created["id"].as_str().unwrap();
    let (status, read) = s.get_json(&alice, &format!("/v1/docs/posts/{id}")).await;
    assert_eq!((status, &read["data"]), (200, &json!({"n": 0})));
    s.finish().await;
}

/// A page's cursor carries its last sort value as stored: a number whose decimal form needs 17
/// digits reads back from the database as the same double (parsed exactly rounded), so the next
/// page neither repeats nor skips — it repeated the same document forever.
#[tokio::test]
async fn cursors_over_numbers_with_seventeen_digits_move_on() {
    let s = TestServer::start().await;
    let alice = s.token(ALICE, &["*"]);
    let mut written = Vec::new();
    for p in [
        json!(3.877_489_466_250_714e-9),
        json!(3.877_489_466_250_714_5e-9),
        json!(1),
    ] {
        let doc = s.post(&alice, "probes", json!({"data": {"p": p}})).await;
        written.push(doc["id"].as_str().unwrap().to_owned());
    }
    let mut listed = Vec::new();
    let mut cursor = Value::Null;
    for _ in 0..10 {
        let mut query = json!({"type": "probes", "sort": "data.p", "limit": 1});
        if !cursor.is_null() {
            query["cursor"] = cursor.clone();
        }
        let page = query_ok(&s, &alice, &query).await;
        listed.extend(
            page["docs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["id"].as_str().unwrap().to_owned()),
        );
        cursor = page["next"].clone();
        if cursor.is_null() {
            break;
        }
    }
    assert_eq!(listed, written, "each once, smallest first");
    s.finish().await;
}

/// A page expands at most `query.max_limit` × 4 ids: a page naming more is refused, not cut — a
/// cut dropped ids from `expanded` as if the caller could not read them.
#[tokio::test]
async fn a_page_naming_more_ids_than_it_expands_is_refused() {
    let s = TestServer::start_with(&[("query.max_limit", "2"), ("query.default_limit", "2")]).await;
    let alice = s.token(ALICE, &["*"]);
    let named: Vec<String> = (0..9).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    s.post(&alice, "links", json!({"data": {"to": named}}))
        .await;
    let query = json!({"type": "links", "expand": ["data.to"]});
    let (status, answer) = s.query(&alice, &query).await;
    assert_error(status, &answer, (400, "page_too_large", None), &query);
    // Eight (2 × 4) are expanded.
    s.post(&alice, "few", json!({"data": {"to": &named[..8]}}))
        .await;
    let page = query_ok(&s, &alice, &json!({"type": "few", "expand": ["data.to"]})).await;
    assert_eq!(page["expanded"], json!({}), "none of them exists");
    s.finish().await;
}
