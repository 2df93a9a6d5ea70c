//! Reads of one document by id as grouped statements ([`super::batch`]): reads that arrive while
//! earlier ones are at the database share one `SELECT … WHERE id = ANY(…)`.
//!
//! Invariant: a read answers the stored row or nothing, by id alone; the caller checks the type
//! and the ACL, exactly as for a lone read.

use std::collections::HashMap;

use sqlx::PgPool;
use sqlx::pool::PoolConnection;
use sqlx::postgres::Postgres;
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
        let docs = match super::fetch_by_ids(connection, &ids).await {
            Ok(docs) => docs,
            Err(e) => {
                let failure = shared_failure(&e);
                for read in batch {
                    read.reply.send(Err(failure()));
                }
                return connection_survives(&e);
            }
        };
        // How many reads of the batch still want each id: the last one takes the document, the
        // others get a copy.
        let mut wanted: HashMap<Uuid, usize> = HashMap::with_capacity(ids.len());
        for id in &ids {
            *wanted.entry(*id).or_default() += 1;
        }
        let mut found: HashMap<Uuid, Document> =
            docs.into_iter().map(|doc| (doc.id, doc)).collect();
        for read in batch {
            let id = read.input;
            let left = wanted.get_mut(&id).map_or(0, |left| {
                *left -= 1;
                *left
            });
            let doc = if left == 0 {
                found.remove(&id)
            } else {
                found.get(&id).cloned()
            };
            read.reply.send(Ok(doc));
        }
        true
    }
}
