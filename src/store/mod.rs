//! Storage: the one interface the rest of tollgate sees (`Store`), its SQLite
//! implementation, and the background batch writer.
//!
//! The request path never awaits the database: it hands a `UsageRecord` to
//! the writer's bounded queue and moves on.

mod alerts;
mod batches;
mod budgets;
mod dialect;
mod pending;
mod postgres;
mod queries;
pub mod retention;
mod rollup;
mod rows;
pub mod spool;
mod sqlite;
pub mod writer;

use chrono::{DateTime, Utc};
use std::borrow::Borrow;

use crate::period::Budget;

pub use alerts::AlertRow;
pub use batches::BatchRow;
pub(crate) use budgets::account_filter;
pub use pending::{PendingCount, PendingRow};
pub use postgres::PostgresStore;
pub use retention::Expired;
pub use writer::{RecordedSpend, UsageSink, UsageWriter, WriterConfig};

/// The `after_release` hook of every pool: a connection handed back while
/// sqlx still counts a transaction open on it is closed, never reused.
///
/// sqlx lowers its count only when a ROLLBACK or COMMIT succeeds. After a
/// failed COMMIT (a full disk) SQLite has already rolled the transaction
/// back, so the ROLLBACK on drop fails and the count stays up. The next
/// `begin()` on that connection then issues a SAVEPOINT instead of BEGIN,
/// and a second failure there leaves SQLite inside a transaction of its own:
/// every later batch "commits" into it, reported written, seen by no other
/// connection and lost on restart (the full-disk test in tests/faults.rs).
/// A rollback still queued when the connection comes back counts too: a
/// needless reconnect costs a cold page cache, a reused one costs rows.
pub(crate) fn close_if_in_transaction<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    _: sqlx::pool::PoolConnectionMetadata,
) -> futures_util::future::BoxFuture<'_, Result<bool, sqlx::Error>> {
    use sqlx::TransactionManager;
    let settled = DB::TransactionManager::get_transaction_depth(conn) == 0;
    if !settled {
        tracing::warn!("a database connection came back inside a transaction: closed");
    }
    Box::pin(std::future::ready(Ok(settled)))
}

/// One row of the `usage` table (SPEC section 6).
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    pub created_at: DateTime<Utc>,
    pub request_id: String,
    pub team: String,
    pub key_id: Option<String>,
    pub model: String,
    pub base_model: String,
    pub upstream: String,
    pub endpoint: &'static str,
    pub stream: bool,
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub cost_nano_usd: u64,
    pub token_source: &'static str,
    pub latency_ms: u64,
    pub end_user: Option<String>,
    /// The tier the response says it was served at (NULL: standard).
    pub service_tier: Option<&'static str>,
    pub reasoning_tokens: u64,
    pub audio_prompt_tokens: u64,
    pub audio_completion_tokens: u64,
    /// Prompt tokens written to the provider's cache (5-minute and 1-hour).
    pub cache_write_tokens: u64,
    /// Image tokens, prompt and completion.
    pub image_tokens: u64,
    /// Built-in tool calls billed per call.
    pub tool_calls: u64,
    pub provider: &'static str,
    /// Upstreams tried (1 without a fallback).
    pub attempts: u16,
    /// Choices asked for (`n`; 1 when not given).
    pub choices: u16,
    /// The answer stopped at its output cap.
    pub capped: bool,
    /// Nano-USD per component (the `cost_breakdown` JSON column).
    pub cost_breakdown: crate::pricing::Breakdown,
    /// Every billed meter apart (the `meters` JSON column), so the row can
    /// be priced again exactly: 5-minute and 1-hour cache writes, image
    /// input and output, tool calls by kind.
    pub meters: crate::usage::meter::Meters,
    /// The request's tags as a JSON array of the sorted, distinct tags
    /// (`x-tollgate-tags`); the `tags` column.
    pub tags: Option<String>,
    /// The shared budgets (account, `budget::period_key`) whose leases paid
    /// for this request; not a column. Set only on Postgres with budgets.
    pub budget_leases: Vec<(String, String)>,
    /// The replica whose lease paid for it, when not this one (a row of an
    /// earlier process, replayed from the spool); not a column.
    pub lease_node: Option<String>,
    /// The batch whose result line this row is (`request_id` is then the
    /// line's `custom_id`).
    pub batch_id: Option<String>,
    /// The model the response says served it, when that is not `model`
    /// and OpenTelemetry is on (`gen_ai.response.model`); not a column.
    pub served_model: Option<String>,
    /// The client's W3C `traceparent`, kept only when OpenTelemetry is on,
    /// so the request's span joins the client's trace; not a column.
    pub trace_parent: Option<String>,
}

