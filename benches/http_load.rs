//! HTTP load client for Vibe's REST API (`cargo bench --bench http_load -- --url ... --token ...`).
//!
//! One keep-alive HTTP/1.1 connection per concurrent worker (hyper's connection-level client, no
//! pool), closed-loop: each worker sends its next request as soon as the previous one answered.
//! After `--warmup` seconds the workers start recording; after `--duration` more seconds they
//! stop. Requests per second count the 2xx answers that completed inside the measured window;
//! latencies are those of requests both sent and answered inside it.
//!
//! Modes:
//! - `create`: `POST /v1/docs/{type}` with `{"data":{"title":"bench","n":<counter>}}`, plus
//!   `"parent":"<id>"` with `--parent` (the create rule's path).
//! - `read`: first creates `--read-docs` documents (not measured) with deterministic ids, then
//!   `GET /v1/docs/{type}/{id}` on ids drawn uniformly at random among them. Document n
//!   (1..=`--read-docs`) has the id `00000000-0000-4000-8000-` followed by n as 12 zero-padded
//!   decimal digits (see [`read_doc_id`]), so other tools (pgbench) can read the same rows. A
//!   document that already exists (409, e.g. a rerun on the same database) is kept as it is.
//!
//! Only loopback URLs are accepted: this is a benchmark for a local server.
//!
//! Used by `benches/rest_vs_pgbench.sh`, which compares it with pgbench doing the same row work.

// Printing the results is this tool's job.
#![allow(clippy::print_stdout)]

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use http::{HeaderValue, Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpStream;

/// Load generator for Vibe's document REST API.
#[derive(Debug, Parser)]
#[command(name = "http_load")]
struct Args {
    /// Base URL of the server; loopback only, e.g. http://127.0.0.1:8080
    #[arg(long)]
    url: String,
    /// Bearer token with write (create) or read+write (read) scope on `--type`.
    #[arg(long, env = "VIBE_BENCH_TOKEN", hide_env_values = true)]
    token: String,
    /// What each request does.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Concurrent workers, each on its own keep-alive connection.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Measured seconds (after the warmup).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Document type the requests use.
    #[arg(long = "type", default_value = "benchdocs")]
    doc_type: String,
    /// Documents created before a read run (numbered 1..=N, see the module docs); reads pick among
    /// them.
    #[arg(long, default_value_t = 1000)]
    read_docs: u64,
    /// Create every document under this one (its ACL `create` rule must admit the token's
    /// subject): the locked, ungrouped create path.
    #[arg(long, value_name = "ID")]
    parent: Option<uuid::Uuid>,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Create,
    Read,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Create => "create",
            Mode::Read => "read",
        }
    }
}

/// What every worker shares.
#[derive(Debug)]
struct Target {
    addr: SocketAddr,
    /// `Host` header value.
    host: HeaderValue,
    authorization: HeaderValue,
    collection_path: String,
    /// Counter for the `n` field of created documents.
    counter: AtomicU64,
    /// `,"parent":"<id>"` for creates under a parent, else empty.
    parent_field: String,
}

/// One worker's tallies.
#[derive(Debug)]
struct Tally {
    latency_us: Histogram<u64>,
    /// 2xx answers completed inside the measured window.
    ok: u64,
    /// Failures inside the measured window, by HTTP status; 0 for transport errors.
    errors: BTreeMap<u16, u64>,
    /// Failures during warmup (not counted above).
    warmup_errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            latency_us: common::histogram()?,
            ok: 0,
            errors: BTreeMap::new(),
            warmup_errors: 0,
            first_error: None,
        })
    }

    fn merge(&mut self, other: Tally) -> anyhow::Result<()> {
        self.latency_us
            .add(&other.latency_us)
            .context("cannot merge latency histograms")?;
        self.ok += other.ok;
        for (status, n) in other.errors {
            *self.errors.entry(status).or_default() += n;
        }
        self.warmup_errors += other.warmup_errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        Ok(())
    }
}

/// The outcome of one request.
enum Outcome {
    /// A 2xx answer (its body read in full and dropped).
    Ok,
    /// A non-2xx answer: status and body.
    Status(u16, Bytes),
    /// The connection failed; the worker reconnects.
    Transport(String),
}

