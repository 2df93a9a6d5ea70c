//! Index governance (the seed's hybrid indexing): the server records the shape of every query
//! it runs (no values), suggests expression indexes for data paths that hot shapes compare by
//! range, builds approved ones with `CREATE INDEX CONCURRENTLY` in the background, reports their
//! progress and use, and drops the ones left unused. Only indexes it created (`vibe_auto_*`,
//! listed in `managed_indexes`) are ever dropped; the core indexes of the migrations are not
//! touched. Equality, `in` and `contains` need no suggestion: the GIN index on `data` serves them.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{PgPool, Row};
use vibe_actors::query::shape::IndexKind;
use vibe_actors::query::{QueryLimits, QueryRequest, QuerySpec};

use crate::config::IndexesConfig;
use crate::store::shapes::quantile_ms;
use crate::store::{Store, StoreError, index_expression};

#[derive(Debug, thiserror::Error)]
pub enum GovernanceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Invalid(String),
}

/// A suggested index with the evidence for it.
#[derive(Debug, Serialize)]
pub struct Suggestion {
    #[serde(rename = "type")]
    pub doc_type: String,
    /// `data.<path>`
    pub path: String,
    /// `number` or `string`: the kind of value the shape compares.
    pub kind: String,
    pub definition: String,
    pub evidence: Value,
}

#[derive(Debug, Clone)]
pub struct Governance {
    store: Store,
    config: IndexesConfig,
    /// Held for a whole flush: a flush that finds nothing to take (another has just taken it)
    /// must not return before those shapes are written, and two flushes must not both find room
    /// under `indexes.max_shapes`.
    /// (Shared by clones: they are the same governance.)
    flushing: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// Index builds running in the background: aborted at shutdown, which would otherwise wait
    /// for a long `CREATE INDEX CONCURRENTLY` (the row is set right at the next start).
    builds: Arc<std::sync::Mutex<tokio::task::JoinSet<()>>>,
}

/// The index name for a (type, path, kind): stable, so one suggestion is one index.
fn index_name(doc_type: &str, path: &[String], kind: IndexKind) -> String {
    // FNV-1a, written out: the name is stored, so the hash must not change between Rust
    // versions (std's hasher may).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in format!("{doc_type}\u{0}{}\u{0}{}", path.join("."), kind.as_str()).bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("vibe_auto_{hash:016x}")
}

