//! Shared test helpers: a Vibe server on 127.0.0.1:0 backed by a fresh database of its own on the
//! machine's PostgreSQL, tokens for it, and a direct SQL connection to check what was stored.
#![allow(dead_code, unreachable_pub)] // each test binary uses a different subset; `pub` is for them

pub mod oidc;

use std::time::{Duration, SystemTime};

use figment::providers::{Format, Serialized, Toml};
use sqlx::{Connection, Executor, PgPool};
use vibe::auth::Scope;
use vibe::config::{Config, DEFAULT_TOML};
use vibe::server::RunningServer;

/// The server the tests create their databases on (`TEST_DATABASE_URL` overrides it).
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Creates an empty database with a unique name and returns its URL.
pub async fn fresh_database() -> (String, String) {
    let name = format!("vibe_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin_url())
        .await
        .expect("connect to the test PostgreSQL");
    // The name is generated above from a UUID: no outside input reaches the statement.
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .expect("create test database");
    conn.close().await.ok();
    let base = admin_url();
    let url = match base.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{name}"),
        None => panic!("TEST_DATABASE_URL must name a database"),
    };
    (name, url)
}

pub async fn drop_database(name: &str) {
    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url()).await {
        let _ = conn
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .await;
    }
}

pub struct TestServer {
    pub server: Option<RunningServer>,
    pub base: String,
    pub client: reqwest::Client,
    pub db_name: String,
    pub db_url: String,
    pub data_dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts a server; `overrides` are `(dotted key, TOML value)` pairs over the defaults.
    pub async fn start_with(overrides: &[(&str, &str)]) -> Self {
        let (db_name, db_url) = fresh_database().await;
        Self::start_at(db_name, db_url, overrides).await
    }

    /// Another node of this one's cluster: the same database and the same keys (this node's
    /// data directory, as nodes of a cluster share their root and secrets keys), with
    /// `overrides`. Its `finish` leaves the database to this node's owner.
    pub async fn another_node(&self, overrides: &[(&str, &str)]) -> Self {
        let shared_dir = serde_json::to_string(&self.data_dir.path()).unwrap();
        let mut all = vec![("data_dir", shared_dir.as_str())];
        all.extend_from_slice(overrides);
        Self::start_on(&self.db_url, &all).await
    }

    /// Starts a server on a database the test owns (it is not dropped by `finish`).
    pub async fn start_on(db_url: &str, overrides: &[(&str, &str)]) -> Self {
        Self::start_at(String::new(), db_url.to_owned(), overrides).await
    }

    async fn start_at(db_name: String, db_url: String, overrides: &[(&str, &str)]) -> Self {
        let data_dir = tempfile::tempdir().expect("tempdir");
        let mut figment = figment::Figment::new()
            .merge(Toml::string(DEFAULT_TOML))
            .merge(Serialized::default("listen", "127.0.0.1:0"))
            .merge(Serialized::default("database_url", &db_url))
            .merge(Serialized::default("database.max_connections", 4))
            .merge(Serialized::default(
                "data_dir",
                data_dir.path().to_string_lossy().to_string(),
            ));
        for (key, value) in overrides {
            figment = figment.merge(Toml::string(&format!("{key} = {value}")));
        }
        let config = Config::from_figment(figment).expect("test config");
        let server = vibe::server::start(config).await.expect("server starts");
        let base = format!("http://{}", server.local_addr());
        Self {
            server: Some(server),
            base,
            client: reqwest::Client::new(),
            db_name,
            db_url,
            data_dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn running(&self) -> &RunningServer {
        self.server.as_ref().expect("server is running")
    }

    /// A token for `subject` with `scopes`, valid for an hour.
    pub fn token(&self, subject: &str, scopes: &[&str]) -> String {
        self.token_until(
            subject,
            scopes,
            SystemTime::now() + Duration::from_secs(3600),
        )
    }

    pub fn token_until(&self, subject: &str, scopes: &[&str], until: SystemTime) -> String {
        let scopes: Vec<Scope> = scopes.iter().map(|s| s.parse().expect("scope")).collect();
        self.running()
            .app()
            .tokens
            .mint_until(subject, &scopes, until)
            .expect("mint")
    }

    /// Creates a document over REST (expecting 201) and returns it as JSON.
    pub async fn post(
        &self,
        token: &str,
        doc_type: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let r = self
            .client
            .post(self.url(&format!("/v1/docs/{doc_type}")))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "create failed");
        r.json().await.unwrap()
    }

    /// `POST /v1/certificates` with `body` as the holder of `token`: the status and the JSON
    /// answer (null if none).
    pub async fn issue_certificate(
        &self,
        token: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let r = self
            .client
            .post(self.url("/v1/certificates"))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or_default())
    }

