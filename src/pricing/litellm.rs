//! `tollgate catalog import-litellm`: converts LiteLLM's public cost map
//! (USD per token, JSON) into tollgate's catalog TOML v2 (USD per million
//! tokens, SPEC 9): every LiteLLM price key that maps to a component, its
//! `_flex`, `_priority` and `_batches` tiers, the first `_above_Nk_tokens`
//! threshold as `long_context`, and search fees as `tool_calls`.
//!
//! Exact: every price is converted from the decimal text of the JSON number
//! and must read back unchanged; an entry that cannot is skipped and named.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use super::money::Rate;
use super::price::{CallFee, Meter};
use crate::usage::Encoding;

pub struct Imported {
    pub toml: String,
    pub models: usize,
    pub skipped: usize,
    /// Entries of the wanted provider skipped because a price is unusable.
    pub problems: Vec<String>,
}

/// LiteLLM's key for a component (USD per token), before any tier suffix.
/// `None`: LiteLLM has no per-token price for it (video is per second
/// there); the row's fallback rate applies.
fn litellm_key(c: Meter) -> Option<&'static str> {
    Some(match c {
        Meter::Input => "input_cost_per_token",
        Meter::Output => "output_cost_per_token",
        Meter::CachedInput => "cache_read_input_token_cost",
        Meter::CacheWrite => "cache_creation_input_token_cost",
        Meter::CacheWrite1h => "cache_creation_input_token_cost_above_1hr",
        Meter::AudioInput => "input_cost_per_audio_token",
        Meter::AudioOutput => "output_cost_per_audio_token",
        Meter::ImageInput => "input_cost_per_image_token",
        Meter::ImageOutput => "output_cost_per_image_token",
        Meter::AudioCachedInput => "cache_read_input_audio_token_cost",
        // Per second there; per unit meters are `unit_lines`'.
        Meter::VideoInput | Meter::Images | Meter::AudioSeconds | Meter::Characters => return None,
    })
}

/// A unit meter's LiteLLM key (USD per second, character or image) and how
/// many of those make tollgate's catalog quantity (a minute: 60).
fn litellm_unit_key(c: Meter) -> Option<(&'static [&'static str], u128)> {
    match c {
        Meter::AudioSeconds => Some((&["input_cost_per_second"], 60)),
        Meter::Characters => Some((&["input_cost_per_character"], 1_000)),
        Meter::Images => Some((&["output_cost_per_image", "input_cost_per_image"], 1)),
        _ => None,
    }
}

/// `per_minute`, `per_1k_chars` and `per_image` lines, for an entry priced
/// by the unit only: a model LiteLLM prices by tokens too (a transcription
/// model with a per-second estimate) is billed by its tokens.
fn unit_lines(entry: &serde_json::Map<String, Value>) -> Result<String, String> {
    let tokens = [
        "input_cost_per_token",
        "input_cost_per_audio_token",
        "output_cost_per_image_token",
    ];
    if tokens
        .iter()
        .any(|k| price(entry, k).is_some_and(|x| x > 0.0))
    {
        return Ok(String::new());
    }
    let mut out = String::new();
    for (c, (keys, quantity)) in Meter::ALL
        .into_iter()
        .filter_map(|c| Some((c, litellm_unit_key(c)?)))
    {
        let Some((key, x)) = keys.iter().find_map(|k| Some((*k, price(entry, k)?))) else {
            continue;
        };
        if !x.is_finite() || x < 0.0 {
            return Err(format!("{key}: {x} is not a non-negative price"));
        }
        let zepto =
            super::money::decimal_scaled(&format!("{x}"), 21).map_err(|e| format!("{key}: {e}"))?;
        let text = super::money::format_decimal(zepto.saturating_mul(quantity), 21);
        let text = if text.contains('.') {
            text
        } else {
            format!("{text}.0")
        };
        let _ = writeln!(out, "{} = {text}", c.catalog_key());
    }
    Ok(out)
}

/// Modes whose prices are per token (text, audio or image tokens).
const MODES: [&str; 8] = [
    "chat",
    "completion",
    "responses",
    "embedding",
    "image_generation",
    "audio_transcription",
    "audio_speech",
    "realtime",
];

