//! Code shared by the WebSocket load clients `feed_latency` and `fanout`: opening and subscribing
//! a `vibe.v1` connection (fastwebsockets, optionally from a chosen 127.0.0.x source address),
//! the subscriber task that times `add` events, the open-loop REST writer, URL checks, the
//! open-files limit, `/proc` CPU and RSS samples and a once-a-second progress line. The REST load
//! client `http_load` uses its URL check, `seconds` and `histogram`.
//!
//! Included by each bench binary with `#[path = "common/mod.rs"] mod common;`.

// Each binary uses a different part of this module.
#![allow(dead_code)]

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload, WebSocketError};
use hdrhistogram::Histogram;
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

pub(crate) type Ws = FragmentCollector<TokioIo<Upgraded>>;

/// The WebSocket endpoint.
pub(crate) const WS_PATH: &str = "/v1/ws";

/// How long one connection may take to open and subscribe.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The request id of the subscription `read`.
pub(crate) const READ_ID: u64 = 1;

/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// Microseconds since the Unix epoch (the clock `sent_us` is written with).
pub(crate) fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Microseconds since the Unix epoch of an RFC 3339 timestamp (None: unreadable or before 1970).
pub(crate) fn rfc3339_micros(timestamp: &str) -> Option<u64> {
    let t = chrono::DateTime::parse_from_rfc3339(timestamp).ok()?;
    u64::try_from(t.timestamp_micros()).ok()
}

/// A latency histogram: 1 µs to 10 min, 3 significant digits.
pub(crate) fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 600_000_000, 3).context("cannot create a latency histogram")
}

pub(crate) fn ms(us: f64) -> f64 {
    us / 1000.0
}

pub(crate) fn seconds(value: f64, name: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .with_context(|| format!("--{name} must be a non-negative number of seconds"))
}

/// Quantiles of a latency histogram, in milliseconds (all 0 when it is empty).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Latency {
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
    pub(crate) mean: f64,
}

impl Latency {
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let q = |quantile: f64| ms(h.value_at_quantile(quantile) as f64);
        Self {
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
            p999: q(0.999),
            max: ms(h.max() as f64),
            mean: ms(h.mean()),
        }
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "p50": self.p50, "p90": self.p90, "p99": self.p99, "p99_9": self.p999,
            "max": self.max, "mean": self.mean,
        })
    }
}

/// The parts of an event frame these clients look at (`serde` skips the rest).
#[derive(Debug, Deserialize)]
pub(crate) struct EventFrame<'a> {
    #[serde(borrow, default)]
    pub(crate) event: Option<&'a str>,
    #[serde(borrow, default)]
    pub(crate) cursor: Option<&'a str>,
    #[serde(borrow, default)]
    pub(crate) doc: Option<EventDoc<'a>>,
    /// graphql-ws: the message type (`next` carries a subscription's result).
    #[serde(borrow, default, rename = "type")]
    pub(crate) message_type: Option<&'a str>,
    #[serde(borrow, default)]
    pub(crate) payload: Option<GraphqlPayload<'a>>,
}

/// `{"data":{"listen":{"relatedNode":<doc>}}}`: a PostGraphile pg-pubsub subscription's result.
#[derive(Debug, Deserialize)]
pub(crate) struct GraphqlPayload<'a> {
    #[serde(borrow, default)]
    data: Option<GraphqlData<'a>>,
}

#[derive(Debug, Deserialize)]
struct GraphqlData<'a> {
    #[serde(borrow, default)]
    listen: Option<GraphqlListen<'a>>,
}

#[derive(Debug, Deserialize)]
struct GraphqlListen<'a> {
    #[serde(borrow, default, rename = "relatedNode")]
    related_node: Option<EventDoc<'a>>,
}

