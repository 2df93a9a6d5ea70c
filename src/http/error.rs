//! The one error type every HTTP handler returns, and its JSON rendering. Internal causes are
//! logged here and never sent to clients.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use crate::auth::AuthError;
use crate::store::StoreError;
use crate::wire::{ErrorBody, ErrorDetail};

/// An error answer: status, stable code, message for people.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// For 405: the methods the route does support.
    pub allow: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            allow: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "an internal error occurred",
        )
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        // Serialising two strings cannot fail.
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = Response::new(Full::new(Bytes::from(bytes)));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(allow) = self.allow {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"vibe\""),
            );
        }
        response
    }
}

impl From<crate::oneshot::OneShotError> for ApiError {
    fn from(e: crate::oneshot::OneShotError) -> Self {
        match e {
            crate::oneshot::OneShotError::Query(e) => {
                let code = if e.part == "cursor" {
                    "invalid_cursor"
                } else {
                    "invalid_query"
                };
                ApiError::bad_request(code, e.to_string())
            }
            crate::oneshot::OneShotError::Store(e) => e.into(),
            e @ (crate::oneshot::OneShotError::ExpansionTooLarge(_)
            | crate::oneshot::OneShotError::TooManyReferences(_)) => {
                ApiError::bad_request("page_too_large", e.to_string())
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", "document not found")
            }
            StoreError::AlreadyExists => ApiError::new(
                StatusCode::CONFLICT,
                "already_exists",
                "a document with this id already exists",
            ),
            StoreError::RevMismatch { current } => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "rev_mismatch",
                format!("the document is at rev {current}"),
            ),
            StoreError::Forbidden => ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the document's ACL does not allow this",
            ),
            StoreError::ParentForbidden { .. } => ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the parent's ACL does not allow creating under it",
            ),
            StoreError::ParentNotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                "parent_not_found",
                "no parent document with this id that the caller may see",
            ),
            StoreError::AclOwnerOnly => ApiError::new(
                StatusCode::FORBIDDEN,
                "acl_owner_only",
                "only the owner may change a document's ACL",
            ),
            StoreError::IndexedValueTooLarge(reason) => ApiError::bad_request(
                "indexed_value_too_large",
                format!(
                    "a value at a data path with a managed index is too large for the index \
                     ({reason}); shorten it, or have an operator drop the index"
                ),
            ),
            StoreError::Unstorable(reason) => ApiError::bad_request(
                "invalid_body",
                format!(
                    "the document cannot be stored ({reason}): strings and keys may not contain \\u0000"
                ),
            ),
            StoreError::QueryTimeout => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "query_timeout",
                "the query ran past query.statement_timeout and was cancelled; narrow it, or \
                 ask the operator for an index (docs/queries.md)",
            ),
            StoreError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "database unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the database is unavailable; retry later",
                )
            }
            e => {
                tracing::error!(error = %e, "store error");
                ApiError::internal()
            }
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Expired => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "token_expired",
                "the token has expired",
            ),
            AuthError::Invalid => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "the token is malformed, not issued by this server, or its checks fail",
            ),
            AuthError::Revoked => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "token_revoked",
                "the token was revoked (consent withdrawn, or the token or its grant revoked)",
            ),
            AuthError::TooComplex => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "token_too_complex",
                "the token is larger, has more blocks, or its own checks ask more work (joins, \
                 set iterations with .any()/.all()) than this server evaluates",
            ),
            AuthError::Restricted => ApiError::new(
                StatusCode::FORBIDDEN,
                "token_restricted",
                "the token's own checks (an attenuation) do not allow this request",
            ),
            e => {
                tracing::error!(error = %e, "token error");
                ApiError::internal()
            }
        }
    }
}
