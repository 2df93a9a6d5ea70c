//! Realtime fan-out latency client (`cargo bench --bench feed_latency -- --url ... --token ...`).
//!
//! Opens `--subscribers` WebSocket connections to `/v1/ws` (subprotocol `vibe.v1`, the token as
//! the second offered protocol value), and each sends the same live query
//! `{"op":"read","type":<type>,"global":true,"limit":10}`, so the server runs one live query with
//! N subscribers. Once every connection is subscribed, a single writer creates documents with
//! `POST /v1/docs/<type>` at `--rate` writes per second on a fixed-interval ticker (open loop:
//! each write is sent on its tick whether or not the previous one has answered), with the body
//! `{"acl":{"read":{"allow":["*"]}},"data":{"sent_us":<unix micros just before sending>}}`.
//!
//! Every subscriber records, for each `add` event, `now_us - doc.data.sent_us` (write sent →
//! event received, through the REST write, the commit, the change feed, the live query and the
//! WebSocket) in its own HDR histogram; the histograms are merged at the end. Documents sent
//! during the first `--warmup` seconds are written and delivered but not counted. After
//! `--duration` measured seconds the writer stops; subscribers then wait (up to `--drain`
//! seconds) for the events still in flight.
//!
//! Expected events = measured writes that got a 2xx answer × `--subscribers`; every expected
//! event a subscriber did not receive (including those of connections that failed to open or
//! dropped) counts as missing.
//!
//! The subscriber side is kept cheap so that it does not take the CPU the server under test needs
//! (client and server share the machine): the connections use `fastwebsockets` (read buffers are
//! reused, nothing is zeroed per frame) and each event frame is deserialized straight from the
//! frame's bytes into a small struct that borrows the event name and skips every field but
//! `doc.data.sent_us`.
//!
//! Only loopback URLs are accepted: this is a benchmark for a local server. Used by
//! `benches/realtime.sh`.

// Printing the results is this tool's job.
#![allow(clippy::print_stdout)]

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload, WebSocketError};
use hdrhistogram::Histogram;
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

/// Realtime fan-out latency: one writer, N WebSocket subscribers sharing one live query.
#[derive(Debug, Parser)]
#[command(name = "feed_latency")]
struct Args {
    /// Base URL of the server; loopback only, e.g. http://127.0.0.1:8080
    #[arg(long)]
    url: String,
    /// Token with read and write scope on `--type`.
    #[arg(long, env = "VIBE_BENCH_TOKEN", hide_env_values = true)]
    token: String,
    /// WebSocket connections, each subscribed to the same live query.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Documents created per second by the writer (fixed-interval ticker).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Measured seconds of writing (after the warmup).
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Seconds of writing before measuring starts.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// After the last write: how long subscribers wait for events still in flight.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// WebSocket connections being opened at once while setting up.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Document type the writer creates and the live query reads.
    #[arg(long = "type", default_value = "benchfeed")]
    doc_type: String,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

type Ws = FragmentCollector<TokioIo<Upgraded>>;

/// The WebSocket endpoint.
const WS_PATH: &str = "/v1/ws";

/// How long one connection may take to open and subscribe.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The request id of the subscription `read`.
const READ_ID: u64 = 1;

/// Microseconds since the Unix epoch (the clock `sent_us` is written with).
fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// A latency histogram: 1 µs to 10 min, 3 significant digits.
fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 600_000_000, 3).context("cannot create a latency histogram")
}

/// The parts of an event frame this client looks at (`serde` skips the rest).
#[derive(Deserialize)]
struct EventFrame<'a> {
    #[serde(borrow, default)]
    event: Option<&'a str>,
    #[serde(default)]
    doc: Option<EventDoc>,
}

#[derive(Deserialize)]
struct EventDoc {
    #[serde(default)]
    data: Option<EventData>,
}

#[derive(Deserialize)]
struct EventData {
    #[serde(default)]
    sent_us: Option<u64>,
}

/// One subscriber's tallies.
#[derive(Debug)]
struct SubTally {
    latency_us: Histogram<u64>,
    /// `add` events of measured documents.
    received: u64,
    /// `add` events of warmup documents (not measured).
    warmup_received: u64,
    /// `reset` events (the live query restarted: events may have been skipped).
    resets: u64,
    /// Frames this client could not make sense of.
    bad_frames: u64,
    connect_error: bool,
    /// The connection ended before the run did.
    disconnected: bool,
    first_error: Option<String>,
}

