"""The official `anthropic` SDK against tollgate, `base_url` pointed at it
(run by tests/anthropic.rs). Prints one line per call: what the client saw."""
import os

import anthropic

client = anthropic.Anthropic(base_url=os.environ["TOLLGATE_ENDPOINT"], api_key=os.environ["TG_KEY"])
usage = {
    "x-mock-prompt-tokens": "1000",
    "x-mock-cached-tokens": "2000",
    "x-mock-cache-write-5m": "400",
    "x-mock-cache-write-1h": "100",
    "x-mock-completion-tokens": "200",
}
messages = [{"role": "user", "content": "Hello, Claude"}]

raw = client.messages.with_raw_response.create(
    model="claude-sonnet-4-5", max_tokens=1024, messages=messages, extra_headers=usage
)
message = raw.parse()
print(
    "create",
    raw.headers["x-tollgate-cost-usd"],
    message.model,
    message.usage.input_tokens,
    message.usage.cache_read_input_tokens,
    message.content[0].text,
)

with client.messages.stream(
    model="claude-sonnet-4-5", max_tokens=1024, messages=messages, extra_headers=usage
) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
print("stream", text, final.usage.output_tokens)

count = client.messages.count_tokens(
    model="claude-sonnet-4-5", messages=messages, extra_headers={"x-mock-prompt-tokens": "14"}
)
print("count_tokens", count.input_tokens)

broke = anthropic.Anthropic(
    base_url=os.environ["TOLLGATE_ENDPOINT"], api_key=os.environ["TG_KEY_BROKE"], max_retries=0
)
try:
    broke.messages.create(model="claude-sonnet-4-5", max_tokens=1024, messages=messages)
    print("broke allowed")
except anthropic.RateLimitError as e:
    print("broke", e.status_code, e.body["error"]["type"], e.body["error"]["code"])

try:
    anthropic.Anthropic(base_url=os.environ["TOLLGATE_ENDPOINT"], api_key="tg-wrong", max_retries=0).messages.create(
        model="claude-sonnet-4-5", max_tokens=10, messages=messages
    )
    print("wrong key allowed")
except anthropic.AuthenticationError as e:
    print("wrong key", e.status_code, e.body["error"]["type"])
