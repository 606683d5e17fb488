//! Retention (SPEC 15): usage rows older than `database.retention_days`
//! go, their rollups stay. SQLite deletes them in small batches by time
//! (the `created_ms` index), each its own short transaction on the
//! writer's connection, so the writer waits at most one batch. Postgres
//! drops whole monthly partitions of `usage_rows` once the month is past
//! the cutoff (rows of a younger month wait for the month to end), and
//! deletes in batches only from the default partition. Postgres also gets
//! its partitions made ahead here: this month's and the next two, and its
//! usage tables' statistics kept fresh (`refresh_statistics`).

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};

use super::queries::on_db;
use super::{Store, StoreError};

/// Months of partitions made ahead of now (this one included).
const MONTHS_AHEAD: u32 = 3;

/// A partition's name and its range, Unix ms `[from, to)`.
fn partition(year: i32, month: u32) -> Option<(String, i64, i64)> {
    let start = NaiveDate::from_ymd_opt(year, month, 1)?;
    let next = match month {
        12 => NaiveDate::from_ymd_opt(year + 1, 1, 1)?,
        m => NaiveDate::from_ymd_opt(year, m + 1, 1)?,
    };
    let ms = |d: NaiveDate| {
        d.and_hms_opt(0, 0, 0)
            .map(|t| Utc.from_utc_datetime(&t).timestamp_millis())
    };
    Some((
        format!("usage_rows_{year:04}_{month:02}"),
        ms(start)?,
        ms(next)?,
    ))
}

/// `usage_rows_2026_12` -> (2026, 12).
fn month_of(name: &str) -> Option<(i32, u32)> {
    let rest = name.strip_prefix("usage_rows_")?;
    let (y, m) = rest.split_once('_')?;
    Some((y.parse().ok()?, m.parse().ok()?))
}

/// What one retention pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Expired {
    pub rows: u64,
    pub partitions: u64,
}

impl Store {
    /// Postgres: makes the monthly partitions from `now`'s month on (three
    /// months), each with its unique index on `id`. One replica at a time
    /// (an advisory lock); a month whose rows are in the default partition
    /// already cannot get its partition and is logged.
    pub async fn ensure_partitions(&self, now: DateTime<Utc>) -> Result<(), StoreError> {
        let Some(pg) = self.shared() else {
            return Ok(());
        };
        let (mut year, mut month) = (now.year(), now.month());
        let mut tx = pg.pool().begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(7410236)")
            .execute(&mut *tx)
            .await?;
        for _ in 0..MONTHS_AHEAD {
            if let Some((name, from, to)) = partition(year, month) {
                let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                    .bind(&name)
                    .fetch_one(&mut *tx)
                    .await?;
                if !exists {
                    let create = format!(
                        "CREATE TABLE {name} PARTITION OF usage_rows FOR VALUES FROM ({from}) TO ({to})"
                    );
                    sqlx::query("SAVEPOINT partition").execute(&mut *tx).await?;
                    match sqlx::query(&create).execute(&mut *tx).await {
                        Ok(_) => {
                            let index = format!("CREATE UNIQUE INDEX {name}_id ON {name} (id)");
                            sqlx::query(&index).execute(&mut *tx).await?;
                            tracing::info!(partition = %name, "usage partition created");
                        }
                        Err(e) => {
                            sqlx::query("ROLLBACK TO SAVEPOINT partition")
                                .execute(&mut *tx)
                                .await?;
                            tracing::warn!(partition = %name, error = %e, "usage partition not created; its rows stay in usage_rows_default");
                        }
                    }
                }
            }
            (year, month) = if month == 12 {
                (year + 1, 1)
            } else {
                (year, month + 1)
            };
        }
        tx.commit().await?;
        Ok(())
    }

