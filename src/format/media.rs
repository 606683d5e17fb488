//! OpenAI's image and audio endpoints (SPEC 12), part of its wire format:
//! the facts of their requests (JSON, or `multipart/form-data` uploads read
//! with `multer`) and what their responses say (images made and at what
//! size and quality, seconds of audio, token usage).
//!
//! - Images (`/v1/images/generations`, `/edits`, `/variations`): token
//!   models report `usage` (output tokens are image tokens); `dall-e-*` are
//!   billed per image of `data`, at the size and quality asked for.
//! - Transcriptions and translations: `usage` of `type: "tokens"` or
//!   `type: "duration"` (seconds), or a `verbose_json` body's `duration`;
//!   subtitles (`srt`, `vtt`) end at their last cue.
//! - Speech: billed by the characters of `input` (`tts-1`) or by tokens
//!   (`gpt-4o-mini-tts`, reported only when streamed as SSE).

use bytes::Bytes;
use serde::Deserialize;

use super::request::{self, OutputLimit, RequestFacts, Units};
use crate::error::ApiError;
use crate::usage::read::{BodyFacts, Counts};
use crate::usage::{Endpoint, ImageSpec, TokenSource, Usage};

/// The model OpenAI's image endpoints use when a request names none.
pub const DEFAULT_IMAGE_MODEL: &str = "dall-e-2";

/// Most output tokens one image can cost: gpt-image-1's dearest (high
/// quality, 1024x1536) is 6,240.
pub const IMAGE_OUTPUT_TOKENS_BOUND: u64 = 8_000;
/// Output tokens of one gpt-image-1 image by quality and size (OpenAI's
/// image generation guide): the estimate when a response reports no usage.
fn image_output_tokens(spec: ImageSpec) -> u64 {
    use crate::usage::ImageQuality::{High, Low, Medium};
    let square = spec.width == spec.height && spec.width != 0;
    let table = match spec.quality {
        Low => [272, 408],
        Medium => [1_056, 1_584],
        High => [4_160, 6_240],
        // auto, or dall-e's qualities: the dearest.
        _ => return 6_240,
    };
    match (spec.width, square) {
        (0, _) => table[1],
        (_, true) => table[0],
        _ => table[1],
    }
}

/// Output tokens of each partial image a streamed generation sends.
const PARTIAL_IMAGE_TOKENS: u64 = 100;
/// Fewest bytes a second of uploaded audio takes (4 kbps, below any codec
/// the API accepts for speech): the bound of an upload's duration.
const AUDIO_BYTES_PER_SECOND_MIN: u64 = 500;
/// Bytes a second of audio takes at 128 kbps: the estimate of an upload's
/// duration when the response does not say it.
const AUDIO_BYTES_PER_SECOND_TYPICAL: u64 = 16_000;
/// Audio output tokens per second of speech (OpenAI's 50 ms per token).
const SPEECH_TOKENS_PER_SECOND: u64 = 20;

/// The text fields of a form, and the bytes of its files.
#[derive(Debug, Default)]
pub struct Form {
    pub fields: Vec<(String, String)>,
    pub file_bytes: u64,
    /// The file's bytes, when asked for (`read_form_with_file`).
    pub file: Option<Vec<u8>>,
}

