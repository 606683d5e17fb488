//! Budgets shared by several replicas through Postgres.
//!
//! Each replica holds a lease (a slice of the team's budget) in
//! `budget_leases` and reserves locally against it, so the request path does
//! no database round trip until the lease runs short. The database keeps
//! `spent + SUM(leased) <= limit` under a row lock on `budget_state`; the
//! usage writer moves recorded costs from the lease to `spent` in the same
//! transaction that inserts the rows. Together: recorded spend never passes
//! the limit, however many replicas serve the team.

use std::sync::Arc;
use std::time::Duration;

use super::lease::{self, BudgetView};
use super::{period_key, Ledger, OverBudget, Refusal, Reservation};
use crate::pricing::NanoUsd;
use crate::store::PostgresStore;
use crate::store::StoreError;

/// A lease asks for at least this fraction of the limit, so a busy replica
/// goes to the database about once per 1/LEASE_FRACTION of the budget.
const LEASE_FRACTION: u64 = 20;

/// Leases of a replica silent this long are reclaimed by the others.
pub const STALE_AFTER: Duration = Duration::from_secs(30);

impl Ledger {
    /// Reserves `amount` from every one of `accounts` with a budget, taking
    /// more lease from the database for each whose share held here does not
    /// cover it.
    ///
    /// Waiting for the database (and for another request's lease request)
    /// is bounded by `timeout`; past it the request is refused with
    /// `Unavailable` (fail fast, fail closed).
    pub async fn reserve_shared(
        self: &Arc<Self>,
        store: &PostgresStore,
        accounts: &[String],
        amount: NanoUsd,
        timeout: Duration,
    ) -> Result<Option<Reservation>, Refusal> {
        let first = self.reserve(accounts, amount);
        if first.is_ok() || !self.shared {
            return first.map_err(Refusal::Over);
        }
        let asked_at = std::time::Instant::now();
        let leased = self.lease_and_reserve(store, accounts, amount, asked_at);
        match tokio::time::timeout(timeout, leased).await {
            Ok(result) => result,
            Err(_) => {
                self.note_db_failure();
                tracing::error!(
                    budgets = ?accounts,
                    timeout_ms = timeout.as_millis() as u64,
                    "the database did not grant a budget lease in time; refusing"
                );
                Err(Refusal::Unavailable)
            }
        }
    }

    /// Lease requests go to the database one at a time. A request that
    /// waited behind others trusts what the database told them since it
    /// asked: no room, or no answer at all. Near a budget's limit, or with
    /// the database gone, a queue of requests is refused at once instead of
    /// one round trip (or one timeout) each. Each account short of room gets
    /// its lease in turn (at most one round trip per budget that applies).
    async fn lease_and_reserve(
        self: &Arc<Self>,
        store: &PostgresStore,
        accounts: &[String],
        amount: NanoUsd,
        asked_at: std::time::Instant,
    ) -> Result<Option<Reservation>, Refusal> {
        let _one_at_a_time = self.acquiring.lock().await;
        let mut topped_up: Vec<String> = Vec::new();
        loop {
            // Another request may have brought a lease while this one waited.
            let over = match self.reserve(accounts, amount) {
                Err(over) => over,
                Ok(done) => return Ok(done),
            };
            if self.db_failed_since(asked_at) {
                return Err(Refusal::Unavailable);
            }
            if topped_up.contains(&over.account) {
                // Its fresh lease went to others' requests meanwhile.
                return Err(Refusal::Over(over));
            }
            let account = over.account.clone();
            let Some((limit, start, available)) = self.lease_state(&account) else {
                return self.reserve(accounts, amount).map_err(Refusal::Over);
            };
            let need = amount.0.saturating_sub(available);
            if self
                .free_seen_since(&account, asked_at)
                .is_some_and(|free| need > free)
            {
                return Err(Refusal::Over(over));
            }
            let want = need.max(limit / LEASE_FRACTION);
            let key = period_key(start);
            let pg_start = (start.timestamp() > 0).then_some(start);
            match lease::acquire(store, &account, &key, pg_start, limit, need, want).await {
                Ok(grant) if grant.granted == 0 => {
                    self.add_lease(&account, &key, 0, grant.view);
                    let remaining = self
                        .status(&account)
                        .map_or(over.remaining, |s| s.remaining);
                    return Err(Refusal::Over(OverBudget { remaining, ..over }));
                }
                Ok(grant) => {
                    // Added and reserved under one lock, so a sync running in
                    // between cannot hand the fresh lease back before it is used.
                    match self.add_lease_and_reserve(
                        &account,
                        &key,
                        grant.granted,
                        grant.view,
                        accounts,
                        amount,
                    ) {
                        Err(Refusal::Over(_)) => topped_up.push(account),
                        done => return done,
                    }
                }
                Err(e) => {
                    // Fail closed: without the shared state no spend is safe.
                    self.note_db_failure();
                    tracing::error!(error = %e, budget = %account, "could not take a budget lease; refusing");
                    return Err(Refusal::Unavailable);
                }
            }
        }
    }

    fn note_db_failure(&self) {
        if let Ok(mut at) = self.lease_failed_at.lock() {
            *at = Some(std::time::Instant::now());
        }
    }

    /// The database failed a lease request made after `asked_at`.
    fn db_failed_since(&self, asked_at: std::time::Instant) -> bool {
        self.lease_failed_at
            .lock()
            .ok()
            .and_then(|at| *at)
            .is_some_and(|at| at >= asked_at)
    }

