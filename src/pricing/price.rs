//! One model's prices (SPEC 9) and the exact cost of a request at them:
//! named components, service-tier tables, long-context prices and built-in
//! tool-call fees, priced from what the response says was served, summed
//! exactly and rounded once, with a breakdown per component.

use super::money::{div_round_half_up, CostAccumulator, NanoUsd, Rate, ZEPTO_PER_NANO};
use crate::usage::{Encoding, ImageSpec, ServiceTier, Usage};

/// A price a catalog row can set, in USD per million tokens.
/// The catalog's token components are the meters (`usage::Meter`): one
/// list for prices, the breakdown, the row and the metrics.
pub use crate::usage::meter::Meter;

/// A line of a request's cost breakdown (the `cost_breakdown` keys): one
/// per meter (in `Meter::ALL` order, by the meter's name), then the
/// per-call fees and a self-hosted model's GPU share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    Meter(Meter),
    ToolCalls,
    /// A self-hosted model's share of its GPUs' cost (`pricing::gpu`).
    Gpu,
}

impl Line {
    pub const COUNT: usize = Meter::COUNT + 2;
    pub const ALL: [Line; Line::COUNT] = {
        let mut all = [Line::Gpu; Line::COUNT];
        let mut i = 0;
        while i < Meter::COUNT {
            all[i] = Line::Meter(Meter::ALL[i]);
            i += 1;
        }
        all[Meter::COUNT] = Line::ToolCalls;
        all
    };

    /// The line a meter's cost is billed on.
    pub fn of(m: Meter) -> Line {
        Line::Meter(m)
    }

    /// Its place in `Line::ALL` (and in a `Breakdown`).
    pub fn index(self) -> usize {
        match self {
            Line::Meter(m) => m as usize,
            Line::ToolCalls => Meter::COUNT,
            Line::Gpu => Meter::COUNT + 1,
        }
    }

    /// The meter this line bills, if it is a meter's.
    pub fn meter(self) -> Option<Meter> {
        match self {
            Line::Meter(m) => Some(m),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Line::Meter(m) => m.name(),
            Line::ToolCalls => "tool_calls",
            Line::Gpu => "gpu",
        }
    }

    pub fn from_name(name: &str) -> Option<Line> {
        Line::ALL.into_iter().find(|l| l.name() == name)
    }
}

/// Nano-USD per breakdown line; the lines sum to the request's total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Breakdown(pub [u64; Line::COUNT]);

impl Breakdown {
    pub fn get(&self, line: Line) -> u64 {
        self.0[line.index()]
    }

    /// Non-zero lines, in `Line::ALL` order.
    pub fn lines(&self) -> impl Iterator<Item = (Line, u64)> + '_ {
        Line::ALL
            .into_iter()
            .map(|l| (l, self.0[l.index()]))
            .filter(|(_, n)| *n > 0)
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Reads a `cost_breakdown` column (or spooled row); names it does not
    /// know are skipped, text that is not such an object is `None`.
    pub fn parse(text: &str) -> Option<Breakdown> {
        let map: std::collections::HashMap<String, u64> = serde_json::from_str(text).ok()?;
        let mut out = Breakdown::default();
        for (name, n) in map {
            if let Some(line) = Line::from_name(&name) {
                out.0[line.index()] = n;
            }
        }
        Some(out)
    }

    /// `{"input": 123, ...}`, zero lines omitted (the `cost_breakdown` column).
    pub fn to_json(&self) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(64);
        out.push('{');
        for (i, (line, n)) in self.lines().enumerate() {
            let comma = if i > 0 { "," } else { "" };
            let _ = write!(out, "{comma}\"{}\":{n}", line.name());
        }
        out.push('}');
        out
    }
}

/// Optional rates per component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rates(pub [Option<Rate>; Meter::COUNT]);

impl Rates {
    pub fn get(&self, c: Meter) -> Option<Rate> {
        self.0[c as usize]
    }

    pub fn set(&mut self, c: Meter, r: Option<Rate>) {
        self.0[c as usize] = r;
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }

