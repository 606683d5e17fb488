//! Teams, keys and reports as the CLI and the admin API manage them: one
//! implementation of each operation, one JSON shape for each object.

use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde_json::{json, Value};

use crate::auth;
use crate::budget::{Budget, BudgetStatus, Period};
use crate::glob::Glob;
use crate::pricing::money::decimal_scaled;
use crate::pricing::{Line, NanoUsd};
use crate::store::{now_text, KeyRow, ReportBy, ReportRow, Store, StoreError, TeamRow};

#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// USD as typed by a person ("12.5") to exact nano-USD.
pub fn parse_usd(text: &str) -> Result<NanoUsd, ManageError> {
    decimal_scaled(text, 9)
        .ok()
        .and_then(|v| u64::try_from(v).ok())
        .map(NanoUsd)
        .ok_or_else(|| ManageError::Invalid(format!("`{text}` is not a USD amount")))
}

pub fn budget_from(
    usd: Option<&str>,
    period: Option<Period>,
) -> Result<Option<Budget>, ManageError> {
    match (usd, period) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(ManageError::Invalid("a period needs --budget-usd".into())),
        (Some(usd), period) => Ok(Some(Budget {
            limit: parse_usd(usd)?,
            period: period.unwrap_or(Period::Monthly),
        })),
    }
}

pub fn valid_team_name(name: &str) -> Result<(), ManageError> {
    if auth::is_valid_team_name(name) {
        Ok(())
    } else {
        Err(ManageError::Invalid(format!(
            "team name `{name}`: use 1-64 letters, digits, '-', '_' or '.'"
        )))
    }
}

pub fn team_json(t: &TeamRow, status: Option<BudgetStatus>) -> Value {
    json!({
        "name": t.name,
        "budget_usd": t.budget.map(|b| b.limit.to_string()),
        "period": t.budget.map(|b| b.period.as_str()),
        "max_output_tokens": t.max_output_tokens,
        "spent_usd": status.map(|s| s.spent.to_string()),
        "reserved_usd": status.map(|s| s.reserved.to_string()),
        "remaining_usd": status.map(|s| s.remaining.to_string()),
        "created_at": t.created_at,
    })
}

/// The ledger account of a key's, an end user's or a tag's budget, checked:
/// the key exists, the end user's team exists, the tag is a name as a
/// team's is. `team` is the end user's team (else unused).
pub async fn level_account(
    store: &Store,
    level: crate::budget::Level,
    team: Option<&str>,
    name: &str,
) -> Result<String, ManageError> {
    use crate::budget::{account, end_user_account, Level};
    match level {
        Level::Team => {
            store.team(name).await?;
            Ok(name.to_string())
        }
        Level::Key => {
            if !store.keys().await?.iter().any(|k| k.id == name) {
                return Err(StoreError::NotFound(format!("key `{name}`")).into());
            }
            Ok(account(Level::Key, name))
        }
        Level::EndUser => {
            let Some(team) = team else {
                return Err(ManageError::Invalid(
                    "an end user's budget needs its team".into(),
                ));
            };
            store.team(team).await?;
            if name.is_empty() || name.chars().count() > 256 {
                return Err(ManageError::Invalid(format!(
                    "end user `{name}`: 1-256 characters"
                )));
            }
            Ok(end_user_account(team, name))
        }
        Level::Tag => {
            if !auth::is_valid_team_name(name) {
                return Err(ManageError::Invalid(format!(
                    "tag `{name}`: use 1-64 letters, digits, '-', '_' or '.'"
                )));
            }
            Ok(account(Level::Tag, name))
        }
    }
}

/// A key's, end user's or tag's budget as the CLI and the admin API show it.
pub fn level_budget_json(account: &str, budget: Budget, status: Option<BudgetStatus>) -> Value {
    let (level, name) = crate::budget::level_of(account);
    let (team, name) = match level {
        crate::budget::Level::EndUser => match name.split_once(':') {
            Some((t, u)) => (Some(t), u),
            None => (None, name),
        },
        _ => (None, name),
    };
    json!({
        "level": level.as_str(),
        "name": name,
        "team": team,
        "budget_usd": budget.limit.to_string(),
        "period": budget.period.as_str(),
        "spent_usd": status.map(|s| s.spent.to_string()),
        "reserved_usd": status.map(|s| s.reserved.to_string()),
        "remaining_usd": status.map(|s| s.remaining.to_string()),
    })
}

pub fn key_json(k: &KeyRow) -> Value {
    json!({
        "id": k.id,
        "team": k.team,
        "name": k.name,
        "prefix": k.prefix,
        "models": k.models,
        "created_at": k.created_at,
        "revoked_at": k.revoked_at,
    })
}