    /// `GET path` as the holder of `token`: the status and the JSON body (null if none).
    /// `POST /v1/query` with `body`: the status and the JSON answer.
    pub async fn query(&self, token: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let r = self
            .client
            .post(self.url("/v1/query"))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    pub async fn get_json(&self, token: &str, path: &str) -> (u16, serde_json::Value) {
        let r = self
            .client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or_default())
    }

    /// The value of an unlabelled metric line `name value` in `GET /metrics` (0 when absent: a
    /// gauge or counter never touched is not rendered).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    /// The Prometheus text of `GET /metrics`.
    pub async fn metrics_text(&self) -> String {
        let r = self.client.get(self.url("/metrics")).send().await.unwrap();
        r.text().await.unwrap()
    }

    /// A direct connection pool to this test's database.
    pub async fn sql(&self) -> PgPool {
        PgPool::connect(&self.db_url)
            .await
            .expect("connect to test db")
    }

    /// Stops the server and drops the database.
    pub async fn finish(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.expect("clean shutdown");
        }
        if !self.db_name.is_empty() {
            drop_database(&self.db_name).await;
        }
    }
}

/// Polls until `check` holds (for state inside the server or the database that no event
/// announces: each poll is a query or a scrape), failing after 15 s.
pub async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Locks the row of document `id` (`FOR UPDATE`) in a transaction of its own on `sql`: writes of
/// it wait until the transaction ends (drop or roll it back).
pub async fn lock_row(sql: &PgPool, id: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut holder = sql.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM documents WHERE id = $1::uuid FOR UPDATE")
        .bind(id)
        .execute(&mut *holder)
        .await
        .unwrap();
    holder
}

/// Waits until at least `n` backends of `sql`'s database wait on a lock.
pub async fn until_waiting_on_locks(sql: &PgPool, n: i64) {
    until(&format!("{n} backends wait on a lock"), || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(sql)
        .await
        .unwrap();
        waiting >= n
    })
    .await;
}

/// Makes the live query of `query` (a `read` request's query) run for `caller` on `server`
/// crash until its supervisor gives up, reading `sub`'s frames on `ws` (a `reset` per restart)
/// up to its `subscription_failed` error.
pub async fn crash_until_failed(
    server: &TestServer,
    query: serde_json::Value,
    caller: &str,
    ws: &mut Ws,
    sub: &serde_json::Value,
) {
    let request: vibe_actors::query::QueryRequest = serde_json::from_value(query).unwrap();
    let spec = vibe_actors::query::QuerySpec::parse(
        &request,
        caller,
        vibe_actors::query::QueryLimits::default(),
    )
    .unwrap();
    let realtime = server.server.as_ref().unwrap().app().realtime.clone();
    loop {
        realtime
            .cast(vibe_actors::realtime::RealtimeMsg::CrashQuery(spec.clone()))
            .unwrap();
        let frame = ws.event(sub).await;
        match frame["event"].as_str() {
            // Restarted: crash the new instance.
            Some("reset") => continue,
            Some("error") => {
                assert_eq!(frame["error"]["code"], "subscription_failed", "{frame}");
                return;
            }
            _ => panic!("unexpected frame {frame}"),
        }
    }
}

pub const ALICE: &str = "did:key:zAlice";
pub const BOB: &str = "did:key:zBob";
pub const CAROL: &str = "did:key:zCarol";

/// A WebSocket client speaking the Vibe protocol, over a real socket (tokio-tungstenite).
pub struct Ws {
    stream: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    /// Frames that arrived while waiting for something else.
    pub pending: std::collections::VecDeque<serde_json::Value>,
    next_id: u64,
}

/// How long a test waits for any one frame before failing.
pub const FRAME_WAIT: Duration = Duration::from_secs(15);

