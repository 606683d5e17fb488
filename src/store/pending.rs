//! The `pending_usage` table: background responses (SPEC 12) answered
//! with `queued` or `in_progress`, not billed yet. One row per response
//! from creation until it is claimed; the claim is a `DELETE ... RETURNING`,
//! so of two replicas (or a poll and a cancel) exactly one gets the row
//! and writes the usage row.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::queries::{on_db, row_by_key};
use super::{to_i64, to_u64, Store, StoreError};

/// What a pending response's usage row will need from its creation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRow {
    pub response_id: String,
    pub request_id: String,
    pub created_at: DateTime<Utc>,
    pub team: String,
    pub key_id: Option<String>,
    pub model: String,
    pub upstream: String,
    pub end_user: Option<String>,
    /// What the creation reserved against the team's budget.
    pub reserved_nano_usd: u64,
}

/// Pending responses of one team: how many, and when the oldest began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCount {
    pub team: String,
    pub pending: u64,
    pub oldest: DateTime<Utc>,
}

const COLUMNS: &str = "response_id, request_id, created_ms, team, key_id, model, upstream, \
                       end_user, reserved_nano_usd";

fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn read<R: Row>(r: &R) -> Result<PendingRow, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(PendingRow {
        response_id: r.try_get("response_id")?,
        request_id: r.try_get("request_id")?,
        created_at: from_ms(r.try_get("created_ms")?),
        team: r.try_get("team")?,
        key_id: r.try_get("key_id")?,
        model: r.try_get("model")?,
        upstream: r.try_get("upstream")?,
        end_user: r.try_get("end_user")?,
        reserved_nano_usd: to_u64(r.try_get("reserved_nano_usd")?),
    })
}

impl Store {
    /// Records a response as pending. A response id seen again (a resumed
    /// creation stream) keeps its first row.
    pub async fn insert_pending(&self, p: &PendingRow) -> Result<(), StoreError> {
        self.check_file()?;
        on_db!(self, pool, _writer, _d => {
            sqlx::query(&format!(
                "INSERT INTO pending_usage ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (response_id) DO NOTHING"
            ))
            .bind(&p.response_id)
            .bind(&p.request_id)
            .bind(p.created_at.timestamp_millis())
            .bind(&p.team)
            .bind(&p.key_id)
            .bind(&p.model)
            .bind(&p.upstream)
            .bind(&p.end_user)
            .bind(to_i64(p.reserved_nano_usd))
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Takes a pending response for billing: its row, to this caller only
    /// (`None` when it was never pending or is claimed already).
    pub async fn claim_pending(&self, response_id: &str) -> Result<Option<PendingRow>, StoreError> {
        let sql = format!("DELETE FROM pending_usage WHERE response_id = $1 RETURNING {COLUMNS}");
        row_by_key!(self, &sql, response_id, read)
    }

    /// A pending response, left in place.
    pub async fn pending(&self, response_id: &str) -> Result<Option<PendingRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM pending_usage WHERE response_id = $1");
        row_by_key!(self, &sql, response_id, read)
    }

    /// Pending responses begun before `before`, oldest first.
    pub async fn pending_before(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<PendingRow>, StoreError> {
        on_db!(self, pool, _writer, _d => {
            let rows = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM pending_usage WHERE created_ms < $1 \
                 ORDER BY created_ms LIMIT $2"
            ))
            .bind(before.timestamp_millis())
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
            Ok(rows.iter().map(read).collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Pending responses per team (the `tollgate_pending_usage` gauge, `report`).
    pub async fn pending_counts(&self) -> Result<Vec<PendingCount>, StoreError> {
        on_db!(self, pool, _writer, _d => {
            let rows = sqlx::query(
                "SELECT team, CAST(COUNT(*) AS BIGINT) AS n, CAST(MIN(created_ms) AS BIGINT) AS oldest \
                 FROM pending_usage GROUP BY team ORDER BY team",
            )
            .fetch_all(pool)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(PendingCount {
                        team: r.try_get("team")?,
                        pending: to_u64(r.try_get("n")?),
                        oldest: from_ms(r.try_get("oldest")?),
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }
}
