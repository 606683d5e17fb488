//! The model catalog: load, validate, and resolve a model id to its price.
//!
//! Lookup (SPEC section 8): exact id; id without its date suffix; for
//! `ft:BASE:org:suffix:id` the row `ft:BASE`, then `ft:` + BASE without date,
//! else BASE's price x `finetune_multiple`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Deserialize;

use super::money::{CostAccumulator, NanoUsd, Rate};
use crate::usage::{Encoding, Usage};

/// The catalog compiled into the binary.
pub const BUNDLED: &str = include_str!("../../config/catalog.toml");

#[derive(Debug, Clone, PartialEq)]
pub struct ModelPrice {
    pub input: Rate,
    pub output: Rate,
    pub cached_input: Option<Rate>,
    pub max_output_tokens: Option<u64>,
    pub encoding: Option<Encoding>,
}

impl ModelPrice {
    /// The exact cost of `usage` at this price, rounded once.
    pub fn cost(&self, usage: &Usage) -> NanoUsd {
        let cached = usage.cached_tokens.min(usage.prompt_tokens);
        let mut acc = CostAccumulator::default();
        acc.add(usage.prompt_tokens - cached, self.input);
        acc.add(cached, self.cached_input.unwrap_or(self.input));
        acc.add(usage.completion_tokens, self.output);
        acc.nano_usd()
    }

    fn times_ppm(&self, ppm: u128) -> ModelPrice {
        ModelPrice {
            input: self.input.times_ppm(ppm),
            output: self.output.times_ppm(ppm),
            cached_input: self.cached_input.map(|r| r.times_ppm(ppm)),
            max_output_tokens: self.max_output_tokens,
            encoding: self.encoding,
        }
    }
}

/// What a model id resolved to.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The price to charge; `None` when the model is not in the catalog.
    pub price: Option<ModelPrice>,
    /// The base model's catalog id (`gpt-4o-mini` for `ft:gpt-4o-mini-2024-07-18:...`),
    /// or the model id itself when it resolves to nothing.
    pub base_model: String,
    /// For a fine-tuned model whose base is priced: the base price, to report
    /// the premium paid over it.
    pub base_price: Option<ModelPrice>,
    pub finetuned: bool,
}

impl Resolved {
    pub fn encoding(&self) -> Encoding {
        self.price
            .as_ref()
            .and_then(|p| p.encoding)
            .or_else(|| self.base_price.as_ref().and_then(|p| p.encoding))
            .unwrap_or_else(|| Encoding::for_model(&self.base_model))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    models: BTreeMap<String, RawPrice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    input: f64,
    #[serde(default)]
    output: f64,
    cached_input: Option<f64>,
    max_output_tokens: Option<u64>,
    encoding: Option<String>,
    #[allow(dead_code)]
    mode: Option<String>,
}

#[derive(Debug)]
pub struct Catalog {
    models: HashMap<String, ModelPrice>,
    finetune_ppm: u128,
}

pub type SharedCatalog = Arc<Catalog>;

impl Catalog {
    /// Parses catalog TOML; errors name the model and the field.
    pub fn parse(text: &str, finetune_multiple: f64) -> Result<Catalog, String> {
        let file: CatalogFile = toml::from_str(text).map_err(|e| e.message().to_string())?;
        let mut models = HashMap::with_capacity(file.models.len());
        for (id, raw) in file.models {
            let field = |name: &str, r: Result<Rate, String>| {
                r.map_err(|e| format!("models.\"{id}\".{name}: {e}"))
            };
            let encoding = match raw.encoding.as_deref() {
                None => None,
                Some(name) => Some(Encoding::from_name(name).ok_or_else(|| {
                    format!("models.\"{id}\".encoding: unknown encoding `{name}` (o200k_base or cl100k_base)")
                })?),
            };
            let price = ModelPrice {
                input: field("input", Rate::from_f64_usd_per_million(raw.input))?,
                output: field("output", Rate::from_f64_usd_per_million(raw.output))?,
                cached_input: raw
                    .cached_input
                    .map(|c| field("cached_input", Rate::from_f64_usd_per_million(c)))
                    .transpose()?,
                max_output_tokens: raw.max_output_tokens,
                encoding,
            };
            models.insert(id, price);
        }
        let ppm = super::money::decimal_scaled(&format!("{finetune_multiple}"), 6)
            .map_err(|e| format!("finetune_multiple: {e}"))?;
        Ok(Catalog {
            models,
            finetune_ppm: ppm,
        })
    }

