//! Live queries at scale (benches/live_queries.sh runs it): many live queries with distinct
//! parameters on one node, changes at a steady rate, and what routing them costs.
//!
//! Two measurements, in one run:
//! 1. In process, on the pure cores the server runs (`QueryIndex` + `QuerySpec::concerns`):
//!    time to route one change among all the queries, against the naive scan that tests every
//!    query, over the same changes.
//! 2. Against a running `vibe serve`: opens connections holding `--queries` subscriptions
//!    (`{"type": T, "where": {"data.room": "r<i>"}}`, one room each), reads the server's RSS
//!    before and after subscribing (memory per idle live query), writes `--rate` changes per
//!    second straight into PostgreSQL (half inserts into a random room, half moves of an earlier
//!    document to another room: a `remove` in one query and an `add` in another), counts the
//!    events that arrive and their commit-to-receive latency, and reads the server's own
//!    `vibe_live_query_match_seconds` histogram from /metrics.
//!
//! The token comes from `VIBE_BENCH_TOKEN` (scope `*`, subject = `--owner`).

#![allow(clippy::print_stdout)] // a command-line tool: its report goes to stdout

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use chrono::Utc;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use uuid::Uuid;
use vibe_actors::change::{Change, Cursor, Image, Op};
use vibe_actors::query::{QueryLimits, QueryRequest, QuerySpec};
use vibe_actors::query_index::QueryIndex;

struct Args {
    url: String,
    database_url: String,
    server_pid: String,
    owner: String,
    doc_type: String,
    queries: usize,
    per_connection: usize,
    rate: u64,
    duration: Duration,
    json: Option<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        url: String::new(),
        database_url: String::new(),
        server_pid: String::new(),
        owner: "did:key:zBench".into(),
        doc_type: "lqbench".into(),
        queries: 100_000,
        per_connection: 250,
        rate: 1000,
        duration: Duration::from_secs(20),
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => args.url = value()?,
            "--database-url" => args.database_url = value()?,
            "--server-pid" => args.server_pid = value()?,
            "--owner" => args.owner = value()?,
            "--type" => args.doc_type = value()?,
            "--queries" => args.queries = value()?.parse()?,
            "--per-connection" => args.per_connection = value()?.parse()?,
            "--rate" => args.rate = value()?.parse()?,
            "--duration" => args.duration = Duration::from_secs_f64(value()?.parse()?),
            "--json" => args.json = Some(value()?),
            // Passed by `cargo bench`.
            "--bench" => {}
            other => bail!("unknown flag {other}"),
        }
    }
    if args.url.is_empty() || args.database_url.is_empty() || args.server_pid.is_empty() {
        bail!("--url, --database-url and --server-pid are required");
    }
    if !args.url.starts_with("http://127.") {
        bail!("--url must be a loopback http:// URL");
    }
    if args.per_connection == 0 || args.per_connection > 256 {
        bail!("--per-connection is 1 to 256 (the server's ws.max_subscriptions)");
    }
    Ok(args)
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn rss_kib(pid: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

fn room_query(doc_type: &str, room: usize) -> Value {
    json!({"type": doc_type, "where": {"data.room": format!("r{room}")}, "limit": 10})
}

fn quantiles_us(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.5),
        "p90_us": h.value_at_quantile(0.9),
        "p99_us": h.value_at_quantile(0.99),
        "max_us": h.max(),
    })
}

