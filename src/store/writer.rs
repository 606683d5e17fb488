//! The background usage writer: a bounded queue in front of batched insert
//! transactions. Never blocks the request path (a full queue drops the row
//! and counts it); drains everything when the last sink is dropped.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Store, UsageRecord};
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

pub struct UsageWriter;

impl UsageWriter {
    /// Starts the writer. It ends, after writing every queued row, once every
    /// `UsageSink` clone is dropped.
    pub fn spawn(
        store: Store,
        metrics: Arc<Metrics>,
        batch_size: usize,
        flush_interval: Duration,
        capacity: usize,
    ) -> (UsageSink, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity);
        let sink = UsageSink {
            tx,
            metrics: metrics.clone(),
        };
        let handle = tokio::spawn(run(store, metrics, rx, batch_size, flush_interval));
        (sink, handle)
    }
}

async fn run(
    store: Store,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<UsageRecord>,
    batch_size: usize,
    flush_interval: Duration,
) {
    let mut buf: Vec<UsageRecord> = Vec::with_capacity(batch_size);
    loop {
        if rx.recv_many(&mut buf, batch_size).await == 0 {
            break;
        }
        // Gather more rows for up to one flush interval, so a busy proxy
        // writes few large transactions instead of many small ones.
        let deadline = tokio::time::Instant::now() + flush_interval;
        let mut closed = false;
        while buf.len() < batch_size {
            let room = batch_size - buf.len();
            match tokio::time::timeout_at(deadline, rx.recv_many(&mut buf, room)).await {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        write(&store, &metrics, &buf).await;
        buf.clear();
        if closed {
            break;
        }
    }
    tracing::info!("usage writer drained");
}

async fn write(store: &Store, metrics: &Metrics, rows: &[UsageRecord]) {
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=5 {
        match store.insert_usage(rows).await {
            Ok(()) => return,
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
}
