//! The document store: every SQL statement about documents, and the access decisions that need
//! the stored row (ACL and revision checks happen on the row locked for the write).
//!
//! Invariant: values are always bound parameters; SQL text is static.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use vibe_actors::change::SnapshotView;
use vibe_actors::live_query::Snapshot;
use vibe_actors::query::QuerySpec;
use vibe_actors::query::keyset::Keyset;

use crate::acl::{Acl, HeldCertificates, NoCredentials, Operation};
use crate::feed::listener::FeedWaker;
use crate::wire::Document;

/// The columns [`document`] reads, spliced into static SQL text with `concat!`.
macro_rules! doc_columns {
    () => {
        "id, owner_did, type, parent, created_at, updated_at, rev, acl, data"
    };
}

/// The certificates `$1` holds (documents of the reserved certificate type naming it as subject,
/// unexpired when the statement starts — not when its transaction did, which may have waited for
/// a lock since), as `(issuer, type)`. The type is spelled out (it is a constant): a bound one
/// would keep the planner from the partial index `documents_certificates` in generic plans.
macro_rules! held_certificates {
    () => {
        "SELECT owner_did, data ->> 'type' FROM documents \
         WHERE type = 'vibe.certificate' AND data ->> 'subject' = $1 \
         AND data ->> 'type' IS NOT NULL \
         AND (data ->> 'expires_at' IS NULL \
              OR (data ->> 'expires_at')::timestamptz > statement_timestamp())"
    };
}

mod batch;
mod creates;
mod query;
mod reads;
pub mod shapes;

pub use query::index_expression;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("document not found")]
    NotFound,
    #[error("a document with this id already exists")]
    AlreadyExists,
    #[error("revision mismatch: the document is at rev {current}")]
    RevMismatch { current: i64 },
    #[error("access denied by the document's ACL")]
    Forbidden,
    #[error("only the owner may change a document's ACL")]
    AclOwnerOnly,
    #[error("no parent document with this id that the caller may see")]
    ParentNotFound,
    /// The caller may read the parent (of `parent_type`) but its ACL does not let them create
    /// under it. An edge whose token may not read that type turns this into
    /// [`StoreError::ParentNotFound`] ([`StoreError::hiding_parent_unless`]).
    #[error("the parent's ACL does not allow creating under it")]
    ParentForbidden { parent_type: String },
    /// Valid JSON that PostgreSQL's `jsonb` cannot hold (a `\u0000` in a string or key).
    #[error("the document holds a value the database cannot store: {0}")]
    Unstorable(String),
    /// A value at a data path with an expression index is larger than a B-tree entry may be
    /// (about 2.7 KB after compression).
    #[error("a value is too large for the index on its data path: {0}")]
    IndexedValueTooLarge(String),
    #[error("the database is unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// A query ran past `query.statement_timeout` and PostgreSQL cancelled it.
    #[error("the query ran past its statement timeout")]
    QueryTimeout,
    #[error("database error: {0}")]
    Database(sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                StoreError::Unavailable(e)
            }
            // Class 08 (connection exception) and 57P (the server shutting down, or the backend
            // terminated): the connection is gone, as after an I/O error.
            sqlx::Error::Database(ref db)
                if db
                    .code()
                    .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")) =>
            {
                StoreError::Unavailable(e)
            }
            // query_canceled: by statement_timeout (Vibe cancels no statement itself; an
            // operator's pg_cancel_backend would read the same).
            sqlx::Error::Database(ref db) if db.code().as_deref() == Some("57014") => {
                StoreError::QueryTimeout
            }
            // untranslatable_character: jsonb refuses `\u0000`, which JSON itself allows.
            sqlx::Error::Database(ref db) if db.code().as_deref() == Some("22P05") => {
                StoreError::Unstorable(db.message().to_owned())
            }
            // program_limit_exceeded: what an index entry over the B-tree maximum raises.
            sqlx::Error::Database(ref db) if db.code().as_deref() == Some("54000") => {
                StoreError::IndexedValueTooLarge(db.message().to_owned())
            }
            e => StoreError::Database(e),
        }
    }
}