impl<'a> EventFrame<'a> {
    /// A graphql-ws `next` message is the `add` of the document it carries (the PostGraphile
    /// peer's subscriptions report inserts only).
    fn normalized(mut self) -> Self {
        if self.message_type == Some("next") {
            self.event = Some("add");
            self.doc = self
                .payload
                .take()
                .and_then(|p| p.data)
                .and_then(|d| d.listen)
                .and_then(|l| l.related_node);
        }
        self
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct EventDoc<'a> {
    #[serde(borrow, default)]
    pub(crate) id: Option<&'a str>,
    /// The server's write time (RFC 3339): Vibe's and the Node peer's `now()` of the inserting
    /// transaction, which is taken before it commits; the bare peer's clock when it builds the
    /// document.
    #[serde(borrow, default, rename = "updatedAt")]
    pub(crate) updated_at: Option<&'a str>,
    #[serde(default)]
    pub(crate) data: Option<EventData>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct EventData {
    #[serde(default)]
    pub(crate) sent_us: Option<u64>,
    #[serde(default)]
    pub(crate) k: Option<u64>,
}

/// Counters shared by all connection tasks, read by the progress line.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Connections open and subscribed right now.
    pub(crate) connected: AtomicU64,
    /// `add` events received so far.
    pub(crate) events: AtomicU64,
}

/// Prints `label: <elapsed>s connected=<n> events=<n> (<n>/s)` on stderr every second until
/// the returned task is aborted.
pub(crate) fn spawn_progress(
    label: &'static str,
    progress: Arc<Progress>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        ticker.tick().await;
        let mut last_events = 0;
        loop {
            ticker.tick().await;
            let events = progress.events.load(Ordering::Relaxed);
            eprintln!(
                "[{label}] {:>4.0}s connected={} events={events} ({}/s)",
                started.elapsed().as_secs_f64(),
                progress.connected.load(Ordering::Relaxed),
                events - last_events,
            );
            last_events = events;
        }
    })
}

/// One subscriber's tallies.
#[derive(Debug)]
pub(crate) struct SubTally {
    /// Write sent (the writer's clock, `data.sent_us`) → `add` received: the REST write, the
    /// commit, the change feed, the fan-out and the WebSocket.
    pub(crate) latency_us: Histogram<u64>,
    /// The server's write time (`doc.updatedAt`, taken before the commit) → `add` received:
    /// commit-to-client, without the writer's HTTP request. Server and client share the clock.
    pub(crate) commit_latency_us: Histogram<u64>,
    /// `add` events of measured documents.
    pub(crate) received: u64,
    /// `add` events of warmup documents (not measured).
    pub(crate) warmup_received: u64,
    /// `add` events whose `data.k` is not the one this subscriber's query asked for.
    pub(crate) misrouted: u64,
    /// `reset` events (the live query restarted: events may have been skipped).
    pub(crate) resets: u64,
    /// `remove` events: documents pushed out of the window by newer ones, once it is full.
    pub(crate) removes: u64,
    /// Frames this client could not make sense of.
    pub(crate) bad_frames: u64,
    pub(crate) connect_error: bool,
    /// The connection ended before the run did.
    pub(crate) disconnected: bool,
    pub(crate) first_error: Option<String>,
    /// The `data.k` every `add` event must carry (distinct live queries), if any.
    expect_k: Option<u64>,
}

impl SubTally {
    pub(crate) fn new() -> anyhow::Result<Self> {
        Ok(Self {
            latency_us: histogram()?,
            commit_latency_us: histogram()?,
            received: 0,
            warmup_received: 0,
            misrouted: 0,
            resets: 0,
            removes: 0,
            bad_frames: 0,
            connect_error: false,
            disconnected: false,
            first_error: None,
            expect_k: None,
        })
    }

    pub(crate) fn error(&mut self, message: String) {
        if self.first_error.is_none() {
            self.first_error = Some(message);
        }
    }

    pub(crate) fn merge(&mut self, other: SubTally) -> anyhow::Result<()> {
        self.latency_us
            .add(&other.latency_us)
            .context("cannot merge latency histograms")?;
        self.commit_latency_us
            .add(&other.commit_latency_us)
            .context("cannot merge latency histograms")?;
        self.received += other.received;
        self.warmup_received += other.warmup_received;
        self.misrouted += other.misrouted;
        self.resets += other.resets;
        self.removes += other.removes;
        self.bad_frames += other.bad_frames;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        Ok(())
    }

