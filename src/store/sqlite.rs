//! SQLite through sqlx: WAL, migrations from `migrations/sqlite`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

use super::rows::{Batch, Names, Value, COLUMNS};
use super::{StoreError, UsageRecord};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Rows per INSERT, largest first. A batch goes out as statements of these
/// sizes (50 rows: 32 + 16 + 2), so any batch takes at most one statement per
/// size plus the full 256-row ones (a full 512-row batch: two). Each size has
/// one fixed SQL text, which sqlx prepares once and reuses. Every statement is a round trip to sqlx's
/// SQLite worker thread (two thread wake-ups), which is why rows are not
/// inserted one by one.
const STATEMENT_ROWS: [usize; 9] = [256, 128, 64, 32, 16, 8, 4, 2, 1];

/// The INSERT text for each of `STATEMENT_ROWS`, built once.
///
/// `OR IGNORE`: a row whose request id is stored already is skipped, so a
/// batch replayed from the spool lands exactly once. Like `OR ROLLBACK`
/// before it, it needs no statement journal: a plain INSERT of several rows
/// inside a transaction must be undoable on its own, so SQLite keeps the old
/// content of every page the statement touches, spilled to a temp file past
/// 64 KiB (0.44 pwrite calls per row, more than the WAL itself;
/// bench/PROFILE.md, session 4).
static INSERT_SQL: std::sync::LazyLock<[Vec<String>; 2]> =
    std::sync::LazyLock::new(|| [insert_sql(true), insert_sql(false)]);

/// The INSERT texts of every statement size, with the detail columns
/// (`rows::COLUMNS` marked `true`) or without them.
fn insert_sql(details: bool) -> Vec<String> {
    let names: Vec<&str> = COLUMNS
        .iter()
        .filter(|(_, _, detail)| details || !detail)
        .map(|(name, _, _)| *name)
        .collect();
    let head = format!(
        "INSERT OR IGNORE INTO usage_rows ({}) VALUES ",
        names.join(", ")
    );
    let row = format!("({})", vec!["?"; names.len()].join(", "));
    STATEMENT_ROWS
        .iter()
        .map(|&n| {
            let values = vec![row.as_str(); n].join(", ");
            format!("{head}{values} RETURNING id")
        })
        .collect()
}

/// `rows` cut into chunks of `STATEMENT_ROWS` sizes, each with its SQL text
/// (with or without the detail columns).
fn statements<T>(mut rows: &[T], details: bool) -> impl Iterator<Item = (&'static str, &[T])> {
    let texts = &INSERT_SQL[usize::from(!details)];
    std::iter::from_fn(move || {
        let i = STATEMENT_ROWS.iter().position(|&n| n <= rows.len())?;
        let (chunk, rest) = rows.split_at(STATEMENT_ROWS[i]);
        rows = rest;
        Some((texts[i].as_str(), chunk))
    })
}

#[derive(Clone, Debug)]
pub struct SqliteStore {
    /// Reads, admin writes, refreshes, /readyz.
    pool: SqlitePool,
    /// The usage writer's own connection. In WAL mode a connection drops its
    /// whole page cache when another connection has committed since its last
    /// transaction; sharing one pool, each batch found a cold cache and read
    /// the b-tree pages it appends to back from the WAL.
    writer: SqlitePool,
    /// The database file and its identity (device, inode) when opened. A
    /// file deleted or moved under a running server keeps taking writes
    /// through the open handles, into a file nobody will ever read.
    file: Option<(std::path::PathBuf, (u64, u64))>,
    /// Name ids the writer has seen (`rows::Names`).
    names: std::sync::Arc<Names>,
}

fn file_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl SqliteStore {
    pub async fn connect(url: &str) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            // 1 MiB page cache per connection: the writer appends, nothing scans.
            .pragma("cache_size", "-1024");
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .after_release(super::close_if_in_transaction::<sqlx::Sqlite>)
            .connect_with(options.clone())
            .await?;
        // Opened on the first batch (CLI commands never need it), then kept.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .after_release(super::close_if_in_transaction::<sqlx::Sqlite>)
            .connect_lazy_with(options);
        let file = crate::config::sqlite_path(url)
            .filter(|p| p.to_str() != Some(":memory:"))
            .and_then(|p| file_identity(&p).map(|id| (p, id)));
        Ok(SqliteStore {
            pool,
            writer,
            file,
            names: Default::default(),
        })
    }

    /// Err when the database file is no longer the one opened.
    pub fn check_file(&self) -> Result<(), StoreError> {
        match &self.file {
            Some((path, id)) if file_identity(path) != Some(*id) => Err(StoreError::FileGone {
                path: path.display().to_string(),
            }),
            _ => Ok(()),
        }
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Reads, admin writes, refreshes, /readyz.
    pub(super) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The usage writer's own connection (also word counts, the start probe).
    pub(super) fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    pub async fn insert_usage<R: std::borrow::Borrow<UsageRecord> + Sync>(
        &self,
        rows: &[R],
    ) -> Result<Vec<String>, StoreError> {
        let mut conn = self.writer.acquire().await?;
        let written = insert_batch(&mut conn, rows, &self.names).await;
        if written.is_err() {
            // A failed statement (disk full, I/O error) may have ended the
            // transaction inside SQLite behind sqlx's back. Rather than
            // trust its bookkeeping after that, the next batch gets a new
            // connection.
            conn.close().await.ok();
        }
        // SQLite budgets are not shared: which rows were skipped does not matter.
        written.map(|()| Vec::new())
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }
}

