//! `GET /v1/changes`: the change feed over HTTP, CouchDB `_changes` style, filtered by the
//! caller's scopes and by each document's ACL, with long-polling.

use std::collections::HashMap;
use std::time::Duration;

use http::{Request, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ApiError, HttpResponse, json};
use crate::app::App;
use crate::auth::Access;
use crate::feed::{Cursor, FeedError, Filter, Op};

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Distinct type names one request may give in `types`.
const MAX_TYPES: usize = 64;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    since: Option<String>,
    types: Option<String>,
    limit: Option<u32>,
    wait: Option<f64>,
    global: Option<bool>,
}

/// One entry of the feed as the caller may see it.
#[derive(Debug, Serialize)]
struct Entry {
    cursor: String,
    /// `insert`, `update`, `delete`, or `remove` (the caller could read the document before this
    /// change and no longer can).
    op: &'static str,
    id: Uuid,
    #[serde(rename = "type")]
    doc_type: String,
    rev: i64,
    /// The document as the caller receives it (its ACL only for its owner).
    #[serde(skip_serializing_if = "Option::is_none")]
    doc: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
struct Body {
    changes: Vec<Entry>,
    /// Pass as `since` to continue.
    cursor: String,
}

pub(super) async fn changes(app: &App, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let params: Params = super::query_params(req.uri(), "invalid_query")?;
    let mut types: Vec<String> = params
        .types
        .as_deref()
        .map(|t| {
            t.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    // Each named type costs a token check: a repeated name is checked once, and a request names
    // at most `MAX_TYPES`.
    types.sort_unstable();
    types.dedup();
    if types.len() > MAX_TYPES {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("types names at most {MAX_TYPES} types"),
        ));
    }
    if let Some(bad) = types.iter().find(|t| !crate::doc_type::is_valid(t)) {
        return Err(ApiError::bad_request(
            "invalid_type",
            format!("{bad:?} is not a type name"),
        ));
    }
    let claims = super::bearer(app, req.headers())?;
    // Every named type needs read scope; without names, each change is checked below.
    for t in &types {
        super::check_scope(app, &claims, req.headers(), Access::Read, t)?;
    }
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit is 1 to {MAX_LIMIT}"),
        ));
    }
    let wait = match params.wait {
        // Clamped before converting: `from_secs_f64` panics past `Duration::MAX`. Infinity is a
        // longer wait like any other; NaN fails the comparison.
        Some(w) if w >= 0.0 => Duration::from_secs_f64(w.min(MAX_WAIT.as_secs_f64())),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "wait is seconds, 0 to 60",
            ));
        }
        None => Duration::ZERO,
    };
    let global = params.global.unwrap_or(false);
    let mut cursor = match params.since.as_deref() {
        None | Some("0") => app.feed.tail().await.map_err(feed_error)?,
        Some("now") => app.feed.head().await.map_err(feed_error)?,
        Some(s) => s
            .parse::<Cursor>()
            .map_err(|e| ApiError::bad_request("invalid_cursor", e.to_string()))?,
    };
    let filter = Filter {
        types,
        owner: (!global).then(|| claims.subject.clone()),
    };
    // Cut a tick first, so the caller's own committed writes are in what it reads; other nodes
    // learn of it through the doorbell the tick rings.
    if let Err(e) = app.feed.tick().await {
        tracing::warn!(error = %e, "tick before a changes read failed");
    }
    if app.is_ahead_of_feed(cursor).await.map_err(feed_error)? {
        return Err(ApiError::bad_request(
            "invalid_cursor",
            format!("cursor {cursor} is ahead of the feed"),
        ));
    }
    // Whether the token (attenuations included) lets the caller read a type, asked once per type.
    let token = super::bearer_token(req.headers())?;
    let mut readable_types: HashMap<String, bool> = HashMap::new();
    let mut may_read = |doc_type: &str| {
        *readable_types
            .entry(doc_type.to_owned())
            .or_insert_with(|| {
                app.tokens
                    .verify(token, Access::Read, Some(doc_type))
                    .is_ok_and(|c| c.permits(Access::Read, doc_type))
            })
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut head = app.feed_head.clone();
    let mut draining = app.shutdown_signal();
    let mut head_alive = true;
    let mut draining_alive = true;
    loop {
        // Marked seen before reading, so a move during the read wakes the wait below.
        head.borrow_and_update();
        let page = app
            .feed
            .read(cursor, &filter, limit)
            .await
            .map_err(feed_error)?;
        if let Some(next) = page.next {
            cursor = next;
        }
        let caller = Some(claims.subject.as_str());
        let held = if page
            .changes
            .iter()
            .any(|c| c.owner != claims.subject && c.uses_certificates())
        {
            app.store.credentials(&claims.subject).await?
        } else {
            vibe_actors::acl::HeldCertificates::default()
        };
        let full = page.full;
        let entries: Vec<Entry> = page
            .changes
            .into_iter()
            .filter(|c| may_read(&c.doc_type))
            .filter_map(|c| {
                let (before, after) = c.readable(caller, &held);
                let op = match (c.op, before, after) {
                    (Op::Delete, true, _) => "delete",
                    (_, _, true) => c.op.as_str(),
                    (_, true, false) => "remove",
                    _ => return None,
                };
                let doc = if after {
                    c.document()
                        .and_then(|d| serde_json::to_value(d.view(caller)).ok())
                } else {
                    None
                };
                Some(Entry {
                    cursor: c.cursor.to_string(),
                    op,
                    id: c.doc_id,
                    doc_type: c.doc_type,
                    rev: c.rev,
                    doc,
                })
            })
            .collect();
        // A node shutting down answers a long-poll with what it has (its cursor goes on
        // elsewhere) rather than holding it until the connection is cut.
        if !entries.is_empty() || tokio::time::Instant::now() >= deadline || *draining.borrow() {
            return Ok(json(
                StatusCode::OK,
                &Body {
                    changes: entries,
                    cursor: cursor.to_string(),
                },
            ));
        }
        // A full page of changes the caller cannot see: read on at once.
        if full {
            continue;
        }
        // Nothing (visible) yet: wait for this node's feed reader to move, the deadline (also
        // when the reader is gone: then only the deadline remains) or the node's shutdown.
        let _parked = Parked::new();
        tokio::select! {
            moved = head.changed(), if head_alive => head_alive = moved.is_ok(),
            () = tokio::time::sleep_until(deadline) => {}
            // A dropped sender (a server dropped without `shutdown`) is no signal: without the
            // guard the loop would read the feed again and again until the deadline.
            stopping = draining.wait_for(|stopping| *stopping), if draining_alive => {
                draining_alive = stopping.is_ok();
            }
        }
    }
}

/// Counts a long-poll in `vibe_changes_waiting` while it waits for the feed.
struct Parked;

impl Parked {
    fn new() -> Self {
        metrics::gauge!("vibe_changes_waiting").increment(1.0);
        Self
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        metrics::gauge!("vibe_changes_waiting").decrement(1.0);
    }
}

fn feed_error(e: FeedError) -> ApiError {
    match e {
        FeedError::CursorExpired => ApiError::new(
            StatusCode::GONE,
            "cursor_expired",
            "the cursor is older than the feed's retention; start again without `since`",
        ),
        FeedError::Database(e) => crate::store::StoreError::from(e).into(),
    }
}
