//! Budgets (SPEC 5 and 14): periods, reservations before forwarding,
//! settlement after. A budget belongs to an account: a team (its own name),
//! a key, an end user within a team or a tag (`account`); a request is
//! reserved from every account that applies to it at once, or from none.
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

pub use crate::period::{
    account, accounts_of, end_user_account, level_of, Budget, BudgetStatus, Level, Period,
};

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
    /// A request was refused for this budget in this period (alerts).
    refused: bool,
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
            self.refused = false;
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The budget has no room for it.
    Over(OverBudget),
    /// The shared budget could not be read or leased (database down).
    Unavailable,
}

/// Why a reservation was refused: the first account without room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverBudget {
    pub needed: NanoUsd,
    pub remaining: NanoUsd,
    pub account: String,
}

impl OverBudget {
    /// The refused budget's level and its name there.
    pub fn level(&self) -> (Level, &str) {
        level_of(&self.account)
    }
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
                        refused: false,
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

    /// True when any of `accounts` has a budget.
    pub fn has_any(&self, accounts: &[String]) -> bool {
        self.accounts
            .lock()
            .map(|a| !a.is_empty() && accounts.iter().any(|n| a.contains_key(n)))
            .unwrap_or(true)
    }

    /// The least budget left among `accounts` (`None`: none has a budget).
    pub fn remaining_of(&self, accounts: &[String]) -> Option<NanoUsd> {
        let mut all = self.accounts.lock().ok()?;
        let now = Utc::now();
        accounts
            .iter()
            .filter_map(|n| {
                let acc = all.get_mut(n)?;
                acc.roll(now);
                Some(acc.remaining())
            })
            .min()
            .map(NanoUsd)
    }

    /// The first of `accounts` with nothing left, as a refusal of 1 nano-USD.
    pub fn exhausted(&self, accounts: &[String]) -> Option<OverBudget> {
        let mut all = self.accounts.lock().ok()?;
        let now = Utc::now();
        accounts.iter().find_map(|n| {
            let acc = all.get_mut(n)?;
            acc.roll(now);
            (acc.remaining() == 0).then(|| OverBudget {
                needed: NanoUsd(1),
                remaining: NanoUsd(0),
                account: n.clone(),
            })
        })
    }

    /// Every budget's state for alerts: (account, period, period key,
    /// limit, recorded spend, refused a request this period).
    pub fn alert_view(&self) -> Vec<(String, Period, String, u64, u64, bool)> {
        let Ok(mut all) = self.accounts.lock() else {
            return Vec::new();
        };
        let now = Utc::now();
        all.iter_mut()
            .map(|(name, acc)| {
                acc.roll(now);
                (
                    name.clone(),
                    acc.budget.period,
                    period_key(acc.period_start),
                    acc.budget.limit.0,
                    acc.spent(),
                    acc.refused,
                )
            })
            .collect()
    }

