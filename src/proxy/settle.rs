//! The last stage (admit -> route -> reserve -> forward -> settle): price
//! the usage, update the metrics, hand the usage row to the writer. Called
//! exactly once per attributed request, whichever way it ended, with the
//! `Ticket` the earlier stages' values make up.
//!
//! Never awaits: the row goes onto the writer's queue, and the budget is
//! settled in memory (a shared budget's lease is topped up by `reserve`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::app::AppState;
use crate::format::WireFormat;
use crate::metrics::{Metrics, Series};
use crate::pricing::gpu::GpuPrice;
use crate::pricing::{Breakdown, Line, NanoUsd, Priced, Resolved};
use crate::store::UsageRecord;
use crate::usage::read::Served;
use crate::usage::{Endpoint, ServiceTier, ToolCalls, Usage};

/// Who asked, and how: `admit`'s value.
pub struct Admission {
    pub request_id: String,
    pub started: Instant,
    pub created_at: DateTime<Utc>,
    /// What the client speaks (routing, usage readers, error shape).
    pub format: WireFormat,
    pub endpoint: Endpoint,
    pub team: String,
    /// The virtual key used (`virtual-keys` mode).
    pub key: Option<Arc<crate::auth::KeyEntry>>,
    /// The client's `traceparent` header, kept only with `[otel]` on.
    pub trace_parent: Option<String>,
}

/// What was asked for, as it is priced: `route`'s value (`Order::NONE`
/// for a request that never got that far, or that names no model).
pub struct Order {
    /// The catalog model (an Azure deployment's model, not its name).
    pub model: String,
    /// `model` as a metric label (capped in number, see `metrics::MAX_MODEL_LABELS`).
    pub model_label: String,
    pub resolved: Option<Resolved>,
    pub stream: bool,
    /// Choices asked for (`n`).
    pub choices: u16,
    pub end_user: Option<String>,
    /// `x-tollgate-tags`, sorted and distinct.
    pub tags: Vec<String>,
    /// What the request says of its units (images, audio, characters).
    pub units: crate::format::request::Units,
    /// `background: true` (SPEC 12): billed when it finishes (`background`).
    pub background: bool,
    /// The batch whose result line this is (`batch`).
    pub batch_id: Option<String>,
}

impl Order {
    pub const NONE: Order = Order {
        model: String::new(),
        model_label: String::new(),
        resolved: None,
        stream: false,
        choices: 1,
        end_user: None,
        tags: Vec::new(),
        units: crate::format::request::Units {
            image_spec: None,
            audio_bytes: None,
            characters: None,
        },
        background: false,
        batch_id: None,
    };

    /// The tokenizer for estimates: the catalog's for the model, else o200k.
    pub fn encoding(&self) -> crate::usage::Encoding {
        self.resolved
            .as_ref()
            .map_or(crate::usage::Encoding::O200kBase, |r| r.encoding())
    }
}

/// The team's budget as far as this request goes: `reserve`'s value.
#[derive(Default)]
pub struct Hold {
    /// Held until the request settles.
    pub reservation: Option<crate::budget::Reservation>,
    /// The budget left, as last seen (`x-tollgate-budget-remaining-usd`).
    pub remaining: Option<NanoUsd>,
}

/// Where the request went: `forward`'s value.
#[derive(Clone)]
pub struct Sent {
    pub upstream: String,
    /// The upstream's provider (`provider::Provider::name`): `azure` always;
    /// `openai` gives way to the catalog row's (`deepseek` behind an
    /// OpenAI-compatible API).
    pub provider: &'static str,
    /// Upstreams tried, the one that answered included (fallbacks).
    pub attempts: u16,
}

impl Sent {
    pub const NOWHERE: Sent = Sent {
        upstream: String::new(),
        provider: "openai",
        attempts: 1,
    };

    /// Sent once to `upstream`.
    pub fn to(upstream: &crate::upstream::Upstream) -> Sent {
        Sent {
            upstream: upstream.name.clone(),
            provider: upstream.provider.name(),
            attempts: 1,
        }
    }

    /// Sent once to the upstream named in a stored row (a parked response,
    /// a batch); `openai` if the configuration no longer has it.
    pub fn to_named(upstreams: &crate::upstream::Upstreams, name: String) -> Sent {
        Sent {
            provider: upstreams
                .by_name(&name)
                .map_or("openai", |u| u.provider.name()),
            upstream: name,
            attempts: 1,
        }
    }
}

