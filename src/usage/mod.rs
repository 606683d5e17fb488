//! Token usage: read from the upstream's JSON or SSE, or estimated with
//! tiktoken when the upstream gives none.
//!
//! Never blocks the async runtime: estimates over large inputs run on the
//! blocking pool (see `proxy`), and the SSE meter works on bounded buffers.

pub mod estimate;
pub mod frames;
pub mod meter;
pub mod read;
pub mod sse;

/// Longest model id accepted or stored. Ids become usage rows, metric
/// labels and log fields; real ones (`ft:gpt-4o-mini-2024-07-18:org:suffix:id`)
/// are < 100 bytes. A served model longer than this is cut to it.
pub const MAX_MODEL_BYTES: usize = 256;

/// `model` cut to at most `MAX_MODEL_BYTES`, at a character boundary.
pub fn bounded_model(model: &str) -> &str {
    let mut end = model.len().min(MAX_MODEL_BYTES);
    while !model.is_char_boundary(end) {
        end -= 1;
    }
    &model[..end]
}

/// Which endpoint a request went to; decides how its usage is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Models,
    Other,
    /// Anthropic's Messages API (`/v1/messages`).
    Messages,
    /// Gemini's `generateContent` and `streamGenerateContent`.
    GenerateContent,
    /// Bedrock's Converse and ConverseStream.
    Converse,
    /// `/v1/images/generations`, `/edits` and `/variations`.
    Images,
    /// `/v1/audio/transcriptions`.
    AudioTranscriptions,
    /// `/v1/audio/translations`.
    AudioTranslations,
    /// `/v1/audio/speech`.
    AudioSpeech,
    /// A result line of a batch (OpenAI's Batch API, Anthropic's Message
    /// Batches), billed when the batch's results are read.
    Batch,
    /// One response of a Realtime WebSocket session (`/v1/realtime`).
    Realtime,
}

impl Endpoint {
    /// How many endpoints there are (`endpoint as usize` is below this).
    pub const COUNT: usize = 15;

    /// From a client path, OpenAI style (`/v1/chat/completions`) or Azure
    /// style (`/openai/deployments/{d}/chat/completions`).
    pub fn from_path(path: &str) -> Endpoint {
        let operation = match path.strip_prefix(crate::provider::AZURE_DEPLOYMENTS) {
            Some(rest) => rest.find('/').map_or("", |i| &rest[i..]),
            None => path.strip_prefix("/v1").unwrap_or(""),
        };
        match operation.trim_end_matches('/') {
            "/chat/completions" => Endpoint::ChatCompletions,
            "/completions" => Endpoint::Completions,
            "/embeddings" => Endpoint::Embeddings,
            "/responses" => Endpoint::Responses,
            "/messages" => Endpoint::Messages,
            "/images/generations" | "/images/edits" | "/images/variations" => Endpoint::Images,
            "/audio/transcriptions" => Endpoint::AudioTranscriptions,
            "/audio/translations" => Endpoint::AudioTranslations,
            "/audio/speech" => Endpoint::AudioSpeech,
            "/models" if !path.starts_with(crate::provider::AZURE_DEPLOYMENTS) => Endpoint::Models,
            _ => Endpoint::Other,
        }
    }

    /// From its label (`chat.completions`), as stored.
    pub fn from_label(label: &str) -> Option<Endpoint> {
        [
            Endpoint::ChatCompletions,
            Endpoint::Completions,
            Endpoint::Embeddings,
            Endpoint::Responses,
            Endpoint::Models,
            Endpoint::Other,
            Endpoint::Messages,
            Endpoint::GenerateContent,
            Endpoint::Converse,
            Endpoint::Images,
            Endpoint::AudioTranscriptions,
            Endpoint::AudioTranslations,
            Endpoint::AudioSpeech,
            Endpoint::Batch,
            Endpoint::Realtime,
        ]
        .into_iter()
        .find(|e| e.label() == label)
    }

    /// The `endpoint` column and metric label.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat.completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Models => "models",
            Endpoint::Other => "other",
            Endpoint::Messages => "messages",
            Endpoint::GenerateContent => "generate_content",
            Endpoint::Converse => "converse",
            Endpoint::Images => "images",
            Endpoint::AudioTranscriptions => "audio.transcriptions",
            Endpoint::AudioTranslations => "audio.translations",
            Endpoint::AudioSpeech => "audio.speech",
            Endpoint::Batch => "batch",
            Endpoint::Realtime => "realtime",
        }
    }

    /// Endpoints whose request body is JSON with a `model` and whose
    /// response carries token usage.
    pub fn is_metered(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions
                | Endpoint::Completions
                | Endpoint::Embeddings
                | Endpoint::Responses
                | Endpoint::Messages
                | Endpoint::GenerateContent
                | Endpoint::Converse
                | Endpoint::Images
                | Endpoint::AudioTranscriptions
                | Endpoint::AudioTranslations
                | Endpoint::AudioSpeech
        )
    }

    /// Endpoints whose request body may be `multipart/form-data` (a file
    /// upload) rather than JSON.
    pub fn takes_uploads(self) -> bool {
        matches!(
            self,
            Endpoint::Images | Endpoint::AudioTranscriptions | Endpoint::AudioTranslations
        )
    }

    /// Endpoints that accept `stream_options.include_usage`.
    pub fn accepts_stream_options(self) -> bool {
        matches!(self, Endpoint::ChatCompletions | Endpoint::Completions)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Upstream,
    Estimated,
}

