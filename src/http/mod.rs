//! The HTTP edge: accept loop with graceful shutdown, routing, request ids, per-route metrics,
//! and the helpers handlers share (auth, JSON bodies, responses).

mod account;
mod admin;
mod certificates;
mod changes;
mod docs;
pub mod error;
pub mod forwarded;
mod oauth;
mod query;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;

use crate::app::App;
use crate::auth::{Access, Claims};
pub use error::ApiError;

/// What every handler returns.
pub type HttpResponse = Response<Full<Bytes>>;
type HandlerResult = Result<HttpResponse, ApiError>;

/// The routes; the pattern string doubles as the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Health,
    Metrics,
    DocsCollection,
    DocsItem,
    Changes,
    Query,
    AdminIndexes,
    AdminSuggestions,
    AdminPrune,
    AdminExplain,
    AdminClients,
    AdminClient,
    AdminRotateKey,
    WebSocket,
    Discovery,
    Jwks,
    Authorize,
    Login,
    Consent,
    Token,
    UserInfo,
    Revoke,
    Introspect,
    EndSession,
    Register,
    RegisteredClient,
    Accounts,
    Sessions,
    Me,
    MyApps,
    MyApp,
    MyKey,
    Certificates,
    Certificate,
}

impl Route {
    const ALL: [(&'static str, Route); 34] = [
        ("/health", Route::Health),
        ("/metrics", Route::Metrics),
        ("/v1/docs/{type}", Route::DocsCollection),
        ("/v1/docs/{type}/{id}", Route::DocsItem),
        ("/v1/changes", Route::Changes),
        ("/v1/query", Route::Query),
        ("/v1/admin/indexes", Route::AdminIndexes),
        ("/v1/admin/indexes/suggestions", Route::AdminSuggestions),
        ("/v1/admin/indexes/prune", Route::AdminPrune),
        ("/v1/admin/explain", Route::AdminExplain),
        ("/v1/admin/clients", Route::AdminClients),
        ("/v1/admin/clients/{client}", Route::AdminClient),
        ("/v1/admin/signing-keys/rotate", Route::AdminRotateKey),
        ("/v1/ws", Route::WebSocket),
        ("/.well-known/openid-configuration", Route::Discovery),
        ("/oauth/jwks", Route::Jwks),
        ("/oauth/authorize", Route::Authorize),
        ("/oauth/login", Route::Login),
        ("/oauth/consent", Route::Consent),
        ("/oauth/token", Route::Token),
        ("/oauth/userinfo", Route::UserInfo),
        ("/oauth/revoke", Route::Revoke),
        ("/oauth/introspect", Route::Introspect),
        ("/oauth/end-session", Route::EndSession),
        ("/oauth/register", Route::Register),
        ("/oauth/register/{client}", Route::RegisteredClient),
        ("/v1/accounts", Route::Accounts),
        ("/v1/sessions", Route::Sessions),
        ("/v1/me", Route::Me),
        ("/v1/me/apps", Route::MyApps),
        ("/v1/me/apps/{client}", Route::MyApp),
        ("/v1/me/key", Route::MyKey),
        ("/v1/certificates", Route::Certificates),
        ("/v1/certificates/{id}", Route::Certificate),
    ];

    fn pattern(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, r)| *r == self)
            .map_or("unknown", |(p, _)| p)
    }
}

/// Builds the route table.
pub fn router() -> matchit::Router<Route> {
    let mut router = matchit::Router::new();
    for (pattern, route) in Route::ALL {
        // The patterns are constants without conflicts; the router test covers them.
        #[allow(clippy::expect_used)]
        router.insert(pattern, route).expect("valid route pattern");
    }
    router
}

