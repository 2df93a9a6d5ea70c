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
//! WebSocket) in its own HDR histogram, and `now_us - doc.updatedAt` (commit → event received:
//! `updatedAt` is the server's `now()` in the writing transaction, taken before it commits, so
//! this leaves out only the writer's HTTP request) in a second one; the histograms are merged
//! at the end. Documents sent during the first `--warmup` seconds are written and delivered but
//! not counted. After `--duration` measured seconds the writer stops; subscribers then wait (up
//! to `--drain` seconds) for the events still in flight.
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

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use common::{
    Finish, Latency, Progress, SubTally, SubscriberSetup, WriterConfig, collect_ready, ms,
    parse_url, raise_nofile, read_request, seconds, subscriber, unix_micros, writer,
};

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
    let target = Arc::new(parse_url(&args.url)?);

    // One socket per subscriber, plus the writer's: lift the soft limit as far as allowed.
    raise_nofile(args.subscribers, "subscribers")?;

    // Subscribe everyone, then fix the measure instant, then start writing.
    let setup_started = Instant::now();
    let connect_slots = Arc::new(Semaphore::new(args.connect_concurrency));
    let (ready_tx, mut ready_rx) = mpsc::channel(args.subscribers);
    let (finish_tx, finish_rx) = watch::channel(None::<Finish>);
    let measure_from = Arc::new(AtomicU64::new(u64::MAX));
    let token: Arc<str> = args.token.as_str().into();
    let read = read_request(&args.doc_type, None, 10);
    let progress = Arc::new(Progress::default());
    let mut subscribers = JoinSet::new();
    for _ in 0..args.subscribers {
        subscribers.spawn(subscriber(SubscriberSetup {
            target: target.clone(),
            token: token.clone(),
            read: read.clone(),
            source: None,
            expect_index: 0,
            expect_k: None,
            connect_slots: connect_slots.clone(),
            ready: ready_tx.clone(),
            finish: finish_rx.clone(),
            measure_from: measure_from.clone(),
            progress: progress.clone(),
        }));
    }
    drop(ready_tx);
    drop(finish_rx);

    let (subscribed, connect_errors, first_connect_error, live_queries) =
        collect_ready(&mut ready_rx).await;
    let setup_secs = setup_started.elapsed().as_secs_f64();
    println!(
        "subscribed {subscribed} of {} connections in {setup_secs:.1}s ({} live quer{}, {connect_errors} connect errors)",
        args.subscribers,
        live_queries,
        if live_queries == 1 { "y" } else { "ies" },
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
    let writes = writer(WriterConfig {
        base_url: target.base_url.clone(),
        token: args.token.clone(),
        doc_type: args.doc_type.clone(),
        rate: args.rate,
        start,
        measure_from_us,
        stop_at,
        keys: None,
        acls: Vec::new(),
        collect_ids: false,
    })
    .await?;
    let _ = finish_tx.send(Some(Finish {
        expected: Arc::new(vec![writes.measured_ok]),
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
    let Latency {
        p50,
        p90,
        p99,
        p999,
        max,
        mean,
    } = Latency::of(&total.latency_us);
    let commit = Latency::of(&total.commit_latency_us);
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
    println!(
        "latency (ms, commit -> add event received): p50={:.2} p90={:.2} p99={:.2} p99.9={:.2} max={:.2} mean={:.2}",
        commit.p50, commit.p90, commit.p99, commit.p999, commit.max, commit.mean,
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
            "live_queries": live_queries,
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
            "commit_latency_ms": commit.json(),
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
