//! The change feed over PostgreSQL: the change log (inserts marked in their document's row by
//! column defaults, updates and deletes logged into `changes` by a trigger, all in the writer's
//! transaction; migrations/0013), ticks that cut it into globally ordered batches, and reads
//! after a cursor.
//!
//! Method (PgQ's): a tick stores `pg_current_snapshot()`, taken under an advisory lock so ticks
//! are strictly ordered and each snapshot sees at least what the previous one saw. Batch N is the
//! log rows and marked documents whose writing transaction is visible in tick N's snapshot and
//! not in tick N-1's, in `seq` order. Every committed change lands in exactly one batch,
//! whatever order transactions commit in; a cursor `(tick, seq)` means "batches before `tick`,
//! and batch `tick` up to `seq`", and means the same on every node. A long-running writer delays only its own changes (they
//! enter the batch of the first tick after its commit); it widens the xid range each batch scans
//! (from the oldest in-progress xid), which `vibe_feed_oldest_xact_age_seconds` reports.
//!
//! Invariant: values are bound parameters; no NOTIFY is ever sent from a writer's transaction.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgRow, Postgres};
use sqlx::{PgPool, Row};
pub use vibe_actors::change::{BadCursor, Change, Cursor, Image, Op, SnapshotView};
use vibe_actors::live_query::{BoxFuture, Snapshot, SnapshotSource};
use vibe_actors::query::QuerySpec;

use crate::store::{Store, StoreError, fetch_within};

pub mod listener;

/// Serialises tick creation across all nodes sharing the database.
const TICK_LOCK: i64 = 0x7669_6265_7469_636b; // "vibetick"
/// Serialises pruning across nodes.
const PRUNE_LOCK: i64 = 0x7669_6265_7072_756e; // "vibeprun"
/// [`Feed::with_page_bytes`] unless set: the default of `http.max_page_bytes`.
const DEFAULT_PAGE_BYTES: usize = 16 * 1024 * 1024;
/// The channel other nodes LISTEN on; a tick that cut a batch NOTIFYs it at its commit, with the
/// ticking node's id as payload.
pub const DOORBELL_CHANNEL: &str = "vibe_feed";

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("the cursor is older than the feed's retention")]
    CursorExpired,
    #[error("change feed database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// The changes read after a cursor, and the position to continue from.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub changes: Vec<Change>,
    /// Pass back to continue exactly after what this page covered (also when every change was
    /// filtered out).
    pub next: Option<Cursor>,
    /// The page hit its limit (in changes or in bytes): more may follow at once.
    pub full: bool,
}

/// Which changes a read returns; filtering happens in SQL, the cursor still advances past
/// everything scanned.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only these types (empty: all).
    pub types: Vec<String>,
    /// Only documents of this owner (None: all owners).
    pub owner: Option<String>,
}

/// Ticks, batch reads and retention over one pool.
#[derive(Debug, Clone)]
pub struct Feed {
    pool: PgPool,
    /// This node's name on the doorbell channel, so its feed reader can ignore the rings of the
    /// ticks it cut itself (it has read their batches already).
    node: String,
    /// The payload of the ticks cut for requests on this node ([`Feed::tick`]): other than
    /// `node`, so this node's own reader wakes for them too.
    requests_ring: String,
    ticks: Arc<TickShare>,
    /// A page ends once its rows hold more than this (see [`Feed::with_page_bytes`]).
    page_bytes: usize,
}

/// Callers of [`Feed::tick`] on this node share ticks: at most one runs at a time, and every
/// caller waiting for it is served by the next one. A tick serialises on the cluster-wide tick
/// lock, so without this every `/v1/changes` request and live-query load would queue its own.
#[derive(Debug, Default)]
struct TickShare {
    /// Held while a tick runs.
    running: tokio::sync::Mutex<()>,
    /// Ticks started on this node (the n-th tick to start has number n).
    started: AtomicU64,
    /// The number and result of the last tick that completed. Written with `running` held.
    done: std::sync::Mutex<(u64, Option<i64>)>,
}

/// What [`Feed::oldest_xact_age`] tracks between reports.
#[derive(Debug, Default)]
pub struct XminWatch {
    /// The oldest in-progress xid last seen, and when it was first seen.
    oldest: Option<(i64, Instant)>,
}

impl XminWatch {
    /// How long `xmin` has held back the feed's scans, as far as this watch has seen: since the
    /// first report that found it still in progress (0 when none is).
    pub fn age(&mut self, xmin: i64, xmax: i64, now: Instant) -> Duration {
        if xmin >= xmax {
            // No transaction in progress.
            self.oldest = None;
            return Duration::ZERO;
        }
        match self.oldest {
            Some((seen, since)) if seen == xmin => now.saturating_duration_since(since),
            _ => {
                self.oldest = Some((xmin, now));
                Duration::ZERO
            }
        }
    }
}

