//! Load tool of the WebSocket fan-out benchmark suite (`benches/fanout.sh`):
//! `cargo bench --bench fanout -- <scenario> --url http://127.0.0.1:PORT --token ...`.
//!
//! Scenarios (all against `/v1/ws`, subprotocol `vibe.v1` with the token as the second offered
//! value; only loopback URLs are accepted):
//!
//! - `broadcast`: N subscribers send the same `{"op":"read","type":T,"global":true,"limit":L}`
//!   (one live query, N subscribers; `--limit`, 10: once the window holds L documents, each write
//!   also sends every subscriber a `remove`, counted but not timed); one writer `POST`s
//!   `/v1/docs/T` at `--rate` with
//!   `data.sent_us`; every subscriber times write sent → `add` received, and commit → `add`
//!   received from the document's `updatedAt` (the server's `now()` in the writing transaction,
//!   taken before the commit; HDR histograms).
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
//!
//! More connections than one process may open (the open-files hard limit is per process):
//! `--processes K` (broadcast, distinct, idle) runs this program K more times as worker
//! processes, with the same arguments plus a hidden `--worker I/K`. Worker I opens connections
//! I, I+K, I+2K, … from its share of the source addresses (every K-th of them, or one when there
//! are fewer addresses than workers) and keeps its own histogram; this process only drives the
//! writes. They talk in JSON lines: each worker prints `ready` on its stdout once all its
//! connections are subscribed (or failed); when all K are ready the parent writes `start` to
//! each worker's stdin and waits for `started` before the first write, then `stop` (with the
//! events each subscriber should get, and the drain time) when the writer is done; each worker
//! answers with its `report` (counters and its histogram's buckets) and exits. The parent merges
//! the reports, and its client CPU and RSS include the workers' (from `/proc/<pid>`).

// Printing the results is this tool's job.
#![allow(clippy::print_stdout)]

#[path = "common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use fastwebsockets::{OpCode, WebSocketError};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use common::{
    CONNECT_TIMEOUT, Connected, EventFrame, Finish, Latency, ProcSample, Progress, Protocol,
    SubTally, SubscriberSetup, Target, WriterConfig, WriterTally, close, close_reason,
    collect_ready, collect_ready_subs, connect, histogram, parse_url, raise_nofile, read_request,
    seconds, spawn_progress, subscriber, unix_micros, writer,
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
    /// Token the writer creates documents with (default: `--token`). With a writer other than
    /// the subscribers, every delivery is decided by the subscriber's read access: the owner of
    /// a document may always read it, so its own subscriptions never consult the ACL.
    #[arg(long, env = "VIBE_BENCH_WRITER_TOKEN", hide_env_values = true)]
    writer_token: Option<String>,
    /// WebSocket connections.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Spread client sockets over the source addresses 127.0.0.1..127.0.0.K.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    source_addrs: u8,
    /// Client processes opening the connections (each has its own open-files limit): with K > 1
    /// this program starts itself K times as workers, worker I opening connections I, I+K, …
    /// from its share of the source addresses, while this process drives the writes and merges
    /// the workers' results. broadcast, distinct and idle only.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    processes: u16,
    /// Run as worker I of K (0-based) of a parent started with `--processes K`.
    #[arg(long, hide = true, value_name = "I/K", value_parser = parse_worker)]
    worker: Option<WorkerId>,
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
    /// WebSocket connections being opened at once (per client process).
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Document type the writer creates and the live queries read.
    #[arg(long = "type", default_value = "benchfanout")]
    doc_type: String,
    /// The live queries' `limit`: each subscriber's window holds this many documents, and once
    /// it is full every new document pushes the oldest out with a `remove` event (every server
    /// sends it: the peers keep the same windows). A limit above the writes of a run means
    /// adds only.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=1000))]
    limit: u16,
    /// What the server's WebSocket speaks: `vibe` (`vibe.v1`: Vibe and the bare and Node peers),
    /// or `graphql-ws` (the PostGraphile peer: `graphql-transport-ws` at `/graphql`, a pg-pubsub
    /// `listen` subscription whose every result counts as an `add`; broadcast and idle only).
    #[arg(long, value_enum, default_value_t = Protocol::Vibe)]
    protocol: Protocol,
}

impl CommonArgs {
    fn writer_token(&self) -> &str {
        self.writer_token.as_deref().unwrap_or(&self.token)
    }
}

#[derive(Debug, Args)]
struct LoadArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Documents created per second by the writer (fixed-interval ticker).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// The documents' ACLs: `public` (allow `*`), or `mixed` (in turn: public; DID allow and
    /// deny lists; certificate predicates in allow and deny), all readable by the subscribers.
    #[arg(long, default_value = "public", value_parser = ["public", "mixed"])]
    acl: String,
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

/// `--worker I/K`: worker `index` (0-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WorkerId {
    index: usize,
    count: usize,
}

fn parse_worker(value: &str) -> Result<WorkerId, String> {
    let (index, count) = value
        .split_once('/')
        .ok_or_else(|| format!("expected I/K, got {value:?}"))?;
    let index: usize = index
        .parse()
        .map_err(|e| format!("invalid worker index {index:?}: {e}"))?;
    let count: usize = count
        .parse()
        .map_err(|e| format!("invalid worker count {count:?}: {e}"))?;
    if index >= count {
        return Err(format!("worker {index}/{count}: I must be below K"));
    }
    Ok(WorkerId { index, count })
}