/// Serves until `shutdown` resolves, then stops accepting and gives in-flight requests `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) {
    // Every connection task holds a receiver: a send asks them to close gracefully, and the
    // sender's `closed()` tells when the last one has ended.
    let (stop, stopping) = tokio::sync::watch::channel(());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Without a timer hyper applies no header timeout at all: a client that opens connections
    // and sends nothing (or a byte at a time) would hold them, and a file descriptor each,
    // forever. The timeout also bounds how long a kept-alive connection waits for its next
    // request.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.http.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(v) => v,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let idle_timeout = app.config.http.header_read_timeout;
                let activity = Arc::new(Activity::new());
                let requests = activity.clone();
                let service = hyper::service::service_fn(move |req| {
                    let running = requests.start();
                    let app = app.clone();
                    async move {
                        let response = handle(app, peer, req).await;
                        drop(running);
                        response
                    }
                });
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                let mut stopping = stopping.clone();
                tokio::spawn(async move {
                    tokio::pin!(conn);
                    // hyper's header timeout covers an HTTP/1 connection only once it knows the
                    // protocol (from the first bytes), and an HTTP/2 connection not at all: a
                    // connection with no request running for `idle_timeout` is closed here —
                    // dropped if it never made a request, else closed gracefully (GOAWAY on
                    // HTTP/2): a response still being written, or a stream accepted before
                    // the GOAWAY, is finished first, however long that takes. At server
                    // shutdown the graceful close has `grace` (`closing`).
                    let mut closing: Option<tokio::time::Instant> = None;
                    let mut idle_closed = false;
                    let ended = loop {
                        tokio::select! {
                            ended = &mut conn => break ended,
                            _ = stopping.changed(), if closing.is_none() => {
                                if !idle_closed {
                                    conn.as_mut().graceful_shutdown();
                                }
                                closing = Some(tokio::time::Instant::now() + grace);
                            }
                            () = activity.idle(idle_timeout), if closing.is_none() && !idle_closed => {
                                if !activity.served_any() {
                                    tracing::debug!(%peer, "no request within the header timeout");
                                    return;
                                }
                                conn.as_mut().graceful_shutdown();
                                idle_closed = true;
                            }
                            () = tokio::time::sleep_until(closing.unwrap_or_else(tokio::time::Instant::now)),
                                if closing.is_some() => {
                                tracing::debug!(%peer, "connection still open after closing");
                                return;
                            }
                        }
                    };
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    drop(stopping);
    tracing::info!("stopped accepting; waiting for in-flight requests");
    let _ = stop.send(());
    if tokio::time::timeout(grace, stop.closed()).await.is_err() {
        tracing::warn!(
            ?grace,
            "in-flight requests still running after the grace period"
        );
    }
}

/// The requests of one connection: how many are running, whether any ran, and when one last
/// started or ended. Requests only write atomics: the connection's task is woken by its idle
/// timer alone (at most once per timeout), never by a request — a wake-up per request start and
/// end would cost the hot path what it spends on its own socket hops.
#[derive(Debug)]
struct Activity {
    running: AtomicUsize,
    served: AtomicBool,
    /// The connection's start, which `last` counts from.
    opened: tokio::time::Instant,
    /// Milliseconds from `opened` to the last request start or end.
    last: AtomicU64,
}

/// A running request: counted until dropped (its handler finished or was cancelled).
struct Running(Arc<Activity>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
        self.0.touch();
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            running: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            opened: tokio::time::Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn start(self: &Arc<Self>) -> Running {
        self.running.fetch_add(1, Ordering::SeqCst);
        self.served.store(true, Ordering::SeqCst);
        self.touch();
        Running(self.clone())
    }

    fn touch(&self) {
        let since = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(since, Ordering::SeqCst);
    }

    fn served_any(&self) -> bool {
        self.served.load(Ordering::SeqCst)
    }

    /// Resolves once no request has run for `timeout`.
    async fn idle(&self, timeout: Duration) {
        loop {
            let quiet_since = self.opened + Duration::from_millis(self.last.load(Ordering::SeqCst));
            let running = self.running.load(Ordering::SeqCst) > 0;
            if !running && quiet_since + timeout <= tokio::time::Instant::now() {
                return;
            }
            // A running request is looked at again a whole timeout later.
            let wake = if running {
                tokio::time::Instant::now() + timeout
            } else {
                quiet_since + timeout
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

async fn handle(
    app: Arc<App>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<HttpResponse, Infallible> {
    let started = Instant::now();
    let request_id = request_id(req.headers());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let client_address = app
        .config
        .http
        .trusted_proxies
        .client_address(peer.ip(), req.headers());
    let matched = app.router.at(&path).map(|m| {
        (
            *m.value,
            m.params
                .iter()
                .map(|(_, v)| v.to_owned())
                .collect::<Vec<_>>(),
        )
    });
    // HEAD is GET without the body (RFC 9110 §9.3.2): load balancers probe `/health` with it.
    // Not for the WebSocket route, whose GET is a handshake.
    // Nor for a client's registration, whose GET hands out a new access token in its body.
    let head = method == Method::HEAD
        && !matches!(matched, Ok((Route::WebSocket | Route::RegisteredClient, _)));
    if head {
        *req.method_mut() = Method::GET;
    }
    let (label, result) = match matched {
        Ok((route, params)) => (
            route.pattern(),
            dispatch(&app, client_address, route, &params, req).await,
        ),
        Err(_) => (
            "unmatched",
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "route_not_found",
                format!("no route for {path}"),
            )),
        ),
    };
    let mut response = result.unwrap_or_else(ApiError::into_response);
    if head {
        response = without_body(response);
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    let status = response.status();
    let elapsed = started.elapsed();
    let method_label = method_label(&method);
    metrics::counter!(
        "vibe_http_requests_total",
        "route" => label,
        "method" => method_label,
        "status" => status.as_u16().to_string()
    )
    .increment(1);
    metrics::histogram!(
        "vibe_http_request_duration_seconds",
        "route" => label,
        "method" => method_label
    )
    .record(elapsed.as_secs_f64());
    tracing::debug!(
        %request_id, %peer, %client_address, %method, %path, status = status.as_u16(),
        micros = elapsed.as_micros() as u64, "request"
    );
    Ok(response)
}

/// The answer to a HEAD: the GET's status and headers, its length, no body.
fn without_body(response: HttpResponse) -> HttpResponse {
    let (mut parts, body) = response.into_parts();
    let length = hyper::body::Body::size_hint(&body).exact().unwrap_or(0);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    Response::from_parts(parts, Full::new(Bytes::new()))
}

/// The method as a metrics label. Any method is a valid request line, so a client inventing
/// new ones would otherwise create a series each, kept until the process exits.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Keeps a caller's `x-request-id` if it is short printable ASCII, else makes a new one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::now_v7().simple().to_string(), str::to_owned)
}

async fn dispatch(
    app: &Arc<App>,
    client_address: IpAddr,
    route: Route,
    params: &[String],
    req: Request<Incoming>,
) -> HandlerResult {
    let method = req.method().clone();
    match (route, params) {
        (Route::WebSocket, _) if method == Method::GET => crate::ws::upgrade(app.clone(), req),
        (Route::WebSocket, _) => Err(method_not_allowed("GET")),
        (Route::Changes, _) if method == Method::GET => changes::changes(app, req).await,
        (Route::Query, _) if method == Method::POST => query::query(app, req).await,
        (Route::Query, _) => Err(method_not_allowed("POST")),
        (Route::AdminIndexes, _) => match method {
            Method::GET => admin::list(app, req).await,
            Method::POST => admin::approve(app, req).await,
            _ => Err(method_not_allowed("GET, HEAD, POST")),
        },
        (Route::AdminSuggestions, _) if method == Method::GET => admin::suggestions(app, req).await,
        (Route::AdminPrune, _) if method == Method::POST => admin::prune(app, req).await,
        (Route::AdminPrune, _) => Err(method_not_allowed("POST")),
        (Route::AdminExplain, _) if method == Method::POST => admin::explain(app, req).await,
        (Route::AdminExplain, _) => Err(method_not_allowed("POST")),
        (Route::AdminClients, _) => match method {
            Method::GET => account::list_clients(app, req).await,
            Method::POST => account::register_client(app, req).await,
            _ => Err(method_not_allowed("GET, HEAD, POST")),
        },
        (Route::AdminClient, [client]) if method == Method::DELETE => {
            account::delete_client(app, client, req).await
        }
        (Route::AdminClient, _) => Err(method_not_allowed("DELETE")),
        (Route::AdminRotateKey, _) if method == Method::POST => {
            account::rotate_signing_key(app, req).await
        }
        (Route::AdminRotateKey, _) => Err(method_not_allowed("POST")),
        (Route::Discovery, _) if method == Method::GET => Ok(oauth::discovery(app)),
        (Route::Jwks, _) if method == Method::GET => oauth::jwks(app).await,
        (Route::Authorize | Route::EndSession | Route::UserInfo, _)
            if method != Method::GET && method != Method::POST =>
        {
            Err(method_not_allowed("GET, HEAD, POST"))
        }
        (Route::Authorize, _) => oauth::authorize(app, req).await,
        (Route::EndSession, _) => oauth::end_session(app, req).await,
        (Route::UserInfo, _) => oauth::userinfo(app, req).await,
        (Route::Login, _) if method == Method::POST => oauth::login(app, client_address, req).await,
        (Route::Consent, _) if method == Method::POST => oauth::consent(app, req).await,
        (Route::Token, _) if method == Method::POST => oauth::token(app, req).await,
        (Route::Register, _) if method == Method::POST => {
            oauth::register(app, client_address, req).await
        }
        (Route::RegisteredClient, [client])
            if [Method::GET, Method::PUT, Method::DELETE].contains(&method) =>
        {
            oauth::client_configuration(app, client, req).await
        }
        (Route::RegisteredClient, _) => Err(method_not_allowed("GET, PUT, DELETE")),
        (Route::Revoke, _) if method == Method::POST => oauth::revoke(app, req).await,
        (Route::Introspect, _) if method == Method::POST => oauth::introspect(app, req).await,
        (
            Route::Login
            | Route::Consent
            | Route::Token
            | Route::Revoke
            | Route::Introspect
            | Route::Register,
            _,
        ) => Err(method_not_allowed("POST")),
        (Route::Accounts, _) if method == Method::POST => {
            account::sign_up(app, client_address, req).await
        }
        (Route::Accounts, _) => Err(method_not_allowed("POST")),
        (Route::Sessions, _) if method == Method::POST => {
            account::sign_in(app, client_address, req).await
        }
        (Route::Sessions, _) if method == Method::DELETE => account::sign_out(app, req).await,
        (Route::Sessions, _) => Err(method_not_allowed("POST, DELETE")),
        (Route::Me, _) if method == Method::GET => account::me(app, req).await,
        (Route::MyApps, _) if method == Method::GET => account::apps(app, req).await,
        (Route::MyApp, [client]) if method == Method::DELETE => {
            account::revoke_app(app, client, req).await
        }
        (Route::MyApp, _) => Err(method_not_allowed("DELETE")),
        (Route::MyKey, _) if method == Method::POST => {
            account::export_key(app, client_address, req).await
        }
        (Route::MyKey, _) => Err(method_not_allowed("POST")),
        (Route::Certificates, _) => match method {
            Method::GET => certificates::list(app, req).await,
            Method::POST => certificates::issue(app, req).await,
            _ => Err(method_not_allowed("GET, HEAD, POST")),
        },
        (Route::Certificate, [id]) if method == Method::DELETE => {
            certificates::revoke(app, id, req).await
        }
        (Route::Certificate, _) => Err(method_not_allowed("DELETE")),
        (Route::Health, _) if method == Method::GET => health(app).await,
        (Route::Metrics, _) if method == Method::GET => Ok(text(app.metrics.render())),
        (Route::DocsCollection, [doc_type]) => match method {
            Method::GET => docs::list(app, doc_type, req).await,
            Method::POST => docs::create(app, doc_type, req).await,
            _ => Err(method_not_allowed("GET, HEAD, POST")),
        },
        (Route::DocsItem, [doc_type, id]) => match method {
            Method::GET => docs::get(app, doc_type, id, req).await,
            Method::PUT => docs::replace(app, doc_type, id, req).await,
            Method::PATCH => docs::patch(app, doc_type, id, req).await,
            Method::DELETE => docs::delete(app, doc_type, id, req).await,
            _ => Err(method_not_allowed("GET, HEAD, PUT, PATCH, DELETE")),
        },
        _ => Err(method_not_allowed("GET, HEAD")),
    }
}

fn method_not_allowed(allow: &'static str) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("this route supports {allow}"),
    );
    e.allow = Some(allow);
    e
}

async fn health(app: &App) -> HandlerResult {
    let db_ok = tokio::time::timeout(Duration::from_secs(2), app.store.ping())
        .await
        .is_ok_and(|r| r.is_ok());
    let body = serde_json::json!({
        "status": if db_ok { "ok" } else { "degraded" },
        "database": if db_ok { "ok" } else { "unavailable" },
        "version": env!("CARGO_PKG_VERSION"),
    });
    let status = if db_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(json(status, &body))
}

/// The verified claims of the bearer token, for a request needing `access` to `doc_type`, with
/// the matching scope required.
pub fn authorize(
    app: &App,
    headers: &HeaderMap,
    access: Access,
    doc_type: &str,
) -> Result<Arc<Claims>, ApiError> {
    let token = bearer_token(headers)?;
    let claims = app.tokens.verify(token, access, Some(doc_type))?;
    require_scope(&claims, access, doc_type)?;
    if access == Access::Write && crate::doc_type::is_reserved(doc_type) {
        return Err(reserved_type(doc_type));
    }
    Ok(claims)
}

/// A write to a type only the server writes (certificates have their own API).
pub fn reserved_type(doc_type: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "reserved_type",
        format!(
            "documents of type {doc_type} are written by the server only (see /v1/certificates)"
        ),
    )
}

/// The bearer token's claims (signature and expiry checked, attenuations not yet).
pub fn bearer(app: &App, headers: &HeaderMap) -> Result<Arc<Claims>, ApiError> {
    Ok(app.tokens.identify(bearer_token(headers)?)?)
}

/// Checks the token (attenuations included) and its scopes for `access` to `doc_type`.
pub fn check_scope(
    app: &App,
    claims: &Claims,
    headers: &HeaderMap,
    access: Access,
    doc_type: &str,
) -> Result<(), ApiError> {
    check_token_scope(app, claims, bearer_token(headers)?, access, doc_type)
}

/// [`check_scope`] for the bearer `token` itself (read from a request already consumed).
pub fn check_token_scope(
    app: &App,
    claims: &Claims,
    token: &str,
    access: Access,
    doc_type: &str,
) -> Result<(), ApiError> {
    app.tokens.verify(token, access, Some(doc_type))?;
    require_scope(claims, access, doc_type)
}

fn require_scope(claims: &Claims, access: Access, doc_type: &str) -> Result<(), ApiError> {
    if claims.permits(access, doc_type) {
        return Ok(());
    }
    let scope = match access {
        Access::Read => format!("read:{doc_type}"),
        Access::Write => format!("write:{doc_type}"),
        Access::Admin => "admin".to_owned(),
        Access::Account => "a first-party token".to_owned(),
    };
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "missing_scope",
        format!("the token lacks the scope {scope}"),
    ))
}

