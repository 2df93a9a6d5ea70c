//! The change feed over PostgreSQL: the change log (filled by a trigger in the writer's
//! transaction), ticks that cut it into globally ordered batches, and reads after a cursor.
//!
//! Method (PgQ's): a tick stores `pg_current_snapshot()`, taken under an advisory lock so ticks
//! are strictly ordered and each snapshot sees at least what the previous one saw. Batch N is the
//! log rows whose writing transaction is visible in tick N's snapshot and not in tick N-1's, in
//! `seq` order. Every committed change lands in exactly one batch, whatever order transactions
//! commit in; a cursor `(tick, seq)` means "batches before `tick`, and batch `tick` up to `seq`",
//! and means the same on every node. A long-running writer delays only its own changes (they
//! enter the batch of the first tick after its commit); it widens the xid range each batch scans
//! (from the oldest in-progress xid), which `vibe_feed_oldest_xact_age_seconds` reports.
//!
//! Invariant: values are bound parameters; no NOTIFY is ever sent from a writer's transaction.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::acl::{Acl, Operation};
use crate::wire::Document;

/// Serialises tick creation across all nodes sharing the database.
const TICK_LOCK: i64 = 0x7669_6265_7469_636b; // "vibetick"
/// Serialises pruning across nodes.
const PRUNE_LOCK: i64 = 0x7669_6265_7072_756e; // "vibeprun"
/// The channel other nodes LISTEN on; a payload-less doorbell sent after a tick commits.
pub const DOORBELL_CHANNEL: &str = "vibe_feed";

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("the cursor is older than the feed's retention")]
    CursorExpired,
    #[error("change feed database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// A position in the feed: everything in batches before `tick`, and batch `tick` up to `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    pub tick: i64,
    pub seq: i64,
}

impl Cursor {
    /// The position after every change of batch `tick`.
    pub fn after_batch(tick: i64) -> Self {
        Self {
            tick: tick + 1,
            seq: 0,
        }
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.tick, self.seq)
    }
}

/// A cursor string that is not `<tick>-<seq>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a cursor looks like `<tick>-<seq>`, e.g. `42-1007`")]
pub struct BadCursor;

impl FromStr for Cursor {
    type Err = BadCursor;
    fn from_str(s: &str) -> Result<Self, BadCursor> {
        let (tick, seq) = s.split_once('-').ok_or(BadCursor)?;
        let tick: i64 = tick.parse().map_err(|_| BadCursor)?;
        let seq: i64 = seq.parse().map_err(|_| BadCursor)?;
        if tick < 1 || seq < 0 {
            return Err(BadCursor);
        }
        Ok(Self { tick, seq })
    }
}

/// What happened to a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

/// The ACL and data of a document at one revision.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub acl: Acl,
    pub data: serde_json::Value,
}

/// One committed document write.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub cursor: Cursor,
    pub op: Op,
    pub doc_id: Uuid,
    pub doc_type: String,
    pub owner: String,
    pub rev: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the trigger ran (inside the writer's transaction): the start of feed latency.
    pub logged_at: DateTime<Utc>,
    /// After the write (insert, update).
    pub new: Option<Image>,
    /// Before the write (update, delete).
    pub old: Option<Image>,
}

impl Change {
    /// The document after the change, if it still exists.
    pub fn document(&self) -> Option<Document> {
        self.new.as_ref().map(|image| Document {
            id: self.doc_id,
            doc_type: self.doc_type.clone(),
            owner: self.owner.clone(),
            rev: self.rev,
            created_at: self.created_at,
            updated_at: self.updated_at,
            acl: image.acl.clone(),
            data: image.data.clone(),
        })
    }

    /// May `caller` read the document before / after this change?
    pub fn readable(&self, caller: Option<&str>) -> (bool, bool) {
        let can = |image: &Option<Image>| {
            image
                .as_ref()
                .is_some_and(|i| i.acl.allows(Operation::Read, caller, &self.owner))
        };
        (can(&self.old), can(&self.new))
    }
}

/// The changes read after a cursor, and the position to continue from.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub changes: Vec<Change>,
    /// Pass back to continue exactly after what this page covered (also when every change was
    /// filtered out).
    pub next: Option<Cursor>,
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
}