impl TokenSource {
    pub fn label(self) -> &'static str {
        match self {
            TokenSource::Upstream => "upstream",
            TokenSource::Estimated => "estimated",
        }
    }
}

/// What a request consumed, as the provider reports it (SPEC 9): a count
/// per meter (`meter::Meter`), where a part the provider did not report is
/// `None`, not 0. Totals keep their old meaning: `prompt_tokens` is the
/// whole prompt (cached, cache-written, audio and image tokens included)
/// and `completion_tokens` the whole completion (reasoning and audio
/// included); the parts say which share of a total was which kind, and
/// what no part claims is plain text (`Meter::Input`, `Meter::Output`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens read from the provider's prompt cache.
    pub cached_tokens: Option<u64>,
    /// Prompt tokens written to the cache (Anthropic: 5-minute lifetime).
    pub cache_write_tokens: Option<u64>,
    /// Prompt tokens written to the cache for an hour (Anthropic).
    pub cache_write_1h_tokens: Option<u64>,
    pub audio_prompt_tokens: Option<u64>,
    pub image_prompt_tokens: Option<u64>,
    pub video_prompt_tokens: Option<u64>,
    /// Prompt audio tokens read from the cache (not in `cached_tokens` nor
    /// `audio_prompt_tokens`: meters never overlap).
    pub audio_cached_tokens: Option<u64>,
    /// Completion tokens spent reasoning (billed as output).
    pub reasoning_tokens: Option<u64>,
    pub audio_completion_tokens: Option<u64>,
    pub image_completion_tokens: Option<u64>,
    /// Built-in tool calls the provider bills per call.
    pub tool_calls: ToolCalls,
    /// Images generated (`Meter::Images`), and the size and quality they
    /// were made at.
    pub images: Option<u64>,
    pub image_spec: Option<ImageSpec>,
    /// Seconds of audio billed (`Meter::AudioSeconds`).
    pub audio_seconds: Option<u64>,
    /// Characters of text billed (`Meter::Characters`).
    pub characters: Option<u64>,
    pub source: TokenSource,
}

impl Usage {
    pub const NONE: Usage = Usage {
        prompt_tokens: 0,
        completion_tokens: 0,
        cached_tokens: None,
        cache_write_tokens: None,
        cache_write_1h_tokens: None,
        audio_prompt_tokens: None,
        image_prompt_tokens: None,
        video_prompt_tokens: None,
        audio_cached_tokens: None,
        reasoning_tokens: None,
        audio_completion_tokens: None,
        image_completion_tokens: None,
        tool_calls: ToolCalls::NONE,
        images: None,
        image_spec: None,
        audio_seconds: None,
        characters: None,
        source: TokenSource::Upstream,
    };

    /// Plain prompt and completion tokens, nothing else.
    pub fn tokens(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            ..Usage::NONE
        }
    }

    /// Cached prompt tokens, 0 when not reported.
    pub fn cached(&self) -> u64 {
        self.cached_tokens.unwrap_or(0)
    }

    /// Reasoning tokens, 0 when not reported.
    pub fn reasoning(&self) -> u64 {
        self.reasoning_tokens.unwrap_or(0)
    }

    /// Both cache writes (the `cache_write_tokens` column), 0 when not reported.
    pub fn cache_writes(&self) -> u64 {
        let n = |p: Option<u64>| p.unwrap_or(0);
        n(self.cache_write_tokens).saturating_add(n(self.cache_write_1h_tokens))
    }

    /// Image tokens in and out (the `image_tokens` column), 0 when not reported.
    pub fn images(&self) -> u64 {
        let n = |p: Option<u64>| p.unwrap_or(0);
        n(self.image_prompt_tokens).saturating_add(n(self.image_completion_tokens))
    }

    /// Details that cannot exceed their totals, as a provider might claim.
    /// A part not reported stays not reported.
    pub fn clamped(mut self) -> Usage {
        let mut left = self.prompt_tokens;
        for n in [
            &mut self.cached_tokens,
            &mut self.cache_write_tokens,
            &mut self.cache_write_1h_tokens,
            &mut self.audio_prompt_tokens,
            &mut self.image_prompt_tokens,
            &mut self.video_prompt_tokens,
            &mut self.audio_cached_tokens,
        ]
        .into_iter()
        .flatten()
        {
            *n = (*n).min(left);
            left -= *n;
        }
        let mut left = self.completion_tokens;
        for n in [
            &mut self.audio_completion_tokens,
            &mut self.image_completion_tokens,
        ]
        .into_iter()
        .flatten()
        {
            *n = (*n).min(left);
            left -= *n;
        }
        if let Some(n) = &mut self.reasoning_tokens {
            *n = (*n).min(left);
        }
        self
    }
}

