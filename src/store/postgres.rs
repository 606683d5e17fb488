//! Postgres through sqlx: migrations from `migrations/postgres`, the usage
//! table written in one UNNEST insert per batch, and the shared budget
//! tables several replicas use to enforce one budget (see `budget::shared`).

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use super::rows::{Batch, ColumnType, Compact, Names, Value, COLUMNS};
use super::{to_i64, StoreError, UsageRecord};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Clone, Debug)]
pub struct PostgresStore {
    pool: PgPool,
    /// This replica's name in `budget_leases`: random per process.
    node: std::sync::Arc<str>,
    /// Name ids this replica has seen (`rows::Names`).
    names: std::sync::Arc<Names>,
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
            names: Default::default(),
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
        let (mut batch, missing) = Batch::new(rows, &self.names);
        if !missing.is_empty() {
            batch.add(self.resolve(missing).await?, &self.names);
        }
        let more = batch.overflowing();
        if !more.is_empty() {
            batch.add(self.resolve(more).await?, &self.names);
        }
        let rows = batch.compact();
        let mut tx = self.pool.begin().await?;
        let inserted: Vec<i64> = insert_rows(&rows).fetch_all(&mut *tx).await?;
        let inserted: std::collections::HashSet<i64> = inserted.into_iter().collect();

        // Ordered: every replica updates the rows it shares with the others
        // (budget_state, usage_daily) in the same order, so none deadlock.
        let mut recorded: BTreeMap<(&str, &str, &str), u64> = BTreeMap::new();
        let mut skipped = Vec::new();
        let mut new = Vec::with_capacity(rows.len());
        for (r, c) in &rows {
            if !inserted.contains(&c.id) {
                skipped.push(r.request_id.clone());
                continue;
            }
            new.push(*r);
            let node = r.lease_node.as_deref().unwrap_or(&self.node);
            for (account, period) in &r.budget_leases {
                *recorded
                    .entry((account.as_str(), period.as_str(), node))
                    .or_default() += r.cost_nano_usd;
            }
        }
        for ((account, period, node), cost) in recorded {
            sqlx::query(
                "UPDATE budget_state SET spent = spent + $3 WHERE team = $1 AND period = $2",
            )
            .bind(account)
            .bind(period)
            .bind(to_i64(cost))
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE budget_leases SET leased = GREATEST(leased - $4, 0) \
                 WHERE team = $1 AND period = $2 AND node = $3",
            )
            .bind(account)
            .bind(period)
            .bind(node)
            .bind(to_i64(cost))
            .execute(&mut *tx)
            .await?;
        }
        super::rollup::Rollup::of(new)
            .upsert_postgres(&mut tx)
            .await?;
        tx.commit().await?;
        Ok(skipped)
    }

    /// The ids of `names`, added to the `names` table where new (committed
    /// on their own; two replicas adding one name get the same id).
    async fn resolve(
        &self,
        names: Vec<String>,
    ) -> Result<std::collections::HashMap<String, i64>, sqlx::Error> {
        sqlx::query(
            "INSERT INTO names (name) SELECT UNNEST($1::text[]) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&names)
        .execute(&self.pool)
        .await?;
        let found: Vec<(i64, String)> =
            sqlx::query_as("SELECT CAST(id AS BIGINT), name FROM names WHERE name = ANY($1)")
                .bind(&names)
                .fetch_all(&self.pool)
                .await?;
        Ok(found.into_iter().map(|(id, n)| (n, id)).collect())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The UNNEST insert of `rows`, one array per column of `rows::COLUMNS`,
/// returning the ids of the rows inserted (those already stored, in their
/// month's partition, are skipped).
fn insert_rows(
    rows: &[(&UsageRecord, Compact)],
) -> sqlx::query::QueryScalar<'static, sqlx::Postgres, i64, sqlx::postgres::PgArguments> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let names: Vec<&str> = COLUMNS.iter().map(|(n, _, _)| *n).collect();
        let arrays: Vec<String> = COLUMNS
            .iter()
            .enumerate()
            .map(|(i, (_, t, _))| {
                let ty = match t {
                    ColumnType::Int8 => "int8",
                    ColumnType::Int4 => "int4",
                    ColumnType::Int2 => "int2",
                    // Cast in the SELECT: UNNEST cannot take jsonb text.
                    ColumnType::Json => "text",
                };
                format!("${}::{ty}[]", i + 1)
            })
            .collect();
        let select: Vec<String> = COLUMNS
            .iter()
            .map(|(n, t, _)| match t {
                ColumnType::Json => format!("{n}::jsonb"),
                _ => n.to_string(),
            })
            .collect();
        format!(
            "INSERT INTO usage_rows ({}) SELECT {} FROM UNNEST({}) AS t({}) \
             ON CONFLICT DO NOTHING RETURNING id",
            names.join(", "),
            select.join(", "),
            arrays.join(", "),
            names.join(", ")
        )
    });
    let mut q = sqlx::query_scalar::<_, i64>(SQL.as_str());
    for (i, (_, ty, _)) in COLUMNS.iter().enumerate() {
        let col = rows.iter().map(|(_, c)| &c.values[i]);
        let int = |v: &Value| match v {
            Value::Int(n) => *n,
            Value::Json(_) => None,
        };
        q = match ty {
            ColumnType::Int8 => q.bind(col.map(int).collect::<Vec<Option<i64>>>()),
            ColumnType::Int4 => q.bind(
                col.map(|v| int(v).map(|n| i32::try_from(n).unwrap_or(i32::MAX)))
                    .collect::<Vec<Option<i32>>>(),
            ),
            ColumnType::Int2 => q.bind(
                col.map(|v| int(v).map(|n| i16::try_from(n).unwrap_or(i16::MAX)))
                    .collect::<Vec<Option<i16>>>(),
            ),
            ColumnType::Json => q.bind(
                col.map(|v| match v {
                    Value::Json(j) => j.clone(),
                    Value::Int(_) => None,
                })
                .collect::<Vec<Option<String>>>(),
            ),
        };
    }
    q
}