    /// Handles one text frame (its payload) that arrived at `now_us`.
    pub(crate) fn on_frame(&mut self, payload: &[u8], now_us: u64, measure_from_us: u64) {
        // Only for error messages: the happy path never builds a string.
        let text = || String::from_utf8_lossy(payload);
        let frame: EventFrame<'_> = match serde_json::from_slice(payload) {
            Ok(f) => EventFrame::normalized(f),
            Err(e) => {
                self.bad_frames += 1;
                self.error(format!("unreadable frame ({e}): {:.200}", text()));
                return;
            }
        };
        match frame.event {
            Some("add") => {
                let (data, updated_at) = frame.doc.map_or((None, None), |d| (d.data, d.updated_at));
                let Some(sent_us) = data.as_ref().and_then(|d| d.sent_us) else {
                    self.bad_frames += 1;
                    self.error(format!(
                        "an add event without doc.data.sent_us: {:.200}",
                        text()
                    ));
                    return;
                };
                if let Some(want) = self.expect_k
                    && data.as_ref().and_then(|d| d.k) != Some(want)
                {
                    self.misrouted += 1;
                    self.error(format!(
                        "an add event for another query (want data.k={want}): {:.200}",
                        text()
                    ));
                    return;
                }
                let Some(written_us) = updated_at.and_then(rfc3339_micros) else {
                    self.bad_frames += 1;
                    self.error(format!(
                        "an add event without a readable doc.updatedAt: {:.200}",
                        text()
                    ));
                    return;
                };
                if sent_us < measure_from_us {
                    self.warmup_received += 1;
                } else {
                    self.received += 1;
                    self.latency_us
                        .saturating_record(now_us.saturating_sub(sent_us).max(1));
                    self.commit_latency_us
                        .saturating_record(now_us.saturating_sub(written_us).max(1));
                }
            }
            Some("reset") => {
                self.resets += 1;
                self.error(format!("the live query was reset: {:.200}", text()));
            }
            // Documents leaving the window: counted, not timed (so are `change` events).
            Some("remove") => self.removes += 1,
            Some(_) => {}
            None => {
                self.bad_frames += 1;
                self.error(format!("unexpected frame: {:.200}", text()));
            }
        }
    }
}

/// What the writer tells the subscribers once it has stopped.
#[derive(Debug, Clone)]
pub(crate) struct Finish {
    /// Measured writes that succeeded: the `add` events a subscriber should get. One entry for
    /// all subscribers, or one per `expect_index` (distinct live queries).
    pub(crate) expected: Arc<Vec<u64>>,
    /// Stop waiting for missing events at this point.
    pub(crate) deadline: Instant,
}

impl Finish {
    pub(crate) fn expected_for(&self, index: usize) -> u64 {
        self.expected
            .get(index)
            .or_else(|| self.expected.first())
            .copied()
            .unwrap_or(0)
    }
}

/// Runs the connection tasks of hyper's client handshakes on the tokio runtime.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SpawnExecutor;

impl<Fut> hyper::rt::Executor<Fut> for SpawnExecutor
where
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    fn execute(&self, fut: Fut) {
        tokio::spawn(fut);
    }
}

/// Describes a close frame's payload (status code and reason) for error messages.
pub(crate) fn close_reason(payload: &[u8]) -> String {
    match payload {
        [hi, lo, reason @ ..] => format!(
            "code {}, reason {:?}",
            u16::from_be_bytes([*hi, *lo]),
            String::from_utf8_lossy(reason)
        ),
        _ => "no status code".to_owned(),
    }
}

/// The WebSocket protocol a server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Protocol {
    /// Vibe's `vibe.v1` (Vibe, the bare and the Node peers).
    Vibe,
    /// graphql-ws (`graphql-transport-ws`) at `/graphql`, subscribing to the PostGraphile peer's
    /// insert topic; every result is taken as an `add`.
    GraphqlWs,
}

/// Where the connections go.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// What the WebSocket speaks.
    pub(crate) protocol: Protocol,
    /// `http://HOST:PORT`, for the writer.
    pub(crate) base_url: String,
    /// `HOST:PORT`, the `Host` header of the upgrades.
    pub(crate) authority: String,
    /// The address the sockets connect to.
    pub(crate) addr: SocketAddr,
}

/// Parses `http://HOST:PORT` (no path) and refuses anything but a loopback address.
pub(crate) fn parse_url(url: &str) -> anyhow::Result<Target> {
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("invalid --url {url:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("--url must start with http:// (got {url:?})");
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        bail!("--url takes no path or query (got {url:?})");
    }
    let authority = uri
        .authority()
        .with_context(|| format!("--url has no host: {url:?}"))?;
    let host = authority.host();
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .with_context(|| {
                format!("--url host must be a loopback IP address or localhost (got {host:?})")
            })?
    };
    if !ip.is_loopback() {
        bail!("--url must point at a loopback address; {ip} is not one");
    }
    let port = authority.port_u16().unwrap_or(80);
    Ok(Target {
        protocol: Protocol::Vibe,
        base_url: format!("http://{authority}"),
        authority: format!("{host}:{port}"),
        addr: SocketAddr::new(ip, port),
    })
}

