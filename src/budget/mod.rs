//! Team budgets: periods, reservations before forwarding, settlement after.
//!
//! Owns the in-memory ledger every request checks. The check is a mutex-held
//! comparison of integers, never a database round trip; the ledger is loaded
//! from the database at start (spend survives restarts) and refreshed when
//! budgets change.
//!
//! On SQLite the ledger is the one authority. On Postgres several replicas
//! share each budget: a replica reserves only from a lease it holds in the
//! database (`shared`), so the database round trip happens once per lease,
//! not per request.

pub mod lease;
pub mod shared;

pub use crate::period::{Budget, BudgetStatus, Period};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use crate::pricing::NanoUsd;

/// The key of a budget period in the shared tables: `total`, or the
/// period's start as UTC text.
pub fn period_key(start: DateTime<Utc>) -> String {
    if start.timestamp() <= 0 {
        "total".to_string()
    } else {
        crate::store::time_text(start)
    }
}

/// One team's ledger for its current period.
#[derive(Debug)]
struct Account {
    budget: Budget,
    period_start: DateTime<Utc>,
    period_end: DateTime<Utc>,
    /// Local mode: recorded and settled spend. Shared mode: unused (see `Lease`).
    spent: u64,
    reserved: u64,
    /// Shared mode only.
    lease: Option<Lease>,
}

/// This replica's share of a budget kept in Postgres. Invariant kept with
/// the database: `reserved + unwritten <= held`.
#[derive(Debug, Default, Clone, Copy)]
struct Lease {
    /// Held by this replica in `budget_leases`.
    held: u64,
    /// Settled costs the writer has not recorded yet.
    unwritten: u64,
    /// Recorded spend of all replicas, as last read.
    db_spent: u64,
    /// Held by all replicas, as last read.
    db_leased: u64,
    /// A reservation was taken since the last sync.
    active: bool,
    /// When the database last answered a lease request (its view is then fresh).
    answered_at: Option<std::time::Instant>,
}

impl Lease {
    fn available(&self, reserved: u64) -> u64 {
        self.held
            .saturating_sub(reserved.saturating_add(self.unwritten))
    }
}

impl Account {
    fn roll(&mut self, now: DateTime<Utc>) {
        if now >= self.period_end {
            self.period_start = self.budget.period.start(now);
            self.period_end = self.budget.period.next(self.period_start);
            self.spent = 0;
            // The old period's lease stays with the old period's key.
            if let Some(lease) = &mut self.lease {
                *lease = Lease::default();
            }
        }
    }

    /// What this replica may still reserve without asking anyone.
    fn available(&self) -> u64 {
        match &self.lease {
            None => self.remaining(),
            Some(lease) => lease.available(self.reserved),
        }
    }

    /// The team's budget left, all replicas counted.
    fn remaining(&self) -> u64 {
        match &self.lease {
            None => self
                .budget
                .limit
                .0
                .saturating_sub(self.spent.saturating_add(self.reserved)),
            Some(lease) => {
                let free = self
                    .budget
                    .limit
                    .0
                    .saturating_sub(lease.db_spent.saturating_add(lease.db_leased));
                free.saturating_add(lease.available(self.reserved))
            }
        }
    }

    fn spent(&self) -> u64 {
        match &self.lease {
            None => self.spent,
            Some(lease) => lease.db_spent.saturating_add(lease.unwritten),
        }
    }
}

#[derive(Debug, Default)]
pub struct Ledger {
    accounts: Mutex<HashMap<String, Account>>,
    /// Budgets live in Postgres and are shared with other replicas.
    shared: bool,
    /// One lease request to the database at a time.
    acquiring: tokio::sync::Mutex<()>,
    /// When a lease request last found the database failing or silent.
    lease_failed_at: Mutex<Option<std::time::Instant>>,
}

/// Why a shared reservation could not be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The budget has no room for it.
    Over(OverBudget),
    /// The shared budget could not be read or leased (database down).
    Unavailable,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget {
    pub needed: NanoUsd,
    pub remaining: NanoUsd,
}

impl Ledger {
    pub fn new() -> Arc<Ledger> {
        Arc::new(Ledger::default())
    }

