//! The background usage writer: the request path hands it rows without
//! waiting (a bounded channel), and it writes them to the database in
//! batched transactions.
//!
//! It loses nothing it can keep: a failed batch is retried with capped
//! backoff, rows stay in memory up to `database.queue_capacity`, and past
//! that they go to the spool on local disk, replayed (exactly once) when the
//! database is back or at the next start. With `durability = "spool"` every
//! row is appended to the spool before its response completes. Rows are
//! dropped (and counted) only when the spool cannot take them either.
//!
//! Never blocks the request path; one task owns the spool and the batches.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use super::spool::Spool;
use super::{Store, StoreError, UsageRecord};
use crate::metrics::Metrics;

/// Longest wait between retries of a failed batch.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// At shutdown, how long a failing database is retried before the rows
/// still in memory go to the spool.
const SHUTDOWN_RETRY: Duration = Duration::from_secs(5);

/// One row on its way to the writer; `ack` is answered once the row is on
/// local disk (durable mode).
struct Entry {
    row: Box<UsageRecord>,
    ack: Option<oneshot::Sender<()>>,
}

/// Why rows are not reaching the database right now (`/readyz` says it).
#[derive(Default)]
pub struct WriterHealth {
    problem: Mutex<Option<String>>,
}

impl WriterHealth {
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().ok().and_then(|p| p.clone())
    }

    fn set(&self, problem: Option<String>) {
        if let Ok(mut p) = self.problem.lock() {
            *p = problem;
        }
    }
}

/// The request path's handle: cheap to clone, never awaits.
#[derive(Clone)]
pub struct UsageSink {
    tx: mpsc::Sender<Entry>,
    metrics: Arc<Metrics>,
    /// Rows the writer holds in memory (besides the channel).
    held: Arc<AtomicUsize>,
    health: Arc<WriterHealth>,
    durable: bool,
}

impl UsageSink {
    /// Hands a row to the writer. `ack` (durable mode) is answered when the
    /// row is on local disk; dropped unanswered if it never gets there.
    pub fn record(&self, row: Box<UsageRecord>, ack: Option<oneshot::Sender<()>>) {
        if self.tx.try_send(Entry { row, ack }).is_err() {
            self.metrics.records_dropped.inc();
            tracing::error!("usage writer channel full or closed: record dropped");
        }
    }

    /// True when responses wait for their row to reach the spool.
    pub fn durable(&self) -> bool {
        self.durable
    }

    /// Rows waiting to be written (channel and writer memory).
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity() + self.held.load(Ordering::Relaxed)
    }

    /// Why rows are not reaching the database, while they are not.
    pub fn problem(&self) -> Option<String> {
        self.health.problem()
    }
}

/// How the writer batches and where it spills.
pub struct WriterConfig {
    pub batch_size: usize,
    pub flush_interval: Duration,
    /// Rows kept in memory while the database cannot take them.
    pub capacity: usize,
    /// Append every row to the spool before acknowledging it.
    pub durable: bool,
    /// Told of every row of this process the database took (`None`: nobody).
    pub observer: Option<Arc<dyn WrittenRows>>,
}

/// Told of the rows of each batch the database took, once, by the writer's
/// task: what is made of a finished request there (an OpenTelemetry span,
/// `telemetry`) costs its request nothing. Rows replayed from the spool are
/// an earlier process's and are not told again.
pub trait WrittenRows: Send + Sync {
    fn written(&self, rows: &[Box<UsageRecord>]);
}

/// Told of the spend a shared budget's lease paid for once its rows are in
/// the database (`budget::Ledger` implements it): the store reports, the
/// budget decides what that means, and the store never imports the budget.
pub trait RecordedSpend: Send + Sync {
    fn written(&self, team: &str, period: &str, cost_nano_usd: u64);
}

/// The running writer: `finish` makes it stop waiting for fuller batches and
/// write everything now; it ends once every `UsageSink` is dropped.
pub struct UsageWriter {
    stop: Arc<Notify>,
    task: JoinHandle<()>,
}

