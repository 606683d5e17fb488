//! Every query both databases answer the same way, written once: teams,
//! keys, spend, reports, counts, word counts. `on_db!` runs the same code
//! against whichever pool the store has, with its `dialect` for what
//! cannot be spelled the same; each row is read with `try_get` (a value the
//! database holds in an unexpected type is an error, not a panic).

use chrono::{DateTime, Utc};

use super::{
    to_i64, to_u64, CountsRow, KeyRow, ReportBy, ReportRow, Store, StoreError, TeamRow, WordCount,
};
use crate::period::{Budget, Period};
use crate::pricing::{Line, NanoUsd};

/// Runs `$body` with `$pool` (reads and admin writes), `$writer` (the
/// usage writer's connection: SQLite keeps its own) and `$d` (the dialect)
/// of this store.
macro_rules! on_db {
    ($store:expr, $pool:ident, $writer:ident, $d:ident => $body:expr) => {
        match $store {
            Store::Sqlite(s) => {
                let ($pool, $writer, $d) = (s.pool(), s.writer(), $crate::store::dialect::Sqlite);
                $body
            }
            Store::Postgres(s) => {
                let ($pool, $writer, $d) = (s.pool(), s.pool(), $crate::store::dialect::Postgres);
                $body
            }
        }
    };
}
pub(super) use on_db;

/// The one row a text key names (`None`: no such row), read with `$read`,
/// on either database.
macro_rules! row_by_key {
    ($store:expr, $sql:expr, $key:expr, $read:path) => {
        on_db!($store, pool, _writer, _d => {
            let row = sqlx::query($sql).bind($key).fetch_optional(pool).await?;
            Ok(row.as_ref().map($read).transpose()?)
        })
    };
}
pub(super) use row_by_key;

