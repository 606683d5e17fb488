//! Postgres through sqlx: migrations from `migrations/postgres`, the usage
//! table written in one UNNEST insert per batch, and the shared budget
//! tables several replicas use to enforce one budget (see `budget::shared`).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use super::{to_i64, ColumnType, StoreError, UsageRecord, Value, USAGE_COLUMNS};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Clone, Debug)]
pub struct PostgresStore {
    pool: PgPool,
    /// This replica's name in `budget_leases`: random per process.
    node: std::sync::Arc<str>,
}

impl PostgresStore {
    pub async fn connect(url: &str) -> Result<PostgresStore, StoreError> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .after_release(super::close_if_in_transaction::<sqlx::Postgres>)
            .connect_with(options)
            .await?;
        let mut id = [0u8; 8];
        getrandom::getrandom(&mut id)
            .map_err(|e| StoreError::Unsupported(format!("no randomness: {e}")))?;
        let node = format!("{}-{}", std::process::id(), crate::auth::hex(&id));
        Ok(PostgresStore {
            pool,
            node: node.into(),
        })
    }

    /// This replica's name in `budget_leases`.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The pool, for the queries written once (`queries`) and the budget
    /// lease protocol (`budget::lease`), which owns its own tables' SQL.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Inserts the rows (skipping request ids already stored) and, in the
    /// same transaction, moves the cost of the rows inserted under a shared
    /// budget from the lease that paid for them to the team's recorded
    /// spend. Returns the request ids skipped.
    pub async fn insert_usage<R: std::borrow::Borrow<UsageRecord> + Sync>(
        &self,
        rows: &[R],
    ) -> Result<Vec<String>, StoreError> {
        let rows: Vec<&UsageRecord> = rows.iter().map(|r| r.borrow()).collect();
        let mut tx = self.pool.begin().await?;
        let inserted: Vec<(String, String)> = insert_rows(&rows).fetch_all(&mut *tx).await?;
        let inserted: std::collections::HashSet<(String, String)> = inserted.into_iter().collect();
        let was_inserted = |r: &UsageRecord| {
            let id = (r.request_id.clone(), r.batch_id.clone().unwrap_or_default());
            inserted.contains(&id)
        };

        // Ordered: every replica updates the rows it shares with the others
        // (budget_state, usage_daily) in the same order, so none deadlock.
        let mut recorded: BTreeMap<(&str, &str, &str), u64> = BTreeMap::new();
        let mut skipped = Vec::new();
        let mut new = Vec::with_capacity(rows.len());
        for r in &rows {
            if !was_inserted(r) {
                skipped.push(r.request_id.clone());
                continue;
            }
            new.push(*r);
            if let Some(period) = r.budget_period.as_deref() {
                let node = r.lease_node.as_deref().unwrap_or(&self.node);
                *recorded.entry((r.team.as_str(), period, node)).or_default() += r.cost_nano_usd;
            }
        }
        for ((team, period, node), cost) in recorded {
            sqlx::query(
                "UPDATE budget_state SET spent = spent + $3 WHERE team = $1 AND period = $2",
            )
            .bind(team)
            .bind(period)
            .bind(to_i64(cost))
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE budget_leases SET leased = GREATEST(leased - $4, 0) \
                 WHERE team = $1 AND period = $2 AND node = $3",
            )
            .bind(team)
            .bind(period)
            .bind(node)
            .bind(to_i64(cost))
            .execute(&mut *tx)
            .await?;
        }
        super::rollup::Rollup::of(new).upsert(&mut tx).await?;
        tx.commit().await?;
        Ok(skipped)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The UNNEST insert of `rows`, one array per column of `USAGE_COLUMNS`,
/// returning the (request id, batch id) of the rows inserted (those already
/// stored are skipped).
fn insert_rows(
    rows: &[&UsageRecord],
) -> sqlx::query::QueryAs<'static, sqlx::Postgres, (String, String), sqlx::postgres::PgArguments> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let names: Vec<&str> = USAGE_COLUMNS.iter().map(|(n, _)| *n).collect();
        let arrays: Vec<String> = USAGE_COLUMNS
            .iter()
            .enumerate()
            .map(|(i, (_, t))| {
                let ty = match t {
                    ColumnType::Time => "timestamptz",
                    ColumnType::Text | ColumnType::OptText => "text",
                    ColumnType::Bool => "bool",
                    ColumnType::Int4 => "int4",
                    ColumnType::Int => "int8",
                    // Cast in the SELECT: UNNEST cannot take jsonb text.
                    ColumnType::Json => "text",
                };
                format!("${}::{ty}[]", i + 1)
            })
            .collect();
        let select: Vec<String> = USAGE_COLUMNS
            .iter()
            .map(|(n, t)| match t {
                ColumnType::Json => format!("{n}::jsonb"),
                _ => n.to_string(),
            })
            .collect();
        format!(
            "INSERT INTO usage ({}) SELECT {} FROM UNNEST({}) AS t({}) \
             ON CONFLICT (request_id, batch_id) DO NOTHING RETURNING request_id, batch_id",
            names.join(", "),
            select.join(", "),
            arrays.join(", "),
            names.join(", ")
        )
    });
    let values: Vec<[Value<'_>; USAGE_COLUMNS.len()]> = rows.iter().map(|r| r.values()).collect();
    let mut q = sqlx::query_as::<_, (String, String)>(SQL.as_str());
    for (i, (_, ty)) in USAGE_COLUMNS.iter().enumerate() {
        let col = values.iter().map(|v| &v[i]);
        q = match ty {
            ColumnType::Time => q.bind(
                col.map(|v| match v {
                    Value::Time(t) => *t,
                    _ => DateTime::<Utc>::MIN_UTC,
                })
                .collect::<Vec<_>>(),
            ),
            ColumnType::Text | ColumnType::OptText | ColumnType::Json => q.bind(
                col.map(|v| match v {
                    Value::Text(t) => Some(t.to_string()),
                    Value::OptText(t) => t.map(str::to_string),
                    Value::Json(j) => Some(j.clone()),
                    _ => None,
                })
                .collect::<Vec<Option<String>>>(),
            ),
            ColumnType::Bool => q.bind(
                col.map(|v| matches!(v, Value::Bool(true)))
                    .collect::<Vec<_>>(),
            ),
            ColumnType::Int4 => q.bind(
                col.map(|v| match v {
                    Value::Int4(n) => *n,
                    _ => 0,
                })
                .collect::<Vec<_>>(),
            ),
            ColumnType::Int => q.bind(
                col.map(|v| match v {
                    Value::Int(n) => *n,
                    _ => 0,
                })
                .collect::<Vec<_>>(),
            ),
        };
    }
    q
}
