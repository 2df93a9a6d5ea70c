//! Chart of a fan-out sweep (`SWEEP="100 500 1000" benches/fanout.sh`): reads the JSON results of
//! `benches/fanout.rs broadcast` runs and draws one SVG with two panels, one line per server:
//!
//! - left: delivery latency (write sent → `add` received) p50 and p99 in ms, log scale, vs the
//!   number of connections;
//! - right: delivered events per second vs the number of connections.
//!
//! `cargo bench --bench plot -- --out sweep.svg vibe=broadcast-vibe-100.json bare=...`: every
//! positional argument is `SERVER=FILE`; the x value of a point is the file's `connections`.

// Printing the output path is this tool's job.
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use plotters::prelude::*;

/// Draws the SVG chart of a benches/fanout.sh broadcast sweep.
#[derive(Debug, Parser)]
#[command(name = "plot")]
struct Cli {
    /// The SVG file to write.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// Chart title.
    #[arg(long, default_value = "Vibe WebSocket fan-out: broadcast sweep")]
    title: String,
    /// Chart width and height in pixels.
    #[arg(long, default_value_t = 1200)]
    width: u32,
    #[arg(long, default_value_t = 520)]
    height: u32,
    /// `SERVER=FILE`: one JSON result of `fanout broadcast --json FILE`.
    #[arg(required = true, value_name = "SERVER=FILE")]
    results: Vec<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One run: x = connections.
#[derive(Debug, Clone, Copy)]
struct Point {
    connections: f64,
    p50_ms: f64,
    p99_ms: f64,
    events_per_sec: f64,
}

fn read_point(path: &str) -> anyhow::Result<Point> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{path} is not JSON"))?;
    let num = |pointer: &str| {
        v.pointer(pointer)
            .and_then(serde_json::Value::as_f64)
            .with_context(|| format!("{path} has no number at {pointer}"))
    };
    Ok(Point {
        connections: num("/connections")?,
        p50_ms: num("/latency_ms/p50")?,
        p99_ms: num("/latency_ms/p99")?,
        events_per_sec: num("/events_per_sec")?,
    })
}

/// A tick label: two significant digits, no trailing zeros.
fn short(v: f64) -> String {
    let text = if v >= 10.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    }
}

/// Colours by position; Vibe first.
const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Series in the order their servers first appear on the command line.
    let mut order: Vec<String> = Vec::new();
    let mut series: BTreeMap<String, Vec<Point>> = BTreeMap::new();
    for arg in &cli.results {
        let Some((server, file)) = arg.split_once('=') else {
            bail!("expected SERVER=FILE, got {arg:?}");
        };
        let point = read_point(file)?;
        if !series.contains_key(server) {
            order.push(server.to_owned());
        }
        series.entry(server.to_owned()).or_default().push(point);
    }
    for points in series.values_mut() {
        points.sort_by(|a, b| a.connections.total_cmp(&b.connections));
    }
    let all = || series.values().flatten();
    let x_max = all().map(|p| p.connections).fold(1.0, f64::max) * 1.05;
    let x_min = all().map(|p| p.connections).fold(x_max, f64::min) * 0.95;
    // The latency axis is linear in log10(ms) (ticks labelled in ms); the floor of 0.01 ms keeps
    // a zero (no events) on it.
    let lat = |v: f64| v.max(0.01);
    let log = |v: f64| lat(v).log10();
    let lat_min = all().map(|p| lat(p.p50_ms)).fold(f64::MAX, f64::min) / 1.5;
    let lat_max = all().map(|p| lat(p.p99_ms)).fold(0.01, f64::max) * 1.5;
    let eps_max = all().map(|p| p.events_per_sec).fold(1.0, f64::max) * 1.1;

    let root = SVGBackend::new(&cli.out, (cli.width, cli.height)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(&cli.title, ("sans-serif", 22))?;
    let (left, right) = root.split_horizontally(cli.width / 2);

    let mut latency = ChartBuilder::on(&left)
        .caption(
            "latency p50 (solid, ●) and p99 (thin, ▲), ms, log scale",
            ("sans-serif", 15),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_min..x_max, lat_min.log10()..lat_max.log10())?;
    latency
        .configure_mesh()
        .x_desc("connections (subscribers)")
        .y_desc("ms")
        .y_labels(12)
        .light_line_style(WHITE)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| short(10_f64.powf(*y)))
        .draw()?;

    let mut throughput = ChartBuilder::on(&right)
        .caption("delivered events/s", ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min..x_max, 0.0..eps_max)?;
    throughput
        .configure_mesh()
        .x_desc("connections (subscribers)")
        .y_desc("events/s")
        .light_line_style(WHITE)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;

    for (i, server) in order.iter().enumerate() {
        let points = series.get(server).map(Vec::as_slice).unwrap_or_default();
        let color = COLORS[i % COLORS.len()];
        let p50: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.connections, log(p.p50_ms)))
            .collect();
        let p99: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.connections, log(p.p99_ms)))
            .collect();
        let eps: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.connections, p.events_per_sec))
            .collect();
        latency
            .draw_series(LineSeries::new(p50.clone(), color.stroke_width(3)))?
            .label(format!("{server} p50"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        latency.draw_series(p50.iter().map(|&c| Circle::new(c, 4, color.filled())))?;
        latency
            .draw_series(LineSeries::new(p99.clone(), color.stroke_width(1)))?
            .label(format!("{server} p99"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1))
            });
        latency.draw_series(
            p99.iter()
                .map(|&c| TriangleMarker::new(c, 5, color.filled())),
        )?;
        throughput
            .draw_series(LineSeries::new(eps.clone(), color.stroke_width(3)))?
            .label(server.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        throughput.draw_series(eps.iter().map(|&c| Circle::new(c, 4, color.filled())))?;
    }
    // Latency mostly grows with N: its legend goes where the lines are least likely to be.
    latency
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    throughput
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()
        .with_context(|| format!("cannot write {}", cli.out.display()))?;
    println!("{}", cli.out.display());
    Ok(())
}
