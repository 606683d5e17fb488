//! tiktoken estimates that follow OpenAI's own accounting, so that they equal
//! the `usage` OpenAI reports (the cookbook "How to count tokens with
//! tiktoken"): per message the tokens of each field + 3, +1 per `name`, +3
//! priming the reply; tool definitions with the cookbook's constants.
//!
//! CPU-bound: callers run these off the reactor threads.

use serde_json::Value;

use super::{Encoding, Endpoint};

const TOKENS_PER_MESSAGE: u64 = 3;
const TOKENS_PER_NAME: u64 = 1;
const REPLY_PRIMING: u64 = 3;

/// Prompt tokens of an OpenAI-format request body, by endpoint.
pub fn prompt_tokens(endpoint: Endpoint, enc: Encoding, request: &Value) -> u64 {
    match endpoint {
        Endpoint::ChatCompletions => chat_prompt_tokens(enc, request),
        Endpoint::Completions => input_tokens(enc, request.get("prompt")),
        Endpoint::Embeddings => input_tokens(enc, request.get("input")),
        Endpoint::Responses => responses_prompt_tokens(enc, request),
        Endpoint::Images => input_tokens(enc, request.get("prompt")),
        Endpoint::AudioSpeech => {
            input_tokens(enc, request.get("input")) + input_tokens(enc, request.get("instructions"))
        }
        // Audio uploads are multipart; their audio tokens are not text.
        Endpoint::AudioTranscriptions | Endpoint::AudioTranslations => 0,
        // Other formats' requests are counted by their format (`crate::format`).
        Endpoint::Messages
        | Endpoint::GenerateContent
        | Endpoint::Converse
        | Endpoint::Models
        | Endpoint::Other
        | Endpoint::Batch
        | Endpoint::Realtime => 0,
    }
}

/// Chat prompt: messages plus tool (or legacy function) definitions.
pub fn chat_prompt_tokens(enc: Encoding, request: &Value) -> u64 {
    let messages = request.get("messages").and_then(Value::as_array);
    let mut total = messages.map_or(0, |m| messages_tokens(enc, m)) + REPLY_PRIMING;
    if let Some(tools) = request.get("tools").and_then(Value::as_array) {
        total += tools_tokens(enc, tools.iter().filter_map(|t| t.get("function")));
    } else if let Some(functions) = request.get("functions").and_then(Value::as_array) {
        total += tools_tokens(enc, functions.iter());
    }
    total
}

fn messages_tokens(enc: Encoding, messages: &[Value]) -> u64 {
    let mut total = 0;
    for message in messages {
        total += TOKENS_PER_MESSAGE;
        let Some(fields) = message.as_object() else {
            continue;
        };
        for (key, value) in fields {
            total += value_tokens(enc, value);
            if key == "name" {
                total += TOKENS_PER_NAME;
            }
        }
    }
    total
}