    /// A ledger whose budgets are shared through Postgres leases.
    pub fn new_shared() -> Arc<Ledger> {
        Arc::new(Ledger {
            shared: true,
            ..Ledger::default()
        })
    }

    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Sets (or clears) a team's budget. `spent_in_period` is what the
    /// database holds for the current period, used when the account is new
    /// or its period changed.
    pub fn set_budget(
        &self,
        team: &str,
        budget: Option<Budget>,
        spent_in_period: impl FnOnce(DateTime<Utc>) -> u64,
    ) {
        let Ok(mut accounts) = self.accounts.lock() else {
            return;
        };
        let Some(budget) = budget else {
            accounts.remove(team);
            return;
        };
        let now = Utc::now();
        match accounts.get_mut(team) {
            Some(acc) if acc.budget.period == budget.period => acc.budget = budget,
            _ => {
                let start = budget.period.start(now);
                let reserved = accounts.get(team).map_or(0, |a| a.reserved);
                let (spent, lease) = if self.shared {
                    (0, Some(Lease::default()))
                } else {
                    (spent_in_period(start), None)
                };
                accounts.insert(
                    team.to_string(),
                    Account {
                        budget,
                        period_start: start,
                        period_end: budget.period.next(start),
                        spent,
                        reserved,
                        lease,
                    },
                );
            }
        }
    }

    /// True when the team's account exists for this budget's period kind and
    /// the current period (so its spend needs no reload).
    pub fn is_current(&self, team: &str, budget: Budget) -> bool {
        let now = Utc::now();
        self.accounts
            .lock()
            .map(|a| {
                a.get(team)
                    .is_some_and(|acc| acc.budget.period == budget.period && now < acc.period_end)
            })
            .unwrap_or(false)
    }

    /// True when the team has a budget.
    pub fn has_budget(&self, team: &str) -> bool {
        self.accounts
            .lock()
            .map(|a| a.contains_key(team))
            // A poisoned ledger cannot prove the team is unbudgeted.
            .unwrap_or(true)
    }

    /// Period start of a team's budget, when it has one.
    pub fn period_start(&self, team: &str) -> Option<DateTime<Utc>> {
        self.accounts.lock().ok()?.get(team).map(|a| a.period_start)
    }

    /// Reserves `amount` for a request, or refuses when spent + reserved +
    /// amount would pass the limit. Teams without a budget always pass.
    pub fn reserve(
        self: &Arc<Self>,
        team: &str,
        amount: NanoUsd,
    ) -> Result<Option<Reservation>, OverBudget> {
        let Ok(mut accounts) = self.accounts.lock() else {
            return Ok(None);
        };
        let Some(acc) = accounts.get_mut(team) else {
            return Ok(None);
        };
        acc.roll(Utc::now());
        self.reserve_in(acc, team, amount)
    }

    /// Takes `amount` from an account already rolled to the current period.
    fn reserve_in(
        self: &Arc<Self>,
        acc: &mut Account,
        team: &str,
        amount: NanoUsd,
    ) -> Result<Option<Reservation>, OverBudget> {
        if amount.0 > acc.available() {
            return Err(OverBudget {
                needed: amount,
                remaining: NanoUsd(acc.remaining()),
            });
        }
        acc.reserved += amount.0;
        if let Some(lease) = &mut acc.lease {
            lease.active = true;
        }
        Ok(Some(Reservation {
            ledger: self.clone(),
            team: team.to_string(),
            amount: amount.0,
            remaining: NanoUsd(acc.remaining()),
            period_start: acc.period_start,
        }))
    }

    pub fn status(&self, team: &str) -> Option<BudgetStatus> {
        let mut accounts = self.accounts.lock().ok()?;
        let acc = accounts.get_mut(team)?;
        acc.roll(Utc::now());
        Some(BudgetStatus {
            limit: acc.budget.limit,
            spent: NanoUsd(acc.spent()),
            reserved: NanoUsd(acc.reserved),
            remaining: NanoUsd(acc.remaining()),
        })
    }

