"""The official `google-genai` SDK against tollgate, `base_url` pointed at it
(run by tests/gemini.rs). Prints one line per call: what the client saw."""
import os

from google import genai
from google.genai import errors

endpoint = os.environ["TOLLGATE_ENDPOINT"]
usage = {
    "x-mock-prompt-tokens": "10000",
    "x-mock-cached-tokens": "4000",
    "x-mock-audio-prompt-tokens": "1000",
    "x-mock-tool-use-tokens": "500",
    "x-mock-completion-tokens": "800",
    "x-mock-thoughts-tokens": "200",
}


def client(key, headers=None):
    options = {"base_url": endpoint, "headers": headers or {}}
    return genai.Client(api_key=key, http_options=options)


app = client(os.environ["TG_KEY"], usage)
r = app.models.generate_content(model="gemini-2.5-flash", contents="Hello, Gemini")
m = r.usage_metadata
print("generate", r.text, m.prompt_token_count, m.cached_content_token_count, m.thoughts_token_count)

last = None
text = ""
for chunk in app.models.generate_content_stream(model="gemini-2.5-flash", contents="Hello, Gemini"):
    text += chunk.text or ""
    last = chunk
print("stream", text, last.usage_metadata.candidates_token_count)

# Each client is kept in a name: a dropped `genai.Client` closes its connection pool.
counting = client(os.environ["TG_KEY"], {"x-mock-prompt-tokens": "14"})
count = counting.models.count_tokens(model="gemini-2.5-flash", contents="Hello, Gemini")
print("count_tokens", count.total_tokens)

embedded = app.models.embed_content(model="gemini-embedding-001", contents="one two three four")
print("embed", len(embedded.embeddings[0].values))

broke = client(os.environ["TG_KEY_BROKE"])
try:
    broke.models.generate_content(model="gemini-2.5-flash", contents="Hi")
    print("broke allowed")
except errors.ClientError as e:
    print("broke", e.code, e.status)

wrong = client("tg-wrong")
try:
    wrong.models.generate_content(model="gemini-2.5-flash", contents="Hi")
    print("wrong key allowed")
except errors.ClientError as e:
    print("wrong key", e.code, e.status)
