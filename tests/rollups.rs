//! Issue 23, rollups: `usage_daily` equals the usage rows to the nano-USD,
//! whatever the rows, however they arrive (batches of any size, a batch
//! written twice as a spool replay does), on SQLite and Postgres, and a
//! report since any instant (mid-hour included) reads it exactly.

mod support;

use chrono::{DateTime, Duration, Utc};
use tollgate::pricing::{Breakdown, Line, Meter};
use tollgate::store::{Store, UsageRecord};
use tollgate::usage::{ToolCalls, Usage};

/// A varied row: team, key, model, tier, status, batch and cost lines all
/// follow `i`, and it is `minutes_ago` old.
fn row(i: u64, now: DateTime<Utc>, minutes_ago: i64) -> UsageRecord {
    const TEAMS: [&str; 3] = ["alpha", "beta", "gamma"];
    const MODELS: [&str; 4] = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "o3"];
    let team = TEAMS[(i % 3) as usize];
    let usage = Usage {
        prompt_tokens: 100 + i % 997,
        completion_tokens: 10 + i % 113,
        cached_tokens: (i.is_multiple_of(4)).then_some(40),
        cache_write_tokens: (i.is_multiple_of(7)).then_some(30),
        audio_prompt_tokens: (i.is_multiple_of(11)).then_some(5),
        tool_calls: ToolCalls {
            web_search: u32::from(i.is_multiple_of(13)),
            file_search: 0,
        },
        ..Usage::NONE
    };
    let mut breakdown = Breakdown::default();
    breakdown.0[Line::Meter(Meter::Input).index()] = 1_000 + i * 7;
    breakdown.0[Line::Meter(Meter::Output).index()] = 3_000 + i % 101;
    if i.is_multiple_of(4) {
        breakdown.0[Line::Meter(Meter::CachedInput).index()] = 123;
    }
    if i.is_multiple_of(13) {
        breakdown.0[Line::ToolCalls.index()] = 10_000_000;
    }
    let status = if i.is_multiple_of(17) { 500 } else { 200 };
    UsageRecord {
        key_id: (!i.is_multiple_of(5)).then(|| format!("key_{team}_{}", i % 2)),
        upstream: "openai".into(),
        endpoint: if i.is_multiple_of(9) {
            "responses"
        } else {
            "chat.completions"
        },
        stream: i.is_multiple_of(2),
        status,
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        cached_tokens: usage.cached(),
        cost_nano_usd: if status == 500 {
            0
        } else {
            breakdown.0.iter().sum()
        },
        latency_ms: 40,
        service_tier: match i % 6 {
            0 => Some("flex"),
            1 => Some("priority"),
            _ => None,
        },
        audio_prompt_tokens: usage.audio_prompt_tokens.unwrap_or(0),
        cache_write_tokens: usage.cache_write_tokens.unwrap_or(0),
        tool_calls: u64::from(usage.tool_calls.web_search),
        provider: if i % 4 == 2 { "anthropic" } else { "openai" },
        cost_breakdown: if status == 500 {
            Breakdown::default()
        } else {
            breakdown
        },
        meters: tollgate::usage::meter::Meters::of(&usage),
        // Two batches whose lines reuse the same custom ids.
        batch_id: (i.is_multiple_of(23)).then(|| format!("batch_{}", i % 2)),
        ..UsageRecord::plain(
            format!("req_{i:08}"),
            team,
            MODELS[(i % 4) as usize],
            now - Duration::minutes(minutes_ago),
        )
    }
}