/// How this process takes part in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Opens every connection and drives the writes (`--processes 1`).
    Single,
    /// Drives the writes; `processes` worker processes open the connections.
    Parent { processes: usize },
    /// Opens its share of the connections and reports to the parent.
    Worker(WorkerId),
}

impl Role {
    fn of(common: &CommonArgs) -> Self {
        match common.worker {
            Some(worker) => Self::Worker(worker),
            None if common.processes > 1 => Self::Parent {
                processes: usize::from(common.processes),
            },
            None => Self::Single,
        }
    }

    /// Client processes holding connections (1 without workers).
    fn processes(self) -> usize {
        match self {
            Self::Single => 1,
            Self::Parent { processes } => processes,
            Self::Worker(w) => w.count,
        }
    }
}

/// Checked common settings and the probes every scenario uses.
#[derive(Debug)]
struct Setup {
    role: Role,
    target: Arc<Target>,
    token: Arc<str>,
    /// The open-files limit of this process.
    nofile: u64,
    warmup: Duration,
    duration: Duration,
    drain: Duration,
    server_pid: Option<String>,
    /// The server's open-files soft limit (its own connection ceiling), when known.
    server_nofile: Option<u64>,
    /// Source addresses of this process's connections, used in turn (empty: the kernel's
    /// choice).
    sources: Vec<Ipv4Addr>,
    progress: Arc<Progress>,
}

impl Setup {
    /// ` processes=K server_nofile=L` for the report's header line (each only when it applies).
    fn report_suffix(&self) -> String {
        let processes = self.role.processes();
        let mut suffix = String::new();
        if processes > 1 {
            suffix.push_str(&format!(" processes={processes}"));
        }
        if let Some(limit) = self.server_nofile {
            suffix.push_str(&format!(" server_nofile={limit}"));
        }
        suffix
    }

    fn new(common: &CommonArgs, label: &'static str) -> anyhow::Result<(Self, Probe)> {
        let n = common.connections;
        if n == 0 {
            bail!("--connections must be at least 1");
        }
        if common.connect_concurrency == 0 {
            bail!("--connect-concurrency must be at least 1");
        }
        let duration = seconds(common.duration, "duration")?;
        if duration.is_zero() {
            bail!("--duration must be positive");
        }
        if common.protocol != Protocol::Vibe && matches!(label, "distinct" | "churn") {
            bail!(
                "--protocol graphql-ws serves broadcast and idle only ({label} needs Vibe's `where` and `since`)"
            );
        }
        let target = Arc::new(Target {
            protocol: common.protocol,
            ..parse_url(&common.url)?
        });
        if common.source_addrs > 1 && !target.addr.is_ipv4() {
            bail!("--source-addrs needs an IPv4 --url (127.0.0.1)");
        }
        let role = Role::of(common);
        let nofile = match role {
            Role::Single => raise_nofile(n, "connections").map_err(|e| {
                anyhow::anyhow!("{e:#}; or split the client over processes with --processes K")
            })?,
            Role::Parent { processes } => {
                if processes > n {
                    bail!("--processes ({processes}) must not exceed --connections ({n})");
                }
                raise_nofile(n.div_ceil(processes), "connections per client process")?
            }
            Role::Worker(w) => {
                if w.count != usize::from(common.processes) || w.count > n {
                    bail!(
                        "--worker {}/{} does not fit --processes {} and --connections {n}",
                        w.index,
                        w.count,
                        common.processes
                    );
                }
                raise_nofile((n - w.index).div_ceil(w.count), "connections")?
            }
        };
        let sources = if target.addr.is_ipv4() {
            source_share(common.source_addrs, role)
        } else {
            Vec::new()
        };
        // The parent samples the server; workers only hold connections.
        let server_pid = match role {
            Role::Worker(_) => None,
            _ => common.server_pid.map(|p| p.to_string()),
        };
        if let Some(pid) = &server_pid {
            ProcSample::take(pid).with_context(|| format!("--server-pid {pid}"))?;
        }
        let server_nofile = server_pid.as_deref().and_then(nofile_limit_of);
        let progress = Arc::new(Progress::default());
        let task = match role {
            // The workers print the progress of their connections.
            Role::Parent { .. } => None,
            Role::Single => Some(spawn_progress(label, progress.clone())),
            Role::Worker(w) => {
                let label = format!("{label} {}/{}", w.index + 1, w.count);
                Some(spawn_progress(label.leak(), progress.clone()))
            }
        };
        Ok((
            Self {
                role,
                target,
                token: common.token.as_str().into(),
                nofile,
                warmup: seconds(common.warmup, "warmup")?,
                duration,
                drain: seconds(common.drain, "drain")?,
                server_pid,
                server_nofile,
                sources,
                progress,
            },
            Probe { task },
        ))
    }

    /// The global indices of the connections this process opens (none in a parent).
    fn share(&self, n: usize) -> std::iter::StepBy<std::ops::Range<usize>> {
        match self.role {
            Role::Single => (0..n).step_by(1),
            Role::Parent { .. } => (0..0).step_by(1),
            Role::Worker(w) => (w.index..n).step_by(w.count),
        }
    }

    /// The source address of this process's `local`-th connection.
    fn source(&self, local: usize) -> Option<Ipv4Addr> {
        self.sources.get(local % self.sources.len().max(1)).copied()
    }

    fn server_sample(&self) -> Option<ProcSample> {
        self.server_pid
            .as_deref()
            .and_then(|pid| ProcSample::take(pid).ok())
    }
}