impl Feed {
    pub fn new(pool: PgPool) -> Self {
        let node = uuid::Uuid::new_v4().simple().to_string();
        Self {
            pool,
            requests_ring: format!("{node}-requests"),
            node,
            ticks: Arc::default(),
            page_bytes: DEFAULT_PAGE_BYTES,
        }
    }

    /// Ends a page once its rows hold more than `bytes` (the row that crosses it is kept, so a
    /// page always moves on). A change carries two images of up to a body's size each, so a page
    /// bounded by count alone could hold gigabytes.
    pub fn with_page_bytes(mut self, bytes: usize) -> Self {
        self.page_bytes = bytes.max(1);
        self
    }

    /// The payload of the doorbells of this node's feed reader's ticks ([`Feed::tick_and_read`]).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Makes sure a tick taken after this call began has cut every change committed before it;
    /// returns the id of the tick that did, if one was needed (None: nothing new was visible).
    /// A tick that cut a batch rings the doorbell at its commit (one round trip for both), so
    /// every node learns of every batch whoever cut it — this node's reader included, as these
    /// ticks are requests' (`/v1/changes`, a live query's load), not the reader's own.
    /// Concurrent callers on this node share one tick (see [`TickShare`]).
    pub async fn tick(&self) -> Result<Option<i64>, FeedError> {
        self.shared_tick(async || {
            let made: Option<i64> = sqlx::query_scalar("SELECT vibe_tick($1, $2, $3)")
                .bind(TICK_LOCK)
                .bind(DOORBELL_CHANNEL)
                .bind(&self.requests_ring)
                .fetch_one(&self.pool)
                .await?;
            Ok((made, None))
        })
        .await
        .map(|(made, _)| made)
    }

    /// [`Feed::tick`], then up to `limit` changes after `after` (unfiltered), in one round trip
    /// when this call runs the tick: the read happens inside the tick's statement, holding the
    /// cluster-wide tick lock, so keep `limit` small and read on with [`Feed::read`] when the
    /// page is full. When another caller's tick covers this one, it is a plain read.
    pub async fn tick_and_read(
        &self,
        after: Cursor,
        limit: u32,
    ) -> Result<(Option<i64>, Page), FeedError> {
        self.tick_and_read_on(None, after, limit).await
    }

    /// [`Feed::tick_and_read`] on `conn` when given, else on a pooled connection. The node's
    /// listener passes its LISTEN connection: the tick's own doorbell then comes back on the
    /// connection that rang it, in the reply, instead of waking a second backend and the
    /// listener; and a pooled connection would cost one more round trip when it is given back
    /// (sqlx tests every connection returned to the pool; see `store::batch`).
    pub async fn tick_and_read_on(
        &self,
        conn: Option<&mut PgConnection>,
        after: Cursor,
        limit: u32,
    ) -> Result<(Option<i64>, Page), FeedError> {
        let (made, page) = self
            .shared_tick(async || {
                let mut pooled: Option<PoolConnection<Postgres>> = None;
                let conn: &mut PgConnection = match conn {
                    Some(conn) => conn,
                    None => pooled.insert(self.pool.acquire().await?),
                };
                let query =
                    sqlx::query("SELECT * FROM vibe_feed_tick_read($1, $2, $3, $4, $5, $6)")
                        .bind(TICK_LOCK)
                        .bind(DOORBELL_CHANNEL)
                        .bind(&self.node)
                        .bind(after.tick)
                        .bind(after.seq)
                        .bind(i64::from(limit));
                let (rows, cut) = fetch_within(query, &mut *conn, self.page_bytes).await?;
                // Every row carries the tick cut; no rows means none was (see the migration).
                let made = match rows.first() {
                    Some(row) => row.try_get("made")?,
                    None => None,
                };
                let page = page(conn, &rows, after, limit, cut).await?;
                Ok((made, Some(page)))
            })
            .await?;
        let page = match page {
            Some(page) => page,
            None => self.read(after, &Filter::default(), limit).await?,
        };
        Ok((made, page))
    }

