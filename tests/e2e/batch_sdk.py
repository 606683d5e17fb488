"""The Batch API with the official `openai` Python SDK, unchanged, pointed at
tollgate via base_url (issue 22). Run by tests/batch.rs with TOLLGATE_BASE_URL
and TG_KEY set (a team with a budget: the input file is uploaded through
tollgate, which bounds the batch from it); the upstream is the project's mock.
Prints one line per step for the test to compare."""

import io
import json
import os
import time

import openai

client = openai.OpenAI(
    base_url=os.environ["TOLLGATE_BASE_URL"], api_key=os.environ["TG_KEY"], max_retries=0
)
tokens = {"x-mock-prompt-tokens": "1000", "x-mock-completion-tokens": "2000"}

lines = [
    {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "max_tokens": 4000,
                 "messages": [{"role": "user", "content": f"question {i}"}]},
    }
    for i in (1, 2)
]
data = io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())
data.name = "batch.jsonl"
uploaded = client.files.create(file=data, purpose="batch")
print(f"files.create: {uploaded.purpose}")

batch = client.batches.create(
    input_file_id=uploaded.id,
    endpoint="/v1/chat/completions",
    completion_window="24h",
    extra_headers=tokens,
)
print(f"batches.create: {batch.status}")

polls = 0
while batch.status not in ("completed", "failed", "expired", "cancelled"):
    time.sleep(0.05)
    batch = client.batches.retrieve(batch.id)
    polls += 1
print(f"batches.retrieve: {batch.status} after {polls} polls")

content = client.files.content(batch.output_file_id)
print(f"files.content: {len(content.text.splitlines())} lines")