impl Store {
    /// Proves the database can be written (at start of `serve`): a read-only
    /// file or a full disk must stop the server, not drop every row.
    pub async fn probe_write(&self) -> Result<(), StoreError> {
        on_db!(self, _pool, writer, _d => {
            sqlx::query(
                "INSERT INTO tollgate_meta (key, value) VALUES ('last_start', $1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(super::now_text())
            .execute(writer)
            .await?;
        });
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        on_db!(self, pool, _writer, _d => {
            sqlx::query("SELECT 1").execute(pool).await?;
        });
        Ok(())
    }

    pub async fn create_team(
        &self,
        name: &str,
        budget: Option<Budget>,
        max_output_tokens: Option<u64>,
    ) -> Result<TeamRow, StoreError> {
        let r = on_db!(self, pool, _writer, d => {
            sqlx::query(
                "INSERT INTO teams (name, budget_nano_usd, budget_period, max_output_tokens, \
                 created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $5)",
            )
            .bind(name)
            .bind(budget.map(|b| to_i64(b.limit.0)))
            .bind(budget.map(|b| b.period.as_str()))
            .bind(max_output_tokens.map(to_i64))
            .bind(d.now())
            .execute(pool)
            .await
            .map(|_| ())
        });
        match r {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::Conflict(format!("team `{name}`")))
            }
            Err(e) => Err(e.into()),
            Ok(()) => self.team(name).await,
        }
    }

    pub async fn team(&self, name: &str) -> Result<TeamRow, StoreError> {
        let team = on_db!(self, pool, _writer, d => {
            let row = sqlx::query("SELECT * FROM teams WHERE name = $1")
                .bind(name)
                .fetch_optional(pool)
                .await?;
            match row {
                Some(r) => Some(team_row(&r, d.read_time(&r, "created_at")?)?),
                None => None,
            }
        });
        team.ok_or_else(|| StoreError::NotFound(format!("team `{name}`")))
    }

    pub async fn teams(&self) -> Result<Vec<TeamRow>, StoreError> {
        on_db!(self, pool, _writer, d => {
            let rows = sqlx::query("SELECT * FROM teams ORDER BY name")
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|r| Ok(team_row(r, d.read_time(r, "created_at")?)?))
                .collect()
        })
    }

    /// Sets the budget (None clears it) and, when given, the output cap
    /// (`Some(None)` clears it).
    pub async fn set_budget(
        &self,
        name: &str,
        budget: Option<Budget>,
        max_output_tokens: Option<Option<u64>>,
    ) -> Result<TeamRow, StoreError> {
        let current = self.team(name).await?;
        let cap = max_output_tokens.unwrap_or(current.max_output_tokens);
        on_db!(self, pool, _writer, d => {
            sqlx::query(
                "UPDATE teams SET budget_nano_usd = $1, budget_period = $2, \
                 max_output_tokens = $3, updated_at = $4 WHERE name = $5",
            )
            .bind(budget.map(|b| to_i64(b.limit.0)))
            .bind(budget.map(|b| b.period.as_str()))
            .bind(cap.map(to_i64))
            .bind(d.now())
            .bind(name)
            .execute(pool)
            .await?;
        });
        self.team(name).await
    }

    pub async fn insert_key(&self, key: &KeyRow) -> Result<(), StoreError> {
        self.team(&key.team).await?;
        on_db!(self, pool, _writer, d => {
            let sql = format!(
                "INSERT INTO api_keys (id, team, name, key_hash, key_prefix, models, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, {})",
                d.time_param(7)
            );
            sqlx::query(&sql)
                .bind(&key.id)
                .bind(&key.team)
                .bind(&key.name)
                .bind(&key.hash)
                .bind(&key.prefix)
                .bind(key.models.join(","))
                .bind(&key.created_at)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    pub async fn keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        on_db!(self, pool, _writer, d => {
            let rows = sqlx::query("SELECT * FROM api_keys ORDER BY created_at, id")
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|r| {
                    let times = (d.read_time(r, "created_at")?, d.read_opt_time(r, "revoked_at")?);
                    Ok(key_row(r, times)?)
                })
                .collect()
        })
    }

    pub async fn revoke_key(&self, id: &str) -> Result<(), StoreError> {
        let affected = on_db!(self, pool, _writer, d => {
            sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
                .bind(d.now())
                .bind(id)
                .execute(pool)
                .await?
                .rows_affected()
        });
        if affected == 0 {
            return Err(StoreError::NotFound(format!("key `{id}`")));
        }
        Ok(())
    }

    /// A team's recorded spend since `since`, in nano-USD, with what its
    /// background responses still pending and its batches not billed yet
    /// hold (`pending_usage`, `batches`).
    pub async fn spend_since(&self, team: &str, since: DateTime<Utc>) -> Result<u64, StoreError> {
        let held: i64 = on_db!(self, pool, _writer, _d => {
            sqlx::query_scalar(
                "SELECT (SELECT CAST(COALESCE(SUM(reserved_nano_usd), 0) AS BIGINT) \
                    FROM pending_usage WHERE team = $1 AND created_ms >= $2) \
                 + (SELECT CAST(COALESCE(SUM(reserved_nano_usd), 0) AS BIGINT) \
                    FROM batches WHERE team = $1 AND created_ms >= $2 AND billed_ms IS NULL)",
            )
            .bind(team)
            .bind(since.timestamp_millis())
            .fetch_one(pool)
            .await?
        });
        Ok(self.usage_spend_since(team, since).await? + to_u64(held))
    }

    /// A report read from the rows themselves, from `since` until `until`
    /// (`Store::report` reads the rollups and only the rest of an hour here).
    pub async fn report_rows(
        &self,
        by: ReportBy,
        since: DateTime<Utc>,
        until: Option<DateTime<Utc>>,
    ) -> Result<Vec<ReportRow>, StoreError> {
        let until_filter = if until.is_some() {
            " AND created_ms < $2"
        } else {
            ""
        };
        on_db!(self, pool, _writer, d => {
            let sql = match by {
                ReportBy::Component => {
                    let (entries, value) = d.json_entries("usage.cost_breakdown");
                    format!(
                        "SELECT j.key AS grp, COUNT(*) AS requests, CAST(0 AS BIGINT) AS p, \
                         CAST(0 AS BIGINT) AS c, CAST(0 AS BIGINT) AS ca, \
                         CAST(COALESCE(SUM({value}), 0) AS BIGINT) AS cost \
                         FROM usage, {entries} WHERE created_ms >= $1{until_filter} \
                         GROUP BY grp ORDER BY grp"
                    )
                }
                _ => {
                    let sums = Line::ALL
                        .iter()
                        .enumerate()
                        .map(|(i, l)| {
                            let v = d.json_int("cost_breakdown", l.name());
                            format!("CAST(COALESCE(SUM({v}), 0) AS BIGINT) AS c{i}")
                        })
                        .collect::<Vec<_>>()
                        .join(", ");
                    let tags = if by == ReportBy::Tag { d.tag_entries() } else { "" };
                    format!(
                        "SELECT {} AS grp, COUNT(*) AS requests, {}, {sums} FROM usage {tags} \
                         WHERE created_ms >= $1{until_filter} GROUP BY grp ORDER BY grp",
                        group_of(by, d.day()),
                        TOTALS
                    )
                }
            };
            let rows = sqlx::query(&sql)
                .bind(since.timestamp_millis())
                .bind(until.map(|t| t.timestamp_millis()))
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|r| Ok(report_row(r, by)?))
                .collect()
        })
    }

    /// Every usage row since `since`, with its counts (`report --shadow`).
    pub async fn counts_since(&self, since: DateTime<Utc>) -> Result<Vec<CountsRow>, StoreError> {
        on_db!(self, pool, _writer, d => {
            let sql = format!(
                "SELECT {} FROM usage WHERE created_ms >= $1 ORDER BY created_ms, id",
                super::counts_columns(|c| d.json_text(c), "created_ms")
            );
            let rows = sqlx::query(&sql)
                .bind(since.timestamp_millis())
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|r| Ok(CountsRow::from_row(r)?))
                .collect()
        })
    }

    /// Adds sampled word counts (the word-counting thread's flush).
    pub async fn insert_word_counts(&self, rows: &[WordCount]) -> Result<(), StoreError> {
        self.check_file()?;
        on_db!(self, _pool, writer, d => {
            let mut tx = writer.begin().await?;
            for r in rows {
                sqlx::query(
                    "INSERT INTO word_counts (created_at, team, family, script, side, samples, \
                     words, chars, tokens) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(d.now())
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
        });
        Ok(())
    }

    /// Word counts since `since` (one team's, or all), summed per family,
    /// script and side; `team` is then empty unless one was asked for.
    pub async fn word_counts_since(
        &self,
        since: DateTime<Utc>,
        team: Option<&str>,
    ) -> Result<Vec<WordCount>, StoreError> {
        on_db!(self, pool, _writer, d => {
            let rows = sqlx::query(
                "SELECT COALESCE(CAST($2 AS TEXT), '') AS team, family, script, side, \
                 CAST(SUM(samples) AS BIGINT) AS samples, CAST(SUM(words) AS BIGINT) AS words, \
                 CAST(SUM(chars) AS BIGINT) AS chars, CAST(SUM(tokens) AS BIGINT) AS tokens \
                 FROM word_counts WHERE created_at >= $1 AND (CAST($2 AS TEXT) IS NULL OR team = $2) \
                 GROUP BY family, script, side ORDER BY family, script, side",
            )
            .bind(d.since(since))
            .bind(team)
            .fetch_all(pool)
            .await?;
            rows.iter()
                .map(|r| Ok(WordCount::from_row(r)?))
                .collect()
        })
    }
}

/// A report's token and money totals (`p`, `c`, `ca`, `cost`).
const TOTALS: &str = "CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT) AS p, \
     CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) AS c, \
     CAST(COALESCE(SUM(cached_tokens), 0) AS BIGINT) AS ca, \
     CAST(COALESCE(SUM(cost_nano_usd), 0) AS BIGINT) AS cost";

/// The SQL a report groups by (`day`: the dialect's day of `created_at`).
fn group_of(by: ReportBy, day: &'static str) -> &'static str {
    match by {
        ReportBy::Team => "team",
        ReportBy::Model => "model",
        ReportBy::Key => "COALESCE(key_id, '-')",
        ReportBy::Day => day,
        ReportBy::Provider => "provider",
        ReportBy::Tier | ReportBy::Component => "COALESCE(service_tier, 'standard')",
        ReportBy::EndUser => "COALESCE(team || ':' || end_user, '-')",
        ReportBy::Tag => "COALESCE(tg.value, '-')",
    }
}

fn team_row<R>(r: &R, created_at: String) -> Result<TeamRow, sqlx::Error>
where
    R: sqlx::Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'q> String: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> Option<String>: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> Option<i64>: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
{
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
    Ok(TeamRow {
        name: r.try_get("name")?,
        budget,
        max_output_tokens: cap.and_then(|c| u64::try_from(c).ok()),
        created_at,
    })
}

fn key_row<R>(
    r: &R,
    (created_at, revoked_at): (String, Option<String>),
) -> Result<KeyRow, sqlx::Error>
where
    R: sqlx::Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'q> String: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> Option<String>: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
{
    let models: String = r.try_get("models")?;
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
        created_at,
        revoked_at,
    })
}

/// A report line; by component, the line's own component carries its cost.
fn report_row<R>(r: &R, by: ReportBy) -> Result<ReportRow, sqlx::Error>
where
    R: sqlx::Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'q> String: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> i64: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
{
    let group: String = r.try_get("grp")?;
    let cost: i64 = r.try_get("cost")?;
    let mut components = [0i64; Line::COUNT];
    for (i, line) in Line::ALL.iter().enumerate() {
        components[i] = match by {
            ReportBy::Component if line.name() == group => cost,
            ReportBy::Component => 0,
            _ => r.try_get(format!("c{i}").as_str())?,
        };
    }
    Ok(ReportRow {
        components,
        group,
        requests: r.try_get("requests")?,
        prompt_tokens: r.try_get("p")?,
        completion_tokens: r.try_get("c")?,
        cached_tokens: r.try_get("ca")?,
        cost_nano_usd: cost,
    })
}