impl Ws {
    /// Connects with the `vibe.v1` subprotocol and, if given, a token as the second value.
    pub async fn connect(base: &str, token: Option<&str>) -> Self {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("{}/v1/ws", base.replace("http://", "ws://"));
        let mut request = url.into_client_request().unwrap();
        let protocols = match token {
            Some(t) => format!("vibe.v1, {}", t.trim_end_matches('=')),
            None => "vibe.v1".to_owned(),
        };
        request
            .headers_mut()
            .insert("sec-websocket-protocol", protocols.parse().unwrap());
        let (stream, response) = tokio_tungstenite::connect_async(request)
            .await
            .expect("WebSocket connects");
        assert_eq!(response.headers()["sec-websocket-protocol"], "vibe.v1");
        Self {
            stream,
            pending: Default::default(),
            next_id: 1,
        }
    }

    pub async fn send_raw(&mut self, message: tokio_tungstenite::tungstenite::Message) {
        use futures_util::SinkExt;
        self.stream.send(message).await.expect("send");
    }

    pub async fn send(&mut self, value: serde_json::Value) {
        self.send_raw(tokio_tungstenite::tungstenite::Message::text(
            value.to_string(),
        ))
        .await;
    }

    /// The next frame from the server (a pending one first). Panics after [`FRAME_WAIT`].
    pub async fn next(&mut self) -> serde_json::Value {
        if let Some(v) = self.pending.pop_front() {
            return v;
        }
        self.next_from_socket()
            .await
            .expect("the connection closed")
    }

    /// The next frame off the socket; None when the server closed the connection.
    pub async fn next_from_socket(&mut self) -> Option<serde_json::Value> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let message = tokio::time::timeout(FRAME_WAIT, self.stream.next())
                .await
                .expect("a frame within the wait")?;
            match message {
                Ok(Message::Text(text)) => return Some(serde_json::from_str(&text).unwrap()),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The payload of the next pong, reading past any data frames.
    pub async fn next_pong(&mut self) -> Vec<u8> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let message = tokio::time::timeout(FRAME_WAIT, self.stream.next())
                .await
                .expect("a frame within the wait")
                .expect("the connection is open");
            if let Message::Pong(payload) = message.expect("a frame") {
                return payload.to_vec();
            }
        }
    }

    /// The close frame's code, reading past any data frames.
    pub async fn closed_with(&mut self) -> Option<u16> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            match tokio::time::timeout(FRAME_WAIT, self.stream.next())
                .await
                .ok()??
            {
                Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Sends `op` with a fresh id and returns the reply (`re` equal to that id); other frames
    /// received meanwhile stay pending.
    pub async fn request(&mut self, mut body: serde_json::Value) -> serde_json::Value {
        let id = self.next_id;
        self.next_id += 1;
        body["id"] = id.into();
        self.send(body).await;
        let mut skipped = Vec::new();
        loop {
            let frame = match self.pending.iter().position(|f| f["re"] == id) {
                Some(i) => self.pending.remove(i).unwrap(),
                None => self
                    .next_from_socket()
                    .await
                    .expect("the connection closed"),
            };
            if frame["re"] == id {
                self.pending.extend(skipped);
                return frame;
            }
            skipped.push(frame);
        }
    }

    /// The next event for subscription `sub`, keeping other frames pending.
    pub async fn event(&mut self, sub: &serde_json::Value) -> serde_json::Value {
        if let Some(i) = self.pending.iter().position(|f| &f["sub"] == sub) {
            return self.pending.remove(i).unwrap();
        }
        loop {
            let frame = self
                .next_from_socket()
                .await
                .expect("the connection closed");
            if &frame["sub"] == sub {
                return frame;
            }
            self.pending.push_back(frame);
        }
    }

    /// Writes `count` `posts` documents `{"n": 0..count, "blob": <bytes of "x">}`, one request
    /// each, each answered ok: events large enough to fill a non-reading client's buffers.
    pub async fn write_big_posts(&mut self, count: i64, bytes: usize) {
        let blob = "x".repeat(bytes);
        for n in 0..count {
            let r = self
                .request(serde_json::json!({"op": "write", "type": "posts",
                                            "doc": {"data": {"n": n, "blob": blob}}}))
                .await;
            assert_eq!(r["ok"], true, "{r}");
        }
    }

    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}
