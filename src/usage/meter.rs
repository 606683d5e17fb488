//! Meters: the quantities a provider bills (SPEC 11). One `Meter` is one
//! catalog component (its price key), one line of the cost breakdown, and
//! one key of a usage row's `meters` column; pricing, the breakdown, the
//! row and `report --shadow` loop over `Meter::ALL`, so a new billed
//! quantity is one variant here, its catalog key, and the format readers
//! that spell it.
//!
//! Meters never overlap: every token of a request is counted by exactly
//! one meter (the prompt's plain text is what its cached, cache-written,
//! audio and image parts leave), so a row's meters price it again exactly.
//!
//! Most meters count tokens; the others count what SPEC 12 bills by the
//! unit (`Unit`): images generated, seconds of audio, characters of text.
//! They are never part of a token total.

use super::{ImageSpec, ToolCalls, Usage};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Meter {
    /// Prompt tokens of plain text (the rest of the prompt).
    Input,
    /// Prompt tokens read from the provider's cache.
    CachedInput,
    /// Prompt tokens written to the cache for 5 minutes (Anthropic's default).
    CacheWrite,
    /// Prompt tokens written to the cache for an hour.
    CacheWrite1h,
    /// Completion tokens of text (reasoning included).
    Output,
    AudioInput,
    AudioOutput,
    ImageInput,
    ImageOutput,
    /// Prompt tokens of video (Gemini's `VIDEO` modality).
    VideoInput,
    /// Prompt tokens of audio read from the cache (Realtime's
    /// `cached_tokens_details.audio_tokens`).
    AudioCachedInput,
    /// Images generated, priced per image by size and quality (`per_image`).
    Images,
    /// Seconds of audio transcribed or translated (`per_minute`, billed
    /// per second).
    AudioSeconds,
    /// Characters of text spoken (`per_1k_chars`).
    Characters,
}

/// What a meter counts, and so how its catalog price is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Priced in USD per million tokens.
    Token,
    /// USD per image.
    Image,
    /// USD per minute, billed per second.
    Second,
    /// USD per 1,000 characters.
    Character,
}

impl Unit {
    /// zepto-USD per unit in one USD per the catalog's quantity (a million
    /// tokens, an image, a minute, 1,000 characters), as a ratio
    /// (numerator, denominator) of powers of ten and 60.
    pub const fn zepto_per_usd(self) -> (u128, u128) {
        const ZEPTO: u128 = 1_000_000_000_000_000_000_000;
        match self {
            Unit::Token => (ZEPTO, 1_000_000),
            Unit::Image => (ZEPTO, 1),
            Unit::Second => (ZEPTO, 60),
            Unit::Character => (ZEPTO, 1_000),
        }
    }
}

impl Meter {
    pub const COUNT: usize = 14;
    /// The token meters: the first `TOKEN_COUNT` of `ALL`.
    pub const TOKEN_COUNT: usize = 11;
    /// In the order of the cost breakdown; the token meters first.
    pub const ALL: [Meter; Meter::COUNT] = [
        Meter::Input,
        Meter::CachedInput,
        Meter::CacheWrite,
        Meter::CacheWrite1h,
        Meter::Output,
        Meter::AudioInput,
        Meter::AudioOutput,
        Meter::ImageInput,
        Meter::ImageOutput,
        Meter::VideoInput,
        Meter::AudioCachedInput,
        Meter::Images,
        Meter::AudioSeconds,
        Meter::Characters,
    ];

