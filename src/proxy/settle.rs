//! The end of every proxied request: price the usage, update the metrics,
//! hand the usage row to the writer. Called exactly once per attributed
//! request, whichever way it ended.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::app::AppState;
use crate::metrics::{Metrics, Series};
use crate::pricing::gpu::GpuPrice;
use crate::pricing::{Breakdown, Line, NanoUsd, Priced, Resolved};
use crate::store::UsageRecord;
use crate::usage::read::Served;
use crate::usage::{Endpoint, ServiceTier, ToolCalls, Usage};

/// Who asked for what: everything the usage row needs besides the outcome.
pub struct RequestCtx {
    pub request_id: String,
    pub started: Instant,
    pub created_at: DateTime<Utc>,
    pub team: String,
    /// The virtual key used (`virtual-keys` mode).
    pub key: Option<std::sync::Arc<crate::auth::KeyEntry>>,
    /// Budget held for this request until it settles.
    pub reservation: Option<crate::budget::Reservation>,
    /// The team's budget left, as last seen (for `x-tollgate-budget-remaining-usd`).
    pub budget_remaining: Option<NanoUsd>,
    pub endpoint: Endpoint,
    pub model: String,
    /// `model` as a metric label (capped in number, see `metrics::MAX_MODEL_LABELS`).
    pub model_label: String,
    pub resolved: Option<Resolved>,
    pub upstream: String,
    /// The upstream's provider (`provider::Provider::name`): `azure` always;
    /// `openai` gives way to the catalog row's (`deepseek` behind an
    /// OpenAI-compatible API).
    pub provider: &'static str,
    pub stream: bool,
    /// What the client speaks (routing, usage readers, error shape).
    pub format: crate::format::WireFormat,
    /// Upstreams tried, the one that answered included (fallbacks).
    pub attempts: u16,
    /// Choices asked for (`n`).
    pub choices: u16,
    pub end_user: Option<String>,
    /// The shared budget period the reservation was leased from (Postgres).
    pub budget_period: Option<String>,
    /// Durable mode: answered when the usage row is on local disk; the
    /// response does not complete before.
    pub durable_ack: Option<tokio::sync::oneshot::Sender<()>>,
    /// Metric handles for (team, model_label); see `RequestCtx::series`.
    series: Option<Arc<Series>>,
}

impl RequestCtx {
    pub fn new(request_id: String, endpoint: Endpoint, team: String) -> RequestCtx {
        RequestCtx {
            request_id,
            started: Instant::now(),
            created_at: Utc::now(),
            team,
            key: None,
            reservation: None,
            budget_remaining: None,
            endpoint,
            model: String::new(),
            model_label: String::new(),
            resolved: None,
            upstream: String::new(),
            provider: "openai",
            stream: false,
            format: crate::format::WireFormat::OpenAi,
            attempts: 1,
            choices: 1,
            end_user: None,
            budget_period: None,
            durable_ack: None,
            series: None,
        }
    }

    /// This request's metric handles. Resolved on first use, which comes
    /// after `model_label` is final. Lent, not cloned: the handles are shared
    /// by every request of a (team, model), and each clone would write their
    /// reference count, a cache line the other workers write too.
    pub fn series(&mut self, metrics: &Metrics) -> &Series {
        self.series
            .get_or_insert_with(|| metrics.series(&self.team, &self.model_label))
    }
}

/// `settle` for an answer that carries no usage (an error, an unmetered
/// path): status and timing are recorded, nothing is billed.
pub fn settle_without_usage(
    state: &AppState,
    ctx: &mut RequestCtx,
    status: u16,
    overhead: Duration,
) -> NanoUsd {
    settle(
        state,
        ctx,
        status,
        Usage::NONE,
        &Served::default(),
        overhead,
    )
}

