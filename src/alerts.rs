//! Budget alerts (SPEC 14): `[[alerts]]` webhooks told once when a budget's
//! spend first crosses each threshold in a period.
//!
//! A background task reads the ledger every second (never the request
//! path). A crossing is claimed in `alerts_sent`, whose key (webhook,
//! budget, period, threshold) lets one replica claim it, once, across
//! restarts. The claimer POSTs the JSON body, signed
//! `x-tollgate-signature: sha256=HMAC-SHA256(secret, body)`, and retries
//! with capped backoff until the receiver answers 2xx. An alert claimed by
//! a replica that died is taken over by another after `STALE`; one of this
//! replica's own earlier run at start.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::budget::{level_of, Ledger, Level};
use crate::config::AlertConfig;
use crate::metrics::Metrics;
use crate::pricing::NanoUsd;
use crate::store::{AlertRow, Store};

/// How often the ledger is read for crossings.
const TICK: Duration = Duration::from_secs(1);
/// Undelivered alerts claimed longer ago than this by a silent replica are
/// taken over (a live one refreshes its claim at every attempt).
const STALE: Duration = Duration::from_secs(180);
/// Retries wait 1 s, 2 s, 4 s ... up to this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// One configured webhook, ready to send.
struct Hook {
    url: String,
    /// `alerts_sent.target`: a hash of the URL, which may hold a secret.
    target: String,
    thresholds: Vec<(f64, i64)>,
    secret: Option<String>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// `sha256=` and the hex HMAC of `body`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        // HMAC takes keys of any length; this cannot happen.
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", crate::auth::hex(&mac.finalize().into_bytes()))
}

/// The alert's JSON: the budget, its period, limit and spend, the
/// threshold, when; and a `text` line, so Slack's incoming webhooks take it
/// as it is.
fn body(
    account: &str,
    period: crate::period::Period,
    key: &str,
    limit: u64,
    spent: u64,
    threshold: f64,
) -> String {
    let (level, name) = level_of(account);
    let (team, name) = match level {
        Level::EndUser => name
            .split_once(':')
            .map_or((None, name), |(t, u)| (Some(t), u)),
        _ => (None, name),
    };
    let percent = (threshold * 100.0).round();
    let text = format!(
        "tollgate: {} `{name}`{} budget at {percent}%: ${} of ${} ({} period{})",
        level.as_str().replace('_', " "),
        team.map_or(String::new(), |t| format!(" of team `{t}`")),
        NanoUsd(spent),
        NanoUsd(limit),
        period.as_str(),
        match key {
            "total" => String::new(),
            start => format!(" from {start}"),
        },
    );
    serde_json::json!({
        "budget": {"kind": level.as_str(), "name": name, "team": team},
        "period": period.as_str(),
        "period_start": key,
        "limit_usd": NanoUsd(limit).to_string(),
        "spent_usd": NanoUsd(spent).to_string(),
        "limit_nano_usd": limit,
        "spent_nano_usd": spent,
        "threshold": threshold,
        "time": crate::store::time_text(chrono::Utc::now()),
        "text": text,
    })
    .to_string()
}

/// The alerts task. None without `[[alerts]]`.
pub fn spawn(
    configs: &[AlertConfig],
    ledger: Arc<Ledger>,
    store: Store,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
) -> Option<tokio::task::JoinHandle<()>> {
    if configs.is_empty() {
        return None;
    }
    let hooks: Vec<Hook> = configs
        .iter()
        .map(|c| Hook {
            url: c.url.clone(),
            target: crate::auth::hex(&Sha256::digest(c.url.as_bytes())[..8]),
            thresholds: c
                .thresholds
                .iter()
                .map(|t| (*t, (t * 1e6).round() as i64))
                .collect(),
            secret: c.secret.clone().filter(|s| !s.is_empty()),
        })
        .collect();
    let node = store.node().unwrap_or("local").to_string();
    let task = Alerts {
        hooks: Arc::new(hooks),
        ledger,
        store,
        metrics,
        client,
        node,
        handled: HashSet::new(),
        sending: Arc::new(Mutex::new(HashSet::new())),
    };
    Some(tokio::spawn(task.run()))
}

type AlertKey = (String, String, String, i64);

struct Alerts {
    hooks: Arc<Vec<Hook>>,
    ledger: Arc<Ledger>,
    store: Store,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
    node: String,
    /// Crossings claimed, or found claimed by another replica.
    handled: HashSet<AlertKey>,
    /// Alerts with a delivery under way here.
    sending: Arc<Mutex<HashSet<AlertKey>>>,
}