/// A position in the newest-first list order: (created_at, id) of the last document returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListCursor {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

const DOC_COLUMNS: &str = doc_columns!();

pub use batch::Batching;

/// The pool the queries clients compose run on (`POST /v1/query`, `readOnce`, `expand`, the
/// query plan): apart from the pool of writes and reads by id, so slow queries hold at most
/// `connections` and cannot starve those; PostgreSQL cancels each of its statements after
/// `statement_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct QueryPool {
    pub connections: u32,
    pub statement_timeout: Duration,
}

/// Pool and statements over the documents schema.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    /// See [`QueryPool`].
    queries: PgPool,
    /// `query.statement_timeout` in milliseconds, also set for live-query loads.
    statement_timeout_ms: u128,
    /// Told after every committed write, so this node's feed reader makes a tick at once.
    waker: FeedWaker,
    /// Shapes and latencies of the queries run (index governance).
    shapes: Arc<shapes::ShapeRecorder>,
    /// Creates, grouped when they arrive concurrently (see [`batch`]).
    creates: batch::Batcher<creates::Creates>,
    /// Reads by id, grouped when they arrive concurrently.
    reads: batch::Batcher<reads::Reads>,
}

impl Store {
    /// Opens a pool; fails fast if the database cannot be reached.
    pub async fn connect(
        options: PgConnectOptions,
        max_connections: u32,
        acquire_timeout: Duration,
        create_batching: Batching,
        read_batching: Batching,
        query_pool: QueryPool,
    ) -> Result<Self, StoreError> {
        // JIT compiles a plan in tens to hundreds of milliseconds once its cost estimate is
        // high (the change-feed reads can be): a latency cliff no OLTP query here wants.
        // `vibe_tick` relies on READ COMMITTED (a fresh snapshot per statement); pin it against
        // a database whose default isolation is stricter.
        let options = options.options([
            ("jit", "off"),
            ("default_transaction_isolation", "read committed"),
        ]);
        let statement_timeout_ms = query_pool.statement_timeout.as_millis();
        // Opened as queries come: most nodes serve few of them.
        let queries = PgPoolOptions::new()
            .test_before_acquire(false)
            .max_connections(query_pool.connections)
            .acquire_timeout(acquire_timeout)
            .connect_lazy_with(
                options
                    .clone()
                    .options([("statement_timeout", format!("{statement_timeout_ms}ms"))]),
            );
        let pool = PgPoolOptions::new()
            // sqlx pings a pooled connection before every use by default: one extra round trip
            // per request. A connection broken by a database restart fails its next query
            // instead (answered 503, and the pool discards it).
            .test_before_acquire(false)
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            .connect_with(options)
            .await
            .map_err(StoreError::Unavailable)?;
        let waker = FeedWaker::default();
        let creates = creates::Creates {
            pool: pool.clone(),
            waker: waker.clone(),
        };
        let reads = reads::Reads { pool: pool.clone() };
        Ok(Self {
            pool,
            queries,
            statement_timeout_ms,
            waker,
            shapes: Arc::default(),
            creates: batch::Batcher::new(creates, create_batching),
            reads: batch::Batcher::new(reads, read_batching),
        })
    }

