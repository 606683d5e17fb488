"""Background responses with the official `openai` Python SDK, unchanged,
pointed at tollgate via base_url (issue 22). Run by tests/background.rs with
TOLLGATE_BASE_URL and TG_KEY set; the upstream behind tollgate is the
project's mock. Prints one line per step for the test to compare."""

import os
import time

import openai

client = openai.OpenAI(
    base_url=os.environ["TOLLGATE_BASE_URL"], api_key=os.environ["TG_KEY"], max_retries=0
)
tokens = {"x-mock-prompt-tokens": "1000", "x-mock-completion-tokens": "2000"}

raw = client.responses.with_raw_response.create(
    model="gpt-4o-mini",
    input="Write a long report.",
    background=True,
    extra_headers={**tokens, "x-mock-polls-pending": "2"},
)
resp = raw.parse()
print(f"create: {resp.status}, cost {raw.headers.get('x-tollgate-cost-usd', 'none')}")

costs = []
while resp.status in ("queued", "in_progress"):
    time.sleep(0.05)
    raw = client.responses.with_raw_response.retrieve(resp.id)
    resp = raw.parse()
    costs.append(raw.headers.get("x-tollgate-cost-usd", "none"))
print(f"retrieve: {resp.status} after {len(costs)} polls, costs {' '.join(costs)}")
print(f"usage: {resp.usage.input_tokens} in, {resp.usage.output_tokens} out")

again = client.responses.with_raw_response.retrieve(resp.id)
print(f"retrieve again: {again.parse().status}, cost {again.headers.get('x-tollgate-cost-usd', 'none')}")

queued = client.responses.create(
    model="gpt-4o-mini",
    input="Another one.",
    background=True,
    extra_headers={**tokens, "x-mock-polls-pending": "50", "x-mock-completion-tokens": "300"},
)
cancelled = client.responses.cancel(queued.id, extra_headers={"x-mock-completion-tokens": "300"})
print(f"cancel: {cancelled.status}, {cancelled.usage.output_tokens} out")