fn key_of(a: &AlertRow) -> AlertKey {
    (
        a.target.clone(),
        a.account.clone(),
        a.period.clone(),
        a.threshold_ppm,
    )
}

impl Alerts {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut since_reclaim = u32::MAX;
        loop {
            tick.tick().await;
            // At start (this node's own undelivered alerts), then every 30 s.
            if since_reclaim >= 30 {
                since_reclaim = 0;
                let stale_before = now_ms() - STALE.as_millis() as i64;
                match self
                    .store
                    .reclaim_alerts(&self.node, now_ms(), stale_before)
                    .await
                {
                    Ok(rows) => {
                        for row in rows {
                            self.handled.insert(key_of(&row));
                            self.deliver(row);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "alerts: reading undelivered alerts failed")
                    }
                }
            }
            since_reclaim = since_reclaim.saturating_add(1);
            self.check().await;
        }
    }

    /// Claims every new crossing and sends those this replica claimed.
    async fn check(&mut self) {
        for (account, period, key, limit, spent, refused) in self.ledger.alert_view() {
            if limit == 0 {
                continue;
            }
            for hook in self.hooks.iter() {
                for &(threshold, ppm) in &hook.thresholds {
                    let reached = u128::from(spent) * 1_000_000 >= u128::from(limit) * ppm as u128
                        || (refused && ppm >= 1_000_000);
                    if !reached {
                        continue;
                    }
                    let k = (hook.target.clone(), account.clone(), key.clone(), ppm);
                    if self.handled.contains(&k) {
                        continue;
                    }
                    let row = AlertRow {
                        target: hook.target.clone(),
                        account: account.clone(),
                        period: key.clone(),
                        threshold_ppm: ppm,
                        body: body(&account, period, &key, limit, spent, threshold),
                    };
                    match self.store.claim_alert(&row, &self.node, now_ms()).await {
                        Ok(ours) => {
                            self.handled.insert(k);
                            if ours {
                                self.deliver(row);
                            }
                        }
                        // Tried again next tick.
                        Err(e) => tracing::warn!(error = %e, "alerts: claiming an alert failed"),
                    }
                }
            }
        }
    }

    /// Sends `row` until its receiver answers 2xx, off this task.
    fn deliver(&self, row: AlertRow) {
        let Some(hook) = self.hooks.iter().position(|h| h.target == row.target) else {
            // A webhook no longer configured: left undelivered.
            return;
        };
        let k = key_of(&row);
        if let Ok(mut sending) = self.sending.lock() {
            if !sending.insert(k.clone()) {
                return;
            }
        }
        let (hooks, store, metrics, client) = (
            self.hooks.clone(),
            self.store.clone(),
            self.metrics.clone(),
            self.client.clone(),
        );
        let (node, sending) = (self.node.clone(), self.sending.clone());
        tokio::spawn(async move {
            let hook = &hooks[hook];
            let mut backoff = Duration::from_secs(1);
            loop {
                let mut req = client
                    .post(&hook.url)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .timeout(Duration::from_secs(10))
                    .body(row.body.clone());
                if let Some(secret) = &hook.secret {
                    req = req.header(
                        "x-tollgate-signature",
                        signature(secret, row.body.as_bytes()),
                    );
                }
                let ok = match req.send().await {
                    Ok(r) => r.status().is_success(),
                    Err(_) => false,
                };
                let outcome = if ok { "delivered" } else { "failed" };
                metrics.alerts_sent.with_label_values(&[outcome]).inc();
                if let Err(e) = store.alert_attempted(&row, &node, now_ms(), ok).await {
                    tracing::warn!(error = %e, "alerts: recording an attempt failed");
                }
                if ok {
                    break;
                }
                tracing::warn!(budget = %row.account, retry_in_ms = backoff.as_millis() as u64, "alert not accepted by its webhook; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            if let Ok(mut sending) = sending.lock() {
                sending.remove(&k);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_hex_hmac_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn the_body_names_the_budget_and_reads_in_slack() {
        let b: serde_json::Value = serde_json::from_str(&body(
            "user:acme:alice",
            crate::period::Period::Monthly,
            "2026-12-01T00:00:00Z",
            10_000_000_000,
            8_000_000_000,
            0.8,
        ))
        .unwrap_or_default();
        assert_eq!(b["budget"]["kind"], "end_user");
        assert_eq!(b["budget"]["name"], "alice");
        assert_eq!(b["budget"]["team"], "acme");
        assert_eq!(b["spent_nano_usd"], 8_000_000_000u64);
        assert_eq!(b["threshold"], 0.8);
        let text = b["text"].as_str().unwrap_or_default();
        assert!(
            text.contains("end user `alice` of team `acme` budget at 80%"),
            "{text}"
        );
    }
}