    /// The waker this store rings after each committed write.
    pub fn waker(&self) -> &FeedWaker {
        &self.waker
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes the pool: waits for the connections in use to come back, then closes them all.
    pub async fn close(&self) {
        self.creates.close();
        self.reads.close();
        self.pool.close().await;
        self.queries.close().await;
    }

    /// Applies the embedded migrations that have not run yet.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// A trivial round trip, for health checks.
    /// Whether the database answers. On an idle pooled connection when there is one; else —
    /// every connection busy (the pool is saturated, the database is not down) or the idle one
    /// failed (left broken by a database restart, which the next request would only discard) —
    /// on a connection of its own, so the answer is about the database, not the pool.
    pub async fn ping(&self) -> Result<(), StoreError> {
        use sqlx::Connection as _;
        if let Some(mut pooled) = self.pool.try_acquire()
            && sqlx::query("SELECT 1").execute(&mut *pooled).await.is_ok()
        {
            return Ok(());
        }
        let mut own = match sqlx::PgConnection::connect_with(&self.pool.connect_options()).await {
            Ok(own) => own,
            // The server answered that it has no connection to spare: it is up, and busy.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("53300") => {
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        sqlx::query("SELECT 1").execute(&mut own).await?;
        let _ = own.close().await;
        Ok(())
    }

    /// Inserts a new document owned by `owner` (a server-assigned UUIDv7 id unless `id` is
    /// given); [`StoreError::AlreadyExists`] if the id is taken. Concurrent creates share a
    /// statement and a commit ([`batch`]). A create under a `parent` needs to own the parent or
    /// to be admitted by its ACL `create` rule (see [`Store::create_under`]).
    pub async fn create(
        &self,
        owner: &str,
        doc_type: &str,
        id: Option<Uuid>,
        parent: Option<Uuid>,
        acl: Acl,
        data: serde_json::Value,
    ) -> Result<Document, StoreError> {
        let row = creates::NewRow {
            id: id.unwrap_or_else(Uuid::now_v7),
            owner: owner.to_owned(),
            doc_type: doc_type.to_owned(),
            parent,
            acl,
            data,
        };
        match parent {
            None => self.creates.run(row).await,
            Some(parent) => self.create_under(row, parent).await,
        }
    }

    /// Inserts `row` under `parent` if the parent's ACL lets the new document's owner create
    /// there.
    ///
    /// The rule is read first without a lock: a caller it refuses is turned away before taking
    /// any (refused creates never hold up the parent owner's writes), and one that may not read
    /// the parent either gets [`StoreError::ParentNotFound`], as for a parent that does not
    /// exist, so the create route does not tell who may see which documents exist. The parent's
    /// owner needs no rule and goes on to the grouped creates: a child outlives its parent, so a
    /// create racing its owner's own delete of the parent ends as if it had come first. Anyone
    /// else's create is decided again on the parent locked `FOR SHARE` until the insert commits,
    /// with the certificates the rule tests locked the same way: a concurrent change of the
    /// parent's ACL, its delete or the revocation of such a certificate waits for this create, or
    /// this create for it (and then obeys the new state) — nothing is made under a right already
    /// withdrawn. (Two variants measured slower, docs/benchmarks.md: reading the rule through
    /// the grouped reads outside the transaction, 0.6x and 0.3x of this at 8 and 32 clients; and
    /// deciding the rules in the grouped creates' transaction, 0.4x to 0.6x.)
    async fn create_under(
        &self,
        row: creates::NewRow,
        parent: Uuid,
    ) -> Result<Document, StoreError> {
        let creator = row.owner.as_str();
        let mut tx = self.pool.begin().await?;
        for lock in [false, true] {
            let ParentRule {
                owner,
                doc_type,
                acl,
            } = parent_rule(&mut tx, parent, lock)
                .await?
                .ok_or(StoreError::ParentNotFound)?;
            if creator == owner {
                tx.rollback().await?;
                return self.creates.run(row).await;
            }
            if !allowed_in(&mut tx, Operation::Create, creator, &owner, &acl, lock).await? {
                let readable =
                    allowed_in(&mut tx, Operation::Read, creator, &owner, &acl, false).await?;
                return Err(refusal(readable, doc_type));
            }
        }
        let doc = creates::insert_one(&mut tx, row).await?;
        tx.commit().await?;
        self.waker.committed();
        Ok(doc)
    }

    /// The certificates `caller` holds now, as `(issuer, type)`, for ACL predicates.
    pub async fn credentials(&self, caller: &str) -> Result<HeldCertificates, StoreError> {
        let mut conn = self.pool.acquire().await?;
        credentials_in(&mut conn, caller).await
    }

    /// Every valid certificate, for the realtime tree's book (read after the feed head is
    /// known: the feed re-applies later changes, which the book takes idempotently by id).
    pub async fn certificate_book(
        &self,
    ) -> Result<vibe_actors::certs::CertificateBook, StoreError> {
        use vibe_actors::certs::{CERTIFICATE_TYPE, Certificate, CertificateBook};
        let rows: Vec<(Uuid, String, serde_json::Value)> =
            sqlx::query_as("SELECT id, owner_did, data FROM documents WHERE type = $1")
                .bind(CERTIFICATE_TYPE)
                .fetch_all(&self.pool)
                .await?;
        let certificates = rows
            .iter()
            .filter_map(|(id, owner, data)| Certificate::from_document(*id, owner, data));
        Ok(CertificateBook::new(certificates, Utc::now()))
    }

    /// How many unexpired certificates `issuer` has issued.
    pub async fn certificates_issued(&self, issuer: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM documents WHERE type = 'vibe.certificate' AND owner_did = $1 \
             AND (data ->> 'expires_at' IS NULL \
                  OR (data ->> 'expires_at')::timestamptz > statement_timestamp())",
        )
        .bind(issuer)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Certificates `caller` issued (`issued`) or received, newest first (at most 1000).
    pub async fn certificates(
        &self,
        caller: &str,
        issued: bool,
    ) -> Result<Vec<Document>, StoreError> {
        let condition = if issued {
            "owner_did = $1"
        } else {
            "data ->> 'subject' = $1"
        };
        let sql = format!(
            "SELECT {DOC_COLUMNS} FROM documents WHERE type = 'vibe.certificate' AND {condition} \
             ORDER BY created_at DESC, id DESC LIMIT 1000"
        );
        // `condition` is one of two constants above; the caller is bound.
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(caller)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(document).collect()
    }

    /// May `caller` perform `op` on `doc`? Loads the caller's certificates only when the rule
    /// tests some.
    /// Whether the writer of `doc` may read it, for the answer to a write that has committed: a
    /// failure to tell (the certificates the ACL tests could not be read) counts as no. The
    /// answer then carries only the id and revision; it is never an error for a write that
    /// happened (a client would retry it).
    pub async fn may_read_written(&self, caller: &str, doc: &Document) -> bool {
        self.may(Operation::Read, caller, doc)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(id = %doc.id, error = %e, "could not tell whether a writer may read");
                false
            })
    }

