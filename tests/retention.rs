//! Issue 23, retention: `database.retention_days` deletes usage rows older
//! than that at start (then every minute), keeps their rollups, prunes the
//! side tables, and says how far behind it is (`tollgate_retention_lag_seconds`,
//! `/readyz`). SQLite deletes in small batches; Postgres drops whole monthly
//! partitions and deletes only from its default partition.

mod support;

use chrono::{DateTime, Duration, Utc};
use support::{metric, MockUpstream, PgDb, Tollgate};
use tollgate::store::{Store, UsageRecord};

/// `n` rows of `cost` nano-USD each, `age` old, ids starting at `first`.
fn aged(first: usize, n: usize, age: Duration, cost: u64) -> Vec<UsageRecord> {
    let at = Utc::now() - age;
    (first..first + n)
        .map(|i| {
            let mut r = support::usage_record(&format!("old-{i}"), "keep", "gpt-4o", at);
            r.prompt_tokens = 10;
            r.cost_nano_usd = cost;
            r
        })
        .collect()
}

async fn count(store: &Store) -> i64 {
    let rows = store
        .report_rows(
            tollgate::store::ReportBy::Team,
            DateTime::<Utc>::UNIX_EPOCH,
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    rows.iter().map(|r| r.requests).sum()
}

async fn wait_count(store: &Store, want: i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let n = count(store).await;
        if n == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} rows, want {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Rollups still count every row written, deleted ones included.
async fn rolled_up(store: &Store) -> (i64, i64) {
    let report = store
        .report(tollgate::store::ReportBy::Team, DateTime::<Utc>::UNIX_EPOCH)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (
        report.iter().map(|r| r.requests).sum(),
        report.iter().map(|r| r.cost_nano_usd).sum(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_retention_deletes_old_rows_in_batches_and_keeps_rollups() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let url = format!("sqlite://{}", dir.path().join("tollgate.db").display());
    let store = Store::open(&url).await.unwrap_or_else(|e| panic!("{e}"));
    // 2,500 rows 40 days old (three delete batches), 300 of yesterday.
    for chunk in aged(0, 2_500, Duration::days(40), 7).chunks(500) {
        store
            .insert_usage(chunk)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    store
        .insert_usage(&aged(10_000, 300, Duration::days(1), 11))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let cutoff = Utc::now() - Duration::days(30);
    let lag = store
        .retention_lag(cutoff)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!((9 * 86_400..=10 * 86_400 + 60).contains(&lag), "lag {lag}");
    store.close().await;

    let config = support::base_config(&mock, dir.path()).replace(
        "flush_interval_ms = 20",
        "flush_interval_ms = 20\nretention_days = 30",
    );
    let tg = Tollgate::start_with_config(dir, &config).await;
    let store = Store::open(&url).await.unwrap_or_else(|e| panic!("{e}"));
    wait_count(&store, 300).await;
    assert_eq!(rolled_up(&store).await, (2_800, 2_500 * 7 + 300 * 11));
    tg.wait_metrics(|m| {
        let deleted = metric(m, "tollgate_retention_deleted_rows_total", &[]);
        let lag = metric(m, "tollgate_retention_lag_seconds", &[]);
        match (deleted, lag) {
            (Some(2500.0), Some(0.0)) => Ok(()),
            other => Err(format!("deleted, lag: {other:?}")),
        }
    })
    .await;
    let ready = reqwest::get(tg.url("/readyz"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ready.status(), 200);
    assert_eq!(
        ready.text().await.unwrap_or_default(),
        r#"{"status":"ready"}"#
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_retention_drops_whole_months_and_keeps_rollups() {
    let Some(db) = PgDb::create("retention").await else {
        return;
    };
    let mock = MockUpstream::start().await;
    let store = Store::open(&db.url).await.unwrap_or_else(|e| panic!("{e}"));
    // The month of 100 days ago gets its partition; 400 days ago has none
    // (its rows go to the default partition).
    store
        .ensure_partitions(Utc::now() - Duration::days(100))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let old_month = (Utc::now() - Duration::days(100))
        .format("usage_rows_%Y_%m")
        .to_string();
    for rows in [
        aged(0, 400, Duration::days(100), 5),
        aged(1_000, 200, Duration::days(400), 3),
        aged(2_000, 100, Duration::hours(2), 13),
    ] {
        store
            .insert_usage(&rows)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let pool = db.pool().await;
    let in_partition = |name: String| {
        let pool = pool.clone();
        async move {
            let sql = format!("SELECT COUNT(*) FROM {name}");
            sqlx::query_scalar::<_, i64>(&sql)
                .fetch_one(&pool)
                .await
                .ok()
        }
    };
    assert_eq!(in_partition(old_month.clone()).await, Some(400));
    assert_eq!(in_partition("usage_rows_default".into()).await, Some(200));
    let cutoff = Utc::now() - Duration::days(30);
    assert!(store.retention_lag(cutoff).await.unwrap_or(0) > 300 * 86_400);
    store.close().await;

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = support::config_with_database(&mock, dir.path(), &db.url)
        .replace("[database]\n", "[database]\nretention_days = 30\n");
    assert!(config.contains("retention_days = 30"), "{config}");
    let tg = Tollgate::start_with_config(dir, &config).await;
    let store = Store::open(&db.url).await.unwrap_or_else(|e| panic!("{e}"));
    wait_count(&store, 100).await;
    assert_eq!(
        in_partition(old_month.clone()).await,
        None,
        "{old_month} dropped"
    );
    assert_eq!(in_partition("usage_rows_default".into()).await, Some(0));
    assert_eq!(rolled_up(&store).await, (700, 400 * 5 + 200 * 3 + 100 * 13));
    tg.wait_metrics(|m| {
        let dropped = metric(m, "tollgate_retention_partitions_dropped_total", &[]);
        let deleted = metric(m, "tollgate_retention_deleted_rows_total", &[]);
        let lag = metric(m, "tollgate_retention_lag_seconds", &[]);
        match (dropped, deleted, lag) {
            (Some(d), Some(200.0), Some(0.0)) if d >= 1.0 => Ok(()),
            other => Err(format!("dropped, deleted, lag: {other:?}")),
        }
    })
    .await;
    // This month and the next two have partitions.
    for months in 0..3 {
        let month = Utc::now()
            .date_naive()
            .checked_add_months(chrono::Months::new(months));
        let name = month
            .unwrap_or_default()
            .format("usage_rows_%Y_%m")
            .to_string();
        assert!(in_partition(name.clone()).await.is_some(), "{name} missing");
    }
    store.close().await;
    pool.close().await;
    drop(tg);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_statistics_of_changed_usage_tables_are_refreshed() {
    let Some(db) = PgDb::create("statistics").await else {
        return;
    };
    let store = Store::open(&db.url).await.unwrap_or_else(|e| panic!("{e}"));
    let month = (Utc::now() - Duration::seconds(3))
        .format("usage_rows_%Y_%m")
        .to_string();
    let refresh = || async {
        store
            .refresh_statistics()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    };
    // Postgres counts a backend's changes within about a second.
    let refresh_until = |table: String| async move {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let analyzed = refresh().await;
            if analyzed.contains(&table) || std::time::Instant::now() > deadline {
                return analyzed;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    // The tables were just made: whatever they hold has no statistics yet.
    refresh().await;
    store
        .insert_usage(&aged(0, 5_000, Duration::seconds(3), 7))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pool = db.pool().await;
    let stats = |table: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM pg_stats WHERE tablename = $1 AND attname = 'created_ms'",
            )
            .bind(table)
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
        }
    };
    assert_eq!(stats(month.clone()).await, 0);
    let analyzed = refresh_until(month.clone()).await;
    assert!(
        analyzed.contains(&month) && analyzed.contains(&"usage_daily".to_string()),
        "{analyzed:?}"
    );
    assert_eq!(stats(month.clone()).await, 1, "{month} analyzed");
    assert_eq!(
        refresh().await,
        Vec::<String>::new(),
        "nothing changed since"
    );
    // A twentieth more rows is not yet worth a new analysis; a fifth is.
    store
        .insert_usage(&aged(10_000, 250, Duration::seconds(2), 7))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    assert!(!refresh().await.contains(&month));
    store
        .insert_usage(&aged(20_000, 1_000, Duration::seconds(1), 7))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(refresh_until(month.clone()).await.contains(&month));
    store.close().await;
    pool.close().await;
    db.drop_db().await;
}
