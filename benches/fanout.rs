//! Load tool of the WebSocket fan-out benchmark suite (`benches/fanout.sh`):
//! `cargo bench --bench fanout -- <scenario> --url http://127.0.0.1:PORT --token ...`.
//!
//! Scenarios (all against `/v1/ws`, subprotocol `vibe.v1` with the token as the second offered
//! value; only loopback URLs are accepted):
//!
//! - `broadcast`: N subscribers send the same `{"op":"read","type":T,"global":true,"limit":10}`
//!   (one live query, N subscribers); one writer `POST`s `/v1/docs/T` at `--rate` with
//!   `data.sent_us`; every subscriber times write sent → `add` received (HDR histograms).
//! - `idle`: N connections, each subscribed to that query (or not: `--no-subscribe`), held for
//!   `--duration`; reports the server's RSS before and after and the memory per connection.
//! - `distinct`: subscriber i reads `where: {"data.k": i}` (N distinct live queries); the writer
//!   cycles `data.k` over 0..N, so every event must reach exactly one subscriber.
//! - `churn`: N subscribed connections; every second `--churn-rate` of them close and reconnect
//!   with `since` = the last cursor they saw; reports reconnects/s, `resumed: true/false`, and
//!   per connection which created documents were missed or delivered twice.
//!
//! Common to all: `--source-addrs K` spreads the client sockets over 127.0.0.1..127.0.0.K (a
//! `TcpSocket` bound to `127.0.0.x:0` before connecting, so tens of thousands of connections do
//! not run out of ephemeral ports); `--server-pid` samples the server's CPU time and RSS from
//! `/proc` (the client's own CPU is always reported); RLIMIT_NOFILE is raised to the hard limit;
//! a progress line goes to stderr every second; `--json` writes the results for scripts.

// Printing the results is this tool's job.
#![allow(clippy::print_stdout)]

#[path = "common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use fastwebsockets::{OpCode, WebSocketError};
use hdrhistogram::Histogram;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use common::{
    CONNECT_TIMEOUT, Connected, EventFrame, Finish, Latency, ProcSample, Progress, SubTally,
    SubscriberSetup, Target, WriterConfig, WriterTally, close, close_reason, collect_ready,
    connect, histogram, parse_url, raise_nofile, read_request, seconds, source_addr,
    spawn_progress, subscriber, unix_micros, writer,
};

/// WebSocket fan-out benchmark load tool.
#[derive(Debug, Parser)]
#[command(name = "fanout")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true, global = true)]
    bench: bool,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// N subscribers of one global live query, one writer.
    Broadcast(LoadArgs),
    /// N connections held open (subscribed or not): memory per connection.
    Idle(IdleArgs),
    /// N subscribers of N distinct live queries (`where data.k = i`), one writer.
    Distinct(LoadArgs),
    /// N subscribers, some closing and resuming with `since` every second, one writer.
    Churn(ChurnArgs),
}

#[derive(Debug, Args)]
struct CommonArgs {
    /// Base URL of the server; loopback only, e.g. http://127.0.0.1:8080
    #[arg(long)]
    url: String,
    /// Token with read and write scope on `--type`.
    #[arg(long, env = "VIBE_BENCH_TOKEN", hide_env_values = true)]
    token: String,
    /// WebSocket connections.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Spread client sockets over the source addresses 127.0.0.1..127.0.0.K.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    source_addrs: u8,
    /// The server's process id: report its CPU time and RSS (from /proc).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Measured seconds (of writing; idle: of holding the connections).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of writing before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// After the last write: how long subscribers wait for events still in flight.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// WebSocket connections being opened at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Document type the writer creates and the live queries read.
    #[arg(long = "type", default_value = "benchfanout")]
    doc_type: String,
}

#[derive(Debug, Args)]
struct LoadArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Documents created per second by the writer (fixed-interval ticker).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
}

#[derive(Debug, Args)]
struct IdleArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Only open the connections; send no `read`.
    #[arg(long)]
    no_subscribe: bool,
}

#[derive(Debug, Args)]
struct ChurnArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Documents created per second by the writer.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Connections closed and reopened (resuming with `since`) every second.
    #[arg(long, default_value_t = 10)]
    churn_rate: usize,
}

/// Checked common settings and the probes every scenario uses.
#[derive(Debug)]
struct Setup {
    target: Arc<Target>,
    token: Arc<str>,
    nofile: u64,
    warmup: Duration,
    duration: Duration,
    drain: Duration,
    server_pid: Option<String>,
    progress: Arc<Progress>,
}

