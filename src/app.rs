//! The shared state every request sees, built once at start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::auth::{AuthPolicy, Directory};
use crate::budget::Ledger;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pricing::Catalog;
use crate::store::{Store, UsageSink};
use crate::upstream::Upstreams;

pub struct AppState {
    pub config: Config,
    /// The catalog in use; swapped whole when its file changes or on SIGHUP.
    pub catalog: arc_swap::ArcSwap<Catalog>,
    pub metrics: Arc<Metrics>,
    pub upstreams: Upstreams,
    pub usage: UsageSink,
    pub store: Store,
    pub request_ids: RequestIds,
    pub auth: AuthPolicy,
    pub directory: Directory,
    pub ledger: Arc<Ledger>,
    /// Requests and tokens per minute of teams and keys.
    pub limits: Arc<crate::limits::RateLimiter>,
    /// Samples requests for tokens per word (`words`).
    pub words: crate::words::WordSampler,
    /// Trailing windows of the self-hosted models served (`pricing::gpu`).
    pub gpu: crate::pricing::gpu::GpuMeters,
}

impl AppState {
    /// Reloads keys, team settings and budgets from the database. Runs every
    /// 500 ms in the background and right after an admin change, so a key
    /// revoked or a budget changed by any process applies within a second.
    pub async fn refresh(&self) -> Result<(), crate::store::StoreError> {
        let teams = self.store.teams().await?;
        let keys = self.store.keys().await?;
        if self
            .auth
            .accounts_seen(!teams.is_empty() || !keys.is_empty())
        {
            tracing::warn!(
                "a team or key exists now: auth mode is virtual-keys (clients must send a tg- key)"
            );
        }
        let mut key_map = std::collections::HashMap::new();
        for k in keys.into_iter().filter(|k| k.revoked_at.is_none()) {
            let entry = crate::auth::KeyEntry {
                id: k.id,
                team: k.team,
                models: k.models.iter().map(|m| crate::glob::Glob::new(m)).collect(),
            };
            // A malformed stored hash matches no key.
            if let Some(digest) = crate::auth::parse_key_hash(&k.hash) {
                key_map.insert(digest, Arc::new(entry));
            }
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
                // Shared budgets read their spend from the lease tables (sync).
                Some(budget) if self.ledger.is_shared() => {
                    self.ledger.set_budget(&t.name, Some(budget), |_| 0)
                }
                Some(budget) if !self.ledger.is_current(&t.name, budget) => {
                    let start = budget.period.start(chrono::Utc::now());
                    let spent = self.store.spend_since(&t.name, start).await?;
                    self.ledger.set_budget(&t.name, Some(budget), |_| spent);
                }
                Some(budget) => self.ledger.set_budget(&t.name, Some(budget), |_| 0),
                None => self.ledger.set_budget(&t.name, None, |_| 0),
            }
        }
        self.refresh_level_budgets().await?;
        self.refresh_rate_limits().await?;
        self.directory.replace(key_map, team_map);
        if let Some(pg) = self.store.shared() {
            self.ledger.sync(pg).await?;
        }
        Ok(())
    }

    /// Every team's and key's rate limits into the limiter, those cleared
    /// out of it.
    async fn refresh_rate_limits(&self) -> Result<(), crate::store::StoreError> {
        let limits = self.store.rate_limits().await?;
        let set: std::collections::HashSet<&str> = limits.iter().map(|(a, _)| a.as_str()).collect();
        for account in self.limits.names() {
            if !set.contains(account.as_str()) {
                self.limits.set(&account, None);
            }
        }
        for (account, l) in &limits {
            self.limits.set(account, Some(*l));
        }
        Ok(())
    }

    /// The budgets of keys, end users and tags into the ledger (SPEC 14),
    /// those cleared out of it.
    async fn refresh_level_budgets(&self) -> Result<(), crate::store::StoreError> {
        use crate::budget::{level_of, Level};
        let budgets = self.store.level_budgets().await?;
        let set: std::collections::HashSet<&str> =
            budgets.iter().map(|(a, _)| a.as_str()).collect();
        for account in self.ledger.names() {
            if level_of(&account).0 != Level::Team && !set.contains(account.as_str()) {
                self.ledger.set_budget(&account, None, |_| 0);
            }
        }
        for (account, budget) in budgets {
            if self.ledger.is_shared() || self.ledger.is_current(&account, budget) {
                self.ledger.set_budget(&account, Some(budget), |_| 0);
            } else {
                let start = budget.period.start(chrono::Utc::now());
                let spent = self.store.account_spend_since(&account, start).await?;
                self.ledger.set_budget(&account, Some(budget), |_| spent);
            }
        }
        Ok(())
    }
}

/// Request ids: a per-process random prefix and a counter, so ids are unique
/// across replicas and restarts without a syscall per request.
pub struct RequestIds {
    /// `req_` and 16 hex digits.
    prefix: String,
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
            prefix: format!("req_{}", crate::auth::hex(&h.finish().to_be_bytes())),
            counter: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut id = String::with_capacity(self.prefix.len() + 16);
        id.push_str(&self.prefix);
        // At least 8 hex digits of the counter, more once it needs them.
        let digits = crate::auth::hex(&n.to_be_bytes());
        let skip = digits.len() - digits.trim_start_matches('0').len();
        id.push_str(&digits[skip.min(8)..]);
        id
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::RequestIds;

    #[test]
    fn request_ids_are_a_fixed_prefix_and_a_counter() {
        let ids = RequestIds::new();
        let a = ids.next();
        let b = ids.next();
        assert_eq!(a.len(), 4 + 16 + 8);
        assert!(a.starts_with("req_"));
        assert_eq!(a[..20], b[..20]);
        assert_eq!(&a[20..], "00000000");
        assert_eq!(&b[20..], "00000001");
        ids.counter
            .store(0x1_2345_6789, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(&ids.next()[20..], "123456789");
    }
}
