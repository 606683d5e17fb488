//! The model catalog: load, validate, and resolve a model id to its price.
//!
//! Lookup (SPEC section 8): exact id; id without its date suffix; for
//! `ft:BASE:org:suffix:id` the row `ft:BASE`, then `ft:` + BASE without date,
//! else BASE's price x `finetune_multiple`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Deserialize;

use super::gpu::GpuPrice;
use super::money::Rate;
use super::price::{CallFee, LongContext, Meter, ModelPrice, Rates};
use crate::usage::{Encoding, ImageSpec, ToolCalls};

/// The catalog compiled into the binary.
pub const BUNDLED: &str = include_str!("../../config/catalog.toml");

/// What a model id resolved to.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The price to charge; `None` when the model is not in the catalog.
    pub price: Option<Arc<ModelPrice>>,
    /// The catalog id the price came from (`gpt-4o` for `gpt-4o-2024-08-06`;
    /// the base model's id for a fine-tuned model), or the model id itself
    /// when it resolves to nothing.
    pub base_model: String,
    /// For a fine-tuned model whose base is priced: the base price, to report
    /// the premium paid over it.
    pub base_price: Option<Arc<ModelPrice>>,
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

/// Prices as written, keyed by meter (`usage::Meter::catalog_key`): a
/// token meter's name in USD per million tokens, `per_image`, `per_minute`
/// and `per_1k_chars` in USD per their unit; a row's own, a tier's or a
/// long-context table's.
type RawRates = BTreeMap<String, toml::Value>;

fn number(v: &toml::Value) -> Option<f64> {
    v.as_float().or_else(|| v.as_integer().map(|i| i as f64))
}

/// Exact rates from `raw`; errors name the key (`models."x".flex.input`).
/// A key that is no meter's is an error, not ignored. A `per_image` table
/// (by `"SIZE/QUALITY"`) is read by `image_prices`.
fn meter_rates(raw: &RawRates, at: &str) -> Result<Rates, String> {
    let mut rates = Rates::default();
    for (key, v) in raw {
        let m = Meter::from_catalog_key(key).ok_or_else(|| format!("{at}.{key}: unknown key"))?;
        if m == Meter::Images && v.is_table() {
            continue;
        }
        let x = number(v).ok_or_else(|| format!("{at}.{key}: not a number"))?;
        let r = Rate::from_f64_usd_per(x, m.unit()).map_err(|e| format!("{at}.{key}: {e}"))?;
        rates.set(m, Some(r));
    }
    Ok(rates)
}

/// `[models."x".per_image]`: USD per image by `"1024x1024/hd"`.
fn image_prices(raw: &RawRates, at: &str) -> Result<Vec<(ImageSpec, Rate)>, String> {
    let Some(toml::Value::Table(table)) = raw.get("per_image") else {
        return Ok(Vec::new());
    };
    let at = format!("{at}.per_image");
    table
        .iter()
        .map(|(key, v)| {
            let spec = ImageSpec::parse_key(key)
                .filter(|s| !s.is_auto())
                .ok_or_else(|| {
                    format!("{at}.\"{key}\": not SIZE/QUALITY (\"1024x1024/standard\")")
                })?;
            let x = number(v).ok_or_else(|| format!("{at}.\"{key}\": not a number"))?;
            let r = Rate::from_f64_usd_per(x, crate::usage::meter::Unit::Image)
                .map_err(|e| format!("{at}.\"{key}\": {e}"))?;
            Ok((spec, r))
        })
        .collect()
}

/// `[models."x".long_context]`: a threshold and prices (checked by
/// `meter_rates`: serde cannot deny unknown keys next to `flatten`).
#[derive(Debug, Deserialize)]
struct RawLongContext {
    above_input_tokens: u64,
    #[serde(flatten)]
    rest: BTreeMap<String, toml::Value>,
}

/// A catalog row. Its prices are every key that is not one of these
/// fields (`prices`), each a meter's name; any other key is refused by
/// `meter_rates`.
#[derive(Debug, Deserialize)]
struct RawModel {
    provider: Option<String>,
    max_output_tokens: Option<u64>,
    encoding: Option<String>,
    #[allow(dead_code)]
    mode: Option<String>,
    flex: Option<RawRates>,
    priority: Option<RawRates>,
    batch: Option<RawRates>,
    long_context: Option<RawLongContext>,
    tool_calls: Option<BTreeMap<String, f64>>,
    /// Self-hosted (`pricing::gpu`): instead of token prices.
    gpu_usd_per_hour: Option<f64>,
    gpus: Option<u32>,
    min_tokens_per_second: Option<u64>,
    window_seconds: Option<u64>,
    #[serde(flatten)]
    prices: RawRates,
}