/// The ids of `names`, added to the `names` table where new (committed on
/// their own: an id never used is harmless, a batch's rollback keeps them).
async fn resolve(
    conn: &mut sqlx::SqliteConnection,
    names: Vec<String>,
) -> Result<std::collections::HashMap<String, i64>, sqlx::Error> {
    let mut ids = std::collections::HashMap::new();
    for chunk in names.chunks(500) {
        // One text per size, never cached: the inserts' prepared
        // statements stay in sqlx's cache.
        let marks = vec!["(?)"; chunk.len()].join(", ");
        let sql = format!("INSERT OR IGNORE INTO names (name) VALUES {marks}");
        let mut insert = sqlx::query(&sql).persistent(false);
        for n in chunk {
            insert = insert.bind(n);
        }
        insert.execute(&mut *conn).await?;
        let marks = vec!["?"; chunk.len()].join(", ");
        let sql = format!("SELECT id, name FROM names WHERE name IN ({marks})");
        let mut select = sqlx::query_as::<_, (i64, String)>(&sql).persistent(false);
        for n in chunk {
            select = select.bind(n);
        }
        for (id, name) in select.fetch_all(&mut *conn).await? {
            ids.insert(name, id);
        }
    }
    Ok(ids)
}

/// One batch in one transaction: all rows or none, and the rollups of the
/// rows inserted (`RETURNING` tells them: a row stored already is skipped).
async fn insert_batch<R: std::borrow::Borrow<UsageRecord> + Sync>(
    conn: &mut sqlx::SqliteConnection,
    rows: &[R],
    names: &Names,
) -> Result<(), StoreError> {
    use sqlx::{Arguments, Connection};
    let rows: Vec<&UsageRecord> = rows.iter().map(|r| r.borrow()).collect();
    let (mut batch, missing) = Batch::new(rows, names);
    if !missing.is_empty() {
        batch.add(resolve(conn, missing).await?, names);
    }
    let more = batch.overflowing();
    if !more.is_empty() {
        batch.add(resolve(conn, more).await?, names);
    }
    let rows = batch.compact();
    let mut tx = conn.begin().await?;
    // Most batches carry no detail at all (no tier, audio, reasoning...):
    // they go out without those columns; a batch with any, with all.
    let details = rows.iter().any(|(_, c)| !c.plain);
    let mut inserted: Vec<&UsageRecord> = Vec::with_capacity(rows.len());
    for (sql, chunk) in statements(&rows, details) {
        // Arguments added in place: `Query::bind` moves the whole query
        // per value.
        let mut args = sqlx::sqlite::SqliteArguments::default();
        for (_, c) in chunk {
            for (v, (_, _, detail)) in c.values.iter().zip(COLUMNS.iter()) {
                if !details && *detail {
                    continue;
                }
                let added = match v {
                    Value::Int(n) => args.add(*n),
                    Value::Json(j) => args.add(j.clone()),
                };
                added.map_err(sqlx::Error::Encode)?;
            }
        }
        let new: Vec<i64> = sqlx::query_scalar_with(sql, args)
            .fetch_all(&mut *tx)
            .await?;
        match new.len() == chunk.len() {
            true => inserted.extend(chunk.iter().map(|(r, _)| *r)),
            false => {
                let new: std::collections::HashSet<i64> = new.into_iter().collect();
                inserted.extend(
                    chunk
                        .iter()
                        .filter(|(_, c)| new.contains(&c.id))
                        .map(|(r, _)| *r),
                );
            }
        }
    }
    super::rollup::Rollup::of(inserted)
        .upsert_sqlite(&mut tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn sizes(n: usize) -> Vec<usize> {
        let rows: Vec<usize> = (0..n).collect();
        let chunks: Vec<_> = statements(&rows, true).collect();
        // Every row once, in order, each chunk with the SQL of its size.
        let flat: Vec<usize> = chunks.iter().flat_map(|(_, c)| c.iter().copied()).collect();
        assert_eq!(flat, rows);
        for (sql, chunk) in &chunks {
            assert_eq!(sql.matches('(').count() - 1, chunk.len(), "{sql}");
        }
        chunks.iter().map(|(_, c)| c.len()).collect()
    }

    fn row(request_id: &str) -> UsageRecord {
        UsageRecord {
            prompt_tokens: 1,
            completion_tokens: 2,
            cost_nano_usd: 3,
            latency_ms: 4,
            ..UsageRecord::plain(request_id, "t", "gpt-4o", Utc::now())
        }
    }

    /// A migrated store in a fresh directory (`t.db`).
    async fn migrated_store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        store.migrate().await.unwrap_or_else(|e| panic!("{e}"));
        (dir, store)
    }

    /// A batch replayed after it (or part of it) was written lands exactly
    /// once; the rest of it still goes in.
    #[tokio::test]
    async fn a_replayed_batch_is_written_exactly_once() {
        let (dir, store) = migrated_store().await;
        let count = || async {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM usage")
                .fetch_one(&store.pool)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let first: Vec<_> = (0..300).map(|i| row(&format!("req_a{i}"))).collect();
        store
            .insert_usage(&first)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // 299 new rows and one already stored, in the last statement.
        let mut again: Vec<_> = (0..299).map(|i| row(&format!("req_b{i}"))).collect();
        again.push(row("req_a7"));
        store
            .insert_usage(&again)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(count().await, 599);
        // The whole of it again: nothing changes.
        store
            .insert_usage(&again)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        store
            .insert_usage(&first)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(count().await, 599);
        store.check_file().unwrap_or_else(|e| panic!("{e}"));
        std::fs::remove_file(dir.path().join("t.db")).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            store.check_file(),
            Err(StoreError::FileGone { .. })
        ));
    }

    /// Two failed commits in a row on the writer's one connection (the word
    /// counts' flush on a full disk) used to leave it inside a transaction
    /// sqlx no longer counted: the next usage batch then "committed" into
    /// it, reported written on a full disk, seen by no other connection,
    /// lost on restart (`super::close_if_in_transaction`).
    #[tokio::test]
    async fn failed_commits_on_a_full_disk_leave_no_transaction_behind() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let vol = dir.path().join("vol");
        std::fs::create_dir_all(&vol).unwrap_or_else(|e| panic!("{e}"));
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&vol)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("SKIPPED: mounting a tmpfs is not allowed here");
            return;
        }
        let url = format!("sqlite://{}", vol.join("t.db").display());
        let sqlite = SqliteStore::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        sqlite.migrate().await.unwrap_or_else(|e| panic!("{e}"));
        let store = super::super::Store::Sqlite(sqlite);
        let ok = |r: Result<Vec<String>, StoreError>| r.unwrap_or_else(|e| panic!("{e}"));
        ok(store.insert_usage(&[row("req_before")]).await);
        let filler = vol.join("filler");
        let _ = std::fs::write(&filler, vec![0u8; 4 << 20]);
        let counts = [super::super::WordCount {
            team: "t".into(),
            family: "gpt".into(),
            script: "latin".into(),
            side: "prompt".into(),
            samples: 1,
            words: 2,
            chars: 3,
            tokens: 4,
        }];
        for _ in 0..2 {
            assert!(store.insert_word_counts(&counts).await.is_err());
        }
        let rows: Vec<_> = (0..64).map(|i| row(&format!("req_{i}"))).collect();
        assert!(
            store.insert_usage(&rows).await.is_err(),
            "a batch written to a full disk?"
        );
        std::fs::remove_file(&filler).unwrap_or_else(|e| panic!("{e}"));
        ok(store.insert_usage(&rows).await);
        // Another connection sees every row.
        let other = SqlitePool::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage")
            .fetch_one(&other)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        other.close().await;
        store.close().await;
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&vol)
            .status();
        assert_eq!(n, 65);
    }

    #[tokio::test]
    async fn a_batch_mixing_plain_and_detailed_rows_keeps_its_order() {
        let (_dir, store) = migrated_store().await;
        let rows: Vec<_> = (0..5)
            .map(|i| {
                let mut r = row(&format!("req_{i}"));
                if i % 2 == 1 {
                    r.service_tier = Some("flex");
                    r.reasoning_tokens = 7;
                }
                r
            })
            .collect();
        store
            .insert_usage(&rows)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let stored: Vec<(String, Option<String>, i64)> = sqlx::query_as(
            "SELECT request_id, service_tier, reasoning_tokens FROM usage ORDER BY request_id",
        )
        .fetch_all(&store.pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let expected: Vec<(String, Option<String>, i64)> = (0..5)
            .map(|i| match i % 2 {
                1 => (format!("req_{i}"), Some("flex".to_string()), 7),
                _ => (format!("req_{i}"), None, 0),
            })
            .collect();
        assert_eq!(stored, expected);
    }

    #[test]
    fn batches_go_out_in_few_statements_of_fixed_sizes() {
        assert_eq!(sizes(0), Vec::<usize>::new());
        assert_eq!(sizes(1), vec![1]);
        assert_eq!(sizes(50), vec![32, 16, 2]);
        assert_eq!(sizes(64), vec![64]);
        assert_eq!(sizes(200), vec![128, 64, 8]);
        assert_eq!(sizes(127), vec![64, 32, 16, 8, 4, 2, 1]);
        assert_eq!(sizes(512), vec![256, 256]);
        assert_eq!(sizes(600), vec![256, 256, 64, 16, 8]);
    }
}