/// Lifts the open-files soft limit to the hard limit and checks that `connections` sockets (plus
/// 64 for everything else) fit; returns the limit.
pub(crate) fn raise_nofile(connections: usize, what: &str) -> anyhow::Result<u64> {
    let nofile = rlimit::increase_nofile_limit(u64::MAX)
        .context("cannot raise the open-files limit (RLIMIT_NOFILE)")?;
    let needed = u64::try_from(connections).unwrap_or(u64::MAX) + 64;
    if nofile < needed {
        bail!(
            "{connections} {what} need about {needed} open files; the limit is {nofile} \
             (raise the hard limit, e.g. `ulimit -Hn`)"
        );
    }
    Ok(nofile)
}

/// The source address of connection `index` when spreading over 127.0.0.1..127.0.0.`spread`.
pub(crate) fn source_addr(index: usize, spread: u8) -> Option<Ipv4Addr> {
    if spread == 0 {
        return None;
    }
    let last = u8::try_from(index % usize::from(spread)).unwrap_or(0) + 1;
    Some(Ipv4Addr::new(127, 0, 0, last))
}

/// What one successful `connect` returns.
#[allow(missing_debug_implementations)] // the stream is not `Debug`
pub(crate) struct Connected {
    pub(crate) stream: Ws,
    /// The reply to the `read`, if one was sent.
    pub(crate) reply: Option<serde_json::Value>,
    /// Payloads of frames that arrived before the reply.
    pub(crate) early: Vec<Vec<u8>>,
}

/// Opens one WebSocket (from `source`, if given) and, if `read` is given, sends it (its `id` must
/// be [`READ_ID`]) and waits for a successful reply.
pub(crate) async fn connect(
    target: &Target,
    token: &str,
    source: Option<Ipv4Addr>,
    read: Option<&serde_json::Value>,
) -> anyhow::Result<Connected> {
    if target.protocol == Protocol::GraphqlWs {
        return connect_graphql(target, source, read.is_some()).await;
    }
    let protocols = format!("vibe.v1, {}", token.trim().trim_end_matches('='));
    let mut stream = open(target, source, WS_PATH, &protocols, "vibe.v1").await?;
    let Some(read) = read else {
        return Ok(Connected {
            stream,
            reply: None,
            early: Vec::new(),
        });
    };
    stream
        .write_frame(Frame::text(Payload::from(read.to_string().into_bytes())))
        .await
        .context("cannot send the read request")?;
    // Frames other than the reply are kept aside.
    let mut early = Vec::new();
    loop {
        let frame = next_text(&mut stream, "the read reply").await?;
        let reply: serde_json::Value =
            serde_json::from_slice(&frame).context("the server sent a frame that is not JSON")?;
        if reply["re"] != READ_ID {
            early.push(frame);
            continue;
        }
        if reply["ok"] != true {
            bail!("the read request failed: {reply}");
        }
        if !reply["sub"].is_string() {
            bail!("the read reply has no `sub`: {reply}");
        }
        return Ok(Connected {
            stream,
            reply: Some(reply),
            early,
        });
    }
}

/// The PostGraphile peer's subscription (benches/peers/postgraphile): pg-pubsub's `listen` on
/// the topic its insert trigger notifies, with the document fields the tallies read.
const GRAPHQL_SUBSCRIPTION: &str = "subscription { listen(topic: \"pgl_docs\") { relatedNode { ... on PglDoc { id updatedAt data } } } }";

/// [`connect`] for graphql-ws (subprotocol `graphql-transport-ws`): `connection_init`, waits for
/// `connection_ack`, then (with `subscribe`) starts the subscription with id `1`, which the
/// protocol does not acknowledge: the reply is `{"sub":"1"}` at once.
async fn connect_graphql(
    target: &Target,
    source: Option<Ipv4Addr>,
    subscribe: bool,
) -> anyhow::Result<Connected> {
    let protocol = "graphql-transport-ws";
    let mut stream = open(target, source, "/graphql", protocol, protocol).await?;
    let init = serde_json::json!({"type": "connection_init"});
    stream
        .write_frame(Frame::text(Payload::from(init.to_string().into_bytes())))
        .await
        .context("cannot send connection_init")?;
    let ack = next_text(&mut stream, "connection_ack").await?;
    let ack: serde_json::Value =
        serde_json::from_slice(&ack).context("the server sent a frame that is not JSON")?;
    if ack["type"] != "connection_ack" {
        bail!("expected connection_ack, got {ack}");
    }
    if !subscribe {
        return Ok(Connected {
            stream,
            reply: None,
            early: Vec::new(),
        });
    }
    let start = serde_json::json!({
        "id": "1",
        "type": "subscribe",
        "payload": {"query": GRAPHQL_SUBSCRIPTION},
    });
    stream
        .write_frame(Frame::text(Payload::from(start.to_string().into_bytes())))
        .await
        .context("cannot send the subscription")?;
    Ok(Connected {
        stream,
        reply: Some(serde_json::json!({"sub": "1"})),
        early: Vec::new(),
    })
}