/// Creates a key; the secret is returned once and never stored.
pub async fn create_key(
    store: &Store,
    team: &str,
    name: Option<String>,
    models: Vec<String>,
) -> Result<(KeyRow, String), ManageError> {
    for m in &models {
        if m.is_empty() || m.contains(',') {
            return Err(ManageError::Invalid(format!(
                "model glob `{m}` is empty or has a comma"
            )));
        }
        let _ = Glob::new(m);
    }
    let new = auth::generate_key().map_err(ManageError::Invalid)?;
    let row = KeyRow {
        id: new.id,
        team: team.to_string(),
        name,
        hash: new.hash,
        prefix: new.prefix,
        models,
        created_at: now_text(),
        revoked_at: None,
    };
    store.insert_key(&row).await?;
    Ok((row, new.secret))
}

/// `24h`, `7d`, `30m`, a date (`2026-11-01`) or an RFC 3339 time.
pub fn parse_since(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, ManageError> {
    let bad = || {
        ManageError::Invalid(format!(
            "--since `{text}`: use 24h, 7d, 30m, or a date like 2026-11-01"
        ))
    };
    if let Some(unit) = text.chars().last().filter(|c| c.is_ascii_alphabetic()) {
        let n: i64 = text[..text.len() - 1].parse().map_err(|_| bad())?;
        let d = match unit {
            'm' => Duration::minutes(n),
            'h' => Duration::hours(n),
            'd' => Duration::days(n),
            'w' => Duration::weeks(n),
            _ => return Err(bad()),
        };
        return Ok(now - d);
    }
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return date
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc())
            .ok_or_else(bad);
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| bad())
}

/// `{"input": 123, ...}`: a report row's cost by component, zeros left out.
fn components_json(r: &ReportRow) -> Value {
    let map: serde_json::Map<String, Value> = Line::ALL
        .iter()
        .zip(r.components)
        .filter(|(_, n)| *n != 0)
        .map(|(l, n)| (l.name().to_string(), json!(n)))
        .collect();
    Value::Object(map)
}

pub fn report_json(by: ReportBy, rows: &[ReportRow]) -> Value {
    let total: i64 = rows.iter().map(|r| r.cost_nano_usd).sum();
    json!({
        "by": format!("{by:?}").to_lowercase(),
        "rows": rows.iter().map(|r| json!({
            "group": r.group,
            "requests": r.requests,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "cached_tokens": r.cached_tokens,
            "cost_nano_usd": r.cost_nano_usd,
            "cost_usd": NanoUsd(u64::try_from(r.cost_nano_usd).unwrap_or(0)).to_string(),
            "cost_breakdown_nano_usd": components_json(r),
        })).collect::<Vec<_>>(),
        "total_cost_nano_usd": total,
        "total_cost_usd": NanoUsd(u64::try_from(total).unwrap_or(0)).to_string(),
    })
}

