//! `usage_daily` (SPEC 15): the usage rows summed per UTC day and hour,
//! team, key, model, provider, endpoint and tier. The writer adds the rows
//! it inserts in the same transaction (`Rollup::of` then an upsert), rows
//! already stored (a spool replay) excluded, so the table always equals
//! the rows. Reports read it (`Store::report`): whole hours from here, the
//! part of an hour before them from the rows, so a report since any instant
//! is exact and costs per hour, not per row.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, NaiveDate, Timelike, Utc};
use sqlx::Row;

use super::queries::on_db;
use super::{to_u64, ReportBy, ReportRow, Store, StoreError, UsageRecord};
use crate::pricing::Line;
use crate::usage::meter::Meter;

/// Sums per rollup row besides the meters and lines.
const TOTALS: [&str; 7] = [
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "tool_calls",
    "cost_nano_usd",
];

/// How many sums a rollup row has: the totals, a count per meter (`m_`),
/// nano-USD per cost line (`c_`) and rows with that line (`n_`).
const SUMS: usize = TOTALS.len() + Meter::COUNT + 2 * Line::COUNT;

/// Where each group of sums starts in `Sums`.
const METERS_AT: usize = TOTALS.len();
const COSTS_AT: usize = METERS_AT + Meter::COUNT;
const COUNTS_AT: usize = COSTS_AT + Line::COUNT;

/// The sums' column names, in `Sums` order.
fn sum_columns() -> impl Iterator<Item = String> {
    let totals = TOTALS.iter().map(|t| t.to_string());
    let meters = Meter::ALL.iter().map(|m| format!("m_{}", m.name()));
    let costs = Line::ALL.iter().map(|l| format!("c_{}", l.name()));
    let counts = Line::ALL.iter().map(|l| format!("n_{}", l.name()));
    totals.chain(meters).chain(costs).chain(counts)
}

const KEY_COLUMNS: &str = "day, hour, team, key_id, model, provider, endpoint, service_tier";

/// One rollup row's key. Ordered, so every writer updates a batch's rollup
/// rows in the same order (two Postgres replicas never deadlock on them).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Key<'a> {
    day: NaiveDate,
    hour: u32,
    team: &'a str,
    key_id: &'a str,
    model: &'a str,
    provider: &'a str,
    endpoint: &'a str,
    tier: &'a str,
}

impl Key<'_> {
    /// The `day` column: `YYYY-MM-DD`.
    fn day_text(&self) -> String {
        self.day.format("%Y-%m-%d").to_string()
    }
}

/// A rollup row's sums, in `sum_columns` order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sums([u64; SUMS]);

impl Sums {
    fn add(&mut self, r: &UsageRecord) {
        let s = &mut self.0;
        let totals = [
            1,
            u64::from(r.status >= 400),
            r.prompt_tokens,
            r.completion_tokens,
            r.cached_tokens,
            r.tool_calls,
            r.cost_nano_usd,
        ];
        for (i, v) in totals.into_iter().enumerate() {
            s[i] += v;
        }
        for (i, v) in r.meters.tokens.iter().enumerate() {
            s[METERS_AT + i] += v;
        }
        for (i, v) in r.cost_breakdown.0.iter().enumerate() {
            s[COSTS_AT + i] += v;
            s[COUNTS_AT + i] += u64::from(*v > 0);
        }
    }
}

/// What a batch of inserted rows adds to `usage_daily`.
pub(crate) struct Rollup<'a>(BTreeMap<Key<'a>, Sums>);

