//! Rate limits (SPEC 14): requests and tokens per minute of a team or a key
//! (`rpm`, `tpm`), counted in UTC-minute windows.
//!
//! A request takes one request and its token bound (the reservation's: its
//! prompt and its most output) from every limited account that applies, or
//! from none; settling gives back the tokens it did not use. The check is
//! integers under a mutex, never a database round trip per request.
//!
//! On SQLite the counts here are the one authority. On Postgres several
//! replicas share each limit: a replica admits only from slices of the
//! window it was granted in `rate_windows`, where the grants of all
//! replicas never pass the limit. So replicas together never admit more
//! than the limit in a window; what a replica was granted and did not use
//! by the window's end is not admitted by anyone (at most a slice each).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::store::{to_i64, to_u64, PostgresStore, StoreError};

/// A window is one UTC minute.
pub const WINDOW_MS: i64 = 60_000;
/// A replica asks for at least 1/SLICES of a limit at a time.
const SLICES: u64 = 50;

pub use crate::period::{Limits, Unit};

/// One unit's count in the current window.
#[derive(Debug, Default, Clone, Copy)]
struct Meter {
    limit: u64,
    /// Taken by this replica's requests.
    used: u64,
    /// Shared: granted to this replica (`used <= held`, bar settling debt).
    held: u64,
    /// Shared: granted to all replicas, as last seen.
    granted: u64,
}

impl Meter {
    fn available(&self, shared: bool) -> u64 {
        match shared {
            false => self.limit.saturating_sub(self.used),
            true => self.held.saturating_sub(self.used),
        }
    }

    fn remaining(&self, shared: bool) -> u64 {
        match shared {
            false => self.available(false),
            true => self
                .limit
                .saturating_sub(self.granted)
                .saturating_add(self.available(true)),
        }
    }
}

#[derive(Debug)]
struct Account {
    limits: Limits,
    window_ms: i64,
    requests: Meter,
    tokens: Meter,
}

impl Account {
    fn new(limits: Limits) -> Account {
        let mut a = Account {
            limits,
            window_ms: 0,
            requests: Meter::default(),
            tokens: Meter::default(),
        };
        a.set(limits);
        a
    }

    fn set(&mut self, limits: Limits) {
        self.limits = limits;
        self.requests.limit = limits.rpm.unwrap_or(0);
        self.tokens.limit = limits.tpm.unwrap_or(0);
    }

    fn roll(&mut self, window_ms: i64) {
        if window_ms != self.window_ms {
            self.window_ms = window_ms;
            let (rpm, tpm) = (self.requests.limit, self.tokens.limit);
            self.requests = Meter {
                limit: rpm,
                ..Meter::default()
            };
            self.tokens = Meter {
                limit: tpm,
                ..Meter::default()
            };
        }
    }

    fn meter(&mut self, unit: Unit) -> Option<&mut Meter> {
        match unit {
            Unit::Requests if self.limits.rpm.is_some() => Some(&mut self.requests),
            Unit::Tokens if self.limits.tpm.is_some() => Some(&mut self.tokens),
            _ => None,
        }
    }
}

/// Why a request was not admitted: the first limit without room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub account: String,
    pub unit: Unit,
    pub limit: u64,
    /// Until the window ends.
    pub retry_after: Duration,
}

/// Why a shared admission failed.
#[derive(Debug)]
pub enum RateRefusal {
    Limited(Limited),
    /// The shared counts could not be read (database down): fail closed.
    Unavailable,
}

/// What the `x-ratelimit-*` headers say: the tightest limit of each unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateView {
    pub requests: Option<(u64, u64)>,
    pub tokens: Option<(u64, u64)>,
    pub reset: Duration,
}

#[derive(Default)]
pub struct RateLimiter {
    accounts: Mutex<HashMap<String, Account>>,
    shared: bool,
    /// One grant request to the database at a time.
    acquiring: tokio::sync::Mutex<()>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn window_of(ms: i64) -> i64 {
    ms - ms.rem_euclid(WINDOW_MS)
}

fn until_end(window_ms: i64, now: i64) -> Duration {
    Duration::from_millis(u64::try_from(window_ms + WINDOW_MS - now).unwrap_or(0))
}

impl RateLimiter {
    pub fn new(shared: bool) -> Arc<RateLimiter> {
        Arc::new(RateLimiter {
            shared,
            ..RateLimiter::default()
        })
    }

