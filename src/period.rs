//! Budget periods, a budget as configured (a limit per period) and a
//! budget's state as shown (`BudgetStatus`): plain data the store keeps,
//! the ledger enforces and the metrics publish. Below all three, so none
//! has to reach up into another for its types.

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