pub fn report_text(rows: &[ReportRow], csv: bool) -> String {
    let mut out = String::new();
    if csv {
        out.push_str("group,requests,prompt_tokens,completion_tokens,cached_tokens,cost_usd");
        for line in Line::ALL {
            out.push_str(&format!(",cost_{}_usd", line.name()));
        }
        out.push('\n');
        let usd = |n: i64| NanoUsd(u64::try_from(n).unwrap_or(0));
        for r in rows {
            let group = if r.group.contains([',', '"']) {
                format!("\"{}\"", r.group.replace('"', "\"\""))
            } else {
                r.group.clone()
            };
            out.push_str(&format!(
                "{group},{},{},{},{},{}",
                r.requests,
                r.prompt_tokens,
                r.completion_tokens,
                r.cached_tokens,
                usd(r.cost_nano_usd)
            ));
            for n in r.components {
                out.push_str(&format!(",{}", usd(n)));
            }
            out.push('\n');
        }
        return out;
    }
    out.push_str(&format!(
        "{:<40} {:>9} {:>12} {:>12} {:>10} {:>16}\n",
        "group", "requests", "prompt", "completion", "cached", "cost_usd"
    ));
    let mut total = 0u64;
    for r in rows {
        let cost = u64::try_from(r.cost_nano_usd).unwrap_or(0);
        total += cost;
        out.push_str(&format!(
            "{:<40} {:>9} {:>12} {:>12} {:>10} {:>16}\n",
            r.group,
            r.requests,
            r.prompt_tokens,
            r.completion_tokens,
            r.cached_tokens,
            NanoUsd(cost)
        ));
    }
    out.push_str(&format!(
        "{:<40} {:>9} {:>12} {:>12} {:>10} {:>16}\n",
        "total",
        "",
        "",
        "",
        "",
        NanoUsd(total)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_amounts_are_exact() {
        assert_eq!(parse_usd("12.5").ok(), Some(NanoUsd(12_500_000_000)));
        assert_eq!(parse_usd("0.000000001").ok(), Some(NanoUsd(1)));
        assert!(parse_usd("-1").is_err());
        assert!(parse_usd("ten").is_err());
    }

    #[test]
    fn since_forms() {
        let now = DateTime::parse_from_rfc3339("2026-11-24T12:00:00Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default();
        assert_eq!(
            parse_since("24h", now).ok(),
            Some(now - Duration::hours(24))
        );
        assert_eq!(parse_since("7d", now).ok(), Some(now - Duration::days(7)));
        assert_eq!(
            parse_since("2026-11-01", now).ok().map(|t| t.to_rfc3339()),
            Some("2026-11-01T00:00:00+00:00".to_string())
        );
        assert!(parse_since("yesterday", now).is_err());
    }
}

/// One (team, model) line of `report --shadow`: what its requests cost,
/// and what the same tokens would have cost as the shadow model.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowLine {
    pub team: String,
    pub model: String,
    pub requests: u64,
    pub cost: NanoUsd,
    pub shadow_cost: NanoUsd,
}

/// Prices every row again as `shadow` (each row at the tier it was
/// served at, one rounding per row, as the shadow metric does) and sums
/// by team and model. Errors when the catalog cannot price `shadow`.
pub fn shadow_report(
    rows: &[crate::store::CountsRow],
    catalog: &crate::pricing::Catalog,
    shadow: &str,
) -> Result<Vec<ShadowLine>, String> {
    let resolved = catalog.resolve(shadow);
    let Some(price) = resolved.price.as_deref() else {
        return Err(format!("`{shadow}` has no price in the catalog in use"));
    };
    let mut lines: std::collections::BTreeMap<(&str, &str), ShadowLine> = Default::default();
    for r in rows {
        let tier = crate::usage::ServiceTier::parse(r.service_tier.as_deref().unwrap_or(""));
        let cost = price.price(&r.usage, tier, catalog.tool_call_fees()).total;
        let line = lines
            .entry((&r.team, &r.model))
            .or_insert_with(|| ShadowLine {
                team: r.team.clone(),
                model: r.model.clone(),
                requests: 0,
                cost: NanoUsd(0),
                shadow_cost: NanoUsd(0),
            });
        line.requests += 1;
        line.cost = NanoUsd(line.cost.0.saturating_add(r.cost_nano_usd));
        line.shadow_cost = NanoUsd(line.shadow_cost.0.saturating_add(cost.0));
    }
    Ok(lines.into_values().collect())
}

pub fn shadow_json(shadow: &str, lines: &[ShadowLine]) -> Value {
    let signed = |a: NanoUsd, b: NanoUsd| i128::from(a.0) - i128::from(b.0);
    let (cost, shadow_cost) = lines.iter().fold((0u64, 0u64), |(c, s), l| {
        (
            c.saturating_add(l.cost.0),
            s.saturating_add(l.shadow_cost.0),
        )
    });
    json!({
        "shadow_model": shadow,
        "rows": lines.iter().map(|l| json!({
            "team": l.team,
            "model": l.model,
            "requests": l.requests,
            "cost_nano_usd": l.cost.0,
            "cost_usd": l.cost.to_string(),
            "shadow_cost_nano_usd": l.shadow_cost.0,
            "shadow_cost_usd": l.shadow_cost.to_string(),
            "saving_nano_usd": signed(l.cost, l.shadow_cost).to_string(),
        })).collect::<Vec<_>>(),
        "total_cost_nano_usd": cost,
        "total_shadow_cost_nano_usd": shadow_cost,
        "total_saving_nano_usd": signed(NanoUsd(cost), NanoUsd(shadow_cost)).to_string(),
    })
}

pub fn shadow_text(shadow: &str, lines: &[ShadowLine], csv: bool) -> String {
    let mut out = String::new();
    if csv {
        out.push_str("team,model,requests,cost_usd,shadow_model,shadow_cost_usd\n");
        for l in lines {
            out.push_str(&format!(
                "{},{},{},{},{shadow},{}\n",
                l.team, l.model, l.requests, l.cost, l.shadow_cost
            ));
        }
        return out;
    }
    out.push_str(&format!(
        "{:<20} {:<32} {:>9} {:>16} {:>20}\n",
        "team",
        "model",
        "requests",
        "cost_usd",
        format!("as {shadow}")
    ));
    for l in lines {
        out.push_str(&format!(
            "{:<20} {:<32} {:>9} {:>16} {:>20}\n",
            l.team,
            l.model,
            l.requests,
            l.cost.to_string(),
            l.shadow_cost.to_string()
        ));
    }
    out
}