/// The source addresses of one process: 127.0.0.1..=`spread`, or a worker's share of them
/// (every K-th, starting at its index; when there are fewer addresses than workers, one).
fn source_share(spread: u8, role: Role) -> Vec<Ipv4Addr> {
    let all: Vec<Ipv4Addr> = (1..=spread).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    match role {
        Role::Worker(w) if all.len() >= w.count => {
            all.into_iter().skip(w.index).step_by(w.count).collect()
        }
        Role::Worker(w) => all
            .get(w.index % all.len().max(1))
            .copied()
            .into_iter()
            .collect(),
        _ => all,
    }
}

/// The open-files soft limit of process `pid` (`/proc/<pid>/limits`; `None` when unlimited or
/// unreadable).
fn nofile_limit_of(pid: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

/// Stops the progress line when dropped.
#[derive(Debug)]
struct Probe {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Client and server CPU over a window, and the server's RSS at its end. The client is this
/// process and its workers, if any.
#[derive(Debug, Clone)]
struct CpuWindow {
    client_start: ProcSample,
    server_start: Option<ProcSample>,
    /// Each worker's pid and its sample at the start.
    workers: Vec<(String, ProcSample)>,
}

impl CpuWindow {
    fn start(setup: &Setup, workers: &[u32]) -> anyhow::Result<Self> {
        let workers = workers
            .iter()
            .map(|pid| {
                let pid = pid.to_string();
                let sample =
                    ProcSample::take(&pid).with_context(|| format!("client worker {pid}"))?;
                Ok((pid, sample))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            client_start: ProcSample::take("self")?,
            server_start: setup.server_sample(),
            workers,
        })
    }

    fn finish(&self, setup: &Setup) -> anyhow::Result<serde_json::Value> {
        let client = ProcSample::take("self")?;
        let server = setup.server_sample();
        let mut client_cpu = self.client_start.cpu_percent(&client);
        let mut client_rss = client.rss_kib;
        for (pid, start) in &self.workers {
            let now = ProcSample::take(pid).with_context(|| format!("client worker {pid}"))?;
            client_cpu += start.cpu_percent(&now);
            client_rss += now.rss_kib;
        }
        let (server_cpu, server_rss) = match (self.server_start, server) {
            (Some(a), Some(b)) => (Some(a.cpu_percent(&b)), Some(b.rss_kib)),
            _ => (None, None),
        };
        let processes = 1 + self.workers.len();
        println!(
            "cpu: client {client_cpu:.0}% of a core{}{}; client RSS {:.1} MiB",
            if self.workers.is_empty() {
                String::new()
            } else {
                format!(" ({processes} processes)")
            },
            match (server_cpu, server_rss) {
                (Some(c), Some(r)) => format!(
                    ", server {c:.0}% of a core, server RSS {:.1} MiB",
                    r as f64 / 1024.0
                ),
                _ => String::new(),
            },
            client_rss as f64 / 1024.0,
        );
        Ok(serde_json::json!({
            "client_cpu_percent": client_cpu,
            "client_rss_kib": client_rss,
            "client_processes": processes,
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

// --- worker processes ---------------------------------------------------------------------------

/// Parent → worker: one JSON line on the worker's stdin.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum ToWorker {
    /// The writer starts now; documents sent before `measure_from_us` are warmup documents.
    Start { measure_from_us: u64 },
    /// The writer has stopped: the `add` events each subscriber should get (by connection index,
    /// or one entry for all) and how long to wait for missing ones; idle: close now.
    Stop { expected: Vec<u64>, drain_secs: f64 },
}

impl ToWorker {
    fn kind(&self) -> &'static str {
        match self {
            Self::Start { .. } => "start",
            Self::Stop { .. } => "stop",
        }
    }
}

/// Worker → parent: one JSON line on the worker's stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
enum FromWorker {
    /// Every connection of the worker is subscribed (or has failed).
    Ready(ReadyTally),
    /// The worker has the start time.
    Started,
    /// The worker's results; it exits after sending them.
    Report(WorkerReport),
}

impl FromWorker {
    fn kind(&self) -> &'static str {
        match self {
            Self::Ready(_) => "ready",
            Self::Started => "started",
            Self::Report(_) => "report",
        }
    }
}

/// The outcome of opening (and subscribing) a set of connections.
#[derive(Debug, Default, Serialize, Deserialize)]
struct ReadyTally {
    subscribed: usize,
    connect_errors: usize,
    first_error: Option<String>,
    /// Distinct subscription ids the server answered (one per live query).
    subs: HashSet<String>,
    /// A worker's RSS before it opened its connections (idle).
    rss_before_kib: u64,
}

impl ReadyTally {
    fn merge(&mut self, other: Self) {
        self.subscribed += other.subscribed;
        self.connect_errors += other.connect_errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.subs.extend(other.subs);
        self.rss_before_kib += other.rss_before_kib;
    }
}

/// A worker's results.
#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkerReport {
    received: u64,
    warmup_received: u64,
    misrouted: u64,
    resets: u64,
    removes: u64,
    bad_frames: u64,
    /// Connections that ended before the run did (idle: dropped while held).
    disconnected: usize,
    /// Connections open when `stop` arrived (idle).
    open_at_stop: u64,
    first_error: Option<String>,
    latency_us: EncodedHistogram,
    commit_latency_us: EncodedHistogram,
}

impl WorkerReport {
    fn of_tally(tally: &SubTally, disconnected: usize) -> Self {
        Self {
            received: tally.received,
            warmup_received: tally.warmup_received,
            misrouted: tally.misrouted,
            resets: tally.resets,
            removes: tally.removes,
            bad_frames: tally.bad_frames,
            disconnected,
            open_at_stop: 0,
            first_error: tally.first_error.clone(),
            latency_us: EncodedHistogram::of(&tally.latency_us),
            commit_latency_us: EncodedHistogram::of(&tally.commit_latency_us),
        }
    }

    fn into_tally(self) -> anyhow::Result<SubTally> {
        let mut tally = SubTally::new()?;
        tally.latency_us = self.latency_us.decode()?;
        tally.commit_latency_us = self.commit_latency_us.decode()?;
        tally.received = self.received;
        tally.warmup_received = self.warmup_received;
        tally.misrouted = self.misrouted;
        tally.resets = self.resets;
        tally.removes = self.removes;
        tally.bad_frames = self.bad_frames;
        tally.first_error = self.first_error;
        Ok(tally)
    }
}

/// A latency histogram as its non-empty buckets, (highest equivalent value, count) each.
/// Recorded into a histogram of the same bounds and precision ([`histogram`]) every pair falls
/// into the bucket it came from, so the decoded histogram has the original's quantiles, mean and
/// max exactly. (hdrhistogram's V2 serializer needs the crate's `serialization` feature, which
/// this workspace leaves off.)
#[derive(Debug, Default, Serialize, Deserialize)]
struct EncodedHistogram {
    /// Samples in all (a check on decoding).
    count: u64,
    buckets: Vec<(u64, u64)>,
}

impl EncodedHistogram {
    fn of(h: &Histogram<u64>) -> Self {
        Self {
            count: h.len(),
            buckets: h
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        }
    }

    fn decode(&self) -> anyhow::Result<Histogram<u64>> {
        let mut h = histogram()?;
        for &(value, count) in &self.buckets {
            h.record_n(value, count)
                .with_context(|| format!("cannot record {count} samples of {value} µs"))?;
        }
        if h.len() != self.count {
            bail!(
                "a worker's histogram decoded to {} samples, not {}",
                h.len(),
                self.count
            );
        }
        Ok(h)
    }
}

/// A worker's end of the control pipes: lines from the parent on stdin (read by a thread, so
/// that the process can exit while it waits), messages to it on stdout.
#[derive(Debug)]
struct Control {
    lines: mpsc::Receiver<std::io::Result<String>>,
}

impl Control {
    fn start() -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel(4);
        std::thread::Builder::new()
            .name("fanout-control".to_owned())
            .spawn(move || {
                for line in std::io::stdin().lines() {
                    if tx.blocking_send(line).is_err() {
                        break;
                    }
                }
            })
            .context("cannot start the control thread")?;
        Ok(Self { lines: rx })
    }

    async fn recv(&mut self) -> anyhow::Result<ToWorker> {
        match self.lines.recv().await {
            Some(Ok(line)) => serde_json::from_str(&line)
                .with_context(|| format!("unreadable line from the parent: {line:.200}")),
            Some(Err(e)) => Err(e).context("cannot read from the parent process"),
            None => bail!("the parent process closed the control pipe"),
        }
    }

    fn send(&self, message: &FromWorker) -> anyhow::Result<()> {
        let line = serde_json::to_string(message).context("cannot encode a message")?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .context("cannot write to the parent process")
    }
}

/// One worker process, seen from the parent.
#[derive(Debug)]
struct WorkerProc {
    name: String,
    pid: u32,
    child: Child,
    /// `None` once closed (the worker then exits).
    stdin: Option<ChildStdin>,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl WorkerProc {
    async fn recv(&mut self, what: &str) -> anyhow::Result<FromWorker> {
        let line = self
            .stdout
            .next_line()
            .await
            .with_context(|| format!("cannot read from {}", self.name))?;
        let Some(line) = line else {
            let status = match self.child.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => e.to_string(),
            };
            bail!(
                "{} ended before it sent {what} ({status}; its errors are above)",
                self.name
            );
        };
        let message: FromWorker = serde_json::from_str(&line)
            .with_context(|| format!("{} sent an unreadable line: {line:.200}", self.name))?;
        if message.kind() != what {
            bail!("{} sent {}, expected {what}", self.name, message.kind());
        }
        Ok(message)
    }
}

/// The worker processes of a `--processes K` run.
#[derive(Debug)]
struct Workers {
    procs: Vec<WorkerProc>,
}

impl Workers {
    /// Starts this program `count` times with this process's arguments and `--worker I/K`.
    fn spawn(count: usize, label: &str) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find this program to start workers")?;
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        let mut procs = Vec::with_capacity(count);
        for index in 0..count {
            let name = format!("client worker {}/{count}", index + 1);
            let mut command = std::process::Command::new(&exe);
            command
                .args(&args)
                .arg("--worker")
                .arg(format!("{index}/{count}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut command = tokio::process::Command::from(command);
            // An early return of the parent ends every worker.
            command.kill_on_drop(true);
            let mut child = command
                .spawn()
                .with_context(|| format!("cannot start {name} ({})", exe.display()))?;
            let pid = child
                .id()
                .with_context(|| format!("{name} exited at once"))?;
            let stdin = child.stdin.take().context("no stdin pipe to a worker")?;
            let stdout = child
                .stdout
                .take()
                .context("no stdout pipe from a worker")?;
            procs.push(WorkerProc {
                name,
                pid,
                child,
                stdin: Some(stdin),
                stdout: BufReader::new(stdout).lines(),
            });
        }
        let pids: Vec<String> = procs.iter().map(|p| p.pid.to_string()).collect();
        eprintln!(
            "[{label}] started {count} client worker processes (pids {})",
            pids.join(", ")
        );
        Ok(Self { procs })
    }

    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.pid).collect()
    }

    async fn send(&mut self, message: &ToWorker) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(message).context("cannot encode a message")?;
        line.push('\n');
        for p in &mut self.procs {
            let stdin = p
                .stdin
                .as_mut()
                .with_context(|| format!("the pipe to {} is closed", p.name))?;
            let sent = match stdin.write_all(line.as_bytes()).await {
                Ok(()) => stdin.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                let exited = match p.child.try_wait() {
                    Ok(Some(status)) => format!(" (it has exited: {status}; its errors are above)"),
                    _ => String::new(),
                };
                return Err(e).context(format!(
                    "cannot send {} to {}{exited}",
                    message.kind(),
                    p.name
                ));
            }
        }
        Ok(())
    }

    /// Waits for every worker's `ready` (all its connections subscribed or failed).
    async fn ready(&mut self) -> anyhow::Result<ReadyTally> {
        let mut total = ReadyTally::default();
        for p in &mut self.procs {
            if let FromWorker::Ready(ready) = p.recv("ready").await? {
                total.merge(ready);
            }
        }
        Ok(total)
    }

    /// Sends `start` and waits until every worker has it.
    async fn start(&mut self, measure_from_us: u64) -> anyhow::Result<()> {
        self.send(&ToWorker::Start { measure_from_us }).await?;
        for p in &mut self.procs {
            p.recv("started").await?;
        }
        Ok(())
    }

    /// Sends `stop`, collects every worker's report and waits for the workers to exit.
    async fn stop(
        mut self,
        expected: Vec<u64>,
        drain: Duration,
    ) -> anyhow::Result<Vec<WorkerReport>> {
        self.send(&ToWorker::Stop {
            expected,
            drain_secs: drain.as_secs_f64(),
        })
        .await?;
        let mut reports = Vec::with_capacity(self.procs.len());
        for p in &mut self.procs {
            if let FromWorker::Report(report) = p.recv("report").await? {
                reports.push(report);
            }
        }
        for p in &mut self.procs {
            drop(p.stdin.take());
            let status = tokio::time::timeout(Duration::from_secs(10), p.child.wait())
                .await
                .with_context(|| format!("{} did not exit after its report", p.name))?
                .with_context(|| format!("cannot wait for {}", p.name))?;
            if !status.success() {
                bail!("{} failed after its report ({status})", p.name);
            }
        }
        Ok(reports)
    }
}

