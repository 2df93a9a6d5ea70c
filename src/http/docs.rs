//! `/v1/docs/{type}` and `/v1/docs/{type}/{id}`: document CRUD and the caller's list.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::DateTime;
use http::{HeaderValue, Request, StatusCode, header};
use hyper::body::Incoming;
use serde::Deserialize;
use uuid::Uuid;

use super::{
    ApiError, HttpResponse, authorize, bearer_token, check_scope, check_token_scope, json,
    read_json,
};
use crate::app::App;
use crate::auth::Access;
use crate::store::ListCursor;
use crate::wire::{Document, DocumentPage, NewDocument, ReplaceDocument};

const JSON: &[&str] = &["application/json"];
const MERGE_PATCH: &[&str] = &["application/merge-patch+json", "application/json"];

pub(super) async fn create(
    app: &App,
    doc_type: &str,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    check_type(doc_type)?;
    let claims = authorize(app, req.headers(), Access::Write, doc_type)?;
    let token = bearer_token(req.headers())?.to_owned();
    let body: NewDocument = read_json(app, req, JSON).await?;
    check_data(&body.data)?;
    let acl = body.acl.unwrap_or_default();
    let doc = app
        .store
        .create(
            &claims.subject,
            doc_type,
            body.id,
            body.parent,
            acl,
            body.data,
        )
        .await
        .map_err(|e| {
            e.hiding_parent_unless(|t| {
                check_token_scope(app, &claims, &token, Access::Read, t).is_ok()
            })
        })?;
    let mut response = document_response(StatusCode::CREATED, &doc, &claims.subject);
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/docs/{}/{}", doc.doc_type, doc.id)) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

pub(super) async fn get(
    app: &App,
    doc_type: &str,
    id: &str,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    check_type(doc_type)?;
    let claims = authorize(app, req.headers(), Access::Read, doc_type)?;
    let id = parse_id(id)?;
    let doc = app.store.get(&claims.subject, doc_type, id).await?;
    Ok(document_response(StatusCode::OK, &doc, &claims.subject))
}

pub(super) async fn replace(
    app: &App,
    doc_type: &str,
    id: &str,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    check_type(doc_type)?;
    let claims = authorize(app, req.headers(), Access::Write, doc_type)?;
    let id = parse_id(id)?;
    let expected_revs = if_match(&req)?;
    let token_reads = check_scope(app, &claims, req.headers(), Access::Read, doc_type).is_ok();
    let body: ReplaceDocument = read_json(app, req, JSON).await?;
    check_data(&body.data)?;
    let doc = app
        .store
        .modify(
            &claims.subject,
            doc_type,
            id,
            expected_revs.as_deref(),
            |_| Ok::<_, ApiError>((body.data, body.acl)),
        )
        .await??;
    let readable = token_reads && app.store.may_read_written(&claims.subject, &doc).await;
    Ok(written_response(
        readable.then_some(claims.subject.as_str()),
        &doc,
    ))
}

/// RFC 7396 JSON Merge Patch over the writable part of the document, `{"data": ..., "acl": ...}`.
pub(super) async fn patch(
    app: &App,
    doc_type: &str,
    id: &str,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    check_type(doc_type)?;
    let claims = authorize(app, req.headers(), Access::Write, doc_type)?;
    let id = parse_id(id)?;
    let expected_revs = if_match(&req)?;
    let token_reads = check_scope(app, &claims, req.headers(), Access::Read, doc_type).is_ok();
    let patch: serde_json::Value = read_json(app, req, MERGE_PATCH).await?;
    let Some(fields) = patch.as_object() else {
        return Err(ApiError::bad_request(
            "invalid_body",
            "a merge patch for a document is a JSON object",
        ));
    };
    if let Some(key) = fields
        .keys()
        .find(|k| !matches!(k.as_str(), "data" | "acl"))
    {
        return Err(ApiError::bad_request(
            "read_only_field",
            format!("`{key}` cannot be patched; only `data` and `acl` are writable"),
        ));
    }
    // What the patch alone decides is checked before the stored document is: merged into an
    // object, a `data` that is no object (null removes it) replaces it with no object, and an
    // `acl` that is neither an object nor null (the default ACL) is no ACL.
    if let Some(data) = fields.get("data") {
        check_data(data)?;
    }
    if fields
        .get("acl")
        .is_some_and(|acl| !acl.is_object() && !acl.is_null())
    {
        return Err(ApiError::bad_request(
            "invalid_body",
            "`acl` must be a JSON object (or null for the default ACL)",
        ));
    }
    let doc = app
        .store
        .modify(
            &claims.subject,
            doc_type,
            id,
            expected_revs.as_deref(),
            |current| {
                let mut writable = serde_json::json!({ "data": current.data, "acl": current.acl });
                json_patch::merge(&mut writable, &patch);
                // The patch is bounded by the body limit, the document it makes is too, as one
                // created or replaced in a body is: patches adding a body's worth each (to `data`
                // or to the ACL's lists) would otherwise grow it without end.
                let limit = app.config.http.max_body_bytes;
                if vibe_actors::window::json_len(&writable) > limit {
                    return Err(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        format!("the patched document's data and acl would exceed {limit} bytes"),
                    ));
                }
                let data = writable["data"].take();
                check_data(&data)?;
                if !fields.contains_key("acl") {
                    return Ok((data, None));
                }
                // A patch that removes `acl` (sets it to null) restores the default, owner-only ACL.
                let acl = match writable["acl"].take() {
                    serde_json::Value::Null => serde_json::json!({}),
                    acl => acl,
                };
                let acl = serde_json::from_value(acl)
                    .map_err(|e| ApiError::bad_request("invalid_body", format!("acl: {e}")))?;
                Ok::<_, ApiError>((data, Some(acl)))
            },
        )
        .await??;
    let readable = token_reads && app.store.may_read_written(&claims.subject, &doc).await;
    Ok(written_response(
        readable.then_some(claims.subject.as_str()),
        &doc,
    ))
}