/// Prices `usage` from what the response says was served (`served`),
/// records metrics and the usage row; returns the cost.
///
/// The request's last use of its identity: the strings the row needs are
/// moved into it, not copied, so `ctx` keeps only what the response still
/// needs (budget left, metric handles, timings).
pub fn settle(
    state: &AppState,
    ctx: &mut RequestCtx,
    status: u16,
    mut usage: Usage,
    served: &Served,
    overhead: Duration,
) -> NanoUsd {
    let m = &state.metrics;
    // Taken out and put back: a move, not a reference-count write.
    let series = match ctx.series.take() {
        Some(series) => series,
        None => m.series(&ctx.team, &ctx.model_label),
    };
    // The served model prices the request when the catalog knows it (a
    // dated snapshot can cost twice its alias); else the requested one.
    if let Some(model) = served.model.as_deref().filter(|m| *m != ctx.model) {
        let resolved = state.catalog.load().resolve(model);
        if resolved.price.is_some() {
            ctx.resolved = Some(resolved);
        }
    }
    let tier = served.tier.unwrap_or(ServiceTier::Standard);
    usage.tool_calls = merged_tool_calls(usage.tool_calls, served.tool_calls);
    let price = ctx.resolved.as_ref().and_then(|r| r.price.as_deref());
    // A chat search model (`gpt-4o-search-preview`, `gpt-5-search-api`)
    // searches once per answer; its response lists no calls.
    let searched = ctx.endpoint == crate::usage::Endpoint::ChatCompletions
        && status == 200
        && usage.tool_calls.web_search == 0
        && ctx
            .resolved
            .as_ref()
            .is_some_and(|r| is_search_model(&r.base_model));
    if searched {
        usage.tool_calls.web_search = 1;
    }
    // The catalog's own tool-call fees, only when there are calls to price.
    let catalog = (usage.tool_calls.total() > 0).then(|| state.catalog.load());
    let fees = catalog.as_ref().map_or(&[][..], |c| c.tool_call_fees());
    let gpu = price.and_then(|p| p.gpu.as_deref());
    let priced = match (gpu, ctx.resolved.as_ref()) {
        // Self-hosted: its tokens' share of the GPUs' trailing window.
        (Some(gpu), Some(resolved)) => gpu_priced(state, &resolved.base_model, gpu, &usage),
        _ => price.map_or_else(Priced::default, |p| p.price(&usage, tier, fees)),
    };
    let cost = priced.total;
    if let Some(reservation) = ctx.reservation.take() {
        let over = cost.0.saturating_sub(reservation.amount().0);
        if over > 0 {
            m.budget_overrun.add(&[series.team()], NanoUsd(over));
        }
        ctx.budget_period = reservation.shared_period();
        ctx.budget_remaining = reservation.settle(cost);
    }

    series.count_request(m, ctx.endpoint, status);
    for (kind, n) in token_kinds(&usage).into_iter().enumerate() {
        if n > 0 {
            series.add_tokens(m, kind, n);
        }
    }
    let (team, model) = (series.team(), ctx.model_label.as_str());
    if let Some(reason) = priced.fallback {
        m.price_fallbacks.with_label_values(&[model, reason]).inc();
    }
    if let Some(resolved) = &ctx.resolved {
        if cost.0 > 0 || price.is_some() {
            series.add_cost(m, cost);
            for (line, nano) in priced.breakdown.lines() {
                series.add_component_cost(m, line, NanoUsd(nano));
            }
            series.add_tier_cost(m, tier, cost);
            if priced.cache_savings.0 > 0 {
                series.add_cache_savings(m, priced.cache_savings);
            }
        }
        if price.is_none() && ctx.endpoint.is_metered() {
            m.unpriced.with_label_values(&[model]).inc();
        }
        if let (true, Some(ft), Some(base)) = (resolved.finetuned, price, &resolved.base_price) {
            let on_base = base.price(&usage, tier, fees).total;
            let premium = NanoUsd(cost.0.saturating_sub(on_base.0));
            m.finetune_premium
                .add(&[team, model, &resolved.base_model], premium);
            m.set_finetune_multiple(model, &resolved.base_model, ft, base);
        }
    }
    if served.capped {
        m.capped.with_label_values(&[team, model]).inc();
    }
    if ctx.choices > 1 && status == 200 {
        m.extra_choices
            .with_label_values(&[team, model])
            .inc_by(u64::from(ctx.choices - 1));
    }
    // What the Batch API would have charged for a request that did not
    // need an answer now (not streamed, served at standard prices).
    if let (Some(p), true) = (
        price,
        !ctx.stream && status == 200 && served.tier.is_none_or(|t| t == ServiceTier::Standard),
    ) {
        if p.batch.is_some() && gpu.is_none() {
            let at_batch = p.total(&usage, ServiceTier::Batch, fees);
            if cost.0 > at_batch.0 {
                series.add_batch_saving(m, NanoUsd(cost.0 - at_batch.0));
            }
        }
    }
    if !state.config.shadow.is_empty() && (usage.prompt_tokens > 0 || usage.completion_tokens > 0) {
        shadow_price(state, ctx, series.team(), &usage, tier);
    }
    if usage.source == crate::usage::TokenSource::Estimated && ctx.endpoint.is_metered() {
        m.estimated_usage.with_label_values(&[model]).inc();
    }
    let latency = ctx.started.elapsed();
    series.observe_duration(
        m,
        ctx.endpoint,
        latency.as_secs_f64(),
        overhead.min(latency).as_secs_f64(),
    );

    ctx.series = Some(series);

    let resolved = ctx.resolved.take();
    let provider = match ctx.provider {
        "openai" => resolved
            .as_ref()
            .and_then(|r| r.price.as_ref())
            .and_then(|p| p.provider)
            .unwrap_or("openai"),
        fixed => fixed,
    };
    let model = std::mem::take(&mut ctx.model);
    let ack = ctx.durable_ack.take();
    state.usage.record(
        Box::new(UsageRecord {
            created_at: ctx.created_at,
            request_id: std::mem::take(&mut ctx.request_id),
            team: std::mem::take(&mut ctx.team),
            key_id: ctx.key.take().map(|k| k.id.clone()),
            base_model: resolved.map_or_else(|| model.clone(), |r| r.base_model),
            model,
            upstream: std::mem::take(&mut ctx.upstream),
            endpoint: ctx.endpoint.label(),
            stream: ctx.stream,
            status,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cached_tokens: usage.cached_tokens,
            cost_nano_usd: cost.0,
            token_source: usage.source.label(),
            latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
            end_user: ctx.end_user.take(),
            service_tier: served.tier.and_then(ServiceTier::label),
            reasoning_tokens: usage.reasoning_tokens,
            audio_prompt_tokens: usage.audio_prompt_tokens,
            audio_completion_tokens: usage.audio_completion_tokens,
            cache_write_tokens: usage.cache_write_tokens + usage.cache_write_1h_tokens,
            image_tokens: usage.image_prompt_tokens + usage.image_completion_tokens,
            tool_calls: usage.tool_calls.total(),
            provider,
            attempts: ctx.attempts,
            choices: ctx.choices,
            capped: served.capped,
            cost_breakdown: priced.breakdown,
            meters: crate::usage::meter::Meters::of(&usage),
            budget_period: ctx.budget_period.take(),
            lease_node: None,
        }),
        ack,
    );
    cost
}

