//! `/v1/certificates`: issue (`POST`, signed with the issuer's DID key), list (`GET
//! ?role=issued|received`) and revoke (`DELETE /v1/certificates/{id}`, issuer only). Tokens
//! need `write:vibe.certificate` to issue or revoke and `read:vibe.certificate` to list
//! (first-party tokens carry `*`).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use http::{HeaderMap, Request, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::oauth::account_error;
use super::{ApiError, HttpResponse, bearer_token, json, read_json};
use crate::app::App;
use crate::auth::{Access, Claims};
use crate::identity::accounts::AccountError;
use crate::identity::certificates::{
    CERTIFICATE_TYPE, SignedClaim, certificate_acl, certificate_data, timestamp, verify,
};
use crate::wire::Document;

fn permitted(app: &App, headers: &HeaderMap, access: Access) -> Result<Arc<Claims>, ApiError> {
    let claims = app
        .tokens
        .verify(bearer_token(headers)?, access, Some(CERTIFICATE_TYPE))?;
    if !claims.permits(access, CERTIFICATE_TYPE) {
        let verb = if access == Access::Read {
            "read"
        } else {
            "write"
        };
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "missing_scope",
            format!("the token lacks the scope {verb}:{CERTIFICATE_TYPE}"),
        ));
    }
    Ok(claims)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Issue {
    subject: String,
    #[serde(rename = "type")]
    cert_type: String,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
}

/// `POST /v1/certificates`.
pub(super) async fn issue(app: &App, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let claims = permitted(app, req.headers(), Access::Write)?;
    let body: Issue = read_json(app, req, &["application/json"]).await?;
    let issuer = claims.subject.as_str();
    if !crate::acl::is_did(&body.subject) || body.subject == issuer {
        return Err(ApiError::bad_request(
            "invalid_body",
            "subject is a DID other than the issuer's",
        ));
    }
    if !crate::doc_type::is_valid(&body.cert_type) {
        return Err(ApiError::bad_request(
            "invalid_body",
            "type is a name matching ^[a-z][a-z0-9_.-]{0,63}$",
        ));
    }
    let now = Utc::now();
    if body.expires_at.is_some_and(|e| e <= now) {
        return Err(ApiError::bad_request(
            "invalid_body",
            "expires_at is in the past",
        ));
    }
    // Checked before signing, not under a lock: concurrent issues may pass it together, which
    // only overshoots by what is in flight; what it bounds is one account's share of every
    // node's certificate book.
    let limit = app.config.identity.max_certificates_per_issuer;
    if app.store.certificates_issued(issuer).await? >= i64::from(limit) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "too_many_certificates",
            format!(
                "this account has {limit} unexpired certificates issued; revoke some first \
                 (identity.max_certificates_per_issuer)"
            ),
        ));
    }
    let id = Uuid::now_v7();
    let issued_at = timestamp(now);
    let expires_at = body.expires_at.map(timestamp);
    let claim = SignedClaim {
        id,
        issuer,
        subject: &body.subject,
        cert_type: &body.cert_type,
        issued_at: &issued_at,
        expires_at: expires_at.as_deref(),
    };
    let signature = match app.identity.accounts.sign(issuer, &claim.message()).await {
        Ok(s) => s,
        Err(AccountError::NotFound) => {
            return Err(ApiError::bad_request(
                "no_signing_key",
                "the issuer has no DID key on this server (only accounts can issue certificates)",
            ));
        }
        Err(e) => return Err(account_error(e)),
    };
    let acl = certificate_acl(&body.subject)
        .map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?;
    let doc = app
        .store
        .create(
            issuer,
            CERTIFICATE_TYPE,
            Some(id),
            None,
            acl,
            certificate_data(&claim, &signature),
        )
        .await?;
    Ok(json(StatusCode::CREATED, &certificate_json(&doc, now)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    role: Option<String>,
}

/// `GET /v1/certificates?role=issued|received` (default: received).
pub(super) async fn list(app: &App, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let claims = permitted(app, req.headers(), Access::Read)?;
    let params: ListParams = super::query_params(req.uri(), "invalid_query")?;
    let issued = match params.role.as_deref() {
        None | Some("received") => false,
        Some("issued") => true,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "role is issued or received",
            ));
        }
    };
    let docs = app.store.certificates(&claims.subject, issued).await?;
    let now = Utc::now();
    let list: Vec<_> = docs.iter().map(|d| certificate_json(d, now)).collect();
    Ok(json(StatusCode::OK, &json!({"certificates": list})))
}

/// `DELETE /v1/certificates/{id}`: revokes (the issuer only).
pub(super) async fn revoke(
    app: &App,
    id: &str,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let claims = permitted(app, req.headers(), Access::Write)?;
    let id: Uuid = id
        .parse()
        .map_err(|_| ApiError::bad_request("invalid_id", "the id is not a UUID"))?;
    app.store
        .delete(&claims.subject, CERTIFICATE_TYPE, id, None)
        .await
        .map_err(|e| match e {
            crate::store::StoreError::NotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no certificate with this id",
            ),
            e => e.into(),
        })?;
    Ok(super::empty(StatusCode::NO_CONTENT))
}

fn certificate_json(doc: &Document, now: DateTime<Utc>) -> serde_json::Value {
    let expires_at = doc
        .data
        .get("expires_at")
        .and_then(|v| v.as_str())
        .and_then(|s| s.parse::<DateTime<Utc>>().ok());
    json!({
        "id": doc.id,
        "issuer": doc.owner,
        "subject": doc.data.get("subject"),
        "type": doc.data.get("type"),
        "issued_at": doc.data.get("issued_at"),
        "expires_at": doc.data.get("expires_at"),
        "valid": expires_at.is_none_or(|e| e > now),
        "signature_valid": verify(doc.id, &doc.owner, &doc.data),
        "proof": doc.data.get("proof"),
    })
}