pub(super) async fn delete(
    app: &App,
    doc_type: &str,
    id: &str,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    check_type(doc_type)?;
    let claims = authorize(app, req.headers(), Access::Write, doc_type)?;
    let id = parse_id(id)?;
    let expected_revs = if_match(&req)?;
    app.store
        .delete(&claims.subject, doc_type, id, expected_revs.as_deref())
        .await?;
    let mut response = HttpResponse::new(Default::default());
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    limit: Option<u32>,
    cursor: Option<String>,
}

pub(super) async fn list(
    app: &App,
    doc_type: &str,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    check_type(doc_type)?;
    let claims = authorize(app, req.headers(), Access::Read, doc_type)?;
    let params: ListParams = super::query_params(req.uri(), "invalid_query")?;
    let http = &app.config.http;
    let limit = params.limit.unwrap_or(http.default_page_size);
    if limit == 0 || limit > http.max_page_size {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be between 1 and {}", http.max_page_size),
        ));
    }
    let cursor = params.cursor.as_deref().map(decode_cursor).transpose()?;
    // One extra row tells whether a next page exists.
    let (mut docs, cut) = app
        .store
        .list_own(
            &claims.subject,
            doc_type,
            limit + 1,
            cursor,
            http.max_page_bytes,
        )
        .await?;
    // A page also ends once its documents pass `http.max_page_bytes`.
    let next = if cut || docs.len() > limit as usize {
        docs.truncate(limit as usize);
        docs.last().map(|d| {
            encode_cursor(ListCursor {
                created_at: d.created_at,
                id: d.id,
            })
        })
    } else {
        None
    };
    Ok(json(StatusCode::OK, &DocumentPage { docs, next }))
}

/// The written document as `reader` sees it, or (None: a writer whose token lacks `read:<type>` or
/// whom the ACL does not let read it) just its new ETag: write access must not reveal the content.
fn written_response(reader: Option<&str>, doc: &Document) -> HttpResponse {
    if let Some(reader) = reader {
        return document_response(StatusCode::OK, doc, reader);
    }
    let mut response = HttpResponse::new(Default::default());
    *response.status_mut() = StatusCode::NO_CONTENT;
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", doc.rev)) {
        response.headers_mut().insert(header::ETAG, v);
    }
    response
}