// --- broadcast and distinct ---------------------------------------------------------------------

/// The subscriber tasks of this process: every connection, or a worker's share.
#[derive(Debug)]
struct LocalSubscribers {
    tasks: JoinSet<anyhow::Result<SubTally>>,
    ready: mpsc::Receiver<Result<String, String>>,
    finish: watch::Sender<Option<Finish>>,
    measure_from: Arc<AtomicU64>,
}

impl LocalSubscribers {
    fn spawn(setup: &Setup, common: &CommonArgs, distinct: bool) -> Self {
        let n = common.connections;
        let connect_slots = Arc::new(Semaphore::new(common.connect_concurrency));
        let (ready_tx, ready) = mpsc::channel(n);
        let (finish, finish_rx) = watch::channel(None::<Finish>);
        let measure_from = Arc::new(AtomicU64::new(u64::MAX));
        let mut tasks = JoinSet::new();
        for (local, i) in setup.share(n).enumerate() {
            let key = u64_of(i);
            let filter = distinct.then(|| serde_json::json!({ "data.k": key }));
            tasks.spawn(subscriber(SubscriberSetup {
                target: setup.target.clone(),
                token: setup.token.clone(),
                read: read_request(&common.doc_type, filter, common.limit),
                source: setup.source(local),
                expect_index: if distinct { i } else { 0 },
                expect_k: distinct.then_some(key),
                connect_slots: connect_slots.clone(),
                ready: ready_tx.clone(),
                finish: finish_rx.clone(),
                measure_from: measure_from.clone(),
                progress: setup.progress.clone(),
            }));
        }
        Self {
            tasks,
            ready,
            finish,
            measure_from,
        }
    }