/// Whether `name` is one [`index_name`] makes: the only names this module puts into SQL text.
fn is_managed_name(name: &str) -> bool {
    name.strip_prefix("vibe_auto_")
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `CREATE INDEX CONCURRENTLY` for a (type, path, kind): the type first, as every query has
/// `type = $1` (a partial index on the type would only match plans made for one constant). The
/// path's segments cannot hold a quote (see `store::query`).
fn definition(doc_type: &str, path: &[String], kind: IndexKind) -> Result<String, GovernanceError> {
    if !crate::doc_type::is_valid(doc_type) {
        return Err(GovernanceError::Invalid("invalid type".into()));
    }
    if path.is_empty() || !path.iter().all(|s| vibe_actors::query::is_path_segment(s)) {
        return Err(GovernanceError::Invalid("invalid path".into()));
    }
    Ok(format!(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON documents (type, {})",
        index_name(doc_type, path, kind),
        index_expression(path, kind)
    ))
}

impl Governance {
    pub fn new(store: Store, config: IndexesConfig) -> Self {
        Self {
            store,
            config,
            flushing: std::sync::Arc::default(),
            builds: Arc::default(),
        }
    }

    fn pool(&self) -> &PgPool {
        self.store.pool()
    }

    /// Writes the shapes recorded on this node since the last flush. Clients choose the data
    /// paths a shape names, so the table is bounded: past `indexes.max_shapes` rows only shapes
    /// already in it are counted (new ones are dropped and counted as such).
    pub async fn flush(&self) -> Result<(), GovernanceError> {
        let _flushing = self.flushing.lock().await;
        let shapes = self.store.take_shapes();
        if shapes.is_empty() {
            return Ok(());
        }
        let held: i64 = sqlx::query_scalar("SELECT count(*) FROM query_shapes")
            .fetch_one(self.pool())
            .await?;
        // New rows this flush may add: counted down as they are, so one flush of many new
        // shapes stops at the bound too (not only the next one).
        let mut room = i64::try_from(self.config.max_shapes)
            .unwrap_or(i64::MAX)
            .saturating_sub(held);
        for stats in shapes {
            let written: Option<bool> = sqlx::query_scalar(
                "INSERT INTO query_shapes (shape_id, doc_type, shape, calls, total_ms, buckets) \
                 SELECT md5($1::jsonb::text), $2, $1::jsonb, $3, $4, $5 \
                 WHERE $6 OR EXISTS \
                   (SELECT 1 FROM query_shapes WHERE shape_id = md5($1::jsonb::text)) \
                 ON CONFLICT (shape_id) DO UPDATE SET \
                   calls = query_shapes.calls + EXCLUDED.calls, \
                   total_ms = query_shapes.total_ms + EXCLUDED.total_ms, \
                   buckets = ARRAY(SELECT a + b FROM unnest(query_shapes.buckets, EXCLUDED.buckets) AS t(a, b)), \
                   last_seen = now() \
                 RETURNING xmax = 0",
            )
            .bind(&stats.shape)
            .bind(&stats.doc_type)
            .bind(stats.calls)
            .bind(stats.total_ms)
            .bind(&stats.buckets)
            .bind(room > 0)
            .fetch_optional(self.pool())
            .await?;
            match written {
                // `xmax = 0`: a new row, not an update of one.
                Some(true) => room -= 1,
                Some(false) => {}
                None => metrics::counter!("vibe_query_shapes_dropped_total").increment(1),
            }
        }
        Ok(())
    }

    /// Expression indexes the recorded traffic would use, hottest shapes first: for each data
    /// path a shape called at least `indexes.suggest_min_calls` times compares by range, unless
    /// a managed index for it exists.
    pub async fn suggestions(&self) -> Result<Vec<Suggestion>, GovernanceError> {
        self.flush().await?;
        let rows = sqlx::query(
            "SELECT shape_id, doc_type, shape, calls, total_ms, buckets FROM query_shapes \
             WHERE calls >= $1 ORDER BY calls DESC LIMIT 200",
        )
        .bind(self.config.suggest_min_calls as i64)
        .fetch_all(self.pool())
        .await?;
        let existing: Vec<(String, Vec<String>, String)> = sqlx::query_as(
            "SELECT doc_type, path, kind FROM managed_indexes WHERE status IN ('building', 'ready')",
        )
        .fetch_all(self.pool())
        .await?;
        let mut suggestions: Vec<Suggestion> = Vec::new();
        for row in rows {
            let shape: Value = row.try_get("shape")?;
            let doc_type: String = row.try_get("doc_type")?;
            let calls: i64 = row.try_get("calls")?;
            let total_ms: f64 = row.try_get("total_ms")?;
            let buckets: Vec<i64> = row.try_get("buckets")?;
            for (path, kind) in range_paths_of_shape(&shape) {
                let known = existing
                    .iter()
                    .any(|(t, p, k)| *t == doc_type && *p == path && k == kind.as_str());
                let listed = suggestions.iter().any(|s| {
                    s.doc_type == doc_type
                        && s.path == format!("data.{}", path.join("."))
                        && s.kind == kind.as_str()
                });
                if known || listed {
                    continue;
                }
                let cost_before = self.representative_cost(&doc_type, &path, kind).await?;
                suggestions.push(Suggestion {
                    doc_type: doc_type.clone(),
                    path: format!("data.{}", path.join(".")),
                    kind: kind.as_str().to_owned(),
                    definition: definition(&doc_type, &path, kind)?,
                    evidence: json!({
                        "shapeId": row.try_get::<String, _>("shape_id")?,
                        "shape": shape,
                        "calls": calls,
                        "meanMs": if calls > 0 { total_ms / calls as f64 } else { 0.0 },
                        "p95Ms": quantile_ms(&buckets, 0.95),
                        "explainCostBefore": cost_before,
                    }),
                });
            }
        }
        Ok(suggestions)
    }

    /// The planner's total cost for a public query of `doc_type` comparing the path with a
    /// placeholder of its kind: the evidence's "cost before".
    async fn representative_cost(
        &self,
        doc_type: &str,
        path: &[String],
        kind: IndexKind,
    ) -> Result<f64, GovernanceError> {
        let placeholder = match kind {
            IndexKind::Json => json!(0),
            IndexKind::Text => json!(""),
        };
        let request: QueryRequest = serde_json::from_value(json!({
            "type": doc_type,
            "global": true,
            "where": {format!("data.{}", path.join(".")): {"gt": placeholder}},
        }))
        .map_err(|e| GovernanceError::Invalid(e.to_string()))?;
        let spec = QuerySpec::parse(&request, "did:key:zGovernance", QueryLimits::default())
            .map_err(|e| GovernanceError::Invalid(e.to_string()))?;
        let plan = self
            .store
            .explain(&spec, "did:key:zGovernance", false)
            .await?;
        Ok(plan[0]["Plan"]["Total Cost"].as_f64().unwrap_or(0.0))
    }

    /// Records the index and starts building it in the background; returns its row.
    pub async fn approve(
        &self,
        doc_type: &str,
        path: &[String],
        kind: IndexKind,
        requested_by: &str,
    ) -> Result<Value, GovernanceError> {
        let name = index_name(doc_type, path, kind);
        let definition = definition(doc_type, path, kind)?;
        let row = sqlx::query(
            "INSERT INTO managed_indexes (name, doc_type, path, kind, definition, status, requested_by) \
             VALUES ($1, $2, $3, $4, $5, 'building', $6) \
             ON CONFLICT (doc_type, path, kind) DO UPDATE SET status = 'building', error = NULL, \
               requested_by = EXCLUDED.requested_by, created_at = now(), ready_at = NULL, \
               last_scans = 0, last_used_at = now() \
             WHERE managed_indexes.status IN ('failed', 'dropped') \
             RETURNING name",
        )
        .bind(&name)
        .bind(doc_type)
        .bind(path)
        .bind(kind.as_str())
        .bind(&definition)
        .bind(requested_by)
        .fetch_optional(self.pool())
        .await?;
        if row.is_some() {
            let this = self.clone();
            let (name, definition) = (name.clone(), definition.clone());
            let mut builds = self
                .builds
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            while builds.try_join_next().is_some() {}
            builds.spawn(async move { this.build(&name, &definition).await });
        }
        self.describe(&name).await
    }

    async fn build(&self, name: &str, definition: &str) {
        tracing::info!(index = name, "building a managed index");
        // An invalid index of this name (a build interrupted or failed before its drop) would
        // make `IF NOT EXISTS` a no-op and the row `ready` for an index nothing uses.
        let invalid: Option<bool> = sqlx::query_scalar(
            "SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE c.relname = $1",
        )
        .bind(name)
        .fetch_optional(self.pool())
        .await
        .unwrap_or(None);
        if invalid == Some(true) {
            // `name` is one `index_name` made (it came from `approve`).
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP INDEX CONCURRENTLY IF EXISTS {name}"
            )))
            .execute(self.pool())
            .await;
        }
        // The definition is built from a checked type name and quote-free path segments.
        let built = sqlx::query(sqlx::AssertSqlSafe(definition.to_owned()))
            .execute(self.pool())
            .await;
        let outcome = match built {
            Ok(_) => {
                // Expression statistics arrive with ANALYZE: until then the planner guesses.
                let _ = sqlx::query("ANALYZE documents").execute(self.pool()).await;
                sqlx::query(
                    "UPDATE managed_indexes SET status = 'ready', ready_at = now() WHERE name = $1",
                )
                .bind(name)
                .execute(self.pool())
                .await
            }
            Err(e) => {
                tracing::warn!(index = name, error = %e, "building a managed index failed");
                // A failed concurrent build leaves an invalid index behind.
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP INDEX CONCURRENTLY IF EXISTS {name}"
                )))
                .execute(self.pool())
                .await;
                sqlx::query(
                    "UPDATE managed_indexes SET status = 'failed', error = $2 WHERE name = $1",
                )
                .bind(name)
                .bind(e.to_string())
                .execute(self.pool())
                .await
            }
        };
        if let Err(e) = outcome {
            tracing::warn!(index = name, error = %e, "recording a managed index's state failed");
        }
    }

    const DESCRIBE: &'static str = "SELECT m.name, m.doc_type, m.path, m.kind, m.definition, \
         m.status, m.error, m.requested_by, m.created_at, m.ready_at, m.last_used_at, \
         s.idx_scan, pg_relation_size(s.indexrelid) AS size_bytes, \
         p.phase, p.blocks_done, p.blocks_total, p.tuples_done, p.tuples_total \
         FROM managed_indexes m \
         LEFT JOIN pg_stat_user_indexes s ON s.indexrelname = m.name \
         LEFT JOIN pg_stat_progress_create_index p ON p.index_relid = s.indexrelid";

    fn row_json(row: &sqlx::postgres::PgRow) -> Result<Value, sqlx::Error> {
        let path: Vec<String> = row.try_get("path")?;
        let progress = row
            .try_get::<Option<String>, _>("phase")?
            .map(|phase| -> Result<Value, sqlx::Error> {
                Ok(json!({
                    "phase": phase,
                    "blocksDone": row.try_get::<Option<i64>, _>("blocks_done")?,
                    "blocksTotal": row.try_get::<Option<i64>, _>("blocks_total")?,
                    "tuplesDone": row.try_get::<Option<i64>, _>("tuples_done")?,
                    "tuplesTotal": row.try_get::<Option<i64>, _>("tuples_total")?,
                }))
            })
            .transpose()?;
        Ok(json!({
            "name": row.try_get::<String, _>("name")?,
            "type": row.try_get::<String, _>("doc_type")?,
            "path": format!("data.{}", path.join(".")),
            "kind": row.try_get::<String, _>("kind")?,
            "definition": row.try_get::<String, _>("definition")?,
            "status": row.try_get::<String, _>("status")?,
            "error": row.try_get::<Option<String>, _>("error")?,
            "requestedBy": row.try_get::<String, _>("requested_by")?,
            "createdAt": row.try_get::<chrono::DateTime<chrono::Utc>, _>("created_at")?,
            "readyAt": row.try_get::<Option<chrono::DateTime<chrono::Utc>>, _>("ready_at")?,
            "lastUsedAt": row.try_get::<chrono::DateTime<chrono::Utc>, _>("last_used_at")?,
            "scans": row.try_get::<Option<i64>, _>("idx_scan")?,
            "sizeBytes": row.try_get::<Option<i64>, _>("size_bytes")?,
            "progress": progress,
        }))
    }

    async fn describe(&self, name: &str) -> Result<Value, GovernanceError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{} WHERE m.name = $1",
            Self::DESCRIBE
        )))
        .bind(name)
        .fetch_one(self.pool())
        .await?;
        Ok(Self::row_json(&row)?)
    }

    /// Every managed index with its state, build progress and use.
    pub async fn list(&self) -> Result<Vec<Value>, GovernanceError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{} ORDER BY m.created_at",
            Self::DESCRIBE
        )))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Self::row_json(r).map_err(GovernanceError::from))
            .collect()
    }

    /// Notes which ready indexes were used since the last check, and drops those unused for
    /// `indexes.unused_after`. Returns the names dropped.
    pub async fn prune(&self) -> Result<Vec<String>, GovernanceError> {
        // Shapes nobody has run for `indexes.shape_retention` suggest nothing any more.
        sqlx::query("DELETE FROM query_shapes WHERE last_seen < now() - make_interval(secs => $1)")
            .bind(self.config.shape_retention.as_secs_f64())
            .execute(self.pool())
            .await?;
        let rows: Vec<(String, i64, bool)> = sqlx::query_as(
            "SELECT m.name, coalesce(s.idx_scan, 0), \
                    m.last_used_at < now() - make_interval(secs => $1) \
             FROM managed_indexes m LEFT JOIN pg_stat_user_indexes s ON s.indexrelname = m.name \
             WHERE m.status = 'ready' AND m.name LIKE 'vibe\\_auto\\_%'",
        )
        .bind(self.config.unused_after.as_secs_f64())
        .fetch_all(self.pool())
        .await?;
        let mut dropped = Vec::new();
        for (name, scans, stale) in rows {
            if !is_managed_name(&name) {
                tracing::warn!(index = %name, "not a name Vibe makes; left alone");
                continue;
            }
            let last: i64 =
                sqlx::query_scalar("SELECT last_scans FROM managed_indexes WHERE name = $1")
                    .bind(&name)
                    .fetch_one(self.pool())
                    .await?;
            // A scan count that moved either way is use: statistics reset (crash recovery, a
            // failover, `pg_stat_reset`) start it again from zero.
            if scans != last {
                sqlx::query(
                    "UPDATE managed_indexes SET last_scans = $2, last_used_at = now() WHERE name = $1",
                )
                .bind(&name)
                .bind(scans)
                .execute(self.pool())
                .await?;
            } else if stale {
                // Claimed first: another node pruning now finds it no longer `ready`, and an
                // approval of the same index waits for `dropped` — else a drop that waited on a
                // new build's lock would drop the new index.
                let claimed = sqlx::query(
                    "UPDATE managed_indexes SET status = 'dropping' \
                     WHERE name = $1 AND status = 'ready' AND last_scans = $2",
                )
                .bind(&name)
                .bind(scans)
                .execute(self.pool())
                .await?
                .rows_affected();
                if claimed == 0 {
                    continue;
                }
                self.drop_claimed(&name).await?;
                tracing::info!(index = %name, "dropped an unused managed index");
                dropped.push(name);
            }
        }
        Ok(dropped)
    }

    /// Drops managed index `name`, whose row is `dropping`, and marks it `dropped`; a drop that
    /// fails (a lock wait cancelled, a statement timeout) puts the row back to `ready`, for the
    /// next prune to try again — `dropping` is taken by neither a prune nor an approval.
    async fn drop_claimed(&self, name: &str) -> Result<(), GovernanceError> {
        // Managed names only (callers check); the name is one this module made.
        let dropped = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP INDEX CONCURRENTLY IF EXISTS {name}"
        )))
        .execute(self.pool())
        .await;
        if let Err(e) = dropped {
            sqlx::query(
                "UPDATE managed_indexes SET status = 'ready' \
                 WHERE name = $1 AND status = 'dropping'",
            )
            .bind(name)
            .execute(self.pool())
            .await?;
            return Err(e.into());
        }
        sqlx::query(
            "UPDATE managed_indexes SET status = 'dropped' WHERE name = $1 AND status = 'dropping'",
        )
        .bind(name)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// With `indexes.auto_create_min_calls` set: approves the hottest suggestion whose shape
    /// was called at least that often — one build at a time (each holds a pooled connection
    /// and they queue on the table's lock), and never one that failed or was dropped as unused
    /// (call counts do not decay: it would be built again and again; an operator may approve it).
    async fn apply_policy(&self) -> Result<(), GovernanceError> {
        let threshold = self.config.auto_create_min_calls;
        if threshold == 0 {
            return Ok(());
        }
        let settled: Vec<(String, Vec<String>, String, String)> =
            sqlx::query_as("SELECT doc_type, path, kind, status FROM managed_indexes")
                .fetch_all(self.pool())
                .await?;
        if settled.iter().any(|(.., status)| status == "building") {
            return Ok(());
        }
        for s in self.suggestions().await? {
            if s.evidence["calls"].as_u64().unwrap_or(0) < threshold {
                continue;
            }
            let Some(path) = s.path.strip_prefix("data.") else {
                continue;
            };
            let path: Vec<String> = path.split('.').map(str::to_owned).collect();
            let Some(kind) = IndexKind::parse(&s.kind) else {
                continue;
            };
            let refused = settled.iter().any(|(t, p, k, status)| {
                *t == s.doc_type && *p == path && k == kind.as_str() && status != "ready"
            });
            if refused {
                continue;
            }
            self.approve(&s.doc_type, &path, kind, "policy").await?;
            return Ok(());
        }
        Ok(())
    }

    /// Rows left `building` by a node that stopped mid-build (no session runs the build any
    /// more): `ready` if the index got built and is valid, else `failed`. A row approved in the
    /// last minute is left alone: its build may not have reached the database yet. Rows left
    /// `dropping` are dropped.
    async fn settle_interrupted_builds(&self) -> Result<(), GovernanceError> {
        sqlx::query(
            "UPDATE managed_indexes m SET \
               status = CASE WHEN v.valid THEN 'ready' ELSE 'failed' END, \
               ready_at = CASE WHEN v.valid THEN now() END, \
               error = CASE WHEN v.valid THEN NULL \
                            ELSE 'interrupted: the node building it stopped' END \
             FROM (SELECT b.name, coalesce((SELECT i.indisvalid FROM pg_class c \
                                            JOIN pg_index i ON i.indexrelid = c.oid \
                                            WHERE c.relname = b.name), false) AS valid \
                   FROM managed_indexes b WHERE b.status = 'building') v \
             WHERE m.name = v.name AND m.created_at < now() - interval '1 minute' \
               AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a \
                               WHERE a.state = 'active' AND a.pid <> pg_backend_pid() \
                                 AND strpos(a.query, m.name) > 0)",
        )
        .execute(self.pool())
        .await?;
        // A drop its node stopped in the middle of: finished (dropping again is harmless if
        // another node is at it now).
        let dropping: Vec<String> =
            sqlx::query_scalar("SELECT name FROM managed_indexes WHERE status = 'dropping'")
                .fetch_all(self.pool())
                .await?;
        for name in dropping.iter().filter(|name| is_managed_name(name)) {
            self.drop_claimed(name).await?;
        }
        Ok(())
    }

    /// Flushes shapes (and applies the policy) every `flush_interval`, prunes every
    /// `prune_interval`, until `stop`.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        if let Err(e) = self.settle_interrupted_builds().await {
            tracing::warn!(error = %e, "settling interrupted index builds failed");
        }
        let mut flush = tokio::time::interval(self.config.flush_interval);
        let mut prune = tokio::time::interval(self.config.prune_interval);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The work of a tick races the stop: a prune's `DROP INDEX CONCURRENTLY` can wait
            // on a long transaction, and shutdown must not.
            let work = async {
                tokio::select! {
                    _ = flush.tick() => {
                        if let Err(e) = self.flush().await {
                            tracing::debug!(error = %e, "flushing query shapes failed");
                        }
                        if let Err(e) = self.apply_policy().await {
                            tracing::warn!(error = %e, "the index policy failed");
                        }
                    }
                    _ = prune.tick() => {
                        if let Err(e) = self.prune().await {
                            tracing::warn!(error = %e, "pruning managed indexes failed");
                        }
                    }
                }
            };
            tokio::select! {
                () = work => {}
                () = &mut stop => {
                    self.builds
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .abort_all();
                    let _ = tokio::time::timeout(Duration::from_secs(2), self.flush()).await;
                    return;
                }
            }
        }
    }
}

