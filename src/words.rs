//! Tokens per word, measured (SPEC 1: "~1.3 tokens per English word, more
//! for other languages"): a sample of requests has its prompt and answer
//! texts counted in words and characters, per model family and writing
//! system, next to the tokens the provider reported for them.
//!
//! Off the request path: a sampled request hands its bodies (reference
//! counted, not copied) to one counting thread and goes on; the thread
//! sums counts in memory and writes them to `word_counts` every few
//! seconds and at shutdown. Counts only: the text is never stored.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;

use crate::metrics::Metrics;
use crate::store::{Store, WordCount};
use crate::usage::{Encoding, Endpoint, Usage};

/// Samples waiting to be counted; past this, samples are dropped (they
/// are samples).
const QUEUE: usize = 256;

/// A writing system, by the letters a text is mostly written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Script {
    Latin,
    Cyrillic,
    Greek,
    Arabic,
    Hebrew,
    Devanagari,
    Thai,
    Hangul,
    /// Chinese and Japanese (Han, kana): no spaces between words.
    Cjk,
    Other,
}

impl Script {
    pub const COUNT: usize = 10;
    pub const ALL: [Script; Script::COUNT] = [
        Script::Latin,
        Script::Cyrillic,
        Script::Greek,
        Script::Arabic,
        Script::Hebrew,
        Script::Devanagari,
        Script::Thai,
        Script::Hangul,
        Script::Cjk,
        Script::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Script::Latin => "latin",
            Script::Cyrillic => "cyrillic",
            Script::Greek => "greek",
            Script::Arabic => "arabic",
            Script::Hebrew => "hebrew",
            Script::Devanagari => "devanagari",
            Script::Thai => "thai",
            Script::Hangul => "hangul",
            Script::Cjk => "cjk",
            Script::Other => "other",
        }
    }

    /// Whether its words are separated by spaces; if not, tokens are
    /// counted per character.
    pub fn spaced(self) -> bool {
        !matches!(self, Script::Cjk | Script::Thai)
    }

    /// The script of a letter; `None` for digits, punctuation, symbols.
    fn of(c: char) -> Option<Script> {
        if c.is_ascii() {
            return c.is_ascii_alphabetic().then_some(Script::Latin);
        }
        if !c.is_alphabetic() {
            return None;
        }
        Some(match u32::from(c) {
            0x00C0..=0x024F | 0x1E00..=0x1EFF => Script::Latin,
            0x0370..=0x03FF | 0x1F00..=0x1FFF => Script::Greek,
            0x0400..=0x052F => Script::Cyrillic,
            0x0590..=0x05FF => Script::Hebrew,
            0x0600..=0x06FF | 0x0750..=0x077F | 0xFB50..=0xFDFF | 0xFE70..=0xFEFF => Script::Arabic,
            0x0900..=0x097F => Script::Devanagari,
            0x0E00..=0x0E7F => Script::Thai,
            0x1100..=0x11FF | 0x3130..=0x318F | 0xAC00..=0xD7AF => Script::Hangul,
            0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF => Script::Cjk,
            0x20000..=0x2FFFF => Script::Cjk,
            _ => Script::Other,
        })
    }

    pub fn from_label(label: &str) -> Option<Script> {
        Script::ALL.into_iter().find(|s| s.label() == label)
    }
}

/// Words, characters and letters per script of some text.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TextCount {
    /// Whitespace-separated runs holding at least one letter or digit.
    pub words: u64,
    /// Characters other than whitespace.
    pub chars: u64,
    letters: [u64; Script::COUNT],
}

impl TextCount {
    pub fn add(&mut self, text: &str) {
        let mut in_word = false;
        let mut word_has_letter = false;
        for c in text.chars() {
            if c.is_whitespace() {
                if in_word && word_has_letter {
                    self.words += 1;
                }
                in_word = false;
                word_has_letter = false;
                continue;
            }
            in_word = true;
            self.chars += 1;
            if c.is_alphanumeric() {
                word_has_letter = true;
            }
            if let Some(s) = Script::of(c) {
                self.letters[s as usize] += 1;
            }
        }
        if in_word && word_has_letter {
            self.words += 1;
        }
    }

    /// The script most of its letters are in (ties: the first in
    /// `Script::ALL`); `None` without letters.
    pub fn script(&self) -> Option<Script> {
        let (i, n) = self
            .letters
            .iter()
            .enumerate()
            .max_by(|(i, a), (j, b)| a.cmp(b).then(j.cmp(i)))?;
        (*n > 0).then(|| Script::ALL[i])
    }
}

