//! The third stage: hold the request's worst-case cost against the team's
//! budget before anything is sent. Every prompt token at the highest
//! prompt-side rate and every output token at the highest output-side rate
//! of the tiers it may be served at, images at their worst detail,
//! built-in tool calls up to `max_tool_calls` (else
//! `budget.tool_call_allowance`). A cheap bound on the prompt (its byte
//! length) first; the exact tiktoken count only when the bound does not fit.
//!
//! Awaits the database only when a shared (Postgres) budget's lease runs
//! short, and then at most `database.lease_timeout_ms`.

use std::time::Duration;

use bytes::Bytes;

use super::body;
use super::settle::{Hold, Ticket};
use crate::app::AppState;
use crate::budget::Refusal;
use crate::error::ApiError;
use crate::format::request::RequestFacts;
use crate::pricing::{ModelPrice, NanoUsd};
use crate::usage::Endpoint;

/// Max output assumed for a model the catalog gives no limit for.
const DEFAULT_MAX_OUTPUT: u64 = 4096;

/// The request's place in the rate limits of `limited` (its team's and
/// key's, as `RateLimiter::applying` found them; SPEC 14): one
/// request and, where tokens are limited, its token bound (the prompt
/// counted, its most output), or 429 `rate_limit_exceeded`.
pub async fn admit_rate(
    state: &AppState,
    ticket: &Ticket,
    (limited, counts_tokens): &(Vec<String>, bool),
    body: &Bytes,
    max_output: Option<u64>,
) -> Result<Option<crate::limits::RateHold>, ApiError> {
    if limited.is_empty() {
        return Ok(None);
    }
    let counts_tokens = *counts_tokens;
    // A cheap bound first (every token at least a byte of the body); the
    // exact count only when that does not fit. Settling corrects either.
    let completion = match counts_tokens {
        false => 0,
        true => {
            let price = ticket
                .order
                .resolved
                .as_ref()
                .and_then(|r| r.price.as_deref());
            match ticket.who.endpoint {
                Endpoint::Embeddings => 0,
                _ => max_output
                    .or(price.and_then(|p| p.max_output_tokens))
                    .unwrap_or(DEFAULT_MAX_OUTPUT)
                    .saturating_mul(u64::from(ticket.order.choices)),
            }
        }
    };
    let bound = body.len() as u64 + 16;
    let tokens = |prompt: u64| match counts_tokens {
        false => 0,
        true => prompt.saturating_add(completion),
    };
    let mut admitted = rate_admit(state, limited, tokens(bound)).await;
    if let Err(crate::limits::RateRefusal::Limited(l)) = &admitted {
        if l.unit == crate::limits::Unit::Tokens {
            let exact = exact_prompt(ticket, body, bound).await;
            if exact < bound {
                admitted = rate_admit(state, limited, tokens(exact)).await;
            }
        }
    }
    match admitted {
        Ok(hold) => Ok(Some(hold)),
        Err(crate::limits::RateRefusal::Unavailable) => Err(ApiError::RateUnavailable {
            team: ticket.who.team.clone(),
        }),
        Err(crate::limits::RateRefusal::Limited(l)) => {
            state.metrics.count_rate_limited(&ticket.who.team, l.unit);
            Err(ApiError::rate_limited(&l))
        }
    }
}

async fn rate_admit(
    state: &AppState,
    limited: &[String],
    tokens: u64,
) -> Result<crate::limits::RateHold, crate::limits::RateRefusal> {
    match state.store.shared() {
        Some(pg) => {
            let timeout = Duration::from_millis(state.config.database.lease_timeout_ms);
            state
                .limits
                .admit_shared(pg, limited, tokens, timeout)
                .await
        }
        None => state
            .limits
            .admit(limited, tokens)
            .map_err(crate::limits::RateRefusal::Limited),
    }
}

