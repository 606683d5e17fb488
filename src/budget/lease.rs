//! The shared-budget lease protocol on Postgres (see `shared` for why):
//! a replica takes a slice of a team's budget (`acquire`), gives back what
//! it does not need (`release`), proves it is alive (`heartbeat`, which
//! also reclaims the slices of replicas gone silent) and drops its slices
//! at shutdown (`release_node`); `views` reads every replica's totals.
//! `budget_state` and `budget_leases` are this module's tables; the store
//! gives it a pool and this replica's name. The one other writer of them
//! is the usage insert (`store::postgres`), which moves a row's cost from
//! its lease to `spent` in the transaction that writes the row.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Row;

use crate::store::{to_i64, to_u64, PostgresStore, StoreError};

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

/// Takes budget for this replica: at least `need`, `want` when there is room,
/// nothing when `need` does not fit. Serialized per team and period by a
/// row lock on `budget_state`, so replicas never hand out more than
/// `limit - spent` between them.
pub async fn acquire(
    db: &PostgresStore,
    team: &str,
    period: &str,
    period_start: Option<DateTime<Utc>>,
    limit: u64,
    need: u64,
    want: u64,
) -> Result<LeaseGrant, StoreError> {
    let node = db.node();
    let mut tx = db.pool().begin().await?;
    // The first replica to budget this period starts from what the
    // usage table already holds for it (a budget set mid-period).
    let (rows_of, values) = crate::store::account_filter(team, true, 4);
    let start = format!(
        "INSERT INTO budget_state (team, period, spent) \
         SELECT $1, $2, COALESCE(SUM(cost_nano_usd), 0)::BIGINT FROM usage \
         WHERE {rows_of} AND ($3::bigint IS NULL OR created_ms >= $3) \
         ON CONFLICT (team, period) DO NOTHING"
    );
    let mut q = sqlx::query(&start)
        .bind(team)
        .bind(period)
        .bind(period_start.map(|t| t.timestamp_millis()));
    for v in &values {
        q = q.bind(v);
    }
    q.execute(&mut *tx).await?;
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
pub async fn release(
    db: &PostgresStore,
    team: &str,
    period: &str,
    amount: u64,
) -> Result<(), StoreError> {
    let node = db.node();
    sqlx::query(
        "UPDATE budget_leases SET leased = GREATEST(leased - $4, 0), heartbeat_at = now() \
         WHERE team = $1 AND period = $2 AND node = $3",
    )
    .bind(team)
    .bind(period)
    .bind(node)
    .bind(to_i64(amount))
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Marks this replica alive and reclaims the leases of replicas silent for
/// longer than `stale` (their unwritten usage died with them). Returns
/// false when this node's own leases were reclaimed.
pub async fn heartbeat(db: &PostgresStore, stale: Duration) -> Result<bool, StoreError> {
    let node = db.node();
    sqlx::query("UPDATE budget_leases SET heartbeat_at = now() WHERE node = $1")
        .bind(node)
        .execute(db.pool())
        .await?;
    let reclaimed = sqlx::query(
        "DELETE FROM budget_leases WHERE heartbeat_at < now() - make_interval(secs => $1) \
         RETURNING node",
    )
    .bind(stale.as_secs_f64())
    .fetch_all(db.pool())
    .await?;
    Ok(!reclaimed
        .iter()
        .any(|r| r.try_get::<String, _>("node").is_ok_and(|n| n == node)))
}

/// Drops every lease of this replica (at shutdown, after the last write).
pub async fn release_node(db: &PostgresStore) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM budget_leases WHERE node = $1")
        .bind(db.node())
        .execute(db.pool())
        .await?;
    Ok(())
}

/// The shared state of these (team, period) pairs.
pub async fn views(
    db: &PostgresStore,
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
    .fetch_all(db.pool())
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