impl RawModel {
    /// The GPU price of a self-hosted row; `None` for token-priced rows.
    fn gpu(&self, at: &str) -> Result<Option<GpuPrice>, String> {
        let Some(usd) = self.gpu_usd_per_hour else {
            if self.gpus.is_some()
                || self.min_tokens_per_second.is_some()
                || self.window_seconds.is_some()
            {
                return Err(format!(
                    "{at}: gpus, min_tokens_per_second and window_seconds go with gpu_usd_per_hour"
                ));
            }
            return Ok(None);
        };
        let token_prices = self
            .prices
            .keys()
            .map(String::as_str)
            .chain(self.flex.as_ref().map(|_| "flex"))
            .chain(self.priority.as_ref().map(|_| "priority"))
            .chain(self.batch.as_ref().map(|_| "batch"))
            .chain(self.long_context.as_ref().map(|_| "long_context"))
            .collect::<Vec<_>>();
        if !token_prices.is_empty() {
            return Err(format!(
                "{at}: a row is priced by tokens or by GPU cost (gpu_usd_per_hour), not both (remove {})",
                token_prices.join(", ")
            ));
        }
        let floor = self.min_tokens_per_second.ok_or_else(|| {
            format!(
                "{at}.min_tokens_per_second: missing (the throughput floor gpu_usd_per_hour needs)"
            )
        })?;
        GpuPrice::new(
            usd,
            self.gpus.unwrap_or(1),
            floor,
            self.window_seconds
                .unwrap_or(super::gpu::DEFAULT_WINDOW_SECONDS),
        )
        .map(Some)
        .map_err(|e| format!("{at}.{e}"))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
    #[serde(default)]
    tool_calls: BTreeMap<String, f64>,
}

fn parse_toml(text: &str) -> Result<toml::Value, String> {
    toml::from_str(text).map_err(|e| e.message().to_string())
}

/// Tool-call fees (USD per 1000 calls) as exact per-call amounts.
fn call_fees(raw: &BTreeMap<String, f64>, at: &str) -> Result<Vec<(String, CallFee)>, String> {
    raw.iter()
        .map(|(kind, usd)| {
            if !usd.is_finite() || *usd < 0.0 {
                return Err(format!("{at}.{kind}: {usd} is not a non-negative price"));
            }
            CallFee::from_usd_per_1000(&format!("{usd}"))
                .map(|f| (kind.clone(), f))
                .map_err(|e| format!("{at}.{kind}: {e}"))
        })
        .collect()
}

#[derive(Debug)]
pub struct Catalog {
    models: HashMap<String, Arc<ModelPrice>>,
    /// `[tool_calls]`: fees for models whose row sets none.
    tool_calls: Vec<(String, CallFee)>,
    finetune_ppm: u128,
    /// Tier tables that change nothing, found while loading (`problems`).
    empty_tiers: Vec<String>,
}

pub type SharedCatalog = Arc<Catalog>;

impl Catalog {
    /// Parses catalog TOML; errors name the model and the key.
    pub fn parse(text: &str, finetune_multiple: f64) -> Result<Catalog, String> {
        Catalog::from_value(parse_toml(text)?, finetune_multiple)
    }

    /// `base` with `extra`'s rows added: a row of `extra` replaces the
    /// base's row of the same id whole, and its `[tool_calls]` fees the
    /// base's of the same kind. Errors name the file part (`extra: ...`).
    pub fn parse_with_extra(
        base: &str,
        extra: &str,
        finetune_multiple: f64,
    ) -> Result<Catalog, String> {
        let mut value = parse_toml(base)?;
        let extra = parse_toml(extra).map_err(|e| format!("extra: {e}"))?;
        if let (Some(into), toml::Value::Table(extra)) = (value.as_table_mut(), extra) {
            for (key, v) in extra {
                match (into.get_mut(&key), v) {
                    (Some(toml::Value::Table(t)), toml::Value::Table(rows)) => t.extend(rows),
                    (_, v) => {
                        into.insert(key, v);
                    }
                }
            }
        }
        Catalog::from_value(value, finetune_multiple)
    }

