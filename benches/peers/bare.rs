//! "The physical limit" peer for `benches/feed_latency.rs`: a bare transport server
//! (`cargo bench --bench bare_peer -- --listen 127.0.0.1:0`).
//!
//! It speaks just enough of Vibe's wire protocol for the fan-out latency client to drive it, with
//! the same transport as Vibe's WebSocket edge (hyper 1 + fastwebsockets, split halves, one writer
//! task per connection draining a bounded queue, frames written then flushed once per batch
//! through a `BufWriter`) and nothing else: no database, no actors, no ACLs, no authentication.
//! Comparing Vibe's numbers with this server's shows how close Vibe's fan-out comes to what the
//! transport and the machine allow.
//!
//! - `POST /v1/docs/{type}`: reads the JSON body, builds a document (a new UUIDv7 id, the type,
//!   owner `did:key:zBare`, rev 1, `createdAt`/`updatedAt` now, `acl` and `data` from the body),
//!   encodes ONE event frame `{"sub":"q1","event":"add","cursor":"<n>-0","doc":<doc>}` as a shared
//!   `Bytes`, offers it to every subscriber's queue (`try_send`: a full queue drops the frame and
//!   counts it) and answers 201 with the document.
//! - Windows, as Vibe's live queries have them: a subscription with `limit` L holds the L newest
//!   documents, so once L are held each new one pushes the oldest out, and the subscriber also
//!   gets `{"sub":"q1","event":"remove","cursor":"<n>-1","id":<its id>}` (windows per document
//!   type; encoded once per limit, queued with the `add` in the same pass). Without this the peer
//!   would send half the frames Vibe does for the same subscription.
//! - `GET /v1/ws` (subprotocol `vibe.v1`; any other offered value, such as a token, is ignored):
//!   `{"id":..,"op":"read",..}` is answered with `{"re":..,"ok":true,"sub":"q1","docs":[],
//!   "cursor":"0-0"}` and subscribes the connection to every later document, with the request's
//!   `limit` (1 to 1000, default 100, as Vibe's) as its window; `ping` is answered
//!   with `{"re":..,"ok":true,"pong":true}`. Only the writer task writes to the socket (pongs and
//!   close replies owed by the reader included).
//! - `GET /health`: 200.
//!
//! Only loopback listen addresses are accepted.

// Printing the bound address is this server's job (the bench scripts read it).
#![allow(clippy::print_stdout)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

/// Bare transport peer: Vibe's wire protocol for the fan-out bench, without Vibe.
#[derive(Debug, Parser)]
#[command(name = "bare_peer")]
struct Args {
    /// Address to listen on; loopback only (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Frames queued per connection before broadcast frames are dropped (Vibe's default
    /// `ws.outbound_queue`).
    #[arg(long, default_value_t = 4096)]
    queue: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The protocol this server speaks.
const SUBPROTOCOL: &str = "vibe.v1";
/// The one subscription id every `read` gets.
const SUB: &str = "q1";
/// The owner of every document.
const OWNER: &str = "did:key:zBare";
/// Frames written per flush at most (as in src/ws/mod.rs).
const WRITE_BATCH: usize = 256;
/// Bytes buffered per connection before a write reaches the socket (as in src/ws/mod.rs).
const WRITE_BUFFER: usize = 4096;
/// Largest request body and WebSocket message accepted.
const MAX_BODY: usize = 1 << 20;

type Body = Full<Bytes>;
type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

/// Vibe's default and largest `limit` of a query.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// A subscribed connection.
#[derive(Debug)]
struct Subscriber {
    id: u64,
    tx: mpsc::Sender<Bytes>,
    /// Its window's size.
    limit: usize,
}

/// The subscribers and the newest documents, under one lock so that every subscriber sees the
/// same order of events.
#[derive(Debug, Default)]
struct Feed {
    subscribers: Vec<Subscriber>,
    /// Per document type, the ids of its newest documents, newest first: at most
    /// `MAX_LIMIT + 1`, enough to know what leaves any window. (Every subscriber gets every
    /// type's events; the benchmarks write one type per run.)
    recent: HashMap<String, VecDeque<uuid::Uuid>>,
}

/// Subscribers and counters shared by all connections.
#[derive(Debug)]
struct Hub {
    feed: Mutex<Feed>,
    /// Per-connection queue capacity.
    queue: usize,
    next_connection: AtomicU64,
    /// Documents created (the `<n>` of the event cursors).
    documents: AtomicU64,
    /// Event frames dropped because a subscriber's queue was full.
    dropped: AtomicU64,
}

impl Hub {
    fn feed(&self) -> std::sync::MutexGuard<'_, Feed> {
        // Nothing panics while holding the lock; a poisoned feed is still a valid one.
        self.feed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn subscribe(&self, id: u64, tx: mpsc::Sender<Bytes>, limit: usize) {
        let mut feed = self.feed();
        if !feed.subscribers.iter().any(|s| s.id == id) {
            feed.subscribers.push(Subscriber { id, tx, limit });
        }
    }

