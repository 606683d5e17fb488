//! OpenAI's wire formats as they stream (chat and text completions, and
//! the Responses API; Azure and every OpenAI-compatible API send the same):
//! usage, the served model and tier, tool calls and generated text from
//! each SSE event. Non-streaming bodies are read by `read`.

use std::borrow::Cow;

use serde::Deserialize;

use super::read::{facts_from_value, Counts};
use super::sse::StreamFacts;

#[derive(Deserialize)]
struct ChoiceChunk<'a> {
    #[serde(default, borrow)]
    choices: Option<Vec<Choice<'a>>>,
    #[serde(default)]
    usage: Option<Counts>,
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    service_tier: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    index: usize,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    refusal: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<ToolCallDelta<'a>>>,
}

#[derive(Deserialize)]
struct ToolCallDelta<'a> {
    #[serde(default, borrow)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
struct FunctionDelta<'a> {
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    arguments: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ResponsesEvent<'a> {
    #[serde(default, rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    delta: Option<serde_json::Value>,
    #[serde(default)]
    response: Option<serde_json::Value>,
    #[serde(default, borrow)]
    item: Option<ItemRef<'a>>,
}

#[derive(Deserialize)]
struct ItemRef<'a> {
    #[serde(default, rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
}

/// One Responses API event.
pub(super) fn on_responses_event(facts: &mut StreamFacts, data: &[u8]) {
    let Ok(event) = serde_json::from_slice::<ResponsesEvent>(data) else {
        facts.unparsable_events += 1;
        return;
    };
    match event.kind.as_deref() {
        Some("response.output_text.delta") | Some("response.refusal.delta") => {
            if let Some(serde_json::Value::String(text)) = &event.delta {
                facts.push_text(0, text);
            }
        }
        Some("response.function_call_arguments.delta") => {
            if let Some(serde_json::Value::String(text)) = &event.delta {
                facts.push_tool_text(0, text);
            }
        }
        // A tool call finished: counted now, in case the stream
        // is cut before its `response.completed`.
        Some("response.output_item.done") => {
            if let Some(kind) = event.item.as_ref().and_then(|i| i.kind.as_deref()) {
                facts.served.tool_calls.count_item(kind);
            }
        }
        Some("response.completed" | "response.incomplete" | "response.failed") => {
            if let Some(response) = &event.response {
                let read = facts_from_value(response);
                facts.see(read.served);
                if let Some(u) = read.usage {
                    facts.usage = Some(u);
                    facts.done = true;
                }
            }
        }
        // `response.created` and friends say the model and tier early.
        _ => {
            if let Some(response) = &event.response {
                let read = facts_from_value(response);
                facts.see(read.served);
            }
        }
    }
}

/// One chat or text completion chunk; true when it is the usage-only
/// chunk (usage and no choices).
pub(super) fn on_chunk(facts: &mut StreamFacts, data: &[u8]) -> bool {
    let Ok(chunk) = serde_json::from_slice::<ChoiceChunk>(data) else {
        return odd_chunk(facts, data);
    };
    if let Some(m) = &chunk.model {
        facts.served.see_model(m);
    }
    if let Some(t) = &chunk.service_tier {
        facts.served.see_tier(t);
    }
    let choices = chunk.choices.unwrap_or_default();
    let usage_object = chunk.usage.as_ref();
    let usage = usage_object.and_then(Counts::to_usage);
    for choice in &choices {
        let i = choice.index;
        if let Some(reason) = &choice.finish_reason {
            facts.served.see_stop(reason);
        }
        if let Some(t) = &choice.text {
            facts.push_text(i, t);
        }
        if let Some(delta) = &choice.delta {
            for t in [&delta.content, &delta.refusal].into_iter().flatten() {
                facts.push_text(i, t);
            }
            for call in delta.tool_calls.iter().flatten() {
                let f = call.function.as_ref();
                for t in [
                    f.and_then(|f| f.name.as_ref()),
                    f.and_then(|f| f.arguments.as_ref()),
                ]
                .into_iter()
                .flatten()
                {
                    facts.push_tool_text(i, t);
                }
            }
        }
    }
    if let Some(u) = usage {
        facts.usage = Some(u);
    }
    // The usage-only chunk: usage and no choices (even if its
    // usage could not be read, the client did not ask for it).
    usage_object.is_some() && choices.is_empty()
}

/// A chunk the typed reader refused (a key spelled twice, counts as
/// strings): read as a plain JSON value for its usage and served model.
/// Returns whether it is the usage-only chunk.
fn odd_chunk(facts: &mut StreamFacts, data: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        facts.unparsable_events += 1;
        return false;
    };
    let read = facts_from_value(&v);
    facts.see(read.served);
    if let Some(u) = read.usage {
        facts.usage = Some(u);
    }
    let no_choices = v
        .get("choices")
        .is_none_or(|c| c.as_array().is_some_and(Vec::is_empty));
    v.get("usage").is_some_and(serde_json::Value::is_object) && no_choices
}