/// The range-compared data paths of a stored shape (see `QuerySpec::shape`).
fn range_paths_of_shape(shape: &Value) -> Vec<(Vec<String>, IndexKind)> {
    let mut out = Vec::new();
    fn walk(node: &Value, out: &mut Vec<(Vec<String>, IndexKind)>) {
        for key in ["and", "or"] {
            if let Some(members) = node.get(key).and_then(Value::as_array) {
                members.iter().for_each(|m| walk(m, out));
            }
        }
        if let Some(inner) = node.get("not") {
            walk(inner, out);
        }
        let op = node.get("op").and_then(Value::as_str).unwrap_or("");
        let field = node.get("field").and_then(Value::as_str).unwrap_or("");
        if matches!(op, "gt" | "gte" | "lt" | "lte")
            && let Some(path) = field.strip_prefix("data.")
        {
            let kind = if node.get("kind").and_then(Value::as_str) == Some("string") {
                IndexKind::Text
            } else {
                IndexKind::Json
            };
            out.push((path.split('.').map(str::to_owned).collect(), kind));
        }
    }
    if let Some(filter) = shape.get("where") {
        walk(filter, &mut out);
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_paths_name_the_expression_kind() {
        let request: QueryRequest = serde_json::from_value(json!({
            "type": "items",
            "where": {"data.score": {"gte": 1}, "or": [{"data.name": {"lt": "m"}}, {"data.tag": "x"}],
                      "not": {"data.score": {"lt": 5}}, "data.n": {"in": [1, 2]}}
        }))
        .unwrap();
        let spec = QuerySpec::parse(&request, "did:key:zA", QueryLimits::default()).unwrap();
        assert_eq!(
            range_paths_of_shape(&spec.shape()),
            vec![
                (vec!["name".to_owned()], IndexKind::Text),
                (vec!["score".to_owned()], IndexKind::Json),
            ]
        );
    }

    #[test]
    fn managed_names_are_stable_and_distinct() {
        let a = index_name("items", &["score".to_owned()], IndexKind::Json);
        assert_eq!(
            a,
            index_name("items", &["score".to_owned()], IndexKind::Json)
        );
        assert_ne!(
            a,
            index_name("items", &["score".to_owned()], IndexKind::Text)
        );
        assert!(is_managed_name(&a));
        assert!(!is_managed_name("documents_data"));
        assert!(!is_managed_name(
            "vibe_auto_0123456789abcdef; DROP TABLE documents"
        ));
        assert!(definition("Bad Type", &["score".to_owned()], IndexKind::Json).is_err());
    }
}