/// The document as `caller` receives it (the ACL only for its owner), with its ETag.
fn document_response(status: StatusCode, doc: &Document, caller: &str) -> HttpResponse {
    let mut response = json(status, &doc.view(Some(caller)));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", doc.rev)) {
        response.headers_mut().insert(header::ETAG, v);
    }
    response
}

pub(super) fn check_type(doc_type: &str) -> Result<(), ApiError> {
    if crate::doc_type::is_valid(doc_type) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_type",
            "a type name matches ^[a-z][a-z0-9_.-]{0,63}$",
        ))
    }
}

fn check_data(data: &serde_json::Value) -> Result<(), ApiError> {
    if data.is_object() {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "invalid_body",
            "`data` must be a JSON object",
        ))
    }
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(id).map_err(|_| ApiError::bad_request("invalid_id", "a document id is a UUID"))
}

/// `If-Match` (RFC 9110 §13.1.1): absent or `*`, any revision (None); else the revisions it
/// lists, one of which must be the current one. A revision is an entity tag (`"3"`) or bare
/// (`3`). A weak tag (`W/"3"`, as a proxy that compresses responses hands out) never matches
/// under If-Match's strong comparison: it is kept out of the list, so a header of weak tags
/// alone answers 412 once the caller's access is checked. Anything else is 400.
fn if_match(req: &Request<Incoming>) -> Result<Option<Vec<i64>>, ApiError> {
    let bad = || ApiError::bad_request("bad_if_match", "If-Match takes a revision, e.g. \"3\"");
    let mut values = req.headers().get_all(header::IF_MATCH).iter().peekable();
    if values.peek().is_none() {
        return Ok(None);
    }
    let mut revs = Vec::new();
    let mut any = false;
    let mut tags = 0usize;
    for value in values {
        for tag in value.to_str().map_err(|_| bad())?.split(',') {
            let tag = tag.trim();
            if tag.is_empty() {
                continue;
            }
            tags += 1;
            if tag == "*" {
                any = true;
            } else if let Some(opaque) = tag.strip_prefix("W/") {
                if !(opaque.len() >= 2 && opaque.starts_with('"') && opaque.ends_with('"')) {
                    return Err(bad());
                }
            } else {
                let rev = tag
                    .strip_prefix('"')
                    .and_then(|t| t.strip_suffix('"'))
                    .unwrap_or(tag);
                if rev.is_empty() || !rev.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                revs.push(rev.parse::<i64>().map_err(|_| bad())?);
            }
        }
    }
    // `*` stands alone (it is not an entity tag to list with others).
    match (any, tags) {
        (true, 1) => Ok(None),
        (true, _) | (false, 0) => Err(bad()),
        (false, _) => Ok(Some(revs)),
    }
}

fn encode_cursor(c: ListCursor) -> String {
    URL_SAFE_NO_PAD.encode(format!(
        "{}.{}",
        c.created_at.timestamp_micros(),
        c.id.simple()
    ))
}

fn decode_cursor(s: &str) -> Result<ListCursor, ApiError> {
    let bad =
        || ApiError::bad_request("invalid_cursor", "the cursor is not one this server issued");
    let raw = URL_SAFE_NO_PAD.decode(s).map_err(|_| bad())?;
    let text = std::str::from_utf8(&raw).map_err(|_| bad())?;
    let (micros, id) = text.split_once('.').ok_or_else(bad)?;
    Ok(ListCursor {
        created_at: DateTime::from_timestamp_micros(micros.parse().map_err(|_| bad())?)
            .filter(vibe_actors::query::storable_time)
            .ok_or_else(bad)?,
        id: Uuid::try_parse(id).map_err(|_| bad())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip() {
        let c = ListCursor {
            created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        assert_eq!(decode_cursor(&encode_cursor(c)).unwrap(), c);
        assert!(decode_cursor("garbage!").is_err());
        assert!(decode_cursor(&URL_SAFE_NO_PAD.encode("12.notauuid")).is_err());
        // A time PostgreSQL would refuse as a bound value (about 7500 BC).
        let ancient = format!("-300000000000000000.{}", Uuid::now_v7().simple());
        assert!(decode_cursor(&URL_SAFE_NO_PAD.encode(ancient)).is_err());
    }
}