impl SubTally {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            latency_us: histogram()?,
            received: 0,
            warmup_received: 0,
            resets: 0,
            bad_frames: 0,
            connect_error: false,
            disconnected: false,
            first_error: None,
        })
    }

    fn error(&mut self, message: String) {
        if self.first_error.is_none() {
            self.first_error = Some(message);
        }
    }

    fn merge(&mut self, other: SubTally) -> anyhow::Result<()> {
        self.latency_us
            .add(&other.latency_us)
            .context("cannot merge latency histograms")?;
        self.received += other.received;
        self.warmup_received += other.warmup_received;
        self.resets += other.resets;
        self.bad_frames += other.bad_frames;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        Ok(())
    }

    /// Handles one text frame (its payload) that arrived at `now_us`.
    fn on_frame(&mut self, payload: &[u8], now_us: u64, measure_from_us: u64) {
        // Only for error messages: the happy path never builds a string.
        let text = || String::from_utf8_lossy(payload);
        let frame: EventFrame<'_> = match serde_json::from_slice(payload) {
            Ok(f) => f,
            Err(e) => {
                self.bad_frames += 1;
                self.error(format!("unreadable frame ({e}): {:.200}", text()));
                return;
            }
        };
        match frame.event {
            Some("add") => {
                let Some(sent_us) = frame.doc.and_then(|d| d.data).and_then(|d| d.sent_us) else {
                    self.bad_frames += 1;
                    self.error(format!(
                        "an add event without doc.data.sent_us: {:.200}",
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
                }
            }
            Some("reset") => {
                self.resets += 1;
                self.error(format!("the live query was reset: {:.200}", text()));
            }
            // `change` and `remove` (documents leaving the 10-document window) are not measured.
            Some(_) => {}
            None => {
                self.bad_frames += 1;
                self.error(format!("unexpected frame: {:.200}", text()));
            }
        }
    }
}

/// What the writer tells the subscribers once it has stopped.
#[derive(Debug, Clone, Copy)]
struct Finish {
    /// Measured writes that succeeded: the `add` events each subscriber should get.
    expected: u64,
    /// Stop waiting for missing events at this point.
    deadline: Instant,
}

/// Runs the connection tasks of hyper's client handshakes on the tokio runtime.
#[derive(Debug, Clone, Copy)]
struct SpawnExecutor;

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
fn close_reason(payload: &[u8]) -> String {
    match payload {
        [hi, lo, reason @ ..] => format!(
            "code {}, reason {:?}",
            u16::from_be_bytes([*hi, *lo]),
            String::from_utf8_lossy(reason)
        ),
        _ => "no status code".to_owned(),
    }
}

/// Opens one WebSocket to `authority` (`host:port`) and subscribes; returns the stream, the
/// subscription id and the payloads of any frames that arrived before the reply.
async fn connect(
    authority: &str,
    token: &str,
    doc_type: &str,
) -> anyhow::Result<(Ws, String, Vec<Vec<u8>>)> {
    let protocols = format!("vibe.v1, {}", token.trim().trim_end_matches('='));
    let request = hyper::Request::builder()
        .method("GET")
        .uri(WS_PATH)
        .header("host", authority)
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
    let socket = TcpStream::connect(authority)
        .await
        .with_context(|| format!("cannot connect to {authority}"))?;
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
    if chosen != Some("vibe.v1") {
        bail!("the server chose the subprotocol {chosen:?}, not vibe.v1");
    }
    let mut stream = FragmentCollector::new(ws);
    let read = serde_json::json!({
        "id": READ_ID,
        "op": "read",
        "type": doc_type,
        "global": true,
        "limit": 10,
    });
    stream
        .write_frame(Frame::text(Payload::from(read.to_string().into_bytes())))
        .await
        .context("cannot send the read request")?;
    // Frames other than the reply (none are expected before the writer starts) are kept aside.
    let mut early = Vec::new();
    loop {
        let frame = stream
            .read_frame()
            .await
            .context("the connection failed before the read reply")?;
        match frame.opcode {
            OpCode::Text => {}
            OpCode::Close => bail!(
                "the server closed the connection: {}",
                close_reason(&frame.payload)
            ),
            _ => continue,
        }
        let reply: serde_json::Value = serde_json::from_slice(&frame.payload)
            .context("the server sent a frame that is not JSON")?;
        if reply["re"] != READ_ID {
            early.push(frame.payload.to_vec());
            continue;
        }
        if reply["ok"] != true {
            bail!("the read request failed: {reply}");
        }
        let sub = reply["sub"]
            .as_str()
            .with_context(|| format!("the read reply has no `sub`: {reply}"))?
            .to_owned();
        return Ok((stream, sub, early));
    }
}

