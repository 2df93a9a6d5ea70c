//! The WebSocket edge, `/v1/ws` (subprotocol `vibe.v1`, JSON text frames): the upgrade, and per
//! connection one reader task, one writer task and one connection actor.
//!
//! - The **writer** owns the socket's write half and drains the connection's bounded outbox
//!   (frames from the connection actor and from live queries), writing every frame that is ready
//!   and flushing once per batch. If the outbox overflows it closes the socket (4008).
//! - The **reader** reads frames, answers what needs no state (binary frames, oversized frames,
//!   rate limit) and hands each text frame to the connection actor, one at a time: a client
//!   cannot queue unbounded work.
//! - The **connection actor** (connection.rs) holds the session: identity, subscriptions.
//!
//! Invariant: only the writer task writes to the socket (pongs and closes included).

pub mod connection;
pub mod limits;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use ractor::Actor;
use tokio::sync::mpsc;
use vibe_actors::outbox::{OutboxReceiver, outbox};

use crate::app::App;
use crate::http::{ApiError, HttpResponse};
use connection::{Connection, ConnectionArgs, ConnectionMsg, error_frame};

/// The protocol this server speaks.
pub const SUBPROTOCOL: &str = "vibe.v1";

/// Close codes (4000–4999 are the application's).
pub const CLOSE_OVERFLOW: u16 = 4008;
pub const CLOSE_AUTH_TIMEOUT: u16 = 4001;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_TOO_BIG: u16 = 1009;

/// Frames written per flush at most, so one busy connection cannot hog its writer's buffer.
const WRITE_BATCH: usize = 256;
/// Bytes buffered per connection before a write reaches the socket (larger frames bypass it).
const WRITE_BUFFER: usize = 4096;

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
    tokio::spawn(async move {
        match upgraded.await {
            Ok(ws) => run(app, ws, identity).await,
            Err(e) => tracing::debug!(error = %e, "WebSocket upgrade did not complete"),
        }
    });
    Ok(response)
}

type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

async fn run(
    app: Arc<App>,
    ws: fastwebsockets::WebSocket<Upgraded>,
    identity: Option<connection::Identity>,
) {
    let config = &app.config.ws;
    let conn_id = app.next_connection_id();
    let mut ws = ws;
    // The transport refuses frames past 4x the limit (and closes); between the limit and that,
    // the reader answers `frame_too_large` and the connection lives on.
    ws.set_max_message_size(config.max_frame_bytes.saturating_mul(4).max(64 * 1024));
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    // Frames go through a small buffer and reach the socket once per flushed batch.
    let (read, write) = ws.split(|io| {
        let (r, w) = tokio::io::split(io);
        (r, tokio::io::BufWriter::with_capacity(WRITE_BUFFER, w))
    });
    let (outbox, receiver) = outbox(conn_id, config.outbound_queue);
    // Pongs and close replies the reader owes, handed to the writer.
    let (control_tx, control_rx) = mpsc::channel::<Frame<'static>>(8);
    let mut writer = tokio::spawn(write_loop(
        write,
        receiver,
        control_rx,
        app.shutdown_signal(),
    ));
    let authenticated = Arc::new(AtomicBool::new(identity.is_some()));
    let args = ConnectionArgs {
        app: app.clone(),
        outbox: outbox.clone(),
        identity,
        authenticated: authenticated.clone(),
    };
    let actor = match Actor::spawn(None, Connection, args).await {
        Ok((actor, _)) => actor,
        Err(e) => {
            tracing::error!(error = %e, "cannot start a connection actor");
            return;
        }
    };
    metrics::gauge!("vibe_ws_connections").increment(1.0);
    let auth_deadline = Instant::now() + config.auth_timeout;
    let reading = read_loop(
        &app,
        read,
        &actor,
        &outbox,
        control_tx.clone(),
        &authenticated,
        auth_deadline,
    );
    // Whichever side ends first ends the connection: a writer that closed for overflow or
    // shutdown must not leave a client that never reads holding its subscriptions.
    let writer_done = tokio::select! {
        () = reading => false,
        _ = &mut writer => true,
    };
    let _ = ractor::call!(actor, ConnectionMsg::Close);
    actor.stop(None);
    drop(control_tx);
    drop(outbox);
    if !writer_done {
        let _ = writer.await;
    }
    metrics::gauge!("vibe_ws_connections").decrement(1.0);
}