/// tollgate's provider name for a LiteLLM one.
fn provider_name(litellm: &str) -> &str {
    match litellm {
        "vertex_ai-language-models" | "gemini" => "google",
        "bedrock" | "bedrock_converse" => "bedrock",
        "together_ai" => "together",
        "fireworks_ai" => "fireworks",
        "azure" | "azure_ai" => "azure",
        other => other,
    }
}

/// A USD-per-token price as an exact catalog number (USD per million).
fn per_million(x: f64) -> Result<String, String> {
    let text = Rate::from_f64_usd_per_token(x)?.usd_per_million_string();
    Rate::from_usd_per_million(&text)?;
    Ok(if text.contains('.') {
        text
    } else {
        format!("{text}.0")
    })
}

fn price(entry: &serde_json::Map<String, Value>, key: &str) -> Option<f64> {
    entry.get(key).and_then(Value::as_f64)
}

/// `key = value` lines for the components `entry` prices with `suffix`.
fn rate_lines(entry: &serde_json::Map<String, Value>, suffix: &str) -> Result<String, String> {
    let mut out = String::new();
    for (c, key) in Meter::ALL
        .into_iter()
        .filter_map(|c| Some((c, litellm_key(c)?)))
    {
        let mut key = key.to_string();
        key.push_str(suffix);
        let value = price(entry, &key).or_else(|| {
            // DeepSeek names its cache-hit price this way.
            (c == Meter::CachedInput)
                .then(|| price(entry, &format!("input_cost_per_token_cache_hit{suffix}")))
                .flatten()
        });
        if let Some(x) = value {
            let _ = writeln!(
                out,
                "{} = {}",
                c.name(),
                per_million(x).map_err(|e| format!("{key}: {e}"))?
            );
        }
    }
    Ok(out)
}

/// The lowest `_above_Nk_tokens` threshold the entry prices (N x 1000).
fn long_context_threshold(entry: &serde_json::Map<String, Value>) -> Option<(u64, String)> {
    entry
        .keys()
        .filter_map(|k| {
            let rest = k.split("_above_").nth(1)?;
            let n = rest.strip_suffix("k_tokens")?;
            let n: u64 = n.parse().ok()?;
            Some((n * 1000, format!("_above_{n}k_tokens")))
        })
        .min()
}

/// One model's catalog table, or why its prices cannot be used.
fn model_block(
    id: &str,
    entry: &serde_json::Map<String, Value>,
    provider: &str,
) -> Result<String, String> {
    let named = |e: String| format!("{id}: {e}");
    let mut out = format!("\n[models.{}]\n", toml_key(id));
    let _ = writeln!(out, "provider = \"{}\"", provider_name(provider));
    let mut standard = rate_lines(entry, "").map_err(named)?;
    let units = unit_lines(entry).map_err(named)?;
    // Every row has input and output or a unit price: image and audio
    // models bill output as image or audio tokens, so their text output
    // price stands in.
    if !units.is_empty() {
        standard.push_str(&units);
    } else if price(entry, "output_cost_per_token").is_none() {
        let stand_in = price(entry, "output_cost_per_image_token")
            .or_else(|| price(entry, "output_cost_per_audio_token"))
            .unwrap_or(0.0);
        let _ = writeln!(
            standard,
            "output = {}",
            per_million(stand_in).map_err(named)?
        );
    }
    if units.is_empty() && price(entry, "input_cost_per_token").is_none() {
        let stand_in = price(entry, "input_cost_per_audio_token").unwrap_or(0.0);
        let _ = writeln!(
            standard,
            "input = {}",
            per_million(stand_in).map_err(named)?
        );
    }
    out.push_str(&standard);
    if let Some(max) = entry.get("max_output_tokens").and_then(Value::as_u64) {
        let _ = writeln!(out, "max_output_tokens = {max}");
    }
    let base = super::catalog::finetune_base(id).unwrap_or(id);
    let _ = writeln!(out, "encoding = \"{}\"", Encoding::for_model(base).name());
    if let Some(mode) = entry.get("mode").and_then(Value::as_str) {
        let _ = writeln!(out, "mode = \"{mode}\"");
    }
    for (tier, suffix) in [
        ("flex", "_flex"),
        ("priority", "_priority"),
        ("batch", "_batches"),
    ] {
        let lines = rate_lines(entry, suffix).map_err(named)?;
        // A tier priced like standard says nothing (LiteLLM has a few).
        let same = lines.lines().all(|l| standard.lines().any(|s| s == l));
        if !lines.is_empty() && !same {
            let _ = write!(out, "\n[models.{}.{tier}]\n{lines}", toml_key(id));
        }
    }
    if let Some((above, suffix)) = long_context_threshold(entry) {
        let lines = rate_lines(entry, &suffix).map_err(named)?;
        if !lines.is_empty() {
            let _ = write!(
                out,
                "\n[models.{}.long_context]\nabove_input_tokens = {above}\n{lines}",
                toml_key(id)
            );
        }
    }
    let mut fees = String::new();
    if let Some(search) = entry.get("search_context_cost_per_query") {
        // USD per query, by search context size: the medium size is the default.
        let per_query = search
            .get("search_context_size_medium")
            .or_else(|| search.get("search_context_size_low"))
            .and_then(Value::as_f64);
        if let Some(usd) = per_query {
            let _ = writeln!(fees, "web_search = {}", per_thousand(usd).map_err(named)?);
        }
    }
    if let Some(usd) = price(entry, "file_search_cost_per_1k_calls") {
        let _ = writeln!(fees, "file_search = {}", thousand_text(usd).map_err(named)?);
    }
    if !fees.is_empty() {
        let _ = write!(out, "\n[models.{}.tool_calls]\n{fees}", toml_key(id));
    }
    Ok(out)
}