/// The hold for this request, or why there is none (with the budget left,
/// for the refusal's header).
pub async fn reserve(
    state: &AppState,
    ticket: &Ticket,
    body: &Bytes,
    facts: &RequestFacts,
    max_output: Option<u64>,
) -> Result<Hold, (ApiError, Hold)> {
    let (who, order) = (&ticket.who, &ticket.order);
    let resolved = order.resolved.as_ref();
    let accounts = ticket.budget_accounts();
    let Some(price) = resolved.and_then(|r| r.price.as_deref()) else {
        // Unpriced: nothing to reserve, but the header still tells what is left.
        let remaining = state.ledger.remaining_of(&accounts);
        return Ok(Hold {
            reservation: None,
            remaining,
        });
    };
    let bound = Bound::of(state, ticket, &accounts, price, body, facts, max_output);
    let unavailable = || {
        let e = ApiError::BudgetUnavailable {
            team: who.team.clone(),
        };
        (e, Hold::default())
    };
    // Every token covers at least one byte of its text, and the JSON around
    // the text outweighs the per-message overheads.
    let mut prompt = body.len() as u64 + 16;
    prompt = prompt.saturating_add(
        who.format
            .added_prompt_bound(bound.has_tools, bound.searches),
    );
    match reserve_amount(state, &accounts, bound.worst(state, price, prompt)).await {
        Ok(reservation) => return Ok(held(reservation)),
        Err(Refusal::Unavailable) => return Err(unavailable()),
        Err(Refusal::Over(_)) => {}
    }
    let exact = exact_prompt(ticket, body, prompt).await;
    match reserve_amount(state, &accounts, bound.worst(state, price, exact)).await {
        Ok(reservation) => Ok(held(reservation)),
        Err(Refusal::Unavailable) => Err(unavailable()),
        Err(Refusal::Over(over)) => {
            let hold = Hold {
                reservation: None,
                remaining: Some(over.remaining),
            };
            Err((over_budget(state, &who.team, &over), hold))
        }
    }
}

fn held(reservation: Option<crate::budget::Reservation>) -> Hold {
    Hold {
        remaining: reservation.as_ref().map(|r| r.remaining()),
        reservation,
    }
}

/// Everything of the worst case but the prompt's tokens.
struct Bound {
    completion: u64,
    /// The unit meters' most (images asked for, an upload's longest
    /// duration, the characters to speak).
    units: crate::usage::Usage,
    tiers: [crate::usage::ServiceTier; 2],
    calls: Vec<(&'static str, u64)>,
    images: u64,
    searches: u64,
    has_tools: bool,
}

impl Bound {
    fn of(
        state: &AppState,
        ticket: &Ticket,
        accounts: &[String],
        price: &ModelPrice,
        body: &Bytes,
        facts: &RequestFacts,
        max_output: Option<u64>,
    ) -> Bound {
        let (who, order) = (&ticket.who, &ticket.order);
        let completion = match who.endpoint {
            Endpoint::Embeddings => 0,
            _ => max_output
                .or(price.max_output_tokens)
                .unwrap_or(DEFAULT_MAX_OUTPUT)
                .saturating_mul(u64::from(facts.n.unwrap_or(1))),
        };
        let mut calls = facts.tool_call_bound(state.config.budget.tool_call_allowance);
        let search_model = order
            .resolved
            .as_ref()
            .is_some_and(|r| super::settle::is_search_model(&r.base_model));
        if who.endpoint == Endpoint::ChatCompletions
            && search_model
            && !calls.iter().any(|(k, _)| *k == "web_search")
        {
            // A chat search model searches once per answer.
            calls.push(("web_search", u64::from(facts.n.unwrap_or(1))));
        }
        // Counting image parts parses the body: only for teams with a budget.
        let images = if body::mentions_images(body) && state.ledger.has_any(accounts) {
            body::image_token_bound(body)
        } else {
            0
        };
        let searches = calls
            .iter()
            .find(|(k, _)| *k == "web_search")
            .map_or(0, |(_, n)| *n);
        let asked = &facts.units;
        let units = crate::usage::Usage {
            images: asked.image_spec.map(|_| u64::from(facts.n.unwrap_or(1))),
            image_spec: asked.image_spec,
            audio_seconds: asked
                .audio_bytes
                .map(crate::format::media::audio_seconds_bound),
            characters: asked.characters,
            ..crate::usage::Usage::NONE
        };
        Bound {
            units,
            completion,
            tiers: facts.possible_tiers(),
            has_tools: facts.has_tools,
            calls,
            images,
            searches,
        }
    }

