//! Budget periods, a budget as configured (a limit per period) and a
//! budget's state as shown (`BudgetStatus`), the accounts budgets and rate
//! limits are kept under (`Level`, `account`), rate limits as set
//! (`Limits`, `Unit`): plain data the store keeps, the ledger and the
//! limiter enforce and the metrics publish. Below all of them, so none has
//! to reach up into another for its types.

use chrono::{DateTime, Datelike, Duration, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::pricing::NanoUsd;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Daily,
    Weekly,
    Monthly,
    Total,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Total => "total",
        }
    }

    pub fn parse(s: &str) -> Option<Period> {
        match s {
            "daily" => Some(Period::Daily),
            "weekly" => Some(Period::Weekly),
            "monthly" => Some(Period::Monthly),
            "total" => Some(Period::Total),
            _ => None,
        }
    }

    /// Start of the calendar period (UTC) containing `now`; weeks start Monday.
    pub fn start(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let midnight = |y, m, d| {
            Utc.with_ymd_and_hms(y, m, d, 0, 0, 0)
                .single()
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
        };
        let day = midnight(now.year(), now.month(), now.day());
        match self {
            Period::Daily => day,
            Period::Weekly => day - Duration::days(i64::from(now.weekday().num_days_from_monday())),
            Period::Monthly => midnight(now.year(), now.month(), 1),
            Period::Total => DateTime::<Utc>::MIN_UTC,
        }
    }

    /// Start of the next period after the one starting at `start`.
    pub fn next(self, start: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Period::Daily => start + Duration::days(1),
            Period::Weekly => start + Duration::days(7),
            Period::Monthly => {
                let (y, m) = if start.month() == 12 {
                    (start.year() + 1, 1)
                } else {
                    (start.year(), start.month() + 1)
                };
                Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
                    .single()
                    .unwrap_or(DateTime::<Utc>::MAX_UTC)
            }
            Period::Total => DateTime::<Utc>::MAX_UTC,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub limit: NanoUsd,
    pub period: Period,
}

/// A snapshot for gauges and headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetStatus {
    pub limit: NanoUsd,
    pub spent: NanoUsd,
    pub reserved: NanoUsd,
    pub remaining: NanoUsd,
}

/// An account's rate limits as set (`None`: not limited in that unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens per minute (prompt and output).
    pub tpm: Option<u64>,
}

/// The level a budget is set at (`error.param` of a refusal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    Team,
    Key,
    EndUser,
    Tag,
}

impl Level {
    pub const ALL: [Level; 4] = [Level::Team, Level::Key, Level::EndUser, Level::Tag];

    /// The name in errors, metrics and the API: `team`, `key`, `end_user`, `tag`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Team => "team",
            Level::Key => "key",
            Level::EndUser => "end_user",
            Level::Tag => "tag",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Level::Team => "",
            Level::Key => "key:",
            Level::EndUser => "user:",
            Level::Tag => "tag:",
        }
    }
}

/// The account a budget is kept under, in the ledger and the shared tables:
/// a team's own name (team names have no ':'), `key:ID`, `user:TEAM:USER`
/// or `tag:TAG`.
pub fn account(level: Level, name: &str) -> String {
    let prefix = level.prefix();
    let mut a = String::with_capacity(prefix.len() + name.len());
    a.push_str(prefix);
    a.push_str(name);
    a
}

/// An end user's account within `team`.
pub fn end_user_account(team: &str, user: &str) -> String {
    format!("user:{team}:{user}")
}

/// The level of an account and its name there (`TEAM:USER` for an end user).
pub fn level_of(account: &str) -> (Level, &str) {
    for level in [Level::Key, Level::EndUser, Level::Tag] {
        if let Some(name) = account.strip_prefix(level.prefix()) {
            return (level, name);
        }
    }
    (Level::Team, account)
}

/// The accounts a request is reserved from: its team's and, where they
/// may have budgets, its key's, its end user's and its tags'. The ledger
/// skips those without one.
pub fn accounts_of(
    team: &str,
    key_id: Option<&str>,
    end_user: Option<&str>,
    tags: &[String],
) -> Vec<String> {
    let mut out = Vec::with_capacity(2 + tags.len());
    out.push(team.to_string());
    if let Some(id) = key_id {
        out.push(account(Level::Key, id));
    }
    if let Some(user) = end_user {
        out.push(end_user_account(team, user));
    }
    out.extend(tags.iter().map(|t| account(Level::Tag, t)));
    out
}

/// Requests or tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Requests,
    Tokens,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Requests => "requests",
            Unit::Tokens => "tokens",
        }
    }
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