/// A keep-alive HTTP/1.1 connection.
struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true).context("cannot set TCP_NODELAY")?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake failed")?;
        tokio::spawn(async move {
            // Errors surface on the sender as well; nothing more to do with them here.
            let _ = connection.await;
        });
        Ok(Self { sender })
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> Outcome {
        if let Err(e) = self.sender.ready().await {
            return Outcome::Transport(format!("connection not ready: {e}"));
        }
        let response = match self.sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => return Outcome::Transport(format!("request failed: {e}")),
        };
        let status = response.status();
        let body = match response.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return Outcome::Transport(format!("reading the body failed: {e}")),
        };
        if status.is_success() {
            Outcome::Ok
        } else {
            Outcome::Status(status.as_u16(), body)
        }
    }
}

impl Target {
    fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.host.clone())
            .header(header::AUTHORIZATION, self.authorization.clone());
        let body = match body {
            Some(b) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(b))
            }
            None => Full::new(Bytes::new()),
        };
        builder.body(body).context("cannot build the request")
    }

    fn create_request(&self) -> anyhow::Result<Request<Full<Bytes>>> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let parent = &self.parent_field;
        let body = format!(r#"{{"data":{{"title":"bench","n":{n}}}{parent}}}"#);
        self.request(Method::POST, &self.collection_path, Some(body))
    }

    /// `POST` creating read document `n` under its deterministic id.
    fn seed_request(&self, n: u64) -> anyhow::Result<Request<Full<Bytes>>> {
        let id = read_doc_id(n);
        let body = format!(r#"{{"id":"{id}","data":{{"title":"bench","n":{n}}}}}"#);
        self.request(Method::POST, &self.collection_path, Some(body))
    }
}

/// The largest read document number: [`read_doc_id`] has 12 decimal digits for it.
const MAX_READ_DOCS: u64 = 999_999_999_999;

/// The id of read document `n` (1..=[`MAX_READ_DOCS`]): `00000000-0000-4000-8000-` followed by
/// `n` as 12 zero-padded decimal digits, a valid (version 4, RFC 4122 variant) UUID string.
/// `benches/rest_vs_pgbench.sh` builds the same ids in SQL.
fn read_doc_id(n: u64) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

/// Creates read documents 1..=`count` over `concurrency` connections; returns how many were
/// created and how many already existed (409).
async fn seed(target: &Arc<Target>, count: u64, concurrency: usize) -> anyhow::Result<(u64, u64)> {
    let next = Arc::new(AtomicU64::new(1));
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let target = target.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(target.addr).await?;
            let (mut created, mut existing) = (0_u64, 0_u64);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n > count {
                    break;
                }
                match conn.send(target.seed_request(n)?).await {
                    Outcome::Ok => created += 1,
                    Outcome::Status(409, _) => existing += 1,
                    Outcome::Status(status, body) => {
                        bail!(
                            "seeding {}: HTTP {status}: {}",
                            read_doc_id(n),
                            String::from_utf8_lossy(&body)
                        )
                    }
                    Outcome::Transport(e) => bail!("seeding {}: {e}", read_doc_id(n)),
                }
            }
            anyhow::Ok((created, existing))
        }));
    }
    let (mut created, mut existing) = (0, 0);
    for task in tasks {
        let (c, e) = task.await.context("a seeding task panicked")??;
        created += c;
        existing += e;
    }
    Ok((created, existing))
}

async fn worker(
    target: Arc<Target>,
    mode: Mode,
    read_docs: u64,
    seed: u64,
    measure_from: Instant,
    stop_at: Instant,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::new()?;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut conn = Conn::open(target.addr).await?;
    let item_prefix = format!("{}/", target.collection_path);
    loop {
        let sent = Instant::now();
        if sent >= stop_at {
            break;
        }
        let req = match mode {
            Mode::Create => target.create_request()?,
            Mode::Read => {
                let id = read_doc_id(rng.random_range(1..=read_docs));
                target.request(Method::GET, &format!("{item_prefix}{id}"), None)?
            }
        };
        let outcome = conn.send(req).await;
        let done = Instant::now();
        let measured = sent >= measure_from && done <= stop_at;
        let in_window = done >= measure_from && done <= stop_at;
        match outcome {
            Outcome::Ok => {
                if in_window {
                    tally.ok += 1;
                }
                if measured {
                    let micros =
                        u64::try_from(done.duration_since(sent).as_micros()).unwrap_or(u64::MAX);
                    tally.latency_us.saturating_record(micros.max(1));
                }
            }
            Outcome::Status(status, body) => {
                note_error(&mut tally, in_window, status, || {
                    format!("HTTP {status}: {}", String::from_utf8_lossy(&body))
                });
            }
            Outcome::Transport(e) => {
                note_error(&mut tally, in_window, 0, || e.clone());
                // The connection is unusable; open a new one (a failure here ends the worker).
                conn = Conn::open(target.addr).await?;
            }
        }
    }
    Ok(tally)
}