struct SubscriberSetup {
    /// `host:port` of the server.
    authority: Arc<str>,
    token: Arc<str>,
    doc_type: Arc<str>,
    connect_slots: Arc<Semaphore>,
    /// One message per subscriber once it is subscribed (its subscription id) or has failed.
    ready: mpsc::Sender<Result<String, String>>,
    finish: watch::Receiver<Option<Finish>>,
    /// Unix micros; documents sent before it are warmup documents. `u64::MAX` until the writer
    /// is about to start (no event can arrive before that).
    measure_from: Arc<AtomicU64>,
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

async fn subscriber(setup: SubscriberSetup) -> anyhow::Result<SubTally> {
    let SubscriberSetup {
        authority,
        token,
        doc_type,
        connect_slots,
        ready,
        mut finish,
        measure_from,
    } = setup;
    let mut tally = SubTally::new()?;
    let connected = {
        let _slot = connect_slots
            .acquire()
            .await
            .context("the connect semaphore closed")?;
        tokio::time::timeout(CONNECT_TIMEOUT, connect(&authority, &token, &doc_type)).await
    };
    let (mut stream, early) = match connected {
        Ok(Ok((stream, sub, early))) => {
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
    'run: loop {
        if let Some(f) = done
            && tally.received >= f.expected
        {
            break;
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
                        break 'run;
                    }
                    done = *finish.borrow_and_update();
                    if let Some(f) = done
                        && tally.received >= f.expected
                    {
                        break 'run;
                    }
                }
                () = sleep_until(done.map(|f| f.deadline)) => break 'run,
            }
        };
        // The receive time, taken before any parsing.
        let now_us = unix_micros();
        match result {
            Ok(frame) => match frame.opcode {
                OpCode::Text => {
                    let measure_from_us = measure_from.load(Ordering::Acquire);
                    tally.on_frame(&frame.payload, now_us, measure_from_us);
                }
                OpCode::Close => {
                    tally.disconnected = true;
                    tally.error(format!(
                        "the server closed the connection: {}",
                        close_reason(&frame.payload)
                    ));
                    return Ok(tally);
                }
                _ => {}
            },
            Err(WebSocketError::UnexpectedEOF) => {
                tally.disconnected = true;
                tally.error("the connection ended".to_owned());
                return Ok(tally);
            }
            Err(e) => {
                tally.disconnected = true;
                tally.error(format!("the connection failed: {e}"));
                return Ok(tally);
            }
        }
    }
    let close = Frame::close_raw(Payload::from(Vec::new()));
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_frame(close)).await;
    Ok(tally)
}

/// The writer's tallies.
#[derive(Debug)]
struct WriterTally {
    /// 2xx answers to writes sent in the measured window.
    measured_ok: u64,
    /// 2xx answers to warmup writes.
    warmup_ok: u64,
    /// Failed writes (measured window / warmup).
    measured_errors: u64,
    warmup_errors: u64,
    /// Writes sent later than their tick by more than one interval (the writer fell behind).
    late_ticks: u64,
    /// POST round trips of measured writes.
    post_latency_us: Histogram<u64>,
    first_error: Option<String>,
}

struct WriteOutcome {
    measured: bool,
    round_trip_us: u64,
    error: Option<String>,
}

