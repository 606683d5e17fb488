//! The shared state every request sees, built once at start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::pricing::Catalog;
use crate::proxy::upstream::Upstreams;
use crate::store::{Store, UsageSink};

pub struct AppState {
    pub config: Config,
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<Metrics>,
    pub upstreams: Upstreams,
    pub usage: UsageSink,
    pub store: Store,
    pub request_ids: RequestIds,
}

/// Request ids: a per-process random prefix and a counter, so ids are unique
/// across replicas and restarts without a syscall per request.
pub struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    pub fn new() -> RequestIds {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        RequestIds {
            prefix: h.finish(),
            counter: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("req_{:016x}{:08x}", self.prefix, n)
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}