/// Everything the usage row needs besides the outcome: one value per stage
/// that has run, each put in whole as its stage returns it.
pub struct Ticket {
    pub who: Admission,
    pub order: Order,
    pub hold: Hold,
    /// Its place in its team's and key's rate limits (`reserve::admit_rate`).
    pub rate: Option<crate::limits::RateHold>,
    pub sent: Sent,
    /// Durable mode: answered when the usage row is on local disk; the
    /// response does not complete before.
    durable_ack: Option<tokio::sync::oneshot::Sender<()>>,
    /// Metric handles for (team, model_label); see `Ticket::series`.
    series: Option<Arc<Series>>,
    /// A background response in passthrough mode: the client's credentials,
    /// for tollgate to poll it with (`background`). Memory only.
    pub poll_credentials: Option<Box<http::HeaderMap>>,
}

/// What settling leaves for the response.
pub struct Settled {
    pub cost: NanoUsd,
    pub remaining: Option<NanoUsd>,
    pub series: Arc<Series>,
}

impl Ticket {
    /// The budget accounts this request is reserved from (SPEC 14): its
    /// team's, key's, end user's and tags' (those without a budget skipped).
    pub fn budget_accounts(&self) -> Vec<String> {
        crate::budget::accounts_of(
            &self.who.team,
            self.who.key.as_ref().map(|k| k.id.as_str()),
            self.order.end_user.as_deref(),
            &self.order.tags,
        )
    }

    pub fn new(who: Admission, durable_ack: Option<tokio::sync::oneshot::Sender<()>>) -> Ticket {
        Ticket {
            who,
            order: Order::NONE,
            hold: Hold::default(),
            rate: None,
            sent: Sent::NOWHERE,
            durable_ack,
            series: None,
            poll_credentials: None,
        }
    }

    /// The ticket of a row billed after the request that made it ended (a
    /// parked response, a batch line, a realtime response): who, the model
    /// served, where it went.
    pub fn for_row(state: &AppState, who: Admission, model: String, sent: Sent) -> Ticket {
        let mut ticket = Ticket::new(who, None);
        ticket.order = Order {
            model_label: state.metrics.model_label(&model),
            resolved: Some(state.catalog.load().resolve(&model)),
            model,
            ..Order::NONE
        };
        ticket.sent = sent;
        ticket
    }

    /// Answers the durable ack now: the request's row comes later (a
    /// background response, recorded as pending meanwhile).
    pub fn answer_durable(&mut self) {
        if let Some(ack) = self.durable_ack.take() {
            let _ = ack.send(());
        }
    }

    /// This request's metric handles. Resolved on first use, which comes
    /// after the order's label is final. Lent, not cloned: the handles are
    /// shared by every request of a (team, model), and each clone would
    /// write their reference count, a cache line the other workers write too.
    pub fn series(&mut self, metrics: &Metrics) -> &Series {
        self.series
            .get_or_insert_with(|| metrics.series(&self.who.team, &self.order.model_label))
    }
}

/// `settle` for an answer that carries no usage (an error, an unmetered
/// path): status and timing are recorded, nothing is billed.
pub fn settle_without_usage(
    state: &AppState,
    ticket: Ticket,
    status: u16,
    overhead: Duration,
) -> Settled {
    settle(
        state,
        ticket,
        status,
        Usage::NONE,
        &Served::default(),
        overhead,
    )
}