impl Setup {
    fn new(common: &CommonArgs, label: &'static str) -> anyhow::Result<(Self, Probe)> {
        if common.connections == 0 {
            bail!("--connections must be at least 1");
        }
        if common.connect_concurrency == 0 {
            bail!("--connect-concurrency must be at least 1");
        }
        let duration = seconds(common.duration, "duration")?;
        if duration.is_zero() {
            bail!("--duration must be positive");
        }
        let target = Arc::new(parse_url(&common.url)?);
        if common.source_addrs > 1 && !target.addr.is_ipv4() {
            bail!("--source-addrs needs an IPv4 --url (127.0.0.1)");
        }
        let nofile = raise_nofile(common.connections, "connections")?;
        let server_pid = common.server_pid.map(|p| p.to_string());
        if let Some(pid) = &server_pid {
            ProcSample::take(pid).with_context(|| format!("--server-pid {pid}"))?;
        }
        let progress = Arc::new(Progress::default());
        let probe = Probe {
            task: spawn_progress(label, progress.clone()),
        };
        Ok((
            Self {
                target,
                token: common.token.as_str().into(),
                nofile,
                warmup: seconds(common.warmup, "warmup")?,
                duration,
                drain: seconds(common.drain, "drain")?,
                server_pid,
                progress,
            },
            probe,
        ))
    }

    fn source(&self, common: &CommonArgs, index: usize) -> Option<std::net::Ipv4Addr> {
        if self.target.addr.is_ipv4() {
            source_addr(index, common.source_addrs)
        } else {
            None
        }
    }

    fn server_sample(&self) -> Option<ProcSample> {
        self.server_pid
            .as_deref()
            .and_then(|pid| ProcSample::take(pid).ok())
    }
}

/// Stops the progress line when dropped.
#[derive(Debug)]
struct Probe {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Client and server CPU over a window, and the server's RSS at its end.
#[derive(Debug, Clone, Copy)]
struct CpuWindow {
    client_start: ProcSample,
    server_start: Option<ProcSample>,
}

impl CpuWindow {
    fn start(setup: &Setup) -> anyhow::Result<Self> {
        Ok(Self {
            client_start: ProcSample::take("self")?,
            server_start: setup.server_sample(),
        })
    }

