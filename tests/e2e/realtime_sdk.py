"""The Realtime WebSocket with the official `openai` Python SDK, unchanged,
pointed at tollgate via base_url (issue 22). Run by tests/realtime.rs with
TOLLGATE_BASE_URL and TG_KEY set; the upstream behind tollgate is the
project's mock. Prints one line per step for the test to compare."""

import os

import openai

client = openai.OpenAI(
    base_url=os.environ["TOLLGATE_BASE_URL"], api_key=os.environ["TG_KEY"], max_retries=0
)

with client.realtime.connect(model="gpt-4o-realtime-preview") as conn:
    event = conn.recv()
    print(f"connected: {event.type}")
    for _ in range(2):
        conn.response.create()
        for event in conn:
            if event.type == "response.done":
                usage = event.response.usage
                print(f"response.done: {event.response.id}, {usage.input_tokens} in, {usage.output_tokens} out")
                break
