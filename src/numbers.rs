//! "The numbers every LLM developer should know", measured on the usage
//! table (`tollgate numbers`): where a change would save money, and how
//! much. Pure functions over stored rows and the catalog in use; never on
//! the request path.
//!
//! Money is integer nano-USD; ratios are floats rounded to 4 decimals.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::pricing::{Catalog, Line, ModelPrice, NanoUsd};
use crate::store::{CountsRow, WordCount};
use crate::usage::{ServiceTier, Usage};

/// The seed's low end: "answer briefly" saves 40-90% of output tokens.
pub const SHORTER_ANSWERS_PERCENT: u64 = 40;

/// Endpoints that generate text (vs embeddings).
fn generates(endpoint: &str) -> bool {
    matches!(
        endpoint,
        "chat.completions" | "completions" | "responses" | "messages"
    )
}

fn output_cost(row: &CountsRow) -> u64 {
    let lines: u64 = Line::ALL
        .iter()
        .zip(row.breakdown)
        // The lines of output-side meters.
        .filter(|(l, _)| l.meter().is_some_and(|m| m.is_completion()))
        .map(|(_, n)| n)
        .sum();
    // A self-hosted row's GPU line: prompt and completion tokens pay the
    // same rate, so the completion's share of its tokens.
    let gpu = u128::from(row.breakdown[Line::Gpu.index()]);
    let tokens = u128::from(row.usage.prompt_tokens) + u128::from(row.usage.completion_tokens);
    let gpu_output = (gpu * u128::from(row.usage.completion_tokens))
        .checked_div(tokens)
        .unwrap_or(0);
    lines + u64::try_from(gpu_output).unwrap_or(0)
}

/// Priced from GPU cost (`pricing::gpu`): no token prices to compare.
fn gpu_priced(price: &ModelPrice) -> bool {
    price.gpu.is_some()
}

pub(crate) fn ratio(a: u64, b: u64) -> Value {
    if b == 0 {
        return Value::Null;
    }
    json!(((a as f64 / b as f64) * 10_000.0).round() / 10_000.0)
}

