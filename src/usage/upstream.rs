//! Usage from a non-streaming upstream response body.

use serde::Deserialize;

use super::{Usage, UsageJson};

#[derive(Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<UsageJson>,
}

/// The body's reported usage (`Ok(None)` when it has none); an error when the
/// body is not a JSON object at all.
pub fn usage_from_body(body: &[u8]) -> Result<Option<Usage>, serde_json::Error> {
    let parsed: WithUsage = serde_json::from_slice(body)?;
    Ok(parsed.usage.as_ref().and_then(UsageJson::to_usage))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::TokenSource;

    #[test]
    fn chat_usage_with_cached_tokens() {
        let body = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":100,"completion_tokens":20,
            "total_tokens":120,"prompt_tokens_details":{"cached_tokens":64}}}"#;
        assert_eq!(
            usage_from_body(body).ok().flatten(),
            Some(Usage {
                prompt_tokens: 100,
                completion_tokens: 20,
                cached_tokens: 64,
                source: TokenSource::Upstream
            })
        );
    }

    #[test]
    fn responses_api_usage() {
        let body = br#"{"object":"response","usage":{"input_tokens":36,"output_tokens":87,
            "input_tokens_details":{"cached_tokens":0},"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123}}"#;
        let u = usage_from_body(body).ok().flatten();
        assert_eq!(
            u.map(|u| (u.prompt_tokens, u.completion_tokens)),
            Some((36, 87))
        );
    }

    #[test]
    fn embeddings_usage_and_missing_usage() {
        let body = br#"{"object":"list","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        let u = usage_from_body(body).ok().flatten();
        assert_eq!(
            u.map(|u| (u.prompt_tokens, u.completion_tokens)),
            Some((8, 0))
        );
        assert_eq!(usage_from_body(br#"{"choices":[]}"#).ok().flatten(), None);
        assert_eq!(usage_from_body(br#"{"usage":null}"#).ok().flatten(), None);
        assert!(usage_from_body(b"<html>oops</html>").is_err());
    }
}