/// The verified claims of a bearer token with the `admin` scope (its attenuations checked
/// against `operation("admin")`).
pub fn authorize_admin(app: &App, headers: &HeaderMap) -> Result<Arc<Claims>, ApiError> {
    let token = bearer_token(headers)?;
    let claims = app.tokens.verify(token, Access::Admin, None)?;
    require_scope(&claims, Access::Admin, "")?;
    Ok(claims)
}

pub(crate) fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "send a token as `Authorization: Bearer <token>`",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| credentials(v, "Bearer"))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "the Authorization header must be `Bearer <token>`",
            )
        })?;
    Ok(token)
}

/// The credentials of an `Authorization` value `<scheme> <credentials>` (`Bearer <token>`,
/// `Basic <base64>`): the scheme compares without regard to case (RFC 9110 §11.1; `bearer` and
/// `BEARER` are `Bearer`), and the credentials are what follows it, trimmed; None for another
/// scheme or empty credentials.
pub(crate) fn credentials<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let (given, credentials) = value.trim_start().split_once([' ', '\t'])?;
    let credentials = credentials.trim();
    (given.eq_ignore_ascii_case(scheme) && !credentials.is_empty()).then_some(credentials)
}

/// Reads a JSON body of one of the `content_types`, bounded by the configured size.
pub async fn read_json<T: DeserializeOwned>(
    app: &App,
    req: Request<Incoming>,
    content_types: &[&str],
) -> Result<T, ApiError> {
    let bytes = read_body(app, req, content_types).await?;
    // The plain parse first (it also refuses bytes after the value); the path of a bad value is
    // found again only for its message, so a good body costs no path bookkeeping.
    serde_json::from_slice(&bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => {
                let located = serde_path_to_error::deserialize::<_, T>(
                    &mut serde_json::Deserializer::from_slice(&bytes),
                );
                let message = located.err().map_or_else(|| e.to_string(), |e| at_path(&e));
                ApiError::bad_request("invalid_body", message)
            }
            _ => ApiError::bad_request("bad_json", format!("the body is not valid JSON: {e}")),
        }
    })
}