/// The tokenizer family of a model: what makes its tokens per word differ
/// from another's. OpenAI models by their tiktoken encoding.
pub fn family(model: &str) -> &'static str {
    let m = model.to_ascii_lowercase();
    let m = m.rsplit('/').next().unwrap_or(&m);
    let has = |parts: &[&str]| parts.iter().any(|p| m.contains(p));
    if has(&["claude"]) {
        "claude"
    } else if has(&["gemini", "gemma"]) {
        "gemini"
    } else if has(&["llama"]) {
        "llama"
    } else if has(&[
        "mistral",
        "mixtral",
        "codestral",
        "ministral",
        "magistral",
        "devstral",
        "pixtral",
    ]) {
        "mistral"
    } else if has(&["deepseek"]) {
        "deepseek"
    } else if has(&["qwen", "qwq"]) {
        "qwen"
    } else if has(&["grok"]) {
        "grok"
    } else if m.starts_with("gpt-")
        || m.starts_with("ft:gpt-")
        || m.starts_with("chatgpt")
        || m.starts_with("text-embedding")
        || m.starts_with("o1")
        || m.starts_with("o3")
        || m.starts_with("o4")
        || m.starts_with("codex")
    {
        match Encoding::for_model(m.trim_start_matches("ft:")) {
            Encoding::O200kBase => "openai-o200k",
            Encoding::Cl100kBase => "openai-cl100k",
        }
    } else {
        "other"
    }
}

/// The answer's text: a JSON body, or the texts a stream carried.
pub enum Answer {
    Body(Bytes),
    Texts(Vec<String>),
}

/// One sampled request, as handed to the counting thread.
pub struct Sample {
    pub team: String,
    /// The model that served it (its catalog row when priced).
    pub model: String,
    pub endpoint: Endpoint,
    pub format: crate::format::WireFormat,
    pub request: Bytes,
    pub answer: Answer,
    pub usage: Usage,
}

/// Decides which requests are sampled and hands them to the counting
/// thread.
pub struct WordSampler {
    /// The share sampled, in millionths.
    ppm: u64,
    seen: AtomicU64,
    tx: Option<mpsc::SyncSender<Sample>>,
}

impl WordSampler {
    pub fn disabled() -> WordSampler {
        WordSampler {
            ppm: 0,
            seen: AtomicU64::new(0),
            tx: None,
        }
    }

    /// Starts the counting thread for `rate` (0..=1, the share of requests
    /// counted). It writes to `store` every `flush` and when the sampler
    /// is dropped; join the handle to know the last counts are written.
    pub fn spawn(
        rate: f64,
        store: Store,
        metrics: Arc<Metrics>,
        flush: Duration,
    ) -> (WordSampler, Option<std::thread::JoinHandle<()>>) {
        let ppm = (rate.clamp(0.0, 1.0) * 1e6).round() as u64;
        if ppm == 0 {
            return (WordSampler::disabled(), None);
        }
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let handle = tokio::runtime::Handle::current();
        let thread = std::thread::Builder::new()
            .name("tollgate-words".into())
            .spawn(move || count_loop(rx, store, &metrics, handle, flush));
        match thread {
            Ok(thread) => (
                WordSampler {
                    ppm,
                    seen: AtomicU64::new(0),
                    tx: Some(tx),
                },
                Some(thread),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the word-counting thread: tokens per word are not measured");
                (WordSampler::disabled(), None)
            }
        }
    }

    /// Queues the sample `make` builds if this request is sampled (one
    /// atomic add when sampling is on); dropped when the thread is behind.
    pub fn offer(&self, make: impl FnOnce() -> Sample) {
        if let Some(tx) = &self.tx {
            if sampled(self.seen.fetch_add(1, Ordering::Relaxed), self.ppm) {
                let _ = tx.try_send(make());
            }
        }
    }
}

/// Whether the `n`-th request (from 0) is sampled at `ppm` millionths:
/// exactly `ppm` of every million, evenly spread.
fn sampled(n: u64, ppm: u64) -> bool {
    let (n, ppm) = (u128::from(n), u128::from(ppm));
    (n + 1) * ppm / 1_000_000 > n * ppm / 1_000_000
}

/// Key of the in-memory sums: team, family, script, side.
type Key = (String, &'static str, Script, Side);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Side {
    Prompt,
    Completion,
}