impl Form {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Longest text field kept (a prompt is at most 32,000 characters).
const MAX_FIELD_BYTES: usize = 256 * 1024;

/// Reads a `multipart/form-data` body already in memory. The body is fed
/// to the parser in slices (no copy of it whole); the parse never waits.
pub fn read_form(content_type: &str, body: &Bytes) -> Result<Form, ApiError> {
    parse_form(content_type, body, false)
}

/// `read_form`, keeping the (first) file's bytes: a batch input file.
pub fn read_form_with_file(content_type: &str, body: &Bytes) -> Result<Form, ApiError> {
    parse_form(content_type, body, true)
}

fn parse_form(content_type: &str, body: &Bytes, keep_file: bool) -> Result<Form, ApiError> {
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        ApiError::invalid("Expected a multipart/form-data body with a boundary.", None)
    })?;
    const SLICE: usize = 64 * 1024;
    let slices = (0..body.len().div_ceil(SLICE)).map(|i| {
        Ok::<Bytes, std::io::Error>(body.slice(i * SLICE..((i + 1) * SLICE).min(body.len())))
    });
    let mut form = multer::Multipart::new(futures_util::stream::iter(slices), boundary);
    let read = async {
        let mut out = Form::default();
        while let Some(mut field) = form.next_field().await? {
            let name = field.name().unwrap_or("").to_string();
            if field.file_name().is_some() {
                let keep = keep_file && out.file.is_none();
                let mut file = Vec::new();
                while let Some(chunk) = field.chunk().await? {
                    out.file_bytes = out.file_bytes.saturating_add(chunk.len() as u64);
                    if keep {
                        file.extend_from_slice(&chunk);
                    }
                }
                if keep {
                    out.file = Some(file);
                }
            } else {
                let mut text = Vec::new();
                while let Some(chunk) = field.chunk().await? {
                    if text.len() + chunk.len() <= MAX_FIELD_BYTES {
                        text.extend_from_slice(&chunk);
                    }
                }
                out.fields
                    .push((name, String::from_utf8_lossy(&text).into_owned()));
            }
        }
        Ok::<Form, multer::Error>(out)
    };
    match futures_util::FutureExt::now_or_never(read) {
        Some(Ok(form)) => Ok(form),
        Some(Err(e)) => Err(ApiError::invalid(
            format!("We could not parse the multipart body of your request: {e}"),
            None,
        )),
        None => Err(ApiError::Internal("multipart parse did not finish".into())),
    }
}

#[derive(Deserialize)]
struct ImageRequest {
    model: Option<String>,
    n: Option<u32>,
    size: Option<String>,
    quality: Option<String>,
    user: Option<String>,
    stream: Option<bool>,
    partial_images: Option<u64>,
}

#[derive(Deserialize)]
struct SpeechRequest {
    model: Option<String>,
    input: Option<String>,
    user: Option<String>,
    /// `sse`: the answer streams with its usage.
    stream_format: Option<String>,
}

fn is_multipart(content_type: &str) -> bool {
    content_type
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
}

fn number<T: std::str::FromStr>(form: &Form, name: &str) -> Result<Option<T>, ApiError> {
    match form.get(name) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| {
            ApiError::invalid(format!("Invalid value for `{name}`: {v:?}"), Some(name))
        }),
    }
}

/// The size and quality an image request asks for, with OpenAI's defaults
/// (`dall-e-*`: 1024x1024 and standard; the token models: auto).
fn image_spec(model: &str, size: Option<&str>, quality: Option<&str>) -> ImageSpec {
    let dalle = model.starts_with("dall-e");
    let size = size.unwrap_or(if dalle { "1024x1024" } else { "auto" });
    let quality = quality.unwrap_or(if dalle { "standard" } else { "auto" });
    ImageSpec::parse(size, quality).unwrap_or(ImageSpec {
        width: 0,
        height: 0,
        quality: crate::usage::ImageQuality::Auto,
    })
}

/// What an image request asks for: `n` images of a size and quality, each
/// at most `IMAGE_OUTPUT_TOKENS_BOUND` output tokens (and 100 per partial
/// image). With no model named, OpenAI's default (`DEFAULT_IMAGE_MODEL`)
/// serves it unless the path names a deployment.
pub fn image_facts(body: &Bytes, content_type: &str) -> Result<RequestFacts, ApiError> {
    let r = if is_multipart(content_type) {
        let form = read_form(content_type, body)?;
        ImageRequest {
            model: form.get("model").map(str::to_string),
            n: number(&form, "n")?,
            size: form.get("size").map(str::to_string),
            quality: form.get("quality").map(str::to_string),
            user: form.get("user").map(str::to_string),
            stream: number(&form, "stream")?,
            partial_images: number(&form, "partial_images")?,
        }
    } else {
        request::parse::<ImageRequest>(body)?
    };
    let model = r.model.filter(|m| !m.is_empty());
    // The spec's defaults are the default model's when none is named.
    let priced_as = model.as_deref().unwrap_or(DEFAULT_IMAGE_MODEL);
    let partials = r
        .partial_images
        .unwrap_or(0)
        .saturating_mul(PARTIAL_IMAGE_TOKENS);
    Ok(RequestFacts {
        background: false,
        units: Units {
            image_spec: Some(image_spec(
                priced_as,
                r.size.as_deref(),
                r.quality.as_deref(),
            )),
            ..Units::default()
        },
        model,
        n: r.n,
        stream: r.stream == Some(true),
        end_user: r.user,
        output_limit: OutputLimit {
            requested: Some(IMAGE_OUTPUT_TOKENS_BOUND.saturating_add(partials)),
            field: None,
        },
        ..RequestFacts::default()
    })
}

