//! Self-hosted models priced from what their GPUs cost (a vLLM or Ollama
//! upstream): a catalog row gives `gpu_usd_per_hour`, `gpus` and a floor,
//! `min_tokens_per_second`, instead of token prices. Each request pays its
//! tokens' share of the GPU cost of a trailing window:
//!
//! ```text
//! cost = tokens x (gpu cost of the window) / max(tokens served in the window,
//!                                                floor x window)
//! ```
//!
//! The window's tokens include the request's own. The floor is the
//! throughput the GPUs are assumed to reach at least: an idle hour never
//! makes one request pay for the whole hour, and no token ever costs more
//! than the GPUs' cost at the floor throughput (the catalog row's token
//! rates are that ceiling, so budget reservations cover every request).
//!
//! The windows are this process's: replicas sharing GPUs each see their
//! share of the tokens (set the floor accordingly).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::money::{decimal_scaled, NanoUsd, Rate, ZEPTO_PER_NANO};

/// Seconds in the trailing window when the row sets none.
pub const DEFAULT_WINDOW_SECONDS: u64 = 300;

// Bounds that keep every product below in u128 (and rows sane).
const MAX_WINDOW_SECONDS: u64 = 86_400;
const MAX_GPUS: u32 = 1_000_000;
const MAX_TOKENS_PER_SECOND: u64 = 1_000_000_000;
const MAX_NANO_USD_PER_GPU_HOUR: u128 = 1_000_000 * 1_000_000_000;

/// A catalog row's GPU price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuPrice {
    /// nano-USD per hour for one GPU.
    pub nano_usd_per_gpu_hour: u128,
    pub gpus: u32,
    /// The floor: tokens per second the GPUs are assumed to serve at least.
    pub min_tokens_per_second: u64,
    pub window_seconds: u64,
}

impl GpuPrice {
    /// From the catalog's numbers (`gpu_usd_per_hour` as written).
    pub fn new(
        usd_per_gpu_hour: f64,
        gpus: u32,
        min_tokens_per_second: u64,
        window_seconds: u64,
    ) -> Result<GpuPrice, String> {
        if !usd_per_gpu_hour.is_finite() || usd_per_gpu_hour < 0.0 {
            return Err(format!(
                "gpu_usd_per_hour: {usd_per_gpu_hour} is not a non-negative price"
            ));
        }
        if gpus == 0 {
            return Err("gpus: must be at least 1".into());
        }
        if min_tokens_per_second == 0 {
            return Err(
                "min_tokens_per_second: must be at least 1 (the floor that keeps an idle hour from landing on one request)"
                    .into(),
            );
        }
        if window_seconds == 0 || window_seconds > MAX_WINDOW_SECONDS {
            return Err(format!(
                "window_seconds: must be 1 to {MAX_WINDOW_SECONDS} (a day)"
            ));
        }
        if gpus > MAX_GPUS {
            return Err(format!("gpus: {gpus} is more than {MAX_GPUS}"));
        }
        if min_tokens_per_second > MAX_TOKENS_PER_SECOND {
            return Err(format!(
                "min_tokens_per_second: {min_tokens_per_second} is more than {MAX_TOKENS_PER_SECOND}"
            ));
        }
        let nano = decimal_scaled(&format!("{usd_per_gpu_hour}"), 9)
            .map_err(|e| format!("gpu_usd_per_hour: {e}"))?;
        if nano > MAX_NANO_USD_PER_GPU_HOUR {
            return Err(format!(
                "gpu_usd_per_hour: {usd_per_gpu_hour} is more than $1,000,000 an hour"
            ));
        }
        Ok(GpuPrice {
            nano_usd_per_gpu_hour: nano,
            gpus,
            min_tokens_per_second,
            window_seconds,
        })
    }

    /// nano-USD per hour for all the row's GPUs.
    pub fn nano_usd_per_hour(&self) -> u128 {
        self.nano_usd_per_gpu_hour * u128::from(self.gpus)
    }

    /// The highest rate a token can cost (at the floor throughput), rounded
    /// up: the row's token rates, which reservations use.
    pub fn ceiling(&self) -> Rate {
        let per_token = self.nano_usd_per_hour() * ZEPTO_PER_NANO;
        Rate(per_token.div_ceil(3600 * u128::from(self.min_tokens_per_second)))
    }

    /// The tokens a window's cost is spread over: those it served, at
    /// least the floor's over the whole window (never 0).
    fn spread_over(&self, window_tokens: u64) -> u128 {
        let floor = u128::from(self.min_tokens_per_second) * u128::from(self.window_seconds);
        u128::from(window_tokens).max(floor).max(1)
    }

