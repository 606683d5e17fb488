//! The shared state every request sees, built once at start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::auth::Directory;
use crate::budget::Ledger;
use crate::config::{AuthMode, Config};
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
    pub auth_mode: AuthMode,
    pub directory: Directory,
    pub ledger: Arc<Ledger>,
}

impl AppState {
    /// Reloads keys, team settings and budgets from the database. Runs every
    /// 500 ms in the background and right after an admin change, so a key
    /// revoked or a budget changed by any process applies within a second.
    pub async fn refresh(&self) -> Result<(), crate::store::StoreError> {
        let teams = self.store.teams().await?;
        let keys = self.store.keys().await?;
        let mut key_map = std::collections::HashMap::new();
        for k in keys.into_iter().filter(|k| k.revoked_at.is_none()) {
            let entry = crate::auth::KeyEntry {
                id: k.id,
                team: k.team,
                models: k.models.iter().map(|m| crate::glob::Glob::new(m)).collect(),
            };
            key_map.insert(k.hash, Arc::new(entry));
        }
        let mut team_map = std::collections::HashMap::new();
        for t in &teams {
            team_map.insert(
                t.name.clone(),
                crate::auth::TeamSettings {
                    max_output_tokens: t.max_output_tokens,
                },
            );
            match t.budget {
                Some(budget) if !self.ledger.is_current(&t.name, budget) => {
                    let start = budget.period.start(chrono::Utc::now());
                    let spent = self.store.spend_since(&t.name, start).await?;
                    self.ledger.set_budget(&t.name, Some(budget), |_| spent);
                }
                Some(budget) => self.ledger.set_budget(&t.name, Some(budget), |_| 0),
                None => self.ledger.set_budget(&t.name, None, |_| 0),
            }
        }
        self.directory.replace(key_map, team_map);
        Ok(())
    }
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