    pub async fn may(
        &self,
        op: Operation,
        caller: &str,
        doc: &Document,
    ) -> Result<bool, StoreError> {
        if caller != doc.owner && doc.acl.uses_certificates(op) {
            let held = self.credentials(caller).await?;
            return Ok(doc.acl.allows(op, Some(caller), &doc.owner, &held));
        }
        Ok(doc.acl.allows(op, Some(caller), &doc.owner, &NoCredentials))
    }

    /// The document, if `caller` may read it. Concurrent reads share a statement ([`batch`]).
    pub async fn get(
        &self,
        caller: &str,
        doc_type: &str,
        id: Uuid,
    ) -> Result<Document, StoreError> {
        let doc = self
            .reads
            .run(id)
            .await?
            .filter(|doc| doc.doc_type == doc_type)
            .ok_or(StoreError::NotFound)?;
        if !self.may(Operation::Read, caller, &doc).await? {
            return Err(StoreError::Forbidden);
        }
        Ok(doc)
    }

    /// Rewrites a document under its row lock: checks write access and `expected_revs`, then asks
    /// `change` for the new data and, if the request writes it, the new ACL (None keeps it).
    pub async fn modify<E>(
        &self,
        caller: &str,
        doc_type: &str,
        id: Uuid,
        expected_revs: Option<&[i64]>,
        change: impl FnOnce(&Document) -> Result<(serde_json::Value, Option<Acl>), E>,
    ) -> Result<Result<Document, E>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let current = lock(&mut tx, caller, doc_type, id, expected_revs).await?;
        let (data, acl) = match change(&current) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        // Refused whatever its value: were an ACL equal to the current one accepted, a writer
        // could learn the owner's ACL by trying candidates.
        if acl.is_some() && caller != current.owner {
            return Err(StoreError::AclOwnerOnly);
        }
        // No ACL given: the stored one stays as it is, not as read here (one this version cannot
        // parse reads as owner-only, and writing that back would change it silently).
        let row = sqlx::query(concat!(
            "UPDATE documents SET data = $2, acl = coalesce($3, acl), rev = rev + 1, \
             updated_at = greatest(now(), updated_at) WHERE id = $1 RETURNING ",
            doc_columns!()
        ))
        .bind(id)
        .bind(&data)
        .bind(acl.as_ref().map(sqlx::types::Json))
        .fetch_one(&mut *tx)
        .await?;
        let doc = document(&row)?;
        tx.commit().await?;
        self.waker.committed();
        Ok(Ok(doc))
    }

    pub async fn delete(
        &self,
        caller: &str,
        doc_type: &str,
        id: Uuid,
        expected_revs: Option<&[i64]>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        lock(&mut tx, caller, doc_type, id, expected_revs).await?;
        sqlx::query("DELETE FROM documents WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.waker.committed();
        Ok(())
    }

    /// `owner`'s documents of `doc_type`, newest first, after `cursor`.
    pub async fn list_own(
        &self,
        owner: &str,
        doc_type: &str,
        limit: u32,
        cursor: Option<ListCursor>,
        budget: usize,
    ) -> Result<(Vec<Document>, bool), StoreError> {
        let (rows, cut) = match cursor {
            None => {
                let query = sqlx::query(concat!(
                    "SELECT ",
                    doc_columns!(),
                    " \
                     FROM documents WHERE owner_did = $1 AND type = $2 \
                     ORDER BY created_at DESC, id DESC LIMIT $3"
                ))
                .bind(owner)
                .bind(doc_type)
                .bind(i64::from(limit));
                fetch_within(query, &self.pool, budget).await?
            }
            Some(c) => {
                let query = sqlx::query(concat!(
                    "SELECT ",
                    doc_columns!(),
                    " \
                     FROM documents WHERE owner_did = $1 AND type = $2 \
                     AND (created_at, id) < ($4, $5) \
                     ORDER BY created_at DESC, id DESC LIMIT $3"
                ))
                .bind(owner)
                .bind(doc_type)
                .bind(i64::from(limit))
                .bind(c.created_at)
                .bind(c.id);
                fetch_within(query, &self.pool, budget).await?
            }
        };
        let docs = rows.iter().map(document).collect::<Result<_, _>>()?;
        Ok((docs, cut))
    }
}