/// The size and quality of generated images, which set their price per
/// image (`per_image` keys: `"1024x1024/hd"`). A size of 0x0 is `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageSpec {
    pub width: u16,
    pub height: u16,
    pub quality: ImageQuality,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageQuality {
    Standard,
    Hd,
    Low,
    Medium,
    High,
    /// `auto`, or a quality tollgate does not know: the dearest its row has.
    Auto,
}

impl ImageQuality {
    pub fn parse(s: &str) -> ImageQuality {
        match s {
            "standard" => ImageQuality::Standard,
            "hd" => ImageQuality::Hd,
            "low" => ImageQuality::Low,
            "medium" => ImageQuality::Medium,
            "high" => ImageQuality::High,
            _ => ImageQuality::Auto,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ImageQuality::Standard => "standard",
            ImageQuality::Hd => "hd",
            ImageQuality::Low => "low",
            ImageQuality::Medium => "medium",
            ImageQuality::High => "high",
            ImageQuality::Auto => "auto",
        }
    }
}

impl ImageSpec {
    /// From a request's or response's `size` ("1024x1792", "auto") and
    /// `quality`; `None` for a size that is neither.
    pub fn parse(size: &str, quality: &str) -> Option<ImageSpec> {
        let (width, height) = match size {
            "auto" | "" => (0, 0),
            s => {
                let (w, h) = s.split_once('x')?;
                (w.parse().ok()?, h.parse().ok()?)
            }
        };
        Some(ImageSpec {
            width,
            height,
            quality: ImageQuality::parse(quality),
        })
    }

    /// From a `per_image` key (`"1024x1024/hd"`).
    pub fn parse_key(key: &str) -> Option<ImageSpec> {
        let (size, quality) = key.split_once('/')?;
        ImageSpec::parse(size, quality)
    }

    pub fn is_auto(self) -> bool {
        self.width == 0 || self.quality == ImageQuality::Auto
    }

    /// Whether a priced key stands for this spec: equal, or any value where
    /// this one is `auto`.
    pub fn covers(self, key: ImageSpec) -> bool {
        let size = self.width == 0 || (self.width, self.height) == (key.width, key.height);
        let quality = self.quality == ImageQuality::Auto || self.quality == key.quality;
        size && quality
    }
}

impl std::fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.width {
            0 => write!(f, "auto/{}", self.quality.name()),
            w => write!(f, "{w}x{}/{}", self.height, self.quality.name()),
        }
    }
}

/// Built-in tool calls billed per call (SPEC 9 `[tool_calls]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ToolCalls {
    pub web_search: u32,
    pub file_search: u32,
}

impl ToolCalls {
    pub const NONE: ToolCalls = ToolCalls {
        web_search: 0,
        file_search: 0,
    };
    /// The call types, as `[tool_calls]` keys name them.
    pub const KINDS: [&'static str; 2] = ["web_search", "file_search"];

    pub fn count(&self, kind: &str) -> u32 {
        match kind {
            "web_search" => self.web_search,
            "file_search" => self.file_search,
            _ => 0,
        }
    }

    pub fn total(&self) -> u64 {
        u64::from(self.web_search) + u64::from(self.file_search)
    }

    /// Counts one item of a Responses API `output` by its `type`.
    pub fn count_item(&mut self, item_type: &str) {
        match item_type {
            "web_search_call" => self.web_search = self.web_search.saturating_add(1),
            "file_search_call" => self.file_search = self.file_search.saturating_add(1),
            _ => {}
        }
    }
}

/// The service tier a response says it was served at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceTier {
    /// `default`, `auto` or absent: standard prices.
    Standard,
    Flex,
    Priority,
    Batch,
    Scale,
    /// A tier tollgate has no prices for (priced as standard, counted).
    Other,
}

impl ServiceTier {
    pub fn parse(s: &str) -> ServiceTier {
        match s {
            "default" | "auto" | "standard" | "" => ServiceTier::Standard,
            "flex" => ServiceTier::Flex,
            "priority" => ServiceTier::Priority,
            "batch" => ServiceTier::Batch,
            "scale" => ServiceTier::Scale,
            _ => ServiceTier::Other,
        }
    }