/// Part 1: the pure cores, in this process.
fn core_bench(args: &Args) -> anyhow::Result<Value> {
    let specs: Vec<QuerySpec> = (0..args.queries)
        .map(|room| {
            let request: QueryRequest = serde_json::from_value(room_query(&args.doc_type, room))?;
            QuerySpec::parse(&request, &args.owner, QueryLimits::default())
                .map_err(anyhow::Error::from)
        })
        .collect::<anyhow::Result<_>>()?;
    let mut index = QueryIndex::default();
    for (i, spec) in specs.iter().enumerate() {
        index.insert(i as u64, spec);
    }
    let mut rng = rand::rng();
    let image = |room: usize| Image {
        acl: Default::default(),
        data: json!({"room": format!("r{room}"), "ts": 0, "body": "hello"}),
    };
    let changes: Vec<Change> = (0..2000)
        .map(|i| Change {
            cursor: Cursor::new(1, i),
            xid: 1,
            op: Op::Update,
            doc_id: Uuid::now_v7(),
            doc_type: args.doc_type.clone(),
            owner: args.owner.clone(),
            parent: None,
            rev: 2,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            logged_at: Utc::now(),
            old: Some(image(rng.random_range(0..args.queries))),
            new: Some(image(rng.random_range(0..args.queries))),
        })
        .collect();
    let mut indexed = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut scanned = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut candidates = Vec::new();
    let mut concerned_total = 0usize;
    for change in &changes {
        let started = Instant::now();
        index.candidates(change, &mut candidates);
        let concerned = candidates
            .iter()
            .filter(|id| specs[**id as usize].concerns(change))
            .count();
        indexed.record(started.elapsed().as_nanos() as u64)?;
        concerned_total += concerned;
    }
    // The scan is slow by design: time a tenth of the changes.
    for change in changes.iter().take(200) {
        let started = Instant::now();
        let concerned = specs.iter().filter(|s| s.concerns(change)).count();
        scanned.record(started.elapsed().as_nanos() as u64)?;
        std::hint::black_box(concerned);
    }
    let ns = |h: &Histogram<u64>| {
        json!({"changes": h.len(), "p50_us": h.value_at_quantile(0.5) as f64 / 1000.0,
               "p99_us": h.value_at_quantile(0.99) as f64 / 1000.0})
    };
    Ok(json!({
        "queries": args.queries,
        "indexed": ns(&indexed),
        "scan": ns(&scanned),
        "concerned_per_change": concerned_total as f64 / changes.len() as f64,
    }))
}

#[derive(Default)]
struct Counters {
    adds: AtomicU64,
    removes: AtomicU64,
    changes: AtomicU64,
    errors: AtomicU64,
}