impl Store {
    /// Runs a compiled query (its rows up to `budget` bytes, see [`fetch_within`]) and records
    /// its shape and latency.
    async fn run_recorded(
        &self,
        conn: &mut sqlx::PgConnection,
        spec: &QuerySpec,
        compiled: &query::Compiled,
        budget: usize,
    ) -> Result<(Vec<Document>, bool), StoreError> {
        let started = std::time::Instant::now();
        let page = query::run(conn, compiled, budget).await?;
        self.shapes.record(spec, started.elapsed());
        Ok(page)
    }

    /// The query shapes recorded since the last call (see `crate::governance`).
    pub fn take_shapes(&self) -> Vec<shapes::ShapeStats> {
        self.shapes.take()
    }

    /// The plan PostgreSQL chooses for one page of `spec` for `caller` (`EXPLAIN (FORMAT
    /// JSON)`); with `analyze`, run it and include actual rows and buffers (not timings).
    pub async fn explain(
        &self,
        spec: &QuerySpec,
        caller: &str,
        analyze: bool,
    ) -> Result<serde_json::Value, StoreError> {
        let mut conn = self.queries.acquire().await?;
        let compiled = query::compile(spec, Some(caller), None, i64::from(spec.limit) + 1);
        query::explain(&mut conn, &compiled, analyze).await
    }