impl Side {
    pub fn label(self) -> &'static str {
        match self {
            Side::Prompt => "prompt",
            Side::Completion => "completion",
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    samples: u64,
    words: u64,
    chars: u64,
    tokens: u64,
}

fn count_loop(
    rx: mpsc::Receiver<Sample>,
    store: Store,
    metrics: &Metrics,
    runtime: tokio::runtime::Handle,
    flush: Duration,
) {
    let mut sums: BTreeMap<Key, Sums> = BTreeMap::new();
    let mut last = Instant::now();
    loop {
        let wait = flush.saturating_sub(last.elapsed());
        let open = match rx.recv_timeout(wait) {
            Ok(sample) => {
                for (key, s) in count(&sample) {
                    let labels = [key.1, key.2.label(), key.3.label()];
                    metrics.words.with_label_values(&labels).inc_by(s.words);
                    metrics
                        .word_chars
                        .with_label_values(&labels)
                        .inc_by(s.chars);
                    metrics
                        .word_tokens
                        .with_label_values(&labels)
                        .inc_by(s.tokens);
                    let e = sums.entry(key).or_default();
                    e.samples += 1;
                    e.words += s.words;
                    e.chars += s.chars;
                    e.tokens += s.tokens;
                }
                true
            }
            Err(mpsc::RecvTimeoutError::Timeout) => true,
            Err(mpsc::RecvTimeoutError::Disconnected) => false,
        };
        if !open || last.elapsed() >= flush {
            last = Instant::now();
            if !sums.is_empty() {
                let rows: Vec<WordCount> = std::mem::take(&mut sums)
                    .into_iter()
                    .map(|((team, family, script, side), s)| WordCount {
                        team,
                        family: family.to_string(),
                        script: script.label().to_string(),
                        side: side.label().to_string(),
                        samples: s.samples,
                        words: s.words,
                        chars: s.chars,
                        tokens: s.tokens,
                    })
                    .collect();
                if let Err(e) = runtime.block_on(store.insert_word_counts(&rows)) {
                    tracing::warn!(error = %e, rows = rows.len(), "word counts not written (samples lost)");
                }
            }
        }
        if !open {
            return;
        }
    }
}

/// A sample's prompt and answer, counted: each side whose tokens are all
/// text the sample shows. A prompt with tools, images, audio or files, an
/// answer with reasoning tokens or audio, and estimated usage are left out
/// (their tokens are not the text's).
fn count(sample: &Sample) -> Vec<(Key, Sums)> {
    let mut out = Vec::new();
    if sample.usage.source != crate::usage::TokenSource::Upstream {
        return out;
    }
    let family = family(&sample.model);
    let u = &sample.usage;
    let mut side = |side: Side, text: TextCount, tokens: u64| {
        if let (Some(script), true) = (text.script(), tokens > 0) {
            out.push((
                (sample.team.clone(), family, script, side),
                Sums {
                    samples: 1,
                    words: text.words,
                    chars: text.chars,
                    tokens,
                },
            ));
        }
    };
    let request = serde_json::from_slice::<Value>(&sample.request).unwrap_or(Value::Null);
    if u.audio_prompt_tokens.unwrap_or(0) == 0 && u.image_prompt_tokens.unwrap_or(0) == 0 {
        if let Some(text) = prompt_text(sample.endpoint, &request) {
            side(Side::Prompt, text, u.prompt_tokens);
        }
    }
    // Claude's extended thinking bills every thinking token as output but
    // shows a summary: its answers' words are not their tokens'.
    let thinking = request["thinking"]["type"] == "enabled";
    let plain_answer = u.reasoning() == 0
        && u.audio_completion_tokens.unwrap_or(0) == 0
        && u.image_completion_tokens.unwrap_or(0) == 0
        && !thinking;
    if plain_answer && sample.endpoint != Endpoint::Embeddings {
        let mut text = TextCount::default();
        match &sample.answer {
            Answer::Texts(texts) => texts.iter().for_each(|t| text.add(t)),
            Answer::Body(body) => {
                if let Ok(body) = serde_json::from_slice::<Value>(body) {
                    if calls_tools(&body) {
                        return out;
                    }
                    for t in sample.format.response_texts(sample.endpoint, &body) {
                        text.add(&t);
                    }
                }
            }
        }
        side(Side::Completion, text, u.completion_tokens);
    }
    out
}

/// Whether an answer calls tools (its tokens then include the calls'
/// names and JSON arguments): chat `tool_calls` / `function_call`,
/// Anthropic `tool_use` blocks, Responses `function_call` items.
fn calls_tools(body: &Value) -> bool {
    let chat = body["choices"].as_array().into_iter().flatten().any(|c| {
        let m = &c["message"];
        m["tool_calls"].as_array().is_some_and(|t| !t.is_empty()) || m["function_call"].is_object()
    });
    let blocks = ["content", "output"].iter().any(|key| {
        body[*key].as_array().into_iter().flatten().any(|b| {
            matches!(
                b["type"].as_str(),
                Some("tool_use" | "server_tool_use" | "function_call" | "custom_tool_call")
            )
        })
    });
    chat || blocks
}

/// The prompt's words, when all of it is text: `None` when it holds tools,
/// images, audio, files or token arrays.
fn prompt_text(endpoint: Endpoint, request: &Value) -> Option<TextCount> {
    for key in ["tools", "functions"] {
        if request
            .get(key)
            .and_then(Value::as_array)
            .is_some_and(|t| !t.is_empty())
        {
            return None;
        }
    }
    let mut text = TextCount::default();
    let keys: &[&str] = match endpoint {
        Endpoint::ChatCompletions => &["messages"],
        Endpoint::Completions => &["prompt"],
        Endpoint::Embeddings => &["input"],
        Endpoint::Responses => &["instructions", "input"],
        Endpoint::Messages => &["system", "messages"],
        _ => return None,
    };
    for key in keys {
        if let Some(v) = request.get(*key) {
            add_content(&mut text, v)?;
        }
    }
    Some(text)
}

/// Adds the text of a prompt value: a string, a list of them, messages
/// (`content`), or content parts of a text type. Anything else: `None`.
fn add_content(text: &mut TextCount, v: &Value) -> Option<()> {
    match v {
        Value::String(s) => text.add(s),
        Value::Array(items) => {
            for item in items {
                add_content(text, item)?;
            }
        }
        Value::Object(map) => {
            // A message with tool calls or results: its tokens are not prose.
            let role = map.get("role").and_then(Value::as_str);
            if matches!(role, Some("tool" | "function"))
                || map.get("tool_calls").is_some_and(|t| !t.is_null())
                || map.get("function_call").is_some_and(|f| !f.is_null())
            {
                return None;
            }
            if let Some(content) = map.get("content") {
                add_content(text, content)?;
            } else {
                let kind = map.get("type").and_then(Value::as_str);
                match (kind, map.get("text")) {
                    (Some("text" | "input_text" | "output_text"), Some(Value::String(s))) => {
                        text.add(s)
                    }
                    _ => return None,
                }
            }
        }
        Value::Null => {}
        _ => return None,
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn counted(text: &str) -> TextCount {
        let mut t = TextCount::default();
        t.add(text);
        t
    }

    #[test]
    fn words_and_scripts_are_counted() {
        let en = counted("The quick brown fox -- jumps, twice!");
        assert_eq!((en.words, en.chars), (6, 30));
        assert_eq!(en.script(), Some(Script::Latin));
        let ru = counted("Привет, как дела?");
        assert_eq!((ru.words, ru.script()), (3, Some(Script::Cyrillic)));
        let zh = counted("你好，世界");
        assert_eq!((zh.words, zh.chars, zh.script()), (1, 5, Some(Script::Cjk)));
        let ja = counted("こんにちは 世界");
        assert_eq!(ja.script(), Some(Script::Cjk));
        assert_eq!(counted("مرحبا بالعالم").script(), Some(Script::Arabic));
        assert_eq!(counted("안녕하세요 세계").script(), Some(Script::Hangul));
        assert_eq!(counted("नमस्ते दुनिया").script(), Some(Script::Devanagari));
        assert_eq!(counted("Γειά σου").script(), Some(Script::Greek));
        assert_eq!(counted("שלום").script(), Some(Script::Hebrew));
        assert_eq!(counted("สวัสดี").script(), Some(Script::Thai));
        assert_eq!(counted("123 -- 456").script(), None);
        assert_eq!(counted("Crème brûlée").script(), Some(Script::Latin));
    }

    #[test]
    fn families_follow_tokenizers() {
        assert_eq!(family("gpt-4o-mini-2024-07-18"), "openai-o200k");
        assert_eq!(family("ft:gpt-4o-mini-2024-07-18:acme::x"), "openai-o200k");
        assert_eq!(family("gpt-4-0613"), "openai-cl100k");
        assert_eq!(family("gpt-3.5-turbo"), "openai-cl100k");
        assert_eq!(family("o3-mini"), "openai-o200k");
        assert_eq!(family("claude-sonnet-4-5-20250929"), "claude");
        assert_eq!(family("meta-llama/Llama-3.3-70B-Instruct-Turbo"), "llama");
        assert_eq!(
            family("accounts/fireworks/models/llama-v3p3-70b-instruct"),
            "llama"
        );
        assert_eq!(family("gemini-2.5-flash"), "gemini");
        assert_eq!(family("mistral-large-latest"), "mistral");
        assert_eq!(family("qwen2.5-72b"), "qwen");
        assert_eq!(family("my-own-model"), "other");
    }

    #[test]
    fn prompts_with_anything_but_text_are_left_out() {
        let chat = json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]});
        let words = |e, v: &Value| prompt_text(e, v).map(|t| t.words);
        assert_eq!(words(Endpoint::ChatCompletions, &chat), Some(4));
        let image = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]});
        assert!(prompt_text(Endpoint::ChatCompletions, &image).is_none());
        let tools = json!({"messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]});
        assert!(prompt_text(Endpoint::ChatCompletions, &tools).is_none());
        let tool_turn = json!({"messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function",
             "function": {"name": "weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "sunny"}]});
        assert!(prompt_text(Endpoint::ChatCompletions, &tool_turn).is_none());
        let tokens = json!({"input": [[1, 2, 3]]});
        assert!(prompt_text(Endpoint::Embeddings, &tokens).is_none());
        let claude = json!({"system": [{"type": "text", "text": "Be brief."}],
            "messages": [{"role": "user", "content": "Bonjour à tous"}]});
        assert_eq!(words(Endpoint::Messages, &claude), Some(5));
        let responses = json!({"instructions": "Be brief.", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "one two"}]}]});
        assert_eq!(words(Endpoint::Responses, &responses), Some(4));
    }

    #[test]
    fn the_sample_rate_is_kept_exactly() {
        for (rate_ppm, want) in [
            (10_000, 10),
            (400_000, 400),
            (700_000, 700),
            (1_000_000, 1000),
        ] {
            let n = (0..1000).filter(|&i| sampled(i, rate_ppm)).count();
            assert_eq!(n, want, "{rate_ppm}");
        }
        assert!(sampled(0, 1_000_000) && !sampled(0, 10_000) && sampled(99, 10_000));
    }

    #[test]
    fn answers_calling_tools_are_recognized() {
        let chat =
            json!({"choices": [{"message": {"content": null, "tool_calls": [{"id": "c"}]}}]});
        let claude = json!({"content": [{"type": "text", "text": "Let me look."},
                                        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]});
        let responses = json!({"output": [{"type": "function_call", "arguments": "{}"}]});
        let plain = json!({"choices": [{"message": {"content": "Hi", "tool_calls": []}}]});
        assert!(calls_tools(&chat) && calls_tools(&claude) && calls_tools(&responses));
        assert!(!calls_tools(&plain));
    }

    #[test]
    fn a_sample_counts_each_side_whose_tokens_are_text() {
        let sample = |usage: Usage| Sample {
            team: "t".into(),
            model: "gpt-4o".into(),
            endpoint: Endpoint::ChatCompletions,
            format: crate::format::WireFormat::OpenAi,
            request: Bytes::from(
                json!({"messages": [{"role": "user", "content": "one two three"}]}).to_string(),
            ),
            answer: Answer::Texts(vec!["Четыре пять".into()]),
            usage,
        };
        let counts = count(&sample(Usage::tokens(6, 4)));
        let keys: Vec<_> = counts
            .iter()
            .map(|((_, f, s, side), n)| (*f, *s, *side, n.words, n.tokens))
            .collect();
        assert_eq!(
            keys,
            vec![
                ("openai-o200k", Script::Latin, Side::Prompt, 3, 6),
                ("openai-o200k", Script::Cyrillic, Side::Completion, 2, 4),
            ]
        );
        let reasoning = Usage {
            reasoning_tokens: Some(100),
            ..Usage::tokens(6, 104)
        };
        assert_eq!(count(&sample(reasoning)).len(), 1);
        let estimated = Usage {
            source: crate::usage::TokenSource::Estimated,
            ..Usage::tokens(6, 4)
        };
        assert!(count(&sample(estimated)).is_empty());
        let mut thinking = sample(Usage::tokens(6, 4));
        thinking.request = Bytes::from(
            json!({"thinking": {"type": "enabled", "budget_tokens": 2000},
                   "messages": [{"role": "user", "content": "one two three"}]})
            .to_string(),
        );
        thinking.endpoint = Endpoint::Messages;
        let sides: Vec<Side> = count(&thinking).iter().map(|(k, _)| k.3).collect();
        assert_eq!(sides, vec![Side::Prompt]);
    }
}