/// The next text frame's payload; `what` names what was awaited, for errors.
async fn next_text(stream: &mut Ws, what: &str) -> anyhow::Result<Vec<u8>> {
    loop {
        let frame = stream
            .read_frame()
            .await
            .with_context(|| format!("the connection failed before {what}"))?;
        match frame.opcode {
            OpCode::Text => return Ok(frame.payload.to_vec()),
            OpCode::Close => bail!(
                "the server closed the connection: {}",
                close_reason(&frame.payload)
            ),
            _ => {}
        }
    }
}

/// Connects (from `source`, if given) and upgrades `path` offering `protocols`; the server must
/// choose `expected`.
async fn open(
    target: &Target,
    source: Option<Ipv4Addr>,
    path: &str,
    protocols: &str,
    expected: &str,
) -> anyhow::Result<Ws> {
    let request = hyper::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", &target.authority)
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header(
            "sec-websocket-key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("sec-websocket-version", "13")
        .header("sec-websocket-protocol", protocols)
        .body(Empty::<Bytes>::new())
        .context(
            "cannot build the WebSocket upgrade request (is the token a valid header value?)",
        )?;
    let socket = match (source, target.addr) {
        (Some(source), SocketAddr::V4(_)) => {
            let socket = TcpSocket::new_v4().context("cannot create a socket")?;
            socket
                .bind(SocketAddr::new(IpAddr::V4(source), 0))
                .with_context(|| format!("cannot bind a socket to {source}:0"))?;
            socket
                .connect(target.addr)
                .await
                .with_context(|| format!("cannot connect from {source} to {}", target.addr))?
        }
        _ => TcpStream::connect(target.addr)
            .await
            .with_context(|| format!("cannot connect to {}", target.addr))?,
    };
    socket.set_nodelay(true).context("cannot set TCP_NODELAY")?;
    let (ws, response) = fastwebsockets::handshake::client(&SpawnExecutor, request, socket)
        .await
        .map_err(|e| match e {
            WebSocketError::InvalidStatusCode(status) => {
                anyhow::anyhow!("WebSocket upgrade refused: HTTP {status}")
            }
            e => anyhow::anyhow!("WebSocket connect failed: {e}"),
        })?;
    let chosen = response
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok());
    if chosen != Some(expected) {
        bail!("the server chose the subprotocol {chosen:?}, not {expected}");
    }
    Ok(FragmentCollector::new(ws))
}

/// Sends a close frame (without waiting long for it to go out).
pub(crate) async fn close(stream: &mut Ws) {
    let close = Frame::close_raw(Payload::from(Vec::new()));
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_frame(close)).await;
}

/// `{"id":1,"op":"read","type":T,"global":true,"limit":L}`, with `where` if given.
pub(crate) fn read_request(
    doc_type: &str,
    filter: Option<serde_json::Value>,
    limit: u16,
) -> serde_json::Value {
    let mut read = serde_json::json!({
        "id": READ_ID,
        "op": "read",
        "type": doc_type,
        "global": true,
        "limit": limit,
    });
    if let Some(filter) = filter {
        read["where"] = filter;
    }
    read
}