/// Tokens per word (per character where words are not space-separated)
/// as `numbers` prints them: per family, script and side.
fn word_numbers(rows: &[WordCount]) -> Value {
    let mut out: BTreeMap<(&str, &str), serde_json::Map<String, Value>> = BTreeMap::new();
    for r in rows {
        let entry = out
            .entry((r.family.as_str(), r.script.as_str()))
            .or_insert_with(|| {
                let mut m = serde_json::Map::new();
                m.insert("family".into(), Value::from(r.family.clone()));
                m.insert("script".into(), Value::from(r.script.clone()));
                let spaced = crate::words::Script::from_label(&r.script)
                    .is_none_or(crate::words::Script::spaced);
                m.insert(
                    "per".into(),
                    Value::from(if spaced { "word" } else { "character" }),
                );
                m
            });
        let spaced =
            crate::words::Script::from_label(&r.script).is_none_or(crate::words::Script::spaced);
        let units = if spaced { r.words } else { r.chars };
        entry.insert(
            r.side.clone(),
            serde_json::json!({
                "samples": r.samples,
                "words": r.words,
                "chars": r.chars,
                "tokens": r.tokens,
                "tokens_per_unit": ratio(r.tokens, units),
            }),
        );
    }
    Value::Array(out.into_values().map(Value::Object).collect())
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: u64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p as usize * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn tier_of(row: &CountsRow) -> ServiceTier {
    ServiceTier::parse(row.service_tier.as_deref().unwrap_or(""))
}

/// The price that charged a row: its served catalog row, else its model's.
fn price_of(catalog: &Catalog, row: &CountsRow) -> Option<std::sync::Arc<ModelPrice>> {
    let resolved = catalog.resolve(&row.model);
    if resolved.finetuned {
        return resolved.price;
    }
    catalog.resolve(&row.base_model).price.or(resolved.price)
}

fn price_as(price: &ModelPrice, usage: &Usage, tier: ServiceTier, catalog: &Catalog) -> u64 {
    price.price(usage, tier, catalog.tool_call_fees()).total.0
}

/// Every number, as JSON. `rows` are the period's usage rows; with `team`
/// the numbers are that team's, but for self-hosted models, whose GPUs
/// every team shares (their utilization and throughput are all traffic's).
pub fn compute(
    rows: &[CountsRow],
    team: Option<&str>,
    words: &[WordCount],
    catalog: &Catalog,
) -> Value {
    let all: Vec<&CountsRow> = rows
        .iter()
        .filter(|r| r.usage.prompt_tokens > 0 || r.usage.completion_tokens > 0)
        .collect();
    let metered: Vec<&CountsRow> = all
        .iter()
        .copied()
        .filter(|r| team.is_none_or(|t| r.team == t))
        .collect();
    json!({
        "requests": metered.len(),
        "tokens_per_word": word_numbers(words),
        "cost_nano_usd": metered.iter().map(|r| r.cost_nano_usd).sum::<u64>(),
        "output": output_numbers(&metered),
        "choices": choices(&metered),
        "models": model_numbers(&metered, catalog),
        "chat_vs_embeddings": chat_vs_embeddings(&metered),
        "finetuned": finetuned(&metered, catalog),
        "caching": caching(&metered, catalog),
        "batch": batch(&metered, catalog),
        "selfhosted": selfhosted(&all, catalog),
    })
}

/// Per team: the output share of spend, completion tokens per request
/// (p50, p90) and what answers 40% shorter would save.
fn output_numbers(rows: &[&CountsRow]) -> Value {
    let mut teams: BTreeMap<&str, Vec<&CountsRow>> = BTreeMap::new();
    for r in rows.iter().filter(|r| generates(&r.endpoint)) {
        teams.entry(&r.team).or_default().push(r);
    }
    Value::Array(
        teams
            .into_iter()
            .map(|(team, rows)| {
                let cost: u64 = rows.iter().map(|r| r.cost_nano_usd).sum();
                let output: u64 = rows.iter().map(|r| output_cost(r)).sum();
                let mut completions: Vec<u64> =
                    rows.iter().map(|r| r.usage.completion_tokens).collect();
                completions.sort_unstable();
                json!({
                    "team": team,
                    "requests": rows.len(),
                    "cost_nano_usd": cost,
                    "output_cost_nano_usd": output,
                    "output_share": ratio(output, cost),
                    "completion_tokens_p50": percentile(&completions, 50),
                    "completion_tokens_p90": percentile(&completions, 90),
                    "capped_requests": rows.iter().filter(|r| r.capped).count(),
                    "capped_share": ratio(rows.iter().filter(|r| r.capped).count() as u64, rows.len() as u64),
                    "saving_if_answers_40pct_shorter_nano_usd": output * SHORTER_ANSWERS_PERCENT / 100,
                })
            })
            .collect(),
    )
}

/// Requests asking for several choices (`n > 1`): how many, the choices
/// per such request, and what the choices beyond the first cost (their
/// share of the output spend, choices taken as equally long).
fn choices(rows: &[&CountsRow]) -> Value {
    let several: Vec<&&CountsRow> = rows.iter().filter(|r| r.choices > 1).collect();
    let choices: u64 = several.iter().map(|r| u64::from(r.choices)).sum();
    let extra: u64 = several
        .iter()
        .map(|r| output_cost(r) * u64::from(r.choices - 1) / u64::from(r.choices))
        .sum();
    json!({
        "requests": several.len(),
        "choices_per_request": ratio(choices, several.len() as u64),
        "extra_choices_cost_nano_usd": extra,
    })
}

/// The models used: cost per 1k tokens at this traffic's prompt /
/// completion mix, the multiple of the cheapest, and what the top-spending
/// model's traffic would cost on each cheaper model used.
fn model_numbers(rows: &[&CountsRow], catalog: &Catalog) -> Value {
    let mut models: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
    for r in rows.iter().filter(|r| generates(&r.endpoint)) {
        let m = models.entry(&r.model).or_default();
        m.0 += 1;
        m.1 += r.usage.prompt_tokens + r.usage.completion_tokens;
        m.2 += r.cost_nano_usd;
    }
    let per_1k = |tokens: u64, cost: u64| (cost * 1000).checked_div(tokens).unwrap_or(0);
    let cheapest = models
        .values()
        .map(|(_, t, c)| per_1k(*t, *c))
        .filter(|p| *p > 0)
        .min()
        .unwrap_or(0);
    let used: Vec<Value> = models
        .iter()
        .map(|(model, (requests, tokens, cost))| {
            json!({
                "model": model,
                "requests": requests,
                "tokens": tokens,
                "cost_nano_usd": cost,
                "nano_usd_per_1k_tokens": per_1k(*tokens, *cost),
                "times_cheapest": ratio(per_1k(*tokens, *cost), cheapest),
            })
        })
        .collect();
    let top = models
        .iter()
        .max_by_key(|(_, (_, _, cost))| *cost)
        .map(|(m, (_, t, c))| (*m, per_1k(*t, *c), *c));
    let top_on_cheaper = top.map(|(top, top_per_1k, top_cost)| {
        let top_rows: Vec<&&CountsRow> = rows.iter().filter(|r| r.model == top).collect();
        let alternatives: Vec<Value> = models
            .iter()
            .filter(|(m, (_, t, c))| **m != top && per_1k(*t, *c) < top_per_1k)
            .filter_map(|(m, _)| {
                let price = catalog.resolve(m).price.filter(|p| !gpu_priced(p))?;
                let cost: u64 = top_rows
                    .iter()
                    .map(|r| price_as(&price, &r.usage, tier_of(r), catalog))
                    .sum();
                Some(json!({"model": m, "cost_nano_usd": cost, "saving_nano_usd": top_cost.saturating_sub(cost)}))
            })
            .collect();
        json!({"model": top, "cost_nano_usd": top_cost, "on_cheaper_models": alternatives})
    });
    json!({"used": used, "top_model": top_on_cheaper})
}

/// Generation vs embeddings, cost per 1k tokens each.
fn chat_vs_embeddings(rows: &[&CountsRow]) -> Value {
    let sum = |pick: &dyn Fn(&CountsRow) -> bool| {
        rows.iter()
            .filter(|r| pick(r))
            .fold((0u64, 0u64), |(t, c), r| {
                (
                    t + r.usage.prompt_tokens + r.usage.completion_tokens,
                    c + r.cost_nano_usd,
                )
            })
    };
    let (chat_tokens, chat_cost) = sum(&|r| generates(&r.endpoint));
    let (emb_tokens, emb_cost) = sum(&|r| r.endpoint == "embeddings");
    let per_1k = |tokens: u64, cost: u64| (cost * 1000).checked_div(tokens);
    let chat = per_1k(chat_tokens, chat_cost);
    let emb = per_1k(emb_tokens, emb_cost);
    json!({
        "generation_nano_usd_per_1k_tokens": chat,
        "embeddings_nano_usd_per_1k_tokens": emb,
        "generation_times_embeddings": match (chat, emb) {
            (Some(c), Some(e)) => ratio(c, e),
            _ => Value::Null,
        },
    })
}

/// Fine-tuned models against their base: the realized multiple (what was
/// paid / the same tokens on the base) and the premium.
fn finetuned(rows: &[&CountsRow], catalog: &Catalog) -> Value {
    let mut models: BTreeMap<&str, (String, u64, u64, u64)> = BTreeMap::new();
    for r in rows {
        let resolved = catalog.resolve(&r.model);
        let (true, Some(base)) = (resolved.finetuned, resolved.base_price.as_ref()) else {
            continue;
        };
        let on_base = price_as(base, &r.usage, tier_of(r), catalog);
        let m = models
            .entry(&r.model)
            .or_insert_with(|| (resolved.base_model.clone(), 0, 0, 0));
        m.1 += 1;
        m.2 += r.cost_nano_usd;
        m.3 += on_base;
    }
    Value::Array(
        models
            .into_iter()
            .map(|(model, (base, requests, cost, on_base))| {
                json!({
                    "model": model,
                    "base_model": base,
                    "requests": requests,
                    "cost_nano_usd": cost,
                    "on_base_nano_usd": on_base,
                    "multiple": ratio(cost, on_base),
                    "premium_nano_usd": cost.saturating_sub(on_base),
                })
            })
            .collect(),
    )
}

/// Prompt caching: the cached share of prompt tokens and what it saved
/// (cached tokens x (input - cached input price), per request).
fn caching(rows: &[&CountsRow], catalog: &Catalog) -> Value {
    let (mut prompt, mut cached, mut saved) = (0u64, 0u64, 0u64);
    for r in rows {
        prompt += r.usage.prompt_tokens;
        cached += r.usage.cached();
        if r.usage.cached() > 0 {
            if let Some(p) = price_of(catalog, r).filter(|p| !gpu_priced(p)) {
                saved += p
                    .price(&r.usage, tier_of(r), catalog.tool_call_fees())
                    .cache_savings
                    .0;
            }
        }
    }
    json!({
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cached_share": ratio(cached, prompt),
        "saved_nano_usd": saved,
    })
}

/// Spend on non-streaming requests served at standard prices by models
/// with batch prices: what the Batch API would have charged for them.
fn batch(rows: &[&CountsRow], catalog: &Catalog) -> Value {
    let (mut requests, mut cost, mut at_batch) = (0u64, 0u64, 0u64);
    for r in rows
        .iter()
        .filter(|r| !r.stream && tier_of(r) == ServiceTier::Standard && r.status == 200)
    {
        let Some(p) = price_of(catalog, r).filter(|p| p.batch.is_some() && !gpu_priced(p)) else {
            continue;
        };
        requests += 1;
        cost += r.cost_nano_usd;
        at_batch += price_as(&p, &r.usage, ServiceTier::Batch, catalog);
    }
    json!({
        "eligible_requests": requests,
        "eligible_cost_nano_usd": cost,
        "at_batch_prices_nano_usd": at_batch,
        "saving_nano_usd": cost.saturating_sub(at_batch),
    })
}

/// Self-hosted models (priced from GPU cost): the effective price per
/// million tokens, charged and at the GPUs' cost over the period they were
/// in use, their utilization (the share of that period with a request in
/// flight), and throughput by concurrency: the seed's "batching raises
/// throughput >10x", measured.
fn selfhosted(rows: &[&CountsRow], catalog: &Catalog) -> Value {
    let mut models: BTreeMap<&str, (crate::pricing::gpu::GpuPrice, Vec<&CountsRow>)> =
        BTreeMap::new();
    // Every request that used the GPUs, cut streams (499) included.
    for r in rows {
        let Some(gpu) = price_of(catalog, r).and_then(|p| p.gpu.as_deref().cloned()) else {
            continue;
        };
        models
            .entry(&r.base_model)
            .or_insert_with(|| (gpu, Vec::new()))
            .1
            .push(r);
    }
    let per_mtok =
        |nano: u128, tokens: u128| (tokens > 0).then(|| (nano * 1_000_000 + tokens / 2) / tokens);
    Value::Array(
        models
            .into_iter()
            .map(|(model, (gpu, rows))| {
                let tokens: u64 = rows
                    .iter()
                    .map(|r| r.usage.prompt_tokens + r.usage.completion_tokens)
                    .sum();
                let cost: u64 = rows.iter().map(|r| r.cost_nano_usd).sum();
                let flight = in_flight(&rows);
                let gpu_cost = (gpu.nano_usd_per_hour() * u128::from(flight.span_ms)
                    + 1_800_000)
                    / 3_600_000;
                // Tokens per second at each concurrency level.
                let tps: Vec<f64> = flight
                    .levels
                    .iter()
                    .map(|(_, ms, toks)| toks * 1000.0 / *ms as f64)
                    .collect();
                let levels: Vec<Value> = flight
                    .levels
                    .iter()
                    .zip(&tps)
                    .map(|((c, ms, _), &tps)| {
                        json!({
                            "concurrency": c,
                            "seconds": round4(*ms as f64 / 1000.0),
                            "tokens_per_second": round4(tps),
                            "nano_usd_per_mtok": (tps > 0.0).then(|| {
                                (gpu.nano_usd_per_hour() as f64 * 1e6 / (3600.0 * tps)).round() as u64
                            }),
                        })
                    })
                    .collect();
                let gain = match (tps.first(), tps.last()) {
                    (Some(first), Some(last)) if *first > 0.0 && tps.len() > 1 => {
                        json!(round4(last / first))
                    }
                    _ => Value::Null,
                };
                json!({
                    "model": model,
                    "gpus": gpu.gpus,
                    "requests": rows.len(),
                    "tokens": tokens,
                    "cost_nano_usd": cost,
                    "nano_usd_per_mtok": per_mtok(u128::from(cost), u128::from(tokens)),
                    "span_seconds": round4(flight.span_ms as f64 / 1000.0),
                    "busy_seconds": round4(flight.busy_ms as f64 / 1000.0),
                    "gpu_utilization": ratio(flight.busy_ms, flight.span_ms),
                    "gpu_cost_nano_usd": gpu_cost,
                    "nano_usd_per_mtok_at_gpu_cost": per_mtok(gpu_cost, u128::from(tokens)),
                    "by_concurrency": levels,
                    "throughput_gain_at_highest_concurrency": gain,
                })
            })
            .collect(),
    )
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Requests of one model over time.
struct InFlight {
    /// From the first request's start to the last one's end.
    span_ms: u64,
    /// Time with at least one request in flight.
    busy_ms: u64,
    /// (concurrency, milliseconds at it, tokens served during them), each
    /// request's tokens spread evenly over its duration.
    levels: Vec<(usize, u64, f64)>,
}

fn in_flight(rows: &[&CountsRow]) -> InFlight {
    // (time, +1 start / -1 end, tokens per ms).
    let mut events: Vec<(i64, i64, f64)> = Vec::with_capacity(rows.len() * 2);
    for r in rows {
        let ms = r.latency_ms.max(1);
        let rate = (r.usage.prompt_tokens + r.usage.completion_tokens) as f64 / ms as f64;
        let end = r
            .started_ms
            .saturating_add(i64::try_from(ms).unwrap_or(i64::MAX));
        events.push((r.started_ms, 1, rate));
        events.push((end, -1, rate));
    }
    // Ends before starts at the same instant: back to back is not overlap.
    events.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let span_ms = match (events.first(), events.last()) {
        (Some(first), Some(last)) => u64::try_from(last.0 - first.0).unwrap_or(0),
        _ => 0,
    };
    let mut levels: BTreeMap<usize, (u64, f64)> = BTreeMap::new();
    let (mut active, mut rate, mut busy_ms) = (0usize, 0.0f64, 0u64);
    let mut last = events.first().map_or(0, |e| e.0);
    for (t, delta, r) in events {
        let dt = u64::try_from(t - last).unwrap_or(0);
        if active > 0 && dt > 0 {
            busy_ms += dt;
            let level = levels.entry(active).or_default();
            level.0 += dt;
            level.1 += rate * dt as f64;
        }
        last = t;
        if delta > 0 {
            active += 1;
            rate += r;
        } else {
            active = active.saturating_sub(1);
            rate = if active == 0 { 0.0 } else { rate - r };
        }
    }
    InFlight {
        span_ms,
        busy_ms,
        levels: levels.into_iter().map(|(c, (ms, t))| (c, ms, t)).collect(),
    }
}

/// A share as a percentage (`0.4661` -> `46.61%`).
fn percent(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_string(), |f| format!("{:.2}%", f * 100.0))
}

/// The numbers as a short text report.
pub fn text(v: &Value) -> String {
    let usd = |v: &Value| NanoUsd(v.as_u64().unwrap_or(0)).to_string();
    let mut out = format!(
        "{} requests, ${}\n\nTokens per word (~1.3 for English; per character where words are not spaced):\n",
        v["requests"],
        usd(&v["cost_nano_usd"])
    );
    let words = v["tokens_per_word"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if words.is_empty() {
        out.push_str("  no sampled requests (numbers.word_sample_rate)\n");
    }
    for w in words {
        let side = |s: &str| {
            let x = &w[s];
            if x.is_null() {
                "-".to_string()
            } else {
                format!("{} (n={})", x["tokens_per_unit"], x["samples"])
            }
        };
        out.push_str(&format!(
            "  {:<14} {:<11} per {:<9} prompt {}, completion {}\n",
            w["family"].as_str().unwrap_or(""),
            w["script"].as_str().unwrap_or(""),
            w["per"].as_str().unwrap_or(""),
            side("prompt"),
            side("completion"),
        ));
    }
    out.push_str("\nOutput (\"answer briefly\" saves 40-90% of output tokens):\n");
    for t in v["output"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {:<20} output {} of ${}, completion tokens p50 {} p90 {}, {} hit the output cap, 40% shorter saves ${}\n",
            t["team"].as_str().unwrap_or(""),
            percent(&t["output_share"]),
            usd(&t["cost_nano_usd"]),
            t["completion_tokens_p50"],
            t["completion_tokens_p90"],
            percent(&t["capped_share"]),
            usd(&t["saving_if_answers_40pct_shorter_nano_usd"]),
        ));
    }
    let ch = &v["choices"];
    if ch["requests"].as_u64().unwrap_or(0) == 0 {
        out.push_str("  n > 1: no requests asked for several choices\n");
    } else {
        out.push_str(&format!(
            "  n > 1: {} requests, {} choices each, the extra choices cost ${}\n",
            ch["requests"],
            ch["choices_per_request"],
            usd(&ch["extra_choices_cost_nano_usd"]),
        ));
    }
    out.push_str("\nModels (cost per 1k tokens at this traffic's mix):\n");
    for m in v["models"]["used"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {:<32} {:>13} per 1k tokens, {}x the cheapest\n",
            m["model"].as_str().unwrap_or(""),
            format!("${}", usd(&m["nano_usd_per_1k_tokens"])),
            m["times_cheapest"],
        ));
    }
    let top = &v["models"]["top_model"];
    for alt in top["on_cheaper_models"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {}'s traffic (${}) on {}: ${}\n",
            top["model"].as_str().unwrap_or(""),
            usd(&top["cost_nano_usd"]),
            alt["model"].as_str().unwrap_or(""),
            usd(&alt["cost_nano_usd"]),
        ));
    }
    let ce = &v["chat_vs_embeddings"];
    out.push_str(&format!(
        "\nGeneration vs embeddings per 1k tokens: {}x\n",
        ce["generation_times_embeddings"]
    ));
    for f in v["finetuned"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "Fine-tuned {} costs {}x {} (premium ${})\n",
            f["model"].as_str().unwrap_or(""),
            f["multiple"],
            f["base_model"].as_str().unwrap_or(""),
            usd(&f["premium_nano_usd"]),
        ));
    }
    let c = &v["caching"];
    out.push_str(&format!(
        "Prompt caching: {} of prompt tokens cached, saved ${}\n",
        percent(&c["cached_share"]),
        usd(&c["saved_nano_usd"])
    ));
    let b = &v["batch"];
    out.push_str(&format!(
        "Batch: ${} of non-streaming spend could have cost ${} (save ${})\n",
        usd(&b["eligible_cost_nano_usd"]),
        usd(&b["at_batch_prices_nano_usd"]),
        usd(&b["saving_nano_usd"]),
    ));
    for m in v["selfhosted"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\nSelf-hosted {} ({} GPUs): ${} per M tokens charged, ${} at GPU cost, {} utilized\n",
            m["model"].as_str().unwrap_or(""),
            m["gpus"],
            usd(&m["nano_usd_per_mtok"]),
            usd(&m["nano_usd_per_mtok_at_gpu_cost"]),
            percent(&m["gpu_utilization"]),
        ));
        for l in m["by_concurrency"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "  {:>3} in flight: {:>12} tokens/s, ${} per M tokens ({} s)\n",
                l["concurrency"].to_string(),
                l["tokens_per_second"].to_string(),
                usd(&l["nano_usd_per_mtok"]),
                l["seconds"],
            ));
        }
        if !m["throughput_gain_at_highest_concurrency"].is_null() {
            out.push_str(&format!(
                "  batching raised throughput {}x\n",
                m["throughput_gain_at_highest_concurrency"]
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100];
        assert_eq!(percentile(&v, 50), 50);
        assert_eq!(percentile(&v, 90), 90);
        assert_eq!(percentile(&[7], 90), 7);
        assert_eq!(percentile(&[], 50), 0);
    }
}
