//! The Prometheus registry and every metric tollgate exports, defined in one
//! place (SPEC section 7). Money counters are kept as integer nano-USD and
//! only converted to USD when scraped, so no sum is ever taken in floating point.

use crate::usage::meter::Meter;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::pricing::{Catalog, NanoUsd};
use crate::usage::Endpoint;

/// A counter of USD whose value is an exact integer sum of nano-USD.
pub struct MoneyCounter {
    desc: Desc,
    label_names: Vec<&'static str>,
    values: Mutex<HashMap<Vec<String>, Arc<AtomicU64>>>,
}

impl MoneyCounter {
    fn new(name: &str, help: &str, label_names: &[&'static str]) -> prometheus::Result<Self> {
        let desc = Desc::new(
            name.to_string(),
            help.to_string(),
            label_names.iter().map(|s| s.to_string()).collect(),
            HashMap::new(),
        )?;
        Ok(MoneyCounter {
            desc,
            label_names: label_names.to_vec(),
            values: Mutex::new(HashMap::new()),
        })
    }

    pub fn add(&self, labels: &[&str], amount: NanoUsd) {
        add_nano(&self.cell(labels), amount);
    }

    /// The running total of one label set, to add to without a lookup.
    pub fn cell(&self, labels: &[&str]) -> Arc<AtomicU64> {
        let key: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        match self.values.lock() {
            Ok(mut values) => values.entry(key).or_default().clone(),
            // A poisoned map: count into a cell nobody exports rather than panic.
            Err(_) => Arc::default(),
        }
    }

    /// The exact total for one label set, in nano-USD.
    pub fn get(&self, labels: &[&str]) -> NanoUsd {
        let key: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        NanoUsd(
            self.values
                .lock()
                .ok()
                .and_then(|v| v.get(&key).map(|c| c.load(Ordering::Relaxed)))
                .unwrap_or(0),
        )
    }
}

/// Adds to an exact nano-USD total, saturating instead of wrapping.
fn add_nano(cell: &AtomicU64, amount: NanoUsd) {
    let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_add(amount.0))
    });
}

impl Collector for MoneyCounter {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut family = MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(MetricType::COUNTER);
        let values: Vec<(Vec<String>, u64)> = match self.values.lock() {
            Ok(v) => v
                .iter()
                .map(|(labels, cell)| (labels.clone(), cell.load(Ordering::Relaxed)))
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut metrics: Vec<Metric> = values
            .into_iter()
            .map(|(labels, nano)| {
                let mut m = Metric::default();
                let pairs = self
                    .label_names
                    .iter()
                    .zip(labels)
                    .map(|(name, value)| {
                        let mut p = LabelPair::default();
                        p.set_name(name.to_string());
                        p.set_value(value);
                        p
                    })
                    .collect();
                m.set_label(pairs);
                let mut c = prometheus::proto::Counter::default();
                c.set_value(NanoUsd(nano).as_usd_f64());
                m.set_counter(c);
                m
            })
            .collect();
        metrics.sort_by(|a, b| {
            let key = |m: &Metric| {
                m.get_label()
                    .iter()
                    .map(|l| l.value().to_string())
                    .collect::<Vec<_>>()
            };
            key(a).cmp(&key(b))
        });
        family.set_metric(metrics);
        vec![family]
    }
}

/// Model ids come from clients. Past this many distinct ids, new ones share
/// the label `other` so a client cannot blow up Prometheus' series count.
/// Usage rows always keep the real id.
pub const MAX_MODEL_LABELS: usize = 1000;

/// Team names come from clients in passthrough mode (`x-tollgate-team`):
/// past this many, new ones share the label `other`.
pub const MAX_TEAM_LABELS: usize = 1000;

/// No label value is longer than this (longer ones are cut at a character
/// boundary). Model ids are refused past 256 bytes and team names past 64,
/// so this only guards values that reach a label another way.
pub const MAX_LABEL_BYTES: usize = 256;

/// At most `cap` distinct label values; later ones become `other`.
struct LabelSet {
    cap: usize,
    seen: RwLock<std::collections::HashSet<String>>,
}

impl LabelSet {
    fn new(cap: usize) -> LabelSet {
        LabelSet {
            cap,
            seen: RwLock::new(std::collections::HashSet::new()),
        }
    }

    fn label(&self, value: &str) -> String {
        let value = bounded(value);
        if let Ok(seen) = self.seen.read() {
            if seen.contains(value) {
                return value.to_string();
            }
            if seen.len() >= self.cap {
                return "other".to_string();
            }
        }
        match self.seen.write() {
            Ok(mut seen) if seen.len() < self.cap || seen.contains(value) => {
                seen.insert(value.to_string());
                value.to_string()
            }
            _ => "other".to_string(),
        }
    }
}