/// A deserialization error's message, led by the field it is about (`limit: invalid digit
/// found in string`, `acl.read: invalid type: …`) unless it is about the whole value.
pub(crate) fn at_path<E: std::fmt::Display>(error: &serde_path_to_error::Error<E>) -> String {
    let path = error.path().to_string();
    if path == "." {
        error.inner().to_string()
    } else {
        format!("{path}: {}", error.inner())
    }
}

/// The request's query string as `T`; a bad one is 400 with `code` and a message naming the
/// parameter.
pub(crate) fn query_params<T: DeserializeOwned>(
    uri: &http::Uri,
    code: &'static str,
) -> Result<T, ApiError> {
    form_params(uri.query().unwrap_or("").as_bytes(), code)
}

/// [`query_params`] of a form-urlencoded body.
pub(crate) fn form_params<T: DeserializeOwned>(
    encoded: &[u8],
    code: &'static str,
) -> Result<T, ApiError> {
    let pairs = form_urlencoded::parse(encoded);
    serde_path_to_error::deserialize(serde_urlencoded::Deserializer::new(pairs))
        .map_err(|e| ApiError::bad_request(code, at_path(&e)))
}

/// Reads a body of one of the `content_types`, bounded by the configured size.
pub async fn read_body(
    app: &App,
    req: Request<Incoming>,
    content_types: &[&str],
) -> Result<Bytes, ApiError> {
    let limit = app.config.http.max_body_bytes;
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    if !ct.as_deref().is_some_and(|ct| content_types.contains(&ct)) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("the body must be sent as {}", content_types.join(" or ")),
        ));
    }
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body exceeds {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let timeout = app.config.http.body_read_timeout;
    let collected = tokio::time::timeout(timeout, Limited::new(req.into_body(), limit).collect())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the body did not arrive within {}",
                    humantime::format_duration(timeout)
                ),
            )
        })?;
    let bytes = collected
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                ApiError::bad_request("bad_body", "the request body could not be read")
            }
        })?
        .to_bytes();
    Ok(bytes)
}

pub fn json(status: StatusCode, value: &impl Serialize) -> HttpResponse {
    let bytes = match serde_json::to_vec(value) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "response serialisation failed");
            return ApiError::internal().into_response();
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A response without a body.
pub fn empty(status: StatusCode) -> HttpResponse {
    let mut response = HttpResponse::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

fn text(body: String) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_resolve() {
        let r = router();
        assert_eq!(
            *r.at("/v1/docs/posts").unwrap().value,
            Route::DocsCollection
        );
        assert_eq!(*r.at("/v1/docs/posts/abc").unwrap().value, Route::DocsItem);
        assert!(r.at("/v1/docs").is_err());
        assert!(r.at("/v1/docs/posts/abc/def").is_err());
        for (pattern, route) in Route::ALL {
            assert_eq!(route.pattern(), pattern);
        }
    }

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        assert_eq!(request_id(&h).len(), 32);
        h.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert("x-request-id", HeaderValue::from_static("has space"));
        assert_ne!(request_id(&h), "has space");
    }
}