/// Prices `usage` from what the response says was served (`served`),
/// records metrics and hands the usage row to the writer; the ticket's
/// strings move into the row.
pub fn settle(
    state: &AppState,
    mut t: Ticket,
    status: u16,
    usage: Usage,
    served: &Served,
    overhead: Duration,
) -> Settled {
    let m = &state.metrics;
    // Taken out: a move, not a reference-count write.
    let series = match t.series.take() {
        Some(series) => series,
        None => m.series(&t.who.team, &t.order.model_label),
    };
    // The served model prices the request when the catalog knows it (a
    // dated snapshot can cost twice its alias); else the requested one.
    if let Some(model) = served.model.as_deref().filter(|m| *m != t.order.model) {
        let resolved = state.catalog.load().resolve(model);
        if resolved.price.is_some() {
            t.order.resolved = Some(resolved);
        }
    }
    let tier = served.tier.unwrap_or(ServiceTier::Standard);
    let usage = billed(&t, status, usage, served);
    let priced = price(state, &t.order, &usage, tier);
    let cost = priced.total;
    if let Some(rate) = t.rate.take() {
        rate.settle(usage.prompt_tokens.saturating_add(usage.completion_tokens));
    }
    let (remaining, budget_leases) = match t.hold.reservation.take() {
        Some(reservation) => {
            let over = cost.0.saturating_sub(reservation.amount().0);
            if over > 0 {
                m.budget_overrun.add(&[series.team()], NanoUsd(over));
            }
            let leases = reservation.shared_periods();
            (reservation.settle(cost), leases)
        }
        None => (t.hold.remaining, Vec::new()),
    };
    count(state, &t, &series, status, &usage, &priced, served);
    let latency = t.who.started.elapsed();
    series.observe_duration(
        m,
        t.who.endpoint,
        latency.as_secs_f64(),
        overhead.min(latency).as_secs_f64(),
    );
    let row = Row {
        status,
        usage,
        served,
        priced,
        budget_leases,
        latency,
    };
    record(state, t, row);
    Settled {
        cost,
        remaining,
        series,
    }
}

/// The usage as billed: tool calls reported twice counted once, and a chat
/// search model's one search per answer (its response lists no calls).
fn billed(t: &Ticket, status: u16, mut usage: Usage, served: &Served) -> Usage {
    usage.tool_calls = merged_tool_calls(usage.tool_calls, served.tool_calls);
    let searched = t.who.endpoint == Endpoint::ChatCompletions
        && status == 200
        && usage.tool_calls.web_search == 0
        && t.order
            .resolved
            .as_ref()
            .is_some_and(|r| is_search_model(&r.base_model));
    if searched {
        usage.tool_calls.web_search = 1;
    }
    if status == 200 {
        usage =
            crate::format::media::completed(t.who.endpoint, usage, &t.order.units, t.order.choices);
    }
    usage
}

/// The cost: a self-hosted model's share of its GPUs, else the catalog's
/// price at the tier served; nothing for an unpriced model.
fn price(state: &AppState, order: &Order, usage: &Usage, tier: ServiceTier) -> Priced {
    let price = order.resolved.as_ref().and_then(|r| r.price.as_deref());
    // The catalog's own tool-call fees, only when there are calls to price.
    let catalog = (usage.tool_calls.total() > 0).then(|| state.catalog.load());
    let fees = catalog.as_ref().map_or(&[][..], |c| c.tool_call_fees());
    match (
        price.and_then(|p| p.gpu.as_deref()),
        order.resolved.as_ref(),
    ) {
        // Self-hosted: its tokens' share of the GPUs' trailing window.
        (Some(gpu), Some(resolved)) => gpu_priced(state, &resolved.base_model, gpu, usage),
        _ => price.map_or_else(Priced::default, |p| p.price(usage, tier, fees)),
    }
}

/// The request's metrics: requests, tokens, cost and its lines, and what
/// the cost would have been elsewhere (base model, batch, shadows).
fn count(
    state: &AppState,
    t: &Ticket,
    series: &Series,
    status: u16,
    usage: &Usage,
    priced: &Priced,
    served: &Served,
) {
    let m = &state.metrics;
    let tier = served.tier.unwrap_or(ServiceTier::Standard);
    series.count_request(m, t.who.endpoint, status);
    for (kind, n) in token_kinds(usage).into_iter().enumerate() {
        if n > 0 {
            series.add_tokens(m, kind, n);
        }
    }
    let (team, model) = (series.team(), t.order.model_label.as_str());
    let units = crate::usage::meter::Meter::ALL
        .into_iter()
        .filter(|m| !m.is_token());
    for meter in units {
        match meter.count(usage) {
            0 => {}
            n => m
                .units
                .with_label_values(&[team, model, meter.name()])
                .inc_by(n),
        }
    }
    if let Some(reason) = priced.fallback {
        m.price_fallbacks.with_label_values(&[model, reason]).inc();
    }
    if let Some(resolved) = &t.order.resolved {
        let price = resolved.price.as_deref();
        if priced.total.0 > 0 || price.is_some() {
            series.add_cost(m, priced.total);
            for (line, nano) in priced.breakdown.lines() {
                series.add_component_cost(m, line, NanoUsd(nano));
            }
            series.add_tier_cost(m, tier, priced.total);
            if priced.cache_savings.0 > 0 {
                series.add_cache_savings(m, priced.cache_savings);
            }
        }
        if price.is_none() && t.who.endpoint.is_metered() {
            m.unpriced.with_label_values(&[model]).inc();
        }
        compared(state, t, series, status, usage, priced.total, served);
    }
    if served.capped {
        m.capped.with_label_values(&[team, model]).inc();
    }
    if t.order.choices > 1 && status == 200 {
        m.extra_choices
            .with_label_values(&[team, model])
            .inc_by(u64::from(t.order.choices - 1));
    }
    if usage.source == crate::usage::TokenSource::Estimated && t.who.endpoint.is_metered() {
        m.estimated_usage.with_label_values(&[model]).inc();
    }
}