    fn unsubscribe(&self, id: u64) {
        self.feed().subscribers.retain(|s| s.id != id);
    }

    /// Offers the `add` frame of document `doc_id` (the `n`-th) to every subscriber, with the
    /// `remove` of what leaves its window; full queues drop frames, closed ones are removed.
    fn broadcast(&self, n: u64, doc_type: &str, doc_id: uuid::Uuid, add: &Bytes) {
        let mut dropped = 0_u64;
        let mut feed = self.feed();
        let Feed {
            subscribers,
            recent,
        } = &mut *feed;
        let recent = recent.entry(doc_type.to_owned()).or_default();
        recent.push_front(doc_id);
        recent.truncate(MAX_LIMIT + 1);
        // Encoded once per window size (one in the benchmarks).
        let mut removes: Vec<(usize, Bytes)> = Vec::new();
        subscribers.retain(|s| {
            let mut offer = |frame: Bytes| match s.tx.try_send(frame) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    dropped += 1;
                    true
                }
                Err(TrySendError::Closed(_)) => false,
            };
            if !offer(add.clone()) {
                return false;
            }
            let Some(left) = recent.get(s.limit) else {
                return true;
            };
            let remove = match removes.iter().find(|(limit, _)| *limit == s.limit) {
                Some((_, frame)) => frame.clone(),
                None => {
                    let frame = Bytes::from(format!(
                        r#"{{"sub":"{SUB}","event":"remove","cursor":"{n}-1","id":"{left}"}}"#
                    ));
                    removes.push((s.limit, frame.clone()));
                    frame
                }
            };
            offer(remove)
        });
        drop(feed);
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
    }
}

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    response(status, "application/json", Bytes::from(body))
}

async fn handle(hub: Arc<Hub>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    let response = if path == "/health" {
        response(StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n"))
    } else if path == "/v1/ws" {
        if req.method() == Method::GET {
            upgrade(hub, req)
        } else {
            error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "GET")
        }
    } else if let Some(doc_type) = path.strip_prefix("/v1/docs/")
        && !doc_type.is_empty()
        && !doc_type.contains('/')
    {
        if req.method() == Method::POST {
            let doc_type = doc_type.to_owned();
            create(&hub, doc_type, req).await
        } else {
            error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "POST")
        }
    } else {
        error(StatusCode::NOT_FOUND, "not_found", "no such route")
    };
    Ok(response)
}