    /// One page of a one-shot query for `caller`: up to `spec.limit` documents after `after`
    /// (fewer once they pass `budget` bytes), and whether more follow. Global queries leave out
    /// documents whose ACL denies the caller.
    pub async fn query_page(
        &self,
        spec: &QuerySpec,
        caller: &str,
        after: Option<&Keyset>,
        budget: usize,
    ) -> Result<(Vec<Document>, bool), StoreError> {
        let mut conn = self.queries.acquire().await?;
        let limit = i64::from(spec.limit);
        let compiled = query::compile(spec, Some(caller), after, limit + 1);
        let (mut docs, cut) = self
            .run_recorded(&mut conn, spec, &compiled, budget)
            .await?;
        let more = cut || docs.len() as i64 > limit;
        docs.truncate(spec.limit as usize);
        Ok((docs, more))
    }

    /// The types of the documents with these ids (each once), so a caller can tell which of them
    /// its token may read before [`Store::fetch_readable`].
    pub async fn types_of(&self, ids: &[Uuid]) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT DISTINCT type FROM documents WHERE id = ANY($1)")
                .bind(ids)
                .fetch_all(&self.queries)
                .await?,
        )
    }

    /// The documents with these ids and of these types that `caller` may read by their ACL
    /// (callers evaluate the ACL again); None if they hold more than `budget` bytes. The type
    /// filter and the read rule run in the SQL, so documents the caller (or its token, whose
    /// types callers pass) may not read are neither fetched nor counted against the budget,
    /// which would tell their size.
    pub async fn fetch_readable(
        &self,
        ids: &[Uuid],
        types: &[String],
        caller: &str,
        budget: usize,
    ) -> Result<Option<Vec<Document>>, StoreError> {
        // The rule of `Acl::allows` over the summary columns, as the shared and global queries
        // have it (src/store/query.rs): the owner, or allowed (publicly, by DID or by held
        // certificates) and not denied.
        let query = sqlx::query(concat!(
            "SELECT ",
            doc_columns!(),
            " FROM documents WHERE id = ANY($1) AND type = ANY($3) AND (owner_did = $2 OR (\
             (read_public OR read_allow_dids @> ARRAY[$2]::text[] \
              OR (read_predicates AND vibe_acl_preds_hold(acl, 'read', 'allow', $2))) \
             AND NOT read_deny_public AND NOT ($2 = ANY(read_deny_dids)) \
             AND NOT (read_predicates AND vibe_acl_preds_hold(acl, 'read', 'deny', $2))))"
        ))
        .bind(ids)
        .bind(caller)
        .bind(types);
        let (rows, cut) = fetch_within(query, &self.queries, budget).await?;
        if cut {
            return Ok(None);
        }
        rows.iter()
            .map(document)
            .collect::<Result<_, _>>()
            .map(Some)
    }

    /// A query's first `limit + 1` documents (fewer once they pass `budget` bytes: see
    /// [`query::run_window`]) and the snapshot they were read in, so a live query can tell which
    /// later changes the load already saw.
    pub async fn snapshot(&self, spec: &QuerySpec, budget: usize) -> Result<Snapshot, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        // A live query's load runs inside its actor: bound it, so one pathological query cannot
        // hold up its document type (and, through the page budget, the feed) for long.
        sqlx::query("SELECT set_config('statement_timeout', $1, true)")
            .bind(format!("{}ms", self.statement_timeout_ms))
            .execute(&mut *tx)
            .await?;
        // The transaction's first query (the set_config above) fixed its snapshot: this reports
        // it, and the query below reads in it.
        let text: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
            .fetch_one(&mut *tx)
            .await?;
        let view = SnapshotView::parse(&text).ok_or_else(|| {
            StoreError::Database(sqlx::Error::Protocol(format!(
                "unreadable snapshot {text:?}"
            )))
        })?;
        let limit = i64::from(spec.limit) + 1;
        let compiled = query::compile(spec, None, None, limit);
        let started = std::time::Instant::now();
        let (docs, cut) = query::run_window(&mut tx, &compiled, budget).await?;
        self.shapes.record(spec, started.elapsed());
        tx.commit().await?;
        Ok(Snapshot {
            docs,
            cut,
            view,
            // Filled in by the caller that knows the feed (feed::LiveSnapshots).
            settled: vibe_actors::change::Cursor::new(1, 0),
        })
    }
}