    /// `self` with every component `over` sets replaced.
    fn overridden_by(&self, over: &Rates) -> Rates {
        let mut out = *self;
        for c in Meter::ALL {
            if let Some(r) = over.get(c) {
                out.set(c, Some(r));
            }
        }
        out
    }

    fn map(&self, f: impl Fn(Rate) -> Rate) -> Rates {
        Rates(self.0.map(|r| r.map(&f)))
    }

    /// The rate a component is billed at: its own, else its fallback's.
    fn effective(&self, c: Meter) -> Rate {
        let mut c = c;
        loop {
            if let Some(r) = self.get(c) {
                return r;
            }
            match c.fallback() {
                Some(next) => c = next,
                None => return Rate::default(),
            }
        }
    }
}

/// Prices that apply to the whole request past a prompt size.
#[derive(Debug, Clone, PartialEq)]
pub struct LongContext {
    pub above_input_tokens: u64,
    pub rates: Rates,
}

/// A built-in tool call fee: zepto-USD per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CallFee(pub u128);

impl CallFee {
    /// From USD per 1000 calls, exactly.
    pub fn from_usd_per_1000(text: &str) -> Result<CallFee, String> {
        super::money::decimal_scaled(text, 18).map(CallFee)
    }

    pub fn usd_per_1000_string(self) -> String {
        super::money::format_decimal(self.0, 18)
    }
}

/// One catalog row.
#[derive(Debug, Clone)]
pub struct ModelPrice {
    /// Interned (`intern`): copied into every usage row without a
    /// reference count shared by every request of the model.
    pub provider: Option<&'static str>,
    /// Standard prices (`input` and `output` always set).
    pub rates: Rates,
    // Boxed: most rows have one tier table or none, and an inline `Rates`
    // is 288 bytes (the catalog is resident for the life of the process).
    pub flex: Option<Box<Rates>>,
    pub priority: Option<Box<Rates>>,
    pub batch: Option<Box<Rates>>,
    pub long_context: Option<Box<LongContext>>,
    /// The row's own tool-call fees; the catalog's `[tool_calls]` otherwise.
    pub tool_calls: Vec<(String, CallFee)>,
    /// Prices per image by size and quality (`[per_image]`); a flat
    /// `per_image` is the `Meter::Images` rate.
    pub per_image: Vec<(ImageSpec, Rate)>,
    pub max_output_tokens: Option<u64>,
    pub encoding: Option<Encoding>,
    /// Self-hosted: priced from GPU cost over a trailing window; `rates`
    /// then hold the ceiling (the price at the floor throughput).
    pub gpu: Option<Box<super::gpu::GpuPrice>>,
    /// Highest (prompt-side, completion-side) rate per served tier (in
    /// `TIERS` order), below the long-context threshold: computed on first
    /// use, as every reservation needs it.
    pub(crate) worst: std::sync::OnceLock<[(Rate, Rate); TIERS.len()]>,
}

/// A provider name as a `&'static str`. Names come from catalogs (a few
/// dozen distinct ones at most, reloads included), so each is leaked once.
pub fn intern(name: &str) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let Ok(mut names) = NAMES.lock() else {
        return "unknown";
    };
    if let Some(n) = names.iter().find(|n| **n == name) {
        return n;
    }
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    names.push(leaked);
    leaked
}

/// Every tier a response can name, in `ModelPrice::worst` order.
const TIERS: [ServiceTier; 6] = [
    ServiceTier::Standard,
    ServiceTier::Flex,
    ServiceTier::Priority,
    ServiceTier::Batch,
    ServiceTier::Scale,
    ServiceTier::Other,
];

impl PartialEq for ModelPrice {
    fn eq(&self, other: &ModelPrice) -> bool {
        self.same_prices(other)
            && self.provider == other.provider
            && self.max_output_tokens == other.max_output_tokens
            && self.encoding == other.encoding
            && self.gpu == other.gpu
    }
}

/// A request's exact cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Priced {
    pub total: NanoUsd,
    pub breakdown: Breakdown,
    /// Why standard or derived prices stood in for the served tier.
    pub fallback: Option<&'static str>,
    /// What the cached prompt tokens would have cost more at the input
    /// price: cached tokens x (input - cached_input), rounded once.
    pub cache_savings: NanoUsd,
}