/// USD per call as USD per 1000 calls, exactly.
fn per_thousand(usd_per_call: f64) -> Result<String, String> {
    if !usd_per_call.is_finite() || usd_per_call < 0.0 {
        return Err(format!("{usd_per_call} is not a non-negative price"));
    }
    let fee = super::money::decimal_scaled(&format!("{usd_per_call}"), 21)?;
    let text = super::money::format_decimal(fee, 18);
    Ok(if text.contains('.') {
        text
    } else {
        format!("{text}.0")
    })
}

fn thousand_text(usd_per_1000: f64) -> Result<String, String> {
    if !usd_per_1000.is_finite() || usd_per_1000 < 0.0 {
        return Err(format!("{usd_per_1000} is not a non-negative price"));
    }
    let fee = CallFee::from_usd_per_1000(&format!("{usd_per_1000}"))?;
    let text = fee.usd_per_1000_string();
    Ok(if text.contains('.') {
        text
    } else {
        format!("{text}.0")
    })
}

/// Keeps `provider`'s priced models (chat, completion, responses,
/// embedding, image, audio and realtime models with per-token prices, and
/// those priced per image, second or character). A
/// key `provider/model` becomes `model` (which may hold a `/` itself, as
/// Groq's and Together's ids do); other keys with a `/` (other providers'
/// routes, per-size image prices) are skipped. With `only`, models whose
/// id matches none of its globs are skipped too (a provider's popular
/// models out of hundreds).
pub fn import(json: &str, provider: &str, only: &[crate::glob::Glob]) -> Result<Imported, String> {
    let map: BTreeMap<String, Value> =
        serde_json::from_str(json).map_err(|e| format!("not a LiteLLM cost map: {e}"))?;
    let mut out = String::from(
        "# Converted by `tollgate catalog import-litellm` from LiteLLM's cost map.\n\
         # Prices in USD per million tokens; tool calls in USD per 1000 calls.\n",
    );
    let (mut models, mut skipped, mut problems) = (0, 0, Vec::new());
    let prefix = format!("{provider}/");
    let mut seen = std::collections::HashSet::new();
    // Bare keys first: they win over `provider/` duplicates.
    let mut keys: Vec<(&String, &Value)> = map.iter().collect();
    keys.sort_by_key(|(k, _)| k.contains('/'));
    for (key, value) in keys {
        let Some(entry) = value.as_object() else {
            skipped += 1;
            continue;
        };
        // `groq/openai/gpt-oss-120b` is Groq's `openai/gpt-oss-120b`; a `/`
        // without the provider's prefix is another route or a size variant.
        let (id, routed) = match key.strip_prefix(&prefix) {
            Some(rest) => (rest, false),
            None => (key.as_str(), key.contains('/')),
        };
        let wanted = entry.get("litellm_provider").and_then(Value::as_str) == Some(provider)
            && entry
                .get("mode")
                .and_then(Value::as_str)
                .is_some_and(|m| MODES.contains(&m))
            && !routed
            && !id.is_empty()
            && (only.is_empty() || only.iter().any(|g| g.matches(id)))
            && (price(entry, "input_cost_per_token").is_some()
                || price(entry, "input_cost_per_audio_token").is_some()
                || Meter::ALL
                    .into_iter()
                    .filter_map(litellm_unit_key)
                    .any(|(keys, _)| keys.iter().any(|k| price(entry, k).is_some())));
        if !wanted || !seen.insert(id.to_string()) {
            skipped += 1;
            continue;
        }
        match model_block(id, entry, provider) {
            Ok(block) => out.push_str(&block),
            Err(e) => {
                // One unusable entry (a negative or absurd price) does not
                // sink the whole import; it is named and skipped.
                problems.push(e);
                skipped += 1;
                continue;
            }
        }
        models += 1;
    }
    Ok(Imported {
        toml: out,
        models,
        skipped,
        problems,
    })
}

