//! Shared test helpers: a Vibe server on 127.0.0.1:0 backed by a fresh database of its own on the
//! machine's PostgreSQL, tokens for it, and a direct SQL connection to check what was stored.
#![allow(dead_code, unreachable_pub)] // each test binary uses a different subset; `pub` is for them

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
        drop_database(&self.db_name).await;
    }
}

pub const ALICE: &str = "did:key:zAlice";
pub const BOB: &str = "did:key:zBob";
pub const CAROL: &str = "did:key:zCarol";