impl UsageRecord {
    /// A plain row: `team` asked `model` (an OpenAI chat completion through
    /// upstream `mock`, answered 200) at `at`, nothing counted yet. Tests,
    /// benches and imports set what they need on top of it.
    pub fn plain(
        request_id: impl Into<String>,
        team: &str,
        model: &str,
        at: DateTime<Utc>,
    ) -> UsageRecord {
        UsageRecord {
            created_at: at,
            request_id: request_id.into(),
            team: team.into(),
            key_id: None,
            model: model.into(),
            base_model: model.into(),
            upstream: "mock".into(),
            endpoint: "chat.completions",
            stream: false,
            status: 200,
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
            cost_nano_usd: 0,
            token_source: "upstream",
            latency_ms: 0,
            end_user: None,
            service_tier: None,
            reasoning_tokens: 0,
            audio_prompt_tokens: 0,
            audio_completion_tokens: 0,
            cache_write_tokens: 0,
            image_tokens: 0,
            tool_calls: 0,
            provider: "openai",
            attempts: 1,
            choices: 1,
            capped: false,
            cost_breakdown: crate::pricing::Breakdown::default(),
            meters: crate::usage::meter::Meters::default(),
            tags: None,
            budget_leases: Vec::new(),
            lease_node: None,
            batch_id: None,
            served_model: None,
            trace_parent: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database {url}: {reason}")]
    Open { url: String, reason: String },
    #[error("database file {path} was moved or deleted while tollgate ran; rows are kept (spool) until tollgate restarts on a database it can write")]
    FileGone { path: String },
    #[error("database {url} does not exist; run `tollgate serve` or `tollgate migrate` there first, pass --config, or set TOLLGATE_DATABASE_URL")]
    Missing { url: String },
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database url `{0}`: unsupported (sqlite:// or postgres://)")]
    Unsupported(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Conflict(String),
}

/// A team as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TeamRow {
    pub name: String,
    pub budget: Option<Budget>,
    pub max_output_tokens: Option<u64>,
    pub created_at: String,
}

/// A key as stored: never the secret, only its hash and first characters.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRow {
    pub id: String,
    pub team: String,
    pub name: Option<String>,
    pub hash: String,
    pub prefix: String,
    pub models: Vec<String>,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

/// Grouping for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportBy {
    Team,
    Model,
    Key,
    Day,
    /// The cost breakdown's components (input, output, cached_input, ...).
    Component,
    /// The provider that answered (`openai`, `deepseek`, ...).
    Provider,
    /// The service tier served (`standard`, `flex`, `priority`, ...).
    Tier,
    /// The end user within a team, as `TEAM:USER` (`-`: none). Read from
    /// the rows (the rollups do not keep end users).
    #[value(name = "end_user")]
    #[serde(rename = "end_user")]
    EndUser,
    /// Each tag of `x-tollgate-tags` (`-`: none); a request with two tags
    /// counts in both. Read from the rows.
    Tag,
}

/// One line of a usage report; money as exact nano-USD.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReportRow {
    pub group: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub cost_nano_usd: i64,
    /// Nano-USD per breakdown component, in `pricing::Line::ALL` order.
    pub components: [i64; crate::pricing::Line::COUNT],
}

/// A usage row's counts, as `report --shadow` and `numbers` read them.
#[derive(Debug, Clone, PartialEq)]
pub struct CountsRow {
    pub team: String,
    pub model: String,
    /// The catalog row that priced it (`usage.base_model`).
    pub base_model: String,
    pub endpoint: String,
    pub stream: bool,
    pub status: u16,
    pub service_tier: Option<String>,
    pub usage: crate::usage::Usage,
    pub cost_nano_usd: u64,
    /// Nano-USD per breakdown line, in `pricing::Line::ALL` order.
    pub breakdown: [u64; crate::pricing::Line::COUNT],
    pub choices: u16,
    pub capped: bool,
    /// When the request arrived, in Unix milliseconds, and how long it took.
    pub started_ms: i64,
    pub latency_ms: u64,
}

/// Words, characters and tokens summed over sampled requests of one team,
/// model family, writing system and side (`word_counts`; see `words`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WordCount {
    pub team: String,
    pub family: String,
    pub script: String,
    pub side: String,
    pub samples: u64,
    pub words: u64,
    pub chars: u64,
    pub tokens: u64,
}