#[derive(Debug)]
pub(crate) struct SubscriberSetup {
    pub(crate) target: Arc<Target>,
    pub(crate) token: Arc<str>,
    /// The `read` request.
    pub(crate) read: serde_json::Value,
    pub(crate) source: Option<Ipv4Addr>,
    /// Which entry of [`Finish::expected`] applies, and (distinct queries) the `data.k` its
    /// events must carry.
    pub(crate) expect_index: usize,
    pub(crate) expect_k: Option<u64>,
    pub(crate) connect_slots: Arc<Semaphore>,
    /// One message per subscriber once it is subscribed (its subscription id) or has failed.
    pub(crate) ready: mpsc::Sender<Result<String, String>>,
    pub(crate) finish: watch::Receiver<Option<Finish>>,
    /// Unix micros; documents sent before it are warmup documents. `u64::MAX` until the writer
    /// is about to start (no event can arrive before that).
    pub(crate) measure_from: Arc<AtomicU64>,
    pub(crate) progress: Arc<Progress>,
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// One subscriber: connects, subscribes, then times `add` events until the writer has finished
/// and every expected event arrived (or the drain deadline passed).
pub(crate) async fn subscriber(setup: SubscriberSetup) -> anyhow::Result<SubTally> {
    let SubscriberSetup {
        target,
        token,
        read,
        source,
        expect_index,
        expect_k,
        connect_slots,
        ready,
        mut finish,
        measure_from,
        progress,
    } = setup;
    let mut tally = SubTally::new()?;
    tally.expect_k = expect_k;
    let connected = {
        let _slot = connect_slots
            .acquire()
            .await
            .context("the connect semaphore closed")?;
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            connect(&target, &token, source, Some(&read)),
        )
        .await
    };
    let (mut stream, early) = match connected {
        Ok(Ok(Connected {
            stream,
            reply,
            early,
        })) => {
            let sub = reply
                .as_ref()
                .and_then(|r| r["sub"].as_str())
                .unwrap_or_default()
                .to_owned();
            progress.connected.fetch_add(1, Ordering::Relaxed);
            let _ = ready.send(Ok(sub)).await;
            (stream, early)
        }
        Ok(Err(e)) => {
            let message = format!("{e:#}");
            tally.connect_error = true;
            tally.error(message.clone());
            let _ = ready.send(Err(message)).await;
            return Ok(tally);
        }
        Err(_) => {
            let message = format!("could not connect and subscribe within {CONNECT_TIMEOUT:?}");
            tally.connect_error = true;
            tally.error(message.clone());
            let _ = ready.send(Err(message)).await;
            return Ok(tally);
        }
    };
    drop(ready);
    for payload in &early {
        tally.on_frame(payload, unix_micros(), measure_from.load(Ordering::Acquire));
    }

    let mut done: Option<Finish> = None;
    let outcome = 'run: loop {
        if let Some(f) = &done
            && tally.received >= f.expected_for(expect_index)
        {
            break Ok(());
        }
        // `read_frame` is not cancel-safe (a frame read halfway would be lost), so the read stays
        // pinned across the other branches and is only dropped when the loop ends.
        let read = stream.read_frame();
        tokio::pin!(read);
        let result = loop {
            tokio::select! {
                result = &mut read => break result,
                changed = finish.changed(), if done.is_none() => {
                    if changed.is_err() {
                        // The run is being abandoned.
                        break 'run Ok(());
                    }
                    done = finish.borrow_and_update().clone();
                    if let Some(f) = &done
                        && tally.received >= f.expected_for(expect_index)
                    {
                        break 'run Ok(());
                    }
                }
                () = sleep_until(done.as_ref().map(|f| f.deadline)) => break 'run Ok(()),
            }
        };
        // The receive time, taken before any parsing.
        let now_us = unix_micros();
        match result {
            Ok(frame) => match frame.opcode {
                OpCode::Text => {
                    let measure_from_us = measure_from.load(Ordering::Acquire);
                    let before = tally.received + tally.warmup_received;
                    tally.on_frame(&frame.payload, now_us, measure_from_us);
                    let added = tally.received + tally.warmup_received - before;
                    if added > 0 {
                        progress.events.fetch_add(added, Ordering::Relaxed);
                    }
                }
                OpCode::Close => {
                    break Err(format!(
                        "the server closed the connection: {}",
                        close_reason(&frame.payload)
                    ));
                }
                _ => {}
            },
            Err(WebSocketError::UnexpectedEOF) => break Err("the connection ended".to_owned()),
            Err(e) => break Err(format!("the connection failed: {e}")),
        }
    };
    progress.connected.fetch_sub(1, Ordering::Relaxed);
    match outcome {
        Ok(()) => close(&mut stream).await,
        Err(message) => {
            tally.disconnected = true;
            tally.error(message);
        }
    }
    Ok(tally)
}

/// The writer's tallies.
#[derive(Debug)]
pub(crate) struct WriterTally {
    /// 2xx answers to writes sent in the measured window.
    pub(crate) measured_ok: u64,
    /// The same, per `data.k` (when the writer cycles `data.k`).
    pub(crate) measured_ok_by_key: Vec<u64>,
    /// 2xx answers to warmup writes.
    pub(crate) warmup_ok: u64,
    /// Failed writes (measured window / warmup).
    pub(crate) measured_errors: u64,
    pub(crate) warmup_errors: u64,
    /// Writes sent later than their tick by more than one interval (the writer fell behind).
    pub(crate) late_ticks: u64,
    /// POST round trips of measured writes.
    pub(crate) post_latency_us: Histogram<u64>,
    /// Ids of the created documents (when asked for), warmup included.
    pub(crate) ok_ids: Vec<u128>,
    pub(crate) first_error: Option<String>,
}

#[derive(Debug)]
struct WriteOutcome {
    measured: bool,
    key: Option<u64>,
    id: Option<u128>,
    round_trip_us: u64,
    error: Option<String>,
}

