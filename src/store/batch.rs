//! Group commit for document creates: creates that arrive while earlier ones are being written
//! share one INSERT statement and one commit.
//!
//! At most [`CreateBatching::writers`] statements run at once. A create that finds one of those
//! slots free runs its own INSERT in its own task, so a lone create is never delayed nor handed
//! between tasks; creates that arrive while every slot is busy queue, and the slot that frees up
//! next inserts up to [`CreateBatching::max_rows`] of them at once (in a task of its own, so the
//! create that held it answers at once). Under concurrency this turns N round trips and N commits
//! into one of each — which is where a single-row insert's time goes here (waking the database
//! backend twice, and the commit's WAL flush), not in the insert itself.
//!
//! Invariant: every create gets the answer a lone INSERT would have given it. A statement that
//! fails as a whole (a constraint the API does not check first) is retried row by row, so one bad
//! row never fails its neighbours; two creates of the same id never share a statement.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{PgPool, Row};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::StoreError;
use crate::acl::Acl;
use crate::feed::listener::FeedWaker;
use crate::wire::Document;

/// How creates are grouped; see `[database]` in config/default.toml.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateBatching {
    /// Most rows one INSERT carries (1: every create is its own statement).
    pub max_rows: usize,
    /// Writer tasks, so INSERTs in flight at once (each holds a pooled connection meanwhile).
    pub writers: usize,
}

impl Default for CreateBatching {
    fn default() -> Self {
        Self {
            max_rows: 64,
            writers: 4,
        }
    }
}

/// One document to insert.
#[derive(Debug)]
pub(super) struct NewRow {
    pub id: Uuid,
    pub owner: String,
    pub doc_type: String,
    pub acl: Acl,
    pub data: serde_json::Value,
}

/// A queued create and where its answer goes.
#[derive(Debug)]
struct Create {
    row: NewRow,
    reply: oneshot::Sender<Result<Document, StoreError>>,
}

/// The creates of one store: the write slots and the queue behind them.
#[derive(Debug, Clone)]
pub(super) struct Creates(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    pool: PgPool,
    waker: FeedWaker,
    max_rows: usize,
    writers: usize,
    /// Beyond this many queued creates a create is refused (503) rather than queued.
    max_queued: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Slots in use: statements running or about to run.
    writing: usize,
    queue: VecDeque<Create>,
}

impl Creates {
    pub(super) fn new(pool: PgPool, waker: FeedWaker, batching: CreateBatching) -> Self {
        let max_rows = batching.max_rows.max(1);
        let writers = batching.writers.max(1);
        Self(Arc::new(Shared {
            pool,
            waker,
            max_rows,
            writers,
            max_queued: max_rows * writers * 16,
            state: Mutex::default(),
        }))
    }

    pub(super) async fn create(&self, row: NewRow) -> Result<Document, StoreError> {
        let shared = &self.0;
        let admitted = {
            let mut state = shared.lock();
            if state.writing < shared.writers && state.queue.is_empty() {
                state.writing += 1;
                Admitted::Slot(row)
            } else if state.queue.len() >= shared.max_queued {
                return Err(StoreError::Unavailable(sqlx::Error::Protocol(format!(
                    "{} document creates are already waiting for the database",
                    state.queue.len()
                ))));
            } else {
                let (reply, answer) = oneshot::channel();
                state.queue.push_back(Create { row, reply });
                metrics::gauge!("vibe_store_creates_waiting").increment(1.0);
                Admitted::Queued(answer)
            }
        };
        match admitted {
            Admitted::Slot(row) => {
                // Released when this future ends, also when it is dropped mid-statement.
                let slot = Slot(self.0.clone());
                metrics::histogram!("vibe_store_create_batch_rows").record(1.0);
                let result = insert_one(&shared.pool, row).await;
                if result.is_ok() {
                    shared.waker.committed();
                }
                drop(slot);
                result
            }
            // The sender is dropped unanswered only if the runtime drops the writing task.
            Admitted::Queued(answer) => answer
                .await
                .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?,
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is consistent between statements (no code inside can panic halfway).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The queued creates a freed slot writes next (None: the slot is given back). Ids are
    /// distinct within a batch: a create whose id is already in it stays first in the queue.
    fn next_batch(&self) -> Option<Vec<Create>> {
        let mut state = self.lock();
        if state.queue.is_empty() {
            state.writing -= 1;
            return None;
        }
        let mut batch: Vec<Create> = Vec::new();
        let mut ids = HashSet::new();
        while batch.len() < self.max_rows {
            let Some(create) = state.queue.pop_front() else {
                break;
            };
            if !ids.insert(create.row.id) {
                state.queue.push_front(create);
                break;
            }
            batch.push(create);
        }
        metrics::gauge!("vibe_store_creates_waiting").decrement(batch.len() as f64);
        Some(batch)
    }

    /// Writes queued batches while there are any, then gives the slot back.
    async fn drain(self: Arc<Self>, mut batch: Vec<Create>) {
        loop {
            metrics::histogram!("vibe_store_create_batch_rows").record(batch.len() as f64);
            write(&self.pool, batch).await;
            self.waker.committed();
            match self.next_batch() {
                Some(next) => batch = next,
                None => return,
            }
        }
    }
}

/// How a create got in: with a write slot of its own, or into the queue.
#[allow(clippy::large_enum_variant)] // one per create, on the stack for one match: boxing would allocate
enum Admitted {
    Slot(NewRow),
    Queued(oneshot::Receiver<Result<Document, StoreError>>),
}

/// A write slot held by a create running its own statement.
struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(batch) = self.0.next_batch() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(self.0.clone().drain(batch));
            }
            // No runtime (it is being torn down): the queued creates' senders drop with the
            // batch, and their callers get `Unavailable`.
            Err(_) => drop(batch),
        }
    }
}