impl ModelPrice {
    /// A row of plain text prices.
    pub fn text(input: Rate, output: Rate) -> ModelPrice {
        let mut rates = Rates::default();
        rates.set(Meter::Input, Some(input));
        rates.set(Meter::Output, Some(output));
        ModelPrice {
            provider: None,
            rates,
            flex: None,
            priority: None,
            batch: None,
            long_context: None,
            tool_calls: Vec::new(),
            per_image: Vec::new(),
            max_output_tokens: None,
            encoding: None,
            gpu: None,
            worst: std::sync::OnceLock::new(),
        }
    }

    /// Every price equal (limits and encodings aside).
    pub fn same_prices(&self, other: &ModelPrice) -> bool {
        self.rates == other.rates
            && self.flex == other.flex
            && self.priority == other.priority
            && self.batch == other.batch
            && self.long_context == other.long_context
            && self.tool_calls == other.tool_calls
            && self.per_image == other.per_image
    }

    pub fn input(&self) -> Rate {
        self.rates.effective(Meter::Input)
    }

    pub fn output(&self) -> Rate {
        self.rates.effective(Meter::Output)
    }

    /// The rates for a served tier, and whether they stand in for a table
    /// the row does not have (SPEC 9: flex falls back to the batch table,
    /// batch to half of every standard price, priority and scale to
    /// standard).
    fn tier_rates(&self, tier: ServiceTier) -> (Rates, Option<&'static str>) {
        let std = self.rates;
        let half = || std.map(|r| Rate(div_round_half_up(r.0, 2)));
        match tier {
            ServiceTier::Standard => (std, None),
            ServiceTier::Flex => match (&self.flex, &self.batch) {
                (Some(f), _) => (std.overridden_by(f), None),
                (None, Some(b)) => (std.overridden_by(b), Some("tier")),
                (None, None) => (half(), Some("tier")),
            },
            ServiceTier::Batch => match &self.batch {
                Some(b) => (std.overridden_by(b), None),
                None => (half(), Some("tier")),
            },
            ServiceTier::Priority => match &self.priority {
                Some(p) => (std.overridden_by(p), None),
                None => (std, Some("tier")),
            },
            ServiceTier::Scale | ServiceTier::Other => (std, Some("tier")),
        }
    }

    /// The rates that apply to a request with `prompt_tokens` at `tier`.
    pub fn rates_for(
        &self,
        tier: ServiceTier,
        prompt_tokens: u64,
    ) -> (Rates, Option<&'static str>) {
        let (rates, fallback) = self.tier_rates(tier);
        match &self.long_context {
            Some(lc) if prompt_tokens > lc.above_input_tokens => {
                (rates.overridden_by(&lc.rates), fallback)
            }
            _ => (rates, fallback),
        }
    }

    /// The fee per call of a built-in tool, the row's own first.
    pub fn call_fee(&self, kind: &str, global: &[(String, CallFee)]) -> CallFee {
        self.tool_calls
            .iter()
            .chain(global)
            .find(|(k, _)| k == kind)
            .map_or(CallFee::default(), |(_, f)| *f)
    }

    /// The price of one image made at `spec`: the `[per_image]` price of
    /// its size and quality, the dearest that `spec` may stand for (an
    /// `auto` quality) or, for a spec the table does not have, the dearest
    /// of all (never less than it may have cost); else the flat rate.
    pub fn image_rate(&self, rates: &Rates, spec: Option<ImageSpec>) -> Rate {
        if self.per_image.is_empty() {
            return rates.effective(Meter::Images);
        }
        let dearest = |keep: &dyn Fn(ImageSpec) -> bool| {
            self.per_image
                .iter()
                .filter(|(k, _)| keep(*k))
                .map(|(_, r)| *r)
                .max()
        };
        spec.and_then(|s| dearest(&|k| s.covers(k)))
            .or_else(|| dearest(&|_| true))
            .unwrap_or_default()
    }