    /// The accounts with a budget.
    pub fn names(&self) -> Vec<String> {
        self.accounts
            .lock()
            .map(|a| a.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Period start of a team's budget, when it has one.
    pub fn period_start(&self, team: &str) -> Option<DateTime<Utc>> {
        self.accounts.lock().ok()?.get(team).map(|a| a.period_start)
    }

    /// Reserves `amount` from every one of `accounts` that has a budget,
    /// or from none when one of them has no room for it (spent + reserved
    /// + amount would pass its limit). Without any budget: `Ok(None)`.
    pub fn reserve(
        self: &Arc<Self>,
        accounts: &[String],
        amount: NanoUsd,
    ) -> Result<Option<Reservation>, OverBudget> {
        let Ok(mut all) = self.accounts.lock() else {
            return Ok(None);
        };
        self.reserve_in(&mut all, accounts, amount)
    }

    /// `reserve` with the ledger's lock held.
    fn reserve_in(
        self: &Arc<Self>,
        all: &mut HashMap<String, Account>,
        accounts: &[String],
        amount: NanoUsd,
    ) -> Result<Option<Reservation>, OverBudget> {
        let now = Utc::now();
        let mut parts = Vec::new();
        for name in accounts {
            let Some(acc) = all.get_mut(name) else {
                continue;
            };
            acc.roll(now);
            if amount.0 > acc.available() {
                // Reached, for alerts: refused with under a tenth left (a
                // request far bigger than a half-spent budget is not that).
                let left = acc.remaining();
                acc.refused |= left < amount.0 && left <= acc.budget.limit.0 / 10;
                return Err(OverBudget {
                    needed: amount,
                    remaining: NanoUsd(acc.remaining()),
                    account: name.clone(),
                });
            }
            parts.push(Part {
                account: name.clone(),
                period_start: acc.period_start,
            });
        }
        if parts.is_empty() {
            return Ok(None);
        }
        let mut remaining = u64::MAX;
        for part in &parts {
            if let Some(acc) = all.get_mut(&part.account) {
                acc.reserved += amount.0;
                if let Some(lease) = &mut acc.lease {
                    lease.active = true;
                }
                remaining = remaining.min(acc.remaining());
            }
        }
        Ok(Some(Reservation {
            ledger: self.clone(),
            parts,
            amount: amount.0,
            remaining: NanoUsd(remaining),
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

    /// Frees `reserved` in every part's budget and records `actual` there;
    /// returns the least budget left afterwards. A cost reserved in a period
    /// that has since ended does not count against the new one.
    fn release(&self, parts: &[Part], reserved: u64, actual: u64) -> Option<NanoUsd> {
        let mut accounts = self.accounts.lock().ok()?;
        let now = Utc::now();
        let mut least = None;
        for part in parts {
            let Some(acc) = accounts.get_mut(&part.account) else {
                continue;
            };
            acc.reserved = acc.reserved.saturating_sub(reserved);
            acc.roll(now);
            if acc.period_start == part.period_start {
                match &mut acc.lease {
                    None => acc.spent = acc.spent.saturating_add(actual),
                    Some(lease) => lease.unwritten = lease.unwritten.saturating_add(actual),
                }
            }
            let left = acc.remaining();
            least = Some(least.map_or(left, |l: u64| l.min(left)));
        }
        least.map(NanoUsd)
    }
}

/// One budget a reservation holds money in.
#[derive(Debug)]
struct Part {
    account: String,
    period_start: DateTime<Utc>,
}

/// Money held for one in-flight request, in every budget that applies.
/// Settling records the actual cost in each and frees the rest; dropping it
/// unsettled frees it all.
#[derive(Debug)]
pub struct Reservation {
    ledger: Arc<Ledger>,
    parts: Vec<Part>,
    amount: u64,
    remaining: NanoUsd,
}

impl Reservation {
    pub fn amount(&self) -> NanoUsd {
        NanoUsd(self.amount)
    }

    /// The least budget left among those held, right after this
    /// reservation was taken.
    pub fn remaining(&self) -> NanoUsd {
        self.remaining
    }

    /// The shared (account, period key) pairs whose leases hold this
    /// reservation (Postgres).
    pub fn shared_periods(&self) -> Vec<(String, String)> {
        match self.ledger.shared {
            true => self
                .parts
                .iter()
                .map(|p| (p.account.clone(), period_key(p.period_start)))
                .collect(),
            false => Vec::new(),
        }
    }

    /// Records the actual cost, frees the rest; returns the least budget
    /// left among those held.
    pub fn settle(mut self, actual: NanoUsd) -> Option<NanoUsd> {
        if actual.0 > self.amount {
            tracing::warn!(
                budgets = ?self.parts.iter().map(|p| &p.account).collect::<Vec<_>>(),
                reserved = self.amount,
                actual = actual.0,
                "actual cost exceeded the reservation"
            );
        }
        let parts = std::mem::take(&mut self.parts);
        self.ledger.release(&parts, self.amount, actual.0)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.parts.is_empty() {
            let _ = self.ledger.release(&self.parts, self.amount, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> [String; 1] {
        ["t".to_string()]
    }

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
        let a = ledger.reserve(&t(), NanoUsd(600)).ok().flatten();
        assert!(a.is_some());
        assert_eq!(
            ledger.reserve(&t(), NanoUsd(301)).err(),
            Some(OverBudget {
                needed: NanoUsd(301),
                remaining: NanoUsd(300),
                account: "t".into(),
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
        drop(ledger.reserve(&t(), NanoUsd(700)));
        assert_eq!(ledger.status("t").map(|s| s.remaining), Some(NanoUsd(700)));
        // no budget: always allowed, no reservation
        assert!(matches!(
            ledger.reserve(&["other".to_string()], NanoUsd(u64::MAX)),
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

    #[test]
    fn a_request_fits_every_budget_that_applies_or_takes_from_none() {
        let ledger = Ledger::new();
        let budget = |limit| Budget {
            limit: NanoUsd(limit),
            period: Period::Total,
        };
        let accounts = accounts_of("acme", Some("k1"), Some("alice"), &["prod".into()]);
        assert_eq!(
            accounts,
            ["acme", "key:k1", "user:acme:alice", "tag:prod"].map(String::from)
        );
        ledger.set_budget("acme", Some(budget(1_000)), |_| 0);
        ledger.set_budget("key:k1", Some(budget(500)), |_| 0);
        ledger.set_budget("user:acme:alice", Some(budget(300)), |_| 100);
        // No budget on the tag: skipped.
        let a = ledger.reserve(&accounts, NanoUsd(150)).ok().flatten();
        assert_eq!(a.as_ref().map(Reservation::remaining), Some(NanoUsd(50)));
        let refused = ledger.reserve(&accounts, NanoUsd(60)).err();
        assert_eq!(
            refused.as_ref().map(OverBudget::level),
            Some((Level::EndUser, "acme:alice"))
        );
        // Refused: nothing held anywhere.
        assert_eq!(
            ledger.status("acme").map(|s| s.reserved),
            Some(NanoUsd(150))
        );
        assert_eq!(
            ledger.status("key:k1").map(|s| s.reserved),
            Some(NanoUsd(150))
        );
        assert_eq!(a.and_then(|a| a.settle(NanoUsd(40))), Some(NanoUsd(160)));
        let spent = |n: &str| ledger.status(n).map(|s| (s.spent, s.reserved));
        assert_eq!(spent("acme"), Some((NanoUsd(40), NanoUsd(0))));
        assert_eq!(spent("key:k1"), Some((NanoUsd(40), NanoUsd(0))));
        assert_eq!(spent("user:acme:alice"), Some((NanoUsd(140), NanoUsd(0))));
        // Without the end user, the key's budget is the tightest.
        assert_eq!(
            ledger
                .reserve(&accounts_of("acme", Some("k1"), None, &[]), NanoUsd(461))
                .err()
                .map(|o| o.account),
            Some("key:k1".to_string())
        );
        assert_eq!(level_of("tag:prod"), (Level::Tag, "prod"));
        assert_eq!(level_of("acme"), (Level::Team, "acme"));
    }
}
