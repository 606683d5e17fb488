//! Exact money arithmetic. Prices are integer "zepto-USD per token"
//! (1e-21 USD), so every published price per million tokens with up to nine
//! decimals is exact; a request's cost is summed in that unit and rounded
//! once, half up, to whole nano-USD. No floating point touches a sum.

use std::fmt;

/// zepto-USD (1e-21 USD) per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Rate(pub u128);

/// zepto-USD per token in one USD per million tokens.
const ZEPTO_PER_USD_PER_MTOK: u32 = 15;
/// zepto-USD in one nano-USD.
pub const ZEPTO_PER_NANO: u128 = 1_000_000_000_000;

impl Rate {
    /// From a decimal string of USD per million tokens ("0.075", "2.5").
    pub fn from_usd_per_million(text: &str) -> Result<Rate, String> {
        decimal_scaled(text, ZEPTO_PER_USD_PER_MTOK).map(Rate)
    }

    /// From a TOML/JSON number of USD per million tokens. The float's
    /// shortest round-trip decimal form is what the file said, so it is
    /// converted from that text, exactly.
    pub fn from_f64_usd_per_million(x: f64) -> Result<Rate, String> {
        if !x.is_finite() || x < 0.0 {
            return Err(format!("price {x} is not a non-negative number"));
        }
        Rate::from_usd_per_million(&format!("{x}"))
    }

    /// From a TOML/JSON number of USD per a meter's catalog quantity (a
    /// million tokens, an image, a minute, 1,000 characters), exactly but
    /// for a per-minute price's division into seconds (rounded half up,
    /// below a zepto-USD).
    pub fn from_f64_usd_per(x: f64, unit: crate::usage::meter::Unit) -> Result<Rate, String> {
        if !x.is_finite() || x < 0.0 {
            return Err(format!("price {x} is not a non-negative number"));
        }
        if unit == crate::usage::meter::Unit::Token {
            return Rate::from_f64_usd_per_million(x);
        }
        let (_, per) = unit.zepto_per_usd();
        let zepto = decimal_scaled(&format!("{x}"), 21)?;
        Ok(Rate(div_round_half_up(zepto, per)))
    }

    /// From USD per token (the LiteLLM cost map's unit).
    pub fn from_f64_usd_per_token(x: f64) -> Result<Rate, String> {
        if !x.is_finite() || x < 0.0 {
            return Err(format!("price {x} is not a non-negative number"));
        }
        decimal_scaled(&format!("{x}"), 21).map(Rate)
    }

    /// Multiplies by a decimal factor given in millionths, rounding half up.
    pub fn times_ppm(self, ppm: u128) -> Rate {
        Rate(div_round_half_up(self.0 * ppm, 1_000_000))
    }

    pub fn usd_per_token(self) -> f64 {
        self.0 as f64 / 1e21
    }

    /// USD per a meter's catalog quantity (a million tokens, an image, a
    /// minute, 1,000 characters) as an exact decimal string.
    pub fn usd_per_string(self, unit: crate::usage::meter::Unit) -> String {
        let (_, per) = unit.zepto_per_usd();
        format_decimal(self.0.saturating_mul(per), 21)
    }

    /// USD per million tokens as an exact decimal string.
    pub fn usd_per_million_string(self) -> String {
        format_decimal(self.0, ZEPTO_PER_USD_PER_MTOK)
    }
}

/// Parses a plain decimal ("12", "0.075", "1e-7" is refused) into an integer
/// scaled by 10^scale, rounding half up past the scale.
pub fn decimal_scaled(text: &str, scale: u32) -> Result<u128, String> {
    let t = text.trim();
    let (int_part, frac_part) = t.split_once('.').unwrap_or((t, ""));
    if int_part.is_empty() && frac_part.is_empty()
        || !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(format!("`{text}` is not a plain decimal number"));
    }
    if int_part.len() > 20 {
        return Err(format!("`{text}` is too large"));
    }
    let mut value: u128 = 0;
    for b in int_part.bytes() {
        value = value * 10 + u128::from(b - b'0');
    }
    let frac = frac_part.as_bytes();
    for i in 0..scale as usize {
        let digit = frac.get(i).map_or(0, |b| u128::from(b - b'0'));
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(digit))
            .ok_or_else(|| format!("`{text}` is too large"))?;
    }
    if frac.get(scale as usize).is_some_and(|&b| b >= b'5') {
        value += 1;
    }
    Ok(value)
}

/// `value / 10^scale` as an exact decimal string, no trailing zeros.
pub fn format_decimal(value: u128, scale: u32) -> String {
    let unit = 10u128.pow(scale);
    let (int, frac) = (value / unit, value % unit);
    if frac == 0 {
        return int.to_string();
    }
    let frac = format!("{frac:0width$}", width = scale as usize);
    format!("{int}.{}", frac.trim_end_matches('0'))
}

pub fn div_round_half_up(numerator: u128, denominator: u128) -> u128 {
    (numerator + denominator / 2) / denominator
}

