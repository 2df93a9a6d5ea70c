//! The WebSocket edge, `/v1/ws` (subprotocol `vibe.v1`, JSON text frames): the upgrade, and per
//! connection one task — the connection actor. Its mailbox is the connection's bounded outbox
//! (replies and live-query events, already encoded) plus the socket; its state is the session
//! (connection.rs). In one loop it
//!
//! - takes everything queued in the outbox at once and writes it in as few writes as fit
//!   `WRITE_CHUNK`, once what it took before is written; closes the socket if the outbox
//!   overflowed (4008) or the server is stopping (1001); when the outbox's alarm rang (a
//!   revocation named the token), checks the token and closes (4003) if it was revoked;
//! - reads the next message, answers what needs no session (pings, binary, oversized, over the
//!   rate), and runs each request to completion before taking another: a client cannot queue
//!   unbounded work, and outbound frames keep flowing while a request waits on the database.
//!
//! A write the socket cannot take at once waits in the same `select!` as everything else, never
//! in place of it: a client that reads slowly does not hold up its own request (which may hold a
//! row lock and a database connection), its token's expiry or revocation, or shutdown. One that
//! takes nothing for `ws.write_timeout` is dropped; one that reads slowly but steadily overflows.
//!
//! Memory is designed for many idle connections: the framing (frame.rs) holds no read buffer
//! between messages, a write buffer holds one chunk and is dropped once everything is written,
//! the outbox holds nothing until a frame is queued, and a write arms a timer only when the
//! socket is full.
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
/// Chunks written per turn of the loop at most, before the request, the reader and the timers
/// get their turn.
const WRITES_PER_TURN: usize = 16;

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
                .and_then(|v| crate::http::credentials(v, "Bearer"))
                .map(str::to_owned)
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
    // Frames taken from the outbox and not yet encoded; swapped with the outbox's own queue.
    let mut batch = VecDeque::new();
    // Pongs owed to the client, encoded; written at the next frame boundary.
    let mut owed = Vec::new();
    // Encoded bytes on their way to the socket.
    let mut out = Outgoing::default();
    // Whether bytes wait for the socket beyond this turn (it refused them, or the turn's budget
    // ran out): then the write waits in the select below, and the stall timer runs (armed only
    // then, so a healthy client's writes cost no timer).
    let mut write_waiting = false;
    let mut session = Some(Session::new(app.clone(), outbox.clone(), identity));
    let mut handling: Option<RequestFuture> = None;
    let mut bucket = limits::TokenBucket::new(config.requests_per_second, Instant::now());
    let auth_deadline = tokio::time::Instant::now() + config.auth_timeout;
    let write_stall = tokio::time::sleep_until(auth_deadline);
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
    tokio::pin!(shutting_down, token_expired, attenuation_due, write_stall);
    // Set when the outbox's alarm rang: a revocation named this connection's token or grant.
    let mut recheck_token = false;
    metrics::gauge!("vibe_ws_connections").increment(1.0);

    let end: End = async {
        loop {
            // What the socket takes now is written now, up to a budget per turn, so that a fast
            // reader of a long backlog still lets the request and the timers below run.
            if !write_waiting {
                for _ in 0..WRITES_PER_TURN {
                    if out.is_done() && !out.refill(&mut owed, &mut batch) {
                        break;
                    }
                    let attempt = poll_fn(|cx| Poll::Ready(Pin::new(&mut io).poll_write(cx, out.pending()))).await;
                    match attempt {
                        Poll::Ready(wrote) => {
                            if let Err(end) = out.advance(wrote) {
                                return end;
                            }
                        }
                        Poll::Pending => break,
                    }
                }
                if out.is_done() {
                    out.refill(&mut owed, &mut batch);
                }
                if !out.is_done() {
                    write_waiting = true;
                    write_stall.as_mut().reset(tokio::time::Instant::now() + config.write_timeout);
                }
            }
            // Everything taken from the outbox is written: frames are taken only then.
            let writer_idle = out.is_done();
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
            // One request at a time: the socket is read only when none is being handled.
            let reading = handling.is_none();
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
                        s.end_unpermitted();
                    }
                    attenuation_due
                        .as_mut()
                        .reset(tokio::time::Instant::now() + config.attenuation_recheck);
                }
                done = next_of(&mut handling), if handling.is_some() => {
                    handling = None;
                    session = Some(done);
                }
                // A blocked write is waited for here, beside everything else: a client that
                // reads slowly must not hold up its own request (which may hold a row lock and
                // a database connection), the timers or shutdown.
                event = poll_fn(|cx| poll_socket(Pin::new(&mut io), cx, (!writer_idle).then(|| out.pending()), reading.then_some(&mut inbound))), if reading || !writer_idle => {
                    match event {
                        Socket::Wrote(wrote) => {
                            if let Err(end) = out.advance(wrote) {
                                return end;
                            }
                            write_waiting = false;
                        }
                        Socket::Read(Ok(0)) => return End::Client,
                        Socket::Read(Ok(_)) => {}
                        Socket::Read(Err(e)) => {
                            tracing::debug!(error = %e, "WebSocket read ended");
                            return End::Client;
                        }
                    }
                }
                () = &mut write_stall, if write_waiting => {
                    tracing::debug!("WebSocket write stalled: the client stopped reading");
                    return End::Client;
                }
                // Last in the biased order: a busy outbox must not starve a running request
                // (it may hold a row lock) or the reader. While frames are still being written,
                // the alarm is watched for all the same; an overflow is acted on once they are
                // (the client learns of it, 4008, after what it was sent before).
                received = poll_fn(|cx| if writer_idle {
                    receiver.poll_recv(cx, &mut batch)
                } else {
                    receiver.poll_signal(cx)
                }) => match received {
                    Received::Overflowed => {
                        return End::Close(CLOSE_OVERFLOW, b"outbound queue overflow: reconnect and resume with since");
                    }
                    // Checked at the top of the loop, once the session is not held by a request.
                    Received::Alerted => recheck_token = true,
                    Received::Frames => {}
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
        // A frame partly written is finished first: the close frame must start at a boundary.
        let mut bytes = if out.is_started() {
            out.pending().to_vec()
        } else {
            Vec::new()
        };
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
            &refused_request_id(text),
            "frame_too_large",
            &format!("frames are limited to {} bytes", config.max_frame_bytes),
        ));
        return None;
    }
    if !bucket.allow(Instant::now()) {
        let _ = outbox.send(error_frame(
            &refused_request_id(text),
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

/// The largest refused frame whose `id` is looked for.
const REFUSED_ID_MAX_BYTES: usize = 64 * 1024;

/// The `id` of a request refused before the session reads it (too large, over the rate), so
/// that its reply names it like any other and the client's pending request is settled: a string
/// or a number at the top level, otherwise (not JSON, no or another kind of `id`) `null`. The
/// other fields are skipped unread.
fn refused_request_id(text: &[u8]) -> serde_json::Value {
    // Read only a frame small enough for the look to cost little: the refusal exists to spare
    // the server a client's excess.
    if text.len() > REFUSED_ID_MAX_BYTES {
        return serde_json::Value::Null;
    }
    #[derive(serde::Deserialize)]
    struct IdOnly {
        #[serde(default)]
        id: serde_json::Value,
    }
    match serde_json::from_slice::<IdOnly>(text) {
        Ok(IdOnly {
            id: id @ (serde_json::Value::String(_) | serde_json::Value::Number(_)),
        }) => id,
        _ => serde_json::Value::Null,
    }
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

/// Encoded bytes on their way to the socket: one chunk at a time (owed pongs, or up to
/// `WRITE_CHUNK` bytes of queued frames), so frames never interleave and a pong waits only for
/// the chunk being written. The buffer is dropped when nothing is left, so an idle connection
/// holds none.
#[derive(Default)]
struct Outgoing {
    buf: Vec<u8>,
    written: usize,
}

impl Outgoing {
    fn is_done(&self) -> bool {
        self.written >= self.buf.len()
    }

    /// Some of the chunk is on the wire and some is not.
    fn is_started(&self) -> bool {
        self.written > 0 && !self.is_done()
    }

    fn pending(&self) -> &[u8] {
        self.buf.get(self.written..).unwrap_or_default()
    }

    /// Counts what a write took; a failed write, or one that took nothing, ends the connection.
    fn advance(&mut self, wrote: std::io::Result<usize>) -> Result<(), End> {
        match wrote {
            Ok(0) => Err(End::Client),
            Ok(n) => {
                self.written += n;
                Ok(())
            }
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket write ended");
                Err(End::Client)
            }
        }
    }

    /// The next chunk, once this one is written: the owed pongs, else frames from `batch`.
    /// False when there is nothing more to write.
    fn refill(&mut self, owed: &mut Vec<u8>, batch: &mut VecDeque<Bytes>) -> bool {
        self.written = 0;
        if !owed.is_empty() {
            self.buf = std::mem::take(owed);
            return true;
        }
        let Some(first) = batch.front() else {
            self.buf = Vec::new();
            return false;
        };
        let mut size = 0;
        let first_len = frame::encoded_len(first.len());
        let take = batch
            .iter()
            .take_while(|f| {
                let fits = size == 0 || size + frame::encoded_len(f.len()) <= WRITE_CHUNK;
                size += frame::encoded_len(f.len());
                fits
            })
            .count();
        self.buf.clear();
        self.buf.reserve(size.min(WRITE_CHUNK.max(first_len)));
        for f in batch.drain(..take) {
            frame::encode_text(&mut self.buf, &f);
        }
        true
    }
}

/// What the socket did.
enum Socket {
    Wrote(std::io::Result<usize>),
    Read(std::io::Result<usize>),
}

/// Writes `pending` and reads into `inbound`, each when given; whichever the socket is ready for
/// first. One future for both, as both need the socket.
fn poll_socket(
    mut io: Pin<&mut Io>,
    cx: &mut Context<'_>,
    pending: Option<&[u8]>,
    inbound: Option<&mut frame::Inbound>,
) -> Poll<Socket> {
    if let Some(bytes) = pending
        && let Poll::Ready(wrote) = io.as_mut().poll_write(cx, bytes)
    {
        return Poll::Ready(Socket::Wrote(wrote));
    }
    if let Some(inbound) = inbound
        && let Poll::Ready(read) = poll_read_into(io, cx, inbound)
    {
        return Poll::Ready(Socket::Read(read));
    }
    Poll::Pending
}

/// The output of the future in `slot` (pending forever when there is none: select! evaluates a
/// disabled branch's future, it just does not poll it).
async fn next_of<T>(slot: &mut Option<Pin<Box<dyn Future<Output = T> + Send>>>) -> T {
    match slot {
        Some(future) => future.as_mut().await,
        None => std::future::pending().await,
    }
}
