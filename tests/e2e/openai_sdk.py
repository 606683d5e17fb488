"""Drives tollgate with the official `openai` Python SDK, unchanged, pointed at it
via base_url. Run by tests/sdk_python.rs with TOLLGATE_BASE_URL set; the
upstream behind tollgate is the project's mock (x-mock-* headers steer it)."""

import asyncio
import os
import sys

import openai

BASE = os.environ["TOLLGATE_BASE_URL"]
passed = 0
failed = 0


def check(name, fn):
    global passed, failed
    try:
        fn()
        passed += 1
        print(f"ok {name}")
    except Exception as e:  # noqa: BLE001 - report every failure, then exit non-zero
        failed += 1
        print(f"FAIL {name}: {type(e).__name__}: {e}")


client = openai.OpenAI(base_url=BASE, api_key=os.environ["TG_KEY"], max_retries=0)
MESSAGES = [{"role": "user", "content": "Say hello"}]


def chat_non_stream():
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        extra_headers={"x-mock-prompt-tokens": "1000", "x-mock-completion-tokens": "500"},
    )
    assert raw.headers["x-tollgate-cost-usd"] == "0.000450000", raw.headers
    assert raw.headers["x-tollgate-request-id"].startswith("req_")
    assert float(raw.headers["x-tollgate-budget-remaining-usd"]) < 10
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from the mock"
    assert completion.usage.prompt_tokens == 1000


def flex_service_tier_is_priced_as_served():
    # o3 at flex: $1 / $4 per M tokens instead of $2 / $8.
    raw = client.chat.completions.with_raw_response.create(
        model="o3",
        messages=MESSAGES,
        service_tier="flex",
        extra_headers={
            "x-mock-prompt-tokens": "10000",
            "x-mock-completion-tokens": "2000",
            "x-mock-service-tier": "flex",
        },
    )
    assert raw.headers["x-tollgate-cost-usd"] == "0.018000000", raw.headers
    assert raw.parse().service_tier == "flex"


def chat_stream_hides_usage():
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the mock", text
    assert all(c.usage is None for c in chunks), "usage chunk leaked"


def chat_stream_with_usage():
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 10
    assert chunks[-1].choices == []


def embeddings():
    raw = client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input="hello", extra_headers={"x-mock-prompt-tokens": "50000"}
    )
    assert raw.headers["x-tollgate-cost-usd"] == "0.001000000", raw.headers
    assert len(raw.parse().data[0].embedding) == 3


def upstream_rate_limit_is_the_sdk_exception():
    try:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers={"x-mock-status": "429"})
    except openai.RateLimitError as e:
        assert e.status_code == 429
        return
    raise AssertionError("no RateLimitError")


def bad_request_is_the_sdk_exception():
    try:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, n="two")  # type: ignore[arg-type]
    except openai.BadRequestError as e:
        assert e.status_code == 400
        assert e.body["param"] == "n", e.body
        return
    raise AssertionError("no BadRequestError")


def models_list():
    ids = [m.id for m in client.models.list()]
    assert ids == ["gpt-4o-mini"], ids


def async_stream():
    async def run():
        aclient = openai.AsyncOpenAI(base_url=BASE, api_key=os.environ["TG_KEY"], max_retries=0)
        stream = await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        text = ""
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        await aclient.close()
        return text

    assert asyncio.run(run()) == "Hello from the mock"


def unknown_key_is_authentication_error():
    bad = openai.OpenAI(base_url=BASE, api_key="tg-not-a-real-key", max_retries=0)
    try:
        bad.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    except openai.AuthenticationError as e:
        assert e.status_code == 401 and e.code == "invalid_api_key", e.body
        return
    raise AssertionError("no AuthenticationError")


def restricted_model_is_permission_denied():
    restricted = openai.OpenAI(base_url=BASE, api_key=os.environ["TG_KEY_RESTRICTED"], max_retries=0)
    try:
        restricted.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    except openai.PermissionDeniedError as e:
        assert e.status_code == 403 and e.code == "model_not_allowed", e.body
        return
    raise AssertionError("no PermissionDeniedError")


def budget_is_rate_limit_error():
    broke = openai.OpenAI(base_url=BASE, api_key=os.environ["TG_KEY_BROKE"], max_retries=0)
    try:
        broke.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    except openai.RateLimitError as e:
        assert e.status_code == 429 and e.code == "budget_exceeded", e.body
        return
    raise AssertionError("no RateLimitError for the budget")


for name, fn in [
    ("chat_non_stream", chat_non_stream),
    ("flex_service_tier_is_priced_as_served", flex_service_tier_is_priced_as_served),
    ("chat_stream_hides_usage", chat_stream_hides_usage),
    ("chat_stream_with_usage", chat_stream_with_usage),
    ("embeddings", embeddings),
    ("upstream_rate_limit_is_the_sdk_exception", upstream_rate_limit_is_the_sdk_exception),
    ("bad_request_is_the_sdk_exception", bad_request_is_the_sdk_exception),
    ("models_list", models_list),
    ("async_stream", async_stream),
    ("unknown_key_is_authentication_error", unknown_key_is_authentication_error),
    ("restricted_model_is_permission_denied", restricted_model_is_permission_denied),
    ("budget_is_rate_limit_error", budget_is_rate_limit_error),
]:
    check(name, fn)

print(f"openai {openai.__version__}: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