    /// Runs `tick` unless a tick that started after this call began has completed meanwhile;
    /// returns what `tick` returned, or that tick's id and no page.
    async fn shared_tick(
        &self,
        tick: impl AsyncFnOnce() -> Result<(Option<i64>, Option<Page>), FeedError>,
    ) -> Result<(Option<i64>, Option<Page>), FeedError> {
        // A tick that starts after this point sees every change committed before the call.
        let wanted = self.ticks.started.load(Ordering::Acquire) + 1;
        let _running = self.ticks.running.lock().await;
        let (done, made) = *self.ticks.lock_done();
        if done >= wanted {
            // Another caller's tick started after this call began: it covers this one too.
            return Ok((made, None));
        }
        let number = self.ticks.started.fetch_add(1, Ordering::AcqRel) + 1;
        let (made, page) = tick().await?;
        *self.ticks.lock_done() = (number, made);
        Ok((made, page))
    }

    /// Ticks run against the database by this node (diagnostics and tests).
    pub fn ticks_started(&self) -> u64 {
        self.ticks.started.load(Ordering::Acquire)
    }

    /// Drops the feed's history if the database's transaction ids went backwards since the last
    /// tick — a restore from a logical dump into a new cluster restarts them. Batches are cut by
    /// comparing snapshots, so across such a jump no new change would ever be found, and pruning
    /// would delete the new ones. Readers holding older cursors get `cursor_expired` (WebSocket:
    /// a `reset`) and start again from a snapshot. Returns whether it had to.
    pub async fn recover_from_xid_reset(&self) -> Result<bool, FeedError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(TICK_LOCK)
            .execute(&mut *tx)
            .await?;
        let went_back: bool = sqlx::query_scalar(
            "SELECT coalesce(( \
                 SELECT pg_snapshot_xmin(snapshot) > pg_snapshot_xmax(pg_current_snapshot()) \
                 FROM feed_ticks ORDER BY tick DESC LIMIT 1), false) \
             OR coalesce((SELECT max(xid) FROM changes) \
                 >= pg_snapshot_xmax(pg_current_snapshot())::text::bigint, false) \
             OR coalesce((SELECT max(log_xid) FROM documents WHERE log_xid IS NOT NULL) \
                 >= pg_snapshot_xmax(pg_current_snapshot())::text::bigint, false)",
        )
        .fetch_one(&mut *tx)
        .await?;
        if !went_back {
            return Ok(false);
        }
        sqlx::query("DELETE FROM changes").execute(&mut *tx).await?;
        // Inserts marked with the old cluster's ids would turn up in some batch once this
        // cluster's ids reach theirs. Unmarking them is not a write of the document: the
        // change-log trigger (which would log it) is off for this transaction's statement.
        for statement in [
            "ALTER TABLE documents DISABLE TRIGGER documents_change_log",
            "UPDATE documents SET log_xid = NULL, log_seq = NULL \
             WHERE log_xid >= pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
            "ALTER TABLE documents ENABLE TRIGGER documents_change_log",
        ] {
            sqlx::query(statement).execute(&mut *tx).await?;
        }
        sqlx::query("DELETE FROM feed_ticks")
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO feed_ticks (snapshot) VALUES (pg_current_snapshot())")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The position after the newest tick's batch: where a reader that wants only new changes
    /// starts.
    pub async fn head(&self) -> Result<Cursor, FeedError> {
        let tick: i64 = sqlx::query_scalar("SELECT coalesce(max(tick), 1) FROM feed_ticks")
            .fetch_one(&self.pool)
            .await?;
        Ok(Cursor::after_batch(tick))
    }

    /// The oldest position still readable: after the oldest retained tick.
    pub async fn tail(&self) -> Result<Cursor, FeedError> {
        let tick: i64 = sqlx::query_scalar("SELECT coalesce(min(tick), 1) FROM feed_ticks")
            .fetch_one(&self.pool)
            .await?;
        Ok(Cursor::after_batch(tick))
    }

    /// Up to `limit` changes after `after` in feed order, across as many ticks as it takes.
    pub async fn read(
        &self,
        after: Cursor,
        filter: &Filter,
        limit: u32,
    ) -> Result<Page, FeedError> {
        self.read_on(None, after, filter, limit).await
    }

    /// [`Feed::read`] on `conn` when given, else on a pooled connection.
    pub async fn read_on(
        &self,
        conn: Option<&mut PgConnection>,
        after: Cursor,
        filter: &Filter,
        limit: u32,
    ) -> Result<Page, FeedError> {
        let mut pooled: Option<PoolConnection<Postgres>> = None;
        let conn: &mut PgConnection = match conn {
            Some(conn) => conn,
            None => pooled.insert(self.pool.acquire().await?),
        };
        let query = sqlx::query("SELECT * FROM vibe_feed_read($1, $2, $3, $4, $5)")
            .bind(after.tick)
            .bind(after.seq)
            .bind(&filter.types)
            .bind(filter.owner.as_deref())
            .bind(i64::from(limit));
        let (rows, cut) = fetch_within(query, &mut *conn, self.page_bytes).await?;
        page(conn, &rows, after, limit, cut).await
    }

