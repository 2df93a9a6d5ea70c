//! The bad-input matrix: every route answers malformed or unauthorised requests with the right
//! status and stable error code, and the database is left exactly as it was.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

mod common;

use std::time::{Duration, SystemTime};

use common::{ALICE, BOB, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vibe::wire::Document;

/// A digest of everything stored, to prove a failed request changed nothing.
async fn fingerprint(pool: &sqlx::PgPool) -> (i64, i64, String) {
    sqlx::query_as(
        "SELECT count(*), coalesce(sum(rev), 0)::bigint, \
         coalesce(md5(string_agg(id::text || rev || data::text || acl::text, ',' ORDER BY id)), '') \
         FROM documents",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

struct Case {
    name: &'static str,
    method: Method,
    path: String,
    token: Option<String>,
    headers: Vec<(&'static str, String)>,
    body: Option<String>,
    status: StatusCode,
    code: &'static str,
}

fn case(
    name: &'static str,
    method: Method,
    path: &str,
    status: StatusCode,
    code: &'static str,
) -> Case {
    Case {
        name,
        method,
        path: path.to_owned(),
        token: None,
        headers: Vec::new(),
        body: None,
        status,
        code,
    }
}

impl Case {
    fn token(mut self, t: &str) -> Self {
        self.token = Some(t.to_owned());
        self
    }
    fn json(mut self, body: &str) -> Self {
        self.headers
            .push(("content-type", "application/json".to_owned()));
        self.body = Some(body.to_owned());
        self
    }
    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }
    fn raw_body(mut self, body: String) -> Self {
        self.body = Some(body);
        self
    }
}

#[tokio::test]
async fn every_route_rejects_bad_input_and_changes_nothing() {
    let s = TestServer::start_with(&[("http.max_body_bytes", "4096")]).await;
    let alice = s.token(ALICE, &["*"]);
    let bob = s.token(BOB, &["*"]);
    let read_only = s.token(ALICE, &["read:posts"]);
    let notes_only = s.token(ALICE, &["read:notes", "write:notes"]);
    let expired = s.token_until(ALICE, &["*"], SystemTime::now() - Duration::from_secs(60));
    let forged = {
        let dir = tempfile::tempdir().unwrap();
        vibe::auth::TokenAuthority::load_or_create(dir.path())
            .unwrap()
            .mint(ALICE, &["*".parse().unwrap()], Duration::from_secs(60))
            .unwrap()
    };
    let attenuated = {
        use biscuit_auth::{Biscuit, macros::block};
        let public = s.server.as_ref().unwrap().app().tokens.public_key();
        let biscuit = Biscuit::from_base64(&alice, public).unwrap();
        biscuit
            .append(block!(r#"check if operation("read");"#))
            .unwrap()
            .to_base64()
            .unwrap()
    };

    let r = s
        .client
        .post(s.url("/v1/docs/posts"))
        .bearer_auth(&alice)
        .json(&json!({"data": {"title": "victim"}}))
        .send()
        .await
        .unwrap();
    let victim: Document = r.json().await.unwrap();
    let item = format!("/v1/docs/posts/{}", victim.id);
    let missing = format!("/v1/docs/posts/{}", uuid::Uuid::now_v7());
    let big = format!(r#"{{"data": {{"blob": "{}"}}}}"#, "x".repeat(5000));
    use Method as M;
    use StatusCode as S;
    let mut cases = vec![
        // Body problems on the write routes.
        case(
            "malformed json",
            M::POST,
            "/v1/docs/posts",
            S::BAD_REQUEST,
            "bad_json",
        )
        .token(&alice)
        .json(r#"{"data": {"#),
        case("not json at all", M::PUT, &item, S::BAD_REQUEST, "bad_json")
            .token(&alice)
            .json("hello"),
        case(
            "malformed patch",
            M::PATCH,
            &item,
            S::BAD_REQUEST,
            "bad_json",
        )
        .token(&alice)
        .json("{,}"),
        case(
            "wrong content type",
            M::POST,
            "/v1/docs/posts",
            S::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .token(&alice)
        .header("content-type", "text/plain")
        .raw_body(r#"{"data": {}}"#.into()),
        case(
            "no content type",
            M::PUT,
            &item,
            S::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .token(&alice)
        .raw_body(r#"{"data": {}}"#.into()),
        case(
            "patch as text",
            M::PATCH,
            &item,
            S::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .token(&alice)
        .header("content-type", "text/plain")
        .raw_body("{}".into()),
        case(
            "oversized create",
            M::POST,
            "/v1/docs/posts",
            S::PAYLOAD_TOO_LARGE,
            "body_too_large",
        )
        .token(&alice)
        .json(&big),
        case(
            "oversized put",
            M::PUT,
            &item,
            S::PAYLOAD_TOO_LARGE,
            "body_too_large",
        )
        .token(&alice)
        .json(&big),
        case(
            "oversized patch",
            M::PATCH,
            &item,
            S::PAYLOAD_TOO_LARGE,
            "body_too_large",
        )
        .token(&alice)
        .json(&big),
        case(
            "data not an object",
            M::POST,
            "/v1/docs/posts",
            S::BAD_REQUEST,
            "invalid_body",
        )
        .token(&alice)
        .json(r#"{"data": [1]}"#),
        case(
            "missing data",
            M::POST,
            "/v1/docs/posts",
            S::BAD_REQUEST,
            "invalid_body",
        )
        .token(&alice)
        .json(r#"{"acl": {}}"#),
        case(
            "unknown field",
            M::POST,
            "/v1/docs/posts",
            S::BAD_REQUEST,
            "invalid_body",
        )
        .token(&alice)
        .json(r#"{"data": {}, "owner": "x"}"#),
        case(
            "bad acl entry",
            M::POST,
            "/v1/docs/posts",
            S::BAD_REQUEST,
            "invalid_body",
        )
        .token(&alice)
        .json(r#"{"data": {}, "acl": {"read": {"allow": ["everyone"]}}}"#),
        case(
            "bad client id",
            M::POST,
            "/v1/docs/posts",
            S::BAD_REQUEST,
            "invalid_body",
        )
        .token(&alice)
        .json(r#"{"id": "nope", "data": {}}"#),
        // Valid JSON that jsonb cannot store: refused by the database, answered as bad input.
        case(
            "nul in a string",
            M::POST,
            "/v1/docs/posts",
            S::BAD_REQUEST,
            "invalid_body",
        )
        .token(&alice)
        .json(r#"{"data": {"a": "x\u0000y"}}"#),
        case(
            "put nul in a key",
            M::PUT,
            &item,
            S::BAD_REQUEST,
            "invalid_body",
        )
        .token(&alice)
        .json(r#"{"data": {"\u0000": 1}}"#),
        case("patch nul", M::PATCH, &item, S::BAD_REQUEST, "invalid_body")
            .token(&alice)
            .json(r#"{"data": {"b": "\u0000"}}"#),
        case(
            "put data not an object",
            M::PUT,
            &item,
            S::BAD_REQUEST,
            "invalid_body",
        )
        .token(&alice)
        .json(r#"{"data": "x"}"#),
        case(
            "patch not an object",
            M::PATCH,
            &item,
            S::BAD_REQUEST,
            "invalid_body",
        )
        .token(&alice)
        .json("[1]"),
        case(
            "patch read-only field",
            M::PATCH,
            &item,
            S::BAD_REQUEST,
            "read_only_field",
        )
        .token(&alice)
        .json(r#"{"rev": 9}"#),
        case(
            "patch removes data",
            M::PATCH,
            &item,
            S::BAD_REQUEST,
            "invalid_body",
        )
        .token(&alice)
        .json(r#"{"data": null}"#),
        case(
            "patch breaks acl",
            M::PATCH,
            &item,
            S::BAD_REQUEST,
            "invalid_body",
        )
        .token(&alice)
        .json(r#"{"acl": {"read": 1}}"#),
        case(
            "bad if-match",
            M::PUT,
            &item,
            S::BAD_REQUEST,
            "bad_if_match",
        )
        .token(&alice)
        .header("if-match", "\"x\"")
        .json(r#"{"data": {}}"#),
        case(
            "if-match quoted twice",
            M::PUT,
            &item,
            S::BAD_REQUEST,
            "bad_if_match",
        )
        .token(&alice)
        .header("if-match", "\"\"\"1\"\"\"")
        .json(r#"{"data": {}}"#),
        case(
            "if-match signed",
            M::PUT,
            &item,
            S::BAD_REQUEST,
            "bad_if_match",
        )
        .token(&alice)
        .header("if-match", "+1")
        .json(r#"{"data": {}}"#),
        case(
            "stale if-match delete",
            M::DELETE,
            &item,
            S::PRECONDITION_FAILED,
            "rev_mismatch",
        )
        .token(&alice)
        .header("if-match", "\"5\""),
        case(
            "stale if-match patch",
            M::PATCH,
            &item,
            S::PRECONDITION_FAILED,
            "rev_mismatch",
        )
        .token(&alice)
        .header("if-match", "\"0\"")
        .json(r#"{"data": {"x": 1}}"#),
        // Names and ids.
        case(
            "list bad limit",
            M::GET,
            "/v1/docs/posts?limit=0",
            S::BAD_REQUEST,
            "invalid_query",
        )
        .token(&alice),
        case(
            "list huge limit",
            M::GET,
            "/v1/docs/posts?limit=100000",
            S::BAD_REQUEST,
            "invalid_query",
        )
        .token(&alice),
        case(
            "list unknown param",
            M::GET,
            "/v1/docs/posts?sort=up",
            S::BAD_REQUEST,
            "invalid_query",
        )
        .token(&alice),
        case(
            "list bad cursor",
            M::GET,
            "/v1/docs/posts?cursor=zzz",
            S::BAD_REQUEST,
            "invalid_cursor",
        )
        .token(&alice),
        case("not found", M::GET, &missing, S::NOT_FOUND, "not_found").token(&alice),
        case("put not found", M::PUT, &missing, S::NOT_FOUND, "not_found")
            .token(&alice)
            .json(r#"{"data": {}}"#),
        // A body that is wrong by itself is refused before the stored document is looked at:
        // neither a missing document nor a stale revision hides it.
        case(
            "patch data not an object, not found",
            M::PATCH,
            &missing,
            S::BAD_REQUEST,
            "invalid_body",
        )
        .token(&alice)
        .json(r#"{"data": 5}"#),
        case(
            "patch acl not an object, stale",
            M::PATCH,
            &item,
            S::BAD_REQUEST,
            "invalid_body",
        )
        .token(&alice)
        .header("if-match", "\"0\"")
        .json(r#"{"acl": [1]}"#),
        case(
            "delete not found",
            M::DELETE,
            &missing,
            S::NOT_FOUND,
            "not_found",
        )
        .token(&alice),
        // Routing.
        case(
            "unknown route",
            M::GET,
            "/v1/nothing",
            S::NOT_FOUND,
            "route_not_found",
        )
        .token(&alice),
        case(
            "too deep",
            M::GET,
            &format!("{item}/extra"),
            S::NOT_FOUND,
            "route_not_found",
        )
        .token(&alice),
        case(
            "wrong method on item",
            M::POST,
            &item,
            S::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        )
        .token(&alice)
        .json("{}"),
        case(
            "wrong method on collection",
            M::DELETE,
            "/v1/docs/posts",
            S::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        )
        .token(&alice),
        case(
            "wrong method on health",
            M::POST,
            "/health",
            S::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    // Bad type names and ids, on every document route.
    let routes = [
        (M::GET, "/v1/docs/{type}", false),
        (M::POST, "/v1/docs/{type}", false),
        (M::GET, "/v1/docs/{type}/{id}", true),
        (M::PUT, "/v1/docs/{type}/{id}", true),
        (M::PATCH, "/v1/docs/{type}/{id}", true),
        (M::DELETE, "/v1/docs/{type}/{id}", true),
    ];
    for (method, pattern, has_id) in &routes {
        let path = |t: &str, id: &str| pattern.replace("{type}", t).replace("{id}", id);
        let good = path("posts", &victim.id.to_string());
        let body = r#"{"data": {"changed": true}}"#;
        let with_body = |c: Case| {
            if *method == M::POST || *method == M::PUT || *method == M::PATCH {
                c.json(body)
            } else {
                c
            }
        };
        cases.push(with_body(
            case(
                "bad type",
                method.clone(),
                &path("Bad%20Type", &victim.id.to_string()),
                S::BAD_REQUEST,
                "invalid_type",
            )
            .token(&alice),
        ));
        cases.push(with_body(
            case(
                "type too long",
                method.clone(),
                &path(&"a".repeat(65), &victim.id.to_string()),
                S::BAD_REQUEST,
                "invalid_type",
            )
            .token(&alice),
        ));
        if *has_id {
            cases.push(with_body(
                case(
                    "bad uuid",
                    method.clone(),
                    &path("posts", "not-a-uuid"),
                    S::BAD_REQUEST,
                    "invalid_id",
                )
                .token(&alice),
            ));
            cases.push(with_body(
                case(
                    "another user's document",
                    method.clone(),
                    &good,
                    S::FORBIDDEN,
                    "forbidden",
                )
                .token(&bob),
            ));
        }
        cases.push(with_body(case(
            "no token",
            method.clone(),
            &good,
            S::UNAUTHORIZED,
            "unauthenticated",
        )));
        cases.push(with_body(
            case(
                "not bearer",
                method.clone(),
                &good,
                S::UNAUTHORIZED,
                "invalid_token",
            )
            .header("authorization", "Basic YWxpY2U6eA=="),
        ));
        cases.push(with_body(
            case(
                "garbage token",
                method.clone(),
                &good,
                S::UNAUTHORIZED,
                "invalid_token",
            )
            .token("garbage"),
        ));
        cases.push(with_body(
            case(
                "expired token",
                method.clone(),
                &good,
                S::UNAUTHORIZED,
                "token_expired",
            )
            .token(&expired),
        ));
        cases.push(with_body(
            case(
                "forged token",
                method.clone(),
                &good,
                S::UNAUTHORIZED,
                "invalid_token",
            )
            .token(&forged),
        ));
        cases.push(with_body(
            case(
                "wrong type scope",
                method.clone(),
                &good,
                S::FORBIDDEN,
                "missing_scope",
            )
            .token(&notes_only),
        ));
        if *method != M::GET {
            cases.push(with_body(
                case(
                    "read-only token writes",
                    method.clone(),
                    &good,
                    S::FORBIDDEN,
                    "missing_scope",
                )
                .token(&read_only),
            ));
            cases.push(with_body(
                case(
                    "attenuated to reads",
                    method.clone(),
                    &good,
                    S::FORBIDDEN,
                    "token_restricted",
                )
                .token(&attenuated),
            ));
        }
    }

    let pool = s.sql().await;
    let before = fingerprint(&pool).await;
    for c in cases {
        let mut request = s.client.request(c.method.clone(), s.url(&c.path));
        if let Some(token) = &c.token {
            request = request.bearer_auth(token);
        }
        for (name, value) in &c.headers {
            request = request.header(*name, value);
        }
        if let Some(body) = c.body {
            request = request.body(body);
        }
        let r = request.send().await.unwrap();
        let status = r.status();
        let allow = r.headers().get("allow").cloned();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (c.status, Some(c.code)),
            "case `{}` ({} {}): {body}",
            c.name,
            c.method,
            c.path
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{}",
            c.name
        );
        if status == S::METHOD_NOT_ALLOWED {
            assert!(allow.is_some(), "405 names the allowed methods");
        }
        if status == S::UNAUTHORIZED {
            // Nothing about a rejected token may echo it back.
            assert!(!body.to_string().contains("garbage"));
        }
    }
    assert_eq!(
        fingerprint(&pool).await,
        before,
        "a rejected request changed the database"
    );
    pool.close().await;
    s.finish().await;
}

/// A chunked body with no Content-Length is cut off at the limit, too.
#[tokio::test]
async fn chunked_oversized_body_is_refused() {
    let s = TestServer::start_with(&[("http.max_body_bytes", "4096")]).await;
    let alice = s.token(ALICE, &["*"]);
    let addr = s.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut request = format!(
        "POST /v1/docs/posts HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {alice}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    for _ in 0..10 {
        let chunk = "y".repeat(1000);
        request.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    request.push_str("0\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("body_too_large"), "{text}");
    assert_no_documents(&s).await;
    s.finish().await;
}

async fn assert_no_documents(s: &TestServer) {
    let pool = s.sql().await;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM documents")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 0, "a refused request stored a document");
    pool.close().await;
}

/// Reads whatever the server sends until it closes the connection; fails the test if it never
/// does (the bound is far above the timeouts under test).
async fn until_closed(stream: &mut tokio::net::TcpStream, case: &str) -> String {
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut received))
        .await
        .unwrap_or_else(|_| panic!("{case}: the server never closed the connection"))
        .unwrap();
    String::from_utf8_lossy(&received).into_owned()
}

/// A client that opens a connection and sends nothing, a head a byte short, or a body that
/// never completes does not hold the connection (and its file descriptor) forever; neither does
/// a kept-alive connection that never sends its next request.
#[tokio::test]
async fn silent_and_slow_connections_are_closed() {
    let s = TestServer::start_with(&[
        ("http.header_read_timeout", "\"1s\""),
        ("http.body_read_timeout", "\"1s\""),
    ])
    .await;
    let alice = s.token(ALICE, &["*"]);
    let addr = s.base.trim_start_matches("http://").to_owned();

    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    until_closed(&mut silent, "silent").await;

    let mut partial = tokio::net::TcpStream::connect(&addr).await.unwrap();
    partial
        .write_all(format!("GET /health HTTP/1.1\r\nhost: {addr}\r\n").as_bytes())
        .await
        .unwrap();
    let answer = until_closed(&mut partial, "partial head").await;
    assert!(!answer.contains("200 OK"), "{answer}");

    let mut kept = tokio::net::TcpStream::connect(&addr).await.unwrap();
    kept.write_all(format!("GET /health HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let answer = until_closed(&mut kept, "kept alive").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let mut slow_body = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow_body
        .write_all(
            format!(
                "POST /v1/docs/posts HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {alice}\r\n\
                 content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"data\":"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let answer = until_closed(&mut slow_body, "slow body").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");

    // HTTP/2 (prior knowledge): after its request, a connection that sends no other is closed
    // with a GOAWAY, which ends the client's side of it cleanly.
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(&addr).await.unwrap());
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let health = http::Request::get(format!("http://{addr}/health"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = h2.send_request(health).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drop(response);
    tokio::time::timeout(Duration::from_secs(60), connection)
        .await
        .expect("the server never closed the idle HTTP/2 connection")
        .unwrap()
        .expect("closed with a GOAWAY, not torn down");
    assert_no_documents(&s).await;
    s.finish().await;
}

/// Methods nobody routes do not become metric series of their own.
#[tokio::test]
async fn invented_methods_share_one_metrics_label() {
    let s = TestServer::start().await;
    for invented in ["FOO1", "FOO2"] {
        let response = s
            .client
            .request(
                Method::from_bytes(invented.as_bytes()).unwrap(),
                s.url("/health"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
    let metrics = s.metrics_text().await;
    assert!(!metrics.contains("FOO1"), "{metrics}");
    assert!(
        metrics.contains(r#"route="/health",method="other",status="405""#),
        "{metrics}"
    );
    s.finish().await;
}

/// /health reports the database; /metrics counts requests per route and status.
#[tokio::test]
async fn health_and_metrics() {
    let s = TestServer::start().await;
    let health: Value = s
        .client
        .get(s.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["database"], "ok");
    let alice = s.token(ALICE, &["*"]);
    s.client
        .get(s.url("/v1/docs/posts"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    let metrics = s.metrics_text().await;
    assert!(
        metrics.contains(
            r#"vibe_http_requests_total{route="/v1/docs/{type}",method="GET",status="200"}"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("vibe_http_request_duration_seconds_bucket"),
        "{metrics}"
    );
    s.finish().await;
}