/// What a transcription or translation asks for: its model, whether it
/// streams, and the audio file's size (which bounds its duration).
pub fn transcription_facts(body: &Bytes, content_type: &str) -> Result<RequestFacts, ApiError> {
    if !is_multipart(content_type) {
        return Err(ApiError::invalid(
            "Audio must be uploaded as multipart/form-data (a `file` and a `model`).",
            None,
        ));
    }
    let form = read_form(content_type, body)?;
    Ok(RequestFacts {
        background: false,
        model: form.get("model").map(str::to_string),
        stream: number::<bool>(&form, "stream")? == Some(true),
        end_user: form.get("user").map(str::to_string),
        units: Units {
            audio_bytes: Some(form.file_bytes),
            ..Units::default()
        },
        ..RequestFacts::default()
    })
}

/// What a speech request asks for: its model and the characters of its
/// `input` (exactly what `tts-1` bills).
pub fn speech_facts(body: &Bytes) -> Result<RequestFacts, ApiError> {
    let r: SpeechRequest = request::parse(body)?;
    let characters = r.input.as_deref().map_or(0, |t| t.chars().count() as u64);
    Ok(RequestFacts {
        background: false,
        model: r.model,
        stream: r.stream_format.as_deref() == Some("sse"),
        end_user: r.user,
        units: Units {
            characters: Some(characters),
            ..Units::default()
        },
        ..RequestFacts::default()
    })
}

/// An upload's most seconds of audio: every byte at the lowest bitrate.
pub fn audio_seconds_bound(bytes: u64) -> u64 {
    bytes / AUDIO_BYTES_PER_SECOND_MIN + 1
}

#[derive(Deserialize)]
struct ImagesBody {
    data: Option<Vec<serde::de::IgnoredAny>>,
    usage: Option<Counts>,
    size: Option<String>,
    quality: Option<String>,
}

#[derive(Deserialize)]
struct TranscriptionBody {
    usage: Option<Counts>,
    duration: Option<f64>,
}

#[derive(Deserialize)]
struct DurationUsage {
    usage: Option<Seconds>,
}

#[derive(Deserialize)]
struct Seconds {
    seconds: Option<f64>,
}

/// Whole seconds billed for a duration: every second begun.
fn billed_seconds(duration: f64) -> Option<u64> {
    (duration.is_finite() && duration >= 0.0).then(|| duration.ceil() as u64)
}

/// What an images response says: the images in `data`, at the size and
/// quality it names (the token models say), and its token usage.
pub fn read_images_body(body: &[u8]) -> BodyFacts {
    let Ok(b) = serde_json::from_slice::<ImagesBody>(body) else {
        return BodyFacts::default();
    };
    let reported = b.usage.as_ref().and_then(Counts::to_usage);
    let mut usage = reported.unwrap_or(Usage {
        // No usage: a token model's tokens are estimated (`completed`).
        source: TokenSource::Estimated,
        ..Usage::NONE
    });
    usage.images = b.data.as_ref().map(|d| d.len() as u64);
    if let (Some(size), Some(quality)) = (&b.size, &b.quality) {
        usage.image_spec = ImageSpec::parse(size, quality);
    }
    BodyFacts {
        usage: Some(usage),
        readable: true,
        ..BodyFacts::default()
    }
}

/// What a transcription or translation response says: its token usage,
/// else its seconds (`usage.seconds`, a `verbose_json` body's `duration`,
/// the last cue of subtitles, the last estimated). Plain `text` says
/// nothing: `None`.
pub fn read_transcription_body(body: &[u8]) -> BodyFacts {
    if let Ok(b) = serde_json::from_slice::<TranscriptionBody>(body) {
        let tokens = b.usage.as_ref().and_then(Counts::to_usage);
        let seconds = serde_json::from_slice::<DurationUsage>(body)
            .ok()
            .and_then(|d| d.usage?.seconds)
            .or(b.duration)
            .and_then(billed_seconds);
        let usage = match (tokens, seconds) {
            (Some(u), _) => Some(u),
            (None, Some(s)) => Some(Usage {
                audio_seconds: Some(s),
                ..Usage::NONE
            }),
            (None, None) => None,
        };
        return BodyFacts {
            usage,
            readable: true,
            ..BodyFacts::default()
        };
    }
    let usage = subtitles_end(body).map(|s| Usage {
        audio_seconds: Some(s),
        source: TokenSource::Estimated,
        ..Usage::NONE
    });
    BodyFacts {
        usage,
        ..BodyFacts::default()
    }
}

