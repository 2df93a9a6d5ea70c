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
    if !crate::doc_type::is_valid(&request.doc_type) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "type: a type name matches ^[a-z][a-z0-9_.-]{0,63}$",
        ));
    }
    check_scope(app, &claims, &headers, Access::Read, &request.doc_type)?;
    let token = super::bearer_token(&headers)?;
    let page = crate::oneshot::query_page(app, token, &claims, &request).await?;
    Ok(json(StatusCode::OK, &page))
}
