//! Group commit for document creates: creates that arrive while earlier ones are being written
//! share one INSERT statement and one commit.
//!
//! A fixed set of writer tasks takes creates from one queue. A writer that finds the queue empty
//! waits for the next create and writes it alone, so a lone create is never delayed; creates
//! queue only while every writer is busy, and the next free writer then takes up to
//! [`CreateBatching::max_rows`] of them at once. Under concurrency this turns N round trips and N
//! commits into one of each — which is where a single-row insert's time goes here (waking the
//! database backend twice, and the commit's WAL flush), not in the insert itself.
//!
//! Invariant: every create gets the answer a lone INSERT would have given it. A statement that
//! fails as a whole (a constraint the API does not check first) is retried row by row, so one bad
//! row never fails its neighbours; two creates of the same id never share a statement.

use std::sync::Arc;

use sqlx::PgPool;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

use super::{StoreError, document};
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
pub(super) struct Create {
    pub row: NewRow,
    pub reply: oneshot::Sender<Result<Document, StoreError>>,
}

/// Starts the writer tasks; creates go into the returned queue. The tasks end when every sender
/// is dropped.
pub(super) fn spawn_writers(
    pool: PgPool,
    waker: FeedWaker,
    batching: CreateBatching,
) -> mpsc::Sender<Create> {
    let max_rows = batching.max_rows.max(1);
    let writers = batching.writers.max(1);
    // Room for every writer's next batch; beyond it a create waits to be queued (backpressure
    // on the callers rather than an unbounded queue).
    let (queue, receiver) = mpsc::channel(max_rows * writers * 2);
    let receiver = Arc::new(Mutex::new(receiver));
    for _ in 0..writers {
        tokio::spawn(writer(
            pool.clone(),
            waker.clone(),
            receiver.clone(),
            max_rows,
        ));
    }
    queue
}

async fn writer(
    pool: PgPool,
    waker: FeedWaker,
    queue: Arc<Mutex<mpsc::Receiver<Create>>>,
    max_rows: usize,
) {
    // A create whose id is already in the batch being gathered waits for this writer's next one.
    let mut held: Option<Create> = None;
    loop {
        let mut batch = Vec::new();
        {
            // One idle writer at a time waits on the queue; the others wait for this lock, so a
            // create is taken by a free writer the moment it arrives.
            let mut queue = queue.lock().await;
            match held.take() {
                Some(create) => batch.push(create),
                None => match queue.recv().await {
                    Some(create) => batch.push(create),
                    None => return,
                },
            }
            while batch.len() < max_rows {
                let Ok(create) = queue.try_recv() else { break };
                if batch.iter().any(|c| c.row.id == create.row.id) {
                    held = Some(create);
                    break;
                }
                batch.push(create);
            }
        }
        // Looked up per batch, not once: the writers start before the server installs the
        // metrics recorder, and a handle taken earlier would record nowhere.
        metrics::gauge!("vibe_store_creates_waiting").decrement(batch.len() as f64);
        metrics::histogram!("vibe_store_create_batch_rows").record(batch.len() as f64);
        write(&pool, batch).await;
        waker.committed();
    }
}

/// Inserts `batch` and answers each create.
async fn write(pool: &PgPool, batch: Vec<Create>) {
    if let [_] = batch.as_slice() {
        for create in batch {
            let result = insert_one(pool, &create.row).await;
            let _ = create.reply.send(result);
        }
        return;
    }
    match insert_many(pool, &batch).await {
        Ok(mut rows) => {
            for create in batch {
                let result = match rows.iter().position(|r| r.0 == create.row.id) {
                    Some(i) => document(&rows.swap_remove(i).1),
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
                let result = insert_one(pool, &create.row).await;
                let _ = create.reply.send(result);
            }
        }
    }
}

async fn insert_one(pool: &PgPool, row: &NewRow) -> Result<Document, StoreError> {
    let inserted = sqlx::query(concat!(
        "INSERT INTO documents (id, owner_did, type, acl, data) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (id) DO NOTHING RETURNING ",
        doc_columns!()
    ))
    .bind(row.id)
    .bind(&row.owner)
    .bind(&row.doc_type)
    .bind(Json(&row.acl))
    .bind(&row.data)
    .fetch_optional(pool)
    .await?;
    inserted
        .map(|r| document(&r))
        .transpose()?
        .ok_or(StoreError::AlreadyExists)
}

/// One statement for the whole batch; the rows it inserted, by id (ids are distinct within a
/// batch, see [`writer`]).
async fn insert_many(pool: &PgPool, batch: &[Create]) -> Result<Vec<(Uuid, PgRow)>, StoreError> {
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
    let rows = sqlx::query(concat!(
        "INSERT INTO documents (id, owner_did, type, acl, data) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::jsonb[]) \
         ON CONFLICT (id) DO NOTHING RETURNING ",
        doc_columns!()
    ))
    .bind(ids)
    .bind(owners)
    .bind(types)
    .bind(acls)
    .bind(data)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| Ok((sqlx::Row::try_get(&r, "id")?, r)))
        .collect()
}