/// The end of the last cue of SRT (`00:01:02,500`) or WebVTT
/// (`00:01:02.500`) subtitles, in whole seconds begun.
fn subtitles_end(body: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(body).ok()?;
    let line = text.lines().rev().find(|l| l.contains("-->"))?;
    let end = line.split("-->").nth(1)?.split_whitespace().next()?;
    let mut parts = end.split(':').rev();
    let secs: f64 = parts.next()?.replace(',', ".").parse().ok()?;
    let mins: f64 = parts.next().map_or(Some(0.0), |m| m.parse().ok())?;
    let hours: f64 = parts.next().map_or(Some(0.0), |h| h.parse().ok())?;
    billed_seconds(hours * 3600.0 + mins * 60.0 + secs)
}

/// The share of a usage the endpoint bills apart: an image endpoint's
/// output is image tokens and a speech endpoint's audio tokens unless the
/// response split them; a transcription's input is audio. The units the
/// request alone says (speech characters, the images' spec, images asked
/// for when the response does not list them, an upload's duration
/// estimated when the response gives none) fill what the response left.
pub fn completed(endpoint: Endpoint, mut usage: Usage, asked: &Units, choices: u16) -> Usage {
    match endpoint {
        Endpoint::Images => {
            if usage.image_completion_tokens.is_none() && usage.completion_tokens > 0 {
                usage.image_completion_tokens = Some(usage.completion_tokens);
            }
            usage.image_spec = usage.image_spec.or(asked.image_spec);
            if usage.images.is_none() {
                usage.images = Some(u64::from(choices));
            }
            // No usage from a token model: each image's tokens at its
            // size and quality (a row priced per image prices none).
            // DALL-E's qualities (standard, hd) are priced per image only.
            let spec = usage.image_spec.unwrap_or(ImageSpec {
                width: 0,
                height: 0,
                quality: crate::usage::ImageQuality::Auto,
            });
            let per_image_only = matches!(
                spec.quality,
                crate::usage::ImageQuality::Standard | crate::usage::ImageQuality::Hd
            );
            if per_image_only && usage.prompt_tokens == 0 {
                usage.source = TokenSource::Upstream;
            } else if usage.source == TokenSource::Estimated
                && usage.image_completion_tokens.is_none()
            {
                let tokens = usage
                    .images
                    .unwrap_or(0)
                    .saturating_mul(image_output_tokens(spec));
                usage.completion_tokens = usage.completion_tokens.saturating_add(tokens);
                usage.image_completion_tokens = Some(tokens);
            }
        }
        Endpoint::AudioSpeech => {
            if usage.audio_completion_tokens.is_none() && usage.completion_tokens > 0 {
                usage.audio_completion_tokens = Some(usage.completion_tokens);
            }
            usage.characters = usage.characters.or(asked.characters);
        }
        Endpoint::AudioTranscriptions | Endpoint::AudioTranslations => {
            if usage.audio_prompt_tokens.is_none() && usage.prompt_tokens > 0 {
                usage.audio_prompt_tokens = Some(usage.prompt_tokens);
            }
            let reported = usage.prompt_tokens > 0 || usage.audio_seconds.is_some();
            if !reported {
                if let Some(bytes) = asked.audio_bytes {
                    usage.audio_seconds = Some(bytes.div_ceil(AUDIO_BYTES_PER_SECOND_TYPICAL));
                    usage.source = TokenSource::Estimated;
                }
            }
        }
        _ => {}
    }
    usage
}