    /// What `tokens` cost when the window served `window_tokens` (theirs
    /// included): exact, rounded once, half up.
    pub fn cost(&self, tokens: u64, window_tokens: u64) -> NanoUsd {
        let served = self.spread_over(window_tokens);
        let numerator = u128::from(tokens)
            .saturating_mul(self.nano_usd_per_hour())
            .saturating_mul(u128::from(self.window_seconds));
        // Rounded half up without `numerator + d / 2` (the numerator may be
        // saturated for absurd token counts).
        let d = 3600 * served;
        let (q, r) = (numerator / d, numerator % d);
        let cost = q + u128::from(r >= d - r);
        NanoUsd(u64::try_from(cost).unwrap_or(u64::MAX))
    }

    /// The effective price now, USD per million tokens (a gauge).
    pub fn usd_per_mtok(&self, window_tokens: u64) -> f64 {
        let served = self.spread_over(window_tokens) as f64;
        let window_cost_usd =
            self.nano_usd_per_hour() as f64 / 1e9 * self.window_seconds as f64 / 3600.0;
        window_cost_usd / served * 1e6
    }
}

/// Tokens served per second over the last `seconds`, in one-second buckets.
#[derive(Debug)]
pub struct Window {
    seconds: u64,
    /// (second, tokens), oldest first.
    buckets: VecDeque<(u64, u64)>,
    total: u64,
}

impl Window {
    pub fn new(seconds: u64) -> Window {
        Window {
            seconds,
            buckets: VecDeque::new(),
            total: 0,
        }
    }

    /// Takes a new length (the catalog was reloaded with another
    /// `window_seconds`).
    fn resize(&mut self, seconds: u64, now: u64) {
        if self.seconds != seconds {
            self.seconds = seconds;
            self.slide(now);
        }
    }

    /// Forgets what is older than the window ending at second `now`.
    fn slide(&mut self, now: u64) {
        while let Some(&(second, tokens)) = self.buckets.front() {
            if second + self.seconds > now {
                break;
            }
            self.total = self.total.saturating_sub(tokens);
            self.buckets.pop_front();
        }
    }

    /// Adds `tokens` served at second `now`; returns the window's tokens.
    pub fn record(&mut self, now: u64, tokens: u64) -> u64 {
        self.slide(now);
        match self.buckets.back_mut() {
            Some((second, n)) if *second >= now => *n = n.saturating_add(tokens),
            _ => self.buckets.push_back((now, tokens)),
        }
        self.total = self.total.saturating_add(tokens);
        self.total
    }

    /// The window's tokens at second `now`.
    pub fn tokens(&mut self, now: u64) -> u64 {
        self.slide(now);
        self.total
    }
}

/// The trailing windows of the GPU-priced models this process served.
#[derive(Debug)]
pub struct GpuMeters {
    started: Instant,
    windows: Mutex<HashMap<String, Arc<Mutex<Window>>>>,
}

impl Default for GpuMeters {
    fn default() -> Self {
        GpuMeters {
            started: Instant::now(),
            windows: Mutex::new(HashMap::new()),
        }
    }
}

/// One GPU-priced model's state for the metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuReading {
    pub model: String,
    pub window_tokens: u64,
    pub tokens_per_second: f64,
    pub usd_per_mtok: f64,
}

