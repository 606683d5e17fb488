//! `tollgate catalog import-litellm`: converts LiteLLM's public cost map
//! (USD per token, JSON) into tollgate's catalog TOML (USD per million).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Deserialize;

use super::money::Rate;
use crate::usage::Encoding;

#[derive(Debug, Deserialize)]
struct Entry {
    input_cost_per_token: Option<f64>,
    output_cost_per_token: Option<f64>,
    cache_read_input_token_cost: Option<f64>,
    max_output_tokens: Option<serde_json::Value>,
    litellm_provider: Option<String>,
    mode: Option<String>,
}

pub struct Imported {
    pub toml: String,
    pub models: usize,
    pub skipped: usize,
    /// Entries of the wanted provider skipped because a price is unusable.
    pub problems: Vec<String>,
}

/// One model's catalog table, or why its prices cannot be used. Every price
/// must come back exactly when the catalog is loaded.
fn model_block(id: &str, input: f64, entry: &Entry) -> Result<String, String> {
    let line = |name: &str, x: f64| -> Result<String, String> {
        let text = Rate::from_f64_usd_per_token(x)
            .map(|r| r.usd_per_million_string())
            .map_err(|e| format!("{id}: {name}: {e}"))?;
        Rate::from_usd_per_million(&text).map_err(|e| format!("{id}: {name}: {e}"))?;
        let text = if text.contains('.') {
            text
        } else {
            format!("{text}.0")
        };
        Ok(format!("{name} = {text}\n"))
    };
    let mut out = format!("\n[models.{}]\n", toml_key(id));
    out.push_str(&line("input", input)?);
    out.push_str(&line("output", entry.output_cost_per_token.unwrap_or(0.0))?);
    if let Some(cached) = entry.cache_read_input_token_cost {
        out.push_str(&line("cached_input", cached)?);
    }
    if let Some(max) = entry.max_output_tokens.as_ref().and_then(|v| v.as_u64()) {
        let _ = writeln!(out, "max_output_tokens = {max}");
    }
    let base = super::catalog::finetune_base(id).unwrap_or(id);
    let _ = writeln!(out, "encoding = \"{}\"", Encoding::for_model(base).name());
    if let Some(mode) = entry.mode.as_deref() {
        let _ = writeln!(out, "mode = \"{mode}\"");
    }
    Ok(out)
}

/// Keeps `provider`'s text models (chat, completion, responses, embedding)
/// that have an input price.
pub fn import(json: &str, provider: &str) -> Result<Imported, String> {
    let map: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(json).map_err(|e| format!("not a LiteLLM cost map: {e}"))?;
    let mut out = String::from(
        "# Converted by `tollgate catalog import-litellm` from LiteLLM's cost map.\n\
         # Prices in USD per million tokens.\n",
    );
    let (mut models, mut skipped, mut problems) = (0, 0, Vec::new());
    for (id, value) in map {
        let Ok(entry) = serde_json::from_value::<Entry>(value) else {
            skipped += 1;
            continue;
        };
        let wanted = entry.litellm_provider.as_deref() == Some(provider)
            && matches!(
                entry.mode.as_deref(),
                Some("chat" | "completion" | "responses" | "embedding")
            )
            && !id.contains('/');
        let (Some(input), true) = (entry.input_cost_per_token, wanted) else {
            skipped += 1;
            continue;
        };
        match model_block(&id, input, &entry) {
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
    use crate::usage::Usage;

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
        let imported = import(json, "openai").unwrap_or_else(|e| panic!("{e}"));
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
}