fn note_error(tally: &mut Tally, in_window: bool, status: u16, describe: impl FnOnce() -> String) {
    if in_window {
        *tally.errors.entry(status).or_default() += 1;
    } else {
        tally.warmup_errors += 1;
    }
    if tally.first_error.is_none() {
        tally.first_error = Some(describe());
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let warmup = common::seconds(args.warmup, "warmup")?;
    let duration = common::seconds(args.duration, "duration")?;
    if duration.is_zero() {
        bail!("--duration must be positive");
    }
    let url = common::parse_url(&args.url)?;
    let host = HeaderValue::from_str(&url.authority).context("invalid host in --url")?;
    let authorization = HeaderValue::from_str(&format!("Bearer {}", args.token.trim()))
        .context("--token is not a valid header value")?;
    let target = Arc::new(Target {
        addr: url.addr,
        host,
        authorization,
        collection_path: format!("/v1/docs/{}", args.doc_type),
        counter: AtomicU64::new(0),
        parent_field: args
            .parent
            .map(|id| format!(r#","parent":"{id}""#))
            .unwrap_or_default(),
    });

    if args.mode == Mode::Read {
        if !(1..=MAX_READ_DOCS).contains(&args.read_docs) {
            bail!("--read-docs must be between 1 and {MAX_READ_DOCS}");
        }
        let started = Instant::now();
        let (created, existing) = seed(&target, args.read_docs, args.concurrency).await?;
        println!(
            "seeded {} documents of type {} ({created} created, {existing} already there) in {:.1}s",
            args.read_docs,
            args.doc_type,
            started.elapsed().as_secs_f64()
        );
    }

    let start = Instant::now();
    let measure_from = start + warmup;
    let stop_at = measure_from + duration;
    let mut tasks = Vec::with_capacity(args.concurrency);
    for i in 0..args.concurrency {
        tasks.push(tokio::spawn(worker(
            target.clone(),
            args.mode,
            args.read_docs,
            0x5eed_0000 + i as u64,
            measure_from,
            stop_at,
        )));
    }
    let mut total = Tally::new()?;
    for task in tasks {
        total.merge(task.await.context("a worker panicked")??)?;
    }

    let secs = duration.as_secs_f64();
    let rps = total.ok as f64 / secs;
    let error_count: u64 = total.errors.values().sum();
    let h = &total.latency_us;
    let (p50, p90, p99, max, mean) = if h.is_empty() {
        (0, 0, 0, 0, 0.0)
    } else {
        (
            h.value_at_quantile(0.50),
            h.value_at_quantile(0.90),
            h.value_at_quantile(0.99),
            h.max(),
            h.mean(),
        )
    };

    println!(
        "mode={} url={} type={} concurrency={} warmup={:.1}s duration={:.1}s",
        args.mode.as_str(),
        args.url,
        args.doc_type,
        args.concurrency,
        warmup.as_secs_f64(),
        secs
    );
    println!(
        "requests: {} ok, {error_count} errors ({} during warmup)",
        total.ok, total.warmup_errors
    );
    println!("throughput: {rps:.1} req/s");
    println!("latency (µs): p50={p50} p90={p90} p99={p99} max={max} mean={mean:.0}");
    if !total.errors.is_empty() {
        let by_status: Vec<String> = total
            .errors
            .iter()
            .map(|(s, n)| {
                if *s == 0 {
                    format!("transport: {n}")
                } else {
                    format!("HTTP {s}: {n}")
                }
            })
            .collect();
        println!("errors by status: {}", by_status.join(", "));
    }
    if let Some(e) = &total.first_error {
        println!("first error: {e}");
    }

    if let Some(path) = &args.json {
        let errors: serde_json::Map<String, serde_json::Value> = total
            .errors
            .iter()
            .map(|(s, n)| {
                let key = if *s == 0 {
                    "transport".to_owned()
                } else {
                    s.to_string()
                };
                (key, serde_json::Value::from(*n))
            })
            .collect();
        let report = serde_json::json!({
            "mode": args.mode.as_str(),
            "parent": args.parent,
            "url": args.url,
            "type": args.doc_type,
            "concurrency": args.concurrency,
            "warmup_secs": warmup.as_secs_f64(),
            "duration_secs": secs,
            "requests_ok": total.ok,
            "requests_per_sec": rps,
            "errors": error_count,
            "errors_by_status": errors,
            "warmup_errors": total.warmup_errors,
            "first_error": total.first_error,
            "latency_us": { "p50": p50, "p90": p90, "p99": p99, "max": max, "mean": mean },
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
