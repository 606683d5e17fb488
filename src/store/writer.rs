//! The background usage writer: a bounded queue in front of batched insert
//! transactions. Never blocks the request path (a full queue drops the row
//! and counts it); drains everything when the last sink is dropped.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use super::{Store, UsageRecord};
use crate::budget::Ledger;
use crate::metrics::Metrics;

/// The request path's handle: cheap to clone, never awaits.
#[derive(Clone)]
pub struct UsageSink {
    tx: mpsc::Sender<UsageRecord>,
    metrics: Arc<Metrics>,
}

impl UsageSink {
    pub fn record(&self, row: UsageRecord) {
        if self.tx.try_send(row).is_err() {
            self.metrics.records_dropped.inc();
            tracing::warn!("usage queue full or closed: record dropped");
        }
    }

    /// Rows waiting to be written.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
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
        ledger: Arc<Ledger>,
        batch_size: usize,
        flush_interval: Duration,
        capacity: usize,
    ) -> (UsageSink, UsageWriter) {
        let (tx, rx) = mpsc::channel(capacity);
        let sink = UsageSink {
            tx,
            metrics: metrics.clone(),
        };
        let stop = Arc::new(Notify::new());
        let task = tokio::spawn(run(
            store,
            metrics,
            ledger,
            rx,
            batch_size,
            flush_interval,
            stop.clone(),
        ));
        (sink, UsageWriter { stop, task })
    }

    /// Flushes without further waiting and returns when every row of every
    /// (by now dropped) sink is written.
    pub async fn finish(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

async fn run(
    store: Store,
    metrics: Arc<Metrics>,
    ledger: Arc<Ledger>,
    mut rx: mpsc::Receiver<UsageRecord>,
    batch_size: usize,
    flush_interval: Duration,
    stop: Arc<Notify>,
) {
    let mut buf: Vec<UsageRecord> = Vec::with_capacity(batch_size);
    let mut draining = false;
    loop {
        if rx.recv_many(&mut buf, batch_size).await == 0 {
            break;
        }
        // A partial batch waits one flush interval for more rows, so a busy
        // proxy writes few large transactions. It sleeps rather than waking
        // per row; a backlog (a full batch) is written at once.
        let mut closed = false;
        if buf.len() < batch_size && !draining {
            tokio::select! {
                _ = tokio::time::sleep(flush_interval) => {}
                _ = stop.notified() => draining = true,
            }
            while buf.len() < batch_size {
                match rx.try_recv() {
                    Ok(row) => buf.push(row),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
        }
        if write(&store, &metrics, &buf).await {
            // Recorded: those costs no longer need this replica's lease.
            for row in &buf {
                if let Some(period) = &row.budget_period {
                    ledger.written(&row.team, period, row.cost_nano_usd);
                }
            }
        }
        buf.clear();
        if closed {
            break;
        }
    }
    tracing::info!("usage writer drained");
}

/// Inserts with retries; true once the rows are in the database.
async fn write(store: &Store, metrics: &Metrics, rows: &[UsageRecord]) -> bool {
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=5 {
        match store.insert_usage(rows).await {
            Ok(()) => return true,
            Err(e) if attempt < 5 => {
                tracing::warn!(error = %e, attempt, rows = rows.len(), "usage insert failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => {
                tracing::error!(error = %e, rows = rows.len(), "usage insert failed; rows dropped");
                metrics.records_dropped.inc_by(rows.len() as u64);
            }
        }
    }
    false
}