async fn read_loop(
    app: &App,
    read: fastwebsockets::WebSocketRead<tokio::io::ReadHalf<Upgraded>>,
    actor: &ractor::ActorRef<ConnectionMsg>,
    outbox: &vibe_actors::outbox::Outbox,
    control: mpsc::Sender<Frame<'static>>,
    authenticated: &AtomicBool,
    auth_deadline: Instant,
) {
    let config = &app.config.ws;
    let mut read = fastwebsockets::FragmentCollectorRead::new(read);
    let mut bucket = limits::TokenBucket::new(config.requests_per_second, Instant::now());
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
        let frame = if authenticated.load(Ordering::Relaxed) {
            read.read_frame(&mut send_control).await
        } else {
            match tokio::time::timeout_at(auth_deadline.into(), read.read_frame(&mut send_control))
                .await
            {
                Ok(frame) => frame,
                Err(_) => {
                    let _ = control
                        .send(Frame::close(
                            CLOSE_AUTH_TIMEOUT,
                            b"authenticate within the auth timeout",
                        ))
                        .await;
                    return;
                }
            }
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(WebSocketError::FrameTooLarge) => {
                let _ = control
                    .send(Frame::close(CLOSE_TOO_BIG, b"frame too large"))
                    .await;
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket read ended");
                return;
            }
        };
        match frame.opcode {
            OpCode::Close => return,
            OpCode::Text => {}
            OpCode::Binary => {
                let _ = outbox.send(error_frame(
                    &serde_json::Value::Null,
                    "binary_not_supported",
                    "send JSON text frames",
                ));
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
                &format!(
                    "at most {} requests per second; retry in {:?}",
                    config.requests_per_second,
                    bucket.retry_after()
                ),
            ));
            continue;
        }
        let text = Bytes::from(frame.payload.to_vec());
        if ractor::call!(actor, ConnectionMsg::Request, text).is_err() {
            return;
        }
    }
}

async fn write_loop(
    mut write: fastwebsockets::WebSocketWrite<tokio::io::BufWriter<tokio::io::WriteHalf<Upgraded>>>,
    outbox: OutboxReceiver,
    mut control: mpsc::Receiver<Frame<'static>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let OutboxReceiver { mut rx, overflow } = outbox;
    // Created once, not per loop turn: each creation registers a waiter (the shutdown signal is
    // one channel shared by every connection, so that would be a contended lock per event).
    let overflowed = overflow.wait();
    let shutting_down = shutdown.changed();
    tokio::pin!(overflowed, shutting_down);
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
                () = &mut overflowed => {
                    write.write_frame(Frame::close(CLOSE_OVERFLOW, b"outbound queue overflow: reconnect and resume with since")).await?;
                    write.flush().await?;
                    return Ok(());
                }
                _ = &mut shutting_down => {
                    write.write_frame(Frame::close(CLOSE_GOING_AWAY, b"server shutting down")).await?;
                    write.flush().await?;
                    return Ok(());
                }
                frame = rx.recv() => {
                    let Some(frame) = frame else { return Ok(()) };
                    write.write_frame(Frame::text(Payload::Borrowed(&frame))).await?;
                    for _ in 1..WRITE_BATCH {
                        match rx.try_recv() {
                            Ok(frame) => write.write_frame(Frame::text(Payload::Borrowed(&frame))).await?,
                            Err(_) => break,
                        }
                    }
                    write.flush().await?;
                }
            }
        }
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "WebSocket write ended");
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = write.flush().await;
    })
    .await;
}