    /// The rate of meter `c` for `usage` at `rates`.
    fn meter_rate(&self, rates: &Rates, c: Meter, usage: &Usage) -> Rate {
        match c {
            Meter::Images => self.image_rate(rates, usage.image_spec),
            _ => rates.effective(c),
        }
    }

    /// The exact cost of `usage` served at `tier`, rounded once; the
    /// breakdown's lines sum to the total (largest remainders get the
    /// rounding).
    pub fn price(&self, usage: &Usage, tier: ServiceTier, global: &[(String, CallFee)]) -> Priced {
        let (rates, fallback) = self.rates_for(tier, usage.prompt_tokens);
        let clamped = usage.clamped();
        let zepto = self.line_zepto(&rates, &clamped, usage, global);
        let mut acc = CostAccumulator::default();
        for z in zepto {
            acc.add_zepto(z);
        }
        let total = acc.nano_usd();
        let cache_savings = if clamped.cached() > 0 {
            let saved_per_token = rates
                .effective(Meter::Input)
                .0
                .saturating_sub(rates.effective(Meter::CachedInput).0);
            let mut saved = CostAccumulator::default();
            saved.add(clamped.cached(), Rate(saved_per_token));
            saved.nano_usd()
        } else {
            NanoUsd(0)
        };
        Priced {
            total,
            breakdown: apportion(&zepto, total.0),
            fallback,
            cache_savings,
        }
    }

    /// `price`'s total alone (no breakdown, no cache savings): what a
    /// request would cost at another tier, on the request path.
    pub fn total(&self, usage: &Usage, tier: ServiceTier, global: &[(String, CallFee)]) -> NanoUsd {
        let (rates, _) = self.rates_for(tier, usage.prompt_tokens);
        let mut acc = CostAccumulator::default();
        for z in self.line_zepto(&rates, &usage.clamped(), usage, global) {
            acc.add_zepto(z);
        }
        acc.nano_usd()
    }

    /// zepto-USD per breakdown line of `clamped` usage at `rates`.
    fn line_zepto(
        &self,
        rates: &Rates,
        clamped: &Usage,
        usage: &Usage,
        global: &[(String, CallFee)],
    ) -> [u128; Line::COUNT] {
        let mut zepto = [0u128; Line::COUNT];
        for c in Meter::ALL {
            let n = c.count(clamped);
            if n > 0 {
                let z = u128::from(n).saturating_mul(self.meter_rate(rates, c, clamped).0);
                let line = &mut zepto[Line::of(c).index()];
                *line = line.saturating_add(z);
            }
        }
        for kind in crate::usage::ToolCalls::KINDS {
            let calls = usage.tool_calls.count(kind);
            if calls > 0 {
                let z = u128::from(calls).saturating_mul(self.call_fee(kind, global).0);
                let line = &mut zepto[Line::ToolCalls.index()];
                *line = line.saturating_add(z);
            }
        }
        zepto
    }

    /// Cost of plain usage at standard prices (fine-tune premiums, tests).
    pub fn cost(&self, usage: &Usage) -> NanoUsd {
        self.price(usage, ServiceTier::Standard, &[]).total
    }

    /// The highest prompt-side and completion-side rate over the tiers a
    /// request may be served at: a true upper bound per token, whatever the
    /// response turns out to be.
    pub fn worst_rates(&self, tiers: &[ServiceTier], prompt_tokens: u64) -> (Rate, Rate) {
        let worst_of = |rates: &Rates| {
            let (mut p, mut c) = (Rate::default(), Rate::default());
            for comp in Meter::ALL.into_iter().filter(|m| m.is_token()) {
                let r = rates.effective(comp);
                if comp.is_prompt() {
                    p = p.max(r);
                } else {
                    c = c.max(r);
                }
            }
            (p, c)
        };
        let table = self
            .worst
            .get_or_init(|| TIERS.map(|t| worst_of(&self.tier_rates(t).0)));
        let long = self
            .long_context
            .as_ref()
            .filter(|lc| prompt_tokens > lc.above_input_tokens);
        let (mut p, mut c) = (Rate::default(), Rate::default());
        for &tier in tiers {
            let i = TIERS.iter().position(|t| *t == tier).unwrap_or(0);
            let (tp, tc) = table[i];
            p = p.max(tp);
            c = c.max(tc);
            if let Some(lc) = long {
                let (lp, lc) = worst_of(&self.tier_rates(tier).0.overridden_by(&lc.rates));
                p = p.max(lp);
                c = c.max(lc);
            }
        }
        (p, c)
    }