/// `POST /v1/docs/{type}`: builds the document, broadcasts its `add` event, answers 201.
async fn create(hub: &Hub, doc_type: String, req: Request<Incoming>) -> Response<Body> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_body", &e.to_string()),
    };
    let mut body: Value = match serde_json::from_slice(&body) {
        Ok(Value::Object(body)) => Value::Object(body),
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_json",
                "expected a JSON object",
            );
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_json", &e.to_string()),
    };
    let acl = body
        .get_mut("acl")
        .map(Value::take)
        .unwrap_or_else(|| Value::Object(serde_json::Map::new()));
    let data = body
        .get_mut("data")
        .map(Value::take)
        .unwrap_or_else(|| Value::Object(serde_json::Map::new()));
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    // Written by hand to keep Vibe's field order (a `serde_json::Map` sorts its keys).
    let id = uuid::Uuid::now_v7();
    let doc = format!(
        r#"{{"id":"{id}","type":{doc_type},"owner":"{OWNER}","rev":1,"createdAt":"{now}","updatedAt":"{now}","acl":{acl},"data":{data}}}"#,
        doc_type = Value::String(doc_type.clone()),
    );
    let n = hub.documents.fetch_add(1, Ordering::Relaxed) + 1;
    let event = Bytes::from(format!(
        r#"{{"sub":"{SUB}","event":"add","cursor":"{n}-0","doc":{doc}}}"#
    ));
    hub.broadcast(n, &doc_type, id, &event);
    response(StatusCode::CREATED, "application/json", Bytes::from(doc))
}

/// `GET /v1/ws`: answers the upgrade and starts the connection.
fn upgrade(hub: Arc<Hub>, mut req: Request<Incoming>) -> Response<Body> {
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return error(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint speaks WebSocket (subprotocol vibe.v1)",
        );
    }
    let offered: Vec<String> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_owned()))
        .filter(|p| !p.is_empty())
        .collect();
    if !offered.is_empty() && !offered.iter().any(|p| p == SUBPROTOCOL) {
        return error(
            StatusCode::BAD_REQUEST,
            "unsupported_protocol",
            "offer the subprotocol vibe.v1",
        );
    }
    let (upgrade_response, upgraded) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_upgrade", &e.to_string()),
    };
    let (parts, _) = upgrade_response.into_parts();
    let mut response = Response::from_parts(parts, Full::new(Bytes::new()));
    if !offered.is_empty() {
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    tokio::spawn(async move {
        if let Ok(ws) = upgraded.await {
            connection(hub, ws).await;
        }
    });
    response
}

/// One WebSocket connection: the reader runs here, the writer in its own task.
async fn connection(hub: Arc<Hub>, mut ws: fastwebsockets::WebSocket<Upgraded>) {
    let id = hub.next_connection.fetch_add(1, Ordering::Relaxed);
    ws.set_max_message_size(MAX_BODY);
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    let (read, write) = ws.split(|io| {
        let (r, w) = tokio::io::split(io);
        (r, tokio::io::BufWriter::with_capacity(WRITE_BUFFER, w))
    });
    let (tx, rx) = mpsc::channel::<Bytes>(hub.queue);
    // Pongs and close replies the reader owes, handed to the writer.
    let (control_tx, control_rx) = mpsc::channel::<Frame<'static>>(8);
    let writer = tokio::spawn(write_loop(write, rx, control_rx));
    read_loop(&hub, id, read, tx, control_tx).await;
    hub.unsubscribe(id);
    let _ = writer.await;
}

async fn read_loop(
    hub: &Hub,
    id: u64,
    read: fastwebsockets::WebSocketRead<tokio::io::ReadHalf<Upgraded>>,
    tx: mpsc::Sender<Bytes>,
    control: mpsc::Sender<Frame<'static>>,
) {
    let mut read = fastwebsockets::FragmentCollectorRead::new(read);
    let mut send_control = |frame: Frame<'_>| {
        let control = control.clone();
        let owned = Frame::new(
            frame.fin,
            frame.opcode,
            None,
            Payload::Owned(frame.payload.to_vec()),
        );
        async move {
            control
                .send(owned)
                .await
                .map_err(|_| WebSocketError::ConnectionClosed)
        }
    };
    loop {
        let frame = match read.read_frame(&mut send_control).await {
            Ok(frame) => frame,
            Err(_) => return,
        };
        match frame.opcode {
            OpCode::Close => return,
            OpCode::Text => {}
            _ => continue,
        }
        let (reply, window) = answer(&frame.payload);
        // A reply waits for room in the queue (as Vibe's replies do); broadcasts never wait.
        if tx.send(reply).await.is_err() {
            return;
        }
        // Subscribed after the reply is queued, so no event can overtake it.
        if let Some(limit) = window {
            hub.subscribe(id, tx.clone(), limit);
        }
    }
}

