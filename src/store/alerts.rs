//! `alerts_sent` (SPEC 14): which budget alerts were claimed and delivered,
//! so each goes out once per threshold and period however many replicas
//! see the crossing and however often they restart. `alerts` owns when to
//! send; this is its table.

use sqlx::Row;

use super::queries::on_db;
use super::{Store, StoreError};

/// One alert: which webhook, budget, period and threshold, and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRow {
    pub target: String,
    pub account: String,
    pub period: String,
    pub threshold_ppm: i64,
    pub body: String,
}

impl Store {
    /// Claims an alert for `node`: true when no one had (it is ours to send).
    pub async fn claim_alert(
        &self,
        a: &AlertRow,
        node: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        on_db!(self, pool, _writer, _d => {
            let done = sqlx::query(
                "INSERT INTO alerts_sent (target, account, period, threshold_ppm, body, claimed_by, claimed_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            )
            .bind(&a.target)
            .bind(&a.account)
            .bind(&a.period)
            .bind(a.threshold_ppm)
            .bind(&a.body)
            .bind(node)
            .bind(now_ms)
            .execute(pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// An attempt of `node`'s: counted, and the claim kept fresh; `delivered`
    /// marks it sent.
    pub async fn alert_attempted(
        &self,
        a: &AlertRow,
        node: &str,
        now_ms: i64,
        delivered: bool,
    ) -> Result<(), StoreError> {
        on_db!(self, pool, _writer, _d => {
            sqlx::query(
                "UPDATE alerts_sent SET attempts = attempts + 1, claimed_ms = $5, \
                 delivered_ms = CASE WHEN $6 THEN $5 ELSE delivered_ms END \
                 WHERE target = $1 AND account = $2 AND period = $3 AND threshold_ppm = $4 AND claimed_by = $7",
            )
            .bind(&a.target)
            .bind(&a.account)
            .bind(&a.period)
            .bind(a.threshold_ppm)
            .bind(now_ms)
            .bind(delivered)
            .bind(node)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// Takes over the undelivered alerts of `node` itself (an earlier run)
    /// and of replicas whose claim is older than `stale_before_ms`; returns
    /// them to send.
    pub async fn reclaim_alerts(
        &self,
        node: &str,
        now_ms: i64,
        stale_before_ms: i64,
    ) -> Result<Vec<AlertRow>, StoreError> {
        on_db!(self, pool, _writer, _d => {
            let rows = sqlx::query(
                "UPDATE alerts_sent SET claimed_by = $1, claimed_ms = $2 \
                 WHERE delivered_ms IS NULL AND (claimed_by = $1 OR claimed_ms < $3) \
                 RETURNING target, account, period, threshold_ppm, body",
            )
            .bind(node)
            .bind(now_ms)
            .bind(stale_before_ms)
            .fetch_all(pool)
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                out.push(AlertRow {
                    target: r.try_get("target")?,
                    account: r.try_get("account")?,
                    period: r.try_get("period")?,
                    threshold_ppm: r.try_get("threshold_ppm")?,
                    body: r.try_get("body")?,
                });
            }
            Ok(out)
        })
    }
}