    /// Deletes usage rows created before `cutoff`: at most `limit` rows
    /// (SQLite, Postgres' default partition) and every monthly partition
    /// that ends at or before it (Postgres).
    pub async fn expire_usage(
        &self,
        cutoff: DateTime<Utc>,
        limit: u32,
    ) -> Result<Expired, StoreError> {
        let cutoff_ms = cutoff.timestamp_millis();
        let mut expired = Expired::default();
        match self {
            Store::Sqlite(s) => {
                self.check_file()?;
                let done = sqlx::query(
                    "DELETE FROM usage_rows WHERE id IN \
                     (SELECT id FROM usage_rows WHERE created_ms < $1 ORDER BY created_ms LIMIT $2)",
                )
                .bind(cutoff_ms)
                .bind(i64::from(limit))
                .execute(s.writer())
                .await?;
                expired.rows = done.rows_affected();
            }
            Store::Postgres(pg) => {
                let names = monthly_partitions(pg.pool()).await?;
                for name in names {
                    let ends = month_of(&name)
                        .and_then(|(y, m)| partition(y, m))
                        .map(|p| p.2);
                    if ends.is_some_and(|end| end <= cutoff_ms) {
                        sqlx::query(&format!("DROP TABLE IF EXISTS {name}"))
                            .execute(pg.pool())
                            .await?;
                        tracing::info!(partition = %name, "usage partition dropped (retention)");
                        expired.partitions += 1;
                    }
                }
                let done = sqlx::query(
                    "DELETE FROM usage_rows_default WHERE id IN \
                     (SELECT id FROM usage_rows_default WHERE created_ms < $1 LIMIT $2)",
                )
                .bind(cutoff_ms)
                .bind(i64::from(limit))
                .execute(pg.pool())
                .await?;
                expired.rows = done.rows_affected();
            }
        }
        Ok(expired)
    }

    /// How far retention is behind at `cutoff`, in seconds: how much older
    /// than the cutoff the oldest row is that should be gone by now (a
    /// Postgres month counts once it has ended before the cutoff).
    pub async fn retention_lag(&self, cutoff: DateTime<Utc>) -> Result<i64, StoreError> {
        let cutoff_ms = cutoff.timestamp_millis();
        let oldest: Option<i64> = match self {
            Store::Sqlite(s) => {
                sqlx::query_scalar("SELECT MIN(created_ms) FROM usage_rows")
                    .fetch_one(s.pool())
                    .await?
            }
            Store::Postgres(pg) => {
                let names = monthly_partitions(pg.pool()).await?;
                // A month past the cutoff still there: behind since it ended.
                let month = names
                    .iter()
                    .filter_map(|n| month_of(n).and_then(|(y, m)| partition(y, m)))
                    .map(|p| p.2)
                    .filter(|&end| end <= cutoff_ms)
                    .min();
                let default: Option<i64> = sqlx::query_scalar(
                    "SELECT created_ms FROM usage_rows_default WHERE created_ms < $1 LIMIT 1",
                )
                .bind(cutoff_ms)
                .fetch_optional(pg.pool())
                .await?;
                month.into_iter().chain(default).min()
            }
        };
        Ok(oldest.map_or(0, |ms| ((cutoff_ms - ms) / 1000).max(0)))
    }

    /// Postgres: summarizes the new block ranges of each usage partition's
    /// time index and re-analyzes the usage tables that changed by more than
    /// a tenth since their last analysis; what autovacuum does, done here
    /// too so a report's time filter uses the index even where autovacuum
    /// is off or behind (a never-analyzed month of millions of rows is read
    /// whole). One replica at a time; the tables it analyzed.
    pub async fn refresh_statistics(&self) -> Result<Vec<String>, StoreError> {
        let Some(pg) = self.shared() else {
            return Ok(Vec::new());
        };
        let mut tx = pg.pool().begin().await?;
        let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(7410237)")
            .fetch_one(&mut *tx)
            .await?;
        if !ours {
            return Ok(Vec::new());
        }
        sqlx::query(
            "SELECT brin_summarize_new_values(x.indexrelid::regclass) FROM pg_index x \
             JOIN pg_class c ON c.oid = x.indexrelid JOIN pg_am a ON a.oid = c.relam \
             JOIN pg_inherits i ON i.inhrelid = x.indrelid \
             WHERE a.amname = 'brin' AND i.inhparent = 'usage_rows'::regclass",
        )
        .execute(&mut *tx)
        .await?;
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT relname::text FROM pg_stat_user_tables \
             WHERE (relname ~ '^usage_rows_' OR relname = 'usage_daily') \
             AND n_mod_since_analyze > 0 \
             AND (n_mod_since_analyze > n_live_tup / 10 \
                  OR COALESCE(last_analyze, last_autoanalyze) IS NULL) \
             ORDER BY relname",
        )
        .fetch_all(&mut *tx)
        .await?;
        for table in &stale {
            // Names from the catalog, quoted as identifiers.
            let analyze = format!("ANALYZE \"{}\"", table.replace('"', "\"\""));
            sqlx::query(&analyze).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(stale)
    }