    /// A true upper bound of what a request can cost before its response
    /// says what was served: every prompt token at the highest prompt-side
    /// rate and every completion token at the highest completion-side rate
    /// of the tiers it may be served at, plus the built-in tool calls it
    /// may make (`calls`: kind and count).
    pub fn worst_case(
        &self,
        prompt_tokens: u64,
        completion_tokens: u64,
        tiers: &[ServiceTier],
        calls: &[(&str, u64)],
        global: &[(String, CallFee)],
    ) -> NanoUsd {
        let (p, c) = self.worst_rates(tiers, prompt_tokens);
        let mut acc = CostAccumulator::default();
        acc.add(prompt_tokens, p);
        acc.add(completion_tokens, c);
        for (kind, n) in calls {
            acc.add_zepto(u128::from(*n).saturating_mul(self.call_fee(kind, global).0));
        }
        // Rounded up: the bound must not fall short by the rounding.
        NanoUsd(acc.nano_usd().0.saturating_add(1))
    }

    /// The most the unit meters of a request can cost (`units`: a usage
    /// holding only their counts and the images' spec) at the dearest of
    /// the tiers it may be served at, rounded up.
    pub fn worst_units(&self, units: &Usage, tiers: &[ServiceTier]) -> NanoUsd {
        let mut worst = 0u128;
        for &tier in tiers {
            let (rates, _) = self.tier_rates(tier);
            let zepto = Meter::ALL
                .into_iter()
                .filter(|m| !m.is_token())
                .map(|m| {
                    u128::from(m.count(units)).saturating_mul(self.meter_rate(&rates, m, units).0)
                })
                .fold(0u128, u128::saturating_add);
            worst = worst.max(zepto);
        }
        if worst == 0 {
            return NanoUsd(0);
        }
        NanoUsd(u64::try_from(worst.div_ceil(ZEPTO_PER_NANO)).unwrap_or(u64::MAX))
    }

    /// The row scaled by a decimal factor in millionths (fine-tuned models
    /// priced as a multiple of their base).
    pub fn times_ppm(&self, ppm: u128) -> ModelPrice {
        let scale = |r: &Rates| r.map(|x| x.times_ppm(ppm));
        ModelPrice {
            provider: self.provider,
            rates: scale(&self.rates),
            flex: self.flex.as_ref().map(|r| Box::new(scale(r))),
            priority: self.priority.as_ref().map(|r| Box::new(scale(r))),
            batch: self.batch.as_ref().map(|r| Box::new(scale(r))),
            long_context: self.long_context.as_ref().map(|lc| {
                Box::new(LongContext {
                    above_input_tokens: lc.above_input_tokens,
                    rates: scale(&lc.rates),
                })
            }),
            tool_calls: self.tool_calls.clone(),
            per_image: self
                .per_image
                .iter()
                .map(|(k, r)| (*k, r.times_ppm(ppm)))
                .collect(),
            max_output_tokens: self.max_output_tokens,
            encoding: self.encoding,
            // A fine-tune of a self-hosted model: its multiple of the ceiling.
            gpu: None,
            worst: std::sync::OnceLock::new(),
        }
    }
}

impl Rates {
    /// `{"input_usd_per_million": "1.25", ...}` for the components set.
    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        Meter::ALL
            .into_iter()
            .filter_map(|c| {
                self.get(c).map(|r| match c.unit() {
                    crate::usage::meter::Unit::Token => (
                        format!("{}_usd_per_million", c.name()),
                        serde_json::Value::String(r.usd_per_million_string()),
                    ),
                    unit => (
                        format!("{}_usd", c.catalog_key()),
                        serde_json::Value::String(r.usd_per_string(unit)),
                    ),
                })
            })
            .collect()
    }
}