    fn from_value(value: toml::Value, finetune_multiple: f64) -> Result<Catalog, String> {
        let file: CatalogFile = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            format!("{path}: {}", e.into_inner())
        })?;
        let mut models = HashMap::with_capacity(file.models.len());
        let mut empty_tiers = Vec::new();
        for (id, raw) in file.models {
            let at = format!("models.\"{id}\"");
            let gpu = raw.gpu(&at)?;
            let mut rates = meter_rates(&raw.prices, &at)?;
            if let Some(g) = &gpu {
                rates.set(Meter::Input, Some(g.ceiling()));
                rates.set(Meter::Output, Some(g.ceiling()));
            }
            let per_image = image_prices(&raw.prices, &at)?;
            // A row priced by the unit (images, minutes, characters) bills
            // no tokens it does not price.
            let by_unit = !per_image.is_empty()
                || Meter::ALL
                    .into_iter()
                    .any(|m| !m.is_token() && rates.get(m).is_some());
            for required in [Meter::Input, Meter::Output] {
                if rates.get(required).is_none() && by_unit {
                    rates.set(required, Some(Rate::default()));
                }
                if rates.get(required).is_none() {
                    return Err(format!(
                        "{at}.{}: missing (every row needs input and output, gpu_usd_per_hour, or a unit price: per_image, per_minute, per_1k_chars)",
                        required.name()
                    ));
                }
            }
            let encoding = match raw.encoding.as_deref() {
                None => None,
                Some(name) => Some(Encoding::from_name(name).ok_or_else(|| {
                    format!("{at}.encoding: unknown encoding `{name}` (o200k_base or cl100k_base)")
                })?),
            };
            let mut tier = |name: &str, raw: &Option<RawRates>| -> Result<Option<Rates>, String> {
                let Some(raw) = raw else { return Ok(None) };
                let tier = meter_rates(raw, &format!("{at}.{name}"))?;
                let changes = Meter::ALL
                    .into_iter()
                    .any(|c| tier.get(c).is_some_and(|r| Some(r) != rates.get(c)));
                if !changes {
                    empty_tiers.push(format!("{at}.{name}: the tier overrides nothing"));
                }
                Ok(Some(tier))
            };
            let flex = tier("flex", &raw.flex)?;
            let priority = tier("priority", &raw.priority)?;
            let batch = tier("batch", &raw.batch)?;
            let long_context = match &raw.long_context {
                None => None,
                Some(lc) => {
                    let at = format!("{at}.long_context");
                    let rates = meter_rates(&lc.rest, &at)?;
                    if rates.is_empty() {
                        empty_tiers.push(format!("{at}: sets no price"));
                    }
                    Some(LongContext {
                        above_input_tokens: lc.above_input_tokens,
                        rates,
                    })
                }
            };
            let tool_calls = match &raw.tool_calls {
                Some(t) => call_fees(t, &format!("{at}.tool_calls"))?,
                None => Vec::new(),
            };
            let price = ModelPrice {
                provider: raw.provider.as_deref().map(super::price::intern),
                rates,
                flex: flex.map(Box::new),
                priority: priority.map(Box::new),
                batch: batch.map(Box::new),
                long_context: long_context.map(Box::new),
                tool_calls,
                per_image,
                max_output_tokens: raw.max_output_tokens,
                encoding,
                gpu: gpu.map(Box::new),
                worst: std::sync::OnceLock::new(),
            };
            models.insert(id, Arc::new(price));
        }
        let tool_calls = call_fees(&file.tool_calls, "tool_calls")?;
        let ppm = super::money::decimal_scaled(&format!("{finetune_multiple}"), 6)
            .map_err(|e| format!("finetune_multiple: {e}"))?;
        Ok(Catalog {
            models,
            tool_calls,
            finetune_ppm: ppm,
            empty_tiers,
        })
    }

    /// `[tool_calls]`: the fees of models whose own row sets none.
    pub fn tool_call_fees(&self) -> &[(String, CallFee)] {
        &self.tool_calls
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
        let mut rows: Vec<_> = self
            .models
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_ref()))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(b.0));
        rows
    }

    /// Exact id, then the id without its date suffix.
    /// Exact id, then the id without its date suffix. A dated snapshot
    /// priced exactly like its alias is reported as the alias (one
    /// `base_model` per price, as SPEC 8's example shows); one priced
    /// differently (`gpt-4o-2024-05-13`) keeps its own id.
    fn lookup(&self, id: &str) -> Option<(&str, &Arc<ModelPrice>)> {
        let stripped = strip_date_suffix(id);
        let alias = (stripped.len() != id.len())
            .then(|| self.models.get_key_value(stripped))
            .flatten();
        match (self.models.get_key_value(id), alias) {
            (Some((_, exact)), Some((k, v))) if exact.same_prices(v) => Some((k.as_str(), v)),
            (Some((k, v)), _) => Some((k.as_str(), v)),
            (None, Some((k, v))) => Some((k.as_str(), v)),
            (None, None) => None,
        }
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
            None => base_price
                .as_ref()
                .map(|p| Arc::new(p.times_ppm(self.finetune_ppm))),
        };
        Resolved {
            price,
            base_model,
            base_price,
            finetuned: true,
        }
    }

    /// Fine-tuned rows with their base rows: `(ft id, base id, ft, base)`.
    pub fn finetune_pairs(&self) -> Vec<(&str, String, &ModelPrice, &ModelPrice)> {
        self.rows()
            .into_iter()
            .filter_map(|(id, price)| {
                let base = id.strip_prefix("ft:")?;
                let (base_id, base_price) = self.lookup(base)?;
                Some((id, base_id.to_string(), price, base_price.as_ref()))
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
            let (input, cached) = (
                price.rates.get(Meter::Input),
                price.rates.get(Meter::CachedInput),
            );
            if let (Some(input), Some(cached)) = (input, cached) {
                if cached > input {
                    out.push(format!("models.\"{id}\": cached_input is above input"));
                }
            }
            for (kind, _) in &price.tool_calls {
                if !ToolCalls::KINDS.contains(&kind.as_str()) {
                    out.push(format!(
                        "models.\"{id}\".tool_calls.{kind}: not a call type tollgate counts ({})",
                        ToolCalls::KINDS.join(", ")
                    ));
                }
            }
        }
        for (kind, _) in &self.tool_calls {
            if !ToolCalls::KINDS.contains(&kind.as_str()) {
                out.push(format!(
                    "tool_calls.{kind}: not a call type tollgate counts ({})",
                    ToolCalls::KINDS.join(", ")
                ));
            }
        }
        out.extend(self.empty_tiers.iter().cloned());
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

    use crate::pricing::NanoUsd;
    use crate::usage::Usage;

    fn usage(p: u64, c: u64, cached: u64) -> Usage {
        Usage {
            cached_tokens: Some(cached),
            ..Usage::tokens(p, c)
        }
    }

    fn catalog() -> Catalog {
        match Catalog::bundled(6.0) {
            Ok(c) => c,
            Err(e) => panic!("bundled catalog: {e}"),
        }
    }

    #[test]
    fn a_price_key_must_be_a_meter_name() {
        let ok = "[models.\"m\"]\ninput = 1.0\noutput = 2.0\ncache_write_1h = 6.0\n\
                  [models.\"m\".flex]\ninput = 0.5\n";
        let c = Catalog::parse(ok, 1.0).unwrap_or_else(|e| panic!("{e}"));
        let price = c.resolve("m").price.unwrap_or_else(|| panic!("unpriced"));
        assert!(price.rates.get(Meter::CacheWrite1h).is_some());
        for (bad, why) in [
            (
                "input = 1.0\noutput = 2.0\ninptu = 3.0",
                "models.\"m\".inptu: unknown key",
            ),
            (
                "input = 1.0\noutput = \"two\"",
                "models.\"m\".output: not a number",
            ),
            (
                "input = 1.0\noutput = 2.0\n[models.\"m\".flex]\nvideo = 1.0",
                "models.\"m\".flex.video: unknown key",
            ),
        ] {
            let text = format!("[models.\"m\"]\n{bad}\n");
            match Catalog::parse(&text, 1.0) {
                Ok(_) => panic!("accepted {bad:?}"),
                Err(e) => assert!(e.contains(why), "{e}"),
            }
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
    fn extra_rows_add_to_and_replace_the_base_rows() {
        let base = "[tool_calls]\nweb_search = 10.0\nfile_search = 2.5\n\n\
                    [models.\"a\"]\ninput = 1.0\noutput = 2.0\ncached_input = 0.5\n\n\
                    [models.\"b\"]\ninput = 3.0\noutput = 4.0\n";
        let extra = "[tool_calls]\nweb_search = 25.0\n\n\
                     [models.\"a\"]\ninput = 0.8\noutput = 1.6\n\n\
                     [models.\"gpu\"]\ngpu_usd_per_hour = 3.6\nmin_tokens_per_second = 100\n";
        let c = Catalog::parse_with_extra(base, extra, 6.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.len(), 3);
        let price = |m: &str| c.resolve(m).price.unwrap_or_else(|| panic!("{m} unpriced"));
        // "a" is replaced whole: its cached price went with the old row.
        assert_eq!(price("a").input().usd_per_million_string(), "0.8");
        assert_eq!(price("a").rates.get(Meter::CachedInput), None);
        assert_eq!(price("b").output().usd_per_million_string(), "4");
        assert!(price("gpu").gpu.is_some());
        let fees: Vec<&str> = c.tool_call_fees().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(fees, ["file_search", "web_search"]);
        assert!(
            Catalog::parse_with_extra(base, "[models.\"x\"]\ninput = 1\n", 6.0)
                .is_err_and(|e| e.contains("models.\"x\".output: missing"))
        );
        assert!(Catalog::parse_with_extra(base, "not toml [", 6.0)
            .is_err_and(|e| e.starts_with("extra: ")));
    }

    #[test]
    fn bad_rows_are_named() {
        let bad = |text: &str, needle: &str| {
            let err = Catalog::parse(text, 6.0).err().unwrap_or_default();
            assert!(err.contains(needle), "{text}: {err}");
        };
        let row = "[models.\"x\"]\ninput = 1.0\noutput = 2.0\n";
        bad(
            &format!("{row}encoding = \"p99\"\n"),
            "models.\"x\".encoding",
        );
        bad(
            "[models.\"x\"]\ninput = -1.0\noutput = 1.0\n",
            "models.\"x\".input",
        );
        bad(
            "[models.\"x\"]\ninput = 1.0\n",
            "models.\"x\".output: missing",
        );
        bad(&format!("{row}inptu = 3.0\n"), "inptu");
        bad(
            &format!("{row}[models.\"x\".flex]\ninput = -0.5\n"),
            "models.\"x\".flex.input",
        );
        bad(&format!("{row}[models.\"x\".flex]\nimput = 0.5\n"), "imput");
        bad(
            &format!("{row}[models.\"x\".long_context]\ninput = 2.0\n"),
            "above_input_tokens",
        );
        bad(
            &format!("{row}[models.\"x\".long_context]\nabove_input_tokens = 5\ninptu = 2.0\n"),
            "models.\"x\".long_context.inptu",
        );
        bad(
            &format!("{row}[tool_calls]\nweb_search = -10.0\n"),
            "tool_calls.web_search",
        );
        // Loads, but `catalog check` names what cannot be right.
        let c = Catalog::parse(
            &format!("{row}encoding = \"o200k_base\"\n[models.\"x\".priority]\ninput = 1.0\n[models.\"x\".tool_calls]\nweb_serch = 10.0\n"),
            6.0,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let problems = c.problems().join("\n");
        assert!(
            problems.contains("models.\"x\".priority: the tier overrides nothing"),
            "{problems}"
        );
        assert!(
            problems.contains("models.\"x\".tool_calls.web_serch"),
            "{problems}"
        );
    }

    #[test]
    fn v2_rows_load_every_component_tier_and_fee() {
        let c = Catalog::parse(
            r#"
[tool_calls]
web_search = 10.0
[models."m"]
provider = "openai"
input = 1.0
output = 4.0
cached_input = 0.1
cache_write = 1.25
cache_write_1h = 2.0
audio_input = 40.0
audio_output = 80.0
image_input = 10.0
image_output = 40.0
encoding = "o200k_base"
[models."m".flex]
input = 0.5
[models."m".long_context]
above_input_tokens = 1000
input = 2.0
[models."m".tool_calls]
web_search = 25.0
"#,
            6.0,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.problems(), Vec::<String>::new());
        let p = c.resolve("m").price.unwrap_or_else(|| panic!("unpriced"));
        assert_eq!(p.provider, Some("openai"));
        let u = Usage {
            tool_calls: crate::usage::ToolCalls {
                web_search: 1,
                file_search: 0,
            },
            ..Usage::tokens(1_000_000, 0)
        };
        let flex = p.price(&u, crate::usage::ServiceTier::Flex, c.tool_call_fees());
        // 1M prompt tokens, above the threshold: long-context input ($2)
        // overrides the flex table; one call at the row's own fee ($0.025).
        assert_eq!(flex.total, NanoUsd(2_025_000_000));
        assert_eq!(c.tool_call_fees().len(), 1);
    }
}