/// Opens one connection, authenticates and subscribes to `rooms`; returns it ready to read.
async fn open(
    args: &Args,
    token: &str,
    rooms: std::ops::Range<usize>,
) -> anyhow::Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
> {
    let ws_url = format!("{}/v1/ws", args.url.replacen("http://", "ws://", 1));
    let mut request = ws_url.into_client_request()?;
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "vibe.v1".parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await?;
    ws.send(Message::text(
        json!({"id": 0, "op": "auth", "token": token}).to_string(),
    ))
    .await?;
    let count = rooms.len();
    for room in rooms {
        let mut read = room_query(&args.doc_type, room);
        read["id"] = json!(room + 1);
        read["op"] = json!("read");
        ws.send(Message::text(read.to_string())).await?;
    }
    let mut replies = 0;
    while replies < count + 1 {
        let Some(message) = ws.next().await else {
            bail!("connection closed while subscribing");
        };
        if let Message::Text(text) = message? {
            let v: Value = serde_json::from_str(&text)?;
            if v.get("error").is_some() {
                bail!("subscription failed: {v}");
            }
            if v.get("re").is_some() {
                replies += 1;
            }
        }
    }
    Ok(ws)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(parse_args()?);
    let token = std::env::var("VIBE_BENCH_TOKEN").context("VIBE_BENCH_TOKEN is not set")?;

    println!(
        "== in process: {} live queries, routing 2000 changes",
        args.queries
    );
    let core = core_bench(&args)?;
    println!(
        "   indexed routing p50 {} µs, p99 {} µs; naive scan of every query p50 {} µs",
        core["indexed"]["p50_us"], core["indexed"]["p99_us"], core["scan"]["p50_us"]
    );

    // Part 2: the server.
    let connections = args.queries.div_ceil(args.per_connection);
    println!(
        "== server: {} live queries over {connections} connections",
        args.queries
    );
    let rss_before = rss_kib(&args.server_pid)?;
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(connections);
    // A few connections subscribe at once; the type actor starts their queries one by one.
    let mut opening = tokio::task::JoinSet::new();
    let mut next_room = 0;
    let parallel = 8;
    while next_room < args.queries || !opening.is_empty() {
        while opening.len() < parallel && next_room < args.queries {
            let end = (next_room + args.per_connection).min(args.queries);
            let (a, t, rooms) = (args.clone(), token.clone(), next_room..end);
            opening.spawn(async move { open(&a, &t, rooms).await });
            next_room = end;
        }
        if let Some(done) = opening.join_next().await {
            sockets.push(done??);
            if sockets.len() % 40 == 0 {
                println!(
                    "   {} queries subscribed ({:.0} s)",
                    sockets.len() * args.per_connection,
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
    let subscribe_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(&args.server_pid)?;
    let per_query = (rss_after.saturating_sub(rss_before) as f64 * 1024.0) / args.queries as f64;
    println!(
        "   subscribed in {subscribe_seconds:.1} s; server RSS {rss_before} -> {rss_after} KiB: \
         {per_query:.0} B per live query (connections included)"
    );

    // Readers: count events, time adds (data.ts is the write's send time).
    let counters = Arc::new(Counters::default());
    let latency = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        600_000_000,
        3,
    )?));
    let mut readers = tokio::task::JoinSet::new();
    for mut ws in sockets {
        let (counters, latency) = (counters.clone(), latency.clone());
        readers.spawn(async move {
            while let Some(Ok(message)) = ws.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                match v["event"].as_str() {
                    Some("add") => {
                        counters.adds.fetch_add(1, Ordering::Relaxed);
                        if let Some(ts) = v["doc"]["data"]["ts"].as_u64()
                            && let Ok(mut h) = latency.lock()
                        {
                            let _ = h.record(unix_micros().saturating_sub(ts).max(1));
                        }
                    }
                    Some("remove") => {
                        counters.removes.fetch_add(1, Ordering::Relaxed);
                    }
                    Some("change") => {
                        counters.changes.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(_) => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {}
                }
            }
        });
    }

    // The writer: `rate` changes a second for `duration`, in 10 ms batches.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&args.database_url)
        .await?;
    let metrics_before = match_histogram(&args.url).await?;
    let mut rng = rand::rng();
    let mut written: Vec<Uuid> = Vec::new();
    let (mut inserts, mut moves) = (0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let batches = (args.duration.as_millis() / 10) as u64;
    let per_batch = (args.rate / 100).max(1);
    let write_started = Instant::now();
    for _ in 0..batches {
        tick.tick().await;
        for _ in 0..per_batch {
            let room = format!("r{}", rng.random_range(0..args.queries));
            let ts = unix_micros();
            if written.is_empty() || rng.random_bool(0.5) {
                let id = Uuid::now_v7();
                sqlx::query(
                    "INSERT INTO documents (id, owner_did, type, data) \
                     VALUES ($1, $2, $3, jsonb_build_object('room', $4::text, 'ts', $5::bigint))",
                )
                .bind(id)
                .bind(&args.owner)
                .bind(&args.doc_type)
                .bind(&room)
                .bind(ts as i64)
                .execute(&pool)
                .await?;
                written.push(id);
                inserts += 1;
            } else {
                let id = written[rng.random_range(0..written.len())];
                sqlx::query(
                    "UPDATE documents SET data = jsonb_build_object('room', $2::text, 'ts', $3::bigint), \
                     rev = rev + 1, updated_at = now() WHERE id = $1",
                )
                .bind(id)
                .bind(&room)
                .bind(ts as i64)
                .execute(&pool)
                .await?;
                moves += 1;
            }
        }
    }
    let write_seconds = write_started.elapsed().as_secs_f64();
    // Every insert adds once; every move adds once (the same room: a change instead).
    let expected_adds_or_changes = inserts + moves;
    let drain_deadline = Instant::now() + Duration::from_secs(15);
    while counters.adds.load(Ordering::Relaxed) + counters.changes.load(Ordering::Relaxed)
        < expected_adds_or_changes
        && Instant::now() < drain_deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics_after = match_histogram(&args.url).await?;
    readers.abort_all();

    let routed = metrics_after.count - metrics_before.count;
    let median_bucket = metrics_after.quantile_bound(&metrics_before, 0.5);
    let p99_bucket = metrics_after.quantile_bound(&metrics_before, 0.99);
    let latency = latency
        .lock()
        .map_err(|_| anyhow::anyhow!("latency lock poisoned"))?
        .clone();
    let adds = counters.adds.load(Ordering::Relaxed);
    let changes = counters.changes.load(Ordering::Relaxed);
    println!(
        "   wrote {inserts} inserts + {moves} moves in {write_seconds:.1} s ({:.0}/s)",
        (inserts + moves) as f64 / write_seconds
    );
    println!(
        "   events: {adds} add, {} remove, {changes} change, {} error (expected {expected_adds_or_changes} add+change)",
        counters.removes.load(Ordering::Relaxed),
        counters.errors.load(Ordering::Relaxed),
    );
    println!(
        "   commit-to-client (add) p50 {:.2} ms, p99 {:.2} ms",
        latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0
    );
    println!(
        "   server routing per change ({routed} changes): median ≤ {} µs, p99 ≤ {} µs (histogram bucket bounds)",
        median_bucket * 1e6,
        p99_bucket * 1e6
    );
    let report = json!({
        "queries": args.queries,
        "connections": connections,
        "core": core,
        "server": {
            "subscribe_seconds": subscribe_seconds,
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "bytes_per_live_query": per_query,
            "writes": {"inserts": inserts, "moves": moves, "seconds": write_seconds},
            "events": {"add": adds, "remove": counters.removes.load(Ordering::Relaxed),
                       "change": changes, "error": counters.errors.load(Ordering::Relaxed),
                       "expected_add_or_change": expected_adds_or_changes},
            "add_latency": quantiles_us(&latency),
            "routing": {"changes": routed, "median_le_us": median_bucket * 1e6,
                        "p99_le_us": p99_bucket * 1e6},
        },
    });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    if adds + changes < expected_adds_or_changes {
        bail!(
            "events missing: {} of {expected_adds_or_changes}",
            adds + changes
        );
    }
    Ok(())
}

/// The server's `vibe_live_query_match_seconds` histogram (cumulative buckets).
struct MatchHistogram {
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl MatchHistogram {
    /// The upper bound of the bucket holding quantile `q` of the samples since `before`.
    fn quantile_bound(&self, before: &MatchHistogram, q: f64) -> f64 {
        let total = self.count.saturating_sub(before.count);
        let target = (total as f64 * q).ceil() as u64;
        let earlier: HashMap<u64, u64> = before
            .buckets
            .iter()
            .map(|(le, n)| (le.to_bits(), *n))
            .collect();
        for (le, n) in &self.buckets {
            let since = n.saturating_sub(earlier.get(&le.to_bits()).copied().unwrap_or(0));
            if since >= target {
                return *le;
            }
        }
        f64::INFINITY
    }
}

async fn match_histogram(url: &str) -> anyhow::Result<MatchHistogram> {
    let text = reqwest::get(format!("{url}/metrics")).await?.text().await?;
    let mut histogram = MatchHistogram {
        count: 0,
        buckets: Vec::new(),
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("vibe_live_query_match_seconds_bucket{le=\"") {
            let Some((le, value)) = rest.split_once("\"} ") else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse()?
            };
            histogram.buckets.push((le, value.trim().parse()?));
        } else if let Some(value) = line.strip_prefix("vibe_live_query_match_seconds_count ") {
            histogram.count = value.trim().parse()?;
        }
    }
    histogram
        .buckets
        .sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
    Ok(histogram)
}