impl ModelPrice {
    /// The row as `catalog show --format json` prints it.
    pub fn to_json(&self) -> serde_json::Value {
        let mut out = self.rates.to_json();
        // Keys older scripts read, always present.
        for c in [Meter::Input, Meter::Output, Meter::CachedInput] {
            out.entry(format!("{}_usd_per_million", c.name()))
                .or_insert(serde_json::Value::Null);
        }
        let mut put = |k: &str, v: serde_json::Value| {
            out.insert(k.to_string(), v);
        };
        put("provider", self.provider.into());
        put("max_output_tokens", self.max_output_tokens.into());
        put("encoding", self.encoding.map(|e| e.name()).into());
        if let Some(g) = &self.gpu {
            put(
                "gpu",
                serde_json::json!({
                    "usd_per_gpu_hour": super::money::format_decimal(g.nano_usd_per_gpu_hour, 9),
                    "gpus": g.gpus,
                    "min_tokens_per_second": g.min_tokens_per_second,
                    "window_seconds": g.window_seconds,
                }),
            );
        }
        for (name, tier) in [
            ("flex", &self.flex),
            ("priority", &self.priority),
            ("batch", &self.batch),
        ] {
            if let Some(t) = tier {
                put(name, serde_json::Value::Object(t.to_json()));
            }
        }
        if let Some(lc) = &self.long_context {
            let mut m = lc.rates.to_json();
            m.insert("above_input_tokens".into(), lc.above_input_tokens.into());
            put("long_context", serde_json::Value::Object(m));
        }
        if !self.per_image.is_empty() {
            let prices: serde_json::Map<String, serde_json::Value> = self
                .per_image
                .iter()
                .map(|(k, r)| {
                    let usd = r.usd_per_string(crate::usage::meter::Unit::Image);
                    (k.to_string(), usd.into())
                })
                .collect();
            put("per_image_usd", serde_json::Value::Object(prices));
        }
        if !self.tool_calls.is_empty() {
            let fees: serde_json::Map<String, serde_json::Value> = self
                .tool_calls
                .iter()
                .map(|(k, f)| (k.clone(), f.usd_per_1000_string().into()))
                .collect();
            put("tool_calls_usd_per_1000", serde_json::Value::Object(fees));
        }
        serde_json::Value::Object(out)
    }

    /// The tier tables the row has (`flex,priority,batch,long`), for tables.
    /// The unit prices a row sets (`per_minute=0.006`), for the table.
    pub fn unit_prices(&self) -> String {
        let mut out: Vec<String> = Meter::ALL
            .into_iter()
            .filter(|m| !m.is_token())
            .filter_map(|m| {
                let r = self.rates.get(m)?;
                Some(format!(
                    "{}={}",
                    m.catalog_key(),
                    r.usd_per_string(m.unit())
                ))
            })
            .collect();
        if !self.per_image.is_empty() {
            out.push(format!("per_image: {} sizes", self.per_image.len()));
        }
        out.join(" ")
    }

    pub fn tier_names(&self) -> String {
        let mut names = Vec::new();
        for (name, present) in [
            ("flex", self.flex.is_some()),
            ("priority", self.priority.is_some()),
            ("batch", self.batch.is_some()),
            ("long", self.long_context.is_some()),
            // Priced from GPU cost; input and output show the ceiling.
            ("gpu", self.gpu.is_some()),
        ] {
            if present {
                names.push(name);
            }
        }
        if names.is_empty() {
            "-".to_string()
        } else {
            names.join(",")
        }
    }
}