    /// The `service_tier` column (NULL for standard).
    pub fn label(self) -> Option<&'static str> {
        match self {
            ServiceTier::Standard => None,
            ServiceTier::Flex => Some("flex"),
            ServiceTier::Priority => Some("priority"),
            ServiceTier::Batch => Some("batch"),
            ServiceTier::Scale => Some("scale"),
            ServiceTier::Other => Some("other"),
        }
    }
}

/// The tiktoken encodings OpenAI's current models use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    O200kBase,
    Cl100kBase,
}

impl Encoding {
    pub fn from_name(name: &str) -> Option<Encoding> {
        match name {
            "o200k_base" => Some(Encoding::O200kBase),
            "cl100k_base" => Some(Encoding::Cl100kBase),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Encoding::O200kBase => "o200k_base",
            Encoding::Cl100kBase => "cl100k_base",
        }
    }

    /// The encoding for a model the catalog does not name one for.
    pub fn for_model(model: &str) -> Encoding {
        let cl100k = ["gpt-4-", "gpt-3.5", "text-embedding", "gpt-35"];
        if model == "gpt-4" || cl100k.iter().any(|p| model.starts_with(p)) {
            Encoding::Cl100kBase
        } else {
            Encoding::O200kBase
        }
    }

    /// Loading an encoding takes ~100 ms and tens of MB the first time, so it
    /// happens lazily, on the blocking pool, only when a request needs an estimate.
    pub fn bpe(self) -> &'static tiktoken_rs::CoreBPE {
        match self {
            Encoding::O200kBase => tiktoken_rs::o200k_base_singleton(),
            Encoding::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
        }
    }

    /// Tokens in `text`. A run of more than `MAX_RUN` bytes without
    /// whitespace (base64, a model repeating one character) is counted in
    /// `MAX_RUN` pieces: byte-pair merging is quadratic in a piece's length,
    /// and one 64 KiB run took tens of seconds. Ordinary text is unaffected.
    pub fn count(self, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        let bpe = self.bpe();
        bounded_runs(text, MAX_RUN)
            .map(|part| bpe.encode_ordinary(part).len() as u64)
            .sum()
    }
}

/// Longest run of non-whitespace bytes tokenized as one piece.
const MAX_RUN: usize = 1024;

/// `text` cut into consecutive parts so that no part holds a run of more
/// than `max_run` non-whitespace bytes (cut at character boundaries).
fn bounded_runs(text: &str, max_run: usize) -> impl Iterator<Item = &str> {
    let mut start = 0;
    let mut run = 0;
    let mut cuts = Vec::new();
    if text.len() > max_run {
        for (i, c) in text.char_indices() {
            if c.is_whitespace() {
                run = 0;
                continue;
            }
            if run + c.len_utf8() > max_run {
                cuts.push(i);
                run = 0;
            }
            run += c.len_utf8();
        }
    }
    cuts.push(text.len());
    cuts.into_iter().map(move |end| {
        let part = &text[start..end];
        start = end;
        part
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_runs_are_counted_in_pieces_and_ordinary_text_is_not_cut() {
        let ordinary = "The quick brown fox jumps over the lazy dog. ".repeat(100);
        assert_eq!(bounded_runs(&ordinary, MAX_RUN).count(), 1);
        let run = "é".repeat(1500); // 3000 bytes, no whitespace
        let parts: Vec<&str> = bounded_runs(&run, MAX_RUN).collect();
        assert_eq!(parts.concat(), run);
        assert!(parts.iter().all(|p| p.len() <= MAX_RUN));
        // 64 KiB of one character: counted quickly, to roughly its size.
        let t = std::time::Instant::now();
        let n = Encoding::O200kBase.count(&"x".repeat(64 * 1024));
        assert!(n > 4_000 && n < 66_000, "{n}");
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn encodings_follow_model_families() {
        assert_eq!(Encoding::for_model("gpt-4o"), Encoding::O200kBase);
        assert_eq!(Encoding::for_model("o3-mini"), Encoding::O200kBase);
        assert_eq!(Encoding::for_model("gpt-4"), Encoding::Cl100kBase);
        assert_eq!(Encoding::for_model("gpt-4-turbo"), Encoding::Cl100kBase);
        assert_eq!(Encoding::for_model("gpt-4.1"), Encoding::O200kBase);
        assert_eq!(
            Encoding::for_model("text-embedding-3-small"),
            Encoding::Cl100kBase
        );
    }

    #[test]
    fn endpoints_from_paths() {
        assert_eq!(
            Endpoint::from_path("/v1/chat/completions"),
            Endpoint::ChatCompletions
        );
        assert_eq!(Endpoint::from_path("/v1/embeddings/"), Endpoint::Embeddings);
        assert_eq!(Endpoint::from_path("/v1/files"), Endpoint::Other);
    }
}