/// What the same usage costs elsewhere: a fine-tune's base model, the
/// Batch API (for a request that did not need an answer now: not
/// streamed, served at standard prices), each `[[shadow]]` alternative.
fn compared(
    state: &AppState,
    t: &Ticket,
    series: &Series,
    status: u16,
    usage: &Usage,
    cost: NanoUsd,
    served: &Served,
) {
    let Some(price) = t.order.resolved.as_ref().and_then(|r| r.price.as_deref()) else {
        return;
    };
    let m = &state.metrics;
    let tier = served.tier.unwrap_or(ServiceTier::Standard);
    let (team, model) = (series.team(), t.order.model_label.as_str());
    let catalog = (usage.tool_calls.total() > 0).then(|| state.catalog.load());
    let fees = catalog.as_ref().map_or(&[][..], |c| c.tool_call_fees());
    if let Some(resolved) = t.order.resolved.as_ref().filter(|r| r.finetuned) {
        if let Some(base) = &resolved.base_price {
            let on_base = base.price(usage, tier, fees).total;
            let premium = NanoUsd(cost.0.saturating_sub(on_base.0));
            m.finetune_premium
                .add(&[team, model, &resolved.base_model], premium);
            m.set_finetune_multiple(model, &resolved.base_model, price, base);
        }
    }
    let standard = served.tier.is_none_or(|t| t == ServiceTier::Standard);
    if !t.order.stream && status == 200 && standard && price.batch.is_some() && price.gpu.is_none()
    {
        let at_batch = price.total(usage, ServiceTier::Batch, fees);
        if cost.0 > at_batch.0 {
            series.add_batch_saving(m, NanoUsd(cost.0 - at_batch.0));
        }
    }
    if !state.config.shadow.is_empty() && (usage.prompt_tokens > 0 || usage.completion_tokens > 0) {
        shadow_price(state, &t.order, team, usage, tier);
    }
}

/// The outcome half of a usage row.
struct Row<'a> {
    status: u16,
    usage: Usage,
    served: &'a Served,
    priced: Priced,
    budget_leases: Vec<(String, String)>,
    latency: Duration,
}

/// Hands the usage row to the writer (answering the durable ack once it
/// is on disk).
fn record(state: &AppState, t: Ticket, row: Row<'_>) {
    let Ticket {
        who,
        order,
        sent,
        durable_ack,
        ..
    } = t;
    let Row {
        usage,
        served,
        priced,
        ..
    } = &row;
    let provider = match sent.provider {
        "openai" => order
            .resolved
            .as_ref()
            .and_then(|r| r.price.as_ref())
            .and_then(|p| p.provider)
            .unwrap_or("openai"),
        fixed => fixed,
    };
    let base_model = match order.resolved {
        Some(r) => r.base_model,
        None => order.model.clone(),
    };
    // Only spans read these (`telemetry`): nothing is copied without them.
    let served_model = match state.config.otel.endpoint {
        Some(_) => served.model.clone().filter(|m| *m != order.model),
        None => None,
    };
    let tags = tags_json(&order.tags);
    let record = UsageRecord {
        created_at: who.created_at,
        request_id: who.request_id,
        team: who.team,
        key_id: who.key.map(|k| k.id.clone()),
        base_model,
        model: order.model,
        upstream: sent.upstream,
        endpoint: who.endpoint.label(),
        stream: order.stream,
        status: row.status,
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        cached_tokens: usage.cached(),
        cost_nano_usd: priced.total.0,
        token_source: usage.source.label(),
        latency_ms: u64::try_from(row.latency.as_millis()).unwrap_or(u64::MAX),
        end_user: order.end_user,
        service_tier: served.tier.and_then(ServiceTier::label),
        reasoning_tokens: usage.reasoning(),
        audio_prompt_tokens: usage.audio_prompt_tokens.unwrap_or(0),
        audio_completion_tokens: usage.audio_completion_tokens.unwrap_or(0),
        cache_write_tokens: usage.cache_writes(),
        image_tokens: usage.images(),
        tool_calls: usage.tool_calls.total(),
        provider,
        attempts: sent.attempts,
        choices: order.choices,
        capped: served.capped,
        cost_breakdown: priced.breakdown,
        meters: crate::usage::meter::Meters::of(usage),
        budget_leases: row.budget_leases,
        tags,
        lease_node: None,
        batch_id: order.batch_id,
        served_model,
        trace_parent: who.trace_parent,
    };
    state.usage.record(Box::new(record), durable_ack);
}

