//! Query shapes and their latencies, aggregated in memory and flushed to `query_shapes` now and
//! then (never one write per query). Only shapes are kept — structure and value kinds — never a
//! value or a caller.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use vibe_actors::query::QuerySpec;

/// Upper bounds of the latency buckets, in milliseconds (the last catches the rest).
pub const BUCKET_BOUNDS_MS: [f64; 12] = [
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    50.0,
    100.0,
    200.0,
    500.0,
    1000.0,
    f64::INFINITY,
];

/// Distinct shapes held between flushes; more are counted as dropped, not stored.
const MAX_SHAPES: usize = 10_000;

#[derive(Debug, Clone)]
pub struct ShapeStats {
    pub doc_type: String,
    pub shape: serde_json::Value,
    pub calls: i64,
    pub total_ms: f64,
    pub buckets: Vec<i64>,
}

#[derive(Debug, Default)]
pub struct ShapeRecorder {
    /// Keyed by the shape's JSON text.
    pending: Mutex<HashMap<String, ShapeStats>>,
}

impl ShapeRecorder {
    pub fn record(&self, spec: &QuerySpec, elapsed: Duration) {
        let shape = spec.shape();
        let key = shape.to_string();
        let ms = elapsed.as_secs_f64() * 1000.0;
        let bucket = BUCKET_BOUNDS_MS
            .iter()
            .position(|bound| ms <= *bound)
            .unwrap_or(BUCKET_BOUNDS_MS.len() - 1);
        // Poisoned only if a holder panicked mid-update; the counts are still usable.
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if !pending.contains_key(&key) && pending.len() >= MAX_SHAPES {
            metrics::counter!("vibe_query_shapes_dropped_total").increment(1);
            return;
        }
        let stats = pending.entry(key).or_insert_with(|| ShapeStats {
            doc_type: spec.doc_type.clone(),
            shape,
            calls: 0,
            total_ms: 0.0,
            buckets: vec![0; BUCKET_BOUNDS_MS.len()],
        });
        stats.calls += 1;
        stats.total_ms += ms;
        stats.buckets[bucket] += 1;
    }

    /// Everything recorded since the last call.
    pub fn take(&self) -> Vec<ShapeStats> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.drain().map(|(_, stats)| stats).collect()
    }
}

/// The latency below which `q` of the calls fell, by bucket upper bound (ms).
pub fn quantile_ms(buckets: &[i64], q: f64) -> f64 {
    let total: i64 = buckets.iter().sum();
    let target = (total as f64 * q).ceil() as i64;
    let mut seen = 0;
    for (count, bound) in buckets.iter().zip(BUCKET_BOUNDS_MS) {
        seen += count;
        if seen >= target && total > 0 {
            return bound;
        }
    }
    0.0
}