/// Audio tokens of a speech body no usage came with: its duration (exact
/// for `pcm` and `wav`, at 24 kHz 16-bit mono; at 32 kbps for compressed
/// formats, more than they take) at 20 tokens a second.
pub fn speech_audio_tokens(request: &serde_json::Value, response_bytes: usize) -> u64 {
    let format = request
        .get("response_format")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("mp3");
    let bytes_per_second = match format {
        "pcm" | "wav" => 48_000,
        _ => 4_000,
    };
    (response_bytes as u64)
        .saturating_mul(SPEECH_TOKENS_PER_SECOND)
        .div_ceil(bytes_per_second)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form_body(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Bytes {
        let mut out = Vec::new();
        for (name, file, value) in parts {
            out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            match file {
                Some(f) => out.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: audio/mpeg\r\n\r\n").as_bytes(),
                ),
                None => out.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                ),
            }
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        Bytes::from(out)
    }

    #[test]
    fn uploads_give_their_fields_and_file_size() {
        let audio = vec![7u8; 200_000];
        let body = form_body(
            "xyz",
            &[
                ("file", Some("a.mp3"), &audio),
                ("model", None, b"whisper-1"),
            ],
        );
        let f = transcription_facts(&body, "multipart/form-data; boundary=xyz")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.model.as_deref(), Some("whisper-1"));
        assert_eq!(f.units.audio_bytes, Some(200_000));
        assert!(transcription_facts(&body, "application/json").is_err());
        let e = read_form(
            "multipart/form-data; boundary=xyz",
            &Bytes::from_static(b"--xyz\r\nbroken"),
        );
        assert!(e.is_err());
    }

    #[test]
    fn image_requests_default_to_dall_e_2_at_1024_standard() {
        let f = image_facts(
            &Bytes::from_static(br#"{"prompt":"a cat","n":2}"#),
            "application/json",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.model, None);
        assert_eq!(f.n, Some(2));
        assert_eq!(
            f.units.image_spec.map(|s| s.to_string()).as_deref(),
            Some("1024x1024/standard")
        );
        let f = image_facts(
            &Bytes::from_static(br#"{"model":"gpt-image-1","prompt":"a cat","partial_images":2}"#),
            "application/json",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            f.units.image_spec.map(|s| s.to_string()).as_deref(),
            Some("auto/auto")
        );
        assert_eq!(f.output_limit.requested, Some(8_200));
    }

    #[test]
    fn transcription_bodies_give_tokens_or_seconds() {
        let tokens = read_transcription_body(
            br#"{"text":"hi","usage":{"type":"tokens","input_tokens":120,"input_token_details":{"text_tokens":20,"audio_tokens":100},"output_tokens":9,"total_tokens":129}}"#,
        )
        .usage
        .unwrap_or(Usage::NONE);
        assert_eq!(
            (
                tokens.prompt_tokens,
                tokens.audio_prompt_tokens,
                tokens.completion_tokens
            ),
            (120, Some(100), 9)
        );
        let secs =
            read_transcription_body(br#"{"text":"hi","usage":{"type":"duration","seconds":12}}"#)
                .usage;
        assert_eq!(secs.and_then(|u| u.audio_seconds), Some(12));
        let verbose =
            read_transcription_body(br#"{"task":"transcribe","duration":8.47,"text":"hi"}"#).usage;
        assert_eq!(verbose.and_then(|u| u.audio_seconds), Some(9));
        let srt = read_transcription_body(
            b"1\n00:00:00,000 --> 00:00:04,200\nHello\n\n2\n00:00:04,200 --> 00:01:02,010\nthere\n",
        );
        assert_eq!(srt.usage.and_then(|u| u.audio_seconds), Some(63));
        assert!(read_transcription_body(b"just text").usage.is_none());
    }

    #[test]
    fn image_bodies_count_images_and_their_tokens() {
        let facts = read_images_body(
            br#"{"created":1,"data":[{"b64_json":"x"},{"b64_json":"y"}],"size":"1024x1536","quality":"high",
                "usage":{"total_tokens":12520,"input_tokens":40,"output_tokens":12480,"input_tokens_details":{"text_tokens":40,"image_tokens":0}}}"#,
        );
        let u = completed(
            Endpoint::Images,
            facts.usage.unwrap_or(Usage::NONE),
            &Units::default(),
            1,
        );
        assert_eq!(u.images, Some(2));
        assert_eq!(u.image_completion_tokens, Some(12_480));
        assert_eq!(
            u.image_spec.map(|s| s.to_string()).as_deref(),
            Some("1024x1536/high")
        );
    }
}