fn toml_key(id: &str) -> String {
    let escaped = id.replace('\\', "\\\\").replace('"', "\\\"");
    format!("\"{escaped}\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::{Catalog, NanoUsd};
    use crate::usage::{ServiceTier, ToolCalls, Usage};

    #[test]
    fn converts_per_token_prices_exactly() {
        let json = r#"{
          "gpt-4o-mini": {"input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07,
                          "cache_read_input_token_cost": 7.5e-08, "max_output_tokens": 16384,
                          "litellm_provider": "openai", "mode": "chat"},
          "ft:gpt-3.5-turbo": {"input_cost_per_token": 3e-06, "output_cost_per_token": 6e-06,
                          "litellm_provider": "openai", "mode": "chat"},
          "claude-3": {"input_cost_per_token": 3e-06, "litellm_provider": "anthropic", "mode": "chat"},
          "dall-e-3": {"litellm_provider": "openai", "mode": "image_generation"},
          "absurd": {"input_cost_per_token": 2.3e16, "litellm_provider": "openai", "mode": "chat"},
          "negative": {"input_cost_per_token": -1e-6, "litellm_provider": "openai", "mode": "chat"},
          "sample_spec": {"max_output_tokens": "text"}
        }"#;
        let imported = import(json, "openai", &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(imported.models, 2);
        // Regression (tests/fuzz.rs): an absurd or negative price skips its
        // model instead of writing a catalog that does not load.
        assert_eq!(imported.skipped, 5);
        assert_eq!(imported.problems.len(), 2);
        let catalog = Catalog::parse(&imported.toml, 6.0).unwrap_or_else(|e| panic!("{e}"));
        let usage = Usage::tokens(1_000_000, 1_000_000);
        let cost = catalog.resolve("gpt-4o-mini").price.map(|p| p.cost(&usage));
        assert_eq!(cost, Some(NanoUsd(750_000_000)));
        let ft = catalog
            .resolve("ft:gpt-3.5-turbo:acme::x")
            .price
            .map(|p| p.cost(&usage));
        assert_eq!(ft, Some(NanoUsd(9_000_000_000)));
    }

    #[test]
    fn tiers_long_context_audio_cache_writes_and_search_fees_come_across() {
        let json = r#"{
          "gpt-5": {"input_cost_per_token": 1.25e-06, "output_cost_per_token": 1e-05,
              "cache_read_input_token_cost": 1.25e-07,
              "input_cost_per_token_flex": 6.25e-07, "output_cost_per_token_flex": 5e-06,
              "input_cost_per_token_priority": 2.5e-06, "output_cost_per_token_priority": 2e-05,
              "input_cost_per_token_batches": 6.25e-07, "output_cost_per_token_batches": 5e-06,
              "search_context_cost_per_query": {"search_context_size_low": 0.01, "search_context_size_medium": 0.01},
              "litellm_provider": "openai", "mode": "chat"},
          "gpt-4o-audio-preview-2025-06-03": {"input_cost_per_audio_token": 4e-05, "input_cost_per_token": 2.5e-06,
              "output_cost_per_audio_token": 8e-05, "output_cost_per_token": 1e-05, "litellm_provider": "openai", "mode": "chat"},
          "gpt-5.4": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1.5e-05,
              "input_cost_per_token_above_272k_tokens": 5e-06, "output_cost_per_token_above_272k_tokens": 2.25e-05,
              "litellm_provider": "openai", "mode": "chat"},
          "claude-sonnet-4-5": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
              "cache_creation_input_token_cost": 3.75e-06, "cache_creation_input_token_cost_above_1hr": 6e-06,
              "cache_read_input_token_cost": 3e-07, "litellm_provider": "anthropic", "mode": "chat"},
          "deepseek/deepseek-chat": {"input_cost_per_token": 2.8e-07, "output_cost_per_token": 4.2e-07,
              "input_cost_per_token_cache_hit": 2.8e-08, "litellm_provider": "deepseek", "mode": "chat"}
        }"#;
        let openai = import(json, "openai", &[]).unwrap_or_else(|e| panic!("{e}"));
        let c =
            Catalog::parse(&openai.toml, 6.0).unwrap_or_else(|e| panic!("{e}\n{}", openai.toml));
        assert_eq!(c.problems(), Vec::<String>::new(), "{}", openai.toml);
        let p = c
            .resolve("gpt-5")
            .price
            .unwrap_or_else(|| panic!("no gpt-5"));
        let u = Usage::tokens(10_000, 2_000);
        assert_eq!(
            p.price(&u, ServiceTier::Flex, &[]).total,
            NanoUsd(16_250_000)
        );
        assert_eq!(
            p.price(&u, ServiceTier::Priority, &[]).total,
            NanoUsd(65_000_000)
        );
        let searched = Usage {
            tool_calls: ToolCalls {
                web_search: 3,
                file_search: 0,
            },
            ..Usage::tokens(0, 0)
        };
        assert_eq!(p.cost(&searched), NanoUsd(30_000_000));
        let audio = c
            .resolve("gpt-4o-audio-preview-2025-06-03")
            .price
            .unwrap_or_else(|| panic!("no audio"));
        let u = Usage {
            audio_prompt_tokens: Some(800),
            audio_completion_tokens: Some(400),
            ..Usage::tokens(1_000, 500)
        };
        assert_eq!(audio.cost(&u), NanoUsd(65_500_000));
        let long = c
            .resolve("gpt-5.4")
            .price
            .unwrap_or_else(|| panic!("no gpt-5.4"));
        assert_eq!(
            long.cost(&Usage::tokens(272_001, 0)),
            NanoUsd(1_360_005_000)
        );
        assert_eq!(
            long.cost(&Usage::tokens(10_000, 2_000)),
            NanoUsd(55_000_000)
        );

        let anthropic = import(json, "anthropic", &[]).unwrap_or_else(|e| panic!("{e}"));
        let c = Catalog::parse(&anthropic.toml, 6.0).unwrap_or_else(|e| panic!("{e}"));
        let claude = c
            .resolve("claude-sonnet-4-5")
            .price
            .unwrap_or_else(|| panic!("no claude"));
        assert_eq!(claude.provider, Some("anthropic"));
        let u = Usage {
            cache_write_tokens: Some(1_000_000),
            cache_write_1h_tokens: Some(1_000_000),
            ..Usage::tokens(2_000_000, 0)
        };
        assert_eq!(claude.cost(&u), NanoUsd(9_750_000_000));

        let deepseek = import(json, "deepseek", &[]).unwrap_or_else(|e| panic!("{e}"));
        let c = Catalog::parse(&deepseek.toml, 6.0).unwrap_or_else(|e| panic!("{e}"));
        let ds = c
            .resolve("deepseek-chat")
            .price
            .unwrap_or_else(|| panic!("no deepseek"));
        let u = Usage {
            cached_tokens: Some(9_000),
            ..Usage::tokens(10_000, 0)
        };
        assert_eq!(ds.cost(&u), NanoUsd(532_000));
    }
}