    async fn ready(&mut self) -> ReadyTally {
        let (subscribed, connect_errors, first_error, subs) =
            collect_ready_subs(&mut self.ready).await;
        ReadyTally {
            subscribed,
            connect_errors,
            first_error,
            subs,
            rss_before_kib: 0,
        }
    }

    fn start(&self, measure_from_us: u64) {
        self.measure_from.store(measure_from_us, Ordering::Release);
    }

    /// Tells the subscribers the writer has stopped and waits for them: (merged tallies,
    /// connections that ended early).
    async fn stop(
        mut self,
        expected: Arc<Vec<u64>>,
        drain: Duration,
    ) -> anyhow::Result<(SubTally, usize)> {
        let _ = self.finish.send(Some(Finish {
            expected,
            deadline: Instant::now() + drain,
        }));
        let mut total = SubTally::new()?;
        let mut disconnected = 0_usize;
        while let Some(done) = self.tasks.join_next().await {
            let tally = done.context("a subscriber task panicked")??;
            disconnected += usize::from(tally.disconnected);
            total.merge(tally)?;
        }
        Ok((total, disconnected))
    }
}

/// Whoever holds the subscribed connections of a load run.
#[derive(Debug)]
enum Subscribers {
    Local(LocalSubscribers),
    Workers(Workers),
}