    fn finish(&self, setup: &Setup) -> anyhow::Result<serde_json::Value> {
        let client = ProcSample::take("self")?;
        let server = setup.server_sample();
        let client_cpu = self.client_start.cpu_percent(&client);
        let (server_cpu, server_rss) = match (self.server_start, server) {
            (Some(a), Some(b)) => (Some(a.cpu_percent(&b)), Some(b.rss_kib)),
            _ => (None, None),
        };
        println!(
            "cpu: client {client_cpu:.0}% of a core{}; client RSS {:.1} MiB",
            match (server_cpu, server_rss) {
                (Some(c), Some(r)) => format!(
                    ", server {c:.0}% of a core, server RSS {:.1} MiB",
                    r as f64 / 1024.0
                ),
                _ => String::new(),
            },
            client.rss_kib as f64 / 1024.0,
        );
        Ok(serde_json::json!({
            "client_cpu_percent": client_cpu,
            "client_rss_kib": client.rss_kib,
            "server_cpu_percent": server_cpu,
            "server_rss_kib": server_rss,
        }))
    }
}

fn write_json(path: Option<&PathBuf>, report: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn check_rate(rate: f64) -> anyhow::Result<()> {
    if !(rate.is_finite() && rate > 0.0) {
        bail!("--rate must be a positive number of writes per second");
    }
    Ok(())
}

fn u64_of(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn post_latency(writes: &WriterTally) -> serde_json::Value {
    let l = Latency::of(&writes.post_latency_us);
    serde_json::json!({"p50": l.p50, "p99": l.p99})
}

/// `broadcast` (one shared query) and `distinct` (one query per subscriber).
async fn run_subscribed(args: LoadArgs, distinct: bool) -> anyhow::Result<()> {
    let label = if distinct { "distinct" } else { "broadcast" };
    let common = &args.common;
    check_rate(args.rate)?;
    let (setup, _probe) = Setup::new(common, label)?;
    let n = common.connections;

    let setup_started = Instant::now();
    let connect_slots = Arc::new(Semaphore::new(common.connect_concurrency));
    let (ready_tx, mut ready_rx) = mpsc::channel(n);
    let (finish_tx, finish_rx) = watch::channel(None::<Finish>);
    let measure_from = Arc::new(AtomicU64::new(u64::MAX));
    let mut subscribers = JoinSet::new();
    for i in 0..n {
        let key = u64_of(i);
        let filter = distinct.then(|| serde_json::json!({ "data.k": key }));
        subscribers.spawn(subscriber(SubscriberSetup {
            target: setup.target.clone(),
            token: setup.token.clone(),
            read: read_request(&common.doc_type, filter),
            source: setup.source(common, i),
            expect_index: if distinct { i } else { 0 },
            expect_k: distinct.then_some(key),
            connect_slots: connect_slots.clone(),
            ready: ready_tx.clone(),
            finish: finish_rx.clone(),
            measure_from: measure_from.clone(),
            progress: setup.progress.clone(),
        }));
    }
    drop(ready_tx);
    drop(finish_rx);
    let (subscribed, connect_errors, first_connect_error, live_queries) =
        collect_ready(&mut ready_rx).await;
    let setup_secs = setup_started.elapsed().as_secs_f64();
    eprintln!(
        "[{label}] subscribed {subscribed} of {n} in {setup_secs:.1}s ({live_queries} live queries, {connect_errors} connect errors)"
    );
    if subscribed == 0 {
        bail!(
            "no subscriber could connect: {}",
            first_connect_error.unwrap_or_default()
        );
    }

    let window = CpuWindow::start(&setup)?;
    let start = Instant::now();
    let measure_from_us =
        unix_micros() + u64::try_from(setup.warmup.as_micros()).unwrap_or(u64::MAX);
    measure_from.store(measure_from_us, Ordering::Release);
    let writes = writer(WriterConfig {
        base_url: setup.target.base_url.clone(),
        token: common.token.clone(),
        doc_type: common.doc_type.clone(),
        rate: args.rate,
        start,
        measure_from_us,
        stop_at: start + setup.warmup + setup.duration,
        keys: distinct.then_some(u64_of(n)),
        collect_ids: false,
    })
    .await?;
    let cpu = window.finish(&setup)?;
    let expected_each = if distinct {
        writes.measured_ok_by_key.clone()
    } else {
        vec![writes.measured_ok]
    };
    let _ = finish_tx.send(Some(Finish {
        expected: Arc::new(expected_each),
        deadline: Instant::now() + setup.drain,
    }));

    let mut total = SubTally::new()?;
    let mut disconnected = 0_usize;
    while let Some(done) = subscribers.join_next().await {
        let tally = done.context("a subscriber task panicked")??;
        disconnected += usize::from(tally.disconnected);
        total.merge(tally)?;
    }
    drop(finish_tx);

    let secs = setup.duration.as_secs_f64();
    let expected = if distinct {
        writes.measured_ok
    } else {
        writes.measured_ok.saturating_mul(u64_of(n))
    };
    let missing = expected.saturating_sub(total.received);
    let events_per_sec = total.received as f64 / secs;
    let latency = Latency::of(&total.latency_us);
    let errors = u64_of(connect_errors + disconnected)
        + total.resets
        + total.bad_frames
        + total.misrouted
        + writes.measured_errors
        + writes.warmup_errors;
    println!(
        "{label}: url={} connections={n} live_queries={live_queries} rate={}/s warmup={:.1}s duration={secs:.1}s source_addrs={} nofile={}",
        common.url,
        args.rate,
        setup.warmup.as_secs_f64(),
        common.source_addrs,
        setup.nofile,
    );
    println!(
        "writes: {} ok, {} errors ({} late ticks); events: expected {expected}, received {}, missing {missing}, misrouted {}; {events_per_sec:.0} events/s delivered",
        writes.measured_ok,
        writes.measured_errors + writes.warmup_errors,
        writes.late_ticks,
        total.received,
        total.misrouted,
    );
    println!(
        "errors: {connect_errors} connect, {disconnected} disconnected, {} resets, {} bad frames",
        total.resets, total.bad_frames,
    );
    println!(
        "latency (ms): p50={:.2} p90={:.2} p99={:.2} p99.9={:.2} max={:.2} mean={:.2}",
        latency.p50, latency.p90, latency.p99, latency.p999, latency.max, latency.mean,
    );
    let first_error = writes
        .first_error
        .clone()
        .or(first_connect_error.clone())
        .or(total.first_error.clone());
    if let Some(e) = &first_error {
        println!("first error: {e}");
    }
    let report = serde_json::json!({
        "scenario": label,
        "url": common.url,
        "connections": n,
        "source_addrs": common.source_addrs,
        "nofile_limit": setup.nofile,
        "rate": args.rate,
        "warmup_secs": setup.warmup.as_secs_f64(),
        "duration_secs": secs,
        "setup_secs": setup_secs,
        "subscribed": subscribed,
        "live_queries": live_queries,
        "connect_errors": connect_errors,
        "disconnected": disconnected,
        "resets": total.resets,
        "bad_frames": total.bad_frames,
        "misrouted": total.misrouted,
        "writes_ok": writes.measured_ok,
        "write_errors": writes.measured_errors + writes.warmup_errors,
        "late_ticks": writes.late_ticks,
        "post_latency_ms": post_latency(&writes),
        "events_expected": expected,
        "events_received": total.received,
        "events_missing": missing,
        "events_per_sec": events_per_sec,
        "latency_ms": latency.json(),
        "errors": errors,
        "cpu": cpu,
        "first_error": first_error,
    });
    write_json(common.json.as_ref(), &report)
}

/// `idle`: open, hold, measure memory.
async fn run_idle(args: IdleArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let (setup, _probe) = Setup::new(common, "idle")?;
    let n = common.connections;
    // Let the server settle before the baseline.
    let before = setup.server_sample();
    let client_before = ProcSample::take("self")?;

    let started = Instant::now();
    let connect_slots = Arc::new(Semaphore::new(common.connect_concurrency));
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<String, String>>(n);
    let (stop_tx, stop_rx) = watch::channel(false);
    let read = (!args.no_subscribe).then(|| read_request(&common.doc_type, None));
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let target = setup.target.clone();
        let token = setup.token.clone();
        let read = read.clone();
        let source = setup.source(common, i);
        let slots = connect_slots.clone();
        let ready = ready_tx.clone();
        let mut stop = stop_rx.clone();
        let progress = setup.progress.clone();
        tasks.spawn(async move {
            let connected = {
                let _slot = slots.acquire().await.ok();
                tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    connect(&target, &token, source, read.as_ref()),
                )
                .await
            };
            let mut stream = match connected {
                Ok(Ok(Connected { stream, reply, .. })) => {
                    let sub = reply
                        .as_ref()
                        .and_then(|r| r["sub"].as_str())
                        .unwrap_or_default()
                        .to_owned();
                    progress.connected.fetch_add(1, Ordering::Relaxed);
                    let _ = ready.send(Ok(sub)).await;
                    stream
                }
                Ok(Err(e)) => {
                    let _ = ready.send(Err(format!("{e:#}"))).await;
                    return None;
                }
                Err(_) => {
                    let _ = ready
                        .send(Err(format!("could not connect within {CONNECT_TIMEOUT:?}")))
                        .await;
                    return None;
                }
            };
            drop(ready);
            // Hold: answer pings (fastwebsockets does) until told to stop.
            let read = stream.read_frame();
            tokio::pin!(read);
            let outcome = loop {
                tokio::select! {
                    result = &mut read => break match result {
                        Ok(frame) if frame.opcode == OpCode::Close => Some(format!(
                            "the server closed the connection: {}",
                            close_reason(&frame.payload)
                        )),
                        Ok(_) => None,
                        Err(e) => Some(format!("the connection failed: {e}")),
                    },
                    changed = stop.changed() => {
                        if changed.is_err() || *stop.borrow() {
                            break None;
                        }
                    }
                }
            };
            progress.connected.fetch_sub(1, Ordering::Relaxed);
            // Any frame while idle (an event, a close) ends the hold early for this connection.
            Some(outcome)
        });
    }
    drop(ready_tx);
    let (opened, connect_errors, first_connect_error, live_queries) =
        collect_ready(&mut ready_rx).await;
    let connect_secs = started.elapsed().as_secs_f64();
    eprintln!("[idle] opened {opened} of {n} in {connect_secs:.1}s ({connect_errors} errors)");
    // A moment for the server to finish setting up the last connections.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = setup.server_sample();
    let client_after = ProcSample::take("self")?;
    let hold_end = started + Duration::from_secs_f64(connect_secs) + setup.duration;
    tokio::time::sleep_until(hold_end.into()).await;
    let still_open = setup.progress.connected.load(Ordering::Relaxed);
    let at_end = setup.server_sample();
    let _ = stop_tx.send(true);
    let mut dropped = 0_usize;
    let mut first_error = first_connect_error.clone();
    while let Some(done) = tasks.join_next().await {
        if let Some(Some(e)) = done.context("a connection task panicked")? {
            dropped += 1;
            first_error.get_or_insert(e);
        }
    }

    let per_conn = |a: Option<ProcSample>, b: Option<ProcSample>| match (a, b) {
        (Some(a), Some(b)) if opened > 0 => {
            Some((b.rss_kib as f64 - a.rss_kib as f64) * 1024.0 / opened as f64)
        }
        _ => None,
    };
    let server_per_conn = per_conn(before, after);
    let client_per_conn = per_conn(Some(client_before), Some(client_after));
    let server_cpu = match (before, at_end) {
        (Some(a), Some(b)) => Some(a.cpu_percent(&b)),
        _ => None,
    };
    let mib = |s: Option<ProcSample>| s.map(|s| s.rss_kib as f64 / 1024.0);
    println!(
        "idle: url={} connections={n} subscribed={} live_queries={live_queries} source_addrs={} nofile={} hold={:.1}s",
        common.url,
        !args.no_subscribe,
        common.source_addrs,
        setup.nofile,
        setup.duration.as_secs_f64(),
    );
    println!(
        "opened {opened} in {connect_secs:.2}s ({:.0}/s), {connect_errors} connect errors, {dropped} dropped while held, {still_open} open at the end",
        opened as f64 / connect_secs.max(1e-9),
    );
    if let (Some(b), Some(a)) = (mib(before), mib(after)) {
        println!(
            "server RSS: {b:.1} MiB before, {a:.1} MiB with {opened} open, {:.0} bytes per connection; server CPU {:.0}% of a core over the run",
            server_per_conn.unwrap_or(0.0),
            server_cpu.unwrap_or(0.0),
        );
    }
    println!(
        "client RSS: {:.0} bytes per connection",
        client_per_conn.unwrap_or(0.0)
    );
    if let Some(e) = &first_error {
        println!("first error: {e}");
    }
    let report = serde_json::json!({
        "scenario": "idle",
        "url": common.url,
        "connections": n,
        "subscribe": !args.no_subscribe,
        "source_addrs": common.source_addrs,
        "nofile_limit": setup.nofile,
        "hold_secs": setup.duration.as_secs_f64(),
        "opened": opened,
        "live_queries": live_queries,
        "connect_secs": connect_secs,
        "connects_per_sec": opened as f64 / connect_secs.max(1e-9),
        "connect_errors": connect_errors,
        "disconnected": dropped,
        "open_at_end": still_open,
        "server_rss_before_kib": before.map(|s| s.rss_kib),
        "server_rss_after_kib": after.map(|s| s.rss_kib),
        "server_rss_end_kib": at_end.map(|s| s.rss_kib),
        "server_bytes_per_connection": server_per_conn,
        "server_cpu_percent": server_cpu,
        "client_bytes_per_connection": client_per_conn,
        "events_missing": 0,
        "errors": connect_errors + dropped,
        "first_error": first_error,
    });
    write_json(common.json.as_ref(), &report)
}

/// One churning connection's tallies.
#[derive(Debug)]
struct ChurnTally {
    /// Ids of the documents whose `add` arrived.
    seen: HashSet<u128>,
    duplicates: u64,
    reconnects: u64,
    resumed_true: u64,
    resumed_false: u64,
    reconnect_errors: u64,
    /// Connections the server ended (each is resumed like a churn).
    disconnects: u64,
    resets: u64,
    bad_frames: u64,
    connect_error: bool,
    /// Close → resubscribed.
    reconnect_us: Histogram<u64>,
    first_error: Option<String>,
}

impl ChurnTally {
    fn error(&mut self, message: String) {
        self.first_error.get_or_insert(message);
    }
}

#[derive(Debug)]
struct ChurnSetup {
    target: Arc<Target>,
    token: Arc<str>,
    doc_type: Arc<str>,
    source: Option<std::net::Ipv4Addr>,
    connect_slots: Arc<Semaphore>,
    ready: mpsc::Sender<Result<String, String>>,
    finish: watch::Receiver<Option<Finish>>,
    churn: Arc<Notify>,
    progress: Arc<Progress>,
}

/// What ended one connection of a churning subscriber.
enum Ended {
    Churn,
    Lost(String),
    Done,
}

async fn churner(setup: ChurnSetup) -> anyhow::Result<ChurnTally> {
    let ChurnSetup {
        target,
        token,
        doc_type,
        source,
        connect_slots,
        ready,
        mut finish,
        churn,
        progress,
    } = setup;
    let mut tally = ChurnTally {
        seen: HashSet::new(),
        duplicates: 0,
        reconnects: 0,
        resumed_true: 0,
        resumed_false: 0,
        reconnect_errors: 0,
        disconnects: 0,
        resets: 0,
        bad_frames: 0,
        connect_error: false,
        reconnect_us: histogram()?,
        first_error: None,
    };
    let mut ready = Some(ready);
    let mut cursor: Option<String> = None;
    let mut done: Option<Finish> = None;
    let mut closed_at: Option<Instant> = None;
    'connect: loop {
        let mut read = read_request(&doc_type, None);
        if let Some(c) = &cursor {
            read["since"] = serde_json::Value::String(c.clone());
        }
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
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "could not connect and subscribe within {CONNECT_TIMEOUT:?}"
                ))
            })
        };
        let Connected {
            mut stream,
            reply,
            early,
        } = match connected {
            Ok(c) => c,
            Err(e) => {
                let message = format!("{e:#}");
                if let Some(ready) = ready.take() {
                    tally.connect_error = true;
                    tally.error(message.clone());
                    let _ = ready.send(Err(message)).await;
                    return Ok(tally);
                }
                tally.reconnect_errors += 1;
                tally.error(message);
                if done.as_ref().is_some_and(|f| Instant::now() >= f.deadline) {
                    return Ok(tally);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue 'connect;
            }
        };
        progress.connected.fetch_add(1, Ordering::Relaxed);
        let reply = reply.unwrap_or_default();
        if let Some(ready) = ready.take() {
            let sub = reply["sub"].as_str().unwrap_or_default().to_owned();
            let _ = ready.send(Ok(sub)).await;
        } else {
            tally.reconnects += 1;
            if let Some(at) = closed_at.take() {
                let us = u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX);
                tally.reconnect_us.saturating_record(us.max(1));
            }
        }
        match reply["resumed"].as_bool() {
            // The missed events follow; the cursor moves with them.
            Some(true) => tally.resumed_true += 1,
            resumed => {
                if resumed == Some(false) {
                    tally.resumed_false += 1;
                }
                if let Some(c) = reply["cursor"].as_str() {
                    cursor = Some(c.to_owned());
                }
            }
        }
        let mut on_frame = |tally: &mut ChurnTally, payload: &[u8]| {
            let frame: EventFrame<'_> = match serde_json::from_slice(payload) {
                Ok(f) => f,
                Err(e) => {
                    tally.bad_frames += 1;
                    tally.error(format!("unreadable frame ({e})"));
                    return;
                }
            };
            if let Some(c) = frame.cursor {
                cursor = Some(c.to_owned());
            }
            match frame.event {
                Some("add") => {
                    let id = frame
                        .doc
                        .and_then(|d| d.id)
                        .and_then(|id| uuid::Uuid::parse_str(id).ok());
                    match id {
                        Some(id) => {
                            if !tally.seen.insert(id.as_u128()) {
                                tally.duplicates += 1;
                            }
                            progress.events.fetch_add(1, Ordering::Relaxed);
                        }
                        None => {
                            tally.bad_frames += 1;
                            tally.error("an add event without doc.id".to_owned());
                        }
                    }
                }
                Some("reset") => {
                    tally.resets += 1;
                    tally.error("the live query was reset".to_owned());
                }
                Some(_) => {}
                None => {
                    tally.bad_frames += 1;
                    tally.error(format!(
                        "unexpected frame: {:.200}",
                        String::from_utf8_lossy(payload)
                    ));
                }
            }
        };
        for payload in &early {
            on_frame(&mut tally, payload);
        }
        let complete = |tally: &ChurnTally, done: &Option<Finish>| {
            done.as_ref()
                .is_some_and(|f| u64_of(tally.seen.len()) >= f.expected_for(0))
        };
        let ended = 'read: loop {
            if complete(&tally, &done) {
                break Ended::Done;
            }
            let read = stream.read_frame();
            tokio::pin!(read);
            let result = loop {
                tokio::select! {
                    result = &mut read => break result,
                    () = churn.notified(), if done.is_none() => break 'read Ended::Churn,
                    changed = finish.changed(), if done.is_none() => {
                        if changed.is_err() {
                            break 'read Ended::Done;
                        }
                        done = finish.borrow_and_update().clone();
                        if complete(&tally, &done) {
                            break 'read Ended::Done;
                        }
                    }
                    () = async {
                        match done.as_ref().map(|f| f.deadline) {
                            Some(d) => tokio::time::sleep_until(d.into()).await,
                            None => std::future::pending().await,
                        }
                    } => break 'read Ended::Done,
                }
            };
            match result {
                Ok(frame) => match frame.opcode {
                    OpCode::Text => on_frame(&mut tally, &frame.payload),
                    OpCode::Close => {
                        break Ended::Lost(format!(
                            "the server closed the connection: {}",
                            close_reason(&frame.payload)
                        ));
                    }
                    _ => {}
                },
                Err(WebSocketError::UnexpectedEOF) => {
                    break Ended::Lost("the connection ended".to_owned());
                }
                Err(e) => break Ended::Lost(format!("the connection failed: {e}")),
            }
        };
        progress.connected.fetch_sub(1, Ordering::Relaxed);
        match ended {
            Ended::Done => {
                close(&mut stream).await;
                return Ok(tally);
            }
            Ended::Churn => {
                close(&mut stream).await;
                drop(stream);
            }
            Ended::Lost(message) => {
                tally.disconnects += 1;
                tally.error(message);
                if done.as_ref().is_some_and(|f| Instant::now() >= f.deadline) {
                    return Ok(tally);
                }
            }
        }
        closed_at = Some(Instant::now());
    }
}