/// A running cost in zepto-USD; rounded to nano-USD once, at the end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CostAccumulator(u128);

impl CostAccumulator {
    pub fn add(&mut self, tokens: u64, rate: Rate) {
        self.0 = self
            .0
            .saturating_add(u128::from(tokens).saturating_mul(rate.0));
    }

    pub fn add_zepto(&mut self, zepto: u128) {
        self.0 = self.0.saturating_add(zepto);
    }

    pub fn nano_usd(self) -> NanoUsd {
        // Most requests cost under $0.018 (2^64 zepto-USD): a 64-bit
        // division then, where a 128-bit one is a library call.
        if let Ok(z) = u64::try_from(self.0) {
            let n = ZEPTO_PER_NANO as u64;
            return NanoUsd(z / n + u64::from(z % n >= n / 2));
        }
        NanoUsd(u64::try_from(div_round_half_up(self.0, ZEPTO_PER_NANO)).unwrap_or(u64::MAX))
    }
}

/// Whole nano-USD (1e-9 USD): the unit every stored and summed cost uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct NanoUsd(pub u64);

impl NanoUsd {
    pub fn as_usd_f64(self) -> f64 {
        self.0 as f64 / 1e9
    }
}

impl NanoUsd {
    /// USD with exactly nine decimals, as `x-tollgate-cost-usd` prints it:
    /// digits written by hand (it runs on every response) into `buf`.
    pub fn usd_text(self, buf: &mut [u8; 32]) -> &str {
        let mut end = buf.len();
        let mut n = self.0;
        for i in 0.. {
            if i == 9 {
                end -= 1;
                buf[end] = b'.';
            }
            end -= 1;
            buf[end] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 && i >= 9 {
                break;
            }
        }
        // Only ASCII digits and '.' were written.
        std::str::from_utf8(&buf[end..]).unwrap_or("0.000000000")
    }
}

impl fmt::Display for NanoUsd {
    /// USD with exactly nine decimals (see `usd_text`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.usd_text(&mut [0; 32]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_are_parsed_exactly() {
        assert_eq!(
            Rate::from_usd_per_million("0.15"),
            Ok(Rate(150_000_000_000_000))
        );
        assert_eq!(
            Rate::from_f64_usd_per_million(0.075),
            Ok(Rate(75_000_000_000_000))
        );
        assert_eq!(
            Rate::from_f64_usd_per_token(1.5e-7),
            Ok(Rate(150_000_000_000_000))
        );
        assert_eq!(
            Rate::from_f64_usd_per_token(5e-9),
            Ok(Rate(5_000_000_000_000))
        );
        assert!(Rate::from_usd_per_million("abc").is_err());
        assert!(Rate::from_usd_per_million("-1").is_err());
        assert_eq!(Rate(75_000_000_000_000).usd_per_million_string(), "0.075");
        assert_eq!(Rate(2_500_000_000_000_000).usd_per_million_string(), "2.5");
    }

    #[test]
    fn cost_is_rounded_once_half_up() {
        // 1 token at $0.0005/M = 0.5 nano-USD -> rounds up to 1.
        let mut c = CostAccumulator::default();
        c.add(1, Rate::from_usd_per_million("0.0005").unwrap_or_default());
        assert_eq!(c.nano_usd(), NanoUsd(1));
        // Two such tokens on separate lines are summed before rounding: 1, not 2.
        let mut c = CostAccumulator::default();
        let r = Rate::from_usd_per_million("0.0005").unwrap_or_default();
        c.add(1, r);
        c.add(1, Rate::default());
        assert_eq!(c.nano_usd(), NanoUsd(1));
        // 0.4 nano rounds down.
        let mut c = CostAccumulator::default();
        c.add(1, Rate::from_usd_per_million("0.0004").unwrap_or_default());
        assert_eq!(c.nano_usd(), NanoUsd(0));
    }

    #[test]
    fn usd_display_has_nine_decimals() {
        assert_eq!(NanoUsd(1_500).to_string(), "0.000001500");
        assert_eq!(NanoUsd(12_000_000_001).to_string(), "12.000000001");
        assert_eq!(NanoUsd(0).to_string(), "0.000000000");
        assert_eq!(NanoUsd(1_000_000_000).to_string(), "1.000000000");
        assert_eq!(NanoUsd(999_999_999).to_string(), "0.999999999");
        assert_eq!(NanoUsd(u64::MAX).to_string(), "18446744073.709551615");
        for n in [7, 10, 123_456_789_012, 5_000_000_000_000] {
            let expected = format!("{}.{:09}", n / 1_000_000_000, n % 1_000_000_000);
            assert_eq!(NanoUsd(n).to_string(), expected);
        }
    }

    #[test]
    fn multiple_in_ppm_is_exact() {
        let base = Rate::from_usd_per_million("0.15").unwrap_or_default();
        assert_eq!(
            base.times_ppm(6_000_000),
            Rate::from_usd_per_million("0.9").unwrap_or_default()
        );
    }
}