impl Subscribers {
    async fn ready(&mut self) -> anyhow::Result<ReadyTally> {
        match self {
            Self::Local(local) => Ok(local.ready().await),
            Self::Workers(workers) => workers.ready().await,
        }
    }

    fn pids(&self) -> Vec<u32> {
        match self {
            Self::Local(_) => Vec::new(),
            Self::Workers(workers) => workers.pids(),
        }
    }

    async fn start(&mut self, measure_from_us: u64) -> anyhow::Result<()> {
        match self {
            Self::Local(local) => {
                local.start(measure_from_us);
                Ok(())
            }
            Self::Workers(workers) => workers.start(measure_from_us).await,
        }
    }

    async fn stop(self, expected: Vec<u64>, drain: Duration) -> anyhow::Result<(SubTally, usize)> {
        match self {
            Self::Local(local) => local.stop(Arc::new(expected), drain).await,
            Self::Workers(workers) => {
                let mut total = SubTally::new()?;
                let mut disconnected = 0_usize;
                for report in workers.stop(expected, drain).await? {
                    disconnected += report.disconnected;
                    total.merge(report.into_tally()?)?;
                }
                Ok((total, disconnected))
            }
        }
    }
}

/// A worker of `broadcast` / `distinct`: subscribes its share, then follows the parent.
async fn worker_subscribed(
    setup: &Setup,
    common: &CommonArgs,
    distinct: bool,
    label: &str,
    worker: WorkerId,
) -> anyhow::Result<()> {
    let mut control = Control::start()?;
    let started = Instant::now();
    let mut subscribers = LocalSubscribers::spawn(setup, common, distinct);
    let ready = subscribers.ready().await;
    eprintln!(
        "[{label} {}/{}] subscribed {} of {} in {:.1}s ({} connect errors)",
        worker.index + 1,
        worker.count,
        ready.subscribed,
        ready.subscribed + ready.connect_errors,
        started.elapsed().as_secs_f64(),
        ready.connect_errors,
    );
    control.send(&FromWorker::Ready(ready))?;
    match control.recv().await? {
        ToWorker::Start { measure_from_us } => subscribers.start(measure_from_us),
        other => bail!("expected start from the parent, got {}", other.kind()),
    }
    control.send(&FromWorker::Started)?;
    let (expected, drain_secs) = match control.recv().await? {
        ToWorker::Stop {
            expected,
            drain_secs,
        } => (expected, drain_secs),
        other => bail!("expected stop from the parent, got {}", other.kind()),
    };
    let (total, disconnected) = subscribers
        .stop(Arc::new(expected), seconds(drain_secs, "drain")?)
        .await?;
    control.send(&FromWorker::Report(WorkerReport::of_tally(
        &total,
        disconnected,
    )))
}

/// `broadcast` (one shared query) and `distinct` (one query per subscriber).
async fn run_subscribed(args: LoadArgs, distinct: bool) -> anyhow::Result<()> {
    let label = if distinct { "distinct" } else { "broadcast" };
    let common = &args.common;
    check_rate(args.rate)?;
    let (setup, _probe) = Setup::new(common, label)?;
    if let Role::Worker(worker) = setup.role {
        return worker_subscribed(&setup, common, distinct, label, worker).await;
    }
    let n = common.connections;

    let setup_started = Instant::now();
    let mut subscribers = match setup.role {
        Role::Parent { processes } => Subscribers::Workers(Workers::spawn(processes, label)?),
        _ => Subscribers::Local(LocalSubscribers::spawn(&setup, common, distinct)),
    };
    let ReadyTally {
        subscribed,
        connect_errors,
        first_error: first_connect_error,
        subs,
        ..
    } = subscribers.ready().await?;
    let live_queries = subs.len();
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

    let window = CpuWindow::start(&setup, &subscribers.pids())?;
    let start = Instant::now();
    let measure_from_us =
        unix_micros() + u64::try_from(setup.warmup.as_micros()).unwrap_or(u64::MAX);
    // Workers: the first write waits until each has the start time.
    subscribers.start(measure_from_us).await?;
    let writes = writer(WriterConfig {
        base_url: setup.target.base_url.clone(),
        token: common.writer_token().to_owned(),
        doc_type: common.doc_type.clone(),
        rate: args.rate,
        start: Instant::now(),
        measure_from_us,
        stop_at: start + setup.warmup + setup.duration,
        keys: distinct.then_some(u64_of(n)),
        collect_ids: false,
        acls: if args.acl == "mixed" {
            common::mixed_acls()
        } else {
            Vec::new()
        },
    })
    .await?;
    let cpu = window.finish(&setup)?;
    let expected_each = if distinct {
        writes.measured_ok_by_key.clone()
    } else {
        vec![writes.measured_ok]
    };
    let (total, disconnected) = subscribers.stop(expected_each, setup.drain).await?;

    let secs = setup.duration.as_secs_f64();
    let expected = if distinct {
        writes.measured_ok
    } else {
        writes.measured_ok.saturating_mul(u64_of(n))
    };
    let missing = expected.saturating_sub(total.received);
    let events_per_sec = total.received as f64 / secs;
    let latency = Latency::of(&total.latency_us);
    let commit_latency = Latency::of(&total.commit_latency_us);
    let errors = u64_of(connect_errors + disconnected)
        + total.resets
        + total.bad_frames
        + total.misrouted
        + writes.measured_errors
        + writes.warmup_errors;
    let processes = setup.role.processes();
    println!(
        "{label}: url={} connections={n} live_queries={live_queries} rate={}/s warmup={:.1}s duration={secs:.1}s source_addrs={} nofile={}{}",
        common.url,
        args.rate,
        setup.warmup.as_secs_f64(),
        common.source_addrs,
        setup.nofile,
        setup.report_suffix(),
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
        "errors: {connect_errors} connect, {disconnected} disconnected, {} resets, {} bad frames; {} remove events (documents leaving a subscriber's window of {})",
        total.resets, total.bad_frames, total.removes, common.limit,
    );
    println!(
        "latency (ms): p50={:.2} p90={:.2} p99={:.2} p99.9={:.2} max={:.2} mean={:.2}",
        latency.p50, latency.p90, latency.p99, latency.p999, latency.max, latency.mean,
    );
    println!(
        "commit-to-client latency (ms): p50={:.2} p90={:.2} p99={:.2} p99.9={:.2} max={:.2} mean={:.2}",
        commit_latency.p50,
        commit_latency.p90,
        commit_latency.p99,
        commit_latency.p999,
        commit_latency.max,
        commit_latency.mean,
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
        "acl": args.acl,
        "scenario": label,
        "url": common.url,
        "connections": n,
        "processes": processes,
        "source_addrs": common.source_addrs,
        "nofile_limit": setup.nofile,
        "server_nofile_limit": setup.server_nofile,
        "rate": args.rate,
        "warmup_secs": setup.warmup.as_secs_f64(),
        "duration_secs": secs,
        "setup_secs": setup_secs,
        "subscribed": subscribed,
        "live_queries": live_queries,
        "connect_errors": connect_errors,
        "disconnected": disconnected,
        "resets": total.resets,
        "removes": total.removes,
        "limit": common.limit,
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
        "commit_latency_ms": commit_latency.json(),
        "errors": errors,
        "cpu": cpu,
        "first_error": first_error,
    });
    write_json(common.json.as_ref(), &report)
}

