//! The WebSocket edge, `/v1/ws` (subprotocol `vibe.v1`, JSON text frames): the upgrade, and per
//! connection one task — the connection actor. Its mailbox is the connection's bounded outbox
//! (replies and live-query events, already encoded) plus the socket; its state is the session
//! (connection.rs). In one loop it
//!
//! - takes everything queued in the outbox at once and writes it in as few writes as fit
//!   `WRITE_CHUNK`; closes the socket if the outbox overflowed (4008) or the server is stopping
//!   (1001); when the outbox's alarm rang (a revocation named the token), checks the token and
//!   closes (4003) if it was revoked;
//! - reads the next message, answers what needs no session (pings, binary, oversized, over the
//!   rate), and runs each request to completion before taking another: a client cannot queue
//!   unbounded work, and outbound frames keep flowing while a request waits on the database.
//!
//! Memory is designed for many idle connections: the framing (frame.rs) holds no read buffer
//! between messages, a write buffer lives for one batch, the outbox holds nothing until a frame is
//! queued, and a write arms a timer only when the socket is full.
//!
//! It is a task, not a ractor actor: it never crosses nodes and ends with its socket, and a
//! ractor actor (its own task and four channels) would more than double a connection's memory.
//!
//! Invariant: only this task writes to its socket (pongs and closes included).

pub mod connection;
pub mod frame;
pub mod limits;

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use vibe_actors::outbox::{Outbox, OutboxReceiver, QueueLimit, Received, outbox};

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

/// Bytes taken off the socket per read (on the stack, for the read only).
const READ_CHUNK: usize = 8192;
/// Bytes per write at most: a batch of queued frames is encoded into a buffer of about this size
/// (or one frame, if larger), written, and the buffer reused for the rest of the batch only.
const WRITE_CHUNK: usize = 64 * 1024;
/// Pongs owed to the client beyond this are not queued (a pinging client must also read).
const MAX_OWED_CONTROL: usize = 4096;
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
    let config = &app.config.ws;
    let limit = QueueLimit {
        frames: config.outbound_queue,
        bytes: config.outbound_queue_bytes,
    };
    let queue = outbox(app.next_connection_id(), limit);
    // A token given with the upgrade is checked before upgrading, so a bad one gets a plain 401.
    let identity = match &token {
        Some(t) => Some(connection::identify(&app, t, &queue.0)?),
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
            // fastwebsockets did the handshake; the framing is ours (frame.rs).
            Ok(ws) => run(app, ws.into_inner(), queue, identity).await,
            Err(e) => tracing::debug!(error = %e, "WebSocket upgrade did not complete"),
        }
    });
    Ok(response)
}

type Io = TokioIo<hyper::upgrade::Upgraded>;
type RequestFuture = Pin<Box<dyn Future<Output = Session> + Send>>;

