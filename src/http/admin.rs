//! `/v1/admin/…`: index governance (suggestions with evidence, approval, the managed indexes
//! with their build progress and use, pruning) and `EXPLAIN` of a query. Every route needs a
//! token with the `admin` scope.

use http::{Request, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;
use vibe_actors::query::shape::IndexKind;
use vibe_actors::query::{QueryRequest, QuerySpec};

use super::{ApiError, HttpResponse, authorize_admin, json, read_json};
use crate::app::App;
use crate::governance::GovernanceError;

impl From<GovernanceError> for ApiError {
    fn from(e: GovernanceError) -> Self {
        match e {
            GovernanceError::Store(e) => e.into(),
            GovernanceError::Invalid(message) => ApiError::bad_request("invalid_body", message),
            GovernanceError::Database(e) => {
                tracing::error!(error = %e, "index governance failed");
                ApiError::internal()
            }
        }
    }
}

pub(super) async fn suggestions(
    app: &App,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    authorize_admin(app, req.headers())?;
    let suggestions = app.governance.suggestions().await?;
    Ok(json(StatusCode::OK, &json!({"suggestions": suggestions})))
}

pub(super) async fn list(app: &App, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    authorize_admin(app, req.headers())?;
    let indexes = app.governance.list().await?;
    Ok(json(StatusCode::OK, &json!({"indexes": indexes})))
}

/// Approves a suggestion: `{"type", "path", "kind"}` as the suggestion lists them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Approval {
    #[serde(rename = "type")]
    doc_type: String,
    path: String,
    kind: String,
}

pub(super) async fn approve(app: &App, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let claims = authorize_admin(app, req.headers())?;
    let approval: Approval = read_json(app, req, &["application/json"]).await?;
    let kind = IndexKind::parse(&approval.kind)
        .ok_or_else(|| ApiError::bad_request("invalid_body", "`kind` is `number` or `string`"))?;
    let Some(path) = approval.path.strip_prefix("data.") else {
        return Err(ApiError::bad_request(
            "invalid_body",
            "`path` is a data path (`data.score`)",
        ));
    };
    let path: Vec<String> = path.split('.').map(str::to_owned).collect();
    let index = app
        .governance
        .approve(&approval.doc_type, &path, kind, &claims.subject)
        .await?;
    Ok(json(StatusCode::ACCEPTED, &index))
}

pub(super) async fn prune(app: &App, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    authorize_admin(app, req.headers())?;
    let dropped = app.governance.prune().await?;
    Ok(json(StatusCode::OK, &json!({"dropped": dropped})))
}

/// `{"query": {...}, "analyze": false}`: the plan of one page of the query, as the caller.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainRequest {
    query: QueryRequest,
    #[serde(default)]
    analyze: bool,
}

pub(super) async fn explain(app: &App, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let claims = authorize_admin(app, req.headers())?;
    let request: ExplainRequest = read_json(app, req, &["application/json"]).await?;
    let spec = QuerySpec::parse(&request.query, &claims.subject, app.config.query.limits())
        .map_err(|e| ApiError::bad_request("invalid_query", e.to_string()))?;
    let plan = app
        .store
        .explain(&spec, &claims.subject, request.analyze)
        .await?;
    Ok(json(StatusCode::OK, &json!({"plan": plan})))
}
