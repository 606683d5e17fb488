"""The official `openai` SDK's AzureOpenAI client against tollgate, with
`azure_endpoint` pointed at it (run by tests/providers.rs). Prints one line
per call: what the client saw."""
import os

from openai import AzureOpenAI

client = AzureOpenAI(
    azure_endpoint=os.environ["TOLLGATE_ENDPOINT"],
    api_key=os.environ["TG_KEY"],
    api_version="2024-06-01",
)
tokens = {"x-mock-prompt-tokens": "1000", "x-mock-completion-tokens": "100"}

raw = client.chat.completions.with_raw_response.create(
    model="prod-4o",
    messages=[{"role": "user", "content": "hi"}],
    extra_headers={**tokens, "x-mock-model": "gpt-4o-2024-05-13"},
)
chat = raw.parse()
print("chat", raw.headers["x-tollgate-cost-usd"], chat.model, chat.usage.prompt_tokens)

stream = client.chat.completions.create(
    model="prod-mini",
    messages=[{"role": "user", "content": "hi"}],
    stream=True,
    extra_headers={**tokens, "x-mock-model": "gpt-4o-mini"},
)
text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
print("stream", text)

emb = client.embeddings.create(model="prod-mini", input="hello")
print("embeddings", len(emb.data[0].embedding))