    /// Budget free for new leases, as the database said after `asked_at`.
    fn free_seen_since(&self, team: &str, asked_at: std::time::Instant) -> Option<u64> {
        let accounts = self.accounts.lock().ok()?;
        let acc = accounts.get(team)?;
        let lease = acc.lease.as_ref()?;
        (lease.answered_at? >= asked_at).then(|| {
            acc.budget
                .limit
                .0
                .saturating_sub(lease.db_spent.saturating_add(lease.db_leased))
        })
    }

    /// (limit, period start, available locally) of a shared account.
    fn lease_state(&self, team: &str) -> Option<(u64, chrono::DateTime<chrono::Utc>, u64)> {
        let mut accounts = self.accounts.lock().ok()?;
        let acc = accounts.get_mut(team)?;
        acc.roll(chrono::Utc::now());
        acc.lease?;
        Some((acc.budget.limit.0, acc.period_start, acc.available()))
    }

    fn add_lease(&self, team: &str, key: &str, granted: u64, view: BudgetView) {
        let Ok(mut accounts) = self.accounts.lock() else {
            return;
        };
        if let Some(acc) = accounts.get_mut(team) {
            add_to(acc, key, granted, view);
        }
    }

    /// Adds the grant to `account` and reserves from all `accounts` under
    /// one lock.
    fn add_lease_and_reserve(
        self: &Arc<Self>,
        account: &str,
        key: &str,
        granted: u64,
        view: BudgetView,
        accounts: &[String],
        amount: NanoUsd,
    ) -> Result<Option<Reservation>, Refusal> {
        let Ok(mut all) = self.accounts.lock() else {
            return Err(Refusal::Unavailable);
        };
        if let Some(acc) = all.get_mut(account) {
            acc.roll(chrono::Utc::now());
            add_to(acc, key, granted, view);
        }
        self.reserve_in(&mut all, accounts, amount)
            .map_err(Refusal::Over)
    }

    /// The writer recorded `cost` of rows paid from the lease of `key`.
    fn lease_paid(&self, team: &str, key: &str, cost: u64) {
        let Ok(mut accounts) = self.accounts.lock() else {
            return;
        };
        if let Some(lease) = accounts.get_mut(team).and_then(|a| lease_for(a, key)) {
            lease.held = lease.held.saturating_sub(cost);
            lease.unwritten = lease.unwritten.saturating_sub(cost);
            lease.db_spent = lease.db_spent.saturating_add(cost);
            lease.db_leased = lease.db_leased.saturating_sub(cost);
        }
    }

    /// Runs every refresh: heartbeats, returns lease this replica does not
    /// need (when it sat idle since the last sync, or the team is near its
    /// limit and others may need it), and reads every replica's spend.
    pub async fn sync(&self, store: &PostgresStore) -> Result<(), StoreError> {
        if !self.shared {
            return Ok(());
        }
        let alive = lease::heartbeat(store, STALE_AFTER).await?;
        let mut returns = Vec::new();
        let mut keys = Vec::new();
        if let Ok(mut accounts) = self.accounts.lock() {
            let now = chrono::Utc::now();
            for (team, acc) in accounts.iter_mut() {
                acc.roll(now);
                let key = period_key(acc.period_start);
                let limit = acc.budget.limit.0;
                let reserved = acc.reserved;
                let Some(lease) = &mut acc.lease else {
                    continue;
                };
                if !alive {
                    // Our leases were reclaimed as if we had died: hold nothing.
                    lease.held = reserved.saturating_add(lease.unwritten);
                }
                let excess = lease.available(reserved);
                let free = limit.saturating_sub(lease.db_spent.saturating_add(lease.db_leased));
                let tight = free < limit / LEASE_FRACTION;
                if excess > 0 && (!lease.active || tight) {
                    lease.held -= excess;
                    lease.db_leased = lease.db_leased.saturating_sub(excess);
                    returns.push((team.clone(), key.clone(), excess));
                }
                lease.active = false;
                keys.push((team.clone(), key));
            }
        }
        for (team, key, amount) in returns {
            lease::release(store, &team, &key, amount).await?;
        }
        let views = lease::views(store, &keys).await?;
        if let Ok(mut accounts) = self.accounts.lock() {
            for ((team, key), view) in views {
                if let Some(lease) = accounts.get_mut(&team).and_then(|a| lease_for(a, &key)) {
                    lease.db_spent = view.spent;
                    lease.db_leased = view.leased;
                }
            }
        }
        Ok(())
    }
}

/// The account's lease, if it is still in period `key` (the writer and the
/// database answer about the period they saw; the account may have rolled).
fn lease_for<'a>(acc: &'a mut super::Account, key: &str) -> Option<&'a mut super::Lease> {
    if period_key(acc.period_start) == key {
        acc.lease.as_mut()
    } else {
        None
    }
}

/// A lease granted for period `key`, unless the account has moved on.
fn add_to(acc: &mut super::Account, key: &str, granted: u64, view: BudgetView) {
    if let Some(lease) = lease_for(acc, key) {
        lease.held = lease.held.saturating_add(granted);
        lease.db_spent = view.spent;
        lease.db_leased = view.leased;
        lease.answered_at = Some(std::time::Instant::now());
    }
}

impl crate::store::RecordedSpend for Ledger {
    fn written(&self, team: &str, period: &str, cost_nano_usd: u64) {
        self.lease_paid(team, period, cost_nano_usd);
    }
}