    /// The catalog key, the breakdown line and the `meters` key.
    pub const fn name(self) -> &'static str {
        match self {
            Meter::Input => "input",
            Meter::CachedInput => "cached_input",
            Meter::CacheWrite => "cache_write",
            Meter::CacheWrite1h => "cache_write_1h",
            Meter::Output => "output",
            Meter::AudioInput => "audio_input",
            Meter::AudioOutput => "audio_output",
            Meter::ImageInput => "image_input",
            Meter::ImageOutput => "image_output",
            Meter::VideoInput => "video_input",
            Meter::AudioCachedInput => "audio_cached_input",
            Meter::Images => "images",
            Meter::AudioSeconds => "audio_seconds",
            Meter::Characters => "characters",
        }
    }

    pub const fn unit(self) -> Unit {
        match self {
            Meter::Images => Unit::Image,
            Meter::AudioSeconds => Unit::Second,
            Meter::Characters => Unit::Character,
            _ => Unit::Token,
        }
    }

    pub const fn is_token(self) -> bool {
        matches!(self.unit(), Unit::Token)
    }

    /// The catalog key of its price: the name, for a token meter; the
    /// unit's price for the others (`per_image`, `per_minute`, `per_1k_chars`).
    pub const fn catalog_key(self) -> &'static str {
        match self {
            Meter::Images => "per_image",
            Meter::AudioSeconds => "per_minute",
            Meter::Characters => "per_1k_chars",
            _ => self.name(),
        }
    }

    pub fn from_catalog_key(key: &str) -> Option<Meter> {
        Meter::ALL.into_iter().find(|m| m.catalog_key() == key)
    }

    pub fn from_name(name: &str) -> Option<Meter> {
        Meter::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The meter whose price applies when a catalog row does not set this
    /// one's: the nearest text rate (SPEC 9).
    pub fn fallback(self) -> Option<Meter> {
        match self {
            Meter::Input | Meter::Output => None,
            Meter::Images | Meter::AudioSeconds | Meter::Characters => None,
            Meter::CachedInput
            | Meter::CacheWrite
            | Meter::AudioInput
            | Meter::ImageInput
            | Meter::VideoInput => Some(Meter::Input),
            Meter::CacheWrite1h => Some(Meter::CacheWrite),
            // Cached audio at the cached rate where the row has no own one.
            Meter::AudioCachedInput => Some(Meter::CachedInput),
            Meter::AudioOutput | Meter::ImageOutput => Some(Meter::Output),
        }
    }

    /// A token meter's side: prompt (true) or completion. The unit
    /// meters are on neither (false, and never in a token total).
    pub fn is_prompt(self) -> bool {
        self.is_token()
            && !matches!(
                self,
                Meter::Output | Meter::AudioOutput | Meter::ImageOutput
            )
    }

    /// A token meter of the completion side.
    pub fn is_completion(self) -> bool {
        self.is_token() && !self.is_prompt()
    }

    /// The part of a usage this meter counts, for a part-meter; `None`
    /// for the plain text ones (what the parts leave of a total).
    fn part(self, u: &Usage) -> Option<Option<u64>> {
        match self {
            Meter::Input | Meter::Output => None,
            Meter::CachedInput => Some(u.cached_tokens),
            Meter::CacheWrite => Some(u.cache_write_tokens),
            Meter::CacheWrite1h => Some(u.cache_write_1h_tokens),
            Meter::AudioInput => Some(u.audio_prompt_tokens),
            Meter::ImageInput => Some(u.image_prompt_tokens),
            Meter::AudioOutput => Some(u.audio_completion_tokens),
            Meter::ImageOutput => Some(u.image_completion_tokens),
            Meter::VideoInput => Some(u.video_prompt_tokens),
            Meter::AudioCachedInput => Some(u.audio_cached_tokens),
            Meter::Images => Some(u.images),
            Meter::AudioSeconds => Some(u.audio_seconds),
            Meter::Characters => Some(u.characters),
        }
    }

    /// This meter's count as reported in a usage already `clamped` (its
    /// parts within their totals): `None` when the provider did not report
    /// the part. The plain text meters are always known: what the parts
    /// reported leave of their total.
    pub fn reported(self, u: &Usage) -> Option<u64> {
        if let Some(part) = self.part(u) {
            return part;
        }
        let parts = Meter::ALL
            .into_iter()
            .filter(|m| m.is_token() && m.is_prompt() == self.is_prompt())
            .filter_map(|m| m.part(u).flatten())
            .fold(0u64, u64::saturating_add);
        let total = if self.is_prompt() {
            u.prompt_tokens
        } else {
            u.completion_tokens
        };
        Some(total.saturating_sub(parts))
    }

    /// This meter's count in a usage already `clamped`, 0 when not reported.
    pub fn count(self, u: &Usage) -> u64 {
        self.reported(u).unwrap_or(0)
    }

    /// Adds `n` of this meter to a usage (the inverse of `count`).
    fn add_to(self, u: &mut Usage, n: u64) {
        let part = match self {
            Meter::Input | Meter::Output => None,
            Meter::CachedInput => Some(&mut u.cached_tokens),
            Meter::CacheWrite => Some(&mut u.cache_write_tokens),
            Meter::CacheWrite1h => Some(&mut u.cache_write_1h_tokens),
            Meter::AudioInput => Some(&mut u.audio_prompt_tokens),
            Meter::ImageInput => Some(&mut u.image_prompt_tokens),
            Meter::AudioOutput => Some(&mut u.audio_completion_tokens),
            Meter::ImageOutput => Some(&mut u.image_completion_tokens),
            Meter::VideoInput => Some(&mut u.video_prompt_tokens),
            Meter::AudioCachedInput => Some(&mut u.audio_cached_tokens),
            Meter::Images => Some(&mut u.images),
            Meter::AudioSeconds => Some(&mut u.audio_seconds),
            Meter::Characters => Some(&mut u.characters),
        };
        if let Some(part) = part {
            *part = Some(part.unwrap_or(0).saturating_add(n));
        }
        if !self.is_token() {
            return;
        }
        let total = if self.is_prompt() {
            &mut u.prompt_tokens
        } else {
            &mut u.completion_tokens
        };
        *total = total.saturating_add(n);
    }
}

