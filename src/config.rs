//! Configuration: the built-in defaults (`config/default.toml`), an optional file, and `VIBE_*`
//! environment variables, layered with figment and validated once at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

/// The defaults, compiled in so that `vibe serve` runs with no file at all.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Why the configuration could not be loaded. The message names the key and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read, or a value has the wrong type, or a key is unknown.
    #[error("invalid configuration: {0}")]
    Layer(String),
    /// A value parsed but is out of its allowed range.
    #[error("invalid configuration: key `{key}`: {problem}")]
    Invalid {
        /// Dotted key path, e.g. `http.max_body_bytes`.
        key: &'static str,
        /// What is wrong with the value.
        problem: String,
    },
}

/// The whole node configuration. Field docs live in `config/default.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub database: DatabaseConfig,
    pub http: HttpConfig,
    pub feed: FeedConfig,
    pub ws: WsConfig,
    pub query: QueryConfig,
    pub indexes: IndexesConfig,
    pub tokens: TokensConfig,
    pub identity: IdentityConfig,
    pub calls: CallsConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub max_connections: u32,
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    pub migrate_on_start: bool,
    pub create_batch_rows: usize,
    pub create_writers: Slots,
    pub read_batch_rows: usize,
    pub readers: Slots,
}

/// How many statements of one kind may run at once: a count, or `"auto"`. Each slot keeps a
/// pooled connection (src/store/batch.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slots {
    /// Half the CPUs this process may use, at least one and at most a quarter of the pool's
    /// connections, so that creates and reads together keep at most half the pool.
    Auto,
    Count(usize),
}

impl Slots {
    /// The number of slots on a machine with `cpus` CPUs and a pool of `max_connections`.
    pub fn resolve(self, cpus: usize, max_connections: u32) -> usize {
        match self {
            Slots::Auto => (cpus / 2).clamp(1, (max_connections as usize / 4).max(1)),
            Slots::Count(n) => n,
        }
    }

    /// [`Slots::resolve`] with this process's CPUs.
    pub fn here(self, max_connections: u32) -> usize {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        self.resolve(cpus, max_connections)
    }
}