/// Creates documents at `rate` per second from `start` until `stop_at`.
async fn writer(
    base_url: String,
    token: String,
    doc_type: String,
    rate: f64,
    start: Instant,
    measure_from_us: u64,
    stop_at: Instant,
) -> anyhow::Result<WriterTally> {
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
    let mut tally = WriterTally {
        measured_ok: 0,
        warmup_ok: 0,
        measured_errors: 0,
        warmup_errors: 0,
        late_ticks: 0,
        post_latency_us: histogram()?,
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
            }
            (false, None) => tally.warmup_ok += 1,
            (true, Some(_)) => tally.measured_errors += 1,
            (false, Some(_)) => tally.warmup_errors += 1,
        }
        if tally.first_error.is_none() {
            tally.first_error = outcome.error;
        }
    };
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
        let sent_us = unix_micros();
        let body =
            format!(r#"{{"acl":{{"read":{{"allow":["*"]}}}},"data":{{"sent_us":{sent_us}}}}}"#);
        let measured = sent_us >= measure_from_us;
        inflight.spawn(async move {
            let sent = Instant::now();
            let error = match request.body(body).send().await {
                Ok(response) if response.status().is_success() => {
                    // Read the body so the connection can be reused.
                    let _ = response.bytes().await;
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

/// Parses `http://HOST:PORT` (no path), refuses anything but a loopback address, and returns the
/// base URL and the authority (`HOST:PORT`, where the WebSocket connections go).
fn parse_url(url: &str) -> anyhow::Result<(String, String)> {
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
    Ok((format!("http://{authority}"), format!("{host}:{port}")))
}

fn seconds(value: f64, name: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .with_context(|| format!("--{name} must be a non-negative number of seconds"))
}

fn ms(us: f64) -> f64 {
    us / 1000.0
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.subscribers == 0 {
        bail!("--subscribers must be at least 1");
    }
    if args.connect_concurrency == 0 {
        bail!("--connect-concurrency must be at least 1");
    }
    if !(args.rate.is_finite() && args.rate > 0.0) {
        bail!("--rate must be a positive number of writes per second");
    }
    let warmup = seconds(args.warmup, "warmup")?;
    let duration = seconds(args.duration, "duration")?;
    let drain = seconds(args.drain, "drain")?;
    if duration.is_zero() {
        bail!("--duration must be positive");
    }
    let (base_url, authority) = parse_url(&args.url)?;

    // One socket per subscriber, plus the writer's: lift the soft limit as far as allowed.
    let nofile = rlimit::increase_nofile_limit(u64::MAX)
        .context("cannot raise the open-files limit (RLIMIT_NOFILE)")?;
    let needed = u64::try_from(args.subscribers).unwrap_or(u64::MAX) + 64;
    if nofile < needed {
        bail!(
            "{} subscribers need about {needed} open files; the limit is {nofile} \
             (raise the hard limit, e.g. `ulimit -Hn`)",
            args.subscribers
        );
    }

    // Subscribe everyone, then fix the measure instant, then start writing.
    let setup_started = Instant::now();
    let connect_slots = Arc::new(Semaphore::new(args.connect_concurrency));
    let (ready_tx, mut ready_rx) = mpsc::channel(args.subscribers);
    let (finish_tx, finish_rx) = watch::channel(None::<Finish>);
    let measure_from = Arc::new(AtomicU64::new(u64::MAX));
    let authority: Arc<str> = authority.into();
    let token: Arc<str> = args.token.as_str().into();
    let doc_type: Arc<str> = args.doc_type.as_str().into();
    let mut subscribers = JoinSet::new();
    for _ in 0..args.subscribers {
        subscribers.spawn(subscriber(SubscriberSetup {
            authority: authority.clone(),
            token: token.clone(),
            doc_type: doc_type.clone(),
            connect_slots: connect_slots.clone(),
            ready: ready_tx.clone(),
            finish: finish_rx.clone(),
            measure_from: measure_from.clone(),
        }));
    }
    drop(ready_tx);
    drop(finish_rx);

    let mut subscribed = 0_usize;
    let mut connect_errors = 0_usize;
    let mut sub_ids = BTreeSet::new();
    let mut first_connect_error = None;
    while let Some(outcome) = ready_rx.recv().await {
        match outcome {
            Ok(sub) => {
                subscribed += 1;
                sub_ids.insert(sub);
            }
            Err(e) => {
                connect_errors += 1;
                first_connect_error.get_or_insert(e);
            }
        }
    }
    let setup_secs = setup_started.elapsed().as_secs_f64();
    println!(
        "subscribed {subscribed} of {} connections in {setup_secs:.1}s ({} live quer{}, {connect_errors} connect errors)",
        args.subscribers,
        sub_ids.len(),
        if sub_ids.len() == 1 { "y" } else { "ies" },
    );
    if let Some(e) = &first_connect_error {
        println!("first connect error: {e}");
    }
    if subscribed == 0 {
        bail!("no subscriber could connect");
    }

    // Documents sent before `measure_from_us` are warmup documents.
    let start = Instant::now();
    let measure_from_us = unix_micros() + u64::try_from(warmup.as_micros()).unwrap_or(u64::MAX);
    measure_from.store(measure_from_us, Ordering::Release);
    let stop_at = start + warmup + duration;
    let writes = writer(
        base_url,
        args.token.clone(),
        args.doc_type.clone(),
        args.rate,
        start,
        measure_from_us,
        stop_at,
    )
    .await?;
    let _ = finish_tx.send(Some(Finish {
        expected: writes.measured_ok,
        deadline: Instant::now() + drain,
    }));

    let mut total = SubTally::new()?;
    let mut disconnected = 0_usize;
    while let Some(done) = subscribers.join_next().await {
        let tally = done.context("a subscriber task panicked")??;
        disconnected += usize::from(tally.disconnected);
        total.merge(tally)?;
    }
    drop(finish_tx);

    let secs = duration.as_secs_f64();
    let subscribers_u64 = u64::try_from(args.subscribers).unwrap_or(u64::MAX);
    let expected = writes.measured_ok.saturating_mul(subscribers_u64);
    let missing = expected.saturating_sub(total.received);
    let delivered_per_sec = total.received as f64 / secs;
    let h = &total.latency_us;
    let q = |quantile: f64| {
        if h.is_empty() {
            0.0
        } else {
            ms(h.value_at_quantile(quantile) as f64)
        }
    };
    let (p50, p90, p99, p999) = (q(0.50), q(0.90), q(0.99), q(0.999));
    let (max, mean) = if h.is_empty() {
        (0.0, 0.0)
    } else {
        (ms(h.max() as f64), ms(h.mean()))
    };
    let pw = &writes.post_latency_us;
    let (post_p50, post_p99) = if pw.is_empty() {
        (0.0, 0.0)
    } else {
        (
            ms(pw.value_at_quantile(0.50) as f64),
            ms(pw.value_at_quantile(0.99) as f64),
        )
    };

    println!(
        "url={} type={} subscribers={} rate={}/s warmup={:.1}s duration={secs:.1}s drain={:.1}s",
        args.url,
        args.doc_type,
        args.subscribers,
        args.rate,
        warmup.as_secs_f64(),
        drain.as_secs_f64(),
    );
    println!(
        "writes: {} ok, {} errors in the measured window ({} ok, {} errors during warmup; {} late ticks); POST p50={post_p50:.2}ms p99={post_p99:.2}ms",
        writes.measured_ok,
        writes.measured_errors,
        writes.warmup_ok,
        writes.warmup_errors,
        writes.late_ticks,
    );
    println!(
        "events: expected {expected} ({} writes x {} subscribers), received {}, missing {missing}; {delivered_per_sec:.0} events/s delivered",
        writes.measured_ok, args.subscribers, total.received,
    );
    println!(
        "errors: {connect_errors} connect, {disconnected} disconnected, {} resets, {} bad frames",
        total.resets, total.bad_frames,
    );
    println!(
        "latency (ms, write sent -> add event received): p50={p50:.2} p90={p90:.2} p99={p99:.2} p99.9={p999:.2} max={max:.2} mean={mean:.2}"
    );
    if let Some(e) = writes.first_error.as_ref().or(total.first_error.as_ref()) {
        println!("first error: {e}");
    }

    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "url": args.url,
            "type": args.doc_type,
            "subscribers": args.subscribers,
            "rate": args.rate,
            "warmup_secs": warmup.as_secs_f64(),
            "duration_secs": secs,
            "drain_secs": drain.as_secs_f64(),
            "setup_secs": setup_secs,
            "subscribed": subscribed,
            "live_queries": sub_ids.len(),
            "connect_errors": connect_errors,
            "disconnected": disconnected,
            "resets": total.resets,
            "bad_frames": total.bad_frames,
            "writes_ok": writes.measured_ok,
            "write_errors": writes.measured_errors,
            "warmup_writes_ok": writes.warmup_ok,
            "warmup_write_errors": writes.warmup_errors,
            "late_ticks": writes.late_ticks,
            "post_latency_ms": { "p50": post_p50, "p99": post_p99 },
            "events_expected": expected,
            "events_received": total.received,
            "events_missing": missing,
            "warmup_events_received": total.warmup_received,
            "events_per_sec": delivered_per_sec,
            "latency_ms": {
                "p50": p50, "p90": p90, "p99": p99, "p99_9": p999, "max": max, "mean": mean,
            },
            "first_connect_error": first_connect_error,
            "first_error": writes.first_error.as_ref().or(total.first_error.as_ref()),
        });
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(args))
}