impl Feed {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Creates a tick if some change became visible since the newest one. Returns its id.
    pub async fn tick(&self) -> Result<Option<i64>, FeedError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(TICK_LOCK)
            .execute(&mut *tx)
            .await?;
        // A new statement, so a new snapshot taken after the lock: never older than the last tick.
        let tick: Option<i64> = sqlx::query_scalar(
            "WITH last AS (SELECT snapshot FROM feed_ticks ORDER BY tick DESC LIMIT 1) \
             INSERT INTO feed_ticks (snapshot) \
             SELECT pg_current_snapshot() FROM last WHERE EXISTS ( \
                 SELECT 1 FROM changes c \
                 WHERE c.xid >= pg_snapshot_xmin(last.snapshot) \
                   AND c.xid < pg_snapshot_xmax(pg_current_snapshot()) \
                   AND NOT pg_visible_in_snapshot(c.xid, last.snapshot) \
                   AND pg_visible_in_snapshot(c.xid, pg_current_snapshot())) \
             RETURNING tick",
        )
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(tick)
    }

    /// Wakes every node listening for ticks (sent from a pool connection, never a writer's).
    pub async fn ring_doorbell(&self) -> Result<(), FeedError> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(DOORBELL_CHANNEL)
            .execute(&self.pool)
            .await?;
        Ok(())
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
    pub async fn read(&self, after: Cursor, filter: &Filter, limit: u32) -> Result<Page, FeedError> {
        // Batch `after.tick` is cut by the tick before it; that tick must still be retained.
        let rows = sqlx::query(
            "WITH base AS (SELECT max(tick) AS tick FROM feed_ticks WHERE tick < $1), \
             t AS ( \
                 SELECT tick, snapshot, lag(snapshot) OVER (ORDER BY tick) AS prev \
                 FROM feed_ticks WHERE tick >= (SELECT tick FROM base) \
                 ORDER BY tick LIMIT 1001) \
             SELECT (SELECT tick FROM base) AS base, t.tick, c.seq, c.op, c.doc_id, c.type, c.owner_did, c.rev, \
                    c.created_at, c.updated_at, c.logged_at, c.new_acl, c.new_data, c.old_acl, c.old_data \
             FROM t LEFT JOIN LATERAL ( \
                 SELECT * FROM changes c \
                 WHERE c.xid >= pg_snapshot_xmin(t.prev) AND c.xid < pg_snapshot_xmax(t.snapshot) \
                   AND pg_visible_in_snapshot(c.xid, t.snapshot) \
                   AND NOT pg_visible_in_snapshot(c.xid, t.prev) \
                   AND (t.tick > $1 OR c.seq > $2) \
                   AND (cardinality($3::text[]) = 0 OR c.type = ANY($3)) \
                   AND ($4::text IS NULL OR c.owner_did = $4) \
                 ORDER BY c.seq LIMIT $5) c ON true \
             WHERE t.prev IS NOT NULL \
             ORDER BY t.tick, c.seq NULLS FIRST LIMIT $5",
        )
        .bind(after.tick)
        .bind(after.seq)
        .bind(&filter.types)
        .bind(filter.owner.as_deref())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            // Either nothing new, or the base tick is gone: tell them apart.
            let base: Option<i64> =
                sqlx::query_scalar("SELECT max(tick) FROM feed_ticks WHERE tick < $1")
                    .bind(after.tick)
                    .fetch_one(&self.pool)
                    .await?;
            return match base {
                Some(_) => Ok(Page {
                    changes: Vec::new(),
                    next: None,
                }),
                None => Err(FeedError::CursorExpired),
            };
        }
        let base: Option<i64> = rows[0].try_get("base")?;
        if base.is_none() {
            return Err(FeedError::CursorExpired);
        }
        let full = rows.len() >= limit as usize;
        let mut changes = Vec::with_capacity(rows.len());
        let mut last_tick = after.tick;
        for row in &rows {
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
        Ok(Page { changes, next })
    }

    /// Deletes ticks older than `retention` (keeping the newest) and the changes only they cover.
    /// One node prunes at a time; the others skip.
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
            "DELETE FROM feed_ticks WHERE created_at < now() - make_interval(secs => $1) \
             AND tick < (SELECT max(tick) FROM feed_ticks)",
        )
        .bind(secs)
        .execute(&mut *tx)
        .await?;
        // Rows below the oldest tick's xmin are visible in it: they belong to pruned batches.
        let deleted = sqlx::query(
            "DELETE FROM changes WHERE xid < ( \
                 SELECT pg_snapshot_xmin(snapshot) FROM feed_ticks ORDER BY tick LIMIT 1)",
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(deleted)
    }

    /// Age of the oldest transaction holding an xid (it widens every batch's scan), in seconds.
    pub async fn oldest_xact_age(&self) -> Result<f64, FeedError> {
        let age: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM now() - min(xact_start))::float8 FROM pg_stat_activity \
             WHERE backend_xid IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(age.unwrap_or(0.0))
    }
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
    let image = |acl: &str, data: &str| -> Result<Option<Image>, sqlx::Error> {
        let Some(data) = row.try_get::<Option<serde_json::Value>, _>(data)? else {
            return Ok(None);
        };
        let acl: Option<serde_json::Value> = row.try_get(acl)?;
        // An ACL this version cannot read fails closed to owner-only, as in the store.
        let acl = acl
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        Ok(Some(Image { acl, data }))
    };
    Ok(Some(Change {
        cursor: Cursor { tick, seq },
        op,
        doc_id: row.try_get("doc_id")?,
        doc_type: row.try_get("type")?,
        owner: row.try_get("owner_did")?,
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
    fn cursor_syntax_and_order() {
        let c: Cursor = "42-1007".parse().unwrap();
        assert_eq!(c, Cursor { tick: 42, seq: 1007 });
        assert_eq!(c.to_string(), "42-1007");
        for bad in ["", "42", "42-", "-1", "a-b", "0-0", "5--1", "1-2-3"] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad}");
        }
        assert!(Cursor { tick: 3, seq: 900 } < Cursor::after_batch(3));
        assert!(Cursor::after_batch(3) < Cursor { tick: 4, seq: 1 });
    }
}