/// Writes 3,000 rows spread over the last three days in batches of every
/// size, one batch twice (a spool replay), then checks every report since
/// several instants, on the hour and between hours.
async fn rollups_equal_rows(store: &Store) {
    let now = Utc::now();
    let rows: Vec<UsageRecord> = (0..3_000u64)
        .map(|i| row(i, now, ((i * 37) % (3 * 24 * 60)) as i64))
        .collect();
    let mut written = 0;
    for (n, size) in [1usize, 7, 64, 255, 256, 500, 917]
        .iter()
        .cycle()
        .enumerate()
    {
        if written >= rows.len() {
            break;
        }
        let batch = &rows[written..(written + size).min(rows.len())];
        store
            .insert_usage(batch)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if n == 3 {
            // Replayed: every row of it is stored already.
            store
                .insert_usage(batch)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            // Half of the next one too, mixed with new rows.
            let (start, end) = (written, (written + 2 * size).min(rows.len()));
            store
                .insert_usage(&rows[start..end])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            written = end;
            continue;
        }
        written += size;
    }
    let on_hour = chrono::DurationRound::duration_trunc(now, Duration::hours(1)).unwrap_or(now);
    let since = [
        DateTime::<Utc>::UNIX_EPOCH,
        now - Duration::hours(24),
        now - Duration::minutes(90),
        on_hour - Duration::hours(5),
        now - Duration::seconds(20),
    ];
    let total = support::assert_rollups_match_rows(store, &since).await;
    let want: u64 = rows.iter().map(|r| r.cost_nano_usd).sum();
    assert_eq!(total, want as i64, "every row once");
    for team in ["alpha", "beta"] {
        let since = now - Duration::minutes(150);
        let raw: u64 = rows
            .iter()
            .filter(|r| r.team == team && r.created_at >= since)
            .map(|r| r.cost_nano_usd)
            .sum();
        let spent = store
            .spend_since(team, since)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spent, raw, "{team}'s spend since {since}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_rollups_equal_the_rows_after_batches_and_replays() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let url = format!("sqlite://{}", dir.path().join("r.db").display());
    let store = Store::open(&url).await.unwrap_or_else(|e| panic!("{e}"));
    rollups_equal_rows(&store).await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rollups_equal_the_rows_after_batches_and_replays() {
    let Some(db) = support::PgDb::create("rollups").await else {
        return;
    };
    let store = Store::open(&db.url).await.unwrap_or_else(|e| panic!("{e}"));
    rollups_equal_rows(&store).await;
    store.close().await;
    db.drop_db().await;
}

/// Rows written before the rollups existed are summed by the migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_rolls_up_the_rows_already_there() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let url = format!("sqlite://{}", dir.path().join("old.db").display());
    let store = Store::open(&url).await.unwrap_or_else(|e| panic!("{e}"));
    let now = Utc::now();
    let rows: Vec<UsageRecord> = (0..500u64).map(|i| row(i, now, (i * 11) as i64)).collect();
    store
        .insert_usage(&rows)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store.close().await;
    // As a database of the release before: no rollups, migration undone.
    let pool = sqlx::SqlitePool::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for sql in [
        "DROP TABLE usage_daily",
        "DELETE FROM _sqlx_migrations WHERE description = 'usage daily'",
    ] {
        sqlx::query(sql)
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    pool.close().await;
    let store = Store::open(&url).await.unwrap_or_else(|e| panic!("{e}"));
    let total = support::assert_rollups_match_rows(&store, &[DateTime::<Utc>::UNIX_EPOCH]).await;
    assert_eq!(
        total as u64,
        rows.iter().map(|r| r.cost_nano_usd).sum::<u64>()
    );
    store.close().await;
}

/// Every kind of row (own and foreign request ids, batch lines, tiers, a
/// row with more than input and output) reads back through the view
/// `usage` exactly as written: its ids, names, counts, time and JSON.
async fn rows_read_back_as_written(
    store: &Store,
    pool_rows: Vec<serde_json::Value>,
    rows: &[UsageRecord],
) {
    let _ = store;
    assert_eq!(pool_rows.len(), rows.len());
    let by_id: std::collections::HashMap<(String, String), &serde_json::Value> = pool_rows
        .iter()
        .map(|v| {
            let id = v["request_id"].as_str().unwrap_or("").to_string();
            let batch = v["batch_id"].as_str().unwrap_or("").to_string();
            ((id, batch), v)
        })
        .collect();
    for r in rows {
        let key = (r.request_id.clone(), r.batch_id.clone().unwrap_or_default());
        let got = by_id
            .get(&key)
            .unwrap_or_else(|| panic!("{key:?} not read back"));
        let json = |t: String| serde_json::from_str::<serde_json::Value>(&t).unwrap_or_default();
        let want = serde_json::json!({
            "request_id": r.request_id, "batch_id": r.batch_id.clone().unwrap_or_default(),
            "created_at": tollgate::store::time_text(r.created_at),
            "team": r.team, "key_id": r.key_id, "model": r.model, "base_model": r.base_model,
            "upstream": r.upstream, "endpoint": r.endpoint, "provider": r.provider,
            "stream": r.stream, "status": r.status, "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens, "cached_tokens": r.cached_tokens,
            "cost_nano_usd": r.cost_nano_usd, "token_source": r.token_source,
            "latency_ms": r.latency_ms, "end_user": r.end_user, "service_tier": r.service_tier,
            "reasoning_tokens": r.reasoning_tokens, "audio_prompt_tokens": r.audio_prompt_tokens,
            "cache_write_tokens": r.cache_write_tokens, "tool_calls": r.tool_calls,
            "attempts": r.attempts, "choices": r.choices, "capped": r.capped,
            "cost_breakdown": json(r.cost_breakdown.to_json()), "meters": json(r.meters.to_json()),
        });
        assert_eq!(*got, &want, "{key:?}");
    }
}

fn varied_rows() -> Vec<UsageRecord> {
    let now = Utc::now();
    let ids = tollgate::app::RequestIds::new();
    (0..200u64)
        .map(|i| {
            let mut r = row(i, now, (i * 7) as i64);
            if i % 3 != 0 {
                r.request_id = ids.next();
                r.batch_id = None;
            }
            r.end_user = (i % 4 == 1).then(|| format!("user-{}", i % 3));
            r.base_model = if i % 5 == 1 {
                "gpt-4o-2024-08-06".into()
            } else {
                r.model.clone()
            };
            r.token_source = if i % 8 == 3 { "estimated" } else { "upstream" };
            r.capped = i % 10 == 7;
            r.attempts = if i % 12 == 5 { 2 } else { 1 };
            r.choices = if i % 14 == 9 { 3 } else { 1 };
            r.reasoning_tokens = if i % 6 == 4 { 9 } else { 0 };
            r
        })
        .collect()
}

const READ_BACK: &str = "SELECT request_id, batch_id, created_at, team, key_id, model, base_model, \
     upstream, endpoint, provider, stream, status, prompt_tokens, completion_tokens, cached_tokens, \
     cost_nano_usd, token_source, latency_ms, end_user, service_tier, reasoning_tokens, \
     audio_prompt_tokens, cache_write_tokens, tool_calls, attempts, choices, capped, \
     cost_breakdown, meters FROM usage";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_rows_read_back_through_the_view_as_written() {
    use sqlx::Row;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let url = format!("sqlite://{}", dir.path().join("v.db").display());
    let store = Store::open(&url).await.unwrap_or_else(|e| panic!("{e}"));
    let rows = varied_rows();
    store
        .insert_usage(&rows)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pool = sqlx::SqlitePool::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let read = sqlx::query(READ_BACK)
        .fetch_all(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let text = |r: &sqlx::sqlite::SqliteRow, c: &str| {
        r.try_get::<Option<String>, _>(c)
            .unwrap_or_else(|e| panic!("{c}: {e}"))
    };
    let int = |r: &sqlx::sqlite::SqliteRow, c: &str| {
        r.try_get::<i64, _>(c)
            .unwrap_or_else(|e| panic!("{c}: {e}"))
    };
    let json = |r: &sqlx::sqlite::SqliteRow, c: &str| {
        serde_json::from_str::<serde_json::Value>(&text(r, c).unwrap_or_default())
            .unwrap_or_default()
    };
    let values = read
        .iter()
        .map(|r| {
            let mut v = serde_json::Map::new();
            for c in [
                "request_id",
                "batch_id",
                "created_at",
                "team",
                "key_id",
                "model",
                "base_model",
                "upstream",
                "endpoint",
                "provider",
                "token_source",
                "end_user",
                "service_tier",
            ] {
                v.insert(c.into(), serde_json::json!(text(r, c)));
            }
            for c in [
                "status",
                "prompt_tokens",
                "completion_tokens",
                "cached_tokens",
                "cost_nano_usd",
                "latency_ms",
                "reasoning_tokens",
                "audio_prompt_tokens",
                "cache_write_tokens",
                "tool_calls",
                "attempts",
                "choices",
            ] {
                v.insert(c.into(), serde_json::json!(int(r, c)));
            }
            for c in ["stream", "capped"] {
                v.insert(
                    c.into(),
                    serde_json::json!(r
                        .try_get::<bool, _>(c)
                        .unwrap_or_else(|e| panic!("{c}: {e}"))),
                );
            }
            for c in ["cost_breakdown", "meters"] {
                v.insert(c.into(), json(r, c));
            }
            serde_json::Value::Object(v)
        })
        .collect();
    rows_read_back_as_written(&store, values, &rows).await;
    pool.close().await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rows_read_back_through_the_view_as_written() {
    let Some(db) = support::PgDb::create("view").await else {
        return;
    };
    let store = Store::open(&db.url).await.unwrap_or_else(|e| panic!("{e}"));
    let rows = varied_rows();
    store
        .insert_usage(&rows)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pool = db.pool().await;
    // The database spells the row as JSON itself; its time as SPEC 6 text.
    let sql = format!(
        "SELECT row_to_json(v)::text FROM ({}) v",
        READ_BACK.replace(
            "created_at,",
            "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS created_at,"
        )
    );
    let read: Vec<String> = sqlx::query_scalar(&sql)
        .fetch_all(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let values = read
        .iter()
        .map(|t| serde_json::from_str::<serde_json::Value>(t).unwrap_or_default())
        .collect();
    rows_read_back_as_written(&store, values, &rows).await;
    pool.close().await;
    store.close().await;
    db.drop_db().await;
}