    fn worst(&self, state: &AppState, price: &ModelPrice, prompt: u64) -> NanoUsd {
        let catalog = state.catalog.load();
        let tokens = price.worst_case(
            prompt.saturating_add(self.images),
            self.completion,
            &self.tiers,
            &self.calls,
            catalog.tool_call_fees(),
        );
        NanoUsd(
            tokens
                .0
                .saturating_add(price.worst_units(&self.units, &self.tiers).0),
        )
    }
}

/// The prompt counted exactly, off the reactor threads; audio (which
/// tiktoken does not count) at the most tokens its size allows. Not for
/// another tokenizer's models: tiktoken is no bound on their count, so the
/// byte bound stands.
async fn exact_prompt(ticket: &Ticket, body: &Bytes, bound: u64) -> u64 {
    let (format, endpoint) = (ticket.who.format, ticket.who.endpoint);
    if !format.tiktoken_bounds_prompt() {
        return bound;
    }
    let encoding = ticket.order.encoding();
    let body = body.clone();
    tokio::task::spawn_blocking(move || {
        serde_json::from_slice::<serde_json::Value>(&body)
            .map(|v| {
                format
                    .prompt_tokens(endpoint, encoding, &v)
                    .saturating_add(body::audio_token_bound(&v))
            })
            .unwrap_or(bound)
    })
    .await
    .unwrap_or(bound)
}

/// The most one request of a batch may cost at the model's batch prices
/// (SPEC 12): every byte of its body a prompt token, its output limit (else
/// the model's) of output, its built-in tool calls; `None` when it cannot
/// be bounded (unreadable, no model, an unpriced model).
pub fn batch_line_bound(
    state: &AppState,
    format: crate::format::WireFormat,
    endpoint: Endpoint,
    body: &Bytes,
) -> Option<NanoUsd> {
    let facts = format
        .request_facts(endpoint, body, "application/json", true)
        .ok()?;
    let catalog = state.catalog.load();
    let resolved = catalog.resolve(facts.model());
    let price = resolved.price.as_deref()?;
    let completion = match endpoint {
        Endpoint::Embeddings => 0,
        _ => facts
            .output_limit
            .requested
            .or(price.max_output_tokens)
            .unwrap_or(DEFAULT_MAX_OUTPUT)
            .saturating_mul(u64::from(facts.n.unwrap_or(1))),
    };
    let calls = facts.tool_call_bound(state.config.budget.tool_call_allowance);
    let searches = calls
        .iter()
        .find(|(k, _)| *k == "web_search")
        .map_or(0, |(_, n)| *n);
    let images = match body::mentions_images(body) {
        true => body::image_token_bound(body),
        false => 0,
    };
    let prompt = (body.len() as u64 + 16)
        .saturating_add(format.added_prompt_bound(facts.has_tools, searches))
        .saturating_add(images);
    let tiers = [crate::usage::ServiceTier::Batch; 2];
    Some(price.worst_case(prompt, completion, &tiers, &calls, catalog.tool_call_fees()))
}

/// The 429 of a budget without room, counted in
/// `tollgate_budget_rejections_total{team}` (the team whose request it was)
/// and, for a budget below the team's, `{level}` too.
fn over_budget(state: &AppState, team: &str, over: &crate::budget::OverBudget) -> ApiError {
    state
        .metrics
        .budget_rejections
        .with_label_values(&[team])
        .inc();
    state.metrics.count_level_rejection(over.level().0);
    ApiError::over_budget(over)
}

/// The error a refused reservation answers with.
pub(super) fn refusal_error(state: &AppState, team: &str, refusal: Refusal) -> ApiError {
    match refusal {
        Refusal::Unavailable => ApiError::BudgetUnavailable {
            team: team.to_string(),
        },
        Refusal::Over(over) => over_budget(state, team, &over),
    }
}

/// Reserves from every budget of `accounts` in the local ledger; on
/// Postgres, from this replica's leases, topped up from the shared budgets
/// when they run short.
pub(super) async fn reserve_amount(
    state: &AppState,
    accounts: &[String],
    amount: NanoUsd,
) -> Result<Option<crate::budget::Reservation>, Refusal> {
    match state.store.shared() {
        Some(pg) => {
            let timeout = Duration::from_millis(state.config.database.lease_timeout_ms);
            state
                .ledger
                .reserve_shared(pg, accounts, amount, timeout)
                .await
        }
        None => state
            .ledger
            .reserve(accounts, amount)
            .map_err(Refusal::Over),
    }
}