/// This request as a word-count sample (`words`), built only for the
/// requests sampled: filed under the served model when the catalog knows
/// it (as pricing does), else the one asked for.
pub fn word_sample(
    state: &AppState,
    ctx: &RequestCtx,
    served_model: Option<&str>,
    request: bytes::Bytes,
    answer: crate::words::Answer,
    usage: Usage,
) -> crate::words::Sample {
    let catalog = state.catalog.load();
    let model = served_model
        .filter(|m| catalog.resolve(m).price.is_some())
        .unwrap_or(&ctx.model);
    crate::words::Sample {
        team: ctx.team.clone(),
        model: model.to_string(),
        endpoint: ctx.endpoint,
        format: ctx.format,
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
    breakdown.0[Line::Gpu as usize] = cost.0;
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
fn shadow_price(state: &AppState, ctx: &RequestCtx, team: &str, usage: &Usage, tier: ServiceTier) {
    let catalog = state.catalog.load();
    for alt in state.config.shadows_of(&ctx.model) {
        let resolved = catalog.resolve(alt);
        let Some(price) = resolved.price.as_deref() else {
            continue;
        };
        let cost = price.price(usage, tier, catalog.tool_call_fees()).total;
        state
            .metrics
            .shadow_cost
            .add(&[team, &ctx.model_label, alt], cost);
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

/// Token counts in `metrics::TOKEN_KINDS` order.
pub fn token_kinds(u: &Usage) -> [u64; crate::metrics::TOKEN_KINDS.len()] {
    [
        u.prompt_tokens,
        u.completion_tokens,
        u.cached_tokens,
        u.reasoning_tokens,
        u.audio_prompt_tokens,
        u.audio_completion_tokens,
        u.cache_write_tokens + u.cache_write_1h_tokens,
        u.image_prompt_tokens + u.image_completion_tokens,
    ]
}
