//! The budgets of keys, end users and tags (SPEC 14; a team's budget stays
//! on `teams`): the `budgets` table, one row per ledger account
//! (`budget::account`), and the spend of an account read from the usage
//! rows (when a budget is set, or its period begins, on a single node).
//! Also the rate limits of teams and keys (`rate_limits`, same accounts).

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::queries::on_db;
use super::{to_i64, to_u64, Store, StoreError};
use crate::period::{level_of, Level};
use crate::period::{Budget, Limits, Period};
use crate::pricing::NanoUsd;

/// The condition on `usage` that picks an account's rows, and its values
/// bound from `$first` on (`tags` is a JSON array of names).
pub(crate) fn account_filter(account: &str, postgres: bool, first: usize) -> (String, Vec<String>) {
    let (level, name) = level_of(account);
    let (a, b) = (format!("${first}"), format!("${}", first + 1));
    match level {
        Level::Team => (format!("team = {a}"), vec![name.to_string()]),
        Level::Key => (format!("key_id = {a}"), vec![name.to_string()]),
        Level::EndUser => {
            let (team, user) = name.split_once(':').unwrap_or((name, ""));
            (
                format!("team = {a} AND end_user = {b}"),
                vec![team.to_string(), user.to_string()],
            )
        }
        // A tag is a name without quotes, so `"tag"` in the array's text is
        // that tag. (A JSON cast would be applied to every name: Postgres
        // pushes the condition down to the `names` scan of the view.)
        Level::Tag if postgres => (
            format!("strpos(tags, '\"' || {a} || '\"') > 0"),
            vec![name.to_string()],
        ),
        Level::Tag => (
            format!("instr(tags, '\"' || {a} || '\"') > 0"),
            vec![name.to_string()],
        ),
    }
}

impl Store {
    /// Every key, end-user and tag budget, by account.
    pub async fn level_budgets(&self) -> Result<Vec<(String, Budget)>, StoreError> {
        on_db!(self, pool, _writer, _d => {
            let rows = sqlx::query(
                "SELECT account, budget_nano_usd, budget_period FROM budgets ORDER BY account",
            )
            .fetch_all(pool)
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let period: String = r.try_get("budget_period")?;
                let Some(period) = Period::parse(&period) else {
                    continue;
                };
                let limit: i64 = r.try_get("budget_nano_usd")?;
                let budget = Budget {
                    limit: NanoUsd(to_u64(limit)),
                    period,
                };
                out.push((r.try_get("account")?, budget));
            }
            Ok(out)
        })
    }

    /// Sets (or, with `None`, clears) an account's budget; false when
    /// clearing one that was not set.
    pub async fn set_level_budget(
        &self,
        account: &str,
        budget: Option<Budget>,
    ) -> Result<bool, StoreError> {
        on_db!(self, pool, _writer, _d => {
            let done = match budget {
                Some(b) => sqlx::query(
                    "INSERT INTO budgets (account, budget_nano_usd, budget_period) VALUES ($1, $2, $3) \
                     ON CONFLICT (account) DO UPDATE SET budget_nano_usd = excluded.budget_nano_usd, \
                     budget_period = excluded.budget_period",
                )
                .bind(account)
                .bind(to_i64(b.limit.0))
                .bind(b.period.as_str())
                .execute(pool)
                .await?,
                None => sqlx::query("DELETE FROM budgets WHERE account = $1")
                    .bind(account)
                    .execute(pool)
                    .await?,
            };
            Ok(done.rows_affected() > 0)
        })
    }

    /// The recorded spend of an account since `since` (a team's as
    /// `spend_since`, its held reservations included).
    pub async fn account_spend_since(
        &self,
        account: &str,
        since: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let (level, name) = level_of(account);
        if level == Level::Team {
            return self.spend_since(name, since).await;
        }
        let postgres = self.shared().is_some();
        let (filter, values) = account_filter(account, postgres, 2);
        let sql = format!(
            "SELECT CAST(COALESCE(SUM(cost_nano_usd), 0) AS BIGINT) FROM usage \
             WHERE created_ms >= $1 AND {filter}"
        );
        let spent: i64 = on_db!(self, pool, _writer, _d => {
            let mut q = sqlx::query_scalar(&sql).bind(since.timestamp_millis().max(0));
            for v in &values {
                q = q.bind(v);
            }
            q.fetch_one(pool).await?
        });
        Ok(to_u64(spent))
    }

    /// Every team's and key's rate limits, by account.
    pub async fn rate_limits(&self) -> Result<Vec<(String, Limits)>, StoreError> {
        on_db!(self, pool, _writer, _d => {
            let rows = sqlx::query("SELECT account, rpm, tpm FROM rate_limits ORDER BY account")
                .fetch_all(pool)
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let rpm: Option<i64> = r.try_get("rpm")?;
                let tpm: Option<i64> = r.try_get("tpm")?;
                let limits = Limits {
                    rpm: rpm.map(to_u64),
                    tpm: tpm.map(to_u64),
                };
                out.push((r.try_get("account")?, limits));
            }
            Ok(out)
        })
    }

    /// Sets an account's rate limits (neither unit: cleared).
    pub async fn set_rate_limits(&self, account: &str, limits: Limits) -> Result<(), StoreError> {
        on_db!(self, pool, _writer, _d => {
            if limits.rpm.is_none() && limits.tpm.is_none() {
                sqlx::query("DELETE FROM rate_limits WHERE account = $1")
                    .bind(account)
                    .execute(pool)
                    .await?;
            } else {
                sqlx::query(
                    "INSERT INTO rate_limits (account, rpm, tpm) VALUES ($1, $2, $3) \
                     ON CONFLICT (account) DO UPDATE SET rpm = excluded.rpm, tpm = excluded.tpm",
                )
                .bind(account)
                .bind(limits.rpm.map(to_i64))
                .bind(limits.tpm.map(to_i64))
                .execute(pool)
                .await?;
            }
            Ok(())
        })
    }
}