/// Whole nano-USD per line summing exactly to `total`: each line rounded
/// down, the difference handed to the lines with the largest remainders.
fn apportion(zepto: &[u128; Line::COUNT], total: u64) -> Breakdown {
    let mut out = [0u64; Line::COUNT];
    // (remainder, line), on the stack: this runs for every request. Most
    // lines are zero, and most amounts fit 64 bits (a 128-bit division is
    // a library call).
    let mut rest = [(0u128, 0usize); Line::COUNT];
    let mut with_rest = 0;
    for (i, &z) in zepto.iter().enumerate() {
        if z == 0 {
            continue;
        }
        let (whole, part) = match u64::try_from(z) {
            Ok(z) => (z / ZEPTO_PER_NANO_U64, u128::from(z % ZEPTO_PER_NANO_U64)),
            Err(_) => (
                u64::try_from(z / ZEPTO_PER_NANO).unwrap_or(u64::MAX),
                z % ZEPTO_PER_NANO,
            ),
        };
        out[i] = whole;
        if part > 0 {
            rest[with_rest] = (part, i);
            with_rest += 1;
        }
    }
    let floor: u64 = out.iter().fold(0u64, |a, b| a.saturating_add(*b));
    let mut extra = total.saturating_sub(floor);
    let rest = &mut rest[..with_rest];
    rest.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in rest.iter() {
        if extra == 0 {
            break;
        }
        out[i] += 1;
        extra -= 1;
    }
    Breakdown(out)
}

