"""Images and audio with the official `openai` Python SDK, unchanged, pointed at
tollgate via base_url (issue 22). Run by tests/media.rs with TOLLGATE_BASE_URL
and the keys set; the upstream behind tollgate is the project's mock. Prints
one line per call for the test to compare."""

import io
import os

import openai

BASE = os.environ["TOLLGATE_BASE_URL"]
client = openai.OpenAI(base_url=BASE, api_key=os.environ["TG_KEY"], max_retries=0)
broke = openai.OpenAI(base_url=BASE, api_key=os.environ["TG_KEY_BROKE"], max_retries=0)

# dall-e-3 at its default size and quality: $0.04.
raw = client.images.with_raw_response.generate(model="dall-e-3", prompt="a lighthouse at dusk")
images = raw.parse()
print(f"images.generate: {len(images.data)} image(s), cost {raw.headers['x-tollgate-cost-usd']}")

# The SDK uploads the file as multipart/form-data.
audio = io.BytesIO(b"\x11" * 48_000)
audio.name = "speech.mp3"
raw = client.audio.transcriptions.with_raw_response.create(
    model="whisper-1", file=audio, extra_headers={"x-mock-audio-seconds": "12.4"}
)
text = raw.parse().text
print(f"audio.transcriptions: {text}, cost {raw.headers['x-tollgate-cost-usd']}")

audio.seek(0)
translated = client.audio.translations.create(model="whisper-1", file=audio)
print(f"audio.translations: {translated.text}")

speech = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello there!")
print(f"audio.speech: {len(speech.content)} bytes")

try:
    broke.images.generate(model="dall-e-3", prompt="x")
    print("images.generate broke: allowed")
except openai.APIStatusError as e:
    print(f"images.generate broke: {e.status_code} {e.body.get('code') if isinstance(e.body, dict) else e.body}")