impl<'de> Deserialize<'de> for Slots {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Slots;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Slots, E> {
                usize::try_from(n)
                    .map(Slots::Count)
                    .map_err(|_| E::custom("too large"))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Slots, E> {
                usize::try_from(n)
                    .map(Slots::Count)
                    .map_err(|_| E::custom("must not be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Slots, E> {
                match s {
                    "auto" => Ok(Slots::Auto),
                    _ => s
                        .parse()
                        .map(Slots::Count)
                        .map_err(|_| E::custom("expected a number or \"auto\"")),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub max_body_bytes: usize,
    pub max_page_bytes: usize,
    pub max_page_size: u32,
    pub default_page_size: u32,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    pub trusted_proxies: crate::http::forwarded::TrustedProxies,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub min_tick_interval: Duration,
    pub tick_burst: u32,
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
    pub max_pages_in_flight: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WsConfig {
    pub max_frame_bytes: usize,
    pub outbound_queue: usize,
    pub outbound_queue_bytes: usize,
    pub max_subscriptions: usize,
    pub max_calls: usize,
    pub requests_per_second: u32,
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub attenuation_recheck: Duration,
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    pub replay_buffer: usize,
    pub replay_buffer_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryConfig {
    pub default_limit: u32,
    pub max_limit: u32,
    pub max_depth: usize,
    pub max_clauses: usize,
    pub max_operand_bytes: usize,
    pub max_live_queries: usize,
    pub max_window_bytes: usize,
    pub max_live_bytes: usize,
    pub connections: u32,
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
}

impl QueryConfig {
    pub fn limits(&self) -> vibe_actors::query::QueryLimits {
        vibe_actors::query::QueryLimits {
            default_limit: self.default_limit,
            max_limit: self.max_limit,
            max_depth: self.max_depth,
            max_clauses: self.max_clauses,
            max_operand_bytes: self.max_operand_bytes,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexesConfig {
    pub suggest_min_calls: u64,
    pub auto_create_min_calls: u64,
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub unused_after: Duration,
    pub max_shapes: usize,
    #[serde(with = "humantime_serde")]
    pub shape_retention: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensConfig {
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The OpenID issuer URL; empty: `http://<bound address>`.
    pub issuer: String,
    pub open_sign_up: bool,
    pub open_registration: bool,
    pub registrations_per_hour_per_address: u32,
    #[serde(with = "humantime_serde")]
    pub access_token_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub id_token_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub refresh_token_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub refresh_token_absolute_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub code_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub interaction_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub session_token_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub signing_key_overlap: Duration,
    #[serde(with = "humantime_serde")]
    pub signing_key_lead: Duration,
    #[serde(with = "humantime_serde")]
    pub revocation_poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub signing_key_reload_interval: Duration,
    pub login_attempts_per_minute: u32,
    pub login_attempts_per_minute_per_address: u32,
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    pub max_certificates_per_issuer: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallsConfig {
    pub bind: std::net::IpAddr,
    pub advertise: Vec<std::net::IpAddr>,
    pub port_min: u16,
    pub port_max: u16,
    pub max_rooms: usize,
    pub max_participants: usize,
    #[serde(with = "humantime_serde")]
    pub keyframe_request_interval: Duration,
    pub bandwidth_estimation: bool,
    pub max_queued_datagrams: usize,
    pub resend_buffer_packets: usize,
    pub max_published_tracks: usize,
    pub max_candidates: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl CallsConfig {
    /// The actors' form of these settings.
    pub fn to_actor_config(&self) -> vibe_actors::call::actor::CallsConfig {
        vibe_actors::call::actor::CallsConfig {
            bind: self.bind,
            advertise: self.advertise.clone(),
            ports: (self.port_min, self.port_max),
            max_rooms: self.max_rooms,
            max_participants: self.max_participants,
            keyframe_request_interval: self.keyframe_request_interval,
            bandwidth_estimation: self.bandwidth_estimation,
            max_queued_datagrams: self.max_queued_datagrams,
            resend_buffer_packets: self.resend_buffer_packets,
            max_tracks: self.max_published_tracks,
            max_candidates: self.max_candidates,
            connect_timeout: self.connect_timeout,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Whether the environment variable `VIBE_<key>` is meant for the configuration: its first part
/// (before `__`) is a top-level key of config/default.toml, or starts with a section's name and
/// `_` (`VIBE_LOG_LEVEL`, a misspelt `VIBE_LOG__LEVEL`, is refused as an unknown key rather than
/// dropped). Others (`VIBE_TOKEN` holding a token in a shell, say) are not this program's.
fn names_a_section(key: &str) -> bool {
    static TOP_LEVEL: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let top_level = TOP_LEVEL.get_or_init(|| {
        Figment::from(Toml::string(DEFAULT_TOML))
            .extract::<std::collections::BTreeMap<String, figment::value::Value>>()
            .map(|keys| keys.into_keys().collect())
            .unwrap_or_default()
    });
    let first = key.split("__").next().unwrap_or(key).to_ascii_lowercase();
    top_level
        .iter()
        .any(|k| first == *k || first.starts_with(&format!("{k}_")))
}

impl Config {
    /// Loads defaults, then `file` (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::from_figment(Self::figment(file))
    }

    /// The layered sources, before extraction. Tests add their own overrides on top.
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::new().merge(Toml::string(DEFAULT_TOML));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment
            // The conventional variable, below the explicit VIBE_ one.
            .merge(Env::raw().only(&["DATABASE_URL"]))
            .merge(
                Env::prefixed("VIBE_")
                    .filter(|key| names_a_section(key.as_str()))
                    .split("__"),
            )
    }

    /// Extracts and validates a configuration from any figment.
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Layer(describe(e)))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, problem: &str| {
            Err(ConfigError::Invalid {
                key,
                problem: problem.to_owned(),
            })
        };
        if self.data_dir.as_os_str().is_empty() {
            return invalid("data_dir", "must not be empty");
        }
        let url = &self.database_url;
        if !(url.is_empty() || url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return invalid(
                "database_url",
                "must start with postgres:// or postgresql:// (or be empty for the embedded database)",
            );
        }
        let calls = &self.calls;
        if calls.bind.is_unspecified() && calls.advertise.is_empty() {
            return invalid(
                "calls.advertise",
                "must list the address(es) clients reach when calls.bind is unspecified (0.0.0.0 or ::)",
            );
        }
        if calls.advertise.iter().any(|a| a.is_unspecified()) {
            return invalid("calls.advertise", "must not hold an unspecified address");
        }
        if (calls.port_min == 0) != (calls.port_max == 0) || calls.port_min > calls.port_max {
            return invalid(
                "calls.port_min",
                "port_min and port_max are both 0 (any free port) or a range with port_min <= port_max",
            );
        }
        if calls.max_rooms == 0 {
            return invalid("calls.max_rooms", "must be at least 1");
        }
        if calls.max_participants < 2 {
            return invalid("calls.max_participants", "must be at least 2");
        }
        if calls.resend_buffer_packets < 16 {
            return invalid(
                "calls.resend_buffer_packets",
                "must be at least 16 (a large video frame alone spans several packets)",
            );
        }
        if calls.max_published_tracks == 0 {
            return invalid("calls.max_published_tracks", "must be at least 1");
        }
        if calls.max_candidates == 0 {
            return invalid("calls.max_candidates", "must be at least 1");
        }
        if calls.connect_timeout < Duration::from_secs(1) {
            return invalid("calls.connect_timeout", "must be at least 1s");
        }
        if calls.max_queued_datagrams == 0 {
            return invalid("calls.max_queued_datagrams", "must be at least 1");
        }
        if self.database.max_connections == 0 {
            return invalid("database.max_connections", "must be at least 1");
        }
        if self.identity.registrations_per_hour_per_address == 0 {
            return invalid(
                "identity.registrations_per_hour_per_address",
                "must be at least 1",
            );
        }
        let database = &self.database;
        let create_writers = database.create_writers.here(database.max_connections);
        let readers = database.readers.here(database.max_connections);
        // Grouped statements (src/store/batch.rs): rows per statement, statements in flight.
        for (rows_key, rows, slots_key, slots) in [
            (
                "database.create_batch_rows",
                database.create_batch_rows,
                "database.create_writers",
                create_writers,
            ),
            (
                "database.read_batch_rows",
                database.read_batch_rows,
                "database.readers",
                readers,
            ),
        ] {
            if !(1..=1000).contains(&rows) {
                return invalid(rows_key, "must be between 1 and 1000");
            }
            if slots == 0 {
                return invalid(slots_key, "must be at least 1");
            }
        }
        // Each writer and reader keeps a connection; everything else needs at least one more.
        if create_writers + readers >= database.max_connections as usize {
            return invalid(
                "database.max_connections",
                "must be more than database.create_writers + database.readers (each keeps a \
                 connection of the pool)",
            );
        }
        if self.http.max_body_bytes < 1024 {
            return invalid("http.max_body_bytes", "must be at least 1024");
        }
        if self.http.max_page_bytes < 1024 {
            return invalid("http.max_page_bytes", "must be at least 1024");
        }
        if self.http.max_page_size == 0 || self.http.max_page_size > 1000 {
            return invalid("http.max_page_size", "must be between 1 and 1000");
        }
        if self.http.default_page_size == 0 || self.http.default_page_size > self.http.max_page_size
        {
            return invalid(
                "http.default_page_size",
                "must be between 1 and http.max_page_size",
            );
        }
        if self.feed.poll_interval < Duration::from_millis(1) {
            return invalid("feed.poll_interval", "must be at least 1ms");
        }
        if self.feed.retention < Duration::from_secs(1) {
            return invalid("feed.retention", "must be at least 1s");
        }
        if self.feed.tick_burst == 0 {
            return invalid("feed.tick_burst", "must be at least 1");
        }
        if self.feed.prune_interval < Duration::from_secs(1) {
            return invalid("feed.prune_interval", "must be at least 1s");
        }
        if !(1..=65_536).contains(&self.feed.max_pages_in_flight) {
            return invalid("feed.max_pages_in_flight", "must be between 1 and 65536");
        }
        if self.ws.max_frame_bytes < 1024 {
            return invalid("ws.max_frame_bytes", "must be at least 1024");
        }
        if self.ws.outbound_queue_bytes < self.http.max_body_bytes {
            return invalid(
                "ws.outbound_queue_bytes",
                "must be at least http.max_body_bytes (an event carrying the largest document must fit)",
            );
        }
        if self.ws.outbound_queue == 0 {
            return invalid("ws.outbound_queue", "must be at least 1");
        }
        if self.ws.requests_per_second == 0 {
            return invalid("ws.requests_per_second", "must be at least 1");
        }
        if self.query.connections == 0 {
            return invalid("query.connections", "must be at least 1");
        }
        // PostgreSQL takes whole milliseconds up to 2^31 - 1; 0 would mean no timeout at all.
        if !(Duration::from_millis(1)..=Duration::from_millis(i32::MAX as u64))
            .contains(&self.query.statement_timeout)
        {
            return invalid("query.statement_timeout", "must be between 1ms and 24 days");
        }
        if self.query.max_limit == 0
            || self.query.default_limit == 0
            || self.query.default_limit > self.query.max_limit
        {
            return invalid(
                "query.default_limit",
                "must be between 1 and query.max_limit",
            );
        }
        if self.indexes.flush_interval.is_zero() {
            return invalid("indexes.flush_interval", "must be longer than zero");
        }
        if self.indexes.prune_interval.is_zero() {
            return invalid("indexes.prune_interval", "must be longer than zero");
        }
        if self.query.max_live_queries == 0 {
            return invalid("query.max_live_queries", "must be at least 1");
        }
        if self.query.max_live_bytes < self.query.max_window_bytes {
            return invalid(
                "query.max_live_bytes",
                "must be at least query.max_window_bytes (one full window)",
            );
        }
        if self.query.max_window_bytes == 0 {
            return invalid("query.max_window_bytes", "must be at least 1");
        }
        if self.query.max_depth == 0 {
            return invalid("query.max_depth", "must be at least 1");
        }
        if self.query.max_clauses == 0 {
            return invalid("query.max_clauses", "must be at least 1");
        }
        if self.query.max_operand_bytes < 64 {
            return invalid("query.max_operand_bytes", "must be at least 64");
        }
        let id = &self.identity;
        if !id.issuer.is_empty()
            && (!(id.issuer.starts_with("https://") || id.issuer.starts_with("http://"))
                || id.issuer.ends_with('/')
                || id.issuer.contains(['?', '#']))
        {
            return invalid(
                "identity.issuer",
                "must be an http(s) URL without a trailing slash, query or fragment",
            );
        }
        // Longer than any deployment lives, and short enough that adding one to the clock
        // cannot overflow (a token's expiry, a deadline): beyond it a sign-in would panic.
        const LONGEST: Duration = Duration::from_secs(100 * 365 * 86_400);
        for (key, d) in [
            ("database.acquire_timeout", self.database.acquire_timeout),
            ("http.header_read_timeout", self.http.header_read_timeout),
            ("http.body_read_timeout", self.http.body_read_timeout),
            ("ws.auth_timeout", self.ws.auth_timeout),
            ("ws.attenuation_recheck", self.ws.attenuation_recheck),
            ("ws.write_timeout", self.ws.write_timeout),
            ("query.statement_timeout", self.query.statement_timeout),
            ("tokens.default_ttl", self.tokens.default_ttl),
            ("identity.access_token_ttl", id.access_token_ttl),
            ("identity.id_token_ttl", id.id_token_ttl),
            ("identity.refresh_token_ttl", id.refresh_token_ttl),
            (
                "identity.refresh_token_absolute_ttl",
                id.refresh_token_absolute_ttl,
            ),
            ("identity.code_ttl", id.code_ttl),
            ("identity.interaction_ttl", id.interaction_ttl),
            ("identity.session_ttl", id.session_ttl),
            ("identity.session_token_ttl", id.session_token_ttl),
            (
                "identity.revocation_poll_interval",
                id.revocation_poll_interval,
            ),
            (
                "identity.signing_key_reload_interval",
                id.signing_key_reload_interval,
            ),
        ] {
            if d.is_zero() || d > LONGEST {
                return invalid(key, "must be longer than zero and at most 100 years");
            }
        }
        // The rest have their own lower bounds (or may be zero).
        for (key, d) in [
            ("http.shutdown_grace", self.http.shutdown_grace),
            ("feed.poll_interval", self.feed.poll_interval),
            ("feed.min_tick_interval", self.feed.min_tick_interval),
            ("feed.retention", self.feed.retention),
            ("feed.prune_interval", self.feed.prune_interval),
            ("ws.linger", self.ws.linger),
            ("indexes.flush_interval", self.indexes.flush_interval),
            ("indexes.prune_interval", self.indexes.prune_interval),
            ("indexes.unused_after", self.indexes.unused_after),
            ("indexes.shape_retention", self.indexes.shape_retention),
            ("identity.signing_key_overlap", id.signing_key_overlap),
            ("identity.signing_key_lead", id.signing_key_lead),
            (
                "calls.keyframe_request_interval",
                self.calls.keyframe_request_interval,
            ),
            ("calls.connect_timeout", self.calls.connect_timeout),
        ] {
            if d > LONGEST {
                return invalid(key, "must be at most 100 years");
            }
        }
        if id.code_ttl > Duration::from_secs(600) {
            return invalid(
                "identity.code_ttl",
                "must be at most 10 minutes (RFC 6749 §4.1.2)",
            );
        }
        if id.login_attempts_per_minute == 0 || id.login_attempts_per_minute_per_address == 0 {
            return invalid("identity.login_attempts_per_minute", "must be at least 1");
        }
        if id.signing_key_lead < id.signing_key_reload_interval {
            return invalid(
                "identity.signing_key_lead",
                "must be at least identity.signing_key_reload_interval (every node publishes a \
                 rotated key before it signs; `?immediate=true` switches at once)",
            );
        }
        if id.max_certificates_per_issuer == 0 {
            return invalid("identity.max_certificates_per_issuer", "must be at least 1");
        }
        if id.argon2_memory_kib < 8 || id.argon2_iterations == 0 {
            return invalid(
                "identity.argon2_memory_kib",
                "argon2 needs at least 8 KiB and 1 iteration",
            );
        }
        if let Err(e) = self.log.level.parse::<tracing_subscriber::EnvFilter>() {
            return Err(ConfigError::Invalid {
                key: "log.level",
                problem: e.to_string(),
            });
        }
        Ok(())
    }
}

/// One line per problem: the dotted key (lowercase, as in the file), what is wrong, and where
/// the value came from.
fn describe(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".").to_lowercase();
            let source = e
                .metadata
                .as_ref()
                .map(|m| match &m.source {
                    Some(source) => format!(" (from {} {source})", m.name),
                    None => format!(" (from {})", m.name),
                })
                .unwrap_or_default();
            // figment's own wording of these nests backticks (``text` or `json``).
            let problem = match &e.kind {
                figment::error::Kind::UnknownVariant(found, expected) => {
                    format!("`{found}` is not one of {}", expected.join(", "))
                }
                figment::error::Kind::UnknownField(found, expected) => {
                    format!(
                        "unknown key `{found}` (known here: {})",
                        expected.join(", ")
                    )
                }
                kind => kind.to_string(),
            };
            if key.is_empty() {
                format!("{problem}{source}")
            } else {
                format!("key `{key}`: {problem}{source}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    fn with(key: &str, value: impl serde::Serialize) -> Result<Config, ConfigError> {
        Config::from_figment(
            Figment::new()
                .merge(Toml::string(DEFAULT_TOML))
                .merge(Serialized::default(key, value)),
        )
    }

    /// The error the defaults with `key` set to `value` are refused with.
    fn refusal(key: &str, value: impl serde::Serialize) -> String {
        match with(key, value) {
            Ok(_) => panic!("{key} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let config = with("listen", "127.0.0.1:8080").unwrap();
        assert_eq!(config.http.max_body_bytes, 1024 * 1024);
        assert!(config.database_url.is_empty());
        assert_eq!(config.tokens.default_ttl, Duration::from_secs(3600));
    }

    #[test]
    fn a_statement_timeout_postgresql_would_not_apply_is_refused() {
        for (value, accepted) in [
            ("500us", false),
            ("1ms", true),
            ("10s", true),
            ("24days", true),
            ("25days", false),
        ] {
            match with("query.statement_timeout", value) {
                Ok(c) => assert!(
                    accepted,
                    "{value} was accepted: {:?}",
                    c.query.statement_timeout
                ),
                Err(e) => {
                    assert!(!accepted, "{value}: {e}");
                    assert!(e.to_string().contains("query.statement_timeout"), "{e}");
                }
            }
        }
    }

    #[test]
    fn readers_and_writers_are_a_number_or_auto() {
        let defaults = with("listen", "127.0.0.1:8080").unwrap().database;
        assert_eq!(defaults.readers, Slots::Auto);
        assert_eq!(defaults.create_writers, Slots::Auto);
        assert_eq!(
            with("database.create_writers", "2")
                .unwrap()
                .database
                .create_writers,
            Slots::Count(2)
        );
        assert_eq!(
            with("database.readers", 2).unwrap().database.readers,
            Slots::Count(2)
        );
        // Environment values arrive as text.
        assert_eq!(
            with("database.readers", "3").unwrap().database.readers,
            Slots::Count(3)
        );
        let err = refusal("database.readers", "many");
        assert!(err.contains("readers"), "{err}");
        assert_eq!(Slots::Auto.resolve(1, 16), 1);
        assert_eq!(Slots::Auto.resolve(2, 16), 1);
        assert_eq!(Slots::Auto.resolve(8, 16), 4);
        assert_eq!(
            Slots::Auto.resolve(64, 16),
            4,
            "never more than a quarter of the pool"
        );
        assert_eq!(Slots::Auto.resolve(64, 3), 1);
        assert_eq!(Slots::Count(3).resolve(64, 16), 3);
        // Writers and readers keep their connections: the pool (16) must have one more.
        let slots = |create_writers: usize, readers: usize| {
            Config::from_figment(
                Figment::new()
                    .merge(Toml::string(DEFAULT_TOML))
                    .merge(Serialized::default(
                        "database.create_writers",
                        create_writers,
                    ))
                    .merge(Serialized::default("database.readers", readers)),
            )
        };
        let err = slots(1, 15).unwrap_err().to_string();
        assert!(err.contains("database.max_connections"), "{err}");
        assert!(slots(1, 14).is_ok());
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = with("http.max_body_bytes", "lots").unwrap_err().to_string();
        assert!(err.contains("max_body_bytes"), "{err}");
    }

    #[test]
    fn trusted_proxies_are_addresses_or_networks() {
        let err = refusal("http.trusted_proxies", vec!["10.0.0.0/8", "proxy.internal"]);
        assert!(err.contains("http.trusted_proxies"), "{err}");
        assert!(err.contains("proxy.internal"), "{err}");
        // Addresses and networks of both families, as a config file lists them.
        let config = Config::from_figment(Figment::new().merge(Toml::string(DEFAULT_TOML)).merge(
            Toml::string(r#"http.trusted_proxies = ["10.0.0.0/8", "::1"]"#),
        ))
        .unwrap();
        let from = |peer: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("x-forwarded-for", "203.0.113.5".parse().unwrap());
            config
                .http
                .trusted_proxies
                .client_address(peer.parse().unwrap(), &headers)
                .to_string()
        };
        assert_eq!(from("10.2.3.4"), "203.0.113.5");
        assert_eq!(from("::1"), "203.0.113.5");
        assert_eq!(from("192.0.2.1"), "192.0.2.1");
    }

    #[test]
    fn only_vibe_variables_naming_a_section_are_configuration() {
        for key in [
            "LISTEN",
            "listen",
            "DATA_DIR",
            "HTTP__MAX_BODY_BYTES",
            "LOG__FORMAT",
        ] {
            assert!(names_a_section(key), "{key}");
        }
        // A section's misspelt key still reaches the configuration, to be refused there.
        assert!(names_a_section("HTTP__MAX_BODYBYTES"));
        // One underscore too few: refused as an unknown key, not dropped.
        assert!(names_a_section("LOG_LEVEL"));
        assert!(names_a_section("IDENTITY_ISSUER"));
        for key in ["TOKEN", "VERSION", "HTTPS__X", ""] {
            assert!(!names_a_section(key), "{key}");
        }
    }

    #[test]
    fn unknown_key_is_rejected() {
        let err = with("http.max_bodybytes", 5).unwrap_err().to_string();
        assert!(err.contains("unknown key `max_bodybytes`"), "{err}");
        assert!(
            err.contains("max_body_bytes, "),
            "the known keys are listed: {err}"
        );
        let err = with("log.format", "xml").unwrap_err().to_string();
        assert!(
            err.contains("key `log.format`: `xml` is not one of text, json"),
            "{err}"
        );
    }

    #[test]
    fn out_of_range_names_the_key() {
        let err = with("http.default_page_size", 5000)
            .unwrap_err()
            .to_string();
        assert!(err.contains("http.default_page_size"), "{err}");
        let err = with("database_url", "mysql://x").unwrap_err().to_string();
        assert!(err.contains("database_url"), "{err}");
        let err = with("listen", "nowhere").unwrap_err().to_string();
        assert!(err.contains("listen"), "{err}");
        // More writers than pooled connections would leave requests without one.
        for (key, value) in [
            ("database.create_writers", 17),
            ("database.create_batch_rows", 0),
            ("database.readers", 0),
            ("database.read_batch_rows", 1001),
            ("identity.registrations_per_hour_per_address", 0),
            ("query.max_window_bytes", 0),
            ("query.max_live_bytes", 1),
            ("http.max_page_size", 1001),
            ("http.max_page_bytes", 0),
            ("feed.max_pages_in_flight", 1_i64 << 40),
            // A queue that cannot hold one reply of a document of the largest body.
            ("ws.outbound_queue_bytes", 1024),
        ] {
            let err = refusal(key, value);
            assert!(err.contains(key), "{err}");
        }
        // OAuth codes live at most 10 minutes (RFC 6749 §4.1.2).
        let err = refusal("identity.code_ttl", "11m");
        assert!(err.contains("identity.code_ttl"), "{err}");
        assert!(with("identity.code_ttl", "10m").is_ok());
    }

    /// Durations that would fail every request (0s) or overflow the clock when added to it (a
    /// sign-in's token expiry panicked at `400000000000years`) are refused at start.
    #[test]
    fn durations_are_longer_than_zero_and_at_most_a_century() {
        for key in [
            "database.acquire_timeout",
            "ws.auth_timeout",
            "tokens.default_ttl",
            "identity.session_token_ttl",
            "identity.access_token_ttl",
        ] {
            for value in ["0s", "400000000000years", "101years"] {
                let err = refusal(key, value);
                assert!(err.contains(key), "{key} = {value}: {err}");
            }
            assert!(with(key, "2h").is_ok(), "{key}");
        }
        let err = refusal("identity.signing_key_lead", "10s");
        assert!(err.contains("identity.signing_key_lead"), "{err}");
        for key in ["feed.retention", "indexes.unused_after", "ws.linger"] {
            let err = refusal(key, "101years");
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn call_settings_are_checked() {
        // An unspecified bind address cannot be put in a candidate: clients need `advertise`.
        let err = with("calls.bind", "0.0.0.0").unwrap_err().to_string();
        assert!(err.contains("calls.advertise"), "{err}");
        for (key, value) in [
            ("calls.port_min", 40000),
            ("calls.max_participants", 1),
            ("calls.resend_buffer_packets", 3),
            ("calls.max_published_tracks", 0),
            ("calls.max_candidates", 0),
        ] {
            let err = refusal(key, value);
            assert!(err.contains(key), "{err}");
        }
        let config = with("calls.advertise", vec!["192.0.2.7"]).unwrap();
        assert_eq!(config.calls.to_actor_config().advertise.len(), 1);
    }
}