impl GpuMeters {
    /// Seconds since start (the windows' clock).
    pub fn now(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    fn window(&self, model: &str, seconds: u64) -> Option<Arc<Mutex<Window>>> {
        let mut windows = self.windows.lock().ok()?;
        if let Some(w) = windows.get(model) {
            return Some(w.clone());
        }
        let w = Arc::new(Mutex::new(Window::new(seconds)));
        windows.insert(model.to_string(), w.clone());
        Some(w)
    }

    /// Prices `tokens` of `model` served at second `now`.
    pub fn price_at(&self, model: &str, price: &GpuPrice, tokens: u64, now: u64) -> NanoUsd {
        let served = self
            .window(model, price.window_seconds)
            .and_then(|w| {
                w.lock().ok().map(|mut w| {
                    w.resize(price.window_seconds, now);
                    w.record(now, tokens)
                })
            })
            // A poisoned lock: the floor alone (the highest price).
            .unwrap_or(0);
        price.cost(tokens, served)
    }

    /// Each metered model's window now, for `tollgate_selfhosted_*`.
    pub fn readings(&self, price_of: impl Fn(&str) -> Option<GpuPrice>) -> Vec<GpuReading> {
        let now = self.now();
        let Ok(windows) = self.windows.lock() else {
            return Vec::new();
        };
        let mut out: Vec<GpuReading> = windows
            .iter()
            .filter_map(|(model, w)| {
                let price = price_of(model)?;
                let mut w = w.lock().ok()?;
                w.resize(price.window_seconds, now);
                let tokens = w.tokens(now);
                Some(GpuReading {
                    model: model.clone(),
                    window_tokens: tokens,
                    tokens_per_second: tokens as f64 / price.window_seconds as f64,
                    usd_per_mtok: price.usd_per_mtok(tokens),
                })
            })
            .collect();
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::money::div_round_half_up;
    use super::*;

    /// $3.60 per GPU-hour, 2 GPUs ($0.002 per second), floor 100 tokens/s,
    /// 60-second window: a window costs $0.12 and the floor is 6,000 tokens.
    fn price() -> GpuPrice {
        GpuPrice::new(3.6, 2, 100, 60).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_window_price_is_exact_under_a_controlled_clock() {
        let meters = GpuMeters::default();
        let p = price();
        // t = 0: 1,200 tokens, below the floor: 1,200 / 6,000 of $0.12.
        assert_eq!(meters.price_at("m", &p, 1_200, 0), NanoUsd(24_000_000));
        // t = 30: 10,800 more; the window holds 12,000 > 6,000:
        // 10,800 / 12,000 of $0.12.
        assert_eq!(meters.price_at("m", &p, 10_800, 30), NanoUsd(108_000_000));
        // t = 59: 12,000 + 7 tokens in the window; 7 x 0.12 / 12,007 USD
        // = 69,959.19... nano-USD, rounded once.
        assert_eq!(meters.price_at("m", &p, 7, 59), NanoUsd(69_959));
        // t = 60: the t = 0 tokens left the window (10,807 + 3 = 10,810).
        assert_eq!(
            meters.price_at("m", &p, 3, 60),
            NanoUsd(div_round_half_up(3 * 120_000_000, 10_810) as u64)
        );
        // t = 200: everything left; an idle window prices at the floor.
        assert_eq!(meters.price_at("m", &p, 1, 200), NanoUsd(20_000));
        // A reload to a 10-second window: what is older leaves at once.
        let shorter = GpuPrice::new(3.6, 2, 100, 10).unwrap_or_else(|e| panic!("{e}"));
        meters.price_at("m", &p, 6_000, 300);
        // Floor 1,000 tokens; the window holds 6,000 + 500 (t = 300, 305).
        assert_eq!(
            meters.price_at("m", &shorter, 500, 305),
            NanoUsd(div_round_half_up(500 * 20_000_000, 6_500) as u64)
        );
        // Another model has a window of its own.
        assert_eq!(
            meters.price_at("other", &p, 1_200, 200),
            NanoUsd(24_000_000)
        );
    }

    #[test]
    fn the_ceiling_is_the_price_at_the_floor() {
        let p = price();
        // $0.002 per second / 100 tokens per second = $0.00002 per token.
        assert_eq!(p.ceiling().usd_per_million_string(), "20");
        for (tokens, window) in [(1, 1), (5_000, 5_000), (6_000, 6_000), (7_000, 9_000)] {
            let ceiling = u128::from(tokens) * p.ceiling().0 / ZEPTO_PER_NANO;
            assert!(u128::from(p.cost(tokens, window).0) <= ceiling);
        }
        assert!((p.usd_per_mtok(0) - 20.0).abs() < 1e-9);
        assert!((p.usd_per_mtok(12_000) - 10.0).abs() < 1e-9);
    }

    #[test]
    fn bad_gpu_rows_are_refused() {
        assert!(GpuPrice::new(-1.0, 1, 1, 1).is_err());
        assert!(GpuPrice::new(1.0, 0, 1, 1).is_err());
        assert!(GpuPrice::new(1.0, 1, 0, 1).is_err());
        assert!(GpuPrice::new(1.0, 1, 1, 0).is_err());
        assert!(GpuPrice::new(1.0, 1, 1, 86_401).is_err());
        assert!(GpuPrice::new(2e6, 1, 1, 1).is_err());
        assert!(GpuPrice::new(1.0, 1, u64::MAX, 1).is_err());
        // The largest row accepted still prices without overflow.
        let big = GpuPrice::new(1e6, MAX_GPUS, MAX_TOKENS_PER_SECOND, MAX_WINDOW_SECONDS)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(big.ceiling().0 > 0);
        assert!(big.cost(u64::MAX, u64::MAX).0 > 0);
    }
}