    pub fn bundled(finetune_multiple: f64) -> Result<Catalog, String> {
        Catalog::parse(BUNDLED, finetune_multiple)
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// Every row, sorted by id.
    pub fn rows(&self) -> Vec<(&str, &ModelPrice)> {
        let mut rows: Vec<_> = self.models.iter().map(|(k, v)| (k.as_str(), v)).collect();
        rows.sort_by(|a, b| a.0.cmp(b.0));
        rows
    }

    /// Exact id, then the id without its date suffix.
    fn lookup(&self, id: &str) -> Option<(&str, &ModelPrice)> {
        if let Some((k, v)) = self.models.get_key_value(id) {
            return Some((k.as_str(), v));
        }
        let stripped = strip_date_suffix(id);
        if stripped.len() != id.len() {
            return self
                .models
                .get_key_value(stripped)
                .map(|(k, v)| (k.as_str(), v));
        }
        None
    }

    pub fn resolve(&self, model: &str) -> Resolved {
        let Some(base) = finetune_base(model) else {
            return match self.lookup(model) {
                Some((id, price)) => Resolved {
                    price: Some(price.clone()),
                    base_model: id.to_string(),
                    base_price: None,
                    finetuned: false,
                },
                None => Resolved {
                    price: None,
                    base_model: model.to_string(),
                    base_price: None,
                    finetuned: false,
                },
            };
        };
        let base_hit = self.lookup(base);
        let base_model = base_hit.map_or(base, |(id, _)| id).to_string();
        let base_price = base_hit.map(|(_, p)| p.clone());
        let ft_row = self
            .models
            .get(&format!("ft:{base}"))
            .or_else(|| self.models.get(&format!("ft:{}", strip_date_suffix(base))));
        let price = match ft_row {
            Some(p) => Some(p.clone()),
            None => base_price.as_ref().map(|p| p.times_ppm(self.finetune_ppm)),
        };
        Resolved {
            price,
            base_model,
            base_price,
            finetuned: true,
        }
    }

    /// Fine-tuned rows with their base rows: `(ft id, base id, ft, base)`.
    pub fn finetune_pairs(&self) -> Vec<(&str, String, &ModelPrice, ModelPrice)> {
        self.rows()
            .into_iter()
            .filter_map(|(id, price)| {
                let base = id.strip_prefix("ft:")?;
                let (base_id, base_price) = self.lookup(base)?;
                Some((id, base_id.to_string(), price, base_price.clone()))
            })
            .collect()
    }

    /// Problems worth failing `catalog check` for.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (id, price) in self.rows() {
            if let Some(base) = id.strip_prefix("ft:") {
                if self.lookup(base).is_none() {
                    out.push(format!("models.\"{id}\": base model `{base}` is not in the catalog, so the fine-tune multiple cannot be reported"));
                }
            }
            if price.encoding.is_none() && !id.starts_with("ft:") {
                out.push(format!(
                    "models.\"{id}\": no `encoding`; estimates fall back to {}",
                    Encoding::for_model(id).name()
                ));
            }
            if let Some(cached) = price.cached_input {
                if cached > price.input {
                    out.push(format!("models.\"{id}\": cached_input is above input"));
                }
            }
        }
        out
    }
}

/// `gpt-4o-2024-08-06` -> `gpt-4o`, `gpt-4-0613` -> `gpt-4`; otherwise unchanged.
pub fn strip_date_suffix(id: &str) -> &str {
    let b = id.as_bytes();
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    let n = b.len();
    if n > 11
        && b[n - 11] == b'-'
        && digits(&b[n - 10..n - 6])
        && b[n - 6] == b'-'
        && digits(&b[n - 5..n - 3])
        && b[n - 3] == b'-'
        && digits(&b[n - 2..])
    {
        return &id[..n - 11];
    }
    if n > 5 && b[n - 5] == b'-' && digits(&b[n - 4..]) {
        return &id[..n - 5];
    }
    id
}