impl UsageWriter {
    pub fn spawn(
        store: Store,
        metrics: Arc<Metrics>,
        ledger: Arc<dyn RecordedSpend>,
        spool: Spool,
        config: WriterConfig,
    ) -> (UsageSink, UsageWriter) {
        let (tx, rx) = mpsc::channel(config.capacity);
        let held = Arc::new(AtomicUsize::new(0));
        let health = Arc::new(WriterHealth::default());
        let sink = UsageSink {
            tx,
            metrics: metrics.clone(),
            held: held.clone(),
            health: health.clone(),
            durable: config.durable,
        };
        let stop = Arc::new(Notify::new());
        let writer = Writer {
            node: store.node().map(str::to_string),
            store,
            metrics,
            ledger,
            spool,
            config,
            pending: VecDeque::new(),
            oldest: None,
            held,
            health,
            backoff: Duration::ZERO,
            retry_at: None,
            failing_since: None,
            last_failure_log: None,
            last_spool_error: None,
            replaying: false,
        };
        let task = tokio::spawn(writer.run(rx, stop.clone()));
        (sink, UsageWriter { stop, task })
    }

    /// Flushes without further waiting and returns when every row of every
    /// (by now dropped) sink is written, or spooled if the database fails.
    pub async fn finish(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

/// A row in the writer's memory, and the spool segment holding it (if any).
struct Pending {
    row: Box<UsageRecord>,
    segment: Option<u64>,
}

/// One insert transaction in flight. Rows stay boxed from `settle` to the
/// insert: a pointer moves through the channel, the queue and the job, not
/// a ~450-byte record (five copies per request otherwise).
#[allow(clippy::vec_box)]
enum Job {
    /// Rows from memory, with the spool segment of each (durable mode).
    Rows {
        rows: Vec<Box<UsageRecord>>,
        segments: Vec<Option<u64>>,
    },
    Replay {
        segment: u64,
        rows: Vec<Box<UsageRecord>>,
        end: u64,
        eof: bool,
    },
}

impl Job {
    fn rows(&self) -> &[Box<UsageRecord>] {
        match self {
            Job::Rows { rows, .. } | Job::Replay { rows, .. } => rows,
        }
    }
}

type Inflight = Pin<Box<dyn Future<Output = (Job, Result<Vec<String>, StoreError>)> + Send>>;

struct Writer {
    store: Store,
    metrics: Arc<Metrics>,
    ledger: Arc<dyn RecordedSpend>,
    spool: Spool,
    config: WriterConfig,
    node: Option<String>,
    pending: VecDeque<Pending>,
    /// When the oldest row in `pending` arrived.
    oldest: Option<Instant>,
    held: Arc<AtomicUsize>,
    health: Arc<WriterHealth>,
    backoff: Duration,
    retry_at: Option<Instant>,
    failing_since: Option<Instant>,
    last_failure_log: Option<Instant>,
    last_spool_error: Option<Instant>,
    /// A spool replay is in flight (it goes alone).
    replaying: bool,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Entry>, stop: Arc<Notify>) {
        let mut buf: Vec<Entry> = Vec::with_capacity(self.config.batch_size);
        // Postgres takes a second transaction while the first commits (its
        // rows and the Rust side's work overlap the other's commit); SQLite
        // has one writing connection.
        let depth = match self.store.shared() {
            Some(_) => 2,
            None => 1,
        };
        let mut inflight: FuturesUnordered<Inflight> = FuturesUnordered::new();
        let mut closed = false;
        let mut stopping: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let flushing = stopping.is_some() || closed;
            let room = inflight.len() < depth && !self.replaying;
            if room && self.flush_due(now, flushing) {
                // Top the batch up with what queued while it waited.
                while buf.len() < self.config.batch_size.saturating_sub(self.pending.len()) {
                    match rx.try_recv() {
                        Ok(entry) => buf.push(entry),
                        Err(_) => break,
                    }
                }
                if !buf.is_empty() {
                    self.accept(&mut buf);
                }
            }
            while inflight.len() < depth && !self.replaying {
                match self.next_job(now, flushing, inflight.is_empty()) {
                    Some(job) => inflight.push(job),
                    None => break,
                }
            }
            if closed && inflight.is_empty() && self.pending.is_empty() {
                // Rows only the spool holds wait for the next start.
                break;
            }
            if let Some(since) = stopping {
                if inflight.is_empty() && closed && since.elapsed() > SHUTDOWN_RETRY {
                    self.spill_all("shutting down while the database fails");
                    break;
                }
            }
            // Waking per row costs the request path a task wake-up each: a
            // partial batch waits out its flush interval with the channel
            // unwatched (rows queue there), like the batch being written.
            // Durable mode (acks) and a failing database (memory, spool)
            // watch it all the time.
            let listen = !closed
                && (self.config.durable
                    || self.retry_at.is_some()
                    || (inflight.len() < depth && !self.replaying && self.pending.is_empty()));
            let wake = self.wake_at(now, flushing);
            tokio::select! {
                n = rx.recv_many(&mut buf, self.config.batch_size), if listen => {
                    if n == 0 {
                        closed = true;
                        stopping.get_or_insert_with(Instant::now);
                    } else {
                        self.accept(&mut buf);
                    }
                }
                Some(done) = inflight.next(), if !inflight.is_empty() => {
                    self.finished(done.0, done.1);
                }
                _ = tokio::time::sleep_until(wake.into()), if inflight.len() < depth && !self.replaying => {}
                _ = stop.notified(), if stopping.is_none() => stopping = Some(Instant::now()),
            }
        }
        self.spool.close_active();
        self.held.store(0, Ordering::Relaxed);
        tracing::info!("usage writer drained");
    }

