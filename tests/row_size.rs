//! Issue 23, row size: a plain usage row (a chat request of a team's key,
//! input and output tokens, cost lines input and output) costs at most 150
//! bytes on disk with its indexes, on SQLite and on Postgres, measured after
//! VACUUM over 30,000 rows (README "Usage at scale" states the figures).

mod support;

use tollgate::store::{Store, UsageRecord};

const ROWS: usize = 30_000;
const BOUND: f64 = 150.0;

/// Request `i` of a busy day: 20 teams, 100 keys, 6 models, own request ids.
fn plain_rows() -> Vec<UsageRecord> {
    use tollgate::pricing::{Breakdown, Line, Meter};
    const MODELS: [&str; 6] = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3", "o4-mini", "gpt-5"];
    let ids = tollgate::app::RequestIds::new();
    let now = chrono::Utc::now();
    (0..ROWS)
        .map(|i| {
            let model = MODELS[i % 6];
            let team = format!("team-{:02}", i % 20);
            let at = now - chrono::Duration::milliseconds(((ROWS - i) * 40) as i64);
            let mut r = support::usage_record(&ids.next(), &team, model, at);
            r.key_id = Some(format!("key_{:012x}", i % 100));
            r.upstream = "openai".into();
            r.stream = i % 3 == 0;
            r.prompt_tokens = 300 + (i as u64 * 7919) % 4_000;
            r.completion_tokens = 20 + (i as u64 * 104_729) % 900;
            r.latency_ms = 200 + (i as u64 * 31) % 3_000;
            let mut lines = Breakdown::default();
            lines.0[Line::Meter(Meter::Input).index()] = r.prompt_tokens * 2_500;
            lines.0[Line::Meter(Meter::Output).index()] = r.completion_tokens * 10_000;
            r.cost_nano_usd = lines.0.iter().sum();
            r.cost_breakdown = lines;
            r.meters = tollgate::usage::meter::Meters::of(&tollgate::usage::Usage {
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.completion_tokens,
                ..tollgate::usage::Usage::NONE
            });
            r
        })
        .collect()
}

/// Checks that every row is stored and that they cost at most `BOUND`
/// bytes each on disk.
fn per_row(db: &str, bytes: i64, stored: i64) {
    assert_eq!(stored as usize, ROWS);
    let per_row = bytes as f64 / ROWS as f64;
    println!("{db}: {bytes} bytes for {ROWS} rows = {per_row:.1} bytes per row");
    assert!(per_row <= BOUND, "{db}: {per_row:.1} bytes per row");
}

async fn write(store: &Store, rows: &[UsageRecord]) {
    for chunk in rows.chunks(512) {
        store
            .insert_usage(chunk)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_sqlite_row_costs_at_most_150_bytes_with_its_indexes() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let url = format!("sqlite://{}", dir.path().join("size.db").display());
    let store = Store::open(&url).await.unwrap_or_else(|e| panic!("{e}"));
    let rows = plain_rows();
    write(&store, &rows).await;
    store.close().await;
    let pool = sqlx::SqlitePool::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sqlx::query("VACUUM")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Every page of the usage table and of its indexes (dbstat).
    let bytes: i64 = sqlx::query_scalar(
        "SELECT SUM(pgsize) FROM dbstat WHERE name = 'usage_rows' \
         OR name IN (SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'usage_rows')",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    pool.close().await;
    per_row("sqlite", bytes, stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_postgres_row_costs_at_most_150_bytes_with_its_indexes() {
    let Some(db) = support::PgDb::create("row_size").await else {
        return;
    };
    let store = Store::open(&db.url).await.unwrap_or_else(|e| panic!("{e}"));
    let rows = plain_rows();
    write(&store, &rows).await;
    store.close().await;
    let pool = db.pool().await;
    sqlx::query("VACUUM ANALYZE usage_rows")
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Every partition with its indexes, TOAST and maps.
    let bytes: i64 = sqlx::query_scalar(
        "SELECT SUM(pg_total_relation_size(inhrelid))::BIGINT FROM pg_inherits \
         WHERE inhparent = 'usage_rows'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage")
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    pool.close().await;
    db.drop_db().await;
    per_row("postgres", bytes, stored);
}