    pub fn all(&self) -> Vec<(String, BudgetStatus)> {
        let Ok(mut accounts) = self.accounts.lock() else {
            return Vec::new();
        };
        let now = Utc::now();
        let mut out: Vec<_> = accounts
            .iter_mut()
            .map(|(team, acc)| {
                acc.roll(now);
                (
                    team.clone(),
                    BudgetStatus {
                        limit: acc.budget.limit,
                        spent: NanoUsd(acc.spent()),
                        reserved: NanoUsd(acc.reserved),
                        remaining: NanoUsd(acc.remaining()),
                    },
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Returns what remains of the budget afterwards. A cost reserved in a
    /// period that has since ended does not count against the new one.
    fn release(
        &self,
        team: &str,
        reserved: u64,
        actual: u64,
        period_start: DateTime<Utc>,
    ) -> Option<NanoUsd> {
        let mut accounts = self.accounts.lock().ok()?;
        let acc = accounts.get_mut(team)?;
        acc.reserved = acc.reserved.saturating_sub(reserved);
        acc.roll(Utc::now());
        if acc.period_start == period_start {
            match &mut acc.lease {
                None => acc.spent = acc.spent.saturating_add(actual),
                Some(lease) => lease.unwritten = lease.unwritten.saturating_add(actual),
            }
        }
        Some(NanoUsd(acc.remaining()))
    }
}

/// Money held for one in-flight request. Settling records the actual cost
/// and frees the rest; dropping it unsettled frees it all.
#[derive(Debug)]
pub struct Reservation {
    ledger: Arc<Ledger>,
    team: String,
    amount: u64,
    remaining: NanoUsd,
    period_start: DateTime<Utc>,
}

impl Reservation {
    pub fn amount(&self) -> NanoUsd {
        NanoUsd(self.amount)
    }

    /// The budget left right after this reservation was taken.
    pub fn remaining(&self) -> NanoUsd {
        self.remaining
    }

    /// The shared period key whose lease holds this reservation (Postgres).
    pub fn shared_period(&self) -> Option<String> {
        self.ledger.shared.then(|| period_key(self.period_start))
    }

    /// Records the actual cost, frees the rest; returns the budget left.
    pub fn settle(mut self, actual: NanoUsd) -> Option<NanoUsd> {
        if actual.0 > self.amount {
            tracing::warn!(
                team = %self.team,
                reserved = self.amount,
                actual = actual.0,
                "actual cost exceeded the reservation"
            );
        }
        let remaining = self
            .ledger
            .release(&self.team, self.amount, actual.0, self.period_start);
        self.amount = 0;
        self.team.clear();
        remaining
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.team.is_empty() {
            let _ = self
                .ledger
                .release(&self.team, self.amount, 0, self.period_start);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|d| d.with_timezone(&Utc))
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    #[test]
    fn calendar_periods_in_utc() {
        let now = at("2026-11-26T15:04:05Z"); // a Thursday
        assert_eq!(Period::Daily.start(now), at("2026-11-26T00:00:00Z"));
        assert_eq!(Period::Weekly.start(now), at("2026-11-23T00:00:00Z"));
        assert_eq!(Period::Monthly.start(now), at("2026-11-01T00:00:00Z"));
        assert_eq!(
            Period::Monthly.next(at("2026-12-01T00:00:00Z")),
            at("2027-01-01T00:00:00Z")
        );
        assert!(Period::Total.start(now) < at("1970-01-01T00:00:00Z"));
    }

    #[test]
    fn reservations_never_let_spend_pass_the_limit() {
        let ledger = Ledger::new();
        let budget = Budget {
            limit: NanoUsd(1000),
            period: Period::Total,
        };
        ledger.set_budget("t", Some(budget), |_| 100);
        let a = ledger.reserve("t", NanoUsd(600)).ok().flatten();
        assert!(a.is_some());
        assert_eq!(
            ledger.reserve("t", NanoUsd(301)).err(),
            Some(OverBudget {
                needed: NanoUsd(301),
                remaining: NanoUsd(300)
            })
        );
        assert_eq!(a.as_ref().map(Reservation::remaining), Some(NanoUsd(300)));
        assert_eq!(a.and_then(|a| a.settle(NanoUsd(200))), Some(NanoUsd(700)));
        let s = ledger.status("t");
        assert_eq!(
            s.map(|s| (s.spent, s.reserved, s.remaining)),
            Some((NanoUsd(300), NanoUsd(0), NanoUsd(700)))
        );
        // dropped unsettled: released, nothing spent
        drop(ledger.reserve("t", NanoUsd(700)));
        assert_eq!(ledger.status("t").map(|s| s.remaining), Some(NanoUsd(700)));
        // no budget: always allowed, no reservation
        assert!(matches!(
            ledger.reserve("other", NanoUsd(u64::MAX)),
            Ok(None)
        ));
    }

    #[test]
    fn period_rollover_resets_spend() {
        let ledger = Ledger::new();
        let budget = Budget {
            limit: NanoUsd(1000),
            period: Period::Daily,
        };
        ledger.set_budget("t", Some(budget), |_| 900);
        if let Ok(mut accounts) = ledger.accounts.lock() {
            if let Some(acc) = accounts.get_mut("t") {
                acc.period_start -= chrono::Duration::days(1);
                acc.period_end -= chrono::Duration::days(1);
            }
        }
        assert_eq!(ledger.status("t").map(|s| s.spent), Some(NanoUsd(0)));
    }
}