/// A request's count per meter and its billed tool calls: what a usage row
/// keeps in `meters` to be priced again exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meters {
    /// The count per meter, in `Meter::ALL` order.
    pub tokens: [u64; Meter::COUNT],
    pub calls: ToolCalls,
    /// The size and quality the images were made at (`per_image` prices).
    pub image_spec: Option<ImageSpec>,
}

impl Meters {
    pub fn of(usage: &Usage) -> Meters {
        let clamped = usage.clamped();
        Meters {
            tokens: Meter::ALL.map(|m| m.count(&clamped)),
            calls: usage.tool_calls,
            image_spec: usage.image_spec,
        }
    }

    pub fn get(&self, m: Meter) -> u64 {
        self.tokens[m as usize]
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.iter().all(|n| *n == 0) && self.calls.total() == 0
    }

    /// `{"input":12,"output":3,"web_search":1}`: the non-zero meters, then
    /// the tool calls by kind, then the images' `image_spec` (the `meters`
    /// column).
    pub fn to_json(&self) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(48);
        out.push('{');
        let calls = ToolCalls::KINDS.map(|k| (k, u64::from(self.calls.count(k))));
        let named = Meter::ALL
            .into_iter()
            .map(|m| (m.name(), self.get(m)))
            .chain(calls)
            .filter(|(_, n)| *n > 0);
        for (i, (name, n)) in named.enumerate() {
            let comma = if i > 0 { "," } else { "" };
            let _ = write!(out, "{comma}\"{name}\":{n}");
        }
        if let Some(spec) = self.image_spec {
            let comma = if out.len() > 1 { "," } else { "" };
            let _ = write!(out, "{comma}\"image_spec\":\"{spec}\"");
        }
        out.push('}');
        out
    }

    /// Reads a `meters` column; keys it does not know are skipped, and text
    /// that is not such an object is `None`.
    pub fn parse(text: &str) -> Option<Meters> {
        let map: std::collections::HashMap<String, serde_json::Value> =
            serde_json::from_str(text).ok()?;
        let mut out = Meters::default();
        for (name, value) in map {
            if name == "image_spec" {
                out.image_spec = value.as_str().and_then(ImageSpec::parse_key);
                continue;
            }
            let Some(n) = value.as_u64() else { continue };
            if let Some(m) = Meter::from_name(&name) {
                out.tokens[m as usize] = n;
            } else {
                let n = u32::try_from(n).unwrap_or(u32::MAX);
                match name.as_str() {
                    "web_search" => out.calls.web_search = n,
                    "file_search" => out.calls.file_search = n,
                    _ => {}
                }
            }
        }
        Some(out)
    }

    /// The usage these meters add up to (totals and parts), for pricing a
    /// stored row again.
    pub fn to_usage(&self) -> Usage {
        let mut u = Usage::NONE;
        for m in Meter::ALL.into_iter().filter(|m| self.get(*m) > 0) {
            m.add_to(&mut u, self.get(m));
        }
        u.tool_calls = self.calls;
        u.image_spec = self.image_spec;
        u
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meters_cover_every_token_once_and_round_trip() {
        let u = Usage {
            prompt_tokens: 1_000,
            completion_tokens: 300,
            cached_tokens: Some(200),
            cache_write_tokens: Some(100),
            cache_write_1h_tokens: Some(50),
            audio_prompt_tokens: Some(40),
            image_prompt_tokens: Some(30),
            audio_completion_tokens: Some(20),
            image_completion_tokens: Some(10),
            tool_calls: ToolCalls {
                web_search: 2,
                file_search: 1,
            },
            ..Usage::NONE
        };
        let m = Meters::of(&u);
        assert_eq!(m.get(Meter::Input), 580);
        assert_eq!(m.get(Meter::Output), 270);
        assert_eq!(m.tokens.iter().sum::<u64>(), 1_300);
        let json = m.to_json();
        assert_eq!(
            json,
            r#"{"input":580,"cached_input":200,"cache_write":100,"cache_write_1h":50,"output":270,"audio_input":40,"audio_output":20,"image_input":30,"image_output":10,"web_search":2,"file_search":1}"#
        );
        let back = Meters::parse(&json).unwrap_or_default();
        assert_eq!(back, m);
        assert_eq!(Meters::of(&back.to_usage()), m);
        assert_eq!(Meters::parse("not json"), None);
        assert_eq!(Meters::default().to_json(), "{}");
    }
}