/// Why the connection loop ended.
enum End {
    /// The client went away (or a write failed): nothing more can be said.
    Client,
    /// The client sent a close frame: echo its code.
    ClientClosed(Option<u16>),
    /// We close it with this code and reason.
    Close(u16, &'static [u8]),
    /// The client broke the framing rules.
    Protocol(frame::FrameError),
}

/// The connection's loop, on its outbox (made at the upgrade, so a token given with it could
/// watch for its revocation through the outbox's alarm from the start).
async fn run(
    app: Arc<App>,
    mut io: Io,
    (outbox, mut receiver): (Outbox, OutboxReceiver),
    identity: Option<connection::Identity>,
) {
    let config = &app.config.ws;
    // The transport refuses messages past 4x the frame limit (and closes with 1009); between the
    // limit and that, the loop answers `frame_too_large` and the connection lives on.
    let mut inbound = frame::Inbound::new(config.max_frame_bytes.saturating_mul(4).max(64 * 1024));
    // Frames taken from the outbox and being written; swapped with the outbox's own queue.
    let mut batch = VecDeque::new();
    // Pongs owed to the client, encoded; written before anything else.
    let mut owed = Vec::new();
    let mut session = Some(Session::new(app.clone(), outbox.clone(), identity));
    let mut handling: Option<RequestFuture> = None;
    let mut bucket = limits::TokenBucket::new(config.requests_per_second, Instant::now());
    let auth_deadline = tokio::time::Instant::now() + config.auth_timeout;
    let mut shutdown = app.shutdown_signal();
    // Created once: each creation would register a waiter (the shutdown channel is shared by
    // every connection, so that would be a contended lock per event).
    let shutting_down = shutdown.changed();
    // Reset (not recreated) when the identity changes: a timer per loop turn would cost a
    // registration per outbound frame.
    let mut expiry: Option<SystemTime> = None;
    let token_expired = tokio::time::sleep_until(auth_deadline);
    // Armed only while the token is attenuated.
    let mut rechecking = false;
    let attenuation_due = tokio::time::sleep_until(auth_deadline);
    tokio::pin!(shutting_down, token_expired, attenuation_due);
    // Set when the outbox's alarm rang: a revocation named this connection's token or grant.
    let mut recheck_token = false;
    metrics::gauge!("vibe_ws_connections").increment(1.0);

    let end: End = async {
        loop {
            if !owed.is_empty() {
                if let Err(end) = write_all(&mut io, &owed).await {
                    return end;
                }
                owed = Vec::new();
            }
            // One request at a time: the next message is taken only when none is being handled.
            // A message already buffered is taken before the socket is read again.
            if handling.is_none() {
                match inbound.next_message() {
                    Ok(Some(message)) => {
                        match message {
                            frame::Message::Text(text) => {
                                if let Some(s) = admit(&app, &outbox, &mut bucket, &mut session, &text) {
                                    handling = Some(Box::pin(async move {
                                        let mut s = s;
                                        s.request(&text).await;
                                        s
                                    }));
                                }
                            }
                            frame::Message::Binary(_) => {
                                let _ = outbox.send(error_frame(&serde_json::Value::Null, "binary_not_supported", "send JSON text frames"));
                            }
                            frame::Message::Ping(payload) => {
                                // A client pinging faster than it reads gets one pong per turn.
                                if owed.len() < MAX_OWED_CONTROL {
                                    frame::encode_pong(&mut owed, &payload);
                                }
                            }
                            frame::Message::Close(code) => return End::ClientClosed(code),
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => return End::Protocol(e),
                }
            }
            if recheck_token && let Some(s) = &session {
                recheck_token = false;
                if s.token_revoked() {
                    return End::Close(CLOSE_TOKEN_REVOKED, b"token revoked: access was withdrawn");
                }
            }
            let authenticated = session.as_ref().is_none_or(Session::is_authenticated);
            if let Some(s) = &session
                && s.attenuated() != rechecking
            {
                rechecking = s.attenuated();
                attenuation_due
                    .as_mut()
                    .reset(tokio::time::Instant::now() + config.attenuation_recheck);
            }
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
                _ = &mut shutting_down => return End::Close(CLOSE_GOING_AWAY, b"server shutting down"),
                () = tokio::time::sleep_until(auth_deadline), if !authenticated => {
                    return End::Close(CLOSE_AUTH_TIMEOUT, b"authenticate within the auth timeout");
                }
                () = &mut token_expired, if expiry.is_some() => {
                    return End::Close(CLOSE_TOKEN_EXPIRED, b"token expired: reconnect with a fresh token and resume with since");
                }
                () = &mut attenuation_due, if rechecking && session.is_some() => {
                    if let Some(s) = session.as_mut() {
                        s.end_unpermitted_subscriptions();
                    }
                    attenuation_due
                        .as_mut()
                        .reset(tokio::time::Instant::now() + config.attenuation_recheck);
                }
                done = next_of(&mut handling), if handling.is_some() => {
                    handling = None;
                    session = Some(done);
                }
                read = poll_fn(|cx| poll_read_into(Pin::new(&mut io), cx, &mut inbound)), if handling.is_none() => {
                    match read {
                        Ok(0) => return End::Client,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "WebSocket read ended");
                            return End::Client;
                        }
                    }
                }
                // Last in the biased order: a busy outbox must not starve a running request
                // (it may hold a row lock) or the reader.
                received = receiver.recv(&mut batch) => match received {
                    Received::Overflowed => {
                        return End::Close(CLOSE_OVERFLOW, b"outbound queue overflow: reconnect and resume with since");
                    }
                    // Checked at the top of the loop, once the session is not held by a request.
                    Received::Alerted => recheck_token = true,
                    Received::Frames => {
                        if let Err(end) = write_batch(&mut io, &mut batch).await {
                            return end;
                        }
                    }
                },
            }
        }
    }
    .await;
    // Last words, each bounded in time: our close frame, or the echo of the client's.
    let last = match &end {
        End::Close(code, reason) => Some((*code, *reason)),
        End::ClientClosed(code) => Some((frame::echoed_close_code(*code), &b""[..])),
        End::Protocol(e) => {
            tracing::debug!(error = %e, "WebSocket protocol error");
            Some((e.close_code(), &b"protocol error"[..]))
        }
        End::Client => None,
    };
    if let Some((code, reason)) = last {
        let mut bytes = Vec::new();
        frame::encode_close(&mut bytes, code, reason);
        let _ = tokio::time::timeout(Duration::from_secs(1), io.write_all(&bytes)).await;
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

/// Applies the checks a text message passes before it reaches the session (size, rate) and hands
/// the session over for it; `None` when it was answered here (or a request is running).
fn admit(
    app: &App,
    outbox: &Outbox,
    bucket: &mut limits::TokenBucket,
    session: &mut Option<Session>,
    text: &[u8],
) -> Option<Session> {
    let config = &app.config.ws;
    if text.len() > config.max_frame_bytes {
        let _ = outbox.send(error_frame(
            &serde_json::Value::Null,
            "frame_too_large",
            &format!("frames are limited to {} bytes", config.max_frame_bytes),
        ));
        return None;
    }
    if !bucket.allow(Instant::now()) {
        let _ = outbox.send(error_frame(
            &serde_json::Value::Null,
            "rate_limited",
            &format!(
                "at most {} requests per second; retry in {:?}",
                config.requests_per_second,
                bucket.retry_after()
            ),
        ));
        return None;
    }
    session.take()
}

/// Reads what the socket holds (one chunk at most) into `inbound`; the number of bytes, 0 at the
/// end of the stream. The chunk lives on the stack for this call only, so an idle connection
/// waiting here holds no read buffer.
fn poll_read_into(
    io: Pin<&mut Io>,
    cx: &mut Context<'_>,
    inbound: &mut frame::Inbound,
) -> Poll<std::io::Result<usize>> {
    let mut chunk = [const { MaybeUninit::<u8>::uninit() }; READ_CHUNK];
    let mut buf = ReadBuf::uninit(&mut chunk);
    ready!(io.poll_read(cx, &mut buf))?;
    inbound.extend(buf.filled());
    Poll::Ready(Ok(buf.filled().len()))
}

/// Writes every frame of `batch` (emptying it), a chunk of up to `WRITE_CHUNK` bytes at a time,
/// through a buffer that lives for this batch only.
async fn write_batch(io: &mut Io, batch: &mut VecDeque<Bytes>) -> Result<(), End> {
    let mut out = Vec::new();
    while !batch.is_empty() {
        let mut size = 0;
        let take = batch
            .iter()
            .take_while(|f| {
                let fits = size == 0 || size + frame::encoded_len(f.len()) <= WRITE_CHUNK;
                size += frame::encoded_len(f.len());
                fits
            })
            .count();
        out.clear();
        out.reserve(size.min(WRITE_CHUNK.max(frame::encoded_len(batch[0].len()))));
        for f in batch.drain(..take) {
            frame::encode_text(&mut out, &f);
        }
        write_all(io, &out).await?;
    }
    Ok(())
}

/// Writes all of `bytes`. The first attempt needs no timer (a healthy client's socket takes it at
/// once); only a write that has to wait is bounded by `WRITE_TIMEOUT`, past which the client is
/// taken to have stopped reading and is dropped, so the loop never stops watching overflow,
/// shutdown and its session.
async fn write_all(io: &mut Io, bytes: &[u8]) -> Result<(), End> {
    let mut written = 0;
    while written < bytes.len() {
        let attempt =
            poll_fn(|cx| Poll::Ready(Pin::new(&mut *io).poll_write(cx, &bytes[written..]))).await;
        match attempt {
            Poll::Ready(Ok(0)) => return Err(End::Client),
            Poll::Ready(Ok(n)) => written += n,
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "WebSocket write ended");
                return Err(End::Client);
            }
            Poll::Pending => {
                return match tokio::time::timeout(WRITE_TIMEOUT, io.write_all(&bytes[written..]))
                    .await
                {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "WebSocket write ended");
                        Err(End::Client)
                    }
                    Err(_) => {
                        tracing::debug!("WebSocket write stalled: the client stopped reading");
                        Err(End::Client)
                    }
                };
            }
        }
    }
    Ok(())
}

/// The output of the future in `slot` (pending forever when there is none: select! evaluates a
/// disabled branch's future, it just does not poll it).
async fn next_of<T>(slot: &mut Option<Pin<Box<dyn Future<Output = T> + Send>>>) -> T {
    match slot {
        Some(future) => future.as_mut().await,
        None => std::future::pending().await,
    }
}
