//! The WebSocket edge, `/v1/ws` (subprotocol `vibe.v1`, JSON text frames): the upgrade, and per
//! connection one task — the connection actor. Its mailbox is the connection's bounded outbox
//! (replies and live-query events, already encoded) plus the socket; its state is the session
//! (connection.rs). In one loop it
//!
//! - drains the outbox, writing every frame that is ready and flushing once per batch; closes the
//!   socket if the outbox overflowed (4008) or the server is stopping (1001);
//! - reads the next frame, answers what needs no session (binary, oversized, over the rate),
//!   and runs each request to completion before reading another: a client cannot queue
//!   unbounded work, and outbound frames keep flowing while a request waits on the database.
//!
//! It is a task, not a ractor actor: it never crosses nodes and ends with its socket, and a
//! ractor actor (its own task and four channels) would more than double a connection's memory.
//!
//! Invariant: only this task writes to its socket (pongs and closes included).

pub mod connection;
pub mod limits;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use vibe_actors::outbox::{OutboxReceiver, outbox};

use crate::app::App;
use crate::http::{ApiError, HttpResponse};
use connection::{Session, error_frame};

/// The protocol this server speaks.
pub const SUBPROTOCOL: &str = "vibe.v1";

/// Close codes (4000–4999 are the application's).
pub const CLOSE_OVERFLOW: u16 = 4008;
pub const CLOSE_AUTH_TIMEOUT: u16 = 4001;
/// The token the connection authenticated with expired (a fresh `auth` before then extends it).
pub const CLOSE_TOKEN_EXPIRED: u16 = 4002;
/// The token was revoked (consent withdrawn, app deleted, token or grant revoked).
pub const CLOSE_TOKEN_REVOKED: u16 = 4003;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_TOO_BIG: u16 = 1009;

/// Frames written per flush at most, so one busy connection cannot hog its writer's buffer.
const WRITE_BATCH: usize = 256;
/// Bytes buffered per connection before a write reaches the socket (larger frames bypass it).
const WRITE_BUFFER: usize = 4096;
/// A write to a client that does not read blocks; past this the connection is dropped, so the
/// loop never stops watching overflow, shutdown and its session.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers the upgrade request and starts the connection.
pub fn upgrade(app: Arc<App>, mut req: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint speaks WebSocket (subprotocol vibe.v1)",
        ));
    }
    // Browsers cannot set headers: the token may ride as a second subprotocol value.
    let offered: Vec<String> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_owned()))
        .filter(|p| !p.is_empty())
        .collect();
    if !offered.is_empty() && !offered.iter().any(|p| p == SUBPROTOCOL) {
        return Err(ApiError::bad_request(
            "unsupported_protocol",
            "offer the subprotocol vibe.v1",
        ));
    }
    let token = offered
        .iter()
        .find(|p| *p != SUBPROTOCOL)
        .cloned()
        .or_else(|| {
            req.headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(|t| t.trim().to_owned())
        });
    // A token given with the upgrade is checked before upgrading, so a bad one gets a plain 401.
    let identity = match &token {
        Some(t) => Some(connection::identify(&app, t)?),
        None => None,
    };
    let (response, upgraded) = fastwebsockets::upgrade::upgrade(&mut req).map_err(|e| {
        ApiError::bad_request("bad_upgrade", format!("invalid WebSocket upgrade: {e}"))
    })?;
    let (parts, _) = response.into_parts();
    let mut response = hyper::Response::from_parts(parts, Full::new(Bytes::new()));
    if !offered.is_empty() {
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    let Some(open) = app.open_socket() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the server is shutting down",
        ));
    };
    tokio::spawn(async move {
        // Held until the connection ends: shutdown waits for every socket to close.
        let _open = open;
        match upgraded.await {
            Ok(ws) => run(app, ws, identity).await,
            Err(e) => tracing::debug!(error = %e, "WebSocket upgrade did not complete"),
        }
    });
    Ok(response)
}

type Upgraded = TokioIo<hyper::upgrade::Upgraded>;
type Reader = fastwebsockets::WebSocketRead<tokio::io::ReadHalf<Upgraded>>;

/// A frame read off the socket, owned.
struct Inbound {
    opcode: OpCode,
    payload: Vec<u8>,
}

type ReadFuture = Pin<Box<dyn Future<Output = (Reader, Result<Inbound, WebSocketError>)> + Send>>;
type RequestFuture = Pin<Box<dyn Future<Output = Session> + Send>>;