/// This request as a word-count sample (`words`), built only for the
/// requests sampled: filed under the served model when the catalog knows
/// it (as pricing does), else the one asked for.
pub fn word_sample(
    state: &AppState,
    t: &Ticket,
    served_model: Option<&str>,
    request: bytes::Bytes,
    answer: crate::words::Answer,
    usage: Usage,
) -> crate::words::Sample {
    let catalog = state.catalog.load();
    let model = served_model
        .filter(|m| catalog.resolve(m).price.is_some())
        .unwrap_or(&t.order.model);
    crate::words::Sample {
        team: t.who.team.clone(),
        model: model.to_string(),
        endpoint: t.who.endpoint,
        format: t.who.format,
        request,
        answer,
        usage,
    }
}

/// A self-hosted model's request: prompt and completion tokens at the
/// effective rate of its trailing window (`pricing::gpu`), all on the
/// breakdown's `gpu` line.
fn gpu_priced(state: &AppState, model: &str, gpu: &GpuPrice, usage: &Usage) -> Priced {
    let tokens = usage.prompt_tokens.saturating_add(usage.completion_tokens);
    if tokens == 0 {
        return Priced::default();
    }
    let cost = state.gpu.price_at(model, gpu, tokens, state.gpu.now());
    let mut breakdown = Breakdown::default();
    breakdown.0[Line::Gpu.index()] = cost.0;
    Priced {
        total: cost,
        breakdown,
        ..Priced::default()
    }
}

/// Prices `usage` as each model `[[shadow]]` names for the request's model
/// (same tokens, the tier served) into `tollgate_shadow_cost_usd_total`.
/// Only with shadow rules configured; an alternative the catalog cannot
/// price is skipped.
fn shadow_price(state: &AppState, order: &Order, team: &str, usage: &Usage, tier: ServiceTier) {
    let catalog = state.catalog.load();
    for alt in state.config.shadows_of(&order.model) {
        let resolved = catalog.resolve(alt);
        let Some(price) = resolved.price.as_deref() else {
            continue;
        };
        let cost = price.price(usage, tier, catalog.tool_call_fees()).total;
        state
            .metrics
            .shadow_cost
            .add(&[team, &order.model_label, alt], cost);
    }
}

/// Chat models that search the web on every answer (OpenAI's `*-search-*`).
pub fn is_search_model(model: &str) -> bool {
    model.contains("-search-")
}

/// Tool calls reported twice (the usage object and the output items) are
/// the same calls: the larger count of each kind stands.
fn merged_tool_calls(a: ToolCalls, b: ToolCalls) -> ToolCalls {
    ToolCalls {
        web_search: a.web_search.max(b.web_search),
        file_search: a.file_search.max(b.file_search),
    }
}

/// Token counts in `metrics::TOKEN_KINDS` order: the totals, each meter,
/// reasoning.
pub fn token_kinds(u: &Usage) -> [u64; crate::metrics::TOKEN_KINDS.len()] {
    let clamped = u.clamped();
    let mut out = [0; crate::metrics::TOKEN_KINDS.len()];
    out[0] = clamped.prompt_tokens;
    out[1] = clamped.completion_tokens;
    let tokens = crate::usage::meter::Meter::ALL
        .into_iter()
        .filter(|m| m.is_token());
    for (slot, m) in out[2..].iter_mut().zip(tokens) {
        *slot = m.count(&clamped);
    }
    out[out.len() - 1] = clamped.reasoning();
    out
}

/// The `tags` column: the tags as a JSON array (`None` without tags).
fn tags_json(tags: &[String]) -> Option<String> {
    (!tags.is_empty()).then(|| serde_json::Value::from(tags.to_vec()).to_string())
}
