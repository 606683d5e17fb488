//! SQLite through sqlx: WAL, migrations from `migrations/sqlite`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};

use super::{StoreError, UsageRecord};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// SQLite allows 32766 bound parameters per statement; 18 per row.
const ROWS_PER_STATEMENT: usize = 1000;

#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn connect(url: &str) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        Ok(SqliteStore { pool })
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub async fn insert_usage(&self, rows: &[UsageRecord]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO usage (created_at, request_id, team, key_id, model, base_model, \
                 upstream, endpoint, stream, status, prompt_tokens, completion_tokens, \
                 cached_tokens, cost_nano_usd, token_source, latency_ms, end_user) ",
            );
            q.push_values(chunk, |mut b, r| {
                b.push_bind(r.created_at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
                    .push_bind(&r.request_id)
                    .push_bind(&r.team)
                    .push_bind(&r.key_id)
                    .push_bind(&r.model)
                    .push_bind(&r.base_model)
                    .push_bind(&r.upstream)
                    .push_bind(r.endpoint)
                    .push_bind(r.stream)
                    .push_bind(i64::from(r.status))
                    .push_bind(to_i64(r.prompt_tokens))
                    .push_bind(to_i64(r.completion_tokens))
                    .push_bind(to_i64(r.cached_tokens))
                    .push_bind(to_i64(r.cost_nano_usd))
                    .push_bind(r.token_source)
                    .push_bind(to_i64(r.latency_ms))
                    .push_bind(&r.end_user);
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