/// Locks the row and checks that `caller` may write it at one of `expected_revs` (None: at any
/// revision; an empty list matches none).
async fn lock(
    tx: &mut sqlx::PgConnection,
    caller: &str,
    doc_type: &str,
    id: Uuid,
    expected_revs: Option<&[i64]>,
) -> Result<Document, StoreError> {
    let row = sqlx::query(concat!(
        "SELECT ",
        doc_columns!(),
        " \
         FROM documents WHERE id = $1 AND type = $2 FOR UPDATE"
    ))
    .bind(id)
    .bind(doc_type)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(StoreError::NotFound)?;
    let doc = document(&row)?;
    if !allowed_in(tx, Operation::Write, caller, &doc.owner, &doc.acl, true).await? {
        return Err(StoreError::Forbidden);
    }
    if let Some(expected) = expected_revs
        && !expected.contains(&doc.rev)
    {
        return Err(StoreError::RevMismatch { current: doc.rev });
    }
    Ok(doc)
}

/// May `caller` perform `op` under `acl` on a document of `owner`? Reads the caller's
/// certificates on `conn` (inside the caller's transaction) only when the rule tests some; with
/// `lock_certificates`, locked `FOR SHARE` until that transaction ends, so a revocation waits for
/// the write the certificate admitted.
async fn allowed_in(
    conn: &mut sqlx::PgConnection,
    op: Operation,
    caller: &str,
    owner: &str,
    acl: &Acl,
    lock_certificates: bool,
) -> Result<bool, StoreError> {
    if caller != owner && acl.uses_certificates(op) {
        // Only the certificates the rule tests: what others issued to the caller is not theirs
        // to bound, and reading (and locking) all of it on every write would let anyone make
        // the caller's writes slow by issuing certificates to them.
        let tested = acl.tested_certificates(op);
        let held = tested_credentials_in(conn, caller, &tested, lock_certificates).await?;
        return Ok(acl.allows(op, Some(caller), owner, &held));
    }
    Ok(acl.allows(op, Some(caller), owner, &NoCredentials))
}

/// What decides a create under a document: its owner, type and ACL.
struct ParentRule {
    owner: String,
    doc_type: String,
    acl: Acl,
}

/// The rule of document `id` (None: there is none), locked `FOR SHARE` with `lock`.
async fn parent_rule(
    conn: &mut sqlx::PgConnection,
    id: Uuid,
    lock: bool,
) -> Result<Option<ParentRule>, StoreError> {
    let query = if lock {
        "SELECT owner_did, type, acl FROM documents WHERE id = $1 FOR SHARE"
    } else {
        "SELECT owner_did, type, acl FROM documents WHERE id = $1"
    };
    let row: Option<(String, String, serde_json::Value)> =
        sqlx::query_as(query).bind(id).fetch_optional(conn).await?;
    Ok(row.map(|(owner, doc_type, acl)| ParentRule {
        owner,
        doc_type,
        acl: stored_acl(id, acl),
    }))
}

/// Why a create under a parent (of `parent_type`) was refused: the caller may read the parent
/// (it knows the parent exists) or may not (as if there were none).
fn refusal(parent_readable: bool, parent_type: String) -> StoreError {
    if parent_readable {
        StoreError::ParentForbidden { parent_type }
    } else {
        StoreError::ParentNotFound
    }
}

impl StoreError {
    /// A refusal to create under a parent the caller's ACL rights let them read, seen through a
    /// token: one that may not read documents of the parent's type (`token_reads` says no) learns
    /// no more than that no such parent is in its reach, as for a parent the user may not read.
    pub fn hiding_parent_unless(self, token_reads: impl FnOnce(&str) -> bool) -> Self {
        match self {
            StoreError::ParentForbidden { parent_type } if !token_reads(&parent_type) => {
                StoreError::ParentNotFound
            }
            other => other,
        }
    }
}