/// zepto-USD in one nano-USD, for 64-bit arithmetic.
const ZEPTO_PER_NANO_U64: u64 = 1_000_000_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_meter_has_its_own_breakdown_line_by_its_name() {
        for m in Meter::ALL {
            assert_eq!(Line::of(m).meter(), Some(m));
            assert_eq!(Line::of(m).name(), m.name());
        }
        let names: Vec<&str> = Line::ALL.iter().map(|l| l.name()).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), Line::COUNT, "{names:?}");
        let mut b = Breakdown::default();
        b.0[Line::Meter(Meter::CacheWrite1h).index()] = 7;
        b.0[Line::Gpu.index()] = 3;
        assert_eq!(b.to_json(), r#"{"cache_write_1h":7,"gpu":3}"#);
        assert_eq!(Breakdown::parse(&b.to_json()), Some(b));
    }

    fn rate(usd_per_m: &str) -> Rate {
        Rate::from_usd_per_million(usd_per_m).unwrap_or_default()
    }

    fn gpt5() -> ModelPrice {
        let mut p = ModelPrice::text(rate("1.25"), rate("10"));
        p.rates.set(Meter::CachedInput, Some(rate("0.125")));
        let mut flex = Rates::default();
        flex.set(Meter::Input, Some(rate("0.625")));
        flex.set(Meter::Output, Some(rate("5")));
        let mut prio = Rates::default();
        prio.set(Meter::Input, Some(rate("2.5")));
        prio.set(Meter::Output, Some(rate("20")));
        p.flex = Some(Box::new(flex));
        p.priority = Some(Box::new(prio));
        p
    }

    #[test]
    fn the_served_tier_picks_the_prices() {
        let u = Usage::tokens(10_000, 2_000);
        let p = gpt5();
        let std = p.price(&u, ServiceTier::Standard, &[]);
        assert_eq!(std.total, NanoUsd(32_500_000));
        let prio = p.price(&u, ServiceTier::Priority, &[]);
        assert_eq!((prio.total, prio.fallback), (NanoUsd(65_000_000), None));
        let flex = p.price(&u, ServiceTier::Flex, &[]);
        assert_eq!(flex.total, NanoUsd(16_250_000));
        // No batch table: half of every standard price, counted.
        let batch = p.price(&u, ServiceTier::Batch, &[]);
        assert_eq!(
            (batch.total, batch.fallback),
            (NanoUsd(16_250_000), Some("tier"))
        );
        let scale = p.price(&u, ServiceTier::Scale, &[]);
        assert_eq!(
            (scale.total, scale.fallback),
            (NanoUsd(32_500_000), Some("tier"))
        );
    }

    #[test]
    fn audio_and_cache_tokens_are_billed_once_at_their_own_rates() {
        // gpt-4o-audio-preview: 800 of 1000 prompt audio, 400 of 500 completion audio.
        let mut p = ModelPrice::text(rate("2.5"), rate("10"));
        p.rates.set(Meter::AudioInput, Some(rate("40")));
        p.rates.set(Meter::AudioOutput, Some(rate("80")));
        let u = Usage {
            audio_prompt_tokens: Some(800),
            audio_completion_tokens: Some(400),
            ..Usage::tokens(1_000, 500)
        };
        let priced = p.price(&u, ServiceTier::Standard, &[]);
        assert_eq!(priced.total, NanoUsd(65_500_000));
        assert_eq!(priced.breakdown.get(Line::Meter(Meter::Input)), 500_000);
        assert_eq!(
            priced.breakdown.get(Line::Meter(Meter::AudioInput)),
            32_000_000
        );
        assert_eq!(priced.breakdown.get(Line::Meter(Meter::Output)), 1_000_000);
        assert_eq!(
            priced.breakdown.get(Line::Meter(Meter::AudioOutput)),
            32_000_000
        );
        assert_eq!(
            priced.breakdown.to_json(),
            r#"{"input":500000,"output":1000000,"audio_input":32000000,"audio_output":32000000}"#
        );
        // A row without an audio price bills audio at the text rate.
        let plain = ModelPrice::text(rate("2.5"), rate("10"));
        assert_eq!(plain.cost(&u), NanoUsd(7_500_000));
    }

    #[test]
    fn long_context_moves_the_whole_request() {
        let mut p = ModelPrice::text(rate("1.25"), rate("10"));
        let mut lc = Rates::default();
        lc.set(Meter::Input, Some(rate("2.5")));
        lc.set(Meter::Output, Some(rate("15")));
        p.long_context = Some(Box::new(LongContext {
            above_input_tokens: 200_000,
            rates: lc,
        }));
        assert_eq!(p.cost(&Usage::tokens(200_000, 1_000)), NanoUsd(260_000_000));
        assert_eq!(p.cost(&Usage::tokens(200_001, 1_000)), NanoUsd(515_002_500));
    }

    #[test]
    fn tool_calls_are_billed_per_call_the_rows_own_fee_first() {
        let global = vec![(
            "web_search".to_string(),
            CallFee::from_usd_per_1000("10").unwrap_or_default(),
        )];
        let mut p = ModelPrice::text(rate("0"), rate("0"));
        let u = Usage {
            tool_calls: crate::usage::ToolCalls {
                web_search: 3,
                file_search: 0,
            },
            ..Usage::tokens(0, 0)
        };
        assert_eq!(
            p.price(&u, ServiceTier::Standard, &global).total,
            NanoUsd(30_000_000)
        );
        p.tool_calls.push((
            "web_search".into(),
            CallFee::from_usd_per_1000("25").unwrap_or_default(),
        ));
        let priced = p.price(&u, ServiceTier::Standard, &global);
        assert_eq!(priced.total, NanoUsd(75_000_000));
        assert_eq!(priced.breakdown.get(Line::ToolCalls), 75_000_000);
    }

    #[test]
    fn the_breakdown_sums_to_the_total_rounded_once() {
        // Three lines of 0.4 nano each: total 1.2 -> 1; the breakdown gives
        // the one nano to one line.
        let mut p = ModelPrice::text(rate("0.0004"), rate("0.0004"));
        p.rates.set(Meter::CachedInput, Some(rate("0.0004")));
        let u = Usage {
            cached_tokens: Some(1),
            ..Usage::tokens(2, 1)
        };
        let priced = p.price(&u, ServiceTier::Standard, &[]);
        assert_eq!(priced.total, NanoUsd(1));
        assert_eq!(priced.breakdown.total(), 1);
        // Cached and input at the same rate: nothing saved.
        assert_eq!(priced.cache_savings, NanoUsd(0));
        let u = Usage {
            cached_tokens: Some(1_000),
            ..Usage::tokens(1_000, 0)
        };
        assert_eq!(
            gpt5().price(&u, ServiceTier::Standard, &[]).cache_savings,
            NanoUsd(1_125_000)
        );
    }

    #[test]
    fn the_worst_rate_covers_every_tier_and_component() {
        let mut p = gpt5();
        p.rates.set(Meter::AudioInput, Some(rate("40")));
        let (prompt, completion) =
            p.worst_rates(&[ServiceTier::Standard, ServiceTier::Priority], 10);
        assert_eq!((prompt, completion), (rate("40"), rate("20")));
    }
}