/// Why the connection loop ended.
enum End {
    /// The client went away or broke the protocol.
    Client,
    /// The client sent a close frame: echo it (the reply is queued on the control channel).
    ClientClosed,
    /// We close it with this code and reason.
    Close(u16, &'static [u8]),
    /// A write did not complete within `WRITE_TIMEOUT`: the client stopped reading.
    Stalled,
}

async fn run(
    app: Arc<App>,
    ws: fastwebsockets::WebSocket<Upgraded>,
    identity: Option<connection::Identity>,
) {
    let config = &app.config.ws;
    let mut ws = ws;
    // The transport refuses frames past 4x the limit (and closes); between the limit and that,
    // the loop answers `frame_too_large` and the connection lives on.
    ws.set_max_message_size(config.max_frame_bytes.saturating_mul(4).max(64 * 1024));
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    // Frames go through a small buffer and reach the socket once per flushed batch.
    let (read, mut write) = ws.split(|io| {
        let (r, w) = tokio::io::split(io);
        (r, tokio::io::BufWriter::with_capacity(WRITE_BUFFER, w))
    });
    let (outbox, receiver) = outbox(app.next_connection_id(), config.outbound_queue);
    let OutboxReceiver { mut rx, overflow } = receiver;
    // Pongs and close replies the reader owes.
    let (control_tx, mut control_rx) = mpsc::channel::<Frame<'static>>(8);
    let mut session = Some(Session::new(app.clone(), outbox.clone(), identity));
    let mut reader = Some(read);
    // A whole message (its fragments together) may not exceed what one frame may.
    let message_cap = config.max_frame_bytes.saturating_mul(4).max(64 * 1024);
    let mut reading: Option<ReadFuture> = None;
    let mut handling: Option<RequestFuture> = None;
    let mut bucket = limits::TokenBucket::new(config.requests_per_second, Instant::now());
    let auth_deadline = tokio::time::Instant::now() + config.auth_timeout;
    let mut shutdown = app.shutdown_signal();
    // Created once: each creation would register a waiter (the shutdown channel is shared by
    // every connection, so that would be a contended lock per event).
    let overflowed = overflow.wait();
    let shutting_down = shutdown.changed();
    // Reset (not recreated) when the identity changes: a timer per loop turn would cost a
    // registration per outbound frame.
    let mut expiry: Option<SystemTime> = None;
    let token_expired = tokio::time::sleep_until(auth_deadline);
    tokio::pin!(overflowed, shutting_down, token_expired);
    // Revocations are rare: one boxed wait per connection, re-armed only when one happens.
    let mut revocation = wait_for_revocation(app.tokens.revocations().changed());
    let mut recheck_token = false;
    metrics::gauge!("vibe_ws_connections").increment(1.0);

    let end: Result<End, WebSocketError> = async {
        loop {
            // One request at a time: read the next frame only when none is being handled.
            if handling.is_none()
                && reading.is_none()
                && let Some(r) = reader.take()
            {
                reading = Some(Box::pin(read_one(r, control_tx.clone(), message_cap)));
            }
            if recheck_token && let Some(s) = &session {
                recheck_token = false;
                if s.token_revoked() {
                    return Ok(End::Close(CLOSE_TOKEN_REVOKED, b"token revoked: access was withdrawn"));
                }
            }
            let authenticated = session.as_ref().is_none_or(Session::is_authenticated);
            if let Some(s) = &session
                && s.expires_at() != expiry
            {
                expiry = s.expires_at();
                if let Some(at) = expiry {
                    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                    token_expired.as_mut().reset(tokio::time::Instant::now() + left);
                }
            }
            tokio::select! {
                biased;
                Some(frame) = control_rx.recv() => {
                    let close = frame.opcode == OpCode::Close;
                    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
                        write.write_frame(frame).await?;
                        write.flush().await
                    })
                    .await;
                    match written {
                        Ok(result) => result?,
                        Err(_) => return Ok(End::Stalled),
                    }
                    if close {
                        return Ok(End::Client);
                    }
                }
                () = &mut overflowed => {
                    return Ok(End::Close(CLOSE_OVERFLOW, b"outbound queue overflow: reconnect and resume with since"));
                }
                _ = &mut shutting_down => return Ok(End::Close(CLOSE_GOING_AWAY, b"server shutting down")),
                () = tokio::time::sleep_until(auth_deadline), if !authenticated => {
                    return Ok(End::Close(CLOSE_AUTH_TIMEOUT, b"authenticate within the auth timeout"));
                }
                () = &mut token_expired, if expiry.is_some() => {
                    return Ok(End::Close(CLOSE_TOKEN_EXPIRED, b"token expired: reconnect with a fresh token and resume with since"));
                }
                changes = &mut revocation => {
                    revocation = wait_for_revocation(changes);
                    recheck_token = true;
                }
                done = next_of(&mut handling), if handling.is_some() => {
                    handling = None;
                    session = Some(done);
                }
                read = next_of(&mut reading), if reading.is_some() => {
                    reading = None;
                    let (r, frame) = read;
                    reader = Some(r);
                    let frame = match frame {
                        Ok(frame) => frame,
                        Err(WebSocketError::FrameTooLarge) => return Ok(End::Close(CLOSE_TOO_BIG, b"frame too large")),
                        Err(e) => {
                            tracing::debug!(error = %e, "WebSocket read ended");
                            return Ok(End::Client);
                        }
                    };
                    match frame.opcode {
                        OpCode::Close => return Ok(End::ClientClosed),
                        OpCode::Text => {}
                        OpCode::Binary => {
                            let _ = outbox.send(error_frame(&serde_json::Value::Null, "binary_not_supported", "send JSON text frames"));
                            continue;
                        }
                        _ => continue,
                    }
                    if frame.payload.len() > config.max_frame_bytes {
                        let _ = outbox.send(error_frame(
                            &serde_json::Value::Null,
                            "frame_too_large",
                            &format!("frames are limited to {} bytes", config.max_frame_bytes),
                        ));
                        continue;
                    }
                    if !bucket.allow(Instant::now()) {
                        let _ = outbox.send(error_frame(
                            &serde_json::Value::Null,
                            "rate_limited",
                            &format!("at most {} requests per second; retry in {:?}", config.requests_per_second, bucket.retry_after()),
                        ));
                        continue;
                    }
                    if let Some(mut s) = session.take() {
                        let text = frame.payload;
                        handling = Some(Box::pin(async move {
                            s.request(&text).await;
                            s
                        }));
                    }
                }
                // Last in the biased order: a busy outbox must not starve a running request
                // (it may hold a row lock) or the reader.
                frame = rx.recv() => {
                    // Never None: this loop holds an Outbox itself.
                    let Some(frame) = frame else { return Ok(End::Client) };
                    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
                        write.write_frame(Frame::text(Payload::Borrowed(&frame))).await?;
                        for _ in 1..WRITE_BATCH {
                            match rx.try_recv() {
                                Ok(frame) => write.write_frame(Frame::text(Payload::Borrowed(&frame))).await?,
                                Err(_) => break,
                            }
                        }
                        write.flush().await
                    })
                    .await;
                    match written {
                        Ok(result) => result?,
                        Err(_) => return Ok(End::Stalled),
                    }
                }
            }
        }
    }
    .await;
    // Last words, each bounded in time: our close frame, or the echo of the client's.
    let last = match end {
        Ok(End::Close(code, reason)) => Some(Frame::close(code, reason)),
        Ok(End::ClientClosed) => control_rx.try_recv().ok(),
        Ok(End::Client | End::Stalled) => None,
        Err(e) => {
            tracing::debug!(error = %e, "WebSocket write ended");
            None
        }
    };
    if let Some(frame) = last {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            write.write_frame(frame).await?;
            write.flush().await
        })
        .await;
    }
    // A request still running finishes first, so its subscription (if any) is released too.
    if let Some(pending) = handling.take() {
        session = Some(pending.await);
    }
    if let Some(mut s) = session {
        s.close();
    }
    metrics::gauge!("vibe_ws_connections").decrement(1.0);
}

