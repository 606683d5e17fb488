//! The Batch API's tables (SPEC 12): `batch_files`, the input files
//! uploaded through tollgate with what their requests may cost; `batches`,
//! each batch created through tollgate until its results are billed. The
//! billing is claimed with one `UPDATE ... RETURNING` (`claim_batch`), so
//! one process reads a batch's results; the usage index keeps a line read
//! twice to one row all the same.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::queries::{on_db, row_by_key};
use super::{to_i64, to_u64, Store, StoreError};

/// A batch created through tollgate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRow {
    pub batch_id: String,
    /// The wire format of its results (`openai`, `anthropic`).
    pub format: String,
    pub team: String,
    pub key_id: Option<String>,
    pub upstream: String,
    /// Its lines' endpoint label (`chat.completions`, `messages`, ...).
    pub endpoint: String,
    pub created_at: DateTime<Utc>,
    /// What its creation reserved against the team's budget.
    pub reserved_nano_usd: u64,
    /// OpenAI: its output file, once a poll showed it.
    pub output_file_id: Option<String>,
    pub billed: bool,
}

const COLUMNS: &str = "batch_id, format, team, key_id, upstream, endpoint, created_ms, \
                       reserved_nano_usd, output_file_id, billed_ms";

fn read<R: Row>(r: &R) -> Result<BatchRow, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let created: i64 = r.try_get("created_ms")?;
    let billed: Option<i64> = r.try_get("billed_ms")?;
    Ok(BatchRow {
        batch_id: r.try_get("batch_id")?,
        format: r.try_get("format")?,
        team: r.try_get("team")?,
        key_id: r.try_get("key_id")?,
        upstream: r.try_get("upstream")?,
        endpoint: r.try_get("endpoint")?,
        created_at: DateTime::from_timestamp_millis(created).unwrap_or(DateTime::<Utc>::MIN_UTC),
        reserved_nano_usd: to_u64(r.try_get("reserved_nano_usd")?),
        output_file_id: r.try_get("output_file_id")?,
        billed: billed.is_some(),
    })
}

impl Store {
    /// Records a batch input file uploaded through tollgate (`bound`: the
    /// most its requests may cost; `None` when some line cannot be bounded).
    pub async fn insert_batch_file(
        &self,
        file_id: &str,
        team: &str,
        lines: u64,
        bound: Option<u64>,
    ) -> Result<(), StoreError> {
        on_db!(self, pool, _writer, _d => {
            sqlx::query(
                "INSERT INTO batch_files (file_id, team, lines, bound_nano_usd, created_ms) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (file_id) DO NOTHING",
            )
            .bind(file_id)
            .bind(team)
            .bind(to_i64(lines))
            .bind(bound.map(to_i64))
            .bind(Utc::now().timestamp_millis())
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// A batch input file's team and bound (`None` inside: not bounded).
    pub async fn batch_file(
        &self,
        file_id: &str,
    ) -> Result<Option<(String, Option<u64>)>, StoreError> {
        on_db!(self, pool, _writer, _d => {
            let row = sqlx::query("SELECT team, bound_nano_usd FROM batch_files WHERE file_id = $1")
                .bind(file_id)
                .fetch_optional(pool)
                .await?;
            match row {
                None => Ok(None),
                Some(r) => {
                    let bound: Option<i64> = r.try_get("bound_nano_usd")?;
                    Ok(Some((r.try_get("team")?, bound.map(to_u64))))
                }
            }
        })
    }

    pub async fn insert_batch(&self, b: &BatchRow) -> Result<(), StoreError> {
        on_db!(self, pool, _writer, _d => {
            sqlx::query(&format!(
                "INSERT INTO batches ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL) \
                 ON CONFLICT (batch_id) DO NOTHING"
            ))
            .bind(&b.batch_id)
            .bind(&b.format)
            .bind(&b.team)
            .bind(&b.key_id)
            .bind(&b.upstream)
            .bind(&b.endpoint)
            .bind(b.created_at.timestamp_millis())
            .bind(to_i64(b.reserved_nano_usd))
            .bind(&b.output_file_id)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    pub async fn batch(&self, batch_id: &str) -> Result<Option<BatchRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM batches WHERE batch_id = $1");
        row_by_key!(self, &sql, batch_id, read)
    }

    /// The unbilled batch whose output file this is.
    pub async fn batch_of_output(&self, file_id: &str) -> Result<Option<BatchRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM batches WHERE output_file_id = $1 AND billed_ms IS NULL"
        );
        row_by_key!(self, &sql, file_id, read)
    }

    pub async fn set_batch_output(&self, batch_id: &str, file_id: &str) -> Result<(), StoreError> {
        on_db!(self, pool, _writer, _d => {
            sqlx::query("UPDATE batches SET output_file_id = $2 WHERE batch_id = $1")
                .bind(batch_id)
                .bind(file_id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Takes a batch's billing to this caller only (`None`: unknown, or
    /// billed or being billed already).
    pub async fn claim_batch(&self, batch_id: &str) -> Result<Option<BatchRow>, StoreError> {
        on_db!(self, pool, _writer, _d => {
            let row = sqlx::query(&format!(
                "UPDATE batches SET billed_ms = $2 WHERE batch_id = $1 AND billed_ms IS NULL \
                 RETURNING {COLUMNS}"
            ))
            .bind(batch_id)
            .bind(Utc::now().timestamp_millis())
            .fetch_optional(pool)
            .await?;
            Ok(row.as_ref().map(read).transpose()?)
        })
    }

    /// Gives a claimed batch back (its results could not be read).
    pub async fn unclaim_batch(&self, batch_id: &str) -> Result<(), StoreError> {
        on_db!(self, pool, _writer, _d => {
            sqlx::query("UPDATE batches SET billed_ms = NULL WHERE batch_id = $1")
                .bind(batch_id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Batches not billed yet, created before `before`, oldest first.
    pub async fn open_batches(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<BatchRow>, StoreError> {
        on_db!(self, pool, _writer, _d => {
            let rows = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM batches WHERE billed_ms IS NULL AND created_ms < $1 \
                 ORDER BY created_ms LIMIT $2"
            ))
            .bind(before.timestamp_millis())
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?;
            Ok(rows.iter().map(read).collect::<Result<Vec<_>, _>>()?)
        })
    }
}