    /// A partial batch has waited its flush interval (or everything is to
    /// be written now).
    fn flush_due(&self, now: Instant, flushing: bool) -> bool {
        self.retry_at.is_none_or(|t| t <= now)
            && self
                .oldest
                .is_some_and(|t| flushing || now >= t + self.config.flush_interval)
    }

    /// Takes new rows: on the spool first in durable mode, then into memory;
    /// past the memory cap, the newest rows go to the spool.
    fn accept(&mut self, buf: &mut Vec<Entry>) {
        let segment = if self.config.durable {
            let rows: Vec<&UsageRecord> = buf.iter().map(|e| &*e.row).collect();
            match self.spool.append(&rows) {
                Ok(id) => Some(id),
                Err(e) => {
                    self.spool_error(&e.to_string());
                    None
                }
            }
        } else {
            None
        };
        for entry in buf.drain(..) {
            if let Some(ack) = entry.ack {
                // Answered even when the spool failed: the row is in memory,
                // and a client is never held hostage to a full disk.
                let _ = ack.send(());
            }
            self.pending.push_back(Pending {
                row: entry.row,
                segment,
            });
        }
        if self.oldest.is_none() && !self.pending.is_empty() {
            self.oldest = Some(Instant::now());
        }
        if self.pending.len() > self.config.capacity {
            self.spill_newest();
        }
        self.held.store(self.pending.len(), Ordering::Relaxed);
    }

    /// Memory is full (the database has been failing): the newest rows, down
    /// to half the cap, leave memory for the spool.
    fn spill_newest(&mut self) {
        let keep = self.config.capacity / 2;
        let spilled: Vec<Pending> = self.pending.drain(keep..).collect();
        self.move_to_spool(spilled, "the database is failing and memory is full");
    }

    /// Everything still in memory goes to the spool (shutdown while failing).
    fn spill_all(&mut self, why: &str) {
        let all: Vec<Pending> = self.pending.drain(..).collect();
        self.move_to_spool(all, why);
    }

    fn move_to_spool(&mut self, rows: Vec<Pending>, why: &str) {
        if rows.is_empty() {
            return;
        }
        // Rows already in a segment are safe there: that segment now needs
        // a replay. The others are written to a segment of their own.
        let mut loose = Vec::new();
        for p in rows {
            match p.segment {
                Some(id) => self.spool.orphan(id),
                None => loose.push(p.row),
            }
        }
        let n = loose.len();
        if n > 0 {
            match self
                .spool
                .spill(&loose.iter().map(|r| &**r).collect::<Vec<_>>())
            {
                Ok(()) => {
                    tracing::warn!(rows = n, spool = %self.spool.dir().display(), "{why}: rows spooled to disk")
                }
                Err(e) => {
                    self.metrics.records_dropped.inc_by(n as u64);
                    tracing::error!(rows = n, error = %e, "{why}, and the spool cannot take the rows: dropped");
                }
            }
        }
        self.held.store(self.pending.len(), Ordering::Relaxed);
        if self.pending.is_empty() {
            self.oldest = None;
        }
    }

    fn spool_error(&mut self, e: &str) {
        if self
            .last_spool_error
            .is_none_or(|t| t.elapsed() > Duration::from_secs(1))
        {
            tracing::error!(
                error = e,
                "cannot append to the spool: rows are kept in memory only"
            );
            self.last_spool_error = Some(Instant::now());
        }
    }

    /// When to look again: the end of a backoff, else the flush deadline.
    fn wake_at(&self, now: Instant, flushing: bool) -> Instant {
        if let Some(t) = self.retry_at.filter(|t| *t > now) {
            return t;
        }
        match self.oldest {
            Some(_) if flushing => now,
            Some(t) => (t + self.config.flush_interval).max(now),
            None => now + Duration::from_secs(3600),
        }
    }