/// A message field: a string, content parts (their text), or tool calls
/// (function name and arguments).
fn value_tokens(enc: Encoding, value: &Value) -> u64 {
    match value {
        Value::String(s) => enc.count(s),
        Value::Array(items) => items
            .iter()
            .map(|item| {
                let text = item.get("text").and_then(Value::as_str).unwrap_or("");
                let function = item.get("function");
                let name = function
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let args = function
                    .and_then(|f| f.get("arguments"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                enc.count(text) + enc.count(name) + enc.count(args)
            })
            .sum(),
        _ => 0,
    }
}

/// The cookbook's `num_tokens_for_tools`, with its constants for o200k models
/// (gpt-4o family) and cl100k models (gpt-4, gpt-3.5-turbo).
fn tools_tokens<'a>(enc: Encoding, functions: impl Iterator<Item = &'a Value>) -> u64 {
    let func_init: i64 = match enc {
        Encoding::O200kBase => 7,
        Encoding::Cl100kBase => 10,
    };
    let (prop_init, prop_key, enum_init, enum_item, func_end) = (3i64, 3i64, -3i64, 3i64, 12i64);
    let str_of = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_string();
    let mut total: i64 = 0;
    let mut any = false;
    for function in functions {
        any = true;
        total += func_init;
        let name = str_of(function.get("name"));
        let desc = str_of(function.get("description"));
        let desc = desc.strip_suffix('.').unwrap_or(&desc);
        total += enc.count(&format!("{name}:{desc}")) as i64;
        let properties = function
            .get("parameters")
            .and_then(|p| p.get("properties"))
            .and_then(Value::as_object);
        if let Some(properties) = properties.filter(|p| !p.is_empty()) {
            total += prop_init;
            for (key, prop) in properties {
                total += prop_key;
                let p_type = match prop.get("type") {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                if let Some(items) = prop.get("enum").and_then(Value::as_array) {
                    total += enum_init;
                    for item in items {
                        total += enum_item;
                        let text = match item {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        total += enc.count(&text) as i64;
                    }
                }
                let p_desc = str_of(prop.get("description"));
                let p_desc = p_desc.strip_suffix('.').unwrap_or(&p_desc);
                total += enc.count(&format!("{key}:{p_type}:{p_desc}")) as i64;
            }
        }
    }
    if any {
        total += func_end;
    }
    total.max(0) as u64
}

/// Embeddings `input` / completions `prompt`: a string, strings, token ids,
/// or arrays of token ids; each counted plainly.
pub fn input_tokens(enc: Encoding, input: Option<&Value>) -> u64 {
    match input {
        Some(Value::String(s)) => enc.count(s),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => enc.count(s),
                Value::Number(_) => 1,
                Value::Array(ids) => ids.len() as u64,
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// Responses API: `instructions` as a system message, `input` as a string or
/// message items. OpenAI always reports usage here; this is the fallback.
fn responses_prompt_tokens(enc: Encoding, request: &Value) -> u64 {
    let mut total = REPLY_PRIMING;
    if let Some(instructions) = request.get("instructions").and_then(Value::as_str) {
        total += TOKENS_PER_MESSAGE + enc.count("system") + enc.count(instructions);
    }
    match request.get("input") {
        Some(Value::String(s)) => total += TOKENS_PER_MESSAGE + enc.count("user") + enc.count(s),
        Some(Value::Array(items)) => total += messages_tokens(enc, items),
        _ => {}
    }
    if let Some(tools) = request.get("tools").and_then(Value::as_array) {
        total += tools_tokens(enc, tools.iter());
    }
    total
}

/// Tokens of every string under `request`'s `fields`, skipping object
/// keys in `skip` (media billed by size, not by its encoding; role names).
/// The estimate of the formats whose prompts are plain JSON trees (Gemini,
/// Bedrock Converse).
pub fn text_tokens(enc: Encoding, request: &Value, fields: &[&str], skip: &[&str]) -> u64 {
    let mut total = 0u64;
    let mut stack: Vec<&Value> = fields.iter().filter_map(|k| request.get(*k)).collect();
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) => total = total.saturating_add(enc.count(s)),
            Value::Array(items) => stack.extend(items.iter()),
            Value::Object(map) => stack.extend(
                map.iter()
                    .filter(|(k, _)| !skip.contains(&k.as_str()))
                    .map(|(_, v)| v),
            ),
            _ => {}
        }
    }
    total
}

/// The usage of an estimate: `prompt` and `completion` tokens counted by
/// tollgate (see `format::WireFormat::estimate_usage`).
pub fn estimated(prompt: u64, completion: u64) -> super::Usage {
    super::Usage {
        source: super::TokenSource::Estimated,
        ..super::Usage::tokens(prompt, completion)
    }
}

/// Completion tokens of generated texts (one per choice), counted per choice.
pub fn completion_tokens(enc: Encoding, texts: &[String]) -> u64 {
    texts.iter().map(|t| enc.count(t)).sum()
}

/// The generated text of each choice in a non-streaming OpenAI-format body.
pub fn response_texts(endpoint: Endpoint, body: &Value) -> Vec<String> {
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Completions => body
            .get("choices")
            .and_then(Value::as_array)
            .map(|choices| {
                choices
                    .iter()
                    .map(|c| {
                        let mut text = String::new();
                        if let Some(t) = c.get("text").and_then(Value::as_str) {
                            text.push_str(t);
                        }
                        if let Some(m) = c.get("message") {
                            for key in ["content", "refusal"] {
                                if let Some(t) = m.get(key).and_then(Value::as_str) {
                                    text.push_str(t);
                                }
                            }
                            if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
                                for call in calls {
                                    let f = call.get("function");
                                    for key in ["name", "arguments"] {
                                        if let Some(t) =
                                            f.and_then(|f| f.get(key)).and_then(Value::as_str)
                                        {
                                            text.push_str(t);
                                        }
                                    }
                                }
                            }
                        }
                        text
                    })
                    .collect()
            })
            .unwrap_or_default(),
        Endpoint::Responses => {
            let mut text = String::new();
            for item in body
                .get("output")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for part in item
                    .get("content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(t) = part.get("text").and_then(Value::as_str) {
                        text.push_str(t);
                    }
                }
                if let Some(args) = item.get("arguments").and_then(Value::as_str) {
                    text.push_str(args);
                }
            }
            vec![text]
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The cookbook's example conversation, for which the OpenAI API reported
    /// 129 prompt tokens on gpt-3.5-turbo/gpt-4 and 124 on gpt-4o/gpt-4o-mini.
    fn cookbook_messages() -> Value {
        json!({"messages": [
            {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
            {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
            {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
            {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
            {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
            {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."}
        ]})
    }

    #[test]
    fn chat_estimate_matches_openai_reported_prompt_tokens() {
        let req = cookbook_messages();
        assert_eq!(chat_prompt_tokens(Encoding::Cl100kBase, &req), 129);
        assert_eq!(chat_prompt_tokens(Encoding::O200kBase, &req), 124);
    }

    /// The cookbook's tool example: OpenAI reported 105 (gpt-3.5-turbo, gpt-4)
    /// and 101 (gpt-4o, gpt-4o-mini) prompt tokens.
    #[test]
    fn tool_definitions_match_openai_reported_prompt_tokens() {
        let req = json!({
            "messages": [
                {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
                {"role": "user", "content": "What's the weather like in San Francisco?"}
            ],
            "tools": [{"type": "function", "function": {
                "name": "get_current_weather",
                "description": "Get the current weather in a given location",
                "parameters": {"type": "object", "properties": {
                    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "unit": {"type": "string", "description": "The unit of temperature to return", "enum": ["celsius", "fahrenheit"]}
                }, "required": ["location"]}
            }}]
        });
        assert_eq!(chat_prompt_tokens(Encoding::Cl100kBase, &req), 105);
        assert_eq!(chat_prompt_tokens(Encoding::O200kBase, &req), 101);
    }

    #[test]
    fn embeddings_inputs_are_counted_plainly() {
        let enc = Encoding::Cl100kBase;
        assert_eq!(input_tokens(enc, Some(&json!("hello world"))), 2);
        assert_eq!(input_tokens(enc, Some(&json!(["hello world", "hello"]))), 3);
        assert_eq!(input_tokens(enc, Some(&json!([1, 2, 3]))), 3);
        assert_eq!(input_tokens(enc, Some(&json!([[1, 2], [3]]))), 3);
        assert_eq!(input_tokens(enc, None), 0);
    }

    #[test]
    fn completion_texts_are_counted_per_choice() {
        let body = json!({"choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hello world"}},
            {"index": 1, "message": {"role": "assistant", "content": "hello"}}
        ]});
        let texts = response_texts(Endpoint::ChatCompletions, &body);
        assert_eq!(completion_tokens(Encoding::O200kBase, &texts), 3);
    }
}