/// Resolves (handing the receiver back) when the revocation list next grows; pending forever if
/// the list's sender is gone.
fn wait_for_revocation(
    mut changes: tokio::sync::watch::Receiver<u64>,
) -> Pin<Box<dyn Future<Output = tokio::sync::watch::Receiver<u64>> + Send>> {
    Box::pin(async move {
        if changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        changes
    })
}

/// The output of the future in `slot` (pending forever when there is none: select! evaluates a
/// disabled branch's future, it just does not poll it).
async fn next_of<T>(slot: &mut Option<Pin<Box<dyn Future<Output = T> + Send>>>) -> T {
    match slot {
        Some(future) => future.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Reads one message (reassembling fragments up to `cap` bytes in all), handing pongs and close
/// replies owed to the peer to `control`. Pings and pongs are consumed here.
async fn read_one(
    mut reader: Reader,
    control: mpsc::Sender<Frame<'static>>,
    cap: usize,
) -> (Reader, Result<Inbound, WebSocketError>) {
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
    let mut message: Option<Inbound> = None;
    let result = loop {
        let frame = match reader.read_frame(&mut send_control).await {
            Ok(frame) => frame,
            Err(e) => break Err(e),
        };
        match frame.opcode {
            OpCode::Ping | OpCode::Pong => continue,
            OpCode::Close => {
                break Ok(Inbound {
                    opcode: OpCode::Close,
                    payload: Vec::new(),
                });
            }
            OpCode::Continuation => {
                let Some(partial) = message.as_mut() else {
                    break Err(WebSocketError::InvalidContinuationFrame);
                };
                if partial.payload.len() + frame.payload.len() > cap {
                    break Err(WebSocketError::FrameTooLarge);
                }
                partial.payload.extend_from_slice(&frame.payload);
            }
            opcode => {
                if message.is_some() {
                    break Err(WebSocketError::InvalidFragment);
                }
                message = Some(Inbound {
                    opcode,
                    payload: frame.payload.to_vec(),
                });
            }
        }
        if frame.fin
            && let Some(done) = message.take()
        {
            break Ok(done);
        }
    };
    (reader, result)
}