// --- idle ---------------------------------------------------------------------------------------

/// The held connections of this process (`idle`): every connection, or a worker's share.
#[derive(Debug)]
struct LocalHolders {
    /// Per connection: `None` if it never opened, else `Some(error)` if it ended while held.
    tasks: JoinSet<Option<Option<String>>>,
    ready: mpsc::Receiver<Result<String, String>>,
    stop: watch::Sender<bool>,
    progress: Arc<Progress>,
}

impl LocalHolders {
    fn spawn(setup: &Setup, common: &CommonArgs, subscribe: bool) -> Self {
        let n = common.connections;
        let connect_slots = Arc::new(Semaphore::new(common.connect_concurrency));
        let (ready_tx, ready) = mpsc::channel::<Result<String, String>>(n);
        let (stop, stop_rx) = watch::channel(false);
        let read = subscribe.then(|| read_request(&common.doc_type, None, common.limit));
        let mut tasks = JoinSet::new();
        for (local, _) in setup.share(n).enumerate() {
            let target = setup.target.clone();
            let token = setup.token.clone();
            let read = read.clone();
            let source = setup.source(local);
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
                // Any frame while idle (an event, a close) ends the hold early for this
                // connection.
                Some(outcome)
            });
        }
        Self {
            tasks,
            ready,
            stop,
            progress: setup.progress.clone(),
        }
    }

    async fn ready(&mut self) -> ReadyTally {
        let (subscribed, connect_errors, first_error, subs) =
            collect_ready_subs(&mut self.ready).await;
        ReadyTally {
            subscribed,
            connect_errors,
            first_error,
            subs,
            rss_before_kib: 0,
        }
    }

    /// Closes the connections: (open when told to stop, dropped while held, first error).
    async fn stop(mut self) -> anyhow::Result<(u64, usize, Option<String>)> {
        let open = self.progress.connected.load(Ordering::Relaxed);
        let _ = self.stop.send(true);
        let mut dropped = 0_usize;
        let mut first_error = None;
        while let Some(done) = self.tasks.join_next().await {
            if let Some(Some(e)) = done.context("a connection task panicked")? {
                dropped += 1;
                first_error.get_or_insert(e);
            }
        }
        Ok((open, dropped, first_error))
    }
}

/// Whoever holds the connections of an `idle` run.
#[derive(Debug)]
enum Holders {
    Local(LocalHolders),
    Workers(Workers),
}

impl Holders {
    async fn ready(&mut self) -> anyhow::Result<ReadyTally> {
        match self {
            Self::Local(local) => Ok(local.ready().await),
            Self::Workers(workers) => workers.ready().await,
        }
    }

    /// The RSS of the processes holding the connections.
    fn client_rss_kib(&self) -> anyhow::Result<u64> {
        match self {
            Self::Local(_) => Ok(ProcSample::take("self")?.rss_kib),
            Self::Workers(workers) => workers.pids().iter().try_fold(0, |sum, pid| {
                let pid = pid.to_string();
                let sample =
                    ProcSample::take(&pid).with_context(|| format!("client worker {pid}"))?;
                Ok(sum + sample.rss_kib)
            }),
        }
    }

