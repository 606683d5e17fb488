//! What differs between the two databases, in one place. Every query is
//! written once (`queries`), with `$n` placeholders (sqlx's SQLite driver
//! reads `$n` as the n-th argument too) and `CAST(... AS BIGINT)` where
//! Postgres' sums would be `numeric`; these are the parts that cannot be
//! spelled the same:
//!
//! - a time: SQLite keeps RFC 3339 text (`store::time_text`, sortable as
//!   text), Postgres a `timestamptz`, so each binds and reads its own type;
//! - JSON: SQLite's `json_extract`/`json_each`, Postgres' `->>`/`jsonb_each_text`;
//! - a day's name and a time in Unix milliseconds.
//!
//! The usage insert (a statement per batch size on SQLite, one UNNEST on
//! Postgres, which also moves shared-budget spend) is each store's own.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{now_text, time_text};

/// SQLite's spellings.
pub struct Sqlite;

/// Postgres' spellings.
pub struct Postgres;

impl Sqlite {
    /// A time as a value for a `created_at >= $n` bound; "since the
    /// beginning" (the epoch or before) is the empty string, below every time.
    pub fn since(&self, t: DateTime<Utc>) -> String {
        if t.timestamp() <= 0 {
            String::new()
        } else {
            time_text(t)
        }
    }

    pub fn now(&self) -> String {
        now_text()
    }

    /// A placeholder holding a time as `store::time_text` spells it.
    pub fn time_param(&self, n: u8) -> String {
        format!("${n}")
    }

    pub fn read_time(
        &self,
        r: &sqlx::sqlite::SqliteRow,
        column: &str,
    ) -> Result<String, sqlx::Error> {
        r.try_get(column)
    }

    pub fn read_opt_time(
        &self,
        r: &sqlx::sqlite::SqliteRow,
        column: &str,
    ) -> Result<Option<String>, sqlx::Error> {
        r.try_get(column)
    }

    /// The integer at `key` of a JSON object column.
    pub fn json_int(&self, column: &str, key: &str) -> String {
        format!("json_extract({column}, '$.{key}')")
    }

    /// A JSON column as text.
    pub fn json_text(&self, column: &str) -> String {
        column.to_string()
    }

    /// A JSON object column's entries as rows `j` (`j.key`), and the SQL
    /// of an entry's integer value.
    pub fn json_entries(&self, column: &str) -> (String, &'static str) {
        (format!("json_each({column}) AS j"), "j.value")
    }

    /// `created_at`'s day, `YYYY-MM-DD` in UTC.
    pub fn day(&self) -> &'static str {
        "substr(created_at, 1, 10)"
    }

    /// Each of a row's tags as `tg.value` (one row with NULL without tags).
    pub fn tag_entries(&self) -> &'static str {
        "LEFT JOIN json_each(usage.tags) AS tg"
    }
}

impl Postgres {
    /// A time as a value for a `created_at >= $n` bound. Postgres
    /// timestamps stop at 4713 BC: "since the beginning" is the epoch.
    pub fn since(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        t.max(DateTime::UNIX_EPOCH)
    }

    pub fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    /// A placeholder holding a time as `store::time_text` spells it.
    pub fn time_param(&self, n: u8) -> String {
        format!("${n}::text::timestamptz")
    }

    pub fn read_time(
        &self,
        r: &sqlx::postgres::PgRow,
        column: &str,
    ) -> Result<String, sqlx::Error> {
        r.try_get::<DateTime<Utc>, _>(column).map(time_text)
    }

    pub fn read_opt_time(
        &self,
        r: &sqlx::postgres::PgRow,
        column: &str,
    ) -> Result<Option<String>, sqlx::Error> {
        r.try_get::<Option<DateTime<Utc>>, _>(column)
            .map(|t| t.map(time_text))
    }

    pub fn json_int(&self, column: &str, key: &str) -> String {
        format!("({column}->>'{key}')::BIGINT")
    }

    pub fn json_text(&self, column: &str) -> String {
        format!("{column}::text")
    }

    pub fn json_entries(&self, column: &str) -> (String, &'static str) {
        (format!("jsonb_each_text({column}) AS j"), "j.value::BIGINT")
    }

    pub fn day(&self) -> &'static str {
        "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
    }

    pub fn tag_entries(&self) -> &'static str {
        "LEFT JOIN LATERAL jsonb_array_elements_text(usage.tags::jsonb) AS tg(value) ON true"
    }
}
