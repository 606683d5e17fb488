//! Storage: the one interface the rest of tollgate sees (`Store`), its SQLite
//! implementation, and the background batch writer.
//!
//! The request path never awaits the database: it hands a `UsageRecord` to
//! the writer's bounded queue and moves on.

mod sqlite;
pub mod writer;

use chrono::{DateTime, Utc};

pub use writer::{UsageSink, UsageWriter};

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
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database url `{0}`: unsupported scheme (sqlite:// only)")]
    Unsupported(String),
}

/// The database behind tollgate. Postgres joins as a second variant.
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(sqlite::SqliteStore),
}

impl Store {
    /// Connects (creating a SQLite file if needed) and applies migrations.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        let store = if url.starts_with("sqlite:") {
            Store::Sqlite(sqlite::SqliteStore::connect(url).await?)
        } else {
            return Err(StoreError::Unsupported(url.to_string()));
        };
        store.migrate().await?;
        Ok(store)
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.migrate().await,
        }
    }

    pub async fn insert_usage(&self, rows: &[UsageRecord]) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.insert_usage(rows).await,
        }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.ping().await,
        }
    }

    pub async fn close(&self) {
        match self {
            Store::Sqlite(s) => s.close().await,
        }
    }
}