    /// (open when told to stop, dropped while held, first error)
    async fn stop(self) -> anyhow::Result<(u64, usize, Option<String>)> {
        match self {
            Self::Local(local) => local.stop().await,
            Self::Workers(workers) => {
                let (mut open, mut dropped, mut first_error) = (0, 0, None);
                for report in workers.stop(Vec::new(), Duration::ZERO).await? {
                    open += report.open_at_stop;
                    dropped += report.disconnected;
                    if first_error.is_none() {
                        first_error = report.first_error;
                    }
                }
                Ok((open, dropped, first_error))
            }
        }
    }
}

/// A worker of `idle`: opens its share, holds it until the parent says stop.
async fn worker_idle(
    setup: &Setup,
    common: &CommonArgs,
    subscribe: bool,
    worker: WorkerId,
) -> anyhow::Result<()> {
    let mut control = Control::start()?;
    let rss_before_kib = ProcSample::take("self")?.rss_kib;
    let started = Instant::now();
    let mut holders = LocalHolders::spawn(setup, common, subscribe);
    let mut ready = holders.ready().await;
    ready.rss_before_kib = rss_before_kib;
    eprintln!(
        "[idle {}/{}] opened {} of {} in {:.1}s ({} errors)",
        worker.index + 1,
        worker.count,
        ready.subscribed,
        ready.subscribed + ready.connect_errors,
        started.elapsed().as_secs_f64(),
        ready.connect_errors,
    );
    control.send(&FromWorker::Ready(ready))?;
    match control.recv().await? {
        ToWorker::Stop { .. } => {}
        other => bail!("expected stop from the parent, got {}", other.kind()),
    }
    let (open_at_stop, disconnected, first_error) = holders.stop().await?;
    control.send(&FromWorker::Report(WorkerReport {
        open_at_stop,
        disconnected,
        first_error,
        ..WorkerReport::default()
    }))
}

/// `idle`: open, hold, measure memory.
async fn run_idle(args: IdleArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let (setup, _probe) = Setup::new(common, "idle")?;
    if let Role::Worker(worker) = setup.role {
        return worker_idle(&setup, common, !args.no_subscribe, worker).await;
    }
    let n = common.connections;
    // Let the server settle before the baseline.
    let before = setup.server_sample();
    let client_before = ProcSample::take("self")?;

    let started = Instant::now();
    let mut holders = match setup.role {
        Role::Parent { processes } => Holders::Workers(Workers::spawn(processes, "idle")?),
        _ => Holders::Local(LocalHolders::spawn(&setup, common, !args.no_subscribe)),
    };
    let ready = holders.ready().await?;
    let (opened, connect_errors, live_queries) =
        (ready.subscribed, ready.connect_errors, ready.subs.len());
    // Workers measured their own RSS before opening their connections.
    let client_before_kib = match holders {
        Holders::Local(_) => client_before.rss_kib,
        Holders::Workers(_) => ready.rss_before_kib,
    };
    let connect_secs = started.elapsed().as_secs_f64();
    eprintln!("[idle] opened {opened} of {n} in {connect_secs:.1}s ({connect_errors} errors)");
    // A moment for the server to finish setting up the last connections.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = setup.server_sample();
    let client_after_kib = holders.client_rss_kib()?;
    let hold_end = started + Duration::from_secs_f64(connect_secs) + setup.duration;
    tokio::time::sleep_until(hold_end.into()).await;
    let at_end = setup.server_sample();
    let (still_open, dropped, run_error) = holders.stop().await?;
    let first_error = ready.first_error.or(run_error);

    let per_conn = |before_kib: u64, after_kib: u64| {
        (opened > 0).then(|| (after_kib as f64 - before_kib as f64) * 1024.0 / opened as f64)
    };
    let server_per_conn = match (before, after) {
        (Some(a), Some(b)) => per_conn(a.rss_kib, b.rss_kib),
        _ => None,
    };
    let client_per_conn = per_conn(client_before_kib, client_after_kib);
    let server_cpu = match (before, at_end) {
        (Some(a), Some(b)) => Some(a.cpu_percent(&b)),
        _ => None,
    };
    let mib = |s: Option<ProcSample>| s.map(|s| s.rss_kib as f64 / 1024.0);
    let processes = setup.role.processes();
    println!(
        "idle: url={} connections={n} subscribed={} live_queries={live_queries} source_addrs={} nofile={} hold={:.1}s{}",
        common.url,
        !args.no_subscribe,
        common.source_addrs,
        setup.nofile,
        setup.duration.as_secs_f64(),
        setup.report_suffix(),
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
        "client RSS: {:.0} bytes per connection{}",
        client_per_conn.unwrap_or(0.0),
        if processes > 1 {
            format!(" (over {processes} worker processes)")
        } else {
            String::new()
        },
    );
    if let Some(e) = &first_error {
        println!("first error: {e}");
    }
    let report = serde_json::json!({
        "scenario": "idle",
        "url": common.url,
        "connections": n,
        "processes": processes,
        "subscribe": !args.no_subscribe,
        "source_addrs": common.source_addrs,
        "nofile_limit": setup.nofile,
        "server_nofile_limit": setup.server_nofile,
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
    limit: u16,
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
        limit,
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
        let mut read = read_request(&doc_type, None, limit);
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
    if common.processes > 1 || common.worker.is_some() {
        bail!("churn runs in one client process (--processes 1)");
    }
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
            limit: common.limit,
            source: setup.source(i),
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
    let window = CpuWindow::start(&setup, &[])?;
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
        token: common.writer_token().to_owned(),
        doc_type: common.doc_type.clone(),
        rate: args.rate,
        start,
        measure_from_us: 0,
        stop_at,
        keys: None,
        acls: Vec::new(),
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