impl WordCount {
    pub(crate) fn from_row<R>(r: &R) -> Result<WordCount, sqlx::Error>
    where
        R: sqlx::Row,
        for<'c> &'c str: sqlx::ColumnIndex<R>,
        for<'q> String: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
        for<'q> i64: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    {
        let n = |c: &str| {
            r.try_get::<i64, _>(c)
                .map(|v| u64::try_from(v).unwrap_or(0))
        };
        Ok(WordCount {
            team: r.try_get("team")?,
            family: r.try_get("family")?,
            script: r.try_get("script")?,
            side: r.try_get("side")?,
            samples: n("samples")?,
            words: n("words")?,
            chars: n("chars")?,
            tokens: n("tokens")?,
        })
    }
}

/// The columns `CountsRow` is read from; `json_text` is the store's
/// spelling of a JSON column as text, `started_ms` of `created_at` in
/// Unix milliseconds.
pub(crate) fn counts_columns(json_text: impl Fn(&str) -> String, started_ms: &str) -> String {
    format!(
        "team, model, base_model, endpoint, stream, status, service_tier, prompt_tokens, \
         completion_tokens, cached_tokens, cache_write_tokens, audio_prompt_tokens, \
         audio_completion_tokens, image_tokens, reasoning_tokens, tool_calls, cost_nano_usd, \
         choices, capped, latency_ms, {} AS breakdown, {} AS meters, {started_ms} AS started_ms",
        json_text("cost_breakdown"),
        json_text("meters"),
    )
}