/// The BASE of `ft:BASE:org:suffix:id`, or `None` for a model that is not fine-tuned.
pub fn finetune_base(model: &str) -> Option<&str> {
    let rest = model.strip_prefix("ft:")?;
    let base = rest.split(':').next().unwrap_or(rest);
    (!base.is_empty()).then_some(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(p: u64, c: u64, cached: u64) -> Usage {
        Usage {
            prompt_tokens: p,
            completion_tokens: c,
            cached_tokens: cached,
            source: crate::usage::TokenSource::Upstream,
        }
    }

    fn catalog() -> Catalog {
        match Catalog::bundled(6.0) {
            Ok(c) => c,
            Err(e) => panic!("bundled catalog: {e}"),
        }
    }

    #[test]
    fn date_suffixes_are_stripped() {
        assert_eq!(strip_date_suffix("gpt-4o-2024-08-06"), "gpt-4o");
        assert_eq!(strip_date_suffix("gpt-4-0613"), "gpt-4");
        assert_eq!(strip_date_suffix("gpt-3.5-turbo-0125"), "gpt-3.5-turbo");
        assert_eq!(strip_date_suffix("gpt-4o"), "gpt-4o");
        assert_eq!(strip_date_suffix("o3-mini"), "o3-mini");
    }

    #[test]
    fn exact_id_wins_over_date_stripping() {
        let c = catalog();
        let old = c.resolve("gpt-4o-2024-05-13");
        assert_eq!(old.base_model, "gpt-4o-2024-05-13");
        let new = c.resolve("gpt-4o-2024-08-06");
        assert_eq!(new.base_model, "gpt-4o");
        assert_ne!(old.price, new.price);
    }

    #[test]
    fn bundled_catalog_prices_are_exact() {
        let c = catalog();
        let p = c.resolve("gpt-4o-mini").price;
        // 1000 prompt (200 cached) + 500 completion:
        // 800 x 0.15 + 200 x 0.075 + 500 x 0.60 per M = 120000 + 15000 + 300000 nano.
        assert_eq!(
            p.map(|p| p.cost(&usage(1000, 500, 200))),
            Some(NanoUsd(435_000))
        );
        let emb = c.resolve("text-embedding-3-small").price;
        assert_eq!(
            emb.map(|p| p.cost(&usage(12_345, 0, 0))),
            Some(NanoUsd(246_900))
        );
    }

    #[test]
    fn finetuned_models_use_their_own_row_then_the_multiple() {
        let c = catalog();
        let ft = c.resolve("ft:gpt-4o-mini-2024-07-18:acme::abc123");
        assert!(ft.finetuned);
        assert_eq!(ft.base_model, "gpt-4o-mini");
        assert_eq!(
            ft.price.map(|p| p.cost(&usage(1_000_000, 1_000_000, 0))),
            Some(NanoUsd(1_500_000_000))
        );
        // gpt-4-turbo has no ft: row: 6 x ($10 + $30) per M.
        let ft = c.resolve("ft:gpt-4-turbo:acme:x:1");
        assert_eq!(ft.base_model, "gpt-4-turbo");
        assert_eq!(
            ft.price.map(|p| p.cost(&usage(1_000_000, 1_000_000, 0))),
            Some(NanoUsd(240_000_000_000))
        );
        assert!(c.resolve("ft:nonexistent:acme::x").price.is_none());
    }

    #[test]
    fn unknown_models_are_unpriced() {
        let r = catalog().resolve("llama-3-70b");
        assert!(r.price.is_none());
        assert_eq!(r.base_model, "llama-3-70b");
    }

    #[test]
    fn bundled_catalog_has_no_problems() {
        assert_eq!(catalog().problems(), Vec::<String>::new());
    }

    #[test]
    fn bad_rows_are_named() {
        let err = Catalog::parse("[models.\"x\"]\ninput = 1.0\nencoding = \"p99\"\n", 6.0)
            .err()
            .unwrap_or_default();
        assert!(err.contains("models.\"x\".encoding"), "{err}");
        let err = Catalog::parse("[models.\"x\"]\ninput = -1.0\n", 6.0)
            .err()
            .unwrap_or_default();
        assert!(err.contains("models.\"x\".input"), "{err}");
    }
}
