//! `POST /v1/query`: one page of a query (the language of docs/queries.md), with `next` for the
//! following page and `expand`ed references.

use http::{Request, StatusCode};
use hyper::body::Incoming;
use vibe_actors::query::QueryRequest;

use super::{ApiError, HttpResponse, bearer, check_scope, json, read_json};
use crate::app::App;
use crate::auth::Access;

pub(super) async fn query(app: &App, req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    // Who is asking before what: an unauthenticated caller learns nothing about its body.
    let claims = bearer(app, req.headers())?;
    let headers = req.headers().clone();
    let request: QueryRequest = read_json(app, req, &["application/json"]).await?;
    // The code every surface gives a bad type name (REST routes, `read`, `readOnce`).
    super::docs::check_type(&request.doc_type)?;
    check_scope(app, &claims, &headers, Access::Read, &request.doc_type)?;
    let token = super::bearer_token(&headers)?;
    let page = crate::oneshot::query_page(app, token, &claims, &request).await?;
    Ok(json(StatusCode::OK, &page))
}
