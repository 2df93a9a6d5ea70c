//! Index governance end to end, on 100,000 documents: a hot range query's shape is recorded
//! (without its values), an expression index is suggested with its evidence, approved, built
//! concurrently, and then the plan uses it and touches a fraction of the buffers (asserted on
//! `EXPLAIN (ANALYZE, BUFFERS)`, never on time); an unused managed index is pruned while the core
//! indexes stay; the optional policy builds one without approval; admin routes need `admin`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::TestServer;

const ALICE: &str = "did:key:zAlice";

async fn call(
    s: &TestServer,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = s.client.request(method, s.url(path)).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(s: &TestServer, path: &str, token: &str) -> (u16, Value) {
    call(s, reqwest::Method::GET, path, token, None).await
}

async fn post(s: &TestServer, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    call(s, reqwest::Method::POST, path, token, body).await
}

/// Every node of a plan tree.
fn nodes(plan: &Value, out: &mut Vec<Value>) {
    out.push(plan.clone());
    if let Some(children) = plan["Plans"].as_array() {
        for child in children {
            nodes(child, out);
        }
    }
}

/// The index names a plan reads, and the shared buffers its top node touched.
async fn explain(s: &TestServer, admin: &str, query: &Value) -> (Vec<String>, i64) {
    let (status, body) = post(
        s,
        "/v1/admin/explain",
        admin,
        Some(json!({"query": query, "analyze": true})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let top = &body["plan"][0]["Plan"];
    let mut all = Vec::new();
    nodes(top, &mut all);
    let indexes = all
        .iter()
        .filter_map(|n| n["Index Name"].as_str().map(str::to_owned))
        .collect();
    let buffers =
        top["Shared Hit Blocks"].as_i64().unwrap() + top["Shared Read Blocks"].as_i64().unwrap();
    (indexes, buffers)
}

/// Polls the managed index list (builds run in the background) until some index satisfies
/// `done`, and returns it; a failed build fails the test.
async fn wait_for_index(s: &TestServer, admin: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(s, "/v1/admin/indexes", admin).await;
        assert_eq!(status, 200, "{body}");
        let indexes = body["indexes"].as_array().unwrap();
        assert!(indexes.iter().all(|i| i["status"] != "failed"), "{body}");
        if let Some(index) = indexes.iter().find(|i| done(i)) {
            return index.clone();
        }
        assert!(Instant::now() < deadline, "no index got there: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`wait_for_index`] for the index named `name`.
async fn wait_for(s: &TestServer, admin: &str, name: &str, done: impl Fn(&Value) -> bool) -> Value {
    wait_for_index(s, admin, |i| i["name"] == name && done(i)).await
}

#[tokio::test]
async fn a_hot_range_query_gets_its_index_and_an_unused_one_goes() {
    let s = TestServer::start_with(&[
        ("indexes.suggest_min_calls", "20"),
        ("indexes.unused_after", "\"0s\""),
    ])
    .await;
    let pool = s.sql().await;
    // A permutation of 0..100000 as scores, so the highest ten are scattered in creation order.
    sqlx::query(
        "INSERT INTO documents (id, owner_did, type, data) \
         SELECT gen_random_uuid(), $1, 'items', \
                jsonb_build_object('score', (i * 7919) % 100000, 'tag', 't' || (i % 10)) \
         FROM generate_series(1, 100000) AS i",
    )
    .bind(ALICE)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE documents")
        .execute(&pool)
        .await
        .unwrap();

    let user = s.token(ALICE, &["read:items"]);
    let admin = s.token(ALICE, &["admin", "read:items"]);
    let hot = json!({"type": "items", "where": {"data.score": {"gte": 99990}}, "limit": 10});
    for _ in 0..25 {
        let (status, body) = post(&s, "/v1/query", &user, Some(hot.clone())).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["docs"].as_array().unwrap().len(), 10);
    }
    // An equality the GIN index already serves: never suggested.
    for _ in 0..25 {
        let (status, _) = post(
            &s,
            "/v1/query",
            &user,
            Some(json!({"type": "items", "where": {"data.tag": "t3"}, "limit": 5})),
        )
        .await;
        assert_eq!(status, 200);
    }

    // Administration needs the admin scope; `*` is not enough.
    for token in [&user, &s.token(ALICE, &["*"])] {
        let (status, body) = get(&s, "/v1/admin/indexes/suggestions", token).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (403, Some("missing_scope"))
        );
    }

    let (before_indexes, before_buffers) = explain(&s, &admin, &hot).await;
    assert!(
        before_indexes.iter().all(|i| !i.starts_with("vibe_auto_")),
        "{before_indexes:?}"
    );

    let (status, body) = get(&s, "/v1/admin/indexes/suggestions", &admin).await;
    assert_eq!(status, 200, "{body}");
    let suggestions = body["suggestions"].as_array().unwrap();
    assert_eq!(suggestions.len(), 1, "only the range path: {body}");
    let suggestion = &suggestions[0];
    assert_eq!(suggestion["type"], "items");
    assert_eq!(suggestion["path"], "data.score");
    assert_eq!(suggestion["kind"], "number");
    let evidence = &suggestion["evidence"];
    assert!(evidence["calls"].as_i64().unwrap() >= 25, "{evidence}");
    assert!(evidence["p95Ms"].as_f64().unwrap() > 0.0, "{evidence}");
    assert!(
        evidence["explainCostBefore"].as_f64().unwrap() > 0.0,
        "{evidence}"
    );
    assert_eq!(evidence["shape"]["where"]["op"], "gte", "{evidence}");
    // Shapes hold kinds, never values or callers.
    let shapes: Vec<String> = sqlx::query_scalar("SELECT shape::text FROM query_shapes")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(!shapes.is_empty());
    assert!(
        shapes
            .iter()
            .all(|t| !t.contains("99990") && !t.contains("t3") && !t.contains(ALICE)),
        "{shapes:?}"
    );

    let (status, index) = post(
        &s,
        "/v1/admin/indexes",
        &admin,
        Some(json!({"type": "items", "path": "data.score", "kind": "number"})),
    )
    .await;
    assert_eq!(status, 202, "{index}");
    let name = index["name"].as_str().unwrap().to_owned();
    assert!(name.starts_with("vibe_auto_"));
    let ready = wait_for(&s, &admin, &name, |i| i["status"] == "ready").await;
    assert_eq!(ready["requestedBy"], ALICE);
    // Approved and built: no longer suggested.
    let (_, body) = get(&s, "/v1/admin/indexes/suggestions", &admin).await;
    assert_eq!(body["suggestions"], json!([]), "{body}");

    let (after_indexes, after_buffers) = explain(&s, &admin, &hot).await;
    assert!(
        after_indexes.contains(&name),
        "the plan uses {name}: {after_indexes:?}"
    );
    assert!(
        after_buffers * 10 < before_buffers,
        "buffers {before_buffers} -> {after_buffers}"
    );
    let (status, body) = post(&s, "/v1/query", &user, Some(hot.clone())).await;
    assert_eq!((status, body["docs"].as_array().unwrap().len()), (200, 10));

    // PostgreSQL reports index scans a moment later (per backend, at most once a second): wait
    // for both made since the build (the EXPLAIN ANALYZE and the query), so that the pruning
    // below sees them all at its first look and none at its second.
    wait_for(&s, &admin, &name, |i| i["scans"].as_i64().unwrap_or(0) >= 2).await;
    let (status, body) = post(&s, "/v1/admin/indexes/prune", &admin, None).await;
    assert_eq!(
        (status, &body["dropped"]),
        (200, &json!([])),
        "used since last check"
    );
    // Statistics reset (crash recovery, a failover, `pg_stat_reset`) start the count again from
    // zero: a count below the last one seen is use too, not a reason to drop.
    sqlx::query("UPDATE managed_indexes SET last_scans = 1000000 WHERE name = $1")
        .bind(&name)
        .execute(&pool)
        .await
        .unwrap();
    let (_, body) = post(&s, "/v1/admin/indexes/prune", &admin, None).await;
    assert_eq!(body["dropped"], json!([]), "a reset count is not disuse");
    // No scans since (unused_after is 0s here): dropped.
    let (_, body) = post(&s, "/v1/admin/indexes/prune", &admin, None).await;
    assert_eq!(body["dropped"], json!([name]));
    wait_for(&s, &admin, &name, |i| i["status"] == "dropped").await;
    let left: Vec<String> =
        sqlx::query_scalar("SELECT indexname::text FROM pg_indexes WHERE tablename = 'documents'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(!left.contains(&name), "{left:?}");
    for core in [
        "documents_pkey",
        "documents_data",
        "documents_owner_type_created",
    ] {
        assert!(left.iter().any(|i| i == core), "{core} must stay: {left:?}");
    }
    pool.close().await;
    s.finish().await;
}

#[tokio::test]
async fn the_policy_builds_indexes_past_its_threshold() {
    let s = TestServer::start_with(&[
        ("indexes.suggest_min_calls", "5"),
        ("indexes.auto_create_min_calls", "5"),
        ("indexes.flush_interval", "\"100ms\""),
    ])
    .await;
    let user = s.token(ALICE, &["read:items"]);
    let admin = s.token(ALICE, &["admin"]);
    for i in 0..6 {
        let (status, body) = call(
            &s,
            reqwest::Method::POST,
            "/v1/query",
            &user,
            Some(json!({"type": "items", "where": {"data.name": {"lt": format!("m{i}")}}})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let index = wait_for_index(&s, &admin, |i| i["status"] == "ready").await;
    assert_eq!(index["requestedBy"], "policy");
    assert_eq!(index["path"], "data.name");
    assert_eq!(index["kind"], "string");
    assert!(
        index["definition"]
            .as_str()
            .unwrap()
            .contains(r#"COLLATE "C""#),
        "{index}"
    );

    // An index dropped (here by hand, as a prune would) is not built again by the policy, however
    // hot its shape stays; the next hot path is, with its whole path (a field named `data` too).
    let pool = s.sql().await;
    let name = index["name"].as_str().unwrap().to_owned();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP INDEX {name}")))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE managed_indexes SET status = 'dropped' WHERE name = $1")
        .bind(&name)
        .execute(&pool)
        .await
        .unwrap();
    for i in 0..6 {
        for path in ["data.name", "data.data.level"] {
            let (status, body) = call(
                &s,
                reqwest::Method::POST,
                "/v1/query",
                &user,
                Some(json!({"type": "items", "where": {path: {"lt": format!("m{i}")}}})),
            )
            .await;
            assert_eq!(status, 200, "{body}");
        }
    }
    let next = wait_for_index(&s, &admin, |i| i["name"] != name && i["status"] == "ready").await;
    assert_eq!(next["path"], "data.data.level", "{next}");
    let (_, body) = get(&s, "/v1/admin/indexes", &admin).await;
    let dropped = body["indexes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap();
    assert_eq!(dropped["status"], "dropped", "{body}");
    pool.close().await;
    s.finish().await;
}

/// A managed index bounds the values at its path (a B-tree entry is at most ~2.7 KB): a write
/// with a larger one is refused with a clear 400, not an internal error, and nothing is written;
/// other writes go on.
#[tokio::test]
async fn a_value_too_large_for_its_index_is_refused_clearly() {
    let s = TestServer::start().await;
    let admin = s.token(ALICE, &["admin"]);
    let writer = s.token(ALICE, &["write:items", "read:items"]);
    let (status, index) = post(
        &s,
        "/v1/admin/indexes",
        &admin,
        Some(json!({"type": "items", "path": "data.name", "kind": "string"})),
    )
    .await;
    assert_eq!(status, 202, "{index}");
    let name = index["name"].as_str().unwrap().to_owned();
    wait_for(&s, &admin, &name, |i| i["status"] == "ready").await;

    // Random hex: it compresses to about half, still far past the entry's maximum.
    let huge: String = (0..400)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    let (status, body) = post(
        &s,
        "/v1/docs/items",
        &writer,
        Some(json!({"data": {"name": huge}})),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("indexed_value_too_large")),
        "{body}"
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM documents WHERE type = 'items'")
        .fetch_one(&s.sql().await)
        .await
        .unwrap();
    assert_eq!(stored, 0, "nothing was written");
    let (status, body) = post(
        &s,
        "/v1/docs/items",
        &writer,
        Some(json!({"data": {"name": "short", "other": huge}})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    s.finish().await;
}

/// A build its node stopped in the middle of (the row left `building`, nobody running it) is
/// settled when a node next starts: `failed` with the reason when no valid index exists, so it
/// can be approved again — a `building` row was otherwise stuck for good (hidden from
/// suggestions, ignored by approve and prune). A drop it stopped in the middle of (the row
/// claimed `dropping`) is finished.
#[tokio::test]
async fn a_build_its_node_stopped_is_settled_at_the_next_start() {
    let (db_name, db_url) = common::fresh_database().await;
    let first = TestServer::start_on(&db_url, &[]).await;
    let pool = first.sql().await;
    sqlx::query(
        "INSERT INTO managed_indexes (name, doc_type, path, kind, definition, status, \
                                      requested_by, created_at) \
         VALUES ('vibe_auto_00000000000000aa', 'items', '{score}', 'number', 'CREATE …', \
                 'building', 'did:key:zAlice', now() - interval '2 minutes')",
    )
    .execute(&pool)
    .await
    .unwrap();
    // And a drop it stopped in the middle of: the row claimed (`dropping`), the index still there.
    sqlx::query("CREATE INDEX vibe_auto_00000000000000bb ON documents ((data ->> 'rank'))")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO managed_indexes (name, doc_type, path, kind, definition, status, \
                                      requested_by) \
         VALUES ('vibe_auto_00000000000000bb', 'items', '{rank}', 'string', 'CREATE …', \
                 'dropping', 'policy')",
    )
    .execute(&pool)
    .await
    .unwrap();
    // The first node stops; the next one of the cluster (its keys) starts.
    let keys = tempfile::tempdir().unwrap();
    std::fs::create_dir(keys.path().join("keys")).unwrap();
    for file in ["root.key", "secrets.key"] {
        let from = first.data_dir.path().join("keys").join(file);
        std::fs::copy(from, keys.path().join("keys").join(file)).unwrap();
    }
    first.finish().await;
    let data_dir = serde_json::to_string(&keys.path()).unwrap();
    let second = TestServer::start_on(&db_url, &[("data_dir", data_dir.as_str())]).await;

    let admin = second.token(ALICE, &["admin"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    let row = |body: &Value, name: &str| {
        body["indexes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} listed: {body}"))
    };
    let (settled, dropped) = loop {
        let (_, body) = get(&second, "/v1/admin/indexes", &admin).await;
        let settled = row(&body, "vibe_auto_00000000000000aa");
        let dropped = row(&body, "vibe_auto_00000000000000bb");
        let done = settled["status"] != "building" && dropped["status"] != "dropping";
        if done || Instant::now() > deadline {
            break (settled, dropped);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(dropped["status"], "dropped", "{dropped}");
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class WHERE relname = 'vibe_auto_00000000000000bb'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(left, 0, "the index its drop was claimed for is gone");
    assert_eq!(settled["status"], "failed", "{settled}");
    assert!(
        settled["error"].as_str().unwrap().contains("interrupted"),
        "{settled}"
    );
    pool.close().await;
    second.finish().await;
    common::drop_database(&db_name).await;
}

/// Clients choose the data paths a shape names: `query_shapes` keeps at most
/// `indexes.max_shapes` rows (past that only known shapes are counted), and a prune forgets the
/// shapes nobody ran for `indexes.shape_retention`.
#[tokio::test]
async fn recorded_shapes_are_bounded_and_pruned() {
    let s = TestServer::start_with(&[("indexes.max_shapes", "2")]).await;
    let user = s.token(ALICE, &["read:items"]);
    let admin = s.token(ALICE, &["admin"]);
    let query = |path: &str| json!({"type": "items", "where": {format!("data.{path}"): {"gt": 1}}});
    let run = async |path: &str| {
        let (status, body) = post(&s, "/v1/query", &user, Some(query(path))).await;
        assert_eq!(status, 200, "{body}");
    };
    // Suggestions flush what this node recorded first.
    let flush = async || {
        let (status, body) = get(&s, "/v1/admin/indexes/suggestions", &admin).await;
        assert_eq!(status, 200, "{body}");
    };
    run("a").await;
    run("b").await;
    flush().await;
    run("c").await;
    run("a").await;
    flush().await;
    let pool = s.sql().await;
    let shapes: Vec<(String, i64)> =
        sqlx::query_as("SELECT shape->'where'->>'field', calls FROM query_shapes ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        shapes,
        vec![("data.a".to_owned(), 2), ("data.b".to_owned(), 1)],
        "the new shape was dropped, the known one counted"
    );

    sqlx::query("UPDATE query_shapes SET last_seen = now() - interval '31 days' WHERE shape->'where'->>'field' = 'data.b'")
        .execute(&pool)
        .await
        .unwrap();
    let (status, body) = post(&s, "/v1/admin/indexes/prune", &admin, None).await;
    assert_eq!(status, 200, "{body}");
    let left: Vec<String> = sqlx::query_scalar("SELECT shape->'where'->>'field' FROM query_shapes")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(left, vec!["data.a".to_owned()]);

    // One flush of several new shapes stops at the bound too (room for one here).
    for path in ["d", "e", "f"] {
        run(path).await;
    }
    flush().await;
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM query_shapes")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(held, 2, "`indexes.max_shapes` holds within one flush");
    pool.close().await;
    s.finish().await;
}
