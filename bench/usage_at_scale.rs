//! Usage at scale (issue 23): how many rows per second tollgate's
//! background writer stores, and how long reports take once the database
//! holds millions of rows.
//!
//! ```text
//! cargo run --release --example usage_at_scale -- URL ROWS [WRITERS] [BATCH]
//! ```
//!
//! Each of WRITERS (default 1; replicas sharing one Postgres) runs the real
//! `UsageWriter` with the default batching (BATCH = 4096 rows, 25 ms) on its own
//! connection pool, fed as fast as its queue takes rows. The rows are chat
//! requests of 10 teams, 50 keys and 8 models spread over the last 30 days.
//! Then every report `tollgate report` offers is timed (`--since 30d`, read
//! from the rollups), and the row-by-row report for comparison when asked
//! (`RAW=1`). Prints one line per measurement.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tollgate::pricing::{Breakdown, Line, Meter};
use tollgate::store::{RecordedSpend, ReportBy, Store, UsageRecord, UsageWriter, WriterConfig};
use tollgate::usage::Usage;

struct NoSharedBudget;

impl RecordedSpend for NoSharedBudget {
    fn written(&self, _team: &str, _period: &str, _cost_nano_usd: u64) {}
}

const MODELS: [&str; 8] = [
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "o3",
    "o4-mini",
    "claude-sonnet-4-5",
    "claude-haiku-4-5",
];

/// Request `i` of writer `w`: a plain chat row, `i`-th of `n` in time order.
fn row(w: usize, i: u64, n: u64, now: chrono::DateTime<Utc>) -> Box<UsageRecord> {
    let usage = Usage {
        prompt_tokens: 200 + i % 1_800,
        completion_tokens: 20 + i % 480,
        cached_tokens: i.is_multiple_of(3).then_some(128),
        ..Usage::NONE
    };
    let mut breakdown = Breakdown::default();
    breakdown.0[Line::Meter(Meter::Input).index()] = usage.prompt_tokens * 2_500;
    breakdown.0[Line::Meter(Meter::Output).index()] = usage.completion_tokens * 10_000;
    let team = format!("team-{}", i % 10);
    let age_ms = (30 * 86_400_000) * (n - i) as i64 / n.max(1) as i64;
    Box::new(UsageRecord {
        key_id: Some(format!("key-{}", i % 50)),
        upstream: "openai".into(),
        stream: i.is_multiple_of(2),
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        cached_tokens: usage.cached(),
        cost_nano_usd: breakdown.0.iter().sum(),
        latency_ms: 300 + i % 700,
        cost_breakdown: breakdown,
        meters: tollgate::usage::meter::Meters::of(&usage),
        ..UsageRecord::plain(
            format!("req_{w:016x}{i:08x}"),
            &team,
            MODELS[(i % 8) as usize],
            now - chrono::Duration::milliseconds(age_ms),
        )
    })
}

/// Feeds `rows` rows to a writer of its own and waits until they are
/// stored; the seconds it took.
async fn write(url: String, w: usize, rows: u64, batch: usize, spool: std::path::PathBuf) -> f64 {
    let store = Store::open(&url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let metrics = Arc::new(tollgate::metrics::Metrics::new().unwrap_or_else(|e| panic!("{e}")));
    let spool =
        tollgate::store::spool::Spool::open(&spool, 1 << 30, store.node().map(str::to_string))
            .unwrap_or_else(|e| panic!("{e}"));
    let capacity = 65_536;
    let (sink, writer) = UsageWriter::spawn(
        store.clone(),
        metrics.clone(),
        Arc::new(NoSharedBudget),
        spool,
        WriterConfig {
            batch_size: batch,
            flush_interval: Duration::from_millis(25),
            capacity,
            durable: false,
            observer: None,
        },
    );
    let now = Utc::now();
    let started = Instant::now();
    for i in 0..rows {
        while sink.depth() >= capacity - 1_024 {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        sink.record(row(w, i, rows, now), None);
    }
    drop(sink);
    writer.finish().await;
    let took = started.elapsed().as_secs_f64();
    let dropped = metrics.records_dropped.get();
    assert_eq!(dropped, 0, "rows dropped");
    store.close().await;
    took
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(url), Some(rows)) = (
        args.first(),
        args.get(1).and_then(|n| n.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: usage_at_scale URL ROWS [WRITERS] [BATCH]");
        std::process::exit(2);
    };
    let writers: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1);
    let batch: usize = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(4096);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    runtime.block_on(async {
        let spool = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        // Migrated once, before the clock starts. On Postgres the months
        // the rows cover get their partitions, as on a database tollgate
        // has served for those 30 days (it makes them 3 months ahead).
        let store = Store::open(url).await.unwrap_or_else(|e| panic!("{e}"));
        store
            .ensure_partitions(Utc::now() - chrono::Duration::days(31))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        store.close().await;
        // ROWS = 0: only the reports, over what is there (after a VACUUM, say).
        if rows > 0 {
            let started = Instant::now();
            let tasks: Vec<_> = (0..writers)
                .map(|w| {
                    let dir = spool.path().join(format!("w{w}"));
                    tokio::spawn(write(url.clone(), w, rows / writers as u64, batch, dir))
                })
                .collect();
            for t in tasks {
                let _ = t.await;
            }
            let took = started.elapsed().as_secs_f64();
            let written = rows / writers as u64 * writers as u64;
            println!(
                "writer: {written} rows by {writers} writer(s) in {took:.1} s = {:.0} rows/s",
                written as f64 / took
            );
        }
        let store = Store::open(url).await.unwrap_or_else(|e| panic!("{e}"));
        // What a serving tollgate's retention task does within a minute of
        // the rows landing (COLD=1 skips it: Postgres with autovacuum off
        // and no statistics scans a month's partition for the first hour).
        if std::env::var_os("COLD").is_none() {
            let started = Instant::now();
            let tables = store
                .refresh_statistics()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let ms = started.elapsed().as_secs_f64() * 1e3;
            println!("statistics refreshed: {tables:?} in {ms:.0} ms");
        }
        let since = Utc::now() - chrono::Duration::days(30);
        for by in [
            ReportBy::Team,
            ReportBy::Model,
            ReportBy::Key,
            ReportBy::Day,
            ReportBy::Component,
            ReportBy::Provider,
            ReportBy::Tier,
        ] {
            let started = Instant::now();
            let report = store
                .report(by, since)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let ms = started.elapsed().as_secs_f64() * 1e3;
            let total: i64 = report.iter().map(|r| r.cost_nano_usd).sum();
            println!(
                "report --by {by:?} --since 30d: {} lines, {total} nano-USD, {ms:.1} ms",
                report.len()
            );
            if std::env::var_os("RAW").is_some() {
                let started = Instant::now();
                let raw = store
                    .report_rows(by, since, None)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                let ms = started.elapsed().as_secs_f64() * 1e3;
                let same = raw.iter().map(|r| r.cost_nano_usd).sum::<i64>() == total;
                println!("  row by row: {ms:.1} ms (same total: {same})");
            }
        }
        store.close().await;
    });
}
