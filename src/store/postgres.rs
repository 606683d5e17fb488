//! Postgres through sqlx: migrations from `migrations/postgres`, the usage
//! table written in one UNNEST insert per batch, and the shared budget
//! tables several replicas use to enforce one budget (see `budget::shared`).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};

use super::{
    component_sums, counts_columns, row_components, time_text, to_i64, to_u64, ColumnType,
    CountsRow, KeyRow, ReportBy, ReportRow, StoreError, TeamRow, UsageRecord, Value, WordCount,
    USAGE_COLUMNS,
};
use crate::period::{Budget, Period};
use crate::pricing::NanoUsd;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// What a lease request got, and the team's shared state as it saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseGrant {
    pub granted: u64,
    pub view: BudgetView,
}

/// A team's shared budget state for one period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BudgetView {
    /// Recorded spend of every replica.
    pub spent: u64,
    /// Held by every replica (this one included).
    pub leased: u64,
}

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

    pub fn node(&self) -> &str {
        &self.node
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
        let inserted: Vec<String> = insert_rows(&rows).fetch_all(&mut *tx).await?;
        let inserted: std::collections::HashSet<String> = inserted.into_iter().collect();

        let mut recorded: HashMap<(&str, &str, &str), u64> = HashMap::new();
        let mut skipped = Vec::new();
        for r in &rows {
            if !inserted.contains(&r.request_id) {
                skipped.push(r.request_id.clone());
                continue;
            }
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
        tx.commit().await?;
        Ok(skipped)
    }

    pub async fn probe_write(&self) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tollgate_meta (key, value) VALUES ('last_start', now()::text) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Takes budget for this replica: at least `need`, `want` when there is room,
    /// nothing when `need` does not fit. Serialized per team and period by a
    /// row lock on `budget_state`, so replicas never hand out more than
    /// `limit - spent` between them.
    pub async fn acquire_lease(
        &self,
        team: &str,
        period: &str,
        period_start: Option<DateTime<Utc>>,
        limit: u64,
        need: u64,
        want: u64,
    ) -> Result<LeaseGrant, StoreError> {
        let node = &*self.node;
        let mut tx = self.pool.begin().await?;
        // The first replica to budget this period starts from what the
        // usage table already holds for it (a budget set mid-period).
        sqlx::query(
            "INSERT INTO budget_state (team, period, spent) \
             SELECT $1, $2, COALESCE(SUM(cost_nano_usd), 0)::BIGINT FROM usage \
             WHERE team = $1 AND ($3::timestamptz IS NULL OR created_at >= $3) \
             ON CONFLICT (team, period) DO NOTHING",
        )
        .bind(team)
        .bind(period)
        .bind(period_start)
        .execute(&mut *tx)
        .await?;
        let spent: i64 = sqlx::query_scalar(
            "SELECT spent FROM budget_state WHERE team = $1 AND period = $2 FOR UPDATE",
        )
        .bind(team)
        .bind(period)
        .fetch_one(&mut *tx)
        .await?;
        let leased: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(leased), 0)::BIGINT FROM budget_leases WHERE team = $1 AND period = $2",
        )
        .bind(team)
        .bind(period)
        .fetch_one(&mut *tx)
        .await?;
        let (spent, leased) = (to_u64(spent), to_u64(leased));
        let free = limit.saturating_sub(spent.saturating_add(leased));
        let granted = if need > free {
            0
        } else {
            want.max(need).min(free)
        };
        if granted > 0 {
            sqlx::query(
                "INSERT INTO budget_leases (team, period, node, leased, heartbeat_at) \
                 VALUES ($1, $2, $3, $4, now()) \
                 ON CONFLICT (team, period, node) \
                 DO UPDATE SET leased = budget_leases.leased + EXCLUDED.leased, heartbeat_at = now()",
            )
            .bind(team)
            .bind(period)
            .bind(node)
            .bind(to_i64(granted))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(LeaseGrant {
            granted,
            view: BudgetView {
                spent,
                leased: leased + granted,
            },
        })
    }

    /// Gives `amount` of this replica's lease back to the team.
    pub async fn release_lease(
        &self,
        team: &str,
        period: &str,
        amount: u64,
    ) -> Result<(), StoreError> {
        let node = &*self.node;
        sqlx::query(
            "UPDATE budget_leases SET leased = GREATEST(leased - $4, 0), heartbeat_at = now() \
             WHERE team = $1 AND period = $2 AND node = $3",
        )
        .bind(team)
        .bind(period)
        .bind(node)
        .bind(to_i64(amount))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks this replica alive and reclaims the leases of replicas silent for
    /// longer than `stale` (their unwritten usage died with them). Returns
    /// false when this node's own leases were reclaimed.
    pub async fn heartbeat(&self, stale: Duration) -> Result<bool, StoreError> {
        let node = &*self.node;
        sqlx::query("UPDATE budget_leases SET heartbeat_at = now() WHERE node = $1")
            .bind(node)
            .execute(&self.pool)
            .await?;
        let reclaimed = sqlx::query(
            "DELETE FROM budget_leases WHERE heartbeat_at < now() - make_interval(secs => $1) \
             RETURNING node",
        )
        .bind(stale.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        Ok(!reclaimed
            .iter()
            .any(|r| r.try_get::<String, _>("node").is_ok_and(|n| n == node)))
    }

    /// Drops every lease of this replica (at shutdown, after the last write).
    pub async fn release_node(&self) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM budget_leases WHERE node = $1")
            .bind(&*self.node)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The shared state of these (team, period) pairs.
    pub async fn budget_views(
        &self,
        keys: &[(String, String)],
    ) -> Result<HashMap<(String, String), BudgetView>, StoreError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let teams: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        let periods: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
        let rows = sqlx::query(
            "SELECT s.team, s.period, s.spent, \
             (SELECT COALESCE(SUM(l.leased), 0)::BIGINT FROM budget_leases l \
              WHERE l.team = s.team AND l.period = s.period) AS leased \
             FROM budget_state s WHERE s.team = ANY($1) AND s.period = ANY($2)",
        )
        .bind(&teams)
        .bind(&periods)
        .fetch_all(&self.pool)
        .await?;
        let mut out = HashMap::new();
        for r in rows {
            let view = BudgetView {
                spent: to_u64(r.try_get("spent")?),
                leased: to_u64(r.try_get("leased")?),
            };
            out.insert((r.try_get("team")?, r.try_get("period")?), view);
        }
        Ok(out)
    }

    pub async fn create_team(
        &self,
        name: &str,
        budget: Option<Budget>,
        max_output_tokens: Option<u64>,
    ) -> Result<TeamRow, StoreError> {
        let r = sqlx::query(
            "INSERT INTO teams (name, budget_nano_usd, budget_period, max_output_tokens, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, now(), now())",
        )
        .bind(name)
        .bind(budget.map(|b| to_i64(b.limit.0)))
        .bind(budget.map(|b| b.period.as_str()))
        .bind(max_output_tokens.map(to_i64))
        .execute(&self.pool)
        .await;
        match r {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::Conflict(format!("team `{name}`")))
            }
            Err(e) => Err(e.into()),
            Ok(_) => self.team(name).await,
        }
    }

    async fn team(&self, name: &str) -> Result<TeamRow, StoreError> {
        let row = sqlx::query("SELECT * FROM teams WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => team_row(&r),
            None => Err(StoreError::NotFound(format!("team `{name}`"))),
        }
    }

    pub async fn teams(&self) -> Result<Vec<TeamRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM teams ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(team_row).collect()
    }

    pub async fn set_budget(
        &self,
        name: &str,
        budget: Option<Budget>,
        max_output_tokens: Option<Option<u64>>,
    ) -> Result<TeamRow, StoreError> {
        let current = self.team(name).await?;
        let cap = max_output_tokens.unwrap_or(current.max_output_tokens);
        sqlx::query(
            "UPDATE teams SET budget_nano_usd = $1, budget_period = $2, max_output_tokens = $3, \
             updated_at = now() WHERE name = $4",
        )
        .bind(budget.map(|b| to_i64(b.limit.0)))
        .bind(budget.map(|b| b.period.as_str()))
        .bind(cap.map(to_i64))
        .bind(name)
        .execute(&self.pool)
        .await?;
        self.team(name).await
    }

    pub async fn insert_key(&self, key: &KeyRow) -> Result<(), StoreError> {
        self.team(&key.team).await?;
        sqlx::query(
            "INSERT INTO api_keys (id, team, name, key_hash, key_prefix, models, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7::text::timestamptz)",
        )
        .bind(&key.id)
        .bind(&key.team)
        .bind(&key.name)
        .bind(&key.hash)
        .bind(&key.prefix)
        .bind(key.models.join(","))
        .bind(&key.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM api_keys ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let models: String = r.try_get("models")?;
                let created: DateTime<Utc> = r.try_get("created_at")?;
                let revoked: Option<DateTime<Utc>> = r.try_get("revoked_at")?;
                Ok(KeyRow {
                    id: r.try_get("id")?,
                    team: r.try_get("team")?,
                    name: r.try_get("name")?,
                    hash: r.try_get("key_hash")?,
                    prefix: r.try_get("key_prefix")?,
                    models: models
                        .split(',')
                        .filter(|m| !m.is_empty())
                        .map(str::to_string)
                        .collect(),
                    created_at: time_text(created),
                    revoked_at: revoked.map(time_text),
                })
            })
            .collect()
    }

    pub async fn revoke_key(&self, id: &str) -> Result<(), StoreError> {
        let r = sqlx::query(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("key `{id}`")));
        }
        Ok(())
    }

    pub async fn spend_since(&self, team: &str, since: DateTime<Utc>) -> Result<u64, StoreError> {
        let total: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(cost_nano_usd), 0)::BIGINT FROM usage \
             WHERE team = $1 AND ($2::timestamptz IS NULL OR created_at >= $2)",
        )
        .bind(team)
        .bind(pg_time(since))
        .fetch_one(&self.pool)
        .await?;
        Ok(to_u64(total))
    }

    pub async fn counts_since(&self, since: DateTime<Utc>) -> Result<Vec<CountsRow>, StoreError> {
        let sql = format!(
            "SELECT {} FROM usage \
             WHERE ($1::timestamptz IS NULL OR created_at >= $1) ORDER BY id",
            counts_columns(
                |column| format!("{column}::text"),
                "(EXTRACT(EPOCH FROM created_at) * 1000)::BIGINT",
            )
        );
        let rows = sqlx::query(&sql)
            .bind(pg_time(since))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(CountsRow::from_row)
            .collect::<Result<_, _>>()?)
    }

    pub async fn insert_word_counts(&self, rows: &[WordCount]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for r in rows {
            sqlx::query(
                "INSERT INTO word_counts (team, family, script, side, samples, words, chars, tokens) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&r.team)
            .bind(&r.family)
            .bind(&r.script)
            .bind(&r.side)
            .bind(to_i64(r.samples))
            .bind(to_i64(r.words))
            .bind(to_i64(r.chars))
            .bind(to_i64(r.tokens))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn word_counts_since(
        &self,
        since: DateTime<Utc>,
        team: Option<&str>,
    ) -> Result<Vec<WordCount>, StoreError> {
        let rows = sqlx::query(
            "SELECT COALESCE($2, '') AS team, family, script, side, SUM(samples)::BIGINT AS samples, \
             SUM(words)::BIGINT AS words, SUM(chars)::BIGINT AS chars, SUM(tokens)::BIGINT AS tokens \
             FROM word_counts WHERE ($1::timestamptz IS NULL OR created_at >= $1) \
             AND ($2::text IS NULL OR team = $2) \
             GROUP BY family, script, side ORDER BY family, script, side",
        )
        .bind(pg_time(since))
        .bind(team)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(WordCount::from_row)
            .collect::<Result<_, _>>()?)
    }

    pub async fn report(
        &self,
        by: ReportBy,
        since: DateTime<Utc>,
    ) -> Result<Vec<ReportRow>, StoreError> {
        let sums = component_sums(
            |name| format!("(cost_breakdown->>'{name}')::BIGINT"),
            "::BIGINT",
        );
        let sql = match by {
            ReportBy::Component => "SELECT j.key AS grp, COUNT(*) AS requests, 0::BIGINT AS p, \
                 0::BIGINT AS c, 0::BIGINT AS ca, COALESCE(SUM(j.value::BIGINT), 0)::BIGINT AS cost \
                 FROM usage, jsonb_each_text(usage.cost_breakdown) AS j \
                 WHERE ($1::timestamptz IS NULL OR created_at >= $1) GROUP BY grp ORDER BY grp"
                .to_string(),
            _ => {
                let group = match by {
                    ReportBy::Team => "team",
                    ReportBy::Model => "model",
                    ReportBy::Key => "COALESCE(key_id, '-')",
                    ReportBy::Day => "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
                    ReportBy::Provider => "provider",
                    ReportBy::Tier | ReportBy::Component => "COALESCE(service_tier, 'standard')",
                };
                format!(
                    "SELECT {group} AS grp, COUNT(*) AS requests, \
                     COALESCE(SUM(prompt_tokens), 0)::BIGINT AS p, COALESCE(SUM(completion_tokens), 0)::BIGINT AS c, \
                     COALESCE(SUM(cached_tokens), 0)::BIGINT AS ca, COALESCE(SUM(cost_nano_usd), 0)::BIGINT AS cost, \
                     {sums} FROM usage WHERE ($1::timestamptz IS NULL OR created_at >= $1) GROUP BY grp ORDER BY grp"
                )
            }
        };
        let rows = sqlx::query(&sql)
            .bind(pg_time(since))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let group: String = r.try_get("grp")?;
                let cost: i64 = r.try_get("cost")?;
                Ok(ReportRow {
                    components: row_components(by, &group, cost, |c| {
                        r.try_get::<i64, _>(c).unwrap_or(0)
                    }),
                    group,
                    requests: r.try_get("requests")?,
                    prompt_tokens: r.try_get("p")?,
                    completion_tokens: r.try_get("c")?,
                    cached_tokens: r.try_get("ca")?,
                    cost_nano_usd: cost,
                })
            })
            .collect()
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The UNNEST insert of `rows`, one array per column of `USAGE_COLUMNS`,
/// returning the request ids inserted (those already stored are skipped).
fn insert_rows(
    rows: &[&UsageRecord],
) -> sqlx::query::QueryScalar<'static, sqlx::Postgres, String, sqlx::postgres::PgArguments> {
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
             ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
            names.join(", "),
            select.join(", "),
            arrays.join(", "),
            names.join(", ")
        )
    });
    let values: Vec<[Value<'_>; USAGE_COLUMNS.len()]> = rows.iter().map(|r| r.values()).collect();
    let mut q = sqlx::query_scalar::<_, String>(SQL.as_str());
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

/// Postgres timestamps stop at 4713 BC; "since the beginning" is NULL.
fn pg_time(t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    (t.timestamp() > 0).then_some(t)
}

fn team_row(r: &sqlx::postgres::PgRow) -> Result<TeamRow, StoreError> {
    let limit: Option<i64> = r.try_get("budget_nano_usd")?;
    let period: Option<String> = r.try_get("budget_period")?;
    let budget = match (limit, period.as_deref().and_then(Period::parse)) {
        (Some(limit), Some(period)) => Some(Budget {
            limit: NanoUsd(to_u64(limit)),
            period,
        }),
        _ => None,
    };
    let cap: Option<i64> = r.try_get("max_output_tokens")?;
    let created: DateTime<Utc> = r.try_get("created_at")?;
    Ok(TeamRow {
        name: r.try_get("name")?,
        budget,
        max_output_tokens: cap.and_then(|c| u64::try_from(c).ok()),
        created_at: time_text(created),
    })
}