impl<'a> Rollup<'a> {
    pub(crate) fn of(rows: impl IntoIterator<Item = &'a UsageRecord>) -> Rollup<'a> {
        let mut sums = BTreeMap::new();
        for r in rows {
            let key = Key {
                day: r.created_at.date_naive(),
                hour: r.created_at.hour(),
                team: &r.team,
                key_id: r.key_id.as_deref().unwrap_or(""),
                model: &r.model,
                provider: r.provider,
                endpoint: r.endpoint,
                tier: r.service_tier.unwrap_or(""),
            };
            sums.entry(key).or_insert(Sums([0; SUMS])).add(r);
        }
        Rollup(sums)
    }

    /// SQLite: adds the sums to `usage_daily`, in key order, inside the
    /// caller's transaction: statements of `STATEMENT_ROWS` rollup rows (a
    /// batch of 512 requests of 200 keys each in its own hour makes 400
    /// rollup rows: 256 + 128 + 16, three statements). Postgres takes
    /// `upsert_postgres`.
    pub(crate) async fn upsert_sqlite(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    ) -> Result<(), sqlx::Error> {
        let rows: Vec<(&Key, &Sums)> = self.0.iter().collect();
        let mut rest = rows.as_slice();
        while let Some(i) = STATEMENT_ROWS.iter().position(|&n| n <= rest.len()) {
            let (chunk, next) = rest.split_at(STATEMENT_ROWS[i]);
            rest = next;
            let mut q = sqlx::query(&UPSERT_SQL[i]);
            for (key, sums) in chunk {
                q = q
                    .bind(key.day_text())
                    .bind(i16::try_from(key.hour).unwrap_or(0))
                    .bind(key.team)
                    .bind(key.key_id)
                    .bind(key.model)
                    .bind(key.provider)
                    .bind(key.endpoint)
                    .bind(key.tier);
                for v in sums.0 {
                    q = q.bind(super::to_i64(v));
                }
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }
}

impl Rollup<'_> {
    /// `upsert` on Postgres: one statement whatever the batch, its rows as
    /// one array per column (`UNNEST`), so the server neither parses
    /// thousands of parameters nor plans a `VALUES` list per batch. Arrays
    /// keep their order: the rollup rows are locked in key order.
    pub(crate) async fn upsert_postgres(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    ) -> Result<(), sqlx::Error> {
        if self.0.is_empty() {
            return Ok(());
        }
        let n = self.0.len();
        let (mut day, mut hour) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut text: [Vec<&str>; 6] = Default::default();
        let mut sums: Vec<Vec<i64>> = (0..SUMS).map(|_| Vec::with_capacity(n)).collect();
        for (key, row) in &self.0 {
            day.push(key.day_text());
            hour.push(i16::try_from(key.hour).unwrap_or(0));
            let texts = [
                key.team,
                key.key_id,
                key.model,
                key.provider,
                key.endpoint,
                key.tier,
            ];
            for (column, value) in text.iter_mut().zip(texts) {
                column.push(value);
            }
            for (column, v) in sums.iter_mut().zip(row.0) {
                column.push(super::to_i64(v));
            }
        }
        let mut q = sqlx::query(&UPSERT_UNNEST).bind(day).bind(hour);
        for column in text {
            q = q.bind(column);
        }
        for column in sums {
            q = q.bind(column);
        }
        q.execute(&mut **tx).await?;
        Ok(())
    }
}

/// Postgres' one upsert text (`upsert_postgres`).
static UPSERT_UNNEST: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let sums: Vec<String> = sum_columns().collect();
    let arrays: Vec<String> = [
        "text", "int2", "text", "text", "text", "text", "text", "text",
    ]
    .iter()
    .map(|t| t.to_string())
    .chain(sums.iter().map(|_| "int8".to_string()))
    .enumerate()
    .map(|(i, t)| format!("${}::{t}[]", i + 1))
    .collect();
    format!(
        "INSERT INTO usage_daily ({KEY_COLUMNS}, {}) SELECT * FROM UNNEST({}) {}",
        sums.join(", "),
        arrays.join(", "),
        add_on_conflict(&sums)
    )
});

/// Rollup rows per upsert statement, largest first; each size has one SQL
/// text, prepared once (256 rows bind 15,616 values: under both databases'
/// limits).
const STATEMENT_ROWS: [usize; 9] = [256, 128, 64, 32, 16, 8, 4, 2, 1];

/// Rollup rows added: inserted, or summed into the row of their key; one
/// text per `STATEMENT_ROWS` size. Positional `?`: SQLite looks `$n`
/// parameters up by name, each bind a scan of them all.
static UPSERT_SQL: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
    let sums: Vec<String> = sum_columns().collect();
    let row = format!("({})", vec!["?"; 8 + sums.len()].join(", "));
    STATEMENT_ROWS
        .iter()
        .map(|&n| {
            format!(
                "INSERT INTO usage_daily ({KEY_COLUMNS}, {}) VALUES {} {}",
                sums.join(", "),
                vec![row.as_str(); n].join(", "),
                add_on_conflict(&sums)
            )
        })
        .collect()
});