/// The rows of `query` in order until they hold more than `budget` bytes, and whether it cut
/// them short there. The row that crosses the budget is kept, so a page always moves on. A
/// page's rows are bounded by count (its limit) and each by the body limit, but their product
/// is not small: this bounds what one request holds in memory. Rows past the cut are read and
/// dropped by sqlx before the connection is used again.
pub(crate) async fn fetch_within<'c>(
    query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    executor: impl sqlx::PgExecutor<'c>,
    budget: usize,
) -> Result<(Vec<PgRow>, bool), sqlx::Error> {
    use futures_util::TryStreamExt as _;
    let mut stream = query.fetch(executor);
    let mut rows = Vec::new();
    let mut bytes = 0usize;
    while let Some(row) = stream.try_next().await? {
        bytes = bytes.saturating_add(row_bytes(&row));
        rows.push(row);
        if bytes > budget {
            return Ok((rows, true));
        }
    }
    Ok((rows, false))
}

/// The encoded size of a row's values.
fn row_bytes(row: &PgRow) -> usize {
    (0..row.len())
        .filter_map(|i| row.try_get_raw(i).ok())
        .filter_map(|value| value.as_bytes().ok().map(<[u8]>::len))
        .sum()
}

/// The statement reading the documents with these ids, in no particular order (missing ids
/// are left out).
fn by_ids(ids: &[Uuid]) -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(concat!(
        "SELECT ",
        doc_columns!(),
        " FROM documents WHERE id = ANY($1)"
    ))
    .bind(ids)
}

/// The ACL stored for document `id`. Rows written straight in SQL may carry one this version
/// cannot read: it fails closed, to the owner-only default.
fn stored_acl(id: Uuid, json: serde_json::Value) -> Acl {
    serde_json::from_value(json).unwrap_or_else(|e| {
        tracing::warn!(%id, error = %e, "unreadable ACL in the database; treating as owner-only");
        Acl::default()
    })
}

fn document(row: &PgRow) -> Result<Document, StoreError> {
    let id: Uuid = row.try_get("id")?;
    let acl = stored_acl(id, row.try_get("acl")?);
    Ok(Document {
        id,
        doc_type: row.try_get("type")?,
        owner: row.try_get("owner_did")?,
        parent: row.try_get("parent")?,
        rev: row.try_get("rev")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        acl,
        data: row.try_get("data")?,
    })
}

/// The certificates `caller` holds now, as ACL predicates test them; with `lock`, locked
/// `FOR SHARE` until the transaction on `conn` ends.
/// The certificates `caller` holds among `tested` (issuer, type) pairs, locked `FOR SHARE`
/// with `lock`.
async fn tested_credentials_in(
    conn: &mut sqlx::PgConnection,
    caller: &str,
    tested: &[(&str, &str)],
    lock: bool,
) -> Result<HeldCertificates, StoreError> {
    macro_rules! among_tested {
        () => {
            " AND (owner_did, data ->> 'type') IN (SELECT * FROM unnest($2::text[], $3::text[]))"
        };
    }
    let query = if lock {
        concat!(held_certificates!(), among_tested!(), " FOR SHARE")
    } else {
        concat!(held_certificates!(), among_tested!())
    };
    let (issuers, types): (Vec<&str>, Vec<&str>) = tested.iter().copied().unzip();
    let rows: Vec<(String, String)> = sqlx::query_as(query)
        .bind(caller)
        .bind(issuers)
        .bind(types)
        .fetch_all(conn)
        .await?;
    Ok(HeldCertificates(rows))
}

async fn credentials_in(
    conn: &mut sqlx::PgConnection,
    caller: &str,
) -> Result<HeldCertificates, StoreError> {
    let rows: Vec<(String, String)> = sqlx::query_as(held_certificates!())
        .bind(caller)
        .fetch_all(conn)
        .await?;
    Ok(HeldCertificates(rows))
}