/// Inserts `batch` and answers each create.
async fn write(pool: &PgPool, batch: Vec<Create>) {
    if let [_] = batch.as_slice() {
        for create in batch {
            let result = insert_one(pool, create.row).await;
            let _ = create.reply.send(result);
        }
        return;
    }
    match insert_many(pool, &batch).await {
        Ok(mut rows) => {
            for create in batch {
                let result = match rows.remove(&create.row.id) {
                    Some(inserted) => inserted.document(create.row),
                    None => Err(StoreError::AlreadyExists),
                };
                let _ = create.reply.send(result);
            }
        }
        // The statement may or may not have committed: answer as a lone create would have.
        Err(StoreError::Unavailable(cause)) => {
            let cause = cause.to_string();
            for create in batch {
                let error = sqlx::Error::Protocol(cause.clone());
                let _ = create.reply.send(Err(StoreError::Unavailable(error)));
            }
        }
        // Refused as a whole, so nothing was written: find the row(s) at fault.
        Err(e) => {
            tracing::debug!(error = %e, rows = batch.len(), "batched create refused; retrying row by row");
            for create in batch {
                let result = insert_one(pool, create.row).await;
                let _ = create.reply.send(result);
            }
        }
    }
}

/// What the database adds to a new document. The rest is what was sent: reading `acl` and
/// `data` back would make PostgreSQL print the JSON and the server parse it again, for nothing
/// (a GET of the stored row parses to the same values).
struct Inserted(PgRow);

impl Inserted {
    fn document(self, row: NewRow) -> Result<Document, StoreError> {
        Ok(Document {
            id: row.id,
            doc_type: row.doc_type,
            owner: row.owner,
            rev: self.0.try_get("rev")?,
            created_at: self.0.try_get("created_at")?,
            updated_at: self.0.try_get("updated_at")?,
            acl: row.acl,
            data: row.data,
        })
    }
}

async fn insert_one(pool: &PgPool, row: NewRow) -> Result<Document, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO documents (id, owner_did, type, acl, data) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (id) DO NOTHING RETURNING rev, created_at, updated_at",
    )
    .bind(row.id)
    .bind(&row.owner)
    .bind(&row.doc_type)
    .bind(Json(&row.acl))
    .bind(&row.data)
    .fetch_optional(pool)
    .await?;
    match inserted {
        Some(inserted) => Inserted(inserted).document(row),
        None => Err(StoreError::AlreadyExists),
    }
}

/// One statement for the whole batch; the rows it inserted, by id (ids are distinct within a
/// batch, see [`Shared::next_batch`]).
async fn insert_many(
    pool: &PgPool,
    batch: &[Create],
) -> Result<HashMap<Uuid, Inserted>, StoreError> {
    let mut ids = Vec::with_capacity(batch.len());
    let mut owners = Vec::with_capacity(batch.len());
    let mut types = Vec::with_capacity(batch.len());
    let mut acls = Vec::with_capacity(batch.len());
    let mut data = Vec::with_capacity(batch.len());
    for Create { row, .. } in batch {
        ids.push(row.id);
        owners.push(row.owner.as_str());
        types.push(row.doc_type.as_str());
        acls.push(Json(&row.acl));
        data.push(&row.data);
    }
    let rows = sqlx::query(
        "INSERT INTO documents (id, owner_did, type, acl, data) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::jsonb[]) \
         ON CONFLICT (id) DO NOTHING RETURNING id, rev, created_at, updated_at",
    )
    .bind(ids)
    .bind(owners)
    .bind(types)
    .bind(acls)
    .bind(data)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| Ok((r.try_get("id")?, Inserted(r))))
        .collect()
}
