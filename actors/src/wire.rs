//! The JSON shapes Vibe speaks, in one place for the server, the SDK and the benchmarks.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::acl::Acl;

/// A stored document as every API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Document {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub doc_type: String,
    /// The owner's DID.
    pub owner: String,
    /// The document this one was made under (set at creation, never changed by the API); its
    /// ACL `create` rule admitted the creator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Uuid>,
    /// Starts at 1 and grows by one with every write; the ETag and `If-Match` value.
    pub rev: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Sent to the owner only (see [`DocumentView`]); absent means "not yours to see".
    #[serde(default)]
    pub acl: Acl,
    pub data: serde_json::Value,
}

/// A document as one caller receives it: the ACL only when the caller owns it. Whom a document
/// is shared with, and whom it denies, is its owner's business — a reader of a public post must
/// not learn who was blocked from it.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DocumentView<'a> {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub doc_type: &'a str,
    pub owner: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<Uuid>,
    pub rev: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acl: Option<&'a Acl>,
    pub data: &'a serde_json::Value,
}

impl Document {
    /// The document as `caller` (None: anonymous) receives it.
    pub fn view(&self, caller: Option<&str>) -> DocumentView<'_> {
        DocumentView {
            id: self.id,
            doc_type: &self.doc_type,
            owner: &self.owner,
            parent: self.parent,
            rev: self.rev,
            created_at: self.created_at,
            updated_at: self.updated_at,
            acl: (caller == Some(self.owner.as_str())).then_some(&self.acl),
            data: &self.data,
        }
    }
}

/// `docs` as `caller` receives them.
pub fn views<'a>(docs: &'a [Document], caller: Option<&str>) -> Vec<DocumentView<'a>> {
    docs.iter().map(|d| d.view(caller)).collect()
}

/// The body of `POST /v1/docs/{type}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewDocument {
    /// Client-chosen id; the server assigns a UUIDv7 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    /// Make the document under this one: allowed to its owner and to whom its ACL `create` rule
    /// admits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acl: Option<Acl>,
    pub data: serde_json::Value,
}

/// The body of `PUT /v1/docs/{type}/{id}`: replaces `data`, and `acl` when given.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReplaceDocument {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acl: Option<Acl>,
    pub data: serde_json::Value,
}

/// One page of `GET /v1/docs/{type}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DocumentPage {
    pub docs: Vec<Document>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Every error body: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable, machine-readable (`rev_mismatch`, `missing_scope`, ...); see docs/protocol.md.
    pub code: String,
    /// For people; may change between versions.
    pub message: String,
}

/// The WebSocket event that ends subscription `sub` with an error (`code` is stable; see
/// docs/protocol.md): the live query failed for good, or the connection's token no longer
/// allows it.
pub fn subscription_error(sub: &str, code: &str, message: &str) -> String {
    serde_json::json!({"sub": sub, "event": "error", "error": {"code": code, "message": message}})
        .to_string()
}
