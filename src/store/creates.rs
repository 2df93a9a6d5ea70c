//! Document creates as grouped statements ([`super::batch`]): creates that arrive while earlier
//! ones are being written share one INSERT statement and one commit.
//!
//! Invariant: every create gets the answer a lone INSERT would have given it. A statement that
//! fails as a whole (a constraint the API does not check first) is retried row by row, so one bad
//! row never fails its neighbours; two creates of the same id never share a statement.

use std::collections::HashMap;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgRow, Postgres};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use super::StoreError;
use super::batch::{Grouped, Pending, connection_survives, shared_failure};
use crate::acl::Acl;
use crate::feed::listener::FeedWaker;
use crate::wire::Document;

/// One document to insert.
#[derive(Debug)]
pub(super) struct NewRow {
    pub id: Uuid,
    pub owner: String,
    pub doc_type: String,
    /// The document it is made under; the caller has checked the parent's `create` rule (see
    /// `Store::create_under`).
    pub parent: Option<Uuid>,
    pub acl: Acl,
    pub data: serde_json::Value,
}

/// The INSERT, and the feed reader it wakes after each commit.
pub(super) struct Creates {
    pub pool: PgPool,
    pub waker: FeedWaker,
}

impl Grouped for Creates {
    type Input = NewRow;
    type Output = Document;
    type Connection = PoolConnection<Postgres>;
    const WHAT: &'static str = "document creates";
    const ROWS_METRIC: &'static str = "vibe_store_create_batch_rows";
    const WAITING_METRIC: &'static str = "vibe_store_creates_waiting";

    fn exclusive_id(row: &NewRow) -> Option<Uuid> {
        Some(row.id)
    }

    async fn connect(&self) -> Result<PoolConnection<Postgres>, StoreError> {
        super::batch::slot_connection(&self.pool).await
    }

    async fn one(
        &self,
        connection: &mut PoolConnection<Postgres>,
        row: NewRow,
    ) -> Result<Document, StoreError> {
        let result = insert_one(connection, row).await;
        if result.is_ok() {
            self.waker.committed();
        }
        result
    }

    async fn many(
        &self,
        connection: &mut PoolConnection<Postgres>,
        batch: Vec<Pending<Self>>,
    ) -> bool {
        match insert_many(connection, &batch).await {
            Ok(mut rows) => {
                self.waker.committed();
                for create in batch {
                    let result = match rows.remove(&create.input.id) {
                        Some(inserted) => inserted.document(create.input),
                        None => Err(StoreError::AlreadyExists),
                    };
                    create.reply.send(result);
                }
                true
            }
            // Refused as a whole, so nothing was written: find the row(s) at fault.
            Err(e) if connection_survives(&e) => {
                tracing::debug!(error = %e, rows = batch.len(), "batched create refused; retrying row by row");
                // Once the connection fails, the rest get that failure.
                let mut broken = None;
                for create in batch {
                    let result = match &broken {
                        None => self.one(connection, create.input).await,
                        Some(failure) => Err(shared_failure(failure)()),
                    };
                    if let Err(e) = &result
                        && !connection_survives(e)
                    {
                        broken = Some(shared_failure(e)());
                    }
                    create.reply.send(result);
                }
                broken.is_none()
            }
            // The statement may or may not have committed: answer as a lone create would have.
            Err(e) => {
                let failure = shared_failure(&e);
                for create in batch {
                    create.reply.send(Err(failure()));
                }
                false
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
            parent: row.parent,
            rev: self.0.try_get("rev")?,
            created_at: self.0.try_get("created_at")?,
            updated_at: self.0.try_get("updated_at")?,
            acl: row.acl,
            data: row.data,
        })
    }
}

pub(super) async fn insert_one(
    connection: &mut PgConnection,
    row: NewRow,
) -> Result<Document, StoreError> {
    // Dated by the clock when the row is written, not by the transaction's start: a create
    // under a parent may have waited for the parent's lock, and a date from before that wait
    // would list it behind creates that committed meanwhile (a client paging or polling from
    // the newest would pass over it).
    let inserted = sqlx::query(
        "INSERT INTO documents (id, owner_did, type, parent, acl, data, created_at, updated_at) \
         SELECT $1, $2, $3, $4, $5, $6, written, written FROM clock_timestamp() AS written \
         ON CONFLICT (id) DO NOTHING RETURNING rev, created_at, updated_at",
    )
    .bind(row.id)
    .bind(&row.owner)
    .bind(&row.doc_type)
    .bind(row.parent)
    .bind(Json(&row.acl))
    .bind(&row.data)
    .fetch_optional(connection)
    .await?;
    match inserted {
        Some(inserted) => Inserted(inserted).document(row),
        None => Err(StoreError::AlreadyExists),
    }
}

/// One statement for the whole batch; the rows it inserted, by id (ids are distinct within a
/// batch, see [`Shared::next_batch`]).
async fn insert_many(
    connection: &mut PgConnection,
    batch: &[Pending<Creates>],
) -> Result<HashMap<Uuid, Inserted>, StoreError> {
    let mut ids = Vec::with_capacity(batch.len());
    let mut owners = Vec::with_capacity(batch.len());
    let mut types = Vec::with_capacity(batch.len());
    let mut acls = Vec::with_capacity(batch.len());
    let mut data = Vec::with_capacity(batch.len());
    let mut parents = Vec::with_capacity(batch.len());
    for Pending { input: row, .. } in batch {
        ids.push(row.id);
        owners.push(row.owner.as_str());
        types.push(row.doc_type.as_str());
        acls.push(Json(&row.acl));
        data.push(&row.data);
        parents.push(row.parent);
    }
    let rows = sqlx::query(
        "INSERT INTO documents (id, owner_did, type, acl, data, parent) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::jsonb[], \
                              $6::uuid[]) \
         ON CONFLICT (id) DO NOTHING RETURNING id, rev, created_at, updated_at",
    )
    .bind(ids)
    .bind(owners)
    .bind(types)
    .bind(acls)
    .bind(data)
    .bind(parents)
    .fetch_all(connection)
    .await?;
    rows.into_iter()
        .map(|r| Ok((r.try_get("id")?, Inserted(r))))
        .collect()
}