/// A rollup row already there gets the new sums added to its own.
fn add_on_conflict(sums: &[String]) -> String {
    let add: Vec<String> = sums
        .iter()
        .map(|c| format!("{c} = usage_daily.{c} + excluded.{c}"))
        .collect();
    format!(
        "ON CONFLICT ({KEY_COLUMNS}) DO UPDATE SET {}",
        add.join(", ")
    )
}

/// The first whole hour at or after `t`.
fn hour_at_or_after(t: DateTime<Utc>) -> DateTime<Utc> {
    let floor = t
        .with_minute(0)
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_nanosecond(0))
        .unwrap_or(t);
    match floor == t {
        true => t,
        false => floor + chrono::Duration::hours(1),
    }
}

/// A report line of the rollup (`grp` is its group).
fn group_of(by: ReportBy) -> &'static str {
    match by {
        ReportBy::Team => "team",
        ReportBy::Model => "model",
        ReportBy::Key => "CASE WHEN key_id = '' THEN '-' ELSE key_id END",
        ReportBy::Day => "day",
        ReportBy::Provider => "provider",
        ReportBy::Tier | ReportBy::Component => {
            "CASE WHEN service_tier = '' THEN 'standard' ELSE service_tier END"
        }
        // Never asked of the rollups (`report` reads the rows for them).
        ReportBy::EndUser | ReportBy::Tag => "'-'",
    }
}

/// Rows of `usage_daily` from hour `from` on (`day`, `hour` as bound).
const FROM_HOUR: &str = "(day > $1 OR (day = $1 AND hour >= $2))";

fn day_hour(t: DateTime<Utc>) -> (String, i16) {
    let day = format!("{:04}-{:02}-{:02}", t.year(), t.month(), t.day());
    (day, i16::try_from(t.hour()).unwrap_or(0))
}

/// Lines summed into one per group, in group order.
fn merge(parts: impl IntoIterator<Item = ReportRow>) -> Vec<ReportRow> {
    let mut by_group: BTreeMap<String, ReportRow> = BTreeMap::new();
    for r in parts {
        match by_group.get_mut(&r.group) {
            None => {
                by_group.insert(r.group.clone(), r);
            }
            Some(sum) => {
                sum.requests += r.requests;
                sum.prompt_tokens += r.prompt_tokens;
                sum.completion_tokens += r.completion_tokens;
                sum.cached_tokens += r.cached_tokens;
                sum.cost_nano_usd += r.cost_nano_usd;
                for (a, b) in sum.components.iter_mut().zip(r.components) {
                    *a += b;
                }
            }
        }
    }
    by_group.into_values().collect()
}

impl Store {
    /// Usage since `since` grouped `by`, in nano-USD: whole hours from the
    /// rollups, the part of the first hour before them from the rows.
    pub async fn report(
        &self,
        by: ReportBy,
        since: DateTime<Utc>,
    ) -> Result<Vec<ReportRow>, StoreError> {
        if matches!(by, ReportBy::EndUser | ReportBy::Tag) {
            // Not kept in the rollups: from the rows.
            return self.report_rows(by, since, None).await;
        }
        let hour = hour_at_or_after(since);
        let mut parts = self.rollup_report(by, hour, None).await?;
        if hour > since {
            parts.extend(self.report_rows(by, since, Some(hour)).await?);
        }
        Ok(merge(parts))
    }

    /// A team's recorded spend since `since` (the rows' part of
    /// `spend_since`), the same way.
    pub(super) async fn usage_spend_since(
        &self,
        team: &str,
        since: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let hour = hour_at_or_after(since);
        let mut parts = self.rollup_report(ReportBy::Team, hour, Some(team)).await?;
        if hour > since {
            let rows = self.report_rows(ReportBy::Team, since, Some(hour)).await?;
            parts.extend(rows.into_iter().filter(|r| r.group == team));
        }
        Ok(parts.iter().map(|r| to_u64(r.cost_nano_usd)).sum())
    }

