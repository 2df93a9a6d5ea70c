//! Logging (tracing) and the process-wide Prometheus recorder.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Latency buckets in seconds: 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// Routing one change to its live queries takes microseconds: buckets from 1 µs to 10 ms.
const MATCH_BUCKETS: &[f64] = &[
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.01,
];

/// Requests per grouped statement (`database.create_batch_rows` and `read_batch_rows` are at
/// most 1000).
const BATCH_ROW_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1000.0];

/// Counters and gauges exported from the start, at zero, with their `# HELP` text. A series that
/// first appears at its first increment shows no `increase()` or `rate()` for it, so an alert on
/// the first feed resync or revocation sync failure would never fire.
const COUNTERS: &[(&str, &str)] = &[
    (
        "vibe_call_dropped_frames_total",
        "Frames a subscriber's session could not take (lost for that subscriber)",
    ),
    (
        "vibe_call_forwarded_frames_total",
        "Media frames the SFU forwarded",
    ),
    (
        "vibe_call_keyframe_requests_total",
        "Keyframe requests sent to publishers",
    ),
    (
        "vibe_call_receive_drops_total",
        "Datagrams dropped because a room's queue was full",
    ),
    (
        "vibe_call_room_crashes_total",
        "Call room actors that failed",
    ),
    (
        "vibe_call_send_drops_total",
        "Datagrams the SFU could not send",
    ),
    (
        "vibe_call_unrouted_datagrams_total",
        "Datagrams that matched no participant",
    ),
    (
        "vibe_feed_changes_total",
        "Document changes this node read from the change feed",
    ),
    ("vibe_feed_errors_total", "Failed reads of the change feed"),
    (
        "vibe_feed_resyncs_total",
        "Times this node fell behind feed.retention and reloaded every live query (alert on it)",
    ),
    ("vibe_feed_ticks_total", "Change-feed ticks this node cut"),
    (
        "vibe_feed_undecodable_total",
        "Document versions written in SQL that JSON here cannot hold",
    ),
    (
        "vibe_live_query_lagging_total",
        "Live queries that fell 4 pages behind the feed and reloaded",
    ),
    (
        "vibe_live_query_restarts_total",
        "Live queries restarted after a failure",
    ),
    (
        "vibe_query_shapes_dropped_total",
        "Query shapes not recorded (the bounded shape table was full)",
    ),
    (
        "vibe_revocations_sync_failures_total",
        "Failed reads of the revocation list (revoked tokens stay valid here meanwhile)",
    ),
    (
        "vibe_ws_events_total",
        "Events delivered to WebSocket subscribers",
    ),
    (
        "vibe_ws_queue_overflows_total",
        "WebSocket connections closed for an overflowing outbound queue",
    ),
];
const GAUGES: &[(&str, &str)] = &[
    (
        "vibe_call_participants",
        "Participants in this node's call rooms",
    ),
    ("vibe_call_rooms", "Call rooms running on this node"),
    (
        "vibe_changes_waiting",
        "Long-polls of /v1/changes waiting for a change",
    ),
    ("vibe_live_queries", "Distinct live queries on this node"),
    (
        "vibe_live_query_bytes",
        "Bytes (as JSON) the live queries' windows keep",
    ),
    ("vibe_store_creates_waiting", "Creates queued for a writer"),
    (
        "vibe_store_reads_waiting",
        "Reads by id queued for a reader",
    ),
    ("vibe_ws_connections", "Open WebSocket connections"),
    (
        "vibe_ws_subscriptions",
        "Live subscriptions across WebSocket connections",
    ),
];

/// Installs the global log subscriber, writing to standard error. `RUST_LOG` overrides the
/// configured level.
pub fn init_logging(config: &LogConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    // Standard error, as PostgreSQL and most daemons log: standard output is a command's answer
    // (`vibe token mint` prints the token there, for `TOKEN=$(vibe token mint …)`).
    // Colours only for a terminal: a log redirected to a file or a collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second init (tests) keeps the first subscriber.
    let _ = match config.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The process-wide metrics recorder, installed on first use (one per process, however many
/// servers a test starts), with a background thread doing the exporter's upkeep.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Fails only for an empty bucket list, which none of these is.
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                // Full matchers take precedence over suffix ones in the exporter.
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("vibe_live_query_match_seconds".into()),
                        MATCH_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("vibe_store_create_batch_rows".into()),
                        BATCH_ROW_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("vibe_store_read_batch_rows".into()),
                        BATCH_ROW_BUCKETS,
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            // Adding zero registers a series without moving it.
            for &(name, help) in COUNTERS {
                metrics::describe_counter!(name, help);
                metrics::counter!(name).increment(0);
            }
            for &(name, help) in GAUGES {
                metrics::describe_gauge!(name, help);
                metrics::gauge!(name).increment(0.0);
            }
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .ok();
            handle
        })
        .clone()
}