    /// Sets (`None` or no unit: clears) an account's limits.
    pub fn set(&self, account: &str, limits: Option<Limits>) {
        let Ok(mut all) = self.accounts.lock() else {
            return;
        };
        match limits.filter(|l| l.rpm.is_some() || l.tpm.is_some()) {
            None => {
                all.remove(account);
            }
            Some(l) => match all.get_mut(account) {
                Some(a) => a.set(l),
                None => {
                    all.insert(account.to_string(), Account::new(l));
                }
            },
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.accounts
            .lock()
            .map(|a| a.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The limited accounts of a request of `team` with key `key_id`, and
    /// whether any limits tokens (no allocation when nothing is limited).
    pub fn applying(&self, team: &str, key_id: Option<&str>) -> (Vec<String>, bool) {
        let Ok(all) = self.accounts.lock() else {
            return (Vec::new(), false);
        };
        if all.is_empty() {
            return (Vec::new(), false);
        }
        let key = key_id.map(|id| crate::budget::account(crate::budget::Level::Key, id));
        let mut tokens = false;
        let out = [Some(team.to_string()), key]
            .into_iter()
            .flatten()
            .filter(|a| match all.get(a) {
                Some(acc) => {
                    tokens |= acc.limits.tpm.is_some();
                    true
                }
                None => false,
            })
            .collect();
        (out, tokens)
    }

    /// Takes one request and `tokens` from every limit of `accounts`, or
    /// nothing when one has no room.
    pub fn admit(self: &Arc<Self>, accounts: &[String], tokens: u64) -> Result<RateHold, Limited> {
        let now = now_ms();
        let window = window_of(now);
        let Ok(mut all) = self.accounts.lock() else {
            return Ok(self.hold(window, Vec::new()));
        };
        let mut taken = Vec::new();
        for name in accounts {
            let Some(acc) = all.get_mut(name) else {
                continue;
            };
            acc.roll(window);
            for (unit, n) in [(Unit::Requests, 1), (Unit::Tokens, tokens)] {
                if let Some(m) = acc.meter(unit) {
                    if n > m.available(self.shared) {
                        return Err(Limited {
                            account: name.clone(),
                            unit,
                            limit: m.limit,
                            retry_after: until_end(window, now),
                        });
                    }
                }
            }
            taken.push(name.clone());
        }
        for name in &taken {
            if let Some(acc) = all.get_mut(name) {
                if let Some(m) = acc.meter(Unit::Requests) {
                    m.used += 1;
                }
                if let Some(m) = acc.meter(Unit::Tokens) {
                    m.used += tokens;
                }
            }
        }
        let parts = taken.into_iter().map(|a| (a, tokens)).collect();
        Ok(self.hold(window, parts))
    }

    fn hold(self: &Arc<Self>, window_ms: i64, parts: Vec<(String, u64)>) -> RateHold {
        RateHold {
            limiter: self.clone(),
            window_ms,
            parts,
        }
    }

    /// `admit`, taking more of the window from Postgres for each limit this
    /// replica holds too little of (at most `timeout` waiting).
    pub async fn admit_shared(
        self: &Arc<Self>,
        store: &PostgresStore,
        accounts: &[String],
        tokens: u64,
        timeout: Duration,
    ) -> Result<RateHold, RateRefusal> {
        let first = self.admit(accounts, tokens);
        if first.is_ok() || !self.shared {
            return first.map_err(RateRefusal::Limited);
        }
        match tokio::time::timeout(timeout, self.grant_and_admit(store, accounts, tokens)).await {
            Ok(result) => result,
            Err(_) => {
                tracing::error!("the database did not grant a rate-limit slice in time; refusing");
                Err(RateRefusal::Unavailable)
            }
        }
    }

    async fn grant_and_admit(
        self: &Arc<Self>,
        store: &PostgresStore,
        accounts: &[String],
        tokens: u64,
    ) -> Result<RateHold, RateRefusal> {
        let _one_at_a_time = self.acquiring.lock().await;
        let mut asked: Vec<(String, Unit)> = Vec::new();
        loop {
            let short = match self.admit(accounts, tokens) {
                Ok(hold) => return Ok(hold),
                Err(short) => short,
            };
            if asked.contains(&(short.account.clone(), short.unit)) {
                return Err(RateRefusal::Limited(short));
            }
            asked.push((short.account.clone(), short.unit));
            let need_n = match short.unit {
                Unit::Requests => 1,
                Unit::Tokens => tokens,
            };
            let (window, need) = {
                let Ok(mut all) = self.accounts.lock() else {
                    return Err(RateRefusal::Unavailable);
                };
                let Some(acc) = all.get_mut(&short.account) else {
                    continue;
                };
                let window = acc.window_ms;
                let Some(m) = acc.meter(short.unit) else {
                    continue;
                };
                (window, need_n.saturating_sub(m.available(true)))
            };
            let want = need.max(short.limit / SLICES);
            let grant = grant(store, &short.account, window, short.unit, short.limit, need, want)
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, limit = %short.account, "could not take a rate-limit slice; refusing");
                    RateRefusal::Unavailable
                })?;
            if let Ok(mut all) = self.accounts.lock() {
                if let Some(acc) = all.get_mut(&short.account) {
                    if acc.window_ms == window {
                        if let Some(m) = acc.meter(short.unit) {
                            m.held += grant.0;
                            m.granted = grant.1;
                        }
                    }
                }
            }
            if grant.0 == 0 {
                return Err(RateRefusal::Limited(short));
            }
        }
    }