    /// The rollups from hour `from` on, grouped `by` (only `team`'s when given).
    async fn rollup_report(
        &self,
        by: ReportBy,
        from: DateTime<Utc>,
        team: Option<&str>,
    ) -> Result<Vec<ReportRow>, StoreError> {
        let (day, hour) = day_hour(from);
        let team_filter = if team.is_some() { " AND team = $3" } else { "" };
        let sum = |c: &str| format!("CAST(COALESCE(SUM({c}), 0) AS BIGINT) AS {c}");
        // Only the sums a report line shows.
        let read = [
            "requests",
            "prompt_tokens",
            "completion_tokens",
            "cached_tokens",
            "cost_nano_usd",
        ];
        let lines = Line::ALL.iter().map(|l| format!("c_{}", l.name()));
        let sums: Vec<String> = match by {
            ReportBy::Component => lines
                .chain(Line::ALL.iter().map(|l| format!("n_{}", l.name())))
                .map(|c| sum(&c))
                .collect(),
            _ => read
                .iter()
                .map(|c| c.to_string())
                .chain(lines)
                .map(|c| sum(&c))
                .collect(),
        };
        let sql = match by {
            ReportBy::Component => format!(
                "SELECT {} FROM usage_daily WHERE {FROM_HOUR}{team_filter}",
                sums.join(", ")
            ),
            _ => format!(
                "SELECT {} AS grp, {} FROM usage_daily WHERE {FROM_HOUR}{team_filter} GROUP BY grp",
                group_of(by),
                sums.join(", ")
            ),
        };
        on_db!(self, pool, _writer, _d => {
            let rows = sqlx::query(&sql)
                .bind(&day)
                .bind(hour)
                .bind(team)
                .fetch_all(pool)
                .await?;
            let mut out = Vec::new();
            for r in &rows {
                let get = |c: &str| -> Result<i64, sqlx::Error> { r.try_get(c) };
                let mut components = [0i64; Line::COUNT];
                for (i, l) in Line::ALL.iter().enumerate() {
                    components[i] = get(&format!("c_{}", l.name()))?;
                }
                if by == ReportBy::Component {
                    // One line per component some row had.
                    for (i, l) in Line::ALL.iter().enumerate() {
                        let requests = get(&format!("n_{}", l.name()))?;
                        if requests == 0 {
                            continue;
                        }
                        let mut own = [0i64; Line::COUNT];
                        own[i] = components[i];
                        out.push(ReportRow {
                            group: l.name().to_string(),
                            requests,
                            prompt_tokens: 0,
                            completion_tokens: 0,
                            cached_tokens: 0,
                            cost_nano_usd: components[i],
                            components: own,
                        });
                    }
                    continue;
                }
                out.push(ReportRow {
                    group: r.try_get("grp")?,
                    requests: get("requests")?,
                    prompt_tokens: get("prompt_tokens")?,
                    completion_tokens: get("completion_tokens")?,
                    cached_tokens: get("cached_tokens")?,
                    cost_nano_usd: get("cost_nano_usd")?,
                    components,
                });
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_split_at_the_next_whole_hour() {
        let t = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or_default()
        };
        assert_eq!(
            hour_at_or_after(t("2026-12-07T15:23:11.5Z")),
            t("2026-12-07T16:00:00Z")
        );
        assert_eq!(
            hour_at_or_after(t("2026-12-07T23:59:59Z")),
            t("2026-12-08T00:00:00Z")
        );
        let on = t("2026-12-07T15:00:00Z");
        assert_eq!(hour_at_or_after(on), on);
        assert_eq!(day_hour(on), ("2026-12-07".to_string(), 15));
    }

    #[test]
    fn the_sums_have_a_column_each() {
        assert_eq!(sum_columns().count(), SUMS);
        let one = UPSERT_SQL[STATEMENT_ROWS.len() - 1].as_str();
        assert!(
            one.contains("n_gpu = usage_daily.n_gpu + excluded.n_gpu"),
            "{one}"
        );
        assert_eq!(one.matches('?').count(), 8 + SUMS);
        assert_eq!(UPSERT_SQL[0].matches('?').count(), 256 * (8 + SUMS));
        let unnest = UPSERT_UNNEST.as_str();
        assert!(
            unnest.contains("n_gpu = usage_daily.n_gpu + excluded.n_gpu"),
            "{unnest}"
        );
        assert!(
            unnest.contains(&format!("${}::int8[])", 8 + SUMS)),
            "{unnest}"
        );
    }
}