impl CountsRow {
    /// From a row of `counts_columns`. What the row merges is priced at its
    /// first kind: cache writes as 5-minute writes, image tokens as prompt
    /// images, built-in tool calls as web searches; a row with its `meters`
    /// is read from them instead, every meter apart.
    pub(crate) fn from_row<R>(r: &R) -> Result<CountsRow, sqlx::Error>
    where
        R: sqlx::Row,
        for<'c> &'c str: sqlx::ColumnIndex<R>,
        for<'q> String: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
        for<'q> Option<String>: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
        for<'q> i64: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
        for<'q> i32: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
        for<'q> bool: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    {
        let n = |c: &str| {
            r.try_get::<i64, _>(c)
                .map(|v| u64::try_from(v).unwrap_or(0))
        };
        let usage = crate::usage::Usage {
            prompt_tokens: n("prompt_tokens")?,
            completion_tokens: n("completion_tokens")?,
            cached_tokens: Some(n("cached_tokens")?),
            cache_write_tokens: Some(n("cache_write_tokens")?),
            audio_prompt_tokens: Some(n("audio_prompt_tokens")?),
            audio_completion_tokens: Some(n("audio_completion_tokens")?),
            image_prompt_tokens: Some(n("image_tokens")?),
            reasoning_tokens: Some(n("reasoning_tokens")?),
            tool_calls: crate::usage::ToolCalls {
                web_search: u32::try_from(n("tool_calls")?).unwrap_or(u32::MAX),
                file_search: 0,
            },
            ..crate::usage::Usage::NONE
        };
        // A row that kept its meters is priced again from them exactly.
        let meters: String = r.try_get("meters")?;
        let usage = match crate::usage::meter::Meters::parse(&meters).filter(|m| !m.is_empty()) {
            Some(m) => crate::usage::Usage {
                reasoning_tokens: usage.reasoning_tokens,
                ..m.to_usage()
            },
            None => usage,
        };
        let text: String = r.try_get("breakdown")?;
        let breakdown = crate::pricing::Breakdown::parse(&text)
            .unwrap_or_default()
            .0;
        Ok(CountsRow {
            team: r.try_get("team")?,
            model: r.try_get("model")?,
            base_model: r.try_get("base_model")?,
            endpoint: r.try_get("endpoint")?,
            stream: r.try_get("stream")?,
            status: u16::try_from(r.try_get::<i32, _>("status")?).unwrap_or(0),
            service_tier: r.try_get("service_tier")?,
            usage: usage.clamped(),
            cost_nano_usd: n("cost_nano_usd")?,
            breakdown,
            choices: u16::try_from(r.try_get::<i32, _>("choices")?).unwrap_or(1),
            capped: r.try_get("capped")?,
            started_ms: r.try_get("started_ms")?,
            latency_ms: n("latency_ms")?,
        })
    }
}

/// Counts and money as stored: the databases' integers are signed.
pub fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Back from a stored integer; a negative value (never written) reads as 0.
pub fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A database URL as shown in messages: a Postgres password is masked.
pub fn describe_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((userinfo, host)) = rest.split_once('@') {
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') { ":***" } else { "" };
            return format!("{scheme}://{user}{masked}@{host}");
        }
    }
    url.to_string()
}

fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    std::env::current_dir()
        .map(|d| d.join(path))
        .unwrap_or_else(|_| path.to_path_buf())
}

pub fn now_text() -> String {
    time_text(Utc::now())
}

/// `2026-11-24T20:14:01.123Z`: UTC, milliseconds, so text order is time
/// order. Written by hand because the writer formats one per usage row.
pub fn time_text(t: DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    fn push(out: &mut String, n: u32, width: u32) {
        for i in (0..width).rev() {
            let digit = (n / 10u32.pow(i)) % 10;
            out.push(char::from(b'0' + digit as u8));
        }
    }
    let mut out = String::with_capacity(24);
    let year = t.year();
    if !(0..=9999).contains(&year) {
        return t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
    }
    push(&mut out, year.unsigned_abs(), 4);
    out.push('-');
    push(&mut out, t.month(), 2);
    out.push('-');
    push(&mut out, t.day(), 2);
    out.push('T');
    push(&mut out, t.hour(), 2);
    out.push(':');
    push(&mut out, t.minute(), 2);
    out.push(':');
    push(&mut out, t.second(), 2);
    out.push('.');
    // A leap second shows as 60.xxx in chrono's formatting; keep it in .999.
    push(&mut out, (t.timestamp_subsec_millis()).min(999), 3);
    out.push('Z');
    out
}

/// The database behind tollgate: SQLite for one node, Postgres for several
/// replicas sharing one database (and its budgets).
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PostgresStore),
}

/// Calls the same method on whichever store this is.
macro_rules! either {
    ($self:expr, $s:ident => $call:expr) => {
        match $self {
            Store::Sqlite($s) => $call,
            Store::Postgres($s) => $call,
        }
    };
}