/// `churn`: subscribers that keep closing and resuming while a writer writes.
async fn run_churn(args: ChurnArgs) -> anyhow::Result<()> {
    let common = &args.common;
    check_rate(args.rate)?;
    let (setup, _probe) = Setup::new(common, "churn")?;
    let n = common.connections;
    let doc_type: Arc<str> = common.doc_type.as_str().into();

    let setup_started = Instant::now();
    let connect_slots = Arc::new(Semaphore::new(common.connect_concurrency));
    let (ready_tx, mut ready_rx) = mpsc::channel(n);
    let (finish_tx, finish_rx) = watch::channel(None::<Finish>);
    let mut notifies = Vec::with_capacity(n);
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let churn = Arc::new(Notify::new());
        notifies.push(churn.clone());
        tasks.spawn(churner(ChurnSetup {
            target: setup.target.clone(),
            token: setup.token.clone(),
            doc_type: doc_type.clone(),
            source: setup.source(common, i),
            connect_slots: connect_slots.clone(),
            ready: ready_tx.clone(),
            finish: finish_rx.clone(),
            churn,
            progress: setup.progress.clone(),
        }));
    }
    drop(ready_tx);
    drop(finish_rx);
    let (subscribed, connect_errors, first_connect_error, live_queries) =
        collect_ready(&mut ready_rx).await;
    let setup_secs = setup_started.elapsed().as_secs_f64();
    eprintln!(
        "[churn] subscribed {subscribed} of {n} in {setup_secs:.1}s ({connect_errors} connect errors)"
    );
    if subscribed == 0 {
        bail!(
            "no connection could subscribe: {}",
            first_connect_error.unwrap_or_default()
        );
    }

    // Every write counts here (the warmup is just writing before the churn starts).
    let window = CpuWindow::start(&setup)?;
    let start = Instant::now();
    let churn_from = start + setup.warmup;
    let stop_at = churn_from + setup.duration;
    let churn_rate = args.churn_rate.min(n);
    let churn_task = tokio::spawn(async move {
        let mut ticker = tokio::time::interval_at(churn_from.into(), Duration::from_secs(1));
        let mut next = 0_usize;
        let mut requested = 0_u64;
        loop {
            let tick = ticker.tick().await;
            if Instant::from(tick) >= stop_at {
                return requested;
            }
            for _ in 0..churn_rate {
                if let Some(notify) = notifies.get(next % notifies.len().max(1)) {
                    notify.notify_one();
                    requested += 1;
                }
                next += 1;
            }
        }
    });
    let writes = writer(WriterConfig {
        base_url: setup.target.base_url.clone(),
        token: common.token.clone(),
        doc_type: common.doc_type.clone(),
        rate: args.rate,
        start,
        measure_from_us: 0,
        stop_at,
        keys: None,
        collect_ids: true,
    })
    .await?;
    let churn_requested = churn_task.await.context("the churn task panicked")?;
    let cpu = window.finish(&setup)?;
    let ok_ids: HashSet<u128> = writes.ok_ids.iter().copied().collect();
    let _ = finish_tx.send(Some(Finish {
        expected: Arc::new(vec![u64_of(ok_ids.len())]),
        deadline: Instant::now() + setup.drain,
    }));

    let mut reconnect_us = histogram()?;
    let (mut reconnects, mut resumed_true, mut resumed_false) = (0_u64, 0_u64, 0_u64);
    let (mut reconnect_errors, mut disconnects, mut resets, mut bad_frames) = (0, 0, 0, 0);
    let (mut missing, mut duplicates) = (0_u64, 0_u64);
    let (mut conns_missing, mut conns_duplicated) = (0_u64, 0_u64);
    let mut first_error = writes.first_error.clone().or(first_connect_error.clone());
    while let Some(done) = tasks.join_next().await {
        let t = done.context("a connection task panicked")??;
        if t.connect_error {
            // Never subscribed: every write is missing for it.
            missing += u64_of(ok_ids.len());
            conns_missing += 1;
            continue;
        }
        let missed = u64_of(ok_ids.iter().filter(|id| !t.seen.contains(id)).count());
        missing += missed;
        conns_missing += u64::from(missed > 0);
        duplicates += t.duplicates;
        conns_duplicated += u64::from(t.duplicates > 0);
        reconnects += t.reconnects;
        resumed_true += t.resumed_true;
        resumed_false += t.resumed_false;
        reconnect_errors += t.reconnect_errors;
        disconnects += t.disconnects;
        resets += t.resets;
        bad_frames += t.bad_frames;
        reconnect_us
            .add(&t.reconnect_us)
            .context("cannot merge histograms")?;
        if first_error.is_none() {
            first_error = t.first_error;
        }
    }
    drop(finish_tx);

    let secs = setup.duration.as_secs_f64();
    let connects_per_sec = reconnects as f64 / secs;
    let reconnect = Latency::of(&reconnect_us);
    let errors = u64_of(connect_errors)
        + reconnect_errors
        + disconnects
        + resets
        + bad_frames
        + writes.measured_errors
        + writes.warmup_errors;
    println!(
        "churn: url={} connections={n} churn_rate={churn_rate}/s rate={}/s warmup={:.1}s duration={secs:.1}s source_addrs={} nofile={}",
        common.url,
        args.rate,
        setup.warmup.as_secs_f64(),
        common.source_addrs,
        setup.nofile,
    );
    println!(
        "reconnects: {reconnects} of {churn_requested} requested ({connects_per_sec:.1}/s), resumed:true {resumed_true}, resumed:false {resumed_false}; close -> resubscribed p50={:.2}ms p99={:.2}ms max={:.2}ms",
        reconnect.p50, reconnect.p99, reconnect.max,
    );
    println!(
        "documents: {} written; missing {missing} (on {conns_missing} connections), duplicated {duplicates} (on {conns_duplicated} connections)",
        ok_ids.len(),
    );
    println!(
        "errors: {connect_errors} connect, {reconnect_errors} reconnect, {disconnects} disconnected, {resets} resets, {bad_frames} bad frames, {} write errors",
        writes.measured_errors + writes.warmup_errors,
    );
    if let Some(e) = &first_error {
        println!("first error: {e}");
    }
    let report = serde_json::json!({
        "scenario": "churn",
        "url": common.url,
        "connections": n,
        "source_addrs": common.source_addrs,
        "nofile_limit": setup.nofile,
        "rate": args.rate,
        "churn_rate": churn_rate,
        "warmup_secs": setup.warmup.as_secs_f64(),
        "duration_secs": secs,
        "setup_secs": setup_secs,
        "subscribed": subscribed,
        "live_queries": live_queries,
        "writes_ok": ok_ids.len(),
        "write_errors": writes.measured_errors + writes.warmup_errors,
        "churn_requested": churn_requested,
        "reconnects": reconnects,
        "connects_per_sec": connects_per_sec,
        "resumed_true": resumed_true,
        "resumed_false": resumed_false,
        "reconnect_ms": reconnect.json(),
        "events_missing": missing,
        "connections_missing": conns_missing,
        "duplicates": duplicates,
        "connections_duplicated": conns_duplicated,
        "connect_errors": connect_errors,
        "reconnect_errors": reconnect_errors,
        "disconnected": disconnects,
        "resets": resets,
        "bad_frames": bad_frames,
        "errors": errors,
        "cpu": cpu,
        "first_error": first_error,
    });
    write_json(common.json.as_ref(), &report)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match cli.scenario {
            Scenario::Broadcast(args) => run_subscribed(args, false).await,
            Scenario::Distinct(args) => run_subscribed(args, true).await,
            Scenario::Idle(args) => run_idle(args).await,
            Scenario::Churn(args) => run_churn(args).await,
        }
    })
}