/// `value` cut to at most `MAX_LABEL_BYTES`, at a character boundary.
pub fn bounded(value: &str) -> &str {
    if value.len() <= MAX_LABEL_BYTES {
        return value;
    }
    let mut end = MAX_LABEL_BYTES;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// The metric handles of one (team, model) label pair, resolved once and
/// reused, so settling a request updates its metrics without hashing label
/// values per metric. Each handle is created on first use, so a series
/// appears in /metrics exactly when it would with `with_label_values`.
pub struct Series {
    team: String,
    model: String,
    tokens: [OnceLock<IntCounter>; TOKEN_KINDS.len()],
    cost: OnceLock<Arc<AtomicU64>>,
    component_cost: [OnceLock<Arc<AtomicU64>>; crate::pricing::Line::COUNT],
    tier_cost: [OnceLock<Arc<AtomicU64>>; TIERS.len()],
    cache_savings: OnceLock<Arc<AtomicU64>>,
    batch_saving: OnceLock<Arc<AtomicU64>>,
    time_to_first_byte: OnceLock<Histogram>,
    endpoints: [OnceLock<EndpointSeries>; Endpoint::COUNT],
}

/// The handles that also carry an endpoint label.
struct EndpointSeries {
    /// `tollgate_requests_total` with status 200; other statuses look theirs up.
    ok: OnceLock<IntCounter>,
    duration: Histogram,
    overhead: Histogram,
}

/// `service_tier` label values of `tollgate_cost_by_tier_usd_total`.
pub const TIERS: [&str; 6] = ["standard", "flex", "priority", "batch", "scale", "other"];

fn tier_index(tier: crate::usage::ServiceTier) -> usize {
    use crate::usage::ServiceTier;
    match tier {
        ServiceTier::Standard => 0,
        ServiceTier::Flex => 1,
        ServiceTier::Priority => 2,
        ServiceTier::Batch => 3,
        ServiceTier::Scale => 4,
        ServiceTier::Other => 5,
    }
}

/// Token kinds in `tollgate_tokens_total`, in `Series::tokens` order
/// (`proxy::settle::token_kinds` fills them): the two totals (`prompt`,
/// `completion`), then every meter by its name (`usage::Meter::ALL`; they
/// add up to the totals), then `reasoning` (a part of `output`).
pub const TOKEN_KINDS: [&str; Meter::TOKEN_COUNT + 3] = {
    let mut kinds = ["reasoning"; Meter::TOKEN_COUNT + 3];
    kinds[0] = "prompt";
    kinds[1] = "completion";
    let mut i = 0;
    while i < Meter::TOKEN_COUNT {
        kinds[i + 2] = Meter::ALL[i].name();
        i += 1;
    }
    kinds
};

impl Series {
    /// The team as a label (`other` past `MAX_TEAM_LABELS`).
    pub fn team(&self) -> &str {
        &self.team
    }

    pub fn count_request(&self, m: &Metrics, endpoint: Endpoint, status: u16) {
        let (team, model, endpoint_label) = (&self.team, &self.model, endpoint.label());
        if status == 200 {
            self.endpoint(m, endpoint)
                .ok
                .get_or_init(|| {
                    m.requests
                        .with_label_values(&[team, model, endpoint_label, "200"])
                })
                .inc();
        } else {
            let status = status.to_string();
            m.requests
                .with_label_values(&[team, model, endpoint_label, &status])
                .inc();
        }
    }

    /// Adds `n` tokens of `TOKEN_KINDS[kind]`.
    pub fn add_tokens(&self, m: &Metrics, kind: usize, n: u64) {
        self.tokens[kind]
            .get_or_init(|| {
                m.tokens
                    .with_label_values(&[&self.team, &self.model, TOKEN_KINDS[kind]])
            })
            .inc_by(n);
    }

    pub fn add_cost(&self, m: &Metrics, cost: NanoUsd) {
        add_nano(
            self.cost
                .get_or_init(|| m.cost.cell(&[&self.team, &self.model])),
            cost,
        );
    }

    /// Adds to `tollgate_cost_by_component_usd_total` for one breakdown line.
    pub fn add_component_cost(&self, m: &Metrics, line: crate::pricing::Line, cost: NanoUsd) {
        add_nano(
            self.component_cost[line.index()].get_or_init(|| {
                m.cost_by_component
                    .cell(&[&self.team, &self.model, line.name()])
            }),
            cost,
        );
    }

    /// Adds to `tollgate_cost_by_tier_usd_total` for the served tier.
    pub fn add_tier_cost(&self, m: &Metrics, tier: crate::usage::ServiceTier, cost: NanoUsd) {
        let i = tier_index(tier);
        add_nano(
            self.tier_cost[i]
                .get_or_init(|| m.cost_by_tier.cell(&[&self.team, &self.model, TIERS[i]])),
            cost,
        );
    }

    pub fn add_cache_savings(&self, m: &Metrics, saved: NanoUsd) {
        add_nano(
            self.cache_savings
                .get_or_init(|| m.cache_savings.cell(&[&self.team, &self.model])),
            saved,
        );
    }

    /// Adds to `tollgate_batch_saving_usd_total`: what a non-streamed
    /// standard request would have cost less at its model's Batch prices.
    pub fn add_batch_saving(&self, m: &Metrics, saved: NanoUsd) {
        add_nano(
            self.batch_saving
                .get_or_init(|| m.batch_saving.cell(&[&self.team, &self.model])),
            saved,
        );
    }

    pub fn observe_first_byte(&self, m: &Metrics, seconds: f64) {
        self.time_to_first_byte
            .get_or_init(|| m.time_to_first_byte.with_label_values(&[&self.model]))
            .observe(seconds);
    }

    pub fn observe_duration(&self, m: &Metrics, endpoint: Endpoint, latency: f64, overhead: f64) {
        let e = self.endpoint(m, endpoint);
        e.duration.observe(latency);
        e.overhead.observe(overhead);
    }

    fn endpoint(&self, m: &Metrics, endpoint: Endpoint) -> &EndpointSeries {
        self.endpoints[endpoint as usize].get_or_init(|| EndpointSeries {
            ok: OnceLock::new(),
            duration: m
                .request_duration
                .with_label_values(&[&self.model, endpoint.label()]),
            overhead: m.overhead.with_label_values(&[endpoint.label()]),
        })
    }
}

/// Most key, end-user or tag budgets shown as gauges per level.
pub const MAX_LEVEL_BUDGET_LABELS: usize = 200;

pub struct Metrics {
    registry: Registry,
    model_labels: LabelSet,
    team_labels: LabelSet,
    /// Resolved handles by team, then model label (see `Series`). Bounded like
    /// the exported series: teams x at most `MAX_MODEL_LABELS` models.
    series: RwLock<HashMap<String, HashMap<String, Arc<Series>>>>,
    pub requests: IntCounterVec,
    pub tokens: IntCounterVec,
    /// What is billed by the unit: images, audio seconds, characters.
    pub units: IntCounterVec,
    pub cost: Arc<MoneyCounter>,
    pub request_duration: HistogramVec,
    pub time_to_first_byte: HistogramVec,
    pub overhead: HistogramVec,
    pub model_price: Arc<CatalogPrices>,
    pub finetune_multiple: GaugeVec,
    pub finetune_premium: Arc<MoneyCounter>,
    pub unpriced: IntCounterVec,
    pub cost_by_component: Arc<MoneyCounter>,
    pub cost_by_tier: Arc<MoneyCounter>,
    pub cache_savings: Arc<MoneyCounter>,
    pub price_fallbacks: IntCounterVec,
    pub budget_overrun: Arc<MoneyCounter>,
    pub estimated_usage: IntCounterVec,
    pub queue_depth: IntGauge,
    pub budget_limit: GaugeVec,
    pub budget_spent: GaugeVec,
    pub budget_remaining: GaugeVec,
    /// Background responses answered but not billed yet, per team (all
    /// replicas: read from the database).
    pub pending_usage: IntGaugeVec,
    /// Of those, pending past `background.horizon_secs`.
    pub pending_overdue: IntGaugeVec,
    /// How far retention is behind: seconds the oldest expired usage row
    /// (or partition) is past `database.retention_days` (0: on time).
    pub retention_lag: IntGauge,
    /// Usage rows deleted and monthly partitions dropped by retention.
    pub retention_deleted: IntCounter,
    pub retention_partitions_dropped: IntCounter,
    /// OpenTelemetry spans by outcome: `exported`, `failed` (the collector
    /// refused or could not be reached), `dropped` (the export queue was
    /// full). Present only with `[otel] endpoint`.
    pub otel_spans: IntCounterVec,
    pub budget_rejections: IntCounterVec,
    /// Budgets of keys, end users and tags (SPEC 14): `level`, `name`; at
    /// most `MAX_LEVEL_BUDGET_LABELS` per level, those with least left.
    pub level_budget_limit: GaugeVec,
    pub level_budget_spent: GaugeVec,
    pub level_budget_remaining: GaugeVec,
    /// Budgets set per level, all of them (the gauges above may show fewer).
    pub level_budgets: IntGaugeVec,
    /// Refusals by the level of the budget that refused.
    pub level_rejections: IntCounterVec,
    /// Requests refused by a rate limit (`unit`: requests, tokens).
    pub rate_limited: IntCounterVec,
    /// Teams and keys with rate limits.
    pub rate_limits: IntGauge,
    /// Alert webhook attempts (`outcome`: delivered, failed).
    pub alerts_sent: IntCounterVec,
    pub records_dropped: IntCounter,
    /// Every try of an upstream (SPEC 10 fallbacks). Upstreams keep their
    /// own `ok` handle (`upstream::Upstream::attempts_ok`).
    pub upstream_attempts: IntCounterVec,
    /// What requests would have cost as another model (`[[shadow]]`).
    pub shadow_cost: Arc<MoneyCounter>,
    /// Self-hosted models (`pricing::gpu`), set at scrape time.
    pub selfhosted_usd_per_mtok: GaugeVec,
    pub selfhosted_tokens_per_second: GaugeVec,
    /// `tollgate numbers` live: answers at their output cap, choices beyond
    /// the first (`n > 1`), Batch API savings missed.
    pub capped: IntCounterVec,
    pub extra_choices: IntCounterVec,
    pub batch_saving: Arc<MoneyCounter>,
    /// Sampled word counts (`words`), by family, script and side.
    pub words: IntCounterVec,
    pub word_chars: IntCounterVec,
    pub word_tokens: IntCounterVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1,
];

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tollgate_requests_total",
                "Proxied requests by outcome status.",
            ),
            &["team", "model", "endpoint", "status"],
        )?;
        let units = IntCounterVec::new(
            Opts::new(
                "tollgate_units_total",
                "Units billed other than tokens, by meter (images, audio_seconds, characters).",
            ),
            &["team", "model", "unit"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new(
                "tollgate_tokens_total",
                "Tokens metered, by kind (the totals prompt and completion, each meter by name, reasoning).",
            ),
            &["team", "model", "kind"],
        )?;
        let cost = Arc::new(MoneyCounter::new(
            "tollgate_cost_usd_total",
            "Cost of proxied requests in USD (exact sum of nano-USD).",
            &["team", "model"],
        )?);
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_request_duration_seconds",
                "Total request latency.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["model", "endpoint"],
        )?;
        let time_to_first_byte = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_time_to_first_byte_seconds",
                "Time from request arrival to the first response body byte.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["model"],
        )?;
        let overhead = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_overhead_seconds",
                "Time spent inside tollgate: latency minus time waiting on the upstream.",
            )
            .buckets(OVERHEAD_BUCKETS.to_vec()),
            &["endpoint"],
        )?;
        let model_price = Arc::new(CatalogPrices::new()?);
        let finetune_multiple = GaugeVec::new(
            Opts::new(
                "tollgate_finetune_cost_multiple",
                "Fine-tuned model price divided by its base model's price.",
            ),
            &["model", "base_model", "kind"],
        )?;
        let selfhosted_usd_per_mtok = GaugeVec::new(
            Opts::new(
                "tollgate_selfhosted_usd_per_mtok",
                "A self-hosted model's effective price now: GPU cost of the trailing window over the tokens it served (at least the floor), USD per million tokens.",
            ),
            &["model"],
        )?;
        let selfhosted_tokens_per_second = GaugeVec::new(
            Opts::new(
                "tollgate_selfhosted_tokens_per_second",
                "Tokens (prompt + completion) a self-hosted model served per second over its trailing window.",
            ),
            &["model"],
        )?;
        let finetune_premium = Arc::new(MoneyCounter::new(
            "tollgate_finetune_premium_usd_total",
            "What fine-tuned requests cost beyond the same tokens on the base model, in USD.",
            &["team", "model", "base_model"],
        )?);
        let unpriced = IntCounterVec::new(
            Opts::new(
                "tollgate_unpriced_requests_total",
                "Requests for models the catalog has no price for.",
            ),
            &["model"],
        )?;
        let cost_by_component = Arc::new(MoneyCounter::new(
            "tollgate_cost_by_component_usd_total",
            "Cost by breakdown line (each meter by name, tool_calls, gpu), in USD.",
            &["team", "model", "component"],
        )?);
        let cost_by_tier = Arc::new(MoneyCounter::new(
            "tollgate_cost_by_tier_usd_total",
            "Cost by the service tier the response says it was served at (standard, flex, priority, batch, scale), in USD.",
            &["team", "model", "service_tier"],
        )?);
        let cache_savings = Arc::new(MoneyCounter::new(
            "tollgate_cache_savings_usd_total",
            "What prompt caching saved: cached tokens x (input price - cached input price), in USD.",
            &["team", "model"],
        )?);
        let price_fallbacks = IntCounterVec::new(
            Opts::new(
                "tollgate_price_fallbacks_total",
                "Requests priced with stand-in prices (reason=tier: the served tier has no table in the catalog).",
            ),
            &["model", "reason"],
        )?;
        let budget_overrun = Arc::new(MoneyCounter::new(
            "tollgate_budget_overrun_usd_total",
            "What requests cost beyond their budget reservation (settled in full), in USD.",
            &["team"],
        )?);
        let estimated_usage = IntCounterVec::new(
            Opts::new(
                "tollgate_usage_estimated_total",
                "Metered requests whose tokens tollgate estimated (the upstream reported no usage tollgate could read).",
            ),
            &["model"],
        )?;
        let pending_usage = IntGaugeVec::new(
            Opts::new(
                "tollgate_pending_usage",
                "Background responses answered but not billed yet (the same on every replica: read from the database).",
            ),
            &["team"],
        )?;
        let pending_overdue = IntGaugeVec::new(
            Opts::new(
                "tollgate_pending_usage_overdue",
                "Background responses pending past background.horizon_secs: never seen finished by tollgate.",
            ),
            &["team"],
        )?;
        registry.register(Box::new(pending_usage.clone()))?;
        registry.register(Box::new(pending_overdue.clone()))?;
        let retention_lag = IntGauge::new(
            "tollgate_retention_lag_seconds",
            "Seconds the oldest usage row past database.retention_days is overdue for deletion (0: retention is on time).",
        )?;
        let retention_deleted = IntCounter::new(
            "tollgate_retention_deleted_rows_total",
            "Usage rows deleted by retention (rollups are kept).",
        )?;
        let retention_partitions_dropped = IntCounter::new(
            "tollgate_retention_partitions_dropped_total",
            "Monthly usage partitions dropped by retention (Postgres).",
        )?;
        registry.register(Box::new(retention_lag.clone()))?;
        registry.register(Box::new(retention_deleted.clone()))?;
        registry.register(Box::new(retention_partitions_dropped.clone()))?;
        let otel_spans = IntCounterVec::new(
            Opts::new(
                "tollgate_otel_spans_total",
                "OpenTelemetry spans by outcome: exported, failed (the collector could not take them), dropped (export queue full).",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(otel_spans.clone()))?;
        let queue_depth = IntGauge::new(
            "tollgate_usage_write_queue_depth",
            "Usage records waiting for the background writer.",
        )?;
        let records_dropped = IntCounter::new(
            "tollgate_usage_records_dropped_total",
            "Usage records lost: neither the database, the writer's memory nor the spool could take them.",
        )?;
        let budget_gauge = |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &["team"]);
        let budget_limit = budget_gauge(
            "tollgate_budget_limit_usd",
            "Team budget for the current period.",
        )?;
        let budget_spent = budget_gauge(
            "tollgate_budget_spent_usd",
            "Team spend recorded in the current period.",
        )?;
        let budget_remaining = budget_gauge(
            "tollgate_budget_remaining_usd",
            "Team budget left: limit - spent - reserved by in-flight requests.",
        )?;
        let budget_rejections = IntCounterVec::new(
            Opts::new(
                "tollgate_budget_rejections_total",
                "Requests refused because the team budget could not cover them.",
            ),
            &["team"],
        )?;
        let level_gauge =
            |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &["level", "name"]);
        let level_budget_limit = level_gauge(
            "tollgate_level_budget_limit_usd",
            "Budget of a key, end user (name TEAM:USER) or tag for the current period.",
        )?;
        let level_budget_spent = level_gauge(
            "tollgate_level_budget_spent_usd",
            "Spend recorded against a key, end user or tag budget in the current period.",
        )?;
        let level_budget_remaining = level_gauge(
            "tollgate_level_budget_remaining_usd",
            "Key, end user or tag budget left: limit - spent - reserved.",
        )?;
        let level_budgets = IntGaugeVec::new(
            Opts::new(
                "tollgate_level_budgets",
                "Budgets set per level (team, key, end_user, tag).",
            ),
            &["level"],
        )?;
        let level_rejections = IntCounterVec::new(
            Opts::new(
                "tollgate_budget_level_rejections_total",
                "Requests refused by a budget, by the level of the budget that refused.",
            ),
            &["level"],
        )?;
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "tollgate_rate_limited_total",
                "Requests refused by a team's or key's rpm or tpm limit.",
            ),
            &["team", "unit"],
        )?;
        registry.register(Box::new(rate_limited.clone()))?;
        let rate_limits = IntGauge::new(
            "tollgate_rate_limits",
            "Teams and keys with an rpm or tpm limit.",
        )?;
        registry.register(Box::new(rate_limits.clone()))?;
        let alerts_sent = IntCounterVec::new(
            Opts::new(
                "tollgate_alerts_sent_total",
                "Budget alert webhook attempts: delivered (answered 2xx) or failed (retried).",
            ),
            &["outcome"],
        )?;
        for outcome in ["delivered", "failed"] {
            alerts_sent.with_label_values(&[outcome]).inc_by(0);
        }
        registry.register(Box::new(alerts_sent.clone()))?;
        for level in crate::period::Level::ALL {
            level_rejections
                .with_label_values(&[level.as_str()])
                .inc_by(0);
        }
        registry.register(Box::new(level_budget_limit.clone()))?;
        registry.register(Box::new(level_budget_spent.clone()))?;
        registry.register(Box::new(level_budget_remaining.clone()))?;
        registry.register(Box::new(level_budgets.clone()))?;
        registry.register(Box::new(level_rejections.clone()))?;
        registry.register(Box::new(budget_limit.clone()))?;
        registry.register(Box::new(budget_spent.clone()))?;
        registry.register(Box::new(budget_remaining.clone()))?;
        registry.register(Box::new(budget_rejections.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(units.clone()))?;
        registry.register(Box::new(SharedCollector(cost.clone())))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(time_to_first_byte.clone()))?;
        registry.register(Box::new(overhead.clone()))?;
        registry.register(Box::new(SharedCollector(model_price.clone())))?;
        registry.register(Box::new(finetune_multiple.clone()))?;
        registry.register(Box::new(selfhosted_usd_per_mtok.clone()))?;
        registry.register(Box::new(selfhosted_tokens_per_second.clone()))?;
        registry.register(Box::new(SharedCollector(finetune_premium.clone())))?;
        registry.register(Box::new(unpriced.clone()))?;
        registry.register(Box::new(SharedCollector(cost_by_component.clone())))?;
        registry.register(Box::new(SharedCollector(cost_by_tier.clone())))?;
        registry.register(Box::new(SharedCollector(cache_savings.clone())))?;
        registry.register(Box::new(price_fallbacks.clone()))?;
        registry.register(Box::new(SharedCollector(budget_overrun.clone())))?;
        registry.register(Box::new(estimated_usage.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(records_dropped.clone()))?;
        let upstream_attempts = IntCounterVec::new(
            Opts::new(
                "tollgate_upstream_attempts_total",
                "Tries of an upstream: outcome=ok (it answered), or the status or error (connect, timeout, unreachable) that failed it, retried or not.",
            ),
            &["upstream", "outcome"],
        )?;
        registry.register(Box::new(upstream_attempts.clone()))?;
        let shadow_cost = Arc::new(MoneyCounter::new(
            "tollgate_shadow_cost_usd_total",
            "What requests would have cost as shadow_model (same tokens, `[[shadow]]` config), in USD.",
            &["team", "model", "shadow_model"],
        )?);
        registry.register(Box::new(SharedCollector(shadow_cost.clone())))?;
        let capped = IntCounterVec::new(
            Opts::new(
                "tollgate_capped_requests_total",
                "Answers that stopped at their output cap (finish_reason length, stop_reason max_tokens, incomplete max_output_tokens).",
            ),
            &["team", "model"],
        )?;
        let extra_choices = IntCounterVec::new(
            Opts::new(
                "tollgate_extra_choices_total",
                "Choices asked for beyond the first (n > 1).",
            ),
            &["team", "model"],
        )?;
        let batch_saving = Arc::new(MoneyCounter::new(
            "tollgate_batch_saving_usd_total",
            "What non-streamed requests served at standard prices would have cost less at their model's Batch API prices, in USD.",
            &["team", "model"],
        )?);
        let word_counter = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["family", "script", "side"])
        };
        let words = word_counter(
            "tollgate_words_total",
            "Words in sampled prompts and answers (numbers.word_sample_rate), by tokenizer family and writing system.",
        )?;
        let word_chars = word_counter(
            "tollgate_word_chars_total",
            "Characters (not whitespace) in sampled prompts and answers.",
        )?;
        let word_tokens = word_counter(
            "tollgate_word_tokens_total",
            "Tokens the provider reported for the sampled prompts and answers.",
        )?;
        for c in [&capped, &extra_choices, &words, &word_chars, &word_tokens] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(SharedCollector(batch_saving.clone())))?;
        Ok(Metrics {
            registry,
            model_labels: LabelSet::new(MAX_MODEL_LABELS),
            team_labels: LabelSet::new(MAX_TEAM_LABELS),
            series: RwLock::new(HashMap::new()),
            requests,
            tokens,
            units,
            cost,
            request_duration,
            time_to_first_byte,
            overhead,
            model_price,
            finetune_multiple,
            selfhosted_usd_per_mtok,
            selfhosted_tokens_per_second,
            finetune_premium,
            unpriced,
            cost_by_component,
            cost_by_tier,
            cache_savings,
            price_fallbacks,
            budget_overrun,
            estimated_usage,
            queue_depth,
            budget_limit,
            budget_spent,
            budget_remaining,
            pending_usage,
            pending_overdue,
            retention_lag,
            retention_deleted,
            retention_partitions_dropped,
            otel_spans,
            budget_rejections,
            level_budget_limit,
            level_budget_spent,
            level_budget_remaining,
            level_budgets,
            level_rejections,
            rate_limited,
            rate_limits,
            alerts_sent,
            records_dropped,
            upstream_attempts,
            shadow_cost,
            capped,
            extra_choices,
            batch_saving,
            words,
            word_chars,
            word_tokens,
        })
    }

    /// The metric label for a client's model id (see `MAX_MODEL_LABELS`).
    pub fn model_label(&self, model: &str) -> String {
        self.model_labels.label(model)
    }

    /// The metric label for a team (see `MAX_TEAM_LABELS`).
    pub fn team_label(&self, team: &str) -> String {
        self.team_labels.label(team)
    }

    fn known_series(&self, team_label: &str, model_label: &str) -> Option<Arc<Series>> {
        let map = self.series.read().ok()?;
        map.get(team_label)?.get(model_label).cloned()
    }

    /// The handles of one team and model label, created on first use. The
    /// map is keyed by labels, so it is bounded like the exported series.
    pub fn series(&self, team: &str, model_label: &str) -> Arc<Series> {
        if let Some(s) = self.known_series(team, model_label) {
            return s;
        }
        let team = self.team_label(team);
        if let Some(s) = self.known_series(&team, model_label) {
            return s;
        }
        let team = team.as_str();
        let make = || {
            Arc::new(Series {
                team: team.to_string(),
                model: model_label.to_string(),
                tokens: Default::default(),
                cost: OnceLock::new(),
                component_cost: Default::default(),
                tier_cost: Default::default(),
                cache_savings: OnceLock::new(),
                batch_saving: OnceLock::new(),
                time_to_first_byte: OnceLock::new(),
                endpoints: Default::default(),
            })
        };
        match self.series.write() {
            Ok(mut map) => map
                .entry(team.to_string())
                .or_default()
                .entry(model_label.to_string())
                .or_insert_with(make)
                .clone(),
            Err(_) => make(),
        }
    }

    /// Exports every catalog price and every fine-tuned row's multiple over its base.
    pub fn publish_catalog(&self, catalog: &Arc<Catalog>) {
        self.model_price.publish(catalog);
        for (model, base, ft, base_price) in catalog.finetune_pairs() {
            self.set_finetune_multiple(model, &base, ft, base_price);
        }
    }

    pub fn set_finetune_multiple(
        &self,
        model: &str,
        base_model: &str,
        ft: &crate::pricing::ModelPrice,
        base: &crate::pricing::ModelPrice,
    ) {
        for (kind, f, b) in [
            ("input", ft.input(), base.input()),
            ("output", ft.output(), base.output()),
        ] {
            if b.0 > 0 {
                self.finetune_multiple
                    .with_label_values(&[model, base_model, kind])
                    .set(f.0 as f64 / b.0 as f64);
            }
        }
    }

    /// Self-hosted models' windows, set at scrape time (a model leaves when
    /// the catalog no longer prices it by GPU).
    pub fn publish_selfhosted(&self, readings: &[crate::pricing::gpu::GpuReading]) {
        self.selfhosted_usd_per_mtok.reset();
        self.selfhosted_tokens_per_second.reset();
        for r in readings {
            self.selfhosted_usd_per_mtok
                .with_label_values(&[&r.model])
                .set(r.usd_per_mtok);
            self.selfhosted_tokens_per_second
                .with_label_values(&[&r.model])
                .set(r.tokens_per_second);
        }
    }

    /// Budget gauges from the ledger, set at scrape time.
    /// A request of `team` refused by a rate limit.
    pub fn count_rate_limited(&self, team: &str, unit: crate::period::Unit) {
        let team = self.team_label(team);
        self.rate_limited
            .with_label_values(&[&team, unit.as_str()])
            .inc();
    }

    /// A refusal by a budget at `level`.
    pub fn count_level_rejection(&self, level: crate::period::Level) {
        self.level_rejections
            .with_label_values(&[level.as_str()])
            .inc();
    }

    pub fn publish_budgets(&self, budgets: &[(String, crate::period::BudgetStatus)]) {
        use crate::period::{level_of, Level};
        for g in [
            &self.budget_limit,
            &self.budget_spent,
            &self.budget_remaining,
            &self.level_budget_limit,
            &self.level_budget_spent,
            &self.level_budget_remaining,
        ] {
            g.reset();
        }
        let mut below: Vec<(Level, &str, &crate::period::BudgetStatus)> = Vec::new();
        let mut counts = [0i64; 4];
        for (account, s) in budgets {
            let (level, name) = level_of(account);
            counts[level as usize] += 1;
            if level != Level::Team {
                below.push((level, name, s));
            }
        }
        for level in Level::ALL {
            self.level_budgets
                .with_label_values(&[level.as_str()])
                .set(counts[level as usize]);
        }
        // Those nearest their limit first, a bounded number per level.
        below.sort_by_key(|(level, _, s)| (*level, s.remaining.0));
        let mut shown = [0usize; 4];
        for (level, name, s) in below {
            if shown[level as usize] >= MAX_LEVEL_BUDGET_LABELS {
                continue;
            }
            shown[level as usize] += 1;
            let labels = [level.as_str(), name];
            self.level_budget_limit
                .with_label_values(&labels)
                .set(s.limit.as_usd_f64());
            self.level_budget_spent
                .with_label_values(&labels)
                .set(s.spent.as_usd_f64());
            self.level_budget_remaining
                .with_label_values(&labels)
                .set(s.remaining.as_usd_f64());
        }
        for (team, s) in budgets.iter().filter(|(a, _)| level_of(a).0 == Level::Team) {
            // Born at 0, so the first rejection is an increase alerts can see.
            self.budget_rejections.with_label_values(&[team]).inc_by(0);
            self.budget_limit
                .with_label_values(&[team])
                .set(s.limit.as_usd_f64());
            self.budget_spent
                .with_label_values(&[team])
                .set(s.spent.as_usd_f64());
            self.budget_remaining
                .with_label_values(&[team])
                .set(s.remaining.as_usd_f64());
        }
    }

    /// The pending gauges from the database's counts per team (teams as
    /// labels, bounded like every team label), and the overdue of them.
    pub fn publish_pending(&self, counts: &[(String, u64)], overdue: &[(String, u64)]) {
        self.pending_usage.reset();
        self.pending_overdue.reset();
        for (team, n) in counts {
            let team = self.team_label(team);
            self.pending_usage
                .with_label_values(&[&team])
                .add(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        for (team, n) in overdue {
            let team = self.team_label(team);
            self.pending_overdue
                .with_label_values(&[&team])
                .add(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }

    pub fn render(&self) -> Result<String, String> {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .map_err(|e| e.to_string())?;
        String::from_utf8(buf).map_err(|e| e.to_string())
    }
}

/// `tollgate_model_price_usd_per_token{model, kind}`, read from the catalog
/// in use when scraped: a gauge child per catalog row and kind would keep
/// ~2 KiB per series resident for the life of the process (~0.7 MiB for the
/// bundled catalog).
pub struct CatalogPrices {
    desc: Desc,
    catalog: RwLock<Option<Arc<Catalog>>>,
}

impl CatalogPrices {
    fn new() -> prometheus::Result<Self> {
        Ok(CatalogPrices {
            desc: Desc::new(
                "tollgate_model_price_usd_per_token".to_string(),
                "Catalog price per token.".to_string(),
                vec!["model".to_string(), "kind".to_string()],
                HashMap::new(),
            )?,
            catalog: RwLock::new(None),
        })
    }

    /// Exports `catalog` from now on (a reload drops removed models).
    pub fn publish(&self, catalog: &Arc<Catalog>) {
        if let Ok(mut c) = self.catalog.write() {
            *c = Some(catalog.clone());
        }
    }
}

impl Collector for CatalogPrices {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(catalog) = self.catalog.read().ok().and_then(|c| c.clone()) else {
            return Vec::new();
        };
        let label = |name: &str, value: &str| {
            let mut p = LabelPair::default();
            p.set_name(name.to_string());
            p.set_value(value.to_string());
            p
        };
        let mut metrics = Vec::new();
        for (model, price) in catalog.rows() {
            for (kind, rate) in [("input", price.input()), ("output", price.output())] {
                let mut m = Metric::default();
                m.set_label(vec![label("model", model), label("kind", kind)]);
                let mut g = prometheus::proto::Gauge::default();
                g.set_value(rate.usd_per_token());
                m.set_gauge(g);
                metrics.push(m);
            }
        }
        let mut family = MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(MetricType::GAUGE);
        family.set_metric(metrics);
        vec![family]
    }
}

/// Registers a collector the metrics keep a handle to.
struct SharedCollector<C>(Arc<C>);

impl<C: Collector> Collector for SharedCollector<C> {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }
    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_kinds_are_the_totals_then_the_meters_by_name() {
        let meters: Vec<&str> = Meter::ALL
            .iter()
            .filter(|m| m.is_token())
            .map(|m| m.name())
            .collect();
        assert_eq!(&TOKEN_KINDS[2..2 + meters.len()], meters.as_slice());
        assert_eq!(TOKEN_KINDS[..2], ["prompt", "completion"]);
        assert_eq!(TOKEN_KINDS.last(), Some(&"reasoning"));
    }

    #[test]
    fn model_labels_are_capped() {
        let m = Metrics::new().unwrap_or_else(|e| panic!("{e}"));
        for i in 0..MAX_MODEL_LABELS {
            assert_eq!(m.model_label(&format!("m{i}")), format!("m{i}"));
        }
        assert_eq!(m.model_label("one-too-many"), "other");
        assert_eq!(m.model_label("m7"), "m7");
        for i in 0..MAX_TEAM_LABELS {
            assert_eq!(m.team_label(&format!("t{i}")), format!("t{i}"));
        }
        assert_eq!(m.team_label("late-team"), "other");
        let long = "é".repeat(200);
        assert_eq!(bounded(&long).len(), 256);
        assert!(long.starts_with(bounded(&long)));
    }

    #[test]
    fn money_counter_sums_exactly_and_renders_usd() {
        let m = Metrics::new().unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..10 {
            m.cost.add(&["t", "gpt-4o"], NanoUsd(100_000_000)); // $0.1 ten times
        }
        assert_eq!(m.cost.get(&["t", "gpt-4o"]), NanoUsd(1_000_000_000));
        let text = m.render().unwrap_or_default();
        assert!(
            text.contains("tollgate_cost_usd_total{team=\"t\",model=\"gpt-4o\"} 1\n"),
            "{text}"
        );
    }
}