impl Store {
    /// The Postgres store, whose budgets are shared between replicas.
    pub fn shared(&self) -> Option<&PostgresStore> {
        match self {
            Store::Postgres(p) => Some(p),
            Store::Sqlite(_) => None,
        }
    }

    /// Connects (creating a SQLite file if needed) and applies migrations.
    /// Errors name the database (a Postgres password is never shown).
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        Store::connect(url, true).await
    }

    /// Like `open`, but a SQLite file that does not exist is an error, not a
    /// new empty database: management commands run in the wrong directory
    /// must not leave stray databases behind.
    pub async fn open_existing(url: &str) -> Result<Store, StoreError> {
        Store::connect(url, false).await
    }

    async fn connect(url: &str, create: bool) -> Result<Store, StoreError> {
        let named = |e: StoreError| match e {
            StoreError::Db(e) => StoreError::Open {
                url: describe_url(url),
                reason: e.to_string(),
            },
            StoreError::Migrate(e) => StoreError::Open {
                url: describe_url(url),
                reason: format!("migrations: {e}"),
            },
            other => other,
        };
        let store = if url.starts_with("sqlite:") {
            if !create {
                if let Some(path) = crate::config::sqlite_path(url) {
                    if path.to_str() != Some(":memory:") && !path.exists() {
                        return Err(StoreError::Missing {
                            url: format!("{url} ({})", absolute(&path).display()),
                        });
                    }
                }
            }
            Store::Sqlite(sqlite::SqliteStore::connect(url).await.map_err(named)?)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Store::Postgres(postgres::PostgresStore::connect(url).await.map_err(named)?)
        } else {
            return Err(StoreError::Unsupported(url.to_string()));
        };
        store.migrate().await.map_err(named)?;
        Ok(store)
    }

    /// Whether the database is there to be written: the SQLite file must
    /// still be the one opened (not moved, deleted or replaced).
    pub fn check_file(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.check_file(),
            Store::Postgres(_) => Ok(()),
        }
    }

    /// This replica's name in the shared budget tables (Postgres).
    pub fn node(&self) -> Option<&str> {
        self.shared().map(PostgresStore::node)
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        either!(self, s => s.migrate().await)
    }

    /// Inserts rows; a row whose `request_id` is already stored is skipped
    /// (a spool replay is idempotent). Returns the request ids skipped, where
    /// the database tells them (Postgres); shared budgets count only rows
    /// actually inserted.
    /// `rows` may be records or boxes of them (the writer's rows are boxed:
    /// a pointer moves through its queues instead of a ~450-byte record).
    pub async fn insert_usage<R: Borrow<UsageRecord> + Sync>(
        &self,
        rows: &[R],
    ) -> Result<Vec<String>, StoreError> {
        self.check_file()?;
        either!(self, s => s.insert_usage(rows).await)
    }

    pub async fn close(&self) {
        either!(self, s => s.close().await)
    }
}

#[cfg(test)]
mod tests {
    use super::{describe_url, time_text};
    use chrono::{TimeZone, Utc};

    #[test]
    fn database_urls_are_shown_without_passwords() {
        assert_eq!(
            describe_url("postgres://app:s3cret@db.internal:5432/tollgate"),
            "postgres://app:***@db.internal:5432/tollgate"
        );
        assert_eq!(
            describe_url("postgres://app@db/tollgate"),
            "postgres://app@db/tollgate"
        );
        assert_eq!(describe_url("sqlite://tollgate.db"), "sqlite://tollgate.db");
    }

    #[test]
    fn time_text_matches_chrono_formatting() {
        for (secs, nanos) in [
            (0, 0),
            (1_764_015_241, 123_456_789),
            (1_764_015_241, 999_999_999),
            (951_782_400, 5_000_000),
            (253_402_300_799, 0),
        ] {
            let t = Utc
                .timestamp_opt(secs, nanos)
                .single()
                .unwrap_or_else(|| panic!("bad test time {secs}"));
            assert_eq!(time_text(t), t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string());
        }
    }
}