/// The part of a created document the writer reads.
#[derive(Debug, Deserialize)]
struct CreatedDoc {
    id: uuid::Uuid,
}

/// What the writer does.
#[derive(Debug, Clone)]
pub(crate) struct WriterConfig {
    pub(crate) base_url: String,
    pub(crate) token: String,
    pub(crate) doc_type: String,
    pub(crate) rate: f64,
    pub(crate) start: Instant,
    pub(crate) measure_from_us: u64,
    pub(crate) stop_at: Instant,
    /// Write `data.k` = write number mod `keys` (distinct live queries).
    pub(crate) keys: Option<u64>,
    /// Keep the ids of the created documents.
    pub(crate) collect_ids: bool,
    /// The documents' ACLs (JSON), used in turn; empty: every document public.
    pub(crate) acls: Vec<String>,
}

/// `read` allows everyone: what every writer wrote before ACL mixes existed.
pub(crate) const PUBLIC_ACL: &str = r#"{"read":{"allow":["*"]}}"#;

/// Public documents whose rules still make every delivery evaluate something per subscriber: a
/// DID allow and deny list, and certificate predicates in allow and deny (the subscriber holds
/// `member-of` from zIssuer, so every deny is tested and none matches: all are delivered).
pub(crate) fn mixed_acls() -> Vec<String> {
    let dids = |prefix: &str| -> String {
        (0..10)
            .map(|i| format!(r#""did:key:z{prefix}{i}""#))
            .collect::<Vec<_>>()
            .join(",")
    };
    vec![
        PUBLIC_ACL.to_owned(),
        format!(
            r#"{{"read":{{"allow":["*",{}],"deny":[{}]}}}}"#,
            dids("Friend"),
            dids("Foe")
        ),
        concat!(
            r#"{"read":{"allow":["*",[{"issuer":"did:key:zIssuer","type":"member-of"}]],"#,
            r#""deny":[[{"issuer":"did:key:zIssuer","type":"blocked"}],"#,
            r#"[{"issuer":"did:key:zIssuer","type":"muted"},{"issuer":"did:key:zIssuer","type":"member-of"}]]}}"#
        )
        .to_owned(),
    ]
}

/// Creates documents at `rate` per second from `start` until `stop_at` (open loop: each write is
/// sent on its tick whether or not the previous one has answered).
pub(crate) async fn writer(config: WriterConfig) -> anyhow::Result<WriterTally> {
    let WriterConfig {
        base_url,
        token,
        doc_type,
        rate,
        start,
        measure_from_us,
        stop_at,
        keys,
        collect_ids,
        acls,
    } = config;
    let acls = if acls.is_empty() {
        vec![PUBLIC_ACL.to_owned()]
    } else {
        acls
    };
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build the HTTP client")?;
    let url = format!("{base_url}/v1/docs/{doc_type}");
    let authorization = format!("Bearer {}", token.trim());
    let period = Duration::try_from_secs_f64(1.0 / rate).context("invalid --rate")?;
    let mut ticker = tokio::time::interval_at(start.into(), period);
    // Keep the schedule: a late tick is sent at once, not dropped.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let key_count = keys.map_or(0, |k| usize::try_from(k).unwrap_or(0));
    let mut tally = WriterTally {
        measured_ok: 0,
        measured_ok_by_key: vec![0; key_count],
        warmup_ok: 0,
        measured_errors: 0,
        warmup_errors: 0,
        late_ticks: 0,
        post_latency_us: histogram()?,
        ok_ids: Vec::new(),
        first_error: None,
    };
    let mut inflight = JoinSet::new();
    let note = |tally: &mut WriterTally, outcome: WriteOutcome| {
        match (outcome.measured, &outcome.error) {
            (true, None) => {
                tally.measured_ok += 1;
                tally
                    .post_latency_us
                    .saturating_record(outcome.round_trip_us.max(1));
                if let Some(key) = outcome.key
                    && let Some(n) = usize::try_from(key)
                        .ok()
                        .and_then(|k| tally.measured_ok_by_key.get_mut(k))
                {
                    *n += 1;
                }
            }
            (false, None) => tally.warmup_ok += 1,
            (true, Some(_)) => tally.measured_errors += 1,
            (false, Some(_)) => tally.warmup_errors += 1,
        }
        if let Some(id) = outcome.id {
            tally.ok_ids.push(id);
        }
        if tally.first_error.is_none() {
            tally.first_error = outcome.error;
        }
    };
    let mut seq = 0_u64;
    loop {
        let tick = ticker.tick().await;
        if Instant::from(tick) >= stop_at {
            break;
        }
        if Instant::now().saturating_duration_since(tick.into()) > period {
            tally.late_ticks += 1;
        }
        let request = client
            .post(&url)
            .header("authorization", &authorization)
            .header("content-type", "application/json");
        let key = keys.map(|k| seq % k.max(1));
        let acl = &acls[usize::try_from(seq).unwrap_or(0) % acls.len()];
        seq += 1;
        let sent_us = unix_micros();
        let body = match key {
            Some(k) => format!(r#"{{"acl":{acl},"data":{{"sent_us":{sent_us},"k":{k}}}}}"#),
            None => format!(r#"{{"acl":{acl},"data":{{"sent_us":{sent_us}}}}}"#),
        };
        let measured = sent_us >= measure_from_us;
        inflight.spawn(async move {
            let sent = Instant::now();
            let mut id = None;
            let error = match request.body(body).send().await {
                Ok(response) if response.status().is_success() => {
                    // Read the body so the connection can be reused.
                    let body = response.bytes().await;
                    if collect_ids {
                        match body
                            .ok()
                            .and_then(|b| serde_json::from_slice::<CreatedDoc>(&b).ok())
                        {
                            Some(doc) => id = Some(doc.id.as_u128()),
                            None => {
                                return WriteOutcome {
                                    measured,
                                    key,
                                    id,
                                    round_trip_us: 0,
                                    error: Some("POST: the answer has no document id".to_owned()),
                                };
                            }
                        }
                    }
                    None
                }
                Ok(response) => {
                    let status = response.status();
                    let body = response.text().await.unwrap_or_default();
                    Some(format!("POST: HTTP {status}: {body}"))
                }
                Err(e) => Some(format!("POST failed: {e}")),
            };
            let round_trip_us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
            WriteOutcome {
                measured,
                key,
                id,
                round_trip_us,
                error,
            }
        });
        while let Some(done) = inflight.try_join_next() {
            note(&mut tally, done.context("a write task panicked")?);
        }
    }
    while let Some(done) = inflight.join_next().await {
        note(&mut tally, done.context("a write task panicked")?);
    }
    Ok(tally)
}

/// CPU time and resident memory of a process at one instant (from `/proc`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProcSample {
    pub(crate) at: Instant,
    /// utime + stime, in clock ticks.
    pub(crate) cpu_ticks: u64,
    /// VmRSS in KiB.
    pub(crate) rss_kib: u64,
}

impl ProcSample {
    /// Samples `/proc/<pid>` (`pid` may be `"self"`).
    pub(crate) fn take(pid: &str) -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("cannot read /proc/{pid}/stat (is the process running?)"))?;
        // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .with_context(|| format!("unexpected /proc/{pid}/stat: {stat:.100}"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> anyhow::Result<u64> {
            fields
                .get(n - 3)
                .and_then(|f| f.parse().ok())
                .with_context(|| format!("no field {n} in /proc/{pid}/stat"))
        };
        let cpu_ticks = field(14)? + field(15)?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("cannot read /proc/{pid}/status"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(Self {
            at: Instant::now(),
            cpu_ticks,
            rss_kib,
        })
    }

    /// CPU used between `self` and `later`, in % of one core.
    pub(crate) fn cpu_percent(&self, later: &ProcSample) -> f64 {
        let secs = later.at.saturating_duration_since(self.at).as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        later.cpu_ticks.saturating_sub(self.cpu_ticks) as f64 / USER_HZ / secs * 100.0
    }
}

/// Distinct subscription ids among the ready messages; returns (subscribed, errors, first
/// error, distinct `sub` ids) once every subscriber has reported.
pub(crate) async fn collect_ready(
    ready: &mut mpsc::Receiver<Result<String, String>>,
) -> (usize, usize, Option<String>, usize) {
    let (subscribed, errors, first_error, subs) = collect_ready_subs(ready).await;
    (subscribed, errors, first_error, subs.len())
}

/// [`collect_ready`], returning the distinct `sub` ids themselves (to merge them with another
/// process's).
pub(crate) async fn collect_ready_subs(
    ready: &mut mpsc::Receiver<Result<String, String>>,
) -> (usize, usize, Option<String>, HashSet<String>) {
    let mut subscribed = 0;
    let mut errors = 0;
    let mut first_error = None;
    let mut subs = HashSet::new();
    while let Some(outcome) = ready.recv().await {
        match outcome {
            Ok(sub) => {
                subscribed += 1;
                subs.insert(sub);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    (subscribed, errors, first_error, subs)
}