/// The reply to one request frame, and the window size when the connection subscribes.
fn answer(payload: &[u8]) -> (Bytes, Option<usize>) {
    let request: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => return (reply_error(&Value::Null, "bad_json", &e.to_string()), None),
    };
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    let reply = |body: Value| Bytes::from(body.to_string());
    match request.get("op").and_then(Value::as_str) {
        Some("read") => {
            let limit = request
                .get("limit")
                .and_then(Value::as_u64)
                .map_or(DEFAULT_LIMIT, |l| {
                    usize::try_from(l).unwrap_or(MAX_LIMIT).clamp(1, MAX_LIMIT)
                });
            (
                reply(serde_json::json!({
                    "re": id, "ok": true, "sub": SUB, "docs": [], "cursor": "0-0",
                })),
                Some(limit),
            )
        }
        Some("ping") => (
            reply(serde_json::json!({"re": id, "ok": true, "pong": true})),
            None,
        ),
        _ => (
            reply_error(&id, "unsupported", "this peer answers read and ping only"),
            None,
        ),
    }
}

fn reply_error(id: &Value, code: &str, message: &str) -> Bytes {
    Bytes::from(
        serde_json::json!({"re": id, "error": {"code": code, "message": message}}).to_string(),
    )
}

async fn write_loop(
    mut write: fastwebsockets::WebSocketWrite<tokio::io::BufWriter<tokio::io::WriteHalf<Upgraded>>>,
    mut rx: mpsc::Receiver<Bytes>,
    mut control: mpsc::Receiver<Frame<'static>>,
) {
    let result: Result<(), WebSocketError> = async {
        loop {
            tokio::select! {
                biased;
                frame = control.recv() => match frame {
                    Some(frame) => {
                        let close = frame.opcode == OpCode::Close;
                        write.write_frame(frame).await?;
                        write.flush().await?;
                        if close {
                            return Ok(());
                        }
                    }
                    // The reader is gone: the connection is over.
                    None => return Ok(()),
                },
                frame = rx.recv() => {
                    let Some(frame) = frame else { return Ok(()) };
                    write.write_frame(Frame::text(Payload::Borrowed(&frame))).await?;
                    for _ in 1..WRITE_BATCH {
                        match rx.try_recv() {
                            Ok(frame) => {
                                write.write_frame(Frame::text(Payload::Borrowed(&frame))).await?;
                            }
                            Err(_) => break,
                        }
                    }
                    write.flush().await?;
                }
            }
        }
    }
    .await;
    if result.is_ok() {
        let _ = write.flush().await;
    }
}

async fn serve(listener: TcpListener, hub: Arc<Hub>) -> anyhow::Result<()> {
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        // EMFILE and friends: back off instead of spinning.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let hub = hub.clone();
                let service = hyper::service::service_fn(move |req| handle(hub.clone(), req));
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    println!(
        "stopping: {} documents, {} event frames dropped (full queues)",
        hub.documents.load(Ordering::Relaxed),
        hub.dropped.load(Ordering::Relaxed),
    );
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    if !args.listen.ip().is_loopback() {
        bail!(
            "--listen must be a loopback address; {} is not one",
            args.listen.ip()
        );
    }
    if args.queue == 0 {
        bail!("--queue must be at least 1");
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    println!("listening on http://{addr}");
    let hub = Arc::new(Hub {
        feed: Mutex::new(Feed::default()),
        queue: args.queue,
        next_connection: AtomicU64::new(1),
        documents: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
    });
    serve(listener, hub).await
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(run(args))
}