    /// Deletes the ticks older than `retention` but the newest of them, and the changes only the
    /// deleted ones cover. One node prunes at a time; the others skip.
    ///
    /// The newest old tick stays because the batch after it is cut against it: after a quiet
    /// spell longer than retention, the newest tick is old, and deleting it when the next one is
    /// cut would make that fresh batch unreadable (a caught-up cursor would get
    /// `cursor_expired`, and a reader starting over from the tail would skip the batch). Only a
    /// prefix goes, never a tick between two kept ones (tick dates follow transaction starts, so
    /// they need not grow with tick numbers): a hole would merge two batches.
    pub async fn prune(&self, retention: Duration) -> Result<u64, FeedError> {
        let mut tx = self.pool.begin().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(PRUNE_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            return Ok(0);
        }
        let secs = retention.as_secs_f64();
        sqlx::query(
            "DELETE FROM feed_ticks WHERE tick < (SELECT max(tick) FROM feed_ticks \
             WHERE created_at < now() - make_interval(secs => $1))",
        )
        .bind(secs)
        .execute(&mut *tx)
        .await?;
        // Rows below the oldest tick's xmin are visible in it: they belong to pruned batches.
        let deleted = sqlx::query(
            "DELETE FROM changes WHERE xid < ( \
                 SELECT pg_snapshot_xmin(snapshot)::text::bigint FROM feed_ticks ORDER BY tick LIMIT 1)",
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(deleted)
    }

    /// Age of the oldest transaction holding back the feed (it widens every batch's scan), in
    /// seconds. `pg_stat_activity` shows other roles' transactions only to members of
    /// `pg_read_all_stats`, so the snapshot's xmin — visible to every role — is watched too:
    /// the age is the larger of the two.
    pub async fn oldest_xact_age(&self, watch: &mut XminWatch) -> Result<f64, FeedError> {
        let row = sqlx::query(
            // Open transactions holding an xid, and prepared ones (they hold theirs until
            // COMMIT/ROLLBACK PREPARED, with no session at all).
            "SELECT (SELECT extract(epoch FROM now() - min(started))::float8 FROM ( \
                     SELECT xact_start AS started FROM pg_stat_activity WHERE backend_xid IS NOT NULL \
                     UNION ALL SELECT prepared FROM pg_prepared_xacts) open) AS seen, \
                    pg_snapshot_xmin(s)::text::bigint AS xmin, pg_snapshot_xmax(s)::text::bigint AS xmax \
             FROM pg_current_snapshot() s",
        )
        .fetch_one(&self.pool)
        .await?;
        let seen: Option<f64> = row.try_get("seen")?;
        let watched = watch.age(row.try_get("xmin")?, row.try_get("xmax")?, Instant::now());
        Ok(seen.unwrap_or(0.0).max(watched.as_secs_f64()))
    }
}

impl TickShare {
    fn lock_done(&self) -> std::sync::MutexGuard<'_, (u64, Option<i64>)> {
        // Only plain assignments happen under this lock: a poisoned one holds a whole value.
        self.done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Live queries' snapshots: the store's read, then a tick, so the snapshot says by which feed
/// position everything it saw has been cut into batches.
#[derive(Debug, Clone)]
pub struct LiveSnapshots {
    pub store: Store,
    pub feed: Feed,
}

impl LiveSnapshots {
    async fn load(&self, spec: &QuerySpec, budget: usize) -> Result<Snapshot, String> {
        let mut snapshot = match self.store.snapshot(spec, budget).await {
            // The pool does not test connections before use: after a database restart the first
            // one may be dead. It is discarded; a second attempt gets a fresh one.
            Err(StoreError::Unavailable(e)) => {
                tracing::debug!(error = %e, "snapshot on a dead connection; retrying once");
                self.store.snapshot(spec, budget).await
            }
            other => other,
        }
        .map_err(|e| e.to_string())?;
        // A tick taken now contains every change committed before the snapshot; without a new
        // tick, the newest one already does.
        self.feed.tick().await.map_err(|e| e.to_string())?;
        snapshot.settled = self.feed.head().await.map_err(|e| e.to_string())?;
        Ok(snapshot)
    }
}

impl SnapshotSource for LiveSnapshots {
    fn load(
        &self,
        spec: std::sync::Arc<QuerySpec>,
        budget: usize,
    ) -> BoxFuture<Result<Snapshot, String>> {
        let this = self.clone();
        Box::pin(async move { this.load(&spec, budget).await })
    }
}

/// The page `vibe_feed_read`'s `rows` (read after `after`, at most `limit`, on `conn`) make.
/// The page of `rows`; `cut`: they end at the byte budget, not where the statement did.
async fn page(
    conn: &mut PgConnection,
    rows: &[PgRow],
    after: Cursor,
    limit: u32,
    cut: bool,
) -> Result<Page, FeedError> {
    if rows.is_empty() {
        // Either nothing new, or the base tick is gone: tell them apart. (Batch `after.tick`
        // is cut by the tick before it; that tick must still be retained.)
        let base: Option<i64> =
            sqlx::query_scalar("SELECT max(tick) FROM feed_ticks WHERE tick < $1")
                .bind(after.tick)
                .fetch_one(conn)
                .await?;
        return match base {
            Some(_) => Ok(Page::default()),
            None => Err(FeedError::CursorExpired),
        };
    }
    let base: Option<i64> = rows[0].try_get("base")?;
    if base.is_none() {
        return Err(FeedError::CursorExpired);
    }
    let full = cut || rows.len() >= limit as usize;
    let mut changes = Vec::with_capacity(rows.len());
    let mut last_tick = after.tick;
    for row in rows {
        let tick: i64 = row.try_get("tick")?;
        last_tick = last_tick.max(tick);
        if let Some(change) = change(row, tick)? {
            changes.push(change);
        }
    }
    let next = match changes.last() {
        // A full page may have cut a batch: continue right after the last change.
        Some(last) if full => Some(last.cursor),
        _ => Some(Cursor::after_batch(last_tick)),
    };
    Ok(Page {
        changes,
        next,
        full,
    })
}

fn change(row: &PgRow, tick: i64) -> Result<Option<Change>, FeedError> {
    let Some(seq) = row.try_get::<Option<i64>, _>("seq")? else {
        return Ok(None); // a tick whose batch holds nothing (for this filter)
    };
    let op = match row.try_get::<i8, _>("op")? as u8 {
        b'i' => Op::Insert,
        b'u' => Op::Update,
        _ => Op::Delete,
    };
    let doc_id: uuid::Uuid = row.try_get("doc_id")?;
    let image = |acl: &str, data: &str| -> Result<Option<Image>, sqlx::Error> {
        let data = match row.try_get::<Option<serde_json::Value>, _>(data) {
            Ok(Some(data)) => data,
            Ok(None) => return Ok(None),
            // `jsonb` written in SQL can hold what JSON here cannot (a number past an f64,
            // nesting past 128 levels). One such row must not stop the feed for every node and
            // reader: the change passes without this version, as if nobody could see it (a live
            // query drops the document, a reader of `/v1/changes` gets a `remove`).
            Err(sqlx::Error::ColumnDecode { source, .. }) => {
                tracing::warn!(%doc_id, column = data, error = %source,
                    "a document version the feed cannot decode passes as unreadable");
                metrics::counter!("vibe_feed_undecodable_total").increment(1);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        // An ACL this version cannot read fails closed to owner-only, as in the store.
        let acl = row
            .try_get::<Option<serde_json::Value>, _>(acl)
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        Ok(Some(Image { acl, data }))
    };
    let xid = u64::try_from(row.try_get::<i64, _>("xid")?)
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    Ok(Some(Change {
        cursor: Cursor::new(tick, seq),
        xid,
        op,
        doc_id,
        doc_type: row.try_get("type")?,
        owner: row.try_get("owner_did")?,
        parent: row.try_get("parent")?,
        rev: row.try_get("rev")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        logged_at: row.try_get("logged_at")?,
        new: image("new_acl", "new_data")?,
        old: image("old_acl", "old_data")?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_xmin_ages_from_when_it_was_first_seen_and_resets_when_it_moves() {
        let t0 = Instant::now();
        let mut watch = XminWatch::default();
        assert_eq!(watch.age(100, 105, t0), Duration::ZERO, "first sight");
        let later = t0 + Duration::from_secs(30);
        assert_eq!(watch.age(100, 120, later), Duration::from_secs(30));
        assert_eq!(
            watch.age(101, 120, later),
            Duration::ZERO,
            "the old one ended"
        );
        assert_eq!(
            watch.age(101, 130, later + Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        assert_eq!(
            watch.age(130, 130, later),
            Duration::ZERO,
            "none in progress"
        );
        assert_eq!(watch.age(130, 131, later), Duration::ZERO);
    }
}
