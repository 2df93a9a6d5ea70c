//! Reads of one document by id as grouped statements ([`super::batch`]): reads that arrive while
//! earlier ones are at the database share one `SELECT … WHERE id = ANY(…)`.
//!
//! Invariant: a read answers the stored row or nothing, by id alone; the caller checks the type
//! and the ACL, exactly as for a lone read.

use std::collections::HashMap;

use sqlx::pool::PoolConnection;
use sqlx::postgres::Postgres;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::StoreError;
use super::batch::{Grouped, Pending, connection_survives, shared_failure};
use crate::wire::Document;

/// The SELECT by id.
pub(super) struct Reads {
    pub pool: PgPool,
}

impl Grouped for Reads {
    type Input = Uuid;
    type Output = Option<Document>;
    type Connection = PoolConnection<Postgres>;
    const WHAT: &'static str = "document reads";
    const ROWS_METRIC: &'static str = "vibe_store_read_batch_rows";
    const WAITING_METRIC: &'static str = "vibe_store_reads_waiting";

    fn exclusive_id(_: &Uuid) -> Option<Uuid> {
        // Two reads of one document may share a statement: both get the row.
        None
    }

    async fn connect(&self) -> Result<PoolConnection<Postgres>, StoreError> {
        super::batch::slot_connection(&self.pool).await
    }

    async fn one(
        &self,
        connection: &mut PoolConnection<Postgres>,
        id: Uuid,
    ) -> Result<Option<Document>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            doc_columns!(),
            " FROM documents WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut **connection)
        .await?;
        row.as_ref().map(super::document).transpose()
    }

    async fn many(
        &self,
        connection: &mut PoolConnection<Postgres>,
        batch: Vec<Pending<Self>>,
    ) -> bool {
        let ids: Vec<Uuid> = batch.iter().map(|read| read.input).collect();
        let rows = match super::by_ids(&ids).fetch_all(&mut **connection).await {
            Ok(rows) => rows,
            Err(e) => {
                let e = StoreError::from(e);
                let failure = shared_failure(&e);
                for read in batch {
                    read.reply.send(Err(failure()));
                }
                return connection_survives(&e);
            }
        };
        // Each row decoded on its own: one this version cannot read (a value written in SQL
        // that JSON here cannot hold) fails the reads of its id only, as a lone read would.
        let mut found: HashMap<Uuid, Result<Document, StoreError>> =
            HashMap::with_capacity(rows.len());
        for row in &rows {
            let Ok(id) = row.try_get::<Uuid, _>("id") else {
                continue;
            };
            found.insert(id, super::document(row));
        }
        // How many reads of the batch still want each id: the last one takes the document, the
        // others get a copy.
        let mut wanted: HashMap<Uuid, usize> = HashMap::with_capacity(ids.len());
        for id in &ids {
            *wanted.entry(*id).or_default() += 1;
        }
        for read in batch {
            let id = read.input;
            let left = wanted.get_mut(&id).map_or(0, |left| {
                *left -= 1;
                *left
            });
            let answer = if left == 0 {
                found.remove(&id).transpose()
            } else {
                match found.get(&id) {
                    Some(Ok(doc)) => Ok(Some(doc.clone())),
                    Some(Err(e)) => Err(shared_failure(e)()),
                    None => Ok(None),
                }
            };
            read.reply.send(answer);
        }
        true
    }
}