    /// The headers' figures for `accounts` (`None` when none is limited).
    pub fn view(&self, accounts: &[String]) -> Option<RateView> {
        let mut all = self.accounts.lock().ok()?;
        let now = now_ms();
        let window = window_of(now);
        let mut view = RateView {
            reset: until_end(window, now),
            ..RateView::default()
        };
        let mut any = false;
        for name in accounts {
            let Some(acc) = all.get_mut(name) else {
                continue;
            };
            any = true;
            acc.roll(window);
            for unit in [Unit::Requests, Unit::Tokens] {
                let Some(m) = acc.meter(unit) else {
                    continue;
                };
                let seen = (m.limit, m.remaining(self.shared));
                let slot = match unit {
                    Unit::Requests => &mut view.requests,
                    Unit::Tokens => &mut view.tokens,
                };
                if slot.is_none_or(|(_, r)| seen.1 < r) {
                    *slot = Some(seen);
                }
            }
        }
        any.then_some(view)
    }

    /// Tokens a request did not use go back to its window (or, when it used
    /// more than it was admitted for, are counted).
    fn settle(&self, window_ms: i64, parts: &[(String, u64)], actual: u64) {
        let Ok(mut all) = self.accounts.lock() else {
            return;
        };
        for (name, taken) in parts {
            let Some(acc) = all.get_mut(name) else {
                continue;
            };
            if acc.window_ms != window_ms {
                continue;
            }
            if let Some(m) = acc.meter(Unit::Tokens) {
                m.used = m.used.saturating_sub(*taken).saturating_add(actual);
            }
        }
    }
}

/// A duration as OpenAI's `x-ratelimit-reset-*` spell it: `20ms`, `12.5s`, `1m0s`.
pub fn reset_text(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => {
            let text = format!("{}.{:03}", ms / 1000, ms % 1000);
            format!("{}s", text.trim_end_matches('0').trim_end_matches('.'))
        }
        _ => format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

/// A request's place in its window's limits; settling corrects its tokens.
#[derive(Debug)]
pub struct RateHold {
    limiter: Arc<RateLimiter>,
    window_ms: i64,
    parts: Vec<(String, u64)>,
}

impl RateHold {
    /// Counts `actual` tokens instead of the bound admitted.
    pub fn settle(mut self, actual: u64) {
        let parts = std::mem::take(&mut self.parts);
        self.limiter.settle(self.window_ms, &parts, actual);
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }
}

impl Drop for RateHold {
    /// Unsettled (refused later, or nothing was read): no tokens used; the
    /// request still counts.
    fn drop(&mut self) {
        if !self.parts.is_empty() {
            self.limiter.settle(self.window_ms, &self.parts, 0);
        }
    }
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("shared", &self.shared)
            .finish()
    }
}

/// Grants this replica up to `want` (at least `need`, else nothing) of
/// `unit` in window `window_ms` of `account`, under a row lock on
/// `rate_windows`; (granted, granted to all replicas now).
async fn grant(
    db: &PostgresStore,
    account: &str,
    window_ms: i64,
    unit: Unit,
    limit: u64,
    need: u64,
    want: u64,
) -> Result<(u64, u64), StoreError> {
    let mut tx = db.pool().begin().await?;
    sqlx::query(
        "INSERT INTO rate_windows (account, window_ms, requests, tokens) VALUES ($1, $2, 0, 0) \
         ON CONFLICT (account, window_ms) DO NOTHING",
    )
    .bind(account)
    .bind(window_ms)
    .execute(&mut *tx)
    .await?;
    let column = unit.as_str();
    let sql = format!(
        "SELECT {column} FROM rate_windows WHERE account = $1 AND window_ms = $2 FOR UPDATE"
    );
    let granted: i64 = sqlx::query_scalar(&sql)
        .bind(account)
        .bind(window_ms)
        .fetch_one(&mut *tx)
        .await?;
    let granted = to_u64(granted);
    let free = limit.saturating_sub(granted);
    let give = if need > free { 0 } else { want.min(free) };
    if give > 0 {
        let sql = format!(
            "UPDATE rate_windows SET {column} = {column} + $3 WHERE account = $1 AND window_ms = $2"
        );
        sqlx::query(&sql)
            .bind(account)
            .bind(window_ms)
            .bind(to_i64(give))
            .execute(&mut *tx)
            .await?;
    }
    // Windows over ten minutes old are no one's any more.
    sqlx::query("DELETE FROM rate_windows WHERE account = $1 AND window_ms < $2")
        .bind(account)
        .bind(window_ms - 10 * WINDOW_MS)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((give, granted + give))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_request_takes_from_every_limit_or_none_and_settles_its_tokens() {
        let limiter = RateLimiter::new(false);
        limiter.set(
            "t",
            Some(Limits {
                rpm: Some(3),
                tpm: Some(1_000),
            }),
        );
        limiter.set(
            "key:k",
            Some(Limits {
                rpm: Some(2),
                tpm: None,
            }),
        );
        let both = names(&["t", "key:k"]);
        let a = limiter.admit(&both, 600);
        assert!(a.is_ok());
        // 400 tokens left on the team: refused, and nothing taken.
        let over = limiter.admit(&both, 500).err();
        assert_eq!(
            over.as_ref().map(|l| (l.account.as_str(), l.unit)),
            Some(("t", Unit::Tokens))
        );
        assert!(over.is_some_and(|l| l.retry_after <= Duration::from_secs(60)));
        // The first used 100 of its 600: 900 left.
        if let Ok(a) = a {
            a.settle(100);
        }
        let view = limiter.view(&both);
        assert_eq!(view.map(|v| v.tokens), Some(Some((1_000, 900))));
        // The key's rpm is the tighter: 1 left of 2.
        assert_eq!(view.map(|v| v.requests), Some(Some((2, 1))));
        let b = limiter.admit(&both, 500);
        assert!(b.is_ok());
        let refused = limiter.admit(&both, 1).err();
        assert_eq!(
            refused.map(|l| (l.account, l.unit, l.limit)),
            Some(("key:k".to_string(), Unit::Requests, 2))
        );
        // Without the key, the team still has one request.
        assert!(limiter.admit(&names(&["t"]), 1).is_ok());
        assert!(limiter.admit(&names(&["t"]), 1).is_err());
        limiter.set("t", None);
        assert_eq!(limiter.applying("t", Some("k")), (names(&["key:k"]), false));
    }

    #[test]
    fn resets_are_spelled_as_openai_does() {
        let t = |ms| reset_text(Duration::from_millis(ms));
        assert_eq!(
            [t(20), t(1_000), t(12_500), t(59_999), t(60_000)],
            ["20ms", "1s", "12.5s", "59.999s", "1m0s"]
        );
    }

    #[test]
    fn windows_are_utc_minutes() {
        assert_eq!(window_of(1_800_000_059_999), 1_800_000_000_000);
        assert_eq!(window_of(1_800_000_060_000), 1_800_000_060_000);
        assert_eq!(
            until_end(1_800_000_000_000, 1_800_000_045_500),
            Duration::from_millis(14_500)
        );
    }
}