    /// The next insert, if one is due: pending rows first (a full batch at
    /// once, a partial one after the flush interval), else a spool replay.
    /// A spool replay only goes `alone`: its segment's read offset moves
    /// once it is written, so a second one would read the same rows.
    fn next_job(&mut self, now: Instant, flushing: bool, alone: bool) -> Option<Inflight> {
        if self.retry_at.is_some_and(|t| t > now) {
            return None;
        }
        let due = self.pending.len() >= self.config.batch_size
            || flushing
            || self
                .oldest
                .is_some_and(|t| now >= t + self.config.flush_interval);
        let job = if !self.pending.is_empty() && due {
            let n = self.pending.len().min(self.config.batch_size);
            let (mut rows, mut segments) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for p in self.pending.drain(..n) {
                rows.push(p.row);
                segments.push(p.segment);
            }
            self.oldest = (!self.pending.is_empty()).then_some(now);
            Job::Rows { rows, segments }
        } else if alone && self.spool.needs_replay() {
            match self.spool.next_replay(self.config.batch_size) {
                Ok(Some(b)) => Job::Replay {
                    segment: b.segment,
                    rows: b.rows.into_iter().map(Box::new).collect(),
                    end: b.end,
                    eof: b.eof,
                },
                Ok(None) => return None,
                Err(e) => {
                    self.failed(&e.to_string());
                    return None;
                }
            }
        } else {
            return None;
        };
        self.replaying = matches!(job, Job::Replay { .. });
        let store = self.store.clone();
        Some(Box::pin(async move {
            let result = if job.rows().is_empty() {
                Ok(Vec::new())
            } else {
                store.insert_usage(job.rows()).await
            };
            (job, result)
        }))
    }

    fn finished(&mut self, job: Job, result: Result<Vec<String>, StoreError>) {
        if matches!(job, Job::Replay { .. }) {
            self.replaying = false;
        }
        let skipped = match result {
            Ok(skipped) => skipped,
            Err(e) => {
                self.failed(&e.to_string());
                match job {
                    // Back to the front, to be retried first.
                    Job::Rows { rows, segments } => {
                        for (row, segment) in rows.into_iter().zip(segments).rev() {
                            self.pending.push_front(Pending { row, segment });
                        }
                        self.oldest.get_or_insert_with(Instant::now);
                        if self.pending.len() > self.config.capacity {
                            self.spill_newest();
                        }
                        self.held.store(self.pending.len(), Ordering::Relaxed);
                    }
                    // Read again from where it stood.
                    Job::Replay { .. } => {}
                }
                return;
            }
        };
        if self.failing_since.take().is_some() {
            tracing::warn!("usage rows reach the database again");
        }
        self.health.set(None);
        self.backoff = Duration::ZERO;
        self.retry_at = None;
        self.recorded(job.rows(), &skipped);
        match job {
            Job::Rows { rows, segments } => {
                if let Some(observer) = &self.config.observer {
                    observer.written(&rows);
                }
                for id in segments.into_iter().flatten() {
                    self.spool.written(id, 1);
                }
                self.held.store(self.pending.len(), Ordering::Relaxed);
            }
            Job::Replay {
                segment, end, eof, ..
            } => {
                self.spool.replayed(segment, end, eof);
                if eof && !self.spool.needs_replay() {
                    tracing::info!("spooled usage rows replayed into the database");
                }
            }
        }
    }

    /// The database took these rows: the costs a shared budget's lease of
    /// this replica paid for are recorded spend now.
    fn recorded(&self, rows: &[Box<UsageRecord>], skipped: &[String]) {
        for row in rows {
            let ours = match (&row.lease_node, &self.node) {
                (None, _) => true,
                (Some(n), Some(me)) => n == me,
                (Some(_), None) => false,
            };
            if !ours || skipped.contains(&row.request_id) {
                continue;
            }
            for (account, period) in &row.budget_leases {
                self.ledger.written(account, period, row.cost_nano_usd);
            }
        }
    }

    fn failed(&mut self, reason: &str) {
        let first = self.failing_since.is_none();
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        self.backoff = (self.backoff * 2).clamp(Duration::from_millis(50), MAX_BACKOFF);
        self.retry_at = Some(Instant::now() + self.backoff);
        self.health.set(Some(format!(
            "usage rows are not reaching the database (for {} ms): {reason}",
            since.elapsed().as_millis()
        )));
        let quiet = self
            .last_failure_log
            .is_some_and(|t| t.elapsed() < Duration::from_secs(30));
        if first || !quiet {
            self.last_failure_log = Some(Instant::now());
            tracing::error!(
                error = reason,
                held = self.pending.len(),
                "usage insert failed; retrying (rows are kept, past the memory cap on the spool)"
            );
        }
    }
}