    /// Side tables kept only as long as usage rows: word counts, and
    /// batches billed (or files uploaded) before `cutoff`.
    pub async fn expire_side_tables(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        let ms = cutoff.timestamp_millis();
        on_db!(self, _pool, writer, d => {
            let mut n = sqlx::query("DELETE FROM word_counts WHERE created_at < $1")
                .bind(d.since(cutoff))
                .execute(writer)
                .await?
                .rows_affected();
            for sql in [
                "DELETE FROM batches WHERE billed_ms < $1",
                "DELETE FROM batch_files WHERE created_ms < $1",
            ] {
                n += sqlx::query(sql).bind(ms).execute(writer).await?.rows_affected();
            }
            Ok(n)
        })
    }
}

/// The names of `usage_rows`' monthly partitions (`usage_rows_YYYY_MM`).
async fn monthly_partitions(pool: &sqlx::PgPool) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'usage_rows'::regclass AND c.relname ~ '^usage_rows_[0-9]{4}_[0-9]{2}$'",
    )
    .fetch_all(pool)
    .await?)
}

/// Rows deleted per statement: a short transaction, so the writer waits
/// at most one of them.
const DELETE_BATCH: u32 = 1_000;
/// Longest one check deletes before it leaves the rest to the next (the
/// lag gauge shows what is left).
const PASS_BUDGET: std::time::Duration = std::time::Duration::from_secs(20);

/// The retention task: at start, then every minute, makes Postgres'
/// partitions ahead, refreshes its statistics and, with `retention_days`,
/// deletes what is older.
pub fn spawn(
    store: Store,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    retention_days: Option<u32>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            if let Err(e) = store.ensure_partitions(Utc::now()).await {
                tracing::warn!(error = %e, "making usage partitions ahead failed");
            }
            match store.refresh_statistics().await {
                Ok(tables) if !tables.is_empty() => {
                    tracing::debug!(?tables, "usage statistics refreshed")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "refreshing usage statistics failed"),
            }
            if let Some(days) = retention_days {
                check(&store, &metrics, days).await;
            }
        }
    })
}

/// One retention check.
async fn check(store: &Store, metrics: &crate::metrics::Metrics, days: u32) {
    let cutoff = Utc::now() - chrono::Duration::days(i64::from(days));
    let started = std::time::Instant::now();
    loop {
        match store.expire_usage(cutoff, DELETE_BATCH).await {
            Ok(e) => {
                metrics.retention_deleted.inc_by(e.rows);
                metrics.retention_partitions_dropped.inc_by(e.partitions);
                if e.rows < u64::from(DELETE_BATCH) {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention: deleting old usage rows failed");
                break;
            }
        }
        if started.elapsed() > PASS_BUDGET {
            break;
        }
        // The writer's turn between batches.
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    if let Err(e) = store.expire_side_tables(cutoff).await {
        tracing::warn!(error = %e, "retention: pruning word counts and batches failed");
    }
    match store.retention_lag(cutoff).await {
        Ok(lag) => {
            if lag > 0 && metrics.retention_lag.get() == 0 {
                tracing::warn!(lag_seconds = lag, "retention is behind");
            }
            metrics.retention_lag.set(lag);
        }
        Err(e) => tracing::warn!(error = %e, "retention: reading the oldest row failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_whole_utc_months() {
        let (name, from, to) = partition(2026, 12).unwrap_or_default();
        assert_eq!(name, "usage_rows_2026_12");
        assert_eq!(from, 1_796_083_200_000);
        assert_eq!(to, 1_798_761_600_000);
        assert_eq!(month_of(&name), Some((2026, 12)));
        assert_eq!(partition(2027, 1).map(|p| p.1), Some(to));
        assert_eq!(month_of("usage_rows_default"), None);
    }
}
